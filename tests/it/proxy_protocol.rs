//! `backend_proxy_protocol: true`: the backend receives a PROXY protocol v2 header first, naming
//! the real client (HAProxy's `doc/proxy-protocol.txt`, v2) — checked by a fake backend that, like Postfix
//! and Dovecot set up for HAProxy, reads the header before greeting, then behaves as usual.
// Helpers outside #[test] functions: clippy's allow-*-in-tests does not reach them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use crate::common::*;
use base64::prelude::{BASE64_STANDARD, Engine as _};
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};

const HOST: &str = "mx.example.test";

const TYPE_ALPN: u8 = 0x01;
const TYPE_AUTHORITY: u8 = 0x02;
const TYPE_SSL: u8 = 0x20;
const SUBTYPE_SSL_VERSION: u8 = 0x21;
const SUBTYPE_SSL_CIPHER: u8 = 0x23;
const SUBTYPE_SSL_GROUP: u8 = 0x26;
const SUBTYPE_SSL_SIG_SCHEME: u8 = 0x27;

/// A PROXY v2 header read field by field (HAProxy `doc/proxy-protocol.txt` §2.2), written here
/// independently of the crate's encoder.
type Tlvs = Vec<(u8, Vec<u8>)>;

#[derive(Debug)]
struct Header {
    ver_cmd: u8,
    family: u8,
    src: SocketAddr,
    dst: SocketAddr,
    tlvs: Tlvs,
}

impl Header {
    fn tlv(&self, kind: u8) -> Option<&[u8]> {
        self.tlvs
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, v)| v.as_slice())
    }

    /// `PP2_TYPE_SSL`: client bits, verify, and the sub-TLVs.
    fn ssl(&self) -> Option<(u8, u32, Tlvs)> {
        let v = self.tlv(TYPE_SSL)?;
        let client = v[0];
        let verify = u32::from_be_bytes(v[1..5].try_into().unwrap());
        Some((client, verify, parse_tlvs(&v[5..])))
    }
}

fn parse_tlvs(mut rest: &[u8]) -> Tlvs {
    let mut out = Vec::new();
    while !rest.is_empty() {
        let kind = rest[0];
        let len = usize::from(u16::from_be_bytes([rest[1], rest[2]]));
        out.push((kind, rest[3..3 + len].to_vec()));
        rest = &rest[3 + len..];
    }
    out
}

fn decode(h: &[u8]) -> Header {
    assert_eq!(h[..12], PROXY_V2_SIGNATURE);
    let ver_cmd = h[12];
    let family = h[13];
    let len = usize::from(u16::from_be_bytes([h[14], h[15]]));
    assert_eq!(h.len(), 16 + len);
    let body = &h[16..];
    let (src_ip, dst_ip, ports): (IpAddr, IpAddr, &[u8]) = match family {
        0x11 => (
            <[u8; 4]>::try_from(&body[0..4]).unwrap().into(),
            <[u8; 4]>::try_from(&body[4..8]).unwrap().into(),
            &body[8..],
        ),
        0x21 => (
            <[u8; 16]>::try_from(&body[0..16]).unwrap().into(),
            <[u8; 16]>::try_from(&body[16..32]).unwrap().into(),
            &body[32..],
        ),
        f => panic!("family {f:#x}"),
    };
    let sport = u16::from_be_bytes([ports[0], ports[1]]);
    let dport = u16::from_be_bytes([ports[2], ports[3]]);
    Header {
        ver_cmd,
        family,
        src: SocketAddr::new(src_ip, sport),
        dst: SocketAddr::new(dst_ip, dport),
        tlvs: parse_tlvs(&ports[4..]),
    }
}

/// A TCP connection from `source` (port chosen by the OS) to `to`.
async fn connect_from(source: IpAddr, to: SocketAddr) -> TcpStream {
    let socket = match source {
        IpAddr::V4(_) => TcpSocket::new_v4().unwrap(),
        IpAddr::V6(_) => TcpSocket::new_v6().unwrap(),
    };
    socket.bind(SocketAddr::new(source, 0)).unwrap();
    socket.connect(to).await.unwrap()
}

/// 127.0.0.2 when the OS routes all of 127/8 to loopback (Linux), else 127.0.0.1: the test then
/// still runs, only without telling the client's address from the proxy's.
async fn client_source() -> IpAddr {
    let other: IpAddr = "127.0.0.2".parse().unwrap();
    let socket = TcpSocket::new_v4().unwrap();
    if socket.bind(SocketAddr::new(other, 0)).is_ok() {
        other
    } else {
        "127.0.0.1".parse().unwrap()
    }
}

fn pinned(pki: &Pki, suite: rustls::SupportedCipherSuite) -> Arc<rustls::ClientConfig> {
    client_config(&pki.ca_der, &[&rustls::version::TLS13], Some(vec![suite]))
}

/// What the test certificate's key (rcgen's default, ECDSA P-256) signs TLS 1.3 handshakes
/// with: TLS 1.3 ties the curve to the hash (RFC 8446 §4.2.3).
const ECDSA_P256_SCHEME: &str = "ecdsa_secp256r1_sha256";

struct Env {
    pki: Pki,
    backend: FakeBackend,
    proxy: Proxy,
}

/// One listener with `backend_proxy_protocol: true` in front of a fake backend that expects it.
async fn env(kind: FakeKind, protocol: &str, tls: &str, listen: &str) -> Env {
    let pki = Pki::new();
    let cert = pki.issue("mx", &[HOST], false);
    let backend = FakeBackend::start_with(
        kind,
        FakeOptions {
            expect_proxy_v2: true,
            ..FakeOptions::default()
        },
    )
    .await;
    let listener = listener_yaml("l", protocol, tls, backend.addr).replace("127.0.0.1:0", listen)
        + "    backend_proxy_protocol: true\n";
    let yaml = config_yaml(&[&cert], &[listener], "");
    let proxy = Proxy::start(&yaml, pki.dir.path()).await;
    Env {
        pki,
        backend,
        proxy,
    }
}

#[tokio::test]
async fn implicit_imap_header_names_the_client_with_ssl_tlv_cipher_and_sni_authority() {
    let e = env(FakeKind::Imap, "imap", "implicit", "127.0.0.1:0").await;
    let source = client_source().await;
    let tcp = connect_from(source, e.proxy.addr("l")).await;
    let client_addr = tcp.local_addr().unwrap();
    let config = pinned(
        &e.pki,
        rustls::crypto::aws_lc_rs::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    );
    let tls = tls_upgrade(tcp, HOST, config).await.unwrap();
    let mut io = BufReader::new(tls);
    let greeting = read_line(&mut io).await;
    assert!(greeting.starts_with("* OK"), "{greeting}");
    io.get_mut()
        .write_all(b"a LOGIN user secret\r\n")
        .await
        .unwrap();
    let login = read_until_tag(&mut io, "a").await;
    assert!(login.contains("a OK"), "{login}");
    io.get_mut().write_all(b"b LOGOUT\r\n").await.unwrap();
    let _ = read_until_tag(&mut io, "b").await;

    // The listener's capability probe came first, with a LOCAL header and no addresses: no
    // client is behind it (§2.2).
    let every = e.backend.proxy_headers.accepted_connections();
    assert_eq!(every.len(), 2, "the probe's and the session's");
    assert_eq!(every[0][..12], PROXY_V2_SIGNATURE);
    assert_eq!(every[0][12..], [0x20, 0x00, 0x00, 0x00], "version 2, LOCAL");
    assert_eq!(e.backend.proxy_headers.probes(), 1);
    let headers = e.backend.proxy_headers.connections();
    assert_eq!(headers.len(), 1, "one header per backend connection");
    let h = decode(&headers[0]);
    assert_eq!(h.ver_cmd, 0x21, "version 2, PROXY");
    assert_eq!(h.family, 0x11, "TCP over IPv4");
    assert_eq!(h.src, client_addr, "the client's address and port");
    assert_eq!(
        h.dst,
        e.proxy.addr("l"),
        "the address the client connected to"
    );
    let (client, verify, subs) = h.ssl().expect("PP2_TYPE_SSL for a TLS client");
    assert_eq!(client, 0x01, "PP2_CLIENT_SSL, no certificate bits");
    assert_ne!(verify, 0, "no client certificate was verified");
    assert_eq!(
        subs,
        [
            (SUBTYPE_SSL_VERSION, b"TLSv1.3".to_vec()),
            (SUBTYPE_SSL_CIPHER, b"TLS_CHACHA20_POLY1305_SHA256".to_vec()),
            (SUBTYPE_SSL_GROUP, b"X25519MLKEM768".to_vec()),
            (
                SUBTYPE_SSL_SIG_SCHEME,
                ECDSA_P256_SCHEME.as_bytes().to_vec()
            ),
        ]
    );
    assert_eq!(h.tlv(TYPE_AUTHORITY), Some(HOST.as_bytes()));
    assert_eq!(h.tlv(TYPE_ALPN), None);
    // The protocol went on as usual after the header, which never reached the protocol bytes.
    let seen = e.backend.recorder.all_text();
    assert!(seen.contains("a LOGIN \"user\" \"secret\"\r\n"), "{seen}");
    assert!(
        !e.backend
            .recorder
            .all()
            .starts_with(&PROXY_V2_SIGNATURE[..4])
    );
}

#[tokio::test]
async fn implicit_pop3_without_sni_sends_ssl_tlv_but_no_authority() {
    let e = env(FakeKind::Pop3, "pop3", "implicit", "127.0.0.1:0").await;
    let mut config = (*client_config(&e.pki.ca_der, &[&rustls::version::TLS12], None)).clone();
    config.enable_sni = false;
    let tcp = TcpStream::connect(e.proxy.addr("l")).await.unwrap();
    let tls = tls_upgrade(tcp, HOST, Arc::new(config)).await.unwrap();
    let cipher = {
        let suite = tls.get_ref().1.negotiated_cipher_suite().unwrap().suite();
        mailfront::tls::names::cipher_suite_name(u16::from(suite)).into_owned()
    };
    let mut io = BufReader::new(tls);
    assert!(read_line(&mut io).await.starts_with("+OK"));
    // The backend is connected for a login (USER alone is answered by mailfront).
    io.get_mut()
        .write_all(b"USER u\r\nPASS secret\r\n")
        .await
        .unwrap();
    assert_eq!(read_line(&mut io).await, "+OK\r\n");
    let _ = read_line(&mut io).await;

    let headers = e.backend.proxy_headers.connections();
    assert_eq!(headers.len(), 1);
    let h = decode(&headers[0]);
    let (client, _, subs) = h.ssl().unwrap();
    assert_eq!(client, 0x01);
    assert_eq!(
        subs[..2],
        [
            (SUBTYPE_SSL_VERSION, b"TLSv1.2".to_vec()),
            (SUBTYPE_SSL_CIPHER, cipher.into_bytes()),
        ]
    );
    // TLS 1.2 signs the ServerKeyExchange: the group and the scheme are there too.
    let kinds: Vec<u8> = subs.iter().map(|(k, _)| *k).collect();
    assert_eq!(
        kinds,
        [
            SUBTYPE_SSL_VERSION,
            SUBTYPE_SSL_CIPHER,
            SUBTYPE_SSL_GROUP,
            SUBTYPE_SSL_SIG_SCHEME
        ]
    );
    assert_eq!(h.tlv(TYPE_AUTHORITY), None, "no SNI, no AUTHORITY");
}

/// A STARTTLS SMTP listener connects the backend only after the handshake (nothing reaches a
/// backend before TLS), so its one header carries the TLS details.
#[tokio::test]
async fn starttls_smtp_header_carries_tls_and_there_is_only_one() {
    let e = env(FakeKind::Smtp, "smtp", "starttls", "127.0.0.1:0").await;
    let source = client_source().await;
    let tcp = connect_from(source, e.proxy.addr("l")).await;
    let client_addr = tcp.local_addr().unwrap();
    let mut io = BufReader::new(tcp);
    assert_eq!(
        read_smtp_reply(&mut io).await,
        format!("220 {HOST} ESMTP\r\n")
    );
    io.get_mut()
        .write_all(b"EHLO client.test\r\n")
        .await
        .unwrap();
    let _ = read_smtp_reply(&mut io).await;
    io.get_mut().write_all(b"STARTTLS\r\n").await.unwrap();
    assert!(read_smtp_reply(&mut io).await.starts_with("220 2.0.0"));
    assert!(
        e.backend.proxy_headers.connections().is_empty(),
        "no backend connection before TLS"
    );
    let config = client_config(&e.pki.ca_der, &[&rustls::version::TLS13], None);
    let tls = tls_upgrade(io.into_inner(), HOST, config).await.unwrap();
    let cipher = {
        let suite = tls.get_ref().1.negotiated_cipher_suite().unwrap().suite();
        mailfront::tls::names::cipher_suite_name(u16::from(suite)).into_owned()
    };
    let mut io = BufReader::new(tls);
    io.get_mut()
        .write_all(b"EHLO client.test\r\n")
        .await
        .unwrap();
    assert!(read_smtp_reply(&mut io).await.starts_with("250"));
    let auth = format!(
        "AUTH PLAIN {}\r\n",
        BASE64_STANDARD.encode(b"\0user\0secret")
    );
    io.get_mut().write_all(auth.as_bytes()).await.unwrap();
    assert!(read_smtp_reply(&mut io).await.starts_with("235"));
    io.get_mut().write_all(b"QUIT\r\n").await.unwrap();
    let _ = read_smtp_reply(&mut io).await;

    let headers = e.backend.proxy_headers.connections();
    assert_eq!(headers.len(), 1, "one connection, one header");
    let h = decode(&headers[0]);
    assert_eq!(h.ver_cmd, 0x21);
    assert_eq!(h.src, client_addr);
    assert_eq!(h.dst, e.proxy.addr("l"));
    let (client, _, subs) = h.ssl().expect("PP2_TYPE_SSL: the client is TLS at connect");
    assert_eq!(client, 0x01);
    assert!(
        subs.contains(&(SUBTYPE_SSL_VERSION, b"TLSv1.3".to_vec())),
        "{subs:?}"
    );
    assert!(
        subs.contains(&(SUBTYPE_SSL_CIPHER, cipher.into_bytes())),
        "{subs:?}"
    );
    // The backend's first command is the client's post-TLS EHLO.
    assert!(
        e.backend
            .recorder
            .all_text()
            .starts_with("EHLO client.test\r\nAUTH PLAIN")
    );
}

#[tokio::test]
async fn ipv6_client_gets_a_tcp6_header() {
    let probe = std::net::TcpListener::bind("[::1]:0");
    if probe.is_err() {
        eprintln!("skipped: no IPv6 loopback");
        return;
    }
    drop(probe);
    let e = env(FakeKind::Imap, "imap", "implicit", "[::1]:0").await;
    let tcp = connect_from("::1".parse().unwrap(), e.proxy.addr("l")).await;
    let client_addr = tcp.local_addr().unwrap();
    let config = client_config(&e.pki.ca_der, &[&rustls::version::TLS13], None);
    let tls = tls_upgrade(tcp, HOST, config).await.unwrap();
    let mut io = BufReader::new(tls);
    assert!(read_line(&mut io).await.starts_with("* OK"));
    // The backend is connected for the login.
    io.get_mut()
        .write_all(b"a LOGIN user secret\r\nz LOGOUT\r\n")
        .await
        .unwrap();
    assert!(read_until_tag(&mut io, "a").await.contains("a OK"));
    let _ = read_until_tag(&mut io, "z").await;

    let headers = e.backend.proxy_headers.connections();
    assert_eq!(headers.len(), 1);
    let h = decode(&headers[0]);
    assert_eq!(h.family, 0x21, "TCP over IPv6");
    assert_eq!(h.src, client_addr);
    assert_eq!(h.dst, e.proxy.addr("l"));
    assert!(h.ssl().is_some());
}

#[tokio::test]
async fn without_the_option_the_backend_gets_no_header() {
    let pki = Pki::new();
    let cert = pki.issue("mx", &[HOST], false);
    let backend = FakeBackend::start(FakeKind::Imap).await;
    let yaml = config_yaml(
        &[&cert],
        &[listener_yaml("l", "imap", "implicit", backend.addr)],
        "",
    );
    let proxy = Proxy::start(&yaml, pki.dir.path()).await;
    let config = client_config(&pki.ca_der, &[&rustls::version::TLS13], None);
    let tls = tls_connect(proxy.addr("l"), HOST, config).await.unwrap();
    let mut io = BufReader::new(tls);
    assert!(read_line(&mut io).await.starts_with("* OK"));
    io.get_mut()
        .write_all(b"a LOGIN user secret\r\nz LOGOUT\r\n")
        .await
        .unwrap();
    assert!(read_until_tag(&mut io, "a").await.contains("a OK"));
    let _ = read_until_tag(&mut io, "z").await;
    eventually(|| String::from_utf8_lossy(&backend.recorder.all()).ends_with("z LOGOUT\r\n")).await;
    let first = backend.recorder.connections().remove(0);
    assert!(!first.starts_with(&PROXY_V2_SIGNATURE[..4]), "{first:?}");
    // The probe had no header either: the fake recognised its bare requests.
    assert_eq!(backend.recorder.probes(), 1);
}
