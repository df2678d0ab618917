//! The IMAP not-authenticated state as a sans-I/O state machine (RFC 9051 §3.1, §6.1–§6.2,
//! RFC 8314 §4.1, draft-ietf-uta-email-deep §7.1).
//!
//! The session driver feeds it the bytes each side sent and writes out what it produced; the
//! machine itself never touches a socket, so unit tests and the fuzz target drive it directly.
//!
//! Its security property holds by construction rather than by checks on forwarded bytes:
//! - Before TLS on a STARTTLS listener there is no backend: mailfront answers the whole
//!   cleartext dialogue itself (`Prelogin::cleartext`) and the driver connects only after the
//!   handshake.
//! - After TLS and until the backend accepts a login, the backend receives only what mailfront
//!   writes: commands the strict receiver ([`crate::imap::command`]) fully parsed, re-encoded
//!   by [`command::encode`], one at a time. Client bytes are never copied through, so no framing
//!   difference (literals, bare LF, quoting) between mailfront and the backend can smuggle a
//!   command past the gate.
//! - The first ID the backend receives carries mailfront's `tls` field; a later client ID is
//!   answered here and never forwarded.
//!
//! With TLS up the machine connects only when a command needs the backend: LOGIN and
//! AUTHENTICATE ([`Phase::Local`], as SMTP does for AUTH and MAIL). Until then mailfront greets
//! (implicit TLS; after STARTTLS the client had the cleartext greeting, RFC 9051 §6.2.1) and
//! answers CAPABILITY from the pre-login list the listener learned of its backend
//! ([`Settings::learned_capability`], rewritten with [`CapabilityView::Tls`]), NOOP, LOGOUT, and
//! ID with `ID NIL` (RFC 2971 §3.2): the client's first ID is kept and its fields go beside
//! mailfront's in the ID sent before the login. The gate judges every command on the learned
//! list; a login is held, the driver connects, the backend's greeting is swallowed, and the gate
//! judges the login again on what the backend says now (a SASL-IR it lost is refused here), then
//! the charge and the encoding go as for any login. The list is learned before the first
//! session after a start or reload is served, by the listener's capability probe (`probe`, a
//! layer up). Only while none is learned, because that probe failed, does a session connect at
//! once (the fallback): the backend's greeting (on implicit TLS, the client's only one) or
//! mailfront's own CAPABILITY teaches the listener ([`Notice::BackendImapCapability`]), so a
//! client is never offered what no backend said.
//!
//! On a listener that routes by user ([`Settings::routed`]: `user_affinity`, `user_map`,
//! `user_lookup`) the backend depends on who logs in, so the machine connects for nothing but a
//! complete login, whose name the driver's router reads ([`Machine::login_facts`]):
//! - With TLS up it always stays local, answering from the learned list or, while none is,
//!   from [`ROUTED_CAPABILITIES`]; the mechanisms it cannot route ([`sasl::is_routable`]) are
//!   hidden from every list ([`CapabilityView::TlsRouted`]) and refused here.
//! - LOGIN is complete as it arrives. AUTHENTICATE is complete once mailfront holds the client's
//!   first response (the initial response, or the answer to its own empty `+`); for the LOGIN
//!   mechanism mailfront plays `Username:` and `Password:` itself, as nginx does. A `*` or a
//!   line that is not base64 ends it here with a tagged BAD; a login whose user cannot be read
//!   fails here, charged.
//! - The login is charged ([`Next::ChargeLogin`]), then the driver routes it and connects
//!   ([`Next::Connect`]) or answers [`Machine::route_failed`]. Once connected, the backend gets
//!   our ID and the login as on any listener, AUTHENTICATE without an initial response, and
//!   each backend `+` is answered with the next held response, unseen by the client.
//! - A login the backend refuses (or one that cannot go out) leaves that backend: a LOGOUT, the
//!   driver drops the connection ([`Machine::take_backend_close`]), and the session is local
//!   again, so the next login is routed afresh.

use std::collections::VecDeque;

use crate::config::TlsMode;
use crate::imap::capability::{self, CapabilityView};
use crate::imap::command::{self, Command, CommandReceiver, Event};
use crate::imap::id;
use crate::imap::policy::{
    self, CLEARTEXT_CAPABILITIES, GateState, Input, Local, Refusal, Verdict,
};
use crate::imap::reply;
use crate::imap::response::{
    Response, ResponseKind, ResponseLimits, ResponseReceiver, ServerEvent, Status,
};
use crate::line::Step;
use crate::machine::IdSource;
use crate::machine::{
    AuthVerdict, Charge, ClientEvents, Core, End, LoginFacts, Machine, Next, Notice, Phase,
    RouteFailure, TlsFacts, pump_client,
};
use crate::sasl;

/// What the machine needs to know about its session.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listener: TlsMode,
    /// Our name, for the cleartext greeting.
    pub hostname: String,
    pub limits: command::Limits,
    /// `limits.preauth_commands`.
    pub max_commands: usize,
    /// `backend_client_info`: the `x-originating-*`, `x-connected-*` and `x-session-id`
    /// fields ([`crate::client_info::imap_id_fields`]) sent beside `tls` in the first ID; empty
    /// when off.
    pub client_info: Vec<(&'static str, String)>,
    /// The pre-login capability list the listener learned of its backend (the tokens after
    /// `CAPABILITY`, raw, the listener's `Learned`: its capability probe's, or what a session
    /// saw since): with it, a session with TLS up greets and answers its client itself and
    /// connects only for a login ([`Phase::Local`]). `None` only when the probe failed: the
    /// session then connects at once, as the fallback (but on a routed listener, which answers
    /// from [`ROUTED_CAPABILITIES`] then).
    pub learned_capability: Option<Vec<u8>>,
    /// The listener routes by user (`user_affinity`, `user_map`, `user_lookup`,
    /// `ListenerContext::routes_users` in the session layer): the session connects only for a
    /// complete login, whose user name the driver's router reads from
    /// [`Machine::login_facts`]; see the module documentation.
    pub routed: bool,
}

/// What a routed session ([`Settings::routed`]) greets and answers CAPABILITY with while its
/// listener learned nothing of its backends: only what mailfront honours with any IMAP backend,
/// since it never connects to learn (issue 22). `IMAP4rev1`: the LOGIN command is in every
/// IMAP4rev1 server (RFC 3501 §6.2.3, RFC 9051 §6.2.3); no `AUTH=`: even PLAIN, mandatory to
/// implement (RFC 3501 §6.1.1, RFC 9051 §6.1.1), may be left off by a backend's configuration,
/// and a client that picked it would fail where LOGIN works; no `SASL-IR` without a mechanism;
/// `ID`, which mailfront answers itself before a login (`ID NIL`, RFC 2971 §3.2) whatever the
/// backend. Nothing post-login (IDLE, ENABLE…): the backend's own list reaches the client with
/// the login's `OK`.
pub const ROUTED_CAPABILITIES: &[u8] = b"IMAP4rev1 ID";

/// A command of ours in flight; its responses never reach the client.
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

/// The client command the backend is working on.
#[derive(Debug, Clone)]
struct InFlight {
    tag: Vec<u8>,
    /// `Some` for LOGIN/AUTHENTICATE: the mechanism, for logs.
    auth: Option<String>,
    /// AUTHENTICATE: SASL lines go on, one per backend `+`.
    sasl: bool,
    /// Pieces still to send, each after a backend `+` (synchronising literals of ours).
    pieces: VecDeque<Vec<u8>>,
    /// LOGOUT: its completion ends the session.
    logout: bool,
    /// AUTHENTICATE: mailfront sent the backend `*` (the client cancelled, or sent a line that
    /// is not base64), so no credential was checked and the refusal that follows is refunded.
    cancelled: bool,
    /// AUTHENTICATE without an initial response: its mechanism, until the client's first SASL
    /// line, which carries the user name ([`sasl::user_in_first_response`]).
    user_from_first_line: Option<Vec<u8>>,
    /// AUTHENTICATE on a routed session: the client's responses mailfront held, each the answer
    /// to the next backend `+`, which the client never sees ([`RoutedLogin`]).
    held_responses: VecDeque<Vec<u8>>,
}

/// A login on a routed session ([`Settings::routed`]), from its command until the backend's
/// completion: mailfront holds it whole (for AUTHENTICATE, playing the first challenges itself)
/// so that the router knows the user before any backend is chosen.
#[derive(Debug)]
struct RoutedLogin {
    tag: Vec<u8>,
    /// `LOGIN`, or `AUTHENTICATE` without its initial response (that went to `responses`: the
    /// backend always gets the mechanism alone, as it may lack SASL-IR).
    command: Command,
    /// The client's SASL responses, base64 as sent (an initial response `=` as empty), one for
    /// each backend `+`. At most two ([`RoutedLogin::needed`]), each within the receiver's
    /// `sasl_line` limit.
    responses: Vec<Vec<u8>>,
    stage: RouteStage,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RouteStage {
    /// AUTHENTICATE: mailfront wrote its own continuation and waits for the client's response.
    Collecting,
    /// Complete: waits for the driver's charge ([`Next::ChargeLogin`]).
    Charging,
    /// Charged: the driver routes it and connects ([`Phase::Connecting`]), then the greeting.
    Routing,
    /// Sent to the chosen backend: waits for its completion.
    Sent,
}

impl RoutedLogin {
    fn mechanism(&self) -> Option<&[u8]> {
        match &self.command {
            Command::Authenticate { mechanism, .. } => Some(mechanism),
            _ => None,
        }
    }

    fn is_login_mechanism(&self) -> bool {
        self.mechanism()
            .is_some_and(|m| m.eq_ignore_ascii_case(b"LOGIN"))
    }

    /// The responses mailfront holds before the login is complete: none for the LOGIN command;
    /// the user name then the password for the LOGIN mechanism (draft-murchison-sasl-login §2);
    /// one for the rest, whose first response names the user (RFC 4616 §2, RFC 5802 §5.1,
    /// RFC 7628 §3.1).
    fn needed(&self) -> usize {
        match self.mechanism() {
            None => 0,
            Some(_) if self.is_login_mechanism() => 2,
            Some(_) => 1,
        }
    }

    /// The authentication identity: LOGIN's user argument, or what the first SASL response
    /// names ([`sasl::user_in_first_response`]). `None` when it cannot be read, or is empty or
    /// holds a NUL, CR or LF (a router key and a log field must be one clean name).
    fn user(&self) -> Option<Vec<u8>> {
        match &self.command {
            Command::Login { username, .. } => {
                let clean = !username.is_empty()
                    && !username.iter().any(|&b| matches!(b, 0 | b'\r' | b'\n'));
                clean.then(|| username.clone())
            }
            Command::Authenticate { mechanism, .. } => {
                sasl::user_in_first_response(mechanism, self.responses.first()?)
            }
            _ => None,
        }
    }

    /// The password, where mailfront sees one: LOGIN's, PLAIN's, the LOGIN mechanism's second
    /// response.
    fn password(&self) -> Option<Vec<u8>> {
        match &self.command {
            Command::Login { password, .. } => Some(password.clone()),
            Command::Authenticate { mechanism, .. } if mechanism.eq_ignore_ascii_case(b"PLAIN") => {
                sasl::plain_password(self.responses.first()?).map(|p| p.to_vec())
            }
            Command::Authenticate { .. } if self.is_login_mechanism() => {
                sasl::login_mechanism_password(self.responses.get(1)?).map(|p| p.to_vec())
            }
            _ => None,
        }
    }

    fn facts(&self) -> Option<LoginFacts> {
        Some(LoginFacts {
            user: self.user()?,
            password: self.password().map(zeroize::Zeroizing::new),
            mechanism: match self.mechanism() {
                Some(mechanism) => sasl::mechanism_for_log(mechanism),
                None => "LOGIN".to_owned(),
            },
            helo: None,
        })
    }
}

/// A LOGIN or AUTHENTICATE parsed, checked and encoded, held until the driver charged it
/// ([`Next::ChargeLogin`]).
#[derive(Debug)]
struct Charging {
    tag: Vec<u8>,
    command: Command,
    pieces: Vec<Vec<u8>>,
}

/// Backend capabilities that change what mailfront sends.
#[derive(Debug, Clone, Copy, Default)]
struct BackendCaps {
    id: bool,
    sasl_ir: bool,
    literal_plus: bool,
    literal_minus: bool,
}

/// The IMAP not-authenticated state of one session.
pub struct Prelogin {
    settings: Settings,
    /// Phase and the bytes in and out, kept as every machine keeps them.
    core: Core,
    /// The client's TLS, once up: its cipher is the value of our ID `tls` field.
    tls: Option<TlsFacts>,
    rx: CommandReceiver,
    srx: ResponseReceiver,
    caps: BackendCaps,
    own: Option<Own>,
    in_flight: Option<InFlight>,
    /// A LOGIN/AUTHENTICATE waiting for our ID's completion.
    deferred: Option<InFlight>,
    /// The first piece of the deferred command (the rest stay in its `pieces`).
    deferred_first: Vec<u8>,
    /// Backend `+` continuations of an AUTHENTICATE the client has not answered yet.
    sasl_credit: usize,
    id_sent: bool,
    commands: usize,
    logout: bool,
    /// Source of our own tags; the driver seeds it from a random number.
    tag_seed: u64,
    /// A login waiting for [`Machine::login_charge`]; client bytes wait behind it.
    charging: Option<Charging>,
    /// The backend's pre-login capability list as known now (learned by the listener, or from
    /// this session's backend): what [`Phase::Local`] shows, rewritten for TLS.
    known_capability: Option<Vec<u8>>,
    /// A LOGIN or AUTHENTICATE went to the backend: from then on a capability list may be the
    /// post-login one (RFC 9051 §6.2.2), which is never learned for later sessions' pre-login
    /// answers.
    login_sent: bool,
    /// The client had mailfront's greeting (cleartext, or [`Phase::Local`]'s): the backend's is
    /// swallowed.
    greeted: bool,
    /// A LOGIN/AUTHENTICATE parsed in [`Phase::Local`], judged again by the gate once the
    /// backend is connected and its capabilities are known.
    held_login: Option<(Vec<u8>, Command)>,
    /// The client's first ID, answered `ID NIL` in [`Phase::Local`]: its fields go to the
    /// backend beside mailfront's, in the ID sent before the login (on a routed session, to
    /// every backend a login is routed to).
    client_id: Option<id::IdCommand>,
    /// A routed session's login ([`Settings::routed`]).
    route: Option<RoutedLogin>,
    /// A routed session left its backend after a failed login: the driver drops the connection
    /// ([`Machine::take_backend_close`]).
    close_backend: bool,
    /// A routed session handed the backend's list on ([`Notice::BackendImapCapability`]) once.
    handed_on: bool,
}

impl Prelogin {
    /// A session whose client side is TLS already (`tls`: `Some` on implicit-TLS listeners)
    /// or still cleartext on a STARTTLS listener.
    pub fn new(settings: Settings, tls: Option<TlsFacts>, tag_seed: u64) -> Prelogin {
        let tls_active = tls.is_some();
        let mut machine = Prelogin {
            rx: CommandReceiver::new(settings.limits),
            srx: ResponseReceiver::new(ResponseLimits::default()),
            settings,
            core: Core::new(tls_active),
            tls,
            caps: BackendCaps::default(),
            own: None,
            in_flight: None,
            deferred: None,
            deferred_first: Vec::new(),
            sasl_credit: 0,
            id_sent: false,
            commands: 0,
            logout: false,
            tag_seed,
            charging: None,
            known_capability: None,
            login_sent: false,
            greeted: !tls_active,
            held_login: None,
            client_id: None,
            route: None,
            close_backend: false,
            handed_on: false,
        };
        let known = match machine.settings.learned_capability.clone() {
            // A routed session never connects to learn: it answers from the built-in list.
            None if machine.settings.routed => Some(ROUTED_CAPABILITIES.to_vec()),
            known => known,
        };
        if let Some(list) = known {
            machine.set_caps(&list);
            machine.known_capability = Some(list);
        }
        if tls_active {
            machine.tls_up();
        } else {
            machine.greet(CLEARTEXT_CAPABILITIES.to_vec());
        }
        machine
    }

    /// mailfront's own greeting (RFC 9051 §7.1.1: a `CAPABILITY` code spares the client a
    /// round trip).
    fn greet(&mut self, capabilities: Vec<u8>) {
        let greeting = format!(
            "* OK [CAPABILITY {}] {} ready\r\n",
            String::from_utf8_lossy(&capabilities),
            self.settings.hostname
        );
        self.core.to_client.extend_from_slice(greeting.as_bytes());
        self.greeted = true;
    }

    /// TLS is up (implicit, or after STARTTLS). With the backend's capabilities known, the
    /// session stays local until a login ([`Phase::Local`]): on implicit TLS mailfront greets
    /// with them; after STARTTLS the client had mailfront's greeting already and asks again
    /// (RFC 9051 §6.2.1). Unknown (the listener's probe failed), it connects at once, and the
    /// backend's greeting (implicit) or its capabilities teach this listener's next sessions.
    fn tls_up(&mut self) {
        match self.known_capability.clone() {
            Some(list) => {
                self.core.phase = Phase::Local;
                if !self.greeted {
                    self.greet(capability::rewrite_list(&list, self.tls_view()));
                }
            }
            None => self.core.phase = Phase::Connecting,
        }
    }

    /// Whether the next thing expected is the backend's: the idle timer then measures the
    /// backend, and client bytes (only held) must not extend it.
    pub fn waiting_for_backend(&self) -> bool {
        match self.core.phase {
            Phase::Greeting => true,
            Phase::Ready => {
                self.own.is_some()
                    || self.deferred.is_some()
                    || self.held_login.is_some()
                    || (self.in_flight.is_some() && !(self.rx.in_sasl() && self.sasl_credit > 0))
            }
            _ => false,
        }
    }

    /// The driver connected to the backend.
    pub fn backend_connected(&mut self) {
        if self.core.phase == Phase::Connecting {
            self.core.phase = Phase::Greeting;
            self.pump_backend();
        }
    }

    /// The handshake after STARTTLS succeeded: start afresh with a new receiver (nothing the
    /// client sent before counts), then answer locally or connect ([`Prelogin::tls_up`]).
    pub fn tls_started(&mut self, tls: TlsFacts) {
        self.tls = Some(tls);
        self.rx = CommandReceiver::new(self.settings.limits);
        self.core.cbuf.clear();
        self.tls_up();
    }

    /// Client bytes arrived. Returns whether anything was acted on (the idle timer restarts
    /// only then: bytes merely held do not keep a session alive).
    pub fn client_input(&mut self, bytes: &[u8]) -> bool {
        self.core.cbuf.extend_from_slice(bytes);
        pump_client(self)
    }

    /// Backend bytes arrived. Returns whether a whole response was handled.
    pub fn backend_input(&mut self, bytes: &[u8]) -> bool {
        self.core.bbuf.extend_from_slice(bytes);
        self.pump_backend()
    }

    /// The backend closed its side.
    pub fn backend_closed(&mut self) {
        // No backend before TLS, nor in [`Phase::Local`] (a routed session left its own).
        if matches!(
            self.core.phase,
            Phase::Ended | Phase::Authenticated | Phase::Cleartext | Phase::Local
        ) {
            return;
        }
        if self.routing() {
            self.routed_unavailable();
            return;
        }
        if self.logout {
            self.core.finish(End::ClientClosed);
        } else {
            self.core
                .to_client
                .extend_from_slice(&reply::bye_unavailable());
            self.core.finish(End::BackendClosed);
        }
    }

    fn view(&self) -> CapabilityView {
        if self.tls.is_some() {
            self.tls_view()
        } else {
            CapabilityView::Cleartext
        }
    }

    /// The view with TLS up: a routed listener also hides the mechanisms it cannot route.
    fn tls_view(&self) -> CapabilityView {
        if self.settings.routed {
            CapabilityView::TlsRouted
        } else {
            CapabilityView::Tls
        }
    }

    /// mailfront's ID fields: `tls`, then the client's address where `backend_client_info`
    /// is on.
    fn our_id_fields<'a>(&'a self, cipher: &'a str) -> Vec<(&'a str, &'a str)> {
        let mut fields = vec![("tls", cipher)];
        fields.extend(
            self.settings
                .client_info
                .iter()
                .map(|(f, v)| (*f, v.as_str())),
        );
        fields
    }

    /// The IANA name of the client's cipher; the gate forwards no ID before TLS, so it is
    /// never asked for in cleartext.
    fn cipher_name(&self) -> std::borrow::Cow<'static, str> {
        self.tls
            .map_or(std::borrow::Cow::Borrowed(""), |t| t.cipher_name())
    }

    fn own_tag(&mut self) -> Vec<u8> {
        self.tag_seed = self
            .tag_seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1);
        id::mailfront_tag(self.tag_seed)
    }

    /// Learns the backend's pre-login capabilities from a response that carries them, and
    /// hands a list that differs from the one known to the listener's next sessions
    /// ([`Notice::BackendImapCapability`]).
    fn learn(&mut self, raw: &[u8]) {
        let Some(list) = capability::capabilities(raw).map(|tokens| tokens.join(&b' ')) else {
            return;
        };
        self.set_caps(&list);
        if self.settings.routed {
            // What a routed session shows stays the listener's (the driver probes its backends
            // for it): this backend is one user's. Only where nothing was learned is the first
            // pre-login list handed on, so the next sessions show a backend's truth rather than
            // the built-in list.
            if !self.login_sent && self.settings.learned_capability.is_none() && !self.handed_on {
                self.handed_on = true;
                self.core.notices.push(Notice::BackendImapCapability(list));
            }
            return;
        }
        // Only a pre-login list is handed on: after a login went out, a list may be the
        // post-login one (no AUTH=, LOGINDISABLED-free, SORT, THREAD, …), which would leave the
        // next sessions' clients without a mechanism to log in with.
        if !self.login_sent && self.known_capability.as_deref() != Some(list.as_slice()) {
            self.core
                .notices
                .push(Notice::BackendImapCapability(list.clone()));
            self.known_capability = Some(list);
        }
    }

    /// What a capability list (space-separated tokens) changes in what mailfront sends.
    fn set_caps(&mut self, list: &[u8]) {
        let has = |name: &[u8]| {
            list.split(|&b| b == b' ')
                .any(|t| t.eq_ignore_ascii_case(name))
        };
        self.caps = BackendCaps {
            id: has(b"ID"),
            sasl_ir: has(b"SASL-IR"),
            literal_plus: has(b"LITERAL+"),
            literal_minus: has(b"LITERAL-"),
        };
    }

    // ---- client side -------------------------------------------------------------------

    fn may_take_client_event(&self) -> bool {
        match self.core.phase {
            Phase::Cleartext => true,
            // A routed login waits for its charge and its backend; only the responses mailfront
            // asked for are read meanwhile.
            Phase::Local => self
                .route
                .as_ref()
                .is_none_or(|route| route.stage == RouteStage::Collecting),
            Phase::Ready => {
                // After LOGOUT went out, or the backend said BYE, it is leaving: nothing more
                // goes to it (RFC 9051 §7.1.5). A login waiting for its charge, or for the
                // gate's second look, goes first.
                if self.own.is_some()
                    || self.deferred.is_some()
                    || self.logout
                    || self.charging.is_some()
                    || self.held_login.is_some()
                {
                    return false;
                }
                match &self.in_flight {
                    None => true,
                    // During AUTHENTICATE a SASL line goes on only when the backend asked.
                    Some(f) => f.sasl && self.rx.in_sasl() && self.sasl_credit > 0,
                }
            }
            _ => false,
        }
    }

    /// Counts a command against `limits.preauth_commands`; false once over it.
    fn count_command(&mut self) -> bool {
        self.commands += 1;
        if self.commands > self.settings.max_commands {
            self.core
                .to_client
                .extend_from_slice(&reply::bye_too_many_commands());
            self.core.finish(End::ProtocolViolation(
                "too many commands before authentication".to_owned(),
            ));
            return false;
        }
        true
    }

    fn rejected(&mut self, rejection: command::Rejection) {
        // A refused line counts like a command: otherwise a client sending only bad lines
        // (bare LF, syntax errors) holds the session, and on implicit TLS a backend connection,
        // for ever, each line restarting the idle timer.
        if !self.count_command() {
            return;
        }
        self.core.to_client.extend_from_slice(&rejection.reply());
        if rejection.fatal {
            self.core
                .to_client
                .extend_from_slice(&reply::bye_protocol_error());
            self.core
                .finish(End::ProtocolViolation(rejection.error.to_string()));
        }
    }

    /// What the gate ([`policy::decide`]) needs to know.
    fn gate(&self) -> GateState {
        GateState {
            tls: self.tls.is_some(),
            backend_id: self.caps.id,
            backend_sasl_ir: self.caps.sasl_ir,
            id_sent: self.id_sent,
        }
    }

    /// Every client event, before TLS (mailfront is the whole server, with no backend) and
    /// after: framing refusals and SASL lines here, commands through the gate.
    fn on_client_event(&mut self, event: Event) {
        match event {
            Event::Rejected(rejection) => self.rejected(rejection),
            Event::Sasl(line) => self.sasl_line(&line),
            Event::LiteralRequested { tag, name, .. } => {
                match policy::decide(&self.gate(), Input::Literal { name: &name }) {
                    Verdict::AcceptLiteral => {
                        self.rx.accept_literal();
                        self.core
                            .to_client
                            .extend_from_slice(&reply::continuation());
                    }
                    verdict => {
                        // Refused before the `+`: the client never sends its octets
                        // (RFC 9051 §7.5), and the command is dropped.
                        self.rx.refuse_literal();
                        if self.count_command() {
                            self.answer(&tag, verdict, &mechanism_label(&name, None));
                        }
                    }
                }
            }
            Event::Command { tag, command } => {
                if !self.count_command() {
                    return;
                }
                if self.core.phase == Phase::Local {
                    self.on_local_command(tag, command);
                } else {
                    self.judge(tag, command);
                }
            }
        }
    }

    /// A command through the gate, with a backend connected (or none needed, in cleartext).
    fn judge(&mut self, tag: Vec<u8>, command: Command) {
        let input = Input::Command {
            tag: &tag,
            command: &command,
        };
        match policy::decide(&self.gate(), input) {
            Verdict::ForwardId => self.forward_id(tag, &command),
            Verdict::Forward => self.encode(tag, command, false),
            Verdict::ChargeLogin => self.encode(tag, command, true),
            verdict => self.answer(&tag, verdict, &command_label(&command)),
        }
    }

    /// A command with TLS up and no backend ([`Phase::Local`]), judged by the gate on the
    /// learned capabilities. What the gate would forward is answered here as the backend would
    /// (CAPABILITY from the learned list, rewritten for TLS; NOOP; LOGOUT, RFC 9051 §6.1.3); the
    /// client's first ID is answered `ID NIL` (RFC 2971 §3.2) and kept for the ID mailfront
    /// sends before the login. Only a login needs the backend: it is held, the driver connects,
    /// and the gate judges it again on what the backend then says ([`Prelogin::release_held`]).
    fn on_local_command(&mut self, tag: Vec<u8>, command: Command) {
        let input = Input::Command {
            tag: &tag,
            command: &command,
        };
        match (policy::decide(&self.gate(), input), command) {
            (Verdict::ChargeLogin, command) if self.settings.routed => {
                self.routed_login(tag, command);
            }
            (Verdict::ChargeLogin, command) => {
                self.held_login = Some((tag, command));
                self.core.phase = Phase::Connecting;
            }
            (Verdict::ForwardId, Command::Id(client)) => {
                self.client_id.get_or_insert(client);
                self.answer(&tag, Verdict::Local(Local::IdNil), "");
            }
            (Verdict::Forward, Command::Capability) => {
                let list = self.known_capability.as_deref().unwrap_or_default();
                let mut out = b"* CAPABILITY ".to_vec();
                out.extend_from_slice(&capability::rewrite_list(list, self.tls_view()));
                out.extend_from_slice(b"\r\n");
                out.extend_from_slice(&reply::tagged(&tag, "OK", "CAPABILITY completed"));
                self.core.to_client.extend_from_slice(&out);
            }
            (Verdict::Forward, Command::Noop) => {
                self.answer(&tag, Verdict::Local(Local::Noop), "");
            }
            (Verdict::Forward, Command::Logout) => {
                self.answer(&tag, Verdict::Local(Local::Logout), "");
            }
            (verdict, command) => self.answer(&tag, verdict, &command_label(&command)),
        }
    }

    /// The backend is ready and its capabilities known: the login held in [`Phase::Local`]
    /// goes through the gate (SASL-IR as the backend says now), the charge and the encoding,
    /// as if it had just arrived.
    fn release_held(&mut self) {
        if self.settings.routed {
            self.release_routed();
            return;
        }
        if let Some((tag, command)) = self.held_login.take() {
            self.judge(tag, command);
        }
    }

    /// A verdict answered here: [`Verdict::Local`] or [`Verdict::Refuse`]. `label` names the
    /// login for the notices of a refused one.
    fn answer(&mut self, tag: &[u8], verdict: Verdict, label: &str) {
        match verdict {
            Verdict::Local(local) => {
                self.core.to_client.extend_from_slice(&local.reply(tag));
                match local {
                    Local::Logout => self.core.finish(End::ClientClosed),
                    Local::StartTls => self.core.phase = Phase::StartTls,
                    Local::Capability | Local::Noop | Local::IdNil => {}
                }
            }
            Verdict::Refuse(refusal) => {
                let mechanism = label.to_owned();
                match refusal {
                    Refusal::CleartextAuth => self
                        .core
                        .notices
                        .push(Notice::CleartextAuthRefused { mechanism }),
                    Refusal::Throttled => {
                        self.core.notices.push(Notice::AuthThrottled { mechanism })
                    }
                    _ => {}
                }
                self.core.to_client.extend_from_slice(&refusal.reply(tag));
            }
            // Sending needs a parsed command, which the callers keep: a verdict that sends
            // never comes here (a literal's is accepted or refused, rule 1 of the gate).
            Verdict::AcceptLiteral
            | Verdict::ForwardId
            | Verdict::ChargeLogin
            | Verdict::Forward => {
                self.core.to_client.extend_from_slice(&reply::tagged(
                    tag,
                    "BAD",
                    "Command not accepted",
                ));
            }
        }
    }

    /// During AUTHENTICATE: one client line goes to the backend, re-encoded, for the `+` it
    /// answers. Outside one (before TLS there is none) it is dropped.
    fn sasl_line(&mut self, line: &command::SaslLine) {
        if self
            .route
            .as_ref()
            .is_some_and(|route| route.stage == RouteStage::Collecting)
        {
            self.routed_response(line);
            return;
        }
        if let Some(flight) = self.in_flight.as_mut().filter(|f| f.sasl) {
            self.sasl_credit = self.sasl_credit.saturating_sub(1);
            let encoded = command::encode_sasl(line);
            // `*` ends the exchange before the backend checked anything (RFC 9051 §6.2.2): its
            // refusal is not a wrong guess.
            flight.cancelled |= encoded == b"*\r\n";
            if let Some(mechanism) = flight.user_from_first_line.take()
                && let command::SaslLine::Response(response) = line
                && let Some(user) = sasl::user_in_first_response(&mechanism, response)
            {
                self.core.notices.push(Notice::User(user));
            }
            self.core.to_backend.extend_from_slice(&encoded);
        }
    }

    /// The client's first ID, with mailfront's fields added ([`Verdict::ForwardId`]).
    fn forward_id(&mut self, tag: Vec<u8>, command: &Command) {
        let Command::Id(id_command) = command else {
            return;
        };
        let cipher = self.cipher_name();
        let rewritten = id::rewrite_client_id(id_command, &self.our_id_fields(&cipher));
        self.id_sent = true;
        self.core
            .notices
            .push(Notice::IdFieldAdded(IdSource::Client));
        self.core.to_backend.extend_from_slice(&rewritten);
        self.in_flight = Some(InFlight {
            tag,
            auth: None,
            sasl: false,
            pieces: VecDeque::new(),
            logout: false,
            cancelled: false,
            user_from_first_line: None,
            held_responses: VecDeque::new(),
        });
    }

    fn literal_plus(&self, command: &Command) -> bool {
        if self.caps.literal_plus {
            return true;
        }
        // LITERAL- (RFC 7888 §5): non-synchronising literals up to 4096 octets.
        self.caps.literal_minus
            && match command {
                Command::Login { username, password } => {
                    username.len() <= 4096 && password.len() <= 4096
                }
                _ => true,
            }
    }

    /// Encodes a command the gate let through: sent at once, or, for a login, held until the
    /// driver charged it ([`Next::ChargeLogin`]), before anything of it goes out, our ID
    /// included.
    fn encode(&mut self, tag: Vec<u8>, command: Command, charge: bool) {
        let literal_plus = self.literal_plus(&command);
        let Some(pieces) = command::encode(&tag, &command, literal_plus) else {
            self.core.to_client.extend_from_slice(&reply::tagged(
                &tag,
                "BAD",
                "Command not accepted",
            ));
            return;
        };
        if charge {
            self.charging = Some(Charging {
                tag,
                command,
                pieces,
            });
            return;
        }
        self.send(tag, &command, pieces);
    }

    /// See [`Machine::login_charge`].
    pub fn login_charge(&mut self, granted: bool) {
        if self
            .route
            .as_ref()
            .is_some_and(|route| route.stage == RouteStage::Charging)
        {
            self.routed_charge(granted);
            return;
        }
        let Some(Charging {
            tag,
            command,
            pieces,
        }) = self.charging.take()
        else {
            return;
        };
        match policy::decide(&self.gate(), Input::Charged { granted }) {
            Verdict::Forward => {
                if let Some(user) = login_user(&command) {
                    self.core.notices.push(Notice::User(user));
                }
                self.send(tag, &command, pieces);
            }
            // Refused before anything goes out: neither our ID nor the credentials.
            verdict => self.answer(&tag, verdict, &command_label(&command)),
        }
        if self.core.phase == Phase::Ready {
            pump_client(self);
        }
    }

    /// Sends a checked, encoded command (after our ID where the backend learns it first).
    fn send(&mut self, tag: Vec<u8>, command: &Command, pieces: Vec<Vec<u8>>) {
        let mut pieces: VecDeque<Vec<u8>> = pieces.into();
        let first = pieces.pop_front().unwrap_or_default();
        let (auth, sasl) = match command {
            Command::Login { .. } => (Some("LOGIN".to_owned()), false),
            Command::Authenticate { mechanism, .. } => (
                Some(mechanism_label(b"AUTHENTICATE", Some(mechanism))),
                true,
            ),
            Command::Logout => {
                self.logout = true;
                (None, false)
            }
            _ => (None, false),
        };
        if sasl {
            // Every later client line is a SASL response until the completion (RFC 9051 §6.2.2).
            self.rx.begin_sasl();
        }
        if auth.is_some() {
            self.login_sent = true;
        }
        let flight = InFlight {
            tag,
            auth,
            sasl,
            pieces,
            logout: matches!(command, Command::Logout),
            cancelled: false,
            user_from_first_line: match command {
                Command::Authenticate {
                    mechanism,
                    initial_response: None,
                } => Some(mechanism.clone()),
                _ => None,
            },
            held_responses: VecDeque::new(),
        };
        if flight.auth.is_some()
            && !self.caps.id
            && !self.id_sent
            && !self.settings.client_info.is_empty()
        {
            // No ID to carry the client's address: said once per listener, and the login goes on.
            self.core
                .notices
                .push(Notice::ClientInfo(crate::client_info::Notice::NotOffered));
        }
        if flight.auth.is_some() && self.caps.id && !self.id_sent {
            // The backend learns the cipher (and, with backend_client_info, the client's
            // address) before any credential, in its first ID: with the client's fields when
            // its ID was answered locally ([`Phase::Local`]).
            let own_tag = self.own_tag();
            let cipher = self.cipher_name();
            // A routed session keeps it for the backend of its next login, if this one fails.
            let client_id = if self.settings.routed {
                self.client_id.clone()
            } else {
                self.client_id.take()
            };
            let (ours, source) = match client_id {
                Some(mut client) => {
                    client.tag = own_tag.clone();
                    let fields = self.our_id_fields(&cipher);
                    (id::rewrite_client_id(&client, &fields), IdSource::Client)
                }
                None => (
                    id::build_id_command(&own_tag, &self.our_id_fields(&cipher)),
                    IdSource::Proxy,
                ),
            };
            self.core.to_backend.extend_from_slice(&ours);
            self.id_sent = true;
            self.core.notices.push(Notice::IdFieldAdded(source));
            self.own = Some(Own::Id(own_tag));
            self.deferred = Some(flight);
            self.deferred_first = first;
            return;
        }
        self.core.to_backend.extend_from_slice(&first);
        self.in_flight = Some(flight);
    }

    // ---- backend side ------------------------------------------------------------------

    fn pump_backend(&mut self) -> bool {
        let mut acted = false;
        while matches!(self.core.phase, Phase::Greeting | Phase::Ready) {
            let step = self.srx.next(&self.core.bbuf);
            self.core
                .bbuf
                .drain(..step.consumed.min(self.core.bbuf.len()));
            let Some(event) = step.event else {
                break;
            };
            acted = true;
            match event {
                ServerEvent::Rejected(e) => {
                    self.core
                        .to_client
                        .extend_from_slice(&reply::bye_unavailable());
                    self.core.finish(End::BackendProtocol(e.to_string()));
                }
                ServerEvent::Greeting(response) if self.core.phase == Phase::Greeting => {
                    self.on_greeting(response)
                }
                ServerEvent::Greeting(response) | ServerEvent::Response(response) => {
                    if self.core.phase == Phase::Greeting {
                        self.core
                            .to_client
                            .extend_from_slice(&reply::bye_unavailable());
                        self.core
                            .finish(End::BackendProtocol("backend: no greeting".to_owned()));
                    } else {
                        self.on_response(response);
                    }
                }
            }
        }
        // A completion may have freed the client side (on a routed session, a failed login's
        // took it back to [`Phase::Local`]).
        if matches!(self.core.phase, Phase::Ready | Phase::Local) && pump_client(self) {
            acted = true;
        }
        acted
    }

    fn on_greeting(&mut self, greeting: Response) {
        match greeting.status {
            Some(Status::PreAuth) => {
                // Relaying it would hand out an authenticated session without credentials.
                self.core.to_client.extend_from_slice(&reply::bye_preauth());
                self.core.finish(End::BackendProtocol(
                    "backend greeted with PREAUTH".to_owned(),
                ));
                return;
            }
            Some(Status::Bye) if self.settings.routed => {
                // The user's backend refuses service now: the login's temporary failure, and
                // the session goes on without it (issue 22: never another backend).
                self.routed_unavailable();
                return;
            }
            Some(Status::Bye) => {
                self.core.to_client.extend_from_slice(&greeting.raw);
                self.core.finish(End::BackendClosed);
                return;
            }
            _ => {}
        }
        let known = capability::capabilities(&greeting.raw).is_some();
        self.learn(&greeting.raw);
        if !self.greeted {
            // The client's only greeting. After STARTTLS, or once mailfront greeted with TLS up
            // ([`Phase::Local`]), the client had ours already, so the backend's is not shown.
            let shown =
                capability::rewrite_response(&greeting.raw, self.view()).unwrap_or(greeting.raw);
            self.core.to_client.extend_from_slice(&shown);
            self.greeted = true;
        }
        self.core.phase = Phase::Ready;
        if known {
            self.release_held();
        } else {
            // Learn ID/SASL-IR/LITERAL+ without showing the client anything; a held login
            // waits for the completion.
            let tag = self.own_tag();
            self.core.to_backend.extend_from_slice(&tag);
            self.core.to_backend.extend_from_slice(b" CAPABILITY\r\n");
            self.own = Some(Own::Capability(tag));
        }
    }

    fn on_response(&mut self, response: Response) {
        if let Some(own) = self.own.clone() {
            if let Some(status) = response.completion_of(own.tag()) {
                self.own = None;
                if matches!(own, Own::Id(_))
                    && status != Status::Ok
                    && !self.settings.client_info.is_empty()
                {
                    // backend_client_info is all or nothing: a backend that offers ID and
                    // refuses ours would see the login come from mailfront's own address.
                    self.deferred = None;
                    self.core
                        .to_client
                        .extend_from_slice(&reply::bye_unavailable());
                    self.core
                        .notices
                        .push(Notice::ClientInfo(crate::client_info::Notice::Refused));
                    self.core.finish(End::BackendUnavailable);
                    return;
                }
                if let Some(flight) = self.deferred.take() {
                    let first = std::mem::take(&mut self.deferred_first);
                    self.core.to_backend.extend_from_slice(&first);
                    self.in_flight = Some(flight);
                } else {
                    self.release_held();
                }
                return;
            }
            match own {
                Own::Capability(_) if response.is_capability_data() => {
                    self.learn(&response.raw);
                    return;
                }
                Own::Id(_) if response.is_id_data() => return,
                _ => {}
            }
        }
        if response.is_continuation() {
            self.on_continuation(response);
            return;
        }
        let completed = match &response.kind {
            ResponseKind::Tagged { tag } => self
                .in_flight
                .as_ref()
                .is_some_and(|f| &f.tag == tag)
                .then(|| self.in_flight.take())
                .flatten(),
            _ => None,
        };
        let logged_out = completed.as_ref().is_some_and(|flight| flight.logout)
            && response.status == Some(Status::Ok);
        let mut failed_login = false;
        if let Some((mechanism, cancelled)) =
            completed.and_then(|flight| flight.auth.map(|m| (m, flight.cancelled)))
        {
            let ok = response.status == Some(Status::Ok);
            // Success and a cancelled exchange are refunded; any other answer (NO, BAD) keeps
            // the attempt's charge.
            let charge = if ok || cancelled {
                Charge::Refund
            } else {
                Charge::Keep
            };
            self.core.notices.push(Notice::Auth {
                verdict: if ok {
                    AuthVerdict::Success
                } else {
                    AuthVerdict::Failure
                },
                mechanism,
                charge,
            });
            self.sasl_credit = 0;
            if ok {
                // Post-authentication capabilities pass untouched (RFC 9051 §6.2.2).
                self.core.to_client.extend_from_slice(&response.raw);
                self.core.phase = Phase::Authenticated;
                return;
            }
            self.rx.end_sasl();
            failed_login = self.settings.routed;
        }
        if response.kind == ResponseKind::Untagged && response.status == Some(Status::Bye) {
            // The backend is closing; its close then ends the session as a goodbye.
            self.logout = true;
        }
        self.learn(&response.raw);
        let shown =
            capability::rewrite_response(&response.raw, self.view()).unwrap_or(response.raw);
        self.core.to_client.extend_from_slice(&shown);
        if logged_out {
            // The tagged reply to LOGOUT is the last word (RFC 9051 §6.1.3): the session ends
            // with it, and the reply leaves together with the close instead of waiting for the
            // backend's.
            self.core.finish(End::ClientClosed);
        }
        if failed_login {
            self.leave_backend(true);
        }
    }

    fn on_continuation(&mut self, response: Response) {
        let Some(flight) = self.in_flight.as_mut() else {
            // Nothing of ours waits for it; the client never sent a literal to the backend.
            return;
        };
        if let Some(piece) = flight.pieces.pop_front() {
            // Our own synchronising literal: the client already had its `+` from us.
            self.core.to_backend.extend_from_slice(&piece);
            return;
        }
        if flight.sasl
            && let Some(response) = flight.held_responses.pop_front()
        {
            // A routed login's response mailfront held: the backend's challenge is the one the
            // client already answered to mailfront's own `+`, so it is swallowed.
            self.core
                .to_backend
                .extend_from_slice(&command::encode_sasl(&command::SaslLine::Response(
                    response,
                )));
            return;
        }
        if flight.sasl {
            self.sasl_credit = self.sasl_credit.saturating_add(1);
            self.core.to_client.extend_from_slice(&response.raw);
        }
    }
}

/// A routed session ([`Settings::routed`]): the login held whole, routed, replayed, and the
/// backend left behind when it fails.
impl Prelogin {
    /// A LOGIN or AUTHENTICATE the gate would charge, on a routed session in [`Phase::Local`]:
    /// held until mailfront has the user name. LOGIN is complete at once; AUTHENTICATE waits for
    /// its first response ([`Prelogin::collect`]).
    fn routed_login(&mut self, tag: Vec<u8>, command: Command) {
        let (command, responses) = match command {
            Command::Authenticate { mechanism, .. } if !capability::routable(&mechanism) => {
                // Hidden from the capabilities ([`CapabilityView::TlsRouted`]), and never
                // forwarded: no backend can be chosen before its challenge.
                self.core
                    .to_client
                    .extend_from_slice(&reply::mechanism_not_routable(&tag));
                return;
            }
            Command::Authenticate {
                mechanism,
                initial_response,
            } => {
                // `=` is an empty initial response (RFC 4959 §3); the backend gets every
                // response on a continuation line, where it is written empty.
                let responses = initial_response
                    .map(|ir| if ir == b"=" { Vec::new() } else { ir })
                    .into_iter()
                    .collect();
                let command = Command::Authenticate {
                    mechanism,
                    initial_response: None,
                };
                (command, responses)
            }
            command @ Command::Login { .. } => (command, Vec::new()),
            // The gate charges only logins.
            command => {
                self.answer(&tag, Verdict::Forward, &command_label(&command));
                return;
            }
        };
        self.route = Some(RoutedLogin {
            tag,
            command,
            responses,
            stage: RouteStage::Collecting,
        });
        self.collect();
    }

    /// Asks the client for the next response mailfront holds with its own continuation, or,
    /// once it has them all, goes on to the charge. A LOGIN mechanism user name that cannot be
    /// read fails without asking for the password.
    fn collect(&mut self) {
        let Some(route) = self
            .route
            .as_mut()
            .filter(|route| route.stage == RouteStage::Collecting)
        else {
            return;
        };
        let held = route.responses.len();
        if held >= route.needed() || (held > 0 && route.user().is_none()) {
            route.stage = RouteStage::Charging;
            self.rx.end_sasl();
            return;
        }
        let challenge = match (route.is_login_mechanism(), held) {
            (true, 0) => reply::SASL_LOGIN_USERNAME,
            (true, _) => reply::SASL_LOGIN_PASSWORD,
            (false, _) => reply::SASL_CONTINUATION,
        };
        self.core.to_client.extend_from_slice(challenge);
        if !self.rx.in_sasl() {
            // Every client line is a SASL response until the exchange ends (RFC 9051 §6.2.2).
            self.rx.begin_sasl();
        }
    }

    /// The client's answer to a continuation mailfront sent itself: held, or the exchange ends
    /// here with a tagged BAD (a cancel, or a line that is not base64: RFC 9051 §6.2.2), with
    /// no backend contacted and nothing charged.
    fn routed_response(&mut self, line: &command::SaslLine) {
        match line {
            command::SaslLine::Response(response) => {
                if let Some(route) = self.route.as_mut() {
                    route.responses.push(response.clone());
                }
                self.collect();
            }
            command::SaslLine::Cancel | command::SaslLine::Invalid => {
                let Some(route) = self.route.take() else {
                    return;
                };
                self.rx.end_sasl();
                let bad = match line {
                    command::SaslLine::Cancel => reply::authenticate_cancelled(&route.tag),
                    _ => reply::authenticate_invalid(&route.tag),
                };
                self.core.to_client.extend_from_slice(&bad);
            }
        }
    }

    /// The driver's answer to a routed login's [`Next::ChargeLogin`]: granted, the driver routes
    /// it ([`Phase::Connecting`], [`Machine::login_facts`]); a login whose user cannot be read
    /// fails here, charged (it is a guess like any other); refused, the throttled reply.
    fn routed_charge(&mut self, granted: bool) {
        let Some(mut route) = self.route.take() else {
            return;
        };
        let label = command_label(&route.command);
        match policy::decide(&self.gate(), Input::Charged { granted }) {
            Verdict::Forward => match route.user() {
                Some(user) => {
                    self.core.notices.push(Notice::User(user));
                    route.stage = RouteStage::Routing;
                    self.route = Some(route);
                    self.core.phase = Phase::Connecting;
                    return;
                }
                None => {
                    self.core
                        .to_client
                        .extend_from_slice(&reply::authentication_failed(&route.tag));
                    self.core.notices.push(Notice::Auth {
                        verdict: AuthVerdict::Failure,
                        mechanism: label,
                        charge: Charge::Keep,
                    });
                }
            },
            verdict => self.answer(&route.tag, verdict, &label),
        }
        if self.core.phase == Phase::Local {
            pump_client(self);
        }
    }

    /// The chosen backend is ready and its capabilities known: the routed login goes out, after
    /// mailfront's ID where the backend takes one. AUTHENTICATE goes without an initial response
    /// (the backend may lack SASL-IR), and the responses mailfront holds answer the backend's
    /// continuations ([`Prelogin::on_continuation`]).
    fn release_routed(&mut self) {
        let Some(route) = self
            .route
            .as_mut()
            .filter(|route| route.stage == RouteStage::Routing)
        else {
            return;
        };
        route.stage = RouteStage::Sent;
        let (tag, command) = (route.tag.clone(), route.command.clone());
        let held: VecDeque<Vec<u8>> = route.responses.iter().cloned().collect();
        let literal_plus = self.literal_plus(&command);
        let Some(pieces) = command::encode(&tag, &command, literal_plus) else {
            // The receiver parsed it, so it encodes; one that would not goes nowhere.
            self.route_failed(RouteFailure::Unavailable);
            return;
        };
        self.send(tag, &command, pieces);
        if let Some(flight) = self.deferred.as_mut().or(self.in_flight.as_mut()) {
            // The user was named at the charge.
            flight.user_from_first_line = None;
            flight.held_responses = held;
        }
    }

    /// See [`Machine::route_failed`]; also what a routed session does when its backend refuses
    /// service before the login went out (a `BYE` greeting, a close, an I/O error).
    pub fn route_failed(&mut self, failure: RouteFailure) {
        let Some(route) = self.route.take().filter(|route| {
            self.settings.routed && matches!(route.stage, RouteStage::Routing | RouteStage::Sent)
        }) else {
            // No routed login waits: as any backend failure.
            Machine::backend_failed(self);
            return;
        };
        let label = command_label(&route.command);
        // The driver is still connecting when the router answers, or a connection failed.
        let connected = !matches!(self.core.phase, Phase::Connecting | Phase::Local);
        self.core.to_backend.clear();
        self.leave_backend(false);
        self.close_backend = connected;
        match failure {
            RouteFailure::Refused { text, go_on, .. } => {
                self.core
                    .to_client
                    .extend_from_slice(&reply::login_refused(&route.tag, &text));
                self.core.notices.push(Notice::Auth {
                    verdict: AuthVerdict::Failure,
                    mechanism: label,
                    charge: Charge::Keep,
                });
                if !go_on {
                    self.core
                        .to_client
                        .extend_from_slice(&reply::bye_login_refused());
                    self.core.finish(End::LoginRefused);
                }
            }
            RouteFailure::Unavailable => {
                self.core
                    .to_client
                    .extend_from_slice(&reply::login_unavailable(&route.tag));
                self.core.notices.push(Notice::Auth {
                    verdict: AuthVerdict::NotCompleted,
                    mechanism: label,
                    charge: Charge::Refund,
                });
            }
        }
        if self.core.phase == Phase::Local {
            pump_client(self);
        }
    }

    /// The user's backend refuses service before the login went out: the login's temporary
    /// failure ([`RouteFailure::Unavailable`]), never another backend (issue 22).
    fn routed_unavailable(&mut self) {
        self.route_failed(RouteFailure::Unavailable);
    }

    /// Whether a routed login is with the backend before its credentials went out.
    fn routing(&self) -> bool {
        self.settings.routed
            && self
                .route
                .as_ref()
                .is_some_and(|route| route.stage == RouteStage::Routing)
    }

    /// A routed session leaves its backend (after a failed login, or one that never went out):
    /// back to [`Phase::Local`] with nothing of that backend kept, so the next login is routed
    /// afresh (it may name another user, who may live elsewhere). `goodbye`: a LOGOUT goes
    /// first (RFC 9051 §6.1.3), so the backend logs a client that left rather than one lost.
    fn leave_backend(&mut self, goodbye: bool) {
        if goodbye {
            let tag = self.own_tag();
            self.core.to_backend.extend_from_slice(&tag);
            self.core.to_backend.extend_from_slice(b" LOGOUT\r\n");
        }
        self.srx = ResponseReceiver::new(ResponseLimits::default());
        self.core.bbuf.clear();
        self.own = None;
        self.in_flight = None;
        self.deferred = None;
        self.deferred_first.clear();
        self.sasl_credit = 0;
        self.id_sent = false;
        self.login_sent = false;
        self.logout = false;
        self.route = None;
        self.rx.end_sasl();
        // The gate judges the next login on what the client was shown.
        if let Some(list) = self.known_capability.clone() {
            self.set_caps(&list);
        }
        self.close_backend = true;
        if self.core.phase != Phase::Ended {
            self.core.phase = Phase::Local;
        }
    }
}

impl ClientEvents for Prelogin {
    type Event = Event;

    fn may_take_event(&self) -> bool {
        self.may_take_client_event()
    }

    fn parse_event(&mut self) -> Step<Event> {
        self.rx.next(&self.core.cbuf)
    }

    fn on_cleartext(&mut self, event: Event) {
        self.on_client_event(event);
    }

    fn on_event(&mut self, event: Event) {
        self.on_client_event(event);
    }
}

impl Machine for Prelogin {
    const PROTOCOL: &'static str = "imap";

    fn core(&mut self) -> &mut Core {
        &mut self.core
    }

    fn core_ref(&self) -> &Core {
        &self.core
    }

    fn next(&self) -> Next {
        if self.charging.is_some() && self.core.phase == Phase::Ready {
            return Next::ChargeLogin;
        }
        if self.core.phase == Phase::Local
            && self
                .route
                .as_ref()
                .is_some_and(|route| route.stage == RouteStage::Charging)
        {
            return Next::ChargeLogin;
        }
        self.core.next()
    }

    fn login_facts(&self) -> Option<LoginFacts> {
        self.route
            .as_ref()
            .filter(|route| {
                self.settings.routed
                    && matches!(route.stage, RouteStage::Routing | RouteStage::Sent)
            })
            .and_then(RoutedLogin::facts)
    }

    fn route_failed(&mut self, failure: RouteFailure) {
        Prelogin::route_failed(self, failure);
    }

    /// With no backend ([`Phase::Local`]: a routed session just left its own, and the driver
    /// failed to write the goodbye) there is nothing to fail. A routed login whose backend
    /// fails before the credentials went out gets the temporary failure, and the session goes
    /// on; otherwise the client is told the service is unavailable and the session ends.
    fn backend_failed(&mut self) {
        if self.core.phase == Phase::Local {
            self.core.to_backend.clear();
            return;
        }
        if self.routing() {
            self.routed_unavailable();
            return;
        }
        self.core.to_backend.clear();
        self.core
            .to_client
            .extend_from_slice(&reply::bye_unavailable());
        self.core.finish(End::BackendClosed);
    }

    fn take_backend_close(&mut self) -> bool {
        std::mem::take(&mut self.close_backend)
    }

    fn login_charge(&mut self, granted: bool) {
        Prelogin::login_charge(self, granted);
    }

    /// Parsed commands restart the idle timer; so do any bytes while the client has the turn
    /// over TLS. In cleartext only a whole line does (as for POP3): the cleartext dialogue has
    /// no long legitimate input, and an endless or trickled line must not hold the session.
    fn client_input(&mut self, bytes: &[u8]) -> bool {
        let any_bytes_count =
            self.core.phase != Phase::Cleartext && !Prelogin::waiting_for_backend(self);
        Prelogin::client_input(self, bytes) || any_bytes_count
    }

    /// Only a whole response restarts the idle timer.
    fn backend_input(&mut self, bytes: &[u8]) -> bool {
        Prelogin::backend_input(self, bytes)
    }

    fn backend_connected(&mut self) {
        Prelogin::backend_connected(self);
    }

    fn backend_closed(&mut self) {
        Prelogin::backend_closed(self);
    }

    fn tls_started(&mut self, tls: TlsFacts) {
        Prelogin::tls_started(self, tls);
    }

    fn waiting_for_backend(&self) -> bool {
        Prelogin::waiting_for_backend(self)
    }

    fn client_info_warning(problem: crate::client_info::Notice) -> &'static str {
        match problem {
            crate::client_info::Notice::NotOffered => {
                "the backend does not offer ID; going on without it"
            }
            crate::client_info::Notice::Refused => {
                "the backend refused mailfront's ID; sessions are closed with BYE [UNAVAILABLE] until it accepts it"
            }
        }
    }

    fn bye_unavailable(&self) -> Vec<u8> {
        reply::bye_unavailable()
    }

    fn bye_idle(&self) -> Vec<u8> {
        reply::bye_idle_timeout()
    }

    fn bye_login_timeout(&self) -> Vec<u8> {
        reply::bye_login_timeout()
    }

    fn bye_shutdown(&self) -> Vec<u8> {
        reply::bye_shutdown()
    }
}

/// The label of a login command for logs ([`mechanism_label`]); empty for any other command.
fn command_label(command: &Command) -> String {
    match command {
        Command::Login { .. } => mechanism_label(b"LOGIN", None),
        Command::Authenticate { mechanism, .. } => {
            mechanism_label(b"AUTHENTICATE", Some(mechanism))
        }
        _ => String::new(),
    }
}

/// `LOGIN` or `AUTHENTICATE <MECH>` for logs: never a credential, and only characters a SASL
/// mechanism name may have (RFC 4422 §3.1).
fn mechanism_label(name: &[u8], mechanism: Option<&[u8]>) -> String {
    if name.eq_ignore_ascii_case(b"LOGIN") {
        return "LOGIN".to_owned();
    }
    match mechanism {
        Some(mechanism) => format!("AUTHENTICATE {}", sasl::mechanism_for_log(mechanism)),
        None => "AUTHENTICATE".to_owned(),
    }
}

/// The user name a login names as it goes out, for the session's close line: LOGIN's, or the
/// one AUTHENTICATE's initial response carries (RFC 4959). Never the password.
fn login_user(command: &Command) -> Option<Vec<u8>> {
    match command {
        Command::Login { username, .. } => Some(username.clone()),
        Command::Authenticate {
            mechanism,
            initial_response: Some(response),
        } => sasl::user_in_first_response(mechanism, response),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::machine::testing::{Step, Throttle, check_charges, play};

    const CIPHER: &str = "TLS_AES_128_GCM_SHA256";

    fn settings(listener: TlsMode) -> Settings {
        Settings {
            listener,
            hostname: "mx.example.test".to_owned(),
            limits: command::Limits::default(),
            max_commands: 50,
            client_info: Vec::new(),
            learned_capability: None,
            routed: false,
        }
    }

    fn cleartext() -> Prelogin {
        Prelogin::new(settings(TlsMode::Starttls), None, 7)
    }

    /// An implicit-TLS session greeted by a backend with `caps`.
    fn greeted(caps: &str) -> Prelogin {
        let mut m = Prelogin::new(
            settings(TlsMode::Implicit),
            Some(crate::machine::testing::tls13()),
            7,
        );
        assert_eq!(m.next(), Next::Connect);
        m.backend_connected();
        let greeting = format!("* OK [CAPABILITY {caps}] backend ready\r\n");
        m.backend_input(greeting.as_bytes());
        assert_eq!(m.next(), Next::Run);
        assert_eq!(
            m.take_notices(),
            [Notice::BackendImapCapability(caps.as_bytes().to_vec())],
            "the listener's next sessions learn the greeting's capabilities"
        );
        m
    }

    /// What the machine wrote each way, after granting every login it held (a driver
    /// without a throttle); the tests about throttling answer [`Next::ChargeLogin`] themselves.
    fn out(m: &mut Prelogin) -> (String, String) {
        while m.next() == Next::ChargeLogin {
            m.login_charge(true);
        }
        (
            String::from_utf8_lossy(&m.take_to_client()).into_owned(),
            String::from_utf8_lossy(&m.take_to_backend()).into_owned(),
        )
    }

    #[test]
    fn a_capability_list_after_a_login_went_out_is_never_learned() {
        let mut m = greeted("IMAP4rev1 AUTH=PLAIN SASL-IR");
        m.client_input(b"a LOGIN user secret\r\n");
        out(&mut m);
        // Whatever the backend says now may be its post-login list (RFC 9051 §6.2.2): a later
        // session answering CAPABILITY with it would offer no mechanism to log in with.
        m.backend_input(
            b"* CAPABILITY IMAP4rev1 SORT THREAD=REFS\r\na NO [AUTHENTICATIONFAILED] no\r\n",
        );
        out(&mut m);
        assert!(
            !m.take_notices()
                .iter()
                .any(|n| matches!(n, Notice::BackendImapCapability(_))),
            "a list seen after a login was handed on"
        );
    }

    /// The tag of the ID mailfront sent itself (`mf…`).
    fn own_tag(to_backend: &str) -> String {
        to_backend
            .split(' ')
            .next()
            .filter(|t| t.starts_with("mf"))
            .unwrap_or_else(|| panic!("no own command in {to_backend:?}"))
            .to_owned()
    }

    #[test]
    fn the_cleartext_dialogue_is_answered_without_a_backend() {
        let mut m = cleartext();
        let (greeting, _) = out(&mut m);
        assert_eq!(
            greeting,
            "* OK [CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED] mx.example.test ready\r\n"
        );
        m.client_input(
            b"a CAPABILITY\r\nb NOOP\r\nc LOGIN alice secret\r\nd AUTHENTICATE PLAIN AGFsaWNlAHNlY3JldA==\r\ne ID (\"name\" \"x\")\r\nf XCLIENT ADDR=192.0.2.1\r\ng LOGOUT\r\n",
        );
        let (client, backend) = out(&mut m);
        assert_eq!(backend, "");
        assert_eq!(
            client,
            "* CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED\r\na OK CAPABILITY completed\r\n\
             b OK NOOP completed\r\n\
             c NO [PRIVACYREQUIRED] Cleartext authentication disallowed; use STARTTLS first\r\n\
             d NO [PRIVACYREQUIRED] Cleartext authentication disallowed; use STARTTLS first\r\n\
             * ID NIL\r\ne OK ID completed\r\n\
             f BAD Command not allowed before authentication\r\n\
             * BYE Logging out\r\ng OK LOGOUT completed\r\n"
        );
        assert_eq!(m.next(), Next::End(End::ClientClosed));
        assert_eq!(
            m.take_notices(),
            vec![
                Notice::CleartextAuthRefused {
                    mechanism: "LOGIN".to_owned()
                },
                Notice::CleartextAuthRefused {
                    mechanism: "AUTHENTICATE PLAIN".to_owned()
                },
            ]
        );
    }

    fn with_client_info(caps: &str) -> Prelogin {
        let mut settings = settings(TlsMode::Implicit);
        settings.client_info = crate::client_info::imap_id_fields(
            "192.0.2.7:40000".parse().unwrap(),
            "198.51.100.1:993".parse().unwrap(),
            "S1",
        );
        let mut m = Prelogin::new(settings, Some(crate::machine::testing::tls13()), 7);
        m.backend_connected();
        let greeting = format!("* OK [CAPABILITY {caps}] backend ready\r\n");
        m.backend_input(greeting.as_bytes());
        m.take_notices();
        m
    }

    const CLIENT_INFO: &str = "\"x-originating-ip\" \"192.0.2.7\" \"x-originating-port\" \"40000\" \"x-connected-ip\" \"198.51.100.1\" \"x-connected-port\" \"993\" \"x-session-id\" \"S1\"";

    #[test]
    fn the_own_id_carries_the_clients_address_beside_tls_before_the_login() {
        let mut m = with_client_info("IMAP4rev1 ID AUTH=PLAIN");
        out(&mut m);
        m.client_input(b"a LOGIN alice secret\r\n");
        let (_, backend) = out(&mut m);
        let tag = own_tag(&backend);
        assert_eq!(
            backend,
            format!("{tag} ID (\"tls\" \"{CIPHER}\" {CLIENT_INFO})\r\n"),
            "the credential waits for the ID's answer"
        );
    }

    #[test]
    fn a_client_id_gets_our_fields_and_loses_its_forged_ones() {
        let mut m = with_client_info("IMAP4rev1 ID");
        out(&mut m);
        m.client_input(b"a ID (\"name\" \"mutt\" \"x-originating-ip\" \"10.6.6.6\" \"X-Session-ID\" \"evil\")\r\n");
        let (_, backend) = out(&mut m);
        assert_eq!(
            backend,
            format!("a ID (\"name\" \"mutt\" \"tls\" \"{CIPHER}\" {CLIENT_INFO})\r\n")
        );
    }

    /// All or nothing: a backend that offers ID and refuses mailfront's would take the login
    /// from mailfront's own address, so the credential is never sent and the session ends.
    #[test]
    fn a_refused_own_id_ends_the_session_before_the_credential() {
        let mut m = with_client_info("IMAP4rev1 ID AUTH=PLAIN");
        out(&mut m);
        m.client_input(b"a LOGIN alice secret\r\n");
        let (_, backend) = out(&mut m);
        let tag = own_tag(&backend);
        m.backend_input(format!("{tag} NO ID not allowed\r\n").as_bytes());
        let (client, backend) = out(&mut m);
        assert_eq!(
            client,
            "* BYE [UNAVAILABLE] Server temporarily unavailable\r\n"
        );
        assert_eq!(backend, "", "the credential never leaves");
        assert_eq!(
            m.take_notices(),
            [
                Notice::User(b"alice".to_vec()),
                Notice::IdFieldAdded(IdSource::Proxy),
                Notice::ClientInfo(crate::client_info::Notice::Refused)
            ]
        );
        assert_eq!(m.next(), Next::End(End::BackendUnavailable));
    }

    #[test]
    fn a_backend_without_id_is_noticed_and_the_login_goes_on() {
        let mut m = with_client_info("IMAP4rev1 AUTH=PLAIN");
        out(&mut m);
        m.client_input(b"a LOGIN alice secret\r\n");
        let (_, backend) = out(&mut m);
        assert_eq!(backend, "a LOGIN \"alice\" \"secret\"\r\n");
        assert_eq!(
            m.take_notices(),
            [
                Notice::User(b"alice".to_vec()),
                Notice::ClientInfo(crate::client_info::Notice::NotOffered),
            ]
        );
    }

    #[test]
    fn a_login_hidden_behind_a_brace_in_an_atom_is_refused_before_tls() {
        // `x{24+}` is atom text, not a literal (a literal is a whole token, RFC 9051 §9), for
        // Dovecot and for us: taken for a literal, it would hide the LOGIN line from the gate.
        let mut m = cleartext();
        out(&mut m);
        m.client_input(b"a2 NOOP x{24+}\r\na3 LOGIN alice secret1\r\n\r\n");
        let (client, backend) = out(&mut m);
        assert_eq!(backend, "");
        assert!(client.starts_with("a2 BAD"), "{client}");
        assert!(client.contains("a3 NO [PRIVACYREQUIRED]"), "{client}");
        assert!(!client.contains(" OK"), "{client}");
        assert_eq!(m.next(), Next::Run);
    }

    #[test]
    fn a_literal_before_tls_is_refused_before_its_continuation() {
        let mut m = cleartext();
        out(&mut m);
        m.client_input(b"a LOGIN {5}\r\n");
        let (client, _) = out(&mut m);
        assert_eq!(
            client,
            "a NO [PRIVACYREQUIRED] Cleartext authentication disallowed; use STARTTLS first\r\n"
        );
        m.client_input(b"b NOOP {3}\r\n");
        let (client, _) = out(&mut m);
        assert_eq!(client, "b BAD Literal not accepted before STARTTLS\r\n");
        // A client that sends the octets anyway only gets them parsed as (bad) commands.
        m.client_input(b"alice\r\n");
        let (client, backend) = out(&mut m);
        assert!(client.contains("BAD"), "{client}");
        assert_eq!(backend, "");
    }

    #[test]
    fn bare_lf_cr_and_nul_lines_are_refused_and_what_follows_is_gated() {
        let mut m = cleartext();
        out(&mut m);
        m.client_input(b"a NOOP\nb LOGIN u p\r\nc NO\rOP\r\nd NO\0OP\r\n");
        let (client, backend) = out(&mut m);
        assert_eq!(backend, "");
        let lines: Vec<&str> = client.split("\r\n").collect();
        assert!(lines[0].contains("BAD"), "{client}");
        assert!(lines[1].starts_with("b NO [PRIVACYREQUIRED]"), "{client}");
        assert!(
            lines[2].contains("BAD") && lines[3].contains("BAD"),
            "{client}"
        );
    }

    #[test]
    fn starttls_drops_what_was_pipelined_after_it_and_connects_only_then() {
        let mut m = cleartext();
        out(&mut m);
        m.client_input(b"a STARTTLS\r\nb LOGIN alice secret\r\n");
        let (client, backend) = out(&mut m);
        assert_eq!(client, "a OK Begin TLS negotiation now\r\n");
        assert_eq!(backend, "");
        assert_eq!(m.next(), Next::StartTls);
        assert!(!m.wants_client_input(1 << 20));
        m.tls_started(crate::machine::testing::tls13());
        assert_eq!(m.next(), Next::Connect);
        m.backend_connected();
        m.backend_input(b"* OK [CAPABILITY IMAP4rev1 ID AUTH=PLAIN] backend ready\r\n");
        // The backend's greeting is not shown: the client had ours.
        let (client, backend) = out(&mut m);
        assert_eq!(client, "");
        assert_eq!(backend, "");
        m.client_input(b"c CAPABILITY\r\n");
        let (_, backend) = out(&mut m);
        assert_eq!(backend, "c CAPABILITY\r\n");
    }

    #[test]
    fn a_throttled_address_gets_no_and_nothing_reaches_the_backend() {
        let mut m = greeted("IMAP4rev1 AUTH=PLAIN");
        out(&mut m);
        let mut throttle = Throttle::new(1, 0);
        // Pipelined: the second attempt is read in the same input as the first one's refusal.
        let (client, backend) = play(
            &mut m,
            &mut throttle,
            &[
                Step::Client(
                    "a1 LOGIN alice wrong\r\na2 LOGIN alice wrong2\r\na3 AUTHENTICATE PLAIN\r\n",
                ),
                Step::Backend("a1 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"),
            ],
        );
        assert_eq!(backend, "a1 LOGIN \"alice\" \"wrong\"\r\n");
        assert_eq!(
            client,
            "a1 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n\
             a2 NO [UNAVAILABLE] Too many failed logins, try again later\r\n\
             a3 NO [UNAVAILABLE] Too many failed logins, try again later\r\n"
        );
        assert_eq!(
            throttle.notices,
            vec![
                Notice::User(b"alice".to_vec()),
                Notice::Auth {
                    verdict: AuthVerdict::Failure,
                    mechanism: "LOGIN".to_owned(),
                    charge: Charge::Keep,
                },
                Notice::AuthThrottled {
                    mechanism: "LOGIN".to_owned()
                },
                Notice::AuthThrottled {
                    mechanism: "AUTHENTICATE PLAIN".to_owned()
                },
            ]
        );
        assert!(
            !m.rx.in_sasl(),
            "a refused AUTHENTICATE starts no SASL exchange"
        );
        // Other commands still go, and once the window frees a charge so do logins.
        let (_, backend) = play(
            &mut m,
            &mut throttle,
            &[
                Step::Client("a4 CAPABILITY\r\n"),
                Step::Backend("* CAPABILITY IMAP4rev1\r\na4 OK done\r\n"),
            ],
        );
        assert_eq!(backend, "a4 CAPABILITY\r\n");
        throttle.charged = 0;
        let (_, backend) = play(
            &mut m,
            &mut throttle,
            &[Step::Client("a5 LOGIN alice secret\r\n")],
        );
        assert_eq!(backend, "a5 LOGIN \"alice\" \"secret\"\r\n");
    }

    #[test]
    fn a_held_login_waits_for_its_charge_and_nothing_passes_it() {
        let mut m = greeted("IMAP4rev1 AUTH=PLAIN");
        out(&mut m);
        m.client_input(b"a LOGIN u p\r\nb NOOP\r\n");
        assert_eq!(m.next(), Next::ChargeLogin);
        assert_eq!(m.take_to_backend(), b"", "nothing before the charge");
        // Answering again, or out of turn, changes nothing.
        m.login_charge(true);
        assert_eq!(m.take_to_backend(), b"a LOGIN \"u\" \"p\"\r\n");
        m.login_charge(true);
        assert_eq!(m.take_to_backend(), b"", "NOOP waits for the verdict");
        assert_eq!(m.next(), Next::Run);
    }

    /// Every IMAP login path against the charge it leaves: `charged` counts what stays charged
    /// after the steps (a login still with the backend included: the client may hang up now).
    #[test]
    fn every_login_path_is_charged_when_sent_and_refunded_only_without_a_wrong_guess() {
        struct Case {
            name: &'static str,
            caps: &'static str,
            /// Limit, and charges other sessions already hold.
            limit: u32,
            already: u32,
            steps: &'static [Step],
            charged: u32,
            refused: u32,
            reached: &'static [&'static str],
            never: &'static [&'static str],
        }
        use Step::{Backend as B, BackendClosed, Client as C};
        const CAPS: &str = "IMAP4rev1 SASL-IR AUTH=PLAIN";
        let cases = [
            Case {
                name: "LOGIN refused keeps its charge",
                caps: CAPS,
                limit: 3,
                already: 0,
                steps: &[
                    C("a LOGIN u wrong\r\n"),
                    B("a NO [AUTHENTICATIONFAILED] no\r\n"),
                ],
                charged: 1,
                refused: 0,
                reached: &["wrong"],
                never: &[],
            },
            Case {
                name: "LOGIN accepted is refunded",
                caps: CAPS,
                limit: 3,
                already: 0,
                steps: &[C("a LOGIN u secret\r\n"), B("a OK Logged in\r\n")],
                charged: 0,
                refused: 0,
                reached: &["secret"],
                never: &[],
            },
            Case {
                name: "LOGIN refused with BAD keeps its charge",
                caps: CAPS,
                limit: 3,
                already: 0,
                steps: &[C("a LOGIN u wrong\r\n"), B("a BAD no\r\n")],
                charged: 1,
                refused: 0,
                reached: &["wrong"],
                never: &[],
            },
            Case {
                name: "a client that hangs up before the verdict keeps the charge",
                caps: CAPS,
                limit: 3,
                already: 0,
                steps: &[C("a LOGIN u wrong\r\n")],
                charged: 1,
                refused: 0,
                reached: &["wrong"],
                never: &[],
            },
            Case {
                name: "a backend that closes mid-login keeps the charge",
                caps: CAPS,
                limit: 3,
                already: 0,
                steps: &[C("a LOGIN u wrong\r\n"), BackendClosed],
                charged: 1,
                refused: 0,
                reached: &["wrong"],
                never: &[],
            },
            Case {
                name: "AUTHENTICATE with SASL-IR refused keeps",
                caps: CAPS,
                limit: 3,
                already: 0,
                steps: &[
                    C("a AUTHENTICATE PLAIN AHUAd3Jvbmc=\r\n"),
                    B("a NO [AUTHENTICATIONFAILED] no\r\n"),
                ],
                charged: 1,
                refused: 0,
                reached: &["AHUAd3Jvbmc="],
                never: &[],
            },
            Case {
                name: "AUTHENTICATE in steps refused keeps",
                caps: CAPS,
                limit: 3,
                already: 0,
                steps: &[
                    C("a AUTHENTICATE PLAIN\r\n"),
                    B("+ \r\n"),
                    C("AHUAd3Jvbmc=\r\n"),
                    B("a NO [AUTHENTICATIONFAILED] no\r\n"),
                ],
                charged: 1,
                refused: 0,
                reached: &["AHUAd3Jvbmc="],
                never: &[],
            },
            Case {
                name: "AUTHENTICATE in steps accepted is refunded",
                caps: CAPS,
                limit: 3,
                already: 0,
                steps: &[
                    C("a AUTHENTICATE PLAIN\r\n"),
                    B("+ \r\n"),
                    C("AHUAc2VjcmV0\r\n"),
                    B("a OK Logged in\r\n"),
                ],
                charged: 0,
                refused: 0,
                reached: &["AHUAc2VjcmV0"],
                never: &[],
            },
            Case {
                name: "AUTHENTICATE cancelled by the client is refunded",
                caps: CAPS,
                limit: 3,
                already: 0,
                steps: &[
                    C("a AUTHENTICATE PLAIN\r\n"),
                    B("+ \r\n"),
                    C("*\r\n"),
                    B("a BAD Authentication aborted\r\n"),
                ],
                charged: 0,
                refused: 0,
                reached: &["*\r\n"],
                never: &[],
            },
            Case {
                name: "a line that is not base64 cancels, and is refunded (NO too)",
                caps: CAPS,
                limit: 3,
                already: 0,
                steps: &[
                    C("a AUTHENTICATE PLAIN\r\n"),
                    B("+ \r\n"),
                    C("not base64!\r\n"),
                    B("a NO Authentication aborted\r\n"),
                ],
                charged: 0,
                refused: 0,
                reached: &["*\r\n"],
                never: &["not base64"],
            },
            Case {
                name: "a hang-up inside the exchange keeps the charge",
                caps: CAPS,
                limit: 3,
                already: 0,
                steps: &[C("a AUTHENTICATE PLAIN\r\n"), B("+ \r\n")],
                charged: 1,
                refused: 0,
                reached: &["a AUTHENTICATE PLAIN"],
                never: &[],
            },
            Case {
                name: "pipelined logins past the limit never go out",
                caps: CAPS,
                limit: 2,
                already: 0,
                steps: &[
                    C(
                        "a LOGIN u w1\r\nb LOGIN u w2\r\nc LOGIN u w3\r\nd AUTHENTICATE PLAIN AHUAdzQ=\r\n",
                    ),
                    B("a NO [AUTHENTICATIONFAILED] no\r\n"),
                    B("b NO [AUTHENTICATIONFAILED] no\r\n"),
                ],
                charged: 2,
                refused: 2,
                reached: &["w1", "w2"],
                never: &["w3", "AHUAdzQ="],
            },
            Case {
                name: "a refund frees the place for the next pipelined login",
                caps: CAPS,
                limit: 1,
                already: 0,
                steps: &[
                    C("a AUTHENTICATE PLAIN\r\n"),
                    B("+ \r\n"),
                    C("*\r\nb LOGIN u w2\r\n"),
                    B("a BAD Authentication aborted\r\n"),
                ],
                charged: 1,
                refused: 0,
                reached: &["w2"],
                never: &[],
            },
            Case {
                name: "a throttled login sends neither our ID nor the credentials",
                caps: "IMAP4rev1 ID SASL-IR AUTH=PLAIN",
                limit: 1,
                already: 1,
                steps: &[C("a LOGIN u w\r\nb AUTHENTICATE PLAIN\r\n")],
                charged: 1,
                refused: 2,
                reached: &[],
                never: &["ID", "LOGIN", "AUTHENTICATE"],
            },
            Case {
                name: "a login after our ID is charged before the ID goes",
                caps: "IMAP4rev1 ID SASL-IR AUTH=PLAIN",
                limit: 1,
                already: 0,
                steps: &[C("a LOGIN u w\r\n")],
                charged: 1,
                refused: 0,
                reached: &["ID ("],
                never: &["LOGIN"],
            },
            Case {
                name: "an initial response the backend cannot take is answered here, uncharged",
                caps: "IMAP4rev1 AUTH=PLAIN",
                limit: 1,
                already: 0,
                steps: &[C("a AUTHENTICATE PLAIN AHUAdw==\r\n")],
                charged: 0,
                refused: 0,
                reached: &[],
                never: &["AUTHENTICATE"],
            },
            Case {
                name: "other commands are never charged, even throttled",
                caps: CAPS,
                limit: 1,
                already: 1,
                steps: &[
                    C("a CAPABILITY\r\n"),
                    B("* CAPABILITY IMAP4rev1\r\na OK done\r\n"),
                    C("b NOOP\r\n"),
                ],
                charged: 1,
                refused: 0,
                reached: &["a CAPABILITY", "b NOOP"],
                never: &[],
            },
        ];
        for case in cases {
            let mut m = greeted(case.caps);
            out(&mut m);
            let mut throttle = Throttle::new(case.limit, case.already);
            let (_, backend) = play(&mut m, &mut throttle, case.steps);
            check_charges(
                case.name,
                &throttle,
                &backend,
                case.charged,
                case.refused,
                case.reached,
                case.never,
            );
        }
    }

    #[test]
    fn a_cleartext_login_is_never_charged() {
        let mut m = cleartext();
        let mut throttle = Throttle::new(1, 0);
        let (client, backend) = play(
            &mut m,
            &mut throttle,
            &[Step::Client("a LOGIN u p\r\nb AUTHENTICATE PLAIN\r\n")],
        );
        assert_eq!(backend, "");
        assert!(client.contains("a NO [PRIVACYREQUIRED]"), "{client}");
        assert_eq!((throttle.charged, throttle.refused), (0, 0));
    }

    #[test]
    fn login_goes_after_our_id_in_canonical_form() {
        let mut m = greeted("IMAP4rev1 ID SASL-IR LITERAL+ AUTH=PLAIN");
        let (client, _) = out(&mut m);
        assert!(client.starts_with("* OK [CAPABILITY IMAP4rev1 ID SASL-IR LITERAL+ AUTH=PLAIN]"));
        m.client_input(b"a1 login alice {6+}\r\nsecret\r\na2 SELECT INBOX\r\n");
        let (_, backend) = out(&mut m);
        let tag = own_tag(&backend);
        assert_eq!(
            backend,
            format!("{tag} ID (\"tls\" \"{CIPHER}\")\r\n"),
            "nothing but our ID before its completion"
        );
        assert!(m.waiting_for_backend());
        m.backend_input(format!("* ID NIL\r\n{tag} OK ID done\r\n").as_bytes());
        let (client, backend) = out(&mut m);
        assert_eq!(client, "", "our ID's answer is swallowed");
        assert_eq!(backend, "a1 LOGIN \"alice\" \"secret\"\r\n");
        m.backend_input(b"a1 OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n* 3 EXISTS\r\n");
        assert_eq!(m.next(), Next::Authenticated);
        let (client, _) = out(&mut m);
        assert_eq!(client, "a1 OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n");
        let (held_client, held_backend) = m.held();
        assert_eq!(held_client, b"a2 SELECT INBOX\r\n");
        assert_eq!(held_backend, b"* 3 EXISTS\r\n");
        assert_eq!(
            m.take_notices(),
            vec![
                Notice::User(b"alice".to_vec()),
                Notice::IdFieldAdded(IdSource::Proxy),
                Notice::Auth {
                    verdict: AuthVerdict::Success,
                    mechanism: "LOGIN".to_owned(),
                    charge: Charge::Refund,
                }
            ]
        );
    }

    #[test]
    fn a_literal_goes_to_a_backend_without_literal_plus_only_after_its_continuation() {
        let mut m = greeted("IMAP4rev1 AUTH=PLAIN");
        out(&mut m);
        m.client_input("a LOGIN alice {7}\r\n".as_bytes());
        let (client, backend) = out(&mut m);
        assert_eq!(client, "+ Ready for literal data\r\n");
        assert_eq!(backend, "");
        m.client_input("sécret\r\n".as_bytes());
        let (_, backend) = out(&mut m);
        assert_eq!(backend, "a LOGIN \"alice\" {7}\r\n");
        m.backend_input(b"+ OK\r\n");
        let (client, backend) = out(&mut m);
        assert_eq!(client, "", "our own continuation is not shown");
        assert_eq!(backend, "sécret\r\n");
        m.backend_input(b"a NO [AUTHENTICATIONFAILED] bad\r\n");
        let (client, _) = out(&mut m);
        assert_eq!(client, "a NO [AUTHENTICATIONFAILED] bad\r\n");
        assert_eq!(m.next(), Next::Run);
    }

    #[test]
    fn a_refusal_before_our_literal_continuation_drops_the_rest_of_the_command() {
        let mut m = greeted("IMAP4rev1 AUTH=PLAIN");
        out(&mut m);
        m.client_input("a LOGIN {5}\r\n".as_bytes());
        out(&mut m);
        m.client_input("alice {7}\r\n".as_bytes());
        out(&mut m);
        m.client_input("sécret\r\n".as_bytes());
        let (_, backend) = out(&mut m);
        assert_eq!(backend, "a LOGIN \"alice\" {7}\r\n");
        // The backend refuses before asking for the password's octets.
        m.backend_input(b"a NO refused\r\n");
        let (client, backend) = out(&mut m);
        assert_eq!(client, "a NO refused\r\n");
        assert_eq!(backend, "");
        // A late `+`, a tagged answer for another tag, and a `+` during the next command: none
        // releases the password or completes the command.
        m.client_input(b"b NOOP\r\n");
        let (_, backend) = out(&mut m);
        assert_eq!(backend, "b NOOP\r\n");
        m.backend_input(b"+ go\r\nx OK Logged in\r\n+ go\r\n");
        let (client, backend) = out(&mut m);
        assert_eq!(backend, "");
        assert_eq!(client, "x OK Logged in\r\n");
        assert_eq!(m.next(), Next::Run);
        assert!(m.waiting_for_backend(), "b is still in flight");
        m.backend_input(b"b OK done\r\n");
        assert!(!m.waiting_for_backend());
        assert_eq!(m.next(), Next::Run);
        assert!(m.take_notices().iter().all(|n| !matches!(
            n,
            Notice::Auth {
                verdict: AuthVerdict::Success,
                ..
            }
        )));
    }

    #[test]
    fn a_second_id_never_reaches_the_backend_whatever_it_hides() {
        let mut m = greeted("IMAP4rev1 ID LITERAL+");
        out(&mut m);
        m.client_input(
            b"a ID (\"name\" \"mutt\" \"tls\" \"forged\" \"x-originating-ip\" \"192.0.2.9\")\r\n",
        );
        let (_, backend) = out(&mut m);
        assert_eq!(
            backend,
            format!("a ID (\"name\" \"mutt\" \"tls\" \"{CIPHER}\")\r\n")
        );
        m.backend_input(b"* ID NIL\r\na OK ID completed\r\n");
        out(&mut m);
        m.client_input(b"b ID (\"x-originating-ip\" {9+}\r\n192.0.2.9 \"tls\" \"forged\")\r\n");
        let (client, backend) = out(&mut m);
        assert_eq!(backend, "");
        assert_eq!(client, "* ID NIL\r\nb OK ID completed\r\n");
    }

    #[test]
    fn authenticate_forwards_one_checked_line_per_continuation() {
        let mut m = greeted("IMAP4rev1 ID SASL-IR AUTH=PLAIN");
        out(&mut m);
        m.client_input(b"a ID NIL\r\n");
        let (_, backend) = out(&mut m);
        assert_eq!(backend, format!("a ID (\"tls\" \"{CIPHER}\")\r\n"));
        m.backend_input(b"* ID NIL\r\na OK done\r\n");
        out(&mut m);
        m.client_input(b"b AUTHENTICATE PLAIN\r\nAGFsaWNlAHNlY3JldA==\r\nc LOGIN x y\r\n");
        let (_, backend) = out(&mut m);
        assert_eq!(
            backend, "b AUTHENTICATE PLAIN\r\n",
            "no SASL line before a +"
        );
        m.backend_input(b"+ \r\n");
        let (client, backend) = out(&mut m);
        assert_eq!(client, "+ \r\n");
        assert_eq!(backend, "AGFsaWNlAHNlY3JldA==\r\n");
        // The pipelined LOGIN is a SASL line as far as the backend is concerned: not base64,
        // so it goes as a cancel if the backend asks for more.
        m.backend_input(b"+ \r\n");
        let (_, backend) = out(&mut m);
        assert_eq!(backend, "*\r\n");
        m.backend_input(b"b BAD cancelled\r\n");
        let (client, _) = out(&mut m);
        assert!(client.ends_with("b BAD cancelled\r\n"));
        assert_eq!(m.next(), Next::Run);
    }

    #[test]
    fn a_preauth_greeting_is_never_relayed() {
        let mut m = Prelogin::new(
            settings(TlsMode::Implicit),
            Some(crate::machine::testing::tls13()),
            1,
        );
        m.backend_connected();
        m.backend_input(b"* PREAUTH welcome\r\n");
        let (client, _) = out(&mut m);
        assert_eq!(client, "* BYE [UNAVAILABLE] Server misconfigured\r\n");
        assert!(matches!(m.next(), Next::End(End::BackendProtocol(_))));
    }

    #[test]
    fn a_greeting_without_capabilities_makes_us_ask_unseen() {
        let mut m = Prelogin::new(
            settings(TlsMode::Implicit),
            Some(crate::machine::testing::tls13()),
            1,
        );
        m.backend_connected();
        m.backend_input(b"* OK ready\r\n");
        let (client, backend) = out(&mut m);
        assert_eq!(client, "* OK ready\r\n");
        let tag = own_tag(&backend);
        m.client_input(b"a NOOP\r\n");
        assert_eq!(out(&mut m).1, "", "held until our CAPABILITY completes");
        m.backend_input(format!("* CAPABILITY IMAP4rev1 ID\r\n{tag} OK done\r\n").as_bytes());
        let (client, backend) = out(&mut m);
        assert_eq!(client, "");
        assert_eq!(backend, "a NOOP\r\n");
    }

    #[test]
    fn too_many_commands_end_the_session() {
        let mut m = Prelogin::new(
            Settings {
                max_commands: 2,
                client_info: Vec::new(),
                ..settings(TlsMode::Starttls)
            },
            None,
            1,
        );
        out(&mut m);
        m.client_input(b"a NOOP\r\nb NOOP\r\nc NOOP\r\n");
        let (client, _) = out(&mut m);
        assert!(client.ends_with("* BYE Too many commands before authentication\r\n"));
        assert!(matches!(m.next(), Next::End(End::ProtocolViolation(_))));
    }

    #[test]
    fn a_client_tag_shaped_like_ours_is_refused_and_never_forwarded() {
        let mut m = greeted("IMAP4rev1 ID SASL-IR LITERAL+ AUTH=PLAIN");
        out(&mut m);
        m.client_input(b"mf0000000000000007 LOGIN alice secret\r\nmfc NOOP\r\n");
        let (client, backend) = out(&mut m);
        assert_eq!(client, "mf0000000000000007 BAD Tag reserved\r\n");
        assert_eq!(backend, "mfc NOOP\r\n");
    }

    #[test]
    fn refused_lines_count_against_the_command_limit_before_and_after_tls() {
        // A client sending only lines the receiver refuses (bare LF, syntax errors) must not
        // hold the session open past `limits.preauth_commands`, as POP3 already counts them.
        let limited = |listener| Settings {
            max_commands: 3,
            client_info: Vec::new(),
            ..settings(listener)
        };
        let mut m = Prelogin::new(limited(TlsMode::Starttls), None, 1);
        out(&mut m);
        m.client_input(b"a NOOP\nb LOGIN\r\nc NOOP\nd NOOP\ne NOOP\n");
        let (client, backend) = out(&mut m);
        assert_eq!(backend, "");
        assert!(
            client.ends_with("* BYE Too many commands before authentication\r\n"),
            "{client}"
        );
        assert!(matches!(m.next(), Next::End(End::ProtocolViolation(_))));

        let mut m = Prelogin::new(
            limited(TlsMode::Implicit),
            Some(crate::machine::testing::tls13()),
            1,
        );
        m.backend_connected();
        m.backend_input(b"* OK [CAPABILITY IMAP4rev1 ID] ready\r\n");
        out(&mut m);
        m.client_input(b"a LOGIN x\r\nb LOGIN\r\nc ID (\r\nd NOOP\n");
        let (client, backend) = out(&mut m);
        assert_eq!(backend, "");
        assert!(
            client.ends_with("* BYE Too many commands before authentication\r\n"),
            "{client}"
        );
        assert!(matches!(m.next(), Next::End(End::ProtocolViolation(_))));
    }

    #[test]
    fn in_cleartext_only_a_whole_line_restarts_the_idle_timer() {
        let mut m = cleartext();
        out(&mut m);
        // An over-long line streamed without end: one refusal, then nothing restarts the timer.
        let long = vec![b'x'; 9000];
        assert!(
            Machine::client_input(&mut m, &long),
            "the refusal is an event"
        );
        assert!(!Machine::client_input(&mut m, &long));
        assert!(!Machine::client_input(&mut m, b"a NO"));
        assert!(Machine::client_input(&mut m, b"\r\na NOOP\r\n"));
        assert!(!Machine::client_input(&mut m, b"b NO"));
        assert!(Machine::client_input(&mut m, b"OP\r\n"));
        // Over TLS with the turn the client's, any bytes do.
        let mut m = greeted("IMAP4rev1 ID");
        out(&mut m);
        assert!(Machine::client_input(&mut m, b"a NO"));
    }

    #[test]
    fn only_an_ok_to_logout_ends_the_session_before_the_backend_closes() {
        let mut m = greeted("IMAP4rev1 ID");
        out(&mut m);
        m.client_input(b"a NOOP\r\n");
        out(&mut m);
        m.backend_input(b"a OK done\r\n");
        assert_eq!(m.next(), Next::Run, "other completions go on");
        m.client_input(b"b LOGOUT\r\n");
        out(&mut m);
        m.backend_input(b"b NO not now\r\n");
        assert_eq!(m.next(), Next::Run, "a refused LOGOUT goes on");
    }

    #[test]
    fn nothing_goes_to_a_backend_that_is_leaving() {
        // Found by the imap_prelogin fuzz target: a command pipelined after LOGOUT went out
        // after the backend's BYE.
        let mut m = greeted("IMAP4rev1 ID");
        out(&mut m);
        m.client_input(b"a LOGOUT\r\nb LOGOUT\r\nc NOOP\r\n");
        assert_eq!(out(&mut m).1, "a LOGOUT\r\n");
        m.backend_input(b"* BYE bye\r\na OK done\r\n");
        let (client, backend) = out(&mut m);
        assert_eq!(client, "* BYE bye\r\na OK done\r\n");
        assert_eq!(backend, "");
        // The tagged OK of LOGOUT is the last word: the session ends with it.
        assert_eq!(m.next(), Next::End(End::ClientClosed));
        m.backend_closed();
        assert_eq!(m.next(), Next::End(End::ClientClosed));
        // An unsolicited BYE stops forwarding too.
        let mut m = greeted("IMAP4rev1 ID");
        out(&mut m);
        m.backend_input(b"* BYE shutting down\r\n");
        m.client_input(b"a NOOP\r\n");
        assert_eq!(out(&mut m).1, "");
    }

    /// The close line's `user`: what LOGIN names, and what AUTHENTICATE's first response
    /// carries (with SASL-IR or on the first line), once the gate let the login through.
    #[test]
    fn authenticate_names_its_user_on_the_close_line_like_login() {
        use base64::Engine as _;
        let b64 = |raw: &[u8]| base64::engine::general_purpose::STANDARD.encode(raw);
        let user = |name: &str| Notice::User(name.as_bytes().to_vec());
        let failed = |m: &mut Prelogin, tag: &str| {
            m.backend_input(format!("{tag} NO [AUTHENTICATIONFAILED] failed\r\n").as_bytes());
            out(m);
            m.take_notices()
                .into_iter()
                .filter(|n| matches!(n, Notice::User(_)))
                .collect::<Vec<_>>()
        };
        let mut m = greeted("IMAP4rev1 SASL-IR AUTH=PLAIN");
        out(&mut m);

        // SASL-IR, PLAIN: the authentication identity, not the authorization identity.
        let ir = b64(b"admin\0alice\0secret");
        m.client_input(format!("a AUTHENTICATE PLAIN {ir}\r\n").as_bytes());
        out(&mut m);
        assert_eq!(m.take_notices(), [user("alice")]);
        assert_eq!(failed(&mut m, "a"), []);

        // No initial response: the first line after the backend's `+`, and only that one.
        m.client_input(b"b AUTHENTICATE SCRAM-SHA-256\r\n");
        out(&mut m);
        assert_eq!(m.take_notices(), []);
        m.backend_input(b"+ \r\n");
        m.client_input(format!("{}\r\n", b64(b"n,,n=bob,r=nonce")).as_bytes());
        out(&mut m);
        assert_eq!(m.take_notices(), [user("bob")]);
        m.backend_input(b"+ c2VydmVyLWZpcnN0\r\n");
        m.client_input(format!("{}\r\n", b64(b"c=biws,r=nonce,n=mallory")).as_bytes());
        out(&mut m);
        assert_eq!(failed(&mut m, "b"), []);

        // LOGIN: the name is the answer to `Username:`, never the one to `Password:`.
        m.client_input(b"c AUTHENTICATE LOGIN\r\n");
        out(&mut m);
        m.backend_input(b"+ VXNlcm5hbWU6\r\n");
        m.client_input(format!("{}\r\n", b64(b"carol")).as_bytes());
        out(&mut m);
        m.backend_input(b"+ UGFzc3dvcmQ6\r\n");
        m.client_input(format!("{}\r\n", b64(b"hunter2")).as_bytes());
        out(&mut m);
        assert_eq!(failed(&mut m, "c"), [user("carol")]);

        // A cancelled exchange, or a mechanism that carries no readable name: no user.
        m.client_input(b"d AUTHENTICATE PLAIN\r\n");
        out(&mut m);
        m.backend_input(b"+ \r\n");
        m.client_input(b"*\r\n");
        out(&mut m);
        assert_eq!(failed(&mut m, "d"), []);
        m.client_input(b"e AUTHENTICATE EXTERNAL =\r\n");
        out(&mut m);
        assert_eq!(failed(&mut m, "e"), []);
    }

    #[test]
    fn a_throttled_authenticate_names_no_user() {
        let mut m = greeted("IMAP4rev1 SASL-IR AUTH=PLAIN");
        out(&mut m);
        m.client_input(b"a AUTHENTICATE PLAIN AGFsaWNlAHNlY3JldA==\r\n");
        assert_eq!(m.next(), Next::ChargeLogin);
        m.login_charge(false);
        let (client, backend) = out(&mut m);
        assert!(client.starts_with("a NO [UNAVAILABLE]"), "{client}");
        assert_eq!(backend, "");
        assert_eq!(
            m.take_notices(),
            [Notice::AuthThrottled {
                mechanism: "AUTHENTICATE PLAIN".to_owned()
            }]
        );
    }

    #[test]
    fn the_logged_mechanism_never_carries_credentials() {
        assert_eq!(mechanism_label(b"login", None), "LOGIN");
        assert_eq!(
            mechanism_label(b"AUTHENTICATE", Some(b"scram-sha-256")),
            "AUTHENTICATE SCRAM-SHA-256"
        );
        assert_eq!(
            mechanism_label(b"AUTHENTICATE", Some(b"PL\"AIN")),
            "AUTHENTICATE invalid"
        );
        assert_eq!(
            mechanism_label(b"AUTHENTICATE", Some(b"AGFsaWNlAHNlY3JldA==")),
            "AUTHENTICATE invalid"
        );
        assert_eq!(mechanism_label(b"authenticate", None), "AUTHENTICATE");
    }

    // ---- Phase::Local: TLS up, no backend until a login ----------------------------------

    /// What an earlier session learned of the backend: Dovecot's pre-login list.
    const LEARNED: &str = "IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ STARTTLS AUTH=PLAIN AUTH=EXTERNAL";

    fn learned(listener: TlsMode, learned: &str) -> Prelogin {
        let mut settings = settings(listener);
        settings.learned_capability = Some(learned.as_bytes().to_vec());
        let tls = (listener == TlsMode::Implicit).then(crate::machine::testing::tls13);
        Prelogin::new(settings, tls, 7)
    }

    #[test]
    fn with_learned_capabilities_a_session_is_answered_without_a_backend() {
        let mut m = learned(TlsMode::Implicit, LEARNED);
        assert_eq!(m.next(), Next::Run, "no connection at TLS up");
        m.client_input(
            b"a CAPABILITY\r\nb NOOP\r\nc ID (\"name\" \"mutt\")\r\nd STARTTLS\r\ne SELECT INBOX\r\nf ID NIL\r\ng LOGOUT\r\n",
        );
        let (client, backend) = out(&mut m);
        assert_eq!(backend, "");
        assert_eq!(
            client,
            "* OK [CAPABILITY IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ AUTH=PLAIN] mx.example.test ready\r\n\
             * CAPABILITY IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ AUTH=PLAIN\r\na OK CAPABILITY completed\r\n\
             b OK NOOP completed\r\n\
             * ID NIL\r\nc OK ID completed\r\n\
             d BAD TLS is already active\r\n\
             e BAD Command not allowed before authentication\r\n\
             * ID NIL\r\nf OK ID completed\r\n\
             * BYE Logging out\r\ng OK LOGOUT completed\r\n"
        );
        assert_eq!(m.next(), Next::End(End::ClientClosed));
        assert_eq!(m.take_notices(), []);
    }

    /// The client's whole side of a lazy login, and the backend's once connected.
    const LAZY_CLIENT: &str =
        "a CAPABILITY\r\nb ID (\"name\" \"mutt\")\r\nc LOGIN alice {6}\r\nsecret\r\n";

    /// Plays [`LAZY_CLIENT`] in `chunks`, connects when asked, and answers as Dovecot does;
    /// returns what each side saw.
    fn lazy_login(chunks: &[&[u8]]) -> (String, String, Vec<Notice>) {
        let mut m = learned(TlsMode::Implicit, LEARNED);
        let (mut client, mut backend) = out(&mut m);
        for chunk in chunks {
            m.client_input(chunk);
            let (c, b) = out(&mut m);
            client.push_str(&c);
            backend.push_str(&b);
        }
        assert_eq!(backend, "", "nothing before the login is complete");
        assert_eq!(m.next(), Next::Connect);
        m.backend_connected();
        m.backend_input(format!("* OK [CAPABILITY {LEARNED}] Dovecot ready.\r\n").as_bytes());
        let (c, b) = out(&mut m);
        client.push_str(&c);
        backend.push_str(&b);
        let tag = own_tag(&b);
        m.backend_input(format!("* ID NIL\r\n{tag} OK ID completed.\r\n").as_bytes());
        let (c, b) = out(&mut m);
        client.push_str(&c);
        backend.push_str(&b);
        m.backend_input(b"c OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n");
        let (c, b) = out(&mut m);
        client.push_str(&c);
        backend.push_str(&b);
        assert_eq!(m.next(), Next::Authenticated);
        (client, backend.replace(&tag, "TAG"), m.take_notices())
    }

    #[test]
    fn a_login_connects_and_goes_after_our_id_carrying_the_clients_fields() {
        let (client, backend, notices) = lazy_login(&[LAZY_CLIENT.as_bytes()]);
        assert_eq!(
            client,
            "* OK [CAPABILITY IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ AUTH=PLAIN] mx.example.test ready\r\n\
             * CAPABILITY IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ AUTH=PLAIN\r\na OK CAPABILITY completed\r\n\
             * ID NIL\r\nb OK ID completed\r\n\
             + Ready for literal data\r\n\
             c OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n",
            "the backend's greeting is swallowed"
        );
        assert_eq!(
            backend,
            format!(
                "TAG ID (\"name\" \"mutt\" \"tls\" \"{CIPHER}\")\r\nc LOGIN \"alice\" \"secret\"\r\n"
            )
        );
        assert_eq!(
            notices,
            [
                Notice::User(b"alice".to_vec()),
                Notice::IdFieldAdded(IdSource::Client),
                Notice::Auth {
                    verdict: AuthVerdict::Success,
                    mechanism: "LOGIN".to_owned(),
                    charge: Charge::Refund,
                },
            ],
            "the learned list is unchanged: no new notice"
        );
    }

    #[test]
    fn a_lazy_login_is_split_invariant() {
        let whole = lazy_login(&[LAZY_CLIENT.as_bytes()]);
        let bytes = LAZY_CLIENT.as_bytes();
        for at in 0..=bytes.len() {
            let (a, b) = bytes.split_at(at);
            assert_eq!(lazy_login(&[a, b]), whole, "split at {at}");
        }
        let single: Vec<&[u8]> = bytes.chunks(1).collect();
        assert_eq!(lazy_login(&single), whole, "one octet at a time");
    }

    #[test]
    fn authenticate_continuations_work_after_a_lazy_connect() {
        let mut m = learned(TlsMode::Implicit, "IMAP4rev1 AUTH=PLAIN");
        out(&mut m);
        m.client_input(b"a AUTHENTICATE PLAIN\r\n");
        assert_eq!(m.next(), Next::Connect);
        m.backend_connected();
        m.backend_input(b"* OK ready\r\n");
        let (client, backend) = out(&mut m);
        assert_eq!(client, "");
        let tag = own_tag(&backend);
        assert_eq!(
            backend,
            format!("{tag} CAPABILITY\r\n"),
            "asked unseen first"
        );
        m.backend_input(
            format!("* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\n{tag} OK done\r\n").as_bytes(),
        );
        let (client, backend) = out(&mut m);
        assert_eq!(
            (client.as_str(), backend.as_str()),
            ("", "a AUTHENTICATE PLAIN\r\n")
        );
        m.backend_input(b"+ \r\n");
        assert_eq!(out(&mut m).0, "+ \r\n");
        m.client_input(b"AGFsaWNlAHNlY3JldA==\r\n");
        assert_eq!(out(&mut m).1, "AGFsaWNlAHNlY3JldA==\r\n");
        m.backend_input(b"a OK Logged in\r\n");
        assert_eq!(out(&mut m).0, "a OK Logged in\r\n");
        assert_eq!(m.next(), Next::Authenticated);
    }

    /// The gate judges the held login again on what the backend says now: a backend that lost
    /// SASL-IR since it was learned gets no initial response, and the next sessions learn it.
    #[test]
    fn a_held_login_is_judged_again_on_the_connected_backends_capabilities() {
        let mut m = learned(TlsMode::Implicit, "IMAP4rev1 SASL-IR AUTH=PLAIN");
        out(&mut m);
        m.client_input(b"a AUTHENTICATE PLAIN AGFsaWNlAHNlY3JldA==\r\n");
        assert_eq!(m.next(), Next::Connect);
        m.backend_connected();
        m.backend_input(b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] ready\r\n");
        let (client, backend) = out(&mut m);
        assert_eq!(backend, "");
        assert_eq!(
            client,
            String::from_utf8_lossy(&reply::sasl_ir_unsupported(b"a"))
        );
        assert_eq!(
            m.take_notices(),
            [Notice::BackendImapCapability(
                b"IMAP4rev1 AUTH=PLAIN".to_vec()
            )]
        );
        assert_eq!(m.next(), Next::Run);
    }

    #[test]
    fn a_backend_down_or_saying_bye_fails_the_held_login_as_unavailable() {
        let mut m = learned(TlsMode::Implicit, LEARNED);
        out(&mut m);
        m.client_input(b"a LOGIN alice secret\r\n");
        assert_eq!(m.next(), Next::Connect);
        m.backend_failed();
        let (client, backend) = out(&mut m);
        assert_eq!(backend, "");
        assert_eq!(
            client,
            "* BYE [UNAVAILABLE] Server temporarily unavailable\r\n"
        );
        assert_eq!(m.next(), Next::End(End::BackendClosed));

        let mut m = learned(TlsMode::Implicit, LEARNED);
        out(&mut m);
        m.client_input(b"a LOGIN alice secret\r\n");
        m.backend_connected();
        m.backend_input(b"* BYE [UNAVAILABLE] Too many connections\r\n");
        let (client, backend) = out(&mut m);
        assert_eq!(backend, "", "the credential never leaves");
        assert_eq!(client, "* BYE [UNAVAILABLE] Too many connections\r\n");
        assert_eq!(m.next(), Next::End(End::BackendClosed));
    }

    #[test]
    fn after_starttls_a_learned_listener_stays_local_and_an_unknown_one_connects() {
        let mut m = learned(TlsMode::Starttls, LEARNED);
        out(&mut m);
        m.client_input(b"s STARTTLS\r\n");
        out(&mut m);
        m.tls_started(crate::machine::testing::tls13());
        assert_eq!(m.next(), Next::Run);
        m.client_input(b"a CAPABILITY\r\n");
        let (client, backend) = out(&mut m);
        assert_eq!(backend, "");
        assert_eq!(
            client,
            "* CAPABILITY IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ AUTH=PLAIN\r\na OK CAPABILITY completed\r\n",
            "no second greeting (RFC 9051 §6.2.1)"
        );

        let mut m = cleartext();
        out(&mut m);
        m.client_input(b"s STARTTLS\r\n");
        out(&mut m);
        m.tls_started(crate::machine::testing::tls13());
        assert_eq!(m.next(), Next::Connect, "unknown: connect at once to learn");
    }

    #[test]
    fn unknown_capabilities_connect_at_once_and_are_learned_from_an_own_capability() {
        let mut m = Prelogin::new(
            settings(TlsMode::Implicit),
            Some(crate::machine::testing::tls13()),
            1,
        );
        assert_eq!(m.next(), Next::Connect);
        assert_eq!(
            out(&mut m),
            (String::new(), String::new()),
            "no greeting of ours"
        );
        m.backend_connected();
        m.backend_input(b"* OK ready\r\n");
        let (_, backend) = out(&mut m);
        let tag = own_tag(&backend);
        m.backend_input(format!("* CAPABILITY IMAP4rev1 ID\r\n{tag} OK done\r\n").as_bytes());
        assert_eq!(
            m.take_notices(),
            [Notice::BackendImapCapability(b"IMAP4rev1 ID".to_vec())]
        );
    }
}

/// A listener that routes by user ([`Settings::routed`]): no backend before a complete login,
/// each login form held whole and replayed, and a failed login leaving no backend behind.
#[cfg(test)]
mod routed_tests {
    use super::*;
    use crate::machine::testing::{Throttle, check_charges, tls13};
    use base64::Engine as _;

    const CIPHER: &str = "TLS_AES_128_GCM_SHA256";
    /// A backend's list, as the driver's probe learned it.
    const CAPS: &str = "IMAP4rev1 SASL-IR LITERAL+ AUTH=PLAIN AUTH=LOGIN AUTH=SCRAM-SHA-256";

    fn b64(raw: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(raw)
    }

    fn routed(listener: TlsMode, learned: Option<&str>) -> Prelogin {
        let settings = Settings {
            listener,
            hostname: "mx.example.test".to_owned(),
            limits: command::Limits::default(),
            max_commands: 50,
            client_info: Vec::new(),
            learned_capability: learned.map(|l| l.as_bytes().to_vec()),
            routed: true,
        };
        let tls = (listener == TlsMode::Implicit).then(tls13);
        Prelogin::new(settings, tls, 7)
    }

    /// One step of the driver's side.
    #[derive(Debug, Clone)]
    enum R {
        /// Client bytes.
        C(String),
        /// Backend bytes; `TAG` stands for mailfront's last own tag.
        B(String),
        /// The machine must say [`Next::Connect`]: the driver notes the facts and connects.
        Connect,
        /// The machine must say [`Next::Connect`]: the router gives the login no backend.
        Fail(RouteFailure),
        /// The backend closes.
        Closed,
    }

    fn c(s: &str) -> R {
        R::C(s.to_owned())
    }

    fn b(s: &str) -> R {
        R::B(s.to_owned())
    }

    /// What the driver saw: bytes each way (own tags as `TAG`, each backend close the machine
    /// asked for as `<close>`), the facts of every connection, and the notices.
    #[derive(Debug, Default)]
    struct Seen {
        client: String,
        backend: String,
        facts: Vec<LoginFacts>,
    }

    fn drain(m: &mut Prelogin, throttle: &mut Throttle, seen: &mut Seen, last_tag: &mut String) {
        throttle.run(m);
        seen.client
            .push_str(&String::from_utf8_lossy(&m.take_to_client()));
        let backend = String::from_utf8_lossy(&m.take_to_backend()).into_owned();
        for line in backend.split("\r\n") {
            if let Some(tag) = line.split(' ').next().filter(|t| t.starts_with("mf")) {
                *last_tag = tag.to_owned();
            }
        }
        if last_tag.is_empty() {
            seen.backend.push_str(&backend);
        } else {
            seen.backend
                .push_str(&backend.replace(last_tag.as_str(), "TAG"));
        }
        if m.take_backend_close() {
            seen.backend.push_str("<close>");
        }
    }

    /// Plays `steps` as the driver would, with `throttle` answering the charges.
    fn drive(m: &mut Prelogin, throttle: &mut Throttle, steps: &[R]) -> Seen {
        let mut seen = Seen::default();
        let mut last_tag = String::new();
        drain(m, throttle, &mut seen, &mut last_tag);
        for step in steps {
            match step {
                R::C(bytes) => {
                    assert_ne!(m.next(), Next::Connect, "client bytes while connecting");
                    m.client_input(bytes.as_bytes());
                }
                R::B(bytes) => {
                    m.backend_input(bytes.replace("TAG", &last_tag).as_bytes());
                }
                R::Connect | R::Fail(_) => {
                    assert_eq!(m.next(), Next::Connect, "{step:?}; {seen:?}");
                    let facts = m.login_facts().expect("a connection with no login facts");
                    seen.facts.push(facts);
                    match step {
                        R::Fail(failure) => m.route_failed(failure.clone()),
                        _ => m.backend_connected(),
                    }
                }
                R::Closed => m.backend_closed(),
            }
            drain(m, throttle, &mut seen, &mut last_tag);
        }
        seen
    }

    fn facts(user: &str, password: Option<&str>, mechanism: &str) -> LoginFacts {
        LoginFacts {
            user: user.as_bytes().to_vec(),
            password: password.map(|p| zeroize::Zeroizing::new(p.as_bytes().to_vec())),
            mechanism: mechanism.to_owned(),
            helo: None,
        }
    }

    fn greeting(caps: &str) -> R {
        b(&format!("* OK [CAPABILITY {caps}] backend ready\r\n"))
    }

    /// Our greeting with the learned list, as a routed implicit-TLS client sees it.
    fn our_greeting(caps: &str) -> String {
        format!("* OK [CAPABILITY {caps}] mx.example.test ready\r\n")
    }

    #[test]
    fn no_local_command_connects_before_a_complete_login() {
        let locals = [
            "a CAPABILITY\r\n",
            "a NOOP\r\n",
            "a ID (\"name\" \"mutt\")\r\n",
            "a ID NIL\r\n",
            "a STARTTLS\r\n",
            "a SELECT INBOX\r\n",
            "a ENABLE UTF8=ACCEPT\r\n",
            "a XCLIENT ADDR=192.0.2.1\r\n",
            "a COMPRESS DEFLATE\r\n",
            "mf0123456789abcdef LOGIN alice secret\r\n",
            "bare lf\n",
            "a LOGIN alice\r\n",
            "a LOGIN {5}\r\nali",
            "a AUTHENTICATE PLAIN\r\n",
            "a AUTHENTICATE PLAIN\r\n*\r\n",
            "a AUTHENTICATE PLAIN\r\nnot base64!\r\n",
            "a AUTHENTICATE LOGIN\r\n",
            "a AUTHENTICATE LOGIN\r\nYWxpY2U=\r\n",
            "a AUTHENTICATE LOGIN YWxpY2U=\r\n",
            "a AUTHENTICATE LOGIN YWxpY2U=\r\n*\r\n",
            "a AUTHENTICATE SCRAM-SHA-256\r\n",
            "a AUTHENTICATE CRAM-MD5\r\n",
            "a AUTHENTICATE DIGEST-MD5\r\n",
            "a AUTHENTICATE EXTERNAL =\r\n",
            "a AUTHENTICATE GSSAPI\r\n",
            "a AUTHENTICATE SCRAM-SHA-256-AND-MORE-THAN-20 biwsbj1hbGljZSxyPWFiYw==\r\n",
            "a AUTHENTICATE PLAIN {5}\r\n",
            "a AUTHENTICATE\r\n",
            "a LOGOUT\r\n",
        ];
        for learned in [None, Some(CAPS)] {
            for listener in [TlsMode::Implicit, TlsMode::Starttls] {
                for local in locals {
                    let mut m = routed(listener, learned);
                    assert_ne!(m.next(), Next::Connect, "{local:?}: at TLS up");
                    if listener == TlsMode::Starttls {
                        m.client_input(b"s STARTTLS\r\n");
                        assert_eq!(m.next(), Next::StartTls);
                        m.tls_started(tls13());
                        assert_ne!(m.next(), Next::Connect, "after the handshake");
                    }
                    let mut throttle = Throttle::new(5, 0);
                    let seen = drive(&mut m, &mut throttle, &[c(local)]);
                    assert_ne!(m.next(), Next::Connect, "{local:?} ({learned:?})");
                    assert_eq!(m.login_facts(), None, "{local:?}");
                    assert_eq!(seen.backend, "", "{local:?}");
                    assert_eq!(throttle.charged, 0, "{local:?}: charged");
                }
            }
        }
    }

    #[test]
    fn nothing_learned_answers_from_the_built_in_list_and_never_connects_to_learn() {
        let mut m = routed(TlsMode::Implicit, None);
        let mut throttle = Throttle::new(5, 0);
        let seen = drive(
            &mut m,
            &mut throttle,
            &[c("a CAPABILITY\r\nb ID NIL\r\nc NOOP\r\n")],
        );
        assert_eq!(
            seen.client,
            "* OK [CAPABILITY IMAP4rev1 ID] mx.example.test ready\r\n\
             * CAPABILITY IMAP4rev1 ID\r\na OK CAPABILITY completed\r\n\
             * ID NIL\r\nb OK ID completed\r\n\
             c OK NOOP completed\r\n"
        );
        assert_eq!(m.next(), Next::Run);
        // A login connects, and the first backend's pre-login list is handed on once, since
        // the listener has none; what this session shows stays the built-in list.
        let seen = drive(
            &mut m,
            &mut throttle,
            &[
                c("d LOGIN alice wrong\r\n"),
                R::Connect,
                b("* OK ready\r\n"),
                b("* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\nTAG OK done\r\n"),
                b("d NO [AUTHENTICATIONFAILED] no\r\n"),
                c("e CAPABILITY\r\nf LOGIN alice secret\r\n"),
                R::Connect,
                greeting("IMAP4rev1 AUTH=PLAIN"),
            ],
        );
        assert_eq!(
            seen.backend,
            "TAG CAPABILITY\r\nd LOGIN \"alice\" \"wrong\"\r\nTAG LOGOUT\r\n<close>\
             f LOGIN \"alice\" \"secret\"\r\n"
        );
        assert_eq!(
            seen.client,
            "d NO [AUTHENTICATIONFAILED] no\r\n\
             * CAPABILITY IMAP4rev1 ID\r\ne OK CAPABILITY completed\r\n"
        );
        let handed: Vec<_> = throttle
            .notices
            .iter()
            .filter(|n| matches!(n, Notice::BackendImapCapability(_)))
            .collect();
        assert_eq!(
            handed,
            [&Notice::BackendImapCapability(
                b"IMAP4rev1 AUTH=PLAIN".to_vec()
            )]
        );

        // A listener that learned its list keeps it: a routed session never hands on a user's
        // backend's list.
        let mut m = routed(TlsMode::Implicit, Some(CAPS));
        let mut throttle = Throttle::new(5, 0);
        drive(
            &mut m,
            &mut throttle,
            &[
                c("a LOGIN alice secret\r\n"),
                R::Connect,
                greeting("IMAP4rev1 AUTH=PLAIN"),
            ],
        );
        assert!(
            !throttle
                .notices
                .iter()
                .any(|n| matches!(n, Notice::BackendImapCapability(_)))
        );
    }

    /// One way to log in: the client's steps up to a complete login, what mailfront writes to
    /// the client meanwhile, the backend's side once connected, and the facts routed.
    struct Form {
        name: &'static str,
        client: Vec<R>,
        to_client: String,
        backend: Vec<R>,
        to_backend: String,
        /// The client after the connection (the backend's challenges it sees, its `OK`).
        to_client_after: String,
        facts: LoginFacts,
    }

    #[allow(clippy::too_many_lines, reason = "one table of every login form")]
    fn imap_forms() -> Vec<Form> {
        let plain = b64(b"\0alice\0secret");
        let plain_authz = b64(b"admin\0alice\0secret");
        let user = b64(b"alice");
        let pass = b64(b"secret");
        let scram_first = b64(b"n,,n=al=2Cice,r=rOprNGfwEbeRWgbNEkqO");
        let scram_server = b64(
            b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
        );
        let scram_final = b64(b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=");
        let oauth = b64(b"n,a=alice@example.org,\x01auth=Bearer tok\x01\x01");
        let xoauth = b64(b"user=alice@example.org\x01auth=Bearer tok\x01\x01");
        let ok = "a OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n";
        vec![
            Form {
                name: "LOGIN",
                client: vec![c("a LOGIN alice secret\r\n")],
                to_client: String::new(),
                backend: vec![greeting(CAPS), b(ok)],
                to_backend: "a LOGIN \"alice\" \"secret\"\r\n".to_owned(),
                to_client_after: ok.to_owned(),
                facts: facts("alice", Some("secret"), "LOGIN"),
            },
            Form {
                name: "LOGIN with literals, to a backend without LITERAL+",
                client: vec![
                    c("a LOGIN {5}\r\n"),
                    c("alice {7}\r\n"),
                    c("s\u{e9}cret\r\n"),
                ],
                to_client: "+ Ready for literal data\r\n+ Ready for literal data\r\n".to_owned(),
                backend: vec![greeting("IMAP4rev1"), b("+ go\r\n"), b(ok)],
                to_backend: "a LOGIN \"alice\" {7}\r\ns\u{e9}cret\r\n".to_owned(),
                to_client_after: ok.to_owned(),
                facts: facts("alice", Some("s\u{e9}cret"), "LOGIN"),
            },
            Form {
                name: "AUTHENTICATE PLAIN with an initial response",
                client: vec![c(&format!("a AUTHENTICATE PLAIN {plain}\r\n"))],
                to_client: String::new(),
                backend: vec![greeting(CAPS), b("+ \r\n"), b(ok)],
                to_backend: format!("a AUTHENTICATE PLAIN\r\n{plain}\r\n"),
                to_client_after: ok.to_owned(),
                facts: facts("alice", Some("secret"), "PLAIN"),
            },
            Form {
                name: "AUTHENTICATE PLAIN in steps, with an authorization identity",
                client: vec![
                    c("a AUTHENTICATE plain\r\n"),
                    c(&format!("{plain_authz}\r\n")),
                ],
                to_client: "+ \r\n".to_owned(),
                backend: vec![greeting(CAPS), b("+ \r\n"), b(ok)],
                to_backend: format!("a AUTHENTICATE PLAIN\r\n{plain_authz}\r\n"),
                to_client_after: ok.to_owned(),
                facts: facts("alice", Some("secret"), "PLAIN"),
            },
            Form {
                name: "AUTHENTICATE LOGIN, both challenges ours",
                client: vec![
                    c("a AUTHENTICATE LOGIN\r\n"),
                    c(&format!("{user}\r\n")),
                    c(&format!("{pass}\r\n")),
                ],
                to_client: "+ VXNlcm5hbWU6\r\n+ UGFzc3dvcmQ6\r\n".to_owned(),
                backend: vec![
                    greeting(CAPS),
                    b("+ VXNlcm5hbWU6\r\n"),
                    b("+ UGFzc3dvcmQ6\r\n"),
                    b(ok),
                ],
                to_backend: format!("a AUTHENTICATE LOGIN\r\n{user}\r\n{pass}\r\n"),
                to_client_after: ok.to_owned(),
                facts: facts("alice", Some("secret"), "LOGIN"),
            },
            Form {
                name: "AUTHENTICATE LOGIN with the user name as initial response",
                client: vec![
                    c(&format!("a AUTHENTICATE LOGIN {user}\r\n")),
                    c(&format!("{pass}\r\n")),
                ],
                to_client: "+ UGFzc3dvcmQ6\r\n".to_owned(),
                backend: vec![
                    greeting(CAPS),
                    b("+ VXNlcm5hbWU6\r\n"),
                    b("+ UGFzc3dvcmQ6\r\n"),
                    b(ok),
                ],
                to_backend: format!("a AUTHENTICATE LOGIN\r\n{user}\r\n{pass}\r\n"),
                to_client_after: ok.to_owned(),
                facts: facts("alice", Some("secret"), "LOGIN"),
            },
            Form {
                name: "AUTHENTICATE SCRAM-SHA-256: the exchange relays once the first response is used",
                client: vec![
                    c("a AUTHENTICATE SCRAM-SHA-256\r\n"),
                    c(&format!("{scram_first}\r\n")),
                ],
                to_client: "+ \r\n".to_owned(),
                backend: vec![
                    greeting(CAPS),
                    b("+ \r\n"),
                    b(&format!("+ {scram_server}\r\n")),
                    c(&format!("{scram_final}\r\n")),
                    b("+ dj1ybUY5cHFWOFM3c3VBb1pXamE0ZEpSa0ZzS1E9\r\n"),
                    c("\r\n"),
                    b(ok),
                ],
                to_backend: format!(
                    "a AUTHENTICATE SCRAM-SHA-256\r\n{scram_first}\r\n{scram_final}\r\n\r\n"
                ),
                to_client_after: format!(
                    "+ {scram_server}\r\n+ dj1ybUY5cHFWOFM3c3VBb1pXamE0ZEpSa0ZzS1E9\r\n{ok}"
                ),
                facts: facts("al,ice", None, "SCRAM-SHA-256"),
            },
            Form {
                name: "AUTHENTICATE OAUTHBEARER with an initial response",
                client: vec![c(&format!("a AUTHENTICATE OAUTHBEARER {oauth}\r\n"))],
                to_client: String::new(),
                backend: vec![greeting(CAPS), b("+ \r\n"), b(ok)],
                to_backend: format!("a AUTHENTICATE OAUTHBEARER\r\n{oauth}\r\n"),
                to_client_after: ok.to_owned(),
                facts: facts("alice@example.org", None, "OAUTHBEARER"),
            },
            Form {
                name: "AUTHENTICATE XOAUTH2 in steps",
                client: vec![c("a AUTHENTICATE XOAUTH2\r\n"), c(&format!("{xoauth}\r\n"))],
                to_client: "+ \r\n".to_owned(),
                backend: vec![greeting(CAPS), b("+ \r\n"), b(ok)],
                to_backend: format!("a AUTHENTICATE XOAUTH2\r\n{xoauth}\r\n"),
                to_client_after: ok.to_owned(),
                facts: facts("alice@example.org", None, "XOAUTH2"),
            },
        ]
    }

    #[test]
    fn every_login_form_is_held_whole_routed_and_replayed() {
        for form in imap_forms() {
            let name = form.name;
            let mut m = routed(TlsMode::Implicit, Some(CAPS));
            let mut throttle = Throttle::new(5, 0);
            let greeted = drive(&mut m, &mut throttle, &[]);
            assert_eq!(greeted.client, our_greeting(CAPS), "{name}");
            let last = form.client.len() - 1;
            for (i, step) in form.client.iter().enumerate() {
                let seen = drive(&mut m, &mut throttle, std::slice::from_ref(step));
                assert_eq!(seen.backend, "", "{name}: step {i}");
                if i < last {
                    assert_eq!(m.next(), Next::Run, "{name}: connects at step {i}");
                    assert_eq!(m.login_facts(), None, "{name}");
                }
            }
            assert_eq!(m.next(), Next::Connect, "{name}: complete");
            assert_eq!(m.login_facts(), Some(form.facts.clone()), "{name}");
            let mut steps = vec![R::Connect];
            steps.extend(form.backend.iter().cloned());
            let seen = drive(&mut m, &mut throttle, &steps);
            assert_eq!(seen.backend, form.to_backend, "{name}: to the backend");
            assert_eq!(seen.facts, std::slice::from_ref(&form.facts), "{name}");
            assert_eq!(m.next(), Next::Authenticated, "{name}");
            let mut whole = drive(
                &mut routed(TlsMode::Implicit, Some(CAPS)),
                &mut Throttle::new(5, 0),
                &form.client,
            )
            .client;
            whole.replace_range(..our_greeting(CAPS).len(), "");
            assert_eq!(
                whole, form.to_client,
                "{name}: to the client before connecting"
            );
            assert_eq!(
                seen.client, form.to_client_after,
                "{name}: to the client after"
            );
            assert_eq!(throttle.charged, 0, "{name}: refunded");
            let users: Vec<_> = throttle
                .notices
                .iter()
                .filter(|n| matches!(n, Notice::User(_)))
                .collect();
            assert_eq!(users, [&Notice::User(form.facts.user.clone())], "{name}");
        }
    }

    #[test]
    fn a_routed_authenticate_login_is_split_invariant() {
        let user = b64(b"alice");
        let pass = b64(b"secret");
        let input = format!("x NOOP\r\na AUTHENTICATE LOGIN\r\n{user}\r\n{pass}\r\n");
        let play = |chunks: &[&[u8]]| {
            let mut m = routed(TlsMode::Implicit, Some(CAPS));
            let mut out = Vec::new();
            for chunk in chunks {
                m.client_input(chunk);
                out.extend_from_slice(&m.take_to_client());
            }
            while m.next() == Next::ChargeLogin {
                m.login_charge(true);
            }
            (
                String::from_utf8_lossy(&out).into_owned(),
                m.next(),
                m.login_facts(),
            )
        };
        let whole = play(&[input.as_bytes()]);
        assert_eq!(whole.1, Next::Connect);
        assert_eq!(whole.2, Some(facts("alice", Some("secret"), "LOGIN")));
        let bytes = input.as_bytes();
        for at in 0..=bytes.len() {
            let (a, b) = bytes.split_at(at);
            assert_eq!(play(&[a, b]), whole, "split at {at}");
        }
        let single: Vec<&[u8]> = bytes.chunks(1).collect();
        assert_eq!(play(&single), whole, "one octet at a time");
    }

    #[test]
    fn a_cancel_or_a_line_that_is_not_base64_ends_the_exchange_here() {
        for (second, reply) in [
            ("*\r\n", "a BAD Authentication cancelled\r\n"),
            ("not base64!\r\n", "a BAD Invalid base64 response\r\n"),
        ] {
            for first in [
                "a AUTHENTICATE PLAIN\r\n",
                "a AUTHENTICATE LOGIN\r\nYWxpY2U=\r\n",
            ] {
                let mut m = routed(TlsMode::Implicit, Some(CAPS));
                let mut throttle = Throttle::new(5, 0);
                let seen = drive(
                    &mut m,
                    &mut throttle,
                    &[c(first), c(second), c("b NOOP\r\n")],
                );
                assert!(
                    seen.client
                        .ends_with(&format!("{reply}b OK NOOP completed\r\n")),
                    "{seen:?}"
                );
                assert_eq!(seen.backend, "");
                assert_eq!(m.next(), Next::Run);
                assert_eq!(
                    (throttle.charged, throttle.refused),
                    (0, 0),
                    "never charged"
                );
                assert!(throttle.notices.is_empty(), "{:?}", throttle.notices);
            }
        }
    }

    #[test]
    fn a_login_whose_user_cannot_be_read_fails_here_charged() {
        let cases = [
            "a AUTHENTICATE PLAIN =\r\n".to_owned(),
            format!("a AUTHENTICATE PLAIN {}\r\n", b64(b"alice\0secret")),
            format!("a AUTHENTICATE PLAIN\r\n{}\r\n", b64(b"\0\0secret")),
            format!(
                "a AUTHENTICATE OAUTHBEARER {}\r\n",
                b64(b"n,,\x01auth=Bearer tok\x01\x01")
            ),
            format!("a AUTHENTICATE SCRAM-SHA-1 {}\r\n", b64(b"n,,r=abc")),
            "a AUTHENTICATE LOGIN\r\n\r\n".to_owned(),
            format!("a AUTHENTICATE LOGIN {}\r\n", b64(b"al\nice")),
            "a LOGIN \"\" secret\r\n".to_owned(),
            "a LOGIN {7}\r\nal\r\nice secret\r\n".to_owned(),
        ];
        for case in cases {
            let mut m = routed(TlsMode::Implicit, Some(CAPS));
            let mut throttle = Throttle::new(5, 0);
            let seen = drive(
                &mut m,
                &mut throttle,
                &[R::C(case.clone()), c("b NOOP\r\n")],
            );
            assert!(
                seen.client.ends_with(
                    "a NO [AUTHENTICATIONFAILED] Authentication failed\r\nb OK NOOP completed\r\n"
                ),
                "{case:?}: {seen:?}"
            );
            assert!(
                !seen.client.contains("UGFzc3dvcmQ6"),
                "{case:?}: no password asked"
            );
            assert_eq!(seen.backend, "", "{case:?}");
            assert_eq!(m.next(), Next::Run, "{case:?}");
            assert_eq!(throttle.charged, 1, "{case:?}: a guess like any other");
        }
    }

    #[test]
    fn mechanisms_that_cannot_be_routed_are_hidden_and_refused_here() {
        let learned = "IMAP4rev1 SASL-IR AUTH=PLAIN AUTH=CRAM-MD5 AUTH=DIGEST-MD5 AUTH=GSSAPI AUTH=EXTERNAL AUTH=SCRAM-SHA-1";
        let shown = "IMAP4rev1 SASL-IR AUTH=PLAIN AUTH=SCRAM-SHA-1";
        let mut m = routed(TlsMode::Implicit, Some(learned));
        let mut throttle = Throttle::new(5, 0);
        let seen = drive(
            &mut m,
            &mut throttle,
            &[c(
                "a CAPABILITY\r\nb AUTHENTICATE CRAM-MD5\r\nc AUTHENTICATE GSSAPI =\r\nd AUTHENTICATE digest-md5\r\n",
            )],
        );
        assert_eq!(
            seen.client,
            format!(
                "{}* CAPABILITY {shown}\r\na OK CAPABILITY completed\r\n\
                 b NO Unsupported authentication mechanism\r\n\
                 c NO Unsupported authentication mechanism\r\n\
                 d NO Unsupported authentication mechanism\r\n",
                our_greeting(shown)
            )
        );
        assert_eq!(seen.backend, "");
        assert_eq!(m.next(), Next::Run);
        assert_eq!(throttle.charged, 0);
        // A list the backend shows live, during a login, is rewritten the same way.
        let seen = drive(
            &mut m,
            &mut throttle,
            &[
                c("e LOGIN alice wrong\r\n"),
                R::Connect,
                greeting(learned),
                b("e NO [CAPABILITY IMAP4rev1 AUTH=CRAM-MD5 AUTH=PLAIN] no\r\n"),
            ],
        );
        assert_eq!(seen.client, "e NO [CAPABILITY IMAP4rev1 AUTH=PLAIN] no\r\n");
        // After STARTTLS too.
        let mut m = routed(TlsMode::Starttls, Some(learned));
        m.client_input(b"s STARTTLS\r\n");
        m.take_to_client();
        m.tls_started(tls13());
        m.client_input(b"a CAPABILITY\r\n");
        assert_eq!(
            String::from_utf8_lossy(&m.take_to_client()),
            format!("* CAPABILITY {shown}\r\na OK CAPABILITY completed\r\n")
        );
    }

    #[test]
    fn a_refused_route_answers_the_login_and_goes_on_or_ends() {
        let refused = |go_on| {
            R::Fail(RouteFailure::Refused {
                text: "Invalid login\r\n* OK".to_owned(),
                smtp_code: Some("535 5.7.8".to_owned()),
                go_on,
            })
        };
        // With Auth-Wait: the session goes on, and the next login is routed afresh.
        let mut m = routed(TlsMode::Implicit, Some(CAPS));
        let mut throttle = Throttle::new(5, 0);
        let seen = drive(
            &mut m,
            &mut throttle,
            &[
                c("a LOGIN alice wrong\r\nb LOGIN bob secret\r\n"),
                refused(true),
                R::Connect,
                greeting(CAPS),
            ],
        );
        assert_eq!(
            seen.client,
            format!(
                "{}a NO [AUTHENTICATIONFAILED] Invalid login* OK\r\n",
                our_greeting(CAPS)
            )
        );
        assert_eq!(seen.backend, "b LOGIN \"bob\" \"secret\"\r\n");
        assert_eq!(
            seen.facts,
            [
                facts("alice", Some("wrong"), "LOGIN"),
                facts("bob", Some("secret"), "LOGIN")
            ]
        );
        assert!(throttle.notices.contains(&Notice::Auth {
            verdict: AuthVerdict::Failure,
            mechanism: "LOGIN".to_owned(),
            charge: Charge::Keep,
        }));
        assert_eq!(
            throttle.charged, 2,
            "the refusal stays counted, bob is with the backend"
        );

        // Without: the refusal, then the session ends.
        let mut m = routed(TlsMode::Implicit, Some(CAPS));
        let mut throttle = Throttle::new(5, 0);
        let seen = drive(
            &mut m,
            &mut throttle,
            &[
                c(&format!(
                    "a AUTHENTICATE PLAIN {}\r\nb NOOP\r\n",
                    b64(b"\0alice\0wrong")
                )),
                refused(false),
            ],
        );
        assert!(
            seen.client.ends_with(
                "a NO [AUTHENTICATIONFAILED] Invalid login* OK\r\n* BYE Login refused\r\n"
            ),
            "{seen:?}"
        );
        assert_eq!(seen.backend, "");
        assert_eq!(m.next(), Next::End(End::LoginRefused));
        assert_eq!(throttle.charged, 1);
        assert!(throttle.notices.contains(&Notice::Auth {
            verdict: AuthVerdict::Failure,
            mechanism: "AUTHENTICATE PLAIN".to_owned(),
            charge: Charge::Keep,
        }));
    }

    #[test]
    fn an_unavailable_route_is_a_temporary_failure_and_a_second_login_connects_again() {
        let user = b64(b"alice");
        let pass = b64(b"secret");
        let mut m = routed(TlsMode::Implicit, Some(CAPS));
        let mut throttle = Throttle::new(1, 0);
        let seen = drive(
            &mut m,
            &mut throttle,
            &[
                c("a LOGIN alice secret\r\n"),
                R::Fail(RouteFailure::Unavailable),
                c(&format!("b AUTHENTICATE LOGIN {user}\r\n{pass}\r\n")),
                R::Connect,
                greeting(CAPS),
                b("+ VXNlcm5hbWU6\r\n"),
                b("+ UGFzc3dvcmQ6\r\n"),
                b("b OK Logged in\r\n"),
            ],
        );
        assert_eq!(
            seen.client,
            format!(
                "{}a NO [UNAVAILABLE] Server temporarily unavailable, try again later\r\n\
                 + UGFzc3dvcmQ6\r\nb OK Logged in\r\n",
                our_greeting(CAPS)
            )
        );
        assert_eq!(
            seen.backend,
            format!("b AUTHENTICATE LOGIN\r\n{user}\r\n{pass}\r\n"),
            "no backend was connected, none is closed"
        );
        assert_eq!(
            seen.facts,
            [
                facts("alice", Some("secret"), "LOGIN"),
                facts("alice", Some("secret"), "LOGIN")
            ]
        );
        assert_eq!(m.next(), Next::Authenticated);
        assert_eq!(
            throttle.charged, 0,
            "refunded, so the limit of 1 let the second in"
        );
        assert!(throttle.notices.contains(&Notice::Auth {
            verdict: AuthVerdict::NotCompleted,
            mechanism: "LOGIN".to_owned(),
            charge: Charge::Refund,
        }));
    }

    #[test]
    fn a_backend_that_refuses_service_before_the_login_went_out_is_unavailable() {
        for trouble in [
            vec![b("* BYE [UNAVAILABLE] Too many connections\r\n")],
            vec![R::Closed],
            vec![b("* OK ready\r\n"), R::Closed],
        ] {
            let mut m = routed(TlsMode::Implicit, Some(CAPS));
            let mut throttle = Throttle::new(5, 0);
            let mut steps = vec![c("a LOGIN alice secret\r\nb NOOP\r\n"), R::Connect];
            steps.extend(trouble.clone());
            let seen = drive(&mut m, &mut throttle, &steps);
            assert!(
                seen.client.ends_with(
                    "a NO [UNAVAILABLE] Server temporarily unavailable, try again later\r\nb OK NOOP completed\r\n"
                ),
                "{trouble:?}: {seen:?}"
            );
            assert!(!seen.backend.contains("secret"), "{trouble:?}");
            assert!(seen.backend.ends_with("<close>"), "{trouble:?}");
            assert_eq!(m.next(), Next::Run, "{trouble:?}");
            assert_eq!(throttle.charged, 0, "{trouble:?}");
        }
        // Once the credentials went out, a backend that closes ends the session as before.
        let mut m = routed(TlsMode::Implicit, Some(CAPS));
        let mut throttle = Throttle::new(5, 0);
        drive(
            &mut m,
            &mut throttle,
            &[
                c("a LOGIN alice secret\r\n"),
                R::Connect,
                greeting(CAPS),
                R::Closed,
            ],
        );
        assert_eq!(m.next(), Next::End(End::BackendClosed));
        assert_eq!(throttle.charged, 1);
    }

    #[test]
    fn a_login_the_backend_refuses_leaves_it_and_the_next_login_is_routed_afresh() {
        let mut m = routed(TlsMode::Implicit, Some("IMAP4rev1 ID SASL-IR AUTH=PLAIN"));
        let mut throttle = Throttle::new(5, 0);
        let seen = drive(
            &mut m,
            &mut throttle,
            &[
                c("i ID (\"name\" \"mutt\")\r\na LOGIN alice wrong\r\nb LOGIN bob secret\r\n"),
                R::Connect,
                greeting("IMAP4rev1 ID AUTH=PLAIN"),
                b("* ID NIL\r\nTAG OK done\r\n"),
                b("a NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"),
                R::Connect,
                greeting("IMAP4rev1 ID AUTH=PLAIN"),
                b("* ID NIL\r\nTAG OK done\r\n"),
                b("b OK Logged in\r\n"),
            ],
        );
        let id = format!("TAG ID (\"name\" \"mutt\" \"tls\" \"{CIPHER}\")\r\n");
        assert_eq!(
            seen.backend,
            format!(
                "{id}a LOGIN \"alice\" \"wrong\"\r\nTAG LOGOUT\r\n<close>{id}b LOGIN \"bob\" \"secret\"\r\n"
            ),
            "each backend gets the client's ID, then the login"
        );
        assert_eq!(
            seen.client,
            format!(
                "{}* ID NIL\r\ni OK ID completed\r\n\
                 a NO [AUTHENTICATIONFAILED] Authentication failed.\r\nb OK Logged in\r\n",
                our_greeting("IMAP4rev1 ID SASL-IR AUTH=PLAIN")
            )
        );
        assert_eq!(
            seen.facts,
            [
                facts("alice", Some("wrong"), "LOGIN"),
                facts("bob", Some("secret"), "LOGIN")
            ]
        );
        assert_eq!(m.next(), Next::Authenticated);
        assert_eq!(
            throttle.charged, 1,
            "alice's failure counts, bob's success not"
        );
    }

    #[test]
    fn a_completion_instead_of_a_continuation_answers_the_clients_command() {
        let plain = b64(b"\0alice\0secret");
        for (completion, verdict) in [
            (
                "a NO [CANNOT] Unsupported authentication mechanism\r\n",
                AuthVerdict::Failure,
            ),
            ("a BAD Unknown command\r\n", AuthVerdict::Failure),
        ] {
            let mut m = routed(TlsMode::Implicit, Some(CAPS));
            let mut throttle = Throttle::new(5, 0);
            let seen = drive(
                &mut m,
                &mut throttle,
                &[
                    c(&format!("a AUTHENTICATE PLAIN {plain}\r\nb NOOP\r\n")),
                    R::Connect,
                    greeting(CAPS),
                    b(completion),
                ],
            );
            assert_eq!(
                seen.backend, "a AUTHENTICATE PLAIN\r\nTAG LOGOUT\r\n<close>",
                "the held response never went out"
            );
            assert!(
                seen.client
                    .ends_with(&format!("{completion}b OK NOOP completed\r\n")),
                "{seen:?}"
            );
            assert_eq!(m.next(), Next::Run);
            assert_eq!(
                throttle.charged, 1,
                "as today: a NO or BAD keeps the charge"
            );
            assert!(throttle.notices.contains(&Notice::Auth {
                verdict,
                mechanism: "AUTHENTICATE PLAIN".to_owned(),
                charge: Charge::Keep,
            }));
        }
    }

    /// The throttle's accounting on a routed listener: charged before the connection, settled
    /// by the backend's verdict or the router's.
    #[test]
    fn every_routed_login_path_settles_its_charge() {
        struct Case {
            name: &'static str,
            limit: u32,
            already: u32,
            steps: Vec<R>,
            charged: u32,
            refused: u32,
            connects: usize,
            reached: &'static [&'static str],
            never: &'static [&'static str],
        }
        let plain = b64(b"\0alice\0secret");
        let cases = [
            Case {
                name: "refused by the backend: kept",
                limit: 3,
                already: 0,
                steps: vec![
                    c("a LOGIN alice wrong\r\n"),
                    R::Connect,
                    greeting(CAPS),
                    b("a NO [AUTHENTICATIONFAILED] no\r\n"),
                ],
                charged: 1,
                refused: 0,
                connects: 1,
                reached: &["wrong", "LOGOUT"],
                never: &[],
            },
            Case {
                name: "accepted: refunded",
                limit: 3,
                already: 0,
                steps: vec![
                    c(&format!("a AUTHENTICATE PLAIN\r\n{plain}\r\n")),
                    R::Connect,
                    greeting(CAPS),
                    b("+ \r\n"),
                    b("a OK Logged in\r\n"),
                ],
                charged: 0,
                refused: 0,
                connects: 1,
                reached: &["AGFsaWNlAHNlY3JldA=="],
                never: &[],
            },
            Case {
                name: "throttled: answered here, never routed",
                limit: 1,
                already: 1,
                steps: vec![c(&format!(
                    "a LOGIN alice secret\r\nb AUTHENTICATE PLAIN {plain}\r\n"
                ))],
                charged: 1,
                refused: 2,
                connects: 0,
                reached: &[],
                never: &["alice", "AUTHENTICATE"],
            },
            Case {
                name: "pipelined logins past the limit, each routed in turn",
                limit: 2,
                already: 0,
                steps: vec![
                    c("a LOGIN u w1\r\nb LOGIN u w2\r\nc LOGIN u w3\r\n"),
                    R::Connect,
                    greeting(CAPS),
                    b("a NO [AUTHENTICATIONFAILED] no\r\n"),
                    R::Connect,
                    greeting(CAPS),
                    b("b NO [AUTHENTICATIONFAILED] no\r\n"),
                ],
                charged: 2,
                refused: 1,
                connects: 2,
                reached: &["w1", "w2"],
                never: &["w3"],
            },
            Case {
                name: "a hang-up while routed keeps the charge",
                limit: 3,
                already: 0,
                steps: vec![c("a LOGIN alice secret\r\n")],
                charged: 1,
                refused: 0,
                connects: 0,
                reached: &[],
                never: &["alice"],
            },
            Case {
                name: "the router refuses: kept",
                limit: 3,
                already: 0,
                steps: vec![
                    c("a LOGIN alice secret\r\n"),
                    R::Fail(RouteFailure::Refused {
                        text: "no".to_owned(),
                        smtp_code: None,
                        go_on: true,
                    }),
                ],
                charged: 1,
                refused: 0,
                connects: 1,
                reached: &[],
                never: &["alice"],
            },
            Case {
                name: "no backend: refunded",
                limit: 3,
                already: 0,
                steps: vec![
                    c("a LOGIN alice secret\r\n"),
                    R::Fail(RouteFailure::Unavailable),
                ],
                charged: 0,
                refused: 0,
                connects: 1,
                reached: &[],
                never: &["alice"],
            },
            Case {
                name: "cancelled before routing: never charged",
                limit: 3,
                already: 0,
                steps: vec![c("a AUTHENTICATE PLAIN\r\n*\r\n")],
                charged: 0,
                refused: 0,
                connects: 0,
                reached: &[],
                never: &["AUTHENTICATE"],
            },
            Case {
                name: "cancelled by the client once relayed: refunded",
                limit: 3,
                already: 0,
                steps: vec![
                    c(&format!(
                        "a AUTHENTICATE SCRAM-SHA-256 {}\r\n",
                        b64(b"n,,n=alice,r=abc")
                    )),
                    R::Connect,
                    greeting(CAPS),
                    b("+ \r\n"),
                    b("+ cj1hYmNkZWY=\r\n"),
                    c("*\r\n"),
                    b("a BAD Authentication aborted\r\n"),
                ],
                charged: 0,
                refused: 0,
                connects: 1,
                reached: &["*\r\n", "LOGOUT"],
                never: &[],
            },
            Case {
                name: "an unroutable mechanism: never charged",
                limit: 3,
                already: 0,
                steps: vec![c("a AUTHENTICATE CRAM-MD5\r\n")],
                charged: 0,
                refused: 0,
                connects: 0,
                reached: &[],
                never: &["CRAM"],
            },
        ];
        for case in cases {
            let mut m = routed(TlsMode::Implicit, Some(CAPS));
            let mut throttle = Throttle::new(case.limit, case.already);
            let seen = drive(&mut m, &mut throttle, &case.steps);
            assert_eq!(seen.facts.len(), case.connects, "{}: connects", case.name);
            check_charges(
                case.name,
                &throttle,
                &seen.backend,
                case.charged,
                case.refused,
                case.reached,
                case.never,
            );
        }
    }

    #[test]
    fn a_routed_starttls_session_stays_local_after_the_handshake_even_with_nothing_learned() {
        let mut m = routed(TlsMode::Starttls, None);
        let mut throttle = Throttle::new(5, 0);
        let seen = drive(&mut m, &mut throttle, &[c("s STARTTLS\r\n")]);
        assert!(seen.client.ends_with("s OK Begin TLS negotiation now\r\n"));
        m.tls_started(tls13());
        let seen = drive(
            &mut m,
            &mut throttle,
            &[
                c("a CAPABILITY\r\nb LOGIN alice secret\r\n"),
                R::Connect,
                b("* OK [CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED] ready\r\n"),
            ],
        );
        assert_eq!(
            seen.client, "* CAPABILITY IMAP4rev1 ID\r\na OK CAPABILITY completed\r\n",
            "no second greeting (RFC 9051 §6.2.1), the backend's swallowed"
        );
        assert_eq!(seen.backend, "b LOGIN \"alice\" \"secret\"\r\n");
    }

    #[test]
    fn a_session_that_is_not_routed_names_no_login_facts() {
        let mut settings = Settings {
            listener: TlsMode::Implicit,
            hostname: "mx.example.test".to_owned(),
            limits: command::Limits::default(),
            max_commands: 50,
            client_info: Vec::new(),
            learned_capability: Some(CAPS.as_bytes().to_vec()),
            routed: false,
        };
        let mut m = Prelogin::new(settings.clone(), Some(tls13()), 7);
        m.client_input(b"a AUTHENTICATE CRAM-MD5\r\n");
        assert_eq!(
            m.next(),
            Next::Connect,
            "connects as before: the backend answers it"
        );
        assert_eq!(m.login_facts(), None);
        settings.learned_capability = None;
        let m = Prelogin::new(settings, Some(tls13()), 7);
        assert_eq!(
            m.next(),
            Next::Connect,
            "connects at once to learn, as before"
        );
    }
}
