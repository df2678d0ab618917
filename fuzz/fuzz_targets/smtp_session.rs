//! The whole SMTP session (`smtp::session::serve`) in-process, against a fake backend that reads
//! what mailfront writes exactly as Postfix's smtpd frames it, with an oracle on every line and
//! octet that backend runs.
//!
//! Why: mailfront judges each client command once and forwards it; the backend must then run
//! exactly that command and nothing else. Postfix reads a command line only up to
//! `line_length_limit` (2048 octets, LF included; `smtpd_chat_query` uses `smtp_get` with
//! `SMTP_GET_FLAG_SKIP`, so the rest of the line up to its LF is discarded) and parses BDAT with
//! its own strict parser (digits only; up to 3.11 Postfix answered a BDAT it could not parse
//! with 501 and read the announced chunk as commands; 3.12 answers 521 and hangs up). A line
//! mailfront writes that Postfix reads differently is a way past the gate: `BDAT` + 2044 spaces +
//! `300 LAST` made mailfront stream 300 octets of chunk while Postfix, seeing `BDAT` alone, ran
//! those octets as commands (`XCLIENT LOGIN=…`, a second message without mailfront's Received
//! field).
//!
//! Input: `flags`, `split`, then the client's bytes (at most [`MAX_INPUT`] in all).
//! - `flags` bits 0-1: listener. 0 and 1: implicit TLS (465); with 1 the listener learned the
//!   backend's EHLO from an earlier session. The client side is an in-memory pipe with no TLS
//!   record layer and the session is given a [`TlsInfo`] as a real handshake would
//!   (tests/it/drivers.rs runs real handshakes; one per execution would dominate the run).
//!   2: STARTTLS (587) with `require_tls_for_mail` (default); 3: the same with it off. On 587
//!   the client's bytes are cleartext: a STARTTLS it sends starts a handshake over the rest of
//!   the input, which fails, so only the cleartext part of a 587 session is fuzzed.
//! - bit 2 `backend_client_info`; bit 3 the backend offers XCLIENT; bit 4 CHUNKING; bit 5
//!   PIPELINING; bit 6 the client closes its side after its last byte (else it goes quiet and
//!   the idle timeout ends the session); bit 7 the backend refuses every RCPT.
//! - `split` chooses how the client's bytes are cut into writes, each followed by a pause in
//!   (paused) time so mailfront and the backend act on every partial input.
//!
//! The fake backend plays Postfix 3.x (smtpd.c, smtpd_token.c, smtp_stream.c,
//! smtpd_sasl_glue.c): greeting 220, EHLO with a multi-line 250 (PIPELINING, SIZE, 8BITMIME,
//! AUTH PLAIN LOGIN, CHUNKING, XCLIENT, ENHANCEDSTATUSCODES as flagged), AUTH PLAIN/LOGIN with
//! one good credential (`\0user\0secret`), MAIL/RCPT/RSET/NOOP, DATA up to the `.` line (lines
//! end at LF, a lone `.` after a complete line ends the data), BDAT with Postfix's own parse and
//! `skip_bdat`, XCLIENT (220, session reset), QUIT, `500` for unknown commands, and 421 after 20
//! errors. Every reply it sends but 334 carries a nonce `[bN]`.
//!
//! Oracle (a panic is a finding):
//! 1. every line the backend reads is one complete line mailfront wrote: a command line (an AUTH
//!    with its initial response included: Postfix reads it with `line_length_limit` like any
//!    command, smtpd_sasl_proto.c) fits [`POSTFIX_LINE_LIMIT`] octets with its LF (one more
//!    when the limit falls between CR and LF: `smtp_get` peeks), a SASL response after 334
//!    [`POSTFIX_SASL_LIMIT`] (`smtpd_sasl_resp_limit`); and only commands the gate may
//!    let through arrive: no XCLIENT but mailfront's own (with `backend_client_info`, before
//!    any client command: mailfront's EHLO, then XCLIENT with the client's address where
//!    offered), never XFORWARD or STARTTLS,
//!    no AUTH (nor anything at all on a 587 listener that requires TLS for mail) before TLS, no
//!    BDAT that Postfix parses otherwise than mailfront does or to a backend without CHUNKING,
//!    and nothing pipelined after a command that ends a pipeline group (Postfix
//!    `smtpd_forbid_unauth_pipelining`);
//! 2. every message the backend stores over TLS starts with exactly one Received field written
//!    by mailfront (`by <hostname> (mailfront)`, whole up to its date; content starting with
//!    SP/TAB may fold onto it after that, as onto Postfix's own), and no other `(mailfront)`
//!    appears unless the client typed one; a cleartext message carries none;
//! 3. every 235 or 25x the client receives carries the nonce of a reply the backend sent with
//!    that code, each at most once and in order, except mailfront's own EHLO/HELO replies
//!    (before TLS, or on 465 from the EHLO the listener learned: flags `& 3 == 1`) and its own
//!    `250 2.0.0 Ok`, at most one per NOOP/RSET word in the client's input;
//! 4. no bare CR, bare LF or NUL reaches the backend in a command, SASL line or message content;
//! 5. the session never panics and ends (paused time fires every timeout at once).
#![no_main]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use mailfront::backend::BackendConnector;
use mailfront::config::{
    BackendAddress, Backends, DEFAULT_SMTP_LINE, Limits, ListenerConfig, MinTlsVersion, Protocol,
    Timeouts, TlsConfig, TlsMode,
};
use mailfront::metrics::Metrics;
use mailfront::session::{ClientStream, ListenerContext, Session};
use mailfront::smtp::command::{Bdat, Command};
use mailfront::tls::{self, CertStore, Handshaker, TlsInfo};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::runtime::Runtime;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio_util::sync::CancellationToken;

/// Longest input: sessions of a few dozen commands and a message or two.
const MAX_INPUT: usize = 16 * 1024;
/// mailfront's hostname, as its greeting, EHLO/HELO replies and Received field write it.
const HOST: &str = "mx.front.test";
/// The fake backend's name (never shown to the client by mailfront).
const BACKEND: &str = "smtpd.internal";
const CLIENT: &str = "192.0.2.10:50000";
const LOCAL: &str = "192.0.2.1:465";
/// Postfix `line_length_limit` (default 2048): the most octets of one command line that
/// `smtp_get` reads, the LF included (or, since Postfix 3.4, 2048 octets ending in the CR of a
/// CRLF); the rest of a longer line is discarded.
const POSTFIX_LINE_LIMIT: usize = 2048;
/// Postfix `smtpd_sasl_resp_limit` (default 12288): the same for a SASL response after 334.
const POSTFIX_SASL_LIMIT: usize = 12288;
/// Postfix `message_size_limit` (default 10240000), also the SIZE the backend offers.
const MESSAGE_LIMIT: u64 = 10_240_000;
/// Postfix `smtpd_hard_error_limit` (default 20).
const HARD_ERROR_LIMIT: u32 = 20;
/// The one good credential: `\0user\0secret` for PLAIN, `user`/`secret` for LOGIN.
const GOOD_PLAIN: &[u8] = b"AHVzZXIAc2VjcmV0";
const GOOD_USER: &[u8] = b"dXNlcg==";
const GOOD_PASS: &[u8] = b"c2VjcmV0";
/// In-memory pipe capacity each way: above everything one input can make either side write.
const PIPE: usize = 1 << 20;
/// Virtual time after which a session that has not ended is a hang.
const SESSION_LIMIT: Duration = Duration::from_secs(24 * 3600);
/// Pause after each client write (virtual time): everything that can run, runs.
const WRITE_PAUSE: Duration = Duration::from_millis(10);
/// Most client writes per input.
const MAX_WRITES: usize = 48;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// 465: TLS from the start.
    Implicit,
    /// 587, `require_tls_for_mail: true`: no backend before TLS.
    Strict,
    /// 587, `require_tls_for_mail: false`: cleartext MAIL connects the backend.
    Lax,
}

/// One listener, built once: its context and the receiving end of its backend connector.
struct Listener {
    context: Arc<ListenerContext>,
    backends: Mutex<UnboundedReceiver<DuplexStream>>,
}

fn listener_index(kind: Kind, client_info: bool) -> usize {
    let k = match kind {
        Kind::Implicit => 0,
        Kind::Strict => 1,
        Kind::Lax => 2,
    };
    k * 2 + usize::from(client_info)
}

fn listeners() -> &'static [Listener] {
    static LISTENERS: OnceLock<Vec<Listener>> = OnceLock::new();
    LISTENERS.get_or_init(|| {
        let tls_config = TlsConfig {
            certificates: Vec::new(),
            min_version: MinTlsVersion::Tls12,
            handshake_timeout: Duration::from_secs(10),
            reload_interval: Duration::from_secs(60),
            session_tickets: 0,
            ticket_key_file: None,
        };
        // No certificate files: the store makes a self-signed one (only 587's failing
        // handshakes ever use it).
        let store = Arc::new(CertStore::load(&[], HOST).unwrap());
        let handshaker = Handshaker::new(
            tls::server_config(&tls_config, store, None).unwrap(),
            tls_config.handshake_timeout,
            tls_config.min_version,
        );
        let metrics = Metrics::register(&prometheus::Registry::new()).unwrap();
        let mut out = Vec::new();
        for kind in [Kind::Implicit, Kind::Strict, Kind::Lax] {
            for client_info in [false, true] {
                let config = ListenerConfig {
                    name: format!("smtp-{kind:?}-{client_info}"),
                    protocol: Protocol::Smtp,
                    listen: LOCAL.parse().unwrap(),
                    tls: if kind == Kind::Implicit {
                        TlsMode::Implicit
                    } else {
                        TlsMode::Starttls
                    },
                    // Never dialled: the in-memory connector replaces TCP.
                    backend: Backends::single(BackendAddress {
                        host: "backend.invalid".to_owned(),
                        port: 1,
                    }),
                    max_connections: 10,
                    require_tls_for_mail: kind != Kind::Lax,
                    backend_proxy_protocol: false,
                    proxy_protocol_from: Vec::new(),
                    backend_client_info: client_info,
                    routing: Default::default(),
                };
                let (backend, backends) = BackendConnector::duplex(PIPE);
                let listener_metrics = metrics.listener(&config);
                let context = ListenerContext {
                    config,
                    hostname: HOST.to_owned(),
                    timeouts: Timeouts {
                        backend_connect: Duration::from_secs(5),
                        idle: Duration::from_secs(300),
                        login: Duration::from_secs(1000),
                        data_reply: Duration::from_secs(600),
                        relay_idle: Duration::from_secs(3600),
                        shutdown_grace: Duration::from_secs(30),
                    },
                    limits: Limits {
                        smtp_line: DEFAULT_SMTP_LINE,
                        imap_line: 8192,
                        imap_literal: 65536,
                        pop3_line: 512,
                        preauth_commands: 50,
                        connections_per_ip: 0,
                        auth_failures_per_ip: 0,
                        auth_failure_window: Duration::from_secs(600),
                    },
                    handshaker: handshaker.clone(),
                    metrics: listener_metrics,
                    backend,
                    client_info_notices: Default::default(),
                    learned: Default::default(),
                    router: None,
                };
                out.push(Listener {
                    context: Arc::new(context),
                    backends: Mutex::new(backends),
                });
            }
        }
        out
    })
}

fn runtime() -> &'static Runtime {
    static RUNTIME: OnceLock<Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap()
    })
}

/// What a finished handshake would have recorded (implicit TLS).
fn tls_info() -> TlsInfo {
    TlsInfo {
        version: rustls::ProtocolVersion::TLSv1_3,
        cipher: rustls::CipherSuite::TLS13_AES_256_GCM_SHA384,
        group: Some(rustls::NamedGroup::X25519),
        sni: None,
        signature_scheme: None,
    }
}

/// The session's settings, from the flags byte.
#[derive(Debug, Clone, Copy)]
struct Setup {
    kind: Kind,
    /// 465 only: the listener already learned the backend's EHLO from an earlier session, so
    /// EHLO is answered without connecting (mailfront connects at AUTH or MAIL).
    learned: bool,
    client_info: bool,
    offers_xclient: bool,
    offers_chunking: bool,
    offers_pipelining: bool,
    client_closes: bool,
    refuse_rcpt: bool,
}

impl Setup {
    fn from_flags(flags: u8) -> Setup {
        let bit = |n: u8| flags & (1 << n) != 0;
        Setup {
            kind: match flags & 3 {
                0 | 1 => Kind::Implicit,
                2 => Kind::Strict,
                _ => Kind::Lax,
            },
            learned: flags & 3 == 1,
            client_info: bit(2),
            offers_xclient: bit(3),
            offers_chunking: bit(4),
            offers_pipelining: bit(5),
            client_closes: bit(6),
            refuse_rcpt: bit(7),
        }
    }

    /// Whether the client's side is TLS (only implicit here: 587 handshakes always fail).
    fn client_tls(&self) -> bool {
        self.kind == Kind::Implicit
    }
}

/// What the backend learned over all its connections of one session.
#[derive(Debug, Default)]
struct Record {
    /// The code of every reply carrying nonce `[bN]`, by N.
    sent: Vec<u16>,
    /// Messages stored (end of DATA, BDAT LAST), as the backend queued them.
    messages: Vec<Vec<u8>>,
    connections: u32,
}

/// `SMTP_SESSION_DEBUG=1 smtp_session <input>` prints what mailfront writes to the backend
/// (`C:`), the backend's replies (`S:`), what the client got and the messages stored.
fn debug() -> bool {
    static DEBUG: OnceLock<bool> = OnceLock::new();
    *DEBUG.get_or_init(|| std::env::var_os("SMTP_SESSION_DEBUG").is_some())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BdatState {
    None,
    /// SMTPD_PROCESSING_BDAT: a BDAT of this transaction was accepted.
    Processing,
    /// SMTPD_BDAT_STAT_ERROR: skip payloads until BDAT LAST or RSET.
    Error,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Sasl {
    /// `AUTH PLAIN` without an initial response: the credential line.
    Plain,
    LoginUser,
    LoginPass {
        user: Vec<u8>,
    },
}

#[derive(Debug)]
enum Reading {
    Command,
    Sasl(Sasl),
    /// DATA content: `prev_cont` when the previous piece was a partial (over-long) line.
    Data {
        prev_cont: bool,
    },
    /// BDAT payload: `left` octets to read; `skip` is the reply of a refused BDAT whose payload
    /// is read and discarded (`skip_bdat`).
    Chunk {
        left: u64,
        size: u64,
        last: bool,
        skip: Option<(u16, String)>,
    },
}

/// The fake Postfix smtpd for one connection: bytes in, replies out, sans I/O.
struct Postfix<'r> {
    setup: Setup,
    record: &'r mut Record,
    input: Vec<u8>,
    out: Vec<u8>,
    reading: Reading,
    closed: bool,
    // smtpd state.
    esmtp: bool,
    helo: Option<Vec<u8>>,
    in_tx: bool,
    rcpts: u32,
    bdat: BdatState,
    message: Vec<u8>,
    act_size: u64,
    authenticated: bool,
    error_count: u32,
    // Oracle state.
    /// Command lines run on this connection.
    commands: u32,
    /// The last DATA content octet the backend read was a CR.
    content_cr: bool,
}

fn lossy(bytes: &[u8]) -> String {
    let shown = if bytes.len() > 200 {
        [&bytes[..120], b" ... ", &bytes[bytes.len() - 60..]].concat()
    } else {
        bytes.to_vec()
    };
    format!(
        "{:?} ({} octets)",
        String::from_utf8_lossy(&shown),
        bytes.len()
    )
}

/// `isspace` in the C locale, as Postfix's `ISSPACE`.
fn is_space(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
}

/// `smtp_quoted`: appends up to the closing quote (nesting `<…>` and `"…"`); returns the index
/// after it.
fn quoted(line: &[u8], mut i: usize, token: &mut Vec<u8>, last: u8) -> usize {
    let mut stack = vec![last];
    loop {
        let Some(&c) = line.get(i) else { return i };
        i += 1;
        token.push(c);
        let wanted = *stack.last().unwrap();
        if c == b'\\' {
            let Some(&next) = line.get(i) else { return i };
            i += 1;
            token.push(next);
        } else if c == wanted {
            if stack.len() == 1 {
                return i;
            }
            stack.pop();
        } else if c == b'"' {
            stack.push(b'"');
        } else if c == b'<' && wanted == b'>' {
            stack.push(b'>');
        }
    }
}

/// `smtpd_token`: Postfix's command tokenizer.
fn tokens(line: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut i = 0;
    loop {
        let mut token = Vec::new();
        while let Some(&c) = line.get(i) {
            i += 1;
            if is_space(c) {
                while line.get(i).is_some_and(|&c| is_space(c)) {
                    i += 1;
                }
                if !token.is_empty() {
                    break;
                }
            } else if c == b'<' || c == b'"' {
                token.push(c);
                i = quoted(line, i, &mut token, if c == b'<' { b'>' } else { b'"' });
            } else if c == b':' {
                token.push(c);
                if token.eq_ignore_ascii_case(b"to:") || token.eq_ignore_ascii_case(b"from:") {
                    break;
                }
            } else {
                token.push(c);
                if c == b'\\' {
                    let Some(&next) = line.get(i) else { break };
                    i += 1;
                    token.push(next);
                }
            }
        }
        if token.is_empty() {
            return out;
        }
        out.push(token);
    }
}

/// `alldig` then `off_cvt_string`: digits only, no overflow.
fn postfix_chunk_size(word: &[u8]) -> Option<u64> {
    if word.is_empty() || !word.iter().all(u8::is_ascii_digit) {
        return None;
    }
    word.iter().try_fold(0u64, |n, &d| {
        n.checked_mul(10)?
            .checked_add(u64::from(d - b'0'))
            .filter(|&v| v <= i64::MAX as u64)
    })
}

impl<'r> Postfix<'r> {
    fn new(setup: Setup, record: &'r mut Record) -> Self {
        Postfix {
            setup,
            record,
            input: Vec::new(),
            out: Vec::new(),
            reading: Reading::Command,
            closed: false,
            esmtp: false,
            helo: None,
            in_tx: false,
            rcpts: 0,
            bdat: BdatState::None,
            message: Vec::new(),
            act_size: 0,
            authenticated: false,
            error_count: 0,
            commands: 0,
            content_cr: false,
        }
    }

    fn greeting(&mut self) {
        self.reply(220, &format!("{BACKEND} ESMTP Postfix"));
    }

    /// One reply line with its nonce.
    fn reply(&mut self, code: u16, text: &str) {
        let nonce = self.record.sent.len();
        self.record.sent.push(code);
        self.out
            .extend_from_slice(format!("{code} {text} [b{nonce}]\r\n").as_bytes());
    }

    fn error(&mut self, code: u16, text: &str) {
        self.error_count += 1;
        self.reply(code, text);
    }

    fn ehlo_reply(&mut self) {
        let nonce = self.record.sent.len();
        self.record.sent.push(250);
        let mut lines = vec![format!("{BACKEND} [b{nonce}]")];
        if self.setup.offers_pipelining {
            lines.push("PIPELINING".to_owned());
        }
        lines.push(format!("SIZE {MESSAGE_LIMIT}"));
        lines.push("8BITMIME".to_owned());
        lines.push("AUTH PLAIN LOGIN".to_owned());
        if self.setup.offers_chunking {
            lines.push("CHUNKING".to_owned());
        }
        if self.setup.offers_xclient {
            lines.push(
                "XCLIENT NAME ADDR PROTO HELO REVERSE_NAME PORT LOGIN DESTADDR DESTPORT".to_owned(),
            );
        }
        lines.push("ENHANCEDSTATUSCODES".to_owned());
        let n = lines.len();
        for (i, line) in lines.iter().enumerate() {
            let sep = if i + 1 == n { ' ' } else { '-' };
            self.out
                .extend_from_slice(format!("250{sep}{line}\r\n").as_bytes());
        }
    }

    /// `mail_reset` and `rcpt_reset`.
    fn reset_transaction(&mut self) {
        self.in_tx = false;
        self.rcpts = 0;
        self.bdat = BdatState::None;
        self.message.clear();
        self.act_size = 0;
    }

    /// Takes one line of at most `limit` octets (its LF included) off the input, as `smtp_get`
    /// would read it; `None` until a whole line is there.
    fn take_line(&mut self, limit: usize, what: &str) -> Option<Vec<u8>> {
        let window = &self.input[..self.input.len().min(limit)];
        let end = match window.iter().position(|&b| b == b'\n') {
            Some(end) => Some(end),
            // Stopped in the middle of CRLF: smtp_get (Postfix 3.4 and later) peeks at the
            // next octet, so a line of `limit` octets before its LF is still read whole.
            None if self.input.len() > limit && self.input[limit - 1] == b'\r' => {
                (self.input[limit] == b'\n').then_some(limit)
            }
            None if self.input.len() == limit && self.input[limit - 1] == b'\r' => return None,
            None => None,
        };
        match end {
            Some(end) => {
                let raw: Vec<u8> = self.input.drain(..=end).collect();
                // Oracle 4: only CRLF ends a line mailfront writes; no CR or NUL inside it.
                let Some(text) = raw.strip_suffix(b"\r\n") else {
                    panic!(
                        "a {what} line ended by a bare LF reached the backend: {}",
                        lossy(&raw)
                    );
                };
                assert!(
                    !text.contains(&b'\r'),
                    "a {what} line with a bare CR reached the backend: {}",
                    lossy(&raw)
                );
                assert!(
                    !text.contains(&0),
                    "a {what} line with a NUL reached the backend: {}",
                    lossy(&raw)
                );
                Some(text.to_vec())
            }
            None if self.input.len() >= limit => {
                let len = self.input.iter().position(|&b| b == b'\n').map_or_else(
                    || format!("at least {}", self.input.len()),
                    |end| (end + 1).to_string(),
                );
                panic!(
                    "a {what} line of {len} octets: Postfix runs only its first {limit} octets \
                     and discards the rest of the line: {}",
                    lossy(&self.input[..self.input.len().min(limit + 64)])
                )
            }
            None => None,
        }
    }

    /// Oracle 4 on DATA content, octet by octet as the backend reads it, since Postfix frames it
    /// by lines (a CR at the very end of what arrived is judged by the next octet: a connection
    /// dropped there is fine).
    fn content(&mut self, bytes: &[u8]) {
        for &b in bytes {
            match b {
                b'\n' => assert!(
                    self.content_cr,
                    "a bare LF in message content reached the backend"
                ),
                _ => assert!(
                    !self.content_cr,
                    "a bare CR in message content reached the backend (followed by {b:#04x})"
                ),
            }
            self.content_cr = b == b'\r';
        }
    }

    /// Runs everything the input holds.
    fn process(&mut self) {
        while !self.closed {
            let progressed = match self.reading {
                Reading::Command => {
                    if self.error_count >= HARD_ERROR_LIMIT {
                        self.reply(421, &format!("4.7.0 {BACKEND} Error: too many errors"));
                        self.closed = true;
                        return;
                    }
                    match self.take_line(POSTFIX_LINE_LIMIT, "command") {
                        Some(line) => {
                            let pipelined = !self.input.is_empty();
                            self.command(&line, pipelined);
                            true
                        }
                        None => false,
                    }
                }
                Reading::Sasl(_) => match self.take_line(POSTFIX_SASL_LIMIT, "SASL response") {
                    Some(line) => {
                        self.sasl(&line);
                        true
                    }
                    None => false,
                },
                Reading::Data { .. } => self.data_piece(),
                Reading::Chunk { .. } => self.chunk_piece(),
            };
            if !progressed {
                return;
            }
        }
    }

    /// One `smtp_get` piece of DATA content: a line up to LF, or `line_length_limit` octets of
    /// a longer one (Postfix's REC_TYPE_CONT); a lone `.` after a complete line ends the data.
    fn data_piece(&mut self) -> bool {
        let Reading::Data { prev_cont } = self.reading else {
            return false;
        };
        let limit = POSTFIX_LINE_LIMIT;
        let window = &self.input[..self.input.len().min(limit)];
        let (take, complete) = match window.iter().position(|&b| b == b'\n') {
            Some(end) => (end + 1, true),
            None if self.input.len() < limit => return false,
            // Stopped in the middle of CRLF: smtp_get peeks at the next octet.
            None if self.input[limit - 1] == b'\r' => match self.input.get(limit) {
                None => return false,
                Some(b'\n') => (limit + 1, true),
                Some(_) => (limit, false),
            },
            None => (limit, false),
        };
        let raw: Vec<u8> = self.input.drain(..take).collect();
        self.content(&raw);
        let mut text = raw.as_slice();
        if complete {
            text = &text[..text.len() - 1];
            while let Some(rest) = text.strip_suffix(b"\r") {
                text = rest;
            }
        }
        if !prev_cont && text.first() == Some(&b'.') {
            if text == b"." {
                self.reading = Reading::Command;
                self.end_of_message(false);
                return true;
            }
            text = &text[1..];
        }
        let mut stored = text.to_vec();
        if complete {
            stored.extend_from_slice(b"\r\n");
        }
        self.act_size += stored.len() as u64;
        self.message.extend_from_slice(&stored);
        self.reading = Reading::Data {
            prev_cont: !complete,
        };
        true
    }

    fn chunk_piece(&mut self) -> bool {
        let Reading::Chunk {
            left,
            size,
            last,
            ref skip,
        } = self.reading
        else {
            return false;
        };
        let skip = skip.clone();
        let n = usize::try_from(left)
            .unwrap_or(usize::MAX)
            .min(self.input.len());
        if n == 0 && left > 0 {
            return false;
        }
        let part: Vec<u8> = self.input.drain(..n).collect();
        let left = left - n as u64;
        if skip.is_none() {
            self.message.extend_from_slice(&part);
        }
        if left > 0 {
            self.reading = Reading::Chunk {
                left,
                size,
                last,
                skip,
            };
            return true;
        }
        self.reading = Reading::Command;
        match skip {
            Some((code, text)) => {
                self.error(code, &text);
                if last {
                    self.reset_transaction();
                } else {
                    self.bdat = BdatState::Error;
                }
            }
            None if last => self.end_of_message(true),
            None => self.reply(250, &format!("2.0.0 Ok: {size} bytes")),
        }
        true
    }

    /// DATA's `.` or BDAT LAST: the message is queued.
    fn end_of_message(&mut self, bdat: bool) {
        self.content_cr = false;
        let message = std::mem::take(&mut self.message);
        if bdat {
            // Oracle 4 on BDAT content, whose framing is by count: judged on the message as
            // stored. (Postfix skips every chunk after a refused one until LAST or RSET, so a
            // stored message is all the chunks since mailfront's own start of the message.)
            for (i, &b) in message.iter().enumerate() {
                let bare = match b {
                    b'\r' => message.get(i + 1) != Some(&b'\n'),
                    b'\n' => i == 0 || message[i - 1] != b'\r',
                    _ => false,
                };
                assert!(
                    !bare,
                    "a message with a bare CR or LF at octet {i} was stored (BDAT): {}",
                    lossy(&message)
                );
            }
        }
        if self.act_size > MESSAGE_LIMIT {
            self.reset_transaction();
            self.reply(552, "5.3.4 Error: message file too big");
            return;
        }
        let queue_id = format!("Q{}", self.record.messages.len());
        let size = message.len();
        self.record.messages.push(message);
        self.reset_transaction();
        self.error_count = 0;
        if bdat {
            self.reply(250, &format!("2.0.0 Ok: {size} bytes queued as {queue_id}"));
        } else {
            self.reply(250, &format!("2.0.0 Ok: queued as {queue_id}"));
        }
    }

    fn sasl(&mut self, line: &[u8]) {
        let Reading::Sasl(step) = std::mem::replace(&mut self.reading, Reading::Command) else {
            return;
        };
        if line == b"*" {
            self.error(501, "5.7.0 Authentication aborted");
            return;
        }
        match step {
            Sasl::Plain => self.auth_verdict(line == GOOD_PLAIN),
            Sasl::LoginUser => {
                self.out.extend_from_slice(b"334 UGFzc3dvcmQ6\r\n");
                self.reading = Reading::Sasl(Sasl::LoginPass {
                    user: line.to_vec(),
                });
            }
            Sasl::LoginPass { user } => self.auth_verdict(user == GOOD_USER && line == GOOD_PASS),
        }
    }

    fn auth_verdict(&mut self, good: bool) {
        if good {
            self.authenticated = true;
            self.reply(235, "2.7.0 Authentication successful");
        } else {
            self.error(
                535,
                "5.7.8 Error: authentication failed: authentication failure",
            );
        }
    }

    /// One command line, as smtpd_proto and the command table run it.
    fn command(&mut self, line: &[u8], pipelined: bool) {
        self.commands += 1;
        // Oracle 1: with backend_client_info, mailfront tells the backend who the client is
        // before any client command: its own EHLO, then XCLIENT where offered.
        if self.setup.client_info && self.commands == 1 {
            assert!(
                line == format!("EHLO {HOST}").as_bytes(),
                "with backend_client_info the first command must be mailfront's own EHLO, not {}",
                lossy(line)
            );
        }
        if self.setup.client_info && self.setup.offers_xclient && self.commands == 2 {
            assert!(
                line.starts_with(b"XCLIENT "),
                "a command before mailfront's XCLIENT on a backend that offers it: {}",
                lossy(line)
            );
        }
        if std::str::from_utf8(line).is_err() {
            // smtputf8_enable: malformed UTF-8 is refused before parsing.
            self.error(500, "5.5.2 Error: bad UTF-8 syntax");
            return;
        }
        let argv = tokens(line);
        let Some(verb) = argv.first() else {
            self.error(500, "5.5.2 Error: bad syntax");
            return;
        };
        let verb = String::from_utf8_lossy(verb).to_ascii_uppercase();
        let argc = argv.len();
        let last_in_group = matches!(verb.as_str(), "HELO" | "EHLO" | "DATA" | "NOOP" | "VRFY");
        let known = matches!(
            verb.as_str(),
            "HELO"
                | "EHLO"
                | "XCLIENT"
                | "XFORWARD"
                | "STARTTLS"
                | "AUTH"
                | "MAIL"
                | "RCPT"
                | "DATA"
                | "BDAT"
                | "RSET"
                | "NOOP"
                | "VRFY"
                | "ETRN"
                | "QUIT"
                | "HELP"
        );
        // Oracle 1: Postfix (smtpd_forbid_unauth_pipelining) hangs up on a client that sends
        // more after a command ending a pipeline group, or anything pipelined before EHLO.
        assert!(
            !(known && pipelined && (!self.esmtp || last_in_group)),
            "mailfront pipelined past {} (ESMTP: {}): Postfix answers 554 and hangs up",
            lossy(line),
            self.esmtp
        );
        match verb.as_str() {
            "HELO" | "EHLO" => {
                let Some(name) = argv.get(1).cloned() else {
                    self.error(501, &format!("5.5.4 Syntax: {verb} hostname"));
                    return;
                };
                // helo_cmd, ehlo_cmd: mail_reset and rcpt_reset, a BDAT transaction included.
                self.reset_transaction();
                self.helo = Some(name);
                if verb == "EHLO" {
                    self.esmtp = true;
                    self.ehlo_reply();
                } else {
                    self.esmtp = false;
                    self.reply(250, BACKEND);
                }
            }
            "XCLIENT" => {
                assert!(
                    self.setup.client_info && self.setup.offers_xclient && self.commands == 2,
                    "an XCLIENT that is not mailfront's own (right after its EHLO, before any \
                     client command, with backend_client_info, to a backend that offers it): {}",
                    lossy(line)
                );
                if self.in_tx {
                    self.error(503, "5.5.1 Error: MAIL transaction in progress");
                    return;
                }
                let client: SocketAddr = CLIENT.parse().unwrap();
                let addr = format!("ADDR={}", client.ip());
                assert!(
                    argv.iter().any(|a| a.as_slice() == addr.as_bytes()),
                    "mailfront's XCLIENT without {addr}: {}",
                    lossy(line)
                );
                let attribute = |name: &[u8]| {
                    argv[1..].iter().find_map(|a| {
                        a.get(..name.len())
                            .filter(|k| k.eq_ignore_ascii_case(name))
                            .map(|_| a[name.len()..].to_vec())
                    })
                };
                // A new session, as after a connect (xclient_cmd: helo_reset, the protocol
                // from PROTO= or SMTP, a login from LOGIN=).
                self.reset_transaction();
                self.helo = None;
                self.esmtp = attribute(b"PROTO=").is_some_and(|p| p.eq_ignore_ascii_case(b"ESMTP"));
                self.authenticated = attribute(b"LOGIN=").is_some();
                self.reply(220, &format!("{BACKEND} ESMTP Postfix"));
            }
            "XFORWARD" => panic!("XFORWARD reached the backend: {}", lossy(line)),
            "STARTTLS" => panic!("STARTTLS reached the backend: {}", lossy(line)),
            "AUTH" => {
                assert!(
                    self.setup.client_tls(),
                    "AUTH reached the backend before TLS: {}",
                    lossy(line)
                );
                if self.in_tx {
                    self.error(503, "5.5.1 Error: MAIL transaction in progress");
                } else if self.authenticated {
                    self.error(503, "5.5.1 Error: already authenticated");
                } else if !(2..=3).contains(&argc) {
                    self.error(501, "5.5.4 Syntax: AUTH mechanism");
                } else {
                    let mechanism = argv[1].to_ascii_uppercase();
                    let initial = argv
                        .get(2)
                        .map(|r| if r == b"=" { Vec::new() } else { r.clone() });
                    match (mechanism.as_slice(), initial) {
                        (b"PLAIN", Some(response)) => self.auth_verdict(response == GOOD_PLAIN),
                        (b"PLAIN", None) => {
                            self.out.extend_from_slice(b"334 \r\n");
                            self.reading = Reading::Sasl(Sasl::Plain);
                        }
                        (b"LOGIN", Some(user)) => {
                            self.out.extend_from_slice(b"334 UGFzc3dvcmQ6\r\n");
                            self.reading = Reading::Sasl(Sasl::LoginPass { user });
                        }
                        (b"LOGIN", None) => {
                            self.out.extend_from_slice(b"334 VXNlcm5hbWU6\r\n");
                            self.reading = Reading::Sasl(Sasl::LoginUser);
                        }
                        _ => self.error(
                            535,
                            "5.7.8 Error: authentication failed: Invalid authentication mechanism",
                        ),
                    }
                }
            }
            "MAIL" => {
                if self.in_tx {
                    self.error(503, "5.5.1 Error: nested MAIL command");
                } else if self.bdat != BdatState::None {
                    self.error(503, "5.5.1 Error: MAIL after BDAT");
                } else if argc < 3 || !argv[1].eq_ignore_ascii_case(b"from:") {
                    self.error(501, "5.5.4 Syntax: MAIL FROM:<address>");
                } else if argv[3..].iter().any(|p| {
                    p.get(..5).is_some_and(|k| k.eq_ignore_ascii_case(b"SIZE="))
                        && postfix_chunk_size(&p[5..]).is_some_and(|s| s > MESSAGE_LIMIT)
                }) {
                    self.error(552, "5.3.4 Message size exceeds fixed limit");
                } else {
                    self.in_tx = true;
                    self.reply(250, "2.1.0 Ok");
                }
            }
            "RCPT" => {
                if !self.in_tx {
                    self.error(503, "5.5.1 Error: need MAIL command");
                } else if self.bdat != BdatState::None {
                    self.error(503, "5.5.1 Error: RCPT after BDAT");
                } else if argc < 3 || !argv[1].eq_ignore_ascii_case(b"to:") {
                    self.error(501, "5.5.4 Syntax: RCPT TO:<address>");
                } else if self.setup.refuse_rcpt {
                    self.error(550, "5.1.1 Recipient address rejected: User unknown");
                } else {
                    self.rcpts += 1;
                    self.reply(250, "2.1.5 Ok");
                }
            }
            "DATA" => {
                if self.bdat != BdatState::None {
                    self.error(503, "5.5.1 Error: DATA after BDAT");
                } else if self.rcpts == 0 {
                    if self.in_tx {
                        self.error(554, "5.5.1 Error: no valid recipients");
                    } else {
                        self.error(503, "5.5.1 Error: need RCPT command");
                    }
                } else if argc != 1 {
                    self.error(501, "5.5.4 Syntax: DATA");
                } else {
                    self.message.clear();
                    self.act_size = 0;
                    self.content_cr = false;
                    self.reading = Reading::Data { prev_cont: false };
                    self.reply(354, "End data with <CR><LF>.<CR><LF>");
                }
            }
            "BDAT" => self.bdat(line, &argv),
            "RSET" => {
                if argc != 1 {
                    self.error(501, "5.5.4 Syntax: RSET");
                } else {
                    self.reset_transaction();
                    self.reply(250, "2.0.0 Ok");
                }
            }
            "NOOP" => self.reply(250, "2.0.0 Ok"),
            "VRFY" => {
                if argc < 2 {
                    self.error(501, "5.5.4 Syntax: VRFY address");
                } else {
                    self.reply(252, "2.0.0 Send some mail, I'll try my best");
                }
            }
            "ETRN" => self.error(458, "Unable to queue messages"),
            "HELP" => self.reply(
                214,
                "2.0.0 Commands: AUTH BDAT DATA EHLO HELO MAIL NOOP QUIT RCPT RSET",
            ),
            "QUIT" => {
                self.reply(221, "2.0.0 Bye");
                self.closed = true;
            }
            _ => self.error(500, "5.5.2 Error: command not recognized"),
        }
    }

    /// bdat_cmd.
    fn bdat(&mut self, line: &[u8], argv: &[Vec<u8>]) {
        // Oracle 1: Postfix up to 3.11 answered a BDAT to a server not offering CHUNKING, or one it
        // could not parse, with an error and read the announced chunk as commands.
        assert!(
            self.setup.offers_chunking,
            "BDAT reached a backend that does not offer CHUNKING (the chunk would run as \
             commands): {}",
            lossy(line)
        );
        let argc = argv.len();
        let size = argv.get(1).and_then(|w| postfix_chunk_size(w));
        let last = argc == 3 && argv[2].eq_ignore_ascii_case(b"LAST");
        let Some(size) = size.filter(|_| (2..=3).contains(&argc) && (argc == 2 || last)) else {
            panic!(
                "a BDAT Postfix cannot parse (501, and the chunk runs as commands): {}",
                lossy(line)
            );
        };
        // And mailfront meant the same chunk: its own reading of the line it wrote.
        let ours = Command::parse(line);
        assert!(
            ours == Command::Bdat(Bdat { size, last }),
            "Postfix reads BDAT {size} (last: {last}) where mailfront reads {ours:?}: {}",
            lossy(line)
        );
        let skip = |code: u16, text: &str| Some((code, text.to_owned()));
        let refusal = if size == 0 && !last {
            skip(551, "5.7.1 Null BDAT request")
        } else if self.bdat == BdatState::Error {
            skip(
                551,
                &format!("5.0.0 Discarded {size} bytes after earlier error"),
            )
        } else if self.bdat == BdatState::None && self.rcpts == 0 {
            if self.in_tx {
                skip(554, "5.5.1 Error: no valid recipients")
            } else {
                skip(503, "5.5.1 Error: need RCPT command")
            }
        } else if self.act_size.saturating_add(size) > MESSAGE_LIMIT {
            skip(552, "5.3.4 Chunk exceeds message size limit")
        } else {
            None
        };
        if let Some((code, text)) = &refusal {
            // skip_bdat: beyond 1.5 times the limit nothing is read; input is shut down.
            let act = self.act_size as f64;
            if act / 1.5 > MESSAGE_LIMIT as f64 - size as f64 / 1.5 {
                self.reply(*code, text);
                self.closed = true;
                return;
            }
            self.act_size = self.act_size.saturating_add(size);
        } else {
            if self.bdat == BdatState::None {
                self.message.clear();
            }
            self.bdat = BdatState::Processing;
            self.act_size += size;
        }
        self.reading = Reading::Chunk {
            left: size,
            size,
            last,
            skip: refusal,
        };
    }
}

/// The backend side: every connection mailfront makes, one at a time, until the session ends.
async fn backend_side(
    setup: Setup,
    backends: &mut UnboundedReceiver<DuplexStream>,
    done: &CancellationToken,
) -> Record {
    let mut record = Record::default();
    loop {
        let stream = tokio::select! {
            biased;
            stream = backends.recv() => stream,
            () = done.cancelled() => None,
        };
        let Some(mut stream) = stream else {
            return record;
        };
        record.connections += 1;
        // Oracle 1: on 587 with require_tls_for_mail nothing reaches a backend before TLS.
        assert!(
            setup.kind != Kind::Strict,
            "a backend connection before TLS on a 587 listener that requires TLS for mail"
        );
        let mut fake = Postfix::new(setup, &mut record);
        fake.greeting();
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            if debug() && !fake.out.is_empty() {
                let out = String::from_utf8_lossy(&fake.out).replace("\r\n", "\n  S: ");
                eprintln!("  S: {}", out.trim_end_matches("\n  S: "));
            }
            if !fake.out.is_empty() {
                if stream.write_all(&fake.out).await.is_err() {
                    break;
                }
                fake.out.clear();
            }
            if fake.closed {
                let _ = stream.shutdown().await;
                break;
            }
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if debug() {
                        eprintln!("C: {:?}", String::from_utf8_lossy(&buf[..n]));
                    }
                    fake.input.extend_from_slice(&buf[..n]);
                    fake.process();
                }
            }
        }
    }
}

/// What one session left behind.
struct Outcome {
    to_client: Vec<u8>,
    record: Record,
}

async fn session(
    listener: &Listener,
    setup: Setup,
    client: &[u8],
    split: u8,
    backends: &mut UnboundedReceiver<DuplexStream>,
) -> Outcome {
    let (client_io, server_io) = tokio::io::duplex(PIPE);
    let (mut client_read, mut client_write) = tokio::io::split(client_io);
    let done = CancellationToken::new();
    let server = async {
        let mut session = Session::new(
            listener.context.clone(),
            CLIENT.parse().unwrap(),
            LOCAL.parse().unwrap(),
            CancellationToken::new(),
        );
        if setup.kind == Kind::Implicit {
            session.tls_established(tls_info(), Duration::ZERO, false);
        }
        if setup.learned {
            listener.context.learned.set_ehlo(learned_ehlo(setup));
        } else {
            listener.context.learned.forget();
        }
        let reason =
            mailfront::smtp::session::serve(ClientStream::Plain(server_io), &mut session).await;
        done.cancel();
        reason
    };
    let writer = async {
        let size = ((usize::from(split) + 1) * 8).max(client.len().div_ceil(MAX_WRITES));
        for piece in client.chunks(size) {
            if client_write.write_all(piece).await.is_err() {
                return;
            }
            tokio::time::sleep(WRITE_PAUSE).await;
        }
        if setup.client_closes {
            let _ = client_write.shutdown().await;
        }
    };
    let reader = async {
        let mut all = Vec::new();
        let _ = client_read.read_to_end(&mut all).await;
        all
    };
    let backend = backend_side(setup, backends, &done);
    let (_reason, (), to_client, record) = tokio::join!(server, writer, reader, backend);
    Outcome { to_client, record }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn count(haystack: &[u8], needle: &[u8]) -> usize {
    haystack
        .windows(needle.len())
        .filter(|w| *w == needle)
        .count()
}

/// Oracle 2 on one stored message.
fn check_message(message: &[u8], tls: bool, client_has_marker: bool) {
    let marks = count(message, b"(mailfront)");
    if !tls {
        assert!(
            client_has_marker || marks == 0,
            "a cleartext message with a Received field of mailfront's: {}",
            lossy(message)
        );
        return;
    }
    assert!(
        message.starts_with(b"Received: from "),
        "a message stored without mailfront's Received field at the top: {}",
        lossy(message)
    );
    // mailfront's part of the field runs to its date line; every line after the first is a
    // continuation (RFC 5322 §2.2.3). Content that starts with SP or TAB folds onto the field
    // after the date (Postfix's cleanup joins it to its own Received field the same way), so
    // the field as a whole may go on; what mailfront wrote must be there, whole, first.
    let Some(date_end) = find(message, b" +0000\r\n").map(|i| i + 8) else {
        panic!(
            "mailfront's Received field without its date: {}",
            lossy(message)
        );
    };
    let field = &message[..date_end];
    let lines: Vec<&[u8]> = field.split_inclusive(|&b| b == b'\n').collect();
    assert!(
        lines
            .iter()
            .all(|l| l.ends_with(b"\r\n") && !l[..l.len() - 2].contains(&b'\r'))
            && lines[1..].iter().all(|l| l.starts_with(b"\t"))
            && find(
                field,
                format!("\r\n\tby {HOST} (mailfront) with ").as_bytes()
            )
            .is_some(),
        "the first field is not mailfront's whole Received field: {}",
        lossy(field)
    );
    assert!(
        client_has_marker || marks == 1,
        "{marks} Received fields of mailfront's in one message: {}",
        lossy(message)
    );
}

/// The EHLO reply an earlier session of the listener saw: the fake backend's for these flags,
/// marked `[learned]` instead of a nonce (mailfront answers EHLO with it, rewritten).
fn learned_ehlo(setup: Setup) -> Vec<u8> {
    let mut lines = vec![format!("{BACKEND} [learned]")];
    if setup.offers_pipelining {
        lines.push("PIPELINING".to_owned());
    }
    lines.push(format!("SIZE {MESSAGE_LIMIT}"));
    lines.push("8BITMIME".to_owned());
    lines.push("AUTH PLAIN LOGIN".to_owned());
    if setup.offers_chunking {
        lines.push("CHUNKING".to_owned());
    }
    lines.push("ENHANCEDSTATUSCODES".to_owned());
    let n = lines.len();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let sep = if i + 1 == n { ' ' } else { '-' };
        out.extend_from_slice(format!("250{sep}{line}\r\n").as_bytes());
    }
    out
}

/// Oracle 3 on everything the client received. `local_oks`: how many NOOP/RSET words the
/// client sent, the most `250 2.0.0 Ok` mailfront may answer itself.
fn check_replies(to_client: &[u8], record: &Record, local_oks: usize) {
    let mut local_oks = local_oks;
    let mut last_nonce: Option<usize> = None;
    let mut reply: Vec<&[u8]> = Vec::new();
    for line in to_client.split_inclusive(|&b| b == b'\n') {
        reply.push(line);
        let continued = line.len() > 3 && line[3] == b'-';
        if continued {
            continue;
        }
        let lines = std::mem::take(&mut reply);
        let code = std::str::from_utf8(&line[..line.len().min(3)])
            .ok()
            .and_then(|c| c.parse::<u16>().ok());
        let Some(code) = code.filter(|c| *c == 235 || (250..=259).contains(c)) else {
            continue;
        };
        // The backend's nonce ends its reply; mailfront rewrites only an EHLO reply's first
        // line, keeping the text after the name.
        let nonce_line = if lines.len() > 1 { lines[0] } else { line };
        let text = nonce_line.strip_suffix(b"\r\n").unwrap_or(nonce_line);
        let nonce = text
            .strip_suffix(b"]")
            .and_then(|t| t.iter().rposition(|&b| b == b'[').map(|i| &t[i + 1..]))
            .and_then(|t| t.strip_prefix(b"b"))
            .and_then(|n| std::str::from_utf8(n).ok()?.parse::<usize>().ok());
        let Some(nonce) = nonce else {
            let first = lines[0].strip_suffix(b"\r\n").unwrap_or(lines[0]);
            if first.starts_with(format!("250-{HOST}").as_bytes())
                || first == format!("250 {HOST}").as_bytes()
            {
                // mailfront's own EHLO (before TLS, or from what the listener learned) or HELO
                // reply: no backend success is claimed by it.
                continue;
            }
            if lines.len() == 1 && line == b"250 2.0.0 Ok\r\n" && local_oks > 0 {
                // mailfront's own NOOP/RSET answer while no backend is connected.
                local_oks -= 1;
                continue;
            }
            panic!(
                "the client got a {code} the backend never sent: {}",
                lossy(&lines.concat())
            );
        };
        assert_eq!(
            record.sent.get(nonce),
            Some(&code),
            "the client got {code} with the nonce of another reply: {}",
            lossy(&lines.concat())
        );
        assert!(
            last_nonce.is_none_or(|l| nonce > l),
            "a backend reply reached the client twice or out of order: {}",
            lossy(&lines.concat())
        );
        last_nonce = Some(nonce);
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() > MAX_INPUT {
        return;
    }
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let Some((&split, client)) = rest.split_first() else {
        return;
    };
    let setup = Setup::from_flags(flags);
    let listener = &listeners()[listener_index(setup.kind, setup.client_info)];
    if debug() {
        eprintln!("{setup:?}");
    }
    let mut backends = listener.backends.lock().unwrap_or_else(|e| e.into_inner());
    // A connection left over from an earlier input never meets this one.
    while backends.try_recv().is_ok() {}
    let outcome = runtime().block_on(async {
        tokio::time::timeout(
            SESSION_LIMIT,
            session(listener, setup, client, split, &mut backends),
        )
        .await
        .expect("the session did not end")
    });
    if debug() {
        eprintln!(
            "--- to the client:\n{}",
            String::from_utf8_lossy(&outcome.to_client)
        );
        for message in &outcome.record.messages {
            eprintln!("--- stored message:\n{}", String::from_utf8_lossy(message));
        }
    }
    let client_has_marker = client
        .windows(9)
        .any(|w| w.eq_ignore_ascii_case(b"mailfront"));
    for message in &outcome.record.messages {
        check_message(message, setup.client_tls(), client_has_marker);
    }
    // Every NOOP or RSET word anywhere in the input, not only at a line start: a command may
    // follow a chunk mailfront discarded in the same line ("abcRSET").
    let local_oks = client
        .windows(4)
        .filter(|w| w.eq_ignore_ascii_case(b"NOOP") || w.eq_ignore_ascii_case(b"RSET"))
        .count();
    check_replies(&outcome.to_client, &outcome.record, local_oks);
});
