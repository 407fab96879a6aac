//! The in-memory [`DocAccess`] driver: documents in a map, the signatures of
//! their changes beside them, for tests, benchmark baselines and fuzzing. It
//! never persists anything and does no I/O.
//!
//! It keeps the rules of the real drivers (the node's `NodeDocs`, the relay's
//! `RelayDocs`), never weaker: every change the peer sends goes through
//! [`crate::acceptance::accept_new_changes`] with the [`AuthorPolicy`] given
//! here (the connection calls it inside [`DocAccess::with_doc`]); what a
//! closure discards, or a rule refuses, is rolled back as a store transaction
//! would be; a new document exists only once something was kept. Optional
//! rules, each as the real drivers have it: access by parties
//! ([`Access::Party`]: the peer sees the documents naming its organisation, and
//! a new document must name it), documents hidden from the peer
//! ([`MemoryDocs::hide`]), and size limits ([`ContentLimits`]). It models no
//! approval checks of its own (the relay's `check_new_records`) and no
//! held-back documents.
//!
//! [`SharedMemoryDocs`] is one set of documents behind a lock, for several
//! connections that share one copy (the scale benchmark's idle nodes).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

use automerge::{ActorId, AutoCommit, AutomergeError, ChangeHash};

use super::connection::{DocAccess, DocOutcome, MemoryAccess, SignedChange};
use super::whole::{document_tips, increment_tips, StoredWhole};
use super::SyncMemo;
use crate::acceptance::{document_size, AuthorPolicy, ContentLimits, LimitError};
use crate::authorship::ChangeSignature;
use crate::ids::DocId;
use crate::model::{self, Document, ModelError};
use crate::org::OrgId;
use crate::wire::{ReceiptEntry, RefusalKind};

/// Signs a change of a document for its author, if this side holds the author's key.
pub type Signer = Arc<dyn Fn(&DocId, &ChangeHash, &ActorId) -> Option<ChangeSignature> + Send + Sync>;

/// Which documents the peer may see and send.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Access {
    /// Every document held (except hidden ones), and any new one.
    #[default]
    All,
    /// As the relay serves a node of this organisation: documents whose
    /// parties name it; a new document is kept only if it names it.
    Party(OrgId),
}

/// Why [`MemoryDocs`] did not keep what a closure did.
#[derive(Debug, thiserror::Error)]
pub enum MemoryDocsError {
    /// A new document that does not name the peer's organisation among its parties.
    #[error("document {doc} does not name the organisation {org} among its parties; it was not kept")]
    NotAParty {
        /// The document.
        doc: DocId,
        /// The peer's organisation.
        org: OrgId,
    },
    /// A new document whose parties cannot be read.
    #[error("document {doc} is not a readable Samverkan document ({source}); it was not kept")]
    Unreadable {
        /// The document.
        doc: DocId,
        /// Why (boxed: model errors are large).
        source: Box<ModelError>,
    },
    /// A change or the document is over the size limits.
    #[error(transparent)]
    TooLarge(#[from] LimitError),
    /// Discarded changes could not be rolled back (a broken document).
    #[error("document {doc} could not be rolled back: {source}")]
    RollBack {
        /// The document.
        doc: DocId,
        /// Automerge's error (boxed: it is large).
        source: Box<AutomergeError>,
    },
}

/// Documents in memory, with the signatures of their changes and (as on the
/// relay) approval receipts; see the [module documentation](self).
#[derive(Clone)]
pub struct MemoryDocs {
    docs: BTreeMap<DocId, Document>,
    signatures: HashMap<ChangeHash, ChangeSignature>,
    receipts: BTreeMap<DocId, Vec<ReceiptEntry>>,
    hidden: BTreeSet<DocId>,
    authors: AuthorPolicy,
    access: Access,
    limits: Option<ContentLimits>,
    signer: Option<Signer>,
    memo: Option<Arc<SyncMemo>>,
    whole_sends: bool,
}

impl Default for MemoryDocs {
    fn default() -> Self {
        Self {
            docs: BTreeMap::new(),
            signatures: HashMap::new(),
            receipts: BTreeMap::new(),
            hidden: BTreeSet::new(),
            authors: AuthorPolicy::any_signed_author(),
            access: Access::All,
            limits: None,
            signer: None,
            memo: None,
            whole_sends: false,
        }
    }
}

impl fmt::Debug for MemoryDocs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryDocs")
            .field("docs", &self.docs.keys().collect::<Vec<_>>())
            .field("signatures", &self.signatures.len())
            .field("access", &self.access)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl MemoryDocs {
    /// No documents; accepts any correctly signed author
    /// ([`AuthorPolicy::any_signed_author`]), every document shared, no limits.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whose changes are accepted (an enrollment directory and a rule, as the real drivers).
    pub fn with_authors(mut self, authors: AuthorPolicy) -> Self {
        self.authors = authors;
        self
    }

    /// Which documents the peer may see and send.
    pub fn with_access(mut self, access: Access) -> Self {
        self.access = access;
        self
    }

    /// Size limits checked before anything is kept, as the store checks them.
    pub fn with_limits(mut self, limits: ContentLimits) -> Self {
        self.limits = Some(limits);
        self
    }

    /// Shares sync steps worked out from memory among the connections using
    /// these documents, as the relay does ([`SyncMemo`]).
    pub fn with_sync_memo(mut self, memo: Arc<SyncMemo>) -> Self {
        self.memo = Some(memo);
        self
    }

    /// Offers documents the peer has none of whole, as the relay's store does
    /// ([`DocAccess::stored_whole`]): the bytes a store would hold (a snapshot
    /// of the first half of the changes, the rest as one increment row).
    pub fn with_whole_sends(mut self) -> Self {
        self.whole_sends = true;
        self
    }

    /// How this side signs changes it has no stored signature for (its own, as
    /// a node signs its changes on the spot).
    pub fn with_signer(
        mut self,
        signer: impl Fn(&DocId, &ChangeHash, &ActorId) -> Option<ChangeSignature> + Send + Sync + 'static,
    ) -> Self {
        self.signer = Some(Arc::new(signer));
        self
    }

    /// Holds `doc` (replacing any copy), as if stored locally; it need not
    /// follow the schema.
    pub fn insert(&mut self, id: DocId, doc: AutoCommit) {
        self.docs.insert(id.clone(), Document::unchecked(id, doc));
    }

    /// Holds a model document (replacing any copy).
    pub fn insert_document(&mut self, doc: Document) {
        self.docs.insert(doc.id().clone(), doc);
    }

    /// A document held (shared with the peer or not).
    pub fn get(&self, id: &DocId) -> Option<&AutoCommit> {
        self.docs.get(id).map(Document::automerge)
    }

    /// A document held, for local edits (tell the connection with `on_local_change`).
    pub fn get_mut(&mut self, id: &DocId) -> Option<&mut AutoCommit> {
        self.docs.get_mut(id).map(Document::automerge_mut)
    }

    /// A document held, for edits through the model ([`Document::edit`]);
    /// `None` if it is not held or its header is not a readable document's.
    pub fn document_mut(&mut self, id: &DocId) -> Option<&mut Document> {
        self.docs.get_mut(id).filter(|d| d.check_header().is_ok())
    }

    /// The ids of the documents held.
    pub fn ids(&self) -> impl Iterator<Item = &DocId> {
        self.docs.keys()
    }

    /// Heads of a held document (empty if it is not held).
    pub fn heads_of(&mut self, id: &DocId) -> Vec<ChangeHash> {
        self.docs.get_mut(id).map(Document::heads).unwrap_or_default()
    }

    /// The signatures kept (received with changes, or put here).
    pub fn kept_signatures(&self) -> &HashMap<ChangeHash, ChangeSignature> {
        &self.signatures
    }

    /// Keeps a signature of a change, as if received with it.
    pub fn keep_signature(&mut self, hash: ChangeHash, signature: ChangeSignature) {
        self.signatures.insert(hash, signature);
    }

    /// Adds an approval receipt of `doc` to give the peer (as the relay does).
    pub fn add_receipt(&mut self, doc: DocId, receipt: ReceiptEntry) {
        self.receipts.entry(doc).or_default().push(receipt);
    }

    /// Holds `doc` back from the peer: not offered, and a message about it is
    /// refused as not shared.
    pub fn hide(&mut self, doc: DocId) {
        self.hidden.insert(doc);
    }

    /// Into one copy that several connections share ([`SharedMemoryDocs`]).
    pub fn into_shared(self) -> SharedMemoryDocs {
        SharedMemoryDocs(Arc::new(Mutex::new(self)))
    }

    /// Whether the peer may see `id` (held, not hidden, and a party to it under [`Access::Party`]).
    fn visible(&self, id: &DocId) -> bool {
        if self.hidden.contains(id) {
            return false;
        }
        match (&self.access, self.docs.get(id)) {
            (Access::Party(org), Some(doc)) => model::parties_of(id, doc.automerge()).is_ok_and(|p| p.contains(org)),
            _ => true,
        }
    }

    /// Forgets what a closure did to `id`: back to `before` (a new document is dropped).
    fn roll_back(&mut self, id: &DocId, before: &[ChangeHash], is_new: bool) -> Result<(), MemoryDocsError> {
        if is_new {
            self.docs.remove(id);
            return Ok(());
        }
        let Some(doc) = self.docs.get_mut(id).map(Document::automerge_mut) else { return Ok(()) };
        if doc.get_heads() != before {
            let actor = doc.get_actor().clone();
            let mut restored = doc
                .fork_at(before)
                .map_err(|source| MemoryDocsError::RollBack { doc: id.clone(), source: Box::new(source) })?;
            restored.set_actor(actor);
            *doc = restored;
        }
        Ok(())
    }
}

impl DocAccess for MemoryDocs {
    type Error = MemoryDocsError;

    fn sync_memo(&self) -> Option<Arc<SyncMemo>> {
        self.memo.clone()
    }

    fn shared_heads(&mut self) -> Result<Vec<(DocId, Vec<ChangeHash>)>, MemoryDocsError> {
        let ids: Vec<DocId> = self.docs.keys().filter(|id| self.visible(id)).cloned().collect();
        Ok(ids
            .into_iter()
            .filter_map(|id| {
                let heads = self.docs.get_mut(&id)?.heads();
                (!heads.is_empty()).then_some((id, heads))
            })
            .collect())
    }

    fn may_receive(&mut self, doc: &DocId) -> bool {
        self.visible(doc)
    }

    fn authors(&mut self) -> AuthorPolicy {
        self.authors.clone()
    }

    fn with_doc<R>(
        &mut self,
        doc: &DocId,
        create: bool,
        f: impl FnOnce(&mut AutoCommit) -> DocOutcome<R>,
    ) -> Result<Option<R>, MemoryDocsError> {
        if !self.visible(doc) {
            return Ok(None);
        }
        let is_new = !self.docs.contains_key(doc);
        if is_new && !create {
            return Ok(None);
        }
        if is_new {
            self.docs.insert(doc.clone(), Document::unchecked(doc.clone(), AutoCommit::new()));
        }
        // Changed in place (no copy per call); rolled back on discard or refusal.
        let Some(held) = self.docs.get_mut(doc).map(Document::automerge_mut) else { return Ok(None) };
        let before = held.get_heads();
        match f(held) {
            DocOutcome::Keep { value, signatures, .. } => {
                if let Err(e) = check_kept(&self.access, self.limits.as_ref(), doc, held, &before, is_new) {
                    self.roll_back(doc, &before, is_new)?;
                    return Err(e);
                }
                if is_new && held.get_heads().is_empty() && held.get_missing_deps(&[]).is_empty() {
                    // Like a store: a document with no changes is not kept (one
                    // whose changes wait for their parents is).
                    self.docs.remove(doc);
                }
                self.signatures.extend(signatures);
                Ok(Some(value))
            }
            DocOutcome::Discard(value) => {
                self.roll_back(doc, &before, is_new)?;
                Ok(Some(value))
            }
        }
    }

    fn signatures(
        &mut self,
        doc: &DocId,
        changes: &[(ChangeHash, ActorId)],
    ) -> Result<Vec<SignedChange>, MemoryDocsError> {
        Ok(changes
            .iter()
            .filter_map(|(hash, actor)| match self.signatures.get(hash) {
                Some(signature) => Some((*hash, *signature)),
                None => self.signer.as_ref().and_then(|sign| sign(doc, hash, actor)).map(|s| (*hash, s)),
            })
            .collect())
    }

    fn heads(&mut self, doc: &DocId) -> Result<Option<Vec<ChangeHash>>, MemoryDocsError> {
        if !self.visible(doc) {
            return Ok(None);
        }
        Ok(self.docs.get_mut(doc).map(Document::heads))
    }

    fn stored_whole(&mut self, id: &DocId) -> Result<Option<StoredWhole>, MemoryDocsError> {
        if !self.whole_sends || !self.visible(id) {
            return Ok(None);
        }
        let Some(doc) = self.docs.get_mut(id).map(Document::automerge_mut) else { return Ok(None) };
        let changes = doc.get_changes_meta(&[]).iter().map(|c| c.hash).collect::<Vec<_>>();
        let Some(middle) = changes.get(changes.len() / 2) else { return Ok(None) };
        let snapshot = doc
            .fork_at(&[*middle])
            .map_err(|source| MemoryDocsError::RollBack { doc: id.clone(), source: Box::new(source) })?;
        let mut snapshot = snapshot;
        let mut tips = document_tips(&mut snapshot);
        let increment: Vec<u8> =
            doc.get_changes(&snapshot.get_heads()).iter().flat_map(|c| c.raw_bytes().to_vec()).collect();
        let mut chunks = vec![snapshot.save()];
        if !increment.is_empty() {
            tips.extend(increment_tips([increment.as_slice()]).unwrap_or_default());
            chunks.push(increment);
        }
        Ok(Some(StoredWhole { heads: doc.get_heads(), chunks, tips }))
    }

    fn receipts(&mut self, doc: &DocId) -> Result<Vec<ReceiptEntry>, MemoryDocsError> {
        if !self.visible(doc) {
            return Ok(Vec::new());
        }
        Ok(self.receipts.get(doc).cloned().unwrap_or_default())
    }

    fn refusal(&self, error: &MemoryDocsError) -> Option<(RefusalKind, String)> {
        let kind = match error {
            MemoryDocsError::NotAParty { .. } => RefusalKind::NotShared,
            MemoryDocsError::Unreadable { .. } => RefusalKind::Malformed,
            MemoryDocsError::TooLarge(_) => RefusalKind::TooLarge,
            MemoryDocsError::RollBack { .. } => return None,
        };
        Some((kind, error.to_string()))
    }
}

/// The rules a kept document must meet beyond its changes' acceptance: under
/// [`Access::Party`] a new document names the peer's organisation; the size limits.
fn check_kept(
    access: &Access,
    limits: Option<&ContentLimits>,
    id: &DocId,
    doc: &mut AutoCommit,
    before: &[ChangeHash],
    is_new: bool,
) -> Result<(), MemoryDocsError> {
    if let (Access::Party(org), true) = (access, is_new && !doc.get_heads().is_empty()) {
        let parties = model::parties_of(id, doc)
            .map_err(|source| MemoryDocsError::Unreadable { doc: id.clone(), source: Box::new(source) })?;
        if !parties.contains(org) {
            return Err(MemoryDocsError::NotAParty { doc: id.clone(), org: org.clone() });
        }
    }
    if let Some(limits) = limits {
        let added: u64 = doc.get_changes(before).iter().map(|c| c.raw_bytes().len() as u64).sum();
        let size_before = document_size(doc).saturating_sub(added);
        limits.check_new_changes(id, doc, before, size_before)?;
    }
    Ok(())
}

/// Everything here is in memory: each answer is the [`DocAccess`] one.
impl MemoryAccess for MemoryDocs {
    fn try_loaded_doc<R>(&mut self, doc: &DocId, f: impl FnOnce(&mut AutoCommit) -> R) -> Option<R> {
        self.with_doc(doc, false, |d| DocOutcome::keep(f(d))).ok().flatten()
    }

    fn try_signatures(&mut self, doc: &DocId, changes: &[(ChangeHash, ActorId)]) -> Option<Vec<SignedChange>> {
        self.signatures(doc, changes).ok()
    }

    fn try_receipts(&mut self, doc: &DocId) -> Option<Vec<ReceiptEntry>> {
        self.receipts(doc).ok()
    }

    fn try_absent(&mut self, doc: &DocId) -> Option<bool> {
        Some(!self.docs.contains_key(doc) && self.visible(doc))
    }
}

/// One [`MemoryDocs`] behind a lock, for several connections sharing one copy
/// of the documents (cloning the handle shares it).
#[derive(Debug, Clone, Default)]
pub struct SharedMemoryDocs(Arc<Mutex<MemoryDocs>>);

impl SharedMemoryDocs {
    /// The documents, locked (a poisoned lock is taken over: the documents are
    /// only ever changed whole, through [`DocAccess::with_doc`] or local edits).
    pub fn lock(&self) -> MutexGuard<'_, MemoryDocs> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl DocAccess for SharedMemoryDocs {
    type Error = MemoryDocsError;

    fn shared_heads(&mut self) -> Result<Vec<(DocId, Vec<ChangeHash>)>, MemoryDocsError> {
        self.lock().shared_heads()
    }

    fn may_receive(&mut self, doc: &DocId) -> bool {
        self.lock().may_receive(doc)
    }

    fn authors(&mut self) -> AuthorPolicy {
        self.lock().authors()
    }

    fn with_doc<R>(
        &mut self,
        doc: &DocId,
        create: bool,
        f: impl FnOnce(&mut AutoCommit) -> DocOutcome<R>,
    ) -> Result<Option<R>, MemoryDocsError> {
        self.lock().with_doc(doc, create, f)
    }

    fn signatures(
        &mut self,
        doc: &DocId,
        changes: &[(ChangeHash, ActorId)],
    ) -> Result<Vec<SignedChange>, MemoryDocsError> {
        self.lock().signatures(doc, changes)
    }

    fn heads(&mut self, doc: &DocId) -> Result<Option<Vec<ChangeHash>>, MemoryDocsError> {
        self.lock().heads(doc)
    }

    fn stored_whole(&mut self, doc: &DocId) -> Result<Option<StoredWhole>, MemoryDocsError> {
        self.lock().stored_whole(doc)
    }

    fn receipts(&mut self, doc: &DocId) -> Result<Vec<ReceiptEntry>, MemoryDocsError> {
        self.lock().receipts(doc)
    }

    fn refusal(&self, error: &MemoryDocsError) -> Option<(RefusalKind, String)> {
        self.lock().refusal(error)
    }
}

#[cfg(test)]
mod tests {
    use automerge::transaction::Transactable;

    use super::*;
    use crate::identity::NodeKey;
    use crate::model::{DocKind, DocumentContent, EditContext};
    use crate::org::Directory;

    /// A model document of `org` written by `key`.
    fn document_of(key: &NodeKey, org: &str) -> Document {
        let directory = Directory::sodermanland();
        let org = OrgId::new(org).unwrap();
        let ctx =
            EditContext { author: key.node_id(), org: org.clone(), node_name: "test".into(), time: chrono::Utc::now() };
        let mut content = DocumentContent::new(DocKind::OperationsPlan, "Plan");
        content.parties = vec![org];
        Document::create(DocId::random(), content, &ctx, &directory).unwrap()
    }

    /// One change setting `x` to `value`.
    fn write(d: &mut AutoCommit, value: &str) {
        d.put(automerge::ROOT, "x", value).unwrap();
        d.commit();
    }

    /// Writes `value` to `id` through the driver; `keep` or discard.
    fn change<D: DocAccess>(docs: &mut D, id: &DocId, value: &str, keep: bool) -> Result<Option<()>, D::Error> {
        docs.with_doc(id, true, |d| {
            write(d, value);
            if keep {
                DocOutcome::keep(())
            } else {
                DocOutcome::Discard(())
            }
        })
    }

    #[test]
    fn a_discarded_change_is_rolled_back_with_the_documents_actor_and_a_new_document_is_not_kept() {
        let mut docs = MemoryDocs::new();
        let key = NodeKey::generate();
        let doc = document_of(&key, "flen-kommun");
        let id = doc.id().clone();
        docs.insert_document(doc);
        let before = docs.heads_of(&id);
        change(&mut docs, &id, "bortkastad", false).unwrap();
        assert_eq!(docs.heads_of(&id), before);
        assert_eq!(docs.get(&id).unwrap().get_actor(), &key.node_id().actor_id(), "the actor is kept");

        let new = DocId::random();
        change(&mut docs, &new, "ny", false).unwrap();
        docs.with_doc(&new, true, |_| DocOutcome::keep(())).unwrap();
        assert!(docs.get(&new).is_none(), "neither a discarded nor an empty new document is kept");
        assert_eq!(docs.shared_heads().unwrap().len(), 1);
    }

    #[test]
    fn under_access_by_party_the_peer_sees_and_sends_only_documents_naming_its_organisation() {
        let key = NodeKey::generate();
        let flen = OrgId::new("flen-kommun").unwrap();
        let mut docs = MemoryDocs::new().with_access(Access::Party(flen));
        let (ours, theirs) = (document_of(&key, "flen-kommun"), document_of(&key, "trosa-kommun"));
        let (ours_id, theirs_id) = (ours.id().clone(), theirs.id().clone());
        docs.insert_document(ours);
        docs.insert_document(theirs.clone());
        assert_eq!(docs.shared_heads().unwrap().iter().map(|(id, _)| id).collect::<Vec<_>>(), vec![&ours_id]);
        assert!(!docs.may_receive(&theirs_id));
        assert_eq!(docs.heads(&theirs_id).unwrap(), None);

        // A new document from the peer that does not name its organisation is refused as not shared.
        let mut other = MemoryDocs::new().with_access(Access::Party(OrgId::new("flen-kommun").unwrap()));
        let mut incoming = theirs.into_automerge();
        let err = other
            .with_doc(&theirs_id, true, |d| {
                d.merge(&mut incoming).unwrap();
                DocOutcome::keep(())
            })
            .unwrap_err();
        assert!(matches!(err, MemoryDocsError::NotAParty { .. }), "{err}");
        assert_eq!(other.refusal(&err).map(|(kind, _)| kind), Some(RefusalKind::NotShared));
        assert!(other.get(&theirs_id).is_none(), "nothing was kept");
    }

    #[test]
    fn changes_over_the_size_limits_are_refused_and_rolled_back() {
        let limits = ContentLimits { max_change_bytes: 200, max_document_bytes: 100_000 };
        let mut docs = MemoryDocs::new().with_limits(limits);
        let id = DocId::random();
        change(&mut docs, &id, "kort", true).unwrap();
        let before = docs.heads_of(&id);
        let err = change(&mut docs, &id, &"lång ".repeat(100), true).unwrap_err();
        assert_eq!(docs.refusal(&err).map(|(kind, _)| kind), Some(RefusalKind::TooLarge));
        assert_eq!(docs.heads_of(&id), before);
    }

    #[test]
    fn connections_sharing_one_copy_see_each_others_changes() {
        let shared = MemoryDocs::new().into_shared();
        let (mut a, mut b) = (shared.clone(), shared.clone());
        let id = DocId::random();
        change(&mut a, &id, "delad", true).unwrap();
        assert_eq!(b.heads(&id).unwrap(), Some(shared.lock().heads_of(&id)));
    }
}
