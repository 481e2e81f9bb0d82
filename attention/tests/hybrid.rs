//! Decode by layer kind against the float64 reference on fresh random inputs: sliding windows and
//! chunks (a suffix of the pages, starting inside a page), attention sinks, DeepSeek sparse
//! attention (indexer scores, top-k, attention over the chosen rows), and the gated-delta-rule
//! step of Gated DeltaNet and KDA layers; and the refusals of each.

use kvcache_attention::hybrid::{
    LinearInputs, apply_sinks, encode_indexer_key, gather_rows, indexer_scores, linear_step, top_k,
};
use kvcache_attention::reference::{self, rel_l2};
use kvcache_attention::{AttnShape, Backend, BatchItem, KvPage, Options, decode, decode_batch_each};
use kvcache_core::spec::{IndexerSpec, LayerKind, LinearKind, LinearSpec};
use kvcache_core::{Codec, ModelSpec, PageLayout};
use rand::{Rng, SeedableRng};

fn seeded() -> rand::rngs::StdRng {
    rand::rngs::StdRng::seed_from_u64(kvcache_core::testing::test_seed())
}

fn random(rng: &mut impl Rng, n: usize, r: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-r..r)).collect()
}

/// Pages of `tokens` random tokens for `spec` under `codec`.
fn pages(
    spec: &ModelSpec,
    codec: Codec,
    page_tokens: usize,
    tokens: usize,
    rng: &mut impl Rng,
) -> Vec<(Vec<u8>, usize)> {
    let layout = PageLayout::new(spec, codec, page_tokens);
    let mut out = Vec::new();
    let mut left = tokens;
    while left > 0 {
        let n = left.min(page_tokens);
        let vals = random(rng, layout.planes * n * layout.shape.width, 2.0);
        out.push((layout.encode(&vals, n), n));
        left -= n;
    }
    out
}

fn kv(p: &[(Vec<u8>, usize)]) -> Vec<KvPage<'_>> {
    p.iter().map(|(b, n)| KvPage { payload: b, tokens: *n }).collect()
}

#[test]
fn sliding_and_chunked_layers_attend_to_their_window_only() {
    let mut rng = seeded();
    let spec = ModelSpec::preset("gpt-oss-20b").unwrap();
    let page_tokens = 16;
    for codec in [Codec::Bf16, Codec::Fp8E4m3] {
        let shape = AttnShape::new(&spec, PageLayout::new(&spec, codec, page_tokens));
        for (kind, n) in [
            (LayerKind::Sliding { window: 128 }, 1000),
            (LayerKind::Sliding { window: 128 }, 100),
            (LayerKind::Sliding { window: 37 }, 301),
            (LayerKind::Chunked { chunk: 64 }, 200),
            (LayerKind::Chunked { chunk: 64 }, 256),
            (LayerKind::Full, 77),
        ] {
            let all = pages(&spec, codec, page_tokens, n, &mut rng);
            // What the worker pulls: the pages from the first live one, and the tokens of that
            // page before the window skipped.
            let first = kind.first_live_page(n as u64, page_tokens as u32) as usize;
            let live = &all[first..];
            let skip = kind.read_range(n as u64).start as usize - first * page_tokens;
            let q = random(&mut rng, shape.q_len(), 2.0);
            let sinks = random(&mut rng, shape.q_heads, 3.0);
            for backend in Backend::available() {
                for threads in [1, 2] {
                    let opts = Options { backend, threads, min_split_tokens: 16 };
                    let kvs = kv(live);
                    let item = BatchItem { skip, ..BatchItem::new(&q, &kvs) };
                    let mut out = vec![0f32; shape.out_len()];
                    let mut lse = vec![0f32; shape.q_heads];
                    let r = decode_batch_each(&shape, &[item], &opts, &mut [(&mut out[..], &mut lse[..])]);
                    r[0].clone().unwrap();
                    // The reference sees every page and skips by absolute position.
                    let start = kind.read_range(n as u64).start as usize;
                    let (ro, rl) = reference::attention_window(&shape, &q, &kv(&all), start, None);
                    let e = rel_l2(&out, &ro);
                    assert!(e < 1e-5, "{kind:?} n={n} {codec:?} {backend} t={threads}: rel L2 {e:e}");
                    for (a, b) in lse.iter().zip(&rl) {
                        assert!((*a as f64 - b).abs() < 1e-4, "lse {a} vs {b}");
                    }
                    // gpt-oss's sinks on top.
                    apply_sinks(&sinks, shape.v_width, &mut out, &mut lse).unwrap();
                    let (ro, rl) = reference::attention_window(&shape, &q, &kv(&all), start, Some(&sinks));
                    let e = rel_l2(&out, &ro);
                    assert!(e < 1e-5, "sinks {kind:?} n={n}: rel L2 {e:e}");
                    for (a, b) in lse.iter().zip(&rl) {
                        assert!((*a as f64 - b).abs() < 1e-4, "sink lse {a} vs {b}");
                    }
                }
            }
        }
    }
}

#[test]
fn a_window_past_the_pages_and_bad_sinks_are_refused() {
    let mut rng = seeded();
    let spec = ModelSpec::preset("gpt-oss-20b").unwrap();
    let shape = AttnShape::new(&spec, PageLayout::new(&spec, Codec::Bf16, 16));
    let p = pages(&spec, Codec::Bf16, 16, 20, &mut rng);
    let kvs = kv(&p);
    let q = random(&mut rng, shape.q_len(), 1.0);
    let mut out = vec![0f32; shape.out_len()];
    let mut lse = vec![0f32; shape.q_heads];
    let item = BatchItem { skip: 21, ..BatchItem::new(&q, &kvs) };
    let r = decode_batch_each(&shape, &[item], &Options::default(), &mut [(&mut out[..], &mut lse[..])]);
    assert!(r[0].as_ref().unwrap_err().to_string().contains("skips 21 of 20"));
    assert!(apply_sinks(&[0.0; 3], shape.v_width, &mut out, &mut lse).unwrap_err().to_string().contains("3 sink"));
    let bad = vec![f32::NAN; shape.q_heads];
    assert!(apply_sinks(&bad, shape.v_width, &mut out, &mut lse).is_err());
}

#[test]
fn sparse_mla_attends_to_the_indexers_top_k() {
    let mut rng = seeded();
    let mut spec = ModelSpec::preset("deepseek-v3.2").unwrap();
    spec.num_q_heads = 8;
    let idx = IndexerSpec { num_heads: 4, head_dim: 128, topk: 64 };
    let page_tokens = 32;
    let n = 700;
    for codec in [Codec::Bf16, Codec::Fp8E4m3] {
        let layout = PageLayout::new(&spec, codec, page_tokens);
        let shape = AttnShape::new(&spec, layout);
        let latents = pages(&spec, codec, page_tokens, n, &mut rng);
        // Indexer keys, stored as fp8 + scale, and their decoded values for the reference.
        let mut keys = vec![0u8; n * idx.bytes_per_token()];
        let mut decoded = Vec::new();
        for key in keys.chunks_exact_mut(idx.bytes_per_token()) {
            let k = random(&mut rng, 128, 1.0);
            encode_indexer_key(&idx, &k, key);
            let mut d = vec![0f32; 128];
            kvcache_attention::hybrid::decode_indexer_key(&idx, key, &mut d);
            decoded.push(d);
        }
        let iq = random(&mut rng, 4 * 128, 1.0);
        let w = random(&mut rng, 4, 1.0);
        let mut scores = Vec::new();
        indexer_scores(&idx, &iq, &w, &keys, &mut scores).unwrap();
        let want = reference::indexer_scores(&idx, &iq, &w, &decoded);
        let e = rel_l2(&scores, &want);
        assert!(e < 1e-5, "indexer scores rel L2 {e:e}");
        // Read from 56 pages of 100 keys, split over threads (5,600 keys: two parts): the same
        // scores.
        let mut split = Vec::new();
        let many = keys.repeat(8);
        let pages: Vec<&[u8]> = many.chunks(100 * idx.bytes_per_token()).collect();
        kvcache_attention::hybrid::indexer_scores_threads(&idx, &iq, &w, &pages, &mut split, 3).unwrap();
        assert_eq!(split, scores.repeat(8));
        let chosen = top_k(&scores, idx.topk as usize);
        assert_eq!(chosen.len(), 64);
        // The choice is the reference's top 64 up to f32 rounding of near-ties.
        let worst_in = chosen.iter().map(|&i| want[i as usize]).fold(f64::INFINITY, f64::min);
        let best_out = (0..n as u32)
            .filter(|i| chosen.binary_search(i).is_err())
            .map(|i| want[i as usize])
            .fold(f64::NEG_INFINITY, f64::max);
        assert!(worst_in >= best_out - 1e-4 * best_out.abs().max(1.0), "{worst_in} < {best_out}");
        // Attention over the chosen latent rows against the reference over the same rows.
        let src: Vec<(&[u8], usize)> = latents.iter().map(|(p, t)| (&p[..], *t)).collect();
        let packed = gather_rows(&src, layout.token_bytes(), &chosen).unwrap();
        let page = [KvPage { payload: &packed, tokens: chosen.len() }];
        let q = random(&mut rng, shape.q_len(), 1.0);
        let mut out = vec![0f32; shape.out_len()];
        let mut lse = vec![0f32; shape.q_heads];
        decode(&shape, &q, &page, &Options::default(), &mut out, &mut lse).unwrap();
        let (ro, _) = reference::attention(&shape, &q, &page);
        let e = rel_l2(&out, &ro);
        assert!(e < 1e-5, "sparse MLA {codec:?}: rel L2 {e:e}");
        // Every token chosen (top-k ≥ context) is dense attention.
        let every = top_k(&scores, n);
        let packed = gather_rows(&src, layout.token_bytes(), &every).unwrap();
        let mut dense = vec![0f32; shape.out_len()];
        decode(&shape, &q, &[KvPage { payload: &packed, tokens: n }], &Options::default(), &mut dense, &mut lse)
            .unwrap();
        let (ro, _) = reference::attention(&shape, &q, &kv(&latents));
        assert!(rel_l2(&dense, &ro) < 1e-5);
    }
    // Bad input: a query of the wrong width, keys that are not whole keys.
    let mut s = Vec::new();
    assert!(indexer_scores(&idx, &[0.0; 10], &[0.0; 4], &[], &mut s).is_err());
    assert!(indexer_scores(&idx, &[0.0; 512], &[0.0; 4], &[0u8; 131], &mut s).unwrap_err().to_string().contains("132"));
}

fn linear(kind: LinearKind, hk: u32, hv: u32, dk: u32, dv: u32) -> LinearSpec {
    LinearSpec { kind, num_k_heads: hk, num_v_heads: hv, head_k_dim: dk, head_v_dim: dv, conv_kernel: 4 }
}

fn l2norm(x: &mut [f32], d: usize) {
    for h in x.chunks_exact_mut(d) {
        let n = h.iter().map(|v| v * v).sum::<f32>().sqrt();
        h.iter_mut().for_each(|v| *v /= n);
    }
}

#[test]
fn gated_delta_rule_steps_match_the_reference() {
    let mut rng = seeded();
    for spec in [linear(LinearKind::GatedDeltaNet, 2, 4, 32, 16), linear(LinearKind::Kda, 3, 3, 16, 24)] {
        let (hk, hv, dk, dv) =
            (spec.num_k_heads as usize, spec.num_v_heads as usize, spec.head_k_dim as usize, spec.head_v_dim as usize);
        let mut state = vec![0f32; spec.recurrent_elems()];
        let scale = 1.0 / (dk as f32).sqrt();
        for step in 0..20 {
            let mut q = random(&mut rng, hk * dk, 1.0);
            let mut k = random(&mut rng, hk * dk, 1.0);
            l2norm(&mut q, dk);
            l2norm(&mut k, dk);
            let v = random(&mut rng, hv * dv, 2.0);
            let glen = if spec.kind == LinearKind::Kda { hv * dk } else { hv };
            let g: Vec<f32> = (0..glen).map(|_| rng.random_range(-1.0..0.0)).collect();
            let beta: Vec<f32> = (0..hv).map(|_| rng.random_range(0.0..1.0)).collect();
            let x = LinearInputs { q: &q, k: &k, v: &v, g: &g, beta: &beta };
            let (rs, ro) = reference::linear_step(&spec, &state, &x, scale);
            let mut out = vec![0f32; hv * dv];
            linear_step(&spec, &mut state, &x, scale, &mut out).unwrap();
            assert!(rel_l2(&out, &ro) < 1e-5, "{:?} step {step}: out {:e}", spec.kind, rel_l2(&out, &ro));
            assert!(rel_l2(&state, &rs) < 1e-5, "{:?} step {step}: state", spec.kind);
        }
    }
    // Closed form: from an empty state with β = 1 and no decay, S = k vᵀ and o = scale (k·q) v.
    let spec = linear(LinearKind::GatedDeltaNet, 1, 1, 4, 2);
    let mut state = vec![0f32; 8];
    let (q, k, v) = ([1.0, 0.0, 0.0, 0.0], [0.6, 0.8, 0.0, 0.0], [3.0, -1.0]);
    let x = LinearInputs { q: &q, k: &k, v: &v, g: &[0.0], beta: &[1.0] };
    let mut out = [0f32; 2];
    linear_step(&spec, &mut state, &x, 0.5, &mut out).unwrap();
    assert!((out[0] - 0.5 * 0.6 * 3.0).abs() < 1e-6 && (out[1] + 0.5 * 0.6).abs() < 1e-6, "{out:?}");
}

#[test]
fn linear_inputs_of_the_wrong_shape_are_refused_by_field() {
    let spec = linear(LinearKind::GatedDeltaNet, 2, 4, 8, 8);
    let mut state = vec![0f32; spec.recurrent_elems()];
    let mut out = vec![0f32; 32];
    let ok = (vec![0.1f32; 16], vec![0.1f32; 16], vec![0.1f32; 32], vec![-0.1f32; 4], vec![0.5f32; 4]);
    let run = |q: &[f32], k: &[f32], v: &[f32], g: &[f32], b: &[f32], s: &mut [f32], o: &mut [f32]| {
        linear_step(&spec, s, &LinearInputs { q, k, v, g, beta: b }, 1.0, o).map_err(|e| e.to_string())
    };
    assert!(run(&ok.0, &ok.1, &ok.2, &ok.3, &ok.4, &mut state, &mut out).is_ok());
    let e = run(&ok.0[..15], &ok.1, &ok.2, &ok.3, &ok.4, &mut state, &mut out).unwrap_err();
    assert!(e.contains("q has 15 values, expected 16"), "{e}");
    let e = run(&ok.0, &ok.1, &ok.2, &[-0.1; 32], &ok.4, &mut state, &mut out).unwrap_err();
    assert!(e.contains("g has 32 values, expected 4"), "{e}");
    let e = run(&ok.0, &ok.1, &ok.2, &[0.5; 4], &ok.4, &mut state, &mut out).unwrap_err();
    assert!(e.contains("log decay"), "{e}");
    let e = run(&ok.0, &ok.1, &[f32::NAN; 32], &ok.3, &ok.4, &mut state, &mut out).unwrap_err();
    assert!(e.contains("v holds a NaN"), "{e}");
    let e = run(&ok.0, &ok.1, &ok.2, &ok.3, &ok.4, &mut state[..10], &mut out).unwrap_err();
    assert!(e.contains("state of 10"), "{e}");
}
