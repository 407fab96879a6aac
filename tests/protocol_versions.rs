//! Protocol 6 against a real relay over QUIC on 127.0.0.1: the directory is
//! sent only to a node that does not hold it, the relay's content limits
//! reach the node and hold there for edits, and a protocol 5 node is still
//! served as before. SQLite in temporary directories, bounded waits.

use samverkan::net::endpoint::{self, Limits};
use samverkan::net::framed::{self, FramedRecv, FramedSend};
use samverkan::net::tls::TlsIdentity;
use samverkan::node::node::{Node, NodeError, META_RELAY_LIMITS};
use samverkan::relay::server::RelayHandle;
use samverkan::shared::acceptance::{document_size, ContentLimits, LimitError};
use samverkan::shared::directory::directory_digest;
use samverkan::shared::identity::NodeKey;
use samverkan::shared::model::{DocKind, DocumentContent};
use samverkan::shared::wire::{ErrorCode, Frame, PROTOCOL_VERSION};
use samverkan::store::{SizeBefore, StoreError};

#[path = "support/relay_net.rs"]
mod relay_net;
use relay_net::{bounded, enrolled, org, relay_config, spawn_relay, start_relay, sync};

/// A hand-driven client holding `key`, its `Hello` sent.
async fn hello(
    relay: &RelayHandle,
    key: &NodeKey,
    protocol: u16,
    directory: Option<[u8; 32]>,
) -> (quinn::Connection, FramedSend, FramedRecv) {
    let identity = TlsIdentity::new(key.signing_key(), "test-client").unwrap();
    let client = endpoint::client_endpoint(relay.local_addr()).unwrap();
    let limits = Limits::default();
    let connecting = endpoint::connect(&client, relay.local_addr(), &identity, *relay.relay_key().as_bytes(), &limits);
    let conn = bounded("connect", connecting).await.unwrap();
    let (mut send, recv) = bounded("open", framed::open(&conn, &limits)).await.unwrap();
    let hello = Frame::Hello { protocol, software: "raw".into(), node: key.node_id().to_string(), directory };
    send.send(&hello).await.unwrap();
    (conn, send, recv)
}

/// The frames the relay sends up to and including its `Summary`.
async fn until_summary(recv: &mut FramedRecv) -> Vec<Frame> {
    bounded("the relay's first frames", async {
        let mut frames = Vec::new();
        loop {
            let frame = recv.recv().await.expect("a frame").expect("the stream stays open");
            let summary = matches!(frame, Frame::Summary { .. });
            frames.push(frame);
            if summary {
                return frames;
            }
        }
    })
    .await
}

fn directory_of(frames: &[Frame]) -> Option<Vec<u8>> {
    frames.iter().find_map(|f| match f {
        Frame::Directory { signed } => Some(signed.clone()),
        _ => None,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_directory_is_sent_only_to_a_node_that_does_not_hold_it() {
    let root = tempfile::tempdir().unwrap();
    let relay = start_relay(&root.path().join("relay")).await;
    let key = NodeKey::generate();
    relay.enroll_node(key.node_id(), org("Flen"), "Flen").unwrap();

    // A node that holds no directory gets it, after a Welcome in its protocol.
    let (conn, _send, mut recv) = hello(&relay, &key, PROTOCOL_VERSION, None).await;
    let frames = until_summary(&mut recv).await;
    assert!(matches!(frames[0], Frame::Welcome { protocol: PROTOCOL_VERSION, .. }), "{frames:?}");
    let signed = directory_of(&frames).expect("the directory is sent");
    conn.close(0u32.into(), b"done");

    // Holding it (named by its digest), the node is not sent it again.
    let held = directory_digest(&signed);
    let (conn, _send, mut recv) = hello(&relay, &key, PROTOCOL_VERSION, Some(held)).await;
    let frames = until_summary(&mut recv).await;
    assert_eq!(directory_of(&frames), None, "{frames:?}");
    assert_eq!(frames.len(), 2, "Welcome and Summary only: {frames:?}");
    conn.close(0u32.into(), b"done");

    // The directory changes (someone is enrolled): the old digest gets the new directory.
    relay.enroll_node(NodeKey::generate().node_id(), org("Trosa"), "Trosa").unwrap();
    let (conn, _send, mut recv) = hello(&relay, &key, PROTOCOL_VERSION, Some(held)).await;
    let newer = directory_of(&until_summary(&mut recv).await).expect("the changed directory is sent");
    assert_ne!(directory_digest(&newer), held);
    conn.close(0u32.into(), b"done");

    // A real node keeps the directory so that its digest is the relay's: its second sync is sent none.
    let mut flen = enrolled(root.path(), &relay, "flen", "Flen");
    sync(&mut flen, &relay).await;
    let kept = flen.enrollment_digest().unwrap().expect("the node keeps the directory");
    let (conn, _send, mut recv) = hello(&relay, &key, PROTOCOL_VERSION, Some(kept)).await;
    assert_eq!(directory_of(&until_summary(&mut recv).await), None, "the node's digest is the relay's");
    conn.close(0u32.into(), b"done");
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_protocol_5_node_is_served_as_before_and_other_versions_are_refused_by_name() {
    let root = tempfile::tempdir().unwrap();
    let relay = start_relay(&root.path().join("relay")).await;
    let key = NodeKey::generate();
    relay.enroll_node(key.node_id(), org("Flen"), "Flen").unwrap();

    let (conn, _send, mut recv) = hello(&relay, &key, 5, None).await;
    let frames = until_summary(&mut recv).await;
    assert_eq!(
        frames[0],
        Frame::Welcome { protocol: 5, relay: format!("samverkan-relay {}", samverkan::relay::VERSION), limits: None }
    );
    assert!(directory_of(&frames).is_some(), "a protocol 5 node gets the directory on every connection");
    conn.close(0u32.into(), b"done");

    for (protocol, expected) in [(4, "upgrade the node"), (PROTOCOL_VERSION + 1, "upgrade the relay first")] {
        let (_conn, _send, mut recv) = hello(&relay, &key, protocol, None).await;
        let refusal = bounded("refusal", recv.recv()).await;
        match refusal {
            Ok(Some(Frame::Error { code, message })) => {
                assert_eq!(code, ErrorCode::ProtocolVersion);
                assert!(message.contains(expected), "{message}");
            }
            other => panic!("expected an Error frame for protocol {protocol}, got {other:?}"),
        }
    }
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relays_lower_content_limits_hold_on_the_node_when_an_edit_is_made() {
    let root = tempfile::tempdir().unwrap();
    let mut config = relay_config(&root.path().join("relay"));
    config.content = ContentLimits { max_change_bytes: 64 * 1024, max_document_bytes: 1024 * 1024 };
    let relay = spawn_relay(config).await;
    let mut flen = enrolled(root.path(), &relay, "flen", "Flen");
    let mut content = DocumentContent::new(DocKind::CitizenPromise, "Medborgarlöfte Flen");
    content.parties = vec![org("Flen")];
    let id = flen.create(content).unwrap();
    // Before the relay was heard from, the node's own (larger) limits apply.
    let big = "Trygghetsvandring i centrum. ".repeat(4000);
    assert!(big.len() > 64 * 1024);
    sync(&mut flen, &relay).await;
    assert_eq!(flen.store().meta(META_RELAY_LIMITS).unwrap().as_deref(), Some("65536 1048576"));

    // Now an edit the relay would refuse is refused here, when it is made, and nothing is stored.
    let heads = flen.document(&id).unwrap().heads();
    let refused = flen.edit(&id, "body", |e| e.set_body(&big)).unwrap_err();
    assert!(
        matches!(refused, NodeError::Store(StoreError::TooLarge(LimitError::ChangeTooLarge { max: 65536, .. }))),
        "{refused:?}"
    );
    assert_eq!(flen.document(&id).unwrap().heads(), heads);
    // Kept across a restart of the node.
    let dir = flen.data_dir().to_path_buf();
    drop(flen);
    let mut flen = Node::open(&dir).unwrap();
    assert!(flen.edit(&id, "body", |e| e.set_body(&big)).is_err());
    flen.edit(&id, "body", |e| e.set_body("Trygghetsvandring i centrum.")).unwrap();
    sync(&mut flen, &relay).await;
    relay.shutdown().await;
}

/// A fresh node stores a document it receives whole from the relay without
/// counting its size on receipt (the relay checked it against the same limits:
/// Automerge 0.12 would rebuild every change to count it); the next edit
/// counts the whole document, so the relay's document limit still holds there.
/// A node whose own limits are stricter than the relay's counts on receipt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_document_received_whole_is_counted_at_its_next_edit_and_the_document_limit_holds_there() {
    let root = tempfile::tempdir().unwrap();
    let mut config = relay_config(&root.path().join("relay"));
    let limits = ContentLimits { max_change_bytes: 64 * 1024, max_document_bytes: 140 * 1024 };
    config.content = limits;
    let relay = spawn_relay(config).await;
    let mut flen = enrolled(root.path(), &relay, "flen", "Flen");
    let mut content = DocumentContent::new(DocKind::CitizenPromise, "Medborgarlöfte Flen");
    content.parties = vec![org("Flen"), org("Polisen")];
    let id = flen.create(content).unwrap();
    // About 38 KB of new text per paragraph, each change under the change limit.
    let paragraph = |n: usize| format!("Aktivitet {n} i kvarteret, med kommunen och polisen. ").repeat(700);
    let mut body = String::new();
    for n in 0..3 {
        body.push_str(&paragraph(n));
        flen.edit(&id, "body", |e| e.set_body(&body)).unwrap();
    }
    sync(&mut flen, &relay).await;

    let mut polisen = enrolled(root.path(), &relay, "polisen", "Polisen");
    sync(&mut polisen, &relay).await;
    assert_eq!(polisen.document(&id).unwrap().heads(), flen.document(&id).unwrap().heads());
    assert_eq!(polisen.store().stored_size(&id).unwrap(), Some(SizeBefore::NotCounted), "not counted on receipt");

    // An edit that takes the whole document over the relay's limit is refused here, with the received part counted.
    body.push_str(&paragraph(3));
    let refused = polisen.edit(&id, "body", |e| e.set_body(&body)).unwrap_err();
    assert!(
        matches!(
            refused,
            NodeError::Store(StoreError::TooLarge(LimitError::DocumentTooLarge { max, .. })) if max == 140 * 1024
        ),
        "{refused:?}"
    );
    assert_eq!(polisen.store().stored_size(&id).unwrap(), Some(SizeBefore::NotCounted), "nothing was stored");
    // A small edit is stored, and the document's size is counted with it.
    polisen.edit(&id, "title", |e| e.set_title("Medborgarlöfte Flen 2026")).unwrap();
    let counted = polisen.store().stored_size(&id).unwrap();
    let whole = document_size(polisen.document(&id).unwrap().automerge_mut());
    assert_eq!(counted, Some(SizeBefore::Stored(whole)));
    assert!(whole > 100 * 1024, "the received changes are counted: {whole}");
    sync(&mut polisen, &relay).await;
    sync(&mut flen, &relay).await;
    assert_eq!(flen.document(&id).unwrap().title().unwrap(), "Medborgarlöfte Flen 2026");
    relay.shutdown().await;

    // A relay with limits looser than the node's own: the node's stricter ones are not the relay's, so it counts on receipt.
    let mut config = relay_config(&root.path().join("relay-loose"));
    let defaults = ContentLimits::default();
    config.content = ContentLimits { max_change_bytes: defaults.max_change_bytes * 2, ..defaults };
    let loose = spawn_relay(config).await;
    let mut flen = enrolled(root.path(), &loose, "flen-2", "Flen");
    let mut content = DocumentContent::new(DocKind::CitizenPromise, "Medborgarlöfte Flen 2027");
    content.parties = vec![org("Flen"), org("Polisen")];
    let id = flen.create(content).unwrap();
    sync(&mut flen, &loose).await;
    let mut polisen = enrolled(root.path(), &loose, "polisen-2", "Polisen");
    sync(&mut polisen, &loose).await;
    let whole = document_size(polisen.document(&id).unwrap().automerge_mut());
    assert_eq!(polisen.store().stored_size(&id).unwrap(), Some(SizeBefore::Stored(whole)));
    loose.shutdown().await;
}
