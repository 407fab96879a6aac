//! Per-document slots: one lock per document, holding its loaded copy.
//!
//! Shared by the relay's storages ([`crate::concurrent::ConcurrentStore`] on
//! SQLite, the relay's PostgreSQL storage): work on one document holds that
//! document's slot, so only work on the same document waits; a bounded number
//! of slots keep a loaded copy (least recently used unloaded first), and a slot
//! neither in use nor loaded is dropped.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use samverkan_shared::ids::DocId;
use samverkan_shared::model::Document;

/// One document's lock and loaded copy (`None` while nothing is loaded).
#[derive(Debug)]
pub struct Slot<T> {
    held: Mutex<Option<T>>,
    used: AtomicU64,
}

impl<T> Default for Slot<T> {
    fn default() -> Self {
        Self { held: Mutex::new(None), used: AtomicU64::new(0) }
    }
}

impl<T> Slot<T> {
    /// Takes the document's lock (waits for whoever holds it).
    pub fn lock(&self) -> MutexGuard<'_, Option<T>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The slots of the documents in use or loaded (see the module documentation).
#[derive(Debug)]
pub struct Slots<T> {
    map: Mutex<HashMap<DocId, Arc<Slot<T>>>>,
    capacity: usize,
    clock: AtomicU64,
    loaded: AtomicUsize,
}

impl<T> Slots<T> {
    /// No slots yet; at most `capacity` loaded copies kept beyond those in use.
    pub fn new(capacity: usize) -> Self {
        Self { map: Mutex::new(HashMap::new()), capacity, clock: AtomicU64::new(0), loaded: AtomicUsize::new(0) }
    }

    /// The document's slot (made if it has none), marked as just used.
    pub fn slot(&self, id: &DocId) -> Arc<Slot<T>> {
        let slot = lock(&self.map).entry(id.clone()).or_default().clone();
        slot.used.store(self.clock.fetch_add(1, Ordering::Relaxed) + 1, Ordering::Relaxed);
        slot
    }

    /// Runs `f` on a document's loaded copy if it has one and nobody holds
    /// its lock now, without waiting or loading: `None` otherwise. The copy is
    /// unloaded when `f` says it must not be kept (`false` beside its value).
    pub fn try_with_loaded<R>(&self, id: &DocId, f: impl FnOnce(&mut T) -> (R, bool)) -> Option<R> {
        let slot = lock(&self.map).get(id).cloned()?;
        let mut held = slot.held.try_lock().ok()?;
        let loaded = held.as_mut()?;
        slot.used.store(self.clock.fetch_add(1, Ordering::Relaxed) + 1, Ordering::Relaxed);
        let (value, keep) = f(loaded);
        if !keep {
            self.take(&mut held);
        }
        Some(value)
    }

    /// Whether a document is loaded or in use right now (its slot holds a
    /// copy, or another thread holds its lock).
    pub fn is_held(&self, id: &DocId) -> bool {
        let Some(slot) = lock(&self.map).get(id).cloned() else { return false };
        let held = match slot.held.try_lock() {
            Ok(held) => held.is_some(),
            Err(std::sync::TryLockError::WouldBlock) => true,
            Err(std::sync::TryLockError::Poisoned(poisoned)) => poisoned.into_inner().is_some(),
        };
        held
    }

    /// Loads `value` into a slot whose lock the caller holds.
    pub fn put(&self, held: &mut Option<T>, value: T) {
        if held.replace(value).is_none() {
            self.loaded.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Takes the loaded copy out of a slot whose lock the caller holds.
    pub fn take(&self, held: &mut Option<T>) -> Option<T> {
        let taken = held.take();
        if taken.is_some() {
            self.loaded.fetch_sub(1, Ordering::Relaxed);
        }
        taken
    }

    /// How many slots hold a loaded copy.
    pub fn loaded(&self) -> usize {
        self.loaded.load(Ordering::Relaxed)
    }

    /// How many slots there are (documents in use or loaded).
    pub fn count(&self) -> usize {
        lock(&self.map).len()
    }

    /// Drops a slot that holds no document (one that turned out not to exist,
    /// or was not kept), unless another thread holds it too: ids a peer names
    /// leave nothing behind.
    pub fn forget_if_idle(&self, id: &DocId, slot: Arc<Slot<T>>) {
        let mut map = lock(&self.map);
        // Ours and the map's: nobody else can reach it without the map's lock.
        if Arc::strong_count(&slot) == 2 && slot.lock().is_none() {
            map.remove(id);
        }
    }

    /// Unloads a document unless it is in use right now.
    pub fn unload(&self, id: &DocId) {
        let slot = lock(&self.map).get(id).cloned();
        if let Some(slot) = slot {
            if let Ok(mut held) = slot.held.try_lock() {
                self.take(&mut held);
            }
        }
    }

    /// Unloads every document not in use right now (their slots stay).
    pub fn unload_all(&self) {
        let slots: Vec<Arc<Slot<T>>> = lock(&self.map).values().cloned().collect();
        for slot in slots {
            if let Ok(mut held) = slot.held.try_lock() {
                self.take(&mut held);
            }
        }
    }

    /// Unloads the least recently used idle documents while more than the
    /// capacity are loaded.
    pub fn unload_beyond_capacity(&self) {
        while self.loaded.load(Ordering::Relaxed) > self.capacity {
            let candidate = {
                let map = lock(&self.map);
                map.iter()
                    .filter(|(_, s)| s.held.try_lock().map(|h| h.is_some()).unwrap_or(false))
                    .min_by_key(|(_, s)| s.used.load(Ordering::Relaxed))
                    .map(|(id, s)| (id.clone(), s.clone()))
            };
            let Some((id, slot)) = candidate else { return };
            let Ok(mut held) = slot.held.try_lock() else { continue };
            self.take(&mut held);
            drop(held);
            let mut map = lock(&self.map);
            if Arc::strong_count(&slot) == 2 {
                map.remove(&id);
            }
        }
    }
}

/// Runs `f`, which must only read, on a loaded copy outside any storage
/// transaction (see [`Slots::try_with_loaded`]): its value if it left the
/// heads as they were, and whether the copy may be kept. A closure that
/// changed the document gets `None` and the copy must be dropped: its change
/// is stored nowhere, so neither the copy nor anything made from it may be
/// served (the document is read again from storage at its next use).
pub fn read_only<R>(doc: &mut Document, f: impl FnOnce(&mut Document) -> R) -> (Option<R>, bool) {
    let before = doc.heads();
    let value = f(doc);
    if doc.heads() == before {
        (Some(value), true)
    } else {
        (None, false)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}
