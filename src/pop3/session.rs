//! The POP3 session driver: the sans-I/O pieces of [`crate::pop3`] wired to a client stream and
//! a backend connection for the AUTHORIZATION state, then the plain byte relay.
//!
//! On a `starttls` listener (110) mailfront answers the whole cleartext dialogue itself and
//! opens no backend connection until the STLS handshake is done (RFC 8314 §4.1): greeting, CAPA
//! with STLS, QUIT, local `-ERR`s, and one fixed refusal for USER, PASS, APOP and AUTH. Whatever
//! was pipelined after STLS is dropped (RFC 2595 §4, CERT VU#555316). After TLS the backend's
//! greeting is swallowed and the client asks CAPA again (RFC 2595 §4).
//!
//! Over TLS, until the backend accepts a login, only commands [`policy::after_tls`] parsed and
//! allowed reach the backend, written by mailfront in canonical form. PASS/APOP/AUTH hold every
//! later client byte until the backend's answer: `+OK` → relay (RFC 1939 §6), `-ERR` → keep
//! parsing. During AUTH one client line goes to the backend per `+` challenge it sent
//! (RFC 5034 §4), checked and re-emitted: a line pipelined past the exchange (say `XCLIENT`,
//! which Dovecot trusts from mailfront) would otherwise reach the backend unchecked.
//!
//! Timeouts: every wait is bounded by `timeouts.idle`. A wait for the backend starts when
//! something is forwarded; client bytes that are only held do not extend it.

use std::collections::VecDeque;

use tokio::io::AsyncReadExt;
use tokio::time::Instant;

use crate::backend::BackendStream;
use crate::config::TlsMode;
use crate::metrics::AuthResult;
use crate::pop3::capa::{self, CapaView};
use crate::pop3::codec::{
    ClientEvent, CommandLimits, CommandReceiver, Expect, ResponseLimits, ResponseReceiver,
    ServerEvent, Status,
};
use crate::pop3::policy::{self, Decision, Local};
use crate::pop3::reply;
use crate::pop3::request::Request;
use crate::session::{ClientStream, EndReason, Session, upgrade_client, write_timed};
use crate::transport::Transport;

const READ_CHUNK: usize = 16 * 1024;

/// Serves one POP3 client connection from the first greeting to the close.
pub async fn serve<S: Transport>(client: ClientStream<S>, session: &mut Session) -> EndReason {
    let mut client = client;
    let mut commands = 0;
    // A `starttls` listener: the cleartext dialogue, with no backend, until STLS.
    let swallow_greeting = !client.is_tls();
    if !client.is_tls() {
        if let Err(reason) = cleartext_dialogue(&mut client, session, &mut commands).await {
            client.close().await;
            return reason;
        }
        match upgrade_client(client, &session.listener, session.client_addr).await {
            Ok((upgraded, info, took)) => {
                client = upgraded;
                session.tls_established(info, took, true);
            }
            Err(reason) => return reason,
        }
    }
    // TLS is up here: the PROXY v2 header, if any, carries its details.
    let mut backend = match session.connect_backend().await {
        Ok(b) => b,
        Err(_) => {
            let _ = write_timed(&mut client, &reply::err_unavailable(), session).await;
            client.close().await;
            return EndReason::BackendUnavailable;
        }
    };
    let mut driver = Driver::new(session, commands, swallow_greeting);
    match driver.run(&mut client, &mut backend, session).await {
        Outcome::End(reason) => {
            client.close().await;
            reason
        }
        Outcome::Authenticated => {
            let held_client = std::mem::take(&mut driver.cbuf);
            let held_backend = std::mem::take(&mut driver.bbuf);
            drop(driver);
            session
                .relay_after_login(&mut client, &mut backend, &held_client, &held_backend)
                .await
        }
    }
}

fn command_limits(session: &Session) -> CommandLimits {
    CommandLimits {
        command: session.listener.limits.pop3_line.max(16),
        ..CommandLimits::default()
    }
}

/// The cleartext dialogue on a `starttls` listener: `Ok` once STLS was answered (the caller
/// runs the handshake; pipelined bytes were dropped), `Err` when the session ends here.
async fn cleartext_dialogue<S: Transport>(
    client: &mut ClientStream<S>,
    session: &Session,
    commands: &mut usize,
) -> Result<(), EndReason> {
    let io = |e: std::io::Error| EndReason::client_io(&e);
    write_timed(client, &reply::greeting(session.hostname()), session)
        .await
        .map_err(io)?;
    let idle = session.listener.timeouts.idle;
    let mut rx = CommandReceiver::new(command_limits(session));
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; READ_CHUNK];
    let mut deadline = Instant::now() + idle;
    loop {
        loop {
            let step = rx.next(&buf);
            buf.drain(..step.consumed);
            let Some(event) = step.event else { break };
            // Only a whole line counts as activity: trickled bytes do not hold the session.
            deadline = Instant::now() + idle;
            *commands += 1;
            if *commands > session.listener.limits.preauth_commands {
                let _ = write_timed(client, &reply::err_too_many_commands(), session).await;
                return Err(EndReason::client_violation(
                    "too many commands before authentication".to_owned(),
                ));
            }
            let cmd = match event {
                ClientEvent::Command(cmd) => cmd,
                ClientEvent::Rejected(rejection) => {
                    write_timed(client, &rejection.reply(), session)
                        .await
                        .map_err(io)?;
                    continue;
                }
                // Never begun: no AUTH exchange runs before TLS.
                ClientEvent::SaslResponse(_) => continue,
            };
            match policy::before_tls(&cmd) {
                Local::Reply(answer) => write_timed(client, &answer, session).await.map_err(io)?,
                Local::RefuseCredentials(answer) => {
                    session.listener.metrics.cleartext_auth_refused.inc();
                    let mechanism = Request::parse(&cmd)
                        .map(|r| r.log_name())
                        .unwrap_or_else(|_| String::from_utf8_lossy(&cmd.keyword).into_owned());
                    tracing::info!(
                        listener = %session.listener.config.name,
                        protocol = "pop3",
                        client = %session.client_addr,
                        result = "refused_cleartext",
                        mechanism,
                        cipher = "none",
                        "authentication"
                    );
                    write_timed(client, &answer, session).await.map_err(io)?;
                }
                Local::StartTls(ok) => {
                    // Nothing pipelined after STLS may run after the upgrade.
                    buf.clear();
                    write_timed(client, &ok, session).await.map_err(io)?;
                    return Ok(());
                }
                Local::Quit(bye) => {
                    let _ = write_timed(client, &bye, session).await;
                    return Err(EndReason::ClientClosed);
                }
            }
        }
        if buf.len() > rx_hold_limit(session) {
            // Unreachable with a bounded receiver; a belt for the buffer bound.
            return Err(EndReason::client_violation(
                "client buffer overflow".to_owned(),
            ));
        }
        tokio::select! {
            r = client.read(&mut chunk) => match r {
                Ok(0) => return Err(EndReason::ClientClosed),
                Ok(n) => buf.extend_from_slice(chunk.get(..n).unwrap_or_default()),
                Err(e) => return Err(io(e)),
            },
            () = tokio::time::sleep_until(deadline) => {
                let _ = write_timed(client, &reply::err_idle_timeout(), session).await;
                return Err(EndReason::ClientIdle);
            }
            () = session.shutdown.cancelled() => {
                let _ = write_timed(client, &reply::err_shutdown(), session).await;
                return Err(EndReason::Shutdown);
            }
        }
    }
}

fn rx_hold_limit(session: &Session) -> usize {
    let limits = command_limits(session);
    limits.sasl_line.max(limits.command) + READ_CHUNK
}

enum Outcome {
    Authenticated,
    End(EndReason),
}

/// What a forwarded command was, to treat its response.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Sent {
    Capa,
    /// `AUTH` with no argument: the mechanism list.
    Mechanisms,
    /// PASS, APOP or AUTH with a mechanism: its `+OK` ends AUTHORIZATION.
    Auth(String),
    Quit,
    Other,
}

/// The AUTHORIZATION state over TLS, with the backend connected.
struct Driver {
    rx: CommandReceiver,
    srx: ResponseReceiver,
    listener: TlsMode,
    cbuf: Vec<u8>,
    bbuf: Vec<u8>,
    hold_limit: usize,
    greeted: bool,
    /// After STLS the backend's greeting is not the client's: it got ours in cleartext.
    swallow_greeting: bool,
    /// Forwarded commands in order, parallel to the response receiver's expectations.
    sent: VecDeque<Sent>,
    commands: usize,
    quit: bool,
    /// `+` challenges the backend sent during AUTH that the client has not answered yet.
    sasl_credit: usize,
    deadline: Instant,
}

impl Driver {
    fn new(session: &Session, commands: usize, swallow_greeting: bool) -> Driver {
        Driver {
            rx: CommandReceiver::new(command_limits(session)),
            srx: ResponseReceiver::new(ResponseLimits::default()),
            listener: session.listener.config.tls,
            cbuf: Vec::new(),
            bbuf: Vec::new(),
            hold_limit: rx_hold_limit(session),
            greeted: false,
            swallow_greeting,
            sent: VecDeque::new(),
            commands,
            quit: false,
            sasl_credit: 0,
            deadline: Instant::now() + session.listener.timeouts.idle,
        }
    }

    /// An authentication command is forwarded and unanswered: hold the client's later bytes.
    fn auth_in_flight(&self) -> bool {
        self.sent.iter().any(|s| matches!(s, Sent::Auth(_)))
    }

    async fn run<S: Transport>(
        &mut self,
        client: &mut ClientStream<S>,
        backend: &mut BackendStream,
        session: &Session,
    ) -> Outcome {
        let idle = session.listener.timeouts.idle;
        let mut cchunk = vec![0u8; READ_CHUNK];
        let mut bchunk = vec![0u8; READ_CHUNK];
        loop {
            if let Some(outcome) = self.on_backend(client, session).await {
                return outcome;
            }
            if self.greeted
                && let Some(outcome) = self.on_client(client, backend, session).await
            {
                return outcome;
            }
            let read_client = self.cbuf.len() < self.hold_limit;
            // After a SASL `+` it is the client's turn.
            let waiting_backend = !self.greeted || (!self.sent.is_empty() && self.sasl_credit == 0);
            tokio::select! {
                r = client.read(&mut cchunk), if read_client => match r {
                    Ok(0) => return Outcome::End(EndReason::ClientClosed),
                    Ok(n) => {
                        self.cbuf.extend_from_slice(cchunk.get(..n).unwrap_or_default());
                        // Held bytes do not extend a wait for the backend; parsed ones restart
                        // it in `on_client`.
                        if !waiting_backend {
                            self.deadline = Instant::now() + idle;
                        }
                    }
                    Err(e) => return Outcome::End(EndReason::client_io(&e)),
                },
                r = backend.read(&mut bchunk) => match r {
                    Ok(0) => {
                        if !self.greeted {
                            let _ = write_timed(client, &reply::err_unavailable(), session).await;
                        }
                        return Outcome::End(if self.quit {
                            EndReason::ClientClosed
                        } else {
                            EndReason::BackendClosed
                        });
                    }
                    Ok(n) => {
                        self.bbuf.extend_from_slice(bchunk.get(..n).unwrap_or_default());
                        if waiting_backend {
                            self.deadline = Instant::now() + idle;
                        }
                    }
                    Err(e) => {
                        let _ = write_timed(client, &reply::err_unavailable(), session).await;
                        return Outcome::End(EndReason::backend_io(&e));
                    }
                },
                () = tokio::time::sleep_until(self.deadline) => {
                    return if waiting_backend {
                        let _ = write_timed(client, &reply::err_unavailable(), session).await;
                        Outcome::End(EndReason::BackendTimeout)
                    } else {
                        let _ = write_timed(client, &reply::err_idle_timeout(), session).await;
                        Outcome::End(EndReason::ClientIdle)
                    };
                }
                () = session.shutdown.cancelled() => {
                    let _ = write_timed(client, &reply::err_shutdown(), session).await;
                    return Outcome::End(EndReason::Shutdown);
                }
            }
        }
    }

    async fn on_backend<S: Transport>(
        &mut self,
        client: &mut ClientStream<S>,
        session: &Session,
    ) -> Option<Outcome> {
        loop {
            let step = self.srx.next(&self.bbuf);
            self.bbuf.drain(..step.consumed);
            let event = step.event?;
            let response = match event {
                ServerEvent::Rejected(e) => {
                    let _ = write_timed(client, &reply::err_unavailable(), session).await;
                    return Some(Outcome::End(EndReason::backend_violation(e.to_string())));
                }
                ServerEvent::Greeting(greeting) if self.swallow_greeting => {
                    self.greeted = true;
                    if greeting.status != Status::Ok {
                        let _ = write_timed(client, &reply::err_unavailable(), session).await;
                        return Some(Outcome::End(EndReason::BackendUnavailable));
                    }
                    continue;
                }
                ServerEvent::Greeting(greeting) => {
                    self.greeted = true;
                    let shown = capa::rewrite_greeting(&greeting.raw);
                    if let Err(e) = write_timed(client, &shown, session).await {
                        return Some(Outcome::End(EndReason::client_io(&e)));
                    }
                    if greeting.status != Status::Ok {
                        return Some(Outcome::End(EndReason::BackendClosed));
                    }
                    continue;
                }
                ServerEvent::Response(response) => response,
            };
            if !response.is_final() && self.rx.in_sasl() {
                self.sasl_credit = self.sasl_credit.saturating_add(1);
            }
            let sent = if response.is_final() {
                self.sent.pop_front()
            } else {
                self.sent.front().cloned()
            };
            let shown = match (&sent, response.status) {
                (Some(Sent::Capa), Status::Ok) => capa::rewrite_capa(&response.raw, CapaView::Tls),
                (Some(Sent::Mechanisms), Status::Ok) => capa::rewrite_mechanisms(&response.raw),
                _ => response.raw.clone(),
            };
            if let Err(e) = write_timed(client, &shown, session).await {
                return Some(Outcome::End(EndReason::client_io(&e)));
            }
            if let Some(Sent::Auth(mechanism)) = &sent
                && response.is_final()
            {
                let ok = response.authenticated();
                self.sasl_credit = 0;
                log_auth(session, mechanism, ok);
                if ok {
                    return Some(Outcome::Authenticated);
                }
                self.rx.end_sasl();
            }
        }
    }

    async fn on_client<S: Transport>(
        &mut self,
        client: &mut ClientStream<S>,
        backend: &mut BackendStream,
        session: &Session,
    ) -> Option<Outcome> {
        loop {
            // While PASS/APOP/AUTH is unanswered only its SASL responses go on, one per `+`.
            if self.auth_in_flight() && (!self.rx.in_sasl() || self.sasl_credit == 0) {
                return None;
            }
            let step = self.rx.next(&self.cbuf);
            self.cbuf.drain(..step.consumed);
            let event = step.event?;
            // A parsed client event is acted on now: whatever we wait for next starts here.
            self.deadline = Instant::now() + session.listener.timeouts.idle;
            let result = match event {
                ClientEvent::SaslResponse(line) => {
                    self.sasl_credit = self.sasl_credit.saturating_sub(1);
                    write_timed(backend, &line.canonical(), session)
                        .await
                        .map_err(|e| EndReason::backend_io(&e))
                }
                event => {
                    self.commands += 1;
                    if self.commands > session.listener.limits.preauth_commands {
                        let _ = write_timed(client, &reply::err_too_many_commands(), session).await;
                        return Some(Outcome::End(EndReason::client_violation(
                            "too many commands before authentication".to_owned(),
                        )));
                    }
                    match event {
                        ClientEvent::Command(cmd) => {
                            self.on_decision(
                                policy::after_tls(self.listener, &cmd),
                                client,
                                backend,
                                session,
                            )
                            .await
                        }
                        ClientEvent::Rejected(rejection) => {
                            let out = rejection.reply();
                            if rejection.fatal {
                                let _ = write_timed(client, &out, session).await;
                                return Some(Outcome::End(EndReason::client_violation(
                                    rejection.error.to_string(),
                                )));
                            }
                            write_timed(client, &out, session)
                                .await
                                .map_err(|e| EndReason::client_io(&e))
                        }
                        ClientEvent::SaslResponse(_) => Ok(()),
                    }
                }
            };
            if let Err(reason) = result {
                return Some(Outcome::End(reason));
            }
        }
    }

    async fn on_decision<S: Transport>(
        &mut self,
        decision: Decision,
        client: &mut ClientStream<S>,
        backend: &mut BackendStream,
        session: &Session,
    ) -> Result<(), EndReason> {
        match decision {
            Decision::Forward { request, expect } => {
                let sent = match &request {
                    _ if matches!(expect, Expect::Authentication | Expect::Sasl) => {
                        Sent::Auth(request.log_name())
                    }
                    Request::Capa => Sent::Capa,
                    Request::AuthList => Sent::Mechanisms,
                    Request::Quit => {
                        self.quit = true;
                        Sent::Quit
                    }
                    _ => Sent::Other,
                };
                self.sent.push_back(sent);
                self.srx.expect(expect);
                if expect == Expect::Sasl {
                    self.rx.begin_sasl();
                }
                write_timed(backend, &request.canonical(), session)
                    .await
                    .map_err(|e| EndReason::backend_io(&e))
            }
            Decision::Reply(answer) => write_timed(client, &answer, session)
                .await
                .map_err(|e| EndReason::client_io(&e)),
        }
    }
}

fn log_auth(session: &Session, mechanism: &str, ok: bool) {
    session.listener.metrics.auth_outcome(if ok {
        AuthResult::Success
    } else {
        AuthResult::Failure
    });
    tracing::info!(
        listener = %session.listener.config.name,
        protocol = "pop3",
        client = %session.client_addr,
        result = if ok { "success" } else { "failure" },
        mechanism,
        cipher = %session.tls.as_ref().map_or("none".into(), crate::tls::TlsInfo::cipher_name),
        "authentication"
    );
}
