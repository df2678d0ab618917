//! One admitted client connection, from the first byte to the close log line: the implicit TLS
//! handshake where the listener asks for it, the listener's capability probe while what its
//! sessions show before login is unknown ([`crate::probe`]), then the protocol's driver. This
//! is the server layer's hand-off to the drivers, so dependencies point one way: server →
//! admission → connection → drivers (smtp, imap, pop3 through prelogin) → session, backend,
//! relay, tls.

use tokio::net::TcpStream;

use crate::config::{Protocol, TlsMode};
use crate::session::{ClientStream, EndReason, Session};
use crate::transport::Transport;

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
        listener = %session.listener().config.name,
        protocol = %session.protocol(),
        client = %session.client_addr(),
        session_id = %session.id(),
    );
    serve_in_span(io, session).instrument(span).await;
}

async fn serve_in_span<S: Transport>(io: S, mut session: Session) {
    let listener = session.listener().clone();
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
                () = session.draining().cancelled() => {
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

/// Hands the session to its protocol's driver, once its listener knows what to show before
/// login (or its probe failed).
async fn protocol_session<S: Transport>(
    client: ClientStream<S>,
    session: &mut Session,
) -> EndReason {
    // No session connects before a command needs the backend, on any listener (issue 22): what
    // a session shows before login is learned by the capability probe while it is unknown, one
    // per listener at a time. Only after a failed probe do the machines' fallbacks apply: a
    // session of a listener that does not route by user connects early and learns from its
    // own backend; a routed one answers from the built-in lists.
    Box::pin(crate::probe::ensure_learned(session.listener())).await;
    // Each driver boxed: a future is as large as its largest variant, so unboxed an idle IMAP
    // session would carry the SMTP driver's state too.
    match session.protocol() {
        Protocol::Smtp => Box::pin(crate::smtp::session::serve(client, session)).await,
        Protocol::Imap => Box::pin(crate::imap::session::serve(client, session)).await,
        Protocol::Pop3 => Box::pin(crate::pop3::session::serve(client, session)).await,
    }
}
