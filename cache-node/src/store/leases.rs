//! Leases: pinning a sequence against eviction for a TTL.

use super::*;

impl PageStore {
    /// Pin a sequence for `ttl`. Returns (lease id, expiry).
    pub fn lease(&self, key: &SequenceKey, ttl: Duration) -> Result<(u64, Instant), StoreError> {
        let seq = self
            .sequences
            .get(key)
            .map(|s| s.clone())
            .ok_or_else(|| StoreError::NoSequence(key.sequence_id.clone()))?;
        let mut inner = seq.inner.lock();
        if inner.removed {
            return Err(StoreError::NoSequence(key.sequence_id.clone()));
        }
        let now = Instant::now();
        inner.leases.retain(|&(id, t)| {
            let live = t > now;
            if !live {
                self.leases.remove(&id);
            }
            live
        });
        let id = self.lease_seq.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed);
        let until = now + ttl;
        inner.leases.push((id, until));
        self.leases.insert(id, key.clone());
        self.counters.leases.fetch_add(1, Ordering::Relaxed);
        Ok((id, until))
    }

    /// Release a lease; false if unknown or expired.
    pub fn release(&self, lease_id: u64) -> bool {
        let Some((_, key)) = self.leases.remove(&lease_id) else { return false };
        let Some(seq) = self.sequences.get(&key).map(|s| s.clone()) else { return false };
        let mut inner = seq.inner.lock();
        let before = inner.leases.len();
        inner.leases.retain(|&(id, _)| id != lease_id);
        before != inner.leases.len()
    }
}
