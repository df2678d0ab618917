//! Load generator and fast fake backends for mailfront's benchmark suite.
//!
//! `loadgen backend` runs the fake IMAP and SMTP servers and nginx's `auth_http` stub; every other
//! subcommand is one client scenario against a proxy (or, with `--plain`, straight at the fake
//! backend) and prints one JSON object on stdout when it ends. `bench/run.py` drives it; the proxy
//! runs pinned to one core and this process on the other, and the driver reads the proxy's CPU
//! and memory from /proc. Everything here runs on one thread (tokio's current-thread runtime).
//!
//! The TLS client offers only TLS 1.3, `TLS_AES_128_GCM_SHA256` and X25519, keeps no session for
//! resumption (every connection is a full handshake) and checks neither the certificate nor the
//! handshake signature: the cost measured is the server's, and the client should spend as little
//! of its core as it can. It counts the TLS 1.3 session tickets each server sends.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Parser, Subcommand};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{
    ClientSessionStore, Resumption, Tls12ClientSessionValue, Tls13ClientSessionValue,
};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, NamedGroup, SignatureScheme};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinSet;
use tokio::time::{Instant, timeout};
use tokio_rustls::TlsConnector;

/// Longest line either side accepts; past it the session fails.
const MAX_LINE: usize = 64 * 1024;
/// What the fake IMAP backend sends FETCH literals from (message-like 78-octet lines).
static BODY: LazyLock<Vec<u8>> = LazyLock::new(|| text_lines(1 << 20));

#[derive(Parser)]
#[command(about = "mailfront benchmark load generator and fake backends")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Fake IMAP and SMTP backends and an nginx auth_http stub; prints their ports as JSON.
    Backend {
        #[arg(long, default_value = "127.0.0.1:0")]
        imap: SocketAddr,
        #[arg(long, default_value = "127.0.0.1:0")]
        smtp: SocketAddr,
        #[arg(long, default_value = "127.0.0.1:0")]
        auth_http: SocketAddr,
    },
    /// New sessions: TLS handshake, IMAP greeting, LOGOUT.
    Handshake(Common),
    /// Login sessions: handshake, greeting, LOGIN, LOGOUT.
    Login(Common),
    /// IMAP FETCH relay: each client logs in and fetches `bytes / clients` octets as one literal.
    Fetch {
        #[command(flatten)]
        common: Common,
        #[arg(long)]
        bytes: u64,
    },
    /// SMTP submission: each client authenticates once, then sends messages of `size` octets.
    Smtp {
        #[command(flatten)]
        common: Common,
        #[arg(long)]
        size: usize,
        /// Messages per client; 0: as many as fit in --seconds.
        #[arg(long, default_value_t = 0)]
        messages: u64,
    },
    /// Idle authenticated IMAP sessions (LOGIN, then IDLE), held until a line arrives on stdin.
    Idle {
        #[command(flatten)]
        common: Common,
        #[arg(long)]
        sessions: usize,
        /// How long to wait on stdin before letting the sessions go anyway.
        #[arg(long, default_value_t = 300.0)]
        hold: f64,
    },
    /// Round trip of a small command (NOOP) in one logged-in session, `count` times.
    Latency {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 2000)]
        count: usize,
    },
}

#[derive(Args, Clone)]
struct Common {
    /// The proxy (or, with --plain, the backend) to connect to.
    #[arg(long)]
    target: SocketAddr,
    #[arg(long, default_value = "imap.bench.test")]
    sni: String,
    /// Concurrent clients (for `idle`: sessions being opened at a time).
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// How long the scenario runs (handshake, login, smtp without --messages).
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Bind connections round-robin to 127.0.1.1 .. 127.0.1.N (0: let the kernel choose).
    #[arg(long, default_value_t = 0)]
    sources: u8,
    /// Cleartext TCP instead of TLS (straight at a backend).
    #[arg(long)]
    plain: bool,
    /// Limit on every single wait (connect, handshake, each read and write), seconds.
    #[arg(long, default_value_t = 30.0)]
    timeout: f64,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        match cli.cmd {
            Cmd::Backend {
                imap,
                smtp,
                auth_http,
            } => backend(imap, smtp, auth_http).await,
            Cmd::Handshake(c) => sessions(c, Kind::Handshake).await,
            Cmd::Login(c) => sessions(c, Kind::Login).await,
            Cmd::Fetch { common, bytes } => fetch(common, bytes).await,
            Cmd::Smtp {
                common,
                size,
                messages,
            } => smtp(common, size, messages).await,
            Cmd::Idle {
                common,
                sessions,
                hold,
            } => idle(common, sessions, hold).await,
            Cmd::Latency { common, count } => latency(common, count).await,
        }
    })
}

/// `n` octets of 76-character lines with CRLF, as base64 attachments look.
fn text_lines(n: usize) -> Vec<u8> {
    let mut line: Vec<u8> = (0..76u8).map(|i| b'A' + i % 26).collect();
    line.extend_from_slice(b"\r\n");
    line.iter().copied().cycle().take(n).collect()
}

// ------------------------------------------------------------------------------------------------
// TLS client
// ------------------------------------------------------------------------------------------------

/// Counts the TLS 1.3 tickets servers send and never hands one back: no resumption.
#[derive(Debug, Default)]
struct TicketCounter(AtomicU64);

impl ClientSessionStore for TicketCounter {
    fn set_kx_hint(&self, _: ServerName<'static>, _: NamedGroup) {}
    fn kx_hint(&self, _: &ServerName<'_>) -> Option<NamedGroup> {
        None
    }
    fn set_tls12_session(&self, _: ServerName<'static>, _: Tls12ClientSessionValue) {}
    fn tls12_session(&self, _: &ServerName<'_>) -> Option<Tls12ClientSessionValue> {
        None
    }
    fn remove_tls12_session(&self, _: &ServerName<'static>) {}
    fn insert_tls13_ticket(&self, _: ServerName<'static>, _: Tls13ClientSessionValue) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    fn take_tls13_ticket(&self, _: &ServerName<'static>) -> Option<Tls13ClientSessionValue> {
        None
    }
}

/// Accepts any certificate and signature: the benchmark measures the server, not the client.
#[derive(Debug)]
struct NoVerify(Vec<SignatureScheme>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.clone()
    }
}

fn tls_config(tickets: Arc<TicketCounter>) -> Result<Arc<ClientConfig>> {
    use rustls::crypto::aws_lc_rs;
    let mut provider = aws_lc_rs::default_provider();
    provider.cipher_suites = vec![aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256];
    provider.kx_groups = vec![aws_lc_rs::kx_group::X25519];
    let schemes = provider
        .signature_verification_algorithms
        .supported_schemes();
    let mut cfg = ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(NoVerify(schemes)))
        .with_no_client_auth();
    cfg.resumption = Resumption::store(tickets);
    Ok(Arc::new(cfg))
}

// ------------------------------------------------------------------------------------------------
// Client sessions
// ------------------------------------------------------------------------------------------------

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// What every client task shares.
struct Client {
    c: Common,
    tls: TlsConnector,
    sni: ServerName<'static>,
    tickets: Arc<TicketCounter>,
    wait: Duration,
    next_source: AtomicU64,
}

impl Client {
    fn new(c: Common) -> Result<Arc<Self>> {
        let tickets = Arc::new(TicketCounter::default());
        let tls = TlsConnector::from(tls_config(tickets.clone())?);
        let sni = ServerName::try_from(c.sni.clone())?;
        let wait = Duration::from_secs_f64(c.timeout);
        Ok(Arc::new(Client {
            c,
            tls,
            sni,
            tickets,
            wait,
            next_source: AtomicU64::new(0),
        }))
    }

    async fn connect(&self, buf: usize) -> Result<Session> {
        let sock = TcpSocket::new_v4()?;
        if self.c.sources > 0 {
            let i = self.next_source.fetch_add(1, Ordering::Relaxed) % u64::from(self.c.sources);
            let ip = Ipv4Addr::new(127, 0, 1, 1 + u8::try_from(i)?);
            sock.bind(SocketAddr::new(IpAddr::V4(ip), 0))?;
        }
        let tcp = timeout(self.wait, sock.connect(self.c.target))
            .await
            .context("connect timed out")??;
        tcp.set_nodelay(true)?;
        let io: Box<dyn Io> = if self.c.plain {
            Box::new(tcp)
        } else {
            Box::new(
                timeout(self.wait, self.tls.connect(self.sni.clone(), tcp))
                    .await
                    .context("TLS handshake timed out")??,
            )
        };
        Ok(Session {
            io: BufReader::with_capacity(buf, io),
            line: Vec::new(),
            wait: self.wait,
        })
    }

    /// Connects and reads the IMAP greeting.
    async fn imap(&self, buf: usize) -> Result<Session> {
        let mut s = self.connect(buf).await?;
        s.read_line().await?;
        if !s.line.starts_with(b"* OK") {
            bail!("IMAP greeting {:?}", String::from_utf8_lossy(&s.line));
        }
        Ok(s)
    }

    async fn imap_login(&self, buf: usize) -> Result<Session> {
        let mut s = self.imap(buf).await?;
        s.command(b"a LOGIN u p\r\n", b"a").await?;
        Ok(s)
    }
}

struct Session {
    io: BufReader<Box<dyn Io>>,
    line: Vec<u8>,
    wait: Duration,
}

impl Session {
    async fn send(&mut self, b: &[u8]) -> Result<()> {
        let io = self.io.get_mut();
        timeout(self.wait, async {
            io.write_all(b).await?;
            io.flush().await
        })
        .await
        .context("write timed out")??;
        Ok(())
    }

    /// One line, CRLF included, into `self.line`.
    async fn read_line(&mut self) -> Result<()> {
        self.line.clear();
        loop {
            let buf = timeout(self.wait, self.io.fill_buf())
                .await
                .context("read timed out")??;
            if buf.is_empty() {
                bail!("connection closed");
            }
            if let Some(i) = memchr::memchr(b'\n', buf) {
                self.line.extend_from_slice(&buf[..=i]);
                self.io.consume(i + 1);
                return Ok(());
            }
            let n = buf.len();
            self.line.extend_from_slice(buf);
            self.io.consume(n);
            if self.line.len() > MAX_LINE {
                bail!("line longer than {MAX_LINE}");
            }
        }
    }

    /// Reads and drops `n` octets.
    async fn skip(&mut self, mut n: u64) -> Result<()> {
        while n > 0 {
            let buf = timeout(self.wait, self.io.fill_buf())
                .await
                .context("read timed out")??;
            if buf.is_empty() {
                bail!("connection closed with {n} octets to go");
            }
            let k = buf.len().min(usize::try_from(n).unwrap_or(usize::MAX));
            self.io.consume(k);
            n -= k as u64;
        }
        Ok(())
    }

    /// Reads IMAP lines until the tagged one, which must be OK.
    async fn tagged(&mut self, tag: &[u8]) -> Result<()> {
        loop {
            self.read_line().await?;
            if self.line.starts_with(tag) && self.line.get(tag.len()) == Some(&b' ') {
                if self.line[tag.len() + 1..].starts_with(b"OK") {
                    return Ok(());
                }
                bail!("{}", String::from_utf8_lossy(&self.line).trim_end());
            }
        }
    }

    async fn command(&mut self, cmd: &[u8], tag: &[u8]) -> Result<()> {
        self.send(cmd).await?;
        self.tagged(tag).await
    }

    /// One SMTP reply (all its lines); returns its code, which must start with `want`.
    async fn reply(&mut self, want: u8) -> Result<()> {
        loop {
            self.read_line().await?;
            if self.line.len() < 4 {
                bail!("short SMTP reply {:?}", String::from_utf8_lossy(&self.line));
            }
            if self.line[3] != b'-' {
                if self.line[0] != want {
                    bail!("SMTP {}", String::from_utf8_lossy(&self.line).trim_end());
                }
                return Ok(());
            }
        }
    }
}

/// Successes, failures and latencies of one client task.
#[derive(Default)]
struct Tally {
    ok: u64,
    errors: u64,
    first_error: Option<String>,
    lat_us: Vec<u32>,
    bytes: u64,
}

impl Tally {
    fn record(&mut self, r: Result<()>) {
        match r {
            Ok(()) => self.ok += 1,
            Err(e) => {
                self.errors += 1;
                self.first_error.get_or_insert_with(|| format!("{e:#}"));
            }
        }
    }

    fn merge(&mut self, o: Tally) {
        self.ok += o.ok;
        self.errors += o.errors;
        self.bytes += o.bytes;
        self.lat_us.extend(o.lat_us);
        if self.first_error.is_none() {
            self.first_error = o.first_error;
        }
    }
}

fn elapsed_us(t: Instant) -> u32 {
    u32::try_from(t.elapsed().as_micros()).unwrap_or(u32::MAX)
}

fn percentile(sorted: &[u32], p: f64) -> Option<u32> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted.get(i).copied()
}

/// Prints the scenario's result as one JSON line.
fn report(
    name: &str,
    client: &Client,
    mut t: Tally,
    wall: f64,
    extra: serde_json::Value,
) -> Result<()> {
    t.lat_us.sort_unstable();
    let mut out = json!({
        "scenario": name,
        "ok": t.ok,
        "errors": t.errors,
        "first_error": t.first_error,
        "wall_s": wall,
        "bytes": t.bytes,
        "tickets": client.tickets.0.load(Ordering::Relaxed),
        "p50_us": percentile(&t.lat_us, 0.50),
        "p99_us": percentile(&t.lat_us, 0.99),
        "samples": t.lat_us.len(),
    });
    if let (Some(o), Some(e)) = (out.as_object_mut(), extra.as_object()) {
        o.extend(e.clone());
    }
    println!("{out}");
    Ok(())
}

/// Runs `clients` tasks of `f` and merges their tallies.
async fn run_clients<F, Fut>(client: &Arc<Client>, f: F) -> Result<(Tally, f64)>
where
    F: Fn(Arc<Client>, usize) -> Fut,
    Fut: Future<Output = Tally> + Send + 'static,
{
    let start = Instant::now();
    let mut set = JoinSet::new();
    for i in 0..client.c.clients {
        set.spawn(f(client.clone(), i));
    }
    let mut total = Tally::default();
    while let Some(t) = set.join_next().await {
        total.merge(t?);
    }
    Ok((total, start.elapsed().as_secs_f64()))
}

#[derive(Clone, Copy)]
enum Kind {
    Handshake,
    Login,
}

async fn one_session(client: &Client, kind: Kind) -> Result<()> {
    let mut s = client.imap(4096).await?;
    if let Kind::Login = kind {
        s.command(b"a LOGIN u p\r\n", b"a").await?;
    }
    s.command(b"z LOGOUT\r\n", b"z").await
}

async fn sessions(c: Common, kind: Kind) -> Result<()> {
    let client = Client::new(c)?;
    let until = Duration::from_secs_f64(client.c.seconds);
    let (t, wall) = run_clients(&client, move |client, _| async move {
        let mut t = Tally::default();
        let start = Instant::now();
        while start.elapsed() < until {
            let t0 = Instant::now();
            let r = one_session(&client, kind).await;
            if r.is_ok() {
                t.lat_us.push(elapsed_us(t0));
            }
            t.record(r);
        }
        t
    })
    .await?;
    let name = match kind {
        Kind::Handshake => "handshake",
        Kind::Login => "login",
    };
    report(name, &client, t, wall, json!({}))
}

async fn fetch(c: Common, bytes: u64) -> Result<()> {
    let client = Client::new(c)?;
    let each = bytes / client.c.clients.max(1) as u64;
    let (t, wall) = run_clients(&client, move |client, _| async move {
        let mut t = Tally::default();
        let r = async {
            let mut s = client.imap_login(64 * 1024).await?;
            s.command(b"s SELECT INBOX\r\n", b"s").await?;
            s.send(format!("f FETCH 1 BODY[]<0.{each}>\r\n").as_bytes())
                .await?;
            s.read_line().await?;
            let head = String::from_utf8_lossy(&s.line).into_owned();
            let n: u64 = head
                .trim_end()
                .strip_suffix('}')
                .and_then(|h| h.rsplit_once('{'))
                .and_then(|(_, n)| n.parse().ok())
                .ok_or_else(|| anyhow!("FETCH header {head:?}"))?;
            if n != each {
                bail!("FETCH literal of {n} octets, {each} asked");
            }
            s.skip(n).await?;
            s.tagged(b"f").await?;
            s.command(b"z LOGOUT\r\n", b"z").await?;
            Ok(n)
        }
        .await;
        match r {
            Ok(n) => {
                t.bytes += n;
                t.record(Ok(()));
            }
            Err(e) => t.record(Err(e)),
        }
        t
    })
    .await?;
    report("fetch", &client, t, wall, json!({}))
}

async fn smtp(c: Common, size: usize, messages: u64) -> Result<()> {
    let client = Client::new(c)?;
    let mut msg = b"From: <a@bench.test>\r\nTo: <b@bench.test>\r\nSubject: bench\r\n\r\n".to_vec();
    // Whole lines only (a partial last line would hide the end of data), `size` octets in all.
    let mut body = text_lines(size.saturating_sub(msg.len() + 3));
    let want = body.len();
    body.truncate(memchr::memrchr(b'\n', &body).map_or(0, |i| i + 1));
    if want - body.len() >= 2 {
        body.resize(want - 2, b'x');
        body.extend_from_slice(b"\r\n");
    }
    msg.extend(body);
    msg.extend_from_slice(b".\r\n");
    let msg = Arc::new(msg);
    let until = Duration::from_secs_f64(client.c.seconds);
    let (t, wall) = run_clients(&client, move |client, _| {
        let msg = msg.clone();
        async move {
            let mut t = Tally::default();
            let r = async {
                let mut s = client.connect(8192).await?;
                s.reply(b'2').await?;
                s.send(b"EHLO loadgen.bench.test\r\n").await?;
                s.reply(b'2').await?;
                s.send(b"AUTH PLAIN AHUAcA==\r\n").await?;
                s.reply(b'2').await?;
                let start = Instant::now();
                let mut sent = 0u64;
                while if messages > 0 {
                    sent < messages
                } else {
                    start.elapsed() < until
                } {
                    s.send(b"MAIL FROM:<a@bench.test>\r\n").await?;
                    s.reply(b'2').await?;
                    s.send(b"RCPT TO:<b@bench.test>\r\n").await?;
                    s.reply(b'2').await?;
                    s.send(b"DATA\r\n").await?;
                    s.reply(b'3').await?;
                    let t0 = Instant::now();
                    s.send(&msg).await?;
                    s.reply(b'2').await?;
                    t.lat_us.push(elapsed_us(t0));
                    t.bytes += msg.len() as u64;
                    t.ok += 1;
                    sent += 1;
                }
                s.send(b"QUIT\r\n").await?;
                s.reply(b'2').await
            }
            .await;
            if let Err(e) = r {
                t.record(Err(e));
            }
            t
        }
    })
    .await?;
    report("smtp", &client, t, wall, json!({ "message_octets": size }))
}

async fn idle(c: Common, sessions: usize, hold: f64) -> Result<()> {
    let client = Client::new(c)?;
    let opened = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut set = JoinSet::new();
    for _ in 0..client.c.clients.max(1) {
        let (client, opened) = (client.clone(), opened.clone());
        set.spawn(async move {
            let mut held = Vec::new();
            let mut t = Tally::default();
            while opened.fetch_add(1, Ordering::Relaxed) < sessions as u64 {
                let r = async {
                    let mut s = client.imap_login(1024).await?;
                    s.send(b"i IDLE\r\n").await?;
                    s.read_line().await?;
                    if !s.line.starts_with(b"+") {
                        bail!("IDLE answered {:?}", String::from_utf8_lossy(&s.line));
                    }
                    Ok(s)
                }
                .await;
                match r {
                    Ok(s) => {
                        held.push(s);
                        t.ok += 1;
                    }
                    Err(e) => t.record(Err(e)),
                }
            }
            (held, t)
        });
    }
    let mut held = Vec::with_capacity(sessions);
    let mut total = Tally::default();
    while let Some(r) = set.join_next().await {
        let (h, t) = r?;
        held.extend(h);
        total.merge(t);
    }
    let wall = start.elapsed().as_secs_f64();
    report("idle", &client, total, wall, json!({ "held": held.len() }))?;
    // The driver measures the proxy now, then writes a line (or closes stdin).
    let mut stdin = BufReader::new(tokio::io::stdin());
    let mut line = String::new();
    let _ = timeout(Duration::from_secs_f64(hold), stdin.read_line(&mut line)).await;
    drop(held);
    Ok(())
}

async fn latency(c: Common, count: usize) -> Result<()> {
    let client = Client::new(c)?;
    let start = Instant::now();
    let mut t = Tally::default();
    let r = async {
        let mut s = client.imap_login(4096).await?;
        for _ in 0..count {
            let t0 = Instant::now();
            s.command(b"n NOOP\r\n", b"n").await?;
            t.lat_us.push(elapsed_us(t0));
            t.ok += 1;
        }
        s.command(b"z LOGOUT\r\n", b"z").await
    }
    .await;
    if let Err(e) = r {
        t.record(Err(e));
    }
    report(
        "latency",
        &client,
        t,
        start.elapsed().as_secs_f64(),
        json!({}),
    )
}

// ------------------------------------------------------------------------------------------------
// Fake backends
// ------------------------------------------------------------------------------------------------

/// A backend waits this long for its client; idle sessions are held for minutes.
const BACKEND_WAIT: Duration = Duration::from_secs(3600);

async fn backend(imap: SocketAddr, smtp: SocketAddr, auth_http: SocketAddr) -> Result<()> {
    let imap = TcpListener::bind(imap).await?;
    let smtp = TcpListener::bind(smtp).await?;
    let auth = TcpListener::bind(auth_http).await?;
    let (ip, sp) = (imap.local_addr()?.port(), smtp.local_addr()?.port());
    println!(
        "{}",
        json!({ "imap": ip, "smtp": sp, "auth_http": auth.local_addr()?.port() })
    );
    LazyLock::force(&BODY);
    let serve = |l: TcpListener, which: u8| async move {
        loop {
            let Ok((s, _)) = l.accept().await else {
                // Out of descriptors or similar: back off instead of spinning.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            tokio::spawn(async move {
                let _ = match which {
                    0 => imap_backend(s).await,
                    1 => smtp_backend(s).await,
                    _ => auth_stub(s, ip, sp).await,
                };
            });
        }
    };
    tokio::join!(serve(imap, 0), serve(smtp, 1), serve(auth, 2));
    Ok(())
}

struct Backend {
    s: BufReader<TcpStream>,
    line: Vec<u8>,
}

impl Backend {
    async fn read_line(&mut self) -> Result<()> {
        self.line.clear();
        let n = timeout(
            BACKEND_WAIT,
            (&mut self.s)
                .take(MAX_LINE as u64)
                .read_until(b'\n', &mut self.line),
        )
        .await
        .context("client silent")??;
        if n == 0 || !self.line.ends_with(b"\n") {
            bail!("client closed");
        }
        Ok(())
    }

    async fn send(&mut self, b: &[u8]) -> Result<()> {
        timeout(BACKEND_WAIT, self.s.get_mut().write_all(b))
            .await
            .context("client not reading")??;
        Ok(())
    }

    /// Reads `n` octets and appends them to the line (an IMAP literal).
    async fn literal(&mut self, n: usize) -> Result<()> {
        if n > MAX_LINE {
            bail!("literal too large");
        }
        let start = self.line.len();
        self.line.resize(start + n, 0);
        timeout(BACKEND_WAIT, self.s.read_exact(&mut self.line[start..]))
            .await
            .context("client silent")??;
        Ok(())
    }
}

/// `{n}` or `{n+}` (and the CRLF) at the end of `line`: (n, synchronising).
fn literal_at_end(line: &[u8]) -> Option<(usize, bool)> {
    let l = line
        .strip_suffix(b"\r\n")
        .or_else(|| line.strip_suffix(b"\n"))?;
    let l = l.strip_suffix(b"}")?;
    let open = memchr::memrchr(b'{', l)?;
    let inner = &l[open + 1..];
    let (digits, sync) = match inner.strip_suffix(b"+") {
        Some(d) => (d, false),
        None => (inner, true),
    };
    Some((std::str::from_utf8(digits).ok()?.parse().ok()?, sync))
}

async fn imap_backend(s: TcpStream) -> Result<()> {
    s.set_nodelay(true)?;
    let mut b = Backend {
        s: BufReader::with_capacity(4096, s),
        line: Vec::new(),
    };
    b.send(b"* OK [CAPABILITY IMAP4rev1 ID IDLE LITERAL+ AUTH=PLAIN] bench backend ready\r\n")
        .await?;
    loop {
        b.read_line().await?;
        // Literals (nginx sends LOGIN's strings as synchronising literals).
        while let Some((n, sync)) = literal_at_end(&b.line) {
            if sync {
                b.send(b"+ go ahead\r\n").await?;
            }
            b.literal(n).await?;
            let mut rest = std::mem::take(&mut b.line);
            b.read_line().await?;
            rest.append(&mut b.line);
            b.line = rest;
        }
        let mut words = b
            .line
            .split(|c| *c == b' ' || *c == b'\r' || *c == b'\n')
            .filter(|w| !w.is_empty());
        let tag = words.next().unwrap_or(b"*").to_vec();
        let mut verb = words.next().unwrap_or(b"").to_ascii_uppercase();
        if verb == b"UID" {
            verb = words.next().unwrap_or(b"").to_ascii_uppercase();
        }
        let mut out = Vec::with_capacity(128);
        match verb.as_slice() {
            b"ID" => out.extend_from_slice(b"* ID NIL\r\n"),
            b"CAPABILITY" => {
                out.extend_from_slice(b"* CAPABILITY IMAP4rev1 ID IDLE LITERAL+ AUTH=PLAIN\r\n")
            }
            b"SELECT" | b"EXAMINE" => out.extend_from_slice(b"* 1 EXISTS\r\n* FLAGS (\\Seen)\r\n"),
            b"LOGOUT" => {
                out.extend_from_slice(b"* BYE bench backend\r\n");
                out.extend_from_slice(&tag);
                out.extend_from_slice(b" OK LOGOUT completed\r\n");
                b.send(&out).await?;
                return Ok(());
            }
            b"IDLE" => {
                b.send(b"+ idling\r\n").await?;
                b.read_line().await?; // DONE
            }
            b"FETCH" => {
                let n = partial_size(&b.line).unwrap_or(1 << 20);
                b.send(format!("* 1 FETCH (BODY[]<0> {{{n}}}\r\n").as_bytes())
                    .await?;
                let mut left = n;
                while left > 0 {
                    let k = left.min(BODY.len() as u64) as usize;
                    b.send(&BODY[..k]).await?;
                    left -= k as u64;
                }
                out.extend_from_slice(b")\r\n");
            }
            _ => {}
        }
        out.extend_from_slice(&tag);
        out.extend_from_slice(b" OK done\r\n");
        b.send(&out).await?;
    }
}

/// The `n` of `<0.n>` in a FETCH command.
fn partial_size(line: &[u8]) -> Option<u64> {
    let i = memchr::memmem::find(line, b"<0.")?;
    let rest = &line[i + 3..];
    let end = memchr::memchr(b'>', rest)?;
    std::str::from_utf8(&rest[..end]).ok()?.parse().ok()
}

async fn smtp_backend(s: TcpStream) -> Result<()> {
    s.set_nodelay(true)?;
    let mut b = Backend {
        s: BufReader::with_capacity(64 * 1024, s),
        line: Vec::new(),
    };
    b.send(b"220 bench.backend ESMTP\r\n").await?;
    let end = memchr::memmem::Finder::new(b"\r\n.\r\n");
    loop {
        b.read_line().await?;
        let verb = b.line.get(..4).unwrap_or(b"").to_ascii_uppercase();
        match verb.as_slice() {
            b"EHLO" => {
                b.send(b"250-bench.backend\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SIZE 104857600\r\n250 AUTH PLAIN LOGIN\r\n")
                    .await?
            }
            b"AUTH" => b.send(b"235 2.7.0 Authentication successful\r\n").await?,
            b"DATA" => {
                b.send(b"354 End data with <CR><LF>.<CR><LF>\r\n").await?;
                // Find CRLF.CRLF, across read boundaries too (content starts at a line start).
                let mut tail: Vec<u8> = b"\r\n".to_vec();
                loop {
                    let buf = timeout(BACKEND_WAIT, b.s.fill_buf()).await.context("client silent")??;
                    if buf.is_empty() {
                        bail!("client closed in DATA");
                    }
                    let mut win = tail.clone();
                    win.extend_from_slice(&buf[..buf.len().min(4)]);
                    if let Some(p) = end.find(&win) {
                        let k = p + 5 - tail.len();
                        b.s.consume(k);
                        break;
                    }
                    if let Some(p) = end.find(buf) {
                        b.s.consume(p + 5);
                        break;
                    }
                    let n = buf.len();
                    tail.extend_from_slice(&buf[n.saturating_sub(4)..]);
                    let cut = tail.len().saturating_sub(4);
                    tail.drain(..cut);
                    b.s.consume(n);
                }
                b.send(b"250 2.0.0 Ok: queued\r\n").await?;
            }
            b"QUIT" => {
                b.send(b"221 2.0.0 Bye\r\n").await?;
                return Ok(());
            }
            b"HELO" => b.send(b"250 bench.backend\r\n").await?,
            _ => b.send(b"250 2.0.0 Ok\r\n").await?,
        }
    }
}

/// nginx mail's auth_http: every login is accepted and sent to the fake backend.
async fn auth_stub(mut s: TcpStream, imap: u16, smtp: u16) -> Result<()> {
    let mut req = Vec::with_capacity(1024);
    let mut buf = [0u8; 2048];
    while memchr::memmem::find(&req, b"\r\n\r\n").is_none() {
        let n = timeout(Duration::from_secs(10), s.read(&mut buf))
            .await
            .context("auth_http request")??;
        if n == 0 || req.len() + n > 16 * 1024 {
            bail!("bad auth_http request");
        }
        req.extend_from_slice(&buf[..n]);
    }
    let smtp_req =
        memchr::memmem::find(&req.to_ascii_lowercase(), b"auth-protocol: smtp").is_some();
    let port = if smtp_req { smtp } else { imap };
    let resp = format!(
        "HTTP/1.0 200 OK\r\nAuth-Status: OK\r\nAuth-Server: 127.0.0.1\r\nAuth-Port: {port}\r\nContent-Length: 0\r\n\r\n"
    );
    timeout(Duration::from_secs(10), s.write_all(resp.as_bytes()))
        .await
        .context("auth_http reply")??;
    Ok(())
}
