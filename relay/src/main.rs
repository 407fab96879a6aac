//! `samverkan-relay`: parses flags, sets up logging and runs the relay.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use samverkan_relay::admin::{self, AdminConfig, DEFAULT_ADMIN, TOKEN_ENV};
use samverkan_relay::monitor;
use samverkan_relay::server::{self, RelayConfig};

/// Samverkan relay: store-and-forward sync for the county's nodes.
#[derive(Debug, Parser)]
#[command(name = "samverkan-relay", version = samverkan_relay::VERSION, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve nodes over QUIC until interrupted (Ctrl-C or SIGTERM).
    Serve {
        /// Address to listen on (UDP).
        #[arg(long, default_value = "0.0.0.0:7878")]
        listen: SocketAddr,
        /// Where the relay keeps its database and certificate.
        #[arg(long, env = "SAMVERKAN_RELAY_DATA_DIR")]
        data_dir: PathBuf,
        /// Documents kept loaded in memory at most.
        #[arg(long, default_value_t = 256)]
        cached_documents: usize,
        /// Connections served at once.
        #[arg(long, default_value_t = 4096)]
        max_connections: usize,
        /// Address of the admin HTTP server (dashboard, /api/status, /metrics, /healthz).
        #[arg(long, default_value = DEFAULT_ADMIN)]
        admin: SocketAddr,
        /// Do not run the admin HTTP server.
        #[arg(long, conflicts_with = "admin")]
        no_admin: bool,
        /// Token the admin API and metrics demand (required when --admin is not a loopback address).
        #[arg(long, env = TOKEN_ENV, hide_env_values = true)]
        admin_token: Option<String>,
        /// Flag a node as stale when it has not been seen for this many minutes.
        #[arg(long, default_value_t = 24 * 60)]
        stale_after_minutes: u64,
    },
    /// Show the running relay's status: every node, in sync, behind or stale.
    Status {
        /// Address of the running relay's admin server.
        #[arg(long, default_value = DEFAULT_ADMIN)]
        admin: SocketAddr,
        /// The admin token, if the relay demands one.
        #[arg(long, env = TOKEN_ENV, hide_env_values = true)]
        admin_token: Option<String>,
        /// Print the JSON status instead of a table.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SAMVERKAN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    match cli.command {
        Command::Status { admin, admin_token, json } => runtime.block_on(async {
            let status = admin::fetch_status(admin, admin_token.as_deref()).await.with_context(|| {
                format!("cannot read the relay's status from {admin} (is it running with --admin {admin}?)")
            })?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", monitor::format_table(&status));
            }
            Ok(())
        }),
        Command::Serve {
            listen,
            data_dir,
            cached_documents,
            max_connections,
            admin,
            no_admin,
            admin_token,
            stale_after_minutes,
        } => runtime.block_on(async {
            let mut config = RelayConfig::new(listen, data_dir);
            config.cached_documents = cached_documents;
            config.max_connections = max_connections;
            config.monitoring.stale_after = std::time::Duration::from_secs(stale_after_minutes.saturating_mul(60));
            if !no_admin {
                config.monitoring.admin = Some(AdminConfig { listen: admin, token: admin_token });
            }
            let relay = server::spawn(config).await?;
            println!("samverkan-relay {} listening on {}", samverkan_relay::VERSION, relay.local_addr());
            println!("certificate fingerprint (give it to nodes): {}", relay.fingerprint());
            if let Some(addr) = relay.admin_addr() {
                println!("admin dashboard: http://{addr}/  (status: samverkan-relay status --admin {addr})");
            }
            let stop = relay.shutdown_signal();
            tokio::spawn(async move {
                shutdown_requested().await;
                let _ = stop.send(true);
            });
            relay.wait().await;
            println!("relay stopped");
            Ok(())
        }),
    }
}

async fn shutdown_requested() {
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => return std::future::pending().await,
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}
