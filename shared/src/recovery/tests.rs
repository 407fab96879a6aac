//! Recovery tests: the accepted set, what happens to each dropped change, and
//! the three-way merge that re-applies own edits.

use chrono::TimeZone;

use super::merge::{merge_text, merge_views};
use super::*;
use crate::approval::{Action as RecordAction, ApprovalRecord};
use crate::identity::NodeKey;
use crate::ids::ItemId;
use crate::model::{Activity, DocKind};
use crate::org::OrgId;

fn ctx(key: &NodeKey, org: &str, name: &str) -> EditContext {
    EditContext {
        author: key.node_id(),
        org: OrgId::new(org).unwrap(),
        node_name: name.into(),
        time: Utc.with_ymd_and_hms(2026, 3, 1, 9, 0, 0).unwrap(),
    }
}

fn activity(what: &str) -> Activity {
    Activity::new(what)
}

fn own_seqs(doc: &mut Document, key: &NodeKey) -> Vec<u64> {
    let actor = key.node_id().actor_id();
    doc.automerge_mut().get_changes_meta(&[]).iter().filter(|m| *m.actor == actor).map(|m| m.seq).collect()
}

/// Flen's plan: created and edited on Flen's node (accepted by the relay), an
/// edit by Gnesta's node received before Flen went offline.
struct Story {
    flen: NodeKey,
    flen_ctx: EditContext,
    gnesta_ctx: EditContext,
    directory: Directory,
    doc: Document,
    /// Flen's document the relay holds (its heads are the relay's).
    relay: Document,
    first: ItemId,
}

fn story() -> Story {
    let directory = Directory::sodermanland();
    let (flen, gnesta) = (NodeKey::generate(), NodeKey::generate());
    let flen_ctx = ctx(&flen, "flen-kommun", "Flen");
    let gnesta_ctx = ctx(&gnesta, "gnesta-kommun", "Gnesta");
    let mut content = DocumentContent::new(DocKind::OperationsPlan, "Verksamhetsplan Flen 2026");
    content.parties = vec![OrgId::new("flen-kommun").unwrap(), OrgId::new("gnesta-kommun").unwrap()];
    content.body = "## Lägesbild\n\nInbrotten i centrum ökar.\n".into();
    let first = activity("Trygghetsvandring i centrum");
    content.activities = vec![first.clone()];
    let mut doc = Document::create(DocId::random(), content, &flen_ctx, &directory).unwrap();
    doc.edit(&flen_ctx, &directory, "add goal", |e| e.add_goal("Färre inbrott")).unwrap();
    let mut gnesta_doc = doc.clone();
    gnesta_doc.edit(&gnesta_ctx, &directory, "set place", |e| e.set_place(Some("Gnesta"))).unwrap();
    doc.automerge_mut().merge(gnesta_doc.automerge_mut()).unwrap();
    let relay = doc.clone();
    Story { flen, flen_ctx, gnesta_ctx, directory, doc, relay, first: first.id }
}

#[test]
fn recovery_merge_text_keeps_both_edits_of_one_sentence() {
    let base = "Vi ska minska inbrotten i centrum under året.";
    let theirs = "Vi ska halvera inbrotten i centrum under året.";
    let ours = "Vi ska minska inbrotten i centrum och vid stationen under året.";
    assert_eq!(merge_text(base, theirs, ours), "Vi ska halvera inbrotten i centrum och vid stationen under året.");
    // One side unchanged: the other side wins whole.
    assert_eq!(merge_text(base, base, ours), ours);
    assert_eq!(merge_text(base, theirs, base), theirs);
    // Insertions at one place both survive, in a fixed order.
    let merged = merge_text("ab", "aXb", "aYb");
    assert!(merged == "aXYb" || merged == "aYXb", "{merged}");
    assert_eq!(merged, merge_text("ab", "aXb", "aYb"));
}

#[test]
fn recovery_merge_views_matches_items_by_id_and_reports_edits_of_removed_items() {
    let s = story();
    let base = s.doc.view().unwrap();
    let (a, b, c) = (activity("Möte med handlare"), activity("Grannsamverkan"), activity("Ny belysning"));
    // Theirs: changes the first activity, adds `a` after it, edits the goal, sets the scope.
    let mut theirs = base.clone();
    theirs.activities[0].what = "Trygghetsvandring i centrum varje månad".into();
    theirs.activities.push(a.clone());
    theirs.goals[0].text = "Färre inbrott i centrum".into();
    theirs.scope = crate::model::Scope::Local;
    // Ours: added `b` first and `c` last, removed the goal.
    let mut ours = base.clone();
    ours.activities.insert(0, b.clone());
    ours.activities.push(c.clone());
    ours.goals.clear();
    ours.title = "Verksamhetsplan Flen och Gnesta 2026".into();
    let merged = merge_views(&base, &theirs, &ours);
    let whats: Vec<&str> = merged.view.activities.iter().map(|x| x.what.as_str()).collect();
    assert_eq!(
        whats,
        ["Grannsamverkan", "Trygghetsvandring i centrum varje månad", "Möte med handlare", "Ny belysning"]
    );
    assert_eq!(merged.view.title, "Verksamhetsplan Flen och Gnesta 2026");
    assert_eq!(merged.view.scope, crate::model::Scope::Local);
    assert!(merged.view.goals.is_empty());
    assert_eq!(merged.lost.len(), 1, "{:?}", merged.lost);
    assert!(merged.lost[0].starts_with("goal "), "{:?}", merged.lost);
}

#[test]
fn recovery_skips_an_offline_approval_and_reapplies_later_own_edits_after_your_seq() {
    let mut s = story();
    let relay_heads = s.relay.heads();
    let your_seq = *own_seqs(&mut s.doc, &s.flen).last().unwrap();
    // Offline: an approval record (by a signer the relay will refuse), then edits.
    let signer = NodeKey::generate();
    let heads = s.doc.heads();
    let record = ApprovalRecord::sign(
        RecordAction::Approve,
        s.doc.id(),
        &heads,
        &signer,
        OrgId::new("flen-kommun").unwrap(),
        "Kommunstyrelsens ordförande",
        s.flen_ctx.time,
    )
    .unwrap();
    approval::append(&mut s.doc, &s.flen_ctx, &s.directory, &record).unwrap();
    let added = activity("Ungdomsgård öppen på fredagar");
    let first = s.first.to_string();
    s.doc
        .edit(&s.flen_ctx, &s.directory, "edit body", |e| {
            e.set_body("## Lägesbild\n\nInbrotten i centrum ökar, särskilt på natten.\n")
        })
        .unwrap();
    s.doc.edit(&s.flen_ctx, &s.directory, "add activity", |e| e.add_activity(&added)).unwrap();
    s.doc
        .edit(&s.flen_ctx, &s.directory, "change activity", |e| {
            e.set_field(&format!("activities.{first}.what"), "Trygghetsvandring i centrum och vid stationen")
        })
        .unwrap();
    let old_view = s.doc.view().unwrap();
    let old_heads = s.doc.heads();

    let plan = Recovery::plan(&mut s.doc, &s.flen.node_id(), your_seq, &relay_heads).unwrap();
    assert_eq!(plan.accepted_heads, heads_key(&relay_heads));
    let actions: Vec<Action> = plan.dropped.iter().map(|d| d.action).collect();
    assert_eq!(actions, [Action::Skip, Action::Reapply, Action::Reapply, Action::Reapply]);
    assert!(plan.dropped.iter().all(|d| d.own));
    assert_eq!(s.doc.heads(), old_heads, "planning changes nothing");

    let mut now = s.flen_ctx.clone();
    now.time = Utc.with_ymd_and_hms(2026, 3, 5, 12, 0, 0).unwrap();
    let mut rebuilt = plan.rebuild(&mut s.doc, &now, &s.directory, &ContentLimits::default()).unwrap();
    assert_eq!(s.doc.heads(), old_heads, "rebuilding leaves the old document alone");
    assert!(matches!(rebuilt.outcomes[0], Outcome::Skipped));
    let seqs: Vec<u64> = rebuilt
        .outcomes
        .iter()
        .filter_map(|o| match o {
            Outcome::Reapplied { new_seq, lost, .. } => {
                assert!(lost.is_empty());
                Some(*new_seq)
            }
            _ => None,
        })
        .collect();
    assert_eq!(seqs, [your_seq + 1, your_seq + 2, your_seq + 3]);
    let view = rebuilt.doc.view().unwrap();
    assert_eq!(view, old_view, "every typed edit is there, Gnesta's place too");
    assert_eq!(view.place.as_deref(), Some("Gnesta"));
    assert!(approval::records(&rebuilt.doc).is_empty());
    // The accepted history is kept as it was; the new changes are Flen's, made now, marked.
    let history = rebuilt.doc.history();
    for h in &relay_heads {
        assert!(rebuilt.doc.automerge_mut().get_change_by_hash(h).is_some());
    }
    let new: Vec<_> =
        history.iter().filter(|h| h.seq > your_seq && h.actor == s.flen.node_id().actor_id().to_hex_string()).collect();
    assert_eq!(new.len(), 3);
    assert!(new.iter().all(|h| h.message.as_deref().unwrap().ends_with(REAPPLIED_SUFFIX)));
    assert!(new.iter().all(|h| h.time == Some(now.time)));
    assert_eq!(new[0].message.as_deref(), Some("edit body (återställd)"));
}

#[test]
fn recovery_merges_an_accepted_concurrent_edit_of_the_same_sentence_instead_of_overwriting_it() {
    let mut s = story();
    let your_seq = *own_seqs(&mut s.doc, &s.flen).last().unwrap();
    // Gnesta edits the sentence; the relay takes it. Flen, offline, edits the same sentence.
    let mut gnesta = s.relay.clone();
    gnesta
        .edit(&s.gnesta_ctx, &s.directory, "body", |e| {
            e.set_body("## Lägesbild\n\nInbrotten i centrum och i Gnesta ökar.\n")
        })
        .unwrap();
    let relay_heads = gnesta.heads();
    s.doc
        .edit(&s.flen_ctx, &s.directory, "body", |e| e.set_body("## Lägesbild\n\nInbrotten i centrum ökar kraftigt.\n"))
        .unwrap();
    // Flen then receives Gnesta's edit (so it is in Flen's history, concurrent with Flen's).
    s.doc.automerge_mut().merge(gnesta.automerge_mut()).unwrap();
    // The relay refused Flen's edit (say, too large for its limits).
    let plan = Recovery::plan(&mut s.doc, &s.flen.node_id(), your_seq, &relay_heads).unwrap();
    assert_eq!(plan.dropped.len(), 1);
    let rebuilt = plan.rebuild(&mut s.doc, &s.flen_ctx, &s.directory, &ContentLimits::default()).unwrap();
    assert!(matches!(rebuilt.outcomes[0], Outcome::Reapplied { .. }), "{:?}", rebuilt.outcomes);
    assert_eq!(rebuilt.doc.view().unwrap().body, "## Lägesbild\n\nInbrotten i centrum och i Gnesta ökar kraftigt.\n");
}

#[test]
fn recovery_reports_a_change_over_the_limits_as_not_reapplied_and_goes_on() {
    let mut s = story();
    let relay_heads = s.relay.heads();
    let your_seq = *own_seqs(&mut s.doc, &s.flen).last().unwrap();
    let huge = format!("## Lägesbild\n\n{}\n", "Inbrotten ökar. ".repeat(400));
    s.doc.edit(&s.flen_ctx, &s.directory, "paste", |e| e.set_body(&huge)).unwrap();
    s.doc.edit(&s.flen_ctx, &s.directory, "place", |e| e.set_place(Some("Flen"))).unwrap();
    let plan = Recovery::plan(&mut s.doc, &s.flen.node_id(), your_seq, &relay_heads).unwrap();
    let limits = ContentLimits { max_change_bytes: 2048, max_document_bytes: 1 << 20 };
    let rebuilt = plan.rebuild(&mut s.doc, &s.flen_ctx, &s.directory, &limits).unwrap();
    assert!(
        matches!(&rebuilt.outcomes[0], Outcome::NotReapplied { reason } if reason.contains("per change")),
        "{:?}",
        rebuilt.outcomes
    );
    assert!(matches!(rebuilt.outcomes[1], Outcome::Reapplied { new_seq, .. } if new_seq == your_seq + 1));
    let view = rebuilt.doc.view().unwrap();
    assert_eq!(view.place.as_deref(), Some("Flen"));
    assert_eq!(view.body, "## Lägesbild\n\nInbrotten i centrum ökar.\n");
}

#[test]
fn recovery_leaves_other_nodes_changes_the_relay_does_not_hold_and_refuses_reused_numbers() {
    let mut s = story();
    let relay_heads = s.relay.heads();
    let your_seq = *own_seqs(&mut s.doc, &s.flen).last().unwrap();
    // A change by Gnesta that reached Flen by bundle but not the relay.
    let mut gnesta = s.doc.clone();
    gnesta
        .edit(&s.gnesta_ctx, &s.directory, "date", |e| e.set_date(chrono::NaiveDate::from_ymd_opt(2026, 2, 1)))
        .unwrap();
    s.doc.automerge_mut().merge(gnesta.automerge_mut()).unwrap();
    let plan = Recovery::plan(&mut s.doc, &s.flen.node_id(), your_seq, &relay_heads).unwrap();
    assert_eq!(plan.dropped.len(), 1);
    assert_eq!(plan.dropped[0].action, Action::Leave);
    assert!(!plan.dropped[0].own);
    // The relay holds more of Flen's changes than Flen has.
    let err = Recovery::plan(&mut s.doc, &s.flen.node_id(), your_seq + 5, &relay_heads).unwrap_err();
    assert!(matches!(err, RecoveryError::OwnChangesMissing { .. }), "{err}");
}

/// Prints what planning and rebuilding cost on a long history.
/// `cargo test --release -p samverkan-shared --lib -- --ignored --nocapture recovery_cost`
#[test]
#[ignore = "measurement; run explicitly"]
fn recovery_cost_on_a_long_history() {
    for (history, offline) in [(1_000, 20), (10_000, 20), (10_000, 200)] {
        let mut s = story();
        let mut body = s.doc.view().unwrap().body;
        for i in 0..history {
            body.push_str(if i % 50 == 49 { "\n" } else { "x" });
            s.doc.edit(&s.flen_ctx, &s.directory, "type", |e| e.set_body(&body)).unwrap();
        }
        let relay_heads = s.doc.heads();
        let your_seq = *own_seqs(&mut s.doc, &s.flen).last().unwrap();
        for i in 0..offline {
            body.push_str(if i % 50 == 49 { "\n" } else { "y" });
            s.doc.edit(&s.flen_ctx, &s.directory, "offline", |e| e.set_body(&body)).unwrap();
        }
        let started = std::time::Instant::now();
        let plan = Recovery::plan(&mut s.doc, &s.flen.node_id(), your_seq, &relay_heads).unwrap();
        let planned = started.elapsed();
        let started = std::time::Instant::now();
        let rebuilt = plan.rebuild(&mut s.doc, &s.flen_ctx, &s.directory, &ContentLimits::default()).unwrap();
        let rebuilt_in = started.elapsed();
        assert_eq!(rebuilt.doc.view().unwrap().body, body);
        println!(
            "history {history} changes, {offline} offline edits: plan {:.0} ms, rebuild {:.0} ms",
            planned.as_secs_f64() * 1000.0,
            rebuilt_in.as_secs_f64() * 1000.0
        );
    }
}
