//! Getting a layer's pages for a step: the append's answer applied to the cached last page,
//! the layer served from the page cache when the append's extent names exactly what it holds,
//! otherwise a Lookup at the owners and a pull of the pages not already cached (under a lease
//! when more than the last page is missing). A sliding-window or chunked layer gets only the
//! pages its attention reads: those before the window are neither pulled nor kept.
//!
//! A step that appends one token can also start before its append is answered: [`Worker::speculate`]
//! builds the layer from the cache's last validated extent plus the token, the batch computes on
//! it while the write-through is in flight, and [`Worker::confirm`] keeps the result only when the
//! owner's answer names exactly those pages (the same test the usual path applies). Otherwise
//! the sequence goes the usual way and is computed again: a speculation never changes an answer,
//! only when it is ready.

use crate::cache::{CachedPage, Extent, SpecPages};
use crate::{CONTENT_STRIPES, Fetched, Grown, PULL_LEASE, SeqFailure, Worker};
use bytes::Bytes;
use kvcache_client::AppendAck;
use kvcache_core::spec::LayerKind;
use kvcache_core::{ContentKey, Namespace, PageKey, SequenceKey};
use std::sync::Arc;
use std::sync::atomic::Ordering;

/// A layer read from the cache for a step whose append has not been answered yet
/// ([`Worker::speculate`]).
pub(crate) struct Speculated {
    /// The pages computed on: the cached layer with the new token appended.
    pub(crate) fetched: Fetched,
    /// The owner the cached pages came from.
    node: Arc<str>,
    /// The layer's tokens after the append.
    tokens: u64,
    prefix_pages: u32,
    /// First own page (after the prefix and the window's start).
    own_start: usize,
    /// write_seqs of the own full pages computed on, from `own_start`.
    write_seqs: Vec<u64>,
    /// Where the own full pages sit in `fetched.pages` (after the prefix's).
    own_at: usize,
    page_tokens: usize,
    /// (page index, tokens, payload bytes) of the page the token went into; its payload is the
    /// last of the pages the compute gives back (built there when the grown page is pending).
    last: (usize, usize, usize),
}

impl Worker {
    /// Apply an acknowledged append to the cached copy of the layer's last page. With R > 1
    /// every owner acknowledges; the ack used is that of the owner the cached pages came from,
    /// so a layer's cached pages stay from one node. Returns the new last page and how it grew
    /// when it extends a cached one.
    pub(crate) fn apply_append(
        &self,
        ns: &Namespace,
        seq: &SequenceKey,
        layer: u32,
        acks: &[AppendAck],
        new_kv: &Bytes,
    ) -> Option<(Bytes, Grown)> {
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
        let ack = ack?;
        let (Some(&tokens), Some(&ws)) = (ack.layer_tokens.first(), ack.last_page_write_seqs.first()) else {
            return None;
        };
        if tokens == 0 {
            return None;
        }
        let idx = (tokens - 1) / pt;
        let in_page = (tokens - idx * pt) as usize;
        let node: Arc<str> = ack.node_id.as_str().into();
        let mut grown = None;
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
                    let g = Grown {
                        old: old.bytes,
                        old_tokens: in_page - 1,
                        rows: new_kv.clone(),
                        layout: l,
                        pending: false,
                        arena: self.arena.clone(),
                    };
                    let merged = g.merge();
                    grown = Some(g);
                    merged
                }
                _ => return None,
            }
        };
        self.cache.insert(key(idx), CachedPage { node, write_seq: ws, tokens: in_page as u32, bytes: bytes.clone() });
        grown.map(|g| (bytes, g))
    }

    /// The layer as the cache last saw it whole, plus the token this step appends: computed
    /// on while the append is in flight, kept only if [`Self::confirm`] finds the owner's answer
    /// names exactly these pages. `None` when the cache has no validated extent for the layer,
    /// misses a page of it, or the step moves a window's first page (the usual path then runs).
    pub(crate) fn speculate(
        &self,
        ns: &Namespace,
        seq: &SequenceKey,
        layer: u32,
        new_kv: &Bytes,
    ) -> Option<Speculated> {
        let (kind, pt) = (ns.model.layer(layer), ns.page_tokens);
        let (l, ptu) = (ns.layout_for(layer), pt as usize);
        let memo = self.cache.extent(seq, layer)?;
        let tokens = memo.tokens + 1;
        let first = kind.first_live_page(tokens, pt) as usize;
        if memo.tokens == 0
            || first != kind.first_live_page(memo.tokens, pt) as usize
            || new_kv.len() != l.payload_bytes(1)
        {
            return None;
        }
        let np = memo.prefix_pages as usize;
        let own_start = np.max(first);
        // The page the token goes into, and the tokens it held.
        let (idx, held) = ((memo.tokens / pt as u64) as usize, (memo.tokens % pt as u64) as usize);
        if idx < own_start {
            return None;
        }
        // The own full pages: the list the last confirmed step computed on when the cache kept
        // it (one move), else each page's handle from the cache.
        let full = idx - own_start;
        let (own, write_seqs) = match self.cache.take_spec_pages(seq, layer, &memo.node, own_start, full) {
            Some(k) => (k.pages, k.write_seqs),
            None => {
                let got = self.cache.pages_from(seq, layer, &memo.node, own_start, full)?;
                let ws = got.iter().map(|p| p.2).collect();
                (got.into_iter().map(|p| (p.0, p.1 as usize)).collect::<Vec<_>>(), ws)
            }
        };
        let partial = if held > 0 { self.cache.pages_from(seq, layer, &memo.node, idx, 1)?.pop() } else { None };
        let mut pages: Vec<(Bytes, usize)> = Vec::with_capacity(idx + 1 - first);
        if np > first {
            pages = self.cached_prefix(ns, seq, layer, np, first)?;
        }
        if own.iter().any(|p| p.1 != ptu || p.0.len() != l.payload_bytes(ptu)) {
            return None;
        }
        let own_at = pages.len();
        pages.extend(own);
        let (last, grown) = match partial {
            Some((b, n, _)) if n as usize == held && b.len() == l.payload_bytes(held) => {
                // A GPU worker writes only the token's rows to the device and builds the grown
                // page (up to 256 KiB for Llama-3-8B) while the kernels run: see [`Grown::pending`].
                let pending = self.device.is_some();
                let g = Grown {
                    old: b,
                    old_tokens: held,
                    rows: new_kv.clone(),
                    layout: l,
                    pending,
                    arena: self.arena.clone(),
                };
                (if pending { Bytes::new() } else { g.merge() }, Some(g))
            }
            Some(_) => return None,
            None => (new_kv.clone(), None),
        };
        pages.push((last, held + 1));
        let skip = (kind.read_range(tokens).start - first as u64 * pt as u64) as usize;
        let cached = pages.len() as u64 - 1;
        Some(Speculated {
            fetched: Fetched { pages, skip, cached, grown, ..Default::default() },
            node: memo.node,
            tokens,
            prefix_pages: memo.prefix_pages,
            own_start,
            write_seqs,
            own_at,
            page_tokens: ptu,
            last: (idx, held + 1, l.payload_bytes(held + 1)),
        })
    }

    /// Keep a speculated layer if the owner it was read from answered the append with exactly
    /// its pages (the layer one token longer, every earlier page the version computed on): the
    /// new last page is then cached as that owner's, and the layer's extent remembered, with
    /// the list of full pages computed on (`pages`, given back by the compute) for the next step.
    pub(crate) fn confirm(
        &self,
        seq: &SequenceKey,
        layer: u32,
        s: &Speculated,
        acks: &[AppendAck],
        pages: Vec<(Bytes, usize)>,
    ) -> bool {
        let Some(e) =
            acks.iter().find(|a| *a.node_id == *s.node).and_then(|a| a.extent.as_ref()).filter(|e| e.layer == layer)
        else {
            return false;
        };
        let (idx, tokens, len) = s.last;
        // The page the compute read (built there when it was pending); a placeholder left
        // unbuilt is not confirmed, and the step reads the layer the usual way.
        let Some(bytes) = pages.last().map(|p| p.0.clone()).filter(|b| b.len() == len) else {
            return false;
        };
        let ok = e.tokens == s.tokens
            && e.prefix_pages == s.prefix_pages
            && e.page_write_seqs.len() == idx + 1
            && e.page_write_seqs[s.own_start..idx] == s.write_seqs[..]
            && e.page_write_seqs[idx] != 0;
        if ok {
            let key = PageKey { sequence: seq.clone(), layer, page_index: idx as u32 };
            let page =
                CachedPage { node: s.node.clone(), write_seq: e.page_write_seqs[idx], tokens: tokens as u32, bytes };
            self.cache.insert(key, page);
            self.cache.set_extent(
                seq,
                layer,
                Extent { node: s.node.clone(), tokens: e.tokens, prefix_pages: e.prefix_pages },
            );
            // Keep the own full pages computed on for the next step, with the new last page
            // once it is full.
            let mut pages = pages;
            if pages.len() == s.own_at + s.write_seqs.len() + 1 {
                let mut own: Vec<(Bytes, usize)> = pages.drain(s.own_at..).collect();
                let mut write_seqs = s.write_seqs.clone();
                if tokens == s.page_tokens {
                    write_seqs.push(e.page_write_seqs[idx]);
                } else {
                    own.pop();
                }
                self.cache.keep_spec_pages(
                    seq,
                    layer,
                    SpecPages { node: s.node.clone(), start: s.own_start, pages: own, write_seqs },
                );
            }
        }
        ok
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
            pages = self.cached_prefix(ns, seq, layer, np, first)?;
        }
        let own = self.cache.whole_layer_from(seq, layer, node, own_start, ext.page_write_seqs.get(own_start..)?)?;
        pages.extend(own.into_iter().map(|p| (p.bytes, p.tokens as usize)));
        let cached = pages.len() as u64;
        let skip = (kind.read_range(ext.tokens).start - (first as u64 * pt as u64)) as usize;
        if first > 0 {
            self.cache.drop_before(seq, layer, first);
        }
        if pages.iter().map(|p| p.1 as u64).sum::<u64>() != ext.tokens - first as u64 * pt as u64 {
            return None;
        }
        self.cache.set_extent(
            seq,
            layer,
            Extent { node: node.into(), tokens: ext.tokens, prefix_pages: ext.prefix_pages },
        );
        Some(Fetched { pages, skip, cached, ..Default::default() })
    }

    /// Pages `first..np` of a sequence's prefix (of `np` pages) from the cache, by content:
    /// every one cached and full, or `None`.
    fn cached_prefix(
        &self,
        ns: &Namespace,
        seq: &SequenceKey,
        layer: u32,
        np: usize,
        first: usize,
    ) -> Option<Vec<(Bytes, usize)>> {
        let (l, pt) = (ns.layout_for(layer), ns.page_tokens as usize);
        let prefix = self.prefixes.get(seq).map(|p| p.clone()).filter(|p| p.len() == np)?;
        let keys: Vec<PageKey> = prefix[first..]
            .iter()
            .map(|k| PageKey { sequence: SequenceKey::content(&seq.namespace, k), layer, page_index: 0 })
            .collect();
        self.cache
            .content(&keys)
            .into_iter()
            .map(|p| {
                p.filter(|p| p.tokens as usize == pt && p.bytes.len() == l.payload_bytes(pt)).map(|p| (p.bytes, pt))
            })
            .collect()
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
            let mut put = Vec::with_capacity(got.len());
            for (key, p) in missing.iter().zip(got) {
                let Some(p) = p else {
                    return Err(SeqFailure::Miss(format!("page {} of layer {layer} went missing", key.page_index)));
                };
                bytes += p.payload.len() as u64;
                own_pages[key.page_index as usize - own_start] = Some((p.payload.clone(), p.token_count as usize));
                let page = CachedPage {
                    node: node_id.clone(),
                    write_seq: p.write_seq,
                    tokens: p.token_count,
                    bytes: p.payload,
                };
                put.push((key.page_index, page));
            }
            // Cached in one go: one lock for the sequence's pages.
            self.cache.insert_layer(seq, layer, put);
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
        if want.is_none() && !leave_own {
            // Every page of the layer is cached now, as this owner holds them.
            self.cache.set_extent(seq, layer, Extent { node: node_id.clone(), tokens, prefix_pages: np as u32 });
        }
        let skip = (kind.read_range(tokens).start - from) as usize;
        Ok(Fetched { pages, skip, bytes, pulled, cached, unpulled, from: Some(node.clone()), ..Default::default() })
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
