//! The operator's view of a real relay with real nodes: the admin JSON API,
//! the Prometheus metrics, the status table and the admin token, with one node
//! stale, one behind and one in sync. Time for "stale" comes from a test clock
//! the test moves forward, so nothing depends on wall-clock timing.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use samverkan::node::node::Node;
use samverkan::node::sync::{self, DaemonOptions};
use samverkan::relay::admin::{self, AdminConfig, AdminError};
use samverkan::relay::monitor::{self, NodeName, NodeState, RelayStatus};
use samverkan::relay::server::{self, RelayConfig, RelayHandle};
use samverkan::shared::ids::ItemId;
use samverkan::shared::model::{Activity, ActivityStatus, DocKind, DocumentContent};

#[path = "support/relay_net.rs"]
mod relay_net;
use relay_net::{bounded, target, LIMIT};

const TOKEN: &str = "operatörens-hemliga-token";
const TITLE: &str = "Medborgarlöfte Flen 2026 (hemlig arbetstitel)";

/// A clock the test moves forward by hand.
#[derive(Clone, Default)]
struct TestClock(Arc<AtomicI64>);

impl TestClock {
    fn advance(&self, by: chrono::Duration) {
        self.0.fetch_add(by.num_seconds(), Ordering::SeqCst);
    }
    fn clock(&self) -> monitor::Clock {
        let offset = self.0.clone();
        Arc::new(move || chrono::Utc::now() + chrono::Duration::seconds(offset.load(Ordering::SeqCst)))
    }
}

/// Enrolls nodes at the relay under their own names.
fn enroll(relay: &RelayHandle, nodes: &[&Node]) {
    for node in nodes {
        relay.enroll_node(node.node_id(), node.org().clone(), node.name()).expect("enroll");
    }
}

async fn sync_once(node: &mut Node, relay: &RelayHandle) {
    bounded("sync", sync::sync_once(node, &target(relay), LIMIT)).await.expect("sync succeeds");
}

async fn status(relay: &RelayHandle) -> RelayStatus {
    admin::fetch_status(relay.admin_addr().expect("admin server runs"), Some(TOKEN)).await.expect("status API answers")
}

fn node_named<'a>(status: &'a RelayStatus, name: &str) -> &'a monitor::NodeStatus {
    status.nodes.iter().find(|n| n.name == name).unwrap_or_else(|| panic!("no node {name} in {status:#?}"))
}

/// The value of one metric sample line (`name{labels} value`) whose text starts with `prefix`.
fn metric(metrics: &str, prefix: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no metric {prefix} in\n{metrics}"))
}

fn add_activity(node: &mut Node, doc: &samverkan::shared::ids::DocId, what: &str) {
    node.edit(doc, "add", |e| {
        e.add_activity(&Activity {
            id: ItemId::random(),
            what: what.to_string(),
            owners: Vec::new(),
            followup_method: None,
            due: None,
            status: ActivityStatus::Planned,
        })
    })
    .unwrap();
}

fn init(root: &Path, dir: &str, org: &str, name: &str) -> Node {
    Node::init(&root.join(dir), org, Some(name)).expect("init node")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_api_and_metrics_show_stale_behind_and_in_sync_nodes_by_name() {
    let root = tempfile::tempdir().unwrap();
    let mut flen = init(root.path(), "flen", "Flen", "Flen BF-samordnare");
    let mut katrineholm = init(root.path(), "katrineholm", "Katrineholm", "Katrineholm trygghet");
    let mut vingaker = init(root.path(), "vingaker", "Vingåker", "Vingåker kommun");
    let names: BTreeMap<String, NodeName> = [
        (&flen, "Flen", "Flen BF-samordnare"),
        (&katrineholm, "Katrineholm", "Katrineholm trygghet"),
        (&vingaker, "Vingåker", "Vingåker kommun"),
    ]
    .into_iter()
    .map(|(node, org, name)| (node.node_id().to_string(), NodeName::new(org, name)))
    .collect();

    let clock = TestClock::default();
    let mut config = RelayConfig::new("127.0.0.1:0".parse().unwrap(), root.path().join("relay"));
    config.monitoring.names = names;
    config.monitoring.stale_after = Duration::from_secs(3600);
    config.monitoring.clock = Some(clock.clock());
    config.monitoring.admin =
        Some(AdminConfig { listen: "127.0.0.1:0".parse().unwrap(), token: Some(TOKEN.to_string()) });
    let relay = server::spawn(config).await.expect("relay starts");
    let admin_addr = relay.admin_addr().unwrap();
    enroll(&relay, &[&flen, &katrineholm, &vingaker]);

    // Everyone gets the document; then two hours pass without Vingåker.
    let mut content = DocumentContent::new(DocKind::CitizenPromise, TITLE);
    content.parties = vec![flen.org().clone(), katrineholm.org().clone(), vingaker.org().clone()];
    content.body = "Vi lovar att genomföra trygghetsvandringar i Hälleforsnäs.".to_string();
    let doc = flen.create(content).unwrap();
    sync_once(&mut flen, &relay).await;
    sync_once(&mut katrineholm, &relay).await;
    sync_once(&mut vingaker, &relay).await;
    clock.advance(chrono::Duration::hours(2));

    // Katrineholm checks in once; Flen stays connected and edits.
    sync_once(&mut katrineholm, &relay).await;
    let flen_dir = root.path().join("flen");
    let target = target(&relay);
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let daemon = tokio::spawn(async move {
        let options = DaemonOptions { poll_interval: Duration::from_millis(20), ..DaemonOptions::default() };
        sync::daemon(&mut flen, &target, &options, async move {
            let _ = stop_rx.changed().await;
        })
        .await
        .unwrap();
    });
    let mut flen_cli = Node::open(&flen_dir).unwrap();
    add_activity(&mut flen_cli, &doc, "Trygghetsvandring i Flen");

    // Poll the API until the relay has the edit and Flen is connected and in sync.
    let status = bounded("the relay's status to settle", async {
        loop {
            let s = status(&relay).await;
            let flen = node_named(&s, "Flen BF-samordnare");
            let katrineholm = node_named(&s, "Katrineholm trygghet");
            if flen.connected && flen.state == NodeState::InSync && katrineholm.changes_behind == 1 {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;

    let flen = node_named(&status, "Flen BF-samordnare");
    assert_eq!(flen.organisation.as_deref(), Some("Flen"));
    assert!(flen.connected && !flen.stale && flen.docs_behind == 0 && flen.docs_in_sync == 1, "{flen:#?}");
    assert!(flen.software.as_deref().unwrap_or("").starts_with("samverkan-node"), "{flen:#?}");
    assert!(flen.remote.as_deref().unwrap_or("").starts_with("127.0.0.1:"));
    assert!(flen.bytes_in > 0 && flen.bytes_out > 0 && flen.messages_in > 0);
    assert!(flen.last_sync.is_some() && flen.docs[0].in_sync);

    let katrineholm = node_named(&status, "Katrineholm trygghet");
    assert_eq!(katrineholm.state, NodeState::Behind, "{katrineholm:#?}");
    assert!(!katrineholm.connected && !katrineholm.stale);
    assert_eq!((katrineholm.docs_behind, katrineholm.changes_behind), (1, 1));
    assert_eq!(katrineholm.docs[0].doc, doc);
    assert_eq!(katrineholm.docs[0].changes_behind, Some(1));
    assert!(katrineholm.last_seen.is_some() && katrineholm.last_error.is_none());

    let vingaker = node_named(&status, "Vingåker kommun");
    assert_eq!(vingaker.state, NodeState::Stale, "{vingaker:#?}");
    assert!(vingaker.stale && !vingaker.connected);
    assert_eq!(vingaker.organisation.as_deref(), Some("Vingåker"));

    // Stale first, then behind, then in sync.
    let order: Vec<NodeState> = status.nodes.iter().map(|n| n.state).collect();
    assert_eq!(order, vec![NodeState::Stale, NodeState::Behind, NodeState::InSync]);
    let r = &status.relay;
    assert_eq!((r.nodes, r.nodes_connected, r.nodes_stale, r.nodes_behind, r.documents), (3, 1, 1, 1, 1));
    assert!(r.connections_total >= 4 && r.connections_open >= 1 && r.store_bytes > 0);
    assert!(r.uptime_secs >= 7200, "the test clock moved two hours: {r:#?}");

    // Nothing of the document's contents leaks into monitoring.
    let json = admin::get_path(admin_addr, "/api/status", Some(TOKEN), LIMIT).await.unwrap();
    let metrics = admin::get_path(admin_addr, "/metrics", Some(TOKEN), LIMIT).await.unwrap();
    for text in [&json, &metrics] {
        assert!(
            !text.contains("hemlig arbetstitel")
                && !text.contains("Hälleforsnäs")
                && !text.contains("Trygghetsvandring")
        );
    }

    // Prometheus exposition: families, per-node values, end marker.
    assert!(metrics.contains("# TYPE samverkan_relay_node_changes_behind gauge"), "{metrics}");
    for family in [
        "steps_from_memory",
        "steps_on_storage_threads",
        "sync_steps_copied",
        "sync_steps_worked_out",
        "document_loads",
        "handshakes_retried",
    ] {
        assert!(metrics.contains(&format!("# TYPE samverkan_relay_{family} counter")), "{family}: {metrics}");
    }
    assert!(metrics.contains("# TYPE samverkan_relay_handshakes_in_progress gauge"), "{metrics}");
    assert!(metrics.trim_end().ends_with("# EOF"));
    assert_eq!(metric(&metrics, "samverkan_relay_nodes{state=\"stale\"}"), 1.0);
    assert_eq!(metric(&metrics, "samverkan_relay_nodes{state=\"behind\"}"), 1.0);
    assert_eq!(metric(&metrics, "samverkan_relay_nodes{state=\"in_sync\"}"), 1.0);
    assert_eq!(metric(&metrics, "samverkan_relay_documents "), 1.0);
    let k = format!("{{node=\"{}\",name=\"Katrineholm trygghet\"}}", katrineholm.short_id);
    let f = format!("{{node=\"{}\",name=\"Flen BF-samordnare\"}}", flen.short_id);
    let v = format!("{{node=\"{}\",name=\"Vingåker kommun\"}}", vingaker.short_id);
    assert_eq!(metric(&metrics, &format!("samverkan_relay_node_changes_behind{k}")), 1.0);
    assert_eq!(metric(&metrics, &format!("samverkan_relay_node_documents_behind{k}")), 1.0);
    assert_eq!(metric(&metrics, &format!("samverkan_relay_node_connected{f}")), 1.0);
    assert_eq!(metric(&metrics, &format!("samverkan_relay_node_changes_behind{f}")), 0.0);
    assert_eq!(metric(&metrics, &format!("samverkan_relay_node_stale{v}")), 1.0);
    assert!(metric(&metrics, &format!("samverkan_relay_node_received_bytes_total{f}")) > 0.0);
    assert!(metric(&metrics, "samverkan_relay_connections_total") >= 4.0);

    // The dashboard's smaller query lists only the documents a node is behind on.
    let small = admin::get_path(admin_addr, "/api/status?docs=behind", Some(TOKEN), LIMIT).await.unwrap();
    let small: RelayStatus = serde_json::from_str(&small).unwrap();
    assert!(node_named(&small, "Flen BF-samordnare").docs.is_empty());
    assert_eq!(node_named(&small, "Katrineholm trygghet").docs.len(), 1);
    assert_eq!(node_named(&small, "Flen BF-samordnare").docs_in_sync, 1);

    // The table `samverkan-relay status` prints.
    let table = monitor::format_table(&status);
    println!("{table}");
    for expected in ["Flen BF-samordnare", "Katrineholm trygghet", "Vingåker kommun", "STALE", "BEHIND", "in sync"] {
        assert!(table.contains(expected), "{expected} missing from\n{table}");
    }
    assert!(table.contains("1 doc(s), 1 change(s)"), "{table}");

    // The token guards the API and the metrics, not the health check or the (data-free) page.
    let refused = admin::get_path(admin_addr, "/api/status", None, LIMIT).await;
    assert!(matches!(refused, Err(AdminError::Status { status: 401, .. })), "{refused:?}");
    let refused = admin::get_path(admin_addr, "/metrics", Some("wrong"), LIMIT).await;
    assert!(matches!(refused, Err(AdminError::Status { status: 401, .. })), "{refused:?}");
    assert_eq!(admin::get_path(admin_addr, "/healthz", None, LIMIT).await.unwrap().trim(), "ok");
    let page = admin::get_path(admin_addr, "/", None, LIMIT).await.unwrap();
    assert!(page.contains("<title>Samverkan relay</title>") && !page.contains("http://") && !page.contains("https://"));

    // `samverkan-node status` in another process sees what the running daemon
    // sent: nothing waiting, and a recorded successful sync.
    bounded("the daemon's progress to reach the node's status", async {
        loop {
            let s = samverkan::node::status::node_status(&mut flen_cli, None, false).unwrap();
            if s.last_success.is_some() && s.docs.iter().all(|d| d.local_changes_waiting == 0) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;

    stop_tx.send(true).unwrap();
    bounded("daemon stop", daemon).await.unwrap();
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_relay_still_knows_its_nodes_and_names_them_through_the_resolver() {
    let root = tempfile::tempdir().unwrap();
    let relay_dir = root.path().join("relay");
    let mut trosa = init(root.path(), "trosa", "Trosa", "Trosa kommun");
    let mut content = DocumentContent::new(DocKind::OperationsPlan, "Åtgärdsplan Trosa");
    content.parties = vec![trosa.org().clone()];
    let doc = trosa.create(content).unwrap();
    let mut config = RelayConfig::new("127.0.0.1:0".parse().unwrap(), relay_dir.clone());
    config.monitoring.admin = Some(AdminConfig::new("127.0.0.1:0".parse().unwrap()));
    let relay = server::spawn(config.clone()).await.unwrap();
    enroll(&relay, &[&trosa]);
    sync_once(&mut trosa, &relay).await;
    relay.shutdown().await;

    // After a restart the node is known from its stored sync state and record, in sync.
    let relay = server::spawn(config).await.unwrap();
    let trosa_id = trosa.node_id().to_string();
    let expected = trosa_id.clone();
    relay.set_name_resolver(Some(Arc::new(move |id: &str| {
        (id == expected).then(|| NodeName::new("Trosa", "Trosa (från katalogen)"))
    })));
    let s = admin::fetch_status(relay.admin_addr().unwrap(), None).await.unwrap();
    assert_eq!(s.nodes.len(), 1, "{s:#?}");
    let n = &s.nodes[0];
    assert_eq!((n.node_id.as_str(), n.name.as_str()), (trosa_id.as_str(), "Trosa (från katalogen)"));
    assert_eq!(n.state, NodeState::InSync, "{n:#?}");
    assert!(!n.connected && !n.stale);
    assert!(n.last_seen.is_some(), "last seen is kept across the restart: {n:#?}");
    assert!(n.software.as_deref().unwrap_or("").starts_with("samverkan-node"));
    assert_eq!(n.docs.len(), 1);
    assert_eq!(n.docs[0].doc, doc);

    // Without a resolver entry the short id is shown.
    relay.set_name_resolver(None);
    assert_eq!(relay.status().nodes[0].name, trosa.node_id().short());
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_status_shows_waiting_local_changes_received_remote_changes_and_reachability() {
    use samverkan::node::status;
    let root = tempfile::tempdir().unwrap();
    let relay =
        server::spawn(RelayConfig::new("127.0.0.1:0".parse().unwrap(), root.path().join("relay"))).await.unwrap();
    let mut flen = init(root.path(), "flen", "Flen", "Flen BF-samordnare");
    let mut polisen = init(root.path(), "polisen", "Polisen", "Polisen Södermanland");
    enroll(&relay, &[&flen, &polisen]);

    // Twelve documents made offline: all waiting, never synced.
    let mut ids = Vec::new();
    for i in 0..12 {
        let mut content = DocumentContent::new(DocKind::OperationsPlan, format!("Åtgärdsplan {i}"));
        content.parties = vec![flen.org().clone(), polisen.org().clone()];
        ids.push(flen.create(content).unwrap());
    }
    add_activity(&mut flen, &ids[0], "Trygghetsvandring");
    let before = status::node_status(&mut flen, None, true).unwrap();
    assert!(before.last_success.is_none());
    assert_eq!(before.docs.iter().filter(|d| d.local_changes_waiting > 0).count(), 12);
    let waiting_0 = before.docs.iter().find(|d| d.id == ids[0]).unwrap().local_changes_waiting;
    assert_eq!(waiting_0, 2, "created and one activity added");
    assert!(before.docs.iter().all(|d| d.remote_changes_since_last_look == 0), "own changes are not remote");

    // The first sync reports its progress over all twelve documents.
    let mut seen = Vec::new();
    bounded(
        "sync with progress",
        sync::sync_once_with_progress(&mut flen, &target(&relay), LIMIT, &mut |p| seen.push(p)),
    )
    .await
    .unwrap();
    let last = seen.last().copied().unwrap();
    assert_eq!((last.done, last.planned), (12, 12), "{seen:?}");
    assert!(seen.windows(2).all(|w| w[0].done <= w[1].done));

    let after = status::node_status(&mut flen, None, true).unwrap();
    assert!(after.last_success.is_some());
    assert!(after.docs.iter().all(|d| d.local_changes_waiting == 0), "{after:#?}");

    // Polisen receives them: 13 remote changes since its (first) look, then none.
    sync_once(&mut polisen, &relay).await;
    let first_look = status::node_status(&mut polisen, None, true).unwrap();
    assert_eq!(first_look.docs.iter().map(|d| d.remote_changes_since_last_look).sum::<u64>(), 13);
    let second_look = status::node_status(&mut polisen, None, false).unwrap();
    assert!(second_look.docs.iter().all(|d| d.remote_changes_since_last_look == 0));

    // One more edit on Flen reaches Polisen: exactly one waiting, then one received.
    add_activity(&mut flen, &ids[3], "Medborgardialog");
    let s = status::node_status(&mut flen, None, true).unwrap();
    assert_eq!(s.docs.iter().map(|d| d.local_changes_waiting).sum::<u64>(), 1);
    sync_once(&mut flen, &relay).await;
    sync_once(&mut polisen, &relay).await;
    let s = status::node_status(&mut polisen, None, true).unwrap();
    let received: Vec<_> = s.docs.iter().filter(|d| d.remote_changes_since_last_look > 0).collect();
    assert_eq!(received.len(), 1);
    assert_eq!((&received[0].id, received[0].remote_changes_since_last_look), (&ids[3], 1));
    let text = status::format_status(&s);
    assert!(text.contains("1 remote change(s) received since last look"), "{text}");

    // Reachability: the pinned relay answers while it runs, not after.
    let identity = samverkan::net::tls::TlsIdentity::new(polisen.key().signing_key(), "samverkan-node").unwrap();
    assert_eq!(status::probe(&target(&relay), &identity, Duration::from_secs(10)).await, Ok(()));
    let gone = target(&relay);
    relay.shutdown().await;
    assert!(status::probe(&gone, &identity, Duration::from_secs(2)).await.is_err());
}
