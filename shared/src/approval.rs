//! Signed approvals of documents: the canonical signed message, the records
//! stored in a document, their verification, and the derived approval state.
//!
//! An approval is an ed25519 signature by a person's signer key over one exact
//! version of one document (its Automerge heads). A withdrawal is the same
//! kind of record with the action `withdraw`: withdrawing is itself a signed
//! act. Records are stored in the document itself, in the root list
//! [`APPROVALS_KEY`], one map of strings per record, written once and never
//! edited, so they sync like any edit and concurrent additions both survive.
//!
//! # The signed message
//!
//! UTF-8 lines after a fixed context, nothing else (see [`ApprovalRecord::message`]):
//!
//! ```text
//! samverkan-approval-v1\0
//! action=approve            (or withdraw)
//! doc=<document id>
//! heads=<hex>,<hex>         (sorted, deduplicated)
//! signer=<signer public key, 64 hex>
//! org=<organisation id>
//! role=<role title>
//! time=<UTC, RFC 3339 with milliseconds and Z>
//! ```
//!
//! The document id is not stored in the record: it is taken from the document
//! the record sits in, so a record copied into another document fails
//! verification. Signatures are checked with ed25519 strict verification.
//!
//! # Which version is signed, and when it has changed
//!
//! The signed heads are the document's heads *before* the approval record is
//! added. Two approvals count for the same version when the document's content
//! (its [`DocumentView`]: everything `show` and `export` print — title, body,
//! parties, period, signatories, goals, activities, follow-ups, meetings) is
//! identical at their heads; so a signer who signs after another signer's
//! record arrived (whose heads include that record) signs the same version.
//! **Changed since approval** means exactly: the content view at the current
//! heads differs from the content view at the signed heads. Approval and
//! withdrawal records and contributor declarations are not content, so adding
//! them never makes a document "changed"; an edit later reverted to the exact
//! signed text is not a change either (the text in force is identical).
//!
//! # Verification
//!
//! **An approval counts from the time the relay received it.** The signing
//! time in a record is only the signer's claim: a stolen key, after its
//! revocation, could sign records dated before the revocation. So the relay,
//! when it accepts a new record ([`check_new_records`]: valid, from a key
//! active *now*, not claiming a future time), issues a signed
//! [`ApprovalReceipt`](crate::receipt::ApprovalReceipt) stating when it first
//! received the record, and stores it in the same transaction as the record.
//! The receipts travel to nodes (the `Receipts` frame), in offline bundles and
//! in signed bundles.
//!
//! A record counts ([`check_receipted`], used by [`approval_status`], the
//! node's `verify`, `export --signed` and `verify-bundle`) when:
//! - its signature verifies for this document ([`ApprovalRecord::verify_signature`]);
//! - its heads exist in the document's history;
//! - it has a receipt that verifies with the pinned relay key
//!   ([`Receipts`] holds only such receipts);
//! - its signing time is no later than the receipt's `received_at` plus
//!   [`MAX_CLOCK_SKEW`];
//! - its signer was, **at `received_at`**, an active (not revoked) entry of
//!   kind signer in the relay's enrollment directory with the same
//!   organisation and role title.
//!
//! A record that has no receipt yet (approved offline, not yet synced) is
//! listed as *awaiting the relay's receipt* ([`ApprovalStatus::awaiting_receipt`])
//! and does not count; if it would not verify even at its claimed time, it is
//! flagged with that reason instead. Which approval completed a version last
//! is judged by `received_at` too.
//!
//! This module does no I/O: keys, times and directories are passed in.

use std::collections::{BTreeMap, BTreeSet};

use automerge::{ChangeHash, ObjType, ReadDoc, ScalarValue, Value, ROOT};
use chrono::{DateTime, SecondsFormat, Utc};
use ed25519_dalek::{Signature, Signer};
use serde::{Deserialize, Serialize};

use crate::directory::{EnrollmentDirectory, Member, MemberKind};
use crate::identity::{NodeId, NodeKey};
use crate::ids::DocId;
use crate::model::{Document, DocumentView, ModelError, Signatory};
use crate::org::OrgId;
use crate::receipt::{ApprovalReceipt, Receipts};

/// Root key of the list of approval and withdrawal records.
pub const APPROVALS_KEY: &str = "approvals";

/// Domain separation: the first bytes of every signed approval message.
pub const SIGNING_CONTEXT: &[u8] = b"samverkan-approval-v1\0";

/// How far in the future the relay accepts a record's signing time.
pub const MAX_CLOCK_SKEW: chrono::Duration = chrono::Duration::minutes(5);

/// Errors of approvals.
#[derive(Debug, thiserror::Error)]
pub enum ApprovalError {
    /// The document could not be read.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// A record's field is not acceptable for signing.
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// Which field.
        field: &'static str,
        /// Why.
        reason: String,
    },
}

/// Why a record is not a valid approval or withdrawal.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordProblem {
    /// The record does not have the fields of a record.
    #[error("malformed record: {0}")]
    Malformed(String),
    /// The signature does not verify for this document, version and signer.
    #[error("the signature by {signer} does not verify for this document and version (forged, altered, or copied from another document)")]
    BadSignature {
        /// The claimed signer key.
        signer: String,
    },
    /// The key was never enrolled at the relay.
    #[error("signer key {0} is not in the relay's enrollment directory")]
    UnknownSigner(String),
    /// The key was not active (not yet enrolled, or already revoked) at the signing time.
    #[error("{name} was not an enrolled signer at the signing time {at} (revoked or not yet enrolled)")]
    NotActiveAt {
        /// The member's name.
        name: String,
        /// The claimed signing time.
        at: DateTime<Utc>,
    },
    /// The key is enrolled, but as a node.
    #[error("{0} is enrolled as a node, not as a signer")]
    NotASigner(String),
    /// The role in the record is not the role the signer is enrolled with.
    #[error("{name} is enrolled as {enrolled:?}, but signed as {claimed:?}")]
    WrongRole {
        /// The member's name.
        name: String,
        /// The enrolled role.
        enrolled: String,
        /// The role in the record.
        claimed: String,
    },
    /// The organisation in the record is not the signer's.
    #[error("{name} belongs to {enrolled}, but signed for {claimed}")]
    WrongOrganisation {
        /// The member's name.
        name: String,
        /// The enrolled organisation.
        enrolled: OrgId,
        /// The organisation in the record.
        claimed: OrgId,
    },
    /// A signed head is not in the document's history.
    #[error("the signed version {0} is not in the document's history")]
    UnknownHeads(String),
    /// The relay refuses keys that are revoked when a record arrives.
    #[error("{0} is revoked now; the relay accepts no new records from this key")]
    RevokedNow(String),
    /// Records are written once: a change removed or altered existing ones.
    #[error("{0} existing approval record(s) were removed or altered; approvals are never deleted (withdraw instead)")]
    Removed(usize),
    /// The relay refuses signing times in the future.
    #[error("the signing time {0} is in the future")]
    FutureTime(DateTime<Utc>),
    /// No receipt from the relay yet: the record does not count until the relay has received it.
    #[error("awaiting the relay's receipt (not counted until the relay has received it: sync)")]
    AwaitingReceipt,
    /// The signer was not active when the relay received the record.
    #[error(
        "{name} was not an enrolled signer when the relay received the record at {at} (revoked or not yet enrolled)"
    )]
    NotActiveWhenReceived {
        /// The member's name.
        name: String,
        /// When the relay received the record.
        at: DateTime<Utc>,
    },
    /// The record claims a signing time after the relay received it.
    #[error("the signing time {signed_at} is later than when the relay received the record ({received_at})")]
    SignedAfterReceipt {
        /// The claimed signing time.
        signed_at: DateTime<Utc>,
        /// When the relay received it.
        received_at: DateTime<Utc>,
    },
    /// The receipt is of another record or document.
    #[error("the relay's receipt is of another record or document")]
    ReceiptMismatch,
}

/// What a record does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Approves the version.
    Approve,
    /// Withdraws the signer's approval of the version.
    Withdraw,
}

impl Action {
    /// The name in the signed message and the document.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Approve => "approve",
            Action::Withdraw => "withdraw",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        match text {
            "approve" => Some(Action::Approve),
            "withdraw" => Some(Action::Withdraw),
            _ => None,
        }
    }
}

/// One signed approval or withdrawal, as stored in a document and in bundles.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApprovalRecord {
    /// Approve or withdraw.
    pub action: Action,
    /// The signed version: sorted, deduplicated heads.
    #[serde(with = "heads_hex")]
    pub heads: Vec<ChangeHash>,
    /// The signer's public key.
    pub signer: NodeId,
    /// The organisation the signer signs for.
    pub org: OrgId,
    /// The role title the signer signs as ("Landshövding").
    pub role: String,
    /// When it was signed (UTC, milliseconds).
    pub signed_at: DateTime<Utc>,
    /// The ed25519 signature over [`ApprovalRecord::message`], hex.
    pub signature: String,
}

/// Hex serialisation of heads.
pub(crate) mod heads_hex {
    use automerge::ChangeHash;
    use serde::{Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(heads: &[ChangeHash], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(heads.iter().map(ToString::to_string))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<ChangeHash>, D::Error> {
        Vec::<String>::deserialize(d)?.iter().map(|h| h.parse().map_err(serde::de::Error::custom)).collect()
    }
}

/// Sorted, deduplicated heads.
pub fn canonical_heads(heads: &[ChangeHash]) -> Vec<ChangeHash> {
    let set: BTreeSet<ChangeHash> = heads.iter().copied().collect();
    set.into_iter().collect()
}

fn heads_text(heads: &[ChangeHash]) -> String {
    heads.iter().map(ToString::to_string).collect::<Vec<_>>().join(",")
}

fn time_text(at: &DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn check_role(role: &str) -> Result<(), ApprovalError> {
    let invalid = |reason: &str| ApprovalError::Invalid { field: "role", reason: reason.to_string() };
    if role.trim().is_empty() || role.trim() != role {
        return Err(invalid("empty or with surrounding spaces"));
    }
    if role.chars().any(char::is_control) {
        return Err(invalid("contains control characters"));
    }
    Ok(())
}

impl ApprovalRecord {
    /// Signs `action` on version `heads` of document `doc` with `key`, for
    /// `org` as `role`, at `at` (kept to the millisecond).
    pub fn sign(
        action: Action,
        doc: &DocId,
        heads: &[ChangeHash],
        key: &NodeKey,
        org: OrgId,
        role: &str,
        at: DateTime<Utc>,
    ) -> Result<Self, ApprovalError> {
        check_role(role)?;
        if heads.is_empty() {
            return Err(ApprovalError::Invalid { field: "heads", reason: "an empty document cannot be signed".into() });
        }
        let signed_at = DateTime::from_timestamp_millis(at.timestamp_millis()).unwrap_or(at);
        let mut record = Self {
            action,
            heads: canonical_heads(heads),
            signer: key.node_id(),
            org,
            role: role.to_string(),
            signed_at,
            signature: String::new(),
        };
        record.signature = hex::encode(key.signing_key().sign(&record.message(doc)).to_bytes());
        Ok(record)
    }

    /// The canonical message signed for document `doc` (see the module docs).
    pub fn message(&self, doc: &DocId) -> Vec<u8> {
        let mut message = SIGNING_CONTEXT.to_vec();
        let text = format!(
            "action={}\ndoc={}\nheads={}\nsigner={}\norg={}\nrole={}\ntime={}\n",
            self.action.as_str(),
            doc,
            heads_text(&canonical_heads(&self.heads)),
            self.signer,
            self.org,
            self.role,
            time_text(&self.signed_at)
        );
        message.extend_from_slice(text.as_bytes());
        message
    }

    /// Checks the signature (strict ed25519) as made for document `doc`.
    pub fn verify_signature(&self, doc: &DocId) -> Result<(), RecordProblem> {
        let bad = || RecordProblem::BadSignature { signer: self.signer.short() };
        // The signature names the record (and its receipt): only its canonical lowercase hex.
        let canonical_hex = self.signature.len() == 128 && !self.signature.bytes().any(|b| b.is_ascii_uppercase());
        if self.heads != canonical_heads(&self.heads) || check_role(&self.role).is_err() || !canonical_hex {
            return Err(bad());
        }
        let bytes: [u8; 64] = hex::decode(&self.signature).ok().and_then(|b| b.try_into().ok()).ok_or_else(bad)?;
        self.signer.verifying_key().verify_strict(&self.message(doc), &Signature::from_bytes(&bytes)).map_err(|_| bad())
    }

    /// Checks the signature and that the signer was an enrolled signer of the
    /// record's organisation and role at the (claimed) signing time; returns
    /// the entry. This is the check before the relay has received the record
    /// (`approve` refuses records it would refuse); a record *counts* only
    /// through [`ApprovalRecord::verify_received`].
    pub fn verify<'d>(&self, doc: &DocId, directory: &'d EnrollmentDirectory) -> Result<&'d Member, RecordProblem> {
        self.verify_signature(doc)?;
        self.member_at(directory, self.signed_at, |name, at| RecordProblem::NotActiveAt { name, at })
    }

    /// Checks the signature, that `receipt` is this record's (its relay
    /// signature must have been verified by the caller, e.g. through
    /// [`Receipts`]), that the signing time is not after `received_at` plus
    /// [`MAX_CLOCK_SKEW`], and that the signer was an enrolled signer of the
    /// record's organisation and role **when the relay received the record**.
    pub fn verify_received<'d>(
        &self,
        doc: &DocId,
        directory: &'d EnrollmentDirectory,
        receipt: &ApprovalReceipt,
    ) -> Result<&'d Member, RecordProblem> {
        self.verify_signature(doc)?;
        if receipt.doc != *doc || receipt.record_signature != self.signature {
            return Err(RecordProblem::ReceiptMismatch);
        }
        if self.signed_at > receipt.received_at + MAX_CLOCK_SKEW {
            return Err(RecordProblem::SignedAfterReceipt {
                signed_at: self.signed_at,
                received_at: receipt.received_at,
            });
        }
        self.member_at(directory, receipt.received_at, |name, at| RecordProblem::NotActiveWhenReceived { name, at })
    }

    /// The signer's entry active at `at`, of kind signer, with the record's organisation and role.
    fn member_at<'d>(
        &self,
        directory: &'d EnrollmentDirectory,
        at: DateTime<Utc>,
        not_active: impl FnOnce(String, DateTime<Utc>) -> RecordProblem,
    ) -> Result<&'d Member, RecordProblem> {
        let Some(latest) = directory.latest(&self.signer) else {
            return Err(RecordProblem::UnknownSigner(self.signer.to_string()));
        };
        let member = directory.active_at(&self.signer, at).ok_or_else(|| not_active(latest.name.clone(), at))?;
        if member.kind != MemberKind::Signer {
            return Err(RecordProblem::NotASigner(member.name.clone()));
        }
        if member.org != self.org {
            return Err(RecordProblem::WrongOrganisation {
                name: member.name.clone(),
                enrolled: member.org.clone(),
                claimed: self.org.clone(),
            });
        }
        if member.role.as_deref() != Some(self.role.as_str()) {
            return Err(RecordProblem::WrongRole {
                name: member.name.clone(),
                enrolled: member.role.clone().unwrap_or_default(),
                claimed: self.role.clone(),
            });
        }
        Ok(member)
    }

    /// A key identifying the record (its signature), for telling new records from old.
    pub fn key(&self) -> &str {
        &self.signature
    }

    fn to_fields(&self) -> Vec<(&'static str, String)> {
        vec![
            ("action", self.action.as_str().to_string()),
            ("heads", heads_text(&self.heads)),
            ("signer", self.signer.to_string()),
            ("org", self.org.to_string()),
            ("role", self.role.clone()),
            ("time", time_text(&self.signed_at)),
            ("signature", self.signature.clone()),
        ]
    }
}

/// One record read out of a document: its position and the record, or why it is unreadable.
pub type StoredRecord = (usize, Result<ApprovalRecord, RecordProblem>);

/// Reads every approval and withdrawal record of a document, in list order.
///
/// Two nodes that add the first record concurrently each create the list, and
/// Automerge keeps both lists as concurrent values of the key; records are read
/// from every one of them (the visible list first), so no approval is lost.
pub fn records(doc: &Document) -> Vec<StoredRecord> {
    let am = doc.automerge();
    let lists: Vec<automerge::ObjId> = match am.get_all(ROOT, APPROVALS_KEY) {
        Ok(all) => all
            .into_iter()
            .rev()
            .filter_map(|(value, id)| matches!(value, Value::Object(ObjType::List)).then_some(id))
            .collect(),
        Err(_) => Vec::new(),
    };
    let mut out = Vec::new();
    for list in lists {
        for i in 0..am.length(&list) {
            let record = match am.get(&list, i) {
                Ok(Some((Value::Object(ObjType::Map), obj))) => read_record(am, &obj),
                _ => Err(RecordProblem::Malformed(format!("{APPROVALS_KEY}[{i}] is not a map"))),
            };
            out.push((out.len(), record));
        }
    }
    out
}

fn read_record<R: ReadDoc>(am: &R, obj: &automerge::ObjId) -> Result<ApprovalRecord, RecordProblem> {
    let field = |name: &str| -> Result<String, RecordProblem> {
        match am.get(obj, name) {
            Ok(Some((Value::Scalar(s), _))) => match s.as_ref() {
                ScalarValue::Str(s) => Ok(s.to_string()),
                _ => Err(RecordProblem::Malformed(format!("{name} is not a string"))),
            },
            _ => Err(RecordProblem::Malformed(format!("no {name}"))),
        }
    };
    let malformed = |what: &str| RecordProblem::Malformed(what.to_string());
    let action = Action::parse(&field("action")?).ok_or_else(|| malformed("unknown action"))?;
    let heads = field("heads")?
        .split(',')
        .map(|h| h.parse::<ChangeHash>().map_err(|_| malformed("heads are not change hashes")))
        .collect::<Result<Vec<_>, _>>()?;
    let signer = field("signer")?.parse::<NodeId>().map_err(|_| malformed("signer is not a public key"))?;
    let org = OrgId::new(&field("org")?).ok_or_else(|| malformed("org is not an organisation id"))?;
    let time = field("time")?;
    let signed_at =
        DateTime::parse_from_rfc3339(&time).map_err(|_| malformed("time is not RFC 3339"))?.with_timezone(&Utc);
    Ok(ApprovalRecord { action, heads, signer, org, role: field("role")?, signed_at, signature: field("signature")? })
}

/// Appends a record to the document as one change (through [`Document::edit`]).
pub fn append(
    doc: &mut Document,
    ctx: &crate::model::EditContext,
    directory: &crate::org::Directory,
    record: &ApprovalRecord,
) -> Result<Option<ChangeHash>, ApprovalError> {
    let message = format!("{} by {} ({})", record.action.as_str(), record.role, record.signer.short());
    let fields = record.to_fields();
    let (_, hash) = doc.edit(ctx, directory, &message, |e| e.append_record(APPROVALS_KEY, &fields))?;
    Ok(hash)
}

/// Whether every head is in the document's history.
fn has_heads(doc: &Document, heads: &[ChangeHash]) -> Result<(), RecordProblem> {
    for h in heads {
        if ReadDoc::get_change_by_hash(doc.automerge(), h).is_none() {
            return Err(RecordProblem::UnknownHeads(h.to_string()));
        }
    }
    Ok(())
}

/// Check of a record at its *claimed* signing time: signature, enrollment at
/// that time, heads in history. The relay's check of new records (with
/// "active now" on top, see [`check_new_records`]); whether a stored record
/// counts is [`check_receipted`].
pub fn check_record<'d>(
    doc: &Document,
    record: &ApprovalRecord,
    directory: &'d EnrollmentDirectory,
) -> Result<&'d Member, RecordProblem> {
    let member = record.verify(doc.id(), directory)?;
    has_heads(doc, &record.heads)?;
    Ok(member)
}

/// The check that decides whether a stored record counts (see the module
/// docs): signature, heads in history, a receipt in `receipts`, signing time
/// not after the receipt (plus skew), signer active with that organisation and
/// role when the relay received it. Returns the entry and `received_at`.
/// Without a receipt: the record's problem at its claimed time if it has one,
/// else [`RecordProblem::AwaitingReceipt`].
pub fn check_receipted<'d>(
    doc: &Document,
    record: &ApprovalRecord,
    directory: &'d EnrollmentDirectory,
    receipts: &Receipts,
) -> Result<(&'d Member, DateTime<Utc>), RecordProblem> {
    record.verify_signature(doc.id())?;
    has_heads(doc, &record.heads)?;
    let Some(receipt) = receipts.get(doc.id(), &record.signature) else {
        record.verify(doc.id(), directory)?;
        return Err(RecordProblem::AwaitingReceipt);
    };
    let member = record.verify_received(doc.id(), directory, receipt)?;
    Ok((member, receipt.received_at))
}

/// The records a change added: those whose key is not in `before` (as
/// [`record_keys`] returned) and that read as records. The relay issues a
/// receipt for each after [`check_new_records`] passed.
pub fn new_records(doc: &Document, before: &BTreeSet<String>) -> Vec<ApprovalRecord> {
    records(doc).into_iter().filter_map(|(_, r)| r.ok()).filter(|r| !before.contains(&r.signature)).collect()
}

/// The keys of the records in a document (to tell which ones a change added).
pub fn record_keys(doc: &Document) -> BTreeSet<String> {
    records(doc)
        .into_iter()
        .map(|(i, r)| match r {
            Ok(r) => r.signature,
            Err(_) => format!("malformed#{i}"),
        })
        .collect()
}

/// The relay's check of records added since `before` (as [`record_keys`]
/// returned): none of the earlier records may be gone (records are written
/// once; an altered record counts as removed and added), and each new one must
/// be valid, from a key active `now`, and not signed in the future. Returns
/// the first problem.
pub fn check_new_records(
    doc: &Document,
    before: &BTreeSet<String>,
    directory: &EnrollmentDirectory,
    now: DateTime<Utc>,
) -> Result<(), RecordProblem> {
    let after = record_keys(doc);
    let removed = before.iter().filter(|k| !k.starts_with("malformed#") && !after.contains(*k)).count();
    if removed > 0 {
        return Err(RecordProblem::Removed(removed));
    }
    for (i, record) in records(doc) {
        let record = match record {
            Ok(r) if before.contains(&r.signature) => continue,
            Ok(r) => r,
            Err(_) if before.contains(&format!("malformed#{i}")) => continue,
            Err(e) => return Err(e),
        };
        let member = check_record(doc, &record, directory)?;
        if directory.active(&record.signer).is_none() {
            return Err(RecordProblem::RevokedNow(member.name.clone()));
        }
        if record.signed_at > now + MAX_CLOCK_SKEW {
            return Err(RecordProblem::FutureTime(record.signed_at));
        }
    }
    Ok(())
}

/// The approval records behind the signatures of `version`, oldest first (for
/// a signed bundle: the first one's heads are the version's heads).
pub fn records_of(doc: &Document, version: &SignedVersion) -> Vec<ApprovalRecord> {
    let mut out: Vec<ApprovalRecord> = records(doc)
        .into_iter()
        .filter_map(|(_, r)| r.ok())
        .filter(|r| {
            r.action == Action::Approve
                && version
                    .signed
                    .iter()
                    .any(|s| s.signer == r.signer && s.signed_at == r.signed_at && s.heads == r.heads)
        })
        .collect();
    out.sort_by_key(|r| r.signed_at);
    out.dedup_by(|a, b| a.signature == b.signature);
    out
}

// ---- the derived state -----------------------------------------------------------------------

/// The approval state of a document.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ApprovalState {
    /// No valid approval yet.
    Draft,
    /// Some required signatories have signed a version, others not yet.
    AwaitingSignatures,
    /// Every required signatory signed the current content.
    Approved,
    /// A version was approved, and the content has changed since; the signed
    /// version stays the one in force.
    ChangedSinceApproval,
}

impl ApprovalState {
    /// The label shown to people.
    pub fn label(self) -> &'static str {
        match self {
            ApprovalState::Draft => "draft (utkast)",
            ApprovalState::AwaitingSignatures => "awaiting signatures (inväntar underskrifter)",
            ApprovalState::Approved => "approved (godkänd)",
            ApprovalState::ChangedSinceApproval => "changed since approval (ändrad efter godkännande)",
        }
    }
}

/// A valid signature, with who made it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SignedBy {
    /// The signer's key.
    pub signer: NodeId,
    /// The signer's enrolled name.
    pub name: String,
    /// The organisation signed for.
    pub org: OrgId,
    /// The role signed as.
    pub role: String,
    /// When, as the signer claims.
    pub signed_at: DateTime<Utc>,
    /// When the relay received the record (from its receipt): the time that counts.
    pub received_at: DateTime<Utc>,
    /// The heads the signer signed.
    #[serde(serialize_with = "heads_hex::serialize")]
    pub heads: Vec<ChangeHash>,
}

/// A record that verifies at its claimed time but has no receipt from the
/// relay yet (approved offline, not synced): shown, not counted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AwaitingReceipt {
    /// Position in the document's record list.
    pub index: usize,
    /// Approve or withdraw.
    pub action: Action,
    /// The signer's key.
    pub signer: NodeId,
    /// The role signed as.
    pub role: String,
    /// The claimed signing time.
    pub signed_at: DateTime<Utc>,
    /// The heads signed.
    #[serde(serialize_with = "heads_hex::serialize")]
    pub heads: Vec<ChangeHash>,
}

/// A version of the document together with the signatures on it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SignedVersion {
    /// The version's heads (those of its first signature).
    #[serde(serialize_with = "heads_hex::serialize")]
    pub heads: Vec<ChangeHash>,
    /// Signatures in force on this version, oldest first.
    pub signed: Vec<SignedBy>,
    /// Required signatories (of this version) who have not signed it.
    pub missing: Vec<Signatory>,
    /// Whether the document's current content is this version's.
    pub is_current: bool,
}

/// A record that is not valid, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Flagged {
    /// Position in the document's record list.
    pub index: usize,
    /// The claimed signer, if readable.
    pub signer: Option<NodeId>,
    /// The claimed role, if readable.
    pub role: Option<String>,
    /// Why it does not count.
    pub problem: String,
}

/// The derived approval state of a document (see [`approval_status`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ApprovalStatus {
    /// The state.
    pub state: ApprovalState,
    /// Required signatories of the current version.
    pub required: Vec<Signatory>,
    /// The version in force, if one was approved by all its required signatories.
    pub in_force: Option<SignedVersion>,
    /// The newest partly signed version (newer than the one in force), if any.
    pub pending: Option<SignedVersion>,
    /// Approvals withdrawn by their signers.
    pub withdrawn: Vec<SignedBy>,
    /// Records that do not count, with the reason.
    pub flagged: Vec<Flagged>,
    /// Records that do not count yet: no receipt from the relay (sync first).
    pub awaiting_receipt: Vec<AwaitingReceipt>,
}

fn covers(signed: &SignedBy, required: &Signatory) -> bool {
    signed.org == required.org && signed.role.trim() == required.role.trim()
}

/// Derives the approval state of `doc` from its records, verified with
/// `directory` and the relay's `receipts` (see [`check_receipted`]).
///
/// Pure: a function of the document, the directory and the receipts. Valid approvals not
/// withdrawn (a withdrawal cancels the same signer's approvals of the same
/// heads made at or before it) are grouped into versions by equal content
/// (see the module docs); a version is approved when every signatory it
/// requires (the organisation and role of each entry of its `signatories`)
/// has a valid approval on it. The version in force is the approved version
/// completed last (by the relay's receipt times).
pub fn approval_status(
    doc: &mut Document,
    directory: &EnrollmentDirectory,
    receipts: &Receipts,
) -> Result<ApprovalStatus, ApprovalError> {
    let current = doc.view()?;
    let mut approvals: Vec<SignedBy> = Vec::new();
    let mut withdrawals: Vec<SignedBy> = Vec::new();
    let mut flagged = Vec::new();
    let mut awaiting_receipt = Vec::new();
    for (index, record) in records(doc) {
        let claimed = record.as_ref().ok().map(|r| (r.signer, r.role.clone()));
        let checked = record.and_then(|r| match check_receipted(doc, &r, directory, receipts) {
            Ok((m, received_at)) => Ok((m.name.clone(), received_at, r)),
            Err(RecordProblem::AwaitingReceipt) => {
                awaiting_receipt.push(AwaitingReceipt {
                    index,
                    action: r.action,
                    signer: r.signer,
                    role: r.role,
                    signed_at: r.signed_at,
                    heads: r.heads,
                });
                Err(RecordProblem::AwaitingReceipt)
            }
            Err(e) => Err(e),
        });
        match checked {
            Err(RecordProblem::AwaitingReceipt) => {}
            Ok((name, received_at, r)) => {
                let signed = SignedBy {
                    signer: r.signer,
                    name,
                    org: r.org,
                    role: r.role,
                    signed_at: r.signed_at,
                    received_at,
                    heads: r.heads,
                };
                match r.action {
                    Action::Approve => approvals.push(signed),
                    Action::Withdraw => withdrawals.push(signed),
                }
            }
            Err(problem) => {
                flagged.push(Flagged {
                    index,
                    signer: claimed.as_ref().map(|(signer, _)| *signer),
                    role: claimed.map(|(_, role)| role),
                    problem: problem.to_string(),
                });
            }
        }
    }
    let (withdrawn, mut effective): (Vec<SignedBy>, Vec<SignedBy>) = approvals.into_iter().partition(|a| {
        withdrawals.iter().any(|w| w.signer == a.signer && w.heads == a.heads && w.signed_at >= a.signed_at)
    });
    effective.sort_by_key(|a| (a.received_at, a.signed_at));

    // Group by content: the view at each distinct set of heads.
    let mut views: BTreeMap<Vec<ChangeHash>, DocumentView> = BTreeMap::new();
    for a in &effective {
        if !views.contains_key(&a.heads) {
            views.insert(a.heads.clone(), doc.at(&a.heads)?.view()?);
        }
    }
    let mut versions: Vec<(DocumentView, SignedVersion)> = Vec::new();
    for a in effective {
        let view = &views[&a.heads];
        match versions.iter_mut().find(|(v, _)| v == view) {
            // A signer who signed the same content twice counts once, from the first time.
            Some((_, version)) if version.signed.iter().any(|s| s.signer == a.signer) => {}
            Some((_, version)) => version.signed.push(a),
            None => versions.push((
                view.clone(),
                SignedVersion {
                    heads: a.heads.clone(),
                    signed: vec![a],
                    missing: Vec::new(),
                    is_current: *view == current,
                },
            )),
        }
    }
    for (view, version) in &mut versions {
        version.missing =
            view.signatories.iter().filter(|s| !version.signed.iter().any(|a| covers(a, s))).cloned().collect();
    }
    let completed_at = |v: &SignedVersion| v.signed.iter().map(|a| a.received_at).max();
    let in_force = versions
        .iter()
        .filter(|(view, v)| v.missing.is_empty() && !view.signatories.is_empty())
        .max_by_key(|(_, v)| completed_at(v))
        .cloned();
    let in_force_at = in_force.as_ref().and_then(|(_, v)| completed_at(v));
    let pending = versions
        .iter()
        .filter(|(view, v)| !v.missing.is_empty() || view.signatories.is_empty())
        .filter(|(_, v)| in_force_at.is_none_or(|t| completed_at(v).is_some_and(|c| c > t)))
        .max_by_key(|(_, v)| completed_at(v))
        .map(|(_, v)| v.clone());
    let state = match (&in_force, &pending) {
        (Some((view, _)), _) if *view == current => ApprovalState::Approved,
        (Some(_), _) => ApprovalState::ChangedSinceApproval,
        (None, Some(_)) => ApprovalState::AwaitingSignatures,
        (None, None) => ApprovalState::Draft,
    };
    Ok(ApprovalStatus {
        state,
        required: current.signatories,
        in_force: in_force.map(|(_, v)| v),
        pending,
        withdrawn,
        flagged,
        awaiting_receipt,
    })
}

#[cfg(test)]
mod tests;
