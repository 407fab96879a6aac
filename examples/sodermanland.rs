//! Södermanland county played out on one machine, over the real relay: the
//! County Board's relay and a node for each of the eleven parties, each with
//! its own SQLite file, on loopback (see `samverkan::playout`).
//!
//! `cargo run --release --example sodermanland [-- --dir DIR] [--keep-running]`
//!
//! Ends with exit status 0 when every node holds identical documents, and fails
//! loudly otherwise. `--keep-running` leaves the relay and its dashboard up, and
//! the daemons of Länsstyrelsen's and the police area's nodes with their web
//! apps (it prints their addresses, each with the node's secret).

use anyhow::Result;
use samverkan::playout::{self, Options};

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let dir = args
        .iter()
        .position(|a| a == "--dir")
        .and_then(|i| args.get(i + 1))
        .map(std::path::PathBuf::from)
        .unwrap_or_else(playout::fresh_dir);
    let keep_running = args.iter().any(|a| a == "--keep-running");
    playout::run(Options { dir, keep_running }).await?;
    Ok(())
}
