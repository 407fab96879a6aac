//! What one node key may make the relay read: a token bucket of bytes per
//! key, shared by the key's connections (so reconnecting does not refill it).
//!
//! Every frame received costs its size, and at least [`FRAME_COST`] bytes (a
//! small frame still costs a storage look-up or transaction). A large frame
//! is charged as its bytes arrive ([`ReceiveBudget::charge_bytes`], every
//! quarter MiB), not only once it is complete. A key whose bucket is empty is
//! not read from until it has refilled, even in the middle of a frame: its
//! connections are not admitted, and frames already flowing wait, so QUIC flow
//! control holds the sender back (it can have at most the stream's window in
//! flight meanwhile, 1 MiB with the relay's default `Limits::relay`).
//!
//! An enrolled node can then make the relay receive, decrypt, decode and look
//! up at most the configured rate on average, and the burst at once, however
//! it floods and however large its frames; honest nodes send far less, and a
//! burst (a document's history, a cold start) passes at once. A frame larger
//! than the burst (a document of many megabytes) still passes, at the rate.
//! Keys are counted only once authenticated, so the map holds enrolled keys
//! only. Never does I/O; the caller passes the time in.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use samverkan_shared::identity::NodeId;

/// The least a received frame costs, in bytes.
pub const FRAME_COST: u64 = 4 * 1024;

/// What each operation in a `Sync` frame's change chunks costs, in bytes of
/// the budget, on top of the frame's bytes, paid before the frame is handled:
/// Automerge 0.12 applies a change at up to about 2.8 µs per operation, and a
/// change of a hundred bytes can carry hundreds of thousands of them. At the
/// default rate a key gets about 260,000 such operations a second applied:
/// under one core at worst.
pub const CHANGE_OPERATION_COST: u64 = 32;

/// The same for each operation in a saved-document chunk (a whole history
/// sent at once, as to a peer holding nothing), which Automerge loads at about
/// 0.55 µs per operation: a million a second at the default rate. A node
/// uploading a thousand seed-sized documents (about seven million operations)
/// pays 56 MB, about its pace without the charge.
pub const DOCUMENT_OPERATION_COST: u64 = 8;

/// What the operations of one sync message cost (see [`CHANGE_OPERATION_COST`]).
pub fn operations_cost(ops: samverkan_shared::sync::Operations) -> u64 {
    ops.in_changes
        .saturating_mul(CHANGE_OPERATION_COST)
        .saturating_add(ops.in_documents.saturating_mul(DOCUMENT_OPERATION_COST))
}

/// Default sustained rate per key: 8 MiB/s.
pub const DEFAULT_RATE: u64 = 8 * 1024 * 1024;

/// Default burst per key: 4 MiB, hundreds of documents' changes at once. A
/// larger burst is what a flooding key makes the relay read at full speed: with
/// 16 MiB, honest edit-to-visible p99 on two cores rose 2–3.6× during a flood
/// (figure 8 of the benchmark), with 4 MiB about 1.1–1.4×.
pub const DEFAULT_BURST: u64 = 4 * 1024 * 1024;

/// The per-key token buckets.
#[derive(Debug)]
pub struct ReceiveBudget {
    /// Bytes per second each key regains.
    rate: u64,
    /// Bytes a key may have in hand at most.
    burst: u64,
    keys: Mutex<HashMap<NodeId, Bucket>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// Bytes in hand; negative while a frame's cost is being paid off.
    tokens: f64,
    at: Instant,
}

impl ReceiveBudget {
    /// Buckets regaining `rate` bytes per second, holding at most `burst` (both at least 1).
    pub fn new(rate: u64, burst: u64) -> Self {
        Self { rate: rate.max(1), burst: burst.max(1), keys: Mutex::new(HashMap::new()) }
    }

    fn bucket(&self, keys: &mut HashMap<NodeId, Bucket>, key: &NodeId, now: Instant) -> Bucket {
        let burst = self.burst as f64;
        let bucket = keys.get(key).copied().unwrap_or(Bucket { tokens: burst, at: now });
        let regained = now.saturating_duration_since(bucket.at).as_secs_f64() * self.rate as f64;
        Bucket { tokens: (bucket.tokens + regained).min(burst), at: now }
    }

    /// Charges a frame of `bytes` received from `key` (at least [`FRAME_COST`]).
    pub fn charge(&self, key: &NodeId, bytes: u64, now: Instant) {
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        let mut bucket = self.bucket(&mut keys, key, now);
        bucket.tokens -= bytes.max(FRAME_COST) as f64;
        keys.insert(*key, bucket);
    }

    /// Charges `bytes` of a frame still being received from `key` (no
    /// [`FRAME_COST`]: the frame is charged that when it is complete).
    pub fn charge_bytes(&self, key: &NodeId, bytes: u64, now: Instant) {
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        let mut bucket = self.bucket(&mut keys, key, now);
        bucket.tokens -= bytes as f64;
        keys.insert(*key, bucket);
    }

    /// How long the relay waits before it reads from `key` again (zero: at once).
    pub fn wait(&self, key: &NodeId, now: Instant) -> Duration {
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        let bucket = self.bucket(&mut keys, key, now);
        if bucket.tokens >= 0.0 {
            // Full again: nothing to remember.
            if bucket.tokens >= self.burst as f64 {
                keys.remove(key);
            }
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-bucket.tokens / self.rate as f64)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use samverkan_shared::identity::NodeKey;

    #[test]
    fn a_key_reads_its_burst_at_once_then_its_rate_and_keys_do_not_share() {
        let budget = ReceiveBudget::new(1_000_000, 2_000_000);
        let (flood, honest) = (NodeKey::generate().node_id(), NodeKey::generate().node_id());
        let t0 = Instant::now();
        budget.charge(&flood, 1_500_000, t0);
        assert_eq!(budget.wait(&flood, t0), Duration::ZERO, "within the burst");
        // A frame larger than what is left is read whole, and paid off after.
        budget.charge(&flood, 2_500_000, t0);
        assert_eq!(budget.wait(&flood, t0), Duration::from_secs(2));
        assert_eq!(budget.wait(&flood, t0 + Duration::from_secs(1)), Duration::from_secs(1));
        assert_eq!(budget.wait(&flood, t0 + Duration::from_secs(2)), Duration::ZERO);
        assert_eq!(budget.wait(&honest, t0), Duration::ZERO, "another key is not held back");
        // Small frames cost at least FRAME_COST each.
        let t1 = t0 + Duration::from_secs(10);
        for _ in 0..1000 {
            budget.charge(&honest, 10, t1);
        }
        let expected = (1000 * FRAME_COST - 2_000_000) as f64 / 1_000_000.0;
        assert!((budget.wait(&honest, t1).as_secs_f64() - expected).abs() < 1e-6);
        // Refilled keys are forgotten.
        assert_eq!(budget.wait(&flood, t1 + Duration::from_secs(100)), Duration::ZERO);
        assert!(!budget.keys.lock().unwrap().contains_key(&flood));
    }
}
