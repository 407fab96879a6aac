//! Batch signatures (protocol 5): one signature per author and message covers
//! the author's earlier changes, and what an enrolled but malicious node can
//! and cannot do with that. Real relay, real nodes and a hand-driven hostile
//! client over QUIC on 127.0.0.1, SQLite in temporary directories, bounded
//! timeouts everywhere.

use samverkan::net::endpoint::{self, Limits};
use samverkan::net::framed::{self, FramedRecv, FramedSend};
use samverkan::net::tls::TlsIdentity;
use samverkan::node::node::Node;
use samverkan::node::sync::{self};
use samverkan::relay::server::RelayHandle;
use samverkan::shared::authorship;
use samverkan::shared::automerge::{self, transaction::Transactable, AutoCommit, Change, ChangeHash};
use samverkan::shared::bundle::Bundle;
use samverkan::shared::identity::{NodeId, NodeKey};
use samverkan::shared::ids::DocId;
use samverkan::shared::model::{DocKind, DocumentContent};
use samverkan::shared::sync::SignedChange;
use samverkan::shared::wire::{Frame, RefusalKind, PROTOCOL_VERSION};

#[path = "support/relay_net.rs"]
mod relay_net;
use relay_net::{bounded, enrolled, org, start_relay, target, LIMIT};

async fn sync(node: &mut Node, relay: &RelayHandle) -> sync::SyncReport {
    let report = bounded("sync", sync::sync_once(node, &target(relay), LIMIT)).await.expect("sync");
    assert!(report.refused.is_empty(), "{:?}", report.refused);
    report
}

/// A document of `node`'s organisation with `edits` more changes after its first.
fn document_with_edits(node: &mut Node, edits: usize) -> DocId {
    let mut content = DocumentContent::new(DocKind::CitizenPromise, "Trygghetslöfte");
    content.parties = vec![node.org().clone()];
    let id = node.create(content).unwrap();
    for k in 0..edits {
        node.edit(&id, "title", |e| e.set_title(&format!("Trygghetslöfte, version {k}"))).unwrap();
    }
    id
}

/// The stored signatures among every change of `doc` on `node`.
fn stored_signatures(node: &Node, doc: &DocId) -> Vec<SignedChange> {
    let mut d = node.document(doc).unwrap();
    let all: Vec<ChangeHash> = d.automerge_mut().get_changes(&[]).iter().map(Change::hash).collect();
    node.store().signatures(&all).unwrap()
}

/// A hand-driven, authenticated client holding `key`, past `Hello`.
async fn raw_client(relay: &RelayHandle, key: &NodeKey) -> (quinn::Connection, FramedSend, FramedRecv) {
    let identity = TlsIdentity::new(key.signing_key(), "test-client").unwrap();
    let client = endpoint::client_endpoint(relay.local_addr()).unwrap();
    let limits = Limits::default();
    let connecting = endpoint::connect(&client, relay.local_addr(), &identity, *relay.relay_key().as_bytes(), &limits);
    let conn = bounded("connect", connecting).await.unwrap();
    let (mut send, recv) = bounded("open", framed::open(&conn, &Limits::default())).await.unwrap();
    let hello = Frame::Hello {
        protocol: PROTOCOL_VERSION,
        software: "hostile".into(),
        node: key.node_id().to_string(),
        directory: None,
    };
    send.send(&hello).await.unwrap();
    (conn, send, recv)
}

/// A sync message carrying exactly `changes`, announcing `heads`.
fn message_with(changes: &[Change], heads: Vec<ChangeHash>) -> Vec<u8> {
    let chunks: Vec<Vec<u8>> = changes.iter().map(|c| c.raw_bytes().to_vec()).collect();
    automerge::sync::Message {
        heads,
        need: Vec::new(),
        have: Vec::new(),
        changes: chunks.into(),
        flags: None,
        version: automerge::sync::MessageVersion::V1,
    }
    .encode()
}

/// Sends `Authors` (if any) and a `Sync` frame of `changes` for `doc`, and
/// returns the relay's refusal of it (the connection goes on), or `None` if the
/// relay answered with a `Sync` frame and no refusal.
async fn offer(
    send: &mut FramedSend,
    recv: &mut FramedRecv,
    doc: &DocId,
    changes: &[Change],
    signatures: Vec<SignedChange>,
) -> Option<(RefusalKind, String)> {
    if !signatures.is_empty() {
        send.send(&Frame::Authors { doc: doc.clone(), entries: signatures }).await.unwrap();
    }
    let heads = changes.last().map(|c| vec![c.hash()]).unwrap_or_default();
    send.send(&Frame::Sync { doc: doc.clone(), message: message_with(changes, heads) }).await.unwrap();
    bounded("the relay's answer", async {
        loop {
            match recv.recv().await {
                Ok(Some(Frame::DocRefused { doc: d, kind, reason, .. })) if d == *doc => return Some((kind, reason)),
                Ok(Some(Frame::Sync { doc: d, .. })) if d == *doc => return None,
                Ok(Some(Frame::Error { code, message })) => panic!("the connection was closed: {code:?} {message}"),
                Ok(Some(_)) => continue,
                other => panic!("the connection ended: {other:?}"),
            }
        }
    })
    .await
}

fn refused(answer: Option<(RefusalKind, String)>, what: &str) -> String {
    match answer {
        Some((RefusalKind::ChangesRefused, reason)) => reason,
        other => panic!("{what}: expected the changes to be refused, got {other:?}"),
    }
}

/// A change under `actor`'s name on top of `doc` (which is changed); anyone
/// can write one, only `actor` can sign it. It writes a key the schema ignores.
fn change_as(actor: NodeId, doc: &mut AutoCommit, value: &str) -> Change {
    doc.set_actor(actor.actor_id());
    doc.put(automerge::ROOT, "test_note", value).unwrap();
    let hash = doc.commit().unwrap();
    doc.get_change_by_hash(&hash).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_signature_per_message_proves_every_change_through_the_relay_and_in_bundles() {
    let root = tempfile::tempdir().unwrap();
    let relay = start_relay(&root.path().join("relay")).await;
    let mut writer = enrolled(root.path(), &relay, "writer", "Eskilstuna");
    let mut reader = enrolled(root.path(), &relay, "reader", "Eskilstuna");
    // Two nodes that sync once, for the directory, and then get the document by bundle alone.
    let mut offline = enrolled(root.path(), &relay, "offline", "Eskilstuna");
    sync(&mut offline, &relay).await;
    let mut late = enrolled(root.path(), &relay, "late", "Eskilstuna");
    sync(&mut late, &relay).await;

    let id = document_with_edits(&mut writer, 40);
    sync(&mut writer, &relay).await;
    for k in 0..10 {
        writer.edit(&id, "body", |e| e.set_body(&format!("Text {k}"))).unwrap();
    }
    sync(&mut writer, &relay).await;
    sync(&mut reader, &relay).await;
    let mut got = reader.document(&id).unwrap();
    let mut sent = writer.document(&id).unwrap();
    assert_eq!(got.heads(), sent.heads());
    let changes = got.automerge_mut().get_changes(&[]).len();
    assert_eq!(changes, 51);
    // Two messages of the writer's, one signature each: the reader keeps those, no more.
    let kept = stored_signatures(&reader, &id);
    assert!(kept.len() <= 2, "{} signatures kept for {changes} changes", kept.len());

    // A bundle from the reader (who holds only those signatures) proves every change.
    let bundle = Bundle::decode(&reader.export_bundle(None, Some(offline.org())).unwrap().encode()).unwrap();
    let carried = &bundle.docs.iter().find(|d| d.id == id).unwrap().signatures;
    assert_eq!(carried.len(), 1, "one tip signature for the writer's 51 changes");
    let reports = offline.import_bundle(&bundle).unwrap();
    assert!(reports.iter().all(|r| r.error.is_none()), "{reports:?}");
    assert_eq!(offline.document(&id).unwrap().heads(), sent.heads());

    // Without the tip's signature the bundle proves nothing: refused whole.
    let mut stripped = bundle.clone();
    stripped.docs.iter_mut().for_each(|d| d.signatures.clear());
    let reports = late.import_bundle(&stripped).unwrap();
    let report = reports.iter().find(|r| r.id == id).unwrap();
    assert!(report.error.as_deref().is_some_and(|e| e.contains("covering")), "{report:?}");
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enrolled_node_cannot_pass_off_changes_its_signatures_do_not_cover() {
    let root = tempfile::tempdir().unwrap();
    let relay = start_relay(&root.path().join("relay")).await;
    let mut honest = enrolled(root.path(), &relay, "honest", "Eskilstuna");
    let mallory = NodeKey::generate();
    relay.enroll_node(mallory.node_id(), org("Eskilstuna"), "mallory").unwrap();
    let id = document_with_edits(&mut honest, 3);
    sync(&mut honest, &relay).await;
    let relay_heads = honest.document(&id).unwrap().heads();
    // What an enrolled node of the same organisation holds after a sync.
    let mut copy = honest.document(&id).unwrap().into_automerge();
    // The honest node's signature of its latest change, as it sent it to the relay (ed25519 is deterministic).
    let honest_key = honest.key();
    let honest_tip = {
        let changes = copy.get_changes(&[]);
        let tip = authorship::author_tips(changes.iter())[0].0;
        (tip, authorship::sign(honest_key, &id, &tip))
    };
    let (me, them) = (mallory.node_id(), honest.node_id());
    let (_conn, mut send, mut recv) = raw_client(&relay, &mallory).await;

    // 1. Its own two changes with a signature over the first only: the second is not covered.
    let mut doc = copy.fork();
    let first = change_as(me, &mut doc, "Torshälla");
    let second = change_as(me, &mut doc, "Eskilstuna");
    let only_first = vec![(first.hash(), authorship::sign(&mallory, &id, &first.hash()))];
    let reason = refused(offer(&mut send, &mut recv, &id, &[first, second.clone()], only_first).await, "uncovered");
    assert!(reason.contains(&second.hash().to_string()) && reason.contains("covering"), "{reason}");

    // 2. A change in the honest node's name, forged by mallory: with no signature,
    // with the honest node's real signature of its latest change (an ancestor, not a
    // descendant: it covers what came before it, never what is built on it), with
    // mallory's own signature, and under a change of mallory's that mallory signs
    // (a signature covers its signer's changes only). The honest node can never have
    // signed a change built on the forgery: it accepts a change in its own name only
    // with its own covering signature, which mallory cannot make, so no signature of
    // the honest node covers the forgery, now or later.
    let mut doc = copy.fork();
    let forged = change_as(them, &mut doc, "I någon annans namn");
    let on_top = change_as(me, &mut doc, "Ovanpå förfalskningen");
    let attempts: Vec<(Vec<Change>, Vec<SignedChange>)> = vec![
        (vec![forged.clone()], vec![]),
        (vec![forged.clone()], vec![honest_tip]),
        (vec![forged.clone()], vec![(forged.hash(), authorship::sign(&mallory, &id, &forged.hash()))]),
        (vec![forged.clone(), on_top.clone()], vec![(on_top.hash(), authorship::sign(&mallory, &id, &on_top.hash()))]),
    ];
    for (n, (changes, signatures)) in attempts.into_iter().enumerate() {
        let reason = refused(offer(&mut send, &mut recv, &id, &changes, signatures).await, &format!("forgery {n}"));
        assert!(reason.contains(&forged.hash().to_string()), "forgery {n}: {reason}");
    }

    // 3. The honest node's own document copied whole into another document id
    // with its real signatures: signatures are bound to their document.
    let elsewhere = DocId::random();
    let whole = copy.get_changes(&[]);
    let tips = authorship::author_tips(whole.iter());
    let signatures: Vec<SignedChange> =
        tips.iter().map(|(hash, _)| (*hash, authorship::sign(honest_key, &id, hash))).collect();
    let reason = refused(offer(&mut send, &mut recv, &elsewhere, &whole, signatures).await, "copied across");
    assert!(reason.contains("does not verify"), "{reason}");

    // Nothing of it reached the relay: the honest node's copy is unchanged after a sync.
    sync(&mut honest, &relay).await;
    assert_eq!(honest.document(&id).unwrap().heads(), relay_heads);
    assert!(honest.document(&elsewhere).is_err());

    // And an honest message from mallory (its change, its tip signed) goes through.
    let mut doc = copy.fork();
    let fine = change_as(me, &mut doc, "Eskilstuna");
    let signed = vec![(fine.hash(), authorship::sign(&mallory, &id, &fine.hash()))];
    assert_eq!(offer(&mut send, &mut recv, &id, std::slice::from_ref(&fine), signed).await, None);
    sync(&mut honest, &relay).await;
    assert_eq!(honest.document(&id).unwrap().heads(), vec![fine.hash()]);
    relay.shutdown().await;
}
