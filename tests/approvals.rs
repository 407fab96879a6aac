//! Signed approvals end to end: a real relay and real nodes over QUIC on
//! 127.0.0.1, SQLite in temporary directories, the seed agreement signed by
//! both of its signatories offline, refusals of bad records by the relay, the
//! relay's receipts (an approval counts from when the relay received it, so a
//! stolen, revoked key cannot backdate one), and the signed bundle verified
//! without a database.

use std::path::Path;

use chrono::Utc;
use samverkan::node::approvals;
use samverkan::node::node::{Node, NodeError};
use samverkan::relay::server::RelayHandle;
use samverkan::shared::approval::{self, Action, ApprovalRecord, ApprovalState};
use samverkan::shared::directory::{Member, MemberKind};
use samverkan::shared::identity::NodeKey;
use samverkan::shared::ids::DocId;
use samverkan::shared::model::{DocKind, DocumentContent, Signatory};
use samverkan::shared::receipt::ApprovalReceipt;
use samverkan::shared::signed_bundle::{self, BundleFiles};

#[path = "support/relay_net.rs"]
mod relay_net;
use relay_net::{org, start_relay, sync, try_sync};

const SEED: &str = include_str!("../../shared/seed/lansovergripande-samverkansoverenskommelse-sodermanland-2023.md");

fn node(root: &Path, relay: &RelayHandle, name: &str, org_name: &str) -> Node {
    let node = Node::init(&root.join(name), org_name, Some(name)).expect("init node");
    relay.enroll_node(node.node_id(), node.org().clone(), name).expect("enroll node");
    node
}

/// Enrolls a signer of `org_name` with `role` at the relay.
fn enroll_signer(
    relay: &RelayHandle,
    key: samverkan::shared::identity::NodeId,
    org_name: &str,
    name: &str,
    role: &str,
) {
    relay
        .enroll(Member {
            key,
            kind: MemberKind::Signer,
            org: org(org_name),
            name: name.into(),
            role: Some(role.into()),
            enrolled_at: Utc::now() - chrono::Duration::seconds(1),
            revoked_at: None,
        })
        .expect("enroll signer");
}

fn read_bundle(dir: &Path) -> BundleFiles {
    BundleFiles {
        manifest: std::fs::read_to_string(dir.join(signed_bundle::MANIFEST_FILE)).unwrap(),
        markdown: std::fs::read_to_string(dir.join(signed_bundle::MARKDOWN_FILE)).unwrap(),
        history: std::fs::read(dir.join(signed_bundle::HISTORY_FILE)).unwrap(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_agreement_signed_offline_by_both_roles_is_approved_changed_and_exported() {
    let root = tempfile::tempdir().unwrap();
    let relay = start_relay(&root.path().join("relay")).await;
    let mut lst = node(root.path(), &relay, "lst", "Länsstyrelsen");
    let mut polis = node(root.path(), &relay, "polis", "Polisområde Södermanland");

    let governor = lst.create_signer("Beatrice Ask", "Landshövding", None).unwrap();
    let chief = polis.create_signer("Mattias Forssten", "Polisområdeschef", None).unwrap();
    enroll_signer(&relay, governor.key, "Länsstyrelsen", "Beatrice Ask", "Landshövding");
    enroll_signer(&relay, chief.key, "Polisområde Södermanland", "Mattias Forssten", "Polisområdeschef");

    let (id, _) = lst.import_markdown(SEED, None).unwrap();
    sync(&mut lst, &relay).await;
    sync(&mut polis, &relay).await;
    assert_eq!(lst.approval_status(&id).unwrap().state, ApprovalState::Draft);

    // Both sign the same version while offline, on different nodes: not counted
    // until the relay has received them (no receipt yet), and not signable twice.
    lst.approve(&id, "Beatrice Ask").unwrap();
    polis.approve(&id, "Mattias Forssten").unwrap();
    let status = lst.approval_status(&id).unwrap();
    assert_eq!(status.state, ApprovalState::Draft, "{status:?}");
    assert_eq!(status.awaiting_receipt.len(), 1);
    assert!(status.flagged.is_empty());
    let err = lst.approve(&id, "Beatrice Ask").unwrap_err().to_string();
    assert!(err.contains("already signed"), "{err}");
    let err = approvals::verify(&lst, id.as_str(), true).unwrap_err().to_string();
    assert!(err.contains("no receipt from the relay yet"), "{err}");

    sync(&mut lst, &relay).await;
    let status = lst.approval_status(&id).unwrap();
    assert_eq!(status.state, ApprovalState::AwaitingSignatures, "the receipt came back with the sync: {status:?}");
    assert!(status.awaiting_receipt.is_empty());
    assert_eq!(status.pending.as_ref().unwrap().missing[0].role, "Polisområdeschef");

    sync(&mut polis, &relay).await;
    sync(&mut lst, &relay).await;
    for node in [&lst, &polis] {
        let status = node.approval_status(&id).unwrap();
        assert_eq!(status.state, ApprovalState::Approved, "{status:?}");
        let names: Vec<&str> = status.in_force.as_ref().unwrap().signed.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names.len(), 2);
        assert!(names.contains(&"Beatrice Ask") && names.contains(&"Mattias Forssten"), "{names:?}");
        assert!(status.flagged.is_empty());
        assert!(status.awaiting_receipt.is_empty());
        approvals::verify(node, id.as_str(), true).expect("every record verifies, with its receipt");
    }

    let err = lst.approve(&id, "Beatrice Ask").unwrap_err().to_string();
    assert!(err.contains("already signed"), "{err}");

    // An edit after signing: changed since approval, the signed text still retrievable exactly.
    polis.edit(&id, "edit", |e| e.set_field("body", &format!("{SEED}\nTillägg efter undertecknandet.\n"))).unwrap();
    sync(&mut polis, &relay).await;
    sync(&mut lst, &relay).await;
    let status = lst.approval_status(&id).unwrap();
    assert_eq!(status.state, ApprovalState::ChangedSinceApproval);
    let heads = status.in_force.unwrap().heads;
    let signed = lst.document(&id).unwrap().at(&heads).unwrap().view().unwrap();
    assert_eq!(signed.body, SEED, "the signed body, byte for byte");
    assert!(lst.document(&id).unwrap().view().unwrap().body.contains("Tillägg"));

    // The bundle: verifiable with only the relay key; any tampering is found.
    let dir = root.path().join("bundle");
    lst.export_signed(&id, &dir).unwrap();
    let files = read_bundle(&dir);
    let report = signed_bundle::verify(&files, Some(&relay.relay_key())).expect("bundle verifies");
    assert_eq!(report.signed.len(), 2);
    assert_eq!(report.heads, heads);
    assert!(!files.markdown.contains("Tillägg"), "the bundle holds the signed version");
    let mut tampered = files.clone();
    tampered.markdown = files.markdown.replacen("Södermanland", "Sörmland", 1);
    let err = signed_bundle::verify(&tampered, Some(&relay.relay_key())).unwrap_err();
    assert!(err.to_string().contains("document.md"), "{err}");
    let stranger = NodeKey::generate().node_id();
    assert!(signed_bundle::verify(&files, Some(&stranger)).is_err(), "another relay key is refused");
    // One flipped byte of a relay receipt (still canonical JSON): refused, naming the receipt.
    let manifest: signed_bundle::Manifest = serde_json::from_str(&files.manifest).unwrap();
    assert_eq!(manifest.receipts.len(), 2);
    let signature = &manifest.receipts[0].relay_signature;
    let flipped = format!("{}{}", if signature.starts_with('0') { "1" } else { "0" }, &signature[1..]);
    let mut tampered = files.clone();
    tampered.manifest = files.manifest.replacen(signature.as_str(), &flipped, 1);
    let err = signed_bundle::verify(&tampered, Some(&relay.relay_key())).unwrap_err().to_string();
    assert!(err.contains("receipt does not verify"), "{err}");
    // A receipt dated earlier than the relay issued it: refused as well.
    let received = manifest.receipts[0].received_at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let earlier = (manifest.receipts[0].received_at - chrono::Duration::days(1))
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let mut tampered = files.clone();
    tampered.manifest = files.manifest.replacen(&received, &earlier, 1);
    assert!(signed_bundle::verify(&tampered, Some(&relay.relay_key())).is_err());

    // A signer revoked after signing: the approval made while enrolled stays valid.
    relay.revoke(&governor.key).unwrap();
    sync(&mut lst, &relay).await;
    let status = lst.approval_status(&id).unwrap();
    assert_eq!(status.state, ApprovalState::ChangedSinceApproval, "{status:?}");
    assert!(status.flagged.is_empty());
    // A signer whose role the document does not require cannot sign it.
    let err = polis.approve(&id, "Mattias Forssten");
    assert!(err.is_ok(), "the police chief is a required signatory: {err:?}");
    lst.create_signer("Anna Andersson", "Kommundirektör", None).unwrap();
    let err = lst.approve(&id, "Anna Andersson").unwrap_err().to_string();
    assert!(err.contains("requires no such signature"), "{err}");
    // A revoked signer cannot sign at all (the record would block the document's sync).
    let err = lst.approve(&id, "Beatrice Ask").unwrap_err().to_string();
    assert!(err.contains("Beatrice Ask cannot sign") && err.contains("was not an enrolled signer"), "{err}");
    relay.shutdown().await;
}

/// Makes a node with a fresh county agreement requiring a Landshövding and a
/// Polisområdeschef, synced once (so the node holds the directory).
async fn agreement_node(root: &Path, relay: &RelayHandle, name: &str) -> (Node, DocId) {
    let mut node = node(root, relay, name, "Länsstyrelsen");
    let mut content = DocumentContent::new(DocKind::Agreement, format!("Överenskommelse {name}"));
    content.parties = vec![org("Länsstyrelsen"), org("Polisområde Södermanland")];
    content.signatories = vec![
        Signatory { org: org("Länsstyrelsen"), role: "Landshövding".into(), name: None },
        Signatory { org: org("Polisområde Södermanland"), role: "Polisområdeschef".into(), name: None },
    ];
    let id = node.create(content).unwrap();
    sync(&mut node, relay).await;
    (node, id)
}

/// Stores `record` in the document on `node`, as a hostile or mistaken node could.
fn store_record(node: &mut Node, id: &DocId, record: &ApprovalRecord) {
    let ctx = node.edit_context();
    let orgs = node.directory().clone();
    node.store_mut()
        .update(id, false, |doc| -> anyhow::Result<_> { Ok(approval::append(doc, &ctx, &orgs, record)?) })
        .unwrap();
}

fn current_heads(node: &Node, id: &DocId) -> Vec<samverkan::shared::automerge::ChangeHash> {
    node.document(id).unwrap().heads()
}

/// The relay's refusal of the next sync, after the node flagged the record itself.
async fn refused(node: &mut Node, relay: &RelayHandle, id: &DocId) -> (String, String) {
    let flagged = node.approval_status(id).unwrap().flagged;
    assert_eq!(flagged.len(), 1, "the node flags the record itself: {flagged:?}");
    let report = try_sync(node, relay).await.expect("the sync goes on; the relay refuses that document only");
    match report.refused.as_slice() {
        [refused] if refused.doc == *id && refused.kind == "changes_refused" => {
            (flagged[0].problem.clone(), refused.reason.clone())
        }
        other => panic!("expected the relay to refuse the approval, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_moved_revoked_and_wrong_role_approvals_are_refused_with_the_reason() {
    let root = tempfile::tempdir().unwrap();
    let relay = start_relay(&root.path().join("relay")).await;
    let governor = NodeKey::generate();
    let chief = NodeKey::generate();
    let retired = NodeKey::generate();
    enroll_signer(&relay, governor.node_id(), "Länsstyrelsen", "Beatrice Ask", "Landshövding");
    enroll_signer(&relay, chief.node_id(), "Polisområde Södermanland", "Mattias Forssten", "Polisområdeschef");
    enroll_signer(&relay, retired.node_id(), "Länsstyrelsen", "Förra landshövdingen", "Landshövding");
    relay.revoke(&retired.node_id()).unwrap();
    let sign =
        |key: &NodeKey, doc: &DocId, heads: &[samverkan::shared::automerge::ChangeHash], org_name: &str, role: &str| {
            ApprovalRecord::sign(Action::Approve, doc, heads, key, org(org_name), role, Utc::now()).unwrap()
        };

    // A forged signature: a valid record altered after signing.
    let (mut node, id) = agreement_node(root.path(), &relay, "forged").await;
    let mut record = sign(&governor, &id, &current_heads(&node, &id), "Länsstyrelsen", "Landshövding");
    record.signed_at -= chrono::Duration::hours(1);
    store_record(&mut node, &id, &record);
    let (local, remote) = refused(&mut node, &relay, &id).await;
    assert!(local.contains("does not verify") && remote.contains("does not verify"), "{local} / {remote}");
    // Nothing of the refused change was stored: another party's node gets the document without it.
    let mut other = self::node(root.path(), &relay, "other", "Polisområde Södermanland");
    sync(&mut other, &relay).await;
    assert!(approval::records(&other.document(&id).unwrap()).is_empty());

    // A signature moved from another document.
    let (mut node, id) = agreement_node(root.path(), &relay, "moved").await;
    let record = sign(&governor, &DocId::random(), &current_heads(&node, &id), "Länsstyrelsen", "Landshövding");
    store_record(&mut node, &id, &record);
    let (local, remote) = refused(&mut node, &relay, &id).await;
    assert!(local.contains("does not verify") && remote.contains("does not verify"), "{local} / {remote}");

    // A revoked signer.
    let (mut node, id) = agreement_node(root.path(), &relay, "revoked").await;
    let record = sign(&retired, &id, &current_heads(&node, &id), "Länsstyrelsen", "Landshövding");
    store_record(&mut node, &id, &record);
    let (local, remote) = refused(&mut node, &relay, &id).await;
    assert!(local.contains("was not an enrolled signer at the signing time"), "{local}");
    assert!(remote.contains("Förra landshövdingen was not an enrolled signer"), "{remote}");

    // A signer signing as a role they do not hold.
    let (mut node, id) = agreement_node(root.path(), &relay, "role").await;
    let record = sign(&chief, &id, &current_heads(&node, &id), "Polisområde Södermanland", "Landshövding");
    store_record(&mut node, &id, &record);
    let (local, remote) = refused(&mut node, &relay, &id).await;
    assert!(local.contains("enrolled as \"Polisområdeschef\""), "{local}");
    assert!(remote.contains("enrolled as \"Polisområdeschef\", but signed as \"Landshövding\""), "{remote}");

    // A good approval on the same relay is accepted, and verifies on another node.
    let (mut node, id) = agreement_node(root.path(), &relay, "good").await;
    let record = sign(&governor, &id, &current_heads(&node, &id), "Länsstyrelsen", "Landshövding");
    store_record(&mut node, &id, &record);
    sync(&mut node, &relay).await;
    let mut police = self::node(root.path(), &relay, "police", "Polisområde Södermanland");
    sync(&mut police, &relay).await;
    let status = police.approval_status(&id).unwrap();
    assert_eq!(status.state, ApprovalState::AwaitingSignatures, "{status:?}");
    assert!(status.flagged.is_empty());
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backdated_approval_by_a_revoked_signer_is_not_counted() {
    let root = tempfile::tempdir().unwrap();
    let relay = start_relay(&root.path().join("relay")).await;
    // The governor's key is enrolled an hour ago, then revoked (stolen); the chief signs properly.
    let stolen = NodeKey::generate();
    relay
        .enroll(Member {
            key: stolen.node_id(),
            kind: MemberKind::Signer,
            org: org("Länsstyrelsen"),
            name: "Beatrice Ask".into(),
            role: Some("Landshövding".into()),
            enrolled_at: Utc::now() - chrono::Duration::hours(1),
            revoked_at: None,
        })
        .unwrap();
    let chief = NodeKey::generate();
    enroll_signer(&relay, chief.node_id(), "Polisområde Södermanland", "Mattias Forssten", "Polisområdeschef");
    let revoked = relay.revoke(&stolen.node_id()).unwrap().revoked_at.unwrap();

    let (mut lst, id) = agreement_node(root.path(), &relay, "lst").await;
    let mut polis = node(root.path(), &relay, "polis", "Polisområde Södermanland");
    sync(&mut polis, &relay).await;
    let heads = current_heads(&polis, &id);
    let good = ApprovalRecord::sign(
        Action::Approve,
        &id,
        &heads,
        &chief,
        org("Polisområde Södermanland"),
        "Polisområdeschef",
        Utc::now(),
    )
    .unwrap();
    store_record(&mut polis, &id, &good);
    sync(&mut polis, &relay).await;
    sync(&mut lst, &relay).await;
    let status = polis.approval_status(&id).unwrap();
    assert_eq!(status.state, ApprovalState::AwaitingSignatures, "{status:?}");
    assert_eq!(status.pending.as_ref().unwrap().missing[0].role, "Landshövding");

    // The attacker, with the stolen key and the Länsstyrelsen node, signs after the
    // revocation claiming a time before it, and stores it directly in the document.
    let backdated = ApprovalRecord::sign(
        Action::Approve,
        &id,
        &current_heads(&lst, &id),
        &stolen,
        org("Länsstyrelsen"),
        "Landshövding",
        revoked - chrono::Duration::minutes(10),
    )
    .unwrap();
    store_record(&mut lst, &id, &backdated);

    // It reaches the police node by offline bundle, with a receipt forged by the attacker.
    let mut bundle = lst.export_bundle(Some(&polis.heads_summary().unwrap()), None).unwrap();
    let forged =
        ApprovalReceipt::issue(&stolen, &id, &backdated.signature, revoked - chrono::Duration::minutes(9)).unwrap();
    bundle.receipts.push(forged);
    let reports = polis.import_bundle(&bundle).unwrap();
    assert!(reports.iter().all(|r| r.error.is_none()), "{reports:?}");
    assert_eq!(approval::records(&polis.document(&id).unwrap()).len(), 2, "the record arrived");

    // Not counted: no receipt from the relay (the forged one was refused).
    let status = polis.approval_status(&id).unwrap();
    assert_eq!(status.state, ApprovalState::AwaitingSignatures, "{status:?}");
    assert!(status.in_force.is_none());
    assert_eq!(status.pending.as_ref().unwrap().signed.len(), 1);
    assert_eq!(status.awaiting_receipt.len(), 1);
    assert_eq!(status.awaiting_receipt[0].signer, stolen.node_id());
    let text = approvals::format_status(&polis, &id, &status, true);
    assert!(text.contains("AWAITING RELAY RECEIPT (not counted yet)"), "{text}");
    // `verify` flags it; `export --signed` has no approved version to export.
    let err = approvals::verify(&polis, id.as_str(), true).unwrap_err().to_string();
    assert!(err.contains("no receipt from the relay yet"), "{err}");
    let err = polis.export_signed(&id, &root.path().join("signed")).unwrap_err();
    assert!(matches!(err, NodeError::NotApproved(_)), "{err}");

    // The relay refuses it when synced, from either node: the key is revoked now.
    for node in [&mut lst, &mut polis] {
        let report = try_sync(node, &relay).await.expect("the sync goes on; the relay refuses that document only");
        match report.refused.as_slice() {
            [refused] if refused.doc == id && refused.kind == "changes_refused" => {
                assert!(refused.reason.contains("Beatrice Ask is revoked now"), "{}", refused.reason);
            }
            other => panic!("expected the relay to refuse the backdated approval, got {other:?}"),
        }
    }
    let status = polis.approval_status(&id).unwrap();
    assert_eq!(status.state, ApprovalState::AwaitingSignatures, "still not counted: {status:?}");
    relay.shutdown().await;
}
