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
    /// Where the relay listens (`host:port`): relay instances that share
    /// one key and one database, the first tried first. Never empty, at most
    /// [`MAX_JOIN_ADDRESSES`] (see [`JoinCode::new`]).
    pub relay_addresses: Vec<String>,
}

/// The digest by which a node and its relay compare enrollment directories
/// (protocol 6 `Hello`): SHA-256 of the signed directory's encoding
/// ([`SignedDirectory::encode`], as the relay sends it and the node keeps it).
pub fn directory_digest(signed: &[u8]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    Sha256::digest(signed).into()
}

/// Relay addresses one join code carries at most.
pub const MAX_JOIN_ADDRESSES: usize = 16;

impl JoinCode {
    /// A join code for the relay instances at `relay_addresses` (each
    /// `host:port`, the first tried first), or what is wrong with them.
    pub fn new(secret: [u8; 16], relay_key: NodeId, relay_addresses: Vec<String>) -> Result<Self, JoinCodeError> {
        check_join_addresses(&relay_addresses).map_err(JoinCodeError::Address)?;
        Ok(Self { secret, relay_key, relay_addresses })
    }
}

impl std::fmt::Debug for JoinCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinCode").field("relay_addresses", &self.relay_addresses).finish_non_exhaustive()
    }
}

impl std::fmt::Display for JoinCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "svk1.{}.{}.{}", hex::encode(self.secret), self.relay_key, self.relay_addresses.join(","))
    }
}

/// What a join code looks like, and what to do with a bad one (the end of every [`JoinCodeError`]).
const JOIN_CODE_HELP: &str = "A join code is one line, svk1.<secret: 32 hex digits>.<relay key: 64 hex digits>.<relay address: host:port, or several separated by commas>, \
     as `samverkan-relay enroll --join-code` prints it: copy it again, whole, from the operator's message, or ask the operator for a new one";

/// Why a text is not a join code, said so that the person who pasted it can fix it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JoinCodeError {
    /// Nothing was given.
    #[error("not a join code: it is empty. {JOIN_CODE_HELP}")]
    Empty,
    /// It does not start with `svk1.`.
    #[error("not a join code: it starts with {found:?}, not \"svk1.\". {JOIN_CODE_HELP}")]
    Prefix {
        /// The first characters given (at most 12).
        found: String,
    },
    /// Fewer than the four dot-separated parts.
    #[error(
        "not a whole join code: it has {found} of the 4 parts separated by dots (svk1, secret, relay key, relay address); \
         the rest was probably cut off when it was copied. {JOIN_CODE_HELP}"
    )]
    MissingParts {
        /// How many parts there are.
        found: usize,
    },
    /// The secret (second part) is not 32 hex digits.
    #[error("the join code's secret (its second part) {0}. {JOIN_CODE_HELP}")]
    Secret(String),
    /// The relay key (third part) is not a relay's public key.
    #[error("the join code's relay key (its third part) {0}. {JOIN_CODE_HELP}")]
    RelayKey(String),
    /// The relay address (fourth part) is not `host:port` (or a list of them).
    #[error("the join code's relay address (its fourth part) {0}. {JOIN_CODE_HELP}")]
    Address(String),
}

/// Checks that `part` is exactly `digits` hex digits; says what is wrong if not.
fn hex_part(part: &str, digits: usize) -> Result<Vec<u8>, String> {
    if part.is_empty() {
        return Err(format!("is empty; it must be {digits} hex digits"));
    }
    if let Some(c) = part.chars().find(|c| !c.is_ascii_hexdigit()) {
        return Err(format!("contains {c:?}, which is not a hex digit (0-9, a-f)"));
    }
    if part.len() != digits {
        return Err(format!(
            "has {} hex digits instead of {digits}: a digit is {} (a typo or a copying mistake)",
            part.len(),
            if part.len() < digits { "missing" } else { "too many" }
        ));
    }
    hex::decode(part).map_err(|e| format!("is not hex: {e}"))
}

/// Checks a join code's addresses: one to [`MAX_JOIN_ADDRESSES`], each
/// `host:port`; says which is wrong and how if not.
pub fn check_join_addresses(addresses: &[String]) -> Result<(), String> {
    match addresses {
        [] => return check_address(""),
        [one] => return check_address(one),
        _ if addresses.len() > MAX_JOIN_ADDRESSES => {
            return Err(format!("lists {} addresses, more than the {MAX_JOIN_ADDRESSES} allowed", addresses.len()))
        }
        _ => {}
    }
    for (i, address) in addresses.iter().enumerate() {
        check_address(address).map_err(|e| format!("address {} of {}: {e}", i + 1, addresses.len()))?;
    }
    Ok(())
}

/// Checks that `address` is `host:port`; says what is wrong if not.
fn check_address(address: &str) -> Result<(), String> {
    if address.is_empty() {
        return Err("is missing; it must be the relay's host:port, e.g. relay.example.se:7878".to_string());
    }
    let Some((host, port)) = address.rsplit_once(':') else {
        return Err(format!("{address:?} has no port; it must be host:port, e.g. relay.example.se:7878"));
    };
    if host.is_empty() || host == "[]" {
        return Err(format!("{address:?} has no host name; it must be host:port, e.g. relay.example.se:7878"));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err(format!("{address:?} has the port {port:?}, which is not a number from 1 to 65535")),
    }
}

impl std::str::FromStr for JoinCode {
    type Err = JoinCodeError;

    /// Parses the text form. White space anywhere is ignored (a code wrapped
    /// over two lines by an e-mail program still reads); anything else wrong
    /// is named ([`JoinCodeError`]).
    fn from_str(text: &str) -> Result<Self, JoinCodeError> {
        let text: String = text.chars().filter(|c| !c.is_whitespace()).collect();
        if text.is_empty() {
            return Err(JoinCodeError::Empty);
        }
        let parts: Vec<&str> = text.splitn(4, '.').collect();
        if parts[0] != "svk1" {
            let found: String = text.chars().take(12).collect();
            return Err(JoinCodeError::Prefix { found });
        }
        let [_, secret, relay_key, relay_address] = parts[..] else {
            return Err(JoinCodeError::MissingParts { found: parts.len() });
        };
        let secret: [u8; 16] = hex_part(secret, 32)
            .map_err(JoinCodeError::Secret)?
            .try_into()
            .map_err(|_| JoinCodeError::Secret("is not 16 bytes".to_string()))?;
        let key: [u8; 32] = hex_part(relay_key, 64)
            .map_err(JoinCodeError::RelayKey)?
            .try_into()
            .map_err(|_| JoinCodeError::RelayKey("is not 32 bytes".to_string()))?;
        let relay_key = NodeId::from_bytes(&key)
            .map_err(|_| JoinCodeError::RelayKey("is not a valid relay key (not an ed25519 public key)".to_string()))?;
        Self::new(secret, relay_key, relay_address.split(',').map(str::to_string).collect())
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
        let code = JoinCode::new([7; 16], NodeKey::generate().node_id(), vec!["relay.lst.se:7878".into()]).unwrap();
        assert_eq!(code.to_string().parse::<JoinCode>().unwrap(), code);
        // Several instances of one relay: every address, in order.
        let addresses = vec!["relay1.lst.se:7878".to_string(), "[2001:db8::7]:7878".into(), "10.0.0.3:7878".into()];
        let several = JoinCode::new([7; 16], code.relay_key, addresses.clone()).unwrap();
        assert!(several.to_string().ends_with(".relay1.lst.se:7878,[2001:db8::7]:7878,10.0.0.3:7878"));
        assert_eq!(several.to_string().parse::<JoinCode>().unwrap().relay_addresses, addresses);
        assert!(JoinCode::new([7; 16], code.relay_key, Vec::new()).is_err(), "no address");
        let too_many = vec!["relay.lst.se:7878".to_string(); MAX_JOIN_ADDRESSES + 1];
        assert!(JoinCode::new([7; 16], code.relay_key, too_many).unwrap_err().to_string().contains("more than the 16"));
        for bad in ["", "svk1", "svk2.00.11.x", &format!("svk1.{}.{}.", hex::encode([1; 16]), code.relay_key)] {
            assert!(bad.parse::<JoinCode>().is_err(), "{bad}");
        }
        assert!(!format!("{code:?}").contains("0707"), "the secret stays out of logs");
        // Wrapped over two lines by an e-mail program: still the same code.
        let text = code.to_string();
        assert_eq!(format!("  {}\n{}  ", &text[..60], &text[60..]).parse::<JoinCode>().unwrap(), code);
    }

    #[test]
    fn a_garbled_join_code_says_which_part_is_wrong_and_what_to_do() {
        let secret = hex::encode([7; 16]);
        let key = NodeKey::generate().node_id().to_string();
        // 64 hex digits that are no ed25519 public key.
        let not_a_key = (0..=255u8)
            .map(|b| hex::encode([b; 32]))
            .find(|k| NodeId::from_bytes(&[u8::from_str_radix(&k[..2], 16).unwrap(); 32]).is_err())
            .expect("some byte pattern is not a curve point");
        let cases: [(String, &str); 15] = [
            (String::new(), "it is empty"),
            (format!("svk2.{secret}.{key}.relay.lst.se:7878"), "starts with \"svk2.0707070\""),
            (format!("https://relay.lst.se/{secret}"), "not \"svk1.\""),
            ("svk1".to_string(), "1 of the 4 parts"),
            (format!("svk1.{secret}.{key}"), "3 of the 4 parts"),
            (
                format!("svk1.{}.{key}.relay.lst.se:7878", &secret[..31]),
                "secret (its second part) has 31 hex digits instead of 32: a digit is missing",
            ),
            (format!("svk1.{secret}x.{key}.relay.lst.se:7878"), "secret (its second part) contains 'x'"),
            (
                format!("svk1.{secret}.{}.relay.lst.se:7878", &key[..63]),
                "relay key (its third part) has 63 hex digits instead of 64",
            ),
            (format!("svk1.{secret}.{not_a_key}.relay.lst.se:7878"), "not a valid relay key"),
            (format!("svk1.{secret}.{key}."), "relay address (its fourth part) is missing"),
            (format!("svk1.{secret}.{key}.relay.lst.se"), "\"relay.lst.se\" has no port"),
            (format!("svk1.{secret}.{key}.relay.lst.se:78x8"), "port \"78x8\", which is not a number"),
            (format!("svk1.{secret}.{key}.:7878"), "has no host name"),
            (format!("svk1.{secret}.{key}.relay.lst.se:7878,relay2"), "address 2 of 2: \"relay2\" has no port"),
            (format!("svk1.{secret}.{key}.relay.lst.se:7878,"), "address 2 of 2: is missing"),
        ];
        for (text, expected) in cases {
            let message = text.parse::<JoinCode>().unwrap_err().to_string();
            assert!(message.contains(expected), "{text:?}: {message}");
            assert!(message.contains("copy it again, whole"), "every message says what to do: {message}");
            assert!(!message.contains("signed directory"), "{message}");
        }
    }
}
