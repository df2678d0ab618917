//! Handshake failures counted by what the client offered: TLS 1.0/1.1 ClientHellos (real ones,
//! captured from `openssl s_client`, so the test never depends on the local OpenSSL's policy)
//! count as `protocol_version` and get a protocol_version alert; a TCP connect that closes
//! without a byte (a load balancer's health check) counts as `closed_before_hello`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;

use crate::common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const TLS1_0_HELLO: &[u8] = include_bytes!("../data/client_hello/openssl-tls1_0.bin");
const TLS1_1_HELLO: &[u8] = include_bytes!("../data/client_hello/openssl-tls1_1.bin");
const TLS1_2_HELLO: &[u8] = include_bytes!("../data/client_hello/openssl-tls1_2.bin");

/// A fatal protocol_version alert (RFC 8446 §6.2).
const PROTOCOL_VERSION_ALERT: &[u8] = &[21, 3, 3, 0, 2, 2, 70];

fn failures(proxy: &Proxy, listener: &str, reason: &str) -> u64 {
    let needle = format!(
        "mailfront_tls_handshake_failures_total{{listener=\"{listener}\",reason=\"{reason}\"}} "
    );
    let text = proxy.metrics.encode();
    text.lines()
        .find_map(|l| l.strip_prefix(&needle))
        .unwrap_or_else(|| panic!("no series {needle} in\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

/// Waits for the listener's series to be registered (the server registers them as it starts),
/// every reason at 0: the labels are a closed set, so a dashboard sees them before any failure.
async fn series_start_at_zero(proxy: &Proxy, listener: &str) {
    let needle = format!("mailfront_tls_handshake_failures_total{{listener=\"{listener}\"");
    eventually(|| proxy.metrics.encode().contains(&needle)).await;
    for reason in [
        "timeout",
        "protocol_version",
        "no_shared_cipher",
        "bad_certificate",
        "closed_before_hello",
        "io",
        "other",
    ] {
        assert_eq!(failures(proxy, listener, reason), 0, "{reason}");
    }
}

/// Sends `hello` on `stream` and returns what the server answers before it closes.
async fn send_hello(mut stream: TcpStream, hello: &[u8]) -> Vec<u8> {
    stream.write_all(hello).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(TIMEOUT, stream.read_to_end(&mut answer))
        .await
        .expect("the server neither answered nor closed")
        .unwrap();
    answer
}

async fn connect(addr: SocketAddr) -> TcpStream {
    TcpStream::connect(addr).await.unwrap()
}

#[tokio::test]
async fn tls1_0_and_tls1_1_hellos_count_as_protocol_version() {
    let env = one_listener(FakeKind::Imap, "imaps", "imap").await;
    let addr = env.proxy.addr("imaps");
    series_start_at_zero(&env.proxy, "imaps").await;

    for hello in [TLS1_0_HELLO, TLS1_1_HELLO] {
        let answer = send_hello(connect(addr).await, hello).await;
        assert_eq!(answer, PROTOCOL_VERSION_ALERT);
    }
    eventually(|| failures(&env.proxy, "imaps", "protocol_version") == 2).await;
    assert_eq!(failures(&env.proxy, "imaps", "other"), 0);
    assert_eq!(failures(&env.proxy, "imaps", "closed_before_hello"), 0);
    assert!(env.backend.recorder.connections().is_empty());

    // A modern client still gets through.
    let config = client_config(&env.pki.ca_der, &[&rustls::version::TLS13], None);
    let tls = tls_connect(addr, "mx.example.test", config).await.unwrap();
    let mut tls = BufReader::new(tls);
    assert!(read_line(&mut tls).await.starts_with("* OK"));
    assert_eq!(failures(&env.proxy, "imaps", "protocol_version"), 2);
}

#[tokio::test]
async fn connect_and_close_counts_as_closed_before_hello_not_protocol_version() {
    let env = one_listener(FakeKind::Imap, "imaps", "imap").await;
    let addr = env.proxy.addr("imaps");
    series_start_at_zero(&env.proxy, "imaps").await;

    for _ in 0..3 {
        drop(connect(addr).await);
    }
    eventually(|| failures(&env.proxy, "imaps", "closed_before_hello") == 3).await;

    // Not TLS at all: still rustls' reason, never a version problem.
    let answer = send_hello(connect(addr).await, b"a1 LOGIN alice secret\r\n").await;
    assert!(!answer.ends_with(PROTOCOL_VERSION_ALERT), "{answer:?}");
    eventually(|| failures(&env.proxy, "imaps", "other") == 1).await;

    // Half a ClientHello, then close: an I/O failure, not a probe.
    let mut stream = connect(addr).await;
    stream.write_all(&TLS1_2_HELLO[..40]).await.unwrap();
    drop(stream);
    eventually(|| failures(&env.proxy, "imaps", "io") == 1).await;

    assert_eq!(failures(&env.proxy, "imaps", "protocol_version"), 0);
    assert_eq!(failures(&env.proxy, "imaps", "closed_before_hello"), 3);
    assert!(env.backend.recorder.connections().is_empty());
}

#[tokio::test]
async fn min_version_1_3_counts_a_tls1_2_hello_as_protocol_version() {
    let pki = Pki::new();
    let cert = pki.issue("mx", &["mx.example.test"], false);
    let backend = FakeBackend::start(FakeKind::Imap).await;
    let yaml = config_yaml(
        &[&cert],
        &[listener_yaml("imaps", "imap", "implicit", backend.addr)],
        "",
    )
    .replace(
        "  reload_interval: 100ms\n",
        "  reload_interval: 100ms\n  min_version: \"1.3\"\n",
    );
    let proxy = Proxy::start(&yaml, pki.dir.path()).await;
    let addr = proxy.addr("imaps");

    for hello in [TLS1_0_HELLO, TLS1_2_HELLO] {
        let answer = send_hello(connect(addr).await, hello).await;
        assert_eq!(answer, PROTOCOL_VERSION_ALERT);
    }
    eventually(|| failures(&proxy, "imaps", "protocol_version") == 2).await;
    assert_eq!(failures(&proxy, "imaps", "other"), 0);
}

#[tokio::test]
async fn tls1_0_hello_after_starttls_counts_as_protocol_version() {
    let pki = Pki::new();
    let cert = pki.issue("mx", &["mx.example.test"], false);
    let backend = FakeBackend::start(FakeKind::Imap).await;
    let yaml = config_yaml(
        &[&cert],
        &[listener_yaml("imap", "imap", "starttls", backend.addr)],
        "",
    );
    let proxy = Proxy::start(&yaml, pki.dir.path()).await;

    let mut c = BufReader::new(connect(proxy.addr("imap")).await);
    assert!(read_line(&mut c).await.starts_with("* OK"));
    c.get_mut().write_all(b"a STARTTLS\r\n").await.unwrap();
    assert!(read_until_tag(&mut c, "a").await.contains("a OK"));
    let answer = send_hello(c.into_inner(), TLS1_0_HELLO).await;
    assert_eq!(answer, PROTOCOL_VERSION_ALERT);
    eventually(|| failures(&proxy, "imap", "protocol_version") == 1).await;
}
