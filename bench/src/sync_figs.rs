//! Figures 2–4: catch-up after offline edits, cold sync of a fresh node, and a
//! reconnect with nothing new, each with real QUIC and SQLite against the same
//! sync in process.

use std::time::{Duration, Instant};

use anyhow::Result;
use samverkan_node::sync::{self, SyncReport};

use crate::fixtures::Author;
use crate::harness;
use crate::inproc::{memory_docs, Network};
use crate::report::{ms, Figure};

const LIMIT: Duration = Duration::from_secs(600);
/// Bytes of one `Authors` entry: a change hash and a signature.
const AUTHOR_ENTRY: usize = 32 + 64;

fn wire_bytes(r: &SyncReport) -> f64 {
    (r.bytes_sent + r.bytes_received) as f64
}

/// Figure 2: `edits` small edits across `docs` documents made offline, then one sync.
pub async fn catch_up(docs: usize, edits: usize) -> Result<Vec<Figure>> {
    let root = tempfile::tempdir()?;
    let relay = harness::start_relay(&root.path().join("relay")).await?;
    let target = harness::target(&relay);
    let mut a = harness::new_node(&relay, root.path(), "a", "Flen")?;
    let author = Author::of(&a);
    let mut before = memory_docs();
    let mut ids = Vec::new();
    for _ in 0..docs {
        let mut doc = author.plan_with_history(10)?;
        a.store_mut().insert(&mut doc)?;
        ids.push(doc.id().clone());
        before.insert_document(doc);
    }
    sync::sync_once(&mut a, &target, LIMIT).await?;
    let mut net = Network::default();
    let link = net.connect("a", before.clone(), None);
    net.pump(None)?;
    let (_, states) = net.disconnect(link);

    for k in 0..edits {
        let title = format!("Åtgärdsplan, offline {k}");
        a.edit(&ids[k % docs], "title", |e| e.set_title(&title))?;
    }
    let mut after = memory_docs();
    let (mut change_bytes, mut compact_bytes, mut new_changes) = (0usize, 0usize, 0usize);
    for id in &ids {
        let mut doc = a.document(id)?;
        let old = before.heads_of(id);
        let changes = doc.automerge_mut().get_changes(&old);
        new_changes += changes.len();
        change_bytes += changes.iter().map(|c| c.raw_bytes().len()).sum::<usize>();
        // Automerge's own saved form of exactly these changes (on 0.12 the
        // same bytes as the changes: incremental saves are not compacted).
        compact_bytes += doc.automerge_mut().save_after(&old).len();
        after.insert_document(doc);
    }

    let started = Instant::now();
    let report = sync::sync_once(&mut a, &target, LIMIT).await?;
    let real = started.elapsed();
    let started = Instant::now();
    let again = sync::sync_once(&mut a, &target, LIMIT).await?;
    let reconnect = started.elapsed();

    net.connect("a", after, Some(states));
    net.frames = 0;
    net.bytes = 0;
    net.signatures = 0;
    let started = Instant::now();
    net.pump(None)?;
    let inproc = started.elapsed();
    relay.shutdown().await;

    let bytes = wire_bytes(&report);
    // Before batching, every change travelled with its own 96-byte `Authors`
    // entry: these bytes plus one entry for each change not signed now.
    let per_change = bytes + (AUTHOR_ENTRY * new_changes.saturating_sub(net.signatures as usize)) as f64;
    Ok(vec![
        Figure::info("catchup.time", ms(real), "ms")
            .baseline(ms(inproc), "in-process sync")
            .target("≤ 2× in-process", ms(real) <= 2.0 * ms(inproc)),
        Figure::info("catchup.bytes", bytes, "B")
            .baseline(change_bytes as f64, "new changes")
            .target("≤ 1.1× the changes", bytes <= 1.1 * change_bytes as f64),
        Figure::info("catchup.bytes.vs_compact", bytes, "B")
            .baseline(compact_bytes as f64, "new changes, as saved")
            .target("≤ 1.5× the changes", bytes <= 1.5 * compact_bytes as f64),
        Figure::info("catchup.bytes.if_every_change_signed", per_change, "B")
            .baseline(compact_bytes as f64, "new changes, as saved"),
        Figure::info("catchup.signatures", net.signatures as f64, "signatures")
            .baseline(new_changes as f64, "new changes"),
        Figure::info("catchup.bytes.inproc", net.bytes as f64, "B").baseline(change_bytes as f64, "new changes"),
        Figure::info(format!("reconnect.docs{docs}.bytes"), wire_bytes(&again), "B")
            .target("< 10 KB", wire_bytes(&again) < 10_000.0),
        Figure::info(format!("reconnect.docs{docs}.frames"), again.frames as f64, "frames"),
        Figure::info(format!("reconnect.docs{docs}.time"), ms(reconnect), "ms")
            .baseline(ms(real), "the catch-up's sync, connection included"),
    ])
}

/// Figures 3 and 4: a fresh node pulls `docs` realistic documents, then
/// reconnects with nothing new.
pub async fn cold_and_reconnect(docs: usize) -> Result<Vec<Figure>> {
    let root = tempfile::tempdir()?;
    let relay = harness::start_relay(&root.path().join("relay")).await?;
    let target = harness::target(&relay);
    let mut seeder = harness::new_node(&relay, root.path(), "seeder", "Länsstyrelsen")?;
    let author = Author::of(&seeder);
    let mut relay_docs = memory_docs();
    let mut saved = 0usize;
    for n in 0..docs {
        let mut doc = author.realistic(n)?;
        saved += doc.automerge_mut().save().len();
        seeder.store_mut().insert(&mut doc)?;
        relay_docs.insert_document(doc);
    }
    let started = Instant::now();
    sync::sync_once(&mut seeder, &target, LIMIT).await?;
    let upload = started.elapsed();

    let mut fresh = harness::new_node(&relay, root.path(), "fresh", "Trosa")?;
    let started = Instant::now();
    let cold = sync::sync_once(&mut fresh, &target, LIMIT).await?;
    let real = started.elapsed();
    let received = fresh.list()?.len();
    let reconnect = sync::sync_once(&mut fresh, &target, LIMIT).await?;
    relay.shutdown().await;
    if received != docs {
        anyhow::bail!("the fresh node received {received} of {docs} documents");
    }

    let mut net = Network { relay_docs, ..Network::default() };
    let link = net.connect("fresh", memory_docs(), None);
    let started = Instant::now();
    net.pump(None)?;
    let inproc = started.elapsed();
    let inproc_bytes = net.bytes;
    let (fresh_docs, states) = net.disconnect(link);
    net.frames = 0;
    net.bytes = 0;
    net.connect("fresh", fresh_docs, Some(states));
    net.pump(None)?;
    let total = reconnect.frames as f64;
    let bytes = wire_bytes(&reconnect);
    let messages = (reconnect.messages_sent + reconnect.messages_received) as f64;
    Ok(vec![
        Figure::info("cold.doc_size", saved as f64 / docs as f64, "B").target("about the seed agreement", true),
        Figure::info("cold.upload", ms(upload), "ms"),
        Figure::info(format!("cold.docs{docs}.time"), ms(real), "ms")
            .baseline(ms(inproc), "in-process sync")
            .target("≤ 1.3× in-process", ms(real) <= 1.3 * ms(inproc)),
        Figure::info(format!("cold.docs{docs}.bytes"), wire_bytes(&cold), "B")
            .baseline(inproc_bytes as f64, "in-process frames"),
        Figure::info(format!("reconnect.docs{docs}.frames"), total, "frames")
            .baseline(net.frames as f64, "in-process")
            .target("constant handful (≤ 6 frames = 2 protocol round trips + QUIC handshake)", total <= 6.0),
        Figure::info(format!("reconnect.docs{docs}.sync_messages"), messages, "messages").target("0", messages == 0.0),
        Figure::info(format!("reconnect.docs{docs}.bytes"), bytes, "B")
            .baseline(net.bytes as f64, "in-process")
            .target("< 10 KB, independent of document count", bytes < 10_000.0),
    ])
}
