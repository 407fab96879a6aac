//! The collaboration documents as typed Rust over Automerge.
//!
//! Owns the document schema (which keys hold what), reading a document into a
//! [`DocumentView`], every kind of edit (each one Automerge change with a message
//! and a time), validation, conflicts and history. Never does I/O: callers load
//! and store the bytes.
//!
//! Schema (root map of every document):
//!
//! | key | Automerge type | meaning |
//! |---|---|---|
//! | `schema` | uint | schema version, [`SCHEMA_VERSION`] |
//! | `id`, `kind`, `scope` | str | identity and kind |
//! | `title`, `body` | text | free text, merged character by character |
//! | `parties` | list of str | organisation ids: who the document reaches (access control) |
//! | `party_units` | map org id → str | the unit a party acts through ("Lokalpolisområde Katrineholm"); display and signatures only |
//! | `period` | map `start`/`end` (str dates) | validity |
//! | `place`, `date` | str | place and date as printed |
//! | `signatories` | list of map `org`/`role`/`name` | required signatures |
//! | `goals`, `activities`, `followups`, `meetings` | list of map with `id` | structured parts |
//! | `activities[].owners` | list of str | `org-id`, `org-id/unit` or `extern:name` ([`Owner`]); legacy `owner` (one org id) is read while it is absent |
//! | `activities[].deadline` | str | `YYYY-MM-DD`, `YYYY-Qn`, `ongoing` (löpande) or words ([`Due`]); legacy `due` (a date) is read while it is absent |
//! | `activities[].followup_method` | text | how the activity is followed up |
//! | `approvals` | list of map of str | signed approval/withdrawal records, written once (see [`crate::approval`]) |
//! | `reviews` | list of map of str | overlapping edits someone reviewed: change hashes `a`/`b`, `field`, `paragraph`, `how`, `at`; written once (see [`overlap`]) |
//! | `contributors` | map actor hex → map `org`/`node` | who each actor is (self-declared) |
//!
//! Free text is Automerge text (two offline edits of one paragraph merge per
//! character); lists are Automerge lists (concurrent additions both survive);
//! everything else is a scalar, where concurrent puts leave a conflict that
//! [`Document::conflicts`] reports until someone sets the field again.

mod at;
mod describe;
mod edit;
mod fields;
mod graph;
mod history;
pub mod overlap;
mod owners;
mod paragraphs;
mod read;
mod types;

use std::collections::BTreeMap;

use automerge::{AutoCommit, ChangeHash, ReadDoc};
use chrono::{DateTime, NaiveDate, Utc};
use serde::Serialize;

pub use describe::{describe, field_name, FieldChange};
pub use edit::{parse_date, Editor};
pub use fields::StoredFields;
pub use history::DescribedChange;
pub use overlap::{Overlap, OverlapSide, ReviewMark, Take};
pub use owners::{canonical_owner, PartyContext};
pub use types::*;

use crate::identity::NodeId;
use crate::ids::DocId;
use crate::org::OrgId;

/// The parties of document `id` read from a bare Automerge document, after
/// checking its header (for drivers that hold no [`Document`], such as
/// [`crate::sync::MemoryDocs`]).
pub(crate) fn parties_of(id: &DocId, doc: &AutoCommit) -> Result<Vec<crate::org::OrgId>, ModelError> {
    read::check_header(doc, id)?;
    read::parties(doc)
}

/// Version of the document schema this build writes and reads.
///
/// Still 1 with owners, deadlines in words and party units: those are new keys
/// (`owners`, `deadline`, `followup_method`, `party_units`) that older programs
/// ignore rather than misread, and this build reads the older keys (`owner`,
/// `due`) where the new ones are absent. Raising it would make older relays refuse
/// new documents.
pub const SCHEMA_VERSION: u64 = 1;

/// Errors from reading or editing a document.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A title must say something.
    #[error("the title is empty")]
    EmptyTitle,
    /// The validity period ends before it starts.
    #[error("the period ends ({end}) before it starts ({start})")]
    PeriodEndsBeforeStart {
        /// First day.
        start: NaiveDate,
        /// Last day.
        end: NaiveDate,
    },
    /// An organisation not in the directory.
    #[error("unknown organisation {0:?} (see `samverkan-node orgs` for the known ones)")]
    UnknownOrganisation(String),
    /// An activity owner that is neither an organisation nor a unit the directory knows.
    #[error("unknown organisation {0:?} (see `samverkan-node orgs`; a unit is written \"Flens kommun (tekniska förvaltningen)\", someone outside the directory \"extern: {0}\")")]
    UnknownOwner(String),
    /// A value that does not parse for its field.
    #[error("invalid value {value:?} for {field}: {reason}")]
    InvalidValue {
        /// The field.
        field: String,
        /// What was given.
        value: String,
        /// Why it is wrong.
        reason: String,
    },
    /// A field path the document does not have.
    #[error("unknown field {0:?}; fields: title, body, scope, parties, period.start, period.end, place, date, activities.<id>.(what|owners|due|followup_method|status), party_units.<org>, goals.<id>.text, followups.<id>.(date|author|text|activity), meetings.<id>.(date|body|notes), signatories.<n>.(org|role|name)")]
    UnknownField(String),
    /// No item with that id in the list.
    #[error("no item {id:?} in {list}")]
    NoSuchItem {
        /// The list.
        list: &'static str,
        /// The id or prefix looked for.
        id: String,
    },
    /// The id prefix matches several items.
    #[error("{id:?} matches several items in {list}; give more of the id")]
    AmbiguousItem {
        /// The list.
        list: &'static str,
        /// The prefix.
        id: String,
    },
    /// The Automerge document does not follow the schema.
    #[error("document does not follow the schema at {path}: {reason}")]
    Malformed {
        /// Where.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// The document was written by a newer Samverkan.
    #[error(
        "document schema version {found} is newer than this program understands ({SCHEMA_VERSION}); upgrade samverkan"
    )]
    NewerSchema {
        /// The version found.
        found: u64,
    },
    /// The bytes hold a different document than the id says.
    #[error("expected document {expected} but the data holds {found}")]
    WrongDocument {
        /// The id asked for.
        expected: DocId,
        /// The id in the data.
        found: String,
    },
    /// Automerge refused an operation or could not load bytes.
    #[error("automerge: {0}")]
    Automerge(#[from] automerge::AutomergeError),
}

/// Who is editing, and when: attached to every change.
#[derive(Debug, Clone)]
pub struct EditContext {
    /// The node making the change (its key is the Automerge actor).
    pub author: NodeId,
    /// The node's organisation.
    pub org: OrgId,
    /// The node's display name.
    pub node_name: String,
    /// The time recorded in the change (advisory).
    pub time: DateTime<Utc>,
}

/// A node as it declared itself in a document's `contributors` map.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Contributor {
    /// The organisation it declared.
    pub org: OrgId,
    /// Its display name.
    pub node: String,
}

/// One scalar field where concurrent edits left more than one value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Conflict {
    /// The field path, as `samverkan-node set` takes it.
    pub path: String,
    /// Every concurrent value; the first is the one currently shown.
    pub values: Vec<ConflictValue>,
}

/// One of the values in a [`Conflict`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConflictValue {
    /// The value, as text.
    pub value: String,
    /// Hex actor id of the node that wrote it.
    pub actor: String,
}

/// One change in a document's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HistoryEntry {
    /// Change hash (hex).
    pub hash: String,
    /// Hex actor id of the author.
    pub actor: String,
    /// The author's sequence number.
    pub seq: u64,
    /// Recorded time, if the author set one.
    pub time: Option<DateTime<Utc>>,
    /// What the change did.
    pub message: Option<String>,
}

/// A collaboration document: an Automerge document that follows the schema.
#[derive(Debug, Clone)]
pub struct Document {
    id: DocId,
    doc: AutoCommit,
    /// The stored fields as last read, with the heads they were read at.
    fields: Option<Box<fields::FieldsAt>>,
}

impl Document {
    /// Creates a document with the given content, as one change by `ctx`.
    pub fn create(
        id: DocId,
        content: DocumentContent,
        ctx: &EditContext,
        directory: &crate::org::Directory,
    ) -> Result<Self, ModelError> {
        let mut doc = Self { id: id.clone(), doc: AutoCommit::new().with_actor(ctx.author.actor_id()), fields: None };
        let view = content.into_view(id);
        doc.edit(ctx, directory, &format!("create {}", view.kind.label()), |e| e.initialise(&view))?;
        Ok(doc)
    }

    /// Loads a document from saved bytes (a full save followed by any incremental saves),
    /// checking that it is the document `id` and follows the schema.
    pub fn load(id: DocId, bytes: &[u8]) -> Result<Self, ModelError> {
        Self::from_automerge(id, AutoCommit::load(bytes)?)
    }

    /// Wraps an Automerge document, checking that it is the document `id` and
    /// that its schema version is one this build reads.
    pub fn from_automerge(id: DocId, doc: AutoCommit) -> Result<Self, ModelError> {
        read::check_header(&doc, &id)?;
        Ok(Self { id, doc, fields: None })
    }

    /// Wraps an Automerge document that was checked by [`Self::from_automerge`]
    /// (or [`Self::check_header`]) and not changed since: a store's cached
    /// copy taken out and put back. Anything else goes through
    /// [`Self::from_automerge`].
    pub fn from_checked(id: DocId, doc: AutoCommit) -> Self {
        Self { id, doc, fields: None }
    }

    /// Wraps an Automerge document without checking it (for the in-memory
    /// driver, [`crate::sync::MemoryDocs`], which holds whatever a peer or a
    /// test gives it and checks where the real drivers check).
    pub(crate) fn unchecked(id: DocId, doc: AutoCommit) -> Self {
        Self { id, doc, fields: None }
    }

    /// Checks that the document is still the one its id names and in a schema
    /// version this build reads (after merging changes from elsewhere).
    pub fn check_header(&self) -> Result<(), ModelError> {
        read::check_header(&self.doc, &self.id)
    }

    /// The document id.
    pub fn id(&self) -> &DocId {
        &self.id
    }

    /// The underlying Automerge document (for saving and syncing).
    pub fn automerge(&self) -> &AutoCommit {
        &self.doc
    }

    /// The underlying Automerge document, mutably (for saving and syncing).
    /// Edit content through [`Document::edit`] instead.
    pub fn automerge_mut(&mut self) -> &mut AutoCommit {
        &mut self.doc
    }

    /// The underlying Automerge document, taking it out of the wrapper.
    pub fn into_automerge(self) -> AutoCommit {
        self.doc
    }

    /// The current heads (the exact version).
    pub fn heads(&mut self) -> Vec<ChangeHash> {
        self.doc.get_heads()
    }

    /// Reads the whole document.
    pub fn view(&self) -> Result<DocumentView, ModelError> {
        read::view(&self.doc, &self.id)
    }

    /// The title, without reading the rest.
    pub fn title(&self) -> Result<String, ModelError> {
        read::get_text(&self.doc, &automerge::ROOT, read::keys::TITLE, read::keys::TITLE)
    }

    /// The parties (organisations) of the document, without reading the rest.
    pub fn parties(&self) -> Result<Vec<crate::org::OrgId>, ModelError> {
        read::parties(&self.doc)
    }

    /// The fields a store keeps beside this version (kind, title, parties),
    /// read now after checking the header, and remembered with the heads.
    pub fn stored_fields(&mut self) -> Result<StoredFields, ModelError> {
        let heads = self.doc.get_heads();
        let read = fields::FieldsAt::read(&self.doc, &self.id, heads)?;
        let out = read.fields().clone();
        self.fields = Some(Box::new(read));
        Ok(out)
    }

    /// [`Self::stored_fields`] where they were last read at `before` and
    /// `new` holds every change since: only what those changes touched is
    /// read again (the title's text, the parties' list); everything, with
    /// the header, if one touched the root map or they were read elsewhere.
    pub fn stored_fields_after(
        &mut self,
        before: &[ChangeHash],
        new: &[automerge::Change],
    ) -> Result<StoredFields, ModelError> {
        let now = self.doc.get_heads();
        if let Some(fields) = &mut self.fields {
            if fields.advance(&self.doc, before, new, now)? {
                return Ok(fields.fields().clone());
            }
        }
        self.stored_fields()
    }

    /// The document kind, without reading the rest.
    pub fn kind(&self) -> Result<DocKind, ModelError> {
        read::kind(&self.doc)
    }

    /// Makes one change: runs `f` on an [`Editor`] and commits what it did as a
    /// single Automerge change with `message` and the context's time. If `f`
    /// fails, nothing of it stays in the document. Returns `f`'s result and the
    /// change hash (`None` if `f` changed nothing).
    pub fn edit<T>(
        &mut self,
        ctx: &EditContext,
        directory: &crate::org::Directory,
        message: &str,
        f: impl FnOnce(&mut Editor<'_>) -> Result<T, ModelError>,
    ) -> Result<(T, Option<ChangeHash>), ModelError> {
        self.doc.set_actor(ctx.author.actor_id());
        let result = {
            let mut editor = Editor::new(&mut self.doc, directory);
            f(&mut editor)
        };
        let value = match result {
            Ok(v) => v,
            Err(e) => {
                self.doc.rollback();
                return Err(e);
            }
        };
        if automerge::transaction::Transactable::pending_ops(&self.doc) == 0 {
            return Ok((value, None));
        }
        if let Err(e) = edit::declare_contributor(&mut self.doc, ctx) {
            self.doc.rollback();
            return Err(e);
        }
        let options = automerge::transaction::CommitOptions::default()
            .with_message(message)
            .with_time(ctx.time.timestamp_millis());
        Ok((value, self.doc.commit_with(options)))
    }

    /// Scalar fields where concurrent edits left several values.
    pub fn conflicts(&self) -> Result<Vec<Conflict>, ModelError> {
        read::conflicts(&self.doc)
    }

    /// Who each actor in the document declared itself to be, by hex actor id.
    pub fn contributors(&self) -> Result<BTreeMap<String, Contributor>, ModelError> {
        read::contributors(&self.doc)
    }

    /// Every change, oldest first (causal order).
    pub fn history(&mut self) -> Vec<HistoryEntry> {
        self.doc
            .get_changes(&[])
            .into_iter()
            .map(|c| HistoryEntry {
                hash: c.hash().to_string(),
                actor: c.actor_id().to_hex_string(),
                seq: c.seq(),
                time: (c.timestamp() != 0).then(|| DateTime::from_timestamp_millis(c.timestamp())).flatten(),
                message: c.message().map(str::to_owned),
            })
            .collect()
    }

    /// Number of changes in the document's history.
    pub fn change_count(&mut self) -> usize {
        self.doc.get_changes(&[]).len()
    }

    /// The document as it was at `heads` (for reading a signed or earlier version).
    pub fn at(&mut self, heads: &[ChangeHash]) -> Result<Document, ModelError> {
        Ok(Self { id: self.id.clone(), doc: self.doc.fork_at(heads)?, fields: None })
    }

    /// Whether the Automerge document has anything at all in it (a document
    /// received through sync starts empty until its first change arrives).
    pub fn is_empty(&self) -> bool {
        self.doc.length(automerge::ROOT) == 0
    }
}

#[cfg(test)]
mod tests;
