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
//! (`pg_advisory_xact_lock` on the id, and the row `FOR UPDATE`), so two
//! instances never interleave writes to one document; a cached copy is used
//! only after checking, under that lock, that its snapshot generation is
//! current, and the increments committed since are read on top. Metadata
//! changes (the enrollment directory and join codes) are read-modify-write
//! transactions under the key's row lock, so a join code is single-use across
//! instances. Each commit notifies the others (`NOTIFY`, delivered only on
//! commit): document changes on `samverkan_docs`, metadata on
//! `samverkan_meta`; a listener thread per instance turns them into
//! [`RemoteEvent`]s.
//!
//! Threads: the blocking `postgres` client runs a small runtime of its own and
//! must never be called on a tokio worker thread. Every statement therefore
//! runs on one of this storage's own worker threads, each holding a
//! connection of its own from an `r2d2` pool; the caller waits on a channel.
//! Workers are started as jobs outnumber idle ones, up to the pool's size
//! ([`DEFAULT_POOL_SIZE`]), and end after a minute without work. `with_doc`'s
//! closure runs on the caller's thread between the transaction's read and its
//! write, holding one worker (and the document's lock) meanwhile; the others
//! serve reads and other documents. There is no lock of the instance's own
//! around a document: writes to one document are serialised by its lock in
//! PostgreSQL alone, within an instance as across instances.
//!
//! Never does: keep a document's contents anywhere but in its bounded cache,
//! or write without the document's lock.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use automerge::{AutoCommit, ChangeHash};
use chrono::Utc;
use postgres::error::SqlState;
use postgres::fallible_iterator::FallibleIterator;
use postgres::{Client, NoTls, Transaction};
use r2d2_postgres::PostgresConnectionManager;
use samverkan_shared::acceptance::ContentLimits;
use samverkan_shared::ids::DocId;
use samverkan_shared::model::Document;
use samverkan_shared::org::OrgId;
use samverkan_shared::receipt::ApprovalReceipt;
use samverkan_shared::sync::SignedChange;
use samverkan_store::StoreError;
use sha2::{Digest, Sha256};
use tracing::{debug, info, warn};

use super::{DocEntry, RelayStorage, RemoteEvent};

/// The name errors of this backend carry.
pub const BACKEND: &str = "postgresql";
/// Schema version this build writes.
pub const SCHEMA_VERSION: i32 = 1;
/// Incremental rows per document before they are folded into a new snapshot
/// (the same as the SQLite store's).
pub const COMPACT_AFTER_ROWS: i64 = samverkan_store::COMPACT_AFTER_ROWS;
/// Connections in the pool, and so worker threads, at most by default: one
/// `with_doc` holds one while its closure runs, and the relay runs up to 16
/// storage steps at once (the rest wait for a worker).
pub const DEFAULT_POOL_SIZE: u32 = 8;
/// An instance whose heartbeat is older than this is taken as gone: its
/// connections no longer count against a node's per-key limit.
pub const INSTANCE_TIMEOUT: Duration = Duration::from_secs(30);

/// Migrations: entry `i` takes the schema from version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[include_str!("../../migrations/postgres/0001_relay.sql")];
/// The advisory lock migrations run under (two instances starting at once).
const MIGRATION_LOCK: i64 = 0x5356_4B4E_0001;
/// Notification channel of document changes (payload: instance, space, doc id).
const CHANNEL_DOCS: &str = "samverkan_docs";
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

/// A loaded document kept between calls, trusted only at its generation.
struct Cached {
    doc: Document,
    generation: i64,
    last_seq: i64,
    used: u64,
}

/// A document's rows as read under its lock.
struct DocRows {
    /// `None` if the document is not stored.
    stored: Option<StoredDoc>,
}

struct StoredDoc {
    generation: i64,
    change_bytes: i64,
    /// The snapshot and its checksum, unless the cached copy's generation is current.
    snapshot: Option<(Vec<u8>, Vec<u8>)>,
    /// Increments after the cached copy's (or all), with their checksums.
    changes: Vec<(i64, Vec<u8>, Vec<u8>)>,
    /// Increment rows the document has in all.
    rows: i64,
}

/// What `with_doc` writes for a document.
struct DocWrite {
    id: String,
    instance: String,
    created: bool,
    /// A full save: the document is new or its increments are folded now.
    snapshot: Option<Vec<u8>>,
    /// The new changes, as an incremental save.
    increment: Option<Vec<u8>>,
    kind: String,
    title: String,
    heads: Vec<String>,
    parties: Vec<String>,
    size: i64,
    signatures: Vec<(Vec<u8>, Vec<u8>)>,
    receipts: Vec<ApprovalReceipt>,
}

/// The relay's storage in a PostgreSQL database (see the module docs).
pub struct PostgresStorage {
    workers: Workers,
    url: String,
    instance: String,
    limits: ContentLimits,
    /// Loaded documents, used only when their snapshot generation is current.
    cache: std::sync::Mutex<DocCache>,
    /// Tells the listener thread (if one runs) to stop.
    stop: Arc<AtomicBool>,
    listener: std::sync::Mutex<Option<JoinHandle<()>>>,
}

/// The documents a [`PostgresStorage`] keeps loaded (least recently used dropped first).
#[derive(Default)]
struct DocCache {
    entries: HashMap<DocId, Cached>,
    capacity: usize,
    clock: u64,
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
            cache: std::sync::Mutex::new(DocCache { entries: HashMap::new(), capacity: cache, clock: 0 }),
            stop: Arc::new(AtomicBool::new(false)),
            listener: std::sync::Mutex::new(None),
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

    /// Number of increment rows a document has (for tests).
    pub fn increment_rows(&self, doc: &DocId) -> Result<i64, StoreError> {
        let id = doc.as_str().to_string();
        self.workers.call(move |client| {
            client.query_one("SELECT count(*) FROM changes WHERE doc_id = $1", &[&id]).map(|r| r.get(0)).map_err(pg)
        })
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, DocCache> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn put(&self, doc: Document, generation: i64, last_seq: i64) {
        let mut cache = self.cache();
        if cache.capacity == 0 {
            return;
        }
        cache.clock += 1;
        let used = cache.clock;
        cache.entries.insert(doc.id().clone(), Cached { doc, generation, last_seq, used });
        while cache.entries.len() > cache.capacity {
            let Some(oldest) = cache.entries.iter().min_by_key(|(_, c)| c.used).map(|(id, _)| id.clone()) else {
                break;
            };
            cache.entries.remove(&oldest);
        }
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

/// Reads a document's rows under its lock (see [`DocRows`]).
fn read_doc(tx: &mut Transaction<'_>, id: &str, cached: Option<(i64, i64)>) -> Result<DocRows, StoreError> {
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&lock_key("doc", id)]).map_err(pg)?;
    let Some(row) = tx
        .query_opt("SELECT generation, change_bytes FROM documents WHERE doc_id = $1 FOR UPDATE", &[&id])
        .map_err(pg)?
    else {
        return Ok(DocRows { stored: None });
    };
    let generation: i64 = row.get(0);
    let change_bytes: i64 = row.get(1);
    let (snapshot, after) = match cached {
        Some((g, last_seq)) if g == generation => (None, last_seq),
        _ => {
            let row = tx
                .query_one("SELECT snapshot, snapshot_sha256 FROM documents WHERE doc_id = $1", &[&id])
                .map_err(pg)?;
            (Some((row.get(0), row.get(1))), 0)
        }
    };
    let changes = tx
        .query("SELECT seq, data, sha256 FROM changes WHERE doc_id = $1 AND seq > $2 ORDER BY seq", &[&id, &after])
        .map_err(pg)?
        .into_iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let rows: i64 = tx.query_one("SELECT count(*) FROM changes WHERE doc_id = $1", &[&id]).map_err(pg)?.get(0);
    Ok(DocRows { stored: Some(StoredDoc { generation, change_bytes, snapshot, changes, rows }) })
}

/// Writes what `with_doc` decided; returns the document's generation and last increment.
fn write_doc(tx: &mut Transaction<'_>, w: DocWrite) -> Result<(i64, i64), StoreError> {
    let (generation, last_seq) = if w.created {
        let data = w.snapshot.unwrap_or_default();
        tx.execute(
            "INSERT INTO documents (doc_id, kind, title, heads, parties, snapshot, snapshot_sha256, change_bytes, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, now(), now())",
            &[&w.id, &w.kind, &w.title, &w.heads, &w.parties, &data, &sha256(&data), &w.size],
        )
        .map_err(pg)?;
        (0, 0)
    } else {
        tx.execute(
            "UPDATE documents SET kind = $2, title = $3, heads = $4, parties = $5, change_bytes = $6, updated_at = now()
             WHERE doc_id = $1",
            &[&w.id, &w.kind, &w.title, &w.heads, &w.parties, &w.size],
        )
        .map_err(pg)?;
        match (w.snapshot, w.increment) {
            (Some(data), _) => {
                let generation: i64 = tx
                    .query_one(
                        "UPDATE documents SET snapshot = $2, snapshot_sha256 = $3, generation = generation + 1
                         WHERE doc_id = $1 RETURNING generation",
                        &[&w.id, &data, &sha256(&data)],
                    )
                    .map_err(pg)?
                    .get(0);
                tx.execute("DELETE FROM changes WHERE doc_id = $1", &[&w.id]).map_err(pg)?;
                debug!(doc = %w.id, bytes = data.len(), generation, "compacted document");
                (generation, 0)
            }
            (None, Some(data)) => {
                let seq: i64 = tx
                    .query_one(
                        "INSERT INTO changes (doc_id, data, sha256) VALUES ($1, $2, $3) RETURNING seq",
                        &[&w.id, &data, &sha256(&data)],
                    )
                    .map_err(pg)?
                    .get(0);
                let generation: i64 =
                    tx.query_one("SELECT generation FROM documents WHERE doc_id = $1", &[&w.id]).map_err(pg)?.get(0);
                (generation, seq)
            }
            (None, None) => return Err(backend("nothing to write")),
        }
    };
    insert_signatures(tx, &w.signatures)?;
    insert_receipts(tx, &w.receipts)?;
    // Delivered to the other instances only if this transaction commits.
    tx.execute("SELECT pg_notify($1, $2)", &[&CHANNEL_DOCS, &format!("{} {}", w.instance, w.id)]).map_err(pg)?;
    Ok((generation, last_seq))
}

fn insert_signatures(tx: &mut Transaction<'_>, signatures: &[(Vec<u8>, Vec<u8>)]) -> Result<(), StoreError> {
    if signatures.is_empty() {
        return Ok(());
    }
    let stmt = tx
        .prepare("INSERT INTO change_signatures (hash, signature) VALUES ($1, $2) ON CONFLICT DO NOTHING")
        .map_err(pg)?;
    for (hash, signature) in signatures {
        tx.execute(&stmt, &[hash, signature]).map_err(pg)?;
    }
    Ok(())
}

/// Inserts receipts, keeping the first one held of each record; returns how many were new.
fn insert_receipts(tx: &mut Transaction<'_>, receipts: &[ApprovalReceipt]) -> Result<usize, StoreError> {
    if receipts.is_empty() {
        return Ok(0);
    }
    let stmt = tx
        .prepare(
            "INSERT INTO approval_receipts (doc_id, record, received_at, relay_signature) VALUES ($1, $2, $3, $4)
             ON CONFLICT DO NOTHING",
        )
        .map_err(pg)?;
    let mut added = 0;
    for r in receipts {
        let at = r.received_at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        added += tx.execute(&stmt, &[&r.doc.as_str(), &r.record_signature, &at, &r.relay_signature]).map_err(pg)?;
    }
    Ok(added as usize)
}

impl RelayStorage for PostgresStorage {
    fn index(&self) -> Result<Vec<DocEntry>, StoreError> {
        let rows = self.workers.call(|client| {
            client
                .query("SELECT doc_id, heads, parties FROM documents ORDER BY updated_at DESC, doc_id", &[])
                .map_err(pg)
                .map(|rows| rows.into_iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect::<Vec<_>>())
        })?;
        rows.into_iter().map(|(id, heads, parties)| entry_from(id, heads, parties)).collect()
    }

    fn set_content_limits(&mut self, limits: ContentLimits) {
        self.limits = limits;
    }

    fn entry(&self, doc: &DocId) -> Result<Option<DocEntry>, StoreError> {
        let id = doc.as_str().to_string();
        let row = self.workers.call(move |client| {
            client
                .query_opt("SELECT doc_id, heads, parties FROM documents WHERE doc_id = $1", &[&id])
                .map_err(pg)
                .map(|row| row.map(|r| (r.get(0), r.get(1), r.get(2))))
        })?;
        row.map(|(id, heads, parties)| entry_from(id, heads, parties)).transpose()
    }

    fn with_doc<R, E: From<StoreError>>(
        &self,
        doc: &DocId,
        create: bool,
        f: impl FnOnce(&mut Document) -> Result<(R, Vec<SignedChange>, Vec<ApprovalReceipt>), E>,
    ) -> Result<Option<R>, E> {
        let id = doc.as_str().to_string();
        let cached = self.cache().entries.remove(doc);
        let at = cached.as_ref().map(|c| (c.generation, c.last_seq));
        let read_id = id.clone();
        let mut open = self.workers.open(move |tx| read_doc(tx, &read_id, at), write_doc)?;
        let rows = open.take().ok_or_else(worker_gone)?;
        let corrupt = |reason: String| StoreError::CorruptDocument { id: doc.clone(), reason };
        // The document as stored now: the cached copy if its snapshot is current, else the snapshot; then the increments.
        let (mut document, generation, mut last_seq, size_before, rows_before, created) = match rows.stored {
            None if !create => return Ok(None),
            None => {
                (Document::from_automerge(doc.clone(), AutoCommit::new()).map_err(StoreError::from)?, 0, 0, 0, 0, true)
            }
            Some(stored) => {
                let (mut automerge, after) = match (stored.snapshot, cached) {
                    (Some((bytes, sum)), _) => {
                        if sum != sha256(&bytes) {
                            return Err(corrupt("the snapshot does not match its checksum".into()).into());
                        }
                        (AutoCommit::load(&bytes).map_err(|e| corrupt(format!("snapshot: {e}")))?, 0)
                    }
                    (None, Some(c)) => (c.doc.into_automerge(), c.last_seq),
                    (None, None) => return Err(corrupt("neither a snapshot nor a cached copy".into()).into()),
                };
                let mut last = after;
                for (seq, data, sum) in stored.changes {
                    if sum != sha256(&data) {
                        return Err(corrupt(format!("change row {seq} does not match its checksum")).into());
                    }
                    automerge.load_incremental(&data).map_err(|e| corrupt(format!("change row {seq}: {e}")))?;
                    last = seq;
                }
                let document = Document::from_automerge(doc.clone(), automerge).map_err(|e| corrupt(e.to_string()))?;
                (document, stored.generation, last, stored.change_bytes, stored.rows, false)
            }
        };
        let before = document.heads();
        // On error the transaction is rolled back (dropped) and the in-memory copy discarded.
        let (value, signatures, receipts) = f(&mut document)?;
        let heads = document.heads();
        if heads == before || document.is_empty() {
            drop(open);
            if !created {
                self.put(document, generation, last_seq);
            }
            return Ok(Some(value));
        }
        // Whatever came in must still be a document we can read, within the limits.
        document.check_header().map_err(StoreError::from)?;
        let size = self
            .limits
            .check_new_changes(doc, document.automerge_mut(), &before, size_before.max(0) as u64)
            .map_err(StoreError::from)?;
        let compact = !created && rows_before + 1 >= COMPACT_AFTER_ROWS;
        let write = DocWrite {
            id,
            instance: self.instance.clone(),
            created,
            snapshot: (created || compact).then(|| document.automerge_mut().save()),
            increment: (!created && !compact).then(|| document.automerge_mut().save_after(&before)),
            kind: document.kind().map_err(StoreError::from)?.as_str().to_string(),
            title: document.title().map_err(StoreError::from)?,
            heads: heads.iter().map(ToString::to_string).collect(),
            parties: document.parties().map_err(StoreError::from)?.iter().map(|p| p.as_str().to_string()).collect(),
            size: size as i64,
            signatures: signatures.iter().map(|(hash, sig)| (hash.0.to_vec(), sig.to_vec())).collect(),
            receipts,
        };
        let (generation, seq) = open.commit(write)?;
        if seq != 0 || compact || created {
            last_seq = seq;
        }
        self.put(document, generation, last_seq);
        Ok(Some(value))
    }

    fn signatures(&self, hashes: &[ChangeHash]) -> Result<Vec<SignedChange>, StoreError> {
        if hashes.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<Vec<u8>> = hashes.iter().map(|h| h.0.to_vec()).collect();
        let rows: Vec<(Vec<u8>, Vec<u8>)> = self.workers.call(move |client| {
            client
                .query("SELECT hash, signature FROM change_signatures WHERE hash = ANY($1)", &[&keys])
                .map_err(pg)
                .map(|rows| rows.into_iter().map(|r| (r.get(0), r.get(1))).collect())
        })?;
        let found: HashMap<Vec<u8>, Vec<u8>> = rows.into_iter().collect();
        // In the order asked, as the SQLite store answers.
        Ok(hashes
            .iter()
            .filter_map(|hash| {
                let signature = found.get(hash.0.as_slice())?;
                Some((*hash, <[u8; 64]>::try_from(signature.as_slice()).ok()?))
            })
            .collect())
    }

    fn receipts(&self, doc: &DocId) -> Result<Vec<ApprovalReceipt>, StoreError> {
        let id = doc.as_str().to_string();
        let rows: Vec<(String, String, String)> = self.workers.call(move |client| {
            client
                .query(
                    "SELECT record, received_at, relay_signature FROM approval_receipts WHERE doc_id = $1 ORDER BY record",
                    &[&id],
                )
                .map_err(pg)
                .map(|rows| rows.into_iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect())
        })?;
        rows.into_iter()
            .map(|(record_signature, at, relay_signature)| {
                let received_at = chrono::DateTime::parse_from_rfc3339(&at)
                    .map_err(|e| StoreError::CorruptDocument {
                        id: doc.clone(),
                        reason: format!("receipt: bad timestamp {at:?}: {e}"),
                    })?
                    .with_timezone(&Utc);
                Ok(ApprovalReceipt { doc: doc.clone(), record_signature, received_at, relay_signature })
            })
            .collect()
    }

    fn add_receipts(&self, receipts: &[ApprovalReceipt]) -> Result<usize, StoreError> {
        let receipts = receipts.to_vec();
        self.workers.call_in_transaction(move |tx| insert_receipts(tx, &receipts))
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
        self.cache().entries.remove(doc);
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
        self.cache().entries.len()
    }

    fn watch_remote(&self, on_event: Arc<dyn Fn(RemoteEvent) + Send + Sync>) -> Result<bool, StoreError> {
        let mut running = self.listener.lock().unwrap_or_else(|e| e.into_inner());
        if running.is_some() {
            return Ok(true);
        }
        let config: postgres::Config =
            self.url.parse().map_err(|e| backend(format!("not a PostgreSQL address: {e}")))?;
        let (ready_tx, ready_rx) = mpsc::sync_channel(1);
        let listener = Listener { config, instance: self.instance.clone(), stop: self.stop.clone(), on_event };
        let thread = std::thread::Builder::new()
            .name("samverkan-postgres-listen".into())
            .spawn(move || listener.run(ready_tx))
            .map_err(|e| backend(format!("cannot start the listener thread: {e}")))?;
        *running = Some(thread);
        // Listening before the relay serves: nothing committed after this is missed.
        ready_rx.recv_timeout(Duration::from_secs(15)).map_err(|_| backend("the listener did not connect"))??;
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
                    match ready.take() {
                        Some(ready) => {
                            let _ = ready.send(Ok(()));
                        }
                        // Reconnected: what was notified meanwhile is lost.
                        None => (self.on_event)(RemoteEvent::Missed),
                    }
                    if let Err(e) = self.listen(client) {
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
