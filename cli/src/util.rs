//! Small helpers shared by subcommands: byte sizes, logging, shutdown signals.

pub use kvcache_core::size::{human_bytes, parse_bytes};

/// How a server is exposed: TLS, its tenants, and the plaintext probe listener when
/// `health_listen` is set.
pub async fn exposure(
    tls: &kvcache_net::Tls,
    auth: kvcache_net::Auth,
    health_listen: Option<&str>,
) -> anyhow::Result<kvcache_net::Exposure> {
    let health_listener = match health_listen {
        Some(a) => {
            Some(tokio::net::TcpListener::bind(a).await.map_err(|e| anyhow::anyhow!("--health-listen {a}: {e}"))?)
        }
        None => None,
    };
    Ok(kvcache_net::Exposure { tls: tls.clone(), auth, health_listener })
}

/// The tenants a server enforces (`--tenants`), refusing a server that calls others (a node, a
/// worker) without the service token its calls must carry.
pub fn tenants(
    args: &kvcache_net::TenantsArgs,
    tls: &kvcache_net::Tls,
    calls_others: bool,
) -> anyhow::Result<kvcache_net::Auth> {
    let auth = args.load()?;
    if auth.enforced() {
        anyhow::ensure!(
            !calls_others || tls.has_token(),
            "--tenants without --token: this process calls the coordinator and the nodes, which will refuse it; \
             give it the service token (KVCACHE_TOKEN) whose hash is the file's [service] token_sha256"
        );
        anyhow::ensure!(
            !calls_others || auth.has_service(),
            "the tenants file has no [service] section: kvcache's own processes could not call each other"
        );
        tracing::info!(tenants = auth.tenants().tenants.len(), "tenants enforced");
    } else {
        tracing::warn!("no --tenants: this server is open to anyone who can reach its port");
    }
    Ok(auth)
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
