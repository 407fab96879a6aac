//! Loaded documents kept between a store's calls, and shareable by the
//! handles on one database within a process (the node daemon and the web app
//! or editor beside it), so a change one handle commits is not applied again
//! by the other.
//!
//! A cached copy is trusted only as the store's `load_in` allows: its snapshot
//! generation must still be current, and the increment rows after the copy's
//! last one are read on top of it. Copies are put back only after their
//! transaction committed, so a copy never holds anything uncommitted.
//!
//! A copy is taken out for the duration of one call and put back after it
//! (one copy in memory, not two). While it is out, another thread asking for
//! the same document waits for it, at most [`LEND_WAIT`], rather than load the
//! whole document again; past that, or on the same thread, it loads afresh.
//!
//! The cache is also where the handles of one process meet for compaction:
//! while a [`crate::BackgroundCompaction`] runs, a handle whose write leaves a
//! document with enough increments asks it here to fold them, instead of
//! folding them itself; and a fold of a document's rows up to some row keeps
//! the copies that already hold those rows (see [`DocCache::refold`]), so a
//! compaction never makes anyone load a long history again.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use samverkan_shared::ids::DocId;
use samverkan_shared::model::Document;

/// How long a thread waits for a document another thread has taken out.
pub const LEND_WAIT: Duration = Duration::from_secs(1);

/// Loaded documents of one database, shared by the store handles given it
/// (cloning shares; see [`crate::Store::share_cache`]).
#[derive(Debug, Clone)]
pub struct DocCache {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    /// The database the copies are of (canonical where it could be resolved).
    database: PathBuf,
    state: Mutex<State>,
    /// Signalled when a taken-out document comes back (or is given up).
    returned: Condvar,
}

#[derive(Debug)]
struct State {
    entries: HashMap<DocId, CachedDoc>,
    capacity: usize,
    /// For least-recently-used eviction.
    clock: u64,
    /// Documents taken out, with the lease that holds each.
    lent: HashMap<DocId, Holder>,
    next_lease: u64,
    /// Each document's last fold: a copy of generation `from` that holds row
    /// `upto` is a copy of generation `to` too (for copies out when it happened).
    refolded: HashMap<DocId, Refold>,
    /// Where folds are asked for, while a background compaction runs.
    compactor: Option<mpsc::Sender<DocId>>,
    /// Documents asked for and not yet started.
    due: HashSet<DocId>,
}

/// A fold of a document's increment rows up to `upto` into a new snapshot,
/// which took its generation from `from` to `to`.
#[derive(Debug, Clone, Copy)]
struct Refold {
    from: i64,
    to: i64,
    upto: i64,
}

#[derive(Debug, Clone, Copy)]
struct Holder {
    lease: u64,
    thread: ThreadId,
}

#[derive(Debug)]
struct CachedDoc {
    doc: Document,
    /// The snapshot generation the cached copy was built from.
    generation: i64,
    /// The last increment row folded into the cached copy.
    last_seq: i64,
    used: u64,
}

impl State {
    fn evict_beyond_capacity(&mut self) {
        while self.entries.len() > self.capacity {
            let Some(oldest) = self.entries.iter().min_by_key(|(_, c)| c.used).map(|(id, _)| id.clone()) else {
                break;
            };
            self.entries.remove(&oldest);
        }
    }
}

/// A document taken out of the cache (or being loaded in its place): others
/// wait for it until it is put back or this is dropped.
#[derive(Debug)]
pub(crate) struct Lease {
    cache: DocCache,
    id: DocId,
    /// 0: nothing was marked (the wait timed out or it is the same thread's).
    lease: u64,
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.lease == 0 {
            return;
        }
        let mut state = self.cache.lock();
        if state.lent.get(&self.id).is_some_and(|h| h.lease == self.lease) {
            state.lent.remove(&self.id);
            drop(state);
            self.cache.shared.returned.notify_all();
        }
    }
}

/// A copy found in the cache: the document and the last increment row in it.
pub(crate) type Found = (Document, i64);

impl DocCache {
    /// An empty cache of the documents in `database`, keeping at most
    /// `capacity` of them (0: none).
    pub(crate) fn new(database: &Path, capacity: usize) -> Self {
        let state = State {
            entries: HashMap::new(),
            capacity,
            clock: 0,
            lent: HashMap::new(),
            next_lease: 0,
            refolded: HashMap::new(),
            compactor: None,
            due: HashSet::new(),
        };
        let database = canonical(database);
        Self { shared: Arc::new(Shared { database, state: Mutex::new(state), returned: Condvar::new() }) }
    }

    /// Whether this caches the documents of the database at `path`.
    pub fn is_of(&self, path: &Path) -> bool {
        self.shared.database == canonical(path)
    }

    /// A cache is only a copy of what is stored: one a panicking thread left
    /// half-updated is still consistent entry by entry, so poisoning is ignored.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes `id`'s copy out if it was built from snapshot `generation`,
    /// waiting (bounded) while another thread has it out; the lease marks the
    /// document as out until it is put back or dropped.
    pub(crate) fn take(&self, id: &DocId, generation: i64) -> (Option<Found>, Lease) {
        let (mut state, free) = self.wait_until_returned(id);
        if !free {
            return (None, Lease { cache: self.clone(), id: id.clone(), lease: 0 });
        }
        state.next_lease += 1;
        let lease = state.next_lease;
        state.lent.insert(id.clone(), Holder { lease, thread: std::thread::current().id() });
        let found = match state.entries.remove(id) {
            Some(c) if c.generation == generation => Some((c.doc, c.last_seq)),
            _ => None,
        };
        (found, Lease { cache: self.clone(), id: id.clone(), lease })
    }

    /// Waits (at most [`LEND_WAIT`]) while another thread has `id` out; with
    /// whether it is in now (false: the wait timed out, or this thread has it).
    fn wait_until_returned(&self, id: &DocId) -> (MutexGuard<'_, State>, bool) {
        let me = std::thread::current().id();
        let deadline = Instant::now() + LEND_WAIT;
        let mut state = self.lock();
        loop {
            match state.lent.get(id) {
                Some(holder) if holder.thread != me => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        tracing::warn!(doc = %id, "a cached document stayed taken out; loading it afresh");
                        return (state, false);
                    }
                    state = self.shared.returned.wait_timeout(state, left).unwrap_or_else(PoisonError::into_inner).0;
                }
                Some(_) => return (state, false),
                None => return (state, true),
            }
        }
    }

    /// A clone of `id`'s copy if it was built from snapshot `generation` (the
    /// copy stays; `None` while it is taken out).
    pub(crate) fn copy(&self, id: &DocId, generation: i64) -> Option<Found> {
        let state = self.lock();
        let c = state.entries.get(id).filter(|c| c.generation == generation)?;
        Some((c.doc.clone(), c.last_seq))
    }

    /// The last increment row in `id`'s copy, if one of snapshot `generation` is in.
    pub(crate) fn last_seq_of(&self, id: &DocId, generation: i64) -> Option<i64> {
        self.lock().entries.get(id).filter(|c| c.generation == generation).map(|c| c.last_seq)
    }

    /// Like [`DocCache::copy`], but waits (bounded) for a copy another thread
    /// has out to come back, rather than miss it (what a fold does: loading a
    /// long history afresh costs far more than the wait).
    pub(crate) fn copy_when_returned(&self, id: &DocId, generation: i64) -> Option<Found> {
        let (state, _) = self.wait_until_returned(id);
        let c = state.entries.get(id).filter(|c| c.generation == generation)?;
        Some((c.doc.clone(), c.last_seq))
    }

    /// Records that `id`'s increment rows up to `upto` were folded into a new
    /// snapshot, taking its generation from `from` to `to`: a copy of `from`
    /// that holds row `upto` holds all the new snapshot does and stays (now
    /// of `to`); one that does not is dropped. A copy out now is judged the
    /// same way when it is put back.
    pub(crate) fn refold(&self, id: &DocId, from: i64, to: i64, upto: i64) {
        let mut state = self.lock();
        let keep = match state.entries.get_mut(id) {
            Some(c) if c.generation == from && c.last_seq >= upto => {
                c.generation = to;
                true
            }
            Some(_) => false,
            None => true,
        };
        if !keep {
            state.entries.remove(id);
        }
        state.refolded.insert(id.clone(), Refold { from, to, upto });
    }

    /// Puts a committed copy (back) in, then ends its lease.
    pub(crate) fn put(&self, doc: Document, generation: i64, last_seq: i64, lease: Option<Lease>) {
        {
            let mut state = self.lock();
            let generation = match state.refolded.get(doc.id()) {
                Some(r) if r.from == generation && last_seq >= r.upto => r.to,
                _ => generation,
            };
            if state.capacity > 0 {
                state.clock += 1;
                let used = state.clock;
                state.entries.insert(doc.id().clone(), CachedDoc { doc, generation, last_seq, used });
                state.evict_beyond_capacity();
            }
        }
        drop(lease);
    }

    /// Drops `id`'s copy.
    pub fn evict(&self, id: &DocId) {
        self.lock().entries.remove(id);
    }

    /// Sends folds to `compactor` from now on (`None`: each handle folds its
    /// own writes again).
    pub(crate) fn set_compactor(&self, compactor: Option<mpsc::Sender<DocId>>) {
        let mut state = self.lock();
        state.compactor = compactor;
        state.due.clear();
    }

    /// Asks the background compaction, if one runs, to fold `id`'s
    /// increments; false if none runs (the caller folds them itself).
    pub(crate) fn ask_fold(&self, id: &DocId) -> bool {
        let mut state = self.lock();
        let Some(compactor) = state.compactor.clone() else { return false };
        if state.due.insert(id.clone()) && compactor.send(id.clone()).is_err() {
            // The compaction thread is gone: fold here.
            state.due.remove(id);
            state.compactor = None;
            return false;
        }
        true
    }

    /// Marks a fold asked for as started (a write after this asks again).
    pub(crate) fn fold_started(&self, id: &DocId) {
        self.lock().due.remove(id);
    }

    /// Sets how many documents stay cached (0 turns the cache off); the least
    /// recently used beyond it are dropped.
    pub fn set_capacity(&self, capacity: usize) {
        let mut state = self.lock();
        state.capacity = capacity;
        state.evict_beyond_capacity();
    }

    /// Number of documents cached.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// Whether no document is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether `self` and `other` are the same cache.
    pub fn same_as(&self, other: &DocCache) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }
}

fn canonical(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}
