//! Wire format of the node–relay protocol: versioned, length-prefixed frames.
//!
//! One connection carries one ordered, reliable QUIC stream; this module turns
//! [`Frame`]s into bytes for it and bytes back into frames. It owns the byte
//! layout and its limits, nothing else: it never does I/O, never looks at a
//! clock, and never trusts a length it has not checked against the bytes that
//! are actually there. Every malformed input gives a [`WireError`]; decoding
//! never panics and never allocates more than the input could fill.
//!
//! # Layout
//!
//! ```text
//! frame   = len:u32be  payload            (len = payload length, 1..=max_frame)
//! payload = type:u8    body
//! ```
//!
//! Bodies use big-endian fixed-width integers for scalar fields, unsigned
//! LEB128 varints (canonical, at most `u32::MAX`) for counts and lengths,
//! `str = varint len + UTF-8 bytes`, `bytes = varint len + bytes`, and document
//! ids as their 16 raw bytes. Trailing bytes after a body are an error.
//!
//! | type | frame      | body                                                 |
//! |------|------------|------------------------------------------------------|
//! | 0x01 | `Hello`    | `protocol:u16be software:str node:str` (protocol ≥ 6: `directory:[u8; 32]`) |
//! | 0x02 | `Welcome`  | `protocol:u16be relay:str` (protocol ≥ 6: `max_change_bytes:u64be max_document_bytes:u64be`) |
//! | 0x03 | `Summary`  | `docs:u32be digest:[u8; 32]`                         |
//! | 0x04 | `DocHeads` | `count:varint` × (`doc:[u8; 16] digest:[u8; 8]`)     |
//! | 0x05 | `InSync`   | (empty)                                              |
//! | 0x06 | `Sync`     | `doc:[u8; 16] message:bytes`                         |
//! | 0x07 | `Error`    | `code:u16be message:str`                             |
//! | 0x08 | `Join`     | `protocol:u16be software:str secret:bytes org:str`   |
//! | 0x09 | `Directory`| `signed:bytes`                                       |
//! | 0x0a | `Authors`  | `doc:[u8; 16] count:varint` × (`hash:[u8; 32] signature:[u8; 64]`) |
//! | 0x0b | `Receipts` | `doc:[u8; 16] count:varint` × (`record:[u8; 64] received_at_ms:i64be relay_signature:[u8; 64]`) |
//!
//! Protocol 2 added `Receipts` (relay → node, see [`crate::receipt`]); a
//! protocol 1 peer could not decode it, so the version was bumped. Protocol 5
//! kept `Authors`' layout but changed what it means (one signature per author
//! and message, see [`PROTOCOL_VERSION`]). Protocol 6 added the fields of
//! `Hello` and `Welcome` above; since only those two frames differ, a relay
//! serves protocol 5 nodes too ([`OLDEST_PROTOCOL_SERVED`]), as before.

use crate::ids::DocId;

/// Version of the protocol spoken by this build, sent in `Hello`, `Welcome` and `Join`.
///
/// History: 1 — first release; 2 — `Join` carries the organisation the node
/// belongs to (`org`), so the relay can refuse a code issued for another
/// organisation before it enrolls anything; 3 — the relay sends `Receipts`
/// (its countersignatures of approval records); 4 — `DocRefused`; 5 —
/// `Authors` carries batch signatures (for each author, only its latest
/// changes in the next `Sync` frame, bound to the document, covering the
/// author's earlier changes: [`crate::authorship`]), which a protocol 4 peer
/// would take for unsigned changes; 6 — `Hello` carries the digest of the
/// enrollment directory the node holds (the relay sends its directory only
/// when the node's differs) and `Welcome` the relay's content limits (the
/// node refuses an edit the relay would refuse, when it is made).
pub const PROTOCOL_VERSION: u16 = 6;

/// The oldest protocol a relay of this build still serves: a node one
/// version behind keeps syncing until it is upgraded (it is answered in its
/// own protocol, and sent the directory on every connection, as before).
pub const OLDEST_PROTOCOL_SERVED: u16 = 5;

/// Whether a relay of this build serves a node speaking `protocol`.
pub fn protocol_served(protocol: u16) -> bool {
    (OLDEST_PROTOCOL_SERVED..=PROTOCOL_VERSION).contains(&protocol)
}

/// What a relay tells a node whose protocol it does not serve.
pub fn protocol_refusal(protocol: u16) -> String {
    if protocol > PROTOCOL_VERSION {
        format!("this relay speaks protocol {PROTOCOL_VERSION}, the node {protocol}: upgrade the relay first")
    } else {
        format!(
            "this relay serves protocols {OLDEST_PROTOCOL_SERVED} to {PROTOCOL_VERSION}, the node speaks {protocol}: upgrade the node"
        )
    }
}

/// Bytes of the directory digest in a protocol 6 `Hello`.
pub const DIRECTORY_DIGEST_BYTES: usize = 32;

/// Default largest payload accepted in one frame: 64 MiB.
///
/// One Automerge sync message can carry a whole saved document, so this is
/// generous; anything announcing more is refused before it is buffered.
pub const DEFAULT_MAX_FRAME: usize = 64 * 1024 * 1024;

/// Bytes of the length prefix in front of every frame.
pub const LENGTH_PREFIX: usize = 4;

/// Bytes of a document id on the wire.
const DOC_ID_BYTES: usize = 16;
/// Bytes of a per-document heads digest.
pub const HEADS_DIGEST_BYTES: usize = 8;

const TYPE_HELLO: u8 = 0x01;
const TYPE_WELCOME: u8 = 0x02;
const TYPE_SUMMARY: u8 = 0x03;
const TYPE_DOC_HEADS: u8 = 0x04;
const TYPE_IN_SYNC: u8 = 0x05;
const TYPE_SYNC: u8 = 0x06;
const TYPE_ERROR: u8 = 0x07;
const TYPE_JOIN: u8 = 0x08;
const TYPE_DIRECTORY: u8 = 0x09;
const TYPE_AUTHORS: u8 = 0x0a;
const TYPE_RECEIPTS: u8 = 0x0b;
const TYPE_DOC_REFUSED: u8 = 0x0c;
/// Bytes of one `Authors` entry: a change hash and its author's signature.
const AUTHOR_ENTRY_BYTES: usize = 32 + 64;
/// Bytes of one `Receipts` entry: record signature, time, relay signature.
const RECEIPT_ENTRY_BYTES: usize = 64 + 8 + 64;

/// One approval receipt on the wire (see [`crate::receipt::ApprovalReceipt`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReceiptEntry {
    /// The record's signature: names the record.
    pub record: [u8; 64],
    /// When the relay first received it, milliseconds since the Unix epoch (UTC).
    pub received_at_ms: i64,
    /// The relay's signature over the receipt.
    pub relay_signature: [u8; 64],
}

/// Why bytes could not be read as frames.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// A frame announced a payload larger than the configured maximum. The
    /// stream cannot be resynchronised after this: close the connection.
    #[error("frame of {len} bytes exceeds the maximum of {max}")]
    FrameTooLarge {
        /// The announced (or, when encoding, actual) payload length.
        len: u64,
        /// The maximum in force.
        max: usize,
    },
    /// A frame announced a zero-length payload (no frame type).
    #[error("empty frame")]
    EmptyFrame,
    /// The frame type byte is not one this version knows.
    #[error("unknown frame type 0x{0:02x}")]
    UnknownFrameType(u8),
    /// The body ended before a field was complete.
    #[error("truncated {frame} frame: {field} incomplete")]
    Truncated {
        /// The frame being decoded.
        frame: &'static str,
        /// The field that was cut short.
        field: &'static str,
    },
    /// A body had bytes left after its last field.
    #[error("{extra} trailing bytes after {frame} frame")]
    TrailingBytes {
        /// The frame being decoded.
        frame: &'static str,
        /// How many bytes were left over.
        extra: usize,
    },
    /// A varint was overlong, too large for `u32`, or a count exceeded what the body holds.
    #[error("bad {field} in {frame} frame")]
    BadLength {
        /// The frame being decoded.
        frame: &'static str,
        /// The field holding the length or count.
        field: &'static str,
    },
    /// A string field was not valid UTF-8.
    #[error("{field} in {frame} frame is not UTF-8")]
    BadUtf8 {
        /// The frame being decoded.
        frame: &'static str,
        /// The string field.
        field: &'static str,
    },
}

impl WireError {
    /// The error code to report to the peer in an [`Frame::Error`] before closing.
    pub fn error_code(&self) -> ErrorCode {
        match self {
            WireError::FrameTooLarge { .. } => ErrorCode::TooLarge,
            _ => ErrorCode::Malformed,
        }
    }

    /// Whether the byte stream is no longer aligned on frames after this error.
    ///
    /// Body errors consume exactly their frame, so decoding could go on; a bad
    /// length prefix loses the framing for good.
    pub fn is_fatal(&self) -> bool {
        matches!(self, WireError::FrameTooLarge { .. } | WireError::EmptyFrame)
    }
}

/// Machine-readable reason carried by an [`Frame::Error`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// The peer speaks a protocol version we do not (code 1).
    ProtocolVersion,
    /// A frame or sync message could not be decoded or failed a sanity check (code 2).
    Malformed,
    /// A frame or message exceeded a size limit (code 3).
    TooLarge,
    /// The peer may not do what it asked, e.g. touch a document outside its organisation (code 4).
    Forbidden,
    /// The peer is not who it claims to be, or did not say `Hello` first (code 5).
    Unauthenticated,
    /// The sender is overloaded; retry later (code 6).
    Busy,
    /// An internal failure on the sender's side (code 7).
    Internal,
    /// A code this version does not know, kept as received.
    Other(u16),
}

impl ErrorCode {
    /// The code as sent on the wire.
    pub fn to_u16(self) -> u16 {
        match self {
            ErrorCode::ProtocolVersion => 1,
            ErrorCode::Malformed => 2,
            ErrorCode::TooLarge => 3,
            ErrorCode::Forbidden => 4,
            ErrorCode::Unauthenticated => 5,
            ErrorCode::Busy => 6,
            ErrorCode::Internal => 7,
            ErrorCode::Other(code) => code,
        }
    }

    /// The code for a wire value; unknown values become [`ErrorCode::Other`].
    pub fn from_u16(code: u16) -> Self {
        match code {
            1 => ErrorCode::ProtocolVersion,
            2 => ErrorCode::Malformed,
            3 => ErrorCode::TooLarge,
            4 => ErrorCode::Forbidden,
            5 => ErrorCode::Unauthenticated,
            6 => ErrorCode::Busy,
            7 => ErrorCode::Internal,
            other => ErrorCode::Other(other),
        }
    }
}

/// Why one document was refused on a connection ([`Frame::DocRefused`]).
/// Unlike an [`ErrorCode`], a refusal concerns that document only: the
/// connection and every other document go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RefusalKind {
    /// The document is not (or no longer) shared with the receiver's
    /// organisation: it is not among the parties in the sender's copy (code 1).
    NotShared,
    /// Changes in the message were refused (unsigned, by an author or an
    /// approval the sender does not accept): nothing of the message was kept (code 2).
    ChangesRefused,
    /// A change or the document exceeds the sender's size limits (code 3).
    TooLarge,
    /// The message did not decode or failed a sanity check (code 4).
    Malformed,
    /// The sender holds the document back for now (a node whose own changes
    /// were refused pauses it until they are recovered) (code 5).
    Paused,
    /// The sender cannot take this document now (too many new documents at
    /// once); the receiver may offer it again on a later connection (code 6).
    Busy,
    /// A kind this version does not know, kept as received.
    Other(u8),
}

impl RefusalKind {
    /// The kind as sent on the wire.
    pub fn to_u8(self) -> u8 {
        match self {
            RefusalKind::NotShared => 1,
            RefusalKind::ChangesRefused => 2,
            RefusalKind::TooLarge => 3,
            RefusalKind::Malformed => 4,
            RefusalKind::Paused => 5,
            RefusalKind::Busy => 6,
            RefusalKind::Other(kind) => kind,
        }
    }

    /// The kind for a wire value; unknown values become [`RefusalKind::Other`].
    pub fn from_u8(kind: u8) -> Self {
        match kind {
            1 => RefusalKind::NotShared,
            2 => RefusalKind::ChangesRefused,
            3 => RefusalKind::TooLarge,
            4 => RefusalKind::Malformed,
            5 => RefusalKind::Paused,
            6 => RefusalKind::Busy,
            other => RefusalKind::Other(other),
        }
    }

    /// A short fixed label (logs, metrics, JSON).
    pub fn label(self) -> &'static str {
        match self {
            RefusalKind::NotShared => "not_shared",
            RefusalKind::ChangesRefused => "changes_refused",
            RefusalKind::TooLarge => "too_large",
            RefusalKind::Malformed => "malformed",
            RefusalKind::Paused => "paused",
            RefusalKind::Busy => "busy",
            RefusalKind::Other(_) => "other",
        }
    }

    /// The kind for a [`Self::label`] (unknown labels become `Other(0)`).
    pub fn from_label(label: &str) -> Self {
        (1..=6).map(Self::from_u8).find(|kind| kind.label() == label).unwrap_or(RefusalKind::Other(0))
    }
}

/// One message of the node–relay protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Node → relay, first frame of a connection.
    Hello {
        /// Protocol version the node speaks ([`PROTOCOL_VERSION`]).
        protocol: u16,
        /// Free-form software name and version, for logs.
        software: String,
        /// The node's id (64 hex digits); must match the key that authenticated the connection.
        node: String,
        /// (Protocol ≥ 6.) SHA-256 of the signed enrollment directory the node
        /// holds ([`crate::directory::directory_digest`]), `None` if it holds
        /// none (all zero bytes on the wire); not sent in protocol 5.
        directory: Option<[u8; DIRECTORY_DIGEST_BYTES]>,
    },
    /// Relay → node, answer to `Hello`.
    Welcome {
        /// Protocol version of this connection: the node's, when the relay serves it.
        protocol: u16,
        /// The relay's name or id, for logs.
        relay: String,
        /// (Protocol ≥ 6.) The largest change and document the relay accepts;
        /// `None` not announced (zeros on the wire; always in protocol 5).
        limits: Option<crate::acceptance::ContentLimits>,
    },
    /// Compact summary of all documents one side shares with the other
    /// (see [`crate::sync::summary_digest`]).
    Summary {
        /// Number of documents covered.
        docs: u32,
        /// SHA-256 over the sorted (document id, sorted heads) pairs.
        digest: [u8; 32],
    },
    /// Per-document truncated heads digests, sent when the summaries differ
    /// (see [`crate::sync::heads_digest`]).
    DocHeads {
        /// One entry per document the sender shares with the receiver.
        entries: Vec<(DocId, [u8; HEADS_DIGEST_BYTES])>,
    },
    /// Reply to a `Summary` equal to our own: nothing to sync.
    InSync,
    /// One Automerge sync message for one document.
    Sync {
        /// The document the message is about.
        doc: DocId,
        /// The encoded `automerge::sync::Message`.
        message: Vec<u8>,
    },
    /// A clear error, sent before the sender closes the connection.
    Error {
        /// Machine-readable reason.
        code: ErrorCode,
        /// Human-readable detail.
        message: String,
    },
    /// Node → relay, instead of `Hello`: enroll the connection's key with a
    /// one-time join code; the relay answers `Directory` (or `Error`) and closes.
    Join {
        /// Protocol version the node speaks.
        protocol: u16,
        /// Software name and version, for logs.
        software: String,
        /// The secret part of the join code.
        secret: Vec<u8>,
        /// The organisation this node belongs to (its `OrgId`, e.g. `gnesta-kommun`):
        /// the relay refuses the join, changing nothing, unless the code was issued for it.
        org: String,
    },
    /// Relay → node: the enrollment directory, signed by the relay's key
    /// (see [`crate::directory::SignedDirectory`]).
    Directory {
        /// The signed directory's encoding.
        signed: Vec<u8>,
    },
    /// The authors' signatures proving the changes the next `Sync` frame of
    /// this document carries: per author, the signature of its latest change
    /// in the message (or of a later one), which covers the author's earlier
    /// changes (see [`crate::authorship`]); sent just before it.
    Authors {
        /// The document.
        doc: DocId,
        /// (change hash, the author's signature over it).
        entries: Vec<(automerge::ChangeHash, crate::authorship::ChangeSignature)>,
    },
    /// Relay → node: the relay's receipts of approval records of a document
    /// (when it first received each), sent before the `Sync` frames of that
    /// document and whenever new ones are issued.
    Receipts {
        /// The document.
        doc: DocId,
        /// The receipts.
        entries: Vec<ReceiptEntry>,
    },
    /// Either way: the sender refuses one document on this connection and
    /// will not sync it further on it (until the receiver sends a new `Sync`
    /// for it). Nothing of the refused message was kept. The connection and
    /// every other document go on.
    DocRefused {
        /// The document.
        doc: DocId,
        /// Why, machine-readable.
        kind: RefusalKind,
        /// Why, for people.
        reason: String,
        /// The sender's heads of the document (empty unless the receiver may
        /// see the document): what the sender holds, for recovery.
        heads: Vec<automerge::ChangeHash>,
        /// The highest sequence number of the receiver's own changes the
        /// sender holds (0: none, or unknown): every own change up to it was
        /// accepted, every later one was not.
        your_seq: u64,
    },
}

impl Frame {
    /// Short name of the frame type, for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Frame::Hello { .. } => "Hello",
            Frame::Welcome { .. } => "Welcome",
            Frame::Summary { .. } => "Summary",
            Frame::DocHeads { .. } => "DocHeads",
            Frame::InSync => "InSync",
            Frame::Sync { .. } => "Sync",
            Frame::Error { .. } => "Error",
            Frame::Join { .. } => "Join",
            Frame::Directory { .. } => "Directory",
            Frame::Authors { .. } => "Authors",
            Frame::Receipts { .. } => "Receipts",
            Frame::DocRefused { .. } => "DocRefused",
        }
    }

    fn type_byte(&self) -> u8 {
        match self {
            Frame::Hello { .. } => TYPE_HELLO,
            Frame::Welcome { .. } => TYPE_WELCOME,
            Frame::Summary { .. } => TYPE_SUMMARY,
            Frame::DocHeads { .. } => TYPE_DOC_HEADS,
            Frame::InSync => TYPE_IN_SYNC,
            Frame::Sync { .. } => TYPE_SYNC,
            Frame::Error { .. } => TYPE_ERROR,
            Frame::Join { .. } => TYPE_JOIN,
            Frame::Directory { .. } => TYPE_DIRECTORY,
            Frame::Authors { .. } => TYPE_AUTHORS,
            Frame::Receipts { .. } => TYPE_RECEIPTS,
            Frame::DocRefused { .. } => TYPE_DOC_REFUSED,
        }
    }

    /// Length of the payload (type byte and body), without the length prefix.
    pub fn payload_len(&self) -> usize {
        let str_len = |s: &str| varint_len(s.len()) + s.len();
        1 + match self {
            Frame::Hello { protocol, software, node, .. } => {
                2 + str_len(software) + str_len(node) + if *protocol >= 6 { DIRECTORY_DIGEST_BYTES } else { 0 }
            }
            Frame::Welcome { protocol, relay, .. } => 2 + str_len(relay) + if *protocol >= 6 { 16 } else { 0 },
            Frame::Summary { .. } => 4 + 32,
            Frame::DocHeads { entries } => varint_len(entries.len()) + entries.len() * (DOC_ID_BYTES + 8),
            Frame::InSync => 0,
            Frame::Sync { message, .. } => DOC_ID_BYTES + varint_len(message.len()) + message.len(),
            Frame::Error { message, .. } => 2 + str_len(message),
            Frame::Join { software, secret, org, .. } => {
                2 + str_len(software) + varint_len(secret.len()) + secret.len() + str_len(org)
            }
            Frame::Directory { signed } => varint_len(signed.len()) + signed.len(),
            Frame::Authors { entries, .. } => {
                DOC_ID_BYTES + varint_len(entries.len()) + entries.len() * AUTHOR_ENTRY_BYTES
            }
            Frame::Receipts { entries, .. } => {
                DOC_ID_BYTES + varint_len(entries.len()) + entries.len() * RECEIPT_ENTRY_BYTES
            }
            Frame::DocRefused { reason, heads, .. } => {
                DOC_ID_BYTES + 1 + str_len(reason) + varint_len(heads.len()) + heads.len() * 32 + 8
            }
        }
    }

    /// The frame as sent: length prefix, type byte, body.
    ///
    /// Does not check the size against the peer's limit; use [`Frame::try_encode`]
    /// for frames whose size depends on data (sync messages).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(LENGTH_PREFIX + self.payload_len());
        self.encode_into(&mut out);
        out
    }

    /// [`Frame::encode`] appended to `out` (several frames in one buffer).
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let payload_len = self.payload_len();
        let start = out.len();
        out.reserve(LENGTH_PREFIX + payload_len);
        // A payload over 4 GiB cannot be framed; saturating makes the peer refuse it
        // as too large instead of misreading the stream silently.
        out.extend_from_slice(&u32::try_from(payload_len).unwrap_or(u32::MAX).to_be_bytes());
        out.push(self.type_byte());
        match self {
            Frame::Hello { protocol, software, node, directory } => {
                out.extend_from_slice(&protocol.to_be_bytes());
                put_bytes(out, software.as_bytes());
                put_bytes(out, node.as_bytes());
                if *protocol >= 6 {
                    out.extend_from_slice(&directory.unwrap_or_default());
                }
            }
            Frame::Welcome { protocol, relay, limits } => {
                out.extend_from_slice(&protocol.to_be_bytes());
                put_bytes(out, relay.as_bytes());
                if *protocol >= 6 {
                    let (change, document) =
                        limits.map(|l| (l.max_change_bytes, l.max_document_bytes)).unwrap_or((0, 0));
                    out.extend_from_slice(&change.to_be_bytes());
                    out.extend_from_slice(&document.to_be_bytes());
                }
            }
            Frame::Summary { docs, digest } => {
                out.extend_from_slice(&docs.to_be_bytes());
                out.extend_from_slice(digest);
            }
            Frame::DocHeads { entries } => {
                put_varint(out, entries.len());
                for (doc, digest) in entries {
                    out.extend_from_slice(&doc_id_to_bytes(doc));
                    out.extend_from_slice(digest);
                }
            }
            Frame::InSync => {}
            Frame::Sync { doc, message } => {
                out.extend_from_slice(&doc_id_to_bytes(doc));
                put_bytes(out, message);
            }
            Frame::Error { code, message } => {
                out.extend_from_slice(&code.to_u16().to_be_bytes());
                put_bytes(out, message.as_bytes());
            }
            Frame::Join { protocol, software, secret, org } => {
                out.extend_from_slice(&protocol.to_be_bytes());
                put_bytes(out, software.as_bytes());
                put_bytes(out, secret);
                put_bytes(out, org.as_bytes());
            }
            Frame::Directory { signed } => put_bytes(out, signed),
            Frame::Authors { doc, entries } => {
                out.extend_from_slice(&doc_id_to_bytes(doc));
                put_varint(out, entries.len());
                for (hash, signature) in entries {
                    out.extend_from_slice(&hash.0);
                    out.extend_from_slice(signature);
                }
            }
            Frame::Receipts { doc, entries } => {
                out.extend_from_slice(&doc_id_to_bytes(doc));
                put_varint(out, entries.len());
                for entry in entries {
                    out.extend_from_slice(&entry.record);
                    out.extend_from_slice(&entry.received_at_ms.to_be_bytes());
                    out.extend_from_slice(&entry.relay_signature);
                }
            }
            Frame::DocRefused { doc, kind, reason, heads, your_seq } => {
                out.extend_from_slice(&doc_id_to_bytes(doc));
                out.push(kind.to_u8());
                put_bytes(out, reason.as_bytes());
                put_varint(out, heads.len());
                for head in heads {
                    out.extend_from_slice(&head.0);
                }
                out.extend_from_slice(&your_seq.to_be_bytes());
            }
        }
        debug_assert_eq!(out.len() - start, LENGTH_PREFIX + payload_len);
    }

    /// Like [`Frame::encode`], but refuses a frame the peer would refuse as larger than `max_frame`.
    pub fn try_encode(&self, max_frame: usize) -> Result<Vec<u8>, WireError> {
        let len = self.payload_len();
        if len > max_frame || u32::try_from(len).is_err() {
            return Err(WireError::FrameTooLarge { len: len as u64, max: max_frame });
        }
        Ok(self.encode())
    }

    /// Like [`Frame::encode_into`], but refuses (appending nothing) a frame the
    /// peer would refuse as larger than `max_frame`.
    pub fn try_encode_into(&self, max_frame: usize, out: &mut Vec<u8>) -> Result<(), WireError> {
        let len = self.payload_len();
        if len > max_frame || u32::try_from(len).is_err() {
            return Err(WireError::FrameTooLarge { len: len as u64, max: max_frame });
        }
        self.encode_into(out);
        Ok(())
    }

    /// Decodes one payload (type byte and body, without the length prefix).
    pub fn decode_payload(payload: &[u8]) -> Result<Frame, WireError> {
        let (&type_byte, body) = payload.split_first().ok_or(WireError::EmptyFrame)?;
        let frame_name = match type_byte {
            TYPE_HELLO => "Hello",
            TYPE_WELCOME => "Welcome",
            TYPE_SUMMARY => "Summary",
            TYPE_DOC_HEADS => "DocHeads",
            TYPE_IN_SYNC => "InSync",
            TYPE_SYNC => "Sync",
            TYPE_ERROR => "Error",
            TYPE_JOIN => "Join",
            TYPE_DIRECTORY => "Directory",
            TYPE_AUTHORS => "Authors",
            TYPE_RECEIPTS => "Receipts",
            TYPE_DOC_REFUSED => "DocRefused",
            other => return Err(WireError::UnknownFrameType(other)),
        };
        let mut r = Reader { bytes: body, frame: frame_name };
        let frame = match type_byte {
            TYPE_HELLO => {
                let (protocol, software, node) = (r.u16("protocol")?, r.string("software")?, r.string("node")?);
                let directory = if protocol >= 6 {
                    Some(r.array::<DIRECTORY_DIGEST_BYTES>("directory digest")?).filter(|d| d != &[0; 32])
                } else {
                    None
                };
                Frame::Hello { protocol, software, node, directory }
            }
            TYPE_WELCOME => {
                let (protocol, relay) = (r.u16("protocol")?, r.string("relay")?);
                let limits = if protocol >= 6 {
                    let (change, document) = (r.u64("max_change_bytes")?, r.u64("max_document_bytes")?);
                    (change != 0 || document != 0).then_some(crate::acceptance::ContentLimits {
                        max_change_bytes: change,
                        max_document_bytes: document,
                    })
                } else {
                    None
                };
                Frame::Welcome { protocol, relay, limits }
            }
            TYPE_SUMMARY => Frame::Summary { docs: r.u32("docs")?, digest: r.array("digest")? },
            TYPE_DOC_HEADS => {
                let count = r.varint("entry count")?;
                const ENTRY: usize = DOC_ID_BYTES + HEADS_DIGEST_BYTES;
                if count > r.remaining() / ENTRY {
                    return Err(WireError::BadLength { frame: frame_name, field: "entry count" });
                }
                let mut entries = Vec::with_capacity(count);
                for _ in 0..count {
                    let doc = r.doc_id("entry doc id")?;
                    let digest = r.array("entry digest")?;
                    entries.push((doc, digest));
                }
                Frame::DocHeads { entries }
            }
            TYPE_IN_SYNC => Frame::InSync,
            TYPE_SYNC => Frame::Sync { doc: r.doc_id("doc id")?, message: r.bytes("message")?.to_vec() },
            TYPE_JOIN => Frame::Join {
                protocol: r.u16("protocol")?,
                software: r.string("software")?,
                secret: r.bytes("secret")?.to_vec(),
                org: r.string("org")?,
            },
            TYPE_DIRECTORY => Frame::Directory { signed: r.bytes("signed")?.to_vec() },
            TYPE_AUTHORS => {
                let doc = r.doc_id("doc id")?;
                let count = r.varint("entry count")?;
                if count > r.remaining() / AUTHOR_ENTRY_BYTES {
                    return Err(WireError::BadLength { frame: frame_name, field: "entry count" });
                }
                let mut entries = Vec::with_capacity(count);
                for _ in 0..count {
                    let hash = automerge::ChangeHash(r.array("change hash")?);
                    entries.push((hash, r.array("signature")?));
                }
                Frame::Authors { doc, entries }
            }
            TYPE_RECEIPTS => {
                let doc = r.doc_id("doc id")?;
                let count = r.varint("entry count")?;
                if count > r.remaining() / RECEIPT_ENTRY_BYTES {
                    return Err(WireError::BadLength { frame: frame_name, field: "entry count" });
                }
                let mut entries = Vec::with_capacity(count);
                for _ in 0..count {
                    entries.push(ReceiptEntry {
                        record: r.array("record signature")?,
                        received_at_ms: i64::from_be_bytes(r.array("received at")?),
                        relay_signature: r.array("relay signature")?,
                    });
                }
                Frame::Receipts { doc, entries }
            }
            TYPE_DOC_REFUSED => {
                let doc = r.doc_id("doc id")?;
                let kind = RefusalKind::from_u8(r.array::<1>("kind")?[0]);
                let reason = r.string("reason")?;
                let count = r.varint("heads count")?;
                if count > r.remaining() / 32 {
                    return Err(WireError::BadLength { frame: frame_name, field: "heads count" });
                }
                let mut heads = Vec::with_capacity(count);
                for _ in 0..count {
                    heads.push(automerge::ChangeHash(r.array("head")?));
                }
                Frame::DocRefused { doc, kind, reason, heads, your_seq: u64::from_be_bytes(r.array("your seq")?) }
            }
            _ => Frame::Error { code: ErrorCode::from_u16(r.u16("code")?), message: r.string("message")? },
        };
        if !r.bytes.is_empty() {
            return Err(WireError::TrailingBytes { frame: frame_name, extra: r.bytes.len() });
        }
        Ok(frame)
    }
}

/// Incremental, sans-IO frame decoder: push bytes as they arrive, pull whole frames.
///
/// Call [`FrameDecoder::next_frame`] until it returns `Ok(None)` after every
/// [`FrameDecoder::push`]. A length prefix above the maximum is refused as soon
/// as its four bytes are seen: the frame's bytes are never buffered, the
/// decoder stops accepting input, and every later call returns the same error.
/// A frame with a bad body is consumed and reported; the next call goes on with
/// the following frame (the protocol still expects the caller to close).
///
/// [`FrameDecoder::limit_next_frame`] sets a smaller limit for the next frame
/// only (the relay reads a connection's first frame, before it knows who is
/// asking, with a few kilobytes). The buffer grows only as bytes arrive; it is
/// never sized from an announced length.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    /// Start of the first undecoded frame in `buf`.
    start: usize,
    /// Offset in `buf` of the next length prefix not yet checked against the maximum.
    scan: usize,
    max_frame: usize,
    /// A smaller limit for the frame at `start` only; cleared once that frame is returned.
    next_limit: Option<usize>,
    /// Set once a length prefix was refused; the stream is unusable from there.
    fatal: Option<WireError>,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameDecoder {
    /// A decoder refusing payloads above [`DEFAULT_MAX_FRAME`].
    pub fn new() -> Self {
        Self::with_max_frame(DEFAULT_MAX_FRAME)
    }

    /// A decoder refusing payloads above `max_frame` bytes.
    pub fn with_max_frame(max_frame: usize) -> Self {
        Self { buf: Vec::new(), start: 0, scan: 0, max_frame, next_limit: None, fatal: None }
    }

    /// Accepts the next frame only if its payload is at most `max` bytes (and
    /// at most the decoder's maximum); the frames after it are held to the
    /// decoder's maximum again. A larger announced length is refused as soon as
    /// its four bytes are seen, like one above the maximum: nothing of it is
    /// buffered and the decoder fails for good. If that length prefix is already
    /// buffered, it is checked at once.
    pub fn limit_next_frame(&mut self, max: usize) {
        self.next_limit = Some(max);
        if self.fatal.is_some() || self.scan <= self.start {
            return;
        }
        // The prefix at `start` was checked against the maximum only: check it again.
        let prefix = &self.buf[self.start..self.start + LENGTH_PREFIX];
        let len = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]);
        if len as usize > max.min(self.max_frame) {
            self.refuse(self.start, WireError::FrameTooLarge { len: u64::from(len), max: max.min(self.max_frame) });
        }
    }

    /// Bytes allocated for buffering now (capacity, not content): grows with
    /// the bytes that arrived, never with a length a peer announced.
    pub fn allocated(&self) -> usize {
        self.buf.capacity()
    }

    /// The largest payload this decoder accepts.
    pub fn max_frame(&self) -> usize {
        self.max_frame
    }

    /// Bytes received but not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Appends bytes read from the stream. Ignored once the stream has failed.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.fatal.is_some() {
            return;
        }
        if self.start > 0 && self.start >= self.buf.len() / 2 {
            self.buf.drain(..self.start);
            self.scan -= self.start;
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
        self.check_prefixes();
    }

    /// Checks every length prefix now fully buffered; on the first refused one,
    /// drops it and everything after it and remembers the error.
    fn check_prefixes(&mut self) {
        while let Some(prefix) = self.buf.get(self.scan..self.scan + LENGTH_PREFIX) {
            let len = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]);
            let max = match self.next_limit {
                Some(limit) if self.scan == self.start => limit.min(self.max_frame),
                _ => self.max_frame,
            };
            let error = if len == 0 {
                Some(WireError::EmptyFrame)
            } else if len as usize > max {
                Some(WireError::FrameTooLarge { len: u64::from(len), max })
            } else {
                None
            };
            if let Some(error) = error {
                self.refuse(self.scan, error);
                return;
            }
            self.scan += LENGTH_PREFIX + len as usize;
        }
    }

    /// Drops the refused frame at `at` and everything after it, and fails for good.
    fn refuse(&mut self, at: usize, error: WireError) {
        self.buf.truncate(at);
        self.buf.shrink_to_fit();
        self.scan = at;
        self.fatal = Some(error);
    }

    /// The next complete frame, `Ok(None)` if more bytes are needed, or the
    /// error of the next frame. Frames before a refused length prefix are
    /// still returned first.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, WireError> {
        self.next_received(usize::MAX)?.map(Received::into_frame).transpose()
    }

    /// Like [`Self::next_frame`], but a frame whose payload is larger than
    /// `decode_up_to` bytes is handed back undecoded ([`RawFrame`]), so that
    /// the caller can decode it where a long decode holds up nobody (the relay
    /// decodes large frames off its async workers). A frame that ends the
    /// buffered bytes is handed over without copying its payload.
    pub fn next_received(&mut self, decode_up_to: usize) -> Result<Option<Received>, WireError> {
        let available = &self.buf[self.start..];
        if let Some(prefix) = available.get(..LENGTH_PREFIX) {
            let len = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
            // Prefixes before `scan` were checked against the maximum, so `len` is sane here.
            if self.start < self.scan && available.len() >= LENGTH_PREFIX + len {
                let payload = self.start + LENGTH_PREFIX..self.start + LENGTH_PREFIX + len;
                self.next_limit = None;
                if len > decode_up_to && payload.end == self.buf.len() {
                    // Everything buffered is this frame: hand the buffer itself over.
                    let bytes = std::mem::take(&mut self.buf);
                    (self.start, self.scan) = (0, 0);
                    return Ok(Some(Received::Undecoded(RawFrame { bytes, payload })));
                }
                let received = if len > decode_up_to {
                    Ok(Received::Undecoded(RawFrame { bytes: self.buf[payload.clone()].to_vec(), payload: 0..len }))
                } else {
                    Frame::decode_payload(&self.buf[payload.clone()]).map(Received::Frame)
                };
                self.start = payload.end;
                if self.start == self.buf.len() {
                    self.buf.clear();
                    self.start = 0;
                    self.scan = 0;
                    // After a large frame, give its room back rather than hold it for the stream's life.
                    if self.buf.capacity() > RETAINED_BUFFER {
                        self.buf = Vec::new();
                    }
                }
                return received.map(Some);
            }
        }
        match &self.fatal {
            Some(error) => Err(error.clone()),
            None => Ok(None),
        }
    }
}

/// A complete frame taken from a [`FrameDecoder`], decoded or not.
#[derive(Debug)]
pub enum Received {
    /// Decoded at once (its payload was small).
    Frame(Frame),
    /// Complete, length checked, not decoded yet: see [`RawFrame::decode`].
    Undecoded(RawFrame),
}

impl Received {
    /// The frame, decoded now if it was not yet.
    pub fn into_frame(self) -> Result<Frame, WireError> {
        match self {
            Received::Frame(frame) => Ok(frame),
            Received::Undecoded(raw) => raw.decode(),
        }
    }
}

/// The payload of one complete frame, not decoded yet (see
/// [`FrameDecoder::next_received`]).
#[derive(Debug)]
pub struct RawFrame {
    bytes: Vec<u8>,
    payload: std::ops::Range<usize>,
}

impl RawFrame {
    /// Bytes of the payload.
    pub fn len(&self) -> usize {
        self.payload.len()
    }

    /// Whether the payload is empty (never, for a frame a decoder returned).
    pub fn is_empty(&self) -> bool {
        self.payload.is_empty()
    }

    /// Decodes the frame, as [`Frame::decode_payload`].
    pub fn decode(&self) -> Result<Frame, WireError> {
        Frame::decode_payload(&self.bytes[self.payload.clone()])
    }
}

/// Buffer room a [`FrameDecoder`] keeps once it holds no bytes; more is freed.
/// A relay holds one decoder per connection, most of them idle: what one keeps
/// after a large frame is kept a thousand times over.
const RETAINED_BUFFER: usize = 64 * 1024;

/// Bounds-checked reader over a frame body.
struct Reader<'a> {
    bytes: &'a [u8],
    frame: &'static str,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.bytes.len()
    }

    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], WireError> {
        if n > self.bytes.len() {
            return Err(WireError::Truncated { frame: self.frame, field });
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], WireError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, field)?);
        Ok(out)
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, WireError> {
        Ok(u16::from_be_bytes(self.array(field)?))
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, WireError> {
        Ok(u32::from_be_bytes(self.array(field)?))
    }

    fn u64(&mut self, field: &'static str) -> Result<u64, WireError> {
        Ok(u64::from_be_bytes(self.array(field)?))
    }

    /// Canonical unsigned LEB128, at most `u32::MAX`.
    fn varint(&mut self, field: &'static str) -> Result<usize, WireError> {
        let mut value: u64 = 0;
        for i in 0..5 {
            let byte = self.take(1, field)?[0];
            value |= u64::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                // Overlong: a final zero byte after the first adds nothing.
                if (i > 0 && byte == 0) || value > u64::from(u32::MAX) {
                    break;
                }
                return usize::try_from(value).map_err(|_| WireError::BadLength { frame: self.frame, field });
            }
        }
        Err(WireError::BadLength { frame: self.frame, field })
    }

    fn bytes(&mut self, field: &'static str) -> Result<&'a [u8], WireError> {
        let len = self.varint(field)?;
        self.take(len, field)
    }

    fn string(&mut self, field: &'static str) -> Result<String, WireError> {
        let bytes = self.bytes(field)?;
        let text = std::str::from_utf8(bytes).map_err(|_| WireError::BadUtf8 { frame: self.frame, field })?;
        Ok(text.to_owned())
    }

    fn doc_id(&mut self, field: &'static str) -> Result<DocId, WireError> {
        let raw: [u8; DOC_ID_BYTES] = self.array(field)?;
        Ok(DocId::from_bytes(raw))
    }
}

fn varint_len(value: usize) -> usize {
    let mut len = 1;
    let mut rest = value >> 7;
    while rest != 0 {
        len += 1;
        rest >>= 7;
    }
    len
}

fn put_varint(out: &mut Vec<u8>, value: usize) {
    let mut rest = value;
    loop {
        let byte = (rest & 0x7f) as u8;
        rest >>= 7;
        if rest == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    put_varint(out, bytes.len());
    out.extend_from_slice(bytes);
}

/// The 16 bytes behind a document id's 32 hex digits (as on the wire and in digests).
pub(crate) fn doc_id_to_bytes(doc: &DocId) -> [u8; DOC_ID_BYTES] {
    // `DocId` guarantees 32 lowercase hex digits, so every nibble is valid.
    fn nibble(c: u8) -> u8 {
        match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            _ => 0,
        }
    }
    let mut out = [0u8; DOC_ID_BYTES];
    for (byte, pair) in out.iter_mut().zip(doc.as_str().as_bytes().chunks_exact(2)) {
        *byte = (nibble(pair[0]) << 4) | nibble(pair[1]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, RngCore, SeedableRng};

    fn doc(n: u8) -> DocId {
        hex::encode([n; 16]).parse().unwrap()
    }

    fn every_frame() -> Vec<Frame> {
        vec![
            Frame::Hello {
                protocol: PROTOCOL_VERSION,
                software: "samverkan-node 0.1.0 — ök".into(),
                node: "ab".repeat(32),
                directory: Some([9; 32]),
            },
            Frame::Hello { protocol: PROTOCOL_VERSION, software: "n".into(), node: "ab".repeat(32), directory: None },
            Frame::Hello { protocol: 5, software: "older".into(), node: "ab".repeat(32), directory: None },
            Frame::Welcome {
                protocol: PROTOCOL_VERSION,
                relay: "relay.example".into(),
                limits: Some(crate::acceptance::ContentLimits {
                    max_change_bytes: 1 << 20,
                    max_document_bytes: 1 << 24,
                }),
            },
            Frame::Welcome { protocol: PROTOCOL_VERSION, relay: "r".into(), limits: None },
            Frame::Welcome { protocol: 5, relay: "older".into(), limits: None },
            Frame::Summary { docs: 3, digest: [7; 32] },
            Frame::DocHeads { entries: vec![] },
            Frame::DocHeads { entries: vec![(doc(1), [1; 8]), (doc(0xfe), [2; 8])] },
            Frame::InSync,
            Frame::Sync { doc: doc(0x42), message: vec![0x43, 0, 0, 0, 0] },
            Frame::Sync { doc: doc(9), message: vec![5; 300] },
            Frame::Error { code: ErrorCode::ProtocolVersion, message: "speak v1".into() },
            Frame::Error { code: ErrorCode::Other(999), message: String::new() },
            Frame::Join {
                protocol: PROTOCOL_VERSION,
                software: "n".into(),
                secret: vec![1; 16],
                org: "gnesta-kommun".into(),
            },
            Frame::Join { protocol: PROTOCOL_VERSION, software: String::new(), secret: vec![], org: String::new() },
            Frame::Directory { signed: b"{}".to_vec() },
            Frame::Authors { doc: doc(3), entries: vec![] },
            Frame::Authors { doc: doc(4), entries: vec![(automerge::ChangeHash([5; 32]), [6; 64])] },
            Frame::Receipts { doc: doc(5), entries: vec![] },
            Frame::Receipts {
                doc: doc(6),
                entries: vec![
                    ReceiptEntry { record: [7; 64], received_at_ms: 1_740_823_200_123, relay_signature: [8; 64] },
                    ReceiptEntry { record: [9; 64], received_at_ms: -1, relay_signature: [10; 64] },
                ],
            },
            Frame::DocRefused {
                doc: doc(7),
                kind: RefusalKind::NotShared,
                reason: "inte delad med er".into(),
                heads: vec![],
                your_seq: 0,
            },
            Frame::DocRefused {
                doc: doc(8),
                kind: RefusalKind::Other(200),
                reason: String::new(),
                heads: vec![automerge::ChangeHash([1; 32]), automerge::ChangeHash([2; 32])],
                your_seq: u64::MAX,
            },
        ]
    }

    #[test]
    fn every_frame_type_round_trips() {
        for frame in every_frame() {
            let bytes = frame.encode();
            assert_eq!(bytes.len(), LENGTH_PREFIX + frame.payload_len(), "{frame:?}");
            assert_eq!(Frame::decode_payload(&bytes[LENGTH_PREFIX..]).unwrap(), frame);
            let mut decoder = FrameDecoder::new();
            decoder.push(&bytes);
            assert_eq!(decoder.next_frame().unwrap(), Some(frame));
            assert_eq!(decoder.next_frame().unwrap(), None);
            assert_eq!(decoder.buffered(), 0);
        }
    }

    #[test]
    fn error_codes_round_trip_and_unknown_codes_are_kept() {
        for code in 0..=20u16 {
            assert_eq!(ErrorCode::from_u16(code).to_u16(), code);
        }
        assert_eq!(ErrorCode::from_u16(3), ErrorCode::TooLarge);
        assert_eq!(ErrorCode::from_u16(4000), ErrorCode::Other(4000));
    }

    #[test]
    fn frames_fed_byte_by_byte_come_out_whole_and_in_order() {
        let frames = every_frame();
        let stream: Vec<u8> = frames.iter().flat_map(Frame::encode).collect();
        let mut decoder = FrameDecoder::new();
        let mut out = Vec::new();
        for byte in &stream {
            decoder.push(std::slice::from_ref(byte));
            while let Some(frame) = decoder.next_frame().unwrap() {
                out.push(frame);
            }
        }
        assert_eq!(out, frames);
        assert_eq!(decoder.buffered(), 0);
    }

    #[test]
    fn frames_above_the_decode_bound_come_out_undecoded_whole_and_in_order_in_random_chunks() {
        let frames = every_frame();
        let stream: Vec<u8> = frames.iter().flat_map(Frame::encode).collect();
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        for decode_up_to in [0, 8, 40, usize::MAX] {
            let mut decoder = FrameDecoder::new();
            let (mut out, mut undecoded) = (Vec::new(), 0);
            let mut at = 0;
            while at < stream.len() {
                // Sometimes a frame ends the buffer (handed over whole), sometimes more follows (copied).
                let n = rng.gen_range(1..=200).min(stream.len() - at);
                decoder.push(&stream[at..at + n]);
                at += n;
                while let Some(received) = decoder.next_received(decode_up_to).unwrap() {
                    if let Received::Undecoded(raw) = &received {
                        assert!(raw.len() > decode_up_to);
                        undecoded += 1;
                    }
                    out.push(received.into_frame().unwrap());
                }
            }
            assert_eq!(out, frames, "decode bound {decode_up_to}");
            assert_eq!(decoder.buffered(), 0);
            let expected = frames.iter().filter(|f| f.encode().len() - LENGTH_PREFIX > decode_up_to).count();
            assert_eq!(undecoded, expected, "decode bound {decode_up_to}");
        }
    }

    #[test]
    fn a_large_frame_ending_the_buffer_is_handed_over_without_a_copy_and_the_decoder_goes_on() {
        let doc: DocId = "00112233445566778899aabbccddeeff".parse().unwrap();
        let big = Frame::Sync { doc: doc.clone(), message: vec![3; 200_000] };
        let mut decoder = FrameDecoder::new();
        decoder.push(&big.encode());
        let Some(Received::Undecoded(raw)) = decoder.next_received(1024).unwrap() else {
            panic!("the large frame comes back undecoded")
        };
        assert_eq!(decoder.allocated(), 0, "the buffer went with the frame");
        assert_eq!(raw.decode().unwrap(), big);
        // A malformed large payload is an error of its own decode, not of the stream.
        let mut bad = Frame::Sync { doc, message: vec![1; 5000] }.encode();
        bad.truncate(bad.len() - 10);
        let len = (bad.len() - LENGTH_PREFIX) as u32;
        bad[..LENGTH_PREFIX].copy_from_slice(&len.to_be_bytes());
        decoder.push(&bad);
        decoder.push(&Frame::InSync.encode());
        let Some(Received::Undecoded(raw)) = decoder.next_received(1024).unwrap() else {
            panic!("the large frame comes back undecoded")
        };
        assert!(raw.decode().is_err());
        assert_eq!(decoder.next_frame().unwrap(), Some(Frame::InSync));
        assert_eq!(decoder.next_frame().unwrap(), None);
    }

    #[test]
    fn frames_fed_in_random_chunks_come_out_whole_and_in_order() {
        let frames = every_frame();
        let stream: Vec<u8> = frames.iter().flat_map(Frame::encode).collect();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..50 {
            let mut decoder = FrameDecoder::new();
            let mut out = Vec::new();
            let mut at = 0;
            while at < stream.len() {
                let n = rng.gen_range(1..=64).min(stream.len() - at);
                decoder.push(&stream[at..at + n]);
                at += n;
                while let Some(frame) = decoder.next_frame().unwrap() {
                    out.push(frame);
                }
            }
            assert_eq!(out, frames);
        }
    }

    #[test]
    fn protocol_5_hello_and_welcome_keep_their_layout_and_6_adds_its_fields() {
        // A protocol 5 node's Hello, byte for byte as that version wrote it: still read.
        let mut old = vec![0, 0, 0, 0, TYPE_HELLO, 0, 5, 1, b's', 2, b'a', b'b'];
        old[3] = (old.len() - 4) as u8;
        let hello = Frame::Hello { protocol: 5, software: "s".into(), node: "ab".into(), directory: None };
        assert_eq!(hello.encode(), old);
        assert_eq!(Frame::decode_payload(&old[4..]).unwrap(), hello);
        // A digest where a protocol 5 node sends none is trailing garbage to it.
        let mut longer = old.clone();
        longer.extend_from_slice(&[1; 32]);
        longer[3] += 32;
        assert!(Frame::decode_payload(&longer[4..]).is_err());
        // Protocol 6: the digest is there, and cut short it is refused.
        let six = Frame::Hello { protocol: 6, software: "s".into(), node: "ab".into(), directory: Some([1; 32]) };
        let bytes = six.encode();
        assert_eq!(bytes.len(), old.len() + 32);
        assert!(Frame::decode_payload(&bytes[4..bytes.len() - 1]).is_err());
        let welcome = Frame::Welcome { protocol: 5, relay: "r".into(), limits: None };
        assert_eq!(welcome.encode(), vec![0, 0, 0, 5, TYPE_WELCOME, 0, 5, 1, b'r']);
        assert!(protocol_served(5) && protocol_served(PROTOCOL_VERSION) && !protocol_served(4));
    }

    #[test]
    fn oversized_length_is_refused_without_buffering_the_frame() {
        let mut decoder = FrameDecoder::with_max_frame(1024);
        let ok = Frame::InSync.encode();
        let mut bytes = ok.clone();
        bytes.extend_from_slice(&1025u32.to_be_bytes());
        decoder.push(&bytes);
        // More of the oversized frame arrives: it is dropped, not buffered.
        decoder.push(&[0u8; 4096]);
        assert_eq!(decoder.buffered(), ok.len(), "only the valid frame before it stays buffered");
        assert_eq!(decoder.next_frame().unwrap(), Some(Frame::InSync));
        let error = decoder.next_frame().unwrap_err();
        assert_eq!(error, WireError::FrameTooLarge { len: 1025, max: 1024 });
        assert!(error.is_fatal());
        assert_eq!(error.error_code(), ErrorCode::TooLarge);
        assert_eq!(decoder.buffered(), 0);
        // The decoder stays failed.
        decoder.push(&ok);
        assert_eq!(decoder.next_frame().unwrap_err(), error);

        // The default maximum refuses a 4 GiB announcement after the four prefix bytes.
        let mut decoder = FrameDecoder::new();
        decoder.push(&u32::MAX.to_be_bytes());
        assert!(matches!(decoder.next_frame(), Err(WireError::FrameTooLarge { .. })));
    }

    #[test]
    fn a_limit_on_the_next_frame_applies_to_that_frame_only() {
        let hello =
            Frame::Hello { protocol: PROTOCOL_VERSION, software: "n".into(), node: "ab".repeat(32), directory: None };
        let big = Frame::Sync { doc: doc(1), message: vec![7; 10_000] };

        // Within the limit: the frame passes, and the frames after it may be larger.
        let mut decoder = FrameDecoder::with_max_frame(1 << 20);
        decoder.limit_next_frame(4096);
        let mut bytes = hello.encode();
        bytes.extend(big.encode());
        decoder.push(&bytes);
        assert_eq!(decoder.next_frame().unwrap(), Some(hello.clone()));
        assert_eq!(decoder.next_frame().unwrap(), Some(big.clone()));

        // Above the limit: refused after the four prefix bytes, nothing of it buffered.
        let mut decoder = FrameDecoder::with_max_frame(64 << 20);
        decoder.limit_next_frame(4096);
        decoder.push(&(64u32 << 20).to_be_bytes());
        decoder.push(&[0; 8192]);
        assert_eq!(decoder.buffered(), 0);
        assert!(decoder.allocated() <= 8192, "allocated {}", decoder.allocated());
        assert_eq!(decoder.next_frame().unwrap_err(), WireError::FrameTooLarge { len: 64 << 20, max: 4096 });
        assert_eq!(decoder.next_frame().unwrap_err().error_code(), ErrorCode::TooLarge);

        // The limit set after the prefix was already buffered is checked at once.
        let mut decoder = FrameDecoder::with_max_frame(1 << 20);
        decoder.push(&big.encode()[..100]);
        decoder.limit_next_frame(4096);
        assert_eq!(decoder.buffered(), 0);
        assert!(matches!(decoder.next_frame(), Err(WireError::FrameTooLarge { max: 4096, .. })));

        // A limit above the decoder's maximum does not raise it.
        let mut decoder = FrameDecoder::with_max_frame(1000);
        decoder.limit_next_frame(1 << 20);
        decoder.push(&big.encode());
        assert!(matches!(decoder.next_frame(), Err(WireError::FrameTooLarge { max: 1000, .. })));
    }

    #[test]
    fn the_buffer_grows_with_arriving_bytes_not_with_the_announced_length() {
        let mut decoder = FrameDecoder::with_max_frame(DEFAULT_MAX_FRAME);
        let mut bytes = (60u32 << 20).to_be_bytes().to_vec();
        bytes.extend_from_slice(&[TYPE_SYNC; 100]);
        decoder.push(&bytes);
        assert_eq!(decoder.next_frame().unwrap(), None);
        assert_eq!(decoder.buffered(), 104);
        assert!(decoder.allocated() < 64 * 1024, "allocated {} for 104 bytes", decoder.allocated());

        // Once a large frame has been returned, its room is given back.
        let big = Frame::Sync { doc: doc(1), message: vec![7; 4 << 20] }.encode();
        let mut decoder = FrameDecoder::new();
        for chunk in big.chunks(64 * 1024) {
            decoder.push(chunk);
        }
        assert!(decoder.allocated() >= 4 << 20);
        assert!(matches!(decoder.next_frame(), Ok(Some(Frame::Sync { .. }))));
        assert!(decoder.allocated() <= RETAINED_BUFFER, "still holds {} bytes", decoder.allocated());
    }

    #[test]
    fn a_join_without_the_organisation_is_refused() {
        // The protocol 1 layout: protocol, software, secret.
        let mut payload = vec![TYPE_JOIN, 0, 1, 1, b'n', 16];
        payload.extend_from_slice(&[1; 16]);
        assert_eq!(Frame::decode_payload(&payload), Err(WireError::Truncated { frame: "Join", field: "org" }));
    }

    #[test]
    fn sender_refuses_frames_the_peer_would_refuse() {
        let frame = Frame::Sync { doc: doc(1), message: vec![0; 2000] };
        assert!(matches!(frame.try_encode(1000), Err(WireError::FrameTooLarge { .. })));
        assert_eq!(frame.try_encode(DEFAULT_MAX_FRAME).unwrap(), frame.encode());
    }

    #[test]
    fn zero_length_frame_is_refused() {
        let mut decoder = FrameDecoder::new();
        decoder.push(&[0, 0, 0, 0]);
        assert_eq!(decoder.next_frame().unwrap_err(), WireError::EmptyFrame);
    }

    #[test]
    fn truncated_and_garbage_bodies_are_errors() {
        for frame in every_frame() {
            let bytes = frame.encode();
            let payload = &bytes[LENGTH_PREFIX..];
            // Every strict prefix of a body with fields is an error (InSync has none).
            for cut in 1..payload.len() {
                assert!(Frame::decode_payload(&payload[..cut]).is_err(), "{frame:?} cut at {cut}");
            }
            let mut extended = payload.to_vec();
            extended.push(0);
            assert!(matches!(Frame::decode_payload(&extended), Err(WireError::TrailingBytes { .. })));
        }
        assert_eq!(Frame::decode_payload(&[0x99]), Err(WireError::UnknownFrameType(0x99)));
        assert_eq!(Frame::decode_payload(&[]), Err(WireError::EmptyFrame));
        // Overlong varint (0x80 0x00 for zero) and a count larger than the body.
        assert!(matches!(Frame::decode_payload(&[TYPE_DOC_HEADS, 0x80, 0x00]), Err(WireError::BadLength { .. })));
        assert!(matches!(
            Frame::decode_payload(&[TYPE_DOC_HEADS, 0xff, 0xff, 0xff, 0xff, 0x0f]),
            Err(WireError::BadLength { .. })
        ));
        // A Receipts count larger than the entries that follow (one entry present, two announced).
        let mut receipts = vec![TYPE_RECEIPTS];
        receipts.extend_from_slice(&[0; DOC_ID_BYTES]);
        receipts.push(2);
        receipts.extend_from_slice(&[0; RECEIPT_ENTRY_BYTES]);
        assert!(matches!(Frame::decode_payload(&receipts), Err(WireError::BadLength { .. })));
        // Varint above u32::MAX.
        assert!(matches!(
            Frame::decode_payload(&[
                TYPE_SYNC, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0x1f
            ]),
            Err(WireError::BadLength { .. })
        ));
        // Invalid UTF-8 in a string.
        assert!(matches!(Frame::decode_payload(&[TYPE_ERROR, 0, 2, 2, 0xc3, 0x28]), Err(WireError::BadUtf8 { .. })));
        // A bad body is consumed; the frame after it still decodes.
        let mut decoder = FrameDecoder::new();
        decoder.push(&[0, 0, 0, 2, TYPE_SUMMARY, 1]);
        decoder.push(&Frame::InSync.encode());
        assert!(matches!(decoder.next_frame(), Err(WireError::Truncated { .. })));
        assert_eq!(decoder.next_frame().unwrap(), Some(Frame::InSync));
    }

    #[test]
    fn decoding_random_bytes_never_panics() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x5a3e_4c4a);
        let valid: Vec<Vec<u8>> = every_frame().iter().map(Frame::encode).collect();
        for round in 0..20_000 {
            let mut bytes = if round % 2 == 0 {
                let mut b = vec![0u8; rng.gen_range(0..64)];
                rng.fill_bytes(&mut b);
                b
            } else {
                // Mutate a valid frame: flips, truncation, random type byte.
                let mut b = valid[rng.gen_range(0..valid.len())].clone();
                for _ in 0..rng.gen_range(1..4) {
                    let at = rng.gen_range(0..b.len());
                    b[at] ^= 1 << rng.gen_range(0..8);
                }
                b.truncate(rng.gen_range(0..=b.len()));
                b
            };
            // Keep some announced lengths small so bodies actually get decoded.
            if round % 3 == 0 && bytes.len() >= 4 {
                let len = (bytes.len() - 4) as u32;
                bytes[..4].copy_from_slice(&len.to_be_bytes());
            }
            let _ = Frame::decode_payload(bytes.get(4..).unwrap_or(&[]));
            let mut decoder = FrameDecoder::with_max_frame(1 << 16);
            let mut at = 0;
            while at < bytes.len() {
                let n = rng.gen_range(1..=8).min(bytes.len() - at);
                decoder.push(&bytes[at..at + n]);
                at += n;
                for _ in 0..8 {
                    match decoder.next_frame() {
                        Ok(Some(_)) | Err(_) => continue,
                        Ok(None) => break,
                    }
                }
            }
        }
    }
}
