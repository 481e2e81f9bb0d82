//! The gRPC face of a [`Worker`]: the AttentionWorker service, `run` (health, reflection, a
//! bounded shutdown) and registration with the coordinator.

use crate::Worker;
use kvcache_client::Client;
use kvcache_proto::v1 as pb;
use kvcache_proto::v1::attention_worker_server::AttentionWorker;
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// The gRPC face of a [`Worker`].
pub struct WorkerService(pub Arc<Worker>);

#[tonic::async_trait]
impl AttentionWorker for WorkerService {
    async fn decode(&self, request: Request<pb::DecodeRequest>) -> Result<Response<pb::DecodeResponse>, Status> {
        let caller = kvcache_net::Caller::of(&request);
        let req = request.into_inner();
        // The worker pulls pages with the service credential: the tenant is checked here, once
        // per call, against the namespace's owner (an unknown namespace is NOT_FOUND below).
        if !caller.is_trusted()
            && let Some(ns) = self.0.namespace(&req.namespace).await
        {
            caller.check_namespace(&ns.name, &ns.tenant)?;
        }
        self.0.decode(req).await.map(Response::new)
    }
}

/// Serve `worker` on `listener` until `shutdown`, with health and reflection.
pub async fn run(
    worker: Arc<Worker>,
    listener: tokio::net::TcpListener,
    exposure: kvcache_net::Exposure,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), kvcache_net::ServeError> {
    use kvcache_proto::v1::attention_worker_server::AttentionWorkerServer;
    let (health, health_svc) = tonic_health::server::health_reporter();
    health.set_serving::<AttentionWorkerServer<WorkerService>>().await;
    let reflection = kvcache_net::reflection()?;
    let server = kvcache_net::server(&exposure)?;
    let probe = exposure.health_listener.map(|l| kvcache_net::serve_health(l, health_svc.clone()));
    let r = server
        .layer(kvcache_telemetry::GrpcMetricsLayer::new("worker"))
        .add_service(health_svc)
        .add_service(reflection)
        .add_service(
            AttentionWorkerServer::new(WorkerService(worker.clone()))
                .max_decoding_message_size(kvcache_client::MAX_MESSAGE_BYTES)
                .max_encoding_message_size(kvcache_client::MAX_MESSAGE_BYTES),
        )
        .serve_with_incoming_shutdown(kvcache_net::incoming(listener), shutdown)
        .await;
    if let Some(p) = probe {
        p.abort();
    }
    // Lease releases and prefetches the last calls started: wait for them (bounded), so the
    // nodes are not left with leases they only lose at expiry.
    worker.tasks.close();
    if tokio::time::timeout(SHUTDOWN_WAIT, worker.tasks.wait()).await.is_err() {
        tracing::warn!(left = worker.tasks.len(), "worker tasks still running at shutdown");
    }
    r?;
    Ok(())
}

/// Longest a stopping worker waits for the work its calls started.
pub const SHUTDOWN_WAIT: std::time::Duration = std::time::Duration::from_secs(20);

/// Register a worker with the coordinator (retrying until it succeeds or `attempts` run out).
pub async fn register(client: &Client, worker_id: &str, address: &str) -> Result<u64, Status> {
    let mut last = Status::unavailable("not attempted");
    for _ in 0..50 {
        match client
            .coordinator()
            .register_worker(pb::RegisterWorkerRequest { worker_id: worker_id.into(), address: address.into() })
            .await
        {
            Ok(r) => {
                let _ = client.refresh().await;
                return Ok(r.into_inner().epoch);
            }
            Err(e) => last = e,
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    Err(last)
}
