//! Every backend and codec against the float64 reference on fresh random inputs, split-and-merge
//! against the unsplit result, and the refusals (bad lengths, NaN).

use kvcache_attention::reference::{attention, rel_l2};
use kvcache_attention::{
    AttentionError, AttnShape, Backend, BatchItem, KvPage, Options, decode, decode_batch, decode_batch_each, merge,
};
use kvcache_core::{Codec, ModelSpec, PageLayout};
use rand::Rng;

mod common;
use common::{gqa, mla, seeded};

struct Case {
    shape: AttnShape,
    q: Vec<f32>,
    pages: Vec<(Vec<u8>, usize)>,
}

fn case(spec: &ModelSpec, codec: Codec, page_tokens: usize, tokens: usize, rng: &mut impl Rng) -> Case {
    let layout = PageLayout::new(spec, codec, page_tokens);
    let shape = AttnShape::new(spec, layout);
    let q: Vec<f32> = (0..shape.q_len()).map(|_| rng.random_range(-2.0..2.0)).collect();
    let mut pages = Vec::new();
    let mut left = tokens;
    while left > 0 {
        let n = left.min(page_tokens);
        // Each 128-wide column tile its own magnitude, so fp8 tiles of one row get different
        // scales and a kernel that applies the wrong tile's scale shows.
        let w = layout.shape.width;
        let vals: Vec<f32> = (0..layout.planes * n * w)
            .map(|i| rng.random_range(-3.0..3.0) * [1.0, 0.0625, 0.25, 0.015625][(i % w) / 128 % 4])
            .collect();
        pages.push((layout.encode(&vals, n), n));
        left -= n;
    }
    Case { shape, q, pages }
}

impl Case {
    fn kv(&self) -> Vec<KvPage<'_>> {
        self.pages.iter().map(|(p, n)| KvPage { payload: p, tokens: *n }).collect()
    }

    /// Run `backend`, check against the reference, return the output.
    fn check(&self, backend: Backend, threads: usize, tol: f64) -> (Vec<f32>, Vec<f32>) {
        let opts = Options { backend, threads, min_split_tokens: 64 };
        let mut out = vec![f32::NAN; self.shape.out_len()];
        let mut lse = vec![f32::NAN; self.shape.q_heads];
        decode(&self.shape, &self.q, &self.kv(), &opts, &mut out, &mut lse).unwrap();
        let (ro, rl) = attention(&self.shape, &self.q, &self.kv());
        let e = rel_l2(&out, &ro);
        assert!(e <= tol, "{backend} threads={threads}: rel L2 {e:e} > {tol:e}");
        for (a, b) in lse.iter().zip(&rl) {
            assert!((*a as f64 - b).abs() <= 1e-4 * b.abs().max(1.0), "{backend}: lse {a} vs {b}");
        }
        (out, lse)
    }
}

#[test]
fn every_backend_and_codec_matches_the_f64_reference_on_random_shapes() {
    let mut rng = seeded();
    let shapes = [
        gqa(32, 8, 128),
        gqa(4, 4, 64),
        gqa(16, 1, 256),
        gqa(12, 3, 64),
        gqa(7, 7, 80),
        gqa(128, 8, 128),
        mla(16),
        mla(128),
    ];
    for spec in &shapes {
        for codec in Codec::ALL {
            let pt = [16usize, 64, 256][rng.random_range(0..3)];
            let tokens = rng.random_range(1..700);
            let mut c = case(spec, codec, pt, tokens, &mut rng);
            for b in Backend::available() {
                c.check(b, 1, 1e-5);
            }
            // A query of bf16 values (an engine's), which the AVX-512 BF16 path scores with
            // `vdpbf16ps`.
            for x in &mut c.q {
                *x = half::bf16::from_f32(*x).to_f32();
            }
            for b in Backend::available() {
                c.check(b, 1, 1e-5);
            }
        }
    }
}

#[test]
fn group_sizes_one_to_sixteen_and_partial_last_pages() {
    let mut rng = seeded();
    for group in 1..=16u32 {
        let kv = rng.random_range(1..4);
        let c = case(&gqa(group * kv, kv, 64), Codec::Bf16, 16, 16 * 3 + group as usize, &mut rng);
        for b in Backend::available() {
            c.check(b, 1, 1e-5);
        }
    }
}

#[test]
fn backends_agree_with_each_other() {
    let mut rng = seeded();
    let c = case(&mla(32), Codec::Fp8E4m3, 64, 333, &mut rng);
    let base = c.check(Backend::Portable, 1, 1e-5).0;
    for b in Backend::available() {
        let o = c.check(b, 1, 1e-5).0;
        let e = rel_l2(&o, &base.iter().map(|x| *x as f64).collect::<Vec<_>>());
        assert!(e < 1e-5, "{b} vs portable: {e:e}");
    }
}

#[test]
fn the_bf16_dot_product_path_is_taken_for_bf16_queries_and_as_accurate_as_f32() {
    if !Backend::available().contains(&Backend::Avx512Bf16) {
        eprintln!("no AVX-512 BF16 on this CPU: the vdpbf16ps path cannot run here (not tested)");
        return;
    }
    let mut rng = seeded();
    // GQA bf16 rows straight from the payload; MLA bf16 latent rows; MLA fp8 rows widened to
    // bf16 values (a power-of-two tile scale) and copied to bf16.
    let cases = [
        (gqa(32, 8, 128), Codec::Bf16, 16, 4000),
        (gqa(16, 1, 256), Codec::Bf16, 64, 333),
        (gqa(8, 8, 96), Codec::Bf16, 256, 258),
        (mla(16), Codec::Bf16, 64, 300),
        (mla(16), Codec::Fp8E4m3, 16, 300),
    ];
    for (spec, codec, pt, tokens) in cases {
        let mut c = case(&spec, codec, pt, tokens, &mut rng);
        // An f32 query: both AVX-512 backends run the same f32 path, bit for bit.
        assert!(!kvcache_attention::is_bf16_query(&c.q));
        let exact = c.check(Backend::Avx512, 1, 1e-5);
        assert_eq!(c.check(Backend::Avx512Bf16, 1, 1e-5), exact, "an f32 query took the vdpbf16ps path");
        // A bf16 query: exact products, f32 sums, the scale on the scores — f32-level error,
        // and a different rounding from the f32 path's, which scales the query (so the path was
        // taken; with a power-of-two scale, 1/√64, both would round alike).
        for x in &mut c.q {
            *x = half::bf16::from_f32(*x).to_f32();
        }
        assert!(kvcache_attention::is_bf16_query(&c.q));
        let f32_path = c.check(Backend::Avx512, 1, 1e-5).0;
        let fast = c.check(Backend::Avx512Bf16, 1, 1e-5).0;
        assert_ne!(
            fast, f32_path,
            "{codec:?}, {pt}-token pages, {tokens} tokens: the vdpbf16ps path was not taken (same rounding as the f32 path)"
        );
        // Split over threads, the same path in each part.
        c.check(Backend::Avx512Bf16, 3, 1e-5);
    }
}

#[test]
fn a_hundred_thousand_tokens_split_across_threads() {
    let mut rng = seeded();
    let c = case(&gqa(4, 2, 64), Codec::Bf16, 256, 100_000, &mut rng);
    let (one, _) = c.check(Backend::detect(), 1, 1e-5);
    let (four, _) = c.check(Backend::detect(), 4, 1e-5);
    // Both are within 1e-5 of the reference; they differ only by f32 accumulation order over
    // 100k tokens (the merge itself is pinned at 1e-6 by the next test).
    let e = rel_l2(&four, &one.iter().map(|x| *x as f64).collect::<Vec<_>>());
    assert!(e <= 1e-5, "split vs unsplit {e:e}");
}

#[test]
fn split_and_merge_at_arbitrary_points_equals_the_unsplit_result() {
    let mut rng = seeded();
    for spec in [gqa(8, 2, 128), mla(8)] {
        let c = case(&spec, Codec::Bf16, 16, 500, &mut rng);
        let kv = c.kv();
        let opts = Options { backend: Backend::detect(), threads: 1, min_split_tokens: usize::MAX };
        let (ho, h) = (c.shape.out_len(), c.shape.q_heads);
        let mut whole = (vec![0f32; ho], vec![0f32; h]);
        decode(&c.shape, &c.q, &kv, &opts, &mut whole.0, &mut whole.1).unwrap();
        for _ in 0..10 {
            // Split the page list at random page boundaries into up to 4 parts, merge in a
            // shuffled order.
            let mut cuts: Vec<usize> = (0..3).map(|_| rng.random_range(0..=kv.len())).collect();
            cuts.push(0);
            cuts.push(kv.len());
            cuts.sort();
            let mut parts = Vec::new();
            for w in cuts.windows(2) {
                let mut o = vec![f32::NAN; ho];
                let mut l = vec![f32::NAN; h];
                decode(&c.shape, &c.q, &kv[w[0]..w[1]], &opts, &mut o, &mut l).unwrap();
                parts.push((o, l));
            }
            parts.reverse();
            let refs: Vec<(&[f32], &[f32])> = parts.iter().map(|(o, l)| (&o[..], &l[..])).collect();
            let mut o = vec![f32::NAN; ho];
            let mut l = vec![f32::NAN; h];
            merge(&refs, c.shape.v_width, &mut o, &mut l);
            let e = rel_l2(&o, &whole.0.iter().map(|x| *x as f64).collect::<Vec<_>>());
            assert!(e <= 1e-6, "merged vs whole: {e:e}");
            for (a, b) in l.iter().zip(&whole.1) {
                assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0));
            }
        }
    }
}

#[test]
fn batches_of_different_lengths_match_one_by_one() {
    let mut rng = seeded();
    let spec = gqa(8, 2, 64);
    let cases: Vec<Case> = [1usize, 17, 300, 1000].iter().map(|&t| case(&spec, Codec::F16, 64, t, &mut rng)).collect();
    let kvs: Vec<Vec<KvPage>> = cases.iter().map(|c| c.kv()).collect();
    let items: Vec<BatchItem> = cases.iter().zip(&kvs).map(|(c, kv)| BatchItem::new(&c.q, kv)).collect();
    let shape = cases[0].shape;
    let mut bufs: Vec<(Vec<f32>, Vec<f32>)> =
        (0..items.len()).map(|_| (vec![f32::NAN; shape.out_len()], vec![f32::NAN; shape.q_heads])).collect();
    let mut outs: Vec<(&mut [f32], &mut [f32])> = bufs.iter_mut().map(|(o, l)| (&mut o[..], &mut l[..])).collect();
    decode_batch(&shape, &items, &Options { threads: 2, min_split_tokens: 128, ..Options::default() }, &mut outs)
        .unwrap();
    for (c, (o, _)) in cases.iter().zip(&bufs) {
        let (ro, _) = attention(&c.shape, &c.q, &c.kv());
        assert!(rel_l2(o, &ro) <= 1e-5);
    }
}

#[test]
fn nan_never_passes_and_bad_lengths_are_refused() {
    let mut rng = seeded();
    let c = case(&gqa(4, 2, 64), Codec::Bf16, 16, 40, &mut rng);
    let opts = Options::default();
    let mut out = vec![0f32; c.shape.out_len()];
    let mut lse = vec![0f32; c.shape.q_heads];
    let mut q = c.q.clone();
    q[3] = f32::NAN;
    assert_eq!(decode(&c.shape, &q, &c.kv(), &opts, &mut out, &mut lse), Err(AttentionError::NonFiniteQuery));
    let mut poisoned = c.pages.clone();
    poisoned[1].0[10] = 0xff;
    poisoned[1].0[11] = 0x7f; // a bf16 NaN
    let kv: Vec<KvPage> = poisoned.iter().map(|(p, n)| KvPage { payload: p, tokens: *n }).collect();
    assert_eq!(decode(&c.shape, &c.q, &kv, &opts, &mut out, &mut lse), Err(AttentionError::NonFiniteResult));
    assert!(matches!(
        decode(&c.shape, &c.q[1..], &c.kv(), &opts, &mut out, &mut lse),
        Err(AttentionError::QueryLength { .. })
    ));
    let short = [KvPage { payload: &c.pages[0].0[1..], tokens: 16 }];
    assert!(matches!(
        decode(&c.shape, &c.q, &short, &opts, &mut out, &mut lse),
        Err(AttentionError::PageLength { .. })
    ));
    // No pages: zero output, lse −∞.
    decode(&c.shape, &c.q, &[], &opts, &mut out, &mut lse).unwrap();
    assert!(out.iter().all(|x| *x == 0.0) && lse.iter().all(|x| *x == f32::NEG_INFINITY));
}

/// Pages of `c` with every 16-bit value of page `page` replaced by `bits` (a bf16/f16 NaN or
/// infinity), so every score or every output row that reads it is poisoned.
fn poisoned(c: &Case, page: usize, bits: u16) -> Vec<(Vec<u8>, usize)> {
    let mut pages = c.pages.clone();
    for v in pages[page].0.chunks_exact_mut(2) {
        v.copy_from_slice(&bits.to_le_bytes());
    }
    pages
}

fn kv_of(ps: &[(Vec<u8>, usize)]) -> Vec<KvPage<'_>> {
    ps.iter().map(|(p, n)| KvPage { payload: p, tokens: *n }).collect()
}

#[test]
fn a_batch_answers_each_item_and_refuses_only_the_ones_whose_pages_hold_nan_or_infinity() {
    let mut rng = seeded();
    let spec = gqa(8, 2, 64);
    let good = case(&spec, Codec::Bf16, 16, 300, &mut rng);
    let nan = case(&spec, Codec::Bf16, 16, 300, &mut rng);
    let inf = case(&spec, Codec::Bf16, 16, 300, &mut rng);
    // A whole page of NaN (the scores of its tokens are NaN: the running max skips them, which
    // once produced a zero output with lse −∞ reported as success) in the middle of the context,
    // and a page of +∞ at the end.
    let nan_pages = poisoned(&nan, 9, 0x7fc0);
    let inf_pages = poisoned(&inf, inf.pages.len() - 1, 0x7f80);
    let (kv_good, kv_nan, kv_inf) = (good.kv(), kv_of(&nan_pages), kv_of(&inf_pages));
    let items = [BatchItem::new(&nan.q, &kv_nan), BatchItem::new(&good.q, &kv_good), BatchItem::new(&inf.q, &kv_inf)];
    let shape = good.shape;
    // One thread, and split-K over two (the NaN page then sits in one split of several).
    for opts in [Options::default(), Options { threads: 2, min_split_tokens: 64, ..Options::default() }] {
        let mut bufs: Vec<(Vec<f32>, Vec<f32>)> =
            (0..3).map(|_| (vec![f32::NAN; shape.out_len()], vec![f32::NAN; shape.q_heads])).collect();
        let mut outs: Vec<(&mut [f32], &mut [f32])> = bufs.iter_mut().map(|(o, l)| (&mut o[..], &mut l[..])).collect();
        let r = decode_batch_each(&shape, &items, &opts, &mut outs);
        assert_eq!(r, vec![Err(AttentionError::NonFiniteResult), Ok(()), Err(AttentionError::NonFiniteResult)]);
        let (ro, rl) = attention(&shape, &good.q, &good.kv());
        assert!(rel_l2(&bufs[1].0, &ro) <= 1e-5);
        for (a, b) in bufs[1].1.iter().zip(&rl) {
            assert!((*a as f64 - b).abs() <= 1e-4 * b.abs().max(1.0), "lse {a} vs {b}");
        }
        // A refused item's slot holds no stale or partial values.
        for i in [0, 2] {
            assert!(bufs[i].0.iter().all(|x| *x == 0.0));
            assert!(bufs[i].1.iter().all(|x| *x == f32::NEG_INFINITY));
        }
        let mut outs: Vec<(&mut [f32], &mut [f32])> = bufs.iter_mut().map(|(o, l)| (&mut o[..], &mut l[..])).collect();
        assert_eq!(decode_batch(&shape, &items, &opts, &mut outs), Err(AttentionError::NonFiniteResult));
    }
}
