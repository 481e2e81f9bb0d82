//! Decode by layer kind, beyond full attention over every token. (The indexer's scoring loop is
//! plain Rust compiled per ISA with `#[target_feature]`; calling it is this module's only
//! `unsafe`, after `Backend::detect` has checked the CPU.)
//!
//! - Sliding-window and chunked layers attend to a suffix of the cached tokens: the worker passes
//!   only the pages that hold them and [`crate::BatchItem::skip`] for a window that starts inside
//!   the first page; the kernel is the full-attention one.
//! - [`apply_sinks`]: gpt-oss's attention sinks, one learned logit per head that joins the
//!   softmax's denominator and contributes no value. Applied to the kernel's `(out, lse)` exactly,
//!   so every kernel and every split-K merge serves sink layers unchanged.
//! - DeepSeek Sparse Attention: [`encode_indexer_key`] stores a token's indexer key as fp8 with a
//!   scale per 128 values; [`indexer_scores`] scores every cached token for one query
//!   (`Σ_j w_j · relu(q_j · k)`, the lightning indexer); [`top_k`] keeps the best; [`gather_rows`]
//!   packs the chosen MLA rows into one compact payload the MLA kernel reads as a page.
//! - [`linear_step`]: one decode step of a gated-delta-rule layer (Gated DeltaNet, KDA) on its
//!   recurrent state, from the request's q, k, v, decay and beta (no model weights), and
//!   [`roll_conv_state`], which appends the step's conv input to the short-convolution state.

use crate::AttentionError;
use kvcache_core::codec::{f32_to_e4m3, fp8_lut, fp8_tile_scale};
use kvcache_core::spec::{IndexerSpec, LinearKind, LinearSpec};

/// Fold one sink logit per head into a softmax result: `lse' = ln(e^lse + e^sink)`,
/// `out' = out · e^(lse − lse')`. `out` is `[heads][v_width]`, `lse` and `sinks` are `[heads]`.
pub fn apply_sinks(sinks: &[f32], v_width: usize, out: &mut [f32], lse: &mut [f32]) -> Result<(), AttentionError> {
    if sinks.len() != lse.len() {
        return Err(AttentionError::Shape(format!("{} sink logits for {} heads", sinks.len(), lse.len())));
    }
    if sinks.iter().any(|s| !s.is_finite()) {
        return Err(AttentionError::Shape("sink logits must be finite".into()));
    }
    for (h, (&s, l)) in sinks.iter().zip(lse.iter_mut()).enumerate() {
        let old = *l as f64;
        let m = old.max(s as f64);
        let new = m + ((old - m).exp() + (s as f64 - m).exp()).ln();
        let f = (old - new).exp() as f32;
        for x in &mut out[h * v_width..(h + 1) * v_width] {
            *x *= f;
        }
        *l = new as f32;
    }
    Ok(())
}

/// Encode one token's indexer key `[head_dim]` as fp8-e4m3 values then an f32 scale per 128.
pub fn encode_indexer_key(spec: &IndexerSpec, key: &[f32], dst: &mut [u8]) {
    let d = spec.head_dim as usize;
    assert_eq!(key.len(), d);
    assert_eq!(dst.len(), spec.bytes_per_token());
    let (vals, scales) = dst.split_at_mut(d);
    for (b, (tile, sc)) in key.chunks(128).zip(scales.chunks_exact_mut(4)).enumerate() {
        let s = fp8_tile_scale(tile);
        sc.copy_from_slice(&s.to_le_bytes());
        for (i, x) in tile.iter().enumerate() {
            vals[b * 128 + i] = f32_to_e4m3(x / s);
        }
    }
}

/// Decode one stored indexer key into `out [head_dim]`.
pub fn decode_indexer_key(spec: &IndexerSpec, src: &[u8], out: &mut [f32]) {
    let d = spec.head_dim as usize;
    let (vals, scales) = src.split_at(d);
    let lut = fp8_lut();
    for (b, sc) in scales.chunks_exact(4).enumerate() {
        let s = f32::from_le_bytes(sc.try_into().expect("4 bytes"));
        for i in b * 128..((b + 1) * 128).min(d) {
            out[i] = lut[vals[i] as usize] * s;
        }
    }
}

/// The lightning indexer's score of every token whose key is in `keys` (`n · bytes_per_token`):
/// `Σ_j weights[j] · relu(q[j] · k)`, `q` `[num_heads][head_dim]`, `weights` `[num_heads]` (the
/// model's per-head weights for this query, softmax scale folded in, as DeepSeek computes them).
pub fn indexer_scores(
    spec: &IndexerSpec,
    q: &[f32],
    weights: &[f32],
    keys: &[u8],
    scores: &mut Vec<f32>,
) -> Result<(), AttentionError> {
    indexer_scores_threads(spec, q, weights, &[keys], scores, 1)
}

/// [`indexer_scores`] over keys held in several buffers (a layer's pages, in token order, read
/// where they are), on `threads` threads (split by pages).
pub fn indexer_scores_threads(
    spec: &IndexerSpec,
    q: &[f32],
    weights: &[f32],
    pages: &[&[u8]],
    scores: &mut Vec<f32>,
    threads: usize,
) -> Result<(), AttentionError> {
    let (h, d, b) = (spec.num_heads as usize, spec.head_dim as usize, spec.bytes_per_token());
    if q.len() != h * d {
        return Err(AttentionError::QueryLength { got: q.len(), expected: h * d, heads: h, width: d });
    }
    if weights.len() != h {
        return Err(AttentionError::Shape(format!("{} indexer weights for {h} heads", weights.len())));
    }
    if q.iter().chain(weights).any(|x| !x.is_finite()) {
        return Err(AttentionError::NonFiniteQuery);
    }
    if let Some(p) = pages.iter().find(|p| !p.len().is_multiple_of(b)) {
        return Err(AttentionError::Shape(format!("indexer keys of {} bytes are not whole {b}-byte keys", p.len())));
    }
    let total: usize = pages.iter().map(|p| p.len() / b).sum();
    scores.clear();
    scores.resize(total, 0.0);
    // Split over threads by whole pages of about equal tokens; each part runs the loop compiled
    // for the CPU's ISA.
    let threads = threads.clamp(1, 64).min(total.div_ceil(4096).max(1));
    let per = total.div_ceil(threads).max(1);
    let backend = crate::Backend::detect();
    let run = |keys: &[u8], out: &mut [f32]| match backend {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `detect` chose AVX-512, so the CPU has AVX-512F/VL, AVX2 and FMA.
        crate::Backend::Avx512 | crate::Backend::Avx512Bf16 => unsafe {
            score_keys_avx512(spec, q, weights, keys, out)
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `detect` chose AVX2, which it does only with FMA present.
        crate::Backend::Avx2 => unsafe { score_keys_avx2(spec, q, weights, keys, out) },
        _ => score_keys::<false>(spec, q, weights, keys, out),
    };
    let run_pages = |pages: &[&[u8]], mut out: &mut [f32]| {
        pages.iter().all(|p| {
            let (o, rest) = std::mem::take(&mut out).split_at_mut(p.len() / b);
            out = rest;
            run(p, o)
        })
    };
    let ok = if threads == 1 {
        run_pages(pages, scores)
    } else {
        // Groups of consecutive pages holding about `per` tokens each, and their score slices.
        let mut groups: Vec<(&[&[u8]], &mut [f32])> = Vec::with_capacity(threads);
        let (mut rest_pages, mut rest_out) = (pages, &mut scores[..]);
        while !rest_pages.is_empty() {
            let (mut n, mut t) = (0, 0);
            while n < rest_pages.len() && (t < per || n == 0) {
                t += rest_pages[n].len() / b;
                n += 1;
            }
            let (gp, rp) = rest_pages.split_at(n);
            let (go, ro) = std::mem::take(&mut rest_out).split_at_mut(t);
            groups.push((gp, go));
            (rest_pages, rest_out) = (rp, ro);
        }
        std::thread::scope(|s| {
            let parts: Vec<_> = groups.into_iter().map(|(p, o)| s.spawn(move || run_pages(p, o))).collect();
            parts.into_iter().all(|p| p.join().unwrap_or(false))
        })
    };
    if !ok {
        return Err(AttentionError::NonFiniteResult);
    }
    Ok(())
}

/// [`score_keys`] compiled for AVX-512 with fused multiply-adds.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
fn score_keys_avx512(spec: &IndexerSpec, q: &[f32], weights: &[f32], keys: &[u8], out: &mut [f32]) -> bool {
    score_keys::<true>(spec, q, weights, keys, out)
}

/// [`score_keys`] compiled for AVX2 with fused multiply-adds.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn score_keys_avx2(spec: &IndexerSpec, q: &[f32], weights: &[f32], keys: &[u8], out: &mut [f32]) -> bool {
    score_keys::<true>(spec, q, weights, keys, out)
}

/// The scoring loop of [`indexer_scores`] over whole keys; false when a score is not finite.
#[inline(always)]
fn score_keys<const FMA: bool>(spec: &IndexerSpec, q: &[f32], weights: &[f32], keys: &[u8], out: &mut [f32]) -> bool {
    let (d, b) = (spec.head_dim as usize, spec.bytes_per_token());
    let mut k = vec![0f32; d];
    for (key, o) in keys.chunks_exact(b).zip(out.iter_mut()) {
        decode_indexer_key(spec, key, &mut k);
        let mut s = 0f32;
        for (qh, w) in q.chunks_exact(d).zip(weights) {
            s += w * dot::<FMA>(qh, &k).max(0.0);
        }
        if !s.is_finite() {
            return false;
        }
        *o = s;
    }
    true
}

/// `a · b` over sixteen running sums (one AVX-512 or two AVX2 registers), with fused
/// multiply-adds when `FMA` (only inlined into the FMA-enabled `score_keys_*`: elsewhere
/// `mul_add` would be a library call).
#[inline(always)]
fn dot<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            acc[i] = if FMA { x[i].mul_add(y[i], acc[i]) } else { acc[i] + x[i] * y[i] };
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Indices of the `k` highest scores (all of them when there are ≤ `k`), ascending; ties keep
/// the earlier token.
pub fn top_k(scores: &[f32], k: usize) -> Vec<u32> {
    let mut idx: Vec<u32> = (0..scores.len() as u32).collect();
    if scores.len() > k {
        idx.select_nth_unstable_by(k, |&a, &b| scores[b as usize].total_cmp(&scores[a as usize]).then(a.cmp(&b)));
        idx.truncate(k);
    }
    idx.sort_unstable();
    idx
}

/// Copy the `[tokens][row]` rows at `indices` (token positions over `pages`, each `(payload,
/// tokens)` in order) into one compact MLA payload. Errors on an index past the last token.
pub fn gather_rows(pages: &[(&[u8], usize)], row_bytes: usize, indices: &[u32]) -> Result<Vec<u8>, AttentionError> {
    let total: usize = pages.iter().map(|p| p.1).sum();
    let mut out = Vec::with_capacity(indices.len() * row_bytes);
    let (mut page, mut first) = (0usize, 0usize);
    for &i in indices {
        let i = i as usize;
        if i >= total {
            return Err(AttentionError::Shape(format!("sparse index {i} out of range: {total} tokens cached")));
        }
        if i < first {
            (page, first) = (0, 0);
        }
        while i >= first + pages[page].1 {
            first += pages[page].1;
            page += 1;
        }
        let at = (i - first) * row_bytes;
        out.extend_from_slice(&pages[page].0[at..at + row_bytes]);
    }
    Ok(out)
}

/// One decode step's inputs of a gated-delta-rule layer, all f32.
#[derive(Debug, Clone, Copy)]
pub struct LinearInputs<'a> {
    /// Query `[num_k_heads][head_k_dim]`, L2-normalized as the model does before the kernel.
    pub q: &'a [f32],
    /// Key `[num_k_heads][head_k_dim]`, L2-normalized.
    pub k: &'a [f32],
    /// Value `[num_v_heads][head_v_dim]`.
    pub v: &'a [f32],
    /// Log decay (≤ 0): `[num_v_heads]` for Gated DeltaNet, `[num_v_heads][head_k_dim]` for KDA.
    pub g: &'a [f32],
    /// Write strength in [0, 1] per value head.
    pub beta: &'a [f32],
}

/// Check a step's input lengths against `spec`; the error names the field.
pub fn check_linear(spec: &LinearSpec, x: &LinearInputs) -> Result<(), String> {
    let (hk, hv, dk, dv) =
        (spec.num_k_heads as usize, spec.num_v_heads as usize, spec.head_k_dim as usize, spec.head_v_dim as usize);
    let g = if spec.kind == LinearKind::Kda { hv * dk } else { hv };
    for (name, got, want) in [
        ("q", x.q.len(), hk * dk),
        ("k", x.k.len(), hk * dk),
        ("v", x.v.len(), hv * dv),
        ("g", x.g.len(), g),
        ("beta", x.beta.len(), hv),
    ] {
        if got != want {
            return Err(format!("{name} has {got} values, expected {want}"));
        }
    }
    for (name, xs) in [("q", x.q), ("k", x.k), ("v", x.v), ("g", x.g), ("beta", x.beta)] {
        if xs.iter().any(|v| !v.is_finite()) {
            return Err(format!("{name} holds a NaN or infinite value"));
        }
    }
    if x.g.iter().any(|v| *v > 0.0) {
        return Err("g is a log decay and must be ≤ 0".into());
    }
    Ok(())
}

/// One decode step of a gated-delta-rule layer on `state` (`[num_v_heads][head_k_dim][head_v_dim]`
/// f32), in place, writing `out [num_v_heads][head_v_dim]`:
///
/// `S ← diag(e^g) S;  S ← S + k (β (v − Sᵀk))ᵀ;  o = scale · Sᵀq`
///
/// with the key head `h / (num_v_heads / num_k_heads)` serving value head `h` (Qwen3-Next's
/// grouping). Gated DeltaNet decays the whole head by one gate, KDA each key channel by its own.
pub fn linear_step(
    spec: &LinearSpec,
    state: &mut [f32],
    x: &LinearInputs,
    scale: f32,
    out: &mut [f32],
) -> Result<(), AttentionError> {
    check_linear(spec, x).map_err(AttentionError::Shape)?;
    let (hk, hv, dk, dv) =
        (spec.num_k_heads as usize, spec.num_v_heads as usize, spec.head_k_dim as usize, spec.head_v_dim as usize);
    if state.len() != hv * dk * dv || out.len() != hv * dv {
        return Err(AttentionError::Shape(format!(
            "state of {} and output of {} values, expected {} and {}",
            state.len(),
            out.len(),
            hv * dk * dv,
            hv * dv
        )));
    }
    let group = hv / hk;
    let mut kv = vec![0f32; dv];
    for h in 0..hv {
        let kh = h / group;
        let q = &x.q[kh * dk..(kh + 1) * dk];
        let k = &x.k[kh * dk..(kh + 1) * dk];
        let v = &x.v[h * dv..(h + 1) * dv];
        let s = &mut state[h * dk * dv..(h + 1) * dk * dv];
        // Decay, then what the state already returns for k.
        kv.fill(0.0);
        for (i, row) in s.chunks_exact_mut(dv).enumerate() {
            let decay = match spec.kind {
                LinearKind::GatedDeltaNet => x.g[h],
                LinearKind::Kda => x.g[h * dk + i],
            }
            .exp();
            for (r, a) in row.iter_mut().zip(kv.iter_mut()) {
                *r *= decay;
                *a += *r * k[i];
            }
        }
        let beta = x.beta[h];
        for (a, vj) in kv.iter_mut().zip(v) {
            *a = beta * (vj - *a);
        }
        let o = &mut out[h * dv..(h + 1) * dv];
        o.fill(0.0);
        for (i, row) in s.chunks_exact_mut(dv).enumerate() {
            for ((r, u), oj) in row.iter_mut().zip(&kv).zip(o.iter_mut()) {
                *r += k[i] * u;
                *oj += *r * q[i];
            }
        }
        for oj in o.iter_mut() {
            *oj *= scale;
        }
    }
    if out.iter().chain(state.iter()).any(|v| !v.is_finite()) {
        return Err(AttentionError::NonFiniteResult);
    }
    Ok(())
}

/// Append one step's conv input `x [conv_dim]` to a conv state `[conv_dim][width]` of bf16 values
/// (little-endian bytes), dropping each channel's oldest value.
pub fn roll_conv_state(conv: &mut [u8], width: usize, x: &[f32]) -> Result<(), AttentionError> {
    if width == 0 {
        return Ok(());
    }
    if conv.len() != x.len() * width * 2 {
        return Err(AttentionError::Shape(format!(
            "conv input of {} channels for a conv state of {} bytes",
            x.len(),
            conv.len()
        )));
    }
    for (ch, v) in conv.chunks_exact_mut(width * 2).zip(x) {
        ch.copy_within(2.., 0);
        let n = ch.len();
        ch[n - 2..].copy_from_slice(&half::bf16::from_f32(*v).to_le_bytes());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_keeps_the_best_in_token_order() {
        assert_eq!(top_k(&[0.1, 5.0, -1.0, 3.0, 5.0], 3), vec![1, 3, 4]);
        assert_eq!(top_k(&[1.0, 2.0], 8), vec![0, 1]);
        assert_eq!(top_k(&[2.0, 2.0, 2.0], 2), vec![0, 1]);
    }

    #[test]
    fn gather_rows_walks_pages_and_refuses_an_index_past_the_end() {
        let a: Vec<u8> = (0..8).collect();
        let b: Vec<u8> = (100..104).collect();
        let pages = [(&a[..], 4), (&b[..], 2)];
        assert_eq!(gather_rows(&pages, 2, &[0, 3, 5]).unwrap(), vec![0, 1, 6, 7, 102, 103]);
        assert!(gather_rows(&pages, 2, &[6]).unwrap_err().to_string().contains("sparse index 6 out of range"));
    }

    #[test]
    fn roll_conv_state_shifts_each_channel() {
        let mut conv = vec![0u8; 2 * 3 * 2];
        roll_conv_state(&mut conv, 3, &[1.0, 2.0]).unwrap();
        roll_conv_state(&mut conv, 3, &[3.0, 4.0]).unwrap();
        let vals: Vec<f32> = conv.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect();
        assert_eq!(vals, vec![0.0, 1.0, 3.0, 0.0, 2.0, 4.0]);
        assert!(roll_conv_state(&mut conv, 3, &[1.0]).is_err());
    }
}
