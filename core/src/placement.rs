//! Weighted rendezvous (highest-random-weight) placement.
//!
//! Each (node, key) pair gets the score `-w / ln(u)` with `u ∈ (0,1)` a hash of both: the node
//! with the highest score owns the key, and the probability of winning is proportional to `w`.
//! A join or leave moves only the keys whose winner changed, ~`w_node / Σw` of them. Replicas are
//! the next-highest scores, preferring nodes in zones not yet chosen.

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

/// The per-(node, key) random draw: a splitmix64 finalizer over both hashes.
#[inline]
pub fn draw(node_hash: u64, key_hash: u64) -> u64 {
    let mut x = node_hash ^ key_hash.rotate_left(32) ^ 0x9e37_79b9_7f4a_7c15;
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Score of a draw at `weight`: `-w / ln(u)`, `u` the draw's top 53 bits mapped into (0, 1).
/// Monotonic in the draw for a fixed weight.
#[inline]
pub fn score_of(draw: u64, weight: f64) -> f64 {
    let u = ((draw >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    -weight / u.ln()
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
    scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let mut out = Vec::with_capacity(r);
    let mut zones: Vec<&str> = Vec::new();
    for &(_, i) in &scored {
        if out.len() == r {
            break;
        }
        let z = nodes[i].zone.as_str();
        if z.is_empty() || !zones.contains(&z) {
            out.push(i);
            zones.push(z);
        }
    }
    for &(_, i) in &scored {
        if out.len() == r {
            break;
        }
        if !out.contains(&i) {
            out.push(i);
        }
    }
    out
}

/// A placement index over a fixed candidate list that answers exactly like [`place`] without
/// a logarithm (or an allocation) per node: nodes are grouped by weight, and within a group the
/// score is monotonic in the integer draw, so each group only needs its few largest draws; the
/// logarithm is taken for those few. Built once per shard map.
#[derive(Debug, Clone)]
pub struct PlacementIndex {
    nodes: Vec<Candidate>,
    /// (weight, node indices, their hashes).
    classes: Vec<(f64, Vec<usize>, Vec<u64>)>,
    zoned: bool,
    /// Distinct zones among eligible nodes.
    zones: usize,
}

impl PlacementIndex {
    /// Index `nodes` (weights ≤ 0 are never chosen).
    pub fn new(nodes: &[Candidate]) -> Self {
        let mut classes: Vec<(f64, Vec<usize>, Vec<u64>)> = Vec::new();
        for (i, n) in nodes.iter().enumerate() {
            if !(n.weight > 0.0 && n.weight.is_finite()) {
                continue;
            }
            match classes.iter_mut().find(|c| c.0 == n.weight) {
                Some(c) => {
                    c.1.push(i);
                    c.2.push(n.node_hash);
                }
                None => classes.push((n.weight, vec![i], vec![n.node_hash])),
            }
        }
        let zoned = nodes.iter().any(|n| !n.zone.is_empty());
        let mut z: Vec<&str> = nodes.iter().filter(|n| n.weight > 0.0).map(|n| n.zone.as_str()).collect();
        z.sort_unstable();
        z.dedup();
        Self { nodes: nodes.to_vec(), classes, zoned, zones: z.len() }
    }

    /// The candidates.
    pub fn nodes(&self) -> &[Candidate] {
        &self.nodes
    }

    /// Same answer as `place(key_hash, nodes, r)`.
    pub fn place(&self, key_hash: u64, r: usize) -> Vec<usize> {
        if r == 0 {
            return Vec::new();
        }
        // With zones, replicas may skip same-zone nodes: keep more per class, and fall back to
        // the full computation if that was not enough.
        let keep = if self.zoned { (4 * r).max(8) } else { r };
        let mut best: Vec<(f64, usize)> = Vec::with_capacity(keep * self.classes.len());
        let mut top: Vec<(u64, usize)> = Vec::with_capacity(keep + 1);
        for (w, idx, hashes) in &self.classes {
            top.clear();
            for (j, &h) in hashes.iter().enumerate() {
                let d = draw(h, key_hash);
                if top.len() < keep {
                    top.push((d, idx[j]));
                    if top.len() == keep {
                        top.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
                    }
                } else if d > top[keep - 1].0 || (d == top[keep - 1].0 && idx[j] < top[keep - 1].1) {
                    let pos = top.partition_point(|x| x.0 > d || (x.0 == d && x.1 < idx[j]));
                    top.insert(pos, (d, idx[j]));
                    top.pop();
                }
            }
            best.extend(top.iter().map(|&(d, i)| (score_of(d, *w), i)));
        }
        best.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        if !self.zoned {
            best.truncate(r);
            return best.into_iter().map(|b| b.1).collect();
        }
        let mut out = Vec::with_capacity(r);
        let mut zones: Vec<&str> = Vec::new();
        for &(_, i) in &best {
            if out.len() == r {
                break;
            }
            let z = self.nodes[i].zone.as_str();
            if z.is_empty() || !zones.contains(&z) {
                out.push(i);
                zones.push(z);
            }
        }
        if out.len() < r.min(self.zones) {
            return place(key_hash, &self.nodes, r);
        }
        for &(_, i) in &best {
            if out.len() == r {
                break;
            }
            if !out.contains(&i) {
                out.push(i);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(n: usize) -> Vec<Candidate> {
        (0..n).map(|i| Candidate::new(format!("node-{i}"), 1.0, "")).collect()
    }

    #[test]
    fn join_moves_about_one_nth_and_only_to_the_new_node() {
        let before = nodes(10);
        let after = nodes(11);
        let keys = 20_000u64;
        let mut moved = 0;
        for k in 0..keys {
            let h = xxhash_rust::xxh3::xxh3_64(&k.to_le_bytes());
            let a = place(h, &before, 1)[0];
            let b = place(h, &after, 1)[0];
            if a != b {
                assert_eq!(b, 10, "a key moved between two old nodes");
                moved += 1;
            }
        }
        let frac = moved as f64 / keys as f64;
        assert!((frac - 1.0 / 11.0).abs() < 0.01, "moved {frac}");
    }

    #[test]
    fn leave_moves_only_the_leaver_s_keys_and_replicas_are_distinct() {
        let before = nodes(10);
        let mut after = nodes(10);
        after[3].weight = 0.0; // node-3 leaves
        for k in 0..20_000u64 {
            let h = xxhash_rust::xxh3::xxh3_64(&k.to_le_bytes());
            let a = place(h, &before, 1)[0];
            let b = place(h, &after, 1)[0];
            assert!(a == b || a == 3, "key {k} moved from {a} to {b}");
            let r3 = place(h, &before, 3);
            assert_eq!(r3.len(), 3);
            assert!(r3[0] != r3[1] && r3[1] != r3[2] && r3[0] != r3[2]);
        }
    }

    #[test]
    fn the_index_answers_exactly_like_full_rendezvous() {
        let mut ns: Vec<Candidate> =
            (0..57).map(|i| Candidate::new(format!("n{i}"), [1.0, 2.0, 0.5, 0.0][i % 4], "")).collect();
        let plain = PlacementIndex::new(&ns);
        for k in 0..3000u64 {
            let h = xxhash_rust::xxh3::xxh3_64(&k.to_le_bytes());
            for r in 1..4 {
                assert_eq!(plain.place(h, r), place(h, &ns, r), "key {k} r {r}");
            }
        }
        for (i, n) in ns.iter_mut().enumerate() {
            n.zone = format!("z{}", i % 3);
        }
        let zoned = PlacementIndex::new(&ns);
        for k in 0..3000u64 {
            let h = xxhash_rust::xxh3::xxh3_64(&k.to_le_bytes());
            for r in 1..5 {
                assert_eq!(zoned.place(h, r), place(h, &ns, r), "zoned key {k} r {r}");
            }
        }
    }

    #[test]
    fn weights_set_the_share() {
        let mut ns = nodes(2);
        ns[1].weight = 3.0;
        let wins =
            (0..20_000u64).filter(|k| place(xxhash_rust::xxh3::xxh3_64(&k.to_le_bytes()), &ns, 1)[0] == 1).count();
        let share = wins as f64 / 20_000.0;
        assert!((share - 0.75).abs() < 0.02, "share {share}");
    }

    #[test]
    fn replicas_prefer_distinct_zones_and_skip_zero_weight() {
        let mut ns = nodes(4);
        ns[0].zone = "a".into();
        ns[1].zone = "a".into();
        ns[2].zone = "b".into();
        ns[3].weight = 0.0;
        for k in 0..200u64 {
            let owners = place(k.wrapping_mul(0x9e37_79b9_7f4a_7c15), &ns, 2);
            assert_eq!(owners.len(), 2);
            assert!(owners.contains(&2), "zone b must hold a replica: {owners:?}");
            assert!(!owners.contains(&3));
        }
        assert_eq!(place(1, &ns, 5).len(), 3);
    }
}

#[cfg(test)]
mod vector {
    use super::*;

    /// Cross-language vector: the Python client (python/tests) asserts the same owners.
    #[test]
    fn owners_of_a_fixed_key_are_stable() {
        let nodes: Vec<Candidate> =
            (0..10).map(|i| Candidate::new(format!("node-{i}"), 1.0 + (i % 3) as f64, "")).collect();
        let key = crate::SequenceKey::new("ns", "seq").placement_hash();
        let got = place(key, &nodes, 3);
        assert_eq!(got, PINNED);
    }

    const PINNED: [usize; 3] = [8, 5, 2];
}
