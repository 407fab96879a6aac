//! A party's local Samverkan node.
//!
//! Layout:
//! - [`store`]: the SQLite store (the `samverkan-store` crate, re-exported).
//! - [`node`]: the data directory (store + identity key) and every offline operation.
//! - [`sync`]: syncing with the relay over QUIC, once or as a daemon.
//! - [`status`]: what `samverkan-node status` reports (relay reachable, last sync,
//!   local changes waiting, remote changes since the last look).
//! - [`progress`]: the progress display of long syncs (a bar on a terminal, lines otherwise).
//! - [`recover`]: `samverkan-node recover`: a document the relay refused, rebuilt on what the relay holds (backup first).
//! - [`review`]: `samverkan-node review` (overlapping concurrent edits: list, settle, mark reviewed), `history` in words, and the review counts `show`, `export`, `list` and `status` flag.
//! - [`approvals`]: the approval commands (signer keys, approve, withdraw, verify, signed bundles).
//! - [`signer_key`]: signer key files sealed with a passphrase (Argon2id + ChaCha20-Poly1305); older unprotected ones stay readable.
//! - [`web`]: the local web app (`daemon`, `ui`): loopback HTTP with a per-node secret, CSRF tokens and live updates.
//! - [`cli`]: the `samverkan-node` command line.
//! - [`output`]: its standard output and error (a closed pipe ends the command quietly).
//!
//! The node works fully offline; documents reach other nodes through the relay
//! whenever it is reachable, or through bundle files.

#![warn(missing_docs)]
// Output goes through `output`, which survives a closed pipe; these panic.
#![deny(clippy::print_stdout, clippy::print_stderr)]

pub mod approvals;
pub mod cli;
pub mod node;
pub mod output;
pub mod progress;
pub mod recover;
pub mod review;
pub mod signer_key;
pub mod status;
pub mod sync;
pub mod web;

pub use samverkan_store as store;
