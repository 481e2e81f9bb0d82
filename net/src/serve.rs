//! What every kvcache server shares beyond TLS: the message size limit, bounded connections and
//! streams, and one error type for `run`.
//!
//! - [`MAX_MESSAGE_BYTES`]: the largest gRPC message any kvcache process sends or accepts.
//! - [`incoming`] caps open connections at [`MAX_CONNECTIONS`]: past it a new connection is
//!   closed at once (the client sees a reset and retries elsewhere) instead of each taking
//!   buffers until the process runs out of memory. HTTP/2 streams per connection are capped by
//!   [`MAX_STREAMS_PER_CONNECTION`] in [`crate::server`].
//! - [`ServeError`]: why a server's `run` stopped.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_stream::StreamExt;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// Largest gRPC message a kvcache process sends or accepts (larger: RESOURCE_EXHAUSTED).
pub const MAX_MESSAGE_BYTES: usize = 256 << 20;
/// Open connections a server accepts at once; more are closed on arrival.
pub const MAX_CONNECTIONS: usize = 4096;
/// Concurrent HTTP/2 streams (calls) per connection.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 1024;

/// Why a server stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Transport setup (TLS, reflection, addresses).
    #[error(transparent)]
    Net(#[from] crate::NetError),
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// A task the server ran panicked.
    #[error("server task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// An accepted connection holding one of the server's connection slots until it closes.
#[derive(Debug)]
pub struct LimitedStream {
    inner: TcpStream,
    _slot: OwnedSemaphorePermit,
}

impl Connected for LimitedStream {
    type ConnectInfo = TcpConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

impl AsyncRead for LimitedStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for LimitedStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Connections accepted on `listener`, at most [`MAX_CONNECTIONS`] open at once, with
/// TCP_NODELAY set (tonic sets it only on listeners it binds itself; without it every streamed
/// response waits on the peer's delayed ACK).
pub fn incoming(
    listener: TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<LimitedStream>> + Send + 'static {
    incoming_with_limit(listener, MAX_CONNECTIONS)
}

/// [`incoming`] with another connection limit.
pub fn incoming_with_limit(
    listener: TcpListener,
    max_connections: usize,
) -> impl tokio_stream::Stream<Item = std::io::Result<LimitedStream>> + Send + 'static {
    let slots = Arc::new(Semaphore::new(max_connections));
    tokio_stream::wrappers::TcpListenerStream::new(listener).filter_map(move |s| match s {
        Ok(s) => match slots.clone().try_acquire_owned() {
            Ok(slot) => {
                let _ = s.set_nodelay(true);
                Some(Ok(LimitedStream { inner: s, _slot: slot }))
            }
            Err(_) => {
                tracing::warn!(
                    peer = ?s.peer_addr().ok(),
                    max_connections,
                    "connection refused: the server is at its connection limit"
                );
                None // dropped: closed at once
            }
        },
        Err(e) => Some(Err(e)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn connections_past_the_limit_are_closed_and_a_freed_slot_is_reused() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let mut conns = Box::pin(incoming_with_limit(l, 2));
        let a = TcpStream::connect(addr).await.unwrap();
        let first = conns.next().await.unwrap().unwrap();
        let _b = TcpStream::connect(addr).await.unwrap();
        let _second = conns.next().await.unwrap().unwrap();
        // The third is accepted by the kernel, then closed by the server: its read sees EOF.
        let mut c = TcpStream::connect(addr).await.unwrap();
        let accept = tokio::spawn(async move {
            let next = conns.next().await;
            (next.map(|r| r.is_ok()), conns)
        });
        let mut buf = [0u8; 1];
        let n = tokio::time::timeout(std::time::Duration::from_secs(5), c.read(&mut buf)).await.unwrap();
        assert!(matches!(n, Ok(0) | Err(_)), "the connection over the limit was not closed: {n:?}");
        // Closing one frees its slot for the next connection.
        drop(first);
        drop(a);
        let _d = TcpStream::connect(addr).await.unwrap();
        let (got, _conns) = tokio::time::timeout(std::time::Duration::from_secs(5), accept).await.unwrap().unwrap();
        assert_eq!(got, Some(true));
    }
}
