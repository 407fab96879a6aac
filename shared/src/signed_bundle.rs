//! The signed bundle: an approved version of a document, self-contained and
//! verifiable on a machine with no Samverkan database
//! (`samverkan-node export <doc> --signed <dir>`, `samverkan-node verify-bundle <dir>`).
//!
//! A bundle is a directory of three files:
//! - [`MARKDOWN_FILE`]: the signed version as Markdown (what people read and print);
//! - [`HISTORY_FILE`]: the document's Automerge history up to the signed heads;
//! - [`MANIFEST_FILE`]: JSON ([`Manifest`]): document id, title, signed heads,
//!   SHA-256 of the two other files, every approval record (signer key,
//!   organisation, role, time, signature) with the relay's receipt of each
//!   (when the relay received it, signed by the relay; see [`crate::receipt`]),
//!   the relay's key and the enrollment directory exactly as the relay signed
//!   it (names, roles and enrollment times of the signers).
//!
//! # What a verifier trusts
//!
//! Only the relay's public key (given on the command line, or else the one in
//! the manifest — then the report says it was not pinned), ed25519, SHA-256
//! (Automerge change hashes are SHA-256 over the change bytes, so heads
//! name one exact history) and this program's Markdown rendering. From those,
//! [`verify`] establishes: the directory was signed by that relay; each
//! approval's signature verifies for this document id and its heads; each
//! approval has a receipt signed by that relay for that record and document;
//! each signer was, **when the relay received the record**, an enrolled signer
//! of the claimed organisation and role (and the claimed signing time is not
//! later than that, plus the clock skew allowed); each signed version exists in the carried history and has the
//! same content as the bundle's version; the Markdown file is exactly that
//! version rendered; and every signatory the version requires has signed.
//! The manifest must be byte for byte in its canonical form, so a changed byte
//! anywhere in any of the three files fails with a message naming the file.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::approval::{heads_hex, Action, ApprovalRecord, SignedBy};
use crate::directory::SignedDirectory;
use crate::identity::NodeId;
use crate::ids::DocId;
use crate::markdown;
use crate::model::Document;
use crate::org::Directory;
use crate::receipt::ApprovalReceipt;

/// The Markdown of the signed version.
pub const MARKDOWN_FILE: &str = "document.md";
/// The Automerge history up to the signed heads.
pub const HISTORY_FILE: &str = "history.automerge";
/// The manifest.
pub const MANIFEST_FILE: &str = "manifest.json";
/// The manifest's format tag (v2 added the relay's receipts; v1 bundles
/// carry none and no longer verify: export them again).
pub const FORMAT: &str = "samverkan-signed-bundle-v2";

/// Why a bundle does not verify; each message names the part at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BundleVerifyError {
    /// The manifest is not JSON of this format, or not in canonical form.
    #[error("{MANIFEST_FILE}: {0}")]
    Manifest(String),
    /// The relay key or the directory's signature is wrong.
    #[error("{MANIFEST_FILE}: the enrollment directory does not verify: {0}")]
    Directory(String),
    /// A file does not match its checksum.
    #[error("{0} was altered: its SHA-256 does not match the manifest")]
    Checksum(&'static str),
    /// The history does not load or lacks the signed version.
    #[error("{HISTORY_FILE}: {0}")]
    History(String),
    /// The Markdown is not the signed version.
    #[error("{MARKDOWN_FILE} is not the signed version rendered (altered)")]
    Markdown,
    /// An approval does not verify.
    #[error("approval {index} ({role}): {problem}")]
    Approval {
        /// Position in the manifest.
        index: usize,
        /// The claimed role.
        role: String,
        /// Why.
        problem: String,
    },
    /// Not every required signatory signed.
    #[error("not approved: missing signatures of {0}")]
    Incomplete(String),
}

/// The manifest of a signed bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// [`FORMAT`].
    pub format: String,
    /// The document.
    pub doc: DocId,
    /// Its title in the signed version.
    pub title: String,
    /// The signed version (the heads of its first approval).
    #[serde(with = "heads_hex")]
    pub heads: Vec<automerge::ChangeHash>,
    /// SHA-256 of [`MARKDOWN_FILE`], hex.
    pub markdown_sha256: String,
    /// SHA-256 of [`HISTORY_FILE`], hex.
    pub history_sha256: String,
    /// The relay key that signed the directory.
    pub relay_key: NodeId,
    /// The enrollment directory as the relay signed it.
    pub directory: SignedDirectory,
    /// The approvals of the version.
    pub approvals: Vec<ApprovalRecord>,
    /// The relay's receipt of each approval, in the same order.
    pub receipts: Vec<ApprovalReceipt>,
}

/// The three files of a bundle, in memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleFiles {
    /// [`MANIFEST_FILE`].
    pub manifest: String,
    /// [`MARKDOWN_FILE`].
    pub markdown: String,
    /// [`HISTORY_FILE`].
    pub history: Vec<u8>,
}

/// What a verified bundle says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BundleReport {
    /// The document.
    pub doc: DocId,
    /// Its title.
    pub title: String,
    /// The signed heads.
    #[serde(serialize_with = "heads_hex::serialize")]
    pub heads: Vec<automerge::ChangeHash>,
    /// The relay key the directory verified with.
    pub relay_key: NodeId,
    /// Whether that key was pinned by the caller (else taken from the manifest).
    pub relay_pinned: bool,
    /// Who signed, when.
    pub signed: Vec<SignedBy>,
    /// When the bundle's version was approved (the relay's receipt of the last signature).
    pub approved_at: Option<DateTime<Utc>>,
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn canonical_manifest(manifest: &Manifest) -> String {
    // Plain structs with string keys always serialise.
    serde_json::to_string_pretty(manifest).unwrap_or_default() + "\n"
}

/// Builds the bundle of the version signed by `approvals` (all on versions
/// with the same content; the first one's heads name the version), with the
/// relay's receipt of each (same order).
pub fn create(
    doc: &mut Document,
    approvals: Vec<ApprovalRecord>,
    receipts: Vec<ApprovalReceipt>,
    directory: SignedDirectory,
) -> Result<BundleFiles, crate::approval::ApprovalError> {
    if receipts.len() != approvals.len()
        || approvals.iter().zip(&receipts).any(|(a, r)| a.signature != r.record_signature)
    {
        return Err(crate::approval::ApprovalError::Invalid {
            field: "receipts",
            reason: "every approval in a signed bundle needs the relay's receipt, in the same order".into(),
        });
    }
    let heads = approvals.first().map(|a| a.heads.clone()).unwrap_or_default();
    let all_heads: Vec<automerge::ChangeHash> = approvals.iter().flat_map(|a| a.heads.iter().copied()).collect();
    let mut history_doc = doc.at(&crate::approval::canonical_heads(&all_heads))?;
    let history = history_doc.automerge_mut().save();
    let view = doc.at(&heads)?.view()?;
    let markdown = markdown::export(&view, &Directory::sodermanland());
    let manifest = Manifest {
        format: FORMAT.to_string(),
        doc: doc.id().clone(),
        title: view.title,
        heads,
        markdown_sha256: sha256_hex(markdown.as_bytes()),
        history_sha256: sha256_hex(&history),
        relay_key: directory.relay,
        directory,
        approvals,
        receipts,
    };
    Ok(BundleFiles { manifest: canonical_manifest(&manifest), markdown, history })
}

/// Verifies a bundle (see the module docs for what is established). With
/// `pinned`, the directory must be signed by that relay key.
pub fn verify(files: &BundleFiles, pinned: Option<&NodeId>) -> Result<BundleReport, BundleVerifyError> {
    let manifest: Manifest = serde_json::from_str(&files.manifest)
        .map_err(|e| BundleVerifyError::Manifest(format!("not a signed-bundle manifest: {e}")))?;
    if canonical_manifest(&manifest) != files.manifest {
        return Err(BundleVerifyError::Manifest("altered: not in the canonical form it was written in".into()));
    }
    if manifest.format != FORMAT {
        return Err(BundleVerifyError::Manifest(format!("unknown format {:?}", manifest.format)));
    }
    let relay_key = *pinned.unwrap_or(&manifest.relay_key);
    if manifest.relay_key != relay_key {
        return Err(BundleVerifyError::Directory(format!(
            "the manifest names relay key {}, but {} was pinned",
            manifest.relay_key, relay_key
        )));
    }
    let directory = manifest.directory.verify(&relay_key).map_err(|e| BundleVerifyError::Directory(e.to_string()))?;
    if sha256_hex(files.markdown.as_bytes()) != manifest.markdown_sha256 {
        return Err(BundleVerifyError::Checksum(MARKDOWN_FILE));
    }
    if sha256_hex(&files.history) != manifest.history_sha256 {
        return Err(BundleVerifyError::Checksum(HISTORY_FILE));
    }
    // Checked as a sync message's changes are before Automerge sees them (bounded
    // inflation and operations: a few bytes can hold millions of operations).
    crate::sync::check_chunks(&files.history, &crate::sync::SyncLimits::default())
        .map_err(|e| BundleVerifyError::History(format!("refused before loading: {e}")))?;
    let mut doc = Document::load(manifest.doc.clone(), &files.history)
        .map_err(|e| BundleVerifyError::History(format!("does not load: {e}")))?;
    let view_at = |doc: &mut Document, heads: &[automerge::ChangeHash]| {
        for h in heads {
            if automerge::ReadDoc::get_change_by_hash(doc.automerge(), h).is_none() {
                return Err(BundleVerifyError::History(format!("lacks the signed version {h}")));
            }
        }
        doc.at(heads)
            .and_then(|d| d.view())
            .map_err(|e| BundleVerifyError::History(format!("the signed version does not read: {e}")))
    };
    let view = view_at(&mut doc, &manifest.heads)?;
    if markdown::export(&view, &Directory::sodermanland()) != files.markdown || view.title != manifest.title {
        return Err(BundleVerifyError::Markdown);
    }
    if manifest.receipts.len() != manifest.approvals.len() {
        return Err(BundleVerifyError::Manifest(format!(
            "{} approval(s) but {} relay receipt(s): every approval needs the relay's receipt",
            manifest.approvals.len(),
            manifest.receipts.len()
        )));
    }
    let mut signed = Vec::new();
    for (index, (record, receipt)) in manifest.approvals.iter().zip(&manifest.receipts).enumerate() {
        let fail = |problem: String| BundleVerifyError::Approval { index, role: record.role.clone(), problem };
        if record.action != Action::Approve {
            return Err(fail("not an approval".into()));
        }
        receipt.verify(&relay_key).map_err(|e| fail(format!("the relay's receipt does not verify: {e}")))?;
        let member = record.verify_received(&manifest.doc, &directory, receipt).map_err(|e| fail(e.to_string()))?;
        if view_at(&mut doc, &record.heads)? != view {
            return Err(fail("signs a version with other content".into()));
        }
        signed.push(SignedBy {
            signer: record.signer,
            name: member.name.clone(),
            org: record.org.clone(),
            role: record.role.clone(),
            signed_at: record.signed_at,
            received_at: receipt.received_at,
            heads: record.heads.clone(),
        });
    }
    let missing: Vec<String> = view
        .signatories
        .iter()
        .filter(|s| !signed.iter().any(|a| a.org == s.org && a.role.trim() == s.role.trim()))
        .map(|s| format!("{} ({})", s.role, s.org))
        .collect();
    if !missing.is_empty() || view.signatories.is_empty() {
        return Err(BundleVerifyError::Incomplete(if missing.is_empty() {
            "the version names no signatories".into()
        } else {
            missing.join(", ")
        }));
    }
    Ok(BundleReport {
        doc: manifest.doc,
        title: manifest.title,
        heads: manifest.heads,
        relay_key,
        relay_pinned: pinned.is_some(),
        approved_at: signed.iter().map(|s| s.received_at).max(),
        signed,
    })
}
