//! A document's change graph in a canonical causal order, with vector clocks:
//! the questions "was change A made without knowing change B?" and "what did
//! both know?" that history descriptions and overlap detection ask.
//!
//! Everything here is a function of the set of changes alone (never of the
//! order in which a node received them), so every node holding the same
//! changes answers the same. Pure, no I/O.

use std::collections::HashMap;

use automerge::{ActorId, Automerge, ChangeHash};

/// The changes of a document, ordered by (depth, hash): a topological order
/// (a change comes after everything it depends on) that is the same on every node.
pub(crate) struct ChangeGraph {
    /// Change hashes, in canonical order; a change's number below is its position here.
    pub hashes: Vec<ChangeHash>,
    /// Position of each hash.
    pub index: HashMap<ChangeHash, usize>,
    /// Direct dependencies (positions), sorted.
    pub deps: Vec<Vec<usize>>,
    /// Longest path from a root: 1 for a change without dependencies.
    pub depth: Vec<u32>,
    /// Author of each change, as a position in [`Self::actors`].
    pub actor: Vec<usize>,
    /// Every author, sorted.
    pub actors: Vec<ActorId>,
    /// The author's sequence number of each change.
    pub seq: Vec<u64>,
    /// First operation counter of each change.
    pub start_op: Vec<u64>,
    /// Number of operations of each change.
    pub ops: Vec<u64>,
    /// Recorded time (ms since the epoch, 0 if unset).
    pub time: Vec<i64>,
    /// Commit message.
    pub message: Vec<Option<String>>,
    /// Vector clocks, `actors.len()` entries per change: the highest sequence
    /// number of each author among the change and its ancestors.
    clocks: Vec<u64>,
    /// Each author's changes by sequence number (`by_seq[actor][seq - 1]`).
    by_seq: Vec<Vec<usize>>,
}

impl ChangeGraph {
    /// Reads the graph of every change in `doc`.
    pub fn build(doc: &Automerge) -> Self {
        let metas = doc.get_changes_meta(&[]);
        let mut actors: Vec<ActorId> = metas.iter().map(|m| m.actor.as_ref().clone()).collect();
        actors.sort();
        actors.dedup();
        let raw_index: HashMap<ChangeHash, usize> = metas.iter().enumerate().map(|(i, m)| (m.hash, i)).collect();

        // Depths, iteratively (histories can be long chains).
        let mut depth = vec![0u32; metas.len()];
        for start in 0..metas.len() {
            if depth[start] != 0 {
                continue;
            }
            let mut stack = vec![start];
            while let Some(&top) = stack.last() {
                let mut pending = false;
                let mut deepest = 0;
                for dep in &metas[top].deps {
                    let Some(&d) = raw_index.get(dep) else { continue };
                    if depth[d] == 0 {
                        stack.push(d);
                        pending = true;
                    } else {
                        deepest = deepest.max(depth[d]);
                    }
                }
                if !pending {
                    depth[top] = deepest + 1;
                    stack.pop();
                }
            }
        }

        let mut order: Vec<usize> = (0..metas.len()).collect();
        order.sort_by(|&a, &b| (depth[a], metas[a].hash).cmp(&(depth[b], metas[b].hash)));
        let hashes: Vec<ChangeHash> = order.iter().map(|&i| metas[i].hash).collect();
        let index: HashMap<ChangeHash, usize> = hashes.iter().enumerate().map(|(i, h)| (*h, i)).collect();
        let actor_pos = |a: &ActorId| actors.binary_search(a).unwrap_or(0);

        let n = hashes.len();
        let width = actors.len();
        let mut graph = ChangeGraph {
            deps: Vec::with_capacity(n),
            depth: order.iter().map(|&i| depth[i]).collect(),
            actor: order.iter().map(|&i| actor_pos(&metas[i].actor)).collect(),
            seq: order.iter().map(|&i| metas[i].seq).collect(),
            start_op: order.iter().map(|&i| metas[i].start_op).collect(),
            ops: order.iter().map(|&i| (metas[i].max_op + 1).saturating_sub(metas[i].start_op)).collect(),
            time: order.iter().map(|&i| metas[i].timestamp).collect(),
            message: order.iter().map(|&i| metas[i].message.as_deref().map(str::to_owned)).collect(),
            clocks: vec![0; n * width],
            by_seq: vec![Vec::new(); width],
            hashes,
            index,
            actors: Vec::new(),
        };
        for &i in &order {
            let mut deps: Vec<usize> = metas[i].deps.iter().filter_map(|h| graph.index.get(h).copied()).collect();
            deps.sort_unstable();
            graph.deps.push(deps);
        }
        for c in 0..n {
            for d in 0..graph.deps[c].len() {
                let dep = graph.deps[c][d];
                for a in 0..width {
                    let v = graph.clocks[dep * width + a];
                    let slot = &mut graph.clocks[c * width + a];
                    *slot = (*slot).max(v);
                }
            }
            let own = graph.actor[c];
            graph.clocks[c * width + own] = graph.clocks[c * width + own].max(graph.seq[c]);
            graph.by_seq[own].push(c);
        }
        for list in &mut graph.by_seq {
            list.sort_by_key(|&c| c);
        }
        graph.actors = actors;
        graph
    }

    /// Number of changes.
    pub fn len(&self) -> usize {
        self.hashes.len()
    }

    /// The vector clock of change `c`.
    pub fn clock(&self, c: usize) -> &[u64] {
        let w = self.actors.len();
        &self.clocks[c * w..(c + 1) * w]
    }

    /// Whether change `a` is `b` or one of its ancestors.
    pub fn is_ancestor_or_self(&self, a: usize, b: usize) -> bool {
        self.clock(b)[self.actor[a]] >= self.seq[a]
    }

    /// Whether `a` and `b` were made without knowledge of each other.
    pub fn concurrent(&self, a: usize, b: usize) -> bool {
        !self.is_ancestor_or_self(a, b) && !self.is_ancestor_or_self(b, a)
    }

    /// Number of changes in a state (a clock): the change and its ancestors.
    pub fn size_of(clock: &[u64]) -> u64 {
        clock.iter().sum()
    }

    /// The heads of the state described by `clock` (hashes, sorted).
    pub fn heads_of(&self, clock: &[u64]) -> Vec<ChangeHash> {
        let last: Vec<usize> = clock
            .iter()
            .enumerate()
            .filter(|(_, &s)| s > 0)
            .filter_map(|(a, &s)| self.by_seq[a].get(s as usize - 1).copied())
            .collect();
        let mut heads: Vec<ChangeHash> = last
            .iter()
            .filter(|&&c| !last.iter().any(|&o| o != c && self.is_ancestor_or_self(c, o)))
            .map(|&c| self.hashes[c])
            .collect();
        heads.sort();
        heads
    }

    /// What both `a` and `b` knew: the clock of their common ancestors.
    pub fn common_clock(&self, a: usize, b: usize) -> Vec<u64> {
        self.clock(a).iter().zip(self.clock(b)).map(|(x, y)| *x.min(y)).collect()
    }
}

#[cfg(test)]
mod tests {
    use automerge::transaction::Transactable;
    use automerge::{AutoCommit, ROOT};

    use super::*;

    fn commit(doc: &mut AutoCommit, key: &str) -> ChangeHash {
        doc.put(ROOT, key, 1).unwrap();
        doc.commit().unwrap()
    }

    #[test]
    fn concurrency_and_common_ancestors_follow_the_history_not_the_arrival_order() {
        let mut a = AutoCommit::new();
        let root = commit(&mut a, "root");
        let mut b = a.fork();
        let a1 = commit(&mut a, "a1");
        let a2 = commit(&mut a, "a2");
        let b1 = commit(&mut b, "b1");
        let mut c = AutoCommit::new();
        c.merge(&mut b).unwrap();
        c.merge(&mut a).unwrap();
        a.merge(&mut b).unwrap();
        let m = commit(&mut a, "m");
        c.merge(&mut a).unwrap();

        let ga = ChangeGraph::build(a.document());
        let gc = ChangeGraph::build(c.document());
        assert_eq!(ga.hashes, gc.hashes, "the same order on every node");
        let at = |g: &ChangeGraph, h: &ChangeHash| g.index[h];
        let g = &ga;
        assert!(g.concurrent(at(g, &a2), at(g, &b1)));
        assert!(g.concurrent(at(g, &a1), at(g, &b1)));
        assert!(!g.concurrent(at(g, &a1), at(g, &a2)));
        assert!(g.is_ancestor_or_self(at(g, &b1), at(g, &m)));
        assert_eq!(g.heads_of(&g.common_clock(at(g, &a2), at(g, &b1))), vec![root]);
        assert_eq!(g.heads_of(g.clock(at(g, &m))), vec![m]);
        assert_eq!(g.depth[at(g, &m)], 4);
    }
}
