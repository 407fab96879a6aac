//! The store shared by many threads at once: the relay's storage.
//!
//! [`Store`] is one SQLite connection used by one thread at a time; the relay
//! serves many connections, and a global lock around one `Store` made every
//! connection wait for every other one's Automerge work and fsync.
//! [`ConcurrentStore`] instead has:
//!
//! - **per-document locks**: each document is kept loaded in its own slot
//!   (a bounded number, least recently used unloaded first), and only work on
//!   the same document waits. Generating a sync message from a loaded
//!   document touches no SQLite at all; only changes are written.
//! - **read connections** (WAL readers, never blocked by the writer) for the
//!   index, summaries, signatures, receipts, sync states and metadata.
//! - **group commit** on one write connection: the updates that arrive while
//!   one commit is in flight are written together in the next one (each in its
//!   own savepoint), across documents; every caller returns only once its own
//!   update is durable (`synchronous=FULL`), or with the reason it is not.
//! - **compaction in the background**: a thread folds a document's increments
//!   into a new snapshot in its own transaction, never inside an update.
//!
//! Every change to a document goes through its slot, so a document's history
//! in memory and on disk never diverge; this process must be the only one that
//! writes documents to the file (other processes — the operator's `enroll`,
//! `revoke` — write metadata only, which is always read from the database).
//!
//! Everything here blocks: callers run it on threads of their own (the relay
//! uses tokio's blocking pool), never on an async runtime's workers.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock, Weak};

use automerge::{AutoCommit, ChangeHash};
use samverkan_shared::acceptance::ContentLimits;
use samverkan_shared::ids::DocId;
use samverkan_shared::model::Document;
use samverkan_shared::org::{OrgId, PartySets};
use samverkan_shared::receipt::ApprovalReceipt;
use samverkan_shared::sync::StoredWhole;

use crate::slots::{read_only, Slot, Slots};
use crate::{DocSummary, DocWrite, SizeBefore, Store, StoreError, UpdateOutcome, COMPACT_AFTER_ROWS};
use recent_signatures::RecentSignatures;

/// How many read connections a [`ConcurrentStore`] keeps.
pub const READ_CONNECTIONS: usize = 4;

/// What an update function returns beside its value: the signatures of the
/// changes it received and the approval receipts it issued, stored with them.
pub type Extras = (Vec<(ChangeHash, [u8; 64])>, Vec<ApprovalReceipt>);

/// Counters of the group commit, for the operator and the benchmark.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CommitStats {
    /// Commits made.
    pub commits: u64,
    /// Document updates written by them.
    pub updates: u64,
    /// Background compactions done.
    pub compactions: u64,
}

/// A thread-safe store with per-document locks, WAL readers, group commit and
/// background compaction (see the module documentation).
#[derive(Debug)]
pub struct ConcurrentStore {
    inner: Arc<Inner>,
    /// Documents to compact; the background thread ends when this is dropped.
    compact: Mutex<Option<mpsc::Sender<DocId>>>,
}

#[derive(Debug)]
struct Inner {
    limits: RwLock<ContentLimits>,
    /// Every stored document's heads and parties, kept in step with the
    /// writes (this process writes all documents): access checks and
    /// summaries without a query.
    index: RwLock<Index>,
    /// Approval receipts by document, read once and dropped when they change.
    receipts: RwLock<HashMap<DocId, Arc<Vec<ApprovalReceipt>>>>,
    /// Bumped whenever cached receipts are dropped: a read that raced a
    /// change is not kept.
    receipts_epoch: AtomicU64,
    /// Signatures of changes just stored or read: each is asked for by every
    /// connection the change is forwarded to.
    recent_signatures: Mutex<RecentSignatures>,
    writer: Mutex<Store>,
    readers: Vec<Mutex<Store>>,
    next_reader: AtomicUsize,
    slots: Slots<Held>,
    group: GroupCommit,
    compacting: Mutex<HashSet<DocId>>,
    compactions: AtomicU64,
    /// Documents loaded from the database since open.
    loads: AtomicU64,
}

impl ConcurrentStore {
    /// Opens (or creates, and migrates) the database at `path`, keeping at
    /// most `cache` documents loaded.
    pub fn open(path: &Path, cache: usize, limits: ContentLimits) -> Result<Self, StoreError> {
        let mut writer = Store::open_or_create(path)?;
        writer.set_cache_capacity(0);
        writer.keep_snapshot_tips_on_write(true);
        writer.set_content_limits(limits);
        let readers = (0..READ_CONNECTIONS)
            .map(|_| {
                let mut reader = Store::open(path)?;
                reader.set_cache_capacity(0);
                Ok(Mutex::new(reader))
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        let mut index = Index::default();
        writer.for_each_summary(|summary| {
            index.insert(summary.id.clone(), summary.head_hashes()?, &summary.parties);
            Ok(())
        })?;
        let inner = Arc::new(Inner {
            limits: RwLock::new(limits),
            index: RwLock::new(index),
            receipts: RwLock::new(HashMap::new()),
            receipts_epoch: AtomicU64::new(0),
            recent_signatures: Mutex::new(RecentSignatures::default()),
            writer: Mutex::new(writer),
            readers,
            next_reader: AtomicUsize::new(0),
            slots: Slots::new(cache),
            group: GroupCommit::default(),
            compacting: Mutex::new(HashSet::new()),
            compactions: AtomicU64::new(0),
            loads: AtomicU64::new(0),
        });
        let (sender, receiver) = mpsc::channel::<DocId>();
        let weak = Arc::downgrade(&inner);
        std::thread::Builder::new()
            .name("samverkan-compact".into())
            .spawn(move || compact_in_background(weak, receiver))
            .map_err(|e| StoreError::CommitFailed(format!("cannot start the compaction thread: {e}")))?;
        if lock(&inner.writer).snapshot_tips_pending()? {
            let weak = Arc::downgrade(&inner);
            std::thread::Builder::new()
                .name("samverkan-tips".into())
                .spawn(move || fill_tips_in_background(weak))
                .map_err(|e| StoreError::CommitFailed(format!("cannot start the snapshot tips thread: {e}")))?;
        }
        Ok(Self { inner, compact: Mutex::new(Some(sender)) })
    }

    /// The size limits every update is checked against.
    pub fn content_limits(&self) -> ContentLimits {
        *self.inner.limits.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets the size limits every later update is checked against.
    pub fn set_content_limits(&self, limits: ContentLimits) {
        *self.inner.limits.write().unwrap_or_else(|e| e.into_inner()) = limits;
    }

    /// Runs `f` on a document (an empty one if it is not stored and `create`)
    /// while holding that document's lock, and durably stores the changes it
    /// made, with the signatures and receipts it returns, before returning.
    /// `Ok(None)` when the document is not stored and not `create`. If `f`
    /// fails, or the document is not readable or over the limits afterwards,
    /// nothing is stored and the loaded copy is dropped (reloaded next time).
    pub fn with_doc<T, E>(
        &self,
        id: &DocId,
        create: bool,
        f: impl FnOnce(&mut Document) -> Result<(T, Extras), E>,
    ) -> Result<Option<(T, UpdateOutcome)>, E>
    where
        E: From<StoreError>,
    {
        let slot = self.inner.slots.slot(id);
        let result = self.with_doc_in(id, &slot, create, f);
        // A slot left without a document (one not stored, or not kept: named by
        // a peer and still empty, refused, or dropped after an error) goes, so
        // that naming any number of documents leaves nothing behind.
        self.inner.slots.forget_if_idle(id, slot);
        result
    }

    /// [`Self::with_doc`] in the document's slot.
    fn with_doc_in<T, E>(
        &self,
        id: &DocId,
        slot: &Slot<Held>,
        create: bool,
        f: impl FnOnce(&mut Document) -> Result<(T, Extras), E>,
    ) -> Result<Option<(T, UpdateOutcome)>, E>
    where
        E: From<StoreError>,
    {
        let inner = &*self.inner;
        let mut held = slot.lock();
        if held.is_none() {
            match inner.read(|r| r.load_for_update(id))? {
                Some(loaded) => {
                    inner.loads.fetch_add(1, Ordering::Relaxed);
                    inner.slots.put(&mut held, Held::from(loaded));
                }
                None if create => {}
                None => return Ok(None),
            }
        }
        let taken = inner.slots.take(&mut held);
        let (mut doc, size_before, increments, last_seq) = match taken {
            Some(h) => (h.doc, h.size, h.increments, h.last_seq),
            None => (
                Document::from_automerge(id.clone(), AutoCommit::new()).map_err(StoreError::from)?,
                SizeBefore::New,
                0,
                0,
            ),
        };
        let created = size_before == SizeBefore::New;
        let before = doc.heads();
        // On any error below the document (which `f` may have half changed) is dropped.
        let (value, (signatures, receipts)) = f(&mut doc)?;
        let heads = doc.heads();
        if heads == before || doc.is_empty() {
            if !created {
                inner.slots.put(&mut held, Held { doc, size: size_before, increments, last_seq });
            }
            drop(held);
            inner.slots.unload_beyond_capacity();
            return Ok(Some((value, UpdateOutcome { new_bytes: 0, heads, created: false })));
        }
        let limits = self.content_limits();
        let mut write = DocWrite::prepare(&mut doc, &before, size_before, &limits, signatures, receipts, None)?;
        if write.created {
            // A new document is stored as a snapshot: with its authors' tips, to be sent whole later.
            write.tips = crate::snapshot_tips(doc.automerge_mut());
        }
        let new_bytes = write.data.len();
        let size = write.size.map_or(SizeBefore::NotCounted, SizeBefore::Stored);
        let (heads_after, parties) = (write.heads.clone(), write.parties.clone());
        let new_receipts = !write.receipts.is_empty();
        let signatures = write.signatures.clone();
        let seq = inner.group.submit(&inner.writer, write)?;
        write_lock(&inner.index).insert(id.clone(), heads_after, &parties);
        lock(&inner.recent_signatures).insert(signatures);
        if new_receipts {
            inner.forget_receipts(std::iter::once(id));
        }
        let (increments, last_seq) = match seq {
            Some(seq) => (increments + 1, seq),
            None => (0, 0),
        };
        inner.slots.put(&mut held, Held { doc, size, increments, last_seq });
        drop(held);
        if increments >= COMPACT_AFTER_ROWS {
            self.request_compaction(id);
        }
        inner.slots.unload_beyond_capacity();
        Ok(Some((value, UpdateOutcome { new_bytes, heads, created })))
    }

    fn request_compaction(&self, id: &DocId) {
        if !lock(&self.inner.compacting).insert(id.clone()) {
            return; // Already queued.
        }
        if let Some(sender) = lock(&self.compact).as_ref() {
            if sender.send(id.clone()).is_err() {
                lock(&self.inner.compacting).remove(id);
            }
        }
    }

    /// Every stored document, most recently changed first (from a read connection).
    pub fn list(&self) -> Result<Vec<DocSummary>, StoreError> {
        self.inner.read(|r| r.list())
    }

    /// One document's summary, if stored (from a read connection).
    pub fn summary(&self, id: &DocId) -> Result<Option<DocSummary>, StoreError> {
        self.inner.read(|r| r.summary(id))
    }

    /// The stored authors' signatures of these changes (those known).
    pub fn signatures(&self, hashes: &[ChangeHash]) -> Result<Vec<(ChangeHash, [u8; 64])>, StoreError> {
        let (mut found, missing) = lock(&self.inner.recent_signatures).lookup(hashes);
        if !missing.is_empty() {
            let read = self.inner.read(|r| r.signatures(&missing))?;
            lock(&self.inner.recent_signatures).insert(read.iter().copied());
            found.extend(read);
        }
        Ok(found)
    }

    /// The stored approval receipts of a document (kept in memory once read).
    pub fn receipts(&self, id: &DocId) -> Result<Arc<Vec<ApprovalReceipt>>, StoreError> {
        if let Some(found) = read_lock(&self.inner.receipts).get(id) {
            return Ok(found.clone());
        }
        if !read_lock(&self.inner.index).entries.contains_key(id) {
            return Ok(Arc::new(Vec::new())); // Nothing kept for ids that are not stored.
        }
        let epoch = self.inner.receipts_epoch.load(Ordering::SeqCst);
        let read = Arc::new(self.inner.read(|r| r.receipts(id))?);
        let mut cached = write_lock(&self.inner.receipts);
        if self.inner.receipts_epoch.load(Ordering::SeqCst) == epoch {
            cached.insert(id.clone(), read.clone());
        }
        Ok(read)
    }

    /// The approval receipts of a document if they are in memory (`None`:
    /// reading them would need the database).
    pub fn cached_receipts(&self, id: &DocId) -> Option<Arc<Vec<ApprovalReceipt>>> {
        read_lock(&self.inner.receipts).get(id).cloned()
    }

    /// The signatures of `hashes` if every one is in memory (`None`: reading
    /// them would need the database).
    pub fn cached_signatures(&self, hashes: &[ChangeHash]) -> Option<Vec<(ChangeHash, [u8; 64])>> {
        let (found, missing) = lock(&self.inner.recent_signatures).lookup(hashes);
        missing.is_empty().then_some(found)
    }

    /// Runs `f` on a document if it is loaded and no other thread holds it
    /// now, without loading it or waiting: `None` otherwise. `f` only reads
    /// (it generates a sync message); were it to change the document's heads,
    /// the change would not be stored, so its value is not returned (`None`)
    /// and that copy is dropped (the document is loaded again from the
    /// database at its next use): see [`crate::slots::read_only`].
    pub fn try_with_loaded<R>(&self, id: &DocId, f: impl FnOnce(&mut Document) -> R) -> Option<R> {
        self.inner.slots.try_with_loaded(id, |loaded| read_only(&mut loaded.doc, f)).flatten()
    }

    /// Stores receipts (keeping the first of each record); returns how many were new.
    pub fn add_receipts(&self, receipts: &[ApprovalReceipt]) -> Result<usize, StoreError> {
        let added = lock(&self.inner.writer).add_receipts(receipts);
        self.inner.forget_receipts(receipts.iter().map(|r| &r.doc));
        added
    }

    /// What storage holds of a document to send it whole without loading it
    /// ([`Store::stored_whole`], on a read connection); `None` when it is
    /// loaded or in use (sending it from memory costs less) or cannot be sent so.
    pub fn stored_whole(&self, id: &DocId) -> Result<Option<StoredWhole>, StoreError> {
        if self.inner.slots.is_held(id) {
            return Ok(None);
        }
        self.inner.read(|r| r.stored_whole(id))
    }

    /// A stored document's heads and parties, from memory; `None` if not stored.
    pub fn entry(&self, id: &DocId) -> Option<IndexEntry> {
        read_lock(&self.inner.index).entries.get(id).cloned()
    }

    /// `f` of one stored document's index entry, from memory, without copying it.
    pub fn with_entry<R>(&self, id: &DocId, f: impl FnOnce(&IndexEntry) -> R) -> Option<R> {
        read_lock(&self.inner.index).entries.get(id).map(f)
    }

    /// Every stored document's heads and parties, from memory.
    pub fn entries(&self) -> Vec<(DocId, IndexEntry)> {
        read_lock(&self.inner.index).entries.iter().map(|(id, entry)| (id.clone(), entry.clone())).collect()
    }

    /// The sync states persisted for a peer.
    pub fn sync_states(&self, peer: &str) -> Result<Vec<(DocId, Vec<u8>)>, StoreError> {
        self.inner.read(|r| r.sync_states(peer))
    }

    /// Every peer with persisted sync states.
    pub fn sync_peers(&self) -> Result<Vec<String>, StoreError> {
        self.inner.read(|r| r.sync_peers())
    }

    /// Replaces every sync state of `peer` by `states` in one transaction.
    pub fn replace_sync_states(&self, peer: &str, states: Vec<(DocId, Vec<u8>)>) -> Result<(), StoreError> {
        lock(&self.inner.writer).replace_sync_states(peer, states)
    }

    /// A metadata value (from a read connection: what is committed now).
    pub fn meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.inner.read(|r| r.meta(key))
    }

    /// Every metadata entry whose key starts with `prefix`.
    pub fn meta_with_prefix(&self, prefix: &str) -> Result<Vec<(String, String)>, StoreError> {
        self.inner.read(|r| r.meta_with_prefix(prefix))
    }

    /// Writes a metadata value durably.
    pub fn set_meta(&self, key: &str, value: &str) -> Result<(), StoreError> {
        lock(&self.inner.writer).set_meta(key, value)
    }

    /// Changes a metadata value atomically (see [`Store::update_meta`]).
    pub fn update_meta<E: From<StoreError>>(
        &self,
        key: &str,
        f: impl FnOnce(Option<String>) -> Result<Option<String>, E>,
    ) -> Result<Option<String>, E> {
        lock(&self.inner.writer).update_meta(key, f)
    }

    /// Changes whenever another process commits to the database (the write
    /// connection's `data_version`: this process's readers never write).
    pub fn data_version(&self) -> Result<i64, StoreError> {
        lock(&self.inner.writer).data_version()
    }

    /// How many times a document was loaded from the database since open
    /// (a document pushed out beyond the capacity is loaded again when next needed).
    pub fn document_loads(&self) -> u64 {
        self.inner.loads.load(Ordering::Relaxed)
    }

    /// Unloads a document (it stays stored) unless it is in use right now.
    pub fn evict(&self, id: &DocId) {
        self.inner.slots.unload(id);
    }

    /// How many documents are loaded.
    pub fn loaded(&self) -> usize {
        self.inner.slots.loaded()
    }

    /// Commits, updates and compactions so far.
    pub fn stats(&self) -> CommitStats {
        let group = lock(&self.inner.group.state);
        CommitStats {
            commits: group.commits,
            updates: group.updates,
            compactions: self.inner.compactions.load(Ordering::Relaxed),
        }
    }

    /// Compacts a document now, on the caller's thread (tests and tools).
    pub fn compact_now(&self, id: &DocId) -> Result<(), StoreError> {
        self.inner.compact(id)
    }
}

impl Drop for ConcurrentStore {
    fn drop(&mut self) {
        // Ends the compaction thread once it has finished what is queued.
        lock(&self.compact).take();
    }
}

impl Inner {
    /// Drops the cached receipts of these documents (after a commit changed them).
    fn forget_receipts<'a>(&self, docs: impl Iterator<Item = &'a DocId>) {
        let mut cached = write_lock(&self.receipts);
        self.receipts_epoch.fetch_add(1, Ordering::SeqCst);
        for doc in docs {
            cached.remove(doc);
        }
    }

    /// Runs `f` on a free read connection (or waits for one).
    fn read<T>(&self, f: impl FnOnce(&Store) -> Result<T, StoreError>) -> Result<T, StoreError> {
        let n = self.readers.len();
        let start = self.next_reader.fetch_add(1, Ordering::Relaxed) % n;
        for i in 0..n {
            match self.readers[(start + i) % n].try_lock() {
                Ok(reader) => return f(&reader),
                Err(std::sync::TryLockError::Poisoned(poisoned)) => return f(&poisoned.into_inner()),
                Err(std::sync::TryLockError::WouldBlock) => {}
            }
        }
        f(&lock(&self.readers[start]))
    }

    /// Folds a document's increments into a new snapshot: the document is
    /// copied under its lock (so the copy holds exactly the rows up to the
    /// last one written), saved after, without the lock (a save of a long
    /// history takes several times as long as the copy), and written in a
    /// transaction of its own.
    fn compact(&self, id: &DocId) -> Result<(), StoreError> {
        let slot = self.slots.slot(id);
        let (mut copy, upto, folded) = {
            let mut held = slot.lock();
            if held.is_none() {
                let Some(loaded) = self.read(|r| r.load_for_update(id))? else { return Ok(()) };
                self.loads.fetch_add(1, Ordering::Relaxed);
                self.slots.put(&mut held, Held::from(loaded));
            }
            let Some(h) = held.as_mut() else { return Ok(()) };
            if h.increments == 0 {
                return Ok(());
            }
            (h.doc.automerge().clone(), h.last_seq, h.increments)
        };
        let tips = crate::snapshot_tips(&mut copy);
        let snapshot = copy.save();
        lock(&self.writer).compact_upto(id, &snapshot, &tips, upto)?;
        if let Some(h) = slot.lock().as_mut() {
            h.increments = (h.increments - folded).max(0);
        }
        self.compactions.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// The compaction thread: compacts each requested document in turn until
/// the store is dropped.
fn compact_in_background(inner: Weak<Inner>, requests: mpsc::Receiver<DocId>) {
    while let Ok(id) = requests.recv() {
        let Some(inner) = inner.upgrade() else { return };
        lock(&inner.compacting).remove(&id);
        if let Err(e) = inner.compact(&id) {
            // The increments stay; the next request tries again.
            tracing::warn!(doc = %id, error = %e, "background compaction failed");
        }
    }
}

/// Works out, one document at a time, the author tips of the snapshots
/// written before schema 8, so that those documents too can be sent whole
/// without loading them (`Store::stored_whole`): loaded on a read
/// connection, kept in a short write of their own, until the store is
/// dropped; then records that it is done (a damaged snapshot is left to
/// loading, which reports it), so that the next start does not look again.
fn fill_tips_in_background(inner: Weak<Inner>) {
    let started = std::time::Instant::now();
    let docs = match inner.upgrade().map(|inner| inner.read(|r| r.snapshots_without_tips())) {
        Some(Ok(docs)) => docs,
        Some(Err(e)) => return tracing::warn!(error = %e, "could not list the snapshots without authors' tips"),
        None => return,
    };
    let mut kept = 0usize;
    for id in &docs {
        let Some(inner) = inner.upgrade() else { return };
        let found = inner.read(|r| r.tips_for_snapshot(id));
        let result = match found {
            Ok(Some((sum, tips))) => lock(&inner.writer).keep_snapshot_tips(id, &sum, &tips),
            Ok(None) => Ok(false),
            Err(e) => Err(e),
        };
        match result {
            Ok(true) => kept += 1,
            Ok(false) => {}
            // Left to loading, which reports the damage where it matters.
            Err(e) => tracing::warn!(doc = %id, error = %e, "could not work out the authors' tips of a snapshot"),
        }
    }
    if let Some(inner) = inner.upgrade() {
        if let Err(e) = lock(&inner.writer).snapshot_tips_worked_out() {
            tracing::warn!(error = %e, "could not record that the snapshots' tips were worked out");
        }
    }
    tracing::info!(
        kept,
        of = docs.len(),
        ms = started.elapsed().as_millis() as u64,
        "kept the authors' tips of snapshots written before schema 8"
    );
}

/// What the index keeps of a stored document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexEntry {
    /// Its heads.
    pub heads: Vec<ChangeHash>,
    /// Its parties, in the document's order: one shared copy per distinct set.
    pub parties: Arc<[OrgId]>,
}

/// Every stored document's heads and parties. Documents share a few sets of
/// parties (the county's agreements have all of them, a municipality's
/// promise its own and the police), so each distinct set is kept once: an
/// idle document costs its entry, not a copy of every party's name.
#[derive(Debug, Default)]
struct Index {
    entries: HashMap<DocId, IndexEntry>,
    party_sets: PartySets,
}

impl Index {
    /// Records `id`'s heads and parties (sharing an equal set already held).
    fn insert(&mut self, id: DocId, heads: Vec<ChangeHash>, parties: &[OrgId]) {
        let parties = self.party_sets.share(parties);
        self.entries.insert(id, IndexEntry { heads, parties });
    }
}

/// A loaded document with where it stands on disk.
#[derive(Debug)]
struct Held {
    doc: Document,
    /// Its size in change bytes (the relay always counts it: never `New*`).
    size: SizeBefore,
    /// Increment rows beside its snapshot.
    increments: i64,
    /// The last increment row it holds.
    last_seq: i64,
}

impl From<crate::ForUpdate> for Held {
    fn from(loaded: crate::ForUpdate) -> Self {
        Self { doc: loaded.doc, size: loaded.size, increments: loaded.increments, last_seq: loaded.last_seq }
    }
}

/// Group commit by leader and followers: a caller queues its update; if no
/// commit is running it leads one for everything queued, otherwise it waits
/// for a leader to write and commit its update.
#[derive(Debug, Default)]
struct GroupCommit {
    state: Mutex<GroupState>,
    done: Condvar,
}

#[derive(Debug, Default)]
struct GroupState {
    queue: Vec<(u64, DocWrite)>,
    results: HashMap<u64, Result<Option<i64>, StoreError>>,
    next_ticket: u64,
    leading: bool,
    commits: u64,
    updates: u64,
}

impl GroupCommit {
    /// Writes `write` durably (in a commit with whatever else is queued);
    /// returns its increment row (`None` for a new document).
    fn submit(&self, writer: &Mutex<Store>, write: DocWrite) -> Result<Option<i64>, StoreError> {
        let mut state = lock(&self.state);
        let ticket = state.next_ticket;
        state.next_ticket += 1;
        state.queue.push((ticket, write));
        loop {
            if let Some(result) = state.results.remove(&ticket) {
                return result;
            }
            if state.leading {
                state = self.done.wait(state).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            state.leading = true;
            let batch = std::mem::take(&mut state.queue);
            drop(state);
            let (tickets, writes): (Vec<u64>, Vec<DocWrite>) = batch.into_iter().unzip();
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| lock(writer).write_group(&writes)))
                .unwrap_or_else(|_| Err(StoreError::CommitFailed("the commit panicked".into())));
            state = lock(&self.state);
            match outcome {
                Ok(results) => {
                    state.commits += 1;
                    state.updates += results.iter().filter(|r| r.is_ok()).count() as u64;
                    state.results.extend(tickets.into_iter().zip(results));
                }
                Err(e) => {
                    for ticket in tickets {
                        state.results.insert(ticket, Err(e.duplicate()));
                    }
                }
            }
            state.leading = false;
            self.done.notify_all();
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

fn read_lock<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|e| e.into_inner())
}

fn write_lock<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|e| e.into_inner())
}

mod recent_signatures;

#[cfg(test)]
mod tests;
