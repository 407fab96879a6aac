//! One connection's protocol as a state machine: handshake, summary, and the
//! per-document Automerge sync, for either end (node or relay).
//!
//! The driver (node client or relay server) feeds it every received [`Frame`]
//! and every local change, sends what [`SyncConnection::take_outbox`] returns,
//! and acts on the [`ConnectionEvent`]s (persist, forward, report). Documents
//! are reached through the [`DocAccess`] trait, which the driver implements over
//! its store; this module never does I/O itself.
//!
//! Sequence: node `Hello` → relay `Welcome` (both report
//! [`ConnectionEvent::Established`]; the driver restores persisted sync states
//! and calls [`SyncConnection::begin`]) → both send `Summary` → each answers
//! `InSync` or `DocHeads` → `Sync` frames for the documents that differ.
//!
//! Nothing a peer sends grows a per-connection set without bound: a second
//! `Summary`, or a second answer to ours, is a protocol error; the relay keeps
//! nothing of the documents a node's `DocHeads` names that it does not hold;
//! a document nobody holds keeps no sync state ([`PeerSession::receive`]);
//! offered signatures are held per document until its `Sync` frame, at most
//! [`MAX_OFFERED_SIGNATURES`]; and the relay's document sets (`docs_sent`,
//! receipts sent) hold only documents it has.
//!
//! On the relay's end, every `Sync` frame of a document (sent, or answered)
//! is preceded by a `Receipts` frame with the relay's approval receipts of
//! that document the node has not been sent on this connection yet
//! ([`DocAccess::receipts`]), so a node has the receipts of the records it
//! holds before it considers a one-shot sync settled.
//!
//! One document's failure stays with that document: a message this side
//! refuses (not shared with the peer, unsigned or unacceptable changes, over
//! the size limits, malformed) is answered with [`Frame::DocRefused`], its
//! sync state is dropped (so nothing a refused message advanced is ever
//! persisted) and the connection goes on. Either side then leaves that
//! document alone on this connection until the peer sends a new `Sync` for it.
//! Only protocol violations and this side's own storage failures close the
//! connection (with an `Error` frame).

use crate::acceptance::ContentLimits;
use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;

use automerge::{ActorId, AutoCommit, ChangeHash};

use super::whole::StoredWhole;
use super::{
    doc_heads_frame, plan_keeping, summary_digest, summary_frame, PeerSession, PreparedMessage, Role, SyncError,
    SyncMemo,
};
use crate::acceptance::{self, AuthorPolicy};
use crate::authorship::{self, AuthorshipError, ChangeSignature};
use crate::ids::DocId;
use crate::wire::{protocol_refusal, protocol_served, ErrorCode, Frame, ReceiptEntry, RefusalKind, PROTOCOL_VERSION};

/// A change hash with its author's signature, to keep beside the change.
pub type SignedChange = (ChangeHash, ChangeSignature);

/// Signatures offered by the peer and not used yet, at most this many at once
/// (a peer offering more is refused). An honest peer sends one `Authors` frame
/// just before the `Sync` frame whose changes it signs, and a document's
/// signatures are consumed or dropped when that frame is processed (see
/// [`OfferedSignatures`]), so this bounds one frame's worth: the changes of one
/// sync message (a whole document of the largest size, at about 300 bytes per
/// change), about 10 MB held at most.
pub const MAX_OFFERED_SIGNATURES: usize = 100_000;

/// How many documents of the connect-time plan one side has started (sent a
/// first `Sync` frame for) and not yet heard back about; the others wait for
/// answers. Starting a document loads it, and the answer is worked out on the
/// loaded copy: with every document started at once, a relay holding more
/// documents than it keeps loaded (256 by default) loaded each twice for a
/// fresh node, and queued a message for every one of them before the first
/// answer came.
pub const START_WINDOW: usize = 32;

/// Authors' signatures the peer sent ahead of its changes (`Authors` frames),
/// by document, at most [`MAX_OFFERED_SIGNATURES`] in all.
///
/// A document's `Sync` frame takes its signatures ([`Self::take`]); what the
/// frame's changes did not use is dropped when the frame has been processed
/// ([`acceptance::accept_new_changes`]), except while Automerge holds changes
/// of the document back until their dependencies arrive: those are applied
/// with a later frame and still need their signatures ([`Self::put_back`]).
#[derive(Debug, Default)]
struct OfferedSignatures {
    by_doc: HashMap<DocId, HashMap<ChangeHash, ChangeSignature>>,
    /// Entries in `by_doc`, over every document.
    count: usize,
}

impl OfferedSignatures {
    /// Keeps `entries` for `doc`; `Err` (nothing kept) if that would hold more than the maximum.
    fn offer(&mut self, doc: DocId, entries: Vec<SignedChange>) -> Result<(), ()> {
        if self.count.saturating_add(entries.len()) > MAX_OFFERED_SIGNATURES {
            return Err(());
        }
        let kept = self.by_doc.entry(doc).or_default();
        for (hash, signature) in entries {
            if kept.insert(hash, signature).is_none() {
                self.count += 1;
            }
        }
        Ok(())
    }

    /// The document's signatures, no longer held here.
    fn take(&mut self, doc: &DocId) -> HashMap<ChangeHash, ChangeSignature> {
        let taken = self.by_doc.remove(doc).unwrap_or_default();
        self.count -= taken.len();
        taken
    }

    /// Holds again what a frame left of the document's signatures (nothing, unless changes wait).
    fn put_back(&mut self, doc: &DocId, rest: HashMap<ChangeHash, ChangeSignature>) {
        if !rest.is_empty() {
            self.count += rest.len();
            self.by_doc.insert(doc.clone(), rest);
        }
    }
}

/// What a closure run on a document decided.
#[derive(Debug)]
pub enum DocOutcome<R> {
    /// Keep what the closure did to the document (store it durably), together
    /// with the verified signatures of the changes it added.
    Keep {
        /// The closure's result.
        value: R,
        /// Signatures of the new changes, to store in the same transaction.
        signatures: Vec<SignedChange>,
        /// The bytes the closure loaded an empty document from, every change
        /// in them applied ([`crate::sync::ReceiveOutcome::received_whole`]): a store
        /// creating the document may keep them as they are instead of saving
        /// it again. `None`: store the document as it is.
        received_whole: Option<Vec<u8>>,
    },
    /// Discard whatever the closure did to the document.
    Discard(R),
}

impl<R> DocOutcome<R> {
    /// Keeps the document as the closure left it, with no new signatures.
    pub fn keep(value: R) -> Self {
        Self::Keep { value, signatures: Vec::new(), received_whole: None }
    }

    /// The value, kept or discarded (for a closure run on a read, which
    /// stores nothing either way).
    fn into_value(self) -> R {
        match self {
            Self::Keep { value, .. } | Self::Discard(value) => value,
        }
    }
}

/// How a connection reaches the documents of its side.
pub trait DocAccess {
    /// The driver's storage error.
    type Error: std::error::Error + Send + Sync + 'static;

    /// The sync steps this driver's connections share ([`SyncMemo`]), if it
    /// keeps them: a step another connection already worked out on the same
    /// document version and state is copied instead of worked out again.
    fn sync_memo(&self) -> Option<Arc<SyncMemo>> {
        None
    }

    /// Every document the peer may see, with its current heads.
    fn shared_heads(&mut self) -> Result<Vec<(DocId, Vec<ChangeHash>)>, Self::Error>;

    /// Whether the peer may send us a document we do not hold yet.
    fn may_receive(&mut self, doc: &DocId) -> bool;

    /// Whose changes this side accepts (see [`crate::acceptance`]).
    fn authors(&mut self) -> AuthorPolicy;

    /// Runs `f` on a document; on [`DocOutcome::Keep`] durably stores the
    /// document (if its heads changed) and the signatures in one transaction,
    /// on [`DocOutcome::Discard`] forgets what `f` did. `Ok(None)` when the
    /// document does not exist and `create` is false.
    fn with_doc<R>(
        &mut self,
        doc: &DocId,
        create: bool,
        f: impl FnOnce(&mut AutoCommit) -> DocOutcome<R>,
    ) -> Result<Option<R>, Self::Error>;

    /// Runs `f` on a document only to read it (generating a message for the
    /// peer): storage may serve it from a read snapshot, with no write
    /// transaction, and must not store anything `f` did. `Ok(None)` when the
    /// document does not exist. By default, [`DocAccess::with_doc`].
    fn read_doc<R>(&mut self, doc: &DocId, f: impl FnOnce(&mut AutoCommit) -> R) -> Result<Option<R>, Self::Error> {
        self.with_doc(doc, false, |d| DocOutcome::keep(f(d)))
    }

    /// The authors' signatures of these changes of `doc` (this side's own
    /// changes are signed on the spot with [`authorship::sign`], others' come
    /// from storage); changes without a known signature are left out. The
    /// connection asks for the changes that end each author's run in a message
    /// (see [`crate::authorship`]), and for later ones where those have none.
    fn signatures(&mut self, doc: &DocId, changes: &[(ChangeHash, ActorId)]) -> Result<Vec<SignedChange>, Self::Error>;

    /// A document's current heads, `Ok(None)` if it does not exist. The default
    /// loads the document; a store that keeps heads beside it should answer
    /// without loading ([`SyncConnection::is_settled`] asks after every frame).
    fn heads(&mut self, doc: &DocId) -> Result<Option<Vec<ChangeHash>>, Self::Error> {
        self.with_doc(doc, false, |d| DocOutcome::keep(d.get_heads()))
    }

    /// (Relay.) What storage holds of `doc`, enough to send it whole to a
    /// peer that has none of it without loading it ([`StoredWhole`]), if
    /// the peer may be sent it and loading is what sending would otherwise
    /// cost. The default has nothing: the document is loaded.
    fn stored_whole(&mut self, _doc: &DocId) -> Result<Option<StoredWhole>, Self::Error> {
        Ok(None)
    }

    /// (Relay only.) The approval receipts of `doc` to give the peer (none
    /// if the peer may not see the document). The default has none.
    fn receipts(&mut self, _doc: &DocId) -> Result<Vec<ReceiptEntry>, Self::Error> {
        Ok(Vec::new())
    }

    /// Whether a storage error concerns this one document (refuse it with
    /// this kind and reason, keep the connection) rather than the store as a
    /// whole (close). The default treats every error as fatal.
    fn refusal(&self, _error: &Self::Error) -> Option<(RefusalKind, String)> {
        None
    }

    /// Whether this side offers `doc` on its own initiative (after the
    /// summary, after a local change). The default offers everything
    /// [`Self::with_doc`] reaches.
    fn may_send(&mut self, _doc: &DocId) -> bool {
        true
    }

    /// The peer sent a sync message for `doc`: `Some(reason)` holds the
    /// document back (it is answered with a [`RefusalKind::Paused`] refusal
    /// and not touched), `None` lets it through (and may forget that it was
    /// held). The default lets everything through.
    fn hold_back(&mut self, _doc: &DocId) -> Option<String> {
        None
    }
}

/// What a driver can answer without waiting for storage or for a lock
/// another thread or process holds: what [`SyncConnection::try_local_change`]
/// and [`SyncConnection::try_frame`] need, so that a relay can pass a change
/// on from its async runtime's thread (from memory alone), and a node can
/// send its changes and take the relay's acknowledgements without the
/// database's write lock (from a read snapshot, which an editor's write
/// never holds up). `None` always means "not without waiting".
pub trait MemoryAccess: DocAccess {
    /// Runs `f` on the document if it can be had without waiting (on the
    /// relay: loaded and nobody using it now) and the peer may see it and be
    /// sent it (as [`DocAccess::with_doc`] without `create`, and
    /// [`DocAccess::may_send`]). `f` only reads: it must leave the document's
    /// heads as they are.
    fn try_loaded_doc<R>(&mut self, doc: &DocId, f: impl FnOnce(&mut AutoCommit) -> R) -> Option<R>;

    /// The stored authors' signatures of these changes, if every one is in memory.
    fn try_signatures(&mut self, doc: &DocId, changes: &[(ChangeHash, ActorId)]) -> Option<Vec<SignedChange>>;

    /// The document's approval receipts for the peer (as [`DocAccess::receipts`]), if in memory.
    fn try_receipts(&mut self, doc: &DocId) -> Option<Vec<ReceiptEntry>>;

    /// `Some(true)` if memory says the document is not held here, and a
    /// message for it would meet an empty document on the full path (the
    /// peer may send it, [`DocAccess::may_receive`], and it is not held back,
    /// [`DocAccess::hold_back`]); `Some(false)` if memory says otherwise. So a
    /// relay answers a node's `Sync` frames for documents nobody holds (a
    /// burst of them costs a storage step each otherwise) where it reads
    /// them. The default knows nothing.
    fn try_absent(&mut self, _doc: &DocId) -> Option<bool> {
        None
    }
}

/// What happened on a connection that the driver should act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectionEvent {
    /// The handshake is done: restore the peer's sync states, then call [`SyncConnection::begin`].
    Established {
        /// The peer: a node id (on the relay) or the relay's name (on a node).
        peer: String,
        /// The peer's software, for logs.
        software: String,
        /// (Relay.) The digest of the enrollment directory the node holds
        /// (protocol ≥ 6): the relay sends its own only when it differs.
        directory: Option<[u8; 32]>,
        /// (Node.) The content limits the relay announced (protocol ≥ 6).
        limits: Option<ContentLimits>,
    },
    /// A document changed here because of what the peer sent (the relay
    /// forwards it to its other connections; a node reports it).
    DocChanged {
        /// The document.
        doc: DocId,
        /// Its new heads.
        heads: Vec<ChangeHash>,
    },
    /// (Node only.) The relay sent its signed enrollment directory: verify it
    /// with the pinned relay key and keep it.
    Directory(Vec<u8>),
    /// (Node only.) The relay sent approval receipts of a document: verify
    /// them with the pinned relay key and keep them.
    Receipts {
        /// The document.
        doc: DocId,
        /// The receipts, unverified.
        entries: Vec<ReceiptEntry>,
    },
    /// This side refused a message of the peer about one document (and told
    /// it with [`Frame::DocRefused`]); the connection goes on.
    Refused {
        /// The document.
        doc: DocId,
        /// Why.
        kind: RefusalKind,
        /// Why, for people.
        reason: String,
    },
    /// The peer refused one of our documents ([`Frame::DocRefused`]): it is
    /// left alone on this connection. A node records it for status and recovery.
    RefusedByPeer {
        /// The document.
        doc: DocId,
        /// Why.
        kind: RefusalKind,
        /// Why, for people.
        reason: String,
        /// The peer's heads of the document (empty unless we may see it).
        heads: Vec<ChangeHash>,
        /// The highest sequence number of our own changes the peer holds.
        your_seq: u64,
    },
}

/// Why a connection must close.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    /// The peer broke the protocol (wrong frame for the phase, wrong version).
    #[error("protocol error: {0}")]
    Protocol(String),
    /// Syncing one document failed (hostile or broken message).
    #[error(transparent)]
    Sync(#[from] SyncError),
    /// The peer sent a change without a valid signature of its author.
    #[error("refused document {doc}: {source}")]
    Authorship {
        /// The document.
        doc: DocId,
        /// Which change, and why.
        source: AuthorshipError,
    },
    /// The peer asked for a document it may not have.
    #[error("refused document {0}: not shared with this peer")]
    Forbidden(DocId),
    /// The peer reported an error and will close.
    #[error("the peer reported an error ({code:?}): {message}")]
    Peer {
        /// Its code.
        code: ErrorCode,
        /// Its message.
        message: String,
    },
    /// Our own storage failed.
    #[error("storage: {0}")]
    Storage(Box<dyn std::error::Error + Send + Sync>),
}

impl ConnectionError {
    fn storage(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self::Storage(Box::new(e))
    }
}

/// Counters of one connection.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnectionStats {
    /// Frames received.
    pub frames_in: u64,
    /// Frames queued for sending.
    pub frames_out: u64,
    /// Automerge sync messages received.
    pub sync_in: u64,
    /// Automerge sync messages queued for sending.
    pub sync_out: u64,
    /// Documents that changed here through this connection.
    pub docs_received: BTreeSet<DocId>,
    /// (Node only: the relay answers any document a peer names, and keeps no
    /// set that a peer could grow.) Documents for which we sent at least one sync message.
    pub docs_sent: BTreeSet<DocId>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    AwaitHello,
    AwaitWelcome,
    Established,
    Open,
}

/// The protocol state of one connection.
#[derive(Debug)]
pub struct SyncConnection {
    role: Role,
    software: String,
    phase: Phase,
    session: PeerSession,
    peer: Option<String>,
    outbox: VecDeque<Frame>,
    their_summary_seen: bool,
    our_summary_answered: bool,
    /// (Node.) Documents that differed at connect time and are not in sync yet
    /// (for [`Self::is_settled`]): ours, and on a node the relay's that it may receive.
    pending: BTreeSet<DocId>,
    planned: usize,
    /// Authors' signatures the peer sent ahead of its changes.
    offered: OfferedSignatures,
    /// (Relay.) Receipts sent on this connection, by document (record signatures).
    receipts_sent: HashMap<DocId, BTreeSet<[u8; 64]>>,
    stats: ConnectionStats,
    /// The protocol version of this connection (the node's, on the relay, once `Hello` is in).
    protocol: u16,
    /// (Relay.) The content limits announced in `Welcome`.
    announced: Option<ContentLimits>,
    /// Documents of the connect-time plan not started yet ([`START_WINDOW`]).
    to_start: VecDeque<DocId>,
    /// Documents started by their first `Sync` frame with no answer (a
    /// `Sync` or `DocRefused` frame) from the peer yet: at most `start_window`.
    unanswered: HashSet<DocId>,
    /// How many of those there may be ([`START_WINDOW`] unless the driver
    /// keeps fewer documents loaded, [`Self::set_start_window`]).
    start_window: usize,
    /// Documents of the connect-time plan the peer has none of, not started
    /// yet: sent whole from storage where the driver can ([`DocAccess::stored_whole`]).
    absent_at_peer: HashSet<DocId>,
}

impl SyncConnection {
    /// A node's end: queues `Hello` with the node's id.
    pub fn node(node_id: &str, software: &str) -> Self {
        Self::node_holding(node_id, software, None)
    }

    /// A node's end that holds the enrollment directory with this digest
    /// ([`crate::directory::directory_digest`]; `None`: none held): the
    /// relay sends its directory only if its own differs.
    pub fn node_holding(node_id: &str, software: &str, directory: Option<[u8; 32]>) -> Self {
        let mut conn = Self::new(Role::Node, software);
        conn.phase = Phase::AwaitWelcome;
        conn.push(Frame::Hello {
            protocol: PROTOCOL_VERSION,
            software: software.to_string(),
            node: node_id.to_string(),
            directory,
        });
        conn
    }

    /// The relay's end: waits for `Hello`.
    pub fn relay(software: &str) -> Self {
        let mut conn = Self::new(Role::Relay, software);
        conn.phase = Phase::AwaitHello;
        conn
    }

    fn new(role: Role, software: &str) -> Self {
        Self {
            role,
            software: software.to_string(),
            phase: Phase::AwaitHello,
            session: PeerSession::new(role),
            peer: None,
            outbox: VecDeque::new(),
            their_summary_seen: false,
            our_summary_answered: false,
            pending: BTreeSet::new(),
            planned: 0,
            offered: OfferedSignatures::default(),
            receipts_sent: HashMap::new(),
            stats: ConnectionStats::default(),
            protocol: PROTOCOL_VERSION,
            announced: None,
            to_start: VecDeque::new(),
            unanswered: HashSet::new(),
            start_window: START_WINDOW,
            absent_at_peer: HashSet::new(),
        }
    }

    /// Starts at most `window` (at least one) documents of the connect-time
    /// plan at a time instead of [`START_WINDOW`]: for a driver that keeps
    /// few documents loaded, so that a started document is still loaded when
    /// the peer's answer comes.
    pub fn set_start_window(&mut self, window: usize) {
        self.start_window = window.max(1);
    }

    /// (Relay.) The content limits to announce in `Welcome` (protocol ≥ 6):
    /// the node then refuses, when it is made, an edit the relay would refuse.
    pub fn announce_limits(&mut self, limits: ContentLimits) {
        self.announced = Some(limits);
    }

    /// The protocol version spoken on this connection.
    pub fn protocol(&self) -> u16 {
        self.protocol
    }

    /// Sets the limits on the peer's sync messages (the defaults otherwise);
    /// call before the first frame and before restoring sync states.
    pub fn set_limits(&mut self, limits: super::SyncLimits) {
        self.session = PeerSession::with_limits(self.role, limits);
    }

    /// The peer, once the handshake is done.
    pub fn peer(&self) -> Option<&str> {
        self.peer.as_deref()
    }

    /// The counters.
    pub fn stats(&self) -> &ConnectionStats {
        &self.stats
    }

    /// The heads each document is known to share with the peer (for monitoring:
    /// a document whose shared heads equal ours is in sync with the peer).
    pub fn shared_heads(&self) -> impl Iterator<Item = (&DocId, &[ChangeHash])> {
        self.session.shared_heads()
    }

    /// The documents whose shared heads changed (or whose sync state was
    /// created or dropped: `None`) since the last call, for monitoring: the
    /// cost follows what changed, not the number of documents.
    pub fn take_changed_shared_heads(&mut self) -> Vec<(DocId, Option<Vec<ChangeHash>>)> {
        self.session.take_changed_shared_heads()
    }

    /// Progress of the documents that differed at connect time: `(done, planned)`.
    /// `done` advances as [`Self::is_settled`] finds documents in sync.
    pub fn progress(&self) -> (usize, usize) {
        (self.planned.saturating_sub(self.pending.len()), self.planned)
    }

    /// Frames to send now, in order.
    pub fn take_outbox(&mut self) -> Vec<Frame> {
        self.outbox.drain(..).collect()
    }

    fn push(&mut self, frame: Frame) {
        if matches!(frame, Frame::Sync { .. }) {
            self.stats.sync_out += 1;
            if let Frame::Sync { doc, .. } = &frame {
                if self.role == Role::Node {
                    self.stats.docs_sent.insert(doc.clone());
                }
            }
        }
        self.stats.frames_out += 1;
        self.outbox.push_back(frame);
    }

    /// Queues an error frame for the peer (before the driver closes).
    pub fn push_error(&mut self, code: ErrorCode, message: impl Into<String>) {
        self.push(Frame::Error { code, message: message.into() });
    }

    /// Refuses a frame the peer may send once per connection and sent again.
    fn refuse_repeat(&mut self, what: &str) -> ConnectionError {
        let message = format!("a second {what} on this connection: it is sent once per connection");
        self.push_error(ErrorCode::Malformed, message.clone());
        ConnectionError::Protocol(message)
    }

    /// (Relay only.) Queues the signed enrollment directory for the node.
    pub fn push_directory(&mut self, signed: Vec<u8>) {
        self.push(Frame::Directory { signed });
    }

    /// Restores persisted sync states for this peer; a state that does not
    /// decode is skipped (a fresh state is always safe, only more expensive).
    /// Returns how many were restored.
    pub fn restore(&mut self, states: impl IntoIterator<Item = (DocId, Vec<u8>)>) -> usize {
        states.into_iter().filter(|(doc, state)| self.session.restore_state(doc, state).is_ok()).count()
    }

    /// The sync states to persist for this peer (call when the connection ends).
    pub fn into_persisted(self) -> Vec<(DocId, Vec<u8>)> {
        self.session.into_persisted().into_iter().collect()
    }

    /// The sync states to persist now, keeping the connection (e.g. periodically).
    pub fn persisted(&self) -> Vec<(DocId, Vec<u8>)> {
        self.session.persisted_states().into_iter().collect()
    }

    /// Starts the summary phase once the handshake is done and states are restored.
    pub fn begin<D: DocAccess>(&mut self, docs: &mut D) -> Result<(), ConnectionError> {
        if self.phase != Phase::Established {
            return Err(ConnectionError::Protocol("begin before the handshake".into()));
        }
        self.phase = Phase::Open;
        let heads = docs.shared_heads().map_err(ConnectionError::storage)?;
        self.push(summary_frame(heads.iter().map(|(d, h)| (d, h.as_slice()))));
        Ok(())
    }

    /// Handles one frame from the peer. An `Err` means the connection must
    /// close; the `Error` frame telling the peer why is already queued (except
    /// when the peer itself sent one).
    pub fn on_frame<D: DocAccess>(
        &mut self,
        frame: Frame,
        docs: &mut D,
    ) -> Result<Vec<ConnectionEvent>, ConnectionError> {
        let result = self.handle_frame(frame, docs);
        if let Err(ConnectionError::Storage(e)) = &result {
            self.push_error(ErrorCode::Internal, format!("storage failed: {e}; try again later"));
        }
        result
    }

    fn handle_frame<D: DocAccess>(
        &mut self,
        frame: Frame,
        docs: &mut D,
    ) -> Result<Vec<ConnectionEvent>, ConnectionError> {
        self.stats.frames_in += 1;
        let mut events = Vec::new();
        match (self.phase, frame) {
            (phase, Frame::Error { code, mut message }) => {
                // A relay older than protocol 6 cannot read our `Hello` (its fields end sooner).
                if phase == Phase::AwaitWelcome && code == ErrorCode::Malformed && message.contains("Hello") {
                    message.push_str(&format!(
                        " (the relay is probably older than this node, which speaks protocol {PROTOCOL_VERSION}: upgrade the relay)"
                    ));
                }
                return Err(ConnectionError::Peer { code, message });
            }
            (Phase::AwaitHello, Frame::Hello { protocol, software, node, directory }) => {
                if !protocol_served(protocol) {
                    self.push_error(ErrorCode::ProtocolVersion, protocol_refusal(protocol));
                    return Err(ConnectionError::Protocol(format!("peer speaks protocol {protocol}")));
                }
                // Answered in the node's own protocol (the frames after the handshake are the same).
                self.protocol = protocol;
                let limits = self.announced.filter(|_| protocol >= 6);
                self.push(Frame::Welcome { protocol, relay: self.software.clone(), limits });
                self.peer = Some(node.clone());
                self.phase = Phase::Established;
                events.push(ConnectionEvent::Established { peer: node, software, directory, limits: None });
            }
            (Phase::AwaitWelcome, Frame::Welcome { protocol, relay, limits }) => {
                if protocol != PROTOCOL_VERSION {
                    return Err(ConnectionError::Protocol(format!(
                        "the relay speaks protocol {protocol}, this node {PROTOCOL_VERSION}: upgrade the older side"
                    )));
                }
                self.peer = Some(relay.clone());
                self.phase = Phase::Established;
                events.push(ConnectionEvent::Established {
                    peer: relay.clone(),
                    software: relay,
                    directory: None,
                    limits,
                });
            }
            (Phase::Open, Frame::Summary { digest, .. }) => {
                // Each side sends one Summary per connection: a second would make us list every document again.
                if self.their_summary_seen {
                    return Err(self.refuse_repeat("Summary"));
                }
                self.their_summary_seen = true;
                let heads = docs.shared_heads().map_err(ConnectionError::storage)?;
                if summary_digest(heads.iter().map(|(d, h)| (d, h.as_slice()))) == digest {
                    self.push(Frame::InSync);
                } else {
                    self.push(doc_heads_frame(heads.iter().map(|(d, h)| (d, h.as_slice()))));
                }
            }
            (Phase::Established | Phase::Open, Frame::Directory { signed }) if self.role == Role::Node => {
                events.push(ConnectionEvent::Directory(signed));
            }
            (Phase::Open, Frame::Receipts { doc, entries }) if self.role == Role::Node => {
                events.push(ConnectionEvent::Receipts { doc, entries });
            }
            // Our Summary is answered once, by InSync or DocHeads.
            (Phase::Open, Frame::InSync | Frame::DocHeads { .. }) if self.our_summary_answered => {
                return Err(self.refuse_repeat("answer to our Summary (InSync or DocHeads)"));
            }
            (Phase::Open, Frame::InSync) => self.our_summary_answered = true,
            (Phase::Open, Frame::DocHeads { entries }) => {
                self.our_summary_answered = true;
                let heads = docs.shared_heads().map_err(ConnectionError::storage)?;
                // Only a node waits for the peer's documents (`pending`, for a one-shot sync);
                // the relay keeps nothing of the documents a node names and it does not hold.
                let node = self.role == Role::Node;
                let ours = heads.iter().map(|(d, h)| (d, h.as_slice()));
                let planned = plan_keeping(ours, &entries, |doc| node && docs.may_receive(doc));
                drop(entries);
                for doc in planned.to_start() {
                    if self.pending.insert(doc.clone()) {
                        self.planned += 1;
                    }
                    self.to_start.push_back(doc.clone());
                }
                self.absent_at_peer.extend(planned.only_ours.iter().cloned());
                self.start_planned(docs)?;
                for doc in &planned.only_theirs {
                    if self.pending.insert(doc.clone()) {
                        self.planned += 1;
                    }
                }
            }
            (Phase::Open, Frame::Authors { doc, entries }) => {
                let offered = entries.len();
                if self.offered.offer(doc.clone(), entries).is_err() {
                    let message = format!(
                        "{offered} signatures offered for document {doc} would make more than \
                         {MAX_OFFERED_SIGNATURES} held ahead of their changes; send each Authors frame \
                         just before the Sync frame of its changes"
                    );
                    self.push_error(ErrorCode::TooLarge, message.clone());
                    return Err(ConnectionError::Protocol(message));
                }
            }
            (Phase::Open, Frame::Sync { doc, message }) => {
                let answered = self.unanswered.remove(&doc);
                self.on_sync(doc, &message, docs, &mut events)?;
                if answered {
                    self.start_planned(docs)?;
                }
            }
            (Phase::Open, Frame::DocRefused { doc, kind, reason, heads, your_seq }) => {
                // Left alone on this connection; remembered only for documents we hold
                // (a refusal naming unknown documents must not grow any set).
                self.pending.remove(&doc);
                let held = docs.heads(&doc).map_err(ConnectionError::storage)?.is_some();
                self.session.stop(&doc, held);
                if self.unanswered.remove(&doc) {
                    self.start_planned(docs)?;
                }
                events.push(ConnectionEvent::RefusedByPeer { doc, kind, reason, heads, your_seq });
            }
            (phase, frame) => {
                let message = format!("unexpected {} frame while {phase:?}", frame.name());
                self.push_error(ErrorCode::Malformed, message.clone());
                return Err(ConnectionError::Protocol(message));
            }
        }
        Ok(events)
    }

    /// Applies the peer's sync message for one document, or refuses that
    /// document alone ([`Self::refuse`]).
    fn on_sync<D: DocAccess>(
        &mut self,
        doc: DocId,
        message: &[u8],
        docs: &mut D,
        events: &mut Vec<ConnectionEvent>,
    ) -> Result<(), ConnectionError> {
        self.stats.sync_in += 1;
        if self.session.awaits_whole_ack(&doc) {
            // The acknowledgement of a document sent whole: taken in without loading it.
            if let Some(heads) = docs.heads(&doc).map_err(ConnectionError::storage)? {
                if self.session.settle_whole(&doc, message, &heads).is_some() {
                    return Ok(());
                }
            }
        }
        // A new message restarts a document left alone after a refusal, from a fresh state.
        self.session.restart(&doc);
        if let Some(reason) = docs.hold_back(&doc) {
            return self.refuse(&doc, RefusalKind::Paused, reason, docs, events);
        }
        let create = docs.may_receive(&doc);
        let authors = docs.authors();
        // A message with no changes only moves the sync state: for a document
        // held here it is taken in from a read, with no write transaction.
        let reads_only = automerge::sync::Message::decode(message).is_ok_and(|m| m.changes.is_empty())
            && docs.heads(&doc).map_err(ConnectionError::storage)?.is_some();
        let session = &mut self.session;
        let mut offered = self.offered.take(&doc);
        let mut apply = |d: &mut AutoCommit| {
            let before = d.get_heads();
            let mut outcome = match session.receive(&doc, d, message) {
                Ok(outcome) => outcome,
                Err(e) => return DocOutcome::Discard(Err(ConnectionError::from(e))),
            };
            match acceptance::accept_new_changes(&doc, d, &before, &mut offered, &authors) {
                Ok(signatures) => {
                    let unsigned = session.take_sent_tips(&doc, d);
                    let received_whole = outcome.received_whole.take();
                    DocOutcome::Keep { value: Ok((outcome, unsigned)), signatures, received_whole }
                }
                Err(source) => DocOutcome::Discard(Err(ConnectionError::Authorship { doc: doc.clone(), source })),
            }
        };
        let outcome = if reads_only {
            docs.read_doc(&doc, |d| apply(d).into_value())
        } else {
            docs.with_doc(&doc, create, apply)
        };
        if matches!(outcome, Ok(Some(Ok(_)))) {
            // Signatures of changes Automerge holds back until their dependencies arrive.
            self.offered.put_back(&doc, offered);
        }
        let (outcome, unsigned) = match outcome {
            Err(e) => {
                return match docs.refusal(&e) {
                    Some((kind, reason)) => self.refuse(&doc, kind, reason, docs, events),
                    None => Err(ConnectionError::storage(e)),
                }
            }
            Ok(None) => {
                let reason = format!("document {doc} is not shared with your organisation");
                return self.refuse(&doc, RefusalKind::NotShared, reason, docs, events);
            }
            Ok(Some(Err(e))) => {
                let kind = match &e {
                    ConnectionError::Sync(sync) if sync.error_code() == ErrorCode::TooLarge => RefusalKind::TooLarge,
                    ConnectionError::Authorship { .. } => RefusalKind::ChangesRefused,
                    _ => RefusalKind::Malformed,
                };
                return self.refuse(&doc, kind, e.to_string(), docs, events);
            }
            Ok(Some(Ok(done))) => done,
        };
        self.push_receipts(&doc, docs)?;
        if let Some(reply) = outcome.reply {
            self.push_authors(&doc, &unsigned, docs)?;
            self.push(reply);
        }
        if outcome.changed {
            self.stats.docs_received.insert(doc.clone());
            events.push(ConnectionEvent::DocChanged { doc, heads: outcome.heads });
        }
        Ok(())
    }

    /// Refuses one document on this connection: its sync state is dropped
    /// (nothing a refused message advanced is persisted), the peer gets a
    /// [`Frame::DocRefused`] (from the relay with its heads and the highest
    /// sequence number of the node's own changes it holds, for recovery), and
    /// the connection goes on.
    fn refuse<D: DocAccess>(
        &mut self,
        doc: &DocId,
        kind: RefusalKind,
        reason: String,
        docs: &mut D,
        events: &mut Vec<ConnectionEvent>,
    ) -> Result<(), ConnectionError> {
        self.pending.remove(doc);
        let held = docs.heads(doc).map_err(ConnectionError::storage)?;
        self.session.stop(doc, held.is_some());
        let (heads, your_seq) = match held {
            Some(heads) if self.role == Role::Relay && kind != RefusalKind::NotShared => {
                let actor = self.peer.as_deref().and_then(|p| p.parse::<crate::identity::NodeId>().ok());
                let seq = match actor {
                    Some(node) => {
                        let actor = node.actor_id();
                        docs.with_doc(doc, false, |d| DocOutcome::keep(max_seq_of(d, &actor)))
                            .map_err(ConnectionError::storage)?
                            .unwrap_or(0)
                    }
                    None => 0,
                };
                (heads, seq)
            }
            _ => (Vec::new(), 0),
        };
        self.push(Frame::DocRefused { doc: doc.clone(), kind, reason: reason.clone(), heads, your_seq });
        events.push(ConnectionEvent::Refused { doc: doc.clone(), kind, reason });
        Ok(())
    }

    /// A document changed on our side (a local edit, or through another
    /// connection on the relay): queue what the peer needs.
    pub fn on_local_change<D: DocAccess>(&mut self, doc: &DocId, docs: &mut D) -> Result<(), ConnectionError> {
        if self.phase != Phase::Open {
            return Ok(()); // The summary will cover it.
        }
        if self.role == Role::Node {
            // Something changed here (an edit, a recovery): a document refused on
            // this connection is offered again, if the node offers it at all. The
            // relay never restarts on its own: the node's next message does.
            self.session.restart(doc);
        }
        self.push_receipts(doc, docs)?;
        self.generate(doc, docs).map(|_| ())
    }

    /// Starts documents of the connect-time plan until `start_window` of
    /// them wait for the peer's answer (or none is left).
    fn start_planned<D: DocAccess>(&mut self, docs: &mut D) -> Result<(), ConnectionError> {
        while self.unanswered.len() < self.start_window {
            let Some(doc) = self.to_start.pop_front() else { break };
            if self.generate(&doc, docs)? {
                self.unanswered.insert(doc);
            }
        }
        Ok(())
    }

    /// [`Self::on_local_change`] done without waiting ([`MemoryAccess`]):
    /// `Some(())` when it is done (what the peer needs is queued), `None` when
    /// it needs storage or a busy document — then nothing changed here, and
    /// the driver calls [`Self::on_local_change`] where waiting is allowed.
    /// The message, the sync state it leaves and the signatures sent are
    /// exactly those of [`Self::on_local_change`]: it is generated on a copy of
    /// the state, taken in only once everything it needs was found. Rare paths
    /// (no sync state yet, a document disabled after a refusal, an error, a
    /// change whose author's signature is not at hand) are left to
    /// [`Self::on_local_change`].
    pub fn try_local_change<M: MemoryAccess>(&mut self, doc: &DocId, memory: &mut M) -> Option<()> {
        if self.phase != Phase::Open {
            return Some(()); // The summary will cover it.
        }
        let receipts = memory.try_receipts(doc)?;
        let (session, memo) = (&self.session, memory.sync_memo());
        let prepared = memory.try_loaded_doc(doc, |d| session.prepare_generate(doc, d, memo.as_deref()))??;
        let signatures = self.memory_signatures(doc, &prepared, memory)?;
        // Everything was found: from here on, what `on_local_change` does.
        self.queue_receipts(doc, receipts);
        self.take_in(doc, prepared, signatures);
        Some(())
    }

    /// [`Self::on_frame`] done without waiting, as [`Self::try_local_change`],
    /// for a peer's `Sync` frame that carries no changes (an acknowledgement,
    /// or a message naming a document not held here, [`MemoryAccess::try_absent`])
    /// and for an `Authors` frame (signatures held until their `Sync` frame,
    /// no storage at all): `Some(())` when it is done (such frames raise no
    /// event), `None` when it needs the full path — then nothing changed here
    /// and the driver passes the frame to [`Self::on_frame`]. The reply and
    /// the state it leaves are those of [`Self::on_frame`].
    pub fn try_frame<M: MemoryAccess>(&mut self, frame: &Frame, memory: &mut M) -> Option<()> {
        if self.phase != Phase::Open {
            return None;
        }
        let (doc, message) = match frame {
            Frame::Sync { doc, message } => (doc, message),
            Frame::Authors { doc, entries } => {
                // Over the limit: the full path refuses it with its error frame.
                self.offered.offer(doc.clone(), entries.clone()).ok()?;
                self.stats.frames_in += 1;
                return Some(());
            }
            _ => return None,
        };
        if self.offered.by_doc.contains_key(doc) {
            return None; // Signatures offered: the frame carries changes.
        }
        if self.unanswered.contains(doc) {
            return None; // The first answer to a planned start: the next planned documents start on the full path.
        }
        if memory.try_absent(doc) == Some(true) {
            // Not held here: the full path would meet an empty document, keep no
            // state for it and send no receipts or signatures, only the reply.
            let reply = self.session.answer_absent(doc, message)?;
            self.stats.frames_in += 1;
            self.stats.sync_in += 1;
            if let Some(reply) = reply {
                self.push(reply);
            }
            return Some(());
        }
        let receipts = memory.try_receipts(doc)?;
        let (session, memo) = (&self.session, memory.sync_memo());
        let prepared = memory.try_loaded_doc(doc, |d| session.prepare_receive(doc, d, message, memo.as_deref()))??;
        let signatures = self.memory_signatures(doc, &prepared, memory)?;
        // Everything was found: from here on, what `on_frame` does.
        self.stats.frames_in += 1;
        self.stats.sync_in += 1;
        self.queue_receipts(doc, receipts);
        self.take_in(doc, prepared, signatures);
        Some(())
    }

    /// The signatures covering a prepared message's changes, if all are in memory.
    fn memory_signatures<M: MemoryAccess>(
        &self,
        doc: &DocId,
        prepared: &PreparedMessage,
        memory: &mut M,
    ) -> Option<Vec<SignedChange>> {
        match prepared.tips.as_slice() {
            [] => Some(Vec::new()),
            tips => {
                let found = memory.try_signatures(doc, tips)?;
                // Otherwise a forwarder's search for a later covering signature reads storage.
                tips.iter().all(|(tip, _)| found.iter().any(|(hash, _)| hash == tip)).then_some(found)
            }
        }
    }

    /// Takes a prepared message into the session and queues it after its signatures.
    fn take_in(&mut self, doc: &DocId, prepared: PreparedMessage, signatures: Vec<SignedChange>) {
        if let Some(frame) = self.session.commit_generated(prepared) {
            if !signatures.is_empty() {
                self.push(Frame::Authors { doc: doc.clone(), entries: signatures });
            }
            self.push(frame);
        }
    }

    /// (Relay.) Queues the receipts of `doc` not yet sent on this connection.
    fn push_receipts<D: DocAccess>(&mut self, doc: &DocId, docs: &mut D) -> Result<(), ConnectionError> {
        if self.role != Role::Relay {
            return Ok(());
        }
        let all = docs.receipts(doc).map_err(ConnectionError::storage)?;
        self.queue_receipts(doc, all);
        Ok(())
    }

    /// (Relay.) Queues those of `all` (a document's receipts) not yet sent on this connection.
    fn queue_receipts(&mut self, doc: &DocId, all: Vec<ReceiptEntry>) {
        if all.is_empty() {
            return; // No entry for documents without receipts (or that do not exist).
        }
        let sent = self.receipts_sent.entry(doc.clone()).or_default();
        let entries: Vec<ReceiptEntry> = all.into_iter().filter(|e| sent.insert(e.record)).collect();
        if !entries.is_empty() {
            self.push(Frame::Receipts { doc: doc.clone(), entries });
        }
    }

    fn generate<D: DocAccess>(&mut self, doc: &DocId, docs: &mut D) -> Result<bool, ConnectionError> {
        if self.session.is_disabled(doc) || !docs.may_send(doc) {
            // Refused on this connection, or not ours to offer: nothing to wait for either.
            self.pending.remove(doc);
            return Ok(false);
        }
        if self.absent_at_peer.remove(doc) && self.protocol >= 6 && self.start_whole(doc, docs)? {
            return Ok(true);
        }
        let (session, memo) = (&mut self.session, docs.sync_memo());
        // A read: what changes is the sync state, kept here, not the document.
        let generated = docs
            .read_doc(doc, |d| {
                let frame = session.generate_shared(doc, d, memo.as_deref());
                let unsigned = if matches!(frame, Ok(Some(_))) { session.take_sent_tips(doc, d) } else { Vec::new() };
                (frame, unsigned)
            })
            .map_err(ConnectionError::storage)?;
        match generated {
            None => Ok(false), // Not here (yet): nothing to offer.
            Some((Ok(Some(frame)), unsigned)) => {
                self.push_receipts(doc, docs)?;
                self.push_authors(doc, &unsigned, docs)?;
                self.push(frame);
                Ok(true)
            }
            Some((Ok(None), _)) => Ok(false),
            Some((Err(e), _)) => {
                // We cannot sync this document (e.g. our message would not fit a
                // frame): tell the peer, so that it does not wait for it, and go on.
                let kind =
                    if e.error_code() == ErrorCode::TooLarge { RefusalKind::TooLarge } else { RefusalKind::Busy };
                let mut events = Vec::new();
                self.refuse(doc, kind, e.to_string(), docs, &mut events).map(|()| false)
            }
        }
    }

    /// Sends a document the peer has none of whole from storage, with its
    /// receipts and the signatures covering it; `false` (nothing sent or
    /// changed) when storage offers no such bytes, a signature is not at
    /// hand or the message would not fit a frame: the full path sends it.
    fn start_whole<D: DocAccess>(&mut self, doc: &DocId, docs: &mut D) -> Result<bool, ConnectionError> {
        let Some(whole) = docs.stored_whole(doc).map_err(ConnectionError::storage)? else { return Ok(false) };
        let signatures = docs.signatures(doc, &whole.tips).map_err(ConnectionError::storage)?;
        if !whole.tips.iter().all(|(tip, _)| signatures.iter().any(|(hash, _)| hash == tip)) {
            return Ok(false);
        }
        let Some(frame) = self.session.start_whole(doc, &whole) else { return Ok(false) };
        self.push_receipts(doc, docs)?;
        if !signatures.is_empty() {
            self.push(Frame::Authors { doc: doc.clone(), entries: signatures });
        }
        self.push(frame);
        Ok(true)
    }

    /// Queues the authors' signatures that prove the changes about to be sent:
    /// `tips` are each author's latest changes in the message
    /// ([`PeerSession::take_sent_tips`]). A tip without a known signature of
    /// its own (rare: a forwarder holds signatures of the changes that ended
    /// its senders' messages) is covered by the nearest later change of the
    /// same author that has one. Changes nothing covers are left out (the
    /// peer refuses them).
    fn push_authors<D: DocAccess>(
        &mut self,
        doc: &DocId,
        tips: &[(ChangeHash, ActorId)],
        docs: &mut D,
    ) -> Result<(), ConnectionError> {
        if tips.is_empty() {
            return Ok(());
        }
        let mut entries = docs.signatures(doc, tips).map_err(ConnectionError::storage)?;
        for (tip, _) in tips {
            if entries.iter().any(|(hash, _)| hash == tip) {
                continue;
            }
            let later = docs
                .with_doc(doc, false, |d| DocOutcome::keep(authorship::later_by_author(d, tip)))
                .map_err(ConnectionError::storage)?
                .unwrap_or_default();
            if later.is_empty() {
                continue;
            }
            let found = docs.signatures(doc, &later).map_err(ConnectionError::storage)?;
            // The nearest: the first of `later` that has one.
            if let Some(best) = later.iter().find_map(|(hash, _)| found.iter().find(|(h, _)| h == hash)) {
                if !entries.contains(best) {
                    entries.push(*best);
                }
            }
        }
        if !entries.is_empty() {
            self.push(Frame::Authors { doc: doc.clone(), entries });
        }
        Ok(())
    }

    /// Whether everything that differed at connect time is now in sync on both
    /// sides and both summaries were answered: a one-shot sync may hang up.
    pub fn is_settled<D: DocAccess>(&mut self, docs: &mut D) -> Result<bool, ConnectionError> {
        if self.phase != Phase::Open || !self.their_summary_seen || !self.our_summary_answered {
            return Ok(false);
        }
        let pending: Vec<DocId> = self.pending.iter().cloned().collect();
        for doc in pending {
            let heads = docs.heads(&doc).map_err(ConnectionError::storage)?;
            if heads.is_some_and(|h| self.session.in_sync_at(&doc, &h)) {
                self.pending.remove(&doc);
            } else {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Which end this is.
    pub fn role(&self) -> Role {
        self.role
    }
}

/// The highest sequence number of `actor`'s changes in `doc` (0: none).
fn max_seq_of(doc: &mut AutoCommit, actor: &ActorId) -> u64 {
    doc.get_changes_meta(&[]).iter().filter(|c| c.actor.as_ref() == actor).map(|c| c.seq).max().unwrap_or(0)
}

#[cfg(test)]
mod tests {

    use automerge::sync::SyncDoc;
    use automerge::transaction::Transactable;
    use automerge::ReadDoc;

    use super::*;

    /// The key every test document is written with.
    fn author() -> &'static crate::identity::NodeKey {
        static KEY: std::sync::OnceLock<crate::identity::NodeKey> = std::sync::OnceLock::new();
        KEY.get_or_init(crate::identity::NodeKey::generate)
    }

    /// The in-memory driver under test.
    type Docs = crate::sync::MemoryDocs;

    /// Documents in memory; this side signs the changes of [`author`] on the spot.
    fn docs() -> Docs {
        Docs::new().with_signer(|doc, hash, actor| {
            (*actor == author().node_id().actor_id()).then(|| authorship::sign(author(), doc, hash))
        })
    }

    /// Delivers frames both ways (through the encoder) until both outboxes are empty.
    fn pump(node: &mut SyncConnection, nd: &mut Docs, relay: &mut SyncConnection, rd: &mut Docs) -> (usize, usize) {
        let (mut frames, mut bytes) = (0, 0);
        for _ in 0..1000 {
            let to_relay = node.take_outbox();
            let to_node = relay.take_outbox();
            if to_relay.is_empty() && to_node.is_empty() {
                return (frames, bytes);
            }
            for f in to_relay {
                frames += 1;
                bytes += f.encode().len();
                for e in relay.on_frame(f, rd).unwrap() {
                    if let ConnectionEvent::Established { .. } = e {
                        relay.begin(rd).unwrap();
                    }
                }
            }
            for f in to_node {
                frames += 1;
                bytes += f.encode().len();
                for e in node.on_frame(f, nd).unwrap() {
                    if let ConnectionEvent::Established { .. } = e {
                        node.begin(nd).unwrap();
                    }
                }
            }
        }
        panic!("did not settle");
    }

    /// Edits `id` in `docs`, then has `full` queue the change by the full
    /// path and `quick` without waiting; both queue the same frames, returned.
    fn change_both_ways(
        docs: &mut Docs,
        id: &DocId,
        n: usize,
        full: &mut SyncConnection,
        quick: &mut SyncConnection,
    ) -> (Vec<Frame>, Vec<Frame>) {
        let d = docs.get_mut(id).unwrap();
        d.put(automerge::ROOT, "text", format!("version {n}")).unwrap();
        d.commit();
        full.on_local_change(id, docs).unwrap();
        assert_eq!(quick.try_local_change(id, docs), Some(()), "everything is at hand");
        let (by_full, by_quick) = (full.take_outbox(), quick.take_outbox());
        assert!(by_full.iter().any(|f| matches!(f, Frame::Authors { .. })), "the change's signature goes along");
        assert_eq!(by_full, by_quick);
        (by_full, by_quick)
    }

    /// Two connections that took the same frames by different paths are in the same state.
    fn assert_same_state(a: &mut SyncConnection, b: &mut SyncConnection) {
        assert_eq!(a.take_outbox(), b.take_outbox());
        assert_eq!(a.take_changed_shared_heads(), b.take_changed_shared_heads());
        assert_eq!(a.stats().frames_in, b.stats().frames_in);
        assert_eq!(a.stats().sync_in, b.stats().sync_in);
    }

    /// A change passed on from memory ([`SyncConnection::try_local_change`])
    /// gives the peer the same frames and leaves the same sync state as the
    /// full path ([`SyncConnection::on_local_change`]).
    #[test]
    fn a_change_passed_on_from_memory_is_what_the_full_path_sends() {
        let id = DocId::random();
        let mut rd = docs();
        rd.insert(id.clone(), doc_with("version 0"));
        let (mut nd1, mut nd2) = (docs(), docs());
        let (mut node1, mut relay1) = (SyncConnection::node("n1", "test"), SyncConnection::relay("test"));
        let (mut node2, mut relay2) = (SyncConnection::node("n2", "test"), SyncConnection::relay("test"));
        pump(&mut node1, &mut nd1, &mut relay1, &mut rd);
        pump(&mut node2, &mut nd2, &mut relay2, &mut rd);
        for n in 1..=5 {
            // A change from elsewhere reaches the relay's copy.
            let (full, from_memory) = change_both_ways(&mut rd, &id, n, &mut relay1, &mut relay2);
            // The nodes take the change in and acknowledge it: the full path
            // on one connection, from memory on the other.
            for f in full {
                node1.on_frame(f, &mut nd1).unwrap();
            }
            for f in from_memory {
                node2.on_frame(f, &mut nd2).unwrap();
            }
            let (acks1, acks2) = (node1.take_outbox(), node2.take_outbox());
            assert_eq!(acks1.len(), acks2.len());
            assert!(acks2.iter().any(|f| matches!(f, Frame::Sync { .. })), "the node acknowledges");
            for (ack1, ack2) in acks1.into_iter().zip(acks2) {
                assert_eq!(relay1.on_frame(ack1, &mut rd).unwrap(), Vec::new());
                assert_eq!(relay2.try_frame(&ack2, &mut rd), Some(()), "an acknowledgement needs only memory");
            }
            assert_same_state(&mut relay1, &mut relay2);
            pump(&mut node1, &mut nd1, &mut relay1, &mut rd);
            pump(&mut node2, &mut nd2, &mut relay2, &mut rd);
            let heads = rd.heads_of(&id);
            assert_eq!((nd1.heads_of(&id), nd2.heads_of(&id)), (heads.clone(), heads));
            assert_eq!(relay1.persisted(), relay2.persisted());
            assert_eq!(relay1.session.signatures_sent, relay2.session.signatures_sent);
        }
        // Nothing new: neither path sends anything.
        relay1.on_local_change(&id, &mut rd).unwrap();
        assert_eq!(relay2.try_local_change(&id, &mut rd), Some(()));
        assert_eq!((relay1.take_outbox(), relay2.take_outbox()), (Vec::new(), Vec::new()));
    }

    /// Nodes that are caught up share the relay's work through a [`SyncMemo`]:
    /// a change is worked out for the first connection and copied for the
    /// others, and the acknowledgements likewise, with the same frames and
    /// sync states as without it. Both paths use it: from memory (even
    /// nodes) and the full path (odd nodes, which take acknowledgements in
    /// through the full path too, where the memo has no part).
    #[test]
    fn caught_up_connections_copy_one_worked_out_step_and_end_as_without_it() {
        const NODES: usize = 4;
        let id = DocId::random();
        let memo = Arc::new(SyncMemo::new());
        let (mut plain_docs, mut memo_docs) = (docs(), docs().with_sync_memo(memo.clone()));
        plain_docs.insert(id.clone(), doc_with("version 0"));
        memo_docs.insert(id.clone(), doc_with("version 0"));
        let mut nodes: Vec<(Docs, SyncConnection, SyncConnection, Docs, SyncConnection, SyncConnection)> = (0..NODES)
            .map(|i| {
                let (mut nd1, mut node1, mut relay1) =
                    (docs(), SyncConnection::node(&format!("n{i}"), "test"), SyncConnection::relay("test"));
                let (mut nd2, mut node2, mut relay2) =
                    (docs(), SyncConnection::node(&format!("n{i}"), "test"), SyncConnection::relay("test"));
                pump(&mut node1, &mut nd1, &mut relay1, &mut plain_docs);
                pump(&mut node2, &mut nd2, &mut relay2, &mut memo_docs);
                (nd1, node1, relay1, nd2, node2, relay2)
            })
            .collect();
        for n in 1..=3 {
            for d in [&mut plain_docs, &mut memo_docs] {
                let d = d.get_mut(&id).unwrap();
                d.put(automerge::ROOT, "text", format!("version {n}")).unwrap();
                d.commit();
            }
            assert_eq!(plain_docs.heads_of(&id), memo_docs.heads_of(&id));
            let (hits, misses) = (memo.hits(), memo.misses());
            for (i, (nd1, node1, relay1, nd2, node2, relay2)) in nodes.iter_mut().enumerate() {
                let from_memory = i % 2 == 0;
                relay1.on_local_change(&id, &mut plain_docs).unwrap();
                if from_memory {
                    assert_eq!(relay2.try_local_change(&id, &mut memo_docs), Some(()));
                } else {
                    relay2.on_local_change(&id, &mut memo_docs).unwrap();
                }
                let (sent1, sent2) = (relay1.take_outbox(), relay2.take_outbox());
                assert_eq!(sent1, sent2, "the same change, worked out or copied");
                for f in sent1 {
                    node1.on_frame(f, nd1).unwrap();
                }
                for f in sent2 {
                    node2.on_frame(f, nd2).unwrap();
                }
                for (ack1, ack2) in node1.take_outbox().into_iter().zip(node2.take_outbox()) {
                    relay1.on_frame(ack1, &mut plain_docs).unwrap();
                    if from_memory {
                        assert_eq!(relay2.try_frame(&ack2, &mut memo_docs), Some(()));
                    } else {
                        relay2.on_frame(ack2, &mut memo_docs).unwrap();
                    }
                }
                assert_same_state(relay1, relay2);
                assert_eq!(relay1.persisted(), relay2.persisted());
                assert_eq!(relay1.session.signatures_sent, relay2.session.signatures_sent);
                assert_eq!(nd2.heads_of(&id), memo_docs.heads_of(&id));
            }
            // One change worked out, the rest copied; the acknowledgements (of
            // the relay's heads) are taken without Automerge, memo or not.
            assert_eq!(memo.misses() - misses, 1, "round {n}");
            assert_eq!(memo.hits() - hits, NODES as u64 - 1, "round {n}");
        }
    }

    /// A document the connection has no sync state for yet (a new one, or
    /// one not exchanged since the connection started) is passed on from
    /// memory as the full path would, from a fresh state; a node's document
    /// it does not hold is left to the full path.
    #[test]
    fn a_change_without_a_sync_state_from_memory_is_what_the_full_path_sends() {
        let id = DocId::random();
        let mut rd = docs();
        let (mut nd1, mut node1, mut relay1) =
            (docs(), SyncConnection::node("n1", "test"), SyncConnection::relay("test"));
        let (mut nd2, mut node2, mut relay2) =
            (docs(), SyncConnection::node("n2", "test"), SyncConnection::relay("test"));
        pump(&mut node1, &mut nd1, &mut relay1, &mut rd);
        pump(&mut node2, &mut nd2, &mut relay2, &mut rd);
        rd.insert(id.clone(), doc_with("new here"));
        relay1.on_local_change(&id, &mut rd).unwrap();
        assert_eq!(relay2.try_local_change(&id, &mut rd), Some(()));
        let (full, from_memory) = (relay1.take_outbox(), relay2.take_outbox());
        assert!(full.iter().any(|f| matches!(f, Frame::Sync { .. })), "the relay offers the new document");
        assert_eq!(full, from_memory);
        assert_same_state(&mut relay1, &mut relay2);
        assert_eq!(relay1.persisted(), relay2.persisted());
        for f in full {
            node1.on_frame(f, &mut nd1).unwrap();
        }
        for f in from_memory {
            node2.on_frame(f, &mut nd2).unwrap();
        }
        pump(&mut node1, &mut nd1, &mut relay1, &mut rd);
        pump(&mut node2, &mut nd2, &mut relay2, &mut rd);
        let heads = rd.heads_of(&id);
        assert_eq!((nd1.heads_of(&id), nd2.heads_of(&id)), (heads.clone(), heads));
        assert_eq!(relay1.persisted(), relay2.persisted());
        let other = DocId::random();
        assert_eq!(node1.try_local_change(&other, &mut nd1), None, "nor a node a document it does not hold");
    }

    /// A node's change sent, and the relay's acknowledgement taken, without
    /// waiting ([`SyncConnection::try_local_change`], [`SyncConnection::try_frame`])
    /// give the relay the same frames and leave the same sync state as the
    /// full path; the relay takes the signatures ahead of the change (`Authors`)
    /// without storage too.
    #[test]
    fn a_nodes_change_and_the_acknowledgement_without_waiting_are_what_the_full_path_does() {
        let id = DocId::random();
        let mut nd = docs();
        nd.insert(id.clone(), doc_with("version 0"));
        let (mut rd1, mut rd2) = (docs(), docs());
        let (mut node1, mut relay1) = (SyncConnection::node("n", "test"), SyncConnection::relay("test"));
        let (mut node2, mut relay2) = (SyncConnection::node("n", "test"), SyncConnection::relay("test"));
        pump(&mut node1, &mut nd, &mut relay1, &mut rd1);
        pump(&mut node2, &mut nd, &mut relay2, &mut rd2);
        for n in 1..=5 {
            let (full, without_waiting) = change_both_ways(&mut nd, &id, n, &mut node1, &mut node2);
            // The relays store the change; the second takes the signatures without storage.
            for f in full {
                relay1.on_frame(f, &mut rd1).unwrap();
            }
            for f in without_waiting {
                if matches!(f, Frame::Authors { .. }) {
                    assert_eq!(relay2.try_frame(&f, &mut rd2), Some(()), "signatures need no storage");
                } else {
                    assert_eq!(relay2.try_frame(&f, &mut rd2), None, "changes are stored");
                    relay2.on_frame(f, &mut rd2).unwrap();
                }
            }
            assert_eq!(relay1.stats().frames_in, relay2.stats().frames_in);
            let (acks1, acks2) = (relay1.take_outbox(), relay2.take_outbox());
            assert_eq!(acks1, acks2);
            assert!(acks2.iter().any(|f| matches!(f, Frame::Sync { .. })), "the relay acknowledges");
            for (ack1, ack2) in acks1.into_iter().zip(acks2) {
                assert_eq!(node1.on_frame(ack1, &mut nd).unwrap(), Vec::new());
                assert_eq!(node2.try_frame(&ack2, &mut nd), Some(()), "an acknowledgement needs no write");
            }
            assert_same_state(&mut node1, &mut node2);
            pump(&mut node1, &mut nd, &mut relay1, &mut rd1);
            pump(&mut node2, &mut nd, &mut relay2, &mut rd2);
            let heads = nd.heads_of(&id);
            assert_eq!((rd1.heads_of(&id), rd2.heads_of(&id)), (heads.clone(), heads));
            assert_eq!(node1.persisted(), node2.persisted());
            assert_eq!(node1.session.signatures_sent, node2.session.signatures_sent);
        }
    }

    /// A `Sync` frame with changes, for a document without a sync state, or not `Sync` at all, is left to the full path.
    #[test]
    fn only_an_acknowledgement_is_taken_from_memory() {
        let id = DocId::random();
        let (mut nd, mut rd) = (docs(), docs());
        nd.insert(id.clone(), doc_with("on the node"));
        let (mut node, mut relay) = (SyncConnection::node("n", "test"), SyncConnection::relay("test"));
        let before = relay.stats().frames_in;
        let hello = node.take_outbox().remove(0);
        assert_eq!(relay.try_frame(&hello, &mut rd), None);
        assert_eq!(relay.stats().frames_in, before, "nothing counted");
        relay.on_frame(hello, &mut rd).unwrap();
        relay.begin(&mut rd).unwrap();
        let mut saw_changes = false;
        for _ in 0..20 {
            for f in node.take_outbox() {
                if let Frame::Sync { message, .. } = &f {
                    let carries = !automerge::sync::Message::decode(message).unwrap().changes.is_empty();
                    if carries {
                        saw_changes = true;
                        assert_eq!(relay.try_frame(&f, &mut rd), None, "changes are stored on a storage thread");
                    }
                }
                relay.on_frame(f, &mut rd).unwrap();
            }
            for f in relay.take_outbox() {
                let events = node.on_frame(f, &mut nd).unwrap();
                if events.iter().any(|e| matches!(e, ConnectionEvent::Established { .. })) {
                    node.begin(&mut nd).unwrap();
                }
            }
        }
        assert!(saw_changes);
        assert_eq!(rd.heads_of(&id), nd.heads_of(&id));
    }

    fn doc_with(text: &str) -> AutoCommit {
        let mut d = AutoCommit::new().with_actor(author().node_id().actor_id());
        d.put(automerge::ROOT, "text", text).unwrap();
        d.commit();
        d
    }

    #[test]
    fn node_and_relay_exchange_missing_documents_and_settle() {
        let (mut nd, mut rd) = (docs(), docs());
        let a = DocId::random();
        let b = DocId::random();
        nd.insert(a.clone(), doc_with("från noden"));
        rd.insert(b.clone(), doc_with("från reläet"));
        let mut node = SyncConnection::node("node-1", "test");
        let mut relay = SyncConnection::relay("relay");
        pump(&mut node, &mut nd, &mut relay, &mut rd);
        assert!(node.is_settled(&mut nd).unwrap());
        assert!(relay.is_settled(&mut rd).unwrap());
        assert_eq!(nd.shared_heads().unwrap(), rd.shared_heads().unwrap());
        assert_eq!(relay.peer(), Some("node-1"));
        assert!(node.stats().docs_received.contains(&b));
        assert!(relay.stats().docs_received.contains(&a));
        let text = nd.get(&b).unwrap().get(automerge::ROOT, "text").unwrap().unwrap().0.to_string();
        assert!(text.contains("från reläet"));

        // Reconnect with persisted states and nothing new: summaries only.
        let node_states = node.into_persisted();
        let relay_states = relay.into_persisted();
        let mut node = SyncConnection::node("node-1", "test");
        let mut relay = SyncConnection::relay("relay");
        node.restore(node_states);
        relay.restore(relay_states);
        let (frames, bytes) = pump(&mut node, &mut nd, &mut relay, &mut rd);
        assert_eq!(node.stats().sync_out + relay.stats().sync_out, 0);
        assert!(node.is_settled(&mut nd).unwrap());
        assert!(frames <= 6 && bytes < 300, "{frames} frames, {bytes} bytes");
    }

    /// A fresh node and a relay holding many documents: the relay starts at
    /// most [`START_WINDOW`] of them at a time, each answer starts the next,
    /// every document arrives, and a document refused by the peer frees its
    /// place too.
    #[test]
    fn a_connect_time_plan_starts_at_most_a_window_of_documents_and_every_one_arrives() {
        let (mut nd, mut rd) = (docs(), docs());
        let ids: Vec<DocId> = (0..3 * START_WINDOW + 5).map(|_| DocId::random()).collect();
        for (n, id) in ids.iter().enumerate() {
            rd.insert(id.clone(), doc_with(&format!("dokument {n}")));
        }
        let mut node = SyncConnection::node("node-1", "test");
        let mut relay = SyncConnection::relay("relay");
        let mut most = 0;
        // Seen on the wire: documents the relay sent a Sync frame for, and those the node answered.
        let (mut started, mut answered) = (HashSet::new(), HashSet::new());
        for _ in 0..1000 {
            let (to_relay, to_node) = (node.take_outbox(), relay.take_outbox());
            if to_relay.is_empty() && to_node.is_empty() {
                break;
            }
            for f in to_relay {
                if let Frame::Sync { doc, .. } = &f {
                    answered.insert(doc.clone());
                }
                for e in relay.on_frame(f, &mut rd).unwrap() {
                    if let ConnectionEvent::Established { .. } = e {
                        relay.begin(&mut rd).unwrap();
                    }
                }
                most = most.max(relay.unanswered.len());
                assert!(relay.unanswered.len() <= START_WINDOW);
            }
            started.extend(to_node.iter().filter_map(|f| match f {
                Frame::Sync { doc, .. } => Some(doc.clone()),
                _ => None,
            }));
            let waiting = started.difference(&answered).count();
            assert!(waiting <= START_WINDOW, "{waiting} documents started and not answered");
            for f in to_node {
                for e in node.on_frame(f, &mut nd).unwrap() {
                    if let ConnectionEvent::Established { .. } = e {
                        node.begin(&mut nd).unwrap();
                    }
                }
            }
        }
        assert_eq!(most, START_WINDOW, "a full window was in flight");
        assert!(relay.to_start.is_empty() && relay.unanswered.is_empty());
        assert!(node.is_settled(&mut nd).unwrap());
        assert_eq!(nd.shared_heads().unwrap(), rd.shared_heads().unwrap());
        assert_eq!(node.stats().docs_received.len(), ids.len());

        // A refusal answers a start as well: the next document starts.
        let mut relay = SyncConnection::relay("relay");
        let mut node = SyncConnection::node("node-2", "test");
        let mut fresh = docs();
        let hold: HashSet<DocId> = ids.iter().take(START_WINDOW).cloned().collect();
        for _ in 0..1000 {
            let (to_relay, to_node) = (node.take_outbox(), relay.take_outbox());
            if to_relay.is_empty() && to_node.is_empty() {
                break;
            }
            for f in to_relay {
                for e in relay.on_frame(f, &mut rd).unwrap() {
                    if let ConnectionEvent::Established { .. } = e {
                        relay.begin(&mut rd).unwrap();
                    }
                }
            }
            for f in to_node {
                // The node refuses the first window's documents (as a node does one it holds back).
                if let Frame::Sync { doc, .. } = &f {
                    if hold.contains(doc) {
                        let refusal = Frame::DocRefused {
                            doc: doc.clone(),
                            kind: RefusalKind::Paused,
                            reason: "held back".into(),
                            heads: Vec::new(),
                            your_seq: 0,
                        };
                        relay.on_frame(refusal, &mut rd).unwrap();
                        continue;
                    }
                }
                for e in node.on_frame(f, &mut fresh).unwrap() {
                    if let ConnectionEvent::Established { .. } = e {
                        node.begin(&mut fresh).unwrap();
                    }
                }
            }
        }
        assert!(relay.to_start.is_empty() && relay.unanswered.is_empty(), "refusals freed the window");
        assert_eq!(node.stats().docs_received.len(), ids.len() - START_WINDOW);
    }

    /// A driver keeping few documents loaded narrows the window.
    #[test]
    fn a_narrower_start_window_is_kept_and_every_document_still_arrives() {
        let (mut nd, mut rd) = (docs(), docs());
        for n in 0..20 {
            rd.insert(DocId::random(), doc_with(&format!("dokument {n}")));
        }
        let mut node = SyncConnection::node("node-1", "test");
        let mut relay = SyncConnection::relay("relay");
        relay.set_start_window(3);
        let mut most = 0;
        for _ in 0..1000 {
            let (to_relay, to_node) = (node.take_outbox(), relay.take_outbox());
            if to_relay.is_empty() && to_node.is_empty() {
                break;
            }
            for f in to_relay {
                for e in relay.on_frame(f, &mut rd).unwrap() {
                    if let ConnectionEvent::Established { .. } = e {
                        relay.begin(&mut rd).unwrap();
                    }
                }
                most = most.max(relay.unanswered.len());
            }
            for f in to_node {
                for e in node.on_frame(f, &mut nd).unwrap() {
                    if let ConnectionEvent::Established { .. } = e {
                        node.begin(&mut nd).unwrap();
                    }
                }
            }
        }
        assert_eq!(most, 3);
        assert_eq!(nd.shared_heads().unwrap(), rd.shared_heads().unwrap());
        relay.set_start_window(0);
        assert_eq!(relay.start_window, 1, "never none: the plan must go on");
    }

    /// A relay that sends the documents a fresh node has none of whole from
    /// storage ([`DocAccess::stored_whole`]) ends where the full path ends:
    /// the node holds every document and every signature its policy asks
    /// for (another author's included), both sides are settled with the same
    /// persisted states, and each document took one round trip less.
    #[test]
    fn documents_a_fresh_node_lacks_are_sent_whole_and_end_as_by_the_full_path() {
        let stranger = crate::identity::NodeKey::generate();
        let (mut full_rd, mut whole_rd) = (docs(), docs().with_whole_sends());
        let mut ids = Vec::new();
        for n in 0..5 {
            let id = DocId::random();
            let mut d = doc_with(&format!("dokument {n}"));
            for k in 0..4 {
                d.put(automerge::ROOT, "text", format!("version {k}")).unwrap();
                d.commit();
            }
            let mut theirs = d.fork().with_actor(stranger.node_id().actor_id());
            theirs.put(automerge::ROOT, "owner", "polisen").unwrap();
            let tip = theirs.commit().unwrap();
            d.merge(&mut theirs).unwrap();
            for rd in [&mut full_rd, &mut whole_rd] {
                rd.insert(id.clone(), d.clone());
                rd.keep_signature(tip, authorship::sign(&stranger, &id, &tip));
            }
            ids.push(id);
        }
        let mut ends = Vec::new();
        for rd in [&mut full_rd, &mut whole_rd] {
            let mut nd = docs();
            let mut node = SyncConnection::node("node-1", "test");
            let mut relay = SyncConnection::relay("relay");
            let (frames, _) = pump(&mut node, &mut nd, &mut relay, rd);
            assert!(node.is_settled(&mut nd).unwrap() && relay.is_settled(rd).unwrap());
            for id in &ids {
                assert_eq!(nd.get_mut(id).unwrap().get_heads(), rd.get_mut(id).unwrap().get_heads());
            }
            assert!(ids.iter().all(|id| !relay.session.awaits_whole_ack(id)));
            let mut states = relay.persisted();
            states.sort();
            ends.push((frames, states, node.stats().docs_received.len(), nd.kept_signatures().len()));
        }
        let (full, whole) = (&ends[0], &ends[1]);
        assert_eq!((&whole.1, whole.2), (&full.1, full.2), "same states, every document received");
        assert!(whole.3 >= full.3, "the stranger's signatures arrived too");
        assert_eq!(full.0 - whole.0, 2 * ids.len(), "one round trip (two frames) less per document");
    }

    /// A document that moves on at the relay between its whole send and the
    /// node's acknowledgement: the acknowledgement is left to the full path
    /// (it no longer names the current heads), and the node still ends with
    /// every change.
    #[test]
    fn a_document_changed_before_its_whole_send_is_acknowledged_still_converges() {
        let id = DocId::random();
        let mut rd = docs().with_whole_sends();
        let mut d = doc_with("första");
        d.put(automerge::ROOT, "text", "andra").unwrap();
        d.commit();
        rd.insert(id.clone(), d);
        let mut nd = docs();
        let mut node = SyncConnection::node("node-1", "test");
        let mut relay = SyncConnection::relay("relay");
        // Deliver until the relay has sent the document whole; hold the node's answer back.
        let mut held = Vec::new();
        for _ in 0..20 {
            for f in node.take_outbox() {
                for e in relay.on_frame(f, &mut rd).unwrap() {
                    if let ConnectionEvent::Established { .. } = e {
                        relay.begin(&mut rd).unwrap();
                    }
                }
            }
            for f in relay.take_outbox() {
                let whole = matches!(&f, Frame::Sync { doc, .. } if *doc == id);
                for e in node.on_frame(f, &mut nd).unwrap() {
                    if let ConnectionEvent::Established { .. } = e {
                        node.begin(&mut nd).unwrap();
                    }
                }
                if whole {
                    held = node.take_outbox();
                }
            }
            if !held.is_empty() {
                break;
            }
        }
        assert!(relay.session.awaits_whole_ack(&id), "sent whole, not acknowledged yet");
        assert_eq!(nd.get_mut(&id).unwrap().get_heads(), rd.get_mut(&id).unwrap().get_heads());
        let d = rd.get_mut(&id).unwrap();
        d.put(automerge::ROOT, "text", "tredje, medan noden svarar").unwrap();
        d.commit();
        relay.on_local_change(&id, &mut rd).unwrap();
        for f in held {
            relay.on_frame(f, &mut rd).unwrap();
        }
        assert!(!relay.session.awaits_whole_ack(&id), "taken by the full path");
        pump(&mut node, &mut nd, &mut relay, &mut rd);
        assert_eq!(nd.get_mut(&id).unwrap().get_heads(), rd.get_mut(&id).unwrap().get_heads());
        assert!(node.is_settled(&mut nd).unwrap() && relay.is_settled(&mut rd).unwrap());
    }

    #[test]
    fn one_signature_per_author_and_message_travels_and_is_kept() {
        let (mut nd, mut rd) = (docs(), docs());
        let doc = DocId::random();
        let mut d = doc_with("först");
        for k in 0..50 {
            d.put(automerge::ROOT, "text", format!("version {k}")).unwrap();
            d.commit();
        }
        nd.insert(doc.clone(), d);
        let mut node = SyncConnection::node("node-1", "test");
        let mut relay = SyncConnection::relay("relay");
        let (_, bytes) = pump(&mut node, &mut nd, &mut relay, &mut rd);
        assert_eq!(rd.get_mut(&doc).unwrap().get_heads(), nd.get_mut(&doc).unwrap().get_heads());
        assert_eq!(rd.kept_signatures().len(), 1, "the relay keeps the one signature that covers all 51 changes");
        assert!(bytes < 51 * 96, "{bytes} bytes");

        // The relay passes the stored signature on to a node that has nothing.
        let mut other = docs();
        let mut node2 = SyncConnection::node("node-2", "test");
        let mut relay2 = SyncConnection::relay("relay");
        pump(&mut node2, &mut other, &mut relay2, &mut rd);
        assert_eq!(other.get_mut(&doc).unwrap().get_heads(), rd.get_mut(&doc).unwrap().get_heads());
        assert_eq!(other.kept_signatures(), rd.kept_signatures());
    }

    #[test]
    fn a_tip_without_its_own_signature_is_covered_by_a_later_change_of_its_author() {
        // A forwarder holds three changes of an author who is not here to sign,
        // with a signature of the last only; asked to prove the first (a
        // message's tip), it sends the signature of the nearest later change.
        let stranger = crate::identity::NodeKey::generate();
        let doc = DocId::random();
        let mut d = AutoCommit::new().with_actor(stranger.node_id().actor_id());
        let mut hashes = Vec::new();
        for k in 0..3 {
            d.put(automerge::ROOT, "text", format!("v{k}")).unwrap();
            hashes.push(d.commit().unwrap());
        }
        let mut rd = docs();
        rd.insert(doc.clone(), d.clone());
        rd.keep_signature(hashes[2], authorship::sign(&stranger, &doc, &hashes[2]));
        let mut found = Vec::new();
        let mut relay = open_relay(&mut rd);
        relay.push_authors(&doc, &[(hashes[0], stranger.node_id().actor_id())], &mut rd).unwrap();
        for frame in relay.take_outbox() {
            if let Frame::Authors { entries, .. } = frame {
                found.extend(entries);
            }
        }
        assert_eq!(found, vec![(hashes[2], rd.kept_signatures()[&hashes[2]])]);
    }

    #[test]
    fn the_relay_sends_a_documents_receipts_once_before_its_sync_frames() {
        let (mut nd, mut rd) = (docs(), docs());
        let doc = DocId::random();
        rd.insert(doc.clone(), doc_with("med godkännande"));
        let entry =
            |n: u8| ReceiptEntry { record: [n; 64], received_at_ms: 1_700_000_000_000, relay_signature: [n; 64] };
        rd.add_receipt(doc.clone(), entry(1));
        let mut node = SyncConnection::node("node-1", "test");
        let mut relay = SyncConnection::relay("relay");
        let deliver = |node: &mut SyncConnection, relay: &mut SyncConnection, nd: &mut Docs, rd: &mut Docs| {
            let mut received = Vec::new();
            for _ in 0..100 {
                let to_relay = node.take_outbox();
                let to_node = relay.take_outbox();
                if to_relay.is_empty() && to_node.is_empty() {
                    return received;
                }
                for f in to_relay {
                    for e in relay.on_frame(f, rd).unwrap() {
                        if let ConnectionEvent::Established { .. } = e {
                            relay.begin(rd).unwrap();
                        }
                    }
                }
                for f in to_node {
                    let name = f.name();
                    for e in node.on_frame(f, nd).unwrap() {
                        match e {
                            ConnectionEvent::Established { .. } => node.begin(nd).unwrap(),
                            ConnectionEvent::Receipts { entries, .. } => received.push(("receipts", entries)),
                            _ => {}
                        }
                    }
                    if name == "Sync" {
                        received.push(("sync", Vec::new()));
                    }
                }
            }
            panic!("did not settle");
        };
        let received = deliver(&mut node, &mut relay, &mut nd, &mut rd);
        assert_eq!(received.first(), Some(&("receipts", vec![entry(1)])), "before the first Sync: {received:?}");
        assert_eq!(received.iter().filter(|(what, _)| *what == "receipts").count(), 1, "sent once");

        // A new receipt (the relay received a new record): only that one is sent, with the change.
        rd.add_receipt(doc.clone(), entry(2));
        rd.get_mut(&doc).unwrap().put(automerge::ROOT, "text", "ändrad").unwrap();
        rd.get_mut(&doc).unwrap().commit();
        relay.on_local_change(&doc, &mut rd).unwrap();
        let received = deliver(&mut node, &mut relay, &mut nd, &mut rd);
        assert_eq!(received.first(), Some(&("receipts", vec![entry(2)])), "{received:?}");

        // A node may not send receipts.
        let err = relay.on_frame(Frame::Receipts { doc, entries: vec![entry(3)] }, &mut rd);
        assert!(matches!(err, Err(ConnectionError::Protocol(_))), "{err:?}");
    }

    /// Delivers frames both ways until both outboxes are empty, collecting the
    /// events of each end (`Established` is acted on).
    fn pump_events(
        node: &mut SyncConnection,
        nd: &mut Docs,
        relay: &mut SyncConnection,
        rd: &mut Docs,
    ) -> (Vec<ConnectionEvent>, Vec<ConnectionEvent>) {
        let (mut node_events, mut relay_events) = (Vec::new(), Vec::new());
        for _ in 0..1000 {
            let to_relay = node.take_outbox();
            let to_node = relay.take_outbox();
            if to_relay.is_empty() && to_node.is_empty() {
                return (node_events, relay_events);
            }
            for f in to_relay {
                for e in relay.on_frame(f, rd).expect("the connection goes on") {
                    if let ConnectionEvent::Established { .. } = e {
                        relay.begin(rd).unwrap();
                    }
                    relay_events.push(e);
                }
            }
            for f in to_node {
                for e in node.on_frame(f, nd).expect("the connection goes on") {
                    if let ConnectionEvent::Established { .. } = e {
                        node.begin(nd).unwrap();
                    }
                    node_events.push(e);
                }
            }
        }
        panic!("did not settle");
    }

    #[test]
    fn a_change_whose_author_did_not_sign_it_is_refused_for_that_document_only() {
        let (mut nd, mut rd) = (docs(), docs());
        let doc = DocId::random();
        // Written under a key this side cannot sign for, and no signature is known.
        let stranger = crate::identity::NodeKey::generate();
        let mut forged = AutoCommit::new().with_actor(stranger.node_id().actor_id());
        forged.put(automerge::ROOT, "text", "i någon annans namn").unwrap();
        forged.commit();
        nd.insert(doc.clone(), forged);
        let honest = DocId::random();
        nd.insert(honest.clone(), doc_with("ärligt"));
        let mut node = SyncConnection::node(&author().node_id().to_string(), "test");
        let mut relay = SyncConnection::relay("relay");
        let (node_events, relay_events) = pump_events(&mut node, &mut nd, &mut relay, &mut rd);
        assert!(
            relay_events.iter().any(|e| matches!(e,
                ConnectionEvent::Refused { doc: d, kind: RefusalKind::ChangesRefused, .. } if *d == doc)),
            "{relay_events:?}"
        );
        assert!(
            node_events.iter().any(|e| matches!(e,
                ConnectionEvent::RefusedByPeer { doc: d, kind: RefusalKind::ChangesRefused, .. } if *d == doc)),
            "{node_events:?}"
        );
        assert!(rd.get_mut(&doc).map(|d| d.get_heads()).unwrap_or_default().is_empty(), "nothing was kept");
        // The other document synced on the same connection, and both ends settled.
        assert_eq!(rd.get_mut(&honest).unwrap().get_heads(), nd.get_mut(&honest).unwrap().get_heads());
        assert!(node.is_settled(&mut nd).unwrap());
        // No sync state of the refused document is persisted (a refused receive advanced none).
        assert!(relay.into_persisted().iter().all(|(d, _)| *d != doc));
    }

    #[test]
    fn wrong_protocol_version_and_out_of_phase_frames_close_with_an_error_frame() {
        let mut rd = docs();
        let mut relay = SyncConnection::relay("relay");
        let err = relay
            .on_frame(Frame::Hello { protocol: 99, software: "x".into(), node: "n".into(), directory: None }, &mut rd);
        assert!(matches!(err, Err(ConnectionError::Protocol(_))));
        assert!(matches!(relay.take_outbox().as_slice(), [Frame::Error { code: ErrorCode::ProtocolVersion, .. }]));

        let mut relay = SyncConnection::relay("relay");
        let err = relay.on_frame(Frame::InSync, &mut rd);
        assert!(matches!(err, Err(ConnectionError::Protocol(_))));
        assert!(matches!(relay.take_outbox().as_slice(), [Frame::Error { code: ErrorCode::Malformed, .. }]));
        // An older relay that cannot read this node's Hello: the node says which side to upgrade.
        let mut nd = docs();
        let mut node = SyncConnection::node("n", "node");
        let older = Frame::Error { code: ErrorCode::Malformed, message: "32 trailing bytes after Hello frame".into() };
        match node.on_frame(older, &mut nd) {
            Err(ConnectionError::Peer { message, .. }) => assert!(message.contains("upgrade the relay"), "{message}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_garbage_or_unshared_message_is_refused_for_that_document_and_the_connection_goes_on() {
        let mut rd = docs();
        let doc = DocId::random();
        rd.insert(doc.clone(), doc_with("orörd"));
        let before = rd.shared_heads().unwrap();
        let node_key = author().node_id();
        let mut relay = SyncConnection::relay("relay");
        relay
            .on_frame(
                Frame::Hello {
                    protocol: PROTOCOL_VERSION,
                    software: "x".into(),
                    node: node_key.to_string(),
                    directory: None,
                },
                &mut rd,
            )
            .unwrap();
        relay.begin(&mut rd).unwrap();
        relay.take_outbox();
        let events = relay.on_frame(Frame::Sync { doc: doc.clone(), message: vec![0x42, 1, 2, 3] }, &mut rd).unwrap();
        assert!(matches!(events.as_slice(), [ConnectionEvent::Refused { kind: RefusalKind::Malformed, .. }]));
        let heads = rd.get_mut(&doc).unwrap().get_heads();
        match relay.take_outbox().as_slice() {
            [Frame::DocRefused { doc: d, kind: RefusalKind::Malformed, heads: h, your_seq, .. }] => {
                assert_eq!(d, &doc);
                assert_eq!(h, &heads, "the relay's heads, for recovery");
                assert_eq!(*your_seq, 1, "the node's own change the relay holds");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(rd.shared_heads().unwrap(), before);

        // A document this side does not share with the peer: refused as not shared, without heads.
        rd.hide(doc.clone());
        let mut fresh = AutoCommit::new();
        let message =
            automerge::sync::SyncDoc::generate_sync_message(&fresh.sync(), &mut automerge::sync::State::new())
                .unwrap()
                .encode();
        let events = relay.on_frame(Frame::Sync { doc: doc.clone(), message }, &mut rd).unwrap();
        assert!(matches!(events.as_slice(), [ConnectionEvent::Refused { kind: RefusalKind::NotShared, .. }]));
        assert!(matches!(relay.take_outbox().as_slice(),
            [Frame::DocRefused { kind: RefusalKind::NotShared, heads, your_seq: 0, .. }] if heads.is_empty()));

        // Thousands of refusals of unknown documents leave no per-document state behind.
        for _ in 0..2000 {
            relay.on_frame(Frame::Sync { doc: DocId::random(), message: vec![0x42] }, &mut rd).unwrap();
        }
        relay.take_outbox();
        assert!(relay.session.disabled.is_empty(), "no refused document the peer may not see is remembered");
        assert!(relay.persisted().is_empty());
    }

    /// A relay connection past the handshake and its own Summary.
    fn open_relay(rd: &mut Docs) -> SyncConnection {
        let mut relay = SyncConnection::relay("relay");
        let hello =
            Frame::Hello { protocol: PROTOCOL_VERSION, software: "x".into(), node: "n".into(), directory: None };
        relay.on_frame(hello, rd).unwrap();
        relay.begin(rd).unwrap();
        relay.take_outbox();
        relay
    }

    /// A sync message naming a document the receiver does not hold (heads only, no changes).
    fn phantom_message() -> Vec<u8> {
        let mut doc = doc_with("finns inte hos mottagaren");
        let mut state = automerge::sync::State::new();
        let message = automerge::sync::SyncDoc::generate_sync_message(&doc.sync(), &mut state).unwrap();
        message.encode()
    }

    fn refused_as_malformed(result: Result<Vec<ConnectionEvent>, ConnectionError>, conn: &mut SyncConnection) {
        assert!(matches!(result, Err(ConnectionError::Protocol(_))), "{result:?}");
        match conn.take_outbox().as_slice() {
            [Frame::Error { code: ErrorCode::Malformed, message }] => {
                assert!(message.contains("once per connection"), "{message}")
            }
            other => panic!("expected one Error frame, got {other:?}"),
        }
    }

    #[test]
    fn a_second_summary_or_a_second_answer_to_ours_is_refused_with_an_error_frame() {
        let mut rd = docs();
        rd.insert(DocId::random(), doc_with("reläets"));
        let summary = Frame::Summary { docs: 0, digest: [0; 32] };

        let mut relay = open_relay(&mut rd);
        relay.on_frame(summary.clone(), &mut rd).unwrap();
        assert!(matches!(relay.take_outbox().as_slice(), [Frame::DocHeads { .. }]));
        let second = relay.on_frame(summary, &mut rd);
        refused_as_malformed(second, &mut relay);

        let mut relay = open_relay(&mut rd);
        relay.on_frame(Frame::DocHeads { entries: Vec::new() }, &mut rd).unwrap();
        relay.take_outbox();
        let second = relay.on_frame(Frame::DocHeads { entries: Vec::new() }, &mut rd);
        refused_as_malformed(second, &mut relay);

        let mut relay = open_relay(&mut rd);
        relay.on_frame(Frame::InSync, &mut rd).unwrap();
        let second = relay.on_frame(Frame::DocHeads { entries: Vec::new() }, &mut rd);
        refused_as_malformed(second, &mut relay);
    }

    #[test]
    fn the_relay_keeps_nothing_of_the_documents_a_node_names_and_it_does_not_hold() {
        let mut rd = docs();
        let ours = DocId::random();
        rd.insert(ours.clone(), doc_with("reläets"));
        let unknown: Vec<(DocId, [u8; 8])> = (0..10_000).map(|_| (DocId::random(), [7; 8])).collect();

        let mut relay = open_relay(&mut rd);
        relay.on_frame(Frame::DocHeads { entries: unknown.clone() }, &mut rd).unwrap();
        assert_eq!(relay.pending.iter().collect::<Vec<_>>(), vec![&ours], "only the relay's own document");
        assert_eq!(relay.progress(), (0, 1));

        // A node waits for the relay's documents it may receive (all, here).
        let mut nd = docs();
        let mut node = SyncConnection::node("n", "test");
        node.on_frame(Frame::Welcome { protocol: PROTOCOL_VERSION, relay: "r".into(), limits: None }, &mut nd).unwrap();
        node.begin(&mut nd).unwrap();
        node.on_frame(Frame::DocHeads { entries: unknown[..3].to_vec() }, &mut nd).unwrap();
        assert_eq!(node.pending.len(), 3);
    }

    #[test]
    fn sync_frames_for_documents_nobody_holds_leave_no_state_and_no_growing_set() {
        let mut rd = docs();
        let mut relay = open_relay(&mut rd);
        relay.on_frame(Frame::DocHeads { entries: Vec::new() }, &mut rd).unwrap();
        let message = phantom_message();
        for _ in 0..200 {
            let doc = DocId::random();
            relay.on_frame(Frame::Sync { doc: doc.clone(), message: message.clone() }, &mut rd).unwrap();
            assert!(matches!(relay.take_outbox().as_slice(), [Frame::Sync { .. }]), "answered");
            assert!(rd.get_mut(&doc).is_none_or(|d| d.get_heads().is_empty()));
        }
        assert_eq!(relay.session.docs().count(), 0, "no sync state kept");
        assert_eq!(relay.shared_heads().count(), 0);
        assert!(relay.into_persisted().is_empty());
        let relay = open_relay(&mut rd);
        assert!(relay.stats().docs_sent.is_empty() && relay.receipts_sent.is_empty());
    }

    /// A burst of `Sync` frames naming documents the relay does not hold is
    /// answered from memory, exactly as the full path answers them; a frame
    /// that brings a new document's changes, or names one held or refused
    /// here, still takes the full path.
    #[test]
    fn sync_frames_for_documents_not_held_are_answered_from_memory_as_the_full_path_answers_them() {
        let mut rd = docs();
        let held = DocId::random();
        rd.insert(held.clone(), doc_with("reläets"));
        let (mut full, mut fast) = (open_relay(&mut rd), open_relay(&mut rd));
        for relay in [&mut full, &mut fast] {
            relay.on_frame(Frame::DocHeads { entries: Vec::new() }, &mut rd).unwrap();
            relay.take_outbox();
        }
        let message = phantom_message();
        for _ in 0..50 {
            let frame = Frame::Sync { doc: DocId::random(), message: message.clone() };
            full.on_frame(frame.clone(), &mut rd).unwrap();
            assert_eq!(fast.try_frame(&frame, &mut rd), Some(()), "no storage needed");
            let (expected, got) = (full.take_outbox(), fast.take_outbox());
            assert!(matches!(got.as_slice(), [Frame::Sync { .. }]), "answered: {got:?}");
            assert_eq!(got, expected, "the same reply as the full path");
        }
        assert_eq!(fast.session.docs().collect::<Vec<_>>(), vec![&held], "no sync state kept for them");
        assert_eq!((fast.stats().frames_in, fast.stats().sync_in), (full.stats().frames_in, full.stats().sync_in));
        assert_eq!(fast.persisted(), full.persisted());

        // A new document's changes: created on the full path.
        let mut theirs = doc_with("ny hos reläet");
        let (mut ours, mut empty) = (automerge::sync::State::new(), AutoCommit::new());
        let mut state = automerge::sync::State::new();
        let first = theirs.sync().generate_sync_message(&mut ours).unwrap();
        empty.sync().receive_sync_message(&mut state, first).unwrap();
        let reply = empty.sync().generate_sync_message(&mut state).unwrap();
        theirs.sync().receive_sync_message(&mut ours, reply).unwrap();
        let with_changes = theirs.sync().generate_sync_message(&mut ours).unwrap();
        assert!(!with_changes.changes.is_empty());
        let new_doc = Frame::Sync { doc: DocId::random(), message: with_changes.encode() };
        assert_eq!(fast.try_frame(&new_doc, &mut rd), None, "changes are stored");
        // A document held here is not answered as an empty one.
        let to_held = Frame::Sync { doc: held.clone(), message: message.clone() };
        if fast.try_frame(&to_held, &mut rd).is_none() {
            fast.on_frame(to_held.clone(), &mut rd).unwrap();
        }
        full.on_frame(to_held, &mut rd).unwrap();
        assert_eq!(fast.take_outbox(), full.take_outbox());
        // Nor one refused on this connection, which the full path restarts.
        let refused = DocId::random();
        fast.session.stop(&refused, true);
        assert_eq!(fast.try_frame(&Frame::Sync { doc: refused, message }, &mut rd), None);
        assert!(fast.take_outbox().is_empty(), "nothing done on a `None`");
    }

    #[test]
    fn offered_signatures_are_held_per_document_until_its_sync_frame_and_capped() {
        let mut rd = docs();
        let mut relay = open_relay(&mut rd);
        relay.on_frame(Frame::DocHeads { entries: Vec::new() }, &mut rd).unwrap();
        let junk = |n: usize, salt: u8| -> Vec<SignedChange> {
            (0..n)
                .map(|i| {
                    let mut hash = [salt; 32];
                    hash[..8].copy_from_slice(&(i as u64).to_be_bytes());
                    (ChangeHash(hash), [0; 64])
                })
                .collect()
        };
        let doc = DocId::random();
        // Many frames' worth over the connection, one frame's worth at a time: each Sync drops what it left.
        for round in 0..5u8 {
            relay.on_frame(Frame::Authors { doc: doc.clone(), entries: junk(60_000, round) }, &mut rd).unwrap();
            assert_eq!(relay.offered.count, 60_000);
            relay.on_frame(Frame::Sync { doc: doc.clone(), message: phantom_message() }, &mut rd).unwrap();
            assert_eq!(relay.offered.count, 0, "unused signatures dropped with the frame");
            relay.take_outbox();
        }
        // Held for two documents at once, past the maximum: refused with a clear reason.
        relay.on_frame(Frame::Authors { doc: DocId::random(), entries: junk(60_000, 1) }, &mut rd).unwrap();
        let err = relay.on_frame(Frame::Authors { doc: DocId::random(), entries: junk(60_000, 2) }, &mut rd);
        assert!(matches!(err, Err(ConnectionError::Protocol(_))), "{err:?}");
        match relay.take_outbox().as_slice() {
            [Frame::Error { code: ErrorCode::TooLarge, message }] => {
                assert!(message.contains(&MAX_OFFERED_SIGNATURES.to_string()), "{message}")
            }
            other => panic!("expected a TooLarge error frame, got {other:?}"),
        }
    }

    #[test]
    fn signatures_of_changes_waiting_for_their_parents_are_kept_until_those_arrive() {
        // The node's two changes, the second depending on the first.
        let mut node_doc = doc_with("först");
        let first = node_doc.get_heads()[0];
        node_doc.put(automerge::ROOT, "text", "sedan").unwrap();
        node_doc.commit();
        let second = node_doc.get_heads()[0];
        let (c1, c2) = (node_doc.get_change_by_hash(&first).unwrap(), node_doc.get_change_by_hash(&second).unwrap());
        let message = |mut changes: Vec<automerge::Change>, heads: Vec<ChangeHash>| {
            let chunks: Vec<Vec<u8>> = changes.iter_mut().map(|c| c.bytes().to_vec()).collect();
            automerge::sync::Message {
                heads,
                need: Vec::new(),
                have: Vec::new(),
                changes: chunks.into(),
                flags: None,
                version: automerge::sync::MessageVersion::V1,
            }
            .encode()
        };
        let mut rd = docs();
        let doc = DocId::random();
        let sign = |hash: &ChangeHash| (*hash, authorship::sign(author(), &doc, hash));
        let mut relay = open_relay(&mut rd);
        relay.on_frame(Frame::DocHeads { entries: Vec::new() }, &mut rd).unwrap();
        // The second change arrives first (as after a bloom filter false positive), with both signatures.
        let entries = vec![sign(&first), sign(&second)];
        relay.on_frame(Frame::Authors { doc: doc.clone(), entries }, &mut rd).unwrap();
        relay.on_frame(Frame::Sync { doc: doc.clone(), message: message(vec![c2], vec![second]) }, &mut rd).unwrap();
        assert_eq!(relay.offered.count, 2, "kept while the change waits for its parent");
        // Then the parent, without signatures (already sent): both changes apply, both verified.
        relay.on_frame(Frame::Sync { doc: doc.clone(), message: message(vec![c1], vec![second]) }, &mut rd).unwrap();
        assert_eq!(rd.get_mut(&doc).unwrap().get_heads(), vec![second]);
        assert_eq!(relay.offered.count, 0);
    }

    #[test]
    fn only_documents_whose_shared_heads_changed_are_reported_to_monitoring() {
        let (mut nd, mut rd) = (docs(), docs());
        let docs: Vec<DocId> = (0..20).map(|_| DocId::random()).collect();
        for d in &docs {
            rd.insert(d.clone(), doc_with("reläets"));
        }
        let mut node = SyncConnection::node("node-1", "test");
        let mut relay = SyncConnection::relay("relay");
        pump(&mut node, &mut nd, &mut relay, &mut rd);
        let first = relay.session.take_changed_shared_heads();
        assert_eq!(first.len(), 20, "every document synced");
        assert!(relay.session.take_changed_shared_heads().is_empty(), "nothing since");

        // One edit: one document reported.
        rd.get_mut(&docs[3]).unwrap().put(automerge::ROOT, "text", "ändrad").unwrap();
        rd.get_mut(&docs[3]).unwrap().commit();
        relay.on_local_change(&docs[3], &mut rd).unwrap();
        pump(&mut node, &mut nd, &mut relay, &mut rd);
        let changed = relay.session.take_changed_shared_heads();
        assert_eq!(changed.len(), 1);
        assert_eq!(changed[0].0, docs[3]);
        assert_eq!(changed[0].1.as_deref(), Some(rd.get_mut(&docs[3]).unwrap().get_heads().as_slice()));
    }
}
