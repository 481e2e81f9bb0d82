//! kvcache-node: the cache node.
//!
//! - [`pool`]: pool files — files of equal slots (header + payload), written with `pwrite` and
//!   read through a shared memory mapping; the slot life cycle (free → owned → published →
//!   retired → free) and reader holds that keep a slot from being reused while any response
//!   refers to it.
//! - [`powerloss`]: a simulated power cut for tests (unflushed writes lost, the last one torn at a
//!   sector boundary), behind the observer pool files report their writes and flushes to.
//! - [`registry`]: the namespace registry file, in its own versioned format.
//! - [`store`]: the [`PageStore`] — namespaces, the index (sequences → layers → page entries),
//!   write path, copy-on-write appends, LRU eviction of whole unleased sequences, leases with TTL,
//!   async/sync durability, parallel recovery on start.
//! - [`service`]: the `CacheNode` gRPC service over the store; the one place where store errors
//!   become gRPC statuses.
//! - [`zerocopy`]: GetPages with each mapped payload handed to HTTP/2 as is (no encoder copy),
//!   PutPages decoded from the received frames (no reassembly copy).
//! - [`metrics`]: the node's series, labelled by node id, registered once.
//! - [`membership`]: registration and heartbeats with the coordinator (epoch, namespaces).
//! - [`handoff`]: moving sequences to their owners after membership changes (drain, join,
//!   re-replication after a node loss).
//! - [`run`] with a [`NodeConfig`]: the one way to start a node — serve a store on a listener
//!   (with health and reflection), join the cluster through one `CoordinatorLink` (membership
//!   and handoff share it), stop in order on `shutdown`. Errors are a [`NodeError`].
//!
//! Invariants: a page is published only after its payload and then its CRC-carrying header are
//! in the slot (and msync'ed under `sync`); nothing is served that did not verify (header CRC at
//! recovery, payload CRC at recovery or on first read after a clean restart); the pool files never
//! exceed the configured capacity.

pub mod handoff;
pub mod membership;
pub mod metrics;
pub mod pool;
pub mod powerloss;
pub mod registry;
pub mod service;
pub mod store;
pub mod zerocopy;

pub use service::NodeService;
pub use store::{Durability, PageStore, PutMode, StoreConfig, StoreError};

use std::future::Future;
use std::sync::Arc;
use tokio::net::TcpListener;

pub use kvcache_net::MAX_MESSAGE_BYTES;

/// Longest a stopping server waits for the work it started (response streams, lease releases).
pub const SHUTDOWN_WAIT: std::time::Duration = std::time::Duration::from_secs(20);

/// Who a node is and how it joins a cluster: everything [`run`] needs beside the store.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Node id (stable across restarts).
    pub node_id: String,
    /// Address clients reach this node at.
    pub advertise: String,
    /// Failure zone, for replica placement.
    pub zone: String,
    /// Coordinator replicas (comma-separated); `None` serves standalone.
    pub coordinator: Option<String>,
    /// Handoff settings (used with a coordinator).
    pub handoff: handoff::HandoffConfig,
    /// TLS of the channels to the coordinator and the other nodes.
    pub tls: kvcache_net::Tls,
}

impl NodeConfig {
    /// A node outside any cluster (no coordinator), plaintext.
    pub fn standalone(node_id: impl Into<String>, advertise: impl Into<String>) -> Self {
        Self {
            node_id: node_id.into(),
            advertise: advertise.into(),
            zone: String::new(),
            coordinator: None,
            handoff: handoff::HandoffConfig::default(),
            tls: kvcache_net::Tls::none(),
        }
    }
}

/// Why a node stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// Serving failed (transport, TLS, a task).
    #[error(transparent)]
    Serve(#[from] kvcache_net::ServeError),
    /// Closing the store (its final flush) failed.
    #[error("closing the page store: {0}")]
    Close(#[from] StoreError),
}

/// Serve `store` on `listener` until `shutdown` resolves: the CacheNode service with health and
/// reflection, and with a coordinator its membership (registration, heartbeats) and handoff,
/// both on one [`kvcache_net::CoordinatorLink`]. On shutdown membership and handoff stop first,
/// then the server drains, then the store closes cleanly (flush + clean-shutdown marker).
pub async fn run(
    store: Arc<PageStore>,
    cfg: NodeConfig,
    listener: TcpListener,
    exposure: kvcache_net::Exposure,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), NodeError> {
    use kvcache_proto::v1::cache_node_server::CacheNodeServer;
    let (health, health_svc) = tonic_health::server::health_reporter();
    health.set_serving::<CacheNodeServer<NodeService>>().await;
    let reflection = kvcache_net::reflection().map_err(kvcache_net::ServeError::from)?;
    let server = kvcache_net::server(&exposure).map_err(kvcache_net::ServeError::from)?;
    let metrics = Arc::new(metrics::NodeMetrics::new(&cfg.node_id));
    let mut cluster_tasks = Vec::new();
    let link = match &cfg.coordinator {
        Some(c) => Some(
            kvcache_net::CoordinatorLink::new(c, &cfg.tls, std::time::Duration::from_secs(5))
                .map_err(kvcache_net::ServeError::from)?,
        ),
        None => None,
    };
    if let Some(link) = link.clone() {
        link.watch();
        let info = kvcache_proto::v1::NodeInfo {
            node_id: cfg.node_id.clone(),
            address: cfg.advertise.clone(),
            capacity_bytes: store.stats().capacity_bytes,
            zone: cfg.zone.clone(),
            labels: Default::default(),
        };
        cluster_tasks.push(tokio::spawn(membership::join_cluster(store.clone(), link.clone(), info)));
        cluster_tasks.push(tokio::spawn(handoff::run(
            store.clone(),
            cfg.node_id.clone(),
            link,
            cfg.tls.clone(),
            cfg.handoff.clone(),
            metrics.clone(),
        )));
    }
    let probe = exposure.health_listener.map(|l| kvcache_net::serve_health(l, health_svc.clone()));
    let node = Arc::new(
        NodeService::new(store.clone(), cfg.node_id, metrics.clone()).with_tenants(exposure.auth.clone(), link),
    );
    let tasks = node.tasks.clone();
    let svc = zerocopy::ZeroCopyPages::new(
        node.clone(),
        CacheNodeServer::from_arc(node)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
    );
    let gauges = tokio::spawn(export_gauges(store.clone(), metrics));
    let r = server
        .layer(kvcache_telemetry::GrpcMetricsLayer::new("node"))
        .add_service(health_svc)
        .add_service(reflection)
        .add_service(svc)
        .serve_with_incoming_shutdown(kvcache_net::incoming(listener), async move {
            shutdown.await;
            // Leave the cluster's loops before the last requests drain: no handoff copy or
            // heartbeat runs against a store about to close.
            for t in &cluster_tasks {
                t.abort();
            }
            for t in cluster_tasks {
                let _ = t.await;
            }
            health.set_not_serving::<CacheNodeServer<NodeService>>().await;
        })
        .await;
    gauges.abort();
    if let Some(p) = probe {
        p.abort();
    }
    // Streams the server spawned end with their connections; wait for them (bounded) so no
    // response still holds a slot when the store closes.
    tasks.close();
    if tokio::time::timeout(SHUTDOWN_WAIT, tasks.wait()).await.is_err() {
        tracing::warn!(left = tasks.len(), "response streams still running at shutdown");
    }
    let closed = tokio::task::spawn_blocking(move || store.close()).await;
    r.map_err(kvcache_net::ServeError::from)?;
    closed.map_err(kvcache_net::ServeError::from)??;
    Ok(())
}

/// Publish the store's gauges every two seconds (index memory is measured, so not per request).
async fn export_gauges(store: Arc<PageStore>, metrics: Arc<metrics::NodeMetrics>) {
    let mut iv = tokio::time::interval(std::time::Duration::from_secs(2));
    loop {
        iv.tick().await;
        let s = store.clone();
        let Ok(st) = tokio::task::spawn_blocking(move || s.stats()).await else { continue };
        metrics.publish(&st, store.epoch());
    }
}
