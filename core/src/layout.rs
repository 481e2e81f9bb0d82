//! Where each token's K/V (or MLA latent) sits in a page payload.
//!
//! - MHA/GQA/MQA: `K[kv_heads][tokens][row]` then `V[kv_heads][tokens][row]` (head-major: one KV
//!   group's tokens are contiguous for the kernel).
//! - MLA: `[tokens][row]`, row = latent then rope key.
//!
//! A payload is always compact for its token count: a page of `n` tokens is
//! `payload_bytes(n)` long. Appending tokens therefore builds a new payload ([`PageLayout::concat`])
//! rather than writing into the middle of the old one, which is what lets a stored page be
//! immutable while readers hold it.

use crate::codec::{Codec, RowShape};
use crate::spec::{AttentionKind, ModelSpec};

/// The payload geometry of one namespace's pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageLayout {
    /// Row shape (K/V head row or MLA row).
    pub shape: RowShape,
    /// Codec of every row.
    pub codec: Codec,
    /// Encoded bytes of one row.
    pub row_bytes: usize,
    /// Row planes: `2·kv_heads` (K heads then V heads) or 1 for MLA.
    pub planes: usize,
    /// Tokens in a full page.
    pub page_tokens: usize,
}

impl PageLayout {
    /// Layout of `spec` pages under `codec` with `page_tokens` tokens per page.
    pub fn new(spec: &ModelSpec, codec: Codec, page_tokens: usize) -> Self {
        let shape = spec.row_shape();
        Self {
            shape,
            codec,
            row_bytes: codec.row_bytes(shape),
            planes: match spec.attention {
                AttentionKind::Mla => 1,
                _ => 2 * spec.num_kv_heads as usize,
            },
            page_tokens,
        }
    }

    /// The layout of DeepSeek sparse attention's indexer keys: one `[tokens][row_bytes]` plane of
    /// opaque rows (fp8 values and their scales, `IndexerSpec::bytes_per_token`).
    pub fn indexer(spec: &crate::spec::IndexerSpec, codec: Codec, page_tokens: usize) -> Self {
        Self {
            shape: RowShape { width: spec.head_dim as usize, tail: 0 },
            codec,
            row_bytes: spec.bytes_per_token(),
            planes: 1,
            page_tokens,
        }
    }

    /// Whether the payload is a single `[tokens][row]` plane (MLA).
    pub fn is_latent(&self) -> bool {
        self.planes == 1
    }

    /// Bytes per token (all planes).
    pub fn token_bytes(&self) -> usize {
        self.planes * self.row_bytes
    }

    /// Payload bytes of a page holding `tokens` tokens.
    pub fn payload_bytes(&self, tokens: usize) -> usize {
        tokens * self.token_bytes()
    }

    /// Payload bytes of a full page.
    pub fn page_bytes(&self) -> usize {
        self.payload_bytes(self.page_tokens)
    }

    /// Byte range of row (`plane`, `token`) in a payload of `tokens` tokens.
    pub fn row_range(&self, tokens: usize, plane: usize, token: usize) -> std::ops::Range<usize> {
        let start = (plane * tokens + token) * self.row_bytes;
        start..start + self.row_bytes
    }

    /// Write into `dst` (`payload_bytes(a_tokens + b_tokens)` long) the payload of `a` followed
    /// by the tokens of `b`, both compact payloads of this layout.
    pub fn concat(&self, a: &[u8], a_tokens: usize, b: &[u8], b_tokens: usize, dst: &mut [u8]) {
        let plane_a = a_tokens * self.row_bytes;
        let plane_b = b_tokens * self.row_bytes;
        assert_eq!(a.len(), self.planes * plane_a);
        assert_eq!(b.len(), self.planes * plane_b);
        assert_eq!(dst.len(), a.len() + b.len());
        for p in 0..self.planes {
            let d = p * (plane_a + plane_b);
            dst[d..d + plane_a].copy_from_slice(&a[p * plane_a..(p + 1) * plane_a]);
            dst[d + plane_a..d + plane_a + plane_b].copy_from_slice(&b[p * plane_b..(p + 1) * plane_b]);
        }
    }

    /// [`PageLayout::concat`] into a new buffer, written once (not zeroed first): a worker grows
    /// a sequence's last page this way every decode step.
    pub fn concat_vec(&self, a: &[u8], a_tokens: usize, b: &[u8], b_tokens: usize) -> Vec<u8> {
        let plane_a = a_tokens * self.row_bytes;
        let plane_b = b_tokens * self.row_bytes;
        assert_eq!(a.len(), self.planes * plane_a);
        assert_eq!(b.len(), self.planes * plane_b);
        let mut dst = Vec::with_capacity(a.len() + b.len());
        for p in 0..self.planes {
            dst.extend_from_slice(&a[p * plane_a..(p + 1) * plane_a]);
            dst.extend_from_slice(&b[p * plane_b..(p + 1) * plane_b]);
        }
        dst
    }

    /// Write into `dst` the compact payload of tokens `[start, start + count)` of `src`, a
    /// payload of `tokens` tokens.
    pub fn slice_tokens(&self, src: &[u8], tokens: usize, start: usize, count: usize, dst: &mut [u8]) {
        assert!(start + count <= tokens);
        assert_eq!(src.len(), self.payload_bytes(tokens));
        assert_eq!(dst.len(), self.payload_bytes(count));
        let rb = self.row_bytes;
        for p in 0..self.planes {
            let s = (p * tokens + start) * rb;
            dst[p * count * rb..(p + 1) * count * rb].copy_from_slice(&src[s..s + count * rb]);
        }
    }

    /// Encode f32 rows `[planes][tokens][width]` into a compact payload.
    pub fn encode(&self, values: &[f32], tokens: usize) -> Vec<u8> {
        let w = self.shape.width;
        assert_eq!(values.len(), self.planes * tokens * w);
        let mut out = vec![0u8; self.payload_bytes(tokens)];
        for (row, dst) in values.chunks_exact(w).zip(out.chunks_exact_mut(self.row_bytes)) {
            self.codec.encode_row(self.shape, row, dst);
        }
        out
    }

    /// Decode a compact payload into f32 rows `[planes][tokens][width]`.
    pub fn decode(&self, payload: &[u8], tokens: usize) -> Vec<f32> {
        assert_eq!(payload.len(), self.payload_bytes(tokens));
        let w = self.shape.width;
        let mut out = vec![0f32; self.planes * tokens * w];
        for (src, row) in payload.chunks_exact(self.row_bytes).zip(out.chunks_exact_mut(w)) {
            self.codec.decode_row(self.shape, src, row);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(name: &str, codec: Codec) -> PageLayout {
        PageLayout::new(&ModelSpec::preset(name).unwrap(), codec, 16)
    }

    #[test]
    fn page_sizes_of_real_models() {
        assert_eq!(layout("llama-3-8b", Codec::Bf16).payload_bytes(64), 64 * 4096);
        assert_eq!(layout("deepseek-v3", Codec::Bf16).payload_bytes(64), 64 * 1152);
        assert_eq!(layout("deepseek-v3", Codec::Fp8E4m3).payload_bytes(3), 3 * 656);
    }

    #[test]
    fn concat_then_slice_gives_back_each_part() {
        for name in ["llama-3-8b", "deepseek-v3", "falcon-7b"] {
            let l = layout(name, Codec::Bf16);
            let a: Vec<u8> = (0..l.payload_bytes(5)).map(|i| (i * 7 % 251) as u8).collect();
            let b: Vec<u8> = (0..l.payload_bytes(3)).map(|i| (i * 13 % 241) as u8).collect();
            let mut ab = vec![0u8; a.len() + b.len()];
            l.concat(&a, 5, &b, 3, &mut ab);
            assert_eq!(l.concat_vec(&a, 5, &b, 3), ab);
            let mut back_a = vec![0u8; a.len()];
            l.slice_tokens(&ab, 8, 0, 5, &mut back_a);
            let mut back_b = vec![0u8; b.len()];
            l.slice_tokens(&ab, 8, 5, 3, &mut back_b);
            assert_eq!(back_a, a);
            assert_eq!(back_b, b);
            // Row (last plane, token 6) of the concatenation is row (last plane, 1) of b.
            let p = l.planes - 1;
            assert_eq!(&ab[l.row_range(8, p, 6)], &b[l.row_range(3, p, 1)]);
        }
    }
}
