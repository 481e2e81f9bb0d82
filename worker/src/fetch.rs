//! Getting a layer's pages for a step: the append's answer applied to the cached last page,
//! the layer served from the page cache when the append's extent names exactly what it holds,
//! otherwise a Lookup at the owners and a pull of the pages not already cached (under a lease
//! when more than the last page is missing). A sliding-window or chunked layer gets only the
//! pages its attention reads: those before the window are neither pulled nor kept.

use crate::cache::CachedPage;
use crate::{CONTENT_STRIPES, Fetched, PULL_LEASE, SeqFailure, Worker};
use bytes::Bytes;
use kvcache_client::AppendAck;
use kvcache_core::spec::LayerKind;
use kvcache_core::{ContentKey, Namespace, PageKey, SequenceKey};
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
            let l = ns.layout_for(layer);
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
    pub(crate) fn cached_layer(
        &self,
        ns: &Namespace,
        seq: &SequenceKey,
        layer: u32,
        acks: &[AppendAck],
    ) -> Option<Fetched> {
        let key = |i: usize| PageKey { sequence: seq.clone(), layer, page_index: i as u32 };
        let (kind, pt) = (ns.model.layer(layer), ns.page_tokens);
        // The owner the cached pages came from (with R > 1 every owner answers the append).
        let (node, ext) = acks.iter().find_map(|a| {
            let e = a.extent.as_ref().filter(|e| e.layer == layer && e.tokens > 0)?;
            let own_start = (e.prefix_pages as usize).max(kind.first_live_page(e.tokens, pt) as usize);
            self.cache.peek(&key(own_start)).is_some_and(|p| *p.node == *a.node_id).then_some((a.node_id.as_str(), e))
        })?;
        let np = ext.prefix_pages as usize;
        let first = kind.first_live_page(ext.tokens, pt) as usize;
        let own_start = np.max(first);
        let mut pages: Vec<(Bytes, usize)> = Vec::new();
        if np > first {
            // The prefix's pages by content, all cached, or the slow path.
            let prefix = self.prefixes.get(seq).map(|p| p.clone()).filter(|p| p.len() == np)?;
            let keys: Vec<PageKey> = prefix[first..]
                .iter()
                .map(|k| PageKey { sequence: SequenceKey::content(&seq.namespace, k), layer, page_index: 0 })
                .collect();
            for p in self.cache.content(&keys) {
                let p = p?;
                pages.push((p.bytes, p.tokens as usize));
            }
        }
        let own = self.cache.whole_layer_from(seq, layer, node, own_start, ext.page_write_seqs.get(own_start..)?)?;
        pages.extend(own.into_iter().map(|p| (p.bytes, p.tokens as usize)));
        let cached = pages.len() as u64;
        let skip = (kind.read_range(ext.tokens).start - (first as u64 * pt as u64)) as usize;
        if first > 0 {
            self.cache.drop_before(seq, layer, first);
        }
        (pages.iter().map(|p| p.1 as u64).sum::<u64>() == ext.tokens - first as u64 * pt as u64).then_some(Fetched {
            pages,
            skip,
            cached,
            ..Default::default()
        })
    }

    /// Make sure the layer's pages are cached (from the freshest owner) and return them in order:
    /// a sequence over a prefix first gets the prefix's content pages (from their own owners, or
    /// the cache, where every sequence sharing that prefix finds them), then its own.
    pub(crate) async fn fetch_layer(&self, seq: &SequenceKey, layer: u32) -> Result<Fetched, SeqFailure> {
        self.fetch_layer_pages(seq, layer, None, false).await
    }

    /// [`Self::fetch_layer`] pulling only the pages `want` accepts (by page index); the others
    /// come back as empty payloads with their token counts, so positions stay where they are
    /// (sparse attention reads the pages holding its chosen tokens only). With `leave_own`, the
    /// sequence's own wanted pages that are not cached are not pulled either: they are listed in
    /// `unpulled`, for the caller to read just the rows it needs.
    ///
    /// Another decode of the same sequence can append between the lookup and the read (the page
    /// read is then newer than the lookup said): that read is retried from a fresh lookup, a few
    /// times, before it is the sequence's miss.
    pub(crate) async fn fetch_layer_pages(
        &self,
        seq: &SequenceKey,
        layer: u32,
        want: Option<&(dyn Fn(usize) -> bool + Sync)>,
        leave_own: bool,
    ) -> Result<Fetched, SeqFailure> {
        let mut attempt = 0;
        loop {
            match self.fetch_layer_once(seq, layer, want, leave_own).await {
                Err(SeqFailure::Raced(m)) if attempt >= 3 => return Err(SeqFailure::Miss(m)),
                Err(SeqFailure::Raced(_)) => attempt += 1,
                r => return r,
            }
        }
    }

    async fn fetch_layer_once(
        &self,
        seq: &SequenceKey,
        layer: u32,
        want: Option<&(dyn Fn(usize) -> bool + Sync)>,
        leave_own: bool,
    ) -> Result<Fetched, SeqFailure> {
        let wanted = |i: usize| want.is_none_or(|w| w(i));
        let ns = self.client.namespace(&seq.namespace);
        let ns_r = ns.as_ref().map_or(1, |n| n.replication as usize);
        let (kind, pt) = ns.as_ref().map_or((LayerKind::Full, 1), |n| (n.layer_kind(layer), n.page_tokens));
        let cands: Vec<_> = self.client.read_candidates(seq).into_iter().take(ns_r.max(1) + 1).collect();
        let lookups =
            futures::future::join_all(cands.iter().map(|n| self.client.lookup_on(n, seq, vec![], Some(layer)))).await;
        // The owner holding the most tokens of the layer: (candidate, its extent, the prefix).
        let mut best: Option<(usize, kvcache_client::LayerExtent, Vec<ContentKey>)> = None;
        for (i, r) in lookups.into_iter().enumerate() {
            let Ok(r) = r else { continue };
            let Some(ext) = r.layers.into_iter().find(|l| l.layer == layer) else { continue };
            if ext.tokens > 0 && best.as_ref().is_none_or(|b| ext.tokens > b.1.tokens) {
                best = Some((i, ext, r.prefix));
            }
        }
        let Some((ni, ext, prefix)) = best else {
            return Err(SeqFailure::Miss(format!("no live owner holds layer {layer} of {:?}", seq.sequence_id)));
        };
        let (tokens, seqs, np) = (ext.tokens, ext.page_write_seqs, ext.prefix_pages as usize);
        if prefix.len() != np {
            return Err(SeqFailure::Miss(format!(
                "the prefix of {:?} lists {} keys for {np} pages",
                seq.sequence_id,
                prefix.len()
            )));
        }
        let node = &cands[ni];
        let node_id: Arc<str> = node.node_id.as_str().into();
        // A window or chunk reads from `first` on: earlier pages are released on the node.
        let first = kind.first_live_page(tokens, pt) as usize;
        let own_start = np.max(first);
        let own = seqs.get(own_start..).unwrap_or_default();
        if let Some(i) = own.iter().position(|&ws| ws == 0) {
            return Err(SeqFailure::Miss(format!("page {} of layer {layer} is missing", own_start + i)));
        }
        if np > 0 {
            self.remember_prefix(seq, &prefix);
        }
        // The token count of page `i` (all full but the last).
        let page_len = |i: usize| (tokens - i as u64 * pt as u64).min(pt as u64) as usize;
        let (mut pages, mut bytes, mut pulled, mut cached) = if np > first {
            let idx: Vec<usize> = (first..np).filter(|&i| wanted(i)).collect();
            let keys: Vec<ContentKey> = idx.iter().map(|&i| prefix[i]).collect();
            let (got, b, p, c) = self.content_layer(&seq.namespace, &keys, layer).await?;
            let mut got = got.into_iter();
            let pages = (first..np)
                .map(|i| if wanted(i) { got.next().expect("one per key") } else { (Bytes::new(), pt as usize) });
            (pages.collect(), b, p, c)
        } else {
            (Vec::new(), 0, 0, 0)
        };
        if first > 0 {
            self.cache.drop_before(seq, layer, first);
        }
        let mut own_pages: Vec<Option<(Bytes, usize)>> = Vec::with_capacity(own.len());
        let mut missing = Vec::new();
        for (i, p) in self.cache.layer_from(seq, layer, &node_id, own_start, own).into_iter().enumerate() {
            if !wanted(own_start + i) {
                own_pages.push(Some((Bytes::new(), page_len(own_start + i))));
                continue;
            }
            match p {
                Some(p) => {
                    cached += 1;
                    own_pages.push(Some((p.bytes, p.tokens as usize)));
                }
                None => {
                    missing.push(PageKey { sequence: seq.clone(), layer, page_index: (own_start + i) as u32 });
                    own_pages.push(None);
                }
            }
        }
        let mut unpulled = Vec::new();
        if leave_own {
            for k in missing.drain(..) {
                let i = k.page_index as usize;
                own_pages[i - own_start] = Some((Bytes::new(), page_len(i)));
                unpulled.push(i - first);
            }
        }
        pulled += missing.len() as u64;
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
                own_pages[key.page_index as usize - own_start] = Some((p.payload.clone(), p.token_count as usize));
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
        pages.extend(own_pages.into_iter().map(|p| p.expect("filled")));
        let from = first as u64 * pt as u64;
        if pages.iter().map(|p| p.1 as u64).sum::<u64>() != tokens - from {
            return Err(SeqFailure::Raced(format!(
                "layer {layer} of {:?} holds {tokens} tokens, its pages add up to another count",
                seq.sequence_id
            )));
        }
        self.counters.bytes_pulled.fetch_add(bytes, Ordering::Relaxed);
        self.counters.pages_pulled.fetch_add(pulled, Ordering::Relaxed);
        let skip = (kind.read_range(tokens).start - from) as usize;
        Ok(Fetched { pages, skip, bytes, pulled, cached, unpulled, from: Some(node.clone()) })
    }

    /// Keep a sequence's prefix for the warm path ([`Self::cached_layer`]); bounded: the map is
    /// dropped whole when it grows past 2^16 sequences and relearned from lookups.
    fn remember_prefix(&self, seq: &SequenceKey, prefix: &[ContentKey]) {
        if self.prefixes.len() >= 1 << 16 {
            self.prefixes.clear();
        }
        self.prefixes.insert(seq.clone(), prefix.into());
    }

    /// The layer's pages of a prefix: from the cache, the rest pulled from their owners (every
    /// node at once) and cached by content. Concurrent fetches of one prefix wait for a single
    /// pull: a batch of sequences sharing a prompt pulls it once. Returns (pages, bytes pulled,
    /// pages pulled, pages from the cache).
    pub(crate) async fn content_layer(
        &self,
        namespace: &str,
        prefix: &[ContentKey],
        layer: u32,
    ) -> Result<(Vec<(Bytes, usize)>, u64, u64, u64), SeqFailure> {
        let keys: Vec<PageKey> = prefix
            .iter()
            .map(|k| PageKey { sequence: SequenceKey::content(namespace, k), layer, page_index: 0 })
            .collect();
        let mut got = self.cache.content(&keys);
        let (mut bytes, mut pulled) = (0, 0);
        if let Some(first) = got.iter().position(Option::is_none) {
            // One pull per prefix at a time: the stripe of the first missing page, which every
            // sequence sharing this prompt (and missing the same pages) maps to.
            let head = u64::from_le_bytes(prefix[first].0[..8].try_into().expect("8 bytes"));
            let stripe = ((head ^ layer as u64) % CONTENT_STRIPES as u64) as usize;
            let _one = self.content_locks[stripe].lock().await;
            for (i, p) in self.cache.content(&keys).into_iter().enumerate() {
                if got[i].is_none() {
                    got[i] = p;
                }
            }
            let want: Vec<usize> = (0..keys.len()).filter(|&i| got[i].is_none()).collect();
            if !want.is_empty() {
                let wk: Vec<ContentKey> = want.iter().map(|&i| prefix[i]).collect();
                // Into the arena as each message arrives, as for a sequence's own pages.
                let arena = &self.arena;
                let pages = self
                    .client
                    .get_content_into(namespace, &wk, layer..layer + 1, |b| {
                        arena.as_ref().and_then(|a| a.copy_in(&b)).unwrap_or(b)
                    })
                    .await
                    .map_err(|e| SeqFailure::Miss(e.to_string()))?;
                let content: Arc<str> = Arc::from("content");
                for (&i, p) in want.iter().zip(pages) {
                    let Some(p) = p else {
                        return Err(SeqFailure::Miss(format!(
                            "prefix page {i} ({}) of layer {layer} is not held by any of its owners",
                            prefix[i]
                        )));
                    };
                    let payload = p.payload;
                    bytes += payload.len() as u64;
                    pulled += 1;
                    let page =
                        CachedPage { node: content.clone(), write_seq: 1, tokens: p.token_count, bytes: payload };
                    self.cache.insert(keys[i].clone(), page.clone());
                    got[i] = Some(page);
                }
            }
        }
        let cached = keys.len() as u64 - pulled;
        let pages = got.into_iter().map(|p| p.map(|p| (p.bytes, p.tokens as usize)).expect("filled")).collect();
        Ok((pages, bytes, pulled, cached))
    }
}
