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
//!
//! The node proves its key in the TLS handshake and accepts only the relay key
//! it pinned (from its join code or `--relay-key`). It offers only documents
//! whose parties include its own organisation, the same rule the relay applies,
//! so both sides' summaries agree. [`join`] enrolls the node with a one-time code.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use automerge::{ActorId, AutoCommit, ChangeHash};
use samverkan_net::backoff::Backoff;
use samverkan_net::endpoint::{self, Limits};
use samverkan_net::framed::{self, FramedRecv, FramedSend};
use samverkan_net::tls::TlsIdentity;
use samverkan_net::NetError;
use samverkan_shared::acceptance::{AuthorPolicy, AuthorRule};
use samverkan_shared::authorship;
use samverkan_shared::directory::{JoinCode, Member};
use samverkan_shared::identity::NodeId;
use samverkan_shared::identity::NodeKey;
use samverkan_shared::ids::DocId;
use samverkan_shared::org::OrgId;
use samverkan_shared::receipt::ApprovalReceipt;
use samverkan_shared::sync::{
    ConnectionError, ConnectionEvent, DocAccess, DocOutcome, MemoryAccess, SignedChange, SyncConnection,
};
use samverkan_shared::wire::{Frame, ReceiptEntry, RefusalKind, PROTOCOL_VERSION};
use samverkan_store::{BackgroundCompaction, DocRefusal, Store, StoreError};
use serde::Serialize;
use tokio::sync::{mpsc, Notify};
use tracing::{debug, info, warn};

use crate::node::{Node, NodeError, META_RELAY_ADDRESS, META_RELAY_ALTERNATIVES, META_RELAY_KEY};

/// Documents the node keeps loaded while syncing (as many as the relay does by
/// default): with many documents in flight, a smaller cache reloads each one
/// from disk for every message (found by the catch-up benchmark).
pub const SYNC_CACHE_DOCUMENTS: usize = 256;

/// How long a sync's write waits for another process's write lock before it
/// lets go and tries again ([`BUSY_RETRY_PAUSE`] later), up to
/// [`BUSY_WAIT_MAX`] in all. Storage runs beside the QUIC connection's driver
/// (the CLI's runtime has a worker thread for it), so a wait never starves
/// keep-alives; short waits keep the log telling what is going on.
pub const DAEMON_BUSY_TIMEOUT: Duration = Duration::from_secs(2);

/// Pause between two tries of a write that found the database busy.
pub const BUSY_RETRY_PAUSE: Duration = Duration::from_millis(100);

/// How long a sync waits in all for another process's write lock before the
/// write fails (and the connection with it; the daemon reconnects).
pub const BUSY_WAIT_MAX: Duration = Duration::from_secs(120);

/// Which relay to sync with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayTarget {
    /// Its address.
    pub addr: SocketAddr,
    /// Its public key, pinned (printed by `samverkan-relay serve` and `samverkan-relay key`).
    pub relay_key: NodeId,
}

/// One relay reachable at several addresses: relay instances that share one
/// relay key and one database. The first is tried first; on loss the next.
/// Sync states are kept per relay key, so they stay valid on every instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayTargets {
    /// The addresses, in the order they are tried.
    pub addrs: Vec<SocketAddr>,
    /// The relay key every instance proves.
    pub relay_key: NodeId,
}

impl RelayTargets {
    /// The instance at position `i` (wrapping around).
    pub fn at(&self, i: usize) -> Option<RelayTarget> {
        let addr = *self.addrs.get(i % self.addrs.len().max(1))?;
        Some(RelayTarget { addr, relay_key: self.relay_key })
    }
}

impl From<RelayTarget> for RelayTargets {
    fn from(target: RelayTarget) -> Self {
        Self { addrs: vec![target.addr], relay_key: target.relay_key }
    }
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
    /// The node failed (e.g. the relay's directory did not verify).
    #[error(transparent)]
    Node(Box<NodeError>),
    /// The join code was issued for another organisation than this node's.
    #[error("the join code was issued for {code_org}, but this node belongs to {node_org}")]
    WrongOrganisation {
        /// The organisation in the code.
        code_org: OrgId,
        /// This node's organisation.
        node_org: OrgId,
    },
    /// The sync did not finish in time.
    #[error("the sync did not finish within {0:?}")]
    Timeout(Duration),
    /// The relay closed the connection before the sync finished.
    #[error("the relay closed the connection before the sync finished")]
    ClosedEarly,
}

impl From<NodeError> for SyncFailure {
    fn from(e: NodeError) -> Self {
        Self::Node(Box::new(e))
    }
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
    /// Documents the relay refused during this sync (the others synced on);
    /// each is recorded (see `samverkan-node status`) and held back.
    pub refused: Vec<RefusedDocument>,
}

/// One document the relay refused during a sync.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct RefusedDocument {
    /// The document.
    pub doc: DocId,
    /// Why, machine-readable (`not_shared`, `changes_refused`, `too_large`, …).
    pub kind: &'static str,
    /// Why, in the relay's words.
    pub reason: String,
}

/// The node's documents as the sync protocol sees them.
struct NodeDocs<'a> {
    store: &'a mut Store,
    org: &'a OrgId,
    key: &'a NodeKey,
    authors: AuthorPolicy,
    /// Documents the relay refused, as recorded (see [`held_back`]).
    refusals: BTreeMap<DocId, DocRefusal>,
}

impl<'a> NodeDocs<'a> {
    fn of(node: &'a mut Node) -> Result<Self, StoreError> {
        let authors = node.author_policy().unwrap_or_else(|e| {
            warn!(error = %e, "the stored enrollment directory does not verify; accepting no one's changes");
            AuthorPolicy::new(Default::default(), AuthorRule::EnrolledNode)
        });
        let (store, key, org) = node.parts();
        let refusals = store.refusals()?.into_iter().map(|r| (r.doc.clone(), r)).collect();
        Ok(Self { store, org, key, authors, refusals })
    }

    /// Whether the node holds `doc` back from the relay now (see [`held_back`]).
    fn held(&self, doc: &DocId, heads: &[ChangeHash]) -> bool {
        self.refusals.get(doc).is_some_and(|refusal| held_back(refusal, heads))
    }
}

/// Whether a refused document stays out of sync at these heads: one no longer
/// shared stays out until the relay offers it again; one whose changes were
/// refused stays out until something changes here (its heads move, e.g. by a
/// recovery), so the same refused changes are not offered again and again.
pub fn held_back(refusal: &DocRefusal, heads: &[ChangeHash]) -> bool {
    match refusal.kind {
        RefusalKind::NotShared => true,
        _ => same_heads(&refusal.local_heads, heads),
    }
}

fn same_heads(a: &[ChangeHash], b: &[ChangeHash]) -> bool {
    let sorted = |h: &[ChangeHash]| {
        let mut h = h.to_vec();
        h.sort_unstable();
        h
    };
    sorted(a) == sorted(b)
}

/// Why the node refused to store what the relay sent.
#[derive(Debug, thiserror::Error)]
pub enum NodeDocsError {
    /// The store failed (or refused the change, e.g. over the size limits).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A new document that does not name this node's organisation among its parties.
    #[error("document {doc} does not name this node's organisation ({org}) among its parties; it was not stored")]
    NotAParty {
        /// The document.
        doc: DocId,
        /// This node's organisation.
        org: OrgId,
    },
}

impl DocAccess for NodeDocs<'_> {
    type Error = NodeDocsError;

    fn shared_heads(&mut self) -> Result<Vec<(DocId, Vec<ChangeHash>)>, NodeDocsError> {
        // Only documents this node's organisation is a party to (the relay
        // refuses the others) and that are not held back after a refusal.
        let mut shared = Vec::new();
        for summary in self.store.list()? {
            if !summary.parties.contains(self.org) {
                continue;
            }
            let heads = summary.head_hashes()?;
            if !self.held(&summary.id, &heads) {
                shared.push((summary.id, heads));
            }
        }
        Ok(shared)
    }

    fn may_send(&mut self, doc: &DocId) -> bool {
        match self.store.summary(doc) {
            Ok(Some(summary)) if summary.parties.contains(self.org) => {
                summary.head_hashes().is_ok_and(|heads| !self.held(doc, &heads))
            }
            _ => false,
        }
    }

    fn hold_back(&mut self, doc: &DocId) -> Option<String> {
        let refusal = self.refusals.get(doc)?;
        if refusal.kind == RefusalKind::NotShared {
            // The relay syncs it with us again: it is shared with us again.
            info!(%doc, "the relay shares this document with this node again");
            if let Err(e) = self.store.clear_refusal(doc) {
                warn!(%doc, error = %e, "could not clear the document's refusal");
            }
            self.refusals.remove(doc);
            return None;
        }
        let heads = self.store.doc_heads(doc).ok().flatten().unwrap_or_default();
        held_back(refusal, &heads).then(|| {
            format!(
                "this node holds document {doc} back: the relay refused its changes ({}); they are to be recovered first",
                refusal.reason
            )
        })
    }

    fn refusal(&self, error: &NodeDocsError) -> Option<(RefusalKind, String)> {
        match error {
            NodeDocsError::NotAParty { .. } => Some((RefusalKind::NotShared, error.to_string())),
            NodeDocsError::Store(StoreError::TooLarge(limit)) => Some((RefusalKind::TooLarge, limit.to_string())),
            NodeDocsError::Store(_) => None,
        }
    }

    fn may_receive(&mut self, _doc: &DocId) -> bool {
        true
    }

    fn authors(&mut self) -> AuthorPolicy {
        self.authors.clone()
    }

    fn with_doc<R>(
        &mut self,
        doc: &DocId,
        create: bool,
        f: impl FnOnce(&mut AutoCommit) -> DocOutcome<R>,
    ) -> Result<Option<R>, NodeDocsError> {
        let exists = self.store.contains(doc)?;
        if !create && !exists {
            return Ok(None);
        }
        let org = self.org;
        let mut f = Some(f);
        let mut discarded = None;
        let mut waited = Duration::ZERO;
        loop {
            let mut apply = |d: &mut samverkan_shared::model::Document| {
                let Some(f) = f.take() else { return Err(Discarded::Yes) };
                match f(d.automerge_mut()) {
                    DocOutcome::Keep { value, signatures, received_whole } => {
                        // The relay's rule, kept here too: a new document must name this node's organisation.
                        if !exists && !d.is_empty() && !d.parties().map_err(StoreError::from)?.contains(org) {
                            return Err(Discarded::NotAParty);
                        }
                        Ok((value, signatures, received_whole))
                    }
                    DocOutcome::Discard(value) => {
                        discarded = Some(value);
                        Err(Discarded::Yes)
                    }
                }
            };
            // A document received whole from the relay is counted at its next
            // write when the limits in force are the relay's (it checked them).
            let result = if exists {
                self.store.update_signed(doc, false, |d| apply(d).map(|(value, signatures, _)| (value, signatures)))
            } else {
                self.store.update_received(doc, apply)
            };
            return match result {
                Ok((value, _)) => Ok(Some(value)),
                // Another process (a long import, an editor's save) holds the write lock:
                // nothing was done yet, so wait a little and try again, off the network's thread.
                Err(Discarded::Store(e)) if e.is_busy() && f.is_some() && waited < BUSY_WAIT_MAX => {
                    warn!(%doc, waited_ms = waited.as_millis() as u64, "the node database is busy (another process is writing); trying again");
                    std::thread::sleep(BUSY_RETRY_PAUSE);
                    waited += DAEMON_BUSY_TIMEOUT + BUSY_RETRY_PAUSE;
                    continue;
                }
                Err(Discarded::Store(e)) => Err(e.into()),
                Err(Discarded::NotAParty) => Err(NodeDocsError::NotAParty { doc: doc.clone(), org: org.clone() }),
                Err(Discarded::Yes) => Ok(discarded),
            };
        }
    }

    /// From a read snapshot: generating a message never takes, or waits
    /// for, the database's write lock.
    fn read_doc<R>(&mut self, doc: &DocId, f: impl FnOnce(&mut AutoCommit) -> R) -> Result<Option<R>, NodeDocsError> {
        Ok(self.store.read_doc(doc, f)?)
    }

    fn heads(&mut self, doc: &DocId) -> Result<Option<Vec<ChangeHash>>, NodeDocsError> {
        Ok(self.store.doc_heads(doc)?)
    }

    fn signatures(
        &mut self,
        doc: &DocId,
        changes: &[(ChangeHash, ActorId)],
    ) -> Result<Vec<SignedChange>, NodeDocsError> {
        let own = self.key.node_id().actor_id();
        let (mine, theirs): (Vec<_>, Vec<_>) = changes.iter().partition(|(_, actor)| *actor == own);
        let mut out: Vec<SignedChange> =
            mine.iter().map(|(hash, _)| (*hash, authorship::sign(self.key, doc, hash))).collect();
        let hashes: Vec<ChangeHash> = theirs.iter().map(|(hash, _)| *hash).collect();
        out.extend(self.store.signatures(&hashes)?);
        Ok(out)
    }
}

/// What the node answers without the database's write lock: the document
/// from a read snapshot, so sending a change and taking the relay's
/// acknowledgement never wait for an editor's transaction (nor hold one up).
impl MemoryAccess for NodeDocs<'_> {
    fn try_loaded_doc<R>(&mut self, doc: &DocId, f: impl FnOnce(&mut AutoCommit) -> R) -> Option<R> {
        // A refused document, or one not ours to send, takes the full path (which says why).
        if self.refusals.contains_key(doc) || !self.may_send(doc) {
            return None;
        }
        self.store.read_doc(doc, f).ok().flatten()
    }

    fn try_signatures(&mut self, doc: &DocId, changes: &[(ChangeHash, ActorId)]) -> Option<Vec<SignedChange>> {
        self.signatures(doc, changes).ok()
    }

    fn try_receipts(&mut self, doc: &DocId) -> Option<Vec<ReceiptEntry>> {
        self.receipts(doc).ok()
    }
}

/// How a store transaction ended that the sync core asked to discard.
enum Discarded {
    /// Discarded on purpose (the transaction rolled back).
    Yes,
    /// A new document that is not this node's organisation's (rolled back).
    NotAParty,
    /// The store failed.
    Store(StoreError),
}

impl From<StoreError> for Discarded {
    fn from(e: StoreError) -> Self {
        Self::Store(e)
    }
}

/// An open connection to the relay with the protocol state.
struct Session {
    conn: quinn::Connection,
    send: FramedSend,
    recv: FramedRecv,
    sync: SyncConnection,
    peer_key: String,
    relay_key: NodeId,
    /// Documents the relay refused on this connection.
    refused: Vec<RefusedDocument>,
}

fn software() -> String {
    format!("samverkan-node {}", env!("CARGO_PKG_VERSION"))
}

/// Opens an authenticated connection and its sync stream.
async fn connect(
    identity: &TlsIdentity,
    target: &RelayTarget,
    limits: &Limits,
) -> Result<(quinn::Connection, FramedSend, FramedRecv), SyncFailure> {
    let client = endpoint::client_endpoint(target.addr)?;
    let conn = endpoint::connect(&client, target.addr, identity, *target.relay_key.as_bytes(), limits).await?;
    let (send, recv) = framed::open(&conn, limits).await?;
    Ok((conn, send, recv))
}

/// Enrolls this node at the relay with a one-time join code: pins the relay's
/// key and addresses from the code, and keeps the directory the relay
/// returns. The code's addresses (instances of one relay) are tried in order,
/// each for up to `timeout`, until one answers; the relay's answer, a refusal
/// included, is final.
pub async fn join(node: &mut Node, code: &JoinCode, timeout: Duration) -> Result<Member, SyncFailure> {
    let identity = TlsIdentity::new(node.key().signing_key(), "samverkan-node")?;
    let mut unreachable = None;
    let mut signed = None;
    for address in &code.relay_addresses {
        match join_at(node, &identity, code, address, timeout).await {
            Ok(directory) => {
                signed = Some(directory);
                break;
            }
            // Not reached: the next instance may be up.
            Err(e @ (SyncFailure::Net(_) | SyncFailure::Timeout(_) | SyncFailure::ClosedEarly)) => {
                warn!(%address, error = %e, "relay instance not reached for the join; trying the next address");
                unreachable = Some(e);
            }
            Err(e) => return Err(e),
        }
    }
    let Some(signed) = signed else {
        return Err(unreachable.unwrap_or_else(|| NetError::Io("the join code names no relay address".into()).into()));
    };
    let directory = node.store_enrollment_unpinned(&signed, &code.relay_key)?;
    let member = directory.active(&node.node_id()).cloned().ok_or_else(|| {
        ConnectionError::Protocol("the relay's directory does not list this node after the join".into())
    })?;
    // Defence in depth (the relay checks this before it enrolls anything): nothing
    // is written to this node unless the directory lists it for its own organisation.
    if &member.org != node.org() {
        return Err(SyncFailure::WrongOrganisation { code_org: member.org, node_org: node.org().clone() });
    }
    // Only now, with everything verified, is the relay pinned, with every address.
    let store = node.store_mut();
    let (first, others) = code.relay_addresses.split_first().map(|(f, o)| (f.as_str(), o)).unwrap_or(("", &[]));
    store.set_meta(META_RELAY_ADDRESS, first)?;
    store.set_meta(META_RELAY_ALTERNATIVES, &others.join(","))?;
    store.set_meta(META_RELAY_KEY, &code.relay_key.to_string())?;
    node.store_enrollment(&signed, &code.relay_key)?;
    Ok(member)
}

/// One join attempt at one relay address: the signed directory the relay
/// answers with.
async fn join_at(
    node: &Node,
    identity: &TlsIdentity,
    code: &JoinCode,
    address: &str,
    timeout: Duration,
) -> Result<Vec<u8>, SyncFailure> {
    let addr = tokio::net::lookup_host(address)
        .await
        .map_err(|e| NetError::Io(format!("cannot resolve {address}: {e}")))?
        .next()
        .ok_or_else(|| NetError::Io(format!("{address} resolves to no address")))?;
    let target = RelayTarget { addr, relay_key: code.relay_key };
    // The relay refuses, enrolling nothing, a code issued for another organisation.
    let org = node.org().to_string();
    let exchange = async {
        let (conn, mut send, mut recv) = connect(identity, &target, &Limits::default()).await?;
        let join = Frame::Join { protocol: PROTOCOL_VERSION, software: software(), secret: code.secret.to_vec(), org };
        send.send(&join).await?;
        let answer = recv.recv().await?;
        let _ = send.finish().await;
        conn.close(0u32.into(), b"joined");
        match answer {
            Some(Frame::Directory { signed }) => Ok(signed),
            Some(Frame::Error { code, message }) => Err(SyncFailure::Protocol(ConnectionError::Peer { code, message })),
            Some(other) => Err(SyncFailure::Protocol(ConnectionError::Protocol(format!(
                "the relay answered the join with {}",
                other.name()
            )))),
            None => Err(SyncFailure::ClosedEarly),
        }
    };
    tokio::time::timeout(timeout, exchange).await.map_err(|_| SyncFailure::Timeout(timeout))?
}

impl Session {
    async fn open(node: &mut Node, target: &RelayTarget, limits: &Limits) -> Result<Self, SyncFailure> {
        let identity = TlsIdentity::new(node.key().signing_key(), "samverkan-node")?;
        let (conn, send, recv) = connect(&identity, target, limits).await?;
        let mut sync =
            SyncConnection::node_holding(&node.node_id().to_string(), &software(), node.enrollment_digest()?);
        // Sync states are kept per relay key: a different relay starts fresh.
        let peer_key = crate::status::relay_peer_key(&target.relay_key);
        node.store_mut().set_cache_capacity(SYNC_CACHE_DOCUMENTS);
        // A short wait for another process's write lock, then a retry (see `NodeDocs::with_doc`).
        node.store_mut().set_busy_timeout(DAEMON_BUSY_TIMEOUT)?;
        sync.restore(node.store_mut().sync_states(&peer_key)?);
        Ok(Self { conn, send, recv, sync, peer_key, relay_key: target.relay_key, refused: Vec::new() })
    }

    async fn flush(&mut self) -> Result<(), SyncFailure> {
        self.send.send_all(&self.sync.take_outbox()).await?;
        Ok(())
    }

    /// Handles one received frame; returns the documents that changed here, with their new heads.
    fn on_frame(&mut self, node: &mut Node, frame: Frame) -> Result<Vec<(DocId, Vec<ChangeHash>)>, SyncFailure> {
        let mut changed = Vec::new();
        let mut docs = NodeDocs::of(node)?;
        // The relay's acknowledgements and signatures need no write transaction.
        if self.sync.try_frame(&frame, &mut docs).is_some() {
            return Ok(changed);
        }
        let events = self.sync.on_frame(frame, &mut docs)?;
        for event in events {
            match event {
                ConnectionEvent::Established { peer, limits, .. } => {
                    debug!(relay = %peer, ?limits, "connected");
                    if let Some(limits) = limits {
                        node.adopt_relay_limits(limits)?;
                    }
                    self.sync.begin(&mut NodeDocs::of(node)?)?;
                }
                ConnectionEvent::DocChanged { doc, heads } => changed.push((doc, heads)),
                ConnectionEvent::RefusedByPeer { doc, kind, reason, heads, your_seq } => {
                    self.refused.push(RefusedDocument { doc: doc.clone(), kind: kind.label(), reason: reason.clone() });
                    record_refusal(node, doc, kind, reason, heads, your_seq)?;
                }
                ConnectionEvent::Refused { doc, kind, reason } => match kind {
                    RefusalKind::Paused => debug!(%doc, "held back a document whose changes the relay refused"),
                    _ => warn!(%doc, kind = kind.label(), %reason, "refused a document the relay sent"),
                },
                ConnectionEvent::Directory(signed) => {
                    let directory = node.store_enrollment(&signed, &self.relay_key)?;
                    debug!(version = directory.version, "enrollment directory received");
                }
                ConnectionEvent::Receipts { doc, entries } => {
                    let (mut receipts, mut refused) = (Vec::new(), 0usize);
                    for entry in &entries {
                        match ApprovalReceipt::from_wire(&doc, entry) {
                            Ok(receipt) => receipts.push(receipt),
                            Err(_) => refused += 1,
                        }
                    }
                    let (added, problems) = node.store_receipts(receipts, &self.relay_key)?;
                    for problem in &problems {
                        warn!(%doc, %problem, "refused an approval receipt that does not verify with the pinned relay key");
                    }
                    if refused > 0 {
                        warn!(%doc, refused, "refused malformed approval receipts");
                    }
                    debug!(%doc, added, "approval receipts received");
                }
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
            refused: self.refused.clone(),
        }
    }

    /// Persists the sync states and closes the connection politely.
    async fn close(mut self, node: &mut Node, code: u32) {
        let _ = self.flush().await;
        let states = self.sync.into_persisted();
        if let Err(e) = clear_settled_refusals(node, &states) {
            warn!(error = %e, "could not update the record of refused documents");
        }
        if let Err(e) = node.store_mut().save_sync_states(&self.peer_key, states) {
            warn!(error = %e, "could not persist sync states");
        }
        if let Err(e) = node.store_mut().set_busy_timeout(samverkan_store::DEFAULT_BUSY_TIMEOUT) {
            warn!(error = %e, "could not restore the database's busy timeout");
        }
        let _ = self.send.finish().await;
        self.conn.close(code.into(), b"bye");
    }
}

/// Keeps the relay's refusal of one document, so that status and list show it,
/// sync leaves the document alone and recovery knows what the relay holds. A
/// transient refusal (the relay is busy) is only logged: the next sync offers
/// the document again.
fn record_refusal(
    node: &mut Node,
    doc: DocId,
    kind: RefusalKind,
    reason: String,
    peer_heads: Vec<ChangeHash>,
    your_seq: u64,
) -> Result<(), SyncFailure> {
    if matches!(kind, RefusalKind::Busy | RefusalKind::Paused) {
        info!(%doc, kind = kind.label(), %reason, "the relay did not take a document now; it is offered again next time");
        return Ok(());
    }
    let Some(local_heads) = node.store_mut().doc_heads(&doc)? else {
        // Not a document of ours (a confused or hostile relay): nothing to record.
        return Ok(());
    };
    warn!(%doc, kind = kind.label(), %reason, "the relay refused a document; its other documents sync on");
    let refusal = DocRefusal { doc, kind, reason, local_heads, peer_heads, your_seq, refused_at: chrono::Utc::now() };
    node.store_mut().set_refusal(&refusal)?;
    Ok(())
}

/// Forgets refusals of documents that synced since (their heads moved and the
/// relay is now known to hold them: the persisted sync state's shared heads
/// equal ours). A document no longer shared stays recorded until the relay
/// offers it again.
fn clear_settled_refusals(node: &mut Node, states: &[(DocId, Vec<u8>)]) -> Result<(), StoreError> {
    let store = node.store_mut();
    for refusal in store.refusals()? {
        if refusal.kind == RefusalKind::NotShared {
            continue;
        }
        let Some(heads) = store.doc_heads(&refusal.doc)? else {
            store.clear_refusal(&refusal.doc)?;
            continue;
        };
        let relay_has_ours = states
            .iter()
            .find(|(doc, _)| *doc == refusal.doc)
            .and_then(|(_, state)| automerge::sync::State::decode(state).ok())
            .is_some_and(|state| same_heads(&state.shared_heads, &heads));
        if relay_has_ours && !same_heads(&refusal.local_heads, &heads) {
            info!(doc = %refusal.doc, "the relay accepted the document after an earlier refusal");
            store.clear_refusal(&refusal.doc)?;
        }
    }
    Ok(())
}

/// How far a one-shot sync is, for a progress display.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SyncProgress {
    /// Documents that differed at connect time and are now in sync.
    pub done: usize,
    /// Documents that differed at connect time (0 until the relay answered the summary).
    pub planned: usize,
    /// Bytes received so far.
    pub bytes_received: u64,
    /// Bytes sent so far.
    pub bytes_sent: u64,
}

/// Syncs every document once and returns what was transferred.
pub async fn sync_once(node: &mut Node, target: &RelayTarget, timeout: Duration) -> Result<SyncReport, SyncFailure> {
    sync_once_with_progress(node, target, timeout, &mut |_| {}).await
}

/// [`sync_once`] with the first of the relay's addresses that answers (in
/// order); the error of the last one tried if none does.
pub async fn sync_once_with_failover(
    node: &mut Node,
    targets: &RelayTargets,
    timeout: Duration,
    progress: &mut (dyn FnMut(SyncProgress) + Send),
) -> Result<(SyncReport, RelayTarget), SyncFailure> {
    let mut last = SyncFailure::Net(NetError::Io("no relay address to connect to".into()));
    for i in 0..targets.addrs.len() {
        let Some(target) = targets.at(i) else { break };
        match sync_once_with_progress(node, &target, timeout, progress).await {
            Ok(report) => return Ok((report, target)),
            // Refused by the relay itself (not enrolled, revoked, ...): every instance would say the same.
            Err(e @ SyncFailure::Protocol(ConnectionError::Peer { .. })) => return Err(e),
            Err(e) => {
                warn!(relay = %target.addr, error = %e, "this relay address failed; trying the next");
                last = e;
            }
        }
    }
    Err(last)
}

/// [`sync_once`], calling `progress` whenever a document settles or a frame arrives.
/// Records the outcome in the store for `samverkan-node status`.
pub async fn sync_once_with_progress(
    node: &mut Node,
    target: &RelayTarget,
    timeout: Duration,
    progress: &mut (dyn FnMut(SyncProgress) + Send),
) -> Result<SyncReport, SyncFailure> {
    let result = sync_session(node, target, timeout, progress).await;
    let recorded = match &result {
        Ok(_) => crate::status::record_success(node, target),
        Err(e) => crate::status::record_failure(node, &e.to_string()),
    };
    if let Err(e) = recorded {
        warn!(error = %e, "could not record the sync's outcome");
    }
    result
}

async fn sync_session(
    node: &mut Node,
    target: &RelayTarget,
    timeout: Duration,
    progress: &mut (dyn FnMut(SyncProgress) + Send),
) -> Result<SyncReport, SyncFailure> {
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
                let mut docs = NodeDocs::of(node)?;
                let settled = session.sync.is_settled(&mut docs)?;
                let (done, planned) = session.sync.progress();
                progress(SyncProgress {
                    done,
                    planned,
                    bytes_received: session.recv.bytes(),
                    bytes_sent: session.send.bytes(),
                });
                if settled {
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

/// The daemon's QUIC idle timeout: a relay (or relay instance) that vanished
/// without closing — SIGKILLed, its machine or network gone — is given up
/// after this long and the next address tried at once. QUIC uses the smaller
/// of the two ends' idle timeouts, so the relay's own limit (30 s by default,
/// `[limits] idle_timeout_seconds`) still bounds every connection; the node
/// only asks for a shorter one.
pub const DAEMON_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// The daemon's keep-alive interval: a PING every this often keeps a quiet
/// connection open (four may be lost before [`DAEMON_IDLE_TIMEOUT`] passes);
/// one small packet per node every two seconds at the relay.
pub const DAEMON_KEEP_ALIVE: Duration = Duration::from_secs(2);

/// The daemon's transport limits: [`Limits::default`] with
/// [`DAEMON_IDLE_TIMEOUT`] and [`DAEMON_KEEP_ALIVE`].
pub fn daemon_limits() -> Limits {
    Limits { idle_timeout: DAEMON_IDLE_TIMEOUT, keep_alive: DAEMON_KEEP_ALIVE, ..Limits::default() }
}

/// How the daemon behaves.
#[derive(Debug, Clone)]
pub struct DaemonOptions {
    /// Transport limits; the idle timeout is how long a relay that vanished
    /// without closing (killed, or its machine gone) takes to be noticed and
    /// the next address tried (by default [`daemon_limits`]: 10 s).
    pub limits: Limits,
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
    /// Set while the daemon is connected to the relay (for a user interface's
    /// "relay reachable").
    pub connected: Option<Arc<std::sync::atomic::AtomicBool>>,
}

impl Default for DaemonOptions {
    fn default() -> Self {
        Self {
            poll_interval: Duration::from_millis(100),
            backoff_base: Duration::from_millis(200),
            backoff_max: Duration::from_secs(30),
            local_edits: None,
            received: None,
            connected: None,
            limits: daemon_limits(),
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
    daemon_with_failover(node, &RelayTargets::from(target.clone()), options, shutdown).await
}

/// [`daemon`] over several addresses of one relay: connects to the first;
/// when a connection is lost or refused, tries the next address at once and
/// backs off only after every address failed in a row.
pub async fn daemon_with_failover(
    node: &mut Node,
    targets: &RelayTargets,
    options: &DaemonOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<(), SyncFailure> {
    tokio::pin!(shutdown);
    // While the daemon runs, its writes and those of handles sharing its
    // documents (the editor, the web app) leave whole-document saves to a
    // thread of their own, off the path of every received or pushed change.
    let store = node.store_mut();
    let _compaction = BackgroundCompaction::start(store.path(), &store.doc_cache())
        .inspect_err(|e| warn!(error = %e, "no background compaction; writes compact for themselves"))
        .ok();
    let mut backoff = Backoff::new(options.backoff_base, options.backoff_max);
    let mut current = 0usize;
    let mut failed_in_a_row = 0usize;
    loop {
        let target = targets.at(current).ok_or_else(|| NetError::Io("no relay address to connect to".into()))?;
        let connected_at = Instant::now();
        let outcome = tokio::select! {
            outcome = run_connected(node, &target, options) => outcome,
            () = &mut shutdown => return Ok(()),
        };
        match outcome {
            Ok(()) => info!("relay closed the connection"),
            Err(e) => {
                warn!(error = %e, "sync connection lost");
                if let Err(e) = crate::status::record_failure(node, &e.to_string()) {
                    warn!(error = %e, "could not record the failure");
                }
            }
        }
        if connected_at.elapsed() > Duration::from_secs(10) {
            backoff.reset();
            failed_in_a_row = 0;
        }
        failed_in_a_row += 1;
        current = (current + 1) % targets.addrs.len().max(1);
        // Another address is tried at once; the same ones again only after a back-off.
        let delay = if !failed_in_a_row.is_multiple_of(targets.addrs.len().max(1)) {
            info!(next = %targets.addrs[current], "failing over to the relay's next address");
            options.backoff_base.min(Duration::from_millis(50))
        } else {
            backoff.next_delay()
        };
        info!(?delay, "reconnecting");
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = &mut shutdown => return Ok(()),
        }
    }
}

/// One connected period of the daemon.
async fn run_connected(node: &mut Node, target: &RelayTarget, options: &DaemonOptions) -> Result<(), SyncFailure> {
    let mut session = Session::open(node, target, &options.limits).await?;
    info!(relay = %target.addr, "connected to relay");
    let set_connected = |now: bool| {
        if let Some(flag) = &options.connected {
            flag.store(now, std::sync::atomic::Ordering::SeqCst);
        }
    };
    set_connected(true);
    let mut known: BTreeMap<DocId, Vec<ChangeHash>> = node.store_mut().heads()?.into_iter().collect();
    let mut version = node.store_mut().data_version()?;
    let mut poll = tokio::time::interval(options.poll_interval);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Frames moved when the sync states and the success time were last saved
    // (so `samverkan-node status` in another process sees the daemon's progress).
    let mut saved_at_frames = u64::MAX;
    let mut saved_at: Option<Instant> = None;
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
                    let frames = session.sync.stats().frames_in + session.sync.stats().frames_out;
                    if frames != saved_at_frames && saved_at.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                        let mut docs = NodeDocs::of(node)?;
                        if session.sync.is_settled(&mut docs)? {
                            let states = session.sync.persisted();
                            node.store_mut().save_sync_states(&session.peer_key, states)?;
                            crate::status::record_success(node, target)?;
                            saved_at_frames = frames;
                            saved_at = Some(Instant::now());
                        }
                    }
                    push_local_changes(node, &mut session, &mut known, &mut version)?;
                }
            }
        }
    }
    .await;
    set_connected(false);
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
            let mut docs = NodeDocs::of(node)?;
            if session.sync.try_local_change(&doc, &mut docs).is_none() {
                session.sync.on_local_change(&doc, &mut docs)?;
            }
            known.insert(doc, heads);
        }
    }
    Ok(())
}
