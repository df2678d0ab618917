//! The IMAP session driver: the I/O shell around [`Prelogin`], then the plain byte relay.
//!
//! The machine decides everything before authentication (see [`crate::imap::prelogin`]); this
//! driver only moves bytes, runs the STARTTLS handshake, connects to the backend when told to,
//! keeps the timers and turns the machine's notices into metrics and logs.
//!
//! On a STARTTLS listener the backend is connected only after the handshake, so nothing a
//! cleartext client sends can reach it, and idle cleartext clients hold no backend connection.
//!
//! Timeouts: while the machine waits for the backend, only backend progress restarts the idle
//! timer; client bytes that are only held do not, so a trickling client cannot keep a silent
//! backend's session alive, and the other way round.

use tokio::io::AsyncReadExt;
use tokio::time::Instant;

use crate::backend::BackendStream;
use crate::imap::command;
use crate::imap::prelogin::{End, Next, Notice, Prelogin, Settings};
use crate::imap::reply;
use crate::metrics::AuthResult;
use crate::session::{ClientStream, EndReason, Session, upgrade_client, write_timed};
use crate::transport::Transport;

/// One read from either side.
const READ_CHUNK: usize = 16 * 1024;

/// Serves one IMAP client connection from the greeting to the close.
pub async fn serve<S: Transport>(client: ClientStream<S>, session: &mut Session) -> EndReason {
    let limits = &session.listener.limits;
    let line = limits.imap_line.max(64);
    let settings = Settings {
        listener: session.listener.config.tls,
        hostname: session.hostname().to_owned(),
        limits: command::Limits {
            line,
            literal: limits.imap_literal,
            command: limits.imap_literal.saturating_add(line),
            sasl_line: command::Limits::default().sasl_line.max(line),
        },
        max_commands: limits.preauth_commands,
    };
    // Client bytes held at most while the machine is not parsing them.
    let hold_limit = line + limits.imap_literal.min(65536) + READ_CHUNK;
    let cipher = session.tls.as_ref().map(|t| t.cipher_name().into_owned());
    let mut machine = Prelogin::new(settings, cipher, fastrand::u64(..));
    let mut client = client;
    let mut backend: Option<BackendStream> = None;
    let idle = session.listener.timeouts.idle;
    let mut deadline = Instant::now() + idle;
    let mut cchunk = vec![0u8; READ_CHUNK];
    let mut bchunk = vec![0u8; READ_CHUNK];
    loop {
        record_notices(&mut machine, session);
        let out = machine.take_to_backend();
        if !out.is_empty()
            && let Some(b) = backend.as_mut()
            && let Err(e) = write_timed(b, &out, session).await
        {
            let _ = write_timed(&mut client, &reply::bye_unavailable(), session).await;
            client.close().await;
            return EndReason::backend_io(&e);
        }
        let out = machine.take_to_client();
        if !out.is_empty()
            && let Err(e) = write_timed(&mut client, &out, session).await
        {
            return EndReason::client_io(&e);
        }
        match machine.next() {
            Next::End(end) => {
                client.close().await;
                return end_reason(end);
            }
            Next::StartTls => {
                match upgrade_client(client, &session.listener, session.client_addr).await {
                    Ok((upgraded, info, took)) => {
                        client = upgraded;
                        let cipher = info.cipher_name().into_owned();
                        session.tls_established(info, took, true);
                        machine.tls_started(cipher);
                        deadline = Instant::now() + idle;
                    }
                    Err(reason) => return reason,
                }
                continue;
            }
            Next::Connect => {
                match session.connect_backend().await {
                    Ok(b) => backend = Some(b),
                    Err(_) => {
                        let _ = write_timed(&mut client, &reply::bye_unavailable(), session).await;
                        client.close().await;
                        return EndReason::BackendUnavailable;
                    }
                }
                machine.backend_connected();
                deadline = Instant::now() + idle;
                continue;
            }
            Next::Authenticated => {
                let Some(mut b) = backend.take() else {
                    client.close().await;
                    return EndReason::BackendClosed;
                };
                let (held_client, held_backend) = machine.held();
                drop(machine);
                return session
                    .relay_after_login(&mut client, &mut b, &held_client, &held_backend)
                    .await;
            }
            Next::Run => {}
        }
        let read_client = machine.wants_client_input(hold_limit);
        let waiting_backend = machine.waiting_for_backend();
        let backend_read = async {
            match backend.as_mut() {
                Some(b) => b.read(&mut bchunk).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = client.read(&mut cchunk), if read_client => match r {
                Ok(0) => {
                    client.close().await;
                    return EndReason::ClientClosed;
                }
                Ok(n) => {
                    let acted = machine.client_input(cchunk.get(..n).unwrap_or_default());
                    if acted || !waiting_backend {
                        deadline = Instant::now() + idle;
                    }
                }
                Err(e) => return EndReason::client_io(&e),
            },
            r = backend_read => match r {
                Ok(0) => machine.backend_closed(),
                Ok(n) => {
                    if machine.backend_input(bchunk.get(..n).unwrap_or_default()) {
                        deadline = Instant::now() + idle;
                    }
                }
                Err(e) => {
                    let _ = write_timed(&mut client, &reply::bye_unavailable(), session).await;
                    client.close().await;
                    return EndReason::backend_io(&e);
                }
            },
            () = tokio::time::sleep_until(deadline) => {
                let (bye, reason) = if waiting_backend {
                    (reply::bye_unavailable(), EndReason::BackendTimeout)
                } else {
                    (reply::bye_idle_timeout(), EndReason::ClientIdle)
                };
                let _ = write_timed(&mut client, &bye, session).await;
                client.close().await;
                return reason;
            }
            () = session.shutdown.cancelled() => {
                let _ = write_timed(&mut client, &reply::bye_shutdown(), session).await;
                client.close().await;
                return EndReason::Shutdown;
            }
        }
    }
}

fn end_reason(end: End) -> EndReason {
    match end {
        End::ClientClosed => EndReason::ClientClosed,
        End::BackendClosed => EndReason::BackendClosed,
        End::BackendProtocol(detail) => EndReason::backend_violation(detail),
        End::ProtocolViolation(detail) => EndReason::client_violation(detail),
    }
}

/// Metrics and log lines for what the machine did; never a credential.
fn record_notices(machine: &mut Prelogin, session: &Session) {
    let metrics = &session.listener.metrics;
    for notice in machine.take_notices() {
        match notice {
            Notice::Auth { ok, mechanism } => {
                metrics.auth_outcome(if ok {
                    AuthResult::Success
                } else {
                    AuthResult::Failure
                });
                tracing::info!(
                    listener = %session.listener.config.name,
                    protocol = "imap",
                    client = %session.client_addr,
                    result = if ok { "success" } else { "failure" },
                    mechanism,
                    cipher = %session.tls.as_ref().map_or("none".into(), crate::tls::TlsInfo::cipher_name),
                    "authentication"
                );
            }
            Notice::CleartextAuthRefused { mechanism } => {
                metrics.cleartext_auth_refused.inc();
                tracing::info!(
                    listener = %session.listener.config.name,
                    protocol = "imap",
                    client = %session.client_addr,
                    result = "refused_cleartext",
                    mechanism,
                    cipher = "none",
                    "authentication"
                );
            }
            Notice::IdFieldAdded(source) => metrics.id_field_added(source),
        }
    }
}
