//! The operator enrolls and revokes from another process
//! (`samverkan-relay enroll | revoke` open the relay's database beside the
//! running relay): the very next connection sees it, over real QUIC, however
//! long the relay's directory poll is.

use std::path::Path;
use std::time::Duration;

use chrono::Utc;
use samverkan::node::node::{Node, NodeError};
use samverkan::relay::enrollment;
use samverkan::relay::server::{self, RelayHandle};
use samverkan::relay::storage::SqliteStorage;
use samverkan::shared::directory::{Member, MemberKind};
use samverkan::shared::identity::NodeId;

#[path = "support/relay_net.rs"]
mod relay_net;
use relay_net::{org, relay_config, spawn_relay, try_sync};

const SEED: &str = include_str!("../../shared/seed/lansovergripande-samverkansoverenskommelse-sodermanland-2023.md");

/// A relay whose directory poll never comes round during the test: only what
/// happens at connection time can pick up the operator's changes.
async fn start_relay(dir: &Path) -> RelayHandle {
    // No poll during the test: what the relay notices, it notices when a node connects.
    let mut config = relay_config(dir);
    config.directory_poll = Duration::from_secs(3600);
    spawn_relay(config).await
}

/// What `samverkan-relay enroll` does: its own connection to the relay's database.
fn operator_enrolls(relay_dir: &Path, key: NodeId, kind: MemberKind, org_name: &str, name: &str, role: Option<&str>) {
    let storage = SqliteStorage::open(&relay_dir.join(server::DB_FILE), 4).expect("open the relay database");
    let member = Member {
        key,
        kind,
        org: org(org_name),
        name: name.into(),
        role: role.map(Into::into),
        enrolled_at: Utc::now(),
        revoked_at: None,
    };
    enrollment::enroll(&storage, member).expect("enrolled");
}

/// What `samverkan-relay revoke` does.
fn operator_revokes(relay_dir: &Path, key: &NodeId) {
    let storage = SqliteStorage::open(&relay_dir.join(server::DB_FILE), 4).expect("open the relay database");
    enrollment::revoke(&storage, key, Utc::now()).expect("revoked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_right_after_the_operator_enrolled_a_signer_carries_it_and_approve_works() {
    let root = tempfile::tempdir().unwrap();
    let relay_dir = root.path().join("relay");
    let relay = start_relay(&relay_dir).await;
    let mut lst = Node::init(&root.path().join("lst"), "Länsstyrelsen", Some("lst")).unwrap();
    relay.enroll_node(lst.node_id(), lst.org().clone(), "lst").unwrap();
    let (id, _) = lst.import_markdown(SEED, None).unwrap();
    try_sync(&mut lst, &relay).await.expect("first sync");

    // As the README says: `signer new`, the operator enrolls, `sync`, `approve`.
    let governor = lst.create_signer("Beatrice Ask", "Landshövding", None).unwrap();
    let refused = lst.approve(&id, "Beatrice Ask").unwrap_err();
    assert!(matches!(refused, NodeError::SignerNotEnrolled { .. }), "not enrolled yet: {refused}");
    operator_enrolls(
        &relay_dir,
        governor.key,
        MemberKind::Signer,
        "Länsstyrelsen",
        "Beatrice Ask",
        Some("Landshövding"),
    );
    try_sync(&mut lst, &relay).await.expect("sync after the enrollment");
    let directory = lst.enrollment().unwrap().expect("a directory");
    assert!(directory.active(&governor.key).is_some(), "the sync carried the new signer");
    lst.approve(&id, "Beatrice Ask").expect("approve works right after that sync");
    try_sync(&mut lst, &relay)
        .await
        .expect("the approval reaches the relay, which checks it against the same directory");
    assert!(lst.approval_status(&id).unwrap().awaiting_receipt.is_empty(), "the relay received and receipted it");
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_enrolled_or_revoked_by_the_operator_a_moment_ago_is_judged_by_that_at_once() {
    let root = tempfile::tempdir().unwrap();
    let relay_dir = root.path().join("relay");
    let relay = start_relay(&relay_dir).await;
    let mut flen = Node::init(&root.path().join("flen"), "Flen", Some("flen")).unwrap();

    operator_enrolls(&relay_dir, flen.node_id(), MemberKind::Node, "Flen", "Flen BF", None);
    try_sync(&mut flen, &relay).await.expect("enrolled a moment ago: admitted");
    assert!(flen.enrollment().unwrap().expect("directory").active(&flen.node_id()).is_some());

    operator_revokes(&relay_dir, &flen.node_id());
    let refused = try_sync(&mut flen, &relay).await.expect_err("revoked a moment ago: refused");
    assert!(format!("{refused:#}").contains("revoked"), "{refused:#}");
    relay.shutdown().await;
}
