//! Logs and traces: JSON logs to stdout (level from `RUST_LOG`), and OpenTelemetry traces over
//! OTLP/gRPC when `OTEL_EXPORTER_OTLP_ENDPOINT` is set. Trace context travels in gRPC metadata
//! (W3C `traceparent`): [`inject`] on every outgoing request, extraction in
//! [`crate::GrpcMetricsLayer`] on every server, so one decode step is one trace across client,
//! worker and nodes.

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Keeps the tracer provider alive; dropping it flushes pending spans.
pub struct TracingGuard(Option<SdkTracerProvider>);

impl Drop for TracingGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = p.shutdown();
        }
    }
}

/// Install JSON logging and, when `OTEL_EXPORTER_OTLP_ENDPOINT` is set, the OTLP exporter for
/// `service` (the `service.name` resource). Must run inside a tokio runtime when exporting.
pub fn init(service: &'static str) -> TracingGuard {
    init_with_endpoint(service, std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").ok())
}

/// [`init`] with the OTLP endpoint given rather than read from the environment.
pub fn init_with_endpoint(service: &'static str, endpoint: Option<String>) -> TracingGuard {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer().json().with_target(false).with_filter(filter);
    let provider = endpoint.filter(|e| !e.is_empty()).and_then(|endpoint| {
        let exporter = opentelemetry_otlp::SpanExporter::builder().with_tonic().with_endpoint(endpoint).build().ok()?;
        let resource = opentelemetry_sdk::Resource::builder().with_service_name(service).build();
        Some(SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource).build())
    });
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("kvcache"))
            .with_filter(tracing_subscriber::filter::filter_fn(|m| m.target().starts_with("kvcache")))
    });
    let _ = tracing_subscriber::registry().with(fmt).with(otel).try_init();
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    TracingGuard(provider)
}

struct MetadataInjector<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (tonic::metadata::MetadataKey::from_bytes(key.as_bytes()), value.parse()) {
            self.0.insert(k, v);
        }
    }
}

/// Put the current span's context into an outgoing request's metadata.
pub fn inject<T>(req: &mut tonic::Request<T>) {
    let cx = tracing::Span::current().context();
    TraceContextPropagator::new().inject_context(&cx, &mut MetadataInjector(req.metadata_mut()));
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// A server span for one incoming request, child of the caller's context when it sent one.
pub fn server_span(server: &'static str, method: &str, headers: &http::HeaderMap) -> tracing::Span {
    let span = tracing::info_span!(target: "kvcache::rpc", "grpc.server", rpc.system = "grpc", rpc.service = server, rpc.method = %method);
    if headers.contains_key("traceparent") {
        let cx = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
        let _ = span.set_parent(cx);
    }
    span
}
