//! The float64 reference: plain, obviously right, and slow. Every kernel is tested against it on
//! the same decoded inputs.

use crate::{AttnShape, KvPage};

/// Attention in float64 over the pages' decoded values: returns (`out [q_heads][v_width]`,
/// `lse [q_heads]`).
pub fn attention(shape: &AttnShape, q: &[f32], pages: &[KvPage]) -> (Vec<f64>, Vec<f64>) {
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
            .map(|k| shape.scale as f64 * qh.iter().zip(k).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>())
            .collect();
        if scores.is_empty() {
            continue;
        }
        let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = scores.iter().map(|s| (s - m).exp()).sum();
        lse[h] = m + z.ln();
        for (s, v) in scores.iter().zip(&rows[vp]) {
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
