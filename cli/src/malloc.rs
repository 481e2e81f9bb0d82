//! glibc malloc settings for the services' large buffers, applied by re-executing once.
//!
//! hyper allocates each received HTTP/2 frame buffer (up to 1 MiB here) with `malloc`. Above
//! its 128 KiB threshold glibc serves such a buffer with a fresh `mmap` that the kernel faults in
//! and zeroes 4 KiB at a time, and unmaps again on free; a worker that keeps pulled pages in its
//! cache faults in every byte it pulls (page faults were 28% of a cold pull's CPU samples). With
//! `glibc.malloc.mmap_threshold` at 32 MiB the buffers come from malloc's arenas and freed ones
//! are reused; `glibc.malloc.trim_threshold` at 256 MiB keeps an arena from handing its free top
//! back to the kernel (and faulting it in again) after every burst — up to that much free memory
//! per arena stays resident for reuse; and `glibc.malloc.hugetlb=1` lets the arenas use
//! transparent huge pages (2 MiB per fault) where the kernel allows THP on `madvise`. glibc reads tunables only when a process
//! starts, so [`tune`] re-executes the binary once with them added to `GLIBC_TUNABLES` (same PID:
//! `exec` replaces the image). A value the operator already set for either tunable is kept;
//! `KVCACHE_MALLOC_TUNING=0` turns this off. Measured in docs/BENCHMARKS.md (`bench decode`).

/// Re-execute with the tunables unless already done, turned off, or not glibc; returns only
/// when not re-executing (or when `exec` failed, which leaves the process untuned, not broken).
pub fn tune() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::os::unix::process::CommandExt;
        const DONE: &str = "KVCACHE_MALLOC_TUNED";
        if std::env::var_os(DONE).is_some() || std::env::var("KVCACHE_MALLOC_TUNING").is_ok_and(|v| v == "0") {
            return;
        }
        let current = std::env::var("GLIBC_TUNABLES").unwrap_or_default();
        let Some(tunables) = with_defaults(&current) else { return };
        let Ok(exe) = std::env::current_exe() else { return };
        let mut args = std::env::args_os();
        let mut cmd = std::process::Command::new(exe);
        if let Some(a0) = args.next() {
            cmd.arg0(a0);
        }
        let err = cmd.args(args).env("GLIBC_TUNABLES", tunables).env(DONE, "1").exec();
        eprintln!("kvcache: running with default malloc settings (re-exec failed: {err})");
    }
}

/// `GLIBC_TUNABLES` with ours added where the operator set nothing; `None` if it has them all.
#[cfg_attr(not(all(target_os = "linux", target_env = "gnu")), allow(dead_code))]
fn with_defaults(current: &str) -> Option<String> {
    let mut parts: Vec<String> = current.split(':').filter(|s| !s.is_empty()).map(str::to_owned).collect();
    let before = parts.len();
    for (k, v) in [
        ("glibc.malloc.hugetlb", "1"),
        ("glibc.malloc.mmap_threshold", "33554432"),
        ("glibc.malloc.trim_threshold", "268435456"),
    ] {
        if !parts.iter().any(|p| p.split('=').next() == Some(k)) {
            parts.push(format!("{k}={v}"));
        }
    }
    (parts.len() > before).then(|| parts.join(":"))
}

#[cfg(test)]
mod tests {
    use super::with_defaults;

    #[test]
    fn operator_settings_are_kept_and_ours_added_once() {
        let ours = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=268435456";
        assert_eq!(with_defaults(""), Some(format!("glibc.malloc.hugetlb=1:{ours}")));
        assert_eq!(
            with_defaults("glibc.malloc.hugetlb=0:glibc.malloc.arena_max=2"),
            Some(format!("glibc.malloc.hugetlb=0:glibc.malloc.arena_max=2:{ours}"))
        );
        let all = "glibc.malloc.mmap_threshold=1048576:glibc.malloc.hugetlb=2:glibc.malloc.trim_threshold=0";
        assert_eq!(with_defaults(all), None);
    }
}
