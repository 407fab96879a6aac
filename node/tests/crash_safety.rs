//! Crash safety of the real `samverkan-node` binary, in the style of SQLite's
//! crash tests: CLI processes make edits (and sometimes sync) and are killed with
//! SIGKILL at random moments. After every kill the data directory must pass
//! `samverkan-node check` (SQLite `integrity_check` plus every blob's SHA-256),
//! hold every edit a CLI process had reported as saved, and — every so often and
//! at the end — sync normally through an in-process relay to a second node.
//!
//! Quick mode (the default, part of `cargo test --workspace`): 200 kills.
//! Long mode: `SAMVERKAN_LONG=1 cargo test -p samverkan-node --test crash_safety -- --nocapture`
//! (1,000 kills). Replay a run with `SAMVERKAN_SEED=<seed>` (the seed is printed).
//!
//! The binary is the one cargo builds for this package's tests
//! (`CARGO_BIN_EXE_samverkan-node`), so it is always current.

use std::collections::BTreeSet;
use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use samverkan_node::node::Node;
use samverkan_node::sync::{self, RelayTarget};
use samverkan_relay::server::{self, RelayConfig, RelayHandle};
use samverkan_shared::ids::DocId;
use samverkan_shared::model::{DocKind, DocumentContent};

const BIN: &str = env!("CARGO_BIN_EXE_samverkan-node");
const LIMIT: Duration = Duration::from_secs(60);

fn seed() -> u64 {
    match std::env::var("SAMVERKAN_SEED") {
        Ok(s) => s.parse().expect("SAMVERKAN_SEED must be a number"),
        Err(_) => rand::random(),
    }
}

fn long_mode() -> bool {
    std::env::var("SAMVERKAN_LONG").is_ok_and(|v| v != "0" && !v.is_empty())
}

/// Fails the test with the seed, so the run can be replayed.
fn fail(seed: u64, what: String) -> ! {
    panic!("{what}\nreplay with SAMVERKAN_SEED={seed}");
}

/// What one CLI process was asked to do.
enum Job {
    /// `activity add <doc> <what>`: acknowledged when the JSON with the change is printed.
    Edit(String),
    /// `sync`: only its survival matters.
    Sync,
}

fn spawn_cli(dir: &Path, args: &[&str]) -> Child {
    Command::new(BIN)
        .arg("--data-dir")
        .arg(dir)
        .arg("--json")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start samverkan-node")
}

/// Waits for a (possibly killed) child and returns (exited normally with success, stdout).
fn reap(mut child: Child) -> (bool, String, String) {
    let status = child.wait().expect("wait for child");
    let mut out = String::new();
    let mut err = String::new();
    if let Some(mut s) = child.stdout.take() {
        let _ = s.read_to_string(&mut out);
    }
    if let Some(mut s) = child.stderr.take() {
        let _ = s.read_to_string(&mut err);
    }
    (status.success(), out, err)
}

/// The activity names present in the document, read through the library.
fn present(dir: &Path, id: &DocId) -> Result<BTreeSet<String>, String> {
    let node = Node::open(dir).map_err(|e| format!("open after kill: {e}"))?;
    let problems = node.check().map_err(|e| format!("check after kill: {e}"))?;
    if !problems.is_empty() {
        return Err(format!("check after kill found problems: {problems:?}"));
    }
    let doc = node.document(id).map_err(|e| format!("load after kill: {e}"))?;
    let view = doc.view().map_err(|e| format!("view after kill: {e}"))?;
    Ok(view.activities.into_iter().map(|a| a.what).collect())
}

/// The edits the CLI acknowledged must all be on the writer, and after a sync on the reader.
fn sync_and_compare(
    rt: &tokio::runtime::Runtime,
    relay: &RelayHandle,
    writer_dir: &Path,
    reader_dir: &Path,
    id: &DocId,
    acked: &BTreeSet<String>,
) -> Result<(), String> {
    let target = RelayTarget { addr: relay.local_addr(), relay_key: relay.relay_key() };
    let mut writer = Node::open(writer_dir).map_err(|e| e.to_string())?;
    rt.block_on(sync::sync_once(&mut writer, &target, LIMIT)).map_err(|e| format!("writer sync: {e}"))?;
    let mut reader = Node::open(reader_dir).map_err(|e| e.to_string())?;
    rt.block_on(sync::sync_once(&mut reader, &target, LIMIT)).map_err(|e| format!("reader sync: {e}"))?;
    let on_reader: BTreeSet<String> = reader
        .document(id)
        .map_err(|e| e.to_string())?
        .view()
        .map_err(|e| e.to_string())?
        .activities
        .into_iter()
        .map(|a| a.what)
        .collect();
    let missing: Vec<_> = acked.difference(&on_reader).collect();
    if !missing.is_empty() {
        return Err(format!("{} acknowledged edits missing on the reader after sync: {missing:?}", missing.len()));
    }
    let writer_heads = writer.document(id).map_err(|e| e.to_string())?.heads();
    let reader_heads = reader.document(id).map_err(|e| e.to_string())?.heads();
    if writer_heads != reader_heads {
        return Err(format!("heads differ after sync: writer {writer_heads:?}, reader {reader_heads:?}"));
    }
    Ok(())
}

#[test]
fn sigkilled_cli_never_loses_an_acknowledged_edit() {
    let seed = seed();
    let target_kills = if long_mode() { 1000 } else { 200 };
    println!("crash safety: seed {seed}, {target_kills} kills (replay with SAMVERKAN_SEED={seed})");
    let mut rng = StdRng::seed_from_u64(seed);

    let root = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let relay = rt
        .block_on(server::spawn(RelayConfig::new("127.0.0.1:0".parse().unwrap(), root.path().join("relay"))))
        .expect("relay starts");
    let writer_dir = root.path().join("flen");
    let reader_dir = root.path().join("polisen");
    let id = {
        let mut writer = Node::init(&writer_dir, "Flen", Some("flen")).unwrap();
        let reader = Node::init(&reader_dir, "Polisen", Some("polisen")).unwrap();
        relay.enroll_node(writer.node_id(), writer.org().clone(), "flen").unwrap();
        relay.enroll_node(reader.node_id(), reader.org().clone(), "polisen").unwrap();
        let mut content = DocumentContent::new(DocKind::CitizenPromise, "Medborgarlöfte Flen 2026");
        content.parties = vec![writer.org().clone(), reader.org().clone()];
        writer.create(content).unwrap()
    };
    let relay_arg = relay.local_addr().to_string();
    let key_arg = relay.relay_key().to_string();
    let id_arg = id.to_string();

    // How long an unkilled edit takes: kills are spread over 0..1.3× that.
    let started = Instant::now();
    let (ok, out, err) = reap(spawn_cli(&writer_dir, &["activity", "add", &id_arg, "calibration"]));
    assert!(ok, "calibration edit failed: {out} {err}");
    let edit_time = started.elapsed().max(Duration::from_millis(5));
    let mut acked: BTreeSet<String> = BTreeSet::from(["calibration".to_string()]);
    println!("an edit takes {edit_time:?}");

    let (mut kills, mut completed, mut syncs_killed, mut cycles, mut sync_checks) = (0u32, 0u32, 0u32, 0u32, 0u32);
    let deadline = Instant::now() + Duration::from_secs(if long_mode() { 3600 } else { 240 });
    let mut next_sync_check = 50;
    while kills < target_kills {
        if Instant::now() > deadline {
            fail(seed, format!("only {kills} kills before the time limit"));
        }
        cycles += 1;
        // One to three concurrent CLI processes on the same data directory.
        let mut children = Vec::new();
        for _ in 0..rng.gen_range(1..=3) {
            if rng.gen_bool(0.15) {
                let child = spawn_cli(&writer_dir, &["sync", "--relay", &relay_arg, "--relay-key", &key_arg]);
                children.push((Job::Sync, child));
            } else {
                let what = format!("edit {cycles}-{}", children.len());
                let child = spawn_cli(&writer_dir, &["activity", "add", &id_arg, &what]);
                children.push((Job::Edit(what), child));
            }
        }
        let delay = edit_time.mul_f64(rng.gen_range(0.0..1.3) * children.len() as f64);
        std::thread::sleep(delay);
        for (job, mut child) in children {
            let killed = match child.try_wait().expect("try_wait") {
                Some(_) => false,
                None => {
                    child.kill().expect("SIGKILL");
                    true
                }
            };
            let (ok, out, err) = reap(child);
            if killed {
                kills += 1;
                if matches!(job, Job::Sync) {
                    syncs_killed += 1;
                }
            } else {
                completed += 1;
            }
            if let Job::Edit(what) = job {
                // Acknowledged: the complete JSON with the change hash was printed.
                let value: Option<serde_json::Value> = serde_json::from_str(&out).ok();
                if value.as_ref().is_some_and(|v| v["change"].is_string()) {
                    acked.insert(what);
                } else if !killed && !ok {
                    fail(seed, format!("an edit that was not killed failed: {err}"));
                }
            } else if !killed && !ok {
                fail(seed, format!("a sync that was not killed failed: {err}"));
            }
        }
        let now_present = present(&writer_dir, &id).unwrap_or_else(|e| fail(seed, e));
        let missing: Vec<_> = acked.difference(&now_present).collect();
        if !missing.is_empty() {
            fail(seed, format!("after {kills} kills, acknowledged edits are missing: {missing:?}"));
        }
        if kills >= next_sync_check {
            next_sync_check += 50;
            sync_checks += 1;
            sync_and_compare(&rt, &relay, &writer_dir, &reader_dir, &id, &acked).unwrap_or_else(|e| fail(seed, e));
        }
    }
    sync_and_compare(&rt, &relay, &writer_dir, &reader_dir, &id, &acked).unwrap_or_else(|e| fail(seed, e));
    println!(
        "crash safety: {kills} SIGKILLs ({syncs_killed} during sync), {completed} processes completed, {} edits acknowledged, {sync_checks} sync checks + 1 final; all present, integrity ok",
        acked.len()
    );
    rt.block_on(relay.shutdown());
}
