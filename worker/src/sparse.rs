//! DeepSeek sparse attention (DSA) layers: each sequence's indexer keys (its indexer layer, a
//! small key per token) are read whole — from the cache after the first step, the new token's
//! applied locally — and scored with the request's indexer query; the top `topk` tokens are
//! chosen, only the latent pages holding them are pulled, and their rows gathered into one
//! compact page the MLA kernel attends to. At 128K tokens a cold step reads 17 MB of indexer keys
//! and the pages holding the chosen tokens, instead of 151 MB of latents per layer; what that
//! saves depends on how the choice clusters (docs/BENCHMARKS.md measures it).

use crate::decode::{Appended, Parsed};
use crate::{Fetched, SeqFailure, Worker};
use bytes::Bytes;
use kvcache_attention::hybrid::{gather_rows, indexer_scores, top_k};
use kvcache_proto::v1 as pb;
use std::sync::Arc;
use tracing::Instrument;

impl Worker {
    /// Each sequence's chosen rows, as one page of `topk` tokens (or all, when fewer).
    pub(crate) async fn fetch_sparse(
        self: &Arc<Self>,
        p: &Parsed,
        items: &[pb::DecodeItem],
        appended: Appended,
        index_appended: Appended,
    ) -> Vec<Result<Fetched, SeqFailure>> {
        let layer = p.layer;
        let (Some(ix), Some(il)) = (p.ns.model.indexer, p.ns.indexer_layer(layer)) else {
            return items.iter().map(|_| Err(SeqFailure::Miss("not a sparse MLA namespace".into()))).collect();
        };
        let tasks: Vec<_> = appended
            .into_iter()
            .zip(index_appended)
            .zip(items)
            .enumerate()
            .map(|(i, ((acks, iacks), it))| {
                let (me, ns, seq, inputs) = (self.clone(), p.ns.clone(), p.seqs[i].clone(), p.index[i].clone());
                let (new_kv, new_key) = (it.new_kv.clone(), it.new_index_key.clone());
                tokio::spawn(
                    async move {
                        // The latent layer's cached last page follows the append; the indexer
                        // layer is served from the cache when its append names what it holds.
                        if let Some(acks) = acks {
                            let acks = acks.map_err(|e| SeqFailure::WriteFailed(e.to_string()))?;
                            me.apply_append(&ns, &seq, layer, &acks, &new_kv);
                        }
                        let mut keys = None;
                        if let Some(acks) = iacks {
                            let acks = acks.map_err(|e| SeqFailure::WriteFailed(e.to_string()))?;
                            me.apply_append(&ns, &seq, il, &acks, &new_key);
                            keys = me.cached_layer(&ns, &seq, il, &acks);
                        }
                        let keys = match keys {
                            Some(k) => k,
                            None => me.fetch_layer(&seq, il).await?,
                        };
                        let n: usize = keys.pages.iter().map(|p| p.1).sum();
                        // Score every token (off the runtime: O(context · heads · dim)).
                        let chosen = tokio::task::spawn_blocking(move || {
                            let mut flat = Vec::with_capacity(n * ix.bytes_per_token());
                            for (b, _) in &keys.pages {
                                flat.extend_from_slice(b);
                            }
                            let mut scores = Vec::with_capacity(n);
                            indexer_scores(&ix, &inputs.0, &inputs.1, &flat, &mut scores)
                                .map(|()| (top_k(&scores, ix.topk as usize), keys.bytes, keys.pulled, keys.cached))
                        })
                        .await
                        .map_err(|e| SeqFailure::Miss(format!("indexer task failed: {e}")))?
                        .map_err(|e| SeqFailure::BadData(format!("the stored indexer keys do not score: {e}")))?;
                        let (chosen, kb, kp, kc) = chosen;
                        let pt = ns.page_tokens as usize;
                        let mut want = vec![false; n.div_ceil(pt)];
                        for &t in &chosen {
                            want[t as usize / pt] = true;
                        }
                        let lat = me
                            .fetch_layer_pages(&seq, layer, Some(&|i: usize| want.get(i).copied().unwrap_or(false)))
                            .await?;
                        let m: usize = lat.pages.iter().map(|p| p.1).sum();
                        if m != n {
                            return Err(SeqFailure::Miss(format!(
                                "layer {layer} holds {m} latents but {n} indexer keys: recompute the sequence"
                            )));
                        }
                        let src: Vec<(&[u8], usize)> = lat.pages.iter().map(|(b, t)| (&b[..], *t)).collect();
                        let rows = gather_rows(&src, ns.layout().token_bytes(), &chosen)
                            .map_err(|e| SeqFailure::Miss(e.to_string()))?;
                        Ok(Fetched {
                            pages: vec![(Bytes::from(rows), chosen.len())],
                            skip: 0,
                            bytes: lat.bytes + kb,
                            pulled: lat.pulled + kp,
                            cached: lat.cached + kc,
                        })
                    }
                    .in_current_span(),
                )
            })
            .collect();
        let mut fetched = Vec::with_capacity(tasks.len());
        for t in tasks {
            fetched.push(t.await.unwrap_or_else(|e| Err(SeqFailure::Miss(format!("fetch task failed: {e}")))));
        }
        fetched
    }
}
