//! A document's stored bytes, read to send it whole without loading it
//! ([`StoredWhole`]): the relay's cold sync of a fresh node.

use rusqlite::OptionalExtension;
use samverkan_shared::ids::DocId;
use samverkan_shared::sync::StoredWhole;

use crate::{for_checked_rows, sha256, Store, StoreError};

/// A snapshot row: its data, checksum and author tips (NULL if written before schema 8).
type StoredSnapshot = (Vec<u8>, Vec<u8>, Option<Vec<u8>>);

/// A snapshot's checksum and its authors' tips, encoded ([`Store::tips_for_snapshot`]).
pub type SnapshotTips = (Vec<u8>, Vec<u8>);

impl Store {
    /// The document's snapshot and increments as stored, its heads and the
    /// author tips covering them, in one read snapshot, without loading it.
    /// `Ok(None)` when it is not stored, or its snapshot was written before
    /// tips were kept beside it (until its next compaction), or an increment
    /// does not parse: the caller then loads it as before. A blob that does
    /// not match its checksum is an error, as on load.
    pub fn stored_whole(&self, id: &DocId) -> Result<Option<StoredWhole>, StoreError> {
        let tx = self.conn.unchecked_transaction()?; // Deferred: one read snapshot, no write lock.
        let Some(heads) = self.doc_heads(id)? else { return Ok(None) };
        let snapshot: Option<StoredSnapshot> = tx
            .prepare_cached("SELECT data, sha256, tips FROM snapshots WHERE doc_id = ?1")?
            .query_row([id.as_str()], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .optional()?;
        let Some((data, sum, Some(tips))) = snapshot else { return Ok(None) };
        let corrupt = |reason: String| StoreError::CorruptDocument { id: id.clone(), reason };
        if sum != sha256(&data) {
            return Err(corrupt("the snapshot does not match its checksum".into()));
        }
        let mut increments = Vec::new();
        for_checked_rows(&tx, id, 0, |_, data| {
            increments.push(data);
            Ok(())
        })?;
        Ok(StoredWhole::from_stored(heads, data, &tips, increments))
    }
}

/// The metadata key that says snapshots written before schema 8 still need
/// their tips worked out (set by migration 8 on a database that held
/// snapshots; removed once they are, [`Store::snapshot_tips_worked_out`]).
pub const META_SNAPSHOT_TIPS: &str = "snapshot_tips";

impl Store {
    /// Whether snapshots written before schema 8 may still lack their tips.
    pub fn snapshot_tips_pending(&self) -> Result<bool, StoreError> {
        Ok(self.meta(META_SNAPSHOT_TIPS)?.is_some())
    }

    /// Records that the snapshots' tips were worked out (those that could be).
    pub fn snapshot_tips_worked_out(&mut self) -> Result<(), StoreError> {
        self.conn.execute("DELETE FROM meta WHERE key = ?1", [META_SNAPSHOT_TIPS])?;
        Ok(())
    }

    /// Documents whose snapshot has no author tips (see
    /// [`Self::tips_for_snapshot`]). Reads every snapshot (the tips come
    /// after the blob in the row), with the page cache held small.
    pub fn snapshots_without_tips(&self) -> Result<Vec<DocId>, StoreError> {
        self.with_scan_cache(|| {
            let mut stmt = self.conn.prepare("SELECT doc_id FROM snapshots WHERE tips IS NULL")?;
            let ids = stmt.query_map([], |r| r.get::<_, String>(0))?;
            let mut out = Vec::new();
            for id in ids {
                // An id that does not parse is left to loading, which reports it.
                if let Ok(id) = id?.parse::<DocId>() {
                    out.push(id);
                }
            }
            Ok(out)
        })
    }

    /// The author tips of a document's snapshot that has none yet, worked out
    /// by loading the snapshot alone, with the snapshot's checksum (to store
    /// them only beside that snapshot, [`Self::keep_snapshot_tips`]). `None`
    /// when it has tips already or is gone; a damaged snapshot is an error.
    pub fn tips_for_snapshot(&self, id: &DocId) -> Result<Option<SnapshotTips>, StoreError> {
        let row: Option<(Vec<u8>, Vec<u8>)> = self
            .conn
            .prepare_cached("SELECT data, sha256 FROM snapshots WHERE doc_id = ?1 AND tips IS NULL")?
            .query_row([id.as_str()], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        let Some((data, sum)) = row else { return Ok(None) };
        let corrupt = |reason: String| StoreError::CorruptDocument { id: id.clone(), reason };
        if sum != sha256(&data) {
            return Err(corrupt("the snapshot does not match its checksum".into()));
        }
        let mut doc = automerge::AutoCommit::load(&data).map_err(|e| corrupt(format!("snapshot: {e}")))?;
        Ok(Some((sum, crate::snapshot_tips(&mut doc))))
    }

    /// Keeps `tips` beside the document's snapshot if it is still the one
    /// with checksum `sha256` and has none; whether they were kept.
    pub fn keep_snapshot_tips(&self, id: &DocId, sha256: &[u8], tips: &[u8]) -> Result<bool, StoreError> {
        let changed = self.conn.execute(
            "UPDATE snapshots SET tips = ?3 WHERE doc_id = ?1 AND sha256 = ?2 AND tips IS NULL",
            rusqlite::params![id.as_str(), sha256, tips],
        )?;
        Ok(changed == 1)
    }
}

#[cfg(test)]
mod tests {
    use automerge::AutoCommit;
    use samverkan_shared::model::{DocKind, Document, DocumentContent};
    use samverkan_shared::org::Directory;
    use samverkan_shared::sync::document_tips;

    use super::*;
    use crate::tests::ctx_for as ctx;

    /// What `stored_whole` gives loads into the document as stored, and its
    /// tips cover every author's tip; a snapshot from before schema 8 (no
    /// tips) is left to loading, and a damaged blob is an error, as on load.
    #[test]
    fn a_stored_document_reads_back_whole_with_tips_covering_every_author() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open_or_create(&dir.path().join("relay.db")).unwrap();
        store.keep_snapshot_tips_on_write(true); // As the relay's store does; a node's keeps none.
        assert!(!store.snapshot_tips_pending().unwrap(), "a new database has nothing to work out");
        let (trosa, police) = (ctx("trosa-kommun"), ctx("polisomrade-sodermanland"));
        let directory = Directory::sodermanland();
        let mut doc = Document::create(
            DocId::random(),
            DocumentContent::new(DocKind::CitizenPromise, "Medborgarlöfte Trosa"),
            &trosa,
            &directory,
        )
        .unwrap();
        store.insert(&mut doc).unwrap();
        let id = doc.id().clone();
        let first = store.stored_whole(&id).unwrap().unwrap();
        assert_eq!(first.chunks.len(), 1, "a new document is one snapshot");
        for (n, who) in [&police, &trosa, &police].into_iter().enumerate() {
            store
                .update(&id, false, |d| {
                    d.edit(who, &directory, "title", |e| e.set_title(&format!("Medborgarlöfte {n}")))
                        .map_err(StoreError::from)
                })
                .unwrap();
        }
        let whole = store.stored_whole(&id).unwrap().unwrap();
        let mut stored = store.load(&id).unwrap();
        assert_eq!(whole.chunks.len(), 4, "the snapshot and three increments");
        assert_eq!(whole.heads, stored.heads());
        assert_eq!(
            store.heads().unwrap(),
            vec![(id.clone(), stored.heads())],
            "every document's heads, as the daemon reads them"
        );
        let mut read = AutoCommit::load(&whole.chunks.concat()).unwrap();
        assert_eq!(read.get_heads(), stored.heads());
        for tip in document_tips(stored.automerge_mut()) {
            assert!(whole.tips.contains(&tip), "{tip:?} is not covered");
        }
        assert_eq!(document_tips(&mut read).len(), 2, "two authors");

        store.compact(&id).unwrap();
        let compacted = store.stored_whole(&id).unwrap().unwrap();
        assert_eq!((compacted.chunks.len(), &compacted.heads), (1, &whole.heads), "compacted: one snapshot, with tips");

        // A node's store keeps no tips: nothing is offered whole from it.
        store.keep_snapshot_tips_on_write(false);
        store.compact(&id).unwrap();
        assert_eq!(store.stored_whole(&id).unwrap(), None);
        store.keep_snapshot_tips_on_write(true);
        store.compact(&id).unwrap();

        store.conn.execute("UPDATE snapshots SET tips = NULL", []).unwrap();
        assert_eq!(store.stored_whole(&id).unwrap(), None, "written before tips were kept: loaded instead");
        store.conn.execute("UPDATE snapshots SET tips = x'00', sha256 = x'00'", []).unwrap();
        assert!(matches!(store.stored_whole(&id), Err(StoreError::CorruptDocument { .. })));
        assert_eq!(store.stored_whole(&DocId::random()).unwrap(), None);
    }
}
