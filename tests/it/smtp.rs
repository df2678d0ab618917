//! SMTP submission through the proxy (465 implicit TLS, 587 STARTTLS) to a fake backend that
//! records every byte: the Received field, byte-exact content, the TLS gate, smuggling, and
//! real clients.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use base64::prelude::{BASE64_STANDARD, Engine as _};
use mailfront::testing::check_received_abnf;
use mailfront::tls::names::{cipher_suite_name, known_group_name};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const HOST: &str = "mx.example.test";
const HELO: &str = "client.example.org";

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A proxy with `submissions` (465, implicit) and `submission` (587, starttls) in front of one
/// fake SMTP backend.
struct Env {
    pki: Pki,
    backend: FakeBackend,
    proxy: Proxy,
    config: Arc<rustls::ClientConfig>,
}

async fn env_with(options: FakeOptions, listener_extra: &str, extra: &str) -> Env {
    let pki = Pki::new();
    let cert = pki.issue("mx", &[HOST], false);
    let backend = FakeBackend::start_with(FakeKind::Smtp, options).await;
    let yaml = config_yaml(
        &[&cert],
        &[
            listener_yaml("submissions", "smtp", "implicit", backend.addr),
            listener_yaml("submission", "smtp", "starttls", backend.addr) + listener_extra,
        ],
        extra,
    );
    let proxy = Proxy::start(&yaml, pki.dir.path()).await;
    let config = client_config(
        &pki.ca_der,
        &[&rustls::version::TLS13, &rustls::version::TLS12],
        None,
    );
    Env {
        pki,
        backend,
        proxy,
        config,
    }
}

async fn env() -> Env {
    env_with(FakeOptions::default(), "", "").await
}

/// One SMTP client connection, TLS or not, with what its TLS negotiated.
struct Client {
    io: BufReader<Box<dyn Io>>,
    cipher: Option<String>,
    group: Option<String>,
}

impl Client {
    fn tls<S: Io + 'static>(stream: tokio_rustls::client::TlsStream<S>) -> Client {
        let conn = stream.get_ref().1;
        let cipher = conn
            .negotiated_cipher_suite()
            .map(|s| cipher_suite_name(u16::from(s.suite())).into_owned());
        let group = conn
            .negotiated_key_exchange_group()
            .and_then(|g| known_group_name(u16::from(g.name())))
            .map(str::to_owned);
        Client {
            io: BufReader::new(Box::new(stream)),
            cipher,
            group,
        }
    }

    async fn send(&mut self, bytes: impl AsRef<[u8]>) {
        let io = self.io.get_mut();
        io.write_all(bytes.as_ref()).await.unwrap();
        io.flush().await.unwrap();
    }

    async fn reply(&mut self) -> String {
        read_smtp_reply(&mut self.io).await
    }

    async fn cmd(&mut self, line: &str) -> String {
        self.send(format!("{line}\r\n")).await;
        self.reply().await
    }

    /// Reads until the proxy closes; returns what came.
    async fn rest(&mut self) -> String {
        let mut all = Vec::new();
        let _ = tokio::time::timeout(TIMEOUT, self.io.read_to_end(&mut all)).await;
        String::from_utf8_lossy(&all).into_owned()
    }
}

/// 465: TLS, greeting checked, EHLO sent.
async fn implicit(env: &Env) -> Client {
    let tls = tls_connect(env.proxy.addr("submissions"), HOST, env.config.clone())
        .await
        .unwrap();
    let mut c = Client::tls(tls);
    let greeting = c.reply().await;
    assert_eq!(greeting, format!("220 {HOST} ESMTP\r\n"));
    let ehlo = c.cmd(&format!("EHLO {HELO}")).await;
    assert!(ehlo.starts_with(&format!("250-{HOST}")), "{ehlo}");
    c
}

/// 587 in cleartext: greeting read, nothing sent.
async fn plain(env: &Env) -> Client {
    let tcp = TcpStream::connect(env.proxy.addr("submission"))
        .await
        .unwrap();
    let mut c = Client {
        io: BufReader::new(Box::new(tcp)),
        cipher: None,
        group: None,
    };
    let greeting = c.reply().await;
    assert_eq!(greeting, format!("220 {HOST} ESMTP\r\n"));
    c
}

/// 587: EHLO, STARTTLS, handshake, EHLO again. Returns the client and both EHLO replies.
async fn starttls(env: &Env) -> (Client, String, String) {
    let tcp = TcpStream::connect(env.proxy.addr("submission"))
        .await
        .unwrap();
    let mut io = BufReader::new(tcp);
    assert_eq!(
        read_smtp_reply(&mut io).await,
        format!("220 {HOST} ESMTP\r\n")
    );
    io.get_mut()
        .write_all(format!("EHLO {HELO}\r\n").as_bytes())
        .await
        .unwrap();
    let before = read_smtp_reply(&mut io).await;
    io.get_mut().write_all(b"STARTTLS\r\n").await.unwrap();
    assert_eq!(
        read_smtp_reply(&mut io).await,
        "220 2.0.0 Ready to start TLS\r\n"
    );
    assert!(io.buffer().is_empty());
    let tls = tls_upgrade(io.into_inner(), HOST, env.config.clone())
        .await
        .unwrap();
    let mut c = Client::tls(tls);
    let after = c.cmd(&format!("EHLO {HELO}")).await;
    (c, before, after)
}

fn auth_plain(password: &str) -> String {
    format!(
        "AUTH PLAIN {}",
        BASE64_STANDARD.encode(format!("\0user\0{password}").as_bytes())
    )
}

/// What the backend received on one connection: command lines, and message contents (DATA up
/// to but not including the final `.CRLF`; BDAT chunks of one transaction concatenated).
#[derive(Debug, Default)]
struct Transcript {
    commands: Vec<String>,
    messages: Vec<Vec<u8>>,
    /// A BDAT chunk got fewer octets than it announced (the connection ended first).
    truncated: bool,
}

fn transcript(bytes: &[u8]) -> Transcript {
    let mut t = Transcript::default();
    let mut rest = bytes;
    let mut bdat = Vec::new();
    let next_line = |rest: &mut &[u8]| -> Option<Vec<u8>> {
        let end = rest.iter().position(|&b| b == b'\n')? + 1;
        let (line, tail) = rest.split_at(end);
        *rest = tail;
        Some(line.to_vec())
    };
    while let Some(line) = next_line(&mut rest) {
        let text = String::from_utf8_lossy(&line).trim_end().to_string();
        let upper = text.to_ascii_uppercase();
        t.commands.push(text.clone());
        if upper == "DATA" {
            let mut content = Vec::new();
            while let Some(l) = next_line(&mut rest) {
                if l == b".\r\n" {
                    break;
                }
                content.extend_from_slice(&l);
            }
            t.messages.push(content);
        } else if let Some(args) = upper.strip_prefix("BDAT ") {
            let mut words = args.split_whitespace();
            let n: usize = words.next().unwrap().parse().unwrap();
            t.truncated |= n > rest.len();
            let (chunk, tail) = rest.split_at(n.min(rest.len()));
            bdat.extend_from_slice(chunk);
            rest = tail;
            if words.next() == Some("LAST") {
                t.messages.push(std::mem::take(&mut bdat));
            }
        }
    }
    t
}

fn all_messages(backend: &FakeBackend) -> Vec<Vec<u8>> {
    backend
        .recorder
        .connections()
        .iter()
        .flat_map(|c| transcript(c).messages)
        .collect()
}

fn all_commands(backend: &FakeBackend) -> Vec<String> {
    backend
        .recorder
        .connections()
        .iter()
        .flat_map(|c| transcript(c).commands)
        .collect()
}

/// Splits a message the backend got into our Received field and the rest.
fn split_received(message: &[u8]) -> (String, Vec<u8>) {
    assert!(
        message.starts_with(b"Received: "),
        "{:?}",
        String::from_utf8_lossy(&message[..message.len().min(200)])
    );
    let mut end = 0;
    loop {
        let nl = message[end..].iter().position(|&b| b == b'\n').unwrap() + end + 1;
        end = nl;
        if !matches!(message.get(end), Some(b' ' | b'\t')) {
            break;
        }
    }
    (
        String::from_utf8(message[..end].to_vec()).unwrap(),
        message[end..].to_vec(),
    )
}

/// Checks the field against the RFC 8314 ABNF and against what the client negotiated.
fn check_field(field: &str, client: &Client, with: &str) {
    check_received_abnf(field).unwrap_or_else(|e| panic!("{e}\n{field}"));
    assert!(
        field.starts_with(&format!("Received: from {HELO} (unknown [127.0.0.1])")),
        "{field}"
    );
    assert!(
        field.contains(&format!("by {HOST} (mailfront) with {with} id ")),
        "{field}"
    );
    let cipher = client.cipher.as_deref().unwrap();
    let tls_clause = match &client.group {
        Some(group) => format!("\ttls {cipher} group {group};"),
        None => format!("\ttls {cipher};"),
    };
    assert!(field.contains(&tls_clause), "{field}");
    assert_eq!(field.matches("Received:").count(), 1);
}

fn metric(env: &Env, name: &str, listener: &str) -> u64 {
    let text = env.proxy.metrics.encode();
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter(|l| l.contains(&format!("listener=\"{listener}\"")))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum()
}

/// A body with headers, dot-stuffed lines (as sent on the wire) and 8-bit text.
fn tricky_body() -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(b"From: a@example.test\r\nTo: b@example.test\r\nSubject: test\r\n");
    body.extend_from_slice(b"TLS-Required: No\r\n\r\n");
    body.extend_from_slice(b"..a line that started with a dot\r\n");
    body.extend_from_slice(b"...\r\n");
    body.extend_from_slice(b"8-bit: gr\xc3\xbc\xc3\x9fe \xff\xfe\r\n");
    body.extend_from_slice(b"QUIT\r\nMAIL FROM:<x@y>\r\n");
    body.extend_from_slice(b"\r\nlast line\r\n");
    body
}

/// MAIL, RCPT, DATA, content, end; returns the final reply.
async fn send_message(c: &mut Client, body: &[u8]) -> String {
    assert!(c.cmd("MAIL FROM:<a@example.test>").await.starts_with("250"));
    assert!(c.cmd("RCPT TO:<b@example.test>").await.starts_with("250"));
    assert!(c.cmd("DATA").await.starts_with("354"));
    c.send(body).await;
    c.send(b".\r\n").await;
    c.reply().await
}

#[tokio::test]
async fn implicit_tls_message_gets_one_received_field_and_is_otherwise_byte_identical() {
    let env = env().await;
    let mut c = implicit(&env).await;
    assert!(c.cmd(&auth_plain("secret")).await.starts_with("235"));
    let body = tricky_body();
    let reply = send_message(&mut c, &body).await;
    assert!(reply.starts_with("250 2.0.0 Ok: queued"), "{reply}");
    assert!(c.cmd("QUIT").await.starts_with("221"));

    let messages = all_messages(&env.backend);
    assert_eq!(messages.len(), 1);
    let (field, rest) = split_received(&messages[0]);
    check_field(&field, &c, "ESMTPSA");
    assert!(field.contains("\tfor <b@example.test>\r\n"), "{field}");
    assert_eq!(rest, body, "content after the field is byte-identical");
    assert_eq!(
        metric(&env, "mailfront_received_fields_added_total", "submissions"),
        1
    );
    assert_eq!(
        metric(&env, "mailfront_messages_submitted_total", "submissions"),
        1
    );
}

#[tokio::test]
async fn starttls_message_gets_one_received_field_and_is_otherwise_byte_identical() {
    let env = env().await;
    let (mut c, _, _) = starttls(&env).await;
    let body = tricky_body();
    let reply = send_message(&mut c, &body).await;
    assert!(reply.starts_with("250 "), "{reply}");
    let messages = all_messages(&env.backend);
    assert_eq!(messages.len(), 1);
    let (field, rest) = split_received(&messages[0]);
    check_field(&field, &c, "ESMTPS");
    assert_eq!(rest, body);
    assert!(String::from_utf8_lossy(&rest).contains("TLS-Required: No\r\n"));
    assert_eq!(
        metric(&env, "mailfront_starttls_upgrades_total", "submission"),
        1
    );
}

#[tokio::test]
async fn twenty_megabyte_body_streams_through_unchanged() {
    let env = env().await;
    let mut c = implicit(&env).await;
    let line =
        b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789\xc3\xa9x\r\n";
    let mut body = b"Subject: big\r\n\r\n".to_vec();
    let mut i = 0;
    while body.len() < 20 * 1024 * 1024 {
        if i % 1000 == 0 {
            body.extend_from_slice(b"..dot-stuffed\r\n");
        }
        body.extend_from_slice(line);
        i += 1;
    }
    let started = tokio::time::Instant::now();
    let reply = send_message(&mut c, &body).await;
    assert!(reply.starts_with("250 "), "{reply}");
    let messages = all_messages(&env.backend);
    let (field, rest) = split_received(&messages[0]);
    check_field(&field, &c, "ESMTPS");
    assert!(rest == body, "20 MB body differs");
    eprintln!("20 MB through the proxy in {:?}", started.elapsed());
}

#[tokio::test]
async fn two_messages_in_one_session_each_get_exactly_one_field() {
    let env = env().await;
    let mut c = implicit(&env).await;
    let first = b"Subject: one\r\n\r\nfirst\r\n".to_vec();
    let second = b"Subject: two\r\n\r\n.\r\n".to_vec(); // ends with a (stuffed) dot line
    let second_wire = b"Subject: two\r\n\r\n..\r\n".to_vec();
    assert!(send_message(&mut c, &first).await.starts_with("250 "));
    assert!(c.cmd("RSET").await.starts_with("250"));
    assert!(send_message(&mut c, &second_wire).await.starts_with("250 "));
    let messages = all_messages(&env.backend);
    assert_eq!(messages.len(), 2);
    let (f1, r1) = split_received(&messages[0]);
    let (f2, r2) = split_received(&messages[1]);
    check_field(&f1, &c, "ESMTPS");
    check_field(&f2, &c, "ESMTPS");
    assert_ne!(f1, f2, "each message has its own id");
    assert_eq!(r1, first);
    assert_eq!(r2, second_wire);
    assert_ne!(r2, second);
    assert_eq!(
        metric(&env, "mailfront_messages_submitted_total", "submissions"),
        2
    );
}

#[tokio::test]
async fn pipelined_mail_rcpt_data_in_one_write_get_replies_in_order() {
    let env = env().await;
    let mut c = implicit(&env).await;
    c.send(
        "MAIL FROM:<a@example.test>\r\nRCPT TO:<b@example.test>\r\nXCLIENT ADDR=1.2.3.4\r\n\
         RCPT TO:<c@example.test>\r\nDATA\r\n",
    )
    .await;
    assert!(c.reply().await.starts_with("250"));
    assert!(c.reply().await.starts_with("250"));
    assert!(c.reply().await.starts_with("500 5.5.1"));
    assert!(c.reply().await.starts_with("250"));
    assert!(c.reply().await.starts_with("354"));
    // End of data and the next commands in one write (RFC 2920: the client may pipeline them).
    c.send("Subject: p\r\n\r\nbody\r\n.\r\nNOOP\r\nQUIT\r\n")
        .await;
    assert!(c.reply().await.starts_with("250 2.0.0 Ok: queued"));
    assert!(c.reply().await.starts_with("250"));
    assert!(c.reply().await.starts_with("221"));
    let messages = all_messages(&env.backend);
    let (field, rest) = split_received(&messages[0]);
    check_field(&field, &c, "ESMTPS");
    assert!(
        !field.contains("for <"),
        "two recipients: no for clause\n{field}"
    );
    assert_eq!(rest, b"Subject: p\r\n\r\nbody\r\n");
    assert!(!env.backend.recorder.all_text().contains("XCLIENT"));
}

#[tokio::test]
async fn bdat_chunks_carry_the_field_in_the_first_chunk_only() {
    let env = env().await;
    let mut c = implicit(&env).await;
    let ehlo = c.cmd(&format!("EHLO {HELO}")).await;
    assert!(ehlo.contains("CHUNKING"), "{ehlo}");
    c.send("MAIL FROM:<a@example.test>\r\nRCPT TO:<b@example.test>\r\n")
        .await;
    assert!(c.reply().await.starts_with("250"));
    assert!(c.reply().await.starts_with("250"));
    // Chunk content that looks like commands and an end of data stays content (RFC 3030 §2:
    // the count alone frames a chunk).
    let chunk1 = b"Subject: bdat\r\n\r\n.\r\nQUIT\r\n";
    let chunk2 = b"binary \x00\xff\r\n";
    c.send(format!("BDAT {}\r\n", chunk1.len())).await;
    c.send(chunk1).await;
    assert!(c.reply().await.starts_with("250"));
    // A chunk and the next BDAT in one write.
    let mut w = format!("BDAT {}\r\n", chunk2.len()).into_bytes();
    w.extend_from_slice(chunk2);
    w.extend_from_slice(b"BDAT 0 LAST\r\n");
    c.send(w).await;
    assert!(c.reply().await.starts_with("250"));
    let last = c.reply().await;
    assert!(last.starts_with("250 2.0.0 Ok: queued"), "{last}");

    // A second transaction: BDAT 0 LAST alone becomes BDAT h LAST with the field.
    assert!(c.cmd("MAIL FROM:<a@example.test>").await.starts_with("250"));
    assert!(c.cmd("RCPT TO:<b@example.test>").await.starts_with("250"));
    assert!(c.cmd("BDAT 0 LAST").await.starts_with("250"));

    let conns = env.backend.recorder.connections();
    let t = transcript(&conns[0]);
    let bdats: Vec<&String> = t
        .commands
        .iter()
        .filter(|c| c.starts_with("BDAT"))
        .collect();
    assert_eq!(bdats.len(), 4, "{bdats:?}");
    assert_eq!(t.messages.len(), 2);
    let (field, rest) = split_received(&t.messages[0]);
    check_field(&field, &c, "ESMTPS");
    assert_eq!(*bdats[0], format!("BDAT {}", chunk1.len() + field.len()));
    assert_eq!(*bdats[1], format!("BDAT {}", chunk2.len()));
    assert_eq!(*bdats[2], "BDAT 0 LAST");
    assert_eq!(rest, [&chunk1[..], &chunk2[..]].concat());
    let (field2, rest2) = split_received(&t.messages[1]);
    check_field(&field2, &c, "ESMTPS");
    assert_eq!(*bdats[3], format!("BDAT {} LAST", field2.len()));
    assert!(rest2.is_empty());
    assert_eq!(
        metric(&env, "mailfront_messages_submitted_total", "submissions"),
        2
    );
}

#[tokio::test]
async fn bdat_is_refused_and_its_chunk_dropped_when_the_backend_has_no_chunking() {
    let mut options = FakeOptions::default();
    options.ehlo_extensions.retain(|e| e != "CHUNKING");
    let env = env_with(options, "", "").await;
    let mut c = implicit(&env).await;
    let ehlo = c.cmd(&format!("EHLO {HELO}")).await;
    assert!(!ehlo.contains("CHUNKING"), "{ehlo}");
    assert!(c.cmd("MAIL FROM:<a@example.test>").await.starts_with("250"));
    c.send("BDAT 12 LAST\r\nQUIT\r\nQUIT\r\nNOOP\r\n").await;
    assert!(c.reply().await.starts_with("502 5.5.1"));
    assert!(
        c.reply().await.starts_with("250"),
        "the chunk was dropped, NOOP runs"
    );
    let commands = all_commands(&env.backend);
    assert!(
        !commands
            .iter()
            .any(|c| c.starts_with("BDAT") || c == "QUIT")
    );
}

#[tokio::test]
async fn commands_pipelined_after_starttls_are_discarded_never_executed() {
    let env = env().await;
    // One write: the AUTH after STARTTLS must never run (CERT VU#555316).
    let injected = format!(
        "STARTTLS\r\n{}\r\nMAIL FROM:<evil@x>\r\n",
        auth_plain("secret")
    );
    let tcp = TcpStream::connect(env.proxy.addr("submission"))
        .await
        .unwrap();
    let mut io = BufReader::new(tcp);
    read_smtp_reply(&mut io).await;
    io.get_mut()
        .write_all(format!("EHLO {HELO}\r\n").as_bytes())
        .await
        .unwrap();
    read_smtp_reply(&mut io).await;
    io.get_mut().write_all(injected.as_bytes()).await.unwrap();
    assert_eq!(
        read_smtp_reply(&mut io).await,
        "220 2.0.0 Ready to start TLS\r\n"
    );
    let tls = tls_upgrade(io.into_inner(), HOST, env.config.clone())
        .await
        .unwrap();
    let mut t = Client::tls(tls);
    let ehlo = t.cmd(&format!("EHLO {HELO}")).await;
    assert!(ehlo.contains("AUTH PLAIN"), "{ehlo}");
    let quit = t.cmd("QUIT").await;
    assert!(
        quit.starts_with("221"),
        "no 235 or other reply first: {quit}"
    );
    let all = env.backend.recorder.all_text();
    assert!(!all.contains("AUTH"), "{all}");
    assert!(!all.contains("evil"), "{all}");
    assert!(!all.contains("STARTTLS"), "{all}");
}

#[tokio::test]
async fn cleartext_auth_gets_530_whatever_the_credential_and_never_reaches_the_backend() {
    let env = env().await;
    let mut c = plain(&env).await;
    let ehlo = c.cmd(&format!("EHLO {HELO}")).await;
    let right = c.cmd(&auth_plain("secret")).await;
    let wrong = c.cmd(&auth_plain("wrong")).await;
    let login = c.cmd("AUTH LOGIN").await;
    let mut long = auth_plain("secret");
    long.push_str(&"A".repeat(20_000));
    let too_long = c.cmd(&long).await;
    assert_eq!(right, "530 5.7.0 Must issue a STARTTLS command first\r\n");
    assert_eq!(right, wrong);
    assert_eq!(right, login);
    assert_eq!(right, too_long);
    assert!(c.cmd("QUIT").await.starts_with("221"));
    assert!(
        ehlo.contains("STARTTLS") && !ehlo.contains("AUTH"),
        "{ehlo}"
    );
    let all = env.backend.recorder.all_text();
    assert!(!all.contains("AUTH"), "{all}");
    assert_eq!(
        metric(&env, "mailfront_cleartext_auth_refused_total", "submission"),
        4
    );
}

#[tokio::test]
async fn mail_before_tls_is_refused_with_530_and_never_forwarded() {
    let env = env().await;
    let mut c = plain(&env).await;
    c.cmd(&format!("EHLO {HELO}")).await;
    assert_eq!(
        c.cmd("MAIL FROM:<a@example.test>").await,
        "530 5.7.0 Must issue a STARTTLS command first\r\n"
    );
    assert_eq!(
        c.cmd("MAIL FROM:<a@example.test> REQUIRETLS").await,
        "530 5.7.0 Must issue a STARTTLS command first\r\n"
    );
    assert!(
        c.cmd("RCPT TO:<b@example.test>")
            .await
            .starts_with("530 5.7.0")
    );
    assert!(c.cmd("NOOP").await.starts_with("250"));
    let all = env.backend.recorder.all_text();
    assert!(!all.contains("MAIL") && !all.contains("RCPT"), "{all}");
}

#[tokio::test]
async fn requiretls_mail_before_tls_is_refused_even_when_mail_is_allowed_in_cleartext() {
    let mut options = FakeOptions::default();
    options.ehlo_extensions.push("REQUIRETLS".into());
    let env = env_with(options, "    require_tls_for_mail: false\n", "").await;
    let mut c = plain(&env).await;
    let ehlo = c.cmd(&format!("EHLO {HELO}")).await;
    assert!(!ehlo.contains("REQUIRETLS"), "{ehlo}");
    assert_eq!(
        c.cmd("MAIL FROM:<a@example.test> REQUIRETLS").await,
        "555 5.5.4 Unsupported option: REQUIRETLS\r\n"
    );
    // Cleartext mail is allowed here, and gets no Received field (not received over TLS).
    let body = b"Subject: clear\r\n\r\nhi\r\n";
    assert!(send_message(&mut c, body).await.starts_with("250 "));
    let all = env.backend.recorder.all_text();
    assert!(!all.contains("REQUIRETLS"), "{all}");
    assert_eq!(all_messages(&env.backend), vec![body.to_vec()]);
}

#[tokio::test]
async fn requiretls_after_tls_is_offered_and_forwarded_only_when_the_backend_offers_it() {
    // Backend without REQUIRETLS: removed from EHLO, MAIL gets 555 and is not forwarded.
    let env = env().await;
    let (mut c, _, after) = starttls(&env).await;
    assert!(!after.contains("REQUIRETLS"), "{after}");
    assert_eq!(
        c.cmd("MAIL FROM:<a@example.test> REQUIRETLS").await,
        "555 5.5.4 Unsupported option: REQUIRETLS\r\n"
    );
    assert!(!env.backend.recorder.all_text().contains("REQUIRETLS"));

    // Backend with REQUIRETLS: offered after TLS, forwarded.
    let mut options = FakeOptions::default();
    options.ehlo_extensions.push("REQUIRETLS".into());
    let env = env_with(options, "", "").await;
    let (mut c, before, after) = starttls(&env).await;
    assert!(!before.contains("REQUIRETLS"), "{before}");
    assert!(
        after.contains("250 REQUIRETLS") || after.contains("250-REQUIRETLS"),
        "{after}"
    );
    assert!(
        c.cmd("MAIL FROM:<a@example.test> REQUIRETLS")
            .await
            .starts_with("250")
    );
    assert!(
        env.backend
            .recorder
            .all_text()
            .contains("MAIL FROM:<a@example.test> REQUIRETLS\r\n")
    );
}

#[tokio::test]
async fn ehlo_offers_starttls_and_no_auth_before_tls_and_auth_without_starttls_after() {
    let env = env().await;
    let (mut c, before, after) = starttls(&env).await;
    assert!(before.starts_with(&format!("250-{HOST}")), "{before}");
    assert!(before.contains("STARTTLS"), "{before}");
    assert!(!before.contains("AUTH"), "{before}");
    assert!(!before.contains("XCLIENT"), "{before}");
    assert!(after.contains("AUTH PLAIN LOGIN"), "{after}");
    assert!(!after.contains("STARTTLS"), "{after}");
    assert!(!after.contains("XCLIENT"), "{after}");
    assert!(!after.contains("backend.test"), "{after}");
    assert!(c.cmd("STARTTLS").await.starts_with("554 5.5.1"));
    // On 465 STARTTLS is neither offered nor accepted.
    let mut i = implicit(&env).await;
    let ehlo = i.cmd(&format!("EHLO {HELO}")).await;
    assert!(
        !ehlo.contains("STARTTLS") && ehlo.contains("AUTH"),
        "{ehlo}"
    );
    assert!(i.cmd("STARTTLS").await.starts_with("554 5.5.1"));
    assert!(i.cmd("HELO x").await == format!("250 {HOST}\r\n"));
    assert!(!env.backend.recorder.all_text().contains("STARTTLS"));
}

#[tokio::test]
async fn mail_after_starttls_without_a_new_ehlo_is_refused_and_not_forwarded() {
    let env = env().await;
    let tcp = TcpStream::connect(env.proxy.addr("submission"))
        .await
        .unwrap();
    let mut io = BufReader::new(tcp);
    read_smtp_reply(&mut io).await;
    io.get_mut()
        .write_all(b"EHLO a\r\nSTARTTLS\r\n")
        .await
        .unwrap();
    read_smtp_reply(&mut io).await;
    read_smtp_reply(&mut io).await;
    let tls = tls_upgrade(io.into_inner(), HOST, env.config.clone())
        .await
        .unwrap();
    let mut c = Client::tls(tls);
    assert!(c.cmd("MAIL FROM:<a@b>").await.starts_with("503 5.5.1"));
    assert!(!env.backend.recorder.all_text().contains("MAIL"));
}

#[tokio::test]
async fn xclient_and_xforward_from_a_client_are_refused_and_never_forwarded() {
    let env = env().await;
    let mut c = plain(&env).await;
    assert!(c.cmd("XCLIENT LOGIN=victim").await.starts_with("500 5.5.1"));
    let mut c = implicit(&env).await;
    assert!(c.cmd("XCLIENT ADDR=1.2.3.4").await.starts_with("500 5.5.1"));
    assert!(c.cmd(&auth_plain("secret")).await.starts_with("235"));
    assert!(c.cmd("xclient\tLOGIN=root").await.starts_with("500 5.5.1"));
    assert!(c.cmd("XFORWARD NAME=x").await.starts_with("500 5.5.1"));
    let all = env.backend.recorder.all_text().to_ascii_uppercase();
    assert!(
        !all.contains("XCLIENT") && !all.contains("XFORWARD"),
        "{all}"
    );
}

#[tokio::test]
async fn auth_after_tls_is_relayed_with_continuations_cancel_and_outcomes_counted() {
    let env = env().await;
    let mut c = implicit(&env).await;
    assert!(c.cmd(&auth_plain("wrong")).await.starts_with("535"));
    // Continuation, then `*` cancels; the backend's 501 is relayed.
    assert_eq!(c.cmd("AUTH PLAIN").await, "334 \r\n");
    assert!(c.cmd("*").await.starts_with("501"));
    // Continuation carrying a line that looks like a command: it is SASL data, not QUIT.
    assert_eq!(c.cmd("AUTH PLAIN").await, "334 \r\n");
    assert!(c.cmd("QUIT").await.starts_with("535"));
    assert_eq!(c.cmd("AUTH PLAIN").await, "334 \r\n");
    let response = BASE64_STANDARD.encode(b"\0user\0secret");
    assert!(c.cmd(&response).await.starts_with("235"));
    assert!(c.cmd(&auth_plain("secret")).await.starts_with("503 5.5.1"));
    let body = b"Subject: auth\r\n\r\nx\r\n";
    assert!(send_message(&mut c, body).await.starts_with("250 "));
    let (field, _) = split_received(&all_messages(&env.backend)[0]);
    check_field(&field, &c, "ESMTPSA");
    let text = env.proxy.metrics.encode();
    assert!(
        text.contains(r#"mailfront_auth_outcomes_total{listener="submissions",protocol="smtp",result="success"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(r#"mailfront_auth_outcomes_total{listener="submissions",protocol="smtp",result="failure"} 2"#),
        "{text}"
    );
}

#[tokio::test]
async fn bare_lf_smuggling_never_reaches_the_backend_as_a_command() {
    let env = env().await;
    let mut c = implicit(&env).await;
    assert!(c.cmd("MAIL FROM:<a@example.test>").await.starts_with("250"));
    assert!(c.cmd("RCPT TO:<b@example.test>").await.starts_with("250"));
    assert!(c.cmd("DATA").await.starts_with("354"));
    c.send(
        "Subject: smuggle\r\n\r\nhello\n.\nMAIL FROM:<smuggled@evil>\nRCPT TO:<victim@x>\nDATA\n\
         forged\n.\r\n",
    )
    .await;
    // The refused message ends at the real <CRLF>.<CRLF>... which the smuggled text lacks
    // until here:
    c.send("more\r\n.\r\n").await;
    assert_eq!(
        c.reply().await,
        "554 5.6.0 Message refused: bare CR or LF in message content\r\n"
    );
    let next = c.cmd("MAIL FROM:<a@example.test>").await;
    assert!(next.starts_with("421 "), "{next}");
    let all = env.backend.recorder.all_text();
    assert!(!all.contains("smuggled"), "{all}");
    assert!(!all.contains("\n.\n"), "{all}");
    let commands = all_commands(&env.backend);
    assert!(
        !commands
            .iter()
            .any(|c| c.contains("smuggled") || c.contains("victim")),
        "{commands:?}"
    );
    assert_eq!(
        metric(&env, "mailfront_messages_submitted_total", "submissions"),
        0
    );
}

#[tokio::test]
async fn refused_data_never_gets_our_field_sent_and_the_session_stays_in_step() {
    let options = FakeOptions {
        refuse_data: true,
        ..FakeOptions::default()
    };
    let env = env_with(options, "", "").await;
    let mut c = implicit(&env).await;
    assert!(c.cmd("MAIL FROM:<a@example.test>").await.starts_with("250"));
    assert!(c.cmd("RCPT TO:<b@example.test>").await.starts_with("250"));
    assert!(c.cmd("DATA").await.starts_with("554"));
    assert!(c.cmd("NOOP").await.starts_with("250"));
    let all = env.backend.recorder.all_text();
    assert!(!all.contains("Received:"), "{all}");
    assert!(all.ends_with("DATA\r\nNOOP\r\n"), "{all}");
    assert_eq!(
        metric(&env, "mailfront_received_fields_added_total", "submissions"),
        0
    );
}

#[tokio::test]
async fn backend_dying_mid_data_gives_the_client_421_never_250() {
    let options = FakeOptions {
        die_in_data: true,
        ..FakeOptions::default()
    };
    let env = env_with(options, "", "").await;
    let mut c = implicit(&env).await;
    assert!(c.cmd("MAIL FROM:<a@example.test>").await.starts_with("250"));
    assert!(c.cmd("RCPT TO:<b@example.test>").await.starts_with("250"));
    assert!(c.cmd("DATA").await.starts_with("354"));
    let mut body = Vec::new();
    for _ in 0..20_000 {
        body.extend_from_slice(b"some content line of a message being submitted\r\n");
    }
    c.send(&body).await;
    c.send(".\r\n").await;
    let reply = c.reply().await;
    assert!(reply.starts_with("421 4.4.1"), "{reply}");
    assert_eq!(
        metric(&env, "mailfront_messages_submitted_total", "submissions"),
        0
    );
}

#[tokio::test]
async fn over_long_command_line_gets_500_5_5_2_and_the_session_goes_on() {
    let env = env().await;
    let mut c = implicit(&env).await;
    // Logged in, so that a NOOP goes to the backend (before a login mailfront answers it).
    assert!(c.cmd(&auth_plain("secret")).await.starts_with("235"));
    let long = format!("NOOP {}\r\nNOOP\r\n", "x".repeat(5000));
    c.send(long).await;
    assert_eq!(c.reply().await, "500 5.5.2 Line too long\r\n");
    assert!(c.reply().await.starts_with("250"));
    let all = env.backend.recorder.all_text();
    assert!(all.ends_with("\r\nNOOP\r\n"), "the next line was: {all}");
    assert!(
        !all.contains("xxxx"),
        "nothing of the long line was forwarded"
    );
}

/// The greeting is mailfront's; a backend that refuses the session (its greeting is `554`)
/// refuses the listener's capability probe too, so nothing is learned and the session falls
/// back to connecting at the first command that needs the backend (EHLO, with nothing to
/// answer it from); that command gets the temporary failure `421 4.4.1`, never the backend's
/// text.
#[tokio::test]
async fn a_backend_refusing_at_greeting_gives_421_4_4_1_to_the_command_that_needed_it() {
    let options = FakeOptions {
        smtp_greeting: "554 5.3.2 backend.test busy\r\n".into(),
        ..FakeOptions::default()
    };
    let env = env_with(options, "", "").await;
    let tls = tls_connect(env.proxy.addr("submissions"), HOST, env.config.clone())
        .await
        .unwrap();
    let mut c = Client::tls(tls);
    assert_eq!(c.reply().await, format!("220 {HOST} ESMTP\r\n"));
    // Only the probe, which said nothing after the 554 (so the fake cannot tell it from a
    // session): no connection of the session's before a command needs one.
    let probe = env.backend.recorder.accepted_connections();
    assert_eq!(probe, vec![Vec::<u8>::new()]);
    let ehlo = c.cmd(&format!("EHLO {HELO}")).await;
    assert!(ehlo.starts_with(&format!("421 4.4.1 {HOST} ")), "{ehlo}");
    assert!(!ehlo.contains("backend.test"), "{ehlo}");
    assert_eq!(c.rest().await, "");
    assert_eq!(env.backend.recorder.accepted_connections().len(), 2);
}

/// Once the listener's probe learned the backend's EHLO (before its first session is served),
/// a TLS session that never authenticates costs the backend nothing: EHLO, NOOP, RSET and QUIT
/// are answered from what the backend's EHLO said, and only AUTH (or MAIL) connects, replaying
/// the client's EHLO first.
#[tokio::test]
async fn tls_sessions_that_never_authenticate_open_no_backend_connection() {
    let env = env().await;
    // The first session is answered from what the probe learned, like every later one.
    let mut first = implicit(&env).await;
    assert!(first.cmd("QUIT").await.starts_with("221"));
    assert_eq!(env.backend.recorder.probes(), 1);
    let learned = env.backend.recorder.connections().len();
    assert_eq!(learned, 0);
    for _ in 0..20 {
        let tls = tls_connect(env.proxy.addr("submissions"), HOST, env.config.clone())
            .await
            .unwrap();
        let mut c = Client::tls(tls);
        assert_eq!(c.reply().await, format!("220 {HOST} ESMTP\r\n"));
        let ehlo = c.cmd(&format!("EHLO {HELO}")).await;
        assert!(
            ehlo.contains("AUTH PLAIN") && ehlo.contains("PIPELINING"),
            "{ehlo}"
        );
        assert!(c.cmd("NOOP").await.starts_with("250"));
        assert!(c.cmd("QUIT").await.starts_with("221"));
    }
    assert_eq!(env.backend.recorder.connections().len(), learned);
    // AUTH connects; the backend sees the client's EHLO first, then the AUTH.
    let tls = tls_connect(env.proxy.addr("submissions"), HOST, env.config.clone())
        .await
        .unwrap();
    let mut c = Client::tls(tls);
    c.reply().await;
    c.cmd(&format!("EHLO {HELO}")).await;
    assert!(c.cmd(&auth_plain("secret")).await.starts_with("235"));
    assert!(c.cmd("QUIT").await.starts_with("221"));
    let conns = env.backend.recorder.connections();
    assert_eq!(conns.len(), learned + 1);
    let seen = String::from_utf8_lossy(&conns[learned]).into_owned();
    assert!(
        seen.starts_with(&format!("EHLO {HELO}\r\nAUTH PLAIN ")),
        "{seen}"
    );
    assert_eq!(env.backend.recorder.probes(), 1);
}

/// `timeouts.idle` from the config reaches the session: a short one ends a silent client with
/// 421 4.4.2 and the close (`rest` reads until then). The exact instant is
/// `drivers::timing::smtp_idle_client_gets_421_4_4_2_after_exactly_the_idle_timeout`'s.
#[tokio::test]
async fn idle_client_gets_421_4_4_2_and_is_closed() {
    let env = env_with(FakeOptions::default(), "", "timeouts:\n  idle: 300ms\n").await;
    let mut c = implicit(&env).await;
    let rest = c.rest().await;
    assert!(rest.starts_with("421 4.4.2 "), "{rest}");
}

/// The server's shutdown reaches sessions between transactions, on 465 and in the cleartext phase
/// of 587. A grace far longer than the test: the 421 must not wait for it (`rest` gives up
/// after `TIMEOUT`, well inside the grace); that it comes at once is
/// `drivers::timing::smtp_shutdown_sends_421_4_3_2_between_commands_at_once`.
#[tokio::test]
async fn shutdown_sends_421_4_3_2_between_commands() {
    let env = env_with(
        FakeOptions::default(),
        "",
        "timeouts:\n  shutdown_grace: 60s\n",
    )
    .await;
    let mut c = implicit(&env).await;
    // And one in the cleartext phase of 587, before STARTTLS (no backend at all).
    let tcp = TcpStream::connect(env.proxy.addr("submission"))
        .await
        .unwrap();
    let mut cleartext = BufReader::new(tcp);
    assert!(read_smtp_reply(&mut cleartext).await.starts_with("220 "));
    env.proxy.control.shutdown.cancel();
    let rest = c.rest().await;
    assert!(rest.starts_with("421 4.3.2 "), "{rest}");
    let mut rest = String::new();
    let _ = tokio::time::timeout(TIMEOUT, cleartext.read_to_string(&mut rest)).await;
    assert!(rest.starts_with("421 4.3.2 "), "{rest}");
}

/// `count` numbered content lines of about 100 octets: 100,000 of them make 10 MB.
fn numbered_lines(range: std::ops::Range<usize>) -> Vec<u8> {
    let mut body = Vec::with_capacity(range.len() * 100);
    for i in range {
        body.extend_from_slice(format!("line {i:08} {}\r\n", "x".repeat(85)).as_bytes());
    }
    body
}

const BIG_MESSAGE_LINES: usize = 100_000;

#[tokio::test]
async fn sigterm_during_a_10_mb_data_delivers_the_message_then_421() {
    // The grace is far longer than the test: the session ends on the verdict, not on it.
    let env = env_with(
        FakeOptions::default(),
        "",
        "timeouts:\n  shutdown_grace: 60s\n",
    )
    .await;
    let mut c = implicit(&env).await;
    assert!(c.cmd("MAIL FROM:<a@example.test>").await.starts_with("250"));
    assert!(c.cmd("RCPT TO:<b@example.test>").await.starts_with("250"));
    assert!(c.cmd("DATA").await.starts_with("354"));
    let half = BIG_MESSAGE_LINES / 2;
    c.send(numbered_lines(0..half)).await;
    let started = tokio::time::Instant::now();
    env.proxy.control.shutdown.cancel();
    // The drain has begun (the server turned readiness off) while the content still streams.
    eventually(|| env.proxy.metrics.encode().contains("mailfront_ready 0")).await;
    c.send(numbered_lines(half..BIG_MESSAGE_LINES)).await;
    // The end of data, and a pipelined command that must never run.
    c.send(".\r\nMAIL FROM:<after@example.test>\r\n").await;
    let verdict = c.reply().await;
    assert!(
        verdict.starts_with("250 2.0.0 Ok: queued as FAKE"),
        "{verdict}"
    );
    let rest = c.rest().await;
    assert!(rest.starts_with("421 4.3.2 "), "{rest}");
    assert_eq!(
        rest.matches("\r\n").count(),
        1,
        "one 421, then the close: {rest}"
    );
    assert!(started.elapsed() < Duration::from_secs(30));

    let seen = env.backend.recorder.all_text();
    let content = seen.find("line 00000000 ").unwrap();
    let body = String::from_utf8(numbered_lines(0..BIG_MESSAGE_LINES)).unwrap();
    assert_eq!(seen.get(content..content + body.len()), Some(body.as_str()));
    assert!(seen[content + body.len()..].starts_with(".\r\n"));
    assert!(
        !seen.contains("after@example.test"),
        "the pipelined MAIL never ran"
    );
    assert_eq!(
        metric(&env, "mailfront_messages_submitted_total", "submissions"),
        1
    );
}
/// A backend that takes a message as far as `reset_after` content octets, then resets the
/// connection (SO_LINGER 0: an RST, as when the process is killed and the kernel cleans up).
/// Its first connection is the listener's capability probe, which it answers like any other
/// and which ends with QUIT; the next one is the session's.
async fn backend_reset_mid_data(reset_after: usize) -> std::net::SocketAddr {
    use tokio::io::AsyncBufReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        // The probe's connection: its EHLO is answered with a 250, its QUIT ends it.
        let Ok((mut probe, _)) = listener.accept().await else {
            return;
        };
        probe.write_all(b"220 backend.test\r\n").await.unwrap();
        let mut probe = BufReader::new(probe);
        let mut line = Vec::new();
        while probe.read_until(b'\n', &mut line).await.unwrap_or(0) > 0 {
            let quit = line.eq_ignore_ascii_case(b"QUIT\r\n");
            let reply: &[u8] = if quit { b"221 bye\r\n" } else { b"250 ok\r\n" };
            probe.get_mut().write_all(reply).await.unwrap();
            if quit {
                break;
            }
            line.clear();
        }
        drop(probe);
        let Ok((stream, _)) = listener.accept().await else {
            return;
        };
        let mut stream = BufReader::new(stream);
        stream
            .get_mut()
            .write_all(b"220 backend.test\r\n")
            .await
            .unwrap();
        let mut line = Vec::new();
        loop {
            line.clear();
            if stream.read_until(b'\n', &mut line).await.unwrap_or(0) == 0 {
                return;
            }
            let reply: &[u8] = if line.eq_ignore_ascii_case(b"DATA\r\n") {
                b"354 go ahead\r\n"
            } else {
                b"250 ok\r\n"
            };
            stream.get_mut().write_all(reply).await.unwrap();
            if reply.starts_with(b"354") {
                break;
            }
        }
        let mut taken = 0;
        let mut chunk = vec![0u8; 64 * 1024];
        while taken < reset_after {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => taken += n,
            }
        }
        let stream = stream.into_inner();
        #[allow(deprecated)]
        let _ = stream.set_linger(Some(Duration::ZERO));
        drop(stream);
    });
    addr
}

#[tokio::test]
async fn backend_killed_mid_data_never_gives_the_client_250() {
    let pki = Pki::new();
    let cert = pki.issue("mx", &[HOST], false);
    let backend = backend_reset_mid_data(1024 * 1024).await;
    let yaml = config_yaml(
        &[&cert],
        &[listener_yaml("submissions", "smtp", "implicit", backend)],
        "",
    );
    let proxy = Proxy::start(&yaml, pki.dir.path()).await;
    let config = client_config(&pki.ca_der, &[&rustls::version::TLS13], None);
    let tls = tls_connect(proxy.addr("submissions"), HOST, config)
        .await
        .unwrap();
    let mut c = Client::tls(tls);
    assert!(c.reply().await.starts_with("220 "));
    assert!(c.cmd(&format!("EHLO {HELO}")).await.starts_with("250"));
    assert!(c.cmd("MAIL FROM:<a@example.test>").await.starts_with("250"));
    assert!(c.cmd("RCPT TO:<b@example.test>").await.starts_with("250"));
    assert!(c.cmd("DATA").await.starts_with("354"));
    // The whole 10 MB goes out: the proxy consumes what the dead backend can no longer take.
    c.send(numbered_lines(0..BIG_MESSAGE_LINES)).await;
    c.send(".\r\n").await;
    let rest = c.rest().await;
    assert!(!rest.contains("250"), "{rest}");
    assert!(rest.starts_with("421 4."), "{rest}");
    assert_eq!(
        rest.matches("\r\n").count(),
        1,
        "one 421, then the close: {rest}"
    );
    let text = proxy.metrics.encode();
    let submitted: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("mailfront_messages_submitted_total{"))
        .collect();
    assert!(!submitted.is_empty(), "{text}");
    assert!(submitted.iter().all(|l| l.ends_with(" 0")), "{submitted:?}");
}

/// swaks, a real SMTP client, through 465 (implicit TLS) and 587 (STARTTLS) with AUTH PLAIN.
#[tokio::test]
async fn swaks_submits_through_465_and_587() {
    if !tool_or_skip("swaks_submits_through_465_and_587", "swaks") {
        return;
    }
    let env = env().await;
    for (listener, tls_flag) in [("submissions", "--tls-on-connect"), ("submission", "--tls")] {
        let port = env.proxy.addr(listener).port();
        let body = format!("swaks body via {listener}");
        let args: Vec<String> = [
            "--server",
            &format!("127.0.0.1:{port}"),
            tls_flag,
            "--ehlo",
            HELO,
            "--from",
            "a@example.test",
            "--to",
            "b@example.test",
            "--auth",
            "PLAIN",
            "--auth-user",
            "user",
            "--auth-password",
            "secret",
            "--body",
            &body,
            "--timeout",
            "10",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let out = tokio::task::spawn_blocking(move || {
            std::process::Command::new("swaks")
                .args(&args)
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{listener}: {text}");
        assert!(text.contains("235"), "{text}");
        assert!(!text.contains("XCLIENT"), "{text}");
    }
    let messages = all_messages(&env.backend);
    assert_eq!(messages.len(), 2);
    for (message, listener) in messages.iter().zip(["submissions", "submission"]) {
        let (field, rest) = split_received(message);
        check_received_abnf(&field).unwrap();
        assert!(field.contains(" with ESMTPSA id "), "{field}");
        assert!(String::from_utf8_lossy(&rest).contains(&format!("swaks body via {listener}")));
    }
}

/// curl: smtps:// on 465 and smtp:// with --ssl-reqd (STARTTLS) on 587.
#[tokio::test]
async fn curl_submits_through_465_and_587() {
    if !tool_or_skip("curl_submits_through_465_and_587", "curl") {
        return;
    }
    let env = env().await;
    let mail = env.pki.dir.path().join("mail.eml");
    std::fs::write(
        &mail,
        "Subject: curl\r\n\r\n.leading dot\r\nbody via curl\r\n",
    )
    .unwrap();
    for (listener, scheme, extra) in [
        ("submissions", "smtps", None),
        ("submission", "smtp", Some("--ssl-reqd")),
    ] {
        let port = env.proxy.addr(listener).port();
        let mut args: Vec<String> = vec![
            "-sS".into(),
            "--max-time".into(),
            "10".into(),
            "--cacert".into(),
            env.pki.ca_path().display().to_string(),
            "--resolve".into(),
            format!("{HOST}:{port}:127.0.0.1"),
            "-u".into(),
            "user:secret".into(),
            "--mail-from".into(),
            "a@example.test".into(),
            "--mail-rcpt".into(),
            "b@example.test".into(),
            "-T".into(),
            mail.display().to_string(),
            format!("{scheme}://{HOST}:{port}/{HELO}"),
        ];
        if let Some(flag) = extra {
            args.insert(0, flag.into());
        }
        let out = tokio::task::spawn_blocking(move || {
            std::process::Command::new("curl")
                .args(&args)
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        assert!(
            out.status.success(),
            "{listener}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let messages = all_messages(&env.backend);
    assert_eq!(messages.len(), 2);
    for message in &messages {
        let (field, rest) = split_received(message);
        check_received_abnf(&field).unwrap();
        assert!(
            field.starts_with(&format!("Received: from {HELO} ")),
            "{field}"
        );
        // curl dot-stuffs the leading dot; the backend gets it stuffed, byte-exact.
        assert_eq!(
            rest,
            b"Subject: curl\r\n\r\n..leading dot\r\nbody via curl\r\n"
        );
    }
}

/// The whole session written one byte per write: framing does not depend on how reads fall,
/// including a CR and its LF in different reads inside the content.
#[tokio::test]
async fn a_session_written_one_byte_at_a_time_gives_the_same_result() {
    let env = env().await;
    let mut c = implicit(&env).await;
    let body = b"Subject: bytes\r\n\r\n..dot\r\nline\r\n";
    let mut session =
        b"MAIL FROM:<a@example.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n".to_vec();
    for byte in session.drain(..) {
        c.send([byte]).await;
    }
    assert!(c.reply().await.starts_with("250"));
    assert!(c.reply().await.starts_with("250"));
    assert!(c.reply().await.starts_with("354"));
    for &byte in body.iter().chain(b".\r\nQUIT\r\n") {
        c.send([byte]).await;
    }
    assert!(c.reply().await.starts_with("250 2.0.0 Ok: queued"));
    assert!(c.reply().await.starts_with("221"));
    let (field, rest) = split_received(&all_messages(&env.backend)[0]);
    check_field(&field, &c, "ESMTPS");
    assert_eq!(rest, body);
}

// ---- Edge cases: Received field, STARTTLS, AUTH limits, pipelining, backend 421, QUIT ----

/// Reads until the proxy ends the connection; `Ok` only for a clean end (close_notify on TLS).
async fn read_to_close(c: &mut Client) -> std::io::Result<Vec<u8>> {
    let mut all = Vec::new();
    tokio::time::timeout(TIMEOUT, c.io.read_to_end(&mut all))
        .await
        .expect("the proxy closes the connection")?;
    Ok(all)
}

/// An empty message and one whose first line starts with a dot each get
/// exactly one field on top; after HELO it says `with SMTP`; the pre-TLS EHLO name is gone.
#[tokio::test]
async fn empty_and_leading_dot_messages_get_one_field_and_the_pre_tls_ehlo_name_never_appears() {
    let env = env().await;
    let tcp = TcpStream::connect(env.proxy.addr("submission"))
        .await
        .unwrap();
    let mut io = BufReader::new(tcp);
    read_smtp_reply(&mut io).await;
    io.get_mut()
        .write_all(b"EHLO pre-tls.example\r\nSTARTTLS\r\n")
        .await
        .unwrap();
    assert!(read_smtp_reply(&mut io).await.starts_with("250"));
    assert!(read_smtp_reply(&mut io).await.starts_with("220"));
    let tls = tls_upgrade(io.into_inner(), HOST, env.config.clone())
        .await
        .unwrap();
    let mut c = Client::tls(tls);
    assert_eq!(
        c.cmd(&format!("HELO {HELO}")).await,
        format!("250 {HOST}\r\n")
    );
    // An empty message: DATA then the end at once.
    assert!(send_message(&mut c, b"").await.starts_with("250 "));
    // The first content line starts with a (stuffed) dot.
    let dotted = b"..first line\r\nSubject: x\r\n".to_vec();
    assert!(send_message(&mut c, &dotted).await.starts_with("250 "));
    let messages = all_messages(&env.backend);
    assert_eq!(messages.len(), 2);
    let (f1, r1) = split_received(&messages[0]);
    let (f2, r2) = split_received(&messages[1]);
    for field in [&f1, &f2] {
        check_field(field, &c, "SMTP");
        assert!(!field.contains("pre-tls"), "{field}");
    }
    assert!(r1.is_empty());
    assert_eq!(r2, dotted);
}

/// `STARTTLS foo` gets 501 (RFC 3207 §4: STARTTLS takes no parameters) and nothing changes: still cleartext, still gated.
#[tokio::test]
async fn starttls_with_a_parameter_gets_501_and_the_session_stays_cleartext() {
    let env = env().await;
    let mut c = plain(&env).await;
    c.cmd(&format!("EHLO {HELO}")).await;
    assert_eq!(
        c.cmd("STARTTLS foo").await,
        "501 5.5.4 Syntax: STARTTLS\r\n"
    );
    assert!(c.cmd("MAIL FROM:<a@b>").await.starts_with("530 5.7.0"));
    assert!(c.cmd("QUIT").await.starts_with("221"));
    let all = env.backend.recorder.all_text();
    assert!(!all.contains("STARTTLS") && !all.contains("MAIL"), "{all}");
}

/// A failed handshake after STARTTLS (also with bytes sent after the 220) closes the connection;
/// the cleartext that broke it never runs and nothing reaches the backend.
#[tokio::test]
async fn a_failed_handshake_after_starttls_closes_and_nothing_runs_in_cleartext() {
    let env = env().await;
    let tcp = TcpStream::connect(env.proxy.addr("submission"))
        .await
        .unwrap();
    let mut io = BufReader::new(tcp);
    read_smtp_reply(&mut io).await;
    io.get_mut()
        .write_all(format!("EHLO {HELO}\r\n").as_bytes())
        .await
        .unwrap();
    read_smtp_reply(&mut io).await;
    io.get_mut().write_all(b"STARTTLS\r\n").await.unwrap();
    assert!(read_smtp_reply(&mut io).await.starts_with("220 2.0.0"));
    io.get_mut()
        .write_all(b"MAIL FROM:<evil@x>\r\nRCPT TO:<victim@y>\r\nDATA\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(TIMEOUT, io.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "the proxy closed the connection");
    let text = String::from_utf8_lossy(&rest);
    assert!(!text.contains("250") && !text.contains("354"), "{text}");
    let all = env.backend.recorder.all_text();
    assert!(!all.contains("evil") && !all.contains("MAIL"), "{all}");
}

/// A 10 000-octet initial response reaches the backend whole, but not on the AUTH line
/// (RFC 4954 §4: a client MUST NOT send an initial response that makes the command line too
/// long): mailfront sends `AUTH PLAIN`, answers the backend's empty 334 with the response, and
/// the client never sees that 334. An AUTH line or a SASL response over 12288 octets gets
/// `500 5.5.6`, nothing of it is forwarded, and the session goes on in step (the backend's
/// exchange is cancelled with `*`, its 501 swallowed).
#[tokio::test]
async fn a_10000_octet_initial_response_follows_an_empty_challenge_and_longer_auth_lines_get_500_5_5_6()
 {
    let env = env().await;
    let mut c = implicit(&env).await;
    let ir = BASE64_STANDARD.encode(format!("{}\0user\0secret", "z".repeat(7_000)));
    assert!(ir.len() > 9_000);
    let reply = c.cmd(&format!("AUTH plain {ir}")).await;
    assert!(
        reply.starts_with("235"),
        "the backend's own answer: {reply}"
    );
    let all = env.backend.recorder.all_text();
    assert!(all.contains(&format!("AUTH PLAIN\r\n{ir}\r\n")), "{all}");
    assert!(!all.contains(&format!("AUTH PLAIN {ir}")));
    let env = self::env().await;
    let mut c = implicit(&env).await;
    // A mechanism the backend does not know: its refusal answers the client's AUTH.
    let reply = c.cmd(&format!("AUTH XOAUTH2 {}", "A".repeat(10_000))).await;
    assert!(reply.starts_with("502"), "{reply}");
    assert!(c.cmd("NOOP").await.starts_with("250"), "still in step");
    let long = "B".repeat(13_000);
    assert_eq!(
        c.cmd(&format!("AUTH XOAUTH2 {long}")).await,
        "500 5.5.6 Authentication Exchange line is too long\r\n"
    );
    assert_eq!(c.cmd("AUTH PLAIN").await, "334 \r\n");
    assert_eq!(
        c.cmd(&"C".repeat(13_000)).await,
        "500 5.5.6 Authentication Exchange line is too long\r\n"
    );
    assert!(c.cmd("NOOP").await.starts_with("250"), "still in step");
    assert!(c.cmd(&auth_plain("secret")).await.starts_with("235"));
    let all = env.backend.recorder.all_text();
    assert!(!all.contains("BBBB") && !all.contains("CCCC"), "{all}");
}

/// A backend that closes on any command sent before its reply to a group-ending
/// command (Postfix `smtpd_forbid_unauth_pipelining`), with and without PIPELINING, never
/// sees mailfront pipeline what the client pipelined.
#[tokio::test]
async fn nothing_reaches_the_backend_before_the_reply_it_must_wait_for() {
    for pipelining in [true, false] {
        let mut options = FakeOptions {
            strict_sync: true,
            ..FakeOptions::default()
        };
        if !pipelining {
            options.ehlo_extensions.retain(|e| e != "PIPELINING");
        }
        let env = env_with(options, "", "").await;
        let mut c = implicit(&env).await;
        c.send(format!(
            "EHLO {HELO}\r\nNOOP\r\nMAIL FROM:<a@example.test>\r\nRCPT TO:<b@example.test>\r\n\
             RCPT TO:<c@example.test>\r\nDATA\r\nSubject: s\r\n\r\nbody\r\n.\r\nNOOP\r\nRSET\r\n\
             MAIL FROM:<a@example.test>\r\nRCPT TO:<b@example.test>\r\nBDAT 3\r\nabcBDAT 2 LAST\r\n\
             xyVRFY x\r\nQUIT\r\n"
        ))
        .await;
        let mut replies = Vec::new();
        for _ in 0..15 {
            replies.push(c.reply().await);
        }
        assert!(
            replies.iter().all(|r| !r.starts_with("554")),
            "pipelining={pipelining}: {replies:?}"
        );
        assert!(
            replies[6].starts_with("250 2.0.0 Ok: queued"),
            "{replies:?}"
        );
        assert!(
            replies[12].starts_with("250 2.0.0 Ok: queued"),
            "{replies:?}"
        );
        assert!(replies[14].starts_with("221"), "{replies:?}");
        assert_eq!(all_messages(&env.backend).len(), 2);
    }
}

/// A backend 421 is relayed (RFC 5321 §3.8) and both connections are closed.
#[tokio::test]
async fn a_backend_421_is_relayed_and_both_sides_are_closed() {
    let options = FakeOptions {
        smtp_421_on: Some("NOOP".into()),
        ..FakeOptions::default()
    };
    let env = env_with(options, "", "").await;
    let mut c = implicit(&env).await;
    // Before a login NOOP is answered here: the login connects, then NOOP is the backend's.
    assert!(c.cmd(&auth_plain("secret")).await.starts_with("235"));
    c.send("NOOP\r\nRSET\r\n").await;
    assert_eq!(c.reply().await, "421 4.3.0 backend.test going down\r\n");
    let rest = read_to_close(&mut c).await.unwrap();
    assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));
    assert!(!env.backend.recorder.all_text().contains("RSET"));
}

/// House rule (no panic on input): a BDAT size past u64 is a syntax error, its "chunk" is then
/// read as commands (the backend never saw the BDAT either), and the session goes on.
#[tokio::test]
async fn a_bdat_size_past_u64_gets_501_and_the_session_goes_on() {
    let env = env().await;
    let mut c = implicit(&env).await;
    assert!(c.cmd("MAIL FROM:<a@example.test>").await.starts_with("250"));
    c.send("BDAT 18446744073709551616 LAST\r\nNOOP\r\nBDAT 99999999999999999999999999\r\n")
        .await;
    assert_eq!(c.reply().await, "501 5.5.4 Syntax: BDAT <size> [LAST]\r\n");
    assert!(c.reply().await.starts_with("250"));
    assert_eq!(c.reply().await, "501 5.5.4 Syntax: BDAT <size> [LAST]\r\n");
    assert!(c.cmd("QUIT").await.starts_with("221"));
    assert!(!env.backend.recorder.all_text().contains("BDAT"));
}

/// QUIT gets its 221, then close_notify before the connection ends (RFC 8314 §3.4):
/// rustls reports a TCP end without close_notify as an error.
#[tokio::test]
async fn quit_gets_221_then_close_notify_before_the_connection_ends() {
    let env = env().await;
    let mut c = implicit(&env).await;
    assert!(c.cmd("QUIT").await.starts_with("221"));
    let rest = read_to_close(&mut c).await.expect("clean TLS close");
    assert!(rest.is_empty());
}

/// Pipelining (RFC 2920) at scale, and bounded memory: thousands of pipelined RCPTs (forwarded without
/// waiting) mixed with locally refused XCLIENTs get every reply, in order.
#[tokio::test]
async fn thousands_of_pipelined_commands_with_local_replies_mixed_in_get_every_reply_in_order() {
    let env = env().await;
    let c = implicit(&env).await;
    let (read, mut write) = tokio::io::split(c.io);
    let mut read = BufReader::new(read);
    const N: usize = 3000;
    let writer = tokio::spawn(async move {
        let mut batch = b"MAIL FROM:<a@example.test>\r\n".to_vec();
        for _ in 0..N {
            batch.extend_from_slice(b"RCPT TO:<b@example.test>\r\nXCLIENT ADDR=1.2.3.4\r\n");
        }
        batch.extend_from_slice(b"QUIT\r\n");
        write.write_all(&batch).await.unwrap();
        write.flush().await.unwrap();
        write
    });
    assert!(read_smtp_reply(&mut read).await.starts_with("250"));
    for i in 0..N {
        let rcpt = read_smtp_reply(&mut read).await;
        assert!(rcpt.starts_with("250"), "{i}: {rcpt}");
        let xclient = read_smtp_reply(&mut read).await;
        assert!(xclient.starts_with("500 5.5.1"), "{i}: {xclient}");
    }
    assert!(read_smtp_reply(&mut read).await.starts_with("221"));
    let _write = writer.await.unwrap();
    let all = env.backend.recorder.all_text();
    assert_eq!(all.matches("RCPT TO:").count(), N);
    assert!(!all.contains("XCLIENT"));
}
// ---- nothing before TLS reaches the backend; line endings are framing too ----

fn backend_connections(env: &Env) -> usize {
    env.backend.recorder.connections().len()
}

/// RFC 8314 §4.1: cleartext idlers on a STARTTLS listener hold no backend connection (before,
/// each held one, and a few hundred exhausted the backend's process limit).
#[tokio::test]
async fn two_hundred_idle_cleartext_connections_open_no_backend_connection() {
    // All 200 come from 127.0.0.1: the per-address limit (tests/limits.rs) is off here.
    let env = env_with(
        FakeOptions::default(),
        "",
        "limits:\n  connections_per_ip: 0\n",
    )
    .await;
    let mut idle = Vec::new();
    for _ in 0..200 {
        idle.push(plain(&env).await);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(backend_connections(&env), 0);
    // They are live sessions: each still answers.
    for c in idle.iter_mut().step_by(40) {
        assert_eq!(c.cmd("NOOP").await, "250 2.0.0 Ok\r\n");
    }
    drop(idle);
    assert_eq!(backend_connections(&env), 0);
}

/// The whole cleartext dialogue is answered by mailfront (greeting, EHLO with only PIPELINING,
/// ENHANCEDSTATUSCODES and STARTTLS, HELO, NOOP, RSET, QUIT, and refusals, pipelined replies in
/// order) and the backend is never even connected.
#[tokio::test]
async fn the_cleartext_dialogue_is_answered_locally_and_nothing_reaches_the_backend() {
    let env = env().await;
    let mut c = plain(&env).await;
    assert_eq!(
        c.cmd(&format!("EHLO {HELO}")).await,
        format!("250-{HOST}\r\n250-PIPELINING\r\n250-ENHANCEDSTATUSCODES\r\n250 STARTTLS\r\n")
    );
    assert_eq!(c.cmd("HELO x").await, format!("250 {HOST}\r\n"));
    assert_eq!(c.cmd("NOOP").await, "250 2.0.0 Ok\r\n");
    assert_eq!(c.cmd("RSET").await, "250 2.0.0 Ok\r\n");
    let must = "530 5.7.0 Must issue a STARTTLS command first\r\n";
    // Pipelined: one write, replies in order.
    c.send(format!(
        "{}\r\nAUTH LOGIN\r\nMAIL FROM:<a@example.test>\r\nRCPT TO:<b@example.test>\r\n\
         DATA\r\nVRFY root\r\nFOO\r\nBDAT 4 LAST\r\nxyz\nNOOP\r\nEHLO lf\nXCLIENT ADDR=1.2.3.4\r\n\
         NOOP\r\n",
        auth_plain("secret")
    ))
    .await;
    for expected in [must, must, must, must, must, must, must, must] {
        assert_eq!(c.reply().await, expected);
    }
    assert_eq!(c.reply().await, "250 2.0.0 Ok\r\n", "the chunk was dropped");
    assert_eq!(
        c.reply().await,
        "500 5.5.2 Error: bare LF in command line\r\n"
    );
    assert!(c.reply().await.starts_with("500 5.5.1"));
    assert_eq!(c.reply().await, "250 2.0.0 Ok\r\n");
    assert_eq!(c.cmd("QUIT").await, "221 2.0.0 Bye\r\n");
    assert_eq!(c.rest().await, "");
    assert_eq!(backend_connections(&env), 0);
    assert_eq!(
        metric(&env, "mailfront_cleartext_auth_refused_total", "submission"),
        2
    );
    assert_eq!(
        metric(
            &env,
            "mailfront_backend_connect_duration_seconds_count",
            "submission"
        ),
        0
    );
}

/// After STARTTLS the backend is connected (its greeting swallowed), the client's new EHLO is
/// the first thing it receives, the client sees the backend's capabilities (rewritten as on
/// 465), and AUTH and a message go through with the Received field.
#[tokio::test]
async fn after_starttls_the_backend_is_connected_and_auth_and_a_message_go_through() {
    let env = env().await;
    let (mut c, before, after) = starttls(&env).await;
    assert!(
        !before.contains("AUTH") && !before.contains("SIZE"),
        "{before}"
    );
    assert!(after.starts_with(&format!("250-{HOST}\r\n")), "{after}");
    assert!(after.contains("AUTH PLAIN LOGIN"), "{after}");
    assert!(after.contains("SIZE 104856576"), "{after}");
    assert!(after.contains("CHUNKING"), "{after}");
    assert!(
        !after.contains("STARTTLS") && !after.contains("XCLIENT"),
        "{after}"
    );
    assert!(c.cmd(&auth_plain("secret")).await.starts_with("235"));
    let body = b"Subject: after starttls\r\n\r\nhello\r\n";
    assert!(send_message(&mut c, body).await.starts_with("250 "));
    assert!(c.cmd("QUIT").await.starts_with("221"));
    let conns = env.backend.recorder.connections();
    assert_eq!(conns.len(), 1);
    let t = transcript(&conns[0]);
    assert_eq!(t.commands[0], format!("EHLO {HELO}"), "{:?}", t.commands);
    let (field, rest) = split_received(&t.messages[0]);
    check_field(&field, &c, "ESMTPSA");
    assert_eq!(rest, body);
}

/// A backend that is unreachable or refuses the session once TLS is up: the command that needs
/// it gets `421 4.4.1` and the session ends.
#[tokio::test]
async fn a_backend_refusing_after_starttls_gives_421_4_4_1_to_the_command_that_needs_it() {
    let options = FakeOptions {
        smtp_greeting: "554 5.3.2 backend.test busy\r\n".into(),
        ..FakeOptions::default()
    };
    let env = env_with(options, "", "").await;
    let mut c = plain(&env).await;
    assert_eq!(c.cmd("STARTTLS").await, "220 2.0.0 Ready to start TLS\r\n");
    let io = std::mem::replace(&mut c.io, BufReader::new(Box::new(tokio::io::empty())));
    let tls = tls_upgrade(io.into_inner(), HOST, env.config.clone())
        .await
        .unwrap();
    let mut t = Client::tls(tls);
    // No backend until a command needs it; that command gets the temporary failure.
    let rest = t.cmd(&format!("EHLO {HELO}")).await;
    assert!(rest.starts_with(&format!("421 4.4.1 {HOST} ")), "{rest}");
    assert!(!rest.contains("backend.test"), "{rest}");
}

/// `require_tls_for_mail: false`: the backend is connected at the first cleartext MAIL, the
/// client's EHLO is replayed (its reply swallowed), and the session relays as before. A later
/// STARTTLS drops that connection and connects afresh after the handshake.
#[tokio::test]
async fn without_require_tls_for_mail_a_cleartext_mail_connects_lazily() {
    let env = env_with(
        FakeOptions::default(),
        "    require_tls_for_mail: false\n",
        "",
    )
    .await;
    let mut c = plain(&env).await;
    let ehlo = c.cmd(&format!("EHLO {HELO}")).await;
    assert!(ehlo.ends_with("250 STARTTLS\r\n"), "{ehlo}");
    assert_eq!(c.cmd("NOOP").await, "250 2.0.0 Ok\r\n");
    assert_eq!(
        c.cmd("RCPT TO:<b@example.test>").await,
        "503 5.5.1 Error: need MAIL command\r\n"
    );
    assert!(c.cmd("VRFY root").await.starts_with("530 5.7.0"));
    assert_eq!(backend_connections(&env), 0);
    let body = b"Subject: clear\r\n\r\nhi\r\n";
    assert!(send_message(&mut c, body).await.starts_with("250 "));
    assert_eq!(backend_connections(&env), 1);
    let first = transcript(&env.backend.recorder.connections()[0]);
    assert_eq!(
        first.commands[..3],
        [
            format!("EHLO {HELO}"),
            "MAIL FROM:<a@example.test>".to_owned(),
            "RCPT TO:<b@example.test>".to_owned()
        ]
    );
    assert_eq!(first.messages, vec![body.to_vec()], "no field in cleartext");

    // STARTTLS on the same session: the cleartext backend connection is dropped and a new one
    // made after the handshake.
    assert_eq!(c.cmd("STARTTLS").await, "220 2.0.0 Ready to start TLS\r\n");
    let io = std::mem::replace(&mut c.io, BufReader::new(Box::new(tokio::io::empty())));
    let tls = tls_upgrade(io.into_inner(), HOST, env.config.clone())
        .await
        .unwrap();
    let mut t = Client::tls(tls);
    let after = t.cmd(&format!("EHLO {HELO}")).await;
    assert!(after.contains("AUTH PLAIN"), "{after}");
    assert!(t.cmd(&auth_plain("secret")).await.starts_with("235"));
    assert!(send_message(&mut t, body).await.starts_with("250 "));
    let conns = env.backend.recorder.connections();
    assert_eq!(conns.len(), 2);
    let second = transcript(&conns[1]);
    assert_eq!(second.commands[0], format!("EHLO {HELO}"));
    let (field, rest) = split_received(&second.messages[0]);
    check_field(&field, &t, "ESMTPSA");
    assert_eq!(rest, body);
    assert!(!conns[0].windows(4).any(|w| w == b"AUTH"));
}

/// `require_tls_for_mail: false`, after the lazy cleartext connect: AUTH (inline, then as an
/// exchange), XCLIENT, an AUTH behind a bare LF or CR, and a BDAT chunk whose content holds an
/// AUTH line all stay away from the backend as commands; the replayed EHLO is the parsed name.
#[tokio::test]
async fn after_a_lazy_cleartext_connect_nothing_credential_like_reaches_the_backend() {
    let env = env_with(
        FakeOptions::default(),
        "    require_tls_for_mail: false\n",
        "",
    )
    .await;
    let mut c = plain(&env).await;
    c.cmd(&format!("EHLO  {HELO}\t ")).await;
    assert!(c.cmd("MAIL FROM:<a@example.test>").await.starts_with("250"));
    assert_eq!(backend_connections(&env), 1);
    assert!(
        c.cmd(&auth_plain("secret")).await.starts_with("530 5.7.0"),
        "AUTH over the cleartext backend connection"
    );
    assert!(c.cmd("AUTH LOGIN").await.starts_with("530 5.7.0"));
    assert!(c.cmd("XCLIENT ADDR=192.0.2.9").await.starts_with("5"));
    c.send("NOOP\nAUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n").await;
    assert!(c.reply().await.starts_with("500 5.5.2"));
    // Resynchronised after the LF, as a backend taking bare LF would: the AUTH is gated.
    assert!(c.reply().await.starts_with("530 5.7.0"));
    c.send("NOOP\rAUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n").await;
    assert!(c.reply().await.starts_with("500 5.5.2"));
    assert!(c.cmd("RCPT TO:<b@example.test>").await.starts_with("250"));
    let chunk = "AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\nXCLIENT ADDR=192.0.2.9\r\n";
    c.send(format!("BDAT {} LAST\r\n{chunk}", chunk.len()))
        .await;
    let reply = c.reply().await;
    assert_eq!(c.cmd("QUIT").await.get(..3), Some("221"), "{reply}");
    drop(c);
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let conns = env.backend.recorder.connections();
    assert_eq!(conns.len(), 1);
    let t = transcript(&conns[0]);
    assert_eq!(
        t.commands[0],
        format!("EHLO {HELO}"),
        "the parsed name only"
    );
    for command in &t.commands {
        let upper = command.to_ascii_uppercase();
        assert!(
            !upper.starts_with("AUTH") && !upper.starts_with("XCLIENT") && !upper.contains("NOOP"),
            "{command:?} reached the backend as a command: {:?}",
            t.commands
        );
    }
}

/// A bare LF ending a command line, a bare CR or a NUL inside one: `500 5.5.2`, never
/// forwarded, before TLS, after TLS before AUTH, and after AUTH; the session stays in step.
#[tokio::test]
async fn bare_lf_bare_cr_and_nul_in_command_lines_are_refused_and_never_forwarded() {
    let env = env().await;
    let bad: [(&[u8], &str); 5] = [
        (
            b"MAIL FROM:<lf@evil.test>\n",
            "500 5.5.2 Error: bare LF in command line\r\n",
        ),
        (
            b"RCPT TO:<cr@evil.test>\rDATA\r\n",
            "500 5.5.2 Error: bare CR in command line\r\n",
        ),
        (
            b"NOOP nul@evil.test\0\r\n",
            "500 5.5.2 Error: NUL in command line\r\n",
        ),
        (b"NOOP\n", "500 5.5.2 Error: bare LF in command line\r\n"),
        (
            b"RSET\r\rQUIT\r\n",
            "500 5.5.2 Error: bare CR in command line\r\n",
        ),
    ];
    // Before TLS (STARTTLS listener): refused locally like any other line (530 for MAIL).
    let mut c = plain(&env).await;
    for (line, expected) in bad {
        c.send(line).await;
        let reply = c.reply().await;
        assert!(
            reply == expected || reply.starts_with("530 5.7.0"),
            "{line:?}: {reply}"
        );
    }
    assert_eq!(c.cmd("NOOP").await, "250 2.0.0 Ok\r\n");
    // After TLS, before and after authentication.
    let (mut t, _, _) = starttls(&env).await;
    for authenticated in [false, true] {
        if authenticated {
            assert!(t.cmd(&auth_plain("secret")).await.starts_with("235"));
        }
        for (line, expected) in bad {
            t.send(line).await;
            assert_eq!(t.reply().await, expected, "{line:?}");
        }
        assert!(t.cmd("NOOP").await.starts_with("250"), "still in step");
    }
    let mut i = implicit(&env).await;
    for (line, expected) in bad {
        i.send(line).await;
        assert_eq!(i.reply().await, expected, "{line:?}");
    }
    let all = env.backend.recorder.all_text();
    assert!(!all.contains("evil"), "{all:?}");
    assert!(!all.contains('\0'));
    assert!(!all.contains("QUIT"));
    assert_eq!(all.matches('\n').count(), all.matches("\r\n").count());
}

/// SASL responses after a 334 are framing too: a bare LF, bare CR or NUL cancels the exchange
/// with mailfront's own `*` (the backend's 501 swallowed) and gets `500 5.5.2`; the response
/// never reaches the backend.
#[tokio::test]
async fn bare_line_endings_in_auth_continuations_and_cancels_are_refused_and_never_forwarded() {
    let env = env().await;
    let mut c = implicit(&env).await;
    let secret = BASE64_STANDARD.encode(b"\0user\0secret");
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (format!("{secret}\n").into_bytes(), "bare LF"),
        (b"*\n".to_vec(), "bare LF"),
        (format!("{secret}\rQUIT\r\n").into_bytes(), "bare CR"),
        (format!("{secret}\0\r\n").into_bytes(), "NUL"),
    ];
    for (line, kind) in &cases {
        assert_eq!(c.cmd("AUTH PLAIN").await, "334 \r\n");
        c.send(line).await;
        assert_eq!(
            c.reply().await,
            format!("500 5.5.2 Error: {kind} in command line\r\n"),
            "{line:?}"
        );
        assert!(c.cmd("NOOP").await.starts_with("250"), "still in step");
    }
    let all = env.backend.recorder.all_text();
    assert!(!all.contains(&secret), "{all:?}");
    assert_eq!(all.matches("*\r\n").count(), cases.len());
    // A clean `*` is still the client's cancel, relayed; a clean response logs in.
    assert_eq!(c.cmd("AUTH PLAIN").await, "334 \r\n");
    assert!(c.cmd("*").await.starts_with("501"));
    assert_eq!(c.cmd("AUTH PLAIN").await, "334 \r\n");
    assert!(c.cmd(&secret).await.starts_with("235"));
}

/// A CR ending one read and its LF starting the next are one good CRLF. Two limits: a line of
/// exactly `limits.smtp_line` (2048 octets, CRLF included) is read and judged, one octet more
/// is refused whole; and what is forwarded is mailfront's re-encoding, at most 512 octets for a
/// NOOP, so 2048 octets of padding reach the backend as a few.
#[tokio::test]
async fn a_crlf_split_across_reads_and_a_line_of_exactly_the_limit_are_accepted() {
    let env = env().await;
    let mut c = implicit(&env).await;
    // Logged in, so that NOOP goes to the backend (before a login mailfront answers it).
    assert!(c.cmd(&auth_plain("secret")).await.starts_with("235"));
    c.send("NOOP split\r").await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    c.send("\n").await;
    assert!(c.reply().await.starts_with("250"));
    let exact = format!("NOOP{}exact", " ".repeat(2048 - 11));
    c.send(format!("{exact}\r")).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    c.send("\n").await;
    assert!(c.reply().await.starts_with("250"), "exactly the limit");
    let over = format!("NOOP{}over", " ".repeat(2048 - 9));
    c.send(format!("{over}\r")).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    c.send("\n").await;
    assert_eq!(c.reply().await, "500 5.5.2 Line too long\r\n");
    let longest = format!("NOOP {}", "e".repeat(512 - 7));
    assert!(
        c.cmd(&longest).await.starts_with("250"),
        "512 octets re-encoded"
    );
    let too_long = format!("NOOP {}", "f".repeat(512 - 6));
    assert_eq!(c.cmd(&too_long).await, "500 5.5.2 Line too long\r\n");
    assert!(c.cmd("NOOP").await.starts_with("250"));
    let all = env.backend.recorder.all_text();
    assert!(all.contains("NOOP split\r\n"));
    assert!(all.contains("NOOP exact\r\n"), "{all}");
    assert!(all.contains(&format!("{longest}\r\n")));
    assert!(
        !all.contains("over") && !all.contains("fff") && !all.contains("  "),
        "{all}"
    );
}

/// BDAT content is held to DATA's rule: a bare LF or bare CR anywhere in the message (within a
/// chunk, at a chunk boundary, or as its last octet) refuses it with `554 5.6.0`, the backend
/// connection is dropped so the message never completes, and the next command gets 421.
#[tokio::test]
async fn bdat_with_a_bare_cr_or_lf_is_refused_like_data_and_never_completes() {
    let env = env().await;
    let cases: [&[&[u8]]; 4] = [
        &[b"Subject: x\r\n\r\nsmuggled\n.\nMAIL FROM:<evil@x>\r\n"],
        &[b"Subject: x\r\n\r\nfirst\r", b"second chunk\r\n"],
        &[b"Subject: x\r\n\r\nlast octet is a CR\r"],
        &[b"Subject: x\r\n\r\nline\r", b""],
    ];
    for chunks in cases {
        let mut c = implicit(&env).await;
        c.send("MAIL FROM:<a@example.test>\r\nRCPT TO:<b@example.test>\r\n")
            .await;
        assert!(c.reply().await.starts_with("250"));
        assert!(c.reply().await.starts_with("250"));
        let mut replies = Vec::new();
        for (i, chunk) in chunks.iter().enumerate() {
            let last = if i + 1 == chunks.len() { " LAST" } else { "" };
            let mut w = format!("BDAT {}{last}\r\n", chunk.len()).into_bytes();
            w.extend_from_slice(chunk);
            c.send(w).await;
            let reply = c.reply().await;
            let refused = reply.starts_with("554");
            replies.push(reply);
            if refused {
                break;
            }
        }
        assert_eq!(
            replies.last().unwrap(),
            "554 5.6.0 Message refused: bare CR or LF in message content\r\n",
            "{chunks:?}: {replies:?}"
        );
        let next = c.cmd("NOOP").await;
        assert!(next.starts_with("421 "), "{next}");
    }
    // Pipelined: the earlier chunk's reply is read before the backend is dropped, in order.
    let mut c = implicit(&env).await;
    c.send(
        "MAIL FROM:<a@example.test>\r\nRCPT TO:<b@example.test>\r\nBDAT 5\r\nabcde\
         BDAT 4 LAST\r\nab\ncNOOP\r\n",
    )
    .await;
    for _ in 0..3 {
        assert!(c.reply().await.starts_with("250"));
    }
    assert!(c.reply().await.starts_with("554 5.6.0"));
    assert!(c.reply().await.starts_with("421 "));
    // No message was ever complete at the backend: any LAST chunk it was announced is short.
    for conn in env.backend.recorder.connections() {
        let t = transcript(&conn);
        assert!(t.messages.is_empty() || t.truncated, "{:?}", t.commands);
        assert!(!String::from_utf8_lossy(&conn).contains("evil"));
    }
    assert_eq!(
        metric(&env, "mailfront_messages_submitted_total", "submissions"),
        0
    );
}

/// A CR ending one BDAT chunk and the LF starting the next are one CRLF: accepted.
#[tokio::test]
async fn bdat_with_a_crlf_split_across_chunks_is_accepted() {
    let env = env().await;
    let mut c = implicit(&env).await;
    assert!(c.cmd("MAIL FROM:<a@example.test>").await.starts_with("250"));
    assert!(c.cmd("RCPT TO:<b@example.test>").await.starts_with("250"));
    let chunk1 = b"Subject: split\r\n\r\nline one\r";
    let chunk2 = b"\nline two\r\n";
    c.send([format!("BDAT {}\r\n", chunk1.len()).as_bytes(), chunk1].concat())
        .await;
    assert!(c.reply().await.starts_with("250"));
    c.send([format!("BDAT {} LAST\r\n", chunk2.len()).as_bytes(), chunk2].concat())
        .await;
    let last = c.reply().await;
    assert!(last.starts_with("250 2.0.0 Ok: queued"), "{last}");
    let (field, rest) = split_received(&all_messages(&env.backend)[0]);
    check_field(&field, &c, "ESMTPS");
    assert_eq!(rest, [&chunk1[..], &chunk2[..]].concat());
}

const LOGIN_TIMEOUT_REPLY: &str =
    "421 4.4.2 mx.example.test Error: login timeout exceeded, closing transmission channel\r\n";

/// `timeouts.login` from the config reaches the session (here below `timeouts.idle`, so only it
/// can end a silent client), and the close is counted as `login_timeout`. In cleartext on 587,
/// so no TLS handshake has to fit in the deadline on a loaded machine; no backend is connected.
/// Trickling clients on 465 and 587, an authenticated one, an accepted cleartext MAIL and the
/// exact instant are `drivers::timing`'s and `drivers`'.
#[tokio::test]
async fn a_client_is_cut_off_at_the_configured_login_timeout() {
    let env = env_with(
        FakeOptions::default(),
        "",
        "timeouts:\n  login: 500ms\n  idle: 60s\n",
    )
    .await;
    let mut c = plain(&env).await;
    assert_eq!(c.rest().await, LOGIN_TIMEOUT_REPLY);
    eventually(|| {
        env.proxy.metrics.encode().lines().any(|l| {
            l.contains("listener=\"submission\"")
                && l.contains("reason=\"login_timeout\"")
                && l.ends_with(" 1")
        })
    })
    .await;
    assert_eq!(backend_connections(&env), 0);
}
/// The smuggling class of a backend that cuts command lines short (Postfix reads 2048 octets
/// and skips the rest): padding that moves a BDAT size, or anything else, past the cut can no
/// longer mean one thing to mailfront and another to the backend, because the backend only
/// ever reads mailfront's re-encoded line. The chunk announced is the chunk streamed, and the
/// smuggled commands in it stay message content.
#[tokio::test]
async fn padded_command_lines_reach_the_backend_rewritten_and_chunks_stay_chunks() {
    let env = env().await;
    let mut c = implicit(&env).await;
    assert!(c.cmd(&auth_plain("secret")).await.starts_with("235"));
    let mail = format!("MAIL FROM:<a@example.test>{}SIZE=300", " ".repeat(1900));
    assert!(c.cmd(&mail).await.starts_with("250"));
    let rcpt = format!("RCPT\tTO:<b@example.test>{}", "\t".repeat(1500));
    assert!(c.cmd(&rcpt).await.starts_with("250"));
    let smuggled = "XCLIENT LOGIN=victim@example.test\r\nMAIL FROM:<x@evil.test>\r\nRCPT TO:<y@remote.test>\r\nDATA\r\n";
    let chunk = format!("{smuggled}{}", "p".repeat(300 - smuggled.len()));
    assert_eq!(chunk.len(), 300);
    // The size 1990 octets into the line: past nothing here, but past any shorter cut.
    let bdat = format!("BDAT{}300 LAST", " ".repeat(1990));
    c.send(format!("{bdat}\r\n{chunk}")).await;
    let reply = c.reply().await;
    assert!(reply.starts_with("250"), "{reply}");
    assert!(c.cmd("QUIT").await.starts_with("221"));
    let conns = env.backend.recorder.connections();
    let t = transcript(&conns[0]);
    for command in &t.commands {
        assert!(command.len() + 2 <= 512, "{command:?}");
        assert!(
            !command.contains("  ") && !command.contains('\t'),
            "{command:?}"
        );
        assert!(
            !command.to_ascii_uppercase().starts_with("XCLIENT"),
            "{command:?}"
        );
    }
    assert!(
        t.commands
            .contains(&"MAIL FROM:<a@example.test> SIZE=300".to_owned()),
        "{:?}",
        t.commands
    );
    assert!(t.commands.contains(&"RCPT TO:<b@example.test>".to_owned()));
    assert!(
        t.commands
            .iter()
            .any(|c| c.starts_with("BDAT ") && c.ends_with(" LAST")),
        "{:?}",
        t.commands
    );
    assert_eq!(t.messages.len(), 1);
    let (field, rest) = split_received(&t.messages[0]);
    check_field(&field, &c, "ESMTPSA");
    assert_eq!(rest, chunk.as_bytes(), "the chunk is content, whole");
}

/// A line too long for the receiver is refused whole, BDAT included: its chunk cannot be
/// framed, so what follows is read as commands — by mailfront's gate, as any command.
#[tokio::test]
async fn a_bdat_line_past_the_read_limit_is_refused_and_what_follows_is_judged_as_commands() {
    let env = env().await;
    let mut c = implicit(&env).await;
    // Logged in, so that the backend is connected while the lines are judged.
    assert!(c.cmd(&auth_plain("secret")).await.starts_with("235"));
    let bdat = format!("BDAT{}300 LAST", " ".repeat(2040));
    c.send(format!("{bdat}\r\nXCLIENT LOGIN=victim@example.test\r\n"))
        .await;
    assert_eq!(c.reply().await, "500 5.5.2 Line too long\r\n");
    assert_eq!(
        c.reply().await,
        "500 5.5.1 Error: command not recognized\r\n"
    );
    assert!(c.cmd("NOOP").await.starts_with("250"));
    let all = env.backend.recorder.all_text();
    assert!(all.ends_with("\r\nNOOP\r\n"), "{all}");
    assert!(!all.contains("BDAT") && !all.contains("XCLIENT"), "{all}");
}

/// A BDAT size with a leading zero, a sign or padding inside the number is refused (RFC 3030
/// §2 `chunk-size = 1*DIGIT`, read strictly), and its would-be chunk is not forwarded.
#[tokio::test]
async fn bdat_sizes_are_read_strictly() {
    let env = env().await;
    let mut c = implicit(&env).await;
    assert!(c.cmd(&auth_plain("secret")).await.starts_with("235"));
    assert!(c.cmd("MAIL FROM:<a@example.test>").await.starts_with("250"));
    assert!(c.cmd("RCPT TO:<b@example.test>").await.starts_with("250"));
    for bad in ["BDAT 010", "BDAT +10", "BDAT 1 0", "BDAT 0x10"] {
        assert_eq!(
            c.cmd(bad).await,
            "501 5.5.4 Syntax: BDAT <size> [LAST]\r\n",
            "{bad}"
        );
    }
    assert!(c.cmd("NOOP").await.starts_with("250"));
    let all = env.backend.recorder.all_text();
    assert!(!all.contains("BDAT"), "{all}");
}
