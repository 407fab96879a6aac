//! The operator's dashboard in a real browser: headless Chromium (Debian's
//! `chromium` package; `.ci/run` installs it) loads the page from a running
//! relay, the test changes the nodes' states after the page loaded, and checks
//! through the DevTools protocol that the page redrew itself (no reload) with
//! the right names and states. Screenshots (laptop and phone width) are saved
//! under `target/test-artifacts/`.
//!
//! Skips with a message when no Chromium is installed (set `SAMVERKAN_CHROMIUM`
//! to a browser binary to choose one).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use samverkan::node::node::Node;
use samverkan::node::sync::{self};
use samverkan::relay::admin::AdminConfig;
use samverkan::relay::monitor::NodeName;
use samverkan::relay::server::{self, RelayConfig, RelayHandle};
use samverkan::shared::ids::ItemId;
use samverkan::shared::model::{Activity, ActivityStatus, DocKind, DocumentContent};
use serde_json::json;

#[path = "support/chromium.rs"]
mod chromium;
use chromium::{find_chromium, Browser, Page, LIMIT};

#[path = "support/relay_net.rs"]
mod relay_net;
use relay_net::{bounded, target};

/// The rows the page shows: node id → (state, connected, visible text).
const ROWS_JS: &str = "JSON.stringify(Array.from(document.querySelectorAll('#rows tr[data-node]')).map(function (r) { \
     return [r.dataset.node, r.dataset.state, r.dataset.connected, r.innerText]; }))";

fn rows(page: &mut Page) -> BTreeMap<String, (String, String, String)> {
    let text = page.eval(ROWS_JS);
    let rows: Vec<(String, String, String, String)> = serde_json::from_str(text.as_str().unwrap_or("[]")).unwrap();
    rows.into_iter().map(|(node, state, connected, text)| (node, (state, connected, text))).collect()
}

/// Polls the page until `check` holds on its rows.
async fn page_shows(
    page: &mut Page,
    what: &str,
    check: impl Fn(&BTreeMap<String, (String, String, String)>) -> bool,
) -> BTreeMap<String, (String, String, String)> {
    bounded(what, async {
        loop {
            let rows = tokio::task::block_in_place(|| rows(page));
            if check(&rows) {
                return rows;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
}

async fn sync_once(node: &mut Node, relay: &RelayHandle) {
    bounded("sync", sync::sync_once(node, &target(relay), LIMIT)).await.expect("sync succeeds");
}

fn artifacts() -> std::path::PathBuf {
    chromium::artifacts(Path::new(env!("CARGO_MANIFEST_DIR")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_in_chromium_redraws_live_with_names_and_states() {
    let Some(chromium) = find_chromium() else {
        println!("SKIPPED dashboard_in_chromium_redraws_live_with_names_and_states: no chromium binary found (apt-get install chromium, or set SAMVERKAN_CHROMIUM)");
        return;
    };
    let root = tempfile::tempdir().unwrap();
    let parties = [
        ("flen", "Flen", "Flen BF-samordnare"),
        ("katrineholm", "Katrineholm", "Katrineholm trygghet"),
        ("vingaker", "Vingåker", "Vingåker kommun"),
    ];
    let mut nodes: Vec<Node> =
        parties.iter().map(|(dir, org, name)| Node::init(&root.path().join(dir), org, Some(name)).unwrap()).collect();
    let ids: Vec<String> = nodes.iter().map(|n| n.node_id().to_string()).collect();
    let offset = Arc::new(AtomicI64::new(0));
    let clock_offset = offset.clone();
    let mut config = RelayConfig::new("127.0.0.1:0".parse().unwrap(), root.path().join("relay"));
    config.monitoring.names =
        parties.iter().zip(&ids).map(|((_, org, name), id)| (id.clone(), NodeName::new(*org, *name))).collect();
    config.monitoring.stale_after = Duration::from_secs(3600);
    config.monitoring.clock =
        Some(Arc::new(move || chrono::Utc::now() + chrono::Duration::seconds(clock_offset.load(Ordering::SeqCst))));
    config.monitoring.admin = Some(AdminConfig::new("127.0.0.1:0".parse().unwrap()));
    let relay = server::spawn(config).await.expect("relay starts");

    // Everyone syncs one document: three rows, all in sync.
    for node in &nodes {
        relay.enroll_node(node.node_id(), node.org().clone(), node.name()).expect("enroll");
    }
    let mut content = DocumentContent::new(DocKind::CitizenPromise, "Medborgarlöfte Flen 2026");
    content.parties = nodes.iter().map(|n| n.org().clone()).collect();
    let doc = nodes[0].create(content).unwrap();
    for node in nodes.iter_mut() {
        sync_once(node, &relay).await;
    }

    let browser = Browser::start(&chromium);
    let mut page = tokio::task::block_in_place(|| Page::open(&browser));
    let url = format!("http://{}/", relay.admin_addr().unwrap());
    tokio::task::block_in_place(|| {
        page.call("Page.navigate", json!({"url": url}));
    });
    let first = page_shows(&mut page, "the first rendering", |rows| rows.len() == 3).await;
    for ((_, org, name), id) in parties.iter().zip(&ids) {
        let (state, connected, text) = &first[id];
        assert_eq!((state.as_str(), connected.as_str()), ("in_sync", "no"), "{text}");
        assert!(text.contains(name) && text.contains(org), "{text}");
        assert!(text.contains("i synk"), "{text}");
    }
    // A marker that a reload would lose.
    tokio::task::block_in_place(|| page.eval("window.__samverkanMarker = 'kvar'; true"));

    // After the page loaded: two hours pass; Katrineholm checks in, Flen edits and syncs.
    offset.fetch_add(2 * 3600, Ordering::SeqCst);
    sync_once(&mut nodes[1], &relay).await;
    nodes[0]
        .edit(&doc, "add", |e| {
            e.add_activity(&Activity {
                id: ItemId::random(),
                what: "Trygghetsvandring".into(),
                owners: Vec::new(),
                followup_method: None,
                due: None,
                status: ActivityStatus::Planned,
            })
        })
        .unwrap();
    sync_once(&mut nodes[0], &relay).await;

    let expected =
        [("in_sync", "Flen BF-samordnare"), ("behind", "Katrineholm trygghet"), ("stale", "Vingåker kommun")];
    let later = page_shows(&mut page, "the live update", |rows| {
        expected.iter().zip(&ids).all(|((state, _), id)| rows.get(id).is_some_and(|r| r.0 == *state))
    })
    .await;
    for ((state, name), id) in expected.iter().zip(&ids) {
        let text = &later[id].2;
        assert!(text.contains(name), "{state}: {text}");
    }
    assert!(later[&ids[1]].2.contains("1 dok, 1 ändr."), "{}", later[&ids[1]].2);
    assert!(later[&ids[2]].2.contains("inaktuell"), "{}", later[&ids[2]].2);
    let (marker, order, stale_colour) = tokio::task::block_in_place(|| {
        (
            page.eval("window.__samverkanMarker"),
            page.eval("Array.from(document.querySelectorAll('#rows tr')).map(function (r) { return r.dataset.state; }).join(',')"),
            page.eval("getComputedStyle(document.querySelector('#rows tr.stale td')).backgroundColor"),
        )
    });
    assert_eq!(marker, json!("kvar"), "the page updated without reloading");
    assert_eq!(order, json!("stale,behind,in_sync"), "stale and behind rows come first");
    assert_ne!(stale_colour, json!("rgba(0, 0, 0, 0)"), "stale rows stand out");

    tokio::task::block_in_place(|| {
        page.screenshot(&artifacts().join("dashboard.png"));
        page.viewport(390, 844, true);
        page.screenshot(&artifacts().join("dashboard-phone.png"));
    });
    drop(page);
    drop(browser);
    relay.shutdown().await;
}
