//! Recurrent states of linear-attention and Mamba2 layers as pages.
//!
//! One sequence keeps one state per state layer: `LayerKind::state_bytes` bytes (the f32
//! recurrent/SSM state, then the bf16 conv state), cut into full pages of the namespace's page
//! size (`Namespace::state_pages` of them, the last zero-padded) at page indices `0..k` of that
//! layer. A state is replaced whole: a writer puts all its pages, each stamped (in the page's
//! `prefix_hash` field) with the first 8 bytes (little-endian) of the SHA-256 of the whole state
//! (a hash every client language has). A reader joins the pages and checks the
//! stamp against what it joined, so a read that meets pages of two writes (a torn read while a
//! state is replaced) or damaged bytes is a miss, never a mixed state. A snapshot of the state at
//! the end of a content page is the same pages under that content key (immutable, like every
//! content page; equal states give equal pages).

use crate::Namespace;
use sha2::{Digest, Sha256};

/// The stamp of a state: the first 8 bytes of its SHA-256, little-endian, never 0 (0 is "no
/// hash" in a page header).
pub fn stamp(state: &[u8]) -> u64 {
    let d = Sha256::digest(state);
    u64::from_le_bytes(d[..8].try_into().expect("8 bytes")).max(1)
}

/// Why a state does not fit its layer, or its pages do not make one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    /// Not a state layer.
    #[error("layer {layer} is a {kind} layer, not a linear-attention or Mamba2 layer: it keeps no state")]
    NotState {
        /// The layer.
        layer: u32,
        /// Its kind.
        kind: &'static str,
    },
    /// A state of the wrong size.
    #[error("layer {layer}: a state is {expected} bytes, got {got}")]
    Size {
        /// The layer.
        layer: u32,
        /// Sent.
        got: usize,
        /// The layer's state size.
        expected: usize,
    },
    /// Pages that are not one whole state (missing, torn or damaged).
    #[error("layer {layer}: {why}")]
    Pages {
        /// The layer.
        layer: u32,
        /// What was wrong.
        why: String,
    },
}

fn state_size(ns: &Namespace, layer: u32) -> Result<usize, StateError> {
    let kind = ns.model.layer(layer);
    if !kind.keeps_state() || ns.is_indexer_layer(layer) || layer >= ns.model.num_layers {
        return Err(StateError::NotState { layer, kind: kind.as_str() });
    }
    Ok(kind.state_bytes())
}

/// Cut `state` into its pages' payloads (full pages, the last zero-padded) and its stamp.
pub fn split(ns: &Namespace, layer: u32, state: &[u8]) -> Result<(Vec<Vec<u8>>, u64), StateError> {
    let expected = state_size(ns, layer)?;
    if state.len() != expected {
        return Err(StateError::Size { layer, got: state.len(), expected });
    }
    let page = ns.layout().page_bytes();
    let pages = state
        .chunks(page)
        .map(|c| {
            let mut p = c.to_vec();
            p.resize(page, 0);
            p
        })
        .collect();
    Ok((pages, stamp(state)))
}

/// Join a state's pages (in page order, each with the stamp it carries) and check them.
pub fn join(ns: &Namespace, layer: u32, pages: &[(u64, &[u8])]) -> Result<Vec<u8>, StateError> {
    let size = state_size(ns, layer)?;
    let bad = |why: String| Err(StateError::Pages { layer, why });
    if pages.len() != ns.state_pages(layer) as usize {
        return bad(format!("{} pages, a state is {}", pages.len(), ns.state_pages(layer)));
    }
    let page = ns.layout().page_bytes();
    let mut state = Vec::with_capacity(pages.len() * page);
    for (i, (_, p)) in pages.iter().enumerate() {
        if p.len() != page {
            return bad(format!("state page {i} is {} bytes, not a full page of {page}", p.len()));
        }
        state.extend_from_slice(p);
    }
    if state[size..].iter().any(|b| *b != 0) {
        return bad("the padding after the state is not zero".into());
    }
    state.truncate(size);
    let want = stamp(&state);
    if let Some(i) = pages.iter().position(|(s, _)| *s != want) {
        return bad(format!("state page {i} is from another write (torn read or damaged state): a miss"));
    }
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::ModelSpec;
    use crate::{Codec, Namespace};

    fn ns() -> Namespace {
        Namespace {
            name: "t.q".into(),
            tenant: "t".into(),
            model: ModelSpec::preset("qwen3-next-80b-a3b").unwrap(),
            codec: Codec::Bf16,
            page_tokens: 64,
            replication: 1,
            prefix_seed: 1,
        }
    }

    #[test]
    fn a_state_round_trips_and_torn_or_damaged_pages_are_refused() {
        let ns = ns();
        // GDN state 2,146,304 bytes in 131,072-byte pages (2 KV heads × 256 × 2 B × 2 × 64).
        assert_eq!(ns.state_pages(0), 17);
        assert_eq!(ns.state_pages(3), 0, "layer 3 is full attention");
        let a: Vec<u8> = (0..2_146_304u32).map(|i| (i % 251) as u8).collect();
        let mut b = a.clone();
        b[5] ^= 1;
        let (pa, sa) = split(&ns, 0, &a).unwrap();
        let (pb, sb) = split(&ns, 0, &b).unwrap();
        assert_eq!(pa.len(), 17);
        let whole: Vec<(u64, &[u8])> = pa.iter().map(|p| (sa, &p[..])).collect();
        assert_eq!(join(&ns, 0, &whole).unwrap(), a);
        // Page 0 of the second write with the rest of the first: refused.
        let mut torn = whole.clone();
        torn[0] = (sb, &pb[0]);
        assert!(join(&ns, 0, &torn).unwrap_err().to_string().contains("another write"));
        // Damaged bytes under the right stamp: refused.
        let mut damaged = pa[3].clone();
        damaged[7] ^= 0x40;
        let mut d = whole.clone();
        d[3] = (sa, &damaged);
        assert!(join(&ns, 0, &d).is_err());
        assert!(join(&ns, 0, &whole[..16]).unwrap_err().to_string().contains("16 pages"));
        assert!(split(&ns, 0, &a[1..]).unwrap_err().to_string().contains("a state is 2146304 bytes"));
        assert!(split(&ns, 3, &a).unwrap_err().to_string().contains("layer 3 is a full layer"));
    }
}
