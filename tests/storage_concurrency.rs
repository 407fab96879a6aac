//! The relay's storage is not one global lock: while one document's storage
//! step is stuck (here: held on purpose by a storage wrapper around the real
//! SQLite storage), other documents sync through the relay between other
//! nodes, and the stuck one completes once released. With the storage behind
//! one mutex, or on the async runtime's worker threads, the second sync could
//! not finish until the first was released.
//!
//! Real relay, real nodes, QUIC on 127.0.0.1 (port 0), SQLite in temporary
//! directories, every wait bounded.

use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use samverkan::node::node::Node;
use samverkan::node::sync::{self};
use samverkan::relay::server::{self, RelayConfig, RelayHandle, DB_FILE};
use samverkan::relay::storage::{DocEntry, RelayStorage, SqliteStorage};
use samverkan::shared::acceptance::ContentLimits;
use samverkan::shared::automerge::ChangeHash;
use samverkan::shared::ids::DocId;
use samverkan::shared::model::{DocKind, Document, DocumentContent};
use samverkan::shared::receipt::ApprovalReceipt;
use samverkan::shared::sync::SignedChange;
use samverkan::store::StoreError;

#[path = "support/relay_net.rs"]
mod relay_net;
use relay_net::{bounded, target, LIMIT};

/// A gate one document's storage steps wait at while it is closed.
#[derive(Default)]
struct Gate {
    state: Mutex<GateState>,
    changed: Condvar,
}

#[derive(Default)]
struct GateState {
    doc: Option<DocId>,
    closed: bool,
    waiting: usize,
}

impl Gate {
    fn close_for(&self, doc: &DocId) {
        let mut state = self.state.lock().unwrap();
        state.doc = Some(doc.clone());
        state.closed = true;
    }

    fn open(&self) {
        self.state.lock().unwrap().closed = false;
        self.changed.notify_all();
    }

    fn waiting(&self) -> usize {
        self.state.lock().unwrap().waiting
    }

    /// Blocks while the gate is closed for `doc` (at most the test's limit).
    fn pass(&self, doc: &DocId) {
        let mut state = self.state.lock().unwrap();
        if !(state.closed && state.doc.as_ref() == Some(doc)) {
            return;
        }
        state.waiting += 1;
        let (mut state, _) = self.changed.wait_timeout_while(state, LIMIT, |s| s.closed).unwrap();
        state.waiting -= 1;
    }
}

/// The real SQLite storage, with one document's `with_doc` held at the gate.
struct GatedStorage {
    inner: SqliteStorage,
    gate: Arc<Gate>,
}

impl RelayStorage for GatedStorage {
    fn index(&self) -> Result<Vec<DocEntry>, StoreError> {
        self.inner.index()
    }
    fn set_content_limits(&mut self, limits: ContentLimits) {
        self.inner.set_content_limits(limits)
    }
    fn entry(&self, doc: &DocId) -> Result<Option<DocEntry>, StoreError> {
        self.inner.entry(doc)
    }
    fn with_doc<R, E: From<StoreError>>(
        &self,
        doc: &DocId,
        create: bool,
        f: impl FnOnce(&mut Document) -> Result<(R, Vec<SignedChange>, Vec<ApprovalReceipt>), E>,
    ) -> Result<Option<R>, E> {
        self.gate.pass(doc);
        self.inner.with_doc(doc, create, f)
    }
    fn signatures(&self, hashes: &[ChangeHash]) -> Result<Vec<SignedChange>, StoreError> {
        self.inner.signatures(hashes)
    }
    fn receipts(&self, doc: &DocId) -> Result<Vec<ApprovalReceipt>, StoreError> {
        self.inner.receipts(doc)
    }
    fn add_receipts(&self, receipts: &[ApprovalReceipt]) -> Result<usize, StoreError> {
        self.inner.add_receipts(receipts)
    }
    fn sync_states(&self, peer: &str) -> Result<Vec<(DocId, Vec<u8>)>, StoreError> {
        self.inner.sync_states(peer)
    }
    fn save_sync_states(&self, peer: &str, states: Vec<(DocId, Vec<u8>)>) -> Result<(), StoreError> {
        self.inner.save_sync_states(peer, states)
    }
    fn meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.inner.meta(key)
    }
    fn update_meta<E: From<StoreError>>(
        &self,
        key: &str,
        f: impl FnOnce(Option<String>) -> Result<Option<String>, E>,
    ) -> Result<Option<String>, E> {
        self.inner.update_meta(key, f)
    }
    fn evict(&self, doc: &DocId) {
        self.inner.evict(doc)
    }
    fn external_changes(&self) -> Result<Option<i64>, StoreError> {
        self.inner.external_changes()
    }
    fn loaded(&self) -> usize {
        self.inner.loaded()
    }

    fn document_loads(&self) -> u64 {
        self.inner.document_loads()
    }
}

fn node(root: &Path, relay: &RelayHandle, name: &str, org: &str) -> Node {
    let node = Node::init(&root.join(name), org, Some(name)).expect("init node");
    relay.enroll_node(node.node_id(), node.org().clone(), name).expect("enroll node");
    node
}

fn promise(node: &mut Node, title: &str) -> DocId {
    let mut content = DocumentContent::new(DocKind::CitizenPromise, title);
    content.parties = vec![node.org().clone()];
    node.create(content).expect("create")
}

fn body(node: &mut Node, id: &DocId) -> String {
    node.document(id).expect("document").view().expect("view").body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_document_stuck_in_storage_holds_up_no_other_document() {
    let root = tempfile::tempdir().unwrap();
    let relay_dir = root.path().join("relay");
    samverkan::store::keyfile::create_private_dir(&relay_dir).unwrap();
    let gate = Arc::new(Gate::default());
    let storage =
        GatedStorage { inner: SqliteStorage::open(&relay_dir.join(DB_FILE), 16).unwrap(), gate: gate.clone() };
    let relay = server::spawn_with_storage(RelayConfig::new("127.0.0.1:0".parse().unwrap(), relay_dir), storage)
        .await
        .expect("relay starts");
    let mut flen = node(root.path(), &relay, "flen", "Flen");
    let mut trosa = node(root.path(), &relay, "trosa", "Trosa");
    let mut trosa_2 = node(root.path(), &relay, "trosa-2", "Trosa");
    let stuck = promise(&mut flen, "Medborgarlöfte Flen");
    let free = promise(&mut trosa, "Medborgarlöfte Trosa");
    for n in [&mut flen, &mut trosa] {
        bounded("first sync", sync::sync_once(n, &target(&relay), LIMIT)).await.expect("sync");
    }

    // Flen's next change is held in the relay's storage.
    gate.close_for(&stuck);
    flen.edit(&stuck, "edit", |e| e.set_body("Flens nya text")).unwrap();
    let flen_target = target(&relay);
    let flen_sync = tokio::spawn(async move {
        let report = sync::sync_once(&mut flen, &flen_target, LIMIT).await;
        (flen, report)
    });
    bounded("Flen's change reaches the gate", async {
        while gate.waiting() == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;

    // Meanwhile Trosa's change goes through the relay to Trosa's second node.
    trosa.edit(&free, "edit", |e| e.set_body("Trosas nya text")).unwrap();
    bounded("Trosa's sync", sync::sync_once(&mut trosa, &target(&relay), LIMIT)).await.expect("sync");
    bounded("the second node's sync", sync::sync_once(&mut trosa_2, &target(&relay), LIMIT)).await.expect("sync");
    assert_eq!(body(&mut trosa_2, &free), "Trosas nya text");
    assert!(gate.waiting() > 0, "Flen's change was still held while Trosa's went through");
    assert!(!flen_sync.is_finished());

    // Released, Flen's change is stored and reaches another Flen node.
    gate.open();
    let (_flen, report) = bounded("Flen's sync", flen_sync).await.expect("task");
    report.expect("Flen's sync succeeds");
    let mut flen_2 = node(root.path(), &relay, "flen-2", "Flen");
    bounded("the second Flen node's sync", sync::sync_once(&mut flen_2, &target(&relay), LIMIT)).await.expect("sync");
    assert_eq!(body(&mut flen_2, &stuck), "Flens nya text");
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_relay_on_the_same_sqlite_data_directory_is_refused_until_the_first_stops() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("relay");
    let config = || RelayConfig::new("127.0.0.1:0".parse().unwrap(), dir.clone());
    let first = server::spawn(config()).await.expect("the first relay starts");
    let refused = server::spawn(config()).await.expect_err("a second relay on the same file is refused");
    assert!(matches!(refused, server::RelayError::AlreadyServing(_)), "{refused}");
    assert!(refused.to_string().contains("already serving"), "{refused}");
    bounded("shutdown", first.shutdown()).await;
    let again = server::spawn(config()).await.expect("once the first stopped, a relay starts");
    bounded("shutdown", again.shutdown()).await;
}
