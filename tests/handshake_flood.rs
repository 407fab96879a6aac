//! Handshakes from outside, against a real relay over QUIC on 127.0.0.1: an
//! outsider who starts handshakes and never finishes them (from addresses it
//! does not have to own: a QUIC Initial packet is all it takes) does not lock
//! enrolled nodes out. Bounded loops and timeouts everywhere.

use std::net::SocketAddr;
use std::time::Duration;

use samverkan::net::endpoint::{self, Limits};
use samverkan::net::tls::TlsIdentity;
use samverkan::node::node::Node;
use samverkan::node::sync;
use samverkan::relay::monitor::ReasonLabels;
use samverkan::relay::server::RelayHandle;
use samverkan::shared::identity::NodeKey;
use samverkan::shared::model::{DocKind, DocumentContent};

#[path = "support/relay_net.rs"]
mod relay_net;
use relay_net::{bounded, eventually, org, relay_config, spawn_relay, target, LIMIT};

/// `count` QUIC Initial packets, each opening another handshake (its own
/// connection id), as a real client sends them first; captured by pointing a
/// client at a socket that never answers.
async fn captured_initials(relay: &RelayHandle, count: usize) -> Vec<Vec<u8>> {
    let identity = std::sync::Arc::new(TlsIdentity::new(NodeKey::generate().signing_key(), "outsider").unwrap());
    let mut initials = Vec::with_capacity(count);
    let mut buf = vec![0u8; 65_536];
    for _ in 0..count {
        // A socket of its own each: only the first packet of each attempt is
        // taken, not what the client sends when it gives up.
        let sink = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let sink_addr = sink.local_addr().unwrap();
        let client = endpoint::client_endpoint(sink_addr).unwrap();
        let (identity, relay_key) = (identity.clone(), *relay.relay_key().as_bytes());
        let connecting = tokio::spawn(async move {
            let _ = endpoint::connect(&client, sink_addr, &identity, relay_key, &Limits::default()).await;
        });
        let (n, _) = bounded("an Initial packet", sink.recv_from(&mut buf)).await.unwrap();
        initials.push(buf[..n].to_vec());
        connecting.abort();
    }
    initials
}

/// Sends each packet to `to` from a socket of its own (another "client" each),
/// and keeps the sockets open (answers reach them and are never read).
async fn replay(initials: &[Vec<u8>], to: SocketAddr) -> Vec<tokio::net::UdpSocket> {
    let mut sockets = Vec::with_capacity(initials.len());
    for packet in initials {
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        socket.send_to(packet, to).await.unwrap();
        sockets.push(socket);
    }
    sockets
}

fn refused(relay: &RelayHandle, reason: &'static str) -> u64 {
    relay.metrics().refused_connections.get_or_create(&ReasonLabels { reason }).get()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_an_outsider_never_finishes_do_not_lock_enrolled_nodes_out() {
    let root = tempfile::tempdir().unwrap();
    let mut config = relay_config(&root.path().join("relay"));
    config.max_connections = 32;
    config.limits.handshake_timeout = Duration::from_secs(2);
    let relay = spawn_relay(config).await;
    let mut node = Node::init(&root.path().join("flen"), "Flen", Some("flen")).unwrap();
    relay.enroll_node(node.node_id(), node.org().clone(), "flen").unwrap();
    let mut content = DocumentContent::new(DocKind::CitizenPromise, "Medborgarlöfte Flen 2026");
    content.parties = vec![org("Flen")];
    node.create(content).unwrap();

    // Three times the relay's connection limit, each from another address and
    // port as far as the relay can tell, each left half-open.
    let initials = captured_initials(&relay, 96).await;
    let _outsiders = replay(&initials, relay.local_addr()).await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    // The enrolled node connects and syncs at once, not after the outsider's
    // handshakes time out (30 s).
    let synced = bounded("sync", sync::sync_once(&mut node, &target(&relay), LIMIT)).await;
    assert!(synced.is_ok(), "{synced:?}");
    let metrics = relay.metrics();
    println!(
        "{} handshakes answered with a Retry, {} in progress",
        metrics.handshakes_retried.get(),
        metrics.handshakes_in_progress.get()
    );
    // At most half of the slots held (16), the rest answered without keeping anything.
    assert!(metrics.handshakes_retried.get() >= 80, "the flood was answered statelessly");
    assert!(metrics.handshakes_in_progress.get() <= 16);
    // Half-open handshakes are dropped after the handshake timeout.
    eventually("the half-open handshakes dropped", || {
        let (now, gone) = (metrics.handshakes_in_progress.get(), refused(&relay, "handshake timed out"));
        now == 0 && gone >= 16
    })
    .await;
    relay.shutdown().await;
}

/// A client that finishes TLS (any key may: a node with a join code is not
/// enrolled yet) and then never says who it is holds its place until the
/// handshake timeout. From one address of its own, an outsider opens many such
/// connections: beyond the Retry threshold that address gets its share only,
/// and enrolled nodes elsewhere still connect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_holding_connections_that_never_authenticate_does_not_lock_nodes_out() {
    let root = tempfile::tempdir().unwrap();
    let mut config = relay_config(&root.path().join("relay"));
    config.max_connections = 32;
    config.handshakes_per_address = 4;
    let relay = spawn_relay(config).await;
    let mut node = Node::init(&root.path().join("flen"), "Flen", Some("flen")).unwrap();
    relay.enroll_node(node.node_id(), node.org().clone(), "flen").unwrap();

    // The outsider's own address (another loopback address than the node's).
    let client = quinn::Endpoint::client("127.0.0.2:0".parse().unwrap()).unwrap();
    let identity = TlsIdentity::new(NodeKey::generate().signing_key(), "outsider").unwrap();
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..64 {
        let relay_key = *relay.relay_key().as_bytes();
        match endpoint::connect(&client, relay.local_addr(), &identity, relay_key, &Limits::default()).await {
            Ok(conn) => held.push(conn), // and never opens a stream
            Err(_) => refused += 1,
        }
    }
    println!("{} connections held from one address, {refused} refused", held.len());
    // Half of the slots below the Retry threshold, then the address's share.
    assert!(held.len() <= 16 + 4, "{} held", held.len());
    let synced = bounded("sync", sync::sync_once(&mut node, &target(&relay), LIMIT)).await;
    assert!(synced.is_ok(), "{synced:?}");
    assert_eq!(relay.metrics().handshakes_in_progress.get(), held.len() as i64);
    drop(held);
    relay.shutdown().await;
}
