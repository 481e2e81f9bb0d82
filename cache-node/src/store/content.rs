//! Content pages (see `kvcache_core::content`): full pages stored once under their content key,
//! whatever number of sequences and requests use them.
//!
//! - A put of a key already held with the same bytes writes nothing and is counted as a dedup
//!   hit; with other bytes it is refused ([`StoreError::ContentConflict`], counted) and the held
//!   page stays. Content pages are never replaced, not even by a handoff copy.
//! - [`PageStore::match_prefix`] answers which keys are held with every layer, touches them and
//!   may lease them for the pull that follows.
//! - Prefix-aware recency: a request that touches several keys touches them in reverse, so the
//!   earlier pages of a chain are always more recent than the later ones they were used with, and
//!   eviction (least recently used first) takes a chain from its end, never from its middle.

use super::*;
use kvcache_core::ContentKey;

/// Whether a held content page equals a page put under the same key.
enum Held {
    No,
    Same,
    Other(u32),
}

impl PageStore {
    fn content_held(&self, v: &ValidPage) -> Held {
        let Some(seq) = self.sequences.get(&v.key.sequence).map(|s| s.clone()) else { return Held::No };
        let mut inner = seq.inner.lock();
        if inner.removed {
            return Held::No;
        }
        let Some(Some(e)) =
            inner.layers.get(v.key.layer as usize).and_then(|l| l.get(v.key.page_index as usize)).copied()
        else {
            return Held::No;
        };
        if e.tokens != v.token_count || e.crc != v.payload_crc {
            return Held::Other(e.crc);
        }
        // Equal CRCs: compare the bytes, a CRC-32C is no proof of equality.
        match self.hold_verified(&seq, &mut inner, &v.key, &e) {
            Some(held) if held[..] == v.payload[..] => Held::Same,
            Some(_) => Held::Other(e.crc),
            None => Held::No, // it failed verification and was dropped: write it anew
        }
    }

    /// Sort the content pages of a put into new, duplicate (counted, dropped from `pages`) or
    /// conflicting (the whole put refused before anything is written).
    pub(super) fn dedup_content(&self, pages: &mut Vec<ValidPage>) -> Result<u64, StoreError> {
        let mut dup = vec![false; pages.len()];
        let mut n = 0;
        for (i, v) in pages.iter().enumerate() {
            if !v.key.sequence.is_content() {
                continue;
            }
            let ns = self.ns_of(&v.key.sequence.namespace)?;
            match self.content_held(v) {
                Held::No => {}
                Held::Same => {
                    dup[i] = true;
                    n += 1;
                }
                Held::Other(held) => {
                    ns.counters.conflicts.fetch_add(1, Ordering::Relaxed);
                    let key = v.key.sequence.content_key().map_or_else(String::new, |k| k.hex());
                    tracing::warn!(namespace = %ns.ns.name, key = %key, layer = v.key.layer, "content page put with other bytes than the held page: refused");
                    return Err(StoreError::ContentConflict { key, layer: v.key.layer, held, put: v.payload_crc });
                }
            }
        }
        if n > 0 {
            let mut i = 0;
            pages.retain(|v| {
                let keep = !dup[i];
                if !keep && let Ok(ns) = self.ns_of(&v.key.sequence.namespace) {
                    ns.counters.dedup_hits.fetch_add(1, Ordering::Relaxed);
                }
                i += 1;
                keep
            });
        }
        Ok(n)
    }

    /// Touch content sequences so the first of `keys` ends most recent (see the module comment).
    pub(super) fn touch_chain<'a>(&self, keys: impl DoubleEndedIterator<Item = &'a SequenceKey>) {
        let mut seen = std::collections::HashSet::new();
        let ordered: Vec<&SequenceKey> = keys.filter(|k| k.is_content() && seen.insert(*k)).collect();
        for k in ordered.into_iter().rev() {
            if let Some(seq) = self.sequences.get(k).map(|s| s.clone()) {
                self.touch(&seq);
            }
        }
    }

    /// Which of `keys` (content keys of namespace `ns`, in chain order) are held with every layer
    /// present and full. Present keys up to the first absent one are touched (the first most
    /// recent) and, with `lease`, pinned for that long: a pull that follows finds them.
    pub fn match_prefix(
        &self,
        namespace: &str,
        keys: &[ContentKey],
        lease: Option<Duration>,
    ) -> Result<Vec<bool>, StoreError> {
        Ok(self.match_prefix_held(namespace, keys, lease)?.into_iter().map(|(p, _)| p).collect())
    }

    /// [`Self::match_prefix`] with, per key, the layer groups held (bits of
    /// `kvcache_core::spec::held`): a hybrid model's prefix may be restorable from keys that do
    /// not hold every layer (windowed pages only near its end, a state snapshot only at it).
    pub fn match_prefix_held(
        &self,
        namespace: &str,
        keys: &[ContentKey],
        lease: Option<Duration>,
    ) -> Result<Vec<(bool, u32)>, StoreError> {
        use kvcache_core::spec::held;
        let ns = self.ns_of(namespace)?;
        let groups = ns.ns.model.held_groups();
        // Per stored layer: its group and the pages it needs (1, or a state's pages).
        let plan: Vec<(u32, u32, usize)> = (0..ns.ns.stored_layers())
            .filter_map(|l| match ns.ns.layer_kind(l) {
                LayerKind::Full => Some((l, held::FULL, 1)),
                LayerKind::Sliding { .. } => Some((l, held::WINDOW, 1)),
                LayerKind::Chunked { .. } => Some((l, held::CHUNK, 1)),
                LayerKind::Linear(_) | LayerKind::Mamba2(_) => Some((l, held::STATE, ns.ns.state_pages(l) as usize)),
                LayerKind::None => None,
            })
            .collect();
        let now = Instant::now();
        let mut present = Vec::with_capacity(keys.len());
        let mut held_seqs = Vec::new();
        // One key value reused for every lookup: its id is rewritten in place, no allocation.
        let mut key = SequenceKey::new(namespace, String::with_capacity(kvcache_core::content::CONTENT_ID_LEN));
        for k in keys {
            k.write_sequence_id(&mut key.sequence_id);
            let seq = self.sequences.get(&key).map(|s| s.clone());
            let got = seq.as_ref().map_or(0, |seq| {
                let mut inner = seq.inner.lock();
                if inner.removed {
                    return 0;
                }
                // A group is held when every one of its layers has all its pages, full and on
                // a file in service.
                let mut missing = 0u32;
                for &(l, group, pages) in &plan {
                    let ok = inner.layers.get(l as usize).is_some_and(|ps| {
                        ps.len() >= pages
                            && ps[..pages].iter().all(|e| {
                                e.is_some_and(|e| {
                                    e.tokens == ns.ns.page_tokens && self.file(e.file).is_some_and(|f| !f.is_failed())
                                })
                            })
                    });
                    if !ok {
                        missing |= group;
                    }
                }
                let got = groups & !missing;
                if got != 0
                    && let Some(ttl) = lease
                {
                    inner.leases.retain(|&(_, t)| t > now);
                    inner.leases.push((0, now + ttl));
                }
                got
            });
            let whole = groups != 0 && got == groups;
            present.push((whole, got));
            if got != 0 && held_seqs.len() + 1 == present.len() {
                held_seqs.push(seq.expect("present"));
            }
        }
        for seq in held_seqs.iter().rev() {
            self.touch(seq);
        }
        let hits = present.iter().filter(|p| p.0).count() as u64;
        ns.counters.match_hits.fetch_add(hits, Ordering::Relaxed);
        ns.counters.match_misses.fetch_add(keys.len() as u64 - hits, Ordering::Relaxed);
        Ok(present)
    }
}
