//! Configuration reload (SIGHUP, or a changed file): listeners, backends, limits and the log
//! level change in service, sessions already open go on under the settings they started with,
//! a backend can be drained, and an invalid file changes nothing but a failure counter.
//! Every test runs the proxy in-process from a config file and reloads it as SIGHUP does.
// Helpers outside #[test] functions: clippy's allow-*-in-tests does not reach them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use crate::common::*;
use mailfront::server::ReloadReport;
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

type Imap = BufReader<tokio_rustls::client::TlsStream<TcpStream>>;

/// An IMAP listener in front of `backends` (each `"addr"` or an `{address, drain}` entry).
fn imap_listener(name: &str, backends: &[String]) -> String {
    format!(
        "  - name: {name}\n    protocol: imap\n    listen: \"127.0.0.1:0\"\n    tls: implicit\n    backend: [{}]\n",
        backends.join(", ")
    )
}

fn quoted(addr: SocketAddr) -> String {
    format!("\"{addr}\"")
}

fn drained(addr: SocketAddr) -> String {
    format!("{{address: \"{addr}\", drain: true}}")
}

struct Setup {
    pki: Pki,
    cert: IssuedCert,
    path: PathBuf,
}

impl Setup {
    fn new() -> Setup {
        let pki = Pki::new();
        let cert = pki.issue("mx", &["mx.example.test"], false);
        let path = pki.dir.path().join("mailfront.yaml");
        Setup { pki, cert, path }
    }

    /// Writes the config (whole, by rename, as a tool or Kubernetes would); checks for a changed
    /// file are slowed to an hour so each test's reloads are its own.
    fn write(&self, listeners: &[String], extra: &str) {
        let yaml = config_yaml(&[&self.cert], listeners, extra)
            .replace("reload_interval: 100ms", "reload_interval: 1h");
        write_atomically(&self.path, &yaml);
    }

    async fn login(&self, proxy: &Proxy, listener: &str) -> Imap {
        let config = client_config(&self.pki.ca_der, &[&rustls::version::TLS13], None);
        let tls = tls_connect(proxy.addr(listener), "mx.example.test", config)
            .await
            .unwrap();
        let mut s = BufReader::new(tls);
        let greeting = read_line(&mut s).await;
        assert!(greeting.starts_with("* OK"), "{greeting}");
        s.get_mut()
            .write_all(b"a LOGIN user pass\r\n")
            .await
            .unwrap();
        let reply = read_until_tag(&mut s, "a").await;
        assert!(reply.contains("a OK"), "{reply}");
        s
    }
}

fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Which fleet backend serves this session (`* OK served by NAME`), or `None` once closed.
async fn served_by(s: &mut Imap) -> Option<String> {
    s.get_mut().write_all(b"n NOOP\r\n").await.ok()?;
    let reply = read_until_tag(s, "n").await;
    reply
        .split("served by ")
        .nth(1)
        .map(|rest| rest.split_whitespace().next().unwrap_or("").to_owned())
}

fn applied(report: &ReloadReport) -> (&[String], &[String]) {
    match report {
        ReloadReport::Applied {
            changes,
            needs_restart,
            ..
        } => (changes, needs_restart),
        ReloadReport::Failed { problems } => panic!("reload failed: {problems:?}"),
    }
}

async fn fleet(name: &str) -> FleetBackend {
    FleetBackend::start(name, Speaks::Imap, FleetTls::None).await
}

#[tokio::test]
async fn a_removed_backend_keeps_its_relaying_session_while_new_sessions_go_to_the_added_one() {
    let setup = Setup::new();
    let (a, b) = (fleet("a").await, fleet("b").await);
    setup.write(&[imap_listener("imaps", &[quoted(a.addr)])], "");
    let mut proxy = Proxy::start_file(&setup.path).await;
    let mut on_a = setup.login(&proxy, "imaps").await;
    assert_eq!(served_by(&mut on_a).await.as_deref(), Some("a"));

    setup.write(&[imap_listener("imaps", &[quoted(b.addr)])], "");
    let report = proxy.reload().await;
    let (changes, restart) = applied(&report);
    assert!(
        changes.iter().any(|c| c.contains("backends")),
        "{changes:?}"
    );
    assert!(restart.is_empty(), "{restart:?}");

    // The relaying session stays on its backend; every new one goes to the new backend.
    assert_eq!(served_by(&mut on_a).await.as_deref(), Some("a"));
    for _ in 0..3 {
        let mut new = setup.login(&proxy, "imaps").await;
        assert_eq!(served_by(&mut new).await.as_deref(), Some("b"));
    }
    let a_sessions = format!(
        "mailfront_backend_active_sessions{{backend=\"{}\",listener=\"imaps\"}}",
        a.addr
    );
    let text = scrape(proxy.admin.unwrap()).await;
    assert_eq!(metric(&text, &a_sessions), Some(1.0), "{text}");
    assert_eq!(
        metric(&text, "mailfront_config_reloads_total{result=\"success\"}"),
        Some(1.0)
    );
    assert_eq!(
        metric(&text, "mailfront_config_reloads_total{result=\"failure\"}"),
        Some(0.0)
    );
    // The removed address's series go with its last session.
    drop(on_a);
    let admin = proxy.admin.unwrap();
    for _ in 0..200 {
        if metric(&scrape(admin).await, &a_sessions).is_none() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    let text = scrape(admin).await;
    assert!(!text.contains(&a.addr.to_string()), "{text}");
    proxy.stop().await;
}

#[tokio::test]
async fn a_changed_connections_per_ip_applies_to_new_sessions_and_keeps_the_counts() {
    let setup = Setup::new();
    let backend = FakeBackend::start(FakeKind::Imap).await;
    let listener = listener_yaml("imap", "imap", "starttls", backend.addr);
    setup.write(
        std::slice::from_ref(&listener),
        "limits:\n  connections_per_ip: 5\n",
    );
    let mut proxy = Proxy::start_file(&setup.path).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = BufReader::new(TcpStream::connect(proxy.addr("imap")).await.unwrap());
        assert!(read_line(&mut s).await.starts_with("* OK"));
        held.push(s);
    }
    setup.write(
        std::slice::from_ref(&listener),
        "limits:\n  connections_per_ip: 2\n",
    );
    let report = proxy.reload().await;
    assert!(applied(&report).0.iter().any(|c| c.starts_with("limits")));
    // The two held sessions still count: a third is refused under the new limit.
    let mut third = BufReader::new(TcpStream::connect(proxy.addr("imap")).await.unwrap());
    let line = read_line(&mut third).await;
    assert!(line.starts_with("* BYE"), "{line}");
    // And the held ones are still served.
    held[0]
        .get_mut()
        .write_all(b"c CAPABILITY\r\n")
        .await
        .unwrap();
    assert!(read_until_tag(&mut held[0], "c").await.contains("c OK"));
    drop(held);
    proxy.stop().await;
}

#[tokio::test]
async fn an_added_listener_serves_and_a_removed_one_stops_accepting_but_keeps_its_session() {
    let setup = Setup::new();
    let a = fleet("a").await;
    setup.write(&[imap_listener("old", &[quoted(a.addr)])], "");
    let mut proxy = Proxy::start_file(&setup.path).await;
    let old_addr = proxy.addr("old");
    let mut on_old = setup.login(&proxy, "old").await;

    setup.write(&[imap_listener("new", &[quoted(a.addr)])], "");
    let report = proxy.reload().await;
    let (changes, _) = applied(&report);
    assert!(
        changes.iter().any(|c| c.contains("listeners.old: removed")),
        "{changes:?}"
    );
    assert!(
        changes.iter().any(|c| c.contains("listeners.new: added")),
        "{changes:?}"
    );

    let mut on_new = setup.login(&proxy, "new").await;
    assert_eq!(served_by(&mut on_new).await.as_deref(), Some("a"));
    assert_eq!(served_by(&mut on_old).await.as_deref(), Some("a"));
    // The freed port may already be another test's listener (every test shares this process
    // and the machine's ports): what must hold is that the removed listener takes nothing.
    let accepted = |proxy: &Proxy| {
        proxy
            .metrics
            .encode()
            .lines()
            .find(|l| l.starts_with(r#"mailfront_connections_accepted_total{listener="old"}"#))
            .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let before = accepted(&proxy);
    if let Ok(stranger) = TcpStream::connect(old_addr).await {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        drop(stranger);
        assert_eq!(
            accepted(&proxy),
            before,
            "the removed listener still accepts"
        );
    }
    // Relays wait out the shutdown grace: closed here, the stop is at once.
    drop((on_old, on_new));
    proxy.stop().await;
}

/// Everything the process logs, for the one test that changes the log level (the subscriber is
/// global to the test binary, so it also catches what the tests running beside it log; the
/// test looks only for its own client's lines, and turns logging off when done).
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn a_changed_log_level_applies_at_once() {
    static LOG: OnceLock<(Captured, Arc<mailfront::logging::LogHandle>)> = OnceLock::new();
    let (captured, handle) = LOG.get_or_init(|| {
        let captured = Captured::default();
        let writer = captured.clone();
        let handle = mailfront::logging::init(
            mailfront::config::LogFormat::Text,
            "warn",
            move || writer.clone(),
            false,
        )
        .unwrap();
        (captured, Arc::new(handle))
    });
    let setup = Setup::new();
    let a = fleet("a").await;
    let listeners = [imap_listener("imaps", &[quoted(a.addr)])];
    setup.write(&listeners, "log:\n  level: warn\n");
    let mut proxy = Proxy::start_file_with_log(&setup.path, handle.clone()).await;
    // A failed handshake is logged at debug: not shown at warn.
    let probe = |proxy: &Proxy| {
        let addr = proxy.addr("imaps");
        async move {
            let mut tcp = TcpStream::connect(addr).await.unwrap();
            let port = tcp.local_addr().unwrap().port();
            tcp.write_all(b"not a TLS hello\r\n").await.unwrap();
            let mut buf = Vec::new();
            let _ = tokio::time::timeout(
                TIMEOUT,
                tokio::io::AsyncReadExt::read_to_end(&mut tcp, &mut buf),
            )
            .await;
            format!("127.0.0.1:{port}")
        }
    };
    // The client's address whole: 127.0.0.1:4567 must not match another test's :45678.
    let logged = |client: &str| {
        String::from_utf8_lossy(&captured.0.lock().unwrap())
            .lines()
            .any(|l| {
                l.contains("tls handshake failed")
                    && l.match_indices(client).any(|(at, _)| {
                        !l[at + client.len()..].starts_with(|c: char| c.is_ascii_digit())
                    })
            })
    };
    let quiet = probe(&proxy).await;
    setup.write(&listeners, "log:\n  level: debug\n");
    let report = proxy.reload().await;
    assert!(
        applied(&report)
            .0
            .iter()
            .any(|c| c.contains("log.level: warn -> debug"))
    );
    let loud = probe(&proxy).await;
    eventually(|| logged(&loud)).await;
    assert!(!logged(&quiet));
    proxy.stop().await;
    // The rest of the binary's tests log nothing into the buffer.
    mailfront::logging::LogControl::set_level(&**handle, "off").unwrap();
}

#[tokio::test]
async fn an_invalid_file_changes_nothing_names_every_problem_and_is_counted() {
    let setup = Setup::new();
    let a = fleet("a").await;
    setup.write(&[imap_listener("imaps", &[quoted(a.addr)])], "");
    let mut proxy = Proxy::start_file(&setup.path).await;
    let hash_before = config_hash(&scrape(proxy.admin.unwrap()).await);
    let mut held = setup.login(&proxy, "imaps").await;

    let bad = config_yaml(
        &[&setup.cert],
        &[imap_listener("imaps", &["\"nowhere\"".into()])],
        "limits:\n  smtp_line: 10\n",
    )
    .replace("hostname: mx.example.test", "hostname: \"bad host\"");
    write_atomically(&setup.path, &bad);
    let report = proxy.reload().await;
    let ReloadReport::Failed { problems } = &*report else {
        panic!("an invalid file was applied: {report:?}");
    };
    let all = problems.join("\n");
    for key in ["hostname", "listeners[0].backend", "limits.smtp_line"] {
        assert!(all.contains(key), "{key} missing from {all}");
    }
    let text = scrape(proxy.admin.unwrap()).await;
    assert_eq!(
        metric(&text, "mailfront_config_reloads_total{result=\"failure\"}"),
        Some(1.0)
    );
    assert_eq!(config_hash(&text), hash_before);
    // Still serving the last good configuration, old sessions and new.
    assert_eq!(served_by(&mut held).await.as_deref(), Some("a"));
    let mut new = setup.login(&proxy, "imaps").await;
    assert_eq!(served_by(&mut new).await.as_deref(), Some("a"));
    drop((held, new));
    proxy.stop().await;
}

fn config_hash(text: &str) -> String {
    text.lines()
        .find_map(|l| l.strip_prefix("mailfront_config_info{hash=\""))
        .and_then(|rest| rest.split('"').next())
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn a_drained_backend_takes_no_new_session_and_keeps_its_own() {
    let setup = Setup::new();
    let (a, b) = (fleet("a").await, fleet("b").await);
    setup.write(&[imap_listener("imaps", &[quoted(a.addr)])], "");
    let mut proxy = Proxy::start_file(&setup.path).await;
    let mut on_a = setup.login(&proxy, "imaps").await;
    assert_eq!(served_by(&mut on_a).await.as_deref(), Some("a"));

    setup.write(
        &[imap_listener("imaps", &[drained(a.addr), quoted(b.addr)])],
        "",
    );
    let report = proxy.reload().await;
    applied(&report);
    for _ in 0..4 {
        let mut new = setup.login(&proxy, "imaps").await;
        assert_eq!(served_by(&mut new).await.as_deref(), Some("b"));
    }
    assert_eq!(served_by(&mut on_a).await.as_deref(), Some("a"));
    let text = scrape(proxy.admin.unwrap()).await;
    let draining = |addr: SocketAddr| {
        metric(
            &text,
            &format!("mailfront_backend_draining{{backend=\"{addr}\",listener=\"imaps\"}}"),
        )
    };
    assert_eq!(draining(a.addr), Some(1.0), "{text}");
    assert_eq!(draining(b.addr), Some(0.0), "{text}");
    drop(on_a);
    proxy.stop().await;
}

/// Kubernetes' ConfigMap volume: `mailfront.yaml -> ..data/mailfront.yaml`, `..data -> a
/// timestamped directory`, updated by making a new directory and renaming a new `..data` link
/// over the old one.
fn configmap_swap(dir: &Path, version: &str, yaml: &str) {
    let data = dir.join(version);
    std::fs::create_dir(&data).unwrap();
    std::fs::write(data.join("mailfront.yaml"), yaml).unwrap();
    let tmp = dir.join("..data_tmp");
    std::os::unix::fs::symlink(version, &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
}

#[test]
fn the_binary_applies_a_configmap_symlink_swap_without_a_signal() {
    let setup = Setup::new();
    let dir = setup.pki.dir.path().join("configmap");
    std::fs::create_dir(&dir).unwrap();
    let yaml = |level: &str| {
        config_yaml(
            &[&setup.cert],
            &[imap_listener("imaps", &["\"127.0.0.1:1\"".into()])],
            &format!("log:\n  format: json\n  level: {level}\nlimits:\n  connections_per_ip: 7\n"),
        )
        .replace("reload_interval: 100ms", "reload_interval: 200ms")
    };
    configmap_swap(&dir, "..2026_01_01_00_00_00.1", &yaml("info"));
    let path = dir.join("mailfront.yaml");
    std::os::unix::fs::symlink("..data/mailfront.yaml", &path).unwrap();
    let mut binary = Binary::start(&path);
    binary.wait_for(&["listening", "imaps"]);
    configmap_swap(
        &dir,
        "..2026_01_01_00_01_00.2",
        &yaml("info").replace("connections_per_ip: 7", "connections_per_ip: 3"),
    );
    // Within a few reload intervals, with no SIGHUP.
    let line = binary.wait_for(&["configuration reloaded", "limits"]);
    assert!(json_field(&line, "hash").is_some(), "{line}");
    binary.stop();
}
