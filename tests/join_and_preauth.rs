//! Joining with a code, and what the relay does before it knows who is asking:
//! a refused join changes nothing, and an unauthenticated peer can make the
//! relay hold a few kilobytes, not megabytes. Real relay and nodes over QUIC on
//! 127.0.0.1 (port 0), SQLite in temporary directories, bounded timeouts.

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use samverkan::net::endpoint::{self, Limits};
use samverkan::net::framed::MAX_PREAUTH_FRAME;
use samverkan::net::tls::TlsIdentity;
use samverkan::node::node::Node;
use samverkan::node::sync::{self, SyncFailure};
use samverkan::relay::server::{self, RelayConfig, RelayHandle};
use samverkan::shared::directory::{EnrollmentDirectory, JoinCode, Member};
use samverkan::shared::identity::NodeKey;
use samverkan::shared::model::{DocKind, DocumentContent};
use samverkan::shared::sync::ConnectionError;
use samverkan::shared::wire::{ErrorCode, Frame, FrameDecoder, PROTOCOL_VERSION};

#[path = "support/relay_net.rs"]
mod relay_net;
use relay_net::{bounded, org, relay_config, spawn_relay, target, LIMIT};

async fn start_relay(dir: &Path, handshake_timeout: Option<Duration>) -> RelayHandle {
    let mut config = relay_config(dir);
    if let Some(timeout) = handshake_timeout {
        config.limits.handshake_timeout = timeout;
    }
    spawn_relay(config).await
}

async fn join(node: &mut Node, code: &JoinCode) -> Result<Member, SyncFailure> {
    bounded("join", sync::join(node, code, LIMIT)).await
}

/// The relay's refusal of a join, as the node sees it.
fn refusal(result: Result<Member, SyncFailure>) -> (ErrorCode, String) {
    match result {
        Err(SyncFailure::Protocol(ConnectionError::Peer { code, message })) => (code, message),
        other => panic!("expected a refusal from the relay, got {other:?}"),
    }
}

fn directory(relay: &RelayHandle) -> EnrollmentDirectory {
    relay.directory().expect("the relay's directory reads")
}

/// A node creates a document for its organisation and syncs it to the relay.
async fn create_and_sync(node: &mut Node, relay: &RelayHandle, title: &str) {
    let mut content = DocumentContent::new(DocKind::CitizenPromise, title);
    content.parties = vec![node.org().clone()];
    node.create(content).unwrap();
    let report = bounded("sync", sync::sync_once(node, &target(relay), LIMIT)).await.expect("the node syncs");
    assert_eq!(report.docs_sent, 1, "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_with_a_code_for_another_organisation_enrolls_nothing_and_leaves_the_code_usable() {
    let root = tempfile::tempdir().unwrap();
    let relay = start_relay(&root.path().join("relay"), None).await;
    let code = relay.join_code(org("Gnesta"), "Gnesta BF-samordnare", chrono::Duration::hours(1)).unwrap();
    let before = directory(&relay);

    // A Trosa node uses the code issued for Gnesta.
    let mut trosa = Node::init(&root.path().join("trosa"), "Trosa", None).unwrap();
    let (code_sent, message) = refusal(join(&mut trosa, &code).await);
    assert_eq!(code_sent, ErrorCode::Forbidden, "{message}");
    assert!(message.contains("Gnesta kommun (gnesta-kommun)"), "{message}");
    assert!(message.contains("belongs to trosa-kommun"), "{message}");
    assert!(message.contains("ask the operator for a code for your organisation"), "{message}");

    // Nothing changed at the relay, and the node pinned nothing.
    let after = directory(&relay);
    assert_eq!(after, before, "a refused join enrolls nothing");
    assert!(after.latest(&trosa.node_id()).is_none(), "no entry for the Trosa key");
    assert_eq!(trosa.pinned_relay().unwrap(), None, "the node is not pinned to the relay");
    assert!(trosa.enrollment().unwrap().is_none());
    let err = bounded("sync", sync::sync_once(&mut trosa, &target(&relay), LIMIT)).await.unwrap_err();
    assert!(err.to_string().contains("not enrolled"), "{err}");

    // The real Gnesta node then joins with the same code, and syncs.
    let mut gnesta = Node::init(&root.path().join("gnesta"), "Gnesta", None).unwrap();
    let member = join(&mut gnesta, &code).await.expect("the code is still usable");
    assert_eq!((member.org, member.name.as_str()), (org("Gnesta"), "Gnesta BF-samordnare"));
    assert_eq!(gnesta.pinned_relay().unwrap(), Some(relay.relay_key()));
    let after = directory(&relay);
    assert_eq!(after.members.len(), before.members.len() + 1);
    assert_eq!(after.active(&gnesta.node_id()).map(|m| m.org.clone()), Some(org("Gnesta")));
    create_and_sync(&mut gnesta, &relay, "Medborgarlöfte Gnesta 2026").await;
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_by_a_key_already_enrolled_enrolls_nothing_and_leaves_the_code_usable() {
    let root = tempfile::tempdir().unwrap();
    let relay = start_relay(&root.path().join("relay"), None).await;
    let first = relay.join_code(org("Gnesta"), "Gnesta BF-samordnare", chrono::Duration::hours(1)).unwrap();
    let mut gnesta = Node::init(&root.path().join("gnesta"), "Gnesta", None).unwrap();
    join(&mut gnesta, &first).await.expect("the first join succeeds");

    // The same key with a second code (for its own organisation): refused, not renamed.
    let second = relay.join_code(org("Gnesta"), "Gnesta kansli", chrono::Duration::hours(1)).unwrap();
    let before = directory(&relay);
    let (code_sent, message) = refusal(join(&mut gnesta, &second).await);
    assert_eq!(code_sent, ErrorCode::Forbidden, "{message}");
    assert!(message.contains("already enrolled"), "{message}");
    assert!(message.contains("Gnesta BF-samordnare (gnesta-kommun)"), "{message}");
    assert_eq!(directory(&relay), before, "a refused join enrolls nothing");
    assert_eq!(directory(&relay).active(&gnesta.node_id()).unwrap().name, "Gnesta BF-samordnare");

    // A key enrolled directly for Trosa, with a Gnesta code: refused for the organisation, nothing changes.
    let trosa = Node::init(&root.path().join("trosa"), "Trosa", None).unwrap();
    relay.enroll_node(trosa.node_id(), org("Trosa"), "Trosa").unwrap();
    let before = directory(&relay);
    let mut trosa = trosa;
    let (_, message) = refusal(join(&mut trosa, &second).await);
    assert!(message.contains("Gnesta kommun (gnesta-kommun)"), "{message}");
    assert_eq!(directory(&relay), before);

    // The second code still works for a new Gnesta node, and the first node still syncs.
    let mut kansli = Node::init(&root.path().join("kansli"), "Gnesta", None).unwrap();
    let member = join(&mut kansli, &second).await.expect("the second code is still usable");
    assert_eq!(member.name, "Gnesta kansli");
    create_and_sync(&mut gnesta, &relay, "Gnestas utkast").await;
    relay.shutdown().await;
}

/// A join code naming several instances of one relay: an instance that does
/// not answer is passed over for the next, and the node remembers every
/// address, the code's order kept, for its later syncs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_code_with_several_addresses_joins_at_the_first_that_answers_and_keeps_them_all() {
    use samverkan::node::node::{META_RELAY_ADDRESS, META_RELAY_ALTERNATIVES};
    let root = tempfile::tempdir().unwrap();
    let relay = start_relay(&root.path().join("relay"), None).await;
    // An address where nothing answers: a bound UDP socket that never reads.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let dead = silent.local_addr().unwrap().to_string();
    let issued = relay.join_code(org("Gnesta"), "Gnesta BF-samordnare", chrono::Duration::hours(1)).unwrap();
    let live = issued.relay_addresses[0].clone();
    let code = JoinCode::new(issued.secret, issued.relay_key, vec![dead.clone(), live.clone()]).unwrap();
    // It travels as text, as the operator sends it.
    let code: JoinCode = code.to_string().parse().unwrap();

    let mut gnesta = Node::init(&root.path().join("gnesta"), "Gnesta", None).unwrap();
    let member = bounded("join", sync::join(&mut gnesta, &code, Duration::from_secs(2)))
        .await
        .expect("the second address answers");
    assert_eq!(member.org, org("Gnesta"));
    assert_eq!(gnesta.pinned_relay().unwrap(), Some(relay.relay_key()));
    let store = gnesta.store();
    assert_eq!(store.meta(META_RELAY_ADDRESS).unwrap(), Some(dead.clone()), "the code's first address stays first");
    assert_eq!(store.meta(META_RELAY_ALTERNATIVES).unwrap(), Some(live));
    create_and_sync(&mut gnesta, &relay, "Medborgarlöfte Gnesta 2027").await;

    // When no address answers, the join fails saying so, and pins nothing.
    let none = JoinCode::new(issued.secret, issued.relay_key, vec![dead]).unwrap();
    let mut trosa = Node::init(&root.path().join("trosa"), "Gnesta", None).unwrap();
    let failed = bounded("join", sync::join(&mut trosa, &none, Duration::from_secs(1))).await.unwrap_err();
    assert!(matches!(failed, SyncFailure::Timeout(_) | SyncFailure::Net(_)), "{failed:?}");
    assert_eq!(trosa.pinned_relay().unwrap(), None);
    drop(silent);
    relay.shutdown().await;
}

/// A raw QUIC connection with a fresh, unenrolled key and its stream, on
/// which the test writes whatever bytes it likes.
async fn raw_stream(relay: &RelayHandle, key: &NodeKey) -> (quinn::Connection, quinn::SendStream, quinn::RecvStream) {
    let identity = TlsIdentity::new(key.signing_key(), "test-client").unwrap();
    let client = endpoint::client_endpoint(relay.local_addr()).unwrap();
    let limits = Limits::default();
    let connecting = endpoint::connect(&client, relay.local_addr(), &identity, *relay.relay_key().as_bytes(), &limits);
    let conn = bounded("connect", connecting).await.unwrap();
    let (send, recv) = bounded("open", conn.open_bi()).await.unwrap();
    (conn, send, recv)
}

/// Reads until an `Error` frame arrives (returned) or the stream or connection ends (`None`).
async fn error_frame(recv: &mut quinn::RecvStream) -> Option<(ErrorCode, String)> {
    bounded("an error frame or the close", async {
        let mut decoder = FrameDecoder::new();
        let mut chunk = vec![0u8; 4096];
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
    })
    .await
}

fn vm_rss() -> String {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS")).map(|l| l.split_whitespace().skip(1).collect()))
        .unwrap_or_else(|| "unknown".into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unauthenticated_peer_announcing_a_huge_first_frame_is_refused_without_allocating() {
    let root = tempfile::tempdir().unwrap();
    let relay = start_relay(&root.path().join("relay"), None).await;
    let mut honest = Node::init(&root.path().join("flen"), "Flen", None).unwrap();
    relay.enroll_node(honest.node_id(), org("Flen"), "Flen").unwrap();
    println!("VmRSS before: {} kB", vm_rss());

    // Sixteen strangers each announce a 64 MiB first frame and send what the window allows of it.
    let announced: u32 = 64 << 20;
    let attacks = (0..16).map(|_| {
        let relay = &relay;
        async move {
            let (conn, mut send, mut recv) = raw_stream(relay, &NodeKey::generate()).await;
            let mut bytes = announced.to_be_bytes().to_vec();
            bytes.extend(vec![0x06; 60 * 1024]);
            // The relay may refuse before everything is written; that is fine.
            let _ = bounded("write", send.write_all(&bytes)).await;
            let answer = error_frame(&mut recv).await;
            conn.close(0u32.into(), b"done");
            answer
        }
    });
    let answers = bounded("sixteen refusals", futures_join_all(attacks.collect())).await;
    for answer in answers {
        let (code, message) = answer.expect("an Error frame before the close");
        assert_eq!(code, ErrorCode::TooLarge, "{message}");
        assert!(message.contains(&format!("at most {MAX_PREAUTH_FRAME} bytes")), "{message}");
        assert!(message.contains(&announced.to_string()), "{message}");
    }
    println!("VmRSS after sixteen refused 64 MiB announcements: {} kB", vm_rss());

    // The relay still serves an honest node.
    create_and_sync(&mut honest, &relay, "Medborgarlöfte Flen 2026").await;
    assert!(directory(&relay).members.len() == 1, "no stranger was enrolled");
    relay.shutdown().await;
}

/// Runs the futures concurrently and collects their outputs in order.
async fn futures_join_all<F: Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut pinned: Vec<_> = futures.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = pinned.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (future, slot) in pinned.iter_mut().zip(out.iter_mut()) {
            if slot.is_none() {
                match future.as_mut().poll(cx) {
                    std::task::Poll::Ready(value) => *slot = Some(value),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().map(|o| o.expect("every future finished")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_frame_that_is_late_wrong_or_too_long_gets_a_reason_before_the_close() {
    let root = tempfile::tempdir().unwrap();
    let relay = start_relay(&root.path().join("relay"), Some(Duration::from_millis(500))).await;

    // Half a length prefix, then silence until the handshake timeout.
    let (_conn, mut send, mut recv) = raw_stream(&relay, &NodeKey::generate()).await;
    send.write_all(&[0, 0]).await.unwrap();
    let (code, message) = error_frame(&mut recv).await.expect("a reason for the timeout");
    assert_eq!(code, ErrorCode::Unauthenticated, "{message}");
    assert!(message.contains("no Hello or Join within the handshake timeout"), "{message}");

    // Something other than Hello or Join first.
    let (_conn, mut send, mut recv) = raw_stream(&relay, &NodeKey::generate()).await;
    send.write_all(&Frame::InSync.encode()).await.unwrap();
    let (code, message) = error_frame(&mut recv).await.expect("a reason for the refusal");
    assert_eq!(code, ErrorCode::Unauthenticated, "{message}");
    assert!(message.contains("expected Hello or Join first, got InSync"), "{message}");

    // A Hello above the pre-authentication limit, from an enrolled key: refused all the same.
    let key = NodeKey::generate();
    relay.enroll_node(key.node_id(), org("Flen"), "Flen").unwrap();
    let hello = Frame::Hello {
        protocol: PROTOCOL_VERSION,
        software: "x".repeat(5000),
        node: key.node_id().to_string(),
        directory: None,
    };
    let (_conn, mut send, mut recv) = raw_stream(&relay, &key).await;
    send.write_all(&hello.encode()).await.unwrap();
    let (code, message) = error_frame(&mut recv).await.expect("a reason for the refusal");
    assert_eq!(code, ErrorCode::TooLarge, "{message}");

    // An unenrolled key's Hello: refused with the way to get enrolled.
    let stranger = NodeKey::generate();
    let hello = Frame::Hello {
        protocol: PROTOCOL_VERSION,
        software: "x".into(),
        node: stranger.node_id().to_string(),
        directory: None,
    };
    let (_conn, mut send, mut recv) = raw_stream(&relay, &stranger).await;
    send.write_all(&hello.encode()).await.unwrap();
    let (code, message) = error_frame(&mut recv).await.expect("a reason for the refusal");
    assert_eq!(code, ErrorCode::Unauthenticated, "{message}");
    assert!(message.contains("not enrolled"), "{message}");
    relay.shutdown().await;
}

/// The reason a connection was closed with, as the peer sees it.
async fn close_reason(conn: &quinn::Connection) -> String {
    match bounded("the close", conn.closed()).await {
        quinn::ConnectionError::ApplicationClosed(close) => String::from_utf8_lossy(&close.reason).into_owned(),
        other => panic!("expected the relay to close the connection, got {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_close_carries_its_reason_and_refusals_are_counted_by_reason() {
    let root = tempfile::tempdir().unwrap();
    let mut config = RelayConfig::new("127.0.0.1:0".parse().unwrap(), root.path().join("relay"));
    config.limits.handshake_timeout = Duration::from_millis(500);
    config.monitoring.admin = Some(samverkan::relay::admin::AdminConfig::new("127.0.0.1:0".parse().unwrap()));
    let relay = server::spawn(config).await.expect("relay starts");

    // A peer that opens the stream and ends it without a word: an Error frame, then a close that says why.
    let (conn, mut send, mut recv) = raw_stream(&relay, &NodeKey::generate()).await;
    send.finish().unwrap();
    let (code, message) = error_frame(&mut recv).await.expect("a reason before the close");
    assert_eq!(code, ErrorCode::Unauthenticated, "{message}");
    assert!(message.contains("without a Hello or Join"), "{message}");
    let reason = close_reason(&conn).await;
    assert!(reason.contains("stream ended before the first frame"), "{reason}");

    // A peer that never opens a stream: no Error frame possible, the close says it.
    let identity = TlsIdentity::new(NodeKey::generate().signing_key(), "test-client").unwrap();
    let client = endpoint::client_endpoint(relay.local_addr()).unwrap();
    let limits = Limits::default();
    let connecting = endpoint::connect(&client, relay.local_addr(), &identity, *relay.relay_key().as_bytes(), &limits);
    let idle = bounded("connect", connecting).await.unwrap();
    let reason = close_reason(&idle).await;
    assert!(reason.contains("no sync stream opened"), "{reason}");

    // Fifty unenrolled keys knock: each is told, and counted under one reason.
    for _ in 0..50 {
        let stranger = NodeKey::generate();
        let hello = Frame::Hello {
            protocol: PROTOCOL_VERSION,
            software: "x".into(),
            node: stranger.node_id().to_string(),
            directory: None,
        };
        let (conn, mut send, mut recv) = raw_stream(&relay, &stranger).await;
        send.write_all(&hello.encode()).await.unwrap();
        let (code, _) = error_frame(&mut recv).await.expect("a reason for the refusal");
        assert_eq!(code, ErrorCode::Unauthenticated);
        assert!(close_reason(&conn).await.contains("not enrolled"));
    }
    let admin = relay.admin_addr().expect("admin server runs");
    let metrics = bounded("metrics", samverkan::relay::admin::get_path(admin, "/metrics", None, LIMIT)).await.unwrap();
    for line in [
        "samverkan_relay_refused_connections_total{reason=\"not enrolled\"} 50",
        "samverkan_relay_refused_connections_total{reason=\"stream ended before the first frame\"} 1",
        "samverkan_relay_refused_connections_total{reason=\"no sync stream\"} 1",
    ] {
        assert!(metrics.lines().any(|l| l == line), "no line {line:?} in\n{metrics}");
    }
    relay.shutdown().await;
}
