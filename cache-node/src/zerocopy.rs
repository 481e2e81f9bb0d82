//! The two page-carrying calls without payload copies: GetPages and PutPages by hand.
//!
//! tonic's encoder serializes every response message into one buffer, so each page payload would
//! be copied out of the mapping into it (and the buffer grown, faulted in and freed per message);
//! its decoder copies every received DATA frame into one buffer before slicing messages out.
//! [`ZeroCopyPages`] answers `/kvcache.v1.CacheNode/GetPages` and `.../PutPages` itself and
//! hands the rest of the CacheNode service to tonic.
//!
//! - GetPages frames each `GetPagesResponse` as gRPC does (a 5-byte prefix and the protobuf
//!   message) but emits each page's payload as its own body chunk: the mapped `Bytes` (holding
//!   the slot against reuse) goes to hyper as is, and only the few bytes of protobuf around it
//!   are encoded. The bytes on the wire are exactly what prost would have written (fields in
//!   order, the payload last in `Page`, `Page` last in `PageItem`), so every gRPC client decodes
//!   them unchanged.
//! - PutPages decodes each `PutPagesRequest` from the request's DATA frames as they arrived
//!   ([`kvcache_net::frames::Rope`]): a payload within one frame (servers accept 1 MiB frames)
//!   reaches the store as a slice of it, and goes to the pool file with that one `pwrite`.
//!   Messages are stored as they complete, like the tonic handler does.

use crate::service::NodeService;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures::future::BoxFuture;
use http_body::Frame;
use http_body_util::BodyExt;
use kvcache_net::frames::{Rope, next_message};
use kvcache_proto::v1 as pb;
use prost::Message;
use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};
use tonic::Status;
use tonic::body::Body;
use tonic::server::NamedService;

/// The methods this service answers itself.
pub const GET_PAGES_PATH: &str = "/kvcache.v1.CacheNode/GetPages";
/// See [`GET_PAGES_PATH`].
pub const PUT_PAGES_PATH: &str = "/kvcache.v1.CacheNode/PutPages";
/// Largest GetPages request accepted (keys and ranges only: no payloads).
const MAX_REQUEST_BYTES: usize = 64 << 20;
/// Payload bytes per response message.
const MESSAGE_BYTES: usize = 2 << 20;

/// The CacheNode service with GetPages answered zero-copy and every other method by `inner`.
#[derive(Clone)]
pub struct ZeroCopyPages<S> {
    node: Arc<NodeService>,
    inner: S,
}

impl<S> ZeroCopyPages<S> {
    /// Answer GetPages from `node`; forward the rest to `inner` (the tonic CacheNode server).
    pub fn new(node: Arc<NodeService>, inner: S) -> Self {
        Self { node, inner }
    }
}

impl<S> NamedService for ZeroCopyPages<S> {
    const NAME: &'static str = "kvcache.v1.CacheNode";
}

impl<S> tower::Service<http::Request<Body>> for ZeroCopyPages<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<http::Response<Body>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let node = self.node.clone();
        match req.uri().path() {
            GET_PAGES_PATH => Box::pin(async move { Ok(get_pages(node, req).await.unwrap_or_else(|s| s.into_http())) }),
            PUT_PAGES_PATH => Box::pin(async move { Ok(put_pages(node, req).await.unwrap_or_else(|s| s.into_http())) }),
            _ => Box::pin(self.inner.call(req)),
        }
    }
}

/// Decode the single length-prefixed message of a unary request body.
async fn request(body: Body) -> Result<pb::GetPagesRequest, Status> {
    let bytes = http_body_util::Limited::new(body, MAX_REQUEST_BYTES)
        .collect()
        .await
        .map_err(|e| Status::invalid_argument(format!("GetPages request body: {e}")))?
        .to_bytes();
    let total = bytes.len();
    let mut rope = Rope::default();
    rope.push(bytes);
    let Some(mut m) = next_message(&mut rope, usize::MAX)? else {
        return Err(Status::invalid_argument(if total < 5 {
            "GetPages request is not a gRPC message".to_owned()
        } else {
            format!("GetPages request body of {total} bytes ends inside its message")
        }));
    };
    if rope.remaining() > 0 {
        return Err(Status::invalid_argument(format!(
            "GetPages request has {} bytes after its message",
            rope.remaining()
        )));
    }
    pb::GetPagesRequest::decode(&mut m).map_err(|e| Status::invalid_argument(format!("GetPages request: {e}")))
}

/// The trailers of a call that succeeded.
fn ok_trailers() -> Chunk {
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
    Ok(Frame::trailers(trailers))
}

type Chunk = Result<Frame<Bytes>, Status>;

async fn put_pages(node: Arc<NodeService>, req: http::Request<Body>) -> Result<http::Response<Body>, Status> {
    let caller = kvcache_net::Caller::from_extensions(req.extensions());
    let mut body = req.into_body();
    let mut rope = Rope::default();
    let mut resp = pb::PutPagesResponse::default();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else { continue };
        rope.push(data);
        while let Some(mut m) = next_message(&mut rope, crate::MAX_MESSAGE_BYTES)? {
            let msg = pb::PutPagesRequest::decode(&mut m)
                .map_err(|e| Status::invalid_argument(format!("PutPages request: {e}")))?;
            node.put_message(&caller, msg, &mut resp).await?;
        }
    }
    if rope.remaining() > 0 {
        return Err(Status::invalid_argument(format!(
            "PutPages request ended inside a message ({} bytes left over)",
            rope.remaining()
        )));
    }
    let frames: [Chunk; 2] = [Ok(Frame::data(kvcache_net::frames::encode(&resp))), ok_trailers()];
    respond(Body::new(http_body_util::StreamBody::new(tokio_stream::iter(frames))))
}

async fn get_pages(node: Arc<NodeService>, req: http::Request<Body>) -> Result<http::Response<Body>, Status> {
    let caller = kvcache_net::Caller::from_extensions(req.extensions());
    let mut wanted = node.expand(&caller, request(req.into_body()).await?)?.into_iter();
    let (store, metrics) = (node.store().clone(), node.metrics.clone());
    let (auth, who) = (node.auth.clone(), caller);
    // Most requests (a decode step's layer, a prefill's batch) fit one response message: answer
    // those from here, the chunks handed to hyper as they are, without a task and a channel
    // between the lookups and the connection. Larger ones stream, a message at a time.
    let first = next_message_chunks(&store, &metrics, &mut wanted);
    auth.debit(&who, first.iter().map(|c| c.len() as u64).sum());
    if wanted.len() == 0 {
        let mut chunks: Vec<Chunk> = first.into_iter().map(|c| Ok(Frame::data(c))).collect();
        chunks.push(ok_trailers());
        return respond(Body::new(http_body_util::StreamBody::new(tokio_stream::iter(chunks))));
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<Chunk>(16);
    node.tasks.spawn(async move {
        let mut chunks = first;
        while !chunks.is_empty() {
            for c in chunks {
                if tx.send(Ok(Frame::data(c))).await.is_err() {
                    return; // client went away; slot holds drop with the chunks
                }
            }
            chunks = next_message_chunks(&store, &metrics, &mut wanted);
            auth.debit(&who, chunks.iter().map(|c| c.len() as u64).sum());
        }
        let _ = tx.send(ok_trailers()).await;
    });
    respond(Body::new(http_body_util::StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx))))
}

/// The chunks of the next response message: items looked up from `wanted` until the message is
/// full or they run out (none when no item is left).
fn next_message_chunks(
    store: &crate::PageStore,
    metrics: &crate::metrics::NodeMetrics,
    wanted: &mut impl Iterator<Item = crate::service::Wanted>,
) -> Vec<Bytes> {
    let mut msg = ResponseFrame::default();
    for w in wanted.by_ref() {
        let (item, payload) = crate::service::page_item(store, metrics, w);
        msg.push(item, payload);
        if msg.is_full() {
            break;
        }
    }
    if msg.items == 0 { Vec::new() } else { msg.finish() }
}

/// A gRPC response with `body`.
fn respond(body: Body) -> Result<http::Response<Body>, Status> {
    http::Response::builder()
        .status(200)
        .header("content-type", "application/grpc")
        .body(body)
        .map_err(|e| Status::internal(e.to_string()))
}

fn varint_len(v: u64) -> usize {
    prost::encoding::encoded_len_varint(v)
}

/// One `GetPagesResponse` under construction: protobuf pieces and payloads, in wire order.
#[derive(Default)]
struct ResponseFrame {
    /// (encoded protobuf bytes before it, the payload that follows them).
    parts: Vec<(Bytes, Bytes)>,
    /// Encoded bytes not yet followed by a payload.
    pending: BytesMut,
    len: usize,
    payload_bytes: usize,
    items: usize,
}

impl ResponseFrame {
    /// Whether the message is as large as one should be: send it and start the next.
    fn is_full(&self) -> bool {
        self.payload_bytes >= MESSAGE_BYTES || self.items >= 4096
    }

    /// Append `item` (its page's payload left empty) with `payload` as the page's payload.
    fn push(&mut self, mut item: pb::PageItem, payload: Bytes) {
        // Field numbers: GetPagesResponse.items = 1; PageItem.page = 3; Page.payload = 7.
        let page = item.page.take();
        let page_head = page.as_ref().map(|p| p.encoded_len()).unwrap_or(0);
        let item_head = item.encoded_len();
        let payload_field = if payload.is_empty() { 0 } else { 1 + varint_len(payload.len() as u64) + payload.len() };
        let page_len = page_head + payload_field;
        let item_len = item_head + if page.is_some() { 1 + varint_len(page_len as u64) + page_len } else { 0 };
        let b = &mut self.pending;
        b.put_u8(0x0a);
        prost::encoding::encode_varint(item_len as u64, b);
        item.encode_raw(b);
        if let Some(p) = &page {
            b.put_u8(0x1a);
            prost::encoding::encode_varint(page_len as u64, b);
            p.encode_raw(b);
            if !payload.is_empty() {
                b.put_u8(0x3a);
                prost::encoding::encode_varint(payload.len() as u64, b);
                self.payload_bytes += payload.len();
                let head = self.pending.split().freeze();
                self.parts.push((head, payload));
            }
        }
        self.len += 1 + varint_len(item_len as u64) + item_len;
        self.items += 1;
    }

    /// The gRPC frame: prefix, then protobuf pieces and payloads.
    fn finish(mut self) -> Vec<Bytes> {
        let mut out = Vec::with_capacity(2 * self.parts.len() + 2);
        let mut prefix = BytesMut::with_capacity(5);
        prefix.put_u8(0);
        prefix.put_u32(self.len as u32);
        out.push(prefix.freeze());
        for (head, payload) in self.parts.drain(..) {
            out.push(head);
            out.push(payload);
        }
        if !self.pending.is_empty() {
            out.push(self.pending.split().freeze());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(i: u32, payload: usize) -> pb::PageItem {
        let key = pb::PageKey {
            sequence: Some(pb::SequenceKey { namespace: "ns".into(), sequence_id: format!("s{i}") }),
            layer: i,
            page_index: 2 * i,
        };
        pb::PageItem {
            key: Some(key.clone()),
            status: if payload > 0 { pb::PageStatus::Ok as i32 } else { pb::PageStatus::Miss as i32 },
            page: (payload > 0).then(|| pb::Page {
                key: Some(key),
                codec: 1,
                token_count: 7 + i,
                write_seq: 1 << (i % 40),
                payload_crc32c: 0xdead_beef ^ i,
                prefix_hash: u64::MAX - u64::from(i),
                payload: Bytes::from((0..payload).map(|b| (b * 31 + i as usize) as u8).collect::<Vec<u8>>()),
                ..Default::default()
            }),
            message: if payload == 0 { "miss".into() } else { String::new() },
        }
    }

    #[test]
    fn the_hand_framed_message_is_byte_identical_to_prost_s() {
        for sizes in [vec![1usize], vec![0], vec![300, 0, 70_000, 5], vec![16 << 10; 9], vec![0, 0, 1]] {
            let items: Vec<pb::PageItem> = sizes.iter().enumerate().map(|(i, &n)| item(i as u32, n)).collect();
            let mut m = ResponseFrame::default();
            for it in &items {
                let mut bare = it.clone();
                let payload = bare.page.as_mut().map(|p| std::mem::take(&mut p.payload)).unwrap_or_default();
                m.push(bare, payload);
            }
            let wire: Vec<u8> = m.finish().concat();
            let want = pb::GetPagesResponse { items }.encode_to_vec();
            assert_eq!(wire[0], 0);
            assert_eq!(u32::from_be_bytes(wire[1..5].try_into().unwrap()) as usize, want.len());
            assert_eq!(&wire[5..], &want[..], "sizes {sizes:?}");
        }
    }
}
