//! Crash test with real processes: a node is SIGKILLed at random moments while a writer puts
//! pages and records each acknowledgement. After every restart, each acknowledged page reads back
//! byte-identical and the node recovers its index from its pool files; under `async` nothing
//! reads back wrong.
//!
//! SIGKILL keeps the OS page cache, so these tests cannot tell a store that flushes from one that
//! does not: what a *power loss* keeps is tested in `cache-node/tests/model.rs`, through a storage
//! layer that drops every unflushed write and tears the one in flight.

mod common;

use bytes::Bytes;
use kvcache_proto::v1 as pb;
use kvcache_proto::v1::cache_node_client::CacheNodeClient;
use rand::Rng;
use rand::SeedableRng;

/// A seeded generator whose seed the test prints (`KVCACHE_TEST_SEED` replays it).
fn seeded() -> rand::rngs::StdRng {
    rand::rngs::StdRng::seed_from_u64(kvcache_core::testing::test_seed())
}
use std::collections::BTreeMap;
use std::time::Duration;

const NS: &str = "crash.test";

fn namespace() -> pb::Namespace {
    (&kvcache_core::Namespace {
        name: NS.into(),
        tenant: "t".into(),
        model: kvcache_core::ModelSpec::preset("deepseek-v3").unwrap(),
        codec: kvcache_core::Codec::Bf16,
        page_tokens: 16,
        replication: 1,
        prefix_seed: 3,
    })
        .into()
}

fn spawn_node(dir: &std::path::Path, durability: &str) -> common::Proc {
    common::spawn(&[
        "node",
        "--listen",
        "127.0.0.1:0",
        "--capacity",
        "256MiB",
        "--node-id",
        "n1",
        "--durability",
        durability,
        "--data-dir",
        dir.to_str().unwrap(),
    ])
}

fn page(seq: &str, layer: u32, body: &[u8]) -> pb::Page {
    pb::Page {
        key: Some(pb::PageKey {
            sequence: Some(pb::SequenceKey { namespace: NS.into(), sequence_id: seq.into() }),
            layer,
            page_index: 0,
        }),
        codec: pb::Codec::Bf16 as i32,
        token_count: 16,
        write_seq: 0,
        payload_crc32c: kvcache_core::checksum::crc32c(body),
        prefix_hash: 0,
        payload: Bytes::copy_from_slice(body),
        ..Default::default()
    }
}

async fn connect(addr: &str) -> CacheNodeClient<tonic::transport::Channel> {
    for _ in 0..100 {
        if let Ok(c) = CacheNodeClient::connect(addr.to_owned()).await {
            return c;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("node at {addr} unreachable");
}

fn body(cycle: usize, i: usize) -> Vec<u8> {
    (0..16 * 1152).map(|b| (b ^ (cycle * 131 + i * 7)) as u8).collect()
}

async fn crash_cycles(durability: &str, cycles: usize) {
    let dir = tempfile::tempdir().unwrap();
    let mut acked: BTreeMap<(usize, usize), Vec<u8>> = BTreeMap::new();
    let mut unacked: BTreeMap<(usize, usize), Vec<u8>> = BTreeMap::new();
    let mut rng = seeded();
    for cycle in 0..cycles {
        let mut node = spawn_node(dir.path(), durability);
        let mut c = connect(&format!("http://{}", node.addr)).await;
        c.ensure_namespace(pb::EnsureNamespaceRequest { namespace: Some(namespace()) }).await.unwrap();
        // Everything acknowledged so far is back, byte for byte (sync) or absent (async).
        for (&(cy, i), want) in acked.iter().chain(unacked.iter()) {
            let req = pb::GetPagesRequest {
                keys: vec![page(&format!("c{cy}-{i}"), (i % 61) as u32, &[]).key.unwrap()],
                ranges: vec![],
            };
            let mut s = c.get_pages(req).await.unwrap().into_inner();
            let item = s.message().await.unwrap().unwrap().items.remove(0);
            let is_acked = acked.contains_key(&(cy, i));
            if item.status == pb::PageStatus::Ok as i32 {
                assert_eq!(
                    &item.page.unwrap().payload[..],
                    &want[..],
                    "cycle {cy} page {i}: wrong bytes after restart"
                );
            } else {
                assert!(!(is_acked && durability == "sync"), "cycle {cy} page {i}: acknowledged page lost under sync");
            }
        }
        let kill_after = Duration::from_millis(rng.random_range(20..150));
        let deadline = tokio::time::Instant::now() + kill_after;
        let mut i = 0;
        while tokio::time::Instant::now() < deadline {
            let b = body(cycle, i);
            let req = pb::PutPagesRequest {
                epoch: 0,
                pages: vec![page(&format!("c{cycle}-{i}"), (i % 61) as u32, &b)],
                handoff: false,
            };
            match c.put_pages(tokio_stream::iter(vec![req])).await {
                Ok(_) => {
                    acked.insert((cycle, i), b);
                }
                Err(_) => {
                    unacked.insert((cycle, i), b);
                }
            }
            i += 1;
        }
        // One more put in flight while the node dies.
        let b = body(cycle, i);
        let req = pb::PutPagesRequest {
            epoch: 0,
            pages: vec![page(&format!("c{cycle}-{i}"), (i % 61) as u32, &b)],
            handoff: false,
        };
        let inflight = tokio::spawn(async move { c.put_pages(tokio_stream::iter(vec![req])).await.is_ok() });
        node.kill(); // SIGKILL
        if inflight.await.unwrap() {
            acked.insert((cycle, i), b);
        } else {
            unacked.insert((cycle, i), b);
        }
    }
    assert!(acked.len() > cycles, "the writer barely wrote: {} pages", acked.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_sync_keeps_every_acknowledged_page_and_the_node_recovers_them() {
    crash_cycles("sync", 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_never_serves_wrong_bytes_under_async() {
    crash_cycles("async", 8).await;
}
