//! Samverkan's shared core, used by the node, the relay and the tests.
//!
//! Layout:
//! - [`acceptance`]: what is accepted from others on every path: authors, signatures, sizes.
//! - [`approval`]: signed approvals of document versions: signed message, records, verification, approval state, signed bundles.
//! - [`ids`]: typed ids of documents and list items.
//! - [`org`]: organisations (parties), the units within them (lokalpolisområden, förvaltningar), and the directory that names them (`organisations.toml`).
//! - [`identity`]: ed25519 node keys; a node's public key is its Automerge actor.
//! - [`authorship`]: every change signed by its author, verified by whoever receives it.
//! - [`directory`]: the enrollment directory (keys → organisation, name, role), signed by the relay; join codes.
//! - [`model`]: the collaboration documents as typed Rust over Automerge.
//! - [`receipt`]: the relay's signed receipts of approval records (when it first received each).
//! - [`recovery`]: recovering a document the relay refused: the accepted set, what happens to each dropped change, the rebuilt history.
//! - [`markdown`]: Markdown import, export and human-readable rendering.
//! - [`bundle`]: the offline exchange file (changes another node lacks).
//! - [`signed_bundle`]: the self-contained bundle of an approved version, verifiable offline.
//! - [`wire`]: frames of the node–relay protocol (length-prefixed, versioned).
//! - [`sync`]: the sans-IO sync core that node and relay drive.
//!
//! Invariant: this crate does no I/O (no files, sockets or clocks); callers pass
//! bytes and times in and get bytes and values out.

#![warn(missing_docs)]

pub mod acceptance;
pub mod approval;
pub mod authorship;
pub mod bundle;
pub mod directory;
pub mod identity;
pub mod ids;
pub mod markdown;
pub mod model;
pub mod org;
pub mod receipt;
pub mod recovery;
pub mod signed_bundle;
pub mod sync;
pub mod wire;

pub use automerge;
