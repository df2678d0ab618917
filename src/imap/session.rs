//! The IMAP session driver: the sans-I/O pieces of [`crate::imap`] wired to a client stream and
//! a backend connection, until the backend accepts authentication; then the plain byte relay.
//!
//! Order of a session (RFC 9051 §6.2, RFC 8314 §4, draft-ietf-uta-email-deep §7.1):
//! 1. Backend greeting: `* PREAUTH` is never relayed ([`reply::bye_preauth`]); the capability
//!    list is rewritten for the client's view and remembered (does the backend know ID?). A
//!    greeting without `[CAPABILITY …]` makes us ask with our own tagged CAPABILITY, whose
//!    answer the client never sees.
//! 2. Client commands go through [`policy::decide`]. Before TLS on a `starttls` listener no
//!    credential is forwarded; STARTTLS is answered here and everything pipelined after it is
//!    dropped (CERT VU#555316).
//! 3. A client ID is rewritten with our `tls` field. Before the first LOGIN/AUTHENTICATE without a
//!    client ID we send our own ID and swallow its answer, so the backend learns the cipher
//!    exactly once before authentication.
//! 4. LOGIN/AUTHENTICATE is forwarded and every later client byte held until its tagged
//!    completion: OK → relay; NO/BAD → keep parsing (RFC 9051 §6.2.2, protocol-reference §3.5).
//!    During AUTHENTICATE one client line goes to the backend per `+` it sent: a line pipelined
//!    past the exchange would otherwise reach the backend as a command nobody checked.
//!
//! Timeouts: a wait for the backend starts when something is forwarded; client bytes that are
//! only held (not parsed) do not extend it, so a silent backend cannot be kept alive by a
//! trickling client.

use tokio::io::AsyncReadExt;
use tokio::time::Instant;

use crate::backend::BackendStream;
use crate::imap::capability::{self, CapabilityView};
use crate::imap::codec::{self, ClientEvent, CommandReceiver, CommandStart};
use crate::imap::id;
use crate::imap::policy::{self, Decision, GateState};
use crate::imap::reply;
use crate::imap::response::{ResponseLimits, ResponseReceiver, ServerEvent, Status};
use crate::metrics::{AuthResult, IdSource};
use crate::session::{ClientStream, EndReason, Session, upgrade_client, write_timed};

/// One read from either side.
const READ_CHUNK: usize = 16 * 1024;

/// Serves one IMAP client connection from the backend greeting to the close.
pub async fn serve(client: ClientStream, session: &mut Session) -> EndReason {
    let mut client = client;
    let mut backend = match session.connect_backend().await {
        Ok(b) => b,
        Err(_) => {
            let _ = write_timed(&mut client, &reply::bye_unavailable(), session).await;
            client.close().await;
            return EndReason::BackendUnavailable;
        }
    };
    let mut driver = Driver::new(session);
    let mut outcome = driver.greet(&mut client, &mut backend, session).await;
    loop {
        match outcome {
            Outcome::Continue => {}
            Outcome::End(reason) => {
                client.close().await;
                return reason;
            }
            Outcome::StartTls => {
                // The pipelined bytes were dropped by the driver; the handshake reads the socket.
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

/// The mechanism of an AUTHENTICATE or `LOGIN`, for logs (never the credentials).
fn mechanism(cmd: &CommandStart) -> String {
    if cmd.is("LOGIN") {
        return "LOGIN".to_owned();
    }
    let args = cmd.arguments();
    let end = args.iter().position(|&b| b == b' ').unwrap_or(args.len());
    let mech = args.get(..end).unwrap_or_default();
    let mech: String = String::from_utf8_lossy(mech)
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .take(40)
        .collect();
    format!("AUTHENTICATE {}", mech.to_ascii_uppercase())
}

/// What the driver asks its caller to do next.
enum Outcome {
    Continue,
    StartTls,
    Authenticated,
    End(EndReason),
}

/// Our own command in flight; its responses are swallowed.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Own {
    Capability(Vec<u8>),
    Id(Vec<u8>),
}

impl Own {
    fn tag(&self) -> &[u8] {
        match self {
            Own::Capability(t) | Own::Id(t) => t,
        }
    }
}

/// A forwarded LOGIN/AUTHENTICATE waiting for its tagged completion.
struct Auth {
    tag: Vec<u8>,
    mechanism: String,
}

struct Driver {
    rx: CommandReceiver,
    rx_limits: codec::Limits,
    srx: ResponseReceiver,
    gate: GateState,
    /// Unparsed client bytes (also the bytes held while authentication is in flight).
    cbuf: Vec<u8>,
    /// Unparsed backend bytes.
    bbuf: Vec<u8>,
    /// Client bytes we hold at most while not parsing them.
    hold_limit: usize,
    own: Option<Own>,
    /// LOGIN/AUTHENTICATE waiting for our ID's completion before it is forwarded.
    deferred: Option<(CommandStart, bool)>,
    auth: Option<Auth>,
    /// `+` continuations the backend sent during AUTHENTICATE and the client has not answered
    /// yet: how many SASL response lines may go on.
    sasl_credit: usize,
    /// The forwarded command whose literal is still to come (for a refused synchronising one).
    streaming_tag: Option<Vec<u8>>,
    /// Client commands forwarded and not yet completed.
    outstanding: usize,
    commands: usize,
    starttls: Option<Vec<u8>>,
    logout: bool,
    deadline: Instant,
}

impl Driver {
    fn new(session: &Session) -> Driver {
        let limits = &session.listener.limits;
        let line = limits.imap_line.max(64);
        let rx_limits = codec::Limits {
            line,
            literal: limits.imap_literal,
            collect: codec::DEFAULT_COLLECT_LIMIT.max(line),
        };
        let listener = session.listener.config.tls;
        Driver {
            rx: CommandReceiver::new(rx_limits),
            rx_limits,
            srx: ResponseReceiver::new(ResponseLimits::default()),
            gate: GateState {
                listener,
                tls_active: session.tls.is_some(),
                backend_has_id: false,
                backend_has_sasl_ir: false,
                id_sent: false,
            },
            cbuf: Vec::new(),
            bbuf: Vec::new(),
            hold_limit: line + limits.imap_literal.min(65536) + READ_CHUNK,
            own: None,
            deferred: None,
            auth: None,
            sasl_credit: 0,
            streaming_tag: None,
            outstanding: 0,
            commands: 0,
            starttls: None,
            logout: false,
            deadline: Instant::now() + session.listener.timeouts.idle,
        }
    }

    fn view(&self) -> CapabilityView {
        if self.gate.tls_active {
            CapabilityView::Tls
        } else {
            CapabilityView::Cleartext
        }
    }

    fn tls_started(&mut self, session: &Session) {
        self.gate.tls_active = true;
        self.rx = CommandReceiver::new(self.rx_limits);
        self.cbuf.clear();
        self.starttls = None;
        self.deadline = Instant::now() + session.listener.timeouts.idle;
    }

    fn learn(&mut self, raw: &[u8]) {
        if let Some(tokens) = capability::capabilities(raw) {
            let has = |name: &[u8]| tokens.iter().any(|t| t.eq_ignore_ascii_case(name));
            self.gate.backend_has_id = has(b"ID");
            self.gate.backend_has_sasl_ir = has(b"SASL-IR");
        }
    }

    /// Reads the backend greeting and relays it (rewritten) to the client.
    async fn greet(
        &mut self,
        client: &mut ClientStream,
        backend: &mut BackendStream,
        session: &Session,
    ) -> Outcome {
        let greeting = loop {
            let step = self.srx.next(&self.bbuf);
            self.bbuf.drain(..step.consumed);
            match step.event {
                Some(ServerEvent::Greeting(g)) => break g,
                Some(ServerEvent::Rejected(e)) => {
                    let _ = write_timed(client, &reply::bye_unavailable(), session).await;
                    return Outcome::End(EndReason::ProtocolViolation(format!("backend: {e}")));
                }
                Some(ServerEvent::Response(_)) => {
                    // The receiver reports the first response as a greeting or a rejection.
                    let _ = write_timed(client, &reply::bye_unavailable(), session).await;
                    return Outcome::End(EndReason::ProtocolViolation(
                        "backend: no greeting".to_owned(),
                    ));
                }
                None => {}
            }
            let mut chunk = [0u8; 4096];
            let read = tokio::select! {
                r = tokio::time::timeout(session.listener.timeouts.idle, backend.read(&mut chunk)) => r,
                () = session.shutdown.cancelled() => {
                    let _ = write_timed(client, &reply::bye_shutdown(), session).await;
                    return Outcome::End(EndReason::Shutdown);
                }
            };
            match read {
                Err(_) => {
                    let _ = write_timed(client, &reply::bye_unavailable(), session).await;
                    return Outcome::End(EndReason::BackendTimeout);
                }
                Ok(Ok(0)) => {
                    let _ = write_timed(client, &reply::bye_unavailable(), session).await;
                    return Outcome::End(EndReason::BackendClosed);
                }
                Ok(Ok(n)) => self
                    .bbuf
                    .extend_from_slice(chunk.get(..n).unwrap_or_default()),
                Ok(Err(e)) => {
                    let _ = write_timed(client, &reply::bye_unavailable(), session).await;
                    return Outcome::End(EndReason::IoError(e.to_string()));
                }
            }
        };
        match greeting.status {
            Some(Status::PreAuth) => {
                tracing::warn!(listener = %session.listener.config.name, client = %session.client_addr, "backend greeted with PREAUTH; refusing the session");
                let _ = write_timed(client, &reply::bye_preauth(), session).await;
                return Outcome::End(EndReason::ProtocolViolation(
                    "backend greeted with PREAUTH".to_owned(),
                ));
            }
            Some(Status::Bye) => {
                let _ = write_timed(client, &greeting.raw, session).await;
                return Outcome::End(EndReason::BackendClosed);
            }
            _ => {}
        }
        let known = capability::capabilities(&greeting.raw).is_some();
        self.learn(&greeting.raw);
        let shown =
            capability::rewrite_response(&greeting.raw, self.view()).unwrap_or(greeting.raw);
        if let Err(e) = write_timed(client, &shown, session).await {
            return Outcome::End(EndReason::IoError(e.to_string()));
        }
        if !known {
            // Learn whether the backend supports ID without showing the client anything.
            let tag = id::mailfront_tag(fastrand::u64(..));
            let mut cmd = tag.clone();
            cmd.extend_from_slice(b" CAPABILITY\r\n");
            if let Err(e) = write_timed(backend, &cmd, session).await {
                return Outcome::End(EndReason::IoError(e.to_string()));
            }
            self.own = Some(Own::Capability(tag));
        }
        Outcome::Continue
    }

    /// The pre-authentication loop: parse both sides until STARTTLS, authentication or the end.
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
            match self.on_backend(client, backend, session).await {
                Outcome::Continue => {}
                other => return other,
            }
            match self.on_client(client, backend, session).await {
                Outcome::Continue => {}
                other => return other,
            }
            if let Some(ok) = &self.starttls
                && self.outstanding == 0
                && self.own.is_none()
            {
                // Nothing pipelined after STARTTLS may run after the upgrade.
                self.cbuf.clear();
                if let Err(e) = write_timed(client, ok, session).await {
                    return Outcome::End(EndReason::IoError(e.to_string()));
                }
                return Outcome::StartTls;
            }
            let read_client = self.starttls.is_none() && self.cbuf.len() < self.hold_limit;
            // After a SASL `+` it is the client's turn.
            let waiting_backend =
                (self.outstanding > 0 || self.own.is_some()) && self.sasl_credit == 0;
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
                        return Outcome::End(if self.logout {
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
                        let _ = write_timed(client, &reply::bye_unavailable(), session).await;
                        return Outcome::End(EndReason::IoError(e.to_string()));
                    }
                },
                () = tokio::time::sleep_until(self.deadline) => {
                    return if waiting_backend {
                        let _ = write_timed(client, &reply::bye_unavailable(), session).await;
                        Outcome::End(EndReason::BackendTimeout)
                    } else {
                        let _ = write_timed(client, &reply::bye_idle_timeout(), session).await;
                        Outcome::End(EndReason::ClientIdle)
                    };
                }
                () = session.shutdown.cancelled() => {
                    let _ = write_timed(client, &reply::bye_shutdown(), session).await;
                    return Outcome::End(EndReason::Shutdown);
                }
            }
        }
    }

    /// Handles every complete backend response in the buffer.
    async fn on_backend(
        &mut self,
        client: &mut ClientStream,
        backend: &mut BackendStream,
        session: &Session,
    ) -> Outcome {
        loop {
            let step = self.srx.next(&self.bbuf);
            self.bbuf.drain(..step.consumed);
            let response = match step.event {
                None => return Outcome::Continue,
                Some(ServerEvent::Rejected(e)) => {
                    let _ = write_timed(client, &reply::bye_unavailable(), session).await;
                    return Outcome::End(EndReason::ProtocolViolation(format!("backend: {e}")));
                }
                Some(ServerEvent::Greeting(r) | ServerEvent::Response(r)) => r,
            };
            // Our own CAPABILITY or ID: learn, swallow, then release what waited for it.
            if let Some(own) = self.own.clone() {
                if response.completion_of(own.tag()).is_some() {
                    self.own = None;
                    if let Some((cmd, sasl)) = self.deferred.take()
                        && let Err(e) = self.forward_auth(cmd, sasl, backend, session).await
                    {
                        return Outcome::End(EndReason::IoError(e.to_string()));
                    }
                    continue;
                }
                match own {
                    Own::Capability(_) if response.is_capability_data() => {
                        self.learn(&response.raw);
                        continue;
                    }
                    Own::Id(_) if response.is_id_data() => continue,
                    _ => {}
                }
            }
            if response.is_continuation() && self.auth.is_some() && self.rx.in_sasl() {
                self.sasl_credit = self.sasl_credit.saturating_add(1);
            }
            let completed = match &response.kind {
                crate::imap::response::ResponseKind::Tagged { tag } => Some(tag.clone()),
                _ => None,
            };
            if let Some(tag) = &completed {
                self.outstanding = self.outstanding.saturating_sub(1);
                if self.streaming_tag.as_ref() == Some(tag) {
                    self.streaming_tag = None;
                    if self.rx.awaits_synchronizing_literal() {
                        // Refused before the `+`: the client will not send the literal.
                        self.rx.discard_command();
                    }
                }
                if let Some(auth) = &self.auth
                    && &auth.tag == tag
                {
                    let ok = response.status == Some(Status::Ok);
                    self.log_auth(session, ok);
                    self.auth = None;
                    self.sasl_credit = 0;
                    if ok {
                        // Post-authentication capabilities pass untouched (RFC 9051 §6.2.2).
                        if let Err(e) = write_timed(client, &response.raw, session).await {
                            return Outcome::End(EndReason::IoError(e.to_string()));
                        }
                        return Outcome::Authenticated;
                    }
                    self.rx.end_sasl();
                }
            }
            self.learn(&response.raw);
            let shown =
                capability::rewrite_response(&response.raw, self.view()).unwrap_or(response.raw);
            if let Err(e) = write_timed(client, &shown, session).await {
                return Outcome::End(EndReason::IoError(e.to_string()));
            }
        }
    }

    fn log_auth(&self, session: &Session, ok: bool) {
        let metrics = &session.listener.metrics;
        metrics.auth_outcome(if ok {
            AuthResult::Success
        } else {
            AuthResult::Failure
        });
        let mechanism = self
            .auth
            .as_ref()
            .map(|a| a.mechanism.as_str())
            .unwrap_or("-");
        tracing::info!(
            listener = %session.listener.config.name,
            protocol = "imap",
            client = %session.client_addr,
            result = if ok { "success" } else { "failure" },
            mechanism,
            cipher = session.tls.as_ref().map(|t| t.cipher.as_str()).unwrap_or("none"),
            "authentication"
        );
    }

    /// Handles client events while nothing forces us to wait.
    async fn on_client(
        &mut self,
        client: &mut ClientStream,
        backend: &mut BackendStream,
        session: &Session,
    ) -> Outcome {
        loop {
            if self.own.is_some() || self.starttls.is_some() {
                return Outcome::Continue;
            }
            // While LOGIN/AUTHENTICATE is in flight only its own remaining parts go on, and a
            // SASL response only when the backend asked for one (RFC 9051 §6.2.2).
            if self.auth.is_some()
                && (self.rx.is_idle() || (self.rx.in_sasl() && self.sasl_credit == 0))
            {
                return Outcome::Continue;
            }
            let step = self.rx.next(&self.cbuf);
            self.cbuf.drain(..step.consumed);
            let Some(event) = step.event else {
                return Outcome::Continue;
            };
            // A parsed client event is acted on now: whatever we wait for next starts here.
            self.deadline = Instant::now() + session.listener.timeouts.idle;
            let result = match event {
                ClientEvent::Command(cmd) => {
                    self.commands += 1;
                    if self.commands > session.listener.limits.preauth_commands {
                        let _ = write_timed(client, &reply::bye_too_many_commands(), session).await;
                        return Outcome::End(EndReason::ProtocolViolation(
                            "too many commands before authentication".to_owned(),
                        ));
                    }
                    self.on_command(cmd, client, backend, session).await
                }
                ClientEvent::Segment(segment) => {
                    if segment.literal.is_none() {
                        self.streaming_tag = None;
                    }
                    write_timed(backend, &segment.raw, session).await
                }
                ClientEvent::Literal(octets) => write_timed(backend, &octets, session).await,
                ClientEvent::SaslResponse(line) => {
                    self.sasl_credit = self.sasl_credit.saturating_sub(1);
                    write_timed(backend, &line.raw, session).await
                }
                ClientEvent::ContinuationRequired(_) => {
                    write_timed(client, &reply::continuation(), session).await
                }
                ClientEvent::Collected(collected) => {
                    self.on_client_id(&collected.tag, &collected.raw, client, backend, session)
                        .await
                }
                ClientEvent::Rejected(rejection) => {
                    let mut out = rejection.reply();
                    if rejection.fatal {
                        out.extend_from_slice(&reply::bye_protocol_error());
                        let _ = write_timed(client, &out, session).await;
                        return Outcome::End(EndReason::ProtocolViolation(
                            rejection.error.to_string(),
                        ));
                    }
                    write_timed(client, &out, session).await
                }
            };
            if let Err(e) = result {
                return Outcome::End(EndReason::IoError(e.to_string()));
            }
        }
    }

    async fn on_command(
        &mut self,
        cmd: CommandStart,
        client: &mut ClientStream,
        backend: &mut BackendStream,
        session: &Session,
    ) -> Result<(), std::io::Error> {
        match policy::decide(&self.gate, &cmd) {
            Decision::Forward => {
                if cmd.is("LOGOUT") {
                    self.logout = true;
                }
                self.outstanding += 1;
                self.streaming_tag = cmd.literal.map(|_| cmd.tag.clone());
                write_timed(backend, &cmd.raw, session).await
            }
            Decision::Authenticate { inject_id, sasl } => {
                if inject_id {
                    let tag = id::mailfront_tag(fastrand::u64(..));
                    let cipher = session
                        .tls
                        .as_ref()
                        .map(|t| t.cipher.clone())
                        .unwrap_or_default();
                    let ours = id::build_id_command(&tag, &[("tls", cipher.as_str())]);
                    write_timed(backend, &ours, session).await?;
                    session.listener.metrics.id_field_added(IdSource::Proxy);
                    self.gate.id_sent = true;
                    self.own = Some(Own::Id(tag));
                    self.deferred = Some((cmd, sasl));
                    return Ok(());
                }
                self.forward_auth(cmd, sasl, backend, session).await
            }
            Decision::RewriteId => {
                self.rx.collect_command();
                Ok(())
            }
            Decision::Reply(answer) => {
                if (cmd.is("LOGIN") || cmd.is("AUTHENTICATE")) && !self.gate.tls_active {
                    session.listener.metrics.cleartext_auth_refused.inc();
                    tracing::info!(
                        listener = %session.listener.config.name,
                        protocol = "imap",
                        client = %session.client_addr,
                        result = "refused_cleartext",
                        mechanism = mechanism(&cmd),
                        cipher = "none",
                        "authentication"
                    );
                }
                self.rx.discard_command();
                write_timed(client, &answer, session).await
            }
            Decision::StartTls(ok) => {
                self.starttls = Some(ok);
                Ok(())
            }
        }
    }

    async fn forward_auth(
        &mut self,
        cmd: CommandStart,
        sasl: bool,
        backend: &mut BackendStream,
        session: &Session,
    ) -> Result<(), std::io::Error> {
        self.outstanding += 1;
        self.streaming_tag = cmd.literal.map(|_| cmd.tag.clone());
        self.auth = Some(Auth {
            tag: cmd.tag.clone(),
            mechanism: mechanism(&cmd),
        });
        if sasl {
            self.rx.begin_sasl();
        }
        write_timed(backend, &cmd.raw, session).await
    }

    async fn on_client_id(
        &mut self,
        tag: &[u8],
        raw: &[u8],
        client: &mut ClientStream,
        backend: &mut BackendStream,
        session: &Session,
    ) -> Result<(), std::io::Error> {
        match id::parse_id_command(raw) {
            Ok(parsed) => {
                let cipher = session
                    .tls
                    .as_ref()
                    .map(|t| t.cipher.clone())
                    .unwrap_or_default();
                let rewritten = id::rewrite_client_id(&parsed, &[("tls", cipher.as_str())]);
                self.outstanding += 1;
                self.gate.id_sent = true;
                session.listener.metrics.id_field_added(IdSource::Client);
                write_timed(backend, &rewritten, session).await
            }
            Err(_) => write_timed(client, &reply::id_malformed(tag), session).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::imap::codec::{ClientEvent, CommandReceiver};

    fn first_command(line: &[u8]) -> CommandStart {
        match CommandReceiver::default().next(line).event {
            Some(ClientEvent::Command(cmd)) => cmd,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_logged_mechanism_never_carries_credentials() {
        assert_eq!(
            mechanism(&first_command(b"a LOGIN alice s3cret\r\n")),
            "LOGIN"
        );
        assert_eq!(
            mechanism(&first_command(
                b"a authenticate plain AGFsaWNlAHMzY3JldA==\r\n"
            )),
            "AUTHENTICATE PLAIN"
        );
        assert_eq!(
            mechanism(&first_command(b"a AUTHENTICATE scram-sha-256 =\r\n")),
            "AUTHENTICATE SCRAM-SHA-256"
        );
    }
}
