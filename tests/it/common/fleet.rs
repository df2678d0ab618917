//! Backends that can be killed and brought back on the same port, for the pool and routing
//! tests: small IMAP, SMTP and POP3 servers that say which one they are in every reply,
//! optionally behind TLS (implicit or after STARTTLS), counting the connections and sessions
//! they took and recording the logins they received (LOGIN, USER/PASS, SASL PLAIN and LOGIN with
//! and without an initial response).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use base64::prelude::{BASE64_STANDARD, Engine as _};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use super::TIMEOUT;
use super::fake_backend::PROXY_HOSTNAME;
use super::pki::IssuedCert;

/// What a fleet backend speaks (POP3: [`FleetBackend::start_pop3`]; the pool tests match on
/// these two).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Speaks {
    Imap,
    Smtp,
}

/// What a fleet backend speaks, POP3 included.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tongue {
    Imap,
    Smtp,
    Pop3,
}

impl From<Speaks> for Tongue {
    fn from(speaks: Speaks) -> Tongue {
        match speaks {
            Speaks::Imap => Tongue::Imap,
            Speaks::Smtp => Tongue::Smtp,
        }
    }
}

/// The IMAP backend's capabilities, before and after login alike. `AUTH=CRAM-MD5` is there to be
/// hidden by a listener that routes by user (its user name comes only after the challenge).
pub const FLEET_IMAP_CAPABILITIES: &str =
    "IMAP4rev1 SASL-IR LITERAL+ ID ENABLE IDLE AUTH=PLAIN AUTH=LOGIN AUTH=CRAM-MD5";
/// The SMTP backend's EHLO keywords after its first line (its name), in order.
pub const FLEET_SMTP_EHLO: [&str; 4] = [
    "PIPELINING",
    "8BITMIME",
    "ENHANCEDSTATUSCODES",
    "AUTH PLAIN LOGIN CRAM-MD5",
];
/// The POP3 backend's CAPA lines between `+OK` and `.`, in order.
pub const FLEET_POP3_CAPA: [&str; 5] = [
    "USER",
    "SASL PLAIN LOGIN CRAM-MD5",
    "TOP",
    "UIDL",
    "RESP-CODES",
];
/// The password every fleet backend refuses (any other is accepted).
pub const FLEET_WRONG_PASSWORD: &str = "wrong";

/// One login a fleet backend received, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FleetLogin {
    /// `LOGIN` (the IMAP command), `USER` (POP3 USER/PASS), or the SASL mechanism as sent
    /// (`PLAIN`, `LOGIN`).
    pub mechanism: String,
    /// SASL: whether the command carried an initial response.
    pub initial_response: bool,
    /// SASL PLAIN's authorization identity; empty otherwise.
    pub authzid: String,
    pub user: String,
    pub password: String,
}

/// What a fleet backend saw, over every life of it.
#[derive(Clone, Default)]
struct Seen {
    /// TCP connections accepted.
    accepted: Arc<AtomicUsize>,
    /// Sessions that got past the greeting (and TLS), mailfront's capability probes included.
    sessions: Arc<AtomicUsize>,
    /// Of those, the ones that were mailfront's capability probe ([`is_probe`]).
    probes: Arc<AtomicUsize>,
    logins: Arc<Mutex<Vec<FleetLogin>>>,
    /// One more capability to advertise ([`FleetBackend::advertise`]).
    extra: Arc<Mutex<Option<String>>>,
}

impl Seen {
    fn extra(&self) -> Option<String> {
        self.extra.lock().unwrap().clone()
    }

    /// The IMAP capability list, the extra capability last.
    fn imap_capabilities(&self) -> String {
        match self.extra() {
            Some(extra) => format!("{FLEET_IMAP_CAPABILITIES} {extra}"),
            None => FLEET_IMAP_CAPABILITIES.to_owned(),
        }
    }

    /// The SMTP EHLO keywords or POP3 CAPA lines, the extra one first.
    fn keywords(&self, list: &[&str]) -> Vec<String> {
        self.extra()
            .into_iter()
            .chain(list.iter().map(|k| (*k).to_owned()))
            .collect()
    }
}

/// How a fleet backend protects its port.
#[derive(Clone)]
pub enum FleetTls {
    None,
    /// TLS from the first byte.
    Implicit(Arc<rustls::ServerConfig>),
    /// IMAP STARTTLS / SMTP STARTTLS / POP3 STLS before anything else works.
    Starttls(Arc<rustls::ServerConfig>),
}

/// A rustls server config from an issued certificate.
pub fn server_tls(cert: &IssuedCert) -> Arc<rustls::ServerConfig> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert.cert)
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = PrivateKeyDer::from_pem_file(&cert.key).unwrap();
    Arc::new(
        rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap(),
    )
}

/// One backend of a fleet.
pub struct FleetBackend {
    pub name: String,
    pub addr: SocketAddr,
    speaks: Tongue,
    tls: FleetTls,
    /// Sessions that got past the greeting (and TLS), over every life of this backend,
    /// mailfront's capability probes included ([`FleetBackend::probes`]).
    pub sessions: Arc<AtomicUsize>,
    seen: Seen,
    tasks: Option<JoinSet<()>>,
}

impl FleetBackend {
    pub async fn start(name: &str, speaks: Speaks, tls: FleetTls) -> FleetBackend {
        Self::start_on("127.0.0.1", name, speaks, tls).await
    }

    /// As [`FleetBackend::start`], on another loopback address (`127.0.0.2`: outside a
    /// listener's own backends' addresses).
    pub async fn start_on(ip: &str, name: &str, speaks: Speaks, tls: FleetTls) -> FleetBackend {
        Self::launch(ip, name, speaks.into(), tls).await
    }

    /// A POP3 backend: `+OK NAME ready` with an APOP timestamp, CAPA, USER/PASS and AUTH.
    pub async fn start_pop3(name: &str, tls: FleetTls) -> FleetBackend {
        Self::launch("127.0.0.1", name, Tongue::Pop3, tls).await
    }

    async fn launch(ip: &str, name: &str, speaks: Tongue, tls: FleetTls) -> FleetBackend {
        let listener = TcpListener::bind((ip, 0)).await.unwrap();
        let seen = Seen::default();
        let mut backend = FleetBackend {
            name: name.to_owned(),
            addr: listener.local_addr().unwrap(),
            speaks,
            tls,
            sessions: seen.sessions.clone(),
            seen,
            tasks: None,
        };
        backend.serve(listener);
        backend
    }

    pub fn sessions(&self) -> usize {
        self.sessions.load(Ordering::SeqCst)
    }

    /// How many of [`FleetBackend::sessions`] were mailfront's capability probe (one per
    /// listener while what its sessions show before login is unknown): after the greeting (and
    /// TLS, STARTTLS included) exactly the probe's request and goodbye, counted before the
    /// goodbye is answered, so before the probe is over and any session goes on. (As with the
    /// fake backends' `Recorder`, a session of the machines' fallback after a failed probe that
    /// sends just those lines would count here too; no test counts one.)
    pub fn probes(&self) -> usize {
        self.seen.probes.load(Ordering::SeqCst)
    }

    /// [`FleetBackend::sessions`] less the probes: the clients' sessions.
    pub fn client_sessions(&self) -> usize {
        self.sessions() - self.probes()
    }

    /// TCP connections accepted, over every life of this backend (a connection that never
    /// finished its TLS handshake included).
    pub fn accepted(&self) -> usize {
        self.seen.accepted.load(Ordering::SeqCst)
    }

    /// The logins received, in order.
    pub fn logins(&self) -> Vec<FleetLogin> {
        self.seen.logins.lock().unwrap().clone()
    }

    /// Advertises one more capability from now on: an IMAP capability (last), an SMTP EHLO
    /// keyword or a POP3 CAPA line (first), so a backend can be told apart by what it offers.
    pub fn advertise(&self, capability: &str) {
        *self.seen.extra.lock().unwrap() = Some(capability.to_owned());
    }

    /// Closes the port and every open connection at once, as a crashed server would.
    pub fn kill(&mut self) {
        if let Some(mut tasks) = self.tasks.take() {
            tasks.abort_all();
        }
    }

    /// Listens again on the same port.
    pub async fn revive(&mut self) {
        let listener = TcpListener::bind(self.addr).await.unwrap();
        self.serve(listener);
    }

    fn serve(&mut self, listener: TcpListener) {
        let mut tasks = JoinSet::new();
        let name = self.name.clone();
        let speaks = self.speaks;
        let tls = self.tls.clone();
        let seen = self.seen.clone();
        // Connections live in a set owned by the accept task, so aborting it drops them all.
        tasks.spawn(async move {
            let mut connections = JoinSet::new();
            while let Ok((tcp, _)) = listener.accept().await {
                seen.accepted.fetch_add(1, Ordering::SeqCst);
                let _ = tcp.set_nodelay(true);
                let name = name.clone();
                let tls = tls.clone();
                let seen = seen.clone();
                connections.spawn(async move {
                    let _ = tokio::time::timeout(
                        TIMEOUT * 6,
                        serve_one(tcp, &name, speaks, tls, &seen),
                    )
                    .await;
                });
            }
        });
        self.tasks = Some(tasks);
    }
}

impl Drop for FleetBackend {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn serve_one(
    tcp: TcpStream,
    name: &str,
    speaks: Tongue,
    tls: FleetTls,
    seen: &Seen,
) -> std::io::Result<()> {
    match tls {
        FleetTls::None => {
            seen.sessions.fetch_add(1, Ordering::SeqCst);
            converse(BufReader::new(tcp), name, speaks, true, seen).await
        }
        FleetTls::Implicit(config) => {
            let stream = TlsAcceptor::from(config).accept(tcp).await?;
            seen.sessions.fetch_add(1, Ordering::SeqCst);
            converse(BufReader::new(stream), name, speaks, true, seen).await
        }
        FleetTls::Starttls(config) => {
            let mut plain = BufReader::new(tcp);
            greet(plain.get_mut(), name, speaks, seen).await?;
            loop {
                let line = read(&mut plain).await?;
                let upper = line.to_ascii_uppercase();
                match speaks {
                    Tongue::Smtp if upper.starts_with("EHLO") => {
                        plain
                            .get_mut()
                            .write_all(format!("250-{name}\r\n250 STARTTLS\r\n").as_bytes())
                            .await?;
                    }
                    Tongue::Smtp if upper.starts_with("STARTTLS") => {
                        plain.get_mut().write_all(b"220 2.0.0 go ahead\r\n").await?;
                        break;
                    }
                    Tongue::Imap if upper.contains(" STARTTLS") => {
                        let tag = line.split(' ').next().unwrap_or("*").to_owned();
                        plain
                            .get_mut()
                            .write_all(format!("{tag} OK begin TLS\r\n").as_bytes())
                            .await?;
                        break;
                    }
                    Tongue::Pop3 if upper.starts_with("STLS") => {
                        plain.get_mut().write_all(b"+OK begin TLS\r\n").await?;
                        break;
                    }
                    Tongue::Pop3 => {
                        plain.get_mut().write_all(b"-ERR STLS first\r\n").await?;
                    }
                    _ => {
                        plain.get_mut().write_all(b"530 STARTTLS first\r\n").await?;
                    }
                }
            }
            assert!(plain.buffer().is_empty(), "bytes pipelined after STARTTLS");
            let stream = TlsAcceptor::from(config).accept(plain.into_inner()).await?;
            seen.sessions.fetch_add(1, Ordering::SeqCst);
            converse(BufReader::new(stream), name, speaks, false, seen).await
        }
    }
}

async fn greet<W: AsyncWrite + Unpin>(
    w: &mut W,
    name: &str,
    speaks: Tongue,
    seen: &Seen,
) -> std::io::Result<()> {
    let greeting = match speaks {
        Tongue::Imap => format!(
            "* OK [CAPABILITY {}] {name} ready\r\n",
            seen.imap_capabilities()
        ),
        Tongue::Smtp => format!("220 {name} ESMTP\r\n"),
        // With an APOP timestamp (RFC 1939 §7), which a client of a routed listener never sees.
        Tongue::Pop3 => format!("+OK {name} ready <1896.697170952@{name}>\r\n"),
    };
    w.write_all(greeting.as_bytes()).await
}

async fn read<R: AsyncRead + Unpin>(r: &mut BufReader<R>) -> std::io::Result<String> {
    let mut line = String::new();
    if r.read_line(&mut line).await? == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(line.trim_end_matches(['\r', '\n']).to_owned())
}

/// One IMAP command: a line, and the literals it announces (`{n}` answered with a
/// continuation, `{n+}` not), joined with their data as one string.
async fn read_imap_command<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut BufReader<S>,
) -> std::io::Result<String> {
    let mut command = read(s).await?;
    loop {
        let Some(open) = command.rfind('{') else {
            return Ok(command);
        };
        let Some(spec) = command[open + 1..].strip_suffix('}') else {
            return Ok(command);
        };
        let (digits, sync) = match spec.strip_suffix('+') {
            Some(d) => (d, false),
            None => (spec, true),
        };
        let Ok(n) = digits.parse::<usize>() else {
            return Ok(command);
        };
        if sync {
            s.get_mut().write_all(b"+ go ahead\r\n").await?;
        }
        let mut data = vec![0u8; n];
        s.read_exact(&mut data).await?;
        command.truncate(open);
        command.push_str(&quote(&String::from_utf8_lossy(&data)));
        command.push_str(&read(s).await?);
    }
}

fn quote(text: &str) -> String {
    format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""))
}

/// IMAP astrings (atoms and quoted strings, RFC 9051 §9), as many as there are.
fn astrings(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.peek() == Some(&' ') {
            chars.next();
        }
        let Some(&first) = chars.peek() else {
            return out;
        };
        let mut word = String::new();
        if first == '"' {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => word.extend(chars.next()),
                    '"' => break,
                    c => word.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == ' ' {
                    break;
                }
                word.push(c);
                chars.next();
            }
        }
        out.push(word);
    }
}

fn unbase64(text: &str) -> String {
    if text == "=" {
        return String::new();
    }
    String::from_utf8_lossy(&BASE64_STANDARD.decode(text.trim()).unwrap_or_default()).into_owned()
}

/// A SASL exchange after `AUTH[ENTICATE] MECHANISM [initial response]`, answered with
/// `continuation` (`+ ` or `334 `) challenges: the login it carried, or `None` when the client
/// cancelled (`*`, RFC 4422 §3.5) or the mechanism is not PLAIN or LOGIN.
async fn sasl<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut BufReader<S>,
    args: &str,
    continuation: &str,
) -> std::io::Result<Option<FleetLogin>> {
    let mut words = args.split(' ').filter(|w| !w.is_empty());
    let mechanism = words.next().unwrap_or("").to_owned();
    let initial = words.next().map(str::to_owned);
    let initial_response = initial.is_some();
    let login = match mechanism.to_ascii_uppercase().as_str() {
        "PLAIN" => {
            let response = match initial {
                Some(r) => r,
                None => match challenge(s, continuation, "").await? {
                    Some(r) => r,
                    None => return Ok(None),
                },
            };
            let decoded = unbase64(&response);
            let mut parts = decoded.split('\0');
            FleetLogin {
                mechanism,
                initial_response,
                authzid: parts.next().unwrap_or("").to_owned(),
                user: parts.next().unwrap_or("").to_owned(),
                password: parts.next().unwrap_or("").to_owned(),
            }
        }
        "LOGIN" => {
            // RFC 4954 §4: an initial response to LOGIN is the user name.
            let user = match initial {
                Some(r) => r,
                None => match challenge(s, continuation, "VXNlcm5hbWU6").await? {
                    Some(r) => r,
                    None => return Ok(None),
                },
            };
            let Some(password) = challenge(s, continuation, "UGFzc3dvcmQ6").await? else {
                return Ok(None);
            };
            FleetLogin {
                mechanism,
                initial_response,
                authzid: String::new(),
                user: unbase64(&user),
                password: unbase64(&password),
            }
        }
        _ => return Ok(None),
    };
    Ok(Some(login))
}

/// Writes one SASL challenge and reads the client's response; `None` when it cancelled.
async fn challenge<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut BufReader<S>,
    continuation: &str,
    text: &str,
) -> std::io::Result<Option<String>> {
    s.get_mut()
        .write_all(format!("{continuation}{text}\r\n").as_bytes())
        .await?;
    let line = read(s).await?;
    Ok((line != "*").then_some(line))
}

/// Records `login`; whether its password is accepted.
fn accept(seen: &Seen, login: FleetLogin) -> bool {
    let ok = login.password != FLEET_WRONG_PASSWORD;
    seen.logins.lock().unwrap().push(login);
    ok
}

/// Whether `commands` (the lines after the greeting and any TLS) are exactly what mailfront's
/// capability probe sends: `CAPABILITY` and `LOGOUT` under its tags (IMAP), `CAPA` and `QUIT`
/// (POP3), `EHLO` with mailfront's name and `QUIT` (SMTP).
fn is_probe(speaks: Tongue, commands: &[String]) -> bool {
    let ehlo = format!("EHLO {PROXY_HOSTNAME}");
    let probe: [&str; 2] = match speaks {
        Tongue::Imap => ["P1 CAPABILITY", "P2 LOGOUT"],
        Tongue::Pop3 => ["CAPA", "QUIT"],
        Tongue::Smtp => [&ehlo, "QUIT"],
    };
    commands == probe
}

/// The session proper: every reply names the backend, so a client can tell which one it got.
async fn converse<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: BufReader<S>,
    name: &str,
    speaks: Tongue,
    greeting: bool,
    seen: &Seen,
) -> std::io::Result<()> {
    if greeting {
        greet(s.get_mut(), name, speaks, seen).await?;
    }
    let mut pop3_user: Option<String> = None;
    // Every command of this session, to tell mailfront's capability probe at its goodbye.
    let mut commands: Vec<String> = Vec::new();
    loop {
        let line = match speaks {
            Tongue::Imap => read_imap_command(&mut s).await?,
            Tongue::Smtp | Tongue::Pop3 => read(&mut s).await?,
        };
        commands.push(line.clone());
        if is_probe(speaks, &commands) {
            seen.probes.fetch_add(1, Ordering::SeqCst);
        }
        let (tag, rest) = line.split_once(' ').unwrap_or((line.as_str(), ""));
        let reply = match speaks {
            Tongue::Imap => {
                let (command, args) = rest.split_once(' ').unwrap_or((rest, ""));
                match command.to_ascii_uppercase().as_str() {
                    "CAPABILITY" => {
                        let list = seen.imap_capabilities();
                        format!("* CAPABILITY {list}\r\n{tag} OK done\r\n")
                    }
                    "ID" => format!("* ID NIL\r\n{tag} OK done\r\n"),
                    "LOGIN" => {
                        let mut words = astrings(args).into_iter();
                        let login = FleetLogin {
                            mechanism: "LOGIN".into(),
                            initial_response: false,
                            authzid: String::new(),
                            user: words.next().unwrap_or_default(),
                            password: words.next().unwrap_or_default(),
                        };
                        imap_verdict(tag, name, accept(seen, login))
                    }
                    "AUTHENTICATE" => match sasl(&mut s, args, "+ ").await? {
                        Some(login) => imap_verdict(tag, name, accept(seen, login)),
                        None => format!("{tag} BAD {name}: authentication cancelled\r\n"),
                    },
                    "LOGOUT" => {
                        let bye = format!("* BYE {name}\r\n{tag} OK bye\r\n");
                        s.get_mut().write_all(bye.as_bytes()).await?;
                        return Ok(());
                    }
                    _ => format!("* OK served by {name}\r\n{tag} OK done\r\n"),
                }
            }
            Tongue::Smtp => match tag.to_ascii_uppercase().as_str() {
                "EHLO" => {
                    let mut reply = format!("250-{name}\r\n");
                    let keywords = seen.keywords(&FLEET_SMTP_EHLO);
                    for (i, keyword) in keywords.iter().enumerate() {
                        let last = i + 1 == keywords.len();
                        reply
                            .push_str(&format!("250{}{keyword}\r\n", if last { ' ' } else { '-' }));
                    }
                    reply
                }
                "AUTH" => match sasl(&mut s, rest, "334 ").await? {
                    Some(login) if accept(seen, login.clone()) => {
                        format!("235 2.7.0 {name} ok\r\n")
                    }
                    Some(_) => format!("535 5.7.8 {name} says no\r\n"),
                    None => "501 5.7.0 authentication cancelled\r\n".to_owned(),
                },
                "QUIT" => {
                    s.get_mut().write_all(b"221 2.0.0 bye\r\n").await?;
                    return Ok(());
                }
                _ => format!("250 2.0.0 {name}\r\n"),
            },
            Tongue::Pop3 => match tag.to_ascii_uppercase().as_str() {
                "CAPA" => {
                    let mut reply = String::from("+OK capabilities follow\r\n");
                    for capability in seen.keywords(&FLEET_POP3_CAPA) {
                        reply.push_str(&capability);
                        reply.push_str("\r\n");
                    }
                    reply.push_str(".\r\n");
                    reply
                }
                "USER" => {
                    pop3_user = Some(rest.to_owned());
                    format!("+OK {name} wants the password\r\n")
                }
                "PASS" => match pop3_user.take() {
                    Some(user) => {
                        let login = FleetLogin {
                            mechanism: "USER".into(),
                            initial_response: false,
                            authzid: String::new(),
                            user,
                            password: rest.to_owned(),
                        };
                        pop3_verdict(name, accept(seen, login))
                    }
                    None => "-ERR USER first\r\n".to_owned(),
                },
                "AUTH" => match sasl(&mut s, rest, "+ ").await? {
                    Some(login) => pop3_verdict(name, accept(seen, login)),
                    None => "-ERR authentication cancelled\r\n".to_owned(),
                },
                "QUIT" => {
                    s.get_mut()
                        .write_all(format!("+OK {name} bye\r\n").as_bytes())
                        .await?;
                    return Ok(());
                }
                _ => format!("+OK served by {name}\r\n"),
            },
        };
        s.get_mut().write_all(reply.as_bytes()).await?;
    }
}

fn imap_verdict(tag: &str, name: &str, ok: bool) -> String {
    if ok {
        format!("{tag} OK [CAPABILITY IMAP4rev1] {name} logged in\r\n")
    } else {
        format!("{tag} NO [AUTHENTICATIONFAILED] {name} says no\r\n")
    }
}

fn pop3_verdict(name: &str, ok: bool) -> String {
    if ok {
        format!("+OK {name} logged in\r\n")
    } else {
        format!("-ERR [AUTH] {name} says no\r\n")
    }
}

/// GETs `path` from the admin endpoint.
pub async fn scrape(admin: SocketAddr) -> String {
    let mut tcp = TcpStream::connect(admin).await.unwrap();
    tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    tokio::time::timeout(TIMEOUT, tcp.read_to_string(&mut out))
        .await
        .unwrap()
        .unwrap();
    out
}

/// The value of the one series whose line starts with `series` (name and labels), if present.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}
