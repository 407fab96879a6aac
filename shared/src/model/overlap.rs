//! Overlapping concurrent text edits: two people changed the same words of
//! one text without knowing of each other's change. Automerge merges text
//! character by character, so "två gånger per år" edited to "månad" on one
//! node and to "vecka" on another merges into "två gånger per veckamnad"
//! without a conflict; this module finds such merges so people can review them.
//!
//! **What counts as an overlap.** Two changes A and B are *concurrent* when
//! neither is an ancestor of the other (see [`super::graph`]); concurrent
//! changes always have different authors (each author's changes form a
//! chain). They *overlap* in a text field when, in the characters both knew
//! (their common base), they touched the same place: both deleted one
//! character, one deleted a character the other inserted right after, or both
//! inserted at the same position (the merged order of the two insertions is
//! then arbitrary). This is read from the changes' own Automerge operations,
//! whose character ids are the same in every version, so it holds however
//! many other changes either side made in between. Edits in different places
//! of one paragraph ("bör" → "ska" and ", vår och höst" added at its end) do
//! not overlap.
//!
//! **Determinism.** Everything is computed from the document's history alone:
//! the set of changes, ordered canonically by (depth, hash). A node that made
//! one of the edits, the node that made the other, and a third node that
//! received both at once report the same overlaps, numbered the same.
//!
//! **What is reported.** One [`Overlap`] per field and paragraph of the common
//! base: the base paragraph, each side's version of it (as that side had it
//! when the two sides met: the colliding change and the side's later
//! changes), the merged paragraph as it stands now, and both changes with
//! their authors. When one side made several overlapping changes while apart
//! from the other, the pair of latest changes stands for them (the earlier
//! pairs are folded into it); overlaps of two separate rounds (the sides met
//! in between) are separate overlaps. An overlap stays open until someone
//! reviews it, even if a later edit rewrote the paragraph: only a person can
//! say both authors' intentions were met.
//!
//! **Reviewed marks.** Resolving an overlap ([`Document::resolve_overlap`])
//! is one ordinary change that edits the paragraph (one side's version, or a
//! new text, or nothing when the merged text is kept) and appends a record to
//! the document's `reviews` list: the two change hashes, the field and the
//! base paragraph. The mark is in the document, so it syncs and every party
//! sees the overlap as reviewed; a list of write-once records merges without
//! conflicts (two parties reviewing at once leave two records, either
//! suffices). Who reviewed is the author of the change that carries the
//! record (signed like every change), never a field in it. A mark for the
//! pair (P, Q) also settles the folded-in overlaps of earlier changes of the
//! same two sides in that paragraph.
//!
//! **Bounds.** Only changes in the last [`OVERLAP_WINDOW`] causal levels
//! (depth) are compared, roughly the last 2,000 edits of a document: an
//! edit made concurrently with one that many levels older is taken as
//! settled. Within the window only concurrent pairs are looked at (found from
//! vector clocks, without comparing every pair in linear stretches of
//! history), and only their operations are decoded; text is read at older
//! versions only for overlaps found. Pure, no I/O.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use automerge::legacy::{ElementId, Key, ObjectId, OpId, OpType};
use automerge::{Automerge, ChangeHash, ObjId, ObjType, ReadDoc, Value, ROOT};
use chrono::{DateTime, Utc};
use serde::Serialize;

use super::fields::obj_key;
use super::graph::ChangeGraph;
use super::paragraphs;
use super::{Document, EditContext, ModelError};
use crate::org::Directory;

/// How many causal levels back overlaps are looked for.
pub const OVERLAP_WINDOW: u32 = 2000;

/// Root key of the list of review records.
pub const REVIEWS_KEY: &str = "reviews";

/// Two concurrent changes that edited the same place of one paragraph.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Overlap {
    /// The text field's path (`title`, `body`, `activities.<id>.what`, …).
    pub field: String,
    /// The paragraph, from 1, in the text both sides started from.
    pub paragraph: usize,
    /// That paragraph as both sides knew it.
    pub base: String,
    /// The two sides, in canonical order.
    pub sides: [OverlapSide; 2],
    /// The paragraph as it stands now, merged.
    pub merged: String,
    #[serde(skip)]
    obj: ObjId,
    #[serde(skip)]
    base_heads: Vec<ChangeHash>,
}

/// One side of an [`Overlap`]: the change that collided, and the paragraph as
/// that side had it when the two sides met (with the side's later changes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OverlapSide {
    /// The change (hex hash).
    pub change: String,
    /// Its author's actor id (hex): the node key that signed it.
    pub actor: String,
    /// The time the author recorded (advisory).
    pub time: Option<DateTime<Utc>>,
    /// The change's message.
    pub message: Option<String>,
    /// This side's version of the paragraph, as the side had it when the sides met.
    pub text: String,
}

impl Overlap {
    /// An overlap with its changes and place only (for counting).
    fn counted(
        path: &str,
        paragraph: usize,
        obj: &ObjId,
        base_heads: &[ChangeHash],
        graph: &ChangeGraph,
        hit: &Hit,
    ) -> Self {
        let side = |c: usize| OverlapSide {
            change: graph.hashes[c].to_string(),
            actor: graph.actors[graph.actor[c]].to_hex_string(),
            time: time_of(graph.time[c]),
            message: graph.message[c].clone(),
            text: String::new(),
        };
        Overlap {
            field: path.to_string(),
            paragraph: paragraph + 1,
            base: String::new(),
            sides: [side(hit.a), side(hit.b)],
            merged: String::new(),
            obj: obj.clone(),
            base_heads: base_heads.to_vec(),
        }
    }

    /// The key its review mark carries: both change hashes (sorted), field, paragraph.
    pub fn key(&self) -> String {
        format!("{}:{}:{}:{}", self.sides[0].change, self.sides[1].change, self.field, self.paragraph)
    }
}

/// A review record: an overlap someone settled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReviewMark {
    /// The two changes (hex hashes).
    pub changes: [String; 2],
    /// The field.
    pub field: String,
    /// The base paragraph, from 1.
    pub paragraph: usize,
    /// What was kept: `first`, `second`, `merged` or `text`.
    pub how: String,
    /// Actor (hex) of the change that wrote the record: who reviewed.
    pub by: String,
}

/// How an overlap is settled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Take {
    /// The first side's version of the paragraph.
    First,
    /// The second side's version.
    Second,
    /// The merged paragraph as it stands.
    Merged,
    /// A paragraph written by the reviewer.
    Text(String),
}

impl Take {
    fn as_str(&self) -> &'static str {
        match self {
            Take::First => "first",
            Take::Second => "second",
            Take::Merged => "merged",
            Take::Text(_) => "text",
        }
    }
}

/// Where a change touched a text: a character it deleted, or the character
/// it inserted after (`None`: the start of the text).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Spot {
    elem: Option<(u64, Vec<u8>)>,
    insert_after: bool,
}

#[derive(Default)]
struct Footprint {
    deleted: BTreeSet<(u64, Vec<u8>)>,
    anchors: BTreeSet<Option<(u64, Vec<u8>)>>,
}

/// One pair of concurrent changes overlapping in one field.
struct Hit {
    a: usize,
    b: usize,
    field: usize,
    spots: BTreeSet<Spot>,
}

impl Document {
    /// The open overlaps (not marked reviewed) of concurrent text edits in the
    /// last [`OVERLAP_WINDOW`] levels of history; see the module documentation.
    pub fn overlaps(&mut self) -> Result<Vec<Overlap>, ModelError> {
        self.overlaps_within(OVERLAP_WINDOW)
    }

    /// [`Self::overlaps`] with another window (causal levels).
    pub fn overlaps_within(&mut self, window: u32) -> Result<Vec<Overlap>, ModelError> {
        let marks = self.review_marks();
        let am = self.doc.document();
        let graph = ChangeGraph::build(am);
        find(am, &graph, window, &marks, true)
    }

    /// How many open overlaps [`Self::overlaps`] would list (cheaper: the
    /// versions of each side are not read).
    pub fn overlap_count(&mut self) -> Result<usize, ModelError> {
        let marks = self.review_marks();
        let am = self.doc.document();
        let graph = ChangeGraph::build(am);
        Ok(find(am, &graph, OVERLAP_WINDOW, &marks, false)?.len())
    }

    /// Every review record in the document.
    pub fn review_marks(&self) -> Vec<ReviewMark> {
        let am = &self.doc;
        let mut out = Vec::new();
        let Ok(lists) = am.get_all(ROOT, REVIEWS_KEY) else { return out };
        for (value, list) in lists {
            if !matches!(value, Value::Object(ObjType::List)) {
                continue;
            }
            for i in 0..am.length(&list) {
                let Ok(Some((Value::Object(ObjType::Map), record))) = am.get(&list, i) else { continue };
                let field = |name: &str| super::read::get_str(am, &record, name, REVIEWS_KEY).ok().flatten();
                let (Some(a), Some(b), Some(f), Some(p)) = (field("a"), field("b"), field("field"), field("paragraph"))
                else {
                    continue;
                };
                let Ok(paragraph) = p.parse() else { continue };
                let by = match &record {
                    ObjId::Id(_, actor, _) => actor.to_hex_string(),
                    ObjId::Root => String::new(),
                };
                out.push(ReviewMark {
                    changes: [a, b],
                    field: f,
                    paragraph,
                    how: field("how").unwrap_or_default(),
                    by,
                });
            }
        }
        out
    }

    /// Settles an overlap in one change: the paragraph is made to say what
    /// `take` says (nothing is edited for [`Take::Merged`]) and a review
    /// record is appended, so the overlap stops showing on every node once the
    /// change syncs. Returns the change hash.
    pub fn resolve_overlap(
        &mut self,
        ctx: &EditContext,
        directory: &Directory,
        overlap: &Overlap,
        take: &Take,
    ) -> Result<Option<ChangeHash>, ModelError> {
        let replacement = match take {
            Take::First => Some(overlap.sides[0].text.clone()),
            Take::Second => Some(overlap.sides[1].text.clone()),
            Take::Text(text) => Some(text.trim().to_string()),
            Take::Merged => None,
        };
        let new_text = match replacement {
            None => None,
            Some(with) => {
                let current = self.doc.text(&overlap.obj)?;
                let base = self.doc.text_at(&overlap.obj, &overlap.base_heads)?;
                let range =
                    paragraphs::carry(&paragraphs::split(&base), &paragraphs::split(&current), overlap.paragraph - 1);
                let text = paragraphs::replace(&current, &paragraphs::spans(&current), range, &with);
                (text != current).then_some(text)
            }
        };
        let fields = vec![
            ("a", overlap.sides[0].change.clone()),
            ("b", overlap.sides[1].change.clone()),
            ("field", overlap.field.clone()),
            ("paragraph", overlap.paragraph.to_string()),
            ("how", take.as_str().to_string()),
            ("at", ctx.time.to_rfc3339()),
        ];
        let message = format!(
            "review overlapping edits of {}, paragraph {}: kept {}",
            overlap.field,
            overlap.paragraph,
            match take {
                Take::First | Take::Second => "one version",
                Take::Merged => "the merged text",
                Take::Text(_) => "a new text",
            }
        );
        let (_, hash) = self.edit(ctx, directory, &message, |e| {
            if let Some(text) = &new_text {
                e.set_field(&overlap.field, text)?;
            }
            e.append_record(REVIEWS_KEY, &fields)
        })?;
        Ok(hash)
    }
}

/// Every text object of the document with the path of its field: root keys
/// holding text, and text fields of items (maps with an `id`) in root lists.
/// Read from the document itself, so new text fields are covered as they come.
fn text_fields(am: &Automerge) -> Vec<(String, ObjId)> {
    let mut out = Vec::new();
    let texts = |obj: &ObjId, key: &str| -> Vec<ObjId> {
        am.get_all(obj, key)
            .unwrap_or_default()
            .into_iter()
            .filter(|(v, _)| matches!(v, Value::Object(ObjType::Text)))
            .map(|(_, id)| id)
            .collect()
    };
    for key in am.keys(ROOT) {
        for id in texts(&ROOT, &key) {
            out.push((key.clone(), id));
        }
        let Ok(Some((Value::Object(ObjType::List), list))) = am.get(ROOT, key.as_str()) else { continue };
        for i in 0..am.length(&list) {
            let Ok(Some((Value::Object(ObjType::Map), item))) = am.get(&list, i) else { continue };
            let Ok(Some(id)) = super::read::get_str(am, &item, "id", &key) else { continue };
            for field in am.keys(&item) {
                for obj in texts(&item, &field) {
                    out.push((format!("{key}.{id}.{field}"), obj));
                }
            }
        }
    }
    // Title and body first, then the items' fields.
    out.sort_by_key(|(path, _)| (!matches!(path.as_str(), "title"), !matches!(path.as_str(), "body"), path.clone()));
    out
}

fn op_key(id: &OpId) -> (u64, Vec<u8>) {
    (id.0, id.1.to_bytes().to_vec())
}

/// What change `c` did to each text object (by field number).
fn footprint(
    am: &Automerge,
    graph: &ChangeGraph,
    c: usize,
    objs: &HashMap<(u64, Vec<u8>), usize>,
) -> BTreeMap<usize, Footprint> {
    let mut out: BTreeMap<usize, Footprint> = BTreeMap::new();
    let Some(change) = am.get_change_by_hash(&graph.hashes[c]) else { return out };
    // Decoding trusts the stored change (it was validated when it arrived);
    // a panic must still only cost this change's contribution.
    let Ok(expanded) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| change.decode())) else {
        return out;
    };
    let own_actor = change.actor_id().to_bytes().to_vec();
    let own_ops = graph.start_op[c]..graph.start_op[c] + graph.ops[c];
    for op in &expanded.operations {
        let ObjectId::Id(obj) = &op.obj else { continue };
        let Some(&field) = objs.get(&op_key(obj)) else { continue };
        let Key::Seq(elem) = &op.key else { continue };
        let entry = out.entry(field).or_default();
        if op.insert {
            match elem {
                ElementId::Head => {
                    entry.anchors.insert(None);
                }
                ElementId::Id(id) => {
                    let key = op_key(id);
                    if !(key.1 == own_actor && own_ops.contains(&key.0)) {
                        entry.anchors.insert(Some(key));
                    }
                }
            }
        } else if matches!(op.action, OpType::Delete) {
            if let ElementId::Id(id) = elem {
                entry.deleted.insert(op_key(id));
            }
        }
    }
    out
}

/// The places where two footprints collide.
fn collisions(a: &Footprint, b: &Footprint) -> BTreeSet<Spot> {
    let mut out = BTreeSet::new();
    for e in a.deleted.intersection(&b.deleted) {
        out.insert(Spot { elem: Some(e.clone()), insert_after: false });
    }
    for anchor in a.anchors.intersection(&b.anchors) {
        out.insert(Spot { elem: anchor.clone(), insert_after: true });
    }
    for (x, y) in [(a, b), (b, a)] {
        for anchor in x.anchors.iter().flatten() {
            if y.deleted.contains(anchor) {
                out.insert(Spot { elem: Some(anchor.clone()), insert_after: true });
            }
        }
    }
    out
}

/// The paragraph of a spot whose character is not in the text read.
const UNPLACED: usize = usize::MAX;

/// The paragraphs (indices) of the text `obj` at `heads` where the spots
/// lie, and that text. One pass over the text's characters gives each
/// character's id and position.
fn paragraphs_of(
    am: &Automerge,
    obj: &ObjId,
    heads: &[ChangeHash],
    spots: &BTreeSet<Spot>,
) -> (BTreeMap<usize, Vec<Spot>>, String) {
    let text = am.text_at(obj, heads).unwrap_or_default();
    let spans = paragraphs::spans(&text);
    let positions: HashMap<(u64, Vec<u8>), usize> =
        am.list_range_at(obj, .., heads).filter_map(|item| obj_key(&item.id()).map(|k| (k, item.index))).collect();
    let mut out: BTreeMap<usize, Vec<Spot>> = BTreeMap::new();
    for spot in spots {
        let position = match &spot.elem {
            None => Some(0),
            Some(elem) => positions.get(elem).map(|&p| if spot.insert_after { p + 1 } else { p }),
        };
        let paragraph = position.and_then(|p| paragraphs::paragraph_at(&spans, p)).unwrap_or(UNPLACED);
        out.entry(paragraph).or_default().push(spot.clone());
    }
    (out, text)
}

fn time_of(ms: i64) -> Option<DateTime<Utc>> {
    (ms != 0).then(|| DateTime::from_timestamp_millis(ms)).flatten()
}

/// The open overlaps; without `detail` only their fields, paragraphs and
/// changes (enough to count them), without reading the sides' versions.
fn find(
    am: &Automerge,
    graph: &ChangeGraph,
    window: u32,
    marks: &[ReviewMark],
    detail: bool,
) -> Result<Vec<Overlap>, ModelError> {
    let fields = text_fields(am);
    if fields.is_empty() || graph.len() < 2 {
        return Ok(Vec::new());
    }
    let objs: HashMap<(u64, Vec<u8>), usize> =
        fields.iter().enumerate().filter_map(|(i, (_, obj))| obj_key(obj).map(|k| (k, i))).collect();
    let max_depth = graph.depth.iter().copied().max().unwrap_or(0);
    let floor = max_depth.saturating_sub(window);
    let start = graph.depth.partition_point(|&d| d <= floor);

    // Concurrent pairs (a, b), a before b in canonical order. Every ancestor
    // of b comes before it, so b is concurrent with exactly
    // `b - (ancestors of b)` earlier changes: none in a linear stretch.
    let mut pairs = Vec::new();
    for b in start..graph.len() {
        let known = ChangeGraph::size_of(graph.clock(b)) as usize - 1;
        let mut unknown = b.saturating_sub(known);
        let mut a = b;
        while unknown > 0 && a > start {
            a -= 1;
            if !graph.is_ancestor_or_self(a, b) {
                pairs.push((a, b));
                unknown -= 1;
            }
        }
    }

    let mut prints: HashMap<usize, BTreeMap<usize, Footprint>> = HashMap::new();
    let mut hits = Vec::new();
    for (a, b) in pairs {
        for c in [a, b] {
            prints.entry(c).or_insert_with(|| footprint(am, graph, c, &objs));
        }
        for (field, fa) in &prints[&a] {
            let Some(fb) = prints[&b].get(field) else { continue };
            let spots = collisions(fa, fb);
            if !spots.is_empty() {
                hits.push(Hit { a, b, field: *field, spots });
            }
        }
    }
    if hits.is_empty() {
        return Ok(Vec::new());
    }

    // Review marks settle the spots of their pair, and of earlier changes of
    // the same two sides, in the marked paragraph.
    // Two pairs are of the same two sides when the later changes of each side
    // were still made without knowing the other side's earlier change.
    let same_sides = |a: usize, b: usize, later_a: usize, later_b: usize| {
        graph.is_ancestor_or_self(a, later_a)
            && graph.is_ancestor_or_self(b, later_b)
            && graph.concurrent(a, later_b)
            && graph.concurrent(b, later_a)
    };
    for hit in &mut hits {
        for mark in marks.iter().filter(|m| m.field == fields[hit.field].0) {
            let (Some(p), Some(q)) = (hex_index(graph, &mark.changes[0]), hex_index(graph, &mark.changes[1])) else {
                continue;
            };
            if !(same_sides(hit.a, hit.b, p, q) || same_sides(hit.a, hit.b, q, p)) {
                continue;
            }
            let heads = graph.heads_of(&graph.common_clock(p, q));
            let (placed, _) = paragraphs_of(am, &fields[hit.field].1, &heads, &hit.spots);
            if let Some(settled) = placed.get(&mark.paragraph.saturating_sub(1)) {
                hit.spots.retain(|s| !settled.contains(s));
            }
        }
    }
    hits.retain(|h| !h.spots.is_empty());

    // Fold each pair into a latest pair of the same two sides.
    let dominates = |h: &Hit, by: &Hit| {
        h.field == by.field
            && (h.a, h.b) != (by.a, by.b)
            && (same_sides(h.a, h.b, by.a, by.b) || same_sides(h.a, h.b, by.b, by.a))
    };
    let maximal: Vec<usize> = (0..hits.len()).filter(|&i| !hits.iter().any(|o| dominates(&hits[i], o))).collect();
    let mut groups: BTreeMap<usize, BTreeSet<Spot>> = maximal.iter().map(|&i| (i, hits[i].spots.clone())).collect();
    for (i, hit) in hits.iter().enumerate() {
        if let Some(&into) = maximal.iter().find(|&&m| m != i && dominates(hit, &hits[m])) {
            groups.entry(into).or_default().extend(hit.spots.iter().cloned());
        }
    }

    let mut out = Vec::new();
    for (i, spots) in groups {
        let hit = &hits[i];
        let (path, obj) = &fields[hit.field];
        let base_heads = graph.heads_of(&graph.common_clock(hit.a, hit.b));
        let (placed, base) = paragraphs_of(am, obj, &base_heads, &spots);
        let base_paras = paragraphs::split(&base);
        if !detail {
            for paragraph in placed.into_keys() {
                let paragraph = if paragraph == UNPLACED { 0 } else { paragraph };
                out.push((hit.field, Overlap::counted(path, paragraph, obj, &base_heads, graph, hit)));
            }
            continue;
        }
        let version = |heads: &[ChangeHash]| -> (String, Vec<String>) {
            let text = am.text_at(obj, heads).unwrap_or_default();
            let paras = paragraphs::split(&text);
            (text, paras)
        };
        let (a_text, a_paras) = version(&side_heads(graph, hit.a, hit.b));
        let (b_text, b_paras) = version(&side_heads(graph, hit.b, hit.a));
        let merged_text = am.text(obj).unwrap_or_default();
        let merged_paras = paragraphs::split(&merged_text);
        let carried = |text: &str, paras: &[String], p: usize| {
            paragraphs::text_of(text, &paragraphs::spans(text), paragraphs::carry(&base_paras, paras, p))
        };
        for paragraph in placed.into_keys() {
            let paragraph = if paragraph == UNPLACED { 0 } else { paragraph };
            let side = |c: usize, text: &str, paras: &[String]| OverlapSide {
                change: graph.hashes[c].to_string(),
                actor: graph.actors[graph.actor[c]].to_hex_string(),
                time: time_of(graph.time[c]),
                message: graph.message[c].clone(),
                text: carried(text, paras, paragraph),
            };
            out.push((
                hit.field,
                Overlap {
                    field: path.clone(),
                    paragraph: paragraph + 1,
                    base: base_paras.get(paragraph).cloned().unwrap_or_default(),
                    sides: [side(hit.a, &a_text, &a_paras), side(hit.b, &b_text, &b_paras)],
                    merged: carried(&merged_text, &merged_paras, paragraph),
                    obj: obj.clone(),
                    base_heads: base_heads.clone(),
                },
            ));
        }
    }
    out.sort_by(|(fa, a), (fb, b)| {
        (fa, a.paragraph, &a.sides[0].change, &a.sides[1].change).cmp(&(
            fb,
            b.paragraph,
            &b.sides[0].change,
            &b.sides[1].change,
        ))
    });
    Ok(out.into_iter().map(|(_, o)| o).collect())
}

/// One side as it stood when the sides met: change `a` and every later
/// change of its side (descendants of `a` still made without knowing `b`).
fn side_heads(graph: &ChangeGraph, a: usize, b: usize) -> Vec<ChangeHash> {
    let mut clock = graph.clock(a).to_vec();
    for x in a + 1..graph.len() {
        if graph.is_ancestor_or_self(a, x) && graph.concurrent(x, b) {
            for (slot, v) in clock.iter_mut().zip(graph.clock(x)) {
                *slot = (*slot).max(*v);
            }
        }
    }
    graph.heads_of(&clock)
}

fn hex_index(graph: &ChangeGraph, hex: &str) -> Option<usize> {
    let hash: ChangeHash = hex.parse().ok()?;
    graph.index.get(&hash).copied()
}

#[cfg(test)]
mod tests;
