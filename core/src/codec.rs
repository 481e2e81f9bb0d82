//! Row codecs: how the elements of one stored row (a K or V head row, or an MLA latent+rope row)
//! are encoded.
//!
//! | codec | bytes per row of `width` (MLA: `tail` = rope part) | round trip |
//! |---|---|---|
//! | bf16 | `2·width` | exact for bf16 values; f32 rounds to nearest even |
//! | f16  | `2·width` | exact for f16 values |
//! | fp8-e4m3 | quantized part: 1 B per element + one f32 power-of-two scale per 128-element tile; tail bf16 | `|x̂−x| ≤ 2⁻⁴·|x| + 2⁻¹⁰·s` (s = the tile's scale) |
//! | int8 | quantized part: 1 B per element + one f32 scale per row; tail bf16 | `|x̂−x| ≤ amax/254` (amax = the row's max magnitude) |
//!
//! Row byte layout of the quantized codecs: `[quantized elements][scales: f32 LE][tail: bf16 LE]`.
//! For DeepSeek-V3 fp8 that is 512 + 4·4 + 64·2 = 656 bytes.

use half::{bf16, f16};
use serde::Serialize;

/// Element encoding of a page payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum Codec {
    /// bfloat16.
    #[serde(rename = "bf16")]
    Bf16,
    /// IEEE half.
    #[serde(rename = "f16")]
    F16,
    /// FP8 E4M3 (fn variant, max 448) with a power-of-two f32 scale per 128-element tile.
    #[serde(rename = "fp8-e4m3")]
    Fp8E4m3,
    /// INT8 with one f32 scale per row.
    #[serde(rename = "int8")]
    Int8,
}

/// Elements per fp8 scale tile.
pub const FP8_TILE: usize = 128;
/// Largest finite e4m3fn magnitude.
pub const FP8_MAX: f32 = 448.0;

/// The shape of one row: `width` elements of which the last `tail` stay bf16 under the
/// quantized codecs (the MLA rope key).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowShape {
    /// Elements in the row.
    pub width: usize,
    /// Trailing elements kept in bf16 by fp8/int8.
    pub tail: usize,
}

impl RowShape {
    /// Elements quantized by fp8/int8.
    pub fn main(self) -> usize {
        self.width - self.tail
    }
}

impl Codec {
    /// Every codec.
    pub const ALL: [Codec; 4] = [Codec::Bf16, Codec::F16, Codec::Fp8E4m3, Codec::Int8];

    /// Name used on the command line and in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Bf16 => "bf16",
            Self::F16 => "f16",
            Self::Fp8E4m3 => "fp8-e4m3",
            Self::Int8 => "int8",
        }
    }

    /// Parse a codec name.
    pub fn parse(s: &str) -> Option<Codec> {
        Self::ALL.into_iter().find(|c| c.as_str() == s || (s == "fp8" && *c == Self::Fp8E4m3))
    }

    /// Numeric tag stored in page headers (same numbering as the wire enum).
    pub fn tag(self) -> u8 {
        match self {
            Self::Bf16 => 1,
            Self::F16 => 2,
            Self::Fp8E4m3 => 3,
            Self::Int8 => 4,
        }
    }

    /// Inverse of [`Codec::tag`].
    pub fn from_tag(t: u8) -> Option<Codec> {
        Self::ALL.into_iter().find(|c| c.tag() as u32 == t as u32)
    }

    /// Scale tiles of a quantized part of `main` elements.
    fn scales(self, main: usize) -> usize {
        match self {
            Self::Fp8E4m3 => main.div_ceil(FP8_TILE),
            Self::Int8 => usize::from(main > 0),
            _ => 0,
        }
    }

    /// Encoded bytes of one row.
    pub fn row_bytes(self, shape: RowShape) -> usize {
        match self {
            Self::Bf16 | Self::F16 => 2 * shape.width,
            Self::Fp8E4m3 | Self::Int8 => shape.main() + 4 * self.scales(shape.main()) + 2 * shape.tail,
        }
    }

    /// Encode one row of `shape.width` f32 values into `dst` (`row_bytes` long).
    pub fn encode_row(self, shape: RowShape, src: &[f32], dst: &mut [u8]) {
        assert_eq!(src.len(), shape.width, "row width");
        assert_eq!(dst.len(), self.row_bytes(shape), "row bytes");
        match self {
            Self::Bf16 => {
                for (d, &x) in dst.chunks_exact_mut(2).zip(src) {
                    d.copy_from_slice(&bf16::from_f32(x).to_le_bytes());
                }
            }
            Self::F16 => {
                for (d, &x) in dst.chunks_exact_mut(2).zip(src) {
                    d.copy_from_slice(&f16::from_f32(x).to_le_bytes());
                }
            }
            Self::Fp8E4m3 | Self::Int8 => {
                let main = shape.main();
                let n_scales = self.scales(main);
                let (q, rest) = dst.split_at_mut(main);
                let (sc, tail) = rest.split_at_mut(4 * n_scales);
                if self == Self::Fp8E4m3 {
                    for (t, (qt, xs)) in q.chunks_mut(FP8_TILE).zip(src[..main].chunks(FP8_TILE)).enumerate() {
                        let s = fp8_tile_scale(xs);
                        sc[4 * t..4 * t + 4].copy_from_slice(&s.to_le_bytes());
                        let inv = 1.0 / s; // exact: s is a power of two
                        for (d, &x) in qt.iter_mut().zip(xs) {
                            *d = f32_to_e4m3(x * inv);
                        }
                    }
                } else if main > 0 {
                    let amax = src[..main].iter().fold(0f32, |m, x| m.max(x.abs()));
                    let s = if amax > 0.0 && amax.is_finite() { amax / 127.0 } else { 1.0 };
                    sc[..4].copy_from_slice(&s.to_le_bytes());
                    for (d, &x) in q.iter_mut().zip(&src[..main]) {
                        *d = ((x / s).round_ties_even().clamp(-127.0, 127.0) as i8) as u8;
                    }
                }
                for (d, &x) in tail.chunks_exact_mut(2).zip(&src[main..]) {
                    d.copy_from_slice(&bf16::from_f32(x).to_le_bytes());
                }
            }
        }
    }

    /// Decode one row from `src` (`row_bytes` long) into `dst` (`shape.width` long).
    pub fn decode_row(self, shape: RowShape, src: &[u8], dst: &mut [f32]) {
        assert_eq!(dst.len(), shape.width, "row width");
        assert_eq!(src.len(), self.row_bytes(shape), "row bytes");
        match self {
            Self::Bf16 => {
                for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
                    *d = bf16::from_le_bytes([s[0], s[1]]).to_f32();
                }
            }
            Self::F16 => {
                for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
                    *d = f16::from_le_bytes([s[0], s[1]]).to_f32();
                }
            }
            Self::Fp8E4m3 | Self::Int8 => {
                let main = shape.main();
                let n_scales = self.scales(main);
                let (q, rest) = src.split_at(main);
                let (sc, tail) = rest.split_at(4 * n_scales);
                let scale = |t: usize| f32::from_le_bytes([sc[4 * t], sc[4 * t + 1], sc[4 * t + 2], sc[4 * t + 3]]);
                if self == Self::Fp8E4m3 {
                    let lut = fp8_lut();
                    for (t, (qt, ds)) in q.chunks(FP8_TILE).zip(dst[..main].chunks_mut(FP8_TILE)).enumerate() {
                        let s = scale(t);
                        for (d, &b) in ds.iter_mut().zip(qt) {
                            *d = lut[b as usize] * s;
                        }
                    }
                } else if main > 0 {
                    let s = scale(0);
                    for (d, &b) in dst[..main].iter_mut().zip(q) {
                        *d = (b as i8) as f32 * s;
                    }
                }
                for (d, s) in dst[main..].iter_mut().zip(tail.chunks_exact(2)) {
                    *d = bf16::from_le_bytes([s[0], s[1]]).to_f32();
                }
            }
        }
    }
}

/// The power-of-two scale of an fp8 tile: the smallest `2^k` with `amax / 2^k ≤ 448`.
pub fn fp8_tile_scale(xs: &[f32]) -> f32 {
    let amax = xs.iter().fold(0f32, |m, x| if x.is_finite() { m.max(x.abs()) } else { m });
    if amax == 0.0 {
        return 1.0;
    }
    let mut k = (amax / FP8_MAX).log2().ceil() as i32;
    // Guard the log2 rounding at exact powers of two.
    while amax / 2f32.powi(k) > FP8_MAX {
        k += 1;
    }
    while k > -126 && amax / 2f32.powi(k - 1) <= FP8_MAX {
        k -= 1;
    }
    2f32.powi(k.clamp(-126, 127))
}

/// Round an f32 to e4m3fn (round to nearest, ties to even; saturating at ±448; NaN → NaN).
pub fn f32_to_e4m3(v: f32) -> u8 {
    let sign = if v.is_sign_negative() { 0x80u8 } else { 0 };
    let a = v.abs();
    if a.is_nan() {
        return sign | 0x7f;
    }
    let a = a.min(FP8_MAX);
    if a < 2f32.powi(-6) {
        // Subnormal: multiples of 2^-9; m == 8 rounds up into the smallest normal (0x08).
        return sign | (a * 512.0).round_ties_even() as u8;
    }
    let bits = a.to_bits();
    let mut e = ((bits >> 23) & 0xff) as i32 - 127;
    let mant = bits & 0x7f_ffff;
    let mut m = mant >> 20;
    let rem = mant & 0xf_ffff;
    if rem > 0x8_0000 || (rem == 0x8_0000 && m & 1 == 1) {
        m += 1;
        if m == 8 {
            m = 0;
            e += 1;
        }
    }
    let be = e + 7;
    if be > 15 || (be == 15 && m == 7) {
        return sign | 0x7e;
    }
    sign | ((be as u8) << 3) | m as u8
}

/// Decode one e4m3fn byte.
pub fn e4m3_to_f32(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
    let e = ((b >> 3) & 0xf) as i32;
    let m = (b & 7) as f32;
    if e == 15 && b & 7 == 7 {
        return f32::NAN;
    }
    if e == 0 { sign * m * 2f32.powi(-9) } else { sign * (1.0 + m / 8.0) * 2f32.powi(e - 7) }
}

/// The 256-entry e4m3fn decode table.
pub fn fp8_lut() -> &'static [f32; 256] {
    static LUT: std::sync::OnceLock<[f32; 256]> = std::sync::OnceLock::new();
    LUT.get_or_init(|| std::array::from_fn(|i| e4m3_to_f32(i as u8)))
}

/// The index of the first value of `v` that is NaN or infinite. Scans blocks branch-free (the
/// compiler turns a block into SIMD compares) and looks inside a block only when it holds one:
/// a query or an output of millions of values is checked at memory speed.
pub fn first_non_finite_f32(v: &[f32]) -> Option<usize> {
    first_bad(v, |x| x.to_bits() & 0x7f80_0000 == 0x7f80_0000)
}

/// [`first_non_finite_f32`] over bf16 values as they travel (two little-endian bytes each; an
/// odd trailing byte is ignored): a bf16 is finite unless its exponent bits are all ones.
pub fn first_non_finite_bf16(b: &[u8]) -> Option<usize> {
    let bad = |c: &[u8]| c[1] & 0x7f == 0x7f && c[0] & 0x80 == 0x80;
    // Four values per 64-bit word: a lane is bad when its exponent bits, masked and flipped,
    // are all zero; "some 16-bit lane is zero" is the exact borrow test below.
    const EXP: u64 = 0x7f80_7f80_7f80_7f80;
    const BLOCK: usize = 256;
    for (i, blk) in b.chunks(BLOCK).enumerate() {
        let any = blk.chunks_exact(8).fold(false, |acc, w| {
            let x = (u64::from_le_bytes(w.try_into().expect("8 bytes")) & EXP) ^ EXP;
            acc | (x.wrapping_sub(0x0001_0001_0001_0001) & !x & 0x8000_8000_8000_8000 != 0)
        });
        let tail = blk.len() / 8 * 8;
        if any || blk[tail..].chunks_exact(2).any(bad) {
            return blk.chunks_exact(2).position(bad).map(|j| i * BLOCK / 2 + j);
        }
    }
    None
}

fn first_bad<T: Copy>(v: &[T], bad: impl Fn(T) -> bool + Copy) -> Option<usize> {
    const BLOCK: usize = 128;
    for (i, blk) in v.chunks(BLOCK).enumerate() {
        if blk.iter().fold(false, |acc, &x| acc | bad(x)) {
            return blk.iter().position(|&x| bad(x)).map(|j| i * BLOCK + j);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    #[test]
    fn non_finite_values_are_found_at_their_index_in_f32_and_bf16() {
        use super::{first_non_finite_bf16, first_non_finite_f32};
        let n = 1000;
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            for at in [0, 1, 127, 128, 500, n - 1] {
                let mut v: Vec<f32> = (0..n).map(|i| (i as f32 - 300.0) * 1e30).collect();
                assert_eq!(first_non_finite_f32(&v), None);
                v[at] = bad;
                assert_eq!(first_non_finite_f32(&v), Some(at), "{bad} at {at}");
                let b: Vec<u8> = v.iter().flat_map(|x| half::bf16::from_f32(*x).to_le_bytes()).collect();
                assert_eq!(first_non_finite_bf16(&b), Some(at), "bf16 {bad} at {at}");
            }
        }
        // Odd counts (a tail shorter than a word) and every lane of a word.
        for len in [1usize, 3, 5, 7, 129] {
            for at in 0..len {
                let mut b: Vec<u8> = (0..len).flat_map(|i| half::bf16::from_f32(i as f32).to_le_bytes()).collect();
                b[2 * at..2 * at + 2].copy_from_slice(&half::bf16::NAN.to_le_bytes());
                assert_eq!(first_non_finite_bf16(&b), Some(at), "{len} values, NaN at {at}");
            }
        }
        // The largest finite values are finite; subnormals and zeros too.
        let v = [f32::MAX, -f32::MAX, f32::MIN_POSITIVE / 4.0, -0.0];
        assert_eq!(first_non_finite_f32(&v), None);
        let b: Vec<u8> = [0x7f7fu16, 0xff7f, 0x0001, 0x8000].iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(first_non_finite_bf16(&b), None);
    }

    use super::*;
    use proptest::prelude::*;

    const GQA: RowShape = RowShape { width: 128, tail: 0 };
    const MLA: RowShape = RowShape { width: 576, tail: 64 };

    fn round_trip(c: Codec, shape: RowShape, xs: &[f32]) -> Vec<f32> {
        let mut enc = vec![0u8; c.row_bytes(shape)];
        c.encode_row(shape, xs, &mut enc);
        let mut out = vec![0f32; shape.width];
        c.decode_row(shape, &enc, &mut out);
        out
    }

    #[test]
    fn fp8_table_has_the_e4m3fn_extremes() {
        assert_eq!(e4m3_to_f32(0x7e), 448.0);
        assert_eq!(e4m3_to_f32(0x01), 2f32.powi(-9));
        assert_eq!(e4m3_to_f32(0x08), 2f32.powi(-6));
        assert!(e4m3_to_f32(0x7f).is_nan());
        for b in 0..=255u8 {
            let x = e4m3_to_f32(b);
            if !x.is_nan() {
                assert_eq!(e4m3_to_f32(f32_to_e4m3(x)), x, "byte {b:#x}");
            }
        }
    }

    #[test]
    fn row_bytes_of_real_shapes() {
        assert_eq!(Codec::Bf16.row_bytes(MLA), 1152);
        assert_eq!(Codec::Fp8E4m3.row_bytes(MLA), 656);
        assert_eq!(Codec::Int8.row_bytes(MLA), 512 + 4 + 128);
        assert_eq!(Codec::Fp8E4m3.row_bytes(GQA), 132);
        assert_eq!(Codec::Int8.row_bytes(GQA), 132);
    }

    proptest! {
        #[test]
        fn bf16_and_f16_round_trip_their_own_values_exactly(bits in proptest::collection::vec(any::<u16>(), 128)) {
            let b: Vec<f32> = bits.iter().map(|&x| bf16::from_bits(x).to_f32()).filter(|x| x.is_finite()).collect();
            let shape = RowShape { width: b.len(), tail: 0 };
            let rb = round_trip(Codec::Bf16, shape, &b);
            prop_assert!(b.iter().zip(&rb).all(|(x, y)| x.to_bits() == y.to_bits()));
            let h: Vec<f32> = bits.iter().map(|&x| f16::from_bits(x).to_f32()).filter(|x| x.is_finite()).collect();
            let shape = RowShape { width: h.len(), tail: 0 };
            let rh = round_trip(Codec::F16, shape, &h);
            prop_assert!(h.iter().zip(&rh).all(|(x, y)| x.to_bits() == y.to_bits()));
        }

        #[test]
        fn fp8_error_is_within_its_bound(xs in proptest::collection::vec(-1e4f32..1e4, 576), mag in -20i32..20) {
            let xs: Vec<f32> = xs.iter().map(|x| x * 2f32.powi(mag)).collect();
            let out = round_trip(Codec::Fp8E4m3, MLA, &xs);
            for (t, tile) in xs[..512].chunks(FP8_TILE).enumerate() {
                let s = fp8_tile_scale(tile);
                for (i, &x) in tile.iter().enumerate() {
                    let y = out[t * FP8_TILE + i];
                    prop_assert!((y - x).abs() <= x.abs() / 16.0 + s / 1024.0, "x={x} y={y} s={s}");
                }
            }
            for (x, y) in xs[512..].iter().zip(&out[512..]) {
                prop_assert_eq!(*y, bf16::from_f32(*x).to_f32());
            }
        }

        #[test]
        fn int8_error_is_within_its_bound(xs in proptest::collection::vec(-1e3f32..1e3, 128)) {
            let out = round_trip(Codec::Int8, GQA, &xs);
            let amax = xs.iter().fold(0f32, |m, x| m.max(x.abs()));
            for (x, y) in xs.iter().zip(&out) {
                prop_assert!((y - x).abs() <= amax / 254.0 * 1.0001 + f32::EPSILON, "x={x} y={y}");
            }
        }
    }
}
