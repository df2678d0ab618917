//! The one I/O loop before login for IMAP and POP3: it drives a protocol's sans-I/O machine
//! ([`crate::machine::Machine`], the contract below it) over the client and backend streams,
//! runs the STARTTLS handshake, connects, keeps the idle and login deadlines, charges logins to
//! the auth throttle, turns the machine's notices into metrics and log lines, and hands the
//! streams to the relay once the backend accepts a login.
//!
//! The phases and their transitions are the same for both protocols; only the bytes differ. So a
//! protocol supplies a [`Machine`] (its parser, gate and reply texts) and the loop that moves
//! bytes, runs the handshake, connects and keeps the timers is written once.

use tokio::io::AsyncReadExt;
use tokio::time::Instant;

use crate::backend::BackendStream;
use crate::machine::{Charge, End, Machine, Next, Notice};
use crate::metrics::AuthResult;
use crate::session::{ClientStream, EndReason, LoginCharge, Session, upgrade_client, write_timed};
use crate::transport::Transport;

/// One read from either side.
const READ_CHUNK: usize = 16 * 1024;

/// Runs a protocol's not-authenticated state on one connection, then the plain relay: the one
/// I/O loop IMAP and POP3 share. `hold_limit` bounds the client bytes held while the machine is
/// not parsing them (it adds one read).
///
/// On a STARTTLS listener the backend is connected only when the machine asks, after the
/// handshake, so nothing a cleartext client sends can reach it and idle cleartext clients hold
/// no backend connection. While the machine waits for the backend, only what the machine says
/// restarts the idle timer: bytes it merely holds do not, so a trickling client cannot keep a
/// silent backend's session alive, and the other way round.
///
/// Beside the idle timer, which bounds each wait, runs the login deadline
/// ([`Session::login_deadline`]), which bounds the whole phase including the STARTTLS handshake
/// and nothing restarts: a client that sends a byte just often enough never idles out, but is
/// still gone `timeouts.login` after it connected. It stops at login; the relay never sees it.
pub async fn serve<M: Machine, S: Transport>(
    machine: M,
    client: ClientStream<S>,
    session: &mut Session,
    hold_limit: usize,
) -> EndReason {
    // The pre-login loop runs boxed and its memory goes when it ends: a future is as large as
    // its largest state, and an idle authenticated session should carry only the relay's.
    match Box::pin(until_login(machine, client, session, hold_limit)).await {
        Err(reason) => reason,
        Ok(LoggedIn {
            mut client,
            mut backend,
            held_client,
            held_backend,
        }) => {
            session
                .relay_after_login(&mut client, &mut backend, &held_client, &held_backend)
                .await
        }
    }
}

/// What the relay needs once the backend accepted a login.
struct LoggedIn<S> {
    client: ClientStream<S>,
    backend: BackendStream,
    /// Bytes either side sent after the login exchange, written before the relay starts.
    held_client: Vec<u8>,
    held_backend: Vec<u8>,
}

/// The pre-login loop of [`serve`]: `Ok` once the backend accepted a login.
async fn until_login<M: Machine, S: Transport>(
    mut machine: M,
    client: ClientStream<S>,
    session: &mut Session,
    hold_limit: usize,
) -> Result<LoggedIn<S>, EndReason> {
    let hold_limit = hold_limit.saturating_add(READ_CHUNK);
    let mut client = client;
    let mut backend: Option<BackendStream> = None;
    let idle = session.listener.timeouts.idle;
    let mut deadline = Instant::now() + idle;
    let login_deadline = session.login_deadline();
    let mut cchunk = vec![0u8; READ_CHUNK];
    let mut bchunk = vec![0u8; READ_CHUNK];
    // The charge of the login with the backend now: at most one, since the machines hold the
    // client's bytes until a login's verdict. Dropped unsettled when the session ends first, it
    // stays counted (a client that hangs up before a slow failure still pays).
    let mut charge: Option<LoginCharge> = None;
    loop {
        record_notices(&mut machine, session, &mut charge);
        if machine.next() == Next::ChargeLogin {
            // Before anything is written, so a login leaves in the same write as the commands
            // pipelined before it. One step under the throttle's lock: checked and counted
            // together, so concurrent sessions of one address never pass the limit together.
            // With `shared_state` this may wait one bounded store round trip.
            let granted = session.charge_login(M::PROTOCOL).await;
            machine.login_charge(granted.is_some());
            if granted.is_some() {
                charge = granted;
            }
            continue;
        }
        let out = machine.take_to_backend();
        if !out.is_empty()
            && let Some(b) = backend.as_mut()
            && let Err(e) = write_timed(b, &out, session).await
        {
            let _ = write_timed(&mut client, &M::bye_unavailable(), session).await;
            client.close().await;
            return Err(EndReason::backend_io(&e));
        }
        let out = machine.take_to_client();
        let next = machine.next();
        // The last reply and the close leave together (`cork`); otherwise replies go out
        // before the step that follows them (a STARTTLS go-ahead before the handshake).
        let last = matches!(next, Next::End(_)) && client.cork(&out);
        if !last
            && !out.is_empty()
            && let Err(e) = write_timed(&mut client, &out, session).await
        {
            return Err(EndReason::client_io(&e));
        }
        match next {
            Next::End(end) => {
                client.close().await;
                return Err(end_reason(end));
            }
            Next::StartTls => {
                // Boxed, like the connect below: a future holds the state of its largest await
                // for its whole life, and these two would otherwise sit in every idle session.
                let upgrade = Box::pin(upgrade_client(
                    client,
                    &session.listener,
                    session.client_addr,
                    &session.draining,
                ));
                // The handshake is part of the time before login; mid-handshake there is no
                // way to say goodbye in the protocol, so the connection just closes.
                let Ok(upgraded) = tokio::time::timeout_at(login_deadline, upgrade).await else {
                    return Err(EndReason::LoginTimeout);
                };
                match upgraded {
                    Ok((upgraded, info, took)) => {
                        client = upgraded;
                        let cipher = info.cipher_name().into_owned();
                        session.tls_established(info, took, true);
                        machine.tls_started(cipher);
                        deadline = Instant::now() + idle;
                    }
                    Err(reason) => return Err(reason),
                }
                continue;
            }
            Next::Connect => {
                match Box::pin(session.connect_backend()).await {
                    Ok(b) => backend = Some(b),
                    Err(_) => {
                        let _ = write_timed(&mut client, &M::bye_unavailable(), session).await;
                        client.close().await;
                        return Err(EndReason::BackendUnavailable);
                    }
                }
                machine.backend_connected();
                deadline = Instant::now() + idle;
                continue;
            }
            Next::Authenticated => {
                let Some(b) = backend.take() else {
                    client.close().await;
                    return Err(EndReason::BackendClosed);
                };
                let (held_client, held_backend) = machine.held();
                session.authenticated();
                return Ok(LoggedIn {
                    client,
                    backend: b,
                    held_client,
                    held_backend,
                });
            }
            // Charged at the top of the loop.
            Next::ChargeLogin | Next::Run => {}
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
                    return Err(EndReason::ClientClosed);
                }
                Ok(n) => {
                    if machine.client_input(cchunk.get(..n).unwrap_or_default()) {
                        deadline = Instant::now() + idle;
                    }
                }
                Err(e) => return Err(EndReason::client_io(&e)),
            },
            r = backend_read => match r {
                Ok(0) => machine.backend_closed(),
                Ok(n) => {
                    if machine.backend_input(bchunk.get(..n).unwrap_or_default()) {
                        deadline = Instant::now() + idle;
                    }
                }
                Err(e) => {
                    let _ = write_timed(&mut client, &M::bye_unavailable(), session).await;
                    client.close().await;
                    return Err(EndReason::backend_io(&e));
                }
            },
            () = tokio::time::sleep_until(deadline) => {
                let (bye, reason) = if waiting_backend {
                    (M::bye_unavailable(), EndReason::BackendTimeout)
                } else {
                    (M::bye_idle(), EndReason::ClientIdle)
                };
                let _ = write_timed(&mut client, &bye, session).await;
                client.close().await;
                return Err(reason);
            }
            () = tokio::time::sleep_until(login_deadline) => {
                let _ = write_timed(&mut client, &M::bye_login_timeout(), session).await;
                client.close().await;
                return Err(EndReason::LoginTimeout);
            }
            // Not authenticated yet: nothing to finish, so the goodbye goes out as soon as the
            // drain begins, not when `shutdown_grace` runs out.
            () = session.draining.cancelled() => {
                let _ = write_timed(&mut client, &M::bye_shutdown(), session).await;
                client.close().await;
                return Err(EndReason::Shutdown);
            }
        }
    }
}

fn end_reason(end: End) -> EndReason {
    match end {
        End::ClientClosed => EndReason::ClientClosed,
        End::BackendClosed => EndReason::BackendClosed,
        End::BackendUnavailable => EndReason::BackendUnavailable,
        End::BackendProtocol(detail) => EndReason::backend_violation(detail),
        End::ProtocolViolation(detail) => EndReason::client_violation(detail),
    }
}

/// Metrics and log lines for what the machine did; never a credential.
fn record_notices<M: Machine>(machine: &mut M, session: &Session, login: &mut Option<LoginCharge>) {
    let metrics = &session.listener.metrics;
    for notice in machine.take_notices() {
        match notice {
            Notice::Auth {
                ok,
                mechanism,
                charge,
            } => {
                if let Some(held) = login.take() {
                    match charge {
                        Charge::Refund => held.refund(),
                        Charge::Keep => held.keep(),
                    }
                }
                metrics.auth_outcome(if ok {
                    AuthResult::Success
                } else {
                    AuthResult::Failure
                });
                tracing::info!(
                    listener = %session.listener.config.name,
                    protocol = M::PROTOCOL,
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
                    protocol = M::PROTOCOL,
                    client = %session.client_addr,
                    result = "refused_cleartext",
                    mechanism,
                    cipher = "none",
                    "authentication"
                );
            }
            Notice::AuthThrottled { mechanism } => {
                session.auth_throttled();
                tracing::info!(
                    listener = %session.listener.config.name,
                    protocol = M::PROTOCOL,
                    client = %session.client_addr,
                    result = "throttled",
                    mechanism,
                    "authentication"
                );
            }
            Notice::IdFieldAdded(source) => metrics.id_field_added(source),
            Notice::User(name) => session.set_user(&name),
            Notice::ClientInfo(problem) => {
                if session.listener.client_info_notices.first(problem) {
                    let what = match (problem, M::PROTOCOL) {
                        (crate::client_info::Notice::NotOffered, "imap") => {
                            "the backend does not offer ID; going on without it"
                        }
                        (crate::client_info::Notice::NotOffered, _) => {
                            "the backend does not offer XCLIENT (Dovecot: login_trusted_networks must list mailfront); going on without it"
                        }
                        (crate::client_info::Notice::Refused, "imap") => {
                            "the backend refused mailfront's ID; sessions are closed with BYE [UNAVAILABLE] until it accepts it"
                        }
                        (crate::client_info::Notice::Refused, _) => {
                            "the backend refused XCLIENT; sessions are closed with -ERR [SYS/TEMP] until it accepts it"
                        }
                    };
                    tracing::warn!(
                        listener = %session.listener.config.name,
                        protocol = M::PROTOCOL,
                        "backend_client_info: {what}"
                    );
                }
            }
        }
    }
}
