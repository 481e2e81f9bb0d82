//! The self-describing page header: 128 bytes in front of every stored payload, so a node can
//! rebuild its index from its pool files alone and never serves a page it cannot verify.
//!
//! ```text
//! off  len  field
//!   0    4  magic "KVCP"
//!   4    2  format version (1)
//!   6    1  codec tag (1 bf16, 2 f16, 3 fp8-e4m3, 4 int8)
//!   7    1  flags (0)
//!   8    8  namespace id (xxh3 of the name)
//!  16    4  layer
//!  20    4  page index
//!  24    4  token count
//!  28    4  payload length
//!  32    8  write sequence number (newest wins on recovery)
//!  40    8  prefix hash (0 = none)
//!  48    1  sequence id length (≤ 64)
//!  49    7  reserved, zero
//!  56   64  sequence id (UTF-8, zero padded)
//! 120    4  CRC-32C of the payload
//! 124    4  CRC-32C of bytes 0..124 (so the header covers the payload CRC too)
//! ```
//! All integers little-endian.

use crate::codec::Codec;
use crate::key::MAX_SEQUENCE_ID_BYTES;

/// Encoded header size.
pub const HEADER_BYTES: usize = 128;
/// Magic bytes.
pub const MAGIC: [u8; 4] = *b"KVCP";
/// Current format version.
pub const VERSION: u16 = 1;

/// Why a header or page failed verification.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PageError {
    /// Fewer bytes than a header.
    #[error("truncated page: {got} bytes, a header needs {HEADER_BYTES}")]
    Truncated {
        /// Bytes available.
        got: usize,
    },
    /// Not a page header.
    #[error("bad magic {0:02x?}, expected \"KVCP\"")]
    BadMagic([u8; 4]),
    /// A version this build does not read.
    #[error("unsupported page format version {0}, this build reads {VERSION}")]
    UnsupportedVersion(u16),
    /// Header CRC mismatch.
    #[error("header checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    HeaderChecksum {
        /// Stored CRC.
        stored: u32,
        /// Computed CRC.
        computed: u32,
    },
    /// Unknown codec tag.
    #[error("unknown codec tag {0}")]
    UnknownCodec(u8),
    /// Sequence id length or encoding invalid.
    #[error("invalid sequence id in header")]
    BadSequenceId,
    /// Payload length disagrees with the header.
    #[error("payload is {got} bytes, header says {expected}")]
    PayloadLength {
        /// Actual.
        got: usize,
        /// From the header.
        expected: usize,
    },
    /// Payload CRC mismatch.
    #[error("payload checksum mismatch: header {stored:#010x}, payload {computed:#010x}")]
    PayloadChecksum {
        /// Stored CRC.
        stored: u32,
        /// Computed CRC.
        computed: u32,
    },
}

/// A decoded, header-verified page header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageHeader {
    /// Codec of the payload.
    pub codec: Codec,
    /// Namespace id ([`crate::key::namespace_id`]).
    pub namespace_id: u64,
    /// Sequence id.
    pub sequence_id: String,
    /// Layer.
    pub layer: u32,
    /// Page index.
    pub page_index: u32,
    /// Tokens in the payload.
    pub token_count: u32,
    /// Payload bytes.
    pub payload_len: u32,
    /// Write sequence number.
    pub write_seq: u64,
    /// Prefix hash (0 = none).
    pub prefix_hash: u64,
    /// CRC-32C of the payload.
    pub payload_crc: u32,
}

impl PageHeader {
    /// Encode. Panics if the sequence id is longer than 64 bytes (validated keys never are).
    pub fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut b = [0u8; HEADER_BYTES];
        let id = self.sequence_id.as_bytes();
        assert!(id.len() <= MAX_SEQUENCE_ID_BYTES, "sequence id over {MAX_SEQUENCE_ID_BYTES} bytes");
        b[0..4].copy_from_slice(&MAGIC);
        b[4..6].copy_from_slice(&VERSION.to_le_bytes());
        b[6] = self.codec.tag();
        b[8..16].copy_from_slice(&self.namespace_id.to_le_bytes());
        b[16..20].copy_from_slice(&self.layer.to_le_bytes());
        b[20..24].copy_from_slice(&self.page_index.to_le_bytes());
        b[24..28].copy_from_slice(&self.token_count.to_le_bytes());
        b[28..32].copy_from_slice(&self.payload_len.to_le_bytes());
        b[32..40].copy_from_slice(&self.write_seq.to_le_bytes());
        b[40..48].copy_from_slice(&self.prefix_hash.to_le_bytes());
        b[48] = id.len() as u8;
        b[56..56 + id.len()].copy_from_slice(id);
        b[120..124].copy_from_slice(&self.payload_crc.to_le_bytes());
        let crc = crate::checksum::crc32c(&b[..124]);
        b[124..128].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decode and verify a header (not the payload). Never panics, whatever the bytes.
    pub fn decode(b: &[u8]) -> Result<PageHeader, PageError> {
        if b.len() < HEADER_BYTES {
            return Err(PageError::Truncated { got: b.len() });
        }
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        let magic = [b[0], b[1], b[2], b[3]];
        if magic != MAGIC {
            return Err(PageError::BadMagic(magic));
        }
        let stored = u32_at(124);
        let computed = crate::checksum::crc32c(&b[..124]);
        if stored != computed {
            return Err(PageError::HeaderChecksum { stored, computed });
        }
        let version = u16::from_le_bytes([b[4], b[5]]);
        if version != VERSION {
            return Err(PageError::UnsupportedVersion(version));
        }
        let codec = Codec::from_tag(b[6]).ok_or(PageError::UnknownCodec(b[6]))?;
        let id_len = b[48] as usize;
        if id_len > MAX_SEQUENCE_ID_BYTES {
            return Err(PageError::BadSequenceId);
        }
        let sequence_id = std::str::from_utf8(&b[56..56 + id_len]).map_err(|_| PageError::BadSequenceId)?.to_owned();
        Ok(PageHeader {
            codec,
            namespace_id: u64_at(8),
            sequence_id,
            layer: u32_at(16),
            page_index: u32_at(20),
            token_count: u32_at(24),
            payload_len: u32_at(28),
            write_seq: u64_at(32),
            prefix_hash: u64_at(40),
            payload_crc: u32_at(120),
        })
    }

    /// Verify `payload` against this header: length and CRC-32C.
    pub fn verify_payload(&self, payload: &[u8]) -> Result<(), PageError> {
        if payload.len() != self.payload_len as usize {
            return Err(PageError::PayloadLength { got: payload.len(), expected: self.payload_len as usize });
        }
        let computed = crate::checksum::crc32c(payload);
        if computed != self.payload_crc {
            return Err(PageError::PayloadChecksum { stored: self.payload_crc, computed });
        }
        Ok(())
    }
}

/// Decode a header and verify the payload that follows it in `page` (header + payload).
pub fn decode_page(page: &[u8]) -> Result<(PageHeader, &[u8]), PageError> {
    let h = PageHeader::decode(page)?;
    let end = HEADER_BYTES.checked_add(h.payload_len as usize).filter(|&e| e <= page.len()).ok_or(
        PageError::PayloadLength { got: page.len().saturating_sub(HEADER_BYTES), expected: h.payload_len as usize },
    )?;
    let payload = &page[HEADER_BYTES..end];
    h.verify_payload(payload)?;
    Ok((h, payload))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample(payload: &[u8]) -> PageHeader {
        PageHeader {
            codec: Codec::Fp8E4m3,
            namespace_id: 0x1234_5678_9abc_def0,
            sequence_id: "req-42".into(),
            layer: 60,
            page_index: 7,
            token_count: 3,
            payload_len: payload.len() as u32,
            write_seq: 99,
            prefix_hash: 0xfeed,
            payload_crc: crate::checksum::crc32c(payload),
        }
    }

    #[test]
    fn header_round_trips() {
        let payload = vec![5u8; 300];
        let h = sample(&payload);
        let enc = h.encode();
        assert_eq!(PageHeader::decode(&enc).unwrap(), h);
        let mut page = enc.to_vec();
        page.extend_from_slice(&payload);
        let (h2, p2) = decode_page(&page).unwrap();
        assert_eq!(h2, h);
        assert_eq!(p2, &payload[..]);
    }

    #[test]
    fn truncated_page_is_rejected() {
        let payload = vec![1u8; 64];
        let mut page = sample(&payload).encode().to_vec();
        page.extend_from_slice(&payload);
        for cut in 0..page.len() {
            assert!(decode_page(&page[..cut]).is_err(), "cut at {cut}");
        }
    }

    proptest! {
        #[test]
        fn every_single_bit_flip_is_detected(payload in proptest::collection::vec(any::<u8>(), 1..512), bit in any::<proptest::sample::Index>()) {
            let mut page = sample(&payload).encode().to_vec();
            page.extend_from_slice(&payload);
            let i = bit.index(page.len() * 8);
            page[i / 8] ^= 1 << (i % 8);
            prop_assert!(decode_page(&page).is_err());
        }

        #[test]
        fn header_decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = PageHeader::decode(&bytes);
            let _ = decode_page(&bytes);
        }
    }
}
