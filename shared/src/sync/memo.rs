//! Sync steps already worked out, shared by the connections of one driver.
//!
//! What Automerge generates for a peer, and what a peer's acknowledgement
//! does to its sync state, depend only on the document's version (its heads,
//! which name its whole history) and on the sync state (and, for a received
//! message, its bytes). On a relay, every node that was caught up has the same
//! sync state for a document, so when a change arrives the relay would work
//! out the same message once per connection, rebuilding the change from the
//! document's columns each time, and then take in the same acknowledgement
//! from each. [`SyncMemo`] keeps the outcome of each step for the document's
//! current heads, so the second and later connections copy it instead.
//!
//! It is only an optimisation: a step it does not hold is worked out as
//! before; what it holds is exactly what that step produced for an equal
//! input. It is bounded in entries per document, documents and bytes, and it
//! forgets a document's entries as soon as the document's heads move.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use automerge::sync::State;
use automerge::{ActorId, ChangeHash};

use crate::ids::DocId;
use crate::wire::Frame;

/// Steps kept per document: caught-up peers share one state, so a few suffice.
const ENTRIES_PER_DOC: usize = 4;
/// Documents kept at once; past it, everything is forgotten and refilled.
const MAX_DOCS: usize = 1024;
/// Bytes of kept frames and messages at once; past it, everything is forgotten.
const MAX_BYTES: usize = 8 << 20;
/// A step whose frame or message is larger is not kept: it is rare, and
/// working it out again is small beside sending it.
const MAX_ENTRY_BYTES: usize = 64 << 10;

/// Author tips worked out for more sent changes than this are not kept
/// (bounding the tips kept to a few kilobytes per document).
const MAX_TIP_HASHES: usize = 64;

/// One step: from `before` (and `received`, for a peer's message) to `after`, sending `frame`.
#[derive(Debug)]
struct Entry {
    before: State,
    received: Option<Vec<u8>>,
    after: State,
    frame: Option<Frame>,
    bytes: usize,
}

/// The author tips of some sent changes (see `PeerSession::take_sent_tips`).
type Tips = Vec<(ChangeHash, ActorId)>;

/// The steps kept for one document version.
#[derive(Debug, Default)]
struct DocSteps {
    heads: Vec<ChangeHash>,
    entries: Vec<Entry>,
    /// Author tips by the sent changes they were worked out for.
    tips: Vec<(Vec<ChangeHash>, Tips)>,
}

impl DocSteps {
    /// The steps of the document at `heads`, forgetting those of another
    /// version; returns the bytes forgotten.
    fn at(&mut self, heads: &[ChangeHash]) -> usize {
        if self.heads == heads {
            return 0;
        }
        self.heads = heads.to_vec();
        self.tips.clear();
        self.entries.drain(..).map(|e| e.bytes).sum()
    }
}

#[derive(Debug, Default)]
struct Inner {
    docs: HashMap<DocId, DocSteps>,
    bytes: usize,
}

/// The outcomes of sync steps, per document version, for the connections of
/// one driver to share (see the module documentation). All its connections
/// must check peers' messages with the same limits.
#[derive(Debug, Default)]
pub struct SyncMemo {
    inner: Mutex<Inner>,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl SyncMemo {
    /// An empty memo.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many steps were copied from the memo.
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    /// How many steps were looked up and not found (then worked out).
    pub fn misses(&self) -> u64 {
        self.misses.load(Ordering::Relaxed)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding it left at worst a partial entry list: still consistent.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The state after, and the frame sent by, the step from `before` (with
    /// the peer's `received` message, if any) on the document at `heads`.
    pub(crate) fn lookup(
        &self,
        doc: &DocId,
        heads: &[ChangeHash],
        before: &State,
        received: Option<&[u8]>,
    ) -> Option<(State, Option<Frame>)> {
        let found = {
            let inner = self.lock();
            inner.docs.get(doc).filter(|steps| steps.heads == heads).and_then(|steps| {
                steps
                    .entries
                    .iter()
                    .find(|e| e.received.as_deref() == received && &e.before == before)
                    .map(|e| (e.after.clone(), e.frame.clone()))
            })
        };
        let counter = if found.is_some() { &self.hits } else { &self.misses };
        counter.fetch_add(1, Ordering::Relaxed);
        found
    }

    /// Keeps the outcome of a step worked out on the document at `heads`.
    pub(crate) fn remember(
        &self,
        doc: &DocId,
        heads: &[ChangeHash],
        before: State,
        received: Option<&[u8]>,
        after: &State,
        frame: &Option<Frame>,
    ) {
        let bytes = received.map_or(0, <[u8]>::len)
            + frame.as_ref().map_or(0, Frame::payload_len)
            + state_bytes(&before)
            + state_bytes(after);
        if bytes > MAX_ENTRY_BYTES {
            return;
        }
        let mut inner = self.lock();
        if inner.bytes + bytes > MAX_BYTES || (inner.docs.len() >= MAX_DOCS && !inner.docs.contains_key(doc)) {
            inner.docs.clear();
            inner.bytes = 0;
        }
        let steps = inner.docs.entry(doc.clone()).or_default();
        let mut freed = steps.at(heads);
        if steps.entries.len() >= ENTRIES_PER_DOC {
            freed += steps.entries.remove(0).bytes;
        }
        steps.entries.push(Entry {
            before,
            received: received.map(<[u8]>::to_vec),
            after: after.clone(),
            frame: frame.clone(),
            bytes,
        });
        inner.bytes = inner.bytes - freed + bytes;
    }

    /// The author tips worked out for the sent changes `fresh` on the document at `heads`.
    pub(crate) fn tips(&self, doc: &DocId, heads: &[ChangeHash], fresh: &[ChangeHash]) -> Option<Tips> {
        let inner = self.lock();
        let steps = inner.docs.get(doc).filter(|steps| steps.heads == heads)?;
        steps.tips.iter().find(|(hashes, _)| hashes == fresh).map(|(_, tips)| tips.clone())
    }

    /// Keeps the author tips worked out for the sent changes `fresh` on the document at `heads`.
    pub(crate) fn remember_tips(&self, doc: &DocId, heads: &[ChangeHash], fresh: Vec<ChangeHash>, tips: &Tips) {
        if fresh.len() + tips.len() > MAX_TIP_HASHES {
            return;
        }
        let mut inner = self.lock();
        if inner.docs.len() >= MAX_DOCS && !inner.docs.contains_key(doc) {
            inner.docs.clear();
            inner.bytes = 0;
        }
        let steps = inner.docs.entry(doc.clone()).or_default();
        let freed = steps.at(heads);
        if steps.tips.len() >= ENTRIES_PER_DOC {
            steps.tips.remove(0);
        }
        steps.tips.push((fresh, tips.clone()));
        inner.bytes -= freed;
    }
}

/// About how many bytes a sync state holds: its hashes and the peer's
/// bloom filters (which a peer's message sets, up to the frame limit).
fn state_bytes(state: &State) -> usize {
    let hashes = state.shared_heads.len()
        + state.last_sent_heads.len()
        + state.their_heads.as_ref().map_or(0, Vec::len)
        + state.their_need.as_ref().map_or(0, Vec::len)
        + state.sent_hashes.len();
    let have: usize =
        state.their_have.iter().flatten().map(|have| have.last_sync.len() * 32 + have.bloom.to_bytes().len()).sum();
    hashes * 32 + have
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(n: u8) -> ChangeHash {
        ChangeHash([n; 32])
    }

    fn doc(n: usize) -> DocId {
        DocId::from_bytes((n as u128).to_be_bytes())
    }

    fn frame(len: usize) -> Option<Frame> {
        Some(Frame::Sync { doc: doc(0), message: vec![7; len] })
    }

    fn state_with(heads: &[ChangeHash]) -> State {
        State { shared_heads: heads.to_vec(), ..State::new() }
    }

    #[test]
    fn a_step_is_found_only_for_the_same_heads_state_and_message() {
        let memo = SyncMemo::new();
        let (before, after) = (state_with(&[hash(1)]), state_with(&[hash(2)]));
        memo.remember(&doc(1), &[hash(2)], before.clone(), None, &after, &frame(10));
        memo.remember(&doc(1), &[hash(2)], before.clone(), Some(b"ack"), &before, &None);

        assert_eq!(memo.lookup(&doc(1), &[hash(2)], &before, None), Some((after.clone(), frame(10))));
        assert_eq!(memo.lookup(&doc(1), &[hash(2)], &before, Some(b"ack")), Some((before.clone(), None)));
        assert_eq!(memo.lookup(&doc(1), &[hash(2)], &before, Some(b"other")), None, "another message");
        assert_eq!(memo.lookup(&doc(1), &[hash(3)], &before, None), None, "another version");
        assert_eq!(memo.lookup(&doc(1), &[hash(2)], &after, None), None, "another state");
        assert_eq!(memo.lookup(&doc(2), &[hash(2)], &before, None), None, "another document");
        assert_eq!((memo.hits(), memo.misses()), (2, 4));
    }

    #[test]
    fn author_tips_are_found_for_the_same_version_and_changes_only() {
        let memo = SyncMemo::new();
        let tips = vec![(hash(9), ActorId::from(vec![1, 2, 3]))];
        memo.remember_tips(&doc(1), &[hash(2)], vec![hash(9)], &tips);
        assert_eq!(memo.tips(&doc(1), &[hash(2)], &[hash(9)]), Some(tips));
        assert_eq!(memo.tips(&doc(1), &[hash(2)], &[hash(8)]), None, "other changes");
        assert_eq!(memo.tips(&doc(1), &[hash(3)], &[hash(9)]), None, "another version");
        memo.remember(&doc(1), &[hash(3)], state_with(&[]), None, &state_with(&[]), &None);
        assert_eq!(memo.tips(&doc(1), &[hash(2)], &[hash(9)]), None, "forgotten with the old version");
    }

    #[test]
    fn new_heads_forget_the_old_steps_and_the_memo_stays_within_its_bounds() {
        let memo = SyncMemo::new();
        let before = state_with(&[hash(1)]);
        memo.remember(&doc(1), &[hash(2)], before.clone(), None, &before, &frame(10));
        memo.remember(&doc(1), &[hash(3)], before.clone(), None, &before, &frame(20));
        assert_eq!(memo.lookup(&doc(1), &[hash(2)], &before, None), None);
        let kept = Frame::Sync { doc: doc(0), message: vec![7; 20] }.payload_len() + 2 * state_bytes(&before);
        assert_eq!(memo.lock().bytes, kept, "the forgotten step's bytes are given back");

        for n in 0..=ENTRIES_PER_DOC as u8 {
            memo.remember(&doc(1), &[hash(3)], state_with(&[hash(n)]), None, &before, &None);
        }
        assert_eq!(memo.lock().docs[&doc(1)].entries.len(), ENTRIES_PER_DOC, "the oldest step goes");

        memo.remember(&doc(2), &[hash(3)], before.clone(), None, &before, &frame(MAX_ENTRY_BYTES + 1));
        assert!(!memo.lock().docs.contains_key(&doc(2)), "a large step is not kept");
        // A peer's large bloom filter counts as much as a large frame.
        let many: Vec<ChangeHash> = (0..60_000u32)
            .map(|n| {
                let mut bytes = [0; 32];
                bytes[..4].copy_from_slice(&n.to_be_bytes());
                ChangeHash(bytes)
            })
            .collect();
        let bloom = automerge::sync::BloomFilter::from_hashes(many.iter());
        let large =
            State { their_have: Some(vec![automerge::sync::Have { last_sync: Vec::new(), bloom }]), ..State::new() };
        assert!(state_bytes(&large) > MAX_ENTRY_BYTES);
        memo.remember(&doc(2), &[hash(3)], large.clone(), None, &large, &None);
        assert!(!memo.lock().docs.contains_key(&doc(2)), "a step with a large state is not kept");

        for n in 0..(MAX_BYTES / (MAX_ENTRY_BYTES / 2) + 2) {
            memo.remember(&doc(1000 + n), &[hash(3)], before.clone(), None, &before, &frame(MAX_ENTRY_BYTES / 2));
            assert!(memo.lock().bytes <= MAX_BYTES);
        }
        for n in 0..MAX_DOCS + 5 {
            memo.remember(&doc(10_000 + n), &[hash(3)], before.clone(), None, &before, &None);
            assert!(memo.lock().docs.len() <= MAX_DOCS);
        }
    }
}
