//! The float64 reference: plain, obviously right, and slow. Every kernel is tested against it on
//! the same decoded inputs.

use crate::hybrid::LinearInputs;
use crate::{AttnShape, KvPage};
use kvcache_core::spec::{IndexerSpec, LinearKind, LinearSpec};

/// Attention in float64 over the pages' decoded values: returns (`out [q_heads][v_width]`,
/// `lse [q_heads]`).
pub fn attention(shape: &AttnShape, q: &[f32], pages: &[KvPage]) -> (Vec<f64>, Vec<f64>) {
    attention_window(shape, q, pages, 0, None)
}

/// [`attention`] over the tokens after the first `skip` (a window or chunk), with one sink
/// logit per head in the softmax's denominator when `sinks` is given.
pub fn attention_window(
    shape: &AttnShape,
    q: &[f32],
    pages: &[KvPage],
    skip: usize,
    sinks: Option<&[f32]>,
) -> (Vec<f64>, Vec<f64>) {
    let l = &shape.layout;
    let w = l.shape.width;
    // rows[plane] = all tokens of that plane, in order.
    let mut rows: Vec<Vec<Vec<f32>>> = vec![Vec::new(); l.planes];
    for p in pages {
        let vals = l.decode(p.payload, p.tokens);
        for (plane, plane_rows) in rows.iter_mut().enumerate() {
            for t in 0..p.tokens {
                let s = (plane * p.tokens + t) * w;
                plane_rows.push(vals[s..s + w].to_vec());
            }
        }
    }
    let g = shape.group();
    let mut out = vec![0f64; shape.out_len()];
    let mut lse = vec![f64::NEG_INFINITY; shape.q_heads];
    for h in 0..shape.q_heads {
        let grp = h / g;
        let (kp, vp) = if shape.latent { (0, 0) } else { (grp, shape.kv_groups + grp) };
        let qh = &q[h * shape.qk_width..(h + 1) * shape.qk_width];
        let scores: Vec<f64> = rows[kp]
            .iter()
            .skip(skip)
            .map(|k| shape.scale as f64 * qh.iter().zip(k).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>())
            .collect();
        if scores.is_empty() {
            continue;
        }
        let sink = sinks.map(|s| s[h] as f64);
        let m = scores.iter().copied().chain(sink).fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = scores.iter().copied().chain(sink).map(|s| (s - m).exp()).sum();
        lse[h] = m + z.ln();
        for (s, v) in scores.iter().zip(&rows[vp][skip..]) {
            let p = (s - m).exp() / z;
            for (d, x) in out[h * shape.v_width..(h + 1) * shape.v_width].iter_mut().zip(v) {
                *d += p * *x as f64;
            }
        }
    }
    (out, lse)
}

/// Relative L2 error of `got` against `want`.
pub fn rel_l2(got: &[f32], want: &[f64]) -> f64 {
    let num: f64 = got.iter().zip(want).map(|(g, w)| (*g as f64 - w).powi(2)).sum();
    let den: f64 = want.iter().map(|w| w * w).sum();
    if den == 0.0 { num.sqrt() } else { (num / den).sqrt() }
}

/// The lightning indexer's scores in float64 over decoded keys `[n][head_dim]`.
pub fn indexer_scores(spec: &IndexerSpec, q: &[f32], weights: &[f32], keys: &[Vec<f32>]) -> Vec<f64> {
    let d = spec.head_dim as usize;
    keys.iter()
        .map(|k| {
            q.chunks_exact(d)
                .zip(weights)
                .map(|(qh, w)| *w as f64 * qh.iter().zip(k).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>().max(0.0))
                .sum()
        })
        .collect()
}

/// One gated-delta-rule step in float64 on a copy of `state`: returns (new state, output).
pub fn linear_step(spec: &LinearSpec, state: &[f32], x: &LinearInputs, scale: f32) -> (Vec<f64>, Vec<f64>) {
    let (hk, hv, dk, dv) =
        (spec.num_k_heads as usize, spec.num_v_heads as usize, spec.head_k_dim as usize, spec.head_v_dim as usize);
    let mut s: Vec<f64> = state.iter().map(|v| *v as f64).collect();
    let mut out = vec![0f64; hv * dv];
    for h in 0..hv {
        let kh = h / (hv / hk);
        let at = |i: usize, j: usize| h * dk * dv + i * dv + j;
        for i in 0..dk {
            let g = match spec.kind {
                LinearKind::GatedDeltaNet => x.g[h],
                LinearKind::Kda => x.g[h * dk + i],
            } as f64;
            for j in 0..dv {
                s[at(i, j)] *= g.exp();
            }
        }
        for j in 0..dv {
            let kv: f64 = (0..dk).map(|i| s[at(i, j)] * x.k[kh * dk + i] as f64).sum();
            let u = x.beta[h] as f64 * (x.v[h * dv + j] as f64 - kv);
            for i in 0..dk {
                s[at(i, j)] += x.k[kh * dk + i] as f64 * u;
            }
            out[h * dv + j] = scale as f64 * (0..dk).map(|i| s[at(i, j)] * x.q[kh * dk + i] as f64).sum::<f64>();
        }
    }
    (s, out)
}
