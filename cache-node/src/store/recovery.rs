//! Recovery: scanning every pool file in parallel at start, verifying headers (and payloads
//! after an unclean shutdown), keeping the newest copy of each page and freeing the rest.

use super::*;

impl PageStore {
    pub(super) fn recover(&self) -> Result<(), StoreError> {
        let started = Instant::now();
        let dir = &self.cfg.data_dir;
        let marker = dir.join(CLEAN_MARKER);
        let clean = marker.exists();
        if clean {
            std::fs::remove_file(&marker)?;
            fsync_dir(dir)?;
        }
        let mut found = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some((slot_bytes, id)) = name.to_str().and_then(pool::parse_file_name) else { continue };
            match PoolFile::open(entry.path(), id, slot_bytes, self.cfg.storage.clone()) {
                Ok(f) => found.push(Arc::new(f)),
                Err(e) => {
                    // Shorter than one slot (a torn file extension): nothing in it can verify.
                    tracing::warn!(file = %entry.path().display(), error = %e, "unusable pool file removed");
                    std::fs::remove_file(entry.path())?;
                }
            }
        }
        let ns_by_id = self.ns_by_id.read().clone();
        // Scan files in parallel: (file index, slot, key, entry).
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get()).min(found.len().max(1));
        let scanned: Vec<Vec<(usize, PageKey, PageEntry)>> = std::thread::scope(|sc| {
            let handles: Vec<_> = (0..threads)
                .map(|t| {
                    let found = &found;
                    let ns_by_id = &ns_by_id;
                    sc.spawn(move || {
                        let mut out = Vec::new();
                        for (fi, f) in found.iter().enumerate().skip(t).step_by(threads) {
                            for slot in 0..f.slots {
                                if let Some((k, e)) = scan_slot(f, slot, ns_by_id, clean) {
                                    out.push((fi, k, e));
                                }
                            }
                        }
                        out
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("scan thread")).collect()
        });
        let mut best: HashMap<PageKey, (usize, PageEntry)> = HashMap::new();
        let mut used: Vec<Vec<bool>> = found.iter().map(|f| vec![false; f.slots as usize]).collect();
        let mut max_seq = 0;
        for (fi, k, e) in scanned.into_iter().flatten() {
            max_seq = max_seq.max(e.write_seq);
            match best.get(&k) {
                Some((_, b)) if b.write_seq >= e.write_seq => {}
                _ => {
                    best.insert(k, (fi, e));
                }
            }
        }
        let mut pools = Pools::default();
        let max_id = found.iter().map(|f| f.id).max();
        if let Some(m) = max_id {
            pools.files.resize(m as usize + 1, None);
        }
        for f in &found {
            pools.total_bytes += f.file_bytes();
            pools.files[f.id as usize] = Some(f.clone());
        }
        let scanned_bytes = pools.total_bytes;
        let n_pages = best.len();
        for (k, (fi, mut e)) in best {
            used[fi][e.slot as usize] = true;
            e.file = found[fi].id;
            let ns = ns_by_id[&namespace_id_of(&k)].clone();
            let seq = self.sequence(&ns, &k.sequence);
            let mut inner = seq.inner.lock();
            ns.tenant.charge((HEADER_BYTES + e.len as usize) as u64);
            self.publish_locked(&seq, &mut inner, &k, e, false);
        }
        for (fi, f) in found.iter().enumerate() {
            let mut free = Vec::new();
            for slot in (0..f.slots).rev() {
                if !used[fi][slot as usize] {
                    // Superseded, unverifiable or never written: make sure it stays free.
                    if f.slot(slot)[..4] != [0; 4] {
                        f.unalloc(slot);
                    }
                    free.push(slot);
                }
            }
            f.set_free_list(free);
        }
        *self.pools.write() = pools;
        self.write_seq.store(max_seq + 1, Ordering::Release);
        self.recover_chains()?;
        let secs = started.elapsed().as_secs_f64();
        *self.recovery.lock() = (secs, scanned_bytes);
        if scanned_bytes > 0 {
            tracing::info!(pages = n_pages, bytes = scanned_bytes, seconds = secs, clean, "recovered pool files");
        }
        Ok(())
    }
}

fn namespace_id_of(k: &PageKey) -> u64 {
    kvcache_core::key::namespace_id(&k.sequence.namespace)
}

/// Verify one slot: header CRC, known namespace, layout-consistent size and — unless the last
/// shutdown was clean — the payload CRC.
fn scan_slot(
    f: &PoolFile,
    slot: u32,
    ns_by_id: &HashMap<u64, Arc<NsEntry>>,
    clean: bool,
) -> Option<(PageKey, PageEntry)> {
    let bytes = f.slot(slot);
    if bytes[..4] != kvcache_core::page::MAGIC {
        return None;
    }
    let h = PageHeader::decode(bytes).ok()?;
    let ns = ns_by_id.get(&h.namespace_id)?;
    let plen = h.payload_len as usize;
    if h.codec != ns.ns.codec
        || h.token_count == 0
        || h.token_count > ns.ns.page_tokens
        || kvcache_core::validate::page_key(
            &ns.ns,
            &PageKey {
                sequence: SequenceKey::new(ns.ns.name.clone(), h.sequence_id.clone()),
                layer: h.layer,
                page_index: h.page_index,
            },
        )
        .is_err()
        || plen != ns.ns.layout_for(h.layer).payload_bytes(h.token_count as usize)
        || HEADER_BYTES + plen > f.slot_bytes
    {
        return None;
    }
    if !clean && h.verify_payload(&bytes[HEADER_BYTES..HEADER_BYTES + plen]).is_err() {
        return None;
    }
    let key = PageKey {
        sequence: SequenceKey { namespace: ns.ns.name.clone(), sequence_id: h.sequence_id },
        layer: h.layer,
        page_index: h.page_index,
    };
    Some((
        key,
        PageEntry {
            file: f.id,
            slot,
            tokens: h.token_count,
            len: plen as u32,
            crc: h.payload_crc,
            write_seq: h.write_seq,
            prefix_hash: h.prefix_hash,
            verified: !clean,
        },
    ))
}
