//! `samverkan-node status`: is the relay reachable, when did the node last
//! sync, which documents have local changes waiting to be sent, and how many
//! remote changes arrived since the user last looked.
//!
//! Sources of truth, all in the node's store:
//! - **waiting**: this node's own changes that are not below the heads the
//!   node shares with the relay (the persisted Automerge sync state's
//!   `shared_heads` for that relay), so nothing is counted that the relay
//!   acknowledged;
//! - **received since last look**: changes by other nodes that are not below
//!   the heads recorded at the last look (meta `status.seen.<doc>`), so bundle
//!   imports count too;
//! - **last successful sync**: meta [`META_LAST_SUCCESS`], written by
//!   [`crate::sync`] when a sync settles.
//!
//! It never prints document contents beyond titles the user can already read.

use std::time::Duration;

use automerge::{ActorId, AutoCommit, ChangeHash};
use chrono::{DateTime, Utc};
use samverkan_net::endpoint::{self, Limits};
use samverkan_net::tls::TlsIdentity;
use samverkan_shared::identity::NodeId;
use samverkan_shared::ids::DocId;
use samverkan_store::StoreError;
use serde::Serialize;

use crate::node::{Node, NodeError, META_RELAY_ADDRESS, META_RELAY_KEY};
use crate::sync::RelayTarget;

/// Meta key: when the last sync settled (RFC 3339).
pub const META_LAST_SUCCESS: &str = "sync.last_success";
/// Meta key: when the last sync failed (RFC 3339).
pub const META_LAST_FAILURE: &str = "sync.last_failure";
/// Meta key: why the last sync failed.
pub const META_LAST_ERROR: &str = "sync.last_error";
/// Prefix of the meta keys holding the heads seen at the last look, per document.
pub const META_SEEN_PREFIX: &str = "status.seen.";

/// The sync-state key under which a node keeps what it shares with a relay.
pub fn relay_peer_key(relay_key: &NodeId) -> String {
    format!("relay:{relay_key}")
}

/// Whether the relay answered.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Reachability {
    /// The relay's address, as configured.
    pub address: String,
    /// Whether the relay was tried (not with `--offline`).
    pub checked: bool,
    /// Whether a QUIC handshake with the pinned relay key succeeded.
    pub reachable: bool,
    /// Why not, if not.
    pub error: Option<String>,
}

/// One document's sync status on this node.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct DocSyncStatus {
    /// The document.
    pub id: DocId,
    /// Its title.
    pub title: String,
    /// This node's changes the relay has not acknowledged.
    pub local_changes_waiting: u64,
    /// Changes by other nodes since the last look.
    pub remote_changes_since_last_look: u64,
    /// Why the document does not sync through the relay, if it does not: this
    /// node's organisation is not a party, or the relay refused it (see
    /// [`crate::node::Node::sharing_note`]). Its own changes are then not
    /// counted as waiting: they would never be sent.
    pub not_synced: Option<String>,
    /// Overlapping concurrent text edits not yet reviewed (`samverkan-node review`).
    pub open_overlaps: usize,
    /// Fields where concurrent edits left several values (`samverkan-node conflicts`).
    pub open_conflicts: usize,
}

/// The node's sync status.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct NodeSyncStatus {
    /// The relay, if one is configured and was probed.
    pub relay: Option<Reachability>,
    /// When the last sync settled.
    pub last_success: Option<DateTime<Utc>>,
    /// When the last sync failed, and why.
    pub last_failure: Option<(DateTime<Utc>, String)>,
    /// Every document.
    pub docs: Vec<DocSyncStatus>,
}

fn parse_time(value: Option<String>) -> Option<DateTime<Utc>> {
    value.and_then(|v| DateTime::parse_from_rfc3339(&v).ok()).map(|t| t.with_timezone(&Utc))
}

fn parse_heads(value: &str) -> Vec<ChangeHash> {
    value.split(',').filter_map(|h| h.parse().ok()).collect()
}

/// Changes in `doc` not below `have` whose author is (or, with `mine == false`, is not) `actor`.
fn count_changes(doc: &mut AutoCommit, have: &[ChangeHash], actor: &ActorId, mine: bool) -> u64 {
    let known: Vec<ChangeHash> = have.iter().filter(|h| doc.get_change_meta_by_hash(h).is_some()).copied().collect();
    doc.get_changes_meta(&known).iter().filter(|c| (c.actor.as_ref() == actor) == mine).count() as u64
}

/// Records a successful sync with `target` (now) in the node's store; the
/// target becomes the remembered relay.
pub fn record_success(node: &mut Node, target: &RelayTarget) -> Result<(), StoreError> {
    let store = node.store_mut();
    let relay_key = target.relay_key.to_string();
    if store.meta(META_RELAY_KEY)?.as_deref() != Some(relay_key.as_str()) {
        store.set_meta(META_RELAY_KEY, &relay_key)?;
        store.set_meta(META_RELAY_ADDRESS, &target.addr.to_string())?;
    }
    store.set_meta(META_LAST_SUCCESS, &Utc::now().to_rfc3339())
}

/// Records a failed sync (now, with its reason) in the node's store.
pub fn record_failure(node: &mut Node, error: &str) -> Result<(), StoreError> {
    let store = node.store_mut();
    store.set_meta(META_LAST_FAILURE, &Utc::now().to_rfc3339())?;
    store.set_meta(META_LAST_ERROR, error)
}

/// The relay this node syncs with, as remembered by the last sync.
pub fn remembered_relay(node: &Node) -> Result<Option<(String, NodeId)>, StoreError> {
    let store = node.store();
    let key = store.meta(META_RELAY_KEY)?.and_then(|k| k.parse().ok());
    Ok(store.meta(META_RELAY_ADDRESS)?.zip(key))
}

/// Tries a QUIC handshake with the relay (pinned key, as this node), then hangs up.
pub async fn probe(target: &RelayTarget, identity: &TlsIdentity, timeout: Duration) -> Result<(), String> {
    let attempt = async {
        let client = endpoint::client_endpoint(target.addr).map_err(|e| e.to_string())?;
        let conn = endpoint::connect(&client, target.addr, identity, *target.relay_key.as_bytes(), &Limits::default())
            .await
            .map_err(|e| e.to_string())?;
        conn.close(0u32.into(), b"status probe");
        client.wait_idle().await;
        Ok(())
    };
    tokio::time::timeout(timeout, attempt).await.map_err(|_| format!("no answer within {timeout:?}"))?
}

/// The node's sync status. `relay` is the probe's outcome, if one was made.
/// With `mark_seen`, the current heads become the "last look" for next time.
pub fn node_status(node: &mut Node, relay: Option<Reachability>, mark_seen: bool) -> Result<NodeSyncStatus, NodeError> {
    let actor = node.node_id().actor_id();
    let relay_key = node.pinned_relay()?;
    let shared: std::collections::BTreeMap<DocId, Vec<ChangeHash>> = match &relay_key {
        Some(f) => node
            .store()
            .sync_states(&relay_peer_key(f))?
            .into_iter()
            .filter_map(|(doc, bytes)| automerge::sync::State::decode(&bytes).ok().map(|s| (doc, s.shared_heads)))
            .collect(),
        None => Default::default(),
    };
    let mut docs = Vec::new();
    let mut seen_now = Vec::new();
    for summary in node.list()? {
        let mut document = node.document(&summary.id)?;
        let seen_key = format!("{META_SEEN_PREFIX}{}", summary.id);
        let seen = node.store().meta(&seen_key)?.map(|v| parse_heads(&v)).unwrap_or_default();
        let not_synced = node.sharing_note(&summary.id)?;
        let review = crate::review::ReviewFlags::of(&mut document)?;
        let doc = document.automerge_mut();
        let waiting = match not_synced {
            Some(_) => 0,
            None => count_changes(doc, shared.get(&summary.id).map(Vec::as_slice).unwrap_or(&[]), &actor, true),
        };
        let received = count_changes(doc, &seen, &actor, false);
        let heads: Vec<String> = doc.get_heads().iter().map(ToString::to_string).collect();
        seen_now.push((seen_key, heads.join(",")));
        docs.push(DocSyncStatus {
            id: summary.id,
            title: summary.title,
            local_changes_waiting: waiting,
            remote_changes_since_last_look: received,
            not_synced,
            open_overlaps: review.overlaps,
            open_conflicts: review.conflicts,
        });
    }
    if mark_seen {
        for (key, heads) in seen_now {
            node.store_mut().set_meta(&key, &heads)?;
        }
    }
    let store = node.store();
    let last_failure = parse_time(store.meta(META_LAST_FAILURE)?).zip(store.meta(META_LAST_ERROR)?);
    Ok(NodeSyncStatus { relay, last_success: parse_time(store.meta(META_LAST_SUCCESS)?), last_failure, docs })
}

/// Renders the status for people.
pub fn format_status(status: &NodeSyncStatus) -> String {
    let mut out = String::new();
    match &status.relay {
        None => out.push_str("relay: none configured yet (samverkan-node join <code>)\n"),
        Some(r) if !r.checked => out.push_str(&format!("relay: {} (not checked: --offline)\n", r.address)),
        Some(r) if r.reachable => out.push_str(&format!("relay: {} reachable\n", r.address)),
        Some(r) => out.push_str(&format!(
            "relay: {} NOT reachable: {}\n",
            r.address,
            r.error.as_deref().unwrap_or("unknown reason")
        )),
    }
    let when = |t: &DateTime<Utc>| t.with_timezone(&chrono::Local).format("%Y-%m-%d %H:%M:%S").to_string();
    match &status.last_success {
        Some(t) => out.push_str(&format!("last successful sync: {}\n", when(t))),
        None => out.push_str("last successful sync: never\n"),
    }
    if let Some((t, e)) = &status.last_failure {
        if status.last_success.is_none_or(|s| s < *t) {
            out.push_str(&format!("last sync failed: {} ({e})\n", when(t)));
        }
    }
    let waiting: u64 = status.docs.iter().map(|d| d.local_changes_waiting).sum();
    let received: u64 = status.docs.iter().map(|d| d.remote_changes_since_last_look).sum();
    let not_synced = status.docs.iter().filter(|d| d.not_synced.is_some()).count();
    out.push_str(&format!(
        "{} document(s); {waiting} local change(s) waiting to be sent; {received} remote change(s) received since last look\n",
        status.docs.len()
    ));
    if not_synced > 0 {
        out.push_str(&format!("{not_synced} document(s) not synced through the relay (see below)\n"));
    }
    let to_review = status.docs.iter().filter(|d| d.open_overlaps + d.open_conflicts > 0).count();
    if to_review > 0 {
        out.push_str(&format!("{to_review} document(s) with concurrent edits to review (see below)\n"));
    }
    for d in &status.docs {
        if let Some(why) = &d.not_synced {
            out.push_str(&format!("  {}  {:<40}  NOT SYNCED: {why}\n", d.id.short(), d.title));
            continue;
        }
        let mut notes = Vec::new();
        if d.local_changes_waiting > 0 {
            notes.push(format!("{} local change(s) waiting", d.local_changes_waiting));
        }
        if d.remote_changes_since_last_look > 0 {
            notes.push(format!("{} new from others", d.remote_changes_since_last_look));
        }
        let review = crate::review::ReviewFlags { overlaps: d.open_overlaps, conflicts: d.open_conflicts };
        if let Some(note) = review.note(&d.id) {
            notes.push(note);
        }
        let notes = if notes.is_empty() { "up to date".to_string() } else { notes.join(", ") };
        out.push_str(&format!("  {}  {:<40}  {notes}\n", d.id.short(), d.title));
    }
    out
}
