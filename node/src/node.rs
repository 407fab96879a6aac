//! A node's data directory and everything one can do with it offline.
//!
//! [`Node`] ties the store, the node's identity key and the organisation
//! directory together, and is what the CLI (and later the sync daemon) calls.
//!
//! Data directory layout:
//! - `node.db`: the SQLite store (documents, changes, metadata: organisation, name);
//! - `node.key`: the node's ed25519 secret key, owner read/write only;
//! - `signers/<name>.key` (0600) and `signers/<name>.json`: signer keys of the
//!   people who approve documents on this machine, with their organisation and
//!   role title (see [`Node::create_signer`]);
//! - `organisations.toml` (optional): organisations and units on top of the
//!   built-in directory, in its format (see [`load_directory`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use automerge::ChangeHash;
use chrono::Utc;
use samverkan_shared::acceptance::{self, AuthorPolicy, AuthorRule, ContentLimits};
use samverkan_shared::approval::{self, Action, ApprovalError, ApprovalRecord, ApprovalStatus};
use samverkan_shared::authorship::{self, AuthorshipError};
use samverkan_shared::bundle::{Bundle, BundleDoc, BundleError, BundleOrigin, HeadsSummary};
use samverkan_shared::directory::{directory_digest, DirectoryError, EnrollmentDirectory, MemberKind, SignedDirectory};
use samverkan_shared::identity::{NodeId, NodeKey};
use samverkan_shared::ids::DocId;
use samverkan_shared::markdown::{self, MarkdownError};
use samverkan_shared::model::{DocKind, Document, DocumentContent, EditContext, Editor, ModelError, Scope};
use samverkan_shared::org::{Directory, OrgId};
use samverkan_shared::receipt::{ApprovalReceipt, ReceiptProblem, Receipts};
use samverkan_shared::sync::{SignedChange, SyncLimits};
use samverkan_shared::wire::RefusalKind;
use serde::Serialize;

use crate::store::keyfile::{self, KeyFileError};
use crate::store::{DocRefusal, DocSummary, Store, StoreError, UpdateOutcome};

/// File name of the store inside the data directory.
pub const DB_FILE: &str = "node.db";
/// File name of the secret key inside the data directory.
pub const KEY_FILE: &str = "node.key";
/// Metadata key of the relay's address (host:port).
pub const META_RELAY_ADDRESS: &str = "relay.address";
/// Metadata key of the relay's pinned public key.
pub const META_RELAY_KEY: &str = "relay.key";
/// Metadata key of the addresses of the relay's other instances (same relay
/// key, one database), comma-separated, tried after [`META_RELAY_ADDRESS`].
pub const META_RELAY_ALTERNATIVES: &str = "relay.alternatives";
/// Metadata key of the last signed enrollment directory received from the relay.
pub const META_DIRECTORY: &str = "relay.directory";
/// Metadata key of the content limits the relay announced (protocol 6
/// `Welcome`): `<max change bytes> <max document bytes>`.
pub const META_RELAY_LIMITS: &str = "relay.limits";
/// Folder of signer keys inside the data directory.
pub const SIGNERS_DIR: &str = "signers";

/// File name of the optional organisation directory inside the data directory:
/// organisations and units added to (or replacing by id) the built-in directory.
pub const ORGANISATIONS_FILE: &str = "organisations.toml";

/// The limits a node stores under: its own, lowered to the relay's where the
/// relay announced smaller ones.
fn effective_limits(announced: Option<ContentLimits>) -> ContentLimits {
    let own = ContentLimits::default();
    match announced {
        Some(relay) => ContentLimits {
            max_change_bytes: own.max_change_bytes.min(relay.max_change_bytes),
            max_document_bytes: own.max_document_bytes.min(relay.max_document_bytes),
        },
        None => own,
    }
}

/// Reads [`META_RELAY_LIMITS`]; `None` if it is not two numbers of
/// consistent limits (then the node's own apply).
fn parse_limits(text: &str) -> Option<ContentLimits> {
    let (change, document) = text.trim().split_once(' ')?;
    let limits = ContentLimits { max_change_bytes: change.parse().ok()?, max_document_bytes: document.parse().ok()? };
    limits.validate(u64::MAX).ok().map(|()| limits)
}

/// The organisation directory of the node in `data_dir`: the built-in one
/// ([`Directory::sodermanland`]) with [`ORGANISATIONS_FILE`] on top, if there is one.
pub fn load_directory(data_dir: &Path) -> Result<Directory, NodeError> {
    let path = data_dir.join(ORGANISATIONS_FILE);
    let error = |reason: String| NodeError::Organisations { path: path.clone(), reason };
    match std::fs::read_to_string(&path) {
        Ok(text) => Directory::sodermanland().with_overrides(&text).map_err(|e| error(e.to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Directory::sodermanland()),
        Err(e) => Err(error(e.to_string())),
    }
}

/// Errors of node operations.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The data directory has no node yet.
    #[error("{0} holds no Samverkan node; run `samverkan-node init --org <organisation>` first")]
    NotInitialised(PathBuf),
    /// `init` on a directory that already has a node.
    #[error("{0} already holds a Samverkan node")]
    AlreadyInitialised(PathBuf),
    /// The data directory's `organisations.toml` cannot be read or used.
    #[error("{}: {reason}", .path.display())]
    Organisations {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// No document matches an id or prefix.
    #[error("no document matches {0:?} (see `samverkan-node list`)")]
    NoSuchDocument(String),
    /// Several documents match a prefix.
    #[error("{0:?} matches several documents: {1}; give more of the id")]
    AmbiguousDocument(String, String),
    /// The document changed on this node while it was being edited in an editor.
    #[error("document {0} was changed on this node while you edited it; your version is kept in {1}: run `samverkan-node edit` again and copy your changes over")]
    ChangedDuringEdit(DocId, PathBuf),
    /// The document is no longer shared with this node's organisation: the
    /// relay refused it, and the local copy is kept read-only.
    #[error("document {doc} is no longer shared with your organisation ({reason}); this node keeps its copy read-only: read or export it, ask a party to add your organisation again to resume")]
    NoLongerShared {
        /// The document.
        doc: DocId,
        /// The relay's words.
        reason: String,
    },
    /// A store error.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A model error (validation, schema).
    #[error(transparent)]
    Model(#[from] ModelError),
    /// A Markdown import error.
    #[error(transparent)]
    Markdown(#[from] MarkdownError),
    /// A bundle error.
    #[error(transparent)]
    Bundle(#[from] BundleError),
    /// The enrollment directory from the relay did not verify.
    #[error(transparent)]
    Directory(#[from] DirectoryError),
    /// A change's authorship could not be proven.
    #[error(transparent)]
    Authorship(#[from] AuthorshipError),
    /// The key file is missing, exposed or damaged.
    #[error(transparent)]
    KeyFile(#[from] KeyFileError),
    /// A signer key could not be opened (passphrase missing or wrong, file damaged).
    #[error(transparent)]
    SignerKey(#[from] crate::signer_key::SignerKeyError),
    /// An approval could not be made or read.
    #[error(transparent)]
    Approval(#[from] ApprovalError),
    /// No signer key of that name on this node.
    #[error(
        "no signer {0:?} on this node (see `samverkan-node signer list`; create one with `samverkan-node signer new`)"
    )]
    NoSuchSigner(String),
    /// A signer of that name exists already.
    #[error("a signer named {0:?} exists already on this node")]
    SignerExists(String),
    /// A signer name that cannot be a file name.
    #[error("invalid signer name {0:?}: use letters, digits, spaces, '-' or '_'")]
    InvalidSignerName(String),
    /// The signer's organisation and role are not among the document's required signatories.
    #[error("{name} signs as {role} of {org}, but the document requires no such signature (see `samverkan-node show`; add one with `samverkan-node signatory add`)")]
    NotASignatory {
        /// The signer.
        name: String,
        /// The signer's role.
        role: String,
        /// The signer's organisation.
        org: OrgId,
    },
    /// The signer would be refused: not (yet) an enrolled signer with that role.
    #[error("{name} cannot sign: {problem}. This is checked against this node's copy of the relay's enrollment directory; if the operator enrolled the signer just now, run `samverkan-node sync` first")]
    SignerNotEnrolled {
        /// The signer.
        name: String,
        /// Why the record would be refused.
        problem: approval::RecordProblem,
    },
    /// The signer has signed the current content already.
    #[error("{0} has already signed the current version")]
    AlreadySigned(String),
    /// Withdrawing with no approval to withdraw.
    #[error("{0} has no approval of this document to withdraw")]
    NothingToWithdraw(String),
    /// Exporting a signed bundle of a document no one approved.
    #[error("document {0} has no approved version to export (see `samverkan-node status {0}`)")]
    NotApproved(DocId),
    /// Importing a file whose content a document here has already (the same
    /// file imported twice); `import --new-copy` makes a second document anyway.
    #[error(
        "document {} has this content already: the same kind, title ({title:?}) and text, and the file's parties; \
         nothing was imported. To change that document use `samverkan-node edit {}` (or import a file exported \
         from it); to make a second document anyway, import again with --new-copy",
        .existing.short(),
        .existing.short()
    )]
    AlreadyImported {
        /// The document that has the content.
        existing: DocId,
        /// Its title.
        title: String,
    },
    /// No enrollment directory yet: signatures cannot be checked.
    #[error("this node has no enrollment directory from the relay yet, so signers cannot be checked; run `samverkan-node sync` first")]
    NoDirectory,
    /// A bundle document was refused (see [`acceptance::apply_bundle_doc`]).
    #[error("refused: {0}")]
    BundleDoc(#[from] acceptance::BundleDocError),
    /// The node has not joined a relay, so it cannot tell whose changes count.
    #[error("this node has not joined a relay yet, so it cannot check who wrote a bundle's changes; run `samverkan-node join <code>` (or sync once with --relay and --relay-key) first")]
    NotJoined,
    /// A bundle made under another relay than the one this node pinned.
    #[error("this bundle was made under relay {bundle}, but this node belongs to relay {pinned}; bundles are exchanged only between nodes of the same relay, whose enrollment directory says whose changes count")]
    ForeignRelay {
        /// The bundle's relay key (hex).
        bundle: String,
        /// This node's pinned relay key (hex).
        pinned: String,
    },
    /// A bundle made by a node that had not joined any relay.
    #[error("this bundle was made by {0:?}, a node that had not joined a relay; its changes cannot be checked and were not imported")]
    BundleFromUnjoinedNode(String),
    /// Export without saying who the bundle is for.
    #[error("say who the bundle is for: `--have <the receiver's heads file>` or `--for <organisation>`; a bundle carries only the documents the receiver's organisation is a party to")]
    BundleReceiverUnknown,
    /// A file (signer profile, bundle) could not be read or written.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// Who a signer key on this node belongs to: kept beside the key as JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct SignerProfile {
    /// The person's name as given at creation (also the file name, slugged).
    pub name: String,
    /// The organisation signed for.
    pub org: OrgId,
    /// The role title signed as ("Landshövding").
    pub role: String,
    /// The public key (to give to the relay operator for enrollment).
    pub key: NodeId,
}

/// The file stem of a signer's files: lowercase, spaces as '-'.
fn signer_slug(name: &str) -> Result<String, NodeError> {
    let slug: String = name.trim().to_lowercase().chars().map(|c| if c == ' ' { '-' } else { c }).collect();
    if slug.is_empty() || slug.len() > 100 || !slug.chars().all(|c| c.is_alphanumeric() || c == '-' || c == '_') {
        return Err(NodeError::InvalidSignerName(name.to_string()));
    }
    Ok(slug)
}

/// Where an author's key stands in the relay's enrollment directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthorStatus {
    /// This node's own key.
    ThisNode,
    /// An enrolled, active node.
    Enrolled,
    /// An enrolled node whose key was revoked since.
    Revoked,
    /// Not an enrolled node (unknown, or a signer's key).
    NotEnrolled,
}

/// The author of changes, as shown in `history` and `conflicts`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Author {
    /// The author's key (hex).
    pub key: String,
    /// Its standing at the relay.
    pub status: AuthorStatus,
    /// Organisation and node name, or why there is none.
    pub label: String,
}

/// What importing a bundle did to one document.
#[derive(Debug, Clone, Serialize)]
pub struct BundleDocReport {
    /// The document.
    pub id: DocId,
    /// Its title after import (empty if it could not be read).
    pub title: String,
    /// Whether the document is new on this node.
    pub created: bool,
    /// Whether anything new arrived.
    pub changed: bool,
    /// Bytes of new changes stored.
    pub new_bytes: usize,
    /// Changes held back because earlier changes they build on are missing.
    pub missing_deps: usize,
    /// Why the document was refused, if it was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// An opened node.
#[derive(Debug)]
pub struct Node {
    data_dir: PathBuf,
    store: Store,
    key: NodeKey,
    org: OrgId,
    name: String,
    directory: Directory,
    /// The verified enrollment directory, once read (see [`Node::enrollment`]).
    enrolled: std::cell::RefCell<Option<Arc<EnrollmentDirectory>>>,
}

impl Node {
    /// Creates a node in `data_dir` for organisation `org` (id, name or alias).
    pub fn init(data_dir: &Path, org: &str, name: Option<&str>) -> Result<Self, NodeError> {
        let directory = load_directory(data_dir)?;
        let org = directory
            .resolve(org)
            .ok_or_else(|| NodeError::Model(ModelError::UnknownOrganisation(org.to_string())))?
            .clone();
        let db_path = data_dir.join(DB_FILE);
        let key_path = data_dir.join(KEY_FILE);
        if db_path.exists() || key_path.exists() {
            return Err(NodeError::AlreadyInitialised(data_dir.to_path_buf()));
        }
        keyfile::create_private_dir(data_dir)?;
        let key = NodeKey::generate();
        keyfile::create(&key_path, &key)?;
        let mut store = Store::open_or_create(&db_path)?;
        let name = name.map(str::to_owned).unwrap_or_else(|| org.name.clone());
        store.set_meta("org", org.id.as_str())?;
        store.set_meta("name", &name)?;
        store.set_meta("created", &Utc::now().to_rfc3339())?;
        tracing::info!(node = %key.node_id().short(), org = %org.id, "initialised node");
        Ok(Self {
            data_dir: data_dir.to_path_buf(),
            store,
            key,
            org: org.id,
            name,
            directory,
            enrolled: Default::default(),
        })
    }

    /// Opens the node in `data_dir`.
    pub fn open(data_dir: &Path) -> Result<Self, NodeError> {
        let db_path = data_dir.join(DB_FILE);
        let key_path = data_dir.join(KEY_FILE);
        if !db_path.exists() || !key_path.exists() {
            return Err(NodeError::NotInitialised(data_dir.to_path_buf()));
        }
        let key = keyfile::load(&key_path)?;
        let store = Store::open(&db_path)?;
        let org = store
            .meta("org")?
            .and_then(|o| OrgId::new(&o))
            .ok_or_else(|| NodeError::NotInitialised(data_dir.to_path_buf()))?;
        let name = store.meta("name")?.unwrap_or_else(|| org.to_string());
        let mut node = Self {
            data_dir: data_dir.to_path_buf(),
            store,
            key,
            org,
            name,
            directory: load_directory(data_dir)?,
            enrolled: Default::default(),
        };
        node.refresh_relay_limits()?;
        Ok(node)
    }

    /// Stores from now on under the relay's limits as last kept (see
    /// [`Self::adopt_relay_limits`]): for a handle that stays open while
    /// another (the daemon's) hears from the relay, such as the web app's.
    pub fn refresh_relay_limits(&mut self) -> Result<(), NodeError> {
        let announced = self.store.meta(META_RELAY_LIMITS)?.and_then(|text| parse_limits(&text));
        self.apply_limits(announced);
        Ok(())
    }

    /// Stores under [`effective_limits`]; when they are exactly the relay's,
    /// the store knows the relay checked what it sends against them
    /// ([`Store::set_relay_content_limits`]).
    fn apply_limits(&mut self, announced: Option<ContentLimits>) {
        let limits = effective_limits(announced);
        if announced == Some(limits) {
            self.store.set_relay_content_limits(limits);
        } else {
            self.store.set_content_limits(limits);
        }
    }

    /// The relay announced its content limits (protocol 6 `Welcome`): they
    /// are kept, and from now on this node stores nothing over the smaller of
    /// them and its own ([`ContentLimits::default`]), so an edit the relay
    /// would refuse is refused here, when it is made, not at the next sync.
    pub fn adopt_relay_limits(&mut self, announced: ContentLimits) -> Result<(), NodeError> {
        if announced.validate(u64::MAX).is_err() {
            tracing::warn!(?announced, "the relay announced inconsistent content limits; keeping this node's own");
            return Ok(());
        }
        let text = format!("{} {}", announced.max_change_bytes, announced.max_document_bytes);
        if self.store.meta(META_RELAY_LIMITS)?.as_deref() != Some(text.as_str()) {
            self.store.set_meta(META_RELAY_LIMITS, &text)?;
        }
        self.apply_limits(Some(announced));
        Ok(())
    }

    /// The digest of the enrollment directory this node holds, as a protocol
    /// 6 `Hello` names it (the relay then sends its own only if it differs).
    pub fn enrollment_digest(&self) -> Result<Option<[u8; 32]>, NodeError> {
        Ok(self.store.meta(META_DIRECTORY)?.map(|text| directory_digest(text.as_bytes())))
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// This node's public identity.
    pub fn node_id(&self) -> NodeId {
        self.key.node_id()
    }

    /// This node's organisation.
    pub fn org(&self) -> &OrgId {
        &self.org
    }

    /// This node's display name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The organisation directory.
    pub fn directory(&self) -> &Directory {
        &self.directory
    }

    /// The store, read-only (status, metadata).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The store, for callers that sync.
    pub fn store_mut(&mut self) -> &mut Store {
        &mut self.store
    }

    /// The context stamped on an edit made now.
    pub fn edit_context(&self) -> EditContext {
        EditContext { author: self.node_id(), org: self.org.clone(), node_name: self.name.clone(), time: Utc::now() }
    }

    /// Every document, most recently changed first.
    pub fn list(&self) -> Result<Vec<DocSummary>, NodeError> {
        Ok(self.store.list()?)
    }

    /// Resolves a document id or unique prefix.
    pub fn resolve(&self, id_or_prefix: &str) -> Result<DocId, NodeError> {
        let wanted = id_or_prefix.trim().to_ascii_lowercase();
        if wanted.is_empty() {
            return Err(NodeError::NoSuchDocument(id_or_prefix.to_string()));
        }
        let matches: Vec<DocId> = self.store.ids()?.into_iter().filter(|id| id.as_str().starts_with(&wanted)).collect();
        match matches.as_slice() {
            [one] => Ok(one.clone()),
            [] => Err(NodeError::NoSuchDocument(id_or_prefix.to_string())),
            many => Err(NodeError::AmbiguousDocument(
                id_or_prefix.to_string(),
                many.iter().map(|d| d.short().to_string()).collect::<Vec<_>>().join(", "),
            )),
        }
    }

    /// Loads a document.
    pub fn document(&self, id: &DocId) -> Result<Document, NodeError> {
        Ok(self.store.load(id)?)
    }

    /// The content of a new document as `samverkan-node new` makes it: the
    /// parties (organisations or units of one, by id, name or alias; this
    /// node's organisation when none is given), local scope when a
    /// municipality is a party (else county-wide), and the headings a document
    /// of that kind starts with.
    pub fn new_content(&self, kind: DocKind, title: &str, parties: &[String]) -> Result<DocumentContent, NodeError> {
        let mut content = DocumentContent::new(kind, title.to_string());
        let own = [self.org.to_string()];
        let parties = if parties.iter().all(|p| p.trim().is_empty()) { &own[..] } else { parties };
        let mut refs = Vec::new();
        for p in parties.iter().filter(|p| !p.trim().is_empty()) {
            // An organisation, or a unit of one ("LPO Katrineholm"): the organisation is the party.
            refs.push(
                self.directory
                    .resolve_ref(p)
                    .ok_or_else(|| NodeError::Model(ModelError::UnknownOrganisation(p.to_string())))?,
            );
        }
        content.set_party_refs(&refs);
        let has_municipality = content
            .parties
            .iter()
            .any(|p| self.directory.get(p).is_some_and(|o| o.kind == samverkan_shared::org::OrgKind::Municipality));
        content.scope = if has_municipality { Scope::Local } else { Scope::County };
        content.body = template(kind).to_string();
        Ok(content)
    }

    /// Creates and stores a new document.
    pub fn create(&mut self, content: DocumentContent) -> Result<DocId, NodeError> {
        let ctx = self.edit_context();
        let mut doc = Document::create(DocId::random(), content, &ctx, &self.directory)?;
        self.store.insert(&mut doc)?;
        tracing::info!(doc = %doc.id(), "created document");
        Ok(doc.id().clone())
    }

    /// Imports Markdown as a new document; returns its id and what was recognised.
    /// A file exported from a node (with an id in its front matter) that is already
    /// here is applied as an edit of that document instead. Markdown carries content,
    /// not history, so on a node without that document it becomes a new document:
    /// reusing the id would create a second, unrelated history under one id.
    ///
    /// A file whose content is here already ([`Self::same_content`]: the same
    /// file imported twice) is refused with [`NodeError::AlreadyImported`].
    pub fn import_markdown(&mut self, text: &str, kind: Option<DocKind>) -> Result<(DocId, Vec<String>), NodeError> {
        self.import_markdown_with(text, kind, false)
    }

    /// [`Self::import_markdown`]; with `new_copy` (`import --new-copy`) the file
    /// always becomes a new document, also one exported from a document here
    /// (last year's plan as a template) or one whose content is here already.
    pub fn import_markdown_with(
        &mut self,
        text: &str,
        kind: Option<DocKind>,
        new_copy: bool,
    ) -> Result<(DocId, Vec<String>), NodeError> {
        let imported = markdown::import(text, &self.directory, kind)?;
        if let Some(id) = imported.id.filter(|id| !new_copy && self.store.contains(id).unwrap_or(false)) {
            let view = imported.content.into_view(id.clone());
            self.edit(&id, "import Markdown", |e| e.apply(&view))?;
            return Ok((id, vec!["updated the existing document".to_string()]));
        }
        if !new_copy {
            if let Some(existing) = self.same_content(&imported.content)? {
                return Err(NodeError::AlreadyImported { existing: existing.id, title: existing.title });
            }
        }
        let id = self.create(imported.content)?;
        Ok((id, imported.recognised))
    }

    /// A document here that an import of `content` would duplicate: of the same
    /// kind, title and body (byte for byte), whose parties include every party
    /// of `content` (parties added since the first import do not hide it).
    pub fn same_content(&self, content: &DocumentContent) -> Result<Option<DocSummary>, NodeError> {
        for summary in self.store.list()? {
            if summary.kind != content.kind
                || summary.title != content.title
                || !content.parties.iter().all(|p| summary.parties.contains(p))
            {
                continue;
            }
            if self.document(&summary.id)?.view()?.body == content.body {
                return Ok(Some(summary));
            }
        }
        Ok(None)
    }

    /// Makes one edit of a document, durably; returns `f`'s result and the
    /// change hash (`None` if nothing changed).
    pub fn edit<T>(
        &mut self,
        id: &DocId,
        message: &str,
        f: impl FnOnce(&mut Editor<'_>) -> Result<T, ModelError>,
    ) -> Result<(T, Option<ChangeHash>), NodeError> {
        self.writable(id)?;
        let ctx = self.edit_context();
        let directory = &self.directory;
        let (result, _) = self
            .store
            .update(id, false, |doc| -> Result<_, NodeError> { Ok(doc.edit(&ctx, directory, message, f)?) })?;
        Ok(result)
    }

    /// Refuses edits of a document the relay no longer shares with this node
    /// ([`NodeError::NoLongerShared`]): its copy stays as it was.
    pub fn writable(&self, id: &DocId) -> Result<(), NodeError> {
        match self.store.refusal(id)? {
            Some(refusal) if refusal.kind == RefusalKind::NotShared => {
                Err(NodeError::NoLongerShared { doc: id.clone(), reason: refusal.reason })
            }
            _ => Ok(()),
        }
    }

    /// Why a document does not sync through the relay from this node, if it
    /// does not: this node's organisation is not among its parties (the relay
    /// shares a document with its parties only), or the relay refused it.
    pub fn sync_problem(&self, id: &DocId) -> Result<Option<SyncProblem>, NodeError> {
        let Some(summary) = self.store.summary(id)? else { return Ok(None) };
        if !summary.parties.contains(&self.org) {
            return Ok(Some(SyncProblem::NotAParty));
        }
        Ok(self.store.refusal(id)?.map(SyncProblem::Refused))
    }

    /// Forgets the refusals of documents whose changes the relay refused, so
    /// that the next sync offers them again; documents no longer shared stay
    /// as they are (the relay offers them again itself when they are shared
    /// again). Returns how many will be offered again.
    pub fn retry_refused(&mut self) -> Result<usize, NodeError> {
        let mut retried = 0;
        for refusal in self.store.refusals()? {
            if refusal.kind != RefusalKind::NotShared && self.store.clear_refusal(&refusal.doc)? {
                retried += 1;
            }
        }
        Ok(retried)
    }

    /// [`Self::sync_problem`] as a sentence for people, said when a document
    /// is created or edited and shown by `status`.
    pub fn sharing_note(&self, id: &DocId) -> Result<Option<String>, NodeError> {
        Ok(self.sync_problem(id)?.map(|problem| match problem {
            SyncProblem::NotAParty => {
                let name = self.directory.name_of(&self.org);
                format!(
                    "{name} is not a party to document {}, so it stays on this node and is not synced through the relay \
                     (the relay shares a document with its parties only). Add {name} as a party to sync it, or give it \
                     to a party with `samverkan-node bundle export --for <organisation>`.",
                    id.short()
                )
            }
            SyncProblem::Refused(refusal) => refusal_note(&refusal),
        }))
    }

    /// Applies the Markdown a user edited, starting from the version at `base`:
    /// the user's changes are made against `base` and merged with whatever
    /// arrived since, so concurrent edits from other nodes survive.
    pub fn apply_edited_markdown(
        &mut self,
        id: &DocId,
        base: &[ChangeHash],
        edited: &str,
        keep_file: &Path,
    ) -> Result<Option<ChangeHash>, NodeError> {
        self.writable(id)?;
        let imported = markdown::import(edited, &self.directory, None)?;
        let view = imported.content.into_view(id.clone());
        let ctx = self.edit_context();
        let directory = &self.directory;
        let (hash, _) = self.store.update(id, false, |doc| -> Result<_, NodeError> {
            let mut fork = doc.at(base)?;
            let our_actor = ctx.author.actor_id();
            let ours_now = doc.automerge_mut().get_changes(&[]).iter().filter(|c| c.actor_id() == &our_actor).count();
            let ours_then = fork.automerge_mut().get_changes(&[]).iter().filter(|c| c.actor_id() == &our_actor).count();
            if ours_now != ours_then {
                return Err(NodeError::ChangedDuringEdit(id.clone(), keep_file.to_path_buf()));
            }
            let (_, hash) = fork.edit(&ctx, directory, "edit Markdown", |e| e.apply(&view))?;
            doc.automerge_mut().merge(fork.automerge_mut()).map_err(ModelError::from)?;
            Ok(hash)
        })?;
        Ok(hash)
    }

    /// Each document's heads, for another node to hand to `bundle export --have`.
    pub fn heads_summary(&self) -> Result<HeadsSummary, NodeError> {
        let mut summary = HeadsSummary::new();
        summary.org = Some(self.org.clone());
        for mut doc in self.store.ids()?.into_iter().map(|id| self.store.load(&id)).collect::<Result<Vec<_>, _>>()? {
            let heads = doc.heads();
            summary.insert(doc.id().clone(), &heads);
        }
        Ok(summary)
    }

    /// A bundle for a node of `receiver` (or of the organisation named in
    /// `have`) with the documents that organisation is a party to; with `have`,
    /// only what that node lacks. It carries this node's pinned relay key and
    /// its copy of the relay's signed directory.
    pub fn export_bundle(&self, have: Option<&HeadsSummary>, receiver: Option<&OrgId>) -> Result<Bundle, NodeError> {
        let relay_key = self.pinned_relay()?.ok_or(NodeError::NotJoined)?;
        let receiver = receiver.or(have.and_then(|h| h.org.as_ref())).ok_or(NodeError::BundleReceiverUnknown)?;
        let mut docs = Vec::new();
        let mut receipts = Vec::new();
        for summary in self.store.list()? {
            if !summary.parties.contains(receiver) {
                continue; // Not shared with the receiver: the relay's rule, on paper too.
            }
            let id = summary.id;
            let mut doc = self.store.load(&id)?;
            receipts.extend(self.store.receipts(&id)?);
            // What the receiver has of this document (none without a heads summary).
            let theirs = match have {
                Some(have) => have.heads(&id)?,
                None => Vec::new(),
            };
            let known: Vec<ChangeHash> =
                theirs.iter().copied().filter(|h| doc.automerge_mut().get_change_by_hash(h).is_some()).collect();
            let new_changes = doc.automerge_mut().get_changes(&known);
            if new_changes.is_empty() {
                continue; // They have everything we have.
            }
            let data =
                if known.is_empty() { doc.automerge_mut().save() } else { doc.automerge_mut().save_after(&known) };
            let signatures = self.signatures_of(&mut doc, &new_changes)?;
            docs.push(BundleDoc { id, data, signatures });
        }
        Ok(Bundle {
            receipts,
            origin: BundleOrigin {
                node: self.node_id().to_string(),
                org: self.org.to_string(),
                name: self.name.clone(),
                created: Utc::now(),
            },
            relay_key: Some(relay_key),
            directory: self.store.meta(META_DIRECTORY)?.map(String::into_bytes),
            docs,
        })
    }

    /// Imports a bundle made under this node's relay: each document's changes
    /// are checked as sync checks them ([`acceptance::apply_bundle_doc`]: sizes,
    /// bounded inflation, authors enrolled at the relay, signatures, parties),
    /// then stored durably. A document that cannot be used is reported and
    /// nothing of it is stored; the others still import.
    pub fn import_bundle(&mut self, bundle: &Bundle) -> Result<Vec<BundleDocReport>, NodeError> {
        let pinned = self.pinned_relay()?.ok_or(NodeError::NotJoined)?;
        match bundle.relay_key {
            Some(key) if key == pinned => {}
            Some(key) => return Err(NodeError::ForeignRelay { bundle: key.to_string(), pinned: pinned.to_string() }),
            None => return Err(NodeError::BundleFromUnjoinedNode(bundle.origin.name.clone())),
        }
        if let Some(signed) = &bundle.directory {
            // Signed by our relay (checked): a newer copy tells of newly enrolled authors.
            self.store_enrollment(signed, &pinned)?;
        }
        let authors = self.author_policy()?;
        let limits = SyncLimits::for_content(&self.store.content_limits());
        let org = self.org.clone();
        let mut reports = Vec::new();
        for item in &bundle.docs {
            let result = self.store.update_signed(&item.id, true, |doc| -> Result<_, NodeError> {
                let applied = acceptance::apply_bundle_doc(doc, &item.data, &item.signatures, &authors, &limits, &org)?;
                Ok((applied.missing_deps, applied.signatures))
            });
            let report = match result {
                Ok((missing_deps, outcome)) => {
                    let title = self.store.load(&item.id).and_then(|d| Ok(d.title()?)).unwrap_or_default();
                    BundleDocReport {
                        id: item.id.clone(),
                        title,
                        created: outcome.created,
                        changed: outcome.new_bytes > 0,
                        new_bytes: outcome.new_bytes,
                        missing_deps,
                        error: None,
                    }
                }
                Err(e) => {
                    tracing::warn!(doc = %item.id, error = %e, "refused document from bundle");
                    BundleDocReport {
                        id: item.id.clone(),
                        title: String::new(),
                        created: false,
                        changed: false,
                        new_bytes: 0,
                        missing_deps: 0,
                        error: Some(e.to_string()),
                    }
                }
            };
            reports.push(report);
        }
        // The relay's approval receipts: kept only if they verify with the pinned relay key.
        if let (Some(relay), false) = (self.pinned_relay()?, bundle.receipts.is_empty()) {
            for problem in self.store_receipts(bundle.receipts.clone(), &relay)?.1 {
                tracing::warn!(%problem, "refused an approval receipt from the bundle");
            }
        }
        Ok(reports)
    }

    /// The authors' signatures proving `changes` (the changes of `doc` a
    /// bundle carries): per author, its latest changes among them
    /// ([`authorship::author_tips`]); this node's own are signed now, others'
    /// come from the store, and a tip without a stored signature is covered by
    /// the nearest later change of its author that has one. Changes nothing
    /// covers are left without (the importer refuses them).
    fn signatures_of(&self, doc: &mut Document, changes: &[automerge::Change]) -> Result<Vec<SignedChange>, NodeError> {
        let own = self.node_id().actor_id();
        let id = doc.id().clone();
        let known = |hashes: &[(ChangeHash, automerge::ActorId)]| -> Result<Vec<SignedChange>, NodeError> {
            let mut out = Vec::new();
            let mut theirs = Vec::new();
            for (hash, actor) in hashes {
                if *actor == own {
                    out.push((*hash, authorship::sign(&self.key, &id, hash)));
                } else {
                    theirs.push(*hash);
                }
            }
            out.extend(self.store.signatures(&theirs)?);
            Ok(out)
        };
        let tips = authorship::author_tips(changes.iter());
        let mut out = known(&tips)?;
        for (tip, _) in &tips {
            if out.iter().any(|(hash, _)| hash == tip) {
                continue;
            }
            let later = authorship::later_by_author(doc.automerge_mut(), tip);
            let found = known(&later)?;
            if let Some(best) = later.iter().find_map(|(hash, _)| found.iter().find(|(h, _)| h == hash)) {
                if !out.contains(best) {
                    out.push(*best);
                }
            }
        }
        Ok(out)
    }

    /// The store, key and organisation at once (for the sync driver).
    pub(crate) fn parts(&mut self) -> (&mut Store, &NodeKey, &OrgId) {
        (&mut self.store, &self.key, &self.org)
    }

    /// The node's secret key (for TLS and signatures made by this node).
    pub fn key(&self) -> &NodeKey {
        &self.key
    }

    /// The relay key this node pinned, if it has one.
    pub fn pinned_relay(&self) -> Result<Option<NodeId>, NodeError> {
        Ok(self.store.meta(META_RELAY_KEY)?.and_then(|k| k.parse().ok()))
    }

    /// The enrollment directory last received from the pinned relay, verified
    /// again with the pinned key (`None` before the first sync).
    pub fn enrollment(&self) -> Result<Option<EnrollmentDirectory>, NodeError> {
        Ok(self.enrollment_shared()?.map(|d| (*d).clone()))
    }

    /// [`Self::enrollment`], read and verified once and then shared.
    fn enrollment_shared(&self) -> Result<Option<Arc<EnrollmentDirectory>>, NodeError> {
        if let Some(held) = self.enrolled.borrow().as_ref() {
            return Ok(Some(held.clone()));
        }
        let (Some(relay), Some(text)) = (self.pinned_relay()?, self.store.meta(META_DIRECTORY)?) else {
            return Ok(None);
        };
        let directory = Arc::new(SignedDirectory::decode(text.as_bytes())?.verify(&relay)?);
        *self.enrolled.borrow_mut() = Some(directory.clone());
        Ok(Some(directory))
    }

    /// Whose changes this node accepts: nodes enrolled in its pinned relay's
    /// directory (see [`samverkan_shared::acceptance`]). Before the first sync
    /// the directory is empty and no one else's change is accepted.
    pub fn author_policy(&self) -> Result<AuthorPolicy, NodeError> {
        let directory = self.enrollment_shared()?.unwrap_or_default();
        Ok(AuthorPolicy::new(directory, AuthorRule::EnrolledNode))
    }

    /// Verifies a signed directory with `relay`'s key without keeping it (for
    /// a join, before the relay is pinned).
    pub fn store_enrollment_unpinned(&self, signed: &[u8], relay: &NodeId) -> Result<EnrollmentDirectory, NodeError> {
        Ok(SignedDirectory::decode(signed)?.verify(relay)?)
    }

    /// Keeps a signed directory from the relay after verifying it with `relay`'s
    /// key; an older version than the one held is ignored. Returns the directory now held.
    pub fn store_enrollment(&mut self, signed: &[u8], relay: &NodeId) -> Result<EnrollmentDirectory, NodeError> {
        let received = SignedDirectory::decode(signed)?;
        let directory = received.verify(relay)?;
        if let Ok(Some(held)) = self.enrollment() {
            if held.version > directory.version {
                return Ok(held);
            }
        }
        let text = String::from_utf8_lossy(&received.encode()).into_owned();
        self.store.set_meta(META_DIRECTORY, &text)?;
        *self.enrolled.borrow_mut() = Some(Arc::new(directory.clone()));
        Ok(directory)
    }

    /// Who wrote changes under a hex actor id, as the relay's signed directory
    /// says: a key that is not (or no longer) an enrolled node is never shown
    /// under an organisation's name alone.
    pub fn author(&self, actor_hex: &str) -> Author {
        let key = hex::decode(actor_hex).ok().and_then(|b| NodeId::from_actor(&automerge::ActorId::from(b)));
        let short = key.map(|k| k.short()).unwrap_or_else(|| actor_hex.chars().take(8).collect());
        let unknown = |status| Author {
            key: actor_hex.to_string(),
            status,
            label: format!("okänd författare {short} (inte registrerad hos reläet)"),
        };
        if actor_hex == self.node_id().actor_id().to_hex_string() {
            let label = format!("{} ({})", self.directory.name_of(&self.org), self.name);
            return Author { key: actor_hex.to_string(), status: AuthorStatus::ThisNode, label };
        }
        let Some(key) = key else { return unknown(AuthorStatus::NotEnrolled) };
        let member = self.enrollment_shared().ok().flatten().and_then(|d| d.latest(&key).cloned());
        match member {
            Some(m) if m.kind == MemberKind::Node => {
                let name = format!("{} ({})", self.directory.name_of(&m.org), m.name);
                match m.revoked_at {
                    None => Author { key: actor_hex.to_string(), status: AuthorStatus::Enrolled, label: name },
                    Some(at) => Author {
                        key: actor_hex.to_string(),
                        status: AuthorStatus::Revoked,
                        label: format!("{name}, nyckel {short} återkallad {}", at.format("%Y-%m-%d")),
                    },
                }
            }
            _ => unknown(AuthorStatus::NotEnrolled),
        }
    }

    /// [`Self::author`]'s label.
    pub fn describe_actor(&self, actor_hex: &str) -> String {
        self.author(actor_hex).label
    }

    /// Creates a signer key for a person who approves documents, with the
    /// organisation (default: this node's) and role title they sign as.
    /// Returns the profile; its public key goes to the relay operator
    /// (`samverkan-relay enroll --key <hex> --org <org> --name <name> --signer-role <role>`).
    pub fn create_signer(&self, name: &str, role: &str, org: Option<&str>) -> Result<SignerProfile, NodeError> {
        self.create_signer_with(name, role, org, None)
    }

    /// [`Self::create_signer`], with the key sealed by `passphrase` when one is
    /// given (see [`crate::signer_key`]); without one the key file is
    /// unprotected (owner-only mode), as keys made before passphrases were.
    pub fn create_signer_with(
        &self,
        name: &str,
        role: &str,
        org: Option<&str>,
        passphrase: Option<&str>,
    ) -> Result<SignerProfile, NodeError> {
        let slug = signer_slug(name)?;
        let org = match org {
            Some(o) => self
                .directory
                .resolve(o)
                .ok_or_else(|| NodeError::Model(ModelError::UnknownOrganisation(o.to_string())))?
                .id
                .clone(),
            None => self.org.clone(),
        };
        let role = role.trim();
        if role.is_empty() || role.chars().any(char::is_control) {
            return Err(
                ApprovalError::Invalid { field: "role", reason: "empty or with control characters".into() }.into()
            );
        }
        let dir = self.data_dir.join(SIGNERS_DIR);
        keyfile::create_private_dir(&dir)?;
        let key_path = dir.join(format!("{slug}.key"));
        if key_path.exists() {
            return Err(NodeError::SignerExists(name.to_string()));
        }
        let key = NodeKey::generate();
        // Sealed before anything is written: a short passphrase leaves no files behind.
        let sealed = passphrase.map(|p| crate::signer_key::seal(&key, p)).transpose()?;
        let profile = SignerProfile { name: name.trim().to_string(), org, role: role.to_string(), key: key.node_id() };
        let profile_path = dir.join(format!("{slug}.json"));
        let text = serde_json::to_string_pretty(&profile).unwrap_or_default();
        std::fs::write(&profile_path, text)
            .map_err(|e| NodeError::File { path: profile_path.clone(), reason: e.to_string() })?;
        match sealed {
            Some(text) => crate::signer_key::write(&key_path, &text, false)?,
            None => keyfile::create(&key_path, &key)?,
        }
        Ok(profile)
    }

    /// The signers on this node.
    pub fn signers(&self) -> Result<Vec<SignerProfile>, NodeError> {
        let dir = self.data_dir.join(SIGNERS_DIR);
        let Ok(entries) = std::fs::read_dir(&dir) else { return Ok(Vec::new()) };
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "json") {
                out.push(read_profile(&path)?);
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// A signer's key and profile, by name (or file name).
    pub fn signer(&self, name: &str) -> Result<(NodeKey, SignerProfile), NodeError> {
        self.signer_with(name, None).map(|(key, profile, _)| (key, profile))
    }

    /// Whether a signer's key on this node is protected by a passphrase.
    pub fn signer_protection(&self, name: &str) -> Result<crate::signer_key::Protection, NodeError> {
        let slug = signer_slug(name).map_err(|_| NodeError::NoSuchSigner(name.to_string()))?;
        Ok(crate::signer_key::protection(&self.data_dir.join(SIGNERS_DIR).join(format!("{slug}.key")))?)
    }

    /// Seals an older, unprotected signer key with `passphrase` (the key stays
    /// the same, so its enrollment does too). A protected key needs its
    /// current passphrase as `old` and gets the new one.
    pub fn protect_signer(&self, name: &str, old: Option<&str>, passphrase: &str) -> Result<(), NodeError> {
        let (key, _, _) = self.signer_with(name, old)?;
        let slug = signer_slug(name).map_err(|_| NodeError::NoSuchSigner(name.to_string()))?;
        let text = crate::signer_key::seal(&key, passphrase)?;
        crate::signer_key::write(&self.data_dir.join(SIGNERS_DIR).join(format!("{slug}.key")), &text, true)?;
        Ok(())
    }

    /// A signer's key and profile, opening a protected key with `passphrase`;
    /// also says whether the key was protected (an older key is not).
    pub fn signer_with(
        &self,
        name: &str,
        passphrase: Option<&str>,
    ) -> Result<(NodeKey, SignerProfile, crate::signer_key::Protection), NodeError> {
        let slug = signer_slug(name).map_err(|_| NodeError::NoSuchSigner(name.to_string()))?;
        let dir = self.data_dir.join(SIGNERS_DIR);
        let profile_path = dir.join(format!("{slug}.json"));
        if !profile_path.exists() {
            return Err(NodeError::NoSuchSigner(name.to_string()));
        }
        let profile = read_profile(&profile_path)?;
        let (key, protection) = crate::signer_key::load(&dir.join(format!("{slug}.key")), &profile.name, passphrase)?;
        if key.node_id() != profile.key {
            return Err(NodeError::File { path: profile_path, reason: "does not belong to the key beside it".into() });
        }
        Ok((key, profile, protection))
    }

    /// Signs the document's current version as `signer` and stores the
    /// approval in the document (one change; it syncs like any edit). The
    /// signed heads are those before the record is added. Refused unless the
    /// enrollment directory this node holds shows the signer enrolled with
    /// that organisation and role (the relay would refuse the record anyway).
    pub fn approve(&mut self, id: &DocId, signer: &str) -> Result<ApprovalRecord, NodeError> {
        self.approve_with(id, signer, None)
    }

    /// [`Self::approve`], opening a protected signer key with `passphrase`.
    pub fn approve_with(
        &mut self,
        id: &DocId,
        signer: &str,
        passphrase: Option<&str>,
    ) -> Result<ApprovalRecord, NodeError> {
        let (key, profile, _) = self.signer_with(signer, passphrase)?;
        let status = self.approval_status(id)?;
        let signed_current = [&status.in_force, &status.pending]
            .into_iter()
            .flatten()
            .any(|v| v.is_current && v.signed.iter().any(|s| s.signer == key.node_id()));
        // An approval made here and not yet received by the relay counts too,
        // unless a withdrawal of it also awaits the relay.
        let awaiting_current = {
            let mut doc = self.document(id)?;
            let current = doc.view()?;
            let mut found = false;
            let me = key.node_id();
            let mine = |action| status.awaiting_receipt.iter().filter(move |a| a.action == action && a.signer == me);
            for a in mine(Action::Approve) {
                if mine(Action::Withdraw).any(|w| w.heads == a.heads && w.signed_at >= a.signed_at) {
                    continue;
                }
                if doc.at(&a.heads)?.view()? == current {
                    found = true;
                    break;
                }
            }
            found
        };
        if signed_current || awaiting_current {
            return Err(NodeError::AlreadySigned(profile.name));
        }
        self.sign_and_store(id, |doc| {
            let required = doc.view()?.signatories;
            if !required.iter().any(|s| s.org == profile.org && s.role.trim() == profile.role) {
                return Err(NodeError::NotASignatory {
                    name: profile.name.clone(),
                    role: profile.role.clone(),
                    org: profile.org.clone(),
                });
            }
            let heads = doc.heads();
            Ok(ApprovalRecord::sign(Action::Approve, id, &heads, &key, profile.org.clone(), &profile.role, Utc::now())?)
        })
    }

    /// Withdraws `signer`'s latest approval of the document: a signed record
    /// over the heads that approval signed.
    pub fn withdraw(&mut self, id: &DocId, signer: &str) -> Result<ApprovalRecord, NodeError> {
        self.withdraw_with(id, signer, None)
    }

    /// [`Self::withdraw`], opening a protected signer key with `passphrase`.
    pub fn withdraw_with(
        &mut self,
        id: &DocId,
        signer: &str,
        passphrase: Option<&str>,
    ) -> Result<ApprovalRecord, NodeError> {
        let (key, profile, _) = self.signer_with(signer, passphrase)?;
        self.sign_and_store(id, |doc| {
            let latest = approval::records(doc)
                .into_iter()
                .filter_map(|(_, r)| r.ok())
                .filter(|r| r.action == Action::Approve && r.signer == key.node_id())
                .max_by_key(|r| r.signed_at)
                .ok_or_else(|| NodeError::NothingToWithdraw(profile.name.clone()))?;
            let at = Utc::now().max(latest.signed_at);
            Ok(ApprovalRecord::sign(Action::Withdraw, id, &latest.heads, &key, profile.org.clone(), &profile.role, at)?)
        })
    }

    fn sign_and_store(
        &mut self,
        id: &DocId,
        make: impl FnOnce(&mut Document) -> Result<ApprovalRecord, NodeError>,
    ) -> Result<ApprovalRecord, NodeError> {
        self.writable(id)?;
        // A record the relay would refuse would block this document's sync: check first.
        let enrolled = self.enrollment()?.ok_or(NodeError::NoDirectory)?;
        let ctx = self.edit_context();
        let directory = &self.directory;
        let (record, _) = self.store.update(id, false, |doc| -> Result<_, NodeError> {
            let record = make(doc)?;
            if let Err(problem) = record.verify(id, &enrolled) {
                let name = enrolled.latest(&record.signer).map(|m| m.name.clone());
                return Err(NodeError::SignerNotEnrolled {
                    name: name.unwrap_or_else(|| record.signer.short()),
                    problem,
                });
            }
            approval::append(doc, &ctx, directory, &record)?;
            Ok(record)
        })?;
        Ok(record)
    }

    /// The document's approval state, verified with the enrollment directory
    /// this node holds (an empty one before the first sync: every record is
    /// then flagged) and the relay's receipts it holds (a record counts only
    /// once the relay has received it).
    pub fn approval_status(&self, id: &DocId) -> Result<ApprovalStatus, NodeError> {
        let directory = self.enrollment()?.unwrap_or_default();
        let mut doc = self.document(id)?;
        Ok(approval::approval_status(&mut doc, &directory, &self.receipts(id)?)?)
    }

    /// The relay's receipts of a document's approval records held here that
    /// verify with the pinned relay key (none before a relay is pinned).
    pub fn receipts(&self, id: &DocId) -> Result<Receipts, NodeError> {
        let Some(relay) = self.pinned_relay()? else { return Ok(Receipts::none()) };
        let mut book = Receipts::new(relay);
        for problem in book.extend(self.store.receipts(id)?) {
            tracing::warn!(doc = %id, %problem, "a stored approval receipt does not verify with the pinned relay key");
        }
        Ok(book)
    }

    /// Keeps the receipts that verify with `relay`'s key (received from the
    /// relay, or in a bundle); returns how many were new and the problems of
    /// those refused.
    pub fn store_receipts(
        &mut self,
        receipts: Vec<ApprovalReceipt>,
        relay: &NodeId,
    ) -> Result<(usize, Vec<ReceiptProblem>), NodeError> {
        let mut problems = Vec::new();
        let mut valid = Vec::new();
        for receipt in receipts {
            match receipt.verify(relay) {
                Ok(()) => valid.push(receipt),
                Err(problem) => problems.push(problem),
            }
        }
        Ok((self.store.add_receipts(&valid)?, problems))
    }

    /// Writes the signed bundle of the version in force (see
    /// [`samverkan_shared::signed_bundle`]) into `dir`, creating it.
    pub fn export_signed(
        &self,
        id: &DocId,
        dir: &Path,
    ) -> Result<samverkan_shared::signed_bundle::BundleFiles, NodeError> {
        use samverkan_shared::signed_bundle;
        let (Some(relay), Some(text)) = (self.pinned_relay()?, self.store.meta(META_DIRECTORY)?) else {
            return Err(NodeError::NoDirectory);
        };
        let signed = SignedDirectory::decode(text.as_bytes())?;
        let directory = signed.verify(&relay)?;
        let mut doc = self.document(id)?;
        let book = self.receipts(id)?;
        let status = approval::approval_status(&mut doc, &directory, &book)?;
        let version = status.in_force.ok_or_else(|| NodeError::NotApproved(id.clone()))?;
        let records = approval::records_of(&doc, &version);
        let receipts = records.iter().filter_map(|r| book.get(id, &r.signature).cloned()).collect();
        let files = signed_bundle::create(&mut doc, records, receipts, signed)?;
        let io = |path: PathBuf| move |e: std::io::Error| NodeError::File { path, reason: e.to_string() };
        std::fs::create_dir_all(dir).map_err(io(dir.to_path_buf()))?;
        for (name, bytes) in [
            (signed_bundle::MARKDOWN_FILE, files.markdown.as_bytes()),
            (signed_bundle::HISTORY_FILE, files.history.as_slice()),
            (signed_bundle::MANIFEST_FILE, files.manifest.as_bytes()),
        ] {
            let path = dir.join(name);
            std::fs::write(&path, bytes).map_err(io(path.clone()))?;
        }
        Ok(files)
    }

    /// Integrity check of the store; returns the problems found.
    pub fn check(&self) -> Result<Vec<String>, NodeError> {
        Ok(self.store.check()?)
    }

    /// Stores a document received from elsewhere (whole bytes) — used by tests and sync.
    pub fn merge_bytes(&mut self, id: &DocId, data: &[u8]) -> Result<UpdateOutcome, NodeError> {
        let (_, outcome) = self.store.update(id, true, |doc| -> Result<(), NodeError> {
            doc.automerge_mut().load_incremental(data).map_err(ModelError::from)?;
            Ok(doc.check_header()?)
        })?;
        Ok(outcome)
    }
}

fn read_profile(path: &Path) -> Result<SignerProfile, NodeError> {
    let bad = |reason: String| NodeError::File { path: path.to_path_buf(), reason };
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    serde_json::from_str(&text).map_err(|e| bad(format!("not a signer profile: {e}")))
}

/// The headings a new document of each kind starts with (from the domain's document structure).
pub fn template(kind: DocKind) -> &'static str {
    match kind {
        DocKind::Agreement => {
            "## Bakgrund\n\n## Definitioner\n\n## Övergripande mål\n\n## Fokusområden\n\n## Organisation\n"
        }
        // The marker line is where the table of the activities appears when exported.
        DocKind::CitizenPromise => {
            "## Problembild\n\n## Vi lovar\n\n<!-- samverkan:aktiviteter | Aktivitet | Ansvarig | Klart | Uppföljning | -->\n\n## Så följer vi upp\n"
        }
        DocKind::OperationsPlan => {
            "## Lägesbild\n\n## Åtgärder\n\n<!-- samverkan:aktiviteter | Aktivitet | Ansvarig | Klart | Uppföljning | Status | -->\n\n## Uppföljning och utvärdering\n"
        }
    }
}

/// Why a document does not sync through the relay from this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyncProblem {
    /// This node's organisation is not among the document's parties.
    NotAParty,
    /// The relay refused the document (no longer shared, or its changes).
    Refused(DocRefusal),
}

impl SyncProblem {
    /// A few words for lists (`samverkan-node list`).
    pub fn short(&self) -> &'static str {
        match self {
            SyncProblem::NotAParty => "not synced: your organisation is not a party",
            SyncProblem::Refused(r) if r.kind == RefusalKind::NotShared => "no longer shared with you (read-only)",
            SyncProblem::Refused(_) => "refused by the relay: see `samverkan-node recover`",
        }
    }
}

/// One line saying what a recorded refusal means for the user and what to do.
pub fn refusal_note(refusal: &DocRefusal) -> String {
    let doc = refusal.doc.short();
    match refusal.kind {
        RefusalKind::NotShared => format!(
            "no longer shared with your organisation: the relay refused document {doc} ({}); this node keeps its copy read-only",
            refusal.reason
        ),
        _ => format!(
            "the relay refused this node's changes to document {doc} ({}); it is not synced until they are recovered: run `samverkan-node recover {doc}`",
            refusal.reason
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VASTMANLAND: &str = r#"
[[county]]
id = "vastmanland"
name = "Västmanlands län"

[[organisation]]
id = "polisomrade-vastmanland"
county = "vastmanland"
kind = "police"
name = "Polisområde Västmanland"

[[organisation.unit]]
name = "Lokalpolisområde Västerås"
kind = "local_police_area"
covers = ["vasteras-stad"]

[[organisation]]
id = "vasteras-stad"
county = "vastmanland"
kind = "municipality"
name = "Västerås stad"
aliases = ["Västerås"]
"#;

    #[test]
    fn a_data_directorys_organisations_file_adds_another_county_and_a_bad_one_is_named() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("node");
        keyfile::create_private_dir(&dir).unwrap();
        std::fs::write(dir.join(ORGANISATIONS_FILE), VASTMANLAND).unwrap();
        let mut node = Node::init(&dir, "Västerås", None).unwrap();
        assert_eq!(node.org().as_str(), "vasteras-stad");
        let text = "# Medborgarlöfte 2025 för Västerås stad och Lokalpolisområde Västerås\n\n## Vi lovar\n\n- Trygghetsvandringar (ansvar: kommunen och polisen; klart: löpande)\n";
        let (id, _) = node.import_markdown(text, None).unwrap();
        let view = Node::open(&dir).unwrap().document(&id).unwrap().view().unwrap();
        let police = OrgId::new("polisomrade-vastmanland").unwrap();
        assert_eq!(view.parties, [OrgId::new("vasteras-stad").unwrap(), police.clone()]);
        assert_eq!(view.party_units[&police], "Lokalpolisområde Västerås");
        assert_eq!(view.activities[0].owners.len(), 2);
        // Södermanland is still there.
        assert!(node.directory().resolve("Flen").is_some());

        std::fs::write(dir.join(ORGANISATIONS_FILE), "[[organisation]]\nid = 'x'\nname = 'X'\n").unwrap();
        let Err(err) = Node::open(&dir) else { panic!("a broken organisations.toml is refused") };
        let err = err.to_string();
        assert!(err.contains("organisations.toml") && err.contains("kind"), "{err}");
    }
}
