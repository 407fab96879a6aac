//! The relay operator's view: a registry of what every node and document is
//! doing, fed by the connection tasks through a few small calls, and turned
//! into a [`RelayStatus`] snapshot (for the admin API, the dashboard and
//! `samverkan-relay status`) and into Prometheus metrics ([`RelayMetrics`]).
//!
//! What it keeps, per node: connected or not, last seen, remote address,
//! client software, bytes/messages/frames in and out, last error; per node and
//! document: the heads the relay knows the node shares (Automerge's sync-state
//! `shared_heads`, the truthful source) and when they last equalled the
//! relay's heads. "Behind by N changes" is computed on demand from the relay's
//! copy of the document and cached by heads.
//!
//! A node's last seen time, address, software and last error are kept through
//! the storage ([`RelayStorage::save_node_record`]) when its connection ends, so
//! a restarted relay still knows when each node was last there.
//!
//! The cost of following a connection does not grow with the documents it
//! names: after each frame [`ConnectionWatch::update`] touches only the
//! documents whose shared heads changed ([`SyncConnection::take_changed_shared_heads`]),
//! and only documents the relay holds are kept per node.
//!
//! Refused connections and documents are counted per reason
//! ([`Monitor::connection_refused`], [`Monitor::document_refused`]; reasons are
//! fixed short labels) and logged at most once per reason every
//! [`REFUSAL_LOG_INTERVAL`], with the number of refusals not logged since.
//!
//! It never holds or reports document contents: only document ids, heads
//! counts and transfer counters. Nodes are shown by a display name from a
//! [`NameResolver`] (the seam for the enrollment directory), falling back to a
//! table given in [`MonitorConfig::names`], then to the node's short id.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use automerge::ChangeHash;
use chrono::{DateTime, Utc};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use samverkan_shared::identity::NodeId;
use samverkan_shared::ids::DocId;
use samverkan_shared::org::OrgId;
use samverkan_shared::sync::{SyncConnection, SyncMemo};
use samverkan_shared::wire::RefusalKind;
use samverkan_store::StoreError;
use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::storage::RelayStorage;

/// A node's display name: its organisation and the node's own name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeName {
    /// The organisation (e.g. "Flen").
    pub organisation: String,
    /// The node's name (e.g. "Flen BF-samordnare").
    pub name: String,
}

impl NodeName {
    /// A name for a node of `organisation` called `name`.
    pub fn new(organisation: impl Into<String>, name: impl Into<String>) -> Self {
        Self { organisation: organisation.into(), name: name.into() }
    }
}

/// Finds the organisation of a node by its id (see [`Monitor::set_node_org`]).
pub type NodeOrg = Arc<dyn Fn(&str) -> Option<OrgId> + Send + Sync>;

/// The seam for naming nodes: maps a node id (the string a node sends in
/// `Hello`, 64 hex digits today) to its organisation and name.
///
/// The enrollment directory (organisation + name per node key) plugs in here
/// through [`MonitorConfig::resolver`] or [`crate::server::RelayHandle::set_name_resolver`];
/// any `Fn(&str) -> Option<NodeName>` closure is a resolver.
pub trait NameResolver: Send + Sync + 'static {
    /// The name of `node_id`, if known.
    fn resolve(&self, node_id: &str) -> Option<NodeName>;
}

impl<F: Fn(&str) -> Option<NodeName> + Send + Sync + 'static> NameResolver for F {
    fn resolve(&self, node_id: &str) -> Option<NodeName> {
        self(node_id)
    }
}

/// The monitor's source of the current time (tests substitute one they advance).
pub type Clock = Arc<dyn Fn() -> DateTime<Utc> + Send + Sync>;

/// How the relay monitors itself; part of [`crate::server::RelayConfig`].
#[derive(Clone)]
pub struct MonitorConfig {
    /// A node not seen for this long is flagged stale.
    pub stale_after: Duration,
    /// Names by node id (a simple table, e.g. for tests and small setups).
    pub names: BTreeMap<String, NodeName>,
    /// A resolver consulted before [`Self::names`] (e.g. the enrollment directory).
    pub resolver: Option<Arc<dyn NameResolver>>,
    /// The admin HTTP server (dashboard, JSON API, metrics); `None` runs none.
    pub admin: Option<crate::admin::AdminConfig>,
    /// The clock (`None`: the system clock).
    pub clock: Option<Clock>,
}

impl Default for MonitorConfig {
    fn default() -> Self {
        Self {
            stale_after: Duration::from_secs(24 * 3600),
            names: BTreeMap::new(),
            resolver: None,
            admin: None,
            clock: None,
        }
    }
}

impl std::fmt::Debug for MonitorConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MonitorConfig")
            .field("stale_after", &self.stale_after)
            .field("names", &self.names.len())
            .field("resolver", &self.resolver.is_some())
            .field("admin", &self.admin)
            .finish()
    }
}

/// Labels of per-node metrics.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct NodeLabels {
    /// The node's short id.
    pub node: String,
    /// Its display name.
    pub name: String,
}

/// Labels of the refusal counters: a fixed short reason (bounded cardinality).
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ReasonLabels {
    /// Why, e.g. `not enrolled` or `first frame too large`.
    pub reason: &'static str,
}

/// Labels of the node count by state.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct StateLabels {
    /// `in_sync`, `behind` or `stale`.
    pub state: String,
}

/// Every metric the relay exports, in one place. Counters advance as things
/// happen; gauges are refreshed from a [`RelayStatus`] snapshot on each scrape.
/// All names carry the `samverkan_relay_` prefix.
#[derive(Debug, Default)]
pub struct RelayMetrics {
    /// Seconds since the relay started.
    pub uptime_seconds: Gauge,
    /// Connections accepted since start (including ones that never said Hello).
    pub connections: Counter,
    /// Connections open now.
    pub connections_open: Gauge,
    /// Connections that ended with an error.
    pub connection_errors: Counter,
    /// Connections refused before or at authentication (not enrolled, revoked,
    /// a bad first frame, a refused join, too many connections, …), by reason.
    pub refused_connections: Family<ReasonLabels, Counter>,
    /// Documents the relay refused to a connection without closing it, by reason.
    pub refused_documents: Family<ReasonLabels, Counter>,
    /// Connection attempts answered with a QUIC Retry (address validation,
    /// under a load of handshakes; see [`crate::handshake`]).
    pub handshakes_retried: Counter,
    /// Connections whose peer is not authenticated yet (TLS handshake, then `Hello` or `Join`).
    pub handshakes_in_progress: Gauge,
    /// Documents stored.
    pub documents: Gauge,
    /// Documents loaded in memory.
    pub documents_loaded: Gauge,
    /// Documents loaded from storage since start.
    pub document_loads: Counter,
    /// Size of the relay's database files in bytes.
    pub store_bytes: Gauge,
    /// Known nodes by state (`in_sync`, `behind`, `stale`).
    pub nodes: Family<StateLabels, Gauge>,
    /// 1 if the node is connected now.
    pub node_connected: Family<NodeLabels, Gauge>,
    /// 1 if the node is stale (not seen for longer than the threshold).
    pub node_stale: Family<NodeLabels, Gauge>,
    /// Documents on which the node is behind the relay.
    pub node_documents_behind: Family<NodeLabels, Gauge>,
    /// Changes the node lacks, summed over documents.
    pub node_changes_behind: Family<NodeLabels, Gauge>,
    /// When the node was last seen (Unix seconds; 0 if not since start).
    pub node_last_seen_timestamp_seconds: Family<NodeLabels, Gauge>,
    /// Bytes received from the node.
    pub node_received_bytes: Family<NodeLabels, Counter>,
    /// Bytes sent to the node.
    pub node_sent_bytes: Family<NodeLabels, Counter>,
    /// Automerge sync messages received from the node.
    pub node_received_messages: Family<NodeLabels, Counter>,
    /// Automerge sync messages sent to the node.
    pub node_sent_messages: Family<NodeLabels, Counter>,
    /// Connection steps done from memory on the async runtime's thread (a
    /// change passed on, an acknowledgement taken, a `Sync` frame for a
    /// document not stored answered; see `RelayStorage::try_with_loaded`).
    pub steps_from_memory: Counter,
    /// Connection steps run on a storage thread (everything else).
    pub steps_on_storage_threads: Counter,
    /// Sync steps done from memory that were copied from another connection's
    /// identical step ([`SyncMemo`] hits; refreshed on each scrape).
    pub sync_steps_copied: Counter,
    /// Sync steps done from memory that were worked out ([`SyncMemo`] misses).
    pub sync_steps_worked_out: Counter,
    /// The sync steps the relay's connections share; kept here so that its
    /// counts are exported with the rest.
    pub sync_memo: Arc<SyncMemo>,
}

impl RelayMetrics {
    fn register(self: &Arc<Self>) -> Registry {
        let mut registry = Registry::with_prefix("samverkan_relay");
        let m = self.clone();
        registry.register("uptime_seconds", "Seconds since the relay started", m.uptime_seconds.clone());
        registry.register("connections", "Connections accepted since start", m.connections.clone());
        registry.register("connections_open", "Connections open now", m.connections_open.clone());
        registry.register("connection_errors", "Connections that ended with an error", m.connection_errors.clone());
        registry.register(
            "refused_connections",
            "Connections refused before or at authentication, by reason",
            m.refused_connections.clone(),
        );
        registry.register(
            "refused_documents",
            "Documents refused to a connection without closing it, by reason",
            m.refused_documents.clone(),
        );
        registry.register(
            "handshakes_retried",
            "Connection attempts answered with a QUIC Retry (address validation under a load of handshakes)",
            m.handshakes_retried.clone(),
        );
        registry.register(
            "handshakes_in_progress",
            "Connections whose peer is not authenticated yet (TLS handshake, then Hello or Join)",
            m.handshakes_in_progress.clone(),
        );
        registry.register("documents", "Documents stored", m.documents.clone());
        registry.register("documents_loaded", "Documents loaded in memory", m.documents_loaded.clone());
        registry.register(
            "document_loads",
            "Documents loaded from storage into memory (far more than there are documents: raise cached_documents)",
            m.document_loads.clone(),
        );
        registry.register("store_bytes", "Size of the relay database files in bytes", m.store_bytes.clone());
        registry.register("nodes", "Known nodes by state", m.nodes.clone());
        registry.register("node_connected", "1 if the node is connected now", m.node_connected.clone());
        registry.register("node_stale", "1 if the node has not been seen for too long", m.node_stale.clone());
        registry.register(
            "node_documents_behind",
            "Documents on which the node lacks changes the relay has",
            m.node_documents_behind.clone(),
        );
        registry.register(
            "node_changes_behind",
            "Changes the node lacks, summed over documents",
            m.node_changes_behind.clone(),
        );
        registry.register(
            "node_last_seen_timestamp_seconds",
            "When the node was last seen (Unix seconds, 0 if not since the relay started)",
            m.node_last_seen_timestamp_seconds.clone(),
        );
        registry.register("node_received_bytes", "Bytes received from the node", m.node_received_bytes.clone());
        registry.register("node_sent_bytes", "Bytes sent to the node", m.node_sent_bytes.clone());
        registry.register(
            "node_received_messages",
            "Automerge sync messages received from the node",
            m.node_received_messages.clone(),
        );
        registry.register(
            "node_sent_messages",
            "Automerge sync messages sent to the node",
            m.node_sent_messages.clone(),
        );
        let steps = [
            (
                "steps_from_memory",
                "Connection steps done from memory without a storage thread (a change passed on, an acknowledgement, \
                 a Sync for a document not stored)",
                &m.steps_from_memory,
            ),
            ("steps_on_storage_threads", "Connection steps run on a storage thread", &m.steps_on_storage_threads),
            (
                "sync_steps_copied",
                "Sync steps from memory copied from another connection's identical step",
                &m.sync_steps_copied,
            ),
            ("sync_steps_worked_out", "Sync steps from memory worked out by Automerge", &m.sync_steps_worked_out),
        ];
        for (name, help, counter) in steps {
            registry.register(name, help, counter.clone());
        }
        registry
    }
}

/// The relay as a whole, in a [`RelayStatus`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelaySummary {
    /// The relay's version.
    pub version: String,
    /// When this snapshot was taken.
    pub generated_at: DateTime<Utc>,
    /// When the relay started.
    pub started_at: DateTime<Utc>,
    /// Seconds since the relay started.
    pub uptime_secs: u64,
    /// Connections open now.
    pub connections_open: u64,
    /// Connections accepted since start.
    pub connections_total: u64,
    /// Documents stored.
    pub documents: u64,
    /// Documents loaded in memory.
    pub documents_loaded: u64,
    /// Documents loaded from storage since start (see `cached_documents`).
    #[serde(default)]
    pub document_loads: u64,
    /// Size of the database files in bytes.
    pub store_bytes: u64,
    /// The stale threshold in seconds.
    pub stale_after_secs: u64,
    /// Nodes known (connected since start, or with stored sync states).
    pub nodes: u64,
    /// Nodes connected now.
    pub nodes_connected: u64,
    /// Nodes flagged stale.
    pub nodes_stale: u64,
    /// Nodes behind on at least one document.
    pub nodes_behind: u64,
}

/// A node's overall state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    /// Every document is in sync with the relay.
    InSync,
    /// At least one document lacks changes the relay has.
    Behind,
    /// Not seen for longer than the stale threshold (takes precedence).
    Stale,
}

impl NodeState {
    /// `in_sync`, `behind` or `stale`.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::InSync => "in_sync",
            NodeState::Behind => "behind",
            NodeState::Stale => "stale",
        }
    }
}

/// One document as one node has it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DocStatus {
    /// The document's id (never its contents).
    pub doc: DocId,
    /// Whether the node has everything the relay has.
    pub in_sync: bool,
    /// Changes the relay has that the node lacks (`None` if it could not be counted).
    pub changes_behind: Option<u64>,
    /// When the relay last saw the node in sync on this document (since the relay started).
    pub last_sync: Option<DateTime<Utc>>,
    /// Set while the document is refused on this node's connection (by the
    /// relay, or held back by the node), until it syncs again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<DocRefusalStatus>,
}

/// A document refused between the relay and one node, as the operator sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DocRefusalStatus {
    /// Who refused: `relay` (the node's changes or access) or `node` (the node holds it back).
    pub by: String,
    /// Why, machine-readable (`not_shared`, `changes_refused`, `too_large`, `malformed`, `paused`, …).
    pub kind: String,
    /// Why, in words (never document contents: reasons name ids, keys, sizes and rules).
    pub reason: String,
    /// When.
    pub at: DateTime<Utc>,
}

/// One node, in a [`RelayStatus`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// Its full id (as sent in Hello).
    pub node_id: String,
    /// Its short id, for people.
    pub short_id: String,
    /// Its organisation, if a name is known.
    pub organisation: Option<String>,
    /// What to call it: its name, or its short id.
    pub name: String,
    /// Overall state.
    pub state: NodeState,
    /// Connected now.
    pub connected: bool,
    /// Connections open now (normally 0 or 1).
    pub connections: u64,
    /// Not seen for longer than the stale threshold.
    pub stale: bool,
    /// Last time it was connected (since the relay started).
    pub last_seen: Option<DateTime<Utc>>,
    /// Its address on its last connection.
    pub remote: Option<String>,
    /// Its software, as it reported it.
    pub software: Option<String>,
    /// Bytes received from it (since the relay started).
    pub bytes_in: u64,
    /// Bytes sent to it.
    pub bytes_out: u64,
    /// Automerge sync messages received from it.
    pub messages_in: u64,
    /// Automerge sync messages sent to it.
    pub messages_out: u64,
    /// Frames received from it.
    pub frames_in: u64,
    /// Frames sent to it.
    pub frames_out: u64,
    /// Why its last connection failed, if it did.
    pub last_error: Option<String>,
    /// When that was.
    pub last_error_at: Option<DateTime<Utc>>,
    /// The latest time it was seen in sync on some document.
    pub last_sync: Option<DateTime<Utc>>,
    /// Documents in sync.
    pub docs_in_sync: u64,
    /// Documents behind.
    pub docs_behind: u64,
    /// Changes lacking, summed over documents.
    pub changes_behind: u64,
    /// Documents refused on its connection (see [`DocStatus::refused`]).
    #[serde(default)]
    pub docs_refused: u64,
    /// Every document, in id order.
    pub docs: Vec<DocStatus>,
}

/// Everything the operator sees: the JSON of `/api/status` and `samverkan-relay status --json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayStatus {
    /// The relay as a whole.
    pub relay: RelaySummary,
    /// Every known node: stale first, then behind, then in sync; by name within each.
    pub nodes: Vec<NodeStatus>,
}

/// What the monitor remembers of one node.
#[derive(Debug, Default)]
struct NodeEntry {
    connections: u64,
    last_seen: Option<DateTime<Utc>>,
    remote: Option<SocketAddr>,
    software: Option<String>,
    bytes_in: u64,
    bytes_out: u64,
    messages_in: u64,
    messages_out: u64,
    frames_in: u64,
    frames_out: u64,
    last_error: Option<(DateTime<Utc>, String)>,
    docs: BTreeMap<DocId, NodeDoc>,
}

/// What survives a relay restart of a node's entry (stored as JSON through the storage).
#[derive(Debug, Default, Serialize, Deserialize)]
struct NodeRecord {
    last_seen: Option<DateTime<Utc>>,
    remote: Option<SocketAddr>,
    software: Option<String>,
    last_error: Option<(DateTime<Utc>, String)>,
}

#[derive(Debug, Default)]
struct NodeDoc {
    shared_heads: Vec<ChangeHash>,
    last_sync: Option<DateTime<Utc>>,
    /// Boxed: most documents of most nodes were never refused, and every
    /// (node, document) pair has an entry.
    refused: Option<Box<DocRefusalStatus>>,
}

#[derive(Debug, Default)]
struct Inner {
    nodes: BTreeMap<String, NodeEntry>,
    /// The relay's heads of every document, sorted.
    docs: BTreeMap<DocId, Vec<ChangeHash>>,
    /// Changes behind, by (document, relay heads, node heads).
    behind: HashMap<(DocId, Vec<ChangeHash>, Vec<ChangeHash>), u64>,
}

/// How often a refusal of one reason is logged at most (the rest are counted).
pub const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Decides when a refusal is logged: the first of each (kind, reason), then at
/// most one line per [`REFUSAL_LOG_INTERVAL`] carrying the number not logged.
#[derive(Debug, Default)]
struct RefusalLog {
    /// By kind and reason: when the last line was due, refusals since.
    last: HashMap<(&'static str, &'static str), (Instant, u64)>,
}

impl RefusalLog {
    fn due(&mut self, kind: &'static str, reason: &'static str, now: Instant) -> Option<u64> {
        match self.last.get_mut(&(kind, reason)) {
            Some((at, suppressed)) if now.duration_since(*at) < REFUSAL_LOG_INTERVAL => {
                *suppressed += 1;
                None
            }
            Some((at, suppressed)) => {
                *at = now;
                Some(std::mem::take(suppressed))
            }
            None => {
                self.last.insert((kind, reason), (now, 0));
                Some(0)
            }
        }
    }
}

/// The monitoring registry of one relay. Cheap calls from connection tasks;
/// snapshots on request.
pub struct Monitor {
    clock: Clock,
    started_at: DateTime<Utc>,
    stale_after: Duration,
    names: BTreeMap<String, NodeName>,
    resolver: RwLock<Option<Arc<dyn NameResolver>>>,
    /// The organisation of a node (by node id), so that a node is judged only
    /// on the documents it is a party to; without it every document counts.
    node_org: RwLock<Option<NodeOrg>>,
    db_path: PathBuf,
    inner: Mutex<Inner>,
    metrics: Arc<RelayMetrics>,
    registry: Registry,
    refusals: Mutex<RefusalLog>,
}

impl std::fmt::Debug for Monitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Monitor").field("started_at", &self.started_at).finish_non_exhaustive()
    }
}

fn sorted(heads: &[ChangeHash]) -> Vec<ChangeHash> {
    into_sorted(heads.to_vec())
}

/// `heads` sorted and without repeats, in place.
fn into_sorted(mut heads: Vec<ChangeHash>) -> Vec<ChangeHash> {
    heads.sort_unstable();
    heads.dedup();
    heads.shrink_to_fit();
    heads
}

/// A short, readable form of a node id (the node's `short()` form when it is a node key).
pub fn short_id(node_id: &str) -> String {
    match NodeId::from_str(node_id) {
        Ok(id) => id.short(),
        Err(_) => node_id.chars().take(12).collect(),
    }
}

impl Monitor {
    /// A monitor for a relay whose database is `db_path`.
    pub fn new(config: &MonitorConfig, db_path: PathBuf) -> Self {
        let metrics = Arc::new(RelayMetrics::default());
        let registry = metrics.register();
        let clock = config.clock.clone().unwrap_or_else(|| Arc::new(Utc::now));
        Self {
            started_at: clock(),
            clock,
            stale_after: config.stale_after,
            names: config.names.clone(),
            resolver: RwLock::new(config.resolver.clone()),
            node_org: RwLock::new(None),
            db_path,
            inner: Mutex::new(Inner::default()),
            metrics,
            registry,
            refusals: Mutex::new(RefusalLog::default()),
        }
    }

    fn now(&self) -> DateTime<Utc> {
        (self.clock)()
    }

    /// Sets how to find a node's organisation (the relay uses its enrollment directory).
    pub fn set_node_org(&self, node_org: Option<NodeOrg>) {
        *self.node_org.write().unwrap_or_else(|e| e.into_inner()) = node_org;
    }

    /// Replaces the name resolver (e.g. when the enrollment directory changes).
    pub fn set_resolver(&self, resolver: Option<Arc<dyn NameResolver>>) {
        *self.resolver.write().unwrap_or_else(|e| e.into_inner()) = resolver;
    }

    /// The metrics.
    pub fn metrics(&self) -> &RelayMetrics {
        &self.metrics
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Loads what storage remembers: every document's heads, and the nodes
    /// with persisted sync states (known but not seen since the relay started).
    pub fn seed<S: RelayStorage>(&self, storage: &S) -> Result<(), StoreError> {
        let heads: Vec<(DocId, Vec<ChangeHash>)> = storage.index()?.into_iter().map(|e| (e.id, e.heads)).collect();
        let records = storage.node_records()?;
        let mut nodes = Vec::new();
        for peer in storage.peers()? {
            let states = storage.sync_states(&peer)?;
            nodes.push((peer, states));
        }
        let mut inner = self.lock();
        inner.docs = heads.into_iter().map(|(doc, heads)| (doc, into_sorted(heads))).collect();
        for (peer, record) in records {
            let Ok(record) = serde_json::from_str::<NodeRecord>(&record) else { continue };
            let entry = inner.nodes.entry(peer).or_default();
            entry.last_seen = record.last_seen;
            entry.remote = record.remote;
            entry.software = record.software;
            entry.last_error = record.last_error;
        }
        for (peer, states) in nodes {
            let Inner { nodes, docs, .. } = &mut *inner;
            let entry = nodes.entry(peer).or_default();
            for (doc, bytes) in states.into_iter().filter(|(doc, _)| docs.contains_key(doc)) {
                if let Ok(state) = automerge::sync::State::decode(&bytes) {
                    entry.docs.insert(
                        doc,
                        NodeDoc { shared_heads: into_sorted(state.shared_heads), last_sync: None, refused: None },
                    );
                }
            }
        }
        Ok(())
    }

    /// Counts a connection refused for `reason` (a fixed short label: it is a
    /// metric label). Returns `Some(n)` when a log line is due, `n` being the
    /// refusals of this reason not logged since the last line; `None` when the
    /// caller should stay quiet (see [`REFUSAL_LOG_INTERVAL`]).
    pub fn connection_refused(&self, reason: &'static str) -> Option<u64> {
        self.metrics.refused_connections.get_or_create(&ReasonLabels { reason }).inc();
        self.refusals.lock().unwrap_or_else(|e| e.into_inner()).due("connection", reason, Instant::now())
    }

    /// Counts one document refused to a connection for `reason` (a fixed
    /// short label), the connection staying open. Returns when to log, as
    /// [`Self::connection_refused`].
    pub fn document_refused(&self, reason: &'static str) -> Option<u64> {
        self.metrics.refused_documents.get_or_create(&ReasonLabels { reason }).inc();
        self.refusals.lock().unwrap_or_else(|e| e.into_inner()).due("document", reason, Instant::now())
    }

    /// A document changed on the relay (received through some connection).
    pub fn doc_changed(&self, doc: &DocId, heads: &[ChangeHash]) {
        self.lock().docs.insert(doc.clone(), sorted(heads));
    }

    /// A connection was accepted from `remote`; the returned watch follows it.
    pub fn connection(self: &Arc<Self>, remote: SocketAddr) -> ConnectionWatch {
        self.metrics.connections.inc();
        self.metrics.connections_open.inc();
        ConnectionWatch { monitor: self.clone(), remote, peer: None, counters: None, seen: Seen::default() }
    }

    fn name_of(&self, node_id: &str) -> (Option<String>, String) {
        let resolved =
            self.resolver.read().unwrap_or_else(|e| e.into_inner()).as_ref().and_then(|r| r.resolve(node_id));
        match resolved.or_else(|| self.names.get(node_id).cloned()) {
            Some(n) => (Some(n.organisation), n.name),
            None => (None, short_id(node_id)),
        }
    }

    fn labels(&self, node_id: &str) -> NodeLabels {
        NodeLabels { node: short_id(node_id), name: self.name_of(node_id).1 }
    }

    /// Takes a snapshot, counting lagging changes from `storage` where needed.
    pub fn snapshot<S: RelayStorage>(&self, storage: &S) -> RelayStatus {
        // 0. Which documents each node is a party to.
        let node_org = self.node_org.read().unwrap_or_else(|e| e.into_inner()).clone();
        let parties: BTreeMap<DocId, Arc<[OrgId]>> = match &node_org {
            Some(_) => match storage.index() {
                Ok(index) => index.into_iter().map(|e| (e.id, e.parties)).collect(),
                Err(e) => {
                    warn!(error = %e, "could not read document parties for monitoring");
                    BTreeMap::new()
                }
            },
            None => BTreeMap::new(),
        };
        let org_of: BTreeMap<String, Option<OrgId>> = {
            let inner = self.lock();
            inner.nodes.keys().map(|id| (id.clone(), node_org.as_ref().and_then(|f| f(id)))).collect()
        };
        let concerns = |node_id: &str, doc: &DocId| match org_of.get(node_id) {
            Some(Some(org)) => parties.get(doc).is_some_and(|p| p.contains(org)),
            _ => node_org.is_none(),
        };
        // 1. What needs counting (outside the storage lock).
        let mut wanted: BTreeMap<DocId, Vec<Vec<ChangeHash>>> = BTreeMap::new();
        {
            let inner = self.lock();
            for (node_id, entry) in &inner.nodes {
                for (doc, relay_heads) in inner.docs.iter().filter(|(doc, _)| concerns(node_id, doc)) {
                    let node_heads = entry.docs.get(doc).map(|d| d.shared_heads.clone()).unwrap_or_default();
                    if &node_heads != relay_heads
                        && !inner.behind.contains_key(&(doc.clone(), relay_heads.clone(), node_heads.clone()))
                    {
                        wanted.entry(doc.clone()).or_default().push(node_heads);
                    }
                }
            }
        }
        // 2. Count from the relay's copies (each document loaded once).
        let mut counted: Vec<(DocId, Vec<ChangeHash>, Vec<ChangeHash>, u64)> = Vec::new();
        let (loaded, loads) = {
            for (doc, node_heads) in wanted {
                let result = storage.with_doc(&doc, false, |d| {
                    let d = d.automerge_mut();
                    let relay_heads = sorted(&d.get_heads());
                    let counts: Vec<(Vec<ChangeHash>, u64)> = node_heads
                        .into_iter()
                        .map(|have| {
                            let known: Vec<ChangeHash> =
                                have.iter().filter(|h| d.get_change_meta_by_hash(h).is_some()).copied().collect();
                            let n = d.get_changes_meta(&known).len() as u64;
                            (have, n)
                        })
                        .collect();
                    Ok::<_, StoreError>(((relay_heads, counts), Vec::new(), Vec::new()))
                });
                match result {
                    Ok(Some((relay_heads, counts))) => {
                        for (have, n) in counts {
                            counted.push((doc.clone(), relay_heads.clone(), have, n));
                        }
                    }
                    Ok(None) => {}
                    Err(e) => warn!(%doc, error = %e, "could not count changes for monitoring"),
                }
            }
            (storage.loaded() as u64, storage.document_loads())
        };
        // 3. Assemble.
        let now = self.now();
        let mut inner = self.lock();
        if inner.behind.len() > 100_000 {
            inner.behind.clear();
        }
        for (doc, relay_heads, have, n) in counted {
            inner.behind.insert((doc, relay_heads, have), n);
        }
        let uptime = (now - self.started_at).to_std().unwrap_or_default();
        let mut nodes = Vec::new();
        for (node_id, entry) in &inner.nodes {
            let mut docs = Vec::new();
            let (mut in_sync_count, mut behind_count, mut changes, mut refused_count) = (0u64, 0u64, 0u64, 0u64);
            let mut last_sync = None;
            let connected = entry.connections > 0;
            for (doc, relay_heads) in inner.docs.iter().filter(|(doc, _)| concerns(node_id, doc)) {
                let nd = entry.docs.get(doc);
                let node_heads = nd.map(|d| d.shared_heads.clone()).unwrap_or_default();
                let in_sync = &node_heads == relay_heads;
                let changes_behind = if in_sync {
                    Some(0)
                } else {
                    inner.behind.get(&(doc.clone(), relay_heads.clone(), node_heads)).copied()
                };
                // Connected and sharing the relay's heads: in sync now.
                let doc_last_sync = if connected && in_sync { Some(now) } else { nd.and_then(|d| d.last_sync) };
                last_sync = last_sync.max(doc_last_sync);
                if in_sync {
                    in_sync_count += 1;
                } else {
                    behind_count += 1;
                    changes += changes_behind.unwrap_or(0);
                }
                let refused = nd.and_then(|d| d.refused.as_deref().cloned());
                refused_count += u64::from(refused.is_some());
                docs.push(DocStatus { doc: doc.clone(), in_sync, changes_behind, last_sync: doc_last_sync, refused });
            }
            let stale = !connected
                && match entry.last_seen {
                    Some(seen) => (now - seen).to_std().unwrap_or_default() > self.stale_after,
                    None => uptime > self.stale_after,
                };
            let state = if stale {
                NodeState::Stale
            } else if behind_count > 0 {
                NodeState::Behind
            } else {
                NodeState::InSync
            };
            let (organisation, name) = self.name_of(node_id);
            nodes.push(NodeStatus {
                node_id: node_id.clone(),
                short_id: short_id(node_id),
                organisation,
                name,
                state,
                connected,
                connections: entry.connections,
                stale,
                last_seen: entry.last_seen,
                remote: entry.remote.map(|r| r.to_string()),
                software: entry.software.clone(),
                bytes_in: entry.bytes_in,
                bytes_out: entry.bytes_out,
                messages_in: entry.messages_in,
                messages_out: entry.messages_out,
                frames_in: entry.frames_in,
                frames_out: entry.frames_out,
                last_error: entry.last_error.as_ref().map(|(_, e)| e.clone()),
                last_error_at: entry.last_error.as_ref().map(|(t, _)| *t),
                last_sync,
                docs_in_sync: in_sync_count,
                docs_behind: behind_count,
                changes_behind: changes,
                docs_refused: refused_count,
                docs,
            });
        }
        let documents = inner.docs.len() as u64;
        drop(inner);
        let rank = |s: NodeState| match s {
            NodeState::Stale => 0,
            NodeState::Behind => 1,
            NodeState::InSync => 2,
        };
        nodes.sort_by(|a, b| rank(a.state).cmp(&rank(b.state)).then_with(|| a.name.cmp(&b.name)));
        let store_bytes = ["", "-wal"]
            .iter()
            .filter_map(|suffix| {
                let mut path = self.db_path.clone().into_os_string();
                path.push(suffix);
                std::fs::metadata(path).ok().map(|m| m.len())
            })
            .sum();
        let count = |f: &dyn Fn(&NodeStatus) -> bool| nodes.iter().filter(|n| f(n)).count() as u64;
        let relay = RelaySummary {
            version: crate::VERSION.to_string(),
            generated_at: now,
            started_at: self.started_at,
            uptime_secs: uptime.as_secs(),
            connections_open: self.metrics.connections_open.get().max(0) as u64,
            connections_total: self.metrics.connections.get(),
            documents,
            documents_loaded: loaded,
            document_loads: loads,
            store_bytes,
            stale_after_secs: self.stale_after.as_secs(),
            nodes: nodes.len() as u64,
            nodes_connected: count(&|n| n.connected),
            nodes_stale: count(&|n| n.state == NodeState::Stale),
            nodes_behind: count(&|n| n.state == NodeState::Behind),
        };
        RelayStatus { relay, nodes }
    }

    /// The Prometheus text exposition (OpenMetrics) of the metrics, refreshed from `status`.
    pub fn render_metrics(&self, status: &RelayStatus) -> String {
        let m = &self.metrics;
        let r = &status.relay;
        let gauge = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        m.uptime_seconds.set(gauge(r.uptime_secs));
        m.documents.set(gauge(r.documents));
        m.documents_loaded.set(gauge(r.documents_loaded));
        m.store_bytes.set(gauge(r.store_bytes));
        {
            // Under the lock, so that two scrapes at once do not both add the same difference.
            let _one_at_a_time = self.lock();
            m.sync_steps_copied.inc_by(m.sync_memo.hits().saturating_sub(m.sync_steps_copied.get()));
            m.document_loads.inc_by(r.document_loads.saturating_sub(m.document_loads.get()));
            m.sync_steps_worked_out.inc_by(m.sync_memo.misses().saturating_sub(m.sync_steps_worked_out.get()));
        }
        for state in [NodeState::InSync, NodeState::Behind, NodeState::Stale] {
            let n = status.nodes.iter().filter(|n| n.state == state).count() as u64;
            m.nodes.get_or_create(&StateLabels { state: state.as_str().to_string() }).set(gauge(n));
        }
        for node in &status.nodes {
            let labels = NodeLabels { node: node.short_id.clone(), name: node.name.clone() };
            m.node_connected.get_or_create(&labels).set(i64::from(node.connected));
            m.node_stale.get_or_create(&labels).set(i64::from(node.stale));
            m.node_documents_behind.get_or_create(&labels).set(gauge(node.docs_behind));
            m.node_changes_behind.get_or_create(&labels).set(gauge(node.changes_behind));
            m.node_last_seen_timestamp_seconds
                .get_or_create(&labels)
                .set(node.last_seen.map(|t| t.timestamp()).unwrap_or(0));
            // Make the counters appear (at 0) for nodes known only from storage.
            let _ = m.node_received_bytes.get_or_create(&labels);
            let _ = m.node_sent_bytes.get_or_create(&labels);
            let _ = m.node_received_messages.get_or_create(&labels);
            let _ = m.node_sent_messages.get_or_create(&labels);
        }
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            warn!(error = %e, "could not encode metrics");
        }
        out
    }
}

/// Counters of one connection already added to the node's totals.
#[derive(Debug, Default, Clone, Copy)]
struct Seen {
    bytes_in: u64,
    bytes_out: u64,
    messages_in: u64,
    messages_out: u64,
    frames_in: u64,
    frames_out: u64,
}

/// Follows one connection for the monitor: created on accept, told when the
/// handshake is done, updated after each step, closed at the end.
#[derive(Debug)]
pub struct ConnectionWatch {
    monitor: Arc<Monitor>,
    remote: SocketAddr,
    peer: Option<String>,
    /// This node's counters, looked up once (not per frame).
    counters: Option<NodeCounters>,
    seen: Seen,
}

/// One node's Prometheus counters: handles on the families' entries.
#[derive(Debug)]
struct NodeCounters {
    received_bytes: Counter,
    sent_bytes: Counter,
    received_messages: Counter,
    sent_messages: Counter,
}

impl NodeCounters {
    fn new(metrics: &RelayMetrics, labels: &NodeLabels) -> Self {
        Self {
            received_bytes: metrics.node_received_bytes.get_or_create(labels).clone(),
            sent_bytes: metrics.node_sent_bytes.get_or_create(labels).clone(),
            received_messages: metrics.node_received_messages.get_or_create(labels).clone(),
            sent_messages: metrics.node_sent_messages.get_or_create(labels).clone(),
        }
    }
}

impl ConnectionWatch {
    /// The node said Hello (call after restoring its sync states): records the
    /// shared heads of every restored state, once.
    pub fn established(&mut self, peer: &str, software: &str, sync: &mut SyncConnection) {
        self.peer = Some(peer.to_string());
        self.counters = Some(NodeCounters::new(&self.monitor.metrics, &self.monitor.labels(peer)));
        let now = self.monitor.now();
        {
            let mut inner = self.monitor.lock();
            let Inner { nodes, docs, .. } = &mut *inner;
            let entry = nodes.entry(peer.to_string()).or_default();
            entry.connections += 1;
            entry.last_seen = Some(now);
            entry.remote = Some(self.remote);
            entry.software = Some(software.to_string());
            for (doc, shared) in sync.shared_heads() {
                record_shared(entry, docs, doc, shared, now);
            }
        }
        sync.take_changed_shared_heads(); // Recorded above.
        self.update(sync, 0, 0);
    }

    /// Copies the connection's counters, and the shared heads of the documents
    /// whose heads changed since the last call, into the registry: the cost
    /// follows what changed, not the number of documents.
    /// `bytes_in`/`bytes_out` are the connection's totals so far.
    pub fn update(&mut self, sync: &mut SyncConnection, bytes_in: u64, bytes_out: u64) {
        let (Some(peer), Some(counters)) = (&self.peer, &self.counters) else { return };
        let stats = sync.stats();
        let now_seen = Seen {
            bytes_in,
            bytes_out,
            messages_in: stats.sync_in,
            messages_out: stats.sync_out,
            frames_in: stats.frames_in,
            frames_out: stats.frames_out,
        };
        let d = |now: u64, before: u64| now.saturating_sub(before);
        let delta = Seen {
            bytes_in: d(now_seen.bytes_in, self.seen.bytes_in),
            bytes_out: d(now_seen.bytes_out, self.seen.bytes_out),
            messages_in: d(now_seen.messages_in, self.seen.messages_in),
            messages_out: d(now_seen.messages_out, self.seen.messages_out),
            frames_in: d(now_seen.frames_in, self.seen.frames_in),
            frames_out: d(now_seen.frames_out, self.seen.frames_out),
        };
        self.seen = now_seen;
        counters.received_bytes.inc_by(delta.bytes_in);
        counters.sent_bytes.inc_by(delta.bytes_out);
        counters.received_messages.inc_by(delta.messages_in);
        counters.sent_messages.inc_by(delta.messages_out);
        let now = self.monitor.now();
        let mut inner = self.monitor.lock();
        let Inner { nodes, docs, .. } = &mut *inner;
        let entry = match nodes.get_mut(peer.as_str()) {
            Some(entry) => entry,
            None => nodes.entry(peer.clone()).or_default(),
        };
        entry.last_seen = Some(now);
        entry.bytes_in += delta.bytes_in;
        entry.bytes_out += delta.bytes_out;
        entry.messages_in += delta.messages_in;
        entry.messages_out += delta.messages_out;
        entry.frames_in += delta.frames_in;
        entry.frames_out += delta.frames_out;
        // A dropped state (`None`) leaves what was known: the node still has what it had.
        for (doc, shared) in sync.take_changed_shared_heads() {
            if let Some(shared) = shared {
                record_shared(entry, docs, &doc, &shared, now);
            }
        }
    }

    /// A document was refused on this connection: `by_node` when the node
    /// refused or held it back, else the relay refused it. Counted per kind
    /// (Prometheus); shown per node and document while it lasts, for documents
    /// the relay holds only (a refusal naming unknown documents is counted,
    /// never stored). Returns when to log, as [`Monitor::document_refused`].
    pub fn doc_refused(&mut self, doc: &DocId, kind: RefusalKind, reason: &str, by_node: bool) -> Option<u64> {
        let due = self.monitor.document_refused(if by_node { "held_back_by_node" } else { kind.label() });
        let Some(peer) = &self.peer else { return due };
        let now = self.monitor.now();
        let mut inner = self.monitor.lock();
        let Inner { nodes, docs, .. } = &mut *inner;
        if docs.contains_key(doc) {
            let entry = nodes.entry(peer.clone()).or_default();
            let node_doc = entry.docs.entry(doc.clone()).or_default();
            // A node holding back what the relay refused: the relay's reason says more.
            if by_node && node_doc.refused.as_ref().is_some_and(|r| r.by == "relay") {
                return due;
            }
            node_doc.refused = Some(Box::new(DocRefusalStatus {
                by: if by_node { "node" } else { "relay" }.to_string(),
                kind: kind.label().to_string(),
                reason: reason.chars().take(300).collect(),
                at: now,
            }));
        }
        due
    }

    /// The connection ended; `error` says why if it failed. The node's record
    /// (last seen, address, software, last error) is kept in `storage`.
    pub fn closed<S: RelayStorage>(self, error: Option<String>, storage: &S) {
        if error.is_some() {
            self.monitor.metrics.connection_errors.inc();
        }
        let Some(peer) = &self.peer else { return };
        let record = {
            let mut inner = self.monitor.lock();
            let Inner { nodes, docs, .. } = &mut *inner;
            let entry = nodes.entry(peer.clone()).or_default();
            entry.connections = entry.connections.saturating_sub(1);
            let now = self.monitor.now();
            entry.last_seen = Some(now);
            // In sync until now on the documents whose shared heads equal the relay's (once per connection).
            for (doc, node_doc) in entry.docs.iter_mut() {
                if docs.get(doc) == Some(&node_doc.shared_heads) {
                    node_doc.last_sync = Some(now);
                }
            }
            if let Some(error) = error {
                entry.last_error = Some((now, error));
            }
            NodeRecord {
                last_seen: entry.last_seen,
                remote: entry.remote,
                software: entry.software.clone(),
                last_error: entry.last_error.clone(),
            }
        };
        let saved = serde_json::to_string(&record)
            .map_err(|e| e.to_string())
            .and_then(|json| storage.save_node_record(peer, &json).map_err(|e| e.to_string()));
        if let Err(e) = saved {
            warn!(%peer, error = %e, "could not keep the node's monitoring record");
        }
    }
}

/// Records a node's shared heads of one document, if the relay holds it (a
/// node cannot make the monitor remember documents that do not exist).
fn record_shared(
    entry: &mut NodeEntry,
    docs: &BTreeMap<DocId, Vec<ChangeHash>>,
    doc: &DocId,
    shared: &[ChangeHash],
    now: DateTime<Utc>,
) {
    let Some(relay_heads) = docs.get(doc) else { return };
    let node_doc = entry.docs.entry(doc.clone()).or_default();
    if node_doc.shared_heads.as_slice() != shared {
        node_doc.shared_heads = sorted(shared);
    }
    if *relay_heads == node_doc.shared_heads {
        node_doc.last_sync = Some(now);
        // In sync again: whatever was refused is settled.
        node_doc.refused = None;
    }
}

impl Drop for ConnectionWatch {
    fn drop(&mut self) {
        self.monitor.metrics.connections_open.dec();
    }
}

/// Renders a status as a readable table (`samverkan-relay status`).
pub fn format_table(status: &RelayStatus) -> String {
    let r = &status.relay;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "samverkan-relay {}, up {}, {} connection(s) open ({} since start)",
        r.version,
        human_duration(r.uptime_secs),
        r.connections_open,
        r.connections_total
    );
    let _ = writeln!(
        out,
        "{} document(s), {} loaded, store {}; {} node(s): {} connected, {} behind, {} stale (stale after {})",
        r.documents,
        r.documents_loaded,
        human_bytes(r.store_bytes),
        r.nodes,
        r.nodes_connected,
        r.nodes_behind,
        r.nodes_stale,
        human_duration(r.stale_after_secs)
    );
    let _ = writeln!(out);
    let headers =
        ["NODE", "ORGANISATION", "ID", "STATE", "CONN", "LAST SEEN", "LAST SYNC", "BEHIND", "IN/OUT", "ERROR"];
    let mut rows: Vec<Vec<String>> = vec![headers.iter().map(|h| h.to_string()).collect()];
    let now = r.generated_at;
    let ago = |t: Option<DateTime<Utc>>| match t {
        Some(t) => format!("{} ago", human_duration((now - t).num_seconds().max(0) as u64)),
        None => "—".to_string(),
    };
    for n in &status.nodes {
        rows.push(vec![
            n.name.clone(),
            n.organisation.clone().unwrap_or_else(|| "—".into()),
            n.short_id.clone(),
            match n.state {
                NodeState::InSync => "in sync".to_string(),
                NodeState::Behind => "BEHIND".to_string(),
                NodeState::Stale => "STALE".to_string(),
            },
            if n.connected { "yes".into() } else { "no".into() },
            if n.connected { "now".into() } else { ago(n.last_seen) },
            ago(n.last_sync),
            match (n.docs_behind, n.docs_refused) {
                (0, 0) => "—".into(),
                (behind, 0) => format!("{behind} doc(s), {} change(s)", n.changes_behind),
                (behind, refused) => {
                    format!("{behind} doc(s), {} change(s), {refused} REFUSED", n.changes_behind)
                }
            },
            format!("{}/{}", human_bytes(n.bytes_in), human_bytes(n.bytes_out)),
            n.last_error.clone().unwrap_or_default(),
        ]);
    }
    let widths: Vec<usize> =
        (0..headers.len()).map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0)).collect();
    for row in &rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell}{}", " ".repeat(w - cell.chars().count())))
            .collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    if status.nodes.is_empty() {
        let _ = writeln!(out, "(no node has connected yet)");
    }
    out
}

fn human_duration(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s} s"),
        s if s < 7200 => format!("{} min", s / 60),
        s if s < 172_800 => format!("{} h", s / 3600),
        s => format!("{} d", s / 86_400),
    }
}

fn human_bytes(bytes: u64) -> String {
    match bytes {
        b if b < 10 * 1024 => format!("{b} B"),
        b if b < 10 * 1024 * 1024 => format!("{} KiB", b / 1024),
        b => format!("{} MiB", b / (1024 * 1024)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, state: NodeState) -> NodeStatus {
        NodeStatus {
            node_id: "ab".repeat(32),
            short_id: "abcd-efgh".into(),
            organisation: Some("Flen".into()),
            name: name.into(),
            state,
            connected: state == NodeState::InSync,
            connections: u64::from(state == NodeState::InSync),
            stale: state == NodeState::Stale,
            last_seen: Some(DateTime::from_timestamp(1_000_000, 0).unwrap()),
            remote: Some("127.0.0.1:5000".into()),
            software: Some("samverkan-node 0.1.0".into()),
            bytes_in: 2048,
            bytes_out: 20 * 1024 * 1024,
            messages_in: 1,
            messages_out: 2,
            frames_in: 3,
            frames_out: 4,
            last_error: (state == NodeState::Stale).then(|| "connection lost".to_string()),
            last_error_at: None,
            last_sync: None,
            docs_in_sync: 0,
            docs_behind: u64::from(state == NodeState::Behind) * 2,
            changes_behind: u64::from(state == NodeState::Behind) * 7,
            docs_refused: 0,
            docs: Vec::new(),
        }
    }

    #[test]
    fn the_table_names_states_lag_and_errors_in_aligned_columns() {
        let at = DateTime::from_timestamp(1_000_000 + 3 * 3600, 0).unwrap();
        let status = RelayStatus {
            relay: RelaySummary {
                version: "0.1.0".into(),
                generated_at: at,
                started_at: at,
                uptime_secs: 90,
                connections_open: 1,
                connections_total: 5,
                documents: 2,
                documents_loaded: 1,
                document_loads: 3,
                store_bytes: 50_000,
                stale_after_secs: 3600,
                nodes: 3,
                nodes_connected: 1,
                nodes_stale: 1,
                nodes_behind: 1,
            },
            nodes: vec![
                node("Vingåker kommun", NodeState::Stale),
                node("Katrineholm", NodeState::Behind),
                node("Flen", NodeState::InSync),
            ],
        };
        let table = format_table(&status);
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].contains("up 90 s") && lines[1].contains("store 48 KiB"), "{table}");
        assert!(lines[3].starts_with("NODE "));
        assert!(lines[4].starts_with("Vingåker kommun") && lines[4].contains("STALE") && lines[4].contains("3 h ago"));
        assert!(lines[4].ends_with("connection lost"), "{table}");
        assert!(lines[5].contains("BEHIND") && lines[5].contains("2 doc(s), 7 change(s)"), "{table}");
        assert!(lines[6].contains("in sync") && lines[6].contains("now") && lines[6].contains("2048 B/20 MiB"));
        let state_column = lines[3].find("STATE").unwrap();
        assert_eq!(lines[4].char_indices().nth(state_column).map(|(_, c)| c), Some('S'), "{table}");
    }

    #[test]
    fn refusals_are_counted_by_reason_and_logged_at_most_once_per_interval() {
        let mut log = RefusalLog::default();
        let t0 = Instant::now();
        assert_eq!(log.due("connection", "not enrolled", t0), Some(0), "the first is logged");
        for _ in 0..2999 {
            assert_eq!(log.due("connection", "not enrolled", t0 + Duration::from_secs(1)), None);
        }
        assert_eq!(log.due("connection", "revoked", t0), Some(0), "each reason has its own line");
        assert_eq!(log.due("document", "not enrolled", t0), Some(0), "and each kind");
        assert_eq!(log.due("connection", "not enrolled", t0 + REFUSAL_LOG_INTERVAL), Some(2999));
        assert_eq!(log.due("connection", "not enrolled", t0 + REFUSAL_LOG_INTERVAL), None);

        let dir = tempfile::tempdir().unwrap();
        let storage = crate::storage::SqliteStorage::open(&dir.path().join("relay.db"), 4).unwrap();
        let monitor = Monitor::new(&MonitorConfig::default(), dir.path().join("relay.db"));
        assert_eq!(monitor.connection_refused("not enrolled"), Some(0));
        assert_eq!(monitor.connection_refused("not enrolled"), None);
        assert_eq!(monitor.document_refused("not a party"), Some(0));
        let status = monitor.snapshot(&storage);
        let metrics = monitor.render_metrics(&status);
        assert!(metrics.contains("samverkan_relay_refused_connections_total{reason=\"not enrolled\"} 2"), "{metrics}");
        assert!(metrics.contains("samverkan_relay_refused_documents_total{reason=\"not a party\"} 1"), "{metrics}");
    }

    #[test]
    fn names_come_from_the_resolver_then_the_table_then_the_short_id() {
        let key = samverkan_shared::identity::NodeKey::generate().node_id();
        let id = key.to_string();
        let mut config = MonitorConfig::default();
        config.names.insert(id.clone(), NodeName::new("Gnesta", "Gnesta kommun"));
        let monitor = Monitor::new(&config, PathBuf::from("/nonexistent"));
        assert_eq!(monitor.name_of(&id), (Some("Gnesta".into()), "Gnesta kommun".into()));
        let wanted = id.clone();
        monitor
            .set_resolver(Some(Arc::new(move |n: &str| (n == wanted).then(|| NodeName::new("Gnesta", "Katalogen")))));
        assert_eq!(monitor.name_of(&id).1, "Katalogen");
        let other = samverkan_shared::identity::NodeKey::generate().node_id();
        assert_eq!(monitor.name_of(&other.to_string()), (None, other.short()));
        assert_eq!(short_id("not-a-key-at-all"), "not-a-key-at");
    }
}
