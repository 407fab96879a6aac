//! Three-way merge of typed document views, for re-applying one change on a
//! different history ([`super::Recovery::rebuild`]).
//!
//! `base` is the view just before a change in the old history, `theirs` the
//! view just after it (what the user made it say), `ours` the view of the
//! history it is re-applied on. The result keeps everything `ours` says and
//! adds what the change did: text is merged character by character (two edits
//! of one sentence both survive), scalars take the change's value where it set
//! one, list items are matched by their ids. Pure functions, no I/O.

use std::collections::HashMap;
use std::hash::Hash;

use automerge::transaction::Transactable;
use automerge::{ActorId, AutoCommit, ObjType, ReadDoc, ROOT};

use crate::model::{Activity, DocumentView, FollowUp, Goal, Meeting, Period, Signatory};

/// A merged view and what of the change could not be carried over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Merged {
    /// The view to make the document say.
    pub view: DocumentView,
    /// Parts of the change that had nowhere to go (the item it edited was
    /// removed in `ours`), for the report; they stay in the backup.
    pub lost: Vec<String>,
}

/// Merges the change `base → theirs` into `ours` (see the module docs).
pub fn merge_views(base: &DocumentView, theirs: &DocumentView, ours: &DocumentView) -> Merged {
    let mut lost = Vec::new();
    let view = DocumentView {
        id: ours.id.clone(),
        kind: ours.kind,
        scope: pick(&base.scope, &theirs.scope, &ours.scope),
        title: merge_text(&base.title, &theirs.title, &ours.title),
        parties: merge_keyed(&base.parties, &theirs.parties, &ours.parties, Clone::clone, pick),
        party_units: pick(&base.party_units, &theirs.party_units, &ours.party_units),
        period: Period {
            start: pick(&base.period.start, &theirs.period.start, &ours.period.start),
            end: pick(&base.period.end, &theirs.period.end, &ours.period.end),
        },
        place: pick(&base.place, &theirs.place, &ours.place),
        date: pick(&base.date, &theirs.date, &ours.date),
        signatories: merge_keyed(
            &base.signatories,
            &theirs.signatories,
            &ours.signatories,
            |s: &Signatory| (s.org.clone(), s.role.trim().to_string()),
            |b, t, o| Signatory { org: o.org.clone(), role: o.role.clone(), name: pick(&b.name, &t.name, &o.name) },
        ),
        body: merge_text(&base.body, &theirs.body, &ours.body),
        goals: merge_keyed(
            &base.goals,
            &theirs.goals,
            &ours.goals,
            |g: &Goal| g.id.clone(),
            |b, t, o| Goal { id: o.id.clone(), text: merge_text(&b.text, &t.text, &o.text) },
        ),
        activities: merge_keyed(
            &base.activities,
            &theirs.activities,
            &ours.activities,
            |a: &Activity| a.id.clone(),
            |b, t, o| Activity {
                id: o.id.clone(),
                what: merge_text(&b.what, &t.what, &o.what),
                owners: pick(&b.owners, &t.owners, &o.owners),
                due: pick(&b.due, &t.due, &o.due),
                followup_method: pick_text(&b.followup_method, &t.followup_method, &o.followup_method),
                status: pick(&b.status, &t.status, &o.status),
            },
        ),
        followups: merge_keyed(
            &base.followups,
            &theirs.followups,
            &ours.followups,
            |f: &FollowUp| f.id.clone(),
            |b, t, o| FollowUp {
                id: o.id.clone(),
                date: pick(&b.date, &t.date, &o.date),
                author: pick(&b.author, &t.author, &o.author),
                text: merge_text(&b.text, &t.text, &o.text),
                activity: pick(&b.activity, &t.activity, &o.activity),
            },
        ),
        meetings: merge_keyed(
            &base.meetings,
            &theirs.meetings,
            &ours.meetings,
            |m: &Meeting| m.id.clone(),
            |b, t, o| Meeting {
                id: o.id.clone(),
                date: pick(&b.date, &t.date, &o.date),
                body: pick(&b.body, &t.body, &o.body),
                notes: merge_text(&b.notes, &t.notes, &o.notes),
            },
        ),
    };
    // Items the change edited that are gone from `ours` (removed by another party).
    let mut edited_but_gone = |what: &str, base_ids: Vec<(String, bool)>, ours_ids: Vec<String>| {
        for (id, changed) in base_ids {
            if changed && !ours_ids.contains(&id) {
                lost.push(format!(
                    "{what} {} was removed by another party; the change to it is in the backup",
                    short(&id)
                ));
            }
        }
    };
    edited_but_gone(
        "goal",
        changed_items(&base.goals, &theirs.goals, |g| g.id.to_string()),
        ours.goals.iter().map(|g| g.id.to_string()).collect(),
    );
    edited_but_gone(
        "activity",
        changed_items(&base.activities, &theirs.activities, |a| a.id.to_string()),
        ours.activities.iter().map(|a| a.id.to_string()).collect(),
    );
    edited_but_gone(
        "follow-up",
        changed_items(&base.followups, &theirs.followups, |f| f.id.to_string()),
        ours.followups.iter().map(|f| f.id.to_string()).collect(),
    );
    edited_but_gone(
        "meeting",
        changed_items(&base.meetings, &theirs.meetings, |m| m.id.to_string()),
        ours.meetings.iter().map(|m| m.id.to_string()).collect(),
    );
    Merged { view, lost }
}

fn short(id: &str) -> &str {
    id.get(..8).unwrap_or(id)
}

/// The ids of `base`'s items, each with whether `theirs` changed it (and kept it).
fn changed_items<T: PartialEq>(base: &[T], theirs: &[T], id: impl Fn(&T) -> String) -> Vec<(String, bool)> {
    base.iter()
        .map(|b| {
            let key = id(b);
            let changed = theirs.iter().find(|t| id(t) == key).is_some_and(|t| t != b);
            (key, changed)
        })
        .collect()
}

/// A scalar: the change's value where it set one, else `ours`.
fn pick<T: PartialEq + Clone>(base: &T, theirs: &T, ours: &T) -> T {
    if theirs != base {
        theirs.clone()
    } else {
        ours.clone()
    }
}

/// An optional text (an activity's follow-up method): merged per character when
/// all three have one, else the change's value where it set one.
fn pick_text(base: &Option<String>, theirs: &Option<String>, ours: &Option<String>) -> Option<String> {
    match (base, theirs, ours) {
        (Some(b), Some(t), Some(o)) => Some(merge_text(b, t, o)).filter(|m| !m.is_empty()),
        _ => pick(base, theirs, ours),
    }
}

/// Merges text character by character: `base` is written into a scratch
/// Automerge document, forked twice, set to `ours` and to `theirs` by minimal
/// diff, and the two forks merged, so both sides' insertions and deletions
/// survive (as two offline edits of one paragraph merge in a document).
/// Concurrent insertions at one position come out in a fixed order.
pub fn merge_text(base: &str, theirs: &str, ours: &str) -> String {
    if theirs == base || theirs == ours {
        return ours.to_string();
    }
    if ours == base {
        return theirs.to_string();
    }
    let merged = || -> Result<String, automerge::AutomergeError> {
        let mut doc = AutoCommit::new().with_actor(ActorId::from(&[0u8][..]));
        let text = doc.put_object(ROOT, "text", ObjType::Text)?;
        doc.splice_text(&text, 0, 0, base)?;
        doc.commit();
        let mut ours_doc = doc.fork().with_actor(ActorId::from(&[1u8][..]));
        ours_doc.update_text(&text, ours)?;
        ours_doc.commit();
        let mut theirs_doc = doc.fork().with_actor(ActorId::from(&[2u8][..]));
        theirs_doc.update_text(&text, theirs)?;
        theirs_doc.commit();
        ours_doc.merge(&mut theirs_doc)?;
        ours_doc.text(&text)
    };
    // Automerge does not fail on plain strings; if it ever did, the change's
    // text wins (the other side's is still in the history and the backup).
    merged().unwrap_or_else(|_| theirs.to_string())
}

/// Merges lists whose items are matched by `key` (the n-th item with a key
/// is matched with the n-th of the other lists, so repeated keys pair up).
/// Items the change removed are removed, items it added are added after the
/// item they followed, items in all three are merged with `merge(base,
/// theirs, ours)`; what `ours` added or removed stays so.
fn merge_keyed<T: Clone + PartialEq, K: Eq + Hash + Clone>(
    base: &[T],
    theirs: &[T],
    ours: &[T],
    key: impl Fn(&T) -> K,
    merge: impl Fn(&T, &T, &T) -> T,
) -> Vec<T> {
    let keyed = |items: &[T]| -> Vec<(K, usize)> {
        let mut seen: HashMap<K, usize> = HashMap::new();
        items
            .iter()
            .map(|item| {
                let k = key(item);
                let n = seen.entry(k.clone()).or_default();
                *n += 1;
                (k, *n)
            })
            .collect()
    };
    let (base_keys, theirs_keys, ours_keys) = (keyed(base), keyed(theirs), keyed(ours));
    let base_at: HashMap<&(K, usize), &T> = base_keys.iter().zip(base).collect();
    let theirs_at: HashMap<&(K, usize), &T> = theirs_keys.iter().zip(theirs).collect();
    let mut out: Vec<(&(K, usize), T)> = Vec::new();
    for (k, o) in ours_keys.iter().zip(ours) {
        match (base_at.get(k), theirs_at.get(k)) {
            (Some(_), None) => {} // The change removed it.
            (Some(b), Some(t)) => out.push((k, merge(b, t, o))),
            (None, Some(t)) => out.push((k, merge(o, t, o))), // Added on both sides.
            (None, None) => out.push((k, o.clone())),         // Added in `ours` only.
        }
    }
    for (i, (k, t)) in theirs_keys.iter().zip(theirs).enumerate() {
        if base_at.contains_key(k) || out.iter().any(|(o, _)| *o == k) {
            continue;
        }
        // Added by the change: after the nearest item before it that is still there.
        let at = theirs_keys[..i]
            .iter()
            .rev()
            .find_map(|before| out.iter().position(|(o, _)| *o == before))
            .map_or(0, |p| p + 1);
        out.insert(at, (k, t.clone()));
    }
    out.into_iter().map(|(_, item)| item).collect()
}
