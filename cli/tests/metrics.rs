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
    // With tenants, so the tenant series are exported too: m (the traffic below), small (a
    // quota share per node of 120 KiB: one 80 KiB sequence fits, a second evicts the first),
    // slow (one request per second).
    let h = |t: &str| hex::encode(kvcache_net::auth::token_sha256(t));
    cfg.auth = kvcache_net::Auth::from_toml(&format!(
        "[tenants.m]\ntoken_sha256 = \"{}\"\n[tenants.small]\ntoken_sha256 = \"{}\"\nquota = {}\n[tenants.slow]\ntoken_sha256 = \"{}\"\nrequests_per_second = 1\n",
        h("m-token"),
        h("small-token"),
        3 * (120 << 10),
        h("slow-token"),
    ))
    .unwrap();
    let cluster = LocalCluster::start(cfg).await.unwrap();
    let as_tenant = |t: &str| kvcache_client::ClientConfig { token: Some(t.into()), ..Default::default() };
    let client = Client::connect_with(&cluster.coordinator, as_tenant("m-token")).await.unwrap();
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
            ..Default::default()
        };
        client
            .decode(pb::DecodeRequest {
                namespace: "m.gqa".into(),
                layer: 0,
                items: vec![item],
                softmax_scale: 0.0,
                ..Default::default()
            })
            .await
            .unwrap();
    }
    // A denial (no token), throttles (slow's second call in a second), quota evictions (small's
    // sequences: with seven over three nodes, some node gets two).
    let mut anon =
        pb::coordinator_client::CoordinatorClient::new(kvcache_client::channel(&cluster.coordinator).unwrap());
    assert_eq!(
        anon.list_namespaces(pb::ListNamespacesRequest {}).await.unwrap_err().code(),
        tonic::Code::Unauthenticated
    );
    let slow = Client::connect_with(&cluster.coordinator, as_tenant("slow-token")).await;
    let slow_again = Client::connect_with(&cluster.coordinator, as_tenant("slow-token")).await;
    assert!(slow.is_err() || slow_again.is_err(), "two connects within a second at 1 request/s");
    let small = Client::connect_with(&cluster.coordinator, as_tenant("small-token")).await.unwrap();
    let sns = small
        .create_namespace(pb::CreateNamespaceRequest {
            name: "small.ns".into(),
            preset: "qwen2.5-7b".into(),
            page_tokens: 16,
            ..Default::default()
        })
        .await
        .unwrap();
    for i in 0..7 {
        let s = SequenceKey::new("small.ns", format!("s{i}"));
        small.put_pages(prefill_pages(&sns, &s, 1, 40, &mut rng)).await.unwrap();
    }
    // The node stats below are the service's view (every namespace): read them as it.
    let stats_client = Client::connect_with(
        &cluster.coordinator,
        kvcache_client::ClientConfig { tls: cluster.service_tls(), ..Default::default() },
    )
    .await
    .unwrap();
    // Three nodes in one process: one kvcache_node_pages series per node (labelled by node id),
    // summing to what the nodes report (what `kvcache status` shows). Gauges are published every
    // two seconds: wait for them, bounded.
    let stats = stats_client.node_stats().await;
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
