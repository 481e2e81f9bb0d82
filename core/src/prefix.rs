//! The prefix-hash chain: `h_i = H_seed(h_{i-1} ‖ token ids of page i)` over full pages.
//!
//! Two sequences of one namespace whose prompts share their first `k` full pages share
//! `h_0..h_k`, so a node can find the longest cached prefix by hash alone. The seed is random per
//! namespace: equal prompts in different namespaces hash differently, so one tenant can never
//! probe another's prompts through cache hits.

use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Hash of the page after `prev` (0 for the first page) holding `tokens`.
pub fn next_prefix_hash(seed: u64, prev: u64, tokens: &[u32]) -> u64 {
    let mut buf = Vec::with_capacity(8 + 4 * tokens.len());
    buf.extend_from_slice(&prev.to_le_bytes());
    for t in tokens {
        buf.extend_from_slice(&t.to_le_bytes());
    }
    // 0 is reserved for "no hash".
    xxh3_64_with_seed(&buf, seed).max(1)
}

/// Prefix hashes of every full page of `tokens` (a trailing partial page has none).
pub fn prefix_hashes(seed: u64, tokens: &[u32], page_tokens: usize) -> Vec<u64> {
    let mut prev = 0;
    tokens
        .chunks_exact(page_tokens)
        .map(|page| {
            prev = next_prefix_hash(seed, prev, page);
            prev
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_prefix_shares_hashes_until_it_diverges() {
        let a: Vec<u32> = (0..256).collect();
        let mut b = a.clone();
        b[130] = 9999;
        let ha = prefix_hashes(7, &a, 64);
        let hb = prefix_hashes(7, &b, 64);
        assert_eq!(ha.len(), 4);
        assert_eq!(ha[..2], hb[..2]);
        assert_ne!(ha[2], hb[2]);
        assert_ne!(ha[3], hb[3], "the chain carries the divergence forward");
    }

    #[test]
    fn different_seeds_never_share() {
        let a: Vec<u32> = (0..128).collect();
        let h1 = prefix_hashes(1, &a, 64);
        let h2 = prefix_hashes(2, &a, 64);
        assert!(h1.iter().zip(&h2).all(|(x, y)| x != y));
        assert_eq!(prefix_hashes(1, &a[..100], 64).len(), 1);
    }
}
