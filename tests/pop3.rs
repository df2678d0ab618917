//! POP3 through the proxy: CAPA views, no cleartext credentials, STLS injection defence, limits,
//! and the byte relay after login — with a real rustls client, Python poplib and curl against the
//! recording fake backend.

// Helpers outside #[test] functions: clippy's allow-*-in-tests does not reach them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const HOST: &str = "mx.example.test";
const REFUSED: &str = "-ERR [AUTH] Cleartext authentication disallowed; issue STLS first\r\n";

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
        assert_eq!(read_line(&mut tls).await, "+OK fake POP3 ready\r\n");
        tls
    }

    async fn connect_plain(&self) -> BufReader<TcpStream> {
        let tcp = TcpStream::connect(self.proxy.addr("pop3")).await.unwrap();
        let mut tcp = BufReader::new(tcp);
        assert_eq!(read_line(&mut tcp).await, "+OK fake POP3 ready\r\n");
        tcp
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
    let ir = base64_encode(b"\0u\0secret");
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
async fn starttls_listener_hides_user_and_sasl_and_refuses_credentials_before_tls() {
    let s = setup("starttls", "").await;
    let mut c = s.connect_plain().await;
    let capa = multiline(&mut c, "CAPA").await;
    assert_eq!(
        capa,
        "+OK Capability list follows\r\nTOP\r\nUIDL\r\nSTLS\r\nRESP-CODES\r\nPIPELINING\r\n.\r\n"
    );
    let ir = base64_encode(b"\0u\0secret");
    for cmd in [
        "USER u".to_string(),
        "PASS secret".into(),
        "APOP u 0123456789abcdef0123456789abcdef".into(),
        format!("AUTH PLAIN {ir}"),
        "AUTH PLAIN".into(),
        // Mechanism discovery: nothing to list before TLS (CAPA shows no SASL either).
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
    assert!(line(&mut c, "NOOP").await.starts_with("-ERR Unknown"));

    let seen = s.backend.recorder.all_text();
    assert_eq!(seen, "CAPA\r\nNOOP\r\n");
    assert!(
        s.metrics().contains(
            r#"mailfront_cleartext_auth_refused_total{listener="pop3",protocol="pop3"} 7"#
        )
    );
}

#[tokio::test]
async fn credentials_pipelined_after_stls_are_discarded_and_login_works_after_tls() {
    let s = setup("starttls", "").await;
    let mut c = s.connect_plain().await;
    send(&mut c, b"STLS\r\nUSER evil\r\nPASS secret\r\n").await;
    assert_eq!(read_line(&mut c).await, "+OK Begin TLS negotiation\r\n");
    let tls = tls_upgrade(c.into_inner(), HOST, s.config()).await.unwrap();
    let mut c = BufReader::new(tls);
    let capa = multiline(&mut c, "CAPA").await;
    assert!(
        !capa.contains("STLS") && capa.contains("USER\r\n"),
        "{capa}"
    );
    assert_eq!(
        line(&mut c, "STLS").await,
        "-ERR Command not permitted when TLS active\r\n"
    );
    assert_eq!(line(&mut c, "USER u").await, "+OK\r\n");
    assert_eq!(line(&mut c, "PASS secret").await, "+OK Logged in.\r\n");
    let seen = s.backend.recorder.all_text();
    assert_eq!(seen, "CAPA\r\nUSER u\r\nPASS secret\r\n");
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
    assert!(!s.backend.recorder.all_text().contains("xxxx"));
}

#[tokio::test]
async fn an_idle_client_is_told_before_the_close() {
    let s = setup("implicit", "timeouts:\n  idle: 300ms\n").await;
    let mut c = s.connect().await;
    let started = std::time::Instant::now();
    assert_eq!(
        read_line(&mut c).await,
        "-ERR Disconnected for inactivity\r\n"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn shutdown_before_login_says_goodbye() {
    let s = setup("implicit", "timeouts:\n  shutdown_grace: 100ms\n").await;
    let mut c = s.connect().await;
    s.proxy.control.shutdown.cancel();
    assert_eq!(
        read_line(&mut c).await,
        "-ERR [SYS/TEMP] Server shutting down\r\n"
    );
}

fn python(code: &str) -> Option<(bool, String)> {
    if !have("python3") {
        eprintln!("python3 not found; skipping");
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
    if !have("curl") {
        eprintln!("curl not found; skipping");
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
async fn lines_pipelined_past_an_auth_exchange_never_reach_the_backend_as_commands_o4_o5() {
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
    assert!(read_line(&mut c).await.starts_with("-ERR Unknown"));
    assert_eq!(s.backend.recorder.all_text(), "AUTH PLAIN\r\n*\r\nNOOP\r\n");
}

#[tokio::test]
async fn auth_without_a_mechanism_lists_mechanisms_over_tls_without_external_o4() {
    let s = setup("implicit", "").await;
    let mut c = s.connect().await;
    assert_eq!(multiline(&mut c, "AUTH").await, "+OK\r\nPLAIN\r\n.\r\n");
    // An empty initial response is forwarded as is; the backend decides.
    assert!(
        line(&mut c, "AUTH PLAIN =")
            .await
            .starts_with("-ERR [AUTH]")
    );
    let ir = base64_encode(b"\0u\0secret");
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

#[tokio::test]
async fn apop_sees_the_backend_timestamp_and_logs_in_over_tls_o6() {
    let greeting = "+OK fake POP3 ready <1896.697170952@backend.test>\r\n";
    let options = FakeOptions {
        pop3_greeting: greeting.into(),
        slow_auth: true,
        ..FakeOptions::default()
    };
    let s = setup_with("implicit", options, "").await;
    let tls = tls_connect(s.proxy.addr("pop3"), HOST, s.config())
        .await
        .unwrap();
    let mut c = BufReader::new(tls);
    assert_eq!(
        read_line(&mut c).await,
        greeting,
        "byte-exact, timestamp kept"
    );
    // STAT waits for the APOP answer (the fake refuses if it arrives early).
    send(
        &mut c,
        b"APOP u c4c9334bac560ecc979e58001b3e22fb\r\nSTAT\r\n",
    )
    .await;
    assert_eq!(read_line(&mut c).await, "+OK Logged in.\r\n");
    assert!(read_line(&mut c).await.starts_with("+OK 1 "));
    assert!(s.metrics().contains(
        r#"mailfront_auth_outcomes_total{listener="pop3",protocol="pop3",result="success"} 1"#
    ));
}

#[tokio::test]
async fn a_silent_backend_is_not_kept_alive_by_a_trickling_client() {
    let options = FakeOptions {
        silent_auth: true,
        ..FakeOptions::default()
    };
    let s = setup_with("implicit", options, "timeouts:\n  idle: 400ms\n").await;
    let mut c = s.connect().await;
    send(&mut c, b"USER u\r\nPASS secret\r\n").await;
    assert_eq!(read_line(&mut c).await, "+OK\r\n");
    let started = std::time::Instant::now();
    loop {
        tokio::select! {
            r = tokio::io::AsyncBufReadExt::fill_buf(&mut c) => { r.unwrap(); break; }
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
        assert!(started.elapsed() < Duration::from_secs(3), "no timeout");
        send(&mut c, b"x").await;
    }
    assert_eq!(
        read_line(&mut c).await,
        "-ERR [SYS/TEMP] Server temporarily unavailable\r\n"
    );
    assert!(started.elapsed() < Duration::from_millis(1500));
}

#[tokio::test]
async fn quit_ends_with_close_notify_before_and_after_login_g2() {
    let s = setup("implicit", "").await;
    // read_line fails on a TCP close without close_notify (rustls: unexpected EOF).
    let mut c = s.connect().await;
    assert_eq!(line(&mut c, "QUIT").await, "+OK Logging out.\r\n");
    assert_eq!(read_line(&mut c).await, "");
    let mut c = s.connect().await;
    assert_eq!(line(&mut c, "USER u").await, "+OK\r\n");
    assert_eq!(line(&mut c, "PASS secret").await, "+OK Logged in.\r\n");
    assert_eq!(line(&mut c, "QUIT").await, "+OK Logging out.\r\n");
    assert_eq!(read_line(&mut c).await, "");
}
