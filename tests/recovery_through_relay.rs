//! Recovery over a real relay: QUIC on 127.0.0.1, SQLite in temporary
//! directories. An approval signed offline by a signer revoked before the node
//! synced is refused with everything after it; `recover` rebuilds the document
//! on what the relay holds and the relay takes the re-applied edits.

use std::path::Path;

use chrono::Utc;
use samverkan::node::node::Node;
use samverkan::node::recover::{self, RecoverError};
use samverkan::relay::server::{self, RelayConfig, RelayHandle};
use samverkan::shared::acceptance::ContentLimits;
use samverkan::shared::approval::{self, Action as RecordAction, ApprovalRecord};
use samverkan::shared::directory::{Member, MemberKind};
use samverkan::shared::identity::NodeKey;
use samverkan::shared::ids::{DocId, ItemId};
use samverkan::shared::model::{Activity, ActivityStatus, DocKind, DocumentContent, Signatory};
use samverkan::shared::recovery::{Action, Outcome};

#[path = "support/relay_net.rs"]
mod relay_net;
use relay_net::{org, sync};

fn node(root: &Path, relay: &RelayHandle, name: &str, org_name: &str) -> Node {
    let node = Node::init(&root.join(name), org_name, Some(name)).expect("init node");
    relay.enroll_node(node.node_id(), node.org().clone(), name).expect("enroll node");
    node
}

fn set_body(node: &mut Node, id: &DocId, body: &str) {
    node.edit(id, "edit body", |e| e.set_body(body)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_approval_by_a_revoked_signer_is_recovered_and_the_edits_after_it_reach_the_relay() {
    let root = tempfile::tempdir().unwrap();
    let relay =
        server::spawn(RelayConfig::new("127.0.0.1:0".parse().unwrap(), root.path().join("relay"))).await.unwrap();
    let governor = NodeKey::generate();
    relay
        .enroll(Member {
            key: governor.node_id(),
            kind: MemberKind::Signer,
            org: org("Länsstyrelsen"),
            name: "Beatrice Ask".into(),
            role: Some("Landshövding".into()),
            enrolled_at: Utc::now() - chrono::Duration::hours(1),
            revoked_at: None,
        })
        .unwrap();
    let mut lst = node(root.path(), &relay, "lst", "Länsstyrelsen");
    let mut polis = node(root.path(), &relay, "polis", "Polisområde Södermanland");
    let mut content = DocumentContent::new(DocKind::Agreement, "Överenskommelse 2026");
    content.parties = vec![org("Länsstyrelsen"), org("Polisområde Södermanland")];
    content.signatories = vec![Signatory { org: org("Länsstyrelsen"), role: "Landshövding".into(), name: None }];
    content.body = "## Mål\n\nFärre inbrott i länet.\n".into();
    let id = lst.create(content).unwrap();
    assert!(sync(&mut lst, &relay).await.refused.is_empty());
    assert!(sync(&mut polis, &relay).await.refused.is_empty());

    // Offline at Länsstyrelsen: the governor approves, then the coordinator edits on.
    let heads = lst.document(&id).unwrap().heads();
    let record = ApprovalRecord::sign(
        RecordAction::Approve,
        &id,
        &heads,
        &governor,
        org("Länsstyrelsen"),
        "Landshövding",
        Utc::now(),
    )
    .unwrap();
    let (ctx, orgs) = (lst.edit_context(), lst.directory().clone());
    lst.store_mut()
        .update(&id, false, |doc| -> anyhow::Result<_> { Ok(approval::append(doc, &ctx, &orgs, &record)?) })
        .unwrap();
    set_body(&mut lst, &id, "## Mål\n\nFärre inbrott i länet, särskilt i bostadsområden.\n");
    let added = Activity {
        id: ItemId::random(),
        what: "Gemensam lägesbild varje månad".into(),
        owners: Vec::new(),
        followup_method: None,
        due: None,
        status: ActivityStatus::Planned,
    };
    lst.edit(&id, "add activity", |e| e.add_activity(&added)).unwrap();
    // Meanwhile the police edit the same sentence, and the relay takes it.
    set_body(&mut polis, &id, "## Mål\n\nFärre inbrott och bedrägerier i länet.\n");
    assert!(sync(&mut polis, &relay).await.refused.is_empty());
    // The key is stolen and revoked before Länsstyrelsen's node syncs: the relay refuses the document.
    relay.revoke(&governor.node_id()).unwrap();
    let report = sync(&mut lst, &relay).await;
    assert_eq!(report.refused.len(), 1, "{:?}", report.refused);
    assert!(lst.store().refusal(&id).unwrap().is_some());
    // Held back until recovered: the next sync does not offer the refused changes again.
    assert!(sync(&mut lst, &relay).await.refused.is_empty());

    let plan = recover::plan(&lst, &id).unwrap();
    let actions: Vec<Action> = plan.changes.iter().map(|c| c.action).collect();
    assert_eq!(actions, [Action::Skip, Action::Reapply, Action::Reapply], "{plan:?}");
    let report = recover::recover(&mut lst, &id).unwrap();
    assert!(report.changes[1..].iter().all(|c| matches!(c.outcome, Outcome::Reapplied { .. })), "{report:?}");
    assert!(report.backup.exists());

    // The relay takes the recovered history; the police get the edits, merged with theirs.
    let synced = sync(&mut lst, &relay).await;
    assert!(synced.refused.is_empty(), "{:?}", synced.refused);
    assert!(lst.store().refusal(&id).unwrap().is_none());
    sync(&mut polis, &relay).await;
    let theirs = polis.document(&id).unwrap().view().unwrap();
    let ours = lst.document(&id).unwrap().view().unwrap();
    assert_eq!(theirs, ours);
    assert_eq!(theirs.body, "## Mål\n\nFärre inbrott och bedrägerier i länet, särskilt i bostadsområden.\n");
    assert!(theirs.activities.iter().any(|a| a.id == added.id));
    assert!(approval::records(&polis.document(&id).unwrap()).is_empty());
    assert!(matches!(recover::plan(&lst, &id), Err(RecoverError::NotRefused(_))));
    relay.shutdown().await;
}

/// A change made before the node heard the relay's (lower) content limits is
/// refused by the relay; the node keeps the limits the relay announced, so
/// `recover` leaves that change out (it stays in the backup) instead of
/// making it again, and the rest reaches the relay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_over_the_relays_limits_is_left_out_by_recovery_and_the_rest_reaches_the_relay() {
    let root = tempfile::tempdir().unwrap();
    let mut config = RelayConfig::new("127.0.0.1:0".parse().unwrap(), root.path().join("relay"));
    config.content = ContentLimits { max_change_bytes: 64 * 1024, max_document_bytes: 1024 * 1024 };
    let relay = server::spawn(config).await.unwrap();
    let mut flen = node(root.path(), &relay, "flen", "Flen");
    let mut polis = node(root.path(), &relay, "polis", "Polisområde Södermanland");
    let mut content = DocumentContent::new(DocKind::CitizenPromise, "Medborgarlöfte Flen");
    content.parties = vec![org("Flen"), org("Polisområde Södermanland")];
    let id = flen.create(content).unwrap();
    assert!(sync(&mut flen, &relay).await.refused.is_empty());
    // Offline, and on a node that had not heard the relay's limits (it kept its own then).
    flen.store_mut().set_content_limits(ContentLimits::default());
    let pasted: String = (0..6000).map(|i| format!("rad {i}: {}\n", i * 7919 % 10007)).collect();
    assert!(pasted.len() > 64 * 1024);
    set_body(&mut flen, &id, &pasted);
    flen.edit(&id, "title", |e| e.set_title("Medborgarlöfte Flen 2027")).unwrap();

    // The relay refuses the document for the pasted change; the node takes the relay's limits again.
    let report = sync(&mut flen, &relay).await;
    assert_eq!(report.refused.len(), 1, "{:?}", report.refused);
    assert_eq!(
        flen.store().content_limits(),
        ContentLimits { max_change_bytes: 64 * 1024, max_document_bytes: 1024 * 1024 }
    );

    let report = recover::recover(&mut flen, &id).unwrap();
    let outcomes: Vec<&Outcome> = report.changes.iter().map(|c| &c.outcome).collect();
    assert!(matches!(outcomes[..], [Outcome::NotReapplied { .. }, Outcome::Reapplied { .. }]), "{outcomes:?}");
    assert!(std::fs::read_to_string(&report.backup_markdown).unwrap().contains("rad 5999"), "kept in the backup");
    let synced = sync(&mut flen, &relay).await;
    assert!(synced.refused.is_empty(), "{:?}", synced.refused);
    sync(&mut polis, &relay).await;
    let theirs = polis.document(&id).unwrap().view().unwrap();
    assert_eq!(theirs.title, "Medborgarlöfte Flen 2027");
    assert!(!theirs.body.contains("rad 1:"));
    relay.shutdown().await;
}
