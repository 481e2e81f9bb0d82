//! Deterministic synthetic cache contents and queries (a fast xorshift generator, so prefilling
//! gigabytes stays quick), and the float64 check of a worker's output.

use bytes::Bytes;
use kvcache_attention::{AttnShape, KvPage, reference};
use kvcache_client::wire_page;
use kvcache_core::{Namespace, PageKey, SequenceKey};
use kvcache_proto::v1 as pb;

/// A small deterministic generator.
pub struct Rng(u64);

impl Rng {
    /// Seeded generator.
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    /// Uniform in [-1, 1).
    pub fn next_f32(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    /// `n` values in [-scale, scale).
    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.next_f32() * scale).collect()
    }
}

/// Encoded payload of `tokens` random tokens of one layer (page layout, namespace codec).
pub fn tokens_payload(ns: &Namespace, tokens: usize, rng: &mut Rng) -> Vec<u8> {
    let l = ns.layout();
    l.encode(&rng.vec(l.planes * tokens * l.shape.width, 1.0), tokens)
}

/// Wire pages of a prefill of `tokens` tokens for `layers` layers of one sequence.
pub fn prefill_pages(ns: &Namespace, seq: &SequenceKey, layers: u32, tokens: usize, rng: &mut Rng) -> Vec<pb::Page> {
    let pt = ns.page_tokens as usize;
    let mut out = Vec::new();
    for layer in 0..layers {
        let mut left = tokens;
        let mut idx = 0;
        while left > 0 {
            let n = left.min(pt);
            let key = PageKey { sequence: seq.clone(), layer, page_index: idx };
            out.push(wire_page(ns, &key, n as u32, 0, Bytes::from(tokens_payload(ns, n, rng))));
            left -= n;
            idx += 1;
        }
    }
    out
}

/// Relative L2 error of a worker's output against the float64 reference over `pages`.
pub fn check_output(shape: &AttnShape, q: &[f32], pages: &[(Vec<u8>, usize)], output: &[f32]) -> f64 {
    let kv: Vec<KvPage> = pages.iter().map(|(p, n)| KvPage { payload: p, tokens: *n }).collect();
    let (want, _) = reference::attention(shape, q, &kv);
    reference::rel_l2(output, &want)
}
