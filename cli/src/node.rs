//! `kvcache node`: run one cache node.

use crate::util::{parse_bytes, shutdown_signal};
use kvcache_node::{Durability, PageStore, StoreConfig};
use std::path::PathBuf;

/// Flags of `kvcache node` (each with a `KVCACHE_*` environment fallback).
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Address of the CacheNode gRPC service.
    #[arg(long, env = "KVCACHE_LISTEN", default_value = "127.0.0.1:7070")]
    pub listen: String,
    /// Directory of the pool files.
    #[arg(long, env = "KVCACHE_DATA_DIR", default_value = "kvcache-data/node")]
    pub data_dir: PathBuf,
    /// Total bytes of pool files (B, KiB, MiB, GiB, TiB or KB, MB, GB, TB; `1.5GiB` works).
    #[arg(long, env = "KVCACHE_CAPACITY", default_value = "1GiB", value_parser = parse_bytes)]
    pub capacity: u64,
    /// `async` (background flush) or `sync` (flush before acknowledging).
    #[arg(long, env = "KVCACHE_DURABILITY", default_value = "async")]
    pub durability: Durability,
    /// Node id (stable across restarts); defaults to the advertised address.
    #[arg(long, env = "KVCACHE_NODE_ID")]
    pub node_id: Option<String>,
    /// Coordinator to register with (standalone when absent).
    #[arg(long, env = "KVCACHE_COORDINATOR", value_parser = crate::util::parse_addresses)]
    pub coordinator: Option<String>,
    /// Address clients reach this node at (default: the bound listen address).
    #[arg(long, env = "KVCACHE_ADVERTISE", value_parser = crate::util::parse_address)]
    pub advertise: Option<String>,
    /// Serve Prometheus /metrics on this address (off when absent).
    #[arg(long, env = "KVCACHE_METRICS_LISTEN")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Handoff (copying sequences to their owners after membership changes, dropping those this
    /// node no longer owns) runs after every shard-map change; failed copies are retried this
    /// often, and every 20 intervals a pass checks every sequence (anti-entropy).
    #[arg(long, env = "KVCACHE_HANDOFF_INTERVAL", default_value = "30s", value_parser = crate::serve::parse_duration)]
    pub handoff_interval: std::time::Duration,
    /// Failure zone, for replica placement.
    #[arg(long, env = "KVCACHE_ZONE", default_value = "")]
    pub zone: String,
    /// Also serve grpc.health.v1 alone, in plaintext, on this address (for Kubernetes probes,
    /// which cannot speak TLS).
    #[arg(long, env = "KVCACHE_HEALTH_LISTEN")]
    pub health_listen: Option<String>,
    #[command(flatten)]
    pub tls: kvcache_net::TlsArgs,
    #[command(flatten)]
    pub tenants: kvcache_net::TenantsArgs,
}

/// Run `kvcache node` until SIGTERM / Ctrl-C.
pub fn run(args: Args) -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let _tracing = kvcache_telemetry::trace::init("kvcache-node");
        crate::util::init_metrics(args.metrics_listen)?;
        crate::util::check_fits_disk("--capacity", args.capacity, &args.data_dir)?;
        let mut cfg = StoreConfig::new(&args.data_dir, args.capacity);
        cfg.durability = args.durability;
        let store = tokio::task::spawn_blocking(move || PageStore::open(cfg)).await??;
        let tls = kvcache_net::Tls::load(&args.tls)?;
        let auth = crate::util::tenants(&args.tenants, &tls, args.coordinator.is_some())?;
        let exposure = crate::util::exposure(&tls, auth, args.health_listen.as_deref()).await?;
        let listener = kvcache_cli::cluster::bind(&args.listen, "--listen").await?;
        let addr = listener.local_addr()?;
        let advertise = args.advertise.unwrap_or_else(|| addr.to_string());
        let node_id = args.node_id.unwrap_or_else(|| advertise.clone());
        let cfg = kvcache_node::NodeConfig {
            node_id: node_id.clone(),
            advertise,
            zone: args.zone,
            coordinator: args.coordinator,
            handoff: kvcache_node::handoff::HandoffConfig {
                interval: args.handoff_interval,
                full_interval: args.handoff_interval * 20,
                ..Default::default()
            },
            tls,
        };
        let st = store.stats();
        tracing::info!(%addr, node_id, pages = st.pages, recovery_seconds = st.recovery_seconds, "cache node serving");
        println!("kvcache node {node_id} listening on {addr}");
        kvcache_node::run(store, cfg, listener, exposure, shutdown_signal()).await?;
        tracing::info!("cache node stopped cleanly");
        Ok(())
    })
}
