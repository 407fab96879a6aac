//! Identities: ed25519 keys of nodes (and later signers and the relay).
//!
//! A node's public key *is* its identity: it names the node in the directory,
//! becomes its Automerge actor id (so every change names the key that made it),
//! and later authenticates it on QUIC. This module only computes; storing the
//! secret key with owner-only permissions is the node's job.

use std::fmt;
use std::str::FromStr;

use automerge::ActorId;
use ed25519_dalek::{SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

/// Errors reading keys and ids.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The text is not a key file this version understands.
    #[error("not a Samverkan key file (expected a line starting with {expected:?})")]
    NotAKeyFile {
        /// The header the file should start with.
        expected: &'static str,
    },
    /// The key material is not 32 bytes of hex or not a valid ed25519 point.
    #[error("malformed key: {0}")]
    Malformed(String),
}

/// Public identity of a node: its ed25519 verifying key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct NodeId(VerifyingKey);

impl NodeId {
    /// The node with these public-key bytes, if they are a valid ed25519 key.
    pub fn from_bytes(bytes: &[u8; 32]) -> Result<Self, IdentityError> {
        VerifyingKey::from_bytes(bytes)
            .map(Self)
            .map_err(|e| IdentityError::Malformed(format!("not an ed25519 public key: {e}")))
    }

    /// The raw 32 public-key bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        self.0.as_bytes()
    }

    /// The verifying key, for signature checks.
    pub fn verifying_key(&self) -> &VerifyingKey {
        &self.0
    }

    /// The Automerge actor id this node writes changes under (its public key bytes).
    pub fn actor_id(&self) -> ActorId {
        ActorId::from(self.as_bytes().as_slice())
    }

    /// The node whose key is this actor id, if the actor id is a valid public key.
    pub fn from_actor(actor: &ActorId) -> Option<Self> {
        let bytes: [u8; 32] = actor.to_bytes().try_into().ok()?;
        VerifyingKey::from_bytes(&bytes).ok().map(Self)
    }

    /// A short, readable form for people: the first 10 bytes in base32, grouped
    /// (e.g. `k7dq-2mxa-p4fh-e6bz`). Enough to tell nodes apart; not for pinning.
    pub fn short(&self) -> String {
        let encoded = base32(&self.as_bytes()[..10]);
        encoded.as_bytes().chunks(4).map(|c| String::from_utf8_lossy(c).into_owned()).collect::<Vec<_>>().join("-")
    }
}

impl From<VerifyingKey> for NodeId {
    fn from(key: VerifyingKey) -> Self {
        Self(key)
    }
}

impl fmt::Display for NodeId {
    /// Full form: 64 hex digits.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.as_bytes()))
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({})", self.short())
    }
}

impl FromStr for NodeId {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = decode_32(s.trim())?;
        VerifyingKey::from_bytes(&bytes)
            .map(Self)
            .map_err(|e| IdentityError::Malformed(format!("not an ed25519 public key: {e}")))
    }
}

impl TryFrom<String> for NodeId {
    type Error = IdentityError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<NodeId> for String {
    fn from(id: NodeId) -> Self {
        id.to_string()
    }
}

/// A node's secret key.
pub struct NodeKey(SigningKey);

impl NodeKey {
    /// First line of a node key file.
    pub const FILE_HEADER: &'static str = "samverkan-node-key-v1";

    /// A fresh key from the operating system's randomness.
    pub fn generate() -> Self {
        Self(SigningKey::generate(&mut rand::rngs::OsRng))
    }

    /// The public identity.
    pub fn node_id(&self) -> NodeId {
        NodeId(self.0.verifying_key())
    }

    /// The signing key, for signatures made by this node.
    pub fn signing_key(&self) -> &SigningKey {
        &self.0
    }

    /// The key file contents: a header line and the 32-byte secret in hex.
    pub fn to_file_contents(&self) -> String {
        format!("{}\n{}\n", Self::FILE_HEADER, hex::encode(self.0.to_bytes()))
    }

    /// A node key from an ed25519 signing key (fixed keys in tests and fuzzing).
    pub fn from_signing_key(key: SigningKey) -> Self {
        Self(key)
    }

    /// Parses what [`NodeKey::to_file_contents`] wrote.
    pub fn from_file_contents(text: &str) -> Result<Self, IdentityError> {
        let mut lines = text.lines();
        if lines.next().map(str::trim) != Some(Self::FILE_HEADER) {
            return Err(IdentityError::NotAKeyFile { expected: Self::FILE_HEADER });
        }
        let secret = decode_32(lines.next().unwrap_or("").trim())?;
        Ok(Self(SigningKey::from_bytes(&secret)))
    }
}

impl fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeKey({:?})", self.node_id())
    }
}

fn decode_32(s: &str) -> Result<[u8; 32], IdentityError> {
    let bytes = hex::decode(s).map_err(|e| IdentityError::Malformed(format!("not hex: {e}")))?;
    bytes.try_into().map_err(|b: Vec<u8>| IdentityError::Malformed(format!("expected 32 bytes, got {}", b.len())))
}

/// RFC 4648 base32, lowercase, without padding.
fn base32(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
    let mut out = String::new();
    let mut buffer: u32 = 0;
    let mut bits = 0;
    for &b in bytes {
        buffer = (buffer << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(ALPHABET[((buffer >> bits) & 31) as usize] as char);
        }
    }
    if bits > 0 {
        out.push(ALPHABET[((buffer << (5 - bits)) & 31) as usize] as char);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_file_round_trips_and_rejects_foreign_text() {
        let key = NodeKey::generate();
        let back = NodeKey::from_file_contents(&key.to_file_contents()).unwrap();
        assert_eq!(back.node_id(), key.node_id());
        assert!(matches!(NodeKey::from_file_contents("hello"), Err(IdentityError::NotAKeyFile { .. })));
        let truncated = format!("{}\nabcd\n", NodeKey::FILE_HEADER);
        assert!(matches!(NodeKey::from_file_contents(&truncated), Err(IdentityError::Malformed(_))));
    }

    #[test]
    fn node_id_maps_to_actor_and_back() {
        let id = NodeKey::generate().node_id();
        assert_eq!(NodeId::from_actor(&id.actor_id()), Some(id));
        assert_eq!(id.to_string().parse::<NodeId>().unwrap(), id);
        let short = id.short();
        assert_eq!(short.len(), 19, "{short}");
        assert_eq!(short.matches('-').count(), 3);
    }

    #[test]
    fn base32_matches_rfc4648_vectors() {
        assert_eq!(base32(b"f"), "my");
        assert_eq!(base32(b"foobar"), "mzxw6ytboi");
    }
}
