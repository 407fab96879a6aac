//! Samverkan's QUIC transport, shared by node and relay.
//!
//! Layout:
//! - [`tls`]: mutual authentication by ed25519 keys: each side's certificate is
//!   made from its identity key; nodes pin the relay's key, the relay reads the
//!   node's proven key and checks its enrollment.
//! - [`endpoint`]: quinn endpoints with safe [`endpoint::Limits`] (idle timeout,
//!   flow-control windows, stream counts, no 0-RTT).
//! - [`framed`]: one bidirectional stream carrying [`samverkan_shared::wire::Frame`]s,
//!   decoded with the sans-IO [`samverkan_shared::wire::FrameDecoder`].
//! - [`backoff`]: exponential reconnect delays with jitter.
//!
//! This crate knows connections and frames, never documents: what a frame means
//! is decided by the sync core in `samverkan-shared`.

#![warn(missing_docs)]

pub mod backoff;
pub mod endpoint;
pub mod framed;
pub mod tls;

use samverkan_shared::wire::WireError;

/// Errors of the transport.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A file or socket operation failed.
    #[error("i/o: {0}")]
    Io(String),
    /// A certificate could not be made from a key.
    #[error("certificate: {0}")]
    Certificate(String),
    /// The connection could not be set up.
    #[error("cannot connect to {addr}: {reason}")]
    Connect {
        /// Where we tried to connect.
        addr: std::net::SocketAddr,
        /// Why it failed (a pinning mismatch says so here).
        reason: String,
    },
    /// The connection broke or was closed by the peer.
    #[error("connection lost: {0}")]
    ConnectionLost(String),
    /// The peer sent bytes that are not valid frames.
    #[error("bad frame from peer: {0}")]
    Wire(#[from] WireError),
    /// A frame to send is larger than the limit.
    #[error("frame to send is too large: {0}")]
    TooLarge(WireError),
    /// The peer did not open the stream in time.
    #[error("the peer opened no stream within {0:?}")]
    NoStream(std::time::Duration),
}
