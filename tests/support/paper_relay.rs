//! A relay on paper for offline tests: a relay key and its signed enrollment
//! directory, handed to nodes as `join` and `sync` would, without a network.
//! Nodes that exchange only bundles still need to know whose changes count.

#![allow(dead_code)]

use chrono::Utc;
use samverkan::node::node::{Node, META_RELAY_KEY};
use samverkan::shared::directory::{EnrollmentDirectory, Member, MemberKind};
use samverkan::shared::identity::{NodeId, NodeKey};

/// A relay key and the directory it signs.
pub struct PaperRelay {
    key: NodeKey,
    directory: EnrollmentDirectory,
}

impl Default for PaperRelay {
    fn default() -> Self {
        Self { key: NodeKey::generate(), directory: EnrollmentDirectory::default() }
    }
}

impl PaperRelay {
    /// The relay's public key.
    pub fn key(&self) -> NodeId {
        self.key.node_id()
    }

    /// Enrolls `node` as a node of its organisation and gives it the relay key
    /// and the directory as it now stands (what `join` does).
    pub fn enroll(&mut self, node: &mut Node) {
        self.directory
            .enroll(Member {
                key: node.node_id(),
                kind: MemberKind::Node,
                org: node.org().clone(),
                name: node.name().to_string(),
                role: None,
                enrolled_at: Utc::now(),
                revoked_at: None,
            })
            .expect("enroll");
        self.hand_to(node);
    }

    /// Revokes a key (what `samverkan-relay revoke` does); nodes learn of it on [`Self::hand_to`].
    pub fn revoke(&mut self, key: &NodeId) {
        self.directory.revoke(key, Utc::now()).expect("revoke");
    }

    /// Pins this relay on `node` and gives it the current signed directory (what a sync does).
    pub fn hand_to(&self, node: &mut Node) {
        node.store_mut().set_meta(META_RELAY_KEY, &self.key.node_id().to_string()).expect("pin relay");
        let signed = self.directory.sign(self.key.signing_key()).encode();
        node.store_enrollment(&signed, &self.key.node_id()).expect("directory verifies");
    }
}
