//! What the integration tests against a real relay share (each test file
//! includes this one by path): bounded waits, a relay on 127.0.0.1 port 0
//! storing in a temporary directory, enrolled nodes, and one sync with a time
//! limit. Nothing here can wait longer than [`LIMIT`].

#![allow(dead_code)]

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use samverkan::node::node::Node;
use samverkan::node::sync::{self, RelayTarget, SyncFailure, SyncReport};
use samverkan::relay::server::{self, RelayConfig, RelayHandle};
use samverkan::shared::org::{Directory, OrgId};

/// The longest any single wait in a test may take.
pub const LIMIT: Duration = Duration::from_secs(60);

/// `f`, or a panic naming `what` once [`LIMIT`] has passed.
pub async fn bounded<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(LIMIT, f).await.unwrap_or_else(|_| panic!("{what} did not finish within {LIMIT:?}"))
}

/// Polls `check` every few milliseconds until it holds (a panic after [`LIMIT`]).
pub async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    bounded(what, async {
        while !check() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
}

/// A relay's configuration on 127.0.0.1, port 0, storing in `dir`, that
/// re-reads its enrollment directory every 100 ms.
pub fn relay_config(dir: &Path) -> RelayConfig {
    let mut config = RelayConfig::new("127.0.0.1:0".parse().expect("a socket address"), dir.to_path_buf());
    config.directory_poll = Duration::from_millis(100);
    config
}

/// A relay started with `config`.
pub async fn spawn_relay(config: RelayConfig) -> RelayHandle {
    server::spawn(config).await.expect("relay starts")
}

/// A relay started with [`relay_config`].
pub async fn start_relay(dir: &Path) -> RelayHandle {
    spawn_relay(relay_config(dir)).await
}

/// Where nodes reach `relay`, with its key pinned.
pub fn target(relay: &RelayHandle) -> RelayTarget {
    RelayTarget { addr: relay.local_addr(), relay_key: relay.relay_key() }
}

/// An organisation's id by its name ("Flen" → `flen-kommun`).
pub fn org(name: &str) -> OrgId {
    Directory::sodermanland().resolve(name).expect("a Södermanland party").id.clone()
}

/// A new node `name` of `org_name` in `root/name`, enrolled at `relay`.
pub fn enrolled(root: &Path, relay: &RelayHandle, name: &str, org_name: &str) -> Node {
    let node = Node::init(&root.join(name), org_name, Some(name)).expect("a new node");
    relay.enroll_node(node.node_id(), node.org().clone(), name).expect("the relay enrolls the node");
    node
}

/// One sync of `node` with `relay`, bounded by [`LIMIT`].
pub async fn try_sync(node: &mut Node, relay: &RelayHandle) -> Result<SyncReport, SyncFailure> {
    bounded("sync", sync::sync_once(node, &target(relay), LIMIT)).await
}

/// [`try_sync`], which must succeed (documents the relay refused are in the report).
pub async fn sync(node: &mut Node, relay: &RelayHandle) -> SyncReport {
    try_sync(node, relay).await.expect("the sync itself succeeds")
}
