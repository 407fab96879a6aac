//! The relay's storage interface and its embedded SQLite implementation.
//!
//! Everything the relay keeps durably goes through [`RelayStorage`]: documents
//! (as Automerge changes), an index of their heads and parties for summaries and
//! access control, the sync state it shares with each node, and small metadata
//! values (the enrollment directory). The default is [`SqliteStorage`] over the
//! same store the nodes use; [`postgres::PostgresStorage`] lets several relay
//! instances share one database (they learn of each other's commits through
//! [`RelayStorage::watch_remote`]). Implementations must commit a change
//! durably before returning, and must not hold every document in memory.
//!
//! Every method takes `&self` and may be called from many threads at once:
//! an implementation serialises work per document, not globally. Callers run
//! it on threads of their own (the relay: tokio's blocking pool, a bounded
//! number at a time), never on the async runtime's workers.

pub mod postgres;

use std::sync::Arc;

use automerge::ChangeHash;
use samverkan_shared::acceptance::ContentLimits;
use samverkan_shared::ids::DocId;
use samverkan_shared::model::Document;
use samverkan_shared::org::OrgId;
use samverkan_shared::receipt::ApprovalReceipt;
use samverkan_shared::sync::{SignedChange, StoredWhole};
use samverkan_store::concurrent::{CommitStats, ConcurrentStore};
use samverkan_store::{DocSummary, StoreError};

/// One stored document as the index knows it, without loading it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocEntry {
    /// The document.
    pub id: DocId,
    /// Its current heads.
    pub heads: Vec<ChangeHash>,
    /// Its parties: the organisations whose nodes may sync it (shared with
    /// the storage's index where it keeps one copy per distinct set).
    pub parties: Arc<[OrgId]>,
}

impl TryFrom<DocSummary> for DocEntry {
    type Error = StoreError;

    fn try_from(summary: DocSummary) -> Result<Self, StoreError> {
        Ok(Self { heads: summary.head_hashes()?, id: summary.id, parties: summary.parties.into() })
    }
}

/// Durable storage of the relay.
pub trait RelayStorage: Send + Sync + 'static {
    /// Every stored document with its heads and parties (without loading documents).
    fn index(&self) -> Result<Vec<DocEntry>, StoreError>;

    /// Sets the size limits every stored change is checked against before it
    /// is written (see [`samverkan_shared::acceptance::ContentLimits`]).
    fn set_content_limits(&mut self, limits: ContentLimits);

    /// The index entry of one document, if stored.
    fn entry(&self, doc: &DocId) -> Result<Option<DocEntry>, StoreError>;

    /// Whether `org` is a party of the stored document (`None`: not stored):
    /// the access check of every sync step, which a backend with the index in
    /// memory answers without copying the entry.
    fn is_party(&self, doc: &DocId, org: &OrgId) -> Result<Option<bool>, StoreError> {
        Ok(self.entry(doc)?.map(|entry| entry.parties.contains(org)))
    }

    /// Runs `f` on a document (an empty one if missing and `create`), and durably
    /// stores whatever changes it made, with the authors' signatures and the
    /// approval receipts `f` returns, in one transaction. `Ok(None)` if missing
    /// and not `create`. If `f` fails, or the document does not follow the
    /// schema afterwards, nothing is stored and the in-memory copy is discarded.
    #[allow(clippy::type_complexity)]
    fn with_doc<R, E: From<StoreError>>(
        &self,
        doc: &DocId,
        create: bool,
        f: impl FnOnce(&mut Document) -> Result<(R, Vec<SignedChange>, Vec<ApprovalReceipt>), E>,
    ) -> Result<Option<R>, E>;

    /// The stored authors' signatures of these changes (those known).
    fn signatures(&self, hashes: &[ChangeHash]) -> Result<Vec<SignedChange>, StoreError>;

    /// What is stored of a document to send it whole to a node that has none
    /// of it, without loading it ([`StoredWhole`]); `None` when loading is
    /// needed or cheaper. The default always loads.
    fn stored_whole(&self, _doc: &DocId) -> Result<Option<StoredWhole>, StoreError> {
        Ok(None)
    }

    // The reads below answer from memory without waiting, or `None`: a
    // connection uses them to pass a change on from the async runtime's thread
    // (see `samverkan_shared::sync::MemoryAccess`), and on `None` uses the
    // methods above on a thread where waiting is allowed. A backend without
    // such a memory keeps the defaults, which always answer `None`.

    /// Whether `org` is a party of the document (`Some(None)`: not stored), from memory.
    fn cached_is_party(&self, _doc: &DocId, _org: &OrgId) -> Option<Option<bool>> {
        None
    }

    /// Runs `f` on the document if it is loaded and no other thread holds it
    /// now, without waiting. `f` only reads (it generates a sync message, or
    /// takes an acknowledgement); one that changed the document's heads gets
    /// `None`, and the copy is dropped, as its change is stored nowhere.
    fn try_with_loaded<R>(&self, _doc: &DocId, _f: impl FnOnce(&mut Document) -> R) -> Option<R> {
        None
    }

    /// The signatures of `hashes` if every one is in memory.
    fn cached_signatures(&self, _hashes: &[ChangeHash]) -> Option<Vec<SignedChange>> {
        None
    }

    /// The document's approval receipts if they are in memory.
    fn cached_receipts(&self, _doc: &DocId) -> Option<Arc<Vec<ApprovalReceipt>>> {
        None
    }

    /// The relay's approval receipts of a document's records.
    fn receipts(&self, doc: &DocId) -> Result<Vec<ApprovalReceipt>, StoreError>;

    /// Stores receipts (keeping the first of each record); returns how many were new.
    fn add_receipts(&self, receipts: &[ApprovalReceipt]) -> Result<usize, StoreError>;

    /// Sync states persisted for a peer.
    fn sync_states(&self, peer: &str) -> Result<Vec<(DocId, Vec<u8>)>, StoreError>;

    /// Every peer with persisted sync states (the nodes the relay has served).
    fn peers(&self) -> Result<Vec<String>, StoreError> {
        Ok(Vec::new())
    }

    /// The monitoring record kept for each peer (see [`crate::monitor`]): last
    /// seen, address, software, last error, so a restarted relay still knows them.
    fn node_records(&self) -> Result<Vec<(String, String)>, StoreError> {
        Ok(Vec::new())
    }

    /// Stores a peer's monitoring record (replacing the earlier one).
    fn save_node_record(&self, _peer: &str, _record: &str) -> Result<(), StoreError> {
        Ok(())
    }

    /// Persists a peer's sync states, replacing all stored for it before
    /// (states of documents not given are deleted).
    fn save_sync_states(&self, peer: &str, states: Vec<(DocId, Vec<u8>)>) -> Result<(), StoreError>;

    /// A metadata value.
    fn meta(&self, key: &str) -> Result<Option<String>, StoreError>;

    /// Changes a metadata value atomically (see [`samverkan_store::Store::update_meta`]).
    fn update_meta<E: From<StoreError>>(
        &self,
        key: &str,
        f: impl FnOnce(Option<String>) -> Result<Option<String>, E>,
    ) -> Result<Option<String>, E>;

    /// Drops a document from memory (it stays stored).
    fn evict(&self, doc: &DocId);

    /// A number that changes whenever another process commits to the storage
    /// (the operator's `samverkan-relay enroll` while the relay runs), read
    /// cheaply; `None` if the implementation cannot tell, and the relay then
    /// re-reads the enrollment directory every time it would look.
    fn external_changes(&self) -> Result<Option<i64>, StoreError> {
        Ok(None)
    }

    /// Number of documents held in memory.
    fn loaded(&self) -> usize;

    /// How many times a document was loaded from storage into memory since
    /// start: far more loads than documents means `cached_documents` is too
    /// small for how many are in use.
    fn document_loads(&self) -> u64;

    /// Starts telling `on_event` (from a thread of the storage's own) what other
    /// relay instances sharing this storage commit. Returns whether the storage
    /// is shared at all: the default (one process) never calls `on_event`.
    fn watch_remote(&self, _on_event: Arc<dyn Fn(RemoteEvent) + Send + Sync>) -> Result<bool, StoreError> {
        Ok(false)
    }

    /// Records that connection `conn` of node `peer` was established here, and
    /// enforces the per-key limit across every instance: of the node's
    /// connections on all instances the `keep` newest stay; older ones on other
    /// instances are asked to close ([`RemoteEvent::Close`]) and the local ones
    /// to close are returned. `None` (the default): the storage does not track
    /// connections, and the local count is the whole truth.
    fn connection_opened(&self, _peer: &str, _conn: u64, _keep: usize) -> Result<Option<Vec<u64>>, StoreError> {
        Ok(None)
    }

    /// Records that connection `conn` (of this instance) ended.
    fn connection_closed(&self, _conn: u64) -> Result<(), StoreError> {
        Ok(())
    }
}

/// What another relay instance sharing the storage did (see [`RelayStorage::watch_remote`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RemoteEvent {
    /// It stored changes to a document: this instance's connections are owed them.
    DocChanged(DocId),
    /// It changed metadata (the enrollment directory, join codes).
    MetaChanged,
    /// Notifications may have been missed (the listener reconnected): every
    /// document and the directory may have changed.
    Missed,
    /// It asks this instance to close one of its connections (the node's
    /// connections across instances are over the per-key limit).
    Close {
        /// The connection, as this instance numbered it.
        conn: u64,
        /// Why, for the node.
        reason: String,
    },
}

/// Metadata key prefix of the monitoring record of each node.
const NODE_RECORD_PREFIX: &str = "monitor.node.";

/// The embedded default: one SQLite file in the relay's data directory,
/// reached through a [`ConcurrentStore`]: per-document locks, WAL read
/// connections, group commit and compaction in the background.
#[derive(Debug)]
pub struct SqliteStorage {
    store: ConcurrentStore,
}

impl SqliteStorage {
    /// Opens (or creates) the relay database, keeping at most `cache` documents loaded.
    pub fn open(path: &std::path::Path, cache: usize) -> Result<Self, StoreError> {
        Ok(Self { store: ConcurrentStore::open(path, cache, ContentLimits::default())? })
    }

    /// Commits, grouped updates and background compactions so far.
    pub fn commit_stats(&self) -> CommitStats {
        self.store.stats()
    }
}

impl RelayStorage for SqliteStorage {
    fn set_content_limits(&mut self, limits: ContentLimits) {
        self.store.set_content_limits(limits);
    }

    fn index(&self) -> Result<Vec<DocEntry>, StoreError> {
        let entries = self.store.entries().into_iter();
        Ok(entries.map(|(id, e)| DocEntry { id, heads: e.heads, parties: e.parties }).collect())
    }

    fn entry(&self, doc: &DocId) -> Result<Option<DocEntry>, StoreError> {
        Ok(self.store.entry(doc).map(|e| DocEntry { id: doc.clone(), heads: e.heads, parties: e.parties }))
    }

    fn is_party(&self, doc: &DocId, org: &OrgId) -> Result<Option<bool>, StoreError> {
        Ok(self.store.with_entry(doc, |entry| entry.parties.contains(org)))
    }

    fn cached_is_party(&self, doc: &DocId, org: &OrgId) -> Option<Option<bool>> {
        Some(self.store.with_entry(doc, |entry| entry.parties.contains(org)))
    }

    fn try_with_loaded<R>(&self, doc: &DocId, f: impl FnOnce(&mut Document) -> R) -> Option<R> {
        self.store.try_with_loaded(doc, f)
    }

    fn cached_signatures(&self, hashes: &[ChangeHash]) -> Option<Vec<SignedChange>> {
        self.store.cached_signatures(hashes)
    }

    fn cached_receipts(&self, doc: &DocId) -> Option<Arc<Vec<ApprovalReceipt>>> {
        self.store.cached_receipts(doc)
    }

    fn with_doc<R, E: From<StoreError>>(
        &self,
        doc: &DocId,
        create: bool,
        f: impl FnOnce(&mut Document) -> Result<(R, Vec<SignedChange>, Vec<ApprovalReceipt>), E>,
    ) -> Result<Option<R>, E> {
        let updated = self
            .store
            .with_doc(doc, create, |d| f(d).map(|(value, signatures, receipts)| (value, (signatures, receipts))))?;
        Ok(updated.map(|(value, _)| value))
    }

    fn signatures(&self, hashes: &[ChangeHash]) -> Result<Vec<SignedChange>, StoreError> {
        self.store.signatures(hashes)
    }

    fn stored_whole(&self, doc: &DocId) -> Result<Option<StoredWhole>, StoreError> {
        self.store.stored_whole(doc)
    }

    fn receipts(&self, doc: &DocId) -> Result<Vec<ApprovalReceipt>, StoreError> {
        Ok(self.store.receipts(doc)?.as_ref().clone())
    }

    fn add_receipts(&self, receipts: &[ApprovalReceipt]) -> Result<usize, StoreError> {
        self.store.add_receipts(receipts)
    }

    fn sync_states(&self, peer: &str) -> Result<Vec<(DocId, Vec<u8>)>, StoreError> {
        self.store.sync_states(peer)
    }

    fn peers(&self) -> Result<Vec<String>, StoreError> {
        self.store.sync_peers()
    }

    fn node_records(&self) -> Result<Vec<(String, String)>, StoreError> {
        let records = self.store.meta_with_prefix(NODE_RECORD_PREFIX)?;
        Ok(records
            .into_iter()
            .filter_map(|(k, v)| Some((k.strip_prefix(NODE_RECORD_PREFIX)?.to_string(), v)))
            .collect())
    }

    fn save_node_record(&self, peer: &str, record: &str) -> Result<(), StoreError> {
        self.store.set_meta(&format!("{NODE_RECORD_PREFIX}{peer}"), record)
    }

    fn save_sync_states(&self, peer: &str, states: Vec<(DocId, Vec<u8>)>) -> Result<(), StoreError> {
        self.store.replace_sync_states(peer, states)
    }

    fn meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.store.meta(key)
    }

    fn update_meta<E: From<StoreError>>(
        &self,
        key: &str,
        f: impl FnOnce(Option<String>) -> Result<Option<String>, E>,
    ) -> Result<Option<String>, E> {
        self.store.update_meta(key, f)
    }

    fn evict(&self, doc: &DocId) {
        self.store.evict(doc);
    }

    /// SQLite's `data_version` of the relay's write connection: changed by
    /// every commit of another process, not by the relay's own.
    fn external_changes(&self) -> Result<Option<i64>, StoreError> {
        self.store.data_version().map(Some)
    }

    fn loaded(&self) -> usize {
        self.store.loaded()
    }

    fn document_loads(&self) -> u64 {
        self.store.document_loads()
    }
}
