//! POP3 through the proxy: the local cleartext dialogue with no backend before STLS, CAPA views,
//! no cleartext credentials, STLS injection defence, canonical lines to the backend before login,
//! strict CRLF framing, limits, and the byte relay after login — with a real rustls client,
//! Python poplib and curl against the recording fake backend.

// Helpers outside #[test] functions: clippy's allow-*-in-tests does not reach them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use crate::common::*;
use base64::prelude::{BASE64_STANDARD, Engine as _};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const HOST: &str = "mx.example.test";
const REFUSED: &str = "-ERR [AUTH] Cleartext authentication disallowed; issue STLS first\r\n";
/// Our own greeting, on every listener: no backend is connected yet.
const LOCAL_GREETING: &str = "+OK mx.example.test ready\r\n";
const NOT_YET: &str = "-ERR Command not valid before authentication\r\n";
const BARE_LF: &str = "-ERR Command lines must end with CRLF\r\n";
const CR_OR_NUL: &str = "-ERR CR or NUL not allowed in a command line\r\n";

struct Setup {
    pki: Pki,
    backend: FakeBackend,
    proxy: Proxy,
}

async fn setup(tls: &str, extra: &str) -> Setup {
    setup_with(tls, FakeOptions::default(), extra).await
}

async fn setup_with(tls: &str, options: FakeOptions, extra: &str) -> Setup {
    let pki = Pki::new();
    let cert = pki.issue("mx", &[HOST], false);
    let backend = FakeBackend::start_with(FakeKind::Pop3, options).await;
    let yaml = config_yaml(
        &[&cert],
        &[listener_yaml("pop3", "pop3", tls, backend.addr)],
        extra,
    );
    let proxy = Proxy::start(&yaml, pki.dir.path()).await;
    Setup {
        pki,
        backend,
        proxy,
    }
}

impl Setup {
    fn config(&self) -> std::sync::Arc<rustls::ClientConfig> {
        client_config(
            &self.pki.ca_der,
            &[&rustls::version::TLS13, &rustls::version::TLS12],
            None,
        )
    }

    async fn connect(&self) -> BufReader<tokio_rustls::client::TlsStream<TcpStream>> {
        let tls = tls_connect(self.proxy.addr("pop3"), HOST, self.config())
            .await
            .unwrap();
        let mut tls = BufReader::new(tls);
        // mailfront's own: the backend is connected only when a command needs it.
        assert_eq!(read_line(&mut tls).await, LOCAL_GREETING);
        tls
    }

    async fn connect_plain(&self) -> BufReader<TcpStream> {
        let tcp = TcpStream::connect(self.proxy.addr("pop3")).await.unwrap();
        let mut tcp = BufReader::new(tcp);
        assert_eq!(read_line(&mut tcp).await, LOCAL_GREETING);
        tcp
    }

    /// Connects to the `starttls` listener and runs STLS; the backend greeting is not shown.
    async fn connect_stls(&self) -> BufReader<tokio_rustls::client::TlsStream<TcpStream>> {
        let mut c = self.connect_plain().await;
        assert_eq!(line(&mut c, "STLS").await, "+OK Begin TLS negotiation\r\n");
        let tls = tls_upgrade(c.into_inner(), HOST, self.config())
            .await
            .unwrap();
        BufReader::new(tls)
    }

    fn metrics(&self) -> String {
        self.proxy.metrics.encode()
    }
}

async fn send<S: AsyncRead + AsyncWrite + Unpin>(s: &mut BufReader<S>, bytes: &[u8]) {
    s.get_mut().write_all(bytes).await.unwrap();
}

async fn line<S: AsyncRead + AsyncWrite + Unpin>(s: &mut BufReader<S>, cmd: &str) -> String {
    send(s, format!("{cmd}\r\n").as_bytes()).await;
    read_line(s).await
}

/// Reads a multi-line response up to and including the `.` line.
async fn multiline<S: AsyncRead + AsyncWrite + Unpin>(s: &mut BufReader<S>, cmd: &str) -> String {
    send(s, format!("{cmd}\r\n").as_bytes()).await;
    let mut all = String::new();
    loop {
        let l = read_line(s).await;
        all.push_str(&l);
        if l == ".\r\n" || l.is_empty() || l.starts_with("-ERR") {
            return all;
        }
    }
}

#[tokio::test]
async fn user_pass_over_implicit_tls_logs_in_and_the_session_is_relayed() {
    let s = setup("implicit", "").await;
    let mut c = s.connect().await;
    let capa = multiline(&mut c, "CAPA").await;
    assert_eq!(
        capa,
        "+OK Capability list follows\r\nTOP\r\nUIDL\r\nUSER\r\nSASL PLAIN\r\nRESP-CODES\r\nPIPELINING\r\n.\r\n"
    );
    assert_eq!(
        line(&mut c, "STLS").await,
        "-ERR Command not permitted when TLS active\r\n"
    );
    assert_eq!(line(&mut c, "USER u").await, "+OK\r\n");
    assert_eq!(line(&mut c, "PASS secret").await, "+OK Logged in.\r\n");
    assert!(line(&mut c, "STAT").await.starts_with("+OK 1 "));
    assert!(multiline(&mut c, "RETR 1").await.contains("hello pop3"));
    assert_eq!(line(&mut c, "QUIT").await, "+OK Logging out.\r\n");
    assert!(s.metrics().contains(
        r#"mailfront_auth_outcomes_total{listener="pop3",protocol="pop3",result="success"} 1"#
    ));
}

#[tokio::test]
async fn a_failed_pass_keeps_parsing_and_pipelined_commands_wait_for_the_answer() {
    let s = setup("implicit", "").await;
    let mut c = s.connect().await;
    send(
        &mut c,
        b"USER u\r\nPASS wrong\r\nUSER u\r\nPASS secret\r\nSTAT\r\n",
    )
    .await;
    assert_eq!(read_line(&mut c).await, "+OK\r\n");
    assert_eq!(
        read_line(&mut c).await,
        "-ERR [AUTH] Authentication failed.\r\n"
    );
    assert_eq!(read_line(&mut c).await, "+OK\r\n");
    assert_eq!(read_line(&mut c).await, "+OK Logged in.\r\n");
    assert!(read_line(&mut c).await.starts_with("+OK 1 "));
    assert!(s.metrics().contains(
        r#"mailfront_auth_outcomes_total{listener="pop3",protocol="pop3",result="failure"} 1"#
    ));
}

#[tokio::test]
async fn auth_plain_works_with_an_initial_response_and_with_a_continuation() {
    let s = setup("implicit", "").await;
    let ir = BASE64_STANDARD.encode(b"\0u\0secret");
    let mut c = s.connect().await;
    assert_eq!(
        line(&mut c, &format!("AUTH PLAIN {ir}")).await,
        "+OK Logged in.\r\n"
    );
    assert!(line(&mut c, "STAT").await.starts_with("+OK 1 "));

    let mut c = s.connect().await;
    assert_eq!(line(&mut c, "AUTH PLAIN").await, "+ \r\n");
    assert_eq!(line(&mut c, &ir).await, "+OK Logged in.\r\n");
    assert!(multiline(&mut c, "LIST").await.ends_with(".\r\n"));

    // A cancelled exchange gets the backend's -ERR and the session goes on.
    let mut c = s.connect().await;
    assert_eq!(line(&mut c, "AUTH PLAIN").await, "+ \r\n");
    assert!(line(&mut c, "*").await.starts_with("-ERR"));
    assert!(multiline(&mut c, "CAPA").await.ends_with(".\r\n"));
}

#[tokio::test]
async fn the_cleartext_dialogue_is_answered_locally_and_credentials_are_refused() {
    let s = setup("starttls", "").await;
    let mut c = s.connect_plain().await;
    // RFC 2449 §5 / RFC 2595 §4: STLS only; the backend's list comes after STLS.
    assert_eq!(
        multiline(&mut c, "CAPA").await,
        "+OK Capability list follows\r\nSTLS\r\n.\r\n"
    );
    let ir = BASE64_STANDARD.encode(b"\0u\0secret");
    for cmd in [
        "USER u".to_string(),
        "user u".into(),
        "USER".into(),
        "PASS secret".into(),
        "APOP u 0123456789abcdef0123456789abcdef".into(),
        format!("AUTH PLAIN {ir}"),
        "AUTH PLAIN".into(),
        // Mechanism discovery: the same refusal, not counted as an attempt.
        "AUTH".into(),
    ] {
        assert_eq!(line(&mut c, &cmd).await, REFUSED, "{cmd}");
    }
    // Pipelined USER and PASS get two replies in order.
    send(&mut c, b"USER u\r\nPASS secret\r\n").await;
    assert_eq!(read_line(&mut c).await, REFUSED);
    assert_eq!(read_line(&mut c).await, REFUSED);
    assert_eq!(
        line(&mut c, "XCLIENT ADDR=1.2.3.4").await,
        "-ERR Command not permitted\r\n"
    );
    assert_eq!(line(&mut c, "NOOP").await, NOT_YET);
    assert_eq!(line(&mut c, "RSET").await, NOT_YET);
    assert_eq!(line(&mut c, "STAT").await, "-ERR Unknown command\r\n");
    assert_eq!(
        line(&mut c, "STLS now").await,
        "-ERR STLS takes no arguments\r\n"
    );
    assert_eq!(line(&mut c, "QUIT").await, "+OK Logging out\r\n");
    assert_eq!(read_line(&mut c).await, "");

    assert!(s.backend.recorder.connections().is_empty());
    assert!(
        s.metrics().contains(
            r#"mailfront_cleartext_auth_refused_total{listener="pop3",protocol="pop3"} 9"#
        ),
        "{}",
        s.metrics()
    );
}

/// Once the listener's probe learned its backend's capabilities (before the first session is
/// served), silent and CAPA-only TLS sessions cost the backend nothing: CAPA is answered from
/// what was learned, with the same TLS view, and only a login would connect.
#[tokio::test]
async fn fifty_silent_or_capa_only_tls_sessions_open_no_backend_connection_once_capa_is_learned() {
    let s = setup("implicit", "limits:\n  connections_per_ip: 0\n").await;
    let mut first = s.connect().await;
    let learned = multiline(&mut first, "CAPA").await;
    assert!(learned.contains("SASL PLAIN\r\n"), "{learned}");
    assert_eq!(line(&mut first, "QUIT").await, "+OK Logging out\r\n");
    assert_eq!(read_line(&mut first).await, "");
    assert_eq!(s.backend.recorder.probes(), 1, "the listener's probe");
    assert_eq!(s.backend.recorder.connections().len(), 0, "no session's");

    let mut clients = Vec::new();
    for i in 0..50 {
        let mut c = s.connect().await;
        if i % 2 == 0 {
            assert_eq!(multiline(&mut c, "CAPA").await, learned);
        }
        clients.push(c);
    }
    // QUIT is answered here too.
    assert_eq!(line(&mut clients[1], "QUIT").await, "+OK Logging out\r\n");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(s.backend.recorder.connections().len(), 0);
    assert_eq!(s.backend.recorder.probes(), 1);
    drop(clients);
}

#[tokio::test]
async fn two_hundred_idle_cleartext_pop3_connections_open_no_backend_connection() {
    // All 200 come from 127.0.0.1: the per-address limit (tests/limits.rs) is off here.
    let s = setup("starttls", "limits:\n  connections_per_ip: 0\n").await;
    let mut clients = Vec::new();
    for _ in 0..200 {
        clients.push(s.connect_plain().await);
    }
    // A little traffic on each, still nothing reaches a backend.
    for c in clients.iter_mut().step_by(10) {
        assert!(multiline(c, "CAPA").await.contains("STLS"));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(s.backend.recorder.connections().len(), 0);
    drop(clients);
}

#[tokio::test]
async fn too_many_cleartext_commands_end_the_session_without_a_backend() {
    let s = setup("starttls", "limits:\n  preauth_commands: 2\n").await;
    let mut c = s.connect_plain().await;
    send(&mut c, b"NOOP\r\nUSER x\n").await;
    assert_eq!(read_line(&mut c).await, NOT_YET);
    assert_eq!(read_line(&mut c).await, BARE_LF);
    assert_eq!(
        line(&mut c, "CAPA").await,
        "-ERR Too many commands before authentication\r\n"
    );
    assert_eq!(read_line(&mut c).await, "");
    assert!(s.backend.recorder.connections().is_empty());
}

#[tokio::test]
async fn credentials_pipelined_after_stls_are_discarded_and_login_works_after_tls() {
    let s = setup("starttls", "").await;
    let mut c = s.connect_plain().await;
    send(
        &mut c,
        b"STLS\r\nUSER evil\r\nPASS secret\r\nXCLIENT ADDR=6.6.6.6\r\n",
    )
    .await;
    assert_eq!(read_line(&mut c).await, "+OK Begin TLS negotiation\r\n");
    assert!(s.backend.recorder.connections().is_empty());
    let tls = tls_upgrade(c.into_inner(), HOST, s.config()).await.unwrap();
    let mut c = BufReader::new(tls);
    // RFC 2595 §4: the client asks again and now sees the backend's list, as the listener's
    // probe learned it.
    let capa = multiline(&mut c, "CAPA").await;
    assert!(
        !capa.contains("STLS") && capa.contains("USER\r\n") && capa.contains("SASL PLAIN"),
        "{capa}"
    );
    assert_eq!(
        line(&mut c, "STLS").await,
        "-ERR Command not permitted when TLS active\r\n"
    );
    assert_eq!(line(&mut c, "USER u").await, "+OK\r\n");
    assert_eq!(line(&mut c, "PASS secret").await, "+OK Logged in.\r\n");
    assert_eq!(
        s.backend.recorder.connections(),
        vec![b"USER u\r\nPASS secret\r\n".to_vec()]
    );
}

#[tokio::test]
async fn after_stls_user_pass_and_auth_plain_reach_the_backend_as_canonical_lines() {
    let s = setup("starttls", "").await;
    let mut c = s.connect_stls().await;
    assert_eq!(line(&mut c, "user u").await, "+OK\r\n");
    assert_eq!(
        line(&mut c, "NOOP").await,
        NOT_YET,
        "answered here, not forwarded"
    );
    assert_eq!(line(&mut c, "pass secret").await, "+OK Logged in.\r\n");
    assert!(line(&mut c, "STAT").await.starts_with("+OK 1 "));

    let ir = BASE64_STANDARD.encode(b"\0u\0secret");
    let mut c = s.connect_stls().await;
    assert_eq!(line(&mut c, "auth plain").await, "+ \r\n");
    assert_eq!(line(&mut c, &ir).await, "+OK Logged in.\r\n");
    assert!(multiline(&mut c, "LIST").await.ends_with(".\r\n"));

    let mut c = s.connect_stls().await;
    assert_eq!(
        line(&mut c, &format!("Auth Plain {ir}")).await,
        "+OK Logged in.\r\n"
    );
    // APOP needs the backend's greeting timestamp, which an STLS client never saw; QUIT before
    // a login is answered here: no backend connection for this session.
    let mut d = s.connect_stls().await;
    assert_eq!(
        line(&mut d, "APOP u c4c9334bac560ecc979e58001b3e22fb").await,
        "-ERR APOP not available here; use USER/PASS or AUTH\r\n"
    );
    assert_eq!(line(&mut d, "QUIT").await, "+OK Logging out\r\n");

    assert_eq!(
        s.backend.recorder.connections(),
        vec![
            b"USER u\r\nPASS secret\r\nSTAT\r\n".to_vec(),
            format!("AUTH PLAIN\r\n{ir}\r\nLIST\r\n").into_bytes(),
            format!("AUTH PLAIN {ir}\r\n").into_bytes(),
        ]
    );
}

#[tokio::test]
async fn bare_lf_bare_cr_and_nul_are_refused_before_and_after_tls_and_never_forwarded() {
    let s = setup("starttls", "").await;
    let mut c = s.connect_plain().await;
    send(&mut c, b"CAPA\nUSER a\rPASS b\r\nCAPA\0\r\nUSER a\n").await;
    assert_eq!(read_line(&mut c).await, BARE_LF);
    assert_eq!(read_line(&mut c).await, CR_OR_NUL);
    assert_eq!(read_line(&mut c).await, CR_OR_NUL);
    assert_eq!(read_line(&mut c).await, BARE_LF);
    assert_eq!(line(&mut c, "STLS").await, "+OK Begin TLS negotiation\r\n");
    let tls = tls_upgrade(c.into_inner(), HOST, s.config()).await.unwrap();
    let mut c = BufReader::new(tls);
    send(
        &mut c,
        b"USER a\nUSER a\rPASS secret\r\nUSER a\0\r\nUSER u\r\n",
    )
    .await;
    assert_eq!(read_line(&mut c).await, BARE_LF);
    assert_eq!(read_line(&mut c).await, CR_OR_NUL);
    assert_eq!(read_line(&mut c).await, CR_OR_NUL);
    assert_eq!(read_line(&mut c).await, "+OK\r\n");
    // An AUTH continuation with a bare LF (or bad base64) becomes a cancel.
    assert_eq!(line(&mut c, "AUTH PLAIN").await, "+ \r\n");
    send(&mut c, b"AGFsaWNl\n").await;
    assert!(read_line(&mut c).await.starts_with("-ERR [AUTH]"));
    assert_eq!(line(&mut c, "AUTH PLAIN").await, "+ \r\n");
    assert!(line(&mut c, "not base64!").await.starts_with("-ERR [AUTH]"));
    // A CR at the end of one write and its LF in the next is a good CRLF.
    send(&mut c, b"PASS secret\r").await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    send(&mut c, b"\n").await;
    assert_eq!(read_line(&mut c).await, "+OK Logged in.\r\n");
    // USER was answered here, and went out only right before its PASS.
    assert_eq!(
        s.backend.recorder.connections(),
        vec![b"AUTH PLAIN\r\n*\r\nAUTH PLAIN\r\n*\r\nUSER u\r\nPASS secret\r\n".to_vec()]
    );
}

#[tokio::test]
async fn a_line_of_exactly_the_limit_is_forwarded_and_one_octet_more_is_refused() {
    let s = setup("implicit", "limits:\n  pop3_line: 300\n").await;
    let mut c = s.connect().await;
    // 300 octets with the CRLF.
    let exact = format!("USER {}", "x".repeat(293));
    assert_eq!(exact.len() + 2, 300);
    assert_eq!(line(&mut c, &exact).await, "+OK\r\n");
    let over = format!("USER {}", "y".repeat(294));
    assert_eq!(line(&mut c, &over).await, "-ERR Command line too long\r\n");
    // The remembered USER goes out right before its PASS, which connects.
    assert_eq!(
        line(&mut c, "PASS wrong").await,
        "-ERR [AUTH] Authentication failed.\r\n"
    );
    // AUTH continuations may be 12288 octets (base64 comes in quanta of 4: 12284 + CRLF is the
    // longest valid one; the line limit itself is checked in the codec's unit tests).
    assert_eq!(line(&mut c, "AUTH PLAIN").await, "+ \r\n");
    let long = "A".repeat(12284);
    assert!(line(&mut c, &long).await.starts_with("-ERR [AUTH]"));
    let seen = s.backend.recorder.all_text();
    assert!(
        seen == format!("{exact}\r\nPASS wrong\r\nAUTH PLAIN\r\n{long}\r\n"),
        "{} octets seen",
        seen.len()
    );
    // One past 12288 and the session ends: the backend waits for a whole line.
    let mut c = s.connect().await;
    assert_eq!(line(&mut c, "AUTH PLAIN").await, "+ \r\n");
    let over = "A".repeat(12288);
    assert_eq!(line(&mut c, &over).await, "-ERR Command line too long\r\n");
    assert_eq!(read_line(&mut c).await, "");
    assert!(!s.backend.recorder.all_text().contains(&over));
}

#[tokio::test]
async fn a_backend_that_refuses_or_is_gone_after_stls_gets_sys_temp() {
    let options = FakeOptions {
        pop3_greeting: "-ERR [SYS/TEMP] too busy\r\n".into(),
        ..FakeOptions::default()
    };
    let s = setup_with("starttls", options, "").await;
    // The backend is connected for the login: USER is answered here, PASS connects.
    let mut c = s.connect_stls().await;
    send(&mut c, b"USER u\r\nPASS secret\r\n").await;
    assert_eq!(read_line(&mut c).await, "+OK\r\n");
    assert_eq!(
        read_line(&mut c).await,
        "-ERR [SYS/TEMP] Server temporarily unavailable\r\n"
    );
    assert_eq!(read_line(&mut c).await, "");

    let pki = Pki::new();
    let cert = pki.issue("mx", &[HOST], false);
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let yaml = config_yaml(
        &[&cert],
        &[listener_yaml("pop3", "pop3", "starttls", dead)],
        "",
    );
    let proxy = Proxy::start(&yaml, pki.dir.path()).await;
    let tcp = TcpStream::connect(proxy.addr("pop3")).await.unwrap();
    let mut c = BufReader::new(tcp);
    assert_eq!(read_line(&mut c).await, LOCAL_GREETING);
    assert_eq!(line(&mut c, "STLS").await, "+OK Begin TLS negotiation\r\n");
    let config = client_config(&pki.ca_der, &[&rustls::version::TLS13], None);
    let tls = tls_upgrade(c.into_inner(), HOST, config).await.unwrap();
    let mut c = BufReader::new(tls);
    send(&mut c, b"AUTH PLAIN\r\n").await;
    assert!(read_line(&mut c).await.starts_with("-ERR [SYS/TEMP] "));
}

#[tokio::test]
async fn the_proxy_header_after_stls_carries_the_tls_details() {
    let pki = Pki::new();
    let cert = pki.issue("mx", &[HOST], false);
    let options = FakeOptions {
        expect_proxy_v2: true,
        ..FakeOptions::default()
    };
    let backend = FakeBackend::start_with(FakeKind::Pop3, options).await;
    let yaml = config_yaml(
        &[&cert],
        &[listener_yaml("pop3", "pop3", "starttls", backend.addr)
            + "    backend_proxy_protocol: true\n"],
        "",
    );
    let proxy = Proxy::start(&yaml, pki.dir.path()).await;
    let s = Setup {
        pki,
        backend,
        proxy,
    };
    let mut c = s.connect_stls().await;
    assert_eq!(line(&mut c, "USER u").await, "+OK\r\n");
    assert_eq!(line(&mut c, "PASS secret").await, "+OK Logged in.\r\n");
    let headers = s.backend.proxy_headers.connections();
    assert_eq!(headers.len(), 1);
    // PROXY v2 over IPv4: 16 fixed octets, 12 of addresses, then TLVs (type, u16 length).
    let mut tlvs = &headers[0][28..];
    let mut types = Vec::new();
    while tlvs.len() >= 3 {
        let len = usize::from(u16::from_be_bytes([tlvs[1], tlvs[2]]));
        types.push(tlvs[0]);
        tlvs = &tlvs[3 + len..];
    }
    assert!(types.contains(&0x20), "PP2_TYPE_SSL expected: {types:?}");
}

#[tokio::test]
async fn too_many_commands_before_login_end_the_session() {
    let s = setup("implicit", "limits:\n  preauth_commands: 2\n").await;
    let mut c = s.connect().await;
    assert!(line(&mut c, "NOOP").await.starts_with("-ERR"));
    assert!(line(&mut c, "NOOP").await.starts_with("-ERR"));
    assert_eq!(
        line(&mut c, "NOOP").await,
        "-ERR Too many commands before authentication\r\n"
    );
    assert_eq!(read_line(&mut c).await, "");
}

#[tokio::test]
async fn an_over_long_command_line_is_refused_and_the_session_goes_on() {
    let s = setup("implicit", "").await;
    let mut c = s.connect().await;
    let long = format!("USER {}", "x".repeat(600));
    assert_eq!(line(&mut c, &long).await, "-ERR Command line too long\r\n");
    assert!(multiline(&mut c, "CAPA").await.ends_with(".\r\n"));
    // The refused USER is not the one a login sends the backend.
    assert_eq!(line(&mut c, "USER u").await, "+OK\r\n");
    assert!(line(&mut c, "PASS secret").await.starts_with("+OK"));
    assert_eq!(s.backend.recorder.all_text(), "USER u\r\nPASS secret\r\n");
}

/// `timeouts.idle` from the config reaches the session: a short one ends a silent client with
/// the goodbye. How long it takes, and that octets without a line end do not keep a session, is
/// `drivers::timing`'s to check, to the exact virtual instant.
#[tokio::test]
async fn an_idle_client_is_told_before_the_close() {
    let s = setup("implicit", "timeouts:\n  idle: 300ms\n").await;
    let mut c = s.connect().await;
    assert_eq!(
        read_line(&mut c).await,
        "-ERR Disconnected for inactivity\r\n"
    );
    assert_eq!(read_line(&mut c).await, "", "closed");
}

/// The server's shutdown reaches a session before login. A grace far longer than the test: the
/// goodbye must not wait for it (`read_line` gives up after `TIMEOUT`, well inside the grace);
/// that it comes at once is `drivers::timing::pop3_shutdown_before_login_says_goodbye_at_once`.
#[tokio::test]
async fn shutdown_before_login_says_goodbye() {
    let s = setup("implicit", "timeouts:\n  shutdown_grace: 60s\n").await;
    let mut c = s.connect().await;
    s.proxy.control.shutdown.cancel();
    assert_eq!(
        read_line(&mut c).await,
        "-ERR [SYS/TEMP] Server shutting down\r\n"
    );
    assert_eq!(read_line(&mut c).await, "", "closed");
}

fn python(code: &str) -> Option<(bool, String)> {
    if !tool_or_skip("a python3 client test", "python3") {
        return None;
    }
    let out = std::process::Command::new("python3")
        .args(["-c", code])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Some((out.status.success(), text))
}

#[tokio::test]
async fn python_poplib_logs_in_over_implicit_tls_and_after_stls() {
    let s = setup("implicit", "").await;
    let code = format!(
        r#"
import poplib, ssl, socket
ctx = ssl.create_default_context(cafile={ca:?})
class C(poplib.POP3_SSL):
    def _create_socket(self, timeout):
        return ctx.wrap_socket(socket.create_connection(("127.0.0.1", {port}), 10), server_hostname="{HOST}")
m = C("{HOST}", {port}, context=ctx)
assert b"STLS" not in m.capa(), m.capa()
m.user("u")
m.pass_("secret")
resp, lines, octets = m.retr(1)
print(b"\n".join(lines).decode())
m.quit()
"#,
        ca = s.pki.ca_path().display().to_string(),
        port = s.proxy.addr("pop3").port()
    );
    let Some((ok, out)) = tokio::task::spawn_blocking(move || python(&code))
        .await
        .unwrap()
    else {
        return;
    };
    assert!(ok && out.contains("hello pop3"), "{out}");

    let s = setup("starttls", "").await;
    let code = format!(
        r#"
import poplib, ssl, socket
ctx = ssl.create_default_context(cafile={ca:?})
class C(poplib.POP3):
    def _create_socket(self, timeout):
        return socket.create_connection(("127.0.0.1", {port}), 10)
m = C("{HOST}", {port})
caps = m.capa()
assert "STLS" in caps and "USER" not in caps, caps
m.stls(context=ctx)
caps = m.capa()
assert "STLS" not in caps and "USER" in caps, caps
m.user("u")
m.pass_("secret")
print("stat", m.stat())
m.quit()
"#,
        ca = s.pki.ca_path().display().to_string(),
        port = s.proxy.addr("pop3").port()
    );
    let (ok, out) = tokio::task::spawn_blocking(move || python(&code))
        .await
        .unwrap()
        .unwrap();
    assert!(ok && out.contains("stat (1,"), "{out}");
}

#[tokio::test]
async fn curl_fetches_over_pop3s() {
    if !tool_or_skip("curl_fetches_over_pop3s", "curl") {
        return;
    }
    let s = setup("implicit", "").await;
    let port = s.proxy.addr("pop3").port();
    let ca = s.pki.ca_path();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("curl")
            .args([
                "-sS",
                "--max-time",
                "10",
                "--cacert",
                &ca.display().to_string(),
                "--resolve",
                &format!("{HOST}:{port}:127.0.0.1"),
                "--user",
                "u:secret",
                &format!("pop3s://{HOST}:{port}/1"),
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("hello pop3"),
        "{text}"
    );
}

#[tokio::test]
async fn lines_pipelined_past_an_auth_exchange_never_reach_the_backend_as_commands() {
    let s = setup("implicit", "").await;
    let mut c = s.connect().await;
    // Cancel, then XCLIENT (Dovecot trusts it from mailfront) before the backend asked for a
    // response: one line per `+`, the rest is parsed as commands again after the -ERR.
    send(
        &mut c,
        b"AUTH PLAIN\r\n*\r\nXCLIENT ADDR=1.2.3.4\r\nNOOP\r\n",
    )
    .await;
    assert_eq!(read_line(&mut c).await, "+ \r\n");
    assert!(read_line(&mut c).await.starts_with("-ERR [AUTH]"));
    assert_eq!(read_line(&mut c).await, "-ERR Command not permitted\r\n");
    assert_eq!(read_line(&mut c).await, NOT_YET);
    assert_eq!(s.backend.recorder.all_text(), "AUTH PLAIN\r\n*\r\n");
}

#[tokio::test]
async fn auth_without_a_mechanism_lists_mechanisms_over_tls_without_external() {
    let s = setup("implicit", "").await;
    let mut c = s.connect().await;
    assert_eq!(multiline(&mut c, "AUTH").await, "+OK\r\nPLAIN\r\n.\r\n");
    // An empty initial response is forwarded as is; the backend decides.
    assert!(
        line(&mut c, "AUTH PLAIN =")
            .await
            .starts_with("-ERR [AUTH]")
    );
    let ir = BASE64_STANDARD.encode(b"\0u\0secret");
    assert_eq!(
        line(&mut c, &format!("AUTH PLAIN {ir}")).await,
        "+OK Logged in.\r\n"
    );
    assert!(multiline(&mut c, "LIST").await.ends_with(".\r\n"));
    assert_eq!(
        s.backend.recorder.all_text(),
        format!("AUTH\r\nAUTH PLAIN =\r\nAUTH PLAIN {ir}\r\nLIST\r\n")
    );
}

/// APOP digests the greeting's timestamp (RFC 1939 §7), and the client only ever sees
/// mailfront's greeting, which has none: on 995 as on 110, APOP is refused here and opens no
/// backend connection, even when the backend's own greeting carries a timestamp.
#[tokio::test]
async fn apop_is_refused_over_implicit_tls_too_for_want_of_a_timestamp() {
    let options = FakeOptions {
        pop3_greeting: "+OK fake POP3 ready <1896.697170952@backend.test>\r\n".into(),
        ..FakeOptions::default()
    };
    let s = setup_with("implicit", options, "").await;
    let mut c = s.connect().await;
    assert_eq!(
        line(&mut c, "APOP u c4c9334bac560ecc979e58001b3e22fb").await,
        "-ERR APOP not available here; use USER/PASS or AUTH\r\n"
    );
    assert_eq!(line(&mut c, "USER u").await, "+OK\r\n");
    assert_eq!(line(&mut c, "PASS secret").await, "+OK Logged in.\r\n");
    assert_eq!(
        s.backend.recorder.connections(),
        vec![b"USER u\r\nPASS secret\r\n".to_vec()],
        "the APOP never went out"
    );
}

#[tokio::test]
async fn quit_ends_with_close_notify_before_and_after_login() {
    let s = setup("implicit", "").await;
    // read_line fails on a TCP close without close_notify (rustls: unexpected EOF).
    let mut c = s.connect().await;
    assert_eq!(
        line(&mut c, "QUIT").await,
        "+OK Logging out\r\n",
        "mailfront's own"
    );
    assert_eq!(read_line(&mut c).await, "");
    let mut c = s.connect().await;
    assert_eq!(line(&mut c, "USER u").await, "+OK\r\n");
    assert_eq!(line(&mut c, "PASS secret").await, "+OK Logged in.\r\n");
    assert_eq!(line(&mut c, "QUIT").await, "+OK Logging out.\r\n");
    assert_eq!(read_line(&mut c).await, "");
}

/// `timeouts.login` from the config reaches the session (here below `timeouts.idle`, so only
/// it can end a silent client), and the close is counted as `login_timeout` on the client's
/// side. In cleartext on 110, so no TLS handshake has to fit in the deadline on a loaded
/// machine. A trickling client, a logged-in one and the exact instant are `drivers::timing`'s.
#[tokio::test]
async fn a_client_is_cut_off_at_the_configured_login_timeout() {
    let s = setup("starttls", "timeouts:\n  login: 500ms\n  idle: 60s\n").await;
    let mut c = s.connect_plain().await;
    assert_eq!(
        read_line(&mut c).await,
        "-ERR Disconnected: login took too long\r\n"
    );
    assert_eq!(read_line(&mut c).await, "");
    eventually(|| {
        s.metrics()
            .contains("reason=\"login_timeout\",side=\"client\"} 1")
    })
    .await;
    assert!(s.backend.recorder.connections().is_empty());
}
