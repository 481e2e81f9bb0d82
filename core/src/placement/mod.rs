//! Weighted rendezvous (highest-random-weight) placement.
//!
//! Each (node, key) pair gets the score `-w / ln(u)` with `u ∈ (0,1)` a hash of both: the node
//! with the highest score owns the key, and the probability of winning is proportional to `w`.
//! A join or leave moves only the keys whose winner changed, ~`w_node / Σw` of them. Replicas are
//! the next-highest scores, preferring nodes in zones not yet chosen.
//!
//! Rooms: this file is the contract (the draw, the score, [`place`] — what every client and node
//! must compute identically, pinned by a cross-language vector); `index` holds
//! [`PlacementIndex`], the same answers without a logarithm per node; `avx512` its eight-lane
//! scan (`unsafe` intrinsics only there, each block with its safety comment).

/// A placement candidate.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// Stable node id (hashed into every score).
    pub node_id: String,
    /// Weight, > 0 to be eligible (capacity, scaled by any join ramp).
    pub weight: f64,
    /// Failure zone ("" = none).
    pub zone: String,
    /// [`node_hash`] of `node_id`, computed once rather than on every lookup.
    pub node_hash: u64,
}

impl Candidate {
    /// A candidate with its node hash precomputed.
    pub fn new(node_id: impl Into<String>, weight: f64, zone: impl Into<String>) -> Self {
        let node_id = node_id.into();
        Self { node_hash: node_hash(&node_id), node_id, weight, zone: zone.into() }
    }
}

/// The per-(node, key) random draw: two 32×32→64-bit products of the halves of
/// `node_hash ^ rotl32(key_hash)` (each xored with a constant), each folded to 32 bits
/// (`lo ^ hi`, wyhash's mix); the first fold is the high half. Both hashes are xxh3 outputs, so
/// one mixing round suffices: tested for uniformity, weight-proportional shares and independent
/// replica pairs (`draws_are_uniform_and_independent`). Chosen over a splitmix64 finalizer
/// because a 32-bit multiply is one vector µop where a 64-bit one is three: the lookup scans
/// every node with it.
#[inline]
pub fn draw(node_hash: u64, key_hash: u64) -> u64 {
    let x = node_hash ^ key_hash.rotate_left(32);
    let (y, z) = (x ^ DRAW_HI, x ^ DRAW_LO);
    let p = (y & 0xffff_ffff) * (y >> 32);
    let q = (z & 0xffff_ffff) * (z >> 32);
    ((p ^ (p >> 32)) << 32) | ((q ^ (q >> 32)) & 0xffff_ffff)
}

pub(super) const DRAW_HI: u64 = 0x9e37_79b9_7f4a_7c15;
pub(super) const DRAW_LO: u64 = 0xbf58_476d_1ce4_e5b9;

/// Score of a draw at `weight`: `-w / ln(u)`, `u` the draw's top 53 bits mapped into (0, 1).
/// Monotonic in the draw for a fixed weight.
#[inline]
pub fn score_of(draw: u64, weight: f64) -> f64 {
    -weight / unit(draw).ln()
}

/// Score of `node_hash` for `key_hash` at `weight`.
pub fn score(node_hash: u64, key_hash: u64, weight: f64) -> f64 {
    score_of(draw(node_hash, key_hash), weight)
}

/// Hash of a node id.
pub fn node_hash(node_id: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(node_id.as_bytes())
}

/// Indices into `nodes` of the top-`r` owners of `key_hash`, best first; distinct zones are
/// preferred while any remain.
pub fn place(key_hash: u64, nodes: &[Candidate], r: usize) -> Vec<usize> {
    let mut scored: Vec<(f64, usize)> = nodes
        .iter()
        .enumerate()
        .filter(|(_, n)| n.weight > 0.0 && n.weight.is_finite())
        .map(|(i, n)| (score(n.node_hash, key_hash, n.weight), i))
        .collect();
    select(&mut scored, nodes, r)
}

/// Sort `scored` best first (ties to the lower index) and pick `r`: first the best node of each
/// zone not yet chosen (nodes without a zone always qualify), then the best remaining.
pub(super) fn select(scored: &mut [(f64, usize)], nodes: &[Candidate], r: usize) -> Vec<usize> {
    scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let mut out = Vec::with_capacity(r);
    let mut zones: Vec<&str> = Vec::new();
    for &(_, i) in scored.iter() {
        if out.len() == r {
            break;
        }
        let z = nodes[i].zone.as_str();
        if z.is_empty() {
            out.push(i);
        } else if !zones.contains(&z) {
            out.push(i);
            zones.push(z);
        }
    }
    for &(_, i) in scored.iter() {
        if out.len() == r {
            break;
        }
        if !out.contains(&i) {
            out.push(i);
        }
    }
    out
}

/// [`select`] over `(score, node index, zone id)` with zone ids in place of names (ids unique).
pub(super) fn select_ids(scored: &mut [(f64, u32, u16)], r: usize) -> Vec<usize> {
    scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let mut out = Vec::with_capacity(r);
    let mut zones: Vec<u16> = Vec::new();
    for &(_, i, z) in scored.iter() {
        if out.len() == r {
            break;
        }
        if z == NO_ZONE {
            out.push(i as usize);
        } else if !zones.contains(&z) {
            out.push(i as usize);
            zones.push(z);
        }
    }
    for &(_, i, _) in scored.iter() {
        if out.len() == r {
            break;
        }
        if !out.contains(&(i as usize)) {
            out.push(i as usize);
        }
    }
    out
}

#[cfg(target_arch = "x86_64")]
mod avx512;
mod index;

pub use index::PlacementIndex;
use index::*;

#[cfg(test)]
mod vector {
    use super::*;

    /// Cross-language vector: the Python client (python/tests) asserts the same owners.
    #[test]
    fn owners_of_a_fixed_key_are_stable() {
        let nodes: Vec<Candidate> =
            (0..10).map(|i| Candidate::new(format!("node-{i}"), 1.0 + (i % 3) as f64, "")).collect();
        let key = crate::SequenceKey::new("ns", "seq").placement_hash();
        assert_eq!(draw(nodes[0].node_hash, key), 0xcd56_9956_e5ee_7e7e);
        let got = place(key, &nodes, 3);
        assert_eq!(got, PINNED);
    }

    const PINNED: [usize; 3] = [4, 3, 7];
}
