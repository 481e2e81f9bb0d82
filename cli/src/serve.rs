//! `kvcache coordinator`, `kvcache worker`, `kvcache dev` and `kvcache status`.

use crate::util::{human_bytes, parse_bytes, shutdown_signal};
use kvcache_cli::cluster::{LocalCluster, LocalClusterConfig};
use kvcache_coordinator::{ClusterState, CoordinatorConfig};
use kvcache_proto::v1 as pb;
use kvcache_worker::{Worker, WorkerConfig};
use std::path::PathBuf;
use std::time::Duration;

pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = n.parse().map_err(|_| format!("invalid duration {s:?}: expected e.g. 500ms, 10s, 2m"))?;
    Ok(match unit {
        "ms" => Duration::from_millis(n),
        "" | "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(60 * n),
        u => return Err(format!("unknown unit {u:?} in {s:?}: expected ms, s or m")),
    })
}

/// Flags of `kvcache coordinator`.
#[derive(clap::Args, Debug)]
pub struct CoordinatorArgs {
    /// Address of the Coordinator gRPC service.
    #[arg(long, env = "KVCACHE_LISTEN", default_value = "127.0.0.1:7000")]
    listen: String,
    /// Directory of the embedded state file.
    #[arg(long, env = "KVCACHE_DATA_DIR", default_value = "kvcache-data/coordinator")]
    data_dir: PathBuf,
    /// A node silent this long is marked down.
    #[arg(long, env = "KVCACHE_NODE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    node_timeout: Duration,
    /// A new node's placement weight ramps up over this long (0 = at once).
    #[arg(long, env = "KVCACHE_JOIN_RAMP", default_value = "60s", value_parser = parse_duration)]
    join_ramp: Duration,
    /// Serve Prometheus /metrics on this address (off when absent).
    #[arg(long, env = "KVCACHE_METRICS_LISTEN")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Heartbeat period nodes are told to use.
    #[arg(long, env = "KVCACHE_HEARTBEAT_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    heartbeat_interval: Duration,
    /// etcd endpoints (comma-separated): keep the state in etcd and elect a leader among
    /// coordinator replicas (needs a build with `--features etcd`).
    #[arg(long, env = "KVCACHE_ETCD_ENDPOINTS", value_delimiter = ',')]
    etcd_endpoints: Vec<String>,
    /// PEM CA that signed etcd's server certificate: talk to etcd over TLS.
    #[arg(long, env = "KVCACHE_ETCD_CA")]
    etcd_ca: Option<PathBuf>,
    /// PEM client certificate for etcd (its --client-cert-auth); needs --etcd-key and --etcd-ca.
    #[arg(long, env = "KVCACHE_ETCD_CERT")]
    etcd_cert: Option<PathBuf>,
    /// PEM key of --etcd-cert.
    #[arg(long, env = "KVCACHE_ETCD_KEY")]
    etcd_key: Option<PathBuf>,
    /// Key prefix of this cluster in etcd.
    #[arg(long, env = "KVCACHE_ETCD_PREFIX", default_value = "/kvcache")]
    etcd_prefix: String,
    /// Address other processes reach this coordinator at (default: the bound listen address).
    #[arg(long, env = "KVCACHE_ADVERTISE", value_parser = crate::util::parse_address)]
    advertise: Option<String>,
    /// Also serve grpc.health.v1 alone, in plaintext, on this address (for Kubernetes probes,
    /// which cannot speak TLS).
    #[arg(long, env = "KVCACHE_HEALTH_LISTEN")]
    health_listen: Option<String>,
    #[command(flatten)]
    tls: kvcache_net::TlsArgs,
    #[command(flatten)]
    tenants: kvcache_net::TenantsArgs,
}

/// Run `kvcache coordinator`.
pub fn coordinator(a: CoordinatorArgs) -> anyhow::Result<()> {
    tokio::runtime::Runtime::new()?.block_on(async move {
        let _tracing = kvcache_telemetry::trace::init("kvcache-coordinator");
        crate::util::init_metrics(a.metrics_listen)?;
        let mut cfg = CoordinatorConfig::new(&a.data_dir);
        cfg.node_timeout = a.node_timeout;
        cfg.join_ramp = a.join_ramp;
        cfg.heartbeat_interval = a.heartbeat_interval;
        let state = ClusterState::open(cfg)?;
        let tls = kvcache_net::Tls::load(&a.tls)?;
        let auth = crate::util::tenants(&a.tenants, &tls, false)?;
        let exposure = crate::util::exposure(&tls, auth, a.health_listen.as_deref()).await?;
        let l = kvcache_cli::cluster::bind(&a.listen, "--listen").await?;
        let addr = l.local_addr()?;
        let advertise = a.advertise.clone().unwrap_or_else(|| addr.to_string());
        let ha = start_ha(&a, state.clone(), advertise)?;
        tracing::info!(%addr, epoch = state.epoch(), "coordinator serving");
        println!("kvcache coordinator listening on {addr}");
        kvcache_coordinator::run(state, l, exposure, shutdown_signal()).await?;
        if let Some(h) = ha {
            h.abort();
        }
        Ok(())
    })
}

#[cfg(feature = "etcd")]
fn start_ha(
    a: &CoordinatorArgs,
    state: std::sync::Arc<ClusterState>,
    advertise: String,
) -> anyhow::Result<Option<tokio::task::JoinHandle<()>>> {
    if a.etcd_endpoints.is_empty() {
        return Ok(None);
    }
    let (endpoints, prefix) = (a.etcd_endpoints.clone(), a.etcd_prefix.clone());
    // The same TLS stack as every other channel: the flags load like --tls-*.
    let tls = match &a.etcd_ca {
        None => {
            anyhow::ensure!(
                a.etcd_cert.is_none() && a.etcd_key.is_none(),
                "--etcd-cert and --etcd-key need --etcd-ca (the CA etcd's certificate is verified against)"
            );
            None
        }
        Some(ca) => {
            let args = kvcache_net::TlsArgs {
                tls_cert: a.etcd_cert.clone(),
                tls_key: a.etcd_key.clone(),
                tls_ca: Some(ca.clone()),
                ..Default::default()
            };
            let t = kvcache_net::Tls::load(&args)
                .map_err(|e| anyhow::anyhow!("etcd TLS: {}", e.to_string().replace("--tls-", "--etcd-")))?;
            t.client_config()
        }
    };
    state.follow(String::new());
    Ok(Some(tokio::spawn(async move {
        if let Err(e) = kvcache_coordinator::etcd::run(state, endpoints, prefix, advertise, tls).await {
            tracing::error!(error = %e, "etcd HA failed");
            std::process::exit(2);
        }
    })))
}

#[cfg(not(feature = "etcd"))]
fn start_ha(
    a: &CoordinatorArgs,
    _state: std::sync::Arc<ClusterState>,
    _advertise: String,
) -> anyhow::Result<Option<tokio::task::JoinHandle<()>>> {
    anyhow::ensure!(
        a.etcd_endpoints.is_empty() && a.etcd_ca.is_none(),
        "--etcd-endpoints (and --etcd-ca) need a kvcache built with `--features etcd`"
    );
    Ok(None)
}

/// Flags of `kvcache worker`.
#[derive(clap::Args, Debug)]
pub struct WorkerArgs {
    /// Address of the AttentionWorker gRPC service.
    #[arg(long, env = "KVCACHE_LISTEN", default_value = "127.0.0.1:7100")]
    listen: String,
    /// Coordinator address.
    #[arg(long, env = "KVCACHE_COORDINATOR", default_value = "127.0.0.1:7000", value_parser = crate::util::parse_addresses)]
    coordinator: String,
    /// Address other processes reach this worker at (default: the bound listen address).
    #[arg(long, env = "KVCACHE_ADVERTISE", value_parser = crate::util::parse_address)]
    advertise: Option<String>,
    /// Worker id (stable across restarts); default: the advertised address.
    #[arg(long, env = "KVCACHE_WORKER_ID")]
    worker_id: Option<String>,
    /// Serve Prometheus /metrics on this address (off when absent).
    #[arg(long, env = "KVCACHE_METRICS_LISTEN")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Page cache bound.
    #[arg(long, env = "KVCACHE_CACHE_BYTES", default_value = "1GiB", value_parser = parse_bytes)]
    cache_bytes: u64,
    /// Preallocate the page cache and fault it in at start: cold pulls then copy into memory
    /// already mapped instead of faulting in fresh memory, and decode steps build grown pages
    /// in a reserve of 1/64 more (at least 64 MiB); the worker's resident memory is the cache
    /// bound (and the reserve) from the start.
    #[arg(long, env = "KVCACHE_CACHE_PREFAULT")]
    cache_prefault: bool,
    /// Attention threads (default: all cores).
    #[arg(long, env = "KVCACHE_THREADS")]
    threads: Option<usize>,
    /// Where attention runs: `cpu`, or `cuda` / `cuda:N` (page slots in that GPU's memory, up to
    /// --cache-bytes per page geometry; the driver is loaded at start and its absence is an error).
    #[arg(long, env = "KVCACHE_DEVICE", default_value = "cpu")]
    device: String,
    /// Where a GPU worker caches the kernels NVRTC compiled for its device (default
    /// `$XDG_CACHE_HOME/kvcache/cuda` or `~/.cache/kvcache/cuda`).
    #[arg(long, env = "KVCACHE_CUDA_CACHE")]
    cuda_cache: Option<std::path::PathBuf>,
    /// HTTP/2 connections to each cache node: pulls and appends are spread over them, so page
    /// traffic is not confined to one core on either end.
    #[arg(long, env = "KVCACHE_CONNECTIONS_PER_NODE", default_value_t = 4)]
    connections_per_node: usize,
    /// Also serve grpc.health.v1 alone, in plaintext, on this address (for Kubernetes probes,
    /// which cannot speak TLS).
    #[arg(long, env = "KVCACHE_HEALTH_LISTEN")]
    health_listen: Option<String>,
    #[command(flatten)]
    tls: kvcache_net::TlsArgs,
    #[command(flatten)]
    tenants: kvcache_net::TenantsArgs,
}

/// Run `kvcache worker`.
pub fn worker(a: WorkerArgs) -> anyhow::Result<()> {
    tokio::runtime::Runtime::new()?.block_on(async move {
        let _tracing = kvcache_telemetry::trace::init("kvcache-worker");
        crate::util::init_metrics(a.metrics_listen)?;
        let tls = kvcache_net::Tls::load(&a.tls)?;
        let auth = crate::util::tenants(&a.tenants, &tls, true)?;
        let exposure = crate::util::exposure(&tls, auth, a.health_listen.as_deref()).await?;
        // The device first: a worker told to use a GPU it cannot open fails before it joins.
        let cache = a.cuda_cache.clone().or_else(kvcache_attention::gpu::cache_dir);
        let device = kvcache_cli::cluster::open_device_with_cache(&a.device, cache)?;
        let ccfg =
            kvcache_client::ClientConfig { tls, connections_per_node: a.connections_per_node, ..Default::default() };
        let client = kvcache_cli::cluster::connect(&a.coordinator, ccfg).await?;
        let mut cfg =
            WorkerConfig { cache_bytes: a.cache_bytes, cache_prefault: a.cache_prefault, ..WorkerConfig::default() };
        cfg.device = device;
        if let Some(t) = a.threads {
            cfg.threads = t.max(1);
        }
        let w = Worker::new(client.clone(), cfg);
        let l = kvcache_cli::cluster::bind(&a.listen, "--listen").await?;
        let addr = a.advertise.unwrap_or(l.local_addr()?.to_string());
        let id = a.worker_id.unwrap_or_else(|| addr.clone());
        kvcache_worker::register(&client, &id, &addr).await?;
        tracing::info!(%addr, worker_id = %id, "worker serving");
        println!("kvcache worker {id} listening on {addr}");
        kvcache_worker::run(w, l, exposure, shutdown_signal()).await?;
        Ok(())
    })
}

/// Flags of `kvcache dev`.
#[derive(clap::Args, Debug)]
pub struct DevArgs {
    /// Data directory of the local cluster (kept across runs: a restart recovers its pages).
    #[arg(long, env = "KVCACHE_DATA_DIR", default_value = "kvcache-data/dev")]
    data_dir: PathBuf,
    /// Where the coordinator listens: the address every client command uses by default, so
    /// `kvcache status`, `load` and `demo --coordinator` work with no flag. Port 0 picks a free one.
    #[arg(long, env = "KVCACHE_LISTEN", default_value = "127.0.0.1:7000")]
    listen: String,
    /// Serve Prometheus /metrics on this address (off when absent).
    #[arg(long, env = "KVCACHE_METRICS_LISTEN")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Cache nodes.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Capacity of each node.
    #[arg(long, default_value = "2GiB", value_parser = parse_bytes)]
    node_capacity: u64,
    /// mTLS between the local services and for clients (all of them use the same identity).
    #[command(flatten)]
    tls: kvcache_net::TlsArgs,
    /// Tenants every service enforces (the local services show each other a service token
    /// made up at start: the file needs no [service]).
    #[command(flatten)]
    tenants: kvcache_net::TenantsArgs,
}

/// Run `kvcache dev`: a local cluster until Ctrl-C.
pub fn dev(a: DevArgs) -> anyhow::Result<()> {
    tokio::runtime::Runtime::new()?.block_on(async move {
        let _tracing = kvcache_telemetry::trace::init("kvcache-dev");
        crate::util::init_metrics(a.metrics_listen)?;
        let total = a.node_capacity.saturating_mul(a.nodes as u64);
        crate::util::check_fits_disk("--node-capacity × --nodes", total, &a.data_dir)?;
        let mut cfg = LocalClusterConfig::new(&a.data_dir);
        cfg.nodes = a.nodes;
        cfg.node_capacity = a.node_capacity;
        cfg.tls = kvcache_net::Tls::load(&a.tls)?;
        cfg.auth = crate::util::tenants(&a.tenants, &cfg.tls, false)?;
        cfg.coordinator_listen = Some(a.listen.clone());
        // Before the services' logs: what is starting, and where.
        println!(
            "kvcache dev: starting a coordinator on {}, {} cache nodes and a worker (data in {})",
            a.listen,
            a.nodes,
            a.data_dir.display()
        );
        let c = LocalCluster::start(cfg).await?;
        println!("kvcache dev cluster is up (data in {}):", a.data_dir.display());
        println!("  coordinator  {}", c.coordinator);
        for (i, n) in c.nodes.iter().enumerate() {
            println!("  node-{i}       {n}");
        }
        println!("  worker       {}", c.worker);
        if let Some(p) = &a.tenants.tenants {
            println!("  tenants      {} (every call needs a tenant's token: --token / KVCACHE_TOKEN)", p.display());
        }
        println!(
            "try: kvcache status --coordinator {}   |   kvcache demo --coordinator {}",
            c.coordinator, c.coordinator
        );
        println!("Ctrl-C stops it.");
        shutdown_signal().await;
        c.stop().await?;
        println!("stopped cleanly");
        Ok(())
    })
}

/// Flags of `kvcache status`.
#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    /// Coordinator address.
    #[arg(long, env = "KVCACHE_COORDINATOR", default_value = "127.0.0.1:7000", value_parser = crate::util::parse_addresses)]
    coordinator: String,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    tls: kvcache_net::TlsArgs,
}

/// Run `kvcache status`.
pub fn status(a: StatusArgs) -> anyhow::Result<()> {
    tokio::runtime::Runtime::new()?.block_on(async move {
        let s = kvcache_cli::cluster::cluster_status(&a.coordinator, &kvcache_net::Tls::load(&a.tls)?).await?;
        if a.json {
            let nodes: Vec<_> = s
                .nodes
                .iter()
                .map(|n| {
                    let sn = n.node.clone().unwrap_or_default();
                    let info = sn.node.unwrap_or_default();
                    serde_json::json!({
                        "node_id": info.node_id, "address": info.address, "state": pb::NodeState::try_from(sn.state).map(|s| s.as_str_name()).unwrap_or("?"),
                        "capacity_bytes": info.capacity_bytes, "used_bytes": n.used_bytes, "pages": n.pages, "sequences": n.sequences, "weight": sn.weight,
                    })
                })
                .collect();
            let nss: Vec<_> = s.namespaces.iter().map(|n| serde_json::json!({"name": n.name, "tenant": n.tenant, "model": n.model.as_ref().map(|m| m.name.clone()), "codec": kvcache_core::validate::codec(n.codec).map_or("unknown", |c| c.as_str()), "page_tokens": n.page_tokens, "replication": n.replication})).collect();
            println!("{}", serde_json::to_string_pretty(&serde_json::json!({"epoch": s.epoch, "nodes": nodes, "namespaces": nss, "workers": s.workers.iter().map(|w| &w.address).collect::<Vec<_>>()}))?);
            return Ok(());
        }
        println!("epoch {}", s.epoch);
        println!("{:<12} {:<22} {:<9} {:>12} {:>12} {:>8} {:>10}", "node", "address", "state", "capacity", "used", "pages", "sequences");
        for n in &s.nodes {
            let sn = n.node.clone().unwrap_or_default();
            let info = sn.node.unwrap_or_default();
            let st = pb::NodeState::try_from(sn.state).map(|s| s.as_str_name().trim_start_matches("NODE_STATE_").to_lowercase()).unwrap_or_default();
            let (cap, used) = (human_bytes(info.capacity_bytes as f64), human_bytes(n.used_bytes as f64));
            println!("{:<12} {:<22} {:<9} {:>12} {:>12} {:>8} {:>10}", info.node_id, info.address, st, cap, used, n.pages, n.sequences);
        }
        println!("namespaces:");
        for n in &s.namespaces {
            let m = n.model.clone().unwrap_or_default();
            let codec = kvcache_core::validate::codec(n.codec).map_or("unknown", |c| c.as_str());
            println!("  {:<28} tenant {:<10} model {:<12} codec {:<8} page {:>4} R={}", n.name, n.tenant, m.name, codec, n.page_tokens, n.replication);
        }
        println!("workers: {}", s.workers.iter().map(|w| w.address.as_str()).collect::<Vec<_>>().join(", "));
        Ok(())
    })
}

/// Flags of `kvcache drain`.
#[derive(clap::Args, Debug)]
pub struct DrainArgs {
    /// Coordinator address (replicas comma-separated).
    #[arg(long, env = "KVCACHE_COORDINATOR", default_value = "127.0.0.1:7000", value_parser = crate::util::parse_addresses)]
    coordinator: String,
    /// Id of the node to drain.
    node_id: String,
    /// Wait until the node holds no sequences (at most this long; 0 = do not wait).
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    wait: Duration,
    #[command(flatten)]
    tls: kvcache_net::TlsArgs,
}

/// Run `kvcache drain`.
pub fn drain(a: DrainArgs) -> anyhow::Result<()> {
    tokio::runtime::Runtime::new()?.block_on(async move {
        let tls = kvcache_net::Tls::load(&a.tls)?;
        let cfg = kvcache_client::ClientConfig { tls, watch: false, ..Default::default() };
        let client = kvcache_cli::cluster::connect(&a.coordinator, cfg).await?;
        let epoch = client
            .coord(|mut c| {
                let id = a.node_id.clone();
                async move { c.drain(pb::DrainRequest { node_id: id }).await }
            })
            .await?
            .into_inner()
            .epoch;
        println!("{} is draining (epoch {epoch})", a.node_id);
        let deadline = std::time::Instant::now() + a.wait;
        while !a.wait.is_zero() {
            client.refresh().await?;
            let held = client.node_stats().await.into_iter().find(|(id, _)| *id == a.node_id).and_then(|(_, s)| s.ok());
            match held {
                Some(s) if s.sequences > 0 => {
                    anyhow::ensure!(
                        std::time::Instant::now() < deadline,
                        "{} still holds {} sequences after {:?}",
                        a.node_id,
                        s.sequences,
                        a.wait
                    );
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                _ => {
                    println!("{} holds no sequences: it can be removed", a.node_id);
                    break;
                }
            }
        }
        Ok(())
    })
}
