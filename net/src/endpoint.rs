//! quinn endpoints for relay and nodes, with limits that keep one peer from
//! exhausting the other: an idle timeout with keep-alives, bounded flow-control
//! windows (quinn's connection window is unlimited by default), one
//! bidirectional stream per connection, no unidirectional streams, and no 0-RTT
//! (replayable data before the handshake completes).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, TransportConfig, VarInt};
use samverkan_shared::wire::DEFAULT_MAX_FRAME;

use crate::tls::{self, AnyNodeKey, PinnedRelay, TlsIdentity};
use crate::NetError;

/// Transport limits, the same type on both ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest frame payload accepted or sent, in bytes.
    pub max_frame: usize,
    /// A connection with no traffic for this long is closed.
    pub idle_timeout: Duration,
    /// Keep-alive interval (must be well below `idle_timeout`).
    pub keep_alive: Duration,
    /// How long a handshake, or opening the sync stream, may take.
    pub handshake_timeout: Duration,
    /// Bytes a peer may have in flight on one stream: what it can make the
    /// receiver take in (and decrypt) beyond what the receiver has read
    /// (8 MiB by default, 1 MiB on the relay: [`Limits::relay`]).
    pub stream_window: u32,
    /// Bytes a peer may have in flight on one connection (16 MiB by default,
    /// 2 MiB on the relay).
    pub connection_window: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_frame: DEFAULT_MAX_FRAME,
            idle_timeout: Duration::from_secs(30),
            keep_alive: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(10),
            stream_window: 8 * 1024 * 1024,
            connection_window: 16 * 1024 * 1024,
        }
    }
}

/// The relay's connection-level flow-control window until it admits the peer
/// (see [`admit`]): a peer the relay does not know yet can have at most this
/// many stream bytes in flight, whatever `Limits::connection_window` says.
pub const PREAUTH_RECEIVE_WINDOW: u32 = 64 * 1024;

impl Limits {
    /// The relay's defaults: smaller flow-control windows than a node's. The
    /// relay budgets what each node key may make it read and stops reading a
    /// key past its budget, even mid-frame; a peer can then have only the
    /// window more in flight, which the relay still receives and decrypts.
    /// 1 MiB per stream passes 20 MiB/s at a 50 ms round trip, far more than a
    /// node's documents need. A node keeps the larger default windows for what
    /// the relay sends it (a fresh node's cold sync).
    pub fn relay() -> Self {
        Self { stream_window: 1024 * 1024, connection_window: 2 * 1024 * 1024, ..Self::default() }
    }

    fn transport(&self, accept_bidi_streams: u32) -> Result<Arc<TransportConfig>, NetError> {
        self.transport_with_window(accept_bidi_streams, self.connection_window)
    }

    fn transport_with_window(
        &self,
        accept_bidi_streams: u32,
        receive_window: u32,
    ) -> Result<Arc<TransportConfig>, NetError> {
        let mut transport = TransportConfig::default();
        let idle = IdleTimeout::try_from(self.idle_timeout)
            .map_err(|_| NetError::Io(format!("idle timeout {:?} is out of range", self.idle_timeout)))?;
        transport
            .max_idle_timeout(Some(idle))
            .keep_alive_interval(Some(self.keep_alive))
            .max_concurrent_bidi_streams(VarInt::from_u32(accept_bidi_streams))
            .max_concurrent_uni_streams(VarInt::from_u32(0))
            .stream_receive_window(VarInt::from_u32(self.stream_window))
            .receive_window(VarInt::from_u32(receive_window))
            .send_window(u64::from(self.connection_window));
        Ok(Arc::new(transport))
    }
}

/// A relay endpoint listening on `listen` with the relay's identity; every
/// client must prove an ed25519 key (read it with [`tls::peer_key`]).
///
/// Connections start with a receive window of [`PREAUTH_RECEIVE_WINDOW`]; call
/// [`admit`] once the peer is authenticated to open it to `limits.connection_window`.
pub fn server_endpoint(
    listen: SocketAddr,
    identity: &TlsIdentity,
    limits: &Limits,
) -> Result<quinn::Endpoint, NetError> {
    let mut crypto = rustls::ServerConfig::builder_with_provider(tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| NetError::Certificate(e.to_string()))?
        .with_client_cert_verifier(Arc::new(AnyNodeKey::new()))
        .with_single_cert(identity.chain(), identity.private_key())
        .map_err(|e| NetError::Certificate(e.to_string()))?;
    crypto.alpn_protocols = vec![tls::ALPN.to_vec()];
    crypto.max_early_data_size = 0;
    let crypto = QuicServerConfig::try_from(crypto).map_err(|e| NetError::Certificate(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    // A node opens exactly one stream for the sync protocol.
    config.transport_config(limits.transport_with_window(1, limits.connection_window.min(PREAUTH_RECEIVE_WINDOW))?);
    quinn::Endpoint::server(config, listen).map_err(|e| NetError::Io(format!("listening on {listen}: {e}")))
}

/// Opens an authenticated peer's connection to the full flow-control window of `limits`.
pub fn admit(conn: &quinn::Connection, limits: &Limits) {
    conn.set_receive_window(VarInt::from_u32(limits.connection_window));
}

/// A client endpoint suitable for reaching `target` (IPv4 or IPv6).
pub fn client_endpoint(target: SocketAddr) -> Result<quinn::Endpoint, NetError> {
    let bind: SocketAddr = if target.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().expect("literal address");
    quinn::Endpoint::client(bind).map_err(|e| NetError::Io(format!("binding a UDP socket: {e}")))
}

/// Connects to the relay at `addr` as `identity`, accepting only a relay that
/// proves the pinned `relay_key`.
pub async fn connect(
    client: &quinn::Endpoint,
    addr: SocketAddr,
    identity: &TlsIdentity,
    relay_key: [u8; 32],
    limits: &Limits,
) -> Result<quinn::Connection, NetError> {
    let fail = |reason: String| NetError::Connect { addr, reason };
    let mut crypto = rustls::ClientConfig::builder_with_provider(tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| fail(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedRelay::new(relay_key)))
        .with_client_auth_cert(identity.chain(), identity.private_key())
        .map_err(|e| fail(e.to_string()))?;
    crypto.alpn_protocols = vec![tls::ALPN.to_vec()];
    crypto.enable_early_data = false;
    let crypto = QuicClientConfig::try_from(crypto).map_err(|e| fail(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    // The relay never opens streams towards a node.
    config.transport_config(limits.transport(0)?);
    let connecting = client.connect_with(config, addr, tls::SERVER_NAME).map_err(|e| fail(e.to_string()))?;
    match tokio::time::timeout(limits.handshake_timeout, connecting).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(fail(e.to_string())),
        Err(_) => Err(fail(format!("no answer within {:?}", limits.handshake_timeout))),
    }
}
