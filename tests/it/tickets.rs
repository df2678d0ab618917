//! TLS 1.3 session tickets sealed with a shared key file: a client resumes on another proxy
//! that mounts the same file (two replicas behind a Service), not on one with other keys; a
//! new first key seals while the old ones still open; a bad file on reload keeps the keys in
//! service; `tls.session_tickets: 0` sends none.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::common::*;
use rustls::HandshakeKind;
use tokio::io::BufReader;

/// One 80-byte key of fixed bytes, different for each `seed`.
fn key(seed: u8) -> Vec<u8> {
    (0..80u8).map(|i| i.wrapping_mul(13) ^ seed).collect()
}

fn write_keys(dir: &Path, file: &str, keys: &[Vec<u8>]) -> PathBuf {
    let path = dir.join(file);
    std::fs::write(&path, keys.concat()).unwrap();
    path
}

fn key_file_line(path: &Path) -> String {
    format!("  ticket_key_file: {}\n", path.display())
}

/// A proxy with one implicit-TLS IMAP listener `imaps`, with `tls_extra` added to `tls:`.
async fn proxy(pki: &Pki, cert: &IssuedCert, backend: &FakeBackend, tls_extra: &str) -> Proxy {
    let yaml = config_yaml(
        &[cert],
        &[listener_yaml("imaps", "imap", "implicit", backend.addr)],
        "",
    )
    .replace(
        "  reload_interval: 100ms\n",
        &format!("  reload_interval: 100ms\n{tls_extra}"),
    );
    Proxy::start(&yaml, pki.dir.path()).await
}

/// Connects over TLS 1.3, reads the greeting (by then the client has taken the tickets sent
/// after the handshake), and says how the handshake went.
async fn greet(proxy: &Proxy, config: &Arc<rustls::ClientConfig>) -> HandshakeKind {
    let stream = tls_connect(proxy.addr("imaps"), "mx.example.test", config.clone())
        .await
        .unwrap();
    let kind = stream.get_ref().1.handshake_kind().unwrap();
    let mut stream = BufReader::new(stream);
    let greeting = read_line(&mut stream).await;
    assert!(greeting.starts_with("* OK"), "{greeting}");
    kind
}

/// A TLS 1.3 client with its own ticket cache (rustls' default in-memory resumption store).
fn client(pki: &Pki) -> Arc<rustls::ClientConfig> {
    client_config(&pki.ca_der, &[&rustls::version::TLS13], None)
}

fn reloads(proxy: &Proxy, result: &str) -> u64 {
    let needle = format!("mailfront_ticket_key_reloads_total{{result=\"{result}\"}} ");
    proxy
        .metrics
        .encode()
        .lines()
        .find_map(|l| l.strip_prefix(&needle))
        .map_or(0, |v| v.trim().parse().unwrap())
}

struct Env {
    pki: Pki,
    cert: IssuedCert,
    backend: FakeBackend,
}

async fn env() -> Env {
    let pki = Pki::new();
    let cert = pki.issue("mx", &["mx.example.test"], false);
    let backend = FakeBackend::start(FakeKind::Imap).await;
    Env { pki, cert, backend }
}

impl Env {
    async fn proxy(&self, tls_extra: &str) -> Proxy {
        proxy(&self.pki, &self.cert, &self.backend, tls_extra).await
    }

    fn keys(&self, file: &str, keys: &[Vec<u8>]) -> PathBuf {
        write_keys(self.pki.dir.path(), file, keys)
    }
}

#[tokio::test]
async fn a_client_resumes_on_a_second_proxy_sharing_the_key_file() {
    let env = env().await;
    let keys = env.keys("ticket.keys", &[key(1), key(2)]);
    let first = env.proxy(&key_file_line(&keys)).await;
    let second = env.proxy(&key_file_line(&keys)).await;
    let config = client(&env.pki);

    assert_eq!(greet(&first, &config).await, HandshakeKind::Full);
    assert_eq!(greet(&second, &config).await, HandshakeKind::Resumed);
    // The second proxy's tickets open on the first as well.
    assert_eq!(greet(&first, &config).await, HandshakeKind::Resumed);
}

/// Two `mailfront` processes (two pods) mounting the same key file: a client that got its
/// ticket from one resumes on the other, in both directions.
#[tokio::test]
async fn a_client_resumes_across_two_mailfront_processes_sharing_the_key_file() {
    let env = env().await;
    let keys = env.keys("ticket.keys", &[key(7), key(8)]);
    let yaml = config_yaml(
        &[&env.cert],
        &[listener_yaml("imaps", "imap", "implicit", env.backend.addr)],
        "log:\n  format: json\n  level: info\n",
    )
    .replace(
        "  reload_interval: 100ms\n",
        &format!("  reload_interval: 100ms\n{}", key_file_line(&keys)),
    );
    let path = env.pki.dir.path().join("two-processes.yaml");
    std::fs::write(&path, yaml).unwrap();
    let mut first = Binary::start(&path);
    let mut second = Binary::start(&path);
    let (a, b) = (first.address("imaps"), second.address("imaps"));
    assert_ne!(a, b, "two processes, two listeners");
    let config = client(&env.pki);

    let greet_at = |addr: std::net::SocketAddr| {
        let config = config.clone();
        async move {
            let stream = tls_connect(addr, "mx.example.test", config).await.unwrap();
            let kind = stream.get_ref().1.handshake_kind().unwrap();
            let mut stream = BufReader::new(stream);
            assert!(read_line(&mut stream).await.starts_with("* OK"));
            kind
        }
    };
    assert_eq!(greet_at(a).await, HandshakeKind::Full);
    assert_eq!(greet_at(b).await, HandshakeKind::Resumed);
    assert_eq!(greet_at(a).await, HandshakeKind::Resumed);
    first.stop();
    second.stop();
}

#[tokio::test]
async fn a_proxy_with_other_keys_runs_a_full_handshake() {
    let env = env().await;
    let mine = env.keys("mine.keys", &[key(1)]);
    let theirs = env.keys("theirs.keys", &[key(3)]);
    let first = env.proxy(&key_file_line(&mine)).await;
    let other = env.proxy(&key_file_line(&theirs)).await;
    // Without a key file a process seals with a key of its own.
    let own = env.proxy("").await;
    let config = client(&env.pki);

    assert_eq!(greet(&first, &config).await, HandshakeKind::Full);
    assert_eq!(greet(&other, &config).await, HandshakeKind::Full);
    assert_eq!(greet(&own, &config).await, HandshakeKind::Full);
    assert_eq!(greet(&own, &config).await, HandshakeKind::Resumed);
}

#[tokio::test]
async fn rotation_and_a_bad_file_on_running_proxies() {
    let env = env().await;
    let keys = env.keys("ticket.keys", &[key(1)]);
    let first = env.proxy(&key_file_line(&keys)).await;
    let second = env.proxy(&key_file_line(&keys)).await;
    let old_client = client(&env.pki);
    assert_eq!(greet(&first, &old_client).await, HandshakeKind::Full);

    // A new key goes first: tickets sealed with the old key still open.
    env.keys("ticket.keys", &[key(2), key(1)]);
    eventually(|| reloads(&first, "success") == 1 && reloads(&second, "success") == 1).await;
    assert_eq!(greet(&second, &old_client).await, HandshakeKind::Resumed);

    // A broken file is logged and counted; the keys in service stay.
    std::fs::write(&keys, b"truncated").unwrap();
    eventually(|| reloads(&first, "failure") >= 1 && reloads(&second, "failure") >= 1).await;
    let new_client = client(&env.pki);
    assert_eq!(greet(&first, &new_client).await, HandshakeKind::Full);
    assert_eq!(greet(&second, &new_client).await, HandshakeKind::Resumed);

    // New tickets were sealed with the new first key: a proxy holding only the old key
    // cannot open them, one holding only the new key can.
    let old_only = env
        .proxy(&key_file_line(&env.keys("old.keys", &[key(1)])))
        .await;
    let new_only = env
        .proxy(&key_file_line(&env.keys("new.keys", &[key(2)])))
        .await;
    for (proxy, resumes) in [
        (&old_only, HandshakeKind::Full),
        (&new_only, HandshakeKind::Resumed),
    ] {
        let probe = client(&env.pki);
        assert_eq!(greet(&first, &probe).await, HandshakeKind::Full);
        assert_eq!(greet(proxy, &probe).await, resumes);
    }
}

#[tokio::test]
async fn no_tickets_when_session_tickets_is_zero() {
    let env = env().await;
    let off = env.proxy("  session_tickets: 0\n").await;
    let config = client(&env.pki);
    assert_eq!(greet(&off, &config).await, HandshakeKind::Full);
    assert_eq!(greet(&off, &config).await, HandshakeKind::Full);
}
