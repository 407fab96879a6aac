//! A party's local Samverkan node.
//!
//! Layout:
//! - [`store`]: the SQLite store (the `samverkan-store` crate, re-exported).
//! - [`node`]: the data directory (store + identity key) and every offline operation.
//! - [`cli`]: the `samverkan-node` command line.
//!
//! The node works fully offline; documents reach other nodes through bundles
//! (and, with the sync issue, through the relay).

#![warn(missing_docs)]

pub mod cli;
pub mod node;

pub use samverkan_store as store;
