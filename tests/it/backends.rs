//! Several backends per listener: least-connections spread, a backend killed mid-run and its
//! return, SNI routes on implicit and STARTTLS listeners, and TLS to the backend.

// Helpers outside #[test] functions: clippy's allow-*-in-tests does not reach them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::time::Duration;

use crate::common::*;
use tokio::io::{AsyncWriteExt, BufReader};

/// One listener's YAML with a list of backends and `extra` keys (indented 4).
fn pool_listener(
    name: &str,
    protocol: &str,
    tls: &str,
    backends: &[SocketAddr],
    extra: &str,
) -> String {
    let list: Vec<String> = backends.iter().map(|b| format!("\"{b}\"")).collect();
    format!(
        "  - name: {name}\n    protocol: {protocol}\n    listen: \"127.0.0.1:0\"\n    tls: {tls}\n    backend: [{}]\n{extra}",
        list.join(", ")
    )
}

/// Held sessions would make `Proxy::stop` wait out the default 30 s grace.
const QUICK_STOP: &str = "timeouts:\n  shutdown_grace: 200ms\n";

type Imap = BufReader<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

/// A logged-in IMAP session through the proxy, with `sni`.
async fn imap_login(proxy: SocketAddr, sni: &str, pki: &Pki) -> Imap {
    let config = client_config(&pki.ca_der, &[&rustls::version::TLS13], None);
    let tls = tls_connect(proxy, sni, config).await.unwrap();
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

/// Which backend serves this session (`* OK served by NAME`), or `None` if it was closed.
async fn served_by(s: &mut Imap) -> Option<String> {
    s.get_mut().write_all(b"n NOOP\r\n").await.ok()?;
    let reply = read_until_tag(s, "n").await;
    reply
        .split("served by ")
        .nth(1)
        .map(|rest| rest.split_whitespace().next().unwrap_or("").to_owned())
}

async fn scrape_proxy(proxy: &Proxy) -> String {
    scrape(proxy.admin.unwrap()).await
}

fn series(metric_name: &str, listener: &str, backend: SocketAddr) -> String {
    format!("{metric_name}{{backend=\"{backend}\",listener=\"{listener}\"}}")
}

#[tokio::test]
async fn sessions_spread_evenly_over_three_backends_by_least_connections() {
    let pki = Pki::new();
    let cert = pki.issue("mx", &["mx.example.test"], false);
    let mut fleet = Vec::new();
    for name in ["b0", "b1", "b2"] {
        fleet.push(FleetBackend::start(name, Speaks::Imap, FleetTls::None).await);
    }
    let addrs: Vec<SocketAddr> = fleet.iter().map(|b| b.addr).collect();
    let yaml = config_yaml(
        &[&cert],
        &[pool_listener("imaps", "imap", "implicit", &addrs, "")],
        QUICK_STOP,
    );
    let proxy = Proxy::start(&yaml, pki.dir.path()).await;

    let mut held = Vec::new();
    for _ in 0..9 {
        held.push(imap_login(proxy.addr("imaps"), "mx.example.test", &pki).await);
    }
    // The first session waited for the listener's capability probe, one connection to one of
    // the backends, over before any session connected.
    let probes: Vec<usize> = fleet.iter().map(FleetBackend::probes).collect();
    assert_eq!(probes.iter().sum::<usize>(), 1, "{probes:?}");
    let counts: Vec<usize> = fleet.iter().map(FleetBackend::client_sessions).collect();
    assert_eq!(counts, [3, 3, 3]);
    let text = scrape_proxy(&proxy).await;
    for (b, probes) in addrs.iter().zip(probes) {
        assert_eq!(
            metric(
                &text,
                &series("mailfront_backend_active_sessions", "imaps", *b)
            ),
            Some(3.0),
            "{text}"
        );
        // The probe's connection counts as one of its backend's.
        assert_eq!(
            metric(
                &text,
                &series("mailfront_backend_sessions_total", "imaps", *b)
            ),
            Some((3 + probes) as f64)
        );
        assert_eq!(
            metric(&text, &series("mailfront_backend_up", "imaps", *b)),
            Some(1.0)
        );
    }
    // With all idle (the probe's connection closed), ties rotate: the first three sessions went
    // to three different backends.
    let mut seen = std::collections::HashSet::new();
    for s in held.iter_mut().take(3) {
        seen.insert(served_by(s).await.unwrap());
    }
    assert_eq!(seen.len(), 3, "{seen:?}");
    proxy.stop().await;
}

#[tokio::test]
async fn a_killed_backend_fails_its_sessions_cleanly_new_sessions_go_elsewhere_and_its_return_is_noticed()
 {
    let pki = Pki::new();
    let cert = pki.issue("mx", &["mx.example.test"], false);
    let mut fleet = Vec::new();
    for name in ["b0", "b1", "b2"] {
        fleet.push(FleetBackend::start(name, Speaks::Imap, FleetTls::None).await);
    }
    let addrs: Vec<SocketAddr> = fleet.iter().map(|b| b.addr).collect();
    let yaml = config_yaml(
        &[&cert],
        &[pool_listener(
            "imaps",
            "imap",
            "implicit",
            &addrs,
            "    backend_health:\n      interval: 1s\n",
        )],
        QUICK_STOP,
    );
    let proxy = Proxy::start(&yaml, pki.dir.path()).await;
    let mut held = Vec::new();
    for _ in 0..6 {
        held.push(imap_login(proxy.addr("imaps"), "mx.example.test", &pki).await);
    }

    fleet[1].kill();
    // Its two sessions end with a closed connection (no hang, no reply from anywhere else);
    // the four others go on.
    let mut closed = 0;
    let mut alive = Vec::new();
    for s in held.iter_mut() {
        match served_by(s).await {
            None => closed += 1,
            Some(name) => alive.push(name),
        }
    }
    assert_eq!(closed, 2);
    assert!(alive.iter().all(|n| n != "b1"), "{alive:?}");

    // New sessions: none sees an error, none lands on the dead one.
    let before = fleet[1].sessions();
    let mut fresh = Vec::new();
    for _ in 0..6 {
        let mut s = imap_login(proxy.addr("imaps"), "mx.example.test", &pki).await;
        let name = served_by(&mut s).await.unwrap();
        assert_ne!(name, "b1");
        fresh.push(s);
    }
    assert_eq!(fleet[1].sessions(), before);
    let down = series("mailfront_backend_up", "imaps", addrs[1]);
    let text = scrape_proxy(&proxy).await;
    assert_eq!(metric(&text, &down), Some(0.0), "{text}");
    assert!(text.contains(&format!("mailfront_backend_failures_total{{backend=\"{}\",listener=\"imaps\",reason=\"refused\"}}", addrs[1])), "{text}");

    // Back on the same port: the active check notices within a second or two.
    fleet[1].revive().await;
    let mut up = false;
    for _ in 0..40 {
        if metric(&scrape_proxy(&proxy).await, &down) == Some(1.0) {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(up, "the revived backend was never seen up");
    drop(held);
    drop(fresh);
    // With the old sessions gone (ended in the proxy, so no longer counted against their
    // backends), the next three spread over all three again.
    eventually(|| {
        proxy
            .metrics
            .encode()
            .contains(r#"mailfront_connections_active{listener="imaps",protocol="imap"} 0"#)
    })
    .await;
    let mut names = std::collections::HashSet::new();
    let mut again = Vec::new();
    for _ in 0..3 {
        let mut s = imap_login(proxy.addr("imaps"), "mx.example.test", &pki).await;
        names.insert(served_by(&mut s).await.unwrap());
        again.push(s);
    }
    assert!(names.contains("b1"), "{names:?}");
    proxy.stop().await;
}

#[tokio::test]
async fn every_backend_down_gives_the_protocols_temporary_failure() {
    let pki = Pki::new();
    let cert = pki.issue("mx", &["mx.example.test"], false);
    let mut dead = Vec::new();
    for _ in 0..2 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        dead.push(l.local_addr().unwrap());
    }
    let yaml = config_yaml(
        &[&cert],
        &[pool_listener("imaps", "imap", "implicit", &dead, "")],
        QUICK_STOP,
    );
    let proxy = Proxy::start(&yaml, pki.dir.path()).await;
    let config = client_config(&pki.ca_der, &[&rustls::version::TLS13], None);
    let tls = tls_connect(proxy.addr("imaps"), "mx.example.test", config)
        .await
        .unwrap();
    let mut s = BufReader::new(tls);
    assert_eq!(
        read_line(&mut s).await,
        "* BYE [UNAVAILABLE] Server temporarily unavailable\r\n"
    );
    proxy.stop().await;
}

/// Routes: `vip.example.test` → b0, `*.customers.example.test` → b1, anything else → b2.
fn routes(fleet: &[FleetBackend]) -> String {
    format!(
        "    routes:\n      - sni: vip.example.test\n        backend: \"{}\"\n      - sni: \"*.customers.example.test\"\n        backend: [\"{}\"]\n",
        fleet[0].addr, fleet[1].addr
    )
}

/// Three backends b0..b2 behind one listener with [`routes`], its certificate covering every
/// routed name.
async fn routed(name: &str, speaks: Speaks, tls: &str) -> (Pki, Vec<FleetBackend>, Proxy) {
    let pki = Pki::new();
    let names = [
        "mx.example.test",
        "vip.example.test",
        "*.customers.example.test",
    ];
    let cert = pki.issue("mx", &names, false);
    let mut fleet = Vec::new();
    for backend in ["b0", "b1", "b2"] {
        fleet.push(FleetBackend::start(backend, speaks, FleetTls::None).await);
    }
    let protocol = match speaks {
        Speaks::Imap => "imap",
        Speaks::Smtp => "smtp",
    };
    let listener = pool_listener(name, protocol, tls, &[fleet[2].addr], &routes(&fleet));
    let yaml = config_yaml(&[&cert], &[listener], QUICK_STOP);
    let proxy = Proxy::start(&yaml, pki.dir.path()).await;
    (pki, fleet, proxy)
}

const ROUTED: [(&str, usize); 4] = [
    ("vip.example.test", 0),
    ("a.customers.example.test", 1),
    ("mx.example.test", 2),
    ("b.customers.example.test", 1),
];

#[tokio::test]
async fn sni_routes_choose_the_backend_on_an_implicit_listener() {
    let (pki, _fleet, proxy) = routed("imaps", Speaks::Imap, "implicit").await;
    for (sni, expected) in ROUTED {
        let mut s = imap_login(proxy.addr("imaps"), sni, &pki).await;
        assert_eq!(
            served_by(&mut s).await.unwrap(),
            format!("b{expected}"),
            "{sni}"
        );
    }
    proxy.stop().await;
}

#[tokio::test]
async fn sni_routes_choose_the_backend_on_a_starttls_listener_after_the_handshake() {
    let (pki, fleet, proxy) = routed("submission", Speaks::Smtp, "starttls").await;
    for (sni, expected) in ROUTED {
        let counts: Vec<usize> = fleet.iter().map(FleetBackend::client_sessions).collect();
        let tcp = tokio::net::TcpStream::connect(proxy.addr("submission"))
            .await
            .unwrap();
        let mut plain = BufReader::new(tcp);
        assert!(read_smtp_reply(&mut plain).await.starts_with("220 "));
        plain
            .get_mut()
            .write_all(b"EHLO client.example\r\n")
            .await
            .unwrap();
        read_smtp_reply(&mut plain).await;
        // No session reached any backend in cleartext. The listener's capability probe ran
        // once, before the first session was greeted (no client behind it, so no SNI: the
        // listener's default backend).
        assert_eq!(
            fleet
                .iter()
                .map(FleetBackend::client_sessions)
                .collect::<Vec<_>>(),
            counts
        );
        assert_eq!(
            fleet.iter().map(FleetBackend::probes).collect::<Vec<_>>(),
            [0, 0, 1]
        );
        plain.get_mut().write_all(b"STARTTLS\r\n").await.unwrap();
        assert!(read_smtp_reply(&mut plain).await.starts_with("220 "));
        let config = client_config(&pki.ca_der, &[&rustls::version::TLS13], None);
        let tls = tls_upgrade(plain.into_inner(), sni, config).await.unwrap();
        let mut s = BufReader::new(tls);
        // MAIL needs the backend (EHLO and NOOP are answered from what the probe learned).
        s.get_mut()
            .write_all(b"EHLO client.example\r\nMAIL FROM:<a@example.test>\r\n")
            .await
            .unwrap();
        assert!(read_smtp_reply(&mut s).await.starts_with("250"));
        let mail = read_smtp_reply(&mut s).await;
        assert!(mail.contains(&format!("b{expected}")), "{sni}: {mail}");
        for (i, b) in fleet.iter().enumerate() {
            let grew = usize::from(i == expected);
            assert_eq!(b.client_sessions(), counts[i] + grew, "{sni} on b{i}");
        }
    }
    proxy.stop().await;
}

/// A test CA with mailfront's certificate and a backend's (`backend.example.test`).
fn with_backend_certificate() -> (Pki, IssuedCert, std::sync::Arc<rustls::ServerConfig>) {
    let pki = Pki::new();
    let cert = pki.issue("mx", &["mx.example.test"], false);
    let backend = server_tls(&pki.issue("backend", &["backend.example.test"], false));
    (pki, cert, backend)
}

fn backend_tls(mode: &str, ca: &std::path::Path) -> String {
    format!(
        "    backend_tls:\n      mode: {mode}\n      ca: {}\n      server_name: backend.example.test\n",
        ca.display()
    )
}

#[tokio::test]
async fn an_implicit_tls_backend_is_verified_against_ca_and_a_wrong_ca_is_a_temporary_failure() {
    let (pki, cert, backend_tls_config) = with_backend_certificate();
    let b = FleetBackend::start(
        "tls0",
        Speaks::Imap,
        FleetTls::Implicit(backend_tls_config.clone()),
    )
    .await;
    let other = Pki::new();
    let yaml = config_yaml(
        &[&cert],
        &[
            pool_listener(
                "good",
                "imap",
                "implicit",
                &[b.addr],
                &backend_tls("implicit", &pki.ca_path()),
            ),
            pool_listener(
                "wrong",
                "imap",
                "implicit",
                &[b.addr],
                &backend_tls("implicit", &other.ca_path()),
            ),
        ],
        QUICK_STOP,
    );
    let proxy = Proxy::start(&yaml, pki.dir.path()).await;
    let mut s = imap_login(proxy.addr("good"), "mx.example.test", &pki).await;
    assert_eq!(served_by(&mut s).await.unwrap(), "tls0");

    let config = client_config(&pki.ca_der, &[&rustls::version::TLS13], None);
    let tls = tls_connect(proxy.addr("wrong"), "mx.example.test", config)
        .await
        .unwrap();
    let mut w = BufReader::new(tls);
    assert_eq!(
        read_line(&mut w).await,
        "* BYE [UNAVAILABLE] Server temporarily unavailable\r\n"
    );
    let text = scrape_proxy(&proxy).await;
    // Two: the listener's capability probe, then the session, which (nothing learned) fell back
    // to connecting at once.
    assert!(
        text.contains(&format!(
            "mailfront_backend_failures_total{{backend=\"{}\",listener=\"wrong\",reason=\"tls\"}} 2",
            b.addr
        )),
        "{text}"
    );
    assert_eq!(
        metric(&text, &series("mailfront_backend_up", "wrong", b.addr)),
        Some(0.0)
    );
    proxy.stop().await;
}

#[tokio::test]
async fn starttls_to_the_backend_happens_before_anything_of_the_clients() {
    let (pki, cert, backend_tls_config) = with_backend_certificate();
    let imap = FleetBackend::start(
        "imap-tls",
        Speaks::Imap,
        FleetTls::Starttls(backend_tls_config.clone()),
    )
    .await;
    let smtp = FleetBackend::start(
        "smtp-tls",
        Speaks::Smtp,
        FleetTls::Starttls(backend_tls_config.clone()),
    )
    .await;
    let yaml = config_yaml(
        &[&cert],
        &[
            pool_listener(
                "imaps",
                "imap",
                "implicit",
                &[imap.addr],
                &backend_tls("starttls", &pki.ca_path()),
            ),
            pool_listener(
                "smtps",
                "smtp",
                "implicit",
                &[smtp.addr],
                &backend_tls("starttls", &pki.ca_path()),
            ),
        ],
        QUICK_STOP,
    );
    let proxy = Proxy::start(&yaml, pki.dir.path()).await;
    let mut s = imap_login(proxy.addr("imaps"), "mx.example.test", &pki).await;
    assert_eq!(served_by(&mut s).await.unwrap(), "imap-tls");
    // The listener's probe went through the backend's STARTTLS too.
    assert_eq!(imap.probes(), 1);
    assert_eq!(imap.client_sessions(), 1);

    let config = client_config(&pki.ca_der, &[&rustls::version::TLS13], None);
    let tls = tls_connect(proxy.addr("smtps"), "mx.example.test", config)
        .await
        .unwrap();
    let mut m = BufReader::new(tls);
    assert!(
        read_smtp_reply(&mut m)
            .await
            .starts_with("220 mx.example.test")
    );
    // MAIL needs the backend (EHLO is answered from what the probe learned).
    m.get_mut()
        .write_all(b"EHLO client.example\r\nMAIL FROM:<a@example.test>\r\n")
        .await
        .unwrap();
    assert!(read_smtp_reply(&mut m).await.starts_with("250"));
    assert!(read_smtp_reply(&mut m).await.contains("smtp-tls"));
    assert_eq!(smtp.probes(), 1);
    assert_eq!(smtp.client_sessions(), 1);
    proxy.stop().await;
}

#[tokio::test]
async fn a_dns_name_stands_for_every_address_it_resolves_to() {
    let pki = Pki::new();
    let cert = pki.issue("mx", &["mx.example.test"], false);
    let b = FleetBackend::start("b0", Speaks::Imap, FleetTls::None).await;
    let name = format!("localhost:{}", b.addr.port());
    let listener = format!(
        "  - name: imaps\n    protocol: imap\n    listen: \"127.0.0.1:0\"\n    tls: implicit\n    backend: [\"{name}\"]\n"
    );
    let yaml = config_yaml(&[&cert], &[listener], QUICK_STOP);
    let proxy = Proxy::start(&yaml, pki.dir.path()).await;
    // Wherever `localhost` also resolves to ::1 (nothing listens there), that address fails and
    // the session steps over it: the client never notices.
    for _ in 0..4 {
        let mut s = imap_login(proxy.addr("imaps"), "mx.example.test", &pki).await;
        assert_eq!(served_by(&mut s).await.unwrap(), "b0");
    }
    let text = scrape_proxy(&proxy).await;
    // The four sessions and the listener's capability probe.
    assert_eq!(b.probes(), 1);
    assert_eq!(
        metric(
            &text,
            &series("mailfront_backend_sessions_total", "imaps", b.addr)
        ),
        Some(5.0),
        "{text}"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn a_silent_backend_and_one_that_closes_before_greeting_are_stepped_over() {
    let pki = Pki::new();
    let cert = pki.issue("mx", &["mx.example.test"], false);
    // Accepts and says nothing; accepts and closes at once.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let closer = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (silent_addr, closer_addr) = (silent.local_addr().unwrap(), closer.local_addr().unwrap());
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    tokio::spawn(async move {
        while let Ok((s, _)) = closer.accept().await {
            drop(s);
        }
    });
    let good = FleetBackend::start("good", Speaks::Imap, FleetTls::None).await;
    let listener = pool_listener(
        "imaps",
        "imap",
        "implicit",
        &[silent_addr, closer_addr, good.addr],
        "",
    );
    let extra = "timeouts:\n  backend_connect: 500ms\n  shutdown_grace: 200ms\n";
    let yaml = config_yaml(&[&cert], &[listener], extra);
    let proxy = Proxy::start(&yaml, pki.dir.path()).await;
    // The listener's capability probe, before the first session, meets both (least
    // connections, ties in listed order at first); the sessions find them resting: every
    // client is served by the good one.
    for _ in 0..3 {
        let mut s = imap_login(proxy.addr("imaps"), "mx.example.test", &pki).await;
        assert_eq!(served_by(&mut s).await.unwrap(), "good");
    }
    let text = scrape_proxy(&proxy).await;
    let failures = |addr: SocketAddr, reason: &str| {
        metric(
            &text,
            &format!(
                "mailfront_backend_failures_total{{backend=\"{addr}\",listener=\"imaps\",reason=\"{reason}\"}}"
            ),
        )
    };
    assert_eq!(failures(silent_addr, "timeout"), Some(1.0), "{text}");
    assert_eq!(failures(closer_addr, "no_greeting"), Some(1.0), "{text}");
    assert_eq!(
        metric(&text, &series("mailfront_backend_up", "imaps", silent_addr)),
        Some(0.0)
    );
    // The three sessions and the probe.
    assert_eq!(good.probes(), 1);
    assert_eq!(good.client_sessions(), 3);
    assert_eq!(
        metric(
            &text,
            &series("mailfront_backend_sessions_total", "imaps", good.addr)
        ),
        Some(4.0)
    );
    proxy.stop().await;
}

#[tokio::test]
async fn active_checks_open_with_a_proxy_v2_local_header_where_the_backend_expects_proxy() {
    let pki = Pki::new();
    let cert = pki.issue("mx", &["mx.example.test"], false);
    let backend = FakeBackend::start_with(
        FakeKind::Imap,
        FakeOptions {
            expect_proxy_v2: true,
            ..FakeOptions::default()
        },
    )
    .await;
    let extra = "    backend_proxy_protocol: true\n    backend_health:\n      interval: 1s\n";
    let listener = pool_listener("imaps", "imap", "implicit", &[backend.addr], extra);
    let yaml = config_yaml(&[&cert], &[listener], QUICK_STOP);
    let proxy = Proxy::start(&yaml, pki.dir.path()).await;
    // The first check runs at start: a header with the LOCAL command (0x20) and no addresses,
    // which the backend accepts like any other, then a greeting and LOGOUT.
    eventually(|| !backend.proxy_headers.connections().is_empty()).await;
    let header = backend.proxy_headers.connections().remove(0);
    assert_eq!(header[..12], PROXY_V2_SIGNATURE);
    assert_eq!(header[12..], [0x20, 0x00, 0x00, 0x00]);
    eventually(|| backend.recorder.all_text().contains("M0 LOGOUT\r\n")).await;
    let text = scrape_proxy(&proxy).await;
    assert_eq!(
        metric(
            &text,
            &series("mailfront_backend_up", "imaps", backend.addr)
        ),
        Some(1.0)
    );
    proxy.stop().await;
}

/// A backend that pipelines bytes after its STARTTLS go-ahead (CERT VU#555316 from the backend's
/// side): they would be read as if TLS protected them, so that backend fails as `starttls` and
/// the session goes to the next one.
#[tokio::test]
async fn bytes_after_a_backends_starttls_go_ahead_fail_that_backend() {
    use tokio::io::AsyncBufReadExt;
    let (pki, cert, backend_tls_config) = with_backend_certificate();
    let injector = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let injector_addr = injector.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = injector.accept().await {
            tokio::spawn(async move {
                let mut s = BufReader::new(s);
                s.get_mut()
                    .write_all(b"* OK [CAPABILITY IMAP4rev1 STARTTLS] ready\r\n")
                    .await
                    .unwrap();
                let mut line = String::new();
                while s.read_line(&mut line).await.unwrap_or(0) > 0 {
                    let tag = line.split(' ').next().unwrap_or("*").to_owned();
                    if line.to_ascii_uppercase().contains("STARTTLS") {
                        let reply = format!("{tag} OK go ahead\r\n* OK [ALERT] injected\r\n");
                        s.get_mut().write_all(reply.as_bytes()).await.unwrap();
                    } else {
                        let reply = format!("{tag} OK done\r\n");
                        s.get_mut().write_all(reply.as_bytes()).await.unwrap();
                    }
                    line.clear();
                }
            });
        }
    });
    let good = FleetBackend::start(
        "good",
        Speaks::Imap,
        FleetTls::Starttls(backend_tls_config.clone()),
    )
    .await;
    let listener = pool_listener(
        "imaps",
        "imap",
        "implicit",
        &[injector_addr, good.addr],
        &backend_tls("starttls", &pki.ca_path()),
    );
    let yaml = config_yaml(&[&cert], &[listener], QUICK_STOP);
    let proxy = Proxy::start(&yaml, pki.dir.path()).await;
    // The first session meets the injector (ties in listed order), steps over it, and is
    // served by the good one; so is the next, with the injector resting.
    for _ in 0..2 {
        let mut s = imap_login(proxy.addr("imaps"), "mx.example.test", &pki).await;
        assert_eq!(served_by(&mut s).await.unwrap(), "good");
    }
    let text = scrape_proxy(&proxy).await;
    assert_eq!(
        metric(
            &text,
            &format!(
                "mailfront_backend_failures_total{{backend=\"{injector_addr}\",listener=\"imaps\",reason=\"starttls\"}}"
            )
        ),
        Some(1.0),
        "{text}"
    );
    proxy.stop().await;
}

/// The first line a new session through `proxy` gets.
async fn greeting(proxy: SocketAddr, pki: &Pki) -> String {
    let config = client_config(&pki.ca_der, &[&rustls::version::TLS13], None);
    let tls = tls_connect(proxy, "mx.example.test", config).await.unwrap();
    let mut s = BufReader::new(tls);
    read_line(&mut s).await
}

/// `backend_tls.ca` is watched like the certificates (`tls.reload_interval`, 100 ms here): a
/// bundle rotated on disk is used by the next session, and a broken one keeps the bundle in
/// service, logged and counted.
#[tokio::test]
async fn a_changed_backend_ca_bundle_is_reloaded_and_a_broken_one_keeps_the_old() {
    let (pki, cert, backend_tls_config) = with_backend_certificate();
    let b = FleetBackend::start(
        "tls0",
        Speaks::Imap,
        FleetTls::Implicit(backend_tls_config.clone()),
    )
    .await;
    // Starts with another CA's bundle: the backend's certificate does not verify.
    let other = Pki::new();
    let bundle = pki.dir.path().join("backend-ca.pem");
    std::fs::write(&bundle, &other.ca_pem).unwrap();
    let yaml = config_yaml(
        &[&cert],
        &[pool_listener(
            "rot",
            "imap",
            "implicit",
            &[b.addr],
            &backend_tls("implicit", &bundle),
        )],
        QUICK_STOP,
    );
    let proxy = Proxy::start(&yaml, pki.dir.path()).await;
    assert_eq!(
        greeting(proxy.addr("rot"), &pki).await,
        "* BYE [UNAVAILABLE] Server temporarily unavailable\r\n"
    );
    let reloads = |result: &str| {
        let text = proxy.metrics.encode();
        let needle =
            format!("mailfront_backend_ca_reloads_total{{listener=\"rot\",result=\"{result}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&needle))
            .map(|v| v.trim().parse::<u64>().unwrap())
            .unwrap_or(0)
    };
    std::fs::write(&bundle, &pki.ca_pem).unwrap();
    eventually(|| reloads("success") == 1).await;
    let mut ok = false;
    for _ in 0..50 {
        if greeting(proxy.addr("rot"), &pki).await.starts_with("* OK") {
            ok = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(ok, "the rotated bundle was not used");
    std::fs::write(&bundle, "not a bundle\n").unwrap();
    eventually(|| reloads("failure") >= 1).await;
    assert!(greeting(proxy.addr("rot"), &pki).await.starts_with("* OK"));
    assert_eq!(reloads("success"), 1);
    proxy.stop().await;
}
