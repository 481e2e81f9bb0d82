//! kvcache-proto: the wire contract and nothing else.
//!
//! - [`v1`]: the generated prost messages and tonic clients/servers of `proto/kvcache/v1/*.proto`
//!   (`CacheNode`, `Coordinator`, `AttentionWorker`). Payload fields are [`bytes::Bytes`], so a
//!   decoded page payload is a slice of the receive buffer, not a copy.
//! - [`FILE_DESCRIPTOR_SET`]: the encoded descriptor set, served by gRPC reflection.
//! - [`metadata`]: names of the request metadata and trailers the contract defines.
//! - [`f32le`], [`bf16le`]: the contract's encodings of vectors (queries, outputs) as
//!   little-endian bytes (`DecodeRequest.vector_dtype` picks one for a decode call).
//!
//! Validation of these messages into domain types lives in `kvcache-core`, not here.

/// Generated code for package `kvcache.v1`.
#[allow(missing_docs, clippy::all)]
pub mod v1 {
    tonic::include_proto!("kvcache.v1");
}

/// Encoded `FileDescriptorSet` of every kvcache proto file, for `tonic-reflection`.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("kvcache_descriptor");

/// Metadata keys defined by the contract (see the header of `common.proto`).
pub mod metadata {
    /// Bearer token: `authorization: Bearer <token>`.
    pub const AUTHORIZATION: &str = "authorization";
    /// Tenant name on unauthenticated clusters.
    pub const TENANT: &str = "kvcache-tenant";
    /// Trailer of FAILED_PRECONDITION on a stale-epoch write: the node's current epoch.
    pub const EPOCH: &str = "kvcache-epoch";
    /// Trailer of a follower coordinator's UNAVAILABLE: the leader's address.
    pub const LEADER: &str = "kvcache-leader";
    /// Trailer of NOT_FOUND: what was not found ([`NOT_FOUND_NAMESPACE`], [`NOT_FOUND_SEQUENCE`]).
    pub const NOT_FOUND: &str = "kvcache-not-found";
    /// [`NOT_FOUND`] value: the namespace is unknown.
    pub const NOT_FOUND_NAMESPACE: &str = "namespace";
    /// [`NOT_FOUND`] value: the sequence is not held.
    pub const NOT_FOUND_SEQUENCE: &str = "sequence";

    /// A NOT_FOUND status whose trailer says what was not found.
    pub fn not_found(what: &'static str, message: impl Into<String>) -> tonic::Status {
        let mut s = tonic::Status::not_found(message);
        s.metadata_mut().insert(NOT_FOUND, tonic::metadata::MetadataValue::from_static(what));
        s
    }

    /// Whether `s` is NOT_FOUND for an unknown namespace.
    pub fn is_unknown_namespace(s: &tonic::Status) -> bool {
        s.code() == tonic::Code::NotFound && s.metadata().get(NOT_FOUND).is_some_and(|v| v == NOT_FOUND_NAMESPACE)
    }
}

/// f32 vectors on the wire (`DecodeItem.query`, `DecodeResult.output`): little-endian IEEE-754,
/// four bytes per value, no header.
pub mod f32le {
    use bytes::Bytes;

    /// Encode `v` as little-endian bytes.
    pub fn to_bytes(v: &[f32]) -> Bytes {
        let mut out = Vec::with_capacity(v.len() * 4);
        for x in v {
            out.extend_from_slice(&x.to_le_bytes());
        }
        Bytes::from(out)
    }

    /// Decode little-endian bytes into `out` (cleared first); `None` when the length is not a
    /// multiple of four.
    pub fn decode_into(b: &[u8], out: &mut Vec<f32>) -> Option<()> {
        if !b.len().is_multiple_of(4) {
            return None;
        }
        out.clear();
        out.extend(b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])));
        Some(())
    }

    /// Decode little-endian bytes; `None` when the length is not a multiple of four.
    pub fn from_bytes(b: &[u8]) -> Option<Vec<f32>> {
        let mut v = Vec::new();
        decode_into(b, &mut v).map(|()| v)
    }
}

/// Decode-call vectors as little-endian bfloat16 (`VECTOR_DTYPE_BF16`).
pub mod bf16le {
    use bytes::Bytes;

    /// `x` rounded to the nearest bf16, ties to even; a NaN stays a (quiet) NaN of its sign.
    /// Branch-free but for NaN, so that whole vectors compile to SIMD (the same answers as
    /// `half::bf16::from_f32`, checked in the tests).
    #[inline]
    pub fn round(x: f32) -> u16 {
        let b = x.to_bits();
        if b & 0x7fff_ffff > 0x7f80_0000 {
            return ((b >> 16) | 0x0040) as u16;
        }
        // Cannot overflow: the largest non-NaN pattern is 0xff80_0000 (−∞).
        ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
    }

    /// Encode `v` rounded to the nearest bf16 (ties to even; NaN stays NaN).
    pub fn to_bytes(v: &[f32]) -> Bytes {
        let mut out = vec![0u8; v.len() * 2];
        for (o, x) in out.chunks_exact_mut(2).zip(v) {
            o.copy_from_slice(&round(*x).to_le_bytes());
        }
        Bytes::from(out)
    }

    /// Decode into `out` (cleared first), each value widened exactly to f32; `None` when the
    /// length is odd.
    pub fn decode_into(b: &[u8], out: &mut Vec<f32>) -> Option<()> {
        if !b.len().is_multiple_of(2) {
            return None;
        }
        out.clear();
        out.resize(b.len() / 2, 0.0);
        for (o, c) in out.iter_mut().zip(b.chunks_exact(2)) {
            *o = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16);
        }
        Some(())
    }

    /// Decode; `None` when the length is odd.
    pub fn from_bytes(b: &[u8]) -> Option<Vec<f32>> {
        let mut v = Vec::new();
        decode_into(b, &mut v).map(|()| v)
    }
}

impl v1::VectorDtype {
    /// Bytes of one value.
    pub fn width(self) -> usize {
        match self {
            v1::VectorDtype::F32 => 4,
            v1::VectorDtype::Bf16 => 2,
        }
    }

    /// Encode `v` in this encoding.
    pub fn encode(self, v: &[f32]) -> bytes::Bytes {
        match self {
            v1::VectorDtype::F32 => f32le::to_bytes(v),
            v1::VectorDtype::Bf16 => bf16le::to_bytes(v),
        }
    }

    /// Decode; `None` when the length is no whole number of values.
    pub fn decode(self, b: &[u8]) -> Option<Vec<f32>> {
        match self {
            v1::VectorDtype::F32 => f32le::from_bytes(b),
            v1::VectorDtype::Bf16 => bf16le::from_bytes(b),
        }
    }
}

impl v1::DecodeItem {
    /// An item for `sequence_id` with `query` encoded as the contract's f32 bytes.
    pub fn with_query(sequence_id: impl Into<String>, query: &[f32]) -> Self {
        Self { sequence_id: sequence_id.into(), query: f32le::to_bytes(query), ..Default::default() }
    }
}

impl v1::DecodeResult {
    /// The output as f32 values (empty unless the status is OK). A length that is not a multiple
    /// of four is a malformed response and decodes as empty.
    pub fn output_f32(&self) -> Vec<f32> {
        f32le::from_bytes(&self.output).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::v1;
    use bytes::Bytes;
    use prost::Message;

    #[test]
    fn bf16_vectors_round_to_nearest_even_and_widen_exactly() {
        use super::{bf16le, v1::VectorDtype};
        // 1 + 2^-8 is halfway between two bf16 values: ties go to the even one (1.0); a hair
        // above rounds up; bf16 values and NaN survive; widening is exact.
        let v = [1.0 + 2f32.powi(-8), 1.0 + 2f32.powi(-8) + 2f32.powi(-20), -3.5, f32::NAN, 0.0];
        let b = bf16le::to_bytes(&v);
        assert_eq!(b.len(), 10);
        let w = bf16le::from_bytes(&b).unwrap();
        assert_eq!(w[0], 1.0);
        assert_eq!(w[1], 1.0 + 2f32.powi(-7));
        assert_eq!(w[2], -3.5);
        assert!(w[3].is_nan());
        assert_eq!(w[4], 0.0);
        assert!(bf16le::from_bytes(&b[1..]).is_none());
        assert_eq!(VectorDtype::Bf16.decode(&VectorDtype::Bf16.encode(&w)).unwrap()[2], -3.5);
        assert_eq!(VectorDtype::F32.encode(&v[..2]).len(), 2 * VectorDtype::F32.width());
    }

    #[test]
    fn bf16_rounding_agrees_with_half_on_every_class_of_value() {
        // Patterns around every rounding boundary, subnormals, the largest finite values (which
        // round to infinity), infinities and NaNs of both signs, and a sweep of the exponent range.
        let mut bits: Vec<u32> = vec![0, 0x8000_0000, 1, 0x7f7f_ffff, 0xff7f_ffff, 0x7f80_0000, 0xff80_0000];
        bits.extend([0x7f80_0001, 0x7fc0_0000, 0xffc0_1234, 0x7fff_ffff, 0x0000_8000, 0x0001_8000, 0x3f80_8000]);
        let mut x = 0x1234_5678u32;
        for _ in 0..200_000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            bits.push(x);
            bits.push((x & 0xffff_0000) | 0x8000);
            bits.push((x & 0xffff_0000) | 0x7fff);
        }
        for b in bits {
            let v = f32::from_bits(b);
            let ours = super::bf16le::round(v);
            let theirs = half::bf16::from_f32(v).to_bits();
            if v.is_nan() {
                assert!(half::bf16::from_bits(ours).is_nan() && ours >> 15 == theirs >> 15, "{b:#x}: {ours:#x}");
            } else {
                assert_eq!(ours, theirs, "{b:#x}");
            }
        }
    }

    #[test]
    fn page_payload_decodes_as_a_slice_of_the_buffer() {
        let page = v1::Page { payload: Bytes::from(vec![7u8; 4096]), token_count: 3, ..Default::default() };
        let buf = Bytes::from(page.encode_to_vec());
        let decoded = v1::Page::decode(buf.clone()).unwrap();
        assert_eq!(decoded.payload.len(), 4096);
        let start = buf.as_ptr() as usize;
        let p = decoded.payload.as_ptr() as usize;
        assert!(p >= start && p + 4096 <= start + buf.len(), "payload was copied");
    }

    #[test]
    fn f32_vectors_round_trip_as_little_endian_bytes() {
        let v = [0.0f32, -1.5, f32::MIN_POSITIVE, f32::MAX, f32::INFINITY, 1e-42];
        let b = super::f32le::to_bytes(&v);
        assert_eq!(b.len(), 24);
        assert_eq!(&b[4..8], &(-1.5f32).to_le_bytes());
        let back = super::f32le::from_bytes(&b).unwrap();
        assert_eq!(
            back.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            v.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
        assert!(super::f32le::from_bytes(&b[..23]).is_none());
        let r = v1::DecodeResult { output: b.slice(..23), ..Default::default() };
        assert!(r.output_f32().is_empty());
    }

    #[test]
    fn descriptor_set_names_every_service() {
        // Service names appear in the encoded descriptors as plain strings.
        let text = String::from_utf8_lossy(super::FILE_DESCRIPTOR_SET);
        for name in ["CacheNode", "Coordinator", "AttentionWorker", "kvcache.v1"] {
            assert!(text.contains(name), "{name} missing from descriptor set");
        }
    }
}
