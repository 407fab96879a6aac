//! The offline bundle: Automerge changes carried between nodes on a file (a USB
//! stick, an e-mail attachment) when there is no network.
//!
//! Layout (all integers big-endian):
//!
//! ```text
//! magic    8 bytes  "SVKBNDL\0"
//! version  1 byte   2 (1: before batch signatures; read the same way)
//! hdr_len  4 bytes  length of the JSON header
//! header   hdr_len  JSON: who made it, when, and each document's id and byte length
//! data     …        the documents' change bytes, in header order
//! sha256   32 bytes over everything before it
//! ```
//!
//! A bundle is checked whole (magic, version, lengths, checksum) before any of
//! it is used, so a truncated or altered file is refused with a clear error.
//! A [`HeadsSummary`] is the small file a receiving node hands back so that the
//! next bundle carries only the changes it lacks.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::identity::NodeId;
use crate::ids::DocId;
use crate::org::OrgId;

const MAGIC: &[u8; 8] = b"SVKBNDL\0";
const VERSION: u8 = 2;
/// Bundles made before batch signatures: the same layout, every change signed
/// on its own (still accepted: see [`crate::authorship`]).
const VERSION_PER_CHANGE_SIGNATURES: u8 = 1;
const CHECKSUM_LEN: usize = 32;
/// Largest JSON header accepted.
pub const MAX_HEADER_LEN: usize = 4 * 1024 * 1024;

/// Errors decoding a bundle or a heads summary.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// Not a bundle at all.
    #[error("not a Samverkan bundle (wrong magic bytes)")]
    NotABundle,
    /// A newer bundle version.
    #[error("bundle version {0} is not supported by this program (it reads versions {VERSION_PER_CHANGE_SIGNATURES} to {VERSION})")]
    UnsupportedVersion(u8),
    /// The file ends early or its lengths do not add up.
    #[error("the bundle is truncated or its lengths are inconsistent: {0}")]
    Truncated(String),
    /// The checksum does not match: the file was altered or damaged.
    #[error("the bundle is damaged: its checksum does not match its contents")]
    ChecksumMismatch,
    /// The header is not valid JSON of the expected shape.
    #[error("the bundle header is malformed: {0}")]
    Header(String),
    /// A heads summary file is malformed.
    #[error("the heads summary is malformed: {0}")]
    Summary(String),
}

/// Who made a bundle and when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleOrigin {
    /// The exporting node's id (hex public key).
    pub node: String,
    /// Its organisation id.
    pub org: String,
    /// Its display name.
    pub name: String,
    /// When the bundle was made.
    pub created: DateTime<Utc>,
}

/// One document's changes in a bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleDoc {
    /// The document.
    pub id: DocId,
    /// Automerge bytes: a full save or the changes after the receiver's heads.
    pub data: Vec<u8>,
    /// The authors' signatures proving the changes in `data`: per author, its
    /// latest changes there (or, in version 1 bundles, every change), bound to
    /// the document (see [`crate::authorship`]).
    pub signatures: Vec<(automerge::ChangeHash, crate::authorship::ChangeSignature)>,
}

/// A decoded bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bundle {
    /// Who made it.
    pub origin: BundleOrigin,
    /// The relay the exporting node pinned: a node imports only bundles made
    /// under its own relay, whose enrollment directory decides whose changes count.
    pub relay_key: Option<NodeId>,
    /// The exporting node's copy of that relay's signed enrollment directory
    /// ([`crate::directory::SignedDirectory`] bytes), so a receiver whose copy is
    /// older learns of newly enrolled authors (it verifies it with its pinned key).
    pub directory: Option<Vec<u8>>,
    /// The documents.
    pub docs: Vec<BundleDoc>,
    /// The relay's receipts of the approval records of these documents (see
    /// [`crate::receipt`]); the importer verifies them with its pinned relay key.
    pub receipts: Vec<crate::receipt::ApprovalReceipt>,
}

#[derive(Serialize, Deserialize)]
struct Header {
    origin: BundleOrigin,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    relay_key: Option<NodeId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    directory: Option<String>,
    docs: Vec<HeaderDoc>,
    /// Absent in bundles made before receipts existed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    receipts: Vec<crate::receipt::ApprovalReceipt>,
}

#[derive(Serialize, Deserialize)]
struct HeaderDoc {
    id: DocId,
    len: u64,
    /// Change hash (hex) → the author's signature (hex).
    #[serde(default)]
    signatures: BTreeMap<String, String>,
}

impl Bundle {
    /// The bundle as bytes.
    pub fn encode(&self) -> Vec<u8> {
        let header = Header {
            origin: self.origin.clone(),
            relay_key: self.relay_key,
            directory: self.directory.as_ref().map(|d| String::from_utf8_lossy(d).into_owned()),
            docs: self
                .docs
                .iter()
                .map(|d| HeaderDoc {
                    id: d.id.clone(),
                    len: d.data.len() as u64,
                    signatures: d.signatures.iter().map(|(h, s)| (h.to_string(), hex::encode(s))).collect(),
                })
                .collect(),
            receipts: self.receipts.clone(),
        };
        let header = serde_json::to_vec(&header).unwrap_or_default();
        let mut out = Vec::with_capacity(
            MAGIC.len() + 5 + header.len() + self.docs.iter().map(|d| d.data.len()).sum::<usize>() + CHECKSUM_LEN,
        );
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        out.extend_from_slice(&(header.len() as u32).to_be_bytes());
        out.extend_from_slice(&header);
        for d in &self.docs {
            out.extend_from_slice(&d.data);
        }
        let sum = Sha256::digest(&out);
        out.extend_from_slice(&sum);
        out
    }

    /// Reads and checks a bundle.
    pub fn decode(bytes: &[u8]) -> Result<Self, BundleError> {
        if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
            return Err(BundleError::NotABundle);
        }
        if bytes.len() < MAGIC.len() + 5 + CHECKSUM_LEN {
            return Err(BundleError::Truncated(format!("only {} bytes", bytes.len())));
        }
        let version = bytes[MAGIC.len()];
        if version != VERSION && version != VERSION_PER_CHANGE_SIGNATURES {
            return Err(BundleError::UnsupportedVersion(version));
        }
        let (content, sum) = bytes.split_at(bytes.len() - CHECKSUM_LEN);
        if Sha256::digest(content).as_slice() != sum {
            return Err(BundleError::ChecksumMismatch);
        }
        let mut len_bytes = [0u8; 4];
        len_bytes.copy_from_slice(&content[MAGIC.len() + 1..MAGIC.len() + 5]);
        let header_len = u32::from_be_bytes(len_bytes) as usize;
        if header_len > MAX_HEADER_LEN {
            return Err(BundleError::Truncated(format!("header of {header_len} bytes exceeds the limit")));
        }
        let header_start = MAGIC.len() + 5;
        let data_start = header_start
            .checked_add(header_len)
            .filter(|end| *end <= content.len())
            .ok_or_else(|| BundleError::Truncated("header runs past the end".into()))?;
        let header: Header = serde_json::from_slice(&content[header_start..data_start])
            .map_err(|e| BundleError::Header(e.to_string()))?;
        let mut offset = data_start;
        let mut docs = Vec::with_capacity(header.docs.len());
        for d in header.docs {
            let end = usize::try_from(d.len)
                .ok()
                .and_then(|len| offset.checked_add(len))
                .filter(|end| *end <= content.len())
                .ok_or_else(|| BundleError::Truncated(format!("document {} runs past the end", d.id)))?;
            let mut signatures = Vec::with_capacity(d.signatures.len());
            for (hash, signature) in &d.signatures {
                let bad = || BundleError::Header(format!("bad signature entry for change {hash:?} of {}", d.id));
                let hash: automerge::ChangeHash = hash.parse().map_err(|_| bad())?;
                let signature: crate::authorship::ChangeSignature =
                    hex::decode(signature).ok().and_then(|b| b.try_into().ok()).ok_or_else(bad)?;
                signatures.push((hash, signature));
            }
            docs.push(BundleDoc { id: d.id, data: content[offset..end].to_vec(), signatures });
            offset = end;
        }
        if offset != content.len() {
            return Err(BundleError::Truncated(format!(
                "{} unexplained bytes after the documents",
                content.len() - offset
            )));
        }
        Ok(Self {
            origin: header.origin,
            relay_key: header.relay_key,
            directory: header.directory.map(String::into_bytes),
            docs,
            receipts: header.receipts,
        })
    }
}

/// What a node has: each document's heads. Handed to another node so its next
/// bundle carries only what is missing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeadsSummary {
    /// Format marker.
    pub samverkan_heads: u32,
    /// The organisation of the node that wrote it: a bundle made for it carries
    /// only documents that organisation is a party to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub org: Option<OrgId>,
    /// Document id → heads as hex change hashes.
    pub docs: BTreeMap<DocId, Vec<String>>,
}

impl HeadsSummary {
    /// An empty summary.
    pub fn new() -> Self {
        Self { samverkan_heads: 1, org: None, docs: BTreeMap::new() }
    }

    /// Records a document's heads.
    pub fn insert(&mut self, id: DocId, heads: &[automerge::ChangeHash]) {
        self.docs.insert(id, heads.iter().map(ToString::to_string).collect());
    }

    /// The heads of one document, parsed.
    pub fn heads(&self, id: &DocId) -> Result<Vec<automerge::ChangeHash>, BundleError> {
        self.docs
            .get(id)
            .map(|hs| hs.iter().map(|h| h.parse().map_err(|e| BundleError::Summary(format!("{h:?}: {e}")))).collect())
            .unwrap_or_else(|| Ok(Vec::new()))
    }

    /// As JSON text.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// From JSON text.
    pub fn from_json(text: &str) -> Result<Self, BundleError> {
        let summary: Self = serde_json::from_str(text).map_err(|e| BundleError::Summary(e.to_string()))?;
        if summary.samverkan_heads != 1 {
            return Err(BundleError::Summary(format!("unsupported version {}", summary.samverkan_heads)));
        }
        Ok(summary)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Bundle {
        Bundle {
            origin: BundleOrigin {
                node: "ab".repeat(32),
                org: "flen-kommun".into(),
                name: "Flen BF-samordnare".into(),
                created: DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
            },
            relay_key: Some(crate::identity::NodeKey::generate().node_id()),
            directory: Some(b"{\"signed\":1}".to_vec()),
            docs: vec![
                BundleDoc {
                    id: DocId::random(),
                    data: vec![1, 2, 3],
                    signatures: vec![(automerge::ChangeHash([9; 32]), [8; 64])],
                },
                BundleDoc { id: DocId::random(), data: Vec::new(), signatures: Vec::new() },
            ],
            receipts: vec![crate::receipt::ApprovalReceipt::issue(
                &crate::identity::NodeKey::generate(),
                &DocId::random(),
                &"ab".repeat(64),
                DateTime::from_timestamp(1_700_000_100, 0).unwrap(),
            )
            .unwrap()],
        }
    }

    #[test]
    fn round_trips() {
        let b = sample();
        assert_eq!(Bundle::decode(&b.encode()).unwrap(), b);
    }

    #[test]
    fn a_bundle_without_receipts_still_decodes() {
        let mut b = sample();
        b.receipts.clear();
        let bytes = b.encode();
        assert!(!String::from_utf8_lossy(&bytes).contains("receipts"), "older readers see the old header");
        assert_eq!(Bundle::decode(&bytes).unwrap(), b);
    }

    #[test]
    fn a_bundle_made_before_batch_signatures_still_decodes_and_a_newer_one_is_named() {
        let b = sample();
        let mut bytes = b.encode();
        bytes[MAGIC.len()] = VERSION_PER_CHANGE_SIGNATURES;
        let len = bytes.len() - CHECKSUM_LEN;
        let sum = Sha256::digest(&bytes[..len]);
        bytes[len..].copy_from_slice(&sum);
        assert_eq!(Bundle::decode(&bytes).unwrap(), b);
        bytes[MAGIC.len()] = VERSION + 1;
        let sum = Sha256::digest(&bytes[..len]);
        bytes[len..].copy_from_slice(&sum);
        assert!(matches!(Bundle::decode(&bytes), Err(BundleError::UnsupportedVersion(v)) if v == VERSION + 1));
    }

    #[test]
    fn every_single_byte_change_or_truncation_is_refused() {
        let bytes = sample().encode();
        for i in 0..bytes.len() {
            let mut altered = bytes.clone();
            altered[i] ^= 0x40;
            assert!(Bundle::decode(&altered).is_err(), "flipped byte {i} was accepted");
        }
        for len in 0..bytes.len() {
            assert!(Bundle::decode(&bytes[..len]).is_err(), "truncation to {len} was accepted");
        }
        assert!(matches!(Bundle::decode(b"hello world, not a bundle"), Err(BundleError::NotABundle)));
    }

    #[test]
    fn heads_summary_round_trips_and_rejects_garbage() {
        let mut s = HeadsSummary::new();
        let id = DocId::random();
        let mut doc = automerge::AutoCommit::new();
        automerge::transaction::Transactable::put(&mut doc, automerge::ROOT, "k", 1).unwrap();
        let heads = doc.get_heads();
        s.insert(id.clone(), &heads);
        let back = HeadsSummary::from_json(&s.to_json()).unwrap();
        assert_eq!(back.heads(&id).unwrap(), heads);
        assert!(HeadsSummary::from_json("{").is_err());
    }
}
