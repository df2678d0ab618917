//! The plain byte relay used once no more parsing is needed (IMAP/POP3 after authentication).

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::backend::ByteCounters;
use crate::close::Side;

/// How a relay ended.
#[derive(Debug)]
pub enum RelayEnd {
    /// Both sides closed their write halves, in order.
    Closed,
    /// Nothing moved either way for the idle limit.
    Idle,
    /// A read or write on `side` failed.
    Error { side: Side, error: io::Error },
}

/// Octets moved per read: 16 KiB matches a full TLS record (RFC 8446 §5.1), so one record's
/// plaintext moves in one write. The buffer lives on the stack for the duration of one poll;
/// a session keeps heap bytes only for what a slow writer has not taken yet.
const RELAY_BUFFER: usize = 16 * 1024;
/// The idle timeout is checked this many times per period, so a session is closed at most a
/// quarter period late, without a timer reset per byte.
const IDLE_CHECKS_PER_PERIOD: u32 = 4;
/// Floor for the check interval, so a tiny configured timeout cannot make the loop spin.
const MIN_IDLE_TICK: Duration = Duration::from_millis(10);

/// Copies bytes both ways until both sides close, an error, or `idle` passes with no byte moved.
///
/// Unlike tokio's `copy_bidirectional`, which keeps a buffer per direction for the whole
/// session, an idle session here holds no buffer: each read goes into a stack buffer and is
/// written straight on; only bytes the writer could not take yet are kept, on the heap, until
/// it takes them (see [`Pump`]). Half-closes pass through as in tokio's copy. The counters the
/// backend stream keeps drive the idle check, so the hot path stays untouched. Each stream is
/// wrapped to name its side in the error it returns.
pub async fn relay<C, B>(
    client: &mut C,
    backend: &mut B,
    counters: &Arc<ByteCounters>,
    idle: Duration,
) -> RelayEnd
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let client_eof = AtomicBool::new(false);
    let backend_eof = AtomicBool::new(false);
    let mut client = Sided {
        inner: client,
        side: Side::Client,
        eof: &client_eof,
    };
    let mut backend = Sided {
        inner: backend,
        side: Side::Backend,
        eof: &backend_eof,
    };
    let mut to_backend = Pump::default();
    let mut to_client = Pump::default();
    let copy = std::future::poll_fn(|cx| {
        let up = to_backend.poll(cx, &mut client, &mut backend)?;
        let down = to_client.poll(cx, &mut backend, &mut client)?;
        if up.is_ready() && down.is_ready() {
            Poll::Ready(Ok::<(), io::Error>(()))
        } else {
            Poll::Pending
        }
    });
    tokio::pin!(copy);
    let tick = (idle / IDLE_CHECKS_PER_PERIOD).max(MIN_IDLE_TICK);
    let mut last_total = counters.total();
    let mut quiet = Duration::ZERO;
    loop {
        tokio::select! {
            result = &mut copy => {
                return match result {
                    Ok(()) => RelayEnd::Closed,
                    Err(error) => {
                        let (side, error) = SideError::split(error);
                        if side == Side::Client && backend_eof.load(Ordering::Relaxed) {
                            // The backend had ended the session (its goodbye to LOGOUT/QUIT went
                            // out); a client that then resets rather than closes ends normally.
                            RelayEnd::Closed
                        } else {
                            RelayEnd::Error { side, error }
                        }
                    }
                };
            }
            () = tokio::time::sleep(tick) => {
                // Bytes reach the metric while the session lasts (see `REPORT_EVERY`).
                counters.report();
                let total = counters.total();
                if total == last_total {
                    quiet += tick;
                    if quiet >= idle {
                        return RelayEnd::Idle;
                    }
                } else {
                    last_total = total;
                    quiet = Duration::ZERO;
                }
            }
        }
    }
}

/// One direction of the relay: read, write straight on, keep only what the writer refused.
#[derive(Debug, Default)]
struct Pump {
    /// Read but not yet written; empty (no allocation) whenever the writer keeps up.
    unsent: Vec<u8>,
    /// How much of `unsent` is written.
    sent: usize,
    /// The reader reached its end: once `unsent` is written, shut the writer down.
    read_done: bool,
    /// Written since the last flush (TLS keeps records until flushed).
    need_flush: bool,
    /// The writer is shut down: this direction is over.
    done: bool,
}

impl Pump {
    /// Moves what is ready; `Ready` once the reader ended and the writer is shut down.
    fn poll<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut R,
        writer: &mut W,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + Unpin + ?Sized,
        W: AsyncWrite + Unpin + ?Sized,
    {
        if self.done {
            return Poll::Ready(Ok(()));
        }
        loop {
            while let Some(rest) = self.unsent.get(self.sent..).filter(|r| !r.is_empty()) {
                match Pin::new(&mut *writer).poll_write(cx, rest) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Poll::Ready(Ok(n)) => {
                        self.sent += n;
                        self.need_flush = true;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => return Poll::Pending,
                }
            }
            if !self.unsent.is_empty() {
                // Written: give the memory back rather than keep it for an idle session.
                self.unsent = Vec::new();
                self.sent = 0;
            }
            if self.read_done {
                std::task::ready!(Pin::new(&mut *writer).poll_shutdown(cx))?;
                self.done = true;
                return Poll::Ready(Ok(()));
            }
            let mut stack = [const { MaybeUninit::<u8>::uninit() }; RELAY_BUFFER];
            let mut buf = ReadBuf::uninit(&mut stack);
            match Pin::new(&mut *reader).poll_read(cx, &mut buf) {
                Poll::Pending => {
                    if self.need_flush {
                        std::task::ready!(Pin::new(&mut *writer).poll_flush(cx))?;
                        self.need_flush = false;
                    }
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {}
            }
            let read = buf.filled();
            if read.is_empty() {
                self.read_done = true;
                continue;
            }
            let mut written = 0;
            while let Some(rest) = read.get(written..).filter(|r| !r.is_empty()) {
                match Pin::new(&mut *writer).poll_write(cx, rest) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Poll::Ready(Ok(n)) => {
                        written += n;
                        self.need_flush = true;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {
                        // The writer is slow: keep the rest until it is ready again.
                        self.unsent = rest.to_vec();
                        self.sent = 0;
                        return Poll::Pending;
                    }
                }
            }
        }
    }
}

/// An I/O error with the side whose stream returned it.
#[derive(Debug, thiserror::Error)]
#[error("{}: {source}", side.as_str())]
struct SideError {
    side: Side,
    source: io::Error,
}

impl SideError {
    fn wrap(side: Side, source: io::Error) -> io::Error {
        io::Error::new(source.kind(), SideError { side, source })
    }

    /// The side and the original error. Every error the relay sees went through a [`Sided`]
    /// stream; anything else is the client's, the side whose errors are the common case.
    fn split(error: io::Error) -> (Side, io::Error) {
        if error.get_ref().is_some_and(|e| e.is::<SideError>())
            && let Some(inner) = error.into_inner()
            && let Ok(tagged) = inner.downcast::<SideError>()
        {
            return (tagged.side, tagged.source);
        }
        (Side::Client, io::Error::other("relay error"))
    }
}

/// A stream whose errors carry its side; bytes pass untouched. `eof` is set once a read
/// returns end of stream.
struct Sided<'a, T: ?Sized> {
    inner: &'a mut T,
    side: Side,
    eof: &'a AtomicBool,
}

impl<T: ?Sized> Sided<'_, T> {
    fn tag<R>(&self, poll: Poll<io::Result<R>>) -> Poll<io::Result<R>> {
        match poll {
            Poll::Ready(Err(e)) => Poll::Ready(Err(SideError::wrap(self.side, e))),
            other => other,
        }
    }
}

impl<T: AsyncRead + Unpin + ?Sized> AsyncRead for Sided<'_, T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let poll = Pin::new(&mut *this.inner).poll_read(cx, buf);
        if matches!(poll, Poll::Ready(Ok(()))) && buf.filled().len() == before {
            this.eof.store(true, Ordering::Relaxed);
        }
        this.tag(poll)
    }
}

impl<T: AsyncWrite + Unpin + ?Sized> AsyncWrite for Sided<'_, T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut *this.inner).poll_write(cx, buf);
        this.tag(poll)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut *this.inner).poll_flush(cx);
        this.tag(poll)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut *this.inner).poll_shutdown(cx);
        this.tag(poll)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut *this.inner).poll_write_vectored(cx, bufs);
        this.tag(poll)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stream whose every read and write fails with `kind`.
    struct Broken(io::ErrorKind);

    impl AsyncRead for Broken {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Poll::Ready(Err(io::Error::from(self.0)))
        }
    }

    impl AsyncWrite for Broken {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &[u8],
        ) -> Poll<io::Result<usize>> {
            Poll::Ready(Err(io::Error::from(self.0)))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    async fn end_with_broken(broken_side: Side) -> RelayEnd {
        let counters = Arc::new(ByteCounters::default());
        // The healthy side stays open and quiet (its peer lives to the end): the broken one
        // decides how the relay ends.
        let (mut healthy, _peer) = tokio::io::duplex(64);
        let mut broken = Broken(io::ErrorKind::ConnectionReset);
        let idle = Duration::from_secs(60);
        match broken_side {
            Side::Backend => relay(&mut healthy, &mut broken, &counters, idle).await,
            _ => relay(&mut broken, &mut healthy, &counters, idle).await,
        }
    }

    #[tokio::test]
    async fn bytes_pass_both_ways_through_slow_pipes_and_half_closes_pass_through() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let counters = Arc::new(ByteCounters::default());
        // 64-octet pipes: every write is partial, so the relay must keep what it read.
        let (mut client, mut client_peer) = tokio::io::duplex(64);
        let (mut backend, mut backend_peer) = tokio::io::duplex(64);
        let relay = tokio::spawn(async move {
            relay(
                &mut client,
                &mut backend,
                &counters,
                Duration::from_secs(60),
            )
            .await
        });
        let up: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let down: Vec<u8> = up.iter().rev().copied().collect();
        let (sent_up, sent_down) = (up.clone(), down.clone());
        let client_side = tokio::spawn(async move {
            client_peer.write_all(&sent_up).await.unwrap();
            client_peer.shutdown().await.unwrap();
            let mut got = Vec::new();
            client_peer.read_to_end(&mut got).await.unwrap();
            got
        });
        let backend_side = tokio::spawn(async move {
            let mut got = Vec::new();
            // The client's half-close arrives as end of stream, and the other way still works.
            backend_peer.read_to_end(&mut got).await.unwrap();
            backend_peer.write_all(&sent_down).await.unwrap();
            backend_peer.shutdown().await.unwrap();
            got
        });
        assert_eq!(backend_side.await.unwrap(), up);
        assert_eq!(client_side.await.unwrap(), down);
        assert!(matches!(relay.await.unwrap(), RelayEnd::Closed));
    }

    #[tokio::test]
    async fn a_reset_names_the_side_that_reset() {
        for side in [Side::Client, Side::Backend] {
            match end_with_broken(side).await {
                RelayEnd::Error { side: got, error } => {
                    assert_eq!(got, side);
                    assert_eq!(error.kind(), io::ErrorKind::ConnectionReset);
                }
                other => panic!("{other:?}"),
            }
        }
    }
}
