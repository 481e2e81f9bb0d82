//! Hardware baselines for the attention benchmark, measured in the same run as the kernels:
//! the multiply-add peak of each candidate instruction (register-resident loops, no memory
//! traffic) and streaming read bandwidth.

use std::time::Instant;

/// One measured peak.
#[derive(Debug, Clone)]
pub struct Peak {
    /// Instruction ("f32-fma-512", "bf16-dot-512", ...).
    pub name: &'static str,
    /// FLOP/s on one thread (a multiply-add counts 2).
    pub flops_per_s: f64,
}

/// Every multiply-add peak this CPU offers, one thread each.
pub fn compute_peaks() -> Vec<Peak> {
    let mut v = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: avx512f detected.
            v.push(Peak { name: "f32-fma-512", flops_per_s: best(|| unsafe { x86::fma512() }) });
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: avx2 and fma detected.
            v.push(Peak { name: "f32-fma-256", flops_per_s: best(|| unsafe { x86::fma256() }) });
        }
        if is_x86_feature_detected!("avx512bf16") {
            // SAFETY: avx512bf16 (and so avx512f) detected.
            v.push(Peak { name: "bf16-dot-512", flops_per_s: best(|| unsafe { x86::dpbf16() }) });
        }
    }
    if v.is_empty() {
        v.push(Peak { name: "f32-scalar", flops_per_s: best(scalar) });
    }
    v
}

/// The FLOP/s of one peak (by [`Peak::name`]) measured again now, best of 2 runs; None when
/// this CPU has no such instruction. For baselines taken next to each measurement.
pub fn measure(name: &str) -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY (each arm): the instruction set was detected first.
        match name {
            "f32-fma-512" if is_x86_feature_detected!("avx512f") => {
                return Some(best_of(2, || unsafe { x86::fma512() }));
            }
            "f32-fma-256" if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") => {
                return Some(best_of(2, || unsafe { x86::fma256() }));
            }
            "bf16-dot-512" if is_x86_feature_detected!("avx512bf16") => {
                return Some(best_of(2, || unsafe { x86::dpbf16() }));
            }
            _ => {}
        }
    }
    (name == "f32-scalar").then(|| best_of(2, scalar))
}

/// Best of 5 runs of a loop that returns (flops, a value to keep it alive).
fn best(f: impl Fn() -> (f64, f32)) -> f64 {
    best_of(5, f)
}

fn best_of(runs: usize, f: impl Fn() -> (f64, f32)) -> f64 {
    let mut b: f64 = 0.0;
    for _ in 0..runs {
        let t = Instant::now();
        let (flops, keep) = f();
        std::hint::black_box(keep);
        b = b.max(flops / t.elapsed().as_secs_f64());
    }
    b
}

const ITERS: usize = 2_000_000;

fn scalar() -> (f64, f32) {
    let mut a = [1.0f32; 8];
    for _ in 0..ITERS {
        for x in &mut a {
            *x = x.mul_add(0.999_999, 1e-7);
        }
    }
    ((ITERS * 8 * 2) as f64, a.iter().sum())
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::ITERS;
    use std::arch::x86_64::*;

    /// 12 independent accumulators hide the FMA latency on every current core.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn fma512() -> (f64, f32) {
        let b = _mm512_set1_ps(0.999_999);
        let c = _mm512_set1_ps(1e-7);
        let mut a = [_mm512_set1_ps(1.0); 12];
        for _ in 0..ITERS {
            let b = std::hint::black_box(b);
            for x in &mut a {
                *x = _mm512_fmadd_ps(*x, b, c);
            }
        }
        let s = a.iter().fold(_mm512_setzero_ps(), |s, x| _mm512_add_ps(s, *x));
        ((ITERS * 12 * 16 * 2) as f64, _mm512_reduce_add_ps(s))
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn fma256() -> (f64, f32) {
        let b = _mm256_set1_ps(0.999_999);
        let c = _mm256_set1_ps(1e-7);
        let mut a = [_mm256_set1_ps(1.0); 12];
        for _ in 0..ITERS {
            let b = std::hint::black_box(b);
            for x in &mut a {
                *x = _mm256_fmadd_ps(*x, b, c);
            }
        }
        let mut out = [0f32; 8];
        let s = a.iter().fold(_mm256_setzero_ps(), |s, x| _mm256_add_ps(s, *x));
        // SAFETY: `out` holds 8 f32.
        unsafe { _mm256_storeu_ps(out.as_mut_ptr(), s) };
        ((ITERS * 12 * 8 * 2) as f64, out.iter().sum())
    }

    /// vdpbf16ps: 32 bf16 products summed pairwise into 16 f32 lanes per instruction.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn dpbf16() -> (f64, f32) {
        let x = _mm512_cvtne2ps_pbh(_mm512_set1_ps(0.5), _mm512_set1_ps(0.25));
        let mut a = [_mm512_setzero_ps(); 12];
        for _ in 0..ITERS {
            // The operand goes through black_box so the loop cannot be folded away.
            let x = std::hint::black_box(x);
            for acc in &mut a {
                *acc = _mm512_dpbf16_ps(*acc, x, x);
            }
        }
        let s = a.iter().fold(_mm512_setzero_ps(), |s, x| _mm512_add_ps(s, *x));
        ((ITERS * 12 * 32 * 2) as f64, _mm512_reduce_add_ps(s))
    }
}

/// Streaming read bandwidth in bytes/s over `buf` with `threads` threads (best of `reps`).
pub fn read_bandwidth(buf: &[u64], threads: usize, reps: usize) -> f64 {
    let mut best: f64 = 0.0;
    for _ in 0..reps {
        let t = Instant::now();
        let chunk = buf.len().div_ceil(threads.max(1));
        let total: u64 = std::thread::scope(|s| {
            let hs: Vec<_> = buf.chunks(chunk).map(|c| s.spawn(move || sum_words(c))).collect();
            hs.into_iter().map(|h| h.join().expect("bandwidth thread")).fold(0, u64::wrapping_add)
        });
        std::hint::black_box(total);
        best = best.max(std::mem::size_of_val(buf) as f64 / t.elapsed().as_secs_f64());
    }
    best
}

/// Eight independent accumulators: the compiler vectorizes this into wide loads.
fn sum_words(c: &[u64]) -> u64 {
    let mut acc = [0u64; 8];
    for w in c.chunks_exact(8) {
        for i in 0..8 {
            acc[i] = acc[i].wrapping_add(w[i]);
        }
    }
    acc.iter().fold(0, |a, b| a.wrapping_add(*b))
}
