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
//!   to at most [`SyncLimits::max_inflated_bytes`] in total.
//!
//! What it cannot check: the columnar encoding inside changes and documents.
//! Automerge still decodes that itself, under `catch_unwind` in the session.

use std::io::{self, Read, Write};

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
}

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
}

/// Checks a decoded sync message against `limits` (see the module docs).
pub fn check_message(message: &Message, limits: &SyncLimits) -> Result<(), MessageCheckError> {
    check_hashes("heads", &message.heads, limits)?;
    check_hashes("need", &message.need, limits)?;
    if message.have.len() > limits.max_haves {
        return Err(MessageCheckError::TooManyHaves { count: message.have.len(), max: limits.max_haves });
    }
    for have in &message.have {
        check_have(have, limits)?;
    }
    let mut budget = limits.max_inflated_bytes;
    for entry in message.changes.iter() {
        check_chunks_within(entry, &mut budget, limits)?;
    }
    Ok(())
}

/// Checks Automerge bytes from a file (a bundle's document data: a saved
/// document or concatenated changes) exactly as the changes of a sync message
/// are checked, before `load_incremental` sees them. Empty input is refused.
pub fn check_chunks(data: &[u8], limits: &SyncLimits) -> Result<(), MessageCheckError> {
    if data.is_empty() {
        return Err(MessageCheckError::Empty);
    }
    let mut budget = limits.max_inflated_bytes;
    check_chunks_within(data, &mut budget, limits)
}

fn check_chunks_within(data: &[u8], budget: &mut u64, limits: &SyncLimits) -> Result<(), MessageCheckError> {
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
fn check_chunk<'a>(input: &'a [u8], budget: &mut u64, limits: &SyncLimits) -> Result<&'a [u8], MessageCheckError> {
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
            check_document_columns(data, budget, max)?;
        }
        CHUNK_CHANGE => {
            let size = (input.len() - r.0.len()) as u64;
            if size > limits.max_change_bytes {
                return Err(too_large(size));
            }
            verify_checksum(checksum, CHUNK_CHANGE, data.len() as u64, |h| h.update(data))?
        }
        CHUNK_COMPRESSED => {
            // The checksum covers the inflated change: count first, then hash while inflating again.
            // At most one byte past the change limit is inflated before refusing.
            let change_cap = limits.max_change_bytes;
            let mut change_budget = (*budget).min(change_cap);
            let inflated = inflate_counted(data, &mut change_budget, max).map_err(|e| match e {
                MessageCheckError::InflatedTooLarge { .. } if change_cap < *budget => too_large(change_cap + 1),
                other => other,
            })?;
            *budget -= inflated;
            let mut result = Ok(());
            verify_checksum(checksum, CHUNK_CHANGE, inflated, |hasher| {
                let mut inflater = flate2::bufread::DeflateDecoder::new(data).take(inflated);
                result = io::copy(&mut inflater, &mut HashWriter(hasher)).map(drop);
            })?;
            result.map_err(|_| MessageCheckError::BadDeflate)?;
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

/// Walks a document chunk's metadata and inflates (counting only) its compressed columns.
fn check_document_columns(data: &[u8], budget: &mut u64, max: u64) -> Result<(), MessageCheckError> {
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
    for columns in [change_columns, op_columns] {
        let total = columns.iter().try_fold(0u64, |sum, (_, len)| sum.checked_add(*len)).ok_or_else(bad)?;
        let mut section = Bytes(r.take_u64(total).map_err(|_| bad())?);
        for (spec, len) in columns {
            let column = section.take_u64(len).map_err(|_| bad())?;
            if spec & COLUMN_DEFLATE != 0 {
                inflate_counted(column, budget, max)?;
            }
        }
    }
    Ok(())
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

struct HashWriter<'a>(&'a mut Sha256);

impl Write for HashWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
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
