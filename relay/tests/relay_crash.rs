//! Crash safety of the real `samverkan-relay` binary: writer nodes push edits
//! (`sync_once`, in-process) while the relay process is killed with SIGKILL at
//! random moments. A sync that returned success means the relay acknowledged
//! every change the node had; after each restart a reader node — which never
//! talks to the writers — syncs first and must receive every acknowledged
//! change, and the relay's database must pass `check` (SQLite
//! `integrity_check` plus every blob's SHA-256).
//!
//! Quick mode: 40 kills. Long mode: `SAMVERKAN_LONG=1 cargo test -p samverkan-relay --test relay_crash -- --nocapture`
//! (300 kills). `SAMVERKAN_SEED=<seed>` replays the kill schedule.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use samverkan_node::node::Node;
use samverkan_node::sync::{self, RelayTarget};
use samverkan_shared::identity::NodeId;
use samverkan_shared::ids::{DocId, ItemId};
use samverkan_shared::model::{Activity, ActivityStatus, DocKind, DocumentContent};

const BIN: &str = env!("CARGO_BIN_EXE_samverkan-relay");
const LIMIT: Duration = Duration::from_secs(20);

fn relay_cli(dir: &Path, args: &[&str]) -> String {
    let out = Command::new(BIN).args(args).arg("--data-dir").arg(dir).output().expect("run samverkan-relay");
    assert!(out.status.success(), "samverkan-relay {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// Starts `samverkan-relay serve` on a free port; returns the process and its address.
fn start_relay(dir: &Path) -> (Child, SocketAddr) {
    let mut child = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--no-admin", "--data-dir"])
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start samverkan-relay");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().expect("relay prints its address").unwrap();
    let addr = first.rsplit(' ').next().unwrap().parse().expect("address");
    // Keep reading so the relay never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    (child, addr)
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

#[test]
fn sigkilled_relay_never_loses_an_acknowledged_change() {
    let seed: u64 = std::env::var("SAMVERKAN_SEED")
        .map(|s| s.parse().expect("numeric SAMVERKAN_SEED"))
        .unwrap_or_else(|_| rand::random());
    let long = std::env::var("SAMVERKAN_LONG").is_ok_and(|v| v != "0" && !v.is_empty());
    let target_kills = if long { 300 } else { 40 };
    println!("relay crash: seed {seed}, {target_kills} kills (replay with SAMVERKAN_SEED={seed})");
    let mut rng = StdRng::seed_from_u64(seed);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();

    let root = tempfile::tempdir().unwrap();
    let relay_dir = root.path().join("relay");
    std::fs::create_dir_all(&relay_dir).unwrap();
    let relay_key: NodeId = relay_cli(&relay_dir, &["key"]).trim().parse().expect("relay key");
    let mut writers = Vec::new();
    for (i, org) in ["Flen", "Katrineholm"].iter().enumerate() {
        let node = Node::init(&root.path().join(format!("writer{i}")), org, Some(&format!("writer{i}"))).unwrap();
        relay_cli(
            &relay_dir,
            &["enroll", "--org", org, "--name", &format!("writer{i}"), "--key", &node.node_id().to_string()],
        );
        writers.push(node);
    }
    let mut reader = Node::init(&root.path().join("reader"), "Polisen", Some("reader")).unwrap();
    relay_cli(&relay_dir, &["enroll", "--org", "Polisen", "--name", "reader", "--key", &reader.node_id().to_string()]);
    let mut content = DocumentContent::new(DocKind::OperationsPlan, "Åtgärdsplan under relä-krascher");
    content.parties = writers.iter().map(|n| n.org().clone()).chain([reader.org().clone()]).collect();
    let id = writers[0].create(content).unwrap();

    let (mut relay, mut addr) = start_relay(&relay_dir);
    let first = RelayTarget { addr, relay_key };
    for w in writers.iter_mut() {
        rt.block_on(sync::sync_once(w, &first, LIMIT)).expect("initial sync");
    }

    let mut acked: BTreeSet<String> = BTreeSet::new();
    let (mut kills, mut acked_syncs, mut broken_syncs) = (0u32, 0u32, 0u32);
    let mut counter = 0u32;
    let deadline = Instant::now() + Duration::from_secs(if long { 3600 } else { 240 });
    while kills < target_kills {
        assert!(Instant::now() < deadline, "time limit; replay with SAMVERKAN_SEED={seed}");
        let target = RelayTarget { addr, relay_key };
        // The reader, who never meets the writers, must hold every acknowledged change.
        rt.block_on(sync::sync_once(&mut reader, &target, LIMIT))
            .unwrap_or_else(|e| panic!("reader sync after restart: {e}; replay with SAMVERKAN_SEED={seed}"));
        let missing: Vec<_> = acked.difference(&names(&reader, &id)).cloned().collect();
        assert!(
            missing.is_empty(),
            "after {kills} relay kills, acknowledged changes are lost: {missing:?}; replay with SAMVERKAN_SEED={seed}"
        );

        // Writers edit and sync concurrently; the relay is killed meanwhile.
        let mut made = Vec::new();
        for w in writers.iter_mut() {
            let mut mine = Vec::new();
            for _ in 0..rng.gen_range(1..=4) {
                counter += 1;
                let what = format!("{} edit {counter}", w.name());
                add(w, &id, &what);
                mine.push(what);
            }
            made.push(mine);
        }
        let delay = Duration::from_millis(rng.gen_range(0..400));
        let results = rt.block_on(async {
            let mut tasks = Vec::new();
            for mut w in std::mem::take(&mut writers) {
                let target = target.clone();
                let dir = w.data_dir().to_path_buf();
                tasks.push((dir, tokio::spawn(async move { sync::sync_once(&mut w, &target, LIMIT).await.is_ok() })));
            }
            tokio::time::sleep(delay).await;
            relay.kill().expect("SIGKILL the relay");
            // A sync still running after the kill can only fail (after QUIC's idle
            // timeout): stop it, like a node process that goes away.
            let mut out = Vec::new();
            for (dir, task) in tasks {
                let abort = task.abort_handle();
                let ok = match tokio::time::timeout(Duration::from_millis(300), task).await {
                    Ok(r) => r.unwrap_or(false),
                    Err(_) => {
                        abort.abort();
                        false
                    }
                };
                out.push((dir, ok));
            }
            out
        });
        relay.wait().unwrap();
        kills += 1;
        for ((dir, ok), mine) in results.into_iter().zip(made) {
            let w = Node::open(&dir).expect("writer reopens");
            if ok {
                acked_syncs += 1;
                // Everything this writer ever made is below what the relay acknowledged.
                acked.extend(names(&w, &id).into_iter().filter(|n| n.starts_with(w.name())));
                acked.extend(mine);
            } else {
                broken_syncs += 1;
            }
            writers.push(w);
        }
        let store =
            samverkan_store::Store::open(&relay_dir.join("relay.db")).expect("relay database opens after a kill");
        let problems = store.check().expect("check runs");
        assert!(
            problems.is_empty(),
            "relay database damaged after a kill: {problems:?}; replay with SAMVERKAN_SEED={seed}"
        );
        drop(store);
        (relay, addr) = start_relay(&relay_dir);
    }
    // Last round: the reader gets everything acknowledged; then the writers catch up and all agree.
    let target = RelayTarget { addr, relay_key };
    rt.block_on(sync::sync_once(&mut reader, &target, LIMIT)).expect("final reader sync");
    let missing: Vec<_> = acked.difference(&names(&reader, &id)).cloned().collect();
    assert!(missing.is_empty(), "acknowledged changes lost: {missing:?}; replay with SAMVERKAN_SEED={seed}");
    for w in writers.iter_mut() {
        rt.block_on(sync::sync_once(w, &target, LIMIT)).expect("final writer sync");
    }
    rt.block_on(sync::sync_once(&mut reader, &target, LIMIT)).expect("final reader sync");
    let all: BTreeSet<String> = writers.iter().flat_map(|w| names(w, &id)).collect();
    assert_eq!(names(&reader, &id), all, "everyone converges after the last restart");
    relay.kill().unwrap();
    relay.wait().unwrap();
    println!(
        "relay crash: {kills} SIGKILLs of the relay during syncs; {acked_syncs} syncs acknowledged before the kill, {broken_syncs} cut by it; {} acknowledged changes all survived; database checks ok",
        acked.len()
    );
}
