//! Sanity checks on a peer's sync message before Automerge sees it.
//!
//! Automerge trusts sizes and parameters carried inside a sync message: a
//! bloom filter with zero bits divides by zero, one with four billion probes
//! allocates 16 GiB on the next `generate`, and a few kilobytes of DEFLATE can
//! inflate to gigabytes. An allocation failure aborts the process, which no
//! `catch_unwind` can stop, so this module refuses such messages first.
//!
//! It reads what `automerge` 0.12 reads, mirroring its chunk and column
//! layout (checked against `src/sync.rs`, `src/sync/bloom.rs`,
//! `src/storage/chunk.rs` and `src/storage/document.rs` of that version), and
//! never accepts less than Automerge would: anything Automerge can load from
//! an honest peer passes. It does no I/O and keeps no state; inflated bytes
//! are counted and hashed as they stream, never kept.
//!
//! What it checks:
//! - hash lists (`heads`, `need`, each `have.last_sync`): at most
//!   [`SyncLimits::max_hashes`] entries, strictly ascending (Automerge always
//!   sends them so, and unsorted heads would break its shared-heads bookkeeping);
//! - at most [`SyncLimits::max_haves`] bloom filters, each with 1..=max probes
//!   and 1..=max bits per entry;
//! - the changes: whole chunks only, of the three kinds sync produces
//!   (document, change, compressed change), each with a valid checksum, and all
//!   DEFLATE data (compressed changes, compressed document columns) inflating
//!   to at most [`SyncLimits::max_inflated_bytes`] in total;
//! - the operations the changes carry: at most [`SyncLimits::max_change_ops`]
//!   in one change and [`SyncLimits::max_ops`] in all. Their columns are
//!   run-length encoded, so a change of 120 bytes can carry millions of
//!   operations (four million took Automerge 11 s and 1.8 GB to apply): each
//!   column's run lengths are added up, and the group counts that say how
//!   many rows other columns hold, without decoding a value into memory. A
//!   saved document's operations (a document chunk: how a whole history
//!   travels) count against the message's limit only.
//!
//! What it cannot check: the values inside the columns. Automerge still
//! decodes those itself, under `catch_unwind` in the session.

use std::io::{self, BufRead, Read};

use automerge::sync::{Have, Message};
use automerge::ChangeHash;
use sha2::{Digest, Sha256};

use crate::acceptance::{ContentLimits, DEFAULT_MAX_CHANGE_BYTES, DEFAULT_MAX_DOCUMENT_BYTES};
use crate::wire::DEFAULT_MAX_FRAME;

/// Limits on what a peer may send and what we generate, per sync message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncLimits {
    /// Largest frame payload; a generated message that does not fit is an error
    /// rather than a frame the peer would refuse.
    pub max_frame: usize,
    /// Largest number of hashes in one list (`heads`, `need`, a `have`'s `last_sync`).
    pub max_hashes: usize,
    /// Largest number of bloom filters (`have` entries); Automerge sends at most one.
    pub max_haves: usize,
    /// Largest number of probes per bloom filter; Automerge uses 7.
    pub max_bloom_probes: u32,
    /// Largest number of bits per bloom filter entry; Automerge uses 10.
    pub max_bloom_bits_per_entry: u32,
    /// Largest total size that the compressed data in one message may inflate to.
    pub max_inflated_bytes: u64,
    /// Largest single change chunk (inflated), as [`ContentLimits::max_change_bytes`];
    /// a larger change is refused before Automerge parses it.
    pub max_change_bytes: u64,
    /// Most operations in one change (the rows of its longest column).
    pub max_change_ops: u64,
    /// Most operations in one message (or one bundle document), all changes
    /// together: a document's whole history travels in one message when a
    /// node syncs it from nothing, so this is also the most a document can
    /// have and still reach a new node.
    pub max_ops: u64,
}

/// Default [`SyncLimits::max_change_ops`]: a paste of half a million
/// characters (a few hundred pages) in one edit. Applying a change costs
/// Automerge 0.12 up to about 2.8 µs and 450 bytes at its peak per operation
/// (measured: a million inserts of `true`, 106 bytes, 2.5 s and 460 MB).
pub const DEFAULT_MAX_CHANGE_OPS: u64 = 500_000;

/// Default [`SyncLimits::max_ops`]: two million operations in one message, all
/// changes together (a plan of 50,000 characters rewritten forty times over).
/// Loading them as a saved document costs about 0.55 µs and 90 bytes at the
/// peak per operation (four million: 2.2 s, 355 MB).
pub const DEFAULT_MAX_OPS: u64 = 2_000_000;

impl SyncLimits {
    /// The default limits, with the change and inflation bounds of `content`.
    pub fn for_content(content: &ContentLimits) -> Self {
        Self {
            max_inflated_bytes: content.max_document_bytes,
            max_change_bytes: content.max_change_bytes,
            ..Self::default()
        }
    }
}

impl Default for SyncLimits {
    fn default() -> Self {
        Self {
            max_frame: DEFAULT_MAX_FRAME,
            max_hashes: 65_536,
            max_haves: 8,
            max_bloom_probes: 64,
            max_bloom_bits_per_entry: 64,
            max_inflated_bytes: DEFAULT_MAX_DOCUMENT_BYTES,
            max_change_bytes: DEFAULT_MAX_CHANGE_BYTES,
            max_change_ops: DEFAULT_MAX_CHANGE_OPS,
            max_ops: DEFAULT_MAX_OPS,
        }
    }
}

/// Why a sync message was refused before reaching Automerge.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageCheckError {
    /// A hash list is longer than allowed.
    #[error("{count} hashes in {field}, at most {max} allowed")]
    TooManyHashes {
        /// Which list.
        field: &'static str,
        /// How many hashes it holds.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// A hash list is not strictly ascending.
    #[error("hashes in {field} are not sorted and unique")]
    Unsorted {
        /// Which list.
        field: &'static str,
    },
    /// More bloom filters than allowed.
    #[error("{count} bloom filters, at most {max} allowed")]
    TooManyHaves {
        /// How many the message holds.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// A bloom filter's parameters are out of range or inconsistent.
    #[error("bloom filter parameters out of range: {reason}")]
    BloomFilter {
        /// What is wrong.
        reason: &'static str,
    },
    /// A chunk in the changes is malformed.
    #[error("malformed change chunk: {reason}")]
    BadChunk {
        /// What is wrong.
        reason: &'static str,
    },
    /// A chunk type that sync messages never carry.
    #[error("chunk type {0} is not accepted in sync messages")]
    UnsupportedChunk(u8),
    /// A chunk's checksum does not match its contents.
    #[error("change chunk checksum mismatch")]
    ChecksumMismatch,
    /// Compressed data is not valid DEFLATE.
    #[error("compressed data does not inflate")]
    BadDeflate,
    /// Compressed data inflates to more than allowed.
    #[error("compressed data inflates to more than {max} bytes, the limit per document")]
    InflatedTooLarge {
        /// The limit.
        max: u64,
    },
    /// One change is larger than allowed.
    #[error("a change of {size} bytes exceeds the limit of {max} bytes per change")]
    ChangeTooLarge {
        /// Its size (inflated).
        size: u64,
        /// The limit.
        max: u64,
    },
    /// Bytes that hold no Automerge data at all.
    #[error("no Automerge data")]
    Empty,
    /// One change carries more operations than allowed.
    #[error("a change carries more than {max} operations, the limit per change")]
    ChangeTooManyOps {
        /// The limit.
        max: u64,
    },
    /// The changes together carry more operations than allowed.
    #[error("the changes carry more than {max} operations, the limit per message")]
    TooManyOps {
        /// The limit.
        max: u64,
    },
    /// A change's columns do not have the layout Automerge writes.
    #[error("malformed change columns: {reason}")]
    BadColumns {
        /// What is wrong.
        reason: &'static str,
    },
}

/// Checks a decoded sync message against `limits` (see the module docs).
pub fn check_message(message: &Message, limits: &SyncLimits) -> Result<(), MessageCheckError> {
    check_message_counting(message, limits).map(drop)
}

/// The operations a sync message carries, as [`operations_in`] counts them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Operations {
    /// In change chunks (Automerge 0.12 applies these at up to about 2.8 µs each).
    pub in_changes: u64,
    /// In saved-document chunks, a whole history at once (about 0.55 µs each to load).
    pub in_documents: u64,
}

/// The operations a sync message's changes carry, counted as [`check_message`]
/// counts them (`None` if the message does not decode or fails a check: it
/// will be refused). A relay charges them to the sender's receive budget
/// before the message reaches Automerge, whose cost is per operation.
pub fn operations_in(message: &[u8], limits: &SyncLimits) -> Option<Operations> {
    let decoded = Message::decode(message).ok()?;
    check_message_counting(&decoded, limits).ok()
}

fn check_message_counting(message: &Message, limits: &SyncLimits) -> Result<Operations, MessageCheckError> {
    check_hashes("heads", &message.heads, limits)?;
    check_hashes("need", &message.need, limits)?;
    if message.have.len() > limits.max_haves {
        return Err(MessageCheckError::TooManyHaves { count: message.have.len(), max: limits.max_haves });
    }
    for have in &message.have {
        check_have(have, limits)?;
    }
    let mut budget = Budget::new(limits);
    for entry in message.changes.iter() {
        check_chunks_within(entry, &mut budget, limits)?;
    }
    Ok(budget.counted)
}

/// Checks Automerge bytes from a file (a bundle's document data: a saved
/// document or concatenated changes) exactly as the changes of a sync message
/// are checked, before `load_incremental` sees them. Empty input is refused.
pub fn check_chunks(data: &[u8], limits: &SyncLimits) -> Result<(), MessageCheckError> {
    if data.is_empty() {
        return Err(MessageCheckError::Empty);
    }
    let mut budget = Budget::new(limits);
    check_chunks_within(data, &mut budget, limits)
}

/// What the rest of a message may still inflate to and carry.
struct Budget {
    /// Bytes compressed data may still inflate to.
    inflated: u64,
    /// Operations the changes may still carry.
    ops: u64,
    /// The operations counted so far.
    counted: Operations,
}

impl Budget {
    fn new(limits: &SyncLimits) -> Self {
        Self { inflated: limits.max_inflated_bytes, ops: limits.max_ops, counted: Operations::default() }
    }

    /// Takes one change's operations, or a saved document's (`document`).
    fn take_ops(&mut self, ops: u64, document: bool, limits: &SyncLimits) -> Result<(), MessageCheckError> {
        self.ops = self.ops.checked_sub(ops).ok_or(MessageCheckError::TooManyOps { max: limits.max_ops })?;
        match document {
            true => self.counted.in_documents += ops,
            false => self.counted.in_changes += ops,
        }
        Ok(())
    }
}

fn check_chunks_within(data: &[u8], budget: &mut Budget, limits: &SyncLimits) -> Result<(), MessageCheckError> {
    let mut rest = data;
    while !rest.is_empty() {
        rest = check_chunk(rest, budget, limits)?;
    }
    Ok(())
}

fn check_hashes(field: &'static str, hashes: &[ChangeHash], limits: &SyncLimits) -> Result<(), MessageCheckError> {
    if hashes.len() > limits.max_hashes {
        return Err(MessageCheckError::TooManyHashes { field, count: hashes.len(), max: limits.max_hashes });
    }
    if !hashes.windows(2).all(|pair| pair[0] < pair[1]) {
        return Err(MessageCheckError::Unsorted { field });
    }
    Ok(())
}

fn check_have(have: &Have, limits: &SyncLimits) -> Result<(), MessageCheckError> {
    check_hashes("have.last_sync", &have.last_sync, limits)?;
    // The filter's fields are private; its encoding is
    // `entries:leb128, bits_per_entry:leb128, probes:leb128, bits`, or nothing when empty.
    let encoded = have.bloom.to_bytes();
    if encoded.is_empty() {
        return Ok(()); // no entries: Automerge never probes it
    }
    let bloom = |reason| MessageCheckError::BloomFilter { reason };
    let mut r = Bytes(&encoded);
    let _entries = r.leb128_u64().map_err(|_| bloom("entries"))?;
    let bits_per_entry = r.leb128_u64().map_err(|_| bloom("bits per entry"))?;
    let probes = r.leb128_u64().map_err(|_| bloom("probes"))?;
    if probes == 0 || probes > u64::from(limits.max_bloom_probes) {
        return Err(bloom("number of probes"));
    }
    if bits_per_entry == 0 || bits_per_entry > u64::from(limits.max_bloom_bits_per_entry) {
        return Err(bloom("bits per entry"));
    }
    // Automerge computes probe positions modulo `8 * bits.len()` in u32 and adds two
    // of them: an empty filter divides by zero, a huge one overflows.
    if r.0.is_empty() || r.0.len() > (1 << 28) {
        return Err(bloom("filter size"));
    }
    Ok(())
}

/// Automerge's chunk magic bytes.
const MAGIC: [u8; 4] = [0x85, 0x6f, 0x4a, 0x83];
const CHUNK_DOCUMENT: u8 = 0;
const CHUNK_CHANGE: u8 = 1;
const CHUNK_COMPRESSED: u8 = 2;
/// Column spec bit marking a DEFLATE-compressed column.
const COLUMN_DEFLATE: u32 = 0b1000;

/// Checks one chunk at the start of `input`; returns the bytes after it.
fn check_chunk<'a>(input: &'a [u8], budget: &mut Budget, limits: &SyncLimits) -> Result<&'a [u8], MessageCheckError> {
    let max = limits.max_inflated_bytes;
    let bad = |reason| MessageCheckError::BadChunk { reason };
    let too_large = |size: u64| MessageCheckError::ChangeTooLarge { size, max: limits.max_change_bytes };
    let mut r = Bytes(input);
    if r.take(4).map_err(|_| bad("header"))? != MAGIC {
        return Err(bad("magic bytes"));
    }
    let checksum = r.take(4).map_err(|_| bad("header"))?;
    let chunk_type = r.take(1).map_err(|_| bad("header"))?[0];
    let len = r.leb128_u64().map_err(|_| bad("length"))?;
    let data = r.take_u64(len).map_err(|_| bad("length"))?;
    match chunk_type {
        CHUNK_DOCUMENT => {
            verify_checksum(checksum, CHUNK_DOCUMENT, data.len() as u64, |h| h.update(data))?;
            check_document_columns(data, budget, limits)?;
        }
        CHUNK_CHANGE => {
            let size = (input.len() - r.0.len()) as u64;
            if size > limits.max_change_bytes {
                return Err(too_large(size));
            }
            verify_checksum(checksum, CHUNK_CHANGE, data.len() as u64, |h| h.update(data))?;
            budget.take_ops(change_ops(data, limits)?, false, limits)?;
        }
        CHUNK_COMPRESSED => {
            // The checksum covers the inflated change: count first, then hash while inflating again.
            // At most one byte past the change limit is inflated before refusing.
            let change_cap = limits.max_change_bytes;
            let mut change_budget = budget.inflated.min(change_cap);
            let inflated = inflate_counted(data, &mut change_budget, max).map_err(|e| match e {
                MessageCheckError::InflatedTooLarge { .. } if change_cap < budget.inflated => too_large(change_cap + 1),
                other => other,
            })?;
            budget.inflated -= inflated;
            // Within the change limit (a few MiB): held once, to be hashed and have its operations counted.
            let mut change = Vec::with_capacity(usize::try_from(inflated).unwrap_or(0));
            flate2::bufread::DeflateDecoder::new(data)
                .take(inflated)
                .read_to_end(&mut change)
                .map_err(|_| MessageCheckError::BadDeflate)?;
            verify_checksum(checksum, CHUNK_CHANGE, inflated, |hasher| hasher.update(&change))?;
            budget.take_ops(change_ops(&change, limits)?, false, limits)?;
        }
        other => return Err(MessageCheckError::UnsupportedChunk(other)),
    }
    Ok(r.0)
}

/// Compares a chunk checksum with the first four bytes of
/// `SHA-256(type ‖ leb128(len) ‖ data)`, where `feed` supplies the data.
fn verify_checksum(
    checksum: &[u8],
    chunk_type: u8,
    len: u64,
    feed: impl FnOnce(&mut Sha256),
) -> Result<(), MessageCheckError> {
    let mut hasher = Sha256::new();
    hasher.update([chunk_type]);
    let mut prefix = Vec::with_capacity(10);
    put_leb128(&mut prefix, len);
    hasher.update(&prefix);
    feed(&mut hasher);
    let hash = hasher.finalize();
    if hash[..4] == *checksum {
        Ok(())
    } else {
        Err(MessageCheckError::ChecksumMismatch)
    }
}

/// Walks a document chunk's metadata, inflates (counting only) its compressed
/// columns and counts its operations (the rows of its op columns).
fn check_document_columns(data: &[u8], budget: &mut Budget, limits: &SyncLimits) -> Result<(), MessageCheckError> {
    let bad = || MessageCheckError::BadChunk { reason: "document layout" };
    let mut r = Bytes(data);
    let actors = r.leb128_u64().map_err(|_| bad())?;
    for _ in 0..actors {
        let len = r.leb128_u64().map_err(|_| bad())?;
        r.take_u64(len).map_err(|_| bad())?;
    }
    let heads = r.leb128_u64().map_err(|_| bad())?;
    r.take_u64(heads.checked_mul(32).ok_or_else(bad)?).map_err(|_| bad())?;
    let change_columns = read_columns(&mut r).map_err(|_| bad())?;
    let op_columns = read_columns(&mut r).map_err(|_| bad())?;
    let max = limits.max_inflated_bytes;
    for (section_index, columns) in [change_columns, op_columns].into_iter().enumerate() {
        let total = columns.iter().try_fold(0u64, |sum, (_, len)| sum.checked_add(*len)).ok_or_else(bad)?;
        let mut section = Bytes(r.take_u64(total).map_err(|_| bad())?);
        // The document's changes are bounded by the message's operations too (each has at least one).
        let mut rows = RowCount::new(&columns, limits.max_ops, MessageCheckError::TooManyOps { max: limits.max_ops });
        for (spec, len) in columns {
            let column = section.take_u64(len).map_err(|_| bad())?;
            if spec & COLUMN_DEFLATE != 0 {
                inflate_counted(column, &mut budget.inflated, max)?;
                let reader = flate2::bufread::DeflateDecoder::new(column).take(max);
                rows.column(spec, io::BufReader::new(reader))?;
            } else {
                rows.column(spec, column)?;
            }
        }
        if section_index == 1 {
            budget.take_ops(rows.rows, true, limits)?;
        }
    }
    Ok(())
}

/// The operations of one (uncompressed) change chunk's data, as Automerge 0.12
/// lays it out (`storage/change.rs`, `parse_following_header`): dependencies,
/// actor, sequence number, start op, time, message, other actors, then the op
/// columns' metadata and data.
fn change_ops(data: &[u8], limits: &SyncLimits) -> Result<u64, MessageCheckError> {
    let bad = || MessageCheckError::BadChunk { reason: "change layout" };
    let mut r = Bytes(data);
    let deps = r.leb128_u64().map_err(|_| bad())?;
    r.take_u64(deps.checked_mul(32).ok_or_else(bad)?).map_err(|_| bad())?;
    let actor = r.leb128_u64().map_err(|_| bad())?;
    r.take_u64(actor).map_err(|_| bad())?;
    r.leb128_u64().map_err(|_| bad())?; // seq
    r.leb128_u64().map_err(|_| bad())?; // start op
    r.skip_leb128().map_err(|_| bad())?; // time (signed)
    let message = r.leb128_u64().map_err(|_| bad())?;
    r.take_u64(message).map_err(|_| bad())?;
    let others = r.leb128_u64().map_err(|_| bad())?;
    for _ in 0..others {
        let len = r.leb128_u64().map_err(|_| bad())?;
        r.take_u64(len).map_err(|_| bad())?;
    }
    let columns = read_columns(&mut r).map_err(|_| bad())?;
    let max = limits.max_change_ops.min(limits.max_ops);
    let mut rows = RowCount::new(&columns, max, MessageCheckError::ChangeTooManyOps { max: limits.max_change_ops });
    for (spec, len) in columns {
        let column = r.take_u64(len).map_err(|_| bad())?;
        if spec & COLUMN_DEFLATE != 0 {
            return Err(MessageCheckError::BadColumns { reason: "a compressed column inside a change" });
        }
        rows.column(spec, column)?;
    }
    Ok(rows.rows)
}

/// Column types (the low three bits of a column spec), as Automerge 0.12 numbers them.
const COLUMN_GROUP: u32 = 0;
const COLUMN_DELTA: u32 = 3;
const COLUMN_BOOLEAN: u32 = 4;
const COLUMN_STRING: u32 = 5;
const COLUMN_RAW: u32 = 7;

/// The rows of a set of columns (a change's or a document's operations): the
/// longest column's, leaving out the columns a group column groups (an
/// operation's predecessors: as many rows as the group's values add up to).
/// Refused with `error` as soon as any column's rows, or any group's sum,
/// passes `max`.
struct RowCount {
    rows: u64,
    max: u64,
    error: MessageCheckError,
    /// Column ids (a spec without its type and compression bits) that have a group column.
    grouped: Vec<u32>,
}

impl RowCount {
    fn new(columns: &[(u32, u64)], max: u64, error: MessageCheckError) -> Self {
        let grouped =
            columns.iter().filter(|(spec, _)| spec & 0b111 == COLUMN_GROUP).map(|(spec, _)| spec >> 4).collect();
        Self { rows: 0, max, error, grouped }
    }

    /// Counts one column's rows, read from `data` (run lengths only; values skipped).
    fn column(&mut self, spec: u32, data: impl BufRead) -> Result<(), MessageCheckError> {
        let bad = |reason| MessageCheckError::BadColumns { reason };
        let kind = spec & 0b111;
        if kind == COLUMN_RAW {
            return Ok(()); // Raw value bytes: their rows are the metadata column's.
        }
        let mut r = ColumnReader::new(data);
        let (mut rows, mut grouped) = (0u64, 0u64);
        let over = |n: u64| n > self.max;
        if kind == COLUMN_BOOLEAN {
            // Run lengths only, alternating false and true.
            while let Some(run) = r.uleb().map_err(|_| bad("boolean run"))? {
                rows = rows.saturating_add(run);
                if over(rows) {
                    return Err(self.error.clone());
                }
            }
        } else {
            // Run-length encoded: a signed count, then one value (a run), |count|
            // values (literals), or for 0 the length of a run of nulls.
            let value = |r: &mut ColumnReader<_>| -> Result<u64, MessageCheckError> {
                match kind {
                    COLUMN_DELTA => r.skip_leb().map(|()| 0),
                    COLUMN_STRING => r.need_uleb().and_then(|len| r.skip(len)).map(|()| 0),
                    _ => r.need_uleb(),
                }
                .map_err(|_| bad("value"))
            };
            while let Some(count) = r.sleb().map_err(|_| bad("run length"))? {
                let (n, sum) = match count {
                    0 => (r.need_uleb().map_err(|_| bad("null run"))?, 0),
                    c if c > 0 => {
                        let n = c.unsigned_abs();
                        (n, value(&mut r)?.saturating_mul(n))
                    }
                    c => {
                        let n = c.unsigned_abs();
                        if over(n) {
                            return Err(self.error.clone());
                        }
                        let mut sum = 0u64;
                        for _ in 0..n {
                            sum = sum.saturating_add(value(&mut r)?);
                        }
                        (n, sum)
                    }
                };
                rows = rows.saturating_add(n);
                grouped = grouped.saturating_add(sum);
                if over(rows) || (kind == COLUMN_GROUP && over(grouped)) {
                    return Err(self.error.clone());
                }
            }
        }
        if kind == COLUMN_GROUP || !self.grouped.contains(&(spec >> 4)) {
            self.rows = self.rows.max(rows);
        }
        Ok(())
    }
}

/// Reads LEB128 numbers from a column, one byte at a time (`None` at its end).
struct ColumnReader<R> {
    bytes: io::Bytes<R>,
}

impl<R: BufRead> ColumnReader<R> {
    fn new(data: R) -> Self {
        Self { bytes: data.bytes() }
    }

    fn byte(&mut self) -> Result<Option<u8>, ()> {
        self.bytes.next().transpose().map_err(drop)
    }

    /// The bits of one LEB128 number and the shift past its last byte, `None`
    /// at the end of the column; a number wider than 64 bits is malformed.
    fn leb_bits(&mut self) -> Result<Option<(u64, u32, u8)>, ()> {
        let Some(mut byte) = self.byte()? else { return Ok(None) };
        let (mut value, mut shift) = (u64::from(byte & 0x7f), 7u32);
        while byte & 0x80 != 0 {
            byte = self.byte()?.ok_or(())?;
            // The tenth byte holds bit 63 only (or its sign copies, for a signed number).
            if shift > 63 || (shift == 63 && byte & 0x7f != 0 && byte & 0x7f != 0x7f && byte & 0x7f != 1) {
                return Err(());
            }
            value |= u64::from(byte & 0x7f) << shift;
            shift += 7;
        }
        Ok(Some((value, shift, byte)))
    }

    /// Unsigned LEB128, `None` at the end of the column.
    fn uleb(&mut self) -> Result<Option<u64>, ()> {
        Ok(self.leb_bits()?.map(|(value, _, _)| value))
    }

    fn need_uleb(&mut self) -> Result<u64, ()> {
        self.uleb()?.ok_or(())
    }

    /// Signed LEB128, `None` at the end of the column.
    fn sleb(&mut self) -> Result<Option<i64>, ()> {
        Ok(self.leb_bits()?.map(|(value, shift, last)| {
            let value = value as i64;
            if shift < 64 && last & 0x40 != 0 {
                value | (-1i64 << shift)
            } else {
                value
            }
        }))
    }

    /// Skips one LEB128 number (signed or not).
    fn skip_leb(&mut self) -> Result<(), ()> {
        for _ in 0..10 {
            if self.byte()?.ok_or(())? & 0x80 == 0 {
                return Ok(());
            }
        }
        Err(())
    }

    fn skip(&mut self, n: u64) -> Result<(), ()> {
        for _ in 0..n {
            self.byte()?.ok_or(())?;
        }
        Ok(())
    }
}

/// Column metadata: a count, then (spec, data length) pairs.
fn read_columns(r: &mut Bytes<'_>) -> Result<Vec<(u32, u64)>, ()> {
    let count = r.leb128_u64()?;
    let mut columns = Vec::new();
    for _ in 0..count {
        let spec = u32::try_from(r.leb128_u64()?).map_err(drop)?;
        let len = r.leb128_u64()?;
        columns.push((spec, len));
    }
    Ok(columns)
}

/// Inflates raw DEFLATE data into nothing, counting the bytes against `budget`.
fn inflate_counted(data: &[u8], budget: &mut u64, max: u64) -> Result<u64, MessageCheckError> {
    let mut inflater = flate2::bufread::DeflateDecoder::new(data).take(budget.saturating_add(1));
    let inflated = io::copy(&mut inflater, &mut io::sink()).map_err(|_| MessageCheckError::BadDeflate)?;
    if inflated > *budget {
        return Err(MessageCheckError::InflatedTooLarge { max });
    }
    *budget -= inflated;
    Ok(inflated)
}

pub(super) fn put_leb128(out: &mut Vec<u8>, mut value: u64) {
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// A bounds-checked cursor; every failure is `Err(())`, mapped by the caller.
struct Bytes<'a>(&'a [u8]);

impl<'a> Bytes<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ()> {
        if n > self.0.len() {
            return Err(());
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn take_u64(&mut self, n: u64) -> Result<&'a [u8], ()> {
        self.take(usize::try_from(n).map_err(drop)?)
    }

    /// Skips one LEB128 number (signed or not).
    fn skip_leb128(&mut self) -> Result<(), ()> {
        for _ in 0..10 {
            if self.take(1)?[0] & 0x80 == 0 {
                return Ok(());
            }
        }
        Err(())
    }

    /// Unsigned LEB128 exactly as Automerge 0.12 reads it (`storage/parse/leb128.rs`).
    fn leb128_u64(&mut self) -> Result<u64, ()> {
        let mut value: u64 = 0;
        let mut shift = 0u32;
        loop {
            let byte = self.take(1)?[0];
            value |= u64::from(byte & 0x7f) << shift;
            shift += 7;
            if byte & 0x80 == 0 {
                if (shift > 64 && byte > 1) || (shift > 7 && byte == 0) {
                    return Err(());
                }
                return Ok(value);
            } else if shift > 63 {
                return Err(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use automerge::transaction::Transactable;
    use automerge::{AutoCommit, ObjType, ReadDoc, ScalarValue, ROOT};

    use super::*;

    /// Changes of every kind Automerge writes: map keys, list and text
    /// inserts, deletes, counters, nested objects, marks, conflicts from two actors.
    fn assorted_changes() -> Vec<automerge::Change> {
        let mut a = AutoCommit::new();
        let list = a.put_object(ROOT, "lista", ObjType::List).unwrap();
        let text = a.put_object(ROOT, "text", ObjType::Text).unwrap();
        for i in 0..300 {
            a.insert(&list, i, i as i64 * 7).unwrap();
        }
        a.commit();
        a.splice_text(&text, 0, 0, "Medborgarlöfte för Flen: trygghetsvandringar varje vår.").unwrap();
        a.put(ROOT, "räknare", ScalarValue::counter(1)).unwrap();
        a.commit();
        a.splice_text(&text, 5, 20, "").unwrap();
        a.increment(ROOT, "räknare", 5).unwrap();
        let map = a.insert_object(&list, 3, ObjType::Map).unwrap();
        a.put(&map, "ägare", "Polisen").unwrap();
        a.put(&map, "klar", true).unwrap();
        a.put(&map, "inget", ()).unwrap();
        a.delete(&list, 10).unwrap();
        a.commit();
        let mut b = a.fork();
        b.put(ROOT, "titel", "från b").unwrap();
        b.splice_text(&text, 0, 3, "ny").unwrap();
        a.put(ROOT, "titel", "från a").unwrap();
        a.commit();
        b.commit();
        a.merge(&mut b).unwrap();
        a.put(ROOT, "titel", "löst").unwrap();
        a.commit();
        a.get_changes(&[])
    }

    #[test]
    fn the_operations_counted_are_the_ones_automerge_reads() {
        let limits = SyncLimits::default();
        for change in assorted_changes() {
            let bytes = change.raw_bytes();
            let mut r = Bytes(bytes);
            r.take(9).unwrap(); // magic, checksum, type
            let len = r.leb128_u64().unwrap();
            let data = r.take_u64(len).unwrap();
            assert_eq!(change_ops(data, &limits).unwrap(), change.len() as u64, "change {}", change.hash());
        }
    }

    #[test]
    fn a_small_change_carrying_millions_of_operations_is_refused_and_an_honest_large_one_passes() {
        // 20,000 inserts of `true`: about 120 bytes, as Automerge writes them.
        let mut doc = AutoCommit::new();
        let list = doc.put_object(ROOT, "l", ObjType::List).unwrap();
        doc.splice(&list, 0, 0, std::iter::repeat_n(ScalarValue::Boolean(true), 20_000)).unwrap();
        doc.commit();
        let bytes: Vec<u8> = doc.get_changes(&[]).iter().flat_map(|c| c.raw_bytes().to_vec()).collect();
        assert!(bytes.len() < 400, "{} bytes", bytes.len());
        assert_eq!(check_chunks(&bytes, &SyncLimits::default()), Ok(()));
        let per_change = SyncLimits { max_change_ops: 19_999, ..SyncLimits::default() };
        assert_eq!(check_chunks(&bytes, &per_change), Err(MessageCheckError::ChangeTooManyOps { max: 19_999 }));
        // The same as a saved document (a bundle's data): its op columns are counted.
        let saved = doc.save();
        let total = SyncLimits { max_ops: 19_999, ..SyncLimits::default() };
        assert_eq!(check_chunks(&saved, &total), Err(MessageCheckError::TooManyOps { max: 19_999 }));
        assert_eq!(check_chunks(&saved, &SyncLimits::default()), Ok(()));
        // Several changes within the limit each, beyond it together.
        let mut more = doc.fork();
        let list = more.get(ROOT, "l").unwrap().unwrap().1;
        more.splice(&list, 0, 0, std::iter::repeat_n(ScalarValue::Boolean(false), 12_000)).unwrap();
        more.commit();
        let all: Vec<u8> = more.get_changes(&[]).iter().flat_map(|c| c.raw_bytes().to_vec()).collect();
        let total = SyncLimits { max_ops: 30_000, ..SyncLimits::default() };
        assert_eq!(check_chunks(&all, &total), Err(MessageCheckError::TooManyOps { max: 30_000 }));

        // Deleting a long text is as compact, and passes the defaults.
        let mut text_doc = AutoCommit::new();
        let text = text_doc.put_object(ROOT, "t", ObjType::Text).unwrap();
        text_doc.splice_text(&text, 0, 0, &"trygghet ".repeat(5_000)).unwrap();
        text_doc.commit();
        text_doc.splice_text(&text, 0, 45_000, "").unwrap();
        text_doc.commit();
        let all: Vec<u8> = text_doc.get_changes(&[]).iter().flat_map(|c| c.raw_bytes().to_vec()).collect();
        assert_eq!(check_chunks(&all, &SyncLimits::default()), Ok(()));
    }

    /// The message `from` sends a peer holding `held` (after the peer's first answer).
    fn message_to(from: &mut AutoCommit, held: &mut AutoCommit) -> Vec<u8> {
        use automerge::sync::{State, SyncDoc};
        let (mut ours, mut theirs) = (State::new(), State::new());
        let offer = from.sync().generate_sync_message(&mut ours).unwrap();
        held.sync().receive_sync_message(&mut theirs, offer).unwrap();
        let request = held.sync().generate_sync_message(&mut theirs).unwrap();
        from.sync().receive_sync_message(&mut ours, request).unwrap();
        from.sync().generate_sync_message(&mut ours).unwrap().encode()
    }

    #[test]
    fn a_messages_operations_are_counted_for_the_senders_budget() {
        let changes = assorted_changes();
        let ops = |changes: &[automerge::Change]| changes.iter().map(|c| c.len() as u64).sum::<u64>();
        let mut doc = AutoCommit::new();
        doc.apply_changes(changes.clone()).unwrap();
        let limits = SyncLimits::default();
        // To a peer holding nothing: the history as a saved document, which holds
        // no delete operations (a delete marks its target): 24 fewer here.
        let whole = operations_in(&message_to(&mut doc, &mut AutoCommit::new()), &limits);
        assert_eq!(whole, Some(Operations { in_changes: 0, in_documents: ops(&changes) - 24 }));
        assert_eq!(operations_in(b"not a sync message", &limits), None);
    }

    #[test]
    fn run_lengths_past_any_limit_are_refused_without_overflow() {
        let limits = SyncLimits::default();
        let mut rows = RowCount::new(&[], limits.max_change_ops, MessageCheckError::ChangeTooManyOps { max: 1 });
        // A run of 2^62 copies of one value in an integer column.
        let mut column = Vec::new();
        put_sleb(&mut column, 1 << 62);
        put_leb128(&mut column, 1);
        assert!(matches!(rows.column(2 << 4 | 2, &column[..]), Err(MessageCheckError::ChangeTooManyOps { .. })));
        // A group count of 2^40 in a single row: the grouped columns would need that many rows.
        let mut group = Vec::new();
        put_sleb(&mut group, 1);
        put_leb128(&mut group, 1 << 40);
        assert!(matches!(rows.column(8 << 4, &group[..]), Err(MessageCheckError::ChangeTooManyOps { .. })));
        // A boolean column of huge alternating runs.
        let mut booleans = Vec::new();
        put_leb128(&mut booleans, u64::MAX);
        assert!(matches!(rows.column(4, &booleans[..]), Err(MessageCheckError::ChangeTooManyOps { .. })));
        // Truncated values are malformed, not counted.
        let mut truncated = Vec::new();
        put_sleb(&mut truncated, -3);
        put_leb128(&mut truncated, 1);
        assert!(matches!(rows.column(2, &truncated[..]), Err(MessageCheckError::BadColumns { .. })));
    }

    fn put_sleb(out: &mut Vec<u8>, mut value: i64) {
        loop {
            let byte = (value & 0x7f) as u8;
            value >>= 7;
            if (value == 0 && byte & 0x40 == 0) || (value == -1 && byte & 0x40 != 0) {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }
}
