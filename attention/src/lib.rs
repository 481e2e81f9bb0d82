//! kvcache-attention: decode-step attention over cached pages. Pure compute, no I/O.
//!
//! - [`decode`] / [`decode_batch`] / [`decode_batch_each`] (an answer per item): one query token per sequence attends to all of its cached
//!   tokens, page by page, straight from page payloads of any codec (GQA bf16 and fp8 rows are
//!   widened in registers inside the score and P·V tiles; other rows are dequantized a block of
//!   32 tokens at a time into a small scratch, never as a whole f32 copy of the cache; fp8 and
//!   int8 widen with SIMD, fp8 by exponent arithmetic rather than a table).
//!   GQA/MHA/MQA read each KV group's K and V once for all query heads of the group; MLA in
//!   absorbed form reads each latent row once for all heads (score over the 576-wide row, output
//!   over its 512-wide latent part).
//! - Online softmax (running max and sum per head, no score array the size of the context),
//!   split-K over threads for long contexts, merged with [`merge`], the exact, associative
//!   log-sum-exp combination that also merges partials from other workers or nodes.
//! - [`simd`]: the kernels are written once, generic over an ISA ([`simd::Isa`]), and
//!   instantiated for AVX-512, AVX2+FMA+F16C and a portable fallback, chosen at run time
//!   ([`Backend::detect`]). All `unsafe` lives there.
//! - [`hybrid`]: decode by layer kind — windows and chunks (a suffix of the pages), attention
//!   sinks, DeepSeek sparse attention's indexer and top-k gather, and the gated-delta-rule step of
//!   linear-attention layers.
//! - [`calibrate`]: the CPU path per machine and shape, chosen by timing every backend the CPU
//!   runs (cached per process); the worker and the bench use it.
//! - [`gpu`]: the CUDA backend (paged GQA on CUDA cores, MLA on tensor cores, split-K merge),
//!   loaded at run time, compiled by NVRTC for the device at first use.
//! - [`reference`]: the float64 reference every kernel is tested against.
//! - [`par`]: per-sequence host work spread over threads (around GPU batches, in the worker).
//!
//! Precision: every path accumulates in f32 from exact products (bf16/f16 widen exactly; fp8 and
//! int8 rows are multiplied by their f32 scales; the `vdpbf16ps` score path of
//! [`Backend::Avx512Bf16`] runs only for queries that are bf16 values, whose products with bf16
//! rows are exact in f32): every backend is within 1e-5 of the reference. Output is f32, `lse` is the natural-log
//! log-sum-exp of the scaled scores per head. Inputs are checked: a non-finite query or a page
//! that yields a non-finite result is an error, never a NaN output.

pub mod calibrate;
pub mod gpu;
pub mod hybrid;
mod kernel;
pub mod par;
pub mod peak;
pub mod reference;
pub mod simd;

pub use kernel::{BatchItem, decode, decode_batch, decode_batch_each, is_bf16_query, merge};
pub use simd::Backend;

use kvcache_core::{AttentionKind, ModelSpec, PageLayout};

/// One cached page as the kernel reads it: a compact payload of `tokens` tokens.
#[derive(Debug, Clone, Copy)]
pub struct KvPage<'a> {
    /// Payload in the namespace's page layout and codec.
    pub payload: &'a [u8],
    /// Tokens in the payload.
    pub tokens: usize,
}

/// The attention problem of one layer: geometry, codec and softmax scale.
#[derive(Debug, Clone, Copy)]
pub struct AttnShape {
    /// Query heads.
    pub q_heads: usize,
    /// KV groups: K/V heads, or 1 for MLA (one latent row shared by all heads).
    pub kv_groups: usize,
    /// Query/key width (head_dim, or kv_lora_rank + rope_dim for MLA).
    pub qk_width: usize,
    /// Value/output width (head_dim, or kv_lora_rank for MLA).
    pub v_width: usize,
    /// Whether V is the leading part of the K row (MLA) rather than its own plane.
    pub latent: bool,
    /// Page layout (codec, row bytes, planes, page size).
    pub layout: PageLayout,
    /// Softmax scale.
    pub scale: f32,
}

impl AttnShape {
    /// The shape of `spec`'s layers stored with `layout`, at the model's softmax scale.
    pub fn new(spec: &ModelSpec, layout: PageLayout) -> Self {
        let latent = spec.attention == AttentionKind::Mla;
        Self {
            q_heads: spec.num_q_heads as usize,
            kv_groups: if latent { 1 } else { spec.num_kv_heads as usize },
            qk_width: spec.qk_width(),
            v_width: spec.v_width(),
            latent,
            layout,
            scale: spec.softmax_scale,
        }
    }

    /// Query heads per KV group.
    pub fn group(&self) -> usize {
        self.q_heads / self.kv_groups
    }

    /// Query length: `q_heads · qk_width`.
    pub fn q_len(&self) -> usize {
        self.q_heads * self.qk_width
    }

    /// Output length: `q_heads · v_width`.
    pub fn out_len(&self) -> usize {
        self.q_heads * self.v_width
    }
}

/// Knobs of a decode call.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// SIMD backend (default: the best the CPU has).
    pub backend: Backend,
    /// Threads for split-K and batches (default 1).
    pub threads: usize,
    /// Tokens per split below which a sequence is not split across threads.
    pub min_split_tokens: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self { backend: Backend::detect(), threads: 1, min_split_tokens: 2048 }
    }
}

/// Why a decode was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AttentionError {
    /// The query has the wrong length.
    #[error("query has {got} values, expected {expected} ({heads} heads × {width})")]
    QueryLength {
        /// Sent.
        got: usize,
        /// Expected.
        expected: usize,
        /// Heads.
        heads: usize,
        /// Width per head.
        width: usize,
    },
    /// A page payload does not match its token count.
    #[error("page {index} is {got} bytes, but {tokens} tokens are {expected} bytes")]
    PageLength {
        /// Page index in the call.
        index: usize,
        /// Bytes.
        got: usize,
        /// Expected bytes.
        expected: usize,
        /// Tokens.
        tokens: usize,
    },
    /// An output buffer has the wrong length.
    #[error("output buffer has {got} values, expected {expected}")]
    OutputLength {
        /// Sent.
        got: usize,
        /// Expected.
        expected: usize,
    },
    /// The query holds NaN or infinity.
    #[error("query holds a non-finite value")]
    NonFiniteQuery,
    /// The cached values produced a non-finite result (NaN/inf in a page).
    #[error("non-finite attention result: the cached pages hold NaN or infinite values")]
    NonFiniteResult,
    /// The shape is inconsistent.
    #[error("invalid shape: {0}")]
    Shape(String),
}
