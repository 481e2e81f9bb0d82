//! Content addressing: the key of a full page is a chained SHA-256 over the token ids of every
//! page up to and including it, seeded with the namespace's secret seed:
//!
//! ```text
//! k_0 = SHA-256("kvcache/page/v1" ‖ seed ‖ 0³² ‖ tokens of page 0)
//! k_i = SHA-256("kvcache/page/v1" ‖ seed ‖ k_{i-1} ‖ tokens of page i)      (integers LE)
//! ```
//!
//! Two requests whose prompts share their first `n` full pages share `k_0..k_{n-1}` and so the
//! pages themselves: a full page is stored once per cluster (plus replicas) under
//! `(namespace, layer, key)`, however many sequences use it. SHA-256 because a collision would
//! serve one prompt's KV to another (wrong bytes and a data leak), and a 64-bit or
//! non-cryptographic hash can be steered into one (vLLM moved to SHA-256 for exactly that).
//!
//! Engines that compute their own page keys use theirs ([`ContentKey::from_engine_key`]):
//! SGLang's 64-hex-digit SHA-256 page keys map to the same 32 bytes; any other string is hashed
//! into a key. Namespaces never share pages, whatever the key.
//!
//! In the store and on the wire a content page is a page of the reserved sequence id
//! `#<base64url of the key>` ([`ContentKey::sequence_id`]), page index 0, one page per layer: so
//! placement (rendezvous over that id = over the key), replication, handoff, leases, recovery and
//! the zero-copy read and write paths are those of every page, and all layers of one key live
//! together on the same owners.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};

/// Domain separation of the chain hash (a new chain format gets a new tag).
const CHAIN_TAG: &[u8] = b"kvcache/page/v1";
/// Domain separation of engine keys that are not already 32-byte hex digests.
const ENGINE_TAG: &[u8] = b"kvcache/engine-key/v1";
/// First byte of every content page's sequence id; refused in user sequence ids.
pub const CONTENT_ID_PREFIX: char = '#';
/// Length of a content sequence id: the prefix and 43 base64url characters.
pub const CONTENT_ID_LEN: usize = 44;

/// The 256-bit key of a full page's content (and of its whole prefix).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ContentKey(pub [u8; 32]);

impl std::fmt::Debug for ContentKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ContentKey({})", self.hex())
    }
}

impl std::fmt::Display for ContentKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.hex())
    }
}

impl ContentKey {
    /// The key of the page after `prev` (`None` for the first page) holding `tokens`.
    pub fn chain(seed: u64, prev: Option<&ContentKey>, tokens: &[u32]) -> ContentKey {
        let mut h = Sha256::new();
        h.update(CHAIN_TAG);
        h.update(seed.to_le_bytes());
        h.update(prev.map_or([0u8; 32], |k| k.0));
        // Hash the ids in blocks so a long page is one update per 256 tokens, not per token.
        let mut buf = [0u8; 1024];
        for block in tokens.chunks(256) {
            for (i, t) in block.iter().enumerate() {
                buf[4 * i..4 * i + 4].copy_from_slice(&t.to_le_bytes());
            }
            h.update(&buf[..4 * block.len()]);
        }
        ContentKey(h.finalize().into())
    }

    /// The keys of every full page of `tokens` (a trailing partial page has none).
    pub fn chain_all(seed: u64, tokens: &[u32], page_tokens: usize) -> Vec<ContentKey> {
        let mut prev: Option<ContentKey> = None;
        tokens
            .chunks_exact(page_tokens.max(1))
            .map(|page| {
                let k = ContentKey::chain(seed, prev.as_ref(), page);
                prev = Some(k);
                k
            })
            .collect()
    }

    /// An engine's own page key: a 64-hex-digit SHA-256 digest (SGLang's page keys) is used as
    /// is; any other string is hashed (domain-separated) into a key.
    pub fn from_engine_key(key: &str) -> ContentKey {
        if let Some(k) = Self::from_hex(key) {
            return k;
        }
        let mut h = Sha256::new();
        h.update(ENGINE_TAG);
        h.update(key.as_bytes());
        ContentKey(h.finalize().into())
    }

    /// Parse 64 hex digits.
    pub fn from_hex(s: &str) -> Option<ContentKey> {
        let b = s.as_bytes();
        if b.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, pair) in b.chunks_exact(2).enumerate() {
            let hi = (pair[0] as char).to_digit(16)?;
            let lo = (pair[1] as char).to_digit(16)?;
            out[i] = (hi * 16 + lo) as u8;
        }
        Some(ContentKey(out))
    }

    /// 64 lowercase hex digits.
    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// From raw wire bytes (exactly 32).
    pub fn from_bytes(b: &[u8]) -> Option<ContentKey> {
        b.try_into().ok().map(ContentKey)
    }

    /// The reserved sequence id its pages are stored under: `#` + 43 base64url characters.
    pub fn sequence_id(&self) -> String {
        let mut s = String::with_capacity(CONTENT_ID_LEN);
        s.push(CONTENT_ID_PREFIX);
        URL_SAFE_NO_PAD.encode_string(self.0, &mut s);
        s
    }

    /// Write [`sequence_id`](Self::sequence_id) into `out` (cleared first), reusing its buffer.
    pub fn write_sequence_id(&self, out: &mut String) {
        out.clear();
        out.push(CONTENT_ID_PREFIX);
        URL_SAFE_NO_PAD.encode_string(self.0, out);
    }

    /// The placement hash of this key's content sequence in namespace `ns` (what
    /// `SequenceKey::content(ns, key).placement_hash()` is, without building the key).
    pub fn placement_hash(&self, ns: &str) -> u64 {
        let mut id = [0u8; CONTENT_ID_LEN];
        id[0] = CONTENT_ID_PREFIX as u8;
        let n = URL_SAFE_NO_PAD.encode_slice(self.0, &mut id[1..]).expect("43 bytes fit");
        crate::key::placement_hash(ns, &id[..1 + n])
    }

    /// The key a content sequence id names; `None` for any other id.
    pub fn from_sequence_id(id: &str) -> Option<ContentKey> {
        let rest = id.strip_prefix(CONTENT_ID_PREFIX)?;
        if rest.len() != CONTENT_ID_LEN - 1 {
            return None;
        }
        let mut out = [0u8; 32];
        match URL_SAFE_NO_PAD.decode_slice(rest, &mut out) {
            Ok(32) => Some(ContentKey(out)),
            _ => None,
        }
    }
}

/// Whether a sequence id is in the reserved content form (it may still be malformed).
pub fn is_content_id(id: &str) -> bool {
    id.starts_with(CONTENT_ID_PREFIX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shared_prefix_shares_keys_until_it_diverges() {
        let a: Vec<u32> = (0..256).collect();
        let mut b = a.clone();
        b[130] = 9999;
        let ka = ContentKey::chain_all(7, &a, 64);
        let kb = ContentKey::chain_all(7, &b, 64);
        assert_eq!(ka.len(), 4);
        assert_eq!(ka[..2], kb[..2]);
        assert_ne!(ka[2], kb[2]);
        assert_ne!(ka[3], kb[3], "the chain carries the divergence forward");
        assert_eq!(ContentKey::chain_all(7, &a[..100], 64).len(), 1, "a partial page has no key");
    }

    #[test]
    fn seeds_and_positions_separate_equal_pages() {
        let a: Vec<u32> = (0..128).collect();
        let s1 = ContentKey::chain_all(1, &a, 64);
        let s2 = ContentKey::chain_all(2, &a, 64);
        assert!(s1.iter().zip(&s2).all(|(x, y)| x != y));
        // The same 64 tokens as a first page and after another page are different pages.
        let twice: Vec<u32> = a[..64].iter().chain(&a[..64]).copied().collect();
        let k = ContentKey::chain_all(1, &twice, 64);
        assert_ne!(k[0], k[1]);
    }

    #[test]
    fn matches_a_sha256_computed_independently() {
        // The chain format is exactly what the module comment says (the Python client computes
        // the same bytes with hashlib).
        let k = ContentKey::chain(5, None, &[1, 2]);
        let mut msg = b"kvcache/page/v1".to_vec();
        msg.extend(5u64.to_le_bytes());
        msg.extend([0u8; 32]);
        msg.extend(1u32.to_le_bytes());
        msg.extend(2u32.to_le_bytes());
        assert_eq!(k.0, <[u8; 32]>::from(Sha256::digest(&msg)));
    }

    #[test]
    fn sequence_ids_round_trip_and_refuse_anything_else() {
        let k = ContentKey::chain(3, None, &[42; 64]);
        let id = k.sequence_id();
        assert_eq!(id.len(), CONTENT_ID_LEN);
        assert_eq!(ContentKey::from_sequence_id(&id), Some(k));
        assert!(is_content_id(&id));
        assert_eq!(k.placement_hash("ns.a"), crate::SequenceKey::content("ns.a", &k).placement_hash());
        for bad in ["#", "#abc", "plain", &id[1..], &format!("{id}A"), &format!("#{}", "!".repeat(43))] {
            assert_eq!(ContentKey::from_sequence_id(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn engine_keys_in_hex_are_used_as_is() {
        let k = ContentKey::chain(9, None, &[1; 64]);
        assert_eq!(ContentKey::from_engine_key(&k.hex()), k);
        assert_eq!(ContentKey::from_engine_key(&k.hex().to_uppercase()), k);
        let other = ContentKey::from_engine_key("vllm-block-17");
        assert_eq!(other, ContentKey::from_engine_key("vllm-block-17"));
        assert_ne!(other, ContentKey::from_engine_key("vllm-block-18"));
        assert_eq!(ContentKey::from_hex("zz"), None);
    }
}
