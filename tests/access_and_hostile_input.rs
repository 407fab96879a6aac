//! Who may connect and what they may touch, and what broken or hostile peers
//! can do: real relay, real nodes and hand-driven hostile clients over QUIC on
//! 127.0.0.1, SQLite in temporary directories, bounded timeouts everywhere.

use std::time::Duration;

use samverkan::net::endpoint::{self, Limits};
use samverkan::net::framed::{self, FramedRecv, FramedSend};
use samverkan::net::tls::TlsIdentity;
use samverkan::node::node::Node;
use samverkan::node::sync::{self, DaemonOptions, RelayTarget, SyncFailure};
use samverkan::relay::server::{self, RelayConfig, RelayHandle};
use samverkan::shared::automerge::{self, transaction::Transactable, AutoCommit};
use samverkan::shared::identity::NodeKey;
use samverkan::shared::ids::DocId;
use samverkan::shared::model::{DocKind, DocumentContent};
use samverkan::shared::sync::ConnectionError;
use samverkan::shared::wire::{ErrorCode, Frame, FrameDecoder, RefusalKind, PROTOCOL_VERSION};

#[path = "support/relay_net.rs"]
mod relay_net;
use relay_net::{bounded, enrolled, eventually, org, start_relay, target, try_sync, LIMIT};

/// The relay's refusal, as the node sees it.
fn refusal(result: Result<sync::SyncReport, SyncFailure>) -> (ErrorCode, String) {
    match result {
        Err(SyncFailure::Protocol(ConnectionError::Peer { code, message })) => (code, message),
        other => panic!("expected a refusal from the relay, got {other:?}"),
    }
}

/// A hand-driven, authenticated connection holding `key`.
async fn raw_connection(relay: &RelayHandle, key: &NodeKey) -> quinn::Connection {
    let identity = TlsIdentity::new(key.signing_key(), "test-client").unwrap();
    let client = endpoint::client_endpoint(relay.local_addr()).unwrap();
    let limits = Limits::default();
    let connecting = endpoint::connect(&client, relay.local_addr(), &identity, *relay.relay_key().as_bytes(), &limits);
    bounded("connect", connecting).await.unwrap()
}

/// A hand-driven client holding `key`, with its framed stream open.
async fn raw_client(relay: &RelayHandle, key: &NodeKey) -> (quinn::Connection, FramedSend, FramedRecv) {
    let conn = raw_connection(relay, key).await;
    let (send, recv) = bounded("open", framed::open(&conn, &Limits::default())).await.unwrap();
    (conn, send, recv)
}

/// Reads frames until an `Error` frame (returned) or the end of the stream (`None`).
async fn next_error(recv: &mut FramedRecv) -> Option<(ErrorCode, String)> {
    bounded("an error frame", async {
        loop {
            match recv.recv().await {
                Ok(Some(Frame::Error { code, message })) => return Some((code, message)),
                Ok(Some(_)) => continue,
                Ok(None) | Err(_) => return None,
            }
        }
    })
    .await
}

/// Reads frames until a `DocRefused` frame (returned: the connection goes on);
/// an `Error` frame or the end of the stream fails the test.
async fn next_refusal(recv: &mut FramedRecv) -> (DocId, RefusalKind, String) {
    bounded("a document refusal", async {
        loop {
            match recv.recv().await {
                Ok(Some(Frame::DocRefused { doc, kind, reason, .. })) => return (doc, kind, reason),
                Ok(Some(Frame::Error { code, message })) => panic!("the connection was closed: {code:?} {message}"),
                Ok(Some(_)) => continue,
                other => panic!("the connection ended without a refusal: {other:?}"),
            }
        }
    })
    .await
}

/// An Automerge sync message carrying a whole small document.
fn sync_message_for(doc: &mut AutoCommit) -> Vec<u8> {
    let mut state = automerge::sync::State::new();
    let message = automerge::sync::SyncDoc::generate_sync_message(&doc.sync(), &mut state).unwrap();
    // The first message only offers heads; answer as an empty peer would, then take the changes.
    let mut empty = AutoCommit::new();
    let mut their_state = automerge::sync::State::new();
    automerge::sync::SyncDoc::receive_sync_message(&mut empty.sync(), &mut their_state, message).unwrap();
    let request = automerge::sync::SyncDoc::generate_sync_message(&empty.sync(), &mut their_state).unwrap();
    automerge::sync::SyncDoc::receive_sync_message(&mut doc.sync(), &mut state, request).unwrap();
    automerge::sync::SyncDoc::generate_sync_message(&doc.sync(), &mut state).unwrap().encode()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unenrolled_wrongly_pinned_and_revoked_nodes_are_refused_clearly() {
    let root = tempfile::tempdir().unwrap();
    let relay = start_relay(&root.path().join("relay")).await;

    let mut stranger = Node::init(&root.path().join("stranger"), "Flen", None).unwrap();
    let (code, message) = refusal(try_sync(&mut stranger, &relay).await);
    assert_eq!(code, ErrorCode::Unauthenticated);
    assert!(message.contains("not enrolled") && message.contains(&stranger.node_id().to_string()), "{message}");

    let wrong_pin = RelayTarget { addr: relay.local_addr(), relay_key: NodeKey::generate().node_id() };
    let err = bounded("sync", sync::sync_once(&mut stranger, &wrong_pin, LIMIT)).await.unwrap_err().to_string();
    assert!(err.contains("not the pinned relay key"), "{err}");

    // Enrolled, connected as a daemon, then revoked: cut off at once, refused after.
    let mut flen = enrolled(root.path(), &relay, "flen", "Flen");
    try_sync(&mut flen, &relay).await.expect("an enrolled node syncs");
    let flen_id = flen.node_id();
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let t = target(&relay);
    let daemon = tokio::spawn(async move {
        let options = DaemonOptions { backoff_base: Duration::from_millis(50), ..DaemonOptions::default() };
        sync::daemon(&mut flen, &t, &options, async move {
            let _ = stop_rx.changed().await;
        })
        .await
        .unwrap();
        flen
    });
    eventually("the daemon connected", || relay.connected().contains(&flen_id.to_string())).await;
    relay.revoke(&flen_id).unwrap();
    eventually("the revoked node cut off", || !relay.connected().contains(&flen_id.to_string())).await;
    stop_tx.send(true).unwrap();
    let mut flen = bounded("daemon stop", daemon).await.unwrap();
    let (code, message) = refusal(try_sync(&mut flen, &relay).await);
    assert_eq!(code, ErrorCode::Unauthenticated);
    assert!(message.contains("revoked"), "{message}");
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_code_enrolls_one_node_once_and_the_directory_names_it() {
    let root = tempfile::tempdir().unwrap();
    let relay = start_relay(&root.path().join("relay")).await;
    let code = relay.join_code(org("Flen"), "Flen BF-samordnare", chrono::Duration::hours(1)).unwrap();

    let mut flen = Node::init(&root.path().join("flen"), "Flen", None).unwrap();
    let member = bounded("join", sync::join(&mut flen, &code, LIMIT)).await.unwrap();
    assert_eq!((member.org, member.name.as_str()), (org("Flen"), "Flen BF-samordnare"));
    assert_eq!(flen.pinned_relay().unwrap(), Some(relay.relay_key()));
    try_sync(&mut flen, &relay).await.expect("a joined node syncs");
    let directory = flen.enrollment().unwrap().expect("the directory arrived and verifies");
    assert!(directory.active(&flen.node_id()).is_some());

    let mut second = Node::init(&root.path().join("second"), "Flen", None).unwrap();
    let err = bounded("join", sync::join(&mut second, &code, LIMIT)).await.unwrap_err().to_string();
    assert!(err.contains("unknown join code"), "{err}");
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documents_reach_only_their_parties_and_the_relay_refuses_the_rest() {
    let root = tempfile::tempdir().unwrap();
    let relay = start_relay(&root.path().join("relay")).await;
    let mut flen = enrolled(root.path(), &relay, "flen", "Flen");
    let mut polisen = enrolled(root.path(), &relay, "polisen", "Polisen");
    let mut trosa = enrolled(root.path(), &relay, "trosa", "Trosa");

    let mut content = DocumentContent::new(DocKind::CitizenPromise, "Medborgarlöfte Flen 2026");
    content.parties = vec![org("Flen"), org("Polisen")];
    let promise = flen.create(content).unwrap();
    // Trosa writes a document naming only Flen: it stays on Trosa's node.
    let mut content = DocumentContent::new(DocKind::CitizenPromise, "Utkast från Trosa");
    content.parties = vec![org("Flen")];
    let draft = trosa.create(content).unwrap();
    for node in [&mut flen, &mut polisen, &mut trosa] {
        try_sync(node, &relay).await.unwrap();
    }
    try_sync(&mut flen, &relay).await.unwrap();
    assert!(polisen.document(&promise).is_ok(), "a party receives the document");
    assert!(trosa.document(&promise).is_err(), "a non-party never receives it");
    assert!(flen.document(&draft).is_err(), "a document its own author is not party to is never offered");

    // A hostile Trosa client asks for Flen's promise: refused by name, nothing sent.
    let trosa_key = NodeKey::generate();
    relay.enroll_node(trosa_key.node_id(), org("Trosa"), "trosa-hostile").unwrap();
    let (_conn, mut send, mut recv) = raw_client(&relay, &trosa_key).await;
    let hello = Frame::Hello {
        protocol: PROTOCOL_VERSION,
        software: "t".into(),
        node: trosa_key.node_id().to_string(),
        directory: None,
    };
    send.send(&hello).await.unwrap();
    let mut asking = AutoCommit::new();
    let mut state = automerge::sync::State::new();
    let ask = automerge::sync::SyncDoc::generate_sync_message(&asking.sync(), &mut state).unwrap().encode();
    send.send(&Frame::Sync { doc: promise.clone(), message: ask }).await.unwrap();
    let mut received_promise = false;
    let refusal = bounded("refusal", async {
        loop {
            match recv.recv().await {
                Ok(Some(Frame::DocRefused { doc, kind, heads, .. })) => return Some((doc, kind, heads)),
                Ok(Some(Frame::Sync { doc, .. })) if doc == promise => received_promise = true,
                Ok(Some(_)) => {}
                _ => return None,
            }
        }
    })
    .await;
    let (doc, kind, heads) = refusal.expect("a document refusal");
    assert_eq!((doc, kind), (promise.clone(), RefusalKind::NotShared));
    assert!(heads.is_empty(), "nothing about a document it may not see");
    assert!(!received_promise);

    // On the same connection (it goes on), a new document that does not name its organisation: refused, not stored.
    let mut content = DocumentContent::new(DocKind::CitizenPromise, "Planterat dokument");
    content.parties = vec![org("Flen")];
    let planted = DocId::random();
    let ctx = samverkan::shared::model::EditContext {
        author: trosa_key.node_id(),
        org: org("Trosa"),
        node_name: "trosa-hostile".into(),
        time: chrono::Utc::now(),
    };
    let directory = samverkan::shared::org::Directory::sodermanland();
    let mut doc = samverkan::shared::model::Document::create(planted.clone(), content, &ctx, &directory)
        .unwrap()
        .into_automerge();
    // Properly signed by its author, so it is the parties rule that refuses it.
    let hash = doc.get_heads()[0];
    let entries = vec![(hash, samverkan::shared::authorship::sign(&trosa_key, &planted, &hash))];
    send.send(&Frame::Authors { doc: planted.clone(), entries }).await.unwrap();
    send.send(&Frame::Sync { doc: planted.clone(), message: sync_message_for(&mut doc) }).await.unwrap();
    let (doc, kind, reason) = next_refusal(&mut recv).await;
    assert_eq!((doc, kind), (planted.clone(), RefusalKind::NotShared), "{reason}");
    assert!(reason.contains("does not name your organisation"), "{reason}");
    try_sync(&mut flen, &relay).await.unwrap();
    assert!(flen.document(&planted).is_err(), "the planted document was not stored or forwarded");
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_closes_only_its_own_connection_while_honest_nodes_keep_syncing() {
    let root = tempfile::tempdir().unwrap();
    let relay = start_relay(&root.path().join("relay")).await;
    let mut a = enrolled(root.path(), &relay, "eskilstuna", "Eskilstuna");
    let mut b = enrolled(root.path(), &relay, "polisen", "Polisen");
    let mut content = DocumentContent::new(DocKind::CitizenPromise, "Medborgarlöfte Eskilstuna 2026");
    content.parties = vec![a.org().clone(), b.org().clone()];
    let id = a.create(content).unwrap();
    try_sync(&mut a, &relay).await.unwrap();

    let hostile = NodeKey::generate();
    relay.enroll_node(hostile.node_id(), org("Eskilstuna"), "hostile").unwrap();
    let hello = || Frame::Hello {
        protocol: PROTOCOL_VERSION,
        software: "h".into(),
        node: hostile.node_id().to_string(),
        directory: None,
    };
    let mut refusals = Vec::new();

    // 1. Garbage instead of a frame; 2. an absurd length prefix; raw bytes on the stream.
    for bytes in [b"GET / HTTP/1.1\r\n\r\n".to_vec(), vec![0xff, 0xff, 0xff, 0xff, 0x06]] {
        let conn = raw_connection(&relay, &hostile).await;
        let (mut raw_send, mut raw_recv) = bounded("open", conn.open_bi()).await.unwrap();
        raw_send.write_all(&bytes).await.unwrap();
        let _ = raw_send.finish();
        let answer = bounded("answer", raw_recv.read_to_end(64 * 1024)).await.unwrap_or_default();
        let mut decoder = FrameDecoder::new();
        decoder.push(&answer);
        refusals.push(format!("{:?}", decoder.next_frame()));
        bounded("closed", conn.closed()).await;
    }
    // 3. Hello naming another key than the one proven in TLS.
    let (_c, mut send, mut recv) = raw_client(&relay, &hostile).await;
    let other = NodeKey::generate().node_id();
    send.send(&Frame::Hello {
        protocol: PROTOCOL_VERSION,
        software: "h".into(),
        node: other.to_string(),
        directory: None,
    })
    .await
    .unwrap();
    let (code, message) = next_error(&mut recv).await.expect("refused");
    assert_eq!(code, ErrorCode::Unauthenticated, "{message}");
    // 4. A garbage Automerge sync message for a document it is party to: that document is refused.
    let (_c, mut send, mut recv) = raw_client(&relay, &hostile).await;
    send.send(&hello()).await.unwrap();
    send.send(&Frame::Sync { doc: id.clone(), message: vec![0x42, 0xff, 0x00, 0x13, 0x37] }).await.unwrap();
    let (doc, kind, reason) = next_refusal(&mut recv).await;
    assert_eq!((doc, kind), (id.clone(), RefusalKind::Malformed), "{reason}");
    // 5. A frame out of order.
    let (_c, mut send, mut recv) = raw_client(&relay, &hostile).await;
    send.send(&Frame::InSync).await.unwrap();
    assert!(next_error(&mut recv).await.is_some());
    // 6. A peer that connects and never opens a stream, and one that says Hello and then stops reading.
    let _idle = raw_connection(&relay, &hostile).await;
    let (_mute, mut mute_send, _mute_recv) = raw_client(&relay, &hostile).await;
    mute_send.send(&hello()).await.unwrap();
    println!("relay answers to raw garbage: {refusals:?}");
    assert!(refusals.iter().all(|r| r.contains("TooLarge")), "each answered with a TooLarge error: {refusals:?}");

    // Meanwhile the honest nodes still sync, and nothing of the garbage was stored.
    try_sync(&mut b, &relay).await.unwrap();
    a.edit(&id, "edit", |e| e.set_body("Vi lovar trygghetsvandringar varje månad.")).unwrap();
    try_sync(&mut a, &relay).await.unwrap();
    try_sync(&mut b, &relay).await.unwrap();
    assert_eq!(b.document(&id).unwrap().view().unwrap().body, "Vi lovar trygghetsvandringar varje månad.");
    assert_eq!(a.document(&id).unwrap().heads(), b.document(&id).unwrap().heads());
    relay.shutdown().await;
}

#[test]
fn a_sync_message_helper_produces_changes() {
    let mut doc = AutoCommit::new();
    doc.put(automerge::ROOT, "x", 1).unwrap();
    assert!(!sync_message_for(&mut doc).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_in_another_nodes_name_is_refused_by_the_relay() {
    let root = tempfile::tempdir().unwrap();
    let relay = start_relay(&root.path().join("relay")).await;
    let mut honest = enrolled(root.path(), &relay, "eskilstuna", "Eskilstuna");
    let forger = NodeKey::generate();
    relay.enroll_node(forger.node_id(), org("Eskilstuna"), "forger").unwrap();

    // A new document whose only change names the honest node as its author.
    let mut content = DocumentContent::new(DocKind::CitizenPromise, "I någon annans namn");
    content.parties = vec![org("Eskilstuna")];
    let ctx = samverkan::shared::model::EditContext {
        author: honest.node_id(),
        org: org("Eskilstuna"),
        node_name: "eskilstuna".into(),
        time: chrono::Utc::now(),
    };
    let directory = samverkan::shared::org::Directory::sodermanland();
    let planted = DocId::random();
    let mut doc = samverkan::shared::model::Document::create(planted.clone(), content, &ctx, &directory)
        .unwrap()
        .into_automerge();
    let hash = doc.get_heads()[0];
    let hello = Frame::Hello {
        protocol: PROTOCOL_VERSION,
        software: "f".into(),
        node: forger.node_id().to_string(),
        directory: None,
    };

    // Without a signature, and with the forger's own signature over the change,
    // on one connection: each message is refused, the connection goes on.
    let signed_by_forger = samverkan::shared::authorship::sign(&forger, &planted, &hash);
    let (_conn, mut send, mut recv) = raw_client(&relay, &forger).await;
    send.send(&hello).await.unwrap();
    for authors in [None, Some(signed_by_forger)] {
        if let Some(signature) = authors {
            send.send(&Frame::Authors { doc: planted.clone(), entries: vec![(hash, signature)] }).await.unwrap();
        }
        send.send(&Frame::Sync { doc: planted.clone(), message: sync_message_for(&mut doc) }).await.unwrap();
        let (doc, kind, reason) = next_refusal(&mut recv).await;
        assert_eq!((doc, kind), (planted.clone(), RefusalKind::ChangesRefused), "{reason}");
        assert!(reason.contains("signature"), "{reason}");
    }
    try_sync(&mut honest, &relay).await.unwrap();
    assert!(honest.document(&planted).is_err(), "the forged document was neither stored nor forwarded");
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_key_holds_at_most_its_share_of_connections_and_the_newest_wins() {
    let root = tempfile::tempdir().unwrap();
    let mut config = RelayConfig::new("127.0.0.1:0".parse().unwrap(), root.path().join("relay"));
    config.max_connections_per_key = 2;
    let relay = server::spawn(config).await.unwrap();
    let key = NodeKey::generate();
    relay.enroll_node(key.node_id(), org("Gnesta"), "gnesta").unwrap();
    let hello = || Frame::Hello {
        protocol: PROTOCOL_VERSION,
        software: "g".into(),
        node: key.node_id().to_string(),
        directory: None,
    };
    let mut held = Vec::new();
    for n in 1..=2 {
        let (conn, mut send, recv) = raw_client(&relay, &key).await;
        send.send(&hello()).await.unwrap();
        held.push((conn, send, recv));
        // One after the other: connections are served in parallel, and "oldest" is the first registered.
        eventually("the connection registered", || relay.connected().len() == n).await;
    }
    // A third connection of the same key (say, after a restart) is served; the oldest is closed.
    let (_conn, mut send, _recv) = raw_client(&relay, &key).await;
    send.send(&hello()).await.unwrap();
    let (code, message) = next_error(&mut held[0].2).await.expect("the oldest connection is closed");
    assert_eq!(code, ErrorCode::Busy, "{message}");
    assert!(message.contains("replaced by a newer connection"), "{message}");
    eventually("at most two connections of the key", || relay.connected().len() == 2).await;
    relay.shutdown().await;
}

/// A change whose operations are run-length encoded carries millions of them in
/// a hundred bytes (four million took Automerge 11 s and 1.8 GB to apply): the
/// relay counts them before Automerge sees the change and refuses that
/// document alone; honest nodes go on syncing. The relay's limit is lowered
/// here so that the test builds its change quickly; `sync::check` has the
/// counting itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_change_carrying_too_many_operations_is_refused_for_that_document_alone() {
    use samverkan::shared::automerge::{ObjType, ScalarValue, ROOT};
    let root = tempfile::tempdir().unwrap();
    let mut config = relay_net::relay_config(&root.path().join("relay"));
    (config.max_change_ops, config.max_message_ops) = (10_000, 10_000);
    let relay = relay_net::spawn_relay(config).await;
    let mut honest = enrolled(root.path(), &relay, "eskilstuna", "Eskilstuna");
    let attacker = NodeKey::generate();
    relay.enroll_node(attacker.node_id(), org("Eskilstuna"), "angripare").unwrap();

    let mut doc = AutoCommit::new().with_actor(attacker.node_id().actor_id());
    let list = doc.put_object(ROOT, "l", ObjType::List).unwrap();
    doc.splice(&list, 0, 0, std::iter::repeat_n(ScalarValue::Boolean(true), 20_000)).unwrap();
    doc.commit();
    let message = sync_message_for(&mut doc);
    assert!(message.len() < 1024, "{} bytes for 20,000 operations", message.len());

    let (_conn, mut send, mut recv) = raw_client(&relay, &attacker).await;
    let hello = Frame::Hello {
        protocol: PROTOCOL_VERSION,
        software: "f".into(),
        node: attacker.node_id().to_string(),
        directory: None,
    };
    send.send(&hello).await.unwrap();
    let bomb = DocId::random();
    send.send(&Frame::Sync { doc: bomb.clone(), message }).await.unwrap();
    let (refused, kind, reason) = next_refusal(&mut recv).await;
    assert_eq!((refused, kind), (bomb.clone(), RefusalKind::TooLarge), "{reason}");
    assert!(reason.contains("10000 operations"), "{reason}");
    // The connection goes on, and so do honest nodes.
    send.send(&Frame::Sync { doc: bomb.clone(), message: Vec::new() }).await.unwrap();
    let (again, _, _) = next_refusal(&mut recv).await;
    assert_eq!(again, bomb);
    let mut content = DocumentContent::new(DocKind::CitizenPromise, "Medborgarlöfte Eskilstuna 2026");
    content.parties = vec![org("Eskilstuna")];
    honest.create(content).unwrap();
    try_sync(&mut honest, &relay).await.unwrap();
    assert!(honest.document(&bomb).is_err(), "nothing of it was stored or forwarded");
    relay.shutdown().await;
}
