//! The AVX-512 scan of eight nodes per block: draws, cutoff compares and the bound test.

use super::index::BLOCK;
use super::*;

/// The draws of eight nodes: [`draw`] in 64-bit lanes (`vpmuludq` multiplies the low halves;
/// swapping the halves of each lane moves the high half down).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq")]
#[inline]
pub(super) fn draws_avx512(hashes: &[u64; BLOCK], key_hash: u64) -> std::arch::x86_64::__m512i {
    use std::arch::x86_64::*;
    const SWAP: _MM_PERM_ENUM = 0xb1; // dwords (1, 0, 3, 2): the halves of each u64 swapped
    // SAFETY: the array is exactly 64 bytes, read unaligned.
    let h = unsafe { _mm512_loadu_si512(hashes.as_ptr().cast()) };
    let k = key_hash.rotate_left(32);
    let y = _mm512_xor_si512(h, _mm512_set1_epi64((k ^ DRAW_HI) as i64));
    let z = _mm512_xor_si512(h, _mm512_set1_epi64((k ^ DRAW_LO) as i64));
    let p = _mm512_mul_epu32(y, _mm512_shuffle_epi32::<SWAP>(y));
    let q = _mm512_mul_epu32(z, _mm512_shuffle_epi32::<SWAP>(z));
    // Each fold holds lo ^ hi in both halves; take p's in the high dword, q's in the low.
    let fp = _mm512_xor_si512(p, _mm512_shuffle_epi32::<SWAP>(p));
    let fq = _mm512_xor_si512(q, _mm512_shuffle_epi32::<SWAP>(q));
    _mm512_mask_blend_epi32(0x5555, fp, fq)
}

/// Bit `l` set when lane `l`'s draw reaches its cutoff.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq")]
#[inline]
pub(super) fn above_cutoff_avx512(draws: std::arch::x86_64::__m512i, cutoffs: &[u64; BLOCK]) -> u8 {
    use std::arch::x86_64::*;
    // SAFETY: the array is exactly 64 bytes, read unaligned.
    let c = unsafe { _mm512_loadu_si512(cutoffs.as_ptr().cast()) };
    _mm512_cmpge_epu64_mask(draws, c)
}

/// AVX-512 [`PlacementIndex::block_mask`]: `u` exactly as [`unit`] computes it (the 53-bit
/// integer converts exactly; +0.5 and the power-of-two scale round the same way in vector lanes
/// as in scalar code).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq")]
#[inline]
pub(super) fn block_mask_avx512(hashes: &[u64; BLOCK], weights: &[f64; BLOCK], key_hash: u64, thr: f64) -> u8 {
    use std::arch::x86_64::*;
    // SAFETY: the array is exactly 64 bytes, read unaligned.
    let w = unsafe { _mm512_loadu_pd(weights.as_ptr()) };
    let x = draws_avx512(hashes, key_hash);
    let m = _mm512_cvtepu64_pd(_mm512_srli_epi64::<11>(x));
    // Multiplying by 2^-53 is exactly the scalar division by 2^53.
    let u = _mm512_mul_pd(_mm512_add_pd(m, _mm512_set1_pd(0.5)), _mm512_set1_pd(1.0 / (1u64 << 53) as f64));
    let one_minus_u = _mm512_sub_pd(_mm512_set1_pd(1.0), u);
    _mm512_cmp_pd_mask::<_CMP_GE_OQ>(w, _mm512_mul_pd(_mm512_set1_pd(thr), one_minus_u))
}
