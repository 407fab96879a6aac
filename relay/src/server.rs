//! The relay server: accepts QUIC connections from nodes, checks that the key
//! each proved in the TLS handshake is enrolled, and runs one
//! [`SyncConnection`] per connection against the relay's storage, fanning
//! changes out to every other connected node through the [`Hub`].
//!
//! Access control lives in [`RelayDocs`]: a connection sees, and may change,
//! only documents whose parties include its node's organisation; a new
//! document it sends must name its organisation among the parties. One task per
//! connection; a connection's failure (a broken or hostile peer) closes that
//! connection only. Storage is reached through [`RelayStorage`].
//!
//! The enrollment directory is cached. The operator changes it from another
//! process (`samverkan-relay enroll | revoke`); the relay notices such a
//! commit with one cheap look at the storage ([`RelayStorage::external_changes`])
//! whenever a node connects, before it checks the key and sends the
//! `Directory` frame, and every [`RelayConfig::directory_poll`] (to cut off
//! revoked nodes that stay connected).
//!
//! Approval receipts: when a change adds approval or withdrawal records and
//! they pass [`approval::check_new_records`], the relay signs a receipt of each
//! ([`ApprovalReceipt`]: the record, received now) and stores it in the same
//! transaction as the change. Connections send a document's receipts before
//! its `Sync` frames (see [`samverkan_shared::sync`]). Records stored before
//! receipts existed get one, dated when the relay first notices them, at the
//! first start of this version ([`backfill_receipts`]).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use automerge::{ActorId, AutoCommit, ChangeHash};
use chrono::Utc;
use samverkan_net::endpoint::{self, Limits};
use samverkan_net::framed::{self, FramedRecv, FramedSend, ReadStep};
use samverkan_net::tls::{self, TlsIdentity};
use samverkan_net::NetError;
use samverkan_shared::acceptance::{AuthorPolicy, AuthorRule, ContentLimits, LimitsError};
use samverkan_shared::approval;
use samverkan_shared::directory::{directory_digest, EnrollmentDirectory, JoinCode, Member, MemberKind};
use samverkan_shared::identity::{NodeId, NodeKey};
use samverkan_shared::ids::DocId;
use samverkan_shared::org::OrgId;
use samverkan_shared::receipt::ApprovalReceipt;
use samverkan_shared::sync::{
    ConnectionError, ConnectionEvent, DocAccess, DocOutcome, MemoryAccess, Operations, SignedChange, StoredWhole,
    SyncConnection, SyncLimits, SyncMemo, START_WINDOW,
};
use samverkan_shared::wire::{
    protocol_refusal, protocol_served, ErrorCode, Frame, RawFrame, ReceiptEntry, Received, RefusalKind, WireError,
};
use samverkan_store::{keyfile, StoreError};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{debug, info, info_span, warn, Instrument};

use crate::budget::ReceiveBudget;
use crate::config::StorageLocation;
use crate::enrollment::{self, EnrollmentError};
use crate::handshake::{Admission, HandshakeGate, HandshakeTicket};
use crate::hub::{ConnectionId, Hub, Mailbox};
use crate::monitor::{ConnectionWatch, Monitor, MonitorConfig, NameResolver, NodeName, RelayMetrics, RelayStatus};
use crate::record_keys::RecordKeys;
use crate::storage::postgres::PostgresStorage;
use crate::storage::{RelayStorage, RemoteEvent, SqliteStorage};

/// File name of the relay's database inside its data directory.
pub const DB_FILE: &str = "relay.db";

/// How a relay is set up.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Address to listen on (port 0 picks a free port).
    pub listen: SocketAddr,
    /// Where the database and the certificate live.
    pub data_dir: PathBuf,
    /// Transport limits (frame size, idle timeout, windows).
    pub limits: Limits,
    /// Documents kept loaded in memory at most; the rest stay on disk.
    pub cached_documents: usize,
    /// Connections served at once; more are refused.
    pub max_connections: usize,
    /// Connections one node key may hold at once; more are refused.
    pub max_connections_per_key: usize,
    /// Connections not yet authenticated (TLS handshake, then `Hello` or
    /// `Join`) beyond which a new connection must first prove its address with
    /// a QUIC Retry (see [`crate::handshake`]); at most half of `max_connections`.
    pub handshakes_before_retry: usize,
    /// Connections not yet authenticated one (validated) address may have at once.
    pub handshakes_per_address: usize,
    /// How often the relay looks whether the operator changed the enrollment
    /// directory from another process (`enroll`, `revoke`): revoked nodes
    /// still connected are cut off, connected nodes get the new directory. A
    /// connecting node always gets the directory as stored, poll or not.
    pub directory_poll: Duration,
    /// Monitoring: stale threshold, node names, admin HTTP server (see [`crate::monitor`]).
    pub monitoring: MonitorConfig,
    /// Largest change and document accepted (and so stored and forwarded).
    pub content: ContentLimits,
    /// Most operations one change may carry (counted before Automerge sees it:
    /// a change of a hundred bytes can carry millions; see `samverkan_shared::sync::check`).
    pub max_change_ops: u64,
    /// Most operations one sync message may carry, all its changes together
    /// (also the most a document may have and still reach a node syncing from nothing).
    pub max_message_ops: u64,
    /// Bytes per second one node key may make the relay read on average (see [`crate::budget`]).
    pub receive_rate_per_key: u64,
    /// Bytes one node key may make the relay read at once.
    pub receive_burst_per_key: u64,
    /// Where the documents and the directory live: SQLite in the data
    /// directory (the default) or a PostgreSQL database several instances share.
    pub storage: StorageLocation,
    /// On PostgreSQL: the connections (and storage worker threads) this
    /// instance opens at most (see [`crate::storage::postgres`]).
    pub postgres_pool_size: u32,
}

impl RelayConfig {
    /// Defaults for a relay listening on `listen` with data in `data_dir`.
    pub fn new(listen: SocketAddr, data_dir: PathBuf) -> Self {
        Self {
            listen,
            data_dir,
            limits: Limits::relay(),
            cached_documents: 256,
            max_connections: 4096,
            max_connections_per_key: 4,
            handshakes_before_retry: crate::handshake::DEFAULT_RETRY_ABOVE,
            handshakes_per_address: crate::handshake::DEFAULT_PER_ADDRESS,
            directory_poll: Duration::from_secs(1),
            monitoring: MonitorConfig::default(),
            content: ContentLimits::default(),
            max_change_ops: samverkan_shared::sync::DEFAULT_MAX_CHANGE_OPS,
            max_message_ops: samverkan_shared::sync::DEFAULT_MAX_OPS,
            receive_rate_per_key: crate::budget::DEFAULT_RATE,
            receive_burst_per_key: crate::budget::DEFAULT_BURST,
            storage: StorageLocation::Sqlite,
            postgres_pool_size: crate::storage::postgres::DEFAULT_POOL_SIZE,
        }
    }
}

/// Errors starting or running the relay.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// Transport setup failed.
    #[error(transparent)]
    Net(#[from] NetError),
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The admin HTTP server could not start.
    #[error(transparent)]
    Admin(#[from] crate::admin::AdminError),
    /// The relay's key file is missing, exposed or damaged.
    #[error(transparent)]
    KeyFile(#[from] keyfile::KeyFileError),
    /// The enrollment data could not be read.
    #[error(transparent)]
    Enrollment(#[from] EnrollmentError),
    /// The configured size limits do not fit together.
    #[error("invalid limits: {0}")]
    Limits(#[from] LimitsError),
    /// Another relay process serves this data directory (its embedded SQLite
    /// storage has one relay process; several instances share PostgreSQL).
    #[error("another relay is already serving {0} (its lock file {LOCK_FILE} is held); stop it first, or run several instances on PostgreSQL")]
    AlreadyServing(PathBuf),
    /// The data directory's lock file could not be opened or locked.
    #[error("cannot lock the data directory {dir}: {error}")]
    Lock {
        /// The data directory.
        dir: PathBuf,
        /// Why.
        error: String,
    },
}

/// The lock file a relay serving embedded SQLite storage holds in its data
/// directory for as long as it runs.
pub const LOCK_FILE: &str = "relay.lock";

/// Takes the data directory's lock (released when the file is dropped, or
/// by the OS when the process dies).
fn lock_data_dir(dir: &std::path::Path) -> Result<std::fs::File, RelayError> {
    let lock_error = |e: std::io::Error| RelayError::Lock { dir: dir.to_path_buf(), error: e.to_string() };
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(LOCK_FILE))
        .map_err(lock_error)?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(RelayError::AlreadyServing(dir.to_path_buf())),
        Err(std::fs::TryLockError::Error(e)) => Err(lock_error(e)),
    }
}

/// Why one connection ended.
#[derive(Debug, thiserror::Error)]
enum ConnectionEnd {
    #[error(transparent)]
    Net(#[from] NetError),
    #[error(transparent)]
    Protocol(#[from] ConnectionError),
    #[error("storage: {0}")]
    Storage(#[from] StoreError),
    #[error("refused: {0}")]
    Refused(String),
    /// The relay is stopping: its storage threads take no more work.
    #[error("the relay is shutting down")]
    ShuttingDown,
    /// Refused before authentication (not enrolled, revoked, a bad first frame,
    /// a refused join): `reason` is a short phrase for the log, the peer got the
    /// full explanation in an `Error` frame.
    #[error("not admitted: {reason}")]
    NotAdmitted { reason: &'static str },
}

impl ConnectionEnd {
    /// The `Error` frame telling the peer why, when the end did not queue one itself.
    fn error_frame(&self) -> Frame {
        let internal = || Frame::Error {
            code: ErrorCode::Internal,
            message: "the relay's storage failed; nothing of the failed step was kept; try again later".into(),
        };
        let (code, message) = match self {
            ConnectionEnd::Net(NetError::Wire(wire)) => (wire.error_code(), format!("bad frame: {wire}")),
            ConnectionEnd::Net(e) => (ErrorCode::Internal, e.to_string()),
            ConnectionEnd::Storage(_) | ConnectionEnd::Protocol(ConnectionError::Storage(_)) => return internal(),
            ConnectionEnd::Protocol(ConnectionError::Sync(e)) => (e.error_code(), e.to_string()),
            ConnectionEnd::Protocol(e @ (ConnectionError::Authorship { .. } | ConnectionError::Forbidden(_))) => {
                (ErrorCode::Forbidden, e.to_string())
            }
            ConnectionEnd::Protocol(e) => (ErrorCode::Malformed, e.to_string()),
            ConnectionEnd::Refused(reason) => (ErrorCode::Busy, reason.clone()),
            ConnectionEnd::ShuttingDown => (ErrorCode::Busy, "the relay is shutting down; reconnect later".into()),
            ConnectionEnd::NotAdmitted { reason } => (ErrorCode::Unauthenticated, format!("not admitted: {reason}")),
        };
        Frame::Error { code, message }
    }
}

/// Why the relay refused to touch a document for a connection.
#[derive(Debug, thiserror::Error)]
enum DocAccessError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Changes (approval records) the relay does not accept: that document is refused.
    #[error("{0}")]
    Forbidden(String),
    /// A new document that does not name the sender's organisation: refused.
    #[error("{0}")]
    NotAParty(String),
    /// Not an error: the sync core asked to discard what it did (returned
    /// inside the store transaction as an error so that it rolls back).
    #[error("discarded")]
    Discarded,
}

/// The directory as last read, and its signed form for nodes.
struct DirectoryCache {
    directory: Arc<EnrollmentDirectory>,
    signed: Vec<u8>,
    /// [`directory_digest`] of `signed`: a node whose `Hello` names it holds this directory.
    digest: [u8; 32],
}

impl DirectoryCache {
    fn new(directory: EnrollmentDirectory, signed: Vec<u8>) -> Self {
        Self { digest: directory_digest(&signed), directory: Arc::new(directory), signed }
    }
}

/// State shared by all connection tasks.
struct Shared<S> {
    storage: S,
    /// Permits to use the storage: at most [`STORAGE_THREADS`] connections'
    /// steps run at once, each on a thread of tokio's blocking pool.
    storage_threads: tokio::sync::Semaphore,
    hub: Hub,
    software: String,
    relay_key: NodeKey,
    directory: RwLock<DirectoryCache>,
    /// The storage's [`RelayStorage::external_changes`] when the directory was
    /// last read; held while re-reading, so re-reads happen one at a time.
    directory_read_at: Mutex<Option<i64>>,
    monitor: Arc<Monitor>,
    max_connections_per_key: usize,
    /// Names of organisations: the built-in directory with the data directory's
    /// `organisations.toml` on top ([`enrollment::organisations`]).
    orgs: samverkan_shared::org::Directory,
    /// Limits on what a node's sync messages may carry.
    sync_limits: SyncLimits,
    /// The content limits, announced to protocol 6 nodes in `Welcome`.
    content: ContentLimits,
    /// What each node key may make the relay read.
    budget: ReceiveBudget,
    /// How many documents of its connect-time plan a connection starts at a
    /// time: [`START_WINDOW`], or fewer when the relay keeps few loaded
    /// (`cached_documents`), so that each is still loaded for the answer.
    start_window: usize,
    /// Each document version's approval record keys (see [`RecordKeys`]).
    record_keys: RecordKeys,
}

/// A connection's start window for a relay keeping `cached_documents` loaded:
/// a third of them at most (between a document's start and the node's answer
/// the relay starts and answers about as many others), [`START_WINDOW`] at most.
fn start_window(cached_documents: usize) -> usize {
    (cached_documents / 3).clamp(1, START_WINDOW)
}

/// How many connections' storage steps run at once. Several, so that the
/// updates of different documents meet in one group commit and reads go on
/// beside a commit; bounded, so that a burst of connections does not become
/// a burst of threads contending for the same documents.
const STORAGE_THREADS: usize = 16;

/// Runs `f` (storage work: SQLite, Automerge) on a thread of tokio's blocking
/// pool, never on the runtime's workers, at most [`STORAGE_THREADS`] at a time.
async fn on_storage_thread<S: RelayStorage, T: Send + 'static>(
    shared: &Arc<Shared<S>>,
    f: impl FnOnce(&Shared<S>) -> T + Send + 'static,
) -> Result<T, ConnectionEnd> {
    let _permit = shared.storage_threads.acquire().await.map_err(|_| ConnectionEnd::ShuttingDown)?;
    let shared = shared.clone();
    let span = tracing::Span::current();
    match tokio::task::spawn_blocking(move || span.in_scope(|| f(&shared))).await {
        Ok(value) => Ok(value),
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(_) => Err(ConnectionEnd::ShuttingDown),
    }
}

impl<S: RelayStorage> Shared<S> {
    fn storage(&self) -> &S {
        &self.storage
    }

    fn directory(&self) -> std::sync::RwLockReadGuard<'_, DirectoryCache> {
        self.directory.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Re-reads the directory; if it is newer, tells connections and cuts off
    /// the revoked ones. Returns whether it changed.
    fn refresh_directory(&self) -> Result<bool, EnrollmentError> {
        let mut read_at = self.directory_read_at.lock().unwrap_or_else(|e| e.into_inner());
        self.reread_directory(&mut read_at)
    }

    /// [`Self::refresh_directory`] if another process may have changed the
    /// directory since it was last read (`samverkan-relay enroll` or `revoke`
    /// while the relay runs); otherwise one cheap look (SQLite's
    /// `data_version`) and nothing else. Called when a node connects, so a
    /// key enrolled or revoked a moment ago counts for that connection and its
    /// `Directory` frame carries the enrollment (the poll may not have run yet).
    fn refresh_directory_if_changed(&self) -> Result<bool, EnrollmentError> {
        let mut read_at = self.directory_read_at.lock().unwrap_or_else(|e| e.into_inner());
        let now = self.storage().external_changes()?;
        if now.is_some() && now == *read_at {
            return Ok(false);
        }
        self.reread_directory(&mut read_at)
    }

    fn reread_directory(&self, read_at: &mut Option<i64>) -> Result<bool, EnrollmentError> {
        let (changes, directory) = {
            let storage = self.storage();
            (storage.external_changes()?, enrollment::directory(storage)?)
        };
        *read_at = changes;
        // Versions only grow: an older read (racing a newer one) changes nothing.
        if directory.version <= self.directory().directory.version {
            return Ok(false);
        }
        let signed = directory.sign(self.relay_key.signing_key()).encode();
        let revoked: Vec<Member> = directory.members.iter().filter(|m| !m.is_active()).cloned().collect();
        *self.directory.write().unwrap_or_else(|e| e.into_inner()) = DirectoryCache::new(directory, signed);
        for member in revoked {
            let reason = format!("this node ({}, {}) was revoked by the relay operator", member.name, member.org);
            if self.hub.close_peer(&member.key.to_string(), &reason) > 0 {
                info!(node = %member.key.short(), org = %member.org, "revoked node disconnected");
            }
        }
        self.hub.directory_changed();
        Ok(true)
    }
}

/// What the relay handle can do to the running relay, whatever its storage.
trait Admin: Send + Sync {
    fn connected(&self) -> Vec<String>;
    fn enroll(&self, member: Member) -> Result<(), EnrollmentError>;
    fn revoke(&self, key: &NodeId) -> Result<Member, EnrollmentError>;
    fn issue_join(&self, org: OrgId, name: &str, ttl: chrono::Duration) -> Result<[u8; 16], EnrollmentError>;
    fn directory(&self) -> Result<EnrollmentDirectory, EnrollmentError>;
}

impl<S: RelayStorage> Admin for Shared<S> {
    fn connected(&self) -> Vec<String> {
        self.hub.peers()
    }

    fn enroll(&self, member: Member) -> Result<(), EnrollmentError> {
        enrollment::enroll(self.storage(), member)?;
        self.refresh_directory().map(|_| ())
    }

    fn revoke(&self, key: &NodeId) -> Result<Member, EnrollmentError> {
        let member = enrollment::revoke(self.storage(), key, Utc::now())?;
        self.refresh_directory()?;
        Ok(member)
    }

    fn issue_join(&self, org: OrgId, name: &str, ttl: chrono::Duration) -> Result<[u8; 16], EnrollmentError> {
        enrollment::issue_join(self.storage(), org, name, ttl, Utc::now())
    }

    fn directory(&self) -> Result<EnrollmentDirectory, EnrollmentError> {
        enrollment::directory(self.storage())
    }
}

/// A running relay.
pub struct RelayHandle {
    local_addr: SocketAddr,
    relay_key: NodeId,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    admin: Arc<dyn Admin>,
    monitor: Arc<Monitor>,
    status: crate::admin::StatusSource,
    admin_addr: Option<SocketAddr>,
}

impl std::fmt::Debug for RelayHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayHandle").field("local_addr", &self.local_addr).finish_non_exhaustive()
    }
}

impl RelayHandle {
    /// The address the relay listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The relay's public key, which nodes pin.
    pub fn relay_key(&self) -> NodeId {
        self.relay_key
    }

    /// The nodes connected now (one entry per connection, by node key).
    pub fn connected(&self) -> Vec<String> {
        self.admin.connected()
    }

    /// The relay's metrics (as `/metrics` exports them).
    pub fn metrics(&self) -> &RelayMetrics {
        self.monitor.metrics()
    }

    /// Enrolls a node key for `org` under `name` (as `samverkan-relay enroll` does).
    pub fn enroll_node(&self, key: NodeId, org: OrgId, name: &str) -> Result<(), EnrollmentError> {
        self.enroll(Member {
            key,
            kind: MemberKind::Node,
            org,
            name: name.to_string(),
            role: None,
            enrolled_at: Utc::now(),
            revoked_at: None,
        })
    }

    /// Enrolls a node or signer key.
    pub fn enroll(&self, member: Member) -> Result<(), EnrollmentError> {
        self.admin.enroll(member)
    }

    /// Revokes a key; its connections are closed at once.
    pub fn revoke(&self, key: &NodeId) -> Result<Member, EnrollmentError> {
        self.admin.revoke(key)
    }

    /// Issues a one-time join code for a node of `org` named `name`.
    pub fn join_code(&self, org: OrgId, name: &str, ttl: chrono::Duration) -> Result<JoinCode, EnrollmentError> {
        let secret = self.admin.issue_join(org, name, ttl)?;
        Ok(JoinCode { secret, relay_key: self.relay_key, relay_addresses: vec![self.local_addr.to_string()] })
    }

    /// The enrollment directory as stored now (what `samverkan-relay list` shows).
    pub fn directory(&self) -> Result<EnrollmentDirectory, EnrollmentError> {
        self.admin.directory()
    }

    /// The address of the admin HTTP server, if one runs.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// A status snapshot (what `/api/status` serves); may block briefly on storage.
    pub fn status(&self) -> RelayStatus {
        (self.status)()
    }

    /// Replaces the resolver that names nodes (by default the enrollment directory).
    pub fn set_name_resolver(&self, resolver: Option<Arc<dyn NameResolver>>) {
        self.monitor.set_resolver(resolver);
    }

    /// Stops accepting, closes every connection (persisting its sync state) and waits.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let _ = self.task.await;
    }

    /// Waits until the relay stops (e.g. after Ctrl-C handling elsewhere).
    pub async fn wait(self) {
        let _ = self.task.await;
    }

    /// A sender that stops the relay when `true` is sent.
    pub fn shutdown_signal(&self) -> watch::Sender<bool> {
        self.shutdown.clone()
    }
}

/// Loads the relay's key from its data directory, making one at first start.
pub fn load_or_create_key(data_dir: &std::path::Path) -> Result<NodeKey, RelayError> {
    keyfile::create_private_dir(data_dir)?;
    Ok(keyfile::load_or_create(&data_dir.join(enrollment::KEY_FILE))?)
}

/// Starts a relay on the storage its configuration names (by default the
/// embedded SQLite database in its data directory).
pub async fn spawn(config: RelayConfig) -> Result<RelayHandle, RelayError> {
    keyfile::create_private_dir(&config.data_dir)?;
    match &config.storage {
        StorageLocation::Sqlite => {
            // One relay process per SQLite file: it keeps documents loaded without a look at the file per message.
            let lock = lock_data_dir(&config.data_dir)?;
            let storage = SqliteStorage::open(&config.data_dir.join(DB_FILE), config.cached_documents)?;
            start(config, storage, Some(lock)).await
        }
        StorageLocation::Postgres(url) => {
            let (url, cache, pool) = (url.clone(), config.cached_documents, config.postgres_pool_size);
            // Connecting blocks: not on a runtime worker.
            let storage = tokio::task::spawn_blocking(move || PostgresStorage::open_with_pool(&url, cache, pool))
                .await
                .map_err(|e| StoreError::Backend { backend: "postgresql", message: e.to_string() })??;
            spawn_with_storage(config, storage).await
        }
    }
}

/// Starts a relay on any storage implementation.
pub async fn spawn_with_storage<S: RelayStorage>(config: RelayConfig, storage: S) -> Result<RelayHandle, RelayError> {
    start(config, storage, None).await
}

/// [`spawn_with_storage`], holding `data_dir_lock` until the relay has stopped
/// (its accepting task holds it; [`RelayHandle::shutdown`] waits for that task).
async fn start<S: RelayStorage>(
    config: RelayConfig,
    mut storage: S,
    data_dir_lock: Option<std::fs::File>,
) -> Result<RelayHandle, RelayError> {
    config.content.validate(config.limits.max_frame as u64)?;
    storage.set_content_limits(config.content);
    let relay_key = load_or_create_key(&config.data_dir)?;
    backfill_receipts(&storage, &relay_key)?;
    let identity = TlsIdentity::new(relay_key.signing_key(), tls::SERVER_NAME)?;
    let endpoint = samverkan_net::endpoint::server_endpoint(config.listen, &identity, &config.limits)?;
    let local_addr = endpoint.local_addr().map_err(|e| NetError::Io(e.to_string()))?;
    let directory_read_at = storage.external_changes()?;
    let directory = enrollment::directory(&storage)?;
    let signed = directory.sign(relay_key.signing_key()).encode();
    let relay_id = relay_key.node_id();
    let monitor = Arc::new(Monitor::new(&config.monitoring, config.data_dir.join(DB_FILE)));
    monitor.seed(&storage)?;
    let shared = Arc::new(Shared {
        storage,
        storage_threads: tokio::sync::Semaphore::new(STORAGE_THREADS),
        hub: Hub::default(),
        software: format!("samverkan-relay {}", crate::VERSION),
        relay_key,
        directory: RwLock::new(DirectoryCache::new(directory, signed)),
        directory_read_at: Mutex::new(directory_read_at),
        monitor: monitor.clone(),
        max_connections_per_key: config.max_connections_per_key,
        orgs: enrollment::organisations(&config.data_dir)?,
        sync_limits: SyncLimits {
            max_frame: config.limits.max_frame,
            max_change_ops: config.max_change_ops,
            max_ops: config.max_message_ops,
            ..SyncLimits::for_content(&config.content)
        },
        content: config.content,
        budget: ReceiveBudget::new(config.receive_rate_per_key, config.receive_burst_per_key),
        record_keys: RecordKeys::default(),
        start_window: start_window(config.cached_documents),
    });
    // A node is judged only on the documents it is a party to (its organisation from the directory).
    let orgs = Arc::downgrade(&shared);
    monitor.set_node_org(Some(Arc::new(move |node: &str| {
        let shared = orgs.upgrade()?;
        let key: NodeId = node.parse().ok()?;
        let cache = shared.directory();
        cache.directory.latest(&key).map(|m| m.org.clone())
    })));
    watch_other_instances(&shared)?;
    if config.monitoring.resolver.is_none() && config.monitoring.names.is_empty() {
        // Nodes are named from the enrollment directory unless the caller names them.
        monitor.set_resolver(Some(Arc::new(EnrolledNames(Arc::downgrade(&shared)))));
    }
    let (shutdown, mut stop) = watch::channel(false);
    let status_shared = shared.clone();
    let status: crate::admin::StatusSource = Arc::new(move || status_shared.monitor.snapshot(&status_shared.storage));
    let admin_addr =
        crate::admin::start(config.monitoring.admin.as_ref(), monitor.clone(), status.clone(), shutdown.subscribe())
            .await?;
    let limits = config.limits.clone();
    let max_connections = config.max_connections;
    // Handshakes nobody finishes may hold at most half of the connection slots.
    let retry_above = config.handshakes_before_retry.min(max_connections / 2);
    let gate = HandshakeGate::new(
        retry_above,
        config.handshakes_per_address,
        Some(monitor.metrics().handshakes_in_progress.clone()),
    );
    let accept_shared = shared.clone();
    let mut directory_poll = tokio::time::interval(config.directory_poll);
    directory_poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    info!(%local_addr, relay_key = %relay_id, "relay listening");
    let task = tokio::spawn(
        async move {
            let _data_dir_lock = data_dir_lock;
            let mut connections = JoinSet::new();
            loop {
                tokio::select! {
                    _ = stop.changed() => break,
                    _ = directory_poll.tick() => {
                        let refreshed = on_storage_thread(&accept_shared, |shared| shared.refresh_directory_if_changed()).await;
                        if let Ok(Err(e)) = refreshed {
                            warn!(error = %e, "could not re-read the enrollment directory");
                        }
                    }
                    incoming = endpoint.accept() => {
                        let Some(incoming) = incoming else { break };
                        if connections.len() >= max_connections {
                            // Counted, and logged at most every few seconds however fast they come.
                            if let Some(suppressed) = accept_shared.monitor.connection_refused("too many connections") {
                                warn!(max_connections, suppressed, "refusing connections: the limit is reached");
                            }
                            incoming.refuse();
                            continue;
                        }
                        let remote = incoming.remote_address();
                        let validated = incoming.remote_address_validated();
                        let metrics = accept_shared.monitor.metrics();
                        let ticket = match gate.admit(remote.ip(), validated, incoming.may_retry()) {
                            Admission::Accept(ticket) => ticket,
                            Admission::Retry => {
                                // Stateless: a client that owns its address comes back with the token.
                                metrics.handshakes_retried.inc();
                                if incoming.retry().is_err() {
                                    let _ = accept_shared.monitor.connection_refused("could not send a Retry");
                                }
                                continue;
                            }
                            Admission::Refuse => {
                                let reason = if validated { "too many handshakes from one address" } else { "unvalidated address under load" };
                                if let Some(suppressed) = accept_shared.monitor.connection_refused(reason) {
                                    warn!(%remote, suppressed, reason, "refusing connections");
                                }
                                incoming.refuse();
                                continue;
                            }
                        };
                        let shared = accept_shared.clone();
                        let limits = limits.clone();
                        let mut stopping = stop.clone();
                        connections.spawn(
                            async move {
                                // Bounded: a handshake nobody finishes holds its slot only this long.
                                let handshake = tokio::select! {
                                    done = tokio::time::timeout(limits.handshake_timeout, incoming) => done,
                                    _ = stopping.changed() => return,
                                };
                                match handshake {
                                    // The ticket is held until the peer is authenticated.
                                    Ok(Ok(conn)) => serve(conn, shared, limits, ticket).await,
                                    Ok(Err(e)) => {
                                        let _ = shared.monitor.connection_refused("handshake failed");
                                        debug!(error = %e, "handshake failed");
                                    }
                                    Err(_) => {
                                        let _ = shared.monitor.connection_refused("handshake timed out");
                                        debug!(timeout = ?limits.handshake_timeout, "handshake timed out");
                                    }
                                }
                            }
                            .instrument(info_span!("connection", %remote)),
                        );
                    }
                    Some(_) = connections.join_next(), if !connections.is_empty() => {}
                }
            }
            accept_shared.hub.close_all("the relay is shutting down; reconnect later");
            while tokio::time::timeout(Duration::from_secs(5), connections.join_next()).await.ok().flatten().is_some() {
            }
            endpoint.close(0u32.into(), b"relay shutting down");
            endpoint.wait_idle().await;
        }
        .instrument(info_span!("relay", %local_addr)),
    );
    Ok(RelayHandle { local_addr, relay_key: relay_id, shutdown, task, admin: shared, monitor, status, admin_addr })
}

/// Subscribes to what other relay instances sharing the storage commit (a
/// storage that is not shared never calls back): their document changes reach
/// this instance's connections as a local change would, their directory changes
/// (an enrollment, a revocation, a used join code) are read at once, and a
/// connection they ask to close (the node's per-key limit) is closed.
fn watch_other_instances<S: RelayStorage>(shared: &Arc<Shared<S>>) -> Result<(), StoreError> {
    let weak = Arc::downgrade(shared);
    let on_event = Arc::new(move |event: RemoteEvent| {
        let Some(shared) = weak.upgrade() else { return };
        match event {
            RemoteEvent::DocChanged(doc) => match shared.storage().entry(&doc) {
                Ok(Some(entry)) => {
                    shared.monitor.doc_changed(&doc, &entry.heads);
                    shared.hub.changed_elsewhere(&doc, &entry.parties);
                }
                Ok(None) => {}
                Err(e) => warn!(%doc, error = %e, "could not read a document another instance changed"),
            },
            RemoteEvent::MetaChanged => {
                if let Err(e) = shared.refresh_directory_if_changed() {
                    warn!(error = %e, "could not re-read the enrollment directory");
                }
            }
            RemoteEvent::Missed => {
                if let Err(e) = shared.refresh_directory_if_changed() {
                    warn!(error = %e, "could not re-read the enrollment directory");
                }
                // Every document may have changed meanwhile: each connection compares.
                match shared.storage().index() {
                    Ok(index) => index.iter().for_each(|entry| shared.hub.changed_elsewhere(&entry.id, &entry.parties)),
                    Err(e) => warn!(error = %e, "could not list documents after missed notifications"),
                }
            }
            RemoteEvent::Close { conn, reason } => {
                if shared.hub.close_connection(conn, &reason) {
                    info!(conn, "closing a connection (per-key limit, across instances)");
                }
            }
        }
    });
    if shared.storage().watch_remote(on_event)? {
        info!("storage shared with other relay instances: listening for their commits");
    }
    Ok(())
}

/// Records an established connection in the storage and closes this node's
/// oldest connections beyond the per-key limit, counted across every relay
/// instance sharing the storage (the local hub already holds it locally).
fn limit_connections_across_instances<S: RelayStorage>(shared: &Shared<S>, peer: &str, id: u64) {
    let closing = shared.storage().connection_opened(peer, id, shared.max_connections_per_key);
    match closing {
        Ok(Some(local)) => {
            for old in local {
                shared.hub.close_connection(old, "replaced by a newer connection of this node");
            }
        }
        Ok(None) => {}
        Err(e) => warn!(error = %e, "could not record the connection in the shared storage"),
    }
}

/// Metadata key set once every record stored before receipts existed has one.
const META_RECEIPTS_BACKFILLED: &str = "approval_receipts.backfilled";

/// Gives every approval record the relay holds without a receipt one dated
/// now (never earlier than the relay first noticed it). Runs once, at the
/// first start of a relay version with receipts; records stored later get
/// theirs in the transaction that stores them.
pub fn backfill_receipts<S: RelayStorage>(storage: &S, relay_key: &NodeKey) -> Result<usize, StoreError> {
    if storage.meta(META_RECEIPTS_BACKFILLED)?.is_some() {
        return Ok(0);
    }
    let mut issued = 0;
    for entry in storage.index()? {
        let held: std::collections::BTreeSet<String> =
            storage.receipts(&entry.id)?.into_iter().map(|r| r.record_signature).collect();
        let found = storage.with_doc(&entry.id, false, |d| {
            let records: Vec<String> = approval::records(d)
                .into_iter()
                .filter_map(|(_, r)| r.ok())
                .filter(|r| r.verify_signature(d.id()).is_ok() && !held.contains(&r.signature))
                .map(|r| r.signature)
                .collect();
            Ok::<_, StoreError>((records, Vec::new(), Vec::new()))
        })?;
        let now = Utc::now();
        let receipts: Vec<ApprovalReceipt> = found
            .unwrap_or_default()
            .iter()
            .filter_map(|record| ApprovalReceipt::issue(relay_key, &entry.id, record, now).ok())
            .collect();
        issued += storage.add_receipts(&receipts)?;
    }
    storage.update_meta(META_RECEIPTS_BACKFILLED, |_| Ok::<_, StoreError>(Some(Utc::now().to_rfc3339())))?;
    if issued > 0 {
        info!(issued, "issued receipts for approval records stored before receipts existed");
    }
    Ok(issued)
}

/// Names nodes for monitoring from the enrollment directory.
struct EnrolledNames<S>(std::sync::Weak<Shared<S>>);

impl<S: RelayStorage> NameResolver for EnrolledNames<S> {
    fn resolve(&self, node: &str) -> Option<NodeName> {
        let shared = self.0.upgrade()?;
        let key: NodeId = node.parse().ok()?;
        let cache = shared.directory();
        let member = cache.directory.latest(&key)?;
        let organisation = shared.orgs.name_of(&member.org).to_string();
        Some(NodeName { organisation, name: member.name.clone() })
    }
}

/// Reaches the relay's documents from one connection: only those whose
/// parties include the connection's organisation.
struct RelayDocs<'a, S> {
    storage: &'a S,
    org: &'a OrgId,
    /// For checking approval records a node sends (see [`samverkan_shared::approval`]).
    directory: &'a RwLock<DirectoryCache>,
    /// Signs the receipts of new approval records.
    relay_key: &'a NodeKey,
    /// The approval records of the version before a change, without parsing them at every step.
    record_keys: &'a RecordKeys,
    /// The sync steps all connections share (a change passed on to every
    /// caught-up node is worked out once).
    sync_memo: &'a Arc<SyncMemo>,
    /// Whether a document was not at hand in memory (loaded and free) when asked for.
    missed_loaded: bool,
    /// Where the connections of a changed document's parties are woken.
    hub: &'a Hub,
    /// The connection these steps are for, once it has joined the hub: the
    /// others are woken as soon as a change it sent is durable.
    connection: Option<ConnectionId>,
}

impl<'a, S: RelayStorage> RelayDocs<'a, S> {
    /// The documents as the connections of `org` see them.
    fn new(shared: &'a Shared<S>, org: &'a OrgId) -> Self {
        RelayDocs {
            storage: &shared.storage,
            org,
            directory: &shared.directory,
            relay_key: &shared.relay_key,
            record_keys: &shared.record_keys,
            sync_memo: &shared.monitor.metrics().sync_memo,
            missed_loaded: false,
            hub: &shared.hub,
            connection: None,
        }
    }

    fn storage(&self) -> &S {
        self.storage
    }
}

impl<S: RelayStorage> DocAccess for RelayDocs<'_, S> {
    type Error = DocAccessError;

    fn sync_memo(&self) -> Option<Arc<SyncMemo>> {
        Some(self.sync_memo.clone())
    }

    fn shared_heads(&mut self) -> Result<Vec<(DocId, Vec<ChangeHash>)>, DocAccessError> {
        let index = self.storage().index()?;
        Ok(index.into_iter().filter(|e| e.parties.contains(self.org)).map(|e| (e.id, e.heads)).collect())
    }

    fn authors(&mut self) -> AuthorPolicy {
        // New changes must come from nodes that are active now.
        let cache = self.directory.read().unwrap_or_else(|e| e.into_inner());
        AuthorPolicy::new(cache.directory.clone(), AuthorRule::ActiveNode)
    }

    fn may_receive(&mut self, doc: &DocId) -> bool {
        match self.storage().is_party(doc, self.org) {
            Ok(Some(party)) => party,
            // New here: allowed if, once received, it names the sender's organisation.
            Ok(None) => true,
            Err(_) => false,
        }
    }

    fn with_doc<R>(
        &mut self,
        doc: &DocId,
        create: bool,
        f: impl FnOnce(&mut AutoCommit) -> DocOutcome<R>,
    ) -> Result<Option<R>, DocAccessError> {
        let org = self.org;
        let directory_lock = self.directory;
        let relay_key = self.relay_key;
        let storage = self.storage();
        let is_new = match storage.is_party(doc, org)? {
            Some(false) => return Ok(None),
            Some(true) => false,
            None => true,
        };
        let record_keys = self.record_keys;
        let mut discarded = None;
        let mut applied = false;
        let result = storage.with_doc(doc, create, |d| {
            let heads_before = d.heads();
            let approvals_before = record_keys.of(doc, d);
            match f(d.automerge_mut()) {
                // Nothing applied (an outgoing message, an acknowledgement): nothing to check.
                DocOutcome::Keep { value, signatures, .. } if d.heads() == heads_before => Ok((value, signatures, Vec::new())),
                DocOutcome::Keep { value, signatures, .. } => {
                    // New approval or withdrawal records must verify against the enrollment directory.
                    let directory = directory_lock.read().unwrap_or_else(|e| e.into_inner());
                    let now = Utc::now();
                    if let Err(problem) = approval::check_new_records(d, &approvals_before, &directory.directory, now)
                    {
                        return Err(DocAccessError::Forbidden(format!(
                            "an approval in document {doc} was refused: {problem}; nothing of this change was stored"
                        )));
                    }
                    // Each accepted record gets the relay's receipt, stored in this transaction.
                    let receipts = approval::new_records(d, &approvals_before)
                        .iter()
                        .map(|r| ApprovalReceipt::issue(relay_key, doc, &r.signature, now))
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(|e| DocAccessError::Forbidden(format!("an approval in document {doc}: {e}")))?;
                    if is_new && !d.is_empty() && !d.parties().map_err(StoreError::from)?.contains(org) {
                        return Err(DocAccessError::NotAParty(format!(
                            "new document {doc} does not name your organisation ({org}) among its parties; it was not stored"
                        )));
                    }
                    applied = true;
                    Ok((value, signatures, receipts))
                }
                DocOutcome::Discard(value) => {
                    discarded = Some(value);
                    Err(DocAccessError::Discarded)
                }
            }
        });
        if let (Ok(Some(_)), true, Some(from)) = (&result, applied, self.connection) {
            // Durable now: the parties' other connections start passing it on
            // while this one still answers its sender.
            let parties = storage.entry(doc)?.map(|entry| entry.parties).unwrap_or_default();
            self.hub.changed(from, doc, &parties);
        }
        match discarded {
            Some(value) => Ok(Some(value)),
            None => result,
        }
    }

    fn signatures(
        &mut self,
        _doc: &DocId,
        changes: &[(ChangeHash, ActorId)],
    ) -> Result<Vec<SignedChange>, DocAccessError> {
        let hashes: Vec<ChangeHash> = changes.iter().map(|(hash, _)| *hash).collect();
        Ok(self.storage().signatures(&hashes)?)
    }

    fn receipts(&mut self, doc: &DocId) -> Result<Vec<ReceiptEntry>, DocAccessError> {
        let storage = self.storage();
        match storage.is_party(doc, self.org)? {
            Some(true) => Ok(storage.receipts(doc)?.iter().filter_map(ApprovalReceipt::to_wire).collect()),
            _ => Ok(Vec::new()),
        }
    }

    fn stored_whole(&mut self, doc: &DocId) -> Result<Option<StoredWhole>, DocAccessError> {
        let storage = self.storage();
        match storage.is_party(doc, self.org)? {
            Some(true) => Ok(storage.stored_whole(doc)?),
            _ => Ok(None),
        }
    }

    fn heads(&mut self, doc: &DocId) -> Result<Option<Vec<ChangeHash>>, DocAccessError> {
        // From the index, without loading the document; only documents this node may see.
        Ok(self.storage().entry(doc)?.filter(|entry| entry.parties.contains(self.org)).map(|entry| entry.heads))
    }

    fn refusal(&self, error: &DocAccessError) -> Option<(RefusalKind, String)> {
        match error {
            DocAccessError::Forbidden(reason) => Some((RefusalKind::ChangesRefused, reason.clone())),
            DocAccessError::NotAParty(reason) => Some((RefusalKind::NotShared, reason.clone())),
            DocAccessError::Store(StoreError::TooLarge(limit)) => Some((RefusalKind::TooLarge, limit.to_string())),
            DocAccessError::Store(_) | DocAccessError::Discarded => None,
        }
    }
}

/// The same access as [`DocAccess`], from memory only (see [`RelayStorage::try_with_loaded`]).
impl<S: RelayStorage> MemoryAccess for RelayDocs<'_, S> {
    fn try_loaded_doc<R>(&mut self, doc: &DocId, f: impl FnOnce(&mut AutoCommit) -> R) -> Option<R> {
        if self.storage().cached_is_party(doc, self.org)? != Some(true) {
            return None;
        }
        let done = self.storage().try_with_loaded(doc, |d| f(d.automerge_mut()));
        self.missed_loaded |= done.is_none();
        done
    }

    fn try_signatures(&mut self, _doc: &DocId, changes: &[(ChangeHash, ActorId)]) -> Option<Vec<SignedChange>> {
        let hashes: Vec<ChangeHash> = changes.iter().map(|(hash, _)| *hash).collect();
        self.storage().cached_signatures(&hashes)
    }

    fn try_receipts(&mut self, doc: &DocId) -> Option<Vec<ReceiptEntry>> {
        match self.storage().cached_is_party(doc, self.org)? {
            Some(true) => {
                Some(self.storage().cached_receipts(doc)?.iter().filter_map(ApprovalReceipt::to_wire).collect())
            }
            _ => Some(Vec::new()),
        }
    }

    fn try_absent(&mut self, doc: &DocId) -> Option<bool> {
        // Not stored: any node may send it (`may_receive`), and nothing is held back here.
        Some(self.storage().cached_is_party(doc, self.org)?.is_none())
    }
}

/// What serving one connection keeps beside the protocol state: its place in
/// the hub (once the handshake is done), its monitoring watch, and once its
/// sync states were restored, the organisation whose states to persist.
struct ConnectionState {
    member: Option<(u64, Arc<Mailbox>)>,
    watch: ConnectionWatch,
    persist: Option<OrgId>,
}

/// The node a connection proved to be, as enrolled.
struct Authenticated {
    key: NodeId,
    member: Member,
}

/// Why a connection was not admitted: a short phrase for the relay's log and
/// the full explanation the peer gets in an `Error` frame.
struct Refusal {
    reason: &'static str,
    code: ErrorCode,
    message: String,
}

impl Refusal {
    fn new(reason: &'static str, code: ErrorCode, message: impl Into<String>) -> Self {
        Self { reason, code, message: message.into() }
    }

    /// Queues the `Error` frame for the peer and gives the connection's end.
    fn send(self, sync: &mut SyncConnection) -> ConnectionEnd {
        sync.push_error(self.code, self.message);
        ConnectionEnd::NotAdmitted { reason: self.reason }
    }
}

/// Serves one node connection until it ends.
///
/// Every close carries its reason: an `Error` frame on the stream when there
/// is one (whatever ended the connection, unless the peer reported the error
/// itself), and the reason in the QUIC close in any case.
async fn serve<S: RelayStorage>(
    conn: quinn::Connection,
    shared: Arc<Shared<S>>,
    limits: Limits,
    ticket: HandshakeTicket,
) {
    let Some(key) = tls::peer_key(&conn).and_then(|k| NodeId::from_bytes(&k).ok()) else {
        refused(&shared.monitor, "no usable client key", None);
        conn.close(1u32.into(), b"no usable client key: an ed25519 client certificate is required");
        return;
    };
    let (mut send, mut recv) = match framed::accept(&conn, &limits).await {
        Ok(halves) => halves,
        Err(e) => {
            // No stream to send an Error frame on: the reason goes in the close.
            debug!(node = %key.short(), error = %e, "no stream opened");
            // A peer that hung up after the handshake (`samverkan-node status` probes so) was not refused.
            if matches!(e, NetError::NoStream(_)) {
                refused(&shared.monitor, "no sync stream", Some(&key));
            }
            conn.close(1u32.into(), b"no sync stream opened within the handshake timeout");
            return;
        }
    };
    let mut sync = SyncConnection::relay(&shared.software);
    sync.set_limits(shared.sync_limits.clone());
    sync.set_start_window(shared.start_window);
    sync.announce_limits(shared.content);
    let mut state =
        ConnectionState { member: None, watch: shared.monitor.connection(conn.remote_address()), persist: None };
    // Before the peer is known to be enrolled, its first frame may have at most
    // MAX_PREAUTH_FRAME bytes: an unknown peer makes the relay hold kilobytes, not megabytes.
    let first = tokio::time::timeout(limits.handshake_timeout, recv.recv_with_limit(framed::MAX_PREAUTH_FRAME)).await;
    let result = match first {
        Err(_) => Err(Refusal::new(
            "no first frame in time",
            ErrorCode::Unauthenticated,
            format!("no Hello or Join within the handshake timeout ({:?})", limits.handshake_timeout),
        )
        .send(&mut sync)),
        Ok(Err(NetError::Wire(WireError::FrameTooLarge { len, max }))) => Err(Refusal::new(
            "first frame too large",
            ErrorCode::TooLarge,
            format!(
                "the first frame (Hello or Join) may have at most {max} bytes before authentication; this one announced {len}"
            ),
        )
        .send(&mut sync)),
        Ok(Err(NetError::Wire(wire))) => Err(Refusal::new(
            "bad first frame",
            wire.error_code(),
            format!("bad frame: {wire}"),
        )
        .send(&mut sync)),
        Ok(Err(_)) => Err(Refusal::new(
            "connection lost before the first frame",
            ErrorCode::Unauthenticated,
            "the stream failed before a Hello or Join arrived",
        )
        .send(&mut sync)),
        Ok(Ok(None)) => Err(Refusal::new(
            "stream ended before the first frame",
            ErrorCode::Unauthenticated,
            "the stream ended without a Hello or Join",
        )
        .send(&mut sync)),
        Ok(Ok(Some(Frame::Join { protocol, secret, org, .. }))) => {
            match on_storage_thread(&shared, move |shared| join(shared, key, protocol, &secret, &org)).await {
                Ok(joined) => joined.map_err(|refusal| refusal.send(&mut sync)).map(|signed| {
                    sync.push_directory(signed);
                }),
                Err(end) => Err(end),
            }
        }
        Ok(Ok(Some(first))) => match on_storage_thread(&shared, move |shared| {
            let auth = refresh_then_authenticate(shared, key, &first);
            auth.map(|auth| (auth, first))
        })
        .await
        {
            Err(end) => Err(end),
            Ok(Ok((auth, first))) => {
                // Authenticated: no longer counted among the connections of unknown peers.
                drop(ticket);
                // A key that made the relay read more than its share waits (with the small
                // pre-authentication window) until it has regained it: reconnecting does not help.
                let pause = shared.budget.wait(&key, Instant::now());
                if !pause.is_zero() {
                    tokio::time::sleep(pause).await;
                }
                // Admitted: from here frames up to the configured maximum, and the full flow-control window.
                endpoint::admit(&conn, &limits);
                let span = info_span!("node", node = %auth.key.short(), org = %auth.member.org);
                let mut served = Some(Served { sync, state });
                let result = run(&mut served, first, &mut send, &mut recv, &shared, Arc::new(auth)).instrument(span).await;
                let Some(back) = served else {
                    // Lost with a storage thread (the relay is stopping): nothing to persist.
                    conn.close(1u32.into(), b"the relay is shutting down; reconnect later");
                    return;
                };
                (sync, state) = (back.sync, back.state);
                result
            }
            Ok(Err(refusal)) => Err(refusal.send(&mut sync)),
        },
    };
    // Whatever ended the connection, the peer gets the reason in an Error frame
    // (unless one is queued already, or the peer reported the error itself).
    let mut outbox = sync.take_outbox();
    if let Err(end) = &result {
        let reported = outbox.iter().any(|f| matches!(f, Frame::Error { .. }))
            || matches!(end, ConnectionEnd::Protocol(ConnectionError::Peer { .. }));
        if !reported {
            outbox.push(end.error_frame());
        }
    }
    let _ = send.send_all(&outbox).await;
    match &result {
        Ok(()) => info!(node = %key.short(), "node disconnected"),
        // Anyone can knock: counted per reason, and a short line at most every few seconds per reason.
        Err(ConnectionEnd::NotAdmitted { reason }) => refused(&shared.monitor, reason, Some(&key)),
        Err(e) => warn!(node = %key.short(), error = %e, "connection closed"),
    }
    if let Some((id, _)) = state.member {
        shared.hub.leave(id);
        if let Err(e) = shared.storage().connection_closed(id) {
            warn!(error = %e, "could not record the connection's end in the storage");
        }
    }
    let mut watch = state.watch;
    watch.update(&mut sync, recv.bytes(), send.bytes());
    let error = result.as_ref().err().map(ToString::to_string);
    let persist = state.persist.map(|org| (org, sync.into_persisted()));
    let closed = on_storage_thread(&shared, move |shared| {
        watch.closed(error, &shared.storage);
        if let Some((org, states)) = persist {
            let storage = shared.storage();
            let saved = shared_states(storage, &org, states)
                .and_then(|states| storage.save_sync_states(&key.to_string(), states));
            if let Err(e) = saved {
                warn!(node = %key.short(), error = %e, "could not persist sync states");
            }
        }
    });
    if closed.await.is_err() {
        warn!(node = %key.short(), "the relay stopped before the node's sync states were persisted");
    }
    let _ = send.finish().await;
    let (code, reason) = match &result {
        Ok(()) => (0u32, "the node ended the sync stream".to_string()),
        Err(e) => (1u32, e.to_string()),
    };
    conn.close(code.into(), close_reason(&reason));
}

/// Counts a refused connection and logs it if a line is due (see [`Monitor::connection_refused`]).
fn refused(monitor: &Monitor, reason: &'static str, key: Option<&NodeId>) {
    if let Some(suppressed) = monitor.connection_refused(reason) {
        let node = key.map(NodeId::short).unwrap_or_default();
        info!(reason, %node, suppressed, "connection not admitted");
    }
}

/// A QUIC close reason: the text, cut at a character boundary to fit in one packet.
fn close_reason(text: &str) -> &[u8] {
    const MAX: usize = 200;
    let mut end = text.len().min(MAX);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text.as_bytes()[..end]
}

/// The sync states worth keeping for a node of `org`: those of documents the
/// relay holds and shares with that organisation (a state for anything else is
/// of no use, and a node could name any number of such documents).
fn shared_states<S: RelayStorage>(
    storage: &S,
    org: &OrgId,
    states: Vec<(DocId, Vec<u8>)>,
) -> Result<Vec<(DocId, Vec<u8>)>, StoreError> {
    let mut kept = Vec::with_capacity(states.len());
    for (doc, state) in states {
        if storage.entry(&doc)?.is_some_and(|entry| entry.parties.contains(org)) {
            kept.push((doc, state));
        }
    }
    Ok(kept)
}

/// [`authenticate`] against the directory as stored now: the operator may have
/// enrolled or revoked the key from another process a moment ago.
fn refresh_then_authenticate<S: RelayStorage>(
    shared: &Shared<S>,
    key: NodeId,
    first: &Frame,
) -> Result<Authenticated, Refusal> {
    if let Err(e) = shared.refresh_directory_if_changed() {
        warn!(error = %e, "could not re-read the enrollment directory");
    }
    authenticate(shared, key, first)
}

/// Checks that the connection's key is an enrolled, unrevoked node and that
/// its first frame is a `Hello` naming that key.
fn authenticate<S: RelayStorage>(shared: &Shared<S>, key: NodeId, first: &Frame) -> Result<Authenticated, Refusal> {
    let Frame::Hello { node, .. } = first else {
        return Err(Refusal::new(
            "wrong first frame",
            ErrorCode::Unauthenticated,
            format!("expected Hello or Join first, got {}", first.name()),
        ));
    };
    if node.trim() != key.to_string() {
        return Err(Refusal::new(
            "Hello names another key",
            ErrorCode::Unauthenticated,
            format!("Hello names node {node}, but the connection proved key {key}"),
        ));
    }
    let cache = shared.directory();
    match cache.directory.active(&key) {
        Some(member) if member.kind == MemberKind::Node => Ok(Authenticated { key, member: member.clone() }),
        Some(member) => Err(Refusal::new(
            "a signer key",
            ErrorCode::Unauthenticated,
            format!("key {} is enrolled as a signer ({}), not as a node", key.short(), member.name),
        )),
        None => Err(match cache.directory.latest(&key) {
            Some(m) => Refusal::new(
                "revoked",
                ErrorCode::Unauthenticated,
                format!(
                    "this node ({}, {}) was revoked by the relay operator at {}",
                    m.name,
                    m.org,
                    m.revoked_at.map(|t| t.to_rfc3339()).unwrap_or_default()
                ),
            ),
            None => Refusal::new(
                "not enrolled",
                ErrorCode::Unauthenticated,
                format!(
                    "this node's key {key} is not enrolled at this relay; ask the operator to run `samverkan-relay enroll --data-dir <relay data directory> --key {key} --org <organisation> --name <name>` or for a join code"
                ),
            ),
        }),
    }
}

/// Handles a `Join`: enrolls the key with the code if it was issued for the
/// organisation the node names and the key is not enrolled yet (checked in the
/// same storage transaction, before anything changes), and returns the signed
/// directory to answer with. A refused join changes nothing.
fn join<S: RelayStorage>(
    shared: &Shared<S>,
    key: NodeId,
    protocol: u16,
    secret: &[u8],
    org: &str,
) -> Result<Vec<u8>, Refusal> {
    if !protocol_served(protocol) {
        return Err(Refusal::new("join: protocol version", ErrorCode::ProtocolVersion, protocol_refusal(protocol)));
    }
    let joined = enrollment::consume_join(shared.storage(), secret, key, org, Utc::now());
    match joined {
        Ok(member) => {
            info!(node = %key.short(), org = %member.org, name = %member.name, "node joined with a join code");
            if let Err(e) = shared.refresh_directory() {
                warn!(error = %e, "could not re-read the enrollment directory");
            }
            Ok(shared.directory().signed.clone())
        }
        Err(e) => {
            let (reason, code) = match &e {
                EnrollmentError::UnknownJoinCode => ("join: unknown code", ErrorCode::Unauthenticated),
                EnrollmentError::ExpiredJoinCode(_) => ("join: expired code", ErrorCode::Unauthenticated),
                EnrollmentError::WrongOrganisation { .. } => {
                    ("join: code for another organisation", ErrorCode::Forbidden)
                }
                EnrollmentError::InvalidOrganisation(_) => ("join: bad organisation", ErrorCode::Malformed),
                EnrollmentError::AlreadyEnrolled { .. } => ("join: key already enrolled", ErrorCode::Forbidden),
                EnrollmentError::Directory(_) => ("join: refused by the directory", ErrorCode::Unauthenticated),
                EnrollmentError::Store(_) | EnrollmentError::Corrupt(_) | EnrollmentError::Organisations { .. } => {
                    warn!(node = %key.short(), error = %e, "could not record a join");
                    return Err(Refusal::new(
                        "join: storage failed",
                        ErrorCode::Internal,
                        "the relay could not record the join; nothing was enrolled; try again later",
                    ));
                }
            };
            Err(Refusal::new(reason, code, e.to_string()))
        }
    }
}

/// One connection's protocol state and what serving it keeps: moved to a
/// storage thread for each step, and back.
struct Served {
    sync: SyncConnection,
    state: ConnectionState,
}

/// What a connection acts on: a frame from its node, or documents that
/// changed through other connections.
enum Input {
    Frame(Frame),
    Changed(std::collections::BTreeSet<DocId>),
}

/// The connection's loop: sends what the protocol queued, waits for a frame
/// or for changes (within the key's receive budget), and hands each to
/// [`step`] on a storage thread. `served` is `None` only if a step was lost
/// with its thread (the relay is stopping).
async fn run<S: RelayStorage>(
    served: &mut Option<Served>,
    hello: Frame,
    send: &mut FramedSend,
    recv: &mut FramedRecv,
    shared: &Arc<Shared<S>>,
    auth: Arc<Authenticated>,
) -> Result<(), ConnectionEnd> {
    let mut next = Some(hello);
    let mut charged = recv.bytes();
    loop {
        let Some(current) = served.as_mut() else { return Err(ConnectionEnd::ShuttingDown) };
        // One step's frames in one write: they leave in one packet, not one each.
        send.send_all(&current.sync.take_outbox()).await?;
        current.state.watch.update(&mut current.sync, recv.bytes(), send.bytes());
        // Frames already buffered are handled without waiting: take turns with the
        // other connections after each, so that a peer sending back to back never
        // holds a worker (or the storage) for longer than one frame.
        tokio::task::yield_now().await;
        let mailbox = current.state.member.as_ref().map(|(_, m)| m.clone());
        // Past its share of reading (see `crate::budget`), the key is not read from for a
        // while; changes of others are still passed on to it meanwhile.
        let pause = shared.budget.wait(&auth.key, Instant::now());
        let input = match next.take() {
            Some(frame) if pause.is_zero() => Input::Frame(frame),
            // A frame read but past the budget (its operations) waits, unread frames behind it.
            waiting => {
                next = waiting;
                tokio::select! {
                    step = recv.read_step(DECODE_ON_WORKER_UP_TO, READ_BETWEEN_CHARGES), if pause.is_zero() && next.is_none() => match step.map_err(|e| report_bad_frame(&mut current.sync, e))? {
                        ReadStep::Partial => {
                            // In the middle of a large frame: pay for what was read, and wait
                            // (with the rest unread, held back by flow control) if that was too much.
                            shared.budget.charge_bytes(&auth.key, recv.bytes() - charged, Instant::now());
                            charged = recv.bytes();
                            continue;
                        }
                        ReadStep::Frame(Some(received)) => {
                            shared.budget.charge(&auth.key, recv.bytes() - charged, Instant::now());
                            charged = recv.bytes();
                            let limits = &shared.sync_limits;
                            let (frame, ops) = match received {
                                Received::Frame(frame) => {
                                    let ops = operations_of(&frame, limits);
                                    (frame, ops)
                                }
                                Received::Undecoded(raw) => {
                                    let (decoded, ops) = decode_off_worker(raw, limits.clone()).await?;
                                    (decoded.map_err(|e| report_bad_frame(&mut current.sync, e.into()))?, ops)
                                }
                            };
                            // Automerge's work is per operation, and a few bytes can carry
                            // millions: they are paid for before the frame is handled.
                            let cost = crate::budget::operations_cost(ops);
                            if cost > 0 {
                                shared.budget.charge_bytes(&auth.key, cost, Instant::now());
                                if !shared.budget.wait(&auth.key, Instant::now()).is_zero() {
                                    next = Some(frame);
                                    continue;
                                }
                            }
                            Input::Frame(frame)
                        }
                        ReadStep::Frame(None) => return Ok(()),
                    },
                    () = tokio::time::sleep(pause), if !pause.is_zero() => continue,
                    _ = wait(mailbox.as_deref()) => {
                        let Some(mailbox) = mailbox else { continue };
                        if let Some(reason) = mailbox.close_reason() {
                            let code = if reason.contains("revoked") { ErrorCode::Unauthenticated } else { ErrorCode::Busy };
                            current.sync.push_error(code, reason.clone());
                            return Err(ConnectionEnd::Refused(reason));
                        }
                        if mailbox.take_directory_changed() {
                            current.sync.push_directory(shared.directory().signed.clone());
                        }
                        let changed = mailbox.take();
                        if changed.is_empty() {
                            continue;
                        }
                        Input::Changed(changed)
                    }
                }
            }
        };
        // A change to pass on, and a node's acknowledgement, usually need
        // nothing but memory (the document loaded and free, its receipts and
        // the changes' signatures): then no trip to a storage thread. What
        // needs storage goes there as before.
        // A document in use by another connection's step from memory is free
        // again a moment later: after one turn of the others, it is tried once
        // more before the step goes to a storage thread.
        let metrics = shared.monitor.metrics();
        let mut input = Some(input);
        for attempt in 0..2 {
            if attempt > 0 {
                tokio::task::yield_now().await;
            }
            let mut memory = RelayDocs::new(shared, &auth.member.org);
            input = match input.take() {
                Some(Input::Changed(changed)) => {
                    let count = changed.len();
                    let rest: std::collections::BTreeSet<DocId> = changed
                        .into_iter()
                        .filter(|doc| current.sync.try_local_change(doc, &mut memory).is_none())
                        .collect();
                    metrics.steps_from_memory.inc_by((count - rest.len()) as u64);
                    (!rest.is_empty()).then_some(Input::Changed(rest))
                }
                Some(Input::Frame(frame)) if current.sync.try_frame(&frame, &mut memory).is_some() => {
                    metrics.steps_from_memory.inc();
                    None
                }
                other => other,
            };
            if !memory.missed_loaded {
                break;
            }
        }
        let Some(input) = input else { continue };
        metrics.steps_on_storage_threads.inc();
        let Some(mut taken) = served.take() else { return Err(ConnectionEnd::ShuttingDown) };
        let auth = auth.clone();
        let (back, result) = on_storage_thread(shared, move |shared| {
            let result = step(shared, &auth, &mut taken, input);
            (taken, result)
        })
        .await?;
        *served = Some(back);
        result?;
    }
}

/// Handles one input of a connection: the protocol's work with the storage
/// (on a storage thread, see [`on_storage_thread`]) and what its events ask
/// of the hub and the monitor.
fn step<S: RelayStorage>(
    shared: &Shared<S>,
    auth: &Authenticated,
    served: &mut Served,
    input: Input,
) -> Result<(), ConnectionEnd> {
    let Served { sync, state } = served;
    let ConnectionState { member, watch, persist } = state;
    let mut docs = RelayDocs::new(shared, &auth.member.org);
    docs.connection = member.as_ref().map(|(id, _)| *id);
    let frame = match input {
        Input::Changed(changed) => {
            for doc in changed {
                sync.on_local_change(&doc, &mut docs)?;
            }
            return Ok(());
        }
        Input::Frame(frame) => frame,
    };
    let events = sync.on_frame(frame, &mut docs)?;
    for event in events {
        match event {
            ConnectionEvent::Established { software, directory, .. } => {
                // A node that restarted may still hold connections the relay has not
                // seen die yet: the newest wins, the oldest beyond the limit are closed.
                let peer = auth.key.to_string();
                let replaced = shared.hub.close_oldest(
                    &peer,
                    shared.max_connections_per_key.saturating_sub(1),
                    "replaced by a newer connection of this node",
                );
                if replaced > 0 {
                    info!(replaced, "closing this node's oldest connections (per-key limit)");
                }
                info!(%software, "node connected");
                let stored = shared.storage().sync_states(&peer)?;
                sync.restore(shared_states(shared.storage(), &auth.member.org, stored)?);
                *persist = Some(auth.member.org.clone());
                watch.established(&peer, &software, sync);
                let joined = shared.hub.join(&peer, &auth.member.org);
                limit_connections_across_instances(shared, &peer, joined.0);
                *member = Some(joined);
                // A protocol 6 node names the directory it holds: sent only if this one differs.
                let current = shared.directory();
                if directory != Some(current.digest) {
                    sync.push_directory(current.signed.clone());
                }
                drop(current);
                sync.begin(&mut docs)?;
            }
            ConnectionEvent::DocChanged { doc, heads } => {
                // The parties' connections were woken when it was stored (`RelayDocs::with_doc`).
                debug!(%doc, "document changed; forwarding");
                shared.monitor.doc_changed(&doc, &heads);
            }
            ConnectionEvent::Refused { doc, kind, reason } => {
                // The node got a DocRefused frame; its other documents go on.
                if let Some(suppressed) = watch.doc_refused(&doc, kind, &reason, false) {
                    info!(%doc, kind = kind.label(), %reason, suppressed, "refused a document");
                }
            }
            ConnectionEvent::RefusedByPeer { doc, kind, reason, .. } => {
                if let Some(suppressed) = watch.doc_refused(&doc, kind, &reason, true) {
                    info!(%doc, kind = kind.label(), %reason, suppressed, "the node holds a document back");
                }
            }
            ConnectionEvent::Directory(_) | ConnectionEvent::Receipts { .. } => {}
        }
    }
    Ok(())
}

/// Largest frame payload decoded on an async worker, where the connection's
/// task runs: a larger frame (a `DocHeads` of a million entries takes tens of
/// milliseconds to decode) is decoded on a blocking thread, so that it holds up
/// no other connection's task queued behind it on that worker.
const DECODE_ON_WORKER_UP_TO: usize = 64 * 1024;

/// Bytes of a large frame read between two charges to the key's receive
/// budget: a key out of budget is not read from again, even in the middle of
/// a frame, so flow control holds its sender back.
const READ_BETWEEN_CHARGES: usize = 256 * 1024;

/// Decodes a large frame on a thread of tokio's blocking pool (see
/// [`DECODE_ON_WORKER_UP_TO`]).
async fn decode_off_worker(
    raw: RawFrame,
    limits: SyncLimits,
) -> Result<(Result<Frame, WireError>, Operations), ConnectionEnd> {
    let decode = move || {
        let decoded = raw.decode();
        let ops = decoded.as_ref().map_or(Operations::default(), |frame| operations_of(frame, &limits));
        (decoded, ops)
    };
    match tokio::task::spawn_blocking(decode).await {
        Ok(decoded) => Ok(decoded),
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(_) => Err(ConnectionEnd::ShuttingDown),
    }
}

/// The operations a `Sync` frame's changes carry (none for other frames, and
/// for a message that will be refused unread); see `sync::operations_in`.
fn operations_of(frame: &Frame, limits: &SyncLimits) -> Operations {
    match frame {
        Frame::Sync { message, .. } => samverkan_shared::sync::operations_in(message, limits).unwrap_or_default(),
        _ => Operations::default(),
    }
}

/// Answers undecodable bytes with a clear error frame before the connection closes.
fn report_bad_frame(sync: &mut SyncConnection, error: NetError) -> ConnectionEnd {
    if let NetError::Wire(wire) = &error {
        sync.push_error(wire.error_code(), format!("bad frame: {wire}"));
    }
    error.into()
}

async fn wait(mailbox: Option<&Mailbox>) {
    match mailbox {
        Some(m) => m.changed().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_start_window_is_a_third_of_the_documents_kept_loaded_within_bounds() {
        assert_eq!(start_window(256), START_WINDOW);
        assert_eq!(start_window(48), 16);
        assert_eq!(start_window(2), 1, "a relay keeping almost nothing loaded still starts documents");
    }
    use samverkan_shared::approval::{Action, ApprovalRecord};

    #[test]
    fn records_stored_before_receipts_existed_get_one_dated_when_first_noticed_once() {
        let dir = tempfile::tempdir().unwrap();
        let storage = SqliteStorage::open(&dir.path().join(DB_FILE), 8).unwrap();
        let relay = NodeKey::generate();
        let signer = NodeKey::generate();
        let (mut doc, ctx, orgs) = crate::record_keys::tests::agreement();
        let org = ctx.org.clone();
        let id = doc.id().clone();
        let heads = doc.heads();
        let record =
            ApprovalRecord::sign(Action::Approve, &id, &heads, &signer, org, "Landshövding", Utc::now()).unwrap();
        approval::append(&mut doc, &ctx, &orgs, &record).unwrap();
        let bytes = doc.automerge_mut().save();
        // Stored as an older relay did: no receipt.
        storage
            .with_doc(&id, true, |d| {
                d.automerge_mut().load_incremental(&bytes).map_err(|e| StoreError::Model(e.into()))?;
                Ok::<_, StoreError>(((), Vec::new(), Vec::new()))
            })
            .unwrap();
        assert!(storage.receipts(&id).unwrap().is_empty());
        let before = Utc::now() - chrono::Duration::milliseconds(1);
        assert_eq!(backfill_receipts(&storage, &relay).unwrap(), 1);
        let receipts = storage.receipts(&id).unwrap();
        assert_eq!(receipts.len(), 1);
        receipts[0].verify(&relay.node_id()).unwrap();
        assert_eq!(receipts[0].record_signature, record.signature);
        assert!(receipts[0].received_at >= before, "dated when first noticed, never earlier");
        assert_eq!(backfill_receipts(&storage, &relay).unwrap(), 0, "runs once");
    }
}
