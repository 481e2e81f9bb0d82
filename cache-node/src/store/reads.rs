//! Reads: pages by key (payload as a held slice of the mapping, CRC checked on first read after a
//! clean restart), a sequence's extents (Lookup).

use super::*;

impl PageStore {
    /// Take a hold on `e`'s payload, verifying its CRC first if that was deferred. Drops the
    /// entry (a miss from now on) when its file failed or its bytes do not verify.
    pub(super) fn hold_verified(
        &self,
        seq: &Sequence,
        inner: &mut SeqInner,
        key: &PageKey,
        e: &PageEntry,
    ) -> Option<Bytes> {
        let ok_file = self.file(e.file).filter(|f| !f.is_failed());
        let Some(file) = ok_file else {
            self.drop_entry(seq, inner, key);
            return None;
        };
        let len = e.len as usize;
        let hold = file.hold(e.slot);
        if !e.verified {
            let bytes = &hold.bytes()[HEADER_BYTES..HEADER_BYTES + len];
            if kvcache_core::checksum::crc32c(bytes) != e.crc {
                drop(hold);
                tracing::warn!(sequence = %key.sequence.sequence_id, layer = key.layer, page = key.page_index, "page failed its checksum on first read: dropped");
                self.counters.corrupt.fetch_add(1, Ordering::Relaxed);
                self.drop_entry(seq, inner, key);
                return None;
            }
            if let Some(Some(p)) =
                inner.layers.get_mut(key.layer as usize).and_then(|l| l.get_mut(key.page_index as usize))
            {
                p.verified = true;
            }
        }
        Some(hold.into_payload(len))
    }

    pub(super) fn drop_entry(&self, seq: &Sequence, inner: &mut SeqInner, key: &PageKey) {
        if let Some(e) = inner.layers.get_mut(key.layer as usize).and_then(|l| l.get_mut(key.page_index as usize))
            && let Some(old) = e.take()
        {
            self.retire_entry(&seq.ns, &old, key.layer == 0);
        }
    }

    /// Read one page: `Ok(None)` is a miss.
    pub fn get(&self, key: &PageKey) -> Result<Option<StoredPage>, StoreError> {
        let ns = self.ns_of(&key.sequence.namespace)?;
        validate::page_key(&ns.ns, key)?;
        let r = self.get_in(key);
        let (c, nc) = if r.is_some() {
            (&self.counters.hits, &ns.counters.get_hits)
        } else {
            (&self.counters.misses, &ns.counters.get_misses)
        };
        c.fetch_add(1, Ordering::Relaxed);
        nc.fetch_add(1, Ordering::Relaxed);
        Ok(r)
    }

    /// The rows of `tokens` (strictly ascending positions) of `layer` of `key` as one compact
    /// payload of `tokens.len()` tokens in the layer's layout; `None` when a page holding one of
    /// them is not held (or holds fewer tokens). Pages are read as [`Self::get`] reads them
    /// (verified, counted, the sequence touched).
    pub fn get_rows(&self, key: &SequenceKey, layer: u32, tokens: &[u32]) -> Result<Option<Vec<u8>>, StoreError> {
        let ns = self.ns_of(&key.namespace)?;
        validate::layer(&ns.ns, layer)?;
        if !ns.ns.layer_kind(layer).keeps_tokens() {
            return Err(
                ValidationError::LayerKind { layer, why: "rows are read from layers that keep tokens".into() }.into()
            );
        }
        // A token past what the layer holds is a bad index, not a miss.
        if let Some(&last) = tokens.last()
            && let Some(seq) = self.sequences.get(key).map(|s| s.clone())
        {
            let held = seq.inner.lock().layer_tokens(layer as usize, ns.ns.page_tokens);
            if last as u64 >= held {
                return Err(ValidationError::Count {
                    what: "tokens (a sparse index)",
                    got: last as u64,
                    expected: format!("< {held}, the tokens layer {layer} holds"),
                }
                .into());
            }
        }
        let layout = ns.ns.layout_for(layer);
        let (pt, rb, k) = (ns.ns.page_tokens, layout.row_bytes, tokens.len());
        let mut out = vec![0u8; layout.payload_bytes(k)];
        let mut j = 0;
        while j < k {
            let page_index = tokens[j] / pt;
            let end = j + tokens[j..].iter().take_while(|t| **t / pt == page_index).count();
            let Some(p) = self.get(&PageKey { sequence: key.clone(), layer, page_index })? else { return Ok(None) };
            let n = p.token_count as usize;
            for (jj, &t) in tokens[j..end].iter().enumerate() {
                let off = (t % pt) as usize;
                if off >= n {
                    return Ok(None);
                }
                for plane in 0..layout.planes {
                    let src = layout.row_range(n, plane, off);
                    let at = (plane * k + j + jj) * rb;
                    out[at..at + rb].copy_from_slice(&p.payload[src]);
                }
            }
            j = end;
        }
        Ok(Some(out))
    }

    /// Read one page without counting it as a hit or miss (internal copies).
    pub(crate) fn get_in(&self, key: &PageKey) -> Option<StoredPage> {
        let seq = self.sequences.get(&key.sequence).map(|s| s.clone())?;
        let mut inner = seq.inner.lock();
        let e = (*inner.layers.get(key.layer as usize)?.get(key.page_index as usize)?)?;
        let payload = self.hold_verified(&seq, &mut inner, key, &e)?;
        drop(inner);
        self.touch(&seq);
        Some(StoredPage {
            token_count: e.tokens,
            write_seq: e.write_seq,
            crc: e.crc,
            prefix_hash: e.prefix_hash,
            payload,
        })
    }

    /// Page counts of a sequence's layers (`None` if the sequence is not held).
    pub fn sequence_pages(&self, key: &SequenceKey) -> Option<Vec<u32>> {
        let seq = self.sequences.get(key).map(|s| s.clone())?;
        let inner = seq.inner.lock();
        Some(inner.layers.iter().map(|l| l.len() as u32).collect())
    }

    /// Extents of every layer of a sequence, and how many leading `prefix_hashes` are cached in
    /// the namespace.
    pub fn lookup(
        &self,
        key: &SequenceKey,
        prefix_hashes: &[u64],
        only_layer: Option<u32>,
    ) -> Result<(bool, Vec<LayerExtent>, u32), StoreError> {
        let ns = self.ns_of(&key.namespace)?;
        let cached = prefix_hashes.iter().take_while(|h| self.prefixes.contains_key(&(ns.ns.id(), **h))).count() as u32;
        let Some(seq) = self.sequences.get(key).map(|s| s.clone()) else { return Ok((false, Vec::new(), cached)) };
        let inner = seq.inner.lock();
        let prefix = inner.prefix_pages();
        // A sequence over a prefix has every layer, if only the prefix's tokens.
        let n_layers = if prefix > 0 { ns.ns.stored_layers() as usize } else { inner.layers.len() };
        let empty = Vec::new();
        let layers = (0..n_layers)
            .filter(|i| only_layer.is_none_or(|o| o as usize == *i))
            .map(|i| {
                let l = inner.layers.get(i).unwrap_or(&empty);
                LayerExtent {
                    layer: i as u32,
                    tokens: inner.layer_tokens(i, ns.ns.page_tokens),
                    pages: l.iter().filter(|p| p.is_some()).count() as u32,
                    write_seqs: l.iter().map(|p| p.map_or(0, |e| e.write_seq)).collect(),
                    prefix_pages: prefix as u32,
                }
            })
            .collect();
        Ok((!inner.removed, layers, cached))
    }
}
