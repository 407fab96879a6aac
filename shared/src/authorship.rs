//! Authorship of changes: every Automerge change is proven to be its author's.
//!
//! A change's actor id is its author's node key ([`crate::identity`]). Automerge
//! change hashes chain (a change's hash covers its dependencies' hashes), so a
//! signature over one change vouches for its whole history. The rule:
//!
//! > A change `C` by author `X` is authentic in document `d` when some
//! > signature by `X`, for `d`, covers a change `D` by `X` such that `C` is an
//! > ancestor of `D` or `D` itself, and `D` is in the document.
//!
//! An honest author's every change has its earlier changes as ancestors (a
//! change depends on the heads at its creation), so one signature over the
//! author's latest change proves all of the author's changes before it. A
//! change claiming `X` that `X` never made cannot be an ancestor of a change `X`
//! signed: `X`'s node would have had to accept it, and it accepts a change
//! claiming `X` only with `X`'s covering signature (induction over the history).
//!
//! So senders sign batches: per message (a sync message, a bundle document) and
//! per author whose changes it carries, only the author's latest changes in it
//! (the *tips*, [`author_tips`]); a node signs its own tip on the spot, a
//! forwarder sends the stored signatures of the tips, or of a later change of
//! the same author ([`later_by_author`]). Receivers check coverage after
//! applying ([`verify_new_changes`]) and keep the verified signatures.
//!
//! Signatures are bound to the document (context `samverkan-change-v2`, the
//! document id, the hash): one made for a change in document `a` proves nothing
//! in document `b`, even if someone copies the change there. Signatures made
//! before batching (context `samverkan-change-v1`: the hash alone, one per
//! change) still verify: every change signing itself is a special case of the
//! rule.
//!
//! This module only computes; keeping signatures is the store's job.

use std::collections::{HashMap, HashSet};

use automerge::{ActorId, AutoCommit, Change, ChangeHash, ChangeMetadata};
use ed25519_dalek::{Signature, Signer};

use crate::identity::{NodeId, NodeKey};
use crate::ids::DocId;

/// Domain separation for change signatures: document id and change hash.
const CONTEXT: &[u8] = b"samverkan-change-v2\0";
/// Domain separation of the signatures made before batching: the hash alone.
const CONTEXT_V1: &[u8] = b"samverkan-change-v1\0";

/// An ed25519 signature over a change hash.
pub type ChangeSignature = [u8; 64];

/// Why a change's authorship could not be proven.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthorshipError {
    /// The change's actor id is not an ed25519 public key.
    #[error("change {hash} names actor {actor}, which is not a node key")]
    NotAKey {
        /// The change.
        hash: ChangeHash,
        /// Its actor id, hex.
        actor: String,
    },
    /// No signature of the change's author covers it (on the change itself
    /// or a later change of the same author in the document).
    #[error("change {hash} by {author} came without a signature of its author covering it")]
    Unsigned {
        /// The change.
        hash: ChangeHash,
        /// The claimed author (short form).
        author: String,
    },
    /// The signature does not verify with the actor's key.
    #[error("change {hash} claims author {author}, but its signature does not verify")]
    BadSignature {
        /// The change.
        hash: ChangeHash,
        /// The claimed author (short form).
        author: String,
    },
    /// The signature is valid, but the receiver does not accept changes by this author.
    #[error("change {hash} by {author} is not accepted: {reason}")]
    NotAccepted {
        /// The change.
        hash: ChangeHash,
        /// The author (short form).
        author: String,
        /// Why (not enrolled, revoked, a signer's key).
        reason: String,
    },
}

fn message(doc: &DocId, hash: &ChangeHash) -> Vec<u8> {
    let mut out = CONTEXT.to_vec();
    out.extend_from_slice(doc.as_str().as_bytes());
    out.push(0);
    out.extend_from_slice(hash.as_ref());
    out
}

fn message_v1(hash: &ChangeHash) -> Vec<u8> {
    let mut out = CONTEXT_V1.to_vec();
    out.extend_from_slice(hash.as_ref());
    out
}

/// Signs change `hash` of document `doc`, made by `key`: proof that `key` made
/// it and every change of `key`'s before it in `doc` (see the module docs).
pub fn sign(key: &NodeKey, doc: &DocId, hash: &ChangeHash) -> ChangeSignature {
    key.signing_key().sign(&message(doc, hash)).to_bytes()
}

/// A signature as made before batching (context `samverkan-change-v1`, the
/// hash alone, not bound to a document). Nothing signs this way any more; it
/// exists to prove that such signatures, still stored everywhere, verify.
pub fn sign_v1(key: &NodeKey, hash: &ChangeHash) -> ChangeSignature {
    key.signing_key().sign(&message_v1(hash)).to_bytes()
}

/// Verifies that `signature` is the signature of the key named by `actor` over
/// change `hash` of document `doc` (or an older, per-change signature of
/// `hash`), strictly.
pub fn verify(
    doc: &DocId,
    hash: &ChangeHash,
    actor: &ActorId,
    signature: &ChangeSignature,
) -> Result<NodeId, AuthorshipError> {
    let author = NodeId::from_actor(actor)
        .ok_or_else(|| AuthorshipError::NotAKey { hash: *hash, actor: actor.to_hex_string() })?;
    let key = author.verifying_key();
    let signature = Signature::from_bytes(signature);
    if key.verify_strict(&message(doc, hash), &signature).is_ok()
        || key.verify_strict(&message_v1(hash), &signature).is_ok()
    {
        return Ok(author);
    }
    Err(AuthorshipError::BadSignature { hash: *hash, author: author.short() })
}

/// A set of changes as a graph (a message's, a bundle's, the new changes of a
/// document): each change's author and its parents inside the set.
struct ChangeSet {
    hashes: Vec<ChangeHash>,
    index: HashMap<ChangeHash, usize>,
    /// Author of each change, as an index into `actors`.
    author: Vec<usize>,
    actors: Vec<ActorId>,
    /// Parents of each change that are in the set.
    parents: Vec<Vec<usize>>,
}

impl ChangeSet {
    /// The set of `changes`: each one's hash, author and parents.
    fn new<'a>(changes: impl IntoIterator<Item = (ChangeHash, &'a ActorId, &'a [ChangeHash])>) -> Self {
        let mut set = ChangeSet {
            hashes: Vec::new(),
            index: HashMap::new(),
            author: Vec::new(),
            actors: Vec::new(),
            parents: Vec::new(),
        };
        let mut actor_index: HashMap<ActorId, usize> = HashMap::new();
        let mut deps = Vec::new();
        for (hash, actor, change_deps) in changes {
            if set.index.contains_key(&hash) {
                continue;
            }
            set.index.insert(hash, set.hashes.len());
            set.hashes.push(hash);
            let next = actor_index.len();
            let author = *actor_index.entry(actor.clone()).or_insert(next);
            if author == set.actors.len() {
                set.actors.push(actor.clone());
            }
            set.author.push(author);
            deps.push(change_deps.to_vec());
        }
        set.parents = deps.iter().map(|ds| ds.iter().filter_map(|d| set.index.get(d).copied()).collect()).collect();
        set
    }

    /// Marks every change by `author` that is an ancestor of one of `from`
    /// inside the set (`from` themselves included when `include_from`).
    fn reach(&self, author: usize, from: &[usize], include_from: bool, marked: &mut [bool]) {
        let mut seen = vec![false; self.hashes.len()];
        let mut stack: Vec<usize> = Vec::new();
        for &f in from {
            if include_from {
                if !seen[f] {
                    seen[f] = true;
                    stack.push(f);
                }
            } else {
                for &p in &self.parents[f] {
                    if !seen[p] {
                        seen[p] = true;
                        stack.push(p);
                    }
                }
            }
        }
        while let Some(i) = stack.pop() {
            if self.author[i] == author {
                marked[i] = true;
            }
            for &p in &self.parents[i] {
                if !seen[p] {
                    seen[p] = true;
                    stack.push(p);
                }
            }
        }
    }

    fn by_author(&self) -> Vec<Vec<usize>> {
        let mut out = vec![Vec::new(); self.actors.len()];
        for (i, a) in self.author.iter().enumerate() {
            out[*a].push(i);
        }
        out
    }
}

/// The changes whose signatures prove the authorship of all of `changes` (the
/// changes of one message or bundle document): for each author, the author's
/// changes that have no later change of the same author among `changes`. For
/// an honest author that is one change, the latest, per message.
pub fn author_tips<'a>(changes: impl IntoIterator<Item = &'a Change>) -> Vec<(ChangeHash, ActorId)> {
    tips_of(ChangeSet::new(changes.into_iter().map(|c| (c.hash(), c.actor_id(), c.deps()))))
}

/// [`author_tips`] from the changes' metadata (hash, actor, dependencies),
/// which a document gives without encoding the changes' operations: what a
/// sync connection uses after each message it sends.
pub fn author_tips_of_metadata<'a>(
    changes: impl IntoIterator<Item = &'a ChangeMetadata<'a>>,
) -> Vec<(ChangeHash, ActorId)> {
    tips_of(ChangeSet::new(changes.into_iter().map(|c| (c.hash, c.actor.as_ref(), c.deps.as_slice()))))
}

fn tips_of(set: ChangeSet) -> Vec<(ChangeHash, ActorId)> {
    let mut below = vec![false; set.hashes.len()];
    for (author, own) in set.by_author().iter().enumerate() {
        set.reach(author, own, false, &mut below);
    }
    (0..set.hashes.len()).filter(|i| !below[*i]).map(|i| (set.hashes[i], set.actors[set.author[i]].clone())).collect()
}

/// The changes of `tip`'s author in `doc` that have `tip` as an ancestor,
/// nearest first (by sequence number): where to look for a stored signature
/// covering `tip` when `tip` has none of its own. Costs a pass over the
/// changes that are not ancestors of `tip`; empty if `tip` is not in `doc`.
pub fn later_by_author(doc: &mut AutoCommit, tip: &ChangeHash) -> Vec<(ChangeHash, ActorId)> {
    let Some(actor) = doc.get_change_by_hash(tip).map(|c| c.actor_id().clone()) else { return Vec::new() };
    let rest = doc.get_changes(&[*tip]);
    let mut descendants: HashSet<ChangeHash> = HashSet::from([*tip]);
    // Changes come in causal order, so one pass usually settles it; repeat until nothing moves.
    loop {
        let before = descendants.len();
        for change in &rest {
            if !descendants.contains(&change.hash()) && change.deps().iter().any(|d| descendants.contains(d)) {
                descendants.insert(change.hash());
            }
        }
        if descendants.len() == before {
            break;
        }
    }
    let mut out: Vec<(u64, ChangeHash)> = rest
        .iter()
        .filter(|c| c.actor_id() == &actor && descendants.contains(&c.hash()))
        .map(|c| (c.seq(), c.hash()))
        .collect();
    out.sort_unstable();
    out.into_iter().map(|(_, hash)| (hash, actor.clone())).collect()
}

/// Checks that every change of `doc` that is not below `before` is covered by
/// a signature of its author for document `doc_id` (see the module docs),
/// taking the signatures of the new changes out of `offered`; every such
/// signature must verify, and `accept` must accept its signer (called once
/// per signer, before any walk over the changes: the walks cost one pass over
/// the new changes per accepted signer, so what a receiver accepts bounds
/// them). Returns the verified signatures to keep. The caller must discard
/// the document's new state if this fails.
///
/// Only new changes can cover new changes (an ancestor of a change held
/// before was held before), so the check walks the new changes alone.
pub fn verify_new_changes(
    doc_id: &DocId,
    doc: &mut AutoCommit,
    before: &[ChangeHash],
    offered: &mut HashMap<ChangeHash, ChangeSignature>,
    mut accept: impl FnMut(&ChangeHash, &NodeId) -> Result<(), AuthorshipError>,
) -> Result<Vec<(ChangeHash, ChangeSignature)>, AuthorshipError> {
    // The changes' metadata (hash, author, parents) is all a signature covers;
    // rebuilding the changes with their operations would cost far more.
    let new = doc.get_changes_meta(before);
    let set = ChangeSet::new(new.iter().map(|c| (c.hash, c.actor.as_ref(), c.deps.as_slice())));
    let mut verified = Vec::new();
    let mut signed_by: Vec<Vec<usize>> = vec![Vec::new(); set.actors.len()];
    for (i, hash) in set.hashes.iter().enumerate() {
        if let Some(signature) = offered.remove(hash) {
            let author = verify(doc_id, hash, &set.actors[set.author[i]], &signature)?;
            if signed_by[set.author[i]].is_empty() {
                accept(hash, &author)?;
            }
            verified.push((*hash, signature));
            signed_by[set.author[i]].push(i);
        }
    }
    let mut covered = vec![false; set.hashes.len()];
    for (author, signed) in signed_by.iter().enumerate() {
        if !signed.is_empty() {
            set.reach(author, signed, true, &mut covered);
        }
    }
    if let Some(i) = covered.iter().position(|c| !c) {
        let (hash, actor) = (set.hashes[i], &set.actors[set.author[i]]);
        let Some(author) = NodeId::from_actor(actor) else {
            return Err(AuthorshipError::NotAKey { hash, actor: actor.to_hex_string() });
        };
        return Err(AuthorshipError::Unsigned { hash, author: author.short() });
    }
    Ok(verified)
}

#[cfg(test)]
mod tests {
    use automerge::transaction::Transactable;

    use super::*;

    fn change_by(key: &NodeKey, doc: &mut AutoCommit, value: i64) -> ChangeHash {
        doc.set_actor(key.node_id().actor_id());
        doc.put(automerge::ROOT, "x", value).unwrap();
        doc.commit().unwrap()
    }

    /// [`verify_new_changes`] accepting every signer.
    fn check(
        id: &DocId,
        doc: &mut AutoCommit,
        before: &[ChangeHash],
        offered: &mut HashMap<ChangeHash, ChangeSignature>,
    ) -> Result<Vec<(ChangeHash, ChangeSignature)>, AuthorshipError> {
        verify_new_changes(id, doc, before, offered, |_, _| Ok(()))
    }

    fn offer(entries: &[(ChangeHash, ChangeSignature)]) -> HashMap<ChangeHash, ChangeSignature> {
        entries.iter().copied().collect()
    }

    #[test]
    fn only_the_named_author_can_sign_a_change_and_only_for_its_document() {
        let (author, other) = (NodeKey::generate(), NodeKey::generate());
        let (id, elsewhere) = (DocId::random(), DocId::random());
        let mut doc = AutoCommit::new();
        let hash = change_by(&author, &mut doc, 1);
        let actor = author.node_id().actor_id();
        assert_eq!(verify(&id, &hash, &actor, &sign(&author, &id, &hash)).unwrap(), author.node_id());
        assert!(matches!(
            verify(&id, &hash, &actor, &sign(&other, &id, &hash)),
            Err(AuthorshipError::BadSignature { .. })
        ));
        assert!(
            verify(&elsewhere, &hash, &actor, &sign(&author, &id, &hash)).is_err(),
            "a signature made for one document proves nothing in another"
        );
        let moved = change_by(&author, &mut doc, 2);
        assert!(verify(&id, &moved, &actor, &sign(&author, &id, &hash)).is_err(), "nor for another change");
        assert!(matches!(
            verify(&id, &hash, &ActorId::from(vec![1u8, 2, 3]), &sign(&author, &id, &hash)),
            Err(AuthorshipError::NotAKey { .. })
        ));
        // Signatures made before batching (one per change, not bound to a document) still verify.
        assert_eq!(verify(&id, &hash, &actor, &sign_v1(&author, &hash)).unwrap(), author.node_id());
    }

    #[test]
    fn one_signature_over_an_authors_latest_change_covers_all_its_changes_before_it() {
        let (a, b) = (NodeKey::generate(), NodeKey::generate());
        let id = DocId::random();
        let mut doc = AutoCommit::new();
        let first = change_by(&a, &mut doc, 1);
        let before = doc.get_heads();
        let a1 = change_by(&a, &mut doc, 2);
        let b1 = change_by(&b, &mut doc, 3);
        let a2 = change_by(&a, &mut doc, 4);
        let b2 = change_by(&b, &mut doc, 5);
        let new = doc.get_changes(&before);
        let mut tips = author_tips(new.iter());
        tips.sort();
        let mut expected = vec![(a2, a.node_id().actor_id()), (b2, b.node_id().actor_id())];
        expected.sort();
        assert_eq!(tips, expected, "one tip per author");

        let mut offered = offer(&[(a2, sign(&a, &id, &a2)), (b2, sign(&b, &id, &b2))]);
        let kept = check(&id, &mut doc, &before, &mut offered).unwrap();
        assert_eq!(kept.len(), 2);
        assert!(offered.is_empty());
        // Every change signed by itself (as before batching, v1 or v2) is a special case.
        let mut each =
            offer(&[(a1, sign_v1(&a, &a1)), (b1, sign_v1(&b, &b1)), (a2, sign(&a, &id, &a2)), (b2, sign_v1(&b, &b2))]);
        assert_eq!(check(&id, &mut doc, &before, &mut each).unwrap().len(), 4);
        // A's signature covers A's changes only: B's are not A's to vouch for.
        let err = check(&id, &mut doc, &before, &mut offer(&[(a2, sign(&a, &id, &a2))])).unwrap_err();
        assert!(matches!(err, AuthorshipError::Unsigned { hash, .. } if hash == b1 || hash == b2), "{err}");
        // A signature over an earlier change does not cover a later one.
        let err = check(&id, &mut doc, &before, &mut offer(&[(a1, sign(&a, &id, &a1)), (b2, sign(&b, &id, &b2))]))
            .unwrap_err();
        assert!(matches!(err, AuthorshipError::Unsigned { hash, .. } if hash == a2), "{err}");
        // A forged signature among them fails the whole set, even where another covers.
        let mut forged = offer(&[(a2, sign(&a, &id, &a2)), (b2, sign(&b, &id, &b2)), (b1, sign(&a, &id, &b1))]);
        assert!(matches!(
            check(&id, &mut doc, &before, &mut forged),
            Err(AuthorshipError::BadSignature { hash, .. }) if hash == b1
        ));
        // From the empty document, the first change needs covering too.
        let err = check(&id, &mut doc, &[], &mut offer(&[(b2, sign(&b, &id, &b2))])).unwrap_err();
        assert!(matches!(err, AuthorshipError::Unsigned { hash, .. } if hash == first || hash == a1 || hash == a2));
        // Signatures for another document cover nothing here.
        let other = DocId::random();
        let mut wrong_doc = offer(&[(a2, sign(&a, &other, &a2)), (b2, sign(&b, &other, &b2))]);
        assert!(matches!(check(&id, &mut doc, &before, &mut wrong_doc), Err(AuthorshipError::BadSignature { .. })));
    }

    #[test]
    fn one_author_cannot_have_two_branches_so_its_latest_change_is_a_single_tip() {
        // Automerge numbers an actor's changes and refuses two different changes
        // with one number: an author's changes in a document form one chain,
        // each depending on the one before (deps = the heads at commit time).
        let a = NodeKey::generate();
        let mut base = AutoCommit::new();
        change_by(&a, &mut base, 0);
        let before = base.get_heads();
        let mut left = base.fork();
        let mut right = base.fork();
        let l = change_by(&a, &mut left, 1);
        change_by(&a, &mut right, 2);
        assert!(left.merge(&mut right).is_err(), "a second change numbered 2 by the same actor is refused");
        let mut chain = left.fork();
        let next = change_by(&a, &mut chain, 3);
        let deps = chain.get_change_by_hash(&next).unwrap().deps().to_vec();
        assert_eq!(deps, vec![l], "the author's previous change is a parent");
        assert_eq!(author_tips(chain.get_changes(&before).iter()), vec![(next, a.node_id().actor_id())]);
    }

    #[test]
    fn later_changes_of_the_same_author_are_found_nearest_first() {
        let (a, b) = (NodeKey::generate(), NodeKey::generate());
        let mut doc = AutoCommit::new();
        let a1 = change_by(&a, &mut doc, 1);
        change_by(&b, &mut doc, 2);
        let a2 = change_by(&a, &mut doc, 3);
        let a3 = change_by(&a, &mut doc, 4);
        let actor = a.node_id().actor_id();
        assert_eq!(later_by_author(&mut doc, &a1), vec![(a2, actor.clone()), (a3, actor)]);
        assert!(later_by_author(&mut doc, &ChangeHash([7; 32])).is_empty());
    }
}
