//! What the IMAP and POP3 pre-login phases share: the vocabulary between a protocol's sans-I/O
//! not-authenticated state machine and the one I/O loop that drives it.
//!
//! Both protocols run the same phases before login (RFC 8314 §4.1): on a STARTTLS listener a
//! cleartext dialogue answered locally with no backend, the TLS handshake, the backend connection,
//! then only commands the gate parsed reach the backend, re-encoded, until the backend accepts a
//! login and the session becomes a plain relay. The phases and their transitions are the same;
//! only the bytes differ. So a protocol supplies a [`Machine`] (its parser, gate and reply texts)
//! and the loop that moves bytes, runs the handshake, connects and keeps the timers is written
//! once.

use tokio::io::AsyncReadExt;
use tokio::time::Instant;

use crate::backend::BackendStream;
use crate::line::Step;
use crate::metrics::{AuthResult, IdSource};
use crate::session::{ClientStream, EndReason, LoginCharge, Session, upgrade_client, write_timed};
use crate::transport::Transport;

/// What the driver must do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Keep reading (and write whatever output is pending).
    Run,
    /// Connect to the backend, then call [`Machine::backend_connected`].
    Connect,
    /// Write pending output, then run the TLS handshake on the client stream and call
    /// [`Machine::tls_started`]. Everything the client pipelined after STARTTLS/STLS was
    /// dropped.
    StartTls,
    /// The backend accepted a login: write pending output, then relay, sending
    /// [`Machine::held`] first.
    Authenticated,
    /// Write pending output and close.
    End(End),
    /// The machine parsed a login it would send (IMAP LOGIN/AUTHENTICATE, POP3 PASS/APOP/AUTH)
    /// and holds it: charge it against `limits.auth_failures_per_ip`
    /// ([`Session::charge_login`]), keep the charge, and call [`Machine::login_charge`] with
    /// whether it was granted. Nothing of the login went out yet.
    ChargeLogin,
}

/// Why the not-authenticated phase ended without a login.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// LOGOUT/QUIT, or the client closed.
    ClientClosed,
    BackendClosed,
    /// The backend refused service in a greeting the client never sees (POP3 `-ERR` after STLS,
    /// when the client already had mailfront's greeting): the client was told the service is
    /// unavailable.
    BackendUnavailable,
    /// The backend broke the protocol (or greeted with IMAP PREAUTH).
    BackendProtocol(String),
    /// The client broke the protocol or a limit badly enough to close.
    ProtocolViolation(String),
}

/// Facts for metrics and logs, drained by the driver with [`Machine::take_notices`]. Never a
/// credential: mechanisms are labels built from parsed commands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// The backend answered a login (IMAP LOGIN/AUTHENTICATE, POP3 PASS/APOP/AUTH); `charge`
    /// says what becomes of the attempt's charge.
    Auth {
        ok: bool,
        mechanism: String,
        charge: Charge,
    },
    /// A login refused because TLS is not active (RFC 8314 §4.1).
    CleartextAuthRefused { mechanism: String },
    /// A login refused here, never forwarded, because the client's address reached
    /// `limits.auth_failures_per_ip`.
    AuthThrottled { mechanism: String },
    /// IMAP only: an ID carrying the `tls` field went to the backend.
    IdFieldAdded(IdSource),
    /// IMAP only: the user name of a LOGIN the gate let through (charged, TLS up), for the close
    /// line; never the password, and SASL payloads are not decoded for it.
    User(Vec<u8>),
    /// `backend_client_info` could not tell the backend the client's address (POP3: CAPA
    /// without XCLIENT, or XCLIENT refused); logged once per listener.
    ClientInfo(crate::client_info::Notice),
}

/// What the backend's answer to a login means for `limits.auth_failures_per_ip`: the machine
/// decides (it knows the protocol), the driver settles the charge it took at
/// [`Next::ChargeLogin`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Charge {
    /// The login succeeded, or no credential was checked (a cancelled SASL exchange): the
    /// attempt does not count.
    Refund,
    /// A refusal: the attempt counts until it leaves the window.
    Keep,
}

/// Where a not-authenticated session stands: the same phases for every protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Before TLS on a STARTTLS listener: no backend.
    Cleartext,
    /// The driver is connecting.
    Connecting,
    /// Waiting for the backend's greeting.
    Greeting,
    /// Commands flow.
    Ready,
    StartTls,
    Authenticated,
    Ended,
}

/// What every machine keeps the same way: its phase and the bytes in and out. A machine holds
/// one and adds its protocol's state beside it.
#[derive(Debug)]
pub(crate) struct Core {
    pub(crate) phase: Phase,
    pub(crate) end: Option<End>,
    /// Client bytes not parsed yet (also those held while the backend works on a login).
    pub(crate) cbuf: Vec<u8>,
    /// Backend bytes not parsed yet.
    pub(crate) bbuf: Vec<u8>,
    pub(crate) to_client: Vec<u8>,
    pub(crate) to_backend: Vec<u8>,
    pub(crate) notices: Vec<Notice>,
}

impl Core {
    /// A session that starts in cleartext (a STARTTLS listener) or with TLS up.
    pub(crate) fn new(tls_active: bool) -> Core {
        Core {
            phase: if tls_active {
                Phase::Connecting
            } else {
                Phase::Cleartext
            },
            end: None,
            cbuf: Vec::new(),
            bbuf: Vec::new(),
            to_client: Vec::new(),
            to_backend: Vec::new(),
            notices: Vec::new(),
        }
    }

    pub(crate) fn next(&self) -> Next {
        match self.phase {
            Phase::Cleartext | Phase::Greeting | Phase::Ready => Next::Run,
            Phase::Connecting => Next::Connect,
            Phase::StartTls => Next::StartTls,
            Phase::Authenticated => Next::Authenticated,
            Phase::Ended => Next::End(self.end.clone().unwrap_or(End::ClientClosed)),
        }
    }

    pub(crate) fn finish(&mut self, end: End) {
        self.phase = Phase::Ended;
        self.end = Some(end);
    }

    /// See [`Machine::wants_client_input`].
    pub(crate) fn wants_client_input(&self, hold_limit: usize) -> bool {
        matches!(
            self.phase,
            Phase::Cleartext | Phase::Greeting | Phase::Ready
        ) && self.cbuf.len() < hold_limit
    }

    /// See [`Machine::held`].
    pub(crate) fn held(&mut self) -> (Vec<u8>, Vec<u8>) {
        (
            std::mem::take(&mut self.cbuf),
            std::mem::take(&mut self.bbuf),
        )
    }
}

/// A machine's side of [`pump_client`]: its parser and where parsed client events go.
pub(crate) trait ClientEvents {
    type Event;
    fn core(&mut self) -> &mut Core;
    /// Whether the state lets the next client event be acted on now.
    fn may_take_event(&self) -> bool;
    /// The next event in `core().cbuf`, which the caller drains.
    fn parse_event(&mut self) -> Step<Self::Event>;
    /// An event before TLS on a STARTTLS listener.
    fn on_cleartext(&mut self, event: Self::Event);
    /// An event with TLS up.
    fn on_event(&mut self, event: Self::Event);
}

/// Parses client events while the state lets the next one be acted on; returns whether any was.
/// The one place where whatever a client pipelined after STARTTLS/STLS is dropped: nothing of it
/// may run after the upgrade (RFC 9051 §6.2.1, RFC 2595 §4, CERT VU#555316).
pub(crate) fn pump_client<M: ClientEvents>(machine: &mut M) -> bool {
    let mut acted = false;
    loop {
        if !machine.may_take_event() {
            return acted;
        }
        let step = machine.parse_event();
        let cbuf = &mut machine.core().cbuf;
        cbuf.drain(..step.consumed.min(cbuf.len()));
        let Some(event) = step.event else {
            return acted;
        };
        acted = true;
        if machine.core().phase == Phase::Cleartext {
            machine.on_cleartext(event);
        } else {
            machine.on_event(event);
        }
        if machine.core().phase == Phase::StartTls {
            machine.core().cbuf.clear();
            return acted;
        }
    }
}

/// A protocol's not-authenticated state, as the shared driver loop sees it.
///
/// The driver writes [`Machine::take_to_backend`] then [`Machine::take_to_client`] after every
/// call, and acts on [`Machine::next`]. The machine never touches a socket or a clock: it says
/// when the idle timer restarts ([`Machine::client_input`], [`Machine::backend_input`]) and whom
/// a timeout is charged to ([`Machine::waiting_for_backend`]).
pub trait Machine {
    /// The protocol's name in logs and metric labels (`imap`, `pop3`).
    const PROTOCOL: &'static str;

    fn next(&self) -> Next;

    /// Bytes to write to the client now.
    fn take_to_client(&mut self) -> Vec<u8>;

    /// Bytes to write to the backend now.
    fn take_to_backend(&mut self) -> Vec<u8>;

    fn take_notices(&mut self) -> Vec<Notice>;

    /// The driver's answer to [`Next::ChargeLogin`]: granted, the held login goes out (the
    /// driver keeps its charge until the [`Notice::Auth`] that settles it); refused, the machine
    /// answers it with its protocol's throttled reply and a [`Notice::AuthThrottled`]. Either
    /// way the machine then goes on with whatever the client pipelined. Ignored when no login
    /// waits.
    fn login_charge(&mut self, granted: bool);

    /// Client bytes arrived. Returns whether the idle timer restarts: bytes the machine only
    /// holds must not keep a session alive while it waits for the backend.
    fn client_input(&mut self, bytes: &[u8]) -> bool;

    /// Backend bytes arrived. Returns whether the idle timer restarts.
    fn backend_input(&mut self, bytes: &[u8]) -> bool;

    /// The driver connected to the backend after [`Next::Connect`].
    fn backend_connected(&mut self);

    /// The backend closed its side.
    fn backend_closed(&mut self);

    /// The handshake after [`Next::StartTls`] succeeded, with this IANA cipher suite name.
    fn tls_started(&mut self, cipher: String);

    /// Once [`Next::Authenticated`]: client bytes sent after the login command, and backend
    /// bytes after its completion. Both go out before the plain relay.
    fn held(&mut self) -> (Vec<u8>, Vec<u8>);

    /// Whether the driver should read from the client now: not while `hold_limit` client bytes
    /// are held, and never after STARTTLS (the handshake reads the socket itself).
    fn wants_client_input(&self, hold_limit: usize) -> bool;

    /// Whether the next thing expected is the backend's: a timeout then is the backend's
    /// ([`Machine::bye_unavailable`]), otherwise the client's ([`Machine::bye_idle`]).
    fn waiting_for_backend(&self) -> bool;

    /// Sent before closing when the backend cannot be reached, fails or stays silent.
    fn bye_unavailable() -> Vec<u8>;

    /// Sent before closing a client that was silent too long.
    fn bye_idle() -> Vec<u8>;

    /// Sent before closing a client that had not logged in within `timeouts.login`.
    fn bye_login_timeout() -> Vec<u8>;

    /// Sent before closing because the proxy is shutting down.
    fn bye_shutdown() -> Vec<u8>;
}

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
            let granted = session.charge_login(M::PROTOCOL);
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

/// What the machines' unit tests share.
#[cfg(test)]
pub(crate) mod testing {
    use super::{Charge, Machine, Next, Notice};

    /// The driver's side of `limits.auth_failures_per_ip`, played in unit tests: it answers
    /// [`Next::ChargeLogin`] as [`serve`](super::serve) does and settles the charge on the
    /// machine's [`Notice::Auth`], so a table can say how many attempts stayed counted.
    #[derive(Debug)]
    pub(crate) struct Throttle {
        pub(crate) limit: u32,
        /// Charges kept so far, the one still with the backend included (a hang-up keeps it).
        pub(crate) charged: u32,
        /// Logins answered with the throttled reply.
        pub(crate) refused: u32,
        /// A granted login waits for its verdict.
        in_flight: bool,
        pub(crate) notices: Vec<Notice>,
    }

    impl Throttle {
        /// `limit` charges, `charged` of them already taken by other sessions.
        pub(crate) fn new(limit: u32, charged: u32) -> Throttle {
            Throttle {
                limit,
                charged,
                refused: 0,
                in_flight: false,
                notices: Vec::new(),
            }
        }

        /// What the driver loop does after every input: settles verdicts and answers held
        /// logins until the machine wants neither.
        pub(crate) fn run<M: Machine>(&mut self, m: &mut M) {
            loop {
                for notice in m.take_notices() {
                    if let Notice::Auth { charge, .. } = &notice {
                        assert!(self.in_flight, "a verdict for a login never charged");
                        self.in_flight = false;
                        if *charge == Charge::Refund {
                            self.charged -= 1;
                        }
                    }
                    self.notices.push(notice);
                }
                if m.next() != Next::ChargeLogin {
                    return;
                }
                assert!(
                    !self.in_flight,
                    "a second login charged while one is with the backend"
                );
                let granted = self.charged < self.limit;
                if granted {
                    self.charged += 1;
                    self.in_flight = true;
                } else {
                    self.refused += 1;
                }
                m.login_charge(granted);
            }
        }
    }

    /// One step of a table test: bytes from either side, or the backend's close.
    #[derive(Debug, Clone, Copy)]
    pub(crate) enum Step {
        Client(&'static str),
        Backend(&'static str),
        BackendClosed,
    }

    /// Plays `steps` on `m` with `throttle`; returns everything written to the client and to
    /// the backend.
    pub(crate) fn play<M: Machine>(
        m: &mut M,
        throttle: &mut Throttle,
        steps: &[Step],
    ) -> (String, String) {
        let (mut client, mut backend) = (Vec::new(), Vec::new());
        let mut drain = |m: &mut M, throttle: &mut Throttle| {
            throttle.run(m);
            client.extend_from_slice(&m.take_to_client());
            backend.extend_from_slice(&m.take_to_backend());
        };
        drain(m, throttle);
        for step in steps {
            match step {
                Step::Client(bytes) => {
                    m.client_input(bytes.as_bytes());
                }
                Step::Backend(bytes) => {
                    m.backend_input(bytes.as_bytes());
                }
                Step::BackendClosed => m.backend_closed(),
            }
            drain(m, throttle);
        }
        (
            String::from_utf8_lossy(&client).into_owned(),
            String::from_utf8_lossy(&backend).into_owned(),
        )
    }
}
