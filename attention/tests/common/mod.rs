//! Model shapes and the seeded generator the kernel tests share (CPU and GPU).

use kvcache_core::ModelSpec;
use rand::SeedableRng;

/// A seeded generator whose seed the test prints (`KVCACHE_TEST_SEED` replays it).
pub fn seeded() -> rand::rngs::StdRng {
    rand::rngs::StdRng::seed_from_u64(kvcache_core::testing::test_seed())
}

/// A one-layer model of `q` query heads over `kv` KV heads of width `d`.
pub fn gqa(q: u32, kv: u32, d: u32) -> ModelSpec {
    ModelSpec::gqa("t", 1, q, kv, d)
}

/// DeepSeek-V3's absorbed MLA with `heads` query heads.
pub fn mla(heads: u32) -> ModelSpec {
    let mut m = ModelSpec::preset("deepseek-v3").unwrap();
    m.num_q_heads = heads;
    m
}
