//! A node's data directory and everything one can do with it offline.
//!
//! [`Node`] ties the store, the node's identity key and the organisation
//! directory together, and is what the CLI (and later the sync daemon) calls.
//!
//! Data directory layout:
//! - `node.db`: the SQLite store (documents, changes, metadata: organisation, name);
//! - `node.key`: the node's ed25519 secret key, owner read/write only.

use std::path::{Path, PathBuf};

use automerge::ChangeHash;
use chrono::Utc;
use samverkan_shared::authorship::{self, AuthorshipError};
use samverkan_shared::bundle::{Bundle, BundleDoc, BundleError, BundleOrigin, HeadsSummary};
use samverkan_shared::directory::{DirectoryError, EnrollmentDirectory, SignedDirectory};
use samverkan_shared::identity::{NodeId, NodeKey};
use samverkan_shared::ids::DocId;
use samverkan_shared::markdown::{self, MarkdownError};
use samverkan_shared::model::{DocKind, Document, DocumentContent, EditContext, Editor, ModelError};
use samverkan_shared::org::{Directory, OrgId};
use samverkan_shared::sync::SignedChange;
use serde::Serialize;

use crate::store::keyfile::{self, KeyFileError};
use crate::store::{DocSummary, Store, StoreError, UpdateOutcome};

/// File name of the store inside the data directory.
pub const DB_FILE: &str = "node.db";
/// File name of the secret key inside the data directory.
pub const KEY_FILE: &str = "node.key";
/// Metadata key of the relay's address (host:port).
pub const META_RELAY_ADDRESS: &str = "relay.address";
/// Metadata key of the relay's pinned public key.
pub const META_RELAY_KEY: &str = "relay.key";
/// Metadata key of the last signed enrollment directory received from the relay.
pub const META_DIRECTORY: &str = "relay.directory";

/// Errors of node operations.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The data directory has no node yet.
    #[error("{0} holds no Samverkan node; run `samverkan-node init --org <organisation>` first")]
    NotInitialised(PathBuf),
    /// `init` on a directory that already has a node.
    #[error("{0} already holds a Samverkan node")]
    AlreadyInitialised(PathBuf),
    /// No document matches an id or prefix.
    #[error("no document matches {0:?} (see `samverkan-node list`)")]
    NoSuchDocument(String),
    /// Several documents match a prefix.
    #[error("{0:?} matches several documents: {1}; give more of the id")]
    AmbiguousDocument(String, String),
    /// The document changed on this node while it was being edited in an editor.
    #[error("document {0} was changed on this node while you edited it; your version is kept in {1}: run `samverkan-node edit` again and copy your changes over")]
    ChangedDuringEdit(DocId, PathBuf),
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
}

impl Node {
    /// Creates a node in `data_dir` for organisation `org` (id, name or alias).
    pub fn init(data_dir: &Path, org: &str, name: Option<&str>) -> Result<Self, NodeError> {
        let directory = Directory::sodermanland();
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
        Ok(Self { data_dir: data_dir.to_path_buf(), store, key, org: org.id, name, directory })
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
        Ok(Self { data_dir: data_dir.to_path_buf(), store, key, org, name, directory: Directory::sodermanland() })
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
    pub fn import_markdown(&mut self, text: &str, kind: Option<DocKind>) -> Result<(DocId, Vec<String>), NodeError> {
        let imported = markdown::import(text, &self.directory, kind)?;
        if let Some(id) = imported.id.filter(|id| self.store.contains(id).unwrap_or(false)) {
            let view = imported.content.into_view(id.clone());
            self.edit(&id, "import Markdown", |e| e.apply(&view))?;
            return Ok((id, vec!["updated the existing document".to_string()]));
        }
        let id = self.create(imported.content)?;
        Ok((id, imported.recognised))
    }

    /// Makes one edit of a document, durably; returns `f`'s result and the
    /// change hash (`None` if nothing changed).
    pub fn edit<T>(
        &mut self,
        id: &DocId,
        message: &str,
        f: impl FnOnce(&mut Editor<'_>) -> Result<T, ModelError>,
    ) -> Result<(T, Option<ChangeHash>), NodeError> {
        let ctx = self.edit_context();
        let directory = &self.directory;
        let (result, _) = self
            .store
            .update(id, false, |doc| -> Result<_, NodeError> { Ok(doc.edit(&ctx, directory, message, f)?) })?;
        Ok(result)
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
        for mut doc in self.store.ids()?.into_iter().map(|id| self.store.load(&id)).collect::<Result<Vec<_>, _>>()? {
            let heads = doc.heads();
            summary.insert(doc.id().clone(), &heads);
        }
        Ok(summary)
    }

    /// A bundle of every document's changes; with `have`, only what that node lacks.
    pub fn export_bundle(&self, have: Option<&HeadsSummary>) -> Result<Bundle, NodeError> {
        let mut docs = Vec::new();
        for id in self.store.ids()? {
            let mut doc = self.store.load(&id)?;
            // What the receiver has of this document (none without a heads summary).
            let theirs = match have {
                Some(have) => have.heads(&id)?,
                None => Vec::new(),
            };
            let known: Vec<ChangeHash> =
                theirs.iter().copied().filter(|h| doc.automerge_mut().get_change_by_hash(h).is_some()).collect();
            let new_changes = doc.automerge_mut().get_changes(&known);
            if !theirs.is_empty() && known.len() == theirs.len() && new_changes.is_empty() {
                continue; // They have everything we have.
            }
            let data =
                if known.is_empty() { doc.automerge_mut().save() } else { doc.automerge_mut().save_after(&known) };
            let signatures = self.signatures_of(new_changes)?;
            docs.push(BundleDoc { id, data, signatures });
        }
        Ok(Bundle {
            origin: BundleOrigin {
                node: self.node_id().to_string(),
                org: self.org.to_string(),
                name: self.name.clone(),
                created: Utc::now(),
            },
            docs,
        })
    }

    /// Imports a bundle: each document's changes are merged and stored durably.
    /// A document that cannot be used is reported and skipped; the others still import.
    pub fn import_bundle(&mut self, bundle: &Bundle) -> Result<Vec<BundleDocReport>, NodeError> {
        let mut reports = Vec::new();
        for item in &bundle.docs {
            let mut offered: std::collections::HashMap<_, _> = item.signatures.iter().copied().collect();
            let result = self.store.update_signed(&item.id, true, |doc| -> Result<_, NodeError> {
                let before = doc.heads();
                doc.automerge_mut().load_incremental(&item.data).map_err(ModelError::from)?;
                doc.check_header()?;
                let verified = authorship::verify_new_changes(doc.automerge_mut(), &before, &mut offered)?;
                Ok((doc.automerge_mut().get_missing_deps(&[]).len(), verified))
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
        Ok(reports)
    }

    /// The authors' signatures of these changes: this node's own are signed
    /// now, others' come from the store (unknown ones are left out).
    fn signatures_of(&self, changes: Vec<automerge::Change>) -> Result<Vec<SignedChange>, NodeError> {
        let own = self.node_id().actor_id();
        let mut out = Vec::new();
        let mut theirs = Vec::new();
        for change in changes {
            if change.actor_id() == &own {
                out.push((change.hash(), authorship::sign(&self.key, &change.hash())));
            } else {
                theirs.push(change.hash());
            }
        }
        out.extend(self.store.signatures(&theirs)?);
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
        let (Some(relay), Some(text)) = (self.pinned_relay()?, self.store.meta(META_DIRECTORY)?) else {
            return Ok(None);
        };
        Ok(Some(SignedDirectory::decode(text.as_bytes())?.verify(&relay)?))
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
        Ok(directory)
    }

    /// Name of the node and organisation behind a hex actor id, as far as this
    /// node knows: from the relay's signed directory first, then from what the
    /// document itself says (unverified), else the key's short form.
    pub fn describe_actor(&self, doc: &Document, actor_hex: &str) -> String {
        if actor_hex == self.node_id().actor_id().to_hex_string() {
            return format!("{} ({})", self.directory.name_of(&self.org), self.name);
        }
        let key = hex::decode(actor_hex).ok().and_then(|b| NodeId::from_actor(&automerge::ActorId::from(b)));
        if let (Some(key), Ok(Some(enrolled))) = (key, self.enrollment()) {
            if let Some(member) = enrolled.latest(&key) {
                return format!("{} ({})", self.directory.name_of(&member.org), member.name);
            }
        }
        let contributors = doc.contributors().unwrap_or_default();
        match contributors.get(actor_hex) {
            Some(c) => format!("{} ({})", self.directory.name_of(&c.org), c.node),
            None => format!("okänd nod {}", key.map(|n| n.short()).unwrap_or_else(|| "?".into())),
        }
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
