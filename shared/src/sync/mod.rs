//! Sans-IO sync core that both the node and the relay drive.
//!
//! The callers own storage, sockets and timers; this module owns the protocol
//! logic: per-connection, per-document Automerge sync states, the summary
//! phase that skips documents already in sync, and the checks that keep a
//! hostile peer's bytes from crashing or exhausting the process. It never does
//! I/O, never reads a clock, never spawns anything, and never panics on peer
//! input: bytes and documents go in, frames and outcomes come out.
//!
//! # A connection, step by step
//!
//! 1. The node sends [`Frame::Hello`]; the relay answers [`Frame::Welcome`]
//!    (or [`Frame::Error`] with `ProtocolVersion` and closes).
//! 2. Both create a [`PeerSession`] and [`PeerSession::restore_state`] every
//!    persisted sync state they hold for this peer.
//! 3. Both send [`summary_frame`] over the documents they share with the peer.
//!    On the peer's `Summary`: equal digest → reply [`Frame::InSync`]; else
//!    reply [`doc_heads_frame`].
//! 4. On the peer's `DocHeads`: [`plan`], then [`PeerSession::generate`] for
//!    each document in [`SyncPlan::to_start`] and send the frames.
//! 5. On [`Frame::Sync`]: [`PeerSession::receive`] (creating an empty
//!    `AutoCommit` first if the peer may share a document we lack), send the
//!    reply, persist the document if it changed, and call `generate` for the
//!    same document on every *other* connection (that is how the relay forwards).
//! 6. After a local edit: `generate` on every connection.
//! 7. On disconnect, for whatever reason: [`PeerSession::into_persisted`] and
//!    store the result. Never keep a live session across connections: a sync
//!    state that saw a broken connection can stop changes from being re-sent.
//!
//! Any [`SyncError`] drops that document's sync state. [`SyncConnection`]
//! then refuses that document alone ([`Frame::DocRefused`]) and goes on with
//! the others; both sides leave it alone on this connection until the peer
//! sends a new `Sync` for it, which starts it again from a fresh state.

mod check;
mod connection;
mod memo;
mod memory;
mod summary;
mod whole;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::panic::{catch_unwind, AssertUnwindSafe};

use automerge::sync::{DecodeStateError, Message, ReadMessageError, State, SyncDoc};
use automerge::{AutoCommit, AutomergeError, ChangeHash};

pub use check::{
    check_chunks, check_message, operations_in, MessageCheckError, Operations, SyncLimits, DEFAULT_MAX_CHANGE_OPS,
    DEFAULT_MAX_OPS,
};
pub use connection::{
    ConnectionError, ConnectionEvent, ConnectionStats, DocAccess, DocOutcome, MemoryAccess, SignedChange,
    SyncConnection, MAX_OFFERED_SIGNATURES, START_WINDOW,
};
pub use memo::SyncMemo;
pub use memory::{Access, MemoryDocs, MemoryDocsError, SharedMemoryDocs, Signer};
pub use summary::{
    doc_heads_frame, heads_digest, plan, plan_keeping, summary_digest, summary_frame, HeadsDigest, SyncPlan,
};
pub use whole::{decode_tips, document_tips, encode_tips, increment_tips, StoredWhole};

use crate::ids::DocId;
use crate::wire::{ErrorCode, Frame};

/// Which end of a connection a session is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// A node: opens the connection and says `Hello`.
    Node,
    /// The relay: accepts the connection and answers `Welcome`.
    Relay,
}

/// Why syncing a document over this connection failed.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// The peer's bytes are not an Automerge sync message.
    #[error("document {doc}: sync message does not decode: {source}")]
    Decode {
        /// The document.
        doc: DocId,
        /// Automerge's decoding error.
        #[source]
        source: Box<ReadMessageError>,
    },
    /// The message decoded but failed a sanity check (see [`check_message`]).
    #[error("document {doc}: sync message refused: {source}")]
    Refused {
        /// The document.
        doc: DocId,
        /// The failed check.
        #[source]
        source: MessageCheckError,
    },
    /// Automerge refused to apply the message. It may have applied part of it
    /// first: compare the document's heads with storage.
    #[error("document {doc}: automerge refused the sync message: {source}")]
    Automerge {
        /// The document.
        doc: DocId,
        /// Automerge's error.
        #[source]
        source: Box<AutomergeError>,
    },
    /// Automerge panicked. The in-memory document may be inconsistent: reload
    /// it from storage before using it again.
    #[error("document {doc}: automerge panicked while {during} a sync message; reload the document")]
    Panicked {
        /// The document.
        doc: DocId,
        /// `"receiving"` or `"generating"`.
        during: &'static str,
    },
    /// The message we generated does not fit in a frame the peer accepts.
    #[error("document {doc}: sync message of {len} bytes does not fit the frame limit of {max}")]
    MessageTooLarge {
        /// The document.
        doc: DocId,
        /// Payload length of the frame.
        len: usize,
        /// The frame limit in force.
        max: usize,
    },
    /// An earlier error disabled this document for the rest of the connection.
    #[error("document {doc}: sync disabled on this connection after an earlier error")]
    Disabled {
        /// The document.
        doc: DocId,
    },
    /// Persisted sync state bytes do not decode.
    #[error("document {doc}: persisted sync state does not decode: {source}")]
    PersistedState {
        /// The document.
        doc: DocId,
        /// Automerge's decoding error.
        #[source]
        source: DecodeStateError,
    },
    /// A persisted state was offered for a document already syncing on this connection.
    #[error("document {doc}: sync state already in use on this connection")]
    StateInUse {
        /// The document.
        doc: DocId,
    },
    /// The message was applied, but generating the reply failed.
    #[error("after applying a sync message (document changed: {changed}): {source}")]
    ReplyFailed {
        /// Whether applying the message changed the document (persist it if so).
        changed: bool,
        /// Why the reply could not be generated.
        #[source]
        source: Box<SyncError>,
    },
}

impl SyncError {
    /// The code to send in [`Frame::Error`] before closing the connection.
    pub fn error_code(&self) -> ErrorCode {
        match self {
            SyncError::Refused {
                source:
                    MessageCheckError::ChangeTooLarge { .. }
                    | MessageCheckError::InflatedTooLarge { .. }
                    | MessageCheckError::ChangeTooManyOps { .. }
                    | MessageCheckError::TooManyOps { .. },
                ..
            } => ErrorCode::TooLarge,
            SyncError::Decode { .. } | SyncError::Refused { .. } | SyncError::Automerge { .. } => ErrorCode::Malformed,
            SyncError::Panicked { during, .. } if *during == "receiving" => ErrorCode::Malformed,
            SyncError::MessageTooLarge { .. } => ErrorCode::TooLarge,
            SyncError::ReplyFailed { source, .. } => source.error_code(),
            SyncError::Panicked { .. }
            | SyncError::Disabled { .. }
            | SyncError::PersistedState { .. }
            | SyncError::StateInUse { .. } => ErrorCode::Internal,
        }
    }
}

/// A message generated on a copy of a document's sync state (see
/// [`PeerSession::prepare_generate`]), not yet taken into the session.
#[derive(Debug)]
pub(crate) struct PreparedMessage {
    doc: DocId,
    state: State,
    frame: Option<Frame>,
    /// The changes whose authors' signatures prove what the message carries.
    pub(crate) tips: Vec<(ChangeHash, automerge::ActorId)>,
    /// Whether the state's sent changes count as accounted for once taken in
    /// (as [`PeerSession::take_sent_tips`] would have been called).
    account: bool,
}

/// Automerge's `receive_sync_message`, step for step, except that when
/// `state.sent_hashes` is empty it skips `filter_changes`, which would only
/// remove from that empty set the ancestors of the peer's heads, visiting
/// every one of them (about 0.4 ms per message at 10,000 changes). That is
/// the common case: a node receiving the relay's changes, the relay receiving
/// a node's. Otherwise Automerge does it all. Checked against Automerge over
/// random exchanges in `receiving_with_nothing_sent_is_what_automerge_does`.
///
/// Returns the bytes the message's changes were loaded from when they made an
/// empty document whole (every change applied, none held back for missing
/// parents) and are worth keeping as its stored form
/// ([`whole::keepable_as_received`]): a store may keep them instead of saving
/// the document again.
fn receive_message(
    doc: &mut AutoCommit,
    state: &mut State,
    message: Message,
) -> Result<Option<Vec<u8>>, AutomergeError> {
    use automerge::sync::{Capability, MessageFlags};
    if !state.sent_hashes.is_empty() {
        return doc.sync().receive_sync_message(state, message).map(|()| None);
    }
    state.in_flight = false;
    let before = doc.get_heads();
    let Message { heads, changes, need, have, flags, .. } = message;
    if let Some(flags) = flags {
        let mut caps = vec![Capability::MessageV2];
        if flags.contains(MessageFlags::SUPPORTS_SYNC_RESET) {
            caps.push(Capability::SyncReset);
        }
        state.their_capabilities = Some(caps);
        // SYNC_RESET would clear `sent_hashes`: already empty.
        state.peer_read_only = flags.contains(MessageFlags::READ_ONLY);
    }
    let changes_is_empty = changes.is_empty();
    let mut whole = None;
    if !changes_is_empty && !state.read_only {
        let was_empty = doc.is_empty();
        let bytes = changes.iter().collect::<Vec<&[u8]>>().concat();
        doc.load_incremental(&bytes)?;
        let after = doc.get_heads();
        state.shared_heads = advance_heads(&before, &after, &state.shared_heads);
        if was_empty && !after.is_empty() && doc.get_missing_deps(&[]).is_empty() && whole::keepable_as_received(&bytes)
        {
            whole = Some(bytes);
        }
    }
    // `filter_changes` would remove from `sent_hashes` what the peer has: it is empty.
    if changes_is_empty && heads == before {
        state.last_sent_heads.clone_from(&heads);
    }
    let current = doc.get_heads();
    let known: Vec<ChangeHash> = heads
        .iter()
        .filter(|head| current.contains(head) || doc.get_change_meta_by_hash(head).is_some())
        .copied()
        .collect();
    if known.len() == heads.len() {
        state.shared_heads.clone_from(&heads);
        if heads.is_empty() {
            state.last_sent_heads = Vec::new();
            state.sent_hashes = BTreeSet::new();
        }
    } else {
        let mut shared: Vec<ChangeHash> = state.shared_heads.iter().chain(&known).copied().collect();
        shared.sort_unstable();
        shared.dedup();
        state.shared_heads = shared;
    }
    state.their_have = Some(have);
    state.their_heads = Some(heads);
    state.their_need = Some(need);
    Ok(whole)
}

/// Automerge's `advance_heads`: the shared heads after our heads moved from
/// `before` to `after` by applying the peer's changes (our new heads, and
/// the old shared heads that are still heads), sorted.
fn advance_heads(before: &[ChangeHash], after: &[ChangeHash], shared: &[ChangeHash]) -> Vec<ChangeHash> {
    let mut advanced: Vec<ChangeHash> = after
        .iter()
        .filter(|head| !before.contains(head))
        .chain(shared.iter().filter(|head| after.contains(head)))
        .copied()
        .collect();
    advanced.sort_unstable();
    advanced.dedup();
    advanced
}

/// The state Automerge leaves after receiving `message` on `state` and
/// generating its reply, worked out without the document, when `message`
/// acknowledges exactly the document's current `heads`: no changes, nothing
/// asked for, the peer's heads and every `have`'s last sync equal to ours,
/// and this side has sent a message on this state before. Automerge then has
/// nothing to reply, and `receive_sync_message` would only walk the whole
/// change history (`filter_changes`: every ancestor of the heads, about a
/// millisecond for 10,000 changes) to empty `sent_hashes`, which can hold
/// only changes below our heads. `None` for any other message: Automerge
/// handles it. Checked against Automerge in
/// `an_acknowledgement_of_our_heads_leaves_the_state_automerge_leaves`.
fn acknowledged(state: &State, message: &Message, heads: &[ChangeHash]) -> Option<State> {
    let mut ours = heads.to_vec();
    ours.sort_unstable();
    let at_ours = |hashes: &[ChangeHash]| {
        let mut hashes = hashes.to_vec();
        hashes.sort_unstable();
        hashes.dedup();
        hashes == ours
    };
    let applies = !ours.is_empty()
        && message.changes.is_empty()
        && message.need.is_empty()
        && message.heads == ours
        && message.have.iter().all(|have| at_ours(&have.last_sync))
        && state.have_responded;
    if !applies {
        return None;
    }
    let mut state = state.clone();
    // What `receive_sync_message` does with such a message ...
    state.in_flight = false;
    if let Some(flags) = message.flags {
        let mut caps = vec![automerge::sync::Capability::MessageV2];
        if flags.contains(automerge::sync::MessageFlags::SUPPORTS_SYNC_RESET) {
            caps.push(automerge::sync::Capability::SyncReset);
        }
        state.their_capabilities = Some(caps);
        state.peer_read_only = flags.contains(automerge::sync::MessageFlags::READ_ONLY);
    }
    // ... every change we sent is below the heads the peer now has ...
    state.sent_hashes.clear();
    state.last_sent_heads.clone_from(&ours);
    state.shared_heads.clone_from(&ours);
    state.their_have = Some(message.have.clone());
    state.their_heads = Some(message.heads.clone());
    state.their_need = Some(Vec::new());
    // ... and `generate_sync_message` returns nothing: heads unchanged and
    // equal, nothing to send, a message sent before on this state.
    Some(state)
}

/// The author tips ([`crate::authorship::author_tips`]) of the changes in
/// `state.sent_hashes` that are not in `done` (those already accounted for).
fn unsigned_tips(
    state: &State,
    done: Option<&BTreeSet<ChangeHash>>,
    doc: &mut AutoCommit,
) -> Vec<(ChangeHash, automerge::ActorId)> {
    tips_of_fresh(&fresh_sent(state, done), doc)
}

/// The changes in `state.sent_hashes` that are not in `done`, in order.
fn fresh_sent(state: &State, done: Option<&BTreeSet<ChangeHash>>) -> Vec<ChangeHash> {
    match done {
        Some(done) => state.sent_hashes.difference(done).copied().collect(),
        None => state.sent_hashes.iter().copied().collect(),
    }
}

/// The author tips of the changes `fresh`, from the document's metadata.
fn tips_of_fresh(fresh: &[ChangeHash], doc: &mut AutoCommit) -> Vec<(ChangeHash, automerge::ActorId)> {
    // Metadata only: rebuilding whole changes would encode their operations again for every peer.
    let changes: Vec<automerge::ChangeMetadata<'_>> =
        fresh.iter().filter_map(|hash| doc.get_change_meta_by_hash(hash).map(|c| c.into_owned())).collect();
    crate::authorship::author_tips_of_metadata(changes.iter())
}

/// What [`PeerSession::receive`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct ReceiveOutcome {
    /// Whether the document's heads moved: persist it and offer it to other peers.
    pub changed: bool,
    /// The document's heads after applying the message.
    pub heads: Vec<ChangeHash>,
    /// The frame to send back, if any.
    pub reply: Option<Frame>,
    /// The bytes the document was loaded from, when the message made an
    /// empty document whole and they are worth keeping as they are (see
    /// [`whole::keepable_as_received`]); `None` otherwise.
    pub received_whole: Option<Vec<u8>>,
}

/// Sync state of one connection, in either role: one Automerge [`State`] per document.
#[derive(Debug)]
pub struct PeerSession {
    role: Role,
    limits: SyncLimits,
    states: BTreeMap<DocId, State>,
    pub(crate) disabled: BTreeSet<DocId>,
    /// Changes sent on this connection whose authors' signatures were accounted for, per document.
    signatures_sent: BTreeMap<DocId, BTreeSet<ChangeHash>>,
    /// Documents whose sync state was created, dropped, or had its shared
    /// heads changed since [`Self::take_changed_shared_heads`] (so that
    /// monitoring touches only those, never every state after every frame).
    changed: BTreeSet<DocId>,
    /// Documents sent whole from their stored bytes ([`Self::start_whole`])
    /// whose acknowledgement has not come yet.
    sent_whole: BTreeSet<DocId>,
}

impl PeerSession {
    /// A session with the default [`SyncLimits`].
    pub fn new(role: Role) -> Self {
        Self::with_limits(role, SyncLimits::default())
    }

    /// A session with explicit limits.
    pub fn with_limits(role: Role, limits: SyncLimits) -> Self {
        Self {
            role,
            limits,
            states: BTreeMap::new(),
            disabled: BTreeSet::new(),
            signatures_sent: BTreeMap::new(),
            changed: BTreeSet::new(),
            sent_whole: BTreeSet::new(),
        }
    }

    /// This end's role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The limits in force.
    pub fn limits(&self) -> &SyncLimits {
        &self.limits
    }

    /// Seeds a document's sync state from bytes persisted at the end of an
    /// earlier connection with the same peer (`State::decode`, which keeps the
    /// shared heads and resets all in-flight bookkeeping). Call before the
    /// document's first message on this connection.
    pub fn restore_state(&mut self, doc_id: &DocId, persisted: &[u8]) -> Result<(), SyncError> {
        if self.states.contains_key(doc_id) || self.disabled.contains(doc_id) {
            return Err(SyncError::StateInUse { doc: doc_id.clone() });
        }
        let mut state =
            State::decode(persisted).map_err(|source| SyncError::PersistedState { doc: doc_id.clone(), source })?;
        // Automerge expects sorted heads (it debug-asserts when encoding them).
        state.shared_heads.sort_unstable();
        state.shared_heads.dedup();
        self.states.insert(doc_id.clone(), state);
        self.changed.insert(doc_id.clone());
        Ok(())
    }

    /// The bytes to persist for one document's sync state (`State::encode`:
    /// only the heads both sides are known to share). `None` if the document
    /// has no state on this connection or was disabled by an error.
    pub fn persisted_state(&self, doc_id: &DocId) -> Option<Vec<u8>> {
        self.states.get(doc_id).map(State::encode)
    }

    /// The bytes to persist for every document with a usable sync state.
    pub fn persisted_states(&self) -> BTreeMap<DocId, Vec<u8>> {
        self.states.iter().map(|(doc, state)| (doc.clone(), state.encode())).collect()
    }

    /// Ends the session, returning what to persist (see [`Self::persisted_states`]).
    /// Documents disabled by an error are left out: sync them from scratch next time.
    pub fn into_persisted(self) -> BTreeMap<DocId, Vec<u8>> {
        self.persisted_states()
    }

    /// The changes whose authors' signatures prove the changes Automerge has
    /// sent the peer for `doc_id` since the last call (one message's): per
    /// author, its latest changes among them ([`crate::authorship::author_tips`]),
    /// with their actors. Call after every generate or receive.
    pub fn take_sent_tips(&mut self, doc_id: &DocId, doc: &mut AutoCommit) -> Vec<(ChangeHash, automerge::ActorId)> {
        let Some(state) = self.states.get(doc_id) else { return Vec::new() };
        let tips = unsigned_tips(state, self.signatures_sent.get(doc_id), doc);
        // Automerge drops from `sent_hashes` what the peer has acknowledged (or
        // everything, when the peer lost its data): keeping only what is still
        // there bounds this set by the changes in flight, and a change sent
        // again after a reset gets its signature again.
        self.signatures_sent.insert(doc_id.clone(), state.sent_hashes.clone());
        tips
    }

    /// [`Self::generate`] followed by [`Self::take_sent_tips`], done on a copy
    /// of the document's sync state and leaving the session untouched until
    /// [`Self::commit_generated`]; from a fresh state when the document has
    /// none yet, as [`Self::generate`]. `None` when only the full path will do
    /// (the document disabled, Automerge failed, the message too large): that
    /// path then handles it, errors included.
    pub(crate) fn prepare_generate(
        &self,
        doc_id: &DocId,
        doc: &mut AutoCommit,
        memo: Option<&SyncMemo>,
    ) -> Option<PreparedMessage> {
        if self.disabled.contains(doc_id) {
            return None;
        }
        // No state yet (nothing persisted for this peer, nothing exchanged on
        // this connection): the full path would start from a fresh one too.
        let fresh;
        let before = match self.states.get(doc_id) {
            Some(state) => state,
            None => {
                fresh = State::new();
                &fresh
            }
        };
        let heads = memo.map(|_| doc.get_heads());
        let shared = memo.zip(heads.as_deref());
        let (state, frame) =
            self.step_on(doc_id, doc, before, None, shared, |state, doc| self.generate_step(doc_id, doc, state))?;
        Some(self.prepared(doc_id, doc, state, frame, false, shared))
    }

    /// [`Self::receive`] of a message that carries no changes (an
    /// acknowledgement: it leaves the document as it is), followed by
    /// [`Self::take_sent_tips`], on a copy of the sync state, as
    /// [`Self::prepare_generate`]. `None` for anything else, which the full
    /// path then handles: no sync state yet, the document disabled, a message
    /// that does not decode, fails a check or carries changes, an Automerge
    /// error.
    pub(crate) fn prepare_receive(
        &self,
        doc_id: &DocId,
        doc: &mut AutoCommit,
        message: &[u8],
        memo: Option<&SyncMemo>,
    ) -> Option<PreparedMessage> {
        if self.disabled.contains(doc_id) {
            return None;
        }
        let before = self.states.get(doc_id)?;
        let decoded = Message::decode(message).ok()?;
        if !decoded.changes.is_empty() || check_message(&decoded, &self.limits).is_err() {
            return None;
        }
        if let Some(state) = acknowledged(before, &decoded, &doc.get_heads()) {
            return Some(self.prepared(doc_id, doc, state, None, true, None));
        }
        let heads = memo.map(|_| doc.get_heads());
        let shared = memo.zip(heads.as_deref());
        let (state, frame) = self.step_on(doc_id, doc, before, Some(message), shared, |mut state, doc| {
            let heads = doc.get_heads();
            let received = catch_unwind(AssertUnwindSafe(|| receive_message(doc, &mut state, decoded)));
            if !matches!(received, Ok(Ok(_))) || doc.get_heads() != heads || heads.is_empty() {
                return None;
            }
            self.generate_step(doc_id, doc, state)
        })?;
        Some(self.prepared(doc_id, doc, state, frame, true, shared))
    }

    /// [`Self::receive`] of a message that carries no changes, for a document
    /// this side does not hold (an empty one) and has no state for: the reply
    /// (`Some(None)`: none), worked out without touching this session, which
    /// the full path leaves unchanged too (a document still empty afterwards
    /// keeps no state). `None` for anything else, which the full path then
    /// handles: a state or a refusal held for the document, a message that
    /// does not decode, fails a check or carries changes, an Automerge error,
    /// a reply over the frame limit.
    pub(crate) fn answer_absent(&self, doc_id: &DocId, message: &[u8]) -> Option<Option<Frame>> {
        if self.disabled.contains(doc_id) || self.states.contains_key(doc_id) {
            return None;
        }
        let decoded = Message::decode(message).ok()?;
        if !decoded.changes.is_empty() || check_message(&decoded, &self.limits).is_err() {
            return None;
        }
        let mut empty = AutoCommit::new();
        let mut state = State::new();
        let received = catch_unwind(AssertUnwindSafe(|| empty.sync().receive_sync_message(&mut state, decoded)));
        if !matches!(received, Ok(Ok(()))) || !empty.get_heads().is_empty() {
            return None;
        }
        self.generate_step(doc_id, &mut empty, state).map(|(_, frame)| frame)
    }

    /// One step that leaves the document as it is, from `before` (and the
    /// peer's `received` message): copied from the memo when it holds the
    /// same step on the same document version (`shared`: the memo and the
    /// document's heads), else worked out by `work` on a copy of `before`
    /// and kept there for the other connections.
    fn step_on(
        &self,
        doc_id: &DocId,
        doc: &mut AutoCommit,
        before: &State,
        received: Option<&[u8]>,
        shared: Option<(&SyncMemo, &[ChangeHash])>,
        work: impl FnOnce(State, &mut AutoCommit) -> Option<(State, Option<Frame>)>,
    ) -> Option<(State, Option<Frame>)> {
        let Some((memo, heads)) = shared else { return work(before.clone(), doc) };
        if let Some(found) = memo.lookup(doc_id, heads, before, received) {
            return Some(found);
        }
        let (state, frame) = work(before.clone(), doc)?;
        memo.remember(doc_id, heads, before.clone(), received, &state, &frame);
        Some((state, frame))
    }

    /// Generates the next message on `state` (a copy); `None` if Automerge
    /// failed or the message is too large.
    fn generate_step(&self, doc_id: &DocId, doc: &mut AutoCommit, mut state: State) -> Option<(State, Option<Frame>)> {
        let generated = catch_unwind(AssertUnwindSafe(|| doc.sync().generate_sync_message(&mut state)));
        let frame = match generated.ok()? {
            Some(message) => {
                let frame = Frame::Sync { doc: doc_id.clone(), message: message.encode() };
                if frame.payload_len() > self.limits.max_frame {
                    return None;
                }
                Some(frame)
            }
            None => None,
        };
        Some((state, frame))
    }

    /// The prepared message of a step that left `state` and `frame`;
    /// `after_receive`: as the reply to a received message, whose sent
    /// changes are accounted for whether or not a reply is made. The author
    /// tips come from the memo (`shared`) when another connection needed the
    /// same ones on the same document version.
    fn prepared(
        &self,
        doc_id: &DocId,
        doc: &mut AutoCommit,
        state: State,
        frame: Option<Frame>,
        after_receive: bool,
        shared: Option<(&SyncMemo, &[ChangeHash])>,
    ) -> PreparedMessage {
        let account = after_receive || frame.is_some();
        let tips = if !account {
            Vec::new()
        } else {
            let fresh = fresh_sent(&state, self.signatures_sent.get(doc_id));
            match shared {
                _ if fresh.is_empty() => Vec::new(),
                Some((memo, heads)) => memo.tips(doc_id, heads, &fresh).unwrap_or_else(|| {
                    let tips = tips_of_fresh(&fresh, doc);
                    memo.remember_tips(doc_id, heads, fresh, &tips);
                    tips
                }),
                None => tips_of_fresh(&fresh, doc),
            }
        };
        PreparedMessage { doc: doc_id.clone(), state, frame, tips, account }
    }

    /// Takes a [`PreparedMessage`] into the session, as if [`Self::generate`]
    /// (and, when it made a message, [`Self::take_sent_tips`]) had run; returns the frame.
    pub(crate) fn commit_generated(&mut self, prepared: PreparedMessage) -> Option<Frame> {
        let PreparedMessage { doc, state, frame, account, .. } = prepared;
        if account {
            self.signatures_sent.insert(doc.clone(), state.sent_hashes.clone());
        }
        if self.states.get(&doc).map(|s| &s.shared_heads) != Some(&state.shared_heads) {
            self.changed.insert(doc.clone());
        }
        self.states.insert(doc, state);
        frame
    }

    /// Starts a document the peer has none of by sending it whole from its
    /// stored bytes ([`StoredWhole`]), without the document: the message is
    /// the one Automerge sends a peer with empty heads (its heads, the
    /// stored chunks as the changes) but without the round trip that asks
    /// for it, and the state is the one Automerge keeps after sending a
    /// message (its `sent_hashes` left empty: those need the changes'
    /// hashes; they only save sending a change twice). `None` (nothing
    /// changed) when this document already has a state or was refused, or
    /// the message would not fit a frame: the full path then starts it.
    pub fn start_whole(&mut self, doc_id: &DocId, whole: &StoredWhole) -> Option<Frame> {
        if self.states.contains_key(doc_id) || self.disabled.contains(doc_id) || whole.heads.is_empty() {
            return None;
        }
        let mut heads = whole.heads.clone();
        heads.sort_unstable();
        let mut flags = automerge::sync::MessageFlags::new();
        flags.set(automerge::sync::MessageFlags::SUPPORTS_SYNC_RESET);
        let message = Message {
            heads: heads.clone(),
            need: Vec::new(),
            have: Vec::new(),
            changes: whole.chunks.clone().into(),
            flags: Some(flags),
            version: automerge::sync::MessageVersion::V2,
        };
        let frame = Frame::Sync { doc: doc_id.clone(), message: message.encode() };
        if frame.payload_len() > self.limits.max_frame {
            return None;
        }
        let mut state = State::new();
        state.have_responded = true;
        state.last_sent_heads = heads;
        state.in_flight = true;
        self.states.insert(doc_id.clone(), state);
        self.signatures_sent.insert(doc_id.clone(), BTreeSet::new());
        self.sent_whole.insert(doc_id.clone());
        self.changed.insert(doc_id.clone());
        Some(frame)
    }

    /// Whether `doc_id` was sent whole ([`Self::start_whole`]) and its
    /// acknowledgement is still to come.
    pub fn awaits_whole_ack(&self, doc_id: &DocId) -> bool {
        self.sent_whole.contains(doc_id)
    }

    /// Takes the peer's acknowledgement of a document sent whole without the
    /// document: `Some(())` when `message` says the peer now has exactly
    /// `heads` (the document's current heads) and asks for nothing, so that
    /// Automerge, given the document, would take it in as below and have
    /// nothing to reply (`a_document_sent_whole_is_acknowledged_without_it_as_automerge_would_with_it`).
    /// `None` (nothing changed) for anything else, which the full path then handles.
    pub fn settle_whole(&mut self, doc_id: &DocId, message: &[u8], heads: &[ChangeHash]) -> Option<()> {
        if !self.sent_whole.contains(doc_id) || self.disabled.contains(doc_id) {
            return None;
        }
        let decoded = Message::decode(message).ok()?;
        check_message(&decoded, &self.limits).ok()?;
        let state = acknowledged(self.states.get(doc_id)?, &decoded, heads)?;
        self.sent_whole.remove(doc_id);
        self.signatures_sent.insert(doc_id.clone(), BTreeSet::new());
        self.states.insert(doc_id.clone(), state);
        self.changed.insert(doc_id.clone());
        Some(())
    }

    /// Whether an error disabled this document for the rest of the connection.
    pub fn is_disabled(&self, doc_id: &DocId) -> bool {
        self.disabled.contains(doc_id)
    }

    /// The heads each document is known to share with the peer (Automerge's
    /// `shared_heads`: what the peer is known to have), by document.
    pub fn shared_heads(&self) -> impl Iterator<Item = (&DocId, &[ChangeHash])> {
        self.states.iter().map(|(doc, state)| (doc, state.shared_heads.as_slice()))
    }

    /// The documents with a sync state on this connection.
    pub fn docs(&self) -> impl Iterator<Item = &DocId> {
        self.states.keys()
    }

    /// The documents whose sync state was created, dropped, or had its shared
    /// heads changed since the last call, with their shared heads now (`None`:
    /// the state was dropped). The cost is proportional to what changed, not
    /// to the number of states: call it after every frame.
    pub fn take_changed_shared_heads(&mut self) -> Vec<(DocId, Option<Vec<ChangeHash>>)> {
        let changed = std::mem::take(&mut self.changed);
        changed
            .into_iter()
            .map(|doc| {
                let heads = self.states.get(&doc).map(|state| state.shared_heads.clone());
                (doc, heads)
            })
            .collect()
    }

    /// The document's sync state, created (and noted as changed) if missing.
    fn state_mut(&mut self, doc_id: &DocId) -> &mut State {
        if !self.states.contains_key(doc_id) {
            self.changed.insert(doc_id.clone());
        }
        self.states.entry(doc_id.clone()).or_default()
    }

    /// The next sync message for `doc_id` as a [`Frame::Sync`], or `None` when
    /// there is nothing to send (the peer is up to date, or a message is in flight).
    ///
    /// Call after every local change and whenever the document changed through
    /// another connection; [`Self::receive`] calls it itself for the reply.
    pub fn generate(&mut self, doc_id: &DocId, doc: &mut AutoCommit) -> Result<Option<Frame>, SyncError> {
        self.generate_shared(doc_id, doc, None)
    }

    /// [`Self::generate`], copying the step from `memo` when another
    /// connection already worked out the same one (see [`SyncMemo`]), and
    /// leaving it there when this one works it out.
    pub fn generate_shared(
        &mut self,
        doc_id: &DocId,
        doc: &mut AutoCommit,
        memo: Option<&SyncMemo>,
    ) -> Result<Option<Frame>, SyncError> {
        if self.disabled.contains(doc_id) {
            return Err(SyncError::Disabled { doc: doc_id.clone() });
        }
        let Some(memo) = memo else { return self.generate_here(doc_id, doc) };
        let heads = doc.get_heads();
        let before = self.state_mut(doc_id).clone();
        if let Some((after, frame)) = memo.lookup(doc_id, &heads, &before, None) {
            *self.state_mut(doc_id) = after;
            return Ok(frame);
        }
        let frame = self.generate_here(doc_id, doc)?;
        if let Some(after) = self.states.get(doc_id) {
            memo.remember(doc_id, &heads, before, None, after, &frame);
        }
        Ok(frame)
    }

    /// [`Self::generate`] worked out by Automerge.
    fn generate_here(&mut self, doc_id: &DocId, doc: &mut AutoCommit) -> Result<Option<Frame>, SyncError> {
        let state = self.state_mut(doc_id);
        let generated = catch_unwind(AssertUnwindSafe(|| doc.sync().generate_sync_message(state).map(Message::encode)));
        let message = match generated {
            Ok(message) => message,
            Err(_panic) => {
                return Err(self.disable(doc_id, SyncError::Panicked { doc: doc_id.clone(), during: "generating" }))
            }
        };
        let Some(message) = message else { return Ok(None) };
        let frame = Frame::Sync { doc: doc_id.clone(), message };
        let len = frame.payload_len();
        if len > self.limits.max_frame {
            let max = self.limits.max_frame;
            return Err(self.disable(doc_id, SyncError::MessageTooLarge { doc: doc_id.clone(), len, max }));
        }
        Ok(Some(frame))
    }

    /// Applies the peer's sync message for `doc_id` to `doc` and generates the reply.
    ///
    /// The message is decoded and checked ([`check_message`]) before Automerge
    /// applies it, and Automerge runs under `catch_unwind`. On any error the
    /// document's sync state is dropped and the document disabled for this
    /// connection. The document is untouched by errors found before Automerge
    /// runs ([`SyncError::Decode`], [`SyncError::Refused`], [`SyncError::Disabled`]);
    /// after [`SyncError::Automerge`] or [`SyncError::ReplyFailed`] it may have
    /// changed, and after [`SyncError::Panicked`] it must be reloaded.
    pub fn receive(
        &mut self,
        doc_id: &DocId,
        doc: &mut AutoCommit,
        message: &[u8],
    ) -> Result<ReceiveOutcome, SyncError> {
        if self.disabled.contains(doc_id) {
            return Err(SyncError::Disabled { doc: doc_id.clone() });
        }
        self.sent_whole.remove(doc_id);
        let message = match Message::decode(message) {
            Ok(message) => message,
            Err(source) => {
                return Err(self.disable(doc_id, SyncError::Decode { doc: doc_id.clone(), source: Box::new(source) }))
            }
        };
        if let Err(source) = check_message(&message, &self.limits) {
            return Err(self.disable(doc_id, SyncError::Refused { doc: doc_id.clone(), source }));
        }
        self.apply(doc_id, doc, message)
    }

    /// Hands an already checked message to Automerge and generates the reply.
    ///
    /// A document still empty afterwards (one neither side holds: the peer
    /// named a document that does not exist) keeps no sync state: the reply
    /// is generated, then the state is dropped, so that naming any number of
    /// documents costs no memory. The next message for it starts from a fresh
    /// state, which is always safe.
    fn apply(&mut self, doc_id: &DocId, doc: &mut AutoCommit, message: Message) -> Result<ReceiveOutcome, SyncError> {
        let heads = doc.get_heads();
        if let Some(state) = self.states.get(doc_id).and_then(|state| acknowledged(state, &message, &heads)) {
            if self.states.get(doc_id).map(|s| &s.shared_heads) != Some(&state.shared_heads) {
                self.changed.insert(doc_id.clone());
            }
            self.states.insert(doc_id.clone(), state);
            return Ok(ReceiveOutcome { changed: false, heads, reply: None, received_whole: None });
        }
        let created = !self.states.contains_key(doc_id);
        let state = self.state_mut(doc_id);
        let shared_before = state.shared_heads.clone();
        let applied = catch_unwind(AssertUnwindSafe(|| {
            let before = doc.get_heads();
            let whole = receive_message(doc, state, message)?;
            Ok::<_, AutomergeError>((before, doc.get_heads(), whole))
        }));
        let (before, heads, received_whole) = match applied {
            Ok(Ok(heads)) => heads,
            Ok(Err(source)) => {
                return Err(self.disable(doc_id, SyncError::Automerge { doc: doc_id.clone(), source: Box::new(source) }))
            }
            Err(_panic) => {
                return Err(self.disable(doc_id, SyncError::Panicked { doc: doc_id.clone(), during: "receiving" }))
            }
        };
        let changed = before != heads;
        let reply = self.generate(doc_id, doc);
        if heads.is_empty() {
            self.states.remove(doc_id);
            self.signatures_sent.remove(doc_id);
            if created {
                self.changed.remove(doc_id); // Nothing to report: it came and went.
            } else {
                self.changed.insert(doc_id.clone());
            }
        } else if self.states.get(doc_id).map(|s| &s.shared_heads) != Some(&shared_before) {
            self.changed.insert(doc_id.clone());
        }
        match reply {
            Ok(reply) => Ok(ReceiveOutcome { changed, heads, reply, received_whole }),
            Err(source) => Err(SyncError::ReplyFailed { changed, source: Box::new(source) }),
        }
    }

    /// Whether the peer has everything we have (`has_our_changes`) and last
    /// told us heads equal to ours (so we lack nothing of it either).
    pub fn in_sync(&self, doc_id: &DocId, doc: &mut AutoCommit) -> bool {
        let Some(state) = self.states.get(doc_id) else { return false };
        let heads = doc.get_heads();
        doc.has_our_changes(state) && state.their_heads.as_deref() == Some(heads.as_slice())
    }

    /// [`Self::in_sync`] given the document's current heads instead of the
    /// document (`has_our_changes` is exactly "shared heads equal ours").
    pub fn in_sync_at(&self, doc_id: &DocId, heads: &[ChangeHash]) -> bool {
        let Some(state) = self.states.get(doc_id) else { return false };
        let mut ours = heads.to_vec();
        ours.sort_unstable();
        let sorted = |h: &[ChangeHash]| {
            let mut h = h.to_vec();
            h.sort_unstable();
            h
        };
        sorted(&state.shared_heads) == ours && state.their_heads.as_deref().map(sorted) == Some(ours)
    }

    /// Stops syncing a document on this connection after a refusal (ours or
    /// the peer's): its state is dropped, so nothing is persisted for it; with
    /// `remember`, it is also disabled until [`Self::restart`] (pass `false`
    /// for documents this side does not hold, so that refusals naming unknown
    /// documents grow no set).
    pub fn stop(&mut self, doc_id: &DocId, remember: bool) {
        self.states.remove(doc_id);
        self.sent_whole.remove(doc_id);
        self.signatures_sent.remove(doc_id);
        if remember {
            self.disabled.insert(doc_id.clone());
        } else {
            self.disabled.remove(doc_id);
        }
    }

    /// The peer sent a new message for a document stopped on this connection:
    /// start it again from a fresh state.
    pub fn restart(&mut self, doc_id: &DocId) {
        if self.disabled.remove(doc_id) {
            self.sent_whole.remove(doc_id);
            self.states.remove(doc_id);
            self.signatures_sent.remove(doc_id);
        }
    }

    /// Drops the document's sync state, disables it and returns `error`.
    fn disable(&mut self, doc_id: &DocId, error: SyncError) -> SyncError {
        self.sent_whole.remove(doc_id);
        if self.states.remove(doc_id).is_some() {
            self.changed.insert(doc_id.clone());
        }
        self.disabled.insert(doc_id.clone());
        error
    }
}
