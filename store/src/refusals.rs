//! Documents a node does not sync for now, and why: the relay refused them
//! (not shared with this node's organisation any more, or changes it will not
//! accept), as the relay's `DocRefused` frame said. The sync client records a
//! refusal when it arrives and clears it when the document syncs again; status,
//! list and recovery read it.

use automerge::ChangeHash;
use chrono::{DateTime, Utc};
use rusqlite::{params, OptionalExtension};
use samverkan_shared::ids::DocId;
use samverkan_shared::wire::RefusalKind;

use crate::{Store, StoreError};

/// One refused document, as recorded on the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocRefusal {
    /// The document.
    pub doc: DocId,
    /// Why, machine-readable.
    pub kind: RefusalKind,
    /// Why, for people (the relay's words).
    pub reason: String,
    /// This node's heads of the document when it was refused.
    pub local_heads: Vec<ChangeHash>,
    /// The relay's heads of the document then (empty when not shared).
    pub peer_heads: Vec<ChangeHash>,
    /// The highest sequence number of this node's own changes the relay held
    /// then: own changes up to it were accepted, later ones were not.
    pub your_seq: u64,
    /// When the refusal arrived.
    pub refused_at: DateTime<Utc>,
}

fn heads_text(heads: &[ChangeHash]) -> String {
    heads.iter().map(ToString::to_string).collect::<Vec<_>>().join(",")
}

fn parse_heads(doc: &DocId, text: &str) -> Result<Vec<ChangeHash>, StoreError> {
    text.split(',')
        .filter(|h| !h.is_empty())
        .map(|h| {
            h.parse::<ChangeHash>().map_err(|e| StoreError::CorruptDocument {
                id: doc.clone(),
                reason: format!("bad head {h:?} in its refusal record: {e}"),
            })
        })
        .collect()
}

type Row = (String, String, String, String, String, i64, String);

fn from_row((doc, kind, reason, local, peer, your_seq, at): Row) -> Result<Option<DocRefusal>, StoreError> {
    // A row naming no valid document is skipped: it cannot refer to anything stored.
    let Ok(doc) = doc.parse::<DocId>() else { return Ok(None) };
    let refused_at = DateTime::parse_from_rfc3339(&at)
        .map_err(|e| StoreError::CorruptDocument { id: doc.clone(), reason: format!("bad refusal time {at:?}: {e}") })?
        .with_timezone(&Utc);
    Ok(Some(DocRefusal {
        kind: RefusalKind::from_label(&kind),
        reason,
        local_heads: parse_heads(&doc, &local)?,
        peer_heads: parse_heads(&doc, &peer)?,
        your_seq: u64::try_from(your_seq).unwrap_or(0),
        refused_at,
        doc,
    }))
}

const COLUMNS: &str = "doc_id, kind, reason, local_heads, peer_heads, your_seq, refused_at";

impl Store {
    /// Records (or replaces) the refusal of a document.
    pub fn set_refusal(&mut self, refusal: &DocRefusal) -> Result<(), StoreError> {
        self.conn.execute(
            &format!(
                "INSERT INTO doc_refusals ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT(doc_id) DO UPDATE SET kind = excluded.kind, reason = excluded.reason,
                   local_heads = excluded.local_heads, peer_heads = excluded.peer_heads,
                   your_seq = excluded.your_seq, refused_at = excluded.refused_at"
            ),
            params![
                refusal.doc.as_str(),
                refusal.kind.label(),
                refusal.reason,
                heads_text(&refusal.local_heads),
                heads_text(&refusal.peer_heads),
                i64::try_from(refusal.your_seq).unwrap_or(i64::MAX),
                refusal.refused_at.to_rfc3339(),
            ],
        )?;
        Ok(())
    }

    /// The recorded refusal of a document, if any.
    pub fn refusal(&self, doc: &DocId) -> Result<Option<DocRefusal>, StoreError> {
        let mut stmt = self.conn.prepare_cached(&format!("SELECT {COLUMNS} FROM doc_refusals WHERE doc_id = ?1"))?;
        let row: Option<Row> = stmt
            .query_row([doc.as_str()], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?))
            })
            .optional()?;
        Ok(match row {
            Some(row) => from_row(row)?,
            None => None,
        })
    }

    /// Every recorded refusal, by document id.
    pub fn refusals(&self) -> Result<Vec<DocRefusal>, StoreError> {
        let mut stmt = self.conn.prepare_cached(&format!("SELECT {COLUMNS} FROM doc_refusals ORDER BY doc_id"))?;
        let rows =
            stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?)))?;
        let mut out = Vec::new();
        for row in rows {
            if let Some(refusal) = from_row(row?)? {
                out.push(refusal);
            }
        }
        Ok(out)
    }

    /// Forgets a document's refusal (it syncs again); returns whether there was one.
    pub fn clear_refusal(&mut self, doc: &DocId) -> Result<bool, StoreError> {
        Ok(self.conn.execute("DELETE FROM doc_refusals WHERE doc_id = ?1", [doc.as_str()])? > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_is_recorded_replaced_listed_and_cleared() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open_or_create(&dir.path().join("node.db")).unwrap();
        let doc = DocId::random();
        assert_eq!(store.refusal(&doc).unwrap(), None);
        let mut refusal = DocRefusal {
            doc: doc.clone(),
            kind: RefusalKind::ChangesRefused,
            reason: "en godkännare som återkallats".into(),
            local_heads: vec![ChangeHash([1; 32]), ChangeHash([2; 32])],
            peer_heads: vec![ChangeHash([3; 32])],
            your_seq: 7,
            refused_at: DateTime::parse_from_rfc3339("2026-12-01T10:00:00Z").unwrap().with_timezone(&Utc),
        };
        store.set_refusal(&refusal).unwrap();
        assert_eq!(store.refusal(&doc).unwrap().as_ref(), Some(&refusal));
        refusal.kind = RefusalKind::NotShared;
        refusal.peer_heads.clear();
        store.set_refusal(&refusal).unwrap();
        assert_eq!(store.refusals().unwrap(), vec![refusal]);
        assert!(store.clear_refusal(&doc).unwrap());
        assert!(!store.clear_refusal(&doc).unwrap());
        assert!(store.refusals().unwrap().is_empty());
    }
}
