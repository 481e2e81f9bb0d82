//! The CUDA backend against the float64 reference. These tests need an NVIDIA GPU and its driver:
//! they are `#[ignore]`d with that reason, so `cargo test` lists them as ignored (never as passed)
//! on a machine without one. On a GPU machine: `cargo test -p kvcache-attention --test gpu --
//! --include-ignored`. The one test that runs everywhere checks that a missing driver or device is
//! a clear error, not a panic.

use kvcache_attention::gpu::{DeviceRef, Gpu, GpuError, GpuItem, PageWrite, Query, RowAppend, SlotSeq};
use kvcache_attention::reference::{attention_window, rel_l2};
use kvcache_attention::{AttentionError, AttnShape, KvPage};
use kvcache_core::{Codec, PageLayout};
use rand::Rng;
use std::sync::Arc;

mod common;
use common::{gqa, mla, seeded};

fn gpu() -> Arc<Gpu> {
    match Gpu::open(0) {
        Ok(g) => {
            eprintln!("device: {}", g.describe());
            g
        }
        Err(e) => panic!("this test needs a GPU: {e}"),
    }
}

struct Seq {
    q: Vec<f32>,
    pages: Vec<(Vec<u8>, usize)>,
    skip: usize,
}

impl Seq {
    fn kv(&self) -> Vec<KvPage<'_>> {
        self.pages.iter().map(|(p, n)| KvPage { payload: p, tokens: *n }).collect()
    }
}

fn seq(shape: &AttnShape, tokens: usize, skip: usize, rng: &mut impl Rng) -> Seq {
    let layout = shape.layout;
    let q: Vec<f32> = (0..shape.q_len()).map(|_| rng.random_range(-2.0..2.0)).collect();
    // MLA queries as a bf16 model sends them (exactly bf16); `f32_query` makes them full f32.
    let q = if shape.latent { q.into_iter().map(|x| half::bf16::from_f32(x).to_f32()).collect() } else { q };
    let mut pages = Vec::new();
    let mut left = tokens;
    while left > 0 {
        let n = left.min(layout.page_tokens);
        let w = layout.shape.width;
        // Tiles of different magnitude, so a wrong fp8 tile scale shows.
        let vals: Vec<f32> = (0..layout.planes * n * w)
            .map(|i| rng.random_range(-3.0..3.0) * [1.0, 0.0625, 0.25, 0.015625][(i % w) / 128 % 4])
            .collect();
        pages.push((layout.encode(&vals, n), n));
        left -= n;
    }
    Seq { q, pages, skip }
}

fn f32_query(mut s: Seq, rng: &mut impl Rng) -> Seq {
    s.q = s.q.iter().map(|_| rng.random_range(-2.0..2.0)).collect();
    s
}

/// Run `seqs` as one batch on the GPU and check every sequence against the reference (LSE within
/// `lse_tol` relative, at least absolute).
fn check_batch(g: &Gpu, shape: &AttnShape, seqs: &[Seq], tol: f64) -> f64 {
    check_batch_lse(g, shape, seqs, tol, 1e-4)
}

fn check_batch_lse(g: &Gpu, shape: &AttnShape, seqs: &[Seq], tol: f64, lse_tol: f64) -> f64 {
    let uploads: Vec<_> = seqs.iter().map(|s| g.upload_pages(&shape.layout, &s.kv()).unwrap()).collect();
    let refs: Vec<Vec<DeviceRef>> = uploads.iter().map(|u| u.pages()).collect();
    let items: Vec<GpuItem> =
        seqs.iter().zip(&refs).map(|(s, r)| GpuItem { q: Query::F32(&s.q), pages: r, skip: s.skip }).collect();
    let mut plan = g.plan(shape, &items).unwrap();
    g.launch(&mut plan).unwrap();
    let res = g.results(&plan).unwrap();
    let kernel = plan.kernel_name();
    // The reused-buffer paths (what the worker calls) runs the same kernels on the same inputs.
    let again = g.decode_batch(shape, &items).unwrap();
    assert!(again.out == res.out && again.lse == res.lse, "{kernel}: decode_batch differs from plan/launch/results");
    assert_eq!(again.status.len(), res.status.len());
    let (ol, hl) = (shape.out_len(), shape.q_heads);
    for (i, r) in g.decode_batch_each(shape, &items, false).unwrap().into_iter().enumerate() {
        let (o, l) = r.unwrap();
        assert!(
            o.to_f32() == res.out[i * ol..(i + 1) * ol] && l == res.lse[i * hl..(i + 1) * hl],
            "{kernel}: item {i} differs"
        );
    }
    // Pages named by slot of one slab (the worker's page cache), written through the staged
    // upload (buffers of three pages, so several rounds; slots rotated by half the slab, so runs
    // of consecutive slots and a wrap), sequences laid out last first: the same answers, and a
    // slot past the slab or a short page before the last refused.
    let all: Vec<KvPage> = seqs.iter().rev().flat_map(|s| s.kv()).collect();
    let mut slab = g.alloc_slots(&shape.layout, all.len().max(1)).unwrap();
    let n = all.len().max(1);
    let slot_of = |k: usize| (k + n / 2) % n;
    // Every other page from a host copy page-locked with the driver: its full pages go up by
    // DMA straight from there, the rest staged.
    let page_bytes = shape.layout.page_bytes();
    let mut host = vec![0u8; all.len() * page_bytes + 4096];
    let base = host.as_ptr().align_offset(4096);
    for (k, p) in all.iter().enumerate() {
        host[base + k * page_bytes..][..p.payload.len()].copy_from_slice(p.payload);
    }
    let host = &mut host[base..base + (all.len() * page_bytes).max(1)];
    // SAFETY: `host` outlives `region` (declared before it, dropped after).
    let region = unsafe { g.register_host(host.as_mut_ptr(), host.len()) }.unwrap();
    let writes: Vec<PageWrite> = all
        .iter()
        .enumerate()
        .map(|(k, p)| {
            let payload = if k % 2 == 0 { &host[k * page_bytes..][..p.payload.len()] } else { p.payload };
            PageWrite { index: slot_of(k), payload, tokens: p.tokens }
        })
        .collect();
    let mut staging = g.staging(&shape.layout, 3 * page_bytes).unwrap();
    let dma = g.write_pages_staged(&mut slab, &writes, &mut staging, Some(&region)).unwrap();
    let in_region = (0..all.len()).filter(|k| k % 2 == 0 && all[*k].tokens == shape.layout.page_tokens).count();
    assert_eq!(dma, in_region, "full pages in the registered region go up by DMA");
    if let Some(w) = writes.first() {
        let short = PageWrite { payload: &w.payload[1..], ..*w };
        assert!(matches!(
            g.write_pages_staged(&mut slab, &[short], &mut staging, None),
            Err(GpuError::Attention(AttentionError::PageLength { .. }))
        ));
    }
    let mut at = all.len();
    let slots: Vec<Vec<usize>> = seqs
        .iter()
        .map(|s| {
            at -= s.pages.len();
            (at..at + s.pages.len()).map(slot_of).collect()
        })
        .collect();
    let slot_items: Vec<SlotSeq> =
        seqs.iter().zip(&slots).map(|(s, sl)| SlotSeq { q: Query::F32(&s.q), slots: sl, skip: s.skip }).collect();
    for (i, r) in g.decode_slots_each(shape, &slab, &slot_items, false).unwrap().into_iter().enumerate() {
        let (o, l) = r.unwrap();
        assert!(
            o.to_f32() == res.out[i * ol..(i + 1) * ol] && l == res.lse[i * hl..(i + 1) * hl],
            "{kernel}: slot item {i} differs"
        );
    }
    let past = [slab.len()];
    let bad = SlotSeq { slots: &past, skip: 0, ..slot_items[0] };
    assert!(matches!(
        g.decode_slots_each(shape, &slab, &[bad], false),
        Err(GpuError::Attention(AttentionError::Shape(m))) if m.contains("names slot")
    ));
    if let Some(short) = (0..all.len()).find(|&k| all[k].tokens < shape.layout.page_tokens) {
        let twice = [slot_of(short), slot_of(short)];
        let bad = SlotSeq { slots: &twice, skip: 0, ..slot_items[0] };
        assert!(matches!(
            g.decode_slots_each(shape, &slab, &[bad], false),
            Err(GpuError::Attention(AttentionError::Shape(m))) if m.contains("every page but the last")
        ));
    }
    // bf16 queries and outputs as they travel: widened and rounded on the device, the same as
    // the f32 path on the widened query with its output rounded.
    let bf16: Vec<Vec<u8>> =
        seqs.iter().map(|s| s.q.iter().flat_map(|x| half::bf16::from_f32(*x).to_le_bytes()).collect()).collect();
    let widened: Vec<Vec<f32>> = bf16
        .iter()
        .map(|b| b.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect())
        .collect();
    let wide_items: Vec<GpuItem> =
        items.iter().zip(&widened).map(|(it, w)| GpuItem { q: Query::F32(w), ..*it }).collect();
    let want = g.decode_batch(shape, &wide_items).unwrap();
    let bf_items: Vec<GpuItem> = items.iter().zip(&bf16).map(|(it, b)| GpuItem { q: Query::Bf16(b), ..*it }).collect();
    for (i, r) in g.decode_batch_each(shape, &bf_items, true).unwrap().into_iter().enumerate() {
        let (o, l) = r.unwrap();
        let rounded: Vec<f32> =
            want.out[i * ol..(i + 1) * ol].iter().map(|x| half::bf16::from_f32(*x).to_f32()).collect();
        assert!(matches!(o, kvcache_attention::gpu::Output::Bf16(_)), "{kernel}: bf16 asked");
        assert!(o.to_f32() == rounded && l == want.lse[i * hl..(i + 1) * hl], "{kernel}: bf16 item {i} differs");
    }
    let mut worst = 0f64;
    for (i, s) in seqs.iter().enumerate() {
        res.status[i].clone().unwrap();
        let (ro, rl) = attention_window(shape, &s.q, &s.kv(), s.skip, None);
        let out = &res.out[i * ol..(i + 1) * ol];
        let lse = &res.lse[i * hl..(i + 1) * hl];
        let tokens: usize = s.pages.iter().map(|p| p.1).sum::<usize>() - s.skip;
        if tokens == 0 {
            assert!(out.iter().all(|x| *x == 0.0) && lse.iter().all(|x| *x == f32::NEG_INFINITY));
            continue;
        }
        let e = rel_l2(out, &ro);
        assert!(e <= tol, "{kernel} {:?} item {i} ({tokens} tokens): rel L2 {e:e} > {tol:e}", shape.layout.codec);
        for (a, b) in lse.iter().zip(&rl) {
            assert!((*a as f64 - b).abs() <= lse_tol * b.abs().max(1.0), "{kernel}: lse {a} vs {b}");
        }
        worst = worst.max(e);
    }
    worst
}

#[test]
fn a_machine_without_a_driver_or_device_gets_a_clear_error() {
    // Runs everywhere: on a machine without CUDA the error names what is missing; with a GPU,
    // device 0 opens and a device past the last is refused by number.
    match Gpu::open(0) {
        Ok(g) => {
            assert!(!g.describe().is_empty());
            match Gpu::open(1 << 20) {
                Err(GpuError::NoDevice { ordinal, count }) => assert!(ordinal == 1 << 20 && count >= 1),
                other => panic!("expected NoDevice, got {other:?}"),
            }
        }
        Err(e) => {
            let msg = e.to_string();
            eprintln!("no GPU here: {msg}");
            assert!(matches!(e, GpuError::NoDriver | GpuError::NoDevice { .. } | GpuError::Driver(_)), "{msg}");
            assert!(msg.contains("CUDA"), "{msg}");
        }
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU and driver: run with --include-ignored on a GPU machine"]
fn rows_appended_in_place_answer_as_the_whole_page_uploaded() {
    let g = gpu();
    let mut rng = seeded();
    for (spec, codec) in [(gqa(32, 8, 128), Codec::Bf16), (gqa(32, 8, 128), Codec::Fp8E4m3), (mla(128), Codec::Bf16)] {
        let layout = PageLayout::new(&spec, codec, 16);
        let shape = AttnShape::new(&spec, layout);
        // 40 tokens: pages of 16, 16 and 8; the last page is written with 3 tokens and grown
        // one row at a time, then two at once (the staging grows past its first size).
        let s = seq(&shape, 40, 0, &mut rng);
        let mut slots = g.alloc_slots(&layout, 3).unwrap();
        let mut rows = g.row_staging(&layout, 1).unwrap();
        g.write_page(&mut slots, 0, &s.pages[0].0, 16).unwrap();
        g.write_page(&mut slots, 1, &s.pages[1].0, 16).unwrap();
        let last = &s.pages[2].0;
        let token = |t: usize| {
            let mut one = vec![0u8; layout.payload_bytes(1)];
            layout.slice_tokens(last, 8, t, 1, &mut one);
            one
        };
        let mut first = vec![0u8; layout.payload_bytes(3)];
        layout.slice_tokens(last, 8, 0, 3, &mut first);
        g.write_page(&mut slots, 2, &first, 3).unwrap();
        for t in 3..6 {
            g.append_rows(&mut slots, &[RowAppend { index: 2, at: t, rows: &token(t) }], &mut rows).unwrap();
        }
        let (t6, t7) = (token(6), token(7));
        let two = [RowAppend { index: 2, at: 6, rows: &t6 }, RowAppend { index: 2, at: 7, rows: &t7 }];
        g.append_rows(&mut slots, &two, &mut rows).unwrap();
        // A row for the wrong position is refused, and nothing of its batch is written.
        assert!(g.append_rows(&mut slots, &[RowAppend { index: 2, at: 5, rows: &token(5) }], &mut rows).is_err());
        let whole = g.upload_pages(&layout, &s.kv()).unwrap();
        let (a, b) = (slots.pages(), whole.pages());
        let grown = g.decode_batch(&shape, &[GpuItem { q: Query::F32(&s.q), pages: &a, skip: 0 }]).unwrap();
        let uploaded = g.decode_batch(&shape, &[GpuItem { q: Query::F32(&s.q), pages: &b, skip: 0 }]).unwrap();
        assert_eq!(a[2].tokens, 8);
        assert!(grown.out == uploaded.out && grown.lse == uploaded.lse, "{codec:?}: appended rows differ");
        eprintln!("rows appended in place, {} {:?}: same answer as the page uploaded whole", spec.name, codec);
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU and driver: run with --include-ignored on a GPU machine"]
fn gqa_every_codec_and_shape_matches_the_f64_reference() {
    let g = gpu();
    let mut rng = seeded();
    // Llama-3-8B, MHA, MQA (a group of 16: two head chunks), head dims 64 and 256; bf16 and fp8
    // pages of head dims a multiple of 16 up to 128 take the tensor-core kernel (also 96 and 48,
    // which only it takes), the rest the CUDA-core one. Run again with KVCACHE_GPU_GQA=simt to
    // check the CUDA-core kernel on every shape it takes.
    let shapes = [gqa(32, 8, 128), gqa(8, 8, 64), gqa(16, 1, 128), gqa(8, 4, 256), gqa(12, 4, 64)];
    let mma_only = [gqa(16, 2, 96), gqa(6, 2, 48)];
    let simt = std::env::var("KVCACHE_GPU_GQA").is_ok_and(|v| v == "simt");
    let runs = shapes.iter().flat_map(|s| Codec::ALL.into_iter().map(move |c| (s, c)));
    let extra = mma_only.iter().filter(|_| !simt).flat_map(|s| [(s, Codec::Bf16), (s, Codec::Fp8E4m3)]);
    for (spec, codec) in runs.chain(extra) {
        {
            for pt in [16, 64] {
                let shape = AttnShape::new(spec, PageLayout::new(spec, codec, pt));
                let seqs = vec![
                    seq(&shape, 1, 0, &mut rng),
                    seq(&shape, 17, 0, &mut rng),
                    seq(&shape, 300, 0, &mut rng),
                    seq(&shape, 5000, 0, &mut rng),
                    seq(&shape, 700, 650, &mut rng),
                    seq(&shape, 40, 40, &mut rng),
                ];
                let e = check_batch(&g, &shape, &seqs, 1e-5);
                eprintln!(
                    "gqa {}q/{}kv×{} {:<8} page {pt:>2}: worst rel L2 {e:.2e}",
                    spec.num_q_heads,
                    spec.num_kv_heads,
                    spec.head_dim,
                    codec.as_str()
                );
            }
        }
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU and driver: run with --include-ignored on a GPU machine"]
fn mla_on_tensor_cores_matches_the_f64_reference_within_bf16_rounding() {
    let g = gpu();
    let mut rng = seeded();
    // 128 heads (two head blocks) and 16 (one block, padded).
    for heads in [128, 16] {
        let spec = mla(heads);
        for codec in Codec::ALL {
            let shape = AttnShape::new(&spec, PageLayout::new(&spec, codec, 64));
            let seqs = vec![
                seq(&shape, 1, 0, &mut rng),
                seq(&shape, 33, 0, &mut rng),
                seq(&shape, 1000, 0, &mut rng),
                seq(&shape, 9000, 0, &mut rng),
                seq(&shape, 600, 500, &mut rng),
            ];
            // int8 latents are dequantized (value × a per-row f32 scale) to bf16 for the tensor
            // cores, which rounds them: that path's bound is looser, and stated here.
            let (tol, lse_tol) = if codec == Codec::Int8 { (1e-2, 2e-2) } else { (2e-3, 1e-4) };
            let e = check_batch_lse(&g, &shape, &seqs, tol, lse_tol);
            eprintln!(
                "mla {heads} heads {:<8}: worst rel L2 {e:.2e} (bound {tol:e}; bf16 queries, P rounded)",
                codec.as_str()
            );
        }
    }
    // Pages smaller than the kernels' token tiles (a tile spans several pages).
    for page_tokens in [16, 32] {
        for codec in [Codec::Bf16, Codec::Fp8E4m3] {
            let spec = mla(128);
            let shape = AttnShape::new(&spec, PageLayout::new(&spec, codec, page_tokens));
            let seqs: Vec<Seq> = [1usize, 47, 130, 3001].iter().map(|&n| seq(&shape, n, 0, &mut rng)).collect();
            let e = check_batch_lse(&g, &shape, &seqs, 2e-3, 1e-4);
            eprintln!("mla 128 heads {}, {page_tokens}-token pages: worst rel L2 {e:.2e}", codec.as_str());
        }
    }
    // fp8 latents of e4m3 subnormals only (codes 1..7 of either sign), every other row with a
    // tile scale past 2^7: both widened exactly as the others (a kernel that flushed the
    // subnormals would answer zeros; scales past 2^7 take the slower widening).
    let spec = mla(128);
    let shape = AttnShape::new(&spec, PageLayout::new(&spec, Codec::Fp8E4m3, 64));
    let row = shape.layout.row_bytes;
    let seqs: Vec<Seq> = [1usize, 130, 3001]
        .iter()
        .map(|&n| {
            let mut s = seq(&shape, n, 0, &mut rng);
            for (p, _) in &mut s.pages {
                for (i, r) in p.chunks_exact_mut(row).enumerate() {
                    for b in &mut r[..512] {
                        *b = rng.random_range(1u8..8) | if rng.random::<bool>() { 0x80 } else { 0 };
                    }
                    if i % 2 == 0 {
                        r[512..516].copy_from_slice(&1024f32.to_le_bytes());
                    }
                }
            }
            s
        })
        .collect();
    let e = check_batch_lse(&g, &shape, &seqs, 2e-3, 1e-4);
    eprintln!("mla 128 heads fp8, subnormal latents and large scales: worst rel L2 {e:.2e}");
    // A full-f32 query is rounded to bf16 for the tensor cores: the stated bound of that path.
    let spec = mla(128);
    let shape = AttnShape::new(&spec, PageLayout::new(&spec, Codec::Bf16, 64));
    let seqs: Vec<Seq> = [1usize, 1000, 9000]
        .iter()
        .map(|&n| {
            let s = seq(&shape, n, 0, &mut rng);
            f32_query(s, &mut rng)
        })
        .collect();
    let e = check_batch_lse(&g, &shape, &seqs, 1e-2, 3e-2);
    eprintln!("mla 128 heads bf16, f32 queries: worst rel L2 {e:.2e} (query rounded to bf16)");
}

/// A worker calls the device from whichever thread runs the step (its blocking pool starts new
/// ones): on a thread that never used the device, staged writes, appended rows and decodes
/// answer as on the thread that set the device up.
#[test]
#[ignore = "needs an NVIDIA GPU and driver: run with --include-ignored on a GPU machine"]
fn a_thread_new_to_the_device_gets_the_same_answers() {
    let g = gpu();
    let mut rng = seeded();
    let spec = gqa(32, 8, 128);
    let layout = PageLayout::new(&spec, Codec::Bf16, 16);
    let shape = AttnShape::new(&spec, layout);
    // 37 tokens: pages of 16, 16 and 5, the last grown by one row below.
    let s = seq(&shape, 37, 0, &mut rng);
    let whole = g.upload_pages(&layout, &s.kv()).unwrap();
    let refs = whole.pages();
    let item = GpuItem { q: Query::F32(&s.q), pages: &refs, skip: 0 };
    // This thread sets the batch buffers up.
    let want = g.decode_batch(&shape, &[item]).unwrap();
    std::thread::scope(|sc| {
        sc.spawn(|| {
            let got = g.decode_batch(&shape, &[item]).unwrap();
            assert!(got.out == want.out && got.lse == want.lse, "decode on a new thread differs");
        });
    });
    // The worker's path: pages written staged into slots, a row appended in place, the slots
    // decoded, each from a new thread.
    let mut slab = g.alloc_slots(&layout, 3).unwrap();
    let mut staging = g.staging(&layout, 2 * layout.page_bytes()).unwrap();
    let mut rows = g.row_staging(&layout, 1).unwrap();
    let (last, n) = (&s.pages[2].0, s.pages[2].1);
    let mut first = vec![0u8; layout.payload_bytes(n - 1)];
    layout.slice_tokens(last, n, 0, n - 1, &mut first);
    let mut token = vec![0u8; layout.payload_bytes(1)];
    layout.slice_tokens(last, n, n - 1, 1, &mut token);
    let writes = [
        PageWrite { index: 0, payload: &s.pages[0].0, tokens: 16 },
        PageWrite { index: 1, payload: &s.pages[1].0, tokens: 16 },
        PageWrite { index: 2, payload: &first, tokens: n - 1 },
    ];
    std::thread::scope(|sc| {
        sc.spawn(|| g.write_pages_staged(&mut slab, &writes, &mut staging, None).unwrap());
    });
    std::thread::scope(|sc| {
        sc.spawn(|| {
            let append = [RowAppend { index: 2, at: n - 1, rows: &token }];
            g.append_rows(&mut slab, &append, &mut rows).unwrap()
        });
    });
    let slots = [0usize, 1, 2];
    let got = std::thread::scope(|sc| {
        sc.spawn(|| {
            let seq = SlotSeq { q: Query::F32(&s.q), slots: &slots, skip: 0 };
            g.decode_slots_each(&shape, &slab, &[seq], false).unwrap()
        })
        .join()
        .expect("thread")
    });
    let (out, lse) = got.into_iter().next().expect("one").expect("answered");
    let got = out.to_f32();
    assert!(got == want.out && lse == want.lse, "the slots written from new threads answer differently");
}

#[test]
#[ignore = "needs an NVIDIA GPU and driver: run with --include-ignored on a GPU machine"]
fn long_contexts_split_over_blocks_and_merge_exactly() {
    let g = gpu();
    let mut rng = seeded();
    let spec = gqa(32, 8, 128);
    let shape = AttnShape::new(&spec, PageLayout::new(&spec, Codec::Bf16, 64));
    let seqs = vec![seq(&shape, 131_072, 0, &mut rng)];
    let e = check_batch(&g, &shape, &seqs, 1e-5);
    eprintln!("gqa 128K tokens: rel L2 {e:.2e}");
    let spec = mla(128);
    let shape = AttnShape::new(&spec, PageLayout::new(&spec, Codec::Bf16, 64));
    let seqs = vec![seq(&shape, 65_536, 0, &mut rng)];
    let e = check_batch(&g, &shape, &seqs, 2e-3);
    eprintln!("mla 64K tokens: rel L2 {e:.2e}");
}

#[test]
#[ignore = "needs an NVIDIA GPU and driver: run with --include-ignored on a GPU machine"]
fn nan_and_infinity_in_a_page_fail_only_their_sequence() {
    let g = gpu();
    let mut rng = seeded();
    for spec in [gqa(32, 8, 128), mla(128)] {
        for (codec, poison) in [(Codec::Bf16, 0x7fc0u16), (Codec::F16, 0x7c00u16)] {
            let shape = AttnShape::new(&spec, PageLayout::new(&spec, codec, 16));
            let mut seqs = [seq(&shape, 100, 0, &mut rng), seq(&shape, 100, 0, &mut rng), seq(&shape, 50, 0, &mut rng)];
            for v in seqs[1].pages[2].0.chunks_exact_mut(2) {
                v.copy_from_slice(&poison.to_le_bytes());
            }
            let uploads: Vec<_> = seqs.iter().map(|s| g.upload_pages(&shape.layout, &s.kv()).unwrap()).collect();
            let refs: Vec<Vec<DeviceRef>> = uploads.iter().map(|u| u.pages()).collect();
            let items: Vec<GpuItem> =
                seqs.iter().zip(&refs).map(|(s, r)| GpuItem { q: Query::F32(&s.q), pages: r, skip: 0 }).collect();
            let res = g.decode_batch(&shape, &items).unwrap();
            assert!(res.status[0].is_ok() && res.status[2].is_ok());
            assert_eq!(res.status[1], Err(AttentionError::NonFiniteResult), "{:?} {codec:?}", spec.attention);
        }
        // An fp8 NaN byte (0x7f) in a latent or K row.
        let shape = AttnShape::new(&spec, PageLayout::new(&spec, Codec::Fp8E4m3, 16));
        let mut s = seq(&shape, 40, 0, &mut rng);
        s.pages[1].0[3] = 0x7f;
        let up = g.upload_pages(&shape.layout, &s.kv()).unwrap();
        let r = up.pages();
        let res = g.decode_batch(&shape, &[GpuItem { q: Query::F32(&s.q), pages: &r, skip: 0 }]).unwrap();
        assert_eq!(res.status[0], Err(AttentionError::NonFiniteResult));
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU and driver: run with --include-ignored on a GPU machine"]
fn bad_requests_are_refused_before_anything_runs() {
    let g = gpu();
    let mut rng = seeded();
    let spec = gqa(32, 8, 128);
    let shape = AttnShape::new(&spec, PageLayout::new(&spec, Codec::Bf16, 16));
    let s = seq(&shape, 40, 0, &mut rng);
    let up = g.upload_pages(&shape.layout, &s.kv()).unwrap();
    let r = up.pages();
    let short = &s.q[..10];
    let e = g.plan(&shape, &[GpuItem { q: Query::F32(short), pages: &r, skip: 0 }]).err().unwrap();
    assert!(matches!(e, GpuError::Attention(AttentionError::QueryLength { .. })), "{e}");
    let mut nanq = s.q.clone();
    nanq[5] = f32::NAN;
    let e = g.plan(&shape, &[GpuItem { q: Query::F32(&nanq), pages: &r, skip: 0 }]).err().unwrap();
    assert!(matches!(e, GpuError::Attention(AttentionError::NonFiniteQuery)), "{e}");
    let e = g.plan(&shape, &[GpuItem { q: Query::F32(&s.q), pages: &r, skip: 41 }]).err().unwrap();
    assert!(e.to_string().contains("skips 41 of 40"), "{e}");
    // A partial page in the middle.
    let mid = [r[2], r[0]];
    let e = g.plan(&shape, &[GpuItem { q: Query::F32(&s.q), pages: &mid, skip: 0 }]).err().unwrap();
    assert!(e.to_string().contains("every page but the last"), "{e}");
    // Pages of another layout.
    let other = AttnShape::new(&spec, PageLayout::new(&spec, Codec::Fp8E4m3, 16));
    let e = g.plan(&other, &[GpuItem { q: Query::F32(&s.q), pages: &r, skip: 0 }]).err().unwrap();
    assert!(matches!(e, GpuError::Attention(AttentionError::PageLength { .. })), "{e}");
    // Head dims without a kernel say so (96 runs on the tensor cores for bf16 and fp8 pages only).
    let odd = gqa(8, 8, 96);
    let shape96 = AttnShape::new(&odd, PageLayout::new(&odd, Codec::Int8, 16));
    let e = g.plan(&shape96, &[]).err().unwrap();
    assert!(matches!(e, GpuError::Unsupported(_)), "{e}");
}
