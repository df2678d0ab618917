//! The POP3 AUTHORIZATION state as a sans-I/O state machine (RFC 1939 §4, RFC 2595 §4,
//! RFC 5034 §4, RFC 8314 §4.1), driven by the loop shared with IMAP through
//! [`crate::machine::Machine`].
//!
//! The driver feeds it the bytes each side sent and writes out what it produced; the machine
//! never touches a socket or a clock, so unit tests drive it directly.
//!
//! Its security property holds by construction rather than by checks on forwarded bytes:
//! - On a `starttls` listener (110) there is no backend before TLS: mailfront answers the whole
//!   cleartext dialogue itself ([`policy::before_tls`]: greeting, CAPA with STLS, QUIT, local
//!   `-ERR`s, one fixed refusal for USER, PASS, APOP and AUTH), and the driver connects only
//!   after the handshake. Whatever was pipelined after STLS is dropped (RFC 2595 §4,
//!   CERT VU#555316). After TLS the backend's greeting is swallowed: the client had ours, and
//!   asks CAPA again (RFC 2595 §4).
//! - With TLS up (at once on 995, after STLS on 110) there is still no backend
//!   ([`Phase::Local`]): mailfront greets every session itself and answers what it can: CAPA
//!   from the response this listener learned of the backend ([`Settings::learned_capa`], by
//!   its capability probe, `probe` a layer up, before the first session after a start or
//!   reload is served; shown with the same TLS view as a live one), USER (`+OK`, remembered),
//!   QUIT, and the gate's own refusals. Only a command that needs the backend connects: PASS
//!   after a USER, AUTH (with or without a mechanism), and, as the fallback when the probe
//!   failed and nothing is learned, CAPA. Answering that CAPA with a guess would hide the
//!   backend's SASL mechanisms from the client, and nothing would ever learn the real list; the
//!   one connection teaches every later session. The line is held while the driver connects; once the backend greeted (its greeting swallowed, a
//!   `-ERR` one or a failed connect told as `-ERR [SYS/TEMP]`) and `backend_client_info` ran,
//!   the remembered USER goes out right before a PASS (its answer swallowed: the client had
//!   mailfront's `+OK`), and the gate judges the held line again as if it came now. Sessions
//!   that never log in cost the backend nothing. APOP is refused on every listener: the client
//!   never sees the backend's greeting and its timestamp (RFC 1939 §7).
//! - Over TLS and until the backend accepts a login, only commands [`policy::after_tls`] parsed
//!   and allowed reach the backend, written by mailfront in canonical form. PASS, APOP and AUTH
//!   hold every later client byte until the backend's answer: `+OK` → relay (RFC 1939 §6),
//!   `-ERR` → keep parsing. During AUTH one client line goes on per `+` challenge the backend
//!   sent (RFC 5034 §4), checked and re-emitted: a line pipelined past the exchange (say
//!   `XCLIENT`, which Dovecot trusts from mailfront) would otherwise reach the backend as a
//!   command.
//!
//! - On a listener that routes by user ([`Settings::routed`]: `user_affinity`, `user_map`,
//!   `user_lookup`) the backend depends on who logs in, so nothing connects before a complete
//!   login: CAPA and a bare AUTH are answered from the learned CAPA (or a built-in list,
//!   [`reply::capa_routed_default`]) with only the SASL mechanisms whose first response names
//!   the user ([`sasl::is_routable`]); USER is answered `+OK` and PASS completes the login;
//!   AUTH with a routable mechanism is played here up to the client's first response (both
//!   responses for LOGIN, whose `Username:`/`Password:` challenges mailfront sends, as nginx
//!   does), any other mechanism is refused. The held login is charged, then the driver routes
//!   it ([`Machine::login_facts`]) and connects, or tells the machine why not
//!   ([`Machine::route_failed`]). The chosen backend then gets the login as above, AUTH always
//!   without an initial response and each held response answering one of its `+`
//!   continuations, which the client never sees. A login the backend refuses leaves no backend
//!   behind: mailfront says QUIT, drops the connection and answers locally again, so the next
//!   login (maybe another user's) is routed afresh.
//!
//! Idle timer: in cleartext only a whole line restarts it, so trickled bytes do not hold a
//! session. Over TLS, bytes restart it while the turn is the client's; while a forwarded command
//! is unanswered only backend bytes and parsed client lines do.

use std::collections::VecDeque;

use crate::client_info::Notice as ClientInfoNotice;
use crate::config::TlsMode;
use crate::line::Step;
use crate::machine::{
    AuthVerdict, Charge, ClientEvents, Core, End, LoginFacts, Machine, Next, Notice, Phase,
    RouteFailure, TlsFacts, pump_client,
};
use crate::pop3::capa::{self, CapaView};
use crate::pop3::codec::{
    ClientEvent, Command, CommandLimits, CommandReceiver, Expect, Response, ResponseLimits,
    ResponseReceiver, SaslLine, ServerEvent, Status,
};
use crate::pop3::policy::{self, Decision, Local};
use crate::pop3::reply;
use crate::pop3::request::Request;
use crate::sasl;

/// What the machine needs to know about its session.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listener: TlsMode,
    /// Our name, for the cleartext greeting.
    pub hostname: String,
    pub limits: CommandLimits,
    /// `limits.preauth_commands`.
    pub max_commands: usize,
    /// `backend_client_info`: the client's address, told to the backend by XCLIENT when its
    /// greeting or CAPA offers it, before any client command goes on.
    pub client_info: Option<std::net::SocketAddr>,
    /// The backend's CAPA response as the listener learned it (raw, by its capability probe or
    /// from a session since): the answer to CAPA before the backend is connected. `None` only
    /// when the probe failed: then CAPA connects (the fallback).
    pub learned_capa: Option<Vec<u8>>,
    /// The listener chooses the backend by the user who logs in (`user_affinity`, `user_map`,
    /// `user_lookup`): nothing connects before a complete login, which the driver routes with
    /// [`Machine::login_facts`]. CAPA then never connects, even with nothing learned.
    pub routed: bool,
}

/// A SASL exchange mailfront plays itself on a routed listener, before any backend: the
/// client's responses to its challenges, until the one that names the user is in hand.
struct LocalSasl {
    /// Upper-cased, routable ([`sasl::is_routable`]).
    mechanism: Vec<u8>,
    /// Base64 as the client sent it; an initial `=` is an empty response (RFC 5034 §4).
    responses: Vec<Vec<u8>>,
}

impl LocalSasl {
    /// How many responses mailfront holds before it routes: the first names the user; LOGIN
    /// sends the name and the password as two responses (draft-murchison-sasl-login §2), and
    /// both are held so that the chosen backend gets the whole exchange from mailfront.
    fn wanted(&self) -> usize {
        if self.mechanism == b"LOGIN" { 2 } else { 1 }
    }
}

/// What a held login sends once the chosen backend is greeted.
enum Replay {
    /// RFC 1939 §7: USER (`None` once sent; its answer swallowed), then PASS.
    Pass {
        user: Option<Vec<u8>>,
        password: Vec<u8>,
    },
    /// RFC 5034 §4: `AUTH mechanism` without an initial response (the backend may not take
    /// one), each held response answering one `+` continuation.
    Sasl {
        mechanism: Vec<u8>,
        responses: Vec<Vec<u8>>,
    },
}

/// A complete login on a routed listener, held whole: charged first, then routed, then sent
/// to the backend chosen for its user once that backend is greeted.
struct HeldLogin {
    /// The authentication identity; `None` when it cannot be read (a malformed PLAIN message,
    /// OAUTHBEARER without `a=`): such a login is answered here as failed and never routed.
    user: Option<Vec<u8>>,
    replay: Replay,
}

impl HeldLogin {
    /// The login's name in logs and [`Notice::Auth`], as [`Request::log_name`] writes it.
    fn label(&self) -> String {
        match &self.replay {
            Replay::Pass { .. } => "PASS".to_owned(),
            Replay::Sasl { mechanism, .. } => {
                format!("AUTH {}", sasl::mechanism_for_log(mechanism))
            }
        }
    }

    fn facts(&self) -> Option<LoginFacts> {
        let user = self.user.clone()?;
        let (mechanism, password) = match &self.replay {
            Replay::Pass { password, .. } => ("USER".to_owned(), Some(password.clone())),
            Replay::Sasl {
                mechanism,
                responses,
            } => {
                let password = match mechanism.as_slice() {
                    b"PLAIN" => responses
                        .first()
                        .and_then(|r| sasl::plain_password(r))
                        .map(|p| p.to_vec()),
                    b"LOGIN" => responses
                        .get(1)
                        .and_then(|r| sasl::login_mechanism_password(r))
                        .map(|p| p.to_vec()),
                    _ => None,
                };
                (String::from_utf8_lossy(mechanism).into_owned(), password)
            }
        };
        Some(LoginFacts {
            user,
            password: password.map(zeroize::Zeroizing::new),
            mechanism,
            helo: None,
        })
    }
}

/// What a forwarded command was, to treat its response.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Sent {
    Capa,
    /// `AUTH` with no argument: the mechanism list.
    Mechanisms,
    /// PASS, APOP or AUTH with a mechanism (its log name): its `+OK` ends AUTHORIZATION.
    Auth(String),
    Quit,
    Other,
    /// A reply of mailfront's own, owed after the responses to the commands before it
    /// (pipelining, RFC 2449 §6.6): nothing of it goes to the backend. Never first in the
    /// queue: it goes out as soon as the response before it did.
    Local(Vec<u8>),
    /// mailfront's own CAPA, to learn whether XCLIENT is offered; the client never sees it.
    ProbeCapa,
    /// mailfront's own XCLIENT; the client never sees its answer.
    Xclient,
    /// The client's USER, answered `+OK` by mailfront before the backend was connected and sent
    /// right before its PASS: the client never sees the backend's answer.
    ReplayedUser,
}

/// The POP3 AUTHORIZATION state of one session.
pub struct Prelogin {
    settings: Settings,
    /// Phase and the bytes in and out, kept as every machine keeps them.
    core: Core,
    rx: CommandReceiver,
    srx: ResponseReceiver,
    /// Forwarded commands in order, parallel to the response receiver's expectations
    /// (pipelining, RFC 2449 §6.6).
    sent: VecDeque<Sent>,
    /// Counted across STLS: the limit is per connection.
    commands: usize,
    quit: bool,
    /// `+` challenges the backend sent during AUTH that the client has not answered yet.
    sasl_credit: usize,
    /// PASS, APOP or AUTH with a mechanism, gated and waiting for [`Machine::login_charge`];
    /// client bytes wait behind it. USER alone proves nothing and is never charged.
    charging: Option<(Request, Expect)>,
    /// During AUTH: mailfront sent the backend `*` (the client cancelled, or sent a line that is
    /// not base64), so no credential was checked and the `-ERR` that follows is refunded.
    sasl_cancelled: bool,
    /// AUTH without an initial response: its mechanism, until the client's first SASL line,
    /// which carries the user name ([`sasl::user_in_first_response`]).
    user_from_first_line: Option<Vec<u8>>,
    /// A USER answered by mailfront and not sent yet: it goes right before the PASS.
    user: Option<Vec<u8>>,
    /// The line that made the machine connect, judged by the gate again once the backend is
    /// greeted; later client bytes wait behind it.
    held: Option<Command>,
    /// Routed: an AUTH exchange mailfront plays itself before the login is complete.
    collecting: Option<LocalSasl>,
    /// Routed: a complete login, waiting for its charge ([`Phase::Local`]), its backend
    /// ([`Phase::Connecting`]) or that backend's greeting; client bytes wait behind it.
    login: Option<HeldLogin>,
    /// Routed: SASL responses held for the backend's next `+` continuations, once the AUTH
    /// went out.
    replay: VecDeque<Vec<u8>>,
    /// Routed: the backend refused a login and must be dropped ([`Machine::take_backend_close`]).
    close_backend: bool,
}

impl Prelogin {
    /// A session whose client side is TLS already (`tls_active`: implicit-TLS listeners) or
    /// still cleartext on a `starttls` listener; either gets mailfront's greeting at once.
    pub fn new(settings: Settings, tls_active: bool) -> Prelogin {
        let mut machine = Prelogin {
            rx: CommandReceiver::new(settings.limits),
            srx: ResponseReceiver::new(ResponseLimits::default()),
            settings,
            core: Core::new(tls_active),
            sent: VecDeque::new(),
            commands: 0,
            quit: false,
            sasl_credit: 0,
            charging: None,
            sasl_cancelled: false,
            user_from_first_line: None,
            user: None,
            held: None,
            collecting: None,
            login: None,
            replay: VecDeque::new(),
            close_backend: false,
        };
        if tls_active {
            // No backend until a command needs it.
            machine.core.phase = Phase::Local;
        }
        // Always mailfront's: the backend is connected later, if ever.
        let greeting = reply::greeting(&machine.settings.hostname);
        machine.core.to_client.extend_from_slice(&greeting);
        machine
    }

    /// The most client bytes one event needs before the receiver can act on it; the driver adds
    /// one read's worth to get the `hold_limit` of [`Machine::wants_client_input`].
    pub fn longest_event(&self) -> usize {
        self.settings
            .limits
            .sasl_line
            .max(self.settings.limits.command)
    }

    /// Whether the next thing expected is the backend's: its greeting, or the answer to a
    /// forwarded command, unless a SASL `+` made it the client's turn.
    pub fn waiting_for_backend(&self) -> bool {
        match self.core.phase {
            Phase::Greeting => true,
            Phase::Ready => !self.sent.is_empty() && self.sasl_credit == 0,
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

    /// The handshake after STLS succeeded: start afresh with a new receiver (nothing the client
    /// sent before counts), still without a backend ([`Phase::Local`]). The command count goes
    /// on.
    pub fn tls_started(&mut self) {
        self.rx = CommandReceiver::new(self.settings.limits);
        self.core.cbuf.clear();
        self.core.phase = Phase::Local;
    }

    /// Client bytes arrived. Returns whether the idle timer restarts: in cleartext only when a
    /// whole line was acted on; over TLS also on any bytes while the backend owes nothing.
    pub fn client_input(&mut self, bytes: &[u8]) -> bool {
        let any_bytes_count = self.core.phase != Phase::Cleartext && !self.waiting_for_backend();
        self.core.cbuf.extend_from_slice(bytes);
        pump_client(self) || any_bytes_count
    }

    /// Backend bytes arrived. Returns whether the idle timer restarts: on any bytes while the
    /// backend owed us something, and when the client lines it freed were acted on.
    pub fn backend_input(&mut self, bytes: &[u8]) -> bool {
        let owed = !bytes.is_empty() && self.waiting_for_backend();
        self.core.bbuf.extend_from_slice(bytes);
        self.pump_backend() || owed
    }

    /// The backend closed its side: after a forwarded QUIT that is the client's goodbye;
    /// otherwise the client is told only if it has not had a greeting yet.
    pub fn backend_closed(&mut self) {
        if matches!(self.core.phase, Phase::Ended | Phase::Authenticated) {
            return;
        }
        if self.login.is_some() && matches!(self.core.phase, Phase::Greeting | Phase::Ready) {
            // Routed, before the login went out: the chosen backend is unavailable.
            self.route_failed(RouteFailure::Unavailable);
            return;
        }
        if self.core.phase == Phase::Greeting {
            self.core
                .to_client
                .extend_from_slice(&reply::err_unavailable());
        }
        let end = if self.quit {
            End::ClientClosed
        } else {
            End::BackendClosed
        };
        self.core.finish(end);
    }

    /// PASS, APOP or AUTH is forwarded and unanswered.
    fn auth_in_flight(&self) -> bool {
        self.sent.iter().any(|s| matches!(s, Sent::Auth(_)))
    }

    // ---- client side -------------------------------------------------------------------

    fn may_take_client_event(&self) -> bool {
        match self.core.phase {
            Phase::Cleartext => true,
            // A routed login waiting for its charge goes first.
            Phase::Local => self.login.is_none(),
            // While PASS/APOP/AUTH is unanswered only its SASL responses go on, one per `+`.
            // After QUIT went out the backend is leaving: nothing more goes to it (RFC 1939 §6).
            // A login waiting for its charge goes first.
            // A held line goes before anything pipelined after it.
            Phase::Ready
                if self.quit
                    || self.client_info_pending()
                    || self.charging.is_some()
                    || self.held.is_some()
                    || self.login.is_some() =>
            {
                false
            }
            Phase::Ready => !self.auth_in_flight() || (self.rx.in_sasl() && self.sasl_credit > 0),
            _ => false,
        }
    }

    /// Counts a command against `limits.preauth_commands`; false once over it.
    fn count_command(&mut self) -> bool {
        self.commands += 1;
        if self.commands > self.settings.max_commands {
            self.core
                .to_client
                .extend_from_slice(&reply::err_too_many_commands());
            self.core.finish(End::ProtocolViolation(
                "too many commands before authentication".to_owned(),
            ));
            return false;
        }
        true
    }

    /// Before TLS on a `starttls` listener: mailfront is the whole server.
    fn cleartext(&mut self, event: ClientEvent) {
        if !self.count_command() {
            return;
        }
        let cmd = match event {
            ClientEvent::Command(cmd) => cmd,
            ClientEvent::Rejected(rejection) => {
                self.core.to_client.extend_from_slice(&rejection.reply());
                return;
            }
            // Never begun: no AUTH exchange runs before TLS.
            ClientEvent::SaslResponse(_) => return,
        };
        match policy::before_tls(&cmd) {
            Local::Reply(answer) => self.core.to_client.extend_from_slice(&answer),
            Local::RefuseCredentials(answer) => {
                self.core.notices.push(Notice::CleartextAuthRefused {
                    mechanism: refused_label(&cmd),
                });
                self.core.to_client.extend_from_slice(&answer);
            }
            Local::StartTls(ok) => {
                self.core.to_client.extend_from_slice(&ok);
                self.core.phase = Phase::StartTls;
            }
            Local::Quit(bye) => {
                self.core.to_client.extend_from_slice(&bye);
                self.core.finish(End::ClientClosed);
            }
        }
    }

    /// Over TLS, with the backend greeted: gate, then forward re-encoded or answer here.
    fn on_client_event(&mut self, event: ClientEvent) {
        match event {
            ClientEvent::SaslResponse(line) if self.core.phase == Phase::Local => {
                self.on_local_sasl(line);
            }
            ClientEvent::SaslResponse(line) => {
                // Not a command: the answer to a `+` the backend sent.
                self.sasl_credit = self.sasl_credit.saturating_sub(1);
                // `*` ends the exchange before the backend checked anything (RFC 5034 §4): its
                // `-ERR` is not a wrong guess.
                self.sasl_cancelled |= matches!(line, SaslLine::Cancel | SaslLine::Invalid);
                if let Some(mechanism) = self.user_from_first_line.take()
                    && let SaslLine::Response(response) = &line
                    && let Some(user) = sasl::user_in_first_response(&mechanism, response)
                {
                    self.core.notices.push(Notice::User(user));
                }
                self.core.to_backend.extend_from_slice(&line.canonical());
            }
            ClientEvent::Command(cmd) => {
                if !self.count_command() {
                    return;
                }
                if self.core.phase == Phase::Local {
                    self.on_local_command(cmd);
                } else if cmd.is("PASS") && self.user.is_some() {
                    // Connected for something else (a first CAPA) after a USER answered here:
                    // that USER goes out first.
                    self.held = Some(cmd);
                    self.release_held();
                } else {
                    if cmd.is("USER") {
                        // The backend gets this one: the one answered here is forgotten.
                        self.user = None;
                    }
                    self.on_decision(policy::after_tls(&cmd));
                }
            }
            ClientEvent::Rejected(rejection) => {
                if !self.count_command() {
                    return;
                }
                if rejection.fatal {
                    // An over-long SASL line: the backend waits for a whole one. The session
                    // ends with this reply, so it goes now.
                    self.core.to_client.extend_from_slice(&rejection.reply());
                    self.core
                        .finish(End::ProtocolViolation(rejection.error.to_string()));
                } else {
                    self.reply_in_order(rejection.reply());
                }
            }
        }
    }

    /// A command with TLS up and no backend yet ([`Phase::Local`]): answered here when
    /// mailfront can, otherwise held while the driver connects.
    fn on_local_command(&mut self, cmd: Command) {
        let request = match policy::after_tls(&cmd) {
            Decision::Reply(answer) => {
                self.core.to_client.extend_from_slice(&answer);
                return;
            }
            Decision::Forward { request, .. } => request,
        };
        match request {
            // RFC 1939 §7: USER alone checks nothing a client could not learn from PASS's
            // answer; the name goes to the backend right before the PASS.
            Request::User(name) => {
                self.user = Some(name);
                self.core.to_client.extend_from_slice(&reply::user_ok());
            }
            // RFC 1939 §6: no UPDATE state without a login.
            Request::Quit => {
                self.core.to_client.extend_from_slice(&reply::quit_ok());
                self.core.finish(End::ClientClosed);
            }
            // Routed: never a connection to learn a list, which the backend chosen for nobody
            // would give; the learned one or the built-in one, with only the mechanisms that
            // can be routed.
            Request::Capa if self.settings.routed => {
                let shown = match &self.settings.learned_capa {
                    Some(learned) => capa::rewrite_capa(learned, CapaView::Routed),
                    None => reply::capa_routed_default(),
                };
                self.core.to_client.extend_from_slice(&shown);
            }
            Request::AuthList if self.settings.routed => {
                let learned = self.settings.learned_capa.as_deref().unwrap_or_default();
                let list = reply::mechanism_list(capa::routable_mechanisms(learned));
                self.core.to_client.extend_from_slice(&list);
            }
            Request::Capa if self.settings.learned_capa.is_some() => {
                let learned = self.settings.learned_capa.as_deref().unwrap_or_default();
                let shown = capa::rewrite_capa(learned, CapaView::Tls);
                self.core.to_client.extend_from_slice(&shown);
            }
            // RFC 1939 §7: PASS only right after a USER.
            Request::Pass(_) if self.user.is_none() => {
                self.core.to_client.extend_from_slice(&reply::err_no_user());
            }
            // Routed: USER then PASS is a complete login, the user named by USER (RFC 1939 §7).
            Request::Pass(password) if self.settings.routed => {
                let user = self.user.take();
                self.login = Some(HeldLogin {
                    user: user.clone(),
                    replay: Replay::Pass { user, password },
                });
            }
            Request::Auth { mechanism, initial } if self.settings.routed => {
                self.begin_local_sasl(mechanism, initial);
            }
            // Routed: nothing else is a login, and nothing else connects.
            _ if self.settings.routed => {
                self.core
                    .to_client
                    .extend_from_slice(&reply::err_not_authorized_yet());
            }
            // PASS, AUTH, and CAPA while nothing is learned: the backend is needed.
            _ => {
                self.held = Some(cmd);
                self.core.phase = Phase::Connecting;
            }
        }
    }

    /// Once the backend is greeted and told the client's address (`backend_client_info`): a
    /// remembered USER goes out right before the held PASS, then the gate judges the held line
    /// again, as if it came now. Returns whether the held line was acted on.
    fn release_held(&mut self) -> bool {
        if self.core.phase != Phase::Ready || self.client_info_pending() || self.charging.is_some()
        {
            return false;
        }
        if self.login.is_some() {
            return self.release_login();
        }
        let Some(held) = &self.held else {
            return false;
        };
        if held.is("PASS")
            && let Some(name) = self.user.take()
        {
            self.core.notices.push(Notice::User(name.clone()));
            self.sent.push_back(Sent::ReplayedUser);
            self.srx.expect(Expect::SingleLine);
            self.core
                .to_backend
                .extend_from_slice(&Request::User(name).canonical());
        }
        if !self.sent.is_empty() {
            // The replayed USER's answer, or a response owed to a command before the held
            // line, comes first.
            return false;
        }
        let Some(held) = self.held.take() else {
            return false;
        };
        self.on_decision(policy::after_tls(&held));
        true
    }

    fn on_decision(&mut self, decision: Decision) {
        match decision {
            Decision::Forward { request, expect }
                if matches!(expect, Expect::Authentication | Expect::Sasl) =>
            {
                // Charged before it goes out: the driver answers with `login_charge`.
                self.charging = Some((request, expect));
            }
            Decision::Forward { request, expect } => self.forward(request, expect),
            Decision::Reply(answer) => self.reply_in_order(answer),
        }
    }

    /// A reply of mailfront's own to a client line: after the responses to the commands
    /// forwarded before it, since responses come in the order of the commands (RFC 2449 §6.6,
    /// RFC 1939 §3).
    fn reply_in_order(&mut self, answer: Vec<u8>) {
        if self.sent.is_empty() {
            self.core.to_client.extend_from_slice(&answer);
        } else {
            self.sent.push_back(Sent::Local(answer));
        }
    }

    /// See [`Machine::login_charge`].
    pub fn login_charge(&mut self, granted: bool) {
        if self.core.phase == Phase::Local && self.login.is_some() {
            self.charge_routed(granted);
            return;
        }
        let Some((request, expect)) = self.charging.take() else {
            return;
        };
        if granted {
            self.forward(request, expect);
        } else {
            self.core.notices.push(Notice::AuthThrottled {
                mechanism: request.log_name(),
            });
            if self.sent.is_empty() {
                self.core
                    .to_client
                    .extend_from_slice(&reply::err_auth_throttled());
            } else {
                // A pipelined USER before it is still unanswered.
                self.sent
                    .push_back(Sent::Local(reply::err_auth_throttled()));
            }
        }
        if self.core.phase == Phase::Ready {
            pump_client(self);
        }
    }

    /// Sends a gated command in canonical form and queues what its response means.
    fn forward(&mut self, request: Request, expect: Expect) {
        // The user name, for the session's close line, as it goes out (after the gate, and for
        // APOP and AUTH after the charge); never the password.
        match &request {
            Request::User(name) | Request::Apop { name, .. } => {
                self.core.notices.push(Notice::User(name.clone()));
            }
            Request::Auth {
                mechanism,
                initial: Some(response),
            } => {
                if let Some(user) = sasl::user_in_first_response(mechanism, response) {
                    self.core.notices.push(Notice::User(user));
                }
            }
            Request::Auth {
                mechanism,
                initial: None,
            } => self.user_from_first_line = Some(mechanism.clone()),
            _ => {}
        }
        self.send(request, expect);
    }

    /// Writes a command to the backend in canonical form and queues what its response means.
    fn send(&mut self, request: Request, expect: Expect) {
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
            // Every later client line is a SASL response until the final answer
            // (RFC 5034 §4).
            self.rx.begin_sasl();
        }
        self.core.to_backend.extend_from_slice(&request.canonical());
    }

    // ---- backend side ------------------------------------------------------------------

    /// Handles whole backend responses, then the client lines they may have freed; returns
    /// whether any client line was acted on.
    fn pump_backend(&mut self) -> bool {
        while matches!(self.core.phase, Phase::Greeting | Phase::Ready) {
            let step = self.srx.next(&self.core.bbuf);
            self.core
                .bbuf
                .drain(..step.consumed.min(self.core.bbuf.len()));
            let Some(event) = step.event else {
                break;
            };
            match event {
                ServerEvent::Rejected(e) => {
                    self.refund_held_login();
                    self.core
                        .to_client
                        .extend_from_slice(&reply::err_unavailable());
                    self.core.finish(End::BackendProtocol(e.to_string()));
                }
                ServerEvent::Greeting(greeting) => self.on_greeting(greeting),
                ServerEvent::Response(response) => self.on_response(response),
            }
        }
        if self.core.phase == Phase::Local {
            // Routed, the backend dropped after a login it refused: what the client pipelined
            // is answered here again.
            return pump_client(self);
        }
        if self.core.phase != Phase::Ready {
            return false;
        }
        let released = self.release_held();
        pump_client(self) || released
    }

    fn on_greeting(&mut self, greeting: Response) {
        self.core.phase = Phase::Ready;
        if greeting.status == Status::Ok && self.settings.client_info.is_some() {
            // Before any client command: XCLIENT is for the start of a session, before
            // credentials (Dovecot accepts it only before login). Dovecot says it accepts it
            // with the greeting's [XCLIENT] code; other servers may list it in CAPA.
            if capa::greeting_offers_xclient(&greeting.raw) {
                self.after_probe(true);
            } else {
                self.sent.push_back(Sent::ProbeCapa);
                self.srx.expect(Expect::MultiLine);
                self.core.to_backend.extend_from_slice(b"CAPA\r\n");
            }
        }
        // Swallowed: the client had mailfront's greeting, and a refusal now can only be told
        // as unavailability.
        if greeting.status != Status::Ok && self.login.is_some() {
            // Routed: the backend chosen for this user refuses service, which is the router's
            // Unavailable: no other backend, and the session goes on without one.
            self.close_backend = true;
            self.abandon_login(RouteFailure::Unavailable);
            return;
        }
        if greeting.status != Status::Ok {
            self.held = None;
            self.core
                .to_client
                .extend_from_slice(&reply::err_unavailable());
            self.core.finish(End::BackendUnavailable);
        }
    }

    fn on_response(&mut self, response: Response) {
        let is_final = response.is_final();
        if !is_final
            && matches!(self.sent.front(), Some(Sent::Auth(_)))
            && let Some(held) = self.replay.pop_front()
        {
            // Routed: the client answered this continuation before the backend was chosen
            // (RFC 5034 §4, one response per `+`); it never sees the continuation.
            self.core
                .to_backend
                .extend_from_slice(&SaslLine::Response(held).canonical());
            return;
        }
        if !is_final && self.rx.in_sasl() {
            self.sasl_credit = self.sasl_credit.saturating_add(1);
        }
        let sent = if is_final {
            self.sent.pop_front()
        } else {
            self.sent.front().cloned()
        };
        let shown = match (&sent, response.status) {
            (Some(Sent::ProbeCapa), status) => {
                if status == Status::Ok {
                    self.learn_capa(&response.raw);
                }
                self.after_probe(status == Status::Ok && offers_xclient(&response.raw));
                return;
            }
            // Whatever the backend thought of it, the PASS after it will say (RFC 1939 §7).
            (Some(Sent::ReplayedUser), _) => return,
            (Some(Sent::Xclient), status) => {
                if status != Status::Ok {
                    // backend_client_info is all or nothing: a backend that offers XCLIENT and
                    // refuses ours would take the login as coming from mailfront's address.
                    self.core
                        .notices
                        .push(Notice::ClientInfo(ClientInfoNotice::Refused));
                    self.refund_held_login();
                    self.core
                        .to_client
                        .extend_from_slice(&reply::err_unavailable());
                    self.core.finish(End::BackendUnavailable);
                }
                return;
            }
            (Some(Sent::Capa), Status::Ok) => {
                self.learn_capa(&response.raw);
                capa::rewrite_capa(&response.raw, CapaView::Tls)
            }
            (Some(Sent::Mechanisms), Status::Ok) => capa::rewrite_mechanisms(&response.raw),
            _ => response.raw.clone(),
        };
        self.core.to_client.extend_from_slice(&shown);
        let quit_answered =
            matches!(sent, Some(Sent::Quit)) && is_final && response.status == Status::Ok;
        if is_final {
            while let Some(Sent::Local(_)) = self.sent.front() {
                if let Some(Sent::Local(owed)) = self.sent.pop_front() {
                    self.core.to_client.extend_from_slice(&owed);
                }
            }
        }
        if let Some(Sent::Auth(mechanism)) = sent
            && is_final
        {
            let ok = response.authenticated();
            self.sasl_credit = 0;
            // Success and a cancelled exchange are refunded; any other `-ERR` keeps the
            // attempt's charge.
            let charge = if ok || self.sasl_cancelled {
                Charge::Refund
            } else {
                Charge::Keep
            };
            self.sasl_cancelled = false;
            self.user_from_first_line = None;
            // A completion before the held responses were used: it answers the login.
            self.replay.clear();
            self.core.notices.push(Notice::Auth {
                verdict: if ok {
                    AuthVerdict::Success
                } else {
                    AuthVerdict::Failure
                },
                mechanism,
                charge,
            });
            if ok {
                // Whatever follows belongs to the TRANSACTION state: relayed as is.
                self.core.phase = Phase::Authenticated;
                return;
            }
            self.rx.end_sasl();
            if self.settings.routed {
                self.leave_backend();
                return;
            }
        }
        if quit_answered {
            // The reply to QUIT is the last word (RFC 1939 §6): the session ends with it, and
            // the reply leaves together with the close instead of waiting for the backend's.
            self.core.finish(End::ClientClosed);
        }
    }
}

/// Routed listeners: the login held whole before any backend, and its end.
impl Prelogin {
    /// AUTH on a routed listener: only a mechanism whose first response names the user can be
    /// routed; its exchange is played here until that response is held.
    fn begin_local_sasl(&mut self, mechanism: Vec<u8>, initial: Option<Vec<u8>>) {
        if !sasl::is_routable(&mechanism) {
            // CRAM-MD5, DIGEST-MD5 (the name comes after the backend's challenge), EXTERNAL,
            // GSSAPI, …: never offered here, refused as unsupported (RFC 5034 §4).
            self.core
                .to_client
                .extend_from_slice(&reply::err_mechanism_unsupported());
            return;
        }
        // RFC 5034 §4: `=` is an empty initial response.
        let responses = initial
            .map(|ir| if ir == b"=" { Vec::new() } else { ir })
            .into_iter()
            .collect();
        self.collecting = Some(LocalSasl {
            mechanism,
            responses,
        });
        self.next_local_challenge();
    }

    /// Sends mailfront's next challenge, or holds the login once every response it needs is
    /// in hand.
    fn next_local_challenge(&mut self) {
        let Some(exchange) = &self.collecting else {
            return;
        };
        let held = exchange.responses.len();
        if held < exchange.wanted() {
            let challenge = match (exchange.mechanism.as_slice(), held) {
                (b"LOGIN", 0) => reply::sasl_username_challenge(),
                (b"LOGIN", _) => reply::sasl_password_challenge(),
                _ => reply::sasl_empty_challenge(),
            };
            self.core.to_client.extend_from_slice(&challenge);
            // Every client line is a SASL response until the exchange ends (RFC 5034 §4).
            self.rx.begin_sasl();
            return;
        }
        let Some(exchange) = self.collecting.take() else {
            return;
        };
        // Client lines wait unparsed until the backend's answer; the exchange with the backend
        // begins the receiver's SASL state again.
        self.rx.end_sasl();
        let user = exchange
            .responses
            .first()
            .and_then(|first| sasl::user_in_first_response(&exchange.mechanism, first));
        self.login = Some(HeldLogin {
            user,
            replay: Replay::Sasl {
                mechanism: exchange.mechanism,
                responses: exchange.responses,
            },
        });
    }

    /// A client line answering one of mailfront's own challenges.
    fn on_local_sasl(&mut self, line: SaslLine) {
        let answer = match line {
            SaslLine::Response(response) => {
                if let Some(exchange) = &mut self.collecting {
                    exchange.responses.push(response);
                }
                if self.collecting.is_some() {
                    self.next_local_challenge();
                    return;
                }
                reply::err_sasl_response_invalid()
            }
            // RFC 5034 §4: `*` cancels, and the AUTH gets a negative response. No backend, no
            // credential checked, no charge.
            SaslLine::Cancel => reply::err_auth_cancelled(),
            SaslLine::Invalid => reply::err_sasl_response_invalid(),
        };
        self.collecting = None;
        self.rx.end_sasl();
        self.core.to_client.extend_from_slice(&answer);
    }

    /// The driver's answer to the charge of a held routed login: granted, the driver routes it
    /// (unless its user cannot be read: a failed login, answered here); refused, the throttled
    /// reply. Either way what the client pipelined then goes on.
    fn charge_routed(&mut self, granted: bool) {
        let Some(login) = self.login.take() else {
            return;
        };
        if !granted {
            self.core.notices.push(Notice::AuthThrottled {
                mechanism: login.label(),
            });
            self.core
                .to_client
                .extend_from_slice(&reply::err_auth_throttled());
        } else if let Some(user) = &login.user {
            // The close line's user, as the login is let through.
            self.core.notices.push(Notice::User(user.clone()));
            self.login = Some(login);
            self.core.phase = Phase::Connecting;
            return;
        } else {
            // A login attempt all the same: its charge stays.
            self.core.notices.push(Notice::Auth {
                verdict: AuthVerdict::Failure,
                mechanism: login.label(),
                charge: Charge::Keep,
            });
            self.core
                .to_client
                .extend_from_slice(&reply::err_auth_failed());
        }
        pump_client(self);
    }

    /// The chosen backend is greeted and told the client's address: the held login goes out,
    /// USER first and PASS after its answer, or AUTH without an initial response.
    fn release_login(&mut self) -> bool {
        if let Some(HeldLogin {
            replay: Replay::Pass { user, .. },
            ..
        }) = &mut self.login
            && let Some(name) = user.take()
        {
            self.sent.push_back(Sent::ReplayedUser);
            self.srx.expect(Expect::SingleLine);
            self.core
                .to_backend
                .extend_from_slice(&Request::User(name).canonical());
        }
        if !self.sent.is_empty() {
            return false;
        }
        let Some(login) = self.login.take() else {
            return false;
        };
        match login.replay {
            Replay::Pass { password, .. } => {
                self.send(Request::Pass(password), Expect::Authentication);
            }
            Replay::Sasl {
                mechanism,
                responses,
            } => {
                self.replay = responses.into();
                self.send(
                    Request::Auth {
                        mechanism,
                        initial: None,
                    },
                    Expect::Sasl,
                );
            }
        }
        true
    }

    /// The router gave the held login no backend, or its backend failed before the login went
    /// out: answered here, and the session goes on without a backend unless the refusal ends
    /// it (nginx ends a session refused without `Auth-Wait`).
    fn abandon_login(&mut self, failure: RouteFailure) {
        let Some(login) = self.login.take() else {
            return;
        };
        let mechanism = login.label();
        self.reset_backend_state();
        self.core.phase = Phase::Local;
        match failure {
            RouteFailure::Refused { text, go_on, .. } => {
                self.core
                    .to_client
                    .extend_from_slice(&reply::err_login_refused(&text));
                self.core.notices.push(Notice::Auth {
                    verdict: AuthVerdict::Failure,
                    mechanism,
                    charge: Charge::Keep,
                });
                if !go_on {
                    self.core.finish(End::LoginRefused);
                }
            }
            // RFC 3206 SYS/TEMP: try again later, maybe on another backend of the affinity.
            RouteFailure::Unavailable => {
                self.core
                    .to_client
                    .extend_from_slice(&reply::err_unavailable());
                self.core.notices.push(Notice::Auth {
                    verdict: AuthVerdict::NotCompleted,
                    mechanism,
                    charge: Charge::Refund,
                });
            }
        }
    }

    /// The session ends before a held login went out: no credential was checked.
    fn refund_held_login(&mut self) {
        if let Some(login) = self.login.take() {
            self.core.notices.push(Notice::Auth {
                verdict: AuthVerdict::NotCompleted,
                mechanism: login.label(),
                charge: Charge::Refund,
            });
        }
    }

    /// Routed: the backend refused a login, so it goes: the next login may name another user,
    /// who may live elsewhere. QUIT in the AUTHORIZATION state ends its session at once
    /// (RFC 1939 §6); nothing of its answer is read.
    fn leave_backend(&mut self) {
        self.reset_backend_state();
        self.core
            .to_backend
            .extend_from_slice(&Request::Quit.canonical());
        self.close_backend = true;
        self.core.phase = Phase::Local;
    }

    /// Forgets everything about a backend connection, as before the first one: nothing more
    /// goes to it.
    fn reset_backend_state(&mut self) {
        self.core.to_backend.clear();
        self.srx = ResponseReceiver::new(ResponseLimits::default());
        self.sent.clear();
        self.core.bbuf.clear();
        self.sasl_credit = 0;
        self.sasl_cancelled = false;
        self.user_from_first_line = None;
        self.replay.clear();
        self.quit = false;
        self.rx.end_sasl();
    }
}

impl Prelogin {
    /// XCLIENT is offered (greeting code) or mailfront's CAPA came back: XCLIENT goes out if
    /// offered.
    fn after_probe(&mut self, offered: bool) {
        match self.settings.client_info {
            Some(client) if offered => {
                self.sent.push_back(Sent::Xclient);
                self.srx.expect(Expect::SingleLine);
                self.core
                    .to_backend
                    .extend_from_slice(&crate::client_info::pop3_xclient_command(client));
            }
            _ => self
                .core
                .notices
                .push(Notice::ClientInfo(ClientInfoNotice::NotOffered)),
        }
    }

    /// The backend's CAPA response, for the listener's next sessions to answer CAPA with
    /// before they connect.
    fn learn_capa(&mut self, raw: &[u8]) {
        self.core
            .notices
            .push(Notice::BackendPop3Capa(raw.to_vec()));
    }

    /// mailfront's own CAPA or XCLIENT is unanswered: client commands wait, so no credential
    /// reaches the backend before it knows the client's address.
    fn client_info_pending(&self) -> bool {
        self.sent
            .iter()
            .any(|s| matches!(s, Sent::ProbeCapa | Sent::Xclient))
    }
}

/// Whether a CAPA response lists XCLIENT (a capability line whose first word it is).
fn offers_xclient(capa: &[u8]) -> bool {
    capa.split(|&b| b == b'\n').skip(1).any(|line| {
        line.split(|&b| b == b' ' || b == b'\r')
            .next()
            .is_some_and(|word| word.eq_ignore_ascii_case(b"XCLIENT"))
    })
}

impl ClientEvents for Prelogin {
    type Event = ClientEvent;

    fn may_take_event(&self) -> bool {
        self.may_take_client_event()
    }

    fn parse_event(&mut self) -> Step<ClientEvent> {
        self.rx.next(&self.core.cbuf)
    }

    fn on_cleartext(&mut self, event: ClientEvent) {
        self.cleartext(event);
    }

    fn on_event(&mut self, event: ClientEvent) {
        self.on_client_event(event);
    }
}

impl Machine for Prelogin {
    const PROTOCOL: &'static str = "pop3";

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
        if self.login.is_some() && self.core.phase == Phase::Local {
            return Next::ChargeLogin;
        }
        self.core.next()
    }

    fn login_facts(&self) -> Option<LoginFacts> {
        if self.core.phase != Phase::Connecting {
            return None;
        }
        self.login.as_ref().and_then(HeldLogin::facts)
    }

    fn route_failed(&mut self, failure: RouteFailure) {
        if self.login.is_none() {
            // Nothing held: no routed login to answer.
            self.backend_failed();
            return;
        }
        self.close_backend |= matches!(self.core.phase, Phase::Greeting | Phase::Ready);
        self.abandon_login(failure);
        if self.core.phase == Phase::Local {
            pump_client(self);
        }
    }

    fn backend_failed(&mut self) {
        if self.login.is_some() {
            // Routed, before the login went out: the chosen backend is unavailable.
            self.route_failed(RouteFailure::Unavailable);
            return;
        }
        self.core.to_backend.clear();
        self.core
            .to_client
            .extend_from_slice(&reply::err_unavailable());
        self.core.finish(End::BackendClosed);
    }

    fn take_backend_close(&mut self) -> bool {
        std::mem::take(&mut self.close_backend)
    }

    fn login_charge(&mut self, granted: bool) {
        Prelogin::login_charge(self, granted);
    }

    fn client_input(&mut self, bytes: &[u8]) -> bool {
        Prelogin::client_input(self, bytes)
    }

    fn backend_input(&mut self, bytes: &[u8]) -> bool {
        Prelogin::backend_input(self, bytes)
    }

    fn backend_connected(&mut self) {
        Prelogin::backend_connected(self);
    }

    fn backend_closed(&mut self) {
        Prelogin::backend_closed(self);
    }

    /// POP3 tells the backend nothing about the cipher (it has no ID command).
    fn tls_started(&mut self, _tls: TlsFacts) {
        Prelogin::tls_started(self);
    }

    fn waiting_for_backend(&self) -> bool {
        Prelogin::waiting_for_backend(self)
    }

    fn client_info_warning(problem: crate::client_info::Notice) -> &'static str {
        match problem {
            crate::client_info::Notice::NotOffered => {
                "the backend does not offer XCLIENT (Dovecot: login_trusted_networks must list mailfront); going on without it"
            }
            crate::client_info::Notice::Refused => {
                "the backend refused XCLIENT; sessions are closed with -ERR [SYS/TEMP] until it accepts it"
            }
        }
    }

    fn bye_unavailable(&self) -> Vec<u8> {
        reply::err_unavailable()
    }

    fn bye_idle(&self) -> Vec<u8> {
        reply::err_idle_timeout()
    }

    fn bye_login_timeout(&self) -> Vec<u8> {
        reply::err_login_timeout()
    }

    fn bye_shutdown(&self) -> Vec<u8> {
        reply::err_shutdown()
    }
}

/// The refused command for logs: `USER`, `PASS`, `APOP` or `AUTH <MECH>`, never an argument
/// that could be a secret; the bare keyword when the line does not even parse.
fn refused_label(cmd: &Command) -> String {
    Request::parse(cmd)
        .map(|r| r.log_name())
        .unwrap_or_else(|_| String::from_utf8_lossy(&cmd.keyword).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::line::split::CHUNKS;
    use crate::machine::testing::{Step, Throttle, check_charges, play};

    const BACKEND_CAPA: &str =
        "+OK\r\nTOP\r\nUIDL\r\nUSER\r\nSTLS\r\nSASL PLAIN EXTERNAL\r\nPIPELINING\r\n.\r\n";
    /// [`BACKEND_CAPA`] as a client over TLS sees it.
    const SHOWN_CAPA: &str = "+OK\r\nTOP\r\nUIDL\r\nUSER\r\nSASL PLAIN\r\nPIPELINING\r\n.\r\n";

    fn settings(listener: TlsMode) -> Settings {
        Settings {
            listener,
            hostname: "mx.example.test".to_owned(),
            limits: CommandLimits::default(),
            max_commands: 50,
            client_info: None,
            learned_capa: None,
            routed: false,
        }
    }

    fn cleartext() -> Prelogin {
        Prelogin::new(settings(TlsMode::Starttls), false)
    }

    /// An implicit-TLS session whose listener learned nothing yet, connected by its first CAPA:
    /// greeted by mailfront, then the backend's greeting swallowed and its CAPA shown.
    fn greeted() -> Prelogin {
        let mut m = Prelogin::new(settings(TlsMode::Implicit), true);
        assert_eq!(m.next(), Next::Run, "no backend before a command needs it");
        let (client, _) = out(&mut m);
        assert_eq!(client, "+OK mx.example.test ready\r\n");
        m.client_input(b"CAPA\r\n");
        assert_eq!(m.next(), Next::Connect, "nothing learned: CAPA connects");
        m.backend_connected();
        assert!(m.waiting_for_backend());
        m.backend_input(b"+OK [XCLIENT] Dovecot ready <1896.697170952@dbc.example>\r\n");
        assert_eq!(m.next(), Next::Run);
        let (client, backend) = out(&mut m);
        assert_eq!(client, "", "the backend's greeting is swallowed");
        assert_eq!(backend, "CAPA\r\n");
        m.backend_input(BACKEND_CAPA.as_bytes());
        let (client, backend) = out(&mut m);
        assert_eq!(client, SHOWN_CAPA);
        assert_eq!(backend, "");
        assert_eq!(
            m.take_notices(),
            [Notice::BackendPop3Capa(BACKEND_CAPA.as_bytes().to_vec())],
            "learned for the listener's next sessions"
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

    fn user(name: &str) -> Notice {
        Notice::User(name.as_bytes().to_vec())
    }

    fn refused(mechanism: &str) -> Notice {
        Notice::CleartextAuthRefused {
            mechanism: mechanism.to_owned(),
        }
    }

    fn auth(ok: bool, mechanism: &str) -> Notice {
        Notice::Auth {
            verdict: if ok {
                AuthVerdict::Success
            } else {
                AuthVerdict::Failure
            },
            mechanism: mechanism.to_owned(),
            charge: if ok { Charge::Refund } else { Charge::Keep },
        }
    }

    #[test]
    fn the_cleartext_dialogue_is_answered_without_a_backend() {
        let mut m = cleartext();
        assert_eq!(m.next(), Next::Run);
        let (greeting, _) = out(&mut m);
        assert_eq!(greeting, "+OK mx.example.test ready\r\n");
        m.client_input(
            b"CAPA\r\nNOOP\r\nUSER alice\r\nPASS secret\r\nUSER\r\n\
              APOP alice c4c9334bac560ecc979e58001b3e22fb\r\nAUTH plain AGFsaWNlAHNlY3JldA==\r\n\
              AUTH\r\nXCLIENT ADDR=192.0.2.1\r\nSTAT\r\nSTLS now\r\nQUIT\r\nCAPA\r\n",
        );
        let (client, backend) = out(&mut m);
        assert_eq!(backend, "");
        let refusal = "-ERR [AUTH] Cleartext authentication disallowed; issue STLS first\r\n";
        assert_eq!(
            client,
            [
                "+OK Capability list follows\r\nSTLS\r\n.\r\n",
                "-ERR Command not valid before authentication\r\n",
                refusal,
                refusal,
                refusal,
                refusal,
                refusal,
                refusal,
                "-ERR Command not permitted\r\n",
                "-ERR Unknown command\r\n",
                "-ERR STLS takes no arguments\r\n",
                "+OK Logging out\r\n",
            ]
            .concat(),
            "nothing after QUIT is answered"
        );
        assert_eq!(m.next(), Next::End(End::ClientClosed));
        // A bare AUTH is discovery, not an attempt: refused alike, not counted.
        assert_eq!(
            m.take_notices(),
            vec![
                refused("USER"),
                refused("PASS"),
                refused("USER"),
                refused("APOP"),
                refused("AUTH PLAIN"),
            ]
        );
    }

    /// An implicit-TLS session of a listener that learned its backend's CAPA.
    fn learned() -> Prelogin {
        let settings = Settings {
            learned_capa: Some(BACKEND_CAPA.as_bytes().to_vec()),
            ..settings(TlsMode::Implicit)
        };
        let mut m = Prelogin::new(settings, true);
        assert_eq!(out(&mut m).0, "+OK mx.example.test ready\r\n");
        m
    }

    #[test]
    fn over_tls_everything_but_a_login_is_answered_without_a_backend() {
        let mut m = learned();
        m.client_input(
            b"CAPA\r\nUSER alice\r\nNOOP\r\nRSET\r\nSTLS\r\n\
              APOP alice c4c9334bac560ecc979e58001b3e22fb\r\nXCLIENT ADDR=192.0.2.1\r\n\
              LIST\r\nUSER\r\nAUTH PLAIN !!!\r\nCAPA\r\nQUIT\r\nPASS late\r\n",
        );
        assert_eq!(m.next(), Next::End(End::ClientClosed));
        let (client, backend) = out(&mut m);
        assert_eq!(backend, "");
        assert_eq!(
            client,
            [
                SHOWN_CAPA,
                "+OK\r\n",
                "-ERR Command not valid before authentication\r\n",
                "-ERR Command not valid before authentication\r\n",
                "-ERR Command not permitted when TLS active\r\n",
                "-ERR APOP not available here; use USER/PASS or AUTH\r\n",
                "-ERR Command not permitted\r\n",
                "-ERR Unknown command\r\n",
                "-ERR Missing argument\r\n",
                "-ERR Invalid base64 in the initial response\r\n",
                SHOWN_CAPA,
                "+OK Logging out\r\n",
            ]
            .concat(),
            "the learned CAPA with the TLS view; nothing after QUIT is answered"
        );
        assert_eq!(m.take_notices(), [], "USER names nobody until it goes out");
    }

    #[test]
    fn pass_without_user_is_refused_here() {
        let mut m = learned();
        m.client_input(b"PASS secret\r\n");
        assert_eq!(m.next(), Next::Run, "no connection for it");
        assert_eq!(
            out(&mut m),
            ("-ERR No user name given\r\n".to_owned(), String::new())
        );
    }

    #[test]
    fn the_last_user_goes_out_right_before_pass_and_its_answer_is_swallowed() {
        for user_answer in ["+OK\r\n", "-ERR [AUTH] no such user\r\n"] {
            let mut m = learned();
            m.client_input(b"USER alice\r\nUSER bob\r\nPASS secret\r\nCAPA\r\n");
            assert_eq!(m.next(), Next::Connect, "PASS connects");
            assert_eq!(out(&mut m), ("+OK\r\n+OK\r\n".to_owned(), String::new()));
            m.backend_connected();
            m.backend_input(b"+OK Dovecot ready.\r\n");
            assert_eq!(out(&mut m), (String::new(), "USER bob\r\n".to_owned()));
            m.backend_input(user_answer.as_bytes());
            assert_eq!(m.next(), Next::ChargeLogin, "the held PASS, judged again");
            assert_eq!(out(&mut m), (String::new(), "PASS secret\r\n".to_owned()));
            m.backend_input(b"-ERR [AUTH] Authentication failed.\r\n");
            let (client, backend) = out(&mut m);
            assert_eq!(client, "-ERR [AUTH] Authentication failed.\r\n");
            assert_eq!(
                backend, "CAPA\r\n",
                "now connected: CAPA goes to the backend"
            );
            assert_eq!(
                m.take_notices(),
                vec![user("bob"), auth(false, "PASS")],
                "{user_answer}"
            );
        }
    }

    #[test]
    fn a_user_answered_here_goes_out_before_a_pass_on_a_connection_made_for_capa() {
        let mut m = Prelogin::new(settings(TlsMode::Implicit), true);
        out(&mut m);
        m.client_input(b"USER alice\r\nCAPA\r\nPASS secret\r\n");
        assert_eq!(m.next(), Next::Connect);
        assert_eq!(out(&mut m), ("+OK\r\n".to_owned(), String::new()));
        m.backend_connected();
        m.backend_input(b"+OK ready\r\n");
        assert_eq!(
            out(&mut m),
            (String::new(), "CAPA\r\nUSER alice\r\n".to_owned()),
            "the USER right before its PASS, which waits for its answer"
        );
        m.backend_input(BACKEND_CAPA.as_bytes());
        assert_eq!(out(&mut m), (SHOWN_CAPA.to_owned(), String::new()));
        m.backend_input(b"+OK\r\n");
        assert_eq!(out(&mut m), (String::new(), "PASS secret\r\n".to_owned()));
    }

    #[test]
    fn auth_connects_without_the_remembered_user_and_its_exchange_goes_on() {
        let mut m = learned();
        m.client_input(b"USER alice\r\nAUTH PLAIN\r\n");
        assert_eq!(m.next(), Next::Connect);
        m.backend_connected();
        m.backend_input(b"+OK ready\r\n");
        let (client, backend) = out(&mut m);
        assert_eq!(client, "+OK\r\n");
        assert_eq!(backend, "AUTH PLAIN\r\n", "AUTH names its own user");
        m.backend_input(b"+ \r\n");
        m.client_input(b"AGFsaWNlAHNlY3JldA==\r\n");
        let (client, backend) = out(&mut m);
        assert_eq!(client, "+ \r\n");
        assert_eq!(backend, "AGFsaWNlAHNlY3JldA==\r\n");
        m.backend_input(b"+OK Logged in.\r\n");
        assert_eq!(m.next(), Next::Authenticated);
        assert_eq!(
            m.take_notices(),
            vec![user("alice"), auth(true, "AUTH PLAIN")]
        );

        // A bare AUTH (the mechanism list) connects too.
        let mut m = learned();
        m.client_input(b"AUTH\r\n");
        assert_eq!(m.next(), Next::Connect);
        m.backend_connected();
        m.backend_input(b"+OK ready\r\n");
        assert_eq!(out(&mut m).1, "AUTH\r\n");
    }

    /// Nothing learned yet: CAPA connects, rather than guess a list without the backend's SASL
    /// mechanisms; its answer is what the listener's next sessions are answered with.
    #[test]
    fn capa_connects_while_nothing_is_learned_and_teaches_the_next_sessions() {
        let mut m = Prelogin::new(settings(TlsMode::Implicit), true);
        out(&mut m);
        m.client_input(b"USER a\r\nCAPA\r\n");
        assert_eq!(m.next(), Next::Connect);
        let mut m = greeted();
        m.client_input(b"CAPA\r\n");
        assert_eq!(out(&mut m).1, "CAPA\r\n", "once connected, asked again");
        m.backend_input(b"-ERR no\r\n");
        out(&mut m);
        assert_eq!(m.take_notices(), [], "a refusal teaches nothing");
    }

    #[test]
    fn bare_lf_cr_and_nul_lines_are_refused_and_what_follows_is_gated() {
        let bare_lf = "-ERR Command lines must end with CRLF\r\n";
        let octet = "-ERR CR or NUL not allowed in a command line\r\n";
        let input = b"CAPA\nUSER a\r\nCA\rPA\r\nCA\0PA\r\nUSER b\r\n";
        let mut m = cleartext();
        out(&mut m);
        m.client_input(input);
        let (client, backend) = out(&mut m);
        assert_eq!(backend, "");
        let refusal = "-ERR [AUTH] Cleartext authentication disallowed; issue STLS first\r\n";
        assert_eq!(client, [bare_lf, refusal, octet, octet, refusal].concat());

        let mut m = greeted();
        m.client_input(input);
        let (client, backend) = out(&mut m);
        assert_eq!(client, bare_lf);
        assert_eq!(backend, "USER a\r\nUSER b\r\n");
        // The refusals of the lines after USER a come after its response, in order.
        m.backend_input(b"+OK a\r\n+OK b\r\n");
        assert_eq!(
            out(&mut m).0,
            ["+OK a\r\n", octet, octet, "+OK b\r\n"].concat()
        );
    }

    /// Once connected, a line refused here that was pipelined behind a forwarded command is
    /// answered after that command's response, not before it (RFC 2449 §6.6).
    #[test]
    fn a_local_refusal_waits_for_the_responses_owed_before_it() {
        let mut m = greeted();
        m.client_input(b"CAPA\r\nXCLIENT ADDR=192.0.2.1\r\nNOOP\r\nUSER a\r\nSTLS\r\n");
        let (client, backend) = out(&mut m);
        assert_eq!(client, "", "nothing before CAPA's response");
        assert_eq!(backend, "CAPA\r\nUSER a\r\n");
        m.backend_input(BACKEND_CAPA.as_bytes());
        assert_eq!(
            out(&mut m).0,
            [
                SHOWN_CAPA,
                "-ERR Command not permitted\r\n",
                "-ERR Command not valid before authentication\r\n",
            ]
            .concat()
        );
        m.backend_input(b"+OK\r\n");
        assert_eq!(
            out(&mut m).0,
            "+OK\r\n-ERR Command not permitted when TLS active\r\n"
        );
        assert!(!m.waiting_for_backend());
    }

    /// An implicit-TLS session with `backend_client_info`, connected by the client's `first`
    /// lines and greeted by the backend; what mailfront wrote so far taken.
    fn with_client_info(first: &[u8]) -> Prelogin {
        let mut settings = settings(TlsMode::Implicit);
        settings.client_info = Some("[2001:db8::7]:40000".parse().unwrap());
        let mut m = Prelogin::new(settings, true);
        m.client_input(first);
        assert_eq!(m.next(), Next::Connect);
        assert_eq!(out(&mut m).1, "", "nothing before the backend is connected");
        m.backend_connected();
        m.backend_input(b"+OK Dovecot ready.\r\n");
        m
    }

    #[test]
    fn xclient_goes_first_and_client_commands_wait_for_its_answer() {
        // The client pipelines credentials: USER is answered here, PASS connects.
        let mut m = with_client_info(b"USER alice\r\nPASS secret\r\n");
        let (client, backend) = out(&mut m);
        assert_eq!(client, "", "the backend's greeting is swallowed");
        assert_eq!(
            backend, "CAPA\r\n",
            "mailfront's own CAPA before anything of the client's"
        );
        m.backend_input(b"+OK\r\nTOP\r\nXCLIENT\r\nUSER\r\n.\r\n");
        let (client, backend) = out(&mut m);
        assert_eq!(client, "", "the client never sees mailfront's CAPA");
        assert_eq!(backend, "XCLIENT ADDR=2001:db8::7 PORT=40000\r\n");
        m.backend_input(b"+OK\r\n");
        let (client, backend) = out(&mut m);
        assert_eq!(client, "", "nor the XCLIENT answer");
        assert_eq!(
            backend, "USER alice\r\n",
            "the USER first, PASS after its answer"
        );
        m.backend_input(b"+OK\r\n");
        let (client, backend) = out(&mut m);
        assert_eq!(client, "", "the client had mailfront's +OK to USER");
        assert_eq!(backend, "PASS secret\r\n");
        m.backend_input(b"+OK Logged in.\r\n");
        let (client, _) = out(&mut m);
        assert_eq!(client, "+OK Logged in.\r\n");
        assert_eq!(m.next(), Next::Authenticated);
        assert_eq!(
            m.take_notices(),
            vec![
                Notice::BackendPop3Capa(b"+OK\r\nTOP\r\nXCLIENT\r\nUSER\r\n.\r\n".to_vec()),
                user("alice"),
                auth(true, "PASS"),
            ]
        );
    }

    #[test]
    fn dovecots_xclient_greeting_code_is_enough_and_is_not_shown() {
        let mut settings = settings(TlsMode::Implicit);
        settings.client_info = Some("192.0.2.7:40000".parse().unwrap());
        let mut m = Prelogin::new(settings, true);
        m.client_input(b"CAPA\r\n");
        assert_eq!(m.next(), Next::Connect);
        m.backend_connected();
        m.backend_input(b"+OK [XCLIENT] Dovecot ready.\r\n");
        let (client, backend) = out(&mut m);
        assert_eq!(client, "+OK mx.example.test ready\r\n");
        assert_eq!(
            backend, "XCLIENT ADDR=192.0.2.7 PORT=40000\r\n",
            "no CAPA probe needed"
        );
        m.backend_input(b"+OK\r\n");
        assert_eq!(out(&mut m), (String::new(), "CAPA\r\n".to_owned()));
    }

    #[test]
    fn a_backend_without_xclient_is_noticed_and_the_session_goes_on() {
        let mut m = with_client_info(b"CAPA\r\n");
        out(&mut m);
        m.backend_input(BACKEND_CAPA.as_bytes());
        let (client, backend) = out(&mut m);
        assert_eq!((client.as_str(), backend.as_str()), ("", "CAPA\r\n"));
        assert_eq!(
            m.take_notices(),
            [
                Notice::BackendPop3Capa(BACKEND_CAPA.as_bytes().to_vec()),
                Notice::ClientInfo(ClientInfoNotice::NotOffered)
            ]
        );
    }

    /// All or nothing: a backend that offers XCLIENT and refuses mailfront's would take the
    /// login from mailfront's own address, so the session ends before any client command.
    #[test]
    fn a_backend_refusing_xclient_ends_the_session_before_any_client_command() {
        let mut m = with_client_info(b"USER alice\r\nPASS secret\r\n");
        out(&mut m);
        m.backend_input(b"+OK\r\nXCLIENT\r\n.\r\n");
        m.backend_input(b"-ERR You're not allowed\r\n");
        let (client, backend) = out(&mut m);
        assert_eq!(client, "-ERR [SYS/TEMP] Server temporarily unavailable\r\n");
        assert_eq!(backend, "XCLIENT ADDR=2001:db8::7 PORT=40000\r\n");
        assert_eq!(
            m.take_notices()[1..],
            [Notice::ClientInfo(ClientInfoNotice::Refused)]
        );
        assert_eq!(m.next(), Next::End(End::BackendUnavailable));
    }

    #[test]
    fn stls_drops_what_was_pipelined_after_it_and_connects_only_then() {
        let mut m = cleartext();
        out(&mut m);
        m.client_input(b"CAPA\r\nSTLS\r\nUSER evil\r\nPASS secret\r\n");
        let (client, backend) = out(&mut m);
        assert_eq!(
            client,
            "+OK Capability list follows\r\nSTLS\r\n.\r\n+OK Begin TLS negotiation\r\n"
        );
        assert_eq!(backend, "");
        assert_eq!(m.next(), Next::StartTls);
        assert!(!m.wants_client_input(1 << 20));
        assert_eq!(
            m.take_notices(),
            vec![Notice::PipelinedAfterStartTls { octets: 24 }],
            "the dropped USER was never seen"
        );
        Machine::tls_started(&mut m, crate::machine::testing::tls13());
        assert_eq!(m.next(), Next::Run, "no backend until a command needs it");
        m.client_input(b"CAPA\r\n");
        assert_eq!(
            m.next(),
            Next::Connect,
            "nothing learned yet: CAPA connects"
        );
        m.backend_connected();
        m.backend_input(b"+OK Dovecot ready <1.2@backend>\r\n");
        // The backend's greeting is not shown: the client had ours (RFC 2595 §4).
        assert_eq!(out(&mut m), (String::new(), "CAPA\r\n".to_owned()));
        m.backend_input(BACKEND_CAPA.as_bytes());
        assert_eq!(
            out(&mut m).0,
            "+OK\r\nTOP\r\nUIDL\r\nUSER\r\nSASL PLAIN\r\nPIPELINING\r\n.\r\n",
            "STLS and EXTERNAL hidden over TLS"
        );
        // The client never saw the backend's timestamp, so APOP cannot be right.
        m.client_input(b"APOP alice c4c9334bac560ecc979e58001b3e22fb\r\nSTLS\r\n");
        let (client, backend) = out(&mut m);
        assert_eq!(
            client,
            "-ERR APOP not available here; use USER/PASS or AUTH\r\n\
             -ERR Command not permitted when TLS active\r\n"
        );
        assert_eq!(backend, "");
    }

    #[test]
    fn canonical_user_and_pass_reach_the_backend_and_later_bytes_wait_for_the_answer() {
        let mut m = greeted();
        m.client_input(b"user alice\r\npass  two words \r\nLIST\r\nQUIT\r\n");
        let (client, backend) = out(&mut m);
        assert_eq!(client, "");
        assert_eq!(backend, "USER alice\r\nPASS  two words \r\n");
        assert!(m.waiting_for_backend());
        m.backend_input(b"+OK alice\r\n");
        assert_eq!(out(&mut m).0, "+OK alice\r\n");
        assert!(m.waiting_for_backend(), "PASS is unanswered");
        m.backend_input(b"+OK Logged in.\r\n+OK 2 messages");
        assert_eq!(m.next(), Next::Authenticated);
        let (client, backend) = out(&mut m);
        assert_eq!(client, "+OK Logged in.\r\n");
        assert_eq!(backend, "");
        let (held_client, held_backend) = m.held();
        assert_eq!(held_client, b"LIST\r\nQUIT\r\n");
        assert_eq!(held_backend, b"+OK 2 messages");
        assert_eq!(m.take_notices(), vec![user("alice"), auth(true, "PASS")]);
    }

    #[test]
    fn a_failed_pass_keeps_parsing_what_was_held() {
        let mut m = greeted();
        m.client_input(b"USER alice\r\nPASS wrong\r\nCAPA\r\nAUTH\r\n");
        assert_eq!(out(&mut m).1, "USER alice\r\nPASS wrong\r\n");
        m.backend_input(b"+OK\r\n-ERR [AUTH] Authentication failed.\r\n");
        let (client, backend) = out(&mut m);
        assert_eq!(client, "+OK\r\n-ERR [AUTH] Authentication failed.\r\n");
        assert_eq!(backend, "CAPA\r\nAUTH\r\n");
        assert_eq!(m.take_notices(), vec![user("alice"), auth(false, "PASS")]);
        m.backend_input(BACKEND_CAPA.as_bytes());
        m.backend_input(b"+OK\r\nPLAIN\r\nexternal\r\nLOGIN\r\n.\r\n");
        let (client, _) = out(&mut m);
        assert_eq!(
            client,
            "+OK\r\nTOP\r\nUIDL\r\nUSER\r\nSASL PLAIN\r\nPIPELINING\r\n.\r\n\
             +OK\r\nPLAIN\r\nLOGIN\r\n.\r\n"
        );
        assert_eq!(m.next(), Next::Run);
        assert!(!m.waiting_for_backend());
    }

    #[test]
    fn a_throttled_address_gets_sys_temp_and_no_credential_reaches_the_backend() {
        let mut m = greeted();
        let mut throttle = Throttle::new(1, 0);
        let (client, backend) = play(
            &mut m,
            &mut throttle,
            &[
                Step::Client(
                    "USER alice\r\nPASS wrong\r\nPASS again\r\nAPOP alice 0123456789abcdef0123456789abcdef\r\nAUTH PLAIN\r\nUSER bob\r\n",
                ),
                Step::Backend("+OK\r\n-ERR [AUTH] Authentication failed.\r\n"),
            ],
        );
        let throttled = "-ERR [SYS/TEMP] Too many failed logins, try again later\r\n";
        let apop = "-ERR APOP not available here; use USER/PASS or AUTH\r\n";
        assert_eq!(
            client,
            format!("+OK\r\n-ERR [AUTH] Authentication failed.\r\n{throttled}{apop}{throttled}")
        );
        // USER alone is no attempt: it still goes.
        assert_eq!(backend, "USER alice\r\nPASS wrong\r\nUSER bob\r\n");
        assert_eq!(
            throttle.notices,
            vec![
                user("alice"),
                auth(false, "PASS"),
                Notice::AuthThrottled {
                    mechanism: "PASS".to_owned()
                },
                // APOP is refused by the gate, never charged.
                Notice::AuthThrottled {
                    mechanism: "AUTH PLAIN".to_owned()
                },
                user("bob"),
            ]
        );
        assert!(!m.rx.in_sasl(), "a refused AUTH starts no SASL exchange");
    }

    #[test]
    fn a_throttled_pass_pipelined_after_user_is_answered_after_user() {
        let mut m = greeted();
        let mut throttle = Throttle::new(1, 1);
        let (client, backend) = play(
            &mut m,
            &mut throttle,
            &[Step::Client("USER alice\r\nPASS secret\r\nCAPA\r\n")],
        );
        assert_eq!(client, "", "USER's +OK comes first");
        assert_eq!(backend, "USER alice\r\nCAPA\r\n");
        let (client, _) = play(&mut m, &mut throttle, &[Step::Backend("+OK\r\n")]);
        assert_eq!(
            client,
            "+OK\r\n-ERR [SYS/TEMP] Too many failed logins, try again later\r\n"
        );
        let (client, _) = play(&mut m, &mut throttle, &[Step::Backend(BACKEND_CAPA)]);
        assert!(client.starts_with("+OK\r\nTOP\r\n"));
        assert!(!m.waiting_for_backend());
    }

    #[test]
    fn a_held_pass_waits_for_its_charge_and_nothing_passes_it() {
        let mut m = greeted();
        m.client_input(b"PASS p\r\nNOOP\r\n");
        assert_eq!(m.next(), Next::ChargeLogin);
        assert_eq!(m.take_to_backend(), b"", "nothing before the charge");
        m.login_charge(true);
        assert_eq!(m.take_to_backend(), b"PASS p\r\n");
        m.login_charge(true);
        assert_eq!(m.take_to_backend(), b"", "NOOP waits for the verdict");
        assert_eq!(m.next(), Next::Run);
    }

    /// Every POP3 login path against the charge it leaves: `charged` counts what stays charged
    /// after the steps (a login still with the backend included: the client may hang up now).
    #[test]
    fn every_login_path_is_charged_when_sent_and_refunded_only_without_a_wrong_guess() {
        struct Case {
            name: &'static str,
            limit: u32,
            already: u32,
            steps: &'static [Step],
            charged: u32,
            refused: u32,
            reached: &'static [&'static str],
            never: &'static [&'static str],
        }
        use Step::{Backend as B, BackendClosed, Client as C};
        const FAILED: &str = "-ERR [AUTH] Authentication failed.\r\n";
        let cases = [
            Case {
                name: "USER alone is never charged",
                limit: 1,
                already: 1,
                steps: &[C("USER alice\r\n"), B("+OK\r\n")],
                charged: 1,
                refused: 0,
                reached: &["USER alice"],
                never: &[],
            },
            Case {
                name: "PASS refused keeps its charge",
                limit: 3,
                already: 0,
                steps: &[
                    C("USER u\r\n"),
                    B("+OK\r\n"),
                    C("PASS wrong\r\n"),
                    B(FAILED),
                ],
                charged: 1,
                refused: 0,
                reached: &["PASS wrong"],
                never: &[],
            },
            Case {
                name: "PASS accepted is refunded",
                limit: 3,
                already: 0,
                steps: &[
                    C("USER u\r\nPASS secret\r\n"),
                    B("+OK\r\n+OK Logged in.\r\n"),
                ],
                charged: 0,
                refused: 0,
                reached: &["PASS secret"],
                never: &[],
            },
            Case {
                name: "a hang-up before the verdict keeps the charge",
                limit: 3,
                already: 0,
                steps: &[C("USER u\r\nPASS wrong\r\n"), B("+OK\r\n")],
                charged: 1,
                refused: 0,
                reached: &["PASS wrong"],
                never: &[],
            },
            Case {
                name: "a backend that closes mid-login keeps the charge",
                limit: 3,
                already: 0,
                steps: &[C("USER u\r\nPASS wrong\r\n"), B("+OK\r\n"), BackendClosed],
                charged: 1,
                refused: 0,
                reached: &["PASS wrong"],
                never: &[],
            },
            Case {
                name: "APOP is refused by the gate, never charged",
                limit: 3,
                already: 0,
                steps: &[C("APOP alice 0123456789abcdef0123456789abcdef\r\n")],
                charged: 0,
                refused: 0,
                reached: &[],
                never: &["APOP"],
            },
            Case {
                name: "AUTH with an initial response refused keeps",
                limit: 3,
                already: 0,
                steps: &[C("AUTH PLAIN AHUAd3Jvbmc=\r\n"), B(FAILED)],
                charged: 1,
                refused: 0,
                reached: &["AHUAd3Jvbmc="],
                never: &[],
            },
            Case {
                name: "AUTH in steps refused keeps",
                limit: 3,
                already: 0,
                steps: &[
                    C("AUTH PLAIN\r\n"),
                    B("+ \r\n"),
                    C("AHUAd3Jvbmc=\r\n"),
                    B(FAILED),
                ],
                charged: 1,
                refused: 0,
                reached: &["AHUAd3Jvbmc="],
                never: &[],
            },
            Case {
                name: "AUTH in steps accepted is refunded",
                limit: 3,
                already: 0,
                steps: &[
                    C("AUTH PLAIN\r\n"),
                    B("+ \r\n"),
                    C("AHUAc2VjcmV0\r\n"),
                    B("+OK in\r\n"),
                ],
                charged: 0,
                refused: 0,
                reached: &["AHUAc2VjcmV0"],
                never: &[],
            },
            Case {
                name: "AUTH cancelled by the client is refunded",
                limit: 3,
                already: 0,
                steps: &[
                    C("AUTH PLAIN\r\n"),
                    B("+ \r\n"),
                    C("*\r\n"),
                    B("-ERR cancelled\r\n"),
                ],
                charged: 0,
                refused: 0,
                reached: &["*\r\n"],
                never: &[],
            },
            Case {
                name: "a line that is not base64 cancels, and is refunded",
                limit: 3,
                already: 0,
                steps: &[
                    C("AUTH PLAIN\r\n"),
                    B("+ \r\n"),
                    C("not base64!\r\n"),
                    B("-ERR cancelled\r\n"),
                ],
                charged: 0,
                refused: 0,
                reached: &["*\r\n"],
                never: &["not base64"],
            },
            Case {
                name: "a hang-up inside the exchange keeps the charge",
                limit: 3,
                already: 0,
                steps: &[C("AUTH PLAIN\r\n"), B("+ \r\n")],
                charged: 1,
                refused: 0,
                reached: &["AUTH PLAIN"],
                never: &[],
            },
            Case {
                name: "pipelined attempts past the limit never go out",
                limit: 2,
                already: 0,
                steps: &[
                    C("USER u\r\nPASS w1\r\nPASS w2\r\nPASS w3\r\nAUTH PLAIN AHUAdzQ=\r\n"),
                    B("+OK\r\n"),
                    B(FAILED),
                    B(FAILED),
                ],
                charged: 2,
                refused: 2,
                reached: &["w1", "w2"],
                never: &["w3", "AHUAdzQ="],
            },
            Case {
                name: "a refund frees the place for the next pipelined attempt",
                limit: 1,
                already: 0,
                steps: &[
                    C("AUTH PLAIN\r\n"),
                    B("+ \r\n"),
                    C("*\r\nPASS w2\r\n"),
                    B("-ERR cancelled\r\n"),
                ],
                charged: 1,
                refused: 0,
                reached: &["PASS w2"],
                never: &[],
            },
            Case {
                name: "AUTH without a mechanism (the list) is never charged",
                limit: 1,
                already: 1,
                steps: &[C("AUTH\r\n"), B("+OK\r\nPLAIN\r\n.\r\n")],
                charged: 1,
                refused: 0,
                reached: &["AUTH\r\n"],
                never: &[],
            },
        ];
        for case in cases {
            let mut m = greeted();
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
        let (_, backend) = play(
            &mut m,
            &mut throttle,
            &[Step::Client("USER u\r\nPASS p\r\nAUTH PLAIN AHUAcA==\r\n")],
        );
        assert_eq!(backend, "");
        assert_eq!((throttle.charged, throttle.refused), (0, 0));
    }

    #[test]
    fn auth_forwards_one_checked_line_per_continuation() {
        let mut m = greeted();
        m.client_input(b"AUTH PLAIN\r\nAGFsaWNlAHNlY3JldA==\r\nXCLIENT ADDR=192.0.2.1\r\n");
        assert_eq!(out(&mut m).1, "AUTH PLAIN\r\n", "no SASL line before a +");
        assert!(m.waiting_for_backend());
        m.backend_input(b"+ \r\n");
        let (client, backend) = out(&mut m);
        assert_eq!(client, "+ \r\n");
        assert_eq!(backend, "AGFsaWNlAHNlY3JldA==\r\n");
        assert!(m.waiting_for_backend());
        // The pipelined XCLIENT is a SASL line as far as the backend is concerned: not base64,
        // so it goes as a cancel if the backend asks for more.
        m.backend_input(b"+ \r\n");
        assert_eq!(out(&mut m).1, "*\r\n");
        m.backend_input(b"-ERR [AUTH] cancelled\r\n");
        assert_eq!(out(&mut m).0, "-ERR [AUTH] cancelled\r\n");
        // Cancelled: no credential was checked, the charge goes back. The first line named
        // the user.
        assert_eq!(
            m.take_notices(),
            vec![
                user("alice"),
                Notice::Auth {
                    verdict: AuthVerdict::Failure,
                    mechanism: "AUTH PLAIN".to_owned(),
                    charge: Charge::Refund,
                }
            ]
        );
        assert_eq!(m.next(), Next::Run);
        // Back to commands.
        m.client_input(b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\nNOOP\r\n");
        assert_eq!(out(&mut m).1, "AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n");
        m.backend_input(b"+OK Logged in.\r\n");
        assert_eq!(m.next(), Next::Authenticated);
        assert_eq!(m.held(), (b"NOOP\r\n".to_vec(), Vec::new()));
        assert_eq!(
            m.take_notices(),
            vec![user("alice"), auth(true, "AUTH PLAIN")]
        );
    }

    /// The close line's `user`: USER's and APOP's name, and what AUTH's first response
    /// carries, with an initial response or on the first line after the backend's `+`.
    #[test]
    fn user_and_auth_name_the_user_on_the_close_line() {
        use base64::Engine as _;
        let b64 = |raw: &[u8]| base64::engine::general_purpose::STANDARD.encode(raw);
        let users = |m: &mut Prelogin| {
            out(m);
            m.take_notices()
                .into_iter()
                .filter(|n| matches!(n, Notice::User(_)))
                .collect::<Vec<_>>()
        };
        let failed = b"-ERR [AUTH] Authentication failed.\r\n";
        let mut m = greeted();

        // APOP never goes out (no timestamp to digest), so it names nobody.
        m.client_input(b"APOP carol c4c9334bac560ecc979e58001b3e22fb\r\n");
        assert_eq!(users(&mut m), []);

        let ir = b64(b"user=dave@example.com\x01auth=Bearer token\x01\x01");
        m.client_input(format!("AUTH XOAUTH2 {ir}\r\n").as_bytes());
        assert_eq!(users(&mut m), [user("dave@example.com")]);
        m.backend_input(failed);

        // No initial response: the first line names the user, later lines never do.
        m.client_input(b"AUTH SCRAM-SHA-1\r\n");
        assert_eq!(users(&mut m), []);
        m.backend_input(b"+ \r\n");
        m.client_input(format!("{}\r\n", b64(b"n,,n=erin,r=nonce")).as_bytes());
        assert_eq!(users(&mut m), [user("erin")]);
        m.backend_input(b"+ c2VydmVyLWZpcnN0\r\n");
        m.client_input(format!("{}\r\n", b64(b"c=biws,r=nonce,n=mallory")).as_bytes());
        assert_eq!(users(&mut m), []);
        m.backend_input(failed);

        // LOGIN: the answer to `Username:`; the password line is never decoded.
        m.client_input(b"AUTH LOGIN\r\n");
        assert_eq!(users(&mut m), []);
        m.backend_input(b"+ VXNlcm5hbWU6\r\n");
        m.client_input(format!("{}\r\n", b64(b"frank")).as_bytes());
        assert_eq!(users(&mut m), [user("frank")]);
        m.backend_input(b"+ UGFzc3dvcmQ6\r\n");
        m.client_input(format!("{}\r\n", b64(b"hunter2")).as_bytes());
        assert_eq!(users(&mut m), []);
        m.backend_input(failed);

        // An AUTH answered before its first line leaves nothing for the next exchange.
        m.client_input(b"AUTH SCRAM-SHA-1\r\n");
        assert_eq!(users(&mut m), []);
        m.backend_input(failed);
        m.client_input(b"AUTH PLAIN =\r\n");
        assert_eq!(users(&mut m), []);
        m.backend_input(b"+ \r\n");
        m.client_input(format!("{}\r\n", b64(b"n,,n=grace,r=x")).as_bytes());
        assert_eq!(
            users(&mut m),
            [],
            "not the first line of the SCRAM exchange"
        );
        m.backend_input(failed);
        assert_eq!(m.next(), Next::Run);
    }

    #[test]
    fn an_over_long_sasl_line_ends_the_session() {
        let mut m = Prelogin::new(
            Settings {
                limits: CommandLimits {
                    command: 64,
                    sasl_line: 16,
                },
                ..settings(TlsMode::Implicit)
            },
            true,
        );
        m.client_input(b"AUTH PLAIN\r\n");
        m.backend_connected();
        m.backend_input(b"+OK ready\r\n");
        assert_eq!(out(&mut m).1, "AUTH PLAIN\r\n");
        m.backend_input(b"+ \r\n");
        out(&mut m);
        m.client_input(&[b'A'; 40]);
        let (client, backend) = out(&mut m);
        assert_eq!(client, "-ERR Command line too long\r\n");
        assert_eq!(backend, "");
        assert!(matches!(m.next(), Next::End(End::ProtocolViolation(_))));
    }

    /// The client had mailfront's greeting, on either listener: a backend refusing service in
    /// its own can only be told as unavailability.
    #[test]
    fn a_refusing_backend_is_reported_as_unavailable() {
        let mut after_stls = cleartext();
        after_stls.client_input(b"STLS\r\n");
        after_stls.tls_started();
        out(&mut after_stls);
        let implicit = Prelogin::new(settings(TlsMode::Implicit), true);
        for mut m in [after_stls, implicit] {
            m.client_input(b"USER a\r\nPASS b\r\n");
            assert_eq!(m.next(), Next::Connect);
            m.backend_connected();
            out(&mut m);
            m.backend_input(b"-ERR [SYS/TEMP] too busy\r\n");
            assert_eq!(
                out(&mut m),
                (
                    "-ERR [SYS/TEMP] Server temporarily unavailable\r\n".to_owned(),
                    String::new()
                )
            );
            assert_eq!(m.next(), Next::End(End::BackendUnavailable));
        }
    }

    #[test]
    fn a_backend_breaking_the_protocol_ends_the_session() {
        let mut m = Prelogin::new(settings(TlsMode::Implicit), true);
        m.client_input(b"CAPA\r\n");
        m.backend_connected();
        out(&mut m);
        m.backend_input(b"* OK IMAP here\r\n");
        assert_eq!(
            out(&mut m).0,
            "-ERR [SYS/TEMP] Server temporarily unavailable\r\n"
        );
        assert!(matches!(m.next(), Next::End(End::BackendProtocol(_))));

        let mut m = greeted();
        m.client_input(b"USER a\r\n");
        m.backend_input(b"+ challenge out of place\r\n");
        assert!(matches!(m.next(), Next::End(End::BackendProtocol(_))));
    }

    #[test]
    fn a_backend_close_is_a_goodbye_only_after_quit() {
        let mut m = Prelogin::new(settings(TlsMode::Implicit), true);
        m.client_input(b"CAPA\r\n");
        m.backend_connected();
        out(&mut m);
        m.backend_closed();
        assert_eq!(
            out(&mut m).0,
            "-ERR [SYS/TEMP] Server temporarily unavailable\r\n",
            "a client waiting for the backend is told"
        );
        assert_eq!(m.next(), Next::End(End::BackendClosed));

        let mut m = greeted();
        m.backend_closed();
        assert_eq!(out(&mut m).0, "");
        assert_eq!(m.next(), Next::End(End::BackendClosed));

        let mut m = greeted();
        m.client_input(b"QUIT\r\n");
        assert_eq!(out(&mut m).1, "QUIT\r\n");
        m.backend_input(b"+OK Logging out\r\n");
        m.backend_closed();
        assert_eq!(out(&mut m).0, "+OK Logging out\r\n");
        assert_eq!(m.next(), Next::End(End::ClientClosed));
    }

    #[test]
    fn the_reply_to_quit_ends_the_session_without_waiting_for_the_backends_close() {
        let mut m = greeted();
        m.client_input(b"QUIT\r\n");
        assert_eq!(out(&mut m).1, "QUIT\r\n");
        m.backend_input(b"+OK Logging out\r\n");
        assert_eq!(m.next(), Next::End(End::ClientClosed));
        assert_eq!(out(&mut m).0, "+OK Logging out\r\n");
        // A refused QUIT (not a reply RFC 1939 allows, but a backend may send it) goes on.
        let mut m = greeted();
        m.client_input(b"QUIT\r\n");
        out(&mut m);
        m.backend_input(b"-ERR not now\r\n");
        assert_eq!(m.next(), Next::Run);
    }

    #[test]
    fn too_many_commands_end_the_session_and_the_count_goes_on_after_stls() {
        let limited = |listener| Settings {
            max_commands: 3,
            client_info: None,
            ..settings(listener)
        };
        let mut m = Prelogin::new(limited(TlsMode::Starttls), false);
        out(&mut m);
        m.client_input(b"CAPA\r\nCAPA\r\nCAPA\r\nCAPA\r\n");
        let (client, _) = out(&mut m);
        assert!(
            client.ends_with(".\r\n-ERR Too many commands before authentication\r\n"),
            "{client}"
        );
        assert!(matches!(m.next(), Next::End(End::ProtocolViolation(_))));

        let mut m = Prelogin::new(limited(TlsMode::Starttls), false);
        m.client_input(b"CAPA\r\nSTLS\r\n");
        m.tls_started();
        out(&mut m);
        m.client_input(b"USER a\r\nBOGUS\r\n");
        let (client, backend) = out(&mut m);
        assert_eq!(backend, "", "no backend yet");
        assert_eq!(
            client,
            "+OK\r\n-ERR Too many commands before authentication\r\n"
        );
        assert!(matches!(m.next(), Next::End(End::ProtocolViolation(_))));
    }

    #[test]
    fn client_lines_wait_for_the_backend_greeting() {
        let mut m = Prelogin::new(settings(TlsMode::Implicit), true);
        out(&mut m);
        m.client_input(b"CAPA\r\n");
        assert_eq!(m.next(), Next::Connect);
        assert!(!m.wants_client_input(100), "nothing read while connecting");
        m.backend_connected();
        assert!(m.wants_client_input(100));
        assert!(
            !m.client_input(b"USER a\r\n"),
            "held bytes do not restart the timer"
        );
        assert_eq!(out(&mut m), (String::new(), String::new()));
        assert!(m.backend_input(b"+OK ready\r\n"));
        let (client, backend) = out(&mut m);
        assert_eq!(client, "");
        assert_eq!(backend, "CAPA\r\nUSER a\r\n", "the held line first");
    }

    #[test]
    fn the_idle_timer_restarts_as_the_driver_did() {
        // Cleartext: only a whole line counts.
        let mut m = cleartext();
        assert!(!m.client_input(b"CA"));
        assert!(m.client_input(b"PA\r\n"));
        // Over TLS with nothing owed: any bytes count.
        let mut m = greeted();
        assert!(m.client_input(b"US"));
        // A login in flight: held bytes do not, backend bytes do, even a partial line.
        assert!(m.client_input(b"ER a\r\nPASS b\r\n"));
        assert_eq!(m.next(), Next::ChargeLogin);
        m.login_charge(true);
        assert!(m.waiting_for_backend());
        assert!(!m.client_input(b"LIST\r\n"));
        assert!(m.backend_input(b"+O"));
        assert!(m.backend_input(b"K\r\n"));
        assert!(m.waiting_for_backend(), "PASS is still unanswered");
        // During AUTH, after a `+` it is the client's turn: the backend owes nothing.
        let mut m = greeted();
        m.client_input(b"AUTH PLAIN\r\n");
        m.login_charge(true);
        assert!(m.backend_input(b"+ \r\n"));
        assert!(!m.waiting_for_backend());
        assert!(!m.backend_input(b"+OK"), "not owed, not a client line");
    }

    #[test]
    fn the_goodbyes_are_pop3_responses() {
        assert_eq!(<Prelogin as Machine>::PROTOCOL, "pop3");
        let m = Prelogin::new(settings(TlsMode::Implicit), true);
        assert_eq!(m.bye_unavailable(), reply::err_unavailable());
        assert_eq!(m.bye_idle(), reply::err_idle_timeout());
        assert_eq!(m.bye_shutdown(), reply::err_shutdown());
        for bye in [m.bye_unavailable(), m.bye_idle(), m.bye_shutdown()] {
            assert!(bye.starts_with(b"-ERR ") && bye.ends_with(b"\r\n"));
        }
        let m = cleartext();
        assert_eq!(m.longest_event(), CommandLimits::default().sasl_line);
    }

    /// A scripted backend: greets, then answers each line mailfront wrote to it.
    fn backend_answer(line: &str) -> &'static str {
        match line {
            "CAPA" => BACKEND_CAPA,
            "AUTH" => "+OK\r\nPLAIN\r\nEXTERNAL\r\n.\r\n",
            "USER alice" => "+OK\r\n",
            "PASS wrong" => "-ERR [AUTH] Authentication failed.\r\n",
            "AUTH PLAIN" => "+ \r\n",
            "*" => "-ERR [AUTH] cancelled\r\n",
            "AGFsaWNlAHdyb25n" => "-ERR [AUTH] Authentication failed.\r\n",
            "PASS secret" => "+OK Logged in.\r\n+OK 2 messages\r\n",
            _ => "-ERR unexpected\r\n",
        }
    }

    /// What a whole session showed each side.
    #[derive(Debug, PartialEq)]
    struct Transcript {
        client: String,
        backend: String,
        notices: Vec<Notice>,
        next: Next,
        /// Held client bytes followed by those not read yet, and held backend bytes.
        relayed: (Vec<u8>, Vec<u8>),
    }

    /// Everything a session writes to either side when the client's bytes come in `chunk`-sized
    /// reads (0 = all at once) and the backend's answers in `chunk`-sized reads too.
    fn transcript(listener: TlsMode, learned: bool, input: &[u8], chunk: usize) -> Transcript {
        let size = |len: usize| if chunk == 0 { len.max(1) } else { chunk };
        let settings = Settings {
            learned_capa: learned.then(|| BACKEND_CAPA.as_bytes().to_vec()),
            ..settings(listener)
        };
        let mut m = Prelogin::new(settings, listener == TlsMode::Implicit);
        let (mut client, mut backend) = (Vec::new(), Vec::new());
        let mut pending_line = Vec::new();
        let feed_backend = |m: &mut Prelogin, bytes: &[u8]| {
            for piece in bytes.chunks(size(bytes.len())) {
                m.backend_input(piece);
            }
        };
        let mut pieces: VecDeque<Vec<u8>> = input
            .chunks(size(input.len()))
            .map(<[u8]>::to_vec)
            .collect();
        loop {
            // Play the driver: write out, act on `next`, then read.
            loop {
                client.extend(m.take_to_client());
                let wrote = m.take_to_backend();
                backend.extend_from_slice(&wrote);
                pending_line.extend_from_slice(&wrote);
                let mut answers = String::new();
                while let Some(pos) = pending_line.windows(2).position(|w| w == b"\r\n") {
                    let line: Vec<u8> = pending_line.drain(..pos + 2).collect();
                    answers.push_str(backend_answer(
                        std::str::from_utf8(&line[..pos]).unwrap_or_default(),
                    ));
                }
                match m.next() {
                    Next::Connect => {
                        m.backend_connected();
                        feed_backend(&mut m, b"+OK Dovecot ready <1.2@backend>\r\n");
                    }
                    Next::StartTls => {
                        // What was pipelined after STLS never reaches the new session.
                        pieces.clear();
                        Machine::tls_started(&mut m, crate::machine::testing::tls13());
                        pieces.extend(
                            b"CAPA\r\nAUTH\r\nUSER alice\r\nPASS wrong\r\nAUTH PLAIN\r\n\
                              AGFsaWNlAHdyb25n\r\nAUTH PLAIN\r\nXCLIENT A=1\r\n\
                              USER alice\r\nPASS secret\r\nLIST\r\n"
                                .chunks(size(128))
                                .map(<[u8]>::to_vec),
                        );
                    }
                    Next::Run if !answers.is_empty() => {
                        feed_backend(&mut m, answers.as_bytes());
                    }
                    Next::ChargeLogin => {
                        m.login_charge(true);
                        feed_backend(&mut m, answers.as_bytes());
                    }
                    _ => break,
                }
            }
            if m.next() != Next::Run {
                break;
            }
            let Some(piece) = pieces.pop_front() else {
                break;
            };
            m.client_input(&piece);
        }
        // What the relay gets: held client bytes then those not read yet; how much of it was
        // read before the login completed depends on the split, the bytes do not.
        let (mut held_client, held_backend) = m.held();
        held_client.extend(pieces.into_iter().flatten());
        Transcript {
            client: String::from_utf8_lossy(&client).into_owned(),
            backend: String::from_utf8_lossy(&backend).into_owned(),
            // How many octets STLS dropped depends on where a read ended, and whether a CAPA
            // was learned before or after a pipelined USER went out on when the backend's
            // answer came; what ran does not.
            notices: m
                .take_notices()
                .into_iter()
                .filter(|n| {
                    !matches!(
                        n,
                        Notice::PipelinedAfterStartTls { .. } | Notice::BackendPop3Capa(_)
                    )
                })
                .collect(),
            next: m.next(),
            relayed: (held_client, held_backend),
        }
    }

    #[test]
    fn what_either_side_sees_does_not_depend_on_how_reads_split() {
        let cleartext_input: &[u8] =
            b"CAPA\r\nUSER alice\r\nNOOP\nPASS x\r\nAUTH PLAIN\r\nSTLS\r\nUSER evil\r\n";
        let implicit_input: &[u8] = b"CAPA\r\nAUTH\r\nUSER alice\r\nPASS wrong\r\n\
              AUTH PLAIN\r\nAGFsaWNlAHdyb25n\r\nAUTH PLAIN\r\nXCLIENT A=1\r\n\
              US\0ER x\r\nUSER alice\r\nPASS secret\r\nLIST\r\n";
        // A listener that learned CAPA answers it here; USER is answered here too and goes out
        // right before PASS, which connects.
        let learned_input: &[u8] = b"CAPA\r\nUSER alice\r\nNOOP\r\nPASS wrong\r\n\
              AUTH PLAIN\r\nAGFsaWNlAHdyb25n\r\nAUTH PLAIN\r\nXCLIENT A=1\r\n\
              US\0ER x\r\nAUTH\r\nUSER alice\r\nPASS secret\r\nLIST\r\n";
        for (listener, learned, input) in [
            (TlsMode::Starttls, false, cleartext_input),
            (TlsMode::Implicit, false, implicit_input),
            (TlsMode::Implicit, true, learned_input),
        ] {
            let whole = transcript(listener, learned, input, 0);
            // The scenario reaches the login, through every kind of exchange.
            assert_eq!(whole.next, Next::Authenticated, "{listener:?} {whole:?}");
            assert!(
                whole.backend.contains("AUTH PLAIN\r\nAGFsaWNlAHdyb25n\r\n"),
                "{whole:?}"
            );
            assert!(whole.backend.contains("AUTH PLAIN\r\n*\r\n"), "{whole:?}");
            assert!(!whole.backend.contains("XCLIENT"), "{whole:?}");
            assert_eq!(
                whole.relayed,
                (b"LIST\r\n".to_vec(), b"+OK 2 messages\r\n".to_vec())
            );
            assert_eq!(
                whole.notices.last(),
                Some(&auth(true, "PASS")),
                "{listener:?} {whole:?}"
            );
            for chunk in CHUNKS {
                assert_eq!(
                    transcript(listener, learned, input, chunk),
                    whole,
                    "{listener:?} chunk {chunk}"
                );
            }
        }
    }

    /// Listeners that route by user (`Settings::routed`): nothing connects before a complete
    /// login, which is held whole, charged, routed, then replayed to the chosen backend.
    mod routed {
        use super::*;

        /// The backend CAPA the listener learned: mechanisms that can be routed and some that
        /// cannot.
        const LEARNED: &str = "+OK\r\nTOP\r\nUIDL\r\nUSER\r\nSTLS\r\n\
            SASL PLAIN CRAM-MD5 LOGIN SCRAM-SHA-256 EXTERNAL GSSAPI\r\nPIPELINING\r\n.\r\n";
        /// [`LEARNED`] as a routed session shows it.
        const SHOWN: &str = "+OK\r\nTOP\r\nUIDL\r\nUSER\r\nSASL PLAIN LOGIN SCRAM-SHA-256\r\n\
            PIPELINING\r\n.\r\n";
        const BUILT_IN: &str = "+OK Capability list follows\r\nUSER\r\n.\r\n";
        const GREETING: &str = "+OK Dovecot ready.\r\n";
        const FAILED: &str = "-ERR [AUTH] Authentication failed.\r\n";
        const UNAVAILABLE: &str = "-ERR [SYS/TEMP] Server temporarily unavailable\r\n";
        /// `\0alice\0secret`.
        const PLAIN_ALICE: &str = "AGFsaWNlAHNlY3JldA==";

        fn session(learned: bool) -> Prelogin {
            let settings = Settings {
                routed: true,
                learned_capa: learned.then(|| LEARNED.as_bytes().to_vec()),
                ..settings(TlsMode::Implicit)
            };
            let mut m = Prelogin::new(settings, true);
            assert_eq!(m.next(), Next::Run, "no backend at the handshake");
            assert_eq!(out(&mut m).0, "+OK mx.example.test ready\r\n");
            m
        }

        /// What a routed test plays, as the driver would.
        #[derive(Debug, Clone)]
        enum R {
            C(&'static str),
            B(&'static str),
            /// The machine says Connect: the driver routes its facts, connects, and the backend
            /// sends this greeting.
            Connect(&'static str),
            /// The machine says Connect: the router (or the connection) fails.
            Fail(RouteFailure),
            Closed,
        }

        #[derive(Debug, Default)]
        struct Seen {
            client: String,
            backend: String,
            /// `login_facts()` at each Connect.
            facts: Vec<LoginFacts>,
            /// How often the machine dropped the backend.
            closes: usize,
        }

        fn facts(user: &str, password: Option<&str>, mechanism: &str) -> LoginFacts {
            LoginFacts {
                user: user.as_bytes().to_vec(),
                password: password.map(|p| zeroize::Zeroizing::new(p.as_bytes().to_vec())),
                mechanism: mechanism.to_owned(),
                helo: None,
            }
        }

        fn refused(text: &str, go_on: bool) -> RouteFailure {
            RouteFailure::Refused {
                text: text.to_owned(),
                smtp_code: None,
                go_on,
            }
        }

        /// Plays `steps` with `throttle` answering every charge; a Connect the steps do not
        /// play is a failure: nothing may connect unseen.
        fn play_routed(m: &mut Prelogin, throttle: &mut Throttle, steps: &[R]) -> Seen {
            let mut seen = Seen::default();
            let drain = |m: &mut Prelogin, throttle: &mut Throttle, seen: &mut Seen| {
                throttle.run(m);
                seen.client
                    .push_str(&String::from_utf8_lossy(&m.take_to_client()));
                seen.backend
                    .push_str(&String::from_utf8_lossy(&m.take_to_backend()));
                seen.closes += usize::from(m.take_backend_close());
            };
            drain(m, throttle, &mut seen);
            for step in steps {
                let connecting = m.next() == Next::Connect;
                match step {
                    R::Connect(_) | R::Fail(_) => {
                        assert!(connecting, "{step:?}: no Connect; {seen:?}");
                        seen.facts.push(m.login_facts().expect("facts at Connect"));
                    }
                    _ => assert!(!connecting, "{step:?} while connecting; {seen:?}"),
                }
                match step {
                    R::C(bytes) => {
                        m.client_input(bytes.as_bytes());
                    }
                    R::B(bytes) => {
                        m.backend_input(bytes.as_bytes());
                    }
                    R::Connect(greeting) => {
                        m.backend_connected();
                        m.backend_input(greeting.as_bytes());
                    }
                    R::Fail(failure) => m.route_failed(failure.clone()),
                    R::Closed => m.backend_closed(),
                }
                drain(m, throttle, &mut seen);
            }
            seen
        }

        fn granted() -> Throttle {
            Throttle::new(10, 0)
        }

        fn auth(verdict: AuthVerdict, mechanism: &str, charge: Charge) -> Notice {
            Notice::Auth {
                verdict,
                mechanism: mechanism.to_owned(),
                charge,
            }
        }

        /// Every command but a complete login is answered here, learned list or not, on 995 and
        /// on 110 after STLS: no Connect, nothing to a backend, no charge.
        #[test]
        fn nothing_but_a_complete_login_connects() {
            let not_yet = "-ERR Command not valid before authentication\r\n";
            let unsupported = "-ERR Unsupported authentication mechanism\r\n";
            let rows: &[(&str, &str)] = &[
                ("USER alice\r\n", "+OK\r\n"),
                ("NOOP\r\n", not_yet),
                ("RSET\r\n", not_yet),
                ("STLS\r\n", "-ERR Command not permitted when TLS active\r\n"),
                (
                    "APOP alice c4c9334bac560ecc979e58001b3e22fb\r\n",
                    "-ERR APOP not available here; use USER/PASS or AUTH\r\n",
                ),
                (
                    "XCLIENT ADDR=192.0.2.1\r\n",
                    "-ERR Command not permitted\r\n",
                ),
                ("LIST\r\n", "-ERR Unknown command\r\n"),
                ("STAT\r\n", "-ERR Unknown command\r\n"),
                ("PASS secret\r\n", "-ERR No user name given\r\n"),
                ("USER\r\n", "-ERR Missing argument\r\n"),
                ("CAPA now\r\n", "-ERR Command takes no arguments\r\n"),
                (
                    "AUTH PLAIN !!!\r\n",
                    "-ERR Invalid base64 in the initial response\r\n",
                ),
                ("AUTH CRAM-MD5\r\n", unsupported),
                ("AUTH DIGEST-MD5\r\n", unsupported),
                ("AUTH EXTERNAL =\r\n", unsupported),
                ("AUTH GSSAPI\r\n", unsupported),
                ("AUTH NTLM TlRMTVNTUAABAAAA\r\n", unsupported),
                ("AUTH PLAIN\r\n", "+ \r\n"),
                ("AUTH SCRAM-SHA-256\r\n", "+ \r\n"),
                ("AUTH LOGIN\r\n", "+ VXNlcm5hbWU6\r\n"),
                ("AUTH LOGIN YWxpY2U=\r\n", "+ UGFzc3dvcmQ6\r\n"),
                ("QUIT\r\n", "+OK Logging out\r\n"),
            ];
            let after_stls = || {
                let settings = Settings {
                    routed: true,
                    ..settings(TlsMode::Starttls)
                };
                let mut m = Prelogin::new(settings, false);
                m.client_input(b"CAPA\r\nSTLS\r\n");
                Machine::tls_started(&mut m, crate::machine::testing::tls13());
                out(&mut m);
                m
            };
            for (name, learned) in [("995", false), ("995 learned", true), ("110", false)] {
                let fresh = || {
                    if name == "110" {
                        after_stls()
                    } else {
                        session(learned)
                    }
                };
                let (capa, list) = if learned {
                    (SHOWN, "+OK\r\nPLAIN\r\nLOGIN\r\nSCRAM-SHA-256\r\n.\r\n")
                } else {
                    (BUILT_IN, "+OK\r\n.\r\n")
                };
                let all = rows
                    .iter()
                    .copied()
                    .chain([("CAPA\r\n", capa), ("AUTH\r\n", list)]);
                for (line, answer) in all {
                    let mut m = fresh();
                    let mut throttle = granted();
                    let seen = play_routed(&mut m, &mut throttle, &[R::C(line)]);
                    assert_eq!(seen.client, answer, "{name}: {line:?}");
                    assert_eq!(seen.backend, "", "{name}: {line:?}");
                    assert_ne!(m.next(), Next::Connect, "{name}: {line:?}");
                    assert_eq!(m.login_facts(), None, "{name}: {line:?}");
                    assert_eq!((throttle.charged, throttle.refused), (0, 0), "{line:?}");
                    assert_eq!(throttle.notices, [], "{name}: {line:?}");
                }
            }
        }

        #[test]
        fn user_and_pass_are_held_then_replayed_to_the_chosen_backend() {
            let mut m = session(true);
            let mut throttle = granted();
            let seen = play_routed(
                &mut m,
                &mut throttle,
                &[
                    R::C("USER alice\r\nPASS secret\r\nLIST\r\n"),
                    R::Connect(GREETING),
                    R::B("+OK\r\n"),
                    R::B("+OK Logged in.\r\n+OK 2 messages"),
                ],
            );
            assert_eq!(seen.client, "+OK\r\n+OK Logged in.\r\n");
            assert_eq!(seen.backend, "USER alice\r\nPASS secret\r\n");
            assert_eq!(seen.facts, [facts("alice", Some("secret"), "USER")]);
            assert_eq!(m.next(), Next::Authenticated);
            assert_eq!(m.held(), (b"LIST\r\n".to_vec(), b"+OK 2 messages".to_vec()));
            assert_eq!(
                throttle.notices,
                [
                    user("alice"),
                    auth(AuthVerdict::Success, "PASS", Charge::Refund)
                ]
            );
            assert_eq!(throttle.charged, 0);
        }

        /// AUTH goes out without an initial response whatever the client sent (the backend
        /// may lack SASL-IR), and each held response answers one continuation the client
        /// never sees.
        #[test]
        fn auth_plain_with_and_without_an_initial_response() {
            let with_ir: &[R] = &[R::C("AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\nLIST\r\n")];
            let without: &[R] = &[
                R::C("AUTH PLAIN\r\n"),
                R::C("AGFsaWNlAHNlY3JldA==\r\nLIST\r\n"),
            ];
            for (first, challenge) in [(with_ir, ""), (without, "+ \r\n")] {
                let mut m = session(false);
                let mut throttle = granted();
                let mut steps = first.to_vec();
                steps.extend([
                    R::Connect(GREETING),
                    R::B("+ \r\n"),
                    R::B("+OK Logged in.\r\n"),
                ]);
                let seen = play_routed(&mut m, &mut throttle, &steps);
                assert_eq!(seen.client, format!("{challenge}+OK Logged in.\r\n"));
                assert_eq!(seen.backend, format!("AUTH PLAIN\r\n{PLAIN_ALICE}\r\n"));
                assert_eq!(seen.facts, [facts("alice", Some("secret"), "PLAIN")]);
                assert_eq!(m.next(), Next::Authenticated);
                assert_eq!(m.held().0, b"LIST\r\n");
                assert_eq!(
                    throttle.notices,
                    [
                        user("alice"),
                        auth(AuthVerdict::Success, "AUTH PLAIN", Charge::Refund)
                    ]
                );
            }
        }

        /// LOGIN: mailfront sends `Username:` and `Password:` itself and holds both answers
        /// (an initial response is the user name), then answers the backend's own two.
        #[test]
        fn auth_login_plays_both_challenges_here() {
            let in_steps: &[R] = &[
                R::C("AUTH LOGIN\r\n"),
                R::C("YWxpY2U=\r\n"),
                R::C("c2VjcmV0\r\n"),
            ];
            let with_ir: &[R] = &[R::C("AUTH LOGIN YWxpY2U=\r\n"), R::C("c2VjcmV0\r\n")];
            for (first, challenges) in [
                (in_steps, "+ VXNlcm5hbWU6\r\n+ UGFzc3dvcmQ6\r\n"),
                (with_ir, "+ UGFzc3dvcmQ6\r\n"),
            ] {
                let mut m = session(true);
                let mut throttle = granted();
                let mut steps = first.to_vec();
                steps.extend([
                    R::Connect(GREETING),
                    R::B("+ VXNlcm5hbWU6\r\n"),
                    R::B("+ UGFzc3dvcmQ6\r\n"),
                    R::B("+OK Logged in.\r\n"),
                ]);
                let seen = play_routed(&mut m, &mut throttle, &steps);
                assert_eq!(seen.client, format!("{challenges}+OK Logged in.\r\n"));
                assert_eq!(seen.backend, "AUTH LOGIN\r\nYWxpY2U=\r\nc2VjcmV0\r\n");
                assert_eq!(seen.facts, [facts("alice", Some("secret"), "LOGIN")]);
                assert_eq!(m.next(), Next::Authenticated);
            }
        }

        /// SCRAM: the client-first message is held; the backend's server-first is the client's
        /// to answer, and the exchange relays from there as without routing.
        #[test]
        fn auth_scram_holds_the_first_message_and_relays_the_rest() {
            const CLIENT_FIRST: &str = "biwsbj1hbGljZSxyPXJPcHJOR2Z3RWJlUldnYk5Fa3FP";
            const SERVER_FIRST: &str = "+ cj1yT3ByTkdmd0ViZVJXZ2JORWtxTyVodllEcFdVYTJSYVRDQWZ1eEZJbGopaE5sRiRrMCxzPVcyMlphSjBTTlk3c29Fc1VFamI2Z1E9PSxpPTQwOTY=\r\n";
            const CLIENT_FINAL: &str = "Yz1iaXdzLHI9ck9wck5HZndFYmVSV2diTkVrcU8laHZZRHBXVWEyUmFUQ0FmdXhGSWxqKWhObEYkazAscD1kSHpiWmFwV0lrNGpVaE4rVXRlOXl0YWc5empmTUhnc3FtbWl6N0FuZFZRPQ==\r\n";
            const SERVER_FINAL: &str =
                "+ dj02cnJpVFJCaTIzV3BSUi93dHVwK21NaFVaVW4vZEI1bkxUSlJzamw5NUc0PQ==\r\n";
            let mut m = session(true);
            let mut throttle = granted();
            let seen = play_routed(
                &mut m,
                &mut throttle,
                &[
                    R::C("AUTH SCRAM-SHA-256\r\n"),
                    R::C("biwsbj1hbGljZSxyPXJPcHJOR2Z3RWJlUldnYk5Fa3FP\r\n"),
                    R::Connect(GREETING),
                    R::B("+ \r\n"),
                    R::B(SERVER_FIRST),
                    R::C(CLIENT_FINAL),
                    R::B(SERVER_FINAL),
                    R::C("\r\n"),
                    R::B("+OK Logged in.\r\n"),
                ],
            );
            assert_eq!(
                seen.client,
                format!("+ \r\n{SERVER_FIRST}{SERVER_FINAL}+OK Logged in.\r\n")
            );
            assert_eq!(
                seen.backend,
                format!("AUTH SCRAM-SHA-256\r\n{CLIENT_FIRST}\r\n{CLIENT_FINAL}\r\n")
            );
            assert_eq!(seen.facts, [facts("alice", None, "SCRAM-SHA-256")]);
            assert_eq!(m.next(), Next::Authenticated);
            assert_eq!(
                throttle.notices,
                [
                    user("alice"),
                    auth(AuthVerdict::Success, "AUTH SCRAM-SHA-256", Charge::Refund)
                ]
            );
        }

        /// `*` at one of mailfront's challenges, or a line that is not base64, ends the AUTH
        /// here: no backend, no charge, and commands parse again.
        #[test]
        fn a_cancel_or_a_bad_response_ends_the_exchange_here() {
            let cancelled = "-ERR Authentication cancelled\r\n";
            let invalid = "-ERR Invalid base64 in the response\r\n";
            let cases: &[(&[&str], &str)] = &[
                (&["AUTH PLAIN\r\n", "*\r\n"], "+ \r\n"),
                (
                    &["AUTH LOGIN\r\n", "YWxpY2U=\r\n", "*\r\n"],
                    "+ VXNlcm5hbWU6\r\n+ UGFzc3dvcmQ6\r\n",
                ),
                (&["AUTH SCRAM-SHA-1\r\n", "*\r\n"], "+ \r\n"),
            ];
            for (lines, challenges) in cases {
                for (last, answer) in [(None, cancelled), (Some("not base64!\r\n"), invalid)] {
                    let mut m = session(true);
                    let mut throttle = granted();
                    let mut steps: Vec<R> = lines.iter().copied().map(R::C).collect();
                    if let Some(bad) = last {
                        steps.pop();
                        steps.push(R::C(bad));
                    }
                    steps.push(R::C("CAPA\r\n"));
                    let seen = play_routed(&mut m, &mut throttle, &steps);
                    assert_eq!(
                        seen.client,
                        format!("{challenges}{answer}{SHOWN}"),
                        "{lines:?}"
                    );
                    assert_eq!(seen.backend, "");
                    assert_eq!((throttle.charged, throttle.notices.len()), (0, 0));
                    assert_eq!(m.next(), Next::Run);
                }
            }
        }

        /// A login whose user name cannot be read is a failed login, charged, never routed.
        #[test]
        fn a_login_without_a_readable_user_fails_here_and_is_charged() {
            for line in [
                // PLAIN with one NUL.
                "AUTH PLAIN AGFsaWNl\r\n",
                "AUTH PLAIN =\r\n",
                // OAUTHBEARER without `a=`.
                "AUTH OAUTHBEARER biwsAWF1dGg9QmVhcmVyIHgBAQ==\r\n",
                "AUTH LOGIN =\r\n",
            ] {
                let mut m = session(true);
                let mut throttle = granted();
                let seen = play_routed(&mut m, &mut throttle, &[R::C(line), R::C("c2VjcmV0\r\n")]);
                let challenge = if line.starts_with("AUTH LOGIN") {
                    "+ UGFzc3dvcmQ6\r\n"
                } else {
                    ""
                };
                let after = if challenge.is_empty() {
                    // Not in an exchange any more: the next line is a command.
                    "-ERR Unknown command\r\n"
                } else {
                    ""
                };
                assert_eq!(
                    seen.client,
                    format!("{challenge}-ERR [AUTH] Authentication failed\r\n{after}"),
                    "{line:?}"
                );
                assert_eq!(seen.backend, "");
                assert_eq!(throttle.charged, 1, "{line:?}");
                let label = if line.contains("OAUTHBEARER") {
                    "AUTH OAUTHBEARER"
                } else if line.contains("LOGIN") {
                    "AUTH LOGIN"
                } else {
                    "AUTH PLAIN"
                };
                assert_eq!(
                    throttle.notices,
                    [auth(AuthVerdict::Failure, label, Charge::Keep)]
                );
                assert_eq!(m.next(), Next::Run);
            }
        }

        #[test]
        fn a_lookup_refusal_goes_on_with_what_was_pipelined_when_told_to() {
            let mut m = session(true);
            let mut throttle = granted();
            let seen = play_routed(
                &mut m,
                &mut throttle,
                &[
                    R::C("USER alice\r\nPASS secret\r\nUSER bob\r\nPASS pw\r\n"),
                    R::Fail(refused("Account disabled\r\nQUIT", true)),
                    R::Connect(GREETING),
                    R::B("+OK\r\n"),
                    R::B("+OK Logged in.\r\n"),
                ],
            );
            assert_eq!(
                seen.client, "+OK\r\n-ERR [AUTH] Account disabledQUIT\r\n+OK\r\n+OK Logged in.\r\n",
                "the text kept to printable ASCII"
            );
            assert_eq!(seen.backend, "USER bob\r\nPASS pw\r\n");
            assert_eq!(
                seen.facts,
                [
                    facts("alice", Some("secret"), "USER"),
                    facts("bob", Some("pw"), "USER")
                ]
            );
            assert_eq!(
                throttle.notices,
                [
                    user("alice"),
                    auth(AuthVerdict::Failure, "PASS", Charge::Keep),
                    user("bob"),
                    auth(AuthVerdict::Success, "PASS", Charge::Refund),
                ]
            );
            assert_eq!(throttle.charged, 1, "the refusal stays charged");
            assert_eq!(m.next(), Next::Authenticated);
        }

        #[test]
        fn a_lookup_refusal_without_wait_ends_the_session() {
            let mut m = session(true);
            let mut throttle = granted();
            let seen = play_routed(
                &mut m,
                &mut throttle,
                &[
                    R::C("AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\nUSER bob\r\n"),
                    R::Fail(refused("Go away", false)),
                ],
            );
            assert_eq!(seen.client, "-ERR [AUTH] Go away\r\n");
            assert_eq!(seen.backend, "");
            assert_eq!(m.next(), Next::End(End::LoginRefused));
            assert_eq!(
                throttle.notices,
                [
                    user("alice"),
                    auth(AuthVerdict::Failure, "AUTH PLAIN", Charge::Keep)
                ]
            );
            assert_eq!(throttle.charged, 1);
        }

        /// No backend now is a temporary failure, refunded, and the session goes on: the next
        /// login is routed again with its own facts.
        #[test]
        fn unavailable_is_temporary_and_the_next_login_is_routed_again() {
            let mut m = session(true);
            let mut throttle = granted();
            let seen = play_routed(
                &mut m,
                &mut throttle,
                &[
                    R::C("USER alice\r\nPASS secret\r\n"),
                    R::Fail(RouteFailure::Unavailable),
                    R::C("AUTH LOGIN\r\n"),
                    R::C("Ym9i\r\n"),
                    R::C("cHc=\r\n"),
                    R::Connect(GREETING),
                    R::B("+ VXNlcm5hbWU6\r\n"),
                    R::B("+ UGFzc3dvcmQ6\r\n"),
                    R::B(FAILED),
                ],
            );
            assert_eq!(
                seen.client,
                format!("+OK\r\n{UNAVAILABLE}+ VXNlcm5hbWU6\r\n+ UGFzc3dvcmQ6\r\n{FAILED}")
            );
            assert_eq!(seen.backend, "AUTH LOGIN\r\nYm9i\r\ncHc=\r\nQUIT\r\n");
            assert_eq!(
                seen.facts,
                [
                    facts("alice", Some("secret"), "USER"),
                    facts("bob", Some("pw"), "LOGIN")
                ]
            );
            assert_eq!(
                throttle.notices,
                [
                    user("alice"),
                    auth(AuthVerdict::NotCompleted, "PASS", Charge::Refund),
                    user("bob"),
                    auth(AuthVerdict::Failure, "AUTH LOGIN", Charge::Keep),
                ]
            );
            assert_eq!(throttle.charged, 1);
            assert_eq!(seen.closes, 1, "the refusing backend is dropped");
            assert_eq!(m.next(), Next::Run);
        }

        /// A refused login leaves no backend behind: QUIT, dropped, and the next login (another
        /// user, maybe elsewhere) is routed afresh.
        #[test]
        fn a_login_the_backend_refuses_drops_it_and_the_next_is_routed_afresh() {
            let mut m = session(true);
            let mut throttle = granted();
            let seen = play_routed(
                &mut m,
                &mut throttle,
                &[
                    R::C("USER alice\r\nPASS wrong\r\n"),
                    R::Connect(GREETING),
                    R::B("+OK\r\n"),
                    R::B(FAILED),
                    R::C("CAPA\r\nUSER bob\r\nPASS secret\r\n"),
                    R::Connect("+OK other backend\r\n"),
                    R::B("+OK\r\n"),
                    R::B("+OK Logged in.\r\n"),
                ],
            );
            assert_eq!(
                seen.client,
                format!("+OK\r\n{FAILED}{SHOWN}+OK\r\n+OK Logged in.\r\n"),
                "CAPA answered here again, with no backend"
            );
            assert_eq!(
                seen.backend,
                "USER alice\r\nPASS wrong\r\nQUIT\r\nUSER bob\r\nPASS secret\r\n"
            );
            assert_eq!(seen.closes, 1);
            assert_eq!(
                seen.facts,
                [
                    facts("alice", Some("wrong"), "USER"),
                    facts("bob", Some("secret"), "USER")
                ]
            );
            assert_eq!(m.next(), Next::Authenticated);
            assert_eq!(throttle.charged, 1);
        }

        /// The same when the refusal and the next login were pipelined together.
        #[test]
        fn a_pipelined_second_login_waits_for_the_refusal_then_reroutes() {
            let mut m = session(true);
            let mut throttle = granted();
            let seen = play_routed(
                &mut m,
                &mut throttle,
                &[
                    R::C("AUTH PLAIN AGFsaWNlAHdyb25n\r\nAUTH PLAIN AGJvYgBwdw==\r\n"),
                    R::Connect(GREETING),
                    R::B("+ \r\n"),
                    R::B(FAILED),
                    R::Connect(GREETING),
                ],
            );
            assert_eq!(seen.client, FAILED);
            assert_eq!(
                seen.backend,
                "AUTH PLAIN\r\nAGFsaWNlAHdyb25n\r\nQUIT\r\nAUTH PLAIN\r\n"
            );
            assert_eq!(
                seen.facts,
                [
                    facts("alice", Some("wrong"), "PLAIN"),
                    facts("bob", Some("pw"), "PLAIN")
                ]
            );
            assert_eq!(seen.closes, 1);
            assert!(m.waiting_for_backend());
        }

        /// The backend answers AUTH with a completion instead of a continuation: that is the
        /// answer to the client's AUTH, and the held response never goes out.
        #[test]
        fn a_completion_instead_of_a_continuation_answers_the_login() {
            let mut m = session(true);
            let mut throttle = granted();
            let seen = play_routed(
                &mut m,
                &mut throttle,
                &[
                    R::C("AUTH PLAIN\r\n"),
                    R::C("AGFsaWNlAHNlY3JldA==\r\nCAPA\r\n"),
                    R::Connect(GREETING),
                    R::B("-ERR [SYS/PERM] PLAIN not enabled\r\n"),
                ],
            );
            assert_eq!(
                seen.client,
                format!("+ \r\n-ERR [SYS/PERM] PLAIN not enabled\r\n{SHOWN}")
            );
            assert_eq!(seen.backend, "AUTH PLAIN\r\nQUIT\r\n");
            assert_eq!(
                throttle.notices,
                [
                    user("alice"),
                    auth(AuthVerdict::Failure, "AUTH PLAIN", Charge::Keep)
                ]
            );
            assert_eq!(seen.closes, 1);
            assert_eq!(m.next(), Next::Run);
        }

        /// A backend that fails before the login went out is the router's Unavailable: the
        /// session goes on without it and the attempt is refunded.
        #[test]
        fn a_backend_failing_before_the_login_went_out_is_unavailable() {
            for name in [
                "connect failed",
                "closed before its greeting",
                "-ERR greeting",
                "I/O error while XCLIENT is probed",
            ] {
                let settings = Settings {
                    routed: true,
                    learned_capa: Some(LEARNED.as_bytes().to_vec()),
                    client_info: name
                        .starts_with("I/O")
                        .then(|| "192.0.2.7:1".parse().unwrap()),
                    ..settings(TlsMode::Implicit)
                };
                let mut m = Prelogin::new(settings, true);
                m.take_to_client();
                let mut throttle = granted();
                m.client_input(b"USER alice\r\nPASS secret\r\nCAPA\r\n");
                throttle.run(&mut m);
                assert_eq!(m.next(), Next::Connect, "{name}");
                assert_eq!(m.take_to_client(), b"+OK\r\n");
                if name == "connect failed" {
                    m.route_failed(RouteFailure::Unavailable);
                } else {
                    m.backend_connected();
                    match name {
                        "closed before its greeting" => m.backend_closed(),
                        "-ERR greeting" => {
                            m.backend_input(b"-ERR [SYS/TEMP] busy\r\n");
                        }
                        _ => {
                            m.backend_input(GREETING.as_bytes());
                            assert_eq!(m.take_to_backend(), b"CAPA\r\n");
                            Machine::backend_failed(&mut m);
                        }
                    }
                }
                throttle.run(&mut m);
                let client = String::from_utf8_lossy(&m.take_to_client()).into_owned();
                assert_eq!(client, format!("{UNAVAILABLE}{SHOWN}"), "{name}");
                assert_eq!(m.take_to_backend(), b"", "{name}");
                assert_eq!(
                    m.take_backend_close(),
                    name != "connect failed",
                    "{name}: a backend connected is dropped"
                );
                assert_eq!(m.next(), Next::Run, "{name}");
                assert_eq!(throttle.charged, 0, "{name}");
                assert_eq!(
                    throttle.notices,
                    [
                        user("alice"),
                        auth(AuthVerdict::NotCompleted, "PASS", Charge::Refund)
                    ],
                    "{name}"
                );
            }
        }

        /// With `backend_client_info`, the held login waits for XCLIENT's answer.
        #[test]
        fn the_held_login_goes_out_after_xclient() {
            let settings = Settings {
                routed: true,
                client_info: Some("192.0.2.7:40000".parse().unwrap()),
                ..settings(TlsMode::Implicit)
            };
            let mut m = Prelogin::new(settings, true);
            let mut throttle = granted();
            let seen = play_routed(
                &mut m,
                &mut throttle,
                &[
                    R::C("AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n"),
                    R::Connect("+OK [XCLIENT] Dovecot ready.\r\n"),
                    R::B("+OK\r\n"),
                    R::B("+ \r\n"),
                    R::B("+OK Logged in.\r\n"),
                ],
            );
            assert_eq!(
                seen.backend,
                format!("XCLIENT ADDR=192.0.2.7 PORT=40000\r\nAUTH PLAIN\r\n{PLAIN_ALICE}\r\n")
            );
            assert_eq!(
                seen.client,
                "+OK mx.example.test ready\r\n+OK Logged in.\r\n"
            );
            assert_eq!(m.next(), Next::Authenticated);
        }

        /// The auth throttle's accounting on a routed listener: what stays charged after each
        /// path, and what never reaches a backend.
        #[test]
        fn every_routed_login_path_is_charged_before_it_is_routed() {
            struct Case {
                name: &'static str,
                limit: u32,
                already: u32,
                steps: Vec<R>,
                charged: u32,
                refused: u32,
                reached: &'static [&'static str],
                never: &'static [&'static str],
            }
            let cases = [
                Case {
                    name: "USER alone is never charged",
                    limit: 1,
                    already: 1,
                    steps: vec![R::C("USER alice\r\n")],
                    charged: 1,
                    refused: 0,
                    reached: &[],
                    never: &["USER"],
                },
                Case {
                    name: "a throttled login is never routed",
                    limit: 1,
                    already: 1,
                    steps: vec![R::C("USER u\r\nPASS p\r\nAUTH PLAIN AHUAcA==\r\n")],
                    charged: 1,
                    refused: 2,
                    reached: &[],
                    never: &["PASS", "AUTH"],
                },
                Case {
                    name: "refused by the backend keeps",
                    limit: 3,
                    already: 0,
                    steps: vec![
                        R::C("USER u\r\nPASS wrong\r\n"),
                        R::Connect(GREETING),
                        R::B("+OK\r\n"),
                        R::B(FAILED),
                    ],
                    charged: 1,
                    refused: 0,
                    reached: &["PASS wrong", "QUIT"],
                    never: &[],
                },
                Case {
                    name: "accepted is refunded",
                    limit: 3,
                    already: 0,
                    steps: vec![
                        R::C("AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n"),
                        R::Connect(GREETING),
                        R::B("+ \r\n"),
                        R::B("+OK\r\n"),
                    ],
                    charged: 0,
                    refused: 0,
                    reached: &[PLAIN_ALICE],
                    never: &["QUIT"],
                },
                Case {
                    name: "the lookup's refusal keeps",
                    limit: 3,
                    already: 0,
                    steps: vec![R::C("USER u\r\nPASS p\r\n"), R::Fail(refused("no", true))],
                    charged: 1,
                    refused: 0,
                    reached: &[],
                    never: &["PASS"],
                },
                Case {
                    name: "no backend for it is refunded",
                    limit: 3,
                    already: 0,
                    steps: vec![
                        R::C("USER u\r\nPASS p\r\n"),
                        R::Fail(RouteFailure::Unavailable),
                    ],
                    charged: 0,
                    refused: 0,
                    reached: &[],
                    never: &["PASS"],
                },
                Case {
                    name: "a cancel at mailfront's challenge is never charged",
                    limit: 1,
                    already: 1,
                    steps: vec![R::C("AUTH PLAIN\r\n*\r\n")],
                    charged: 1,
                    refused: 0,
                    reached: &[],
                    never: &["AUTH"],
                },
                Case {
                    name: "a mechanism that cannot be routed is never charged",
                    limit: 1,
                    already: 1,
                    steps: vec![R::C("AUTH CRAM-MD5\r\n")],
                    charged: 1,
                    refused: 0,
                    reached: &[],
                    never: &["AUTH"],
                },
                Case {
                    name: "an unreadable user is charged",
                    limit: 3,
                    already: 0,
                    steps: vec![R::C("AUTH PLAIN AGFsaWNl\r\n")],
                    charged: 1,
                    refused: 0,
                    reached: &[],
                    never: &["AUTH"],
                },
                Case {
                    name: "cancelled with the backend is refunded",
                    limit: 3,
                    already: 0,
                    steps: vec![
                        R::C("AUTH SCRAM-SHA-1 biwsbj1hbGljZSxyPXJPcHJOR2Z3RWJlUldnYk5Fa3FP\r\n"),
                        R::Connect(GREETING),
                        R::B("+ \r\n"),
                        R::B("+ cj1yT3By\r\n"),
                        R::C("*\r\n"),
                        R::B("-ERR cancelled\r\n"),
                    ],
                    charged: 0,
                    refused: 0,
                    reached: &["*\r\n", "QUIT"],
                    never: &[],
                },
                Case {
                    name: "a backend closing mid-login keeps",
                    limit: 3,
                    already: 0,
                    steps: vec![
                        R::C("USER u\r\nPASS wrong\r\n"),
                        R::Connect(GREETING),
                        R::B("+OK\r\n"),
                        R::Closed,
                    ],
                    charged: 1,
                    refused: 0,
                    reached: &["PASS wrong"],
                    never: &[],
                },
                Case {
                    name: "a backend closing before the login went out is refunded",
                    limit: 3,
                    already: 0,
                    steps: vec![
                        R::C("USER u\r\nPASS wrong\r\n"),
                        R::Connect(GREETING),
                        R::Closed,
                    ],
                    charged: 0,
                    refused: 0,
                    reached: &["USER u"],
                    never: &["PASS"],
                },
                Case {
                    name: "a refusal frees the place for the next pipelined login",
                    limit: 1,
                    already: 0,
                    steps: vec![
                        R::C("USER u\r\nPASS p\r\nUSER v\r\nPASS q\r\n"),
                        R::Fail(RouteFailure::Unavailable),
                        R::Connect(GREETING),
                    ],
                    charged: 1,
                    refused: 0,
                    reached: &["USER v"],
                    never: &["USER u"],
                },
            ];
            for case in cases {
                let mut m = session(true);
                let mut throttle = Throttle::new(case.limit, case.already);
                let seen = play_routed(&mut m, &mut throttle, &case.steps);
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
    }
}
