//! kvcache-node: the cache node.
//!
//! - [`pool`]: pool files — memory-mapped files of equal slots (header + payload), the slot life
//!   cycle (free → owned → published → retired → free) and reader holds that keep a slot from
//!   being reused while any response refers to it.
//! - [`store`]: the [`PageStore`] — namespaces, the index (sequences → layers → page entries),
//!   write path, copy-on-write appends, LRU eviction of whole unleased sequences, leases with TTL,
//!   async/sync durability, parallel recovery on start.
//! - [`service`]: the `CacheNode` gRPC service over the store; the one place where store errors
//!   become gRPC statuses.
//! - [`membership`]: registration and heartbeats with the coordinator (epoch, namespaces).
//! - [`run`]: serve a store on a listener (with health and reflection) until `shutdown`.
//!
//! Invariants: a page is published only after its payload and then its CRC-carrying header are
//! in the slot (and msync'ed under `sync`); nothing is served that did not verify (header CRC at
//! recovery, payload CRC at recovery or on first read after a clean restart); the pool files never
//! exceed the configured capacity.

pub mod membership;
pub mod pool;
pub mod service;
pub mod store;

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
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow_like::Result<()> {
    use kvcache_proto::v1::cache_node_server::CacheNodeServer;
    use tokio_stream::StreamExt;
    let (health, health_svc) = tonic_health::server::health_reporter();
    health.set_serving::<CacheNodeServer<NodeService>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(kvcache_proto::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| anyhow_like::Error(e.to_string()))?;
    let svc = CacheNodeServer::new(NodeService::new(store.clone(), node_id))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    // tonic sets TCP_NODELAY only on listeners it binds itself; without it every streamed
    // response waits on the peer's delayed ACK.
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener).map(|s| {
        if let Ok(s) = &s {
            let _ = s.set_nodelay(true);
        }
        s
    });
    let gauges = tokio::spawn(export_gauges(store.clone()));
    let r = server_builder()
        .layer(kvcache_telemetry::GrpcMetricsLayer::new("node"))
        .add_service(health_svc)
        .add_service(reflection)
        .add_service(svc)
        .serve_with_incoming_shutdown(incoming, async move {
            shutdown.await;
            health.set_not_serving::<CacheNodeServer<NodeService>>().await;
        })
        .await;
    gauges.abort();
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

/// A tonic server builder tuned for large page streams: big HTTP/2 windows and frames.
pub fn server_builder() -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .initial_stream_window_size(Some(8 << 20))
        .initial_connection_window_size(Some(32 << 20))
        .max_frame_size(Some((1 << 20) - 1))
        .http2_adaptive_window(Some(false))
        .tcp_nodelay(true)
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
