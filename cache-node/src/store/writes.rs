//! The write path: puts, appends (copy-on-write of the partial last page), publishing into the
//! index and retiring what a write replaced, deletes.

use super::*;

impl PageStore {
    /// Mark `seq` most recently used. Hot (every page read): one atomic store, no lock; the
    /// eviction order catches up lazily (see `evict_one`).
    pub(super) fn touch(&self, seq: &Sequence) {
        seq.last_use.store(self.tick.fetch_add(1, Ordering::Relaxed), Ordering::Relaxed);
    }

    pub(super) fn sequence(&self, ns: &Arc<NsEntry>, key: &SequenceKey) -> Arc<Sequence> {
        self.sequences
            .entry(key.clone())
            .or_insert_with(|| {
                let mut lru = self.lru.lock();
                let now = self.tick.fetch_add(1, Ordering::Relaxed);
                let seq = Arc::new(Sequence {
                    key: key.clone(),
                    ns: ns.clone(),
                    inner: Mutex::new(SeqInner::default()),
                    last_use: AtomicU64::new(now),
                    lru_key: AtomicU64::new(now),
                });
                lru.insert(now, seq.clone());
                seq
            })
            .clone()
    }

    /// Write one page into a fresh slot (not yet published).
    pub(super) fn write_slot(
        &self,
        ns: &NsEntry,
        key: &PageKey,
        tokens: u32,
        prefix_hash: u64,
        payload: &[u8],
        crc: u32,
    ) -> Result<PageEntry, StoreError> {
        // Charged to the tenant from here until the page is retired (released below if it is
        // never written, in `publish_locked` if it is never published).
        let charge = (HEADER_BYTES + payload.len()) as u64;
        self.charge_tenant(ns, charge, &key.sequence)?;
        let (file, slot) = match self.alloc_slot(ns.slot_bytes, &key.sequence, &ns.tenant) {
            Ok(s) => s,
            Err(e) => {
                ns.tenant.release(charge);
                return Err(e);
            }
        };
        let write_seq = self.write_seq.fetch_add(1, Ordering::AcqRel);
        let header = PageHeader {
            codec: ns.ns.codec,
            namespace_id: ns.ns.id(),
            sequence_id: key.sequence.sequence_id.clone(),
            layer: key.layer,
            page_index: key.page_index,
            token_count: tokens,
            payload_len: payload.len() as u32,
            write_seq,
            prefix_hash,
            payload_crc: crc,
        };
        if let Err(e) = file.write_page(slot, &header.encode(), payload) {
            tracing::error!(file = %file.path.display(), error = %e, "page write failed: pool file taken out of service");
            ns.tenant.release(charge);
            return Err(e.into());
        }
        if self.cfg.durability == Durability::Sync {
            if let Err(e) = file.flush_slot(slot) {
                tracing::error!(file = %file.path.display(), error = %e, "msync failed: pool file taken out of service");
                ns.tenant.release(charge);
                return Err(e.into());
            }
        } else {
            // Flushed later, in the background: counted in the writeback backlog until then.
            self.bytes_written.fetch_add(payload.len() as u64, Ordering::AcqRel);
        }
        Ok(PageEntry {
            file: file.id,
            slot,
            tokens,
            len: payload.len() as u32,
            crc,
            write_seq,
            prefix_hash,
            verified: true,
        })
    }

    /// Publish `entry` at `key` in a locked sequence, keeping the newest write (and, for a
    /// `handoff` copy, keeping any held page with at least as many tokens). Returns whether
    /// `entry` was published; if not, its slot is freed.
    pub(super) fn publish_locked(
        &self,
        seq: &Sequence,
        inner: &mut SeqInner,
        key: &PageKey,
        entry: PageEntry,
        handoff: bool,
    ) -> bool {
        let layers = &mut inner.layers;
        if layers.len() <= key.layer as usize {
            layers.resize_with(key.layer as usize + 1, Vec::new);
        }
        let pages = &mut layers[key.layer as usize];
        if pages.len() <= key.page_index as usize {
            pages.resize(key.page_index as usize + 1, None);
        }
        let slot = &mut pages[key.page_index as usize];
        let layer0 = key.layer == 0;
        if let Some(o) = slot
            && (o.write_seq > entry.write_seq
                || (handoff && o.tokens >= entry.tokens)
                || (key.sequence.is_content() && o.tokens == seq.ns.ns.page_tokens))
        {
            // The held page wins: the new slot was never counted, only free it.
            if let Some(f) = self.file(entry.file) {
                f.retire(entry.slot);
            }
            seq.ns.tenant.release((HEADER_BYTES + entry.len as usize) as u64);
            return false;
        }
        let old = slot.replace(entry);
        self.counters.pages.fetch_add(1, Ordering::Relaxed);
        self.counters.used_bytes.fetch_add((HEADER_BYTES + entry.len as usize) as u64, Ordering::Relaxed);
        if entry.prefix_hash != 0 && layer0 {
            *self.prefixes.entry((seq.ns.ns.id(), entry.prefix_hash)).or_insert(0) += 1;
        }
        if let Some(o) = old {
            self.retire_entry(&seq.ns, &o, layer0);
        }
        let kind = seq.ns.ns.model.layer(key.layer);
        if matches!(kind, LayerKind::Sliding { .. } | LayerKind::Chunked { .. }) && !key.sequence.is_content() {
            self.release_outside_window(seq, inner, key, kind);
        }
        true
    }

    /// Release the pages of a sliding-window or chunked layer that lie wholly before what its
    /// attention can still read (the window of the last token, or its chunk): a long sequence
    /// keeps a window's worth of pages, however long it grows. Released pages read as missing.
    ///
    /// O(pages released), not O(length): everything before the last page released is already
    /// gone, so the scan goes back from the window's start to the first hole; a page published
    /// out of order (a put, a recovery) behind the window is released by its own publish.
    fn release_outside_window(&self, seq: &Sequence, inner: &mut SeqInner, key: &PageKey, kind: LayerKind) {
        let (pt, layer) = (seq.ns.ns.page_tokens, key.layer);
        let first = kind.first_live_page(inner.layer_tokens(layer as usize, pt), pt) as usize;
        let Some(pages) = inner.layers.get_mut(layer as usize) else { return };
        let mut released = 0;
        let mut release = |p: &mut Option<PageEntry>| {
            if let Some(o) = p.take() {
                self.retire_entry(&seq.ns, &o, layer == 0);
                released += 1;
            }
        };
        let own = key.page_index as usize;
        if own < first
            && let Some(p) = pages.get_mut(own)
        {
            release(p);
        }
        for i in (0..first.min(pages.len())).rev() {
            if pages[i].is_none() {
                break;
            }
            release(&mut pages[i]);
        }
        if released > 0 {
            seq.ns.counters.window_releases.fetch_add(released, Ordering::Relaxed);
        }
    }

    /// Store pages validated against their namespaces (`kvcache_core::validate::page`; the
    /// service validates, and fences stale epochs, before calling). Content pages already held
    /// with the same bytes are counted, not written; with other bytes the whole put is refused
    /// before anything is written.
    pub fn put_pages(&self, mut pages: Vec<ValidPage>, mode: PutMode) -> Result<PutOutcome, StoreError> {
        let mut out = PutOutcome::default();
        let handoff = mode == PutMode::Handoff;
        if !handoff {
            out.deduplicated = self.dedup_content(&mut pages)?;
        }
        let content: Vec<SequenceKey> =
            pages.iter().filter(|v| v.key.sequence.is_content()).map(|v| v.key.sequence.clone()).collect();
        // A sequence over a prefix takes no pages of its own inside the prefix: one look per
        // run of pages of one sequence (content pages have none).
        let mut seen: Option<&SequenceKey> = None;
        for v in pages.iter().filter(|v| !v.key.sequence.is_content()) {
            if seen == Some(&v.key.sequence) {
                continue;
            }
            seen = Some(&v.key.sequence);
            // A state layer's pages are the sequence's own state, whatever its prefix.
            let ns = self.ns_of(&v.key.sequence.namespace)?;
            if let Some(p) = self.prefix_of(&v.key.sequence)
                && let Some(v) = pages.iter().find(|w| {
                    w.key.sequence == v.key.sequence
                        && (w.key.page_index as usize) < p.len()
                        && !ns.ns.layer_kind(w.key.layer).keeps_state()
                })
            {
                return Err(ValidationError::ContentPage(format!(
                    "page {} of sequence {:?} is in its prefix ({} content pages): put the prefix by key",
                    v.key.page_index,
                    v.key.sequence.sequence_id,
                    p.len()
                ))
                .into());
            }
        }
        for v in pages {
            let ns = self.ns_of(&v.key.sequence.namespace)?;
            if (handoff || v.key.sequence.is_content()) && self.holds_at_least(&v.key, v.token_count) {
                continue; // skip the write; the check is repeated under the lock at publish
            }
            let entry = self.write_slot(&ns, &v.key, v.token_count, v.prefix_hash, &v.payload, v.payload_crc)?;
            if self.publish_retrying(&ns, &v.key, entry, handoff) {
                out.written += 1;
                out.bytes += v.payload.len() as u64;
            }
        }
        self.touch_chain(content.iter());
        Ok(out)
    }

    /// The registered namespaces by name: what a caller validates pages against.
    pub fn namespace_table(&self) -> HashMap<String, Arc<NsEntry>> {
        self.namespaces.read().clone()
    }

    /// Whether the page at `key` is held with at least `tokens` tokens.
    pub(super) fn holds_at_least(&self, key: &PageKey, tokens: u32) -> bool {
        let Some(seq) = self.sequences.get(&key.sequence).map(|s| s.clone()) else { return false };
        let inner = seq.inner.lock();
        !inner.removed
            && inner
                .layers
                .get(key.layer as usize)
                .and_then(|l| l.get(key.page_index as usize))
                .is_some_and(|e| e.is_some_and(|e| e.tokens >= tokens))
    }

    pub(super) fn publish_retrying(&self, ns: &Arc<NsEntry>, key: &PageKey, entry: PageEntry, handoff: bool) -> bool {
        loop {
            let seq = self.sequence(ns, &key.sequence);
            let mut inner = seq.inner.lock();
            if inner.removed {
                continue; // evicted or deleted meanwhile: publish into a fresh sequence
            }
            let published = self.publish_locked(&seq, &mut inner, key, entry, handoff);
            drop(inner);
            self.touch(&seq);
            return published;
        }
    }

    /// Keys of every sequence held.
    pub fn sequence_keys(&self) -> Vec<SequenceKey> {
        self.sequences.iter().map(|e| e.key().clone()).collect()
    }

    /// Apply a validated append (`kvcache_core::validate::append`): its tokens go to the end of
    /// each of its layers, the partial last page copied on write.
    pub fn append(&self, cmd: &AppendCmd) -> Result<Vec<Appended>, StoreError> {
        let AppendCmd { sequence: key, layers, tokens, payload, expected_position } = cmd;
        let (tokens, expected_position) = (*tokens, *expected_position);
        let ns = self.ns_of(&key.namespace)?;
        // Every layer of one append has one layout (validated): model rows or indexer keys.
        let layout = layers.first().map_or(ns.layout, |&l| ns.ns.layout_for(l));
        let per_layer = layout.payload_bytes(tokens as usize);
        let pt = ns.ns.page_tokens;
        loop {
            let seq = self.sequence(&ns, key);
            let mut inner = seq.inner.lock();
            if inner.removed {
                continue;
            }
            if let Some(expected) = expected_position {
                for &l in layers {
                    let actual = inner.layer_tokens(l as usize, pt);
                    if actual != expected {
                        return Err(StoreError::Position { layer: l, expected, actual });
                    }
                }
            }
            let mut out = Vec::with_capacity(layers.len());
            for (i, &l) in layers.iter().enumerate() {
                let new = &payload[i * per_layer..(i + 1) * per_layer];
                let mut pos = inner.layer_tokens(l as usize, pt);
                let mut done = 0u32;
                let mut last_write_seq = 0;
                while done < tokens {
                    let page_index = (pos / pt as u64) as u32;
                    let in_page = (pos % pt as u64) as u32;
                    let take = (pt - in_page).min(tokens - done);
                    // The tokens going into this page: all of them (a decode step's one token)
                    // as they came, else sliced out plane by plane.
                    let sliced;
                    let chunk: &[u8] = if take == tokens {
                        new
                    } else {
                        let mut c = vec![0u8; layout.payload_bytes(take as usize)];
                        layout.slice_tokens(new, tokens as usize, done as usize, take as usize, &mut c);
                        sliced = c;
                        &sliced
                    };
                    let pkey = PageKey { sequence: key.clone(), layer: l, page_index };
                    let merged;
                    let body: &[u8] = if in_page > 0 {
                        // Copy-on-write: the partial page's tokens followed by the new ones
                        // (written once, not zeroed first: up to a page per append).
                        let old = inner.layers[l as usize][page_index as usize].expect("partial page present");
                        let held = self
                            .hold_verified(&seq, &mut inner, &pkey, &old)
                            .ok_or_else(|| StoreError::PartialPageLost(pkey.clone()))?;
                        merged = layout.concat_vec(&held[..], in_page as usize, chunk, take as usize);
                        &merged
                    } else {
                        chunk
                    };
                    let crc = kvcache_core::checksum::crc32c(body);
                    let entry = self.write_slot(&ns, &pkey, in_page + take, 0, body, crc)?;
                    self.publish_locked(&seq, &mut inner, &pkey, entry, false);
                    last_write_seq = entry.write_seq;
                    done += take;
                    pos += take as u64;
                }
                out.push(Appended { tokens: pos, last_write_seq });
            }
            drop(inner);
            self.touch(&seq);
            return Ok(out);
        }
    }

    /// Delete a sequence. Returns pages deleted.
    pub fn delete(&self, key: &SequenceKey) -> Result<u64, StoreError> {
        let Some(seq) = self.sequences.get(key).map(|s| s.clone()) else { return Ok(0) };
        let mut inner = seq.inner.lock();
        if inner.removed {
            return Ok(0);
        }
        let files: Vec<u32> = inner.layers.iter().flatten().flatten().map(|e| e.file).collect();
        let n = self.remove_sequence_locked(&seq, &mut inner);
        drop(inner);
        if self.cfg.durability == Durability::Sync {
            // The zeroed headers must be on disk before the delete is acknowledged.
            let mut files = files;
            files.sort_unstable();
            files.dedup();
            for id in files {
                if let Some(f) = self.file(id) {
                    f.flush()?;
                }
            }
        }
        Ok(n)
    }
}
