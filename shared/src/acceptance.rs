//! What a node or the relay accepts from anyone else: one definition used on
//! every path by which changes arrive (sync at the relay, sync at a node,
//! bundle import, Markdown import of an exported file).
//!
//! A change is acceptable when
//! - its author vouched for it ([`crate::authorship`]: the actor id is the
//!   author's key, and a signature of that key for this document over the
//!   change or a later change of the same author in the document verifies
//!   strictly; one signature per author and message covers a batch);
//! - its author is an enrolled node in the relay-signed enrollment directory
//!   ([`AuthorPolicy`]): at the relay the key must be active *now* (a revoked
//!   key makes no new changes); at a node it must have been enrolled, and may
//!   have been revoked since (the relay accepted its changes while it was active,
//!   and they stay part of every document's history);
//! - it is no larger than [`ContentLimits::max_change_bytes`], and the document
//!   it belongs to stays within [`ContentLimits::max_document_bytes`] (checked by
//!   the store, which knows each document's size, before anything is written).
//!
//! Sizes are counted as the changes' uncompressed encoding (Automerge's
//! `Change::raw_bytes`), which bounds what a sync message carrying them takes,
//! so a stored document can always be forwarded in one frame (see
//! [`ContentLimits::validate`]).
//!
//! This module only computes; the directory and times are passed in.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use automerge::{AutoCommit, Change, ChangeHash};

use crate::authorship::{self, AuthorshipError, ChangeSignature};
use crate::directory::{EnrollmentDirectory, MemberKind};
use crate::identity::NodeId;
use crate::ids::DocId;
use crate::model::{Document, ModelError};
use crate::org::OrgId;
use crate::sync::{check_chunks, MessageCheckError, SyncLimits};

/// Default largest change: 4 MiB. The seed agreement, a long county-wide text,
/// is about 40 KB as one change; pasting a whole book into a body is about 1 MB.
pub const DEFAULT_MAX_CHANGE_BYTES: u64 = 4 * 1024 * 1024;
/// Default largest document, as the sum of its changes: 32 MiB, half the
/// default frame limit so a document sent whole always fits one frame.
pub const DEFAULT_MAX_DOCUMENT_BYTES: u64 = 32 * 1024 * 1024;
/// Room a sync message needs beside its changes (heads, needs, bloom filter).
pub const FRAME_HEADROOM_BYTES: u64 = 1024 * 1024;

/// Size limits on what may be stored, and so forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContentLimits {
    /// Largest single change (uncompressed).
    pub max_change_bytes: u64,
    /// Largest document: the sum of its changes (uncompressed).
    pub max_document_bytes: u64,
}

impl Default for ContentLimits {
    fn default() -> Self {
        Self { max_change_bytes: DEFAULT_MAX_CHANGE_BYTES, max_document_bytes: DEFAULT_MAX_DOCUMENT_BYTES }
    }
}

/// Why limits are not usable together.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitsError {
    /// A limit of zero, or a change limit above the document limit.
    #[error("max_change_bytes ({change}) must be at least 1 and at most max_document_bytes ({document})")]
    Inconsistent {
        /// The change limit.
        change: u64,
        /// The document limit.
        document: u64,
    },
    /// A document at the limit would not fit in one frame.
    #[error("max_document_bytes ({document}) plus {FRAME_HEADROOM_BYTES} bytes of headroom must not exceed max_frame_bytes ({frame}): a stored document could not be forwarded")]
    ExceedsFrame {
        /// The document limit.
        document: u64,
        /// The frame limit.
        frame: u64,
    },
}

/// A change or document over the limits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    /// One change is too large.
    #[error("change {hash} of document {doc} is {size} bytes, more than the limit of {max} bytes per change; nothing was stored")]
    ChangeTooLarge {
        /// The document.
        doc: DocId,
        /// The change.
        hash: ChangeHash,
        /// Its size.
        size: u64,
        /// The limit.
        max: u64,
    },
    /// The document would grow past its limit.
    #[error("document {doc} would grow to {size} bytes of changes, more than the limit of {max} bytes per document; nothing was stored")]
    DocumentTooLarge {
        /// The document.
        doc: DocId,
        /// Its size with the new changes.
        size: u64,
        /// The limit.
        max: u64,
    },
}

impl ContentLimits {
    /// Checks that the limits make sense together and with the frame limit.
    pub fn validate(&self, max_frame_bytes: u64) -> Result<(), LimitsError> {
        if self.max_change_bytes == 0 || self.max_change_bytes > self.max_document_bytes {
            return Err(LimitsError::Inconsistent { change: self.max_change_bytes, document: self.max_document_bytes });
        }
        if self.max_document_bytes.saturating_add(FRAME_HEADROOM_BYTES) > max_frame_bytes {
            return Err(LimitsError::ExceedsFrame { document: self.max_document_bytes, frame: max_frame_bytes });
        }
        Ok(())
    }

    /// Checks the changes new in `doc` since `before` against the limits, given
    /// the document's size before them; returns its size after.
    pub fn check_new_changes(
        &self,
        doc_id: &DocId,
        doc: &mut AutoCommit,
        before: &[ChangeHash],
        size_before: u64,
    ) -> Result<u64, LimitError> {
        self.check_changes(doc_id, &doc.get_changes(before), size_before)
    }

    /// [`Self::check_new_changes`] over `changes` already taken from the
    /// document (the changes new since the size `size_before` was counted).
    pub fn check_changes(&self, doc_id: &DocId, changes: &[Change], size_before: u64) -> Result<u64, LimitError> {
        let mut size = size_before;
        for change in changes {
            let change_size = change.raw_bytes().len() as u64;
            if change_size > self.max_change_bytes {
                return Err(LimitError::ChangeTooLarge {
                    doc: doc_id.clone(),
                    hash: change.hash(),
                    size: change_size,
                    max: self.max_change_bytes,
                });
            }
            size = size.saturating_add(change_size);
        }
        if size > self.max_document_bytes {
            return Err(LimitError::DocumentTooLarge { doc: doc_id.clone(), size, max: self.max_document_bytes });
        }
        Ok(size)
    }
}

/// The size of a whole document as [`ContentLimits`] counts it.
pub fn document_size(doc: &mut AutoCommit) -> u64 {
    doc.get_changes(&[]).iter().map(|c| c.raw_bytes().len() as u64).sum()
}

/// Which authors' changes are accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthorRule {
    /// The author must be an active (not revoked) node now: the relay's rule
    /// for changes it has not stored yet.
    ActiveNode,
    /// The author must be an enrolled node, possibly revoked since: a node's
    /// rule (the relay vouched for the change while the author was active).
    EnrolledNode,
    /// Any author whose signature verifies: only for in-memory harnesses
    /// (tests, benchmarks, fuzzing) that model no enrollment. The node and the
    /// relay never use it.
    AnySigned,
}

/// The authors a receiver accepts: a relay-signed directory and a rule.
#[derive(Debug, Clone)]
pub struct AuthorPolicy {
    directory: Arc<EnrollmentDirectory>,
    rule: AuthorRule,
}

impl AuthorPolicy {
    /// A policy over `directory` with `rule`.
    pub fn new(directory: Arc<EnrollmentDirectory>, rule: AuthorRule) -> Self {
        Self { directory, rule }
    }

    /// Accepts every correctly signed change ([`AuthorRule::AnySigned`]): for
    /// in-memory harnesses only.
    pub fn any_signed_author() -> Self {
        Self { directory: Arc::default(), rule: AuthorRule::AnySigned }
    }

    /// The directory the policy checks against.
    pub fn directory(&self) -> &EnrollmentDirectory {
        &self.directory
    }

    /// Whether `author` may have written `hash`.
    pub fn check(&self, hash: &ChangeHash, author: &NodeId) -> Result<(), AuthorshipError> {
        if self.rule == AuthorRule::AnySigned {
            return Ok(());
        }
        let refused = |reason: String| AuthorshipError::NotAccepted { hash: *hash, author: author.short(), reason };
        let Some(member) = self.directory.latest(author) else {
            return Err(refused(if self.directory.members.is_empty() {
                "this side holds no enrollment directory from its relay yet (sync with the relay first)".into()
            } else {
                "the author's key is not enrolled at this relay".into()
            }));
        };
        if member.kind != MemberKind::Node {
            return Err(refused(format!("the key is enrolled as a signer ({}), not as a node", member.name)));
        }
        if self.rule == AuthorRule::ActiveNode && !member.is_active() {
            let at = member.revoked_at.map(|t| t.to_rfc3339()).unwrap_or_default();
            return Err(refused(format!("the author ({}, {}) was revoked at {at}", member.name, member.org)));
        }
        Ok(())
    }
}

/// Checks every change of document `doc_id` (`doc`) that is not below
/// `before`: covered by a signature of its author (taking the signatures of
/// new changes out of `offered`; see [`crate::authorship`]) and written by an
/// author `authors` accepts. Returns the verified signatures to keep; the
/// caller must discard the document's new state if this fails.
///
/// The signatures left in `offered` are then dropped too, unless Automerge
/// holds changes of `doc` back until their dependencies arrive (a sync
/// message may carry a change without a parent it wrongly believed the
/// receiver had): those changes are applied later and need theirs then.
pub fn accept_new_changes(
    doc_id: &DocId,
    doc: &mut AutoCommit,
    before: &[ChangeHash],
    offered: &mut HashMap<ChangeHash, ChangeSignature>,
    authors: &AuthorPolicy,
) -> Result<Vec<(ChangeHash, ChangeSignature)>, AuthorshipError> {
    // Every new change is covered by a verified signature of its author, so
    // checking the signers checks every new change's author.
    let verified =
        authorship::verify_new_changes(doc_id, doc, before, offered, |hash, author| authors.check(hash, author))?;
    if !offered.is_empty() && doc.get_missing_deps(&[]).is_empty() {
        offered.clear();
    }
    Ok(verified)
}

/// Why one document of an offline bundle was refused.
#[derive(Debug, thiserror::Error)]
pub enum BundleDocError {
    /// The bytes are not acceptable Automerge data (malformed, a deflate bomb, a change over the limit).
    #[error("its data was refused before reading: {0}")]
    Check(#[from] MessageCheckError),
    /// Automerge could not load the data.
    #[error("its data does not load: {0}")]
    Automerge(String),
    /// Automerge panicked on the data.
    #[error("its data made the document library fail; nothing was stored")]
    Panicked,
    /// The result is not a readable Samverkan document.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// A change is unsigned, forged, or by an author not accepted.
    #[error(transparent)]
    Authorship(#[from] AuthorshipError),
    /// The document is not shared with the importing node's organisation.
    #[error("it is not shared with this node's organisation ({0}); nothing was stored")]
    NotAParty(OrgId),
}

/// What applying one bundle document did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppliedBundleDoc {
    /// The verified signatures of the new changes, to store with them.
    pub signatures: Vec<(ChangeHash, ChangeSignature)>,
    /// Changes held back because changes they depend on are missing.
    pub missing_deps: usize,
}

/// Applies one document of an offline bundle to `doc` with the checks sync
/// applies: the bytes are checked like a sync message's changes (`limits`:
/// bounded inflation, change size) before Automerge loads them under panic
/// isolation, the result must be a readable document whose parties include
/// `org`, and every new change must be covered by a signature of its author
/// (for this document), an author `authors` accepts.
/// On error the caller must discard `doc` (the store's transaction does).
pub fn apply_bundle_doc(
    doc: &mut Document,
    data: &[u8],
    signatures: &[(ChangeHash, ChangeSignature)],
    authors: &AuthorPolicy,
    limits: &SyncLimits,
    org: &OrgId,
) -> Result<AppliedBundleDoc, BundleDocError> {
    check_chunks(data, limits)?;
    let before = doc.heads();
    let loaded = catch_unwind(AssertUnwindSafe(|| doc.automerge_mut().load_incremental(data)));
    match loaded {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return Err(BundleDocError::Automerge(e.to_string())),
        Err(_panic) => return Err(BundleDocError::Panicked),
    }
    if doc.heads() == before {
        return Ok(AppliedBundleDoc { signatures: Vec::new(), missing_deps: missing_deps(doc) });
    }
    doc.check_header()?;
    if !doc.parties()?.contains(org) {
        return Err(BundleDocError::NotAParty(org.clone()));
    }
    let mut offered: HashMap<_, _> = signatures.iter().copied().collect();
    let id = doc.id().clone();
    let signatures = accept_new_changes(&id, doc.automerge_mut(), &before, &mut offered, authors)?;
    Ok(AppliedBundleDoc { signatures, missing_deps: missing_deps(doc) })
}

fn missing_deps(doc: &mut Document) -> usize {
    doc.automerge_mut().get_missing_deps(&[]).len()
}

#[cfg(test)]
mod tests {
    use automerge::transaction::Transactable;
    use chrono::Utc;

    use super::*;
    use crate::directory::Member;
    use crate::identity::NodeKey;

    fn member(key: &NodeKey, kind: MemberKind) -> Member {
        Member {
            key: key.node_id(),
            kind,
            org: OrgId::new("flen").unwrap(),
            name: "Flen".into(),
            role: (kind == MemberKind::Signer).then(|| "Kommundirektör".into()),
            enrolled_at: Utc::now(),
            revoked_at: None,
        }
    }

    fn change_by(key: &NodeKey, doc: &mut AutoCommit, value: &str) -> (ChangeHash, ChangeSignature) {
        doc.set_actor(key.node_id().actor_id());
        doc.put(automerge::ROOT, "x", value).unwrap();
        let hash = doc.commit().unwrap();
        (hash, authorship::sign(key, &test_doc(), &hash))
    }

    /// The document id the unit tests sign for.
    fn test_doc() -> DocId {
        static ID: std::sync::OnceLock<DocId> = std::sync::OnceLock::new();
        ID.get_or_init(DocId::random).clone()
    }

    #[test]
    fn only_enrolled_nodes_are_accepted_and_revoked_ones_only_by_nodes() {
        let (node, signer, stranger, revoked) =
            (NodeKey::generate(), NodeKey::generate(), NodeKey::generate(), NodeKey::generate());
        let mut directory = EnrollmentDirectory::default();
        directory.enroll(member(&node, MemberKind::Node)).unwrap();
        directory.enroll(member(&signer, MemberKind::Signer)).unwrap();
        directory.enroll(member(&revoked, MemberKind::Node)).unwrap();
        directory.revoke(&revoked.node_id(), Utc::now()).unwrap();
        let directory = Arc::new(directory);
        let relay = AuthorPolicy::new(directory.clone(), AuthorRule::ActiveNode);
        let nodes = AuthorPolicy::new(directory, AuthorRule::EnrolledNode);
        let hash = ChangeHash([1; 32]);
        assert!(relay.check(&hash, &node.node_id()).is_ok());
        assert!(nodes.check(&hash, &node.node_id()).is_ok());
        for policy in [&relay, &nodes] {
            assert!(policy.check(&hash, &stranger.node_id()).unwrap_err().to_string().contains("not enrolled"));
            assert!(policy.check(&hash, &signer.node_id()).unwrap_err().to_string().contains("signer"));
        }
        assert!(relay.check(&hash, &revoked.node_id()).unwrap_err().to_string().contains("revoked"));
        assert!(nodes.check(&hash, &revoked.node_id()).is_ok());
        let empty = AuthorPolicy::new(Arc::default(), AuthorRule::EnrolledNode);
        assert!(empty.check(&hash, &node.node_id()).unwrap_err().to_string().contains("no enrollment directory"));
    }

    #[test]
    fn a_signed_change_by_an_unenrolled_author_is_refused() {
        let (node, stranger) = (NodeKey::generate(), NodeKey::generate());
        let mut directory = EnrollmentDirectory::default();
        directory.enroll(member(&node, MemberKind::Node)).unwrap();
        let policy = AuthorPolicy::new(Arc::new(directory), AuthorRule::EnrolledNode);
        let mut doc = AutoCommit::new();
        let own = change_by(&node, &mut doc, "a");
        let mut offered: HashMap<_, _> = [own].into();
        assert_eq!(accept_new_changes(&test_doc(), &mut doc, &[], &mut offered, &policy).unwrap().len(), 1);
        let before = doc.get_heads();
        let theirs = change_by(&stranger, &mut doc, "b");
        let err = accept_new_changes(&test_doc(), &mut doc, &before, &mut [theirs].into(), &policy).unwrap_err();
        assert!(matches!(err, AuthorshipError::NotAccepted { .. }), "{err}");
    }

    #[test]
    fn limits_count_each_change_and_the_whole_document() {
        let key = NodeKey::generate();
        let id = DocId::random();
        let mut doc = AutoCommit::new();
        change_by(&key, &mut doc, &"x".repeat(2000));
        let size = document_size(&mut doc);
        assert!(size > 2000);
        let limits = ContentLimits { max_change_bytes: 1000, max_document_bytes: 10_000 };
        assert!(matches!(limits.check_new_changes(&id, &mut doc, &[], 0), Err(LimitError::ChangeTooLarge { .. })));
        let limits = ContentLimits { max_change_bytes: 5000, max_document_bytes: 5000 };
        assert_eq!(limits.check_new_changes(&id, &mut doc, &[], 0), Ok(size));
        assert!(matches!(limits.check_new_changes(&id, &mut doc, &[], 4000), Err(LimitError::DocumentTooLarge { .. })));
        assert!(ContentLimits::default().validate(64 * 1024 * 1024).is_ok());
        assert!(ContentLimits::default().validate(32 * 1024 * 1024).is_err());
        assert!(ContentLimits { max_change_bytes: 10, max_document_bytes: 5 }.validate(u64::MAX).is_err());
    }
}
