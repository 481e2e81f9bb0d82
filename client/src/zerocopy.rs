//! GetPages responses decoded from the HTTP/2 frames as they arrived, without reassembly copies.
//!
//! tonic's response decoder copies every DATA frame into one buffer before slicing messages out
//! of it, so each received page payload is copied once more after the kernel's copy (and the
//! buffer is reallocated, faulted in and freed as responses are kept). Here the frames stay as
//! they arrived ([`kvcache_net::frames::Rope`]) and prost decodes each message straight from
//! them: a payload that lies
//! within one frame — every page when the node sends it as its own frame (see
//! `kvcache_node::zerocopy`) and the frames are large enough (the client accepts 1 MiB frames) —
//! becomes a slice of that frame; one that spans frames is copied once, as before.
//!
//! Everything else is gRPC as tonic does it: the request is one length-prefixed message with the
//! call's metadata (deadline, trace context), and the status comes from the trailers (or the
//! headers of a trailers-only response). Compressed messages are refused (none is negotiated).

use bytes::Buf;
use http_body_util::BodyExt;
use kvcache_net::Channel;
use kvcache_net::frames::{self, Rope, next_message};
use kvcache_proto::v1 as pb;
use prost::Message;
use tonic::Status;
use tonic::body::Body;
use tower::ServiceExt;

/// The method answered here.
pub const GET_PAGES_PATH: &str = "/kvcache.v1.CacheNode/GetPages";

/// Call GetPages on `channel` and hand every response message to `each`, in order.
pub async fn get_pages(
    channel: Channel,
    req: tonic::Request<pb::GetPagesRequest>,
    max_message: usize,
    mut each: impl FnMut(pb::GetPagesResponse) -> Result<(), Status>,
) -> Result<(), Status> {
    let (metadata, _, msg) = req.into_parts();
    let mut http_req = http::Request::builder()
        .method(http::Method::POST)
        .uri(GET_PAGES_PATH)
        .version(http::Version::HTTP_2)
        .body(Body::new(http_body_util::Full::new(frames::encode(&msg))))
        .map_err(|e| Status::internal(e.to_string()))?;
    let headers = http_req.headers_mut();
    headers.extend(metadata.into_headers());
    headers.insert(http::header::TE, http::HeaderValue::from_static("trailers"));
    headers.insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/grpc"));
    let resp = channel.oneshot(http_req).await.map_err(|e| Status::from_error(Box::new(e)))?;
    if let Some(s) = Status::from_header_map(resp.headers()) {
        // Trailers-only response: the status is all there is.
        return if s.code() == tonic::Code::Ok { Ok(()) } else { Err(s) };
    }
    if resp.status() != http::StatusCode::OK {
        return Err(Status::unknown(format!("GetPages answered HTTP {}", resp.status())));
    }
    let mut body = resp.into_body();
    let mut rope = Rope::default();
    while let Some(frame) = body.frame().await {
        let frame = frame?;
        match frame.into_data() {
            Ok(data) => {
                rope.push(data);
                while let Some(mut m) = next_message(&mut rope, max_message)? {
                    let msg = pb::GetPagesResponse::decode(&mut m)
                        .map_err(|e| Status::internal(format!("GetPages response: {e}")))?;
                    each(msg)?;
                }
            }
            Err(frame) => {
                let Some(trailers) = frame.trailers_ref() else { continue };
                if rope.remaining() > 0 {
                    return Err(Status::internal(format!(
                        "GetPages response ended inside a message ({} bytes left over)",
                        rope.remaining()
                    )));
                }
                return match Status::from_header_map(trailers) {
                    Some(s) if s.code() == tonic::Code::Ok => Ok(()),
                    Some(s) => Err(s),
                    None => Err(Status::internal("GetPages trailers without grpc-status")),
                };
            }
        }
    }
    Err(Status::internal("GetPages response ended without trailers"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn response(n: usize) -> pb::GetPagesResponse {
        pb::GetPagesResponse {
            items: (0..n)
                .map(|i| pb::PageItem {
                    status: pb::PageStatus::Ok as i32,
                    page: Some(pb::Page {
                        payload: Bytes::from((0..1000 + i * 37).map(|j| (j * 7 + i) as u8).collect::<Vec<_>>()),
                        token_count: i as u32 + 1,
                        payload_crc32c: 99,
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .collect(),
        }
    }

    fn framed(m: &pb::GetPagesResponse) -> Vec<u8> {
        let mut v = vec![0u8];
        v.extend_from_slice(&(m.encoded_len() as u32).to_be_bytes());
        m.encode(&mut v).unwrap();
        v
    }

    #[test]
    fn messages_decode_the_same_however_the_frames_split_them() {
        let a = response(3);
        let b = response(1);
        let mut wire = framed(&a);
        wire.extend(framed(&b));
        for cut1 in (0..wire.len()).step_by(97) {
            for cut2 in [cut1, (cut1 + 5).min(wire.len()), (cut1 + 1500).min(wire.len())] {
                let mut rope = Rope::default();
                let mut got = Vec::new();
                for piece in [&wire[..cut1], &wire[cut1..cut2], &wire[cut2..]] {
                    rope.push(Bytes::copy_from_slice(piece));
                    while let Some(mut m) = next_message(&mut rope, 1 << 20).unwrap() {
                        got.push(pb::GetPagesResponse::decode(&mut m).unwrap());
                    }
                }
                assert_eq!(got, vec![a.clone(), b.clone()], "cuts at {cut1} and {cut2}");
                assert_eq!(rope.remaining(), 0);
            }
        }
    }

    #[test]
    fn a_payload_within_one_frame_is_a_slice_of_it() {
        let m = response(2);
        let wire = Bytes::from(framed(&m));
        let mut rope = Rope::default();
        rope.push(wire.clone());
        let mut msg = next_message(&mut rope, 1 << 20).unwrap().unwrap();
        let got = pb::GetPagesResponse::decode(&mut msg).unwrap();
        let range = wire.as_ptr() as usize..wire.as_ptr() as usize + wire.len();
        for it in &got.items {
            let p = it.page.as_ref().unwrap().payload.as_ptr() as usize;
            assert!(range.contains(&p), "payload was copied");
        }
    }

    #[test]
    fn compressed_and_oversized_messages_are_refused() {
        let mut rope = Rope::default();
        rope.push(Bytes::from_static(&[1, 0, 0, 0, 1, 0]));
        assert_eq!(next_message(&mut rope, 100).unwrap_err().code(), tonic::Code::Unimplemented);
        let mut rope = Rope::default();
        rope.push(Bytes::from_static(&[0, 0, 0, 1, 0]));
        assert_eq!(next_message(&mut rope, 100).unwrap_err().code(), tonic::Code::ResourceExhausted);
        // A prefix alone is not a message yet.
        let mut rope = Rope::default();
        rope.push(Bytes::from_static(&[0, 0, 0]));
        assert!(next_message(&mut rope, 100).unwrap().is_none());
    }
}
