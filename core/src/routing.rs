//! The shard map as a domain type, and routing over it.
//!
//! - [`ShardMap`]: a validated copy of the coordinator's `pb::ShardMap` — nodes with their state
//!   and placement weight, namespaces that passed validation, registered workers. Entries that do
//!   not validate (a node without its info, a namespace with impossible dims) are left out and
//!   counted in [`ShardMap::rejected`]; nothing downstream sees a wire type.
//! - [`Routing`]: one immutable map snapshot with the placement inputs ready (UP nodes and their
//!   weights for weighted rendezvous hashing, draining nodes for reads, workers for sticky decode
//!   routing). Pure: no I/O, no clock. Every process that follows the cluster (client, node
//!   membership and handoff, worker) routes with it; the link that keeps one current lives in
//!   `kvcache-net` (`CoordinatorLink`).

use crate::key::{Namespace, SequenceKey};
use crate::placement::{Candidate, PlacementIndex};
use kvcache_proto::v1 as pb;
use std::collections::HashMap;

/// A node's state in the shard map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeState {
    /// In placement (possibly still ramping in).
    Up,
    /// Out of placement, still serving reads.
    Draining,
    /// Missed its heartbeats.
    Down,
}

impl NodeState {
    /// Name as `kvcache status` prints it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Up => "up",
            Self::Draining => "draining",
            Self::Down => "down",
        }
    }
}

/// A node as routing sees it: where to call it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NodeRef {
    /// Node id.
    pub node_id: String,
    /// host:port.
    pub address: String,
}

/// One node of the map.
#[derive(Debug, Clone, PartialEq)]
pub struct MapNode {
    /// Id and address.
    pub node: NodeRef,
    /// Failure zone ("" = none).
    pub zone: String,
    /// Configured capacity in bytes.
    pub capacity_bytes: u64,
    /// State.
    pub state: NodeState,
    /// Placement weight (capacity scaled by the join ramp); 0 while out of placement.
    pub weight: f64,
}

/// A registered attention worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerRef {
    /// Worker id.
    pub worker_id: String,
    /// host:port.
    pub address: String,
}

/// A validated shard map.
#[derive(Debug, Clone, Default)]
pub struct ShardMap {
    /// Epoch: every change of membership, weights or namespaces increments it.
    pub epoch: u64,
    /// Nodes, in the coordinator's order.
    pub nodes: Vec<MapNode>,
    /// Namespaces by name.
    pub namespaces: HashMap<String, Namespace>,
    /// Registered workers.
    pub workers: Vec<WorkerRef>,
    /// Entries of the wire map left out because they did not validate.
    pub rejected: usize,
}

impl From<pb::ShardMap> for ShardMap {
    /// Validate a wire map. Never fails as a whole: a bad entry is left out (and counted), so one
    /// malformed namespace cannot take routing down for every other.
    fn from(map: pb::ShardMap) -> Self {
        let mut rejected = 0;
        let mut nodes = Vec::with_capacity(map.nodes.len());
        for n in map.nodes {
            let state = match pb::NodeState::try_from(n.state) {
                Ok(pb::NodeState::Up) => NodeState::Up,
                Ok(pb::NodeState::Draining) => NodeState::Draining,
                Ok(pb::NodeState::Down) => NodeState::Down,
                _ => {
                    rejected += 1;
                    continue;
                }
            };
            let Some(info) = n.node.filter(|i| !i.node_id.is_empty() && !i.address.is_empty()) else {
                rejected += 1;
                continue;
            };
            let weight = if n.weight.is_finite() && n.weight > 0.0 { n.weight } else { 0.0 };
            nodes.push(MapNode {
                node: NodeRef { node_id: info.node_id, address: info.address },
                zone: info.zone,
                capacity_bytes: info.capacity_bytes,
                state,
                weight,
            });
        }
        let mut namespaces = HashMap::with_capacity(map.namespaces.len());
        for n in map.namespaces {
            match Namespace::try_from(n) {
                Ok(ns) => {
                    namespaces.insert(ns.name.clone(), ns);
                }
                Err(_) => rejected += 1,
            }
        }
        let workers = map
            .workers
            .into_iter()
            .filter(|w| !w.worker_id.is_empty() && !w.address.is_empty())
            .map(|w| WorkerRef { worker_id: w.worker_id, address: w.address })
            .collect();
        Self { epoch: map.epoch, nodes, namespaces, workers, rejected }
    }
}

/// An immutable shard-map snapshot, ready for routing.
#[derive(Debug)]
pub struct Routing {
    /// Epoch of the map.
    pub epoch: u64,
    /// Every node with its state.
    pub nodes: Vec<MapNode>,
    /// Namespaces by name.
    pub namespaces: HashMap<String, Namespace>,
    /// Registered workers.
    pub workers: Vec<WorkerRef>,
    up: PlacementIndex,
    up_refs: Vec<NodeRef>,
    draining: PlacementIndex,
    draining_refs: Vec<NodeRef>,
    workers_index: PlacementIndex,
}

impl Default for Routing {
    fn default() -> Self {
        Self::new(ShardMap::default())
    }
}

impl From<pb::ShardMap> for Routing {
    fn from(map: pb::ShardMap) -> Self {
        Self::new(ShardMap::from(map))
    }
}

impl Routing {
    /// Routing over `map`.
    pub fn new(map: ShardMap) -> Self {
        let mut up = Vec::new();
        let mut up_refs = Vec::new();
        let mut draining = Vec::new();
        let mut draining_refs = Vec::new();
        for n in &map.nodes {
            let c = Candidate::new(n.node.node_id.clone(), n.weight, n.zone.clone());
            match n.state {
                NodeState::Up if n.weight > 0.0 => {
                    up.push(c);
                    up_refs.push(n.node.clone());
                }
                NodeState::Draining => {
                    draining.push(Candidate { weight: n.capacity_bytes.max(1) as f64, ..c });
                    draining_refs.push(n.node.clone());
                }
                _ => {}
            }
        }
        let workers: Vec<Candidate> =
            map.workers.iter().map(|w| Candidate::new(w.worker_id.clone(), 1.0, "")).collect();
        Self {
            epoch: map.epoch,
            nodes: map.nodes,
            namespaces: map.namespaces,
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

    /// Owners, then the draining nodes that would have owned it (they still serve reads), then
    /// one other live node (after membership changes the data may sit elsewhere).
    pub fn read_candidates(&self, seq: &SequenceKey, r: usize) -> Vec<NodeRef> {
        self.read_candidate_indices(seq.placement_hash(), r).into_iter().map(|i| self.node_at(i).clone()).collect()
    }

    /// [`read_candidates`](Self::read_candidates) of the sequence whose placement hash is
    /// `hash`, as indices for [`node_at`](Self::node_at): no node is cloned (a prefix match
    /// places thousands of keys).
    pub fn read_candidate_indices(&self, hash: u64, r: usize) -> Vec<usize> {
        let ups = self.up_refs.len();
        let mut v: Vec<usize> = self.up.place(hash, r);
        v.extend(self.draining.place(hash, r).into_iter().map(|i| ups + i));
        for i in 0..ups + self.draining_refs.len() {
            if !v.contains(&i) {
                v.push(i);
            }
        }
        v.truncate(r + self.draining_refs.len().min(r) + 1);
        v
    }

    /// The node a candidate index names (UP nodes, then draining ones).
    pub fn node_at(&self, i: usize) -> &NodeRef {
        if i < self.up_refs.len() { &self.up_refs[i] } else { &self.draining_refs[i - self.up_refs.len()] }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, state: pb::NodeState, weight: f64) -> pb::ShardNode {
        pb::ShardNode {
            node: Some(pb::NodeInfo {
                node_id: id.into(),
                address: format!("{id}:7070"),
                capacity_bytes: 1 << 30,
                zone: String::new(),
                labels: Default::default(),
            }),
            state: state as i32,
            weight,
        }
    }

    #[test]
    fn malformed_entries_are_left_out_and_counted_and_the_rest_routes() {
        let mut bad_ns = pb::Namespace { name: "bad".into(), ..Default::default() };
        bad_ns.page_tokens = 0;
        let map = pb::ShardMap {
            epoch: 9,
            nodes: vec![
                node("a", pb::NodeState::Up, 1.0),
                pb::ShardNode { node: None, state: pb::NodeState::Up as i32, weight: 1.0 },
                node("b", pb::NodeState::Up, f64::NAN),
                node("c", pb::NodeState::Draining, 0.0),
                pb::ShardNode { state: 42, ..node("d", pb::NodeState::Up, 1.0) },
            ],
            namespaces: vec![bad_ns],
            workers: vec![pb::WorkerInfo { worker_id: String::new(), address: "x:1".into() }],
        };
        let r = Routing::from(map.clone());
        let m = ShardMap::from(map);
        // The node without info, the unknown state and the namespace.
        assert_eq!(m.rejected, 3);
        assert_eq!(r.epoch, 9);
        assert!(r.namespaces.is_empty() && r.workers.is_empty());
        // b's NaN weight keeps it out of placement; c drains and still serves reads.
        let seq = SequenceKey::new("ns", "s");
        assert_eq!(r.owners(&seq, 2), vec![NodeRef { node_id: "a".into(), address: "a:7070".into() }]);
        let ids: Vec<String> = r.read_candidates(&seq, 1).into_iter().map(|n| n.node_id).collect();
        assert_eq!(ids, vec!["a", "c"]);
        assert_eq!(r.live_nodes().len(), 2);
    }
}
