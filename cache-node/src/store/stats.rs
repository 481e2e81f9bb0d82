//! Stats, flushes and shutdown: counters and gauges, the background flusher, the clean-shutdown
//! marker.

use super::*;

impl PageStore {
    /// Counters and gauges, with index memory measured from the live structures.
    pub fn stats(&self) -> StoreStats {
        let now = Instant::now();
        let mut index = 0usize;
        let mut active_leases = 0u64;
        let mut per_ns: HashMap<String, NamespaceStats> = HashMap::new();
        // Clone the handles first: a sequence lock must never be awaited while a map shard is
        // locked (delete and eviction take them in the other order).
        let seqs: Vec<Arc<Sequence>> = self.sequences.iter().map(|e| e.value().clone()).collect();
        for s in &seqs {
            let inner = s.inner.lock();
            index += std::mem::size_of::<SequenceKey>()
                + s.key.namespace.capacity()
                + s.key.sequence_id.capacity()
                + std::mem::size_of::<Sequence>()
                + 2 * std::mem::size_of::<usize>() // Arc counts
                + std::mem::size_of::<Arc<Sequence>>()
                + inner.layers.capacity() * std::mem::size_of::<Vec<Option<PageEntry>>>()
                + inner.layers.iter().map(|l| l.capacity() * std::mem::size_of::<Option<PageEntry>>()).sum::<usize>()
                + inner.leases.capacity() * std::mem::size_of::<(u64, Instant)>();
            active_leases += inner.leases.iter().filter(|l| l.1 > now).count() as u64;
            let u = per_ns.entry(s.key.namespace.clone()).or_default();
            if s.key.is_content() {
                u.content_keys += 1;
            } else {
                u.sequences += 1;
            }
            for l in &inner.layers {
                for p in l.iter().flatten() {
                    u.pages += 1;
                    u.bytes += (HEADER_BYTES + p.len as usize) as u64;
                }
            }
            u.tokens += inner.layer_tokens(0, s.ns.ns.page_tokens);
        }
        index += self.prefixes.len() * (std::mem::size_of::<((u64, u64), u32)>() + 8);
        let pools = self.pools.read();
        let files: Vec<_> = pools.files.iter().flatten().collect();
        let (rs, rb) = *self.recovery.lock();
        StoreStats {
            capacity_bytes: self.cfg.capacity,
            pool_bytes: pools.total_bytes,
            used_bytes: self.counters.used_bytes.load(Ordering::Relaxed),
            pages: self.counters.pages.load(Ordering::Relaxed),
            sequences: self.sequences.len() as u64,
            evictions: self.counters.evictions.load(Ordering::Relaxed),
            active_leases,
            index_bytes: index as u64,
            pool_files: files.iter().filter(|f| !f.is_failed()).count() as u64,
            pool_files_failed: files.iter().filter(|f| f.is_failed()).count() as u64,
            get_hits: self.counters.hits.load(Ordering::Relaxed),
            get_misses: self.counters.misses.load(Ordering::Relaxed),
            corrupt_pages_dropped: self.counters.corrupt.load(Ordering::Relaxed),
            leases_granted: self.counters.leases.load(Ordering::Relaxed),
            namespaces: self
                .namespaces()
                .into_iter()
                .filter_map(|ns| {
                    let e = self.namespace(&ns.name)?;
                    let c = &e.counters;
                    let mut u = per_ns.remove(&ns.name).unwrap_or_default();
                    u.name = ns.name;
                    u.tenant = ns.tenant;
                    u.get_hits = c.get_hits.load(Ordering::Relaxed);
                    u.get_misses = c.get_misses.load(Ordering::Relaxed);
                    u.dedup_hits = c.dedup_hits.load(Ordering::Relaxed);
                    u.conflicts = c.conflicts.load(Ordering::Relaxed);
                    u.evictions = c.evictions.load(Ordering::Relaxed);
                    u.match_hits = c.match_hits.load(Ordering::Relaxed);
                    u.match_misses = c.match_misses.load(Ordering::Relaxed);
                    u.window_releases = c.window_releases.load(Ordering::Relaxed);
                    Some(u)
                })
                .collect(),
            tenants: self.tenant_stats(),
            recovery_seconds: rs,
            recovery_bytes: rb,
        }
    }

    /// Flush every pool file with unflushed writes. Failed files are taken out of service.
    pub fn flush(&self) -> Vec<io::Error> {
        let upto = self.bytes_written.load(Ordering::Acquire);
        let files: Vec<_> = self.pools.read().files.iter().flatten().cloned().collect();
        let mut errs = Vec::new();
        for f in files {
            if let Err(e) = f.flush() {
                tracing::error!(file = %f.path.display(), error = %e, "msync failed: pool file taken out of service");
                errs.push(e);
            }
        }
        self.bytes_flushed.fetch_max(upto, Ordering::AcqRel);
        errs
    }

    /// Page bytes written and not yet covered by a completed flush: under async durability, the
    /// node's share of the dirty page cache the kernel still has to write back. While it is
    /// small, a write only copies into the page cache; a large one means writeback is behind
    /// and a write may be throttled by the kernel.
    pub fn writeback_backlog(&self) -> u64 {
        let flushed = self.bytes_flushed.load(Ordering::Acquire);
        self.bytes_written.load(Ordering::Acquire).saturating_sub(flushed)
    }

    /// Clean shutdown: flush everything and leave the marker that lets the next start skip
    /// payload verification.
    pub fn close(&self) -> Result<(), StoreError> {
        if let Some(e) = self.flush().into_iter().next() {
            return Err(e.into());
        }
        std::fs::File::create(self.cfg.data_dir.join(CLEAN_MARKER))?.sync_all()?;
        fsync_dir(&self.cfg.data_dir)?;
        Ok(())
    }

    /// Fault injection: make page writes to every current pool file fail.
    #[doc(hidden)]
    pub fn inject_write_failure(&self) {
        for f in self.pools.read().files.iter().flatten() {
            f.inject_write_failure();
        }
    }

    /// Fault injection: make the next flush of every pool file fail.
    #[doc(hidden)]
    pub fn inject_flush_failure(&self) {
        for f in self.pools.read().files.iter().flatten() {
            f.inject_flush_failure();
        }
    }
}

/// Flush every `period` while the store lives (async durability).
pub(super) fn flusher(store: Weak<PageStore>, period: Duration) {
    loop {
        std::thread::sleep(period);
        let Some(s) = store.upgrade() else { return };
        s.flush();
    }
}
