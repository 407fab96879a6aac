//! Typed identifiers: documents and the items inside them.
//!
//! Ids are plain strings on the wire and in Automerge, but carry their meaning
//! in the type system here so a document id is never confused with an item id.

use std::fmt;
use std::str::FromStr;

use rand::RngCore;
use serde::{Deserialize, Serialize};

/// Error for a string that is not a valid id of the expected kind.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind} id {value:?}: expected {expected}")]
pub struct IdError {
    kind: &'static str,
    value: String,
    expected: &'static str,
}

/// Identifies one collaboration document across every node and the relay.
///
/// 32 lowercase hex digits (128 random bits). The CLI accepts unique prefixes.
/// Held inline (32 bytes, no allocation): sets and maps of many ids, such as a
/// peer's list of document heads, cost what the ids take and no more.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct DocId([u8; DocId::LEN]);

impl DocId {
    /// Length of a document id in hex digits.
    pub const LEN: usize = 32;

    /// A fresh random document id.
    pub fn random() -> Self {
        let mut bytes = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        Self::from_bytes(bytes)
    }

    /// The id of these 128 bits (their lowercase hex digits), as on the wire.
    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut digits = [0u8; Self::LEN];
        for (i, byte) in bytes.iter().enumerate() {
            digits[2 * i] = HEX[usize::from(byte >> 4)];
            digits[2 * i + 1] = HEX[usize::from(byte & 0x0f)];
        }
        Self(digits)
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        // Only ASCII hex digits are ever stored (every constructor checks or makes them).
        std::str::from_utf8(&self.0).unwrap_or_default()
    }

    /// The first eight digits, enough to tell documents apart in listings.
    pub fn short(&self) -> &str {
        &self.as_str()[..8]
    }
}

impl FromStr for DocId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match <[u8; Self::LEN]>::try_from(s.as_bytes()) {
            Ok(digits) if digits.iter().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b)) => Ok(Self(digits)),
            _ => Err(IdError { kind: "document", value: s.to_string(), expected: "32 lowercase hex digits" }),
        }
    }
}

impl TryFrom<String> for DocId {
    type Error = IdError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<DocId> for String {
    fn from(id: DocId) -> Self {
        id.as_str().to_string()
    }
}

impl fmt::Display for DocId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for DocId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DocId({})", self.as_str())
    }
}

/// Identifies an item inside a document's list (a goal, activity, follow-up or meeting).
///
/// 8 lowercase hex digits, random, so two nodes adding items offline never collide in practice.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ItemId(String);

impl ItemId {
    /// A fresh random item id.
    pub fn random() -> Self {
        let mut bytes = [0u8; 4];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        Self(hex::encode(bytes))
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for ItemId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if !s.is_empty() && s.len() <= 32 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            Ok(Self(s.to_ascii_lowercase()))
        } else {
            Err(IdError { kind: "item", value: s.to_string(), expected: "1-32 letters, digits or '-'" })
        }
    }
}

impl TryFrom<String> for ItemId {
    type Error = IdError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<ItemId> for String {
    fn from(id: ItemId) -> Self {
        id.0
    }
}

impl fmt::Display for ItemId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ItemId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ItemId({})", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doc_ids_round_trip_and_reject_garbage() {
        let id = DocId::random();
        assert_eq!(id.as_str().parse::<DocId>().unwrap(), id);
        assert_eq!(id.short().len(), 8);
        assert!("xyz".parse::<DocId>().is_err());
        assert!("ABCDEF0123456789ABCDEF0123456789".parse::<DocId>().is_err());
        assert!("åbcdef0123456789abcdef012345678".parse::<DocId>().is_err(), "32 bytes, not 32 hex digits");
        let bytes = [0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef, 0xfe, 0xdc, 0xba, 0x98, 0x76, 0x54, 0x32, 0x10];
        assert_eq!(DocId::from_bytes(bytes).as_str(), hex::encode(bytes));
        assert_eq!(String::from(id.clone()), id.to_string());
        assert_eq!(serde_json::to_string(&id).unwrap(), format!("\"{id}\""));
        let (a, b) = ("0f".repeat(16).parse::<DocId>().unwrap(), "f0".repeat(16).parse::<DocId>().unwrap());
        assert!(a < b, "ordered as their digits");
    }

    #[test]
    fn item_ids_are_normalised_to_lowercase() {
        assert_eq!("AB12".parse::<ItemId>().unwrap().as_str(), "ab12");
        assert!("".parse::<ItemId>().is_err());
        assert!("a b".parse::<ItemId>().is_err());
    }
}
