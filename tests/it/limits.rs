//! `limits.connections_per_ip`: each client address may hold only so many sessions that have not
//! authenticated, across all listeners; past that a STARTTLS listener answers with the
//! protocol's refusal in cleartext and an implicit-TLS listener closes before any handshake.
//! `limits.auth_failures_per_ip`: once an address has that many failed logins within
//! `limits.auth_failure_window`, its further attempts are answered by the proxy and never reach
//! the backend, until the window has moved past them.
//! Clients come from two loopback addresses, 127.0.0.1 and 127.0.0.2, to show one address at its
//! limit leaves the other untouched.
// Helpers outside #[test] functions: clippy's allow-*-in-tests does not reach them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;

use crate::common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};

const HOST: &str = "mx.example.test";
const OTHER_CLIENT: &str = "127.0.0.2:0";

struct Setup {
    pki: Pki,
    backends: Vec<FakeBackend>,
    proxy: Proxy,
}

/// The proxy with one listener per `(name, protocol, tls)`, each before its own fake backend,
/// and `limits.connections_per_ip: limit`.
async fn setup(listeners: &[(&str, &str, &str)], limit: u32) -> Setup {
    setup_with(
        listeners,
        &format!("limits:\n  connections_per_ip: {limit}\n"),
    )
    .await
}

/// As [`setup`], with `extra` (YAML) in the configuration.
async fn setup_with(listeners: &[(&str, &str, &str)], extra: &str) -> Setup {
    let pki = Pki::new();
    let cert = pki.issue("mx", &[HOST], false);
    let mut backends = Vec::new();
    let mut yaml_listeners = Vec::new();
    for (name, protocol, tls) in listeners {
        let kind = match *protocol {
            "smtp" => FakeKind::Smtp,
            "imap" => FakeKind::Imap,
            _ => FakeKind::Pop3,
        };
        let backend = FakeBackend::start(kind).await;
        yaml_listeners.push(listener_yaml(name, protocol, tls, backend.addr));
        backends.push(backend);
    }
    let yaml = config_yaml(&[&cert], &yaml_listeners, extra);
    let proxy = Proxy::start(&yaml, pki.dir.path()).await;
    Setup {
        pki,
        backends,
        proxy,
    }
}

impl Setup {
    fn tls_config(&self) -> std::sync::Arc<rustls::ClientConfig> {
        client_config(
            &self.pki.ca_der,
            &[&rustls::version::TLS13, &rustls::version::TLS12],
            None,
        )
    }

    /// A cleartext connection from 127.0.0.1 and its first line.
    async fn plain(&self, listener: &str) -> (BufReader<TcpStream>, String) {
        let tcp = TcpStream::connect(self.proxy.addr(listener)).await.unwrap();
        greeted(tcp).await
    }

    /// A cleartext connection from 127.0.0.2 and its first line.
    async fn plain_from_other(&self, listener: &str) -> (BufReader<TcpStream>, String) {
        greeted(connect_from(OTHER_CLIENT, self.proxy.addr(listener)).await).await
    }

    /// Implicit TLS from 127.0.0.1, greeted.
    async fn tls(
        &self,
        listener: &str,
    ) -> (
        BufReader<tokio_rustls::client::TlsStream<TcpStream>>,
        String,
    ) {
        let tls = tls_connect(self.proxy.addr(listener), HOST, self.tls_config())
            .await
            .unwrap();
        let mut tls = BufReader::new(tls);
        let greeting = read_line(&mut tls).await;
        (tls, greeting)
    }

    fn refused(&self, listener: &str, protocol: &str, reason: &str) -> u64 {
        metric(
            &self.proxy.metrics.encode(),
            &format!(
                r#"mailfront_connections_refused_total{{listener="{listener}",protocol="{protocol}",reason="{reason}"}}"#
            ),
        )
    }
}

/// A TCP connection to `to` from the local address `from` (a loopback address other than
/// 127.0.0.1 stands for a second client).
async fn connect_from(from: &str, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(from.parse().unwrap()).unwrap();
    tokio::time::timeout(TIMEOUT, socket.connect(to))
        .await
        .unwrap()
        .unwrap()
}

async fn greeted(tcp: TcpStream) -> (BufReader<TcpStream>, String) {
    let mut tcp = BufReader::new(tcp);
    let greeting = read_line(&mut tcp).await;
    (tcp, greeting)
}

/// The value of the one series named exactly `series` (name and labels).
fn metric(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no series {series} in\n{text}"))
}

/// After the refusal line the proxy closes: the next read is the end of the stream.
async fn assert_closed<S: tokio::io::AsyncRead + Unpin>(s: &mut S) {
    let mut rest = Vec::new();
    let read = tokio::time::timeout(TIMEOUT, s.read_to_end(&mut rest))
        .await
        .expect("the proxy did not close");
    // A reset is a close too; what matters is that nothing more arrives.
    if read.is_ok() {
        assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));
    }
}

#[tokio::test]
async fn past_the_limit_a_starttls_imap_listener_says_bye_while_a_second_address_is_served() {
    let s = setup(&[("imap", "imap", "starttls")], 2).await;
    let (_a, greeting) = s.plain("imap").await;
    assert!(greeting.starts_with("* OK"), "{greeting}");
    let (_b, greeting) = s.plain("imap").await;
    assert!(greeting.starts_with("* OK"), "{greeting}");

    let (mut c, refusal) = s.plain("imap").await;
    assert_eq!(
        refusal,
        "* BYE [UNAVAILABLE] Too many connections from your address\r\n"
    );
    assert_closed(&mut c).await;

    // Another address is not affected by the first one's limit.
    let (mut other, greeting) = s.plain_from_other("imap").await;
    assert!(greeting.starts_with("* OK"), "{greeting}");
    other.get_mut().write_all(b"a NOOP\r\n").await.unwrap();
    assert!(read_until_tag(&mut other, "a").await.contains("a OK"));

    assert_eq!(s.refused("imap", "imap", "per_ip"), 1);
    assert_eq!(s.refused("imap", "imap", "max_connections"), 0);
}

#[tokio::test]
async fn past_the_limit_smtp_gets_421_4_7_0_and_pop3_gets_sys_temp_in_cleartext() {
    let s = setup(
        &[
            ("submission", "smtp", "starttls"),
            ("pop3", "pop3", "starttls"),
        ],
        1,
    )
    .await;
    let (_a, greeting) = s.plain("submission").await;
    assert!(greeting.starts_with("220 "), "{greeting}");

    // The limit counts across listeners: the SMTP session fills it for POP3 too.
    let (mut pop3, refusal) = s.plain("pop3").await;
    assert_eq!(
        refusal,
        "-ERR [SYS/TEMP] Too many connections from your address\r\n"
    );
    assert_closed(&mut pop3).await;

    let (mut smtp, refusal) = s.plain("submission").await;
    assert_eq!(
        refusal,
        format!(
            "421 4.7.0 {HOST} Too many connections from your address, closing transmission channel\r\n"
        )
    );
    assert_closed(&mut smtp).await;

    let (_other, greeting) = s.plain_from_other("pop3").await;
    assert!(greeting.starts_with("+OK"), "{greeting}");
    assert_eq!(s.refused("pop3", "pop3", "per_ip"), 1);
    assert_eq!(s.refused("submission", "smtp", "per_ip"), 1);
}

#[tokio::test]
async fn past_the_limit_an_implicit_listener_closes_before_any_handshake() {
    let s = setup(
        &[("imap", "imap", "starttls"), ("imaps", "imap", "implicit")],
        2,
    )
    .await;
    let (_a, _) = s.plain("imap").await;
    let (_b, _) = s.tls("imaps").await;

    // A client that sends nothing is closed without a byte from the proxy.
    let mut silent = TcpStream::connect(s.proxy.addr("imaps")).await.unwrap();
    assert_closed(&mut silent).await;
    // A real TLS client gets no handshake.
    assert!(
        tls_connect(s.proxy.addr("imaps"), HOST, s.tls_config())
            .await
            .is_err()
    );
    let text = s.proxy.metrics.encode();
    let handshakes = text
        .lines()
        .filter(|l| l.starts_with("mailfront_tls_handshakes_total{") && l.contains("imaps"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum::<u64>();
    assert_eq!(handshakes, 1, "only the admitted session's handshake ran");
    let failures = text
        .lines()
        .filter(|l| l.starts_with("mailfront_tls_handshake_failures_total{listener=\"imaps\""))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum::<u64>();
    assert_eq!(failures, 0, "{text}");
    assert_eq!(s.refused("imaps", "imap", "per_ip"), 2);

    let tls = connect_from(OTHER_CLIENT, s.proxy.addr("imaps")).await;
    let tls = tls_upgrade(tls, HOST, s.tls_config()).await.unwrap();
    let mut tls = BufReader::new(tls);
    assert!(read_line(&mut tls).await.starts_with("* OK"));
}

#[tokio::test]
async fn authenticated_sessions_do_not_count_against_the_limit() {
    let s = setup(&[("imaps", "imap", "implicit")], 2).await;
    let (mut a, _) = s.tls("imaps").await;
    let (_b, _) = s.tls("imaps").await;
    a.get_mut()
        .write_all(b"a LOGIN u secret\r\n")
        .await
        .unwrap();
    assert!(read_until_tag(&mut a, "a").await.contains("a OK"));

    // a logged in, so only b counts: one more fits, the next does not.
    let (_c, greeting) = s.tls("imaps").await;
    assert!(greeting.starts_with("* OK"), "{greeting}");
    let mut d = TcpStream::connect(s.proxy.addr("imaps")).await.unwrap();
    assert_closed(&mut d).await;
    assert_eq!(s.refused("imaps", "imap", "per_ip"), 1);

    // The logged-in session still works.
    a.get_mut().write_all(b"b NOOP\r\n").await.unwrap();
    assert!(read_until_tag(&mut a, "b").await.contains("b OK"));
}

#[tokio::test]
async fn a_closed_session_gives_its_place_back() {
    let s = setup(&[("imap", "imap", "starttls")], 1).await;
    let (a, _) = s.plain("imap").await;
    let (_, refusal) = s.plain("imap").await;
    assert!(refusal.starts_with("* BYE [UNAVAILABLE]"), "{refusal}");
    drop(a);
    // The proxy notices the close in its own task.
    let mut greeted_again = false;
    for _ in 0..100 {
        let (_c, greeting) = s.plain("imap").await;
        if greeting.starts_with("* OK") {
            greeted_again = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(greeted_again);
}

#[tokio::test]
async fn zero_turns_the_limit_off() {
    let s = setup(&[("imap", "imap", "starttls")], 0).await;
    let mut held = Vec::new();
    for _ in 0..10 {
        let (c, greeting) = s.plain("imap").await;
        assert!(greeting.starts_with("* OK"), "{greeting}");
        held.push(c);
    }
    assert_eq!(s.refused("imap", "imap", "per_ip"), 0);
}

#[tokio::test]
async fn an_smtp_session_stops_counting_at_a_successful_auth() {
    let s = setup(&[("submissions", "smtp", "implicit")], 1).await;
    let (mut a, greeting) = s.tls("submissions").await;
    assert!(greeting.starts_with("220 "), "{greeting}");
    a.get_mut()
        .write_all(b"EHLO client.test\r\n")
        .await
        .unwrap();
    read_smtp_reply(&mut a).await;
    let mut refused = TcpStream::connect(s.proxy.addr("submissions"))
        .await
        .unwrap();
    assert_closed(&mut refused).await;

    // RFC 4616 PLAIN: NUL "u" NUL "secret".
    a.get_mut()
        .write_all(b"AUTH PLAIN AHUAc2VjcmV0\r\n")
        .await
        .unwrap();
    assert!(read_smtp_reply(&mut a).await.starts_with("235 "));
    let (_b, greeting) = s.tls("submissions").await;
    assert!(greeting.starts_with("220 "), "{greeting}");
    assert_eq!(s.refused("submissions", "smtp", "per_ip"), 1);
}

// ---- limits.auth_failures_per_ip ----------------------------------------------------------

/// Waited out on paused time (the tests below run with `start_paused`, as the charging tests
/// further down do: the sockets are real, the clock virtual), so no wall-clock second passes and
/// a loaded machine cannot run three logins past it. The window's exact edges, and that no
/// refused attempt reaches the backend, are `drivers::timing`'s.
const WINDOW: std::time::Duration = std::time::Duration::from_secs(2);

type Tls = BufReader<tokio_rustls::client::TlsStream<TcpStream>>;

/// Two failures per address in a [`WINDOW`], on implicit-TLS listeners for all three protocols
/// (one failure table behind them all).
async fn throttled_setup() -> Setup {
    setup_with(
        &[
            ("imaps", "imap", "implicit"),
            ("pop3s", "pop3", "implicit"),
            ("submissions", "smtp", "implicit"),
        ],
        &format!(
            "limits:\n  connections_per_ip: 0\n  auth_failures_per_ip: 2\n  auth_failure_window: {}ms\n",
            WINDOW.as_millis()
        ),
    )
    .await
}

impl Setup {
    /// Implicit TLS from `from` (a loopback address), greeted.
    async fn tls_from(&self, from: &str, listener: &str) -> (Tls, String) {
        let tcp = connect_from(from, self.proxy.addr(listener)).await;
        let tls = tls_upgrade(tcp, HOST, self.tls_config()).await.unwrap();
        let mut tls = BufReader::new(tls);
        let greeting = read_line(&mut tls).await;
        (tls, greeting)
    }

    /// What the backend behind listener number `index` received, all connections together.
    fn backend_saw(&self, index: usize) -> String {
        self.backends[index].recorder.all_text()
    }

    fn throttled(&self, listener: &str, protocol: &str) -> u64 {
        metric(
            &self.proxy.metrics.encode(),
            &format!(
                r#"mailfront_auth_throttled_total{{listener="{listener}",protocol="{protocol}"}}"#
            ),
        )
    }
}

async fn imap_login(c: &mut Tls, tag: &str, password: &str) -> String {
    c.get_mut()
        .write_all(format!("{tag} LOGIN u {password}\r\n").as_bytes())
        .await
        .unwrap();
    read_until_tag(c, tag).await
}

async fn pop3_login(c: &mut Tls, password: &str) -> String {
    c.get_mut()
        .write_all(format!("USER u\r\nPASS {password}\r\n").as_bytes())
        .await
        .unwrap();
    let user = read_line(c).await;
    assert_eq!(user, "+OK\r\n");
    read_line(c).await
}

/// EHLO (its reply read), then AUTH PLAIN with `b64`.
async fn smtp_auth(c: &mut Tls, b64: &str) -> String {
    c.get_mut()
        .write_all(format!("AUTH PLAIN {b64}\r\n").as_bytes())
        .await
        .unwrap();
    read_smtp_reply(c).await
}

async fn smtp_ehlo(c: &mut Tls) {
    c.get_mut()
        .write_all(b"EHLO client.test\r\n")
        .await
        .unwrap();
    assert!(read_smtp_reply(c).await.starts_with("250"));
}

#[tokio::test(start_paused = true)]
async fn imap_logins_are_refused_locally_after_the_failures_while_a_second_address_is_served() {
    let s = throttled_setup().await;
    let (mut a, _) = s.tls_from("127.0.0.1:0", "imaps").await;
    assert!(
        imap_login(&mut a, "a", "wrong1")
            .await
            .contains("a NO [AUTHENTICATIONFAILED]")
    );
    assert!(
        imap_login(&mut a, "b", "wrong2")
            .await
            .contains("b NO [AUTHENTICATIONFAILED]")
    );
    let refusal = imap_login(&mut a, "c", "wrong3").await;
    assert_eq!(
        refusal,
        "c NO [UNAVAILABLE] Too many failed logins, try again later\r\n"
    );
    // A new session from the same address is throttled too, even with the right password.
    let (mut again, _) = s.tls_from("127.0.0.1:0", "imaps").await;
    assert!(
        imap_login(&mut again, "d", "secret")
            .await
            .starts_with("d NO [UNAVAILABLE]")
    );
    let seen = s.backend_saw(0);
    assert!(seen.contains("wrong2"), "{seen}");
    assert!(
        !seen.contains("wrong3"),
        "a throttled attempt reached the backend: {seen}"
    );
    assert!(!seen.contains("secret"), "{seen}");
    assert_eq!(s.throttled("imaps", "imap"), 2);

    // Another address is served while the first is throttled.
    let (mut other, _) = s.tls_from(OTHER_CLIENT, "imaps").await;
    assert!(imap_login(&mut other, "e", "secret").await.contains("e OK"));

    // Once the failures leave the window, the first address may log in again.
    tokio::time::sleep(WINDOW).await;
    assert!(imap_login(&mut again, "f", "secret").await.contains("f OK"));
}

#[tokio::test(start_paused = true)]
async fn pop3_pass_is_refused_locally_after_the_failures_while_a_second_address_is_served() {
    let s = throttled_setup().await;
    let (mut a, _) = s.tls_from("127.0.0.1:0", "pop3s").await;
    assert!(
        pop3_login(&mut a, "wrong1")
            .await
            .starts_with("-ERR [AUTH]")
    );
    assert!(
        pop3_login(&mut a, "wrong2")
            .await
            .starts_with("-ERR [AUTH]")
    );
    assert_eq!(
        pop3_login(&mut a, "wrong3").await,
        "-ERR [SYS/TEMP] Too many failed logins, try again later\r\n"
    );
    let seen = s.backend_saw(1);
    assert!(seen.contains("PASS wrong2"), "{seen}");
    assert!(
        !seen.contains("wrong3"),
        "a throttled attempt reached the backend: {seen}"
    );
    assert_eq!(s.throttled("pop3s", "pop3"), 1);

    // The failures count on every listener: IMAP from the same address is throttled too.
    let (mut imap, _) = s.tls_from("127.0.0.1:0", "imaps").await;
    assert!(
        imap_login(&mut imap, "a", "secret")
            .await
            .starts_with("a NO [UNAVAILABLE]")
    );

    let (mut other, _) = s.tls_from(OTHER_CLIENT, "pop3s").await;
    assert_eq!(pop3_login(&mut other, "secret").await, "+OK Logged in.\r\n");

    tokio::time::sleep(WINDOW).await;
    assert_eq!(pop3_login(&mut a, "secret").await, "+OK Logged in.\r\n");
}

#[tokio::test(start_paused = true)]
async fn smtp_auth_gets_454_after_the_failures_while_a_second_address_is_served() {
    let s = throttled_setup().await;
    let (mut a, greeting) = s.tls_from("127.0.0.1:0", "submissions").await;
    assert!(greeting.starts_with("220 "), "{greeting}");
    smtp_ehlo(&mut a).await;
    // RFC 4616 PLAIN: NUL "u" NUL password.
    assert!(smtp_auth(&mut a, "AHUAd3Jvbmc=").await.starts_with("535 "));
    assert!(smtp_auth(&mut a, "AHUAd3Jvbmcy").await.starts_with("535 "));
    assert_eq!(
        smtp_auth(&mut a, "AHUAd3Jvbmcz").await,
        "454 4.7.0 Too many failed authentications, try again later\r\n"
    );
    // The session goes on: other commands still reach the backend.
    a.get_mut().write_all(b"NOOP\r\n").await.unwrap();
    assert!(read_smtp_reply(&mut a).await.starts_with("250"));
    let seen = s.backend_saw(2);
    assert!(seen.contains("AHUAd3Jvbmcy"), "{seen}");
    assert!(
        !seen.contains("AHUAd3Jvbmcz"),
        "a throttled AUTH reached the backend: {seen}"
    );
    assert_eq!(s.throttled("submissions", "smtp"), 1);

    let (mut other, _) = s.tls_from(OTHER_CLIENT, "submissions").await;
    smtp_ehlo(&mut other).await;
    assert!(
        smtp_auth(&mut other, "AHUAc2VjcmV0")
            .await
            .starts_with("235 ")
    );

    tokio::time::sleep(WINDOW).await;
    assert!(smtp_auth(&mut a, "AHUAc2VjcmV0").await.starts_with("235 "));
}

// ---- the charge is taken when a login is sent --------------------------------------------
//
// Two attacks the throttle must stop by construction, for each protocol: a client that hangs up
// before a slow failure (Dovecot answers a wrong password only after `auth_failure_delay`), and
// many sessions of one address sending wrong passwords at once. Paused time: the backend's
// delay and the client's patience are virtual, the sockets real.

/// Far longer than any test: no charge leaves the window by itself.
const LONG_WINDOW_MS: u64 = 600_000;

#[derive(Debug, Clone, Copy)]
enum Proto {
    Imap,
    Pop3,
    Smtp,
}

impl Proto {
    fn listener(self) -> &'static str {
        match self {
            Proto::Imap => "imaps",
            Proto::Pop3 => "pop3s",
            Proto::Smtp => "submissions",
        }
    }

    fn protocol(self) -> &'static str {
        match self {
            Proto::Imap => "imap",
            Proto::Pop3 => "pop3",
            Proto::Smtp => "smtp",
        }
    }

    fn kind(self) -> FakeKind {
        match self {
            Proto::Imap => FakeKind::Imap,
            Proto::Pop3 => FakeKind::Pop3,
            Proto::Smtp => FakeKind::Smtp,
        }
    }

    /// What comes before a login: EHLO for SMTP, USER for POP3 (each answer read).
    async fn prepare(self, c: &mut Tls) {
        match self {
            Proto::Imap => {}
            Proto::Pop3 => {}
            Proto::Smtp => smtp_ehlo(c).await,
        }
    }

    /// The login command with `password`.
    fn login(self, password: &str) -> String {
        match self {
            Proto::Imap => format!("a LOGIN u {password}\r\n"),
            Proto::Pop3 => format!("USER u\r\nPASS {password}\r\n"),
            // RFC 4616 PLAIN: NUL "u" NUL password.
            Proto::Smtp => format!("AUTH PLAIN {}\r\n", base64_plain(password)),
        }
    }

    /// [`Proto::prepare`], then one login with `password`; reads nothing back.
    async fn send_login(self, c: &mut Tls, password: &str) {
        self.prepare(c).await;
        let login = self.login(password);
        c.get_mut().write_all(login.as_bytes()).await.unwrap();
    }

    /// Reads the answer to [`Proto::send_login`]'s login: `Ok` for a success, `Err` with the
    /// refusal otherwise.
    async fn login_answer(self, c: &mut Tls) -> Result<(), String> {
        let answer = match self {
            Proto::Imap => read_until_tag(c, "a").await,
            Proto::Pop3 => {
                assert_eq!(read_line(c).await, "+OK\r\n", "USER");
                read_line(c).await
            }
            Proto::Smtp => read_smtp_reply(c).await,
        };
        let ok = match self {
            Proto::Imap => answer.starts_with("a OK"),
            Proto::Pop3 => answer.starts_with("+OK"),
            Proto::Smtp => answer.starts_with("235 "),
        };
        if ok { Ok(()) } else { Err(answer) }
    }

    /// The protocol's throttled answer.
    fn throttled_answer(self) -> &'static str {
        match self {
            Proto::Imap => "a NO [UNAVAILABLE] Too many failed logins, try again later\r\n",
            Proto::Pop3 => "-ERR [SYS/TEMP] Too many failed logins, try again later\r\n",
            Proto::Smtp => "454 4.7.0 Too many failed authentications, try again later\r\n",
        }
    }
}

/// `\0u\0password` in base64, as AUTH PLAIN sends it.
fn base64_plain(password: &str) -> String {
    use base64::prelude::{BASE64_STANDARD, Engine as _};
    BASE64_STANDARD.encode(format!("\0u\0{password}"))
}

/// How many of the passwords `wrong0`, `wrong1`, … reached the backend, all connections
/// together (each attempt uses its own, so none is counted twice).
fn wrong_passwords_seen(s: &Setup, proto: Proto, attempts: usize) -> usize {
    let seen = s.backend_saw(0);
    (0..attempts)
        .filter(|i| {
            let password = format!("wrong{i}");
            match proto {
                Proto::Smtp => seen.contains(&base64_plain(&password)),
                _ => {
                    seen.contains(&format!("{password}\r\n"))
                        || seen.contains(&format!("{password}\""))
                }
            }
        })
        .count()
}

/// One implicit-TLS listener for `proto` before a fake backend with `options`, and
/// `limits.auth_failures_per_ip: limit` in a window no test outlives.
async fn charging_setup(proto: Proto, limit: u32, options: FakeOptions) -> Setup {
    let pki = Pki::new();
    let cert = pki.issue("mx", &[HOST], false);
    let backend = FakeBackend::start_with(proto.kind(), options).await;
    let yaml = config_yaml(
        &[&cert],
        &[listener_yaml(
            proto.listener(),
            proto.protocol(),
            "implicit",
            backend.addr,
        )],
        &format!(
            "limits:\n  connections_per_ip: 0\n  auth_failures_per_ip: {limit}\n  auth_failure_window: {LONG_WINDOW_MS}ms\n"
        ),
    );
    let proxy = Proxy::start(&yaml, pki.dir.path()).await;
    Setup {
        pki,
        backends: vec![backend],
        proxy,
    }
}

/// (a) Ten wrong passwords, each from a client that hangs up 1.5 s after sending it, before
/// the backend's failure (due after 2 s): only the first three reach the backend.
async fn hanging_up_before_the_verdict_does_not_escape_the_charge(proto: Proto) {
    let s = charging_setup(
        proto,
        3,
        FakeOptions {
            failure_delay: Some(std::time::Duration::from_secs(2)),
            ..FakeOptions::default()
        },
    )
    .await;
    for i in 0..10 {
        let (mut c, greeting) = s.tls_from("127.0.0.1:0", proto.listener()).await;
        assert!(!greeting.is_empty(), "{proto:?}: no greeting");
        proto.send_login(&mut c, &format!("wrong{i}")).await;
        tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
        drop(c);
    }
    let reached = wrong_passwords_seen(&s, proto, 10);
    assert_eq!(reached, 3, "{proto:?}: {}", s.backend_saw(0));
    assert_eq!(s.throttled(proto.listener(), proto.protocol()), 7);
}

/// (b) Ten sessions of one address, greeted, then all sending a wrong password at once: no
/// more than three reach the backend, the others get the throttled answer.
async fn concurrent_wrong_passwords_never_pass_the_limit_together(proto: Proto) {
    let s = charging_setup(proto, 3, FakeOptions::default()).await;
    let mut sessions = Vec::new();
    for _ in 0..10 {
        let (c, greeting) = s.tls_from("127.0.0.1:0", proto.listener()).await;
        assert!(!greeting.is_empty(), "{proto:?}: no greeting");
        sessions.push(c);
    }
    for c in &mut sessions {
        proto.prepare(c).await;
    }
    // All written before any answer is read.
    for (i, c) in sessions.iter_mut().enumerate() {
        let login = proto.login(&format!("wrong{i}"));
        c.get_mut().write_all(login.as_bytes()).await.unwrap();
    }
    let mut throttled = 0;
    for c in &mut sessions {
        match proto.login_answer(c).await {
            Ok(()) => panic!("{proto:?}: a wrong password logged in"),
            Err(answer) if answer == proto.throttled_answer() => throttled += 1,
            Err(_) => {}
        }
    }
    assert_eq!(throttled, 7, "{proto:?}");
    assert_eq!(
        wrong_passwords_seen(&s, proto, 10),
        3,
        "{proto:?}: {}",
        s.backend_saw(0)
    );
}

/// (c) A success gives its charge back: with a limit of 2, three successes in a row all pass,
/// and afterwards two wrong passwords still reach the backend before the third is refused.
async fn a_success_refunds_its_charge(proto: Proto) {
    let s = charging_setup(proto, 2, FakeOptions::default()).await;
    for n in 0..3 {
        let (mut c, _) = s.tls_from("127.0.0.1:0", proto.listener()).await;
        eprintln!("session {n} at {:?}", tokio::time::Instant::now());
        proto.send_login(&mut c, "secret").await;
        assert_eq!(proto.login_answer(&mut c).await, Ok(()), "{proto:?}");
    }
    let (mut c, _) = s.tls_from("127.0.0.1:0", proto.listener()).await;
    proto.prepare(&mut c).await;
    for i in 0..3 {
        let login = proto.login(&format!("wrong{i}"));
        c.get_mut().write_all(login.as_bytes()).await.unwrap();
        let answer = proto.login_answer(&mut c).await.unwrap_err();
        assert_eq!(
            answer == proto.throttled_answer(),
            i == 2,
            "{proto:?} attempt {i}: {answer}"
        );
    }
    assert_eq!(wrong_passwords_seen(&s, proto, 3), 2, "{proto:?}");
}

#[tokio::test(start_paused = true)]
async fn imap_hanging_up_before_the_verdict_does_not_escape_the_charge() {
    hanging_up_before_the_verdict_does_not_escape_the_charge(Proto::Imap).await;
}

#[tokio::test(start_paused = true)]
async fn pop3_hanging_up_before_the_verdict_does_not_escape_the_charge() {
    hanging_up_before_the_verdict_does_not_escape_the_charge(Proto::Pop3).await;
}

#[tokio::test(start_paused = true)]
async fn smtp_hanging_up_before_the_verdict_does_not_escape_the_charge() {
    hanging_up_before_the_verdict_does_not_escape_the_charge(Proto::Smtp).await;
}

#[tokio::test(start_paused = true)]
async fn imap_concurrent_wrong_passwords_never_pass_the_limit_together() {
    concurrent_wrong_passwords_never_pass_the_limit_together(Proto::Imap).await;
}

#[tokio::test(start_paused = true)]
async fn pop3_concurrent_wrong_passwords_never_pass_the_limit_together() {
    concurrent_wrong_passwords_never_pass_the_limit_together(Proto::Pop3).await;
}

#[tokio::test(start_paused = true)]
async fn smtp_concurrent_wrong_passwords_never_pass_the_limit_together() {
    concurrent_wrong_passwords_never_pass_the_limit_together(Proto::Smtp).await;
}

#[tokio::test(start_paused = true)]
async fn imap_a_success_refunds_its_charge() {
    a_success_refunds_its_charge(Proto::Imap).await;
}

#[tokio::test(start_paused = true)]
async fn pop3_a_success_refunds_its_charge() {
    a_success_refunds_its_charge(Proto::Pop3).await;
}

#[tokio::test(start_paused = true)]
async fn smtp_a_success_refunds_its_charge() {
    a_success_refunds_its_charge(Proto::Smtp).await;
}
