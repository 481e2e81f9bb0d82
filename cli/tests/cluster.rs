//! A local cluster in one process: namespaces, prefill, decode steps through the worker checked
//! against the float64 reference, O(1) bytes per warm step, misses and bad input.

use bytes::Bytes;
use kvcache_attention::AttnShape;
use kvcache_cli::cluster::{LocalCluster, LocalClusterConfig};
use kvcache_cli::synth::{Mirror, Rng, check_output, prefill_pages, tokens_payload};
use kvcache_client::{AppendItem, Client};
use kvcache_core::{Namespace, SequenceKey};
use kvcache_proto::v1 as pb;
use tonic::Code;

async fn namespace(client: &Client, name: &str, preset: &str, codec: pb::Codec) -> Namespace {
    client
        .create_namespace(pb::CreateNamespaceRequest {
            name: name.into(),
            tenant: "test".into(),
            preset: preset.into(),
            codec: codec as i32,
            page_tokens: 16,
            replication: 2,
            ..Default::default()
        })
        .await
        .unwrap()
}

/// A local cluster with nodes of `capacity` bytes, a client, and an R = 2 namespace `name`
/// (page of 16 tokens) holding sequence "a" prefilled with 40 tokens of layer 0.
async fn cluster_with_a(
    dir: &std::path::Path,
    capacity: u64,
    name: &str,
    rng: &mut Rng,
) -> (LocalCluster, Client, Namespace) {
    let mut cfg = LocalClusterConfig::new(dir);
    cfg.node_capacity = capacity;
    let cluster = LocalCluster::start(cfg).await.unwrap();
    let client = Client::connect(&cluster.coordinator).await.unwrap();
    let ns = namespace(&client, name, "qwen2.5-7b", pb::Codec::Bf16).await;
    client.put_pages(prefill_pages(&ns, &SequenceKey::new(name, "a"), 1, 40, rng)).await.unwrap();
    (cluster, client, ns)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decode_through_the_worker_matches_the_reference_and_warm_steps_pull_o1_bytes() {
    decode_steps(None, false).await;
}

/// The same as `bench decode` runs it: the coordinator and the nodes as processes of the
/// `kvcache` binary (the worker in this one), and the worker's cache in its prefaulted arena
/// (every warm step's grown pages built there); stopping the cluster ends the processes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_of_processes_decodes_the_same_and_stops_its_processes() {
    decode_steps(None, true).await;
}

/// The same on a GPU worker: its pages in HBM, a warm step's token written into the device page
/// in place, computed while the append is in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs an NVIDIA GPU and driver: run with --include-ignored on a GPU machine"]
async fn decode_through_a_gpu_worker_matches_the_reference() {
    let gpu = kvcache_cli::cluster::open_device("cuda:0").expect("a GPU (this test is for GPU machines)");
    decode_steps(gpu, false).await;
}

async fn decode_steps(device: Option<std::sync::Arc<kvcache_attention::gpu::Gpu>>, processes: bool) {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = LocalClusterConfig::new(dir.path());
    cfg.node_capacity = 256 << 20;
    if processes {
        cfg.processes = Some(env!("CARGO_BIN_EXE_kvcache").into());
        cfg.worker_cache_prefault = true;
        cfg.worker_cache_bytes = 64 << 20;
    }
    let on_gpu = device.is_some();
    cfg.worker_device = device;
    let cluster = LocalCluster::start(cfg).await.unwrap();
    let client = Client::connect(&cluster.coordinator).await.unwrap();
    let mut rng = Rng::new(7);
    for (name, preset, codec) in
        [("t.gqa", "llama-3-8b", pb::Codec::Bf16), ("t.mla", "deepseek-v3", pb::Codec::Fp8E4m3)]
    {
        let ns = namespace(&client, name, preset, codec).await;
        let shape = AttnShape::new(&ns.model, ns.layout());
        let seqs: Vec<SequenceKey> = (0..2).map(|i| SequenceKey::new(name, format!("s{i}"))).collect();
        let mut mirrors = Vec::new();
        for (i, s) in seqs.iter().enumerate() {
            // Sequence 1 crosses a page boundary (64 tokens) at step 4.
            let pages = prefill_pages(&ns, s, 2, 37 + 22 * i, &mut rng);
            client.put_pages(pages.clone()).await.unwrap();
            mirrors.push([Mirror::from_wire(&pages, 0), Mirror::from_wire(&pages, 1)]);
        }
        let page_bytes = ns.layout().payload_bytes(16) as u64;
        for step in 0..6 {
            // Odd steps carry queries and outputs as bf16: the reference attends with the query
            // the worker received (rounded), and the output is rounded once (≤ 2^-9 relative).
            let dtype = if step % 2 == 1 { pb::VectorDtype::Bf16 } else { pb::VectorDtype::F32 };
            // On a GPU, MLA runs on tensor cores (P rounded to bf16: within 2e-3 for bf16
            // queries, 1e-2 for f32 ones, which it rounds); a bf16 output adds its own rounding
            // (2^-9): the two bounds add.
            let tol = match (dtype, on_gpu && ns.model.kv_lora_rank > 0) {
                (pb::VectorDtype::Bf16, false) => 2e-3,
                (pb::VectorDtype::Bf16, true) => 4e-3,
                (pb::VectorDtype::F32, true) => 1e-2,
                (pb::VectorDtype::F32, false) => 1e-5,
            };
            for layer in 0..2u32 {
                let mut items = Vec::new();
                let mut qs = Vec::new();
                for (i, s) in seqs.iter().enumerate() {
                    let query = dtype.encode(&rng.vec(shape.q_len(), 1.0));
                    let tok = tokens_payload(&ns, 1, &mut rng);
                    mirrors[i][layer as usize].append(&ns, &tok);
                    qs.push(dtype.decode(&query).unwrap());
                    items.push(pb::DecodeItem {
                        sequence_id: s.sequence_id.clone(),
                        query,
                        new_kv: Bytes::from(tok),
                        new_token_id: None,
                        ..Default::default()
                    });
                }
                let r = client
                    .decode(pb::DecodeRequest {
                        namespace: name.into(),
                        layer,
                        items,
                        softmax_scale: 0.0,
                        vector_dtype: dtype as i32,
                        ..Default::default()
                    })
                    .await
                    .unwrap();
                for (i, res) in r.results.iter().enumerate() {
                    assert_eq!(res.status, kvcache_client::SequenceStatus::Ok, "{}", res.message);
                    assert_eq!(res.output.len(), shape.out_len() * dtype.width());
                    let m = &mirrors[i][layer as usize];
                    assert_eq!(res.context_tokens, m.tokens());
                    let e = check_output(&shape, &qs[i], &m.pages, &res.output_f32());
                    assert!(e <= tol, "{name} step {step} layer {layer} seq {i} {dtype:?}: rel L2 {e:e}");
                }
                let stats = r.stats;
                // Every item appended a token: the write-through is timed. The first step of
                // layer 0 reads the layer (after the append; layer 1 may have been prefetched
                // meanwhile); every later step computes on the cached layer plus the token
                // while the append is in flight, and the owners confirm it.
                assert!(stats.append_micros > 0, "{stats:?}");
                assert_eq!(stats.sequences_recomputed, 0, "{stats:?}");
                if step == 0 && layer == 0 {
                    assert!(stats.append_micros <= stats.fetch_micros, "{stats:?}");
                    assert_eq!(stats.sequences_overlapped, 0, "{stats:?}");
                } else if step > 0 {
                    assert_eq!(stats.sequences_overlapped, r.results.len() as u64, "{stats:?}");
                }
                if step > 0 {
                    assert!(
                        stats.bytes_pulled <= 2 * page_bytes,
                        "{name} warm step pulled {} bytes",
                        stats.bytes_pulled
                    );
                }
            }
        }
    }
    let addrs: Vec<String> = cluster.nodes.iter().chain([&cluster.coordinator]).cloned().collect();
    cluster.stop().await.unwrap();
    for a in addrs {
        assert!(std::net::TcpStream::connect(&a).is_err(), "{a} still accepts connections after the stop");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_sequences_are_misses_and_bad_input_is_invalid_argument() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng::new(3);
    let (cluster, client, ns) = cluster_with_a(dir.path(), 128 << 20, "t.bad", &mut rng).await;
    let shape = AttnShape::new(&ns.model, ns.layout());
    let item = |id: &str, q: Vec<f32>| pb::DecodeItem {
        sequence_id: id.into(),
        query: kvcache_proto::f32le::to_bytes(&q),
        new_kv: Bytes::new(),
        new_token_id: None,
        ..Default::default()
    };
    let good_q = rng.vec(shape.q_len(), 1.0);
    let r = client
        .decode(pb::DecodeRequest {
            namespace: "t.bad".into(),
            layer: 0,
            items: vec![item("a", good_q.clone()), item("gone", good_q.clone())],
            softmax_scale: 0.0,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(r.results[0].status, kvcache_client::SequenceStatus::Ok);
    assert_eq!(r.results[1].status, kvcache_client::SequenceStatus::Miss);
    assert_eq!(r.results[0].output_f32().len(), shape.out_len());
    assert!(r.results[1].output.is_empty());

    let mut w = kvcache_proto::v1::attention_worker_client::AttentionWorkerClient::new(
        kvcache_client::channel(&cluster.worker).unwrap(),
    );
    let cases = [
        (
            pb::DecodeRequest {
                namespace: "t.bad".into(),
                layer: 0,
                items: vec![item("a", good_q[1..].to_vec())],
                softmax_scale: 0.0,
                ..Default::default()
            },
            "query has",
        ),
        (
            pb::DecodeRequest {
                namespace: "t.bad".into(),
                layer: 0,
                // A byte count that is no number of f32 values at all.
                items: vec![pb::DecodeItem {
                    query: kvcache_proto::f32le::to_bytes(&good_q).slice(1..),
                    ..item("a", good_q.clone())
                }],
                softmax_scale: 0.0,
                ..Default::default()
            },
            "query has",
        ),
        (
            pb::DecodeRequest {
                namespace: "nope".into(),
                layer: 0,
                items: vec![item("a", good_q.clone())],
                softmax_scale: 0.0,
                ..Default::default()
            },
            "unknown namespace",
        ),
        (
            pb::DecodeRequest {
                namespace: "t.bad".into(),
                layer: 28,
                items: vec![item("a", good_q.clone())],
                softmax_scale: 0.0,
                ..Default::default()
            },
            "layer 28 out of range: model has 28 layers",
        ),
        (
            pb::DecodeRequest {
                namespace: "t.bad".into(),
                layer: 0,
                items: vec![pb::DecodeItem { new_kv: Bytes::from(vec![0u8; 7]), ..item("a", good_q.clone()) }],
                softmax_scale: 0.0,
                ..Default::default()
            },
            "new_kv is 7 bytes",
        ),
    ];
    for (req, want) in cases {
        let e = w.decode(req).await.unwrap_err();
        let code = if want == "unknown namespace" { Code::NotFound } else { Code::InvalidArgument };
        assert_eq!(e.code(), code, "{want}: {}", e.message());
        assert!(e.message().contains(want), "{} !~ {want}", e.message());
    }
    cluster.stop().await.unwrap();
}

/// Every field of a Decode request malformed one at a time, each answered with its own status
/// and a message naming what was wrong; none of them leaves a token appended (a refused call can
/// be retried as is). Then cached pages holding NaN or infinity: that sequence's own BAD_DATA
/// status while the rest of the batch is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_malformed_decode_field_is_refused_before_anything_is_written_and_bad_cached_data_is_per_sequence() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng::new(11);
    let (cluster, client, ns) = cluster_with_a(dir.path(), 128 << 20, "t.edge", &mut rng).await;
    let shape = AttnShape::new(&ns.model, ns.layout());
    let good_q = rng.vec(shape.q_len(), 1.0);
    let tok = Bytes::from(tokens_payload(&ns, 1, &mut rng));
    let item = |id: &str, q: &[f32]| pb::DecodeItem {
        sequence_id: id.into(),
        query: kvcache_proto::f32le::to_bytes(q),
        new_kv: tok.clone(),
        new_token_id: None,
        ..Default::default()
    };
    let req = |items: Vec<pb::DecodeItem>| pb::DecodeRequest {
        namespace: "t.edge".into(),
        layer: 0,
        items,
        softmax_scale: 0.0,
        ..Default::default()
    };
    let with_q = |j: usize, v: f32| {
        let mut q = good_q.clone();
        q[j] = v;
        q
    };
    let bf16_nan =
        Bytes::from(tok.iter().enumerate().map(|(i, b)| if i < 2 { [0xc0, 0x7f][i] } else { *b }).collect::<Vec<u8>>());
    let bf16_inf =
        Bytes::from(tok.iter().enumerate().map(|(i, b)| if i < 2 { [0x80, 0xff][i] } else { *b }).collect::<Vec<u8>>());
    let cases: Vec<(pb::DecodeRequest, Code, &str)> = vec![
        (
            req(vec![item("a", &with_q(5, f32::NAN))]),
            Code::InvalidArgument,
            "item 0 (sequence \"a\"): query value 5 is NaN",
        ),
        (req(vec![item("a", &with_q(0, f32::INFINITY))]), Code::InvalidArgument, "query value 0 is inf"),
        (req(vec![item("a", &with_q(7, f32::NEG_INFINITY))]), Code::InvalidArgument, "query value 7 is -inf"),
        // The first item is fine: the second's NaN must still stop the first's append.
        (
            req(vec![item("a", &good_q), item("b", &with_q(1, f32::NAN))]),
            Code::InvalidArgument,
            "item 1 (sequence \"b\"): query value 1 is NaN",
        ),
        (
            req(vec![pb::DecodeItem { new_kv: bf16_nan, ..item("a", &good_q) }]),
            Code::InvalidArgument,
            "new_kv value 0 is not finite",
        ),
        (
            req(vec![pb::DecodeItem { new_kv: bf16_inf, ..item("a", &good_q) }]),
            Code::InvalidArgument,
            "new_kv value 0 is not finite",
        ),
        (
            req(vec![pb::DecodeItem { new_kv: tok.slice(1..), ..item("a", &good_q) }]),
            Code::InvalidArgument,
            "new_kv is",
        ),
        (req(vec![item("", &good_q)]), Code::InvalidArgument, "item 0"),
        (req(vec![item("a", &good_q), item("a", &good_q)]), Code::InvalidArgument, "appears twice"),
        (req(vec![item("a", &good_q[1..])]), Code::InvalidArgument, "query has"),
        // bf16 vectors: an f32-sized query, a NaN, an encoding nobody defined.
        (
            pb::DecodeRequest { vector_dtype: pb::VectorDtype::Bf16 as i32, ..req(vec![item("a", &good_q)]) },
            Code::InvalidArgument,
            "that is the size of a f32 query: is vector_dtype set?",
        ),
        (
            pb::DecodeRequest {
                vector_dtype: pb::VectorDtype::Bf16 as i32,
                ..req(vec![pb::DecodeItem {
                    query: kvcache_proto::bf16le::to_bytes(&with_q(3, f32::NAN)),
                    ..item("a", &good_q)
                }])
            },
            Code::InvalidArgument,
            "query value 3 is NaN",
        ),
        (
            pb::DecodeRequest { vector_dtype: 7, ..req(vec![item("a", &good_q)]) },
            Code::InvalidArgument,
            "vector_dtype 7 is not a known encoding",
        ),
        (req(vec![item("a", &[])]), Code::InvalidArgument, "query has 0 bytes"),
        (
            pb::DecodeRequest { softmax_scale: f32::NAN, ..req(vec![item("a", &good_q)]) },
            Code::InvalidArgument,
            "softmax_scale NaN",
        ),
        (
            pb::DecodeRequest { softmax_scale: -1.0, ..req(vec![item("a", &good_q)]) },
            Code::InvalidArgument,
            "softmax_scale -1",
        ),
        (
            pb::DecodeRequest { layer: 28, ..req(vec![item("a", &good_q)]) },
            Code::InvalidArgument,
            "layer 28 out of range",
        ),
        (
            pb::DecodeRequest { namespace: "nope".into(), ..req(vec![item("a", &good_q)]) },
            Code::NotFound,
            "unknown namespace \"nope\"",
        ),
        (
            pb::DecodeRequest { namespace: String::new(), ..req(vec![item("a", &good_q)]) },
            Code::NotFound,
            "unknown namespace",
        ),
        // Over the 256 MiB message limit: gRPC's RESOURCE_EXHAUSTED, not tonic's OUT_OF_RANGE.
        (
            req(vec![pb::DecodeItem { query: Bytes::from(vec![0u8; 257 << 20]), ..item("a", &good_q) }]),
            Code::ResourceExhausted,
            "too large",
        ),
    ];
    let mut w = kvcache_proto::v1::attention_worker_client::AttentionWorkerClient::new(
        kvcache_client::channel(&cluster.worker).unwrap(),
    );
    for (r, code, want) in cases {
        let e = w.decode(r).await.unwrap_err();
        assert_eq!(e.code(), code, "{want}: {}", e.message());
        assert!(e.message().contains(want), "{:?} !~ {want:?}", e.message());
    }
    // Nothing was appended by any refused call: the context is still the prefill's 40 tokens.
    let probe = pb::DecodeItem { new_kv: Bytes::new(), ..item("a", &good_q) };
    let r = client.decode(req(vec![probe.clone()])).await.unwrap();
    assert_eq!(r.results[0].status, kvcache_client::SequenceStatus::Ok, "{}", r.results[0].message);
    assert_eq!(r.results[0].context_tokens, 40);

    // Cached pages holding NaN (every value of one page) and +∞ (one value): BAD_DATA for those
    // sequences alone.
    let poison = |id: &str, value: [u8; 2], every: bool, rng: &mut Rng| {
        let mut pages = prefill_pages(&ns, &SequenceKey::new("t.edge", id), 1, 40, rng);
        let p = &mut pages[1];
        let mut payload = p.payload.to_vec();
        for (k, v) in payload.chunks_exact_mut(2).enumerate() {
            if every || k == 3 {
                v.copy_from_slice(&value);
            }
        }
        p.payload = Bytes::from(payload);
        p.payload_crc32c = kvcache_core::checksum::crc32c(&p.payload);
        pages
    };
    client.put_pages(poison("nan", [0xc0, 0x7f], true, &mut rng)).await.unwrap();
    client.put_pages(poison("inf", [0x80, 0x7f], false, &mut rng)).await.unwrap();
    let items = ["nan", "a", "inf"].map(|id| pb::DecodeItem { sequence_id: id.into(), ..probe.clone() }).to_vec();
    let r = client.decode(req(items)).await.unwrap();
    let statuses: Vec<kvcache_client::SequenceStatus> = r.results.iter().map(|r| r.status).collect();
    let (bad, ok) = (kvcache_client::SequenceStatus::BadData, kvcache_client::SequenceStatus::Ok);
    assert_eq!(statuses, vec![bad, ok, bad], "{:?}", r.results.iter().map(|r| &r.message).collect::<Vec<_>>());
    assert!(r.results[0].message.contains("NaN or infinite"), "{}", r.results[0].message);
    assert!(r.results[0].output.is_empty() && r.results[2].output.is_empty());
    assert_eq!(r.results[1].output_f32().len(), shape.out_len());
    assert_eq!(r.results[1].context_tokens, 40);
    cluster.stop().await.unwrap();
}

/// A local cluster, a client that never updates its map on its own (`watch: false`), an R = 2
/// namespace created through it, and a second, ordinary client.
async fn cluster_with_a_stale_client(dir: &std::path::Path, ns: &str) -> (LocalCluster, Client, Namespace, Client) {
    let mut cfg = LocalClusterConfig::new(dir);
    cfg.node_capacity = 64 << 20;
    let cluster = LocalCluster::start(cfg).await.unwrap();
    let cc = kvcache_client::ClientConfig { watch: false, ..Default::default() };
    let stale = Client::connect_with(&cluster.coordinator, cc).await.unwrap();
    let ns = namespace(&stale, ns, "qwen2.5-7b", pb::Codec::Bf16).await;
    let other = Client::connect(&cluster.coordinator).await.unwrap();
    (cluster, stale, ns, other)
}

/// Change the map through `other` (a worker registers) and wait until every node has heard of
/// it; `stale` keeps the epoch it had, which is returned.
async fn move_every_node_past(stale: &Client, other: &Client, worker_id: &str) -> u64 {
    let e0 = stale.routing().epoch;
    other
        .coordinator()
        .register_worker(pb::RegisterWorkerRequest { worker_id: worker_id.into(), address: "127.0.0.1:9".into() })
        .await
        .unwrap();
    for _ in 0..200 {
        let stats = other.node_stats().await;
        if stats.iter().all(|(_, s)| s.as_ref().is_ok_and(|s| s.epoch > e0)) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    e0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_epoch_write_is_refused_and_the_client_recovers_transparently() {
    let dir = tempfile::tempdir().unwrap();
    let (cluster, stale, ns, other) = cluster_with_a_stale_client(dir.path(), "t.epoch").await;
    // Another party changes the map; the nodes learn the new epoch from their heartbeats.
    let e0 = move_every_node_past(&stale, &other, "w-x").await;
    let mut rng = Rng::new(5);
    let key = SequenceKey::new("t.epoch", "a");
    let pages = prefill_pages(&ns, &key, 1, 20, &mut rng);
    // Written with the old epoch straight to an owner: refused, with the node's epoch attached.
    let owner = stale.routing().owners(&key, 1)[0].clone();
    let mut raw =
        kvcache_proto::v1::cache_node_client::CacheNodeClient::new(kvcache_client::channel(&owner.address).unwrap());
    let err = raw
        .put_pages(tokio_stream::iter(vec![pb::PutPagesRequest { epoch: e0, pages: pages.clone(), handoff: false }]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.metadata().get(kvcache_proto::metadata::EPOCH).is_some());
    // Through the client: refreshed and retried, the caller sees success.
    stale.put_pages(pages).await.unwrap();
    assert!(stale.routing().epoch > e0);
    assert_eq!(
        stale.get_pages(&[kvcache_core::PageKey { sequence: key, layer: 0, page_index: 1 }]).await.unwrap()[0]
            .as_ref()
            .unwrap()
            .token_count,
        4
    );
    cluster.stop().await.unwrap();
}

/// A batch of appends through a client whose map is stale at every node: each good append lands
/// once at each of its owners, each bad one gets its own error, and one does not stop another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_appends_is_answered_per_append_and_applied_once_per_owner() {
    let dir = tempfile::tempdir().unwrap();
    let (cluster, stale, ns, other) = cluster_with_a_stale_client(dir.path(), "t.many").await;
    let mut rng = Rng::new(11);
    let keys: Vec<SequenceKey> = (0..6).map(|i| SequenceKey::new("t.many", format!("s{i}"))).collect();
    for k in &keys {
        stale.put_pages(prefill_pages(&ns, k, 1, 10, &mut rng)).await.unwrap();
    }
    let e0 = move_every_node_past(&stale, &other, "w-many").await;
    let item = |k: &SequenceKey, payload: Vec<u8>| AppendItem {
        sequence: k.clone(),
        layer: Some(0),
        tokens: 1,
        payload: Bytes::from(payload),
        token_ids: vec![],
        return_extent: true,
    };
    let mut items: Vec<AppendItem> = keys.iter().map(|k| item(k, tokens_payload(&ns, 1, &mut rng))).collect();
    items.insert(2, item(&SequenceKey::new("nope", "x"), tokens_payload(&ns, 1, &mut rng)));
    items.insert(4, item(&keys[0], vec![0u8; 7]));
    let got = stale.append_many(items).await;
    assert_eq!(got.len(), 8);
    assert!(matches!(&got[2], Err(kvcache_client::ClientError::NotFound(m)) if m.contains("nope")), "{:?}", got[2]);
    let bad = got[4].as_ref().unwrap_err().to_string();
    assert!(bad.contains("payload is 7 bytes"), "{bad}");
    for (r, k) in got.iter().enumerate().filter(|(i, _)| *i != 2 && *i != 4).map(|(_, r)| r).zip(&keys) {
        let acks = r.as_ref().unwrap();
        assert_eq!(acks.len(), 2, "both owners of {}", k.sequence_id);
        for a in acks {
            assert_eq!(a.layer_tokens, [11]);
            assert_eq!(a.extent.as_ref().unwrap().tokens, 11);
        }
        for o in stale.routing().owners(k, 2) {
            assert_eq!(
                stale.lookup_on(&o, k, vec![], Some(0)).await.unwrap().layers[0].tokens,
                11,
                "{} on {}",
                k.sequence_id,
                o.node_id
            );
        }
    }
    assert!(stale.routing().epoch > e0, "the stale refusals refreshed the map");
    cluster.stop().await.unwrap();
}

/// Nodes learn a new epoch at their own heartbeats, so with R = 2 one owner can refuse a write
/// as stale while the other applies it. The client's retry must then go to the refusing owner
/// only: an append applied twice would add a token there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_refused_by_one_owner_as_stale_is_not_applied_twice_at_the_other() {
    let dir = tempfile::tempdir().unwrap();
    let (cluster, stale, ns, other) = cluster_with_a_stale_client(dir.path(), "t.partial").await;
    let key = SequenceKey::new("t.partial", "a");
    let mut rng = Rng::new(9);
    stale.put_pages(prefill_pages(&ns, &key, 1, 20, &mut rng)).await.unwrap();
    let owners = stale.routing().owners(&key, 2);
    let epoch_of = |stats: &[(String, Result<pb::NodeStats, kvcache_client::ClientError>)], id: &str| {
        stats.iter().find(|(n, _)| n == id).and_then(|(_, s)| s.as_ref().ok()).map_or(0, |s| s.epoch)
    };
    let tokens_on = |c: &Client, o: &kvcache_client::NodeRef| {
        let (c, o, key) = (c.clone(), o.clone(), key.clone());
        async move { c.lookup_on(&o, &key, vec![], Some(0)).await.unwrap().layers[0].tokens }
    };
    let mut expected = 20;
    let mut caught = false;
    for i in 0..40 {
        stale.refresh().await.unwrap();
        let e0 = stale.routing().epoch;
        // Bump the epoch, then wait until exactly one owner has heard of it.
        other
            .coordinator()
            .register_worker(pb::RegisterWorkerRequest { worker_id: format!("w-{i}"), address: "127.0.0.1:9".into() })
            .await
            .unwrap();
        let mut split = false;
        for _ in 0..400 {
            let stats = other.node_stats().await;
            let ahead = owners.iter().filter(|o| epoch_of(&stats, &o.node_id) > e0).count();
            if ahead == 1 {
                split = true;
                break;
            }
            if ahead == 2 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        // Through the stale client either way: refused by one or both, retried, acknowledged.
        // Alternately one append and a batch of one (AppendBatch, retried through the same path).
        let tok = Bytes::from(tokens_payload(&ns, 1, &mut rng));
        let acks = if i % 2 == 0 {
            stale.append(&key, Some(0), 1, tok, vec![]).await.unwrap()
        } else {
            let item = AppendItem {
                sequence: key.clone(),
                layer: Some(0),
                tokens: 1,
                payload: tok,
                token_ids: vec![],
                return_extent: false,
            };
            stale.append_many(vec![item]).await.remove(0).unwrap()
        };
        expected += 1;
        assert_eq!(acks.len(), 2);
        for o in &owners {
            assert_eq!(tokens_on(&stale, o).await, expected, "owner {} after append {i}", o.node_id);
        }
        caught |= split;
        if caught && i >= 2 {
            break;
        }
    }
    assert!(caught, "never saw one owner ahead of the other (heartbeats every 500 ms)");
    cluster.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_rewritten_between_steps_is_read_again_not_served_from_the_workers_cache() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = LocalClusterConfig::new(dir.path());
    cfg.node_capacity = 128 << 20;
    let cluster = LocalCluster::start(cfg).await.unwrap();
    let client = Client::connect(&cluster.coordinator).await.unwrap();
    let ns = namespace(&client, "t.rw", "llama-3-8b", pb::Codec::Bf16).await;
    let shape = AttnShape::new(&ns.model, ns.layout());
    let mut rng = Rng::new(11);
    let seq = SequenceKey::new("t.rw", "a");
    let pages = prefill_pages(&ns, &seq, 1, 40, &mut rng);
    client.put_pages(pages.clone()).await.unwrap();
    let mut mirror = Mirror::from_wire(&pages, 0);
    for step in 0..4 {
        if step == 2 {
            // Another writer replaces page 0 (same token count, new bytes) between two steps.
            let fresh = tokens_payload(&ns, 16, &mut rng);
            let key = kvcache_core::PageKey { sequence: seq.clone(), layer: 0, page_index: 0 };
            client
                .put_pages(vec![kvcache_client::wire_page(&ns, &key, 16, 0, Bytes::from(fresh.clone()))])
                .await
                .unwrap();
            mirror.pages[0].0 = fresh;
        }
        let q = rng.vec(shape.q_len(), 1.0);
        let tok = tokens_payload(&ns, 1, &mut rng);
        mirror.append(&ns, &tok);
        let r = client
            .decode(pb::DecodeRequest {
                namespace: "t.rw".into(),
                layer: 0,
                items: vec![pb::DecodeItem { new_kv: Bytes::from(tok), ..pb::DecodeItem::with_query("a", &q) }],
                softmax_scale: 0.0,
                ..Default::default()
            })
            .await
            .unwrap();
        let res = &r.results[0];
        assert_eq!(res.status, kvcache_client::SequenceStatus::Ok, "{}", res.message);
        let e = check_output(&shape, &q, &mirror.pages, &res.output_f32());
        assert!(e <= 1e-5, "step {step}: rel L2 {e:e}");
        let pulled = r.stats.pages_pulled;
        match step {
            0 => assert!(pulled >= 3, "cold step pulled {pulled} pages"),
            2 => assert_eq!(pulled, 1, "the rewritten page is pulled again, only it"),
            _ => assert_eq!(pulled, 0, "step {step}: the append kept the cache current"),
        }
        // Steps 1 and 3 compute while the append is in flight and are confirmed; step 2's
        // owner answers with page 0's new version, so its speculation is dropped and redone.
        let (overlapped, recomputed) = (r.stats.sequences_overlapped, r.stats.sequences_recomputed);
        match step {
            0 => assert_eq!((overlapped, recomputed), (0, 0)),
            2 => assert_eq!((overlapped, recomputed), (0, 1)),
            _ => assert_eq!((overlapped, recomputed), (1, 0), "step {step}"),
        }
    }
    // The cold pull (step 0) ran under a lease and released it; the one-page pull did not take
    // one. Releases are sent in the background: wait for them, bounded.
    let mut last = (0, 0);
    for _ in 0..100 {
        let stats: Vec<pb::NodeStats> = client.node_stats().await.into_iter().map(|(_, s)| s.unwrap()).collect();
        last =
            (stats.iter().map(|s| s.leases_granted).sum::<u64>(), stats.iter().map(|s| s.active_leases).sum::<u64>());
        if last.1 == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(last, (1, 0), "(leases granted, still active)");
    cluster.stop().await.unwrap();
}
