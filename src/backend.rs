//! Connecting to the cleartext backend: DNS resolved at each connect, one deadline for the whole
//! attempt, and a stream that counts the bytes each way for logs and metrics.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use crate::config::BackendAddress;

/// Why the backend could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("backend {backend}: no connection within {timeout:?}")]
    Timeout { backend: String, timeout: Duration },
    #[error("backend {backend}: cannot resolve: {source}")]
    Resolve { backend: String, source: io::Error },
    #[error("backend {backend}: {source}")]
    Connect { backend: String, source: io::Error },
    #[error("backend {backend}: cannot send the PROXY protocol header: {source}")]
    ProxyHeader { backend: String, source: io::Error },
}

/// Bytes moved to and from the backend, shared between a session and whoever reports on it.
#[derive(Debug, Default)]
pub struct ByteCounters {
    pub to_backend: AtomicU64,
    pub to_client: AtomicU64,
}

impl ByteCounters {
    pub fn to_backend(&self) -> u64 {
        self.to_backend.load(Ordering::Relaxed)
    }
    pub fn to_client(&self) -> u64 {
        self.to_client.load(Ordering::Relaxed)
    }
    /// Sum of both directions: grows whenever anything moves, for idle detection.
    pub fn total(&self) -> u64 {
        self.to_backend().wrapping_add(self.to_client())
    }
}

/// A connection to the backend that counts what it reads (bound for the client) and writes
/// (from the client, or written by us on its behalf).
#[derive(Debug)]
pub struct BackendStream {
    inner: TcpStream,
    counters: Arc<ByteCounters>,
}

impl BackendStream {
    pub fn counters(&self) -> &Arc<ByteCounters> {
        &self.counters
    }
}

impl AsyncRead for BackendStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let poll = Pin::new(&mut this.inner).poll_read(cx, buf);
        let read = buf.filled().len().saturating_sub(before);
        this.counters
            .to_client
            .fetch_add(read as u64, Ordering::Relaxed);
        poll
    }
}

impl AsyncWrite for BackendStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &poll {
            this.counters
                .to_backend
                .fetch_add(*n as u64, Ordering::Relaxed);
        }
        poll
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = &poll {
            this.counters
                .to_backend
                .fetch_add(*n as u64, Ordering::Relaxed);
        }
        poll
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Connects to `backend`, trying each resolved address in turn, then writes `preamble` (the
/// PROXY protocol header, or nothing) before anything else, all within `timeout`.
///
/// The preamble is written straight to the socket in one call on a fresh connection (a few
/// hundred bytes always fit the send buffer), so the receiver never sees a partial header
/// (HAProxy's PROXY spec §2.2 asks for the header at once). It is counted in the bytes sent to the backend.
pub async fn connect(
    backend: &BackendAddress,
    timeout: Duration,
    counters: Arc<ByteCounters>,
    preamble: &[u8],
) -> Result<BackendStream, ConnectError> {
    let name = backend.to_string();
    let attempt = async {
        let addrs: Vec<_> = tokio::net::lookup_host((backend.host.as_str(), backend.port))
            .await
            .map_err(|source| ConnectError::Resolve {
                backend: name.clone(),
                source,
            })?
            .collect();
        let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
        let mut connected = None;
        for addr in addrs {
            match TcpStream::connect(addr).await {
                Ok(stream) => {
                    connected = Some(stream);
                    break;
                }
                Err(e) => last = e,
            }
        }
        let Some(mut stream) = connected else {
            return Err(ConnectError::Connect {
                backend: name.clone(),
                source: last,
            });
        };
        // Mail protocols are chatty request/response exchanges: do not let Nagle delay replies
        // (nor hold back the PROXY header).
        let _ = stream.set_nodelay(true);
        if !preamble.is_empty() {
            stream
                .write_all(preamble)
                .await
                .map_err(|source| ConnectError::ProxyHeader {
                    backend: name.clone(),
                    source,
                })?;
            counters
                .to_backend
                .fetch_add(preamble.len() as u64, Ordering::Relaxed);
        }
        Ok(stream)
    };
    let stream =
        tokio::time::timeout(timeout, attempt)
            .await
            .map_err(|_| ConnectError::Timeout {
                backend: name.clone(),
                timeout,
            })??;
    Ok(BackendStream {
        inner: stream,
        counters,
    })
}
