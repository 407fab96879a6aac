//! `samverkan-relay`: the County Board's relay (skeleton; sync arrives with the sync issue).

use clap::Parser;

/// Samverkan relay: store-and-forward sync for the county's nodes.
///
/// Not yet able to serve: this build only reports its version. Nodes exchange
/// changes offline with `samverkan-node bundle export|import` meanwhile.
#[derive(Debug, Parser)]
#[command(name = "samverkan-relay", version = samverkan_relay::VERSION, about)]
struct Cli {}

fn main() {
    let _cli = Cli::parse();
    eprintln!("samverkan-relay {}: serving is not available in this build yet; use `samverkan-node bundle` to exchange changes offline", samverkan_relay::VERSION);
    std::process::exit(2);
}
