//! One decode step is one trace across three processes: the test's client, the worker and the
//! cache node export spans over OTLP to a minimal trace receiver run by the test (the
//! opentelemetry-proto TraceService served with tonic), and the spans connect.

mod common;

use bytes::Bytes;
use common::spawn_env;
use kvcache_attention::AttnShape;
use kvcache_cli::synth::{Rng, prefill_pages, tokens_payload};
use kvcache_client::Client;
use kvcache_core::SequenceKey;
use kvcache_proto::v1 as pb;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tracing::Instrument;

/// (service.name, span name, trace id, span id, parent span id)
type Spans = Arc<Mutex<Vec<(String, String, Vec<u8>, Vec<u8>, Vec<u8>)>>>;

struct Receiver(Spans);

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        r: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut out = self.0.lock().unwrap();
        for rs in r.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| r.attributes.iter())
                .find(|a| a.key == "service.name")
                .and_then(|a| a.value.as_ref())
                .map(|v| format!("{:?}", v.value))
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    out.push((service.clone(), s.name, s.trace_id, s.span_id, s.parent_span_id));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decode_step_is_one_connected_trace_across_client_worker_and_node() {
    let spans: Spans = Arc::default();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", l.local_addr().unwrap());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let receiver = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(Receiver(spans.clone())))
            .serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(l), async {
                let _ = stop_rx.await;
            }),
    );
    let guard = kvcache_telemetry::trace::init_with_endpoint("kvcache-test", Some(endpoint.clone()));
    let envs = [("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()), ("OTEL_BSP_SCHEDULE_DELAY", "100")];
    let dir = tempfile::tempdir().unwrap();
    let cdir = dir.path().join("c");
    let coord = spawn_env(
        &["coordinator", "--listen", "127.0.0.1:0", "--join-ramp", "0s", "--data-dir", cdir.to_str().unwrap()],
        &envs,
    );
    let mut node = common::node("n0", &coord.addr, dir.path(), "64MiB", &[], &envs);
    let mut worker =
        spawn_env(&["worker", "--listen", "127.0.0.1:0", "--coordinator", &coord.addr, "--threads", "1"], &envs);
    let client = Client::connect(&coord.addr).await.unwrap();
    for _ in 0..200 {
        let r = client.refresh().await.unwrap();
        if r.live_nodes().len() == 1 && r.workers.len() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let ns = client
        .create_namespace(pb::CreateNamespaceRequest {
            name: "t.trace".into(),
            preset: "qwen2.5-7b".into(),
            page_tokens: 16,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut rng = Rng::new(4);
    let seq = SequenceKey::new("t.trace", "a");
    client.put_pages(prefill_pages(&ns, &seq, 1, 30, &mut rng)).await.unwrap();
    let shape = AttnShape::new(&ns.model, ns.layout());
    let item = pb::DecodeItem {
        sequence_id: "a".into(),
        query: kvcache_proto::f32le::to_bytes(&rng.vec(shape.q_len(), 1.0)),
        new_kv: Bytes::from(tokens_payload(&ns, 1, &mut rng)),
        new_token_id: None,
        ..Default::default()
    };
    let root = tracing::info_span!(target: "kvcache::test", "decode.step");
    let r = client
        .decode(pb::DecodeRequest {
            namespace: "t.trace".into(),
            layer: 0,
            items: vec![item],
            softmax_scale: 0.0,
            ..Default::default()
        })
        .instrument(root)
        .await
        .unwrap();
    assert_eq!(r.results[0].status, kvcache_client::SequenceStatus::Ok);
    drop(guard); // flushes the test's spans
    // Wait (bounded) for the worker's and the node's spans of this trace.
    let mut found = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let s = spans.lock().unwrap().clone();
        let Some(root) = s.iter().find(|x| x.1 == "decode.step") else { continue };
        let same: Vec<_> = s.iter().filter(|x| x.2 == root.2).collect();
        let has = |svc: &str| same.iter().any(|x| x.0.contains(svc) && x.1 == "grpc.server");
        if has("kvcache-worker") && has("kvcache-node") {
            // The worker's server span hangs off the client's decode span, which hangs off the root.
            let client_span = same.iter().find(|x| x.1 == "client.decode").expect("client span");
            assert_eq!(client_span.4, root.3, "client.decode is a child of the root span");
            let worker_span = same.iter().find(|x| x.0.contains("kvcache-worker") && x.1 == "grpc.server").unwrap();
            assert_eq!(worker_span.4, client_span.3, "the worker's span is a child of client.decode");
            let node_span = same.iter().find(|x| x.0.contains("kvcache-node") && x.1 == "grpc.server").unwrap();
            assert!(same.iter().any(|x| x.3 == node_span.4), "the node's span has a parent in the trace");
            found = true;
            break;
        }
    }
    let all = spans.lock().unwrap().clone();
    assert!(found, "no connected trace; spans received: {:?}", all.iter().map(|x| (&x.0, &x.1)).collect::<Vec<_>>());
    assert!(worker.terminate() && node.terminate());
    let _ = stop_tx.send(());
    let _ = receiver.await;
}
