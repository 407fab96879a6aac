//! Which new connections the relay takes in, before anyone is authenticated.
//!
//! A connection costs the relay a slot from the first QUIC Initial packet
//! until its peer is authenticated (the TLS handshake, then a `Hello` or
//! `Join` within the handshake timeout), and an Initial packet is all it takes
//! to start: its source address need not even be the sender's. Without a
//! limit, an outsider keeps every connection slot in a handshake that never
//! ends (from made-up addresses, a few packets a second), or in a TLS session
//! that never says who it is (from one address of its own), and enrolled nodes
//! are refused.
//!
//! [`HandshakeGate`] answers each attempt: unauthenticated connections up to
//! `retry_above` are taken as they come (no extra round trip in normal use);
//! beyond that, an attempt whose address QUIC has not validated gets a Retry
//! packet (stateless: a client that owns its address answers it with the
//! token, one round trip later; a made-up address never does), and one whose
//! address is validated is taken unless that address already has
//! `per_address` unauthenticated connections. Only validated addresses are
//! counted per address, so that nobody can use up another address's share by
//! sending packets in its name. The [`HandshakeTicket`] an accepted attempt
//! gets is held until its peer is authenticated or the connection ends, and
//! neither the handshake nor the first frame may take longer than the
//! transport's `handshake_timeout` (see `server`).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use prometheus_client::metrics::gauge::Gauge;

/// Unauthenticated connections beyond which unvalidated addresses get a Retry.
pub const DEFAULT_RETRY_ABOVE: usize = 64;

/// Unauthenticated connections one validated address may have at once.
pub const DEFAULT_PER_ADDRESS: usize = 16;

/// What to do with a connection attempt.
#[derive(Debug)]
pub enum Admission {
    /// Go on with the handshake; the ticket counts it until dropped.
    Accept(HandshakeTicket),
    /// Answer with a QUIC Retry (address validation) and keep nothing.
    Retry,
    /// Refuse: this (validated) address already has its share of handshakes.
    Refuse,
}

/// Counts the unauthenticated connections, in all and per validated address.
#[derive(Debug, Clone)]
pub struct HandshakeGate {
    counts: Arc<Counted>,
    retry_above: usize,
    per_address: usize,
}

/// The counts, shared by the gate and its tickets, and the gauge they are reported to.
#[derive(Debug, Default)]
struct Counted {
    counts: Mutex<Counts>,
    gauge: Option<Gauge>,
}

#[derive(Debug, Default)]
struct Counts {
    in_progress: usize,
    by_address: HashMap<IpAddr, usize>,
}

impl Counted {
    fn lock(&self) -> MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn report(&self, counts: &Counts) {
        if let Some(gauge) = &self.gauge {
            gauge.set(counts.in_progress as i64);
        }
    }
}

impl HandshakeGate {
    /// A gate that retries unvalidated addresses beyond `retry_above`
    /// unauthenticated connections and allows `per_address` per validated
    /// address; the number in progress is kept in `gauge` if given.
    pub fn new(retry_above: usize, per_address: usize, gauge: Option<Gauge>) -> Self {
        Self {
            counts: Arc::new(Counted { counts: Mutex::default(), gauge }),
            retry_above,
            per_address: per_address.max(1),
        }
    }

    /// Unauthenticated connections now.
    pub fn in_progress(&self) -> usize {
        self.lock().in_progress
    }

    /// Decides on an attempt from `address`; `validated`: QUIC has validated
    /// it (the attempt carries a Retry token); `may_retry`: a Retry can still
    /// be sent (not for an attempt that already answered one).
    pub fn admit(&self, address: IpAddr, validated: bool, may_retry: bool) -> Admission {
        let mut counts = self.lock();
        if counts.in_progress < self.retry_above {
            let counted = validated.then_some(address);
            if let Some(address) = counted {
                *counts.by_address.entry(address).or_default() += 1;
            }
            counts.in_progress += 1;
            self.counts.report(&counts);
            return Admission::Accept(HandshakeTicket { counts: self.counts.clone(), address: counted });
        }
        if !validated {
            // A made-up address never answers a Retry; without one, the attempt is refused.
            return if may_retry { Admission::Retry } else { Admission::Refuse };
        }
        if counts.by_address.get(&address).copied().unwrap_or(0) >= self.per_address {
            return Admission::Refuse;
        }
        *counts.by_address.entry(address).or_default() += 1;
        counts.in_progress += 1;
        self.counts.report(&counts);
        Admission::Accept(HandshakeTicket { counts: self.counts.clone(), address: Some(address) })
    }

    fn lock(&self) -> MutexGuard<'_, Counts> {
        self.counts.lock()
    }
}

/// One unauthenticated connection, counted until dropped (when its peer is
/// authenticated, or the handshake or the connection ends).
#[derive(Debug)]
pub struct HandshakeTicket {
    counts: Arc<Counted>,
    address: Option<IpAddr>,
}

impl Drop for HandshakeTicket {
    fn drop(&mut self) {
        let mut counts = self.counts.lock();
        counts.in_progress = counts.in_progress.saturating_sub(1);
        if let Some(address) = self.address {
            if let Some(n) = counts.by_address.get_mut(&address) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    counts.by_address.remove(&address);
                }
            }
        }
        self.counts.report(&counts);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([192, 0, 2, last])
    }

    #[test]
    fn below_the_threshold_everyone_is_taken_at_once() {
        let gate = HandshakeGate::new(4, 2, None);
        let tickets: Vec<_> = (0..4)
            .map(|i| match gate.admit(ip(1), i % 2 == 0, true) {
                Admission::Accept(ticket) => ticket,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(gate.in_progress(), 4);
        drop(tickets);
        assert_eq!(gate.in_progress(), 0);
        assert!(gate.lock().by_address.is_empty(), "nothing stays per address");
    }

    #[test]
    fn beyond_the_threshold_unvalidated_addresses_get_a_retry_and_validated_ones_their_share() {
        let gate = HandshakeGate::new(2, 2, None);
        // Two made-up addresses fill the threshold and are never finished.
        let _flood: Vec<_> = (0..2).map(|i| gate.admit(ip(100 + i), false, true)).collect();
        assert_eq!(gate.in_progress(), 2);
        for i in 0..1000 {
            assert!(matches!(gate.admit(ip((i % 200) as u8), false, true), Admission::Retry));
        }
        assert_eq!(gate.in_progress(), 2, "a Retry keeps nothing");
        assert!(matches!(gate.admit(ip(7), false, false), Admission::Refuse), "no second Retry");
        // A client that answered the Retry is taken, up to its address's share.
        let first = gate.admit(ip(7), true, false);
        let second = gate.admit(ip(7), true, false);
        assert!(matches!((&first, &second), (Admission::Accept(_), Admission::Accept(_))));
        assert!(matches!(gate.admit(ip(7), true, false), Admission::Refuse));
        assert!(matches!(gate.admit(ip(8), true, false), Admission::Accept(_)), "another address has its own");
        drop(first);
        assert!(matches!(gate.admit(ip(7), true, false), Admission::Accept(_)), "a finished one frees its place");
    }

    #[test]
    fn packets_in_another_addresss_name_do_not_use_up_its_share() {
        let gate = HandshakeGate::new(3, 1, None);
        // Unvalidated attempts "from" the victim's address, below the threshold.
        let _spoofed: Vec<_> = (0..3).map(|_| gate.admit(ip(9), false, true)).collect();
        // The victim answers its Retry and is taken.
        assert!(matches!(gate.admit(ip(9), true, false), Admission::Accept(_)));
    }
}
