//! Model attention geometry and presets exact to the published configs.

use crate::codec::{Codec, RowShape};
use serde::Serialize;

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
}

/// DeepSeek's YaRN attention-scale correction: `0.1 * mscale * ln(factor) + 1`.
fn yarn_mscale(factor: f64, mscale: f64) -> f64 {
    if factor <= 1.0 { 1.0 } else { 0.1 * mscale * factor.ln() + 1.0 }
}

impl ModelSpec {
    fn gqa(name: &str, layers: u32, q: u32, kv: u32, d: u32) -> Self {
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
        }
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
        ]
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

    /// Bytes one token keeps over all layers under `codec`.
    pub fn bytes_per_token(&self, codec: Codec) -> usize {
        self.bytes_per_token_layer(codec) * self.num_layers as usize
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
    fn mla_is_far_smaller_than_its_mha_equivalent() {
        let v3 = ModelSpec::preset("deepseek-v3").unwrap();
        assert_eq!(v3.mha_bytes_per_token_layer(), 128 * 320 * 2);
        assert!(v3.mha_bytes_per_token_layer() / v3.bytes_per_token_layer(Codec::Bf16) >= 71);
    }
}
