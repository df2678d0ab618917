//! The whole IMAP not-authenticated state (`imap::prelogin::Prelogin`) with a differential
//! oracle on what reaches the backend.
//!
//! Arbitrary client bytes arrive in arbitrary reads; a fake backend plays Dovecot. Everything
//! mailfront writes to it is re-parsed by an independent strict server-side parser (imap-codec),
//! which must find only the approved commands, one at a time:
//! - nothing at all before the client's TLS is up (STARTTLS listeners answer cleartext locally);
//! - only CAPABILITY, NOOP, LOGOUT, LOGIN, AUTHENTICATE and ID, each parsed without error;
//! - never a second ID, and the first one carries mailfront's `tls` field with the cipher;
//! - never a LOGIN/AUTHENTICATE before that ID when the backend offers ID;
//! - a synchronising literal's octets only after the backend's `+`, and a non-synchronising one
//!   only to a backend that offers LITERAL+ (or LITERAL- up to 4096 octets);
//! - during AUTHENTICATE, one SASL line per `+` the backend sent;
//! - a login goes out only after the driver granted its charge (`Next::ChargeLogin`): with the
//!   throttle refusing, no LOGIN or AUTHENTICATE reaches the backend at all;
//! - nothing is written for the backend before the machine asked to connect; and where the
//!   listener learned its backend's capabilities (from an earlier session; here the backend's
//!   own list or a stale richer one), the machine asks to connect only once the client sent a
//!   LOGIN or AUTHENTICATE (the connection is for the login), and at TLS up otherwise;
//! - on a listener that routes by user (`Settings::routed`, from the length byte), whatever was
//!   learned: the machine asks to connect only after a complete login command since its last
//!   backend (LOGIN, or AUTHENTICATE once mailfront holds its first response: the initial
//!   response, or a line after mailfront's own `+`), and `login_facts()` is then `Some` with a
//!   non-empty user (and the password for LOGIN and PLAIN); the backend gets AUTHENTICATE
//!   without an initial response and only with a mechanism that can be routed, none of which
//!   the client is ever shown among the capabilities; the router refuses or has no backend
//!   for some logins (`route_failed`), and after a failed login the machine drops the backend
//!   and may connect afresh for the next one.
#![no_main]

use imap_codec::decode::{AuthenticateDataDecodeError, CommandDecodeError, Decoder};
use imap_codec::imap_types::IntoStatic;
use imap_codec::imap_types::auth::AuthenticateData;
use imap_codec::imap_types::command::CommandBody;
use imap_codec::imap_types::core::LiteralMode;
use imap_codec::{AuthenticateDataCodec, CommandCodec};
use libfuzzer_sys::fuzz_target;
use mailfront::config::TlsMode;
use mailfront::imap::command::Limits;
use mailfront::imap::id::is_mailfront_tag;
use mailfront::imap::prelogin::{Prelogin, Settings};
use mailfront::machine::{Machine, Next, RouteFailure, TlsFacts};

const CIPHER: &str = "TLS_AES_128_GCM_SHA256";

/// TLS 1.3 with [`CIPHER`] over x25519.
fn tls13() -> TlsFacts {
    TlsFacts {
        version: rustls::ProtocolVersion::TLSv1_3,
        cipher: rustls::CipherSuite::TLS13_AES_128_GCM_SHA256,
        group: Some(rustls::NamedGroup::X25519),
    }
}

/// The fake backend: what it learned, and the oracle's checks.
struct Backend {
    caps: &'static str,
    /// Whether the greeting lists the capabilities (else mailfront asks with its own CAPABILITY).
    greeting_caps: bool,
    login_ok: bool,
    input: Vec<u8>,
    /// `input.len()` when we last sent `+` for a synchronising literal of the command in `input`.
    continued_at: Option<usize>,
    /// AUTHENTICATE in progress: its tag and how many `+` are unanswered.
    sasl: Option<(Vec<u8>, usize)>,
    ids: usize,
    /// `backend_client_info`: the x-originating-ip mailfront must send, in the ID only.
    client_ip: Option<&'static str>,
    closed: bool,
    /// The driver refuses every charge: no login may arrive.
    throttled: bool,
    /// The listener routes by user: AUTHENTICATE comes without an initial response, and only
    /// with a mechanism that can be routed.
    routed: bool,
}

impl Backend {
    /// The machine dropped this connection (a routed session after a failed login): the next
    /// one is a fresh backend, which takes its own ID.
    fn reconnect(&mut self) {
        self.input.clear();
        self.continued_at = None;
        self.sasl = None;
        self.ids = 0;
        self.closed = false;
    }

    fn has(&self, cap: &str) -> bool {
        self.caps.split(' ').any(|c| c.eq_ignore_ascii_case(cap))
    }

    fn greeting(&self) -> Vec<u8> {
        if self.greeting_caps {
            format!("* OK [CAPABILITY {}] fake ready\r\n", self.caps).into_bytes()
        } else {
            b"* OK fake ready\r\n".to_vec()
        }
    }

    /// Takes what mailfront wrote; returns the backend's answers.
    fn receive(&mut self, bytes: &[u8], client_tls: bool) -> Vec<u8> {
        if bytes.is_empty() {
            return Vec::new();
        }
        assert!(
            client_tls,
            "bytes reached the backend before TLS: {bytes:?}"
        );
        assert!(!self.closed, "bytes after LOGOUT: {bytes:?}");
        self.input.extend_from_slice(bytes);
        let mut out = Vec::new();
        loop {
            if let Some((tag, credit)) = self.sasl.clone() {
                let line_end = self.input.iter().position(|&b| b == b'\n');
                let Some(end) = line_end else { break };
                assert!(credit > 0, "a SASL line the backend did not ask for");
                let line: Vec<u8> = self.input.drain(..=end).collect();
                let reply = match AuthenticateDataCodec::default().decode(&line) {
                    Ok((rest, AuthenticateData::Cancel)) => {
                        assert!(rest.is_empty());
                        format!("{} BAD cancelled\r\n", text(&tag))
                    }
                    Ok((rest, AuthenticateData::Continue(_))) => {
                        assert!(rest.is_empty());
                        if credit > 1 {
                            // The LOGIN mechanism's second challenge.
                            self.sasl = Some((tag, credit - 1));
                            out.extend_from_slice(b"+ UGFzc3dvcmQ6\r\n");
                            continue;
                        }
                        self.verdict(&tag)
                    }
                    Err(AuthenticateDataDecodeError::Incomplete) => {
                        panic!("a whole SASL line is incomplete: {line:?}")
                    }
                    Err(AuthenticateDataDecodeError::Failed) => {
                        panic!("a SASL line imap-codec refuses: {line:?}")
                    }
                };
                self.sasl = None;
                out.extend_from_slice(reply.as_bytes());
                continue;
            }
            match CommandCodec::default().decode(&self.input) {
                Ok((rest, command)) => {
                    let used = self.input.len() - rest.len();
                    let command = command.into_static();
                    let tag = command.tag.as_ref().as_bytes().to_vec();
                    let body = command.body;
                    self.input.drain(..used);
                    self.continued_at = None;
                    out.extend_from_slice(&self.answer(tag, body));
                }
                Err(CommandDecodeError::Incomplete) => break,
                Err(CommandDecodeError::LiteralFound { length, mode, .. }) => {
                    match mode {
                        LiteralMode::Sync => {
                            if self.continued_at != Some(self.input.len()) {
                                self.continued_at = Some(self.input.len());
                                out.extend_from_slice(b"+ go ahead\r\n");
                            }
                        }
                        LiteralMode::NonSync => assert!(
                            self.has("LITERAL+") || (self.has("LITERAL-") && length <= 4096),
                            "a non-synchronising literal to a backend without LITERAL+"
                        ),
                    }
                    break;
                }
                Err(CommandDecodeError::Failed) => {
                    panic!(
                        "the backend cannot parse what mailfront sent: {:?}",
                        self.input
                    )
                }
            }
        }
        out
    }

    fn verdict(&self, tag: &[u8]) -> String {
        if self.login_ok {
            format!("{} OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n", text(tag))
        } else {
            format!("{} NO [AUTHENTICATIONFAILED] failed\r\n", text(tag))
        }
    }

    fn answer(&mut self, tag: Vec<u8>, body: CommandBody<'_>) -> Vec<u8> {
        let t = text(&tag);
        let ours = is_mailfront_tag(&tag);
        let reply = match body {
            CommandBody::Capability => format!("* CAPABILITY {}\r\n{t} OK done\r\n", self.caps),
            CommandBody::Id { parameters } => {
                self.ids += 1;
                assert_eq!(self.ids, 1, "a second ID reached the backend");
                assert!(self.has("ID"), "ID to a backend without ID");
                let tls = parameters
                    .iter()
                    .flatten()
                    .filter(|(field, _)| field.as_ref().eq_ignore_ascii_case(b"tls"))
                    .map(|(_, value)| value.0.as_ref().map(|v| v.as_ref().to_vec()))
                    .collect::<Vec<_>>();
                assert_eq!(
                    tls,
                    vec![Some(CIPHER.as_bytes().to_vec())],
                    "one tls field, ours"
                );
                let origin = parameters
                    .iter()
                    .flatten()
                    .filter(|(field, _)| field.as_ref().eq_ignore_ascii_case(b"x-originating-ip"))
                    .map(|(_, value)| value.0.as_ref().map(|v| v.as_ref().to_vec()))
                    .collect::<Vec<_>>();
                let expected: Vec<_> = self
                    .client_ip
                    .map(|ip| Some(ip.as_bytes().to_vec()))
                    .into_iter()
                    .collect();
                assert_eq!(
                    origin, expected,
                    "x-originating-ip only ours, only with client info"
                );
                format!("* ID NIL\r\n{t} OK done\r\n")
            }
            CommandBody::Logout if ours => {
                // A routed session leaving this backend after a failed login.
                assert!(self.routed, "mailfront's own LOGOUT off a routed listener");
                assert!(
                    self.sasl.is_none(),
                    "mailfront's LOGOUT inside AUTHENTICATE"
                );
                self.closed = true;
                format!("* BYE bye\r\n{t} OK done\r\n")
            }
            _ if ours => panic!("mailfront's own tag on a client command"),
            CommandBody::Noop => format!("{t} OK done\r\n"),
            CommandBody::Logout => {
                self.closed = true;
                format!("* BYE bye\r\n{t} OK done\r\n")
            }
            CommandBody::Login { .. } => {
                self.id_first();
                self.verdict(&tag)
            }
            CommandBody::Authenticate {
                mechanism,
                initial_response,
            } => {
                self.id_first();
                let login = mechanism.as_ref().eq_ignore_ascii_case("LOGIN");
                if self.routed {
                    assert!(
                        initial_response.is_none(),
                        "a routed AUTHENTICATE with its initial response"
                    );
                    assert!(
                        mailfront::sasl::is_routable(mechanism.as_ref().as_bytes()),
                        "a mechanism that cannot be routed reached the backend"
                    );
                }
                if initial_response.is_some() {
                    assert!(self.has("SASL-IR"), "an initial response without SASL-IR");
                    self.verdict(&tag)
                } else if login {
                    self.sasl = Some((tag.clone(), 2));
                    "+ VXNlcm5hbWU6\r\n".to_owned()
                } else {
                    self.sasl = Some((tag.clone(), 1));
                    "+ \r\n".to_owned()
                }
            }
            other => panic!("a command the gate never forwards: {}", other.name()),
        };
        reply.into_bytes()
    }

    fn id_first(&self) {
        assert!(
            !self.throttled,
            "a login reached the backend without a granted charge"
        );
        if self.has("ID") {
            assert_eq!(self.ids, 1, "a credential before the ID with tls");
        }
    }
}

fn text(tag: &[u8]) -> String {
    String::from_utf8_lossy(tag).into_owned()
}

/// The driver's side of the connection: whether it connected, whether sessions start local
/// (capabilities learned), and the client bytes fed so far.
struct Link {
    connected: bool,
    learned: bool,
    fed: Vec<u8>,
    /// The listener routes by user.
    routed: bool,
    /// Routed: connections asked for so far, those the router failed included.
    connects: u32,
    /// Routed: whether the router fails some logins.
    route_failures: bool,
}

impl Link {
    /// Whether the client sent something that may be a login command.
    fn login_fed(&self) -> bool {
        let fed = self.fed.to_ascii_uppercase();
        [b"LOGIN".as_slice(), b"AUTHENTICATE"]
            .iter()
            .any(|word| fed.windows(word.len()).any(|w| w == *word))
    }

    /// Routed: the oracle for a connection. Each connection is for a login command of its own
    /// (the client may have pipelined it before the previous one), and an AUTHENTICATE is
    /// complete: its first response was held (the LOGIN mechanism also its password), so the
    /// facts name a user the client sent.
    fn check_routed_connect(&self, m: &Prelogin) {
        let facts = m
            .login_facts()
            .expect("a routed connection without login facts");
        assert!(!facts.user.is_empty(), "a routed login with an empty user");
        let fed = self.fed.to_ascii_uppercase();
        let count = |word: &[u8]| fed.windows(word.len()).filter(|w| *w == word).count();
        let has = |word: &[u8]| count(word) > 0;
        let logins = count(b"LOGIN") + count(b"AUTHENTICATE");
        assert!(
            usize::try_from(self.connects).unwrap_or(usize::MAX) <= logins,
            "{} routed connections for {logins} login commands: {:?}",
            self.connects,
            self.fed
        );
        let mechanism = facts.mechanism.as_bytes();
        assert!(
            mailfront::sasl::is_routable(mechanism),
            "facts for a mechanism that cannot be routed: {mechanism:?}"
        );
        if facts.mechanism == "LOGIN" || facts.mechanism == "PLAIN" {
            assert!(
                facts.password.is_some(),
                "LOGIN or PLAIN without its password"
            );
        }
        if facts.mechanism != "LOGIN" {
            assert!(has(b"AUTHENTICATE"), "SASL facts without AUTHENTICATE");
            assert!(has(mechanism), "facts for a mechanism never named");
        }
        // The user comes from what the client sent since: a base64 response that names it (the
        // first one held), or, for the LOGIN command, the name itself (unless escaped).
        let named = self
            .fed
            .split(|&b| matches!(b, b' ' | b'\r' | b'\n'))
            .any(|token| {
                mailfront::sasl::user_in_first_response(mechanism, token).as_deref()
                    == Some(facts.user.as_slice())
            });
        let literally = facts.mechanism == "LOGIN"
            && (self.fed.contains(&b'\\')
                || self
                    .fed
                    .windows(facts.user.len())
                    .any(|w| w == facts.user.as_slice()));
        assert!(
            named || literally,
            "a routed user the client never sent: {facts:?}"
        );
    }

    /// Routed: what the router says for this connection.
    fn route_failure(&self) -> Option<RouteFailure> {
        if !self.route_failures {
            return None;
        }
        match self.connects % 3 {
            1 => Some(RouteFailure::Unavailable),
            2 => Some(RouteFailure::Refused {
                text: "Invalid\r\nlogin".to_owned(),
                smtp_code: None,
                go_on: self.connects < 8,
            }),
            _ => None,
        }
    }
}

/// Routed: a client must never be shown a mechanism that cannot be routed.
fn check_shown(written: &[u8]) {
    for line in written.split(|&b| b == b'\n') {
        if !line.starts_with(b"* ") {
            continue;
        }
        let upper = line.to_ascii_uppercase();
        for token in upper.split(|&b| b == b' ' || b == b']' || b == b'\r') {
            if let Some(mechanism) = token.strip_prefix(b"AUTH=") {
                assert!(
                    mailfront::sasl::is_routable(mechanism),
                    "a routed client was shown {:?}",
                    String::from_utf8_lossy(token)
                );
            }
        }
    }
}

/// Moves bytes between the machine and the backend until nothing more happens. Returns false
/// once the session left the not-authenticated state.
fn settle(m: &mut Prelogin, backend: &mut Backend, client_tls: &mut bool, link: &mut Link) -> bool {
    for _ in 0..64 {
        let written = m.take_to_client();
        if link.routed {
            check_shown(&written);
        }
        let sent = m.take_to_backend();
        assert!(
            link.connected || sent.is_empty(),
            "bytes for a backend never connected: {sent:?}"
        );
        let mut answers = backend.receive(&sent, *client_tls);
        if m.take_backend_close() {
            assert!(
                link.routed,
                "a backend dropped before login off a routed listener"
            );
            // The driver drops the connection: nothing more comes from that backend.
            answers.clear();
            backend.reconnect();
            link.connected = false;
        }
        match m.next() {
            Next::End(_) | Next::Authenticated => return false,
            Next::StartTls => {
                assert!(answers.is_empty());
                *client_tls = true;
                // Nothing the client sent before the handshake counts after it.
                link.fed.clear();
                m.tls_started(tls13());
                continue;
            }
            Next::Connect => {
                assert!(*client_tls, "a backend connection before TLS");
                assert!(!link.connected, "a second connection");
                assert!(
                    !(link.learned || link.routed) || link.login_fed(),
                    "a connection with capabilities learned and no login: {:?}",
                    link.fed
                );
                if link.routed {
                    link.connects += 1;
                    link.check_routed_connect(m);
                    if let Some(failure) = link.route_failure() {
                        m.route_failed(failure);
                        continue;
                    }
                } else {
                    assert_eq!(m.login_facts(), None, "login facts off a routed listener");
                }
                link.connected = true;
                m.backend_connected();
                m.backend_input(&backend.greeting());
                continue;
            }
            Next::ChargeLogin => {
                m.login_charge(!backend.throttled);
                if answers.is_empty() {
                    continue;
                }
            }
            Next::Run => {}
        }
        if answers.is_empty() {
            return true;
        }
        m.backend_input(&answers);
        if backend.closed {
            m.backend_closed();
        }
    }
    true
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let Some((&chunk, client)) = rest.split_first() else {
        return;
    };
    let listener = if flags & 1 == 0 {
        TlsMode::Implicit
    } else {
        TlsMode::Starttls
    };
    let caps = match (flags >> 1) & 3 {
        0 => "IMAP4rev1 ID SASL-IR LITERAL+ AUTH=PLAIN",
        1 => "IMAP4rev1 AUTH=PLAIN AUTH=CRAM-MD5 AUTH=LOGIN",
        2 => "IMAP4rev1 ID LITERAL- AUTH=PLAIN",
        _ => "IMAP4rev1 ID SASL-IR",
    };
    let mut backend = Backend {
        caps,
        greeting_caps: flags & 8 == 0,
        login_ok: flags & 16 != 0,
        input: Vec::new(),
        continued_at: None,
        sasl: None,
        ids: 0,
        client_ip: (flags & 32 != 0).then_some("192.0.2.7"),
        closed: false,
        throttled: flags & 64 != 0,
        routed: chunk & 64 != 0,
    };
    let settings = Settings {
        listener,
        hostname: "mx.example.test".to_owned(),
        limits: Limits {
            line: 256,
            literal: 64,
            command: 512,
            sasl_line: 256,
        },
        max_commands: 40,
        client_info: if flags & 32 != 0 {
            mailfront::client_info::imap_id_fields(
                "192.0.2.7:40000".parse().expect("address"),
                "198.51.100.1:993".parse().expect("address"),
                "S1",
            )
        } else {
            Vec::new()
        },
        // What an earlier session of the listener learned: nothing, the backend's list, or a
        // stale one richer than the backend's (the gate judges the login again once connected).
        learned_capability: match (flags & 128 != 0, chunk & 128 != 0) {
            (false, _) => None,
            (true, false) => Some(caps.as_bytes().to_vec()),
            (true, true) => Some(b"IMAP4rev1 ID SASL-IR LITERAL+ AUTH=PLAIN".to_vec()),
        },
        routed: chunk & 64 != 0,
    };
    let mut link = Link {
        connected: false,
        learned: settings.learned_capability.is_some(),
        fed: Vec::new(),
        routed: settings.routed,
        connects: 0,
        route_failures: chunk & 32 != 0,
    };
    let mut client_tls = listener == TlsMode::Implicit;
    let tls = client_tls.then(tls13);
    let mut m = Prelogin::new(settings, tls, u64::from(flags));
    if !settle(&mut m, &mut backend, &mut client_tls, &mut link) {
        return;
    }
    for piece in client.chunks(usize::from(chunk % 32) + 1) {
        if m.wants_client_input(1 << 16) {
            link.fed.extend_from_slice(piece);
            m.client_input(piece);
        }
        if !settle(&mut m, &mut backend, &mut client_tls, &mut link) {
            return;
        }
    }
});
