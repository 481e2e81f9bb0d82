//! A node that sends bad pages: the client answers with a typed error or a miss, never a panic
//! and never the bad bytes. The node is a fake CacheNode on loopback, registered with a real
//! coordinator.

use bytes::Bytes;
use kvcache_client::{Client, ClientError, NodeRef};
use kvcache_coordinator::{ClusterState, CoordinatorConfig};
use kvcache_core::{PageKey, SequenceKey};
use kvcache_proto::v1 as pb;
use kvcache_proto::v1::cache_node_server::{CacheNode, CacheNodeServer};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tonic::{Request, Response, Status, Streaming};

/// What the fake node answers to GetPages.
#[derive(Clone, Copy, Debug)]
enum Lie {
    /// A payload one byte short of its token count, with a CRC that matches it.
    ShortPayload,
    /// Another key than the one asked for.
    OtherKey,
    /// A payload whose CRC does not match.
    BadCrc,
    /// The page as it should be.
    Truth,
}

struct FakeNode {
    lie: Mutex<Lie>,
    ns: kvcache_core::Namespace,
}

type Pages = Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::GetPagesResponse, Status>> + Send>>;

fn fake() -> Status {
    Status::unimplemented("fake node")
}

#[tonic::async_trait]
impl CacheNode for FakeNode {
    async fn put_pages(
        &self,
        _: Request<Streaming<pb::PutPagesRequest>>,
    ) -> Result<Response<pb::PutPagesResponse>, Status> {
        Err(fake())
    }

    type GetPagesStream = Pages;

    async fn get_pages(&self, r: Request<pb::GetPagesRequest>) -> Result<Response<Pages>, Status> {
        let lie = *self.lie.lock().unwrap();
        let items = r
            .into_inner()
            .keys
            .into_iter()
            .map(|k| {
                let mut key = k.clone();
                let mut body: Vec<u8> = (0..self.ns.layout().payload_bytes(4)).map(|i| i as u8).collect();
                let mut crc = kvcache_core::checksum::crc32c(&body);
                match lie {
                    Lie::ShortPayload => {
                        body.pop();
                        crc = kvcache_core::checksum::crc32c(&body);
                    }
                    Lie::OtherKey => key.page_index += 1,
                    Lie::BadCrc => crc ^= 1,
                    Lie::Truth => {}
                }
                pb::PageItem {
                    key: Some(k),
                    status: pb::PageStatus::Ok as i32,
                    message: String::new(),
                    page: Some(pb::Page {
                        key: Some(key),
                        codec: kvcache_core::validate::codec_to_wire(self.ns.codec),
                        token_count: 4,
                        write_seq: 7,
                        payload_crc32c: crc,
                        prefix_hash: 0,
                        payload: Bytes::from(body),
                        ..Default::default()
                    }),
                }
            })
            .collect();
        let msg = pb::GetPagesResponse { items };
        Ok(Response::new(Box::pin(tokio_stream::iter(vec![Ok(msg)]))))
    }

    async fn append_tokens(
        &self,
        _: Request<pb::AppendTokensRequest>,
    ) -> Result<Response<pb::AppendTokensResponse>, Status> {
        Err(fake())
    }

    async fn append_batch(
        &self,
        _: Request<pb::AppendBatchRequest>,
    ) -> Result<Response<pb::AppendBatchResponse>, Status> {
        Err(fake())
    }

    async fn lookup(&self, _: Request<pb::LookupRequest>) -> Result<Response<pb::LookupResponse>, Status> {
        Err(fake())
    }

    async fn get_rows(&self, _: Request<pb::GetRowsRequest>) -> Result<Response<pb::GetRowsResponse>, Status> {
        Err(fake())
    }

    async fn create_sequence(
        &self,
        _: Request<pb::CreateSequenceRequest>,
    ) -> Result<Response<pb::CreateSequenceResponse>, Status> {
        Err(fake())
    }

    async fn match_prefix(
        &self,
        _: Request<pb::MatchPrefixRequest>,
    ) -> Result<Response<pb::MatchPrefixResponse>, Status> {
        Err(fake())
    }

    async fn delete_sequence(
        &self,
        _: Request<pb::DeleteSequenceRequest>,
    ) -> Result<Response<pb::DeleteSequenceResponse>, Status> {
        Err(fake())
    }

    async fn lease(&self, _: Request<pb::LeaseRequest>) -> Result<Response<pb::LeaseResponse>, Status> {
        Err(fake())
    }

    async fn release(&self, _: Request<pb::ReleaseRequest>) -> Result<Response<pb::ReleaseResponse>, Status> {
        Err(fake())
    }

    async fn stats(&self, _: Request<pb::StatsRequest>) -> Result<Response<pb::NodeStats>, Status> {
        Err(fake())
    }

    async fn ensure_namespace(
        &self,
        _: Request<pb::EnsureNamespaceRequest>,
    ) -> Result<Response<pb::EnsureNamespaceResponse>, Status> {
        Ok(Response::new(pb::EnsureNamespaceResponse::default()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_sending_bad_pages_gets_a_typed_error_or_a_miss_never_the_bytes() {
    // A real coordinator.
    let dir = tempfile::tempdir().unwrap();
    let state = ClusterState::open(CoordinatorConfig::new(dir.path())).unwrap();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let coord = l.local_addr().unwrap().to_string();
    let (stop_c, stopped_c) = tokio::sync::oneshot::channel::<()>();
    let c = tokio::spawn(kvcache_coordinator::run(state, l, kvcache_net::Exposure::default(), async move {
        let _ = stopped_c.await;
    }));
    let client = Client::connect(&coord).await.unwrap();
    let ns = client
        .create_namespace(pb::CreateNamespaceRequest {
            name: "t.bad".into(),
            preset: "qwen2.5-7b".into(),
            page_tokens: 4,
            ..Default::default()
        })
        .await
        .unwrap();
    // The fake node, registered.
    let node = Arc::new(FakeNode { lie: Mutex::new(Lie::Truth), ns: ns.clone() });
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let (stop_n, stopped_n) = tokio::sync::oneshot::channel::<()>();
    let n = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(CacheNodeServer::from_arc(node.clone()))
            .serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(l), async move {
                let _ = stopped_n.await;
            }),
    );
    let info =
        pb::NodeInfo { node_id: "fake".into(), address: addr.clone(), capacity_bytes: 1 << 30, ..Default::default() };
    client.coordinator().register_node(pb::RegisterNodeRequest { node: Some(info) }).await.unwrap();
    client.refresh().await.unwrap();
    let fake_ref = NodeRef { node_id: "fake".into(), address: addr };
    let keys: Vec<PageKey> =
        (0..3).map(|i| PageKey { sequence: SequenceKey::new("t.bad", "s"), layer: 0, page_index: i }).collect();

    let got = client.get_from(&fake_ref, &keys).await.unwrap();
    for (k, p) in keys.iter().zip(&got) {
        let p = p.as_ref().expect("the truthful node's page");
        assert_eq!((&p.key, p.write_seq, p.payload.len()), (k, 7, ns.layout().payload_bytes(4)));
    }
    for (lie, says) in [(Lie::ShortPayload, "payload"), (Lie::OtherKey, "asked for")] {
        *node.lie.lock().unwrap() = lie;
        match client.get_from(&fake_ref, &keys).await {
            Err(ClientError::BadPage { node, reason }) => {
                assert_eq!(node, "fake");
                assert!(reason.contains(says), "{lie:?}: {reason}");
            }
            other => panic!("{lie:?}: expected BadPage, got {other:?}"),
        }
        // Through the failover path: no other replica, so the pages are missing, not wrong.
        let r = client.get_pages(&keys).await;
        assert!(r.as_ref().is_ok_and(|v| v.iter().all(Option::is_none)), "{lie:?}: {r:?}");
    }
    *node.lie.lock().unwrap() = Lie::BadCrc;
    let got = client.get_from(&fake_ref, &keys).await.unwrap();
    assert!(got.iter().all(Option::is_none), "a payload failing its CRC is a miss");

    let _ = stop_n.send(());
    let _ = stop_c.send(());
    tokio::time::timeout(Duration::from_secs(10), n).await.unwrap().unwrap().unwrap();
    tokio::time::timeout(Duration::from_secs(10), c).await.unwrap().unwrap().unwrap();
}
