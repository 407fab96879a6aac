//! Summary phase: deciding cheaply which documents need an Automerge sync at all.
//!
//! On connect each side sends a [`Frame::Summary`] over every document it
//! shares with the other. Equal digests mean nothing to do ([`Frame::InSync`]);
//! otherwise each side sends [`Frame::DocHeads`] and both run [`plan`] to find
//! the documents that differ or exist on one side only. Pure functions over
//! heads: no state, no I/O, no Automerge calls.
//!
//! Digest definitions (both sides must agree byte for byte):
//! - document heads digest: the first 8 bytes of
//!   `SHA-256(count:u32be ‖ head₁ ‖ … ‖ headₙ)` with the heads sorted ascending and deduplicated;
//! - summary digest: `SHA-256(count:u32be ‖ entry₁ ‖ … ‖ entryₙ)` with the
//!   entries sorted by document id, each `doc:[16] ‖ heads count:u32be ‖ sorted heads`.

use std::collections::BTreeMap;

use automerge::ChangeHash;
use sha2::{Digest, Sha256};

use crate::ids::DocId;
use crate::wire::{doc_id_to_bytes, Frame, HEADS_DIGEST_BYTES};

/// Truncated digest of one document's heads, as carried in [`Frame::DocHeads`].
pub type HeadsDigest = [u8; HEADS_DIGEST_BYTES];

fn sorted(heads: &[ChangeHash]) -> Vec<ChangeHash> {
    let mut heads = heads.to_vec();
    heads.sort_unstable();
    heads.dedup();
    heads
}

fn count_be(n: usize) -> [u8; 4] {
    u32::try_from(n).unwrap_or(u32::MAX).to_be_bytes()
}

/// Digest of one document's heads (order-insensitive).
pub fn heads_digest(heads: &[ChangeHash]) -> HeadsDigest {
    let heads = sorted(heads);
    let mut hasher = Sha256::new();
    hasher.update(count_be(heads.len()));
    for head in &heads {
        hasher.update(head.0);
    }
    let full: [u8; 32] = hasher.finalize().into();
    let mut out = [0u8; HEADS_DIGEST_BYTES];
    out.copy_from_slice(&full[..HEADS_DIGEST_BYTES]);
    out
}

/// Digest over all documents one side shares with the other (order-insensitive).
///
/// Pass each document once, with its current heads. Equal digests on both
/// sides mean both hold exactly the same documents at the same heads.
pub fn summary_digest<'a>(docs: impl IntoIterator<Item = (&'a DocId, &'a [ChangeHash])>) -> [u8; 32] {
    digest_entries(sorted_entries(docs))
}

/// The [`Frame::Summary`] for these documents (each passed once).
pub fn summary_frame<'a>(docs: impl IntoIterator<Item = (&'a DocId, &'a [ChangeHash])>) -> Frame {
    let entries = sorted_entries(docs);
    Frame::Summary { docs: u32::try_from(entries.len()).unwrap_or(u32::MAX), digest: digest_entries(entries) }
}

fn sorted_entries<'a>(
    docs: impl IntoIterator<Item = (&'a DocId, &'a [ChangeHash])>,
) -> Vec<(&'a DocId, Vec<ChangeHash>)> {
    let mut entries: Vec<(&DocId, Vec<ChangeHash>)> =
        docs.into_iter().map(|(doc, heads)| (doc, sorted(heads))).collect();
    entries.sort_by(|a, b| a.0.cmp(b.0));
    entries
}

fn digest_entries(entries: Vec<(&DocId, Vec<ChangeHash>)>) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(count_be(entries.len()));
    for (doc, heads) in &entries {
        hasher.update(doc_id_to_bytes(doc));
        hasher.update(count_be(heads.len()));
        for head in heads {
            hasher.update(head.0);
        }
    }
    hasher.finalize().into()
}

/// The [`Frame::DocHeads`] for these documents, sorted by document id.
pub fn doc_heads_frame<'a>(docs: impl IntoIterator<Item = (&'a DocId, &'a [ChangeHash])>) -> Frame {
    let mut entries: Vec<(DocId, HeadsDigest)> =
        docs.into_iter().map(|(doc, heads)| (doc.clone(), heads_digest(heads))).collect();
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    Frame::DocHeads { entries }
}

/// Which documents need an Automerge sync after comparing heads digests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncPlan {
    /// Both sides have the document, at different heads.
    pub differ: Vec<DocId>,
    /// Only we have the document: we should start its sync (the peer will create it).
    pub only_ours: Vec<DocId>,
    /// Only the peer has the document: it will start the sync; the caller
    /// decides whether to accept it (e.g. the peer's organisation may share it).
    pub only_theirs: Vec<DocId>,
}

impl SyncPlan {
    /// Whether nothing needs syncing.
    pub fn is_empty(&self) -> bool {
        self.differ.is_empty() && self.only_ours.is_empty() && self.only_theirs.is_empty()
    }

    /// The documents we should start syncing now (`differ` and `only_ours`), sorted.
    pub fn to_start(&self) -> impl Iterator<Item = &DocId> {
        self.differ.iter().chain(&self.only_ours)
    }
}

/// Compares our documents' heads with the peer's [`Frame::DocHeads`] entries.
///
/// If the peer lists a document twice, its last entry counts. All lists in
/// the result are sorted by document id.
pub fn plan<'a>(
    ours: impl IntoIterator<Item = (&'a DocId, &'a [ChangeHash])>,
    theirs: &[(DocId, HeadsDigest)],
) -> SyncPlan {
    plan_keeping(ours, theirs, |_| true)
}

/// [`plan`], keeping in [`SyncPlan::only_theirs`] only the documents for
/// which `keep_theirs` says yes (the relay keeps none: a node's own documents
/// arrive with its `Sync` frames). Memory is proportional to our documents
/// and the kept ones, never to the length of the peer's list: a peer naming
/// millions of documents costs one pass over them.
pub fn plan_keeping<'a>(
    ours: impl IntoIterator<Item = (&'a DocId, &'a [ChangeHash])>,
    theirs: &[(DocId, HeadsDigest)],
    mut keep_theirs: impl FnMut(&DocId) -> bool,
) -> SyncPlan {
    let ours: BTreeMap<&DocId, HeadsDigest> = ours.into_iter().map(|(doc, heads)| (doc, heads_digest(heads))).collect();
    // Their last digest of each of our documents.
    let mut matched: BTreeMap<&DocId, &HeadsDigest> = BTreeMap::new();
    let mut only_theirs = Vec::new();
    for (doc, digest) in theirs {
        match ours.get_key_value(doc) {
            Some((ours_doc, _)) => {
                matched.insert(ours_doc, digest);
            }
            None if keep_theirs(doc) => only_theirs.push(doc.clone()),
            None => {}
        }
    }
    let mut plan = SyncPlan::default();
    for (doc, digest) in &ours {
        match matched.get(doc) {
            Some(their_digest) if *their_digest == digest => {}
            Some(_) => plan.differ.push((*doc).clone()),
            None => plan.only_ours.push((*doc).clone()),
        }
    }
    only_theirs.sort_unstable();
    only_theirs.dedup();
    plan.only_theirs = only_theirs;
    plan
}
