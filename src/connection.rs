//! One accepted client connection, from the first byte to the close log line: the implicit TLS
//! handshake where the listener asks for it, then the protocol's driver. This is the server
//! layer's hand-off to the drivers, so dependencies point one way: server → connection →
//! drivers (smtp, imap, pop3 through prelogin) → session, backend, relay, tls.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::{Protocol, TlsMode};
use crate::metrics::ProxyHeaderResult;
use crate::proxy_header::{Header, HeaderError, HeaderReader};
use crate::session::{ClientStream, EndReason, ListenerContext, Session};
use crate::transport::Transport;

/// Writing the one refusal line: it fits any socket buffer, so only a peer that is gone or
/// hostile makes this wait at all.
const REFUSAL_WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// Closes a connection whose address is at `limits.connections_per_ip`. On a STARTTLS listener
/// the protocol's refusal goes out in cleartext first, in place of the greeting, so a real client
/// reports "try again later" instead of a broken connection. On an implicit-TLS listener the
/// socket just closes (the server does that without calling this): answering would need the TLS
/// handshake, and the limit exists so that a flood from one address costs no handshake CPU.
pub async fn refuse_per_ip(mut tcp: TcpStream, listener: &ListenerContext) {
    if listener.config.tls == TlsMode::Starttls {
        let refusal = match listener.config.protocol {
            Protocol::Smtp => crate::smtp::local_reply::too_many_connections(&listener.hostname),
            Protocol::Imap => crate::imap::reply::bye_too_many_connections(),
            Protocol::Pop3 => crate::pop3::reply::err_too_many_connections(),
        };
        let _ = tokio::time::timeout(REFUSAL_WRITE_TIMEOUT, async {
            tcp.write_all(&refusal).await?;
            tcp.shutdown().await
        })
        .await;
    }
}

/// Why a load balancer's PROXY header was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum ProxyHeaderFailure {
    #[error(transparent)]
    Header(#[from] HeaderError),
    #[error("no complete PROXY protocol header within {0:?}")]
    Timeout(Duration),
    #[error("reading the PROXY protocol header: {0}")]
    Io(std::io::Error),
}

impl ProxyHeaderFailure {
    pub fn result(&self) -> ProxyHeaderResult {
        match self {
            ProxyHeaderFailure::Header(HeaderError::Missing) => ProxyHeaderResult::Missing,
            ProxyHeaderFailure::Header(HeaderError::Malformed(_)) | ProxyHeaderFailure::Io(_) => {
                ProxyHeaderResult::Malformed
            }
            ProxyHeaderFailure::Header(HeaderError::TooLong(_)) => ProxyHeaderResult::TooLong,
            ProxyHeaderFailure::Timeout(_) => ProxyHeaderResult::Timeout,
        }
    }
}

/// Reads a load balancer's PROXY header (`proxy_protocol_from`) within `timeout`
/// (`tls.handshake_timeout`: the header comes before the handshake it delays). Reads only
/// what [`HeaderReader::wanted`] allows, so every octet after the header (the TLS ClientHello,
/// or the client's first command) is left in the socket for the session.
pub async fn read_proxy_header<S: AsyncRead + Unpin>(
    io: &mut S,
    timeout: Duration,
) -> Result<Header, ProxyHeaderFailure> {
    let mut reader = HeaderReader::new();
    let read = async {
        let mut buf = [0u8; 512];
        loop {
            let want = reader.wanted().min(buf.len());
            let Some(slot) = buf.get_mut(..want) else {
                return Err(ProxyHeaderFailure::Header(reader.closed_early()));
            };
            let n = match io.read(slot).await {
                Ok(0) => return Err(ProxyHeaderFailure::Header(reader.closed_early())),
                Ok(n) => n,
                Err(e) => return Err(ProxyHeaderFailure::Io(e)),
            };
            let (_, result) = reader.feed(buf.get(..n).unwrap_or_default());
            if let Some(header) = result? {
                return Ok(header);
            }
        }
    };
    match tokio::time::timeout(timeout, read).await {
        Ok(result) => result,
        Err(_) => Err(ProxyHeaderFailure::Timeout(timeout)),
    }
}

/// Serves one accepted TCP connection from start to close log.
pub async fn serve_connection(tcp: TcpStream, session: Session) {
    // Mail protocols are chatty request/response exchanges: do not let Nagle delay replies.
    let _ = tcp.set_nodelay(true);
    serve_stream(tcp, session).await;
}

/// Serves one client connection over any transport, from start to close log: the implicit TLS
/// handshake where the listener asks for it, then the protocol's driver. Never panics on input:
/// every error ends in an [`EndReason`]. The server calls it through [`serve_connection`];
/// driver tests call it with one end of `tokio::io::duplex`.
///
/// Everything runs inside the session's one tracing span, which carries the listener, the
/// protocol, the client and the session id, so no event inside restates them.
pub async fn serve_stream<S: Transport>(io: S, session: Session) {
    use tracing::Instrument as _;
    let span = tracing::info_span!(
        "session",
        listener = %session.listener.config.name,
        protocol = %session.protocol(),
        client = %session.client_addr,
        session_id = %session.id,
    );
    serve_in_span(io, session).instrument(span).await;
}

async fn serve_in_span<S: Transport>(io: S, mut session: Session) {
    let listener = session.listener.clone();
    let client = match listener.config.tls {
        TlsMode::Starttls => ClientStream::Plain(io),
        // The handshake counts towards `timeouts.login` too (it only matters when that is set
        // below `tls.handshake_timeout`).
        TlsMode::Implicit => {
            // Boxed: the handshake's state is large and lives only while it runs; unboxed it
            // would be part of the session's future, and so of every idle session's memory.
            let handshake = Box::pin(listener.handshaker.accept(io));
            let deadline = session.login_deadline();
            // A client still handshaking has not authenticated: a graceful shutdown ends it at
            // once, as it ends every pre-login session, not after `tls.handshake_timeout`.
            let handshake = tokio::select! {
                result = tokio::time::timeout_at(deadline, handshake) => result,
                () = session.draining.cancelled() => {
                    session.log_close(&EndReason::Shutdown);
                    return;
                }
            };
            match handshake {
                Err(_) => {
                    session.log_close(&EndReason::LoginTimeout);
                    return;
                }
                Ok(Ok((tls, info, took))) => {
                    session.tls_established(info, took, false);
                    ClientStream::Tls(Box::new(tls))
                }
                Ok(Err(e)) => {
                    listener.metrics.handshake_failed(e.reason);
                    tracing::debug!(error = %e, "tls handshake failed");
                    session.log_close(&EndReason::TlsHandshakeFailed(e.detail()));
                    return;
                }
            }
        }
    };
    let reason = protocol_session(client, &mut session).await;
    session.log_close(&reason);
}

/// Hands the session to its protocol's driver.
async fn protocol_session<S: Transport>(
    client: ClientStream<S>,
    session: &mut Session,
) -> EndReason {
    // Each driver boxed: a future is as large as its largest variant, so unboxed an idle IMAP
    // session would carry the SMTP driver's state too.
    match session.protocol() {
        Protocol::Smtp => Box::pin(crate::smtp::session::serve(client, session)).await,
        Protocol::Imap => Box::pin(crate::imap::session::serve(client, session)).await,
        Protocol::Pop3 => Box::pin(crate::pop3::session::serve(client, session)).await,
    }
}
