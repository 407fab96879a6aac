//! `samverkan-relay`: parses flags, sets up logging and runs the relay.
//!
//! Everything it prints goes through [`say`] (or, while serving, [`say_best_effort`]);
//! `println!` and `eprintln!` are denied here because they panic when the stream
//! is closed. When the reader of standard output goes away early
//! (`samverkan-relay list | head -1`), [`say`] returns [`OutputClosed`] and the
//! command ends quietly with exit status 0; a serving relay keeps serving.
//! (Restoring the default `SIGPIPE` action instead would need `unsafe`, and would
//! let a vanished log reader kill `serve`, overriding a service manager's choice.)

#![deny(clippy::print_stdout, clippy::print_stderr)]

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use samverkan_relay::admin::{self, AdminConfig, DEFAULT_ADMIN, TOKEN_ENV};
use samverkan_relay::config::{RelayFile, StorageLocation};
use samverkan_relay::server::{self, RelayConfig};
use samverkan_relay::storage::postgres::PostgresStorage;
use samverkan_relay::storage::SqliteStorage;
use samverkan_relay::{enrollment, monitor};
use samverkan_shared::directory::{JoinCode, Member, MemberKind};
use samverkan_shared::identity::NodeId;

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
        /// A TOML configuration file (keys and defaults: README, Configuration); flags win over it.
        #[arg(long, env = "SAMVERKAN_RELAY_CONFIG")]
        config: Option<PathBuf>,
        /// Address to listen on (UDP) [default: 0.0.0.0:7878].
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Where the relay keeps its database and key.
        #[arg(long, env = "SAMVERKAN_RELAY_DATA_DIR")]
        data_dir: Option<PathBuf>,
        /// Where the relay's data lives: `sqlite` (relay.db in the data directory, the default) or
        /// the PostgreSQL database its instances share (postgres://user@host:port/database).
        #[arg(long, env = "SAMVERKAN_RELAY_STORAGE")]
        storage: Option<StorageLocation>,
        /// Documents kept loaded in memory at most [default: 256].
        #[arg(long)]
        cached_documents: Option<usize>,
        /// Connections served at once [default: 4096].
        #[arg(long)]
        max_connections: Option<usize>,
        /// Address of the admin HTTP server (dashboard, /api/status, /metrics, /healthz) [default: 127.0.0.1:7879].
        #[arg(long)]
        admin: Option<SocketAddr>,
        /// Do not run the admin HTTP server.
        #[arg(long, conflicts_with = "admin")]
        no_admin: bool,
        /// Token the admin API and metrics demand (required when --admin is not a loopback address).
        #[arg(long, env = TOKEN_ENV, hide_env_values = true)]
        admin_token: Option<String>,
        /// Flag a node as stale when it has not been seen for this many minutes [default: 1440].
        #[arg(long)]
        stale_after_minutes: Option<u64>,
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
    /// Enroll a node key (or a signer's key), or issue a one-time join code for a node.
    Enroll {
        /// The data directory the relay serves from (`serve --data-dir`); it must hold a relay already.
        #[arg(long, env = "SAMVERKAN_RELAY_DATA_DIR")]
        data_dir: PathBuf,
        /// Where the relay's data lives: `sqlite` (relay.db in the data directory, the default) or
        /// the PostgreSQL database its instances share (postgres://user@host:port/database).
        #[arg(long, env = "SAMVERKAN_RELAY_STORAGE")]
        storage: Option<StorageLocation>,
        /// The organisation (name or id, e.g. "Flen", "Länsstyrelsen", "polisen").
        #[arg(long)]
        org: String,
        /// A readable name ("Flen BF-samordnare").
        #[arg(long)]
        name: String,
        /// The node's (or signer's) public key, 64 hex digits (`samverkan-node whoami`).
        #[arg(long, conflicts_with = "join_code")]
        key: Option<String>,
        /// Instead of a key: print a one-time join code for `samverkan-node join`.
        #[arg(long)]
        join_code: bool,
        /// With --join-code: the relay's address as nodes reach it (host:port);
        /// relay instances sharing one database: each instance's, repeated or
        /// separated by commas, the first tried first.
        #[arg(long, requires = "join_code", value_delimiter = ',')]
        address: Vec<String>,
        /// With --join-code: hours the code stays valid.
        #[arg(long, default_value_t = 72)]
        valid_hours: i64,
        /// Enroll a signer (a person who approves documents) with this role title.
        #[arg(long, requires = "key")]
        signer_role: Option<String>,
    },
    /// Revoke a key: its connections are closed and it can no longer connect.
    Revoke {
        /// The data directory the relay serves from (`serve --data-dir`); it must hold a relay already.
        #[arg(long, env = "SAMVERKAN_RELAY_DATA_DIR")]
        data_dir: PathBuf,
        /// Where the relay's data lives: `sqlite` (relay.db in the data directory, the default) or
        /// the PostgreSQL database its instances share (postgres://user@host:port/database).
        #[arg(long, env = "SAMVERKAN_RELAY_STORAGE")]
        storage: Option<StorageLocation>,
        /// The public key, 64 hex digits.
        #[arg(long)]
        key: String,
    },
    /// List enrolled nodes and signers.
    List {
        /// The data directory the relay serves from (`serve --data-dir`); it must hold a relay already.
        #[arg(long, env = "SAMVERKAN_RELAY_DATA_DIR")]
        data_dir: PathBuf,
        /// Where the relay's data lives: `sqlite` (relay.db in the data directory, the default) or
        /// the PostgreSQL database its instances share (postgres://user@host:port/database).
        #[arg(long, env = "SAMVERKAN_RELAY_STORAGE")]
        storage: Option<StorageLocation>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the relay's public key (nodes pin it); makes the key at first use.
    Key {
        /// Where the relay keeps its key.
        #[arg(long, env = "SAMVERKAN_RELAY_DATA_DIR")]
        data_dir: PathBuf,
    },
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SAMVERKAN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // A closed standard error loses log lines; it must not panic (the default reports with `eprintln!`).
        .log_internal_errors(false)
        .init();
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        // `samverkan-relay list | head -1`: the reader has what it wanted.
        Err(e) if e.chain().any(|cause| cause.is::<OutputClosed>()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            let _ = writeln!(std::io::stderr().lock(), "error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Standard output was closed by its reader: the command stops printing and
/// the process exits quietly with status 0.
#[derive(Debug, thiserror::Error)]
#[error("standard output was closed by its reader")]
struct OutputClosed;

/// Writes `text` and a newline to standard output and flushes. A closed stream
/// is [`OutputClosed`]; any other failure is an error naming standard output.
fn say(text: impl std::fmt::Display) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match writeln!(out, "{text}").and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(OutputClosed.into()),
        Err(e) => Err(anyhow::Error::new(e).context("writing to standard output")),
    }
}

/// [`say`] for `serve`: a relay keeps serving when nobody reads what it prints.
fn say_best_effort(text: impl std::fmt::Display) {
    let _ = say(text);
}

fn open_storage(data_dir: &std::path::Path) -> anyhow::Result<SqliteStorage> {
    let path = data_dir.join(server::DB_FILE);
    SqliteStorage::open(&path, 4).with_context(|| format!("opening the relay database {}", path.display()))
}

fn open_postgres(url: &str) -> anyhow::Result<PostgresStorage> {
    PostgresStorage::open(url, 4).context("opening the relay's PostgreSQL database")
}

/// Runs `$body` with `$storage` bound to the relay's storage (SQLite in the
/// data directory, or the PostgreSQL database `--storage` names).
macro_rules! with_storage {
    ($location:expr, $data_dir:expr, |$storage:ident| $body:expr) => {
        match $location.unwrap_or_default() {
            StorageLocation::Sqlite => {
                let $storage = open_storage($data_dir)?;
                $body
            }
            StorageLocation::Postgres(url) => {
                let $storage = open_postgres(&url)?;
                $body
            }
        }
    };
}

/// Refuses a data directory that holds no relay (no `relay.key`): a typo, or a
/// placeholder left in a pasted command, must not set up a new, empty relay.
fn existing_relay(data_dir: &std::path::Path) -> anyhow::Result<()> {
    if data_dir.join(enrollment::KEY_FILE).exists() {
        return Ok(());
    }
    bail!(
        "{dir} holds no relay (no {key}): give the data directory the relay serves from (as `samverkan-relay serve \
         --data-dir` or SAMVERKAN_RELAY_DATA_DIR names it); to set up a new relay in {dir}, run \
         `samverkan-relay key --data-dir {dir}` first",
        dir = data_dir.display(),
        key = enrollment::KEY_FILE
    )
}

fn parse_key(text: &str) -> anyhow::Result<NodeId> {
    text.parse().with_context(|| format!("{text:?} is not a public key (64 hex digits)"))
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Status { admin, admin_token, json } => {
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            runtime.block_on(async {
                let status = admin::fetch_status(admin, admin_token.as_deref()).await.with_context(|| {
                    format!("cannot read the relay's status from {admin} (is it running with --admin {admin}?)")
                })?;
                if json {
                    say(serde_json::to_string_pretty(&status)?)?;
                } else {
                    say(monitor::format_table(&status).trim_end())?;
                }
                Ok(())
            })
        }
        Command::Enroll { data_dir, storage, org, name, key, join_code, address, valid_hours, signer_role } => {
            existing_relay(&data_dir)?;
            let org = enrollment::organisations(&data_dir)?
                .resolve(&org)
                .with_context(|| format!("unknown organisation {org:?}"))?
                .id
                .clone();
            let relay_key = server::load_or_create_key(&data_dir)?.node_id();
            with_storage!(storage, &data_dir, |storage| enroll(
                &storage,
                relay_key,
                org,
                name,
                key,
                join_code.then_some(address),
                valid_hours,
                signer_role
            ))
        }
        Command::Revoke { data_dir, storage, key } => {
            existing_relay(&data_dir)?;
            let key = parse_key(&key)?;
            let member =
                with_storage!(storage, &data_dir, |storage| enrollment::revoke(&storage, &key, chrono::Utc::now()))?;
            say(format_args!(
                "revoked {} ({}); a running relay disconnects it within seconds",
                member.name, member.org
            ))?;
            Ok(())
        }
        Command::List { data_dir, storage, json } => {
            existing_relay(&data_dir)?;
            let directory = with_storage!(storage, &data_dir, |storage| enrollment::directory(&storage))?;
            list(&directory, json)
        }
        Command::Key { data_dir } => say(server::load_or_create_key(&data_dir)?.node_id()),
        Command::Serve {
            config: config_file,
            listen,
            data_dir,
            storage,
            cached_documents,
            max_connections,
            admin,
            no_admin,
            admin_token,
            stale_after_minutes,
        } => {
            // Defaults, then the file, then the flags.
            let mut config = RelayConfig::new("0.0.0.0:7878".parse()?, PathBuf::new());
            config.monitoring.admin = Some(AdminConfig::new(DEFAULT_ADMIN.parse()?));
            if let Some(path) = &config_file {
                RelayFile::load(path)?.apply(&mut config).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            }
            if let Some(storage) = storage {
                config.storage = storage;
            }
            if let Some(listen) = listen {
                config.listen = listen;
            }
            if let Some(dir) = data_dir {
                config.data_dir = dir;
            }
            if config.data_dir.as_os_str().is_empty() {
                bail!("no data directory: give --data-dir, SAMVERKAN_RELAY_DATA_DIR or data_dir in the config file");
            }
            if let Some(n) = cached_documents {
                config.cached_documents = n;
            }
            if let Some(n) = max_connections {
                config.max_connections = n;
            }
            if let Some(minutes) = stale_after_minutes {
                config.monitoring.stale_after = std::time::Duration::from_secs(minutes.saturating_mul(60));
            }
            if no_admin {
                config.monitoring.admin = None;
            } else if let Some(admin_config) = config.monitoring.admin.as_mut() {
                if let Some(addr) = admin {
                    admin_config.listen = addr;
                }
                if admin_token.is_some() {
                    admin_config.token = admin_token;
                }
            }
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            runtime.block_on(async {
                // Handlers first: a SIGTERM right after the relay says it listens must stop it cleanly.
                let stop_requested = shutdown_requested()?;
                let relay = server::spawn(config).await?;
                say_best_effort(format_args!(
                    "samverkan-relay {} listening on {}",
                    samverkan_relay::VERSION,
                    relay.local_addr()
                ));
                say_best_effort(format_args!("relay key (nodes pin it): {}", relay.relay_key()));
                if let Some(addr) = relay.admin_addr() {
                    say_best_effort(format_args!(
                        "admin dashboard: http://{addr}/  (status: samverkan-relay status --admin {addr})"
                    ));
                }
                let stop = relay.shutdown_signal();
                tokio::spawn(async move {
                    stop_requested.await;
                    let _ = stop.send(true);
                });
                relay.wait().await;
                say_best_effort("relay stopped");
                Ok(())
            })
        }
    }
}

/// `enroll`: a key, or (with `join_code`, the addresses nodes reach the relay at) a join code.
#[allow(clippy::too_many_arguments)]
fn enroll<S: samverkan_relay::storage::RelayStorage>(
    storage: &S,
    relay_key: NodeId,
    org: samverkan_shared::org::OrgId,
    name: String,
    key: Option<String>,
    join_code: Option<Vec<String>>,
    valid_hours: i64,
    signer_role: Option<String>,
) -> anyhow::Result<()> {
    if let Some(addresses) = join_code {
        if addresses.is_empty() {
            bail!("--join-code needs --address host:port (how nodes reach this relay)")
        }
        let addresses: Vec<String> = addresses.iter().map(|a| a.trim().to_string()).collect();
        // Checked before a secret is stored: a code nobody can use is never issued.
        if let Err(e) = samverkan_shared::directory::check_join_addresses(&addresses) {
            bail!("--address: {e}")
        }
        let secret = enrollment::issue_join(
            storage,
            org.clone(),
            &name,
            chrono::Duration::hours(valid_hours),
            chrono::Utc::now(),
        )?;
        let code = JoinCode::new(secret, relay_key, addresses)?;
        say(format_args!("join code for {name} ({org}), valid {valid_hours} h, usable once:\n{code}"))?;
        say(format_args!("on the node: samverkan-node join {code}"))?;
        return Ok(());
    }
    let Some(key) = key else { bail!("give --key <node key> or --join-code") };
    let key = parse_key(&key)?;
    let kind = if signer_role.is_some() { MemberKind::Signer } else { MemberKind::Node };
    enrollment::enroll(
        storage,
        Member {
            key,
            kind,
            org: org.clone(),
            name: name.clone(),
            role: signer_role,
            enrolled_at: chrono::Utc::now(),
            revoked_at: None,
        },
    )?;
    say(format_args!("enrolled {name} ({org}) with key {key}"))?;
    say(format_args!("relay key for the node to pin: {relay_key}"))?;
    Ok(())
}

/// `list`: the enrollment directory as a table or JSON.
fn list(directory: &samverkan_shared::directory::EnrollmentDirectory, json: bool) -> anyhow::Result<()> {
    if json {
        say(serde_json::to_string_pretty(directory)?)?;
        return Ok(());
    }
    say(format_args!("{:<8} {:<14} {:<32} {:<20} {:<10} ROLE", "KIND", "ORG", "NAME", "KEY", "STATE"))?;
    for m in &directory.members {
        let state = match m.revoked_at {
            Some(t) => format!("revoked {}", t.format("%Y-%m-%d")),
            None => "enrolled".to_string(),
        };
        let kind = if m.kind == MemberKind::Node { "node" } else { "signer" };
        say(format_args!(
            "{:<8} {:<14} {:<32} {:<20} {:<10} {}",
            kind,
            m.org,
            m.name,
            m.key.short(),
            state,
            m.role.as_deref().unwrap_or("")
        ))?;
    }
    Ok(())
}

/// Installs the Ctrl-C and SIGTERM handlers now and returns a future that
/// completes when either arrives.
fn shutdown_requested() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
        let mut interrupt = signal(SignalKind::interrupt()).context("installing the Ctrl-C handler")?;
        Ok(async move {
            tokio::select! {
                _ = interrupt.recv() => {}
                _ = term.recv() => {}
            }
        })
    }
    #[cfg(not(unix))]
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
    })
}
