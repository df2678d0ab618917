//! The real client, end to end: a load balancer's PROXY header (`proxy_protocol_from`) names the
//! client for everything mailfront does, and `backend_client_info` tells the backend in its own
//! protocol (SMTP XCLIENT, POP3 XCLIENT, IMAP ID). The balancer is played by the test: it writes
//! the header by hand (HAProxy `doc/proxy-protocol.txt`), independently of the crate's reader.
// Helpers outside #[test] functions: clippy's allow-*-in-tests does not reach them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use crate::common::*;
use base64::prelude::{BASE64_STANDARD, Engine as _};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const HOST: &str = "mx.example.test";

/// A v2 PROXY header for TCP over IPv4.
fn v2(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let (IpAddr::V4(s), IpAddr::V4(d)) = (src.ip(), dst.ip()) else {
        panic!("IPv4 only");
    };
    let mut h = PROXY_V2_SIGNATURE.to_vec();
    h.extend_from_slice(&[0x21, 0x11, 0x00, 0x0C]);
    h.extend_from_slice(&s.octets());
    h.extend_from_slice(&d.octets());
    h.extend_from_slice(&src.port().to_be_bytes());
    h.extend_from_slice(&dst.port().to_be_bytes());
    h
}

/// A v2 LOCAL header: a balancer's health check.
fn v2_local() -> Vec<u8> {
    let mut h = PROXY_V2_SIGNATURE.to_vec();
    h.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
    h
}

fn v1(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    format!(
        "PROXY TCP4 {} {} {} {}\r\n",
        src.ip(),
        dst.ip(),
        src.port(),
        dst.port()
    )
    .into_bytes()
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// A listener line with extra keys.
fn listener(name: &str, protocol: &str, tls: &str, backend: SocketAddr, extra: &str) -> String {
    listener_yaml(name, protocol, tls, backend) + extra
}

struct Env {
    pki: Pki,
    backend: FakeBackend,
    proxy: Proxy,
}

async fn env(
    kind: FakeKind,
    options: FakeOptions,
    listeners: &[(&str, &str, &str, &str)],
    extra: &str,
) -> Env {
    let pki = Pki::new();
    let cert = pki.issue("mx", &[HOST], false);
    let backend = FakeBackend::start_with(kind, options).await;
    let yaml_listeners: Vec<String> = listeners
        .iter()
        .map(|(name, protocol, tls, keys)| listener(name, protocol, tls, backend.addr, keys))
        .collect();
    let yaml = config_yaml(&[&cert], &yaml_listeners, extra).replace(
        "  reload_interval: 100ms\n",
        "  reload_interval: 100ms\n  handshake_timeout: 1s\n",
    );
    let proxy = Proxy::start(&yaml, pki.dir.path()).await;
    Env {
        pki,
        backend,
        proxy,
    }
}

/// One implicit-TLS listener `lb` behind the balancer, with `backend_client_info`.
async fn client_info_env(kind: FakeKind, options: FakeOptions, protocol: &str) -> Env {
    let keys = format!("{BEHIND_LB}    backend_client_info: true\n");
    env(kind, options, &[("lb", protocol, "implicit", &keys)], "").await
}

/// A TLS client behind the balancer: the v2 header for `client` (reaching `reached`) is written
/// first, then the handshake runs on the same connection, as through HAProxy's send-proxy-v2.
async fn through_balancer(
    e: &Env,
    listener: &str,
    client: SocketAddr,
    reached: SocketAddr,
) -> BufReader<tokio_rustls::client::TlsStream<TcpStream>> {
    let mut tcp = TcpStream::connect(e.proxy.addr(listener)).await.unwrap();
    // The header and the ClientHello may share a segment: the reader must not eat into TLS.
    tcp.write_all(&v2(client, reached)).await.unwrap();
    let config = client_config(&e.pki.ca_der, &[&rustls::version::TLS13], None);
    BufReader::new(tls_upgrade(tcp, HOST, config).await.unwrap())
}

fn metric(proxy: &Proxy, listener: &str, result: &str) -> u64 {
    let text = proxy.metrics.encode();
    let prefix = format!(
        "mailfront_proxy_protocol_headers_total{{listener=\"{listener}\",result=\"{result}\"}} "
    );
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(|v| v.parse().unwrap())
        .unwrap_or_else(|| panic!("no {prefix} in\n{text}"))
}

/// Reads until the peer closes; true if it closed (EOF or reset) within the timeout, sending
/// nothing.
async fn closes_silently<S: AsyncRead + Unpin>(stream: &mut S) -> bool {
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(TIMEOUT, stream.read(&mut buf)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

const BEHIND_LB: &str = "    proxy_protocol_from: [\"127.0.0.0/8\"]\n";

#[tokio::test]
async fn a_trusted_balancers_v2_header_names_the_client_to_the_backend() {
    let e = env(
        FakeKind::Imap,
        FakeOptions {
            expect_proxy_v2: true,
            ..FakeOptions::default()
        },
        &[(
            "lb",
            "imap",
            "implicit",
            &format!("{BEHIND_LB}    backend_proxy_protocol: true\n"),
        )],
        "",
    )
    .await;
    let client = addr("203.0.113.7:40001");
    let reached = addr("198.51.100.1:993");
    let mut io = through_balancer(&e, "lb", client, reached).await;
    assert!(read_line(&mut io).await.starts_with("* OK"));
    // The backend is connected for the login.
    io.get_mut()
        .write_all(b"a LOGIN u secret\r\nz LOGOUT\r\n")
        .await
        .unwrap();
    assert!(read_until_tag(&mut io, "a").await.contains("a OK"));
    let _ = read_until_tag(&mut io, "z").await;

    // The listener's capability probe had a LOCAL header (kept apart); the session's names the
    // client.
    assert_eq!(e.backend.proxy_headers.probes(), 1);
    let headers = e.backend.proxy_headers.connections();
    assert_eq!(headers.len(), 1);
    let h = ppp::v2::Header::try_from(headers[0].as_slice()).unwrap();
    match h.addresses {
        ppp::v2::Addresses::IPv4(a) => {
            assert_eq!(SocketAddr::from((a.source_address, a.source_port)), client);
            assert_eq!(
                SocketAddr::from((a.destination_address, a.destination_port)),
                reached
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(metric(&e.proxy, "lb", "proxy"), 1);
}

#[tokio::test]
async fn a_v1_header_puts_the_client_in_the_received_field() {
    let e = env(
        FakeKind::Smtp,
        FakeOptions::default(),
        &[("lb", "smtp", "starttls", BEHIND_LB)],
        "",
    )
    .await;
    let mut tcp = TcpStream::connect(e.proxy.addr("lb")).await.unwrap();
    tcp.write_all(&v1(addr("203.0.113.9:40002"), addr("198.51.100.1:587")))
        .await
        .unwrap();
    let mut io = BufReader::new(tcp);
    assert!(read_smtp_reply(&mut io).await.starts_with("220 "));
    io.get_mut().write_all(b"STARTTLS\r\n").await.unwrap();
    assert!(read_smtp_reply(&mut io).await.starts_with("220 2.0.0"));
    let config = client_config(&e.pki.ca_der, &[&rustls::version::TLS13], None);
    let tls = tls_upgrade(io.into_inner(), HOST, config).await.unwrap();
    let mut io = BufReader::new(tls);
    let auth = format!(
        "EHLO client.test\r\nAUTH PLAIN {}\r\n",
        BASE64_STANDARD.encode(b"\0user\0secret")
    );
    io.get_mut().write_all(auth.as_bytes()).await.unwrap();
    assert!(read_smtp_reply(&mut io).await.starts_with("250"));
    assert!(read_smtp_reply(&mut io).await.starts_with("235"));
    for cmd in [
        "MAIL FROM:<a@example.test>",
        "RCPT TO:<b@example.test>",
        "DATA",
    ] {
        io.get_mut()
            .write_all(format!("{cmd}\r\n").as_bytes())
            .await
            .unwrap();
        let reply = read_smtp_reply(&mut io).await;
        assert!(
            reply.starts_with('2') || reply.starts_with("354"),
            "{reply}"
        );
    }
    io.get_mut()
        .write_all(b"Subject: hi\r\n\r\nhello\r\n.\r\nQUIT\r\n")
        .await
        .unwrap();
    assert!(read_smtp_reply(&mut io).await.starts_with("250"));
    let seen = e.backend.recorder.all_text();
    assert!(
        seen.contains("Received: from client.test (unknown [203.0.113.9])"),
        "{seen}"
    );
    assert_eq!(metric(&e.proxy, "lb", "proxy"), 1);
}

#[tokio::test]
async fn missing_malformed_overlong_late_and_untrusted_headers_are_closed_and_counted() {
    let e = env(
        FakeKind::Imap,
        FakeOptions::default(),
        &[
            ("lb", "imap", "implicit", BEHIND_LB),
            (
                "elsewhere",
                "imap",
                "implicit",
                "    proxy_protocol_from: [\"192.0.2.0/24\"]\n",
            ),
        ],
        "",
    )
    .await;
    let lb = e.proxy.addr("lb");
    // No header: a TLS client straight to the listener.
    let config = client_config(&e.pki.ca_der, &[&rustls::version::TLS13], None);
    let tcp = TcpStream::connect(lb).await.unwrap();
    assert!(tls_upgrade(tcp, HOST, config.clone()).await.is_err());
    // Malformed and over-long.
    for (bytes, _) in [
        (
            b"PROXY TCP4 192.0.2.1 198.51.100.2 40000\r\n".to_vec(),
            "malformed",
        ),
        (
            {
                let mut h = PROXY_V2_SIGNATURE.to_vec();
                h.extend_from_slice(&[0x21, 0x11, 0xFF, 0xFF]);
                h
            },
            "too_long",
        ),
    ] {
        let mut tcp = TcpStream::connect(lb).await.unwrap();
        tcp.write_all(&bytes).await.unwrap();
        assert!(closes_silently(&mut tcp).await);
    }
    // Nothing at all within tls.handshake_timeout (1 s here).
    let started = tokio::time::Instant::now();
    let mut tcp = TcpStream::connect(lb).await.unwrap();
    assert!(closes_silently(&mut tcp).await);
    assert!(started.elapsed() >= Duration::from_millis(900));
    // A health check: v2 LOCAL, closed quietly.
    let mut tcp = TcpStream::connect(lb).await.unwrap();
    tcp.write_all(&v2_local()).await.unwrap();
    assert!(closes_silently(&mut tcp).await);
    // A peer outside proxy_protocol_from: closed before anything is read.
    let mut tcp = TcpStream::connect(e.proxy.addr("elsewhere")).await.unwrap();
    tcp.write_all(&v2(addr("203.0.113.7:1"), addr("198.51.100.1:993")))
        .await
        .unwrap();
    assert!(closes_silently(&mut tcp).await);

    eventually(|| metric(&e.proxy, "elsewhere", "untrusted") == 1).await;
    for (result, count) in [
        ("missing", 1),
        ("malformed", 1),
        ("too_long", 1),
        ("timeout", 1),
        ("local", 1),
        ("proxy", 0),
    ] {
        eventually(|| metric(&e.proxy, "lb", result) == count).await;
    }
    assert!(
        e.backend.recorder.connections().is_empty(),
        "no backend connection for any of them"
    );
}

#[tokio::test]
async fn the_per_address_limit_counts_the_header_source_not_the_balancer() {
    let e = env(
        FakeKind::Smtp,
        FakeOptions::default(),
        &[("lb", "smtp", "starttls", BEHIND_LB)],
        "limits:\n  connections_per_ip: 1\n",
    )
    .await;
    let lb = e.proxy.addr("lb");
    let dst = addr("198.51.100.1:587");
    let mut held = Vec::new();
    for (source, expected) in [
        ("203.0.113.1:1000", "220 "),
        ("203.0.113.2:1000", "220 "),
        ("203.0.113.1:1001", "421 "),
    ] {
        let mut tcp = TcpStream::connect(lb).await.unwrap();
        tcp.write_all(&v2(addr(source), dst)).await.unwrap();
        let mut io = BufReader::new(tcp);
        let reply = read_smtp_reply(&mut io).await;
        assert!(reply.starts_with(expected), "{source}: {reply}");
        held.push(io);
    }
}

/// A listener bound to a dual-stack `[::]` sees a balancer that connects over IPv4 as
/// `::ffff:127.0.0.1`, and a balancer may name an IPv4 client in that mapped form too. Admission
/// makes both IPv4, once: the balancer matches the IPv4 `proxy_protocol_from`, the client counts
/// as its IPv4 address in `limits.connections_per_ip`, and the backend gets a TCP4 header.
#[tokio::test]
async fn mapped_addresses_are_admitted_as_their_ipv4_addresses() {
    // Needs a dual-stack socket: IPv6, and IPv4 reaching it (Linux's default, bindv6only=0).
    let Ok(probe) = std::net::TcpListener::bind("[::]:0") else {
        eprintln!("skipped: no IPv6");
        return;
    };
    let port = probe.local_addr().unwrap().port();
    if std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        eprintln!("skipped: no dual-stack sockets");
        return;
    }
    drop(probe);
    let pki = Pki::new();
    let cert = pki.issue("mx", &[HOST], false);
    let backend = FakeBackend::start_with(
        FakeKind::Imap,
        FakeOptions {
            expect_proxy_v2: true,
            ..FakeOptions::default()
        },
    )
    .await;
    let keys = format!("{BEHIND_LB}    backend_proxy_protocol: true\n");
    let yaml =
        config_yaml(
            &[&cert],
            &[listener("lb", "imap", "implicit", backend.addr, &keys)
                .replace("127.0.0.1:0", "[::]:0")],
            "limits:\n  connections_per_ip: 1\n",
        );
    let proxy = Proxy::start(&yaml, pki.dir.path()).await;
    let lb = SocketAddr::from(([127, 0, 0, 1], proxy.addr("lb").port()));

    let mut tcp = TcpStream::connect(lb).await.unwrap();
    tcp.write_all(b"PROXY TCP6 ::ffff:203.0.113.7 ::ffff:198.51.100.1 40001 993\r\n")
        .await
        .unwrap();
    let config = client_config(&pki.ca_der, &[&rustls::version::TLS13], None);
    let mut io = BufReader::new(tls_upgrade(tcp, HOST, config).await.unwrap());
    assert!(read_line(&mut io).await.starts_with("* OK"));
    // The same client written as IPv4 is the same address, at its limit while the first has
    // not logged in: closed before any handshake.
    let mut tcp = TcpStream::connect(lb).await.unwrap();
    tcp.write_all(&v2(addr("203.0.113.7:40002"), addr("198.51.100.1:993")))
        .await
        .unwrap();
    assert!(closes_silently(&mut tcp).await);
    eventually(|| metric(&proxy, "lb", "proxy") == 2).await;
    // The first logs in, so its backend is connected, with a TCP4 header.
    io.get_mut()
        .write_all(b"a LOGIN u secret\r\n")
        .await
        .unwrap();
    assert!(read_until_tag(&mut io, "a").await.contains("a OK"));
    let headers = backend.proxy_headers.connections();
    assert_eq!(headers.len(), 1);
    let h = ppp::v2::Header::try_from(headers[0].as_slice()).unwrap();
    match h.addresses {
        ppp::v2::Addresses::IPv4(a) => {
            assert_eq!(
                SocketAddr::from((a.source_address, a.source_port)),
                addr("203.0.113.7:40001")
            );
            assert_eq!(
                SocketAddr::from((a.destination_address, a.destination_port)),
                addr("198.51.100.1:993")
            );
        }
        other => panic!("{other:?}"),
    }
    io.get_mut().write_all(b"z LOGOUT\r\n").await.unwrap();
    let _ = read_until_tag(&mut io, "z").await;
}

#[tokio::test]
async fn a_clients_own_proxy_header_gains_nothing_without_proxy_protocol_from() {
    let e = env(
        FakeKind::Smtp,
        FakeOptions {
            expect_proxy_v2: true,
            ..FakeOptions::default()
        },
        &[
            (
                "plain",
                "smtp",
                "starttls",
                "    backend_proxy_protocol: true\n",
            ),
            (
                "tls",
                "smtp",
                "implicit",
                "    backend_proxy_protocol: true\n",
            ),
        ],
        "",
    )
    .await;
    let forged = addr("10.6.6.6:25");
    // Cleartext: the header is a command line like any other, refused; no backend yet.
    let tcp = TcpStream::connect(e.proxy.addr("plain")).await.unwrap();
    let real = tcp.local_addr().unwrap();
    let mut io = BufReader::new(tcp);
    assert!(read_smtp_reply(&mut io).await.starts_with("220 "));
    io.get_mut()
        .write_all(&v1(forged, addr("198.51.100.1:587")))
        .await
        .unwrap();
    let reply = read_smtp_reply(&mut io).await;
    assert!(reply.starts_with('5'), "{reply}");
    io.get_mut().write_all(b"STARTTLS\r\n").await.unwrap();
    assert!(read_smtp_reply(&mut io).await.starts_with("220 2.0.0"));
    let config = client_config(&e.pki.ca_der, &[&rustls::version::TLS13], None);
    let tls = tls_upgrade(io.into_inner(), HOST, config.clone())
        .await
        .unwrap();
    let mut io = BufReader::new(tls);
    // A login, so that the backend is connected.
    let auth = format!(
        "EHLO c\r\nAUTH PLAIN {}\r\nQUIT\r\n",
        BASE64_STANDARD.encode(b"\0user\0secret")
    );
    io.get_mut().write_all(auth.as_bytes()).await.unwrap();
    assert!(read_smtp_reply(&mut io).await.starts_with("250"));
    assert!(read_smtp_reply(&mut io).await.starts_with("235"));
    let _ = read_smtp_reply(&mut io).await;
    let headers = e.backend.proxy_headers.connections();
    assert_eq!(headers.len(), 1);
    let h = ppp::v2::Header::try_from(headers[0].as_slice()).unwrap();
    let ppp::v2::Addresses::IPv4(a) = h.addresses else {
        panic!("{:?}", h.addresses)
    };
    assert_eq!(SocketAddr::from((a.source_address, a.source_port)), real);
    assert!(!e.backend.recorder.all_text().contains("PROXY"));
    // Implicit TLS: the header is no ClientHello, and the handshake fails.
    let mut tcp = TcpStream::connect(e.proxy.addr("tls")).await.unwrap();
    tcp.write_all(&v2(forged, addr("198.51.100.1:465")))
        .await
        .unwrap();
    assert!(tls_upgrade(tcp, HOST, config).await.is_err());
    assert_eq!(e.backend.proxy_headers.connections().len(), 1);
}

/// An implicit-TLS submission listener with `backend_client_info` behind a balancer, its
/// backend offering XCLIENT (or refusing it), and a client connected from 203.0.113.7:40001.
async fn xclient_env(refuse: bool) -> (Env, BufReader<tokio_rustls::client::TlsStream<TcpStream>>) {
    let e = client_info_env(
        FakeKind::Smtp,
        FakeOptions {
            ehlo_extensions: vec![
                "PIPELINING".into(),
                "AUTH PLAIN".into(),
                "XCLIENT NAME ADDR PROTO HELO REVERSE_NAME PORT LOGIN DESTADDR DESTPORT".into(),
                "8BITMIME".into(),
            ],
            refuse_xclient: refuse,
            ..FakeOptions::default()
        },
        "smtp",
    )
    .await;
    let io = through_balancer(
        &e,
        "lb",
        addr("203.0.113.7:40001"),
        addr("198.51.100.1:465"),
    )
    .await;
    (e, io)
}

/// What the backend saw first on every session with `backend_client_info`: mailfront's own
/// EHLO and XCLIENT, before any client command.
const XCLIENT_PREAMBLE: &str = "EHLO mx.example.test\r\n\
    XCLIENT NAME=[UNAVAILABLE] ADDR=203.0.113.7 PORT=40001 DESTADDR=198.51.100.1 DESTPORT=465\r\n";

#[tokio::test]
async fn smtp_xclient_names_the_client_before_any_client_command_and_stays_invisible() {
    let (e, mut io) = xclient_env(false).await;
    assert!(read_smtp_reply(&mut io).await.starts_with("220 "));
    io.get_mut()
        .write_all(b"EHLO client+x.test\r\n")
        .await
        .unwrap();
    let ehlo = read_smtp_reply(&mut io).await;
    // The login connects (EHLO was answered from what the probe learned).
    let auth = format!(
        "AUTH PLAIN {}\r\nNOOP\r\nQUIT\r\n",
        BASE64_STANDARD.encode(b"\0user\0secret")
    );
    io.get_mut().write_all(auth.as_bytes()).await.unwrap();
    assert!(read_smtp_reply(&mut io).await.starts_with("235"));
    assert!(read_smtp_reply(&mut io).await.starts_with("250"));
    assert!(read_smtp_reply(&mut io).await.starts_with("221"));
    assert!(ehlo.starts_with("250-"), "{ehlo}");
    assert_eq!(
        ehlo.matches("\r\n250 ").count(),
        1,
        "one EHLO reply: {ehlo}"
    );
    assert!(!ehlo.contains("XCLIENT") && !ehlo.contains("220"), "{ehlo}");
    let seen = e.backend.recorder.all_text();
    assert!(
        seen.starts_with(&format!(
            "{XCLIENT_PREAMBLE}EHLO client+x.test\r\nAUTH PLAIN {}\r\nNOOP\r\n",
            BASE64_STANDARD.encode(b"\0user\0secret")
        )),
        "{seen}"
    );
}

/// HELO, or no greeting command at all, gets the same identity as EHLO: XCLIENT never
/// depends on what the client says first.
#[tokio::test]
async fn smtp_xclient_is_sent_for_helo_and_for_a_session_without_ehlo() {
    // HELO is answered by mailfront; MAIL needs the backend, which then sees mailfront's EHLO
    // and XCLIENT, the client's HELO replayed, and the MAIL.
    for (first, expect) in [
        (
            "HELO old.client\r\nMAIL FROM:<a@x.test>\r\n",
            "HELO old.client\r\nMAIL FROM:<a@x.test>\r\n",
        ),
        ("MAIL FROM:<a@x.test>\r\n", "MAIL FROM:<a@x.test>\r\n"),
    ] {
        let (e, mut io) = xclient_env(false).await;
        assert!(read_smtp_reply(&mut io).await.starts_with("220 "));
        io.get_mut().write_all(first.as_bytes()).await.unwrap();
        for _ in 0..first.matches("\r\n").count() {
            assert!(read_smtp_reply(&mut io).await.starts_with("250"));
        }
        io.get_mut().write_all(b"QUIT\r\n").await.unwrap();
        assert!(read_smtp_reply(&mut io).await.starts_with("221"));
        let seen = e.backend.recorder.all_text();
        assert!(
            seen.starts_with(&format!("{XCLIENT_PREAMBLE}{expect}")),
            "{first:?}: {seen}"
        );
    }
}

/// A backend that offers XCLIENT and refuses mailfront's: the session was meant to carry the
/// client's identity, so it ends with 421 before any client command reaches the backend.
#[tokio::test]
async fn a_backend_refusing_xclient_closes_the_session_with_421() {
    let (e, mut io) = xclient_env(true).await;
    assert!(read_smtp_reply(&mut io).await.starts_with("220 "));
    // EHLO is answered from what the probe learned; MAIL connects.
    io.get_mut().write_all(b"EHLO c.test\r\n").await.unwrap();
    assert!(read_smtp_reply(&mut io).await.starts_with("250"));
    io.get_mut()
        .write_all(b"MAIL FROM:<a@x.test>\r\n")
        .await
        .unwrap();
    let refused = read_smtp_reply(&mut io).await;
    assert!(refused.starts_with("421 4.7.0 "), "{refused}");
    let mut rest = Vec::new();
    io.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
    let seen = e.backend.recorder.all_text();
    assert_eq!(
        seen.matches("EHLO").count(),
        1,
        "only mailfront's EHLO: {seen}"
    );
    assert!(
        seen.contains("XCLIENT NAME=[UNAVAILABLE] ADDR=203.0.113.7 "),
        "{seen}"
    );
    assert!(!seen.contains("MAIL"), "{seen}");
}

#[tokio::test]
async fn pop3_xclient_and_imap_id_carry_the_header_source() {
    let e = client_info_env(
        FakeKind::Pop3,
        FakeOptions {
            pop3_capa: vec!["USER".into(), "XCLIENT".into(), "PIPELINING".into()],
            ..FakeOptions::default()
        },
        "pop3",
    )
    .await;
    let mut io = through_balancer(
        &e,
        "lb",
        addr("203.0.113.8:40003"),
        addr("198.51.100.1:995"),
    )
    .await;
    assert!(read_line(&mut io).await.starts_with("+OK"));
    io.get_mut().write_all(b"CAPA\r\n").await.unwrap();
    let mut capa = String::new();
    loop {
        let line = read_line(&mut io).await;
        capa.push_str(&line);
        if line == ".\r\n" {
            break;
        }
    }
    assert!(!capa.contains("XCLIENT"), "{capa}");
    // CAPA was answered from what the probe learned; the login connects.
    io.get_mut()
        .write_all(b"USER u\r\nPASS secret\r\nQUIT\r\n")
        .await
        .unwrap();
    assert!(read_line(&mut io).await.starts_with("+OK"));
    assert!(read_line(&mut io).await.starts_with("+OK"));
    let _ = read_line(&mut io).await;
    let seen = e.backend.recorder.all_text();
    // mailfront's CAPA asks the live backend whether it offers XCLIENT, before any credential.
    assert!(
        seen.starts_with(
            "CAPA\r\nXCLIENT ADDR=203.0.113.8 PORT=40003\r\nUSER u\r\nPASS secret\r\n"
        ),
        "{seen}"
    );

    let e = client_info_env(FakeKind::Imap, FakeOptions::default(), "imap").await;
    let mut io = through_balancer(
        &e,
        "lb",
        addr("203.0.113.9:40004"),
        addr("198.51.100.1:993"),
    )
    .await;
    assert!(read_line(&mut io).await.starts_with("* OK"));
    io.get_mut()
        .write_all(b"a LOGIN user secret\r\nz LOGOUT\r\n")
        .await
        .unwrap();
    assert!(read_until_tag(&mut io, "a").await.contains("a OK"));
    let _ = read_until_tag(&mut io, "z").await;
    let seen = e.backend.recorder.all_text();
    assert!(
        seen.contains(
            "\"x-originating-ip\" \"203.0.113.9\" \"x-originating-port\" \"40004\" \"x-connected-ip\" \"198.51.100.1\" \"x-connected-port\" \"993\" \"x-session-id\" \""
        ),
        "{seen}"
    );
    let id_at = seen.find(" ID (").unwrap();
    assert!(
        id_at < seen.find("LOGIN").unwrap(),
        "ID before the credential: {seen}"
    );
}
