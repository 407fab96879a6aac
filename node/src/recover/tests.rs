//! Recovery on a real data directory (SQLite in a temporary folder): the plan
//! changes nothing, `recover` keeps every typed edit, drops the offline
//! approval, writes a backup that loads, clears the refusal and the sync state.

use automerge::AutoCommit;
use samverkan_shared::approval::{self, Action as RecordAction, ApprovalRecord};
use samverkan_shared::authorship;
use samverkan_shared::identity::NodeKey;
use samverkan_shared::ids::ItemId;
use samverkan_shared::model::{Activity, ActivityStatus, DocKind, DocumentContent};
use samverkan_shared::org::OrgId;

use super::*;
use crate::node::META_RELAY_KEY;
use crate::status::relay_peer_key;

fn org(id: &str) -> OrgId {
    OrgId::new(id).unwrap()
}

fn activity(what: &str) -> Activity {
    Activity {
        id: ItemId::random(),
        what: what.into(),
        owners: Vec::new(),
        due: None,
        followup_method: None,
        status: ActivityStatus::Planned,
    }
}

fn own_seqs(node: &Node, id: &DocId) -> Vec<(u64, ChangeHash)> {
    let actor = node.node_id().actor_id();
    let mut doc = node.document(id).unwrap();
    doc.automerge_mut().get_changes_meta(&[]).iter().filter(|m| *m.actor == actor).map(|m| (m.seq, m.hash)).collect()
}

/// Copies `from`'s document into `to` (as the relay would have delivered it).
fn deliver(from: &Node, to: &mut Node, id: &DocId) {
    let bytes = from.document(id).unwrap().automerge_mut().save();
    to.merge_bytes(id, &bytes).unwrap();
}

/// Flen's node and Gnesta's, sharing one plan that the relay holds all of.
struct Fixture {
    _dirs: (tempfile::TempDir, tempfile::TempDir),
    flen: Node,
    gnesta: Node,
    id: DocId,
    /// An activity both had before Flen went offline.
    first: ItemId,
    /// The relay's heads of the document when Flen went offline.
    relay_heads: Vec<ChangeHash>,
    /// Flen's highest change number the relay holds.
    your_seq: u64,
}

fn fixture() -> Fixture {
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut flen = Node::init(&dirs.0.path().join("flen"), "flen-kommun", Some("Flen BF")).unwrap();
    let mut gnesta = Node::init(&dirs.1.path().join("gnesta"), "gnesta-kommun", Some("Gnesta BF")).unwrap();
    let mut content = DocumentContent::new(DocKind::OperationsPlan, "Verksamhetsplan Flen och Gnesta 2026");
    content.parties = vec![org("flen-kommun"), org("gnesta-kommun")];
    content.body = "## Lägesbild\n\nInbrotten i centrum ökar.\n\n## Åtgärder\n\nSe aktiviteterna.\n".into();
    let first = activity("Trygghetsvandring i centrum");
    content.activities = vec![first.clone(), activity("Grannsamverkan i Sparreholm")];
    let id = flen.create(content).unwrap();
    flen.edit(&id, "add goal", |e| e.add_goal("Färre inbrott i centrum")).unwrap();
    // The relay's sync state with Flen, persisted after this point.
    let relay = NodeKey::generate().node_id();
    flen.store_mut().set_meta(META_RELAY_KEY, &relay.to_string()).unwrap();
    let mut state = automerge::sync::State::new();
    state.shared_heads = flen.document(&id).unwrap().heads();
    flen.store_mut().save_sync_states(&relay_peer_key(&relay), [(id.clone(), state.encode())]).unwrap();
    // Gnesta edits; Flen receives it before going offline; the relay has all of it.
    deliver(&flen, &mut gnesta, &id);
    gnesta.edit(&id, "set place", |e| e.set_place(Some("Gnesta och Flen"))).unwrap();
    deliver(&gnesta, &mut flen, &id);
    let relay_heads = flen.document(&id).unwrap().heads();
    let your_seq = own_seqs(&flen, &id).last().unwrap().0;
    Fixture { _dirs: dirs, flen, gnesta, id, first: first.id, relay_heads, your_seq }
}

/// Flen, offline: an approval by a signer (whom the relay will find revoked), then edits.
fn offline_work(f: &mut Fixture) -> Activity {
    let signer = NodeKey::generate();
    let ctx = f.flen.edit_context();
    let directory = f.flen.directory().clone();
    let id = f.id.clone();
    f.flen
        .store_mut()
        .update(&id, false, |doc| -> Result<_, NodeError> {
            let heads = doc.heads();
            let record = ApprovalRecord::sign(
                RecordAction::Approve,
                &id,
                &heads,
                &signer,
                org("flen-kommun"),
                "Kommunstyrelsens ordförande",
                ctx.time,
            )?;
            approval::append(doc, &ctx, &directory, &record)?;
            Ok(())
        })
        .unwrap();
    f.flen
        .edit(&id, "edit body", |e| {
            e.set_body("## Lägesbild\n\nInbrotten i centrum ökar, mest nattetid.\n\n## Åtgärder\n\nSe aktiviteterna.\n")
        })
        .unwrap();
    let added = activity("Öppen ungdomsgård på fredagar");
    f.flen.edit(&id, "add activity", |e| e.add_activity(&added)).unwrap();
    let first = f.first.to_string();
    f.flen
        .edit(&id, "change activity", |e| {
            e.set_field(&format!("activities.{first}.what"), "Trygghetsvandring i centrum och vid stationen")
        })
        .unwrap();
    added
}

/// Records the refusal as the sync client would on the relay's `DocRefused`.
fn refuse(f: &mut Fixture, kind: RefusalKind) {
    let local_heads = f.flen.document(&f.id).unwrap().heads();
    let refusal = DocRefusal {
        doc: f.id.clone(),
        kind,
        reason: "godkännandet är signerat av en nyckel som återkallats".into(),
        local_heads,
        peer_heads: f.relay_heads.clone(),
        your_seq: f.your_seq,
        refused_at: "2026-03-05T12:00:00Z".parse().unwrap(),
    };
    f.flen.store_mut().set_refusal(&refusal).unwrap();
}

#[test]
fn recovery_plan_lists_what_happens_and_changes_nothing() {
    let mut f = fixture();
    offline_work(&mut f);
    refuse(&mut f, RefusalKind::ChangesRefused);
    let heads = f.flen.document(&f.id).unwrap().heads();
    let plan = plan(&f.flen, &f.id).unwrap();
    let actions: Vec<(Action, Option<&str>)> = plan.changes.iter().map(|c| (c.action, c.message.as_deref())).collect();
    assert_eq!(
        actions,
        [
            (Action::Skip, Some(actions[0].1.unwrap())),
            (Action::Reapply, Some("edit body")),
            (Action::Reapply, Some("add activity")),
            (Action::Reapply, Some("change activity")),
        ]
    );
    assert!(actions[0].1.unwrap().starts_with("approve by Kommunstyrelsens ordförande"));
    assert!(plan.changes.iter().all(|c| c.own && c.author_status == crate::node::AuthorStatus::ThisNode));
    assert_eq!(plan.accepted_heads, {
        let mut h = f.relay_heads.clone();
        h.sort();
        h
    });
    // Nothing changed: heads, refusal, sync state, no backup folder.
    assert_eq!(f.flen.document(&f.id).unwrap().heads(), heads);
    assert!(f.flen.store().refusal(&f.id).unwrap().is_some());
    assert!(!f.flen.data_dir().join(RECOVERED_DIR).exists());
    let relay = f.flen.pinned_relay().unwrap().unwrap();
    assert_eq!(f.flen.store().sync_states(&relay_peer_key(&relay)).unwrap().len(), 1);
    // Text and JSON say it.
    let text = format_plan(&plan);
    assert!(text.contains("godkännandet är signerat av en nyckel som återkallats"), "{text}");
    assert!(text.contains("skip (approval record: approve again after recovery)"), "{text}");
    assert!(text.contains("--apply"), "{text}");
    let json = serde_json::to_value(&plan).unwrap();
    assert_eq!(json["refusal"]["kind"], "changes_refused");
    assert_eq!(json["changes"][0]["action"], "skip");
    assert_eq!(json["changes"][1]["action"], "reapply");
    assert_eq!(json["changes"][1]["author_status"], "this_node");
}

#[test]
fn recovery_keeps_every_typed_edit_drops_the_offline_approval_and_backs_up_the_old_history() {
    let mut f = fixture();
    let added = offline_work(&mut f);
    refuse(&mut f, RefusalKind::ChangesRefused);
    let mut old = f.flen.document(&f.id).unwrap();
    let (old_heads, old_view) = (old.heads(), old.view().unwrap());
    assert_eq!(approval::records(&old).len(), 1);
    let seen_key = format!("{META_SEEN_PREFIX}{}", f.id);
    let joined = |heads: &[ChangeHash]| heads.iter().map(ToString::to_string).collect::<Vec<_>>().join(",");
    f.flen.store_mut().set_meta(&seen_key, &joined(&old_heads)).unwrap();

    let report = recover(&mut f.flen, &f.id).unwrap();
    // `status`'s last look now names the kept part of what was seen.
    assert_eq!(f.flen.store().meta(&seen_key).unwrap().unwrap(), joined(&report.accepted_heads));

    // Every typed edit is there, and Gnesta's; the approval record is not.
    let mut doc = f.flen.document(&f.id).unwrap();
    let view = doc.view().unwrap();
    assert_eq!(view, old_view);
    assert!(view.body.contains("mest nattetid"));
    assert!(view.activities.iter().any(|a| a.id == added.id && a.what == "Öppen ungdomsgård på fredagar"));
    assert!(view.activities.iter().any(|a| a.what == "Trygghetsvandring i centrum och vid stationen"));
    assert_eq!(view.place.as_deref(), Some("Gnesta och Flen"));
    assert!(approval::records(&doc).is_empty());
    // The accepted history is kept; the new changes are this node's, numbered after your_seq, signable.
    for h in &f.relay_heads {
        assert!(doc.automerge_mut().get_change_by_hash(h).is_some());
    }
    let mine = own_seqs(&f.flen, &f.id);
    let new: Vec<_> = mine.iter().filter(|(seq, _)| *seq > f.your_seq).collect();
    assert_eq!(new.iter().map(|(seq, _)| *seq).collect::<Vec<_>>(), [f.your_seq + 1, f.your_seq + 2, f.your_seq + 3]);
    for (_, hash) in new {
        let change = doc.automerge_mut().get_change_by_hash(hash).unwrap();
        assert_eq!(change.actor_id(), &f.flen.node_id().actor_id());
        assert!(change.message().unwrap().ends_with("(återställd)"));
        let signature = authorship::sign(f.flen.key(), &f.id, hash);
        assert_eq!(authorship::verify(&f.id, hash, change.actor_id(), &signature).unwrap(), f.flen.node_id());
    }
    let outcomes: Vec<&Outcome> = report.changes.iter().map(|c| &c.outcome).collect();
    assert!(matches!(outcomes[0], Outcome::Skipped));
    assert!(outcomes[1..].iter().all(|o| matches!(o, Outcome::Reapplied { lost, .. } if lost.is_empty())));
    assert_eq!(report.heads, doc.heads());

    // The backup is the whole old document, and its Markdown.
    assert!(report.backup.starts_with(f.flen.data_dir().join(RECOVERED_DIR)));
    let mut backup = AutoCommit::load(&std::fs::read(&report.backup).unwrap()).unwrap();
    assert_eq!(backup.get_heads(), old_heads);
    assert_eq!(backup.get_changes(&[]).len(), old.change_count());
    let markdown = std::fs::read_to_string(&report.backup_markdown).unwrap();
    assert!(markdown.contains("mest nattetid"), "{markdown}");
    assert!(report.backup.file_name().unwrap().to_str().unwrap().starts_with(f.id.as_str()));

    // The refusal and the sync state are gone; the store is sound; a second recovery has nothing to do.
    assert!(f.flen.store().refusal(&f.id).unwrap().is_none());
    let relay = f.flen.pinned_relay().unwrap().unwrap();
    assert!(f.flen.store().sync_states(&relay_peer_key(&relay)).unwrap().is_empty());
    assert!(f.flen.check().unwrap().is_empty());
    assert!(matches!(recover(&mut f.flen, &f.id), Err(RecoverError::NotRefused(_))));
    let text = format_report(&report);
    assert!(text.contains("approve again"), "{text}");
    assert!(text.contains(report.backup.to_str().unwrap()), "{text}");
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["changes"][1]["outcome"], "reapplied");
    assert_eq!(json["changes"][1]["seq"], f.your_seq + 2, "the refused number of the body edit");
    assert_eq!(
        json["changes"][1]["new_seq"],
        f.your_seq + 1,
        "the first re-applied change takes the first free number"
    );

    // Gnesta, which never saw the refused changes, takes the recovered history whole.
    deliver(&f.flen, &mut f.gnesta, &f.id);
    assert_eq!(f.gnesta.document(&f.id).unwrap().view().unwrap(), view);
}

#[test]
fn recovery_merges_a_concurrent_accepted_edit_of_the_same_text_rather_than_overwriting_it() {
    let mut f = fixture();
    // Flen, offline, edits a sentence; Gnesta edits the same sentence and the relay takes it.
    f.flen
        .edit(&f.id, "body", |e| {
            e.set_body("## Lägesbild\n\nInbrotten i centrum ökar kraftigt.\n\n## Åtgärder\n\nSe aktiviteterna.\n")
        })
        .unwrap();
    f.gnesta
        .edit(&f.id, "body", |e| {
            e.set_body("## Lägesbild\n\nInbrotten i centrum och i Gnesta ökar.\n\n## Åtgärder\n\nSe aktiviteterna.\n")
        })
        .unwrap();
    f.relay_heads = f.gnesta.document(&f.id).unwrap().heads();
    deliver(&f.gnesta, &mut f.flen, &f.id);
    refuse(&mut f, RefusalKind::TooLarge);
    let report = recover(&mut f.flen, &f.id).unwrap();
    assert_eq!(report.changes.len(), 1);
    assert!(matches!(report.changes[0].outcome, Outcome::Reapplied { .. }));
    assert_eq!(
        f.flen.document(&f.id).unwrap().view().unwrap().body,
        "## Lägesbild\n\nInbrotten i centrum och i Gnesta ökar kraftigt.\n\n## Åtgärder\n\nSe aktiviteterna.\n"
    );
}

#[test]
fn recovery_is_refused_clearly_without_a_refusal_for_a_document_no_longer_shared_and_for_an_unknown_document() {
    let mut f = fixture();
    let err = plan(&f.flen, &f.id).unwrap_err();
    assert!(matches!(err, RecoverError::NotRefused(_)));
    assert!(err.to_string().starts_with("nothing to recover: the relay has not refused"), "{err}");
    refuse(&mut f, RefusalKind::NotShared);
    let err = recover(&mut f.flen, &f.id).unwrap_err();
    assert!(
        err.to_string().contains("no longer shared with your organisation; it stays on this node, read-only"),
        "{err}"
    );
    assert!(f.flen.store().refusal(&f.id).unwrap().is_some());
    let err = plan(&f.flen, &DocId::random()).unwrap_err();
    assert!(matches!(&err, RecoverError::Node(e) if matches!(**e, NodeError::NoSuchDocument(_))), "{err}");
    assert!(!f.flen.data_dir().join(RECOVERED_DIR).exists());
}

#[test]
fn a_node_that_got_the_refused_changes_by_bundle_takes_the_recovered_history_only_after_recovering_too() {
    let mut f = fixture();
    offline_work(&mut f);
    // Gnesta gets Flen's offline work (the approval too) by bundle, before the relay refuses it.
    deliver(&f.flen, &mut f.gnesta, &f.id);
    refuse(&mut f, RefusalKind::ChangesRefused);
    recover(&mut f.flen, &f.id).unwrap();
    let recovered = f.flen.document(&f.id).unwrap().view().unwrap();
    // The recovered changes reuse Flen's numbers that Gnesta holds other changes under.
    let bytes = f.flen.document(&f.id).unwrap().automerge_mut().save();
    assert!(f.gnesta.merge_bytes(&f.id, &bytes).is_err());
    // Gnesta's own sync of the document is refused (it carries Flen's refused approval);
    // Gnesta recovers it: Flen's refused changes are another node's, left out.
    let gnesta_seq = own_seqs(&f.gnesta, &f.id).last().unwrap().0;
    let peer_heads = f.flen.document(&f.id).unwrap().heads();
    let local_heads = f.gnesta.document(&f.id).unwrap().heads();
    f.gnesta
        .store_mut()
        .set_refusal(&DocRefusal {
            doc: f.id.clone(),
            kind: RefusalKind::ChangesRefused,
            reason: "godkännandet är signerat av en nyckel som återkallats".into(),
            local_heads,
            peer_heads,
            your_seq: gnesta_seq,
            refused_at: Utc::now(),
        })
        .unwrap();
    let plan = plan(&f.gnesta, &f.id).unwrap();
    assert_eq!(plan.changes.len(), 4);
    assert!(plan.changes.iter().all(|c| !c.own && c.action == Action::Leave));
    recover(&mut f.gnesta, &f.id).unwrap();
    deliver(&f.flen, &mut f.gnesta, &f.id);
    assert_eq!(f.gnesta.document(&f.id).unwrap().view().unwrap(), recovered);
}
