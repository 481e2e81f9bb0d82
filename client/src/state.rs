//! States of linear-attention and Mamba2 layers: one per sequence and layer, put and read whole
//! (`kvcache_core::state`: stamped full pages, a torn or damaged read is a miss), and snapshots
//! at page boundaries under content keys, from which a prefix hit restores a sequence's state.

use crate::*;
use kvcache_core::{ContentKey, state};

fn invalid(e: state::StateError) -> ClientError {
    ClientError::InvalidArgument(e.to_string())
}

/// The wire pages of `state` at `layer` of sequence `seq` (a content sequence for a snapshot).
fn state_pages(ns: &Namespace, seq: &SequenceKey, layer: u32, st: &[u8]) -> Result<Vec<pb::Page>, ClientError> {
    let (pages, stamp) = state::split(ns, layer, st).map_err(invalid)?;
    Ok(pages
        .into_iter()
        .enumerate()
        .map(|(i, p)| {
            let key = PageKey { sequence: seq.clone(), layer, page_index: i as u32 };
            wire_page(ns, &key, ns.page_tokens, stamp, Bytes::from(p))
        })
        .collect())
}

impl Client {
    /// Replace the state of `seq` at `layer` (a linear-attention or Mamba2 layer) on every owner:
    /// `st` is the layer's state bytes (f32 recurrent state, then bf16 conv state).
    pub async fn put_state(&self, seq: &SequenceKey, layer: u32, st: &[u8]) -> Result<(), ClientError> {
        let ns = self.namespace_of(seq)?;
        self.put_pages(state_pages(&ns, seq, layer, st)?).await
    }

    /// The state of `seq` at `layer`, or `None` (a miss: never stored, evicted, or a read that
    /// met a write in progress).
    pub async fn get_state(&self, seq: &SequenceKey, layer: u32) -> Result<Option<Vec<u8>>, ClientError> {
        let ns = self.namespace_of(seq)?;
        self.read_state(&ns, seq, layer).await
    }

    /// Store the snapshot of a state layer's state at the end of the content page `key`: what a
    /// request whose prompt matches up to that page restores instead of recomputing.
    pub async fn put_state_snapshot(
        &self,
        ns: &str,
        key: &ContentKey,
        layer: u32,
        st: &[u8],
    ) -> Result<ContentPut, ClientError> {
        let n = self.namespace(ns).ok_or_else(|| ClientError::NotFound(format!("namespace {ns:?}")))?;
        self.put_content(ns, state_pages(&n, &SequenceKey::content(ns, key), layer, st)?).await
    }

    /// The snapshot stored at content key `key` for `layer`, or `None`.
    pub async fn get_state_snapshot(
        &self,
        ns: &str,
        key: &ContentKey,
        layer: u32,
    ) -> Result<Option<Vec<u8>>, ClientError> {
        let n = self.namespace(ns).ok_or_else(|| ClientError::NotFound(format!("namespace {ns:?}")))?;
        self.read_state(&n, &SequenceKey::content(ns, key), layer).await
    }

    async fn read_state(&self, ns: &Namespace, seq: &SequenceKey, layer: u32) -> Result<Option<Vec<u8>>, ClientError> {
        let k = ns.state_pages(layer);
        if k == 0 {
            return Err(ClientError::InvalidArgument(
                state::StateError::NotState { layer, kind: ns.model.layer(layer).as_str() }.to_string(),
            ));
        }
        let keys: Vec<PageKey> = (0..k).map(|i| PageKey { sequence: seq.clone(), layer, page_index: i }).collect();
        let got = self.get_pages(&keys).await?;
        let Some(pages) = got.into_iter().collect::<Option<Vec<FetchedPage>>>() else { return Ok(None) };
        let parts: Vec<(u64, &[u8])> = pages.iter().map(|p| (p.prefix_hash, &p.payload[..])).collect();
        match state::join(ns, layer, &parts) {
            Ok(s) => Ok(Some(s)),
            Err(e) => {
                tracing::debug!(error = %e, sequence = %seq.sequence_id, "state read is not one whole state: a miss");
                Ok(None)
            }
        }
    }
}
