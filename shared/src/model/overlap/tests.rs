//! Overlap detection: the new user's "två gånger per åmånd", seen the same on
//! every node, settled once for all; edits that do not overlap stay quiet.

use chrono::{TimeZone, Utc};

use super::*;
use crate::identity::NodeKey;
use crate::ids::{DocId, ItemId};
use crate::model::{Activity, ActivityStatus, DocKind, DocumentContent};
use crate::org::OrgId;

const BODY: &str = "## Organisation\n\nStyrgruppen består av länsråd och polisområdeschef.\n\nStyrgruppen bör träffas **minst två gånger per år**.\n\n## Uppföljning\n\nArbetet följs upp årligen.\n";

fn ctx(org: &str, name: &str) -> EditContext {
    EditContext {
        author: NodeKey::generate().node_id(),
        org: OrgId::new(org).unwrap(),
        node_name: name.to_string(),
        time: Utc.with_ymd_and_hms(2025, 3, 1, 9, 0, 0).unwrap(),
    }
}

fn dir() -> Directory {
    Directory::sodermanland()
}

fn agreement(ctx: &EditContext) -> Document {
    let mut content = DocumentContent::new(DocKind::Agreement, "Samverkansöverenskommelse Flen");
    content.parties = vec![OrgId::new("flen-kommun").unwrap(), OrgId::new("polisomrade-sodermanland").unwrap()];
    content.body = BODY.into();
    Document::create(DocId::random(), content, ctx, &dir()).unwrap()
}

fn fork(doc: &mut Document, ctx: &EditContext) -> Document {
    let forked = doc.automerge_mut().fork().with_actor(ctx.author.actor_id());
    Document::from_automerge(doc.id().clone(), forked).unwrap()
}

fn merge(into: &mut Document, from: &mut Document) {
    into.automerge_mut().merge(from.automerge_mut()).unwrap();
}

fn set_body(doc: &mut Document, ctx: &EditContext, from: &str, to: &str) -> ChangeHash {
    let body = doc.view().unwrap().body;
    assert!(body.contains(from), "{from:?} not in {body:?}");
    let body = body.replacen(from, to, 1);
    doc.edit(ctx, &dir(), "edit body", |e| e.set_body(&body)).unwrap().1.expect("a change")
}

/// The user's case: two nodes change the same phrase differently offline.
fn two_offline_edits() -> (Document, Document, EditContext, EditContext) {
    let flen = ctx("flen-kommun", "Flen");
    let police = ctx("polisomrade-sodermanland", "Polisen");
    let mut a = agreement(&flen);
    let mut b = fork(&mut a, &police);
    set_body(&mut a, &flen, "två gånger per år", "två gånger per månad");
    set_body(&mut b, &police, "två gånger per år", "två gånger per vecka");
    (a, b, flen, police)
}

#[test]
fn the_same_phrase_edited_differently_is_one_overlap_the_same_on_every_node() {
    let (mut a, mut b, flen, police) = two_offline_edits();
    // A third node that never saw either edit receives both at once.
    let mut c = Document::from_automerge(a.id().clone(), automerge::AutoCommit::new()).unwrap();
    let mut both = a.automerge_mut().fork();
    both.merge(b.automerge_mut()).unwrap();
    c.automerge_mut().load_incremental(&both.save()).unwrap();
    merge(&mut a, &mut b);
    merge(&mut b, &mut a);

    let found = a.overlaps().unwrap();
    assert_eq!(found.len(), 1, "{found:#?}");
    assert_eq!(b.overlaps().unwrap(), found, "the other author's node");
    assert_eq!(c.overlaps().unwrap(), found, "a node that received both at once");

    let o = &found[0];
    assert_eq!(o.field, "body");
    assert_eq!(o.paragraph, 3);
    assert_eq!(o.base, "Styrgruppen bör träffas **minst två gånger per år**.");
    let mut versions: Vec<(&str, &str)> = o.sides.iter().map(|s| (s.actor.as_str(), s.text.as_str())).collect();
    versions.sort();
    let mut expected = [
        (flen.author.actor_id().to_hex_string(), "Styrgruppen bör träffas **minst två gånger per månad**."),
        (police.author.actor_id().to_hex_string(), "Styrgruppen bör träffas **minst två gånger per vecka**."),
    ];
    expected.sort();
    assert_eq!(versions, expected.iter().map(|(a, t)| (a.as_str(), *t)).collect::<Vec<_>>());
    assert_eq!(o.merged, paragraphs::split(&a.view().unwrap().body)[2], "the merged paragraph as it stands");
    assert_ne!(o.merged, o.sides[0].text, "per-character merge mixed the two: {}", o.merged);
    assert!(o.sides[0].change < o.sides[1].change, "sides in canonical order");
}

#[test]
fn edits_in_different_paragraphs_or_different_places_of_one_do_not_overlap() {
    let flen = ctx("flen-kommun", "Flen");
    let police = ctx("polisomrade-sodermanland", "Polisen");
    let mut a = agreement(&flen);
    let mut b = fork(&mut a, &police);
    set_body(&mut a, &flen, "länsråd", "landshövding");
    set_body(&mut b, &police, "följs upp årligen", "följs upp varje halvår");
    // One paragraph, different places: "bör" → "ska", and words added at its end.
    set_body(&mut a, &flen, "bör träffas", "ska träffas");
    set_body(&mut b, &police, "per år**.", "per år**, vår och höst.");
    merge(&mut a, &mut b);
    assert!(a.view().unwrap().body.contains("ska träffas **minst två gånger per år**, vår och höst."));
    assert_eq!(a.overlaps().unwrap(), Vec::new());
}

#[test]
fn edits_made_one_after_the_other_never_overlap() {
    let flen = ctx("flen-kommun", "Flen");
    let police = ctx("polisomrade-sodermanland", "Polisen");
    let mut a = agreement(&flen);
    set_body(&mut a, &flen, "två gånger per år", "två gånger per månad");
    let mut b = fork(&mut a, &police);
    set_body(&mut b, &police, "två gånger per månad", "två gånger per vecka");
    merge(&mut a, &mut b);
    assert!(a.overlaps().unwrap().is_empty());
}

#[test]
fn resolving_marks_the_overlap_reviewed_on_every_node() {
    let (mut a, mut b, flen, _) = two_offline_edits();
    merge(&mut a, &mut b);
    let overlap = a.overlaps().unwrap().remove(0);
    let chosen = overlap.sides[1].text.clone();
    let hash = a.resolve_overlap(&flen, &dir(), &overlap, &Take::Second).unwrap();
    assert!(hash.is_some());
    let body = a.view().unwrap().body;
    assert_eq!(paragraphs::split(&body)[2], chosen);
    assert_eq!(body.replace(&chosen, ""), BODY.replace("Styrgruppen bör träffas **minst två gånger per år**.", ""));
    assert!(a.overlaps().unwrap().is_empty());
    let marks = a.review_marks();
    assert_eq!(marks.len(), 1);
    assert_eq!(marks[0].by, flen.author.actor_id().to_hex_string());
    assert_eq!(marks[0].how, "second");
    assert_eq!(
        format!("{}:{}:{}:{}", marks[0].changes[0], marks[0].changes[1], marks[0].field, marks[0].paragraph),
        overlap.key()
    );

    merge(&mut b, &mut a);
    assert!(b.overlaps().unwrap().is_empty(), "the mark syncs with the document");
}

#[test]
fn keeping_the_merged_text_or_writing_one_also_settles_it() {
    let (mut a, mut b, flen, police) = two_offline_edits();
    merge(&mut a, &mut b);
    merge(&mut b, &mut a);
    let overlap = a.overlaps().unwrap().remove(0);
    let before = a.view().unwrap().body;
    a.resolve_overlap(&flen, &dir(), &overlap, &Take::Merged).unwrap();
    assert_eq!(a.view().unwrap().body, before, "nothing edited");
    assert!(a.overlaps().unwrap().is_empty());

    let written = "Styrgruppen ska träffas minst fyra gånger per år.";
    b.resolve_overlap(&police, &dir(), &overlap, &Take::Text(written.into())).unwrap();
    assert!(b.view().unwrap().body.contains(written));
    // Both reviewed it at once: two records, no conflict, still settled.
    merge(&mut a, &mut b);
    assert_eq!(a.review_marks().len(), 2);
    assert!(a.overlaps().unwrap().is_empty());
}

#[test]
fn several_overlapping_changes_of_one_side_show_as_one_overlap_with_the_latest() {
    let flen = ctx("flen-kommun", "Flen");
    let police = ctx("polisomrade-sodermanland", "Polisen");
    let mut a = agreement(&flen);
    let mut b = fork(&mut a, &police);
    set_body(&mut a, &flen, "gånger per år", "gånger per halvår");
    let latest = set_body(&mut a, &flen, "minst två", "minst tre");
    set_body(&mut b, &police, "minst två gånger per år", "en gång i månaden");
    merge(&mut a, &mut b);
    let found = a.overlaps().unwrap();
    assert_eq!(found.len(), 1, "{found:#?}");
    let flen_side = found[0].sides.iter().find(|s| s.actor == flen.author.actor_id().to_hex_string()).unwrap();
    assert_eq!(flen_side.change, latest.to_string());
    assert_eq!(flen_side.text, "Styrgruppen bör träffas **minst tre gånger per halvår**.");

    // Reviewing the pair of latest changes settles the earlier pair too.
    a.resolve_overlap(&flen, &dir(), &found[0], &Take::First).unwrap();
    assert!(a.overlaps().unwrap().is_empty());
}

#[test]
fn titles_and_item_texts_are_checked_too() {
    let flen = ctx("flen-kommun", "Flen");
    let police = ctx("polisomrade-sodermanland", "Polisen");
    let mut a = agreement(&flen);
    let activity = Activity {
        id: ItemId::random(),
        what: "Trygghetsvandring i centrum".into(),
        owners: Vec::new(),
        due: None,
        followup_method: None,
        status: ActivityStatus::Planned,
    };
    let (item, _) = a.edit(&flen, &dir(), "add", |e| e.add_activity(&activity)).unwrap();
    let mut b = fork(&mut a, &police);
    let path = format!("activities.{item}.what");
    a.edit(&flen, &dir(), "what", |e| e.set_field(&path, "Trygghetsvandring i Flens centrum")).unwrap();
    b.edit(&police, &dir(), "what", |e| e.set_field(&path, "Trygghetsvandring i stationsområdet")).unwrap();
    a.edit(&flen, &dir(), "title", |e| e.set_title("Samverkansöverenskommelse Flens kommun")).unwrap();
    b.edit(&police, &dir(), "title", |e| e.set_title("Samverkansöverenskommelse Flen 2025")).unwrap();
    merge(&mut a, &mut b);
    let found = a.overlaps().unwrap();
    let fields: Vec<&str> = found.iter().map(|o| o.field.as_str()).collect();
    assert_eq!(fields, ["title", path.as_str()], "{found:#?}");
    assert_eq!(found[0].base, "Samverkansöverenskommelse Flen");
}

#[test]
fn only_the_window_of_recent_history_is_searched() {
    let (mut a, mut b, flen, _) = two_offline_edits();
    merge(&mut a, &mut b);
    for year in 2026..2030 {
        a.edit(&flen, &dir(), "place", |e| e.set_place(Some(&format!("Flen {year}")))).unwrap();
    }
    assert_eq!(a.overlaps_within(10).unwrap().len(), 1);
    assert!(a.overlaps_within(3).unwrap().is_empty(), "older than three levels: taken as settled");
}

#[test]
fn two_rounds_of_overlapping_edits_are_two_overlaps_settled_one_by_one() {
    let (mut a, mut b, flen, police) = two_offline_edits();
    merge(&mut a, &mut b);
    merge(&mut b, &mut a);
    // They meet, then part again and collide in another paragraph.
    set_body(&mut a, &flen, "följs upp årligen", "följs upp varje kvartal");
    set_body(&mut b, &police, "följs upp årligen", "följs upp varje månad");
    merge(&mut a, &mut b);
    let found = a.overlaps().unwrap();
    assert_eq!(found.iter().map(|o| o.paragraph).collect::<Vec<_>>(), [3, 5], "{found:#?}");
    assert_eq!(a.overlap_count().unwrap(), 2);
    a.resolve_overlap(&flen, &dir(), &found[1], &Take::Merged).unwrap();
    let left = a.overlaps().unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].key(), found[0].key());
}

#[test]
fn a_sides_version_has_its_later_edits_and_resolving_keeps_every_other_paragraph() {
    let flen = ctx("flen-kommun", "Flen");
    let police = ctx("polisomrade-sodermanland", "Polisen");
    let mut a = agreement(&flen);
    let mut b = fork(&mut a, &police);
    set_body(&mut a, &flen, "två gånger per år", "två gånger per månad");
    set_body(&mut b, &police, "två gånger per år", "två gånger per vecka");
    set_body(&mut b, &police, "bör träffas", "ska träffas");
    set_body(&mut a, &flen, "länsråd", "landshövding");
    set_body(&mut b, &police, "följs upp årligen", "följs upp varje halvår");
    merge(&mut a, &mut b);
    let found = a.overlaps().unwrap();
    assert_eq!(found.len(), 1, "{found:#?}");
    let police_side = found[0].sides.iter().position(|s| s.actor == police.author.actor_id().to_hex_string()).unwrap();
    assert_eq!(found[0].sides[police_side].text, "Styrgruppen ska träffas **minst två gånger per vecka**.");
    let take = if police_side == 0 { Take::First } else { Take::Second };
    a.resolve_overlap(&flen, &dir(), &found[0], &take).unwrap();
    assert_eq!(
        a.view().unwrap().body,
        BODY.replace("länsråd", "landshövding")
            .replace("bör träffas **minst två gånger per år**", "ska träffas **minst två gånger per vecka**")
            .replace("följs upp årligen", "följs upp varje halvår")
    );
}
