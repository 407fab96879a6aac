//! The in-process baselines: nodes and a relay as sans-IO [`SyncConnection`]s
//! over documents in memory ([`MemoryDocs`], the shared in-memory driver that
//! tests and fuzzing use too: edits in place, the same acceptance checks as the
//! real drivers, signatures kept beside the documents), frames handed across
//! directly (encoded only to count bytes). Real Automerge sync, no network, no disk.

use std::time::Instant;

use anyhow::{anyhow, Result};
use samverkan_shared::ids::DocId;
use samverkan_shared::sync::{ConnectionEvent, MemoryDocs, SyncConnection};
use samverkan_shared::wire::Frame;

/// Persisted sync states of one connection: the node's end, then the relay's end.
pub type States = (Vec<(DocId, Vec<u8>)>, Vec<(DocId, Vec<u8>)>);

/// Documents in memory ([`MemoryDocs`], the driver tests and fuzzing use too),
/// every change signed on the spot by its author's key as a node signs its own
/// (every author here was made by the benchmark), signatures kept beside them.
pub fn memory_docs() -> MemoryDocs {
    MemoryDocs::new().with_signer(crate::fixtures::sign)
}

/// One node connected to the in-process relay.
pub struct Link {
    /// The node's end.
    pub node: SyncConnection,
    /// The node's documents.
    pub docs: MemoryDocs,
    /// The relay's end of this node's connection.
    pub relay: SyncConnection,
}

/// A relay and its nodes, all in memory.
pub struct Network {
    /// The relay's documents.
    pub relay_docs: MemoryDocs,
    /// Connected nodes.
    pub links: Vec<Link>,
    /// Frames delivered.
    pub frames: u64,
    /// Bytes of the delivered frames, encoded.
    pub bytes: u64,
    /// Signatures delivered in `Authors` frames.
    pub signatures: u64,
}

impl Default for Network {
    fn default() -> Self {
        Self { relay_docs: memory_docs(), links: Vec::new(), frames: 0, bytes: 0, signatures: 0 }
    }
}

impl Network {
    /// Connects a node holding `docs`, restoring persisted sync states if given
    /// (node side, relay side). Returns its index.
    pub fn connect(&mut self, name: &str, docs: MemoryDocs, states: Option<States>) -> usize {
        let mut node = SyncConnection::node(name, "bench");
        let mut relay = SyncConnection::relay("bench-relay");
        if let Some((n, r)) = states {
            node.restore(n);
            relay.restore(r);
        }
        self.links.push(Link { node, docs, relay });
        self.links.len() - 1
    }

    /// Ends a connection, returning the node's documents and both ends' sync states.
    pub fn disconnect(&mut self, i: usize) -> (MemoryDocs, States) {
        let link = self.links.remove(i);
        (link.docs, (link.node.into_persisted(), link.relay.into_persisted()))
    }

    /// Delivers frames (and forwards changed documents to the other nodes) until
    /// nothing moves. Returns when `watch` (node index) first received a change.
    pub fn pump(&mut self, watch: Option<usize>) -> Result<Option<Instant>> {
        let mut seen = None;
        let err = |e| anyhow!("in-process sync: {e}");
        loop {
            let mut moved = false;
            let mut changed = Vec::new();
            for (i, link) in self.links.iter_mut().enumerate() {
                for frame in link.node.take_outbox() {
                    moved = true;
                    count(&mut self.frames, &mut self.bytes, &mut self.signatures, &frame);
                    for event in link.relay.on_frame(frame, &mut self.relay_docs).map_err(err)? {
                        match event {
                            ConnectionEvent::Established { .. } => {
                                link.relay.begin(&mut self.relay_docs).map_err(err)?
                            }
                            ConnectionEvent::DocChanged { doc, .. } => changed.push((i, doc)),
                            ConnectionEvent::Refused { doc, reason, .. } => {
                                return Err(anyhow!("in-process sync: the relay refused {doc}: {reason}"))
                            }
                            ConnectionEvent::Directory(_)
                            | ConnectionEvent::Receipts { .. }
                            | ConnectionEvent::RefusedByPeer { .. } => {}
                        }
                    }
                }
                for frame in link.relay.take_outbox() {
                    moved = true;
                    count(&mut self.frames, &mut self.bytes, &mut self.signatures, &frame);
                    for event in link.node.on_frame(frame, &mut link.docs).map_err(err)? {
                        match event {
                            ConnectionEvent::Established { .. } => link.node.begin(&mut link.docs).map_err(err)?,
                            ConnectionEvent::DocChanged { .. } => {
                                if watch == Some(i) && seen.is_none() {
                                    seen = Some(Instant::now());
                                }
                            }
                            ConnectionEvent::Refused { doc, reason, .. } => {
                                return Err(anyhow!("in-process sync: a node refused {doc}: {reason}"))
                            }
                            ConnectionEvent::Directory(_)
                            | ConnectionEvent::Receipts { .. }
                            | ConnectionEvent::RefusedByPeer { .. } => {}
                        }
                    }
                }
            }
            for (from, doc) in changed {
                for (j, link) in self.links.iter_mut().enumerate() {
                    if j != from {
                        moved = true;
                        link.relay.on_local_change(&doc, &mut self.relay_docs).map_err(err)?;
                    }
                }
            }
            if !moved {
                return Ok(seen);
            }
        }
    }

    /// Offers a node's local change of `doc` to the relay.
    pub fn local_change(&mut self, i: usize, doc: &DocId) -> Result<()> {
        let link = &mut self.links[i];
        link.node.on_local_change(doc, &mut link.docs).map_err(|e| anyhow!("in-process sync: {e}"))
    }
}

/// Counts one delivered frame.
fn count(frames: &mut u64, bytes: &mut u64, signatures: &mut u64, frame: &Frame) {
    *frames += 1;
    *bytes += frame.encode().len() as u64;
    if let Frame::Authors { entries, .. } = frame {
        *signatures += entries.len() as u64;
    }
}
