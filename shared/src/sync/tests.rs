//! Deterministic in-memory tests of the sync core.
//!
//! A tiny harness runs node A, relay R and node B as plain Automerge documents
//! connected A–R and B–R. Every frame is encoded to bytes, carried through an
//! in-memory queue and decoded again by a [`FrameDecoder`], so the wire format
//! is exercised too. Delivery is either in order or driven by a seeded PRNG
//! (random link, random chunk sizes); connections can be dropped, discarding
//! everything in flight, and re-created from persisted sync states. No
//! threads, sockets or clocks: the same seed gives the same run.

use std::collections::{BTreeMap, VecDeque};

use automerge::sync::{BloomFilter, ChunkList, Have, MessageVersion};
use automerge::transaction::Transactable;
use automerge::{ActorId, ObjType, ReadDoc, ROOT};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sha2::{Digest, Sha256};

use super::*;
use crate::wire::{Frame, FrameDecoder, PROTOCOL_VERSION};

const A: usize = 0;
const R: usize = 1;
const B: usize = 2;
const NAMES: [&str; 3] = ["A", "R", "B"];
/// Link `l` connects node `LINK_NODE[l]` (end 0) with the relay (end 1).
const LINK_NODE: [usize; 2] = [A, B];
const NODE_END: usize = 0;
const RELAY_END: usize = 1;

fn doc_id(n: u8) -> DocId {
    hex::encode([n; 16]).parse().unwrap()
}

/// An empty document with a fixed actor per peer, so runs are reproducible.
fn new_doc(peer: usize) -> AutoCommit {
    AutoCommit::new().with_actor(ActorId::from(&[peer as u8 + 1; 16][..]))
}

/// A document created on `peer` with a title and a text.
fn seeded_doc(peer: usize, title: &str) -> AutoCommit {
    let mut doc = new_doc(peer);
    doc.put(ROOT, "title", title).unwrap();
    let text = doc.put_object(ROOT, "text", ObjType::Text).unwrap();
    doc.splice_text(&text, 0, 0, "start ").unwrap();
    doc.commit();
    doc
}

/// One small change: append to the text and set a key.
fn edit(doc: &mut AutoCommit, who: &str, n: usize) {
    let (_, text) = doc.get(ROOT, "text").unwrap().expect("document has a text");
    let len = doc.length(&text);
    doc.splice_text(&text, len, 0, &format!("{who}{n} ")).unwrap();
    doc.put(ROOT, format!("{who}-{n}"), n as i64).unwrap();
    doc.commit();
}

fn text_of(doc: &AutoCommit) -> String {
    let (_, text) = doc.get(ROOT, "text").unwrap().expect("document has a text");
    doc.text(&text).unwrap()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Summary phase first (what node and relay will do).
    Summary,
    /// Skip the summary and start an Automerge sync for every document (to measure it).
    SyncAll,
}

#[derive(Debug, Default, Clone, Copy)]
struct Stats {
    frames: usize,
    bytes: usize,
    sync_frames: usize,
    sync_bytes: usize,
}

struct Peer {
    docs: BTreeMap<DocId, AutoCommit>,
    /// Persisted sync states, by (remote peer, document).
    persisted: BTreeMap<(usize, DocId), Vec<u8>>,
}

struct End {
    peer: usize,
    session: PeerSession,
    decoder: FrameDecoder,
    /// Bytes this end sent that the other end has not received yet.
    outbox: VecDeque<u8>,
}

struct Net {
    peers: Vec<Peer>,
    links: [Option<[End; 2]>; 2],
    mode: Mode,
    stats: Stats,
    errors: Vec<String>,
}

impl Net {
    fn new() -> Self {
        let peers = (0..3).map(|_| Peer { docs: BTreeMap::new(), persisted: BTreeMap::new() }).collect();
        Self { peers, links: [None, None], mode: Mode::Summary, stats: Stats::default(), errors: Vec::new() }
    }

    fn take_stats(&mut self) -> Stats {
        std::mem::take(&mut self.stats)
    }

    fn connected(&self, l: usize) -> bool {
        self.links[l].is_some()
    }

    fn end_peer(l: usize, end: usize) -> usize {
        if end == NODE_END {
            LINK_NODE[l]
        } else {
            R
        }
    }

    /// Opens link `l` with sessions restored from persisted states; the node says Hello.
    fn connect(&mut self, l: usize, mode: Mode) {
        assert!(!self.connected(l));
        self.mode = mode;
        let make_end = |peers: &[Peer], end: usize| {
            let (me, remote) = (Self::end_peer(l, end), Self::end_peer(l, 1 - end));
            let role = if me == R { Role::Relay } else { Role::Node };
            let mut session = PeerSession::new(role);
            for ((_, doc), bytes) in peers[me].persisted.iter().filter(|((r, _), _)| *r == remote) {
                session.restore_state(doc, bytes).unwrap();
            }
            End { peer: me, session, decoder: FrameDecoder::new(), outbox: VecDeque::new() }
        };
        self.links[l] = Some([make_end(&self.peers, NODE_END), make_end(&self.peers, RELAY_END)]);
        let node = NAMES[LINK_NODE[l]];
        self.send(
            l,
            NODE_END,
            Frame::Hello { protocol: PROTOCOL_VERSION, software: "test".into(), node: node.into(), directory: None },
        );
        self.open_sync(l, NODE_END);
    }

    /// Drops link `l`: everything in flight is lost; both ends persist their sync states.
    fn disconnect(&mut self, l: usize) {
        let ends = self.links[l].take().expect("link is connected");
        for end in ends {
            let remote = Self::end_peer(l, if end.peer == R { NODE_END } else { RELAY_END });
            let persisted = &mut self.peers[end.peer].persisted;
            persisted.retain(|(r, _), _| *r != remote);
            for (doc, bytes) in end.session.into_persisted() {
                persisted.insert((remote, doc), bytes);
            }
        }
    }

    fn send(&mut self, l: usize, end: usize, frame: Frame) {
        let bytes = frame.encode();
        self.stats.frames += 1;
        self.stats.bytes += bytes.len();
        if matches!(frame, Frame::Sync { .. }) {
            self.stats.sync_frames += 1;
            self.stats.sync_bytes += bytes.len();
        }
        self.links[l].as_mut().expect("link is connected")[end].outbox.extend(bytes);
    }

    /// Current heads of every non-empty document of `peer`.
    fn heads_of(&mut self, peer: usize) -> Vec<(DocId, Vec<ChangeHash>)> {
        let docs = self.peers[peer].docs.iter_mut();
        docs.map(|(id, doc)| (id.clone(), doc.get_heads())).filter(|(_, heads)| !heads.is_empty()).collect()
    }

    /// What an end sends once the handshake is done.
    fn open_sync(&mut self, l: usize, end: usize) {
        let peer = Self::end_peer(l, end);
        let heads = self.heads_of(peer);
        match self.mode {
            Mode::Summary => self.send(l, end, summary_frame(heads.iter().map(|(d, h)| (d, h.as_slice())))),
            Mode::SyncAll => {
                for (doc, _) in heads {
                    self.generate_to(l, end, &doc);
                }
            }
        }
    }

    fn generate_to(&mut self, l: usize, end: usize, doc_id: &DocId) {
        let Some(ends) = self.links[l].as_mut() else { return };
        let end_state = &mut ends[end];
        let doc = self.peers[end_state.peer].docs.get_mut(doc_id).expect("document exists");
        if let Some(frame) = end_state.session.generate(doc_id, doc).unwrap() {
            self.send(l, end, frame);
        }
    }

    /// A peer's document changed: offer it on every connection of that peer except `except`.
    fn offer(&mut self, peer: usize, doc: &DocId, except: Option<usize>) {
        for l in 0..2 {
            if Some(l) == except || !self.connected(l) {
                continue;
            }
            for end in [NODE_END, RELAY_END] {
                if Self::end_peer(l, end) == peer {
                    self.generate_to(l, end, doc);
                }
            }
        }
    }

    fn local_edit(&mut self, peer: usize, doc: &DocId, n: usize) {
        edit(self.peers[peer].docs.get_mut(doc).expect("document exists"), NAMES[peer], n);
        self.offer(peer, doc, None);
    }

    fn create_doc(&mut self, peer: usize, doc: DocId) {
        let title = format!("doc {}", doc.short());
        self.peers[peer].docs.insert(doc.clone(), seeded_doc(peer, &title));
        self.offer(peer, &doc, None);
    }

    /// The frame handling a node or the relay will do, minus storage and authorisation.
    fn handle(&mut self, l: usize, end: usize, frame: Frame) {
        let peer = Self::end_peer(l, end);
        match frame {
            Frame::Hello { protocol, .. } => {
                assert_eq!(end, RELAY_END);
                assert_eq!(protocol, PROTOCOL_VERSION);
                self.send(l, end, Frame::Welcome { protocol: PROTOCOL_VERSION, relay: "R".into(), limits: None });
                self.open_sync(l, end);
            }
            Frame::Welcome { .. }
            | Frame::InSync
            | Frame::Directory { .. }
            | Frame::Authors { .. }
            | Frame::Receipts { .. } => {}
            Frame::Join { .. } => panic!("this harness never joins"),
            Frame::Summary { digest, .. } => {
                let heads = self.heads_of(peer);
                let ours = summary_digest(heads.iter().map(|(d, h)| (d, h.as_slice())));
                let reply = if ours == digest {
                    Frame::InSync
                } else {
                    doc_heads_frame(heads.iter().map(|(d, h)| (d, h.as_slice())))
                };
                self.send(l, end, reply);
            }
            Frame::DocHeads { entries } => {
                let heads = self.heads_of(peer);
                let plan = plan(heads.iter().map(|(d, h)| (d, h.as_slice())), &entries);
                for doc in plan.to_start().cloned().collect::<Vec<_>>() {
                    self.generate_to(l, end, &doc);
                }
            }
            Frame::Sync { doc: doc_id, message } => {
                let ends = self.links[l].as_mut().expect("link is connected");
                let doc = self.peers[peer].docs.entry(doc_id.clone()).or_insert_with(|| new_doc(peer));
                match ends[end].session.receive(&doc_id, doc, &message) {
                    Ok(outcome) => {
                        if let Some(reply) = outcome.reply {
                            self.send(l, end, reply);
                        }
                        if outcome.changed {
                            self.offer(peer, &doc_id, Some(l));
                        }
                    }
                    Err(error) => {
                        self.errors.push(format!("{} on link {l}: {error}", NAMES[peer]));
                        self.send(l, end, Frame::Error { code: error.error_code(), message: error.to_string() });
                    }
                }
            }
            Frame::Error { code, message } => self.errors.push(format!("{} got {code:?}: {message}", NAMES[peer])),
            Frame::DocRefused { doc, reason, .. } => {
                self.errors.push(format!("{} got a refusal of {doc}: {reason}", NAMES[peer]))
            }
        }
    }

    fn pending(&self) -> Vec<(usize, usize)> {
        let mut pending = Vec::new();
        for (l, ends) in self.links.iter().enumerate() {
            for (end, state) in ends.iter().flatten().enumerate() {
                if !state.outbox.is_empty() {
                    pending.push((l, end));
                }
            }
        }
        pending
    }

    /// Moves up to `max` bytes sent by `end` of link `l` to the other end and handles the frames.
    fn deliver(&mut self, l: usize, end: usize, max: usize) {
        let ends = self.links[l].as_mut().expect("link is connected");
        let n = max.min(ends[end].outbox.len());
        let chunk: Vec<u8> = ends[end].outbox.drain(..n).collect();
        let receiver = 1 - end;
        ends[receiver].decoder.push(&chunk);
        loop {
            let Some(ends) = self.links[l].as_mut() else { return };
            match ends[receiver].decoder.next_frame().expect("frames decode") {
                Some(frame) => self.handle(l, receiver, frame),
                None => return,
            }
        }
    }

    /// Delivers until nothing is in flight; in order, or at random with `rng`.
    fn run_until_quiescent(&mut self, mut rng: Option<&mut StdRng>, max_steps: usize) -> usize {
        for step in 0..max_steps {
            let pending = self.pending();
            if pending.is_empty() {
                return step;
            }
            let ((l, end), max) = match rng.as_deref_mut() {
                Some(rng) => (pending[rng.gen_range(0..pending.len())], rng.gen_range(1..=512)),
                None => (pending[0], usize::MAX),
            };
            self.deliver(l, end, max);
        }
        panic!("not quiescent after {max_steps} steps");
    }

    /// Asserts A, R and B hold the same documents at the same heads; returns the document count.
    fn assert_converged(&mut self) -> usize {
        let a = self.heads_of(A);
        assert_eq!(a, self.heads_of(R), "A and R differ");
        assert_eq!(a, self.heads_of(B), "A and B differ");
        assert!(self.errors.is_empty(), "errors: {:?}", self.errors);
        a.len()
    }
}

#[test]
fn concurrent_edits_on_two_nodes_converge_through_relay() {
    let mut net = Net::new();
    let doc = doc_id(1);
    net.create_doc(A, doc.clone());
    net.connect(0, Mode::Summary);
    net.connect(1, Mode::Summary);
    net.run_until_quiescent(None, 1_000);
    net.assert_converged();
    net.take_stats();

    // Both nodes edit the same document before either hears of the other's edit.
    for n in 0..3 {
        net.local_edit(A, &doc, n);
        net.local_edit(B, &doc, n);
    }
    net.run_until_quiescent(None, 1_000);
    let stats = net.take_stats();
    println!("concurrent edits (3 on A, 3 on B) converged with {} frames, {} bytes", stats.frames, stats.bytes);

    assert_eq!(net.assert_converged(), 1);
    let text = text_of(&net.peers[R].docs[&doc]);
    for n in 0..3 {
        assert!(text.contains(&format!("A{n} ")) && text.contains(&format!("B{n} ")), "{text}");
    }
    for l in 0..2 {
        let ends = net.links[l].as_mut().unwrap();
        for (end, state) in ends.iter_mut().enumerate() {
            let peer = Net::end_peer(l, end);
            let d = net.peers[peer].docs.get_mut(&doc).unwrap();
            assert!(state.session.in_sync(&doc, d), "{} not in sync on link {l}", NAMES[peer]);
        }
    }

    // Offline edits on both nodes, then reconnecting, converge the same way.
    net.disconnect(0);
    net.disconnect(1);
    net.local_edit(A, &doc, 10);
    net.local_edit(B, &doc, 10);
    net.connect(0, Mode::Summary);
    net.connect(1, Mode::Summary);
    net.run_until_quiescent(None, 1_000);
    net.assert_converged();
    let text = text_of(&net.peers[B].docs[&doc]);
    assert!(text.contains("A10 ") && text.contains("B10 "), "{text}");
}

#[test]
fn reconnect_with_persisted_state_and_nothing_new_is_cheap() {
    const DOCS: u8 = 10;
    const EDITS: usize = 50;
    let mut net = Net::new();
    for n in 0..DOCS {
        net.create_doc(A, doc_id(n));
        for e in 0..EDITS {
            edit(net.peers[A].docs.get_mut(&doc_id(n)).unwrap(), "A", e);
        }
    }
    net.connect(0, Mode::Summary);
    net.connect(1, Mode::Summary);
    net.run_until_quiescent(None, 10_000);
    assert_eq!(net.assert_converged(), DOCS as usize);
    let cold = net.take_stats();
    println!(
        "cold sync of {DOCS} documents ({} changes each) to R and B: {} frames, {} bytes ({} sync messages)",
        EDITS + 1,
        cold.frames,
        cold.bytes,
        cold.sync_frames
    );

    let reconnect = |net: &mut Net, mode: Mode, forget_states: bool| {
        net.disconnect(0);
        net.disconnect(1);
        if forget_states {
            for peer in &mut net.peers {
                peer.persisted.clear();
            }
        }
        net.connect(0, mode);
        net.connect(1, mode);
        net.run_until_quiescent(None, 10_000);
        net.assert_converged();
        net.take_stats()
    };

    // With the summary phase, nothing new means no Automerge message at all.
    let summary = reconnect(&mut net, Mode::Summary, false);
    println!(
        "reconnect, nothing new, summary phase: {} frames, {} bytes for 2 links ({} sync messages)",
        summary.frames, summary.bytes, summary.sync_frames
    );
    assert_eq!(summary.sync_frames, 0);
    assert_eq!(summary.frames, 2 * 6, "Hello, Welcome, 2 Summary, 2 InSync per link");

    // Forcing an Automerge sync of every document: persisted states keep it to one message each way.
    let persisted = reconnect(&mut net, Mode::SyncAll, false);
    let per_doc =
        |s: Stats| (s.sync_frames as f64 / (2.0 * f64::from(DOCS)), s.sync_bytes as f64 / (2.0 * f64::from(DOCS)));
    let (msgs, bytes) = per_doc(persisted);
    println!("reconnect, nothing new, per-document sync with persisted state: {msgs} messages, {bytes} bytes per document and link");
    assert!(msgs <= 2.0, "{msgs} messages per document");

    // The same with fresh sync states (persisted states thrown away).
    let fresh = reconnect(&mut net, Mode::SyncAll, true);
    let (fresh_msgs, fresh_bytes) = per_doc(fresh);
    println!("reconnect, nothing new, per-document sync with fresh state: {fresh_msgs} messages, {fresh_bytes} bytes per document and link");
    assert!(persisted.sync_bytes < fresh.sync_bytes);
}

#[test]
fn dropped_connections_and_random_delivery_still_converge() {
    for seed in 0..24u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut net = Net::new();
        let mut next_doc = 0u8;
        for _ in 0..2 {
            net.create_doc(A, doc_id(next_doc));
            next_doc += 1;
        }
        net.connect(0, Mode::Summary);
        net.connect(1, Mode::Summary);
        let (mut edits, mut drops) = (0, 0);
        for step in 0..300 {
            match rng.gen_range(0..100) {
                0..=54 => {
                    let pending = net.pending();
                    if !pending.is_empty() {
                        let (l, end) = pending[rng.gen_range(0..pending.len())];
                        let max = rng.gen_range(1..=512);
                        net.deliver(l, end, max);
                    }
                }
                55..=79 => {
                    // A node edits a document it already holds (connected or not).
                    let peer = if rng.gen_bool(0.5) { A } else { B };
                    let held: Vec<DocId> = net.heads_of(peer).into_iter().map(|(d, _)| d).collect();
                    if !held.is_empty() {
                        let doc = held[rng.gen_range(0..held.len())].clone();
                        net.local_edit(peer, &doc, step);
                        edits += 1;
                    }
                }
                80..=87 => {
                    let l = rng.gen_range(0..2);
                    if net.connected(l) {
                        net.disconnect(l);
                        drops += 1;
                    }
                }
                88..=96 => {
                    let l = rng.gen_range(0..2);
                    if !net.connected(l) {
                        net.connect(l, Mode::Summary);
                    }
                }
                _ => {
                    if next_doc < 5 {
                        net.create_doc(A, doc_id(next_doc));
                        next_doc += 1;
                    }
                }
            }
        }
        for l in 0..2 {
            if !net.connected(l) {
                net.connect(l, Mode::Summary);
            }
        }
        let steps = net.run_until_quiescent(Some(&mut rng), 100_000);
        let docs = net.assert_converged();
        assert_eq!(docs, usize::from(next_doc), "seed {seed}");
        if seed < 3 {
            println!("seed {seed}: {edits} edits, {drops} dropped connections, {docs} documents, {steps} deliveries to settle");
        }
    }
}

/// A node's document and the sync message that carries all of it to an empty peer.
fn message_with_changes() -> (AutoCommit, Vec<u8>) {
    let mut doc = seeded_doc(A, "agreement");
    for n in 0..5 {
        edit(&mut doc, "A", n);
    }
    let mut sender = PeerSession::new(Role::Node);
    let mut receiver = PeerSession::new(Role::Relay);
    let mut empty = new_doc(R);
    let Some(Frame::Sync { message: m1, .. }) = sender.generate(&doc_id(1), &mut doc).unwrap() else { panic!() };
    let reply = receiver.receive(&doc_id(1), &mut empty, &m1).unwrap().reply;
    let Some(Frame::Sync { message: m2, .. }) = reply else { panic!("receiver answers") };
    let reply = sender.receive(&doc_id(1), &mut doc, &m2).unwrap().reply;
    let Some(Frame::Sync { message: m3, .. }) = reply else { panic!("sender sends its changes") };
    assert!(!Message::decode(&m3).unwrap().changes.is_empty());
    (doc, m3)
}

/// Feeds `message` to a fresh session and an empty document; returns the result and whether the document changed.
fn receive_fresh(message: &[u8], limits: SyncLimits) -> (Result<ReceiveOutcome, SyncError>, bool) {
    let mut session = PeerSession::with_limits(Role::Relay, limits);
    let mut doc = new_doc(R);
    let result = session.receive(&doc_id(1), &mut doc, message);
    let changed = !doc.get_heads().is_empty();
    if result.is_err() {
        assert!(session.is_disabled(&doc_id(1)));
        assert!(session.persisted_state(&doc_id(1)).is_none());
    }
    (result, changed)
}

#[test]
fn corrupted_sync_message_is_refused_without_changing_the_document() {
    let (_, message) = message_with_changes();
    let (good, changed) = receive_fresh(&message, SyncLimits::default());
    assert!(good.unwrap().changed && changed, "the intact message applies");

    // A flipped byte inside the change data: the chunk checksum catches it.
    let mut corrupted = message.clone();
    let at = corrupted.len() - 20;
    corrupted[at] ^= 0x55;
    let (result, changed) = receive_fresh(&corrupted, SyncLimits::default());
    assert!(
        matches!(result, Err(SyncError::Refused { source: MessageCheckError::ChecksumMismatch, .. })),
        "{result:?}"
    );
    assert!(!changed);

    // Truncated and garbage messages do not decode.
    let (result, changed) = receive_fresh(&message[..message.len() / 2], SyncLimits::default());
    assert!(matches!(result, Err(SyncError::Decode { .. } | SyncError::Refused { .. })), "{result:?}");
    assert!(!changed);
    let (result, _) = receive_fresh(b"\x00garbage", SyncLimits::default());
    assert!(matches!(result, Err(SyncError::Decode { .. })), "{result:?}");

    // A disabled document stays disabled for the rest of the connection.
    let mut session = PeerSession::new(Role::Relay);
    let mut doc = new_doc(R);
    assert!(session.receive(&doc_id(1), &mut doc, &corrupted).is_err());
    assert!(matches!(session.receive(&doc_id(1), &mut doc, &message), Err(SyncError::Disabled { .. })));
    assert!(matches!(session.generate(&doc_id(1), &mut doc), Err(SyncError::Disabled { .. })));
}

#[test]
fn every_single_byte_corruption_is_handled_without_panic() {
    let (_, message) = message_with_changes();
    let mut outcomes = BTreeMap::<&str, usize>::new();
    for at in 0..message.len() {
        for flip in [0x01u8, 0x80, 0xff] {
            let mut corrupted = message.clone();
            corrupted[at] ^= flip;
            let (result, changed) = receive_fresh(&corrupted, SyncLimits::default());
            let kind = match &result {
                Ok(_) => "applied",
                Err(SyncError::Decode { .. }) => "decode error",
                Err(SyncError::Refused { .. }) => "refused by checks",
                Err(SyncError::Automerge { .. }) => "automerge error",
                Err(SyncError::Panicked { .. }) => panic!("automerge panicked at byte {at} ^ {flip:#x}"),
                Err(other) => panic!("unexpected {other}"),
            };
            if result.is_err() {
                assert!(!changed, "byte {at}: error but the document changed");
            }
            *outcomes.entry(kind).or_default() += 1;
        }
    }
    println!("single-byte corruptions of a {}-byte sync message: {outcomes:?}", message.len());
}

/// Encodes a V1 sync message with the given parts (Automerge's own encoder).
fn encode_message(heads: Vec<ChangeHash>, have: Vec<Have>, changes: Vec<Vec<u8>>) -> Vec<u8> {
    Message { heads, need: vec![], have, changes: ChunkList::from(changes), flags: None, version: MessageVersion::V1 }
        .encode()
}

fn bloom(entries: u64, bits_per_entry: u64, probes: u64, bits: usize) -> BloomFilter {
    let mut bytes = Vec::new();
    for v in [entries, bits_per_entry, probes] {
        check::put_leb128(&mut bytes, v);
    }
    bytes.extend(std::iter::repeat_n(0xffu8, bits));
    BloomFilter::try_from(bytes.as_slice()).unwrap()
}

/// An Automerge chunk with a valid checksum: magic, checksum, type, length, data.
fn chunk(chunk_type: u8, data: &[u8], checksum_over: Option<(u8, &[u8])>) -> Vec<u8> {
    let (hash_type, hash_data) = checksum_over.unwrap_or((chunk_type, data));
    let mut len = Vec::new();
    check::put_leb128(&mut len, hash_data.len() as u64);
    let hash = Sha256::new().chain_update([hash_type]).chain_update(&len).chain_update(hash_data).finalize();
    let mut out = vec![0x85, 0x6f, 0x4a, 0x83];
    out.extend_from_slice(&hash[..4]);
    out.push(chunk_type);
    check::put_leb128(&mut out, data.len() as u64);
    out.extend_from_slice(data);
    out
}

fn deflate(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut encoder = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
    encoder.write_all(data).unwrap();
    encoder.finish().unwrap()
}

#[test]
fn hostile_parameters_are_refused_before_automerge_sees_them() {
    let refused = |message: Vec<u8>, limits: SyncLimits| match receive_fresh(&message, limits) {
        (Err(SyncError::Refused { source, .. }), false) => source,
        other => panic!("expected a refusal, got {other:?}"),
    };
    let small = SyncLimits { max_inflated_bytes: 1 << 20, ..SyncLimits::default() };

    // Bloom filters: zero bits per entry divides by zero in Automerge; four billion
    // probes allocate 16 GiB on the next generate.
    let zero_bits = encode_message(vec![], vec![Have { last_sync: vec![], bloom: bloom(1, 0, 7, 0) }], vec![]);
    assert!(matches!(refused(zero_bits, small.clone()), MessageCheckError::BloomFilter { .. }));
    let many_probes =
        encode_message(vec![], vec![Have { last_sync: vec![], bloom: bloom(1, 10, u32::MAX as u64, 2) }], vec![]);
    assert!(matches!(refused(many_probes, small.clone()), MessageCheckError::BloomFilter { .. }));
    let haves = vec![Have::default(); 100];
    assert!(matches!(
        refused(encode_message(vec![], haves, vec![]), small.clone()),
        MessageCheckError::TooManyHaves { .. }
    ));

    // Unsorted heads would break Automerge's shared-heads bookkeeping (hand-encoded:
    // Automerge's own encoder refuses to write them).
    let mut unsorted = vec![0x42, 2];
    unsorted.extend_from_slice(&[2; 32]);
    unsorted.extend_from_slice(&[1; 32]);
    unsorted.extend_from_slice(&[0, 0, 0]); // no need, no have, no changes
    assert!(matches!(refused(unsorted, small.clone()), MessageCheckError::Unsorted { field: "heads" }));

    // A compressed change that inflates beyond the limit (2 MiB of zeros in about 2 KiB).
    let zeros = vec![0u8; 2 << 20];
    let bomb = chunk(2, &deflate(&zeros), Some((1, &zeros)));
    assert!(bomb.len() < 8 * 1024);
    assert!(matches!(
        refused(encode_message(vec![], vec![], vec![bomb]), small.clone()),
        MessageCheckError::InflatedTooLarge { .. }
    ));

    // A document chunk whose compressed column inflates beyond the limit.
    let column = deflate(&zeros);
    let mut data = vec![0, 0]; // no actors, no heads
    data.push(1); // one change column ...
    check::put_leb128(&mut data, (1 << 4) | 0b1000); // ... id 1, deflated
    check::put_leb128(&mut data, column.len() as u64);
    data.push(0); // no op columns
    data.extend_from_slice(&column);
    let document = chunk(0, &data, None);
    assert!(matches!(
        refused(encode_message(vec![], vec![], vec![document]), small.clone()),
        MessageCheckError::InflatedTooLarge { .. }
    ));

    // Chunk kinds sync never sends, bad magic, and chunks cut short.
    assert!(matches!(
        refused(encode_message(vec![], vec![], vec![chunk(3, b"bundle", None)]), small.clone()),
        MessageCheckError::UnsupportedChunk(3)
    ));
    let mut bad_magic = chunk(1, b"change", None);
    bad_magic[0] = 0;
    assert!(matches!(
        refused(encode_message(vec![], vec![], vec![bad_magic]), small.clone()),
        MessageCheckError::BadChunk { .. }
    ));
    let mut cut = chunk(1, b"change", None);
    cut.pop();
    assert!(matches!(refused(encode_message(vec![], vec![], vec![cut]), small), MessageCheckError::BadChunk { .. }));
}

#[test]
fn automerge_panic_is_contained_and_disables_the_document() {
    // The same zero-bit bloom filter, handed past the checks: Automerge panics
    // (remainder by zero) when it next generates a message. The session contains it.
    let mut doc = seeded_doc(A, "x");
    let mut session = PeerSession::new(Role::Node);
    let hostile = Message {
        heads: vec![],
        need: vec![],
        have: vec![Have { last_sync: vec![], bloom: bloom(1, 0, 7, 0) }],
        changes: ChunkList::empty(),
        flags: None,
        version: MessageVersion::V1,
    };
    let heads = doc.get_heads();
    let result = session.apply(&doc_id(1), &mut doc, hostile);
    match result {
        Err(SyncError::ReplyFailed { changed: false, source }) => {
            assert!(matches!(*source, SyncError::Panicked { during: "generating", .. }), "{source:?}");
        }
        other => panic!("expected a contained panic, got {other:?}"),
    }
    assert!(session.is_disabled(&doc_id(1)));
    assert!(session.persisted_state(&doc_id(1)).is_none());
    assert_eq!(doc.get_heads(), heads);
}

#[test]
fn summary_digests_ignore_order_and_plan_finds_every_difference() {
    let h = |n: u8| ChangeHash([n; 32]);
    let (d1, d2, d3, d4) = (doc_id(1), doc_id(2), doc_id(3), doc_id(4));
    let forward = [(&d1, &[h(1), h(2)][..]), (&d2, &[h(3)][..])];
    let backward = [(&d2, &[h(3)][..]), (&d1, &[h(2), h(1)][..])];
    assert_eq!(summary_digest(forward), summary_digest(backward));
    assert_ne!(summary_digest(forward), summary_digest([(&d1, &[h(1), h(2)][..])]));
    assert_ne!(summary_digest(forward), summary_digest([(&d1, &[h(1)][..]), (&d2, &[h(3)][..])]));
    assert_eq!(heads_digest(&[h(1), h(2)]), heads_digest(&[h(2), h(1)]));
    assert_eq!(summary_frame(forward), Frame::Summary { docs: 2, digest: summary_digest(forward) });

    // Ours: d1 (same), d2 (differs), d3 (only ours). Theirs: d1, d2, d4 (only theirs).
    let ours = [(&d1, &[h(1)][..]), (&d2, &[h(2)][..]), (&d3, &[h(3)][..])];
    let Frame::DocHeads { entries } = doc_heads_frame([(&d4, &[h(4)][..]), (&d2, &[h(9)][..]), (&d1, &[h(1)][..])])
    else {
        panic!()
    };
    assert_eq!(entries.iter().map(|(d, _)| d.clone()).collect::<Vec<_>>(), vec![d1.clone(), d2.clone(), d4.clone()]);
    let plan = plan(ours, &entries);
    assert_eq!(plan, SyncPlan { differ: vec![d2.clone()], only_ours: vec![d3.clone()], only_theirs: vec![d4] });
    assert_eq!(plan.to_start().cloned().collect::<Vec<_>>(), vec![d2.clone(), d3.clone()]);
    assert!(super::plan(ours, &[]).only_ours.len() == 3);

    // Their list repeats d2 (the last entry counts) and names d5 and d6: only the wanted ones are kept.
    let (d5, d6) = (doc_id(5), doc_id(6));
    let theirs = vec![
        (d2.clone(), heads_digest(&[h(9)])),
        (d6.clone(), heads_digest(&[h(6)])),
        (d5.clone(), heads_digest(&[h(5)])),
        (d2.clone(), heads_digest(&[h(2)])),
        (d5.clone(), heads_digest(&[h(5)])),
    ];
    let kept = plan_keeping(ours, &theirs, |d| *d != d6);
    assert_eq!(kept, SyncPlan { differ: vec![], only_ours: vec![d1.clone(), d3.clone()], only_theirs: vec![d5] });
    assert!(plan_keeping(ours, &theirs, |_| false).only_theirs.is_empty());
}

#[test]
fn a_phantom_document_leaves_no_sync_state_and_changes_are_reported_once() {
    let (mut a, mut b) = (PeerSession::new(Role::Node), PeerSession::new(Role::Relay));
    let id = doc_id(1);
    let mut doc = seeded_doc(A, "bara hos A");
    let message = match a.generate(&id, &mut doc).unwrap() {
        Some(Frame::Sync { message, .. }) => message,
        other => panic!("{other:?}"),
    };
    // B does not hold the document: it answers, and keeps no state for it.
    let mut empty = new_doc(B);
    let outcome = b.receive(&id, &mut empty, &message).unwrap();
    assert!(outcome.reply.is_some() && outcome.heads.is_empty());
    assert_eq!(b.docs().count(), 0);
    assert!(b.take_changed_shared_heads().is_empty(), "nothing came of it");
    // A's state was created: reported once, with its (empty) shared heads.
    assert_eq!(a.take_changed_shared_heads(), vec![(id.clone(), Some(Vec::new()))]);
    assert!(a.take_changed_shared_heads().is_empty());
    // The exchange still completes from fresh states on B's side.
    let mut to_b = outcome.reply;
    let mut to_a;
    for _ in 0..10 {
        to_a = match to_b.take() {
            Some(Frame::Sync { message, .. }) => a.receive(&id, &mut doc, &message).unwrap().reply,
            _ => None,
        };
        to_b = match to_a.take() {
            Some(Frame::Sync { message, .. }) => b.receive(&id, &mut empty, &message).unwrap().reply,
            _ => None,
        };
        if to_b.is_none() {
            break;
        }
    }
    assert_eq!(empty.get_heads(), doc.get_heads());
    let changed = b.take_changed_shared_heads();
    assert_eq!(changed, vec![(id.clone(), Some(doc.get_heads()))], "B now shares A's heads");
}

#[test]
fn persisted_state_round_trips_and_cannot_replace_a_live_one() {
    let mut doc = seeded_doc(A, "x");
    let mut other = new_doc(B);
    let (mut a, mut b) = (PeerSession::new(Role::Node), PeerSession::new(Role::Relay));
    let id = doc_id(1);
    let mut to_b = a.generate(&id, &mut doc).unwrap();
    for _ in 0..10 {
        let Some(Frame::Sync { message, .. }) = to_b.take() else { break };
        let Some(Frame::Sync { message, .. }) = b.receive(&id, &mut other, &message).unwrap().reply else { break };
        to_b = a.receive(&id, &mut doc, &message).unwrap().reply;
    }
    assert!(to_b.is_none());
    assert!(a.in_sync(&id, &mut doc) && b.in_sync(&id, &mut other));
    assert!(a.in_sync_at(&id, &doc.get_heads()) && b.in_sync_at(&id, &other.get_heads()));
    assert!(!a.in_sync_at(&id, &[]) && !a.in_sync_at(&doc_id(2), &doc.get_heads()));
    let saved = a.persisted_state(&id).unwrap();
    let mut restored = PeerSession::new(Role::Node);
    restored.restore_state(&id, &saved).unwrap();
    assert_eq!(restored.persisted_state(&id).unwrap(), saved);
    assert!(matches!(restored.restore_state(&id, &saved), Err(SyncError::StateInUse { .. })));
    assert!(matches!(
        PeerSession::new(Role::Node).restore_state(&id, b"nonsense"),
        Err(SyncError::PersistedState { .. })
    ));
}

#[test]
fn the_signature_bookkeeping_of_a_long_connection_holds_only_changes_in_flight() {
    let id = doc_id(7);
    let mut ours = seeded_doc(A, "Medborgarlöfte");
    let mut theirs = new_doc(B);
    let (mut sender, mut receiver) = (PeerSession::new(Role::Relay), PeerSession::new(Role::Node));
    // Exchanges messages until neither side has anything to say; returns the tips the sender accounted for.
    let exchange =
        |sender: &mut PeerSession, receiver: &mut PeerSession, ours: &mut AutoCommit, theirs: &mut AutoCommit| {
            let mut tips = Vec::new();
            let mut next = sender.generate(&id, ours).unwrap();
            tips.extend(sender.take_sent_tips(&id, ours));
            for _ in 0..10 {
                let Some(Frame::Sync { message, .. }) = next.take() else { break };
                let reply = receiver.receive(&id, theirs, &message).unwrap().reply;
                let Some(Frame::Sync { message, .. }) = reply else { break };
                next = sender.receive(&id, ours, &message).unwrap().reply;
                tips.extend(sender.take_sent_tips(&id, ours));
            }
            tips
        };
    exchange(&mut sender, &mut receiver, &mut ours, &mut theirs);
    for n in 0..50 {
        edit(&mut ours, "A", n);
        let change = ours.get_heads();
        let tips = exchange(&mut sender, &mut receiver, &mut ours, &mut theirs);
        let tip_hashes: Vec<ChangeHash> = tips.iter().map(|(hash, _)| *hash).collect();
        assert_eq!(tip_hashes, change, "each new change is accounted for once, when it is sent");
        assert!(
            sender.signatures_sent.get(&id).map_or(0, |done| done.len()) <= 1,
            "acknowledged changes are forgotten, not kept for the whole connection"
        );
    }
    assert_eq!(ours.get_heads(), theirs.get_heads());
}

/// A document sent whole from stored bytes ([`PeerSession::start_whole`]):
/// a fresh node takes it in with Automerge, and the relay takes the node's
/// acknowledgement without the document ([`PeerSession::settle_whole`]),
/// leaving exactly the state Automerge leaves with it, with nothing to reply.
#[test]
fn a_document_sent_whole_is_acknowledged_without_it_as_automerge_would_with_it() {
    let id = doc_id(7);
    let mut relay_doc = seeded_doc(A, "Medborgarlöfte");
    for n in 0..5 {
        edit(&mut relay_doc, "a", n);
    }
    let snapshot_heads = relay_doc.get_heads();
    let mut other = relay_doc.fork().with_actor(ActorId::from(&[9u8; 16][..]));
    edit(&mut other, "b", 0);
    relay_doc.merge(&mut other).unwrap();
    // As a store holds it: a snapshot and an increment after it.
    let mut snapshot = relay_doc.fork_at(&snapshot_heads).unwrap();
    let increment: Vec<u8> =
        relay_doc.get_changes(&snapshot_heads).iter().flat_map(|c| c.raw_bytes().to_vec()).collect();
    let whole = StoredWhole {
        heads: relay_doc.get_heads(),
        chunks: vec![snapshot.save(), increment],
        tips: document_tips(&mut snapshot),
    };

    let mut relay = PeerSession::new(Role::Relay);
    let Some(Frame::Sync { message, .. }) = relay.start_whole(&id, &whole) else { panic!("no frame") };
    assert!(relay.start_whole(&id, &whole).is_none(), "once: the document has a state now");
    assert!(relay.awaits_whole_ack(&id));
    let mut node = PeerSession::new(Role::Node);
    let mut node_doc = AutoCommit::new();
    let outcome = node.receive(&id, &mut node_doc, &message).unwrap();
    assert!(outcome.changed);
    assert_eq!(node_doc.get_heads(), relay_doc.get_heads(), "the node has the whole document");
    assert_eq!(text_of(&node_doc), text_of(&relay_doc));
    let Some(Frame::Sync { message: ack, .. }) = outcome.reply else { panic!("the node acknowledges") };

    // What Automerge does with the document.
    let mut expected = relay.states[&id].clone();
    relay_doc.sync().receive_sync_message(&mut expected, Message::decode(&ack).unwrap()).unwrap();
    assert!(relay_doc.sync().generate_sync_message(&mut expected).is_none(), "nothing to reply");

    // Anything but an acknowledgement of the current heads is left to the full path.
    assert_eq!(relay.settle_whole(&id, &ack, &snapshot_heads), None, "the document moved on meanwhile");
    assert_eq!(relay.settle_whole(&id, b"not a message", &relay_doc.get_heads()), None);
    assert_eq!(relay.settle_whole(&doc_id(8), &ack, &relay_doc.get_heads()), None, "not sent whole");
    assert!(relay.awaits_whole_ack(&id), "nothing changed");

    assert_eq!(relay.settle_whole(&id, &ack, &relay_doc.get_heads()), Some(()));
    assert_eq!(relay.states[&id], expected);
    assert!(!relay.awaits_whole_ack(&id));
    assert_eq!(relay.settle_whole(&id, &ack, &relay_doc.get_heads()), None, "once");
    assert_eq!(relay.take_changed_shared_heads().len(), 1);
}

/// A message that makes an empty document whole hands back the bytes it was
/// loaded from, for a store to keep instead of saving the document again:
/// only when they load to exactly that document (nothing held back for
/// missing parents, whose signatures nobody checked) and are a document
/// chunk with few changes after it (not loose changes every load would replay).
#[test]
fn a_document_received_whole_hands_back_its_bytes_only_if_they_are_exactly_it() {
    let id = doc_id(7);
    let mut full = seeded_doc(A, "Medborgarlöfte");
    let snapshot_heads = full.get_heads();
    for n in 0..3 {
        edit(&mut full, "a", n);
    }
    let mut snapshot = full.fork_at(&snapshot_heads).unwrap();
    let increments: Vec<Vec<u8>> = full.get_changes(&snapshot_heads).iter().map(|c| c.raw_bytes().to_vec()).collect();
    let heads = full.get_heads();
    let message = |chunks: Vec<Vec<u8>>| {
        Message {
            heads: heads.clone(),
            need: Vec::new(),
            have: Vec::new(),
            changes: chunks.into(),
            flags: None,
            version: MessageVersion::V2,
        }
        .encode()
    };
    let receive = |into: &mut AutoCommit, message: &[u8]| {
        let outcome = PeerSession::new(Role::Node).receive(&id, into, message).unwrap();
        assert!(outcome.changed);
        outcome.received_whole
    };

    // A snapshot and its increments, as a relay sends a document whole.
    let chunks: Vec<Vec<u8>> = std::iter::once(snapshot.save()).chain(increments.iter().cloned()).collect();
    let mut fresh = AutoCommit::new();
    let kept = receive(&mut fresh, &message(chunks.clone())).expect("kept as received");
    assert_eq!(kept, chunks.concat());
    let mut loaded = AutoCommit::load(&kept).unwrap();
    assert_eq!((loaded.get_heads(), text_of(&loaded)), (full.get_heads(), text_of(&full)));

    // A change held back for a missing parent would travel with the bytes
    // unverified, and apply once its parent arrives: nothing is handed back.
    let mut later = full.clone();
    edit(&mut later, "a", 9);
    edit(&mut later, "a", 10);
    let orphan = later.get_changes(&full.get_heads()).last().unwrap().raw_bytes().to_vec();
    let mut fresh = AutoCommit::new();
    assert_eq!(receive(&mut fresh, &message(vec![full.save(), orphan])), None);
    assert_eq!(fresh.get_heads(), full.get_heads(), "the held-back change is not in the document");

    // Loose changes only (no document chunk), or into a document already
    // held: stored the usual way.
    let loose: Vec<Vec<u8>> = full.get_changes(&[]).iter().map(|c| c.raw_bytes().to_vec()).collect();
    let mut fresh = AutoCommit::new();
    assert_eq!(receive(&mut fresh, &message(loose)), None);
    assert_eq!(fresh.get_heads(), heads);
    let mut held = snapshot.fork();
    let whole_doc = full.save();
    assert_eq!(receive(&mut held, &message(vec![whole_doc])), None);
    assert_eq!(held.get_heads(), heads);

    // More change chunks after the document chunk than a store keeps rows.
    let mut long = snapshot.fork();
    for n in 0..=whole::MAX_CHANGE_CHUNKS_KEPT {
        edit(&mut long, "b", n);
    }
    let loose: Vec<Vec<u8>> = long.get_changes(&snapshot_heads).iter().map(|c| c.raw_bytes().to_vec()).collect();
    let bytes: Vec<u8> = std::iter::once(snapshot.save()).chain(loose).collect::<Vec<_>>().concat();
    assert!(!whole::keepable_as_received(&bytes));
    assert!(whole::keepable_as_received(&long.save()));
    assert!(!whole::keepable_as_received(&long.save()[..100]), "a cut chunk");
}

/// Two peers edit and sync one document with Automerge over 40 seeded runs
/// of random steps (edits, messages generated and delivered in order,
/// reconnects that lose what is in flight and restart from persisted
/// states), then deliver until both are quiet and must agree. Every delivery
/// goes through `deliver` (which applies it with Automerge); returns the sum
/// of what `deliver` returned.
fn random_exchanges(mut deliver: impl FnMut(&mut AutoCommit, &mut State, Message, u64) -> usize) -> usize {
    let mut counted = 0;
    for seed in 0..40u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut docs = [seeded_doc(A, "Åtgärdsplan"), new_doc(B)];
        let mut states = [State::new(), State::new()];
        let mut in_flight: [VecDeque<Message>; 2] = [VecDeque::new(), VecDeque::new()];
        for step in 0..120 {
            let side = rng.gen_range(0..2);
            match rng.gen_range(0..10) {
                0 if !docs[side].get_heads().is_empty() && docs[side].get(ROOT, "text").unwrap().is_some() => {
                    edit(&mut docs[side], NAMES[side], step)
                }
                1..=3 => {
                    if let Some(message) = docs[side].sync().generate_sync_message(&mut states[side]) {
                        in_flight[1 - side].push_back(message);
                    }
                }
                4 if rng.gen_range(0..4) == 0 => {
                    // A reconnect: what is in flight is lost, the states restart from what is persisted.
                    in_flight = [VecDeque::new(), VecDeque::new()];
                    states = states.map(|state| State::decode(&state.encode()).unwrap());
                }
                _ => {
                    let Some(message) = in_flight[side].pop_front() else { continue };
                    counted += deliver(&mut docs[side], &mut states[side], message, seed);
                }
            }
        }
        // Then in order until both are quiet: the last messages are acknowledgements.
        for _ in 0..20 {
            let mut quiet = true;
            for side in [A, R] {
                while let Some(message) = in_flight[side].pop_front() {
                    counted += deliver(&mut docs[side], &mut states[side], message, seed);
                }
                if let Some(message) = docs[side].sync().generate_sync_message(&mut states[side]) {
                    in_flight[1 - side].push_back(message);
                    quiet = false;
                }
            }
            if quiet {
                break;
            }
        }
        assert_eq!(docs[0].get_heads(), docs[1].get_heads(), "seed {seed}");
    }
    counted
}

/// [`acknowledged`] against Automerge itself over [`random_exchanges`]:
/// wherever the shortcut applies, the state it leaves is the state
/// Automerge's receive and generate leave, with nothing to reply; and it
/// does apply to the acknowledgements of a settled exchange.
#[test]
fn an_acknowledgement_of_our_heads_leaves_the_state_automerge_leaves() {
    let applied = random_exchanges(|doc, state, message, seed| {
        let heads = doc.get_heads();
        let shortcut = acknowledged(state, &message, &heads);
        doc.sync().receive_sync_message(state, message).unwrap();
        let Some(settled) = shortcut else { return 0 };
        let mut expected = state.clone();
        assert!(doc.sync().generate_sync_message(&mut expected).is_none(), "seed {seed}");
        assert_eq!(settled, expected, "seed {seed}");
        assert_eq!(doc.get_heads(), heads);
        1
    });
    assert!(applied > 80, "the shortcut applied {applied} times");
}

/// [`receive_message`] against Automerge's `receive_sync_message` over
/// [`random_exchanges`]: with nothing sent in flight it takes its own way,
/// and leaves the same document heads and the same state.
#[test]
fn receiving_with_nothing_sent_is_what_automerge_does() {
    let own_way = random_exchanges(|doc, state, message, seed| {
        let nothing_sent = state.sent_hashes.is_empty();
        let (mut our_doc, mut our_state) = (doc.clone(), state.clone());
        receive_message(&mut our_doc, &mut our_state, message.clone()).unwrap();
        doc.sync().receive_sync_message(state, message).unwrap();
        assert_eq!(our_doc.get_heads(), doc.get_heads(), "seed {seed}");
        assert_eq!(&our_state, state, "seed {seed}");
        usize::from(nothing_sent)
    });
    assert!(own_way > 200, "its own way {own_way} times");
}
