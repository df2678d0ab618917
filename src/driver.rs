//! The one driver loop for all three protocols: it drives a protocol's sans-I/O machine
//! ([`crate::machine::Machine`], the contract below it) over the client and backend streams,
//! runs the STARTTLS handshake, connects, keeps the idle, login and shutdown deadlines, charges
//! logins to the auth throttle, turns the machine's notices into metrics and log lines, and for
//! IMAP and POP3 hands the streams to the relay once the backend accepts a login.
//!
//! The phases and their transitions are the same for every protocol; only the bytes differ. So a
//! protocol supplies a [`Machine`] (its parser, gate and reply texts) and the loop that moves
//! bytes, runs the handshake, connects and keeps the timers is written once. It runs inside the
//! session's tracing span (listener, protocol, client, session id), so its events name only
//! what is their own.

use tokio::io::AsyncReadExt;
use tokio::time::Instant;

use crate::backend::BackendStream;
use crate::machine::{AuthVerdict, Charge, End, LoginFacts, Machine, Next, Notice, RouteFailure};
use crate::metrics::AuthResult;
use crate::routing::{RouteError, RouteRequest, Router, Source, Target};
use crate::session::{ClientStream, EndReason, LoginCharge, Session, upgrade_client, write_timed};
use crate::transport::Transport;

/// The client read buffer a session starts with: a few command lines' worth.
const FIRST_CLIENT_CHUNK: usize = 4 * 1024;

/// Runs a protocol's session on one connection: the machine until it ends or, for IMAP and
/// POP3, until the backend accepts a login, then the plain relay. `hold_limit` bounds the
/// client bytes held while the machine is not parsing them (it adds one read).
///
/// On a STARTTLS listener the backend is connected only when the machine asks, after the
/// handshake, so nothing a cleartext client sends can reach it and idle cleartext clients hold
/// no backend connection. While the machine waits for the backend, only what the machine says
/// restarts the idle timer: bytes it merely holds do not, so a trickling client cannot keep a
/// silent backend's session alive, and the other way round.
///
/// Beside the idle timer, which bounds each wait, runs the login deadline
/// ([`Session::login_deadline`]), which bounds the whole time before login including the
/// STARTTLS handshake and nothing restarts: a client that sends a byte just often enough never
/// idles out, but is still gone `timeouts.login` after it connected. It stops at login
/// ([`Next::Authenticated`], [`Notice::PastLogin`]).
pub async fn serve<M: Machine, S: Transport>(
    machine: M,
    client: ClientStream<S>,
    session: &mut Session,
    hold_limit: usize,
) -> EndReason {
    // The machine's loop runs boxed and its memory goes when it ends: a future is as large as
    // its largest state, and an idle authenticated session should carry only the relay's.
    match Box::pin(run(machine, client, session, hold_limit)).await {
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

/// Writes a goodbye, closes the client, and returns `reason`.
async fn goodbye<S: Transport>(
    client: &mut ClientStream<S>,
    bye: &[u8],
    session: &Session,
    reason: EndReason,
) -> Result<LoggedIn<S>, EndReason> {
    if !client.cork(bye) {
        let _ = write_timed(client, bye, session).await;
    }
    client.close().await;
    Err(reason)
}

/// The loop of [`serve`]: `Ok` once the backend accepted a login (IMAP, POP3).
async fn run<M: Machine, S: Transport>(
    mut machine: M,
    client: ClientStream<S>,
    session: &mut Session,
    hold_limit: usize,
) -> Result<LoggedIn<S>, EndReason> {
    let hold_limit = hold_limit.saturating_add(M::READ_CHUNK);
    let mut client = client;
    let mut backend: Option<BackendStream> = None;
    // Why the backend went away, for the close line, when the machine then ends.
    let mut backend_error: Option<std::io::Error> = None;
    let timeouts = session.listener().timeouts.clone();
    let mut last_activity = Instant::now();
    let mut login_deadline = Some(session.login_deadline());
    // Whether the machine was told of a graceful shutdown (it is told once; from then on it
    // decides when to end, and the hard stop ends it regardless).
    let mut drain_told = false;
    let draining = session.draining().clone();
    let hard_stop = session.hard_stop().clone();
    // One timer per deadline for the whole loop, moved rather than made anew on every turn: the
    // loop turns once per read, and registering and cancelling a timer each time shows in a
    // small message's cost.
    let mut idle_at = last_activity + timeouts.idle;
    let idle_timer = tokio::time::sleep_until(idle_at);
    tokio::pin!(idle_timer);
    let login_timer = tokio::time::sleep_until(login_deadline.unwrap_or(idle_at));
    tokio::pin!(login_timer);
    // Read buffers sized for what a session needs: most never log in (probes, scanners) and
    // send a few short lines, and have no backend at all. The client's grows to `READ_CHUNK`
    // once a read fills it (message content streaming through); the backend's is made at the
    // first backend read.
    let mut cchunk = vec![0u8; FIRST_CLIENT_CHUNK.min(M::READ_CHUNK)];
    let mut bchunk: Vec<u8> = Vec::new();
    // The charge of the login with the backend now: at most one, since the machines hold the
    // client's bytes until a login's verdict. Dropped unsettled when the session ends first, it
    // stays counted (a client that hangs up before a slow failure still pays).
    let mut charge: Option<LoginCharge> = None;
    // Logins routed so far (nginx's `Auth-Login-Attempt`), and what chose the backend now.
    let mut login_attempts: u32 = 0;
    // On a routed listener: what chose the login's backend, and the backend while connected.
    let mut route: Option<(Source, Option<std::net::SocketAddr>)> = None;
    loop {
        if record_notices(&mut machine, session, &mut charge, route) {
            login_deadline = None;
        }
        if machine.next() == Next::ChargeLogin {
            // Before anything is written, so a login leaves in the same write as the commands
            // pipelined before it. One step under the throttle's lock: checked and counted
            // together, so concurrent sessions of one address never pass the limit together.
            // With `shared_state` this may wait one bounded store round trip.
            let granted = session.charge_login().await;
            machine.login_charge(granted.is_some());
            if granted.is_some() {
                charge = granted;
            }
            continue;
        }
        let out = machine.take_to_backend();
        // Content the machine judged in place: a range of the last client read, which `cchunk`
        // still holds (the next read comes after these writes).
        let passthrough = machine
            .take_passthrough()
            .and_then(|range| cchunk.get(range))
            .unwrap_or_default();
        let mut write_failed = false;
        for bytes in [out.as_slice(), passthrough] {
            if bytes.is_empty() {
                continue;
            }
            let written = match backend.as_mut() {
                Some(b) => write_timed(b, bytes, session).await,
                None => Err(std::io::Error::from(std::io::ErrorKind::NotConnected)),
            };
            if let Err(e) = written {
                backend = None;
                backend_error = Some(e);
                machine.backend_failed();
                write_failed = true;
                break;
            }
        }
        if write_failed {
            continue;
        }
        if machine.take_backend_close() {
            backend = None;
            route = None;
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
                return Err(end_reason(end, backend_error.take()));
            }
            Next::StartTls => {
                // Boxed, like the connect below: a future holds the state of its largest await
                // for its whole life, and these two would otherwise sit in every idle session.
                let upgrade = Box::pin(upgrade_client(client, session.listener(), &draining));
                // The handshake is part of the time before login; mid-handshake there is no
                // way to say goodbye in the protocol, so the connection just closes.
                let upgraded = match login_deadline {
                    Some(at) => match tokio::time::timeout_at(at, upgrade).await {
                        Ok(upgraded) => upgraded,
                        Err(_) => return Err(EndReason::LoginTimeout),
                    },
                    None => upgrade.await,
                };
                let (upgraded, info, took) = upgraded?;
                client = upgraded;
                let facts = info.facts();
                session.tls_established(info, took, true);
                machine.tls_started(facts);
                last_activity = Instant::now();
                continue;
            }
            Next::Connect => {
                // On a listener that routes by user, the machine holds a login: the router
                // chooses its backend, or refuses it, before anything connects.
                let routed = session
                    .listener()
                    .router
                    .clone()
                    .filter(|r| r.needs_user())
                    .zip(machine.login_facts());
                let routed_login = routed.is_some();
                let target = match routed {
                    None => Target::Pool,
                    Some((router, facts)) => {
                        login_attempts = login_attempts.saturating_add(1);
                        let routing = Box::pin(route_login(
                            &router,
                            session,
                            &facts,
                            login_attempts,
                            login_deadline,
                        ));
                        let answer = tokio::select! {
                            biased;
                            () = hard_stop.cancelled() => {
                                let bye = machine.bye_shutdown();
                                return goodbye(&mut client, &bye, session, EndReason::Shutdown).await;
                            }
                            answer = routing => answer,
                        };
                        match answer {
                            Ok(target) => target,
                            Err(failure) => {
                                // Only a lookup refuses or fails a login.
                                route = Some((Source::Lookup, None));
                                machine.route_failed(failure);
                                last_activity = Instant::now();
                                continue;
                            }
                        }
                    }
                };
                match Box::pin(session.connect_backend_to(&target)).await {
                    Ok(b) => {
                        route = routed_login.then(|| (target.source(), b.peer()));
                        backend = Some(b);
                    }
                    // A routed login whose backend is down is a temporary failure of that
                    // login, never another backend's session (a wrong backend is worse than
                    // none); the client may try again.
                    Err(_) if routed_login => {
                        route = Some((target.source(), None));
                        machine.route_failed(RouteFailure::Unavailable);
                        last_activity = Instant::now();
                        continue;
                    }
                    Err(_) => {
                        let bye = machine.bye_unavailable();
                        return goodbye(&mut client, &bye, session, EndReason::BackendUnavailable)
                            .await;
                    }
                }
                machine.backend_connected();
                last_activity = Instant::now();
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
        let wait = if waiting_backend && machine.waits_for_verdict() {
            timeouts.data_reply
        } else {
            timeouts.idle
        };
        let deadline = last_activity + wait;
        let read_backend = backend.is_some() && machine.wants_backend_input();
        if read_backend && bchunk.is_empty() {
            bchunk.resize(M::READ_CHUNK, 0);
        }
        let backend_read = async {
            match backend.as_mut() {
                Some(b) if read_backend => b.read(&mut bchunk).await,
                _ => std::future::pending().await,
            }
        };
        if deadline != idle_at {
            // Later than before (the usual case): tokio only notes the new instant.
            idle_timer.as_mut().reset(deadline);
            idle_at = deadline;
        }
        tokio::select! {
            // Stops and deadlines first: a read that is always ready (a client pipelining
            // without pause) must never win over them.
            biased;
            // The hard stop (`timeouts.shutdown_grace` over) ends every session, a message
            // underway included: the client gets the protocol's goodbye, never a success the
            // backend did not send.
            () = hard_stop.cancelled() => {
                let bye = machine.bye_shutdown();
                return goodbye(&mut client, &bye, session, EndReason::Shutdown).await;
            }
            // Not authenticated yet: nothing to finish, so the goodbye goes out as soon as the
            // drain begins, not when `shutdown_grace` runs out (an SMTP message underway
            // finishes first: the machine decides).
            () = draining.cancelled(), if !drain_told => {
                drain_told = true;
                machine.shutdown_begun();
            }
            () = &mut login_timer, if login_deadline.is_some() => {
                let bye = machine.bye_login_timeout();
                return goodbye(&mut client, &bye, session, EndReason::LoginTimeout).await;
            }
            () = &mut idle_timer => {
                let (bye, reason) = if waiting_backend {
                    tracing::warn!(timeout_s = wait.as_secs(), "backend reply timed out");
                    (machine.bye_backend_timeout(), EndReason::BackendTimeout)
                } else {
                    (machine.bye_idle(), EndReason::ClientIdle)
                };
                return goodbye(&mut client, &bye, session, reason).await;
            }
            r = client.read(&mut cchunk), if read_client => match r {
                Ok(0) => {
                    client.close().await;
                    return Err(EndReason::ClientClosed);
                }
                Ok(n) => {
                    if machine.client_input(cchunk.get(..n).unwrap_or_default()) {
                        last_activity = Instant::now();
                    }
                    // A full read: more is coming faster than lines; read it in larger pieces
                    // (after this read's bytes are taken: the machine's passthrough range
                    // points into them, and growing keeps them).
                    if n == cchunk.len() && cchunk.len() < M::READ_CHUNK {
                        cchunk.resize(M::READ_CHUNK, 0);
                    }
                }
                Err(e) => return Err(EndReason::client_io(&e)),
            },
            r = backend_read => match r {
                Ok(0) => {
                    backend = None;
                    machine.backend_closed();
                }
                Ok(n) => {
                    if machine.backend_input(bchunk.get(..n).unwrap_or_default()) {
                        last_activity = Instant::now();
                    }
                }
                Err(e) => {
                    backend = None;
                    backend_error = Some(e);
                    machine.backend_failed();
                }
            },
        }
    }
}

/// Asks `router` where the login in `facts` goes (nginx's `auth_http` fields from the session),
/// or what the machine answers instead. A lookup's refusal with `Auth-Wait` is answered that
/// much later (within the login deadline), as nginx does, and the client may try again.
async fn route_login(
    router: &Router,
    session: &Session,
    facts: &LoginFacts,
    attempt: u32,
    login_deadline: Option<Instant>,
) -> Result<Target, RouteFailure> {
    let tls = session.tls();
    let version = tls.map(crate::tls::TlsInfo::version_name);
    let cipher = tls.map(crate::tls::TlsInfo::cipher_name);
    let method = crate::routing::lookup::method_name(&facts.mechanism);
    let request = RouteRequest {
        protocol: session.protocol(),
        user: &facts.user,
        password: facts.password.as_ref().map(|p| p.as_slice()),
        method: &method,
        attempt,
        client: session.client_addr(),
        tls: version.as_deref().zip(cipher.as_deref()),
        helo: facts.helo.as_deref(),
    };
    match router.route(&request).await {
        Ok(target) => Ok(target),
        Err(RouteError::Unavailable { reason }) => {
            tracing::warn!(user = %String::from_utf8_lossy(&facts.user), reason, "no backend for this login: temporary failure");
            Err(RouteFailure::Unavailable)
        }
        Err(RouteError::Refused {
            text,
            smtp_code,
            wait,
        }) => {
            if let Some(wait) = wait {
                let until = Instant::now() + wait;
                tokio::time::sleep_until(login_deadline.map_or(until, |d| until.min(d))).await;
            }
            Err(RouteFailure::Refused {
                text,
                smtp_code,
                go_on: wait.is_some(),
            })
        }
    }
}

fn end_reason(end: End, backend_error: Option<std::io::Error>) -> EndReason {
    match end {
        End::ClientClosed => EndReason::ClientClosed,
        End::Shutdown => EndReason::Shutdown,
        End::BackendClosed => {
            backend_error.map_or(EndReason::BackendClosed, |e| EndReason::backend_io(&e))
        }
        End::BackendUnavailable => EndReason::BackendUnavailable,
        End::BackendProtocol(detail) => EndReason::backend_violation(detail),
        End::ProtocolViolation(detail) => EndReason::client_violation(detail),
        End::LoginRefused => EndReason::LoginRefused,
    }
}

/// Metrics and log lines for what the machine did; never a credential. One `authentication`
/// line schema for every protocol. Returns whether the session got past login.
fn record_notices<M: Machine>(
    machine: &mut M,
    session: &mut Session,
    login: &mut Option<LoginCharge>,
    route: Option<(Source, Option<std::net::SocketAddr>)>,
) -> bool {
    let mut past_login = false;
    for notice in machine.take_notices() {
        let metrics = &session.listener().metrics;
        match notice {
            Notice::Auth {
                verdict,
                mechanism,
                charge,
            } => {
                if let Some(held) = login.take() {
                    match charge {
                        Charge::Refund => held.refund(),
                        Charge::Keep => held.keep(),
                    }
                }
                match verdict {
                    AuthVerdict::Success => metrics.auth_outcome(AuthResult::Success),
                    AuthVerdict::Failure => metrics.auth_outcome(AuthResult::Failure),
                    AuthVerdict::NotCompleted => {}
                }
                // On a routed listener: what chose the backend, and which it was (none when
                // the router or the backend failed the login).
                tracing::info!(
                    result = verdict.as_str(),
                    mechanism,
                    cipher = %cipher_name(session),
                    route = route.map(|(source, _)| source.as_str()),
                    backend = route.and_then(|(_, backend)| backend).map(tracing::field::display),
                    "authentication"
                );
            }
            Notice::CleartextAuthRefused { mechanism } => {
                metrics.cleartext_auth_refused.inc();
                tracing::info!(
                    result = "refused_cleartext",
                    mechanism,
                    cipher = "none",
                    "authentication"
                );
            }
            Notice::AuthThrottled { mechanism } => {
                session.auth_throttled();
                tracing::info!(
                    result = "throttled",
                    mechanism,
                    cipher = %cipher_name(session),
                    "authentication"
                );
            }
            Notice::IdFieldAdded(source) => metrics.id_field_added(source),
            Notice::User(name) => session.set_user(&name),
            Notice::ClientInfo(problem) => {
                let what = M::client_info_warning(problem);
                if session.listener().client_info_notices.first(problem) {
                    tracing::warn!("backend_client_info: {what}");
                } else {
                    tracing::debug!("backend_client_info: {what}");
                }
            }
            Notice::PastLogin => {
                session.authenticated();
                past_login = true;
            }
            Notice::PipelinedAfterStartTls { octets } => {
                tracing::info!(octets, "discarded client bytes pipelined after STARTTLS");
            }
            Notice::CommandRefused { reason } => {
                tracing::debug!(refusal = reason, "command refused");
            }
            Notice::BackendRefused { what, code } => {
                tracing::info!(code, "backend refused {what}");
            }
            Notice::ReceivedFieldAdded => metrics.received_field_added(),
            Notice::MessageAccepted {
                size,
                number,
                received_id,
                reply,
            } => {
                metrics.message_accepted(size);
                tracing::info!(
                    size,
                    message_number = number,
                    cipher = %cipher_name(session),
                    received_id = received_id.as_deref().unwrap_or("-"),
                    reply = %reply,
                    "message accepted"
                );
            }
            Notice::MessageRefused { size, code } => {
                tracing::info!(size, code, "message not accepted by the backend");
            }
            // What a mapped or looked-up backend shows is its own: a legacy server one user
            // lives on must not become what every session of the listener is shown before
            // login (the listener's pool, affinity included, teaches it).
            Notice::BackendEhlo(_)
            | Notice::BackendImapCapability(_)
            | Notice::BackendPop3Capa(_)
                if route
                    .is_some_and(|(source, _)| matches!(source, Source::Map | Source::Lookup)) => {}
            Notice::BackendEhlo(reply) => session.listener().learned.set_ehlo(reply),
            Notice::BackendImapCapability(list) => {
                session.listener().learned.set_imap_capability(list);
            }
            Notice::BackendPop3Capa(response) => {
                session.listener().learned.set_pop3_capa(response);
            }
            Notice::BareLineEnding { bare, in_bdat } => {
                tracing::warn!(
                    bare,
                    bdat = in_bdat,
                    "bare line ending in message content: message refused, backend connection closed"
                );
            }
        }
    }
    past_login
}

/// The client's cipher for log lines: its IANA name, `none` in cleartext.
fn cipher_name(session: &Session) -> std::borrow::Cow<'static, str> {
    session
        .tls()
        .map_or("none".into(), crate::tls::TlsInfo::cipher_name)
}
