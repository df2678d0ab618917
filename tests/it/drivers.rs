//! Driver-level tests: each protocol driver runs in-process over `tokio::io::duplex` (client
//! side and backend side alike) with paused time, so timeouts are checked to the exact virtual
//! second and every byte either side sees is asserted. The real-socket tests in the other modules
//! are the outer layer; these need no sockets, no fake backend server and no wall-clock waits.
//! The test CA and the TLS client config are common's.
// Helpers outside #[test] functions: clippy's allow-*-in-tests does not reach them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use crate::common::{IssuedCert, Pki, client_config, tls_upgrade};
use mailfront::backend::BackendConnector;
use mailfront::config::{
    BackendAddress, Backends, CertificateSection, Limits, ListenerConfig, MinTlsVersion, Protocol,
    Timeouts, TlsConfig, TlsMode,
};
use mailfront::metrics::Metrics;
use mailfront::session::{ClientStream, EndReason, ListenerContext, Session};
use mailfront::tls::{self, CertStore, Handshaker};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream, duplex};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::time::Instant;
use tokio_rustls::client::TlsStream;
use tokio_util::sync::CancellationToken;

mod timing;

const HOST: &str = "mail.example.test";
/// Distinct values, so a test can tell which deadline fired.
const IDLE: Duration = Duration::from_secs(300);
const DATA_REPLY: Duration = Duration::from_secs(600);
/// Above every other wait here, so only the tests that shorten it see it fire.
const LOGIN: Duration = Duration::from_secs(1000);
/// The login deadline of the tests about it: below `IDLE`, so a busy client is cut by it alone.
const SHORT_LOGIN: Duration = Duration::from_secs(60);
/// In-memory pipe capacity each way: larger than anything one test step writes.
const PIPE: usize = 64 * 1024;

/// common's test CA, and one server certificate for [`HOST`] issued by it.
struct Certs {
    pki: Pki,
    leaf: IssuedCert,
}

fn pki() -> Certs {
    let pki = Pki::new();
    let leaf = pki.issue("leaf", &[HOST], false);
    Certs { pki, leaf }
}

/// One listener's context, built in-process, whose backend is reached through in-memory pipes:
/// each connect hands the backend's end to the returned receiver.
fn listener(
    protocol: Protocol,
    tls_mode: TlsMode,
    pki: &Certs,
) -> (Arc<ListenerContext>, UnboundedReceiver<DuplexStream>) {
    listener_with(protocol, tls_mode, pki, |_, _| {})
}

/// [`listener`], with its config and timeouts adjusted by `adjust` first.
fn listener_with(
    protocol: Protocol,
    tls_mode: TlsMode,
    pki: &Certs,
    adjust: impl FnOnce(&mut ListenerConfig, &mut Timeouts),
) -> (Arc<ListenerContext>, UnboundedReceiver<DuplexStream>) {
    let mut config = ListenerConfig {
        name: format!("{protocol}-test"),
        protocol,
        listen: "192.0.2.1:0".parse().unwrap(),
        tls: tls_mode,
        // Never dialled: the connector below replaces TCP.
        backend: Backends::single(BackendAddress {
            host: "backend.invalid".to_owned(),
            port: 1,
        }),
        max_connections: 10,
        require_tls_for_mail: true,
        backend_proxy_protocol: false,
        proxy_protocol_from: Vec::new(),
        backend_client_info: false,
        routing: Default::default(),
    };
    let mut timeouts = Timeouts {
        backend_connect: Duration::from_secs(5),
        idle: IDLE,
        login: LOGIN,
        data_reply: DATA_REPLY,
        relay_idle: Duration::from_secs(3600),
        shutdown_grace: Duration::from_secs(30),
    };
    adjust(&mut config, &mut timeouts);
    let tls_config = TlsConfig {
        certificates: vec![CertificateSection {
            cert: pki.leaf.cert.clone(),
            key: pki.leaf.key.clone(),
        }],
        min_version: MinTlsVersion::Tls12,
        handshake_timeout: Duration::from_secs(10),
        reload_interval: Duration::from_secs(60),
        session_tickets: 2,
        ticket_key_file: None,
    };
    let store = Arc::new(CertStore::load(&tls_config.certificates, HOST).unwrap());
    let handshaker = Handshaker::new(
        tls::server_config(&tls_config, store, None).unwrap(),
        tls_config.handshake_timeout,
        tls_config.min_version,
    );
    let metrics = Metrics::register(&prometheus::Registry::new())
        .unwrap()
        .listener(&config);
    let (backend, backends) = BackendConnector::duplex(PIPE);
    let context = ListenerContext {
        config,
        hostname: HOST.to_owned(),
        timeouts,
        limits: Limits {
            smtp_line: 4096,
            imap_line: 8192,
            imap_literal: 65536,
            pop3_line: 512,
            preauth_commands: 50,
            connections_per_ip: 50,
            auth_failures_per_ip: 10,
            auth_failure_window: Duration::from_secs(600),
        },
        handshaker,
        metrics,
        backend,
        client_info_notices: Default::default(),
        learned: Default::default(),
        router: None,
    };
    (Arc::new(context), backends)
}

fn session(context: Arc<ListenerContext>) -> Session {
    Session::new(
        context,
        "192.0.2.10:50000".parse().unwrap(),
        "192.0.2.1:993".parse().unwrap(),
        CancellationToken::new(),
    )
}

/// The client side of a TLS handshake over `io`, trusting the test CA, with rustls's default
/// versions.
async fn tls_client<S: AsyncRead + AsyncWrite + Unpin>(io: S, pki: &Certs) -> TlsStream<S> {
    let config = client_config(&pki.pki.ca_der, rustls::DEFAULT_VERSIONS, None);
    tls_upgrade(io, HOST, config).await.unwrap()
}

/// Reads one line up to and including LF, octet by octet: nothing past it is consumed, so the
/// same stream can be handed to a TLS handshake right after. No timer of its own: with paused
/// time a stuck session would auto-advance to its own deadline, never hang the test. (common's
/// `read_line` reads through a `BufReader` and gives up after `common::TIMEOUT`, which paused time
/// reaches at once whenever the session under test waits longer, as most tests here do.)
async fn line<R: AsyncRead + Unpin>(r: &mut R) -> String {
    let mut out = Vec::new();
    let mut octet = [0u8; 1];
    while r.read(&mut octet).await.unwrap() == 1 {
        out.push(octet[0]);
        if octet[0] == b'\n' {
            break;
        }
    }
    String::from_utf8(out).unwrap()
}

/// Reads lines until one ends a multi-line reply: an SMTP line with a space after the code,
/// or the POP3 terminating `.`.
async fn smtp_reply<R: AsyncRead + Unpin>(r: &mut R) -> String {
    let mut all = String::new();
    loop {
        let l = line(r).await;
        all.push_str(&l);
        if l.len() < 4 || l.as_bytes()[3] == b' ' {
            return all;
        }
    }
}

async fn pop3_multiline<R: AsyncRead + Unpin>(r: &mut R) -> String {
    let mut all = String::new();
    loop {
        let l = line(r).await;
        all.push_str(&l);
        if l.is_empty() || l == ".\r\n" {
            return all;
        }
    }
}

/// Reads exactly `expected.len()` octets and compares them.
async fn expect<R: AsyncRead + Unpin>(r: &mut R, expected: &[u8]) {
    let mut got = vec![0u8; expected.len()];
    r.read_exact(&mut got).await.unwrap();
    assert_eq!(
        String::from_utf8_lossy(&got),
        String::from_utf8_lossy(expected)
    );
}

/// Everything left on `r` until the peer closes.
async fn rest<R: AsyncRead + Unpin>(r: &mut R) -> String {
    let mut all = Vec::new();
    r.read_to_end(&mut all).await.unwrap();
    String::from_utf8(all).unwrap()
}

/// IMAP on an implicit-TLS listener (993): a real rustls handshake over the in-memory pipe, the
/// backend reached through the test connector, and a client that says nothing after the
/// greeting is logged out after exactly `timeouts.idle` of virtual time, with nothing of its
/// session ever written to the backend.
#[tokio::test(start_paused = true)]
async fn imap_implicit_tls_idle_client_is_logged_out_after_exactly_the_idle_timeout() {
    let pki = pki();
    let (context, mut backends) = listener(Protocol::Imap, TlsMode::Implicit, &pki);
    let (client_io, server_io) = duplex(PIPE);
    let started = Instant::now();
    let server = tokio::spawn(async move {
        let mut session = session(context.clone());
        let (client, info, took) = ClientStream::Plain(server_io)
            .upgrade(&context.handshaker)
            .await
            .unwrap();
        session.tls_established(info, took, false);
        mailfront::imap::session::serve(client, &mut session).await
    });
    let mut client = tls_client(client_io, &pki).await;
    let mut backend = backends.recv().await.unwrap();
    backend
        .write_all(b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN ID] backend ready\r\n")
        .await
        .unwrap();
    // The backend's greeting, its capabilities already fit for a TLS session.
    assert_eq!(
        line(&mut client).await,
        "* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN ID] backend ready\r\n"
    );
    let bye = line(&mut client).await;
    assert_eq!(started.elapsed(), IDLE);
    assert_eq!(bye, "* BYE Autologout; idle for too long\r\n");
    // close_notify, then the end of the stream.
    assert_eq!(rest(&mut client).await, "");
    assert_eq!(server.await.unwrap(), EndReason::ClientIdle);
    assert_eq!(rest(&mut backend).await, "");
}

/// POP3 on a STLS listener (110): the cleartext dialogue is mailfront's alone (greeting, CAPA
/// with only STLS, USER refused) with no backend ever connected, and a client that then goes
/// quiet is disconnected exactly `timeouts.idle` after its last command.
#[tokio::test(start_paused = true)]
async fn pop3_cleartext_dialogue_is_local_and_idles_out_after_exactly_the_idle_timeout() {
    let pki = pki();
    let (context, mut backends) = listener(Protocol::Pop3, TlsMode::Starttls, &pki);
    let (mut client, server_io) = duplex(PIPE);
    let shared = context.clone();
    let server = tokio::spawn(async move {
        let mut session = session(shared);
        mailfront::pop3::session::serve(ClientStream::Plain(server_io), &mut session).await
    });
    assert_eq!(line(&mut client).await, format!("+OK {HOST} ready\r\n"));
    client.write_all(b"CAPA\r\n").await.unwrap();
    assert_eq!(
        pop3_multiline(&mut client).await,
        "+OK Capability list follows\r\nSTLS\r\n.\r\n"
    );
    client.write_all(b"USER alice\r\n").await.unwrap();
    assert_eq!(
        line(&mut client).await,
        "-ERR [AUTH] Cleartext authentication disallowed; issue STLS first\r\n"
    );
    let last_command = Instant::now();
    assert_eq!(
        line(&mut client).await,
        "-ERR Disconnected for inactivity\r\n"
    );
    assert_eq!(last_command.elapsed(), IDLE);
    assert_eq!(rest(&mut client).await, "");
    assert_eq!(server.await.unwrap(), EndReason::ClientIdle);
    assert_eq!(context.metrics.cleartext_auth_refused.get(), 1);
    assert!(backends.try_recv().is_err(), "a backend was connected");
}

/// SMTP on a STARTTLS submission listener (587): the cleartext EHLO is answered locally, the
/// STARTTLS handshake runs over the in-memory pipe, the backend is connected only when the
/// client's new EHLO needs it (its greeting swallowed), that EHLO is relayed, and a backend that never answers the
/// end of data gets `timeouts.data_reply` (not `timeouts.idle`) of virtual time before the
/// client is told `421 4.4.2`.
#[tokio::test(start_paused = true)]
async fn smtp_starttls_then_a_silent_backend_after_data_times_out_after_exactly_data_reply() {
    let pki = pki();
    let (context, mut backends) = listener(Protocol::Smtp, TlsMode::Starttls, &pki);
    let (mut plain, server_io) = duplex(PIPE);
    let server = tokio::spawn(async move {
        let mut session = session(context);
        mailfront::smtp::session::serve(ClientStream::Plain(server_io), &mut session).await
    });
    assert_eq!(line(&mut plain).await, format!("220 {HOST} ESMTP\r\n"));
    plain.write_all(b"EHLO client.example\r\n").await.unwrap();
    assert_eq!(
        smtp_reply(&mut plain).await,
        format!("250-{HOST}\r\n250-PIPELINING\r\n250-ENHANCEDSTATUSCODES\r\n250 STARTTLS\r\n")
    );
    plain.write_all(b"STARTTLS\r\n").await.unwrap();
    assert_eq!(line(&mut plain).await, "220 2.0.0 Ready to start TLS\r\n");
    assert!(backends.try_recv().is_err(), "a backend before TLS");
    let mut client = tls_client(plain, &pki).await;
    assert!(
        backends.try_recv().is_err(),
        "no backend before a command needs it"
    );
    client.write_all(b"EHLO client.example\r\n").await.unwrap();
    let mut backend = backends.recv().await.unwrap();
    backend
        .write_all(b"220 backend.internal ESMTP\r\n")
        .await
        .unwrap();
    expect(&mut backend, b"EHLO client.example\r\n").await;
    backend
        .write_all(b"250-backend.internal\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250-AUTH PLAIN\r\n250 8BITMIME\r\n")
        .await
        .unwrap();
    // Our name instead of the backend's, SIZE less the room the Received field takes.
    assert_eq!(
        smtp_reply(&mut client).await,
        format!(
            "250-{HOST}\r\n250-PIPELINING\r\n250-SIZE 10238976\r\n250-AUTH PLAIN\r\n250 8BITMIME\r\n"
        )
    );

    client
        .write_all(b"MAIL FROM:<alice@example.test>\r\n")
        .await
        .unwrap();
    expect(&mut backend, b"MAIL FROM:<alice@example.test>\r\n").await;
    backend.write_all(b"250 2.1.0 Ok\r\n").await.unwrap();
    assert_eq!(line(&mut client).await, "250 2.1.0 Ok\r\n");
    client
        .write_all(b"RCPT TO:<bob@example.test>\r\n")
        .await
        .unwrap();
    expect(&mut backend, b"RCPT TO:<bob@example.test>\r\n").await;
    backend.write_all(b"250 2.1.5 Ok\r\n").await.unwrap();
    assert_eq!(line(&mut client).await, "250 2.1.5 Ok\r\n");
    client.write_all(b"DATA\r\n").await.unwrap();
    expect(&mut backend, b"DATA\r\n").await;
    backend
        .write_all(b"354 End data with <CR><LF>.<CR><LF>\r\n")
        .await
        .unwrap();
    assert_eq!(
        line(&mut client).await,
        "354 End data with <CR><LF>.<CR><LF>\r\n"
    );

    let content = "Subject: hello\r\n\r\nhi\r\n.\r\n";
    let sent = Instant::now();
    client.write_all(content.as_bytes()).await.unwrap();
    // The backend gets the Received field, then the content byte for byte, and says nothing.
    let mut got = String::new();
    while !got.ends_with("\r\n.\r\n") {
        got.push_str(&line(&mut backend).await);
    }
    let lines: Vec<&str> = got.split_inclusive("\r\n").collect();
    assert_eq!(lines.len(), 9, "{got}");
    assert_eq!(
        lines[0],
        "Received: from client.example (unknown [192.0.2.10])\r\n"
    );
    assert!(
        lines[1].starts_with(&format!("\tby {HOST} (mailfront) with ESMTPS id ")),
        "{got}"
    );
    assert_eq!(lines[2], "\tfor <bob@example.test>\r\n");
    assert_eq!(
        lines[3],
        "\ttls TLS_AES_256_GCM_SHA384 group X25519MLKEM768;\r\n"
    );
    // The date is the wall clock's (RFC 5322 §3.6.7), not tokio's paused one.
    assert!(
        lines[4].starts_with('\t') && lines[4].ends_with(" +0000\r\n"),
        "{got}"
    );
    assert_eq!(lines[5..].concat(), content);

    assert_eq!(
        line(&mut client).await,
        format!("421 4.4.2 {HOST} Error: timeout exceeded, closing transmission channel\r\n")
    );
    assert_eq!(sent.elapsed(), DATA_REPLY);
    assert_eq!(rest(&mut client).await, "");
    assert_eq!(server.await.unwrap(), EndReason::BackendTimeout);
}

/// POP3 after STLS: the backend is connected through the connector only once TLS is up and a
/// command needs it (here the first CAPA, nothing learned yet), so its PROXY v2 header (written
/// first, before any POP3 byte) describes a TLS session; the backend's greeting is swallowed (the
/// client had ours) and the client's new CAPA is relayed.
#[tokio::test(start_paused = true)]
async fn pop3_after_stls_the_backend_gets_the_proxy_header_then_only_the_clients_capa() {
    let pki = pki();
    let (context, mut backends) =
        listener_with(Protocol::Pop3, TlsMode::Starttls, &pki, |config, _| {
            config.backend_proxy_protocol = true;
        });
    let (mut plain, server_io) = duplex(PIPE);
    let server = tokio::spawn(async move {
        let mut session = session(context);
        mailfront::pop3::session::serve(ClientStream::Plain(server_io), &mut session).await
    });
    assert_eq!(line(&mut plain).await, format!("+OK {HOST} ready\r\n"));
    // A command pipelined after STLS is dropped, never run after the upgrade.
    plain.write_all(b"STLS\r\nUSER mallory\r\n").await.unwrap();
    assert_eq!(line(&mut plain).await, "+OK Begin TLS negotiation\r\n");
    let mut client = tls_client(plain, &pki).await;
    client.write_all(b"CAPA\r\n").await.unwrap();

    let mut backend = backends.recv().await.unwrap();
    let mut head = [0u8; 16];
    backend.read_exact(&mut head).await.unwrap();
    // PROXY v2 signature, PROXY command, TCP over IPv4, then the length of what follows.
    assert_eq!(&head[..14], b"\r\n\r\n\0\r\nQUIT\n\x21\x11");
    let mut body = vec![0u8; usize::from(u16::from_be_bytes([head[14], head[15]]))];
    backend.read_exact(&mut body).await.unwrap();
    assert_eq!(
        body[..12],
        [192, 0, 2, 10, 192, 0, 2, 1, 0xc3, 0x50, 0x03, 0xe1]
    );
    // TLVs follow the addresses: with TLS up there is at least the SSL one (PP2_TYPE_SSL).
    assert!(body[12..].contains(&0x20), "{body:?}");

    backend.write_all(b"+OK backend ready\r\n").await.unwrap();
    expect(&mut backend, b"CAPA\r\n").await;
    backend
        .write_all(b"+OK\r\nUSER\r\nSASL PLAIN\r\nSTLS\r\n.\r\n")
        .await
        .unwrap();
    // STLS is gone from the list once TLS is up: a second STLS would be refused (RFC 2595 §4).
    assert_eq!(
        pop3_multiline(&mut client).await,
        "+OK\r\nUSER\r\nSASL PLAIN\r\n.\r\n"
    );
    client.write_all(b"QUIT\r\n").await.unwrap();
    expect(&mut backend, b"QUIT\r\n").await;
    backend.write_all(b"+OK bye\r\n").await.unwrap();
    drop(backend);
    assert_eq!(line(&mut client).await, "+OK bye\r\n");
    assert_eq!(rest(&mut client).await, "");
    assert_eq!(server.await.unwrap(), EndReason::ClientClosed);
}

/// A backend that cannot be reached (here: the connector's receiver is gone, as a refused
/// connection) gets the IMAP client a protocol-correct goodbye, counted as a connect failure.
#[tokio::test(start_paused = true)]
async fn imap_unreachable_backend_is_a_bye_unavailable() {
    let pki = pki();
    let (context, backends) = listener(Protocol::Imap, TlsMode::Implicit, &pki);
    drop(backends);
    let (client_io, server_io) = duplex(PIPE);
    let shared = context.clone();
    let server = tokio::spawn(async move {
        let mut session = session(shared.clone());
        let (client, info, took) = ClientStream::Plain(server_io)
            .upgrade(&shared.handshaker)
            .await
            .unwrap();
        session.tls_established(info, took, false);
        mailfront::imap::session::serve(client, &mut session).await
    });
    let mut client = tls_client(client_io, &pki).await;
    assert_eq!(
        line(&mut client).await,
        "* BYE [UNAVAILABLE] Server temporarily unavailable\r\n"
    );
    assert_eq!(rest(&mut client).await, "");
    assert_eq!(server.await.unwrap(), EndReason::BackendUnavailable);
    assert_eq!(context.metrics.backend_connect_failures.get(), 1);
}

/// A listener whose login deadline is [`SHORT_LOGIN`] (idle stays [`IDLE`]).
fn short_login(
    protocol: Protocol,
    tls_mode: TlsMode,
    pki: &Certs,
) -> (Arc<ListenerContext>, UnboundedReceiver<DuplexStream>) {
    listener_with(protocol, tls_mode, pki, |_, timeouts| {
        timeouts.login = SHORT_LOGIN;
    })
}

/// Every 7 s sends `command` and reads its one-line answer, until a line arrives unasked: the
/// goodbye. A client this busy never idles out, so only the login deadline can end it.
async fn busy_until_goodbye<S: AsyncRead + AsyncWrite + Unpin>(
    client: &mut S,
    command: impl Fn(usize) -> String,
) -> String {
    let mut n = 0;
    loop {
        client.write_all(command(n).as_bytes()).await.unwrap();
        let answer = line(client).await;
        assert!(!answer.is_empty(), "closed without a goodbye");
        if let Ok(unasked) = tokio::time::timeout(Duration::from_secs(7), line(client)).await {
            return unasked;
        }
        n += 1;
    }
}

/// IMAP on a STARTTLS listener: a client that keeps sending NOOP before login never idles out,
/// but gets the BYE exactly `timeouts.login` after it connected, with no backend ever involved.
#[tokio::test(start_paused = true)]
async fn imap_client_busy_before_login_is_logged_out_at_exactly_the_login_timeout() {
    let pki = pki();
    let (context, mut backends) = short_login(Protocol::Imap, TlsMode::Starttls, &pki);
    let (mut client, server_io) = duplex(PIPE);
    let started = Instant::now();
    let shared = context.clone();
    let server = tokio::spawn(async move {
        let mut session = session(shared);
        mailfront::imap::session::serve(ClientStream::Plain(server_io), &mut session).await
    });
    assert!(line(&mut client).await.starts_with("* OK"));
    let bye = busy_until_goodbye(&mut client, |n| format!("a{n} NOOP\r\n")).await;
    assert_eq!(started.elapsed(), SHORT_LOGIN);
    assert_eq!(bye, "* BYE Autologout; login took too long\r\n");
    assert_eq!(rest(&mut client).await, "");
    assert_eq!(server.await.unwrap(), EndReason::LoginTimeout);
    assert!(backends.try_recv().is_err(), "a backend was connected");
}

/// POP3 after STLS: the handshake is part of the time before login, so a client that never
/// starts it is dropped at `timeouts.login` when that comes before `tls.handshake_timeout`.
#[tokio::test(start_paused = true)]
async fn pop3_handshake_after_stls_is_bounded_by_the_login_timeout() {
    let pki = pki();
    let login = Duration::from_secs(4);
    let (context, mut backends) =
        listener_with(Protocol::Pop3, TlsMode::Starttls, &pki, |_, timeouts| {
            timeouts.login = login;
        });
    let (mut client, server_io) = duplex(PIPE);
    let started = Instant::now();
    let server = tokio::spawn(async move {
        let mut session = session(context);
        mailfront::pop3::session::serve(ClientStream::Plain(server_io), &mut session).await
    });
    assert_eq!(line(&mut client).await, format!("+OK {HOST} ready\r\n"));
    client.write_all(b"STLS\r\n").await.unwrap();
    assert_eq!(line(&mut client).await, "+OK Begin TLS negotiation\r\n");
    assert_eq!(server.await.unwrap(), EndReason::LoginTimeout);
    assert_eq!(started.elapsed(), login);
    assert!(backends.try_recv().is_err(), "a backend was connected");
}

/// IMAP: once the backend accepts the login the deadline is gone; the relay runs on past it.
#[tokio::test(start_paused = true)]
async fn imap_session_logged_in_outlives_the_login_timeout() {
    let pki = pki();
    let (context, mut backends) = short_login(Protocol::Imap, TlsMode::Implicit, &pki);
    let (client_io, server_io) = duplex(PIPE);
    let server = tokio::spawn(async move {
        let mut session = session(context.clone());
        let (client, info, took) = ClientStream::Plain(server_io)
            .upgrade(&context.handshaker)
            .await
            .unwrap();
        session.tls_established(info, took, false);
        mailfront::imap::session::serve(client, &mut session).await
    });
    let mut client = tls_client(client_io, &pki).await;
    let mut backend = backends.recv().await.unwrap();
    backend
        .write_all(b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] ready\r\n")
        .await
        .unwrap();
    assert!(line(&mut client).await.starts_with("* OK"));
    client.write_all(b"a LOGIN u secret\r\n").await.unwrap();
    assert!(line(&mut backend).await.starts_with("a LOGIN "));
    backend.write_all(b"a OK logged in\r\n").await.unwrap();
    assert_eq!(line(&mut client).await, "a OK logged in\r\n");
    tokio::time::sleep(SHORT_LOGIN * 2).await;
    client.write_all(b"b NOOP\r\n").await.unwrap();
    expect(&mut backend, b"b NOOP\r\n").await;
    backend.write_all(b"b OK done\r\n").await.unwrap();
    assert_eq!(line(&mut client).await, "b OK done\r\n");
    drop(client);
    assert_eq!(server.await.unwrap(), EndReason::ClientClosed);
}

/// SMTP on a STARTTLS listener: NOOPs answered locally before TLS keep the idle timer away, not
/// the login deadline: 421 4.4.2 exactly `timeouts.login` after connecting.
#[tokio::test(start_paused = true)]
async fn smtp_client_busy_before_auth_gets_421_at_exactly_the_login_timeout() {
    let pki = pki();
    let (context, mut backends) = short_login(Protocol::Smtp, TlsMode::Starttls, &pki);
    let (mut client, server_io) = duplex(PIPE);
    let started = Instant::now();
    let server = tokio::spawn(async move {
        let mut session = session(context);
        mailfront::smtp::session::serve(ClientStream::Plain(server_io), &mut session).await
    });
    assert_eq!(line(&mut client).await, format!("220 {HOST} ESMTP\r\n"));
    let bye = busy_until_goodbye(&mut client, |_| "NOOP\r\n".to_owned()).await;
    assert_eq!(started.elapsed(), SHORT_LOGIN);
    assert_eq!(
        bye,
        format!("421 4.4.2 {HOST} Error: login timeout exceeded, closing transmission channel\r\n")
    );
    assert_eq!(rest(&mut client).await, "");
    assert_eq!(server.await.unwrap(), EndReason::LoginTimeout);
    assert!(backends.try_recv().is_err(), "a backend was connected");
}

/// SMTP on an implicit-TLS listener: a successful AUTH stops the login clock.
#[tokio::test(start_paused = true)]
async fn smtp_session_after_auth_outlives_the_login_timeout() {
    let pki = pki();
    let (context, mut backends) = short_login(Protocol::Smtp, TlsMode::Implicit, &pki);
    let (client_io, server_io) = duplex(PIPE);
    let server = tokio::spawn(async move {
        let mut session = session(context.clone());
        let (client, info, took) = ClientStream::Plain(server_io)
            .upgrade(&context.handshaker)
            .await
            .unwrap();
        session.tls_established(info, took, false);
        mailfront::smtp::session::serve(client, &mut session).await
    });
    let mut client = tls_client(client_io, &pki).await;
    // Greeted at once; the first EHLO connects (no backend EHLO learned yet).
    assert_eq!(line(&mut client).await, format!("220 {HOST} ESMTP\r\n"));
    client.write_all(b"EHLO c.example\r\n").await.unwrap();
    let mut backend = backends.recv().await.unwrap();
    backend.write_all(b"220 backend ESMTP\r\n").await.unwrap();
    expect(&mut backend, b"EHLO c.example\r\n").await;
    backend
        .write_all(b"250-backend\r\n250 AUTH PLAIN\r\n")
        .await
        .unwrap();
    smtp_reply(&mut client).await;
    client.write_all(b"AUTH PLAIN AHUAcw==\r\n").await.unwrap();
    expect(&mut backend, b"AUTH PLAIN AHUAcw==\r\n").await;
    backend.write_all(b"235 2.7.0 ok\r\n").await.unwrap();
    assert_eq!(line(&mut client).await, "235 2.7.0 ok\r\n");
    tokio::time::sleep(SHORT_LOGIN * 2).await;
    client.write_all(b"NOOP\r\n").await.unwrap();
    expect(&mut backend, b"NOOP\r\n").await;
    backend.write_all(b"250 2.0.0 ok\r\n").await.unwrap();
    assert_eq!(line(&mut client).await, "250 2.0.0 ok\r\n");
    drop(client);
    assert_eq!(server.await.unwrap(), EndReason::ClientClosed);
}

/// SMTP with `require_tls_for_mail: false`: an accepted cleartext MAIL is as far as such a
/// client goes towards login, so it stops the clock; a refused one does not.
#[tokio::test(start_paused = true)]
async fn smtp_accepted_cleartext_mail_stops_the_login_clock_where_allowed() {
    let pki = pki();
    for accepted in [true, false] {
        let (context, mut backends) = listener_with(
            Protocol::Smtp,
            TlsMode::Starttls,
            &pki,
            |config, timeouts| {
                config.require_tls_for_mail = false;
                timeouts.login = SHORT_LOGIN;
            },
        );
        let (mut client, server_io) = duplex(PIPE);
        let started = Instant::now();
        let server = tokio::spawn(async move {
            let mut session = session(context);
            mailfront::smtp::session::serve(ClientStream::Plain(server_io), &mut session).await
        });
        assert_eq!(line(&mut client).await, format!("220 {HOST} ESMTP\r\n"));
        client.write_all(b"EHLO c.example\r\n").await.unwrap();
        smtp_reply(&mut client).await;
        client
            .write_all(b"MAIL FROM:<a@example.test>\r\n")
            .await
            .unwrap();
        let mut backend = backends.recv().await.unwrap();
        backend.write_all(b"220 backend ESMTP\r\n").await.unwrap();
        expect(&mut backend, b"EHLO c.example\r\n").await;
        backend.write_all(b"250 backend\r\n").await.unwrap();
        expect(&mut backend, b"MAIL FROM:<a@example.test>\r\n").await;
        let verdict: &[u8] = if accepted {
            b"250 2.1.0 Ok\r\n"
        } else {
            b"550 5.7.1 no\r\n"
        };
        backend.write_all(verdict).await.unwrap();
        assert_eq!(line(&mut client).await.as_bytes(), verdict);
        if accepted {
            tokio::time::sleep(SHORT_LOGIN * 2).await;
            client.write_all(b"NOOP\r\n").await.unwrap();
            expect(&mut backend, b"NOOP\r\n").await;
            backend.write_all(b"250 2.0.0 ok\r\n").await.unwrap();
            assert_eq!(line(&mut client).await, "250 2.0.0 ok\r\n");
            drop(client);
            assert_eq!(server.await.unwrap(), EndReason::ClientClosed);
        } else {
            assert!(line(&mut client).await.starts_with("421 4.4.2 "));
            assert_eq!(started.elapsed(), SHORT_LOGIN);
            assert_eq!(server.await.unwrap(), EndReason::LoginTimeout);
        }
    }
}

/// SMTP AUTH against `limits.auth_failures_per_ip` at 1: every exchange is charged when AUTH
/// goes out; a cancel (501), an unknown mechanism (504) and the backend's temporary trouble
/// (454) give the charge back, a 535 after AUTH LOGIN in steps keeps it, and the next AUTH is
/// answered 454 here without reaching the backend.
#[tokio::test(start_paused = true)]
async fn smtp_auth_is_charged_when_sent_and_refunded_only_without_a_wrong_guess() {
    let pki = pki();
    let (context, mut backends) = listener(Protocol::Smtp, TlsMode::Implicit, &pki);
    let throttle = mailfront::limits::AuthThrottle::new(1, Duration::from_secs(600));
    let shared = throttle.clone();
    let (client_io, server_io) = duplex(PIPE);
    let server = tokio::spawn(async move {
        let mut session = session(context.clone()).with_auth_throttle(shared);
        let (client, info, took) = ClientStream::Plain(server_io)
            .upgrade(&context.handshaker)
            .await
            .unwrap();
        session.tls_established(info, took, false);
        mailfront::smtp::session::serve(client, &mut session).await
    });
    let ip = "192.0.2.10".parse().unwrap();
    let mut client = tls_client(client_io, &pki).await;
    // Greeted at once; the first EHLO connects (no backend EHLO learned yet).
    assert_eq!(line(&mut client).await, format!("220 {HOST} ESMTP\r\n"));
    client.write_all(b"EHLO c.example\r\n").await.unwrap();
    let mut backend = backends.recv().await.unwrap();
    backend.write_all(b"220 backend ESMTP\r\n").await.unwrap();
    expect(&mut backend, b"EHLO c.example\r\n").await;
    backend
        .write_all(b"250-backend\r\n250 AUTH PLAIN LOGIN\r\n")
        .await
        .unwrap();
    smtp_reply(&mut client).await;

    // AUTH LOGIN in steps, cancelled by the client: refunded.
    client.write_all(b"AUTH LOGIN\r\n").await.unwrap();
    expect(&mut backend, b"AUTH LOGIN\r\n").await;
    assert!(throttle.throttled(ip), "charged as it went out");
    backend.write_all(b"334 VXNlcm5hbWU6\r\n").await.unwrap();
    assert_eq!(line(&mut client).await, "334 VXNlcm5hbWU6\r\n");
    client.write_all(b"dQ==\r\n").await.unwrap();
    expect(&mut backend, b"dQ==\r\n").await;
    backend.write_all(b"334 UGFzc3dvcmQ6\r\n").await.unwrap();
    assert_eq!(line(&mut client).await, "334 UGFzc3dvcmQ6\r\n");
    client.write_all(b"*\r\n").await.unwrap();
    expect(&mut backend, b"*\r\n").await;
    backend
        .write_all(b"501 5.7.0 Authentication aborted\r\n")
        .await
        .unwrap();
    assert_eq!(
        line(&mut client).await,
        "501 5.7.0 Authentication aborted\r\n"
    );
    assert!(!throttle.throttled(ip), "a cancel is refunded");

    // An unknown mechanism, then the backend's temporary trouble: refunded.
    for (auth, answer) in [
        (
            &b"AUTH CRAM-MD5\r\n"[..],
            &b"504 5.5.4 Unrecognized mechanism\r\n"[..],
        ),
        (
            b"AUTH PLAIN AHUAdw==\r\n",
            b"454 4.7.0 Temporary authentication failure\r\n",
        ),
    ] {
        client.write_all(auth).await.unwrap();
        expect(&mut backend, auth).await;
        backend.write_all(answer).await.unwrap();
        assert_eq!(line(&mut client).await.as_bytes(), answer);
        assert!(
            !throttle.throttled(ip),
            "{}",
            String::from_utf8_lossy(answer)
        );
    }

    // AUTH LOGIN in steps with a wrong password: kept.
    client.write_all(b"AUTH LOGIN dQ==\r\n").await.unwrap();
    expect(&mut backend, b"AUTH LOGIN dQ==\r\n").await;
    backend.write_all(b"334 UGFzc3dvcmQ6\r\n").await.unwrap();
    assert_eq!(line(&mut client).await, "334 UGFzc3dvcmQ6\r\n");
    client.write_all(b"d3Jvbmc=\r\n").await.unwrap();
    expect(&mut backend, b"d3Jvbmc=\r\n").await;
    backend
        .write_all(b"535 5.7.8 Authentication failed\r\n")
        .await
        .unwrap();
    assert_eq!(
        line(&mut client).await,
        "535 5.7.8 Authentication failed\r\n"
    );
    assert!(throttle.throttled(ip), "a wrong password keeps its charge");

    // Throttled: answered here; the NOOP after it is the next thing the backend sees.
    client
        .write_all(b"AUTH PLAIN AHUAc2VjcmV0\r\nNOOP\r\n")
        .await
        .unwrap();
    assert_eq!(
        line(&mut client).await,
        "454 4.7.0 Too many failed authentications, try again later\r\n"
    );
    expect(&mut backend, b"NOOP\r\n").await;
    backend.write_all(b"250 2.0.0 ok\r\n").await.unwrap();
    assert_eq!(line(&mut client).await, "250 2.0.0 ok\r\n");
    drop(client);
    assert_eq!(server.await.unwrap(), EndReason::ClientClosed);
}

/// SIGTERM while a POP3 client that was told to begin TLS has not sent its ClientHello: the
/// session ends at once with `shutdown`, not at `tls.handshake_timeout` or `timeouts.login`,
/// and no backend is dialled.
#[tokio::test(start_paused = true)]
async fn a_graceful_shutdown_ends_a_handshake_after_stls_at_once() {
    let pki = pki();
    let (context, mut backends) = listener_with(Protocol::Pop3, TlsMode::Starttls, &pki, |_, _| {});
    let (mut client, server_io) = duplex(PIPE);
    let drain = CancellationToken::new();
    let mut s = Session::admitted(
        context,
        "192.0.2.10:50000".parse().unwrap(),
        "192.0.2.1:993".parse().unwrap(),
        mailfront::session::Admitted {
            via: None,
            hard_stop: CancellationToken::new(),
            draining: drain.clone(),
            per_ip: None,
            auth_throttle: None,
        },
    );
    let server = tokio::spawn(async move {
        mailfront::pop3::session::serve(ClientStream::Plain(server_io), &mut s).await
    });
    assert_eq!(line(&mut client).await, format!("+OK {HOST} ready\r\n"));
    client.write_all(b"STLS\r\n").await.unwrap();
    assert_eq!(line(&mut client).await, "+OK Begin TLS negotiation\r\n");
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    drain.cancel();
    assert_eq!(server.await.unwrap(), EndReason::Shutdown);
    assert_eq!(started.elapsed(), Duration::from_secs(1));
    assert!(backends.try_recv().is_err(), "a backend was connected");
}

/// Plays a Dovecot-like backend for one capability probe on `backend`, offering `capability`.
async fn answer_probe(backend: &mut DuplexStream, capability: &str) {
    backend.write_all(b"* OK ready\r\n").await.unwrap();
    assert_eq!(line(backend).await, "P1 CAPABILITY\r\n");
    let answer = format!("* CAPABILITY {capability}\r\nP1 OK done\r\n");
    backend.write_all(answer.as_bytes()).await.unwrap();
    assert_eq!(line(backend).await, "P2 LOGOUT\r\n");
    backend.write_all(b"* BYE\r\nP2 OK bye\r\n").await.unwrap();
}

/// The capability probe: the first call learns in the foreground, later ones do not wait and
/// connect to nothing until `REFRESH_EVERY` has passed; then one session's call starts a
/// background refresh, whose answer later sessions show; a refresh that fails keeps what was
/// learned and is tried again after the retry interval, not at every session.
#[tokio::test(start_paused = true)]
async fn the_capability_probe_learns_once_then_refreshes_in_the_background() {
    let pki = pki();
    let (context, mut backends) = listener(Protocol::Imap, TlsMode::Implicit, &pki);
    let first = tokio::spawn({
        let context = context.clone();
        async move { mailfront::probe::ensure_learned(&context).await }
    });
    let mut backend = backends.recv().await.unwrap();
    answer_probe(&mut backend, "IMAP4rev1 AUTH=PLAIN").await;
    assert!(first.await.unwrap());
    assert_eq!(
        context.learned.imap_capability().as_deref(),
        Some(&b"IMAP4rev1 AUTH=PLAIN"[..])
    );
    // Known and fresh: no connection.
    assert!(mailfront::probe::ensure_learned(&context).await);
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(
        backends.try_recv().is_err(),
        "a fresh list was probed again"
    );

    // Due: the session goes on at once, and a refresh runs beside it.
    tokio::time::sleep(mailfront::probe::REFRESH_EVERY).await;
    assert!(mailfront::probe::ensure_learned(&context).await);
    let mut backend = backends.recv().await.unwrap();
    answer_probe(&mut backend, "IMAP4rev1 AUTH=PLAIN AUTH=SCRAM-SHA-256").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        context.learned.imap_capability().as_deref(),
        Some(&b"IMAP4rev1 AUTH=PLAIN AUTH=SCRAM-SHA-256"[..])
    );

    // A refresh that fails (the backend hangs up) keeps the list, and is not retried by every
    // session at once.
    tokio::time::sleep(mailfront::probe::REFRESH_EVERY).await;
    assert!(mailfront::probe::ensure_learned(&context).await);
    drop(backends.recv().await.unwrap());
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        context.learned.imap_capability().as_deref(),
        Some(&b"IMAP4rev1 AUTH=PLAIN AUTH=SCRAM-SHA-256"[..])
    );
    assert!(mailfront::probe::ensure_learned(&context).await);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        backends.try_recv().is_err(),
        "retried before the retry interval"
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(mailfront::probe::ensure_learned(&context).await);
    let mut backend = backends.recv().await.unwrap();
    answer_probe(&mut backend, "IMAP4rev1").await;
}
