//! Partitions and restarts, in the style of Jepsen: several nodes run the sync
//! daemon through an in-process UDP proxy (one per node, on 127.0.0.1) that
//! drops, delays, duplicates and reorders datagrams and cuts links for random
//! periods, while every node edits one shared document and the relay is
//! restarted at random. Then the network heals and every node must reach the
//! same heads, holding every edit that was made, within a bounded time.
//!
//! The fault decisions come from a seeded `StdRng` (the seed is printed;
//! `SAMVERKAN_SEED=<seed>` replays the same decisions — thread timing still
//! varies). Quick mode runs in `cargo test`; the long mode is
//! `SAMVERKAN_LONG=1 cargo test --test partitions -- --nocapture`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use samverkan::node::node::Node;
use samverkan::node::sync::{self, DaemonOptions, RelayTarget};
use samverkan::shared::ids::{DocId, ItemId};
use samverkan::shared::model::{Activity, ActivityStatus, DocKind, DocumentContent};
use tokio::net::UdpSocket;

#[path = "support/relay_net.rs"]
mod relay_net;
use relay_net::start_relay;

/// How a run is sized.
struct Plan {
    nodes: usize,
    chaos: Duration,
    relay_restarts: usize,
    converge_within: Duration,
}

fn plan() -> Plan {
    if std::env::var("SAMVERKAN_LONG").is_ok_and(|v| v != "0" && !v.is_empty()) {
        Plan {
            nodes: 5,
            chaos: Duration::from_secs(180),
            relay_restarts: 12,
            converge_within: Duration::from_secs(120),
        }
    } else {
        Plan { nodes: 3, chaos: Duration::from_secs(8), relay_restarts: 2, converge_within: Duration::from_secs(90) }
    }
}

/// Counters of what the proxies did.
#[derive(Default)]
struct Stats {
    forwarded: AtomicU64,
    dropped: AtomicU64,
    duplicated: AtomicU64,
    delayed: AtomicU64,
}

/// One link node ⇄ relay, under the test's control.
struct Link {
    /// The relay's current address (it changes when the relay restarts).
    relay: Mutex<SocketAddr>,
    /// The node's address, learned from its datagrams.
    node: Mutex<Option<SocketAddr>>,
    /// Everything is dropped while cut.
    cut: AtomicBool,
    /// No faults at all once healed.
    healed: AtomicBool,
    stats: Arc<Stats>,
}

const DROP: f64 = 0.05;
const DUPLICATE: f64 = 0.03;
const DELAY: f64 = 0.10;
const DELAY_MAX_MS: u64 = 150;

/// Starts a proxy; nodes send to the returned address.
async fn spawn_proxy(relay: SocketAddr, seed: u64, stats: Arc<Stats>) -> (SocketAddr, Arc<Link>) {
    let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let back = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let addr = front.local_addr().unwrap();
    let link = Arc::new(Link {
        relay: Mutex::new(relay),
        node: Mutex::new(None),
        cut: AtomicBool::new(false),
        healed: AtomicBool::new(false),
        stats,
    });
    for upstream in [true, false] {
        let (from, to) = if upstream { (front.clone(), back.clone()) } else { (back.clone(), front.clone()) };
        let link = link.clone();
        let mut rng = StdRng::seed_from_u64(seed.wrapping_add(upstream as u64));
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65_536];
            loop {
                let Ok((n, src)) = from.recv_from(&mut buf).await else { return };
                let dest = if upstream {
                    *link.node.lock().unwrap() = Some(src);
                    *link.relay.lock().unwrap()
                } else {
                    match *link.node.lock().unwrap() {
                        Some(node) => node,
                        None => continue,
                    }
                };
                let healed = link.healed.load(Ordering::Relaxed);
                // Draw every decision even when healed, so the sequence stays seeded.
                let (drop, dup, delay) = (rng.gen_bool(DROP), rng.gen_bool(DUPLICATE), rng.gen_bool(DELAY));
                let delay_ms = rng.gen_range(1..=DELAY_MAX_MS);
                if !healed && (link.cut.load(Ordering::Relaxed) || drop) {
                    link.stats.dropped.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let copies = if !healed && dup { 2 } else { 1 };
                if copies == 2 {
                    link.stats.duplicated.fetch_add(1, Ordering::Relaxed);
                }
                link.stats.forwarded.fetch_add(1, Ordering::Relaxed);
                for _ in 0..copies {
                    if !healed && delay {
                        // Delayed datagrams overtake later ones: reordering.
                        link.stats.delayed.fetch_add(1, Ordering::Relaxed);
                        let to = to.clone();
                        let data = buf[..n].to_vec();
                        tokio::spawn(async move {
                            tokio::time::sleep(Duration::from_millis(delay_ms)).await;
                            let _ = to.send_to(&data, dest).await;
                        });
                    } else {
                        let _ = to.send_to(&buf[..n], dest).await;
                    }
                }
            }
        });
    }
    (addr, link)
}

/// Activity names and heads of the document on one node.
fn state(dir: &Path, id: &DocId) -> Option<(Vec<String>, Vec<String>)> {
    let node = Node::open(dir).ok()?;
    let mut doc = node.document(id).ok()?;
    let heads = doc.heads().iter().map(ToString::to_string).collect();
    let mut names: Vec<String> = doc.view().ok()?.activities.into_iter().map(|a| a.what).collect();
    names.sort();
    Some((names, heads))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_converge_with_every_edit_after_partitions_and_relay_restarts() {
    let seed: u64 = std::env::var("SAMVERKAN_SEED")
        .map(|s| s.parse().expect("numeric SAMVERKAN_SEED"))
        .unwrap_or_else(|_| rand::random());
    let plan = plan();
    println!(
        "partitions: seed {seed}, {} nodes, {:?} of chaos, {} relay restarts (replay with SAMVERKAN_SEED={seed})",
        plan.nodes, plan.chaos, plan.relay_restarts
    );
    let mut rng = StdRng::seed_from_u64(seed);
    let root = tempfile::tempdir().unwrap();
    let relay_dir = root.path().join("relay");
    let mut relay = start_relay(&relay_dir).await;
    let relay_key = relay.relay_key();

    let orgs = ["Flen", "Katrineholm", "Polisen", "Nyköping", "Trosa"];
    let mut dirs: Vec<PathBuf> = Vec::new();
    let mut nodes = Vec::new();
    for (i, org) in orgs.iter().take(plan.nodes).enumerate() {
        let dir = root.path().join(format!("node{i}"));
        let node = Node::init(&dir, org, Some(&format!("node{i}"))).unwrap();
        relay.enroll_node(node.node_id(), node.org().clone(), &format!("node{i}")).unwrap();
        dirs.push(dir);
        nodes.push(node);
    }
    let mut content = DocumentContent::new(DocKind::OperationsPlan, "Åtgärdsplan under nätverksfel");
    content.parties = nodes.iter().map(|n| n.org().clone()).collect();
    let id = nodes[0].create(content).unwrap();
    let direct = RelayTarget { addr: relay.local_addr(), relay_key };
    for node in nodes.iter_mut() {
        sync::sync_once(node, &direct, Duration::from_secs(30)).await.expect("initial sync");
    }

    // Proxies and daemons.
    let stats = Arc::new(Stats::default());
    let mut links = Vec::new();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let options = DaemonOptions {
        poll_interval: Duration::from_millis(50),
        backoff_base: Duration::from_millis(100),
        backoff_max: Duration::from_secs(1),
        ..DaemonOptions::default()
    };
    let mut daemons = Vec::new();
    for (i, mut node) in nodes.into_iter().enumerate() {
        let (proxy, link) =
            spawn_proxy(relay.local_addr(), seed.wrapping_mul(31).wrapping_add(2 * i as u64), stats.clone()).await;
        links.push(link);
        let target = RelayTarget { addr: proxy, relay_key };
        let options = options.clone();
        let mut stop = stop_rx.clone();
        daemons.push(tokio::spawn(async move {
            sync::daemon(&mut node, &target, &options, async move {
                let _ = stop.changed().await;
            })
            .await
        }));
    }

    // Editors: other processes' edits on each data directory (like CLI calls).
    let made: Arc<Mutex<Vec<String>>> = Arc::default();
    let editing = Arc::new(AtomicBool::new(true));
    let mut editors = Vec::new();
    for (i, dir) in dirs.iter().enumerate() {
        let (dir, id, made, editing) = (dir.clone(), id.clone(), made.clone(), editing.clone());
        let mut rng = StdRng::seed_from_u64(seed.wrapping_add(1000 + i as u64));
        editors.push(tokio::task::spawn_blocking(move || {
            let mut node = Node::open(&dir).unwrap();
            let mut k = 0;
            while editing.load(Ordering::Relaxed) {
                let what = format!("node{i} edit {k}");
                k += 1;
                node.edit(&id, "add", |e| {
                    e.add_activity(&Activity {
                        id: ItemId::random(),
                        what: what.clone(),
                        owners: Vec::new(),
                        followup_method: None,
                        due: None,
                        status: ActivityStatus::Planned,
                    })
                })
                .expect("edit saved");
                made.lock().unwrap().push(what);
                std::thread::sleep(Duration::from_millis(rng.gen_range(20..200)));
            }
        }));
    }

    // Chaos: cut links for random periods, restart the relay at random.
    let started = Instant::now();
    let mut cuts = 0;
    let mut restarts = 0;
    let restart_every = plan.chaos / (plan.relay_restarts as u32 + 1);
    let mut next_restart = restart_every.mul_f64(1.0 + rng.gen_range(-0.3..0.3));
    while started.elapsed() < plan.chaos {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(50..400))).await;
        if restarts < plan.relay_restarts && started.elapsed() >= next_restart {
            let t = Instant::now();
            relay.shutdown().await;
            println!("relay restart {}: shutdown took {:?}", restarts + 1, t.elapsed());
            tokio::time::sleep(Duration::from_millis(rng.gen_range(0..500))).await;
            relay = start_relay(&relay_dir).await;
            assert_eq!(relay.relay_key(), relay_key, "the relay keeps its key across restarts");
            for link in &links {
                *link.relay.lock().unwrap() = relay.local_addr();
            }
            restarts += 1;
            next_restart = restart_every.mul_f64(restarts as f64 + 1.0 + rng.gen_range(-0.3..0.3));
            continue;
        }
        let link = links[rng.gen_range(0..links.len())].clone();
        if !link.cut.swap(true, Ordering::Relaxed) {
            cuts += 1;
            let period = Duration::from_millis(rng.gen_range(100..2500));
            tokio::spawn(async move {
                tokio::time::sleep(period).await;
                link.cut.store(false, Ordering::Relaxed);
            });
        }
    }
    editing.store(false, Ordering::Relaxed);
    for e in editors {
        e.await.unwrap();
    }
    // Heal.
    for link in &links {
        link.healed.store(true, Ordering::Relaxed);
        link.cut.store(false, Ordering::Relaxed);
    }
    let healed_at = Instant::now();
    let mut expected = made.lock().unwrap().clone();
    expected.sort();
    loop {
        let states: Vec<_> = dirs.iter().map(|d| state(d, &id)).collect();
        let converged = states.iter().all(|s| {
            s.as_ref()
                .is_some_and(|(names, heads)| names == &expected && Some(heads) == states[0].as_ref().map(|(_, h)| h))
        });
        if converged {
            break;
        }
        if healed_at.elapsed() > plan.converge_within {
            let summary: Vec<String> = states
                .iter()
                .enumerate()
                .map(|(i, s)| match s {
                    Some((names, heads)) => format!(
                        "node{i}: {} of {} edits, heads {:?}",
                        expected.iter().filter(|e| names.contains(e)).count(),
                        expected.len(),
                        heads
                    ),
                    None => format!("node{i}: unreadable"),
                })
                .collect();
            panic!(
                "no convergence within {:?} after healing:\n{}\nreplay with SAMVERKAN_SEED={seed}",
                plan.converge_within,
                summary.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let converged_in = healed_at.elapsed();
    let t = Instant::now();
    stop_tx.send(true).unwrap();
    for d in daemons {
        tokio::time::timeout(Duration::from_secs(30), d)
            .await
            .expect("daemon stops")
            .unwrap()
            .expect("daemon ends cleanly");
    }
    println!("daemons stopped in {:?}", t.elapsed());
    let t = Instant::now();
    relay.shutdown().await;
    println!("relay shut down in {:?}", t.elapsed());
    println!(
        "partitions: {} edits on {} nodes, {cuts} link cuts, {restarts} relay restarts; datagrams forwarded {}, dropped {}, duplicated {}, delayed/reordered {}; converged {converged_in:?} after healing",
        expected.len(),
        dirs.len(),
        stats.forwarded.load(Ordering::Relaxed),
        stats.dropped.load(Ordering::Relaxed),
        stats.duplicated.load(Ordering::Relaxed),
        stats.delayed.load(Ordering::Relaxed),
    );
}
