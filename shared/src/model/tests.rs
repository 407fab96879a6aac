//! Model tests: editing, validation, and how concurrent edits merge.

use chrono::{TimeZone, Utc};

use super::*;
use crate::identity::NodeKey;
use crate::ids::ItemId;
use crate::org::Directory;

fn ctx(org: &str, name: &str) -> EditContext {
    EditContext {
        author: NodeKey::generate().node_id(),
        org: OrgId::new(org).unwrap(),
        node_name: name.to_string(),
        time: Utc.with_ymd_and_hms(2025, 3, 1, 9, 0, 0).unwrap(),
    }
}

fn agreement(ctx: &EditContext) -> Document {
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

fn fork(doc: &mut Document, ctx: &EditContext) -> Document {
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
    let new = |what: &str| Activity {
        id: ItemId::random(),
        what: what.into(),
        owner: None,
        due: None,
        status: ActivityStatus::Planned,
    };
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
    let activity = Activity {
        id: ItemId::random(),
        what: "Trygghetsvandring".into(),
        owner: Some(OrgId::new("flen-kommun").unwrap()),
        due: None,
        status: ActivityStatus::Planned,
    };
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
    assert_eq!(a.view().unwrap().activities[0].due, chrono::NaiveDate::from_ymd_opt(2025, 6, 15));
}

#[test]
fn apply_updates_items_by_id_and_keeps_concurrent_additions() {
    let dir = Directory::sodermanland();
    let flen = ctx("flen-kommun", "Flen");
    let police = ctx("polisomrade-sodermanland", "Polisen");
    let mut a = agreement(&flen);
    a.edit(&flen, &dir, "goal", |e| e.add_goal("Ökad trygghet")).unwrap();
    let mut b = fork(&mut a, &police);
    // A edits the whole document (as `edit` does) while B adds a goal.
    let mut view = a.view().unwrap();
    view.goals[0].text = "Ökad trygghet i centrum".into();
    view.place = Some("Flen".into());
    a.edit(&flen, &dir, "edit", |e| e.apply(&view)).unwrap();
    b.edit(&police, &dir, "goal", |e| e.add_goal("Färre skadegörelsebrott")).unwrap();
    merge_both(&mut a, &mut b);
    let goals: Vec<String> = a.view().unwrap().goals.into_iter().map(|g| g.text).collect();
    assert_eq!(goals, ["Ökad trygghet i centrum", "Färre skadegörelsebrott"]);
}

#[test]
fn history_lists_every_change_with_message_and_time() {
    let dir = Directory::sodermanland();
    let flen = ctx("flen-kommun", "Flen");
    let mut a = agreement(&flen);
    a.edit(&flen, &dir, "set place", |e| e.set_place(Some("Flen"))).unwrap();
    let history = a.history();
    assert_eq!(history.len(), 2);
    assert_eq!(history[1].message.as_deref(), Some("set place"));
    assert_eq!(history[1].time, Some(flen.time));
    assert_eq!(history[0].actor, flen.author.actor_id().to_hex_string());
}

#[test]
fn loading_checks_id_and_schema() {
    let flen = ctx("flen-kommun", "Flen");
    let mut a = agreement(&flen);
    let bytes = a.automerge_mut().save();
    assert!(Document::load(a.id().clone(), &bytes).is_ok());
    let other = DocId::random();
    assert!(matches!(Document::load(other, &bytes), Err(ModelError::WrongDocument { .. })));
    assert!(matches!(Document::load(DocId::random(), b"garbage"), Err(ModelError::Automerge(_))));
    let mut foreign = automerge::AutoCommit::new();
    automerge::transaction::Transactable::put(&mut foreign, automerge::ROOT, "todo", "x").unwrap();
    assert!(matches!(Document::from_automerge(DocId::random(), foreign), Err(ModelError::Malformed { .. })));
}

#[test]
fn signed_version_is_readable_after_later_edits() {
    let dir = Directory::sodermanland();
    let flen = ctx("flen-kommun", "Flen");
    let mut a = agreement(&flen);
    let signed = a.heads();
    a.edit(&flen, &dir, "title", |e| e.set_title("Ny titel")).unwrap();
    assert_eq!(a.at(&signed).unwrap().view().unwrap().title, "Lokal samverkansöverenskommelse Flen");
    assert_eq!(a.view().unwrap().title, "Ny titel");
}
