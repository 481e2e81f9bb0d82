//! Deterministic synthetic cache contents and queries (a fast xorshift generator, so prefilling
//! gigabytes stays quick), and the float64 check of a worker's output.

use bytes::Bytes;
use kvcache_attention::{AttnShape, KvPage, reference};
use kvcache_client::wire_page;
use kvcache_core::{ContentKey, Namespace, PageKey, SequenceKey};
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

/// The content page of `key` at `layer`: its payload a function of the key, so every request
/// that computes this key puts the same bytes (as an engine's prefill of the same prefix would).
pub fn content_page(ns: &Namespace, key: &ContentKey, layer: u32) -> pb::Page {
    let seed = u64::from_le_bytes(key.0[..8].try_into().expect("8 bytes")) ^ (layer as u64).wrapping_mul(0x2545_f491);
    let payload = tokens_payload(ns, ns.page_tokens as usize, &mut Rng::new(seed));
    kvcache_client::content_page(ns, key, layer, Bytes::from(payload))
}

/// The content pages of `keys`, every layer.
pub fn content_pages(ns: &Namespace, keys: &[ContentKey]) -> Vec<pb::Page> {
    keys.iter().flat_map(|k| (0..ns.model.num_layers).map(move |l| content_page(ns, k, l))).collect()
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

/// The cache content of one sequence and layer as its writer knows it: compact pages, kept in
/// step with appends, to check outputs against.
pub struct Mirror {
    /// Pages in order: (payload, tokens).
    pub pages: Vec<(Vec<u8>, usize)>,
}

impl Mirror {
    /// The pages of `layer` among wire pages of one sequence.
    pub fn from_wire(pages: &[pb::Page], layer: u32) -> Self {
        Self {
            pages: pages
                .iter()
                .filter(|p| p.key.as_ref().is_some_and(|k| k.layer == layer))
                .map(|p| (p.payload.to_vec(), p.token_count as usize))
                .collect(),
        }
    }

    /// Apply the append of one token.
    pub fn append(&mut self, ns: &Namespace, token: &[u8]) {
        let l = ns.layout();
        match self.pages.last_mut() {
            Some((p, n)) if *n < ns.page_tokens as usize => {
                let mut m = vec![0u8; l.payload_bytes(*n + 1)];
                l.concat(p, *n, token, 1, &mut m);
                *p = m;
                *n += 1;
            }
            _ => self.pages.push((token.to_vec(), 1)),
        }
    }

    /// Tokens held.
    pub fn tokens(&self) -> u64 {
        self.pages.iter().map(|p| p.1 as u64).sum()
    }
}
