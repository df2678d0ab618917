//! The plain byte relay used once no more parsing is needed (IMAP/POP3 after authentication).

use std::io;
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

/// Copy buffer per direction: tokio's default is 8 KiB; 16 KiB matches a full TLS record
/// (RFC 8446 §5.1), so one record's plaintext moves in one write.
const RELAY_BUFFER: usize = 16 * 1024;
/// The idle timeout is checked this many times per period, so a session is closed at most a
/// quarter period late, without a timer reset per byte.
const IDLE_CHECKS_PER_PERIOD: u32 = 4;
/// Floor for the check interval, so a tiny configured timeout cannot make the loop spin.
const MIN_IDLE_TICK: Duration = Duration::from_millis(10);

/// Copies bytes both ways until both sides close, an error, or `idle` passes with no byte moved.
///
/// tokio's `copy_bidirectional` does the copying (half-close aware, no per-byte work); the
/// counters the backend stream keeps drive the idle check, so the hot path stays untouched.
/// It reports one error for both streams, so each stream is wrapped to name its side in the
/// error it returns.
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
    let copy = tokio::io::copy_bidirectional_with_sizes(
        &mut client,
        &mut backend,
        RELAY_BUFFER,
        RELAY_BUFFER,
    );
    tokio::pin!(copy);
    let tick = (idle / IDLE_CHECKS_PER_PERIOD).max(MIN_IDLE_TICK);
    let mut last_total = counters.total();
    let mut quiet = Duration::ZERO;
    loop {
        tokio::select! {
            result = &mut copy => {
                return match result {
                    Ok(_) => RelayEnd::Closed,
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
