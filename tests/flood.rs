//! Floods from an enrolled node (one that passed authentication and speaks
//! the protocol), against a real relay over QUIC on 127.0.0.1: what the relay
//! keeps per connection stays bounded, and nothing of the flood outlives it.
//! The relay runs in this process, so its memory is read from
//! `/proc/self/status`. Bounded loops and timeouts everywhere; the tests take
//! turns (one lock) so that one's memory does not show in the other's.

use std::path::Path;
use std::time::{Duration, Instant};

use samverkan::net::endpoint::{self, Limits};
use samverkan::net::tls::TlsIdentity;
use samverkan::node::node::Node;
use samverkan::node::sync::{self};
use samverkan::relay::monitor::RelayStatus;
use samverkan::relay::server::{self, RelayConfig, RelayHandle, DB_FILE};
use samverkan::shared::automerge::{self, transaction::Transactable, AutoCommit};
use samverkan::shared::identity::NodeKey;
use samverkan::shared::ids::DocId;
use samverkan::shared::model::{DocKind, DocumentContent};
use samverkan::shared::org::OrgId;
use samverkan::shared::wire::{ErrorCode, Frame, FrameDecoder, PROTOCOL_VERSION};
use samverkan::store::Store;

#[path = "support/relay_net.rs"]
mod relay_net;
use relay_net::{bounded, eventually, relay_config, spawn_relay, target, LIMIT};

/// One flood at a time: memory is read for the whole process.
static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn flen() -> OrgId {
    samverkan::shared::org::Directory::sodermanland().resolve("Flen").expect("a Södermanland party").id.clone()
}

/// An honest Flen node with one document, synced to the relay.
async fn honest_node_with_a_document(root: &Path, relay: &RelayHandle) -> (Node, DocId) {
    let mut node = Node::init(&root.join("flen"), "Flen", Some("flen")).unwrap();
    relay.enroll_node(node.node_id(), node.org().clone(), "flen").unwrap();
    let mut content = DocumentContent::new(DocKind::CitizenPromise, "Medborgarlöfte Flen 2026");
    content.parties = vec![flen()];
    let doc = node.create(content).unwrap();
    bounded("sync", sync::sync_once(&mut node, &target(relay), LIMIT)).await.expect("the honest node syncs");
    (node, doc)
}

/// A key enrolled as a Flen node: the attacker passed authentication.
fn enrolled_attacker(relay: &RelayHandle) -> NodeKey {
    let key = NodeKey::generate();
    relay.enroll_node(key.node_id(), flen(), "angripare").unwrap();
    key
}

/// A raw authenticated connection holding `key`, its stream, and a task that
/// reads the relay's frames until an `Error` frame (returned) or the end.
async fn attacker_connection(
    relay: &RelayHandle,
    key: &NodeKey,
) -> (quinn::Connection, quinn::SendStream, tokio::task::JoinHandle<Option<(ErrorCode, String)>>) {
    let identity = TlsIdentity::new(key.signing_key(), "test-client").unwrap();
    let client = endpoint::client_endpoint(relay.local_addr()).unwrap();
    let limits = Limits::default();
    let connecting = endpoint::connect(&client, relay.local_addr(), &identity, *relay.relay_key().as_bytes(), &limits);
    let conn = bounded("connect", connecting).await.unwrap();
    let (mut send, mut recv) = bounded("open", conn.open_bi()).await.unwrap();
    let hello = Frame::Hello {
        protocol: PROTOCOL_VERSION,
        software: "flood".into(),
        node: key.node_id().to_string(),
        directory: None,
    };
    send.write_all(&hello.encode()).await.unwrap();
    let reader = tokio::spawn(async move {
        let mut decoder = FrameDecoder::new();
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            match decoder.next_frame() {
                Ok(Some(Frame::Error { code, message })) => return Some((code, message)),
                Ok(Some(_)) => continue,
                Err(_) => return None,
                Ok(None) => {}
            }
            match recv.read(&mut chunk).await {
                Ok(Some(n)) => decoder.push(&chunk[..n]),
                Ok(None) | Err(_) => return None,
            }
        }
    });
    (conn, send, reader)
}

/// A field of `/proc/self/status` in kB (`VmRSS`, `VmHWM`).
fn proc_status_kb(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix(field)?.strip_prefix(':')?.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// Resets the process's peak resident memory (`VmHWM`) to its current size, if the kernel allows.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// CPU time this process used so far (user + system), in seconds.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit_once(')').map(|(_, r)| r.split_whitespace().collect()).unwrap_or_default();
    let tick = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    (tick(11) + tick(12)) as f64 / 100.0
}

fn leb128(mut value: usize, out: &mut Vec<u8>) {
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// Writes one `DocHeads` frame naming `entries` random documents, generated
/// as it is written (the attacker's side holds 64 KiB of it at a time, so the
/// process's memory is the relay's). `Err` once the relay stopped reading.
async fn write_doc_heads(send: &mut quinn::SendStream, entries: usize) -> Result<(), quinn::WriteError> {
    const TYPE_DOC_HEADS: u8 = 0x04;
    let mut count = Vec::new();
    leb128(entries, &mut count);
    let payload = 1 + count.len() + entries * 24;
    let mut head = (payload as u32).to_be_bytes().to_vec();
    head.push(TYPE_DOC_HEADS);
    head.extend(count);
    send.write_all(&head).await?;
    let mut chunk = Vec::with_capacity(64 * 1024);
    let mut left = entries;
    while left > 0 {
        chunk.clear();
        let n = left.min(2730);
        for _ in 0..n {
            chunk.extend_from_slice(&rand::random::<[u8; 24]>());
        }
        send.write_all(&chunk).await?;
        left -= n;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_doc_heads_flood_is_refused_after_the_first_frame_and_relay_memory_stays_bounded() {
    let _turn = TURN.lock().await;
    let root = tempfile::tempdir().unwrap();
    // About memory: a budget large enough that the frames are read as fast as
    // they come (at the default one, two 64 MiB frames take 15 s to read).
    let mut config = relay_config(&root.path().join("relay"));
    config.receive_rate_per_key = 1 << 30;
    config.receive_burst_per_key = 1 << 30;
    let relay = spawn_relay(config).await;
    let (mut honest, doc) = honest_node_with_a_document(root.path(), &relay).await;
    let attacker = enrolled_attacker(&relay);

    // Frames of the largest size the relay accepts, each naming millions of unknown documents
    // (issue 13 sent ten frames of a million: 25 MB → 1,145 MB, 726 MB after the close).
    const FRAMES: usize = 5;
    let entries = (Limits::default().max_frame - 8) / 24;
    let rss_before = proc_status_kb("VmRSS");
    let peak_tracked = reset_peak_rss();
    let started = Instant::now();
    let (conn, mut send, reader) = attacker_connection(&relay, &attacker).await;
    let mut written = 0;
    for _ in 0..FRAMES {
        if bounded("a DocHeads frame", write_doc_heads(&mut send, entries)).await.is_err() {
            break;
        }
        written += 1;
    }
    let refusal = bounded("the refusal", reader).await.unwrap();
    let peak = if peak_tracked { proc_status_kb("VmHWM") } else { proc_status_kb("VmRSS") };
    conn.close(0u32.into(), b"done");
    let (code, message) = refusal.expect("an Error frame before the close");
    println!(
        "{written} of {FRAMES} DocHeads frames of {entries} ids written in {:.1} s; relay answered {code:?}: {message}",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(code, ErrorCode::Malformed, "{message}");
    assert!(message.contains("a second answer to our Summary"), "{message}");
    assert!(written < FRAMES, "the relay stopped reading after the second frame");

    // The relay still serves the honest node, and keeps nothing of the flood.
    honest.edit(&doc, "edit", |e| e.set_body("Trygghetsvandringar varje månad.")).unwrap();
    bounded("sync", sync::sync_once(&mut honest, &target(&relay), LIMIT)).await.expect("the honest node syncs");
    let after = proc_status_kb("VmRSS");
    println!(
        "relay process VmRSS: {rss_before} kB before, peak {peak} kB during the flood{}, {after} kB after",
        if peak_tracked { "" } else { " (VmRSS: peak not tracked)" }
    );
    // The first frame is decoded and planned (about three times the frame's size at the peak,
    // whatever the number of frames); nothing of it is kept.
    let (peak_mb, kept_mb) = (peak.saturating_sub(rss_before) / 1024, after.saturating_sub(rss_before) / 1024);
    assert!(peak_mb < 256, "the flood grew the relay's memory by {peak_mb} MB at the peak");
    assert!(kept_mb < 64, "the relay kept {kept_mb} MB after the flood");
    let status: RelayStatus = relay.status();
    let node = status.nodes.iter().find(|n| n.node_id == attacker.node_id().to_string()).expect("attacker known");
    assert!(node.docs.len() <= 1, "only the relay's own document is tracked for the attacker: {:?}", node.docs);
    relay.shutdown().await;
}

/// An Automerge sync message naming a document (its heads), without its changes.
fn phantom_sync_message() -> Vec<u8> {
    let mut doc = AutoCommit::new();
    doc.put(automerge::ROOT, "x", 1).unwrap();
    doc.commit();
    let mut state = automerge::sync::State::new();
    let message = automerge::sync::SyncDoc::generate_sync_message(&doc.sync(), &mut state).unwrap();
    message.encode()
}

/// The sync-state rows the relay stores for `peer`.
fn stored_states(relay_dir: &Path, peer: &NodeKey) -> Vec<DocId> {
    let store = Store::open_or_create(&relay_dir.join(DB_FILE)).expect("the relay's database opens");
    store.sync_states(&peer.node_id().to_string()).unwrap().into_iter().map(|(doc, _)| doc).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_frames_for_unknown_documents_leave_no_sync_state_and_the_next_connection_is_cheap() {
    let _turn = TURN.lock().await;
    let root = tempfile::tempdir().unwrap();
    let relay_dir = root.path().join("relay");
    // About what each frame costs: a budget large enough that they are read as
    // fast as they come (at the default one, 20,000 small frames take 9 s).
    let mut config = relay_config(&relay_dir);
    config.receive_rate_per_key = 1 << 30;
    config.receive_burst_per_key = 1 << 30;
    let relay = spawn_relay(config).await;
    let (_honest, doc) = honest_node_with_a_document(root.path(), &relay).await;
    let attacker = enrolled_attacker(&relay);
    // Rows an older relay kept for such a flood: they go at the next save.
    {
        let mut store = Store::open_or_create(&relay_dir.join(DB_FILE)).unwrap();
        let junk = (0..1_000).map(|_| (DocId::random(), automerge::sync::State::new().encode()));
        store.save_sync_states(&attacker.node_id().to_string(), junk).unwrap();
    }
    assert_eq!(stored_states(&relay_dir, &attacker).len(), 1_000);

    // As in issue 13 (which left 36,955 rows and cost 150 s of CPU, then 5.9 s per later connection).
    const FRAMES: usize = 20_000;
    let message = phantom_sync_message();
    let (rss_before, cpu_before, started) = (proc_status_kb("VmRSS"), cpu_seconds(), Instant::now());
    let storage_steps_before = relay.metrics().steps_on_storage_threads.get();
    let (conn, mut send, reader) = attacker_connection(&relay, &attacker).await;
    // Answer the relay's Summary (so it starts its one document), then name unknown documents.
    send.write_all(&Frame::DocHeads { entries: Vec::new() }.encode()).await.unwrap();
    let mut batch = Vec::new();
    for i in 0..FRAMES {
        batch.extend(Frame::Sync { doc: DocId::random(), message: message.clone() }.encode());
        if i % 1000 == 999 {
            bounded("Sync frames", send.write_all(&batch)).await.expect("the relay reads them");
            batch.clear();
        }
    }
    send.finish().unwrap();
    let ended = bounded("the relay ends the connection", reader).await.unwrap();
    assert!(ended.is_none(), "no error for well-formed frames: {ended:?}");
    let status = relay.status();
    let node = status.nodes.iter().find(|n| n.node_id == attacker.node_id().to_string()).expect("attacker known");
    assert!(node.messages_in >= FRAMES as u64, "the relay read every frame ({} sync messages)", node.messages_in);
    let flood = (started.elapsed().as_secs_f64(), cpu_seconds() - cpu_before);
    // Answered where they were read, without a storage thread (the handshake and
    // the relay's own document take a few steps there).
    let storage_steps = relay.metrics().steps_on_storage_threads.get() - storage_steps_before;
    assert!(storage_steps < 100, "{storage_steps} of {FRAMES} frames went to a storage thread");
    conn.close(0u32.into(), b"done");
    // Saved when the connection ended: the relay's own document only, the old junk gone.
    eventually("the sync states saved", || stored_states(&relay_dir, &attacker) == vec![doc.clone()]).await;
    let rss_after = proc_status_kb("VmRSS");
    println!(
        "{FRAMES} Sync frames for unknown documents: {:.1} s, {:.1} s CPU; VmRSS {rss_before} → {rss_after} kB; \
         rows kept: 1 (the relay's document; 1,000 old junk rows dropped); \
         {storage_steps} storage-thread steps",
        flood.0, flood.1
    );
    // Naming documents costs no memory that stays (each id once kept a slot of
    // about 4 KB in the relay's store: 90 MB for these frames).
    assert!(rss_after.saturating_sub(rss_before) < 32 * 1024, "VmRSS {rss_before} → {rss_after} kB");

    // The next connection of that key restores one state and is cheap.
    let (cpu_before, started) = (cpu_seconds(), Instant::now());
    let (conn, mut send, reader) = attacker_connection(&relay, &attacker).await;
    send.write_all(&Frame::InSync.encode()).await.unwrap();
    send.finish().unwrap();
    assert!(bounded("the next connection", reader).await.unwrap().is_none());
    conn.close(0u32.into(), b"done");
    println!(
        "next connection of that key: {:.2} s, {:.2} s CPU",
        started.elapsed().as_secs_f64(),
        cpu_seconds() - cpu_before
    );
    eventually("the sync states saved again", || stored_states(&relay_dir, &attacker) == vec![doc.clone()]).await;
    let status = relay.status();
    let node = status.nodes.iter().find(|n| n.node_id == attacker.node_id().to_string()).expect("attacker known");
    assert_eq!(node.docs.iter().map(|d| d.doc.clone()).collect::<Vec<_>>(), vec![doc], "monitoring holds no phantom");
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_key_is_read_at_its_budget_while_other_nodes_sync_as_usual() {
    let _turn = TURN.lock().await;
    let root = tempfile::tempdir().unwrap();
    let mut config = RelayConfig::new("127.0.0.1:0".parse().unwrap(), root.path().join("relay"));
    // 100 small frames a second, 100 at once (every frame costs at least budget::FRAME_COST).
    let frame_cost = samverkan::relay::budget::FRAME_COST;
    config.receive_rate_per_key = 100 * frame_cost;
    config.receive_burst_per_key = 100 * frame_cost;
    let relay = server::spawn(config).await.expect("relay starts");
    let (mut honest, doc) = honest_node_with_a_document(root.path(), &relay).await;
    let attacker = enrolled_attacker(&relay);

    let (conn, mut send, _reader) = attacker_connection(&relay, &attacker).await;
    let mut flood = Vec::new();
    for _ in 0..5_000 {
        flood.extend(Frame::Sync { doc: DocId::random(), message: phantom_sync_message() }.encode());
    }
    let started = Instant::now();
    // The relay stops reading once the budget is spent: flow control holds the rest back.
    let writer = tokio::spawn(async move {
        let _ = send.write_all(&flood).await;
        send
    });
    // Meanwhile the honest node edits and syncs, at its own budget.
    for i in 0..3 {
        honest.edit(&doc, "edit", |e| e.set_body(&format!("Version {i}"))).unwrap();
        let synced = Instant::now();
        bounded("sync", sync::sync_once(&mut honest, &target(&relay), LIMIT)).await.expect("the honest node syncs");
        println!("honest sync {i} during the flood: {:.0} ms", synced.elapsed().as_secs_f64() * 1000.0);
    }
    tokio::time::sleep(Duration::from_secs(2).saturating_sub(started.elapsed())).await;
    let elapsed = started.elapsed().as_secs_f64();
    let status = relay.status();
    let node = status.nodes.iter().find(|n| n.node_id == attacker.node_id().to_string()).expect("attacker known");
    let allowed = 100.0 + 100.0 * elapsed;
    println!(
        "after {elapsed:.1} s the relay had read {} of 5000 flood frames (budget: {allowed:.0})",
        node.messages_in
    );
    assert!((node.messages_in as f64) <= allowed + 5.0, "read {} frames, budget {allowed:.0}", node.messages_in);
    assert!(node.messages_in >= 100, "the burst was read at once: {}", node.messages_in);
    writer.abort();
    conn.close(0u32.into(), b"done");
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_larger_than_the_budget_is_read_at_the_budgets_pace_not_at_once() {
    const MIB: u64 = 1024 * 1024;
    let _turn = TURN.lock().await;
    let root = tempfile::tempdir().unwrap();
    let mut config = relay_config(&root.path().join("relay"));
    config.receive_rate_per_key = MIB;
    config.receive_burst_per_key = MIB;
    let relay = spawn_relay(config).await;
    let (mut honest, doc) = honest_node_with_a_document(root.path(), &relay).await;
    let attacker = enrolled_attacker(&relay);

    // One DocHeads frame of 16 MiB, sixteen times the burst, well within the frame limit.
    let (conn, mut send, _reader) = attacker_connection(&relay, &attacker).await;
    let started = Instant::now();
    let writer = tokio::spawn(async move {
        let _ = write_doc_heads(&mut send, (16 * MIB / 24) as usize).await;
        send
    });
    honest.edit(&doc, "edit", |e| e.set_body("Trygghetsvandringar varje månad.")).unwrap();
    bounded("sync", sync::sync_once(&mut honest, &target(&relay), LIMIT)).await.expect("the honest node syncs");
    tokio::time::sleep(Duration::from_secs(2).saturating_sub(started.elapsed())).await;

    let status = relay.status();
    let node = status.nodes.iter().find(|n| n.node_id == attacker.node_id().to_string()).expect("attacker known");
    let (read, sent) = (node.bytes_in, conn.stats().udp_tx.bytes);
    let elapsed = started.elapsed().as_secs_f64();
    // The burst, the rate since, and what one step reads past a charge (a
    // quarter MiB and one chunk), plus the Hello.
    let allowed = (1.0 + elapsed) * MIB as f64 + 384.0 * 1024.0;
    // What the relay took in: read, plus at most the connection's window in flight (and packet headers).
    let in_flight = Limits::relay().connection_window as f64;
    println!(
        "after {elapsed:.1} s the relay had read {:.1} MiB of the 16 MiB frame (budget {:.1} MiB); \
         the attacker had sent {:.1} MiB",
        read as f64 / MIB as f64,
        allowed / MIB as f64,
        sent as f64 / MIB as f64
    );
    assert!(read as f64 <= allowed, "the relay read {read} bytes of one frame, its budget was {allowed:.0}");
    assert!(read >= MIB, "the burst was read at once: {read} bytes");
    assert!(
        (sent as f64) <= (allowed + in_flight) * 1.1,
        "the attacker got {sent} bytes to the relay; flow control should have held it to {:.0}",
        allowed + in_flight
    );
    writer.abort();
    conn.close(0u32.into(), b"done");
    relay.shutdown().await;
}

/// A `Sync` frame of a few hundred bytes can carry thousands of operations,
/// each costing Automerge work: a key pays for them from its receive budget
/// before the frame is handled, so frames that are small on the wire are
/// handled at the pace of what they cost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keys_operations_are_paid_for_from_its_budget_before_they_are_applied() {
    use samverkan::relay::budget::DOCUMENT_OPERATION_COST;
    use samverkan::shared::automerge::{ObjType, ScalarValue, ROOT};
    const KIB: u64 = 1024;
    const OPS: usize = 10_000;
    let _turn = TURN.lock().await;
    let root = tempfile::tempdir().unwrap();
    let mut config = relay_config(&root.path().join("relay"));
    config.receive_rate_per_key = 16 * KIB;
    config.receive_burst_per_key = 16 * KIB;
    let relay = spawn_relay(config).await;
    let attacker = enrolled_attacker(&relay);

    // Six new documents of 10,000 operations each, a few hundred bytes on the
    // wire (sent whole, as saved documents): four of them fit the burst by
    // their bytes, each is five times the burst by its operations.
    let frames: Vec<Frame> = (0..6)
        .map(|_| {
            let mut doc = AutoCommit::new().with_actor(attacker.node_id().actor_id());
            let list = doc.put_object(ROOT, "l", ObjType::List).unwrap();
            doc.splice(&list, 0, 0, std::iter::repeat_n(ScalarValue::Boolean(true), OPS)).unwrap();
            doc.commit();
            Frame::Sync { doc: DocId::random(), message: whole_document_message(&mut doc) }
        })
        .collect();
    assert!(frames.iter().all(|f| f.payload_len() < 1024));
    let (conn, mut send, _reader) = attacker_connection(&relay, &attacker).await;
    send.write_all(&Frame::DocHeads { entries: Vec::new() }.encode()).await.unwrap();
    let started = Instant::now();
    for frame in &frames {
        send.write_all(&frame.encode()).await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let status = relay.status();
    let node = status.nodes.iter().find(|n| n.node_id == attacker.node_id().to_string()).expect("attacker known");
    // The burst and the rate since, against what each frame costs.
    let elapsed = started.elapsed().as_secs_f64();
    let budget = (1.0 + elapsed) * 16.0 * KIB as f64;
    let per_frame = (OPS as u64 * DOCUMENT_OPERATION_COST) as f64;
    println!(
        "after {elapsed:.1} s the relay had handled {} of 6 frames of {OPS} operations (budget {budget:.0} bytes, \
         {per_frame:.0} a frame)",
        node.messages_in
    );
    assert!(
        (node.messages_in as f64) <= (budget / per_frame).ceil(),
        "{} frames handled, the budget covered {:.2}",
        node.messages_in,
        budget / per_frame
    );
    conn.close(0u32.into(), b"done");
    relay.shutdown().await;
}

/// The message a peer holding nothing gets for `doc`: its whole history.
fn whole_document_message(doc: &mut AutoCommit) -> Vec<u8> {
    use automerge::sync::{State, SyncDoc};
    let (mut ours, mut theirs, mut empty) = (State::new(), State::new(), AutoCommit::new());
    let offer = doc.sync().generate_sync_message(&mut ours).unwrap();
    empty.sync().receive_sync_message(&mut theirs, offer).unwrap();
    let request = empty.sync().generate_sync_message(&mut theirs).unwrap();
    doc.sync().receive_sync_message(&mut ours, request).unwrap();
    doc.sync().generate_sync_message(&mut ours).unwrap().encode()
}
