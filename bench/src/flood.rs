//! Figure 8: honest nodes' edit-to-visible latency through the relay, idle and
//! while an enrolled node floods it, as in issue 13: `DocHeads` frames naming
//! a million unknown documents (a fresh connection for each pair, the second
//! frame being refused), and `Sync` frames for unknown documents (20,000 per
//! connection, then a new connection of the same key). Also the relay's memory
//! and CPU during the flood, and the sync-state rows it kept for the attacker.
//!
//! The relay runs in its own process (as in figure 1); the attacker runs on its
//! own thread and runtime, so that it competes with the honest daemons for the
//! machine's cores, as a local attacker would, but not for their runtime.

use std::cell::Cell;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use samverkan_net::endpoint::{self, Limits};
use samverkan_net::tls::TlsIdentity;
use samverkan_node::sync::RelayTarget;
use samverkan_shared::identity::NodeKey;
use samverkan_shared::ids::DocId;
use samverkan_shared::wire::{Frame, PROTOCOL_VERSION};
use samverkan_store::Store;

use crate::harness;
use crate::latency::EditToVisible;
use crate::report::{ms, percentile, Figure};

/// Counts for figure 8.
pub struct Flood {
    /// Edits timed idle, and again during the flood.
    pub edits: usize,
    /// Unknown documents named by each `DocHeads` frame.
    pub doc_heads_entries: usize,
    /// `Sync` frames for unknown documents per attacker connection.
    pub syncs_per_connection: usize,
}

/// What the attacker managed to send.
#[derive(Debug, Default)]
struct Sent {
    connections: AtomicU64,
    doc_heads: AtomicU64,
    syncs: AtomicU64,
}

/// Runs figure 8.
pub async fn run(size: Flood) -> Result<Vec<Figure>> {
    let root = tempfile::tempdir()?;
    let relay_dir = root.path().join("relay");
    let mut relay = harness::RelayProcess::start(&relay_dir, Vec::new())?;
    let a = relay.new_node(root.path(), "a", "Eskilstuna")?;
    let b = relay.new_node(root.path(), "b", "Polisen")?;
    // Enrolled, so past authentication; only its key is used, by hand.
    let attacker = relay.new_node(root.path(), "attacker", "Flen")?;
    let key = NodeKey::from_file_contents(&attacker.key().to_file_contents()).context("copying the key")?;
    let result = measure(&relay, &relay_dir, (a, b), key, &size).await;
    relay.stop();
    result
}

async fn measure(
    relay: &harness::RelayProcess,
    relay_dir: &Path,
    nodes: (samverkan_node::node::Node, samverkan_node::node::Node),
    key: NodeKey,
    size: &Flood,
) -> Result<Vec<Figure>> {
    let mut daemons = EditToVisible::start(&relay.target, nodes, 100).await?;
    let (cpu_start, idle_started) = (relay.cpu_seconds()?, Instant::now());
    let idle = daemons.measure(size.edits).await?;
    let idle_secs = idle_started.elapsed().as_secs_f64();
    let (rss_idle, cpu_idle_end) = (relay.rss_bytes()?, relay.cpu_seconds()?);

    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(Sent::default());
    let attacker_id = key.node_id();
    let attack = {
        let (target, stop, sent) = (relay.target.clone(), stop.clone(), sent.clone());
        let (entries, syncs) = (size.doc_heads_entries, size.syncs_per_connection);
        std::thread::spawn(move || -> Result<()> {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            runtime.block_on(attack(target, key, entries, syncs, stop, sent))
        })
    };
    // Let the flood start before timing edits against it.
    let started = Instant::now();
    while sent.connections.load(Ordering::Relaxed) == 0 && started.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let peak = Cell::new(rss_idle);
    let (flood_started, cpu_idle) = (Instant::now(), relay.cpu_seconds()?);
    let during = {
        let sampling = async {
            loop {
                peak.set(peak.get().max(relay.rss_bytes().unwrap_or(0)));
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        };
        tokio::select! {
            during = daemons.measure(size.edits) => during,
            () = sampling => unreachable!("sampling never ends"),
        }
    };
    let flood_secs = flood_started.elapsed().as_secs_f64();
    let cpu = relay.cpu_seconds()? - cpu_idle;
    stop.store(true, Ordering::Relaxed);
    let attacked = attack.join().map_err(|_| anyhow::anyhow!("the attacker's thread panicked"))?;
    let during = during?;
    daemons.stop().await?;
    attacked?;
    // The attacker's last connection ends with the flood; its sync states are saved then.
    let rows = {
        let mut rows = usize::MAX;
        for _ in 0..100 {
            let store = Store::open_or_create(&relay_dir.join(samverkan_relay::server::DB_FILE))?;
            rows = store.sync_states(&attacker_id.to_string())?.len();
            if rows <= 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        rows
    };
    let rss_after = relay.rss_bytes()?;

    let (i50, i99) = (ms(percentile(&idle, 50.0)), ms(percentile(&idle, 99.0)));
    let (f50, f99) = (ms(percentile(&during, 50.0)), ms(percentile(&during, 99.0)));
    let mb = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
    let count = |n: &AtomicU64| n.load(Ordering::Relaxed) as f64;
    Ok(vec![
        Figure::info("flood.idle.p50", i50, "ms"),
        Figure::info("flood.idle.p99", i99, "ms"),
        Figure::info("flood.during.p50", f50, "ms").baseline(i50, "idle"),
        Figure::info("flood.during.p99", f99, "ms").baseline(i99, "idle").target("< 2× idle", f99 < 2.0 * i99),
        Figure::info("flood.seconds", flood_secs, "s"),
        Figure::info("flood.sent.doc_heads_frames", count(&sent.doc_heads), "frames"),
        Figure::info("flood.sent.doc_heads_ids_per_frame", size.doc_heads_entries as f64, "ids"),
        Figure::info("flood.sent.sync_frames", count(&sent.syncs), "frames"),
        Figure::info("flood.sent.connections", count(&sent.connections), "connections"),
        Figure::info("flood.relay.cpu_per_second", cpu / flood_secs, "cores")
            .baseline((cpu_idle_end - cpu_start) / idle_secs, "idle, the same edits"),
        Figure::info("flood.relay.rss_peak", mb(peak.get()), "MB").baseline(mb(rss_idle), "idle"),
        Figure::info("flood.relay.rss_after", mb(rss_after), "MB").baseline(mb(rss_idle), "idle"),
        Figure::info("flood.sync_state_rows", rows as f64, "rows").target("≤ 1 (the document it shares)", rows <= 1),
    ])
}

/// Floods until `stop`: one task sends pairs of `DocHeads` frames on fresh
/// connections, another `Sync` frames for unknown documents.
async fn attack(
    target: RelayTarget,
    key: NodeKey,
    entries: usize,
    syncs: usize,
    stop: Arc<AtomicBool>,
    sent: Arc<Sent>,
) -> Result<()> {
    let identity = Arc::new(TlsIdentity::new(key.signing_key(), "flood")?);
    let client = endpoint::client_endpoint(target.addr)?;
    let hello = Frame::Hello {
        protocol: PROTOCOL_VERSION,
        software: "flood".into(),
        node: key.node_id().to_string(),
        directory: None,
    };
    let hello = hello.encode();
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64);
    let mut rng = SplitMix(seed.unwrap_or(0x5eed));
    let doc_heads = doc_heads_frame(entries, &mut rng);
    let phantom = phantom_syncs(1000, &mut rng);
    let limits = Limits::default();
    let connect = || endpoint::connect(&client, target.addr, &identity, *target.relay_key.as_bytes(), &limits);
    // Every step gives up at `stop` (the relay may be holding the attacker back by then).
    let heads_flood = async {
        while !stop.load(Ordering::Relaxed) {
            let Some(Ok(conn)) = or_stop(&stop, connect()).await else { continue };
            sent.connections.fetch_add(1, Ordering::Relaxed);
            if let Some(Ok((mut send, recv))) = or_stop(&stop, conn.open_bi()).await {
                let attack = async {
                    send.write_all(&hello).await?;
                    for _ in 0..2 {
                        send.write_all(&doc_heads).await?;
                        sent.doc_heads.fetch_add(1, Ordering::Relaxed);
                    }
                    drain(recv).await;
                    Ok::<_, quinn::WriteError>(())
                };
                let _ = or_stop(&stop, attack).await;
            }
            conn.close(0u32.into(), b"done");
        }
    };
    let sync_flood = async {
        while !stop.load(Ordering::Relaxed) {
            let Some(Ok(conn)) = or_stop(&stop, connect()).await else { continue };
            sent.connections.fetch_add(1, Ordering::Relaxed);
            if let Some(Ok((mut send, recv))) = or_stop(&stop, conn.open_bi()).await {
                let attack = async {
                    send.write_all(&hello).await?;
                    send.write_all(&Frame::DocHeads { entries: Vec::new() }.encode()).await?;
                    for _ in 0..syncs.div_ceil(1000) {
                        send.write_all(&phantom).await?;
                        sent.syncs.fetch_add(1000, Ordering::Relaxed);
                    }
                    let _ = send.finish();
                    drain(recv).await;
                    Ok::<_, quinn::WriteError>(())
                };
                let _ = or_stop(&stop, attack).await;
            }
            conn.close(0u32.into(), b"done");
        }
    };
    tokio::join!(heads_flood, sync_flood);
    let _ = tokio::time::timeout(Duration::from_secs(2), client.wait_idle()).await;
    Ok(())
}

/// `f`'s output, or `None` once `stop` is set.
async fn or_stop<F: std::future::Future>(stop: &AtomicBool, f: F) -> Option<F::Output> {
    let stopped = async {
        while !stop.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::select! {
        out = f => Some(out),
        () = stopped => None,
    }
}

/// Reads and drops what the relay sends until it ends the stream.
async fn drain(mut recv: quinn::RecvStream) {
    let mut chunk = vec![0u8; 64 * 1024];
    while let Ok(Some(_)) = recv.read(&mut chunk).await {}
}

/// One `DocHeads` frame naming `entries` random documents.
fn doc_heads_frame(entries: usize, rng: &mut SplitMix) -> Vec<u8> {
    let entries: Vec<(DocId, [u8; 8])> = (0..entries)
        .map(|_| {
            let (hi, lo) = (rng.next(), rng.next());
            let mut id = [0u8; 16];
            id[..8].copy_from_slice(&hi.to_be_bytes());
            id[8..].copy_from_slice(&lo.to_be_bytes());
            (DocId::from_bytes(id), rng.next().to_be_bytes())
        })
        .collect();
    Frame::DocHeads { entries }.encode()
}

/// `count` `Sync` frames, each for another random document, naming its heads without its changes.
fn phantom_syncs(count: usize, rng: &mut SplitMix) -> Vec<u8> {
    use automerge::sync::SyncDoc;
    use automerge::transaction::Transactable;
    let mut doc = automerge::AutoCommit::new();
    let _ = doc.put(automerge::ROOT, "x", 1);
    doc.commit();
    let mut state = automerge::sync::State::new();
    let message = doc.sync().generate_sync_message(&mut state).map(|m| m.encode()).unwrap_or_default();
    let mut out = Vec::new();
    for _ in 0..count {
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&rng.next().to_be_bytes());
        id[8..].copy_from_slice(&rng.next().to_be_bytes());
        out.extend(Frame::Sync { doc: DocId::from_bytes(id), message: message.clone() }.encode());
    }
    out
}

/// A small, fast generator for ids the relay has never seen (not for secrets).
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}
