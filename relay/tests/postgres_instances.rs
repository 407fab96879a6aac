//! Several relay instances on one PostgreSQL database, with real nodes over
//! QUIC on 127.0.0.1: offline edits made through different instances
//! converge, a change accepted by one instance reaches a node connected to
//! the other promptly, enrollment and revocation on one instance take effect
//! on the other, and when one instance (a real `samverkan-relay` process) is
//! SIGKILLed during syncs its nodes fail over and no acknowledged change is lost.
//!
//! Each test needs a PostgreSQL server (`SAMVERKAN_TEST_POSTGRES`, a
//! throwaway database per test); without one it says it skipped and why, and
//! with `SAMVERKAN_REQUIRE_POSTGRES` set (CI) it fails instead.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use samverkan_node::node::Node;
use samverkan_node::sync::{self, DaemonOptions, RelayTarget, RelayTargets};
use samverkan_relay::config::StorageLocation;
use samverkan_relay::server::{self, RelayConfig, RelayHandle};
use samverkan_relay::storage::postgres::{self, TestDatabase};
use samverkan_shared::ids::{DocId, ItemId};
use samverkan_shared::model::{Activity, ActivityStatus, DocKind, DocumentContent};

const BIN: &str = env!("CARGO_BIN_EXE_samverkan-relay");
const LIMIT: Duration = Duration::from_secs(20);

/// A fresh database, or `None` (having said why) when no server is configured.
fn database(test: &str) -> Option<String> {
    match postgres::test_database().unwrap_or_else(|e| panic!("{test}: {e}")) {
        TestDatabase::Ready(url) => Some(url),
        TestDatabase::Skipped(why) => {
            let _ = writeln!(std::io::stderr(), "{test}: {why}");
            None
        }
    }
}

/// A second instance's data directory holding the first's relay key (every
/// instance of one relay proves the same key).
fn sibling_dir(first: &Path, second: &Path) {
    samverkan_store::keyfile::create_private_dir(second).unwrap();
    std::fs::copy(first.join("relay.key"), second.join("relay.key")).unwrap();
}

async fn start_instance(dir: PathBuf, url: &str) -> RelayHandle {
    let mut config = RelayConfig::new("127.0.0.1:0".parse().unwrap(), dir);
    config.storage = StorageLocation::Postgres(url.to_string());
    config.directory_poll = Duration::from_millis(200);
    server::spawn(config).await.unwrap()
}

fn target(relay: &RelayHandle) -> RelayTarget {
    RelayTarget { addr: relay.local_addr(), relay_key: relay.relay_key() }
}

fn add(node: &mut Node, id: &DocId, what: &str) {
    node.edit(id, "add", |e| {
        e.add_activity(&Activity {
            id: ItemId::random(),
            what: what.into(),
            owners: Vec::new(),
            followup_method: None,
            due: None,
            status: ActivityStatus::Planned,
        })
    })
    .expect("edit saved");
}

fn names(node: &Node, id: &DocId) -> BTreeSet<String> {
    node.document(id).map(|d| d.view().unwrap().activities.into_iter().map(|a| a.what).collect()).unwrap_or_default()
}

fn heads(node: &Node, id: &DocId) -> Vec<automerge::ChangeHash> {
    let mut heads = node.document(id).unwrap().heads();
    heads.sort();
    heads
}

/// Polls `check` until it holds or `limit` passes.
async fn eventually(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    check()
}

fn agreement(nodes: &[&Node]) -> DocumentContent {
    let mut content = DocumentContent::new(DocKind::Agreement, "Samverkan över två reläinstanser");
    content.parties = nodes.iter().map(|n| n.org().clone()).collect();
    content
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_on_postgres_converge_offline_edits_and_forward_changes_promptly() {
    let Some(url) = database("two_instances_on_postgres_converge_offline_edits_and_forward_changes_promptly") else {
        return;
    };
    let root = tempfile::tempdir().unwrap();
    let (dir1, dir2) = (root.path().join("relay1"), root.path().join("relay2"));
    let first = start_instance(dir1.clone(), &url).await;
    sibling_dir(&dir1, &dir2);
    let second = start_instance(dir2, &url).await;
    assert_eq!(first.relay_key(), second.relay_key());

    let mut flen = Node::init(&root.path().join("flen"), "Flen", Some("Flen")).unwrap();
    let mut gnesta = Node::init(&root.path().join("gnesta"), "Gnesta", Some("Gnesta")).unwrap();
    // Both enrolled on the first instance; the second takes them from the database.
    first.enroll_node(flen.node_id(), flen.org().clone(), "Flen").unwrap();
    first.enroll_node(gnesta.node_id(), gnesta.org().clone(), "Gnesta").unwrap();
    let id = flen.create(agreement(&[&flen, &gnesta])).unwrap();
    sync::sync_once(&mut flen, &target(&first), LIMIT).await.unwrap();
    sync::sync_once(&mut gnesta, &target(&second), LIMIT).await.unwrap();
    assert!(gnesta.document(&id).is_ok(), "the document reached Gnesta through the other instance");

    // Offline edits on both, each synced through its own instance.
    add(&mut flen, &id, "Flens trygghetsvandring");
    add(&mut gnesta, &id, "Gnestas medborgardialog");
    sync::sync_once(&mut flen, &target(&first), LIMIT).await.unwrap();
    sync::sync_once(&mut gnesta, &target(&second), LIMIT).await.unwrap();
    sync::sync_once(&mut flen, &target(&first), LIMIT).await.unwrap();
    let both: BTreeSet<String> = ["Flens trygghetsvandring", "Gnestas medborgardialog"].map(String::from).into();
    assert_eq!(names(&flen, &id), both);
    assert_eq!(names(&gnesta, &id), both);
    assert_eq!(heads(&flen, &id), heads(&gnesta, &id), "converged");

    // Gnesta stays connected to the second instance; Flen's change through the first reaches it promptly.
    let gnesta_dir = root.path().join("gnesta");
    drop(gnesta);
    let (received_tx, mut received) = tokio::sync::mpsc::unbounded_channel();
    let (stop_tx, daemon) = start_daemon(gnesta_dir, &second, received_tx);
    let gnesta_key = root.path().join("gnesta");
    let gnesta_id = Node::open(&gnesta_key).unwrap().node_id().to_string();
    assert!(eventually(LIMIT, || second.connected().contains(&gnesta_id)).await);
    add(&mut flen, &id, "Flens nya aktivitet");
    let sent = Instant::now();
    sync::sync_once(&mut flen, &target(&first), LIMIT).await.unwrap();
    let got = tokio::time::timeout(LIMIT, received.recv()).await.expect("forwarded across instances");
    assert_eq!(got, Some(id.clone()));
    let latency = sent.elapsed();
    assert!(names(&Node::open(&gnesta_key).unwrap(), &id).contains("Flens nya aktivitet"));
    let _ = writeln!(std::io::stderr(), "change through instance 1 reached a node on instance 2 after {latency:?}");
    let _ = stop_tx.send(());
    daemon.await.unwrap().unwrap();
    first.shutdown().await;
    second.shutdown().await;
}

/// A node's daemon on `relay`, telling `received` of each document it received; stopped by the sender returned.
fn start_daemon(
    dir: PathBuf,
    relay: &RelayHandle,
    received: tokio::sync::mpsc::UnboundedSender<DocId>,
) -> (tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<Result<(), sync::SyncFailure>>) {
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let relay = target(relay);
    let daemon = tokio::spawn(async move {
        let mut node = Node::open(&dir).unwrap();
        let options = DaemonOptions { received: Some(received), ..DaemonOptions::default() };
        sync::daemon(&mut node, &relay, &options, async {
            let _ = stop_rx.await;
        })
        .await
    });
    (stop_tx, daemon)
}

/// The next document a daemon received (bounded wait).
async fn wait_received(received: &mut tokio::sync::mpsc::UnboundedReceiver<DocId>) -> DocId {
    let next = tokio::time::timeout(LIMIT, received.recv()).await;
    next.expect("the change arrived").expect("the daemon runs")
}

/// Changes made through one instance reach the nodes connected to both, one
/// after another, and each node's acknowledgement of a change is taken from
/// memory on the async runtime's thread (the loaded copy, index entry and
/// receipts current as the listener keeps them), not on a storage thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_reach_nodes_on_both_instances_and_their_acknowledgements_are_taken_from_memory() {
    const EDITS: usize = 5;
    let test = "changes_reach_nodes_on_both_instances_and_their_acknowledgements_are_taken_from_memory";
    let Some(url) = database(test) else { return };
    let root = tempfile::tempdir().unwrap();
    let (dir1, dir2) = (root.path().join("relay1"), root.path().join("relay2"));
    let first = start_instance(dir1.clone(), &url).await;
    sibling_dir(&dir1, &dir2);
    let second = start_instance(dir2, &url).await;
    let mut flen = Node::init(&root.path().join("flen"), "Flen", Some("Flen")).unwrap();
    let (gnesta_dir, trosa_dir) = (root.path().join("gnesta"), root.path().join("trosa"));
    let gnesta = Node::init(&gnesta_dir, "Gnesta", Some("Gnesta")).unwrap();
    let trosa = Node::init(&trosa_dir, "Trosa", Some("Trosa")).unwrap();
    for node in [&flen, &gnesta, &trosa] {
        first.enroll_node(node.node_id(), node.org().clone(), node.org().as_str()).unwrap();
    }
    let id = flen.create(agreement(&[&flen, &gnesta, &trosa])).unwrap();
    sync::sync_once(&mut flen, &target(&first), LIMIT).await.unwrap();
    let (gnesta_key, trosa_key) = (gnesta.node_id().to_string(), trosa.node_id().to_string());
    drop((gnesta, trosa));
    // Trosa on the instance the edits go through, Gnesta on the other.
    let (trosa_tx, mut trosa_received) = tokio::sync::mpsc::unbounded_channel();
    let (gnesta_tx, mut gnesta_received) = tokio::sync::mpsc::unbounded_channel();
    let trosa_daemon = start_daemon(trosa_dir.clone(), &first, trosa_tx);
    let gnesta_daemon = start_daemon(gnesta_dir.clone(), &second, gnesta_tx);
    assert!(eventually(LIMIT, || first.connected().contains(&trosa_key)).await);
    assert!(eventually(LIMIT, || second.connected().contains(&gnesta_key)).await);
    assert_eq!(wait_received(&mut trosa_received).await, id);
    assert_eq!(wait_received(&mut gnesta_received).await, id);
    let from_memory = |relay: &RelayHandle| relay.metrics().steps_from_memory.get();
    for i in 0..EDITS {
        let before = (from_memory(&first), from_memory(&second));
        add(&mut flen, &id, &format!("Flens aktivitet {i}"));
        sync::sync_once(&mut flen, &target(&first), LIMIT).await.unwrap();
        assert_eq!(wait_received(&mut trosa_received).await, id);
        assert_eq!(wait_received(&mut gnesta_received).await, id);
        // Each node acknowledges what it received; both instances take that from memory.
        assert!(
            eventually(LIMIT, || from_memory(&first) > before.0).await,
            "instance 1 took an acknowledgement from memory"
        );
        assert!(
            eventually(LIMIT, || from_memory(&second) > before.1).await,
            "instance 2 took an acknowledgement from memory"
        );
    }
    for (stop, daemon) in [trosa_daemon, gnesta_daemon] {
        let _ = stop.send(());
        daemon.await.unwrap().unwrap();
    }
    let every: BTreeSet<String> = (0..EDITS).map(|i| format!("Flens aktivitet {i}")).collect();
    for dir in [&trosa_dir, &gnesta_dir] {
        let node = Node::open(dir).unwrap();
        assert_eq!(names(&node, &id), every, "every change arrived");
        assert_eq!(heads(&node, &id), heads(&flen, &id));
    }
    let _ = writeln!(
        std::io::stderr(),
        "steps from memory / on storage threads: instance 1 {} / {}, instance 2 {} / {}",
        from_memory(&first),
        first.metrics().steps_on_storage_threads.get(),
        from_memory(&second),
        second.metrics().steps_on_storage_threads.get()
    );
    first.shutdown().await;
    second.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoke_on_one_instance_cuts_the_node_off_on_the_other() {
    let Some(url) = database("a_revoke_on_one_instance_cuts_the_node_off_on_the_other") else { return };
    let root = tempfile::tempdir().unwrap();
    let (dir1, dir2) = (root.path().join("relay1"), root.path().join("relay2"));
    let first = start_instance(dir1.clone(), &url).await;
    sibling_dir(&dir1, &dir2);
    let second = start_instance(dir2, &url).await;
    let flen_dir = root.path().join("flen");
    let flen = Node::init(&flen_dir, "Flen", Some("Flen")).unwrap();
    let key = flen.node_id();
    second.enroll_node(key, flen.org().clone(), "Flen").unwrap();
    drop(flen);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let second_target = target(&second);
    let daemon_dir = flen_dir.clone();
    let daemon = tokio::spawn(async move {
        let mut flen = Node::open(&daemon_dir).unwrap();
        let options = DaemonOptions { backoff_base: Duration::from_millis(50), ..DaemonOptions::default() };
        sync::daemon(&mut flen, &second_target, &options, async {
            let _ = stop_rx.await;
        })
        .await
    });
    assert!(eventually(LIMIT, || second.connected().contains(&key.to_string())).await);
    // Revoked through the other instance.
    first.revoke(&key).unwrap();
    assert!(
        eventually(Duration::from_secs(5), || !second.connected().contains(&key.to_string())).await,
        "the second instance cut the revoked node off"
    );
    let _ = stop_tx.send(());
    daemon.await.unwrap().unwrap();
    let mut flen = Node::open(&flen_dir).unwrap();
    let refused = sync::sync_once(&mut flen, &target(&second), LIMIT).await.unwrap_err();
    assert!(refused.to_string().contains("revoked"), "{refused}");
    first.shutdown().await;
    second.shutdown().await;
}

fn relay_cli(dir: &Path, url: &str, args: &[&str]) -> String {
    let out = Command::new(BIN)
        .args(args)
        .arg("--data-dir")
        .arg(dir)
        .args(["--storage", url])
        .output()
        .expect("run samverkan-relay");
    assert!(out.status.success(), "samverkan-relay {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// Starts `samverkan-relay serve --storage <url>` on a free port.
fn start_process(dir: &Path, url: &str) -> (Child, SocketAddr) {
    let mut child = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--no-admin", "--storage", url, "--data-dir"])
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start samverkan-relay");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().expect("relay prints its address").unwrap();
    let addr = first.rsplit(' ').next().unwrap().parse().expect("address");
    std::thread::spawn(move || for _ in lines {});
    (child, addr)
}

/// Kills the relay processes still running when the test ends, however it ends.
struct Processes(Vec<Child>);

impl Drop for Processes {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_sigkilled_during_syncs_loses_no_acknowledged_change_and_its_nodes_fail_over() {
    let Some(url) = database("an_instance_sigkilled_during_syncs_loses_no_acknowledged_change_and_its_nodes_fail_over")
    else {
        return;
    };
    let root = tempfile::tempdir().unwrap();
    let (dir1, dir2) = (root.path().join("relay1"), root.path().join("relay2"));
    std::fs::create_dir_all(&dir1).unwrap();
    let key = Command::new(BIN).args(["key", "--data-dir"]).arg(&dir1).output().expect("samverkan-relay key");
    let relay_key = String::from_utf8(key.stdout).unwrap().trim().parse().expect("relay key");
    sibling_dir(&dir1, &dir2);
    let mut writer = Node::init(&root.path().join("flen"), "Flen", Some("Flen")).unwrap();
    let reader_dir = root.path().join("polisen");
    let reader = Node::init(&reader_dir, "Polisen", Some("Polisen")).unwrap();
    for (node, org) in [(&writer, "Flen"), (&reader, "Polisen")] {
        relay_cli(&dir1, &url, &["enroll", "--org", org, "--name", org, "--key", &node.node_id().to_string()]);
    }
    let id = writer.create(agreement(&[&writer, &reader])).unwrap();
    let (one, addr1) = start_process(&dir1, &url);
    let (two, addr2) = start_process(&dir2, &url);
    let mut processes = Processes(vec![one, two]);

    // The reader stays connected to the first instance, with the second as its
    // fallback, with the daemon's default limits: a vanished instance is noticed
    // after `DAEMON_IDLE_TIMEOUT` (10 s), well before the relay's 30 s.
    drop(reader);
    let limits = DaemonOptions::default().limits;
    assert_eq!(limits.idle_timeout, sync::DAEMON_IDLE_TIMEOUT);
    let reader_targets = RelayTargets { addrs: vec![addr1, addr2], relay_key };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let daemon_dir = reader_dir.clone();
    let daemon_limits = limits.clone();
    let daemon = tokio::spawn(async move {
        let mut reader = Node::open(&daemon_dir).unwrap();
        let options = DaemonOptions {
            poll_interval: Duration::from_millis(50),
            backoff_base: Duration::from_millis(50),
            backoff_max: Duration::from_millis(500),
            limits: daemon_limits,
            ..DaemonOptions::default()
        };
        sync::daemon_with_failover(&mut reader, &reader_targets, &options, async {
            let _ = stop_rx.await;
        })
        .await
    });

    // The writer edits and syncs (first instance first); the first instance is
    // SIGKILLed while a sync is in flight. A sync that returned success was acknowledged.
    let mut writer_targets = RelayTargets { addrs: vec![addr1, addr2], relay_key };
    let mut acked = BTreeSet::new();
    let mut killed = false;
    for round in 0..16 {
        let mut made = Vec::new();
        for i in 0..3 {
            let what = format!("åtgärd {round}.{i}");
            add(&mut writer, &id, &what);
            made.push(what);
        }
        if round == 6 {
            // Killed a moment into this round's sync.
            let mut first = processes.0.remove(0);
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(5));
                let _ = first.kill();
                let _ = first.wait();
            });
            killed = true;
        }
        let outcome = sync::sync_once_with_failover(&mut writer, &writer_targets, LIMIT, &mut |_| {}).await;
        if let Ok((_, used)) = outcome {
            acked.extend(made);
            // Stay with the instance that answered, as the daemon does.
            if used.addr != writer_targets.addrs[0] {
                writer_targets.addrs.rotate_left(1);
            }
        }
    }
    assert!(killed);
    assert_eq!(writer_targets.addrs[0], addr2, "the writer failed over to the second instance");
    assert!(acked.len() >= 30, "most syncs were acknowledged: {}", acked.len());

    // The reader failed over too, and holds every acknowledged change: within
    // twice the daemon's idle timeout of the last sync (a bound, not a measure;
    // with the relay's 30 s idle timeout it would not have noticed yet).
    let reader_has_all = eventually(2 * sync::DAEMON_IDLE_TIMEOUT, || {
        Node::open(&reader_dir).map(|r| acked.is_subset(&names(&r, &id))).unwrap_or(false)
    })
    .await;
    let missing: Vec<_> = acked.difference(&names(&Node::open(&reader_dir).unwrap(), &id)).cloned().collect();
    assert!(reader_has_all, "acknowledged changes missing at the reader: {missing:?}");
    let _ = stop_tx.send(());
    daemon.await.unwrap().unwrap();

    // And the database holds them: a fresh instance serves them to a fresh sync.
    let (three, addr3) = start_process(&dir1, &url);
    processes.0.push(three);
    let mut fresh = Node::init(&root.path().join("polisen2"), "Polisen", Some("Polisen 2")).unwrap();
    relay_cli(
        &dir1,
        &url,
        &["enroll", "--org", "Polisen", "--name", "Polisen 2", "--key", &fresh.node_id().to_string()],
    );
    sync::sync_once(&mut fresh, &RelayTarget { addr: addr3, relay_key }, LIMIT).await.unwrap();
    assert!(acked.is_subset(&names(&fresh, &id)), "every acknowledged change is in the database");
}
