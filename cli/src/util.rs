//! Small helpers shared by subcommands: byte sizes, logging, shutdown signals.

/// How a server is exposed: TLS, and the plaintext probe listener when `health_listen` is set.
pub async fn exposure(tls: &kvcache_net::Tls, health_listen: Option<&str>) -> anyhow::Result<kvcache_net::Exposure> {
    let health_listener = match health_listen {
        Some(a) => {
            Some(tokio::net::TcpListener::bind(a).await.map_err(|e| anyhow::anyhow!("--health-listen {a}: {e}"))?)
        }
        None => None,
    };
    Ok(kvcache_net::Exposure { tls: tls.clone(), health_listener })
}

/// Parse a positive byte size: `1073741824`, `512MiB`, `1.5GiB`, `64KiB`, `1GB`. Binary units
/// (KiB, MiB, GiB, TiB) and decimal ones (KB, MB, GB, TB); a bare `G` is refused as ambiguous.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    const UNITS: &str = "B, KiB, MiB, GiB, TiB, KB, MB, GB or TB";
    let s = s.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        u @ ("K" | "M" | "G" | "T" | "k" | "m" | "g" | "t") => {
            let u = u.to_ascii_uppercase();
            return Err(format!("{s:?} is ambiguous: write {num}{u}iB (binary) or {num}{u}B (decimal)"));
        }
        u => return Err(format!("unknown unit {u:?} in {s:?}: expected {UNITS}")),
    };
    let n: f64 = num.parse().map_err(|_| format!("invalid size {s:?}: expected a number and one of {UNITS}"))?;
    let bytes = n * mult as f64;
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err(format!("size {s:?} is too large"));
    }
    if bytes < 1.0 {
        return Err(format!("size {s:?} must be at least 1 byte"));
    }
    Ok(bytes.round() as u64)
}

/// A `host:port` flag value, checked as every channel checks it before dialing.
pub fn parse_address(s: &str) -> Result<String, String> {
    kvcache_net::check_address(s).map(|_| s.to_owned()).map_err(|e| e.to_string())
}

/// A comma-separated list of `host:port` (coordinator replicas), each checked.
pub fn parse_addresses(s: &str) -> Result<String, String> {
    let addrs: Vec<&str> = s.split(',').map(str::trim).filter(|a| !a.is_empty()).collect();
    if addrs.is_empty() {
        return Err("no address given: write host:port (several replicas: a:7000,b:7000)".into());
    }
    for a in addrs {
        parse_address(a)?;
    }
    Ok(s.to_owned())
}

/// Check that `bytes` of pool files (`flag`) fit the filesystem that holds `dir` (or would
/// hold it: the nearest existing ancestor): more than the filesystem's size is refused; more
/// than its free space is allowed (pool files grow as pages arrive; a restart finds its own files
/// already there) but said in a warning.
pub fn check_fits_disk(flag: &str, bytes: u64, dir: &std::path::Path) -> anyhow::Result<()> {
    let mut at = dir;
    while !at.exists() {
        match at.parent() {
            Some(p) if !p.as_os_str().is_empty() => at = p,
            _ => {
                at = std::path::Path::new(".");
                break;
            }
        }
    }
    let stats =
        fs4::statvfs(at).map_err(|e| anyhow::anyhow!("{flag}: cannot read the filesystem of {}: {e}", at.display()))?;
    let size = human_bytes(bytes as f64);
    if bytes > stats.total_space() {
        anyhow::bail!(
            "{flag} {size} is larger than the filesystem that holds {} ({} in all): give at most that, or another --data-dir",
            dir.display(),
            human_bytes(stats.total_space() as f64)
        );
    }
    if bytes > stats.available_space() {
        tracing::warn!(
            flag, capacity = %size, free = %human_bytes(stats.available_space() as f64), dir = %dir.display(),
            "the capacity is more than the free space of its filesystem: writes fail (and become misses) when it fills"
        );
    }
    Ok(())
}

/// A byte count for people, in the binary units the size flags take: `1.50 GiB`, `640.0 KiB`.
pub fn human_bytes(b: f64) -> String {
    const UNITS: [(&str, f64); 4] =
        [("TiB", (1u64 << 40) as f64), ("GiB", (1u64 << 30) as f64), ("MiB", (1u64 << 20) as f64), ("KiB", 1024.0)];
    for (unit, size) in UNITS {
        if b >= size {
            let v = b / size;
            return if v >= 100.0 { format!("{v:.0} {unit}") } else { format!("{v:.2} {unit}") };
        }
    }
    format!("{b:.0} B")
}

/// Serve Prometheus `/metrics` on `addr` when given.
pub fn init_metrics(addr: Option<std::net::SocketAddr>) -> anyhow::Result<()> {
    if let Some(a) = addr {
        kvcache_telemetry::install(a).map_err(|e| anyhow::anyhow!("metrics listener on {a}: {e}"))?;
        tracing::info!(addr = %a, "serving /metrics");
    }
    Ok(())
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutdown signal received: draining");
}

#[cfg(test)]
mod tests {
    use super::parse_bytes;

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_bytes("4096").unwrap(), 4096);
        assert_eq!(parse_bytes("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_bytes("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_bytes("1GB").unwrap(), 1_000_000_000);
        assert!(parse_bytes("12 parsecs").is_err());
        assert!(parse_bytes("GiB").is_err());
        assert_eq!(parse_bytes("1.5GiB").unwrap(), 3 << 29);
        assert_eq!(super::human_bytes((3u64 << 29) as f64), "1.50 GiB");
        assert_eq!(super::human_bytes(640.0 * 1024.0), "640 KiB");
        assert_eq!(super::human_bytes(17.0), "17 B");
        assert_eq!(parse_bytes("2TB").unwrap(), 2_000_000_000_000);
        for (bad, says) in [
            ("0", "at least 1 byte"),
            ("0GiB", "at least 1 byte"),
            ("10G", "ambiguous: write 10GiB (binary) or 10GB (decimal)"),
            ("1.2.3GiB", "invalid size"),
            ("99999999999TiB", "too large"),
            ("5 parsecs", "expected B, KiB, MiB, GiB, TiB, KB, MB, GB or TB"),
        ] {
            let e = parse_bytes(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}
