//! One document's failure stays with that document: a real relay and real
//! nodes (QUIC on 127.0.0.1, SQLite in temporary directories, daemons in
//! tasks), bounded timeouts everywhere. Party removal, documents the node's
//! organisation is not a party to, and what the node shows and refuses.

use std::path::{Path, PathBuf};
use std::time::Duration;

use samverkan::node::node::{Node, NodeError, SyncProblem};
use samverkan::node::status;
use samverkan::node::sync::{self, DaemonOptions};
use samverkan::relay::server::RelayHandle;
use samverkan::shared::ids::DocId;
use samverkan::shared::model::{DocKind, DocumentContent};
use samverkan::shared::wire::RefusalKind;
use tokio::sync::watch;
use tokio::task::JoinHandle;

#[path = "support/relay_net.rs"]
mod relay_net;
use relay_net::{bounded, eventually, org, start_relay, sync, target};

/// A new node of `org`, enrolled at the relay, with the relay pinned.
fn node(root: &Path, relay: &RelayHandle, name: &str, org_name: &str) -> (PathBuf, Node) {
    let dir = root.join(name);
    let mut node = Node::init(&dir, org_name, Some(name)).expect("init node");
    relay.enroll_node(node.node_id(), node.org().clone(), name).expect("enroll node");
    node.store_mut().set_meta(samverkan::node::node::META_RELAY_KEY, &relay.relay_key().to_string()).unwrap();
    (dir, node)
}

fn promise(node: &mut Node, title: &str, parties: &[&str]) -> DocId {
    let mut content = DocumentContent::new(DocKind::CitizenPromise, title);
    content.parties = parties.iter().map(|p| org(p)).collect();
    node.create(content).unwrap()
}

fn body(node: &Node, id: &DocId) -> String {
    node.document(id).unwrap().view().unwrap().body
}

/// Whether `text` becomes the document's body on `node` within a few seconds of syncs.
async fn reaches(node: &mut Node, relay: &RelayHandle, id: &DocId, text: &str) -> bool {
    for _ in 0..200 {
        sync(node, relay).await;
        if node.document(id).is_ok_and(|d| d.view().is_ok_and(|v| v.body == text)) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// Runs a node's daemon in a task until the returned sender says stop.
fn daemon(dir: &Path, relay: &RelayHandle) -> (watch::Sender<bool>, JoinHandle<()>) {
    let mut node = Node::open(dir).unwrap();
    let target = target(relay);
    let (stop, mut stopped) = watch::channel(false);
    let options = DaemonOptions { poll_interval: Duration::from_millis(20), ..DaemonOptions::default() };
    let task = tokio::spawn(async move {
        sync::daemon(&mut node, &target, &options, async move {
            let _ = stopped.changed().await;
        })
        .await
        .unwrap();
    });
    (stop, task)
}

/// The relay's view of one node: connections and its last connection error.
fn relay_view(relay: &RelayHandle, node: &Node) -> (u64, Option<String>) {
    let key = node.node_id().to_string();
    let status = relay.status();
    let entry = status.nodes.iter().find(|n| n.node_id == key).expect("the relay knows the node");
    (entry.connections, entry.last_error.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_removed_from_a_documents_parties_keeps_a_read_only_copy_and_syncs_everything_else() {
    let root = tempfile::tempdir().unwrap();
    let relay = start_relay(&root.path().join("relay")).await;
    let (k_dir, mut katrineholm) = node(root.path(), &relay, "katrineholm", "Katrineholm");
    let (_, mut police) = node(root.path(), &relay, "polisen", "Polisen");
    let shared = promise(&mut katrineholm, "Medborgarlöfte Katrineholm 2026", &["Katrineholm", "Polisen"]);
    let other = promise(&mut katrineholm, "Trygghetsvandringar Katrineholm", &["Katrineholm", "Polisen"]);
    sync(&mut katrineholm, &relay).await;
    sync(&mut police, &relay).await;
    assert!(police.document(&shared).is_ok() && police.document(&other).is_ok());

    // The police take Katrineholm off the first document's parties while
    // Katrineholm, offline and not knowing, edits it (its copy still names it).
    police.edit(&shared, "parties", |e| e.set_parties(&[org("Polisen")])).unwrap();
    sync(&mut police, &relay).await;
    katrineholm.edit(&shared, "edit", |e| e.set_body("Katrineholms text som inte längre delas.\n")).unwrap();
    drop(katrineholm);

    // Its daemon connects, offers the document, and the relay refuses that one alone.
    let (stop, task) = daemon(&k_dir, &relay);
    let mut k_cli = Node::open(&k_dir).unwrap();
    eventually("the refusal is recorded", || k_cli.store().refusal(&shared).unwrap().is_some()).await;
    k_cli.edit(&other, "edit", |e| e.set_body("Vi vandrar varannan torsdag.\n")).unwrap();
    let refusal = k_cli.store().refusal(&shared).unwrap().unwrap();
    assert_eq!(refusal.kind, RefusalKind::NotShared, "{refusal:?}");
    assert!(refusal.peer_heads.is_empty() && refusal.your_seq == 0, "nothing about a document it may not see");

    // The other document still syncs, on the same connection.
    assert!(reaches(&mut police, &relay, &other, "Vi vandrar varannan torsdag.\n").await);
    assert_ne!(body(&police, &shared), "Katrineholms text som inte längre delas.\n");
    let (connections, last_error) = relay_view(&relay, &k_cli);
    assert_eq!((connections, last_error), (1, None), "the daemon's connection was never closed");

    // Locally: the copy is kept, read-only, and marked as no longer shared.
    assert_eq!(body(&k_cli, &shared), "Katrineholms text som inte längre delas.\n");
    let err = k_cli.edit(&shared, "edit", |e| e.set_body("Till ingen nytta.\n")).unwrap_err();
    assert!(matches!(err, NodeError::NoLongerShared { .. }), "{err}");
    assert!(err.to_string().contains("no longer shared"), "{err}");
    assert!(matches!(k_cli.sync_problem(&shared).unwrap(), Some(SyncProblem::Refused(_))));
    assert_eq!(k_cli.sync_problem(&other).unwrap(), None);
    let node_status = status::node_status(&mut k_cli, None, false).unwrap();
    let line = node_status.docs.iter().find(|d| d.id == shared).unwrap();
    assert!(line.not_synced.as_deref().unwrap_or_default().contains("no longer shared"), "{line:?}");
    assert_eq!(line.local_changes_waiting, 0, "nothing is counted as waiting that will never be sent");
    stop.send(true).unwrap();
    bounded("daemon stops", task).await.unwrap();

    // A one-shot sync does not offer it again: nothing refused, nothing sent.
    let report = sync(&mut k_cli, &relay).await;
    assert!(report.refused.is_empty(), "{report:?}");

    // Added back as a party: the relay offers the document again and the node takes it up.
    police.edit(&shared, "parties", |e| e.set_parties(&[org("Katrineholm"), org("Polisen")])).unwrap();
    sync(&mut police, &relay).await;
    let report = sync(&mut k_cli, &relay).await;
    assert!(report.refused.is_empty(), "{report:?}");
    assert_eq!(k_cli.store().refusal(&shared).unwrap(), None, "shared again");
    k_cli.edit(&shared, "edit", |e| e.set_body("Åter tillsammans.\n")).unwrap();
    sync(&mut k_cli, &relay).await;
    sync(&mut police, &relay).await;
    assert_eq!(body(&police, &shared), "Åter tillsammans.\n");
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_keeps_a_document_its_organisation_is_not_party_to_and_says_so() {
    let root = tempfile::tempdir().unwrap();
    let relay = start_relay(&root.path().join("relay")).await;
    let (k_dir, mut katrineholm) = node(root.path(), &relay, "katrineholm", "Katrineholm");
    let (_, mut police) = node(root.path(), &relay, "polisen", "Polisen");
    let ours = promise(&mut katrineholm, "Medborgarlöfte Katrineholm 2026", &["Katrineholm", "Polisen"]);
    sync(&mut katrineholm, &relay).await;
    sync(&mut police, &relay).await;
    let (stop, task) = daemon(&k_dir, &relay);
    let mut k_cli = Node::open(&k_dir).unwrap();
    eventually("Katrineholm's daemon connects", || relay_view(&relay, &k_cli).0 == 1).await;

    // `new citizen_promise --party Flen --party Polisen` on the Katrineholm node.
    let foreign = promise(&mut k_cli, "Medborgarlöfte Flen (utkast)", &["Flen", "Polisen"]);
    let note = k_cli.sharing_note(&foreign).unwrap().expect("creating it says it will not sync");
    assert!(note.contains("not a party"), "{note}");
    k_cli.edit(&ours, "edit", |e| e.set_body("Vi lovar fler vandringar.\n")).unwrap();
    assert!(reaches(&mut police, &relay, &ours, "Vi lovar fler vandringar.\n").await, "its own document syncs");
    assert!(police.document(&foreign).is_err(), "the other document never left the node");
    let (connections, last_error) = relay_view(&relay, &k_cli);
    assert_eq!((connections, last_error), (1, None), "the daemon's connection was never closed");
    stop.send(true).unwrap();
    bounded("daemon stops", task).await.unwrap();

    // Status says why it does not sync, and counts nothing as waiting for ever.
    let node_status = status::node_status(&mut k_cli, None, false).unwrap();
    let line = node_status.docs.iter().find(|d| d.id == foreign).unwrap();
    assert!(line.not_synced.as_deref().unwrap_or_default().contains("not a party"), "{line:?}");
    assert_eq!(line.local_changes_waiting, 0);
    let text = status::format_status(&node_status);
    assert!(text.contains("NOT SYNCED"), "{text}");
    let report = sync(&mut k_cli, &relay).await;
    assert!(report.refused.is_empty(), "never offered, so never refused: {report:?}");
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_daemon_pauses_a_refused_document_and_pushes_it_once_recovered() {
    use samverkan::node::recover;
    use samverkan::shared::directory::{Member, MemberKind};
    use samverkan::shared::model::Signatory;

    let root = tempfile::tempdir().unwrap();
    let relay = start_relay(&root.path().join("relay")).await;
    let (lst_dir, mut lst) = node(root.path(), &relay, "lansstyrelsen", "Länsstyrelsen");
    let (_, mut police) = node(root.path(), &relay, "polisen", "Polisen");
    let mut content = DocumentContent::new(DocKind::Agreement, "Samverkansöverenskommelse 2027");
    content.parties = vec![org("Länsstyrelsen"), org("Polisen")];
    content.signatories = vec![Signatory { org: org("Länsstyrelsen"), role: "Landshövding".into(), name: None }];
    let agreement = lst.create(content).unwrap();
    let other = promise(&mut lst, "Regional nätverksträff", &["Länsstyrelsen", "Polisen"]);
    let governor = lst.create_signer("Landshövdingen", "Landshövding", None).unwrap();
    relay
        .enroll(Member {
            key: governor.key,
            kind: MemberKind::Signer,
            org: org("Länsstyrelsen"),
            name: governor.name.clone(),
            role: Some(governor.role.clone()),
            enrolled_at: chrono::Utc::now() - chrono::Duration::seconds(1),
            revoked_at: None,
        })
        .unwrap();
    sync(&mut lst, &relay).await;
    sync(&mut police, &relay).await;

    // Offline: approved, then typed on; the signer is revoked before the node is back online.
    lst.approve(&agreement, "Landshövdingen").unwrap();
    let typed = "Parterna ses fyra gånger om året.\n";
    lst.edit(&agreement, "edit", |e| e.set_body(typed)).unwrap();
    relay.revoke(&governor.key).unwrap();
    drop(lst);

    // The daemon connects: that document is refused and paused, the other syncs on.
    let (stop, task) = daemon(&lst_dir, &relay);
    let mut cli = Node::open(&lst_dir).unwrap();
    eventually("the refusal is recorded", || cli.store().refusal(&agreement).unwrap().is_some()).await;
    // The operator sees it on the dashboard: which document, refused by whom and why.
    let refused_on_relay = |relay: &RelayHandle, node: &Node| {
        let key = node.node_id().to_string();
        let status = relay.status();
        let entry = status.nodes.into_iter().find(|n| n.node_id == key).expect("the relay knows the node");
        entry.docs.into_iter().filter_map(|d| d.refused.map(|r| (d.doc, r))).collect::<Vec<_>>()
    };
    let refused = refused_on_relay(&relay, &cli);
    assert!(
        matches!(refused.as_slice(), [(doc, r)] if *doc == agreement && r.by == "relay" && r.kind == "changes_refused"),
        "{refused:?}"
    );
    cli.edit(&other, "edit", |e| e.set_body("Träff i Eskilstuna i mars.\n")).unwrap();
    assert!(reaches(&mut police, &relay, &other, "Träff i Eskilstuna i mars.\n").await);

    // Recovered from the command line while the daemon runs: the daemon pushes the
    // recovered history on the connection it has, and the relay takes it.
    let report = recover::recover(&mut cli, &agreement).unwrap();
    println!("{}", recover::format_report(&report));
    assert!(reaches(&mut police, &relay, &agreement, typed).await, "the typed text reached the police");
    let (connections, last_error) = relay_view(&relay, &cli);
    assert_eq!((connections, last_error), (1, None), "one connection throughout, never closed with an error");
    assert_eq!(cli.store().refusal(&agreement).unwrap(), None);
    eventually("the dashboard no longer shows the refusal", || refused_on_relay(&relay, &cli).is_empty()).await;
    stop.send(true).unwrap();
    bounded("daemon stops", task).await.unwrap();
    relay.shutdown().await;
}
