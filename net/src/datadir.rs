//! [`DataDirLock`]: the exclusive lock a process takes on a data directory it owns (a node's pool
//! files, the coordinator's state), so a second process on the same directory is refused at
//! start instead of writing into live pool files and clean-shutdown markers.
//!
//! The lock is `flock` on `DIR/LOCK` (released by the kernel when the process dies, however it
//! dies: no stale lock after SIGKILL), and the file names the holder (its pid) for the refusal
//! message. Two opens in one process conflict too.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

/// How long a lock held by this same process is waited for before it is refused.
const SAME_PROCESS_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Why a data directory could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    /// Another process (or another store in this one) holds it.
    #[error(
        "data directory {} is in use by another kvcache process ({holder}): stop that process, or give this one another --data-dir",
        dir.display()
    )]
    Locked {
        /// The directory.
        dir: PathBuf,
        /// Who holds it, as its lock file says ("pid 1234").
        holder: String,
    },
    /// The directory or its lock file cannot be created or locked.
    #[error("data directory {}: {source}", dir.display())]
    Io {
        /// The directory.
        dir: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// An exclusive hold on a data directory, released when dropped.
#[derive(Debug)]
pub struct DataDirLock {
    _file: File,
    dir: PathBuf,
}

impl DataDirLock {
    /// Create `dir` if needed and lock it, or say who holds it.
    pub fn acquire(dir: &Path) -> Result<Self, DataDirError> {
        let io = |source| DataDirError::Io { dir: dir.to_owned(), source };
        std::fs::create_dir_all(dir).map_err(io)?;
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join("LOCK"))
            .map_err(io)?;
        // A holder in this very process is a store being dropped on another thread (a flush
        // thread's last reference): wait for it, bounded. Another process is refused at once.
        let me = format!("pid {}", std::process::id());
        let mut waited = std::time::Duration::ZERO;
        loop {
            match f.try_lock() {
                Ok(()) => break,
                Err(TryLockError::WouldBlock) => {
                    let mut holder = String::new();
                    let _ = f.rewind();
                    let _ = f.read_to_string(&mut holder);
                    let holder = holder.trim();
                    if holder == me && waited < SAME_PROCESS_WAIT {
                        std::thread::sleep(std::time::Duration::from_millis(10));
                        waited += std::time::Duration::from_millis(10);
                        continue;
                    }
                    let holder = if holder.is_empty() { "holder unknown".to_owned() } else { holder.to_owned() };
                    return Err(DataDirError::Locked { dir: dir.to_owned(), holder });
                }
                Err(TryLockError::Error(e)) => return Err(io(e)),
            }
        }
        f.set_len(0).and_then(|_| f.rewind()).and_then(|_| writeln!(f, "pid {}", std::process::id())).map_err(io)?;
        Ok(Self { _file: f, dir: dir.to_owned() })
    }

    /// The directory held.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_hold_on_a_directory_is_refused_naming_the_holder_until_the_first_is_dropped() {
        let dir = std::env::temp_dir().join(format!("kvcache-lock-{}", std::process::id()));
        let first = DataDirLock::acquire(&dir).unwrap();
        let e = DataDirLock::acquire(&dir).unwrap_err().to_string();
        assert!(e.contains(&format!("pid {}", std::process::id())) && e.contains("--data-dir"), "{e}");
        drop(first);
        let again = DataDirLock::acquire(&dir).unwrap();
        assert_eq!(again.dir(), dir);
        drop(again);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
