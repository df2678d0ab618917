//! The plain byte relay used once no more parsing is needed (IMAP/POP3 after authentication).

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};

use crate::backend::ByteCounters;

/// How a relay ended.
#[derive(Debug)]
pub enum RelayEnd {
    /// Both sides closed their write halves, in order.
    Closed,
    /// Nothing moved either way for the idle limit.
    Idle,
    /// A read or write failed; the string says which.
    Error(std::io::Error),
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
    let copy =
        tokio::io::copy_bidirectional_with_sizes(client, backend, RELAY_BUFFER, RELAY_BUFFER);
    tokio::pin!(copy);
    let tick = (idle / IDLE_CHECKS_PER_PERIOD).max(MIN_IDLE_TICK);
    let mut last_total = counters.total();
    let mut quiet = Duration::ZERO;
    loop {
        tokio::select! {
            result = &mut copy => {
                return match result {
                    Ok(_) => RelayEnd::Closed,
                    Err(e) => RelayEnd::Error(e),
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
