//! kvcache-telemetry: what every server exports to Prometheus.
//!
//! - [`names`]: every metric name, in one place (the Grafana dashboard and its test read the
//!   same names). Conventions: `kvcache_` prefix, base units (`_bytes`, `_seconds`), `_total`
//!   counters, histograms with explicit buckets ([`install`]).
//! - [`GrpcMetricsLayer`]: a tower layer for tonic servers counting requests per method and
//!   status code and timing them to the response head.
//! - [`trace`]: JSON logs, OpenTelemetry traces over OTLP (when `OTEL_EXPORTER_OTLP_ENDPOINT` is
//!   set) and W3C trace-context propagation through gRPC metadata.
//! - [`install`]: the Prometheus recorder with `/metrics` on `--metrics-listen`, and
//!   [`install_recorder`] for tests and embedded use (render without HTTP).

pub mod trace;

use futures::future::BoxFuture;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::net::SocketAddr;
use std::task::{Context, Poll};
use std::time::Instant;
use tracing::Instrument;

/// Metric names.
pub mod names {
    /// gRPC requests by server, method and status code.
    pub const GRPC_REQUESTS: &str = "kvcache_grpc_requests_total";
    /// gRPC request latency to the response head, by server and method.
    pub const GRPC_DURATION: &str = "kvcache_grpc_request_duration_seconds";
    /// Pages served.
    pub const NODE_PAGE_HITS: &str = "kvcache_node_page_hits_total";
    /// Pages asked for and not held.
    pub const NODE_PAGE_MISSES: &str = "kvcache_node_page_misses_total";
    /// Payload bytes served.
    pub const NODE_BYTES_OUT: &str = "kvcache_node_bytes_out_total";
    /// Payload bytes stored (puts and appends).
    pub const NODE_BYTES_IN: &str = "kvcache_node_bytes_in_total";
    /// Bytes of stored pages (header + payload).
    pub const NODE_STORED_BYTES: &str = "kvcache_node_stored_bytes";
    /// Configured capacity.
    pub const NODE_CAPACITY_BYTES: &str = "kvcache_node_capacity_bytes";
    /// Bytes of pool files.
    pub const NODE_POOL_BYTES: &str = "kvcache_node_pool_bytes";
    /// Pages held.
    pub const NODE_PAGES: &str = "kvcache_node_pages";
    /// Sequences held.
    pub const NODE_SEQUENCES: &str = "kvcache_node_sequences";
    /// Sequences evicted, by reason.
    pub const NODE_EVICTIONS: &str = "kvcache_node_evictions_total";
    /// Unexpired leases.
    pub const NODE_LEASES: &str = "kvcache_node_active_leases";
    /// Pool files taken out of service after a failed flush.
    pub const NODE_POOL_FILES_FAILED: &str = "kvcache_node_pool_files_failed";
    /// Index memory.
    pub const NODE_INDEX_BYTES: &str = "kvcache_node_index_bytes";
    /// Seconds the last start spent recovering pool files.
    pub const NODE_RECOVERY_SECONDS: &str = "kvcache_node_recovery_seconds";
    /// Pages dropped because they failed verification.
    pub const NODE_CORRUPT_PAGES: &str = "kvcache_node_corrupt_pages_total";
    /// Per namespace: page reads, dedup hits, conflicts, evictions and match outcomes
    /// (label `event`).
    pub const NODE_NAMESPACE_EVENTS: &str = "kvcache_node_namespace_events_total";
    /// Per namespace: bytes of pages held.
    pub const NODE_NAMESPACE_BYTES: &str = "kvcache_node_namespace_bytes";
    /// The node's shard-map epoch.
    pub const NODE_EPOCH: &str = "kvcache_node_epoch";
    /// Sequences this node handed off to their owners, by outcome (`copied`, `current`, `failed`).
    pub const NODE_HANDOFF_SEQUENCES: &str = "kvcache_node_handoff_sequences_total";
    /// Payload bytes this node copied to other nodes in handoffs.
    pub const NODE_HANDOFF_BYTES: &str = "kvcache_node_handoff_bytes_total";
    /// Sequences this node dropped after handing them to their owners.
    pub const NODE_HANDOFF_RELEASED: &str = "kvcache_node_handoff_released_total";
    /// Worker page-cache hits.
    pub const WORKER_CACHE_HITS: &str = "kvcache_worker_cache_hits_total";
    /// Worker page-cache misses.
    pub const WORKER_CACHE_MISSES: &str = "kvcache_worker_cache_misses_total";
    /// Bytes the worker's page cache holds.
    pub const WORKER_CACHE_BYTES: &str = "kvcache_worker_cache_bytes";
    /// Bytes pulled from nodes.
    pub const WORKER_BYTES_PULLED: &str = "kvcache_worker_bytes_pulled_total";
    /// Bytes pulled per decode call.
    pub const WORKER_BYTES_PER_STEP: &str = "kvcache_worker_bytes_pulled_per_step_bytes";
    /// Sequences computed while their append was in flight, and kept.
    pub const WORKER_OVERLAPPED: &str = "kvcache_worker_sequences_overlapped_total";
    /// Sequences computed that way whose owner's answer refuted the pages: computed again.
    pub const WORKER_RECOMPUTED: &str = "kvcache_worker_sequences_recomputed_total";
    /// Sequences decoded, by status.
    pub const WORKER_SEQUENCES: &str = "kvcache_worker_sequences_total";
    /// The coordinator's epoch.
    pub const COORDINATOR_EPOCH: &str = "kvcache_coordinator_epoch";
    /// Nodes by state.
    pub const COORDINATOR_NODES: &str = "kvcache_coordinator_nodes";
    /// Namespaces.
    pub const COORDINATOR_NAMESPACES: &str = "kvcache_coordinator_namespaces";
    /// Authenticated requests, by tenant ("service" for kvcache's own processes) and server.
    pub const TENANT_REQUESTS: &str = "kvcache_tenant_requests_total";
    /// Requests refused by authentication or authorization, by tenant ("unknown" when no
    /// tenant could be named) and reason.
    pub const TENANT_DENIED: &str = "kvcache_tenant_denied_total";
    /// Requests refused by a rate limit, by tenant and limit (requests, bytes).
    pub const TENANT_THROTTLED: &str = "kvcache_tenant_throttled_total";
    /// Bytes a tenant's pages take on a node (headers included), by tenant.
    pub const TENANT_STORED_BYTES: &str = "kvcache_tenant_stored_bytes";
    /// A tenant's share of its quota on a node, by tenant (absent: no quota).
    pub const TENANT_QUOTA_BYTES: &str = "kvcache_tenant_quota_bytes";
    /// Page reads of a tenant's namespaces on a node, by tenant and result (hit, miss).
    pub const TENANT_PAGE_READS: &str = "kvcache_tenant_page_reads_total";
    /// A tenant's sequences evicted on a node to keep it within its quota, by tenant.
    pub const TENANT_QUOTA_EVICTIONS: &str = "kvcache_tenant_quota_evictions_total";
    /// Reloads of the tenants file, by outcome (ok, error).
    pub const TENANTS_RELOADS: &str = "kvcache_tenants_reloads_total";
}

/// Register the help text and unit of every metric (Prometheus `# HELP` lines).
fn describe() {
    metrics::describe_counter!(names::GRPC_REQUESTS, "gRPC requests by server, method and status code.");
    metrics::describe_histogram!(
        names::GRPC_DURATION,
        metrics::Unit::Seconds,
        "gRPC request latency to the response head, by server and method."
    );
    metrics::describe_counter!(names::NODE_PAGE_HITS, "Pages served.");
    metrics::describe_counter!(names::NODE_PAGE_MISSES, "Pages asked for and not held.");
    metrics::describe_counter!(names::NODE_BYTES_OUT, metrics::Unit::Bytes, "Payload bytes served.");
    metrics::describe_counter!(names::NODE_BYTES_IN, metrics::Unit::Bytes, "Payload bytes stored (puts and appends).");
    metrics::describe_gauge!(
        names::NODE_STORED_BYTES,
        metrics::Unit::Bytes,
        "Bytes of stored pages (header + payload)."
    );
    metrics::describe_gauge!(names::NODE_CAPACITY_BYTES, metrics::Unit::Bytes, "Configured capacity.");
    metrics::describe_gauge!(names::NODE_POOL_BYTES, metrics::Unit::Bytes, "Bytes of pool files.");
    metrics::describe_gauge!(names::NODE_PAGES, "Pages held.");
    metrics::describe_gauge!(names::NODE_SEQUENCES, "Sequences held.");
    metrics::describe_counter!(names::NODE_EVICTIONS, "Sequences evicted, by reason.");
    metrics::describe_gauge!(names::NODE_LEASES, "Unexpired leases.");
    metrics::describe_gauge!(names::NODE_POOL_FILES_FAILED, "Pool files taken out of service after a failed flush.");
    metrics::describe_gauge!(names::NODE_INDEX_BYTES, metrics::Unit::Bytes, "Index memory.");
    metrics::describe_gauge!(
        names::NODE_RECOVERY_SECONDS,
        metrics::Unit::Seconds,
        "Seconds the last start spent recovering pool files."
    );
    metrics::describe_counter!(names::NODE_CORRUPT_PAGES, "Pages dropped because they failed verification.");
    metrics::describe_counter!(
        names::NODE_NAMESPACE_EVENTS,
        "Per namespace: get_hit, get_miss, dedup_hit, conflict, eviction, match_hit, match_miss."
    );
    metrics::describe_gauge!(names::NODE_NAMESPACE_BYTES, "Per namespace: bytes of pages held (headers included).");
    metrics::describe_gauge!(names::NODE_EPOCH, "The node's shard-map epoch.");
    metrics::describe_counter!(
        names::NODE_HANDOFF_SEQUENCES,
        "Sequences handed off to their owners, by outcome (copied, current, failed)."
    );
    metrics::describe_counter!(names::NODE_HANDOFF_BYTES, "Payload bytes copied to other nodes in handoffs.");
    metrics::describe_counter!(
        names::NODE_HANDOFF_RELEASED,
        "Sequences dropped after handing them to their owners (drain, a join's share)."
    );
    metrics::describe_counter!(names::TENANT_REQUESTS, "Authenticated requests, by tenant and server.");
    metrics::describe_counter!(
        names::TENANT_DENIED,
        "Requests refused by authentication or authorization, by tenant and reason."
    );
    metrics::describe_counter!(names::TENANT_THROTTLED, "Requests refused by a rate limit, by tenant and limit.");
    metrics::describe_counter!(
        names::TENANT_PAGE_READS,
        "Page reads of a tenant's namespaces on a node, by result (hit, miss)."
    );
    metrics::describe_gauge!(
        names::TENANT_STORED_BYTES,
        metrics::Unit::Bytes,
        "Bytes of a tenant's pages on this node."
    );
    metrics::describe_gauge!(
        names::TENANT_QUOTA_BYTES,
        metrics::Unit::Bytes,
        "A tenant's share of its quota on this node."
    );
    metrics::describe_counter!(
        names::TENANT_QUOTA_EVICTIONS,
        "A tenant's sequences evicted to keep it within its quota."
    );
    metrics::describe_counter!(names::TENANTS_RELOADS, "Reloads of the tenants file, by outcome.");
    metrics::describe_counter!(names::WORKER_CACHE_HITS, "Worker page-cache hits.");
    metrics::describe_counter!(names::WORKER_CACHE_MISSES, "Worker page-cache misses.");
    metrics::describe_gauge!(names::WORKER_CACHE_BYTES, metrics::Unit::Bytes, "Bytes the worker's page cache holds.");
    metrics::describe_counter!(names::WORKER_BYTES_PULLED, metrics::Unit::Bytes, "Bytes pulled from nodes.");
    metrics::describe_histogram!(names::WORKER_BYTES_PER_STEP, metrics::Unit::Bytes, "Bytes pulled per decode call.");
    metrics::describe_counter!(names::WORKER_SEQUENCES, "Sequences decoded, by status.");
    metrics::describe_counter!(
        names::WORKER_OVERLAPPED,
        "Sequences computed while their append was in flight, and kept when the owner confirmed the pages."
    );
    metrics::describe_counter!(
        names::WORKER_RECOMPUTED,
        "Sequences computed while their append was in flight whose owner's answer refuted the pages: computed again."
    );
    metrics::describe_gauge!(names::COORDINATOR_EPOCH, "The coordinator's epoch.");
    metrics::describe_gauge!(names::COORDINATOR_NODES, "Nodes by state.");
    metrics::describe_gauge!(names::COORDINATOR_NAMESPACES, "Namespaces.");
}

fn builder() -> PrometheusBuilder {
    let latency = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];
    let bytes = [0.0, 4096.0, 65536.0, 262144.0, 1048576.0, 4194304.0, 16777216.0, 67108864.0, 268435456.0];
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(names::GRPC_DURATION.into()), &latency)
        .expect("non-empty buckets")
        .set_buckets_for_metric(Matcher::Full(names::WORKER_BYTES_PER_STEP.into()), &bytes)
        .expect("non-empty buckets")
}

/// Install the global recorder and serve `/metrics` on `addr`.
pub fn install(addr: SocketAddr) -> Result<(), String> {
    builder().with_http_listener(addr).install().map_err(|e| e.to_string())?;
    describe();
    Ok(())
}

/// Install the global recorder without an HTTP listener; render with the handle.
pub fn install_recorder() -> Result<PrometheusHandle, String> {
    let h = builder().install_recorder().map_err(|e| e.to_string())?;
    describe();
    Ok(h)
}

/// Tower layer recording [`names::GRPC_REQUESTS`] and [`names::GRPC_DURATION`].
#[derive(Debug, Clone, Copy)]
pub struct GrpcMetricsLayer {
    server: &'static str,
}

impl GrpcMetricsLayer {
    /// Label requests with `server` ("node", "coordinator", "worker").
    pub fn new(server: &'static str) -> Self {
        Self { server }
    }
}

impl<S> tower::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;
    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetrics { inner, server: self.server }
    }
}

/// The service of [`GrpcMetricsLayer`].
#[derive(Debug, Clone)]
pub struct GrpcMetrics<S> {
    inner: S,
    server: &'static str,
}

impl<S, B, RB> tower::Service<http::Request<B>> for GrpcMetrics<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let method = req.uri().path().to_owned();
        let server = self.server;
        let start = Instant::now();
        let span = trace::server_span(server, &method, req.headers());
        let fut = span.in_scope(|| self.inner.call(req));
        Box::pin(
            async move {
                let r = fut.await;
                // Errors answered before any data carry grpc-status in the response head; streamed
                // answers carry it in trailers and count here as OK.
                let code = match &r {
                    Ok(resp) => {
                        resp.headers().get("grpc-status").and_then(|v| v.to_str().ok()).unwrap_or("0").to_owned()
                    }
                    Err(_) => "14".to_owned(),
                };
                metrics::counter!(names::GRPC_REQUESTS, "server" => server, "method" => method.clone(), "code" => code)
                    .increment(1);
                metrics::histogram!(names::GRPC_DURATION, "server" => server, "method" => method)
                    .record(start.elapsed().as_secs_f64());
                r
            }
            .instrument(span),
        )
    }
}
