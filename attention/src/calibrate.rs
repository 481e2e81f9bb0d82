//! The CPU kernel path per machine and shape, chosen by measuring rather than by a fixed
//! preference.
//!
//! Which path is fastest depends on the CPU, not only on its flags: on the Intel Xeon measured,
//! `vdpbf16ps` runs at about half the f32 FMA rate and the f32 path wins; on AMD Zen 4 the
//! 512-bit FMA runs at the 256-bit rate while the bf16 dot product runs at twice that, so the
//! order can flip. [`backend_for`] times every backend this CPU runs on a small decode of the
//! shape (one thread, a few milliseconds per backend), keeps the fastest, and caches the choice
//! for the process, per (geometry, codec, query kind). The worker and `kvcache bench attention`
//! both ask it.
//!
//! The query kind matters: a query whose every value is a bf16 value (what an engine computing
//! in bf16 sends) lets the AVX-512 BF16 path score GQA rows with `vdpbf16ps` at half the
//! instructions; any other query runs the same f32 path on both AVX-512 backends.
//! `KVCACHE_BACKEND=avx512|avx512-bf16|avx2|portable` overrides the choice.

use crate::{AttnShape, Backend, KvPage, Options, decode};
use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

type Key = (usize, usize, usize, usize, bool, u8, usize, bool);

fn key(shape: &AttnShape, bf16_query: bool) -> Key {
    let l = &shape.layout;
    (
        shape.q_heads,
        shape.kv_groups,
        shape.qk_width,
        shape.v_width,
        shape.latent,
        l.codec.tag(),
        l.row_bytes,
        bf16_query,
    )
}

fn cache() -> &'static Mutex<HashMap<Key, Backend>> {
    static C: OnceLock<Mutex<HashMap<Key, Backend>>> = OnceLock::new();
    C.get_or_init(|| Mutex::new(HashMap::new()))
}

/// The backend to run `shape` with on this machine for queries that are (`bf16_query`) or are
/// not all bf16 values ([`crate::is_bf16_query`]): `KVCACHE_BACKEND` when set (and available),
/// else the fastest measured by [`calibrate`], measured once per process, shape and query kind.
pub fn backend_for(shape: &AttnShape, bf16_query: bool) -> Backend {
    if let Some(b) = std::env::var("KVCACHE_BACKEND").ok().and_then(|s| Backend::parse(&s))
        && Backend::available().contains(&b)
    {
        return b;
    }
    let k = key(shape, bf16_query);
    if let Some(b) = cache().lock().expect("calibration cache").get(&k) {
        return *b;
    }
    let b = calibrate(shape, bf16_query).first().map_or_else(Backend::detect, |(b, _)| *b);
    cache().lock().expect("calibration cache").insert(k, b);
    b
}

/// [`Options`] for `shape` on `threads` threads with the backend [`backend_for`] picks for
/// these queries.
pub fn options_for(shape: &AttnShape, threads: usize, queries: &[&[f32]]) -> Options {
    let bf16 = queries.iter().all(|q| crate::is_bf16_query(q));
    Options { backend: backend_for(shape, bf16), threads, ..Options::default() }
}

/// Time every backend this CPU runs on a decode of `shape` (one thread; about 8 M multiply-adds
/// and at least 1024 tokens per run, best of three after a warm-up) with a random query rounded to bf16 when
/// `bf16_query`, fastest first: `(backend, seconds per run)`. The portable path is timed only
/// where no SIMD path exists.
pub fn calibrate(shape: &AttnShape, bf16_query: bool) -> Vec<(Backend, f64)> {
    let l = shape.layout;
    let per_token = (shape.q_heads * (shape.qk_width + shape.v_width)).max(1);
    // At least 1024 tokens: below that, fixed per-call costs hide MLA's difference between
    // paths (12% at 256 tokens, 26% at 1024, 35% at 32K on AMD Zen 4).
    let tokens = (8_000_000 / per_token).clamp(1024, 16_384).next_multiple_of(l.page_tokens);
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut rnd = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    };
    let page: Vec<f32> = (0..l.planes * l.page_tokens * l.shape.width).map(|_| rnd()).collect();
    let payload = l.encode(&page, l.page_tokens);
    let pages: Vec<KvPage> =
        (0..tokens / l.page_tokens).map(|_| KvPage { payload: &payload, tokens: l.page_tokens }).collect();
    let q: Vec<f32> = (0..shape.q_len())
        .map(|_| rnd())
        .map(|x| if bf16_query { half::bf16::from_f32(x).to_f32() } else { x })
        .collect();
    let (mut out, mut lse) = (vec![0f32; shape.out_len()], vec![0f32; shape.q_heads]);
    let candidates: Vec<Backend> = {
        let all = Backend::available();
        if all.len() > 1 { all.into_iter().filter(|b| *b != Backend::Portable).collect() } else { all }
    };
    let mut timed: Vec<(Backend, f64)> = candidates
        .into_iter()
        .filter_map(|backend| {
            let opts = Options { backend, threads: 1, min_split_tokens: usize::MAX };
            decode(shape, &q, &pages, &opts, &mut out, &mut lse).ok()?;
            let best = (0..3)
                .map(|_| {
                    let t = Instant::now();
                    decode(shape, &q, &pages, &opts, &mut out, &mut lse).map(|_| t.elapsed().as_secs_f64())
                })
                .collect::<Result<Vec<f64>, _>>()
                .ok()?
                .into_iter()
                .fold(f64::INFINITY, f64::min);
            Some((backend, best))
        })
        .collect();
    timed.sort_by(|a, b| a.1.total_cmp(&b.1));
    timed
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvcache_core::{Codec, ModelSpec, PageLayout};

    #[test]
    fn calibration_times_every_simd_backend_and_caches_its_choice() {
        let spec = ModelSpec::preset("llama-3-8b").unwrap();
        let shape = AttnShape::new(&spec, PageLayout::new(&spec, Codec::Bf16, 64));
        let timed = calibrate(&shape, false);
        let simd = Backend::available().len() > 1;
        let expected = if simd { Backend::available().len() - 1 } else { 1 };
        assert_eq!(timed.len(), expected, "{timed:?}");
        assert!(timed.windows(2).all(|w| w[0].1 <= w[1].1), "fastest first: {timed:?}");
        assert!(timed.iter().all(|(_, s)| *s > 0.0 && s.is_finite()));
        for bf16 in [false, true] {
            let b = backend_for(&shape, bf16);
            assert!(Backend::available().contains(&b));
            // Cached: the second ask answers the same without measuring again.
            assert_eq!(backend_for(&shape, bf16), b);
        }
    }
}
