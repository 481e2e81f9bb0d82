//! The CacheNode gRPC service on a loopback port: round trips, per-item statuses, bad input,
//! epoch fencing, health.

mod common;

use common::*;
use kvcache_core::validate::codec_to_wire;
use kvcache_proto::v1 as pb;
use kvcache_proto::v1::cache_node_client::CacheNodeClient;
use std::time::Duration;
use tonic::Code;

struct Node {
    addr: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
    store: std::sync::Arc<kvcache_node::PageStore>,
    _dir: tempfile::TempDir,
}

async fn start() -> Node {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 64);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let s = store.clone();
    let addr_of_listener = listener.local_addr().unwrap().to_string();
    let task = tokio::spawn(async move {
        let cfg = kvcache_node::NodeConfig::standalone("n1", addr_of_listener);
        kvcache_node::run(s, cfg, listener, kvcache_net::Exposure::plaintext(), async move {
            let _ = rx.await;
        })
        .await
        .unwrap();
    });
    Node { addr, stop: Some(tx), task, store, _dir: dir }
}

impl Node {
    async fn client(&self) -> CacheNodeClient<tonic::transport::Channel> {
        for _ in 0..50 {
            if let Ok(c) = CacheNodeClient::connect(self.addr.clone()).await {
                return c.max_decoding_message_size(64 << 20);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("node did not come up");
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(10), self.task).await.unwrap().unwrap();
    }
}

async fn put(
    c: &mut CacheNodeClient<tonic::transport::Channel>,
    epoch: u64,
    pages: Vec<pb::Page>,
) -> Result<pb::PutPagesResponse, tonic::Status> {
    let req = pb::PutPagesRequest { epoch, pages, handoff: false };
    c.put_pages(tokio_stream::iter(vec![req])).await.map(|r| r.into_inner())
}

async fn get_all(c: &mut CacheNodeClient<tonic::transport::Channel>, req: pb::GetPagesRequest) -> Vec<pb::PageItem> {
    let mut s = c.get_pages(req).await.unwrap().into_inner();
    let mut items = Vec::new();
    while let Some(m) = s.message().await.unwrap() {
        items.extend(m.items);
    }
    items
}

#[tokio::test]
async fn pages_round_trip_with_a_status_per_item() {
    let node = start().await;
    let mut c = node.client().await;
    let ns = small_ns();
    let v0 = payload(&ns, 4, 1);
    let v1 = payload(&ns, 2, 2);
    let r =
        put(&mut c, 0, vec![page(&key("a", 0, 0), 4, v0.clone()), page(&key("a", 0, 1), 2, v1.clone())]).await.unwrap();
    assert_eq!(r.pages_written, 2);
    let mut bad = pb::PageKey::from(&key("a", 0, 0));
    bad.sequence.as_mut().unwrap().sequence_id = String::new();
    let items = get_all(
        &mut c,
        pb::GetPagesRequest {
            keys: vec![(&key("a", 0, 1)).into(), (&key("zz", 0, 0)).into(), bad, (&key("a", 9, 0)).into()],
            ranges: vec![pb::PageRange {
                sequence: Some(pb::SequenceKey { namespace: "test.small".into(), sequence_id: "a".into() }),
                layer_start: 0,
                layer_end: 1,
                page_start: 0,
                page_end: 0,
            }],
        },
    )
    .await;
    let st: Vec<i32> = items.iter().map(|i| i.status).collect();
    use pb::PageStatus::*;
    assert_eq!(st, vec![Ok as i32, Miss as i32, Invalid as i32, Invalid as i32, Ok as i32, Ok as i32]);
    assert_eq!(items[0].page.as_ref().unwrap().payload.to_vec(), v1);
    assert!(items[3].message.contains("layer 9 out of range: model has 3 layers"), "{}", items[3].message);
    let p = items[4].page.as_ref().unwrap();
    assert_eq!(p.payload.to_vec(), v0);
    assert_eq!(p.payload_crc32c, kvcache_core::checksum::crc32c(&v0));
    assert_eq!(p.token_count, 4);
    node.stop().await;
}

#[tokio::test]
async fn malformed_puts_are_invalid_argument_and_store_nothing() {
    let node = start().await;
    let mut c = node.client().await;
    let ns = small_ns();
    let good = page(&key("a", 0, 0), 4, payload(&ns, 4, 1));
    let cases: Vec<(pb::Page, &str)> = vec![
        (
            {
                let mut p = good.clone();
                p.payload = p.payload.slice(..100);
                p
            },
            "payload is 100 bytes",
        ),
        (
            {
                let mut p = good.clone();
                p.payload_crc32c ^= 1;
                p
            },
            "checksum mismatch",
        ),
        (
            {
                let mut p = good.clone();
                p.token_count = 9;
                p
            },
            "token count 9 out of range",
        ),
        (
            {
                let mut p = good.clone();
                p.codec = codec_to_wire(kvcache_core::Codec::Int8);
                p
            },
            "does not match namespace",
        ),
        (
            {
                let mut p = good.clone();
                p.key.as_mut().unwrap().layer = 3;
                p
            },
            "layer 3 out of range",
        ),
    ];
    for (bad, want) in cases {
        // The good page rides in the same batch: all-or-nothing.
        let err = put(&mut c, 0, vec![good.clone(), bad]).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().contains(want), "{} !~ {want}", err.message());
    }
    let mut unknown = good.clone();
    unknown.key.as_mut().unwrap().sequence.as_mut().unwrap().namespace = "nope".into();
    let err = put(&mut c, 0, vec![unknown]).await.unwrap_err();
    assert!(kvcache_proto::metadata::is_unknown_namespace(&err), "NOT_FOUND with the namespace trailer: {err:?}");
    assert_eq!(node.store.stats().pages, 0, "a rejected batch stored something");
    let append = pb::AppendTokensRequest {
        sequence: Some(pb::SequenceKey { namespace: "test.small".into(), sequence_id: "a".into() }),
        layer: 0,
        token_count: 1,
        payload: bytes::Bytes::from(vec![0u8; 31]),
        ..Default::default()
    };
    let err = c.append_tokens(append).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("payload is 31 bytes"), "{}", err.message());
    node.stop().await;
}

#[tokio::test]
async fn stale_epoch_writes_get_failed_precondition_with_the_node_epoch() {
    let node = start().await;
    node.store.advance_epoch(7);
    let mut c = node.client().await;
    let p = page(&key("a", 0, 0), 4, payload(&small_ns(), 4, 1));
    let err = put(&mut c, 6, vec![p.clone()]).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(err.metadata().get(kvcache_proto::metadata::EPOCH).unwrap().to_str().unwrap(), "7");
    assert_eq!(put(&mut c, 7, vec![p]).await.unwrap().pages_written, 1);
    node.stop().await;
}

#[tokio::test]
async fn lookup_lease_stats_delete_and_health() {
    let node = start().await;
    let mut c = node.client().await;
    let ns = small_ns();
    put(&mut c, 0, vec![page(&key("a", 1, 0), 4, payload(&ns, 4, 1)), page(&key("a", 1, 1), 3, payload(&ns, 3, 1))])
        .await
        .unwrap();
    let seq = pb::SequenceKey { namespace: "test.small".into(), sequence_id: "a".into() };
    let l = c
        .lookup(pb::LookupRequest { sequence: Some(seq.clone()), prefix_hashes: vec![], layer: None })
        .await
        .unwrap()
        .into_inner();
    assert!(l.exists);
    assert_eq!(l.layers[1].tokens, 7);
    assert_eq!(l.layers[1].pages, 2);
    // A decode step asks for one layer only.
    let one = c
        .lookup(pb::LookupRequest { sequence: Some(seq.clone()), prefix_hashes: vec![], layer: Some(1) })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(one.layers.len(), 1);
    assert_eq!((one.layers[0].layer, one.layers[0].tokens, one.layers[0].page_write_seqs.len()), (1, 7, 2));
    let none = c
        .lookup(pb::LookupRequest { sequence: Some(seq.clone()), prefix_hashes: vec![], layer: Some(2) })
        .await
        .unwrap()
        .into_inner();
    assert!(none.exists && none.layers.is_empty());
    let lease = c.lease(pb::LeaseRequest { sequence: Some(seq.clone()), ttl_ms: 5000 }).await.unwrap().into_inner();
    let st = c.stats(pb::StatsRequest {}).await.unwrap().into_inner();
    assert_eq!((st.pages, st.sequences, st.active_leases), (2, 1, 1));
    assert!(c.release(pb::ReleaseRequest { lease_id: lease.lease_id }).await.unwrap().into_inner().released);
    let bad = c.lease(pb::LeaseRequest { sequence: Some(seq.clone()), ttl_ms: 0 }).await.unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    let d = c.delete_sequence(pb::DeleteSequenceRequest { epoch: 0, sequence: Some(seq) }).await.unwrap().into_inner();
    assert_eq!(d.pages_deleted, 2);

    let channel = tonic::transport::Channel::from_shared(node.addr.clone()).unwrap().connect().await.unwrap();
    let mut h = tonic_health::pb::health_client::HealthClient::new(channel);
    let r = h
        .check(tonic_health::pb::HealthCheckRequest { service: "kvcache.v1.CacheNode".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);
    node.stop().await;
}

#[tokio::test]
async fn a_put_stream_of_several_messages_stores_each_and_answers_the_totals() {
    let node = start().await;
    let mut c = node.client().await;
    let ns = small_ns();
    let vals: Vec<Vec<u8>> = (0..6u8).map(|i| payload(&ns, 4, i)).collect();
    let msgs: Vec<pb::PutPagesRequest> = (0..3)
        .map(|m| pb::PutPagesRequest {
            epoch: 0,
            pages: (0..2).map(|j| page(&key("s", 0, m * 2 + j), 4, vals[(m * 2 + j) as usize].clone())).collect(),
            handoff: false,
        })
        .collect();
    let r = c.put_pages(tokio_stream::iter(msgs)).await.unwrap().into_inner();
    assert_eq!(r.pages_written, 6);
    assert_eq!(r.bytes_written, vals.iter().map(|v| v.len() as u64).sum::<u64>());
    let items = get_all(
        &mut c,
        pb::GetPagesRequest { keys: (0..6).map(|i| (&key("s", 0, i)).into()).collect(), ranges: vec![] },
    )
    .await;
    for (it, v) in items.iter().zip(&vals) {
        assert_eq!(&it.page.as_ref().unwrap().payload.to_vec(), v);
    }
    node.stop().await;
}

#[tokio::test]
async fn a_get_larger_than_one_message_streams_every_item_in_order() {
    // 4096 items per response message: 5000 keys (stored pages asked again and again, and
    // misses) are answered as more than one message, every item in request order.
    let node = start().await;
    let mut c = node.client().await;
    let ns = small_ns();
    let vals: Vec<Vec<u8>> = (0..10u8).map(|i| payload(&ns, 4, i)).collect();
    let pages: Vec<pb::Page> = (0..10).map(|i| page(&key("big", 0, i), 4, vals[i as usize].clone())).collect();
    put(&mut c, 0, pages).await.unwrap();
    let keys: Vec<pb::PageKey> = (0..5000u32).map(|i| (&key("big", 0, i % 12)).into()).collect();
    let mut s = c.get_pages(pb::GetPagesRequest { keys, ranges: vec![] }).await.unwrap().into_inner();
    let (mut messages, mut items) = (0, Vec::new());
    while let Some(m) = s.message().await.unwrap() {
        messages += 1;
        items.extend(m.items);
    }
    assert!(messages >= 2, "{messages} message(s)");
    assert_eq!(items.len(), 5000);
    for (i, it) in items.iter().enumerate() {
        let want = (i % 12) as u32;
        assert_eq!(it.key.as_ref().unwrap().page_index, want, "item {i}");
        if want < 10 {
            assert_eq!(it.status, pb::PageStatus::Ok as i32, "item {i}");
            assert_eq!(it.page.as_ref().unwrap().payload.to_vec(), vals[want as usize], "item {i}");
        } else {
            assert_eq!(it.status, pb::PageStatus::Miss as i32, "item {i}");
        }
    }
    node.stop().await;
}

#[tokio::test]
async fn a_put_body_that_is_not_a_message_is_invalid_argument() {
    use http_body_util::BodyExt;
    let node = start().await;
    let ch = tonic::transport::Endpoint::from_shared(node.addr.clone()).unwrap().connect().await.unwrap();
    // A gRPC frame whose bytes are not a PutPagesRequest (field 2 as a truncated varint), then
    // a body that ends inside a second frame.
    for body in [vec![0u8, 0, 0, 0, 2, 0x10, 0x80], vec![0u8, 0, 0, 0, 9, 1, 2]] {
        let req = http::Request::builder()
            .method("POST")
            .uri(format!("{}{}", node.addr, kvcache_node::zerocopy::PUT_PAGES_PATH))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(tonic::body::Body::new(http_body_util::Full::new(bytes::Bytes::from(body))))
            .unwrap();
        let resp = tower::ServiceExt::oneshot(ch.clone(), req).await.unwrap();
        let status = match tonic::Status::from_header_map(resp.headers()) {
            Some(s) => s,
            None => {
                let t = resp.into_body().collect().await.unwrap().trailers().cloned().unwrap();
                tonic::Status::from_header_map(&t).unwrap()
            }
        };
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains("PutPages request"), "{}", status.message());
    }
    node.stop().await;
}

#[tokio::test]
async fn an_append_batch_answers_each_append_on_its_own() {
    let node = start().await;
    node.store.advance_epoch(3);
    let mut c = node.client().await;
    let ns = small_ns();
    let seq = |id: &str, namespace: &str| Some(pb::SequenceKey { namespace: namespace.into(), sequence_id: id.into() });
    let append = |id: &str, epoch: u64, body: Vec<u8>| pb::AppendTokensRequest {
        epoch,
        sequence: seq(id, "test.small"),
        layer: 0,
        token_count: 1,
        payload: bytes::Bytes::from(body),
        return_extent: true,
        ..Default::default()
    };
    let mut unknown = append("c", 3, payload(&ns, 1, 3));
    unknown.sequence = seq("c", "nope");
    let appends = vec![
        append("a", 3, payload(&ns, 1, 1)),
        append("b", 3, vec![0u8; 31]),
        unknown,
        append("a", 2, payload(&ns, 1, 4)),
        append("a", 3, payload(&ns, 1, 2)),
    ];
    let r = c.append_batch(pb::AppendBatchRequest { appends }).await.unwrap().into_inner().results;
    let codes: Vec<Code> = r.iter().map(|r| Code::from_i32(r.code)).collect();
    assert_eq!(codes, [Code::Ok, Code::InvalidArgument, Code::NotFound, Code::FailedPrecondition, Code::Ok]);
    assert!(r[1].message.contains("payload is 31 bytes"), "{}", r[1].message);
    assert!(r[2].message.contains("unknown namespace"), "{}", r[2].message);
    assert_eq!(r[2].not_found, "namespace", "the item says what was not found, as the trailer would");
    assert_eq!(r[3].node_epoch, Some(3), "a stale append carries the node's epoch");
    assert!(
        r[1..4]
            .iter()
            .all(|r| r.response.is_none() && r.node_epoch.is_none() == (r.code != Code::FailedPrecondition as i32))
    );
    // Applied in order: the two good appends, nothing of the others.
    let (first, second) = (r[0].response.as_ref().unwrap(), r[4].response.as_ref().unwrap());
    assert_eq!((first.layer_tokens[0], second.layer_tokens[0]), (1, 2));
    assert_eq!(second.extent.as_ref().unwrap().tokens, 2);
    let items =
        get_all(&mut c, pb::GetPagesRequest { keys: vec![(&key("a", 0, 0)).into()], ..Default::default() }).await;
    let mut both = vec![0u8; ns.layout().payload_bytes(2)];
    ns.layout().concat(&payload(&ns, 1, 1), 1, &payload(&ns, 1, 2), 1, &mut both);
    assert_eq!(items[0].page.as_ref().unwrap().payload, both);
    assert_eq!(node.store.stats().sequences, 1, "b and c were not created");
    // Too many appends in one call: refused whole.
    let many = (0..kvcache_node::service::MAX_BATCH_APPENDS + 1).map(|_| append("a", 3, payload(&ns, 1, 1))).collect();
    let err = c.append_batch(pb::AppendBatchRequest { appends: many }).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("at most 4096"), "{}", err.message());
    node.stop().await;
}
