//! Replacing a document's whole history in one transaction: what recovery
//! (`samverkan-node recover`) stores after the relay refused the document.
//! Ordinary edits and received changes never come here: they only append.

use std::collections::HashSet;

use automerge::ChangeHash;
use chrono::Utc;
use rusqlite::{params, TransactionBehavior};
use samverkan_shared::acceptance::{document_size, LimitError};
use samverkan_shared::ids::DocId;
use samverkan_shared::model::{Document, ModelError};

use crate::{join_heads, join_parties, load_in, write_snapshot, Borrow, Store, StoreError, UpdateOutcome};

impl Store {
    /// Replaces the history of the stored document `id` with the document `f`
    /// builds, in one `BEGIN IMMEDIATE` transaction. `f` gets the current
    /// version, read inside the transaction (so nothing another process wrote
    /// is missed, and nothing can be written meanwhile), and returns the new
    /// document and a value; its error aborts and leaves everything as it was.
    ///
    /// Keeps the store's invariants: the new history is written as one
    /// checksummed snapshot and the document's increments are dropped; its
    /// heads, title, kind, parties and size (`change_bytes`) are rewritten,
    /// every change not in the old history and the whole document checked
    /// against the content limits first; its snapshot generation goes up, so no
    /// process uses a cached copy of the old history again. In the same
    /// transaction the document's sync states with every peer are dropped (they
    /// describe the old history: the next sync starts afresh) and its refusal
    /// record is cleared. Change signatures and approval receipts stay, so the
    /// changes kept keep their proof.
    pub fn replace_document<T, E>(
        &mut self,
        id: &DocId,
        f: impl FnOnce(&mut Document) -> Result<(Document, T), E>,
    ) -> Result<(T, UpdateOutcome), E>
    where
        E: From<StoreError>,
    {
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(StoreError::from)?;
        let loaded = load_in(&tx, &self.cache, id, Borrow::Take)?.ok_or_else(|| StoreError::NotFound(id.clone()))?;
        let (mut old, lease) = (loaded.doc, loaded.lease);
        let (mut doc, value) = f(&mut old)?;
        if doc.id() != id {
            let found = doc.id().to_string();
            return Err(StoreError::from(ModelError::WrongDocument { expected: id.clone(), found }).into());
        }
        doc.check_header().map_err(StoreError::from)?;
        let old_changes: HashSet<ChangeHash> =
            old.automerge_mut().get_changes_meta(&[]).into_iter().map(|m| m.hash).collect();
        for change in doc.automerge_mut().get_changes(&[]) {
            let size = change.raw_bytes().len() as u64;
            if !old_changes.contains(&change.hash()) && size > self.limits.max_change_bytes {
                let max = self.limits.max_change_bytes;
                return Err(StoreError::from(LimitError::ChangeTooLarge {
                    doc: id.clone(),
                    hash: change.hash(),
                    size,
                    max,
                })
                .into());
            }
        }
        let size = document_size(doc.automerge_mut());
        if size > self.limits.max_document_bytes {
            let max = self.limits.max_document_bytes;
            return Err(StoreError::from(LimitError::DocumentTooLarge { doc: id.clone(), size, max }).into());
        }
        let heads = doc.heads();
        let kind = doc.kind().map_err(StoreError::from)?;
        let title = doc.title().map_err(StoreError::from)?;
        let parties = join_parties(&doc.parties().map_err(StoreError::from)?);
        let generation = write_snapshot(&tx, id, &mut doc, self.keep_tips)?;
        let snapshot_bytes: i64 = tx
            .query_row("SELECT length(data) FROM snapshots WHERE doc_id = ?1", [id.as_str()], |r| r.get(0))
            .map_err(StoreError::from)?;
        tx.execute(
            "UPDATE documents SET kind = ?2, title = ?3, heads = ?4, updated_at = ?5, parties = ?6, change_bytes = ?7
             WHERE doc_id = ?1",
            params![
                id.as_str(),
                kind.as_str(),
                title,
                join_heads(&heads),
                Utc::now().to_rfc3339(),
                parties,
                size as i64
            ],
        )
        .map_err(StoreError::from)?;
        tx.execute("DELETE FROM sync_states WHERE doc_id = ?1", [id.as_str()]).map_err(StoreError::from)?;
        tx.execute("DELETE FROM doc_refusals WHERE doc_id = ?1", [id.as_str()]).map_err(StoreError::from)?;
        tx.commit().map_err(StoreError::from)?;
        tracing::info!(doc = %id, generation, bytes = snapshot_bytes, "replaced the document's history");
        // No increments are left: the next ones appended have higher row numbers than any before.
        self.cache.put(doc, generation, 0, lease);
        Ok((value, UpdateOutcome { new_bytes: snapshot_bytes.max(0) as usize, heads, created: false }))
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;
    use samverkan_shared::identity::NodeKey;
    use samverkan_shared::model::{DocKind, DocumentContent, EditContext};
    use samverkan_shared::org::{Directory, OrgId};
    use samverkan_shared::wire::RefusalKind;

    use super::*;
    use crate::DocRefusal;

    fn ctx() -> EditContext {
        EditContext {
            author: NodeKey::generate().node_id(),
            org: OrgId::new("flen-kommun").unwrap(),
            node_name: "Flen".into(),
            time: Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap(),
        }
    }

    #[test]
    fn replacing_a_history_is_atomic_invalidates_other_processes_caches_and_drops_sync_state_and_refusal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.db");
        let (ctx, directory) = (ctx(), Directory::sodermanland());
        let mut doc = Document::create(
            DocId::random(),
            DocumentContent::new(DocKind::CitizenPromise, "Medborgarlöfte Flen"),
            &ctx,
            &directory,
        )
        .unwrap();
        let id = doc.id().clone();
        let mut store = Store::open_or_create(&path).unwrap();
        store.insert(&mut doc).unwrap();
        let (_, first) = store
            .update(&id, false, |d| {
                d.edit(&ctx, &directory, "a", |e| e.set_place(Some("Flen"))).map_err(StoreError::from)
            })
            .unwrap();
        store
            .update(&id, false, |d| d.edit(&ctx, &directory, "b", |e| e.set_body("refused")).map_err(StoreError::from))
            .unwrap();
        store.save_sync_states("relay:x", [(id.clone(), vec![1, 2, 3])]).unwrap();
        store
            .set_refusal(&DocRefusal {
                doc: id.clone(),
                kind: RefusalKind::ChangesRefused,
                reason: "no".into(),
                local_heads: Vec::new(),
                peer_heads: Vec::new(),
                your_seq: 2,
                refused_at: Utc::now(),
            })
            .unwrap();
        // Another process has the document cached.
        let other = Store::open(&path).unwrap();
        assert_eq!(other.load(&id).unwrap().view().unwrap().body, "refused");

        // A failing replacement changes nothing.
        let failed: Result<((), _), StoreError> =
            store.replace_document(&id, |_| Err(StoreError::NotFound(id.clone())));
        assert!(failed.is_err());
        assert!(store.refusal(&id).unwrap().is_some());

        // A replacement keeps what it is given: here the history up to the first edit, plus a new change.
        let (_, outcome) = store
            .replace_document(&id, |current| -> Result<_, StoreError> {
                let mut fork = current.at(&first.heads)?;
                fork.edit(&ctx, &directory, "c", |e| e.set_body("återställd"))?;
                Ok((fork, ()))
            })
            .unwrap();
        assert_eq!(store.increment_rows(&id).unwrap(), 0);
        assert!(store.refusal(&id).unwrap().is_none());
        assert!(store.sync_states("relay:x").unwrap().is_empty());
        let summary = store.summary(&id).unwrap().unwrap();
        assert_eq!(summary.head_hashes().unwrap(), outcome.heads);
        for store in [&store, &other, &Store::open(&path).unwrap()] {
            let mut loaded = store.load(&id).unwrap();
            assert_eq!(loaded.view().unwrap().body, "återställd");
            assert_eq!(loaded.view().unwrap().place.as_deref(), Some("Flen"));
            assert_eq!(loaded.heads(), outcome.heads);
            assert_eq!(loaded.change_count(), 3);
        }
        let size: i64 = store.conn.query_row("SELECT change_bytes FROM documents", [], |r| r.get(0)).unwrap();
        assert_eq!(size as u64, document_size(store.load(&id).unwrap().automerge_mut()));
        // Edits append to the replaced history as usual, seen by the other process too.
        store
            .update(&id, false, |d| {
                d.edit(&ctx, &directory, "d", |e| e.set_place(Some("Malmköping"))).map_err(StoreError::from)
            })
            .unwrap();
        assert_eq!(other.load(&id).unwrap().view().unwrap().place.as_deref(), Some("Malmköping"));
        assert!(store.check().unwrap().is_empty());
    }

    #[test]
    fn a_replacement_over_the_limits_or_of_another_document_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (ctx, directory) = (ctx(), Directory::sodermanland());
        let mut store = Store::open_or_create(&dir.path().join("node.db")).unwrap();
        let make = |title: &str| {
            Document::create(DocId::random(), DocumentContent::new(DocKind::Agreement, title), &ctx, &directory)
                .unwrap()
        };
        let mut doc = make("Överenskommelse");
        let id = doc.id().clone();
        store.insert(&mut doc).unwrap();
        let other = make("En annan");
        let err = store.replace_document(&id, |_| Ok::<_, StoreError>((other.clone(), ()))).unwrap_err();
        assert!(matches!(err, StoreError::Model(ModelError::WrongDocument { .. })), "{err}");
        store.set_content_limits(samverkan_shared::acceptance::ContentLimits {
            max_change_bytes: 256,
            max_document_bytes: 1 << 20,
        });
        let err = store
            .replace_document(&id, |current| -> Result<_, StoreError> {
                let mut fork = current.clone();
                fork.edit(&ctx, &directory, "big", |e| e.set_body(&"x".repeat(2000)))?;
                Ok((fork, ()))
            })
            .unwrap_err();
        assert!(matches!(err, StoreError::TooLarge(LimitError::ChangeTooLarge { .. })), "{err}");
        assert_eq!(store.load(&id).unwrap().view().unwrap().body, "");
    }
}
