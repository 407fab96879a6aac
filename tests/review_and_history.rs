//! Honest merges over a real relay: overlapping offline edits of one phrase
//! are found the same on both authors' nodes and on a third that receives
//! both at once, settled once for all; edits elsewhere stay quiet; field
//! conflicts are flagged; history says what each change did and who did it.
//! QUIC on 127.0.0.1 (port 0), SQLite files in temporary directories.

use std::path::Path;

use samverkan::node::node::Node;
use samverkan::node::review::{self, ReviewFlags, TakeArg};
use samverkan::relay::server::{self, RelayConfig, RelayHandle};
use samverkan::shared::ids::{DocId, ItemId};
use samverkan::shared::model::{Activity, ActivityStatus};

#[path = "support/relay_net.rs"]
mod relay_net;
use relay_net::{bounded, sync};

const SEED: &str = include_str!("../../shared/seed/lansovergripande-samverkansoverenskommelse-sodermanland-2023.md");
const PHRASE: &str = "Styrgruppen bör träffas minst två gånger per år.";

/// A new node of `org`, enrolled at the relay.
fn node(root: &Path, relay: &RelayHandle, name: &str, org: &str) -> Node {
    let node = Node::init(&root.join(name), org, Some(name)).expect("init node");
    relay.enroll_node(node.node_id(), node.org().clone(), name).expect("enroll node");
    node
}

fn edit_body(node: &mut Node, id: &DocId, from: &str, to: &str) {
    let body = node.document(id).unwrap().view().unwrap().body;
    assert!(body.contains(from), "{from:?} not in the body");
    let body = body.replacen(from, to, 1);
    node.edit(id, "edit body", |e| e.set_body(&body)).unwrap();
}

/// The open overlaps' keys and paragraphs: what "the same overlap" means across nodes.
fn overlaps(node: &Node, id: &DocId) -> Vec<(String, usize, String)> {
    review::open(node, id).unwrap().into_iter().map(|i| (i.key, i.paragraph, i.merged)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_offline_edits_are_reported_alike_everywhere_and_reviewed_once_for_all() {
    let root = tempfile::tempdir().unwrap();
    let relay =
        bounded("relay", server::spawn(RelayConfig::new("127.0.0.1:0".parse().unwrap(), root.path().join("relay"))))
            .await
            .expect("relay starts");
    let mut county = node(root.path(), &relay, "lansstyrelsen", "Länsstyrelsen");
    let mut police = node(root.path(), &relay, "polisen", "Polisen");
    let mut third = node(root.path(), &relay, "kommunpolis", "Polisen");
    let (id, _) = county.import_markdown(SEED, None).unwrap();
    sync(&mut county, &relay).await;
    sync(&mut police, &relay).await;

    // Offline: the same phrase changed differently, and each side's edit of another paragraph.
    edit_body(&mut county, &id, PHRASE, "Styrgruppen bör träffas minst två gånger per månad.");
    edit_body(&mut police, &id, PHRASE, "Styrgruppen bör träffas minst två gånger per kvartal.");
    edit_body(&mut county, &id, "Kommunerna har goda", "Kommunerna har mycket goda");
    edit_body(&mut police, &id, "Fyra gånger per år samordnar", "Fyra gånger per år (kvartalsvis) samordnar");
    sync(&mut county, &relay).await;
    sync(&mut police, &relay).await;
    sync(&mut county, &relay).await;
    // The third node was never online with either: it receives both edits at once.
    sync(&mut third, &relay).await;

    let found = overlaps(&county, &id);
    assert_eq!(found.len(), 1, "only the phrase overlaps: {found:#?}");
    assert_eq!(overlaps(&police, &id), found, "the other author's node");
    assert_eq!(overlaps(&third, &id), found, "a node that received both at once");
    let item = review::open(&third, &id).unwrap().remove(0);
    assert_eq!(item.field, "body");
    assert!(item.base.ends_with(PHRASE), "the whole paragraph: {}", item.base);
    let versions: Vec<&str> = item.sides.iter().map(|s| s.text.as_str()).collect();
    let version = |end: &str| item.base.replace(PHRASE, &format!("Styrgruppen bör träffas minst två gånger per {end}"));
    assert!(versions.contains(&version("månad.").as_str()), "{versions:?}");
    assert!(versions.contains(&version("kvartal.").as_str()), "{versions:?}");
    assert!(item.merged != versions[0] && item.merged != versions[1], "merged per character: {}", item.merged);
    let by: Vec<&str> = item.sides.iter().map(|s| s.by.as_str()).collect();
    assert!(by.contains(&"Länsstyrelsen i Södermanlands län (lansstyrelsen)"), "verified authors: {by:?}");
    assert!(by.contains(&"Polisområde Södermanland (polisen)"), "verified authors: {by:?}");
    assert_eq!(ReviewFlags::of(&mut third.document(&id).unwrap()).unwrap().overlaps, 1);

    // The County Board keeps the police's version; every node sees it reviewed.
    let done = review::resolve(&mut county, &id, 1, Some(TakeArg::Theirs), None).unwrap();
    assert!(done.change.is_some());
    let body = county.document(&id).unwrap().view().unwrap().body;
    assert!(body.contains("Styrgruppen bör träffas minst två gånger per kvartal."));
    assert!(
        body.contains("Kommunerna har mycket goda") && body.contains("(kvartalsvis) samordnar"),
        "{body}\n{done:#?}"
    );
    sync(&mut county, &relay).await;
    for node in [&mut police, &mut third] {
        sync(node, &relay).await;
        assert!(overlaps(node, &id).is_empty());
        assert_eq!(node.document(&id).unwrap().view().unwrap().body, body);
    }

    // Offline edits of different paragraphs: nothing to review anywhere.
    edit_body(&mut county, &id, "Kommunerna har mycket goda", "Kommunerna har mycket goda och");
    edit_body(&mut police, &id, "(kvartalsvis)", "(var tredje månad)");
    sync(&mut county, &relay).await;
    sync(&mut police, &relay).await;
    sync(&mut county, &relay).await;
    sync(&mut third, &relay).await;
    for node in [&county, &police, &third] {
        assert!(overlaps(node, &id).is_empty());
    }

    // Concurrent values of one field: flagged as a field conflict on every node.
    let (activity, _) = county
        .edit(&id, "add activity", |e| {
            e.add_activity(&Activity {
                id: ItemId::random(),
                what: "Trygghetsvandring".into(),
                owners: Vec::new(),
                due: chrono::NaiveDate::from_ymd_opt(2026, 5, 1).map(samverkan::shared::model::Due::Date),
                followup_method: None,
                status: ActivityStatus::Planned,
            })
        })
        .unwrap();
    sync(&mut county, &relay).await;
    sync(&mut police, &relay).await;
    let due = format!("activities.{activity}.due");
    county.edit(&id, "change activity", |e| e.set_field(&due, "2026-06-01")).unwrap();
    police.edit(&id, "change activity", |e| e.set_field(&due, "2026-09-01")).unwrap();
    sync(&mut county, &relay).await;
    sync(&mut police, &relay).await;
    sync(&mut county, &relay).await;
    sync(&mut third, &relay).await;
    for node in [&county, &police, &third] {
        assert_eq!(review::flags(node, &id).unwrap(), ReviewFlags { overlaps: 0, conflicts: 1 });
    }
    let status = samverkan::node::status::node_status(&mut third, None, false).unwrap();
    assert_eq!((status.docs[0].open_overlaps, status.docs[0].open_conflicts), (0, 1));

    // History, read on the third node: field by field, paragraph by paragraph, with verified authors.
    county.edit(&id, "set title", |e| e.set_title("Samverkansöverenskommelse Södermanland 2026")).unwrap();
    county.edit(&id, "set parties", |e| e.set_field("parties", "Länsstyrelsen, Polisen, Flen")).unwrap();
    sync(&mut county, &relay).await;
    sync(&mut third, &relay).await;
    let history = review::history(&third, &id).unwrap();
    let said = |who: &str, text: &str| history.iter().any(|h| h.by == who && h.changes.iter().any(|c| c.text == text));
    let county_name = "Länsstyrelsen i Södermanlands län (lansstyrelsen)";
    let title = history.iter().flat_map(|h| &h.changes).find(|c| c.field == "title").unwrap();
    assert!(
        title.text.starts_with("Titel: '") && title.text.ends_with("' → 'Samverkansöverenskommelse Södermanland 2026'")
    );
    assert!(said(county_name, "Parter: + Flens kommun"));
    assert!(said(county_name, "Aktivitet 'Trygghetsvandring': förfallodag 2026-05-01 → 2026-06-01"));
    assert!(said(
        "Polisområde Södermanland (polisen)",
        "Aktivitet 'Trygghetsvandring': förfallodag 2026-05-01 → 2026-09-01"
    ));
    let paragraph = history
        .iter()
        .flat_map(|h| h.changes.iter().map(move |c| (h, c)))
        .find(|(_, c)| {
            c.field == "body" && c.text.contains("två gånger per kvartal") && c.text.contains("två gånger per år")
        })
        .expect("the police's paragraph edit");
    assert_eq!(paragraph.0.by, "Polisområde Södermanland (polisen)");
    assert!(paragraph.1.text.starts_with("Brödtext, stycke "), "{}", paragraph.1.text);
    relay.shutdown().await;
}
