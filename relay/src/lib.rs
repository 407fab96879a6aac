//! The County Board's Samverkan relay.
//!
//! A skeleton until the sync issue lands: the relay will accept QUIC
//! connections from nodes, store every document it receives in its own SQLite
//! store behind a narrow storage interface, and forward changes between nodes.
//! See ARCHITECTURE.md for the planned modules.

#![warn(missing_docs)]

/// The relay's version, as reported to nodes and operators.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
