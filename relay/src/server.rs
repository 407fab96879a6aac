//! The relay server: accepts QUIC connections from nodes and runs one
//! [`SyncConnection`] per connection against the relay's storage, fanning
//! changes out to every other connected node through the [`Hub`].
//!
//! One task per connection; a connection's failure (a broken or hostile peer)
//! closes that connection only. Storage is reached through [`RelayStorage`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use automerge::{AutoCommit, ChangeHash};
use samverkan_net::endpoint::Limits;
use samverkan_net::framed::{self, FramedRecv, FramedSend};
use samverkan_net::tls::{self, RelayCertificate};
use samverkan_net::NetError;
use samverkan_shared::ids::DocId;
use samverkan_shared::sync::{ConnectionError, ConnectionEvent, DocAccess, SyncConnection};
use samverkan_shared::wire::ErrorCode;
use samverkan_store::StoreError;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{debug, info, info_span, warn, Instrument};

use crate::hub::{Hub, Mailbox};
use crate::monitor::{ConnectionWatch, Monitor, MonitorConfig, NameResolver, RelayStatus};
use crate::storage::{RelayStorage, SqliteStorage};

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
    /// Monitoring: stale threshold, node names, admin HTTP server (see [`crate::monitor`]).
    pub monitoring: MonitorConfig,
}

impl RelayConfig {
    /// Defaults for a relay listening on `listen` with data in `data_dir`.
    pub fn new(listen: SocketAddr, data_dir: PathBuf) -> Self {
        Self {
            listen,
            data_dir,
            limits: Limits::default(),
            cached_documents: 256,
            max_connections: 4096,
            monitoring: MonitorConfig::default(),
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
    /// The data directory could not be created.
    #[error("{path}: {source}")]
    Io {
        /// The directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
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
}

/// State shared by all connection tasks.
struct Shared<S> {
    storage: Mutex<S>,
    hub: Hub,
    software: String,
    monitor: Arc<Monitor>,
}

/// A running relay.
pub struct RelayHandle {
    local_addr: SocketAddr,
    fingerprint: String,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    hub: Arc<dyn Fn() -> Vec<String> + Send + Sync>,
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

    /// SHA-256 fingerprint of the relay's certificate, for nodes to pin.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The nodes connected now (one entry per connection).
    pub fn connected(&self) -> Vec<String> {
        (self.hub)()
    }

    /// The address of the admin HTTP server, if one runs.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// A status snapshot (what `/api/status` serves); may block briefly on storage.
    pub fn status(&self) -> RelayStatus {
        (self.status)()
    }

    /// Replaces the resolver that names nodes (the seam for the enrollment directory).
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

/// Starts a relay with the embedded SQLite storage.
pub async fn spawn(config: RelayConfig) -> Result<RelayHandle, RelayError> {
    std::fs::create_dir_all(&config.data_dir)
        .map_err(|source| RelayError::Io { path: config.data_dir.clone(), source })?;
    let storage = SqliteStorage::open(&config.data_dir.join(DB_FILE), config.cached_documents)?;
    spawn_with_storage(config, storage).await
}

/// Starts a relay on any storage implementation.
pub async fn spawn_with_storage<S: RelayStorage>(config: RelayConfig, storage: S) -> Result<RelayHandle, RelayError> {
    let cert = RelayCertificate::load_or_create(&config.data_dir)?;
    let fingerprint = tls::fingerprint(&cert.cert_der);
    let endpoint = samverkan_net::endpoint::server_endpoint(config.listen, &cert, &config.limits)?;
    let local_addr = endpoint.local_addr().map_err(|e| NetError::Io(e.to_string()))?;
    let monitor = Arc::new(Monitor::new(&config.monitoring, config.data_dir.join(DB_FILE)));
    monitor.seed(&storage)?;
    let shared = Arc::new(Shared {
        storage: Mutex::new(storage),
        hub: Hub::default(),
        software: format!("samverkan-relay {}", crate::VERSION),
        monitor: monitor.clone(),
    });
    let (shutdown, mut stop) = watch::channel(false);
    let status_shared = shared.clone();
    let status: crate::admin::StatusSource = Arc::new(move || status_shared.monitor.snapshot(&status_shared.storage));
    let admin = config.monitoring.admin.as_ref();
    let admin_addr = crate::admin::start(admin, monitor.clone(), status.clone(), shutdown.subscribe()).await?;
    let limits = config.limits.clone();
    let max_connections = config.max_connections;
    let accept_shared = shared.clone();
    info!(%local_addr, %fingerprint, "relay listening");
    let task = tokio::spawn(
        async move {
            let mut connections = JoinSet::new();
            loop {
                tokio::select! {
                    _ = stop.changed() => break,
                    incoming = endpoint.accept() => {
                        let Some(incoming) = incoming else { break };
                        if connections.len() >= max_connections {
                            warn!("refusing connection: {max_connections} connections already");
                            incoming.refuse();
                            continue;
                        }
                        let shared = accept_shared.clone();
                        let limits = limits.clone();
                        let remote = incoming.remote_address();
                        connections.spawn(
                            async move {
                                match incoming.await {
                                    Ok(conn) => serve(conn, shared, limits).await,
                                    Err(e) => debug!(error = %e, "handshake failed"),
                                }
                            }
                            .instrument(info_span!("connection", %remote)),
                        );
                    }
                    Some(_) = connections.join_next(), if !connections.is_empty() => {}
                }
            }
            accept_shared.hub.close_all();
            while tokio::time::timeout(Duration::from_secs(5), connections.join_next()).await.ok().flatten().is_some() {
            }
            endpoint.close(0u32.into(), b"relay shutting down");
            endpoint.wait_idle().await;
        }
        .instrument(info_span!("relay", %local_addr)),
    );
    let hub_shared = shared.clone();
    let hub = Arc::new(move || hub_shared.hub.peers());
    Ok(RelayHandle { local_addr, fingerprint, shutdown, task, hub, monitor, status, admin_addr })
}

/// Reaches the relay's documents from one connection.
struct RelayDocs<'a, S> {
    storage: &'a Mutex<S>,
}

impl<S: RelayStorage> DocAccess for RelayDocs<'_, S> {
    type Error = StoreError;

    fn shared_heads(&mut self) -> Result<Vec<(DocId, Vec<ChangeHash>)>, StoreError> {
        self.storage.lock().unwrap_or_else(|e| e.into_inner()).heads()
    }

    fn may_receive(&mut self, _doc: &DocId) -> bool {
        // Every node may share new documents with the relay (access control comes with identities).
        true
    }

    fn with_doc<R>(
        &mut self,
        doc: &DocId,
        create: bool,
        f: impl FnOnce(&mut AutoCommit) -> R,
    ) -> Result<Option<R>, StoreError> {
        self.storage.lock().unwrap_or_else(|e| e.into_inner()).with_doc(doc, create, f)
    }
}

/// Serves one node connection until it ends.
async fn serve<S: RelayStorage>(conn: quinn::Connection, shared: Arc<Shared<S>>, limits: Limits) {
    let (mut send, mut recv) = match framed::accept(&conn, &limits).await {
        Ok(halves) => halves,
        Err(e) => {
            debug!(error = %e, "no stream opened");
            return;
        }
    };
    let mut sync = SyncConnection::relay(&shared.software);
    let mut member = None;
    let mut watch = shared.monitor.connection(conn.remote_address());
    let result = run(&mut sync, &mut send, &mut recv, &shared, &mut member, &mut watch).await;
    // Flush a final error frame if the protocol left one, then close.
    for frame in sync.take_outbox() {
        if send.send(&frame).await.is_err() {
            break;
        }
    }
    let peer = sync.peer().map(str::to_owned);
    match &result {
        Ok(()) => info!(peer = peer.as_deref().unwrap_or("?"), "node disconnected"),
        Err(e) => warn!(peer = peer.as_deref().unwrap_or("?"), error = %e, "connection closed"),
    }
    if let Some((id, _)) = member {
        shared.hub.leave(id);
    }
    watch.update(&sync, recv.bytes(), send.bytes());
    watch.closed(result.as_ref().err().map(ToString::to_string), &shared.storage);
    if let Some(peer) = peer {
        let states = sync.into_persisted();
        if let Err(e) = shared.storage.lock().unwrap_or_else(|e| e.into_inner()).save_sync_states(&peer, states) {
            warn!(%peer, error = %e, "could not persist sync states");
        }
    }
    let _ = send.finish().await;
    conn.close(if result.is_ok() { 0u32 } else { 1u32 }.into(), b"bye");
}

async fn run<S: RelayStorage>(
    sync: &mut SyncConnection,
    send: &mut FramedSend,
    recv: &mut FramedRecv,
    shared: &Shared<S>,
    member: &mut Option<(u64, Arc<Mailbox>)>,
    watch: &mut ConnectionWatch,
) -> Result<(), ConnectionEnd> {
    loop {
        for frame in sync.take_outbox() {
            send.send(&frame).await?;
        }
        watch.update(sync, recv.bytes(), send.bytes());
        let mailbox = member.as_ref().map(|(_, m)| m.clone());
        tokio::select! {
            frame = recv.recv() => {
                let Some(frame) = frame? else { return Ok(()) };
                let mut docs = RelayDocs { storage: &shared.storage };
                for event in sync.on_frame(frame, &mut docs)? {
                    match event {
                        ConnectionEvent::Established { peer, software } => {
                            info!(%peer, %software, "node connected");
                            let states = shared.storage.lock().unwrap_or_else(|e| e.into_inner()).sync_states(&peer)?;
                            sync.restore(states);
                            watch.established(&peer, &software, sync);
                            *member = Some(shared.hub.join(&peer));
                            sync.begin(&mut docs)?;
                        }
                        ConnectionEvent::DocChanged { doc, heads } => {
                            debug!(%doc, "document changed; forwarding");
                            shared.monitor.doc_changed(&doc, &heads);
                            if let Some((id, _)) = member {
                                shared.hub.changed(*id, &doc);
                            }
                        }
                    }
                }
            }
            _ = wait(mailbox.as_deref()) => {
                let Some(mailbox) = mailbox else { continue };
                if mailbox.is_closed() {
                    sync.push_error(ErrorCode::Busy, "the relay is shutting down; reconnect later");
                    return Ok(());
                }
                let mut docs = RelayDocs { storage: &shared.storage };
                for doc in mailbox.take() {
                    sync.on_local_change(&doc, &mut docs)?;
                }
            }
        }
    }
}

async fn wait(mailbox: Option<&Mailbox>) {
    match mailbox {
        Some(m) => m.changed().await,
        None => std::future::pending().await,
    }
}
