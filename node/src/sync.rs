//! Syncing a node with the relay over QUIC: once (`samverkan-node sync`) or
//! continuously (`samverkan-node daemon`).
//!
//! Drives the sans-IO [`SyncConnection`] with a real connection and the node's
//! store. The daemon pushes local edits promptly (also those made by other
//! processes on the same data directory, noticed through SQLite's
//! `data_version`), stores remote changes as they arrive, and reconnects with
//! exponential backoff and jitter when the relay goes away. Sync states are
//! persisted per relay on every disconnect, so a reconnect resends nothing the
//! relay already has.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use automerge::{AutoCommit, ChangeHash};
use samverkan_net::backoff::Backoff;
use samverkan_net::endpoint::{self, Limits};
use samverkan_net::framed::{self, FramedRecv, FramedSend};
use samverkan_net::NetError;
use samverkan_shared::ids::DocId;
use samverkan_shared::sync::{ConnectionError, ConnectionEvent, DocAccess, SyncConnection};
use samverkan_store::{Store, StoreError};
use serde::Serialize;
use tokio::sync::{mpsc, Notify};
use tracing::{debug, info, warn};

use crate::node::Node;

/// Metadata keys where the node remembers its relay.
pub const META_RELAY_ADDRESS: &str = "relay.address";
/// Metadata key of the pinned relay certificate fingerprint.
pub const META_RELAY_FINGERPRINT: &str = "relay.fingerprint";

/// Documents the node keeps loaded while syncing (as many as the relay does by
/// default): with many documents in flight, a smaller cache reloads each one
/// from disk for every message (found by the catch-up benchmark).
pub const SYNC_CACHE_DOCUMENTS: usize = 256;

/// Which relay to sync with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayTarget {
    /// Its address.
    pub addr: SocketAddr,
    /// SHA-256 fingerprint of its certificate (printed by `samverkan-relay serve`).
    pub fingerprint: String,
}

/// Errors of a sync.
#[derive(Debug, thiserror::Error)]
pub enum SyncFailure {
    /// The connection failed or broke.
    #[error(transparent)]
    Net(#[from] NetError),
    /// The protocol failed (the relay refused something, or sent something broken).
    #[error(transparent)]
    Protocol(#[from] ConnectionError),
    /// The node's store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The sync did not finish in time.
    #[error("the sync did not finish within {0:?}")]
    Timeout(Duration),
    /// The relay closed the connection before the sync finished.
    #[error("the relay closed the connection before the sync finished")]
    ClosedEarly,
}

/// What a sync transferred.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct SyncReport {
    /// Documents for which changes were sent.
    pub docs_sent: usize,
    /// Documents that received changes.
    pub docs_received: usize,
    /// Automerge sync messages sent.
    pub messages_sent: u64,
    /// Automerge sync messages received.
    pub messages_received: u64,
    /// Frames sent and received.
    pub frames: u64,
    /// Bytes written to the connection.
    pub bytes_sent: u64,
    /// Bytes read from the connection.
    pub bytes_received: u64,
    /// Wall time in milliseconds.
    pub millis: u64,
}

/// The node's documents as the sync protocol sees them.
struct NodeDocs<'a> {
    store: &'a mut Store,
}

impl DocAccess for NodeDocs<'_> {
    type Error = StoreError;

    fn shared_heads(&mut self) -> Result<Vec<(DocId, Vec<ChangeHash>)>, StoreError> {
        self.store.heads()
    }

    fn may_receive(&mut self, _doc: &DocId) -> bool {
        true
    }

    fn with_doc<R>(
        &mut self,
        doc: &DocId,
        create: bool,
        f: impl FnOnce(&mut AutoCommit) -> R,
    ) -> Result<Option<R>, StoreError> {
        if !create && !self.store.contains(doc)? {
            return Ok(None);
        }
        let (value, _) = self.store.update(doc, create, |d| Ok::<_, StoreError>(f(d.automerge_mut())))?;
        Ok(Some(value))
    }

    fn heads(&mut self, doc: &DocId) -> Result<Option<Vec<ChangeHash>>, StoreError> {
        self.store.doc_heads(doc)
    }
}

/// An open connection to the relay with the protocol state.
struct Session {
    conn: quinn::Connection,
    send: FramedSend,
    recv: FramedRecv,
    sync: SyncConnection,
    peer_key: String,
}

impl Session {
    async fn open(node: &mut Node, target: &RelayTarget, limits: &Limits) -> Result<Self, SyncFailure> {
        let client = endpoint::client_endpoint(target.addr)?;
        let conn = endpoint::connect(&client, target.addr, &target.fingerprint, limits).await?;
        let (send, recv) = framed::open(&conn, limits).await?;
        let software = format!("samverkan-node {}", env!("CARGO_PKG_VERSION"));
        let mut sync = SyncConnection::node(&node.node_id().to_string(), &software);
        // Sync states are kept per relay certificate: a different relay starts fresh.
        let peer_key = format!("relay:{}", target.fingerprint);
        node.store_mut().set_cache_capacity(SYNC_CACHE_DOCUMENTS);
        sync.restore(node.store_mut().sync_states(&peer_key)?);
        Ok(Self { conn, send, recv, sync, peer_key })
    }

    async fn flush(&mut self) -> Result<(), SyncFailure> {
        for frame in self.sync.take_outbox() {
            self.send.send(&frame).await?;
        }
        Ok(())
    }

    /// Handles one received frame; returns the documents that changed here, with their new heads.
    fn on_frame(
        &mut self,
        node: &mut Node,
        frame: samverkan_shared::wire::Frame,
    ) -> Result<Vec<(DocId, Vec<ChangeHash>)>, SyncFailure> {
        let mut docs = NodeDocs { store: node.store_mut() };
        let mut changed = Vec::new();
        for event in self.sync.on_frame(frame, &mut docs)? {
            match event {
                ConnectionEvent::Established { peer, .. } => {
                    debug!(relay = %peer, "connected");
                    self.sync.begin(&mut docs)?;
                }
                ConnectionEvent::DocChanged { doc, heads } => changed.push((doc, heads)),
            }
        }
        Ok(changed)
    }

    fn report(&self, started: Instant) -> SyncReport {
        let stats = self.sync.stats();
        SyncReport {
            docs_sent: stats.docs_sent.len(),
            docs_received: stats.docs_received.len(),
            messages_sent: stats.sync_out,
            messages_received: stats.sync_in,
            frames: stats.frames_in + stats.frames_out,
            bytes_sent: self.send.bytes(),
            bytes_received: self.recv.bytes(),
            millis: started.elapsed().as_millis() as u64,
        }
    }

    /// Persists the sync states and closes the connection politely.
    async fn close(mut self, node: &mut Node, code: u32) {
        let _ = self.flush().await;
        let states = self.sync.into_persisted();
        if let Err(e) = node.store_mut().save_sync_states(&self.peer_key, states) {
            warn!(error = %e, "could not persist sync states");
        }
        let _ = self.send.finish().await;
        self.conn.close(code.into(), b"bye");
    }
}

/// Syncs every document once and returns what was transferred.
pub async fn sync_once(node: &mut Node, target: &RelayTarget, timeout: Duration) -> Result<SyncReport, SyncFailure> {
    let started = Instant::now();
    let limits = Limits::default();
    let mut session = tokio::time::timeout(timeout, Session::open(node, target, &limits))
        .await
        .map_err(|_| SyncFailure::Timeout(timeout))??;
    let deadline = tokio::time::Instant::now() + timeout;
    let result: Result<(), SyncFailure> = async {
        loop {
            session.flush().await?;
            {
                let mut docs = NodeDocs { store: node.store_mut() };
                if session.sync.is_settled(&mut docs)? {
                    return Ok(());
                }
            }
            let frame = tokio::time::timeout_at(deadline, session.recv.recv())
                .await
                .map_err(|_| SyncFailure::Timeout(timeout))??
                .ok_or(SyncFailure::ClosedEarly)?;
            session.on_frame(node, frame)?;
        }
    }
    .await;
    let report = session.report(started);
    session.close(node, if result.is_ok() { 0 } else { 1 }).await;
    result.map(|()| report)
}

/// How the daemon behaves.
#[derive(Debug, Clone)]
pub struct DaemonOptions {
    /// How often to look for edits made by other processes.
    pub poll_interval: Duration,
    /// First reconnect delay.
    pub backoff_base: Duration,
    /// Longest reconnect delay.
    pub backoff_max: Duration,
    /// Woken by an editor in the same process right after it committed an edit
    /// to this data directory, so the edit is pushed at once instead of at the
    /// next poll. Edits by other processes are still found by polling.
    pub local_edits: Option<Arc<Notify>>,
    /// Told the id of every document that received changes from the relay,
    /// after they were stored (for a user interface, or to measure latency).
    pub received: Option<mpsc::UnboundedSender<DocId>>,
}

impl Default for DaemonOptions {
    fn default() -> Self {
        Self {
            poll_interval: Duration::from_millis(100),
            backoff_base: Duration::from_millis(200),
            backoff_max: Duration::from_secs(30),
            local_edits: None,
            received: None,
        }
    }
}

/// Stays connected until `shutdown` completes: pushes local edits, stores
/// remote changes, reconnects with backoff.
pub async fn daemon(
    node: &mut Node,
    target: &RelayTarget,
    options: &DaemonOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<(), SyncFailure> {
    tokio::pin!(shutdown);
    let mut backoff = Backoff::new(options.backoff_base, options.backoff_max);
    loop {
        let connected_at = Instant::now();
        let outcome = tokio::select! {
            outcome = run_connected(node, target, options) => outcome,
            () = &mut shutdown => return Ok(()),
        };
        match outcome {
            Ok(()) => info!("relay closed the connection"),
            Err(e) => warn!(error = %e, "sync connection lost"),
        }
        if connected_at.elapsed() > Duration::from_secs(10) {
            backoff.reset();
        }
        let delay = backoff.next_delay();
        info!(?delay, "reconnecting");
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = &mut shutdown => return Ok(()),
        }
    }
}

/// One connected period of the daemon.
async fn run_connected(node: &mut Node, target: &RelayTarget, options: &DaemonOptions) -> Result<(), SyncFailure> {
    let limits = Limits::default();
    let mut session = Session::open(node, target, &limits).await?;
    info!(relay = %target.addr, "connected to relay");
    let mut known: BTreeMap<DocId, Vec<ChangeHash>> = node.store_mut().heads()?.into_iter().collect();
    let mut version = node.store_mut().data_version()?;
    let mut poll = tokio::time::interval(options.poll_interval);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let result: Result<(), SyncFailure> = async {
        loop {
            session.flush().await?;
            tokio::select! {
                frame = session.recv.recv() => {
                    let Some(frame) = frame? else { return Ok(()) };
                    // The heads come with the event: loading (and copying) a long
                    // document here would add milliseconds to every received edit.
                    for (doc, heads) in session.on_frame(node, frame)? {
                        info!(%doc, "received changes");
                        known.insert(doc.clone(), heads);
                        if let Some(received) = &options.received {
                            let _ = received.send(doc);
                        }
                    }
                }
                () = local_edit(options.local_edits.as_deref()), if options.local_edits.is_some() => {
                    push_local_changes(node, &mut session, &mut known, &mut version)?;
                }
                _ = poll.tick() => {
                    push_local_changes(node, &mut session, &mut known, &mut version)?;
                }
            }
        }
    }
    .await;
    session.close(node, if result.is_ok() { 0 } else { 1 }).await;
    result
}

async fn local_edit(notify: Option<&Notify>) {
    match notify {
        Some(n) => n.notified().await,
        None => std::future::pending().await,
    }
}

/// If another connection committed to the store since `version`, offers every
/// document whose heads moved to the relay.
fn push_local_changes(
    node: &mut Node,
    session: &mut Session,
    known: &mut BTreeMap<DocId, Vec<ChangeHash>>,
    version: &mut i64,
) -> Result<(), SyncFailure> {
    let now = node.store_mut().data_version()?;
    if now == *version {
        return Ok(());
    }
    *version = now;
    for (doc, heads) in node.store_mut().heads()? {
        if known.get(&doc) != Some(&heads) {
            debug!(%doc, "local change; pushing");
            let mut docs = NodeDocs { store: node.store_mut() };
            session.sync.on_local_change(&doc, &mut docs)?;
            known.insert(doc, heads);
        }
    }
    Ok(())
}
