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
