//! Authorship of changes: every Automerge change is signed by its author.
//!
//! A change's actor id is its author's node key ([`crate::identity`]); the
//! author signs the change's hash (SHA-256 of its bytes) under a fixed context
//! string. Signatures travel beside the changes (the `Authors` wire frame,
//! bundles) and are kept by every receiver, so anyone can check offline that
//! a change was made by the key it names, whoever carried it. A change whose
//! signature is missing or does not verify strictly is refused.
//!
//! This module only computes; keeping signatures is the store's job.

use std::collections::HashMap;

use automerge::{ActorId, AutoCommit, ChangeHash};
use ed25519_dalek::{Signature, Signer};

use crate::identity::{NodeId, NodeKey};

/// Domain separation for change signatures.
const CONTEXT: &[u8] = b"samverkan-change-v1\0";

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
    /// No signature came with the change.
    #[error("change {hash} by {author} came without its author's signature")]
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

fn message(hash: &ChangeHash) -> Vec<u8> {
    let mut out = CONTEXT.to_vec();
    out.extend_from_slice(hash.as_ref());
    out
}

/// Signs a change made by `key`.
pub fn sign(key: &NodeKey, hash: &ChangeHash) -> ChangeSignature {
    key.signing_key().sign(&message(hash)).to_bytes()
}

/// Verifies that `signature` is the signature of the key named by `actor` over `hash`.
pub fn verify(hash: &ChangeHash, actor: &ActorId, signature: &ChangeSignature) -> Result<NodeId, AuthorshipError> {
    let author = NodeId::from_actor(actor)
        .ok_or_else(|| AuthorshipError::NotAKey { hash: *hash, actor: actor.to_hex_string() })?;
    author
        .verifying_key()
        .verify_strict(&message(hash), &Signature::from_bytes(signature))
        .map_err(|_| AuthorshipError::BadSignature { hash: *hash, author: author.short() })?;
    Ok(author)
}

/// Checks every change of `doc` that is not below `before` against the
/// signatures offered (taking the used ones out of `offered`), and returns the
/// verified signatures to keep. The caller must discard the document's new
/// state if this fails.
pub fn verify_new_changes(
    doc: &mut AutoCommit,
    before: &[ChangeHash],
    offered: &mut HashMap<ChangeHash, ChangeSignature>,
) -> Result<Vec<(ChangeHash, ChangeSignature)>, AuthorshipError> {
    let mut verified = Vec::new();
    for change in doc.get_changes(before) {
        let hash = change.hash();
        let Some(signature) = offered.remove(&hash) else {
            let author = NodeId::from_actor(change.actor_id())
                .map(|n| n.short())
                .unwrap_or_else(|| change.actor_id().to_hex_string());
            return Err(AuthorshipError::Unsigned { hash, author });
        };
        verify(&hash, change.actor_id(), &signature)?;
        verified.push((hash, signature));
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

    #[test]
    fn only_the_named_author_can_sign_a_change() {
        let (author, other) = (NodeKey::generate(), NodeKey::generate());
        let mut doc = AutoCommit::new();
        let hash = change_by(&author, &mut doc, 1);
        let actor = author.node_id().actor_id();
        assert_eq!(verify(&hash, &actor, &sign(&author, &hash)).unwrap(), author.node_id());
        assert!(matches!(verify(&hash, &actor, &sign(&other, &hash)), Err(AuthorshipError::BadSignature { .. })));
        let moved = change_by(&author, &mut doc, 2);
        assert!(verify(&moved, &actor, &sign(&author, &hash)).is_err(), "a signature cannot move to another change");
        assert!(matches!(
            verify(&hash, &ActorId::from(vec![1u8, 2, 3]), &sign(&author, &hash)),
            Err(AuthorshipError::NotAKey { .. })
        ));
    }

    #[test]
    fn new_changes_need_a_signature_each() {
        let (a, b) = (NodeKey::generate(), NodeKey::generate());
        let mut doc = AutoCommit::new();
        let first = change_by(&a, &mut doc, 1);
        let before = doc.get_heads();
        let second = change_by(&b, &mut doc, 2);
        let third = change_by(&a, &mut doc, 3);
        let mut offered: HashMap<_, _> = [(second, sign(&b, &second)), (third, sign(&a, &third))].into();
        let kept = verify_new_changes(&mut doc, &before, &mut offered).unwrap();
        assert_eq!(kept.len(), 2);
        assert!(offered.is_empty());
        let mut offered: HashMap<_, _> = [(second, sign(&a, &second))].into();
        assert!(verify_new_changes(&mut doc, &before, &mut offered).is_err());
        assert!(matches!(
            verify_new_changes(&mut doc, &[], &mut [(second, sign(&b, &second))].into()),
            Err(AuthorshipError::Unsigned { hash, .. }) if hash == first || hash == third
        ));
    }
}
