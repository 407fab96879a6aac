//! Model tests: editing, validation, and how concurrent edits merge.

use chrono::{TimeZone, Utc};

use super::*;
use crate::identity::NodeKey;
use crate::ids::ItemId;
use crate::org::Directory;

pub(super) fn ctx(org: &str, name: &str) -> EditContext {
    EditContext {
        author: NodeKey::generate().node_id(),
        org: OrgId::new(org).unwrap(),
        node_name: name.to_string(),
        time: Utc.with_ymd_and_hms(2025, 3, 1, 9, 0, 0).unwrap(),
    }
}

pub(super) fn agreement(ctx: &EditContext) -> Document {
    let mut content = DocumentContent::new(DocKind::Agreement, "Lokal samverkansöverenskommelse Flen");
    content.parties = vec![OrgId::new("flen-kommun").unwrap(), OrgId::new("polisomrade-sodermanland").unwrap()];
    content.body = "## Bakgrund\n\nTrygghet i centrum.\n\n## Mål\n\nFärre inbrott.\n".into();
    Document::create(DocId::random(), content, ctx, &Directory::sodermanland()).unwrap()
}

/// Merges `b` into `a` and `a` into `b` (as sync would) and checks they agree.
fn merge_both(a: &mut Document, b: &mut Document) {
    a.automerge_mut().merge(b.automerge_mut()).unwrap();
    b.automerge_mut().merge(a.automerge_mut()).unwrap();
    assert_eq!(a.heads(), b.heads());
    assert_eq!(a.view().unwrap(), b.view().unwrap());
}

pub(super) fn fork(doc: &mut Document, ctx: &EditContext) -> Document {
    let forked = doc.automerge_mut().fork().with_actor(ctx.author.actor_id());
    Document::from_automerge(doc.id().clone(), forked).unwrap()
}

#[test]
fn created_document_reads_back_with_swedish_text_exact() {
    let c = ctx("flen-kommun", "Flen");
    let doc = agreement(&c);
    let view = doc.view().unwrap();
    assert_eq!(view.title, "Lokal samverkansöverenskommelse Flen");
    assert_eq!(view.kind, DocKind::Agreement);
    assert_eq!(view.parties.len(), 2);
    assert!(view.body.contains("Färre inbrott."));
    let contributors = doc.contributors().unwrap();
    assert_eq!(contributors[&c.author.actor_id().to_hex_string()].node, "Flen");
}

#[test]
fn validation_refuses_bad_edits_and_leaves_the_document_untouched() {
    let c = ctx("flen-kommun", "Flen");
    let mut doc = agreement(&c);
    let dir = Directory::sodermanland();
    let before = doc.heads();
    let err = doc.edit(&c, &dir, "bad", |e| e.set_title("   ")).unwrap_err();
    assert!(matches!(err, ModelError::EmptyTitle));
    let err = doc
        .edit(&c, &dir, "bad", |e| {
            e.set_body("ändrad")?;
            e.set_field("period.start", "2025-06-01")?;
            e.set_field("period.end", "2025-01-01")
        })
        .unwrap_err();
    assert!(matches!(err, ModelError::PeriodEndsBeforeStart { .. }), "{err}");
    let err = doc.edit(&c, &dir, "bad", |e| e.set_field("parties", "Flen, Uppsala kommun")).unwrap_err();
    assert!(err.to_string().contains("Uppsala kommun"), "{err}");
    let err = doc.edit(&c, &dir, "bad", |e| e.set_field("activities.nope.due", "2025-01-01")).unwrap_err();
    assert!(matches!(err, ModelError::NoSuchItem { .. }));
    assert_eq!(doc.heads(), before, "failed edits must leave no trace");
    assert!(doc.view().unwrap().body.contains("Trygghet"));
}

#[test]
fn an_edit_that_changes_nothing_makes_no_change() {
    let c = ctx("flen-kommun", "Flen");
    let mut doc = agreement(&c);
    let view = doc.view().unwrap();
    let (_, hash) = doc.edit(&c, &Directory::sodermanland(), "noop", |e| e.apply(&view)).unwrap();
    assert_eq!(hash, None);
}

#[test]
fn concurrent_edits_of_one_paragraph_merge_character_by_character() {
    let dir = Directory::sodermanland();
    let flen = ctx("flen-kommun", "Flen");
    let police = ctx("polisomrade-sodermanland", "Polisen");
    let mut a = agreement(&flen);
    let mut b = fork(&mut a, &police);
    a.edit(&flen, &dir, "body", |e| {
        e.set_body("## Bakgrund\n\nTrygghet i hela centrum.\n\n## Mål\n\nFärre inbrott.\n")
    })
    .unwrap();
    b.edit(&police, &dir, "body", |e| {
        e.set_body("## Bakgrund\n\nTrygghet i centrum, dag och natt.\n\n## Mål\n\nFärre inbrott.\n")
    })
    .unwrap();
    merge_both(&mut a, &mut b);
    assert_eq!(
        a.view().unwrap().body,
        "## Bakgrund\n\nTrygghet i hela centrum, dag och natt.\n\n## Mål\n\nFärre inbrott.\n"
    );
}

#[test]
fn concurrent_activity_additions_both_survive() {
    let dir = Directory::sodermanland();
    let flen = ctx("flen-kommun", "Flen");
    let police = ctx("polisomrade-sodermanland", "Polisen");
    let mut a = agreement(&flen);
    let mut b = fork(&mut a, &police);
    let new = |what: &str| Activity::new(what);
    a.edit(&flen, &dir, "add", |e| e.add_activity(&new("Trygghetsvandring"))).unwrap();
    b.edit(&police, &dir, "add", |e| e.add_activity(&new("Föräldravandring"))).unwrap();
    merge_both(&mut a, &mut b);
    let mut whats: Vec<String> = a.view().unwrap().activities.into_iter().map(|x| x.what).collect();
    whats.sort();
    assert_eq!(whats, ["Föräldravandring", "Trygghetsvandring"]);
}

#[test]
fn concurrent_dates_conflict_until_resolved() {
    let dir = Directory::sodermanland();
    let flen = ctx("flen-kommun", "Flen");
    let police = ctx("polisomrade-sodermanland", "Polisen");
    let mut a = agreement(&flen);
    let activity =
        Activity { owners: vec![Owner::org(OrgId::new("flen-kommun").unwrap())], ..Activity::new("Trygghetsvandring") };
    let (id, _) = a.edit(&flen, &dir, "add", |e| e.add_activity(&activity)).unwrap();
    let mut b = fork(&mut a, &police);
    let path = format!("activities.{id}.due");
    a.edit(&flen, &dir, "due", |e| e.set_field(&path, "2025-05-01")).unwrap();
    b.edit(&police, &dir, "due", |e| e.set_field(&path, "2025-06-15")).unwrap();
    merge_both(&mut a, &mut b);
    let conflicts = a.conflicts().unwrap();
    assert_eq!(conflicts.len(), 1, "{conflicts:?}");
    assert_eq!(conflicts[0].path, path);
    let mut values: Vec<&str> = conflicts[0].values.iter().map(|v| v.value.as_str()).collect();
    values.sort();
    assert_eq!(values, ["2025-05-01", "2025-06-15"]);
    assert_eq!(b.conflicts().unwrap(), conflicts, "both sides see the same conflict");

    a.edit(&flen, &dir, "resolve", |e| e.set_field(&path, "2025-06-15")).unwrap();
    merge_both(&mut a, &mut b);
    assert!(a.conflicts().unwrap().is_empty());
    assert_eq!(a.view().unwrap().activities[0].due, chrono::NaiveDate::from_ymd_opt(2025, 6, 15).map(Due::Date));
}

/// An activity as the schema before `owners` and `deadline` wrote it: `owner` and a `due` date.
fn add_legacy_activity(doc: &mut Document, what: &str, owner: &str, due: &str) -> ItemId {
    use automerge::transaction::Transactable;
    use automerge::{ObjType, ReadDoc};
    let id = ItemId::random();
    let am = doc.automerge_mut();
    let (_, list) = am.get(automerge::ROOT, "activities").unwrap().unwrap();
    let at = am.length(&list);
    let obj = am.insert_object(&list, at, ObjType::Map).unwrap();
    am.put(&obj, "id", id.as_str()).unwrap();
    let text = am.put_object(&obj, "what", ObjType::Text).unwrap();
    am.splice_text(&text, 0, 0, what).unwrap();
    am.put(&obj, "owner", owner).unwrap();
    am.put(&obj, "due", due).unwrap();
    am.put(&obj, "status", "planned").unwrap();
    am.commit();
    id
}

#[test]
fn activities_written_before_owners_and_deadlines_keep_loading_and_move_over_when_changed() {
    let dir = Directory::sodermanland();
    let flen = ctx("flen-kommun", "Flen");
    let mut a = agreement(&flen);
    let id = add_legacy_activity(&mut a, "Trygghetsvandring", "flen-kommun", "2024-05-31");
    let read = a.view().unwrap().activities[0].clone();
    assert_eq!(read.owners, [Owner::org(OrgId::new("flen-kommun").unwrap())]);
    assert_eq!(read.due, chrono::NaiveDate::from_ymd_opt(2024, 5, 31).map(Due::Date));
    // Re-applying the unchanged view writes nothing.
    let view = a.view().unwrap();
    assert_eq!(a.edit(&flen, &dir, "same", |e| e.apply(&view)).unwrap().1, None);
    // Changing them writes the new keys and drops the old ones.
    let path = |f: &str| format!("activities.{id}.{f}");
    a.edit(&flen, &dir, "owners", |e| e.set_field(&path("owners"), "Kommunen; polisen")).unwrap();
    a.edit(&flen, &dir, "due", |e| e.set_field(&path("due"), "löpande")).unwrap();
    let read = a.view().unwrap().activities[0].clone();
    assert_eq!(read.owners.len(), 2);
    assert_eq!(read.due, Some(Due::Ongoing));
    let am = a.automerge();
    let obj = {
        use automerge::ReadDoc;
        let (_, list) = am.get(automerge::ROOT, "activities").unwrap().unwrap();
        am.get(&list, 0).unwrap().unwrap().1
    };
    use automerge::ReadDoc;
    assert!(am.get(&obj, "owner").unwrap().is_none() && am.get(&obj, "due").unwrap().is_none());
    assert!(a.conflicts().unwrap().is_empty());
}

#[test]
fn owners_units_deadlines_and_follow_up_methods_are_kept_and_merge() {
    let dir = Directory::sodermanland();
    let flen = ctx("flen-kommun", "Flen");
    let police = ctx("polisomrade-sodermanland", "Polisen");
    let mut a = agreement(&flen);
    // The police party acts through its lokalpolisområde; access stays with the police area.
    a.edit(&flen, &dir, "parties", |e| e.set_field("parties", "Flen, LPO Katrineholm")).unwrap();
    let view = a.view().unwrap();
    let police_area = OrgId::new("polisomrade-sodermanland").unwrap();
    assert_eq!(view.parties, [OrgId::new("flen-kommun").unwrap(), police_area.clone()]);
    assert_eq!(view.party_units[&police_area], "Lokalpolisområde Katrineholm");
    assert_eq!(a.parties().unwrap(), view.parties, "access control reads organisations only");

    let (id, _) = a
        .edit(&flen, &dir, "add", |e| {
            let mut activity = Activity::new("Belysning i gångtunneln");
            activity.owners = vec![e.resolve_owner("kommunen (tekniska förvaltningen)")?];
            activity.due = Some(Due::Quarter { year: 2025, quarter: 3 });
            activity.followup_method = Some("Trygghetsvandring efteråt".into());
            e.add_activity(&activity)
        })
        .unwrap();
    let mut b = fork(&mut a, &police);
    let path = |f: &str| format!("activities.{id}.{f}");
    // Both add an owner offline: both survive (one list, items added).
    let mut view_a = a.view().unwrap();
    view_a.activities[0].owners.push(Owner::External("Fastighetsägarna".into()));
    a.edit(&flen, &dir, "owner", |e| e.apply(&view_a)).unwrap();
    let (_, lpo) = b.edit(&police, &dir, "resolve", |e| e.resolve_owner("polisen")).map(|(o, h)| (h, o)).unwrap();
    let mut view_b = b.view().unwrap();
    view_b.activities[0].owners.push(lpo);
    b.edit(&police, &dir, "owner", |e| e.apply(&view_b)).unwrap();
    b.edit(&police, &dir, "method", |e| e.set_field(&path("followup_method"), "Trygghetsvandring i oktober")).unwrap();
    merge_both(&mut a, &mut b);
    let merged = a.view().unwrap().activities[0].clone();
    let mut owners: Vec<String> = merged.owners.iter().map(Owner::encode).collect();
    assert_eq!(owners[0], "flen-kommun/tekniska förvaltningen");
    owners.sort(); // concurrent insertions at one place come out in actor order
    assert_eq!(
        owners,
        [
            "extern:Fastighetsägarna",
            "flen-kommun/tekniska förvaltningen",
            "polisomrade-sodermanland/Lokalpolisområde Katrineholm"
        ]
    );
    assert_eq!(merged.followup_method.as_deref(), Some("Trygghetsvandring i oktober"));
    assert_eq!(merged.due, Some(Due::Quarter { year: 2025, quarter: 3 }));
    assert!(a.conflicts().unwrap().is_empty());

    // Owners are reordered exactly, without rewriting the others.
    let mut view = a.view().unwrap();
    view.activities[0].owners.reverse();
    a.edit(&flen, &dir, "reorder", |e| e.apply(&view)).unwrap();
    assert_eq!(a.view().unwrap().activities[0].owners, view.activities[0].owners);

    // Refused: a unit under the wrong organisation, an unknown owner, a deadline typed wrong.
    let err =
        a.edit(&flen, &dir, "x", |e| e.set_field(&path("owners"), "Flen (Lokalpolisområde Nyköping)")).unwrap_err();
    assert!(err.to_string().contains("is a unit of Polisområde Södermanland"), "{err}");
    let err = a.edit(&flen, &dir, "x", |e| e.set_field(&path("owners"), "Fastighetsägarna")).unwrap_err();
    assert!(err.to_string().contains("extern: Fastighetsägarna"), "{err}");
    let err = a.edit(&flen, &dir, "x", |e| e.set_field(&path("due"), "snart")).unwrap_err();
    assert!(err.to_string().contains("löpande"), "{err}");
}
