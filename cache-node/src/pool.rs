//! Pool files: fixed-size, memory-mapped files of equal slots.
//!
//! File layout (`pool-<slot_bytes>-<id>.pool` under the data dir): `slots × slot_bytes`, slot `i`
//! at offset `i · slot_bytes`. A slot is a 128-byte [`PageHeader`](kvcache_core::PageHeader)
//! followed by the payload; the rest of the slot is unused. A slot whose header does not verify
//! (zeroed, torn, flipped) is free. Slot sizes are per size class: `128 + page payload` rounded up
//! to 4 KiB, so each namespace's full pages fill their slots and partial pages reuse the class.
//!
//! Slot life cycle, kept by one atomic word per slot (`RETIRED` bit | reader holds):
//! free (in the free list) → owned by one writer (not published) → published in the index
//! (readers take holds) → retired (removed from the index; header zeroed) → freed when the last
//! hold drops. A slot is therefore never rewritten while a response still refers to it.
//!
//! Writes go through `pwrite` into the page cache, reads through the (shared) mapping, which
//! sees the same pages. Nothing is ever stored through the mapping, so its page-table entries
//! stay read-only and clean: writeback (the flusher's msync) has no mapped dirty page to
//! write-protect, so it sends no TLB-shootdown interrupts to the threads reading and computing,
//! and a full-page `pwrite` into a hole needs no zero-fill, unlike a first store through the
//! mapping. A write error (ENOSPC on a sparse file, EIO) becomes an error on that put and takes
//! the file out of service; a store through the mapping would have been a SIGBUS.

use bytes::Bytes;
use memmap2::MmapRaw;
use parking_lot::Mutex;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::powerloss::StorageObserver;
use kvcache_core::page::HEADER_BYTES;

const RETIRED: u64 = 1 << 63;

/// One memory-mapped pool file.
pub struct PoolFile {
    /// Index in the store's file table.
    pub id: u32,
    /// Path on disk.
    pub path: PathBuf,
    /// Bytes per slot.
    pub slot_bytes: usize,
    /// Slots in the file.
    pub slots: u32,
    map: MmapRaw,
    file: File,
    state: Box<[AtomicU64]>,
    free: Mutex<Vec<u32>>,
    failed: AtomicBool,
    dirty: AtomicBool,
    removed: AtomicBool,
    inject_flush_failure: AtomicBool,
    inject_write_failure: AtomicBool,
    /// Sees every write and flush (a power-loss simulation in tests); `None` in production.
    observer: Option<Arc<dyn StorageObserver>>,
}

impl std::fmt::Debug for PoolFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolFile").field("path", &self.path).field("slot_bytes", &self.slot_bytes).finish()
    }
}

/// File name of a pool file.
pub fn file_name(slot_bytes: usize, id: u32) -> String {
    format!("pool-{slot_bytes}-{id}.pool")
}

/// Parse a pool file name into (slot_bytes, id).
pub fn parse_file_name(name: &str) -> Option<(usize, u32)> {
    let rest = name.strip_prefix("pool-")?.strip_suffix(".pool")?;
    let (a, b) = rest.split_once('-')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

impl PoolFile {
    /// Create a new zero-filled pool file (every slot free).
    pub fn create(
        dir: &Path,
        id: u32,
        slot_bytes: usize,
        slots: u32,
        observer: Option<Arc<dyn StorageObserver>>,
    ) -> io::Result<PoolFile> {
        let path = dir.join(file_name(slot_bytes, id));
        let file = OpenOptions::new().read(true).write(true).create_new(true).open(&path)?;
        file.set_len(slot_bytes as u64 * slots as u64)?;
        let pf = Self::map(id, path, file, slot_bytes, slots, observer)?;
        *pf.free.lock() = (0..slots).rev().collect();
        Ok(pf)
    }

    /// Open an existing pool file; all slots start unaccounted (recovery decides what is free).
    pub fn open(
        path: PathBuf,
        id: u32,
        slot_bytes: usize,
        observer: Option<Arc<dyn StorageObserver>>,
    ) -> io::Result<PoolFile> {
        let file = OpenOptions::new().read(true).write(true).open(&path)?;
        let len = file.metadata()?.len();
        let slots = (len / slot_bytes as u64) as u32;
        Self::map(id, path, file, slot_bytes, slots, observer)
    }

    fn map(
        id: u32,
        path: PathBuf,
        file: File,
        slot_bytes: usize,
        slots: u32,
        observer: Option<Arc<dyn StorageObserver>>,
    ) -> io::Result<PoolFile> {
        if slots == 0 {
            return Err(io::Error::other("pool file holds no slot"));
        }
        let map = MmapRaw::map_raw(&file)?;
        if let Some(o) = &observer {
            o.attached(&path);
        }
        Ok(PoolFile {
            id,
            path,
            slot_bytes,
            slots,
            map,
            file,
            state: (0..slots).map(|_| AtomicU64::new(0)).collect(),
            free: Mutex::new(Vec::new()),
            failed: AtomicBool::new(false),
            dirty: AtomicBool::new(false),
            removed: AtomicBool::new(false),
            inject_flush_failure: AtomicBool::new(false),
            inject_write_failure: AtomicBool::new(false),
            observer,
        })
    }

    /// Bytes of the file.
    pub fn file_bytes(&self) -> u64 {
        self.slot_bytes as u64 * self.slots as u64
    }

    /// The bytes of slot `slot` (header + rest of the slot).
    pub fn slot(&self, slot: u32) -> &[u8] {
        assert!(slot < self.slots);
        // SAFETY: the mapping is `slots · slot_bytes` long and lives as long as `self`. Slots are
        // only written by the one writer that owns an unpublished slot; a published slot is
        // immutable until retired and freed, which waits for every reader hold.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr().add(slot as usize * self.slot_bytes), self.slot_bytes) }
    }

    /// Write `header` and `payload` into slot `slot`, payload first and header (with its CRC)
    /// last, so a torn write leaves a header that does not verify. An error takes the file out
    /// of service.
    pub fn write_page(&self, slot: u32, header: &[u8; HEADER_BYTES], payload: &[u8]) -> io::Result<()> {
        assert!(slot < self.slots && HEADER_BYTES + payload.len() <= self.slot_bytes);
        let base = slot as u64 * self.slot_bytes as u64;
        // The caller owns `slot` (allocated, not yet published): no reader can observe these
        // bytes until the index publishes the slot.
        let r = if self.inject_write_failure.load(Ordering::Acquire) {
            Err(io::Error::other("injected write failure"))
        } else {
            self.write_at(payload, base + HEADER_BYTES as u64).and_then(|()| self.write_at(header, base))
        };
        self.dirty.store(true, Ordering::Release);
        if r.is_err() {
            self.failed.store(true, Ordering::Release);
        }
        r
    }

    /// `pwrite` into the page cache (seen by the observer, if any).
    fn write_at(&self, bytes: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(bytes, offset)?;
        if let Some(o) = &self.observer {
            o.wrote(&self.path, offset, bytes.len());
        }
        Ok(())
    }

    /// `msync` of `[offset, offset + len)` (seen by the observer once it completed).
    fn sync_range(&self, offset: usize, len: usize) -> io::Result<()> {
        self.map.flush_range(offset, len)?;
        if let Some(o) = &self.observer {
            o.flushed(&self.path, offset as u64, len);
        }
        Ok(())
    }

    fn zero_header(&self, slot: u32) {
        let base = slot as u64 * self.slot_bytes as u64;
        // The header of a retired slot is no longer read by anyone (readers hold payload bytes
        // only, and index metadata carries the header fields). If it cannot be zeroed, a
        // restart could bring the page back: take the file out of service instead.
        if let Err(e) = self.write_at(&[0u8; HEADER_BYTES], base) {
            tracing::error!(file = %self.path.display(), error = %e, "zeroing a header failed: pool file taken out of service");
            self.failed.store(true, Ordering::Release);
        }
        self.dirty.store(true, Ordering::Release);
    }

    /// Take a free slot, if any (none from a failed file).
    pub fn alloc(&self) -> Option<u32> {
        if self.failed.load(Ordering::Acquire) || self.removed.load(Ordering::Acquire) {
            return None;
        }
        self.free.lock().pop()
    }

    /// Whether [`alloc`](Self::alloc) would find a slot now (a hint: another thread may take it).
    pub fn has_free(&self) -> bool {
        !self.failed.load(Ordering::Acquire) && !self.removed.load(Ordering::Acquire) && !self.free.lock().is_empty()
    }

    /// Return a slot that was allocated but never published.
    pub fn unalloc(&self, slot: u32) {
        self.zero_header(slot);
        self.free.lock().push(slot);
    }

    /// Mark a slot as published (used by recovery for slots it keeps).
    pub fn set_free_list(&self, free: Vec<u32>) {
        *self.free.lock() = free;
    }

    /// Take a reader hold on a published slot. Must be called while the slot is reachable from
    /// the index (under the sequence lock), so retirement cannot have started.
    pub fn hold(self: &Arc<Self>, slot: u32) -> SlotHold {
        self.state[slot as usize].fetch_add(1, Ordering::AcqRel);
        SlotHold { file: self.clone(), slot }
    }

    /// Retire a published slot that was just removed from the index: its header is zeroed now
    /// (a restart will not bring it back), its space is reused once no reader holds it.
    pub fn retire(&self, slot: u32) {
        self.zero_header(slot);
        let prev = self.state[slot as usize].fetch_or(RETIRED, Ordering::AcqRel);
        if prev == 0 {
            self.free_slot(slot);
        }
    }

    fn release(&self, slot: u32) {
        let prev = self.state[slot as usize].fetch_sub(1, Ordering::AcqRel);
        if prev == RETIRED | 1 {
            self.free_slot(slot);
        }
    }

    fn free_slot(&self, slot: u32) {
        self.state[slot as usize].store(0, Ordering::Release);
        self.free.lock().push(slot);
    }

    /// Free slots right now.
    pub fn free_slots(&self) -> usize {
        self.free.lock().len()
    }

    /// If every slot is free, mark the file removed (no further allocation) and return true.
    pub fn try_remove_if_empty(&self) -> bool {
        let free = self.free.lock();
        if free.len() == self.slots as usize && !self.removed.swap(true, Ordering::AcqRel) {
            return true;
        }
        false
    }

    /// Whether a flush failed and the file is out of service.
    pub fn is_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// Whether the file has been removed to return its capacity.
    pub fn is_removed(&self) -> bool {
        self.removed.load(Ordering::Acquire)
    }

    /// msync the whole file if it has unflushed writes. A failure takes the file out of service
    /// for good (it is not retried: after a failed writeback the kernel may have dropped the
    /// dirty pages, so nothing in the file can be trusted to be durable).
    pub fn flush(&self) -> io::Result<()> {
        if !self.dirty.swap(false, Ordering::AcqRel) || self.is_failed() {
            return Ok(());
        }
        let r = if self.inject_flush_failure.load(Ordering::Acquire) {
            Err(io::Error::other("injected flush failure"))
        } else {
            self.sync_range(0, self.slot_bytes * self.slots as usize)
        };
        if r.is_err() {
            self.failed.store(true, Ordering::Release);
        }
        r
    }

    /// msync one slot (sync durability). Same failure rule as [`PoolFile::flush`].
    pub fn flush_slot(&self, slot: u32) -> io::Result<()> {
        if self.is_failed() {
            return Err(io::Error::other("pool file out of service"));
        }
        let r = if self.inject_flush_failure.load(Ordering::Acquire) {
            Err(io::Error::other("injected flush failure"))
        } else {
            self.sync_range(slot as usize * self.slot_bytes, self.slot_bytes)
        };
        if r.is_err() {
            self.failed.store(true, Ordering::Release);
        }
        r
    }

    /// Make page writes to this file fail, as a full disk or a failing device would
    /// (fault-injection for tests and drills).
    #[doc(hidden)]
    pub fn inject_write_failure(&self) {
        self.inject_write_failure.store(true, Ordering::Release);
    }

    /// Make the next flush of this file fail (fault-injection for tests and drills).
    #[doc(hidden)]
    pub fn inject_flush_failure(&self) {
        self.inject_flush_failure.store(true, Ordering::Release);
        self.dirty.store(true, Ordering::Release);
    }
}

/// A reader's hold on a published slot: the slot is not reused while it lives.
pub struct SlotHold {
    file: Arc<PoolFile>,
    slot: u32,
}

impl Drop for SlotHold {
    fn drop(&mut self) {
        self.file.release(self.slot);
    }
}

impl SlotHold {
    /// The payload of the held slot as `Bytes` that keep the hold: no copy of page bytes.
    pub fn into_payload(self, len: usize) -> Bytes {
        assert!(HEADER_BYTES + len <= self.file.slot_bytes);
        Bytes::from_owner(HeldPayload { hold: self, len })
    }

    /// The held slot's bytes.
    pub fn bytes(&self) -> &[u8] {
        self.file.slot(self.slot)
    }
}

struct HeldPayload {
    hold: SlotHold,
    len: usize,
}

impl AsRef<[u8]> for HeldPayload {
    fn as_ref(&self) -> &[u8] {
        &self.hold.bytes()[HEADER_BYTES..HEADER_BYTES + self.len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_slot_is_not_reused_until_the_last_reader_drops() {
        let dir = tempfile::tempdir().unwrap();
        let f = Arc::new(PoolFile::create(dir.path(), 0, 4096, 1, None).unwrap());
        let s = f.alloc().unwrap();
        f.write_page(s, &[1u8; HEADER_BYTES], &[9u8; 100]).unwrap();
        let payload = f.hold(s).into_payload(100);
        let second = f.hold(s);
        f.retire(s);
        assert_eq!(f.alloc(), None, "retired slot reused under a reader");
        drop(second);
        assert_eq!(f.alloc(), None);
        assert_eq!(&payload[..], &[9u8; 100][..]);
        drop(payload);
        assert_eq!(f.alloc(), Some(s));
    }

    #[test]
    fn a_failed_flush_takes_the_file_out_of_service() {
        let dir = tempfile::tempdir().unwrap();
        let f = PoolFile::create(dir.path(), 0, 4096, 4, None).unwrap();
        f.inject_flush_failure();
        assert!(f.flush().is_err());
        assert!(f.is_failed());
        assert_eq!(f.alloc(), None);
        assert!(f.flush_slot(0).is_err());
    }

    #[test]
    fn file_names_round_trip() {
        assert_eq!(parse_file_name(&file_name(69632, 12)), Some((69632, 12)));
        assert_eq!(parse_file_name("pool-x-1.pool"), None);
    }
}
