//! Getting a layer's pages for a step: the append's answer applied to the cached last page,
//! the layer served from the page cache when the append's extent names exactly what it holds,
//! otherwise a Lookup at the owners and a pull of the pages not already cached (under a lease
//! when more than the last page is missing).

use crate::cache::CachedPage;
use crate::{Fetched, PULL_LEASE, SeqFailure, Worker};
use bytes::Bytes;
use kvcache_client::AppendAck;
use kvcache_core::{Namespace, PageKey, SequenceKey};
use std::sync::Arc;
use std::sync::atomic::Ordering;

impl Worker {
    /// Apply an acknowledged append to the cached copy of the layer's last page. With R > 1
    /// every owner acknowledges; the ack used is that of the owner the cached pages came from,
    /// so a layer's cached pages stay from one node.
    pub(crate) fn apply_append(
        &self,
        ns: &Namespace,
        seq: &SequenceKey,
        layer: u32,
        acks: &[AppendAck],
        new_kv: &Bytes,
    ) {
        let pt = ns.page_tokens as u64;
        let key = |i: u64| PageKey { sequence: seq.clone(), layer, page_index: i as u32 };
        let ack = acks
            .iter()
            .find(|a| {
                let tokens = a.layer_tokens.first().copied().unwrap_or(0);
                // The page the cache must already hold from this node: the last page's earlier
                // tokens, or the previous page when the token starts a new one.
                let held = if tokens <= 1 { None } else { Some((tokens - 2) / pt) };
                held.is_some_and(|i| self.cache.peek(&key(i)).is_some_and(|p| *p.node == *a.node_id))
            })
            .or(acks.first());
        let Some(ack) = ack else { return };
        let (Some(&tokens), Some(&ws)) = (ack.layer_tokens.first(), ack.last_page_write_seqs.first()) else {
            return;
        };
        if tokens == 0 {
            return;
        }
        let idx = (tokens - 1) / pt;
        let in_page = (tokens - idx * pt) as usize;
        let node: Arc<str> = ack.node_id.as_str().into();
        let bytes = if in_page == 1 {
            new_kv.clone()
        } else {
            let l = ns.layout();
            match self.cache.peek(&key(idx)) {
                // Lengths are checked here, not trusted: a cached page of the wrong size is
                // dropped and pulled again, never concatenated.
                Some(old)
                    if old.node == node
                        && old.tokens as usize == in_page - 1
                        && old.bytes.len() == l.payload_bytes(in_page - 1)
                        && new_kv.len() == l.payload_bytes(1) =>
                {
                    let mut merged = vec![0u8; l.payload_bytes(in_page)];
                    l.concat(&old.bytes, in_page - 1, new_kv, 1, &mut merged);
                    Bytes::from(merged)
                }
                _ => return,
            }
        };
        self.cache.insert(key(idx), CachedPage { node, write_seq: ws, tokens: in_page as u32, bytes });
    }

    /// The layer from the cache alone, when an owner's extent (from the append this step made)
    /// names exactly the pages the cache holds from that owner: the Lookup round trip is then
    /// redundant. Any page missing, stale or cached from another node: `None`, and the caller
    /// looks the layer up as usual.
    pub(crate) fn cached_layer(&self, seq: &SequenceKey, layer: u32, acks: &[AppendAck]) -> Option<Fetched> {
        let key = |i: usize| PageKey { sequence: seq.clone(), layer, page_index: i as u32 };
        // The owner the cached pages came from (with R > 1 every owner answers the append).
        let (node, ext) = acks.iter().find_map(|a| {
            let e = a.extent.as_ref().filter(|e| e.layer == layer && e.tokens > 0)?;
            self.cache.peek(&key(0)).is_some_and(|p| *p.node == *a.node_id).then_some((a.node_id.as_str(), e))
        })?;
        let pages = self.cache.whole_layer(seq, layer, node, &ext.page_write_seqs)?;
        let pages: Vec<(Bytes, usize)> = pages.into_iter().map(|p| (p.bytes, p.tokens as usize)).collect();
        let cached = pages.len() as u64;
        (pages.iter().map(|p| p.1 as u64).sum::<u64>() == ext.tokens).then_some(Fetched {
            pages,
            bytes: 0,
            pulled: 0,
            cached,
        })
    }

    /// Make sure the layer's pages are cached (from the freshest owner) and return them in order.
    pub(crate) async fn fetch_layer(&self, seq: &SequenceKey, layer: u32) -> Result<Fetched, SeqFailure> {
        let ns_r = self.client.namespace(&seq.namespace).map_or(1, |n| n.replication as usize);
        let cands: Vec<_> = self.client.read_candidates(seq).into_iter().take(ns_r.max(1) + 1).collect();
        let lookups =
            futures::future::join_all(cands.iter().map(|n| self.client.lookup_on(n, seq, vec![], Some(layer)))).await;
        let mut best: Option<(usize, u64, Vec<u64>)> = None;
        for (i, r) in lookups.into_iter().enumerate() {
            let Ok(r) = r else { continue };
            let Some(ext) = r.layers.into_iter().find(|l| l.layer == layer) else { continue };
            if ext.tokens > 0 && best.as_ref().is_none_or(|b| ext.tokens > b.1) {
                best = Some((i, ext.tokens, ext.page_write_seqs));
            }
        }
        let Some((ni, _tokens, seqs)) = best else {
            return Err(SeqFailure::Miss(format!("no live owner holds layer {layer} of {:?}", seq.sequence_id)));
        };
        let node = &cands[ni];
        let node_id: Arc<str> = node.node_id.as_str().into();
        if let Some(i) = seqs.iter().position(|&ws| ws == 0) {
            return Err(SeqFailure::Miss(format!("page {i} of layer {layer} is missing")));
        }
        let mut pages: Vec<Option<(Bytes, usize)>> = Vec::with_capacity(seqs.len());
        let mut missing = Vec::new();
        let mut cached = 0;
        for (i, p) in self.cache.layer(seq, layer, &node_id, &seqs).into_iter().enumerate() {
            match p {
                Some(p) => {
                    cached += 1;
                    pages.push(Some((p.bytes, p.tokens as usize)));
                }
                None => {
                    missing.push(PageKey { sequence: seq.clone(), layer, page_index: i as u32 });
                    pages.push(None);
                }
            }
        }
        let mut bytes = 0;
        let pulled = missing.len() as u64;
        if !missing.is_empty() {
            // A pull of more than the last page (a cold or evicted layer) runs under a lease, so
            // the node cannot evict the sequence halfway through the stream. The O(1) pull of a
            // warm step does not pay the extra round trip.
            let lease = if missing.len() > 1 { self.client.lease_on(node, seq, PULL_LEASE).await.ok() } else { None };
            // Into the arena, if there is one with room, as each message arrives; the frame
            // buffer goes back to the allocator once the pages received in it are copied out.
            let arena = &self.arena;
            let got = self
                .client
                .get_from_into(node, &missing, |b| arena.as_ref().and_then(|a| a.copy_in(&b)).unwrap_or(b))
                .await;
            if let Some(id) = lease {
                let (client, node) = (self.client.clone(), node.clone());
                self.tasks.spawn(async move {
                    if let Err(e) = client.release(&node, id).await {
                        tracing::debug!(error = %e, "lease release failed; it expires on its own");
                    }
                });
            }
            let got = got.map_err(|e| SeqFailure::Miss(e.to_string()))?;
            for (key, p) in missing.into_iter().zip(got) {
                let Some(p) = p else {
                    return Err(SeqFailure::Miss(format!("page {} of layer {layer} went missing", key.page_index)));
                };
                bytes += p.payload.len() as u64;
                let i = key.page_index as usize;
                pages[i] = Some((p.payload.clone(), p.token_count as usize));
                self.cache.insert(
                    key,
                    CachedPage {
                        node: node_id.clone(),
                        write_seq: p.write_seq,
                        tokens: p.token_count,
                        bytes: p.payload,
                    },
                );
            }
        }
        self.counters.bytes_pulled.fetch_add(bytes, Ordering::Relaxed);
        self.counters.pages_pulled.fetch_add(pulled, Ordering::Relaxed);
        Ok(Fetched { pages: pages.into_iter().map(|p| p.expect("filled")).collect(), bytes, pulled, cached })
    }
}
