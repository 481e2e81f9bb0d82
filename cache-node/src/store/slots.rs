//! Slots: taking a free slot for a write (striped over pool files so concurrent writers do not
//! contend on one free list), growing the pool up to the capacity, writing a page into a slot.

use super::*;

impl PageStore {
    pub(super) fn file(&self, id: u32) -> Option<Arc<PoolFile>> {
        self.pools.read().files.get(id as usize).and_then(|f| f.clone())
    }

    pub(super) fn slots_per_file(&self, slot_bytes: usize) -> u32 {
        let seg = self.cfg.segment_bytes.min(self.cfg.capacity / 4).max(slot_bytes as u64);
        ((seg / slot_bytes as u64).max(1)).min(u32::MAX as u64) as u32
    }

    /// Take a slot of `slot_bytes`, growing the pool or evicting LRU sequences (never `exclude`).
    ///
    /// Writers are spread over up to [`WRITE_STRIPES`] files of the class: a buffered `pwrite`
    /// holds the file's inode lock for the whole copy, so concurrent puts into one file run one
    /// at a time (and spin on the lock). Each thread has a stripe number and starts its search
    /// at the class's open file of that number; while the pool is under half its capacity, a
    /// thread whose number is past the class's open files opens another file rather than share
    /// (so a class has at most `WRITE_STRIPES` files with free slots it opened for this).
    pub(super) fn alloc_slot(
        &self,
        slot_bytes: usize,
        exclude: &SequenceKey,
        writer: &Arc<super::TenantLedger>,
    ) -> Result<(Arc<PoolFile>, u32), StoreError> {
        let stripe = write_stripe() % WRITE_STRIPES;
        let mut may_stripe = true;
        // Bounded: each round evicts a sequence or fails.
        for _ in 0..100_000 {
            let eager = {
                let pools = self.pools.read();
                let open: Vec<&Arc<PoolFile>> =
                    pools.files.iter().flatten().filter(|f| f.slot_bytes == slot_bytes && f.has_free()).collect();
                let eager = may_stripe && stripe >= open.len() && self.room_to_stripe(&pools, slot_bytes);
                if !eager && !open.is_empty() {
                    let k = stripe % open.len();
                    for f in open[k..].iter().chain(&open[..k]) {
                        if let Some(s) = f.alloc() {
                            return Ok(((*f).clone(), s));
                        }
                    }
                }
                eager
            };
            if eager {
                // A file that only spreads writers: if it cannot be had, share an open one.
                may_stripe = false;
                match self.grow(slot_bytes, Some(stripe)) {
                    Ok(Some(r)) => return Ok(r),
                    Ok(None) => continue,
                    Err(e) => {
                        tracing::warn!(error = %e, "could not open another pool file to spread writes");
                        continue;
                    }
                }
            }
            if let Some(r) = self.grow(slot_bytes, None)? {
                return Ok(r);
            }
            if !self.evict_one(exclude, super::tenants::Victims::For(writer)) {
                return Err(StoreError::Full(format!(
                    "no free {slot_bytes}-byte slot within the {}-byte capacity and every resident sequence is leased, in use, or another tenant's reserved share",
                    self.cfg.capacity
                )));
            }
        }
        Err(StoreError::Full("eviction did not free a slot".into()))
    }

    /// Whether a class may open one more file to spread writers: only while the pool, with that
    /// file, stays within half its capacity, so striping never crowds out other size classes.
    pub(super) fn room_to_stripe(&self, pools: &Pools, slot_bytes: usize) -> bool {
        let bytes = self.slots_per_file(slot_bytes) as u64 * slot_bytes as u64;
        pools.total_bytes + bytes <= self.cfg.capacity / 2
    }

    /// Create a pool file of `slot_bytes` slots if the capacity allows, reclaiming empty files
    /// of other size classes first when it does not. `stripe`: a file opened only so that
    /// writer stripe has a file of its own; nothing is reclaimed for it, and `None` (the stripe
    /// has a file by now, or there is no room) means "take a slot from an open file".
    pub(super) fn grow(
        &self,
        slot_bytes: usize,
        stripe: Option<usize>,
    ) -> Result<Option<(Arc<PoolFile>, u32)>, StoreError> {
        let mut pools = self.pools.write();
        if let Some(stripe) = stripe {
            let open = pools.files.iter().flatten().filter(|f| f.slot_bytes == slot_bytes && f.has_free()).count();
            if stripe < open || !self.room_to_stripe(&pools, slot_bytes) {
                return Ok(None);
            }
        } else {
            // Another thread may have grown the class meanwhile.
            for f in pools.files.iter().flatten() {
                if f.slot_bytes == slot_bytes
                    && let Some(s) = f.alloc()
                {
                    return Ok(Some((f.clone(), s)));
                }
            }
        }
        let mut slots = self.slots_per_file(slot_bytes);
        let mut bytes = slots as u64 * slot_bytes as u64;
        if pools.total_bytes + bytes > self.cfg.capacity {
            // Return the capacity of empty files (any class, including failed ones).
            let empty: Vec<u32> =
                pools.files.iter().flatten().filter(|f| f.try_remove_if_empty()).map(|f| f.id).collect();
            for id in empty {
                if let Some(f) = pools.files[id as usize].take() {
                    pools.total_bytes -= f.file_bytes();
                    let _ = std::fs::remove_file(&f.path);
                }
            }
        }
        if pools.total_bytes + bytes > self.cfg.capacity {
            // Fit what is left, if at least one slot.
            let left = self.cfg.capacity - pools.total_bytes.min(self.cfg.capacity);
            slots = (left / slot_bytes as u64) as u32;
            if slots == 0 {
                return Ok(None);
            }
            bytes = slots as u64 * slot_bytes as u64;
        }
        let id = pools.files.len() as u32;
        let f = Arc::new(PoolFile::create(&self.cfg.data_dir, id, slot_bytes, slots, self.cfg.storage.clone())?);
        fsync_dir(&self.cfg.data_dir)?;
        pools.total_bytes += bytes;
        let s = f.alloc().expect("a new pool file has free slots");
        pools.files.push(Some(f.clone()));
        Ok(Some((f, s)))
    }
}
