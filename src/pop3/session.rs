//! The POP3 session driver: the sans-I/O pieces of [`crate::pop3`] wired to a client stream and
//! a backend connection for the AUTHORIZATION state, then the plain byte relay.
//!
//! Before TLS on a `starttls` listener (110) USER, PASS, APOP and AUTH are answered here with one
//! fixed `-ERR` and never forwarded (RFC 8314 §4.1); STLS is answered here and whatever was
//! pipelined after it is dropped (RFC 2595 §4, CERT VU#555316). CAPA is rewritten for the
//! client's view. PASS/APOP/AUTH hold every later client byte until the backend's answer:
//! `+OK` → relay (RFC 1939 §6), `-ERR` → keep parsing. During AUTH one client line goes to the
//! backend per `+` challenge it sent (RFC 5034 §4): a line pipelined past the exchange (say
//! `XCLIENT`, which Dovecot trusts from mailfront) would otherwise reach the backend as a
//! command nobody checked.
//!
//! Timeouts: a wait for the backend starts when something is forwarded; client bytes that are
//! only held do not extend it.

use std::collections::VecDeque;

use tokio::io::AsyncReadExt;
use tokio::time::Instant;

use crate::backend::BackendStream;
use crate::metrics::AuthResult;
use crate::pop3::capa::{self, CapaView};
use crate::pop3::codec::{
    ClientEvent, Command, CommandLimits, CommandReceiver, Expect, ResponseLimits, ResponseReceiver,
    ServerEvent, Status,
};
use crate::pop3::policy::{self, Decision, GateState};
use crate::pop3::reply;
use crate::session::{ClientStream, EndReason, Session, upgrade_client, write_timed};

const READ_CHUNK: usize = 16 * 1024;

/// Serves one POP3 client connection from the backend greeting to the close.
pub async fn serve(client: ClientStream, session: &mut Session) -> EndReason {
    let mut client = client;
    let mut backend = match session.connect_backend().await {
        Ok(b) => b,
        Err(_) => {
            let _ = write_timed(&mut client, &reply::err_unavailable(), session).await;
            client.close().await;
            return EndReason::BackendUnavailable;
        }
    };
    let mut driver = Driver::new(session);
    let mut outcome = driver.run(&mut client, &mut backend, session).await;
    loop {
        match outcome {
            Outcome::End(reason) => {
                client.close().await;
                return reason;
            }
            Outcome::StartTls => {
                match upgrade_client(client, &session.listener, session.client_addr).await {
                    Ok((upgraded, info, took)) => {
                        client = upgraded;
                        session.tls_established(info, took, true);
                        driver.tls_started(session);
                    }
                    Err(reason) => return reason,
                }
            }
            Outcome::Authenticated => {
                let held_client = std::mem::take(&mut driver.cbuf);
                let held_backend = std::mem::take(&mut driver.bbuf);
                drop(driver);
                return session
                    .relay_after_login(&mut client, &mut backend, &held_client, &held_backend)
                    .await;
            }
        }
        outcome = driver.run(&mut client, &mut backend, session).await;
    }
}

enum Outcome {
    StartTls,
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

struct Driver {
    rx: CommandReceiver,
    rx_limits: CommandLimits,
    srx: ResponseReceiver,
    gate: GateState,
    cbuf: Vec<u8>,
    bbuf: Vec<u8>,
    hold_limit: usize,
    greeted: bool,
    /// Forwarded commands in order, parallel to the response receiver's expectations.
    sent: VecDeque<Sent>,
    commands: usize,
    starttls: Option<Vec<u8>>,
    quit: bool,
    /// `+` challenges the backend sent during AUTH that the client has not answered yet.
    sasl_credit: usize,
    deadline: Instant,
}

impl Driver {
    fn new(session: &Session) -> Driver {
        let limits = &session.listener.limits;
        let rx_limits = CommandLimits {
            command: limits.pop3_line.max(16),
            ..CommandLimits::default()
        };
        let listener = session.listener.config.tls;
        Driver {
            rx: CommandReceiver::new(rx_limits),
            rx_limits,
            srx: ResponseReceiver::new(ResponseLimits::default()),
            gate: GateState {
                listener,
                tls_active: session.tls.is_some(),
            },
            cbuf: Vec::new(),
            bbuf: Vec::new(),
            hold_limit: rx_limits.sasl_line.max(rx_limits.command) + READ_CHUNK,
            greeted: false,
            sent: VecDeque::new(),
            commands: 0,
            starttls: None,
            quit: false,
            sasl_credit: 0,
            deadline: Instant::now() + session.listener.timeouts.idle,
        }
    }

    fn view(&self) -> CapaView {
        if self.gate.tls_active {
            CapaView::Tls
        } else {
            CapaView::Cleartext
        }
    }

    fn tls_started(&mut self, session: &Session) {
        self.gate.tls_active = true;
        self.rx = CommandReceiver::new(self.rx_limits);
        self.cbuf.clear();
        self.starttls = None;
        self.deadline = Instant::now() + session.listener.timeouts.idle;
    }

    /// An authentication command is forwarded and unanswered: hold the client's later bytes.
    fn auth_in_flight(&self) -> bool {
        self.sent.iter().any(|s| matches!(s, Sent::Auth(_)))
    }

    async fn run(
        &mut self,
        client: &mut ClientStream,
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
            if let Some(ok) = &self.starttls
                && self.sent.is_empty()
            {
                // Nothing pipelined after STLS may run after the upgrade.
                self.cbuf.clear();
                if let Err(e) = write_timed(client, ok, session).await {
                    return Outcome::End(EndReason::IoError(e.to_string()));
                }
                return Outcome::StartTls;
            }
            let read_client =
                self.greeted && self.starttls.is_none() && self.cbuf.len() < self.hold_limit;
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
                    Err(e) => return Outcome::End(EndReason::IoError(e.to_string())),
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
                        return Outcome::End(EndReason::IoError(e.to_string()));
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

    async fn on_backend(
        &mut self,
        client: &mut ClientStream,
        session: &Session,
    ) -> Option<Outcome> {
        loop {
            let step = self.srx.next(&self.bbuf);
            self.bbuf.drain(..step.consumed);
            let event = step.event?;
            let response = match event {
                ServerEvent::Rejected(e) => {
                    let _ = write_timed(client, &reply::err_unavailable(), session).await;
                    return Some(Outcome::End(EndReason::ProtocolViolation(format!(
                        "backend: {e}"
                    ))));
                }
                ServerEvent::Greeting(greeting) => {
                    self.greeted = true;
                    let shown = capa::rewrite_greeting(&greeting.raw);
                    if let Err(e) = write_timed(client, &shown, session).await {
                        return Some(Outcome::End(EndReason::IoError(e.to_string())));
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
                (Some(Sent::Capa), Status::Ok) => capa::rewrite_capa(&response.raw, self.view()),
                (Some(Sent::Mechanisms), Status::Ok) => capa::rewrite_mechanisms(&response.raw),
                _ => response.raw.clone(),
            };
            if let Err(e) = write_timed(client, &shown, session).await {
                return Some(Outcome::End(EndReason::IoError(e.to_string())));
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

    async fn on_client(
        &mut self,
        client: &mut ClientStream,
        backend: &mut BackendStream,
        session: &Session,
    ) -> Option<Outcome> {
        loop {
            if self.starttls.is_some() {
                return None;
            }
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
                ClientEvent::Command(cmd) => {
                    self.commands += 1;
                    if self.commands > session.listener.limits.preauth_commands {
                        let _ = write_timed(client, &reply::err_too_many_commands(), session).await;
                        return Some(Outcome::End(EndReason::ProtocolViolation(
                            "too many commands before authentication".to_owned(),
                        )));
                    }
                    self.on_command(cmd, client, backend, session).await
                }
                ClientEvent::SaslResponse { raw, .. } => {
                    self.sasl_credit = self.sasl_credit.saturating_sub(1);
                    write_timed(backend, &raw, session).await
                }
                ClientEvent::Rejected(rejection) => {
                    let out = rejection.reply();
                    if rejection.fatal {
                        let _ = write_timed(client, &out, session).await;
                        return Some(Outcome::End(EndReason::ProtocolViolation(
                            rejection.error.to_string(),
                        )));
                    }
                    write_timed(client, &out, session).await
                }
            };
            if let Err(e) = result {
                return Some(Outcome::End(EndReason::IoError(e.to_string())));
            }
        }
    }

    async fn on_command(
        &mut self,
        cmd: Command,
        client: &mut ClientStream,
        backend: &mut BackendStream,
        session: &Session,
    ) -> Result<(), std::io::Error> {
        match policy::decide(&self.gate, &cmd) {
            Decision::Forward { expect } => {
                let sent = match expect {
                    Expect::Authentication | Expect::Sasl => Sent::Auth(mechanism(&cmd)),
                    _ if cmd.is("CAPA") => Sent::Capa,
                    _ if cmd.is("AUTH") => Sent::Mechanisms,
                    _ if cmd.is("QUIT") => {
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
                write_timed(backend, &cmd.raw, session).await
            }
            Decision::Reply(answer) => {
                // A bare AUTH is mechanism discovery (RFC 1734 style), not an attempt: refused
                // before TLS like the rest, but not counted as one.
                let discovery = cmd.is("AUTH") && !cmd.has_arguments();
                let credential =
                    !discovery && ["USER", "PASS", "APOP", "AUTH"].iter().any(|k| cmd.is(k));
                if credential && !self.gate.tls_active {
                    session.listener.metrics.cleartext_auth_refused.inc();
                    tracing::info!(
                        listener = %session.listener.config.name,
                        protocol = "pop3",
                        client = %session.client_addr,
                        result = "refused_cleartext",
                        mechanism = mechanism(&cmd),
                        cipher = "none",
                        "authentication"
                    );
                }
                write_timed(client, &answer, session).await
            }
            Decision::StartTls(ok) => {
                self.starttls = Some(ok);
                Ok(())
            }
        }
    }
}

/// The command keyword and, for AUTH, the mechanism; never an argument that could be a secret.
fn mechanism(cmd: &Command) -> String {
    let keyword = String::from_utf8_lossy(&cmd.keyword).into_owned();
    if !cmd.is("AUTH") {
        return keyword;
    }
    let args = cmd.arguments();
    let end = args.iter().position(|&b| b == b' ').unwrap_or(args.len());
    let mech: String = String::from_utf8_lossy(args.get(..end).unwrap_or_default())
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .take(40)
        .collect();
    format!("AUTH {}", mech.to_ascii_uppercase())
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
        cipher = session.tls.as_ref().map(|t| t.cipher.as_str()).unwrap_or("none"),
        "authentication"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pop3::codec::{ClientEvent, CommandReceiver};

    fn command(line: &[u8]) -> Command {
        match CommandReceiver::default().next(line).event {
            Some(ClientEvent::Command(cmd)) => cmd,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_logged_mechanism_never_carries_credentials() {
        assert_eq!(mechanism(&command(b"pass s3cret\r\n")), "PASS");
        assert_eq!(mechanism(&command(b"APOP alice 0123abcd\r\n")), "APOP");
        assert_eq!(
            mechanism(&command(b"AUTH plain AGFsaWNlAHMzY3JldA==\r\n")),
            "AUTH PLAIN"
        );
    }
}
