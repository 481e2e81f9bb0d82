//! Model attention geometry, per-layer kinds, and presets exact to the published configs.
//!
//! A model is its attention geometry (the shape of one K/V or MLA row) plus a list of layer kinds
//! ([`LayerKind`]): full attention, a sliding window, chunked local attention, a linear-attention
//! or Mamba2 layer with a fixed-size recurrent state, or a layer that keeps nothing. An empty list
//! means every layer is full attention (the dense models). What one sequence keeps in each kind
//! is [`ModelSpec::bytes_per_sequence`].

use crate::codec::{Codec, RowShape};
use serde::{Deserialize, Serialize};
use std::ops::Range;

/// How a model's attention keeps K/V per token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum AttentionKind {
    /// Multi-head: K/V for every query head.
    Mha,
    /// Grouped-query: one K/V per group of query heads.
    Gqa,
    /// Multi-query: one K/V head.
    Mqa,
    /// Multi-head latent attention: latent + rope key per token, shared by all heads.
    Mla,
}

impl AttentionKind {
    /// Short upper-case name ("GQA").
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Mha => "MHA",
            Self::Gqa => "GQA",
            Self::Mqa => "MQA",
            Self::Mla => "MLA",
        }
    }
}

/// Linear-attention flavours with a delta-rule recurrent state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LinearKind {
    /// Gated DeltaNet (Qwen3-Next): one decay gate per value head.
    GatedDeltaNet,
    /// Kimi Delta Attention (Kimi-Linear): one decay gate per head and key channel.
    Kda,
}

/// A gated-delta-rule linear-attention layer (Gated DeltaNet, KDA).
///
/// Its state per sequence: the recurrent state `S[num_v_heads][head_k_dim][head_v_dim]` in f32,
/// then the short-convolution state `[conv_dim][conv_kernel - 1]` in bf16, where `conv_dim` is
/// the q, k and v channels (`2·num_k_heads·head_k_dim + num_v_heads·head_v_dim`) — the layouts
/// SGLang's and vLLM's mamba pools keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LinearSpec {
    /// Which gating.
    pub kind: LinearKind,
    /// Query/key heads.
    pub num_k_heads: u32,
    /// Value heads (a multiple of `num_k_heads`; each key head serves a group of value heads).
    pub num_v_heads: u32,
    /// Query/key head width.
    pub head_k_dim: u32,
    /// Value head width.
    pub head_v_dim: u32,
    /// Short-convolution kernel width.
    pub conv_kernel: u32,
}

impl LinearSpec {
    /// Channels of the short convolution (q, k and v).
    pub fn conv_dim(&self) -> usize {
        (2 * self.num_k_heads * self.head_k_dim + self.num_v_heads * self.head_v_dim) as usize
    }

    /// f32 elements of the recurrent state.
    pub fn recurrent_elems(&self) -> usize {
        (self.num_v_heads * self.head_k_dim * self.head_v_dim) as usize
    }

    /// Bytes of one sequence's state: f32 recurrent state then bf16 conv state.
    pub fn state_bytes(&self) -> usize {
        self.recurrent_elems() * 4 + self.conv_dim() * (self.conv_kernel as usize).saturating_sub(1) * 2
    }
}

/// A Mamba2 layer.
///
/// Its state per sequence: the SSM state `[num_heads][head_dim][state_size]` in f32, then the conv
/// state `[conv_dim][conv_kernel - 1]` in bf16 with `conv_dim = num_heads·head_dim +
/// 2·n_groups·state_size` (x, B and C).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Mamba2Spec {
    /// SSM heads.
    pub num_heads: u32,
    /// Channels per head.
    pub head_dim: u32,
    /// SSM state width (d_state).
    pub state_size: u32,
    /// B/C groups.
    pub n_groups: u32,
    /// Convolution kernel width.
    pub conv_kernel: u32,
}

impl Mamba2Spec {
    /// Channels of the convolution (x, B, C).
    pub fn conv_dim(&self) -> usize {
        (self.num_heads * self.head_dim + 2 * self.n_groups * self.state_size) as usize
    }

    /// Bytes of one sequence's state: f32 SSM state then bf16 conv state.
    pub fn state_bytes(&self) -> usize {
        (self.num_heads * self.head_dim * self.state_size) as usize * 4
            + self.conv_dim() * (self.conv_kernel as usize).saturating_sub(1) * 2
    }
}

/// What one layer keeps per sequence and how its attention reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum LayerKind {
    /// Attention over every earlier token (the model's MHA/GQA/MQA/MLA geometry).
    Full,
    /// Attention over the last `window` tokens, the query's own included (gpt-oss, Gemma 3).
    Sliding {
        /// Tokens attended to, ≥ 1.
        window: u32,
    },
    /// Attention within aligned chunks of `chunk` tokens (Llama 4's local layers).
    Chunked {
        /// Chunk length, ≥ 1.
        chunk: u32,
    },
    /// Gated-delta-rule linear attention: a fixed-size state per sequence.
    Linear(LinearSpec),
    /// Mamba2: a fixed-size state per sequence.
    Mamba2(Mamba2Spec),
    /// A layer without sequence state (an MLP-only layer of Nemotron-H).
    None,
}

impl LayerKind {
    /// Short name for tables and errors.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Full => "full",
            Self::Sliding { .. } => "sliding",
            Self::Chunked { .. } => "chunked",
            Self::Linear(l) if l.kind == LinearKind::Kda => "kda",
            Self::Linear(_) => "gdn",
            Self::Mamba2(_) => "mamba2",
            Self::None => "none",
        }
    }

    /// Whether the layer keeps K/V (or latent) rows per token in pages.
    pub fn keeps_tokens(&self) -> bool {
        matches!(self, Self::Full | Self::Sliding { .. } | Self::Chunked { .. })
    }

    /// Whether the layer keeps a fixed-size state per sequence.
    pub fn keeps_state(&self) -> bool {
        matches!(self, Self::Linear(_) | Self::Mamba2(_))
    }

    /// Bytes of one sequence's state (0 for layers without one).
    pub fn state_bytes(&self) -> usize {
        match self {
            Self::Linear(l) => l.state_bytes(),
            Self::Mamba2(m) => m.state_bytes(),
            _ => 0,
        }
    }

    /// The tokens the query of the last of `n` stored tokens attends to: every token, the last
    /// `window`, or the current chunk. Empty for layers without tokens.
    pub fn read_range(&self, n: u64) -> Range<u64> {
        match *self {
            Self::Full => 0..n,
            Self::Sliding { window } => n.saturating_sub(window as u64)..n,
            Self::Chunked { chunk } if n > 0 => (n - 1) / chunk as u64 * chunk as u64..n,
            _ => 0..0,
        }
    }

    /// The first token the next token (position `n`) attends to among the `n` before it: the
    /// start of its window, or of its chunk (`n` itself at a chunk boundary: nothing before it).
    pub fn next_read_start(&self, n: u64) -> u64 {
        match *self {
            Self::Sliding { window } => (n + 1).saturating_sub(window as u64),
            Self::Chunked { chunk } => n / chunk as u64 * chunk as u64,
            _ => 0,
        }
    }

    /// The first page of a sequence of `n` tokens that attention can still read: pages before
    /// it lie wholly outside the window (or in past chunks) and are released.
    pub fn first_live_page(&self, n: u64, page_tokens: u32) -> u32 {
        if !self.keeps_tokens() {
            return 0;
        }
        (self.read_range(n).start / page_tokens as u64) as u32
    }
}

/// What a content key holds, by layer group: bits of `MatchPrefixResponse.held`.
pub mod held {
    /// Every full-attention layer's page (and its indexer keys).
    pub const FULL: u32 = 1;
    /// Every sliding-window layer's page.
    pub const WINDOW: u32 = 2;
    /// Every linear-attention and Mamba2 layer's state snapshot at the end of the page.
    pub const STATE: u32 = 4;
    /// Every chunked layer's page.
    pub const CHUNK: u32 = 8;
}

/// DeepSeek Sparse Attention's lightning indexer: a small key per token and layer that scores
/// every cached token, so attention reads only the `topk` best.
///
/// Its key is kept as `head_dim` fp8-e4m3 values then one f32 scale per 128 of them (132 bytes per
/// token for DeepSeek-V3.2), beside the MLA latents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct IndexerSpec {
    /// Indexer query heads (their weights come with each decode request).
    pub num_heads: u32,
    /// Key and query width.
    pub head_dim: u32,
    /// Tokens selected per query.
    pub topk: u32,
}

impl IndexerSpec {
    /// Bytes of one token's indexer key: fp8 values and an f32 scale per 128.
    pub fn bytes_per_token(&self) -> usize {
        self.head_dim as usize + 4 * (self.head_dim as usize).div_ceil(128)
    }
}

/// The attention geometry of a model.
///
/// For MHA/GQA/MQA the cache keeps `num_kv_heads` K and V rows of `head_dim` per token and layer.
/// For MLA it keeps one row of `kv_lora_rank + rope_dim` per token and layer; `head_dim` is then
/// the per-head value (and no-rope query/key) width, used only for the MHA comparison.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelSpec {
    /// Preset or free-form name.
    pub name: String,
    /// Attention kind.
    pub attention: AttentionKind,
    /// Transformer layers.
    pub num_layers: u32,
    /// Query heads.
    pub num_q_heads: u32,
    /// K/V heads (MHA = q heads, MQA = 1, MLA: 1 shared latent row).
    pub num_kv_heads: u32,
    /// Per-head dim (MLA: value head dim).
    pub head_dim: u32,
    /// MLA latent width.
    pub kv_lora_rank: u32,
    /// MLA rope key width.
    pub rope_dim: u32,
    /// Softmax scale applied to q·k.
    pub softmax_scale: f32,
    /// Kind of every layer; empty means every layer is [`LayerKind::Full`].
    pub layers: Vec<LayerKind>,
    /// Attention sinks (gpt-oss): one learned logit per query head joins each softmax; the
    /// logits are model weights, sent with each decode request.
    pub sinks: bool,
    /// DeepSeek Sparse Attention indexer (MLA models only).
    pub indexer: Option<IndexerSpec>,
}

/// DeepSeek's YaRN attention-scale correction: `0.1 * mscale * ln(factor) + 1`.
fn yarn_mscale(factor: f64, mscale: f64) -> f64 {
    if factor <= 1.0 { 1.0 } else { 0.1 * mscale * factor.ln() + 1.0 }
}

impl ModelSpec {
    /// A full-attention model of `layers` layers, `q` query heads over `kv` KV heads of width `d`
    /// (MHA when they are equal, MQA for one KV head), at the softmax scale `1/√d`.
    pub fn gqa(name: &str, layers: u32, q: u32, kv: u32, d: u32) -> Self {
        let attention = if kv == q {
            AttentionKind::Mha
        } else if kv == 1 {
            AttentionKind::Mqa
        } else {
            AttentionKind::Gqa
        };
        Self {
            name: name.into(),
            attention,
            num_layers: layers,
            num_q_heads: q,
            num_kv_heads: kv,
            head_dim: d,
            kv_lora_rank: 0,
            rope_dim: 0,
            softmax_scale: 1.0 / (d as f32).sqrt(),
            layers: Vec::new(),
            sinks: false,
            indexer: None,
        }
    }

    fn with_layers(mut self, layers: Vec<LayerKind>) -> Self {
        assert_eq!(layers.len(), self.num_layers as usize, "{}: one kind per layer", self.name);
        self.layers = layers;
        self
    }

    fn with_scale(mut self, scale: f64) -> Self {
        self.softmax_scale = scale as f32;
        self
    }

    /// DeepSeek-style MLA. `qk_nope` is the no-rope query/key head dim; the softmax scale is
    /// `(qk_nope + rope)^-1/2 · mscale²` with YaRN's `mscale_all_dim` correction.
    #[allow(clippy::too_many_arguments)]
    fn mla(name: &str, layers: u32, heads: u32, rank: u32, rope: u32, qk_nope: u32, yarn: (f64, f64)) -> Self {
        let m = yarn_mscale(yarn.0, yarn.1);
        let scale = (1.0 / ((qk_nope + rope) as f64).sqrt()) * m * m;
        Self {
            name: name.into(),
            attention: AttentionKind::Mla,
            num_layers: layers,
            num_q_heads: heads,
            num_kv_heads: 1,
            head_dim: qk_nope,
            kv_lora_rank: rank,
            rope_dim: rope,
            softmax_scale: scale as f32,
            layers: Vec::new(),
            sinks: false,
            indexer: None,
        }
    }

    /// Every preset, in display order.
    pub fn presets() -> Vec<ModelSpec> {
        vec![
            Self::gqa("llama-3-8b", 32, 32, 8, 128),
            Self::gqa("llama-3-70b", 80, 64, 8, 128),
            Self::gqa("mistral-7b", 32, 32, 8, 128),
            Self::gqa("qwen2.5-7b", 28, 28, 4, 128),
            Self::gqa("qwen3-32b", 64, 64, 8, 128),
            // DeepSeek-V2: rope_scaling factor 40, mscale_all_dim 0.707.
            Self::mla("deepseek-v2", 60, 128, 512, 64, 128, (40.0, 0.707)),
            // DeepSeek-V3 / R1: rope_scaling factor 40, mscale_all_dim 1.0.
            Self::mla("deepseek-v3", 61, 128, 512, 64, 128, (40.0, 1.0)),
            // Kimi K2: DeepSeek-V3 architecture with 64 heads, rope_scaling factor 32.
            Self::mla("kimi-k2", 61, 64, 512, 64, 128, (32.0, 1.0)),
            // MHA reference shape.
            Self::gqa("llama-2-7b", 32, 32, 32, 128),
            // MQA reference shape.
            Self::gqa("falcon-7b", 32, 71, 1, 64),
            // Hybrid and long-context models. Numbers from each model's config.json on Hugging Face.
            gpt_oss("gpt-oss-120b", 36),
            gpt_oss("gpt-oss-20b", 24),
            // google/gemma-3-27b-it text_config: 62 layers, 32 q / 16 kv heads, head_dim 128,
            // sliding_window 1024, sliding_window_pattern 6 (every 6th layer global),
            // query_pre_attn_scalar 168 (the softmax scale is 168^-1/2, not head_dim^-1/2).
            Self::gqa("gemma-3-27b", 62, 32, 16, 128)
                .with_layers(every_nth(62, 6, LayerKind::Sliding { window: 1024 }))
                .with_scale(1.0 / 168f64.sqrt()),
            // google/gemma-3-12b-it text_config: 48 layers, 16 q / 8 kv heads, head_dim 256
            // (query_pre_attn_scalar 256), sliding_window 1024, pattern 6.
            Self::gqa("gemma-3-12b", 48, 16, 8, 256).with_layers(every_nth(48, 6, LayerKind::Sliding { window: 1024 })),
            // meta-llama/Llama-4-Scout-17B-16E text_config: 48 layers, 40 q / 8 kv heads, head_dim
            // 128, attention_chunk_size 8192; no_rope_layers makes every 4th layer a global (NoPE)
            // full-attention layer, the others attend within their 8,192-token chunk.
            Self::gqa("llama-4-scout", 48, 40, 8, 128).with_layers(every_nth(
                48,
                4,
                LayerKind::Chunked { chunk: 8192 },
            )),
            // Qwen/Qwen3-Next-80B-A3B-Instruct: 48 layers, full_attention_interval 4 (gated
            // attention, 16 q / 2 kv heads, head_dim 256); the others Gated DeltaNet with
            // linear_num_key_heads 16, linear_num_value_heads 32, key/value head dim 128,
            // linear_conv_kernel_dim 4.
            Self::gqa("qwen3-next-80b-a3b", 48, 16, 2, 256).with_layers(every_nth(
                48,
                4,
                LayerKind::Linear(LinearSpec {
                    kind: LinearKind::GatedDeltaNet,
                    num_k_heads: 16,
                    num_v_heads: 32,
                    head_k_dim: 128,
                    head_v_dim: 128,
                    conv_kernel: 4,
                }),
            )),
            // deepseek-ai/DeepSeek-V3.2-Exp: DeepSeek-V3's MLA (61 layers, 128 heads, kv_lora_rank
            // 512, rope 64, qk_nope 128, YaRN factor 40) plus the indexer: index_n_heads 64,
            // index_head_dim 128, index_topk 2048, on every layer.
            {
                let mut m = Self::mla("deepseek-v3.2", 61, 128, 512, 64, 128, (40.0, 1.0));
                m.indexer = Some(IndexerSpec { num_heads: 64, head_dim: 128, topk: 2048 });
                m
            },
            // nvidia/Nemotron-H-8B-Base-8K: 52 layers by hybrid_override_pattern (M Mamba2,
            // * attention, - MLP); attention 32 q / 8 kv heads, head_dim 128; Mamba2
            // mamba_num_heads 128, mamba_head_dim 64, ssm_state_size 128, n_groups 8, conv_kernel 4.
            Self::gqa("nemotron-h-8b", 52, 32, 8, 128).with_layers(pattern(
                "M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-",
                LayerKind::Mamba2(Mamba2Spec {
                    num_heads: 128,
                    head_dim: 64,
                    state_size: 128,
                    n_groups: 8,
                    conv_kernel: 4,
                }),
            )),
            // moonshotai/Kimi-Linear-48B-A3B-Instruct: 27 layers; linear_attn_config
            // full_attn_layers (1-based) [4, 8, 12, 16, 20, 24, 27] are MLA (32 heads,
            // kv_lora_rank 512, qk_rope 64, qk_nope 128, no rope scaling); the others KDA with
            // num_heads 32, head_dim 128, short_conv_kernel_size 4.
            Self::mla("kimi-linear-48b-a3b", 27, 32, 512, 64, 128, (1.0, 1.0)).with_layers(
                (1..=27)
                    .map(|l| match l {
                        4 | 8 | 12 | 16 | 20 | 24 | 27 => LayerKind::Full,
                        _ => LayerKind::Linear(LinearSpec {
                            kind: LinearKind::Kda,
                            num_k_heads: 32,
                            num_v_heads: 32,
                            head_k_dim: 128,
                            head_v_dim: 128,
                            conv_kernel: 4,
                        }),
                    })
                    .collect(),
            ),
        ]
    }

    /// The kind of `layer` (full attention when the model lists no kinds).
    pub fn layer(&self, layer: u32) -> LayerKind {
        self.layers.get(layer as usize).copied().unwrap_or(LayerKind::Full)
    }

    /// Every layer's kind, in order.
    pub fn layer_kinds(&self) -> impl Iterator<Item = LayerKind> + '_ {
        (0..self.num_layers).map(|l| self.layer(l))
    }

    /// Whether layers differ in kind, or the model has sinks or an indexer.
    pub fn is_hybrid(&self) -> bool {
        self.layers.iter().any(|k| *k != LayerKind::Full) || self.sinks || self.indexer.is_some()
    }

    /// Layers that keep per-token rows (full, sliding, chunked).
    pub fn token_layers(&self) -> usize {
        self.layer_kinds().filter(|k| k.keeps_tokens()).count()
    }

    /// Short description of the layer mix ("18 sliding(128) + 18 full").
    pub fn layer_summary(&self) -> String {
        let mut parts: Vec<(String, usize)> = Vec::new();
        for k in self.layer_kinds() {
            let name = match k {
                LayerKind::Sliding { window } => format!("sliding({window})"),
                LayerKind::Chunked { chunk } => format!("chunked({chunk})"),
                k => k.as_str().to_owned(),
            };
            match parts.iter_mut().find(|(n, _)| *n == name) {
                Some((_, c)) => *c += 1,
                None => parts.push((name, 1)),
            }
        }
        let mut s = parts.iter().map(|(n, c)| format!("{c} {n}")).collect::<Vec<_>>().join(" + ");
        if self.sinks {
            s.push_str(", sinks");
        }
        if let Some(i) = self.indexer {
            s.push_str(&format!(", indexer top-{}", i.topk));
        }
        s
    }

    /// The groups of [`held`] this model has layers in: what a content key must hold to be
    /// whole.
    pub fn held_groups(&self) -> u32 {
        self.layer_kinds().fold(0, |g, k| {
            g | match k {
                LayerKind::Full => held::FULL,
                LayerKind::Sliding { .. } => held::WINDOW,
                LayerKind::Chunked { .. } => held::CHUNK,
                LayerKind::Linear(_) | LayerKind::Mamba2(_) => held::STATE,
                LayerKind::None => 0,
            }
        })
    }

    /// The longest prefix (in pages) of a chain whose keys hold `held[i]` (bits of [`held`]) that
    /// every layer can be restored from — SGLang HiCache's rules: every page of a full layer, the
    /// pages of a sliding or chunked layer that the first token after the prefix reads (the
    /// trailing window; the current chunk, nothing at a chunk boundary), and a state layer's
    /// snapshot at the prefix's last page.
    pub fn restorable_prefix(&self, held: &[u32], page_tokens: u32) -> usize {
        let groups = self.held_groups();
        let lead = if groups & held::FULL != 0 {
            held.iter().take_while(|h| *h & held::FULL != 0).count()
        } else {
            held.len()
        };
        // Keys holding each windowed group before each index, for O(1) range checks.
        let count = |bit: u32| {
            let mut c = Vec::with_capacity(held.len() + 1);
            c.push(0usize);
            for h in held {
                c.push(c.last().unwrap() + usize::from(h & bit != 0));
            }
            c
        };
        let (sliding, chunked) = (count(held::WINDOW), count(held::CHUNK));
        let kinds: Vec<LayerKind> =
            self.layer_kinds().filter(|k| matches!(k, LayerKind::Sliding { .. } | LayerKind::Chunked { .. })).collect();
        (1..=lead)
            .rev()
            .find(|&p| {
                let tokens = p as u64 * page_tokens as u64;
                let window_ok = kinds.iter().all(|k| {
                    let first = (k.next_read_start(tokens) / page_tokens as u64) as usize;
                    let c = if matches!(k, LayerKind::Sliding { .. }) { &sliding } else { &chunked };
                    first >= p || c[p] - c[first] == p - first
                });
                let state_ok = groups & held::STATE == 0 || held[p - 1] & held::STATE != 0;
                window_ok && state_ok
            })
            .unwrap_or(0)
    }

    /// Bytes of one token's indexer key in one layer (0 without an indexer).
    pub fn indexer_bytes_per_token_layer(&self) -> usize {
        self.indexer.map_or(0, |i| i.bytes_per_token())
    }

    /// Payload bytes (no page headers) one sequence of `tokens` tokens keeps over all layers
    /// under `codec`: every token of a full layer, the window of a sliding one, the current chunk
    /// of a chunked one (what its last token's attention reads), indexer keys beside them, and
    /// the fixed-size state of a linear or Mamba2 layer (f32 recurrent state and bf16 conv state).
    pub fn bytes_per_sequence(&self, tokens: u64, codec: Codec) -> u64 {
        let per_token = (self.bytes_per_token_layer(codec) + self.indexer_bytes_per_token_layer()) as u64;
        self.layer_kinds()
            .map(|k| {
                let r = k.read_range(tokens);
                let state = if tokens > 0 { k.state_bytes() as u64 } else { 0 };
                (r.end - r.start) * per_token + state
            })
            .sum()
    }

    /// The preset called `name`, if any.
    pub fn preset(name: &str) -> Option<ModelSpec> {
        Self::presets().into_iter().find(|p| p.name == name)
    }

    /// Names of every preset.
    pub fn preset_names() -> Vec<String> {
        Self::presets().into_iter().map(|p| p.name).collect()
    }

    /// Width of one query head as the kernel sees it: `head_dim`, or for MLA the absorbed query
    /// `kv_lora_rank + rope_dim`.
    pub fn qk_width(&self) -> usize {
        match self.attention {
            AttentionKind::Mla => (self.kv_lora_rank + self.rope_dim) as usize,
            _ => self.head_dim as usize,
        }
    }

    /// Width of one output head: `head_dim`, or for MLA `kv_lora_rank` (before W_UV).
    pub fn v_width(&self) -> usize {
        match self.attention {
            AttentionKind::Mla => self.kv_lora_rank as usize,
            _ => self.head_dim as usize,
        }
    }

    /// The shape of one stored row: a K or V head row, or the MLA latent+rope row.
    pub fn row_shape(&self) -> RowShape {
        match self.attention {
            AttentionKind::Mla => {
                RowShape { width: (self.kv_lora_rank + self.rope_dim) as usize, tail: self.rope_dim as usize }
            }
            _ => RowShape { width: self.head_dim as usize, tail: 0 },
        }
    }

    /// Stored rows per token and layer: `2 · kv_heads` (K and V), or 1 for MLA.
    pub fn rows_per_token(&self) -> usize {
        match self.attention {
            AttentionKind::Mla => 1,
            _ => 2 * self.num_kv_heads as usize,
        }
    }

    /// Bytes one token keeps in one layer under `codec`.
    pub fn bytes_per_token_layer(&self, codec: Codec) -> usize {
        self.rows_per_token() * codec.row_bytes(self.row_shape())
    }

    /// Bytes one token keeps over all layers that keep tokens under `codec` (indexer keys
    /// included) — while it is inside every window.
    pub fn bytes_per_token(&self, codec: Codec) -> usize {
        (self.bytes_per_token_layer(codec) + self.indexer_bytes_per_token_layer()) * self.token_layers()
    }

    /// Bytes per token and layer of the same model with full multi-head attention in bf16
    /// (for MLA: K of `head_dim + rope_dim` and V of `head_dim` for every head).
    pub fn mha_bytes_per_token_layer(&self) -> usize {
        let h = self.num_q_heads as usize;
        match self.attention {
            AttentionKind::Mla => h * (2 * self.head_dim as usize + self.rope_dim as usize) * 2,
            _ => 2 * h * self.head_dim as usize * 2,
        }
    }
}

/// gpt-oss (openai/gpt-oss-120b and -20b config.json): 64 q / 8 kv heads, head_dim 64,
/// layer_types alternating sliding_attention (window 128) and full_attention from layer 0, and
/// attention sinks on every layer.
fn gpt_oss(name: &str, layers: u32) -> ModelSpec {
    let mut m = ModelSpec::gqa(name, layers, 64, 8, 64).with_layers(
        (0..layers).map(|l| if l % 2 == 0 { LayerKind::Sliding { window: 128 } } else { LayerKind::Full }).collect(),
    );
    m.sinks = true;
    m
}

/// `n` layers of `local`, every `period`-th (1-based) full attention.
fn every_nth(n: u32, period: u32, local: LayerKind) -> Vec<LayerKind> {
    (1..=n).map(|l| if l % period == 0 { LayerKind::Full } else { local }).collect()
}

/// Nemotron-H's `hybrid_override_pattern`: `M` Mamba2, `*` attention, `-` MLP only.
fn pattern(p: &str, mamba: LayerKind) -> Vec<LayerKind> {
    p.chars()
        .map(|c| match c {
            'M' => mamba,
            '*' => LayerKind::Full,
            _ => LayerKind::None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bf16(name: &str) -> usize {
        ModelSpec::preset(name).unwrap().bytes_per_token(Codec::Bf16)
    }

    #[test]
    fn preset_footprints_match_published_configs() {
        assert_eq!(bf16("llama-3-8b"), 131_072);
        assert_eq!(bf16("llama-3-70b"), 327_680);
        assert_eq!(bf16("qwen2.5-7b"), 57_344);
        assert_eq!(bf16("deepseek-v3"), 70_272);
        assert_eq!(bf16("mistral-7b"), 131_072);
        assert_eq!(bf16("qwen3-32b"), 262_144);
        let v3 = ModelSpec::preset("deepseek-v3").unwrap();
        assert_eq!(v3.bytes_per_token_layer(Codec::Bf16), 1_152);
        assert_eq!(v3.bytes_per_token_layer(Codec::Fp8E4m3), 656);
        assert_eq!(v3.qk_width(), 576);
        assert_eq!(ModelSpec::preset("llama-3-8b").unwrap().bytes_per_token_layer(Codec::Bf16), 4_096);
        assert_eq!(ModelSpec::preset("llama-2-7b").unwrap().attention, AttentionKind::Mha);
        assert_eq!(ModelSpec::preset("falcon-7b").unwrap().attention, AttentionKind::Mqa);
    }

    #[test]
    fn deepseek_v3_softmax_scale_includes_yarn_mscale() {
        let v3 = ModelSpec::preset("deepseek-v3").unwrap();
        let m = 0.1 * 40f64.ln() + 1.0;
        let want = m * m / 192f64.sqrt();
        assert!((v3.softmax_scale as f64 - want).abs() < 1e-6, "{}", v3.softmax_scale);
        assert!((v3.softmax_scale - 0.135_234).abs() < 1e-5);
    }

    #[test]
    fn hybrid_presets_keep_what_their_layers_read() {
        let n = 131_072u64;
        let seq = |name: &str, n: u64| ModelSpec::preset(name).unwrap().bytes_per_sequence(n, Codec::Bf16);
        // gpt-oss: 18 full layers keep every token, 18 sliding ones the last 128; 2,048 B/token/layer.
        assert_eq!(seq("gpt-oss-120b", n), 18 * n * 2048 + 18 * 128 * 2048);
        assert_eq!(seq("gpt-oss-20b", n), 12 * n * 2048 + 12 * 128 * 2048);
        // Gemma 3 27B: 10 global + 52 sliding(1024) layers at 16·2·128·2 = 8,192 B/token/layer.
        assert_eq!(seq("gemma-3-27b", n), 10 * n * 8192 + 52 * 1024 * 8192);
        assert_eq!(seq("gemma-3-12b", n), 8 * n * 8192 + 40 * 1024 * 8192);
        // Llama 4 Scout: 12 global layers, 36 within the current 8,192-token chunk.
        assert_eq!(seq("llama-4-scout", n), 12 * n * 4096 + 36 * 8192 * 4096);
        assert_eq!(seq("llama-4-scout", 8193), 12 * 8193 * 4096 + 36 * 4096);
        // Qwen3-Next: 12 attention layers (2·2·256·2 = 2,048 B) + 36 GDN states of
        // 32·128·128·4 + (2·16·128 + 32·128)·3·2 bytes.
        let gdn = 32 * 128 * 128 * 4 + 8192 * 3 * 2;
        assert_eq!(gdn, 2_146_304);
        assert_eq!(seq("qwen3-next-80b-a3b", n), 12 * n * 2048 + 36 * gdn);
        // DeepSeek-V3.2: the V3 latent plus a 132-byte indexer key per token and layer.
        let v32 = ModelSpec::preset("deepseek-v3.2").unwrap();
        assert_eq!(v32.bytes_per_token(Codec::Bf16), 61 * (1152 + 132));
        assert_eq!(seq("deepseek-v3.2", n), 61 * n * 1284);
        // Nemotron-H 8B: 4 attention, 24 Mamba2 (128·64·128·4 + (8192 + 2·8·128)·3·2), 24 MLP.
        let m = ModelSpec::preset("nemotron-h-8b").unwrap();
        assert_eq!(m.layer_kinds().filter(|k| matches!(k, LayerKind::Mamba2(_))).count(), 24);
        assert_eq!(m.layer_kinds().filter(|k| *k == LayerKind::None).count(), 24);
        assert_eq!(seq("nemotron-h-8b", n), 4 * n * 4096 + 24 * (4_194_304 + 61_440));
        // Kimi-Linear: 7 MLA layers, 20 KDA states of 32·128·128·4 + 3·4096·3·2 bytes.
        assert_eq!(seq("kimi-linear-48b-a3b", n), 7 * n * 1152 + 20 * (2_097_152 + 73_728));
        // A dense model is tokens × bytes per token.
        assert_eq!(seq("llama-3-8b", n), n * 131_072);
        assert_eq!(seq("llama-3-8b", 0), 0);
        assert_eq!(seq("qwen3-next-80b-a3b", 0), 0);
    }

    #[test]
    fn a_prefix_is_restorable_when_every_layer_kind_has_what_it_reads() {
        use held::*;
        let dense = ModelSpec::preset("llama-3-8b").unwrap();
        assert_eq!(dense.restorable_prefix(&[FULL, FULL, 0, FULL], 64), 2);
        // gpt-oss, 64-token pages, window 128: the last two pages of the prefix need their
        // sliding pages, the others only the full layers'.
        let oss = ModelSpec::preset("gpt-oss-20b").unwrap();
        let h = [FULL, FULL, FULL | WINDOW, FULL | WINDOW, FULL];
        assert_eq!(oss.restorable_prefix(&h, 64), 4);
        // A hole in the window of every length: nothing restorable.
        assert_eq!(oss.restorable_prefix(&[FULL, FULL | WINDOW, FULL, FULL | WINDOW], 64), 0);
        assert_eq!(oss.restorable_prefix(&[FULL | WINDOW, FULL | WINDOW, FULL, FULL], 64), 2);
        // A window that starts inside a page needs that page too: window 128 over 4 pages of 50
        // (the next token, 200, reads 73..200: pages 1..3).
        assert_eq!(oss.restorable_prefix(&[FULL, FULL, FULL | WINDOW, FULL | WINDOW], 50), 0);
        assert_eq!(oss.restorable_prefix(&[FULL, FULL | WINDOW, FULL | WINDOW, FULL | WINDOW], 50), 4);
        // Qwen3-Next: full layers on every page, the GDN state snapshot at the last one.
        let q = ModelSpec::preset("qwen3-next-80b-a3b").unwrap();
        assert_eq!(q.restorable_prefix(&[FULL | STATE, FULL, FULL | STATE, FULL], 64), 3);
        assert_eq!(q.restorable_prefix(&[FULL, FULL, FULL], 64), 0);
        // Llama 4: chunked layers need the current chunk's pages (8,192 tokens = 128 pages).
        let l4 = ModelSpec::preset("llama-4-scout").unwrap();
        let mut h = vec![FULL; 200];
        for x in &mut h[128..190] {
            *x |= CHUNK;
        }
        assert_eq!(l4.restorable_prefix(&h, 64), 190);
        // At a chunk boundary the next token starts a chunk: no chunked pages needed.
        assert_eq!(l4.restorable_prefix(&vec![FULL; 256], 64), 256);
    }

    #[test]
    fn windows_and_chunks_read_what_the_models_attend_to() {
        let s = LayerKind::Sliding { window: 128 };
        assert_eq!(s.read_range(100), 0..100);
        assert_eq!(s.read_range(1000), 872..1000);
        let c = LayerKind::Chunked { chunk: 8 };
        assert_eq!(c.read_range(8), 0..8);
        assert_eq!(c.read_range(9), 8..9);
        assert_eq!(c.read_range(16), 8..16);
        assert_eq!(c.read_range(0), 0..0);
        // Pages wholly before the window are released: 64-token pages, 1,000 tokens, window 128
        // → the window starts at token 872, in page 13.
        assert_eq!(s.first_live_page(1000, 64), 13);
        assert_eq!(LayerKind::Full.first_live_page(1000, 64), 0);
        assert_eq!(c.first_live_page(17, 4), 4);
    }

    #[test]
    fn mla_is_far_smaller_than_its_mha_equivalent() {
        let v3 = ModelSpec::preset("deepseek-v3").unwrap();
        assert_eq!(v3.mha_bytes_per_token_layer(), 128 * 320 * 2);
        assert!(v3.mha_bytes_per_token_layer() / v3.bytes_per_token_layer(Codec::Bf16) >= 71);
    }
}
