//! IMAP through the proxy: the ID `tls` field, capability views, no cleartext login, STARTTLS
//! injection defence, limits, and the byte relay after login — with a real rustls client, Python
//! imaplib and curl against the recording fake backend.
// Helpers outside #[test] functions: clippy's allow-*-in-tests does not reach them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use crate::common::*;
use base64::prelude::{BASE64_STANDARD, Engine as _};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const HOST: &str = "mx.example.test";

fn versions() -> Vec<&'static rustls::SupportedProtocolVersion> {
    vec![&rustls::version::TLS13, &rustls::version::TLS12]
}

struct Setup {
    pki: Pki,
    backend: FakeBackend,
    proxy: Proxy,
}

async fn setup(tls: &str, options: FakeOptions, extra: &str) -> Setup {
    let pki = Pki::new();
    let cert = pki.issue("mx", &[HOST], false);
    let backend = FakeBackend::start_with(FakeKind::Imap, options).await;
    let yaml = config_yaml(
        &[&cert],
        &[listener_yaml("imap", "imap", tls, backend.addr)],
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
        client_config(&self.pki.ca_der, &versions(), None)
    }

    /// Implicit TLS: the stream, the greeting and the IANA name of the negotiated suite.
    async fn connect(
        &self,
    ) -> (
        BufReader<tokio_rustls::client::TlsStream<TcpStream>>,
        String,
        String,
    ) {
        let tls = tls_connect(self.proxy.addr("imap"), HOST, self.config())
            .await
            .unwrap();
        let cipher = cipher_of(&tls);
        let mut tls = BufReader::new(tls);
        let greeting = read_line(&mut tls).await;
        (tls, greeting, cipher)
    }

    async fn connect_plain(&self) -> (BufReader<TcpStream>, String) {
        let tcp = TcpStream::connect(self.proxy.addr("imap")).await.unwrap();
        let mut tcp = BufReader::new(tcp);
        let greeting = read_line(&mut tcp).await;
        (tcp, greeting)
    }

    fn metrics(&self) -> String {
        self.proxy.metrics.encode()
    }
}

fn cipher_of<S>(tls: &tokio_rustls::client::TlsStream<S>) -> String {
    let suite = tls.get_ref().1.negotiated_cipher_suite().unwrap().suite();
    mailfront::tls::names::cipher_suite_name(u16::from(suite)).into_owned()
}

async fn send<S: AsyncRead + AsyncWrite + Unpin>(s: &mut BufReader<S>, bytes: &[u8]) {
    s.get_mut().write_all(bytes).await.unwrap();
}

async fn command<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut BufReader<S>,
    tag: &str,
    line: &str,
) -> String {
    send(s, format!("{tag} {line}\r\n").as_bytes()).await;
    read_until_tag(s, tag).await
}

fn count(haystack: &str, needle: &str) -> usize {
    haystack.matches(needle).count()
}

/// Everything the backend received on its first connection, as text (the listener's capability
/// probe, which ran before any session, left out).
fn first_connection(backend: &FakeBackend) -> String {
    String::from_utf8_lossy(&backend.recorder.connections()[0]).into_owned()
}

/// Whether `line` is `command` under one of mailfront's own tags (`mf…`), as it sends the ID it
/// writes before a login.
fn ours(line: &str, command: &str) -> bool {
    line.split_once(' ')
        .is_some_and(|(tag, rest)| tag.starts_with("mf") && rest == command)
}

#[tokio::test]
async fn client_id_arrives_with_the_negotiated_cipher_and_without_forged_fields() {
    let s = setup("implicit", FakeOptions::default(), "").await;
    let (mut c, greeting, cipher) = s.connect().await;
    assert!(greeting.starts_with("* OK [CAPABILITY "), "{greeting}");
    // Before a login mailfront answers ID itself (RFC 2971 §3.2) and keeps the client's fields
    // for the ID it sends the backend right before the login.
    let reply = command(
        &mut c,
        "a",
        r#"ID ("name" "mutt" "TLS" "forged" "X-Originating-IP" "1.2.3.4" "x-multiplex" "0")"#,
    )
    .await;
    assert_eq!(reply, "* ID NIL\r\na OK ID completed\r\n");
    assert!(
        s.backend.recorder.connections().is_empty(),
        "no backend yet"
    );
    assert!(
        command(&mut c, "b", "LOGIN u secret")
            .await
            .contains("b OK")
    );

    let seen = first_connection(&s.backend);
    let first = seen.lines().next().unwrap();
    assert!(
        ours(
            first,
            &format!("ID (\"name\" \"mutt\" \"tls\" \"{cipher}\")")
        ),
        "{seen}"
    );
    assert_eq!(seen.lines().nth(1), Some("b LOGIN \"u\" \"secret\""));
    assert!(!seen.contains("forged") && !seen.contains("1.2.3.4") && !seen.contains("multiplex"));
    assert_eq!(count(&seen, " ID "), 1, "no second ID of ours: {seen}");
    assert!(s.metrics().contains(
        r#"mailfront_imap_id_tls_fields_added_total{listener="imap",source="client"} 1"#
    ));
}

#[tokio::test]
async fn id_nil_becomes_a_list_holding_only_our_field() {
    let s = setup("implicit", FakeOptions::default(), "").await;
    let (mut c, _, cipher) = s.connect().await;
    assert_eq!(
        command(&mut c, "a", "ID NIL").await,
        "* ID NIL\r\na OK ID completed\r\n"
    );
    assert!(
        command(&mut c, "b", "LOGIN u secret")
            .await
            .contains("b OK")
    );
    let seen = first_connection(&s.backend);
    let first = seen.lines().next().unwrap();
    assert!(ours(first, &format!("ID (\"tls\" \"{cipher}\")")), "{seen}");
    assert_eq!(count(&seen, " ID "), 1, "{seen}");
}

#[tokio::test]
async fn client_without_id_gets_one_proxy_id_before_login_and_never_sees_our_tag() {
    let s = setup("implicit", FakeOptions::default(), "").await;
    let (mut c, _, cipher) = s.connect().await;
    let reply = command(&mut c, "a", "LOGIN u secret").await;
    assert!(
        reply.starts_with("a OK [CAPABILITY IMAP4rev1 IDLE]"),
        "{reply}"
    );
    assert!(!reply.contains("* ID") && !reply.contains("mf"), "{reply}");
    let seen = first_connection(&s.backend);
    let id_line = seen.lines().next().unwrap();
    assert!(id_line.starts_with("mf"), "{seen}");
    assert!(
        id_line.ends_with(&format!(" ID (\"tls\" \"{cipher}\")")),
        "{id_line}"
    );
    assert_eq!(seen.lines().nth(1), Some("a LOGIN \"u\" \"secret\""));
    assert_eq!(count(&seen, " ID "), 1);
    assert!(
        s.metrics().contains(
            r#"mailfront_imap_id_tls_fields_added_total{listener="imap",source="proxy"} 1"#
        )
    );
    assert!(s.metrics().contains(
        r#"mailfront_auth_outcomes_total{listener="imap",protocol="imap",result="success"} 1"#
    ));
}

#[tokio::test]
async fn failed_login_sends_no_second_id_and_a_pipelined_command_waits_for_the_answer() {
    let s = setup("implicit", FakeOptions::default(), "").await;
    let (mut c, _, _) = s.connect().await;
    send(&mut c, b"a LOGIN u wrong\r\nb NOOP\r\n").await;
    let reply = read_until_tag(&mut c, "b").await;
    assert!(reply.contains("a NO [AUTHENTICATIONFAILED]"), "{reply}");
    assert!(reply.contains("b OK"), "{reply}");
    // After NO the proxy still parses: LOGIN, then a pipelined SELECT that runs after OK.
    send(&mut c, b"c LOGIN u secret\r\nd SELECT INBOX\r\n").await;
    let reply = read_until_tag(&mut c, "d").await;
    assert!(
        reply.contains("c OK") && reply.contains("d OK [READ-WRITE]"),
        "{reply}"
    );
    let seen = first_connection(&s.backend);
    assert_eq!(count(&seen, " ID "), 1, "{seen}");
    assert!(s.metrics().contains(
        r#"mailfront_auth_outcomes_total{listener="imap",protocol="imap",result="failure"} 1"#
    ));
}

#[tokio::test]
async fn login_with_literal_passwords_works_and_the_session_is_relayed() {
    let s = setup("implicit", FakeOptions::default(), "").await;
    let (mut c, _, _) = s.connect().await;
    send(&mut c, b"a LOGIN u {6}\r\n").await;
    assert!(read_line(&mut c).await.starts_with("+"));
    send(&mut c, b"secret\r\n").await;
    assert!(read_until_tag(&mut c, "a").await.contains("a OK"));
    let select = command(&mut c, "b", "SELECT INBOX").await;
    assert!(select.contains("* 1 EXISTS"), "{select}");
    let fetch = command(&mut c, "c", "FETCH 1 BODY[]").await;
    assert!(fetch.contains("hello imap"), "{fetch}");

    // Non-synchronising literals for both arguments.
    let (mut c, _, _) = s.connect().await;
    send(&mut c, b"a LOGIN {1+}\r\nu {6+}\r\nsecret\r\n").await;
    assert!(read_until_tag(&mut c, "a").await.contains("a OK"));
    assert!(command(&mut c, "b", "NOOP").await.contains("b OK"));
}

#[tokio::test]
async fn authenticate_plain_works_with_an_initial_response_and_with_a_continuation() {
    let s = setup("implicit", FakeOptions::default(), "").await;
    let ir = BASE64_STANDARD.encode(b"\0u\0secret");
    let (mut c, _, _) = s.connect().await;
    let reply = command(&mut c, "a", &format!("AUTHENTICATE PLAIN {ir}")).await;
    assert!(reply.contains("a OK"), "{reply}");
    assert!(command(&mut c, "b", "LIST \"\" *").await.contains("INBOX"));

    let (mut c, _, _) = s.connect().await;
    send(&mut c, b"a AUTHENTICATE PLAIN\r\n").await;
    assert!(read_line(&mut c).await.starts_with("+"));
    send(&mut c, format!("{ir}\r\n").as_bytes()).await;
    assert!(read_until_tag(&mut c, "a").await.contains("a OK"));

    // A cancelled exchange gets the backend's BAD and the session goes on.
    let (mut c, _, _) = s.connect().await;
    send(&mut c, b"a AUTHENTICATE PLAIN\r\n").await;
    assert!(read_line(&mut c).await.starts_with("+"));
    send(&mut c, b"*\r\n").await;
    assert!(read_until_tag(&mut c, "a").await.contains("a BAD"));
    assert!(command(&mut c, "b", "NOOP").await.contains("b OK"));
}

#[tokio::test]
async fn implicit_tls_capabilities_hide_starttls_and_logindisabled() {
    let options = FakeOptions {
        imap_capabilities: "IMAP4rev1 ID STARTTLS LOGINDISABLED AUTH=PLAIN AUTH=EXTERNAL".into(),
        ..FakeOptions::default()
    };
    let s = setup("implicit", options, "").await;
    let (mut c, greeting, _) = s.connect().await;
    // mailfront's own greeting, with the capabilities its probe learned from the backend.
    assert_eq!(
        greeting,
        format!("* OK [CAPABILITY IMAP4rev1 ID AUTH=PLAIN] {HOST} ready\r\n")
    );
    let reply = command(&mut c, "a", "CAPABILITY").await;
    assert!(
        reply.starts_with("* CAPABILITY IMAP4rev1 ID AUTH=PLAIN\r\n"),
        "{reply}"
    );
    assert!(command(&mut c, "b", "STARTTLS").await.contains("b BAD"));
}

#[tokio::test]
async fn starttls_listener_shows_logindisabled_and_refuses_credentials_before_tls() {
    let s = setup("starttls", FakeOptions::default(), "").await;
    let (mut c, greeting) = s.connect_plain().await;
    assert!(
        greeting.contains("STARTTLS") && greeting.contains("LOGINDISABLED"),
        "{greeting}"
    );
    assert!(!greeting.contains("AUTH="), "{greeting}");
    let caps = command(&mut c, "a", "CAPABILITY").await;
    assert!(
        caps.contains("STARTTLS") && caps.contains("LOGINDISABLED"),
        "{caps}"
    );
    assert!(!caps.contains("AUTH="), "{caps}");

    let refused = "NO [PRIVACYREQUIRED] Cleartext authentication disallowed; use STARTTLS first";
    assert!(
        command(&mut c, "b", "LOGIN u secret")
            .await
            .contains(refused)
    );
    assert!(
        command(&mut c, "c", "LOGIN u wrong")
            .await
            .contains(refused)
    );
    let ir = BASE64_STANDARD.encode(b"\0u\0secret");
    let reply = command(&mut c, "d", &format!("AUTHENTICATE PLAIN {ir}")).await;
    assert!(reply.contains(refused));
    assert!(
        command(&mut c, "e", "AUTHENTICATE PLAIN")
            .await
            .contains(refused)
    );
    // A synchronising literal is refused before any `+`: the password is never asked for.
    send(&mut c, b"f LOGIN u {6}\r\n").await;
    assert!(read_line(&mut c).await.starts_with(&format!("f {refused}")));
    assert!(command(&mut c, "g", "NOOP").await.contains("g OK"));
    // ID before TLS is answered here, so the backend's first ID is the one with tls.
    assert!(command(&mut c, "h", "ID NIL").await.contains("* ID NIL"));

    let seen = s.backend.recorder.all_text();
    assert!(
        !seen.contains("LOGIN") && !seen.contains("AUTHENTICATE"),
        "{seen}"
    );
    assert!(!seen.contains("secret") && !seen.contains(&ir) && !seen.contains(" ID "));
    assert!(
        s.metrics().contains(
            r#"mailfront_cleartext_auth_refused_total{listener="imap",protocol="imap"} 5"#
        )
    );
}

#[tokio::test]
async fn login_pipelined_after_starttls_is_discarded_and_login_works_after_tls() {
    let s = setup("starttls", FakeOptions::default(), "").await;
    let (mut c, _) = s.connect_plain().await;
    send(&mut c, b"a STARTTLS\r\nb LOGIN u secret\r\n").await;
    assert_eq!(
        read_line(&mut c).await,
        "a OK Begin TLS negotiation now\r\n"
    );
    let tls = tls_upgrade(c.into_inner(), HOST, s.config()).await.unwrap();
    let cipher = cipher_of(&tls);
    let mut c = BufReader::new(tls);
    let caps = command(&mut c, "c", "CAPABILITY").await;
    assert!(
        !caps.contains("STARTTLS") && !caps.contains("LOGINDISABLED"),
        "{caps}"
    );
    assert!(caps.contains("AUTH=PLAIN"), "{caps}");
    assert!(
        !caps.contains("b OK"),
        "the pipelined LOGIN never ran: {caps}"
    );
    assert!(command(&mut c, "d", "STARTTLS").await.contains("d BAD"));
    assert!(
        command(&mut c, "e", "LOGIN u secret")
            .await
            .contains("e OK")
    );

    let seen = first_connection(&s.backend);
    assert!(!seen.contains("b LOGIN"), "{seen}");
    let id = seen.lines().find(|l| l.contains(" ID ")).unwrap();
    assert!(
        id.ends_with(&format!("ID (\"tls\" \"{cipher}\")")),
        "{seen}"
    );
    assert!(seen.find(" ID ").unwrap() < seen.find("e LOGIN").unwrap());
    assert!(
        s.metrics()
            .contains(r#"mailfront_starttls_upgrades_total{listener="imap",protocol="imap"} 1"#)
            || s.metrics()
                .contains(r#"mailfront_starttls_upgrades_total{listener="imap"} 1"#)
    );
}

/// A backend whose greeting names no capabilities: the listener's probe asks CAPABILITY, no
/// client sees that exchange, and sessions are greeted by mailfront with what it learned.
#[tokio::test]
async fn a_greeting_without_capabilities_is_probed_and_the_probe_stays_hidden() {
    let options = FakeOptions {
        imap_greeting_capabilities: false,
        ..FakeOptions::default()
    };
    let s = setup("implicit", options, "").await;
    let (mut c, greeting, cipher) = s.connect().await;
    assert_eq!(
        greeting,
        format!(
            "* OK [CAPABILITY IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ AUTH=PLAIN] {HOST} ready\r\n"
        )
    );
    assert_eq!(s.backend.recorder.probes(), 1);
    let reply = command(&mut c, "a", "LOGIN u secret").await;
    assert!(!reply.contains("CAPABILITY IMAP4rev1 SASL-IR"), "{reply}");
    assert!(reply.starts_with("a OK"), "{reply}");
    let seen = first_connection(&s.backend);
    let lines: Vec<&str> = seen.lines().collect();
    // The login's own connection asks too, the greeting having said nothing; the client never
    // sees the answer.
    assert!(ours(lines[0], "CAPABILITY"), "{seen}");
    assert!(
        lines[1].ends_with(&format!(" ID (\"tls\" \"{cipher}\")")),
        "{seen}"
    );
    assert_eq!(lines[2], "a LOGIN \"u\" \"secret\"");
}

#[tokio::test]
async fn a_backend_without_id_gets_no_id() {
    let options = FakeOptions {
        imap_capabilities: "IMAP4rev1 AUTH=PLAIN".into(),
        ..FakeOptions::default()
    };
    let s = setup("implicit", options, "").await;
    let (mut c, _, _) = s.connect().await;
    assert!(
        command(&mut c, "a", "LOGIN u secret")
            .await
            .contains("a OK")
    );
    assert_eq!(first_connection(&s.backend), "a LOGIN \"u\" \"secret\"\r\n");
}

#[tokio::test]
async fn a_preauth_greeting_is_never_relayed() {
    let options = FakeOptions {
        imap_preauth: true,
        ..FakeOptions::default()
    };
    let s = setup("implicit", options, "").await;
    let (mut c, greeting, _) = s.connect().await;
    assert_eq!(greeting, "* BYE [UNAVAILABLE] Server misconfigured\r\n");
    assert_eq!(read_line(&mut c).await, "", "closed");
}

#[tokio::test]
async fn too_many_commands_before_login_end_the_session() {
    let s = setup(
        "implicit",
        FakeOptions::default(),
        "limits:\n  preauth_commands: 3\n",
    )
    .await;
    let (mut c, _, _) = s.connect().await;
    for tag in ["a", "b", "c"] {
        assert!(command(&mut c, tag, "NOOP").await.contains(" OK"));
    }
    send(&mut c, b"d NOOP\r\n").await;
    assert_eq!(
        read_line(&mut c).await,
        "* BYE Too many commands before authentication\r\n"
    );
    assert_eq!(read_line(&mut c).await, "");
}

#[tokio::test]
async fn oversized_literals_are_refused_protocol_correctly() {
    let s = setup(
        "implicit",
        FakeOptions::default(),
        "limits:\n  imap_literal: 1024\n",
    )
    .await;
    let (mut c, _, _) = s.connect().await;
    // Synchronising: BAD instead of `+`; the client sends nothing more and the session goes on.
    send(&mut c, b"a LOGIN u {5000}\r\n").await;
    assert_eq!(
        read_line(&mut c).await,
        "a BAD [TOOBIG] Literal too big\r\n"
    );
    assert!(command(&mut c, "b", "NOOP").await.contains("b OK"));
    // Non-synchronising: the octets are already coming, so BAD, BYE and close.
    send(&mut c, b"c LOGIN u {5000+}\r\n").await;
    assert_eq!(
        read_line(&mut c).await,
        "c BAD [TOOBIG] Literal too big\r\n"
    );
    assert_eq!(read_line(&mut c).await, "* BYE Protocol error\r\n");
    assert_eq!(read_line(&mut c).await, "");
    assert!(!s.backend.recorder.all_text().contains("LOGIN"));
}

#[tokio::test]
async fn the_default_literal_limit_takes_8_kib_and_refuses_more() {
    let s = setup("implicit", FakeOptions::default(), "").await;
    let (mut c, _, _) = s.connect().await;
    send(&mut c, b"a LOGIN u {8193}\r\n").await;
    assert_eq!(
        read_line(&mut c).await,
        "a BAD [TOOBIG] Literal too big\r\n"
    );
    // 8192 octets are taken: the backend judges the (wrong) password.
    send(&mut c, b"b LOGIN u {8192}\r\n").await;
    assert!(read_line(&mut c).await.starts_with("+"));
    send(&mut c, &[b'x'; 8192]).await;
    send(&mut c, b"\r\n").await;
    let reply = read_until_tag(&mut c, "b").await;
    assert!(reply.contains("b NO"), "{reply}");
    assert!(command(&mut c, "c", "NOOP").await.contains("c OK"));
}

/// `timeouts.idle` from the config reaches the session: a short one ends a silent client with
/// the BYE. The exact instant is `drivers::imap_implicit_tls_idle_client_is_logged_out_after_exactly_the_idle_timeout`'s.
#[tokio::test]
async fn an_idle_client_gets_bye_before_login() {
    let s = setup(
        "implicit",
        FakeOptions::default(),
        "timeouts:\n  idle: 300ms\n",
    )
    .await;
    let (mut c, _, _) = s.connect().await;
    assert_eq!(
        read_line(&mut c).await,
        "* BYE Autologout; idle for too long\r\n"
    );
}

/// The server's shutdown reaches a session before login. A grace far longer than the test: the
/// goodbye must not wait for it (`read_line` gives up after `TIMEOUT`, well inside the grace);
/// that it comes at once is `drivers::timing::imap_shutdown_before_login_says_bye_at_once`.
#[tokio::test]
async fn shutdown_before_login_says_bye() {
    let s = setup(
        "implicit",
        FakeOptions::default(),
        "timeouts:\n  shutdown_grace: 60s\n",
    )
    .await;
    let (mut c, _, _) = s.connect().await;
    s.proxy.control.shutdown.cancel();
    assert_eq!(
        read_line(&mut c).await,
        "* BYE [UNAVAILABLE] Server shutting down\r\n"
    );
}

/// An HTTP GET on the admin endpoint: the status line, or "" when nothing answers.
async fn admin_status(s: &Setup, path: &str) -> String {
    use tokio::io::AsyncReadExt;
    let Ok(mut tcp) = TcpStream::connect(s.proxy.admin.unwrap()).await else {
        return String::new();
    };
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    if tcp.write_all(request.as_bytes()).await.is_err() {
        return String::new();
    }
    let mut out = String::new();
    let _ = tokio::time::timeout(TIMEOUT, tcp.read_to_string(&mut out)).await;
    out.lines().next().unwrap_or_default().to_owned()
}

/// The server's side of the drain: readiness off at once, the cleartext session's BYE, and the
/// relay kept until the configured grace runs out, when the server's hard stop closes it. The
/// session's side to the exact instant (BYE at once, the relay closed the instant the hard stop
/// comes) is `drivers::timing`'s.
#[tokio::test]
async fn drain_says_bye_before_login_at_once_and_keeps_relays_until_the_grace_runs_out() {
    const GRACE: Duration = Duration::from_secs(2);
    let s = setup(
        "starttls",
        FakeOptions::default(),
        "timeouts:\n  shutdown_grace: 2s\n",
    )
    .await;
    // Pre-login in cleartext (no backend yet), and an authenticated relay after STARTTLS.
    let (mut cleartext, _) = s.connect_plain().await;
    let (mut relayed, _) = s.connect_plain().await;
    assert!(
        command(&mut relayed, "a", "STARTTLS")
            .await
            .contains("a OK")
    );
    let tls = tls_upgrade(relayed.into_inner(), HOST, s.config())
        .await
        .unwrap();
    let mut relayed = BufReader::new(tls);
    assert!(
        command(&mut relayed, "b", "LOGIN u secret")
            .await
            .contains("b OK")
    );
    for _ in 0..50 {
        if admin_status(&s, "/readyz").await.contains("200") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let started = tokio::time::Instant::now();
    s.proxy.control.shutdown.cancel();
    assert_eq!(
        read_line(&mut cleartext).await,
        "* BYE [UNAVAILABLE] Server shutting down\r\n"
    );
    assert_eq!(read_line(&mut cleartext).await, "", "closed");
    // Not ready at once, while the admin endpoint still answers during the drain.
    assert!(s.metrics().contains("mailfront_ready 0"));
    assert_eq!(
        admin_status(&s, "/readyz").await,
        "HTTP/1.1 503 Service Unavailable"
    );

    // The relay still works after the drain began…
    let reply = command(&mut relayed, "c", "SELECT INBOX").await;
    assert!(reply.contains("c OK"), "{reply}");
    assert!(started.elapsed() < GRACE);
    // …until shutdown_grace runs out, when the proxy closes it (not before; and within
    // TIMEOUT, not never).
    let mut rest = Vec::new();
    use tokio::io::AsyncReadExt;
    let closed = tokio::time::timeout(TIMEOUT, relayed.read_to_end(&mut rest)).await;
    let took = started.elapsed();
    assert!(closed.is_ok(), "the relay outlived the grace");
    assert!(took >= GRACE - Duration::from_millis(100), "{took:?}");
    assert!(s.metrics().contains(
        r#"mailfront_sessions_closed_total{listener="imap",protocol="imap",reason="shutdown",side="proxy"} 2"#
    ));
}

/// Runs a Python snippet; `None` when python3 is missing.
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
async fn python_imaplib_logs_in_over_implicit_tls_and_after_starttls() {
    let pki_setup = setup("implicit", FakeOptions::default(), "").await;
    let ca = pki_setup.pki.ca_path();
    let port = pki_setup.proxy.addr("imap").port();
    let code = format!(
        r#"
import imaplib, ssl, socket
ctx = ssl.create_default_context(cafile={ca:?})
class C(imaplib.IMAP4_SSL):
    def _create_socket(self, timeout=None):
        return ctx.wrap_socket(socket.create_connection(("127.0.0.1", {port}), 10), server_hostname="{HOST}")
m = C("{HOST}", {port}, ssl_context=ctx)
assert "STARTTLS" not in m.capabilities, m.capabilities
m.login("u", "secret")
typ, data = m.select("INBOX")
assert typ == "OK", (typ, data)
typ, data = m.fetch("1", "(BODY[])")
print(data[0][1].decode())
m.logout()
"#,
        ca = ca.display().to_string()
    );
    let code_clone = code.clone();
    let Some((ok, out)) = tokio::task::spawn_blocking(move || python(&code_clone))
        .await
        .unwrap()
    else {
        return;
    };
    assert!(ok && out.contains("hello imap"), "{out}");
    assert!(
        pki_setup
            .backend
            .recorder
            .all_text()
            .contains("\"tls\" \"TLS_")
    );

    let s = setup("starttls", FakeOptions::default(), "").await;
    let ca = s.pki.ca_path();
    let port = s.proxy.addr("imap").port();
    let code = format!(
        r#"
import imaplib, ssl, socket
ctx = ssl.create_default_context(cafile={ca:?})
class C(imaplib.IMAP4):
    def _create_socket(self, timeout=None):
        return socket.create_connection(("127.0.0.1", {port}), 10)
m = C("{HOST}", {port})
assert "LOGINDISABLED" in m.capabilities, m.capabilities
m.starttls(ssl_context=ctx)
assert "LOGINDISABLED" not in m.capabilities, m.capabilities
m.login("u", "secret")
typ, data = m.select("INBOX")
assert typ == "OK", (typ, data)
print("selected", data)
m.logout()
"#,
        ca = ca.display().to_string()
    );
    let (ok, out) = tokio::task::spawn_blocking(move || python(&code))
        .await
        .unwrap()
        .unwrap();
    assert!(ok && out.contains("selected"), "{out}");
    let seen = s.backend.recorder.all_text();
    assert!(
        seen.contains("\"tls\" \"TLS_") && seen.contains("LOGIN"),
        "{seen}"
    );
}

#[tokio::test]
async fn curl_fetches_over_imaps_and_the_backend_learns_the_cipher() {
    if !tool_or_skip(
        "curl_fetches_over_imaps_and_the_backend_learns_the_cipher",
        "curl",
    ) {
        return;
    }
    let s = setup("implicit", FakeOptions::default(), "").await;
    let port = s.proxy.addr("imap").port();
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
                &format!("imaps://{HOST}:{port}/INBOX;UID=1"),
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("hello imap"),
        "{text}"
    );
    let seen = s.backend.recorder.all_text();
    assert!(seen.contains(" ID (\"tls\" \"TLS_"), "{seen}");
}

#[tokio::test]
async fn sasl_ir_is_hidden_before_starttls_and_shown_after() {
    let s = setup("starttls", FakeOptions::default(), "").await;
    let (mut c, greeting) = s.connect_plain().await;
    assert!(!greeting.contains("SASL-IR"), "{greeting}");
    let caps = command(&mut c, "a", "CAPABILITY").await;
    assert!(
        !caps.contains("SASL-IR") && !caps.contains("AUTH="),
        "{caps}"
    );
    send(&mut c, b"b STARTTLS\r\n").await;
    assert!(read_line(&mut c).await.starts_with("b OK"));
    let tls = tls_upgrade(c.into_inner(), HOST, s.config()).await.unwrap();
    let mut c = BufReader::new(tls);
    let caps = command(&mut c, "c", "CAPABILITY").await;
    assert!(
        caps.contains("SASL-IR") && caps.contains("AUTH=PLAIN"),
        "{caps}"
    );
}

#[tokio::test]
async fn non_synchronizing_and_literal8_login_before_tls_is_refused_and_parsing_stays_in_step() {
    let s = setup("starttls", FakeOptions::default(), "").await;
    let (mut c, _) = s.connect_plain().await;
    let refused = "NO [PRIVACYREQUIRED] Cleartext authentication disallowed; use STARTTLS first";
    // Everything in one segment: the literals are read and dropped, never taken for commands.
    send(
        &mut c,
        b"a LOGIN {5+}\r\nalice {6+}\r\nsecret\r\nb NOOP\r\n\
          f ID (\"name\" {4+}\r\nmutt \"tls\" \"forged\")\r\ne NOOP\r\n",
    )
    .await;
    let reply = read_until_tag(&mut c, "e").await;
    assert_eq!(
        reply,
        format!(
            "a {refused}\r\nb OK NOOP completed\r\n* ID NIL\r\nf OK ID completed\r\n\
             e OK NOOP completed\r\n"
        )
    );
    // A literal8 is never valid before login; its length may not be trusted to resynchronise,
    // so the session ends rather than guess where the next command starts.
    send(&mut c, b"c LOGIN ~{5+}\r\nalice ~{11+}\r\nd LOGOUT\r\n\r\n").await;
    assert!(read_line(&mut c).await.starts_with("c BAD"));
    assert_eq!(read_line(&mut c).await, "* BYE Protocol error\r\n");
    assert_eq!(read_line(&mut c).await, "");
    assert_eq!(s.backend.recorder.connections().len(), 0);
}

#[tokio::test]
async fn an_initial_response_is_refused_here_when_the_backend_lacks_sasl_ir() {
    let options = FakeOptions {
        imap_capabilities: "IMAP4rev1 ID AUTH=PLAIN".into(),
        ..FakeOptions::default()
    };
    let s = setup("implicit", options, "").await;
    let (mut c, greeting, _) = s.connect().await;
    assert!(!greeting.contains("SASL-IR"), "{greeting}");
    let ir = BASE64_STANDARD.encode(b"\0u\0secret");
    let reply = command(&mut c, "a", &format!("AUTHENTICATE PLAIN {ir}")).await;
    assert_eq!(
        reply,
        "a BAD SASL-IR not supported; send AUTHENTICATE without it\r\n"
    );
    // A literal is never an initial response (RFC 9051 §6.2.2): refused before any `+`.
    send(&mut c, b"b AUTHENTICATE PLAIN {20}\r\n").await;
    assert_eq!(
        read_line(&mut c).await,
        "b BAD Initial response must not be a literal\r\n"
    );
    // Without the initial response the exchange works.
    send(&mut c, b"c AUTHENTICATE PLAIN\r\n").await;
    assert!(read_line(&mut c).await.starts_with("+"));
    send(&mut c, format!("{ir}\r\n").as_bytes()).await;
    assert!(read_until_tag(&mut c, "c").await.contains("c OK"));
    let seen = first_connection(&s.backend);
    assert_eq!(count(&seen, &ir), 1, "{seen}");
    assert!(!seen.contains("a AUTHENTICATE") && !seen.contains("b AUTHENTICATE"));
}

#[tokio::test]
async fn lines_pipelined_past_an_authenticate_exchange_never_reach_the_backend_as_commands() {
    let s = setup("implicit", FakeOptions::default(), "").await;
    let (mut c, _, _) = s.connect().await;
    // Cancel, then a forged ID and a NOOP, all before the backend asked for anything.
    send(
        &mut c,
        b"a AUTHENTICATE PLAIN\r\n*\r\nb ID (\"x-originating-ip\" \"1.2.3.4\" \"tls\" \"forged\")\r\nc NOOP\r\n",
    )
    .await;
    let reply = read_until_tag(&mut c, "c").await;
    assert!(reply.starts_with("+ \r\na BAD"), "{reply}");
    assert!(reply.contains("* ID NIL\r\nb OK"), "{reply}");
    assert!(reply.ends_with("c OK NOOP completed\r\n"), "{reply}");
    let seen = first_connection(&s.backend);
    assert!(
        !seen.contains("1.2.3.4") && !seen.contains("forged"),
        "{seen}"
    );
    assert!(
        seen.ends_with("a AUTHENTICATE PLAIN\r\n*\r\nc NOOP\r\n"),
        "{seen}"
    );
}

#[tokio::test]
async fn a_pipelined_command_reaches_the_backend_only_after_the_authentication_answer() {
    let options = FakeOptions {
        slow_auth: true,
        ..FakeOptions::default()
    };
    let s = setup("implicit", options, "").await;
    // The fake answers NO if `b` arrived before its answer to `a`.
    let (mut c, _, _) = s.connect().await;
    send(&mut c, b"a LOGIN u secret\r\nb SELECT INBOX\r\n").await;
    let reply = read_until_tag(&mut c, "b").await;
    assert!(
        reply.contains("a OK") && reply.contains("b OK [READ-WRITE]"),
        "{reply}"
    );

    let ir = BASE64_STANDARD.encode(b"\0u\0secret");
    let (mut c, _, _) = s.connect().await;
    send(
        &mut c,
        format!("a AUTHENTICATE PLAIN {ir}\r\nb SELECT INBOX\r\n").as_bytes(),
    )
    .await;
    let reply = read_until_tag(&mut c, "b").await;
    assert!(
        reply.contains("a OK") && reply.contains("b OK [READ-WRITE]"),
        "{reply}"
    );
    // Held bytes go in order, once.
    let seen = s.backend.recorder.connections()[1].clone();
    let seen = String::from_utf8_lossy(&seen);
    assert!(
        seen.ends_with(&format!("a AUTHENTICATE PLAIN {ir}\r\nb SELECT INBOX\r\n")),
        "{seen}"
    );
}

#[tokio::test]
async fn an_id_with_literals_is_rewritten_and_a_second_id_is_answered_here() {
    let s = setup("implicit", FakeOptions::default(), "").await;
    let (mut c, _, cipher) = s.connect().await;
    send(&mut c, b"a ID (\"name\" {4}\r\n").await;
    assert!(read_line(&mut c).await.starts_with("+"));
    send(&mut c, b"mutt {3+}\r\nTLS \"forged\")\r\n").await;
    // Answered here before a login (RFC 2971 §3.2); its fields are kept for the backend.
    let reply = read_until_tag(&mut c, "a").await;
    assert_eq!(reply, "* ID NIL\r\na OK ID completed\r\n");
    // Only the first ID's fields go to the backend: a second one is answered here and dropped.
    let reply = command(&mut c, "b", "ID (\"tls\" \"forged-again\")").await;
    assert_eq!(reply, "* ID NIL\r\nb OK ID completed\r\n");
    assert!(
        command(&mut c, "c", "LOGIN u secret")
            .await
            .contains("c OK")
    );
    let seen = first_connection(&s.backend);
    let (id, login) = seen.split_once("\r\n").unwrap();
    assert!(
        ours(id, &format!("ID (\"name\" \"mutt\" \"tls\" \"{cipher}\")")),
        "{seen}"
    );
    assert_eq!(login, "c LOGIN \"u\" \"secret\"\r\n");
}

#[tokio::test]
async fn a_client_id_never_reaches_a_backend_without_id() {
    let options = FakeOptions {
        imap_capabilities: "IMAP4rev1 AUTH=PLAIN".into(),
        ..FakeOptions::default()
    };
    let s = setup("implicit", options, "").await;
    let (mut c, _, _) = s.connect().await;
    let reply = command(&mut c, "a", "ID (\"tls\" \"forged\")").await;
    assert_eq!(reply, "* ID NIL\r\na OK ID completed\r\n");
    assert!(
        command(&mut c, "b", "LOGIN u secret")
            .await
            .contains("b OK")
    );
    assert_eq!(first_connection(&s.backend), "b LOGIN \"u\" \"secret\"\r\n");
}

#[tokio::test]
async fn logout_ends_with_close_notify_before_and_after_login() {
    let s = setup("implicit", FakeOptions::default(), "").await;
    // read_line fails on a TCP close without close_notify (rustls: unexpected EOF).
    let (mut c, _, _) = s.connect().await;
    assert!(command(&mut c, "a", "LOGOUT").await.contains("a OK"));
    assert_eq!(read_line(&mut c).await, "");
    let (mut c, _, _) = s.connect().await;
    assert!(
        command(&mut c, "a", "LOGIN u secret")
            .await
            .contains("a OK")
    );
    assert!(command(&mut c, "b", "LOGOUT").await.contains("b OK"));
    assert_eq!(read_line(&mut c).await, "");
}

#[tokio::test]
async fn two_hundred_idle_cleartext_connections_open_no_backend_connection() {
    // All 200 come from 127.0.0.1: the per-address limit (tests/limits.rs) is off here.
    let s = setup(
        "starttls",
        FakeOptions::default(),
        "limits:\n  connections_per_ip: 0\n",
    )
    .await;
    let mut idle = Vec::new();
    for _ in 0..200 {
        let (c, greeting) = s.connect_plain().await;
        assert!(greeting.contains("STARTTLS"), "{greeting}");
        idle.push(c);
    }
    // One more that talks, to be sure the proxy served them all before we look.
    let (mut c, _) = s.connect_plain().await;
    assert!(command(&mut c, "a", "NOOP").await.contains("a OK"));
    assert_eq!(s.backend.recorder.connections().len(), 0);
    // The listener's one capability probe, for all 201.
    assert_eq!(s.backend.recorder.probes(), 1);
    // After STARTTLS CAPABILITY is answered from what the probe learned; a login connects, once.
    send(&mut c, b"b STARTTLS\r\n").await;
    assert!(read_line(&mut c).await.starts_with("b OK"));
    let tls = tls_upgrade(c.into_inner(), HOST, s.config()).await.unwrap();
    let mut c = BufReader::new(tls);
    assert!(command(&mut c, "c", "CAPABILITY").await.contains("c OK"));
    assert_eq!(s.backend.recorder.connections().len(), 0);
    assert!(
        command(&mut c, "d", "LOGIN u secret")
            .await
            .contains("d OK")
    );
    assert_eq!(s.backend.recorder.connections().len(), 1);
    assert_eq!(s.backend.recorder.probes(), 1);
    drop(idle);
}

#[tokio::test]
async fn a_login_smuggled_behind_a_brace_in_an_atom_never_reaches_the_backend_before_tls() {
    let s = setup("starttls", FakeOptions::default(), "").await;
    let (mut c, _) = s.connect_plain().await;
    // The literal-looking `{24+}` closes an atom; Dovecot would run the next line as a command.
    send(&mut c, b"a2 NOOP x{24+}\r\na3 LOGIN alice secret1\r\n\r\n").await;
    let reply = read_until_tag(&mut c, "a3").await;
    assert!(reply.starts_with("a2 BAD"), "{reply}");
    assert!(reply.contains("a3 NO [PRIVACYREQUIRED]"), "{reply}");
    // Synchronising literal sent without waiting, and literal8.
    send(
        &mut c,
        b"b1 NOOP x{24}\r\nb2 LOGIN alice secret1\r\nb3 NOOP ~{24+}\r\n",
    )
    .await;
    let reply = read_until_tag(&mut c, "b2").await;
    assert!(!reply.contains("b2 OK"), "{reply}");
    assert_eq!(s.backend.recorder.connections().len(), 0);
    assert!(
        s.metrics().contains(
            r#"mailfront_cleartext_auth_refused_total{listener="imap",protocol="imap"} 2"#
        )
    );
}

/// Every line the backend got before the login's completion is one mailfront wrote: a known
/// command with mailfront's canonical quoting, never a client line copied through.
fn assert_only_canonical_commands(seen: &str) {
    for line in seen.split("\r\n").filter(|l| !l.is_empty()) {
        let mut words = line.splitn(3, ' ');
        let (_tag, name) = (words.next(), words.next().unwrap_or(""));
        assert!(
            [
                "CAPABILITY",
                "NOOP",
                "LOGOUT",
                "LOGIN",
                "ID",
                "AUTHENTICATE"
            ]
            .contains(&name),
            "unexpected line {line:?} in {seen:?}"
        );
    }
}

#[tokio::test]
async fn after_tls_only_parsed_commands_reach_the_backend_and_a_forged_second_id_is_answered_here()
{
    let s = setup("implicit", FakeOptions::default(), "").await;
    let (mut c, _, cipher) = s.connect().await;
    send(
        &mut c,
        b"a1 ID (\"name\" \"mutt\")\r\n\
          a2 NOOP x{60+}\r\n\
          a3 ID (\"x-originating-ip\" \"192.0.2.66\" \"tls\" \"forged\")\r\n\
          a4 NOOP\nA5 XCLIENT ADDR=192.0.2.66\r\na6 NOOP\r\n",
    )
    .await;
    let reply = read_until_tag(&mut c, "a6").await;
    assert!(reply.contains("a1 OK"), "{reply}");
    assert!(reply.contains("a2 BAD"), "{reply}");
    assert!(reply.contains("* ID NIL\r\na3 OK"), "{reply}");
    assert!(reply.contains("A5 BAD"), "{reply}");
    assert!(reply.contains("a6 OK"), "{reply}");
    // All of it answered here: no backend before a login.
    assert!(s.backend.recorder.connections().is_empty());
    assert!(
        command(&mut c, "a7", "LOGIN u secret")
            .await
            .contains("a7 OK")
    );
    let seen = first_connection(&s.backend);
    let (id, login) = seen.split_once("\r\n").unwrap();
    assert!(
        ours(id, &format!("ID (\"name\" \"mutt\" \"tls\" \"{cipher}\")")),
        "{seen}"
    );
    assert_eq!(login, "a7 LOGIN \"u\" \"secret\"\r\n");
    assert_only_canonical_commands(&seen);
}

/// `timeouts.login` from the config reaches the session (here below `timeouts.idle`, so only
/// it can end a silent client), and the close is counted as `login_timeout` on the client's
/// side. In cleartext on 143, so no TLS handshake has to fit in the deadline on a loaded
/// machine; no backend is connected. Trickling clients on 993 and 143, a logged-in one and the
/// exact instant are `drivers::timing`'s and `drivers`'.
#[tokio::test]
async fn a_client_is_cut_off_at_the_configured_login_timeout() {
    let s = setup(
        "starttls",
        FakeOptions::default(),
        "timeouts:\n  login: 500ms\n  idle: 60s\n",
    )
    .await;
    let (mut c, _) = s.connect_plain().await;
    assert_eq!(
        read_line(&mut c).await,
        "* BYE Autologout; login took too long\r\n"
    );
    assert_eq!(read_line(&mut c).await, "");
    eventually(|| {
        s.metrics()
            .contains("reason=\"login_timeout\",side=\"client\"} 1")
    })
    .await;
    assert!(s.backend.recorder.connections().is_empty());
}

/// The issue's 100 silent TLS connections that took all of Dovecot's login processes: the
/// listener learns its backend's capabilities with one probe, so sessions with TLS up, the
/// first one included, are greeted and answered by mailfront, and only a login connects.
#[tokio::test]
async fn silent_and_capability_only_tls_sessions_open_no_backend_connection_once_learned() {
    // All 50 come from 127.0.0.1: the per-address limit (tests/limits.rs) is off here.
    let s = setup(
        "implicit",
        FakeOptions::default(),
        "limits:\n  connections_per_ip: 0\n",
    )
    .await;
    let local_greeting = format!(
        "* OK [CAPABILITY IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ AUTH=PLAIN] {HOST} ready\r\n"
    );
    // The first session waits for the probe and is greeted by mailfront with what it learned.
    let (mut c, greeting, _) = s.connect().await;
    assert_eq!(greeting, local_greeting);
    assert!(command(&mut c, "a", "LOGOUT").await.contains("a OK"));
    drop(c);
    assert_eq!(s.backend.recorder.probes(), 1);
    assert_eq!(s.backend.recorder.connections().len(), 0);

    let mut held = Vec::new();
    for i in 0..50 {
        let (mut c, greeting, _) = s.connect().await;
        assert_eq!(greeting, local_greeting, "session {i}");
        if i % 2 == 1 {
            assert_eq!(
                command(&mut c, "a", "CAPABILITY").await,
                "* CAPABILITY IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ AUTH=PLAIN\r\n\
                 a OK CAPABILITY completed\r\n"
            );
            assert!(command(&mut c, "b", "NOOP").await.contains("b OK"));
        }
        held.push(c);
    }
    assert_eq!(
        s.backend.recorder.connections().len(),
        0,
        "no backend before a login"
    );
    assert_eq!(s.backend.recorder.probes(), 1);

    // A login connects, and goes after mailfront's ID carrying the client's fields and `tls`.
    let (mut c, _, cipher) = s.connect().await;
    let id = command(&mut c, "a", "ID (\"name\" \"it\")").await;
    assert_eq!(id, "* ID NIL\r\na OK ID completed\r\n");
    let reply = command(&mut c, "b", "LOGIN alice secret").await;
    assert!(reply.starts_with("b OK"), "{reply}");
    let conns = s.backend.recorder.connections();
    assert_eq!(conns.len(), 1);
    let seen = String::from_utf8_lossy(&conns[0]).into_owned();
    let id_at = seen
        .find(&format!(" ID (\"name\" \"it\" \"tls\" \"{cipher}\")\r\n"))
        .unwrap_or_else(|| panic!("{seen}"));
    let login_at = seen.find("b LOGIN").unwrap_or_else(|| panic!("{seen}"));
    assert!(id_at < login_at, "{seen}");
    assert!(!seen.contains("CAPABILITY\r\n"), "{seen}");
    drop(held);
}

/// Issue 22's lazy connect on a listener that does not route by user: 20 sessions at once that
/// only handshake, read the greeting, ask CAPABILITY and LOG OUT cost the backend exactly one
/// connection, the listener's capability probe (the sessions that arrive while it runs wait for
/// its answer), and every one is greeted by mailfront, with the capabilities the probe learned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_tls_sessions_that_never_log_in_cost_one_probe_on_an_unrouted_listener() {
    // All 20 come from 127.0.0.1: the per-address limit (tests/limits.rs) is off here.
    let s = std::sync::Arc::new(
        setup(
            "implicit",
            FakeOptions::default(),
            "limits:\n  connections_per_ip: 0\n",
        )
        .await,
    );
    let capabilities = "IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ AUTH=PLAIN";
    let mut sessions = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let s = s.clone();
        sessions.spawn(async move {
            let (mut c, greeting, _) = s.connect().await;
            let capability = command(&mut c, "a", "CAPABILITY").await;
            let logout = command(&mut c, "b", "LOGOUT").await;
            (greeting, capability, logout)
        });
    }
    while let Some(done) = sessions.join_next().await {
        let (greeting, capability, logout) = done.unwrap();
        assert_eq!(
            greeting,
            format!("* OK [CAPABILITY {capabilities}] {HOST} ready\r\n")
        );
        assert_eq!(
            capability,
            format!("* CAPABILITY {capabilities}\r\na OK CAPABILITY completed\r\n")
        );
        assert!(
            logout.starts_with("* BYE ") && logout.contains("b OK"),
            "{logout}"
        );
    }
    let accepted = s.backend.recorder.accepted_connections();
    assert_eq!(accepted.len(), 1, "backend connections for 20 sessions");
    assert_eq!(accepted[0], b"P1 CAPABILITY\r\nP2 LOGOUT\r\n");
    assert_eq!(s.backend.recorder.probes(), 1);
}
