//! DeepSeek sparse attention (DSA) layers: each sequence's indexer keys (its indexer layer, a
//! small key per token) are read whole — from the cache after the first step, the new token's
//! applied locally — and scored with the request's indexer query; the top `topk` tokens are
//! chosen and only their latent rows are read: from pages the worker already caches (the
//! prefix's content pages, the page the step appended to), the rest with one `GetRows` from the
//! owner, which cuts just those rows out of its pages. The rows are gathered into one compact
//! page the MLA kernel attends to. At 128K tokens a cold step reads 17 MB of indexer keys and
//! 2.4 MB of rows (2,048 × 1,152 bytes) instead of 151 MB of latents per layer.

use crate::decode::{Appended, Parsed};
use crate::{Fetched, SeqFailure, Worker};
use bytes::Bytes;
use kvcache_attention::hybrid::{indexer_scores_threads, top_k};
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
                let threads = self.cfg.threads;
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
                            // Scored where the pages are (the cache's buffers), not copied together.
                            let pages: Vec<&[u8]> = keys.pages.iter().map(|(b, _)| &b[..]).collect();
                            let mut scores = Vec::with_capacity(n);
                            indexer_scores_threads(&ix, &inputs.0, &inputs.1, &pages, &mut scores, threads)
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
                        let wanted = |i: usize| want.get(i).copied().unwrap_or(false);
                        let lat = me.fetch_layer_pages(&seq, layer, Some(&wanted), true).await?;
                        let m: usize = lat.pages.iter().map(|p| p.1).sum();
                        // An indexer layer is full attention: its pages start at page 0.
                        let ragged = lat.pages.iter().take(lat.pages.len().saturating_sub(1)).any(|p| p.1 != pt);
                        if m != n || lat.skip != 0 || ragged {
                            return Err(SeqFailure::Miss(format!(
                                "layer {layer} holds {m} latents but {n} indexer keys: recompute the sequence"
                            )));
                        }
                        // The chosen tokens in pages not here: their rows from the owner.
                        let mut remote = vec![false; lat.pages.len()];
                        for &i in &lat.unpulled {
                            remote[i] = true;
                        }
                        let far: Vec<u32> = chosen.iter().copied().filter(|t| remote[*t as usize / pt]).collect();
                        let rb = ns.layout().token_bytes();
                        let rows = match (&lat.from, far.is_empty()) {
                            (_, true) => Bytes::new(),
                            (None, false) => return Err(SeqFailure::Miss("no owner to read rows from".into())),
                            (Some(node), false) => me
                                .client
                                .get_rows_from(node, &seq, layer, far)
                                .await
                                .map_err(|e| SeqFailure::Miss(e.to_string()))?
                                .ok_or_else(|| SeqFailure::Miss(format!("rows of layer {layer} went missing")))?,
                        };
                        let mut packed = Vec::with_capacity(chosen.len() * rb);
                        let mut r = 0;
                        for &t in &chosen {
                            let (p, off) = (t as usize / pt, t as usize % pt);
                            if remote[p] {
                                packed.extend_from_slice(&rows[r * rb..(r + 1) * rb]);
                                r += 1;
                            } else {
                                let page = &lat.pages[p].0;
                                if page.len() < (off + 1) * rb {
                                    return Err(SeqFailure::Miss(format!("page {p} of layer {layer} is short")));
                                }
                                packed.extend_from_slice(&page[off * rb..(off + 1) * rb]);
                            }
                        }
                        Ok(Fetched {
                            pages: vec![(Bytes::from(packed), chosen.len())],
                            bytes: lat.bytes + kb + rows.len() as u64,
                            pulled: lat.pulled + kp,
                            cached: lat.cached + kc,
                            ..Default::default()
                        })
                    }
                    .in_current_span(),
                )
            })
            .collect();
        crate::decode::join_fetches(tasks).await
    }
}
