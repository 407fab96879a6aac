//! The County Board's Samverkan relay: store-and-forward sync over QUIC.
//!
//! Layout:
//! - [`storage`]: the narrow storage interface ([`storage::RelayStorage`]), its
//!   embedded SQLite implementation and [`storage::postgres`], on which several
//!   relay instances share one database.
//! - [`config`]: the TOML configuration file of `samverkan-relay serve`.
//! - [`enrollment`]: who may connect: the enrollment directory, join codes, the relay's key.
//! - [`hub`]: fan-out of "document changed" notices between connections, never blocking.
//! - [`handshake`]: which new connections are taken in before authentication (QUIC Retry under load, a share per address).
//! - [`budget`]: what one node key may make the relay read (bytes per second, shared by its connections).
//! - [`server`]: the QUIC accept loop and one sync task per node connection.
//! - [`record_keys`]: the approval records of each document version, parsed once (the relay checks what a change adds).
//! - [`monitor`]: the operator's view (per-node and per-document status, metrics),
//!   fed by the connection tasks; node names through a [`monitor::NameResolver`].
//! - [`admin`]: the admin HTTP server (dashboard, JSON status, `/metrics`, `/healthz`)
//!   and the client `samverkan-relay status` uses.
//!
//! The relay keeps every document it receives durably, forwards changes to every
//! other connected node within milliseconds, and serves nodes that were offline
//! when they next connect. Documents are loaded on demand and at most
//! [`server::RelayConfig::cached_documents`] stay in memory.

#![warn(missing_docs)]

pub mod admin;
pub mod budget;
pub mod config;
pub mod enrollment;
pub mod handshake;
pub mod hub;
pub mod monitor;
pub mod record_keys;
pub mod server;
pub mod storage;

/// The relay's version, as reported to nodes and operators.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
