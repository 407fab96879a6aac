//! `samverkan-node review` and `history`: what concurrent edits need a
//! person's eye, and who changed what, in words.
//!
//! - [`open`] lists the overlapping concurrent text edits of a document
//!   ([`samverkan_shared::model::overlap`]: found from the history, the same
//!   on every node), each with the base paragraph, both versions, the merged
//!   text and both authors as the relay's signed directory names them
//!   ([`Node::author`]); [`resolve`] settles one (a side's version, the merged
//!   text, or a new text) in one durable change that also marks it reviewed.
//! - [`ReviewFlags`]: open overlaps and field conflicts of a document, counted
//!   for `show`, `export`, `list` and `status`, with the command to review them.
//! - [`history`]: every change with what it did field by field and paragraph
//!   by paragraph ([`Document::described_history`]) and its verified author.

use chrono::{DateTime, Utc};
use samverkan_shared::identity::NodeId;
use samverkan_shared::ids::DocId;
use samverkan_shared::model::{field_name, Document, DocumentView, FieldChange, ModelError, Overlap, Take};
use serde::Serialize;

use crate::node::{AuthorStatus, Node, NodeError};

/// Why an overlap could not be reviewed as asked.
#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    /// No open overlap with that number.
    #[error("document {doc} has no open overlap {n} (it has {open}; see `samverkan-node review {doc}`)")]
    NoSuchOverlap {
        /// The document (short id).
        doc: String,
        /// The number asked for.
        n: usize,
        /// How many are open.
        open: usize,
    },
    /// `--take ours|theirs` where neither side was written by this node or its organisation.
    #[error("neither version of overlap {n} was written by this node or its organisation; use --take first or --take second (as listed), merged, or --text")]
    NoOwnSide {
        /// The overlap.
        n: usize,
    },
    /// Neither `--take` nor `--text`.
    #[error("say what to keep: --take ours|theirs|first|second|merged, or --text \"…\"")]
    NothingChosen,
    /// Any other node error (boxed: it is large).
    #[error(transparent)]
    Node(Box<NodeError>),
}

impl From<NodeError> for ReviewError {
    fn from(e: NodeError) -> Self {
        ReviewError::Node(Box::new(e))
    }
}

impl From<ModelError> for ReviewError {
    fn from(e: ModelError) -> Self {
        NodeError::Model(e).into()
    }
}

impl From<crate::store::StoreError> for ReviewError {
    fn from(e: crate::store::StoreError) -> Self {
        NodeError::Store(e).into()
    }
}

/// Which version of an overlap to keep (`--take`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TakeArg {
    /// The version written on this node (or by this node's organisation).
    Ours,
    /// The other version.
    Theirs,
    /// The first version as listed.
    First,
    /// The second version as listed.
    Second,
    /// The merged text as it stands (only marks the overlap reviewed).
    Merged,
}

/// What needs review in a document: open overlaps and open field conflicts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ReviewFlags {
    /// Overlapping concurrent text edits not yet reviewed.
    pub overlaps: usize,
    /// Fields where concurrent edits left several values.
    pub conflicts: usize,
}

impl ReviewFlags {
    /// Counts them in a document.
    pub fn of(doc: &mut Document) -> Result<Self, ModelError> {
        Ok(Self { overlaps: doc.overlap_count()?, conflicts: doc.conflicts()?.len() })
    }

    /// Whether nothing needs review.
    pub fn is_clear(&self) -> bool {
        self.overlaps == 0 && self.conflicts == 0
    }

    /// A few words for lists: "2 overlapping edits, 1 field conflict to review".
    pub fn short(&self) -> Option<String> {
        let mut parts = Vec::new();
        match self.overlaps {
            0 => {}
            1 => parts.push("1 overlapping edit".to_string()),
            n => parts.push(format!("{n} overlapping edits")),
        }
        match self.conflicts {
            0 => {}
            1 => parts.push("1 field conflict".to_string()),
            n => parts.push(format!("{n} field conflicts")),
        }
        (!parts.is_empty()).then(|| format!("{} to review", parts.join(", ")))
    }

    /// One line saying what needs review and the commands that show it.
    pub fn note(&self, doc: &DocId) -> Option<String> {
        let short = self.short()?;
        let mut commands = Vec::new();
        if self.overlaps > 0 {
            commands.push(format!("samverkan-node review {}", doc.short()));
        }
        if self.conflicts > 0 {
            commands.push(format!("samverkan-node conflicts {}", doc.short()));
        }
        Some(format!("{short}: {}", commands.join(" and ")))
    }
}

/// [`ReviewFlags`] of a stored document.
pub fn flags(node: &Node, id: &DocId) -> Result<ReviewFlags, NodeError> {
    Ok(ReviewFlags::of(&mut node.document(id)?)?)
}

/// One side of an open overlap, with its verified author.
#[derive(Debug, Clone, Serialize)]
pub struct ReviewSide {
    /// The change (hex).
    pub change: String,
    /// Its author's key (hex).
    pub author: String,
    /// The author's standing at the relay.
    pub author_status: AuthorStatus,
    /// The author as the relay's signed directory names it.
    pub by: String,
    /// Whether this side was written on this node or by its organisation (`--take ours`).
    pub ours: bool,
    /// When the author says it was written.
    pub time: Option<DateTime<Utc>>,
    /// The change's message.
    pub message: Option<String>,
    /// This side's version of the paragraph.
    pub text: String,
}

/// An open overlap as `review` lists it.
#[derive(Debug, Clone, Serialize)]
pub struct ReviewItem {
    /// Its number in the list (from 1), for `--resolve`.
    pub n: usize,
    /// The key its review mark will carry.
    pub key: String,
    /// The field's path.
    pub field: String,
    /// The field as people call it ("Brödtext", "Aktivitet 'X': beskrivning").
    pub label: String,
    /// The paragraph (from 1) in the text both sides started from.
    pub paragraph: usize,
    /// That paragraph as both knew it.
    pub base: String,
    /// Both versions.
    pub sides: Vec<ReviewSide>,
    /// The merged paragraph as it stands.
    pub merged: String,
}

/// The organisation of an enrolled author key, as the relay's directory says.
fn enrolled_org(node: &Node, actor_hex: &str) -> Option<samverkan_shared::org::OrgId> {
    let bytes = hex::decode(actor_hex).ok()?;
    let key = NodeId::from_actor(&automerge::ActorId::from(bytes))?;
    node.enrollment().ok().flatten()?.latest(&key).map(|m| m.org.clone())
}

fn describe(node: &Node, view: Option<&DocumentView>, n: usize, overlap: &Overlap) -> ReviewItem {
    let sides: Vec<ReviewSide> = overlap
        .sides
        .iter()
        .map(|s| {
            let who = node.author(&s.actor);
            ReviewSide {
                change: s.change.clone(),
                author: who.key.clone(),
                author_status: who.status,
                by: who.label,
                ours: false,
                time: s.time,
                message: s.message.clone(),
                text: s.text.clone(),
            }
        })
        .collect();
    let mut item = ReviewItem {
        n,
        key: overlap.key(),
        field: overlap.field.clone(),
        label: field_name(&overlap.field, view),
        paragraph: overlap.paragraph,
        base: overlap.base.clone(),
        sides,
        merged: overlap.merged.clone(),
    };
    // Ours: this node's side, else its organisation's (when exactly one side is).
    let this_node = |s: &ReviewSide| s.author_status == AuthorStatus::ThisNode;
    let this_org = |s: &ReviewSide| enrolled_org(node, &s.author).as_ref() == Some(node.org());
    let pick = if item.sides.iter().any(this_node) {
        item.sides.iter().position(this_node)
    } else if item.sides.iter().filter(|s| this_org(s)).count() == 1 {
        item.sides.iter().position(this_org)
    } else {
        None
    };
    if let Some(i) = pick {
        item.sides[i].ours = true;
    }
    item
}

/// The open overlaps of a document, numbered as `--resolve` takes them.
pub fn open(node: &Node, id: &DocId) -> Result<Vec<ReviewItem>, NodeError> {
    let mut doc = node.document(id)?;
    let view = doc.view().ok();
    let overlaps = doc.overlaps()?;
    Ok(overlaps.iter().enumerate().map(|(i, o)| describe(node, view.as_ref(), i + 1, o)).collect())
}

/// What [`resolve`] did.
#[derive(Debug, Clone, Serialize)]
pub struct Resolved {
    /// The overlap, as it was listed.
    pub overlap: ReviewItem,
    /// What was kept: `first`, `second`, `merged` or `text`.
    pub kept: String,
    /// The change made (hex).
    pub change: Option<String>,
}

/// Settles open overlap `n` of a document: keeps a version (`take`) or a new
/// `text` for the paragraph, as one durable change that also marks the
/// overlap reviewed for every party. The list is computed again inside the
/// store transaction, so `n` means what `review` shows now.
pub fn resolve(
    node: &mut Node,
    id: &DocId,
    n: usize,
    take: Option<TakeArg>,
    text: Option<String>,
) -> Result<Resolved, ReviewError> {
    node.writable(id)?;
    let listed = open(node, id)?;
    let item = listed.get(n.wrapping_sub(1)).cloned().ok_or(ReviewError::NoSuchOverlap {
        doc: id.short().to_string(),
        n,
        open: listed.len(),
    })?;
    let choice = match (take, text) {
        (_, Some(text)) => Take::Text(text),
        (Some(TakeArg::First), None) => Take::First,
        (Some(TakeArg::Second), None) => Take::Second,
        (Some(TakeArg::Merged), None) => Take::Merged,
        (Some(which @ (TakeArg::Ours | TakeArg::Theirs)), None) => {
            let ours = item.sides.iter().position(|s| s.ours).ok_or(ReviewError::NoOwnSide { n })?;
            let side = if which == TakeArg::Ours { ours } else { 1 - ours };
            if side == 0 {
                Take::First
            } else {
                Take::Second
            }
        }
        (None, None) => return Err(ReviewError::NothingChosen),
    };
    let ctx = node.edit_context();
    let directory = node.directory().clone();
    let key = item.key.clone();
    let (hash, _) = node.store_mut().update(id, false, |doc| -> Result<_, ReviewError> {
        let overlaps = doc.overlaps()?;
        let overlap = overlaps.iter().find(|o| o.key() == key).ok_or(ReviewError::NoSuchOverlap {
            doc: id.short().to_string(),
            n,
            open: overlaps.len(),
        })?;
        Ok(doc.resolve_overlap(&ctx, &directory, overlap, &choice)?)
    })?;
    let kept = match choice {
        Take::First => "first",
        Take::Second => "second",
        Take::Merged => "merged",
        Take::Text(_) => "text",
    };
    Ok(Resolved { overlap: item, kept: kept.to_string(), change: hash.map(|h| h.to_string()) })
}

/// The overlaps for people.
pub fn format_open(id: &DocId, items: &[ReviewItem]) -> String {
    if items.is_empty() {
        return format!("No overlapping edits to review in {}.", id.short());
    }
    let mut out = String::new();
    for item in items {
        out.push_str(&format!(
            "{}. {}, stycke {}: edited concurrently by both sides\n",
            item.n, item.label, item.paragraph
        ));
        out.push_str(&format!("   before:  {}\n", item.base));
        for (i, side) in item.sides.iter().enumerate() {
            let which = if i == 0 { "first" } else { "second" };
            let ours = if side.ours { ", ours" } else { "" };
            let when = side.time.map(|t| format!(" {}", t.format("%Y-%m-%d %H:%M"))).unwrap_or_default();
            out.push_str(&format!(
                "   {which} ({}{when}{ours}, change {}):\n     {}\n",
                side.by,
                &side.change[..8.min(side.change.len())],
                side.text
            ));
        }
        out.push_str(&format!("   merged now:\n     {}\n", item.merged));
    }
    out.push_str(&format!(
        "Resolve with: samverkan-node review {} --resolve <n> --take ours|theirs|first|second|merged, or --text \"…\"",
        id.short()
    ));
    out
}

/// One change in `history`, with its verified author.
#[derive(Debug, Clone, Serialize)]
pub struct HistoryLine {
    /// Change hash (hex).
    pub hash: String,
    /// The author as the relay's signed directory names it.
    pub by: String,
    /// The author's key (hex).
    pub author: String,
    /// The author's standing at the relay.
    pub author_status: AuthorStatus,
    /// The author's sequence number.
    pub seq: u64,
    /// When the author says it was made.
    pub time: Option<DateTime<Utc>>,
    /// The change's message.
    pub message: Option<String>,
    /// What it did, field by field.
    pub changes: Vec<FieldChange>,
    /// The changes it merged, when it merged several.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub merged: Vec<String>,
}

/// Every change of a document in causal order, described.
pub fn history(node: &Node, id: &DocId) -> Result<Vec<HistoryLine>, NodeError> {
    let mut doc = node.document(id)?;
    let described = doc.described_history(node.directory())?;
    Ok(described
        .into_iter()
        .map(|c| {
            let who = node.author(&c.actor);
            HistoryLine {
                hash: c.hash,
                by: who.label,
                author: who.key,
                author_status: who.status,
                seq: c.seq,
                time: c.time,
                message: c.message,
                changes: c.changes,
                merged: c.merged,
            }
        })
        .collect())
}

/// The history for people: a line per change, then what it did, indented.
pub fn format_history(lines: &[HistoryLine]) -> String {
    let mut out = Vec::new();
    for h in lines {
        let time =
            h.time.map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string()).unwrap_or_else(|| "(ingen tid)".into());
        out.push(format!(
            "{time}  {}: {}  [{}]",
            h.by,
            h.message.as_deref().unwrap_or("(ändring)"),
            &h.hash[..8.min(h.hash.len())]
        ));
        if !h.merged.is_empty() {
            let short: Vec<&str> = h.merged.iter().map(|m| &m[..8.min(m.len())]).collect();
            out.push(format!("    (sammanför {})", short.join(" och ")));
        }
        for change in &h.changes {
            out.push(format!("    {}", change.text));
        }
    }
    out.join("\n")
}

/// `text` with a TOML comment line in its front matter saying what needs
/// review; the body is left exactly as it is.
pub fn annotate_export(text: &str, id: &DocId, flags: &ReviewFlags) -> String {
    let Some(note) = flags.note(id) else { return text.to_string() };
    match text.strip_prefix("+++\n") {
        Some(rest) => format!("+++\n# OBS: {note}\n{rest}"),
        None => text.to_string(),
    }
}
