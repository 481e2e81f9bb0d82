//! Support for tests with random inputs: a seed that is printed and can be replayed.

/// The seed of a randomized test: `KVCACHE_TEST_SEED` when set (to replay a failure), else a
/// fresh random one. It is printed, so a failing test's output (cargo shows it on failure) says
/// how to run the same inputs again.
pub fn test_seed() -> u64 {
    use std::hash::BuildHasher;
    let seed = std::env::var("KVCACHE_TEST_SEED")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| std::collections::hash_map::RandomState::new().hash_one(std::time::SystemTime::now()));
    println!("random seed {seed} (replay with KVCACHE_TEST_SEED={seed})");
    seed
}
