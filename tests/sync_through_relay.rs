//! Real relay, real nodes: QUIC on 127.0.0.1 (port 0), SQLite files in temporary
//! directories, bounded timeouts everywhere.

use std::path::{Path, PathBuf};
use std::time::Duration;

use samverkan::node::node::Node;
use samverkan::node::sync::{self, DaemonOptions};
use samverkan::relay::server::RelayHandle;
use samverkan::shared::ids::{DocId, ItemId};
use samverkan::shared::markdown;
use samverkan::shared::model::{Activity, ActivityStatus, DocKind, DocumentContent};

#[path = "support/relay_net.rs"]
mod relay_net;
use relay_net::{bounded, eventually, start_relay, sync, target, LIMIT};

const SEED: &str = include_str!("../../shared/seed/lansovergripande-samverkansoverenskommelse-sodermanland-2023.md");

/// A new node of `org`, enrolled at the relay.
fn node(root: &Path, relay: &RelayHandle, name: &str, org: &str) -> (PathBuf, Node) {
    let dir = root.join(name);
    let node = Node::init(&dir, org, Some(name)).expect("init node");
    relay.enroll_node(node.node_id(), node.org().clone(), name).expect("enroll node");
    (dir, node)
}

/// Every document's heads and exported Markdown.
fn fingerprint(node: &mut Node) -> Vec<(DocId, Vec<String>, String)> {
    let mut out = Vec::new();
    for summary in node.list().unwrap() {
        let mut doc = node.document(&summary.id).unwrap();
        let heads = doc.heads().iter().map(ToString::to_string).collect();
        out.push((summary.id, heads, markdown::export(&doc.view().unwrap(), node.directory())));
    }
    out.sort();
    out
}

fn body(node: &mut Node, id: &DocId) -> String {
    node.document(id).unwrap().view().unwrap().body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_edits_on_two_nodes_reach_a_third_that_never_met_the_first() {
    let root = tempfile::tempdir().unwrap();
    let relay = start_relay(&root.path().join("relay")).await;
    // The seed agreement's parties: Länsstyrelsen and the police area. C is a
    // second police node (a kommunpolis), never online together with A.
    let (_, mut a) = node(root.path(), &relay, "lansstyrelsen", "Länsstyrelsen");
    let (_, mut b) = node(root.path(), &relay, "polisen", "Polisen");
    let (_, mut c) = node(root.path(), &relay, "kommunpolis-flen", "Polisen");

    let (id, _) = a.import_markdown(SEED, None).unwrap();
    sync(&mut a, &relay).await;
    sync(&mut b, &relay).await;
    assert_eq!(fingerprint(&mut a), fingerprint(&mut b));

    // Offline: both edit the same agreement, in the same and in different paragraphs.
    let original = body(&mut a, &id);
    let a_text = original.replacen("Styrgruppen bör träffas", "Styrgruppen ska träffas", 1);
    a.edit(&id, "edit", |e| e.set_body(&a_text)).unwrap();
    let b_text = original.replacen("minst två gånger per år.", "minst två gånger per år, vår och höst.", 1).replacen(
        "Kommunerna har goda",
        "Kommunerna har mycket goda",
        1,
    );
    b.edit(&id, "edit", |e| e.set_body(&b_text)).unwrap();

    // A syncs and goes away; B syncs; C, never online with A, sees both.
    sync(&mut a, &relay).await;
    drop(a);
    let report = sync(&mut b, &relay).await;
    assert_eq!(report.docs_received, 1, "{report:?}");
    let c_report = sync(&mut c, &relay).await;
    println!("third node's first sync: {c_report:?}");
    let merged = body(&mut c, &id);
    assert!(merged.contains("Styrgruppen ska träffas minst två gånger per år, vår och höst."), "{merged}");
    assert!(merged.contains("Kommunerna har mycket goda"));

    // A comes back and catches up; all three are equal.
    let mut a = Node::open(&root.path().join("lansstyrelsen")).unwrap();
    sync(&mut a, &relay).await;
    let reference = fingerprint(&mut c);
    assert_eq!(fingerprint(&mut a), reference);
    assert_eq!(fingerprint(&mut b), reference);
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_edits_are_pushed_between_daemons() {
    let root = tempfile::tempdir().unwrap();
    let relay = start_relay(&root.path().join("relay")).await;
    let (a_dir, mut a) = node(root.path(), &relay, "eskilstuna", "Eskilstuna");
    let (b_dir, mut b) = node(root.path(), &relay, "polisen", "Polisen");
    let mut content = DocumentContent::new(DocKind::CitizenPromise, "Medborgarlöfte Eskilstuna 2025");
    content.parties = vec![a.org().clone(), b.org().clone()];
    let id = a.create(content).unwrap();
    sync(&mut a, &relay).await;
    sync(&mut b, &relay).await;

    let target = target(&relay);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let options = DaemonOptions { poll_interval: Duration::from_millis(20), ..DaemonOptions::default() };
    let daemons = [(a, stop_rx.clone()), (b, stop_rx)].map(|(mut node, mut stop)| {
        let target = target.clone();
        let options = options.clone();
        tokio::spawn(async move {
            sync::daemon(&mut node, &target, &options, async move {
                let _ = stop.changed().await;
            })
            .await
            .unwrap();
        })
    });

    // Edits come from other processes on the same data directories (like CLI invocations).
    let mut a_cli = Node::open(&a_dir).unwrap();
    let b_cli = Node::open(&b_dir).unwrap();
    let mut latencies = Vec::new();
    for i in 0..20 {
        let what = format!("Trygghetsvandring nummer {i}");
        let started = std::time::Instant::now();
        a_cli
            .edit(&id, "add", |e| {
                e.add_activity(&Activity {
                    id: ItemId::random(),
                    what: what.clone(),
                    owners: Vec::new(),
                    followup_method: None,
                    due: None,
                    status: ActivityStatus::Planned,
                })
            })
            .unwrap();
        eventually("the edit reaching B", || {
            b_cli.document(&id).map(|d| d.view().unwrap().activities.iter().any(|x| x.what == what)).unwrap_or(false)
        })
        .await;
        latencies.push(started.elapsed());
    }
    latencies.sort();
    println!(
        "edit on A visible on B (daemon poll {:?}): median {:?}, max {:?}",
        options.poll_interval,
        latencies[latencies.len() / 2],
        latencies[latencies.len() - 1]
    );
    stop_tx.send(true).unwrap();
    for d in daemons {
        bounded("daemon stop", d).await.unwrap();
    }
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_restart_mid_sync_and_node_restart_lose_nothing_and_resync_cheaply() {
    let root = tempfile::tempdir().unwrap();
    let relay_dir = root.path().join("relay");
    let relay = start_relay(&relay_dir).await;
    let (a_dir, mut a) = node(root.path(), &relay, "nykoping", "Nyköping");
    let (_, b) = node(root.path(), &relay, "oxelosund", "Oxelösund");
    let parties = vec![a.org().clone(), b.org().clone()];
    drop(b);
    let mut ids = Vec::new();
    for i in 0..60 {
        let mut content = DocumentContent::new(DocKind::OperationsPlan, format!("Åtgärdsplan {i}"));
        content.parties = parties.clone();
        content.body = SEED.to_string();
        ids.push(a.create(content).unwrap());
    }

    // The relay goes down while A's first sync is under way.
    let target_1 = target(&relay);
    let sync_task = tokio::spawn(async move {
        let result = sync::sync_once(&mut a, &target_1, LIMIT).await;
        (a, result)
    });
    eventually("A connected", || !relay.connected().is_empty()).await;
    relay.shutdown().await;
    let (a, first) = bounded("interrupted sync", sync_task).await.unwrap();
    println!("sync interrupted by the relay's shutdown: {:?}", first.as_ref().map(|r| r.bytes_sent));

    // Restart the relay on the same data; restart the node; sync again.
    let relay = start_relay(&relay_dir).await;
    drop(a);
    let mut a = Node::open(&a_dir).unwrap();
    sync(&mut a, &relay).await;

    let mut b = Node::open(&root.path().join("oxelosund")).unwrap();
    let first = sync(&mut b, &relay).await;
    assert_eq!(fingerprint(&mut b), fingerprint(&mut a), "nothing lost across the restarts");
    assert_eq!(b.list().unwrap().len(), ids.len());
    let second = sync(&mut b, &relay).await;
    println!(
        "fresh node: first sync {} bytes in / {} out, second (unchanged) {} in / {} out, ratio {:.4}",
        first.bytes_received,
        first.bytes_sent,
        second.bytes_received,
        second.bytes_sent,
        (second.bytes_received + second.bytes_sent) as f64 / (first.bytes_received + first.bytes_sent) as f64
    );
    assert_eq!(second.messages_sent + second.messages_received, 0, "{second:?}");
    assert!((second.bytes_received + second.bytes_sent) * 50 < first.bytes_received + first.bytes_sent);
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_document_created_offline_reaches_every_node() {
    let root = tempfile::tempdir().unwrap();
    let relay = start_relay(&root.path().join("relay")).await;
    let mut nodes: Vec<Node> = ["Trosa", "Gnesta", "Vingåker", "Katrineholm"]
        .iter()
        .map(|org| node(root.path(), &relay, org, org).1)
        .collect();
    for n in nodes.iter_mut() {
        sync(n, &relay).await;
    }
    let mut content = DocumentContent::new(DocKind::CitizenPromise, "Medborgarlöfte Trosa 2026");
    content.parties = nodes.iter().map(|n| n.org().clone()).collect();
    let id = nodes[0].create(content).unwrap();
    for n in nodes.iter_mut() {
        sync(n, &relay).await;
    }
    for n in nodes.iter_mut() {
        assert_eq!(n.document(&id).unwrap().view().unwrap().title, "Medborgarlöfte Trosa 2026");
    }
    let reference = fingerprint(&mut nodes[0]);
    for n in nodes.iter_mut() {
        assert_eq!(fingerprint(n), reference);
    }
    relay.shutdown().await;
}

/// A's daemon (told of local edits) and B's (reporting what it stored),
/// connected to the relay, with no polling: nothing else writes meanwhile.
struct TwoDaemons {
    notify: std::sync::Arc<tokio::sync::Notify>,
    received: tokio::sync::mpsc::UnboundedReceiver<DocId>,
    stop: tokio::sync::watch::Sender<bool>,
    daemons: Vec<tokio::task::JoinHandle<()>>,
}

impl TwoDaemons {
    async fn start(relay: &RelayHandle, a: Node, b: Node) -> Self {
        let quiet = DaemonOptions { poll_interval: Duration::from_secs(3600), ..DaemonOptions::default() };
        let notify = std::sync::Arc::new(tokio::sync::Notify::new());
        let (received_tx, received) = tokio::sync::mpsc::unbounded_channel();
        let a_options = DaemonOptions { local_edits: Some(notify.clone()), ..quiet.clone() };
        let b_options = DaemonOptions { received: Some(received_tx), ..quiet };
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let target = target(relay);
        let daemons = [(a, a_options), (b, b_options)]
            .map(|(mut node, options)| {
                let (target, mut stop) = (target.clone(), stop_rx.clone());
                tokio::spawn(async move {
                    sync::daemon(&mut node, &target, &options, async move {
                        let _ = stop.changed().await;
                    })
                    .await
                    .unwrap();
                })
            })
            .into();
        eventually("both daemons connected", || relay.connected().len() == 2).await;
        Self { notify, received, stop, daemons }
    }

    async fn stop(self) {
        self.stop.send(true).unwrap();
        for d in self.daemons {
            bounded("daemon stop", d).await.unwrap();
        }
    }
}

/// Another process holding a node database's write lock (a long import, an
/// editor's transaction) until it is released.
struct WriteLockHolder {
    release: std::sync::mpsc::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl WriteLockHolder {
    /// Takes the write lock of the node database in `dir` (in a transaction on `id`).
    fn take(dir: &Path, id: &DocId) -> Self {
        let (locked_tx, locked) = std::sync::mpsc::channel();
        let (release, release_rx) = std::sync::mpsc::channel::<()>();
        let (dir, id) = (dir.to_path_buf(), id.clone());
        let thread = std::thread::spawn(move || {
            let mut other = Node::open(&dir).unwrap();
            other
                .store_mut()
                .update(&id, false, |_| {
                    locked_tx.send(()).unwrap();
                    let _ = release_rx.recv();
                    Ok::<_, samverkan::store::StoreError>(())
                })
                .unwrap();
        });
        locked.recv().unwrap();
        Self { release, thread }
    }

    fn release(self) {
        self.release.send(()).unwrap();
        self.thread.join().unwrap();
    }
}

/// Nodes A (Eskilstuna) and B (Polisen) sharing one citizen promise, synced.
async fn two_nodes_sharing_a_document(root: &Path, relay: &RelayHandle) -> (PathBuf, Node, Node, DocId) {
    let (a_dir, mut a) = node(root, relay, "eskilstuna", "Eskilstuna");
    let (_, mut b) = node(root, relay, "polisen", "Polisen");
    let mut content = DocumentContent::new(DocKind::CitizenPromise, "Medborgarlöfte Eskilstuna 2025");
    content.parties = vec![a.org().clone(), b.org().clone()];
    let id = a.create(content).unwrap();
    sync(&mut a, relay).await;
    sync(&mut b, relay).await;
    (a_dir, a, b, id)
}

/// A daemon sends an edit, and takes the relay's acknowledgement, from a read
/// snapshot: another process holding the node database's write lock (a long
/// import, an editor's transaction) does not hold the edit back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_passes_an_edit_on_while_another_process_holds_the_write_lock() {
    let root = tempfile::tempdir().unwrap();
    let relay = start_relay(&root.path().join("relay")).await;
    let (a_dir, a, b, id) = two_nodes_sharing_a_document(root.path(), &relay).await;
    let mut daemons = TwoDaemons::start(&relay, a, b).await;

    let mut editor = Node::open(&a_dir).unwrap();
    editor.edit(&id, "title", |e| e.set_title("Medborgarlöfte Eskilstuna 2026")).unwrap();
    // Another process takes the write lock and keeps it until B has the edit.
    let holder = WriteLockHolder::take(&a_dir, &id);
    daemons.notify.notify_one();
    let got = bounded("the edit reaching B while A's database is locked", daemons.received.recv()).await;
    assert_eq!(got.as_ref(), Some(&id));
    holder.release();

    daemons.stop().await;
    relay.shutdown().await;
}

/// The same at connect time: a daemon starting up offers the edits made
/// offline by generating each document's message from a read snapshot, so a
/// write lock held by another process holds none of them back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_connecting_sends_offline_edits_while_another_process_holds_the_write_lock() {
    let root = tempfile::tempdir().unwrap();
    let relay = start_relay(&root.path().join("relay")).await;
    let (a_dir, mut a, b, id) = two_nodes_sharing_a_document(root.path(), &relay).await;
    a.edit(&id, "title", |e| e.set_title("Medborgarlöfte Eskilstuna 2026")).unwrap();
    let holder = WriteLockHolder::take(&a_dir, &id);
    let mut daemons = TwoDaemons::start(&relay, a, b).await;
    let got = bounded("the offline edit reaching B while A's database is locked", daemons.received.recv()).await;
    assert_eq!(got.as_ref(), Some(&id));
    holder.release();

    daemons.stop().await;
    relay.shutdown().await;
}

/// A fresh node pulling more documents than the relay keeps loaded: the
/// relay loads each document once (its start and the node's answer are
/// worked out on the same loaded copy, `START_WINDOW` documents at a time,
/// fewer than it keeps loaded); the operator sees the loads in the status
/// (and in `samverkan_relay_document_loads_total`, checked in `monitoring.rs`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_node_pulling_more_documents_than_the_relay_keeps_loaded_makes_it_load_none() {
    use samverkan::shared::sync::START_WINDOW;
    let root = tempfile::tempdir().unwrap();
    let mut config = relay_net::relay_config(&root.path().join("relay"));
    config.cached_documents = 3 * START_WINDOW;
    let relay = relay_net::spawn_relay(config).await;
    let mut seeder = relay_net::enrolled(root.path(), &relay, "seeder", "Länsstyrelsen");
    let docs = 8 * START_WINDOW;
    let mut ids = Vec::new();
    for n in 0..docs {
        let mut content = DocumentContent::new(DocKind::CitizenPromise, format!("Medborgarlöfte {n}"));
        content.parties = vec![relay_net::org("Länsstyrelsen"), relay_net::org("Trosa")];
        ids.push(seeder.create(content).unwrap());
    }
    sync(&mut seeder, &relay).await;
    // Some documents also have increments on top of their snapshot at the relay.
    for id in ids.iter().step_by(7) {
        seeder.edit(id, "title", |e| e.set_title("Medborgarlöfte, reviderat")).unwrap();
    }
    sync(&mut seeder, &relay).await;

    let before = relay.status().relay.document_loads;
    let mut trosa = relay_net::enrolled(root.path(), &relay, "trosa", "Trosa");
    sync(&mut trosa, &relay).await;
    assert_eq!(trosa.list().unwrap().len(), docs);
    for id in ids.iter().step_by(7) {
        assert_eq!(trosa.document(id).unwrap().title().unwrap(), "Medborgarlöfte, reviderat");
        assert_eq!(trosa.document(id).unwrap().heads(), seeder.document(id).unwrap().heads());
    }
    // Those the relay did not hold loaded went whole from their stored bytes, the
    // others from memory (a seed-sized document costs Automerge 0.12 milliseconds to load).
    let loads = relay.status().relay.document_loads - before;
    assert_eq!(loads, 0, "{loads} documents loaded to send {docs} to a fresh node");
    relay.shutdown().await;
}
