//! Model shapes and the seeded generator the kernel tests share (CPU and GPU).

use kvcache_core::{AttentionKind, ModelSpec};
use rand::SeedableRng;

/// A seeded generator whose seed the test prints (`KVCACHE_TEST_SEED` replays it).
pub fn seeded() -> rand::rngs::StdRng {
    rand::rngs::StdRng::seed_from_u64(kvcache_core::testing::test_seed())
}

/// A GQA model of `q` query heads over `kv` KV heads of width `d` (MHA when they are equal).
pub fn gqa(q: u32, kv: u32, d: u32) -> ModelSpec {
    ModelSpec {
        name: "t".into(),
        attention: if q == kv { AttentionKind::Mha } else { AttentionKind::Gqa },
        num_layers: 1,
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

/// DeepSeek-V3's absorbed MLA with `heads` query heads.
pub fn mla(heads: u32) -> ModelSpec {
    let mut m = ModelSpec::preset("deepseek-v3").unwrap();
    m.num_q_heads = heads;
    m
}
