//! The relay's configuration file (`samverkan-relay serve --config relay.toml`).
//!
//! Every key is optional; a missing key keeps its default, and a flag given
//! on the command line wins over the file. Unknown keys are an error, so a
//! typo never silently falls back to a default. The keys and their defaults:
//!
//! ```toml
//! listen = "0.0.0.0:7878"            # UDP address of the QUIC endpoint
//! data_dir = "/var/lib/samverkan"    # relay.db and relay.key (no default: required here or as a flag)
//! cached_documents = 256             # documents kept loaded in memory at most
//! max_connections = 4096             # connections served at once
//! max_connections_per_key = 4        # per node key; the oldest are closed beyond it
//! handshakes_before_retry = 64       # connections not yet authenticated beyond which a new one
//!                                    # must prove its address first (a QUIC Retry, one round trip)
//! handshakes_per_address = 16        # connections not yet authenticated per (proven) address beyond that
//! stale_after_minutes = 1440         # a node not seen for this long is flagged stale
//! storage = "sqlite"                 # or "postgres://relay@db.example:5432/samverkan": several
//!                                    # relay instances (same relay.key) may share one database
//!
//! [admin]
//! enabled = true                     # the admin HTTP server (dashboard, JSON, /metrics, /healthz)
//! listen = "127.0.0.1:7879"          # a non-loopback address requires a token
//! token = "…"                        # or SAMVERKAN_ADMIN_TOKEN
//!
//! [limits]
//! max_frame_bytes = 67108864         # largest wire frame accepted or sent (64 MiB)
//! idle_timeout_seconds = 30          # a silent connection is closed after this
//! keep_alive_seconds = 5
//! handshake_timeout_seconds = 10     # TLS handshake and the node's first frame
//! max_change_bytes = 4194304         # largest single change accepted (4 MiB)
//! max_document_bytes = 33554432      # largest document, as the sum of its changes (32 MiB);
//!                                    # with 1 MiB headroom it must fit max_frame_bytes
//! max_change_operations = 500000    # most operations in one change (counted before Automerge
//!                                    # sees it: a change of 100 bytes can carry millions)
//! max_message_operations = 2000000  # most in one sync message (a whole document's history
//!                                    # travels in one to a node syncing from nothing)
//! receive_bytes_per_second_per_key = 8388608  # what one node key may make the relay read on average (8 MiB/s)
//! receive_burst_bytes_per_key = 4194304       # and at once (4 MiB), even mid-frame; every frame counts at least 4 KiB
//!
//! [postgres]
//! pool_size = 8                      # with storage = "postgres://…": connections (and storage
//!                                    # worker threads) this instance opens at most
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::admin::AdminConfig;
use crate::server::RelayConfig;

/// Where the relay keeps its data.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum StorageLocation {
    /// The embedded SQLite database `relay.db` in the data directory (the default).
    #[default]
    Sqlite,
    /// A PostgreSQL database (`postgres://user@host:port/db`), which several
    /// relay instances may share (see [`crate::storage::postgres`]).
    Postgres(String),
}

impl std::str::FromStr for StorageLocation {
    type Err = String;

    /// `sqlite` or a `postgres://` / `postgresql://` address.
    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if text.eq_ignore_ascii_case("sqlite") {
            Ok(Self::Sqlite)
        } else if text.starts_with("postgres://") || text.starts_with("postgresql://") {
            Ok(Self::Postgres(text.to_string()))
        } else {
            Err(format!(
                "storage must be `sqlite` or a PostgreSQL address (postgres://user@host:port/database), not {text:?}"
            ))
        }
    }
}

/// Errors reading the configuration file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not valid TOML of the expected shape (unknown keys included).
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong, with the line.
        message: String,
    },
}

/// The `[admin]` table.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminFile {
    /// Whether the admin HTTP server runs.
    pub enabled: Option<bool>,
    /// Its address.
    pub listen: Option<SocketAddr>,
    /// The bearer token it demands.
    pub token: Option<String>,
}

/// The `[limits]` table.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsFile {
    /// Largest wire frame, in bytes.
    pub max_frame_bytes: Option<usize>,
    /// Idle timeout, in seconds.
    pub idle_timeout_seconds: Option<u64>,
    /// Keep-alive interval, in seconds.
    pub keep_alive_seconds: Option<u64>,
    /// Handshake and first-frame timeout, in seconds.
    pub handshake_timeout_seconds: Option<u64>,
    /// Largest single change, in bytes.
    pub max_change_bytes: Option<u64>,
    /// Largest document (the sum of its changes), in bytes.
    pub max_document_bytes: Option<u64>,
    /// Most operations in one change.
    pub max_change_operations: Option<u64>,
    /// Most operations in one sync message.
    pub max_message_operations: Option<u64>,
    /// Bytes per second one node key may make the relay read, on average.
    pub receive_bytes_per_second_per_key: Option<u64>,
    /// Bytes one node key may make the relay read at once.
    pub receive_burst_bytes_per_key: Option<u64>,
}

/// The `[postgres]` table (read only with a PostgreSQL `storage`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresFile {
    /// Connections (and storage worker threads) one instance opens at most.
    pub pool_size: Option<u32>,
}

/// The whole file: every key optional.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayFile {
    /// QUIC address.
    pub listen: Option<SocketAddr>,
    /// Data directory.
    pub data_dir: Option<PathBuf>,
    /// Documents kept loaded at most.
    pub cached_documents: Option<usize>,
    /// Connections served at once.
    pub max_connections: Option<usize>,
    /// Connections per node key.
    pub max_connections_per_key: Option<usize>,
    /// Handshakes in progress beyond which new connections get a QUIC Retry.
    pub handshakes_before_retry: Option<usize>,
    /// Handshakes in progress per validated address beyond that.
    pub handshakes_per_address: Option<usize>,
    /// Minutes after which an unseen node is stale.
    pub stale_after_minutes: Option<u64>,
    /// Where the data lives: `sqlite` (the default) or a `postgres://` address.
    pub storage: Option<String>,
    /// The admin server.
    #[serde(default)]
    pub admin: AdminFile,
    /// Transport limits.
    #[serde(default)]
    pub limits: LimitsFile,
    /// The PostgreSQL storage.
    #[serde(default)]
    pub postgres: PostgresFile,
}

impl RelayFile {
    /// Reads and checks a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io { path: path.into(), source })?;
        Self::parse(&text).map_err(|message| ConfigError::Invalid { path: path.into(), message })
    }

    /// Parses configuration text.
    pub fn parse(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// Writes every key the file sets into `config` (keys it leaves out keep
    /// what `config` had). The admin server is set up when the file enables it
    /// or names an address or token.
    pub fn apply(&self, config: &mut RelayConfig) -> Result<(), String> {
        if let Some(storage) = &self.storage {
            config.storage = storage.parse()?;
        }
        if let Some(listen) = self.listen {
            config.listen = listen;
        }
        if let Some(dir) = &self.data_dir {
            config.data_dir = dir.clone();
        }
        if let Some(n) = self.cached_documents {
            config.cached_documents = n;
        }
        if let Some(n) = self.max_connections {
            config.max_connections = n;
        }
        if let Some(n) = self.max_connections_per_key {
            config.max_connections_per_key = n.max(1);
        }
        if let Some(n) = self.handshakes_before_retry {
            config.handshakes_before_retry = n;
        }
        if let Some(n) = self.handshakes_per_address {
            config.handshakes_per_address = n.max(1);
        }
        if let Some(minutes) = self.stale_after_minutes {
            config.monitoring.stale_after = Duration::from_secs(minutes.saturating_mul(60));
        }
        match self.admin.enabled {
            Some(false) => config.monitoring.admin = None,
            _ if self.admin.enabled == Some(true) || self.admin.listen.is_some() || self.admin.token.is_some() => {
                let mut admin = config.monitoring.admin.clone().unwrap_or_else(|| {
                    AdminConfig::new(crate::admin::DEFAULT_ADMIN.parse().expect("the default admin address parses"))
                });
                if let Some(listen) = self.admin.listen {
                    admin.listen = listen;
                }
                if let Some(token) = &self.admin.token {
                    admin.token = Some(token.clone());
                }
                config.monitoring.admin = Some(admin);
            }
            _ => {}
        }
        let limits = &mut config.limits;
        if let Some(n) = self.limits.max_frame_bytes {
            limits.max_frame = n;
        }
        if let Some(s) = self.limits.idle_timeout_seconds {
            limits.idle_timeout = Duration::from_secs(s);
        }
        if let Some(s) = self.limits.keep_alive_seconds {
            limits.keep_alive = Duration::from_secs(s);
        }
        if let Some(s) = self.limits.handshake_timeout_seconds {
            limits.handshake_timeout = Duration::from_secs(s);
        }
        if let Some(n) = self.limits.max_change_bytes {
            config.content.max_change_bytes = n;
        }
        if let Some(n) = self.limits.max_document_bytes {
            config.content.max_document_bytes = n;
        }
        if let Some(n) = self.limits.max_change_operations {
            config.max_change_ops = n.max(1);
        }
        if let Some(n) = self.limits.max_message_operations {
            config.max_message_ops = n.max(1);
        }
        if let Some(n) = self.limits.receive_bytes_per_second_per_key {
            config.receive_rate_per_key = n.max(1);
        }
        if let Some(n) = self.limits.receive_burst_bytes_per_key {
            config.receive_burst_per_key = n.max(1);
        }
        match self.postgres.pool_size {
            Some(0) => return Err("[postgres] pool_size must be at least 1".into()),
            Some(n) => config.postgres_pool_size = n,
            None => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_documented_key_is_read_and_applied() {
        let text = r#"
            listen = "127.0.0.1:9000"
            data_dir = "/srv/relay"
            cached_documents = 10
            max_connections = 20
            max_connections_per_key = 2
            handshakes_before_retry = 7
            handshakes_per_address = 3
            stale_after_minutes = 60
            storage = "postgres://relay@db:5432/samverkan"
            [admin]
            listen = "0.0.0.0:9001"
            token = "hemligt"
            [limits]
            max_frame_bytes = 1048576
            idle_timeout_seconds = 12
            keep_alive_seconds = 3
            handshake_timeout_seconds = 4
            max_change_bytes = 1000
            max_document_bytes = 5000
            max_change_operations = 11
            max_message_operations = 12
            receive_bytes_per_second_per_key = 100000
            receive_burst_bytes_per_key = 200000
            [postgres]
            pool_size = 3
        "#;
        let file = RelayFile::parse(text).unwrap();
        let mut config = RelayConfig::new("0.0.0.0:7878".parse().unwrap(), PathBuf::from("/tmp/x"));
        file.apply(&mut config).unwrap();
        assert_eq!(config.storage, StorageLocation::Postgres("postgres://relay@db:5432/samverkan".into()));
        assert_eq!(config.listen, "127.0.0.1:9000".parse().unwrap());
        assert_eq!(config.data_dir, PathBuf::from("/srv/relay"));
        assert_eq!((config.cached_documents, config.max_connections, config.max_connections_per_key), (10, 20, 2));
        assert_eq!((config.handshakes_before_retry, config.handshakes_per_address), (7, 3));
        assert_eq!(config.monitoring.stale_after, Duration::from_secs(3600));
        let admin = config.monitoring.admin.unwrap();
        assert_eq!((admin.listen, admin.token.as_deref()), ("0.0.0.0:9001".parse().unwrap(), Some("hemligt")));
        assert_eq!(config.limits.max_frame, 1_048_576);
        assert_eq!((config.content.max_change_bytes, config.content.max_document_bytes), (1000, 5000));
        assert_eq!(config.limits.idle_timeout, Duration::from_secs(12));
        assert_eq!(config.limits.handshake_timeout, Duration::from_secs(4));
        assert_eq!((config.receive_rate_per_key, config.receive_burst_per_key), (100_000, 200_000));
        assert_eq!(config.postgres_pool_size, 3);
        assert_eq!((config.max_change_ops, config.max_message_ops), (11, 12));
    }

    #[test]
    fn an_empty_file_changes_nothing_and_a_typo_is_an_error() {
        let mut config = RelayConfig::new("0.0.0.0:7878".parse().unwrap(), PathBuf::from("/tmp/x"));
        let before = format!("{config:?}");
        RelayFile::parse("").unwrap().apply(&mut config).unwrap();
        assert_eq!(format!("{config:?}"), before);
        let err = RelayFile::parse("max_conections = 3").unwrap_err();
        assert!(err.contains("max_conections"), "{err}");
        assert!(RelayFile::parse("[admin]\nenabled = false").unwrap().admin.enabled == Some(false));
        let wrong = RelayFile::parse("storage = \"mysql://x\"").unwrap().apply(&mut config).unwrap_err();
        assert!(wrong.contains("postgres://"), "{wrong}");
        let none = RelayFile::parse("[postgres]\npool_size = 0").unwrap().apply(&mut config).unwrap_err();
        assert!(none.contains("pool_size"), "{none}");
        assert!(RelayFile::parse("[postgres]\npool = 3").is_err(), "a typo in the table is an error too");
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(RelayFile::load(&dir.path().join("missing.toml")), Err(ConfigError::Io { .. })));
    }
}
