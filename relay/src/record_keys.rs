//! The approval records each document version holds, remembered.
//!
//! The relay checks the approval records every accepted change adds
//! ([`approval::check_new_records`]) against the records of the version
//! before. Most sync steps only read (an outgoing message, a node's
//! acknowledgement), yet parsing a document's records for each one cost more
//! than the step itself; a version's records never change, so their keys are
//! parsed once per document version and kept here.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use automerge::ChangeHash;
use samverkan_shared::approval;
use samverkan_shared::ids::DocId;
use samverkan_shared::model::Document;

/// Documents remembered at most; past it the memo starts again from empty
/// (it is only a cache: a miss parses the records again).
const MAX_DOCUMENTS: usize = 100_000;

/// The keys of each document's approval records ([`approval::record_keys`]) at
/// the version last seen, by document.
#[derive(Debug, Default)]
pub struct RecordKeys {
    known: Mutex<HashMap<DocId, KeysAt>>,
}

/// The record keys of one document version.
#[derive(Debug)]
struct KeysAt {
    heads: Vec<ChangeHash>,
    keys: Arc<BTreeSet<String>>,
}

impl RecordKeys {
    /// The record keys of `doc` (stored as `id`) at its current version,
    /// parsed only if this version was not seen before.
    pub fn of(&self, id: &DocId, doc: &mut Document) -> Arc<BTreeSet<String>> {
        let heads = doc.heads();
        if let Some(known) = self.lock().get(id) {
            if known.heads == heads {
                return known.keys.clone();
            }
        }
        let keys = Arc::new(approval::record_keys(doc));
        self.remember(id, heads, keys.clone());
        keys
    }

    /// Remembers the record keys of `id` at `heads`.
    pub fn remember(&self, id: &DocId, heads: Vec<ChangeHash>, keys: Arc<BTreeSet<String>>) {
        let mut known = self.lock();
        if known.len() >= MAX_DOCUMENTS && !known.contains_key(id) {
            known.clear();
        }
        known.insert(id.clone(), KeysAt { heads, keys });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<DocId, KeysAt>> {
        self.known.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use chrono::Utc;
    use samverkan_shared::approval::{Action, ApprovalRecord};
    use samverkan_shared::identity::NodeKey;
    use samverkan_shared::model::{DocKind, DocumentContent, EditContext};
    use samverkan_shared::org::{Directory, OrgId};

    /// A new agreement of the County Board by a new author, with the author's
    /// edit context and the directory (for the relay's tests).
    pub(crate) fn agreement() -> (Document, EditContext, Directory) {
        let org = OrgId::new("lansstyrelsen-sodermanland").unwrap();
        let author = NodeKey::generate();
        let ctx = EditContext { author: author.node_id(), org: org.clone(), node_name: "Lst".into(), time: Utc::now() };
        let orgs = Directory::sodermanland();
        let mut content = DocumentContent::new(DocKind::Agreement, "Överenskommelse");
        content.parties = vec![org];
        let doc = Document::create(DocId::random(), content, &ctx, &orgs).unwrap();
        (doc, ctx, orgs)
    }

    #[test]
    fn a_version_is_parsed_once_and_a_new_version_again() {
        let (mut doc, ctx, orgs) = agreement();
        let org = ctx.org.clone();
        let id = doc.id().clone();
        let memo = RecordKeys::default();

        let first = memo.of(&id, &mut doc);
        assert!(first.is_empty());
        assert!(Arc::ptr_eq(&first, &memo.of(&id, &mut doc)), "the same version comes from the memo");

        let heads = doc.heads();
        let record =
            ApprovalRecord::sign(Action::Approve, &id, &heads, &NodeKey::generate(), org, "Landshövding", Utc::now())
                .unwrap();
        approval::append(&mut doc, &ctx, &orgs, &record).unwrap();
        let second = memo.of(&id, &mut doc);
        assert_eq!(*second, BTreeSet::from([record.signature.clone()]), "a new version is parsed again");
    }
}
