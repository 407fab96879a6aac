//! Fan-out of changes between the relay's connections.
//!
//! When a connection applies a change from its node, every other connection is
//! told that the document changed. Telling is a set insert and a wake-up, never
//! a queue that can fill: a slow or stuck node only delays itself, and however
//! many changes pile up for it, it later generates one sync message per
//! document from the document's current state.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use samverkan_shared::ids::DocId;
use samverkan_shared::org::OrgId;
use tokio::sync::Notify;

/// Identifies one live connection.
pub type ConnectionId = u64;

/// What one connection is owed: documents that changed elsewhere, a newer
/// directory, or an order to close (and why).
#[derive(Debug, Default)]
pub struct Mailbox {
    dirty: Mutex<BTreeSet<DocId>>,
    notify: Notify,
    directory_changed: AtomicBool,
    close: Mutex<Option<String>>,
}

impl Mailbox {
    /// Waits until something is owed (or the connection is told to close).
    pub async fn changed(&self) {
        self.notify.notified().await;
    }

    /// Takes the documents owed so far.
    pub fn take(&self) -> BTreeSet<DocId> {
        std::mem::take(&mut *self.dirty.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Why the relay asked this connection to close, if it did.
    pub fn close_reason(&self) -> Option<String> {
        self.close.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Whether the directory changed since the last call (and resets the flag).
    pub fn take_directory_changed(&self) -> bool {
        self.directory_changed.swap(false, Ordering::SeqCst)
    }

    fn post(&self, doc: &DocId) {
        self.dirty.lock().unwrap_or_else(|e| e.into_inner()).insert(doc.clone());
        self.notify.notify_one();
    }

    fn close(&self, reason: &str) {
        self.close.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert_with(|| reason.to_string());
        self.notify.notify_one();
    }
}

/// A connected node as the hub knows it.
#[derive(Debug, Clone)]
struct Member {
    peer: String,
    /// The connection's organisation: it hears only of its parties' documents.
    org: OrgId,
    mailbox: Arc<Mailbox>,
}

/// The registry of live connections.
#[derive(Debug, Default)]
pub struct Hub {
    next: AtomicU64,
    members: Mutex<HashMap<ConnectionId, Member>>,
}

impl Hub {
    /// Registers a connection of node `peer` of organisation `org`; returns its id and mailbox.
    pub fn join(&self, peer: &str, org: &OrgId) -> (ConnectionId, Arc<Mailbox>) {
        let id = self.next.fetch_add(1, Ordering::SeqCst);
        let mailbox = Arc::new(Mailbox::default());
        self.lock().insert(id, Member { peer: peer.to_string(), org: org.clone(), mailbox: mailbox.clone() });
        (id, mailbox)
    }

    /// Removes a connection.
    pub fn leave(&self, id: ConnectionId) {
        self.lock().remove(&id);
    }

    /// Tells every connection but `from` whose organisation is among the
    /// document's `parties` that `doc` changed (the others may not see it, so
    /// waking them would be work for nothing).
    pub fn changed(&self, from: ConnectionId, doc: &DocId, parties: &[OrgId]) {
        for (id, member) in self.lock().iter() {
            if *id != from && parties.contains(&member.org) {
                member.mailbox.post(doc);
            }
        }
    }

    /// Tells every connection of the document's `parties` that `doc` changed
    /// elsewhere (another relay instance on the same storage stored changes to it).
    pub fn changed_elsewhere(&self, doc: &DocId, parties: &[OrgId]) {
        for member in self.lock().values().filter(|m| parties.contains(&m.org)) {
            member.mailbox.post(doc);
        }
    }

    /// Asks one connection to close; returns whether it is registered.
    pub fn close_connection(&self, id: ConnectionId, reason: &str) -> bool {
        match self.lock().get(&id) {
            Some(member) => {
                member.mailbox.close(reason);
                true
            }
            None => false,
        }
    }

    /// Asks every connection to close (shutdown).
    pub fn close_all(&self, reason: &str) {
        for member in self.lock().values() {
            member.mailbox.close(reason);
        }
    }

    /// Asks every connection of `peer` to close; returns how many there were.
    pub fn close_peer(&self, peer: &str, reason: &str) -> usize {
        let members = self.lock();
        let matching: Vec<_> = members.values().filter(|m| m.peer == peer).collect();
        for member in &matching {
            member.mailbox.close(reason);
        }
        matching.len()
    }

    /// Asks the oldest connections of `peer` to close until at most `keep`
    /// remain (a node that restarted keeps its newest connection); returns how many.
    pub fn close_oldest(&self, peer: &str, keep: usize, reason: &str) -> usize {
        let members = self.lock();
        let mut ids: Vec<ConnectionId> = members
            .iter()
            .filter(|(_, m)| m.peer == peer && m.mailbox.close_reason().is_none())
            .map(|(id, _)| *id)
            .collect();
        ids.sort_unstable();
        let excess = ids.len().saturating_sub(keep);
        for id in &ids[..excess] {
            if let Some(member) = members.get(id) {
                member.mailbox.close(reason);
            }
        }
        excess
    }

    /// Tells every connection that the directory changed.
    pub fn directory_changed(&self) {
        for member in self.lock().values() {
            member.mailbox.directory_changed.store(true, Ordering::SeqCst);
            member.mailbox.notify.notify_one();
        }
    }

    /// The peers connected now, one entry per connection.
    pub fn peers(&self) -> Vec<String> {
        self.lock().values().map(|m| m.peer.clone()).collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ConnectionId, Member>> {
        self.members.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn org(id: &str) -> OrgId {
        OrgId::new(id).unwrap()
    }

    #[tokio::test]
    async fn changes_reach_every_other_connection_of_a_party_once_per_document() {
        let hub = Hub::default();
        let (a, mail_a) = hub.join("a", &org("flen-kommun"));
        let (_b, mail_b) = hub.join("b", &org("trosa-kommun"));
        let (c, mail_c) = hub.join("c", &org("gnesta-kommun"));
        let doc = DocId::random();
        for _ in 0..1000 {
            hub.changed(a, &doc, &[org("flen-kommun"), org("trosa-kommun")]);
        }
        tokio::time::timeout(std::time::Duration::from_secs(5), mail_b.changed()).await.unwrap();
        assert_eq!(mail_b.take().into_iter().collect::<Vec<_>>(), vec![doc]);
        assert!(mail_a.take().is_empty(), "the sender is not told of its own change");
        assert!(mail_c.take().is_empty(), "a connection of no party is not woken");
        hub.leave(a);
        hub.leave(c);
        assert_eq!(hub.peers(), vec!["b".to_string()]);
        let (_b2, mail_b2) = hub.join("b", &org("trosa-kommun"));
        assert_eq!(hub.close_oldest("b", 1, "replaced"), 1);
        assert_eq!(mail_b.close_reason().as_deref(), Some("replaced"));
        assert!(mail_b2.close_reason().is_none(), "the newest connection stays");
        assert_eq!(hub.close_peer("b", "revoked"), 2, "both connections still registered");
        assert_eq!(mail_b.close_reason().as_deref(), Some("replaced"), "the first reason stays");
        assert_eq!(mail_b2.close_reason().as_deref(), Some("revoked"));
    }
}
