//! The capability probe: what a listener's sessions show their clients before login, learned
//! from one of its backends without a client.
//!
//! No session connects to a backend before a command needs one (issue "The backend chosen by
//! the user who logs in": sessions that never log in cost no backend connection, on any
//! listener). A session with TLS up therefore greets and answers CAPABILITY, EHLO or CAPA itself,
//! from what its listener's [`Learned`](crate::session::Learned) holds. While that holds nothing
//! for the listener's protocol (after a start or a reload), the session, before its machine is
//! built, runs this probe: one connection to the listener's pool, as any session's (backend TLS,
//! STARTTLS and the PROXY header included; the PROXY header is a `LOCAL` one, RFC: haproxy
//! proxy-protocol §2.2, since no client is behind it), the greeting, then `CAPABILITY` (IMAP,
//! RFC 9051 §6.1.1), `EHLO` (SMTP, RFC 5321 §4.1.1.1) or `CAPA` (POP3, RFC 2449 §5), and the
//! protocol's goodbye. One probe at a time per listener: sessions that arrive meanwhile wait for
//! its answer instead of probing too, so a burst after a start costs the backend one connection.
//!
//! What it learns is what the machines learn from a live session ([`Notice::BackendEhlo`],
//! …), in the same raw form. A probe that fails leaves nothing learned until a probe
//! [`RETRY_AFTER_FAILURE`] later succeeds, and what one learned is asked again in the background
//! every [`REFRESH_EVERY`] (a refresh that fails keeps it). Meanwhile sessions fall back on what the machines do
//! with nothing learned:
//! - on a listener that routes by user (`user_affinity`, `user_map`, `user_lookup`), which
//!   connects only with a login's name in hand, they answer from the machines' built-in lists
//!   (what any backend of the protocol honours);
//! - on any other listener, a session connects early (IMAP as soon as TLS is up, SMTP at EHLO,
//!   POP3 at CAPA) so that what its client is offered is what a backend said, and what it sees
//!   teaches the listener.
//!
//! [`Notice::BackendEhlo`]: crate::machine::Notice::BackendEhlo

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use crate::backend::{self, BackendStream, ByteCounters};
use crate::config::Protocol;
use crate::session::ListenerContext;

/// The most a probe reads from a backend: a greeting and a capability list are a few hundred
/// octets; a backend that sends more is not answering the question.
const MAX_PROBE_READ: usize = 64 * 1024;

/// After a failed probe, sessions go on with nothing learned for this long before one probes
/// again.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(5);

/// What a probe learned is asked again this often (in the background, by the first session
/// after it is due).
pub const REFRESH_EVERY: Duration = Duration::from_secs(300);

/// The longest a probe waits for the backend's answer to its goodbye.
const GOODBYE_TIMEOUT: Duration = Duration::from_secs(1);

/// The longest a probe waits for the backend's replies, once connected.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a probe learned nothing.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error(transparent)]
    Connect(#[from] backend::ConnectError),
    #[error("backend i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("backend did not answer within {0:?}")]
    Timeout(Duration),
    #[error("backend answered more than {MAX_PROBE_READ} octets")]
    TooLong,
    #[error("backend refused: {0}")]
    Refused(String),
}

/// Makes sure `listener` knows its backend's pre-login capabilities for its protocol, probing
/// a backend when it does not; returns whether they are known afterwards. Sessions that call
/// this while a probe runs wait for it and do not probe again. What a probe learned is asked
/// again every [`REFRESH_EVERY`], in the background: a session never waits for a refresh.
pub async fn ensure_learned(listener: &Arc<ListenerContext>) -> bool {
    let protocol = listener.config.protocol;
    if listener.learned.knows(protocol) {
        refresh_if_stale(listener);
        return true;
    }
    let mut state = listener.learned.probing.lock().await;
    if listener.learned.knows(protocol) {
        return true;
    }
    // Sessions that waited for a probe that just failed do not each try again in turn (behind
    // a black-holed backend, one after another, each for the whole connect timeout): they go
    // on with nothing learned until the retry interval is over.
    let started = Instant::now();
    if state
        .last_failure
        .is_some_and(|at| started.duration_since(at) < RETRY_AFTER_FAILURE)
    {
        return false;
    }
    run_probe(listener, &mut state).await
}

/// Starts a background probe when the last successful one is [`REFRESH_EVERY`] old and none
/// runs: a backend upgraded meanwhile (a mechanism added or removed) is what later sessions
/// show. A refresh that fails keeps what was learned.
fn refresh_if_stale(listener: &Arc<ListenerContext>) {
    let Ok(state) = listener.learned.probing.try_lock() else {
        return;
    };
    if !state.is_stale(Instant::now()) {
        return;
    }
    drop(state);
    let listener = listener.clone();
    tokio::spawn(async move {
        let mut state = listener.learned.probing.lock().await;
        // Another session's refresh may have run meanwhile.
        if state.is_stale(Instant::now()) {
            run_probe(&listener, &mut state).await;
        }
    });
}

/// One probe under the listener's probe lock, its outcome logged and kept in `state`.
async fn run_probe(listener: &ListenerContext, state: &mut ProbeState) -> bool {
    let started = Instant::now();
    match probe(listener).await {
        Ok(()) => {
            state.last_failure = None;
            state.last_success = Some(Instant::now());
            tracing::info!(
                took_ms = started.elapsed().as_millis() as u64,
                "learned the backend's pre-login capabilities"
            );
            true
        }
        Err(e) => {
            state.last_failure = Some(Instant::now());
            tracing::warn!(error = %e, known = listener.learned.knows(listener.config.protocol), "capability probe failed");
            false
        }
    }
}

/// When the listener's probes last succeeded and failed (inside its probe lock).
#[derive(Debug, Default)]
pub struct ProbeState {
    last_success: Option<Instant>,
    last_failure: Option<Instant>,
}

impl ProbeState {
    /// Whether what the last successful probe learned is due to be asked again (never when
    /// nothing was learned by a probe: a session then probes in the foreground); a failed
    /// refresh waits [`RETRY_AFTER_FAILURE`] before the next, as a failed first probe does.
    fn is_stale(&self, now: Instant) -> bool {
        self.last_success
            .is_some_and(|at| now.duration_since(at) >= REFRESH_EVERY)
            && self
                .last_failure
                .is_none_or(|at| now.duration_since(at) >= RETRY_AFTER_FAILURE)
    }
}

/// One probe: connect, greeting, the capability request, goodbye; what was learned goes into
/// the listener's [`Learned`](crate::session::Learned).
async fn probe(listener: &ListenerContext) -> Result<(), ProbeError> {
    let preamble = if listener.config.backend_proxy_protocol {
        crate::proxy_protocol::local_header()
    } else {
        Vec::new()
    };
    let mut stream = backend::connect(
        &listener.backend,
        listener.timeouts.backend_connect,
        Arc::new(ByteCounters::default()),
        &preamble,
        None,
    )
    .await?;
    let exchange = async {
        let mut reader = Reader::default();
        let protocol = listener.config.protocol;
        let greeting = reader.reply(&mut stream, protocol, None).await?;
        if !crate::backend::dialogue::greeting_is_positive(protocol, &greeting) {
            return Err(ProbeError::Refused(first_line(&greeting)));
        }
        let request: Vec<u8> = match protocol {
            Protocol::Imap => b"P1 CAPABILITY\r\n".to_vec(),
            Protocol::Pop3 => b"CAPA\r\n".to_vec(),
            Protocol::Smtp => format!("EHLO {}\r\n", listener.hostname).into_bytes(),
        };
        stream.write_all(&request).await?;
        let answer = reader.reply(&mut stream, protocol, Some(b"P1")).await?;
        learn(listener, protocol, &answer)?;
        let goodbye: &[u8] = match protocol {
            Protocol::Imap => b"P2 LOGOUT\r\n",
            Protocol::Pop3 | Protocol::Smtp => b"QUIT\r\n",
        };
        // Best effort, and short: the answer is in hand, and sessions that queued behind the
        // probe wait for this too.
        let _ = tokio::time::timeout(GOODBYE_TIMEOUT, async {
            stream.write_all(goodbye).await?;
            reader.reply(&mut stream, protocol, Some(b"P2")).await
        })
        .await;
        Ok(())
    };
    let result = tokio::time::timeout(REPLY_TIMEOUT, exchange)
        .await
        .map_err(|_| ProbeError::Timeout(REPLY_TIMEOUT))?;
    let _ = stream.shutdown().await;
    result
}

/// Stores what `answer` says in the listener's `Learned`.
fn learn(listener: &ListenerContext, protocol: Protocol, answer: &[u8]) -> Result<(), ProbeError> {
    match protocol {
        Protocol::Imap => {
            // The untagged CAPABILITY line (RFC 9051 §7.2.2) among the answer's lines.
            let list = answer
                .split_inclusive(|&b| b == b'\n')
                .find_map(|line| {
                    crate::imap::capability::capabilities(line).map(|tokens| tokens.join(&b' '))
                })
                .ok_or_else(|| ProbeError::Refused(first_line(answer)))?;
            listener.learned.set_imap_capability(list);
        }
        Protocol::Pop3 => {
            if !answer.starts_with(b"+OK") {
                return Err(ProbeError::Refused(first_line(answer)));
            }
            listener.learned.set_pop3_capa(answer.to_vec());
        }
        Protocol::Smtp => {
            if !answer.starts_with(b"250") {
                return Err(ProbeError::Refused(first_line(answer)));
            }
            listener.learned.set_ehlo(answer.to_vec());
        }
    }
    Ok(())
}

/// A reply's first line, printable, for a log line.
fn first_line(reply: &[u8]) -> String {
    let line = reply.split(|&b| b == b'\n').next().unwrap_or_default();
    String::from_utf8_lossy(line)
        .chars()
        .filter(|c| !c.is_control())
        .take(200)
        .collect()
}

/// Reads whole replies from the backend, bounded by [`MAX_PROBE_READ`].
#[derive(Default)]
struct Reader {
    buf: Vec<u8>,
}

impl Reader {
    /// The next complete reply: IMAP up to the line tagged `tag` (or the greeting's one line
    /// when `tag` is `None`), POP3 one status line or, for CAPA, the multi-line answer up to
    /// its `.` line (RFC 2449 §5), SMTP up to the line whose code is followed by a space
    /// (RFC 5321 §4.2.1).
    async fn reply(
        &mut self,
        stream: &mut BackendStream,
        protocol: Protocol,
        tag: Option<&[u8]>,
    ) -> Result<Vec<u8>, ProbeError> {
        loop {
            if let Some(end) = complete(&self.buf, protocol, tag) {
                let reply = self.buf.drain(..end).collect();
                return Ok(reply);
            }
            if self.buf.len() >= MAX_PROBE_READ {
                return Err(ProbeError::TooLong);
            }
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(ProbeError::Io(std::io::ErrorKind::UnexpectedEof.into()));
            }
            self.buf
                .extend_from_slice(chunk.get(..n).unwrap_or_default());
        }
    }
}

/// Where the reply that starts `buf` ends, if it is complete.
fn complete(buf: &[u8], protocol: Protocol, tag: Option<&[u8]>) -> Option<usize> {
    let mut offset = 0;
    for line in buf.split_inclusive(|&b| b == b'\n') {
        if !line.ends_with(b"\n") {
            return None;
        }
        offset += line.len();
        let done = match (protocol, tag) {
            (Protocol::Imap, None) => true,
            (Protocol::Imap, Some(tag)) => line
                .strip_prefix(tag)
                .is_some_and(|rest| rest.first() == Some(&b' ')),
            (Protocol::Pop3, None) => true,
            // A CAPA answer: `-ERR` ends at once, `+OK` at the `.` line.
            (Protocol::Pop3, Some(_)) => {
                offset == line.len() && line.starts_with(b"-")
                    || (offset > line.len() && (line == b".\r\n" || line == b".\n"))
            }
            (Protocol::Smtp, _) => line.get(3) != Some(&b'-'),
        };
        if done {
            return Some(offset);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_end_where_each_protocol_says() {
        let imap = b"* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\nP1 OK done\r\nrest";
        assert_eq!(
            complete(imap, Protocol::Imap, Some(b"P1")),
            Some(imap.len() - 4)
        );
        assert_eq!(complete(b"* OK hi\r\n", Protocol::Imap, None), Some(9));
        assert_eq!(
            complete(b"* CAPABILITY X\r\nP1", Protocol::Imap, Some(b"P1")),
            None
        );
        // A line that merely starts like the tag is not the tagged one.
        assert_eq!(complete(b"P10 OK\r\n", Protocol::Imap, Some(b"P1")), None);
        let capa = b"+OK\r\nUSER\r\nSASL PLAIN\r\n.\r\n";
        assert_eq!(complete(capa, Protocol::Pop3, Some(b"")), Some(capa.len()));
        assert_eq!(
            complete(b"+OK\r\nUSER\r\n", Protocol::Pop3, Some(b"")),
            None
        );
        assert_eq!(complete(b"-ERR no\r\n", Protocol::Pop3, Some(b"")), Some(9));
        assert_eq!(complete(b"+OK ready\r\n", Protocol::Pop3, None), Some(11));
        let ehlo = b"250-mx\r\n250-PIPELINING\r\n250 AUTH PLAIN\r\n";
        assert_eq!(complete(ehlo, Protocol::Smtp, None), Some(ehlo.len()));
        assert_eq!(complete(b"250-mx\r\n250-PIPE", Protocol::Smtp, None), None);
    }
}
