//! The SMTP session machine: everything mailfront decides in a submission session (465, 587),
//! from the greeting to QUIT, as a sans-I/O state machine over bytes. The one driver loop
//! (`driver::serve`, a layer up) owns the sockets, the timers and the TLS handshake and acts on
//! what this machine says ([`Machine`]); nothing here reads a socket, sleeps, logs or looks at a
//! clock (the Received field's date and id come from [`Settings`]).
//!
//! Shape of a session:
//! - Implicit TLS (465): mailfront greets at once, with no backend; EHLO is answered from the
//!   backend's EHLO as the listener learned it ([`Settings::learned_ehlo`]: by its capability
//!   probe, `probe` a layer up, before the first session after a start or reload is served),
//!   and the backend is connected when a command needs it (AUTH, or MAIL where mail needs no
//!   login). Only when that probe failed and nothing is learned does the first EHLO connect (the
//!   fallback), so what the client is offered is always what a backend said. A backend greeting
//!   other than 220 gives the command that needed it `421 4.4.1` and ends the session (RFC 5321
//!   §3.1), never the backend's text.
//! - STARTTLS (587): nothing reaches a backend before TLS (RFC 8314 §4.1). mailfront greets at
//!   once and answers the cleartext dialogue itself ([`cleartext::respond`]); the backend is
//!   connected only after the handshake, as on 465 when a command needs it (so a PROXY v2
//!   header carries the TLS details), its greeting
//!   swallowed (the client already has ours; anything but 220 gives the client `421 4.4.1` and
//!   ends the session), and the client's new EHLO (RFC 3207 §4.2) is the first command it sees.
//!   Idle cleartext clients hold no backend connection.
//! - With `require_tls_for_mail: false`, a cleartext MAIL connects lazily: the client's EHLO or
//!   HELO is replayed (written by mailfront from the parsed name, its reply swallowed but its
//!   capabilities learned), then the session goes on in cleartext. A later STARTTLS drops that
//!   backend connection (after every earlier reply came in) and connects afresh after the
//!   handshake: the new connection's PROXY header carries TLS, and RFC 3207 §4.2 resets the
//!   session state anyway.
//! - `backend_client_info`, all or nothing: right after every backend greeting, before any client
//!   command, mailfront says its own EHLO and, where XCLIENT is offered, sends XCLIENT with the
//!   client's address ([`xclient`]) and swallows the new 220; a backend that offers XCLIENT and
//!   refuses it ends the session with `421 4.7.0`. HELO, EHLO or neither: the same identity.
//! - Client lines are framed one at a time ([`CommandReceiver`]) and judged by the gate
//!   ([`policy::decide`]). What a forwarded command puts on the wire is mailfront's re-encoding
//!   ([`canonical::encode`]), never the client's line; one that cannot be re-encoded gets
//!   `500 5.5.2`. Forwarded commands go out at once (PIPELINING, RFC 2920); each leaves an
//!   entry in one queue of expected replies, and replies mailfront writes itself take their
//!   place in the same queue, so the client gets exactly one reply per command, in order. After
//!   a command that ends a pipeline group (EHLO, DATA, AUTH, NOOP, QUIT, …), or after any command
//!   when the backend does not offer PIPELINING, nothing more is written to the backend until
//!   the replies are in (RFC 2920 §3.1). While replies are owed, the client is read only to
//!   stream message content: every queued command can be answered without more client input,
//!   so this never deadlocks and keeps memory O(one read).
//! - STARTTLS is answered with 220 once every earlier reply went out; whatever the client
//!   pipelined after it is dropped ([`crate::machine::pump_client`], CERT VU#555316).
//! - A command or SASL line ended by a bare LF, or holding a bare CR or a NUL, is refused with
//!   `500 5.5.2` and never forwarded (Postfix before 3.9 ends a command at a bare LF). Inside an
//!   AUTH exchange the backend's exchange is cancelled with mailfront's own `*`.
//! - After the backend's 354 the Received field is written (TLS sessions only), then the content
//!   streams through [`DataScanner`] byte-exact. BDAT chunks stream by count; the first chunk of
//!   a transaction carries the field and its announced size grows to match (RFC 3030 §2).
//!
//! - A listener that routes by user ([`Settings::routed`]: `user_affinity`, `user_map`,
//!   `user_lookup`) connects for nothing but a complete AUTH, and for MAIL only where mail needs
//!   no login (`require_tls_for_mail: false`, the listener's pool, [`Machine::login_facts`]
//!   `None`). EHLO is answered from the learned one (without the mechanisms that cannot be
//!   routed, [`sasl::is_routable`]) or [`local_reply::routed_ehlo`]; MAIL, VRFY, EXPN and HELP
//!   get `530 5.7.0` (RFC 4954 §6); AUTH with a mechanism that cannot be routed `504 5.5.4`.
//!   mailfront plays the start of the exchange (`334 ` for an AUTH without an initial
//!   response, LOGIN's `Username:` and `Password:`) until it holds the response that names the
//!   user; a `*` gets `501 5.7.0`, neither charged nor forwarded. The complete login is charged,
//!   then connected for with its facts; after the greeting and the replayed EHLO/HELO the AUTH
//!   goes without its initial response, and the backend's 334s are answered with the held
//!   responses (swallowed) until none is left, after which the exchange relays as any. A login
//!   the backend does not accept, or the router refuses ([`Machine::route_failed`]), leaves no
//!   backend behind: `QUIT`, the connection closed, and the session goes on as before any
//!   backend, so the next AUTH (perhaps another user, who may live elsewhere) is routed afresh.
//!   A backend of the pool chosen for a MAIL is left the same way at the first AUTH.
//!
//! Decisions where the RFCs leave a choice:
//! - Bare CR/LF in content (smuggling defence): the backend connection is dropped at once, so
//!   the truncated message can never be completed, the rest of the content is consumed, the
//!   client gets `554 5.6.0` at its real end, then `421` to the next command (QUIT still gets
//!   221). In BDAT content the replies owed for earlier commands are read first, then the backend
//!   is dropped. No transparent reconnect: an authenticated session cannot be rebuilt without
//!   replaying the client's credentials, which mailfront never keeps.
//! - A backend that fails while content streams: the rest of the message is consumed, then the
//!   client gets `421 4.4.1` and the session closes; never a 250 the backend did not send.
//! - Graceful shutdown ([`Machine::shutdown_begun`]): a session with no message underway gets
//!   `421 4.3.2` once the replies it is owed went out (RFC 5321 §3.8 allows it unsolicited), an
//!   open envelope included. A message already in DATA or BDAT goes on to the backend's verdict,
//!   which the client gets, then 421 and the close.
//! - `limits.auth_failures_per_ip`: every AUTH is charged before it goes out
//!   ([`Next::ChargeLogin`]; a throttled one is answered 454 here), and refunded on 235, on 501
//!   and 504 (a cancelled exchange or an unknown mechanism: no credential was checked), on 4xx
//!   (the backend's own trouble, though 421 closes the session and keeps it) and when mailfront
//!   cancelled the exchange itself; every other answer, and a session that ends first, keeps it.
//! - A message is counted only on the backend's 2xx to the end of data or to `BDAT … LAST`; its
//!   size is the client's octets (the Received field not included).

use std::collections::VecDeque;
use std::net::SocketAddr;

use time::OffsetDateTime;
use zeroize::Zeroizing;

use crate::client_info;
use crate::config::TlsMode;
use crate::line::Step;
use crate::machine::{
    AuthVerdict, Charge, ClientEvents, Core, End, LoginFacts, Machine, Next, Notice, Phase,
    RouteFailure, TlsFacts, pump_client,
};
use crate::sasl;
use crate::smtp::bdat::{self, ChunkReader, ContentScanner};
use crate::smtp::canonical::{self, Encoded, Unencodable};
use crate::smtp::cleartext::{self, Action};
use crate::smtp::command::{Bdat, Command, SaslResponse};
use crate::smtp::data::{BareLineEnding, DataEvent, DataScanner};
use crate::smtp::ehlo::{self, BackendCapabilities, EhloContext, rewrite_ehlo};
use crate::smtp::local_reply;
use crate::smtp::policy::{self, ClientInput, GateState, Refusal, Verdict};
use crate::smtp::received::{ReceivedId, ReceivedInfo, TlsCipher, WithProtocol, received_header};
use crate::smtp::receiver::{CommandReceiver, Line, LineError, LineMode};
use crate::smtp::reply::{Reply, ReplyReceiver};
use crate::smtp::xclient;

/// Most replies owed to the client at once. Past this the backend's replies are waited for
/// before the next command is taken, so a client pipelining without end cannot grow the queue,
/// or fill the backend's reply buffer until both sides stall.
const MAX_PENDING_REPLIES: usize = 1000;
/// Octets taken off the backend's `SIZE` so the Received field never pushes a message that
/// passed `MAIL SIZE=` (RFC 1870) over the backend's limit. The field is about 250 octets.
pub const RECEIVED_SIZE_RESERVE: u64 = 1024;
/// Backend octets held while no reply is expected (an unsolicited 421 fits many times): past
/// this the driver stops reading the backend until a command expects its answer.
const UNSOLICITED_HOLD: usize = 16 * 1024;

/// What the machine needs to know about its listener and client, set once per session.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listener: TlsMode,
    pub require_tls_for_mail: bool,
    /// Our own name, in greetings, replies and the Received `by` clause.
    pub hostname: String,
    /// `limits.smtp_line`: the longest command line read.
    pub line_limit: usize,
    /// The longest SASL response line (and AUTH command line) read.
    pub auth_line_limit: usize,
    /// `backend_client_info`: tell the backend the client's address with XCLIENT.
    pub client_info: bool,
    /// The client as the backend is told (XCLIENT) and the Received `from` clause reads it.
    pub client: SocketAddr,
    /// The address the client connected to.
    pub local: SocketAddr,
    /// The date in a Received field: the wall clock in production, fixed in tests.
    pub clock: fn() -> OffsetDateTime,
    /// The id in a Received field: random in production, fixed in tests.
    pub received_id: fn() -> ReceivedId,
    /// The backend's EHLO reply as this listener learned it (its capability probe's, or what a
    /// session saw since): what an EHLO with TLS up is answered with before the backend is
    /// connected ([`Phase::Local`]). `None` only when the probe failed: the first EHLO then
    /// connects (the fallback), so what the client is offered is always what a backend said (on
    /// a routed listener it gets [`local_reply::routed_ehlo`] instead: a routed session connects
    /// for nothing but a login).
    pub learned_ehlo: Option<Vec<u8>>,
    /// The listener routes by user (`user_affinity`, `user_map`, `user_lookup`;
    /// `ListenerContext::routes_users` in the session layer): no backend before a complete AUTH,
    /// which mailfront holds until the router chose one ([`Machine::login_facts`]).
    pub routed: bool,
}

/// A reply the machine waits for, and what it means for the session.
#[derive(Debug)]
enum Expect {
    /// The backend's greeting; `first`: the client has not been greeted yet (implicit TLS).
    Greeting {
        first: bool,
    },
    /// mailfront's own EHLO before XCLIENT (`backend_client_info`).
    IdentityEhlo {
        first: bool,
    },
    Xclient {
        first: bool,
    },
    Ehlo {
        name: Vec<u8>,
    },
    Helo {
        name: Vec<u8>,
    },
    /// The client's EHLO/HELO replayed on a lazily connected backend: the reply is swallowed
    /// (the client had mailfront's own), its capabilities kept.
    Replay {
        ehlo: bool,
    },
    Auth,
    /// An AUTH sent without its initial response ([`Encoded::AuthSplit`]): a `334` is answered
    /// with `response` and never shown to the client; anything else answers the client's AUTH.
    AuthSplit {
        response: Vec<u8>,
    },
    /// Our `*` ending an exchange after a refused SASL line: its 501 is swallowed.
    AuthCancel,
    /// The AUTH of a login held for routing, sent without its initial response: each `334` is
    /// answered with the next held response and never shown to the client; once none is left
    /// the exchange relays as [`Expect::Auth`]. Any other reply answers the client's AUTH.
    RoutedAuth,
    Mail,
    Rcpt {
        path: Option<Vec<u8>>,
    },
    Data,
    DataEnd {
        size: u64,
    },
    Bdat {
        last: bool,
        /// Client octets of the transaction's chunks so far.
        size: u64,
    },
    /// RSET: a 2xx ends the transaction (RFC 5321 §4.1.1.5).
    Rset,
    Quit,
    Other,
}

/// One entry of the reply queue: in command order.
#[derive(Debug)]
enum Pending {
    /// A reply the backend owes; `barrier`: nothing more is taken from the client until it is
    /// in (the command ended a pipeline group, or the backend does not pipeline).
    Backend { expect: Expect, barrier: bool },
    /// A reply mailfront writes itself.
    Local(Vec<u8>),
    /// A BDAT message refused for a bare CR/LF, once every earlier reply is in: the backend is
    /// dropped so the message can never complete, and `554 5.6.0` answers the BDAT.
    AbortBdat(BareLineEnding),
}

/// What the next client bytes are.
#[derive(Debug)]
enum Mode {
    Command,
    /// The line after a backend 334 (RFC 4954 §4): never a command.
    Sasl,
    /// Message content after a 354. `failed`: the backend went away; consume to the end.
    Data {
        scanner: DataScanner,
        failed: bool,
    },
    /// A BDAT chunk: forwarded, or dropped for a refused BDAT.
    Chunk {
        reader: ChunkReader,
        forward: bool,
        failed: bool,
        /// The chunk of a `BDAT … LAST`.
        last: bool,
        /// The message was refused for a bare CR/LF: consume the rest, then close.
        refused: bool,
    },
    /// A message was refused for a bare CR/LF and the backend connection dropped.
    Closing,
}

/// The backend connection as the machine sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    /// Not connected: before TLS on 587 (or before a lax session's first MAIL), or between a
    /// lax session's STARTTLS and the new connection.
    NotYet,
    Up,
    /// Dropped on purpose (a refused message, a refused identity) or lost.
    Dropped,
}

/// What the client said in its last EHLO/HELO (after TLS, RFC 3207 §4.2).
#[derive(Debug, Clone)]
struct Greeting {
    ehlo: bool,
    name: Vec<u8>,
}

/// The mail transaction as mailfront follows it.
#[derive(Debug, Default)]
struct Transaction {
    /// RCPTs the backend accepted since its 2xx to MAIL, and the last one's path.
    accepted_rcpts: u32,
    recipient: Option<Vec<u8>>,
    /// A BDAT was sent in this transaction (the next chunk is not a first chunk).
    bdat_started: bool,
    bdat_size: u64,
    /// The id written in this transaction's Received field, for the accept log line.
    received_id: Option<ReceivedId>,
    /// Line endings of the BDAT message so far, across its chunks.
    content: ContentScanner,
    /// The backend accepted a MAIL and the transaction has not ended (RSET, EHLO/HELO, the
    /// message's end): RFC 4954 §4 forbids AUTH now.
    open: bool,
}

impl Transaction {
    /// RSET, a new MAIL or EHLO, or the end of a message: the next chunk is a first chunk.
    fn restart_content(&mut self) {
        self.open = false;
        self.bdat_started = false;
        self.bdat_size = 0;
        self.received_id = None;
        self.content = ContentScanner::new();
    }
}

/// Where the `limits.auth_failures_per_ip` charge of the next AUTH stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChargeState {
    None,
    /// [`Next::ChargeLogin`] is out; the AUTH line waits in `held`.
    Asked,
    /// Granted: the held AUTH goes out on its next delivery.
    Granted,
}

/// A login on a routed session (`Settings::routed`), held by mailfront from the client's AUTH
/// until the router chose its backend, then replayed to that backend. Never printed whole: it
/// holds the client's responses and may hold a password (all wiped when dropped).
struct RoutedLogin {
    /// The mechanism, as the client wrote it (RFC 4422 §3.1 characters, checked by the parser).
    mechanism: Vec<u8>,
    stage: RouteStage,
    /// The client's responses (base64 as sent, without CRLF), to answer the backend's 334s with.
    responses: VecDeque<Zeroizing<Vec<u8>>>,
    /// The authentication identity, `None` when the first response names none mailfront can
    /// read (the login then fails here).
    user: Option<Vec<u8>>,
    password: Option<Zeroizing<Vec<u8>>>,
}

impl std::fmt::Debug for RoutedLogin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RoutedLogin")
            .field("mechanism", &String::from_utf8_lossy(&self.mechanism))
            .field("stage", &self.stage)
            .field("responses", &self.responses.len())
            .finish_non_exhaustive()
    }
}

/// Where a [`RoutedLogin`] stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RouteStage {
    /// mailfront wrote its own first challenge (`334 ` or LOGIN's `Username:`); the next client
    /// line is the first response.
    FirstResponse,
    /// LOGIN: mailfront wrote `Password:`; the next client line is the password.
    Password,
    /// Complete: being charged, routed, connected, or with the backend.
    Held,
}

/// One client event: a line, a line over its limit, or a step through message content.
#[derive(Debug)]
pub enum Event {
    Line(Line),
    TooLong(LineError),
    /// A bare CR/LF was just found in DATA content.
    DataRefusing(BareLineEnding),
    /// The end of DATA content: `<CRLF>.<CRLF>`, clean (`None`) or after a refusal.
    DataEnd(Option<BareLineEnding>),
    /// A bare CR/LF was just found in a BDAT chunk.
    ChunkRefusing(BareLineEnding),
    /// The last octet of a BDAT chunk was consumed.
    ChunkDone,
}

/// The SMTP session machine. See the module documentation.
#[derive(Debug)]
pub struct SmtpMachine {
    core: Core,
    settings: Settings,
    link: Link,
    gate: GateState,
    caps: BackendCapabilities,
    /// The client has a greeting (mailfront's, sent at once on 587).
    greeted_client: bool,
    /// A lazy connect: replay this EHLO/HELO once the backend is ready.
    replay: bool,
    greeting: Option<Greeting>,
    tx: Transaction,
    /// TLS on the client side: set at accept (465) or after the STARTTLS handshake.
    tls: Option<TlsFacts>,
    /// Mechanism of the AUTH exchange in progress, for logs.
    auth_mechanism: String,
    /// An AUTH charge is with the backend, settled by the exchange's final reply.
    auth_charged: bool,
    /// The mechanism of an AUTH sent without an initial response: the first SASL line names
    /// the user (for the close line).
    user_from_first_line: Option<Vec<u8>>,
    charge: ChargeState,
    messages: u64,
    mode: Mode,
    pending: VecDeque<Pending>,
    /// Backend entries in `pending`.
    owed: usize,
    /// A line taken from the client that waits for the queue to drain (STARTTLS, a BDAT that
    /// starts a message, a lazy connect, an AUTH waiting for its charge, …).
    held: Option<Line>,
    receiver: CommandReceiver,
    replies: ReplyReceiver,
    /// The proxy is shutting down: end once nothing is underway.
    draining: bool,
    /// The backend connection must be closed now ([`Machine::take_backend_close`]).
    close_backend: bool,
    /// Message content of the last [`Machine::client_input`] to write to the backend straight
    /// from the driver's read buffer, after [`Machine::take_to_backend`]
    /// ([`Machine::take_passthrough`]).
    passthrough: Option<std::ops::Range<usize>>,
    /// A routed session's login held by mailfront, from its AUTH until the backend answers
    /// something other than a 334 that a held response answers.
    routed: Option<RoutedLogin>,
}

impl SmtpMachine {
    /// A session whose client side is TLS already (`tls`: `Some` on 465), or a 587 session in
    /// cleartext; either way greeted at once, with no backend until a command needs it.
    pub fn new(settings: Settings, tls: Option<TlsFacts>) -> SmtpMachine {
        // No backend before a command needs one, on either listener: the greeting is ours.
        let mut core = Core::new(false);
        if tls.is_some() {
            core.phase = Phase::Local;
        }
        let greeted_client = true;
        core.to_client = local_reply::greeting(&settings.hostname);
        let mut gate = GateState::new(settings.listener, settings.require_tls_for_mail);
        gate.client_tls = tls.is_some();
        SmtpMachine {
            core,
            receiver: CommandReceiver::new(settings.line_limit, settings.auth_line_limit),
            settings,
            link: Link::NotYet,
            gate,
            caps: BackendCapabilities::default(),
            greeted_client,
            replay: false,
            greeting: None,
            tx: Transaction::default(),
            tls,
            auth_mechanism: String::new(),
            auth_charged: false,
            user_from_first_line: None,
            charge: ChargeState::None,
            messages: 0,
            mode: Mode::Command,
            pending: VecDeque::new(),
            owed: 0,
            held: None,
            replies: ReplyReceiver::default(),
            draining: false,
            close_backend: false,
            passthrough: None,
            routed: None,
        }
    }

    fn hostname(&self) -> &str {
        &self.settings.hostname
    }

    fn reply_to_client(&mut self, bytes: &[u8]) {
        self.core.to_client.extend_from_slice(bytes);
    }

    fn notice(&mut self, notice: Notice) {
        self.core.notices.push(notice);
    }

    fn finish(&mut self, end: End) {
        self.held = None;
        self.charge = ChargeState::None;
        self.core.cbuf.clear();
        self.core.finish(end);
    }

    fn ended(&self) -> bool {
        self.core.phase == Phase::Ended
    }

    /// Writes `bytes` to the backend; with no backend the client gets 421 and the session ends.
    fn send(&mut self, bytes: &[u8]) -> bool {
        if self.link != Link::Up {
            self.backend_lost();
            return false;
        }
        self.core.to_backend.extend_from_slice(bytes);
        true
    }

    fn expect(&mut self, expect: Expect, barrier: bool) {
        self.pending.push_back(Pending::Backend { expect, barrier });
        self.owed += 1;
    }

    fn expect_first(&mut self, expect: Expect) {
        self.pending.push_front(Pending::Backend {
            expect,
            barrier: true,
        });
        self.owed += 1;
    }

    fn local(&mut self, reply: &[u8]) {
        self.pending.push_back(Pending::Local(reply.to_vec()));
        self.flush_locals();
    }

    /// Moves every local reply at the front of the queue to the client (and runs a BDAT abort
    /// that reached the front).
    fn flush_locals(&mut self) {
        loop {
            match self.pending.front() {
                Some(Pending::Local(_)) => {
                    if let Some(Pending::Local(reply)) = self.pending.pop_front() {
                        self.reply_to_client(&reply);
                    }
                }
                Some(Pending::AbortBdat(_)) => {
                    if let Some(Pending::AbortBdat(kind)) = self.pending.pop_front() {
                        self.drop_backend();
                        self.notice(Notice::BareLineEnding {
                            bare: bare_name(kind),
                            in_bdat: true,
                        });
                        self.reply_to_client(local_reply::BARE_LINE_ENDING);
                    }
                }
                _ => return,
            }
        }
    }

    fn drop_backend(&mut self) {
        if self.link == Link::Up {
            self.close_backend = true;
        }
        self.link = Link::Dropped;
    }

    /// The backend went away: the client gets 421 and the session ends.
    fn backend_lost(&mut self) {
        let reply = local_reply::backend_unavailable(self.hostname());
        self.reply_to_client(&reply);
        self.drop_backend();
        self.finish(End::BackendClosed);
    }

    /// Whether a message is underway: from the DATA command (or a transaction's first BDAT)
    /// until the backend's verdict on its end. A drain lets such a message finish, since
    /// cutting it would make the client send all of it again; an envelope alone is cheap to
    /// repeat, so a session with no message underway stops at once.
    fn message_underway(&self) -> bool {
        matches!(self.mode, Mode::Data { .. } | Mode::Chunk { .. })
            || self.tx.bdat_started
            || self.pending.iter().any(|p| {
                matches!(
                    p,
                    Pending::Backend {
                        expect: Expect::Data | Expect::DataEnd { .. } | Expect::Bdat { .. },
                        ..
                    }
                )
            })
    }

    /// During a drain: the goodbye once every owed reply went out and no message is underway.
    fn check_stop(&mut self) {
        if self.draining && !self.ended() && self.owed == 0 && !self.message_underway() {
            let reply = local_reply::shutting_down(self.hostname());
            self.reply_to_client(&reply);
            self.finish(End::Shutdown);
        }
    }

    /// Whether the next client line must wait for the backend's replies.
    fn blocked(&self) -> bool {
        self.charge == ChargeState::Asked
            || self.owed >= MAX_PENDING_REPLIES
            || (self.owed > 0
                && (self.held.is_some()
                    || self
                        .pending
                        .iter()
                        .any(|p| matches!(p, Pending::Backend { barrier: true, .. }))))
    }

    fn pump(&mut self) {
        if !self.ended() {
            pump_client(self);
        }
        self.check_stop();
    }

    // ---- client lines ----------------------------------------------------------------------

    /// A line with no backend connected (587 before TLS, or a lax session before its first
    /// MAIL): answered here ([`cleartext::respond`]).
    fn on_cleartext_line(&mut self, line: Line) {
        if self.draining {
            self.check_stop();
            return;
        }
        let command = Command::from_line(&line);
        match cleartext::respond(&self.gate, self.hostname(), &command) {
            Action::Reply(_) if self.refused_as_unreplayable(&command, &line) => {}
            Action::Reply(reply) => {
                match &command {
                    Command::Ehlo(_) | Command::Helo(_) => self.greeted_by(&command),
                    Command::Rset => self.tx.restart_content(),
                    _ => {}
                }
                self.local(&reply);
            }
            Action::Refuse(refusal) => self.refuse(refusal, &command),
            Action::DiscardChunk { octets, refusal } => {
                self.refuse(refusal, &command);
                self.start_chunk(octets, false, false);
            }
            Action::StartTls => self.start_tls(line),
            Action::Quit => {
                self.local(local_reply::CLOSING);
                self.finish(End::ClientClosed);
            }
            Action::Connect => {
                // Connect, replay the EHLO/HELO, then the gate judges this line again.
                self.held = Some(line);
                self.replay = self.greeting.is_some();
                self.core.phase = Phase::Connecting;
            }
        }
    }

    /// An EHLO/HELO mailfront answers itself but may replay to a backend later (a lazy
    /// connect): a name that could not be written then is refused now. Returns whether it was.
    fn refused_as_unreplayable(&mut self, command: &Command, line: &Line) -> bool {
        let unreplayable = matches!(command, Command::Ehlo(_) | Command::Helo(_))
            && canonical::encode(command, line.text()).is_err();
        if unreplayable {
            let limit = canonical::COMMAND_LINE_LIMIT;
            self.refuse(
                Refusal::TooLong(LineError::CommandTooLong { limit }),
                command,
            );
        }
        unreplayable
    }

    /// The client's EHLO/HELO, answered here: kept for a replay and for the Received field, and
    /// a new transaction begins (RFC 5321 §4.1.4).
    fn greeted_by(&mut self, command: &Command) {
        if let Command::Ehlo(name) | Command::Helo(name) = command {
            self.greeting = Some(Greeting {
                ehlo: matches!(command, Command::Ehlo(_)),
                name: name.clone(),
            });
            self.tx.restart_content();
        }
    }

    /// A backend's EHLO reply as the client sees it: our name, what must not show hidden, SIZE
    /// less the Received field's room ([`rewrite_ehlo`]).
    fn ehlo_for_client(&self, reply: &Reply) -> Vec<u8> {
        let ctx = EhloContext {
            client_tls: self.gate.client_tls,
            listener: self.gate.listener,
            hostname: Some(&self.settings.hostname),
            size_reserve: RECEIVED_SIZE_RESERVE,
        };
        let rewritten = rewrite_ehlo(reply, &ctx);
        if !self.settings.routed {
            return rewritten;
        }
        // A routed session refuses the mechanisms it cannot route: none is offered, whether the
        // list was learned or is the live backend's.
        match Reply::parse(&rewritten) {
            Some(reply) => ehlo::routable_mechanisms_only(&reply),
            None => rewritten,
        }
    }

    /// A line with TLS up and no backend yet ([`Phase::Local`]): answered here when mailfront
    /// can answer it truthfully, otherwise the backend is connected and the line judged again
    /// by the gate once the client's EHLO/HELO was replayed to it.
    fn on_local_line(&mut self, line: Line) {
        if self.draining {
            self.check_stop();
            return;
        }
        if matches!(self.mode, Mode::Sasl) {
            return self.on_routed_response(&line);
        }
        let command = Command::from_line(&line);
        let verdict = policy::decide(&self.gate, ClientInput::Command(&command));
        let Verdict::Forward = verdict else {
            return match verdict {
                Verdict::Refuse(refusal) => self.refuse(refusal, &command),
                Verdict::DiscardChunk { octets, refusal } => {
                    self.refuse(refusal, &command);
                    self.start_chunk(octets, false, false);
                }
                Verdict::StartTls => self.start_tls(line),
                Verdict::Forward => {}
            };
        };
        if self.refused_as_unreplayable(&command, &line) {
            return;
        }
        let learned = self.settings.learned_ehlo.as_deref().and_then(Reply::parse);
        match (&command, learned) {
            (Command::Ehlo(_), Some(learned)) => {
                self.greeted_by(&command);
                self.gate.needs_ehlo = false;
                self.learn_capabilities(Some(&learned));
                let reply = self.ehlo_for_client(&learned);
                self.local(&reply);
            }
            // A routed session never connects to learn what to offer.
            (Command::Ehlo(_), None) if self.settings.routed => {
                self.greeted_by(&command);
                self.gate.needs_ehlo = false;
                self.learn_capabilities(None);
                let reply = local_reply::routed_ehlo(self.hostname());
                self.local(&reply);
            }
            (Command::Auth(_), _) if self.settings.routed => self.start_routed_login(&command),
            // No backend is chosen before a login names the user (RFC 4954 §6: 530 for what
            // needs one); MAIL connects only where mail needs no login (the listener's pool).
            (Command::Mail(_), _) if self.settings.routed && self.gate.require_tls_for_mail => {
                self.refuse(Refusal::AuthRequired, &command);
            }
            (Command::Vrfy | Command::Expn | Command::Help, _) if self.settings.routed => {
                self.refuse(Refusal::AuthRequired, &command);
            }
            (Command::Helo(_), _) => {
                self.greeted_by(&command);
                self.gate.needs_ehlo = false;
                self.learn_capabilities(None);
                let reply = local_reply::helo_reply(self.hostname());
                self.local(&reply);
            }
            (Command::Noop, _) => self.local(local_reply::OK),
            (Command::Rset, _) => {
                self.tx.restart_content();
                self.local(local_reply::OK);
            }
            (Command::Quit, _) => {
                self.local(local_reply::CLOSING);
                self.finish(End::ClientClosed);
            }
            // Without a MAIL (which connects) there is no transaction yet (RFC 5321 §4.1.4).
            (Command::Rcpt(_) | Command::Data, _) => self.refuse(Refusal::NeedMail, &command),
            (Command::Bdat(bdat), _) => {
                self.refuse(Refusal::NeedMail, &command);
                self.start_chunk(bdat.size, false, false);
            }
            (Command::Unknown, _) => self.refuse(Refusal::NotRecognized, &command),
            // AUTH, MAIL, VRFY, EXPN, HELP, and an EHLO while no backend's capabilities are
            // known (on a routed session: only MAIL where mail needs no login): connect, replay
            // the EHLO/HELO, then the gate judges this line again.
            _ => {
                self.held = Some(line);
                self.replay = self.greeting.is_some();
                self.core.phase = Phase::Connecting;
            }
        }
    }

    // ---- routed sessions -------------------------------------------------------------------

    /// AUTH on a routed session, with no backend (RFC 4954 §4): mailfront plays the start of
    /// the exchange itself until it holds the client's first response (for LOGIN, both), which
    /// names the user the router needs; nothing reaches a backend before.
    fn start_routed_login(&mut self, command: &Command) {
        let Command::Auth(auth) = command else {
            return;
        };
        if !sasl::is_routable(&auth.mechanism) {
            // RFC 4954 §4: 504 for a mechanism not supported; never forwarded.
            return self.refuse(Refusal::MechanismNotRoutable, command);
        }
        self.auth_mechanism = sasl::mechanism_for_log(&auth.mechanism);
        let login = RoutedLogin {
            mechanism: auth.mechanism.clone(),
            stage: RouteStage::FirstResponse,
            responses: VecDeque::new(),
            user: None,
            password: None,
        };
        match &auth.initial_response {
            Some(response) => self.take_routed_response(login, response),
            None => {
                // RFC 4954 §4: with no initial response the server sends an empty challenge;
                // LOGIN's first is `Username:` (draft-murchison-sasl-login §2).
                let challenge = if is_login_mechanism(&login.mechanism) {
                    local_reply::LOGIN_USERNAME_CHALLENGE
                } else {
                    local_reply::SASL_EMPTY_CHALLENGE
                };
                self.routed = Some(login);
                self.mode = Mode::Sasl;
                self.local(challenge);
            }
        }
    }

    /// A client line answering a challenge mailfront wrote itself: `*` cancels (RFC 4954 §4:
    /// 501), a line that is not base64 gets the syntax error, neither charged nor forwarded.
    fn on_routed_response(&mut self, line: &Line) {
        self.mode = Mode::Command;
        let Some(login) = self.routed.take() else {
            return;
        };
        let response = SaslResponse::from_line(line);
        if response == SaslResponse::Cancel {
            self.notice(Notice::CommandRefused {
                reason: "auth_cancelled",
            });
            return self.local(local_reply::AUTH_CANCELLED);
        }
        match policy::decide(&self.gate, ClientInput::SaslResponse(response)) {
            Verdict::Forward => self.take_routed_response(login, line.text()),
            Verdict::Refuse(refusal) | Verdict::DiscardChunk { refusal, .. } => {
                self.refuse(refusal, &Command::Unknown);
            }
            // The gate never starts TLS for a SASL line, and this one comes with TLS up.
            Verdict::StartTls => self.refuse(Refusal::CleartextAuth, &Command::Unknown),
        }
    }

    /// One response of a routed login (`response`: base64 as sent, or `=` for an empty initial
    /// response, RFC 4954 §4), held for the backend. Once the login is complete it is charged
    /// ([`Next::ChargeLogin`]), then connected for ([`SmtpMachine::routed_charge`]).
    fn take_routed_response(&mut self, mut login: RoutedLogin, response: &[u8]) {
        // On the backend's continuation line an empty response is an empty line, never `=`.
        let held = if response == b"=" { &b""[..] } else { response };
        match login.stage {
            RouteStage::FirstResponse => {
                login.user = sasl::user_in_first_response(&login.mechanism, response);
                if login.mechanism.eq_ignore_ascii_case(b"PLAIN") {
                    login.password = sasl::plain_password(response);
                }
                login.responses.push_back(Zeroizing::new(held.to_vec()));
                if is_login_mechanism(&login.mechanism) && login.user.is_some() {
                    // draft-murchison-sasl-login §2: the password answers the second challenge.
                    login.stage = RouteStage::Password;
                    self.routed = Some(login);
                    self.mode = Mode::Sasl;
                    return self.local(local_reply::LOGIN_PASSWORD_CHALLENGE);
                }
            }
            RouteStage::Password => {
                login.password = sasl::login_mechanism_password(response);
                login.responses.push_back(Zeroizing::new(held.to_vec()));
            }
            RouteStage::Held => {}
        }
        login.stage = RouteStage::Held;
        self.routed = Some(login);
        // Charged before anything goes out, like every AUTH; one whose user cannot be read too:
        // it is a login attempt all the same.
        self.charge = ChargeState::Asked;
    }

    /// The driver's answer to the charge of a complete routed login: granted, a login whose
    /// user cannot be read fails here (535), any other connects ([`Machine::login_facts`]) and
    /// its AUTH waits in `held` for the backend's greeting and the replayed EHLO/HELO.
    fn routed_charge(&mut self, granted: bool) {
        self.charge = ChargeState::None;
        if !granted {
            self.routed = None;
            let mechanism = self.auth_mechanism.clone();
            self.notice(Notice::AuthThrottled { mechanism });
            return self.local(local_reply::AUTH_THROTTLED);
        }
        self.auth_charged = true;
        let Some((user, mechanism)) = self
            .routed
            .as_ref()
            .and_then(|login| Some((login.user.clone()?, login.mechanism.clone())))
        else {
            // A malformed PLAIN, an OAUTHBEARER without `a=`: no backend can be chosen, and
            // none would take it (RFC 4954 §6: 535 5.7.8).
            self.routed = None;
            self.settle_auth(AuthVerdict::Failure, Charge::Keep);
            return self.local(local_reply::AUTH_FAILED);
        };
        self.notice(Notice::User(user));
        // Sent without its initial response (the backend may lack it, RFC 4954 §4 allows
        // either); the held responses answer its 334s ([`Expect::RoutedAuth`]).
        self.held = Some(Line::own([&b"AUTH "[..], &mechanism].concat()));
        self.replay = self.greeting.is_some();
        self.core.phase = Phase::Connecting;
    }

    /// A routed session leaves its backend and goes on as before any backend
    /// ([`Phase::Local`]): after a login that did not succeed (the next AUTH may name another
    /// user, who may live elsewhere, so RSET is not enough), or, before a login, a backend the
    /// listener's pool chose for a MAIL. `QUIT` is its goodbye (RFC 5321 §4.1.1.10), then the
    /// connection is closed.
    fn leave_backend(&mut self) {
        if self.link == Link::Up {
            self.core.to_backend.extend_from_slice(b"QUIT\r\n");
            self.close_backend = true;
        }
        self.link = Link::NotYet;
        self.core.phase = Phase::Local;
        self.core.bbuf.clear();
        self.replies = ReplyReceiver::default();
        self.pending.retain(|p| matches!(p, Pending::Local(_)));
        self.owed = 0;
        self.mode = Mode::Command;
        self.routed = None;
        self.held = None;
        self.replay = false;
        self.tx = Transaction::default();
    }

    /// No backend for the routed login now (its backend refused service or went away before
    /// the login's end): RFC 4954 §6's temporary failure to the AUTH, its charge refunded (no
    /// credential was judged), and the session goes on without a backend: the client may try
    /// again, never on another backend.
    fn login_unavailable(&mut self) {
        self.settle_auth(AuthVerdict::NotCompleted, Charge::Refund);
        self.leave_backend();
        self.local(local_reply::AUTH_UNAVAILABLE);
    }

    /// A line with the backend connected.
    fn on_line(&mut self, line: Line) {
        if self.draining {
            if self.owed > 0 {
                self.held = Some(line);
                return;
            }
            if !self.message_underway() {
                self.check_stop();
                return;
            }
        }
        match self.mode {
            Mode::Sasl => return self.on_sasl_line(&line),
            Mode::Closing => {
                if self.owed > 0 {
                    self.held = Some(line);
                } else {
                    self.close_after_refusal(line.text());
                }
                return;
            }
            _ => {}
        }
        let command = Command::from_line(&line);
        if self.settings.routed
            && self.routed.is_none()
            && !self.gate.authenticated
            && matches!(command, Command::Auth(_))
        {
            // The backend was the pool's, for a MAIL where mail needs no login: chosen before
            // the user was known, it is left once every owed reply is in, and the AUTH is
            // routed afresh.
            if self.owed > 0 {
                self.held = Some(line);
                return;
            }
            // RFC 4954 §4: "An AUTH command issued during a mail transaction MUST be rejected
            // with a 503 reply"; leaving the backend would drop the transaction unseen.
            if self.tx.open {
                return self.local(local_reply::AUTH_IN_TRANSACTION);
            }
            self.leave_backend();
            return self.on_local_line(line);
        }
        match policy::decide(&self.gate, ClientInput::Command(&command)) {
            Verdict::Forward => self.forward(&command, line),
            Verdict::Refuse(refusal) => self.refuse(refusal, &command),
            Verdict::DiscardChunk { octets, refusal } => {
                self.refuse(refusal, &command);
                self.start_chunk(octets, false, false);
            }
            Verdict::StartTls => self.start_tls(line),
        }
    }

    /// STARTTLS: 220 once every earlier reply went out; the driver then runs the handshake.
    fn start_tls(&mut self, line: Line) {
        // Every earlier command gets its reply before the 220 (RFC 2920 §3.1).
        if self.owed > 0 {
            self.held = Some(line);
            return;
        }
        if self.link == Link::Up {
            // A lax session that sent mail in cleartext: the backend is connected afresh after
            // the handshake (RFC 3207 §4.2 resets the session anyway), so the new connection's
            // PROXY header carries TLS and nothing of the cleartext session carries over.
            self.close_backend = true;
        }
        self.link = Link::NotYet;
        self.reply_to_client(local_reply::STARTTLS_READY);
        self.core.phase = Phase::StartTls;
    }

    /// A line inside an AUTH exchange: forwarded as framed, never parsed as a command.
    fn on_sasl_line(&mut self, line: &Line) {
        self.mode = Mode::Command;
        let response = SaslResponse::from_line(line);
        match policy::decide(&self.gate, ClientInput::SaslResponse(response)) {
            Verdict::Forward => {
                if let Some(mechanism) = self.user_from_first_line.take()
                    && let Some(user) = sasl::user_in_first_response(&mechanism, line.text())
                {
                    self.notice(Notice::User(user));
                }
                if self.send(&line.to_wire()) {
                    self.expect(Expect::Auth, true);
                }
            }
            Verdict::Refuse(refusal) | Verdict::DiscardChunk { refusal, .. } => {
                self.cancel_auth(refusal);
            }
            // The gate never starts TLS for a SASL line; refuse it as AUTH before TLS would be.
            Verdict::StartTls => self.cancel_auth(Refusal::CleartextAuth),
        }
    }

    /// Ends the backend's AUTH exchange with `*` (its 501 is swallowed) and answers `refusal`.
    fn cancel_auth(&mut self, refusal: Refusal) {
        if self.send(b"*\r\n") {
            self.expect(Expect::AuthCancel, true);
            self.notice(Notice::CommandRefused {
                reason: refusal.as_str(),
            });
            self.local(refusal.reply());
        }
    }

    fn on_too_long(&mut self, error: LineError) {
        match self.mode {
            Mode::Closing if self.owed == 0 => self.close_after_refusal(b""),
            // The goodbye waits for the owed replies like a line would; an over-long line
            // carries nothing worth keeping.
            Mode::Closing => self.held = Some(Line::empty()),
            // A response to mailfront's own challenge on a routed session: no backend to cancel.
            Mode::Sasl if self.core.phase == Phase::Local => {
                self.mode = Mode::Command;
                self.routed = None;
                self.refuse(policy::too_long(&self.gate, error), &Command::Unknown);
            }
            Mode::Sasl => {
                self.mode = Mode::Command;
                self.cancel_auth(policy::too_long(&self.gate, error));
            }
            _ => self.refuse(policy::too_long(&self.gate, error), &Command::Unknown),
        }
    }

    /// Answers a line the gate refused, in order with the other replies; the notice (a log line,
    /// a metric) comes from the refusal's reason, never from its reply bytes.
    fn refuse(&mut self, refusal: Refusal, command: &Command) {
        if refusal == Refusal::CleartextAuth {
            let mechanism = match command {
                Command::Auth(auth) => sasl::mechanism_for_log(&auth.mechanism),
                _ => "-".to_owned(),
            };
            self.notice(Notice::CleartextAuthRefused { mechanism });
        } else {
            self.notice(Notice::CommandRefused {
                reason: refusal.as_str(),
            });
        }
        self.local(refusal.reply());
    }

    /// Sends a command the gate let through and queues its reply.
    fn forward(&mut self, command: &Command, line: Line) {
        // The last gate: what cannot be written anew within its limit is never forwarded.
        let encoded = match canonical::encode(command, line.text()) {
            Ok(encoded) => encoded,
            Err(error) => {
                let refusal = match error {
                    Unencodable::TooLong { limit } => {
                        Refusal::TooLong(LineError::CommandTooLong { limit })
                    }
                    Unencodable::Syntax(error) => Refusal::Syntax(error),
                };
                self.refuse(refusal, command);
                if let Command::Bdat(bdat) = command {
                    self.start_chunk(bdat.size, false, false);
                }
                return;
            }
        };
        let expect = match command {
            Command::Ehlo(name) | Command::Helo(name) => {
                self.gate.needs_ehlo = false;
                let name = name.clone();
                if matches!(command, Command::Ehlo(_)) {
                    Expect::Ehlo { name }
                } else {
                    Expect::Helo { name }
                }
            }
            // The login held for routing, charged before the connect (its user noticed then).
            Command::Auth(_) if self.routed.is_some() => Expect::RoutedAuth,
            Command::Auth(auth) => {
                match self.charge {
                    ChargeState::Granted => self.charge = ChargeState::None,
                    _ => {
                        // Charged before it goes out, checked and counted in one step by the
                        // driver; AUTH ends a pipeline group, so at most one exchange (and one
                        // charge) is in flight.
                        self.auth_mechanism = sasl::mechanism_for_log(&auth.mechanism);
                        self.charge = ChargeState::Asked;
                        self.held = Some(line);
                        return;
                    }
                }
                self.auth_charged = true;
                // The user, for the close line; never the password.
                match &auth.initial_response {
                    Some(response) => {
                        if let Some(user) = sasl::user_in_first_response(&auth.mechanism, response)
                        {
                            self.notice(Notice::User(user));
                        }
                    }
                    None => self.user_from_first_line = Some(auth.mechanism.clone()),
                }
                Expect::Auth
            }
            // A new message starts when the backend says so (its 2xx to MAIL, RSET, EHLO or
            // HELO), never when the command merely goes out: a refused MAIL inside an open BDAT
            // transaction leaves that transaction, and its Received field, as they were.
            Command::Mail(_) => Expect::Mail,
            Command::Rcpt(rcpt) => Expect::Rcpt {
                path: rcpt.forward_path.clone(),
            },
            Command::Data => Expect::Data,
            Command::Bdat(bdat) => return self.forward_bdat(*bdat, line),
            Command::Rset => Expect::Rset,
            Command::Quit => Expect::Quit,
            _ => Expect::Other,
        };
        let (wire, expect) = match encoded {
            Encoded::Line(wire) => (wire, expect),
            Encoded::AuthSplit { command, response } => (command, Expect::AuthSplit { response }),
        };
        let barrier = command.verb().ends_pipeline_group() || !self.caps.pipelining;
        if self.send(&wire) {
            self.expect(expect, barrier);
        }
    }

    /// BDAT (RFC 3030): the first chunk of a transaction over TLS carries the Received field
    /// and announces its grown size (RFC 3030 §2: the size counts every octet); later chunks
    /// announce the client's size. Either way the line is mailfront's, and the size it announces
    /// is exactly the number of octets it streams.
    fn forward_bdat(&mut self, bdat: Bdat, line: Line) {
        // Whether this chunk starts a message (and carries the Received field, whose `for`
        // clause the RCPT replies decide) depends on replies still owed: read them first.
        let starts_message = !self.tx.bdat_started && self.tls.is_some();
        let decided_by_owed = self.pending.iter().any(|p| {
            matches!(
                p,
                Pending::Backend {
                    expect: Expect::Mail | Expect::Rset | Expect::Ehlo { .. } | Expect::Helo { .. },
                    ..
                }
            )
        });
        if self.owed > 0 && (decided_by_owed || starts_message || (bdat.last && bdat.size == 0)) {
            self.held = Some(line);
            return;
        }
        if bdat.last && bdat.size == 0 && self.tx.content.finish().is_err() {
            // The message would end with a bare CR: it must never complete.
            self.drop_backend();
            self.notice(Notice::BareLineEnding {
                bare: bare_name(BareLineEnding::Cr),
                in_bdat: true,
            });
            self.tx = Transaction::default();
            self.local(local_reply::BARE_LINE_ENDING);
            self.mode = Mode::Closing;
            return;
        }
        let mut wire = bdat::bdat_command(bdat.size, bdat.last);
        if !self.tx.bdat_started && self.tls.is_some() {
            let header = self.received_field();
            match bdat::first_chunk_command(bdat, header.len()) {
                Ok(command) => {
                    wire = command;
                    wire.extend_from_slice(&header);
                    self.notice(Notice::ReceivedFieldAdded);
                }
                Err(_) => {
                    self.local(local_reply::BDAT_SYNTAX);
                    self.start_chunk(bdat.size, false, false);
                    return;
                }
            }
        }
        self.tx.bdat_started = true;
        self.tx.bdat_size = self.tx.bdat_size.saturating_add(bdat.size);
        if !self.send(&wire) {
            return;
        }
        let size = self.tx.bdat_size;
        self.expect(
            Expect::Bdat {
                last: bdat.last,
                size,
            },
            !self.caps.pipelining,
        );
        self.start_chunk(bdat.size, true, bdat.last);
    }

    fn start_chunk(&mut self, octets: u64, forward: bool, last: bool) {
        if octets > 0 {
            self.mode = Mode::Chunk {
                reader: ChunkReader::new(octets),
                forward,
                failed: false,
                last,
                refused: false,
            };
        }
    }

    /// After a refused message: QUIT gets 221, anything else 421; the session ends either way.
    fn close_after_refusal(&mut self, line: &[u8]) {
        if Command::parse(line) == Command::Quit {
            self.reply_to_client(local_reply::CLOSING);
            return self.finish(End::ClientClosed);
        }
        let reply = local_reply::closing_after_refusal(self.hostname());
        self.reply_to_client(&reply);
        self.finish(End::ProtocolViolation(
            "bare CR or LF in message content".to_owned(),
        ));
    }

    // ---- message content -------------------------------------------------------------------

    /// The hot path of message content: when nothing is held from an earlier read and nothing
    /// waits to go to the backend, content is scanned in the driver's own read buffer and the
    /// part to forward is named as a range of it ([`Machine::take_passthrough`]) instead of
    /// being copied twice (into `cbuf`, then into the backend output). What follows the
    /// content in the same read (after the end of data) is kept in `cbuf` as usual; nothing of
    /// it can reach the backend before the range, since the end of data is a barrier. A BDAT
    /// chunk takes this path only when the read is all chunk, so a command after the chunk is
    /// never written before it. Returns whether `bytes` was taken here.
    fn stream_directly(&mut self, bytes: &[u8]) -> bool {
        if !self.core.cbuf.is_empty()
            || !self.core.to_backend.is_empty()
            || self.passthrough.is_some()
            || self.ended()
        {
            return false;
        }
        match &mut self.mode {
            Mode::Data { scanner, failed } => {
                let step = scanner.scan(bytes);
                if !*failed {
                    if step.held_cr {
                        self.core.to_backend.push(b'\r');
                    }
                    if !step.forward.is_empty() {
                        self.passthrough = Some(step.forward.clone());
                    }
                }
                let event = match step.event {
                    DataEvent::NeedMore => None,
                    DataEvent::Refusing(kind) => Some(Event::DataRefusing(kind)),
                    DataEvent::End => Some(Event::DataEnd(None)),
                    DataEvent::EndRefused(kind) => Some(Event::DataEnd(Some(kind))),
                };
                self.core
                    .cbuf
                    .extend_from_slice(bytes.get(step.consumed..).unwrap_or_default());
                if let Some(event) = event {
                    self.on_content(event);
                }
                true
            }
            Mode::Chunk {
                reader,
                forward,
                failed,
                last,
                refused,
            } => {
                if reader.remaining() < bytes.len() as u64 {
                    return false;
                }
                let n = reader.take(bytes);
                let done = reader.is_done();
                let mut event = None;
                if *forward && !*failed && !*refused {
                    match self.tx.content.scan(bytes, *last && done) {
                        Ok(()) => self.passthrough = Some(0..n),
                        Err(kind) => {
                            *refused = true;
                            event = Some(Event::ChunkRefusing(kind));
                        }
                    }
                }
                if let Some(event) = event {
                    self.on_content(event);
                }
                if done {
                    self.on_content(Event::ChunkDone);
                }
                true
            }
            _ => false,
        }
    }

    /// Streams DATA content from `cbuf` up to `<CRLF>.<CRLF>`: the forwarded part goes to the
    /// backend output as the scanner allows it.
    fn data_step(&mut self) -> Step<Event> {
        let Mode::Data { scanner, failed } = &mut self.mode else {
            return Step {
                consumed: 0,
                event: None,
            };
        };
        let step = scanner.scan(&self.core.cbuf);
        if !*failed {
            for part in step.forward_parts(&self.core.cbuf) {
                self.core.to_backend.extend_from_slice(part);
            }
        }
        let event = match step.event {
            DataEvent::NeedMore => None,
            DataEvent::Refusing(kind) => Some(Event::DataRefusing(kind)),
            DataEvent::End => Some(Event::DataEnd(None)),
            DataEvent::EndRefused(kind) => Some(Event::DataEnd(Some(kind))),
        };
        Step {
            consumed: step.consumed,
            event,
        }
    }

    /// Streams (or drops) the octets of one BDAT chunk from `cbuf`.
    fn chunk_step(&mut self) -> Step<Event> {
        let Mode::Chunk {
            reader,
            forward,
            failed,
            last,
            refused,
        } = &mut self.mode
        else {
            return Step {
                consumed: 0,
                event: None,
            };
        };
        if reader.is_done() {
            return Step {
                consumed: 0,
                event: Some(Event::ChunkDone),
            };
        }
        let n = reader.take(&self.core.cbuf);
        let part = self.core.cbuf.get(..n).unwrap_or_default();
        let mut event = None;
        if *forward && !*failed && !*refused {
            match self.tx.content.scan(part, *last && reader.is_done()) {
                Ok(()) => self.core.to_backend.extend_from_slice(part),
                Err(kind) => {
                    // Nothing of this read is sent: the backend is about to be dropped.
                    *refused = true;
                    event = Some(Event::ChunkRefusing(kind));
                }
            }
        }
        if event.is_none() && reader.is_done() {
            event = Some(Event::ChunkDone);
        }
        Step { consumed: n, event }
    }

    fn on_content(&mut self, event: Event) {
        match event {
            Event::DataRefusing(kind) => {
                // data.rs: never send an end of data for this message; closing the connection
                // makes the backend abandon the transaction (RFC 5321 §3.8).
                self.drop_backend();
                self.notice(Notice::BareLineEnding {
                    bare: bare_name(kind),
                    in_bdat: false,
                });
            }
            Event::DataEnd(Some(_)) => {
                self.mode = Mode::Closing;
                self.tx = Transaction::default();
                self.local(local_reply::BARE_LINE_ENDING);
            }
            Event::DataEnd(None) => {
                let (size, failed) = match &self.mode {
                    Mode::Data { scanner, failed } => (scanner.size(), *failed),
                    _ => (0, true),
                };
                self.mode = Mode::Command;
                if failed {
                    return self.backend_lost();
                }
                // End of data ends a pipeline group (RFC 2920 §3.1).
                self.expect(Expect::DataEnd { size }, true);
            }
            Event::ChunkRefusing(kind) => {
                // The BDAT just sent is the last entry queued, and its reply can never come
                // (its chunk will not be completed): the earlier replies are read first, then
                // the backend is dropped and 554 answers this BDAT.
                if matches!(self.pending.back(), Some(Pending::Backend { .. })) {
                    self.pending.pop_back();
                    self.owed = self.owed.saturating_sub(1);
                }
                self.tx = Transaction::default();
                self.pending.push_back(Pending::AbortBdat(kind));
                self.flush_locals();
            }
            Event::ChunkDone => {
                let (failed, refused) = match &self.mode {
                    Mode::Chunk {
                        failed, refused, ..
                    } => (*failed, *refused),
                    _ => (false, false),
                };
                if refused {
                    self.mode = Mode::Closing;
                    return;
                }
                self.mode = Mode::Command;
                if failed {
                    self.backend_lost();
                }
            }
            Event::Line(_) | Event::TooLong(_) => {}
        }
    }

    // ---- backend replies -------------------------------------------------------------------

    /// Parses the backend's replies while one is expected.
    fn take_replies(&mut self) -> bool {
        let mut progressed = false;
        loop {
            self.flush_locals();
            if self.ended() || !matches!(self.pending.front(), Some(Pending::Backend { .. })) {
                return progressed;
            }
            if self.core.bbuf.is_empty() {
                return progressed;
            }
            let (n, result) = self.replies.receive(&self.core.bbuf);
            let n = n.min(self.core.bbuf.len());
            self.core.bbuf.drain(..n);
            progressed |= n > 0;
            match result {
                Ok(None) => {
                    if n == 0 {
                        return progressed;
                    }
                }
                Ok(Some(reply)) => {
                    if let Some(Pending::Backend { expect, .. }) = self.pending.pop_front() {
                        self.owed = self.owed.saturating_sub(1);
                        self.on_reply(expect, reply);
                    }
                }
                Err(e) => {
                    let reply = local_reply::backend_error(self.hostname());
                    self.reply_to_client(&reply);
                    self.drop_backend();
                    self.finish(End::BackendProtocol(e.to_string()));
                    return true;
                }
            }
        }
    }

    /// Relays (or rewrites) one backend reply and updates the session from it.
    fn on_reply(&mut self, expect: Expect, reply: Reply) {
        let code = reply.code();
        match expect {
            Expect::Greeting { first } => return self.on_greeting(first, &reply),
            Expect::IdentityEhlo { first } => return self.on_identity_ehlo(first, &reply),
            Expect::Xclient { first } => return self.on_xclient(first, &reply),
            _ => {}
        }
        if code == 421 && !matches!(expect, Expect::AuthCancel) {
            // The backend is closing (RFC 5321 §3.8): pass it on and close both sides.
            self.reply_to_client(reply.raw());
            self.drop_backend();
            return self.finish(End::BackendClosed);
        }
        match expect {
            Expect::Ehlo { name } => {
                self.learn_capabilities(Some(&reply));
                if reply.is_positive() {
                    self.notice(Notice::BackendEhlo(reply.raw().to_vec()));
                }
                if reply.is_positive() {
                    self.greeting = Some(Greeting { ehlo: true, name });
                    self.tx.restart_content();
                }
                let rewritten = self.ehlo_for_client(&reply);
                self.reply_to_client(&rewritten);
            }
            Expect::Replay { ehlo } => {
                self.learn_capabilities(ehlo.then_some(&reply));
                if ehlo && reply.is_positive() {
                    self.notice(Notice::BackendEhlo(reply.raw().to_vec()));
                }
                if !reply.is_positive() {
                    self.notice(Notice::BackendRefused {
                        what: "the replayed EHLO/HELO",
                        code,
                    });
                }
            }
            Expect::Helo { name } => {
                self.learn_capabilities(None);
                if reply.is_positive() {
                    self.greeting = Some(Greeting { ehlo: false, name });
                    self.tx.restart_content();
                    let helo = local_reply::helo_reply(self.hostname());
                    self.reply_to_client(&helo);
                } else {
                    self.reply_to_client(reply.raw());
                }
            }
            Expect::AuthSplit { response } if code == 334 => {
                // The empty challenge an initial response answers (RFC 4954 §4): the client
                // sent its response already, with its AUTH.
                if self.send(&response) {
                    self.expect_first(Expect::Auth);
                }
            }
            Expect::Auth | Expect::AuthSplit { .. } => {
                self.on_auth_reply(code);
                self.reply_to_client(reply.raw());
            }
            Expect::RoutedAuth if code == 334 => {
                let next = self
                    .routed
                    .as_mut()
                    .and_then(|login| login.responses.pop_front());
                match next {
                    // The client answered this challenge already, to mailfront's own.
                    Some(response) => {
                        let wire = Zeroizing::new([response.as_slice(), b"\r\n"].concat());
                        if self.send(&wire) {
                            self.expect_first(Expect::RoutedAuth);
                        }
                    }
                    // Every held response is used: the rest of the exchange is the client's
                    // (a SCRAM server-first message), relayed as any.
                    None => {
                        self.routed = None;
                        self.on_auth_reply(code);
                        self.reply_to_client(reply.raw());
                    }
                }
            }
            Expect::RoutedAuth => {
                // A completion where a challenge was due: it answers the client's AUTH.
                self.routed = None;
                self.reply_to_client(reply.raw());
                self.on_auth_reply(code);
            }
            Expect::AuthCancel => {
                // mailfront's own `*`: the refused SASL line never reached the backend.
                self.settle_auth(AuthVerdict::NotCompleted, Charge::Refund);
                if self.settings.routed {
                    self.leave_backend();
                }
            }
            Expect::Mail => {
                if reply.is_positive() {
                    self.tx.restart_content();
                    self.tx.open = true;
                    self.tx.accepted_rcpts = 0;
                    self.tx.recipient = None;
                    if !self.gate.require_tls_for_mail {
                        // Where cleartext mail is allowed, an accepted MAIL is this session's
                        // login: the login clock stops, as after a successful AUTH.
                        self.notice(Notice::PastLogin);
                    }
                }
                self.reply_to_client(reply.raw());
            }
            Expect::Rcpt { path } => {
                if reply.is_positive() {
                    self.tx.accepted_rcpts = self.tx.accepted_rcpts.saturating_add(1);
                    self.tx.recipient = path;
                }
                self.reply_to_client(reply.raw());
            }
            Expect::Data => {
                self.reply_to_client(reply.raw());
                if code == 354 {
                    self.start_data();
                }
            }
            Expect::DataEnd { size } | Expect::Bdat { last: true, size } => {
                if reply.is_positive() {
                    self.messages = self.messages.saturating_add(1);
                    let first_line = reply.lines().next().unwrap_or_default();
                    self.notice(Notice::MessageAccepted {
                        size,
                        number: self.messages,
                        received_id: self
                            .tx
                            .received_id
                            .as_ref()
                            .map(|id| id.as_str().to_owned()),
                        reply: String::from_utf8_lossy(first_line).into_owned(),
                    });
                } else {
                    self.notice(Notice::MessageRefused { size, code });
                }
                self.tx.restart_content();
                self.reply_to_client(reply.raw());
            }
            Expect::Rset => {
                if reply.is_positive() {
                    self.tx.restart_content();
                }
                self.reply_to_client(reply.raw());
            }
            Expect::Bdat { last: false, .. } | Expect::Other => {
                self.reply_to_client(reply.raw());
            }
            Expect::Quit => {
                self.reply_to_client(reply.raw());
                self.finish(End::ClientClosed);
            }
            Expect::Greeting { .. } | Expect::IdentityEhlo { .. } | Expect::Xclient { .. } => {}
        }
    }

    /// What the backend's EHLO offered (`None`: a HELO session, nothing offered).
    fn learn_capabilities(&mut self, ehlo: Option<&Reply>) {
        self.caps = ehlo.map_or_else(BackendCapabilities::default, BackendCapabilities::from_ehlo);
        self.gate.backend_requiretls = self.caps.requiretls;
        self.gate.backend_chunking = self.caps.chunking;
    }

    /// The backend's greeting. A 220 goes on to the client's identity; anything else ends the
    /// session: passed on to a client not greeted yet, `421 4.4.1` to one that was.
    fn on_greeting(&mut self, first: bool, reply: &Reply) {
        if reply.code() == 220 {
            return self.tell_client_identity(first);
        }
        self.notice(Notice::BackendRefused {
            what: "the session at greeting",
            code: reply.code(),
        });
        if self.routed.is_some() {
            // The backend chosen for a login refused service: that login's temporary failure,
            // never another backend.
            return self.login_unavailable();
        }
        if first {
            self.reply_to_client(reply.raw());
        } else {
            let reply = local_reply::backend_unavailable(self.hostname());
            self.reply_to_client(&reply);
        }
        self.drop_backend();
        self.finish(End::BackendUnavailable);
    }

    /// `backend_client_info`, all or nothing: right after the backend's 220 and before any
    /// client command, mailfront says its own EHLO and, where the reply offers XCLIENT, sends
    /// `XCLIENT NAME=[UNAVAILABLE] ADDR=… PORT=…` ([`xclient::command`]) and reads the new 220
    /// (Postfix restarts its session: the client's own HELO/EHLO, or none, follows as the
    /// client sent it). So every session carries the client's identity however it begins, and
    /// no client text (its EHLO name) is ever an XCLIENT attribute.
    fn tell_client_identity(&mut self, first: bool) {
        if !self.settings.client_info {
            return self.backend_ready(first);
        }
        let ehlo = format!("EHLO {}\r\n", xclient::ehlo_name(&self.settings.hostname));
        if self.send(ehlo.as_bytes()) {
            self.expect_first(Expect::IdentityEhlo { first });
        }
    }

    fn on_identity_ehlo(&mut self, first: bool, reply: &Reply) {
        match reply.code() {
            421 => {
                self.reply_to_client(reply.raw());
                self.drop_backend();
                return self.finish(End::BackendClosed);
            }
            250 => {}
            code => return self.client_identity_refused("EHLO", code),
        }
        let Some(offered) = xclient::offered(reply) else {
            self.notice(Notice::ClientInfo(client_info::Notice::NotOffered));
            return self.backend_ready(first);
        };
        let facts = xclient::XclientFacts {
            client: self.settings.client,
            local: self.settings.local,
        };
        let Some(line) = xclient::command(&offered, &facts) else {
            // XCLIENT without ADDR: the one thing it is for cannot be said.
            return self.client_identity_refused("XCLIENT without ADDR", reply.code());
        };
        if self.send(&line) {
            self.expect_first(Expect::Xclient { first });
        }
    }

    fn on_xclient(&mut self, first: bool, reply: &Reply) {
        match reply.code() {
            220 => self.backend_ready(first),
            421 => {
                self.reply_to_client(reply.raw());
                self.drop_backend();
                self.finish(End::BackendClosed);
            }
            code => self.client_identity_refused("XCLIENT", code),
        }
    }

    /// The backend would not take the client's identity: `421 4.7.0`, and the session ends.
    fn client_identity_refused(&mut self, what: &str, code: u16) {
        self.notice(Notice::ClientInfo(client_info::Notice::Refused));
        let reply = local_reply::client_identity_refused(self.hostname());
        self.reply_to_client(&reply);
        self.drop_backend();
        self.finish(End::BackendProtocol(format!(
            "{what} refused ({code}) with backend_client_info"
        )));
    }

    /// The backend greeted and knows who the client is: greet a client not greeted yet, replay
    /// a lazy session's EHLO/HELO, and let commands flow.
    fn backend_ready(&mut self, first: bool) {
        self.core.phase = Phase::Ready;
        if first {
            self.greeted_client = true;
            let greeting = local_reply::greeting(self.hostname());
            self.reply_to_client(&greeting);
        }
        if std::mem::take(&mut self.replay)
            && let Some(greeting) = self.greeting.clone()
        {
            // Written anew like any forwarded command; its length was checked when the
            // cleartext EHLO/HELO was answered.
            let verb: &[u8] = if greeting.ehlo { b"EHLO " } else { b"HELO " };
            let text = [verb, greeting.name.as_slice()].concat();
            let Ok(Encoded::Line(line)) = canonical::encode(&Command::parse(&text), &text) else {
                return self.backend_lost();
            };
            if self.send(&line) {
                // EHLO ends a pipeline group (RFC 2920 §3.1), and its capabilities decide
                // the rest.
                self.expect(
                    Expect::Replay {
                        ehlo: greeting.ehlo,
                    },
                    true,
                );
            }
        }
    }

    fn on_auth_reply(&mut self, code: u16) {
        if code == 334 {
            self.mode = Mode::Sasl;
            return;
        }
        self.user_from_first_line = None;
        let verdict = match code {
            235 => {
                self.gate.authenticated = true;
                self.notice(Notice::PastLogin);
                AuthVerdict::Success
            }
            535 => AuthVerdict::Failure,
            _ => AuthVerdict::NotCompleted,
        };
        let charge = if code == 235 || (400..500).contains(&code) || matches!(code, 501 | 504) {
            Charge::Refund
        } else {
            Charge::Keep
        };
        self.settle_auth(verdict, charge);
        if self.settings.routed && code != 235 {
            // A login that did not succeed leaves no backend behind: the next one is routed
            // afresh.
            self.leave_backend();
        }
    }

    /// The AUTH exchange in flight ended: one notice, which settles its charge.
    fn settle_auth(&mut self, verdict: AuthVerdict, charge: Charge) {
        if std::mem::take(&mut self.auth_charged) {
            let mechanism = self.auth_mechanism.clone();
            self.notice(Notice::Auth {
                verdict,
                mechanism,
                charge,
            });
        }
    }

    /// After the backend's 354: the Received field first (TLS only), then content.
    fn start_data(&mut self) {
        if self.tls.is_some() {
            let header = self.received_field();
            if !self.send(&header) {
                return;
            }
            self.notice(Notice::ReceivedFieldAdded);
        }
        self.mode = Mode::Data {
            scanner: DataScanner::new(),
            failed: false,
        };
    }

    /// The Received field for the current transaction (RFC 5321 §4.4, RFC 8314 §4.3).
    fn received_field(&mut self) -> Vec<u8> {
        let Some(tls) = self.tls else {
            return Vec::new();
        };
        let id = (self.settings.received_id)();
        let (ehlo, helo) = self
            .greeting
            .as_ref()
            .map_or((true, &b""[..]), |g| (g.ehlo, g.name.as_slice()));
        let recipient = (self.tx.accepted_rcpts == 1)
            .then_some(self.tx.recipient.as_deref())
            .flatten();
        let header = received_header(&ReceivedInfo {
            helo,
            client_ip: self.settings.client.ip(),
            hostname: &self.settings.hostname,
            protocol: WithProtocol::for_session(ehlo, self.gate.authenticated),
            id: &id,
            recipient,
            cipher: TlsCipher::negotiated(tls.cipher),
            group: tls.iana_group_name(),
            date: (self.settings.clock)(),
        });
        self.tx.received_id = Some(id);
        header
    }
}

impl ClientEvents for SmtpMachine {
    type Event = Event;

    fn may_take_event(&self) -> bool {
        match self.core.phase {
            // Not while a routed login waits for its charge.
            Phase::Cleartext | Phase::Local => {
                (self.held.is_none() || self.owed == 0) && self.charge != ChargeState::Asked
            }
            Phase::Ready => match self.mode {
                Mode::Data { .. } | Mode::Chunk { .. } => true,
                _ => !self.blocked(),
            },
            _ => false,
        }
    }

    fn parse_event(&mut self) -> Step<Event> {
        if let Some(line) = self.held.take() {
            return Step {
                consumed: 0,
                event: Some(Event::Line(line)),
            };
        }
        let line_mode = match self.mode {
            Mode::Data { .. } => return self.data_step(),
            Mode::Chunk { .. } => return self.chunk_step(),
            Mode::Sasl => LineMode::SaslResponse,
            Mode::Command | Mode::Closing => LineMode::Command,
        };
        let input = &self.core.cbuf;
        let (n, result) = self.receiver.receive(input, line_mode);
        let consumed = n.max(1).min(input.len());
        let event = match result {
            Ok(None) => None,
            Ok(Some(line)) => Some(Event::Line(line)),
            Err(error) => Some(Event::TooLong(error)),
        };
        Step { consumed, event }
    }

    fn on_cleartext(&mut self, event: Event) {
        match event {
            Event::Line(line) => self.on_cleartext_line(line),
            Event::TooLong(error) => self.on_too_long(error),
            content => self.on_content(content),
        }
    }

    fn on_event(&mut self, event: Event) {
        match event {
            Event::Line(line) if self.core.phase == Phase::Local => self.on_local_line(line),
            Event::Line(line) => self.on_line(line),
            Event::TooLong(error) => self.on_too_long(error),
            content => self.on_content(content),
        }
    }
}

impl Machine for SmtpMachine {
    const PROTOCOL: &'static str = "smtp";
    /// One read from the client is also the most message content handled at once: large
    /// reads keep the per-octet cost of streaming content low.
    const READ_CHUNK: usize = 64 * 1024;

    fn core(&mut self) -> &mut Core {
        &mut self.core
    }

    fn core_ref(&self) -> &Core {
        &self.core
    }

    fn next(&self) -> Next {
        if self.charge == ChargeState::Asked {
            return Next::ChargeLogin;
        }
        self.core.next()
    }

    fn login_charge(&mut self, granted: bool) {
        if self.charge != ChargeState::Asked {
            return;
        }
        if self.routed.is_some() {
            self.routed_charge(granted);
            return self.pump();
        }
        if granted {
            self.charge = ChargeState::Granted;
        } else {
            // Answered here, in order with the replies owed: nothing reaches the backend.
            self.charge = ChargeState::None;
            self.held = None;
            let mechanism = self.auth_mechanism.clone();
            self.notice(Notice::AuthThrottled { mechanism });
            self.local(local_reply::AUTH_THROTTLED);
        }
        self.pump();
    }

    fn client_input(&mut self, bytes: &[u8]) -> bool {
        let was_waiting = self.waiting_for_backend();
        if !self.stream_directly(bytes) {
            self.core.cbuf.extend_from_slice(bytes);
        }
        self.pump();
        !was_waiting
    }

    fn take_passthrough(&mut self) -> Option<std::ops::Range<usize>> {
        self.passthrough.take()
    }

    fn backend_input(&mut self, bytes: &[u8]) -> bool {
        self.core.bbuf.extend_from_slice(bytes);
        let progressed = self.take_replies();
        self.pump();
        progressed
    }

    fn backend_connected(&mut self) {
        self.link = Link::Up;
        self.core.phase = Phase::Greeting;
        self.core.bbuf.clear();
        self.replies = ReplyReceiver::default();
        self.expect_first(Expect::Greeting {
            first: !self.greeted_client,
        });
    }

    fn backend_closed(&mut self) {
        if self.ended() || self.link != Link::Up {
            return;
        }
        if self.settings.routed && self.auth_charged {
            // The backend of a routed login went away before the login's end: its temporary
            // failure, and the session goes on without a backend (the driver dropped it).
            self.link = Link::Dropped;
            self.login_unavailable();
            return self.pump();
        }
        match &mut self.mode {
            // Consume the rest of the message; the client then gets 421 at its end.
            Mode::Data { failed, .. } | Mode::Chunk { failed, .. } => {
                *failed = true;
                self.link = Link::Dropped;
                self.core.to_backend.clear();
            }
            _ => {
                // An unsolicited 421 before the close is the backend's own goodbye.
                let (_, parsed) = self.replies.receive(&self.core.bbuf);
                if let Ok(Some(reply)) = parsed
                    && reply.code() == 421
                {
                    self.reply_to_client(reply.raw());
                    self.link = Link::Dropped;
                    return self.finish(End::BackendClosed);
                }
                self.backend_lost();
            }
        }
    }

    fn backend_failed(&mut self) {
        self.backend_closed();
    }

    fn login_facts(&self) -> Option<LoginFacts> {
        if !self.settings.routed {
            return None;
        }
        let login = self.routed.as_ref()?;
        Some(LoginFacts {
            user: login.user.clone()?,
            password: login.password.clone(),
            mechanism: self.auth_mechanism.clone(),
            helo: self
                .greeting
                .as_ref()
                .map(|g| g.name.clone())
                .filter(|name| !name.is_empty()),
        })
    }

    fn route_failed(&mut self, failure: RouteFailure) {
        if self.ended() {
            return;
        }
        if self.routed.is_none() {
            if self.core.phase == Phase::Connecting {
                // Not a login (a MAIL where mail needs no login): as when a connect fails.
                let bye = self.bye_unavailable();
                self.reply_to_client(&bye);
                self.finish(End::BackendUnavailable);
            }
            return;
        }
        match failure {
            RouteFailure::Refused {
                text,
                smtp_code,
                go_on,
            } => {
                self.settle_auth(AuthVerdict::Failure, Charge::Keep);
                self.leave_backend();
                let reply = local_reply::auth_refused(smtp_code.as_deref(), &text);
                self.local(&reply);
                if !go_on {
                    // As nginx: a refusal without `Auth-Wait` ends the session.
                    return self.finish(End::LoginRefused);
                }
            }
            RouteFailure::Unavailable => self.login_unavailable(),
        }
        self.pump();
    }

    fn tls_started(&mut self, tls: TlsFacts) {
        // RFC 3207 §4.2: the client forgets everything it learned, so does mailfront.
        self.tls = Some(tls);
        self.gate.client_tls = true;
        self.gate.needs_ehlo = true;
        self.greeting = None;
        self.tx = Transaction::default();
        self.mode = Mode::Command;
        self.receiver.reset();
        self.core.cbuf.clear();
        self.learn_capabilities(None);
        self.link = Link::NotYet;
        // No backend until a command needs it, as on 465.
        self.core.phase = Phase::Local;
    }

    fn wants_client_input(&self, hold_limit: usize) -> bool {
        if self.core.cbuf.len() >= hold_limit {
            return false;
        }
        match self.core.phase {
            Phase::Cleartext | Phase::Local => true,
            Phase::Greeting | Phase::Ready => match self.mode {
                Mode::Data { .. } | Mode::Chunk { .. } => true,
                _ => self.owed == 0 && self.charge != ChargeState::Asked,
            },
            _ => false,
        }
    }

    fn wants_backend_input(&self) -> bool {
        self.owed > 0 || self.core.bbuf.len() < UNSOLICITED_HOLD
    }

    fn take_backend_close(&mut self) -> bool {
        std::mem::take(&mut self.close_backend)
    }

    fn waiting_for_backend(&self) -> bool {
        self.core.phase == Phase::Greeting
            || (self.owed > 0 && !matches!(self.mode, Mode::Data { .. } | Mode::Chunk { .. }))
    }

    fn waits_for_verdict(&self) -> bool {
        matches!(
            self.pending.front(),
            Some(Pending::Backend {
                expect: Expect::DataEnd { .. } | Expect::Bdat { .. },
                ..
            })
        )
    }

    fn shutdown_begun(&mut self) {
        self.draining = true;
        self.check_stop();
    }

    fn client_info_warning(problem: client_info::Notice) -> &'static str {
        match problem {
            client_info::Notice::NotOffered => {
                "the backend's EHLO does not offer XCLIENT (Postfix: smtpd_authorized_xclient_hosts must list mailfront); sessions go on as mailfront's own, so the backend must not trust mailfront's address (mynetworks) for relaying"
            }
            client_info::Notice::Refused => {
                "the backend refused the client's identity; sessions are closed with 421 until it accepts XCLIENT"
            }
        }
    }

    fn bye_unavailable(&self) -> Vec<u8> {
        local_reply::backend_unavailable(self.hostname())
    }

    fn bye_backend_timeout(&self) -> Vec<u8> {
        local_reply::timeout(self.hostname())
    }

    fn bye_idle(&self) -> Vec<u8> {
        local_reply::timeout(self.hostname())
    }

    fn bye_login_timeout(&self) -> Vec<u8> {
        local_reply::login_timeout(self.hostname())
    }

    fn bye_shutdown(&self) -> Vec<u8> {
        local_reply::shutting_down(self.hostname())
    }
}

/// The LOGIN mechanism, whose user name and password come as two responses of their own.
fn is_login_mechanism(mechanism: &[u8]) -> bool {
    mechanism.eq_ignore_ascii_case(b"LOGIN")
}

fn bare_name(kind: BareLineEnding) -> &'static str {
    match kind {
        BareLineEnding::Cr => "cr",
        BareLineEnding::Lf => "lf",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::line::split::CHUNKS;
    use crate::machine::testing::{Throttle, check_charges, tls13};

    const HOST: &str = "mx.example";
    const EHLO_REPLY: &str =
        "250-backend\r\n250-PIPELINING\r\n250-AUTH PLAIN\r\n250-CHUNKING\r\n250 SIZE 10000000\r\n";

    fn settings(listener: TlsMode) -> Settings {
        Settings {
            listener,
            require_tls_for_mail: true,
            hostname: HOST.to_owned(),
            line_limit: 2048,
            auth_line_limit: 12288,
            client_info: false,
            client: "192.0.2.7:40000".parse().unwrap(),
            local: "198.51.100.1:465".parse().unwrap(),
            clock: || OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap(),
            received_id: || ReceivedId::new("FIXEDID").unwrap(),
            learned_ehlo: None,
            routed: false,
        }
    }

    /// The driver, played: connects when asked, answers charges with `grant`, and finishes a
    /// STARTTLS handshake at once.
    struct Run {
        m: SmtpMachine,
        client: Vec<u8>,
        backend: Vec<u8>,
        notices: Vec<Notice>,
        closes: usize,
        grant: bool,
        /// When set, charges are answered and settled by the throttle (which checks that
        /// every verdict settles a charge) instead of `grant`.
        throttle: Option<Throttle>,
        /// What the machine said at each [`Next::Connect`] ([`Machine::login_facts`]).
        facts: Vec<Option<LoginFacts>>,
        /// The router's answers to the next connects; a connect with none left succeeds.
        routes: VecDeque<RouteFailure>,
    }

    impl Run {
        fn new(listener: TlsMode) -> Run {
            let tls = (listener == TlsMode::Implicit).then(tls13);
            Run::with(settings(listener), tls)
        }

        fn with(settings: Settings, tls: Option<TlsFacts>) -> Run {
            let mut run = Run {
                m: SmtpMachine::new(settings, tls),
                client: Vec::new(),
                backend: Vec::new(),
                notices: Vec::new(),
                closes: 0,
                grant: true,
                throttle: None,
                facts: Vec::new(),
                routes: VecDeque::new(),
            };
            run.settle();
            run
        }

        fn settle(&mut self) {
            loop {
                match self.throttle.as_mut() {
                    Some(throttle) => {
                        throttle.run(&mut self.m);
                        self.notices.append(&mut throttle.notices);
                    }
                    None => self.notices.extend(self.m.take_notices()),
                }
                self.backend.extend(self.m.take_to_backend());
                self.client.extend(self.m.take_to_client());
                if self.m.take_backend_close() {
                    self.closes += 1;
                }
                match self.m.next() {
                    Next::ChargeLogin => self.m.login_charge(self.grant),
                    Next::Connect => {
                        self.facts.push(self.m.login_facts());
                        match self.routes.pop_front() {
                            Some(failure) => self.m.route_failed(failure),
                            None => self.m.backend_connected(),
                        }
                    }
                    Next::StartTls => self.m.tls_started(tls13()),
                    _ => return,
                }
            }
        }

        fn client(&mut self, bytes: &str) {
            self.feed(bytes.as_bytes());
        }

        /// Client bytes, as the driver gives them: the backend output first, then the content
        /// the machine named in place.
        fn feed(&mut self, bytes: &[u8]) {
            self.m.client_input(bytes);
            self.backend.extend(self.m.take_to_backend());
            if let Some(range) = self.m.take_passthrough() {
                self.backend.extend_from_slice(&bytes[range]);
            }
            self.settle();
        }

        fn backend(&mut self, bytes: &str) {
            self.m.backend_input(bytes.as_bytes());
            self.settle();
        }

        fn take_client(&mut self) -> String {
            String::from_utf8(std::mem::take(&mut self.client)).unwrap()
        }

        fn take_backend(&mut self) -> String {
            String::from_utf8(std::mem::take(&mut self.backend)).unwrap()
        }

        /// An implicit session past the greeting and EHLO.
        fn ready() -> Run {
            let mut run = Run::new(TlsMode::Implicit);
            run.client("EHLO me\r\n");
            run.backend("220 backend ESMTP\r\n");
            run.backend(EHLO_REPLY);
            run.take_client();
            run.take_backend();
            run
        }
    }

    #[test]
    fn an_implicit_session_is_greeted_at_once_and_the_first_ehlo_connects() {
        let mut run = Run::new(TlsMode::Implicit);
        assert_eq!(run.take_client().as_bytes(), local_reply::greeting(HOST));
        assert_eq!(run.m.core.phase, Phase::Local, "no backend yet");
        run.client("ehlo   me\r\n");
        // No backend has told this listener its capabilities yet: the EHLO connects.
        assert_eq!(run.take_client(), "");
        run.backend("220 internal.host ESMTP Postfix\r\n");
        assert_eq!(run.take_client(), "", "the backend's greeting is swallowed");
        assert_eq!(run.take_backend(), "EHLO me\r\n");
        run.backend(EHLO_REPLY);
        let ehlo = run.take_client();
        assert!(
            ehlo.contains("AUTH PLAIN") && !ehlo.contains("backend"),
            "{ehlo}"
        );
        assert!(
            run.notices
                .contains(&Notice::BackendEhlo(EHLO_REPLY.as_bytes().to_vec()))
        );
        run.client("QUIT\r\n");
        run.backend("221 bye\r\n");
        assert_eq!(run.take_client(), "221 bye\r\n");
        assert_eq!(run.m.next(), Next::End(End::ClientClosed));
    }

    /// An implicit session of a listener that learned its backend's EHLO.
    fn learned() -> Run {
        let mut settings = settings(TlsMode::Implicit);
        settings.learned_ehlo = Some(EHLO_REPLY.as_bytes().to_vec());
        let mut run = Run::with(settings, Some(tls13()));
        run.take_client();
        run
    }

    #[test]
    fn a_session_that_never_authenticates_opens_no_backend() {
        let mut run = learned();
        run.client("EHLO me\r\nNOOP\r\nRSET\r\nRCPT TO:<b@example.org>\r\nFOO\r\nQUIT\r\n");
        let replies = run.take_client();
        assert!(replies.starts_with("250-mx.example\r\n"), "{replies}");
        assert!(
            replies.contains("AUTH PLAIN") && replies.contains("CHUNKING"),
            "{replies}"
        );
        assert!(
            replies.ends_with(
                "250 2.0.0 Ok\r\n250 2.0.0 Ok\r\n503 5.5.1 Error: need MAIL command\r\n\
             500 5.5.1 Error: command not recognized\r\n221 2.0.0 Bye\r\n"
            ),
            "{replies}"
        );
        assert_eq!(run.m.next(), Next::End(End::ClientClosed));
        assert_eq!(run.take_backend(), "", "nothing was ever connected");
    }

    #[test]
    fn auth_connects_and_replays_the_ehlo_before_it() {
        let mut run = learned();
        run.client("EHLO me\r\nAUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n");
        assert!(run.take_client().contains("AUTH PLAIN"));
        assert_eq!(run.take_backend(), "", "connecting");
        run.backend("220 backend ESMTP\r\n");
        assert_eq!(
            run.take_backend(),
            "EHLO me\r\n",
            "the client's EHLO, replayed"
        );
        run.backend(EHLO_REPLY);
        assert_eq!(
            run.take_client(),
            "",
            "the replayed EHLO's reply is swallowed"
        );
        assert_eq!(run.take_backend(), "AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n");
        run.backend("235 2.7.0 ok\r\n");
        assert_eq!(run.take_client(), "235 2.7.0 ok\r\n");
    }

    #[test]
    fn a_backend_refusing_at_greeting_gives_a_temporary_failure() {
        let mut run = learned();
        run.client("EHLO me\r\nMAIL FROM:<a@example.org>\r\n");
        run.take_client();
        run.backend("554 go away\r\n");
        assert!(run.take_client().starts_with("421 4.4.1"));
        assert_eq!(run.m.next(), Next::End(End::BackendUnavailable));
    }

    #[test]
    fn auth_is_charged_before_it_leaves_and_settled_by_the_backend() {
        let mut run = Run::ready();
        run.m.client_input(b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n");
        assert_eq!(run.m.take_passthrough(), None);
        assert_eq!(run.m.next(), Next::ChargeLogin);
        assert!(
            run.m.take_to_backend().is_empty(),
            "nothing before the charge"
        );
        run.settle();
        assert_eq!(run.take_backend(), "AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n");
        run.backend("235 2.7.0 Authentication successful\r\n");
        assert_eq!(run.take_client(), "235 2.7.0 Authentication successful\r\n");
        assert!(run.notices.contains(&Notice::Auth {
            verdict: AuthVerdict::Success,
            mechanism: "PLAIN".into(),
            charge: Charge::Refund,
        }));
        assert!(run.notices.contains(&Notice::PastLogin));
        assert!(run.notices.contains(&Notice::User(b"alice".to_vec())));
    }

    #[test]
    fn a_throttled_auth_is_answered_here_and_never_forwarded() {
        let mut run = Run::ready();
        run.grant = false;
        run.client("AUTH PLAIN AGFsaWNlAHdyb25n\r\nNOOP\r\n");
        assert_eq!(run.take_backend(), "NOOP\r\n");
        run.backend("250 2.0.0 Ok\r\n");
        assert_eq!(
            run.take_client(),
            format!(
                "{}250 2.0.0 Ok\r\n",
                String::from_utf8_lossy(local_reply::AUTH_THROTTLED)
            )
        );
        assert!(run.notices.contains(&Notice::AuthThrottled {
            mechanism: "PLAIN".into()
        }));
    }

    #[test]
    fn data_carries_one_received_field_and_the_content_byte_exact() {
        let mut run = Run::ready();
        run.client("MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n");
        assert_eq!(
            run.take_backend(),
            "MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n"
        );
        run.backend("250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 go ahead\r\n");
        let header = run.take_backend();
        assert!(
            header.starts_with("Received: from me (unknown [192.0.2.7])"),
            "{header}"
        );
        assert!(header.contains("FIXEDID") && header.contains("for <b@example.org>"));
        let content = "Subject: hi\r\n\r\n..dot-stuffed\r\nbody\r\n.\r\n";
        run.client(content);
        assert_eq!(run.take_backend(), content);
        assert!(run.m.waits_for_verdict());
        run.backend("250 2.0.0 Ok: queued as ABC\r\n");
        assert!(
            run.take_client()
                .ends_with("354 go ahead\r\n250 2.0.0 Ok: queued as ABC\r\n")
        );
        assert!(run.notices.iter().any(|n| matches!(
            n,
            Notice::MessageAccepted { number: 1, received_id: Some(id), .. } if id == "FIXEDID"
        )));
        assert_eq!(
            run.notices
                .iter()
                .filter(|n| **n == Notice::ReceivedFieldAdded)
                .count(),
            1
        );
    }

    #[test]
    fn message_content_is_named_in_the_read_buffer_not_copied() {
        let mut run = Run::ready();
        run.client("MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n");
        run.backend("250 Ok\r\n250 Ok\r\n354 go ahead\r\n");
        run.take_backend();
        let content = b"Subject: x\r\n\r\nline one\r\nline two\r\n";
        run.m.client_input(content);
        assert!(run.m.take_to_backend().is_empty(), "nothing copied");
        let range = run.m.take_passthrough().unwrap();
        assert!(content.starts_with(&content[range]));
        // A read that ends a BDAT chunk and holds the next command is copied instead, so the
        // command can never overtake the chunk.
        let mut run = Run::ready();
        run.client("MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\n");
        run.backend("250 Ok\r\n250 Ok\r\n");
        run.client("BDAT 4\r\n");
        run.take_backend();
        run.m.client_input(b"abcdNOOP\r\n");
        assert_eq!(run.m.take_passthrough(), None);
        assert_eq!(run.m.take_to_backend(), b"abcdNOOP\r\n");
    }

    #[test]
    fn a_bare_lf_in_content_drops_the_backend_and_the_message_never_completes() {
        let mut run = Run::ready();
        run.client("MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n");
        run.backend("250 Ok\r\n250 Ok\r\n354 go ahead\r\n");
        run.take_backend();
        run.client("line\nsmuggled\r\n.\r\nNOOP\r\n");
        assert_eq!(run.closes, 1);
        assert!(!run.take_backend().contains("smuggled"));
        let client = run.take_client();
        assert!(client.contains("554 5.6.0"), "{client}");
        assert!(
            client.ends_with("4.7.0 closing\r\n") || client.contains("421"),
            "{client}"
        );
        assert!(matches!(run.m.next(), Next::End(End::ProtocolViolation(_))));
    }

    #[test]
    fn starttls_drops_what_was_pipelined_and_the_backend_comes_only_after_the_handshake() {
        let mut run = Run::new(TlsMode::Starttls);
        assert_eq!(run.take_client().as_bytes(), local_reply::greeting(HOST));
        run.client("EHLO me\r\nAUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n");
        let replies = run.take_client();
        assert!(
            replies.contains("STARTTLS") && replies.contains("530 5.7.0"),
            "{replies}"
        );
        assert!(
            run.notices
                .iter()
                .any(|n| matches!(n, Notice::CleartextAuthRefused { .. }))
        );
        run.client("STARTTLS\r\nMAIL FROM:<evil@example.org>\r\n");
        assert_eq!(run.take_client(), "220 2.0.0 Ready to start TLS\r\n");
        assert!(
            run.notices
                .contains(&Notice::PipelinedAfterStartTls { octets: 30 })
        );
        // The played driver finished the handshake; nothing needs the backend yet.
        assert_eq!(run.m.core.phase, Phase::Local);
        run.client("MAIL FROM:<a@example.org>\r\n");
        assert!(
            run.take_client().starts_with("503 5.5.1"),
            "EHLO first after TLS"
        );
        run.client("EHLO me\r\n");
        run.backend("220 backend ESMTP\r\n");
        assert_eq!(run.take_client(), "", "the backend's greeting is swallowed");
        assert_eq!(run.take_backend(), "EHLO me\r\n");
    }

    #[test]
    fn a_drain_lets_the_message_underway_finish_then_says_421() {
        let mut run = Run::ready();
        run.client("MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n");
        run.backend("250 Ok\r\n250 Ok\r\n354 go ahead\r\n");
        run.client("part one\r\n");
        run.m.shutdown_begun();
        run.settle();
        assert_eq!(run.m.next(), Next::Run, "the message goes on");
        run.client("part two\r\n.\r\n");
        run.backend("250 2.0.0 Ok: queued\r\n");
        let client = run.take_client();
        assert!(
            client.contains("250 2.0.0 Ok: queued\r\n421 4.3.2"),
            "{client}"
        );
        assert_eq!(run.m.next(), Next::End(End::Shutdown));
    }

    #[test]
    fn a_drain_with_no_message_underway_says_421_at_once() {
        let mut run = Run::ready();
        run.m.shutdown_begun();
        run.settle();
        assert!(run.take_client().starts_with("421 4.3.2"));
        assert_eq!(run.m.next(), Next::End(End::Shutdown));
    }

    #[test]
    fn without_pipelining_one_command_at_a_time_reaches_the_backend() {
        let mut run = Run::new(TlsMode::Implicit);
        run.client("EHLO me\r\n");
        run.backend("220 backend ESMTP\r\n");
        run.backend("250-backend\r\n250 SIZE 1000\r\n");
        run.take_backend();
        run.client("MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\n");
        assert_eq!(run.take_backend(), "MAIL FROM:<a@example.org>\r\n");
        assert!(!run.m.wants_client_input(1 << 20), "replies first");
        run.backend("250 Ok\r\n");
        assert_eq!(run.take_backend(), "RCPT TO:<b@example.org>\r\n");
    }

    /// A small Postfix: answers every line it gets, content included.
    fn postfix(run: &mut Run, in_data: &mut bool, pending: &mut Vec<u8>, seen: &mut Vec<u8>) {
        seen.extend_from_slice(&run.backend);
        pending.append(&mut run.backend);
        while let Some(end) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let reply = if *in_data {
                if line == b".\r\n" {
                    *in_data = false;
                    "250 2.0.0 Ok: queued\r\n"
                } else {
                    continue;
                }
            } else if line.starts_with(b"EHLO") {
                EHLO_REPLY
            } else if line.starts_with(b"DATA") {
                *in_data = true;
                "354 go ahead\r\n"
            } else if line.starts_with(b"QUIT") {
                "221 bye\r\n"
            } else {
                "250 Ok\r\n"
            };
            run.m.backend_input(reply.as_bytes());
            run.settle();
            seen.extend_from_slice(&run.backend);
            pending.append(&mut run.backend);
        }
    }

    #[test]
    fn what_either_side_sees_does_not_depend_on_how_reads_split() {
        let input = "EHLO me\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nDATA\r\nSubject: x\r\n\r\nbody\r\n.\r\nNOOP\r\nQUIT\r\n";
        let transcript = |chunk: usize| {
            let mut run = Run::new(TlsMode::Implicit);
            let mut seen = Vec::new();
            let (mut in_data, mut pending) = (false, Vec::new());
            let mut greeted = false;
            for piece in input.as_bytes().chunks(chunk) {
                run.feed(piece);
                if !greeted && run.m.waiting_for_backend() {
                    greeted = true;
                    run.backend("220 backend ESMTP\r\n");
                }
                postfix(&mut run, &mut in_data, &mut pending, &mut seen);
            }
            (
                String::from_utf8(seen).unwrap(),
                run.take_client(),
                run.m.next(),
            )
        };
        let whole = transcript(input.len());
        assert!(whole.0.contains("Received: ") && whole.0.contains("body\r\n.\r\n"));
        assert!(
            whole
                .1
                .ends_with("250 2.0.0 Ok: queued\r\n250 Ok\r\n221 bye\r\n"),
            "{}",
            whole.1
        );
        assert_eq!(whole.2, Next::End(End::ClientClosed));
        for chunk in CHUNKS {
            assert_eq!(transcript(chunk), whole, "chunk {chunk}");
        }
    }

    // ---- routed sessions ---------------------------------------------------------------------

    /// What a routed listener learned: mechanisms that can and cannot be routed.
    const ROUTED_EHLO: &str = "250-backend\r\n250-PIPELINING\r\n250-AUTH PLAIN LOGIN CRAM-MD5 SCRAM-SHA-256 GSSAPI\r\n250-AUTH=CRAM-MD5\r\n250-CHUNKING\r\n250 SIZE 10000000\r\n";
    /// `\0alice\0secret` and `\0bob\0pw`.
    const ALICE: &str = "AGFsaWNlAHNlY3JldA==";
    const BOB: &str = "AGJvYgBwdw==";
    /// `alice` and `secret`, LOGIN's two responses.
    const ALICE_NAME: &str = "YWxpY2U=";
    const SECRET: &str = "c2VjcmV0";

    /// An implicit session of a routed listener, greeted (and its greeting taken); `learned`:
    /// the listener learned [`ROUTED_EHLO`].
    fn routed(learned: bool) -> Run {
        let mut settings = settings(TlsMode::Implicit);
        settings.routed = true;
        settings.learned_ehlo = learned.then(|| ROUTED_EHLO.as_bytes().to_vec());
        let mut run = Run::with(settings, Some(tls13()));
        run.throttle = Some(Throttle::new(10, 0));
        run.take_client();
        run
    }

    fn facts(
        user: &str,
        password: Option<&str>,
        mechanism: &str,
        helo: Option<&str>,
    ) -> LoginFacts {
        LoginFacts {
            user: user.as_bytes().to_vec(),
            password: password.map(|p| zeroize::Zeroizing::new(p.as_bytes().to_vec())),
            mechanism: mechanism.to_owned(),
            helo: helo.map(|h| h.as_bytes().to_vec()),
        }
    }

    fn charged(run: &Run) -> u32 {
        run.throttle.as_ref().map_or(0, |t| t.charged)
    }

    /// The backend's side of a routed login up to its AUTH: greeting, then the replayed EHLO.
    fn greet_and_replay(run: &mut Run) {
        run.backend("220 backend ESMTP\r\n");
        assert_eq!(
            run.take_backend(),
            "EHLO me\r\n",
            "the client's EHLO, replayed"
        );
        run.backend(EHLO_REPLY);
        assert_eq!(
            run.take_client(),
            "",
            "the replayed EHLO's reply is swallowed"
        );
    }

    #[test]
    fn a_routed_session_connects_for_nothing_but_a_complete_login() {
        let table: &[(&str, &str)] = &[
            ("EHLO again\r\n", "250-mx.example\r\n"),
            ("HELO me\r\n", "250 mx.example\r\n"),
            ("NOOP\r\n", "250 2.0.0 Ok\r\n"),
            ("RSET\r\n", "250 2.0.0 Ok\r\n"),
            (
                "MAIL FROM:<a@example.org>\r\n",
                "530 5.7.0 Authentication required\r\n",
            ),
            ("VRFY bob\r\n", "530 5.7.0 Authentication required\r\n"),
            ("EXPN list\r\n", "530 5.7.0 Authentication required\r\n"),
            ("HELP\r\n", "530 5.7.0 Authentication required\r\n"),
            ("RCPT TO:<b@example.org>\r\n", "503 5.5.1"),
            ("DATA\r\n", "503 5.5.1"),
            ("BDAT 3 LAST\r\nabc", "50"),
            ("FOO\r\n", "500 5.5.1"),
            ("STARTTLS\r\n", "554 5.5.1"),
            ("XCLIENT ADDR=192.0.2.1\r\n", "500 5.5.1"),
            (
                "AUTH CRAM-MD5\r\n",
                "504 5.5.4 Unrecognized authentication type\r\n",
            ),
            ("AUTH GSSAPI\r\n", "504 5.5.4"),
            ("AUTH EXTERNAL =\r\n", "504 5.5.4"),
            ("AUTH PLAIN !!\r\n", "501 5.5.4 Syntax: AUTH"),
            // Exchanges not complete yet: mailfront's own challenges.
            ("AUTH PLAIN\r\n", "334 \r\n"),
            ("AUTH SCRAM-SHA-256\r\n", "334 \r\n"),
            ("AUTH LOGIN\r\n", "334 VXNlcm5hbWU6\r\n"),
            ("AUTH LOGIN YWxpY2U=\r\n", "334 UGFzc3dvcmQ6\r\n"),
            (
                "AUTH LOGIN\r\nYWxpY2U=\r\n",
                "334 VXNlcm5hbWU6\r\n334 UGFzc3dvcmQ6\r\n",
            ),
            // Cancelled, or not base64: answered here, nothing charged.
            (
                "AUTH PLAIN\r\n*\r\n",
                "334 \r\n501 5.7.0 Authentication aborted\r\n",
            ),
            (
                "AUTH LOGIN YWxpY2U=\r\n*\r\n",
                "334 UGFzc3dvcmQ6\r\n501 5.7.0 Authentication aborted\r\n",
            ),
            (
                "AUTH PLAIN\r\n!!!!\r\n",
                "334 \r\n501 5.5.2 Cannot decode response\r\n",
            ),
            ("AUTH PLAIN\r\nQUIT\nNOOP\r\n", "334 \r\n500 5.5.2"),
            ("QUIT\r\n", "221 2.0.0 Bye\r\n"),
        ];
        for learned in [true, false] {
            for (input, reply) in table {
                let mut run = routed(learned);
                run.client("EHLO me\r\n");
                assert!(run.take_client().starts_with("250-mx.example\r\n"));
                run.client(input);
                let client = run.take_client();
                assert!(
                    client.starts_with(reply),
                    "{input:?} (learned: {learned}): {client:?}"
                );
                assert_eq!(run.facts, Vec::new(), "{input:?}: connected");
                assert_eq!(run.take_backend(), "", "{input:?}");
                assert_eq!(charged(&run), 0, "{input:?}");
                assert_ne!(run.m.next(), Next::Connect, "{input:?}");
            }
        }
    }

    #[test]
    fn a_routed_ehlo_shows_only_mechanisms_that_can_be_routed() {
        let mut run = routed(true);
        run.client("EHLO me\r\n");
        assert_eq!(
            run.take_client(),
            "250-mx.example\r\n250-PIPELINING\r\n250-AUTH PLAIN LOGIN SCRAM-SHA-256\r\n\
             250-CHUNKING\r\n250 SIZE 9998976\r\n"
        );
        // Nothing learned: the built-in list, never a connect to learn one.
        let mut run = routed(false);
        run.client("EHLO me\r\n");
        assert_eq!(
            run.take_client(),
            "250-mx.example\r\n250-PIPELINING\r\n250 AUTH PLAIN\r\n"
        );
        assert!(run.facts.is_empty());
        // Live, after the login: the backend's list, filtered the same way.
        let mut run = routed(true);
        run.client(&format!("EHLO me\r\nAUTH PLAIN {ALICE}\r\n"));
        run.take_client();
        greet_and_replay(&mut run);
        run.backend("334 \r\n");
        run.backend("235 2.7.0 ok\r\n");
        run.client("EHLO again\r\n");
        assert!(run.take_backend().ends_with("EHLO again\r\n"));
        run.backend(ROUTED_EHLO);
        let ehlo = run.take_client();
        assert!(
            ehlo.ends_with(
                "250-AUTH PLAIN LOGIN SCRAM-SHA-256\r\n250-CHUNKING\r\n250 SIZE 9998976\r\n"
            ),
            "{ehlo}"
        );
        assert!(
            !ehlo.contains("CRAM-MD5") && !ehlo.contains("GSSAPI"),
            "{ehlo}"
        );
        // A non-routable mechanism is refused here, uncharged, never forwarded.
        let mut run = routed(true);
        run.client("EHLO me\r\nAUTH cram-md5\r\nNOOP\r\n");
        assert!(
            run.take_client()
                .ends_with("504 5.5.4 Unrecognized authentication type\r\n250 2.0.0 Ok\r\n")
        );
        assert!(run.notices.contains(&Notice::CommandRefused {
            reason: "mechanism_not_routable"
        }));
        assert!(run.facts.is_empty() && run.take_backend().is_empty());
    }

    #[test]
    fn auth_plain_with_an_initial_response_is_routed_then_replayed_without_it() {
        let mut run = routed(true);
        run.client(&format!("EHLO me\r\nAUTH PLAIN {ALICE}\r\n"));
        assert!(run.take_client().starts_with("250-"), "only the EHLO reply");
        assert_eq!(
            run.facts,
            vec![Some(facts("alice", Some("secret"), "PLAIN", Some("me")))]
        );
        assert_eq!(run.take_backend(), "", "connecting");
        greet_and_replay(&mut run);
        assert_eq!(run.take_backend(), "AUTH PLAIN\r\n", "no initial response");
        run.backend("334 \r\n");
        assert_eq!(run.take_client(), "", "the backend's 334 is swallowed");
        assert_eq!(run.take_backend(), format!("{ALICE}\r\n"));
        run.backend("235 2.7.0 Authentication successful\r\n");
        assert_eq!(run.take_client(), "235 2.7.0 Authentication successful\r\n");
        assert!(run.notices.contains(&Notice::User(b"alice".to_vec())));
        assert!(run.notices.contains(&Notice::PastLogin));
        assert!(run.notices.contains(&Notice::Auth {
            verdict: AuthVerdict::Success,
            mechanism: "PLAIN".into(),
            charge: Charge::Refund,
        }));
        assert_eq!(charged(&run), 0);
        assert_eq!(run.closes, 0);
        // Past the login, commands flow to this backend.
        run.client("MAIL FROM:<a@example.org>\r\n");
        assert_eq!(run.take_backend(), "MAIL FROM:<a@example.org>\r\n");
    }

    #[test]
    fn auth_plain_without_an_initial_response_gets_mailfronts_own_challenge() {
        let mut run = routed(true);
        run.client("EHLO me\r\nAUTH plain\r\n");
        assert!(run.take_client().ends_with("250 SIZE 9998976\r\n334 \r\n"));
        assert!(run.facts.is_empty(), "the response names the user");
        run.client(&format!("{ALICE}\r\n"));
        assert_eq!(
            run.facts,
            vec![Some(facts("alice", Some("secret"), "PLAIN", Some("me")))]
        );
        greet_and_replay(&mut run);
        assert_eq!(run.take_backend(), "AUTH PLAIN\r\n");
        run.backend("334 \r\n");
        assert_eq!(run.take_backend(), format!("{ALICE}\r\n"));
        run.backend("235 2.7.0 ok\r\n");
        assert_eq!(run.take_client(), "235 2.7.0 ok\r\n");
    }

    #[test]
    fn auth_login_is_played_by_mailfront_and_replayed_to_the_backend() {
        for with_initial in [false, true] {
            let mut run = routed(true);
            run.client("EHLO me\r\n");
            run.take_client();
            if with_initial {
                run.client(&format!("AUTH LOGIN {ALICE_NAME}\r\n"));
                assert_eq!(run.take_client(), "334 UGFzc3dvcmQ6\r\n");
            } else {
                run.client("AUTH LOGIN\r\n");
                assert_eq!(run.take_client(), "334 VXNlcm5hbWU6\r\n");
                run.client(&format!("{ALICE_NAME}\r\n"));
                assert_eq!(run.take_client(), "334 UGFzc3dvcmQ6\r\n");
            }
            assert!(run.facts.is_empty());
            run.client(&format!("{SECRET}\r\n"));
            assert_eq!(
                run.facts,
                vec![Some(facts("alice", Some("secret"), "LOGIN", Some("me")))]
            );
            greet_and_replay(&mut run);
            assert_eq!(run.take_backend(), "AUTH LOGIN\r\n");
            run.backend("334 VXNlcm5hbWU6\r\n");
            assert_eq!(run.take_backend(), format!("{ALICE_NAME}\r\n"));
            run.backend("334 UGFzc3dvcmQ6\r\n");
            assert_eq!(run.take_backend(), format!("{SECRET}\r\n"));
            assert_eq!(run.take_client(), "", "both challenges swallowed");
            run.backend("235 2.7.0 ok\r\n");
            assert_eq!(run.take_client(), "235 2.7.0 ok\r\n");
            assert_eq!(charged(&run), 0);
        }
    }

    #[test]
    fn a_scram_exchange_replays_the_first_message_then_relays() {
        let mut run = routed(true);
        // `n,,n=alice,r=abc`; no EHLO: nothing to replay, and no helo for the router.
        run.client("AUTH SCRAM-SHA-256 biwsbj1hbGljZSxyPWFiYw==\r\n");
        assert_eq!(
            run.facts,
            vec![Some(facts("alice", None, "SCRAM-SHA-256", None))]
        );
        run.backend("220 backend ESMTP\r\n");
        assert_eq!(run.take_backend(), "AUTH SCRAM-SHA-256\r\n");
        run.backend("334 \r\n");
        assert_eq!(run.take_backend(), "biwsbj1hbGljZSxyPWFiYw==\r\n");
        assert_eq!(run.take_client(), "");
        // The server-first message is the client's to answer.
        run.backend("334 cj1hYmNkZWYscz1jMkZzZEE9PSxpPTQwOTY=\r\n");
        assert_eq!(
            run.take_client(),
            "334 cj1hYmNkZWYscz1jMkZzZEE9PSxpPTQwOTY=\r\n"
        );
        run.client("Yz1iaXdzLHI9YWJjZGVmLHA9cHJvb2Y=\r\n");
        assert_eq!(run.take_backend(), "Yz1iaXdzLHI9YWJjZGVmLHA9cHJvb2Y=\r\n");
        run.backend("235 2.7.0 ok\r\n");
        assert_eq!(run.take_client(), "235 2.7.0 ok\r\n");
        assert_eq!(charged(&run), 0);
    }

    #[test]
    fn mail_where_mail_needs_no_login_goes_to_the_pool_and_a_later_auth_is_routed_afresh() {
        let mut settings = settings(TlsMode::Implicit);
        settings.routed = true;
        settings.require_tls_for_mail = false;
        settings.learned_ehlo = Some(ROUTED_EHLO.as_bytes().to_vec());
        let mut run = Run::with(settings, Some(tls13()));
        run.throttle = Some(Throttle::new(10, 0));
        run.take_client();
        run.client("EHLO me\r\nMAIL FROM:<a@example.org>\r\n");
        assert!(run.take_client().starts_with("250-mx.example\r\n"));
        assert_eq!(run.facts, vec![None], "the listener's pool");
        greet_and_replay(&mut run);
        assert_eq!(run.take_backend(), "MAIL FROM:<a@example.org>\r\n");
        run.backend("250 2.1.0 Ok\r\n");
        assert_eq!(run.take_client(), "250 2.1.0 Ok\r\n");
        // RFC 4954 §4: no AUTH during the transaction, and the transaction stays.
        run.client(&format!("AUTH PLAIN {ALICE}\r\n"));
        assert_eq!(
            run.take_client(),
            "503 5.5.1 Error: MAIL transaction in progress\r\n"
        );
        assert_eq!(run.take_backend(), "");
        assert_eq!(run.closes, 0);
        // That backend was chosen before the user was known: left, and the AUTH routed.
        run.client(&format!("RSET\r\nAUTH PLAIN {ALICE}\r\n"));
        assert_eq!(run.take_backend(), "RSET\r\n");
        run.backend("250 2.0.0 Ok\r\n");
        assert_eq!(run.take_client(), "250 2.0.0 Ok\r\n");
        assert_eq!(run.take_backend(), "QUIT\r\n");
        assert_eq!(run.closes, 1);
        assert_eq!(
            run.facts,
            vec![
                None,
                Some(facts("alice", Some("secret"), "PLAIN", Some("me")))
            ]
        );
        greet_and_replay(&mut run);
        assert_eq!(run.take_backend(), "AUTH PLAIN\r\n");
        run.backend("334 \r\n");
        run.backend("235 2.7.0 ok\r\n");
        assert_eq!(run.take_client(), "235 2.7.0 ok\r\n");
    }

    #[test]
    fn a_refusing_router_answers_the_login_and_ends_only_without_go_on() {
        for go_on in [true, false] {
            let mut run = routed(true);
            run.routes.push_back(RouteFailure::Refused {
                text: "Invalid login or password".into(),
                smtp_code: go_on.then(|| "535 5.7.0".to_owned()),
                go_on,
            });
            run.client(&format!("EHLO me\r\nAUTH PLAIN {ALICE}\r\nNOOP\r\n"));
            let client = run.take_client();
            assert_eq!(run.facts.len(), 1);
            assert!(run.notices.contains(&Notice::Auth {
                verdict: AuthVerdict::Failure,
                mechanism: "PLAIN".into(),
                charge: Charge::Keep,
            }));
            assert_eq!(charged(&run), 1, "kept");
            assert_eq!(run.take_backend(), "");
            if go_on {
                assert!(
                    client.ends_with("535 5.7.0 Invalid login or password\r\n250 2.0.0 Ok\r\n"),
                    "{client}"
                );
                assert_eq!(run.m.next(), Next::Run);
            } else {
                assert!(
                    client.ends_with("535 5.7.8 Invalid login or password\r\n"),
                    "{client}"
                );
                assert_eq!(run.m.next(), Next::End(End::LoginRefused));
            }
        }
    }

    #[test]
    fn no_backend_now_is_a_temporary_failure_and_the_next_login_is_routed_again() {
        let mut run = routed(true);
        run.routes.push_back(RouteFailure::Unavailable);
        run.client(&format!("EHLO me\r\nAUTH PLAIN {ALICE}\r\n"));
        assert!(
            run.take_client()
                .ends_with("454 4.7.0 Temporary authentication failure\r\n")
        );
        assert!(run.notices.contains(&Notice::Auth {
            verdict: AuthVerdict::NotCompleted,
            mechanism: "PLAIN".into(),
            charge: Charge::Refund,
        }));
        assert_eq!(charged(&run), 0, "refunded");
        assert_eq!(run.m.next(), Next::Run);
        run.client(&format!("AUTH PLAIN {BOB}\r\n"));
        assert_eq!(
            run.facts,
            vec![
                Some(facts("alice", Some("secret"), "PLAIN", Some("me"))),
                Some(facts("bob", Some("pw"), "PLAIN", Some("me"))),
            ]
        );
        greet_and_replay(&mut run);
        assert_eq!(run.take_backend(), "AUTH PLAIN\r\n");
        run.backend("334 \r\n");
        assert_eq!(run.take_backend(), format!("{BOB}\r\n"));
        run.backend("235 2.7.0 ok\r\n");
        assert_eq!(run.take_client(), "235 2.7.0 ok\r\n");
    }

    #[test]
    fn a_login_the_backend_refuses_leaves_no_backend_and_the_next_is_routed_afresh() {
        let mut run = routed(true);
        run.client(&format!("EHLO me\r\nAUTH PLAIN {ALICE}\r\n"));
        run.take_client();
        greet_and_replay(&mut run);
        run.backend("334 \r\n");
        run.take_backend();
        run.backend("535 5.7.8 Error: authentication failed\r\n");
        assert_eq!(
            run.take_client(),
            "535 5.7.8 Error: authentication failed\r\n"
        );
        assert_eq!(run.take_backend(), "QUIT\r\n", "a goodbye, then the close");
        assert_eq!(run.closes, 1);
        assert_eq!(run.m.core.phase, Phase::Local);
        assert_eq!(charged(&run), 1);
        // Another user, who may live elsewhere: a fresh connect with new facts.
        run.client(&format!("AUTH PLAIN {BOB}\r\n"));
        assert_eq!(run.facts.len(), 2);
        assert_eq!(
            run.facts[1],
            Some(facts("bob", Some("pw"), "PLAIN", Some("me")))
        );
        greet_and_replay(&mut run);
        assert_eq!(run.take_backend(), "AUTH PLAIN\r\n");
        run.backend("334 \r\n");
        assert_eq!(run.take_backend(), format!("{BOB}\r\n"));
        run.backend("235 2.7.0 ok\r\n");
        assert_eq!(run.take_client(), "235 2.7.0 ok\r\n");
        assert_eq!(charged(&run), 1, "alice's failure stays counted");
    }

    #[test]
    fn a_completion_instead_of_a_challenge_answers_the_clients_auth() {
        for (reply, verdict, charge, kept) in [
            (
                "504 5.5.4 Unrecognized authentication type\r\n",
                AuthVerdict::NotCompleted,
                Charge::Refund,
                0,
            ),
            (
                "535 5.7.8 Error: authentication failed\r\n",
                AuthVerdict::Failure,
                Charge::Keep,
                1,
            ),
            (
                "454 4.7.0 Temporary authentication failure\r\n",
                AuthVerdict::NotCompleted,
                Charge::Refund,
                0,
            ),
        ] {
            let mut run = routed(true);
            run.client(&format!("EHLO me\r\nAUTH LOGIN {ALICE_NAME}\r\n"));
            run.client(&format!("{SECRET}\r\n"));
            run.take_client();
            greet_and_replay(&mut run);
            assert_eq!(run.take_backend(), "AUTH LOGIN\r\n");
            run.backend(reply);
            assert_eq!(run.take_client(), reply);
            assert_eq!(run.take_backend(), "QUIT\r\n", "no held response went out");
            assert!(run.notices.contains(&Notice::Auth {
                verdict,
                mechanism: "LOGIN".into(),
                charge,
            }));
            assert_eq!(charged(&run), kept, "{reply}");
            assert_eq!(run.m.core.phase, Phase::Local);
        }
    }

    #[test]
    fn a_login_whose_user_cannot_be_read_fails_here_and_is_charged() {
        // A PLAIN message without its NULs; an OAUTHBEARER without `a=`.
        for auth in [
            "AUTH PLAIN YWxpY2UAc2VjcmV0\r\n",
            "AUTH OAUTHBEARER biwsAWF1dGg9QmVhcmVyIHgBAQ==\r\n",
            "AUTH PLAIN =\r\n",
            "AUTH LOGIN =\r\n",
        ] {
            let mut run = routed(true);
            run.client(&format!("EHLO me\r\n{auth}NOOP\r\n"));
            assert!(
                run.take_client()
                    .ends_with("535 5.7.8 Authentication credentials invalid\r\n250 2.0.0 Ok\r\n"),
                "{auth}"
            );
            assert!(run.facts.is_empty(), "{auth}");
            assert_eq!(run.take_backend(), "");
            assert_eq!(charged(&run), 1, "{auth}");
            assert!(run.notices.iter().any(|n| matches!(
                n,
                Notice::Auth {
                    verdict: AuthVerdict::Failure,
                    ..
                }
            )));
        }
    }

    #[test]
    fn a_routed_backend_that_fails_before_the_logins_end_is_a_temporary_failure() {
        // It refuses service at its greeting, or closes mid-exchange.
        for fail in [
            |run: &mut Run| run.backend("554 5.3.2 busy\r\n"),
            |run: &mut Run| {
                greet_and_replay(run);
                run.m.backend_closed();
                run.settle();
            },
        ] {
            let mut run = routed(true);
            run.client(&format!("EHLO me\r\nAUTH PLAIN {ALICE}\r\n"));
            run.take_client();
            fail(&mut run);
            assert!(
                run.take_client()
                    .ends_with("454 4.7.0 Temporary authentication failure\r\n")
            );
            assert_eq!(charged(&run), 0);
            assert_eq!(run.m.next(), Next::Run, "the session goes on");
            run.take_backend();
            run.client(&format!("AUTH PLAIN {BOB}\r\n"));
            assert_eq!(run.facts.len(), 2, "routed again");
        }
    }

    #[test]
    fn routed_logins_settle_their_charges() {
        use crate::machine::testing::Step::{self, Backend, Client};
        struct Row {
            name: &'static str,
            routes: Vec<RouteFailure>,
            steps: Vec<Step>,
            charged: u32,
            refused: u32,
            reached: &'static [&'static str],
            never: &'static [&'static str],
        }
        let greeted = |mut steps: Vec<Step>| {
            let mut all = vec![
                Client("EHLO me\r\nAUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n"),
                Backend("220 backend ESMTP\r\n"),
                Backend(EHLO_REPLY),
            ];
            all.append(&mut steps);
            all
        };
        let rows = vec![
            Row {
                name: "success",
                routes: vec![],
                steps: greeted(vec![Backend("334 \r\n"), Backend("235 2.7.0 ok\r\n")]),
                charged: 0,
                refused: 0,
                reached: &["AUTH PLAIN\r\n", "AGFsaWNlAHNlY3JldA==\r\n"],
                never: &["QUIT"],
            },
            Row {
                name: "the backend refuses",
                routes: vec![],
                steps: greeted(vec![Backend("334 \r\n"), Backend("535 5.7.8 no\r\n")]),
                charged: 1,
                refused: 0,
                reached: &["AGFsaWNlAHNlY3JldA==\r\n", "QUIT\r\n"],
                never: &[],
            },
            Row {
                name: "the router refuses, go on",
                routes: vec![RouteFailure::Refused {
                    text: "no".into(),
                    smtp_code: None,
                    go_on: true,
                }],
                steps: vec![Client("EHLO me\r\nAUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n")],
                charged: 1,
                refused: 0,
                reached: &[],
                never: &["AUTH"],
            },
            Row {
                name: "no backend now",
                routes: vec![RouteFailure::Unavailable],
                steps: vec![Client("EHLO me\r\nAUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n")],
                charged: 0,
                refused: 0,
                reached: &[],
                never: &["AUTH"],
            },
            Row {
                name: "cancelled",
                routes: vec![],
                steps: vec![Client("EHLO me\r\nAUTH LOGIN\r\n*\r\n")],
                charged: 0,
                refused: 0,
                reached: &[],
                never: &["AUTH"],
            },
            Row {
                name: "unreadable user",
                routes: vec![],
                steps: vec![Client("EHLO me\r\nAUTH PLAIN YWxpY2UAc2VjcmV0\r\n")],
                charged: 1,
                refused: 0,
                reached: &[],
                never: &["AUTH"],
            },
            Row {
                name: "two failures, then one throttled",
                routes: vec![],
                steps: vec![
                    Client("EHLO me\r\nAUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n"),
                    Backend("220 backend ESMTP\r\n"),
                    Backend(EHLO_REPLY),
                    Backend("334 \r\n"),
                    Backend("535 5.7.8 no\r\n"),
                    Client("AUTH PLAIN YWxpY2UAc2VjcmV0\r\n"),
                    Client("AUTH PLAIN AGJvYgBwdw==\r\n"),
                ],
                charged: 2,
                refused: 1,
                reached: &["AGFsaWNlAHNlY3JldA==\r\n"],
                never: &["AGJvYgBwdw=="],
            },
        ];
        for row in rows {
            let mut run = routed(true);
            run.throttle = Some(Throttle::new(3, 1));
            run.routes = row.routes.into_iter().collect();
            for step in &row.steps {
                match step {
                    Client(bytes) => run.client(bytes),
                    Backend(bytes) => run.backend(bytes),
                    Step::BackendClosed => {
                        run.m.backend_closed();
                        run.settle();
                    }
                }
            }
            let backend = run.take_backend();
            let throttle = run.throttle.as_ref().unwrap();
            // One charge was taken by another session before this one.
            check_charges(
                row.name,
                throttle,
                &backend,
                row.charged + 1,
                row.refused,
                row.reached,
                row.never,
            );
        }
    }
}
