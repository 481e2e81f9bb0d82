//! A simulated power loss, for tests: what a pool file holds after the machine lost power,
//! rather than after the process died (SIGKILL keeps the OS page cache, so it cannot tell a
//! store that flushes from one that does not).
//!
//! [`PowerLoss`] watches every pool-file write and flush of a store (installed through
//! [`StoreConfig::storage`](crate::StoreConfig::storage)). It keeps, per file, the image the
//! disk holds: the file's bytes as of its last completed flush of each range. Writes go to the
//! real file as usual (the running store reads them back through its mapping, as it would from
//! the page cache). [`PowerLoss::crash`] then does what a power cut does:
//!
//! - every write not covered by a completed flush is lost;
//! - the last write in flight is torn at a 4 KiB sector boundary: a random number of its leading
//!   sectors reached the disk, the rest did not (a sector is written whole or not at all);
//!
//! and rewrites every file to that image. Creating, sizing and removing pool files are treated
//! as durable (the store fsyncs the directory after each). The store must be dropped (not
//! closed) before the crash and opened again after it.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Sector size: the unit a disk writes whole.
pub const SECTOR: u64 = 4096;

/// Hooks a pool file calls on its writes and flushes (see [`PowerLoss`]).
pub trait StorageObserver: Send + Sync + std::fmt::Debug {
    /// A pool file was created (zero-filled, `len` bytes) or opened.
    fn attached(&self, path: &Path);
    /// `len` bytes were written at `offset` (they are in the page cache, not on disk).
    fn wrote(&self, path: &Path, offset: u64, len: usize);
    /// `[offset, offset + len)` of the file was flushed: what it holds now is on disk.
    fn flushed(&self, path: &Path, offset: u64, len: usize);
}

#[derive(Debug, Default)]
struct Files {
    /// Per file: the bytes on disk.
    disk: HashMap<PathBuf, Vec<u8>>,
    /// Writes since they were last covered by a flush, oldest first: (file, offset, len).
    pending: Vec<(PathBuf, u64, usize)>,
}

/// The power-loss simulator. Share one between the store (as its observer) and the test.
#[derive(Debug, Default)]
pub struct PowerLoss {
    files: Mutex<Files>,
}

/// What a crash did, for the test's own checks and messages.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CrashReport {
    /// Writes lost whole.
    pub lost_writes: usize,
    /// Of the write in flight: (its length, bytes of it that reached the disk).
    pub torn: Option<(usize, usize)>,
}

impl PowerLoss {
    /// A simulator that has seen no file yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Cut the power: rewrite every watched file to what its disk holds, the last write torn at
    /// a sector boundary chosen by `pick(sectors)` (returns how many of the write's `sectors`
    /// leading sectors reached the disk, `0..=sectors`).
    pub fn crash(&self, pick: impl FnOnce(usize) -> usize) -> std::io::Result<CrashReport> {
        let mut g = self.files.lock();
        let files = &mut *g;
        let mut report = CrashReport { lost_writes: files.pending.len(), torn: None };
        if let Some((path, offset, len)) = files.pending.pop() {
            // The sectors the write touches; the first `k` of them reached the disk.
            let (first, end) = (offset / SECTOR, (offset + len as u64).div_ceil(SECTOR));
            let sectors = (end - first) as usize;
            let k = pick(sectors).min(sectors) as u64;
            let upto = ((first + k) * SECTOR).min(offset + len as u64);
            if upto > offset
                && let Some(disk) = files.disk.get_mut(&path)
            {
                let f = std::fs::File::open(&path)?;
                let n = (upto - offset) as usize;
                let mut buf = vec![0u8; n];
                f.read_exact_at(&mut buf, offset)?;
                disk[offset as usize..offset as usize + n].copy_from_slice(&buf);
                report.torn = Some((len, n));
                report.lost_writes -= 1;
            } else {
                report.torn = Some((len, 0));
            }
        }
        files.pending.clear();
        for (path, disk) in &files.disk {
            if path.exists() {
                std::fs::write(path, disk)?;
            }
        }
        Ok(report)
    }

    /// Writes not yet covered by a flush.
    pub fn unflushed_writes(&self) -> usize {
        self.files.lock().pending.len()
    }
}

impl StorageObserver for PowerLoss {
    fn attached(&self, path: &Path) {
        // A new file is zero-filled on disk; an opened one holds what a previous crash (or
        // clean shutdown) left.
        let bytes = std::fs::read(path).unwrap_or_default();
        self.files.lock().disk.insert(path.to_owned(), bytes);
    }

    fn wrote(&self, path: &Path, offset: u64, len: usize) {
        self.files.lock().pending.push((path.to_owned(), offset, len));
    }

    fn flushed(&self, path: &Path, offset: u64, len: usize) {
        let mut g = self.files.lock();
        let files = &mut *g;
        let Some(disk) = files.disk.get_mut(path) else { return };
        let end = (offset as usize + len).min(disk.len());
        if let Ok(f) = std::fs::File::open(path) {
            let _ = f.read_exact_at(&mut disk[offset as usize..end], offset);
        }
        files.pending.retain(|(p, o, l)| !(p == path && *o >= offset && *o + *l as u64 <= end as u64));
    }
}
