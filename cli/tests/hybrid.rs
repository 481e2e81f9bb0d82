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

/// 4 query heads over 2 KV heads of 32 in layer 1; layer 0 a Gated DeltaNet layer with 2 key
/// heads and 8 value heads of 32 (a 35,072-byte state: 9 pages of 4,096 bytes).
fn gdn_model() -> ModelSpec {
    let mut m = ModelSpec::preset("llama-3-8b").unwrap();
    m.name = "tiny-gdn".into();
    m.num_layers = 2;
    m.num_q_heads = 4;
    m.num_kv_heads = 2;
    m.head_dim = 32;
    m.softmax_scale = 1.0 / 32f32.sqrt();
    m.layers = vec![
        LayerKind::Linear(kvcache_core::spec::LinearSpec {
            kind: kvcache_core::spec::LinearKind::GatedDeltaNet,
            num_k_heads: 2,
            num_v_heads: 8,
            head_k_dim: 32,
            head_v_dim: 32,
            conv_kernel: 4,
        }),
        LayerKind::Full,
    ];
    m
}

fn unit(rng: &mut Rng, n: usize, d: usize) -> Vec<f32> {
    let mut v = rng.vec(n, 1.0);
    for h in v.chunks_exact_mut(d) {
        let norm = h.iter().map(|x| x * x).sum::<f32>().sqrt();
        h.iter_mut().for_each(|x| *x /= norm);
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linear_layers_keep_a_state_that_decode_steps_and_prefix_hits_restore() {
    use kvcache_attention::hybrid::LinearInputs;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = LocalClusterConfig::new(dir.path());
    cfg.node_capacity = 64 << 20;
    let cluster = LocalCluster::start(cfg).await.unwrap();
    let client = Client::connect(&cluster.coordinator).await.unwrap();
    let mut rng = Rng::new(5);
    let ns = client
        .create_namespace(pb::CreateNamespaceRequest {
            name: "t.gdn".into(),
            model: Some((&gdn_model()).into()),
            codec: pb::Codec::Bf16 as i32,
            page_tokens: 16,
            replication: 2,
            ..Default::default()
        })
        .await
        .unwrap();
    let LayerKind::Linear(spec) = ns.model.layer(0) else { panic!() };
    assert_eq!(ns.state_pages(0), 9);
    let (rec, conv_len) = (spec.recurrent_elems(), spec.conv_dim() * 3 * 2);
    let seq = SequenceKey::new("t.gdn", "s");
    // A state as prefill leaves it: small values, and a zero conv state.
    let mut state: Vec<f32> = rng.vec(rec, 0.1);
    let to_bytes = |s: &[f32], conv: &[u8]| {
        let mut b = kvcache_proto::f32le::to_bytes(s).to_vec();
        b.extend_from_slice(conv);
        b
    };
    client.put_state(&seq, 0, &to_bytes(&state, &vec![0u8; conv_len])).await.unwrap();
    let mut convs: Vec<Vec<f32>> = Vec::new();
    let scale = 1.0 / 32f32.sqrt();
    for step in 0..6 {
        let (q, k) = (unit(&mut rng, 64, 32), unit(&mut rng, 64, 32));
        let v = rng.vec(256, 1.0);
        let g: Vec<f32> = rng.vec(8, 1.0).iter().map(|x| -x.abs()).collect();
        let beta: Vec<f32> = rng.vec(8, 1.0).iter().map(|x| x.abs()).collect();
        let conv = rng.vec(spec.conv_dim(), 1.0);
        let x = LinearInputs { q: &q, k: &k, v: &v, g: &g, beta: &beta };
        let (want_state, want) = reference::linear_step(&spec, &state, &x, scale);
        let b = |v: &[f32]| kvcache_proto::f32le::to_bytes(v);
        let r = client
            .decode(pb::DecodeRequest {
                namespace: "t.gdn".into(),
                layer: 0,
                items: vec![pb::DecodeItem {
                    sequence_id: "s".into(),
                    linear: Some(pb::LinearStep {
                        q: b(&q),
                        k: b(&k),
                        v: b(&v),
                        g: b(&g),
                        beta: b(&beta),
                        conv_input: b(&conv),
                    }),
                    ..Default::default()
                }],
                ..Default::default()
            })
            .await
            .unwrap();
        let res = &r.results[0];
        assert_eq!(res.status, SequenceStatus::Ok, "{}", res.message);
        let e = reference::rel_l2(&res.output_f32(), &want);
        assert!(e <= 1e-5, "step {step}: rel L2 {e:e}");
        state = want_state.iter().map(|v| *v as f32).collect();
        convs.push(conv);
    }
    // The stored state is the stepped one; its conv state holds the last three conv inputs.
    let stored = client.get_state(&seq, 0).await.unwrap().unwrap();
    let got: Vec<f32> = kvcache_proto::f32le::from_bytes(&stored[..rec * 4]).unwrap();
    assert!(reference::rel_l2(&got, &state.iter().map(|v| *v as f64).collect::<Vec<_>>()) < 1e-5);
    let conv_state: Vec<f32> =
        stored[rec * 4..].chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect();
    for ch in [0, 17, spec.conv_dim() - 1] {
        for t in 0..3 {
            let want = half::bf16::from_f32(convs[3 + t][ch]).to_f32();
            assert_eq!(conv_state[ch * 3 + t], want, "channel {ch} slot {t}");
        }
    }

    // A sequence without a state is a miss; bad inputs are refused by field, with nothing written.
    let b = |v: Vec<f32>| kvcache_proto::f32le::to_bytes(&v);
    let good = pb::LinearStep {
        q: b(unit(&mut rng, 64, 32)),
        k: b(unit(&mut rng, 64, 32)),
        v: b(vec![0.5; 256]),
        g: b(vec![-0.1; 8]),
        beta: b(vec![0.5; 8]),
        conv_input: Bytes::new(),
    };
    let one = |id: &str, linear: Option<pb::LinearStep>| pb::DecodeRequest {
        namespace: "t.gdn".into(),
        layer: 0,
        items: vec![pb::DecodeItem { sequence_id: id.into(), linear, ..Default::default() }],
        ..Default::default()
    };
    let r = client.decode(one("nobody", Some(good.clone()))).await.unwrap();
    assert_eq!(r.results[0].status, SequenceStatus::Miss, "{}", r.results[0].message);
    let mut w = kvcache_proto::v1::attention_worker_client::AttentionWorkerClient::new(
        kvcache_client::channel(&cluster.worker).unwrap(),
    );
    for (req, says) in [
        (one("s", None), "linear (q, k, v, g, beta) is required"),
        (one("s", Some(pb::LinearStep { q: b(vec![0.0; 63]), ..good.clone() })), "linear.q has 63 values, expected 64"),
        (one("s", Some(pb::LinearStep { g: b(vec![0.5; 8]), ..good.clone() })), "log decay"),
        (one("s", Some(pb::LinearStep { beta: b(vec![0.5; 9]), ..good.clone() })), "linear.beta has 9 values"),
        (
            one("s", Some(pb::LinearStep { conv_input: b(vec![0.0; 3]), ..good.clone() })),
            "conv_input has 3 values, expected 384",
        ),
        (
            pb::DecodeRequest {
                items: vec![pb::DecodeItem {
                    linear: Some(good.clone()),
                    ..pb::DecodeItem::with_query("s", &[0.0; 4])
                }],
                ..one("s", None)
            },
            "query does not apply",
        ),
    ] {
        let e = w.decode(req).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
        assert!(e.message().contains(says), "{says}: {}", e.message());
    }
    assert_eq!(client.get_state(&seq, 0).await.unwrap().unwrap(), stored, "refused calls wrote nothing");
    // A state of the wrong size, and a state put to a full-attention layer.
    assert!(client.put_state(&seq, 0, &stored[1..]).await.unwrap_err().to_string().contains("a state is 35072 bytes"));
    assert!(client.put_state(&seq, 1, &stored).await.unwrap_err().to_string().contains("layer 1 is a full layer"));

    // Prefix reuse: three cached pages (layer 1 by content), the state snapshot only after page 2.
    let tokens: Vec<u32> = (0..48).collect();
    let keys = client.content_keys("t.gdn", &tokens).unwrap();
    let pages: Vec<pb::Page> = keys
        .iter()
        .map(|k| kvcache_client::content_page(&ns, k, 1, Bytes::from(tokens_payload(&ns, 16, &mut rng))))
        .collect();
    client.put_content("t.gdn", pages).await.unwrap();
    let m = client.match_prefix("t.gdn", &keys, None).await.unwrap();
    assert_eq!(m.pages, 0, "no state snapshot anywhere: nothing restorable ({:?})", m.held);
    client.put_state_snapshot("t.gdn", &keys[1], 0, &stored).await.unwrap();
    let m = client.match_prefix("t.gdn", &keys, None).await.unwrap();
    assert_eq!(m.pages, 2, "the snapshot after page 2: a 2-page prefix ({:?})", m.held);
    // A new sequence over that prefix starts from the snapshot and decodes from it.
    let seq2 = SequenceKey::new("t.gdn", "s2");
    client.create_sequence(&seq2, &keys[..m.pages], None).await.unwrap();
    assert_eq!(client.get_state(&seq2, 0).await.unwrap().unwrap(), stored);
    let r = client.decode(one("s2", Some(good.clone()))).await.unwrap();
    assert_eq!(r.results[0].status, SequenceStatus::Ok, "{}", r.results[0].message);
    // The snapshot is a content page: the sequence's steps never change it.
    assert_eq!(client.get_state_snapshot("t.gdn", &keys[1], 0).await.unwrap().unwrap(), stored);
    cluster.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sparse_mla_attends_to_the_indexers_choice_and_pulls_only_the_pages_holding_it() {
    use kvcache_attention::hybrid::{encode_indexer_key, indexer_scores, top_k};
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = LocalClusterConfig::new(dir.path());
    cfg.node_capacity = 256 << 20;
    let cluster = LocalCluster::start(cfg).await.unwrap();
    let client = Client::connect(&cluster.coordinator).await.unwrap();
    let mut rng = Rng::new(9);
    // DeepSeek-V3.2's layer geometry with 8 heads, an indexer of 4 heads choosing 32 tokens.
    let mut m = ModelSpec::preset("deepseek-v3.2").unwrap();
    m.num_layers = 2;
    m.num_q_heads = 8;
    m.indexer = Some(kvcache_core::spec::IndexerSpec { num_heads: 4, head_dim: 128, topk: 32 });
    let ns = client
        .create_namespace(pb::CreateNamespaceRequest {
            name: "t.dsa".into(),
            model: Some((&m).into()),
            codec: pb::Codec::Bf16 as i32,
            page_tokens: 16,
            replication: 1,
            ..Default::default()
        })
        .await
        .unwrap();
    let ix = ns.model.indexer.unwrap();
    let shape = AttnShape::new(&ns.model, ns.layout());
    let seq = SequenceKey::new("t.dsa", "s");
    let n = 600;
    // Latents of layer 1, and their indexer keys in layer 2 + 1 = 3; a few tokens' keys point
    // where the query will look, so the choice clusters in some pages.
    let lat = prefill_pages(&ns, &seq, 2, n, &mut rng).into_iter().filter(|p| p.key.as_ref().unwrap().layer == 1);
    let lat: Vec<pb::Page> = lat.collect();
    client.put_pages(lat.clone()).await.unwrap();
    let mut mirror = Mirror::from_wire(&lat, 1);
    let iq = rng.vec(4 * 128, 1.0);
    let mut keys: Vec<u8> = Vec::new();
    for t in 0..n {
        let mut k = rng.vec(128, 0.2);
        if (200..240).contains(&t) || t % 97 == 0 {
            for (x, q) in k.iter_mut().zip(&iq[..128]) {
                *x += q;
            }
        }
        let mut b = vec![0u8; ix.bytes_per_token()];
        encode_indexer_key(&ix, &k, &mut b);
        keys.extend_from_slice(&b);
    }
    let il = ns.indexer_layer(1).unwrap();
    assert_eq!(il, 3);
    let key_pages: Vec<pb::Page> = keys
        .chunks(16 * ix.bytes_per_token())
        .enumerate()
        .map(|(i, c)| {
            let key = kvcache_core::PageKey { sequence: seq.clone(), layer: il, page_index: i as u32 };
            kvcache_client::wire_page(&ns, &key, (c.len() / ix.bytes_per_token()) as u32, 0, Bytes::copy_from_slice(c))
        })
        .collect();
    client.put_pages(key_pages).await.unwrap();
    let w = vec![1.0f32, 0.5, 0.25, 0.125];
    let b = |v: &[f32]| kvcache_proto::f32le::to_bytes(v);
    let latent_page = ns.layout().payload_bytes(16) as u64;
    for step in 0..3 {
        let q = rng.vec(shape.q_len(), 1.0);
        let tok = tokens_payload(&ns, 1, &mut rng);
        let mut newkey = vec![0u8; ix.bytes_per_token()];
        encode_indexer_key(&ix, &rng.vec(128, 0.2), &mut newkey);
        mirror.append(&ns, &tok);
        keys.extend_from_slice(&newkey);
        let r = client
            .decode(pb::DecodeRequest {
                namespace: "t.dsa".into(),
                layer: 1,
                items: vec![pb::DecodeItem {
                    new_kv: Bytes::from(tok),
                    new_index_key: Bytes::from(newkey),
                    index_query: b(&iq),
                    index_weights: b(&w),
                    ..pb::DecodeItem::with_query("s", &q)
                }],
                ..Default::default()
            })
            .await
            .unwrap();
        let res = &r.results[0];
        assert_eq!(res.status, SequenceStatus::Ok, "{}", res.message);
        assert_eq!(res.context_tokens, 32);
        // The same choice here, from the same stored keys; the output against the float64
        // reference over exactly those rows.
        let mut scores = Vec::new();
        indexer_scores(&ix, &iq, &w, &keys, &mut scores).unwrap();
        let chosen = top_k(&scores, 32);
        let src: Vec<(&[u8], usize)> = mirror.pages.iter().map(|(p, t)| (&p[..], *t)).collect();
        let rows = kvcache_attention::hybrid::gather_rows(&src, ns.layout().token_bytes(), &chosen).unwrap();
        let (want, _) = reference::attention(&shape, &q, &[KvPage { payload: &rows, tokens: 32 }]);
        let e = reference::rel_l2(&res.output_f32(), &want);
        assert!(e <= 1e-5, "step {step}: rel L2 {e:e}");
        // The first step pulls the indexer keys and the chosen pages only, not all 38 pages.
        let pages_with_choice = {
            let mut p: Vec<u32> = chosen.iter().map(|t| t / 16).collect();
            p.dedup();
            p.len() as u64
        };
        if step == 0 {
            let key_bytes = (n as u64 + 1) * ix.bytes_per_token() as u64;
            // The indexer keys, and the chosen rows alone (GetRows), not the pages holding them.
            let rows = 32 * ns.layout().token_bytes() as u64;
            assert!(
                r.stats.bytes_pulled <= key_bytes + rows,
                "pulled {} > keys {key_bytes} + rows",
                r.stats.bytes_pulled
            );
            assert!(key_bytes + rows < pages_with_choice * latent_page);
            assert!(pages_with_choice < 38, "the test's choice must cluster");
        }
    }
    // A sequence over a cached prefix: three content pages of latents (layer 1) and indexer keys
    // (layer 3); the decode chooses among prefix and own tokens alike.
    let toks: Vec<u32> = (0..48).map(|t| t + 7_000).collect();
    let ck = client.content_keys("t.dsa", &toks).unwrap();
    let (mut pl, mut pk) = (Vec::new(), Vec::new());
    let mut content = Vec::new();
    for k in &ck {
        let lat = tokens_payload(&ns, 16, &mut rng);
        let mut kk = Vec::new();
        for _ in 0..16 {
            let mut b = vec![0u8; ix.bytes_per_token()];
            encode_indexer_key(&ix, &rng.vec(128, 0.5), &mut b);
            kk.extend_from_slice(&b);
        }
        content.push(kvcache_client::content_page(&ns, k, 1, Bytes::from(lat.clone())));
        content.push(kvcache_client::content_page(&ns, k, 3, Bytes::from(kk.clone())));
        pl.push((lat, 16usize));
        pk.extend_from_slice(&kk);
    }
    client.put_content("t.dsa", content).await.unwrap();
    let s2 = SequenceKey::new("t.dsa", "p");
    client.create_sequence(&s2, &ck, None).await.unwrap();
    let mut m2 = Mirror { pages: pl };
    for step in 0..2 {
        let q = rng.vec(shape.q_len(), 1.0);
        let tok = tokens_payload(&ns, 1, &mut rng);
        let mut newkey = vec![0u8; ix.bytes_per_token()];
        encode_indexer_key(&ix, &rng.vec(128, 0.5), &mut newkey);
        m2.append(&ns, &tok);
        pk.extend_from_slice(&newkey);
        let r = client
            .decode(pb::DecodeRequest {
                namespace: "t.dsa".into(),
                layer: 1,
                items: vec![pb::DecodeItem {
                    new_kv: Bytes::from(tok),
                    new_index_key: Bytes::from(newkey),
                    index_query: b(&iq),
                    index_weights: b(&w),
                    ..pb::DecodeItem::with_query("p", &q)
                }],
                ..Default::default()
            })
            .await
            .unwrap();
        let res = &r.results[0];
        assert_eq!(res.status, SequenceStatus::Ok, "{}", res.message);
        assert_eq!(res.context_tokens, 32.min(49 + step));
        let mut scores = Vec::new();
        indexer_scores(&ix, &iq, &w, &pk, &mut scores).unwrap();
        let chosen = top_k(&scores, 32);
        let src: Vec<(&[u8], usize)> = m2.pages.iter().map(|(p, t)| (&p[..], *t)).collect();
        let rows = kvcache_attention::hybrid::gather_rows(&src, ns.layout().token_bytes(), &chosen).unwrap();
        let (want, _) = reference::attention(&shape, &q, &[KvPage { payload: &rows, tokens: 32 }]);
        let e = reference::rel_l2(&res.output_f32(), &want);
        assert!(e <= 1e-5, "over a prefix, step {step}: rel L2 {e:e}");
    }

    // Bad input: the indexer query missing or of the wrong size, a latent without its key.
    let mut wc = kvcache_proto::v1::attention_worker_client::AttentionWorkerClient::new(
        kvcache_client::channel(&cluster.worker).unwrap(),
    );
    let q = rng.vec(shape.q_len(), 1.0);
    let item = || pb::DecodeItem { index_query: b(&iq), index_weights: b(&w), ..pb::DecodeItem::with_query("s", &q) };
    for (it, says) in [
        (pb::DecodeItem { index_query: Bytes::new(), ..item() }, "index_query has 0 bytes, expected 2048"),
        (pb::DecodeItem { index_weights: b(&[1.0; 3]), ..item() }, "index_weights has 12 bytes, expected 16"),
        (
            pb::DecodeItem { new_kv: Bytes::from(tokens_payload(&ns, 1, &mut rng)), ..item() },
            "new_kv and new_index_key go together",
        ),
        (pb::DecodeItem { index_query: b(&vec![f32::NAN; 512]), ..item() }, "must be finite"),
    ] {
        let e = wc
            .decode(pb::DecodeRequest { namespace: "t.dsa".into(), layer: 1, items: vec![it], ..Default::default() })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
        assert!(e.message().contains(says), "{says}: {}", e.message());
    }
    cluster.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hybrid_sequence_seals_into_a_restorable_prefix_and_mamba2_states_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start(LocalClusterConfig::new(dir.path())).await.unwrap();
    let client = Client::connect(&cluster.coordinator).await.unwrap();
    let mut rng = Rng::new(21);
    let ns = namespace(&client, "t.seal").await;
    let seq = SequenceKey::new("t.seal", "s");
    // 100 tokens: the sliding layer (window 40) keeps pages 3..6, the chunked one (32) page 6.
    client.put_pages(prefill_pages(&ns, &seq, 3, 100, &mut rng)).await.unwrap();
    let tokens: Vec<u32> = (0..100).collect();
    assert_eq!(client.seal(&seq, &tokens).await.unwrap(), 6, "six full pages sealed");
    let keys = client.content_keys("t.seal", &tokens).unwrap();
    let m = client.match_prefix("t.seal", &keys, None).await.unwrap();
    // The full layer on every key, the sliding layer's pages 3..5 (the chunked layer had moved
    // to the chunk at 96 and released pages before it): 6 pages are restorable, since the next
    // token (96) reads tokens 57..96 of the window (pages 3..5) and starts a new chunk.
    assert_eq!(m.pages, 6, "{:?}", m.held);
    use kvcache_core::spec::held::{FULL, WINDOW};
    assert_eq!(m.held[0], FULL);
    assert_eq!(m.held[5], FULL | WINDOW);
    // A shorter prefix whose window falls on released pages is not restorable by itself.
    let short = client.match_prefix("t.seal", &keys[..3], None).await.unwrap();
    assert_eq!(short.pages, 0, "{:?}", short.held);

    // Mamba2 (Nemotron-H's geometry): a state put, served back byte for byte, refused at the
    // wrong size, and refused on an MLP-only layer.
    let mut m = ModelSpec::preset("nemotron-h-8b").unwrap();
    m.num_layers = 3;
    m.layers.truncate(3);
    assert_eq!(m.layers, vec![m.layers[0], LayerKind::None, m.layers[0]]);
    let nh = client
        .create_namespace(pb::CreateNamespaceRequest {
            name: "t.mamba".into(),
            model: Some((&m).into()),
            codec: pb::Codec::Bf16 as i32,
            page_tokens: 64,
            replication: 2,
            ..Default::default()
        })
        .await
        .unwrap();
    let size = nh.model.layer(0).state_bytes();
    assert_eq!(size, 128 * 64 * 128 * 4 + (128 * 64 + 2 * 8 * 128) * 3 * 2);
    let st: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
    let s = SequenceKey::new("t.mamba", "m");
    client.put_state(&s, 2, &st).await.unwrap();
    assert_eq!(client.get_state(&s, 2).await.unwrap().unwrap(), st);
    assert_eq!(client.get_state(&s, 0).await.unwrap(), None, "layer 0 was never put");
    assert!(client.put_state(&s, 1, &st).await.unwrap_err().to_string().contains("layer 1 is a none layer"));
    let pages = prefill_pages(&nh, &s, 2, 10, &mut rng);
    let e = client.put_pages(vec![pages[0].clone()]).await.unwrap_err().to_string();
    assert!(e.contains("layer 0: a state page is a full page"), "{e}");
    let e = client.put_pages(vec![pages[1].clone()]).await.unwrap_err().to_string();
    assert!(e.contains("layer 1: an MLP-only layer"), "{e}");
    cluster.stop().await.unwrap();
}
