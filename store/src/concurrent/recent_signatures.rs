//! The authors' signatures of recently stored or read changes, in memory.
//!
//! When a change reaches the relay, every connection it is forwarded to asks
//! for its author's signature right after (see `samverkan_shared::authorship`):
//! without this, one SQLite read per connection per change. Bounded: the
//! oldest entries go first; a miss reads the database.

use std::collections::{HashMap, VecDeque};

use automerge::ChangeHash;

/// Signatures kept at most (about 100 bytes each with the map's overhead).
pub(super) const CAPACITY: usize = 16_384;

/// A bounded map from change hash to its author's signature, oldest evicted first.
#[derive(Debug, Default)]
pub(super) struct RecentSignatures {
    by_hash: HashMap<ChangeHash, [u8; 64]>,
    order: VecDeque<ChangeHash>,
}

impl RecentSignatures {
    /// Remembers `signatures`; a hash already known keeps its signature (the
    /// database keeps the first one stored, and either verifies).
    pub(super) fn insert(&mut self, signatures: impl IntoIterator<Item = (ChangeHash, [u8; 64])>) {
        for (hash, signature) in signatures {
            if self.by_hash.contains_key(&hash) {
                continue;
            }
            if self.order.len() >= CAPACITY {
                if let Some(oldest) = self.order.pop_front() {
                    self.by_hash.remove(&oldest);
                }
            }
            self.by_hash.insert(hash, signature);
            self.order.push_back(hash);
        }
    }

    /// The signatures of `hashes` known here, and the hashes that are not.
    pub(super) fn lookup(&self, hashes: &[ChangeHash]) -> (Vec<(ChangeHash, [u8; 64])>, Vec<ChangeHash>) {
        let mut found = Vec::with_capacity(hashes.len());
        let mut missing = Vec::new();
        for hash in hashes {
            match self.by_hash.get(hash) {
                Some(signature) => found.push((*hash, *signature)),
                None => missing.push(*hash),
            }
        }
        (found, missing)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(n: usize) -> ChangeHash {
        let mut bytes = [0u8; 32];
        bytes[..8].copy_from_slice(&(n as u64).to_le_bytes());
        ChangeHash(bytes)
    }

    #[test]
    fn known_hashes_are_found_and_the_oldest_go_beyond_capacity() {
        let mut recent = RecentSignatures::default();
        recent.insert((0..CAPACITY + 10).map(|n| (hash(n), [n as u8; 64])));
        let (found, missing) = recent.lookup(&[hash(0), hash(9), hash(10), hash(CAPACITY + 9)]);
        assert_eq!(missing, vec![hash(0), hash(9)], "the ten oldest were evicted");
        assert_eq!(found, vec![(hash(10), [10u8; 64]), (hash(CAPACITY + 9), [(CAPACITY + 9) as u8; 64])]);
        assert_eq!(recent.by_hash.len(), CAPACITY);
        assert_eq!(recent.order.len(), CAPACITY);
    }

    #[test]
    fn a_known_hash_keeps_its_first_signature() {
        let mut recent = RecentSignatures::default();
        recent.insert([(hash(1), [1u8; 64])]);
        recent.insert([(hash(1), [2u8; 64])]);
        assert_eq!(recent.lookup(&[hash(1)]).0, vec![(hash(1), [1u8; 64])]);
        assert_eq!(recent.order.len(), 1);
    }
}
