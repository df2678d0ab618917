//! Connecting to a backend, and a stream that counts the bytes each way for logs and metrics.
//!
//! How the backend is reached is a [`BackendConnector`]: in production a [`Pool`] (several
//! addresses, health, SNI routes, TLS to the backend: see [`pool`]); in tests, one end of an
//! in-memory pipe per connect ([`DuplexConnector`]) or any scripted [`Connect`], so the drivers
//! can be tested without sockets and with paused time.
//!
//! - [`pool`]: addresses, selection, resolution, passive and active health;
//! - [`health`]: back-off and the order addresses are tried in (pure);
//! - [`dialogue`]: greetings and the backend STARTTLS exchange (pure);
//! - [`tls`]: the rustls client of `backend_tls`.

pub mod dialogue;
pub mod health;
pub mod pool;
pub mod tls;

pub use pool::Pool;

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, DuplexStream, ReadBuf};
use tokio::sync::mpsc;

use crate::routing::Target;
use crate::transport::Transport;

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
    #[error("backend {backend}: {attempts} attempt(s) failed, the last: {last}")]
    Unavailable {
        backend: String,
        attempts: usize,
        last: String,
    },
}

/// Relayed octets reach the listener's `mailfront_relayed_bytes_total` as they flow, batched:
/// whenever one direction has this many unreported (one atomic load per read or write to
/// check), on the relay's idle check, and the rest at close. A day-long IMAP IDLE session is
/// seen while it lasts, without a metric update per packet.
pub const REPORT_EVERY: u64 = 64 * 1024;

/// Bytes moved to and from the backend, shared between a session and whoever reports on it.
#[derive(Debug, Default)]
pub struct ByteCounters {
    to_backend: AtomicU64,
    to_client: AtomicU64,
    /// How much of each the counters below have been told.
    reported_to_backend: AtomicU64,
    reported_to_client: AtomicU64,
    /// The listener's counters (client_to_backend, backend_to_client); none in unit tests.
    sinks: Option<(prometheus::IntCounter, prometheus::IntCounter)>,
}

impl ByteCounters {
    /// Counters that report to these metric counters ([`ByteCounters::report`]).
    pub fn reporting(
        to_backend: prometheus::IntCounter,
        to_client: prometheus::IntCounter,
    ) -> ByteCounters {
        ByteCounters {
            sinks: Some((to_backend, to_client)),
            ..ByteCounters::default()
        }
    }

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

    fn add_to_backend(&self, n: u64) {
        let total = self
            .to_backend
            .fetch_add(n, Ordering::Relaxed)
            .wrapping_add(n);
        if total.saturating_sub(self.reported_to_backend.load(Ordering::Relaxed)) >= REPORT_EVERY {
            self.report();
        }
    }

    fn add_to_client(&self, n: u64) {
        let total = self
            .to_client
            .fetch_add(n, Ordering::Relaxed)
            .wrapping_add(n);
        if total.saturating_sub(self.reported_to_client.load(Ordering::Relaxed)) >= REPORT_EVERY {
            self.report();
        }
    }

    /// Adds what moved since the last report to the metric counters. Safe from any number of
    /// places at once: each octet is reported once (`fetch_max` on the reported mark).
    pub fn report(&self) {
        let Some((to_backend, to_client)) = &self.sinks else {
            return;
        };
        for (counted, reported, sink) in [
            (&self.to_backend, &self.reported_to_backend, to_backend),
            (&self.to_client, &self.reported_to_client, to_client),
        ] {
            let now = counted.load(Ordering::Relaxed);
            let before = reported.fetch_max(now, Ordering::Relaxed);
            if now > before {
                sink.inc_by(now - before);
            }
        }
    }
}

/// A connection being opened by a [`Connect`].
pub type Connecting<'a> = Pin<Box<dyn Future<Output = io::Result<Box<dyn Transport>>> + Send + 'a>>;

/// A way to reach the backend other than TCP: in tests, an in-memory pipe or a scripted mock.
/// The deadline, the PROXY header and the byte counting stay with [`connect`].
pub trait Connect: Send + Sync {
    fn connect(&self) -> Connecting<'_>;
}

/// How a listener reaches its backend.
#[derive(Clone)]
pub enum BackendConnector {
    /// Production: the listener's backends.
    Pool(Arc<Pool>),
    /// Anything else (tests): see [`DuplexConnector`].
    Custom(Arc<dyn Connect>),
}

impl BackendConnector {
    /// Test support: a connector whose every connect makes a [`tokio::io::duplex`] pair of
    /// `buffer` octets, keeps one end and hands the other to the returned receiver, where a
    /// test plays the backend. Dropping the receiver makes later connects fail (connection
    /// refused), as an unreachable backend would.
    pub fn duplex(buffer: usize) -> (BackendConnector, mpsc::UnboundedReceiver<DuplexStream>) {
        let (peer, backends) = mpsc::unbounded_channel();
        let connector = DuplexConnector { buffer, peer };
        (BackendConnector::Custom(Arc::new(connector)), backends)
    }
}

impl fmt::Display for BackendConnector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackendConnector::Pool(pool) => pool.backends().fmt(f),
            BackendConnector::Custom(_) => f.write_str("in-memory"),
        }
    }
}

impl fmt::Debug for BackendConnector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackendConnector::Pool(pool) => f.debug_tuple("Pool").field(&pool.backends()).finish(),
            BackendConnector::Custom(_) => f.write_str("Custom"),
        }
    }
}

/// Test support: see [`BackendConnector::duplex`].
pub struct DuplexConnector {
    buffer: usize,
    peer: mpsc::UnboundedSender<DuplexStream>,
}

impl Connect for DuplexConnector {
    fn connect(&self) -> Connecting<'_> {
        Box::pin(async move {
            let (ours, theirs) = tokio::io::duplex(self.buffer);
            self.peer.send(theirs).map_err(|_| {
                io::Error::new(io::ErrorKind::ConnectionRefused, "no in-memory backend")
            })?;
            Ok(Box::new(ours) as Box<dyn Transport>)
        })
    }
}

/// A connection to the backend that counts what it reads (bound for the client) and writes
/// (from the client, or written by us on its behalf).
///
/// The pool reads the backend's greeting before handing the stream over; those bytes are served
/// first, so the driver reads the greeting as if fresh.
pub struct BackendStream {
    inner: Box<dyn Transport>,
    counters: Arc<ByteCounters>,
    replay: Vec<u8>,
    replayed: usize,
    /// The session's place in the pool's least-connections count, released on drop.
    lease: Option<pool::Lease>,
}

impl fmt::Debug for BackendStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackendStream")
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

impl BackendStream {
    /// The backend address this stream is connected to, when a pool chose it.
    pub fn peer(&self) -> Option<std::net::SocketAddr> {
        self.lease.as_ref().map(pool::Lease::addr)
    }

    fn new(
        inner: Box<dyn Transport>,
        counters: Arc<ByteCounters>,
        replay: Vec<u8>,
        lease: Option<pool::Lease>,
    ) -> BackendStream {
        BackendStream {
            inner,
            counters,
            replay,
            replayed: 0,
            lease,
        }
    }
}

impl AsyncRead for BackendStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(rest) = this.replay.get(this.replayed..)
            && !rest.is_empty()
            && buf.remaining() > 0
        {
            let n = rest.len().min(buf.remaining());
            buf.put_slice(rest.get(..n).unwrap_or_default());
            this.replayed += n;
            this.counters.add_to_client(n as u64);
            if this.replayed >= this.replay.len() {
                this.replay = Vec::new();
                this.replayed = 0;
            }
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let poll = Pin::new(&mut this.inner).poll_read(cx, buf);
        let read = buf.filled().len().saturating_sub(before);
        this.counters.add_to_client(read as u64);
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
            this.counters.add_to_backend(*n as u64);
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
            this.counters.add_to_backend(*n as u64);
        }
        poll
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Connects to the backend for a session whose client sent `sni`, writing `preamble` (the PROXY
/// protocol header, or nothing) before anything else. A [`Pool`] bounds each attempt by
/// `timeout` itself and steps over failed addresses; a [`Connect`] gets one attempt within
/// `timeout`.
///
/// The preamble is written in one call on a fresh connection (a few hundred bytes always fit the
/// send buffer), so the receiver never sees a partial header (the PROXY protocol specification
/// asks senders to send the header at once). It is counted in the bytes sent to the backend.
pub async fn connect(
    connector: &BackendConnector,
    timeout: Duration,
    counters: Arc<ByteCounters>,
    preamble: &[u8],
    sni: Option<&str>,
) -> Result<BackendStream, ConnectError> {
    connect_to(connector, timeout, counters, preamble, sni, &Target::Pool).await
}

/// As [`connect`], for a login routed to `target` ([`crate::routing::Router::route`]): a
/// [`Pool`] connects as [`Pool::connect_to`] says; a [`Connect`] (tests) has one way to the
/// backend whatever the target, so every target uses it.
pub async fn connect_to(
    connector: &BackendConnector,
    timeout: Duration,
    counters: Arc<ByteCounters>,
    preamble: &[u8],
    sni: Option<&str>,
    target: &Target,
) -> Result<BackendStream, ConnectError> {
    let custom = match connector {
        BackendConnector::Pool(pool) => {
            return pool.connect_to(target, sni, counters, preamble).await;
        }
        BackendConnector::Custom(custom) => custom,
    };
    let name = connector.to_string();
    let attempt = async {
        let mut stream = custom
            .connect()
            .await
            .map_err(|source| ConnectError::Connect {
                backend: name.clone(),
                source,
            })?;
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
    Ok(BackendStream::new(stream, counters, Vec::new(), None))
}

#[cfg(test)]
mod tests {

    /// Relayed octets reach the metric in batches of `REPORT_EVERY` while they flow, the rest
    /// when reported (the relay's idle check, the close), each octet once.
    #[test]
    fn bytes_are_reported_as_they_flow_in_batches_and_once() {
        let up = prometheus::IntCounter::new("up", "up").unwrap();
        let down = prometheus::IntCounter::new("down", "down").unwrap();
        let counters = ByteCounters::reporting(up.clone(), down.clone());
        counters.add_to_backend(REPORT_EVERY - 1);
        counters.add_to_client(10);
        assert_eq!((up.get(), down.get()), (0, 0));
        counters.add_to_backend(1);
        assert_eq!((up.get(), down.get()), (REPORT_EVERY, 10));
        counters.add_to_backend(5);
        counters.report();
        counters.report();
        assert_eq!((up.get(), down.get()), (REPORT_EVERY + 5, 10));
        assert_eq!(counters.to_backend(), REPORT_EVERY + 5);
    }
    use tokio::io::AsyncReadExt;

    use super::*;

    #[tokio::test]
    async fn the_greeting_the_pool_read_comes_first_and_is_counted_once() {
        let (ours, mut theirs) = tokio::io::duplex(64);
        let counters = Arc::new(ByteCounters::default());
        let mut stream = BackendStream::new(
            Box::new(ours),
            counters.clone(),
            b"* OK hi\r\n".to_vec(),
            None,
        );
        theirs.write_all(b"* BYE\r\n").await.unwrap();
        drop(theirs);
        let mut small = [0u8; 4];
        assert_eq!(stream.read(&mut small).await.unwrap(), 4);
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).await.unwrap();
        assert_eq!([&small[..], &rest].concat(), b"* OK hi\r\n* BYE\r\n");
        assert_eq!(counters.to_client(), 16);
    }

    #[tokio::test]
    async fn a_custom_connector_serves_every_target() {
        let (connector, mut backends) = BackendConnector::duplex(64);
        let target = Target::Fixed {
            backends: vec![crate::config::BackendAddress {
                host: "10.0.0.9".into(),
                port: 143,
            }],
            source: crate::routing::Source::Lookup,
        };
        for target in [
            target,
            Target::Affinity {
                key: "alice".into(),
            },
            Target::Pool,
        ] {
            let counters = Arc::new(ByteCounters::default());
            let mut stream = connect_to(
                &connector,
                Duration::from_secs(1),
                counters.clone(),
                b"PROXY",
                None,
                &target,
            )
            .await
            .unwrap();
            let mut peer = backends.recv().await.unwrap();
            let mut got = [0u8; 5];
            peer.read_exact(&mut got).await.unwrap();
            assert_eq!(&got, b"PROXY");
            assert_eq!(counters.to_backend(), 5);
            stream.write_all(b"x").await.unwrap();
        }
    }
}
