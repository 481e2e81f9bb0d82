//! The ISA abstraction the kernels are written against, and its three instances.
//!
//! Kernels are generic over [`Isa`] and marked `#[inline(always)]` down to an entry function
//! compiled with `#[target_feature]`, so each instance is real AVX-512 / AVX2 code. Every method
//! is `unsafe`: callers guarantee the CPU has the ISA (checked once by [`Backend::detect`] /
//! [`Backend::available`]) and that pointers are valid for `LANES` elements.

use std::fmt;

/// A SIMD instruction set as the kernels see it: vectors of `LANES` f32.
///
/// # Safety
///
/// Every method requires that the CPU supports the instance's ISA and that the calling function
/// was compiled with it enabled; pointer arguments must be valid for `LANES` elements.
#[allow(clippy::missing_safety_doc)]
pub trait Isa: Copy + 'static {
    /// f32 lanes per vector.
    const LANES: usize;
    /// Whether the ISA has 32 vector registers (bigger register tiles fit without spilling).
    const WIDE: bool;
    /// The vector type.
    type V: Copy;
    /// All zeros.
    unsafe fn zero() -> Self::V;
    /// Broadcast.
    unsafe fn splat(x: f32) -> Self::V;
    /// Unaligned load of `LANES` f32.
    unsafe fn load(p: *const f32) -> Self::V;
    /// Unaligned store of `LANES` f32.
    unsafe fn store(p: *mut f32, v: Self::V);
    /// `a · b + c`.
    unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    /// `a · b`.
    unsafe fn mul(a: Self::V, b: Self::V) -> Self::V;
    /// `a + b`.
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V;
    /// Lane-wise maximum (a NaN lane may give either operand: callers reject non-finite
    /// results anyway).
    unsafe fn max(a: Self::V, b: Self::V) -> Self::V;
    /// Horizontal sum.
    unsafe fn sum(v: Self::V) -> f32;
    /// Horizontal maximum.
    unsafe fn hmax(v: Self::V) -> f32;
    /// `e^x` per lane, relative error ≤ 2e-7 for x ≥ −87 (below, a value ≤ 1e-37 or 0).
    unsafe fn exp(x: Self::V) -> Self::V;
    /// Widen `LANES` little-endian bf16 at `src` to f32 at `dst` (exact).
    unsafe fn widen_bf16(src: *const u8, dst: *mut f32);
    /// Widen `LANES` little-endian f16 at `src` to f32 at `dst` (exact).
    unsafe fn widen_f16(src: *const u8, dst: *mut f32);
    /// Load `LANES` little-endian bf16 at `src` widened to f32 (exact).
    unsafe fn load_bf16(src: *const u8) -> Self::V;
    /// Load `2·LANES` little-endian bf16 at `src` (`4·LANES` bytes) as two vectors: the
    /// even-indexed elements and the odd-indexed ones, widened exactly. One load and one
    /// operation per vector (a shift, a mask) instead of a widening shuffle and a shift.
    #[inline(always)]
    unsafe fn load_bf16_pair(src: *const u8) -> (Self::V, Self::V) {
        let mut e = [0.0f32; 16];
        let mut o = [0.0f32; 16];
        for i in 0..Self::LANES {
            // SAFETY: the caller guarantees 4·LANES readable bytes at `src`.
            let (a, b) =
                unsafe { ([*src.add(4 * i), *src.add(4 * i + 1)], [*src.add(4 * i + 2), *src.add(4 * i + 3)]) };
            e[i] = f32::from_bits((u16::from_le_bytes(a) as u32) << 16);
            o[i] = f32::from_bits((u16::from_le_bytes(b) as u32) << 16);
        }
        // SAFETY: both arrays hold 16 ≥ LANES f32.
        unsafe { (Self::load(e.as_ptr()), Self::load(o.as_ptr())) }
    }
    /// Load `LANES` e4m3fn bytes at `src` widened to f32: bit for bit `fp8_lut()[b]` (the
    /// 0x7f/0xff NaNs stay NaN).
    #[inline(always)]
    unsafe fn load_fp8(src: *const u8) -> Self::V {
        let lut = kvcache_core::codec::fp8_lut();
        let mut v = [0.0f32; 16];
        for (i, x) in v.iter_mut().enumerate().take(Self::LANES) {
            // SAFETY: the caller guarantees LANES readable bytes at `src`.
            *x = lut[unsafe { *src.add(i) } as usize];
        }
        // SAFETY: `v` holds 16 ≥ LANES f32.
        unsafe { Self::load(v.as_ptr()) }
    }
    /// Widen `LANES` e4m3fn bytes at `src` times `scale` to f32 at `dst`: bit for bit what
    /// `fp8_lut()[b] * scale` gives.
    #[inline(always)]
    unsafe fn widen_fp8(src: *const u8, dst: *mut f32, scale: f32) {
        // SAFETY: forwarded from the caller.
        unsafe { Self::store(dst, Self::mul(Self::load_fp8(src), Self::splat(scale))) }
    }
    /// Widen `LANES` int8 at `src` times `scale` to f32 at `dst` (`(b as f32) * scale`).
    #[inline(always)]
    unsafe fn widen_i8(src: *const u8, dst: *mut f32, scale: f32) {
        for i in 0..Self::LANES {
            // SAFETY: as in widen_fp8.
            unsafe { *dst.add(i) = (*src.add(i) as i8) as f32 * scale };
        }
    }
    /// Horizontal sums of 16 vectors: `out[i] = sum(v[i])`.
    #[inline(always)]
    unsafe fn sum16(v: &[Self::V; 16], out: &mut [f32; 16]) {
        for (o, x) in out.iter_mut().zip(v) {
            // SAFETY: forwarded from the caller.
            *o = unsafe { Self::sum(*x) };
        }
    }
    /// Hint that the cache line at `p` will be read soon: fetched into L2 (`prefetcht1`), not L1
    /// — on AMD Zen 4 a `prefetcht0` stream holds an L1 fill buffer per line and capped the GQA
    /// kernel at ~11 GB/s where T1 reaches the hardware streamer's rate (docs/BENCHMARKS.md).
    /// No-op where unsupported.
    unsafe fn prefetch(_p: *const u8) {}
    /// Whether [`Isa::dp_bf16`] is a hardware bf16 dot product (AVX-512 BF16).
    const DPBF16: bool = false;
    /// `2·LANES` raw bf16 (`4·LANES` bytes) at `p`, as the bits of a vector.
    #[inline(always)]
    unsafe fn load_raw(p: *const u8) -> Self::V {
        // SAFETY: forwarded from the caller (valid for LANES f32 = 4·LANES bytes).
        unsafe { Self::load(p as *const f32) }
    }
    /// `acc + a·b` over pairs of bf16: lane `i` adds `a[2i]·b[2i] + a[2i+1]·b[2i+1]`, `a` and
    /// `b` holding `2·LANES` bf16 as bits ([`Isa::load_raw`]). Only called where `DPBF16`.
    #[inline(always)]
    unsafe fn dp_bf16(acc: Self::V, _a: Self::V, _b: Self::V) -> Self::V {
        acc
    }
}

/// Which kernel instance runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// AVX-512F (16 lanes), hardware f16 conversion.
    Avx512,
    /// AVX-512 with the BF16 extension: for a query whose values are all bf16 values (an
    /// engine's bf16 query), scores of bf16 GQA/MHA pages with `vdpbf16ps` (bf16 products are
    /// exact in f32, so accuracy stays at the f32 paths' 1e-5) at half the instructions of f32
    /// FMAs; everything else as [`Backend::Avx512`]. Chosen where it measures faster
    /// ([`crate::calibrate`]).
    Avx512Bf16,
    /// AVX2 + FMA + F16C (8 lanes).
    Avx2,
    /// Plain Rust over 8-lane arrays (any CPU).
    Portable,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Avx512 => "avx512",
            Self::Avx512Bf16 => "avx512-bf16",
            Self::Avx2 => "avx2",
            Self::Portable => "portable",
        })
    }
}

impl Backend {
    /// The fastest backend on the CPUs measured (see docs/BENCHMARKS.md): AVX-512 with f32
    /// FMAs where present. [`Backend::Avx512Bf16`] is opt-in.
    pub fn detect() -> Backend {
        Self::available().into_iter().next().unwrap_or(Backend::Portable)
    }

    /// Every backend this CPU runs, the default first.
    pub fn available() -> Vec<Backend> {
        let mut v = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f") {
                v.push(Backend::Avx512);
                if is_x86_feature_detected!("avx512bf16") {
                    v.push(Backend::Avx512Bf16);
                }
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c") {
                v.push(Backend::Avx2);
            }
        }
        v.push(Backend::Portable);
        v
    }

    /// Parse "avx512", "avx512-bf16", "avx2" or "portable".
    pub fn parse(s: &str) -> Option<Backend> {
        [Backend::Avx512, Backend::Avx512Bf16, Backend::Avx2, Backend::Portable]
            .into_iter()
            .find(|b| b.to_string() == s)
    }
}

// Cephes expf constants.
const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
const EXP_HI: f32 = 88.3;
const EXP_LO: f32 = -87.3;
const P: [f32; 6] = [1.987_569_1e-4, 1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5];

/// The portable instance: 8-lane arrays the compiler vectorizes with whatever the target has.
#[derive(Debug, Clone, Copy)]
pub struct Portable;

impl Isa for Portable {
    const LANES: usize = 8;
    const WIDE: bool = false;
    type V = [f32; 8];
    #[inline(always)]
    unsafe fn zero() -> Self::V {
        [0.0; 8]
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> Self::V {
        [x; 8]
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self::V {
        // SAFETY: the caller guarantees 8 readable f32 at `p`.
        unsafe { std::ptr::read_unaligned(p as *const [f32; 8]) }
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: Self::V) {
        // SAFETY: the caller guarantees 8 writable f32 at `p`.
        unsafe { std::ptr::write_unaligned(p as *mut [f32; 8], v) }
    }
    #[inline(always)]
    unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V {
        std::array::from_fn(|i| a[i] * b[i] + c[i])
    }
    #[inline(always)]
    unsafe fn mul(a: Self::V, b: Self::V) -> Self::V {
        std::array::from_fn(|i| a[i] * b[i])
    }
    #[inline(always)]
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V {
        std::array::from_fn(|i| a[i] + b[i])
    }
    #[inline(always)]
    unsafe fn max(a: Self::V, b: Self::V) -> Self::V {
        std::array::from_fn(|i| a[i].max(b[i]))
    }
    #[inline(always)]
    unsafe fn sum(v: Self::V) -> f32 {
        ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]))
    }
    #[inline(always)]
    unsafe fn hmax(v: Self::V) -> f32 {
        v.iter().copied().fold(f32::NEG_INFINITY, f32::max)
    }
    #[inline(always)]
    unsafe fn exp(x: Self::V) -> Self::V {
        std::array::from_fn(|i| x[i].exp())
    }
    #[inline(always)]
    unsafe fn widen_bf16(src: *const u8, dst: *mut f32) {
        for i in 0..8 {
            // SAFETY: the caller guarantees 16 readable bytes at `src`, 8 writable f32 at `dst`.
            unsafe {
                let b = u16::from_le_bytes([*src.add(2 * i), *src.add(2 * i + 1)]);
                *dst.add(i) = f32::from_bits((b as u32) << 16);
            }
        }
    }
    #[inline(always)]
    unsafe fn load_bf16(src: *const u8) -> Self::V {
        // SAFETY: the caller guarantees 16 readable bytes at `src`.
        std::array::from_fn(|i| unsafe {
            f32::from_bits((u16::from_le_bytes([*src.add(2 * i), *src.add(2 * i + 1)]) as u32) << 16)
        })
    }
    #[inline(always)]
    unsafe fn widen_f16(src: *const u8, dst: *mut f32) {
        for i in 0..8 {
            // SAFETY: as in widen_bf16.
            unsafe {
                let b = u16::from_le_bytes([*src.add(2 * i), *src.add(2 * i + 1)]);
                *dst.add(i) = half::f16::from_bits(b).to_f32();
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub use x86::{Avx2, Avx512, Avx512Bf16};

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::*;
    use std::arch::x86_64::*;

    // e4m3fn → f32 without a table (`load_fp8`): for a byte `s eeee mmm`, the 7 bits `em` shifted
    // left by 20 put `eeee` at the bottom of the f32 exponent and `mmm` at the top of the
    // mantissa; adding 120 to the exponent (127 − 7, the difference of the biases) makes it the
    // exact normal value `2^(e−7)·(1 + m/8)`. Subnormals (e = 0) are `m·2^−9`, converted from the
    // integer; `em = 0x7f` is NaN; the sign bit moves to bit 31. Then one multiply by the scale
    // by the caller (`widen_fp8`), as the table path does, so the result is bit for bit the same.
    const FP8_BIAS: i32 = 120 << 23;
    const FP8_SUB: f32 = 1.0 / 512.0;
    const FP8_NAN: i32 = 0x7fc0_0000;

    /// AVX2 + FMA + F16C, 8 lanes.
    #[derive(Debug, Clone, Copy)]
    pub struct Avx2;

    // SAFETY (every block in this impl): callers run these only inside functions compiled with
    // `avx2,fma,f16c` on a CPU that has them (Backend::available), with pointers valid for 8 f32
    // (or 16 bytes of bf16/f16), as the trait requires.
    impl Isa for Avx2 {
        const LANES: usize = 8;
        const WIDE: bool = false;
        type V = __m256;
        #[inline(always)]
        unsafe fn zero() -> __m256 {
            unsafe { _mm256_setzero_ps() }
        }
        #[inline(always)]
        unsafe fn splat(x: f32) -> __m256 {
            unsafe { _mm256_set1_ps(x) }
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m256 {
            unsafe { _mm256_loadu_ps(p) }
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: __m256) {
            unsafe { _mm256_storeu_ps(p, v) }
        }
        #[inline(always)]
        unsafe fn fma(a: __m256, b: __m256, c: __m256) -> __m256 {
            unsafe { _mm256_fmadd_ps(a, b, c) }
        }
        #[inline(always)]
        unsafe fn mul(a: __m256, b: __m256) -> __m256 {
            unsafe { _mm256_mul_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn add(a: __m256, b: __m256) -> __m256 {
            unsafe { _mm256_add_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn max(a: __m256, b: __m256) -> __m256 {
            unsafe { _mm256_max_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn hmax(v: __m256) -> f32 {
            unsafe {
                let s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
                let s = _mm_max_ps(s, _mm_movehl_ps(s, s));
                _mm_cvtss_f32(_mm_max_ss(s, _mm_shuffle_ps::<0b01>(s, s)))
            }
        }
        #[inline(always)]
        unsafe fn sum(v: __m256) -> f32 {
            unsafe {
                let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
                let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
                let s = _mm_add_ss(s, _mm_shuffle_ps::<0b01>(s, s));
                _mm_cvtss_f32(s)
            }
        }
        #[inline(always)]
        unsafe fn exp(x: __m256) -> __m256 {
            unsafe {
                let x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(EXP_HI)), _mm256_set1_ps(EXP_LO));
                let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
                    x,
                    _mm256_set1_ps(LOG2E),
                ));
                let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
                let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
                let mut p = _mm256_set1_ps(P[0]);
                for c in &P[1..] {
                    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(*c));
                }
                let r2 = _mm256_mul_ps(r, r);
                let p = _mm256_add_ps(_mm256_fmadd_ps(p, r2, r), _mm256_set1_ps(1.0));
                let e = _mm256_slli_epi32::<23>(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)));
                _mm256_mul_ps(p, _mm256_castsi256_ps(e))
            }
        }
        #[inline(always)]
        unsafe fn widen_bf16(src: *const u8, dst: *mut f32) {
            unsafe {
                let h = _mm_loadu_si128(src as *const __m128i);
                let w = _mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h));
                _mm256_storeu_ps(dst, _mm256_castsi256_ps(w));
            }
        }
        #[inline(always)]
        unsafe fn widen_f16(src: *const u8, dst: *mut f32) {
            unsafe { _mm256_storeu_ps(dst, _mm256_cvtph_ps(_mm_loadu_si128(src as *const __m128i))) }
        }
        #[inline(always)]
        unsafe fn load_bf16(src: *const u8) -> __m256 {
            unsafe {
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(_mm_loadu_si128(
                    src as *const __m128i,
                ))))
            }
        }
        #[inline(always)]
        unsafe fn load_bf16_pair(src: *const u8) -> (__m256, __m256) {
            unsafe {
                let raw = _mm256_loadu_si256(src as *const __m256i);
                let even = _mm256_slli_epi32::<16>(raw);
                let odd = _mm256_and_si256(raw, _mm256_set1_epi32(0xffff_0000u32 as i32));
                (_mm256_castsi256_ps(even), _mm256_castsi256_ps(odd))
            }
        }
        /// The e4m3fn widening described at `FP8_BIAS`, in 8 lanes.
        #[inline(always)]
        unsafe fn load_fp8(src: *const u8) -> __m256 {
            unsafe {
                let b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(src as *const __m128i));
                let em = _mm256_and_si256(b, _mm256_set1_epi32(0x7f));
                let sign = _mm256_slli_epi32::<24>(_mm256_and_si256(b, _mm256_set1_epi32(0x80)));
                let normal = _mm256_add_epi32(_mm256_slli_epi32::<20>(em), _mm256_set1_epi32(FP8_BIAS));
                let sub = _mm256_castps_si256(_mm256_mul_ps(_mm256_cvtepi32_ps(em), _mm256_set1_ps(FP8_SUB)));
                let mag = _mm256_blendv_epi8(normal, sub, _mm256_cmpgt_epi32(_mm256_set1_epi32(8), em));
                let mag = _mm256_blendv_epi8(
                    mag,
                    _mm256_set1_epi32(FP8_NAN),
                    _mm256_cmpeq_epi32(em, _mm256_set1_epi32(0x7f)),
                );
                _mm256_castsi256_ps(_mm256_or_si256(mag, sign))
            }
        }
        #[inline(always)]
        unsafe fn widen_i8(src: *const u8, dst: *mut f32, scale: f32) {
            unsafe {
                let b = _mm256_cvtepi8_epi32(_mm_loadl_epi64(src as *const __m128i));
                _mm256_storeu_ps(dst, _mm256_mul_ps(_mm256_cvtepi32_ps(b), _mm256_set1_ps(scale)));
            }
        }
        #[inline(always)]
        unsafe fn prefetch(p: *const u8) {
            unsafe { _mm_prefetch::<_MM_HINT_T1>(p as *const i8) }
        }
    }

    /// AVX-512F, 16 lanes.
    #[derive(Debug, Clone, Copy)]
    pub struct Avx512;

    // SAFETY (every block in this impl): callers run these only inside functions compiled with
    // `avx512f` on a CPU that has it, with pointers valid for 16 f32 (or 32 bytes of bf16/f16).
    impl Isa for Avx512 {
        const LANES: usize = 16;
        const WIDE: bool = true;
        type V = __m512;
        #[inline(always)]
        unsafe fn zero() -> __m512 {
            unsafe { _mm512_setzero_ps() }
        }
        #[inline(always)]
        unsafe fn splat(x: f32) -> __m512 {
            unsafe { _mm512_set1_ps(x) }
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m512 {
            unsafe { _mm512_loadu_ps(p) }
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: __m512) {
            unsafe { _mm512_storeu_ps(p, v) }
        }
        #[inline(always)]
        unsafe fn fma(a: __m512, b: __m512, c: __m512) -> __m512 {
            unsafe { _mm512_fmadd_ps(a, b, c) }
        }
        #[inline(always)]
        unsafe fn mul(a: __m512, b: __m512) -> __m512 {
            unsafe { _mm512_mul_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn add(a: __m512, b: __m512) -> __m512 {
            unsafe { _mm512_add_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn max(a: __m512, b: __m512) -> __m512 {
            unsafe { _mm512_max_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn hmax(v: __m512) -> f32 {
            unsafe { _mm512_reduce_max_ps(v) }
        }
        #[inline(always)]
        unsafe fn sum(v: __m512) -> f32 {
            unsafe { _mm512_reduce_add_ps(v) }
        }
        #[inline(always)]
        unsafe fn exp(x: __m512) -> __m512 {
            unsafe {
                let x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(EXP_HI)), _mm512_set1_ps(EXP_LO));
                let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(
                    x,
                    _mm512_set1_ps(LOG2E),
                ));
                let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x);
                let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
                let mut p = _mm512_set1_ps(P[0]);
                for c in &P[1..] {
                    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(*c));
                }
                let r2 = _mm512_mul_ps(r, r);
                let p = _mm512_add_ps(_mm512_fmadd_ps(p, r2, r), _mm512_set1_ps(1.0));
                _mm512_scalef_ps(p, n)
            }
        }
        #[inline(always)]
        unsafe fn widen_bf16(src: *const u8, dst: *mut f32) {
            unsafe {
                let h = _mm256_loadu_si256(src as *const __m256i);
                let w = _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h));
                _mm512_storeu_ps(dst, _mm512_castsi512_ps(w));
            }
        }
        #[inline(always)]
        unsafe fn widen_f16(src: *const u8, dst: *mut f32) {
            unsafe { _mm512_storeu_ps(dst, _mm512_cvtph_ps(_mm256_loadu_si256(src as *const __m256i))) }
        }
        #[inline(always)]
        unsafe fn load_bf16_pair(src: *const u8) -> (__m512, __m512) {
            unsafe {
                let raw = _mm512_loadu_si512(src as *const __m512i);
                let even = _mm512_slli_epi32::<16>(raw);
                let odd = _mm512_and_si512(raw, _mm512_set1_epi32(0xffff_0000u32 as i32));
                (_mm512_castsi512_ps(even), _mm512_castsi512_ps(odd))
            }
        }
        /// The e4m3fn widening described at `FP8_BIAS`, in 16 lanes.
        #[inline(always)]
        unsafe fn load_fp8(src: *const u8) -> __m512 {
            unsafe {
                let b = _mm512_cvtepu8_epi32(_mm_loadu_si128(src as *const __m128i));
                let em = _mm512_and_si512(b, _mm512_set1_epi32(0x7f));
                let sign = _mm512_slli_epi32::<24>(_mm512_and_si512(b, _mm512_set1_epi32(0x80)));
                let normal = _mm512_add_epi32(_mm512_slli_epi32::<20>(em), _mm512_set1_epi32(FP8_BIAS));
                let sub = _mm512_castps_si512(_mm512_mul_ps(_mm512_cvtepi32_ps(em), _mm512_set1_ps(FP8_SUB)));
                let mag = _mm512_mask_blend_epi32(_mm512_cmplt_epu32_mask(em, _mm512_set1_epi32(8)), normal, sub);
                let nan = _mm512_cmpeq_epi32_mask(em, _mm512_set1_epi32(0x7f));
                let mag = _mm512_mask_blend_epi32(nan, mag, _mm512_set1_epi32(FP8_NAN));
                _mm512_castsi512_ps(_mm512_or_si512(mag, sign))
            }
        }
        #[inline(always)]
        unsafe fn widen_i8(src: *const u8, dst: *mut f32, scale: f32) {
            unsafe {
                let b = _mm512_cvtepi8_epi32(_mm_loadu_si128(src as *const __m128i));
                _mm512_storeu_ps(dst, _mm512_mul_ps(_mm512_cvtepi32_ps(b), _mm512_set1_ps(scale)));
            }
        }
        /// A shuffle-and-add tree: 15 adds for 16 sums instead of 16 separate reductions.
        #[inline(always)]
        unsafe fn sum16(v: &[__m512; 16], out: &mut [f32; 16]) {
            unsafe {
                // 512 → 256-bit halves: pair (x, y) keeps x in 128-bit lanes 0-1, y in 2-3.
                let b: [__m512; 8] = std::array::from_fn(|i| {
                    let (x, y) = (v[2 * i], v[2 * i + 1]);
                    _mm512_add_ps(
                        _mm512_shuffle_f32x4::<0b01_00_01_00>(x, y),
                        _mm512_shuffle_f32x4::<0b11_10_11_10>(x, y),
                    )
                });
                // → 128-bit lanes: lane k of c[i] is a 4-float partial of v[4i + k].
                let c: [__m512; 4] = std::array::from_fn(|i| {
                    let (x, y) = (b[2 * i], b[2 * i + 1]);
                    _mm512_add_ps(
                        _mm512_shuffle_f32x4::<0b10_00_10_00>(x, y),
                        _mm512_shuffle_f32x4::<0b11_01_11_01>(x, y),
                    )
                });
                // Within lanes: 4 floats → 2.
                let d: [__m512; 2] = std::array::from_fn(|i| {
                    let (x, y) = (c[2 * i], c[2 * i + 1]);
                    _mm512_add_ps(_mm512_shuffle_ps::<0b01_00_01_00>(x, y), _mm512_shuffle_ps::<0b11_10_11_10>(x, y))
                });
                // 2 → 1: element e of lane k is the sum of v[4e + k].
                let e = _mm512_add_ps(
                    _mm512_shuffle_ps::<0b10_00_10_00>(d[0], d[1]),
                    _mm512_shuffle_ps::<0b11_01_11_01>(d[0], d[1]),
                );
                let mut t = [0f32; 16];
                _mm512_storeu_ps(t.as_mut_ptr(), e);
                for (j, o) in out.iter_mut().enumerate() {
                    *o = t[(j % 4) * 4 + j / 4];
                }
            }
        }
        #[inline(always)]
        unsafe fn load_bf16(src: *const u8) -> __m512 {
            unsafe {
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(_mm256_loadu_si256(
                    src as *const __m256i,
                ))))
            }
        }
        #[inline(always)]
        unsafe fn prefetch(p: *const u8) {
            unsafe { _mm_prefetch::<_MM_HINT_T1>(p as *const i8) }
        }
    }

    /// AVX-512F with AVX-512 BF16: [`Avx512`] plus a hardware bf16 pair dot product.
    #[derive(Debug, Clone, Copy)]
    pub struct Avx512Bf16;

    // SAFETY (every block in this impl): as for `Avx512`, in functions compiled with `avx512f`
    // and `avx512bf16` on a CPU that has both.
    impl Isa for Avx512Bf16 {
        const LANES: usize = 16;
        const WIDE: bool = true;
        const DPBF16: bool = true;
        type V = __m512;
        #[inline(always)]
        unsafe fn zero() -> __m512 {
            unsafe { <Avx512 as Isa>::zero() }
        }
        #[inline(always)]
        unsafe fn splat(x: f32) -> __m512 {
            unsafe { <Avx512 as Isa>::splat(x) }
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m512 {
            unsafe { <Avx512 as Isa>::load(p) }
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: __m512) {
            unsafe { <Avx512 as Isa>::store(p, v) }
        }
        #[inline(always)]
        unsafe fn fma(a: __m512, b: __m512, c: __m512) -> __m512 {
            unsafe { <Avx512 as Isa>::fma(a, b, c) }
        }
        #[inline(always)]
        unsafe fn mul(a: __m512, b: __m512) -> __m512 {
            unsafe { <Avx512 as Isa>::mul(a, b) }
        }
        #[inline(always)]
        unsafe fn add(a: __m512, b: __m512) -> __m512 {
            unsafe { <Avx512 as Isa>::add(a, b) }
        }
        #[inline(always)]
        unsafe fn max(a: __m512, b: __m512) -> __m512 {
            unsafe { <Avx512 as Isa>::max(a, b) }
        }
        #[inline(always)]
        unsafe fn hmax(v: __m512) -> f32 {
            unsafe { <Avx512 as Isa>::hmax(v) }
        }
        #[inline(always)]
        unsafe fn sum(v: __m512) -> f32 {
            unsafe { <Avx512 as Isa>::sum(v) }
        }
        #[inline(always)]
        unsafe fn exp(x: __m512) -> __m512 {
            unsafe { <Avx512 as Isa>::exp(x) }
        }
        #[inline(always)]
        unsafe fn widen_bf16(src: *const u8, dst: *mut f32) {
            unsafe { <Avx512 as Isa>::widen_bf16(src, dst) }
        }
        #[inline(always)]
        unsafe fn widen_f16(src: *const u8, dst: *mut f32) {
            unsafe { <Avx512 as Isa>::widen_f16(src, dst) }
        }
        #[inline(always)]
        unsafe fn load_fp8(src: *const u8) -> __m512 {
            unsafe { <Avx512 as Isa>::load_fp8(src) }
        }
        #[inline(always)]
        unsafe fn load_bf16_pair(src: *const u8) -> (__m512, __m512) {
            unsafe { <Avx512 as Isa>::load_bf16_pair(src) }
        }
        #[inline(always)]
        unsafe fn widen_i8(src: *const u8, dst: *mut f32, scale: f32) {
            unsafe { <Avx512 as Isa>::widen_i8(src, dst, scale) }
        }
        #[inline(always)]
        unsafe fn load_bf16(src: *const u8) -> __m512 {
            unsafe { <Avx512 as Isa>::load_bf16(src) }
        }
        #[inline(always)]
        unsafe fn sum16(v: &[__m512; 16], out: &mut [f32; 16]) {
            unsafe { <Avx512 as Isa>::sum16(v, out) }
        }
        #[inline(always)]
        unsafe fn prefetch(p: *const u8) {
            unsafe { <Avx512 as Isa>::prefetch(p) }
        }
        #[inline(always)]
        unsafe fn load_raw(p: *const u8) -> __m512 {
            unsafe { _mm512_castsi512_ps(_mm512_loadu_si512(p as *const _)) }
        }
        #[inline(always)]
        unsafe fn dp_bf16(acc: __m512, a: __m512, b: __m512) -> __m512 {
            // The bf16 vector type is the same 512 bits, reinterpreted.
            unsafe {
                _mm512_dpbf16_ps(
                    acc,
                    std::mem::transmute::<__m512, __m512bh>(a),
                    std::mem::transmute::<__m512, __m512bh>(b),
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `widen_fp8` and `widen_i8` of `I` over all 256 bytes at several scales.
    fn widen_all<I: Isa>(scale: f32, fp8: bool) -> Vec<f32> {
        let bytes: Vec<u8> = (0..=255u8).collect();
        let mut out = vec![f32::MAX; 256];
        for i in (0..256).step_by(I::LANES) {
            // SAFETY: callers run this on a CPU with I's ISA (wrappers below); 256 is a multiple
            // of LANES, so every chunk is in bounds.
            unsafe {
                if fp8 {
                    I::widen_fp8(bytes.as_ptr().add(i), out.as_mut_ptr().add(i), scale);
                } else {
                    I::widen_i8(bytes.as_ptr().add(i), out.as_mut_ptr().add(i), scale);
                }
            }
        }
        out
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    fn widen_avx512(scale: f32, fp8: bool) -> Vec<f32> {
        widen_all::<Avx512>(scale, fp8)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn widen_avx2(scale: f32, fp8: bool) -> Vec<f32> {
        widen_all::<Avx2>(scale, fp8)
    }

    #[test]
    fn fp8_and_int8_widening_is_bit_exact_on_every_backend() {
        let lut = kvcache_core::codec::fp8_lut();
        for scale in [1.0f32, 2f32.powi(-20), 2f32.powi(12), 0.75, 3.0e-41] {
            for fp8 in [true, false] {
                let want: Vec<f32> =
                    (0..=255u8).map(|b| if fp8 { lut[b as usize] * scale } else { (b as i8) as f32 * scale }).collect();
                let mut got = vec![("portable", widen_all::<Portable>(scale, fp8))];
                #[cfg(target_arch = "x86_64")]
                for b in Backend::available() {
                    // SAFETY: `available` found the ISA on this CPU.
                    match b {
                        Backend::Avx512 => got.push(("avx512", unsafe { widen_avx512(scale, fp8) })),
                        Backend::Avx2 => got.push(("avx2", unsafe { widen_avx2(scale, fp8) })),
                        _ => {}
                    }
                }
                for (name, g) in got {
                    for (b, (x, y)) in g.iter().zip(&want).enumerate() {
                        assert!(
                            x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()),
                            "{name} fp8 {fp8} byte {b:#04x} scale {scale}: {x} vs {y}"
                        );
                    }
                }
            }
        }
    }
}
