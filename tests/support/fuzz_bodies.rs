//! The bodies of the fuzz targets, shared by the libFuzzer targets in `fuzz/`
//! (`cargo fuzz run <target>`) and the seeded mutation tests in
//! `tests/fuzz_decoders.rs` that run in every `cargo test`.
//!
//! Each body takes arbitrary bytes and must never panic: hostile input is
//! answered with an error. Where a value decodes, the body also checks that
//! it encodes back to something that decodes to the same value.

#![allow(dead_code)]

use automerge::{AutoCommit, ChangeHash};
use samverkan_shared::acceptance::{self, AuthorPolicy, AuthorRule};
use samverkan_shared::authorship;
use samverkan_shared::bundle::Bundle;
use samverkan_shared::directory::{EnrollmentDirectory, Member, MemberKind, SignedDirectory};
use samverkan_shared::identity::{NodeId, NodeKey};
use samverkan_shared::ids::DocId;
use samverkan_shared::markdown;
use samverkan_shared::model::Document;
use samverkan_shared::org::{Directory, OrgId};
use samverkan_shared::sync::{MemoryDocs, SignedChange, SyncConnection, SyncLimits};
use samverkan_shared::wire::{Frame, FrameDecoder, PROTOCOL_VERSION};

/// A fuzz target's body.
pub type Body = fn(&[u8]);

/// The fuzz targets by name, as in `fuzz/fuzz_targets/<name>.rs`.
pub const TARGETS: [(&str, Body); 6] = [
    ("wire_frame", wire_frame),
    ("relay_sync", relay_sync),
    ("bundle_import", bundle_import),
    ("bundle_docs", bundle_docs),
    ("markdown_import", markdown_import),
    ("signed_directory", signed_directory),
];

/// Small frame limit so that length prefixes are often in range.
const MAX_FRAME: usize = 1 << 16;

/// The wire decoder: bytes pushed in chunks (sizes from the first byte), every
/// frame decoded until an error; each decoded frame round-trips.
pub fn wire_frame(data: &[u8]) {
    let Some((&chunk, rest)) = data.split_first() else { return };
    let chunk = usize::from(chunk % 32) + 1;
    let mut decoder = FrameDecoder::with_max_frame(MAX_FRAME);
    for piece in rest.chunks(chunk) {
        decoder.push(piece);
        loop {
            match decoder.next_frame() {
                Ok(Some(frame)) => {
                    let bytes = frame.encode();
                    let again = Frame::decode_payload(&bytes[4..]).expect("an encoded frame decodes");
                    assert_eq!(again, frame, "frame round trip");
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
    let _ = Frame::decode_payload(rest);
}

/// Document ids the relay-sync target addresses.
pub fn fuzz_doc_ids() -> [DocId; 3] {
    ["00000000000000000000000000000001", "00000000000000000000000000000002", "0123456789abcdef0123456789abcdef"]
        .map(|s| s.parse().expect("valid doc id"))
}

/// Reads a document the relay just kept through the model, as the relay
/// reads a (possibly hostile) document's parties and view.
fn read_through_model(docs: &mut MemoryDocs, id: &DocId) {
    if let Some(model) = docs.document_mut(id) {
        let _ = model.parties();
        let _ = model.view();
    }
}

/// Sync message handling on the relay: a handshake, then records
/// `[tag][len: u16 le][bytes]`; tag % 3 = 0 is an Automerge sync message for one
/// of three documents, 1 a frame payload through the decoder, 2 a local change
/// notification. Stops at the first error, as the relay closes the connection.
pub fn relay_sync(data: &[u8]) {
    let ids = fuzz_doc_ids();
    // The shared in-memory driver, with the checks every driver gets (authors' signatures through acceptance).
    let mut docs = MemoryDocs::new();
    let mut conn = SyncConnection::relay("fuzz-relay");
    let hello =
        Frame::Hello { protocol: PROTOCOL_VERSION, software: "fuzz".into(), node: "ab".repeat(32), directory: None };
    conn.on_frame(hello, &mut docs).expect("handshake");
    conn.begin(&mut docs).expect("begin");
    let mut heads: Vec<Vec<ChangeHash>> = vec![Vec::new(); ids.len()];
    let mut rest = data;
    while rest.len() >= 3 {
        let tag = rest[0];
        let len = usize::from(u16::from_le_bytes([rest[1], rest[2]])).min(rest.len() - 3);
        let body = &rest[3..3 + len];
        rest = &rest[3 + len..];
        let doc = ids[usize::from(tag / 3) % ids.len()].clone();
        let result = match tag % 3 {
            0 => conn.on_frame(Frame::Sync { doc, message: body.to_vec() }, &mut docs).map(|_| ()),
            1 => match Frame::decode_payload(body) {
                Ok(frame) => conn.on_frame(frame, &mut docs).map(|_| ()),
                Err(_) => continue,
            },
            _ => conn.on_local_change(&doc, &mut docs),
        };
        let _ = conn.take_outbox();
        if result.is_err() {
            return;
        }
        for (id, before) in ids.iter().zip(heads.iter_mut()) {
            let now = docs.heads_of(id);
            if now != *before {
                read_through_model(&mut docs, id);
                *before = now;
            }
        }
        let _ = conn.is_settled(&mut docs);
    }
}

/// One relay-sync record (see [`relay_sync`]).
pub fn relay_record(tag: u8, body: &[u8]) -> Vec<u8> {
    let len = u16::try_from(body.len()).expect("record fits");
    let mut out = vec![tag];
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(body);
    out
}

/// The enrollment directory the bundle targets check authors against: the
/// fuzz key ([`fuzz_relay_key`]) enrolled as a node of Flen.
pub fn fuzz_directory() -> EnrollmentDirectory {
    let key = fuzz_relay_key();
    let mut directory = EnrollmentDirectory::default();
    directory
        .enroll(Member {
            key: NodeId::from_bytes(&key.verifying_key().to_bytes()).expect("valid key"),
            kind: MemberKind::Node,
            org: OrgId::new("flen-kommun").expect("valid org"),
            name: "fuzz".into(),
            role: None,
            enrolled_at: chrono::DateTime::UNIX_EPOCH,
            revoked_at: None,
        })
        .expect("enrolls");
    directory
}

/// Bundle import: decode (magic, version, header, SHA-256), then apply every
/// document through the node's acceptance path ([`acceptance::apply_bundle_doc`]:
/// chunk checks, bounded inflation, Automerge under panic isolation, schema,
/// parties, authors and signatures), in memory.
pub fn bundle_import(data: &[u8]) {
    let Ok(bundle) = Bundle::decode(data) else { return };
    let again = Bundle::decode(&bundle.encode()).expect("an encoded bundle decodes");
    assert_eq!(again, bundle, "bundle round trip");
    let authors = AuthorPolicy::new(std::sync::Arc::new(fuzz_directory()), AuthorRule::EnrolledNode);
    let limits = SyncLimits { max_inflated_bytes: 1 << 24, max_change_bytes: 1 << 22, ..SyncLimits::default() };
    let org = OrgId::new("flen-kommun").expect("valid org");
    for item in &bundle.docs {
        let Ok(mut doc) = Document::from_automerge(item.id.clone(), AutoCommit::new()) else { continue };
        if acceptance::apply_bundle_doc(&mut doc, &item.data, &item.signatures, &authors, &limits, &org).is_ok() {
            let _ = doc.view();
            let _ = doc.parties();
        }
    }
}

/// Bundle import past the checksum: the bytes are one document's Automerge
/// data in an otherwise valid bundle (random bytes rarely pass the SHA-256),
/// with the signatures of the seed documents' changes.
pub fn bundle_docs(data: &[u8]) {
    let origin = samverkan_shared::bundle::BundleOrigin {
        node: "ab".repeat(32),
        org: "flen-kommun".into(),
        name: "fuzz".into(),
        created: chrono::DateTime::UNIX_EPOCH,
    };
    let mut doc = AutoCommit::new();
    let signatures = match doc.load_incremental(data) {
        Ok(_) => sign_all(&fuzz_doc_ids()[0], &mut doc),
        Err(_) => Vec::new(),
    };
    let doc = samverkan_shared::bundle::BundleDoc { id: fuzz_doc_ids()[0].clone(), data: data.to_vec(), signatures };
    bundle_import(&Bundle { origin, relay_key: None, directory: None, docs: vec![doc], receipts: vec![] }.encode());
}

/// The fuzz key's signatures proving every change of document `id` (`doc`),
/// as its author would send them: one per tip ([`authorship::author_tips`]).
pub fn sign_all(id: &DocId, doc: &mut AutoCommit) -> Vec<SignedChange> {
    let key = NodeKey::from_signing_key(fuzz_relay_key());
    let changes = doc.get_changes(&[]);
    authorship::author_tips(changes.iter()).iter().map(|(hash, _)| (*hash, authorship::sign(&key, id, hash))).collect()
}

/// Markdown import (front matter or plain text) and, when it succeeds, export
/// of the result and import again.
pub fn markdown_import(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let directory = Directory::sodermanland();
    let Ok(imported) = markdown::import(&text, &directory, None) else { return };
    let _ = format!("{imported:?}");
}

/// The relay's key for the signed-directory target (a fixed test key).
pub fn fuzz_relay_key() -> ed25519_dalek::SigningKey {
    ed25519_dalek::SigningKey::from_bytes(&[7u8; 32])
}

/// Signature verification of the enrollment directory (as a node does with the
/// pinned relay key) and join-code parsing.
pub fn signed_directory(data: &[u8]) {
    let key = fuzz_relay_key();
    let relay = NodeId::from_bytes(&key.verifying_key().to_bytes()).expect("valid key");
    if let Ok(signed) = SignedDirectory::decode(data) {
        let _ = signed.verify(&relay);
        let _ = signed.verify(&signed.relay);
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = text.parse::<samverkan_shared::directory::JoinCode>();
    }
}
