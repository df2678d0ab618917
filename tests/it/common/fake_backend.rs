//! Fake backends on 127.0.0.1:0 that record every byte they receive: small SMTP, IMAP and
//! POP3 servers (one submodule each) and an echo server.

mod imap;
mod pop3;
mod smtp;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::prelude::{BASE64_STANDARD, Engine as _};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

use super::TIMEOUT;

/// What one connection to a fake backend received.
#[derive(Clone, Debug, Default)]
struct Received {
    /// With `FakeOptions::expect_proxy_v2`: its PROXY v2 header, whole.
    proxy_header: Option<Vec<u8>>,
    /// Every octet after the header.
    bytes: Vec<u8>,
}

impl Received {
    /// Whether this connection was mailfront's capability probe: it received exactly the
    /// probe's requests ([`is_probe`]), after a PROXY v2 header (if any) whose command is
    /// `LOCAL` (HAProxy `doc/proxy-protocol.txt` §2.2: no client behind it).
    fn is_probe(&self) -> bool {
        is_probe(&self.bytes)
            && self
                .proxy_header
                .as_ref()
                .is_none_or(|h| h.get(12) == Some(&PROXY_V2_LOCAL))
    }
}

/// What a fake backend received, per connection: the octets after any PROXY header
/// (`FakeBackend::recorder`), or the PROXY v2 headers (`FakeBackend::proxy_headers`).
///
/// mailfront's capability probe (`mailfront::probe`: one connection per listener while what its
/// sessions show before login is unknown) is no client's session, so it is kept out of
/// [`Recorder::connections`] (and its `LOCAL` header out of the headers) and counted by
/// [`Recorder::probes`]. It is told apart by its complete transcript ([`is_probe`]): a probe
/// only ever sends those octets, and a session sends exactly them only in the machines'
/// fallback after a failed probe, where a POP3 session connects at its client's CAPA and the
/// client then only says QUIT (no test here counts such a session), or where an SMTP client
/// calls itself by mailfront's name. A probe still under way counts as a connection until its
/// goodbye arrives; a session starts only once its listener's probe is over.
#[derive(Clone)]
pub struct Recorder {
    log: Arc<Mutex<Vec<Received>>>,
    headers: bool,
}

/// The name mailfront calls itself in the tests' configs (`config_yaml`), which its SMTP probe
/// says in its EHLO.
pub const PROXY_HOSTNAME: &str = "mx.example.test";

/// Whether `received` is exactly what mailfront's capability probe sends a backend after the
/// greeting: the capability request and the goodbye of IMAP (RFC 9051 §6.1.1, §6.1.3), POP3
/// (RFC 2449 §5, RFC 1939 §6) or SMTP (RFC 5321 §4.1.1.1, §4.1.1.10).
fn is_probe(received: &[u8]) -> bool {
    let smtp = format!("EHLO {PROXY_HOSTNAME}\r\nQUIT\r\n");
    received == b"P1 CAPABILITY\r\nP2 LOGOUT\r\n"
        || received == b"CAPA\r\nQUIT\r\n"
        || received == smtp.as_bytes()
}

impl Recorder {
    /// What each connection received (or its PROXY header), in the order they were accepted,
    /// the capability probes left out.
    pub fn connections(&self) -> Vec<Vec<u8>> {
        self.view(false)
    }
    /// How many connections were mailfront's capability probe.
    pub fn probes(&self) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.is_probe())
            .count()
    }
    /// As [`Recorder::connections`], the probes included.
    pub fn accepted_connections(&self) -> Vec<Vec<u8>> {
        self.view(true)
    }
    fn view(&self, probes: bool) -> Vec<Vec<u8>> {
        let log = self.log.lock().unwrap();
        let kept = log.iter().filter(|c| probes || !c.is_probe());
        if self.headers {
            kept.filter_map(|c| c.proxy_header.clone()).collect()
        } else {
            kept.map(|c| c.bytes.clone()).collect()
        }
    }
    /// Every octet the connections received, one after the other, the probes' left out.
    pub fn all(&self) -> Vec<u8> {
        self.connections().concat()
    }
    pub fn all_text(&self) -> String {
        String::from_utf8_lossy(&self.all()).into_owned()
    }
    fn new_connection(&self) -> usize {
        let mut v = self.log.lock().unwrap();
        v.push(Received::default());
        v.len() - 1
    }
    fn append(&self, index: usize, bytes: &[u8]) {
        self.log.lock().unwrap()[index]
            .bytes
            .extend_from_slice(bytes);
    }
    fn set_proxy_header(&self, index: usize, header: Vec<u8>) {
        self.log.lock().unwrap()[index].proxy_header = Some(header);
    }
}

/// Which fake server to run.
#[derive(Clone, Copy, Debug)]
pub enum FakeKind {
    Smtp,
    Imap,
    Pop3,
    /// Greets with a line, then echoes everything back.
    Echo,
}

/// A fake backend on 127.0.0.1:0 that records every byte it receives.
pub struct FakeBackend {
    pub addr: SocketAddr,
    pub recorder: Recorder,
    /// With `FakeOptions::expect_proxy_v2`: the PROXY v2 header of each connection, whole
    /// (signature to the last TLV), kept out of `recorder`.
    pub proxy_headers: Recorder,
}

impl FakeBackend {
    pub async fn start(kind: FakeKind) -> FakeBackend {
        Self::start_with(kind, FakeOptions::default()).await
    }

    pub async fn start_with(kind: FakeKind, options: FakeOptions) -> FakeBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let recorder = Recorder {
            log: log.clone(),
            headers: false,
        };
        let proxy_headers = Recorder { log, headers: true };
        let r = recorder.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                // Like the proxy's own sockets: two answers written back to back leave at once
                // instead of the second waiting for a delayed ACK (40 ms of wall-clock time,
                // which a test on paused time would see as the peer going silent).
                let _ = stream.set_nodelay(true);
                let index = r.new_connection();
                let r = r.clone();
                let options = options.clone();
                tokio::spawn(async move {
                    if options.expect_proxy_v2 {
                        // Like Postfix/Dovecot: the header must come first, whole, before we
                        // greet; anything else and the connection is dropped.
                        match tokio::time::timeout(TIMEOUT, read_proxy_v2(&mut stream)).await {
                            Ok(Ok(header)) => r.set_proxy_header(index, header),
                            _ => return,
                        }
                    }
                    let stream = RecordingStream {
                        inner: stream,
                        recorder: r,
                        index,
                    };
                    let _ = match kind {
                        FakeKind::Smtp => smtp::fake_smtp(stream, &options).await,
                        FakeKind::Imap => imap::fake_imap(stream, &options).await,
                        FakeKind::Pop3 => pop3::fake_pop3(stream, &options).await,
                        FakeKind::Echo => fake_echo(stream).await,
                    };
                });
            }
        });
        FakeBackend {
            addr,
            recorder,
            proxy_headers,
        }
    }
}

/// The PROXY v2 signature (HAProxy `doc/proxy-protocol.txt` §2.2).
pub const PROXY_V2_SIGNATURE: [u8; 12] = [
    0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A,
];

/// A PROXY v2 header's 13th octet for version 2, command `LOCAL` (§2.2).
const PROXY_V2_LOCAL: u8 = 0x20;

/// Reads one PROXY v2 header: 16 fixed bytes, then `len` more. Fails on a wrong signature.
async fn read_proxy_v2(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut header = vec![0u8; 16];
    stream.read_exact(&mut header).await?;
    if header[..12] != PROXY_V2_SIGNATURE {
        return Err(std::io::Error::other("no PROXY v2 signature"));
    }
    let len = usize::from(u16::from_be_bytes([header[14], header[15]]));
    let mut rest = vec![0u8; len];
    stream.read_exact(&mut rest).await?;
    header.extend_from_slice(&rest);
    Ok(header)
}

/// Knobs for fake backends.
#[derive(Clone, Debug)]
pub struct FakeOptions {
    /// SMTP: extensions advertised in EHLO (after the first line).
    pub ehlo_extensions: Vec<String>,
    /// IMAP: capabilities in the greeting and CAPABILITY.
    pub imap_capabilities: String,
    /// POP3: CAPA lines.
    pub pop3_capa: Vec<String>,
    /// The password that logs in.
    pub password: String,
    /// IMAP: the greeting carries `[CAPABILITY …]` (else clients must ask).
    pub imap_greeting_capabilities: bool,
    /// IMAP: greet with `* PREAUTH` (a misconfigured backend trusting the proxy).
    pub imap_preauth: bool,
    /// SMTP: the greeting line(s), CRLF included.
    pub smtp_greeting: String,
    /// SMTP: answer DATA with 554 instead of 354.
    pub refuse_data: bool,
    /// SMTP: after the 354, read one content line and close the connection.
    pub die_in_data: bool,
    /// SMTP: like Postfix `smtpd_forbid_unauth_pipelining`, answer `554 5.5.0` and close when
    /// a command arrives before the reply to a group-ending command (RFC 2920 §3.1), or before
    /// any reply when PIPELINING is not advertised.
    pub strict_sync: bool,
    /// SMTP: answer a command starting with this (upper case) with 421 and close.
    pub smtp_421_on: Option<String>,
    /// IMAP/POP3: before answering LOGIN/AUTHENTICATE/PASS/APOP/AUTH, wait a little and refuse
    /// (`NO`/`-ERR … early bytes`) if more client bytes already arrived: proves the proxy holds
    /// pipelined commands until the answer.
    pub slow_auth: bool,
    /// IMAP/POP3: never answer LOGIN/AUTHENTICATE/PASS/APOP/AUTH (a hung backend).
    pub silent_auth: bool,
    /// POP3: the greeting line, CRLF included.
    pub pop3_greeting: String,
    /// Read a PROXY protocol v2 header first (into `FakeBackend::proxy_headers`) and drop the
    /// connection if there is none, as Postfix/Dovecot configured for HAProxy do.
    pub expect_proxy_v2: bool,
    /// SMTP: answer XCLIENT with 550 (Postfix without `smtpd_authorized_xclient_hosts`).
    pub refuse_xclient: bool,
    /// IMAP/POP3/SMTP: answer a failed login only after this long, a success at once, as
    /// Dovecot does with `auth_failure_delay` (2 s by default).
    pub failure_delay: Option<Duration>,
}

impl Default for FakeOptions {
    fn default() -> Self {
        FakeOptions {
            ehlo_extensions: [
                "PIPELINING",
                "SIZE 104857600",
                "8BITMIME",
                "AUTH PLAIN LOGIN",
                "STARTTLS",
                "ENHANCEDSTATUSCODES",
                "CHUNKING",
                "SMTPUTF8",
                "XCLIENT NAME ADDR",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
            imap_capabilities:
                "IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ STARTTLS AUTH=PLAIN"
                    .into(),
            pop3_capa: [
                "TOP",
                "UIDL",
                "USER",
                "SASL PLAIN",
                "STLS",
                "RESP-CODES",
                "PIPELINING",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
            password: "secret".into(),
            imap_greeting_capabilities: true,
            imap_preauth: false,
            smtp_greeting: "220 backend.test ESMTP fake\r\n".into(),
            refuse_data: false,
            die_in_data: false,
            strict_sync: false,
            smtp_421_on: None,
            slow_auth: false,
            silent_auth: false,
            pop3_greeting: "+OK fake POP3 ready\r\n".into(),
            expect_proxy_v2: false,
            refuse_xclient: false,
            failure_delay: None,
        }
    }
}

struct RecordingStream {
    inner: TcpStream,
    recorder: Recorder,
    index: usize,
}

impl AsyncRead for RecordingStream {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let poll = std::pin::Pin::new(&mut this.inner).poll_read(cx, buf);
        let new = &buf.filled()[before..];
        if !new.is_empty() {
            this.recorder.append(this.index, new);
        }
        poll
    }
}

impl AsyncWrite for RecordingStream {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

async fn fake_echo(mut stream: RecordingStream) -> std::io::Result<()> {
    stream.write_all(b"hello from backend\r\n").await?;
    let mut buf = vec![0u8; 65536];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        stream.write_all(&buf[..n]).await?;
    }
}

/// The SMTP reply to an AUTH PLAIN response (RFC 4616: authzid NUL authcid NUL passwd, in
/// base64); the IMAP and POP3 fakes map it to their own OK/NO.
fn auth_plain_reply(b64: &str, password: &str) -> String {
    let decoded = BASE64_STANDARD.decode(b64).unwrap_or_default();
    let parts: Vec<&[u8]> = decoded.split(|&b| b == 0).collect();
    if parts.len() == 3 && parts[2] == password.as_bytes() {
        "235 2.7.0 Authentication successful\r\n".into()
    } else {
        "535 5.7.8 Authentication failed\r\n".into()
    }
}

/// For `failure_delay`: waits before a failed login's answer (`failed`), like Dovecot.
async fn delay_failure(options: &FakeOptions, failed: bool) {
    if let Some(delay) = options.failure_delay
        && failed
    {
        tokio::time::sleep(delay).await;
    }
}

/// For `slow_auth` / `silent_auth`: `Some(reply)` replaces the backend's answer to an
/// authentication command. Hangs for `silent_auth`.
async fn auth_gate(
    stream: &mut BufReader<RecordingStream>,
    options: &FakeOptions,
    early: String,
) -> std::io::Result<Option<String>> {
    if options.silent_auth {
        // Keep reading (and recording) but never answer.
        let mut sink = Vec::new();
        loop {
            sink.clear();
            if stream.read_until(b'\n', &mut sink).await? == 0 {
                return Ok(Some(String::new()));
            }
        }
    }
    if options.slow_auth {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let more = tokio::time::timeout(Duration::from_millis(50), stream.fill_buf()).await;
        if matches!(more, Ok(Ok(buf)) if !buf.is_empty()) {
            return Ok(Some(early));
        }
    }
    Ok(None)
}
