//! gRPC messages read from HTTP/2 DATA frames as they arrived, without reassembly copies.
//!
//! tonic's decoders copy every DATA frame into one buffer before slicing messages out of it. A
//! [`Rope`] keeps the frames as received and implements [`bytes::Buf`] so prost decodes straight
//! from them; its `copy_to_bytes` (what prost calls for each `bytes` field) returns a slice of
//! the frame when the field lies within one, and copies only when it spans frames. Used by the
//! client's GetPages and the node's PutPages, the two calls that carry page payloads.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use std::collections::VecDeque;
use tonic::Status;

/// Bytes received and not yet decoded, as the frames they arrived in.
#[derive(Default, Debug)]
pub struct Rope {
    chunks: VecDeque<Bytes>,
    len: usize,
}

impl Rope {
    /// Append a received chunk.
    pub fn push(&mut self, b: Bytes) {
        if !b.is_empty() {
            self.len += b.len();
            self.chunks.push_back(b);
        }
    }

    /// The first `n` bytes as a rope of their own (no copy). `n` must be at most the length.
    pub fn split_to(&mut self, mut n: usize) -> Rope {
        assert!(n <= self.len, "split_to past the end");
        let mut out = Rope::default();
        while n > 0 {
            let front = self.chunks.front_mut().expect("length accounted");
            if front.len() <= n {
                let c = self.chunks.pop_front().expect("front exists");
                n -= c.len();
                self.len -= c.len();
                out.push(c);
            } else {
                out.push(front.split_to(n));
                self.len -= n;
                n = 0;
            }
        }
        out
    }

    /// The first `N` bytes, if there are that many.
    fn peek<const N: usize>(&self) -> Option<[u8; N]> {
        if self.len < N {
            return None;
        }
        let mut out = [0u8; N];
        let mut i = 0;
        for c in &self.chunks {
            let take = (N - i).min(c.len());
            out[i..i + take].copy_from_slice(&c[..take]);
            i += take;
            if i == N {
                break;
            }
        }
        Some(out)
    }
}

impl Buf for Rope {
    fn remaining(&self) -> usize {
        self.len
    }

    fn chunk(&self) -> &[u8] {
        self.chunks.front().map_or(&[], |c| &c[..])
    }

    fn advance(&mut self, mut cnt: usize) {
        assert!(cnt <= self.len, "advance past the end");
        self.len -= cnt;
        while cnt > 0 {
            let front = self.chunks.front_mut().expect("length accounted");
            if front.len() <= cnt {
                cnt -= front.len();
                self.chunks.pop_front();
            } else {
                front.advance(cnt);
                cnt = 0;
            }
        }
    }

    /// A slice of the frame when the range lies within one (what prost calls for each `bytes`
    /// field); a copy only when it spans frames.
    fn copy_to_bytes(&mut self, len: usize) -> Bytes {
        assert!(len <= self.len, "copy_to_bytes past the end");
        if let Some(front) = self.chunks.front_mut()
            && front.len() >= len
        {
            let b = front.split_to(len);
            if front.is_empty() {
                self.chunks.pop_front();
            }
            self.len -= len;
            return b;
        }
        let mut out = BytesMut::with_capacity(len);
        out.put((&mut *self).take(len));
        out.freeze()
    }
}

/// `msg` as one uncompressed gRPC length-prefixed message: the 5-byte prefix, then the message.
pub fn encode(msg: &impl prost::Message) -> Bytes {
    let len = msg.encoded_len();
    let mut out = BytesMut::with_capacity(5 + len);
    out.put_u8(0);
    out.put_u32(len as u32);
    msg.encode_raw(&mut out);
    out.freeze()
}

/// Split gRPC length-prefixed messages off the front of `rope`: `Ok(None)` until a whole one is
/// there.
pub fn next_message(rope: &mut Rope, max_message: usize) -> Result<Option<Rope>, Status> {
    let Some(head) = rope.peek::<5>() else { return Ok(None) };
    if head[0] != 0 {
        return Err(Status::unimplemented("compressed gRPC message (no compression was negotiated)"));
    }
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if len > max_message {
        return Err(Status::resource_exhausted(format!(
            "gRPC message of {len} bytes is over the {max_message}-byte limit"
        )));
    }
    if rope.remaining() < 5 + len {
        return Ok(None);
    }
    rope.advance(5);
    Ok(Some(rope.split_to(len)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rope(parts: &[&'static [u8]]) -> Rope {
        let mut r = Rope::default();
        for p in parts {
            r.push(Bytes::from_static(p));
        }
        r
    }

    #[test]
    fn buf_reads_across_chunks_and_slices_within_one() {
        let mut r = rope(&[b"abc", b"", b"defgh", b"ij"]);
        assert_eq!(r.remaining(), 10);
        assert_eq!(r.chunk(), b"abc");
        r.advance(2);
        // Spans "c" and "de": copied.
        assert_eq!(&r.copy_to_bytes(3)[..], b"cde");
        // Within "fgh": a slice of it.
        let inside = r.copy_to_bytes(2);
        assert_eq!(&inside[..], b"fg");
        let mut head = r.split_to(2);
        assert_eq!((head.remaining(), r.remaining()), (2, 1));
        assert_eq!(&head.copy_to_bytes(2)[..], b"hi");
        assert_eq!(r.chunk(), b"j");
    }

    #[test]
    fn an_encoded_message_splits_off_whole() {
        let mut r = Rope::default();
        r.push(encode(&"abc".to_string()));
        let mut m = next_message(&mut r, 16).unwrap().unwrap();
        assert_eq!(<String as prost::Message>::decode(&mut m).unwrap(), "abc");
        assert_eq!(r.remaining(), 0);
    }

    #[test]
    fn messages_are_split_off_when_whole() {
        let mut r = rope(&[&[0, 0, 0], &[0, 2, b'x'], &[b'y', 0, 0, 0, 0, 0]]);
        let mut m = next_message(&mut r, 16).unwrap().unwrap();
        assert_eq!(&m.copy_to_bytes(2)[..], b"xy");
        // An empty message is a message.
        let m = next_message(&mut r, 16).unwrap().unwrap();
        assert_eq!(m.remaining(), 0);
        assert!(next_message(&mut r, 16).unwrap().is_none());
    }
}
