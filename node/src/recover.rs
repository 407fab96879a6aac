//! `samverkan-node recover <doc>`: bringing a document the relay refused back
//! into sync without losing anything typed on this node.
//!
//! When the relay refuses a change of this node to a document, no later change
//! of this node to it can reach the relay either (Automerge history cannot be
//! retracted and each change depends on the author's earlier ones), so the
//! sync client records the refusal and stops syncing the document. This
//! module rebuilds it on what the relay holds (the logic is in
//! [`samverkan_shared::recovery`]):
//!
//! - [`plan`] reads only: the refusal, and every local change the relay does
//!   not hold, with what recovery will do with it (re-apply this node's edits,
//!   skip its approval records, leave other nodes' changes);
//! - [`recover`] does it: first a durable **backup** of the whole document as
//!   it is, `<data dir>/recovered/<doc>-<UTC time>.automerge` (Automerge
//!   `save()`) and the Markdown export beside it (`.md`), both fsynced with
//!   their directory; then, in the same store transaction, the recovered
//!   history replaces the stored one, the refusal is cleared and the
//!   document's sync states are dropped (the next sync starts afresh).
//!
//! Never touches the network; the sync client resumes the document once its
//! refusal is gone.

use std::io::Write;
use std::path::{Path, PathBuf};

use automerge::ChangeHash;
use chrono::{DateTime, Utc};
use samverkan_shared::ids::DocId;
use samverkan_shared::markdown;
use samverkan_shared::model::{Document, ModelError};
use samverkan_shared::org::Directory;
use samverkan_shared::recovery::{Action, DroppedChange, Outcome, Recovery, RecoveryError};
use samverkan_shared::wire::RefusalKind;
use serde::Serialize;

use crate::node::{Author, Node, NodeError};
use crate::status::META_SEEN_PREFIX;
use crate::store::keyfile;
use crate::store::{DocRefusal, StoreError};

/// Folder of the backups recovery writes, inside the data directory.
pub const RECOVERED_DIR: &str = "recovered";

/// Why a document cannot be recovered.
#[derive(Debug, thiserror::Error)]
pub enum RecoverError {
    /// No refusal is recorded for the document.
    #[error("nothing to recover: the relay has not refused document {0}")]
    NotRefused(DocId),
    /// The relay refused the document because it is not shared with this node's organisation.
    #[error(
        "nothing to recover: document {0} is no longer shared with your organisation; it stays on this node, read-only"
    )]
    NotShared(DocId),
    /// The relay only put the document off for now.
    #[error("nothing to recover: the relay was busy and takes document {0} on a later connection")]
    Busy(DocId),
    /// The recovery could not be planned or made.
    #[error(transparent)]
    Recovery(#[from] RecoveryError),
    /// The backup could not be written; nothing was changed.
    #[error("could not write the backup {path}: {reason}; nothing was changed")]
    Backup {
        /// The file or folder.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// Any other node error (boxed: it is large).
    #[error(transparent)]
    Node(Box<NodeError>),
}

impl From<NodeError> for RecoverError {
    fn from(e: NodeError) -> Self {
        RecoverError::Node(Box::new(e))
    }
}

impl From<StoreError> for RecoverError {
    fn from(e: StoreError) -> Self {
        NodeError::Store(e).into()
    }
}

impl From<ModelError> for RecoverError {
    fn from(e: ModelError) -> Self {
        NodeError::Model(e).into()
    }
}

/// The refusal, as shown.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct RefusalSummary {
    /// Why, machine-readable ([`RefusalKind::label`]).
    pub kind: &'static str,
    /// Why, in the relay's words.
    pub reason: String,
    /// When it arrived.
    pub refused_at: DateTime<Utc>,
    /// The highest number of this node's own changes the relay holds.
    pub your_seq: u64,
}

/// One local change the relay does not hold.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PlannedChange {
    /// The change.
    pub hash: ChangeHash,
    /// Who made it, as `history` names authors.
    pub by: String,
    /// The author's key (hex).
    pub author: String,
    /// The author's standing (`this_node`, `enrolled`, …).
    pub author_status: crate::node::AuthorStatus,
    /// Whether this node made it.
    pub own: bool,
    /// The author's sequence number.
    pub seq: u64,
    /// When it was made (the author's claim).
    pub time: Option<DateTime<Utc>>,
    /// Its message.
    pub message: Option<String>,
    /// What recovery does with it.
    pub action: Action,
}

/// What `recover` would do (see [`plan`]).
#[derive(Debug, Clone, Serialize)]
pub struct RecoveryPlan {
    /// The document.
    pub doc: DocId,
    /// Its title.
    pub title: String,
    /// The refusal.
    pub refusal: RefusalSummary,
    /// The heads of what the relay holds, where the recovered history starts.
    pub accepted_heads: Vec<ChangeHash>,
    /// How many changes the relay holds (kept as they are).
    pub accepted_changes: usize,
    /// Every local change the relay does not hold, in causal order.
    pub changes: Vec<PlannedChange>,
}

/// One dropped change and what recovery did with it.
#[derive(Debug, Clone, Serialize)]
pub struct RecoveredChange {
    /// The change, as planned.
    #[serde(flatten)]
    pub change: PlannedChange,
    /// What happened.
    #[serde(flatten)]
    pub outcome: Outcome,
}

/// What `recover --apply` did (see [`recover`]).
#[derive(Debug, Clone, Serialize)]
pub struct RecoveryReport {
    /// The document.
    pub doc: DocId,
    /// Its title after recovery.
    pub title: String,
    /// The refusal that was cleared.
    pub refusal: RefusalSummary,
    /// The whole document as it was (Automerge save).
    pub backup: PathBuf,
    /// Its Markdown export.
    pub backup_markdown: PathBuf,
    /// The heads the recovered history started from (what the relay holds).
    pub accepted_heads: Vec<ChangeHash>,
    /// The heads after recovery.
    pub heads: Vec<ChangeHash>,
    /// Every change the relay did not hold, and what happened to it.
    pub changes: Vec<RecoveredChange>,
}

/// The refusal of `id` if recovery applies to it.
fn refusal_to_recover(node: &Node, id: &DocId) -> Result<DocRefusal, RecoverError> {
    if !node.store().contains(id)? {
        return Err(NodeError::NoSuchDocument(id.to_string()).into());
    }
    let refusal = node.store().refusal(id)?.ok_or_else(|| RecoverError::NotRefused(id.clone()))?;
    match refusal.kind {
        RefusalKind::NotShared => Err(RecoverError::NotShared(id.clone())),
        RefusalKind::Busy => Err(RecoverError::Busy(id.clone())),
        _ => Ok(refusal),
    }
}

/// The heads the relay is known to hold: its heads in the refusal and the
/// shared heads of the persisted sync state with the pinned relay.
fn relay_heads(node: &Node, refusal: &DocRefusal) -> Result<Vec<ChangeHash>, RecoverError> {
    let mut heads = refusal.peer_heads.clone();
    if let Some(relay) = node.pinned_relay()? {
        let states = node.store().sync_states(&crate::status::relay_peer_key(&relay))?;
        for (doc, bytes) in states {
            if doc == refusal.doc {
                // An undecodable state is no evidence of anything: ignored.
                if let Ok(state) = automerge::sync::State::decode(&bytes) {
                    heads.extend(state.shared_heads);
                }
            }
        }
    }
    Ok(heads)
}

fn summary(refusal: &DocRefusal) -> RefusalSummary {
    RefusalSummary {
        kind: refusal.kind.label(),
        reason: refusal.reason.clone(),
        refused_at: refusal.refused_at,
        your_seq: refusal.your_seq,
    }
}

fn planned(node: &Node, d: &DroppedChange) -> PlannedChange {
    let Author { key, status, label } = node.author(&d.actor);
    PlannedChange {
        hash: d.hash,
        by: label,
        author: key,
        author_status: status,
        own: d.own,
        seq: d.seq,
        time: d.time,
        message: d.message.clone(),
        action: d.action,
    }
}

/// What recovering `id` would do; changes nothing. Refused when no refusal
/// is recorded, when the relay refused it as not shared, or only for now.
pub fn plan(node: &Node, id: &DocId) -> Result<RecoveryPlan, RecoverError> {
    let refusal = refusal_to_recover(node, id)?;
    let heads = relay_heads(node, &refusal)?;
    let mut doc = node.document(id)?;
    let recovery = Recovery::plan(&mut doc, &node.node_id(), refusal.your_seq, &heads)?;
    Ok(RecoveryPlan {
        doc: id.clone(),
        title: doc.title()?,
        refusal: summary(&refusal),
        accepted_heads: recovery.accepted_heads.clone(),
        accepted_changes: recovery.accepted_changes,
        changes: recovery.dropped.iter().map(|d| planned(node, d)).collect(),
    })
}

/// Recovers `id` (see the module docs): backup, then the recovered history
/// replaces the stored one, the refusal is cleared and the sync states of the
/// document are dropped, in one store transaction. If anything fails after the
/// backup, the store is as it was and the backup stays.
pub fn recover(node: &mut Node, id: &DocId) -> Result<RecoveryReport, RecoverError> {
    let refusal = refusal_to_recover(node, id)?;
    let heads = relay_heads(node, &refusal)?;
    let ctx = node.edit_context();
    let directory = node.directory().clone();
    let own = node.node_id();
    let backups = node.data_dir().join(RECOVERED_DIR);
    let limits = node.store().content_limits();
    let seen_key = format!("{META_SEEN_PREFIX}{id}");
    let seen = node.store().meta(&seen_key)?;
    let ((recovery, outcomes, (backup, backup_markdown), seen), outcome) =
        node.store_mut().replace_document(id, |doc| -> Result<_, RecoverError> {
            // Read inside the store's write transaction: nothing can be added meanwhile.
            let files = write_backup(&backups, doc, &directory, ctx.time)?;
            let recovery = Recovery::plan(doc, &own, refusal.your_seq, &heads)?;
            let rebuilt = recovery.rebuild(doc, &ctx, &directory, &limits)?;
            // `status`'s last look, moved onto the recovered history (its count of
            // changes received since then would otherwise start from nothing).
            let seen = seen.map(|value| {
                let old: Vec<ChangeHash> = value.split(',').filter_map(|h| h.parse().ok()).collect();
                let kept = recovery.kept_heads(doc, &old);
                kept.iter().map(ToString::to_string).collect::<Vec<_>>().join(",")
            });
            Ok((rebuilt.doc, (recovery, rebuilt.outcomes, files, seen)))
        })?;
    if let Some(seen) = seen {
        node.store_mut().set_meta(&seen_key, &seen)?;
    }
    let title = node.store().summary(id)?.map(|s| s.title).unwrap_or_default();
    let changes = recovery
        .dropped
        .iter()
        .zip(outcomes)
        .map(|(d, outcome)| RecoveredChange { change: planned(node, d), outcome })
        .collect();
    tracing::info!(doc = %id, backup = %backup.display(), "recovered a refused document");
    Ok(RecoveryReport {
        doc: id.clone(),
        title,
        refusal: summary(&refusal),
        backup,
        backup_markdown,
        accepted_heads: recovery.accepted_heads,
        heads: outcome.heads,
        changes,
    })
}

/// Writes the whole document and its Markdown export into `dir` (created
/// private), each through a temporary file, fsynced, renamed, and the folder
/// fsynced; returns both paths. Never overwrites an earlier backup.
fn write_backup(
    dir: &Path,
    doc: &mut Document,
    directory: &Directory,
    now: DateTime<Utc>,
) -> Result<(PathBuf, PathBuf), RecoverError> {
    let failed = |path: &Path| {
        let path = path.to_path_buf();
        move |e: std::io::Error| RecoverError::Backup { path, reason: e.to_string() }
    };
    let new_dir = !dir.exists();
    keyfile::create_private_dir(dir)
        .map_err(|e| RecoverError::Backup { path: dir.to_path_buf(), reason: e.to_string() })?;
    if new_dir {
        if let Some(parent) = dir.parent() {
            sync_dir(parent).map_err(failed(parent))?;
        }
    }
    let stamp = now.format("%Y%m%dT%H%M%SZ").to_string();
    let mut stem = format!("{}-{stamp}", doc.id());
    let mut n = 1;
    while dir.join(format!("{stem}.automerge")).exists() || dir.join(format!("{stem}.md")).exists() {
        n += 1;
        stem = format!("{}-{stamp}-{n}", doc.id());
    }
    let history = dir.join(format!("{stem}.automerge"));
    let text = dir.join(format!("{stem}.md"));
    let view = doc.view()?;
    write_durably(&history, &doc.automerge_mut().save()).map_err(failed(&history))?;
    write_durably(&text, markdown::export(&view, directory).as_bytes()).map_err(failed(&text))?;
    sync_dir(dir).map_err(failed(dir))?;
    Ok((history, text))
}

/// Writes `bytes` to a temporary file beside `path`, fsyncs it and renames it into place.
fn write_durably(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("backup");
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path)
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

fn when(t: &DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M UTC").to_string()
}

fn change_line(c: &PlannedChange) -> String {
    let time = c.time.as_ref().map(when).unwrap_or_else(|| "(ingen tid)".into());
    let message = c.message.as_deref().unwrap_or("(ändring)");
    format!("{time}  {}: {message}  [{}]", c.by, &c.hash.to_string()[..8])
}

fn refusal_lines(doc: &DocId, title: &str, refusal: &RefusalSummary) -> String {
    format!(
        "{}  {title}\nThe relay refused it {} ({}): {}\n",
        doc.short(),
        when(&refusal.refused_at),
        refusal.kind,
        refusal.reason
    )
}

/// Renders a plan for people.
pub fn format_plan(plan: &RecoveryPlan) -> String {
    let mut out = refusal_lines(&plan.doc, &plan.title, &plan.refusal);
    out.push_str(&format!(
        "The relay holds {} change(s) of it (this node's up to number {}); recovery keeps them.\n",
        plan.accepted_changes, plan.refusal.your_seq
    ));
    if plan.changes.is_empty() {
        out.push_str("Every local change is at the relay: recovery only lets the document sync again.\n");
    } else {
        out.push_str("Local changes the relay does not hold:\n");
        for c in &plan.changes {
            out.push_str(&format!("  {}\n      → {}\n", change_line(c), c.action.describe()));
        }
    }
    out.push_str(&format!(
        "Nothing has been changed. To recover: samverkan-node recover {} --apply\n(the whole document is saved first, under {RECOVERED_DIR}/ in the data directory)",
        plan.doc.short()
    ));
    out
}

/// Renders a report for people.
pub fn format_report(report: &RecoveryReport) -> String {
    let mut out = refusal_lines(&report.doc, &report.title, &report.refusal);
    out.push_str(&format!(
        "Recovered. The document as it was is saved in\n  {}\n  {} (Markdown)\n",
        report.backup.display(),
        report.backup_markdown.display()
    ));
    let mut approvals = false;
    for c in &report.changes {
        let line = change_line(&c.change);
        let what = match &c.outcome {
            Outcome::Reapplied { new_change, lost, .. } => {
                let mut s = format!("re-applied as {}", &new_change.to_string()[..8]);
                for l in lost {
                    s.push_str(&format!("; {l}"));
                }
                s
            }
            Outcome::Unchanged { lost } if lost.is_empty() => {
                "nothing to re-apply: the document already says that".into()
            }
            Outcome::Unchanged { lost } => format!("not re-applied: {}", lost.join("; ")),
            Outcome::NotReapplied { reason } => format!("NOT re-applied ({reason}); it is in the backup"),
            Outcome::Skipped => {
                approvals = true;
                "skipped: approve again now that the document is recovered".into()
            }
            Outcome::Left => "left out (another node's change the relay did not take); it is in the backup".into(),
        };
        out.push_str(&format!("  {line}\n      → {what}\n"));
    }
    if approvals {
        out.push_str(&format!(
            "Approvals are not carried over: they signed a version that no longer exists (samverkan-node approve {} --as <signer>).\n",
            report.doc.short()
        ));
    }
    out.push_str("The refusal is cleared: the document syncs again at the next sync.");
    out
}

#[cfg(test)]
mod tests;
