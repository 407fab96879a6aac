//! Recovering a document the relay refused, so that nothing typed on this
//! node is lost.
//!
//! Automerge history cannot be retracted, and each change of an actor depends
//! on that actor's earlier ones (sequence numbers), so once the relay refuses
//! one of this node's changes to a document (an approval signed offline by a
//! signer revoked before the node synced, a change over the relay's size
//! limits) no later change of this node to that document can reach it either.
//! Recovery rebuilds the document on what the relay holds:
//!
//! 1. [`Recovery::plan`] finds the **accepted set**: the ancestors (inclusive)
//!    of this node's own changes up to the relay's `your_seq`, of the relay's
//!    heads that exist locally, and of the heads the node's sync state shares
//!    with the relay; then own changes after `your_seq` (and whatever depends
//!    on them) are taken out again, since the relay said it holds none of
//!    them. Its heads are the **last accepted heads**. Every change outside
//!    the set gets an [`Action`]: this node's content edits are re-applied,
//!    its approval and withdrawal records are skipped (they signed a version
//!    that will no longer exist: approve again after recovery), other nodes'
//!    changes are left (kept in the backup only; their authors still hold
//!    them).
//! 2. [`Recovery::rebuild`] forks the document at the last accepted heads and
//!    makes each re-applied change again, in causal order, as a new change by
//!    this node made now (message kept, with " (återställd)"): a three-way
//!    merge ([`merge::merge_views`]) of the view just before the change in the
//!    old history (base), the view just after it (theirs) and the fork's
//!    current view (ours), written with [`crate::model::Editor::apply`]. A
//!    change that no longer fits the content limits, or no longer validates,
//!    is reported as not re-applied.
//!
//! The new changes take the sequence numbers after `your_seq`, which the relay
//! never stored, so it accepts them. The caller (the node's `recover`) writes
//! the backup of the old history first and stores the rebuilt one; this
//! module does no I/O and takes the time of the new changes from the
//! [`EditContext`].

pub mod merge;

use std::collections::hash_map::Entry;
use std::collections::{BTreeSet, HashMap, HashSet};

use automerge::{ActorId, ChangeHash};
use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::acceptance::{document_size, ContentLimits, LimitError};
use crate::approval;
use crate::identity::NodeId;
use crate::ids::DocId;
use crate::model::{Document, DocumentContent, DocumentView, EditContext, ModelError};
use crate::org::Directory;

/// Suffix of the message of a re-applied change.
pub const REAPPLIED_SUFFIX: &str = " (återställd)";

/// Why a recovery cannot be planned or made.
#[derive(Debug, thiserror::Error)]
pub enum RecoveryError {
    /// The relay holds more of this node's changes than this node has: a new
    /// change would reuse a sequence number the relay already holds.
    #[error("the relay holds this node's changes to document {doc} up to number {held}, but this node has only up to {have} (was the data directory restored from an older copy?); recovery would reuse numbers the relay holds, so it is not done")]
    OwnChangesMissing {
        /// The document.
        doc: DocId,
        /// The highest own sequence number here.
        have: u64,
        /// The highest own sequence number the relay holds.
        held: u64,
    },
    /// Nothing of the document is at the relay, and it was not created here.
    #[error("the relay holds none of document {0}, and it was not created on this node: there is no history to recover onto")]
    NothingAccepted(DocId),
    /// The document could not be read or written.
    #[error(transparent)]
    Model(#[from] ModelError),
}

/// What recovery does with a change the relay does not hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// This node's content edit: made again, now, on the accepted history.
    Reapply,
    /// An approval or withdrawal record made on this node: not made again; it
    /// signed a version that will no longer exist (approve again after recovery).
    Skip,
    /// Another node's change the relay did not take: kept in the backup only.
    Leave,
}

impl Action {
    /// What it means, for people.
    pub fn describe(self) -> &'static str {
        match self {
            Action::Reapply => "re-apply",
            Action::Skip => "skip (approval record: approve again after recovery)",
            Action::Leave => "leave (another node's change the relay did not take: kept in the backup)",
        }
    }
}

/// A change of the document that is not in the accepted set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DroppedChange {
    /// Its hash.
    pub hash: ChangeHash,
    /// Its author (hex actor id).
    pub actor: String,
    /// Whether this node made it.
    pub own: bool,
    /// The author's sequence number.
    pub seq: u64,
    /// When it was made (the author's claim), if recorded.
    pub time: Option<DateTime<Utc>>,
    /// Its message.
    pub message: Option<String>,
    /// What recovery does with it.
    pub action: Action,
    /// The changes it depends on.
    #[serde(skip)]
    deps: Vec<ChangeHash>,
}

/// What happened to one dropped change in [`Recovery::rebuild`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    /// Made again as a new change.
    Reapplied {
        /// The new change.
        new_change: ChangeHash,
        /// Its sequence number (this node's).
        new_seq: u64,
        /// Parts that had nowhere to go (see [`merge::Merged::lost`]).
        lost: Vec<String>,
    },
    /// Nothing to make again: the recovered document already says what it did.
    Unchanged {
        /// Parts that had nowhere to go.
        lost: Vec<String>,
    },
    /// Could not be made again (over the content limits, no longer valid): in the backup only.
    NotReapplied {
        /// Why.
        reason: String,
    },
    /// An approval record, not made again.
    Skipped,
    /// Another node's change, left out.
    Left,
}

/// What a document looks like at one version, as far as recovery cares.
#[derive(Debug, Clone)]
struct Snapshot {
    /// The content (`None` if it cannot be read, e.g. before the first change).
    view: Option<DocumentView>,
    /// The approval records (their keys).
    records: BTreeSet<String>,
}

/// A planned recovery of one document (see the module docs).
#[derive(Debug, Clone)]
pub struct Recovery {
    /// The heads of the accepted set: what the recovered history starts from.
    pub accepted_heads: Vec<ChangeHash>,
    /// Number of changes in the accepted set (kept as they are).
    pub accepted_changes: usize,
    /// Every change not in the accepted set, in causal order.
    pub dropped: Vec<DroppedChange>,
    /// Views around each re-applied change, by (sorted) heads.
    snapshots: HashMap<Vec<ChangeHash>, Snapshot>,
}

/// The recovered document and what happened to each dropped change.
#[derive(Debug, Clone)]
pub struct Rebuilt {
    /// The recovered document: the accepted history plus the re-applied changes.
    pub doc: Document,
    /// One outcome per [`Recovery::dropped`] entry, in the same order.
    pub outcomes: Vec<Outcome>,
}

/// One change's place in the history.
struct Meta {
    hash: ChangeHash,
    actor: ActorId,
    seq: u64,
    timestamp: i64,
    message: Option<String>,
    deps: Vec<ChangeHash>,
}

/// The change graph of a document, in causal order.
struct Graph {
    changes: Vec<Meta>,
    index: HashMap<ChangeHash, usize>,
}

impl Graph {
    fn of(doc: &mut Document) -> Self {
        let metas: Vec<Meta> = doc
            .automerge_mut()
            .get_changes_meta(&[])
            .into_iter()
            .map(|m| Meta {
                hash: m.hash,
                actor: m.actor.into_owned(),
                seq: m.seq,
                timestamp: m.timestamp,
                message: m.message.map(|s| s.into_owned()),
                deps: m.deps,
            })
            .collect();
        // Causal order (Kahn), stable in the order Automerge listed them.
        let position: HashMap<ChangeHash, usize> = metas.iter().enumerate().map(|(i, m)| (m.hash, i)).collect();
        let mut waiting: Vec<usize> =
            metas.iter().map(|m| m.deps.iter().filter(|d| position.contains_key(d)).count()).collect();
        let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); metas.len()];
        for (i, m) in metas.iter().enumerate() {
            for d in &m.deps {
                if let Some(&p) = position.get(d) {
                    dependents[p].push(i);
                }
            }
        }
        let mut ready: BTreeSet<usize> = (0..metas.len()).filter(|&i| waiting[i] == 0).collect();
        let mut order = Vec::with_capacity(metas.len());
        while let Some(i) = ready.pop_first() {
            order.push(i);
            for &j in &dependents[i] {
                waiting[j] -= 1;
                if waiting[j] == 0 {
                    ready.insert(j);
                }
            }
        }
        let mut slots: Vec<Option<Meta>> = metas.into_iter().map(Some).collect();
        let changes: Vec<Meta> = order.into_iter().filter_map(|i| slots[i].take()).collect();
        let index = changes.iter().enumerate().map(|(i, m)| (m.hash, i)).collect();
        Self { changes, index }
    }

    /// The ancestors of `heads`, inclusive (heads not in the graph are ignored).
    fn closure(&self, heads: &[ChangeHash]) -> HashSet<ChangeHash> {
        let mut seen = HashSet::new();
        let mut stack: Vec<ChangeHash> = heads.iter().filter(|h| self.index.contains_key(h)).copied().collect();
        while let Some(h) = stack.pop() {
            if !seen.insert(h) {
                continue;
            }
            if let Some(&i) = self.index.get(&h) {
                stack.extend(self.changes[i].deps.iter().filter(|d| self.index.contains_key(d)).copied());
            }
        }
        seen
    }
}

/// A document kept at some version and moved forward change by change, so
/// that the views around a chain of changes cost one fork, not one each.
struct Cursor {
    doc: Document,
    have: HashSet<ChangeHash>,
}

fn heads_key(heads: &[ChangeHash]) -> Vec<ChangeHash> {
    let mut key = heads.to_vec();
    key.sort();
    key.dedup();
    key
}

/// The snapshot of `source` at `heads`, through the cursor: moved forward
/// when `heads` is a later version, forked afresh otherwise.
fn snapshot_at(
    source: &mut Document,
    graph: &Graph,
    cursor: &mut Option<Cursor>,
    heads: &[ChangeHash],
) -> Result<Snapshot, ModelError> {
    let current = match cursor.take() {
        Some(mut c) => {
            let deps = |h: &ChangeHash| graph.index.get(h).map(|&i| graph.changes[i].deps.as_slice());
            let new: Vec<ChangeHash> = heads.iter().filter(|h| !c.have.contains(h)).copied().collect();
            let cursor_heads = c.doc.heads();
            // One step: each new head builds only on what the cursor has, and the
            // cursor's heads are all below `heads` (the usual case: the next change of a chain).
            let one_step = new.iter().all(|h| deps(h).is_some_and(|d| d.iter().all(|d| c.have.contains(d))))
                && cursor_heads
                    .iter()
                    .all(|ch| heads.contains(ch) || new.iter().any(|h| deps(h).is_some_and(|d| d.contains(ch))));
            if one_step {
                let changes: Vec<_> = new.iter().filter_map(|h| source.automerge_mut().get_change_by_hash(h)).collect();
                c.doc.automerge_mut().apply_changes(changes)?;
                c.have.extend(new);
                c
            } else {
                let target = graph.closure(heads);
                if c.have.is_subset(&target) {
                    let mut missing = Vec::new();
                    for m in graph.changes.iter().filter(|m| target.contains(&m.hash) && !c.have.contains(&m.hash)) {
                        if let Some(change) = source.automerge_mut().get_change_by_hash(&m.hash) {
                            missing.push(change);
                        }
                    }
                    c.doc.automerge_mut().apply_changes(missing)?;
                    c.have = target;
                    c
                } else {
                    Cursor { doc: source.at(heads)?, have: target }
                }
            }
        }
        None => Cursor { doc: source.at(heads)?, have: graph.closure(heads) },
    };
    let snapshot = Snapshot { view: current.doc.view().ok(), records: approval::record_keys(&current.doc) };
    *cursor = Some(current);
    Ok(snapshot)
}

/// The content of a view, for creating a document anew.
fn content_of(view: DocumentView) -> DocumentContent {
    DocumentContent {
        kind: view.kind,
        scope: view.scope,
        title: view.title,
        parties: view.parties,
        party_units: view.party_units,
        period: view.period,
        place: view.place,
        date: view.date,
        signatories: view.signatories,
        body: view.body,
        goals: view.goals,
        activities: view.activities,
        followups: view.followups,
        meetings: view.meetings,
    }
}

impl Recovery {
    /// Plans the recovery of `doc` on this node (`own`), given the highest
    /// sequence number of own changes the relay holds and the heads it is known
    /// to hold (its heads from the refusal and the sync state's shared heads;
    /// those not in `doc` are ignored). Reads only; `doc` is not changed.
    pub fn plan(
        doc: &mut Document,
        own: &NodeId,
        your_seq: u64,
        relay_heads: &[ChangeHash],
    ) -> Result<Self, RecoveryError> {
        let actor = own.actor_id();
        let graph = Graph::of(doc);
        let mine = |m: &Meta| m.actor == actor;
        let have = graph.changes.iter().filter(|m| mine(m)).map(|m| m.seq).max().unwrap_or(0);
        if have < your_seq {
            return Err(RecoveryError::OwnChangesMissing { doc: doc.id().clone(), have, held: your_seq });
        }
        let mut roots: Vec<ChangeHash> =
            graph.changes.iter().filter(|m| mine(m) && m.seq <= your_seq).map(|m| m.hash).collect();
        roots.extend_from_slice(relay_heads);
        let closure = graph.closure(&roots);
        // The relay holds none of our changes after `your_seq`, nor anything built on them.
        let mut accepted: HashSet<ChangeHash> = HashSet::new();
        for m in &graph.changes {
            let refused_own = mine(m) && m.seq > your_seq;
            if closure.contains(&m.hash)
                && !refused_own
                && m.deps.iter().all(|d| accepted.contains(d) || !graph.index.contains_key(d))
            {
                accepted.insert(m.hash);
            }
        }
        let below: HashSet<ChangeHash> =
            graph.changes.iter().filter(|m| accepted.contains(&m.hash)).flat_map(|m| m.deps.iter().copied()).collect();
        let accepted_heads = heads_key(&accepted.iter().filter(|h| !below.contains(h)).copied().collect::<Vec<_>>());

        let mut dropped: Vec<DroppedChange> = graph
            .changes
            .iter()
            .filter(|m| !accepted.contains(&m.hash))
            .map(|m| DroppedChange {
                hash: m.hash,
                actor: m.actor.to_hex_string(),
                own: mine(m),
                seq: m.seq,
                time: (m.timestamp != 0).then(|| DateTime::from_timestamp_millis(m.timestamp)).flatten(),
                message: m.message.clone(),
                action: if mine(m) { Action::Reapply } else { Action::Leave },
                deps: m.deps.clone(),
            })
            .collect();
        if accepted.is_empty() && !dropped.iter().any(|d| d.own && d.deps.is_empty()) && !dropped.is_empty() {
            return Err(RecoveryError::NothingAccepted(doc.id().clone()));
        }

        // The views around each own change; a change that added approval records is skipped.
        let mut snapshots = HashMap::new();
        let mut cursor = None;
        for d in dropped.iter_mut().filter(|d| d.own) {
            for heads in [heads_key(&d.deps), vec![d.hash]] {
                if let Entry::Vacant(slot) = snapshots.entry(heads) {
                    let snapshot = snapshot_at(doc, &graph, &mut cursor, slot.key())?;
                    slot.insert(snapshot);
                }
            }
            let before = &snapshots[&heads_key(&d.deps)].records;
            let after = &snapshots[&vec![d.hash]].records;
            if after.iter().any(|r| !before.contains(r)) {
                d.action = Action::Skip;
            }
        }
        Ok(Self { accepted_heads, accepted_changes: accepted.len(), dropped, snapshots })
    }

    /// Builds the recovered document from `doc` (the one planned on): the
    /// accepted history plus each re-applied change made again by `ctx`'s
    /// node at `ctx`'s time, each checked against `limits`. `doc` is not changed.
    pub fn rebuild(
        &self,
        doc: &mut Document,
        ctx: &EditContext,
        directory: &Directory,
        limits: &ContentLimits,
    ) -> Result<Rebuilt, RecoveryError> {
        let mut fork = doc.at(&self.accepted_heads)?;
        let mut size = document_size(fork.automerge_mut());
        let mut outcomes = Vec::with_capacity(self.dropped.len());
        for d in &self.dropped {
            outcomes.push(match d.action {
                Action::Leave => Outcome::Left,
                Action::Skip => Outcome::Skipped,
                Action::Reapply => self.reapply(&mut fork, &mut size, d, ctx, directory, limits)?,
            });
        }
        if fork.is_empty() {
            return Err(RecoveryError::NothingAccepted(doc.id().clone()));
        }
        Ok(Rebuilt { doc: fork, outcomes })
    }

    /// Where a version of the old history `doc` (the one planned on) stands in
    /// the recovered one: the heads of what of it is kept (heads not in `doc`
    /// are ignored). For carrying bookmarks over, such as the heads `status`
    /// saw at the user's last look.
    pub fn kept_heads(&self, doc: &mut Document, heads: &[ChangeHash]) -> Vec<ChangeHash> {
        let graph = Graph::of(doc);
        let dropped: HashSet<ChangeHash> = self.dropped.iter().map(|d| d.hash).collect();
        let kept: HashSet<ChangeHash> = graph.closure(heads).into_iter().filter(|h| !dropped.contains(h)).collect();
        let below: HashSet<ChangeHash> = kept
            .iter()
            .filter_map(|h| graph.index.get(h))
            .flat_map(|&i| graph.changes[i].deps.iter().copied())
            .collect();
        heads_key(&kept.into_iter().filter(|h| !below.contains(h)).collect::<Vec<_>>())
    }

    fn reapply(
        &self,
        fork: &mut Document,
        size: &mut u64,
        d: &DroppedChange,
        ctx: &EditContext,
        directory: &Directory,
        limits: &ContentLimits,
    ) -> Result<Outcome, RecoveryError> {
        let not = |reason: &str| Ok(Outcome::NotReapplied { reason: reason.to_string() });
        let before = self.snapshots.get(&heads_key(&d.deps)).and_then(|s| s.view.as_ref());
        let Some(theirs) = self.snapshots.get(&vec![d.hash]).and_then(|s| s.view.as_ref()) else {
            return not("the document cannot be read just after this change");
        };
        let previous = fork.heads();
        let made = if fork.is_empty() {
            // Nothing of the document is at the relay: this change created it.
            Document::create(fork.id().clone(), content_of(theirs.clone()), ctx, directory).map(|mut created| {
                let hash = created.heads().first().copied();
                *fork = created;
                (hash, Vec::new())
            })
        } else {
            let Some(base) = before else { return not("the document cannot be read just before this change") };
            let ours = fork.view()?;
            let merged = merge::merge_views(base, theirs, &ours);
            if merged.view == ours {
                Ok((None, merged.lost))
            } else {
                let message = format!("{}{REAPPLIED_SUFFIX}", d.message.as_deref().unwrap_or("ändring"));
                fork.edit(ctx, directory, &message, |e| e.apply(&merged.view)).map(|(_, hash)| (hash, merged.lost))
            }
        };
        match made {
            // `edit` rolled the failed change back.
            Err(e) => not(&e.to_string()),
            Ok((None, lost)) => Ok(Outcome::Unchanged { lost }),
            Ok((Some(change), lost)) => {
                // The one new change against the limits, as the store will check it.
                let made = fork.automerge_mut().get_change_by_hash(&change);
                let (bytes, new_seq) = made.map_or((0, 0), |c| (c.raw_bytes().len() as u64, c.seq()));
                let doc = fork.id().clone();
                let over = if bytes > limits.max_change_bytes {
                    Some(LimitError::ChangeTooLarge { doc, hash: change, size: bytes, max: limits.max_change_bytes })
                } else if *size + bytes > limits.max_document_bytes {
                    Some(LimitError::DocumentTooLarge { doc, size: *size + bytes, max: limits.max_document_bytes })
                } else {
                    None
                };
                match over {
                    None => {
                        *size += bytes;
                        Ok(Outcome::Reapplied { new_change: change, new_seq, lost })
                    }
                    Some(e) => {
                        *fork = fork.at(&previous)?;
                        not(&e.to_string())
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
