//! The enrollment directory: which keys may take part, and as whom.
//!
//! The relay operator keeps it (`samverkan-relay enroll | revoke | list`); the
//! relay signs it with its own key and sends it to every node when it
//! connects, so that any node can resolve a key to an organisation and a name
//! offline, and check that an approval's signer held a role at signing time.
//! Entries are never deleted: a revoked key keeps its entry with the time of
//! revocation, so history stays explainable.
//!
//! This module only computes: times are passed in, signing keys are given.

use chrono::{DateTime, Utc};
use ed25519_dalek::{Signature, Signer, SigningKey};
use serde::{Deserialize, Serialize};

use crate::identity::NodeId;
use crate::org::OrgId;

/// Domain separation for directory signatures.
const SIGNING_CONTEXT: &[u8] = b"samverkan-directory-v1\0";

/// Errors of the directory.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DirectoryError {
    /// The key is enrolled already (and not revoked).
    #[error("key {0} is already enrolled")]
    AlreadyEnrolled(String),
    /// No active entry for the key.
    #[error("key {0} is not enrolled (or is revoked already)")]
    NotEnrolled(String),
    /// A name or role is empty or too long.
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// Which field.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// The signed directory does not decode.
    #[error("the signed directory is malformed: {0}")]
    Malformed(String),
    /// The signature does not verify with the expected relay key.
    #[error("the directory's signature does not verify with relay key {0}")]
    BadSignature(String),
}

/// What an enrolled key is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemberKind {
    /// A node (a party's installation) that syncs documents.
    Node,
    /// A person who signs approvals (with a role title).
    Signer,
}

/// One enrolled key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// The public key.
    pub key: NodeId,
    /// Node or signer.
    pub kind: MemberKind,
    /// The organisation it belongs to.
    pub org: OrgId,
    /// A readable name ("Flen BF-samordnare", "Landshövding Anna Andersson").
    pub name: String,
    /// Role title, for signers ("Landshövding", "Polisområdeschef").
    pub role: Option<String>,
    /// When it was enrolled.
    pub enrolled_at: DateTime<Utc>,
    /// When it was revoked, if it was.
    pub revoked_at: Option<DateTime<Utc>>,
}

impl Member {
    /// Whether the key was enrolled and not revoked at `at`.
    pub fn active_at(&self, at: DateTime<Utc>) -> bool {
        self.enrolled_at <= at && self.revoked_at.is_none_or(|r| at < r)
    }

    /// Whether the key is enrolled and not revoked now.
    pub fn is_active(&self) -> bool {
        self.revoked_at.is_none()
    }
}

/// The whole directory; `version` grows with every change.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollmentDirectory {
    /// Grows by one with every change; nodes keep the newest they have seen.
    pub version: u64,
    /// Every key ever enrolled, in enrollment order.
    pub members: Vec<Member>,
}

impl EnrollmentDirectory {
    /// Enrolls a key. A key can be enrolled again after it was revoked.
    pub fn enroll(&mut self, member: Member) -> Result<(), DirectoryError> {
        check_text("name", &member.name)?;
        if let Some(role) = &member.role {
            check_text("role", role)?;
        }
        if self.active(&member.key).is_some() {
            return Err(DirectoryError::AlreadyEnrolled(member.key.to_string()));
        }
        self.members.push(member);
        self.version += 1;
        Ok(())
    }

    /// Revokes a key's active entry at `at`.
    pub fn revoke(&mut self, key: &NodeId, at: DateTime<Utc>) -> Result<&Member, DirectoryError> {
        let member = self
            .members
            .iter_mut()
            .rev()
            .find(|m| &m.key == key && m.is_active())
            .ok_or_else(|| DirectoryError::NotEnrolled(key.to_string()))?;
        member.revoked_at = Some(at);
        self.version += 1;
        Ok(member)
    }

    /// The active entry of a key.
    pub fn active(&self, key: &NodeId) -> Option<&Member> {
        self.members.iter().rev().find(|m| &m.key == key && m.is_active())
    }

    /// The newest entry of a key, active or revoked (for names in history).
    pub fn latest(&self, key: &NodeId) -> Option<&Member> {
        self.members.iter().rev().find(|m| &m.key == key)
    }

    /// The entry under which a key was active at `at`.
    pub fn active_at(&self, key: &NodeId, at: DateTime<Utc>) -> Option<&Member> {
        self.members.iter().rev().find(|m| &m.key == key && m.active_at(at))
    }

    /// Signs the directory with the relay's key.
    pub fn sign(&self, relay: &SigningKey) -> SignedDirectory {
        // Serialising plain structs with string keys cannot fail.
        let payload = serde_json::to_string(self).unwrap_or_default();
        let signature = relay.sign(&signed_message(payload.as_bytes()));
        SignedDirectory {
            payload,
            relay: NodeId::from(relay.verifying_key()),
            signature: hex::encode(signature.to_bytes()),
        }
    }
}

fn check_text(field: &'static str, text: &str) -> Result<(), DirectoryError> {
    let invalid = |reason: &str| DirectoryError::Invalid { field, reason: reason.to_string() };
    if text.trim().is_empty() {
        return Err(invalid("empty"));
    }
    if text.chars().count() > 200 {
        return Err(invalid("longer than 200 characters"));
    }
    if text.chars().any(char::is_control) {
        return Err(invalid("contains control characters"));
    }
    Ok(())
}

fn signed_message(payload: &[u8]) -> Vec<u8> {
    let mut message = SIGNING_CONTEXT.to_vec();
    message.extend_from_slice(payload);
    message
}

/// The directory as sent to nodes: the exact JSON that was signed, the relay
/// key and the signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedDirectory {
    /// The directory as JSON, exactly as signed.
    pub payload: String,
    /// The key that signed it.
    pub relay: NodeId,
    /// The ed25519 signature, hex.
    pub signature: String,
}

impl SignedDirectory {
    /// The bytes sent on the wire and stored.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Decodes what [`SignedDirectory::encode`] wrote (does not verify).
    pub fn decode(bytes: &[u8]) -> Result<Self, DirectoryError> {
        serde_json::from_slice(bytes).map_err(|e| DirectoryError::Malformed(e.to_string()))
    }

    /// Verifies the signature with the pinned relay key (strict ed25519) and
    /// returns the directory.
    pub fn verify(&self, relay: &NodeId) -> Result<EnrollmentDirectory, DirectoryError> {
        let bad = || DirectoryError::BadSignature(relay.to_string());
        if &self.relay != relay {
            return Err(bad());
        }
        let bytes: [u8; 64] = hex::decode(&self.signature).ok().and_then(|b| b.try_into().ok()).ok_or_else(bad)?;
        relay
            .verifying_key()
            .verify_strict(&signed_message(self.payload.as_bytes()), &Signature::from_bytes(&bytes))
            .map_err(|_| bad())?;
        serde_json::from_str(&self.payload).map_err(|e| DirectoryError::Malformed(e.to_string()))
    }
}

/// A one-time code with which a node joins: where the relay is, the relay's
/// key to pin, and a secret the relay accepts once.
///
/// Text form: `svk1.<secret: 32 hex>.<relay key: 64 hex>.<relay address>`.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinCode {
    /// The secret the relay accepts once.
    pub secret: [u8; 16],
    /// The relay's key, pinned by the node.
    pub relay_key: NodeId,
    /// Where the relay listens (`host:port`).
    pub relay_address: String,
}

impl std::fmt::Debug for JoinCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinCode").field("relay_address", &self.relay_address).finish_non_exhaustive()
    }
}

impl std::fmt::Display for JoinCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "svk1.{}.{}.{}", hex::encode(self.secret), self.relay_key, self.relay_address)
    }
}

impl std::str::FromStr for JoinCode {
    type Err = DirectoryError;

    fn from_str(text: &str) -> Result<Self, DirectoryError> {
        let bad = |why: &str| {
            DirectoryError::Malformed(format!(
                "not a join code ({why}); it looks like svk1.<32 hex>.<64 hex>.<host:port>"
            ))
        };
        let mut parts = text.trim().splitn(4, '.');
        if parts.next() != Some("svk1") {
            return Err(bad("wrong prefix"));
        }
        let secret = parts
            .next()
            .and_then(|s| hex::decode(s).ok())
            .and_then(|b| <[u8; 16]>::try_from(b).ok())
            .ok_or_else(|| bad("bad secret"))?;
        let relay_key = parts.next().and_then(|s| s.parse().ok()).ok_or_else(|| bad("bad relay key"))?;
        let relay_address = parts.next().filter(|a| !a.is_empty()).ok_or_else(|| bad("no relay address"))?.to_string();
        Ok(Self { secret, relay_key, relay_address })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::NodeKey;

    fn member(key: &NodeKey, org: &str, name: &str) -> Member {
        Member {
            key: key.node_id(),
            kind: MemberKind::Node,
            org: OrgId::new(org).unwrap(),
            name: name.into(),
            role: None,
            enrolled_at: "2025-01-01T00:00:00Z".parse().unwrap(),
            revoked_at: None,
        }
    }

    #[test]
    fn enroll_revoke_and_enroll_again() {
        let mut dir = EnrollmentDirectory::default();
        let key = NodeKey::generate();
        dir.enroll(member(&key, "flen", "Flen")).unwrap();
        assert!(matches!(dir.enroll(member(&key, "flen", "Flen")), Err(DirectoryError::AlreadyEnrolled(_))));
        let revoked_at: DateTime<Utc> = "2025-06-01T00:00:00Z".parse().unwrap();
        dir.revoke(&key.node_id(), revoked_at).unwrap();
        assert!(dir.active(&key.node_id()).is_none());
        assert!(dir.active_at(&key.node_id(), "2025-03-01T00:00:00Z".parse().unwrap()).is_some());
        assert!(dir.active_at(&key.node_id(), "2025-07-01T00:00:00Z".parse().unwrap()).is_none());
        assert_eq!(dir.latest(&key.node_id()).unwrap().name, "Flen");
        assert!(matches!(dir.revoke(&key.node_id(), revoked_at), Err(DirectoryError::NotEnrolled(_))));
        dir.enroll(member(&key, "flen", "Flen igen")).unwrap();
        assert_eq!(dir.version, 3);
        assert!(matches!(dir.enroll(member(&NodeKey::generate(), "flen", " ")), Err(DirectoryError::Invalid { .. })));
    }

    #[test]
    fn signature_binds_payload_and_relay() {
        let relay = NodeKey::generate();
        let mut dir = EnrollmentDirectory::default();
        dir.enroll(member(&NodeKey::generate(), "trosa", "Trosa")).unwrap();
        let signed = dir.sign(relay.signing_key());
        let back = SignedDirectory::decode(&signed.encode()).unwrap();
        assert_eq!(back.verify(&relay.node_id()).unwrap(), dir);

        let other = NodeKey::generate();
        assert!(matches!(back.verify(&other.node_id()), Err(DirectoryError::BadSignature(_))));
        let mut tampered = back.clone();
        tampered.payload = tampered.payload.replace("Trosa", "Trozа");
        assert!(matches!(tampered.verify(&relay.node_id()), Err(DirectoryError::BadSignature(_))));
        let mut forged = dir.sign(other.signing_key());
        forged.relay = relay.node_id();
        assert!(matches!(forged.verify(&relay.node_id()), Err(DirectoryError::BadSignature(_))));
        assert!(matches!(SignedDirectory::decode(b"{"), Err(DirectoryError::Malformed(_))));
    }

    #[test]
    fn join_codes_round_trip_and_refuse_garbage() {
        let code = JoinCode {
            secret: [7; 16],
            relay_key: NodeKey::generate().node_id(),
            relay_address: "relay.lst.se:7878".into(),
        };
        assert_eq!(code.to_string().parse::<JoinCode>().unwrap(), code);
        for bad in ["", "svk1", "svk2.00.11.x", &format!("svk1.{}.{}.", hex::encode([1; 16]), code.relay_key)] {
            assert!(bad.parse::<JoinCode>().is_err(), "{bad}");
        }
        assert!(!format!("{code:?}").contains("0707"), "the secret stays out of logs");
    }
}
