//! The decode kernel: online softmax over page slices (every KV group's scores, then every
//! group's P·V, so a page is read in address order), written once over [`Isa`] and instantiated
//! per backend; split-K and batching over threads; the LSE merge.

use crate::simd::{Isa, Portable};
use crate::{AttentionError, AttnShape, Backend, KvPage, Options};
use kvcache_core::Codec;
use kvcache_core::codec::FP8_TILE;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Tokens decoded into scratch and scored at a time.
const BT: usize = 32;
/// Row padding: every scratch row is a multiple of 16 f32, so no ISA needs a tail loop.
const PAD: usize = 16;

fn pad(w: usize) -> usize {
    w.div_ceil(PAD) * PAD
}

/// Per-call working memory: the running state of every KV group (its heads' prepared queries,
/// accumulators, running maxima and sums) and one block's scratch. Every group's state lives
/// at once because the kernel walks the range page by page, every group within a page
/// ([`attend_range`]).
struct Scratch {
    /// `[kv_groups][group][wk]`: each head's query times the scale (permuted where the bf16
    /// rows are read in pairs).
    q: Vec<f32>,
    /// `[kv_groups][group][wk]`: the query as bf16, unscaled (the `vdpbf16ps` score path,
    /// taken only when every query value is a bf16 value).
    qb: Vec<u16>,
    k: Vec<f32>,
    /// MLA: the widened rows of `k` as bf16, where they are bf16 values (`vdpbf16ps` scores).
    kb: Vec<u16>,
    v: Vec<f32>,
    s: Vec<f32>,
    /// `[kv_groups][group][wv]`.
    acc: Vec<f32>,
    /// `[q_heads]`.
    m: Vec<f32>,
    l: Vec<f32>,
    /// One block for the even/odd permutations.
    tmp: Vec<f32>,
    /// The stride of `s`: `[q_heads][sw]` scores of one slice.
    sw: usize,
}

impl Scratch {
    /// Scratch for `shape` with score rows of `sw` (a multiple of [`PAD`]).
    fn new(shape: &AttnShape, sw: usize) -> Self {
        let n = shape.kv_groups * shape.group();
        let (wk, wv) = (pad(shape.qk_width), pad(shape.v_width));
        Self {
            q: vec![0.0; n * wk],
            qb: vec![0; n * wk],
            k: vec![0.0; BT * wk],
            kb: if shape.latent { vec![0; BT * wk] } else { Vec::new() },
            v: if shape.latent { Vec::new() } else { vec![0.0; BT * wv] },
            s: vec![0.0; n * sw],
            acc: vec![0.0; n * wv],
            m: vec![f32::NEG_INFINITY; n],
            l: vec![0.0; n],
            tmp: Vec::with_capacity(32),
            sw,
        }
    }
}

/// The token range `[t0, t1)` of a sequence whose pages start at `starts[i]`.
struct Range<'a> {
    pages: &'a [KvPage<'a>],
    starts: &'a [usize],
    t0: usize,
    t1: usize,
}

/// Tokens of one page a GQA slice covers at most (longer pages are walked in slices of this).
const SPAN: usize = 256;

/// The slices of a range in the order the kernel computes them: page by page, up to `span`
/// tokens of a page at a time. For each slice the kernel scores every KV group's K rows, then
/// runs every group's P·V over its V rows: a page's planes are laid out group after group, K
/// planes then V planes, so a whole-page slice reads the page in address order, one stream the
/// hardware prefetchers follow. (Group by group over all pages, the kernel jumped to the next
/// page every 16 KiB of a plane: a plain sum in that order read 11 GB/s on AMD Zen 4, in
/// address order 23-29; docs/BENCHMARKS.md.)
#[derive(Clone)]
struct Slices<'r, 'a> {
    range: &'r Range<'a>,
    span: usize,
    pi: usize,
    /// The next slice's first token (absolute), or `None` at the start of a page.
    t: Option<usize>,
}

/// Page `pi`, tokens `[t, t + n)` (absolute).
#[derive(Clone, Copy)]
struct Slice {
    pi: usize,
    t: usize,
    n: usize,
}

impl<'r, 'a> Slices<'r, 'a> {
    fn new(range: &'r Range<'a>, span: usize) -> Self {
        Self { range, span, pi: 0, t: None }
    }
}

impl Iterator for Slices<'_, '_> {
    type Item = Slice;
    fn next(&mut self) -> Option<Slice> {
        let r = self.range;
        while self.pi < r.pages.len() {
            let start = r.starts[self.pi];
            let (a, b) = (r.t0.max(start), r.t1.min(start + r.pages[self.pi].tokens));
            let t = self.t.unwrap_or(a);
            if t < b {
                let n = (b - t).min(self.span);
                self.t = Some(t + n);
                return Some(Slice { pi: self.pi, t, n });
            }
            (self.pi, self.t) = (self.pi + 1, None);
        }
        None
    }
}

/// Rows per chunk of the score loop ([`dot_block`]).
const TOKEN_CHUNK: usize = 8;

/// How many slices ahead the kernel prefetches K/V rows (≥ 1).
const PREFETCH_SLICES: usize = 1;

/// Decode `count` rows of `plane` starting at token `t` of `page` into `dst` (row stride `stride`).
#[inline(always)]
unsafe fn decode_rows<I: Isa>(
    shape: &AttnShape,
    page: &KvPage,
    plane: usize,
    t: usize,
    count: usize,
    dst: &mut [f32],
    stride: usize,
) {
    let l = &shape.layout;
    let w = l.shape.width;
    for r in 0..count {
        let src = &page.payload[l.row_range(page.tokens, plane, t + r)];
        let d = &mut dst[r * stride..r * stride + w];
        match l.codec {
            Codec::Bf16 | Codec::F16 => {
                let mut i = 0;
                while i + I::LANES <= w {
                    // SAFETY: `src` holds 2·w bytes and `d` w f32 (slices above); i + LANES ≤ w.
                    unsafe {
                        if l.codec == Codec::Bf16 {
                            I::widen_bf16(src.as_ptr().add(2 * i), d.as_mut_ptr().add(i));
                        } else {
                            I::widen_f16(src.as_ptr().add(2 * i), d.as_mut_ptr().add(i));
                        }
                    }
                    i += I::LANES;
                }
                for j in i..w {
                    let b = u16::from_le_bytes([src[2 * j], src[2 * j + 1]]);
                    d[j] = if l.codec == Codec::Bf16 {
                        f32::from_bits((b as u32) << 16)
                    } else {
                        half::f16::from_bits(b).to_f32()
                    };
                }
            }
            Codec::Fp8E4m3 | Codec::Int8 => {
                // [main quantized bytes][f32 scale per tile (fp8) or one (int8)][tail bf16].
                let main = l.shape.main();
                let fp8 = l.codec == Codec::Fp8E4m3;
                let tile = if fp8 { FP8_TILE } else { main.max(1) };
                let scales = main.div_ceil(tile);
                let scale =
                    |t: usize| f32::from_le_bytes(src[main + 4 * t..main + 4 * t + 4].try_into().expect("4 bytes"));
                let lut = kvcache_core::codec::fp8_lut();
                for t in 0..scales {
                    let (start, end) = (t * tile, ((t + 1) * tile).min(main));
                    let s = scale(t);
                    let mut i = start;
                    while i + I::LANES <= end {
                        // SAFETY: `src` holds `main` quantized bytes and `d` w ≥ main f32; i + LANES ≤ main.
                        unsafe {
                            if fp8 {
                                I::widen_fp8(src.as_ptr().add(i), d.as_mut_ptr().add(i), s);
                            } else {
                                I::widen_i8(src.as_ptr().add(i), d.as_mut_ptr().add(i), s);
                            }
                        }
                        i += I::LANES;
                    }
                    for j in i..end {
                        d[j] = if fp8 { lut[src[j] as usize] * s } else { (src[j] as i8) as f32 * s };
                    }
                }
                let tail = &src[main + 4 * scales..];
                let mut j = 0;
                while j + I::LANES <= w - main {
                    // SAFETY: `tail` holds 2·(w − main) bytes, `d` w f32; j + LANES ≤ w − main.
                    unsafe { I::widen_bf16(tail.as_ptr().add(2 * j), d.as_mut_ptr().add(main + j)) };
                    j += I::LANES;
                }
                for k in j..w - main {
                    d[main + k] = f32::from_bits((u16::from_le_bytes([tail[2 * k], tail[2 * k + 1]]) as u32) << 16);
                }
            }
        }
    }
}

/// Prefetch the rows `[t, t + count)` of `plane` (contiguous in the payload).
#[inline(always)]
fn prefetch_rows<I: Isa>(shape: &AttnShape, page: &KvPage, plane: usize, t: usize, count: usize) {
    if count == 0 {
        return;
    }
    let l = &shape.layout;
    let start = l.row_range(page.tokens, plane, t).start;
    let end = l.row_range(page.tokens, plane, t + count - 1).end;
    let bytes = &page.payload[start..end];
    let mut o = 0;
    while o < bytes.len() {
        // SAFETY: `o` is inside `bytes`; a prefetch never faults.
        unsafe { I::prefetch(bytes.as_ptr().add(o)) };
        o += 64;
    }
}

/// Where a tile reads K/V rows from: the f32 scratch, or (GQA bf16 and fp8 pages whose rows are
/// whole vectors) straight from the page payload, widened in registers — no scratch pass.
trait Rows: Copy {
    /// Whether [`Rows::at2`] is cheaper than two [`Rows::at`] (callers then step columns by
    /// `2·LANES`).
    const PAIRED: bool = false;
    /// The vector at row `r`, column `c` (a multiple of LANES).
    unsafe fn at<I: Isa>(self, r: usize, c: usize) -> I::V;
    /// The vectors at columns `c` and `c + LANES` of row `r` (`c` a multiple of `2·LANES`).
    #[inline(always)]
    unsafe fn at2<I: Isa>(self, r: usize, c: usize) -> (I::V, I::V) {
        // SAFETY: forwarded from the caller.
        unsafe { (self.at::<I>(r, c), self.at::<I>(r, c + I::LANES)) }
    }
}

#[derive(Clone, Copy)]
struct F32Rows(*const f32, usize);

impl Rows for F32Rows {
    #[inline(always)]
    unsafe fn at<I: Isa>(self, r: usize, c: usize) -> I::V {
        // SAFETY: callers stay inside the scratch rows they were given.
        unsafe { I::load(self.0.add(r * self.1 + c)) }
    }
}

#[derive(Clone, Copy)]
struct Bf16Rows(*const u8, usize);

impl Rows for Bf16Rows {
    #[inline(always)]
    unsafe fn at<I: Isa>(self, r: usize, c: usize) -> I::V {
        // SAFETY: callers stay inside the payload rows they were given (row stride in bytes).
        unsafe { I::load_bf16(self.0.add(r * self.1 + 2 * c)) }
    }
}

/// bf16 rows read in the even/odd order: within each block of `2·LANES` columns, vector 0 holds
/// the even-indexed elements and vector 1 the odd ones — one load and one shift or mask per
/// vector. The query is permuted the same way before the score tiles (so dot products are
/// unchanged) and the P·V accumulators are un-permuted at the end.
#[derive(Clone, Copy)]
struct Bf16PairRows(*const u8, usize);

impl Rows for Bf16PairRows {
    const PAIRED: bool = true;
    #[inline(always)]
    unsafe fn at<I: Isa>(self, r: usize, c: usize) -> I::V {
        // SAFETY: as for `at2`, on the block holding column c.
        unsafe {
            let (e, o) = self.at2::<I>(r, c & !(2 * I::LANES - 1));
            if c & I::LANES == 0 { e } else { o }
        }
    }
    #[inline(always)]
    unsafe fn at2<I: Isa>(self, r: usize, c: usize) -> (I::V, I::V) {
        // SAFETY: callers stay inside the payload rows they were given; the row width is a
        // multiple of 2·LANES, so the block's 4·LANES bytes are inside the row.
        unsafe { I::load_bf16_pair(self.0.add(r * self.1 + 2 * c)) }
    }
}

/// Permute each `2·LANES` block of `x` into the [`Bf16PairRows`] order (evens, then odds), or
/// back (`to_pairs` false).
fn permute_pairs(x: &mut [f32], lanes: usize, to_pairs: bool, tmp: &mut Vec<f32>) {
    for blk in x.chunks_exact_mut(2 * lanes) {
        tmp.clear();
        tmp.extend_from_slice(blk);
        for i in 0..lanes {
            for (half, src) in [(0, 2 * i), (lanes, 2 * i + 1)] {
                if to_pairs {
                    blk[half + i] = tmp[src];
                } else {
                    blk[src] = tmp[half + i];
                }
            }
        }
    }
}

/// fp8 rows without a bf16 tail: `(first row, row stride in bytes, quantized bytes per row)`;
/// each row's f32 tile scales follow its quantized bytes.
#[derive(Clone, Copy)]
struct Fp8Rows(*const u8, usize, usize);

impl Rows for Fp8Rows {
    #[inline(always)]
    unsafe fn at<I: Isa>(self, r: usize, c: usize) -> I::V {
        // SAFETY: callers stay inside the payload rows they were given; `c` < main, so its
        // tile's scale lies within the row.
        unsafe {
            let row = self.0.add(r * self.1);
            let scale = (row.add(self.2 + 4 * (c / FP8_TILE)) as *const f32).read_unaligned();
            I::mul(I::load_fp8(row.add(c)), I::splat(scale))
        }
    }
}

/// `s[h][t] = Σ acc[h][t]` (rows of `sw`): one shuffle tree for a 4×4 tile, else one reduction
/// per accumulator.
#[inline(always)]
unsafe fn store_sums<I: Isa, const NH: usize, const NT: usize>(acc: &[[I::V; NT]; NH], s: *mut f32, sw: usize) {
    // SAFETY: callers pass s with NH rows of sw f32 and NT ≤ sw.
    unsafe {
        if NH * NT == 16 {
            let flat: [I::V; 16] = std::array::from_fn(|j| acc[j / NT][j % NT]);
            let mut sums = [0f32; 16];
            I::sum16(&flat, &mut sums);
            for (j, v) in sums.iter().enumerate() {
                *s.add((j / NT) * sw + j % NT) = *v;
            }
            return;
        }
        for (h, ah) in acc.iter().enumerate() {
            for (t, a) in ah.iter().enumerate() {
                *s.add(h * sw + t) = I::sum(*a);
            }
        }
    }
}

/// Unscaled scores of `NH` heads × `NT` bf16 rows with the hardware pair dot product: `qb`
/// holds the heads' queries as bf16 rows (stride `wq` elements), `k` the bf16 rows (stride
/// `row_bytes`); `w` a multiple of 2·LANES. bf16 × bf16 products are exact in f32, so with a
/// query that is bf16 to begin with only the f32 sums round, as on the f32 path.
#[inline(always)]
unsafe fn dot_tile_dp<I: Isa, const NH: usize, const NT: usize>(
    qb: *const u16,
    wq: usize,
    k: Bf16Rows,
    t0: usize,
    w: usize,
    s: *mut f32,
    sw: usize,
) {
    // SAFETY: callers pass qb with NH rows of ≥ w bf16, rows t0..t0+NT of k with ≥ w bf16 each,
    // s with NH rows of sw f32; i + 2·LANES ≤ w throughout; I::DPBF16 holds.
    unsafe {
        let mut acc = [[I::zero(); NT]; NH];
        let mut i = 0;
        while i < w {
            let mut kv = [I::zero(); NT];
            for (t, kt) in kv.iter_mut().enumerate() {
                *kt = I::load_raw(k.0.add((t0 + t) * k.1 + 2 * i));
            }
            for (h, ah) in acc.iter_mut().enumerate() {
                let qh = I::load_raw(qb.add(h * wq + i) as *const u8);
                for t in 0..NT {
                    ah[t] = I::dp_bf16(ah[t], qh, kv[t]);
                }
            }
            i += 2 * I::LANES;
        }
        store_sums::<I, NH, NT>(&acc, s, sw);
    }
}

/// [`dot_block`] with [`dot_tile_dp`]: `g` heads × `bt` rows, unscaled, in the same order (rows
/// in chunks of [`TOKEN_CHUNK`], every head tile over a chunk: MLA's chunk of 8 raw rows, 9 KiB,
/// stays in L1 across its 128 heads); `pf` as there.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn dot_block_dp<I: Isa>(
    qb: &[u16],
    wq: usize,
    k: Bf16Rows,
    g: usize,
    bt: usize,
    w: usize,
    s: &mut [f32],
    sw: usize,
    pf: impl Fn(usize, usize),
) {
    let (q, s) = (qb.as_ptr(), s.as_mut_ptr());
    // SAFETY: qb holds g rows of wq, k holds ≥ bt rows, s is g×sw; every tile stays inside them.
    unsafe {
        let mut t0 = 0;
        while t0 < bt {
            let t1 = (t0 + TOKEN_CHUNK).min(bt);
            let mut h = 0;
            while h < g {
                let nh = if h + 4 <= g { 4 } else { 1 };
                let (qq, ss) = (q.add(h * wq), s.add(h * sw));
                let mut t = t0;
                while t < t1 {
                    let nt = if t + 4 <= t1 { 4 } else { 1 };
                    if h == 0 {
                        pf(t, nt);
                    }
                    match (nh, nt) {
                        (4, 4) => dot_tile_dp::<I, 4, 4>(qq, wq, k, t, w, ss.add(t), sw),
                        (4, _) => dot_tile_dp::<I, 4, 1>(qq, wq, k, t, w, ss.add(t), sw),
                        (_, 4) => dot_tile_dp::<I, 1, 4>(qq, wq, k, t, w, ss.add(t), sw),
                        _ => dot_tile_dp::<I, 1, 1>(qq, wq, k, t, w, ss.add(t), sw),
                    }
                    t += nt;
                }
                h += nh;
            }
            t0 = t1;
        }
    }
}

/// Scores of `NH` heads × `NT` tokens: `s[h][t] = q[h] · k[t0 + t]` over `w` (a multiple of
/// LANES).
#[inline(always)]
unsafe fn dot_tile<I: Isa, R: Rows, const NH: usize, const NT: usize>(
    q: *const f32,
    k: R,
    t0: usize,
    w: usize,
    s: *mut f32,
    sw: usize,
) {
    // SAFETY: callers pass q with NH rows of `w` f32, rows t0..t0+NT of k, and s with NH rows
    // of sw f32; i + LANES ≤ w throughout.
    unsafe {
        let mut acc = [[I::zero(); NT]; NH];
        let mut i = 0;
        while R::PAIRED && i + 2 * I::LANES <= w {
            let mut k0 = [I::zero(); NT];
            let mut k1 = [I::zero(); NT];
            for t in 0..NT {
                (k0[t], k1[t]) = k.at2::<I>(t0 + t, i);
            }
            for (h, ah) in acc.iter_mut().enumerate() {
                let q0 = I::load(q.add(h * w + i));
                let q1 = I::load(q.add(h * w + i + I::LANES));
                for t in 0..NT {
                    ah[t] = I::fma(q1, k1[t], I::fma(q0, k0[t], ah[t]));
                }
            }
            i += 2 * I::LANES;
        }
        while i < w {
            let mut kv = [I::zero(); NT];
            for (t, kt) in kv.iter_mut().enumerate() {
                *kt = k.at::<I>(t0 + t, i);
            }
            for (h, ah) in acc.iter_mut().enumerate() {
                let qv = I::load(q.add(h * w + i));
                for t in 0..NT {
                    ah[t] = I::fma(qv, kv[t], ah[t]);
                }
            }
            i += I::LANES;
        }
        store_sums::<I, NH, NT>(&acc, s, sw);
    }
}

/// Scores of `g` heads × `bt` rows into `s` (rows of `sw`). `pf(t, n)` runs before the first
/// tile of rows `t..t+n`: the caller spreads its prefetches of the next block over the tiles, so
/// they overlap the compute instead of stalling in one burst.
///
/// Rows go in chunks of [`TOKEN_CHUNK`], every head tile over one chunk before the next: with
/// MLA's 128 heads the chunk's rows (8 × 576 f32 = 18 KiB) stay in L1 while the query rows
/// stream from L2 once per chunk, instead of every K row streaming from L2 once per head tile.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn dot_block<I: Isa, R: Rows>(
    q: &[f32],
    k: R,
    g: usize,
    bt: usize,
    w: usize,
    s: &mut [f32],
    sw: usize,
    pf: impl Fn(usize, usize),
) {
    let (q, s) = (q.as_ptr(), s.as_mut_ptr());
    // SAFETY: q is g×w, k holds ≥ bt rows, s is g×sw (Scratch); every tile stays inside them.
    unsafe {
        let mut t0 = 0;
        while t0 < bt {
            let t1 = (t0 + TOKEN_CHUNK).min(bt);
            let mut h = 0;
            while h < g {
                let nh = if I::WIDE && h + 4 <= g {
                    4
                } else if h + 2 <= g {
                    2
                } else {
                    1
                };
                let (qq, ss) = (q.add(h * w), s.add(h * sw));
                let mut t = t0;
                while t + 4 <= t1 {
                    if h == 0 {
                        pf(t, 4);
                    }
                    match nh {
                        4 => dot_tile::<I, R, 4, 4>(qq, k, t, w, ss.add(t), sw),
                        2 => dot_tile::<I, R, 2, 4>(qq, k, t, w, ss.add(t), sw),
                        _ => dot_tile::<I, R, 1, 4>(qq, k, t, w, ss.add(t), sw),
                    }
                    t += 4;
                }
                while t < t1 {
                    if h == 0 {
                        pf(t, 1);
                    }
                    match nh {
                        4 => dot_tile::<I, R, 4, 1>(qq, k, t, w, ss.add(t), sw),
                        2 => dot_tile::<I, R, 2, 1>(qq, k, t, w, ss.add(t), sw),
                        _ => dot_tile::<I, R, 1, 1>(qq, k, t, w, ss.add(t), sw),
                    }
                    t += 1;
                }
                h += nh;
            }
            t0 = t1;
        }
    }
}

/// `acc[h][c..c+NC·LANES] += Σ_t p[h][t] · v[t][c..]` for `NH` heads.
#[inline(always)]
unsafe fn pv_tile<I: Isa, R: Rows, const NH: usize, const NC: usize>(
    p: *const f32,
    v: R,
    c: usize,
    bt: usize,
    acc: *mut f32,
    wa: usize,
    sw: usize,
) {
    // SAFETY: callers pass p with NH rows of sw, v with bt rows covering columns c.., acc with
    // NH rows of stride wa covering the columns.
    unsafe {
        let mut a = [[I::zero(); NC]; NH];
        for (h, ah) in a.iter_mut().enumerate() {
            for (j, x) in ah.iter_mut().enumerate() {
                *x = I::load(acc.add(h * wa + j * I::LANES));
            }
        }
        for t in 0..bt {
            let mut vv = [I::zero(); NC];
            if R::PAIRED && NC.is_multiple_of(2) && c.is_multiple_of(2 * I::LANES) {
                for j in (0..NC).step_by(2) {
                    (vv[j], vv[j + 1]) = v.at2::<I>(t, c + j * I::LANES);
                }
            } else {
                for (j, x) in vv.iter_mut().enumerate() {
                    *x = v.at::<I>(t, c + j * I::LANES);
                }
            }
            for (h, ah) in a.iter_mut().enumerate() {
                let ph = I::splat(*p.add(h * sw + t));
                for j in 0..NC {
                    ah[j] = I::fma(ph, vv[j], ah[j]);
                }
            }
        }
        for (h, ah) in a.iter().enumerate() {
            for (j, x) in ah.iter().enumerate() {
                I::store(acc.add(h * wa + j * I::LANES), *x);
            }
        }
    }
}

/// `acc[h] += Σ_t p[h][t] · v[t]` for `g` heads over `bt` rows. `pf(t, n)` runs before each
/// column stripe, for its share of the rows: prefetches spread over P·V as over the scores.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn pv_block<I: Isa, R: Rows>(
    p: &[f32],
    sw: usize,
    v: R,
    g: usize,
    bt: usize,
    acc: &mut [f32],
    wa: usize,
    pf: impl Fn(usize, usize),
) {
    let (p, acc) = (p.as_ptr(), acc.as_mut_ptr());
    // SAFETY: p is g×sw, v holds bt rows at least wa wide, acc is g×wa; wa is a multiple of
    // LANES, and every tile covers columns < wa.
    unsafe {
        // Column stripes outermost, every head tile over one stripe before the next: the
        // stripe of the block's V rows (32 × 64 f32 = 8 KiB) stays in L1 across MLA's 128 heads.
        let stripe = 4 * I::LANES;
        let stripes = wa.div_ceil(stripe);
        let mut c0 = 0;
        while c0 < wa {
            let c1 = (c0 + stripe).min(wa);
            let i = c0 / stripe;
            let (r0, r1) = (i * bt / stripes, (i + 1) * bt / stripes);
            pf(r0, r1 - r0);
            let mut h = 0;
            while h < g {
                let nh = (g - h).min(4);
                let mut c = c0;
                while c < c1 {
                    let (pp, aa) = (p.add(h * sw), acc.add(h * wa + c));
                    if I::WIDE && nh == 4 && c + 4 * I::LANES <= c1 {
                        pv_tile::<I, R, 4, 4>(pp, v, c, bt, aa, wa, sw);
                        c += 4 * I::LANES;
                        continue;
                    }
                    let two = c + 2 * I::LANES <= c1;
                    match (nh, two) {
                        (4, true) => pv_tile::<I, R, 4, 2>(pp, v, c, bt, aa, wa, sw),
                        (4, false) => pv_tile::<I, R, 4, 1>(pp, v, c, bt, aa, wa, sw),
                        (_, true) => {
                            for i in 0..nh {
                                pv_tile::<I, R, 1, 2>(pp.add(i * sw), v, c, bt, aa.add(i * wa), wa, sw);
                            }
                        }
                        (_, false) => {
                            for i in 0..nh {
                                pv_tile::<I, R, 1, 1>(pp.add(i * sw), v, c, bt, aa.add(i * wa), wa, sw);
                            }
                        }
                    }
                    c += if two { 2 * I::LANES } else { I::LANES };
                }
                h += nh;
            }
            c0 = c1;
        }
    }
}

/// `src` as bf16 into `dst` when every value is a bf16 value (low 16 bits zero; the copy is then
/// exact), else `false`.
#[inline(always)]
fn pack_bf16(src: &[f32], dst: &mut [u16]) -> bool {
    let mut low = 0u32;
    for (d, x) in dst.iter_mut().zip(src) {
        let b = x.to_bits();
        low |= b & 0xffff;
        *d = (b >> 16) as u16;
    }
    low == 0
}

/// How a shape's blocks are read: decided once per range from the shape and the ISA.
#[derive(Clone, Copy)]
struct Mode {
    /// GQA bf16 rows that are whole vectors are read straight from the payload: each K/V row is
    /// used by only the group's few heads, so a scratch pass costs more than widening in
    /// registers. MLA rows are used by every head (up to 128): widening them once into scratch
    /// is cheaper there.
    direct: bool,
    /// The same for fp8 GQA rows (no bf16 tail): each vector widens in registers and takes its
    /// tile's scale — bit for bit the values `decode_rows` would have written.
    direct8: bool,
    /// With AVX-512 BF16 and a query whose every value is a bf16 value (an engine's bf16 query
    /// always is), bf16 rows' scores (GQA's and MLA's latent rows) come from `vdpbf16ps`
    /// straight from the payload against the unscaled query: bf16 ×
    /// bf16 products are exact in f32, so only the sums round, as on the f32 path, at half the
    /// instructions of f32 FMAs (pairs of 32 elements per instruction: the width must hold whole
    /// pairs of vectors). The scale multiplies the scores instead. Any other query takes the
    /// f32 path (splitting it into two bf16 parts costs as many instructions as the FMAs).
    dp: bool,
    /// The query allows `vdpbf16ps` scores (bf16 values, AVX-512 BF16, whole pairs of vectors):
    /// MLA rows of other codecs then take them too wherever the widened rows are bf16 values —
    /// fp8 rows always are (e4m3 times a power-of-two tile scale), checked per slice.
    dp_q: bool,
    /// With 32 registers (the 4×4 score tile holds both halves of a pair) and rows of whole
    /// pairs of vectors, bf16 K rows are read in the even/odd order (`Bf16PairRows`), the query
    /// permuted to match (not on the `dp` path).
    pair_k: bool,
    /// The same for V rows (on the `dp` path too): the accumulators come out permuted.
    pair_v: bool,
}

impl Mode {
    fn new<I: Isa>(shape: &AttnShape, q: &[f32]) -> Self {
        let bf16_rows = shape.layout.codec == Codec::Bf16 && shape.layout.shape.width.is_multiple_of(PAD);
        let direct = !shape.latent && bf16_rows;
        let direct8 = !shape.latent
            && shape.layout.codec == Codec::Fp8E4m3
            && shape.layout.shape.tail == 0
            && shape.layout.shape.width.is_multiple_of(PAD);
        let dp_q = I::DPBF16 && shape.qk_width.is_multiple_of(2 * I::LANES) && is_bf16_query(q);
        let dp = dp_q && bf16_rows;
        let pair_k = I::WIDE && direct && !dp && shape.qk_width.is_multiple_of(2 * I::LANES);
        let pair_v = I::WIDE && direct && shape.v_width.is_multiple_of(2 * I::LANES);
        Self { direct, direct8, dp, dp_q, pair_k, pair_v }
    }
}

/// Every head's query into the scratch state, scaled (and permuted or split as `mode` reads
/// the rows); accumulators, maxima and sums reset.
fn prepare<I: Isa>(shape: &AttnShape, mode: Mode, q: &[f32], sc: &mut Scratch) {
    let n = shape.kv_groups * shape.group();
    let (wk, w) = (pad(shape.qk_width), shape.qk_width);
    for h in 0..n {
        for (d, s) in sc.q[h * wk..h * wk + w].iter_mut().zip(&q[h * w..(h + 1) * w]) {
            *d = s * shape.scale;
        }
        if mode.pair_k {
            permute_pairs(&mut sc.q[h * wk..h * wk + w], I::LANES, true, &mut sc.tmp);
        }
        if mode.dp_q {
            // Exact: every value is a bf16 value (Mode::new).
            for (d, s) in sc.qb[h * wk..h * wk + w].iter_mut().zip(&q[h * w..(h + 1) * w]) {
                *d = (s.to_bits() >> 16) as u16;
            }
        }
    }
    sc.acc.fill(0.0);
    sc.m.fill(f32::NEG_INFINITY);
    sc.l.fill(0.0);
}

/// One slice of the range: every group's scores over the slice's rows, the online-softmax
/// update of every head, every group's P·V. `next` is the slice [`PREFETCH_SLICES`] ahead,
/// whose rows are prefetched while this one computes.
#[inline(always)]
unsafe fn attend_slice<I: Isa>(
    shape: &AttnShape,
    mode: Mode,
    range: &Range,
    sl: Slice,
    next: Option<Slice>,
    sc: &mut Scratch,
) {
    let g = shape.group();
    let (wk, wv, sw) = (pad(shape.qk_width), pad(shape.v_width), sc.sw);
    let Mode { direct, direct8, dp, dp_q, pair_k, pair_v } = mode;
    let planes = |grp: usize| if shape.latent { (0, 0) } else { (grp, shape.kv_groups + grp) };
    let (page, off, n) = (&range.pages[sl.pi], sl.t - range.starts[sl.pi], sl.n);
    let l = &shape.layout;
    // Rows read straight from the payload go in one pass over the slice; rows widened into
    // the scratch first go BT at a time.
    let sub = if direct || direct8 || dp { n } else { BT };
    // Rows r..r+n (relative to this slice) of the next slice's K plane (`v` false) or V plane
    // of group `grp`: the kernel is otherwise idle on memory during compute. Into L2
    // (`Isa::prefetch`), a few rows per tile (bursts stall on the fill buffers).
    let pf = |grp: usize, v: bool, r: usize, cnt: usize| {
        if let Some(nx) = next
            && r < nx.n
            && !(v && shape.latent)
        {
            let (kp, vp) = planes(grp);
            let np = &range.pages[nx.pi];
            let lo = nx.t - range.starts[nx.pi] + r;
            prefetch_rows::<I>(shape, np, if v { vp } else { kp }, lo, cnt.min(nx.n - r));
        }
    };
    // SAFETY (this slice): scratch buffers are sized by Scratch::new for this shape and
    // `sc.sw ≥ n`; the slice lies inside its page; the ISA is available (checked by the
    // dispatcher).
    unsafe {
        let row = |plane: usize, t: usize| page.payload.as_ptr().add(l.row_range(page.tokens, plane, off + t).start);
        // Whether this slice's scores came from `vdpbf16ps` (unscaled).
        let mut unscaled = dp;
        for grp in 0..shape.kv_groups {
            let (k_plane, _) = planes(grp);
            let (q, qb) = (&sc.q[grp * g * wk..(grp + 1) * g * wk], &sc.qb[grp * g * wk..(grp + 1) * g * wk]);
            let mut t = 0;
            while t < n {
                let bt = sub.min(n - t);
                let s = &mut sc.s[grp * g * sw + t..];
                let pf_k = |r: usize, c: usize| pf(grp, false, t + r, c);
                let k = Bf16Rows(row(k_plane, t), l.row_bytes);
                if dp {
                    dot_block_dp::<I>(qb, wk, k, g, bt, shape.qk_width, s, sw, pf_k);
                } else if direct8 {
                    dot_block::<I, _>(q, Fp8Rows(k.0, l.row_bytes, l.shape.main()), g, bt, wk, s, sw, pf_k);
                } else if pair_k {
                    dot_block::<I, _>(q, Bf16PairRows(k.0, k.1), g, bt, wk, s, sw, pf_k);
                } else if direct {
                    dot_block::<I, _>(q, k, g, bt, wk, s, sw, pf_k);
                } else {
                    decode_rows::<I>(shape, page, k_plane, off + t, bt, &mut sc.k, wk);
                    // MLA (one group, one sub-block per slice): widened rows that are all bf16
                    // values are scored with `vdpbf16ps` from a bf16 copy.
                    if dp_q && shape.latent && pack_bf16(&sc.k[..bt * wk], &mut sc.kb) {
                        let kb = Bf16Rows(sc.kb.as_ptr() as *const u8, 2 * wk);
                        dot_block_dp::<I>(qb, wk, kb, g, bt, shape.qk_width, s, sw, pf_k);
                        unscaled = true;
                    } else {
                        dot_block::<I, _>(q, F32Rows(sc.k.as_ptr(), wk), g, bt, wk, s, sw, pf_k);
                    }
                }
                t += bt;
            }
        }
        // The `dp` scores are unscaled (the scale is positive: scaling commutes with the max).
        let ss = if unscaled { shape.scale } else { 1.0 };
        for h in 0..shape.kv_groups * g {
            let row = &mut sc.s[h * sw..h * sw + sw];
            // Whole vectors (every slice but a range's last): max and sum in vector lanes, not
            // as long dependent scalar chains, which cost as much as a GQA group's score tiles.
            let whole = n.is_multiple_of(I::LANES);
            let bm = if whole {
                let mut mv = I::load(row.as_ptr());
                let mut j = I::LANES;
                while j < n {
                    mv = I::max(mv, I::load(row.as_ptr().add(j)));
                    j += I::LANES;
                }
                I::hmax(mv)
            } else {
                row[..n].iter().copied().fold(f32::NEG_INFINITY, f32::max)
            } * ss;
            let (m, lh) = (&mut sc.m[h], &mut sc.l[h]);
            let m_new = m.max(bm);
            let corr = (*m - m_new).exp();
            let (nmn, ssv) = (I::splat(-m_new), I::splat(ss));
            let mut sv = I::zero();
            let mut j = 0;
            while j < n {
                let x = I::load(row.as_ptr().add(j));
                let e = I::exp(I::fma(x, ssv, nmn));
                I::store(row.as_mut_ptr().add(j), e);
                sv = I::add(sv, e);
                j += I::LANES;
            }
            let sum: f32 = if whole { I::sum(sv) } else { row[..n].iter().sum() };
            *lh = *lh * corr + sum;
            *m = m_new;
            if corr != 1.0 {
                let cv = I::splat(corr);
                let acc = &mut sc.acc[h * wv..(h + 1) * wv];
                let mut c = 0;
                while c < wv {
                    let p = acc.as_mut_ptr().add(c);
                    I::store(p, I::mul(I::load(p), cv));
                    c += I::LANES;
                }
            }
        }
        for grp in 0..shape.kv_groups {
            let (k_plane, v_plane) = planes(grp);
            let mut t = 0;
            while t < n {
                let bt = sub.min(n - t);
                let p = &sc.s[grp * g * sw + t..];
                let acc = &mut sc.acc[grp * g * wv..(grp + 1) * g * wv];
                let pf_v = |r: usize, c: usize| pf(grp, true, t + r, c);
                let v = Bf16Rows(row(v_plane, t), l.row_bytes);
                if pair_v {
                    pv_block::<I, _>(p, sw, Bf16PairRows(v.0, v.1), g, bt, acc, wv, pf_v);
                } else if direct {
                    pv_block::<I, _>(p, sw, v, g, bt, acc, wv, pf_v);
                } else if direct8 {
                    pv_block::<I, _>(p, sw, Fp8Rows(v.0, l.row_bytes, l.shape.main()), g, bt, acc, wv, pf_v);
                } else if shape.latent {
                    // The latent rows widened for the scores (or, after the `vdpbf16ps` scores,
                    // widened now): slices of latent rows are at most BT long.
                    if dp {
                        decode_rows::<I>(shape, page, k_plane, off + t, bt, &mut sc.k, wk);
                    }
                    pv_block::<I, _>(p, sw, F32Rows(sc.k.as_ptr(), wk), g, bt, acc, wv, pf_v);
                } else {
                    decode_rows::<I>(shape, page, v_plane, off + t, bt, &mut sc.v, wv);
                    pv_block::<I, _>(p, sw, F32Rows(sc.v.as_ptr(), wv), g, bt, acc, wv, pf_v);
                }
                t += bt;
            }
        }
    }
}

/// Every head's output row and LSE from the scratch state.
fn finish<I: Isa>(shape: &AttnShape, mode: Mode, sc: &mut Scratch, out: &mut [f32], lse: &mut [f32]) {
    let wv = pad(shape.v_width);
    for h in 0..shape.kv_groups * shape.group() {
        let acc = &mut sc.acc[h * wv..h * wv + shape.v_width];
        if mode.pair_v {
            permute_pairs(acc, I::LANES, false, &mut sc.tmp);
        }
        let o = &mut out[h * shape.v_width..(h + 1) * shape.v_width];
        let l = sc.l[h];
        if l > 0.0 {
            let inv = 1.0 / l;
            for (d, a) in o.iter_mut().zip(acc.iter()) {
                *d = a * inv;
            }
            lse[h] = sc.m[h] + l.ln();
        } else {
            o.fill(0.0);
            lse[h] = f32::NEG_INFINITY;
        }
    }
}

/// Attention of every head over one token range: writes `out` (`[q_heads][v_width]`) and `lse`.
/// The range goes in [`Slices`] order (page by page, every group within a slice), each head
/// keeping its own online-softmax state.
#[inline(always)]
unsafe fn attend_range<I: Isa>(shape: &AttnShape, q: &[f32], range: &Range, out: &mut [f32], lse: &mut [f32]) {
    // The scratch row padding must hold whole vectors of every ISA.
    const { assert!(PAD.is_multiple_of(16)) };
    let mode = Mode::new::<I>(shape, q);
    // MLA's latent rows are widened into the scratch once for every head (BT rows at a time);
    // GQA slices cover whole pages up to SPAN tokens.
    let span = if shape.latent { BT } else { SPAN.min(range.pages.iter().map(|p| p.tokens).max().unwrap_or(1)) };
    let mut sc = Scratch::new(shape, pad(span));
    prepare::<I>(shape, mode, q, &mut sc);
    let mut ahead = Slices::new(range, span);
    for _ in 0..PREFETCH_SLICES {
        ahead.next();
    }
    for sl in Slices::new(range, span) {
        // SAFETY: forwarded from the caller (ISA available); slices lie inside their pages.
        unsafe { attend_slice::<I>(shape, mode, range, sl, ahead.next(), &mut sc) };
    }
    finish::<I>(shape, mode, &mut sc, out, lse);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn range_avx512(shape: &AttnShape, q: &[f32], range: &Range, out: &mut [f32], lse: &mut [f32]) {
    // SAFETY: this function only runs where Backend::available found avx512f.
    unsafe { attend_range::<crate::simd::Avx512>(shape, q, range, out, lse) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn range_avx512bf16(shape: &AttnShape, q: &[f32], range: &Range, out: &mut [f32], lse: &mut [f32]) {
    // SAFETY: this function only runs where Backend::available found avx512f and avx512bf16.
    unsafe { attend_range::<crate::simd::Avx512Bf16>(shape, q, range, out, lse) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn range_avx2(shape: &AttnShape, q: &[f32], range: &Range, out: &mut [f32], lse: &mut [f32]) {
    // SAFETY: this function only runs where Backend::available found avx2, fma and f16c.
    unsafe { attend_range::<crate::simd::Avx2>(shape, q, range, out, lse) }
}

fn run_range(backend: Backend, shape: &AttnShape, q: &[f32], range: &Range, out: &mut [f32], lse: &mut [f32]) {
    assert!(Backend::available().contains(&backend), "backend {backend} not available on this CPU");
    match backend {
        // SAFETY: availability asserted above.
        #[cfg(target_arch = "x86_64")]
        Backend::Avx512 => unsafe { range_avx512(shape, q, range, out, lse) },
        // SAFETY: availability asserted above.
        #[cfg(target_arch = "x86_64")]
        Backend::Avx512Bf16 => unsafe { range_avx512bf16(shape, q, range, out, lse) },
        // SAFETY: availability asserted above.
        #[cfg(target_arch = "x86_64")]
        Backend::Avx2 => unsafe { range_avx2(shape, q, range, out, lse) },
        // SAFETY: the portable ISA runs anywhere.
        _ => unsafe { attend_range::<Portable>(shape, q, range, out, lse) },
    }
}

/// Whether every value of `q` is a bf16 value (its low 16 bits zero), as a query computed in
/// bf16 and widened is: the AVX-512 BF16 backend then scores bf16 GQA rows with `vdpbf16ps`.
pub fn is_bf16_query(q: &[f32]) -> bool {
    q.iter().all(|x| x.to_bits() & 0xffff == 0)
}

/// One sequence of a batch.
#[derive(Debug, Clone, Copy)]
pub struct BatchItem<'a> {
    /// Query `[q_heads][qk_width]`.
    pub q: &'a [f32],
    /// Pages in order; all but the last must be full.
    pub pages: &'a [KvPage<'a>],
    /// Tokens at the start of the pages the query does not attend to: a sliding window or a
    /// chunk that begins inside the first page (0 for full attention).
    pub skip: usize,
}

impl<'a> BatchItem<'a> {
    /// A query over every token of `pages`.
    pub fn new(q: &'a [f32], pages: &'a [KvPage<'a>]) -> Self {
        Self { q, pages, skip: 0 }
    }
}

/// A query of `shape`'s length with finite values (every backend checks this first).
pub(crate) fn check_query(shape: &AttnShape, q: &[f32]) -> Result<(), AttentionError> {
    if q.len() != shape.q_len() {
        return Err(AttentionError::QueryLength {
            got: q.len(),
            expected: shape.q_len(),
            heads: shape.q_heads,
            width: shape.qk_width,
        });
    }
    if kvcache_core::codec::first_non_finite_f32(q).is_some() {
        return Err(AttentionError::NonFiniteQuery);
    }
    Ok(())
}

fn check(shape: &AttnShape, item: &BatchItem) -> Result<Vec<usize>, AttentionError> {
    if shape.kv_groups == 0 || !shape.q_heads.is_multiple_of(shape.kv_groups) {
        return Err(AttentionError::Shape(format!("{} query heads over {} KV groups", shape.q_heads, shape.kv_groups)));
    }
    if shape.layout.shape.width != shape.qk_width || shape.v_width > shape.qk_width && shape.latent {
        return Err(AttentionError::Shape("layout row width does not match the query width".into()));
    }
    check_query(shape, item.q)?;
    let mut starts = Vec::with_capacity(item.pages.len());
    let mut t = 0;
    for (index, p) in item.pages.iter().enumerate() {
        let expected = shape.layout.payload_bytes(p.tokens);
        if p.payload.len() != expected {
            return Err(AttentionError::PageLength { index, got: p.payload.len(), expected, tokens: p.tokens });
        }
        starts.push(t);
        t += p.tokens;
    }
    if item.skip > t {
        return Err(AttentionError::Shape(format!("window skips {} of {t} tokens", item.skip)));
    }
    Ok(starts)
}

/// Decode attention of one sequence: `out` is `[q_heads][v_width]`, `lse` is `[q_heads]`.
pub fn decode(
    shape: &AttnShape,
    q: &[f32],
    pages: &[KvPage],
    opts: &Options,
    out: &mut [f32],
    lse: &mut [f32],
) -> Result<(), AttentionError> {
    let item = BatchItem::new(q, pages);
    let mut outs = [(out, lse)];
    decode_batch(shape, &[item], opts, &mut outs)
}

/// Decode attention of a batch of sequences of different lengths, split-K over `opts.threads`.
/// `outs[i]` receives item `i`'s output and LSE. The first item that fails is the error; use
/// [`decode_batch_each`] to keep the others' answers.
pub fn decode_batch(
    shape: &AttnShape,
    items: &[BatchItem],
    opts: &Options,
    outs: &mut [(&mut [f32], &mut [f32])],
) -> Result<(), AttentionError> {
    decode_batch_each(shape, items, opts, outs).into_iter().collect()
}

/// [`decode_batch`] with one answer per item: an item whose query, pages or result is refused
/// (a page holding NaN or infinity yields `NonFiniteResult`) does not stop the others. An item
/// that fails leaves its output slot zeroed and its LSE at −∞. A batch whose shape or output
/// slots are wrong fails every item with the same error.
pub fn decode_batch_each(
    shape: &AttnShape,
    items: &[BatchItem],
    opts: &Options,
    outs: &mut [(&mut [f32], &mut [f32])],
) -> Vec<Result<(), AttentionError>> {
    if outs.len() != items.len() {
        let e = AttentionError::Shape(format!("{} items but {} output slots", items.len(), outs.len()));
        return vec![Err(e); items.len()];
    }
    let mut results: Vec<Result<(), AttentionError>> = Vec::with_capacity(items.len());
    let mut starts = Vec::with_capacity(items.len());
    for (item, (o, l)) in items.iter().zip(outs.iter()) {
        let r = check(shape, item).and_then(|s| {
            if o.len() != shape.out_len() {
                return Err(AttentionError::OutputLength { got: o.len(), expected: shape.out_len() });
            }
            if l.len() != shape.q_heads {
                return Err(AttentionError::OutputLength { got: l.len(), expected: shape.q_heads });
            }
            Ok(s)
        });
        match r {
            Ok(s) => {
                starts.push(s);
                results.push(Ok(()));
            }
            Err(e) => {
                starts.push(Vec::new());
                results.push(Err(e));
            }
        }
    }
    // Tasks: (item, t0, t1). Long sequences are split so every thread has work; refused items
    // get none.
    let threads = opts.threads.max(1);
    let mut tasks = Vec::new();
    for (i, item) in items.iter().enumerate() {
        if results[i].is_err() {
            continue;
        }
        let total: usize = item.pages.iter().map(|p| p.tokens).sum();
        let span = total - item.skip;
        let splits = if threads > 1 { (span / opts.min_split_tokens.max(1)).clamp(1, threads) } else { 1 };
        let per = span.div_ceil(splits).max(1);
        let mut t0 = item.skip;
        loop {
            let t1 = (t0 + per).min(total);
            tasks.push((i, t0, t1));
            t0 = t1;
            if t0 >= total {
                break;
            }
        }
    }
    let (ho, hl) = (shape.out_len(), shape.q_heads);
    let mut part_out = vec![0f32; tasks.len() * ho];
    let mut part_lse = vec![0f32; tasks.len() * hl];
    let run = |ti: usize, o: &mut [f32], l: &mut [f32]| {
        let (i, t0, t1) = tasks[ti];
        let range = Range { pages: items[i].pages, starts: &starts[i], t0, t1 };
        run_range(opts.backend, shape, items[i].q, &range, o, l);
    };
    if threads == 1 || tasks.len() <= 1 {
        for (ti, (o, l)) in part_out.chunks_mut(ho).zip(part_lse.chunks_mut(hl)).enumerate() {
            run(ti, o, l);
        }
    } else {
        let next = AtomicUsize::new(0);
        let slots: Vec<std::sync::Mutex<(&mut [f32], &mut [f32])>> =
            part_out.chunks_mut(ho).zip(part_lse.chunks_mut(hl)).map(std::sync::Mutex::new).collect();
        let work = || {
            loop {
                let ti = next.fetch_add(1, Ordering::Relaxed);
                if ti >= tasks.len() {
                    break;
                }
                let mut g = slots[ti].lock().expect("slot");
                let (o, l) = &mut *g;
                run(ti, o, l);
            }
        };
        // The calling thread is one of the workers: one thread fewer to start per call.
        std::thread::scope(|s| {
            for _ in 1..threads.min(tasks.len()) {
                s.spawn(work);
            }
            work();
        });
    }
    // Merge each item's partials; check what came out.
    let mut ti = 0;
    for (i, (o, l)) in outs.iter_mut().enumerate() {
        if results[i].is_err() {
            o.fill(0.0);
            l.fill(f32::NEG_INFINITY);
            continue;
        }
        let first = ti;
        while ti < tasks.len() && tasks[ti].0 == i {
            ti += 1;
        }
        let parts: Vec<(&[f32], &[f32])> =
            (first..ti).map(|t| (&part_out[t * ho..(t + 1) * ho], &part_lse[t * hl..(t + 1) * hl])).collect();
        // Finite scores over at least one token give a finite LSE: −∞ there means the scores
        // were NaN (the running max skips NaN, leaving nothing). Checked per partial, so a NaN
        // page in one split cannot vanish into the merge of the others.
        let part_bad = (first..ti).any(|t| {
            let (_, t0, t1) = tasks[t];
            t1 > t0 && part_lse[t * hl..(t + 1) * hl].iter().any(|x| !x.is_finite())
        });
        merge(&parts, shape.v_width, o, l);
        if part_bad || o.iter().any(|x| !x.is_finite()) || l.iter().any(|x| x.is_nan() || *x == f32::INFINITY) {
            o.fill(0.0);
            l.fill(f32::NEG_INFINITY);
            results[i] = Err(AttentionError::NonFiniteResult);
        }
    }
    results
}

/// Merge partial results `(out, lse)` of disjoint token ranges into the result over their union:
/// `lse = ln Σ e^{lse_i}`, `out = Σ e^{lse_i − lse} · out_i`. Exact up to f32 rounding,
/// associative and order-independent; a partial over no tokens (`lse = −∞`) contributes nothing.
pub fn merge(parts: &[(&[f32], &[f32])], v_width: usize, out: &mut [f32], lse: &mut [f32]) {
    let heads = lse.len();
    for h in 0..heads {
        let m = parts.iter().map(|p| p.1[h]).fold(f32::NEG_INFINITY, f32::max);
        let o = &mut out[h * v_width..(h + 1) * v_width];
        o.fill(0.0);
        if m == f32::NEG_INFINITY {
            lse[h] = f32::NEG_INFINITY;
            continue;
        }
        let mut total = 0f64;
        let weights: Vec<f64> = parts.iter().map(|p| ((p.1[h] - m) as f64).exp()).collect();
        for w in &weights {
            total += w;
        }
        for (p, w) in parts.iter().zip(&weights) {
            if *w == 0.0 {
                continue;
            }
            let f = (w / total) as f32;
            for (d, s) in o.iter_mut().zip(&p.0[h * v_width..(h + 1) * v_width]) {
                *d += f * s;
            }
        }
        lse[h] = m + total.ln() as f32;
    }
}
