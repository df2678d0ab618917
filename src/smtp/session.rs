//! The SMTP session driver: owns the client and backend streams of one submission session and
//! drives the sans-I/O pieces of this module over them, from the greeting to QUIT.
//!
//! Shape of a session:
//! - Implicit TLS (465): connect to the backend and wait for its greeting. A 220 is answered
//!   with mailfront's own greeting (the backend's text may name internal hosts); any
//!   other greeting (554, 421) is passed on and the session closes.
//! - STARTTLS (587): nothing reaches a backend before TLS (RFC 8314 §4.1). mailfront greets at
//!   once and answers the cleartext dialogue itself ([`cleartext::respond`]); the backend is
//!   connected after the handshake (so a PROXY v2 header carries the TLS details), its greeting
//!   swallowed (the client already has ours; anything but 220, or no backend, gives the client
//!   `421 4.4.1` at once and ends the session), and the client's new EHLO (RFC 3207 §4.2) is
//!   the first command it sees. Idle cleartext clients hold no backend connection.
//! - With `require_tls_for_mail: false`, a cleartext MAIL connects lazily: the client's EHLO or
//!   HELO is replayed (re-emitted by mailfront, its reply swallowed but its capabilities
//!   learned), then the session relays in cleartext as before. A later STARTTLS drops that
//!   backend connection (after every earlier reply came in) and connects afresh after the
//!   handshake: the new connection's PROXY header then carries TLS, and RFC 3207 §4.2 resets
//!   the session state anyway, so nothing is lost by reconnecting.
//! - `backend_client_info`, all or nothing: right after every backend greeting, before any client
//!   command, mailfront says its own EHLO and, where XCLIENT is offered, sends XCLIENT with the
//!   client's address ([`xclient`]) and swallows the new 220; a backend that offers XCLIENT and
//!   refuses it ends the session with `421 4.7.0`. HELO, EHLO or neither: the same identity.
//! - Client lines are framed one at a time ([`CommandReceiver`]) and judged by the gate
//!   ([`policy::decide`]). What a forwarded command puts on the wire is mailfront's re-encoding
//!   of it ([`canonical::encode`]: canonical verb, single spaces, within a limit every backend
//!   reads whole), never the client's line; one that cannot be re-encoded gets `500 5.5.2`.
//!   Forwarded commands are written at once (PIPELINING, RFC 2920); each
//!   leaves an entry in one queue of expected replies, and replies mailfront writes itself take
//!   their place in the same queue, so the client gets exactly one reply per command, in order.
//!   After a command that ends a pipeline group (EHLO, DATA, AUTH, NOOP, QUIT, …), or after any
//!   command when the backend does not offer PIPELINING, nothing more is written to the backend
//!   until the replies are in (RFC 2920 §3.1). Whenever the client's input is used up, the queue is
//!   drained before the client is read again: every queued command can be answered without
//!   more client input, so this never deadlocks and keeps memory O(one read buffer).
//! - STARTTLS (587) is answered here with 220 after every earlier reply went out; whatever the
//!   client pipelined after it is dropped (CERT VU#555316), then the handshake runs.
//! - Before authentication and after it, a command or SASL line ended by a bare LF, or holding a
//!   bare CR or a NUL, is refused with `500 5.5.2` and never forwarded: a backend that frames
//!   lines differently (Postfix before 3.9 ends a command at a bare LF) could otherwise see
//!   commands mailfront never judged. Inside an AUTH exchange the backend's exchange is
//!   cancelled with mailfront's own `*`.
//! - After the backend's 354 the Received field is written (TLS sessions only), then the content
//!   streams through [`DataScanner`] byte-exact. BDAT chunks stream by count; the first chunk of
//!   a transaction carries the field and its announced size grows to match.
//!
//! Decisions where the RFCs leave a choice:
//! - Bare CR/LF in DATA content (smuggling defence): the backend connection is dropped at once,
//!   so the truncated message can never be completed, the rest of the content is consumed, the
//!   client gets `554 5.6.0` at its real end of data, and then `421` to the next command (QUIT
//!   still gets 221). BDAT content gets the same treatment ([`bdat::ContentScanner`]): the
//!   replies owed for earlier commands are read first, then the backend is dropped, the rest of
//!   the chunk consumed, and `554 5.6.0` answers the chunk's BDAT. No transparent reconnect: an authenticated session cannot be rebuilt
//!   without replaying the client's credentials, which mailfront never keeps.
//! - A backend that fails while content streams: the rest of the message is consumed, then the
//!   client gets `421 4.4.1` and the session closes; never a 250 the backend did not send.
//! - Graceful shutdown: once the drain begins, a session with no message underway gets
//!   `421 4.3.2` at once (RFC 5321 §3.8 allows it unsolicited), an open envelope included. A
//!   message already in DATA or BDAT goes on to the backend's verdict, which the client gets,
//!   then 421 and the close. Only the hard stop (`timeouts.shutdown_grace` over) cuts a message,
//!   and then the client gets 421, never a 250 the backend did not send.
//! - `auth_outcome` counts the backend's 235 as success and 535 as failure; other AUTH replies
//!   (501 after `*`, 504, 454, 534) are logged but not counted.
//! - `limits.auth_failures_per_ip` charges every AUTH when it is sent (a throttled one is answered
//!   454 here), and refunds the charge on 235, on 501 and 504 (a cancelled exchange or an unknown
//!   mechanism: no credential was checked), on 4xx (the backend's own temporary trouble, not a
//!   wrong guess, though 421 closes the session and keeps it) and when mailfront cancelled the
//!   exchange itself; every other answer, and a session that ends before the verdict, keeps it.
//! - A message is counted and logged only on the backend's 2xx to the end of data or to
//!   `BDAT … LAST`; its size is the client's octets (the Received field not included).

use std::collections::VecDeque;
use std::time::Duration;

use time::OffsetDateTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use crate::backend::BackendStream;
use crate::client_info::Notice;
use crate::config::TlsMode;
use crate::metrics::AuthResult;
use crate::session::{ClientStream, EndReason, LoginCharge, Session, upgrade_client};
use crate::smtp::bdat::{self, ChunkReader, ContentScanner};
use crate::smtp::canonical::{self, Encoded, Unencodable};
use crate::smtp::cleartext::{self, Action};
use crate::smtp::command::{Bdat, Command, SaslResponse};
use crate::smtp::data::{BareLineEnding, DataEvent, DataScanner};
use crate::smtp::ehlo::{BackendCapabilities, EhloContext, rewrite_ehlo};
use crate::smtp::local_reply;
use crate::smtp::policy::{self, ClientInput, GateState, Refusal, Verdict};
use crate::smtp::received::{ReceivedId, ReceivedInfo, TlsCipher, WithProtocol, received_header};
use crate::smtp::receiver::{CommandReceiver, DEFAULT_AUTH_LINE_LIMIT, Line, LineError, LineMode};
use crate::smtp::reply::{Reply, ReplyReceiver};
use crate::smtp::xclient;
use crate::tls::TlsInfo;
use crate::transport::Transport;

/// One read from the client: also the most message content held at once.
const CLIENT_READ_BUFFER: usize = 64 * 1024;
/// One read from the backend (replies only; the reply receiver bounds each reply).
const BACKEND_READ_BUFFER: usize = 16 * 1024;
/// Replies queued for the client are written out once they pass this (a client pipelining a
/// whole read buffer of short commands).
const CLIENT_OUTPUT_HIGH_WATER: usize = 64 * 1024;
/// Most replies owed to the client at once. Past this the backend's replies are waited for
/// before the next command is read, so a client pipelining without end (BDAT chunks whose
/// reads all end mid-chunk, where the read-boundary drain never runs) cannot grow the queue, or
/// fill the backend's reply buffer until both sides stall.
const MAX_PENDING_REPLIES: usize = 1000;
/// Octets taken off the backend's `SIZE` so the Received field never pushes a message that
/// passed `MAIL SIZE=` (RFC 1870) over the backend's limit. The field is about 250 octets.
const RECEIVED_SIZE_RESERVE: u64 = 1024;
/// Longest SASL mechanism name kept for logs (RFC 4422 §3.1: at most 20 characters).
const MAX_MECHANISM_LOG: usize = 20;

/// Serves one SMTP submission session (465 or 587) until QUIT, an error or shutdown.
pub async fn serve<S: Transport>(mut client: ClientStream<S>, session: &mut Session) -> EndReason {
    let listener = session.listener.clone();
    let starttls = listener.config.tls == TlsMode::Starttls && !client.is_tls();
    let backend = if starttls {
        // RFC 8314 §4.1: nothing reaches a backend before TLS; it is connected after STARTTLS.
        Link::NotYet
    } else {
        match session.connect_backend().await {
            Ok(backend) => Link::Up(backend),
            Err(_) => {
                let reply = local_reply::backend_unavailable(&listener.hostname);
                let _ =
                    tokio::time::timeout(listener.timeouts.idle, client.write_all(&reply)).await;
                client.close().await;
                return EndReason::BackendUnavailable;
            }
        }
    };
    let mut driver = Driver::new(session, backend);
    let greeted = if starttls {
        let greeting = local_reply::greeting(driver.hostname());
        driver.cout.extend_from_slice(&greeting);
        Ok(())
    } else {
        driver.greet().await
    };
    let reason = match greeted {
        Err(reason) => reason,
        Ok(()) => loop {
            match driver.run(&mut client).await {
                Err(reason) => break reason,
                Ok(StartTls) => {
                    let draining = driver.session.draining.clone();
                    let upgrade =
                        upgrade_client(client, &listener, driver.session.client_addr, &draining);
                    let upgraded = match driver.login_deadline {
                        // The handshake is part of the time before login; mid-handshake no
                        // reply can be written, so the connection just closes.
                        Some(deadline) => match tokio::time::timeout_at(deadline, upgrade).await {
                            Ok(upgraded) => upgraded,
                            Err(_) => return EndReason::LoginTimeout,
                        },
                        None => upgrade.await,
                    };
                    match upgraded {
                        Ok((upgraded, info, took)) => {
                            client = upgraded;
                            driver.tls_started(info, took);
                            if let Err(reason) = driver.connect_after_tls().await {
                                break reason;
                            }
                        }
                        Err(reason) => return reason,
                    }
                }
            }
        },
    };
    // The last reply (221, 421) and the close leave in one write where they fit.
    if client.cork(&driver.cout) {
        driver.cout.clear();
    } else {
        driver.flush_client(&mut client).await.ok();
    }
    client.close().await;
    reason
}

/// The driver asks its caller to run the STARTTLS handshake (the caller owns the stream).
struct StartTls;

/// The backend connection of a session.
#[derive(Debug)]
enum Link {
    /// Not connected yet: a `starttls` session before TLS (or before its first cleartext MAIL,
    /// with `require_tls_for_mail: false`), or between a lax session's STARTTLS and handshake.
    NotYet,
    Up(BackendStream),
    /// Dropped on purpose to abort a message refused for a bare CR/LF.
    Dropped,
}

impl Link {
    fn stream(&mut self) -> Option<&mut BackendStream> {
        match self {
            Link::Up(stream) => Some(stream),
            Link::NotYet | Link::Dropped => None,
        }
    }
}

/// A reply the driver waits for, and what it means for the session.
#[derive(Debug)]
enum Expect {
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
    /// Our `*` ending an exchange after an over-long SASL line: its 501 is swallowed.
    AuthCancel,
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
    Backend(Expect),
    Local(Vec<u8>),
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
}

impl Transaction {
    /// RSET, a new MAIL or EHLO, or the end of a message: the next chunk is a first chunk.
    fn restart_content(&mut self) {
        self.bdat_started = false;
        self.bdat_size = 0;
        self.received_id = None;
        self.content = ContentScanner::new();
    }
}

struct Driver<'s> {
    session: &'s mut Session,
    backend: Link,
    gate: GateState,
    caps: BackendCapabilities,
    greeting: Option<Greeting>,
    tx: Transaction,
    /// Mechanism of the AUTH exchange in progress, for logs.
    auth_mechanism: String,
    /// The `limits.auth_failures_per_ip` charge of the AUTH exchange in progress, settled by
    /// its final reply; dropped unsettled (the session ended first), it stays counted.
    auth_charge: Option<LoginCharge>,
    messages: u64,
    mode: Mode,
    pending: VecDeque<Pending>,
    receiver: CommandReceiver,
    replies: ReplyReceiver,
    cin: Vec<u8>,
    cin_pos: usize,
    cin_len: usize,
    bin: Vec<u8>,
    bin_pos: usize,
    bin_len: usize,
    /// Replies for the client, written before every wait.
    cout: Vec<u8>,
    /// When `timeouts.login` runs out, until a successful AUTH or, where cleartext mail is
    /// allowed (`require_tls_for_mail: false`), an accepted MAIL: a client admitted to send
    /// mail is past login. Never moved by traffic.
    login_deadline: Option<Instant>,
}

impl<'s> Driver<'s> {
    fn new(session: &'s mut Session, backend: Link) -> Self {
        let config = &session.listener.config;
        let listener = config.tls;
        let gate = GateState::new(listener, config.require_tls_for_mail);
        let receiver =
            CommandReceiver::new(session.listener.limits.smtp_line, DEFAULT_AUTH_LINE_LIMIT);
        let login_deadline = Some(session.login_deadline());
        Driver {
            session,
            backend,
            gate,
            caps: BackendCapabilities::default(),
            greeting: None,
            tx: Transaction::default(),
            auth_mechanism: String::new(),
            auth_charge: None,
            messages: 0,
            mode: Mode::Command,
            pending: VecDeque::new(),
            receiver,
            replies: ReplyReceiver::default(),
            cin: vec![0; CLIENT_READ_BUFFER],
            cin_pos: 0,
            cin_len: 0,
            bin: vec![0; BACKEND_READ_BUFFER],
            bin_pos: 0,
            bin_len: 0,
            cout: Vec::new(),
            login_deadline,
        }
    }

    fn hostname(&self) -> &str {
        &self.session.listener.hostname
    }

    fn cipher(&self) -> std::borrow::Cow<'static, str> {
        self.session
            .tls
            .as_ref()
            .map_or("none".into(), TlsInfo::cipher_name)
    }

    /// Waits for the backend's greeting; a 220 gets our own greeting, anything else is passed
    /// on and ends the session (RFC 5321 §3.1).
    async fn greet(&mut self) -> Result<(), EndReason> {
        let idle = self.session.listener.timeouts.idle;
        let reply = self.read_reply(idle).await?;
        if reply.code() == 220 {
            self.tell_client_identity().await?;
            let greeting = local_reply::greeting(self.hostname());
            self.cout.extend_from_slice(&greeting);
            Ok(())
        } else {
            tracing::info!(listener = %self.session.listener.config.name, client = %self.session.client_addr, code = reply.code(), "backend refused the session at greeting");
            self.cout.extend_from_slice(reply.raw());
            Err(EndReason::BackendUnavailable)
        }
    }

    /// Records the finished STARTTLS handshake and resets what RFC 3207 §4.2 says to forget.
    fn tls_started(&mut self, info: TlsInfo, took: Duration) {
        self.session.tls_established(info, took, true);
        self.gate.client_tls = true;
        self.gate.needs_ehlo = true;
        self.greeting = None;
        self.tx = Transaction::default();
        self.mode = Mode::Command;
        self.receiver.reset();
        self.cin_pos = 0;
        self.cin_len = 0;
        self.caps = BackendCapabilities::default();
        self.gate.backend_requiretls = false;
        self.gate.backend_chunking = false;
    }

    /// After the STARTTLS handshake: connects the backend (now that `session.tls` is set, a
    /// PROXY v2 header carries the TLS details) and swallows its greeting. A backend left
    /// connected in cleartext (lax mode) was dropped at STARTTLS, so this always connects.
    async fn connect_after_tls(&mut self) -> Result<(), EndReason> {
        if matches!(self.backend, Link::NotYet) {
            self.connect().await?;
        }
        Ok(())
    }

    /// Connects to the backend and reads its greeting, which the client never sees: it already
    /// had mailfront's. Anything but a 220 ends the session with `421 4.4.1` (RFC 5321 §3.1).
    async fn connect(&mut self) -> Result<(), EndReason> {
        match self.session.connect_backend().await {
            Ok(stream) => self.backend = Link::Up(stream),
            Err(_) => {
                let reply = local_reply::backend_unavailable(self.hostname());
                self.cout.extend_from_slice(&reply);
                return Err(EndReason::BackendUnavailable);
            }
        }
        self.bin_pos = 0;
        self.bin_len = 0;
        self.replies = ReplyReceiver::default();
        let idle = self.session.listener.timeouts.idle;
        let reply = self.read_reply(idle).await?;
        if reply.code() == 220 {
            return self.tell_client_identity().await;
        }
        tracing::info!(listener = %self.session.listener.config.name, client = %self.session.client_addr, code = reply.code(), "backend refused the session at greeting");
        self.backend = Link::Dropped;
        let reply = local_reply::backend_unavailable(self.hostname());
        self.cout.extend_from_slice(&reply);
        Err(EndReason::BackendUnavailable)
    }

    /// A cleartext MAIL with `require_tls_for_mail: false`: connects, and replays the client's
    /// EHLO/HELO so the backend session is in the state the client believes it is in. The
    /// replayed line is written by mailfront from the parsed name (no CR, LF or NUL in it).
    async fn connect_lazily<S: Transport>(
        &mut self,
        client: &mut ClientStream<S>,
    ) -> Result<(), EndReason> {
        // Every earlier (local) reply goes out first, so a failure's 421 comes in order.
        self.drain(client).await?;
        self.connect().await?;
        if let Some(greeting) = self.greeting.clone() {
            // Written anew like any forwarded command; its length was checked when the
            // cleartext EHLO/HELO was answered.
            let verb: &[u8] = if greeting.ehlo { b"EHLO " } else { b"HELO " };
            let text = [verb, greeting.name.as_slice()].concat();
            let Ok(Encoded::Line(line)) = canonical::encode(&Command::parse(&text), &text) else {
                return Err(self.backend_lost(None));
            };
            self.send_backend(&line).await?;
            self.pending.push_back(Pending::Backend(Expect::Replay {
                ehlo: greeting.ehlo,
            }));
            // EHLO ends a pipeline group (RFC 2920 §3.1), and its capabilities decide the rest.
            self.drain(client).await?;
        }
        Ok(())
    }

    /// Processes client input until the session ends or STARTTLS needs the stream.
    async fn run<S: Transport>(
        &mut self,
        client: &mut ClientStream<S>,
    ) -> Result<StartTls, EndReason> {
        loop {
            if self.cin_pos >= self.cin_len {
                if matches!(self.mode, Mode::Command | Mode::Sasl | Mode::Closing) {
                    self.drain(client).await?;
                }
                self.read_client(client).await?;
                continue;
            }
            if self.pending.len() >= MAX_PENDING_REPLIES && matches!(self.mode, Mode::Command) {
                // Between commands every queued command is complete, so each can be answered.
                self.drain(client).await?;
            }
            match self.mode {
                Mode::Command | Mode::Sasl | Mode::Closing => {
                    let line_mode = match self.mode {
                        Mode::Sasl => LineMode::SaslResponse,
                        _ => LineMode::Command,
                    };
                    let input = self.cin.get(self.cin_pos..self.cin_len).unwrap_or_default();
                    let (n, result) = self.receiver.receive(input, line_mode);
                    self.cin_pos += n.max(1).min(input.len());
                    match result {
                        Ok(None) => {}
                        Ok(Some(line)) => {
                            if let Some(start_tls) = self.on_line(client, line).await? {
                                return Ok(start_tls);
                            }
                        }
                        Err(error) => self.on_line_too_long(client, error).await?,
                    }
                }
                Mode::Data { .. } => self.data_step(client).await?,
                Mode::Chunk { .. } => self.chunk_step(client).await?,
            }
            if self.cout.len() > CLIENT_OUTPUT_HIGH_WATER {
                self.flush_client(client).await?;
            }
        }
    }

    /// One complete client line, outside message content.
    async fn on_line<S: Transport>(
        &mut self,
        client: &mut ClientStream<S>,
        line: Line,
    ) -> Result<Option<StartTls>, EndReason> {
        if self.session.shutdown.is_cancelled() {
            return Err(self.shutting_down());
        }
        if self.session.draining.is_cancelled() {
            // Replies owed for earlier pipelined commands go out first, in order: a DATA
            // verdict among them is what decides whether a message is still underway.
            self.drain(client).await?;
            if self.must_stop() {
                return Err(self.shutting_down());
            }
        }
        match self.mode {
            Mode::Sasl => {
                self.on_sasl_line(client, &line).await?;
                return Ok(None);
            }
            Mode::Closing => {
                self.drain(client).await?;
                return Err(self.close_after_refusal(line.text()));
            }
            _ => {}
        }
        let command = Command::from_line(&line);
        if matches!(self.backend, Link::NotYet) {
            let hostname = self.session.listener.hostname.clone();
            match cleartext::respond(&self.gate, &hostname, &command) {
                Action::Reply(_)
                    if matches!(command, Command::Ehlo(_) | Command::Helo(_))
                        && canonical::encode(&command, line.text()).is_err() =>
                {
                    // Answered here, but replayed to a backend later (a lazy connect): a name
                    // that could not be written then is refused now.
                    self.refuse(Refusal::TooLong(LineError::CommandTooLong {
                        limit: canonical::COMMAND_LINE_LIMIT,
                    }));
                    return Ok(None);
                }
                Action::Reply(reply) => {
                    self.local_cleartext(&command);
                    self.pending.push_back(Pending::Local(reply));
                    return Ok(None);
                }
                Action::Refuse(refusal) => {
                    self.refuse(refusal);
                    return Ok(None);
                }
                Action::DiscardChunk { octets, refusal } => {
                    self.refuse(refusal);
                    self.start_chunk(octets, false, false);
                    return Ok(None);
                }
                Action::StartTls => return self.start_tls(client).await.map(Some),
                Action::Quit => {
                    self.local(local_reply::CLOSING);
                    self.drain(client).await?;
                    return Err(EndReason::ClientClosed);
                }
                // Then the gate's own verdict below forwards it.
                Action::Connect => self.connect_lazily(client).await?,
            }
        }
        match policy::decide(&self.gate, ClientInput::Command(&command)) {
            Verdict::Forward => self.forward(client, &command, &line).await?,
            Verdict::Refuse(refusal) => self.refuse(refusal),
            Verdict::DiscardChunk { octets, refusal } => {
                self.refuse(refusal);
                self.start_chunk(octets, false, false);
            }
            Verdict::StartTls => return self.start_tls(client).await.map(Some),
        }
        Ok(None)
    }

    /// What a locally answered cleartext command changes: the EHLO/HELO name (replayed on a
    /// lazy connect, never written into a Received field: that needs the post-TLS greeting).
    fn local_cleartext(&mut self, command: &Command) {
        match command {
            Command::Ehlo(name) | Command::Helo(name) => {
                self.greeting = Some(Greeting {
                    ehlo: matches!(command, Command::Ehlo(_)),
                    name: name.clone(),
                });
                self.tx.restart_content();
            }
            Command::Rset => self.tx.restart_content(),
            _ => {}
        }
    }

    /// STARTTLS: answers 220 once every earlier reply went out, drops what was pipelined after
    /// it, and hands the stream over for the handshake.
    async fn start_tls<S: Transport>(
        &mut self,
        client: &mut ClientStream<S>,
    ) -> Result<StartTls, EndReason> {
        // Every earlier command gets its reply before the 220 (RFC 2920 §3.1).
        self.drain(client).await?;
        if matches!(self.backend, Link::Up(_)) {
            // A lax session that sent mail in cleartext: the backend is connected afresh after
            // the handshake (RFC 3207 §4.2 resets the session anyway), so the new connection's
            // PROXY header carries TLS and nothing of the cleartext session carries over.
            self.backend = Link::NotYet;
            tracing::debug!(listener = %self.session.listener.config.name, client = %self.session.client_addr, "cleartext backend connection dropped at STARTTLS");
        }
        self.cout.extend_from_slice(local_reply::STARTTLS_READY);
        self.flush_client(client).await?;
        let dropped = self.cin_len.saturating_sub(self.cin_pos);
        if dropped > 0 {
            tracing::info!(listener = %self.session.listener.config.name, client = %self.session.client_addr, octets = dropped, "discarded client bytes pipelined after STARTTLS");
        }
        // CERT VU#555316: nothing sent before the handshake is ever executed.
        self.cin_pos = 0;
        self.cin_len = 0;
        self.receiver.reset();
        Ok(StartTls)
    }

    /// A line inside an AUTH exchange: forwarded verbatim, never parsed as a command.
    async fn on_sasl_line<S: Transport>(
        &mut self,
        client: &mut ClientStream<S>,
        line: &Line,
    ) -> Result<(), EndReason> {
        self.mode = Mode::Command;
        let response = SaslResponse::from_line(line);
        match policy::decide(&self.gate, ClientInput::SaslResponse(response)) {
            Verdict::Forward => {
                self.send_backend(&line.to_wire()).await?;
                self.pending.push_back(Pending::Backend(Expect::Auth));
            }
            Verdict::Refuse(refusal) | Verdict::DiscardChunk { refusal, .. } => {
                self.cancel_auth(refusal).await?;
            }
            // The gate never starts TLS for a SASL line; refuse it as AUTH before TLS would be.
            Verdict::StartTls => self.cancel_auth(Refusal::CleartextAuth).await?,
        }
        self.drain(client).await
    }

    /// Ends the backend's AUTH exchange with `*` (its 501 is swallowed) and answers `refusal`.
    async fn cancel_auth(&mut self, refusal: Refusal) -> Result<(), EndReason> {
        self.send_backend(b"*\r\n").await?;
        self.pending.push_back(Pending::Backend(Expect::AuthCancel));
        self.refuse(refusal);
        Ok(())
    }

    async fn on_line_too_long<S: Transport>(
        &mut self,
        client: &mut ClientStream<S>,
        error: LineError,
    ) -> Result<(), EndReason> {
        match (&self.mode, error) {
            (Mode::Closing, _) => {
                self.drain(client).await?;
                Err(self.close_after_refusal(b""))
            }
            (Mode::Sasl, _) => {
                self.mode = Mode::Command;
                self.cancel_auth(policy::too_long(&self.gate, error))
                    .await?;
                self.drain(client).await
            }
            _ => {
                self.refuse(policy::too_long(&self.gate, error));
                Ok(())
            }
        }
    }

    /// Answers a line the gate refused, in order with the other replies; the log line and the
    /// metric come from the refusal's reason, never from its reply bytes.
    fn refuse(&mut self, refusal: Refusal) {
        let listener = &self.session.listener;
        if refusal == Refusal::CleartextAuth {
            listener.metrics.cleartext_auth_refused.inc();
            tracing::info!(listener = %listener.config.name, client = %self.session.client_addr, result = "refused_cleartext", cipher = "none", "smtp authentication refused before TLS");
        } else {
            tracing::debug!(listener = %listener.config.name, client = %self.session.client_addr, refusal = refusal.as_str(), "smtp command refused");
        }
        self.local(refusal.reply());
    }

    /// Sends a command the gate let through and queues its reply.
    async fn forward<S: Transport>(
        &mut self,
        client: &mut ClientStream<S>,
        command: &Command,
        line: &Line,
    ) -> Result<(), EndReason> {
        // The last gate: what cannot be written anew within its limit is never forwarded.
        let encoded = match canonical::encode(command, line.text()) {
            Ok(encoded) => encoded,
            Err(error) => {
                self.refuse(match error {
                    Unencodable::TooLong { limit } => {
                        Refusal::TooLong(LineError::CommandTooLong { limit })
                    }
                    Unencodable::Syntax(error) => Refusal::Syntax(error),
                });
                if let Command::Bdat(bdat) = command {
                    self.start_chunk(bdat.size, false, false);
                }
                return Ok(());
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
            Command::Auth(auth) => {
                self.auth_mechanism = mechanism_for_log(&auth.mechanism);
                // Charged before it goes out, checked and counted in one step; AUTH ends a
                // pipeline group, so at most one exchange (and one charge) is in flight.
                let Some(charge) = self.session.charge_login("smtp").await else {
                    // Answered here, in order with the replies owed: nothing reaches the backend.
                    self.session.auth_throttled();
                    tracing::info!(listener = %self.session.listener.config.name, client = %self.session.client_addr, mechanism = %self.auth_mechanism, result = "throttled", "smtp authentication");
                    self.local(local_reply::AUTH_THROTTLED);
                    return self.drain(client).await;
                };
                self.auth_charge = Some(charge);
                Expect::Auth
            }
            // A new message starts when the backend says so (its 2xx to MAIL, RSET, EHLO or
            // HELO, in `on_reply`), never when the command merely goes out: a refused MAIL
            // inside an open BDAT transaction leaves that transaction, and its Received field,
            // as they were.
            Command::Mail(_) => Expect::Mail,
            Command::Rcpt(rcpt) => Expect::Rcpt {
                path: rcpt.forward_path.clone(),
            },
            Command::Data => Expect::Data,
            Command::Bdat(bdat) => return self.forward_bdat(client, *bdat).await,
            Command::Rset => Expect::Rset,
            Command::Quit => Expect::Quit,
            _ => Expect::Other,
        };
        let (wire, expect) = match encoded {
            Encoded::Line(wire) => (wire, expect),
            Encoded::AuthSplit { command, response } => (command, Expect::AuthSplit { response }),
        };
        self.send_backend(&wire).await?;
        self.pending.push_back(Pending::Backend(expect));
        if command.verb().ends_pipeline_group() || !self.caps.pipelining {
            self.drain(client).await?;
        }
        Ok(())
    }

    /// BDAT (RFC 3030): the first chunk of a transaction over TLS carries the Received field
    /// and announces its grown size (RFC 3030 §2: the size counts every octet); later chunks
    /// announce the client's size. Either way the line is mailfront's, and the size it announces
    /// is exactly the number of octets it streams.
    async fn forward_bdat<S: Transport>(
        &mut self,
        client: &mut ClientStream<S>,
        bdat: Bdat,
    ) -> Result<(), EndReason> {
        if self.pending.iter().any(|p| {
            matches!(
                p,
                Pending::Backend(
                    Expect::Mail | Expect::Rset | Expect::Ehlo { .. } | Expect::Helo { .. }
                )
            )
        }) {
            // Whether this chunk starts a message (and carries the Received field) depends on
            // the backend's answer to a pipelined MAIL or RSET: read it first.
            self.drain(client).await?;
        }
        if bdat.last && bdat.size == 0 && self.tx.content.finish().is_err() {
            // The message would end with a bare CR: it must never complete.
            return self.refuse_bdat(client, BareLineEnding::Cr, false).await;
        }
        let mut wire = bdat::bdat_command(bdat.size, bdat.last);
        if !self.tx.bdat_started && self.session.tls.is_some() {
            // The RCPT replies decide the `for` clause: let them arrive first.
            self.drain(client).await?;
            let header = self.received_field();
            match bdat::first_chunk_command(bdat, header.len()) {
                Ok(command) => {
                    wire = command;
                    wire.extend_from_slice(&header);
                    self.session.listener.metrics.received_field_added();
                }
                Err(_) => {
                    self.local(local_reply::BDAT_SYNTAX);
                    self.start_chunk(bdat.size, false, false);
                    return Ok(());
                }
            }
        }
        self.tx.bdat_started = true;
        self.tx.bdat_size = self.tx.bdat_size.saturating_add(bdat.size);
        self.send_backend(&wire).await?;
        self.pending.push_back(Pending::Backend(Expect::Bdat {
            last: bdat.last,
            size: self.tx.bdat_size,
        }));
        self.start_chunk(bdat.size, true, bdat.last);
        if bdat.size == 0 && !self.caps.pipelining {
            self.drain(client).await?;
        }
        Ok(())
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

    /// A BDAT message with a bare CR/LF (the DATA smuggling policy): the BDAT just sent is the
    /// last command queued, and its reply can never come (its chunk will not be completed).
    /// The replies to every earlier command are read first, then the backend connection is
    /// dropped so the message can never complete, and `554 5.6.0` answers this BDAT. The rest
    /// of the chunk (`in_chunk`) is consumed; the next command gets 421 (QUIT 221).
    async fn refuse_bdat<S: Transport>(
        &mut self,
        client: &mut ClientStream<S>,
        kind: BareLineEnding,
        in_chunk: bool,
    ) -> Result<(), EndReason> {
        if in_chunk {
            self.pending.pop_back();
        }
        self.drain(client).await?;
        self.backend = Link::Dropped;
        tracing::warn!(listener = %self.session.listener.config.name, client = %self.session.client_addr, bare = ?kind, "bare line ending in BDAT content: message refused, backend connection closed");
        self.tx = Transaction::default();
        self.local(local_reply::BARE_LINE_ENDING);
        if !in_chunk {
            self.mode = Mode::Closing;
        }
        Ok(())
    }

    /// Streams message content after a 354 up to `<CRLF>.<CRLF>`.
    async fn data_step<S: Transport>(
        &mut self,
        client: &mut ClientStream<S>,
    ) -> Result<(), EndReason> {
        let Mode::Data { scanner, failed } = &mut self.mode else {
            return Ok(());
        };
        let input = self.cin.get(self.cin_pos..self.cin_len).unwrap_or_default();
        let step = scanner.scan(input);
        self.cin_pos += step.consumed;
        if !*failed {
            let timeout = self.session.listener.timeouts.idle;
            for part in step.forward_parts(input) {
                if !part.is_empty()
                    && write_backend(&mut self.backend, part, timeout)
                        .await
                        .is_err()
                {
                    *failed = true;
                    break;
                }
            }
        }
        let size = scanner.size();
        let failed = *failed;
        match step.event {
            DataEvent::NeedMore => Ok(()),
            DataEvent::Refusing(kind) => {
                // data.rs: never send an end of data for this message; closing the
                // connection makes the backend abandon the transaction (RFC 5321 §3.8).
                self.backend = Link::Dropped;
                tracing::warn!(listener = %self.session.listener.config.name, client = %self.session.client_addr, bare = ?kind, "bare line ending in message content: message refused, backend connection closed");
                Ok(())
            }
            DataEvent::EndRefused(_) => {
                self.mode = Mode::Closing;
                self.tx = Transaction::default();
                self.local(local_reply::BARE_LINE_ENDING);
                Ok(())
            }
            DataEvent::End => {
                self.mode = Mode::Command;
                if failed {
                    return Err(self.backend_lost(None));
                }
                self.pending
                    .push_back(Pending::Backend(Expect::DataEnd { size }));
                // End of data ends a pipeline group (RFC 2920 §3.1).
                self.drain(client).await
            }
        }
    }

    /// Streams (or drops) the octets of one BDAT chunk.
    async fn chunk_step<S: Transport>(
        &mut self,
        client: &mut ClientStream<S>,
    ) -> Result<(), EndReason> {
        let Mode::Chunk {
            reader,
            forward,
            failed,
            last,
            refused,
        } = &mut self.mode
        else {
            return Ok(());
        };
        let input = self.cin.get(self.cin_pos..self.cin_len).unwrap_or_default();
        let n = reader.take(input);
        self.cin_pos += n;
        let mut violation = None;
        if *forward && !*failed && !*refused {
            let part = input.get(..n).unwrap_or_default();
            match self.tx.content.scan(part, *last && reader.is_done()) {
                Ok(()) => {
                    let timeout = self.session.listener.timeouts.idle;
                    if write_backend(&mut self.backend, part, timeout)
                        .await
                        .is_err()
                    {
                        *failed = true;
                    }
                }
                Err(kind) => {
                    // Nothing of this read is sent: the backend is about to be dropped.
                    *refused = true;
                    violation = Some(kind);
                }
            }
        }
        let done = reader.is_done();
        if let Some(kind) = violation {
            // The mode is taken out while earlier replies are read, then put back.
            let mode = std::mem::replace(&mut self.mode, Mode::Command);
            self.refuse_bdat(client, kind, true).await?;
            self.mode = mode;
        }
        let Mode::Chunk {
            forward,
            failed,
            refused,
            ..
        } = self.mode
        else {
            return Ok(());
        };
        if !done {
            return Ok(());
        }
        if refused {
            self.mode = Mode::Closing;
            return Ok(());
        }
        self.mode = Mode::Command;
        if failed {
            return Err(self.backend_lost(None));
        }
        if forward && !self.caps.pipelining {
            self.drain(client).await?;
        }
        Ok(())
    }

    /// Writes every queued local reply and waits for every backend reply, in order.
    async fn drain<S: Transport>(&mut self, client: &mut ClientStream<S>) -> Result<(), EndReason> {
        loop {
            match self.pending.front() {
                None => return Ok(()),
                Some(Pending::Local(_)) => {
                    if let Some(Pending::Local(reply)) = self.pending.pop_front() {
                        self.cout.extend_from_slice(&reply);
                    }
                }
                Some(Pending::Backend(expect)) => {
                    let timeouts = &self.session.listener.timeouts;
                    let timeout = match expect {
                        Expect::DataEnd { .. } | Expect::Bdat { .. } => timeouts.data_reply,
                        _ => timeouts.idle,
                    };
                    self.flush_client(client).await?;
                    let reply = self.read_reply(timeout).await?;
                    if let Some(Pending::Backend(expect)) = self.pending.pop_front() {
                        self.on_reply(expect, reply).await?;
                    }
                }
            }
        }
    }

    /// Relays (or rewrites) one backend reply and updates the session from it.
    async fn on_reply(&mut self, expect: Expect, reply: Reply) -> Result<(), EndReason> {
        if reply.code() == 421 && !matches!(expect, Expect::AuthCancel) {
            // The backend is closing (RFC 5321 §3.8): pass it on and close both sides.
            self.cout.extend_from_slice(reply.raw());
            return Err(EndReason::BackendClosed);
        }
        match expect {
            Expect::Ehlo { name } => {
                self.caps = BackendCapabilities::from_ehlo(&reply);
                self.gate.backend_requiretls = self.caps.requiretls;
                self.gate.backend_chunking = self.caps.chunking;
                if reply.is_positive() {
                    self.greeting = Some(Greeting { ehlo: true, name });
                    self.tx.restart_content();
                }
                let ctx = EhloContext {
                    client_tls: self.gate.client_tls,
                    listener: self.gate.listener,
                    hostname: Some(&self.session.listener.hostname),
                    size_reserve: RECEIVED_SIZE_RESERVE,
                };
                let rewritten = rewrite_ehlo(&reply, &ctx);
                self.cout.extend_from_slice(&rewritten);
            }
            Expect::Replay { ehlo } => {
                self.caps = if ehlo {
                    BackendCapabilities::from_ehlo(&reply)
                } else {
                    BackendCapabilities::default()
                };
                self.gate.backend_requiretls = self.caps.requiretls;
                self.gate.backend_chunking = self.caps.chunking;
                if !reply.is_positive() {
                    tracing::info!(listener = %self.session.listener.config.name, client = %self.session.client_addr, code = reply.code(), "backend refused the replayed EHLO/HELO");
                }
            }
            Expect::Helo { name } => {
                self.caps = BackendCapabilities::default();
                self.gate.backend_requiretls = false;
                self.gate.backend_chunking = false;
                if reply.is_positive() {
                    self.greeting = Some(Greeting { ehlo: false, name });
                    self.tx.restart_content();
                    let helo = local_reply::helo_reply(self.hostname());
                    self.cout.extend_from_slice(&helo);
                } else {
                    self.cout.extend_from_slice(reply.raw());
                }
            }
            Expect::AuthSplit { response } if reply.code() == 334 => {
                // The empty challenge an initial response answers (RFC 4954 §4): the client
                // sent its response already, with its AUTH.
                self.send_backend(&response).await?;
                self.pending.push_front(Pending::Backend(Expect::Auth));
            }
            Expect::Auth | Expect::AuthSplit { .. } => {
                self.on_auth_reply(&reply);
                self.cout.extend_from_slice(reply.raw());
            }
            Expect::AuthCancel => {
                // mailfront's own `*`: the refused SASL line never reached the backend.
                if let Some(charge) = self.auth_charge.take() {
                    charge.refund();
                }
            }
            Expect::Mail => {
                if reply.is_positive() {
                    self.tx.restart_content();
                    self.tx.accepted_rcpts = 0;
                    self.tx.recipient = None;
                    if !self.gate.require_tls_for_mail {
                        // Where cleartext mail is allowed, an accepted MAIL is this session's
                        // login: the login clock stops and it no longer counts against
                        // limits.connections_per_ip, as after a successful AUTH.
                        self.session.authenticated();
                        self.login_deadline = None;
                    }
                }
                self.cout.extend_from_slice(reply.raw());
            }
            Expect::Rcpt { path } => {
                if reply.is_positive() {
                    self.tx.accepted_rcpts = self.tx.accepted_rcpts.saturating_add(1);
                    self.tx.recipient = path;
                }
                self.cout.extend_from_slice(reply.raw());
            }
            Expect::Data => {
                self.cout.extend_from_slice(reply.raw());
                if reply.code() == 354 {
                    self.start_data().await?;
                }
            }
            Expect::DataEnd { size } | Expect::Bdat { last: true, size } => {
                if reply.is_positive() {
                    self.message_accepted(size, &reply);
                } else {
                    tracing::info!(listener = %self.session.listener.config.name, client = %self.session.client_addr, size, code = reply.code(), "message not accepted by the backend");
                }
                self.tx.restart_content();
                self.cout.extend_from_slice(reply.raw());
            }
            Expect::Rset => {
                if reply.is_positive() {
                    self.tx.restart_content();
                }
                self.cout.extend_from_slice(reply.raw());
            }
            Expect::Bdat { last: false, .. } | Expect::Other => {
                self.cout.extend_from_slice(reply.raw());
            }
            Expect::Quit => {
                self.cout.extend_from_slice(reply.raw());
                return Err(EndReason::ClientClosed);
            }
        }
        Ok(())
    }

    /// `backend_client_info`, all or nothing: right after the backend's 220 and before any
    /// client command, mailfront says its own EHLO and, where the reply offers XCLIENT, sends
    /// `XCLIENT NAME=[UNAVAILABLE] ADDR=… PORT=…` ([`xclient::command`]) and reads the new 220
    /// (Postfix restarts its session: the client's own HELO/EHLO, or none, follows as the
    /// client sent it). So every session carries the client's identity however it begins
    /// (HELO, EHLO, straight to MAIL), and no client text (its EHLO name) is ever an XCLIENT
    /// attribute. A backend that does not offer XCLIENT gets one warning per listener; one that
    /// offers it and refuses it, or refuses the EHLO, ends the session with `421 4.7.0`: a
    /// session meant to carry the client's identity never goes on under mailfront's.
    async fn tell_client_identity(&mut self) -> Result<(), EndReason> {
        let listener = self.session.listener.clone();
        if !listener.config.backend_client_info {
            return Ok(());
        }
        let idle = listener.timeouts.idle;
        let ehlo = format!("EHLO {}\r\n", xclient::ehlo_name(&listener.hostname));
        self.send_backend(ehlo.as_bytes()).await?;
        let reply = self.read_reply(idle).await?;
        if reply.code() == 421 {
            self.cout.extend_from_slice(reply.raw());
            return Err(EndReason::BackendClosed);
        }
        if reply.code() != 250 {
            return Err(self.client_identity_refused("EHLO", reply.code()));
        }
        let Some(offered) = xclient::offered(&reply) else {
            if listener.client_info_notices.first(Notice::NotOffered) {
                tracing::warn!(listener = %listener.config.name, "backend_client_info: the backend's EHLO does not offer XCLIENT (Postfix: smtpd_authorized_xclient_hosts must list mailfront); sessions go on as mailfront's own, so the backend must not trust mailfront's address (mynetworks) for relaying");
            }
            return Ok(());
        };
        let facts = xclient::XclientFacts {
            client: self.session.client_addr,
            local: self.session.local_addr,
        };
        let Some(line) = xclient::command(&offered, &facts) else {
            // XCLIENT without ADDR: the one thing it is for cannot be said.
            return Err(self.client_identity_refused("XCLIENT without ADDR", reply.code()));
        };
        self.send_backend(&line).await?;
        let answer = self.read_reply(idle).await?;
        match answer.code() {
            220 => {
                tracing::debug!(listener = %listener.config.name, client = %self.session.client_addr, "client address sent to the backend by XCLIENT");
                Ok(())
            }
            421 => {
                self.cout.extend_from_slice(answer.raw());
                Err(EndReason::BackendClosed)
            }
            code => Err(self.client_identity_refused("XCLIENT", code)),
        }
    }

    /// The backend would not take the client's identity: `421 4.7.0`, and the session ends.
    fn client_identity_refused(&mut self, what: &str, code: u16) -> EndReason {
        let listener = &self.session.listener;
        if listener.client_info_notices.first(Notice::Refused) {
            tracing::warn!(listener = %listener.config.name, code, refused = what, "backend_client_info: the backend refused the client's identity; sessions are closed with 421 until it accepts XCLIENT");
        } else {
            tracing::debug!(listener = %listener.config.name, client = %self.session.client_addr, code, refused = what, "backend_client_info: XCLIENT refused, session closed");
        }
        self.backend = Link::Dropped;
        let reply = local_reply::client_identity_refused(self.hostname());
        self.cout.extend_from_slice(&reply);
        EndReason::backend_violation(format!("{what} refused ({code}) with backend_client_info"))
    }

    fn on_auth_reply(&mut self, reply: &Reply) {
        let code = reply.code();
        if code == 334 {
            self.mode = Mode::Sasl;
            return;
        }
        let result = match code {
            235 => {
                self.gate.authenticated = true;
                self.session.authenticated();
                self.login_deadline = None;
                self.session
                    .listener
                    .metrics
                    .auth_outcome(AuthResult::Success);
                "success"
            }
            535 => {
                self.session
                    .listener
                    .metrics
                    .auth_outcome(AuthResult::Failure);
                "failure"
            }
            _ => "not_completed",
        };
        if let Some(charge) = self.auth_charge.take() {
            if code == 235 || (400..500).contains(&code) || matches!(code, 501 | 504) {
                charge.refund();
            } else {
                charge.keep();
            }
        }
        tracing::info!(
            listener = %self.session.listener.config.name,
            client = %self.session.client_addr,
            mechanism = %self.auth_mechanism,
            result,
            code,
            cipher = %self.cipher(),
            "smtp authentication"
        );
    }

    fn message_accepted(&mut self, size: u64, reply: &Reply) {
        self.messages = self.messages.saturating_add(1);
        self.session.listener.metrics.message_accepted(size);
        let queue_reply = String::from_utf8_lossy(reply.lines().next().unwrap_or_default());
        tracing::info!(
            listener = %self.session.listener.config.name,
            client = %self.session.client_addr,
            size,
            message_number = self.messages,
            cipher = %self.cipher(),
            received_id = self.tx.received_id.as_ref().map_or("-", |id| id.as_str()),
            reply = %queue_reply,
            "message accepted"
        );
    }

    /// After the backend's 354: the Received field first (TLS only), then content.
    async fn start_data(&mut self) -> Result<(), EndReason> {
        if self.session.tls.is_some() {
            let header = self.received_field();
            self.send_backend(&header).await?;
            self.session.listener.metrics.received_field_added();
        }
        self.mode = Mode::Data {
            scanner: DataScanner::new(),
            failed: false,
        };
        Ok(())
    }

    /// The Received field for the current transaction (RFC 5321 §4.4, RFC 8314 §4.3).
    fn received_field(&mut self) -> Vec<u8> {
        let id = ReceivedId::random();
        let Some(tls) = self.session.tls.as_ref() else {
            return Vec::new();
        };
        let (ehlo, helo) = self
            .greeting
            .as_ref()
            .map_or((true, &b""[..]), |g| (g.ehlo, g.name.as_slice()));
        let recipient = (self.tx.accepted_rcpts == 1)
            .then_some(self.tx.recipient.as_deref())
            .flatten();
        let header = received_header(&ReceivedInfo {
            helo,
            client_ip: self.session.client_addr.ip(),
            hostname: &self.session.listener.hostname,
            protocol: WithProtocol::for_session(ehlo, self.gate.authenticated),
            id: &id,
            recipient,
            cipher: TlsCipher::negotiated(tls.cipher),
            group: tls.iana_group_name(),
            date: OffsetDateTime::now_utc(),
        });
        self.tx.received_id = Some(id);
        header
    }

    /// After a refused message: QUIT gets 221, anything else 421; the session ends either way.
    fn close_after_refusal(&mut self, line: &[u8]) -> EndReason {
        if Command::parse(line) == Command::Quit {
            self.cout.extend_from_slice(local_reply::CLOSING);
            return EndReason::ClientClosed;
        }
        let reply = local_reply::closing_after_refusal(self.hostname());
        self.cout.extend_from_slice(&reply);
        EndReason::client_violation("bare CR or LF in message content")
    }

    fn local(&mut self, reply: &[u8]) {
        self.pending.push_back(Pending::Local(reply.to_vec()));
    }

    /// Whether a message is underway: from the DATA command (or a transaction's first BDAT)
    /// until the backend's verdict on its end. A drain lets such a message finish, since
    /// cutting it would make the client send all of it again; an envelope alone (MAIL, RCPT) is
    /// cheap to repeat, so a session with no message underway stops at once.
    fn message_underway(&self) -> bool {
        matches!(self.mode, Mode::Data { .. } | Mode::Chunk { .. })
            || self.tx.bdat_started
            || self.pending.iter().any(|p| {
                matches!(
                    p,
                    Pending::Backend(Expect::Data | Expect::DataEnd { .. } | Expect::Bdat { .. })
                )
            })
    }

    /// Whether the session must end now for a shutdown: always at the hard stop, and once the
    /// drain has begun, as soon as no message is underway.
    fn must_stop(&self) -> bool {
        self.session.shutdown.is_cancelled()
            || (self.session.draining.is_cancelled() && !self.message_underway())
    }

    /// The signal that ends a wait now: the drain when no message is underway, else only the
    /// hard stop (the message gets its backend verdict first).
    fn stop_signal(&self) -> tokio_util::sync::CancellationToken {
        if self.message_underway() {
            self.session.shutdown.clone()
        } else {
            self.session.draining.clone()
        }
    }

    /// The goodbye for a shutdown, written unsolicited: RFC 5321 §3.8 lets a server that must
    /// shut down send 421 asynchronously, which the client reads after its next command.
    fn shutting_down(&mut self) -> EndReason {
        let reply = local_reply::shutting_down(self.hostname());
        self.cout.extend_from_slice(&reply);
        EndReason::Shutdown
    }

    /// The backend went away: closed (`None`) or failed with `error`. The client gets 421.
    fn backend_lost(&mut self, error: Option<&std::io::Error>) -> EndReason {
        let reply = local_reply::backend_unavailable(self.hostname());
        self.cout.extend_from_slice(&reply);
        error.map_or(EndReason::BackendClosed, EndReason::backend_io)
    }

    /// Writes to the backend; on failure the client gets 421 and the session ends.
    async fn send_backend(&mut self, bytes: &[u8]) -> Result<(), EndReason> {
        let timeout = self.session.listener.timeouts.idle;
        match write_backend(&mut self.backend, bytes, timeout).await {
            Ok(()) => Ok(()),
            Err(BackendWriteError::Timeout) => {
                let reply = local_reply::timeout(self.hostname());
                self.cout.extend_from_slice(&reply);
                Err(EndReason::BackendTimeout)
            }
            Err(BackendWriteError::NotConnected) => Err(self.backend_lost(None)),
            Err(BackendWriteError::Failed(e)) => Err(self.backend_lost(Some(&e))),
        }
    }

    /// Reads one complete backend reply within `timeout`.
    async fn read_reply(&mut self, timeout: Duration) -> Result<Reply, EndReason> {
        loop {
            if self.bin_pos < self.bin_len {
                let input = self.bin.get(self.bin_pos..self.bin_len).unwrap_or_default();
                let (n, result) = self.replies.receive(input);
                self.bin_pos += n;
                match result {
                    Ok(Some(reply)) => return Ok(reply),
                    Ok(None) => continue,
                    Err(e) => {
                        tracing::warn!(listener = %self.session.listener.config.name, client = %self.session.client_addr, error = %e, "backend broke the reply grammar");
                        let reply = local_reply::backend_error(self.hostname());
                        self.cout.extend_from_slice(&reply);
                        return Err(EndReason::backend_violation(e.to_string()));
                    }
                }
            }
            let stop = self.stop_signal();
            let Some(backend) = self.backend.stream() else {
                return Err(self.backend_lost(None));
            };
            let read = tokio::select! {
                biased;
                () = stop.cancelled() => return Err(self.shutting_down()),
                read = tokio::time::timeout(timeout, backend.read(&mut self.bin)) => read,
            };
            match read {
                Err(_) => {
                    tracing::warn!(listener = %self.session.listener.config.name, client = %self.session.client_addr, timeout_s = timeout.as_secs(), "backend reply timed out");
                    let reply = local_reply::timeout(self.hostname());
                    self.cout.extend_from_slice(&reply);
                    return Err(EndReason::BackendTimeout);
                }
                Ok(Ok(0)) => return Err(self.backend_lost(None)),
                Ok(Err(e)) => return Err(self.backend_lost(Some(&e))),
                Ok(Ok(n)) => {
                    self.bin_pos = 0;
                    self.bin_len = n;
                }
            }
        }
    }

    /// Reads the next client bytes, writing every queued reply first.
    async fn read_client<S: Transport>(
        &mut self,
        client: &mut ClientStream<S>,
    ) -> Result<(), EndReason> {
        self.flush_client(client).await?;
        if self.must_stop() {
            return Err(self.shutting_down());
        }
        let idle_deadline = Instant::now() + self.session.listener.timeouts.idle;
        let deadline = self
            .login_deadline
            .map_or(idle_deadline, |login| login.min(idle_deadline));
        // Checked before the read too: a read that is always ready (a client pipelining
        // without pause) would otherwise win over an expired deadline every time.
        if self.login_expired() {
            return Err(self.login_timed_out());
        }
        let stop = self.stop_signal();
        let read = tokio::select! {
            biased;
            () = stop.cancelled() => return Err(self.shutting_down()),
            read = tokio::time::timeout_at(deadline, client.read(&mut self.cin)) => read,
        };
        match read {
            Err(_) if self.login_expired() => Err(self.login_timed_out()),
            Err(_) => {
                let reply = local_reply::timeout(self.hostname());
                self.cout.extend_from_slice(&reply);
                Err(EndReason::ClientIdle)
            }
            Ok(Ok(0)) => Err(EndReason::ClientClosed),
            Ok(Err(e)) => Err(EndReason::client_io(&e)),
            Ok(Ok(n)) => {
                self.cin_pos = 0;
                self.cin_len = n;
                Ok(())
            }
        }
    }

    /// Whether `timeouts.login` ran out before the client got past login.
    fn login_expired(&self) -> bool {
        self.login_deadline
            .is_some_and(|deadline| Instant::now() >= deadline)
    }

    fn login_timed_out(&mut self) -> EndReason {
        let reply = local_reply::login_timeout(self.hostname());
        self.cout.extend_from_slice(&reply);
        EndReason::LoginTimeout
    }

    /// Writes the queued client output.
    async fn flush_client<S: Transport>(
        &mut self,
        client: &mut ClientStream<S>,
    ) -> Result<(), EndReason> {
        if self.cout.is_empty() {
            return Ok(());
        }
        let idle = self.session.listener.timeouts.idle;
        let write = async {
            client.write_all(&self.cout).await?;
            client.flush().await
        };
        let result = tokio::time::timeout(idle, write).await;
        self.cout.clear();
        match result {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(EndReason::client_io(&e)),
            Err(_) => Err(EndReason::ClientIdle),
        }
    }
}

#[derive(Debug)]
enum BackendWriteError {
    Timeout,
    /// No backend connection (not yet, or dropped on purpose).
    NotConnected,
    Failed(std::io::Error),
}

async fn write_backend(
    backend: &mut Link,
    bytes: &[u8],
    timeout: Duration,
) -> Result<(), BackendWriteError> {
    let Some(backend) = backend.stream() else {
        return Err(BackendWriteError::NotConnected);
    };
    match tokio::time::timeout(timeout, backend.write_all(bytes)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(BackendWriteError::Failed(e)),
        Err(_) => Err(BackendWriteError::Timeout),
    }
}

/// The mechanism name as logged: SASL names are `[A-Z0-9-_]{1,20}` (RFC 4422 §3.1); anything
/// else is client text and is not logged.
fn mechanism_for_log(mechanism: &[u8]) -> String {
    let valid = !mechanism.is_empty()
        && mechanism.len() <= MAX_MECHANISM_LOG
        && mechanism
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_');
    if valid {
        String::from_utf8_lossy(mechanism).to_ascii_uppercase()
    } else {
        "invalid".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The SIZE reserve covers the longest field mailfront can write, so a message
    /// that passed `MAIL SIZE=` is never refused only because of the field.
    #[test]
    fn the_size_reserve_covers_the_longest_possible_received_field() {
        let label = "a".repeat(63);
        let domain = [label.as_str(); 4].join(".");
        assert_eq!(domain.len(), 255);
        let local = "l".repeat(256 - 1 - 95);
        let recipient = format!("{local}@{}", [&label[..], &label[..31]].join("."));
        assert_eq!(recipient.len(), 256);
        let cipher = (0..=u16::MAX)
            .map(crate::tls::names::cipher_suite_name)
            .max_by_key(|n| n.len())
            .unwrap();
        let group = (0..=u16::MAX)
            .filter_map(crate::tls::names::known_group_name)
            .max_by_key(|n| n.len())
            .unwrap();
        let id = ReceivedId::random();
        let ip: std::net::IpAddr = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe".parse().unwrap();
        let mut longest = 0;
        for helo in [domain.as_bytes(), &[b'(', 200][..].repeat(300)] {
            let header = received_header(&ReceivedInfo {
                helo,
                client_ip: ip,
                hostname: &domain,
                protocol: WithProtocol::Esmtpsa,
                id: &id,
                recipient: Some(recipient.as_bytes()),
                cipher: TlsCipher {
                    iana_name: Some(&cipher),
                    code: 0,
                },
                group: Some(group),
                date: OffsetDateTime::now_utc(),
            });
            let text = String::from_utf8(header.clone()).unwrap();
            assert!(text.contains(&format!("for <{recipient}>")), "{text}");
            longest = longest.max(header.len());
        }
        eprintln!("longest Received field: {longest} octets");
        assert!(
            longest as u64 <= RECEIVED_SIZE_RESERVE,
            "{longest} > {RECEIVED_SIZE_RESERVE}"
        );
    }

    #[test]
    fn only_well_formed_mechanism_names_reach_the_log() {
        assert_eq!(mechanism_for_log(b"plain"), "PLAIN");
        assert_eq!(mechanism_for_log(b"SCRAM-SHA-256"), "SCRAM-SHA-256");
        assert_eq!(mechanism_for_log(b""), "invalid");
        assert_eq!(mechanism_for_log(b"AGFsaWNlAHNlY3JldA=="), "invalid");
        assert_eq!(mechanism_for_log(&[b'A'; 21]), "invalid");
    }
}
