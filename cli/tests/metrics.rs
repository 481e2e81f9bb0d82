//! Every metric the Grafana dashboard queries is exported once a cluster has served traffic,
//! and the exposition follows the naming conventions.

use bytes::Bytes;
use kvcache_attention::AttnShape;
use kvcache_cli::cluster::{LocalCluster, LocalClusterConfig};
use kvcache_cli::synth::{Rng, prefill_pages, tokens_payload};
use kvcache_client::Client;
use kvcache_core::SequenceKey;
use kvcache_proto::v1 as pb;

fn dashboard_metrics() -> Vec<String> {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/grafana/kvcache.json")).unwrap();
    let dash: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut names = Vec::new();
    for p in dash["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            let expr = t["expr"].as_str().unwrap();
            let mut rest = expr;
            while let Some(i) = rest.find("kvcache_") {
                let tail = &rest[i..];
                let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
                names.push(tail[..end].to_owned());
                rest = &tail[end..];
            }
        }
    }
    names.sort();
    names.dedup();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_metric_is_exported() {
    let handle = kvcache_telemetry::install_recorder().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = LocalClusterConfig::new(dir.path());
    cfg.node_capacity = 64 << 20;
    let cluster = LocalCluster::start(cfg).await.unwrap();
    let client = Client::connect(&cluster.coordinator).await.unwrap();
    let ns = client
        .create_namespace(pb::CreateNamespaceRequest {
            name: "m.gqa".into(),
            preset: "qwen2.5-7b".into(),
            page_tokens: 16,
            ..Default::default()
        })
        .await
        .unwrap();
    let shape = AttnShape::new(&ns.model, ns.layout());
    let mut rng = Rng::new(1);
    let seq = SequenceKey::new("m.gqa", "a");
    client.put_pages(prefill_pages(&ns, &seq, 1, 40, &mut rng)).await.unwrap();
    for id in ["a", "missing"] {
        let item = pb::DecodeItem {
            sequence_id: id.into(),
            query: kvcache_proto::f32le::to_bytes(&rng.vec(shape.q_len(), 1.0)),
            new_kv: Bytes::from(tokens_payload(&ns, 1, &mut rng)),
            new_token_id: None,
        };
        client
            .decode(pb::DecodeRequest { namespace: "m.gqa".into(), layer: 0, items: vec![item], softmax_scale: 0.0 })
            .await
            .unwrap();
    }
    // Three nodes in one process: one kvcache_node_pages series per node (labelled by node id),
    // summing to what the nodes report (what `kvcache status` shows). Gauges are published every
    // two seconds: wait for them, bounded.
    let stats = client.node_stats().await;
    let want: u64 = stats.iter().map(|(_, s)| s.as_ref().unwrap().pages).sum();
    assert!(want > 0);
    let series = |text: &str| -> Vec<(String, f64)> {
        text.lines()
            .filter_map(|l| l.strip_prefix("kvcache_node_pages{"))
            .map(|l| {
                let (labels, value) = l.split_once("} ").unwrap();
                (labels.to_owned(), value.trim().parse::<f64>().unwrap())
            })
            .collect()
    };
    let mut text = handle.render();
    for _ in 0..100 {
        let s = series(&text);
        if s.len() == 3 && s.iter().map(|x| x.1).sum::<f64>() == want as f64 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        text = handle.render();
    }
    let s = series(&text);
    let mut labels: Vec<&str> = s.iter().map(|x| x.0.as_str()).collect();
    labels.sort();
    assert_eq!(labels, vec!["node=\"node-0\"", "node=\"node-1\"", "node=\"node-2\""], "{text}");
    assert_eq!(s.iter().map(|x| x.1).sum::<f64>(), want as f64, "exposition {s:?} vs the nodes' stats {want}");
    let exported: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap())
        .collect();
    for m in dashboard_metrics() {
        assert!(exported.iter().any(|e| *e == m), "dashboard queries {m}, which is not exported");
    }
    for e in &exported {
        assert!(e.starts_with("kvcache_"), "{e} lacks the kvcache_ prefix");
    }
    // Every family has help text (promtool in CI checks the rest of the conventions).
    for fam in text.lines().filter_map(|l| l.strip_prefix("# TYPE ")).map(|l| l.split(' ').next().unwrap()) {
        assert!(text.contains(&format!("# HELP {fam} ")), "{fam} has no help text");
    }
    // Counters end in _total; histograms carry explicit buckets.
    assert!(text.contains("# TYPE kvcache_grpc_requests_total counter"));
    assert!(text.contains("kvcache_grpc_request_duration_seconds_bucket{"));
    cluster.stop().await.unwrap();
}
