//! The fields a store writes beside every version of a document (its kind,
//! title and parties), so that documents can be listed and access-checked
//! without loading them.
//!
//! Reading them costs four map lookups and a text read in Automerge 0.12
//! (about 80 µs on a 100-change document, more on a long one), paid by the
//! editor, the relay and every receiving node on each change. A change that
//! touched none of the objects they come from (the root map, the title's
//! text, the parties' list) cannot have changed them, nor the header: then
//! the values read at the version before are still the values now, and only
//! what a change touched is read again ([`super::Document::stored_fields_after`]).

use std::collections::HashSet;

use automerge::{Change, ChangeHash, ObjId, ObjType, ReadDoc, Value, ROOT};

use super::read::{self, keys};
use super::{DocKind, ModelError};
use crate::ids::DocId;
use crate::org::OrgId;

/// What a store keeps beside a document version: its kind, title and parties.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredFields {
    /// The kind of document.
    pub kind: DocKind,
    /// The title as text.
    pub title: String,
    /// The parties (organisations), without duplicates, in document order.
    pub parties: Vec<OrgId>,
}

/// An object's identity independent of any one document copy: its creating
/// operation's counter and actor.
pub(crate) type ObjKey = (u64, Vec<u8>);

/// The key of `obj` (`None` for the root).
pub(crate) fn obj_key(obj: &ObjId) -> Option<ObjKey> {
    match obj {
        ObjId::Id(ctr, actor, _) => Some((*ctr, actor.to_bytes().to_vec())),
        ObjId::Root => None,
    }
}

/// The objects a change's operations touched.
#[derive(Debug, Default)]
pub(crate) struct Touched {
    /// Whether any operation was on the root map.
    pub root: bool,
    /// The other objects operated on.
    pub objects: HashSet<ObjKey>,
}

/// The objects `change`'s operations touched; `None` if the change could not
/// be decoded (then anything may have been touched).
pub(crate) fn touched(change: &Change) -> Option<Touched> {
    let expanded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| change.decode())).ok()?;
    let mut out = Touched::default();
    for op in &expanded.operations {
        match &op.obj {
            automerge::legacy::ObjectId::Id(id) => {
                out.objects.insert((id.0, id.1.to_bytes().to_vec()));
            }
            automerge::legacy::ObjectId::Root => out.root = true,
        }
    }
    Some(out)
}

/// [`StoredFields`] as read at some heads, with the objects the title and the
/// parties came from (`None`: a plain value in the root map, or absent).
#[derive(Debug, Clone)]
pub(super) struct FieldsAt {
    heads: Vec<ChangeHash>,
    fields: StoredFields,
    title: Option<ObjKey>,
    parties: Option<ObjKey>,
}

impl FieldsAt {
    /// Reads the fields of `doc` now (its header checked first), at `heads`.
    pub(super) fn read<R: ReadDoc>(doc: &R, id: &DocId, heads: Vec<ChangeHash>) -> Result<Self, ModelError> {
        read::check_header(doc, id)?;
        let (title_obj, title) = match doc.get(ROOT, keys::TITLE)? {
            Some((Value::Object(ObjType::Text), text)) => (obj_key(&text), doc.text(&text)?),
            _ => (None, read::get_text(doc, &ROOT, keys::TITLE, keys::TITLE)?),
        };
        let parties = match doc.get(ROOT, keys::PARTIES)? {
            Some((Value::Object(ObjType::List), list)) => obj_key(&list),
            _ => None,
        };
        let fields = StoredFields { kind: read::kind(doc)?, title, parties: read::parties(doc)? };
        Ok(Self { heads, fields, title: title_obj, parties })
    }

    /// Brings the fields from `before` to `now`, `new` being every change
    /// between: reads again the title or the parties if a change touched
    /// their object. `Ok(false)` (nothing changed here) when the fields were
    /// not read at `before`, or a change touched the root map (the header,
    /// the kind, which objects the title and the parties are) or could not
    /// be decoded: then everything is to be read again.
    pub(super) fn advance<R: ReadDoc>(
        &mut self,
        doc: &R,
        before: &[ChangeHash],
        new: &[Change],
        now: Vec<ChangeHash>,
    ) -> Result<bool, ModelError> {
        if self.heads != before {
            return Ok(false);
        }
        let (mut title, mut parties) = (false, false);
        for change in new {
            let Some(touched) = touched(change) else { return Ok(false) };
            if touched.root {
                return Ok(false);
            }
            let hit = |obj: &Option<ObjKey>| obj.as_ref().is_some_and(|obj| touched.objects.contains(obj));
            title |= hit(&self.title);
            parties |= hit(&self.parties);
        }
        if title {
            let title = read::get_text(doc, &ROOT, keys::TITLE, keys::TITLE)?;
            self.fields.title = title;
        }
        if parties {
            let parties = read::parties(doc)?;
            self.fields.parties = parties;
        }
        self.heads = now;
        Ok(true)
    }

    /// The fields read.
    pub(super) fn fields(&self) -> &StoredFields {
        &self.fields
    }
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::super::tests::{agreement, ctx, fork};
    use super::super::{Document, EditContext, Editor, Scope};
    use super::*;
    use crate::org::Directory;

    type Edit = fn(&mut Editor<'_>, usize) -> Result<(), ModelError>;

    /// Edits by what they touch: the first two leave the stored fields alone.
    const EDITS: [(&str, Edit); 5] = [
        ("body", |e, i| e.set_body(&format!("## Bakgrund\n\nVersion {i}.\n"))),
        ("goal", |e, i| e.add_goal(&format!("Mål {i}")).map(drop)),
        ("title", |e, i| e.set_title(&format!("Överenskommelse, version {i}"))),
        ("parties", |e, i| {
            let mut parties = vec![OrgId::new("flen-kommun").unwrap(), OrgId::new("polisomrade-sodermanland").unwrap()];
            if i % 2 == 1 {
                parties.push(OrgId::new("lansstyrelsen-sodermanland").unwrap());
            }
            e.set_parties(&parties)
        }),
        ("scope", |e, i| e.set_scope(if i % 2 == 0 { Scope::County } else { Scope::Local })),
    ];

    /// The fields as a copy without anything remembered reads them.
    fn read_afresh(doc: &Document) -> StoredFields {
        Document::from_automerge(doc.id().clone(), doc.automerge().clone()).unwrap().stored_fields().unwrap()
    }

    fn edit(doc: &mut Document, ctx: &EditContext, which: usize, i: usize) {
        let (name, f) = EDITS[which];
        doc.edit(ctx, &Directory::sodermanland(), name, |e| f(e, i)).unwrap();
    }

    /// The fields read at `doc`'s heads.
    fn read_now(doc: &mut Document) -> FieldsAt {
        let heads = doc.heads();
        FieldsAt::read(doc.automerge(), doc.id(), heads).unwrap()
    }

    /// `fields` brought to `doc`'s heads from `before`; whether that was done
    /// without reading everything again.
    fn advance(fields: &mut FieldsAt, doc: &mut Document, before: &[ChangeHash]) -> bool {
        let new = doc.automerge_mut().get_changes(before);
        let now = doc.heads();
        fields.advance(doc.automerge(), before, &new, now).unwrap()
    }

    #[test]
    fn stored_fields_are_read_again_only_where_a_change_touched_them() {
        let author = ctx("flen-kommun", "Flen");
        let mut doc = agreement(&author);
        let mut fields = read_now(&mut doc);
        for (which, (name, _)) in EDITS.iter().enumerate() {
            let before = doc.heads();
            edit(&mut doc, &author, which, 1);
            // Only a change of the root map (the scope) needs everything read again.
            let advanced = advance(&mut fields, &mut doc, &before);
            assert_eq!(advanced, *name != "scope", "{name}");
            if !advanced {
                fields = read_now(&mut doc);
            }
            assert_eq!(fields.fields(), &read_afresh(&doc), "{name}");
        }
        // Read at other heads than the changes start from: everything again.
        let before = doc.heads();
        edit(&mut doc, &author, 0, 2);
        assert!(!advance(&mut fields, &mut doc, &before[..0]));
        // Through the document: the same values.
        let before = doc.heads();
        doc.stored_fields().unwrap();
        edit(&mut doc, &author, 2, 3);
        let new = doc.automerge_mut().get_changes(&before);
        assert_eq!(doc.stored_fields_after(&before, &new).unwrap(), read_afresh(&doc));
    }

    /// Two authors edit and merge at random; the fields brought forward
    /// always equal what a fresh read finds, changes received from the other
    /// side included.
    #[test]
    fn stored_fields_brought_forward_always_equal_a_fresh_read() {
        for seed in 0..8u64 {
            let mut rng = StdRng::seed_from_u64(seed);
            let (a_ctx, b_ctx) = (ctx("flen-kommun", "Flen"), ctx("polisomrade-sodermanland", "Polisen"));
            let mut a = agreement(&a_ctx);
            let mut b = fork(&mut a, &b_ctx);
            let mut fields = read_now(&mut a);
            let mut advanced = 0;
            for i in 0..60 {
                let before = a.heads();
                match rng.gen_range(0..4) {
                    0 => {
                        let which = rng.gen_range(0..EDITS.len());
                        edit(&mut b, &b_ctx, which, i);
                        a.automerge_mut().merge(b.automerge_mut()).unwrap();
                    }
                    1 => {
                        b.automerge_mut().merge(a.automerge_mut()).unwrap();
                        continue;
                    }
                    _ => edit(&mut a, &a_ctx, rng.gen_range(0..EDITS.len()), i),
                }
                if advance(&mut fields, &mut a, &before) {
                    advanced += 1;
                } else {
                    fields = read_now(&mut a);
                }
                assert_eq!(fields.fields(), &read_afresh(&a), "seed {seed}, step {i}");
            }
            assert!(advanced > 0, "seed {seed}: everything was read again every time");
        }
    }
}
