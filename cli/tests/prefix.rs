//! Prefix reuse on a local cluster: content pages stored once and found by any client, dedup and
//! conflicts, namespaces that never share, a lost node that shortens a match instead of failing
//! it, and the bad input of content keys.

use kvcache_cli::cluster::{LocalCluster, LocalClusterConfig};
use kvcache_cli::synth::{Rng, content_page, content_pages, tokens_payload};
use kvcache_client::{Client, ClientError};
use kvcache_core::{ContentKey, Namespace, PageKey, SequenceKey};
use kvcache_proto::v1 as pb;
use std::time::Duration;

/// A small GQA model (2 layers, 2 KV heads of 64) so pages stay a few KiB.
async fn namespace(client: &Client, name: &str, replication: u32) -> Namespace {
    client
        .create_namespace(pb::CreateNamespaceRequest {
            name: name.into(),
            tenant: "test".into(),
            model: Some(pb::ModelSpec {
                name: "tiny".into(),
                attention: pb::AttentionKind::Gqa as i32,
                num_layers: 2,
                num_q_heads: 4,
                num_kv_heads: 2,
                head_dim: 64,
                ..Default::default()
            }),
            codec: pb::Codec::Bf16 as i32,
            page_tokens: 16,
            replication,
            ..Default::default()
        })
        .await
        .unwrap()
}

async fn start(dir: &std::path::Path) -> (LocalCluster, Client) {
    start_with(dir, 64 << 20).await
}

async fn start_with(dir: &std::path::Path, node_capacity: u64) -> (LocalCluster, Client) {
    let mut cfg = LocalClusterConfig::new(dir);
    cfg.node_capacity = node_capacity;
    let cluster = LocalCluster::start(cfg).await.unwrap();
    let client = Client::connect(&cluster.coordinator).await.unwrap();
    (cluster, client)
}

fn prompt(len: usize, seed: u32) -> Vec<u32> {
    (0..len as u32).map(|i| i.wrapping_mul(2_654_435_761) ^ seed).collect()
}

async fn usage(client: &Client, ns: &str) -> Vec<pb::NamespaceUsage> {
    let mut out = Vec::new();
    for (id, s) in client.node_stats().await {
        let s = s.unwrap_or_else(|e| panic!("stats of {id}: {e}"));
        out.extend(s.namespaces.into_iter().filter(|u| u.namespace == ns));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_pages_are_stored_once_spread_over_the_nodes_and_found_by_any_client() {
    let dir = tempfile::tempdir().unwrap();
    let (cluster, client) = start(dir.path()).await;
    let ns = namespace(&client, "p.share", 1).await;
    let tokens = prompt(24 * 16 + 5, 1);
    let keys = client.content_keys(&ns.name, &tokens).unwrap();
    assert_eq!(keys.len(), 24, "full pages only");

    let m = client.match_prefix(&ns.name, &keys, None).await.unwrap();
    assert_eq!(m.pages, 0);
    let put = client.put_content(&ns.name, content_pages(&ns, &keys[..16])).await.unwrap();
    assert_eq!(put, kvcache_client::ContentPut { written: 32, deduplicated: 0 });

    // Another client (another engine) finds the same prefix where the first one put it.
    let other = Client::connect(&cluster.coordinator).await.unwrap();
    let m = other.match_prefix(&ns.name, &keys, None).await.unwrap();
    assert_eq!(m.pages, 16);
    assert_eq!(m.present.iter().filter(|p| **p).count(), 16);
    let got = other.get_content(&ns.name, &keys[..16], 0..2).await.unwrap();
    for (i, p) in got.iter().enumerate() {
        let want = content_page(&ns, &keys[i / 2], (i % 2) as u32);
        assert_eq!(p.as_ref().expect("present").payload, want.payload, "page {i}");
    }
    let miss = other.get_content(&ns.name, &keys[16..18], 0..2).await.unwrap();
    assert!(miss.iter().all(Option::is_none));

    // Putting the same prefix again writes nothing and says so.
    let again = other.put_content(&ns.name, content_pages(&ns, &keys)).await.unwrap();
    assert_eq!(again, kvcache_client::ContentPut { written: 16, deduplicated: 32 });
    let u = usage(&client, &ns.name).await;
    assert_eq!(u.iter().map(|u| u.content_keys).sum::<u64>(), 24, "each key stored once (R = 1)");
    assert_eq!(u.iter().map(|u| u.dedup_hits).sum::<u64>(), 32);
    assert!(u.iter().filter(|u| u.content_keys > 0).count() >= 2, "a long prefix spreads over the nodes: {u:?}");
    assert_eq!(u.iter().map(|u| u.match_hits).sum::<u64>(), 16);

    // A key with one layer missing does not count: all layers of a page must be there.
    let more = client.content_keys(&ns.name, &prompt(26 * 16, 1)).unwrap();
    client.put_content(&ns.name, vec![content_page(&ns, &more[24], 0)]).await.unwrap();
    let m = client.match_prefix(&ns.name, &more, None).await.unwrap();
    assert_eq!(m.pages, 24);
    assert!(!m.present[24] && !m.present[25]);
    cluster.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_put_with_other_bytes_is_refused_and_never_overwrites() {
    let dir = tempfile::tempdir().unwrap();
    let (cluster, client) = start(dir.path()).await;
    let ns = namespace(&client, "p.conflict", 2).await;
    let keys = client.content_keys(&ns.name, &prompt(4 * 16, 2)).unwrap();
    client.put_content(&ns.name, content_pages(&ns, &keys)).await.unwrap();
    let payload = bytes::Bytes::from(tokens_payload(&ns, 16, &mut Rng::new(99)));
    let bad = kvcache_client::content_page(&ns, &keys[2], 1, payload);
    match client.put_content(&ns.name, vec![bad]).await {
        Err(ClientError::FailedPrecondition(m)) => assert!(m.contains("other bytes"), "{m}"),
        other => panic!("a conflicting put must be FAILED_PRECONDITION, got {other:?}"),
    }
    let got = client.get_content(&ns.name, &keys[2..3], 1..2).await.unwrap();
    assert_eq!(got[0].as_ref().unwrap().payload, content_page(&ns, &keys[2], 1).payload, "the held page stays");
    let u = usage(&client, &ns.name).await;
    assert!(u.iter().map(|u| u.conflicts).sum::<u64>() >= 1, "{u:?}");
    cluster.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespaces_never_share_pages() {
    let dir = tempfile::tempdir().unwrap();
    let (cluster, client) = start(dir.path()).await;
    let a = namespace(&client, "p.tenant-a", 1).await;
    let b = namespace(&client, "p.tenant-b", 1).await;
    let tokens = prompt(8 * 16, 3);
    let ka = client.content_keys(&a.name, &tokens).unwrap();
    let kb = client.content_keys(&b.name, &tokens).unwrap();
    assert!(ka.iter().zip(&kb).all(|(x, y)| x != y), "seeds differ per namespace");
    client.put_content(&a.name, content_pages(&a, &ka)).await.unwrap();
    // Even with a's keys, b finds nothing: a page is (namespace, layer, key).
    assert_eq!(client.match_prefix(&b.name, &ka, None).await.unwrap().pages, 0);
    assert!(client.get_content(&b.name, &ka, 0..2).await.unwrap().iter().all(Option::is_none));
    assert_eq!(client.match_prefix(&a.name, &ka, None).await.unwrap().pages, 8);
    cluster.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_lost_mid_match_shortens_the_prefix_never_fails_it() {
    let dir = tempfile::tempdir().unwrap();
    let (mut cluster, client) = start(dir.path()).await;
    let r2 = namespace(&client, "p.r2", 2).await;
    let r1 = namespace(&client, "p.r1", 1).await;
    let tokens = prompt(30 * 16, 4);
    let k2 = client.content_keys(&r2.name, &tokens).unwrap();
    let k1 = client.content_keys(&r1.name, &tokens).unwrap();
    client.put_content(&r2.name, content_pages(&r2, &k2)).await.unwrap();
    client.put_content(&r1.name, content_pages(&r1, &k1)).await.unwrap();
    // The node is gone, but the map still lists it (its heartbeats have not timed out yet).
    cluster.stop_node(1).await.unwrap();
    assert_eq!(client.routing().live_nodes().len(), 3);
    let m = client.match_prefix(&r2.name, &k2, Some(Duration::from_secs(5))).await.unwrap();
    assert_eq!(m.pages, 30, "every key has a replica");
    let pages = client.get_content(&r2.name, &k2, 0..2).await.unwrap();
    assert!(pages.iter().all(Option::is_some), "pulled from the replicas");
    let m = client.match_prefix(&r1.name, &k1, None).await.unwrap();
    assert!(m.pages < 30, "the lost node's keys are absent");
    let lost = m.present.iter().filter(|p| !**p).count();
    assert!(lost > 0 && lost < 30, "only the lost node's share: {lost}");
    cluster.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_content_keys_and_pages_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (cluster, client) = start(dir.path()).await;
    let ns = namespace(&client, "p.bad", 1).await;
    let key = client.content_keys(&ns.name, &prompt(16, 5)).unwrap()[0];
    let node = client.routing().live_nodes()[0].clone();
    let mut c = kvcache_proto::v1::cache_node_client::CacheNodeClient::connect(format!("http://{}", node.address))
        .await
        .unwrap();
    let code = |r: Result<tonic::Response<pb::MatchPrefixResponse>, tonic::Status>| r.unwrap_err().code();
    let short = pb::MatchPrefixRequest { namespace: ns.name.clone(), keys: vec![vec![0u8; 31].into()], lease_ms: 0 };
    assert_eq!(code(c.match_prefix(short).await), tonic::Code::InvalidArgument);
    let long_lease =
        pb::MatchPrefixRequest { namespace: ns.name.clone(), keys: vec![key.0.to_vec().into()], lease_ms: 700_000 };
    assert_eq!(code(c.match_prefix(long_lease).await), tonic::Code::InvalidArgument);
    let unknown = pb::MatchPrefixRequest { namespace: "p.nope".into(), keys: vec![key.0.to_vec().into()], lease_ms: 0 };
    let s = c.match_prefix(unknown).await.unwrap_err();
    assert!(kvcache_proto::metadata::is_unknown_namespace(&s), "{s:?}");

    // A content page must be one full page at index 0.
    let mut p = content_page(&ns, &key, 0);
    p.key.as_mut().unwrap().page_index = 1;
    let e = client.put_pages(vec![p]).await.unwrap_err();
    assert!(matches!(e, ClientError::InvalidArgument(ref m) if m.contains("content page")), "{e:?}");
    // '#' ids that are not content keys are refused; appends to content keys too.
    let e = client
        .put_pages(
            vec![content_page(&ns, &key, 0)]
                .into_iter()
                .map(|mut p| {
                    p.key.as_mut().unwrap().sequence.as_mut().unwrap().sequence_id = "#not-a-key".into();
                    p
                })
                .collect(),
        )
        .await
        .unwrap_err();
    assert!(matches!(e, ClientError::InvalidArgument(ref m) if m.contains("reserved")), "{e:?}");
    client.put_content(&ns.name, content_pages(&ns, &[key])).await.unwrap();
    // A page carrying its chain record is stored only if its key is that chain's.
    let toks = prompt(32, 5);
    let body = || bytes::Bytes::from(tokens_payload(&ns, 16, &mut Rng::new(3)));
    let (k0, first) = kvcache_client::content_page_chained(&ns, None, &toks[..16], 0, body());
    assert_eq!(k0, key, "the same chain as content_keys");
    let (_, second) = kvcache_client::content_page_chained(&ns, Some(&k0), &toks[16..], 0, body());
    client.put_content(&ns.name, vec![second.clone()]).await.unwrap();
    let mut forged = second;
    forged.token_ids[3] ^= 1;
    let e = client.put_content(&ns.name, vec![forged]).await.unwrap_err();
    assert!(matches!(e, ClientError::InvalidArgument(ref m) if m.contains("does not match")), "{e:?}");
    let mut orphan = first;
    orphan.parent_key = bytes::Bytes::from_static(&[1; 32]);
    let e = client.put_content(&ns.name, vec![orphan]).await.unwrap_err();
    assert!(matches!(e, ClientError::InvalidArgument(_)), "{e:?}");
    let seq = SequenceKey::content(&ns.name, &key);
    let payload = bytes::Bytes::from(tokens_payload(&ns, 1, &mut Rng::new(1)));
    let e = client.append(&seq, Some(0), 1, payload, vec![]).await.unwrap_err();
    assert!(matches!(e, ClientError::InvalidArgument(ref m) if m.contains("immutable")), "{e:?}");
    assert_eq!(ContentKey::from_sequence_id(&seq.sequence_id), Some(key));
    cluster.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trace_replay_hits_what_the_simulation_says_and_tracks_lru_when_evicting() {
    use kvcache_cli::trace;
    let dir = tempfile::tempdir().unwrap();
    // 2 layers × 512-token pages of 1 KV head of 32: 64 KiB payload, a 68 KiB slot per layer.
    let make = |name: &str| pb::CreateNamespaceRequest {
        name: name.into(),
        tenant: "test".into(),
        model: Some(pb::ModelSpec {
            name: "trace-tiny".into(),
            attention: pb::AttentionKind::Mqa as i32,
            num_layers: 2,
            num_q_heads: 2,
            num_kv_heads: 1,
            head_dim: 32,
            ..Default::default()
        }),
        codec: pb::Codec::Bf16 as i32,
        page_tokens: trace::BLOCK_TOKENS,
        replication: 1,
        ..Default::default()
    };
    let reqs = trace::generate(300, 7);
    let opts = trace::ReplayOptions { append_output: true, concurrency: 1 };

    // Room for everything (the outputs too): the replay hits exactly what a cache without
    // eviction would.
    let (big, client) = start_with(&dir.path().join("big"), 1 << 30).await;
    let ns = client.create_namespace(make("trace.big")).await.unwrap();
    let r = trace::replay(&client, &ns, &reqs, &opts).await.unwrap();
    assert_eq!(r.hit_tokens, trace::simulate_lru(&reqs, None), "{r:?}");
    assert!(r.hit_ratio > 0.3 && (r.hit_ratio - r.infinite_hit_ratio).abs() < 1e-12, "{r:?}");
    assert_eq!(r.output_tokens_appended, reqs.iter().map(|q| q.output_length).sum::<u64>());
    big.stop().await.unwrap();

    // 3 nodes of 6 MiB: ~132 blocks for a trace of thousands: eviction all along.
    let mut cfg = LocalClusterConfig::new(dir.path().join("small"));
    cfg.node_capacity = 6 << 20;
    let small = LocalCluster::start(cfg).await.unwrap();
    let client = Client::connect(&small.coordinator).await.unwrap();
    let ns = client.create_namespace(make("trace.small")).await.unwrap();
    let opts = trace::ReplayOptions { append_output: false, concurrency: 1 };
    let r = trace::replay(&client, &ns, &reqs, &opts).await.unwrap();
    assert!(r.capacity_blocks < 200, "{r:?}");
    assert!(r.lru_hit_ratio < r.infinite_hit_ratio, "the capacity must make the simulation evict: {r:?}");
    assert!(r.hit_ratio >= 0.85 * r.lru_hit_ratio, "far below exact LRU at the same capacity: {r:?}");
    small.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequences_over_a_shared_prefix_decode_correctly_and_the_worker_pulls_it_once() {
    use bytes::Bytes;
    use kvcache_attention::AttnShape;
    use kvcache_cli::synth::{Mirror, check_output};
    let dir = tempfile::tempdir().unwrap();
    let (cluster, client) = start(dir.path()).await;
    let ns = namespace(&client, "p.decode", 1).await;
    let shape = AttnShape::new(&ns.model, ns.layout());
    let mut rng = Rng::new(11);
    // A 4-page system prompt, stored once by content.
    let keys = client.content_keys(&ns.name, &prompt(4 * 16, 9)).unwrap();
    client.put_content(&ns.name, content_pages(&ns, &keys)).await.unwrap();
    // Eight requests over it, each with 5 tokens of its own.
    let n = 8;
    let mut mirrors = Vec::new();
    for i in 0..n {
        let seq = SequenceKey::new(&ns.name, format!("req-{i}"));
        client.create_sequence(&seq, &keys, Some(Duration::from_secs(60))).await.unwrap();
        let own = tokens_payload(&ns, 5, &mut rng);
        client.append(&seq, Some(0), 5, Bytes::from(own.clone()), vec![]).await.unwrap();
        let mut m = Mirror { pages: keys.iter().map(|k| (content_page(&ns, k, 0).payload.to_vec(), 16)).collect() };
        m.pages.push((own, 5));
        mirrors.push(m);
    }
    // Creating it again is a no-op; over another prefix, or as a content key, it is refused.
    let s0 = SequenceKey::new(&ns.name, "req-0");
    client.create_sequence(&s0, &keys, None).await.unwrap();
    let e = client.create_sequence(&s0, &keys[..2], None).await.unwrap_err();
    assert!(matches!(e, ClientError::FailedPrecondition(_)), "{e:?}");
    let h = client.lookup(&s0, vec![]).await.unwrap();
    assert_eq!(h.prefix, keys);
    assert_eq!((h.layers[0].tokens, h.layers[0].prefix_pages, h.layers[1].tokens), (69, 4, 64));

    for step in 0..3 {
        let mut items = Vec::new();
        let mut qs = Vec::new();
        for (i, m) in mirrors.iter_mut().enumerate() {
            let q = rng.vec(shape.q_len(), 1.0);
            let tok = tokens_payload(&ns, 1, &mut rng);
            m.append(&ns, &tok);
            items.push(pb::DecodeItem {
                sequence_id: format!("req-{i}"),
                query: kvcache_proto::f32le::to_bytes(&q),
                new_kv: Bytes::from(tok),
                new_token_id: None,
                ..Default::default()
            });
            qs.push(q);
        }
        let r = client
            .decode(pb::DecodeRequest {
                namespace: ns.name.clone(),
                layer: 0,
                items,
                softmax_scale: 0.0,
                ..Default::default()
            })
            .await
            .unwrap();
        for (i, res) in r.results.iter().enumerate() {
            assert_eq!(res.status, kvcache_client::SequenceStatus::Ok, "{}", res.message);
            assert_eq!(res.context_tokens, mirrors[i].tokens());
            let e = check_output(&shape, &qs[i], &mirrors[i].pages, &res.output_f32());
            assert!(e <= 1e-5, "step {step} seq {i}: rel L2 {e:e}");
        }
        if step == 0 {
            // The prompt's 4 pages once for the whole batch, then each request's own page.
            assert_eq!(r.stats.pages_pulled, 4 + n as u64, "{:?}", r.stats);
        } else {
            assert_eq!(r.stats.pages_pulled, 0, "a warm step pulls nothing: {:?}", r.stats);
        }
    }
    cluster.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leased_sequence_keeps_its_prefix_pages_from_eviction() {
    let dir = tempfile::tempdir().unwrap();
    // One node of 2 MiB: 8 KiB pages in 12 KiB slots, ~170 slots, ~85 keys of 2 layers.
    let mut cfg = LocalClusterConfig::new(dir.path());
    cfg.nodes = 1;
    cfg.node_capacity = 2 << 20;
    let cluster = LocalCluster::start(cfg).await.unwrap();
    let client = Client::connect(&cluster.coordinator).await.unwrap();
    let ns = namespace(&client, "p.lease", 1).await;
    let keys = client.content_keys(&ns.name, &prompt(4 * 16, 21)).unwrap();
    client.put_content(&ns.name, content_pages(&ns, &keys)).await.unwrap();
    let seq = SequenceKey::new(&ns.name, "leased");
    client.create_sequence(&seq, &keys, None).await.unwrap();
    client.lease(&seq, Duration::from_secs(60)).await.unwrap();
    // Far more new pages than the node holds: everything unpinned is evicted.
    for round in 0..4u32 {
        let other = client.content_keys(&ns.name, &prompt(64 * 16, 100 + round)).unwrap();
        client.put_content(&ns.name, content_pages(&ns, &other)).await.unwrap();
    }
    let evicted: u64 = usage(&client, &ns.name).await.iter().map(|u| u.evictions).sum();
    assert!(evicted > 100, "the node must have evicted: {evicted}");
    assert_eq!(client.match_prefix(&ns.name, &keys, None).await.unwrap().pages, 4, "the leased prefix was evicted");
    cluster.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sealed_turn_is_found_by_the_next_request_and_reads_the_same() {
    use bytes::Bytes;
    let dir = tempfile::tempdir().unwrap();
    let (cluster, client) = start(dir.path()).await;
    let ns = namespace(&client, "p.seal", 1).await;
    let mut rng = Rng::new(17);
    // A conversation: a 2-page system prompt by key, then 40 tokens of its own (the user's turn
    // and the answer), appended with all layers.
    let system = prompt(2 * 16, 30);
    let keys = client.content_keys(&ns.name, &system).unwrap();
    client.put_content(&ns.name, content_pages(&ns, &keys)).await.unwrap();
    let seq = SequenceKey::new(&ns.name, "conv");
    client.create_sequence(&seq, &keys, None).await.unwrap();
    let turn = prompt(40, 31);
    let own: Vec<Vec<u8>> = (0..2).map(|_| tokens_payload(&ns, 40, &mut rng)).collect();
    client.append(&seq, None, 40, Bytes::from(own.concat()), vec![]).await.unwrap();
    let before: Vec<_> = (0..2).map(|l| PageKey { sequence: seq.clone(), layer: l, page_index: 4 }).collect();
    let open = client.get_pages(&before).await.unwrap();

    // A page not full on every layer is refused: create over a longer prefix without seal.
    let e = client
        .create_sequence(&seq, &client.content_keys(&ns.name, &[system.clone(), turn.clone()].concat()).unwrap(), None)
        .await
        .unwrap_err();
    assert!(matches!(e, ClientError::FailedPrecondition(_)), "{e:?}");

    // Sealing turns the two full pages of the turn into content pages; the partial third stays.
    assert_eq!(client.seal(&seq, &turn).await.unwrap(), 2);
    let h = client.lookup(&seq, vec![]).await.unwrap();
    let next = client.content_keys(&ns.name, &[system.clone(), turn.clone()].concat()).unwrap();
    assert_eq!(h.prefix, next[..4].to_vec(), "the prefix now covers the sealed pages");
    assert_eq!(h.layers.iter().map(|l| l.tokens).collect::<Vec<_>>(), [72, 72], "no token moved");
    let after = client.get_pages(&before).await.unwrap();
    let bytes = |v: &[Option<kvcache_client::FetchedPage>]| {
        v.iter().map(|p| p.as_ref().map(|p| p.payload.clone())).collect::<Vec<_>>()
    };
    assert!(bytes(&after) == bytes(&open) && after.iter().all(Option::is_some), "the open page is untouched");
    // The next turn's prompt (the whole history) matches 4 pages, and their bytes are the turn's.
    let m = client.match_prefix(&ns.name, &next, None).await.unwrap();
    assert_eq!(m.pages, 4);
    let sealed = client.get_content(&ns.name, &next[2..4], 0..2).await.unwrap();
    let l = ns.layout();
    for (i, p) in sealed.iter().enumerate() {
        let (page, layer) = (i / 2, i % 2);
        let mut want = vec![0u8; l.payload_bytes(16)];
        l.slice_tokens(&own[layer], 40, page * 16, 16, &mut want);
        assert_eq!(p.as_ref().unwrap().payload[..], want[..], "sealed page {page} layer {layer}");
    }
    // Sealing again finds nothing new to seal.
    assert_eq!(client.seal(&seq, &turn[32..]).await.unwrap(), 0);
    cluster.stop().await.unwrap();
}
