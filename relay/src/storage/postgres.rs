//! The relay's storage on PostgreSQL: several relay instances on one database.
//!
//! Owns the PostgreSQL schema (migrations checked in under
//! `relay/migrations/postgres/`, applied once under an advisory lock), every
//! SQL statement against it, and the listener that tells an instance what the
//! others committed. Keeps the contract of [`RelayStorage`] exactly as
//! [`super::SqliteStorage`] does: documents as a checksummed snapshot plus
//! increments (compacted after [`COMPACT_AFTER_ROWS`]), content limits checked
//! before anything is written, and `with_doc` storing a document's new changes,
//! signatures and receipts in one transaction that has committed (durably:
//! `synchronous_commit = on`) before it returns.
//!
//! Several instances: every write to a document holds a per-document lock
//! (`pg_advisory_xact_lock` on the id), so two instances never interleave
//! writes to one document; under it the stored version is compared with the
//! copy the change was made on, and what another instance committed meanwhile
//! is applied first (Automerge merges, so neither side's changes are lost).
//! Metadata changes (the enrollment directory and join codes) are
//! read-modify-write transactions under the key's row lock, so a join code is
//! single-use across instances. Each commit notifies the others (`NOTIFY`,
//! delivered only on commit): document changes on `samverkan_docs`, metadata
//! on `samverkan_meta`; a listener thread per instance turns them into
//! [`RemoteEvent`]s.
//!
//! The hot path is served like the SQLite storage's: a document's work holds
//! its slot in this instance first (one lock per document, holding the loaded
//! copy, [`Slots`]), so only work on the same document waits, and at most one
//! transaction per instance waits for a document's lock in PostgreSQL. A step
//! that leaves the document's heads unchanged (a sync message generated, an
//! acknowledgement received) writes nothing and takes no database lock. The
//! loaded copy, the index (heads and parties), receipts and signatures are
//! served from memory while they are current: the listener marks a document
//! changed before it tells anyone of the other instance's commit, so the next
//! step reads the rows it lacks (one statement, no lock); without a connected
//! listener nothing cached is trusted (see [`cache`]). The same memory
//! answers the relay's non-blocking reads (`cached_is_party`,
//! `try_with_loaded`, `cached_receipts`, `cached_signatures`), with which a
//! connection passes a change on or takes an acknowledgement on the async
//! runtime's thread; whatever is not current, or a slot in use, is `None`
//! there and goes the full way. Revocation, join codes and connection limits
//! are always read from the database.
//!
//! Threads: the blocking `postgres` client runs a small runtime of its own and
//! must never be called on a tokio worker thread. Every statement therefore
//! runs on one of this storage's own worker threads, each holding a
//! connection of its own from an `r2d2` pool; the caller waits on a channel.
//! Workers are started as jobs outnumber idle ones, up to the pool's size
//! ([`DEFAULT_POOL_SIZE`]), and end after a minute without work. A write's
//! transaction holds one worker (and the document's lock) while the caller
//! merges and prepares what to write; the others serve reads and other
//! documents. Statements are sent with their parameter types
//! (`query_typed`): one round trip each, no separate prepare.
//!
//! Never does: keep a document's contents anywhere but in its bounded slots,
//! write without the document's lock, or serve a cached value after the
//! listener has handed on a newer commit of it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use automerge::{AutoCommit, ChangeHash};
use chrono::Utc;
use postgres::error::SqlState;
use postgres::fallible_iterator::FallibleIterator;
use postgres::types::Type;
use postgres::{Client, GenericClient, NoTls, Transaction};
use r2d2_postgres::PostgresConnectionManager;
use samverkan_shared::acceptance::{ContentLimits, LimitError};
use samverkan_shared::ids::DocId;
use samverkan_shared::model::{Document, StoredFields};
use samverkan_shared::org::OrgId;
use samverkan_shared::receipt::ApprovalReceipt;
use samverkan_shared::sync::{SignedChange, StoredWhole};
use samverkan_store::slots::{read_only, Slot, Slots};
use samverkan_store::StoreError;
use sha2::{Digest, Sha256};
use tracing::{debug, info, warn};

use super::{DocEntry, RelayStorage, RemoteEvent};
use cache::{Caches, Known, Stamp};

mod cache;

/// The name errors of this backend carry.
pub const BACKEND: &str = "postgresql";
/// Schema version this build writes: one per migration.
pub const SCHEMA_VERSION: i32 = MIGRATIONS.len() as i32;
/// Incremental rows per document before they are folded into a new snapshot
/// (the same as the SQLite store's).
pub const COMPACT_AFTER_ROWS: i64 = samverkan_store::COMPACT_AFTER_ROWS;
/// Connections in the pool, and so worker threads, at most by default: a
/// write holds one while its transaction is open, and the relay runs up to 16
/// storage steps at once (most need none: see the module docs).
pub const DEFAULT_POOL_SIZE: u32 = 8;
/// An instance whose heartbeat is older than this is taken as gone: its
/// connections no longer count against a node's per-key limit.
pub const INSTANCE_TIMEOUT: Duration = Duration::from_secs(30);

/// Migrations: entry `i` takes the schema from version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    include_str!("../../migrations/postgres/0001_relay.sql"),
    include_str!("../../migrations/postgres/0002_snapshot_tips.sql"),
];
/// The advisory lock migrations run under (two instances starting at once).
const MIGRATION_LOCK: i64 = 0x5356_4B4E_0001;
/// Notification channel of document changes (payload: instance, doc id and
/// whether receipts were added, separated by spaces: see `notify_docs`).
const CHANNEL_DOCS: &str = "samverkan_docs";
/// A document change's notification says: the commit may have added receipts.
const RECEIPTS_ADDED: &str = "receipts";
/// A document change's notification says: the commit added no receipts.
const NO_RECEIPTS: &str = "no-receipts";
/// Notification channel of metadata changes (payload: instance).
const CHANNEL_META: &str = "samverkan_meta";
/// Notification channel asking an instance to close a connection
/// (payload: instance, space, connection number, space, reason).
const CHANNEL_CLOSE: &str = "samverkan_close";
/// How often the listener renews the instance's heartbeat.
const HEARTBEAT: Duration = Duration::from_secs(5);

/// The pool of connections the worker takes from.
type Pool = r2d2_postgres::r2d2::Pool<PostgresConnectionManager<NoTls>>;

fn backend(message: impl std::fmt::Display) -> StoreError {
    StoreError::Backend { backend: BACKEND, message: message.to_string() }
}

/// A PostgreSQL error as a store error: a full disk and a read-only server as
/// such, anything else with the server's own words.
fn pg(e: postgres::Error) -> StoreError {
    match e.code() {
        Some(code) if *code == SqlState::DISK_FULL => StoreError::DiskFull,
        Some(code) if *code == SqlState::READ_ONLY_SQL_TRANSACTION => StoreError::ReadOnly(e.to_string()),
        _ => match e.as_db_error() {
            Some(db) => backend(db),
            None => backend(&e),
        },
    }
}

fn worker_gone() -> StoreError {
    backend("the storage worker thread stopped")
}

/// A 64-bit advisory lock key for a name (a document id, a metadata key).
fn lock_key(space: &str, name: &str) -> i64 {
    let digest = Sha256::digest(format!("{space}\0{name}").as_bytes());
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&digest[..8]);
    i64::from_be_bytes(bytes)
}

fn sha256(data: &[u8]) -> Vec<u8> {
    Sha256::digest(data).to_vec()
}

/// One unit of work for a worker thread, given its connection (or why there is none).
type Job = Box<dyn FnOnce(Result<&mut Client, StoreError>) + Send>;

/// A worker thread that has waited this long for work while others are idle too ends,
/// handing its connection back to the pool.
const WORKER_IDLE: Duration = Duration::from_secs(60);

/// The threads that own the database connections; statements run there.
///
/// Elastic: a job waits for an idle worker, and a new worker (with a
/// connection of its own) is started whenever jobs outnumber the idle ones,
/// up to `max` (the pool's size). A worker running [`Workers::open`] is held
/// by that transaction until its caller commits or drops it; the other
/// workers meanwhile serve everything else, so one document's open
/// transaction blocks neither reads nor other documents (only, through its
/// lock in PostgreSQL, other writes to the same document).
struct Workers {
    shared: Arc<WorkShared>,
}

struct WorkShared {
    state: std::sync::Mutex<WorkState>,
    ready: std::sync::Condvar,
    /// Taken (and dropped on a plain thread) when the storage is dropped: a
    /// connection must never be closed on a tokio worker thread either.
    pool: std::sync::Mutex<Option<Pool>>,
    max: usize,
    /// Jobs sent to the workers so far (each is one or more statements).
    sent: std::sync::atomic::AtomicU64,
}

struct WorkState {
    queue: std::collections::VecDeque<Job>,
    /// Workers waiting for a job.
    idle: usize,
    /// Workers running (idle or not).
    threads: usize,
    /// Set when the storage is dropped: workers finish the queue and end.
    closed: bool,
    handles: Vec<JoinHandle<()>>,
}

impl Workers {
    fn start(pool: Pool, max: usize) -> Result<Self, StoreError> {
        let shared = Arc::new(WorkShared {
            state: std::sync::Mutex::new(WorkState {
                queue: std::collections::VecDeque::new(),
                idle: 0,
                threads: 0,
                closed: false,
                handles: Vec::new(),
            }),
            ready: std::sync::Condvar::new(),
            pool: std::sync::Mutex::new(Some(pool)),
            max: max.max(1),
            sent: std::sync::atomic::AtomicU64::new(0),
        });
        let workers = Self { shared };
        let mut state = workers.shared.lock();
        workers.spawn(&mut state)?;
        drop(state);
        Ok(workers)
    }

    /// Starts one more worker thread (`state` locked by the caller).
    fn spawn(&self, state: &mut WorkState) -> Result<(), StoreError> {
        let shared = self.shared.clone();
        let number = state.threads;
        let handle = std::thread::Builder::new()
            .name(format!("samverkan-postgres-{number}"))
            .spawn(move || shared.work())
            .map_err(|e| backend(format!("cannot start a storage thread: {e}")))?;
        state.threads += 1;
        state.handles.retain(|h| !h.is_finished());
        state.handles.push(handle);
        Ok(())
    }

    fn send(&self, job: Job) -> Result<(), StoreError> {
        let mut state = self.shared.lock();
        if state.closed {
            return Err(worker_gone());
        }
        state.queue.push_back(job);
        self.shared.sent.fetch_add(1, Ordering::Relaxed);
        if state.queue.len() > state.idle && state.threads < self.shared.max {
            if let Err(e) = self.spawn(&mut state) {
                // The running workers still take the job, only later.
                warn!(error = %e, "cannot add a PostgreSQL storage worker");
                if state.threads == 0 {
                    state.queue.pop_back();
                    return Err(e);
                }
            }
        }
        drop(state);
        self.shared.ready.notify_one();
        Ok(())
    }
}

impl WorkShared {
    fn lock(&self) -> std::sync::MutexGuard<'_, WorkState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A worker thread's loop: take a job, run it with this thread's connection.
    fn work(&self) {
        let Some(pool) = self.pool.lock().unwrap_or_else(|e| e.into_inner()).clone() else {
            self.lock().threads -= 1;
            return;
        };
        let mut held: Option<r2d2_postgres::r2d2::PooledConnection<PostgresConnectionManager<NoTls>>> = None;
        loop {
            let job = {
                let mut state = self.lock();
                loop {
                    if let Some(job) = state.queue.pop_front() {
                        break job;
                    }
                    if state.closed {
                        state.threads -= 1;
                        return;
                    }
                    state.idle += 1;
                    let (next, waited) = self.ready.wait_timeout(state, WORKER_IDLE).unwrap_or_else(|e| e.into_inner());
                    state = next;
                    state.idle -= 1;
                    // Idle for long while another waits too: one is enough.
                    if waited.timed_out() && state.queue.is_empty() && state.idle > 0 && !state.closed {
                        state.threads -= 1;
                        return;
                    }
                }
            };
            if held.as_ref().is_some_and(|c| c.is_closed()) {
                held = None;
            }
            if held.is_none() {
                match pool.get() {
                    Ok(mut conn) => match conn.batch_execute("SET synchronous_commit = on") {
                        Ok(()) => held = Some(conn),
                        Err(e) => {
                            job(Err(pg(e)));
                            continue;
                        }
                    },
                    Err(e) => {
                        job(Err(backend(format!("no database connection: {e}"))));
                        continue;
                    }
                }
            }
            match held.as_mut() {
                Some(conn) => job(Ok(conn)),
                None => job(Err(backend("no database connection"))),
            }
        }
    }
}

impl Workers {
    /// Runs `f` with the connection on the worker thread and waits for its result.
    fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Client) -> Result<R, StoreError> + Send + 'static,
    ) -> Result<R, StoreError> {
        let (answer, result) = mpsc::sync_channel(1);
        self.send(Box::new(move |client| {
            let _ = answer.send(client.and_then(f));
        }))?;
        result.recv().map_err(|_| worker_gone())?
    }

    /// Runs `f` in one transaction on the worker thread (committed if `f` succeeds).
    fn call_in_transaction<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Transaction<'_>) -> Result<R, StoreError> + Send + 'static,
    ) -> Result<R, StoreError> {
        self.call(move |client| {
            let mut tx = client.transaction().map_err(pg)?;
            let value = f(&mut tx)?;
            tx.commit().map_err(pg)?;
            Ok(value)
        })
    }

    /// Opens a transaction on the worker thread, runs `read` in it and hands its
    /// result back; the transaction stays open, holding its locks, until the
    /// caller commits it with what to write ([`Open::commit`]) or drops it
    /// (rolled back). The caller decides on its own thread meanwhile.
    fn open<T, W, U>(
        &self,
        read: impl FnOnce(&mut Transaction<'_>) -> Result<T, StoreError> + Send + 'static,
        write: impl FnOnce(&mut Transaction<'_>, W) -> Result<U, StoreError> + Send + 'static,
    ) -> Result<Open<T, W, U>, StoreError>
    where
        T: Send + 'static,
        W: Send + 'static,
        U: Send + 'static,
    {
        let (first_tx, first_rx) = mpsc::sync_channel::<Result<T, StoreError>>(1);
        let (decide_tx, decide_rx) = mpsc::sync_channel::<W>(1);
        let (done_tx, done_rx) = mpsc::sync_channel::<Result<U, StoreError>>(1);
        self.send(Box::new(move |client| {
            let mut tx = match client.and_then(|c| c.transaction().map_err(pg)) {
                Ok(tx) => tx,
                Err(e) => {
                    let _ = first_tx.send(Err(e));
                    return;
                }
            };
            match read(&mut tx) {
                Ok(first) => {
                    if first_tx.send(Ok(first)).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let _ = first_tx.send(Err(e));
                    return;
                }
            }
            // A caller that decided against writing (or went away) drops its
            // sender: the transaction is dropped, which rolls it back.
            let Ok(what) = decide_rx.recv() else { return };
            let result = write(&mut tx, what).and_then(|value| tx.commit().map_err(pg).map(|()| value));
            let _ = done_tx.send(result);
        }))?;
        let first = first_rx.recv().map_err(|_| worker_gone())??;
        Ok(Open { first: Some(first), decide: decide_tx, done: done_rx })
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        let handles = {
            let mut state = self.shared.lock();
            state.closed = true;
            std::mem::take(&mut state.handles)
        };
        self.shared.ready.notify_all();
        for handle in handles {
            // A job's own thread never joins itself.
            if handle.thread().id() != std::thread::current().id() {
                let _ = handle.join();
            }
        }
        // The pool's idle connections are closed here: on a plain thread, as
        // the caller may be a tokio worker (a relay shutting down).
        let pool = self.shared.pool.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(pool) = pool {
            if let Ok(closing) =
                std::thread::Builder::new().name("samverkan-postgres-close".into()).spawn(|| drop(pool))
            {
                let _ = closing.join();
            }
        }
    }
}

/// A transaction open on the worker thread (see [`Workers::open`]).
struct Open<T, W, U> {
    first: Option<T>,
    decide: mpsc::SyncSender<W>,
    done: mpsc::Receiver<Result<U, StoreError>>,
}

impl<T, W, U> Open<T, W, U> {
    /// What the transaction's read found.
    fn take(&mut self) -> Option<T> {
        self.first.take()
    }

    /// Writes `what` and commits; returns once the commit is durable.
    fn commit(self, what: W) -> Result<U, StoreError> {
        self.decide.send(what).map_err(|_| worker_gone())?;
        self.done.recv().map_err(|_| worker_gone())?
    }
}

/// Where a document stands in the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Version {
    /// Its snapshot's generation (bumped by each compaction).
    generation: i64,
    /// The last increment row on top of that snapshot (0: none).
    last_seq: i64,
    /// Increment rows beside the snapshot.
    rows: i64,
    /// Its size in change bytes (see [`ContentLimits`]).
    size: i64,
}

/// A loaded document kept between calls in its slot, with where it stands in
/// the database and when that was read (see [`cache`]).
struct Cached {
    doc: Document,
    version: Version,
    stamp: Option<Stamp>,
}

/// A document's rows as read (see [`read_doc`]).
struct StoredDoc {
    /// Where it stands; `last_seq` is the last row read (or the cached copy's).
    version: Version,
    /// The snapshot and its checksum, unless the cached copy's generation is current.
    snapshot: Option<(Vec<u8>, Vec<u8>)>,
    /// Increments after the cached copy's (or all), with their checksums.
    changes: Vec<(i64, Vec<u8>, Vec<u8>)>,
}

/// What `with_doc` writes for a document.
struct DocWrite {
    id: String,
    instance: String,
    created: bool,
    /// A full save: the document is new or its increments are folded now.
    snapshot: Option<Vec<u8>>,
    /// The snapshot's authors' tips (`samverkan_store::snapshot_tips`), with it.
    snapshot_tips: Option<Vec<u8>>,
    /// The new changes, as an incremental save.
    increment: Option<Vec<u8>>,
    kind: String,
    title: String,
    heads: Vec<String>,
    parties: Vec<String>,
    size: i64,
    signatures: Vec<SignedChange>,
    receipts: Vec<ApprovalReceipt>,
}

/// The relay's storage in a PostgreSQL database (see the module docs).
pub struct PostgresStorage {
    workers: Workers,
    url: String,
    instance: String,
    limits: ContentLimits,
    /// Per-document locks of this instance, holding loaded documents.
    slots: Slots<Cached>,
    /// The index, receipts and signatures served from memory, and when they may be trusted.
    caches: Arc<Caches>,
    /// Tells the listener thread (if one runs) to stop.
    stop: Arc<AtomicBool>,
    listener: std::sync::Mutex<Option<JoinHandle<()>>>,
    /// Documents loaded whole from the database (not a cached copy brought up to date).
    loads: AtomicU64,
}

impl std::fmt::Debug for PostgresStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStorage").field("instance", &self.instance).finish_non_exhaustive()
    }
}

impl PostgresStorage {
    /// Connects to the database at `url` (`postgres://user@host:port/db`),
    /// migrating its schema to this version, keeping at most `cache` documents
    /// loaded. Each storage opened is one relay instance, with an id of its own.
    pub fn open(url: &str, cache: usize) -> Result<Self, StoreError> {
        Self::open_with_pool(url, cache, DEFAULT_POOL_SIZE)
    }

    /// [`Self::open`] with a pool of `pool_size` connections (and as many
    /// worker threads at most).
    pub fn open_with_pool(url: &str, cache: usize, pool_size: u32) -> Result<Self, StoreError> {
        let config: postgres::Config =
            url.parse().map_err(|e| backend(format!("{}: not a PostgreSQL address: {e}", redact(url))))?;
        let manager = PostgresConnectionManager::new(config, NoTls);
        // Built on a plain thread: the pool connects at once, and the client must not run on a tokio worker.
        let pool = std::thread::scope(|s| {
            s.spawn(|| {
                r2d2_postgres::r2d2::Pool::builder()
                    .max_size(pool_size.max(1))
                    .min_idle(Some(1))
                    .connection_timeout(Duration::from_secs(10))
                    .build(manager)
            })
            .join()
        })
        .map_err(|_| backend("connecting panicked"))?
        .map_err(|e| backend(format!("cannot connect to {}: {e}", redact(url))))?;
        let workers = Workers::start(pool, pool_size.max(1) as usize)?;
        workers.call_in_transaction(migrate)?;
        let instance = hex::encode(rand::random::<[u8; 8]>());
        let id = instance.clone();
        workers.call(move |client| {
            client
                .execute("INSERT INTO relay_instances (instance) VALUES ($1) ON CONFLICT DO NOTHING", &[&id])
                .map_err(pg)
        })?;
        Ok(Self {
            workers,
            url: url.to_string(),
            instance,
            limits: ContentLimits::default(),
            slots: Slots::new(cache),
            caches: Arc::new(Caches::default()),
            stop: Arc::new(AtomicBool::new(false)),
            listener: std::sync::Mutex::new(None),
            loads: AtomicU64::new(0),
        })
    }

    /// This instance's id (in notifications and the connections table).
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// The schema version of the database (after migrating, [`SCHEMA_VERSION`]).
    pub fn schema_version(&self) -> Result<i32, StoreError> {
        self.workers
            .call(|client| client.query_one("SELECT version FROM samverkan_schema", &[]).map(|r| r.get(0)).map_err(pg))
    }

    /// How many times this instance has gone to the database so far (each
    /// time one or more statements): for tests and the benchmark.
    pub fn database_calls(&self) -> u64 {
        self.workers.shared.sent.load(Ordering::Relaxed)
    }

    /// Number of increment rows a document has (for tests).
    pub fn increment_rows(&self, doc: &DocId) -> Result<i64, StoreError> {
        let id = doc.as_str().to_string();
        self.workers.call(move |client| {
            client.query_one("SELECT count(*) FROM changes WHERE doc_id = $1", &[&id]).map(|r| r.get(0)).map_err(pg)
        })
    }
}

impl Drop for PostgresStorage {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let instance = self.instance.clone();
        // Best effort: an instance that dies without this is timed out by its heartbeat.
        let _ = self.workers.call(move |client| {
            client.execute("DELETE FROM relay_connections WHERE instance = $1", &[&instance]).map_err(pg)?;
            client.execute("DELETE FROM relay_instances WHERE instance = $1", &[&instance]).map_err(pg)
        });
        if let Some(listener) = self.listener.get_mut().unwrap_or_else(|e| e.into_inner()).take() {
            // The listener's own callback may hold the last reference to the relay: never join itself.
            if listener.thread().id() != std::thread::current().id() {
                let _ = listener.join();
            }
        }
    }
}

/// The address without its password, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let user_info = &url[scheme + 3..at];
            match user_info.find(':') {
                Some(colon) => format!("{}{}:***{}", &url[..scheme + 3], &user_info[..colon], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// Brings the schema to [`SCHEMA_VERSION`] (under an advisory lock: instances
/// starting together migrate once); refuses a newer schema.
fn migrate(tx: &mut Transaction<'_>) -> Result<(), StoreError> {
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).map_err(pg)?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS samverkan_schema (
             one     BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (one),
             version INTEGER NOT NULL
         );
         INSERT INTO samverkan_schema (one, version) VALUES (TRUE, 0) ON CONFLICT DO NOTHING;",
    )
    .map_err(pg)?;
    let version: i32 = tx.query_one("SELECT version FROM samverkan_schema", &[]).map_err(pg)?.get(0);
    if version > SCHEMA_VERSION {
        return Err(backend(format!(
            "the database has relay schema version {version}, newer than this relay ({SCHEMA_VERSION}); upgrade samverkan-relay"
        )));
    }
    for (from, sql) in MIGRATIONS.iter().enumerate().skip(version.max(0) as usize) {
        info!(from, to = from + 1, "migrating the relay's PostgreSQL schema");
        tx.batch_execute(sql).map_err(pg)?;
    }
    tx.execute("UPDATE samverkan_schema SET version = $1", &[&SCHEMA_VERSION]).map_err(pg)?;
    Ok(())
}

fn entry_from(id: String, heads: Vec<String>, parties: Vec<String>) -> Result<DocEntry, StoreError> {
    let id: DocId = id.parse().map_err(|e| backend(format!("bad document id {id:?}: {e}")))?;
    let corrupt = |reason: String| StoreError::CorruptDocument { id: id.clone(), reason };
    let heads = heads
        .iter()
        .map(|h| h.parse::<ChangeHash>().map_err(|e| corrupt(format!("bad head {h:?}: {e}"))))
        .collect::<Result<_, _>>()?;
    let parties = parties
        .iter()
        .map(|p| OrgId::new(p).ok_or_else(|| corrupt(format!("bad party {p:?}"))))
        .collect::<Result<_, _>>()?;
    Ok(DocEntry { id, heads, parties })
}

/// Reads a document's rows in one statement (so from one snapshot of the
/// database): where it stands, and what a copy at `cached` (generation, last
/// increment row) lacks: the increments after it if its generation is
/// current, else the snapshot and every increment. `None` if not stored.
/// Without the document's lock it is what was committed when the statement
/// began; under it, what is stored.
fn read_doc(
    client: &mut impl GenericClient,
    id: &str,
    cached: Option<(i64, i64)>,
) -> Result<Option<StoredDoc>, StoreError> {
    let (generation, after) = cached.unwrap_or((-1, 0));
    let row = client
        .query_typed(
            "SELECT d.generation, d.change_bytes,
                    CASE WHEN d.generation = $2 THEN NULL ELSE d.snapshot END,
                    CASE WHEN d.generation = $2 THEN NULL ELSE d.snapshot_sha256 END,
                    (SELECT count(*) FROM changes c WHERE c.doc_id = d.doc_id),
                    x.seqs, x.data, x.sums
             FROM documents d
             LEFT JOIN LATERAL (
                 SELECT array_agg(c.seq ORDER BY c.seq) AS seqs, array_agg(c.data ORDER BY c.seq) AS data,
                        array_agg(c.sha256 ORDER BY c.seq) AS sums
                 FROM changes c
                 WHERE c.doc_id = d.doc_id AND c.seq > CASE WHEN d.generation = $2 THEN $3 ELSE 0 END
             ) x ON TRUE
             WHERE d.doc_id = $1",
            &[(&id, Type::TEXT), (&generation, Type::INT8), (&after, Type::INT8)],
        )
        .map_err(pg)?;
    let Some(row) = row.into_iter().next() else { return Ok(None) };
    let stored_generation: i64 = row.try_get(0).map_err(pg)?;
    let snapshot: Option<Vec<u8>> = row.try_get(2).map_err(pg)?;
    let sum: Option<Vec<u8>> = row.try_get(3).map_err(pg)?;
    let seqs: Vec<i64> = row.try_get::<_, Option<Vec<i64>>>(5).map_err(pg)?.unwrap_or_default();
    let data: Vec<Vec<u8>> = row.try_get::<_, Option<Vec<Vec<u8>>>>(6).map_err(pg)?.unwrap_or_default();
    let sums: Vec<Vec<u8>> = row.try_get::<_, Option<Vec<Vec<u8>>>>(7).map_err(pg)?.unwrap_or_default();
    let snapshot = match (snapshot, sum) {
        (Some(bytes), Some(sum)) => Some((bytes, sum)),
        _ => None,
    };
    let from = if snapshot.is_some() { 0 } else { after };
    let version = Version {
        generation: stored_generation,
        last_seq: seqs.last().copied().unwrap_or(from),
        rows: row.try_get(4).map_err(pg)?,
        size: row.try_get(1).map_err(pg)?,
    };
    let changes = seqs.into_iter().zip(data).zip(sums).map(|((seq, data), sum)| (seq, data, sum)).collect();
    Ok(Some(StoredDoc { version, snapshot, changes }))
}

/// The document as stored: `cached` (or, if the stored rows carry a snapshot,
/// that snapshot) with the stored increments applied, each checked against
/// its checksum.
fn assemble(id: &DocId, stored: StoredDoc, cached: Option<Document>) -> Result<(Document, Version), StoreError> {
    let corrupt = |reason: String| StoreError::CorruptDocument { id: id.clone(), reason };
    let mut document = match (stored.snapshot, cached) {
        (Some((bytes, sum)), _) => {
            if sum != sha256(&bytes) {
                return Err(corrupt("the snapshot does not match its checksum".into()));
            }
            let automerge = AutoCommit::load(&bytes).map_err(|e| corrupt(format!("snapshot: {e}")))?;
            Document::from_automerge(id.clone(), automerge).map_err(|e| corrupt(e.to_string()))?
        }
        (None, Some(cached)) => cached,
        (None, None) => return Err(corrupt("neither a snapshot nor a cached copy".into())),
    };
    for (seq, data, sum) in stored.changes {
        if sum != sha256(&data) {
            return Err(corrupt(format!("change row {seq} does not match its checksum")));
        }
        document.automerge_mut().load_incremental(&data).map_err(|e| corrupt(format!("change row {seq}: {e}")))?;
    }
    Ok((document, stored.version))
}

/// Writes what `with_doc` decided (under the document's lock); returns where the document stands then.
fn write_doc(tx: &mut Transaction<'_>, w: DocWrite, stored: Version) -> Result<Version, StoreError> {
    let version = if w.created {
        let data = w.snapshot.unwrap_or_default();
        tx.query_typed(
            "INSERT INTO documents (doc_id, kind, title, heads, parties, snapshot, snapshot_sha256, change_bytes,
                                    snapshot_tips, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, now(), now())",
            &[
                (&w.id, Type::TEXT),
                (&w.kind, Type::TEXT),
                (&w.title, Type::TEXT),
                (&w.heads, Type::TEXT_ARRAY),
                (&w.parties, Type::TEXT_ARRAY),
                (&data, Type::BYTEA),
                (&sha256(&data), Type::BYTEA),
                (&w.size, Type::INT8),
                (&w.snapshot_tips, Type::BYTEA),
            ],
        )
        .map_err(pg)?;
        Version { generation: 0, last_seq: 0, rows: 0, size: w.size }
    } else {
        // The snapshot, if folding now, goes with the row's other columns.
        let snapshot_sum = w.snapshot.as_deref().map(sha256);
        let generation: i64 = tx
            .query_typed(
                "UPDATE documents SET kind = $2, title = $3, heads = $4, parties = $5, change_bytes = $6, updated_at = now(),
                     snapshot = COALESCE($7, snapshot), snapshot_sha256 = COALESCE($8, snapshot_sha256),
                     snapshot_tips = CASE WHEN $7 IS NULL THEN snapshot_tips ELSE $9 END,
                     generation = generation + CASE WHEN $7 IS NULL THEN 0 ELSE 1 END
                 WHERE doc_id = $1 RETURNING generation",
                &[
                    (&w.id, Type::TEXT),
                    (&w.kind, Type::TEXT),
                    (&w.title, Type::TEXT),
                    (&w.heads, Type::TEXT_ARRAY),
                    (&w.parties, Type::TEXT_ARRAY),
                    (&w.size, Type::INT8),
                    (&w.snapshot, Type::BYTEA),
                    (&snapshot_sum, Type::BYTEA),
                    (&w.snapshot_tips, Type::BYTEA),
                ],
            )
            .map_err(pg)?
            .first()
            .ok_or_else(|| backend(format!("document {} vanished under its lock", w.id)))?
            .try_get(0)
            .map_err(pg)?;
        match (&w.snapshot, w.increment) {
            (Some(data), _) => {
                tx.query_typed("DELETE FROM changes WHERE doc_id = $1", &[(&w.id, Type::TEXT)]).map_err(pg)?;
                debug!(doc = %w.id, bytes = data.len(), generation, "compacted document");
                Version { generation, last_seq: 0, rows: 0, size: w.size }
            }
            (None, Some(data)) => {
                let seq: i64 = tx
                    .query_typed(
                        "INSERT INTO changes (doc_id, data, sha256) VALUES ($1, $2, $3) RETURNING seq",
                        &[(&w.id, Type::TEXT), (&data, Type::BYTEA), (&sha256(&data), Type::BYTEA)],
                    )
                    .map_err(pg)?
                    .first()
                    .ok_or_else(|| backend("an inserted change row has no number"))?
                    .try_get(0)
                    .map_err(pg)?;
                Version { generation, last_seq: seq, rows: stored.rows + 1, size: w.size }
            }
            (None, None) => return Err(backend("nothing to write")),
        }
    };
    insert_signatures(tx, &w.signatures)?;
    let receipts_added = insert_receipts(tx, &w.receipts)? > 0;
    notify_docs(tx, &w.instance, std::iter::once(w.id.as_str()), receipts_added)?;
    Ok(version)
}

/// Tells the other instances (when the transaction commits: `NOTIFY` is
/// delivered only then) that these documents changed, and whether the
/// transaction may have added approval receipts to them. The payload is
/// `<instance> <doc> <receipts>`, the last word [`RECEIPTS_ADDED`] or
/// [`NO_RECEIPTS`]; a listener takes anything else, or its absence (an
/// older instance), as receipts added.
fn notify_docs<'a>(
    tx: &mut Transaction<'_>,
    instance: &str,
    docs: impl IntoIterator<Item = &'a str>,
    receipts_added: bool,
) -> Result<(), StoreError> {
    let receipts = if receipts_added { RECEIPTS_ADDED } else { NO_RECEIPTS };
    for doc in docs {
        let payload = format!("{instance} {doc} {receipts}");
        tx.query_typed("SELECT pg_notify($1, $2)", &[(&CHANNEL_DOCS, Type::TEXT), (&payload, Type::TEXT)])
            .map_err(pg)?;
    }
    Ok(())
}

/// Stores signatures (the first of each change kept), in one statement.
fn insert_signatures(tx: &mut Transaction<'_>, signatures: &[SignedChange]) -> Result<(), StoreError> {
    if signatures.is_empty() {
        return Ok(());
    }
    let (hashes, signatures): (Vec<Vec<u8>>, Vec<Vec<u8>>) =
        signatures.iter().map(|(hash, signature)| (hash.0.to_vec(), signature.to_vec())).unzip();
    tx.query_typed(
        "INSERT INTO change_signatures (hash, signature) SELECT * FROM unnest($1::bytea[], $2::bytea[])
         ON CONFLICT DO NOTHING",
        &[(&hashes, Type::BYTEA_ARRAY), (&signatures, Type::BYTEA_ARRAY)],
    )
    .map_err(pg)?;
    Ok(())
}

/// Inserts receipts, keeping the first one held of each record, in one
/// statement; returns how many were new.
fn insert_receipts(tx: &mut Transaction<'_>, receipts: &[ApprovalReceipt]) -> Result<usize, StoreError> {
    if receipts.is_empty() {
        return Ok(0);
    }
    let docs: Vec<&str> = receipts.iter().map(|r| r.doc.as_str()).collect();
    let records: Vec<&str> = receipts.iter().map(|r| r.record_signature.as_str()).collect();
    let at: Vec<String> =
        receipts.iter().map(|r| r.received_at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)).collect();
    let signatures: Vec<&str> = receipts.iter().map(|r| r.relay_signature.as_str()).collect();
    let added = tx
        .query_typed(
            "WITH added AS (
                 INSERT INTO approval_receipts (doc_id, record, received_at, relay_signature)
                 SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[])
                 ON CONFLICT DO NOTHING RETURNING 1)
             SELECT count(*) FROM added",
            &[
                (&docs, Type::TEXT_ARRAY),
                (&records, Type::TEXT_ARRAY),
                (&at, Type::TEXT_ARRAY),
                (&signatures, Type::TEXT_ARRAY),
            ],
        )
        .map_err(pg)?
        .first()
        .map(|row| row.try_get::<_, i64>(0))
        .transpose()
        .map_err(pg)?
        .unwrap_or(0);
    Ok(added.max(0) as usize)
}

/// The signatures found of `hashes`, in the order asked (as the SQLite store answers).
fn in_order(hashes: &[ChangeHash], found: &std::collections::HashMap<ChangeHash, [u8; 64]>) -> Vec<SignedChange> {
    hashes.iter().filter_map(|hash| Some((*hash, *found.get(hash)?))).collect()
}

/// The rows of `documents` an index entry is made of.
type EntryRow = (String, Vec<String>, Vec<String>);

fn entry_rows(rows: Vec<postgres::Row>) -> Result<Vec<DocEntry>, StoreError> {
    rows.into_iter()
        .map(|r| {
            let (id, heads, parties): EntryRow =
                (r.try_get(0).map_err(pg)?, r.try_get(1).map_err(pg)?, r.try_get(2).map_err(pg)?);
            entry_from(id, heads, parties)
        })
        .collect()
}

impl PostgresStorage {
    /// [`RelayStorage::with_doc`] in the document's slot.
    fn with_doc_in<R, E: From<StoreError>>(
        &self,
        doc: &DocId,
        slot: &Slot<Cached>,
        create: bool,
        f: impl FnOnce(&mut Document) -> Result<(R, Vec<SignedChange>, Vec<ApprovalReceipt>), E>,
    ) -> Result<Option<R>, E> {
        let mut held = slot.lock();
        // Taken before anything is read: what is read next is current at least as of it.
        let stamp = self.caches.fresh.stamp();
        let current = match self.slots.take(&mut held) {
            Some(cached) if self.caches.fresh.is_current(doc, cached.stamp) => Some(cached),
            cached => self.refresh(doc, cached, stamp, create)?,
        };
        let (mut document, version, read_at) = match current {
            Some(c) => (c.doc, Some(c.version), c.stamp),
            None if create => {
                (Document::from_automerge(doc.clone(), AutoCommit::new()).map_err(StoreError::from)?, None, stamp)
            }
            None => return Ok(None),
        };
        let before = document.heads();
        // On error the copy (which `f` may have half changed) is dropped: read again next time.
        let (value, signatures, receipts) = f(&mut document)?;
        if document.heads() == before || document.is_empty() {
            match version {
                Some(version) => self.slots.put(&mut held, Cached { doc: document, version, stamp: read_at }),
                None => return Ok(Some(value)),
            }
        } else {
            let written = self.write(doc, document, version, &before, signatures, receipts)?;
            self.slots.put(&mut held, written);
        }
        drop(held);
        self.slots.unload_beyond_capacity();
        Ok(Some(value))
    }

    /// Index entries from the database: of `docs`, or of every document.
    fn read_entries(&self, docs: Option<Vec<DocId>>) -> Result<Vec<DocEntry>, StoreError> {
        let rows = self.workers.call(move |client| {
            match docs {
                None => client.query_typed("SELECT doc_id, heads, parties FROM documents ORDER BY doc_id", &[]),
                Some(docs) => {
                    let ids: Vec<String> = docs.iter().map(|d| d.as_str().to_string()).collect();
                    client.query_typed(
                        "SELECT doc_id, heads, parties FROM documents WHERE doc_id = ANY($1) ORDER BY doc_id",
                        &[(&ids, Type::TEXT_ARRAY)],
                    )
                }
            }
            .map_err(pg)
        })?;
        entry_rows(rows)
    }

    /// A document as stored now, from `cached` (its copy, if any) and the rows
    /// it lacks, read in one statement without the document's lock (what was
    /// committed when it began, which is at least what `stamp` saw). `None`
    /// if not stored: known from the index in memory unless about to be
    /// created (then the database is asked: another instance may have created
    /// it a moment ago, not yet notified).
    fn refresh(
        &self,
        doc: &DocId,
        cached: Option<Cached>,
        stamp: Option<Stamp>,
        create: bool,
    ) -> Result<Option<Cached>, StoreError> {
        if cached.is_none() && !create && self.caches.entry(doc) == Known::Missing {
            return Ok(None);
        }
        let at = cached.as_ref().map(|c| (c.version.generation, c.version.last_seq));
        let id = doc.as_str().to_string();
        let Some(stored) = self.workers.call(move |client| read_doc(client, &id, at))? else { return Ok(None) };
        if cached.is_none() || stored.snapshot.is_some() {
            self.loads.fetch_add(1, Ordering::Relaxed);
        }
        let (doc, version) = assemble(doc, stored, cached.map(|c| c.doc))?;
        Ok(Some(Cached { doc, version, stamp }))
    }

    /// Stores what `f` added to `document` (at `version` when read; `None`:
    /// new here): under the document's lock in PostgreSQL, checks what is
    /// stored now and, if another instance wrote meanwhile, applies its rows
    /// first (Automerge merges; nothing of either is lost), then writes the
    /// new changes in one transaction, durable when this returns.
    fn write(
        &self,
        doc: &DocId,
        mut document: Document,
        version: Option<Version>,
        before: &[ChangeHash],
        signatures: Vec<SignedChange>,
        receipts: Vec<ApprovalReceipt>,
    ) -> Result<Cached, StoreError> {
        // One pass over the new changes serves the stored fields, the limits and
        // the increment (what `save_after` builds).
        let new = document.automerge_mut().get_changes(before);
        // Whatever came in must still be a document we can read (its header and
        // stored fields read again only where the new changes touched them), within the limits.
        let (ours_heads, fields) = (document.heads(), document.stored_fields_after(before, &new)?);
        let ours = self.limits.check_changes(doc, &new, 0)?;
        let increment = samverkan_store::increment_bytes(&new);
        // Taken before the lock: a change another instance notifies from now on is not hidden by this one.
        let stamp = self.caches.fresh.stamp();
        let adds_receipts = !receipts.is_empty();
        let id = doc.as_str().to_string();
        let (read_id, key) = (id.clone(), lock_key("doc", &id));
        let at = version.map(|v| (v.generation, v.last_seq));
        let mut open = self.workers.open(
            move |tx| {
                tx.query_typed("SELECT pg_advisory_xact_lock($1)", &[(&key, Type::INT8)]).map_err(pg)?;
                read_doc(tx, &read_id, at)
            },
            |tx, (write, stored): (DocWrite, Version)| write_doc(tx, write, stored),
        )?;
        let (mut document, stored, created) = match open.take().ok_or_else(worker_gone)? {
            None if version.is_some() => return Err(backend(format!("document {doc} is no longer stored"))),
            None => (document, Version { generation: 0, last_seq: 0, rows: 0, size: 0 }, true),
            Some(rows) if rows.snapshot.is_some() => {
                // Compacted (or created) elsewhere since this copy was read: the stored one, plus ours.
                self.loads.fetch_add(1, Ordering::Relaxed);
                let (mut current, stored) = assemble(doc, rows, None)?;
                current.automerge_mut().load_incremental(&increment).map_err(|e| StoreError::CorruptDocument {
                    id: doc.clone(),
                    reason: format!("this instance's own new changes: {e}"),
                })?;
                (current, stored, false)
            }
            Some(rows) => {
                let (current, stored) = assemble(doc, rows, Some(document))?;
                (current, stored, false)
            }
        };
        let size = stored.size.max(0) as u64 + ours;
        if size > self.limits.max_document_bytes {
            let max = self.limits.max_document_bytes;
            return Err(LimitError::DocumentTooLarge { doc: doc.clone(), size, max }.into());
        }
        let compact = !created && stored.rows + 1 >= COMPACT_AFTER_ROWS;
        let heads = document.heads();
        // Another instance's rows applied on top: the fields of what is stored now.
        let StoredFields { kind, title, parties } =
            if heads == ours_heads { fields } else { document.stored_fields()? };
        let write = DocWrite {
            id,
            instance: self.instance.clone(),
            created,
            snapshot: (created || compact).then(|| document.automerge_mut().save()),
            snapshot_tips: (created || compact).then(|| samverkan_store::snapshot_tips(document.automerge_mut())),
            increment: (!created && !compact).then_some(increment),
            kind: kind.as_str().to_string(),
            title,
            heads: heads.iter().map(ToString::to_string).collect(),
            parties: parties.iter().map(|p| p.as_str().to_string()).collect(),
            size: size as i64,
            signatures: signatures.clone(),
            receipts,
        };
        let version = open.commit((write, stored))?;
        let stamp = if adds_receipts {
            self.caches.fresh.changed_here(doc, stamp)
        } else {
            self.caches.changed_here_without_receipts(doc, stamp)
        };
        self.caches.put_entry(DocEntry { id: doc.clone(), heads, parties: parties.into() }, stamp);
        self.caches.put_signatures(signatures);
        Ok(Cached { doc: document, version, stamp })
    }
}

impl RelayStorage for PostgresStorage {
    /// From memory while the listener keeps it current; the documents changed
    /// since they were read are read again (all of them without a listener).
    fn index(&self) -> Result<Vec<DocEntry>, StoreError> {
        let stale = match self.caches.index() {
            Ok(entries) => return Ok(entries),
            Err(stale) => stale,
        };
        let stamp = self.caches.fresh.stamp();
        if let Some(docs) = stale {
            for entry in self.read_entries(Some(docs))? {
                self.caches.put_entry(entry, stamp);
            }
            if let Ok(entries) = self.caches.index() {
                return Ok(entries);
            }
        }
        // Everything, read again (and kept if the listener listens).
        let stamp = self.caches.fresh.stamp();
        let entries = self.read_entries(None)?;
        self.caches.put_index(&entries, stamp);
        Ok(entries)
    }

    fn set_content_limits(&mut self, limits: ContentLimits) {
        self.limits = limits;
    }

    fn entry(&self, doc: &DocId) -> Result<Option<DocEntry>, StoreError> {
        match self.caches.entry(doc) {
            Known::Stored(entry) => return Ok(Some(entry)),
            Known::Missing => return Ok(None),
            Known::Unknown => {}
        }
        let stamp = self.caches.fresh.stamp();
        let entry = self.read_entries(Some(vec![doc.clone()]))?.into_iter().next();
        if let Some(entry) = &entry {
            self.caches.put_entry(entry.clone(), stamp);
        }
        Ok(entry)
    }

    /// Runs `f` holding the document's slot (its lock in this instance) on
    /// the loaded copy, brought up to date from the database only if it may be
    /// stale (see [`cache`]); if `f` leaves the heads as they were, nothing is
    /// written and no database lock is taken.
    fn with_doc<R, E: From<StoreError>>(
        &self,
        doc: &DocId,
        create: bool,
        f: impl FnOnce(&mut Document) -> Result<(R, Vec<SignedChange>, Vec<ApprovalReceipt>), E>,
    ) -> Result<Option<R>, E> {
        let slot = self.slots.slot(doc);
        let result = self.with_doc_in(doc, &slot, create, f);
        // A slot left without a document (not stored, not kept, or dropped after an error) goes.
        self.slots.forget_if_idle(doc, slot);
        result
    }

    /// From memory where held (a stored signature never changes), the rest
    /// from the database.
    /// Read in one statement (one snapshot of the database) unless this
    /// instance holds the document loaded or in use.
    fn stored_whole(&self, doc: &DocId) -> Result<Option<StoredWhole>, StoreError> {
        if self.slots.is_held(doc) {
            return Ok(None);
        }
        let id = doc.as_str().to_string();
        let row = self.workers.call(move |client| {
            client
                .query_typed(
                    "SELECT d.heads, d.snapshot, d.snapshot_sha256, d.snapshot_tips, x.seqs, x.data, x.sums
                     FROM documents d
                     LEFT JOIN LATERAL (
                         SELECT array_agg(c.seq ORDER BY c.seq) AS seqs, array_agg(c.data ORDER BY c.seq) AS data,
                                array_agg(c.sha256 ORDER BY c.seq) AS sums
                         FROM changes c WHERE c.doc_id = d.doc_id
                     ) x ON TRUE
                     WHERE d.doc_id = $1",
                    &[(&id, Type::TEXT)],
                )
                .map_err(pg)
        })?;
        let Some(row) = row.into_iter().next() else { return Ok(None) };
        let Some(tips) = row.try_get::<_, Option<Vec<u8>>>(3).map_err(pg)? else { return Ok(None) };
        let corrupt = |reason: String| StoreError::CorruptDocument { id: doc.clone(), reason };
        let heads: Vec<String> = row.try_get(0).map_err(pg)?;
        let heads = heads
            .iter()
            .map(|h| h.parse::<ChangeHash>().map_err(|e| corrupt(format!("bad head {h:?}: {e}"))))
            .collect::<Result<Vec<_>, _>>()?;
        let (snapshot, sum): (Vec<u8>, Vec<u8>) = (row.try_get(1).map_err(pg)?, row.try_get(2).map_err(pg)?);
        if sum != sha256(&snapshot) {
            return Err(corrupt("the snapshot does not match its checksum".into()));
        }
        let seqs: Vec<i64> = row.try_get::<_, Option<Vec<i64>>>(4).map_err(pg)?.unwrap_or_default();
        let data: Vec<Vec<u8>> = row.try_get::<_, Option<Vec<Vec<u8>>>>(5).map_err(pg)?.unwrap_or_default();
        let sums: Vec<Vec<u8>> = row.try_get::<_, Option<Vec<Vec<u8>>>>(6).map_err(pg)?.unwrap_or_default();
        for ((seq, data), sum) in seqs.iter().zip(&data).zip(&sums) {
            if *sum != sha256(data) {
                return Err(corrupt(format!("change row {seq} does not match its checksum")));
            }
        }
        Ok(StoredWhole::from_stored(heads, snapshot, &tips, data))
    }

    fn signatures(&self, hashes: &[ChangeHash]) -> Result<Vec<SignedChange>, StoreError> {
        if hashes.is_empty() {
            return Ok(Vec::new());
        }
        let (mut found, missing) = self.caches.signatures(hashes);
        if !missing.is_empty() {
            let keys: Vec<Vec<u8>> = missing.iter().map(|h| h.0.to_vec()).collect();
            let rows = self.workers.call(move |client| {
                client
                    .query_typed(
                        "SELECT hash, signature FROM change_signatures WHERE hash = ANY($1)",
                        &[(&keys, Type::BYTEA_ARRAY)],
                    )
                    .map_err(pg)
            })?;
            let mut read = Vec::with_capacity(rows.len());
            for row in rows {
                let (hash, signature): (Vec<u8>, Vec<u8>) = (row.try_get(0).map_err(pg)?, row.try_get(1).map_err(pg)?);
                // A row that is not a hash and a signature is skipped, as if not held.
                if let (Ok(hash), Ok(signature)) =
                    (ChangeHash::try_from(hash.as_slice()), <[u8; 64]>::try_from(signature.as_slice()))
                {
                    read.push((hash, signature));
                }
            }
            found.extend(read.iter().copied());
            self.caches.put_signatures(read);
        }
        Ok(in_order(hashes, &found))
    }

    /// Whether `org` is a party, from the index in memory while it is current, else read.
    fn is_party(&self, doc: &DocId, org: &OrgId) -> Result<Option<bool>, StoreError> {
        match self.caches.is_party(doc, org) {
            Some(known) => Ok(known),
            None => Ok(self.entry(doc)?.map(|entry| entry.parties.contains(org))),
        }
    }

    // The reads from memory of the async runtime's thread: each answers only
    // what `with_doc`, `is_party`, `receipts` and `signatures` would answer
    // from memory without a statement (see [`cache`]), never waits for the
    // database or a document's slot, and says `None` for anything else.

    /// From the index in memory, only while that entry is current.
    fn cached_is_party(&self, doc: &DocId, org: &OrgId) -> Option<Option<bool>> {
        self.caches.is_party(doc, org)
    }

    /// On the loaded copy, only while it is current (the listener listens and
    /// no change of the document was notified or made here since it was read)
    /// and the slot is free now. A closure that changed the document gets
    /// `None` and the copy is dropped ([`samverkan_store::slots::read_only`]):
    /// nothing unwritten is kept or served.
    fn try_with_loaded<R>(&self, doc: &DocId, f: impl FnOnce(&mut Document) -> R) -> Option<R> {
        self.slots
            .try_with_loaded(doc, |cached| {
                if self.caches.fresh.is_current(doc, cached.stamp) {
                    read_only(&mut cached.doc, f)
                } else {
                    (None, true) // Kept: `with_doc` reads only the rows it lacks.
                }
            })
            .flatten()
    }

    /// From memory if every one is held (a stored signature never changes).
    fn cached_signatures(&self, hashes: &[ChangeHash]) -> Option<Vec<SignedChange>> {
        let (found, missing) = self.caches.signatures(hashes);
        missing.is_empty().then(|| in_order(hashes, &found))
    }

    /// From memory, only while the cached receipts are current.
    fn cached_receipts(&self, doc: &DocId) -> Option<Arc<Vec<ApprovalReceipt>>> {
        self.caches.receipts(doc)
    }

    /// From memory while current (see [`cache`]), else read and kept.
    fn receipts(&self, doc: &DocId) -> Result<Vec<ApprovalReceipt>, StoreError> {
        if let Some(found) = self.caches.receipts(doc) {
            return Ok(found.as_ref().clone());
        }
        let stamp = self.caches.fresh.stamp();
        let id = doc.as_str().to_string();
        let rows = self.workers.call(move |client| {
            client
                .query_typed(
                    "SELECT record, received_at, relay_signature FROM approval_receipts WHERE doc_id = $1 ORDER BY record",
                    &[(&id, Type::TEXT)],
                )
                .map_err(pg)
        })?;
        let mut receipts = Vec::with_capacity(rows.len());
        for row in rows {
            let (record_signature, at, relay_signature): (String, String, String) =
                (row.try_get(0).map_err(pg)?, row.try_get(1).map_err(pg)?, row.try_get(2).map_err(pg)?);
            let received_at = chrono::DateTime::parse_from_rfc3339(&at)
                .map_err(|e| StoreError::CorruptDocument {
                    id: doc.clone(),
                    reason: format!("receipt: bad timestamp {at:?}: {e}"),
                })?
                .with_timezone(&Utc);
            receipts.push(ApprovalReceipt { doc: doc.clone(), record_signature, received_at, relay_signature });
        }
        // Kept only for stored documents: ids a peer names leave nothing behind.
        if matches!(self.caches.entry(doc), Known::Stored(_)) {
            self.caches.put_receipts(doc, Arc::new(receipts.clone()), stamp);
        }
        Ok(receipts)
    }

    /// Stored in one transaction that notifies the other instances, so that
    /// their cached receipts of these documents are read again.
    fn add_receipts(&self, receipts: &[ApprovalReceipt]) -> Result<usize, StoreError> {
        if receipts.is_empty() {
            return Ok(0);
        }
        let mut docs: Vec<DocId> = receipts.iter().map(|r| r.doc.clone()).collect();
        docs.sort();
        docs.dedup();
        let (receipts, instance, ids) = (receipts.to_vec(), self.instance.clone(), docs.clone());
        let added = self.workers.call_in_transaction(move |tx| {
            let added = insert_receipts(tx, &receipts)?;
            notify_docs(tx, &instance, ids.iter().map(DocId::as_str), added > 0)?;
            Ok(added)
        })?;
        for doc in &docs {
            self.caches.fresh.changed_here(doc, None);
        }
        Ok(added)
    }

    fn sync_states(&self, peer: &str) -> Result<Vec<(DocId, Vec<u8>)>, StoreError> {
        let peer = peer.to_string();
        let rows: Vec<(String, Vec<u8>)> = self.workers.call(move |client| {
            client
                .query("SELECT doc_id, state FROM sync_states WHERE peer = $1", &[&peer])
                .map_err(pg)
                .map(|rows| rows.into_iter().map(|r| (r.get(0), r.get(1))).collect())
        })?;
        // A row naming no valid document is skipped: a fresh sync state is always safe.
        Ok(rows.into_iter().filter_map(|(doc, state)| Some((doc.parse().ok()?, state))).collect())
    }

    fn peers(&self) -> Result<Vec<String>, StoreError> {
        self.workers.call(|client| {
            client
                .query("SELECT DISTINCT peer FROM sync_states ORDER BY peer", &[])
                .map_err(pg)
                .map(|rows| rows.into_iter().map(|r| r.get(0)).collect())
        })
    }

    fn node_records(&self) -> Result<Vec<(String, String)>, StoreError> {
        self.workers.call(|client| {
            client
                .query("SELECT peer, record FROM node_records ORDER BY peer", &[])
                .map_err(pg)
                .map(|rows| rows.into_iter().map(|r| (r.get(0), r.get(1))).collect())
        })
    }

    fn save_node_record(&self, peer: &str, record: &str) -> Result<(), StoreError> {
        let (peer, record) = (peer.to_string(), record.to_string());
        self.workers.call(move |client| {
            client
                .execute(
                    "INSERT INTO node_records (peer, record) VALUES ($1, $2)
                     ON CONFLICT (peer) DO UPDATE SET record = excluded.record",
                    &[&peer, &record],
                )
                .map(|_| ())
                .map_err(pg)
        })
    }

    fn save_sync_states(&self, peer: &str, states: Vec<(DocId, Vec<u8>)>) -> Result<(), StoreError> {
        let peer = peer.to_string();
        self.workers.call_in_transaction(move |tx| {
            tx.execute("DELETE FROM sync_states WHERE peer = $1", &[&peer]).map_err(pg)?;
            let stmt = tx.prepare("INSERT INTO sync_states (peer, doc_id, state) VALUES ($1, $2, $3)").map_err(pg)?;
            for (doc, state) in &states {
                tx.execute(&stmt, &[&peer, &doc.as_str(), state]).map_err(pg)?;
            }
            Ok(())
        })
    }

    fn meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        let key = key.to_string();
        self.workers.call(move |client| {
            client.query_opt("SELECT value FROM meta WHERE key = $1", &[&key]).map(|r| r.map(|r| r.get(0))).map_err(pg)
        })
    }

    /// Read, change and write under the key's lock, in one transaction: two
    /// instances (or an instance and the operator's CLI) never lose an update,
    /// and a join code consumed on one instance is gone for every other.
    fn update_meta<E: From<StoreError>>(
        &self,
        key: &str,
        f: impl FnOnce(Option<String>) -> Result<Option<String>, E>,
    ) -> Result<Option<String>, E> {
        let read_key = key.to_string();
        let write_key = key.to_string();
        let instance = self.instance.clone();
        let mut open = self.workers.open(
            move |tx| {
                tx.execute("SELECT pg_advisory_xact_lock($1)", &[&lock_key("meta", &read_key)]).map_err(pg)?;
                tx.query_opt("SELECT value FROM meta WHERE key = $1 FOR UPDATE", &[&read_key])
                    .map(|r| r.map(|r| r.get::<_, String>(0)))
                    .map_err(pg)
            },
            move |tx, value: String| {
                tx.execute(
                    "INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    &[&write_key, &value],
                )
                .map_err(pg)?;
                tx.execute("UPDATE relay_counters SET value = value + 1 WHERE name = 'meta'", &[]).map_err(pg)?;
                tx.execute("SELECT pg_notify($1, $2)", &[&CHANNEL_META, &instance]).map_err(pg)?;
                Ok(())
            },
        )?;
        let current = open.take().ok_or_else(worker_gone)?;
        // `f`'s error, or no new value, drops the transaction: rolled back.
        let Some(new) = f(current)? else { return Ok(None) };
        open.commit(new.clone())?;
        Ok(Some(new))
    }

    fn evict(&self, doc: &DocId) {
        self.slots.unload(doc);
    }

    /// A counter every metadata commit of any instance (or the operator's CLI)
    /// increments, in the same transaction: one indexed read.
    fn external_changes(&self) -> Result<Option<i64>, StoreError> {
        self.workers.call(|client| {
            client
                .query_one("SELECT value FROM relay_counters WHERE name = 'meta'", &[])
                .map(|r| Some(r.get(0)))
                .map_err(pg)
        })
    }

    fn loaded(&self) -> usize {
        self.slots.loaded()
    }

    fn document_loads(&self) -> u64 {
        self.loads.load(Ordering::Relaxed)
    }

    fn watch_remote(&self, on_event: Arc<dyn Fn(RemoteEvent) + Send + Sync>) -> Result<bool, StoreError> {
        let mut running = self.listener.lock().unwrap_or_else(|e| e.into_inner());
        if running.is_some() {
            return Ok(true);
        }
        let config: postgres::Config =
            self.url.parse().map_err(|e| backend(format!("not a PostgreSQL address: {e}")))?;
        let (ready_tx, ready_rx) = mpsc::sync_channel(1);
        let listener = Listener {
            config,
            instance: self.instance.clone(),
            stop: self.stop.clone(),
            caches: self.caches.clone(),
            on_event,
        };
        let thread = std::thread::Builder::new()
            .name("samverkan-postgres-listen".into())
            .spawn(move || listener.run(ready_tx))
            .map_err(|e| backend(format!("cannot start the listener thread: {e}")))?;
        *running = Some(thread);
        // Listening before the relay serves: nothing committed after this is missed.
        ready_rx.recv_timeout(Duration::from_secs(15)).map_err(|_| backend("the listener did not connect"))??;
        drop(running);
        // The index in memory from now on (kept current by the listener).
        self.index()?;
        Ok(true)
    }

    fn connection_opened(&self, peer: &str, conn: u64, keep: usize) -> Result<Option<Vec<u64>>, StoreError> {
        let (peer, instance) = (peer.to_string(), self.instance.clone());
        let conn = conn as i64;
        let keep = keep.max(1);
        let timeout = INSTANCE_TIMEOUT.as_secs_f64();
        self.workers
            .call_in_transaction(move |tx| {
                tx.execute("SELECT pg_advisory_xact_lock($1)", &[&lock_key("peer", &peer)]).map_err(pg)?;
                // Connections of instances that stopped beating are gone with them.
                tx.execute(
                    "DELETE FROM relay_connections WHERE instance IN (
                         SELECT instance FROM relay_instances WHERE heartbeat_at < now() - make_interval(secs => $1))
                       OR instance NOT IN (SELECT instance FROM relay_instances)",
                    &[&timeout],
                )
                .map_err(pg)?;
                tx.execute(
                    "INSERT INTO relay_connections (instance, conn, peer) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                    &[&instance, &conn, &peer],
                )
                .map_err(pg)?;
                let rows = tx
                    .query(
                        "SELECT instance, conn FROM relay_connections WHERE peer = $1
                         ORDER BY opened_at DESC, instance DESC, conn DESC OFFSET $2",
                        &[&peer, &(keep as i64)],
                    )
                    .map_err(pg)?;
                let mut local = Vec::new();
                for row in rows {
                    let (at, old): (String, i64) = (row.get(0), row.get(1));
                    tx.execute("DELETE FROM relay_connections WHERE instance = $1 AND conn = $2", &[&at, &old])
                        .map_err(pg)?;
                    if at == instance {
                        local.push(old as u64);
                    } else {
                        let payload = format!("{at} {old} replaced by a newer connection of this node");
                        tx.execute("SELECT pg_notify($1, $2)", &[&CHANNEL_CLOSE, &payload]).map_err(pg)?;
                    }
                }
                Ok(local)
            })
            .map(Some)
    }

    fn connection_closed(&self, conn: u64) -> Result<(), StoreError> {
        let instance = self.instance.clone();
        let conn = conn as i64;
        self.workers.call(move |client| {
            client
                .execute("DELETE FROM relay_connections WHERE instance = $1 AND conn = $2", &[&instance, &conn])
                .map(|_| ())
                .map_err(pg)
        })
    }
}

/// The thread that listens for the other instances' notifications and keeps
/// this instance's heartbeat.
struct Listener {
    config: postgres::Config,
    instance: String,
    stop: Arc<AtomicBool>,
    /// Told of every other instance's document change before `on_event` is.
    caches: Arc<Caches>,
    on_event: Arc<dyn Fn(RemoteEvent) + Send + Sync>,
}

impl Listener {
    fn run(self, ready: mpsc::SyncSender<Result<(), StoreError>>) {
        let mut ready = Some(ready);
        let mut delay = Duration::from_millis(100);
        while !self.stop.load(Ordering::SeqCst) {
            match self.connect() {
                Ok(client) => {
                    delay = Duration::from_millis(100);
                    // Every commit of another instance from now on is heard: caches may be trusted again.
                    self.caches.fresh.listening();
                    match ready.take() {
                        Some(ready) => {
                            let _ = ready.send(Ok(()));
                        }
                        // Reconnected: what was notified meanwhile is lost.
                        None => (self.on_event)(RemoteEvent::Missed),
                    }
                    let listened = self.listen(client);
                    // Not hearing the others' commits: nothing cached is trusted until listening again.
                    self.caches.fresh.deaf();
                    if let Err(e) = listened {
                        warn!(error = %e, "lost the PostgreSQL notification connection; reconnecting");
                    }
                }
                Err(e) => {
                    if let Some(ready) = ready.take() {
                        let _ = ready.send(Err(e));
                        return;
                    }
                    debug!(error = %e, "cannot reconnect the PostgreSQL listener yet");
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    fn connect(&self) -> Result<Client, StoreError> {
        let mut client = self.config.connect(NoTls).map_err(pg)?;
        client
            .batch_execute(&format!("LISTEN {CHANNEL_DOCS}; LISTEN {CHANNEL_META}; LISTEN {CHANNEL_CLOSE};"))
            .map_err(pg)?;
        self.beat(&mut client)?;
        Ok(client)
    }

    fn beat(&self, client: &mut Client) -> Result<(), StoreError> {
        client
            .execute(
                "INSERT INTO relay_instances (instance) VALUES ($1)
                 ON CONFLICT (instance) DO UPDATE SET heartbeat_at = now()",
                &[&self.instance],
            )
            .map(|_| ())
            .map_err(pg)
    }

    fn listen(&self, mut client: Client) -> Result<(), StoreError> {
        let mut beaten = Instant::now();
        while !self.stop.load(Ordering::SeqCst) {
            if beaten.elapsed() >= HEARTBEAT {
                self.beat(&mut client)?;
                beaten = Instant::now();
            }
            let notification = client.notifications().timeout_iter(Duration::from_millis(200)).next().map_err(pg)?;
            let Some(note) = notification else {
                if client.is_closed() {
                    return Err(backend("the connection closed"));
                }
                continue;
            };
            let mut parts = note.payload().splitn(3, ' ');
            let from = parts.next().unwrap_or_default();
            match note.channel() {
                CHANNEL_DOCS if from != self.instance => {
                    if let Some(doc) = parts.next().and_then(|d| d.parse::<DocId>().ok()) {
                        // Before anyone is told: a step woken by this reads the new version.
                        let receipts_added = parts.next() != Some(NO_RECEIPTS);
                        self.caches.changed_remotely(&doc, receipts_added);
                        (self.on_event)(RemoteEvent::DocChanged(doc));
                    }
                }
                CHANNEL_META if from != self.instance => (self.on_event)(RemoteEvent::MetaChanged),
                // Addressed to this instance by another.
                CHANNEL_CLOSE if from == self.instance => {
                    if let Some(conn) = parts.next().and_then(|c| c.parse::<u64>().ok()) {
                        let reason = parts.next().unwrap_or("closed by another relay instance").to_string();
                        (self.on_event)(RemoteEvent::Close { conn, reason });
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// Creates a database of its own for a test or benchmark on the server at
/// `base` (a `postgres://` address whose user may create databases) and
/// returns its address. The name is random (`samverkan_test_…`); the server
/// is meant to be a throwaway one.
pub fn throwaway_database(base: &str) -> Result<String, StoreError> {
    let name = format!("samverkan_test_{}", hex::encode(rand::random::<[u8; 6]>()));
    let config: postgres::Config = base.parse().map_err(|e| backend(format!("not a PostgreSQL address: {e}")))?;
    let statement = format!("CREATE DATABASE {name}");
    std::thread::scope(|s| {
        s.spawn(|| -> Result<(), StoreError> {
            let mut client = config.connect(NoTls).map_err(pg)?;
            client.batch_execute(&statement).map_err(pg)
        })
        .join()
    })
    .map_err(|_| backend("creating a database panicked"))??;
    Ok(with_database(base, &name))
}

/// `url` with its database name replaced by `name`.
fn with_database(url: &str, name: &str) -> String {
    let (main, query) = match url.split_once('?') {
        Some((main, query)) => (main, Some(query)),
        None => (url, None),
    };
    let after_scheme = main.find("://").map(|i| i + 3).unwrap_or(0);
    let base = match main[after_scheme..].find('/') {
        Some(slash) => &main[..after_scheme + slash],
        None => main,
    };
    match query {
        Some(query) => format!("{base}/{name}?{query}"),
        None => format!("{base}/{name}"),
    }
}

/// The environment variable naming a PostgreSQL server for the tests.
pub const TEST_SERVER_ENV: &str = "SAMVERKAN_TEST_POSTGRES";
/// Set (to anything but `0`) where the PostgreSQL tests must run (CI): without
/// a server they then fail instead of skipping.
pub const REQUIRE_ENV: &str = "SAMVERKAN_REQUIRE_POSTGRES";

/// Whether a PostgreSQL test runs (see [`test_database`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TestDatabase {
    /// The address of a fresh database to run against.
    Ready(String),
    /// No server is configured: the test skips, saying this.
    Skipped(String),
}

/// For tests: a throwaway database on the server named by [`TEST_SERVER_ENV`],
/// or why the test skips when none is configured. `Err` when [`REQUIRE_ENV`]
/// demands a server and there is none, or the server cannot be used.
pub fn test_database() -> Result<TestDatabase, String> {
    let required = std::env::var(REQUIRE_ENV).is_ok_and(|v| !v.is_empty() && v != "0");
    match std::env::var(TEST_SERVER_ENV) {
        Ok(base) if !base.trim().is_empty() => throwaway_database(base.trim())
            .map(TestDatabase::Ready)
            .map_err(|e| format!("{TEST_SERVER_ENV}={}: {e}", redact(&base))),
        _ if required => Err(format!(
            "{REQUIRE_ENV} is set but {TEST_SERVER_ENV} names no PostgreSQL server (postgres://user@host:port/db)"
        )),
        _ => Ok(TestDatabase::Skipped(format!(
            "skipped: no PostgreSQL server configured (set {TEST_SERVER_ENV}=postgres://user@host:port/db to run it; .ci/run does)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_database_name_is_replaced_and_a_password_never_shown() {
        assert_eq!(with_database("postgres://u@h:5/x?sslmode=disable", "t"), "postgres://u@h:5/t?sslmode=disable");
        assert_eq!(with_database("postgres://u@h:5", "t"), "postgres://u@h:5/t");
        assert_eq!(redact("postgres://u:secret@h/x"), "postgres://u:***@h/x");
        assert_eq!(redact("postgres://u@h/x"), "postgres://u@h/x");
        assert_ne!(lock_key("doc", "a"), lock_key("meta", "a"));
    }
}
