//! Durable store of Samverkan documents in one SQLite file, used by the node
//! and (behind its storage interface) by the relay.
//!
//! Owns the schema, migrations and every SQL statement about documents and
//! sync states. Knows nothing of the CLI or the network.
//!
//! Durability: WAL journal with `synchronous=FULL`, so a transaction that has
//! committed survives a crash or power loss. Every edit runs inside one
//! `BEGIN IMMEDIATE` transaction that re-reads the document, applies the edit
//! and appends the new changes, so several processes on one data directory (the
//! CLI and a daemon) serialise their edits instead of overwriting each other.
//!
//! Layout: each document is a compacted snapshot (a full Automerge save) plus
//! the incremental saves appended since. When the increments reach
//! [`COMPACT_AFTER_ROWS`] they are folded into a new snapshot after the write's
//! commit, in a short transaction of their own (by a [`BackgroundCompaction`]
//! in a long-running process), so a document with 10,000 edits loads from one
//! snapshot and a handful of rows, and no write waits for a whole save. Every blob is stored with its SHA-256 and checked on load,
//! so damage on disk is reported rather than silently skipped by Automerge.
//!
//! Loaded documents are cached in memory (a bounded number, least recently
//! used evicted first). A cached copy is only used after checking, inside the
//! same transaction, that its snapshot is still current; the increments other
//! processes appended since are then read on top of it. So the cache saves
//! reloading a long history on every edit without ever serving stale data.
//! Handles on one database in one process may share their cache (see
//! [`Store::share_cache`] and [`DocCache`]), so what one commits is in memory
//! for the other.

#![warn(missing_docs)]

mod cache;
mod compaction;
pub mod concurrent;
pub mod keyfile;
mod refusals;
mod replace;
pub mod slots;
mod whole;

pub use cache::{DocCache, LEND_WAIT};
pub use compaction::BackgroundCompaction;
pub use refusals::DocRefusal;
pub use whole::SnapshotTips;

use cache::Lease;

use std::path::{Path, PathBuf};
use std::time::Duration;

use automerge::{AutoCommit, ChangeHash};
use chrono::{DateTime, Utc};
use rusqlite::{params, Connection, ErrorCode, OptionalExtension, Transaction, TransactionBehavior};
use samverkan_shared::acceptance::{document_size, ContentLimits, LimitError};
use samverkan_shared::ids::DocId;
use samverkan_shared::model::{DocKind, Document, ModelError, StoredFields};
use samverkan_shared::org::OrgId;
use samverkan_shared::receipt::ApprovalReceipt;
use serde::Serialize;

/// How long a write waits for another process's write lock by default.
pub const DEFAULT_BUSY_TIMEOUT: Duration = Duration::from_secs(30);

/// Pages SQLite may cache on a connection while it scans a whole table to
/// build what is kept in memory (the relay's index of every document): a
/// sequential scan reads each page once, and a full page cache allocated
/// between the entries being built would leave the heap fragmented around
/// them, several hundred bytes of resident memory per stored document.
pub const SCAN_CACHE_PAGES: i64 = 16;

/// `PRAGMA application_id` of a Samverkan node database ("SVKN").
pub const APPLICATION_ID: i32 = 0x5356_4B4E;
/// Schema version this build writes (`PRAGMA user_version`): one per migration.
pub const SCHEMA_VERSION: i32 = MIGRATIONS.len() as i32;
/// Incremental rows per document before they are compacted into a snapshot.
pub const COMPACT_AFTER_ROWS: i64 = 64;
/// Documents kept in the in-memory cache by default.
pub const DEFAULT_CACHE_CAPACITY: usize = 32;

/// Migrations: entry `i` takes the schema from version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    // 0 → 1: documents, their incremental changes, node metadata.
    "CREATE TABLE meta (
         key   TEXT PRIMARY KEY,
         value TEXT NOT NULL
     );
     CREATE TABLE documents (
         doc_id     TEXT PRIMARY KEY,
         kind       TEXT NOT NULL,
         title      TEXT NOT NULL,
         heads      TEXT NOT NULL,
         snapshot   BLOB,
         snapshot_sha256 BLOB,
         generation INTEGER NOT NULL DEFAULT 0,
         created_at TEXT NOT NULL,
         updated_at TEXT NOT NULL
     );
     CREATE TABLE changes (
         seq    INTEGER PRIMARY KEY AUTOINCREMENT,
         doc_id TEXT NOT NULL REFERENCES documents(doc_id),
         data   BLOB NOT NULL,
         sha256 BLOB NOT NULL
     );
     CREATE INDEX changes_by_doc ON changes(doc_id, seq);
     CREATE TABLE sync_states (
         peer   TEXT NOT NULL,
         doc_id TEXT NOT NULL,
         state  BLOB NOT NULL,
         PRIMARY KEY (peer, doc_id)
     );",
    // 1 → 2: each document's parties (space-separated organisation ids), for
    // access control without loading documents; filled in by `backfill_parties`.
    "ALTER TABLE documents ADD COLUMN parties TEXT NOT NULL DEFAULT '';",
    // 2 → 3: the authors' signatures of changes received from other nodes.
    "CREATE TABLE change_signatures (
         hash      BLOB PRIMARY KEY,
         signature BLOB NOT NULL
     ) WITHOUT ROWID;",
    // 3 → 4: each document's size as the content limits count it (the sum of its
    // changes' uncompressed bytes); filled in by `backfill_sizes`.
    "ALTER TABLE documents ADD COLUMN change_bytes INTEGER NOT NULL DEFAULT 0;",
    // 4 → 5: the relay's receipts of approval records (when it first received
    // each, signed by the relay): issued by the relay in the transaction that
    // stores the record, kept by nodes after verifying them.
    "CREATE TABLE approval_receipts (
         doc_id          TEXT NOT NULL,
         record          TEXT NOT NULL,
         received_at     TEXT NOT NULL,
         relay_signature TEXT NOT NULL,
         PRIMARY KEY (doc_id, record)
     ) WITHOUT ROWID;",
    // 5 → 6: (node) documents the relay refused, or this node holds back, with
    // why and what the relay held then (see `refusals.rs`).
    "CREATE TABLE doc_refusals (
         doc_id      TEXT PRIMARY KEY,
         kind        TEXT NOT NULL,
         reason      TEXT NOT NULL,
         local_heads TEXT NOT NULL,
         peer_heads  TEXT NOT NULL,
         your_seq    INTEGER NOT NULL,
         refused_at  TEXT NOT NULL
     ) WITHOUT ROWID;",
    // 6 → 7: snapshots in their own table. In the documents row, the snapshot
    // sat before small columns read or written on every edit (`generation`,
    // `parties`, `change_bytes`): SQLite read through the snapshot's overflow
    // pages to reach them, and rewrote all of them whenever an edit changed the
    // row's length.
    "CREATE TABLE snapshots (
         doc_id TEXT PRIMARY KEY REFERENCES documents(doc_id),
         sha256 BLOB NOT NULL,
         data   BLOB NOT NULL
     );
     INSERT INTO snapshots (doc_id, sha256, data)
         SELECT doc_id, coalesce(snapshot_sha256, x''), snapshot FROM documents WHERE snapshot IS NOT NULL;
     ALTER TABLE documents DROP COLUMN snapshot;
     ALTER TABLE documents DROP COLUMN snapshot_sha256;",
    // 7 → 8: beside each snapshot, its author tips (`samverkan_shared::sync::encode_tips`):
    // the changes whose signatures cover it, so that it can be sent whole without
    // loading it (`Store::stored_whole`). NULL for snapshots written before, until
    // the document's next compaction.
    // A database that holds snapshots already is marked for the relay to work
    // out their tips in the background once (`META_SNAPSHOT_TIPS`): finding
    // them by `tips IS NULL` reads every snapshot's blob, so it is not done at
    // every start.
    // The builds that added this step first still wrote version 7: a database
    // at version 7 may have the column already (see `Store::prepare`).
    "ALTER TABLE snapshots ADD COLUMN tips BLOB;
     INSERT INTO meta (key, value) SELECT 'snapshot_tips', 'to work out' WHERE EXISTS (SELECT 1 FROM snapshots);",
];

/// The migration that adds `snapshots.tips` (7 → 8).
const SNAPSHOT_TIPS_MIGRATION: usize = 7;

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The file exists but is not an SQLite database (or is badly damaged).
    #[error("{path} is not a Samverkan database (the file is not SQLite or is corrupt)")]
    NotADatabase {
        /// The file.
        path: PathBuf,
    },
    /// The file is an SQLite database of some other program.
    #[error("{path} is an SQLite database of another program, not a Samverkan node")]
    Foreign {
        /// The file.
        path: PathBuf,
    },
    /// The database was written by a newer Samverkan.
    #[error("{path} has schema version {found}, newer than this program ({SCHEMA_VERSION}); upgrade samverkan-node")]
    NewerSchema {
        /// The file.
        path: PathBuf,
        /// Its version.
        found: i32,
    },
    /// No database where one was expected.
    #[error("no node database at {path}; run `samverkan-node init` first")]
    Missing {
        /// The file.
        path: PathBuf,
    },
    /// The disk is full; nothing was written.
    #[error("the disk is full; the edit was not saved (nothing was lost): free space and try again")]
    DiskFull,
    /// The data directory or database is read-only; nothing was written.
    #[error("the data directory is read-only ({0}); nothing was written: make it writable and try again")]
    ReadOnly(String),
    /// A stored document could not be read.
    #[error("document {id} is damaged in the store: {reason}")]
    CorruptDocument {
        /// The document.
        id: DocId,
        /// What went wrong.
        reason: String,
    },
    /// No document with that id.
    #[error("no document {0}")]
    NotFound(DocId),
    /// A document with that id already exists.
    #[error("document {0} already exists")]
    AlreadyExists(DocId),
    /// A cache of loaded documents was offered that is not of this database
    /// (see [`Store::share_cache`]).
    #[error("the cache of loaded documents offered is not of {path}; it was not used")]
    OtherDatabase {
        /// This store's database.
        path: PathBuf,
    },
    /// The document does not follow the schema.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// A change or the document is larger than the content limits allow.
    #[error(transparent)]
    TooLarge(#[from] LimitError),
    /// Any other SQLite error.
    #[error("database error: {0}")]
    Sqlite(rusqlite::Error),
    /// The commit of a group of updates (see [`Store::write_group`]) failed;
    /// nothing of any of them was written.
    #[error("the database commit failed ({0}); nothing of it was written")]
    CommitFailed(String),
    /// Another storage backend failed (the relay's PostgreSQL): which one, and its error.
    #[error("{backend} error: {message}")]
    Backend {
        /// The backend (`"postgresql"`).
        backend: &'static str,
        /// Its error, in its words.
        message: String,
    },
}

impl StoreError {
    /// Whether another connection held the database's write lock for longer
    /// than the busy timeout (nothing was done: trying again later may work).
    pub fn is_busy(&self) -> bool {
        matches!(self, StoreError::Sqlite(e) if matches!(e.sqlite_error_code(), Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)))
    }

    /// The same failure for another caller (one failed group commit fails
    /// every update in it): the kinds callers act on are kept.
    pub fn duplicate(&self) -> StoreError {
        match self {
            StoreError::DiskFull => StoreError::DiskFull,
            StoreError::ReadOnly(s) => StoreError::ReadOnly(s.clone()),
            StoreError::CommitFailed(s) => StoreError::CommitFailed(s.clone()),
            other => StoreError::CommitFailed(other.to_string()),
        }
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        match e.sqlite_error_code() {
            Some(ErrorCode::DiskFull) => StoreError::DiskFull,
            Some(ErrorCode::ReadOnly) => StoreError::ReadOnly(e.to_string()),
            // SQLite reports ENOSPC met while growing the WAL index or syncing as
            // a generic I/O error; the failed system call's errno tells.
            Some(ErrorCode::SystemIoFailure | ErrorCode::CannotOpen) => match last_os_error_kind() {
                Some(std::io::ErrorKind::StorageFull) => StoreError::DiskFull,
                Some(std::io::ErrorKind::ReadOnlyFilesystem) => StoreError::ReadOnly(e.to_string()),
                _ => StoreError::Sqlite(e),
            },
            _ => StoreError::Sqlite(e),
        }
    }
}

/// Whether the database file, or the directory it would be created in, is read-only.
fn is_read_only(path: &Path) -> bool {
    let read_only = |e: std::io::Error| {
        matches!(e.kind(), std::io::ErrorKind::ReadOnlyFilesystem | std::io::ErrorKind::PermissionDenied)
    };
    match std::fs::OpenOptions::new().append(true).open(path) {
        Ok(_) => {
            let dir = path.parent().unwrap_or(Path::new("."));
            tempfile_probe(dir).is_err_and(read_only)
        }
        Err(e) => read_only(e),
    }
}

/// Creates and removes a probe file in `dir`.
fn tempfile_probe(dir: &Path) -> std::io::Result<()> {
    let probe = dir.join(format!(".samverkan-write-probe-{}", std::process::id()));
    std::fs::File::create(&probe)?;
    std::fs::remove_file(&probe)
}

/// The kind of the calling thread's last OS error (SQLite's failed system call
/// is the last one when its error is converted, right after the call returns).
fn last_os_error_kind() -> Option<std::io::ErrorKind> {
    let e = std::io::Error::last_os_error();
    e.raw_os_error().filter(|&code| code != 0).map(|_| e.kind())
}

/// A document as listed, without loading it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DocSummary {
    /// The document.
    pub id: DocId,
    /// Its kind.
    pub kind: DocKind,
    /// Its title.
    pub title: String,
    /// Its heads (hex).
    pub heads: Vec<String>,
    /// Its parties, as of its last stored change.
    pub parties: Vec<OrgId>,
    /// When it was first stored here.
    pub created_at: DateTime<Utc>,
    /// When it last changed here.
    pub updated_at: DateTime<Utc>,
}

impl DocSummary {
    /// The heads as change hashes.
    pub fn head_hashes(&self) -> Result<Vec<ChangeHash>, StoreError> {
        // Sized up front: an index of every document keeps these.
        let mut hashes = Vec::with_capacity(self.heads.len());
        for h in &self.heads {
            hashes.push(h.parse::<ChangeHash>().map_err(|e| StoreError::CorruptDocument {
                id: self.id.clone(),
                reason: format!("bad head {h:?}: {e}"),
            })?);
        }
        Ok(hashes)
    }
}

/// What an update did to a document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpdateOutcome {
    /// Bytes of new changes appended (0 if nothing changed).
    pub new_bytes: usize,
    /// Heads after the update.
    pub heads: Vec<ChangeHash>,
    /// Whether the document was created by this update.
    pub created: bool,
}

/// The SQLite store of one node (or relay).
#[derive(Debug)]
pub struct Store {
    conn: Connection,
    path: PathBuf,
    cache: DocCache,
    limits: ContentLimits,
    /// Whether `limits` are exactly those the relay announced (see
    /// [`Store::set_relay_content_limits`]).
    limits_are_relays: bool,
    /// Whether snapshots this handle writes keep their authors' tips (the
    /// relay's, which sends documents whole from them; a node never does).
    keep_tips: bool,
}

/// A document as read inside a transaction, with where it stands in the table.
struct Loaded {
    doc: Document,
    generation: i64,
    last_seq: i64,
    /// Holds the document out of the cache until it is put back (`None` for a copy).
    lease: Option<Lease>,
}

fn classify_open_error(path: &Path, e: rusqlite::Error) -> StoreError {
    match e.sqlite_error_code() {
        Some(ErrorCode::NotADatabase) | Some(ErrorCode::DatabaseCorrupt) => {
            StoreError::NotADatabase { path: path.to_path_buf() }
        }
        // WAL mode must create its `-wal`/`-shm` files beside the database: on a
        // read-only directory or filesystem SQLite only says it cannot open.
        Some(ErrorCode::CannotOpen) | Some(ErrorCode::ReadOnly) if is_read_only(path) => {
            StoreError::ReadOnly(path.display().to_string())
        }
        _ => StoreError::from(e),
    }
}

impl Store {
    /// Opens an existing database, migrating it to the current schema.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        if !path.exists() {
            return Err(StoreError::Missing { path: path.to_path_buf() });
        }
        Self::open_or_create(path)
    }

    /// Opens the database, creating it if it does not exist.
    pub fn open_or_create(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(path).map_err(|e| classify_open_error(path, e))?;
        conn.busy_timeout(DEFAULT_BUSY_TIMEOUT).map_err(|e| classify_open_error(path, e))?;
        let mut store = Self {
            conn,
            path: path.to_path_buf(),
            cache: DocCache::new(path, DEFAULT_CACHE_CAPACITY),
            limits: ContentLimits::default(),
            limits_are_relays: false,
            keep_tips: false,
        };
        store.prepare().map_err(|e| match e {
            StoreError::Sqlite(inner) => classify_open_error(path, inner),
            other => other,
        })?;
        Ok(store)
    }

    /// Sets the size limits every write is checked against (the defaults
    /// otherwise): a change or document over them is refused before anything is
    /// written, whether it was typed here or arrived from elsewhere.
    pub fn set_content_limits(&mut self, limits: ContentLimits) {
        self.limits = limits;
        self.limits_are_relays = false;
    }

    /// [`Store::set_content_limits`] with limits that are exactly the ones the
    /// pinned relay announced and enforces: a document received whole from
    /// it ([`Store::update_received`]) was checked against them there, so its
    /// size is counted at its next write instead of on receipt (Automerge
    /// 0.12 rebuilds every change to count it, which doubled a fresh node's
    /// work per received document).
    pub fn set_relay_content_limits(&mut self, limits: ContentLimits) {
        self.limits = limits;
        self.limits_are_relays = true;
    }

    /// How long a write waits for another connection's write lock before it
    /// fails with [`StoreError::is_busy`] (30 s by default; the node daemon
    /// uses a short one and tries again, see `samverkan-node`'s sync module).
    pub fn set_busy_timeout(&mut self, timeout: Duration) -> Result<(), StoreError> {
        Ok(self.conn.busy_timeout(timeout)?)
    }

    /// The size limits in force.
    pub fn content_limits(&self) -> ContentLimits {
        self.limits
    }

    /// Whether snapshots written through this handle keep their authors'
    /// tips, for [`Store::stored_whole`]: the relay's store does; a node's
    /// does not (it never sends a document whole from storage, and the tips
    /// cost a pass over every change's metadata at each compaction).
    pub fn keep_snapshot_tips_on_write(&mut self, keep: bool) {
        self.keep_tips = keep;
    }

    /// Sets how many loaded documents stay cached in memory (0 turns the cache
    /// off), for every handle sharing this one's cache.
    pub fn set_cache_capacity(&mut self, capacity: usize) {
        self.cache.set_capacity(capacity);
    }

    /// This handle's cache of loaded documents, to share with another handle
    /// on the same database in this process (see [`Store::share_cache`]).
    pub fn doc_cache(&self) -> DocCache {
        self.cache.clone()
    }

    /// Uses `cache` (another handle's on the same database, from
    /// [`Store::doc_cache`]) instead of this handle's own: a change either
    /// handle commits is then in memory for both, not applied again by the
    /// other, and each document is held once. A cache of another database is
    /// refused: its copies would be taken for this one's.
    pub fn share_cache(&mut self, cache: DocCache) -> Result<(), StoreError> {
        if !cache.is_of(&self.path) {
            return Err(StoreError::OtherDatabase { path: self.path.clone() });
        }
        self.cache = cache;
        Ok(())
    }

    /// Drops a document from the in-memory cache (the relay evicts idle documents).
    pub fn evict(&self, id: &DocId) {
        self.cache.evict(id);
    }

    /// Number of documents cached in memory.
    pub fn cached(&self) -> usize {
        self.cache.len()
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Checks identity and version, sets durability pragmas and migrates.
    fn prepare(&mut self) -> Result<(), StoreError> {
        let app_id: i32 = self.conn.pragma_query_value(None, "application_id", |r| r.get(0))?;
        let version: i32 = self.conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        let tables: i64 =
            self.conn.query_row("SELECT count(*) FROM sqlite_master WHERE type = 'table'", [], |r| r.get(0))?;
        if app_id != APPLICATION_ID && (app_id != 0 || tables > 0) {
            return Err(StoreError::Foreign { path: self.path.clone() });
        }
        if version > SCHEMA_VERSION {
            return Err(StoreError::NewerSchema { path: self.path.clone(), found: version });
        }
        let mode: String = self.conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            tracing::warn!(path = %self.path.display(), mode, "could not switch to WAL journal");
        }
        self.conn.pragma_update(None, "synchronous", "FULL")?;
        self.conn.pragma_update(None, "foreign_keys", "ON")?;
        if version < SCHEMA_VERSION {
            let tx = self.conn.transaction_with_behavior(TransactionBehavior::Exclusive)?;
            // Re-read inside the lock: another process may have migrated meanwhile.
            let version: i32 = tx.pragma_query_value(None, "user_version", |r| r.get(0))?;
            for (from, sql) in MIGRATIONS.iter().enumerate().skip(version.max(0) as usize) {
                tracing::info!(path = %self.path.display(), from, to = from + 1, "migrating node database");
                if from == SNAPSHOT_TIPS_MIGRATION && has_column(&tx, "snapshots", "tips")? {
                    // Written by a build that had this step but still said version 7:
                    // its snapshots have the column (and the relay's their tips).
                    continue;
                }
                tx.execute_batch(sql)?;
            }
            if version < 2 {
                backfill_parties(&tx, &self.cache)?;
            }
            if version < 4 {
                backfill_sizes(&tx, &self.cache)?;
            }
            tx.pragma_update(None, "application_id", APPLICATION_ID)?;
            tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
            tx.commit()?;
        }
        Ok(())
    }

    /// Reads a metadata value.
    pub fn meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        Ok(self.conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0)).optional()?)
    }

    /// Writes a metadata value (durably).
    pub fn set_meta(&mut self, key: &str, value: &str) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            params![key, value],
        )?;
        Ok(())
    }

    /// Reads, changes and writes a metadata value in one write transaction, so
    /// that two processes changing it at once never lose an update. `f` gets the
    /// current value and returns the new one (`None`: leave it unchanged); its
    /// error aborts and leaves the value as it was. Returns the new value.
    pub fn update_meta<E>(
        &mut self,
        key: &str,
        f: impl FnOnce(Option<String>) -> Result<Option<String>, E>,
    ) -> Result<Option<String>, E>
    where
        E: From<StoreError>,
    {
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(StoreError::from)?;
        let current: Option<String> = tx
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()
            .map_err(StoreError::from)?;
        let Some(new) = f(current)? else { return Ok(None) };
        tx.execute(
            "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            params![key, new],
        )
        .map_err(StoreError::from)?;
        tx.commit().map_err(StoreError::from)?;
        Ok(Some(new))
    }

    /// Every metadata entry whose key starts with `prefix`, by key.
    pub fn meta_with_prefix(&self, prefix: &str) -> Result<Vec<(String, String)>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT key, value FROM meta WHERE substr(key, 1, length(?1)) = ?1 ORDER BY key")?;
        let rows = stmt.query_map([prefix], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    /// Every document, most recently changed first.
    pub fn list(&self) -> Result<Vec<DocSummary>, StoreError> {
        self.summaries("ORDER BY updated_at DESC, doc_id", [])
    }

    /// One document's summary, if it is stored (without loading it).
    pub fn summary(&self, id: &DocId) -> Result<Option<DocSummary>, StoreError> {
        Ok(self.summaries("WHERE doc_id = ?1", [id.as_str()])?.pop())
    }

    fn summaries<P: rusqlite::Params>(&self, clause: &str, params: P) -> Result<Vec<DocSummary>, StoreError> {
        let mut out = Vec::new();
        self.each_summary(clause, params, |summary| {
            out.push(summary);
            Ok(())
        })?;
        Ok(out)
    }

    /// Every document's summary in turn, none kept: what builds an index of
    /// all documents holds only one row's strings at a time, and SQLite
    /// caches only a few pages of the scan (see [`SCAN_CACHE_PAGES`]).
    pub fn for_each_summary(&self, f: impl FnMut(DocSummary) -> Result<(), StoreError>) -> Result<(), StoreError> {
        self.with_scan_cache(|| self.each_summary("", [], f))
    }

    /// Runs `f`, a scan of a whole table, with the connection's page cache
    /// held to [`SCAN_CACHE_PAGES`], then gives the cache its size back.
    fn with_scan_cache<T>(&self, f: impl FnOnce() -> Result<T, StoreError>) -> Result<T, StoreError> {
        let size: i64 = self.conn.pragma_query_value(None, "cache_size", |r| r.get(0))?;
        self.conn.pragma_update(None, "cache_size", SCAN_CACHE_PAGES)?;
        let result = f();
        let restored = self.conn.pragma_update(None, "cache_size", size);
        let value = result?;
        restored?;
        Ok(value)
    }

    fn each_summary<P: rusqlite::Params>(
        &self,
        clause: &str,
        params: P,
        mut f: impl FnMut(DocSummary) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT doc_id, kind, title, heads, created_at, updated_at, parties FROM documents {clause}"
        ))?;
        let rows = stmt.query_map(params, |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, String>(4)?,
                r.get::<_, String>(5)?,
                r.get::<_, String>(6)?,
            ))
        })?;
        for row in rows {
            let (id, kind, title, heads, created, updated, parties) = row?;
            let id: DocId =
                id.parse().map_err(|e| StoreError::Sqlite(rusqlite::Error::ToSqlConversionFailure(Box::new(e))))?;
            let corrupt = |reason: String| StoreError::CorruptDocument { id: id.clone(), reason };
            f(DocSummary {
                kind: kind.parse().map_err(|e: samverkan_shared::model::UnknownValue| corrupt(e.to_string()))?,
                title,
                heads: heads.split(',').filter(|h| !h.is_empty()).map(str::to_owned).collect(),
                parties: parties
                    .split(' ')
                    .filter(|p| !p.is_empty())
                    .map(|p| OrgId::new(p).ok_or_else(|| corrupt(format!("bad party {p:?}"))))
                    .collect::<Result<_, _>>()?,
                created_at: parse_time(&created).map_err(corrupt)?,
                updated_at: parse_time(&updated).map_err(corrupt)?,
                id,
            })?;
        }
        Ok(())
    }

    /// Ids of every document.
    pub fn ids(&self) -> Result<Vec<DocId>, StoreError> {
        Ok(self.list()?.into_iter().map(|d| d.id).collect())
    }

    /// Whether the document is stored.
    pub fn contains(&self, id: &DocId) -> Result<bool, StoreError> {
        Ok(self
            .conn
            .prepare_cached("SELECT 1 FROM documents WHERE doc_id = ?1")?
            .query_row([id.as_str()], |_| Ok(()))
            .optional()?
            .is_some())
    }

    /// Loads a document.
    pub fn load(&self, id: &DocId) -> Result<Document, StoreError> {
        // Take the cached copy out and put it back: one copy for the caller, not two.
        let loaded =
            load_in(&self.conn, &self.cache, id, Borrow::Take)?.ok_or_else(|| StoreError::NotFound(id.clone()))?;
        let doc = loaded.doc.clone();
        self.cache.put(loaded.doc, loaded.generation, loaded.last_seq, loaded.lease);
        Ok(doc)
    }

    /// Runs `f` on the current version of a document, read in one read
    /// snapshot: no write lock is taken, so this never waits for another
    /// process's write (WAL). `f` only reads: the copy is kept in the cache
    /// for the next read or update, unless `f` changed its heads (then it is
    /// dropped; nothing is ever written). `None` if the document is not stored.
    pub fn read_doc<R>(&self, id: &DocId, f: impl FnOnce(&mut AutoCommit) -> R) -> Result<Option<R>, StoreError> {
        let tx = self.conn.unchecked_transaction()?; // Deferred: a read snapshot, no write lock.
        let Some(mut loaded) = load_in(&tx, &self.cache, id, Borrow::Take)? else { return Ok(None) };
        drop(tx);
        let before = loaded.doc.heads();
        let value = f(loaded.doc.automerge_mut());
        if loaded.doc.heads() == before {
            self.cache.put(loaded.doc, loaded.generation, loaded.last_seq, loaded.lease);
        }
        Ok(Some(value))
    }

    /// Stores a new document (fails if the id exists).
    pub fn insert(&mut self, doc: &mut Document) -> Result<UpdateOutcome, StoreError> {
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        if load_in(&tx, &self.cache, doc.id(), Borrow::Copy)?.is_some() {
            return Err(StoreError::AlreadyExists(doc.id().clone()));
        }
        let id = doc.id().clone();
        let size = self.limits.check_new_changes(&id, doc.automerge_mut(), &[], 0)?;
        let data = doc.automerge_mut().save();
        let heads = doc.heads();
        let now = Utc::now().to_rfc3339();
        tx.execute(
            "INSERT INTO documents (doc_id, kind, title, heads, created_at, updated_at, parties, change_bytes)
             VALUES (?1, ?2, ?3, ?4, ?5, ?5, ?6, ?7)",
            params![
                id.as_str(),
                doc.kind()?.as_str(),
                doc.title()?,
                join_heads(&heads),
                now,
                join_parties(&doc.parties()?),
                size as i64
            ],
        )?;
        put_snapshot(&tx, &id, &data, tips_if(self.keep_tips, doc.automerge_mut()).as_deref())?;
        tx.commit()?;
        Ok(UpdateOutcome { new_bytes: data.len(), heads, created: true })
    }

    /// Runs `f` on the current version of a document inside one write
    /// transaction and durably appends whatever changes it made.
    ///
    /// With `create_missing`, a document not stored yet starts empty (for changes
    /// arriving from other nodes); it is stored only once it has content. `f`'s
    /// error aborts the transaction and leaves the store untouched.
    pub fn update<T, E>(
        &mut self,
        id: &DocId,
        create_missing: bool,
        f: impl FnOnce(&mut Document) -> Result<T, E>,
    ) -> Result<(T, UpdateOutcome), E>
    where
        E: From<StoreError>,
    {
        self.update_signed(id, create_missing, |doc| f(doc).map(|value| (value, Vec::new())))
    }

    /// Like [`Store::update`], where `f` also returns the authors' signatures of
    /// changes it received; they are stored in the same transaction.
    pub fn update_signed<T, E>(
        &mut self,
        id: &DocId,
        create_missing: bool,
        f: impl FnOnce(&mut Document) -> Result<(T, Vec<(ChangeHash, [u8; 64])>), E>,
    ) -> Result<(T, UpdateOutcome), E>
    where
        E: From<StoreError>,
    {
        self.update_receipted(id, create_missing, |doc| {
            f(doc).map(|(value, signatures)| (value, signatures, Vec::new()))
        })
    }

    /// Like [`Store::update_signed`], where `f` also returns approval receipts
    /// (the relay's, for the records the change added); they are stored in
    /// the same transaction, the first receipt of a record kept.
    #[allow(clippy::type_complexity)]
    pub fn update_receipted<T, E>(
        &mut self,
        id: &DocId,
        create_missing: bool,
        f: impl FnOnce(&mut Document) -> Result<(T, Vec<(ChangeHash, [u8; 64])>, Vec<ApprovalReceipt>), E>,
    ) -> Result<(T, UpdateOutcome), E>
    where
        E: From<StoreError>,
    {
        self.update_in(id, create_missing, false, |doc| {
            f(doc).map(|(value, signatures, receipts)| (value, Kept { signatures, receipts, received_whole: None }))
        })
    }

    /// [`Store::update_signed`] for changes received from the pinned relay over
    /// sync (a node's receiving path): a document not stored yet is created
    /// (if it has content), and when the limits in force are the relay's
    /// ([`Store::set_relay_content_limits`]) its size is not counted now but
    /// at its next write, which checks the whole document against the limits.
    ///
    /// `f` also returns the bytes it loaded an empty document from, if it did
    /// (every change in them applied, none held back: see
    /// [`samverkan_shared::sync::ReceiveOutcome::received_whole`]). A document
    /// this write creates is then stored as those bytes, not saved again.
    #[allow(clippy::type_complexity)]
    pub fn update_received<T, E>(
        &mut self,
        id: &DocId,
        f: impl FnOnce(&mut Document) -> Result<(T, Vec<(ChangeHash, [u8; 64])>, Option<Vec<u8>>), E>,
    ) -> Result<(T, UpdateOutcome), E>
    where
        E: From<StoreError>,
    {
        let from_relay = self.limits_are_relays;
        self.update_in(id, true, from_relay, |doc| {
            f(doc).map(|(value, signatures, received_whole)| {
                (value, Kept { signatures, receipts: Vec::new(), received_whole })
            })
        })
    }

    fn update_in<T, E>(
        &mut self,
        id: &DocId,
        create_missing: bool,
        checked_by_relay: bool,
        f: impl FnOnce(&mut Document) -> Result<(T, Kept), E>,
    ) -> Result<(T, UpdateOutcome), E>
    where
        E: From<StoreError>,
    {
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(StoreError::from)?;
        let (mut doc, mut generation, mut last_seq, lease, created) = match load_in(&tx, &self.cache, id, Borrow::Take)?
        {
            Some(loaded) => (loaded.doc, loaded.generation, loaded.last_seq, loaded.lease, false),
            None if create_missing => {
                let empty = Document::from_automerge(id.clone(), AutoCommit::new()).map_err(StoreError::from)?;
                (empty, 0, 0, None, true)
            }
            None => return Err(StoreError::NotFound(id.clone()).into()),
        };
        let before = doc.heads();
        let (value, Kept { signatures, receipts, received_whole }) = f(&mut doc)?;
        let heads = doc.heads();
        if heads == before || doc.is_empty() {
            if !created {
                self.cache.put(doc, generation, last_seq, lease);
            }
            return Ok((value, UpdateOutcome { new_bytes: 0, heads, created: false }));
        }
        let size_before = match (created, checked_by_relay) {
            (true, false) => SizeBefore::New,
            (true, true) => SizeBefore::NewCheckedByRelay,
            (false, _) => SizeBefore::stored(
                tx.prepare_cached("SELECT change_bytes FROM documents WHERE doc_id = ?1")
                    .and_then(|mut stmt| stmt.query_row([id.as_str()], |r| r.get(0)))
                    .map_err(StoreError::from)?,
            ),
        };
        let received_whole = received_whole.filter(|_| created);
        let write =
            DocWrite::prepare(&mut doc, &before, size_before, &self.limits, signatures, receipts, received_whole)?;
        let new_bytes = write.data.len();
        let mut fold_due = false;
        if let Some(seq) = write_doc_rows(&tx, &write)? {
            last_seq = seq;
            fold_due = increment_rows(&tx, id)? >= COMPACT_AFTER_ROWS;
        }
        tx.commit().map_err(StoreError::from)?;
        // Folded after the commit: the write is durable, and its transaction
        // short, whatever the fold costs or meets (a full disk, say).
        if fold_due && !self.cache.ask_fold(id) {
            match self.fold_held(id, &mut doc, generation, last_seq) {
                Ok(Some(g)) => generation = g,
                Ok(None) => {}
                Err(e) => tracing::warn!(doc = %id, error = %e, "could not compact the document; its increments stay"),
            }
        }
        self.cache.put(doc, generation, last_seq, lease);
        Ok((value, UpdateOutcome { new_bytes, heads, created }))
    }

    /// Folds the increment rows up to `upto_seq` into a snapshot saved from
    /// `doc` (which holds exactly those, over snapshot `generation`), in a
    /// short transaction of its own; `None` if the document was compacted or
    /// replaced meanwhile (then nothing is written). Returns the new generation.
    fn fold_held(
        &mut self,
        id: &DocId,
        doc: &mut Document,
        generation: i64,
        upto_seq: i64,
    ) -> Result<Option<i64>, StoreError> {
        let tips = tips_if(self.keep_tips, doc.automerge_mut());
        let snapshot = doc.automerge_mut().save();
        let folded = self.fold_rows(id, &snapshot, tips.as_deref(), upto_seq, Some(generation))?;
        if let Some(to) = folded {
            self.cache.refold(id, generation, to, upto_seq);
        }
        Ok(folded)
    }

    /// Folds a document's increments into a new snapshot without holding the
    /// write lock while the snapshot is saved (what a background compaction
    /// does): a copy of the document, waited for if another thread has it out,
    /// is saved, then written in a short transaction; nothing is written if the
    /// document was compacted or replaced meanwhile. Returns whether it folded.
    pub fn fold_increments(&mut self, id: &DocId) -> Result<bool, StoreError> {
        let loaded = {
            let tx = self.conn.unchecked_transaction()?; // One read snapshot.
            let Some(loaded) = load_in(&tx, &self.cache, id, Borrow::CopyWhenReturned)? else { return Ok(false) };
            let rows: i64 = tx
                .prepare_cached("SELECT count(*) FROM changes WHERE doc_id = ?1 AND seq <= ?2")?
                .query_row(params![id.as_str(), loaded.last_seq], |r| r.get(0))?;
            if rows == 0 {
                return Ok(false);
            }
            loaded
        };
        let Loaded { mut doc, generation, last_seq, .. } = loaded;
        let folded = self.fold_held(id, &mut doc, generation, last_seq)?;
        if let Some(to) = folded {
            // Kept for the next write, unless a newer copy is there already.
            if self.cache.last_seq_of(id, to).is_none_or(|seq| seq < last_seq) {
                self.cache.put(doc, to, last_seq, None);
            }
        }
        Ok(folded.is_some())
    }

    /// Writes many prepared updates in one transaction and one commit (group
    /// commit): each in its own savepoint, so one that fails (it comes back as
    /// its own `Err`) leaves the others to commit. The outer `Err` is the
    /// transaction's: then nothing of any of them was written. Each `Ok` holds
    /// the update's increment row (`None` for a new document).
    #[allow(clippy::type_complexity)]
    pub fn write_group(&mut self, writes: &[DocWrite]) -> Result<Vec<Result<Option<i64>, StoreError>>, StoreError> {
        let mut tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut results = Vec::with_capacity(writes.len());
        for write in writes {
            let savepoint = tx.savepoint()?;
            let result = write_doc_rows(&savepoint, write);
            if result.is_ok() {
                savepoint.commit()?;
            } else {
                savepoint.finish()?; // Rolled back when not committed.
            }
            results.push(result);
        }
        tx.commit()?;
        for write in writes {
            self.cache.evict(&write.id);
        }
        Ok(results)
    }

    /// What is stored of a document's size in change bytes (the sum
    /// [`ContentLimits`] counts): [`SizeBefore::Stored`], or
    /// [`SizeBefore::NotCounted`] for one received whole from the relay and
    /// not written since; `None` if the document is not stored.
    pub fn stored_size(&self, id: &DocId) -> Result<Option<SizeBefore>, StoreError> {
        Ok(self
            .conn
            .prepare_cached("SELECT change_bytes FROM documents WHERE doc_id = ?1")?
            .query_row([id.as_str()], |r| r.get(0))
            .optional()?
            .map(SizeBefore::stored))
    }

    /// Loads a document for an update outside this connection's write
    /// transactions (the relay's concurrent storage): the document, its size in
    /// change bytes, how many increment rows it has and the last one; `None`
    /// if not stored.
    pub fn load_for_update(&self, id: &DocId) -> Result<Option<ForUpdate>, StoreError> {
        let tx = self.conn.unchecked_transaction()?; // One read snapshot for all three reads.
        let Some(loaded) = load_in(&tx, &self.cache, id, Borrow::Take)? else { return Ok(None) };
        let (size, rows): (i64, i64) = self.conn.prepare_cached(
            "SELECT change_bytes, (SELECT count(*) FROM changes WHERE doc_id = ?1) FROM documents WHERE doc_id = ?1",
        )?
        .query_row([id.as_str()], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(Some(ForUpdate {
            doc: loaded.doc,
            size: SizeBefore::stored(size),
            increments: rows,
            last_seq: loaded.last_seq,
        }))
    }

    /// Replaces a document's snapshot by `snapshot` (a full save holding every
    /// increment row up to `upto_seq`) and drops those rows, in its own
    /// transaction: compaction done in the background. Rows after `upto_seq`
    /// stay and are read on top of the snapshot.
    /// `tips` are the snapshot's author tips ([`snapshot_tips`]).
    pub fn compact_upto(&mut self, id: &DocId, snapshot: &[u8], tips: &[u8], upto_seq: i64) -> Result<(), StoreError> {
        match self.fold_rows(id, snapshot, Some(tips), upto_seq, None)? {
            Some(_) => Ok(()),
            None => Err(StoreError::NotFound(id.clone())),
        }
    }

    /// [`Store::compact_upto`], only if the document is still at snapshot
    /// `generation` (when given); returns the new generation, `None` if the
    /// document is gone or at another generation (nothing was written).
    fn fold_rows(
        &mut self,
        id: &DocId,
        snapshot: &[u8],
        tips: Option<&[u8]>,
        upto_seq: i64,
        generation: Option<i64>,
    ) -> Result<Option<i64>, StoreError> {
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let Some(to) = tx
            .query_row(
                "UPDATE documents SET generation = generation + 1
                 WHERE doc_id = ?1 AND (?2 IS NULL OR generation = ?2) RETURNING generation",
                params![id.as_str(), generation],
                |r| r.get::<_, i64>(0),
            )
            .optional()?
        else {
            return Ok(None);
        };
        put_snapshot(&tx, id, snapshot, tips)?;
        tx.execute("DELETE FROM changes WHERE doc_id = ?1 AND seq <= ?2", params![id.as_str(), upto_seq])?;
        tx.commit()?;
        if generation.is_none() {
            self.cache.evict(id);
        }
        tracing::debug!(doc = %id, bytes = snapshot.len(), upto_seq, generation = to, "folded increments into a snapshot");
        Ok(Some(to))
    }

    /// The highest increment row of a document (0: none); what a snapshot
    /// saved now would hold (see [`Store::compact_upto`]).
    pub fn last_increment(&self, id: &DocId) -> Result<i64, StoreError> {
        Ok(self
            .conn
            .prepare_cached("SELECT coalesce(max(seq), 0) FROM changes WHERE doc_id = ?1")?
            .query_row([id.as_str()], |r| r.get(0))?)
    }

    /// The stored authors' signatures of these changes (those known).
    pub fn signatures(&self, hashes: &[ChangeHash]) -> Result<Vec<(ChangeHash, [u8; 64])>, StoreError> {
        let mut stmt = self.conn.prepare_cached("SELECT signature FROM change_signatures WHERE hash = ?1")?;
        let mut out = Vec::new();
        for hash in hashes {
            let found: Option<Vec<u8>> = stmt.query_row([hash.0.as_slice()], |r| r.get(0)).optional()?;
            if let Some(signature) = found.and_then(|b| <[u8; 64]>::try_from(b).ok()) {
                out.push((*hash, signature));
            }
        }
        Ok(out)
    }

    /// Stores approval receipts (the caller verified them), keeping the first
    /// one held of each record; returns how many were new.
    pub fn add_receipts(&mut self, receipts: &[ApprovalReceipt]) -> Result<usize, StoreError> {
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let added = insert_receipts(&tx, receipts)?;
        tx.commit()?;
        Ok(added)
    }

    /// The stored approval receipts of a document (unverified: check them with the relay key).
    pub fn receipts(&self, id: &DocId) -> Result<Vec<ApprovalReceipt>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT record, received_at, relay_signature FROM approval_receipts WHERE doc_id = ?1 ORDER BY record",
        )?;
        let rows = stmt.query_map([id.as_str()], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (record_signature, received_at, relay_signature) = row?;
            let received_at = parse_time(&received_at).map_err(|reason| StoreError::CorruptDocument {
                id: id.clone(),
                reason: format!("receipt: {reason}"),
            })?;
            out.push(ApprovalReceipt { doc: id.clone(), record_signature, received_at, relay_signature });
        }
        Ok(out)
    }

    /// Folds a document's increments into one snapshot now.
    pub fn compact(&mut self, id: &DocId) -> Result<(), StoreError> {
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut loaded =
            load_in(&tx, &self.cache, id, Borrow::Take)?.ok_or_else(|| StoreError::NotFound(id.clone()))?;
        let generation = write_snapshot(&tx, id, &mut loaded.doc, self.keep_tips)?;
        tx.commit()?;
        self.cache.put(loaded.doc, generation, loaded.last_seq, loaded.lease);
        Ok(())
    }

    /// Number of incremental rows a document has (for tests and status).
    pub fn increment_rows(&self, id: &DocId) -> Result<i64, StoreError> {
        Ok(self.conn.query_row("SELECT count(*) FROM changes WHERE doc_id = ?1", [id.as_str()], |r| r.get(0))?)
    }

    /// Each document's heads, from the table (no document is loaded).
    pub fn heads(&self) -> Result<Vec<(DocId, Vec<ChangeHash>)>, StoreError> {
        // Two columns, in table order: the daemon reads this after every local
        // write to find what changed, so it neither sorts nor parses the rest
        // of each summary (dates, parties), which cost about 4× as much.
        let mut stmt = self.conn.prepare_cached("SELECT doc_id, heads FROM documents")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
        let mut out = Vec::new();
        for row in rows {
            let (id, heads) = row?;
            let id: DocId =
                id.parse().map_err(|e| StoreError::Sqlite(rusqlite::Error::ToSqlConversionFailure(Box::new(e))))?;
            let heads = parse_heads(&id, &heads)?;
            out.push((id, heads));
        }
        Ok(out)
    }

    /// One document's heads, from the table (the document is not loaded);
    /// `None` if it is not stored.
    pub fn doc_heads(&self, id: &DocId) -> Result<Option<Vec<ChangeHash>>, StoreError> {
        let mut stmt = self.conn.prepare_cached("SELECT heads FROM documents WHERE doc_id = ?1")?;
        let Some(heads) = stmt.query_row([id.as_str()], |r| r.get::<_, String>(0)).optional()? else {
            return Ok(None);
        };
        Ok(Some(parse_heads(id, &heads)?))
    }

    /// The persisted sync states shared with `peer`, by document.
    pub fn sync_states(&self, peer: &str) -> Result<Vec<(DocId, Vec<u8>)>, StoreError> {
        // Read once per connection (and for every peer at the relay's start): not worth caching.
        self.with_scan_cache(|| {
            let mut stmt = self.conn.prepare_cached("SELECT doc_id, state FROM sync_states WHERE peer = ?1")?;
            let rows = stmt.query_map([peer], |r| Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?)))?;
            let mut out = Vec::new();
            for row in rows {
                let (doc, state) = row?;
                // A row naming no valid document is skipped: a fresh sync state is always safe.
                if let Ok(doc) = doc.parse() {
                    out.push((doc, state));
                }
            }
            Ok(out)
        })
    }

    /// Every peer with persisted sync states.
    pub fn sync_peers(&self) -> Result<Vec<String>, StoreError> {
        let mut stmt = self.conn.prepare_cached("SELECT DISTINCT peer FROM sync_states ORDER BY peer")?;
        let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    /// Persists sync states shared with `peer` (replacing earlier ones), in one transaction.
    pub fn save_sync_states(
        &mut self,
        peer: &str,
        states: impl IntoIterator<Item = (DocId, Vec<u8>)>,
    ) -> Result<(), StoreError> {
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        {
            let mut stmt = tx.prepare_cached(
                "INSERT INTO sync_states (peer, doc_id, state) VALUES (?1, ?2, ?3)
                 ON CONFLICT(peer, doc_id) DO UPDATE SET state = excluded.state",
            )?;
            for (doc, state) in states {
                stmt.execute(params![peer, doc.as_str(), state])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Replaces every sync state shared with `peer` by `states`, in one
    /// transaction: states stored before for documents not among `states` are deleted.
    pub fn replace_sync_states(
        &mut self,
        peer: &str,
        states: impl IntoIterator<Item = (DocId, Vec<u8>)>,
    ) -> Result<(), StoreError> {
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute("DELETE FROM sync_states WHERE peer = ?1", [peer])?;
        {
            let mut stmt = tx.prepare_cached("INSERT INTO sync_states (peer, doc_id, state) VALUES (?1, ?2, ?3)")?;
            for (doc, state) in states {
                stmt.execute(params![peer, doc.as_str(), state])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// A number that changes whenever another connection (another process) commits
    /// to the database: cheap polling for edits made by other CLI invocations.
    pub fn data_version(&self) -> Result<i64, StoreError> {
        Ok(self.conn.pragma_query_value(None, "data_version", |r| r.get(0))?)
    }

    /// SQLite's `integrity_check` plus loading every document; returns the problems found.
    pub fn check(&self) -> Result<Vec<String>, StoreError> {
        let mut problems = Vec::new();
        let mut stmt = self.conn.prepare("PRAGMA integrity_check")?;
        for row in stmt.query_map([], |r| r.get::<_, String>(0))? {
            let line = row?;
            if line != "ok" {
                problems.push(format!("sqlite: {line}"));
            }
        }
        for id in self.ids()? {
            if let Err(e) = self.load(&id).and_then(|d| d.view().map(|_| ()).map_err(StoreError::from)) {
                problems.push(e.to_string());
            }
        }
        Ok(problems)
    }
}

/// A document loaded by [`Store::load_for_update`].
#[derive(Debug)]
pub struct ForUpdate {
    /// The document.
    pub doc: Document,
    /// What is stored of its size in change bytes (see [`ContentLimits`]).
    pub size: SizeBefore,
    /// How many increment rows it has beside its snapshot.
    pub increments: i64,
    /// The last increment row read (0: none).
    pub last_seq: i64,
}

/// The rows one durable document update writes, computed from the document
/// after the update: its new changes (or, for a new document, a full save),
/// the index columns and the signatures and receipts stored with it. Built by
/// [`DocWrite::prepare`], written by [`Store::update_receipted`] and by
/// [`Store::write_group`] (many updates, one commit).
#[derive(Debug, Clone)]
pub struct DocWrite {
    /// The document.
    pub id: DocId,
    /// Whether this write creates the document (`data` is then a full save).
    pub created: bool,
    /// The new changes since the heads before the update, or the full save of a new document.
    pub data: Vec<u8>,
    /// Heads after the update.
    pub heads: Vec<ChangeHash>,
    /// Its kind after the update.
    pub kind: DocKind,
    /// Its title after the update.
    pub title: String,
    /// Its parties after the update.
    pub parties: Vec<OrgId>,
    /// The document's size in change bytes after the update (checked against
    /// the limits); `None` for a new document received whole from the relay
    /// under its own limits ([`SizeBefore::NewCheckedByRelay`]), counted at its next write.
    pub size: Option<u64>,
    /// The authors' signatures of changes received.
    pub signatures: Vec<(ChangeHash, [u8; 64])>,
    /// Approval receipts issued for records the update added.
    pub receipts: Vec<ApprovalReceipt>,
    /// For a new document, the author tips of its full save ([`snapshot_tips`]),
    /// if the writer keeps them (the relay's fills them in); empty otherwise.
    pub tips: Vec<u8>,
}

/// What Automerge's `save_after` gives for `changes` (the changes new since
/// some heads, in its order): their raw bytes one after another, the data of
/// an increment row. For a caller that has taken the changes anyway.
pub fn increment_bytes(changes: &[automerge::Change]) -> Vec<u8> {
    changes.iter().map(|c| c.raw_bytes()).collect::<Vec<_>>().concat()
}

/// Stored in `documents.change_bytes` for a document whose size is not
/// counted yet ([`SizeBefore::NewCheckedByRelay`]); sizes are never negative.
const SIZE_NOT_COUNTED: i64 = -1;

/// What a write knows of a document's size in change bytes before it (what
/// [`ContentLimits`] counts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeBefore {
    /// A new document: every change is counted and checked.
    New,
    /// A new document received whole from the pinned relay, whose limits are
    /// the ones in force ([`Store::set_relay_content_limits`]): the relay
    /// checked it against them, and its size is counted at its next write.
    NewCheckedByRelay,
    /// A stored document of this size.
    Stored(u64),
    /// A stored document whose size was not counted yet: this write counts it whole.
    NotCounted,
}

impl SizeBefore {
    /// The size a stored document's `change_bytes` column holds.
    pub fn stored(column: i64) -> Self {
        if column == SIZE_NOT_COUNTED {
            Self::NotCounted
        } else {
            Self::Stored(column.max(0) as u64)
        }
    }

    /// The column value for a size after a write (`None`: not counted yet).
    fn column(size: Option<u64>) -> i64 {
        size.map_or(SIZE_NOT_COUNTED, |s| i64::try_from(s).unwrap_or(i64::MAX))
    }
}

/// What a write's closure keeps besides its value ([`Store::update_in`]):
/// the authors' signatures of the changes it added, approval receipts, and
/// the bytes it loaded an empty document from, if it did.
struct Kept {
    signatures: Vec<(ChangeHash, [u8; 64])>,
    receipts: Vec<ApprovalReceipt>,
    received_whole: Option<Vec<u8>>,
}

impl DocWrite {
    /// Checks an updated document (readable, within `limits` given what is
    /// known of its size before) and computes what to write. A new document
    /// is stored as `received_whole`, the bytes it was loaded from with every
    /// change in them applied, if given, instead of a save of it (the same
    /// document, without the cost of encoding it again); ignored for a
    /// stored document.
    pub fn prepare(
        doc: &mut Document,
        before: &[ChangeHash],
        size_before: SizeBefore,
        limits: &ContentLimits,
        signatures: Vec<(ChangeHash, [u8; 64])>,
        receipts: Vec<ApprovalReceipt>,
        received_whole: Option<Vec<u8>>,
    ) -> Result<Self, StoreError> {
        let id = doc.id().clone();
        let created = matches!(size_before, SizeBefore::New | SizeBefore::NewCheckedByRelay);
        // One pass over the new changes serves the limits, the stored fields and,
        // for an update, the data to append (what `save_after` would build again).
        // A new document is stored as a full save, so its changes are taken only
        // to count them.
        let new = match size_before {
            SizeBefore::NewCheckedByRelay => Vec::new(),
            _ => doc.automerge_mut().get_changes(before),
        };
        // Whatever came in must still be a document we can read (its header and
        // stored fields read again unless the new changes left them alone), within the limits.
        let StoredFields { kind, title, parties } =
            if created { doc.stored_fields()? } else { doc.stored_fields_after(before, &new)? };
        let whole = |doc: &mut Document| received_whole.unwrap_or_else(|| doc.automerge_mut().save());
        let (size, data) = match size_before {
            SizeBefore::NewCheckedByRelay => (None, whole(doc)),
            SizeBefore::New => (Some(limits.check_changes(&id, &new, 0)?), whole(doc)),
            SizeBefore::Stored(size_before) => {
                (Some(limits.check_changes(&id, &new, size_before)?), increment_bytes(&new))
            }
            SizeBefore::NotCounted => {
                let added: u64 = new.iter().map(|c| c.raw_bytes().len() as u64).sum();
                let whole = document_size(doc.automerge_mut());
                (Some(limits.check_changes(&id, &new, whole.saturating_sub(added))?), increment_bytes(&new))
            }
        };
        let heads = doc.heads();
        Ok(Self { tips: Vec::new(), heads, kind, title, parties, id, created, data, size, signatures, receipts })
    }
}

/// Writes one update's rows inside a transaction; returns the increment row's
/// sequence number (`None` for a new document, which is stored as a snapshot).
fn write_doc_rows(tx: &Connection, write: &DocWrite) -> Result<Option<i64>, StoreError> {
    let id = write.id.as_str();
    let now = Utc::now().to_rfc3339();
    let parties = join_parties(&write.parties);
    let seq = if write.created {
        tx.prepare_cached(
            "INSERT INTO documents (doc_id, kind, title, heads, created_at, updated_at, parties, change_bytes)
             VALUES (?1, ?2, ?3, ?4, ?5, ?5, ?6, ?7)",
        )?
        .execute(params![
            id,
            write.kind.as_str(),
            write.title,
            join_heads(&write.heads),
            now,
            parties,
            SizeBefore::column(write.size)
        ])?;
        put_snapshot(tx, &write.id, &write.data, (!write.tips.is_empty()).then_some(write.tips.as_slice()))?;
        None
    } else {
        tx.prepare_cached("INSERT INTO changes (doc_id, data, sha256) VALUES (?1, ?2, ?3)")?.execute(params![
            id,
            write.data,
            sha256(&write.data)
        ])?;
        let seq = tx.last_insert_rowid();
        let updated = tx
            .prepare_cached(
                "UPDATE documents SET kind = ?2, title = ?3, heads = ?4, updated_at = ?5, parties = ?6, change_bytes = ?7
                 WHERE doc_id = ?1",
            )?
            .execute(params![
                id,
                write.kind.as_str(),
                write.title,
                join_heads(&write.heads),
                now,
                parties,
                SizeBefore::column(write.size)
            ])?;
        if updated != 1 {
            return Err(StoreError::NotFound(write.id.clone()));
        }
        Some(seq)
    };
    let mut stmt = tx.prepare_cached("INSERT OR IGNORE INTO change_signatures (hash, signature) VALUES (?1, ?2)")?;
    for (hash, signature) in &write.signatures {
        stmt.execute(params![hash.0.as_slice(), signature.as_slice()])?;
    }
    insert_receipts(tx, &write.receipts)?;
    Ok(seq)
}

fn parse_time(s: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(s).map(|t| t.with_timezone(&Utc)).map_err(|e| format!("bad timestamp {s:?}: {e}"))
}

/// Inserts receipts, keeping the first one held of each record; returns how many were new.
fn insert_receipts(tx: &Connection, receipts: &[ApprovalReceipt]) -> Result<usize, StoreError> {
    let mut stmt = tx.prepare_cached(
        "INSERT OR IGNORE INTO approval_receipts (doc_id, record, received_at, relay_signature) VALUES (?1, ?2, ?3, ?4)",
    )?;
    let mut added = 0;
    for r in receipts {
        let at = r.received_at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        added += stmt.execute(params![r.doc.as_str(), r.record_signature, at, r.relay_signature])?;
    }
    Ok(added)
}

/// The `heads` column of a document (comma-separated hashes) as change hashes.
fn parse_heads(id: &DocId, heads: &str) -> Result<Vec<ChangeHash>, StoreError> {
    heads
        .split(',')
        .filter(|h| !h.is_empty())
        .map(|h| {
            h.parse::<ChangeHash>()
                .map_err(|e| StoreError::CorruptDocument { id: id.clone(), reason: format!("bad head {h:?}: {e}") })
        })
        .collect()
}

fn join_heads(heads: &[ChangeHash]) -> String {
    heads.iter().map(ToString::to_string).collect::<Vec<_>>().join(",")
}

fn join_parties(parties: &[OrgId]) -> String {
    parties.iter().map(OrgId::as_str).collect::<Vec<_>>().join(" ")
}

/// Fills the `parties` column of every stored document (migration to schema 2).
/// A document that cannot be read keeps no parties and is reported by `check`.
fn backfill_parties(tx: &Transaction<'_>, cache: &DocCache) -> Result<(), StoreError> {
    let ids: Vec<String> =
        tx.prepare("SELECT doc_id FROM documents")?.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?;
    for id in ids {
        let Ok(doc_id) = id.parse::<DocId>() else { continue };
        let parties = match load_in(tx, cache, &doc_id, Borrow::Copy) {
            Ok(Some(loaded)) => loaded.doc.parties().map(|p| join_parties(&p)).unwrap_or_default(),
            _ => String::new(),
        };
        tx.execute("UPDATE documents SET parties = ?2 WHERE doc_id = ?1", params![id, parties])?;
    }
    Ok(())
}

/// Fills the `change_bytes` column of every stored document (migration to
/// schema 4). A document that cannot be read keeps 0 and is reported by `check`.
fn backfill_sizes(tx: &Transaction<'_>, cache: &DocCache) -> Result<(), StoreError> {
    let ids: Vec<String> =
        tx.prepare("SELECT doc_id FROM documents")?.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?;
    for id in ids {
        let Ok(doc_id) = id.parse::<DocId>() else { continue };
        let size = match load_in(tx, cache, &doc_id, Borrow::Copy) {
            Ok(Some(mut loaded)) => document_size(loaded.doc.automerge_mut()),
            _ => 0,
        };
        tx.execute("UPDATE documents SET change_bytes = ?2 WHERE doc_id = ?1", params![id, size as i64])?;
    }
    Ok(())
}

/// The increment rows of a document after a given one. Written so that the
/// planner does not mark `?1` as a value the plan depends on (`likelihood`):
/// SQLite then expires the statement whenever its bindings are cleared (as
/// the statement cache does after every use) and parses and plans it again
/// on every load. The plan is pinned to what it was (`changes_by_doc`:
/// `doc_id = ? AND seq > ?`).
const NEW_ROWS: &str = "SELECT seq, data, sha256 FROM changes INDEXED BY changes_by_doc
     WHERE likelihood(doc_id = ?1, 0.001) AND seq > ?2 ORDER BY seq";

/// How [`load_in`] starts from a cached copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Borrow {
    /// Moves it out (the caller is about to change it and put it back).
    Take,
    /// Clones it (missing it while another thread has it out).
    Copy,
    /// Clones it, waiting (bounded) while another thread has it out.
    CopyWhenReturned,
}

/// Loads a document through any connection or transaction, starting from the
/// cached copy when its snapshot generation is still current.
fn load_in(conn: &Connection, cache: &DocCache, id: &DocId, how: Borrow) -> Result<Option<Loaded>, StoreError> {
    let generation: Option<i64> =
        // Cached statements: this runs for every sync message (parsing SQL was the relay's top cost).
        conn.prepare_cached("SELECT generation FROM documents WHERE doc_id = ?1")?
            .query_row([id.as_str()], |r| r.get(0))
            .optional()?;
    let Some(generation) = generation else {
        cache.evict(id);
        return Ok(None);
    };
    let corrupt = |reason: String| StoreError::CorruptDocument { id: id.clone(), reason };
    let (cached, lease) = match how {
        Borrow::Take => {
            let (found, lease) = cache.take(id, generation);
            (found, Some(lease))
        }
        Borrow::Copy => (cache.copy(id, generation), None),
        Borrow::CopyWhenReturned => (cache.copy_when_returned(id, generation), None),
    };
    let (mut doc, after_seq, from_cache) = match cached {
        Some((doc, last_seq)) => (doc, last_seq, true),
        None => {
            let snapshot: Option<(Vec<u8>, Vec<u8>)> = conn
                .prepare_cached("SELECT data, sha256 FROM snapshots WHERE doc_id = ?1")?
                .query_row([id.as_str()], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?;
            let doc = match snapshot {
                Some((bytes, sum)) => {
                    if sum != sha256(&bytes) {
                        return Err(corrupt("the snapshot does not match its checksum".into()));
                    }
                    AutoCommit::load(&bytes).map_err(|e| corrupt(format!("snapshot: {e}")))?
                }
                None => AutoCommit::new(),
            };
            // Its header is checked below, once the rows are applied.
            (Document::from_checked(id.clone(), doc), 0, false)
        }
    };
    let mut last_seq = after_seq;
    for_checked_rows(conn, id, after_seq, |seq, data| {
        doc.automerge_mut().load_incremental(&data).map_err(|e| corrupt(format!("change row {seq}: {e}")))?;
        last_seq = seq;
        Ok(())
    })?;
    // A cached copy with no new rows is the copy checked when it was cached:
    // its header needs no second look (three map lookups on every edit and read).
    if !from_cache || last_seq != after_seq {
        doc.check_header().map_err(|e| corrupt(e.to_string()))?;
    }
    Ok(Some(Loaded { doc, generation, last_seq, lease }))
}

/// Runs `each` on a document's increment rows after `after_seq`, in order,
/// each checked against its checksum first (a mismatch is an error naming the row).
fn for_checked_rows(
    conn: &Connection,
    id: &DocId,
    after_seq: i64,
    mut each: impl FnMut(i64, Vec<u8>) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    let mut stmt = conn.prepare_cached(NEW_ROWS)?;
    let rows = stmt.query_map(params![id.as_str(), after_seq], |r| {
        Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?, r.get::<_, Vec<u8>>(2)?))
    })?;
    for row in rows {
        let (seq, data, sum) = row?;
        if sum != sha256(&data) {
            let reason = format!("change row {seq} does not match its checksum");
            return Err(StoreError::CorruptDocument { id: id.clone(), reason });
        }
        each(seq, data)?;
    }
    Ok(())
}

fn sha256(data: &[u8]) -> Vec<u8> {
    use sha2::Digest;
    sha2::Sha256::digest(data).to_vec()
}

/// The author tips of a document about to be saved as a snapshot, encoded to
/// be kept beside it (`Store::stored_whole` sends it whole without loading it).
/// Reads every change's metadata: a few milliseconds at 10,000 changes.
pub fn snapshot_tips(doc: &mut AutoCommit) -> Vec<u8> {
    samverkan_shared::sync::encode_tips(&samverkan_shared::sync::document_tips(doc))
}

/// [`snapshot_tips`] if `keep`, else none (NULL: a node's snapshots).
fn tips_if(keep: bool, doc: &mut AutoCommit) -> Option<Vec<u8>> {
    keep.then(|| snapshot_tips(doc))
}

/// Stores `data` (a full save) with its checksum as the document's snapshot,
/// replacing the one before; the caller bumps the generation.
fn put_snapshot(tx: &Connection, id: &DocId, data: &[u8], tips: Option<&[u8]>) -> Result<(), StoreError> {
    tx.prepare_cached(
        "INSERT INTO snapshots (doc_id, sha256, data, tips) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (doc_id) DO UPDATE SET sha256 = excluded.sha256, data = excluded.data, tips = excluded.tips",
    )?
    .execute(params![id.as_str(), sha256(data), data, tips])?;
    Ok(())
}

/// Whether `table` has a column `column`.
fn has_column(conn: &Connection, table: &str, column: &str) -> Result<bool, StoreError> {
    Ok(conn
        .prepare("SELECT 1 FROM pragma_table_info(?1) WHERE name = ?2")?
        .query_row(params![table, column], |_| Ok(()))
        .optional()?
        .is_some())
}

/// How many increment rows a document has on top of its snapshot.
fn increment_rows(tx: &Connection, id: &DocId) -> Result<i64, StoreError> {
    Ok(tx.prepare_cached("SELECT count(*) FROM changes WHERE doc_id = ?1")?.query_row([id.as_str()], |r| r.get(0))?)
}

/// Replaces the snapshot with a full save and drops the increments; returns the new generation.
fn write_snapshot(tx: &Transaction<'_>, id: &DocId, doc: &mut Document, keep_tips: bool) -> Result<i64, StoreError> {
    let data = doc.automerge_mut().save();
    let generation: i64 = tx.query_row(
        "UPDATE documents SET generation = generation + 1 WHERE doc_id = ?1 RETURNING generation",
        params![id.as_str()],
        |r| r.get(0),
    )?;
    put_snapshot(tx, id, &data, tips_if(keep_tips, doc.automerge_mut()).as_deref())?;
    tx.execute("DELETE FROM changes WHERE doc_id = ?1", [id.as_str()])?;
    tracing::debug!(doc = %id, bytes = data.len(), generation, "compacted document");
    Ok(generation)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use samverkan_shared::identity::NodeKey;
    use samverkan_shared::model::{DocumentContent, EditContext};
    use samverkan_shared::org::{Directory, OrgId};

    pub(crate) fn ctx() -> EditContext {
        ctx_for("trosa-kommun")
    }

    /// An edit context of a new node key of organisation `org`.
    pub(crate) fn ctx_for(org: &str) -> EditContext {
        EditContext {
            author: NodeKey::generate().node_id(),
            org: OrgId::new(org).unwrap(),
            node_name: org.into(),
            time: Utc.with_ymd_and_hms(2025, 1, 1, 0, 0, 0).unwrap(),
        }
    }

    pub(crate) fn new_doc(ctx: &EditContext) -> Document {
        let content = DocumentContent::new(DocKind::CitizenPromise, "Medborgarlöfte Trosa 2025");
        Document::create(DocId::random(), content, ctx, &Directory::sodermanland()).unwrap()
    }

    #[test]
    fn an_update_appends_exactly_the_new_changes_and_counts_their_size() {
        let ctx = ctx();
        let mut doc = new_doc(&ctx);
        let limits = ContentLimits::default();
        let created = DocWrite::prepare(&mut doc, &[], SizeBefore::New, &limits, Vec::new(), Vec::new(), None).unwrap();
        assert_eq!(created.size, Some(document_size(doc.automerge_mut())));
        let before = doc.heads();
        doc.edit(&ctx, &Directory::sodermanland(), "body", |e| e.set_body("ny text")).unwrap();
        doc.edit(&ctx, &Directory::sodermanland(), "title", |e| e.set_title("Medborgarlöfte Trosa 2026")).unwrap();
        let stored = SizeBefore::Stored(created.size.unwrap());
        let update = DocWrite::prepare(&mut doc, &before, stored, &limits, Vec::new(), Vec::new(), None).unwrap();
        assert!(!update.created);
        assert_eq!(update.data, doc.automerge_mut().save_after(&before), "the data is what save_after gives");
        assert_eq!(update.size, Some(document_size(doc.automerge_mut())));
        // A change over the limit is refused with the same check.
        let before = doc.heads();
        doc.edit(&ctx, &Directory::sodermanland(), "body", |e| e.set_body(&"x".repeat(4096))).unwrap();
        let tight = ContentLimits { max_change_bytes: 1024, ..limits };
        let stored = SizeBefore::Stored(update.size.unwrap());
        let refused = DocWrite::prepare(&mut doc, &before, stored, &tight, Vec::new(), Vec::new(), None);
        assert!(matches!(refused, Err(StoreError::TooLarge(LimitError::ChangeTooLarge { .. }))), "{refused:?}");
    }

    /// What is stored of `id`'s size.
    fn stored_size(store: &Store, id: &DocId) -> SizeBefore {
        store.stored_size(id).unwrap().expect("stored")
    }

    /// A document as a node receives it: whole, in one sync message from the relay.
    fn receive_whole(store: &mut Store, doc: &mut Document) -> UpdateOutcome {
        let saved = doc.automerge_mut().save();
        let (_, outcome) = store
            .update_received(doc.id(), |d| -> Result<_, StoreError> {
                d.automerge_mut().load_incremental(&saved).unwrap();
                Ok(((), Vec::new(), None))
            })
            .unwrap();
        outcome
    }

    /// The stored snapshot of a document.
    fn snapshot_bytes(store: &Store, id: &DocId) -> Vec<u8> {
        store.conn.query_row("SELECT data FROM snapshots WHERE doc_id = ?1", [id.as_str()], |r| r.get(0)).unwrap()
    }

    #[test]
    fn a_document_created_from_received_bytes_is_stored_as_those_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open_or_create(&dir.path().join("node.db")).unwrap();
        store.set_relay_content_limits(ContentLimits::default());
        let ctx = ctx();
        let mut doc = new_doc(&ctx);
        let snapshot_heads = doc.heads();
        doc.edit(&ctx, &Directory::sodermanland(), "body", |e| e.set_body("Trygghet i centrum.")).unwrap();
        // As a relay sends it whole: its snapshot, then an increment (not what a save gives).
        let mut received = doc.automerge_mut().fork_at(&snapshot_heads).unwrap().save();
        received.extend(doc.automerge_mut().save_after(&snapshot_heads));
        assert_ne!(received, doc.automerge_mut().save());
        let (_, outcome) = store
            .update_received(doc.id(), |d| -> Result<_, StoreError> {
                d.automerge_mut().load_incremental(&received).unwrap();
                Ok(((), Vec::new(), Some(received.clone())))
            })
            .unwrap();
        assert!(outcome.created);
        assert_eq!(snapshot_bytes(&store, doc.id()), received, "kept as received, not saved again");
        store.evict(doc.id());
        assert_eq!(store.load(doc.id()).unwrap().heads(), doc.heads());
        assert!(store.check().unwrap().is_empty(), "{:?}", store.check());

        // A document already stored takes the usual increment: bytes given for it are not kept.
        let before = doc.heads();
        doc.edit(&ctx, &Directory::sodermanland(), "title", |e| e.set_title("Ny titel")).unwrap();
        let change = doc.automerge_mut().save_after(&before);
        store
            .update_received(doc.id(), |d| -> Result<_, StoreError> {
                d.automerge_mut().load_incremental(&change).unwrap();
                Ok(((), Vec::new(), Some(b"not the document".to_vec())))
            })
            .unwrap();
        assert_eq!(snapshot_bytes(&store, doc.id()), received);
        assert_eq!(store.increment_rows(doc.id()).unwrap(), 1);
        store.compact(doc.id()).unwrap();
        store.evict(doc.id());
        assert_eq!(store.load(doc.id()).unwrap().heads(), doc.heads());
    }

    #[test]
    fn a_document_received_whole_under_the_relays_limits_is_counted_at_its_next_write_and_the_limits_hold() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open_or_create(&dir.path().join("node.db")).unwrap();
        let limits = ContentLimits::default();
        store.set_relay_content_limits(limits);
        let ctx = ctx();
        let mut doc = new_doc(&ctx);
        doc.edit(&ctx, &Directory::sodermanland(), "body", |e| e.set_body(&"Trygghet i centrum. ".repeat(40))).unwrap();
        assert!(receive_whole(&mut store, &mut doc).created);
        assert_eq!(stored_size(&store, doc.id()), SizeBefore::NotCounted, "received whole: not counted on receipt");
        assert_eq!(store.load(doc.id()).unwrap().heads(), doc.heads(), "and stored whole");

        // The next write counts the whole document, received part included.
        store
            .update(doc.id(), false, |d| {
                d.edit(&ctx, &Directory::sodermanland(), "title", |e| e.set_title("Ny titel")).map_err(StoreError::from)
            })
            .unwrap();
        let mut now = store.load(doc.id()).unwrap();
        assert_eq!(stored_size(&store, doc.id()), SizeBefore::Stored(document_size(now.automerge_mut())));

        // A document received whole that is over the limits in force is refused at its next write.
        let mut big = new_doc(&ctx);
        big.edit(&ctx, &Directory::sodermanland(), "body", |e| e.set_body(&"x".repeat(6000))).unwrap();
        receive_whole(&mut store, &mut big);
        let whole = document_size(big.automerge_mut());
        store.set_relay_content_limits(ContentLimits { max_change_bytes: 8192, max_document_bytes: whole });
        let refused = store.update(big.id(), false, |d| {
            d.edit(&ctx, &Directory::sodermanland(), "title", |e| e.set_title("Större")).map_err(StoreError::from)
        });
        assert!(
            matches!(refused, Err(StoreError::TooLarge(LimitError::DocumentTooLarge { .. }))),
            "the whole document counts at the next write: {refused:?}"
        );
        assert_eq!(stored_size(&store, big.id()), SizeBefore::NotCounted, "nothing of the refused write was stored");
    }

    #[test]
    fn a_document_received_whole_is_counted_at_once_unless_the_limits_in_force_are_the_relays() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open_or_create(&dir.path().join("node.db")).unwrap();
        let ctx = ctx();
        // The node's own limits (no relay announced any, or the relay's are looser): counted, and checked, on receipt.
        store.set_content_limits(ContentLimits::default());
        let mut doc = new_doc(&ctx);
        receive_whole(&mut store, &mut doc);
        assert_eq!(stored_size(&store, doc.id()), SizeBefore::Stored(document_size(doc.automerge_mut())));
        store.set_content_limits(ContentLimits { max_change_bytes: 64, max_document_bytes: 1 << 20 });
        let mut other = new_doc(&ctx);
        let saved = other.automerge_mut().save();
        let refused = store.update_received(other.id(), |d| -> Result<_, StoreError> {
            d.automerge_mut().load_incremental(&saved).unwrap();
            Ok(((), Vec::new(), None))
        });
        assert!(matches!(refused, Err(StoreError::TooLarge(LimitError::ChangeTooLarge { .. }))), "{refused:?}");
        assert!(!store.contains(other.id()).unwrap(), "nothing was stored");
        // A local creation always counts, even under the relay's limits.
        store.set_relay_content_limits(ContentLimits::default());
        let mut local = new_doc(&ctx);
        store.insert(&mut local).unwrap();
        assert_eq!(stored_size(&store, local.id()), SizeBefore::Stored(document_size(local.automerge_mut())));
    }

    #[test]
    fn a_scan_of_every_summary_sees_every_document_and_gives_the_page_cache_its_size_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open_or_create(&dir.path().join("relay.db")).unwrap();
        let ctx = ctx();
        let mut ids: Vec<DocId> = (0..40)
            .map(|_| {
                let mut doc = new_doc(&ctx);
                store.insert(&mut doc).unwrap();
                doc.id().clone()
            })
            .collect();
        let cache_size =
            |store: &Store| store.conn.pragma_query_value(None, "cache_size", |r| r.get::<_, i64>(0)).unwrap();
        store.conn.pragma_update(None, "cache_size", -1234).unwrap();
        let mut seen = Vec::new();
        store
            .for_each_summary(|summary| {
                assert_eq!(cache_size(&store), SCAN_CACHE_PAGES, "the scan runs with the small cache");
                assert_eq!(summary.head_hashes()?.len(), 1);
                seen.push(summary.id);
                Ok(())
            })
            .unwrap();
        ids.sort();
        seen.sort();
        assert_eq!(seen, ids);
        assert_eq!(cache_size(&store), -1234);
        // A scan stopped by its caller's error gives the size back too.
        let stopped =
            store.for_each_summary(|summary| Err(StoreError::CorruptDocument { id: summary.id, reason: "x".into() }));
        assert!(matches!(stopped, Err(StoreError::CorruptDocument { .. })));
        assert_eq!(cache_size(&store), -1234);
        assert!(store.sync_states("nobody").unwrap().is_empty());
        assert_eq!(cache_size(&store), -1234);
    }

    #[test]
    fn replacing_sync_states_deletes_the_peers_others_and_leaves_other_peers_alone() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open_or_create(&dir.path().join("relay.db")).unwrap();
        let (a, b, c) = (DocId::random(), DocId::random(), DocId::random());
        store.save_sync_states("p", [(a.clone(), vec![1]), (b.clone(), vec![2])]).unwrap();
        store.save_sync_states("q", [(a.clone(), vec![3])]).unwrap();
        store.replace_sync_states("p", [(c.clone(), vec![4]), (a.clone(), vec![5])]).unwrap();
        let mut p = store.sync_states("p").unwrap();
        p.sort();
        let mut want = vec![(a.clone(), vec![5]), (c, vec![4])];
        want.sort();
        assert_eq!(p, want);
        assert_eq!(store.sync_states("q").unwrap(), vec![(a, vec![3])]);
        store.replace_sync_states("p", []).unwrap();
        assert!(store.sync_states("p").unwrap().is_empty());
    }

    #[test]
    fn edits_survive_reopening_and_compaction_bounds_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.db");
        let ctx = ctx();
        let directory = Directory::sodermanland();
        let mut doc = new_doc(&ctx);
        let id = doc.id().clone();
        {
            let mut store = Store::open_or_create(&path).unwrap();
            store.insert(&mut doc).unwrap();
            for i in 0..200 {
                store
                    .update(&id, false, |d| {
                        d.edit(&ctx, &directory, "body", |e| e.set_body(&format!("Version {i} åäö")))
                            .map_err(StoreError::from)
                    })
                    .unwrap();
            }
            assert!(store.increment_rows(&id).unwrap() < COMPACT_AFTER_ROWS);
        }
        let store = Store::open(&path).unwrap();
        let mut loaded = store.load(&id).unwrap();
        assert_eq!(loaded.view().unwrap().body, "Version 199 åäö");
        assert_eq!(loaded.change_count(), 201);
        assert_eq!(store.list().unwrap()[0].title, "Medborgarlöfte Trosa 2025");
        assert!(store.check().unwrap().is_empty());
    }

    #[test]
    fn a_cached_copy_is_checked_again_when_rows_written_elsewhere_are_read_on_top() {
        use automerge::transaction::Transactable;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.db");
        let ctx = ctx();
        let mut doc = new_doc(&ctx);
        let id = doc.id().clone();
        let mut ours = Store::open_or_create(&path).unwrap();
        ours.insert(&mut doc).unwrap();
        let heads = ours.read_doc(&id, |d| d.get_heads()).unwrap().unwrap();
        // Unchanged since cached: taken as it is, again and again.
        for _ in 0..3 {
            assert_eq!(ours.read_doc(&id, |d| d.get_heads()).unwrap().unwrap(), heads);
        }
        assert_eq!(ours.cached(), 1);
        // A row written behind the store's back that makes it another document's
        // copy: the cached copy with it read on top is refused, not served.
        let mut other = doc.automerge_mut().fork();
        other.put(automerge::ROOT, "id", DocId::random().as_str()).unwrap();
        let row = other.save_after(&heads);
        let writer = rusqlite::Connection::open(&path).unwrap();
        writer
            .execute(
                "INSERT INTO changes (doc_id, data, sha256) VALUES (?1, ?2, ?3)",
                params![id.as_str(), row, sha256(&row)],
            )
            .unwrap();
        assert!(matches!(ours.read_doc(&id, |d| d.get_heads()), Err(StoreError::CorruptDocument { .. })));
        assert!(matches!(ours.load(&id), Err(StoreError::CorruptDocument { .. })));
    }

    #[test]
    fn reading_new_rows_reuses_its_prepared_statement_after_other_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.db");
        let ctx = ctx();
        let directory = Directory::sodermanland();
        let mut doc = new_doc(&ctx);
        let id = doc.id().clone();
        let mut writer = Store::open_or_create(&path).unwrap();
        writer.insert(&mut doc).unwrap();
        let reader = Store::open(&path).unwrap();
        for i in 0..10 {
            writer
                .update(&id, false, |d| {
                    d.edit(&ctx, &directory, "b", |e| e.set_body(&format!("b {i}"))).map_err(StoreError::from)
                })
                .unwrap();
            reader.read_doc(&id, |d| d.get_heads()).unwrap();
        }
        assert_eq!(reader.load(&id).unwrap().view().unwrap().body, "b 9");
        let plan: String = reader
            .conn
            .query_row(&format!("EXPLAIN QUERY PLAN {NEW_ROWS}"), params![id.as_str(), 0], |r| r.get(3))
            .unwrap();
        assert!(plan.contains("changes_by_doc (doc_id=? AND seq>?)"), "{plan}");
        // Each re-prepare parses and plans the statement again (9% of an edit-and-read loop's CPU).
        for store in [&reader, &writer] {
            let stmt = store.conn.prepare_cached(NEW_ROWS).unwrap();
            assert_eq!(stmt.get_status(rusqlite::StatementStatus::RePrepare), 0);
        }
    }

    #[test]
    fn cached_documents_see_what_other_processes_wrote() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.db");
        let ctx = ctx();
        let directory = Directory::sodermanland();
        let mut doc = new_doc(&ctx);
        let id = doc.id().clone();
        let mut ours = Store::open_or_create(&path).unwrap();
        ours.insert(&mut doc).unwrap();
        assert!(ours.load(&id).is_ok());
        assert_eq!(ours.cached(), 1);
        // Another process appends edits, then enough to compact (a new snapshot generation).
        let mut theirs = Store::open(&path).unwrap();
        for i in 0..(COMPACT_AFTER_ROWS + 3) {
            theirs
                .update(&id, false, |d| {
                    d.edit(&ctx, &directory, "body", |e| e.set_body(&format!("theirs {i}"))).map_err(StoreError::from)
                })
                .unwrap();
            if i == 2 {
                assert_eq!(ours.load(&id).unwrap().view().unwrap().body, "theirs 2");
            }
        }
        let expected = format!("theirs {}", COMPACT_AFTER_ROWS + 2);
        assert_eq!(ours.load(&id).unwrap().view().unwrap().body, expected);
        // Our own edit builds on all of theirs.
        ours.update(&id, false, |d| {
            d.edit(&ctx, &directory, "x", |e| e.set_place(Some("Trosa"))).map_err(StoreError::from)
        })
        .unwrap();
        let fresh = Store::open(&path).unwrap().load(&id).unwrap().view().unwrap();
        assert_eq!(fresh.body, expected);
        assert_eq!(fresh.place.as_deref(), Some("Trosa"));
    }

    #[test]
    fn handles_sharing_a_cache_take_each_others_committed_copy_and_never_an_uncommitted_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.db");
        let (ctx, directory) = (ctx(), Directory::sodermanland());
        let mut doc = new_doc(&ctx);
        let id = doc.id().clone();
        let mut daemon = Store::open_or_create(&path).unwrap();
        daemon.insert(&mut doc).unwrap();
        let mut editor = Store::open(&path).unwrap();
        editor.share_cache(daemon.doc_cache()).unwrap();
        assert!(editor.doc_cache().same_as(&daemon.doc_cache()));
        // The snapshot generation, and how many rows a copy that folded rows up to `seq` lacks.
        let stands = |store: &Store, seq: i64| -> (i64, i64) {
            store
                .conn
                .query_row(
                    "SELECT generation, (SELECT count(*) FROM changes WHERE doc_id = ?1 AND seq > ?2)
                     FROM documents WHERE doc_id = ?1",
                    params![id.as_str(), seq],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .unwrap()
        };
        // Past a compaction too (a new snapshot generation): after each of the
        // editor's commits the daemon finds the editor's copy, with every row in it.
        for i in 0..(COMPACT_AFTER_ROWS + 3) {
            let (_, outcome) = editor
                .update(&id, false, |d| {
                    d.edit(&ctx, &directory, "body", |e| e.set_body(&format!("edit {i}"))).map_err(StoreError::from)
                })
                .unwrap();
            let (generation, _) = stands(&daemon, 0);
            let (mut copy, folded) =
                daemon.cache.copy(&id, generation).expect("the editor's copy is in the shared cache");
            assert_eq!(copy.heads(), outcome.heads, "edit {i}");
            assert_eq!(stands(&daemon, folded), (generation, 0), "edit {i}: the daemon has no row to read on top");
            assert_eq!(daemon.read_doc(&id, |d| d.get_heads()).unwrap().unwrap(), outcome.heads);
        }
        assert_eq!(daemon.cached(), 1, "one copy for both handles");
        // An edit that fails leaves nothing of it in the shared copy.
        let committed = daemon.load(&id).unwrap().view().unwrap().body;
        let failed: Result<((), UpdateOutcome), StoreError> = editor.update(&id, false, |d| {
            d.edit(&ctx, &directory, "body", |e| e.set_body("never committed")).map_err(StoreError::from)?;
            Err(StoreError::DiskFull)
        });
        assert!(matches!(failed, Err(StoreError::DiskFull)));
        assert_eq!(daemon.load(&id).unwrap().view().unwrap().body, committed);
        assert_eq!(editor.load(&id).unwrap().view().unwrap().body, committed);
        // Another database's cache is refused: its copies would pass for this one's.
        let elsewhere = Store::open_or_create(&dir.path().join("other.db")).unwrap();
        assert!(matches!(editor.share_cache(elsewhere.doc_cache()), Err(StoreError::OtherDatabase { .. })));
    }

    #[test]
    fn setting_the_cache_capacity_keeps_the_most_recently_used_copies() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open_or_create(&dir.path().join("node.db")).unwrap();
        let ctx = ctx();
        let ids: Vec<DocId> = (0..3)
            .map(|_| {
                let mut doc = new_doc(&ctx);
                store.insert(&mut doc).unwrap();
                doc.id().clone()
            })
            .collect();
        for id in &ids {
            store.load(id).unwrap();
        }
        // The daemon sets its capacity at every connection: a web app sharing the cache keeps its copies.
        store.set_cache_capacity(DEFAULT_CACHE_CAPACITY);
        assert_eq!(store.cached(), 3);
        store.set_cache_capacity(2);
        assert_eq!(store.cached(), 2);
        let generation = 0;
        assert!(store.cache.copy(&ids[0], generation).is_none(), "the least recently used copy goes first");
        assert!(store.cache.copy(&ids[2], generation).is_some());
        store.set_cache_capacity(0);
        assert_eq!(store.cached(), 0);
    }

    #[test]
    fn a_document_taken_out_by_another_thread_is_waited_for_not_loaded_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.db");
        let mut doc = new_doc(&ctx());
        let id = doc.id().clone();
        let mut store = Store::open_or_create(&path).unwrap();
        store.insert(&mut doc).unwrap();
        let cache = store.doc_cache();
        let (found, lease) = cache.take(&id, 0);
        assert!(found.is_none(), "nothing cached yet");
        // The same thread asking again does not wait for itself.
        let (again, _) = cache.take(&id, 0);
        assert!(again.is_none());
        let (asking, asked) = std::sync::mpsc::channel();
        let other = {
            let (cache, id) = (cache.clone(), id.clone());
            std::thread::spawn(move || {
                asking.send(()).unwrap();
                cache.take(&id, 0).0.map(|(mut doc, last_seq)| (doc.heads(), last_seq))
            })
        };
        asked.recv().unwrap();
        std::thread::sleep(Duration::from_millis(50)); // Let it start waiting.
                                                       // Put back while it waits: it gets this copy rather than none.
        cache.put(doc.clone(), 0, 0, Some(lease));
        assert_eq!(other.join().unwrap(), Some((doc.heads(), 0)));
    }

    #[test]
    fn a_read_needs_no_write_lock_and_sees_what_was_committed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.db");
        let (ctx, directory) = (ctx(), Directory::sodermanland());
        let mut doc = new_doc(&ctx);
        let id = doc.id().clone();
        let mut ours = Store::open_or_create(&path).unwrap();
        ours.insert(&mut doc).unwrap();
        ours.set_busy_timeout(Duration::ZERO).unwrap();
        let body = |store: &Store| {
            store.read_doc(&id, |d| Document::from_automerge(id.clone(), d.clone()).unwrap().view().unwrap().body)
        };
        let mut theirs = Store::open(&path).unwrap();
        theirs
            .update(&id, false, |d| {
                d.edit(&ctx, &directory, "body", |e| e.set_body("committed")).map_err(StoreError::from)
            })
            .unwrap();
        // Another process holds the write lock (an editor's transaction, a long import).
        let writer = rusqlite::Connection::open(&path).unwrap();
        writer.execute_batch("BEGIN IMMEDIATE; UPDATE documents SET title = 'not yet'").unwrap();
        assert!(ours.update(&id, false, |_| Ok::<_, StoreError>(())).is_err_and(|e| e.is_busy()), "writes wait");
        assert_eq!(body(&ours).unwrap().as_deref(), Some("committed"), "reads do not");
        writer.execute_batch("ROLLBACK").unwrap();
        // The copy read is kept and brought up to date by the next read.
        theirs
            .update(&id, false, |d| d.edit(&ctx, &directory, "body", |e| e.set_body("later")).map_err(StoreError::from))
            .unwrap();
        assert_eq!(ours.cached(), 1);
        assert_eq!(body(&ours).unwrap().as_deref(), Some("later"));
        assert_eq!(body(&ours).unwrap(), Some("later".to_string()));
        assert_eq!(ours.read_doc(&DocId::random(), |_| ()).unwrap(), None);
    }

    #[test]
    fn receipts_are_stored_with_the_change_kept_first_and_survive_migration_from_schema_4() {
        use samverkan_shared::receipt::ApprovalReceipt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.db");
        let ctx = ctx();
        let directory = Directory::sodermanland();
        let relay = NodeKey::generate();
        let mut doc = new_doc(&ctx);
        let id = doc.id().clone();
        let at = |s: &str| s.parse::<DateTime<Utc>>().unwrap();
        let first = ApprovalReceipt::issue(&relay, &id, &"ab".repeat(64), at("2025-03-01T00:00:00Z")).unwrap();
        let later = ApprovalReceipt::issue(&relay, &id, &"ab".repeat(64), at("2025-03-02T00:00:00Z")).unwrap();
        {
            let mut store = Store::open_or_create(&path).unwrap();
            store.insert(&mut doc).unwrap();
            // A failed update stores no receipt.
            let failed: Result<((), _), StoreError> = store.update_receipted(&id, false, |d| {
                d.edit(&ctx, &directory, "x", |e| e.set_place(Some("Trosa"))).map_err(StoreError::from)?;
                Err(StoreError::NotFound(id.clone()))
            });
            assert!(failed.is_err());
            assert!(store.receipts(&id).unwrap().is_empty());
            store
                .update_receipted(&id, false, |d| {
                    d.edit(&ctx, &directory, "x", |e| e.set_place(Some("Trosa"))).map_err(StoreError::from)?;
                    Ok::<_, StoreError>(((), Vec::new(), vec![first.clone()]))
                })
                .unwrap();
            assert_eq!(store.add_receipts(&[later]).unwrap(), 0, "the first receipt of a record is kept");
            assert_eq!(store.receipts(&id).unwrap(), vec![first.clone()]);
        }
        // A schema 4 database (before receipts) is migrated and keeps its documents.
        let old = Connection::open(&path).unwrap();
        back_to_schema_6(&old);
        old.execute_batch("DROP TABLE doc_refusals; DROP TABLE approval_receipts; PRAGMA user_version = 4;").unwrap();
        drop(old);
        let mut store = Store::open(&path).unwrap();
        assert!(store.receipts(&id).unwrap().is_empty());
        assert_eq!(store.add_receipts(std::slice::from_ref(&first)).unwrap(), 1);
        assert_eq!(store.load(&id).unwrap().view().unwrap().place.as_deref(), Some("Trosa"));
    }

    /// Undoes migration 7 (snapshots back in the documents row), to make an older database.
    fn back_to_schema_6(conn: &Connection) {
        conn.execute_batch(
            "ALTER TABLE documents ADD COLUMN snapshot BLOB;
             ALTER TABLE documents ADD COLUMN snapshot_sha256 BLOB;
             UPDATE documents SET
                 snapshot = (SELECT data FROM snapshots s WHERE s.doc_id = documents.doc_id),
                 snapshot_sha256 = (SELECT sha256 FROM snapshots s WHERE s.doc_id = documents.doc_id);
             DROP TABLE snapshots;
             PRAGMA user_version = 6;",
        )
        .unwrap();
    }

    #[test]
    fn a_schema_6_database_keeps_every_document_and_damage_stays_visible_when_snapshots_move_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.db");
        let (ctx, directory) = (ctx(), Directory::sodermanland());
        let (mut plain, mut compacted, mut damaged) = (new_doc(&ctx), new_doc(&ctx), new_doc(&ctx));
        let mut bodies = Vec::new();
        {
            let mut store = Store::open_or_create(&path).unwrap();
            for doc in [&mut plain, &mut compacted, &mut damaged] {
                store.insert(doc).unwrap();
            }
            // One document compacted once, with increments on top of its snapshot.
            for i in 0..(COMPACT_AFTER_ROWS + 3) {
                store
                    .update(compacted.id(), false, |d| {
                        d.edit(&ctx, &directory, "b", |e| e.set_body(&format!("b {i}"))).map_err(StoreError::from)
                    })
                    .unwrap();
            }
            for doc in [&plain, &compacted] {
                bodies.push(store.load(doc.id()).unwrap().view().unwrap().body);
            }
        }
        let old = Connection::open(&path).unwrap();
        back_to_schema_6(&old);
        old.execute("UPDATE documents SET snapshot_sha256 = x'00' WHERE doc_id = ?1", [damaged.id().as_str()]).unwrap();
        drop(old);
        let store = Store::open(&path).unwrap();
        let version: i32 = store.conn.pragma_query_value(None, "user_version", |r| r.get(0)).unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        for (doc, body) in [&plain, &compacted].iter().zip(&bodies) {
            assert_eq!(&store.load(doc.id()).unwrap().view().unwrap().body, body);
        }
        assert!(store.increment_rows(compacted.id()).unwrap() > 0, "increments stay on top of the moved snapshot");
        assert!(matches!(store.load(damaged.id()), Err(StoreError::CorruptDocument { .. })));
        assert_eq!(store.check().unwrap().len(), 1, "only the damaged document");
        // The listing reads no snapshot: it is not in the documents row any more.
        let columns: Vec<String> = store
            .conn
            .prepare("SELECT name FROM pragma_table_info('documents')")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(!columns.iter().any(|c| c.starts_with("snapshot")), "{columns:?}");
    }

    /// Schema 7 as it was released: snapshots without their tips column.
    fn back_to_schema_7(conn: &Connection) {
        conn.execute_batch(
            "ALTER TABLE snapshots DROP COLUMN tips;
             DELETE FROM meta WHERE key = 'snapshot_tips';
             PRAGMA user_version = 7;",
        )
        .unwrap();
    }

    /// Opens `path` after `downgrade`, then writes, compacts and reads the
    /// document `id` back whole: the store works on the migrated database.
    fn works_after(path: &Path, id: &DocId, downgrade: impl FnOnce(&Connection)) {
        let (ctx, directory) = (ctx(), Directory::sodermanland());
        let old = Connection::open(path).unwrap();
        downgrade(&old);
        drop(old);
        let mut store = Store::open(path).unwrap();
        store.keep_snapshot_tips_on_write(true);
        let version: i32 = store.conn.pragma_query_value(None, "user_version", |r| r.get(0)).unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        store
            .update(id, false, |d| {
                d.edit(&ctx, &directory, "b", |e| e.set_body("Efter uppgraderingen")).map_err(StoreError::from)
            })
            .unwrap();
        store.compact(id).unwrap();
        let whole = store.stored_whole(id).unwrap().expect("stored");
        assert!(!whole.tips.is_empty(), "the new snapshot has its tips");
        assert_eq!(store.load(id).unwrap().view().unwrap().body, "Efter uppgraderingen");
        assert!(store.check().unwrap().is_empty());
    }

    #[test]
    fn a_schema_7_database_gets_its_snapshot_tips_column_whichever_build_wrote_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.db");
        let mut doc = new_doc(&ctx());
        let id = doc.id().clone();
        Store::open_or_create(&path).unwrap().insert(&mut doc).unwrap();
        // As released with schema 7: no tips column.
        works_after(&path, &id, back_to_schema_7);
        // As written by the builds that added the column but still wrote version 7.
        works_after(&path, &id, |conn| conn.execute_batch("PRAGMA user_version = 7;").unwrap());
    }

    #[test]
    fn a_schema_3_database_gets_each_documents_size_and_the_limits_hold_after_migration() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.db");
        let ctx = ctx();
        let directory = Directory::sodermanland();
        let mut doc = new_doc(&ctx);
        let id = doc.id().clone();
        Store::open_or_create(&path).unwrap().insert(&mut doc).unwrap();
        let old = Connection::open(&path).unwrap();
        back_to_schema_6(&old);
        old.execute_batch(
            "DROP TABLE doc_refusals; DROP TABLE approval_receipts; ALTER TABLE documents DROP COLUMN change_bytes; PRAGMA user_version = 3;",
        )
        .unwrap();
        drop(old);
        let mut store = Store::open(&path).unwrap();
        let size: i64 = store.conn.query_row("SELECT change_bytes FROM documents", [], |r| r.get(0)).unwrap();
        assert_eq!(size as u64, document_size(store.load(&id).unwrap().automerge_mut()));
        // The backfilled size counts: a document at its limit takes no more changes.
        store.set_content_limits(ContentLimits { max_change_bytes: 1024, max_document_bytes: size as u64 });
        let refused = store.update(&id, false, |d| {
            d.edit(&ctx, &directory, "x", |e| e.set_place(Some("Flen"))).map_err(StoreError::from)
        });
        assert!(matches!(refused, Err(StoreError::TooLarge(LimitError::DocumentTooLarge { .. }))), "{refused:?}");
    }

    #[test]
    fn a_failed_edit_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open_or_create(&dir.path().join("node.db")).unwrap();
        let ctx = ctx();
        let mut doc = new_doc(&ctx);
        let id = doc.id().clone();
        store.insert(&mut doc).unwrap();
        let directory = Directory::sodermanland();
        let result: Result<((), _), StoreError> = store.update(&id, false, |d| {
            d.edit(&ctx, &directory, "x", |e| e.set_title("")).map(|_| ()).map_err(StoreError::from)
        });
        assert!(matches!(result, Err(StoreError::Model(ModelError::EmptyTitle))));
        assert_eq!(store.increment_rows(&id).unwrap(), 0);
    }

    #[test]
    fn foreign_and_corrupt_files_are_refused_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let garbage = dir.path().join("garbage.db");
        std::fs::write(&garbage, b"this is certainly not an sqlite database, just some text ............").unwrap();
        let err = Store::open(&garbage).unwrap_err();
        assert!(matches!(err, StoreError::NotADatabase { .. }), "{err}");

        let foreign = dir.path().join("foreign.db");
        Connection::open(&foreign).unwrap().execute_batch("CREATE TABLE t (x INTEGER);").unwrap();
        let err = Store::open(&foreign).unwrap_err();
        assert!(matches!(err, StoreError::Foreign { .. }), "{err}");

        let missing = dir.path().join("missing.db");
        assert!(matches!(Store::open(&missing), Err(StoreError::Missing { .. })));

        let newer = dir.path().join("newer.db");
        drop(Store::open_or_create(&newer).unwrap());
        Connection::open(&newer).unwrap().pragma_update(None, "user_version", 99).unwrap();
        assert!(matches!(Store::open(&newer), Err(StoreError::NewerSchema { found: 99, .. })));
    }

    #[test]
    fn a_damaged_change_row_is_reported_not_panicked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.db");
        let ctx = ctx();
        let mut doc = new_doc(&ctx);
        let id = doc.id().clone();
        let mut store = Store::open_or_create(&path).unwrap();
        store.insert(&mut doc).unwrap();
        let directory = Directory::sodermanland();
        store
            .update(&id, false, |d| {
                d.edit(&ctx, &directory, "x", |e| e.set_place(Some("Trosa"))).map_err(StoreError::from)
            })
            .unwrap();
        // Flip one byte of the stored change, as a failing disk would.
        let (seq, mut data): (i64, Vec<u8>) =
            store.conn.query_row("SELECT seq, data FROM changes", [], |r| Ok((r.get(0)?, r.get(1)?))).unwrap();
        let middle = data.len() / 2;
        data[middle] ^= 0x01;
        store.conn.execute("UPDATE changes SET data = ?2 WHERE seq = ?1", params![seq, data]).unwrap();
        // A fresh process (no cached copy) reads the damaged row.
        let store = Store::open(&path).unwrap();
        let err = store.load(&id).unwrap_err();
        assert!(matches!(err, StoreError::CorruptDocument { .. }), "{err}");
        assert!(err.to_string().contains("checksum"), "{err}");
        assert_eq!(store.check().unwrap().len(), 1);
    }
}

#[cfg(test)]
mod measurements {
    use super::*;
    use chrono::TimeZone;
    use samverkan_shared::identity::NodeKey;
    use samverkan_shared::model::{DocumentContent, EditContext};
    use samverkan_shared::org::{Directory, OrgId};
    use std::time::Instant;

    /// Prints what 10,000 small durable edits cost and how fast the document then loads.
    /// `cargo test --release -p samverkan-store -- --ignored --nocapture ten_thousand`
    #[test]
    #[ignore = "measurement; run explicitly"]
    fn ten_thousand_small_edits_then_load() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open_or_create(&dir.path().join("node.db")).unwrap();
        let ctx = EditContext {
            author: NodeKey::generate().node_id(),
            org: OrgId::new("flen-kommun").unwrap(),
            node_name: "Flen".into(),
            time: Utc.with_ymd_and_hms(2025, 1, 1, 0, 0, 0).unwrap(),
        };
        let directory = Directory::sodermanland();
        let mut doc =
            Document::create(DocId::random(), DocumentContent::new(DocKind::OperationsPlan, "Plan"), &ctx, &directory)
                .unwrap();
        let id = doc.id().clone();
        store.insert(&mut doc).unwrap();
        let started = Instant::now();
        let mut body = String::new();
        for i in 0..10_000 {
            body.push_str(if i % 50 == 49 { "\n" } else { "x" });
            store
                .update(&id, false, |d| {
                    d.edit(&ctx, &directory, "type", |e| e.set_body(&body)).map_err(StoreError::from)
                })
                .unwrap();
        }
        let edits = started.elapsed();
        let rows = store.increment_rows(&id).unwrap();
        let started = Instant::now();
        let mut loaded = store.load(&id).unwrap();
        let load = started.elapsed();
        assert_eq!(loaded.change_count(), 10_001);
        println!(
            "10000 durable edits: {:.1} s ({:.2} ms each); load after: {:.1} ms from a snapshot and {rows} increment rows",
            edits.as_secs_f64(),
            edits.as_secs_f64() * 1000.0 / 10_000.0,
            load.as_secs_f64() * 1000.0
        );
    }
}
