//! A document sent whole to a peer that has none of it, straight from the
//! bytes a store keeps (its snapshot and the increments after it), without
//! loading it into Automerge.
//!
//! A relay syncing a fresh node used to load every document (Automerge
//! rebuilds each change to learn its hash: most of a cold sync's relay CPU)
//! only to send a bloom filter, wait for the node's "I have nothing", and
//! send `save()`. A stored snapshot followed by its increments is a valid
//! message body as it is (Automerge reads a document chunk followed by change
//! chunks), the heads are in the store's index, and what the authors'
//! signatures must cover is known without the changes' hashes: per author,
//! the tips of the snapshot (kept beside it when it is written) and the tips
//! among the increments (parsed from their chunk headers, which carry no
//! operations to rebuild). [`crate::sync::PeerSession`] builds the message
//! and the sync state Automerge would hold after sending it, and settles the
//! peer's acknowledgement without the document too.

use automerge::{ActorId, AutoCommit, Change, ChangeHash};

use crate::authorship;

/// What a store holds of one document, enough to send it whole: its heads,
/// its stored chunks (the snapshot, then the increments in order) and the
/// changes whose authors' signatures cover every change in them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredWhole {
    /// The document's heads (sorted), as the stored chunks hold them.
    pub heads: Vec<ChangeHash>,
    /// The snapshot (a full save) and the increment rows after it, in order.
    pub chunks: Vec<Vec<u8>>,
    /// The changes to send the authors' signatures of: the snapshot's author
    /// tips and the increments' (a change may be covered twice; none is left out).
    pub tips: Vec<(ChangeHash, ActorId)>,
}

impl StoredWhole {
    /// From what a store keeps: the heads, the snapshot with its tips
    /// ([`encode_tips`]) and the increment rows after it, in order (their
    /// checksums already checked). `None` if the tips or an increment do not
    /// parse: the caller then loads the document.
    pub fn from_stored(
        heads: Vec<ChangeHash>,
        snapshot: Vec<u8>,
        tips: &[u8],
        increments: Vec<Vec<u8>>,
    ) -> Option<Self> {
        let mut tips = decode_tips(tips)?;
        for tip in increment_tips(increments.iter().map(Vec::as_slice))? {
            if !tips.contains(&tip) {
                tips.push(tip);
            }
        }
        let mut chunks = Vec::with_capacity(1 + increments.len());
        chunks.push(snapshot);
        chunks.extend(increments);
        Some(Self { heads, chunks, tips })
    }
}

/// The author tips of a whole document (per author, its changes no other
/// change of the same author builds on): what to keep beside its snapshot.
/// Reads the changes' metadata only.
pub fn document_tips(doc: &mut AutoCommit) -> Vec<(ChangeHash, ActorId)> {
    let meta: Vec<automerge::ChangeMetadata<'_>> =
        doc.get_changes_meta(&[]).into_iter().map(|c| c.into_owned()).collect();
    authorship::author_tips_of_metadata(meta.iter())
}

/// The author tips of the changes in increment rows (each the raw bytes of
/// one or more change chunks, one after another); `None` if a row does not
/// parse as change chunks.
pub fn increment_tips<'a>(rows: impl IntoIterator<Item = &'a [u8]>) -> Option<Vec<(ChangeHash, ActorId)>> {
    let mut changes = Vec::new();
    for row in rows {
        let mut rest = row;
        while !rest.is_empty() {
            let len = chunk_len(rest)?;
            let (chunk, after) = rest.split_at(len);
            changes.push(Change::from_bytes(chunk.to_vec()).ok()?);
            rest = after;
        }
    }
    Some(authorship::author_tips(changes.iter()))
}

/// At most this many change chunks may follow the document chunk in bytes a
/// store keeps as received ([`keepable_as_received`]): as many increment rows
/// as a store holds before it folds them, so that loading them later costs no
/// more than loading a stored document does.
pub const MAX_CHANGE_CHUNKS_KEPT: usize = 64;

/// Whether bytes a document was loaded from are worth keeping as its stored
/// form instead of saving it again: a document chunk (what a save or a
/// snapshot is) followed by at most [`MAX_CHANGE_CHUNKS_KEPT`] change chunks
/// (a snapshot's increments, as a relay sends a document whole). Many loose
/// changes would make every later load replay them; a save compresses them.
pub fn keepable_as_received(bytes: &[u8]) -> bool {
    const DOCUMENT_CHUNK: u8 = 0;
    if bytes.get(8) != Some(&DOCUMENT_CHUNK) {
        return false;
    }
    let mut rest = bytes;
    let mut chunks = 0usize;
    while !rest.is_empty() {
        let Some(len) = chunk_len(rest) else { return false };
        chunks += 1;
        if chunks > 1 + MAX_CHANGE_CHUNKS_KEPT {
            return false;
        }
        rest = &rest[len..];
    }
    true
}

/// The length of the chunk at the start of `data` (header included): magic
/// (4 bytes), checksum (4), type (1), LEB128 body length, body.
fn chunk_len(data: &[u8]) -> Option<usize> {
    const HEADER: usize = 9;
    if data.len() < HEADER || data[..4] != [0x85, 0x6f, 0x4a, 0x83] {
        return None;
    }
    let mut body: u64 = 0;
    for (i, byte) in data[HEADER..].iter().take(10).enumerate() {
        body |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            let total = (HEADER + i + 1).checked_add(usize::try_from(body).ok()?)?;
            return (total <= data.len()).then_some(total);
        }
    }
    None
}

/// The encoding of author tips kept beside a snapshot: for each, the change
/// hash (32 bytes), the actor's length (1 byte) and the actor's bytes.
pub fn encode_tips(tips: &[(ChangeHash, ActorId)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(tips.len() * 65);
    for (hash, actor) in tips {
        let actor = actor.to_bytes();
        // Actor ids are at most 255 bytes in practice (ours are 32); a longer one is left out,
        // which makes the tips incomplete: `decode_tips` cannot tell, so refuse to encode them.
        let Ok(len) = u8::try_from(actor.len()) else { return Vec::new() };
        out.extend_from_slice(&hash.0);
        out.push(len);
        out.extend_from_slice(actor);
    }
    out
}

/// Reads [`encode_tips`]; `None` if the bytes are not such a list.
pub fn decode_tips(mut bytes: &[u8]) -> Option<Vec<(ChangeHash, ActorId)>> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let hash = ChangeHash(<[u8; 32]>::try_from(bytes.get(..32)?).ok()?);
        let len = usize::from(*bytes.get(32)?);
        let actor = ActorId::from(bytes.get(33..33 + len)?);
        out.push((hash, actor));
        bytes = &bytes[33 + len..];
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use automerge::transaction::Transactable;
    use automerge::ROOT;

    use super::*;

    fn edit(doc: &mut AutoCommit, actor: &ActorId, n: i64) {
        doc.set_actor(actor.clone());
        doc.put(ROOT, "n", n).unwrap();
        doc.commit();
    }

    #[test]
    fn tips_of_a_snapshot_and_its_increments_cover_what_the_whole_documents_tips_cover() {
        let (a, b) = (ActorId::from(&[1u8; 32][..]), ActorId::from(&[2u8; 32][..]));
        let mut doc = AutoCommit::new();
        for n in 0..5 {
            edit(&mut doc, if n % 2 == 0 { &a } else { &b }, n);
        }
        let snapshot_tips = document_tips(&mut doc);
        assert_eq!(snapshot_tips.len(), 2, "one tip per author: {snapshot_tips:?}");
        let heads = doc.get_heads();
        edit(&mut doc, &a, 10);
        edit(&mut doc, &a, 11);
        let row: Vec<u8> = doc.get_changes(&heads).iter().flat_map(|c| c.raw_bytes().to_vec()).collect();
        let increments = increment_tips([row.as_slice()]).unwrap();
        let whole = document_tips(&mut doc);
        assert_eq!(increments.len(), 1, "both increments are a's, the later covers the earlier");
        for tip in &whole {
            assert!(snapshot_tips.contains(tip) || increments.contains(tip), "{tip:?} left out");
        }
        assert_eq!(decode_tips(&encode_tips(&whole)), Some(whole));
        assert_eq!(decode_tips(&[1, 2, 3]), None);
        assert_eq!(increment_tips([&row[..row.len() - 1]]), None, "a cut chunk does not parse");
        assert_eq!(increment_tips([&b"not a chunk"[..]]), None);
    }
}
