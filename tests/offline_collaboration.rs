//! Two real nodes, each with its own SQLite file, edit the same agreement
//! offline and converge by exchanging bundle files, surviving restarts.

use std::path::{Path, PathBuf};

use samverkan::node::node::Node;
use samverkan::shared::bundle::{Bundle, HeadsSummary};
use samverkan::shared::ids::{DocId, ItemId};
use samverkan::shared::markdown;
use samverkan::shared::model::{Activity, ActivityStatus};

#[path = "support/paper_relay.rs"]
mod paper_relay;
use paper_relay::PaperRelay;

const SEED: &str = include_str!("../../shared/seed/lansovergripande-samverkansoverenskommelse-sodermanland-2023.md");

struct TestNode {
    dir: PathBuf,
    node: Option<Node>,
}

impl TestNode {
    /// A node of `org`, enrolled at `relay` (its directory decides whose changes count).
    fn init(root: &Path, name: &str, org: &str, relay: &mut PaperRelay) -> Self {
        let dir = root.join(name);
        let mut node = Node::init(&dir, org, Some(name)).expect("init node");
        relay.enroll(&mut node);
        Self { dir, node: Some(node) }
    }

    fn node(&mut self) -> &mut Node {
        self.node.as_mut().expect("node is open")
    }

    /// Closes and reopens the node and checks it still holds exactly the same documents.
    fn restart(&mut self) {
        let before = self.snapshot();
        self.node = None;
        self.node = Some(Node::open(&self.dir).expect("reopen node"));
        assert_eq!(self.snapshot(), before, "data changed across a restart of {}", self.dir.display());
        assert!(self.node().check().unwrap().is_empty(), "integrity check failed after restart");
    }

    /// Every document as exported Markdown plus its heads: what "the same data" means.
    fn snapshot(&mut self) -> Vec<(String, Vec<String>)> {
        let node = self.node();
        let mut out = Vec::new();
        for summary in node.list().unwrap() {
            let mut doc = node.document(&summary.id).unwrap();
            let heads = doc.heads().iter().map(ToString::to_string).collect();
            out.push((markdown::export(&doc.view().unwrap(), node.directory()), heads));
        }
        out.sort();
        out
    }

    fn body(&mut self, id: &DocId) -> String {
        self.node().document(id).unwrap().view().unwrap().body
    }
}

/// Sends what `to` lacks from `from`, through an encoded bundle file as a USB stick would carry it.
fn carry(from: &mut TestNode, to: &mut TestNode, via: &Path) -> usize {
    let have = HeadsSummary::from_json(&to.node().heads_summary().unwrap().to_json()).unwrap();
    let bundle = from.node().export_bundle(Some(&have), None).unwrap();
    std::fs::write(via, bundle.encode()).unwrap();
    let decoded = Bundle::decode(&std::fs::read(via).unwrap()).unwrap();
    let reports = to.node().import_bundle(&decoded).unwrap();
    assert!(reports.iter().all(|r| r.error.is_none() && r.missing_deps == 0), "{reports:?}");
    reports.iter().filter(|r| r.changed).count()
}

fn assert_converged(a: &mut TestNode, b: &mut TestNode) {
    let sa = a.snapshot();
    let sb = b.snapshot();
    assert_eq!(sa, sb, "nodes did not converge");
}

fn replace_once(text: &str, from: &str, to: &str) -> String {
    assert!(text.contains(from), "{from:?} not in text");
    text.replacen(from, to, 1)
}

#[test]
fn two_offline_nodes_converge_through_bundles_and_survive_restarts() {
    let root = tempfile::tempdir().unwrap();
    let mut relay = PaperRelay::default();
    let stick = root.path().join("usb-stick.bundle");
    let mut county = TestNode::init(root.path(), "lansstyrelsen", "Länsstyrelsen i Södermanlands län", &mut relay);
    let mut police = TestNode::init(root.path(), "polisen", "Polisområde Södermanland", &mut relay);

    // The County Board imports the signed agreement and shares it by bundle.
    let (id, _) = county.node().import_markdown(SEED, None).unwrap();
    county.restart();
    assert_eq!(carry(&mut county, &mut police, &stick), 1);
    police.restart();
    assert_converged(&mut county, &mut police);

    // Offline, both edit: the same paragraph, different paragraphs, both add an activity.
    let para = "Styrgruppen bör träffas minst två gånger per år.";
    let body = county.body(&id);
    let county_body = replace_once(
        &replace_once(&body, para, "Styrgruppen ska träffas minst två gånger per år."),
        "Fyra gånger per år samordnar",
        "Fyra gånger per år (kvartalsvis) samordnar",
    );
    county.node().edit(&id, "edit body", |e| e.set_body(&county_body)).unwrap();
    let police_body = replace_once(
        &replace_once(&body, para, "Styrgruppen bör träffas minst två gånger per år, vår och höst."),
        "Kommunerna har goda förutsättningar",
        "Kommunerna har mycket goda förutsättningar",
    );
    police.node().edit(&id, "edit body", |e| e.set_body(&police_body)).unwrap();

    let activity = |what: &str| Activity {
        id: ItemId::random(),
        what: what.to_string(),
        owners: Vec::new(),
        followup_method: None,
        due: None,
        status: ActivityStatus::Planned,
    };
    let (shared_activity, _) =
        county.node().edit(&id, "add", |e| e.add_activity(&activity("Länsgemensam lägesbild"))).unwrap();
    police.node().edit(&id, "add", |e| e.add_activity(&activity("Utbildning för kommunpoliser"))).unwrap();
    county.restart();
    police.restart();

    // Exchange both ways; both now hold the same agreement.
    carry(&mut county, &mut police, &stick);
    carry(&mut police, &mut county, &stick);
    county.restart();
    police.restart();
    assert_converged(&mut county, &mut police);

    let merged = county.body(&id);
    assert!(
        merged.contains("Styrgruppen ska träffas minst två gånger per år, vår och höst."),
        "same paragraph merged per character"
    );
    assert!(merged.contains("Fyra gånger per år (kvartalsvis) samordnar"));
    assert!(merged.contains("Kommunerna har mycket goda förutsättningar"));
    let view = county.node().document(&id).unwrap().view().unwrap();
    let mut whats: Vec<&str> = view.activities.iter().map(|a| a.what.as_str()).collect();
    whats.sort();
    assert_eq!(whats, ["Länsgemensam lägesbild", "Utbildning för kommunpoliser"]);

    // Both set the same activity's date offline: a conflict both sides see, then resolved.
    carry(&mut county, &mut police, &stick);
    let due = format!("activities.{shared_activity}.due");
    county.node().edit(&id, "due", |e| e.set_field(&due, "2024-04-30")).unwrap();
    police.node().edit(&id, "due", |e| e.set_field(&due, "2024-05-15")).unwrap();
    carry(&mut county, &mut police, &stick);
    carry(&mut police, &mut county, &stick);
    county.restart();
    police.restart();
    assert_converged(&mut county, &mut police);
    let conflicts = police.node().document(&id).unwrap().conflicts().unwrap();
    assert_eq!(conflicts.len(), 1);
    assert_eq!(conflicts[0].path, due);
    assert_eq!(conflicts[0].values.len(), 2);

    police.node().edit(&id, "resolve", |e| e.set_field(&due, "2024-05-15")).unwrap();
    carry(&mut police, &mut county, &stick);
    county.restart();
    assert_converged(&mut county, &mut police);
    assert!(county.node().document(&id).unwrap().conflicts().unwrap().is_empty());

    // Nothing new: a bundle built from the receiver's heads carries no document.
    let have = police.node().heads_summary().unwrap();
    assert!(county.node().export_bundle(Some(&have), None).unwrap().docs.is_empty());
}

#[test]
fn seed_import_round_trips_through_export_on_another_node() {
    let root = tempfile::tempdir().unwrap();
    let mut relay = PaperRelay::default();
    let mut a = TestNode::init(root.path(), "a", "Länsstyrelsen", &mut relay);
    let mut b = TestNode::init(root.path(), "b", "Polisen", &mut relay);
    let (id, recognised) = a.node().import_markdown(SEED, None).unwrap();
    assert!(recognised.iter().any(|r| r.contains("2023-10-18")), "{recognised:?}");
    let view = a.node().document(&id).unwrap().view().unwrap();
    assert_eq!(view.body, SEED, "the body keeps every heading, list and emphasis byte for byte");
    for needle in [
        "## Länsövergripande",
        "- Att samverkan omfattar",
        "***Målsättningarna",
        "*skapa förutsättningar*",
        "**Brottsförebyggande arbete**",
        "Länsövergripande",
        "Södermanlands län",
    ] {
        assert!(view.body.contains(needle), "{needle}");
    }
    let exported = markdown::export(&view, a.node().directory());
    assert!(exported.ends_with(SEED));

    // Markdown carries content, not history: on a node without the document it
    // becomes a new document (sharing the same one is what bundles and sync are for),
    // with exactly the same content.
    let (id_b, _) = b.node().import_markdown(&exported, None).unwrap();
    assert_ne!(id_b, id);
    let mut view_b = b.node().document(&id_b).unwrap().view().unwrap();
    view_b.id = id.clone();
    assert_eq!(view_b, view);
    b.restart();
}

#[test]
fn a_damaged_bundle_is_refused_and_nothing_is_imported() {
    let root = tempfile::tempdir().unwrap();
    let mut relay = PaperRelay::default();
    let mut a = TestNode::init(root.path(), "a", "Flen", &mut relay);
    let mut b = TestNode::init(root.path(), "b", "Polisen", &mut relay);
    a.node().import_markdown(SEED, None).unwrap();
    let polisen = b.node().org().clone();
    let mut bytes = a.node().export_bundle(None, Some(&polisen)).unwrap().encode();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    let err = Bundle::decode(&bytes).unwrap_err();
    assert!(err.to_string().contains("damaged"), "{err}");
    assert!(b.node().list().unwrap().is_empty());

    // A bundle whose checksum is right but whose document bytes are not Automerge:
    // that document is refused with a reason, the store stays intact.
    let bundle = Bundle {
        docs: vec![samverkan::shared::bundle::BundleDoc {
            id: DocId::random(),
            data: b"not automerge".to_vec(),
            signatures: Vec::new(),
        }],
        ..a.node().export_bundle(None, Some(&polisen)).unwrap()
    };
    let reports = b.node().import_bundle(&bundle).unwrap();
    assert!(reports[0].error.is_some());
    assert!(b.node().list().unwrap().is_empty());
    b.restart();
}

#[test]
fn an_editor_session_does_not_undo_changes_that_arrived_meanwhile() {
    let root = tempfile::tempdir().unwrap();
    let mut relay = PaperRelay::default();
    let stick = root.path().join("stick.bundle");
    let mut county = TestNode::init(root.path(), "county", "Länsstyrelsen", &mut relay);
    let mut police = TestNode::init(root.path(), "police", "Polisen", &mut relay);
    let (id, _) = county.node().import_markdown(SEED, None).unwrap();
    carry(&mut county, &mut police, &stick);

    // The coordinator opens the agreement in an editor…
    let mut doc = county.node().document(&id).unwrap();
    let base = doc.heads();
    let opened = markdown::export(&doc.view().unwrap(), county.node().directory());

    // …meanwhile the police's edit of another paragraph arrives…
    let body = police.body(&id);
    let police_body = replace_once(&body, "Styrgruppen bör träffas", "Styrgruppen ska träffas");
    police.node().edit(&id, "edit", |e| e.set_body(&police_body)).unwrap();
    carry(&mut police, &mut county, &stick);

    // …and the coordinator saves a change made to the text as it was opened.
    let edited = replace_once(&opened, "Kommunerna har goda", "Kommunerna har mycket goda");
    let keep = root.path().join("kept.md");
    county.node().apply_edited_markdown(&id, &base, &edited, &keep).unwrap().expect("a change");
    let merged = county.body(&id);
    assert!(merged.contains("Styrgruppen ska träffas"), "the police's edit survived");
    assert!(merged.contains("Kommunerna har mycket goda"), "the coordinator's edit applied");
    carry(&mut county, &mut police, &stick);
    assert_converged(&mut county, &mut police);
}

#[test]
fn a_change_carried_by_a_third_node_keeps_its_authors_proof_and_a_forged_one_is_refused() {
    let root = tempfile::tempdir().unwrap();
    let mut relay = PaperRelay::default();
    let mut a = TestNode::init(root.path(), "lansstyrelsen", "Länsstyrelsen", &mut relay);
    let mut b = TestNode::init(root.path(), "polisen", "Polisen", &mut relay);
    let mut c = TestNode::init(root.path(), "lpo-katrineholm", "Polisen", &mut relay);
    let (id, _) = a.node().import_markdown(SEED, None).unwrap();
    let via = root.path().join("usb.bundle");
    // A's document travels A → B → C: C verifies A's signatures, carried by B.
    assert_eq!(carry(&mut a, &mut b, &via), 1);
    assert_eq!(carry(&mut b, &mut c, &via), 1);
    assert_converged(&mut a, &mut c);

    // B edits; in the bundle to A one bit of B's signature is flipped, so the
    // change names B as its author without B's valid signature.
    let text = b.body(&id).replacen("Styrgruppen", "Styrgruppen (reviderad)", 1);
    b.node().edit(&id, "edit", |e| e.set_body(&text)).unwrap();
    let have = HeadsSummary::from_json(&a.node().heads_summary().unwrap().to_json()).unwrap();
    let mut bundle = b.node().export_bundle(Some(&have), None).unwrap();
    assert!(!bundle.docs[0].signatures.is_empty(), "the bundle carries the authors' signatures");
    bundle.docs[0].signatures[0].1[0] ^= 0x01;
    let decoded = Bundle::decode(&bundle.encode()).unwrap();
    let before = a.snapshot();
    let reports = a.node().import_bundle(&decoded).unwrap();
    let error = reports[0].error.as_deref().unwrap_or_default();
    assert!(error.contains("signature does not verify"), "{reports:?}");
    assert_eq!(a.snapshot(), before, "nothing of the refused change was stored");

    // Without any signatures the change is refused as unsigned.
    bundle.docs[0].signatures.clear();
    let reports = a.node().import_bundle(&Bundle::decode(&bundle.encode()).unwrap()).unwrap();
    assert!(
        reports[0].error.as_deref().unwrap_or_default().contains("without a signature of its author"),
        "{reports:?}"
    );
}
