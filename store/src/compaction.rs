//! Compaction off the write path, for a process that keeps running (the node
//! daemon, and the editor or web app sharing its documents): while a
//! [`BackgroundCompaction`] runs, a write that leaves a document with
//! [`crate::COMPACT_AFTER_ROWS`] increments asks it to fold them (through the
//! handles' shared [`DocCache`]) instead of saving the whole document itself.
//! A thread with its own connection saves a copy of the document, without
//! holding the write lock, and replaces the folded rows in a short
//! transaction of its own; copies in the cache stay valid through it.
//!
//! A short-lived process (one CLI command) folds after its write's commit
//! instead, in the same way.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

use samverkan_shared::ids::DocId;

use crate::{DocCache, Store, StoreError};

/// A thread folding the increments of documents the handles sharing one
/// cache wrote; it stops when this is dropped (after the fold in progress).
#[derive(Debug)]
pub struct BackgroundCompaction {
    cache: DocCache,
    folds: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl BackgroundCompaction {
    /// Starts folding, on a connection of its own to `path`, the documents
    /// that writes through any handle sharing `cache` leave with enough
    /// increments.
    pub fn start(path: &Path, cache: &DocCache) -> Result<Self, StoreError> {
        let mut store = Store::open(path)?;
        store.share_cache(cache.clone())?;
        let (sender, requests) = mpsc::channel::<DocId>();
        let folds = Arc::new(AtomicU64::new(0));
        let counted = Arc::clone(&folds);
        let thread = std::thread::Builder::new()
            .name("samverkan-fold".into())
            .spawn(move || {
                while let Ok(id) = requests.recv() {
                    store.cache.fold_started(&id);
                    match store.fold_increments(&id) {
                        Ok(true) => {
                            counted.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(false) => {}
                        // The increments stay; the next write asks again.
                        Err(e) => tracing::warn!(doc = %id, error = %e, "background compaction failed"),
                    }
                }
            })
            .map_err(|e| StoreError::CommitFailed(format!("cannot start the compaction thread: {e}")))?;
        cache.set_compactor(Some(sender));
        Ok(Self { cache: cache.clone(), folds, thread: Some(thread) })
    }

    /// Documents folded so far.
    pub fn folds(&self) -> u64 {
        self.folds.load(Ordering::Relaxed)
    }
}

impl Drop for BackgroundCompaction {
    fn drop(&mut self) {
        // Writes fold for themselves again; the thread ends once its channel closes.
        self.cache.set_compactor(None);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use samverkan_shared::model::{Activity, Document};
    use samverkan_shared::org::Directory;

    use super::*;
    use crate::tests::{ctx, ctx_for, new_doc};
    use crate::COMPACT_AFTER_ROWS;

    fn generation(store: &Store, id: &DocId) -> i64 {
        store.conn.query_row("SELECT generation FROM documents WHERE doc_id = ?1", [id.as_str()], |r| r.get(0)).unwrap()
    }

    fn set_body(store: &mut Store, id: &DocId, ctx: &samverkan_shared::model::EditContext, body: &str) {
        let directory = Directory::sodermanland();
        store
            .update(id, false, |d: &mut Document| {
                d.edit(ctx, &directory, "body", |e| e.set_body(body)).map_err(StoreError::from)
            })
            .unwrap();
    }

    /// Waits (bounded) until the rows are folded and, with `folds`, until that
    /// many folds (all of them) are done.
    fn wait_until_folded(store: &Store, id: &DocId, compaction: &BackgroundCompaction, all_its: bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        let done = || {
            store.increment_rows(id).unwrap() < COMPACT_AFTER_ROWS
                && (!all_its || generation(store, id) == compaction.folds() as i64)
        };
        while !done() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// A node database in a temporary directory holding one new document.
    struct Fixture {
        _dir: tempfile::TempDir,
        path: std::path::PathBuf,
        ctx: samverkan_shared::model::EditContext,
        doc: Document,
        id: DocId,
        store: Store,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.db");
        let ctx = ctx();
        let mut doc = new_doc(&ctx);
        let id = doc.id().clone();
        let mut store = Store::open_or_create(&path).unwrap();
        store.insert(&mut doc).unwrap();
        Fixture { _dir: dir, path, ctx, doc, id, store }
    }

    #[test]
    fn writes_leave_folding_to_the_background_and_keep_their_cached_copy() {
        let Fixture { _dir, path, ctx, id, store: mut daemon, .. } = fixture();
        let compaction = BackgroundCompaction::start(&path, &daemon.doc_cache()).unwrap();
        let mut editor = Store::open(&path).unwrap();
        editor.share_cache(daemon.doc_cache()).unwrap();
        for i in 0..300 {
            let store = if i % 2 == 0 { &mut daemon } else { &mut editor };
            set_body(store, &id, &ctx, &format!("Version {i}"));
        }
        wait_until_folded(&daemon, &id, &compaction, true);
        // Every fold was the background's (a write's own would count no fold).
        assert!(compaction.folds() >= 1, "folds: {}", compaction.folds());
        assert_eq!(generation(&daemon, &id), compaction.folds() as i64);
        assert!(daemon.increment_rows(&id).unwrap() < COMPACT_AFTER_ROWS);
        // The cached copy went through every fold: nothing is loaded again.
        let current = generation(&daemon, &id);
        assert!(daemon.cache.last_seq_of(&id, current).is_some(), "the cached copy is of the current snapshot");
        drop(compaction);
        let fresh = Store::open(&path).unwrap();
        let mut loaded = fresh.load(&id).unwrap();
        assert_eq!(loaded.view().unwrap().body, "Version 299");
        assert_eq!(loaded.heads(), daemon.load(&id).unwrap().heads());
        assert!(fresh.check().unwrap().is_empty());
    }

    #[test]
    fn a_copy_out_while_its_rows_are_folded_is_still_current_when_put_back() {
        let Fixture { mut doc, id, store, .. } = fixture();
        let cache = store.doc_cache();
        // Out, holding rows up to 100, while rows up to 90 are folded (0 → 1).
        let (_, lease) = cache.take(&id, 0);
        cache.refold(&id, 0, 1, 90);
        cache.put(doc.clone(), 0, 100, Some(lease));
        assert_eq!(cache.last_seq_of(&id, 1), Some(100));
        // One that lacks folded rows is no copy of the new snapshot.
        let (_, lease) = cache.take(&id, 1);
        cache.refold(&id, 1, 2, 120);
        cache.put(doc.clone(), 1, 110, Some(lease));
        assert_eq!(cache.last_seq_of(&id, 2), None);
        // And one in the cache is judged the same way at once.
        cache.put(doc.clone(), 2, 130, None);
        cache.refold(&id, 2, 3, 125);
        assert_eq!(cache.last_seq_of(&id, 3), Some(130));
        cache.refold(&id, 3, 4, 140);
        assert_eq!(cache.last_seq_of(&id, 4), None);
        assert!(doc.heads().len() == 1);
    }

    #[test]
    fn a_fold_of_a_document_compacted_meanwhile_writes_nothing() {
        let Fixture { ctx, doc, id, mut store, .. } = fixture();
        for i in 0..5 {
            set_body(&mut store, &id, &ctx, &format!("Version {i}"));
        }
        let before = store.conn.query_row("SELECT max(seq) FROM changes", [], |r| r.get::<_, i64>(0)).unwrap();
        let stale = generation(&store, &id);
        store.compact(&id).unwrap(); // Another fold (or a replacement) won the race.
        set_body(&mut store, &id, &ctx, "Version 5");
        let mut copy = doc.clone();
        let snapshot = copy.automerge_mut().save();
        assert_eq!(store.fold_rows(&id, &snapshot, None, before + 1, Some(stale)).unwrap(), None);
        assert_eq!(store.increment_rows(&id).unwrap(), 1, "the row written since the compaction stays");
        assert_eq!(store.load(&id).unwrap().view().unwrap().body, "Version 5");
    }

    #[test]
    fn folds_by_the_background_and_by_another_process_never_lose_a_write() {
        let Fixture { _dir, path, id, store: daemon, .. } = fixture();
        let compaction = BackgroundCompaction::start(&path, &daemon.doc_cache()).unwrap();
        // Three writers: two sharing the daemon's cache (they leave folds to
        // the background) and another process's handle (which folds after its
        // own writes), each under its own author.
        let writers: Vec<_> = (0..3)
            .map(|w| {
                let path = path.clone();
                let id = id.clone();
                let cache = (w < 2).then(|| daemon.doc_cache());
                std::thread::spawn(move || {
                    let mut store = Store::open(&path).unwrap();
                    if let Some(cache) = cache {
                        store.share_cache(cache).unwrap();
                    }
                    let ctx = ctx_for("trosa-kommun");
                    let directory = Directory::sodermanland();
                    for i in 0..150 {
                        store
                            .update(&id, false, |d: &mut Document| {
                                d.edit(&ctx, &directory, "activity", |e| {
                                    e.add_activity(&Activity::new(format!("Writer {w}, activity {i}")))
                                })
                                .map_err(StoreError::from)
                            })
                            .unwrap();
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        wait_until_folded(&daemon, &id, &compaction, false);
        drop(compaction);
        let fresh = Store::open(&path).unwrap();
        let view = fresh.load(&id).unwrap().view().unwrap();
        assert_eq!(view.activities.len(), 450, "every write is there");
        assert_eq!(daemon.load(&id).unwrap().heads(), fresh.load(&id).unwrap().heads());
        assert!(fresh.increment_rows(&id).unwrap() < COMPACT_AFTER_ROWS);
        assert!(fresh.check().unwrap().is_empty());
    }
}
