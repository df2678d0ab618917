//! The machine contract: what a protocol's sans-I/O session machine and the one I/O loop that
//! drives it (`driver::serve`, one layer up) say to each other.
//!
//! It sits at the bottom layer, beside the codecs: the IMAP, POP3 and SMTP machines
//! ([`crate::imap::prelogin`], [`crate::pop3::prelogin`], [`crate::smtp::machine`]) implement
//! [`Machine`] from here and never import the driver, which imports this from above. Nothing
//! here reads a socket, sleeps or logs: a machine takes bytes and says what happens next
//! ([`Next`]), what it learned ([`Notice`]) and why it ended ([`End`]).
//!
//! All three protocols run the same phases (RFC 8314 §4.1): on a STARTTLS listener a cleartext
//! dialogue answered locally with no backend, the TLS handshake, the backend connection, then
//! only commands the gate parsed reach the backend, re-encoded. IMAP and POP3 become a plain
//! relay once the backend accepts a login ([`Next::Authenticated`]); SMTP stays parsed to the
//! end, since every message needs its Received field.

use std::borrow::Cow;

use rustls::{CipherSuite, NamedGroup, ProtocolVersion};

use crate::line::Step;
use crate::tls::names;

/// What a machine knows of the client's TLS: the one typed record of "under TLS, with this
/// cipher" (the Received `tls`/`group` clauses, the IMAP ID `tls` field). `None` where a
/// machine holds an `Option<TlsFacts>` means cleartext.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TlsFacts {
    pub version: ProtocolVersion,
    pub cipher: CipherSuite,
    /// `None` when no key exchange happened (TLS 1.2 resumption).
    pub group: Option<NamedGroup>,
}

impl TlsFacts {
    /// The IANA cipher suite name, e.g. `TLS_AES_256_GCM_SHA384`, or `0x…` hex.
    pub fn cipher_name(&self) -> Cow<'static, str> {
        names::cipher_suite_name(u16::from(self.cipher))
    }

    /// The IANA group name, only when there is one (the Received `group` clause has no hex form).
    pub fn iana_group_name(&self) -> Option<&'static str> {
        self.group
            .and_then(|group| names::known_group_name(u16::from(group)))
    }
}

/// Where an IMAP ID "tls" field came from (a machine's notice, a metric's label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdSource {
    /// Added to the client's own ID command.
    Client,
    /// Sent by mailfront before the client's first LOGIN/AUTHENTICATE.
    Proxy,
}

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

/// The login a machine holds when it says [`Next::Connect`] on a listener that routes by user
/// (`user_affinity`, `user_map`, `user_lookup`): what the listener's router needs to pick
/// the backend ([`Machine::login_facts`]). Never logged whole: it may carry the password.
#[derive(Clone, PartialEq, Eq)]
pub struct LoginFacts {
    /// The authentication identity as the client sent it (decoded from SASL), never the
    /// authorization identity.
    pub user: Vec<u8>,
    /// The password, where the login carries one mailfront has seen (IMAP LOGIN, POP3 PASS,
    /// SASL PLAIN and LOGIN): sent to `user_lookup` only with `send_password: true`; wiped
    /// when dropped.
    pub password: Option<zeroize::Zeroizing<Vec<u8>>>,
    /// The command or SASL mechanism, as the gate spells it (`LOGIN`, `USER`, `PLAIN`,
    /// `SCRAM-SHA-256`): the lookup's `Auth-Method` (in nginx's spelling, which the driver derives).
    pub mechanism: String,
    /// SMTP: the client's EHLO/HELO argument (`Auth-SMTP-Helo`).
    pub helo: Option<Vec<u8>>,
}

impl std::fmt::Debug for LoginFacts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoginFacts")
            .field("user", &String::from_utf8_lossy(&self.user))
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("mechanism", &self.mechanism)
            .finish_non_exhaustive()
    }
}

/// Why the router gave a login no backend ([`Machine::route_failed`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteFailure {
    /// `user_lookup` refused the login (its `Auth-Status`, sanitized to printable ASCII): the
    /// machine answers the login command with the protocol's authentication failure carrying
    /// `text` (SMTP: `smtp_code`, e.g. `535 5.7.8`, when the lookup gave an
    /// `Auth-Error-Code`), a [`Notice::Auth`] with [`AuthVerdict::Failure`] and
    /// [`Charge::Keep`], then goes on without a backend when `go_on` (nginx: the answer had an
    /// `Auth-Wait`, already waited), or ends with [`End::LoginRefused`].
    Refused {
        text: String,
        smtp_code: Option<String>,
        go_on: bool,
    },
    /// No backend for this login now (the lookup failed or timed out, or the chosen backend
    /// could not be reached): the protocol's temporary failure (`NO [UNAVAILABLE]`,
    /// `454 4.7.0`, `-ERR [SYS/TEMP]`) to the login command, a [`Notice::Auth`] with
    /// [`AuthVerdict::NotCompleted`] and [`Charge::Refund`], and the session goes on without
    /// a backend (the client may try again). Never another backend.
    Unavailable,
}

/// The longest `user_lookup` refusal text a machine shows: an `Auth-Status` is one short
/// sentence (nginx's are), and a reply line stays far within every protocol's limit (IMAP, POP3
/// RFC 2449 §4's 512 octets, SMTP RFC 5321 §4.5.3.1.5's 512).
pub const MAX_REFUSAL_TEXT: usize = 200;

/// A `user_lookup` refusal text fit for any protocol's reply line, whatever reached the
/// machine: printable ASCII only (so no CR, LF or control can end the line or start another
/// reply), at most [`MAX_REFUSAL_TEXT`] characters, trimmed; `fallback` when nothing is left.
pub fn refusal_text(text: &str, fallback: &'static str) -> String {
    let kept: String = text
        .chars()
        .filter(|c| matches!(c, ' '..='~'))
        .take(MAX_REFUSAL_TEXT)
        .collect();
    match kept.trim() {
        "" => fallback.to_owned(),
        trimmed => trimmed.to_owned(),
    }
}

/// Why a session ended while its machine still ran (before login for IMAP and POP3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// LOGOUT/QUIT, or the client closed.
    ClientClosed,
    /// The proxy is shutting down and the session said goodbye ([`Machine::shutdown_begun`]).
    Shutdown,
    BackendClosed,
    /// The backend refused service in a greeting the client never sees (POP3 `-ERR` after STLS,
    /// when the client already had mailfront's greeting): the client was told the service is
    /// unavailable.
    BackendUnavailable,
    /// The backend broke the protocol (or greeted with IMAP PREAUTH).
    BackendProtocol(String),
    /// The client broke the protocol or a limit badly enough to close.
    ProtocolViolation(String),
    /// `user_lookup` refused a login without `Auth-Wait`: as nginx does, the session ends after
    /// the refusal.
    LoginRefused,
}

/// How the backend answered a login, for the `authentication` log line and metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthVerdict {
    Success,
    /// A wrong credential (IMAP `NO`, POP3 `-ERR`, SMTP 535).
    Failure,
    /// Neither: a cancelled exchange, an unknown mechanism, the backend's own trouble.
    NotCompleted,
}

impl AuthVerdict {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthVerdict::Success => "success",
            AuthVerdict::Failure => "failure",
            AuthVerdict::NotCompleted => "not_completed",
        }
    }
}

/// Facts for metrics and logs, drained by the driver with [`Machine::take_notices`]. Never a
/// credential: mechanisms are labels built from parsed commands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// The backend answered a login (IMAP LOGIN/AUTHENTICATE, POP3 PASS/APOP/AUTH, SMTP AUTH);
    /// `charge` says what becomes of the attempt's charge.
    Auth {
        verdict: AuthVerdict,
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
    /// The user name of a login the gate let through (charged, TLS up), for the close line;
    /// never the password.
    User(Vec<u8>),
    /// `backend_client_info` could not tell the backend the client's address (not offered, or
    /// refused); logged once per listener with [`Machine::client_info_warning`].
    ClientInfo(crate::client_info::Notice),
    /// The session is past login without the relay (SMTP: a 235, or an accepted MAIL where
    /// cleartext mail is allowed): the login deadline stops and the session leaves
    /// `limits.connections_per_ip`.
    PastLogin,
    /// Bytes the client pipelined after STARTTLS/STLS, dropped before the handshake.
    PipelinedAfterStartTls { octets: usize },
    /// SMTP: a command refused by the gate, by its reason (never its reply bytes).
    CommandRefused { reason: &'static str },
    /// SMTP: the backend refused something mailfront sent on the client's behalf.
    BackendRefused { what: &'static str, code: u16 },
    /// SMTP: a Received field went to the backend.
    ReceivedFieldAdded,
    /// SMTP: the backend accepted a message; `size` is the client's octets.
    MessageAccepted {
        size: u64,
        /// The message's number in this session, from 1.
        number: u64,
        received_id: Option<String>,
        /// The first line of the backend's reply (its queue id).
        reply: String,
    },
    /// SMTP: the backend refused a message at its end.
    MessageRefused { size: u64, code: u16 },
    /// SMTP: a bare CR or LF (`bare`: `cr`, `lf`) refused a message and dropped the backend.
    BareLineEnding { bare: &'static str, in_bdat: bool },
    /// SMTP: the backend's reply to an EHLO (raw), which later sessions of the listener answer
    /// their EHLO with before they connect ([`Phase::Local`]).
    BackendEhlo(Vec<u8>),
    /// IMAP: the backend's pre-login capability list (the tokens after `CAPABILITY`, raw), which
    /// later sessions of the listener greet and answer CAPABILITY with before they connect
    /// ([`Phase::Local`]).
    BackendImapCapability(Vec<u8>),
    /// POP3: the backend's answer to CAPA (raw), which later sessions of the listener answer
    /// their CAPA with before they connect ([`Phase::Local`]).
    BackendPop3Capa(Vec<u8>),
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

/// Where a session stands: the same phases for every protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Before TLS on a STARTTLS listener: no backend.
    Cleartext,
    /// TLS up and still no backend: the machine answers what it can itself, and connects when a
    /// command needs the backend (SMTP: AUTH, MAIL), so sessions that never get that far cost
    /// the backend nothing.
    Local,
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
/// one and adds its protocol's state beside it; the contract's default methods work on it.
#[derive(Debug)]
pub struct Core {
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
            Phase::Cleartext | Phase::Local | Phase::Greeting | Phase::Ready => Next::Run,
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
            Phase::Cleartext | Phase::Local | Phase::Greeting | Phase::Ready
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
pub(crate) trait ClientEvents: Machine {
    type Event;
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
            let core = machine.core();
            let octets = core.cbuf.len();
            core.cbuf.clear();
            if octets > 0 {
                core.notices.push(Notice::PipelinedAfterStartTls { octets });
            }
            return acted;
        }
    }
}

/// A protocol's session, as the one driver loop sees it.
///
/// The driver writes [`Machine::take_to_backend`] then [`Machine::take_to_client`] after every
/// call, and acts on [`Machine::next`]. The machine never touches a socket or a clock: it says
/// when the idle timer restarts ([`Machine::client_input`], [`Machine::backend_input`]) and whom
/// a timeout is charged to ([`Machine::waiting_for_backend`]).
pub trait Machine {
    /// The protocol's name in logs and metric labels (`imap`, `pop3`, `smtp`).
    const PROTOCOL: &'static str;

    /// One read from either side. SMTP reads more at once, since message content streams
    /// through it.
    const READ_CHUNK: usize = 16 * 1024;

    /// The machine's [`Core`], which the default methods below work on.
    fn core(&mut self) -> &mut Core;

    fn core_ref(&self) -> &Core;

    fn next(&self) -> Next {
        self.core_ref().next()
    }

    /// Bytes to write to the client now.
    fn take_to_client(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.core().to_client)
    }

    /// Bytes to write to the backend now.
    fn take_to_backend(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.core().to_backend)
    }

    /// A range of the bytes the last [`Machine::client_input`] was given, to write to the
    /// backend right after [`Machine::take_to_backend`]'s: message content the machine judged
    /// in place, so the hot path of a large message copies nothing.
    fn take_passthrough(&mut self) -> Option<std::ops::Range<usize>> {
        None
    }

    fn take_notices(&mut self) -> Vec<Notice> {
        std::mem::take(&mut self.core().notices)
    }

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
    /// On a listener that routes by user, the login that made the machine say
    /// [`Next::Connect`]: the driver asks the router with it, then connects to what it chose
    /// (or calls [`Machine::route_failed`]). `None`: the machine connects for something that is
    /// not a login (SMTP MAIL where cleartext mail is allowed), which goes to the listener's
    /// pool. A routed machine connects for nothing else: a session that never logs in costs
    /// no backend connection, and a login never reaches a backend chosen before its name was
    /// known.
    fn login_facts(&self) -> Option<LoginFacts> {
        None
    }

    /// The router gave the held login no backend, or the chosen backend could not be reached
    /// ([`RouteFailure`]): the machine answers the login command itself and, unless it ends,
    /// goes on without a backend, as before the login.
    fn route_failed(&mut self, failure: RouteFailure) {
        let _ = failure;
        self.backend_failed();
    }

    /// Reading from or writing to the backend failed (the driver dropped the connection). By
    /// default the client gets [`Machine::bye_unavailable`] and the session ends.
    fn backend_failed(&mut self) {
        let bye = self.bye_unavailable();
        let core = self.core();
        core.to_backend.clear();
        core.to_client.extend_from_slice(&bye);
        core.finish(End::BackendClosed);
    }

    /// The handshake after [`Next::StartTls`] succeeded.
    fn tls_started(&mut self, tls: TlsFacts);

    /// Once [`Next::Authenticated`]: client bytes sent after the login command, and backend
    /// bytes after its completion. Both go out before the plain relay.
    fn held(&mut self) -> (Vec<u8>, Vec<u8>) {
        self.core().held()
    }

    /// Whether the driver should read from the client now: not while `hold_limit` client bytes
    /// are held, and never after STARTTLS (the handshake reads the socket itself).
    fn wants_client_input(&self, hold_limit: usize) -> bool {
        self.core_ref().wants_client_input(hold_limit)
    }

    /// Whether the driver should read from the backend now (a machine that holds what it has
    /// not asked for bounds it here).
    fn wants_backend_input(&self) -> bool {
        true
    }

    /// Whether the driver must close the backend connection now (SMTP drops it to abort a
    /// message, or before reconnecting after STARTTLS). Asked after every step.
    fn take_backend_close(&mut self) -> bool {
        false
    }

    /// Whether the next thing expected is the backend's: a timeout then is the backend's
    /// ([`Machine::bye_backend_timeout`]), otherwise the client's ([`Machine::bye_idle`]).
    fn waiting_for_backend(&self) -> bool;

    /// Whether the backend's answer awaited is a message's verdict: `timeouts.data_reply`
    /// bounds that wait instead of `timeouts.idle` (RFC 5321 §4.5.3.2.6 allows 10 minutes).
    fn waits_for_verdict(&self) -> bool {
        false
    }

    /// A graceful shutdown began. By default the session says [`Machine::bye_shutdown`] and
    /// ends at once; a machine with work worth finishing (an SMTP message underway) ends on
    /// its own once that work is done. The hard stop ends every session regardless.
    fn shutdown_begun(&mut self) {
        let bye = self.bye_shutdown();
        let core = self.core();
        core.to_client.extend_from_slice(&bye);
        core.finish(End::Shutdown);
    }

    /// The once-per-listener warning for a `backend_client_info` problem, in this protocol's
    /// words.
    fn client_info_warning(problem: crate::client_info::Notice) -> &'static str;

    /// Sent before closing when the backend cannot be reached or fails.
    fn bye_unavailable(&self) -> Vec<u8>;

    /// Sent before closing when the backend stayed silent past its timeout.
    fn bye_backend_timeout(&self) -> Vec<u8> {
        self.bye_unavailable()
    }

    /// Sent before closing a client that was silent too long.
    fn bye_idle(&self) -> Vec<u8>;

    /// Sent before closing a client that had not logged in within `timeouts.login`.
    fn bye_login_timeout(&self) -> Vec<u8>;

    /// Sent before closing because the proxy is shutting down.
    fn bye_shutdown(&self) -> Vec<u8>;
}

/// What the machines' unit tests share.
#[cfg(test)]
pub(crate) mod testing {
    use super::{Charge, Machine, Next, Notice, TlsFacts};

    /// TLS 1.3 with `TLS_AES_128_GCM_SHA256` over x25519: what a test handshake negotiates.
    pub(crate) fn tls13() -> TlsFacts {
        TlsFacts {
            version: rustls::ProtocolVersion::TLSv1_3,
            cipher: rustls::CipherSuite::TLS13_AES_128_GCM_SHA256,
            group: Some(rustls::NamedGroup::X25519),
        }
    }

    /// The driver's side of `limits.auth_failures_per_ip`, played in unit tests: it answers
    /// [`Next::ChargeLogin`] as the pre-login loop does and settles the charge on the
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

    /// One row of a machine's charge table, checked the same way for every protocol: how many
    /// attempts stayed charged and were refused, and which lines did or did not reach the
    /// backend.
    pub(crate) fn check_charges(
        name: &str,
        throttle: &Throttle,
        backend: &str,
        charged: u32,
        refused: u32,
        reached: &[&str],
        never: &[&str],
    ) {
        assert_eq!(throttle.charged, charged, "{name}: charged; {backend:?}");
        assert_eq!(throttle.refused, refused, "{name}: refused");
        for s in reached {
            assert!(backend.contains(s), "{name}: {s:?} not in {backend:?}");
        }
        for s in never {
            assert!(!backend.contains(s), "{name}: {s:?} in {backend:?}");
        }
    }
}
