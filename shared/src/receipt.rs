//! Approval receipts: the relay's signed statement of *when it first received*
//! an approval or withdrawal record.
//!
//! A record's `signed_at` is the signer's claim. A stolen key, after its
//! revocation, could sign records dated before the revocation, and a node that
//! receives them by offline bundle could not tell. So a record counts only
//! with a receipt: the relay, when it accepts a new record (see
//! [`crate::approval::check_new_records`]), signs
//!
//! ```text
//! samverkan-approval-receipt-v1\0
//! ‖ doc id (32 lowercase hex digits, ASCII)
//! ‖ the record's ed25519 signature (64 raw bytes)
//! ‖ received_at (UTC, RFC 3339 with milliseconds and Z, ASCII)
//! ```
//!
//! with its own key. The doc id and the record signature have fixed lengths,
//! so the concatenation is unambiguous; the record signature names exactly one
//! record (it signs the doc id, heads, signer, organisation, role and time).
//! Verifiers (nodes, `verify-bundle`) then judge the signer's enrollment at
//! `received_at` instead of the claimed time, and refuse a `signed_at` later
//! than `received_at` plus [`crate::approval::MAX_CLOCK_SKEW`]. A relay issues
//! a record's receipt once, at the time it first holds the record, never
//! earlier.
//!
//! Pure: keys and times are passed in.

use std::collections::BTreeMap;

use chrono::{DateTime, SecondsFormat, Utc};
use ed25519_dalek::{Signature, Signer};
use serde::{Deserialize, Serialize};

use crate::identity::{NodeId, NodeKey};
use crate::ids::DocId;
use crate::wire::ReceiptEntry;

/// Domain separation: the first bytes of every signed receipt.
pub const RECEIPT_CONTEXT: &[u8] = b"samverkan-approval-receipt-v1\0";

/// Why a receipt is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReceiptProblem {
    /// A field is not of the expected form (hex of the right length).
    #[error("malformed receipt: {0}")]
    Malformed(&'static str),
    /// The relay's signature does not verify with the pinned relay key.
    #[error("the receipt's relay signature does not verify with relay key {0} (forged, altered, or moved to another record or document)")]
    BadSignature(String),
}

/// The relay's signed statement that it first received record
/// `record_signature` of document `doc` at `received_at`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApprovalReceipt {
    /// The document the record sits in.
    pub doc: DocId,
    /// The record's signature (hex, as in the record): names the record.
    pub record_signature: String,
    /// When the relay first received the record (UTC, milliseconds).
    pub received_at: DateTime<Utc>,
    /// The relay's ed25519 signature over [`ApprovalReceipt::message`], hex.
    pub relay_signature: String,
}

fn hex64(text: &str, what: &'static str) -> Result<[u8; 64], ReceiptProblem> {
    if text.len() != 128 || text.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(ReceiptProblem::Malformed(what));
    }
    hex::decode(text).ok().and_then(|b| b.try_into().ok()).ok_or(ReceiptProblem::Malformed(what))
}

fn millis(at: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(at.timestamp_millis()).unwrap_or(at)
}

impl ApprovalReceipt {
    /// Issues the receipt of record `record_signature` (hex) of `doc`, received
    /// at `received_at` (kept to the millisecond), signed with the relay's key.
    pub fn issue(
        relay: &NodeKey,
        doc: &DocId,
        record_signature: &str,
        received_at: DateTime<Utc>,
    ) -> Result<Self, ReceiptProblem> {
        hex64(record_signature, "record signature")?;
        let mut receipt = Self {
            doc: doc.clone(),
            record_signature: record_signature.to_string(),
            received_at: millis(received_at),
            relay_signature: String::new(),
        };
        let message = receipt.message()?;
        receipt.relay_signature = hex::encode(relay.signing_key().sign(&message).to_bytes());
        Ok(receipt)
    }

    /// The signed message (see the module docs).
    pub fn message(&self) -> Result<Vec<u8>, ReceiptProblem> {
        let record = hex64(&self.record_signature, "record signature")?;
        let mut message = RECEIPT_CONTEXT.to_vec();
        message.extend_from_slice(self.doc.as_str().as_bytes());
        message.extend_from_slice(&record);
        message.extend_from_slice(self.received_at.to_rfc3339_opts(SecondsFormat::Millis, true).as_bytes());
        Ok(message)
    }

    /// Strict ed25519 verification with the relay's key.
    pub fn verify(&self, relay: &NodeId) -> Result<(), ReceiptProblem> {
        if millis(self.received_at) != self.received_at {
            return Err(ReceiptProblem::Malformed("received_at finer than milliseconds"));
        }
        let signature = hex64(&self.relay_signature, "relay signature")?;
        relay
            .verifying_key()
            .verify_strict(&self.message()?, &Signature::from_bytes(&signature))
            .map_err(|_| ReceiptProblem::BadSignature(relay.short()))
    }

    /// The receipt as a wire entry (`None` if a field is malformed).
    pub fn to_wire(&self) -> Option<ReceiptEntry> {
        Some(ReceiptEntry {
            record: hex64(&self.record_signature, "record signature").ok()?,
            received_at_ms: self.received_at.timestamp_millis(),
            relay_signature: hex64(&self.relay_signature, "relay signature").ok()?,
        })
    }

    /// The receipt of a wire entry of document `doc` (not verified).
    pub fn from_wire(doc: &DocId, entry: &ReceiptEntry) -> Result<Self, ReceiptProblem> {
        let received_at = DateTime::from_timestamp_millis(entry.received_at_ms)
            .ok_or(ReceiptProblem::Malformed("received_at out of range"))?;
        Ok(Self {
            doc: doc.clone(),
            record_signature: hex::encode(entry.record),
            received_at,
            relay_signature: hex::encode(entry.relay_signature),
        })
    }
}

/// The verified receipts of one relay, by document and record: what
/// [`crate::approval::approval_status`] consults. Only receipts that verify
/// with the relay key get in; for a record with several, the earliest counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipts {
    relay: Option<NodeId>,
    by_record: BTreeMap<(DocId, String), ApprovalReceipt>,
}

impl Receipts {
    /// An empty book for receipts of `relay`.
    pub fn new(relay: NodeId) -> Self {
        Self { relay: Some(relay), by_record: BTreeMap::new() }
    }

    /// A book that accepts nothing (no relay pinned yet): no record counts.
    pub fn none() -> Self {
        Self { relay: None, by_record: BTreeMap::new() }
    }

    /// The relay whose receipts count.
    pub fn relay(&self) -> Option<&NodeId> {
        self.relay.as_ref()
    }

    /// Verifies and adds a receipt; returns whether it is new or earlier than the one held.
    pub fn insert(&mut self, receipt: ApprovalReceipt) -> Result<bool, ReceiptProblem> {
        let Some(relay) = &self.relay else {
            return Err(ReceiptProblem::BadSignature("(no relay pinned)".into()));
        };
        receipt.verify(relay)?;
        let key = (receipt.doc.clone(), receipt.record_signature.clone());
        match self.by_record.get(&key) {
            Some(held) if held.received_at <= receipt.received_at => Ok(false),
            _ => {
                self.by_record.insert(key, receipt);
                Ok(true)
            }
        }
    }

    /// Adds every receipt that verifies; returns the problems of those that do not.
    pub fn extend(&mut self, receipts: impl IntoIterator<Item = ApprovalReceipt>) -> Vec<ReceiptProblem> {
        receipts.into_iter().filter_map(|r| self.insert(r).err()).collect()
    }

    /// The verified receipt of record `record_signature` of `doc`.
    pub fn get(&self, doc: &DocId, record_signature: &str) -> Option<&ApprovalReceipt> {
        self.by_record.get(&(doc.clone(), record_signature.to_string()))
    }

    /// Every receipt held of `doc`.
    pub fn of_doc<'a>(&'a self, doc: &'a DocId) -> impl Iterator<Item = &'a ApprovalReceipt> + 'a {
        self.by_record.iter().filter(move |((d, _), _)| d == doc).map(|(_, r)| r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        text.parse().unwrap()
    }

    fn record_sig(n: u8) -> String {
        hex::encode([n; 64])
    }

    #[test]
    fn a_receipt_verifies_only_with_its_relay_for_its_record_and_document() {
        let relay = NodeKey::generate();
        let doc = DocId::random();
        let receipt = ApprovalReceipt::issue(&relay, &doc, &record_sig(1), at("2025-03-01T10:00:00.123456Z")).unwrap();
        assert_eq!(receipt.received_at, at("2025-03-01T10:00:00.123Z"), "kept to the millisecond");
        receipt.verify(&relay.node_id()).unwrap();
        let message = receipt.message().unwrap();
        assert!(message.starts_with(RECEIPT_CONTEXT));
        assert!(message.ends_with(b"2025-03-01T10:00:00.123Z"));

        // Another relay key.
        let stranger = NodeKey::generate().node_id();
        assert!(matches!(receipt.verify(&stranger), Err(ReceiptProblem::BadSignature(_))));
        // Moved to another record, another document, another time.
        let mut moved = receipt.clone();
        moved.record_signature = record_sig(2);
        assert!(moved.verify(&relay.node_id()).is_err());
        let mut moved = receipt.clone();
        moved.doc = DocId::random();
        assert!(moved.verify(&relay.node_id()).is_err());
        let mut earlier = receipt.clone();
        earlier.received_at -= chrono::Duration::days(30);
        assert!(earlier.verify(&relay.node_id()).is_err());
        // Forged: any flipped byte of the relay signature, or malformed hex.
        for at in [0, 63, 127] {
            let mut forged = receipt.clone();
            let mut bytes = forged.relay_signature.into_bytes();
            bytes[at] = if bytes[at] == b'0' { b'1' } else { b'0' };
            forged.relay_signature = String::from_utf8(bytes).unwrap();
            assert!(forged.verify(&relay.node_id()).is_err(), "flipped hex digit {at}");
        }
        let mut forged = receipt.clone();
        forged.relay_signature = forged.relay_signature.to_uppercase();
        assert!(matches!(forged.verify(&relay.node_id()), Err(ReceiptProblem::Malformed(_))));
        let mut forged = receipt.clone();
        forged.received_at += chrono::Duration::microseconds(1);
        assert!(forged.verify(&relay.node_id()).is_err());
        assert!(ApprovalReceipt::issue(&relay, &doc, "abcd", Utc::now()).is_err());
    }

    #[test]
    fn receipts_round_trip_through_the_wire_and_json() {
        let relay = NodeKey::generate();
        let doc = DocId::random();
        let receipt = ApprovalReceipt::issue(&relay, &doc, &record_sig(7), at("2025-03-01T10:00:00.5Z")).unwrap();
        let back = ApprovalReceipt::from_wire(&doc, &receipt.to_wire().unwrap()).unwrap();
        assert_eq!(back, receipt);
        let json = serde_json::to_string(&receipt).unwrap();
        assert_eq!(serde_json::from_str::<ApprovalReceipt>(&json).unwrap(), receipt);
        let entry = ReceiptEntry { record: [0; 64], received_at_ms: i64::MAX, relay_signature: [0; 64] };
        assert!(ApprovalReceipt::from_wire(&doc, &entry).is_err());
    }

    #[test]
    fn the_book_keeps_only_verified_receipts_and_the_earliest_per_record() {
        let relay = NodeKey::generate();
        let doc = DocId::random();
        let mut book = Receipts::new(relay.node_id());
        let late = ApprovalReceipt::issue(&relay, &doc, &record_sig(1), at("2025-03-02T00:00:00Z")).unwrap();
        let early = ApprovalReceipt::issue(&relay, &doc, &record_sig(1), at("2025-03-01T00:00:00Z")).unwrap();
        assert!(book.insert(late).unwrap());
        assert!(book.insert(early.clone()).unwrap());
        assert_eq!(book.get(&doc, &record_sig(1)), Some(&early));
        let foreign = ApprovalReceipt::issue(&NodeKey::generate(), &doc, &record_sig(2), Utc::now()).unwrap();
        assert_eq!(book.extend([foreign]).len(), 1);
        assert!(book.get(&doc, &record_sig(2)).is_none());
        assert_eq!(book.of_doc(&doc).count(), 1);
        assert!(Receipts::none().insert(early).is_err());
    }
}
