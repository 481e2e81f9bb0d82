//! Hybrid models end to end through a local cluster: a namespace mixing sliding-window, chunked
//! and full layers with attention sinks; decode steps through the worker checked against the
//! float64 reference over exactly the window; pages outside the window neither kept nor pulled;
//! per-layer bad input refused with the layer and the field named.

use bytes::Bytes;
use kvcache_attention::{AttnShape, KvPage, reference};
use kvcache_cli::cluster::{LocalCluster, LocalClusterConfig};
use kvcache_cli::synth::{Mirror, Rng, prefill_pages, tokens_payload};
use kvcache_client::{Client, SequenceStatus};
use kvcache_core::spec::LayerKind;
use kvcache_core::{ModelSpec, Namespace, SequenceKey};
use kvcache_proto::v1 as pb;
use tonic::Code;

/// 8 query heads over 2 KV heads of 64; layer 0 slides over 40 tokens, layer 1 is full, layer 2
/// attends within 32-token chunks, layer 3 is MLP-only; sinks on.
fn model() -> ModelSpec {
    let mut m = ModelSpec::preset("gpt-oss-20b").unwrap();
    m.name = "tiny-hybrid".into();
    m.num_layers = 4;
    m.num_q_heads = 8;
    m.num_kv_heads = 2;
    m.layers =
        vec![LayerKind::Sliding { window: 40 }, LayerKind::Full, LayerKind::Chunked { chunk: 32 }, LayerKind::None];
    m
}

async fn namespace(client: &Client, name: &str) -> Namespace {
    client
        .create_namespace(pb::CreateNamespaceRequest {
            name: name.into(),
            tenant: "test".into(),
            model: Some((&model()).into()),
            codec: pb::Codec::Bf16 as i32,
            page_tokens: 16,
            replication: 1,
            ..Default::default()
        })
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn windows_chunks_and_sinks_decode_through_the_worker_and_pull_only_the_window() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = LocalClusterConfig::new(dir.path());
    cfg.node_capacity = 64 << 20;
    let cluster = LocalCluster::start(cfg).await.unwrap();
    let client = Client::connect(&cluster.coordinator).await.unwrap();
    let mut rng = Rng::new(11);
    let ns = namespace(&client, "t.hybrid").await;
    assert_eq!(ns.model.layers, model().layers, "the coordinator keeps the layer kinds");
    let shape = AttnShape::new(&ns.model, ns.layout());
    let seq = SequenceKey::new("t.hybrid", "s");
    // A 100-token prompt in layers 0..3.
    let pages = prefill_pages(&ns, &seq, 3, 100, &mut rng);
    client.put_pages(pages.clone()).await.unwrap();
    let mut mirrors: Vec<Mirror> = (0..3).map(|l| Mirror::from_wire(&pages, l)).collect();
    let page_bytes = ns.layout().payload_bytes(16) as u64;
    let sinks: Vec<Vec<f32>> = (0..3).map(|_| rng.vec(8, 2.0)).collect();
    for step in 0..40 {
        for layer in 0..3u32 {
            let kind = ns.model.layer(layer);
            let q = rng.vec(shape.q_len(), 1.0);
            let tok = tokens_payload(&ns, 1, &mut rng);
            mirrors[layer as usize].append(&ns, &tok);
            let r = client
                .decode(pb::DecodeRequest {
                    namespace: ns.name.clone(),
                    layer,
                    items: vec![pb::DecodeItem { new_kv: Bytes::from(tok), ..pb::DecodeItem::with_query("s", &q) }],
                    sinks: kvcache_proto::f32le::to_bytes(&sinks[layer as usize]),
                    ..Default::default()
                })
                .await
                .unwrap();
            let res = &r.results[0];
            assert_eq!(res.status, SequenceStatus::Ok, "{}", res.message);
            let m = &mirrors[layer as usize];
            let window = kind.read_range(m.tokens());
            assert_eq!(res.context_tokens, window.end - window.start, "step {step} layer {layer}");
            let kv: Vec<KvPage> = m.pages.iter().map(|(p, n)| KvPage { payload: p, tokens: *n }).collect();
            let (want, _) =
                reference::attention_window(&shape, &q, &kv, window.start as usize, Some(&sinks[layer as usize]));
            let e = reference::rel_l2(&res.output_f32(), &want);
            assert!(e <= 1e-5, "step {step} layer {layer} ({kind:?}): rel L2 {e:e}");
            // The first step pulls the window's pages only; later ones at most the page written.
            let live_pages = (m.tokens() - 1) / 16 + 1 - kind.first_live_page(m.tokens(), 16) as u64;
            let limit = if step == 0 { live_pages * page_bytes } else { 2 * page_bytes };
            assert!(r.stats.bytes_pulled <= limit, "step {step} layer {layer}: pulled {}", r.stats.bytes_pulled);
        }
    }
    // The node keeps only the window of layer 0 (140 tokens, window 40: pages 6..8) and the chunk
    // of layer 2 (tokens 128..140: page 8), every page of layer 1.
    assert_eq!(pages_held(&client).await, 3 + 9 + 1);

    // Bad input, each named.
    let q = rng.vec(shape.q_len(), 1.0);
    let req = |layer: u32, item: pb::DecodeItem, sinks: Vec<f32>| pb::DecodeRequest {
        namespace: ns.name.clone(),
        layer,
        items: vec![item],
        sinks: kvcache_proto::f32le::to_bytes(&sinks),
        ..Default::default()
    };
    let item = || pb::DecodeItem::with_query("s", &q);
    let mut w = kvcache_proto::v1::attention_worker_client::AttentionWorkerClient::new(
        kvcache_client::channel(&cluster.worker).unwrap(),
    );
    for (r, says) in [
        (req(0, item(), vec![]), "sinks must carry 8 f32"),
        (req(0, item(), vec![0.0; 7]), "sinks has 28 bytes, expected 32"),
        (req(1, item(), vec![f32::NAN; 8]), "not finite"),
        (req(3, item(), vec![0.0; 8]), "layer 3 of tiny-hybrid is an MLP-only layer"),
        (
            req(0, pb::DecodeItem { linear: Some(pb::LinearStep::default()), ..item() }, vec![0.0; 8]),
            "layer 0 is a sliding attention layer: linear inputs do not apply",
        ),
        (
            req(2, pb::DecodeItem { index_query: Bytes::from(vec![0u8; 4]), ..item() }, vec![0.0; 8]),
            "tiny-hybrid has no indexer",
        ),
    ] {
        let e = w.decode(r).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
        assert!(e.message().contains(says), "{says}: {}", e.message());
    }
    // Nothing was appended by the refused calls.
    assert_eq!(pages_held(&client).await, 13);
    // A layer list that does not fit the model is refused at creation.
    let mut bad: pb::ModelSpec = (&model()).into();
    bad.layers[0].kind = Some(pb::layer_spec::Kind::Sliding(pb::SlidingWindow { window: 0 }));
    let e = client
        .create_namespace(pb::CreateNamespaceRequest {
            name: "t.bad".into(),
            model: Some(bad),
            codec: pb::Codec::Bf16 as i32,
            page_tokens: 16,
            replication: 1,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(e.to_string().contains("layer 0: sliding window 0"), "{e}");
    cluster.stop().await.unwrap();
}

/// Pages held over every node.
async fn pages_held(client: &Client) -> u64 {
    client.node_stats().await.into_iter().map(|(_, s)| s.unwrap().pages).sum()
}
