//! One shard-map snapshot, ready for routing.

use kvcache_core::placement::{Candidate, PlacementIndex};
use kvcache_core::{Namespace, SequenceKey};
use kvcache_proto::v1 as pb;
use std::collections::HashMap;

/// A node as routing sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeRef {
    /// Node id.
    pub node_id: String,
    /// host:port.
    pub address: String,
}

/// An immutable shard-map snapshot.
#[derive(Debug)]
pub struct Routing {
    /// Epoch of the map.
    pub epoch: u64,
    /// Every node with its state.
    pub nodes: Vec<pb::ShardNode>,
    /// Namespaces by name.
    pub namespaces: HashMap<String, Namespace>,
    /// Registered workers.
    pub workers: Vec<pb::WorkerInfo>,
    up: PlacementIndex,
    up_refs: Vec<NodeRef>,
    draining: PlacementIndex,
    draining_refs: Vec<NodeRef>,
    workers_index: PlacementIndex,
}

impl Routing {
    /// Build from a wire map (namespaces that do not validate are skipped).
    pub fn new(map: pb::ShardMap) -> Self {
        let mut up = Vec::new();
        let mut up_refs = Vec::new();
        let mut draining = Vec::new();
        let mut draining_refs = Vec::new();
        for n in &map.nodes {
            let Some(info) = &n.node else { continue };
            let r = NodeRef { node_id: info.node_id.clone(), address: info.address.clone() };
            let c = Candidate::new(info.node_id.clone(), n.weight, info.zone.clone());
            if n.state == pb::NodeState::Up as i32 && n.weight > 0.0 {
                up.push(c);
                up_refs.push(r);
            } else if n.state == pb::NodeState::Draining as i32 {
                draining.push(Candidate { weight: info.capacity_bytes.max(1) as f64, ..c });
                draining_refs.push(r);
            }
        }
        let namespaces = map
            .namespaces
            .into_iter()
            .filter_map(|n| Namespace::try_from(n).ok())
            .map(|n| (n.name.clone(), n))
            .collect();
        let workers: Vec<Candidate> =
            map.workers.iter().map(|w| Candidate::new(w.worker_id.clone(), 1.0, "")).collect();
        Self {
            epoch: map.epoch,
            nodes: map.nodes,
            namespaces,
            workers: map.workers,
            up: PlacementIndex::new(&up),
            up_refs,
            draining: PlacementIndex::new(&draining),
            draining_refs,
            workers_index: PlacementIndex::new(&workers),
        }
    }

    /// The top-`r` live owners of a sequence, best first.
    pub fn owners(&self, seq: &SequenceKey, r: usize) -> Vec<NodeRef> {
        self.up.place(seq.placement_hash(), r).into_iter().map(|i| self.up_refs[i].clone()).collect()
    }

    /// Owners, then the draining nodes that would have owned it (they still serve reads).
    pub fn read_candidates(&self, seq: &SequenceKey, r: usize) -> Vec<NodeRef> {
        let mut v = self.owners(seq, r);
        for i in self.draining.place(seq.placement_hash(), r) {
            v.push(self.draining_refs[i].clone());
        }
        // Then any other live node: after membership changes the data may sit elsewhere.
        for n in self.up_refs.iter().chain(&self.draining_refs) {
            if !v.contains(n) {
                v.push(n.clone());
            }
        }
        v.truncate(r + self.draining_refs.len().min(r) + 1);
        v
    }

    /// UP and draining nodes.
    pub fn live_nodes(&self) -> Vec<NodeRef> {
        self.up_refs.iter().chain(&self.draining_refs).cloned().collect()
    }

    /// Index into `workers` of a sequence's sticky worker (rendezvous over worker ids).
    pub fn worker_for(&self, seq: &SequenceKey) -> usize {
        self.workers_index.place(seq.placement_hash(), 1).first().copied().unwrap_or(0)
    }
}
