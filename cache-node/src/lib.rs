//! kvcache-node: the cache node.
//!
//! - [`pool`]: pool files — files of equal slots (header + payload), written with `pwrite` and
//!   read through a shared memory mapping; the slot life cycle (free → owned → published →
//!   retired → free) and reader holds that keep a slot from being reused while any response
//!   refers to it.
//! - [`store`]: the [`PageStore`] — namespaces, the index (sequences → layers → page entries),
//!   write path, copy-on-write appends, LRU eviction of whole unleased sequences, leases with TTL,
//!   async/sync durability, parallel recovery on start.
//! - [`service`]: the `CacheNode` gRPC service over the store; the one place where store errors
//!   become gRPC statuses.
//! - [`zerocopy`]: GetPages with each mapped payload handed to HTTP/2 as is (no encoder copy),
//!   PutPages decoded from the received frames (no reassembly copy).
//! - [`membership`]: registration and heartbeats with the coordinator (epoch, namespaces).
//! - [`handoff`]: moving sequences to their owners after membership changes (drain, join,
//!   re-replication after a node loss).
//! - [`run`]: serve a store on a listener (with health and reflection) until `shutdown`.
//!
//! Invariants: a page is published only after its payload and then its CRC-carrying header are
//! in the slot (and msync'ed under `sync`); nothing is served that did not verify (header CRC at
//! recovery, payload CRC at recovery or on first read after a clean restart); the pool files never
//! exceed the configured capacity.

pub mod handoff;
pub mod membership;
pub mod pool;
pub mod service;
pub mod store;
pub mod zerocopy;

pub use service::NodeService;
pub use store::{Durability, PageStore, StoreConfig, StoreError};

use std::future::Future;
use std::sync::Arc;
use tokio::net::TcpListener;

/// Largest gRPC message a node accepts or sends.
pub const MAX_MESSAGE_BYTES: usize = 256 << 20;

/// Serve `store` as `node_id` on `listener` until `shutdown` resolves, then close the store
/// cleanly (flush + clean-shutdown marker).
pub async fn run(
    store: Arc<PageStore>,
    node_id: String,
    listener: TcpListener,
    exposure: kvcache_net::Exposure,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow_like::Result<()> {
    use kvcache_proto::v1::cache_node_server::CacheNodeServer;
    let err = |e: kvcache_net::NetError| anyhow_like::Error(e.to_string());
    let (health, health_svc) = tonic_health::server::health_reporter();
    health.set_serving::<CacheNodeServer<NodeService>>().await;
    let reflection = kvcache_net::reflection().map_err(err)?;
    let server = kvcache_net::server(&exposure.tls).map_err(err)?;
    let probe = exposure.health_listener.map(|l| kvcache_net::serve_health(l, health_svc.clone()));
    let node = Arc::new(NodeService::new(store.clone(), node_id));
    let svc = zerocopy::ZeroCopyPages::new(
        node.clone(),
        CacheNodeServer::from_arc(node)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
    );
    let gauges = tokio::spawn(export_gauges(store.clone()));
    let r = server
        .layer(kvcache_telemetry::GrpcMetricsLayer::new("node"))
        .add_service(health_svc)
        .add_service(reflection)
        .add_service(svc)
        .serve_with_incoming_shutdown(kvcache_net::incoming(listener), async move {
            shutdown.await;
            health.set_not_serving::<CacheNodeServer<NodeService>>().await;
        })
        .await;
    gauges.abort();
    if let Some(p) = probe {
        p.abort();
    }
    let closed = tokio::task::spawn_blocking(move || store.close()).await;
    r.map_err(|e| anyhow_like::Error(e.to_string()))?;
    closed.map_err(|e| anyhow_like::Error(e.to_string()))?.map_err(|e| anyhow_like::Error(e.to_string()))?;
    Ok(())
}

/// Publish the store's gauges every two seconds (index memory is measured, so not per request).
async fn export_gauges(store: Arc<PageStore>) {
    use kvcache_telemetry::names as n;
    // Counters exist from the start (at 0), so dashboards and alerts see them before traffic.
    for c in [n::NODE_PAGE_HITS, n::NODE_PAGE_MISSES, n::NODE_BYTES_OUT, n::NODE_BYTES_IN] {
        metrics::counter!(c).increment(0);
    }
    let mut iv = tokio::time::interval(std::time::Duration::from_secs(2));
    loop {
        iv.tick().await;
        let s = store.clone();
        let Ok(st) = tokio::task::spawn_blocking(move || s.stats()).await else { continue };
        metrics::gauge!(n::NODE_STORED_BYTES).set(st.used_bytes as f64);
        metrics::gauge!(n::NODE_CAPACITY_BYTES).set(st.capacity_bytes as f64);
        metrics::gauge!(n::NODE_POOL_BYTES).set(st.pool_bytes as f64);
        metrics::gauge!(n::NODE_PAGES).set(st.pages as f64);
        metrics::gauge!(n::NODE_SEQUENCES).set(st.sequences as f64);
        metrics::gauge!(n::NODE_LEASES).set(st.active_leases as f64);
        metrics::gauge!(n::NODE_POOL_FILES_FAILED).set(st.pool_files_failed as f64);
        metrics::gauge!(n::NODE_INDEX_BYTES).set(st.index_bytes as f64);
        metrics::gauge!(n::NODE_RECOVERY_SECONDS).set(st.recovery_seconds);
        metrics::gauge!(n::NODE_EPOCH).set(store.epoch() as f64);
        metrics::counter!(n::NODE_EVICTIONS, "reason" => "capacity").absolute(st.evictions);
        metrics::counter!(n::NODE_CORRUPT_PAGES).absolute(st.corrupt_pages_dropped);
    }
}

/// The error of [`run`]: a message (the binary wraps it in anyhow).
pub mod anyhow_like {
    /// A server error, as text.
    #[derive(Debug)]
    pub struct Error(pub String);
    impl std::fmt::Display for Error {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(&self.0)
        }
    }
    impl std::error::Error for Error {}
    /// Result of [`super::run`].
    pub type Result<T> = std::result::Result<T, Error>;
}
