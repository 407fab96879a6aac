//! What one PostgreSQL relay instance keeps in memory between calls, and when
//! it may trust it.
//!
//! Every cached value carries the [`Stamp`] taken before it was read (or, for
//! this instance's own write, before the write's lock was taken). A value is
//! trusted only while the instance's listener is connected (`LISTEN` on
//! `samverkan_docs`), in the same listener connection it was read under, and
//! while no change of that document was notified (by another instance) or
//! made (by this one) after its stamp. Anything else is read again from the
//! database. So a read-only step never serves a copy older than the last
//! notification the listener has handed on (and a document another instance
//! created is known here once its notification is in, as a change is: until
//! then it is taken as not stored, except by a step that would create it);
//! without a listener (the operator's
//! CLI, tests with two storages) nothing is trusted and every read goes to the
//! database, as before the caches existed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use automerge::ChangeHash;
use samverkan_shared::ids::DocId;
use samverkan_shared::org::{OrgId, PartySets};
use samverkan_shared::receipt::ApprovalReceipt;
use samverkan_shared::sync::SignedChange;

use crate::storage::DocEntry;

/// Signatures kept in memory at most (about 100 bytes each); past it the
/// cache starts over. A signature never changes once stored, so this bounds
/// memory, never correctness.
pub(super) const MAX_CACHED_SIGNATURES: usize = 100_000;

/// When a cached value was read (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Stamp {
    /// The listener connection it was read under.
    epoch: u64,
    /// Notifications of other instances' changes counted before it was read.
    remote: u64,
    /// This instance's own changes counted before it was read (or the one it is).
    local: u64,
}

/// Counts the changes each document had since the listener connected.
#[derive(Debug, Default)]
pub(super) struct Freshness {
    state: Mutex<FreshState>,
}

#[derive(Debug, Default)]
struct FreshState {
    /// The listener is connected and has `LISTEN`ed: every later commit of another instance will be told.
    listening: bool,
    /// Bumped whenever the listener connects or loses its connection.
    epoch: u64,
    tick: u64,
    /// The tick of each document's last change notified by another instance, this epoch.
    remote: HashMap<DocId, u64>,
    /// The tick of each document's last change made by this instance, this epoch.
    local: HashMap<DocId, u64>,
}

impl FreshState {
    fn current(&self, doc: &DocId, stamp: Stamp) -> bool {
        self.listening
            && stamp.epoch == self.epoch
            && self.remote.get(doc).is_none_or(|&t| t <= stamp.remote)
            && self.local.get(doc).is_none_or(|&t| t <= stamp.local)
    }
}

impl FreshState {
    /// See [`Freshness::changed_remotely`]; the tick it happened at.
    fn changed_remotely(&mut self, doc: &DocId) -> u64 {
        self.tick += 1;
        self.remote.insert(doc.clone(), self.tick);
        self.tick
    }

    /// See [`Freshness::changed_here`].
    fn changed_here(&mut self, doc: &DocId, before: Option<Stamp>) -> Option<Stamp> {
        self.tick += 1;
        let tick = self.tick;
        self.local.insert(doc.clone(), tick);
        let before = before.filter(|b| self.listening && b.epoch == self.epoch)?;
        Some(Stamp { local: tick, ..before })
    }
}

impl Freshness {
    fn lock(&self) -> MutexGuard<'_, FreshState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A stamp for a value about to be read; `None` while not listening (nothing is cached then).
    pub(super) fn stamp(&self) -> Option<Stamp> {
        let state = self.lock();
        state.listening.then_some(Stamp { epoch: state.epoch, remote: state.tick, local: state.tick })
    }

    /// Whether a value of `doc` read at `stamp` is still what is stored.
    pub(super) fn is_current(&self, doc: &DocId, stamp: Option<Stamp>) -> bool {
        stamp.is_some_and(|stamp| self.lock().current(doc, stamp))
    }

    /// The listener heard that another instance committed a change of `doc`.
    pub(super) fn changed_remotely(&self, doc: &DocId) {
        self.lock().changed_remotely(doc);
    }

    /// This instance committed a change of `doc`, holding its lock from just after
    /// `before` was taken: values read earlier are no longer trusted, and the
    /// stamp returned is the one of what this instance wrote.
    pub(super) fn changed_here(&self, doc: &DocId, before: Option<Stamp>) -> Option<Stamp> {
        self.lock().changed_here(doc, before)
    }

    /// The listener connected (or reconnected) and listens: nothing read before is trusted.
    pub(super) fn listening(&self) {
        self.restart(true);
    }

    /// The listener lost its connection: nothing is trusted until it is back.
    pub(super) fn deaf(&self) {
        self.restart(false);
    }

    fn restart(&self, listening: bool) {
        let mut state = self.lock();
        state.listening = listening;
        state.epoch += 1;
        state.remote.clear();
        state.local.clear();
    }
}

/// A document's receipts as cached.
type Receipts = Arc<Vec<ApprovalReceipt>>;

/// The index (heads and parties of every stored document), receipts and
/// signatures an instance serves from memory.
#[derive(Debug, Default)]
pub(super) struct Caches {
    /// When cached values may be trusted.
    pub(super) fresh: Freshness,
    index: Mutex<IndexCache>,
    receipts: Mutex<HashMap<DocId, (Receipts, Stamp)>>,
    signatures: Mutex<HashMap<ChangeHash, [u8; 64]>>,
}

#[derive(Debug, Default)]
struct IndexCache {
    entries: HashMap<DocId, (DocEntry, Stamp)>,
    /// One shared copy of each distinct set of parties the entries hold.
    party_sets: PartySets,
    /// When every stored document was read: a document not in `entries` is not stored, unless changed since.
    complete: Option<Stamp>,
}

/// What the index cache knows of one document (`T`: its entry, or what was asked of it).
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Known<T = DocEntry> {
    /// Stored, with this entry (or this of it).
    Stored(T),
    /// Not stored.
    Missing,
    /// Not known: read it from the database.
    Unknown,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl Caches {
    /// One document's index entry, if known to be current.
    pub(super) fn entry(&self, doc: &DocId) -> Known {
        self.with_entry(doc, DocEntry::clone)
    }

    /// `f` of one document's index entry, if known to be current, without copying it.
    pub(super) fn with_entry<R>(&self, doc: &DocId, f: impl FnOnce(&DocEntry) -> R) -> Known<R> {
        let index = lock(&self.index);
        match index.entries.get(doc) {
            Some((entry, stamp)) if self.fresh.is_current(doc, Some(*stamp)) => Known::Stored(f(entry)),
            Some(_) => Known::Unknown,
            None if self.fresh.is_current(doc, index.complete) => Known::Missing,
            None => Known::Unknown,
        }
    }

    /// Whether `org` is a party of the document (`Some(None)`: not stored),
    /// if the index entry is known to be current; `None`: read it.
    pub(super) fn is_party(&self, doc: &DocId, org: &OrgId) -> Option<Option<bool>> {
        match self.with_entry(doc, |entry| entry.parties.contains(org)) {
            Known::Stored(party) => Some(Some(party)),
            Known::Missing => Some(None),
            Known::Unknown => None,
        }
    }

    /// Keeps an entry read (or written) at `stamp`, unless a newer one is kept.
    pub(super) fn put_entry(&self, entry: DocEntry, stamp: Option<Stamp>) {
        let Some(stamp) = stamp else { return };
        let mut index = lock(&self.index);
        let newer = index.entries.get(&entry.id).is_some_and(|(_, kept)| newer_than(kept, &stamp));
        if !newer {
            let entry = DocEntry { parties: index.party_sets.share(&entry.parties), ..entry };
            index.entries.insert(entry.id.clone(), (entry, stamp));
        }
    }

    /// The whole index, if every entry is current; else the ids to read again
    /// (`None`: all of them).
    pub(super) fn index(&self) -> Result<Vec<DocEntry>, Option<Vec<DocId>>> {
        let index = lock(&self.index);
        let Some(complete) = index.complete else { return Err(None) };
        let state = self.fresh.lock();
        if !state.listening || state.epoch != complete.epoch {
            return Err(None);
        }
        // Documents changed since they (or the whole index) were read.
        let mut stale: Vec<DocId> = state
            .remote
            .keys()
            .chain(state.local.keys())
            .filter(|doc| match index.entries.get(*doc) {
                Some((_, stamp)) => !state.current(doc, *stamp),
                None => !state.current(doc, complete),
            })
            .cloned()
            .collect();
        if !stale.is_empty() {
            stale.sort();
            stale.dedup();
            return Err(Some(stale));
        }
        let mut entries: Vec<DocEntry> = index.entries.values().map(|(entry, _)| entry.clone()).collect();
        entries.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(entries)
    }

    /// Keeps the whole index, read at `stamp`.
    pub(super) fn put_index(&self, entries: &[DocEntry], stamp: Option<Stamp>) {
        let Some(stamp) = stamp else { return };
        let mut index = lock(&self.index);
        index.entries.retain(|_, (_, kept)| newer_than(kept, &stamp));
        for entry in entries {
            if !index.entries.contains_key(&entry.id) {
                let parties = index.party_sets.share(&entry.parties);
                index.entries.insert(entry.id.clone(), (DocEntry { parties, ..entry.clone() }, stamp));
            }
        }
        index.complete = Some(stamp);
    }

    /// A document's receipts, if the cached ones are current.
    pub(super) fn receipts(&self, doc: &DocId) -> Option<Arc<Vec<ApprovalReceipt>>> {
        let receipts = lock(&self.receipts);
        let (found, stamp) = receipts.get(doc)?;
        self.fresh.is_current(doc, Some(*stamp)).then(|| found.clone())
    }

    /// This instance committed a change of `doc` that added no receipts,
    /// holding the document's lock from just after `before` was taken: as
    /// [`Freshness::changed_here`], and the cached receipts stay trusted (with
    /// the write's stamp) if they were current and nothing else changed the
    /// document since `before` (no other instance's notification, no receipts
    /// added here meanwhile), so the write itself does not send every
    /// connection's next step to the database for receipts it did not touch.
    pub(super) fn changed_here_without_receipts(&self, doc: &DocId, before: Option<Stamp>) -> Option<Stamp> {
        // The order receipts, then freshness, as in `receipts`.
        let mut receipts = lock(&self.receipts);
        let mut state = self.fresh.lock();
        let keep = match (before, receipts.get(doc)) {
            (Some(before), Some((_, kept))) => state.current(doc, before) && state.current(doc, *kept),
            _ => false,
        };
        let written = state.changed_here(doc, before);
        if let (true, Some(written), Some((_, kept))) = (keep, written, receipts.get_mut(doc)) {
            *kept = written;
        }
        written
    }

    /// The listener heard that another instance committed a change of `doc`
    /// (see [`Freshness::changed_remotely`]). A commit that added no receipts
    /// leaves the cached receipts trusted, re-stamped now, if they were
    /// current until then: notifications arrive in commit order, so nothing
    /// else changed them meanwhile, and another instance's connections
    /// changing a document here then cost no database read of its receipts.
    pub(super) fn changed_remotely(&self, doc: &DocId, receipts_added: bool) {
        if receipts_added {
            self.fresh.changed_remotely(doc);
            return;
        }
        // The order receipts, then freshness, as in `receipts`.
        let mut receipts = lock(&self.receipts);
        let mut state = self.fresh.lock();
        let kept = receipts.get_mut(doc).filter(|(_, kept)| state.current(doc, *kept));
        let tick = state.changed_remotely(doc);
        if let Some((_, kept)) = kept {
            *kept = Stamp { epoch: state.epoch, remote: tick, local: tick };
        }
    }

    /// Keeps a document's receipts, read at `stamp`.
    pub(super) fn put_receipts(&self, doc: &DocId, found: Arc<Vec<ApprovalReceipt>>, stamp: Option<Stamp>) {
        if let Some(stamp) = stamp {
            lock(&self.receipts).insert(doc.clone(), (found, stamp));
        }
    }

    /// The signatures of `hashes` held in memory, and the hashes not held.
    pub(super) fn signatures(&self, hashes: &[ChangeHash]) -> (HashMap<ChangeHash, [u8; 64]>, Vec<ChangeHash>) {
        let cached = lock(&self.signatures);
        let mut found = HashMap::new();
        let mut missing = Vec::new();
        for hash in hashes {
            match cached.get(hash) {
                Some(signature) => {
                    found.insert(*hash, *signature);
                }
                None => missing.push(*hash),
            }
        }
        (found, missing)
    }

    /// Keeps stored signatures (a stored signature never changes, so always current).
    pub(super) fn put_signatures(&self, signatures: impl IntoIterator<Item = SignedChange>) {
        let mut cached = lock(&self.signatures);
        for (hash, signature) in signatures {
            if cached.len() >= MAX_CACHED_SIGNATURES {
                cached.clear();
            }
            cached.insert(hash, signature);
        }
    }
}

/// Whether a value read at `kept` is newer than one read at `other`.
fn newer_than(kept: &Stamp, other: &Stamp) -> bool {
    kept.epoch > other.epoch
        || (kept.epoch == other.epoch && kept.remote.max(kept.local) > other.remote.max(other.local))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_is_trusted_only_while_listening_and_until_its_document_changes() {
        let fresh = Freshness::default();
        let (a, b): (DocId, DocId) = (DocId::random(), DocId::random());
        assert_eq!(fresh.stamp(), None, "nothing is trusted before the listener listens");
        fresh.listening();
        let read = fresh.stamp();
        assert!(fresh.is_current(&a, read) && fresh.is_current(&b, read));
        fresh.changed_remotely(&a);
        assert!(!fresh.is_current(&a, read), "another instance's change makes the copy stale");
        assert!(fresh.is_current(&b, read), "other documents stay current");
        let again = fresh.stamp();
        assert!(fresh.is_current(&a, again));
        // A value read before this instance's own write is stale; the write's own is current.
        let before = fresh.stamp();
        let written = fresh.changed_here(&b, before);
        assert!(!fresh.is_current(&b, read));
        assert!(fresh.is_current(&b, written));
        // A remote change notified while the write waited for its lock is not hidden by it.
        let before = fresh.stamp();
        fresh.changed_remotely(&b);
        let written = fresh.changed_here(&b, before);
        assert!(!fresh.is_current(&b, written));
        fresh.deaf();
        assert!(!fresh.is_current(&a, again), "nothing is trusted while the listener is gone");
        fresh.listening();
        assert!(!fresh.is_current(&a, again), "nor what was read before it reconnected");
    }

    #[test]
    fn index_entries_with_the_same_parties_share_one_copy_of_them() {
        let caches = Caches::default();
        caches.fresh.listening();
        let (trosa, police) = (OrgId::new("trosa-kommun").unwrap(), OrgId::new("polisen").unwrap());
        let entry = |parties: Vec<OrgId>| DocEntry { id: DocId::random(), heads: Vec::new(), parties: parties.into() };
        let both = || vec![trosa.clone(), police.clone()];
        caches.put_index(&[entry(both()), entry(both()), entry(vec![trosa.clone()])], caches.fresh.stamp());
        let written = entry(both());
        caches.put_entry(written.clone(), caches.fresh.stamp());
        let index = caches.index().expect("current");
        let of = |id: &DocId| index.iter().find(|e| &e.id == id).unwrap().parties.clone();
        let shared: Vec<&DocEntry> = index.iter().filter(|e| e.parties.len() == 2).collect();
        assert_eq!(shared.len(), 3);
        assert!(shared.iter().all(|e| Arc::ptr_eq(&e.parties, &of(&written.id))), "one copy of the pair");
        assert!(index.iter().any(|e| e.parties.to_vec() == vec![trosa.clone()]));
    }

    #[test]
    fn another_instances_change_without_receipts_keeps_the_cached_receipts_only_if_they_were_current() {
        let caches = Caches::default();
        caches.fresh.listening();
        let (doc, other) = (DocId::random(), DocId::random());
        let receipts: Receipts = Arc::new(Vec::new());
        caches.put_receipts(&doc, receipts.clone(), caches.fresh.stamp());
        let read = caches.fresh.stamp();
        // A change that added none: the receipts stay trusted, the document's other values do not.
        caches.changed_remotely(&doc, false);
        assert!(caches.receipts(&doc).is_some());
        assert!(!caches.fresh.is_current(&doc, read), "the document itself changed");
        // One that may have added some: read them again.
        caches.changed_remotely(&doc, true);
        assert!(caches.receipts(&doc).is_none());
        // Stale receipts never become trusted again by a later change without receipts.
        caches.changed_remotely(&doc, false);
        assert!(caches.receipts(&doc).is_none());
        // Nor do receipts read before the listener reconnected.
        caches.put_receipts(&other, receipts.clone(), caches.fresh.stamp());
        caches.fresh.listening();
        caches.changed_remotely(&other, false);
        assert!(caches.receipts(&other).is_none());
        // An own write that added receipts after the notification makes them stale as before.
        caches.put_receipts(&doc, receipts, caches.fresh.stamp());
        caches.changed_remotely(&doc, false);
        caches.fresh.changed_here(&doc, None);
        assert!(caches.receipts(&doc).is_none());
    }

    #[test]
    fn an_own_write_without_receipts_keeps_the_cached_receipts_only_if_nothing_else_changed_them() {
        let caches = Caches::default();
        caches.fresh.listening();
        let doc = DocId::random();
        let receipts: Receipts = Arc::new(Vec::new());
        caches.put_receipts(&doc, receipts.clone(), caches.fresh.stamp());
        // A write of this instance that added none: the receipts stay trusted, at the write's stamp.
        let before = caches.fresh.stamp();
        let written = caches.changed_here_without_receipts(&doc, before);
        assert!(caches.receipts(&doc).is_some());
        assert!(caches.fresh.is_current(&doc, written));
        // Receipts added here while the write held the document's lock: read them again.
        let before = caches.fresh.stamp();
        caches.fresh.changed_here(&doc, None);
        caches.changed_here_without_receipts(&doc, before);
        assert!(caches.receipts(&doc).is_none());
        // Another instance's change notified meanwhile (it may have added receipts): read them again.
        caches.put_receipts(&doc, receipts.clone(), caches.fresh.stamp());
        let before = caches.fresh.stamp();
        caches.fresh.changed_remotely(&doc);
        caches.changed_here_without_receipts(&doc, before);
        assert!(caches.receipts(&doc).is_none());
        // Receipts that were already stale do not become trusted by a write.
        let stale = caches.fresh.stamp();
        caches.fresh.changed_remotely(&doc);
        caches.put_receipts(&doc, receipts, stale);
        let before = caches.fresh.stamp();
        caches.changed_here_without_receipts(&doc, before);
        assert!(caches.receipts(&doc).is_none());
        // Without the listener nothing is trusted.
        caches.fresh.deaf();
        assert_eq!(caches.changed_here_without_receipts(&doc, None), None);
    }
}
