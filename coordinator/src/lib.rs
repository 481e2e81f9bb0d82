//! kvcache-coordinator: who is in the cluster and where every sequence lives.
//!
//! - [`state`]: [`ClusterState`] — nodes (UP / DRAINING / DOWN, join ramp), workers, namespaces,
//!   the epoch, and the [`ShardMap`](kvcache_proto::v1::ShardMap) published on every change.
//!   Persisted to `coordinator-state.pb` in the data dir (temp file, fsync, rename, fsync dir), so
//!   a restarted coordinator keeps its namespaces and its epoch never goes backwards.
//! - [`service`]: the `Coordinator` gRPC service, and the background task that marks silent nodes
//!   down and advances join ramps.
//! - `etcd` (cargo feature `etcd`): HA — state in etcd, leader election among replicas,
//!   followers serving reads and redirecting writes (UNAVAILABLE + `kvcache-leader`).
//! - [`run`]: serve until shutdown, with health and reflection.
//!
//! Placement itself is not computed here: the map carries each node's weight and clients run
//! weighted rendezvous hashing (`kvcache_core::placement`) over it, so the coordinator is never
//! on the data path. Invariant: every change to placement inputs (membership, state, weight,
//! namespaces, workers) bumps the epoch by one and publishes a new map.

#[cfg(feature = "etcd")]
pub mod etcd;
pub mod service;
pub mod state;

pub use service::CoordinatorService;
pub use state::{ClusterState, CoordinatorConfig};

use std::future::Future;
use std::sync::Arc;
use tokio::net::TcpListener;

/// Serve the coordinator on `listener` until `shutdown` resolves.
pub async fn run(
    state: Arc<ClusterState>,
    listener: TcpListener,
    exposure: kvcache_net::Exposure,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), kvcache_net::ServeError> {
    use kvcache_proto::v1::coordinator_server::CoordinatorServer;
    let (health, health_svc) = tonic_health::server::health_reporter();
    health.set_serving::<CoordinatorServer<CoordinatorService>>().await;
    let reflection = kvcache_net::reflection()?;
    let server = kvcache_net::server(&exposure)?;
    let probe = exposure.health_listener.map(|l| kvcache_net::serve_health(l, health_svc.clone()));
    let ticker = tokio::spawn(service::maintenance(state.clone()));
    let (closing_tx, closing) = tokio::sync::watch::channel(false);
    let service = CoordinatorService::new(state, exposure.auth.clone(), closing);
    let tasks = service.tasks.clone();
    let r = server
        .layer(kvcache_telemetry::GrpcMetricsLayer::new("coordinator"))
        .add_service(health_svc)
        .add_service(reflection)
        .add_service(CoordinatorServer::new(service))
        .serve_with_incoming_shutdown(kvcache_net::incoming(listener), async move {
            shutdown.await;
            let _ = closing_tx.send(true);
        })
        .await;
    ticker.abort();
    if let Some(p) = probe {
        p.abort();
    }
    // Watch streams end with "shutting down" once `closing` is set: wait for them (bounded).
    tasks.close();
    if tokio::time::timeout(std::time::Duration::from_secs(10), tasks.wait()).await.is_err() {
        tracing::warn!(left = tasks.len(), "watch streams still running at shutdown");
    }
    r?;
    Ok(())
}
