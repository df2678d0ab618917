//! Shared test harness: a test CA and certificates, the proxy run in-process on port 0, fake
//! backends that record every byte they receive, and a real rustls client.
#![allow(dead_code)]
// Helpers outside #[test] functions: clippy's allow-*-in-tests does not reach them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mailfront::server::{self, Control, Server};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

pub const TIMEOUT: Duration = Duration::from_secs(10);

/// A test CA plus server certificates written to a temp dir.
pub struct Pki {
    pub dir: tempfile::TempDir,
    pub ca_pem: String,
    pub ca_der: CertificateDer<'static>,
    ca_params: CertificateParams,
    ca_key: KeyPair,
}

pub struct IssuedCert {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Pki {
    pub fn new() -> Pki {
        let ca_key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "mailfront test CA");
        let ca = params.clone().self_signed(&ca_key).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        Pki {
            dir,
            ca_pem: ca.pem(),
            ca_der: ca.der().clone(),
            ca_params: params,
            ca_key,
        }
    }

    pub fn ca_path(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// Issues a certificate for `names` (ECDSA P-256 unless `rsa`), written as `<file>.crt/.key`
    /// with the chain (leaf, CA) in the cert file.
    pub fn issue(&self, file: &str, names: &[&str], rsa: bool) -> IssuedCert {
        let key = if rsa {
            KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap_or_else(|_| rsa_key())
        } else {
            KeyPair::generate().unwrap()
        };
        let params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        let issuer = Issuer::from_params(&self.ca_params, &self.ca_key);
        let cert = params.signed_by(&key, &issuer).unwrap();
        let cert_path = self.dir.path().join(format!("{file}.crt"));
        let key_path = self.dir.path().join(format!("{file}.key"));
        std::fs::write(&cert_path, format!("{}{}", cert.pem(), self.ca_pem)).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        IssuedCert {
            cert: cert_path,
            key: key_path,
        }
    }
}

/// rcgen cannot generate RSA keys with the aws-lc-rs backend on every version; openssl can.
fn rsa_key() -> KeyPair {
    let out = std::process::Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
        ])
        .output()
        .expect("openssl genpkey");
    KeyPair::from_pem(&String::from_utf8(out.stdout).unwrap()).unwrap()
}

/// A proxy running in-process.
pub struct Proxy {
    pub addresses: Vec<(String, SocketAddr)>,
    pub admin: Option<SocketAddr>,
    pub control: Control,
    pub metrics: mailfront::metrics::Metrics,
    handle: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Starts the proxy from YAML (listen addresses should use port 0).
    pub async fn start(yaml: &str, base: &Path) -> Proxy {
        let config = mailfront::config::Config::from_yaml(yaml)
            .unwrap()
            .validate(base)
            .unwrap();
        let registry = prometheus::Registry::new();
        let server = Server::new(config.clone(), &registry).unwrap();
        let metrics = server.metrics().clone();
        let bound = server::bind(&config).await.unwrap();
        let addresses = bound.addresses();
        let admin = bound.admin_address();
        let control = Control::default();
        let c = control.clone();
        let handle = tokio::spawn(async move {
            server.run(bound, c).await.unwrap();
        });
        Proxy {
            addresses,
            admin,
            control,
            metrics,
            handle,
        }
    }

    pub fn addr(&self, name: &str) -> SocketAddr {
        self.addresses
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| *a)
            .unwrap_or_else(|| panic!("no listener {name}"))
    }

    pub async fn stop(mut self) {
        self.control.shutdown.cancel();
        let handle = std::mem::replace(&mut self.handle, tokio::spawn(async {}));
        let _ = tokio::time::timeout(TIMEOUT, handle).await;
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.control.shutdown.cancel();
    }
}

/// YAML for one listener.
pub fn listener_yaml(name: &str, protocol: &str, tls: &str, backend: SocketAddr) -> String {
    format!(
        "  - name: {name}\n    protocol: {protocol}\n    listen: \"127.0.0.1:0\"\n    tls: {tls}\n    backend: \"{backend}\"\n"
    )
}

/// A full config with the given certificates and listeners.
pub fn config_yaml(certs: &[&IssuedCert], listeners: &[String], extra: &str) -> String {
    let mut yaml = String::from("hostname: mx.example.test\ntls:\n  certificates:\n");
    if certs.is_empty() {
        yaml = String::from("hostname: mx.example.test\ntls:\n  certificates: []\n");
    }
    for c in certs {
        yaml.push_str(&format!(
            "    - cert: {}\n      key: {}\n",
            c.cert.display(),
            c.key.display()
        ));
    }
    yaml.push_str("  reload_interval: 100ms\nlisteners:\n");
    for l in listeners {
        yaml.push_str(l);
    }
    yaml.push_str("metrics:\n  listen: \"127.0.0.1:0\"\n");
    yaml.push_str(extra);
    yaml
}

/// The most common setup: a test CA with one certificate for mx.example.test, a fake backend,
/// and the proxy with one implicit-TLS listener in front of it.
pub struct OneListener {
    pub pki: Pki,
    pub cert: IssuedCert,
    pub backend: FakeBackend,
    pub proxy: Proxy,
}

pub async fn one_listener(kind: FakeKind, name: &str, protocol: &str) -> OneListener {
    let pki = Pki::new();
    let cert = pki.issue("mx", &["mx.example.test"], false);
    let backend = FakeBackend::start(kind).await;
    let yaml = config_yaml(
        &[&cert],
        &[listener_yaml(name, protocol, "implicit", backend.addr)],
        "",
    );
    let proxy = Proxy::start(&yaml, pki.dir.path()).await;
    OneListener {
        pki,
        cert,
        backend,
        proxy,
    }
}

/// What a fake backend received, per connection.
#[derive(Clone, Default)]
pub struct Recorder(pub Arc<Mutex<Vec<Vec<u8>>>>);

impl Recorder {
    pub fn connections(&self) -> Vec<Vec<u8>> {
        self.0.lock().unwrap().clone()
    }
    pub fn all(&self) -> Vec<u8> {
        self.connections().concat()
    }
    pub fn all_text(&self) -> String {
        String::from_utf8_lossy(&self.all()).into_owned()
    }
    fn new_connection(&self) -> usize {
        let mut v = self.0.lock().unwrap();
        v.push(Vec::new());
        v.len() - 1
    }
    fn append(&self, index: usize, bytes: &[u8]) {
        self.0.lock().unwrap()[index].extend_from_slice(bytes);
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
        let recorder = Recorder::default();
        let proxy_headers = Recorder::default();
        let r = recorder.clone();
        let headers = proxy_headers.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let index = r.new_connection();
                let r = r.clone();
                let options = options.clone();
                let headers = headers.clone();
                tokio::spawn(async move {
                    if options.expect_proxy_v2 {
                        // Like Postfix/Dovecot: the header must come first, whole, before we
                        // greet; anything else and the connection is dropped.
                        match tokio::time::timeout(TIMEOUT, read_proxy_v2(&mut stream)).await {
                            Ok(Ok(header)) => {
                                let i = headers.new_connection();
                                headers.append(i, &header);
                            }
                            _ => return,
                        }
                    }
                    let stream = RecordingStream {
                        inner: stream,
                        recorder: r,
                        index,
                    };
                    let _ = match kind {
                        FakeKind::Smtp => fake_smtp(stream, &options).await,
                        FakeKind::Imap => fake_imap(stream, &options).await,
                        FakeKind::Pop3 => fake_pop3(stream, &options).await,
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

/// A small but honest SMTP server: EHLO, AUTH PLAIN/LOGIN, MAIL, RCPT, DATA, BDAT, RSET, NOOP,
/// QUIT. Message content is discarded (the recorder keeps it).
async fn fake_smtp(stream: RecordingStream, options: &FakeOptions) -> std::io::Result<()> {
    let mut stream = BufReader::new(stream);
    stream
        .get_mut()
        .write_all(options.smtp_greeting.as_bytes())
        .await?;
    if !options.smtp_greeting.starts_with("220") {
        return Ok(());
    }
    let mut line = Vec::new();
    loop {
        line.clear();
        if stream.read_until(b'\n', &mut line).await? == 0 {
            return Ok(());
        }
        let text = String::from_utf8_lossy(&line).trim_end().to_string();
        let upper = text.to_ascii_uppercase();
        let pipelining = options.ehlo_extensions.iter().any(|e| e == "PIPELINING");
        let group_end = !["MAIL", "RCPT", "RSET", "BDAT"]
            .iter()
            .any(|v| upper.starts_with(v));
        if options.strict_sync
            && (group_end || (!pipelining && !upper.starts_with("BDAT")))
            && sent_too_early(&mut stream).await
        {
            return desync(&mut stream).await;
        }
        if let Some(verb) = &options.smtp_421_on
            && upper.starts_with(verb.as_str())
        {
            let mut stream = stream.into_inner();
            stream
                .write_all(b"421 4.3.0 backend.test going down\r\n")
                .await?;
            return stream.shutdown().await;
        }
        let reply: String = if upper.starts_with("EHLO") {
            let mut r = String::from("250-backend.test\r\n");
            for (i, ext) in options.ehlo_extensions.iter().enumerate() {
                let sep = if i + 1 == options.ehlo_extensions.len() {
                    ' '
                } else {
                    '-'
                };
                r.push_str(&format!("250{sep}{ext}\r\n"));
            }
            if options.ehlo_extensions.is_empty() {
                r = "250 backend.test\r\n".into();
            }
            r
        } else if upper.starts_with("HELO") {
            "250 backend.test\r\n".into()
        } else if upper.starts_with("AUTH PLAIN ") {
            auth_plain_reply(&text["AUTH PLAIN ".len()..], &options.password)
        } else if upper == "AUTH PLAIN" {
            stream.get_mut().write_all(b"334 \r\n").await?;
            line.clear();
            stream.read_until(b'\n', &mut line).await?;
            let resp = String::from_utf8_lossy(&line).trim_end().to_string();
            if resp == "*" {
                "501 5.0.0 Authentication aborted\r\n".into()
            } else {
                auth_plain_reply(&resp, &options.password)
            }
        } else if upper.starts_with("MAIL FROM")
            || upper.starts_with("RCPT TO")
            || upper.starts_with("RSET")
            || upper.starts_with("NOOP")
        {
            "250 2.0.0 OK\r\n".into()
        } else if upper == "DATA" && options.refuse_data {
            "554 5.5.1 Error: no valid recipients\r\n".into()
        } else if upper == "DATA" {
            stream
                .get_mut()
                .write_all(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                .await?;
            if options.die_in_data {
                line.clear();
                stream.read_until(b'\n', &mut line).await?;
                return Ok(());
            }
            // Read content until a line that is exactly ".\r\n".
            let mut size = 0usize;
            loop {
                line.clear();
                if stream.read_until(b'\n', &mut line).await? == 0 {
                    return Ok(());
                }
                if line == b".\r\n" {
                    break;
                }
                size += line.len();
            }
            if options.strict_sync && sent_too_early(&mut stream).await {
                return desync(&mut stream).await;
            }
            format!("250 2.0.0 Ok: queued as FAKE{size}\r\n")
        } else if upper.starts_with("BDAT ") {
            let mut parts = upper.split_whitespace().skip(1);
            let size: usize = parts.next().and_then(|s| s.parse().ok()).unwrap_or(0);
            let last = parts.next() == Some("LAST");
            let mut chunk = vec![0u8; size];
            stream.read_exact(&mut chunk).await?;
            if options.strict_sync && !pipelining && sent_too_early(&mut stream).await {
                return desync(&mut stream).await;
            }
            if last {
                format!("250 2.0.0 Ok: queued as BDAT{size}\r\n")
            } else {
                format!("250 2.0.0 {size} octets received\r\n")
            }
        } else if upper.starts_with("QUIT") {
            stream.get_mut().write_all(b"221 2.0.0 Bye\r\n").await?;
            return Ok(());
        } else if upper.starts_with("STARTTLS") {
            "454 4.7.0 TLS not available on the backend\r\n".into()
        } else {
            "502 5.5.2 Error: command not recognized\r\n".into()
        };
        stream.get_mut().write_all(reply.as_bytes()).await?;
    }
}

/// Whether the client sent more before this reply was written (waits briefly to see).
async fn sent_too_early(stream: &mut BufReader<RecordingStream>) -> bool {
    if !stream.buffer().is_empty() {
        return true;
    }
    matches!(
        tokio::time::timeout(Duration::from_millis(30), stream.fill_buf()).await,
        Ok(Ok(buf)) if !buf.is_empty()
    )
}

async fn desync(stream: &mut BufReader<RecordingStream>) -> std::io::Result<()> {
    stream
        .get_mut()
        .write_all(b"554 5.5.0 Error: SMTP protocol synchronization\r\n")
        .await?;
    stream.get_mut().shutdown().await
}

fn auth_plain_reply(b64: &str, password: &str) -> String {
    let decoded = base64_decode(b64).unwrap_or_default();
    let parts: Vec<&[u8]> = decoded.split(|&b| b == 0).collect();
    if parts.len() == 3 && parts[2] == password.as_bytes() {
        "235 2.7.0 Authentication successful\r\n".into()
    } else {
        "535 5.7.8 Authentication failed\r\n".into()
    }
}

pub fn base64_encode(input: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        out.push(T[(n >> 18) as usize & 63] as char);
        out.push(T[(n >> 12) as usize & 63] as char);
        out.push(if chunk.len() > 1 {
            T[(n >> 6) as usize & 63] as char
        } else {
            '='
        });
        out.push(if chunk.len() > 2 {
            T[n as usize & 63] as char
        } else {
            '='
        });
    }
    out
}

pub fn base64_decode(input: &str) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut acc = 0u32;
    let mut bits = 0;
    for c in input.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' => break,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
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

/// A small IMAP server: greeting, CAPABILITY, ID, LOGIN (quoted, atom or literal password),
/// AUTHENTICATE PLAIN (SASL-IR or continuation), LIST, SELECT/EXAMINE, FETCH 1, LOGOUT;
/// anything else gets a tagged OK.
async fn fake_imap(stream: RecordingStream, options: &FakeOptions) -> std::io::Result<()> {
    let mut stream = BufReader::new(stream);
    let caps = &options.imap_capabilities;
    let greeting = if options.imap_preauth {
        "* PREAUTH fake IMAP ready, logged in as you\r\n".to_string()
    } else if options.imap_greeting_capabilities {
        format!("* OK [CAPABILITY {caps}] fake IMAP ready\r\n")
    } else {
        "* OK fake IMAP ready\r\n".to_string()
    };
    stream.get_mut().write_all(greeting.as_bytes()).await?;
    let mut line = Vec::new();
    loop {
        line.clear();
        if stream.read_until(b'\n', &mut line).await? == 0 {
            return Ok(());
        }
        // Absorb synchronising and non-synchronising literals.
        let mut full = line.clone();
        while let Some(n) = literal_len(&full) {
            if !full.ends_with(b"+}\r\n") {
                stream.get_mut().write_all(b"+ OK\r\n").await?;
            }
            let mut lit = vec![0u8; n];
            stream.read_exact(&mut lit).await?;
            full.extend_from_slice(&lit);
            let mut rest = Vec::new();
            stream.read_until(b'\n', &mut rest).await?;
            full.extend_from_slice(&rest);
        }
        let text = String::from_utf8_lossy(&full).trim_end().to_string();
        let mut words = text.splitn(3, ' ');
        let tag = words.next().unwrap_or("*").to_string();
        let cmd = words.next().unwrap_or("").to_ascii_uppercase();
        let args = words.next().unwrap_or("").to_string();
        let gated = if cmd == "LOGIN" || cmd == "AUTHENTICATE" {
            auth_gate(
                &mut stream,
                options,
                format!("{tag} NO early bytes arrived before this answer\r\n"),
            )
            .await?
        } else {
            None
        };
        let out = match cmd.as_str() {
            "CAPABILITY" => format!("* CAPABILITY {caps}\r\n{tag} OK CAPABILITY completed\r\n"),
            "ID" => format!("* ID (\"name\" \"fake\")\r\n{tag} OK ID completed\r\n"),
            "LOGIN" | "AUTHENTICATE" if gated.is_some() => gated.unwrap_or_default(),
            "LOGIN" => {
                if text.contains(&options.password) {
                    format!("{tag} OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n")
                } else {
                    format!("{tag} NO [AUTHENTICATIONFAILED] Authentication failed.\r\n")
                }
            }
            "AUTHENTICATE" => {
                let mut parts = args.split(' ');
                let _mech = parts.next();
                let ir = match parts.next() {
                    Some(ir) => ir.to_string(),
                    None => {
                        stream.get_mut().write_all(b"+ \r\n").await?;
                        let mut resp = Vec::new();
                        stream.read_until(b'\n', &mut resp).await?;
                        String::from_utf8_lossy(&resp).trim_end().to_string()
                    }
                };
                if ir == "*" {
                    format!("{tag} BAD Authentication aborted\r\n")
                } else if auth_plain_reply(&ir, &options.password).starts_with("235") {
                    format!("{tag} OK Logged in\r\n")
                } else {
                    format!("{tag} NO [AUTHENTICATIONFAILED] Authentication failed.\r\n")
                }
            }
            "LIST" => {
                format!("* LIST (\\HasNoChildren) \"/\" INBOX\r\n{tag} OK List completed\r\n")
            }
            "SELECT" | "EXAMINE" => format!(
                "* FLAGS (\\Seen)\r\n* 1 EXISTS\r\n* 0 RECENT\r\n* OK [UIDVALIDITY 1] UIDs valid\r\n* OK [UIDNEXT 2] next\r\n{tag} OK [READ-WRITE] Select completed\r\n"
            ),
            "FETCH" | "UID" => {
                let body = "Subject: hi\r\n\r\nhello imap\r\n";
                format!(
                    "* 1 FETCH (UID 1 BODY[] {{{}}}\r\n{})\r\n{tag} OK Fetch completed\r\n",
                    body.len(),
                    body
                )
            }
            "LOGOUT" => {
                stream
                    .get_mut()
                    .write_all(
                        format!("* BYE Logging out\r\n{tag} OK Logout completed\r\n").as_bytes(),
                    )
                    .await?;
                return Ok(());
            }
            "STARTTLS" => format!("{tag} BAD TLS not available on the backend\r\n"),
            _ => format!("{tag} OK {cmd} completed\r\n"),
        };
        stream.get_mut().write_all(out.as_bytes()).await?;
    }
}

fn literal_len(line: &[u8]) -> Option<usize> {
    let text = std::str::from_utf8(line).ok()?;
    let text = text.strip_suffix("\r\n")?;
    let text = text.strip_suffix('}')?;
    let open = text.rfind('{')?;
    text[open + 1..].trim_end_matches(['+', '-']).parse().ok()
}

/// A small POP3 server: CAPA, USER/PASS, AUTH PLAIN, STAT, LIST, UIDL, RETR, QUIT.
async fn fake_pop3(stream: RecordingStream, options: &FakeOptions) -> std::io::Result<()> {
    let mut stream = BufReader::new(stream);
    stream
        .get_mut()
        .write_all(options.pop3_greeting.as_bytes())
        .await?;
    let mut line = Vec::new();
    let body = "Subject: hi\r\n\r\nhello pop3\r\n";
    loop {
        line.clear();
        if stream.read_until(b'\n', &mut line).await? == 0 {
            return Ok(());
        }
        let text = String::from_utf8_lossy(&line).trim_end().to_string();
        let upper = text.to_ascii_uppercase();
        let authenticating = ["PASS ", "APOP ", "AUTH "]
            .iter()
            .any(|k| upper.starts_with(k));
        let gated = if authenticating {
            auth_gate(
                &mut stream,
                options,
                "-ERR early bytes arrived before this answer\r\n".into(),
            )
            .await?
        } else {
            None
        };
        let out = if let Some(early) = gated {
            early
        } else if upper == "CAPA" {
            let mut r = String::from("+OK Capability list follows\r\n");
            for c in &options.pop3_capa {
                r.push_str(c);
                r.push_str("\r\n");
            }
            r.push_str(".\r\n");
            r
        } else if upper.starts_with("USER ") {
            "+OK\r\n".into()
        } else if upper.starts_with("PASS ") {
            if text[5..] == options.password {
                "+OK Logged in.\r\n".into()
            } else {
                "-ERR [AUTH] Authentication failed.\r\n".into()
            }
        } else if upper == "AUTH" {
            "+OK\r\nPLAIN\r\nEXTERNAL\r\n.\r\n".into()
        } else if upper.starts_with("APOP ") {
            "+OK Logged in.\r\n".into()
        } else if upper.starts_with("AUTH PLAIN") {
            let ir = if text.len() > "AUTH PLAIN ".len() {
                text["AUTH PLAIN ".len()..].to_string()
            } else {
                stream.get_mut().write_all(b"+ \r\n").await?;
                let mut resp = Vec::new();
                stream.read_until(b'\n', &mut resp).await?;
                String::from_utf8_lossy(&resp).trim_end().to_string()
            };
            if auth_plain_reply(&ir, &options.password).starts_with("235") {
                "+OK Logged in.\r\n".into()
            } else {
                "-ERR [AUTH] Authentication failed.\r\n".into()
            }
        } else if upper == "STAT" {
            format!("+OK 1 {}\r\n", body.len())
        } else if upper == "LIST" {
            format!("+OK 1 messages\r\n1 {}\r\n.\r\n", body.len())
        } else if upper == "UIDL" {
            "+OK\r\n1 uid1\r\n.\r\n".into()
        } else if upper.starts_with("RETR") {
            format!("+OK {} octets\r\n{}.\r\n", body.len(), body)
        } else if upper == "QUIT" {
            stream.get_mut().write_all(b"+OK Logging out.\r\n").await?;
            return Ok(());
        } else if upper == "STLS" {
            "-ERR TLS not available on the backend\r\n".into()
        } else {
            "-ERR Unknown command\r\n".into()
        };
        stream.get_mut().write_all(out.as_bytes()).await?;
    }
}

/// A rustls client config trusting the test CA, with the given versions and suites.
pub fn client_config(
    ca: &CertificateDer<'static>,
    versions: &[&'static rustls::SupportedProtocolVersion],
    suites: Option<Vec<rustls::SupportedCipherSuite>>,
) -> Arc<rustls::ClientConfig> {
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    if let Some(suites) = suites {
        provider.cipher_suites = suites;
    }
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// Connects with TLS to `addr`, sending `sni`.
pub async fn tls_connect(
    addr: SocketAddr,
    sni: &str,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(sni.to_string()).unwrap();
    tokio::time::timeout(TIMEOUT, TlsConnector::from(config).connect(name, tcp))
        .await
        .map_err(|_| std::io::Error::other("handshake timeout"))?
}

/// Upgrades an established plain stream to TLS (after STARTTLS).
pub async fn tls_upgrade<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    sni: &str,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<TlsStream<S>> {
    let name = ServerName::try_from(sni.to_string()).unwrap();
    tokio::time::timeout(TIMEOUT, TlsConnector::from(config).connect(name, stream))
        .await
        .map_err(|_| std::io::Error::other("handshake timeout"))?
}

/// Reads one CRLF-terminated line (bounded by the test timeout).
pub async fn read_line<S: AsyncRead + Unpin>(stream: &mut BufReader<S>) -> String {
    let mut line = Vec::new();
    tokio::time::timeout(TIMEOUT, stream.read_until(b'\n', &mut line))
        .await
        .expect("timed out reading a line")
        .unwrap();
    String::from_utf8_lossy(&line).into_owned()
}

/// Reads an SMTP reply, all lines of it.
pub async fn read_smtp_reply<S: AsyncRead + Unpin>(stream: &mut BufReader<S>) -> String {
    let mut all = String::new();
    loop {
        let line = read_line(stream).await;
        if line.is_empty() {
            return all;
        }
        all.push_str(&line);
        if line.len() < 4 || line.as_bytes()[3] == b' ' {
            return all;
        }
    }
}

/// Reads IMAP lines until one starts with `tag `.
pub async fn read_until_tag<S: AsyncRead + Unpin>(stream: &mut BufReader<S>, tag: &str) -> String {
    let mut all = String::new();
    loop {
        let line = read_line(stream).await;
        if line.is_empty() {
            return all;
        }
        all.push_str(&line);
        if line.starts_with(&format!("{tag} ")) {
            return all;
        }
    }
}

/// Waits until `check` holds, polling (for effects in another task).
pub async fn eventually(mut check: impl FnMut() -> bool) {
    for _ in 0..200 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("condition never became true");
}

pub fn have(program: &str) -> bool {
    std::process::Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}
