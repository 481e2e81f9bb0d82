//! Eviction: making room when the pool is full, least recently used unleased sequence first.

use super::tenants::Victims;
use super::*;

/// Bytes a locked sequence's pages take (headers included).
fn sequence_bytes(inner: &SeqInner) -> u64 {
    inner.layers.iter().flatten().flatten().map(|e| (HEADER_BYTES + e.len as usize) as u64).sum()
}

impl PageStore {
    /// Evict the least recently used sequence that is not leased, not locked, not `exclude`
    /// and one of `victims` (see [`Victims`]). Returns false when there is none.
    pub(super) fn evict_one(&self, exclude: &SequenceKey, victims: Victims<'_>) -> bool {
        let now = Instant::now();
        // The oldest entry first. One touched since it was filed moves to its last use and the
        // search goes on; the first whose key is its last use is the least recently used. Leased
        // or busy sequences are passed over and stay filed where they are.
        let victim = {
            let mut lru = self.lru.lock();
            let mut passed = Vec::new();
            let mut found = None;
            while let Some((k, s)) = lru.pop_first() {
                let used = s.last_use.load(Ordering::Relaxed);
                if used > k {
                    s.lru_key.store(used, Ordering::Relaxed);
                    lru.insert(used, s);
                    continue;
                }
                let eligible = &s.key != exclude
                    && s.inner.try_lock().is_some_and(|inner| {
                        !inner.removed && !inner.pinned(now) && victims.allows(&s.ns.tenant, || sequence_bytes(&inner))
                    });
                passed.push((k, s.clone()));
                if eligible {
                    found = Some(s);
                    break;
                }
            }
            // Put back what was passed over (and the victim: removal unfiles it under its lock).
            lru.extend(passed);
            found
        };
        let Some(v) = victim else { return false };
        let Some(mut inner) = v.inner.try_lock() else { return true };
        if inner.removed || inner.pinned(now) {
            return true;
        }
        self.remove_sequence_locked(&v, &mut inner);
        self.counters.evictions.fetch_add(1, Ordering::Relaxed);
        v.ns.counters.evictions.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Drop every page of a locked sequence and unlink it from the map.
    pub(super) fn remove_sequence_locked(&self, seq: &Arc<Sequence>, inner: &mut SeqInner) -> u64 {
        let mut n = 0;
        for layer in std::mem::take(&mut inner.layers) {
            for e in layer.into_iter().flatten() {
                self.retire_entry(&seq.ns, &e, true);
                n += 1;
            }
        }
        inner.removed = true;
        if inner.prefix.take().is_some() {
            self.remove_chain(&seq.key);
        }
        self.lru.lock().remove(&seq.lru_key.load(Ordering::Relaxed));
        for (id, _) in inner.leases.drain(..) {
            self.leases.remove(&id);
        }
        self.sequences.remove_if(&seq.key, |_, v| Arc::ptr_eq(v, seq));
        n
    }

    pub(super) fn retire_entry(&self, ns: &NsEntry, e: &PageEntry, layer0: bool) {
        if let Some(f) = self.file(e.file) {
            f.retire(e.slot);
        }
        self.counters.pages.fetch_sub(1, Ordering::Relaxed);
        let bytes = (HEADER_BYTES + e.len as usize) as u64;
        self.counters.used_bytes.fetch_sub(bytes, Ordering::Relaxed);
        ns.tenant.release(bytes);
        if e.prefix_hash != 0 && layer0 {
            self.prefixes.remove_if_mut(&(ns.ns.id(), e.prefix_hash), |_, c| {
                *c -= 1;
                *c == 0
            });
        }
    }
}
