//! Weighted rendezvous (highest-random-weight) placement.
//!
//! Each (node, key) pair gets the score `-w / ln(u)` with `u ∈ (0,1)` a hash of both: the node
//! with the highest score owns the key, and the probability of winning is proportional to `w`.
//! A join or leave moves only the keys whose winner changed, ~`w_node / Σw` of them. Replicas are
//! the next-highest scores, preferring nodes in zones not yet chosen.

use xxhash_rust::xxh3::xxh3_64_with_seed;

/// A placement candidate.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// Stable node id (hashed into every score).
    pub node_id: String,
    /// Weight, > 0 to be eligible (capacity, scaled by any join ramp).
    pub weight: f64,
    /// Failure zone ("" = none).
    pub zone: String,
}

/// Score of `node_hash` for `key_hash` at `weight`.
pub fn score(node_hash: u64, key_hash: u64, weight: f64) -> f64 {
    let h = xxh3_64_with_seed(&key_hash.to_le_bytes(), node_hash);
    // 53 random bits mapped into (0, 1).
    let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    -weight / u.ln()
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
        .map(|(i, n)| (score(node_hash(&n.node_id), key_hash, n.weight), i))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(n: usize) -> Vec<Candidate> {
        (0..n).map(|i| Candidate { node_id: format!("node-{i}"), weight: 1.0, zone: String::new() }).collect()
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
