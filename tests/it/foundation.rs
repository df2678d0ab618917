//! The TLS front door: versions, suites, SNI, reload, backend failures, IPv6, curl, the CLI.
// Helpers outside #[test] functions: clippy's allow-*-in-tests does not reach them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;
use std::time::Duration;

use crate::common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};

fn both_versions() -> Vec<&'static rustls::SupportedProtocolVersion> {
    vec![&rustls::version::TLS13, &rustls::version::TLS12]
}

/// The SHA-256 fingerprint-free way to tell certificates apart: the leaf's DER.
fn leaf_der(stream: &tokio_rustls::client::TlsStream<tokio::net::TcpStream>) -> Vec<u8> {
    stream.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

#[tokio::test]
async fn implicit_tls_relays_both_ways_and_reports_iana_names() {
    let OneListener {
        pki,
        cert: _,
        backend,
        proxy,
    } = one_listener(FakeKind::Imap, "echo", "imap").await;

    let tls = tls_connect(
        proxy.addr("echo"),
        "mx.example.test",
        client_config(&pki.ca_der, &both_versions(), None),
    )
    .await
    .unwrap();
    let suite = tls.get_ref().1.negotiated_cipher_suite().unwrap().suite();
    assert_eq!(u16::from(suite), 0x1302, "TLS 1.3 with AES-256-GCM first");
    let mut tls = BufReader::new(tls);
    assert!(read_line(&mut tls).await.starts_with("* OK "));
    // After login the proxy relays bytes untouched, 8-bit ones included.
    tls.get_mut()
        .write_all(b"a LOGIN u secret\r\n")
        .await
        .unwrap();
    assert!(read_until_tag(&mut tls, "a").await.contains("a OK"));
    tls.get_mut()
        .write_all(b"ping 8bit \xff\xfe\r\n")
        .await
        .unwrap();
    assert_eq!(read_line(&mut tls).await, "ping OK 8BIT completed\r\n");
    eventually(|| {
        backend
            .recorder
            .all()
            .ends_with(b"\r\nping 8bit \xff\xfe\r\n")
    })
    .await;

    let text = proxy.metrics.encode();
    assert!(
        text.contains(r#"mailfront_tls_handshakes_total{cipher="TLS_AES_256_GCM_SHA384",group="X25519MLKEM768",listener="echo",version="TLSv1.3"} 1"#),
        "{text}"
    );
}

#[tokio::test]
async fn tls12_with_an_ecdsa_certificate_negotiates_ecdhe_ecdsa_aead() {
    let OneListener {
        pki,
        cert: _,
        backend: _,
        proxy,
    } = one_listener(FakeKind::Echo, "e", "pop3").await;
    let suites = vec![
        rustls::crypto::aws_lc_rs::cipher_suite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
    ];
    let tls = tls_connect(
        proxy.addr("e"),
        "mx.example.test",
        client_config(&pki.ca_der, &[&rustls::version::TLS12], Some(suites)),
    )
    .await
    .unwrap();
    assert_eq!(
        tls.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
    eventually(|| {
        proxy.metrics.encode().contains(
            r#"cipher="TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",group="X25519MLKEM768",listener="e",version="TLSv1.2"} 1"#,
        ) || proxy.metrics.encode().contains(
            r#"cipher="TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",group="x25519",listener="e",version="TLSv1.2"} 1"#,
        )
    })
    .await;
}

#[tokio::test]
async fn min_version_13_refuses_tls12() {
    let pki = Pki::new();
    let cert = pki.issue("mx", &["mx.example.test"], false);
    let backend = FakeBackend::start(FakeKind::Echo).await;
    let yaml = config_yaml(
        &[&cert],
        &[listener_yaml("e", "imap", "implicit", backend.addr)],
        "",
    )
    .replace(
        "  reload_interval",
        "  min_version: \"1.3\"\n  reload_interval",
    );
    let proxy = Proxy::start(&yaml, pki.dir.path()).await;
    let refused = tls_connect(
        proxy.addr("e"),
        "mx.example.test",
        client_config(&pki.ca_der, &[&rustls::version::TLS12], None),
    )
    .await;
    assert!(refused.is_err());
    eventually(|| {
        proxy.metrics.encode().contains(
            r#"mailfront_tls_handshake_failures_total{listener="e",reason="protocol_version"} 1"#,
        )
    })
    .await;
    assert!(
        backend.recorder.connections().is_empty(),
        "no backend connection for a failed handshake"
    );
}

#[tokio::test]
async fn sni_chooses_between_certificates_and_unknown_names_get_the_first() {
    let pki = Pki::new();
    let first = pki.issue("first", &["mx.example.test"], false);
    let second = pki.issue("second", &["imap.other.test", "*.wild.test"], true);
    let backend = FakeBackend::start(FakeKind::Echo).await;
    let yaml = config_yaml(
        &[&first, &second],
        &[listener_yaml("e", "imap", "implicit", backend.addr)],
        "",
    );
    let proxy = Proxy::start(&yaml, pki.dir.path()).await;
    let config = client_config(&pki.ca_der, &both_versions(), None);

    let a = tls_connect(proxy.addr("e"), "mx.example.test", config.clone())
        .await
        .unwrap();
    let b = tls_connect(proxy.addr("e"), "imap.other.test", config.clone())
        .await
        .unwrap();
    let c = tls_connect(proxy.addr("e"), "host.wild.test", config.clone())
        .await
        .unwrap();
    assert_ne!(leaf_der(&a), leaf_der(&b));
    assert_eq!(
        leaf_der(&b),
        leaf_der(&c),
        "wildcard name served by the second certificate"
    );
    // An unknown name gets the default certificate, which the client then rejects by name.
    let verify_off = tls_connect(proxy.addr("e"), "unknown.test", config).await;
    assert!(verify_off.is_err());

    // TLS 1.2 with the RSA certificate negotiates an ECDHE_RSA suite.
    let tls12 = tls_connect(
        proxy.addr("e"),
        "imap.other.test",
        client_config(&pki.ca_der, &[&rustls::version::TLS12], None),
    )
    .await
    .unwrap();
    let suite = u16::from(tls12.get_ref().1.negotiated_cipher_suite().unwrap().suite());
    assert_eq!(
        mailfront::tls::names::cipher_suite_name(suite),
        "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384"
    );
}

#[tokio::test]
async fn replaced_certificate_serves_new_handshakes_while_open_sessions_continue() {
    let OneListener {
        pki,
        cert,
        backend: _,
        proxy,
    } = one_listener(FakeKind::Imap, "e", "imap").await;
    // A fresh client each time: a resumed TLS 1.3 session would report the old peer certificate.
    let config = || client_config(&pki.ca_der, &both_versions(), None);

    let old = tls_connect(proxy.addr("e"), "mx.example.test", config())
        .await
        .unwrap();
    let old_leaf = leaf_der(&old);
    let mut old = BufReader::new(old);
    assert!(read_line(&mut old).await.starts_with("* OK "));

    // A broken file on reload keeps the old certificate in service.
    std::fs::write(&cert.cert, "not a certificate").unwrap();
    eventually(|| {
        proxy
            .metrics
            .encode()
            .contains(r#"mailfront_certificate_reloads_total{result="failure"}"#)
    })
    .await;
    let still = tls_connect(proxy.addr("e"), "mx.example.test", config())
        .await
        .unwrap();
    assert_eq!(leaf_der(&still), old_leaf);

    // Kubernetes-style: a new pair is written and the file names now point at it.
    let renewed = pki.issue("renewed", &["mx.example.test"], false);
    std::fs::copy(&renewed.key, &cert.key).unwrap();
    std::fs::copy(&renewed.cert, &cert.cert).unwrap();
    eventually(|| {
        proxy
            .metrics
            .encode()
            .contains(r#"mailfront_certificate_reloads_total{result="success"} 1"#)
    })
    .await;
    let new = tls_connect(proxy.addr("e"), "mx.example.test", config())
        .await
        .unwrap();
    assert_ne!(leaf_der(&new), old_leaf);

    // The session opened before the reload still relays.
    old.get_mut().write_all(b"a NOOP\r\n").await.unwrap();
    assert_eq!(read_line(&mut old).await, "a OK NOOP completed\r\n");
}

#[tokio::test]
async fn sighup_style_reload_picks_up_a_symlink_swap() {
    let pki = Pki::new();
    let a = pki.issue("a", &["mx.example.test"], false);
    let b = pki.issue("b", &["mx.example.test"], false);
    // ..data -> a, as the kubelet lays out a Secret volume.
    let dir = pki.dir.path().join("secret");
    std::fs::create_dir(&dir).unwrap();
    let data_a = pki.dir.path().join("data_a");
    let data_b = pki.dir.path().join("data_b");
    for (data, issued) in [(&data_a, &a), (&data_b, &b)] {
        std::fs::create_dir(data).unwrap();
        std::fs::copy(&issued.cert, data.join("tls.crt")).unwrap();
        std::fs::copy(&issued.key, data.join("tls.key")).unwrap();
    }
    std::os::unix::fs::symlink(&data_a, dir.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/tls.crt", dir.join("tls.crt")).unwrap();
    std::os::unix::fs::symlink("..data/tls.key", dir.join("tls.key")).unwrap();
    let mounted = IssuedCert {
        cert: dir.join("tls.crt"),
        key: dir.join("tls.key"),
    };

    let backend = FakeBackend::start(FakeKind::Echo).await;
    let yaml = config_yaml(
        &[&mounted],
        &[listener_yaml("e", "imap", "implicit", backend.addr)],
        "",
    )
    .replace("reload_interval: 100ms", "reload_interval: 1h");
    let proxy = Proxy::start(&yaml, pki.dir.path()).await;
    // A fresh client each time: a resumed TLS 1.3 session would report the old peer certificate.
    let config = || client_config(&pki.ca_der, &both_versions(), None);
    let before = leaf_der(
        &tls_connect(proxy.addr("e"), "mx.example.test", config())
            .await
            .unwrap(),
    );

    let tmp_link = dir.join("..data_tmp");
    std::os::unix::fs::symlink(&data_b, &tmp_link).unwrap();
    std::fs::rename(&tmp_link, dir.join("..data")).unwrap();
    proxy.control.reload.notify_one();
    eventually(|| {
        proxy
            .metrics
            .encode()
            .contains(r#"mailfront_certificate_reloads_total{result="success"} 1"#)
    })
    .await;
    let after = leaf_der(
        &tls_connect(proxy.addr("e"), "mx.example.test", config())
            .await
            .unwrap(),
    );
    assert_ne!(before, after);
}

#[tokio::test]
async fn unreachable_backend_gets_a_protocol_correct_goodbye() {
    let pki = Pki::new();
    let cert = pki.issue("mx", &["mx.example.test"], false);
    // A port that was just free: nothing listens there.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let yaml = config_yaml(
        &[&cert],
        &[
            listener_yaml("smtp", "smtp", "implicit", dead),
            listener_yaml("imap", "imap", "implicit", dead),
            listener_yaml("pop3", "pop3", "implicit", dead),
        ],
        "",
    );
    let proxy = Proxy::start(&yaml, pki.dir.path()).await;
    let config = client_config(&pki.ca_der, &both_versions(), None);
    for (name, expected) in [
        ("smtp", "421 4.4.1 "),
        ("imap", "* BYE [UNAVAILABLE] "),
        ("pop3", "-ERR [SYS/TEMP] "),
    ] {
        let tls = tls_connect(proxy.addr(name), "mx.example.test", config.clone())
            .await
            .unwrap();
        let mut tls = BufReader::new(tls);
        let mut line = read_line(&mut tls).await;
        if name == "smtp" {
            // SMTP greets at once and connects when a command needs the backend.
            assert!(line.starts_with("220 "), "{line:?}");
            tls.get_mut()
                .write_all(b"EHLO c.example\r\n")
                .await
                .unwrap();
            line = read_line(&mut tls).await;
        }
        if name == "pop3" {
            // POP3 greets at once too, and connects for a login.
            assert_eq!(line, "+OK mx.example.test ready\r\n");
            tls.get_mut().write_all(b"AUTH PLAIN\r\n").await.unwrap();
            line = read_line(&mut tls).await;
        }
        assert!(line.starts_with(expected), "{name}: {line:?}");
        assert!(line.ends_with("\r\n"));
    }
    assert!(
        proxy
            .metrics
            .encode()
            .contains(r#"mailfront_backend_connect_failures_total{listener="imap"} 1"#)
    );
}

#[tokio::test]
async fn ipv6_listener_serves_when_the_host_has_ipv6() {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        eprintln!("no IPv6 loopback here; skipping");
        return;
    }
    let pki = Pki::new();
    let cert = pki.issue("mx", &["mx.example.test"], false);
    let backend = FakeBackend::start(FakeKind::Imap).await;
    let yaml = config_yaml(
        &[&cert],
        &[listener_yaml("v6", "imap", "implicit", backend.addr)],
        "",
    )
    .replace(
        "listen: \"127.0.0.1:0\"\n    tls",
        "listen: \"[::1]:0\"\n    tls",
    );
    let proxy = Proxy::start(&yaml, pki.dir.path()).await;
    assert!(proxy.addr("v6").is_ipv6());
    let tls = tls_connect(
        proxy.addr("v6"),
        "mx.example.test",
        client_config(&pki.ca_der, &both_versions(), None),
    )
    .await
    .unwrap();
    let mut tls = BufReader::new(tls);
    assert!(read_line(&mut tls).await.starts_with("* OK "));
}

#[tokio::test]
async fn garbage_instead_of_a_client_hello_is_dropped_without_harm() {
    let OneListener {
        pki,
        cert: _,
        backend: _,
        proxy,
    } = one_listener(FakeKind::Echo, "e", "imap").await;
    let mut seed = 0x1234_5678u32;
    for len in [0usize, 1, 5, 100, 5000] {
        let mut tcp = tokio::net::TcpStream::connect(proxy.addr("e"))
            .await
            .unwrap();
        let junk: Vec<u8> = (0..len)
            .map(|_| {
                seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
                (seed >> 16) as u8
            })
            .collect();
        let _ = tcp.write_all(&junk).await;
        let _ = tcp.write_all(b"\x16\x03\x01\x00\x05hello").await;
        let mut sink = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(2), tcp.read_to_end(&mut sink)).await;
    }
    // Still serving.
    let tls = tls_connect(
        proxy.addr("e"),
        "mx.example.test",
        client_config(&pki.ca_der, &both_versions(), None),
    )
    .await;
    assert!(tls.is_ok());
}

/// openssl s_client: TLS 1.1 refused, 1.2 and 1.3 accepted.
#[tokio::test]
async fn openssl_s_client_tls11_refused_tls12_and_tls13_accepted() {
    if !tool_or_skip(
        "openssl_s_client_tls11_refused_tls12_and_tls13_accepted",
        "openssl",
    ) {
        return;
    }
    let OneListener {
        pki,
        cert: _,
        backend: _,
        proxy,
    } = one_listener(FakeKind::Echo, "e", "imap").await;
    let addr = proxy.addr("e").to_string();
    let ca = pki.ca_path();
    let run = move |flag: &'static str| {
        let addr = addr.clone();
        let ca = ca.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                let out = Command::new("sh")
                    .arg("-c")
                    .arg(format!(
                        "echo | timeout 10 openssl s_client -connect {addr} -servername mx.example.test -CAfile {} {flag} -verify_return_error 2>&1",
                        ca.display()
                    ))
                    .output()
                    .unwrap();
                String::from_utf8_lossy(&out.stdout).into_owned()
            })
            .await
            .unwrap()
        }
    };
    let tls11 = run("-tls1_1").await;
    assert!(
        !tls11.contains("Verify return code: 0 (ok)") || tls11.contains("Cipher is (NONE)"),
        "{tls11}"
    );
    let tls12 = run("-tls1_2").await;
    assert!(
        tls12.contains("Protocol  : TLSv1.2") || tls12.contains("TLSv1.2"),
        "{tls12}"
    );
    assert!(tls12.contains("Verify return code: 0 (ok)"), "{tls12}");
    let tls13 = run("-tls1_3").await;
    assert!(tls13.contains("TLSv1.3"), "{tls13}");
    assert!(tls13.contains("Verify return code: 0 (ok)"), "{tls13}");
}

/// curl through the proxy against the fake IMAP, POP3 and SMTP servers.
#[tokio::test]
async fn curl_imaps_pop3s_and_smtps_through_the_proxy() {
    if !tool_or_skip("curl_imaps_pop3s_and_smtps_through_the_proxy", "curl") {
        return;
    }
    let pki = Pki::new();
    let cert = pki.issue("mx", &["mx.example.test"], false);
    let imap = FakeBackend::start(FakeKind::Imap).await;
    let pop3 = FakeBackend::start(FakeKind::Pop3).await;
    let smtp = FakeBackend::start(FakeKind::Smtp).await;
    let yaml = config_yaml(
        &[&cert],
        &[
            listener_yaml("imaps", "imap", "implicit", imap.addr),
            listener_yaml("pop3s", "pop3", "implicit", pop3.addr),
            listener_yaml("submissions", "smtp", "implicit", smtp.addr),
        ],
        "",
    );
    let proxy = Proxy::start(&yaml, pki.dir.path()).await;
    let ca = pki.ca_path().display().to_string();
    let resolve = |name: &str| format!("mx.example.test:{}:127.0.0.1", proxy.addr(name).port());
    let curl = |args: Vec<String>| {
        tokio::task::spawn_blocking(move || {
            let out = Command::new("curl").args(&args).output().unwrap();
            (
                out.status.success(),
                String::from_utf8_lossy(&out.stdout).into_owned()
                    + &String::from_utf8_lossy(&out.stderr),
            )
        })
    };

    let url = format!(
        "imaps://mx.example.test:{}/INBOX;UID=1",
        proxy.addr("imaps").port()
    );
    let (ok, out) = curl(vec![
        "-sS".into(),
        "--max-time".into(),
        "10".into(),
        "--cacert".into(),
        ca.clone(),
        "--resolve".into(),
        resolve("imaps"),
        "-u".into(),
        "user:secret".into(),
        url,
    ])
    .await
    .unwrap();
    assert!(ok && out.contains("hello imap"), "imaps: {out}");

    let url = format!("pop3s://mx.example.test:{}/1", proxy.addr("pop3s").port());
    let (ok, out) = curl(vec![
        "-sS".into(),
        "--max-time".into(),
        "10".into(),
        "--cacert".into(),
        ca.clone(),
        "--resolve".into(),
        resolve("pop3s"),
        "-u".into(),
        "user:secret".into(),
        url,
    ])
    .await
    .unwrap();
    assert!(ok && out.contains("hello pop3"), "pop3s: {out}");

    let mail = pki.dir.path().join("mail.eml");
    std::fs::write(&mail, "Subject: curl test\r\n\r\nbody via curl\r\n").unwrap();
    let url = format!(
        "smtps://mx.example.test:{}",
        proxy.addr("submissions").port()
    );
    let (ok, out) = curl(vec![
        "-sS".into(),
        "--max-time".into(),
        "10".into(),
        "--cacert".into(),
        ca,
        "--resolve".into(),
        resolve("submissions"),
        "-u".into(),
        "user:secret".into(),
        "--mail-from".into(),
        "a@example.test".into(),
        "--mail-rcpt".into(),
        "b@example.test".into(),
        "-T".into(),
        mail.display().to_string(),
        url,
    ])
    .await
    .unwrap();
    assert!(ok, "smtps: {out}");
    assert!(smtp.recorder.all_text().contains("body via curl"));
}

fn mailfront_check(config: &str) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_mailfront"))
        .args(["check", "--config", config])
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn check_accepts_the_shipped_example_and_names_every_problem_in_a_broken_one() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/config.yaml.example");
    let (ok, out) = mailfront_check(example);
    assert!(ok, "{out}");
    assert!(out.contains("configuration OK"), "{out}");

    let pki = Pki::new();
    let cert = pki.issue("mx", &["mx.example.test"], false);
    let other = pki.issue("other", &["x.test"], false);
    let dir = pki.dir.path();
    let cases: Vec<(String, &str)> = vec![
        ("hostname: mx.example.test\nlisteners: []\ntypo: 1\n".into(), "typo"),
        (
            "hostname: mx.example.test\nlisteners:\n  - name: a\n    protocol: imap\n    listen: \"999.0.0.1:1\"\n    tls: implicit\n    backend: \"127.0.0.1:143\"\n".into(),
            "listeners[0].listen",
        ),
        (
            format!(
                "hostname: mx.example.test\ntls:\n  certificates:\n    - cert: {}/missing.pem\n      key: {}\nlisteners:\n  - name: a\n    protocol: imap\n    listen: \"127.0.0.1:0\"\n    tls: implicit\n    backend: \"127.0.0.1:143\"\n",
                dir.display(),
                cert.key.display()
            ),
            "tls.certificates[0].cert",
        ),
        (
            format!(
                "hostname: mx.example.test\ntls:\n  certificates:\n    - cert: {}\n      key: {}\nlisteners:\n  - name: a\n    protocol: imap\n    listen: \"127.0.0.1:0\"\n    tls: implicit\n    backend: \"127.0.0.1:143\"\n",
                cert.cert.display(),
                other.key.display()
            ),
            "does not belong",
        ),
        (
            {
                let garbage = dir.join("garbage.pem");
                std::fs::write(
                    &garbage,
                    "-----BEGIN CERTIFICATE-----\nZ2FyYmFnZQ==\n-----END CERTIFICATE-----\n",
                )
                .unwrap();
                format!(
                    "hostname: mx.example.test\ntls:\n  certificates:\n    - cert: {}\n      key: {}\nlisteners:\n  - name: a\n    protocol: imap\n    listen: \"127.0.0.1:0\"\n    tls: implicit\n    backend: \"127.0.0.1:143\"\n",
                    garbage.display(),
                    cert.key.display()
                )
            },
            "is not an X.509 certificate",
        ),
        (
            // A FIFO where the ticket key file belongs used to block `check` in open(2).
            {
                let fifo = dir.join("ticket.keys");
                assert!(
                    Command::new("mkfifo")
                        .arg(&fifo)
                        .status()
                        .unwrap()
                        .success()
                );
                format!(
                    "hostname: mx.example.test\ntls:\n  ticket_key_file: {}\nlisteners:\n  - name: a\n    protocol: imap\n    listen: \"127.0.0.1:0\"\n    tls: implicit\n    backend: \"127.0.0.1:143\"\n",
                    fifo.display()
                )
            },
            "is a FIFO, not a regular file",
        ),
    ];
    for (i, (yaml, expected)) in cases.iter().enumerate() {
        let path = dir.join(format!("bad{i}.yaml"));
        std::fs::write(&path, yaml).unwrap();
        let (ok, out) = mailfront_check(path.to_str().unwrap());
        assert!(!ok, "case {i} should fail");
        assert!(
            out.contains(expected),
            "case {i}: expected {expected:?} in {out}"
        );
    }
}

#[tokio::test]
async fn admin_endpoint_serves_metrics_health_and_readiness() {
    let OneListener {
        pki: _pki,
        cert,
        backend: _,
        proxy,
    } = one_listener(FakeKind::Echo, "e", "imap").await;
    let admin = proxy.admin.unwrap();
    let get = |path: &'static str| async move {
        let Ok(mut tcp) = tokio::net::TcpStream::connect(admin).await else {
            return String::new();
        };
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        if tcp.write_all(request.as_bytes()).await.is_err() {
            return String::new();
        }
        let mut out = String::new();
        let _ = tcp.read_to_string(&mut out).await;
        out
    };
    for _ in 0..50 {
        if get("/readyz").await.starts_with("HTTP/1.1 200") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(get("/readyz").await.starts_with("HTTP/1.1 200"));
    assert!(get("/healthz").await.starts_with("HTTP/1.1 200"));
    assert!(get("/nope").await.starts_with("HTTP/1.1 404"));
    let metrics = get("/metrics").await;
    assert!(metrics.contains("mailfront_build_info"), "{metrics}");
    // Labelled by certificate file: an ECDSA and an RSA certificate for one name differ.
    assert!(metrics.contains(&format!(
        "mailfront_certificate_not_after_timestamp_seconds{{certificate=\"{}\"}}",
        cert.cert.display()
    )));
    proxy.control.shutdown.cancel();
    // Readiness turns false as soon as shutdown begins.
    let mut turned = false;
    for _ in 0..50 {
        let r = tokio::time::timeout(Duration::from_secs(1), get("/readyz")).await;
        // 503 while draining, or nothing at all once the proxy has stopped.
        if matches!(r, Ok(ref s) if s.starts_with("HTTP/1.1 503") || s.is_empty()) || r.is_err() {
            turned = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(turned);
}

/// Connections a listener that never accepts lets complete: each connect that the kernel's
/// accept queue takes succeeds at once, and the first it has no room for times out (Linux
/// drops the SYN of a full queue). Stops at `most`.
async fn queued_connections(addr: std::net::SocketAddr, most: usize) -> usize {
    let mut held = Vec::new();
    while held.len() < most {
        match tokio::time::timeout(
            Duration::from_millis(300),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        {
            Ok(Ok(tcp)) => held.push(tcp),
            _ => break,
        }
    }
    held.len()
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn listen_backlog_reaches_every_listening_socket() {
    const BACKLOG: usize = 2;
    let mut listeners = listener_yaml(
        "imaps",
        "imap",
        "implicit",
        "127.0.0.1:143".parse().unwrap(),
    );
    // An IPv6 socket too, where the host has IPv6.
    if std::net::TcpListener::bind("[::1]:0").is_ok() {
        listeners += &listener_yaml("v6", "pop3", "implicit", "127.0.0.1:110".parse().unwrap())
            .replace("127.0.0.1:0", "[::1]:0");
    }
    let yaml = format!(
        "hostname: mx.example.test\nlisteners:\n{listeners}metrics:\n  listen: \"127.0.0.1:0\"\nlimits:\n  listen_backlog: {BACKLOG}\n"
    );
    let config = mailfront::config::Config::from_yaml(&yaml)
        .unwrap()
        .validate(std::path::Path::new("."))
        .unwrap();
    assert_eq!(config.listen_backlog, BACKLOG as u32);
    // Bound but never served: nothing accepts, so the queue fills.
    let bound = mailfront::server::bind(&config).await.unwrap();
    let mut addresses: Vec<_> = bound.addresses().into_iter().map(|(_, a)| a).collect();
    addresses.push(bound.admin_address().unwrap());
    for addr in addresses {
        // Linux queues backlog + 1; the old fixed 128 would take all ten.
        let queued = queued_connections(addr, 10).await;
        assert!(
            (BACKLOG..=BACKLOG + 1).contains(&queued),
            "{addr}: {queued} connections queued with a backlog of {BACKLOG}"
        );
    }
    drop(bound);
}

/// A client config trusting the test CA that offers only the signature schemes `keep` allows
/// (its `signature_algorithms` extension), and only the given TLS 1.2 suites if any.
fn client_with_schemes(
    ca: &rustls::pki_types::CertificateDer<'static>,
    versions: &[&'static rustls::SupportedProtocolVersion],
    keep: fn(rustls::SignatureScheme) -> bool,
    suites: Option<Vec<rustls::SupportedCipherSuite>>,
) -> std::sync::Arc<rustls::ClientConfig> {
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    if let Some(suites) = suites {
        provider.cipher_suites = suites;
    }
    let all = provider.signature_verification_algorithms;
    let mapping: Vec<_> = all
        .mapping
        .iter()
        .filter(|(scheme, _)| keep(*scheme))
        .copied()
        .collect();
    provider.signature_verification_algorithms = rustls::crypto::WebPkiSupportedAlgorithms {
        all: all.all,
        mapping: Box::leak(mapping.into_boxed_slice()),
    };
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    std::sync::Arc::new(
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(provider))
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

fn is_rsa(scheme: rustls::SignatureScheme) -> bool {
    format!("{scheme:?}").starts_with("RSA_")
}

fn is_ecdsa(scheme: rustls::SignatureScheme) -> bool {
    format!("{scheme:?}").starts_with("ECDSA_")
}

fn pem_leaf(path: &std::path::Path) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_file_iter(path)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .to_vec()
}

/// An ECDSA and an RSA certificate for one name, as nginx serves them: a client that can verify
/// only RSA signatures gets the RSA one, any other the ECDSA one, whichever is listed first; a
/// TLS 1.2 client with only ECDHE_RSA suites gets RSA whatever schemes it lists. Each has its
/// own expiry series, and a third certificate of a type the name already has is reported by
/// `check` as never served.
#[tokio::test]
async fn one_name_with_an_ecdsa_and_an_rsa_certificate_serves_each_client_the_one_it_can_use() {
    let pki = Pki::new();
    let rsa = pki.issue("rsa", &["mx.example.test"], true);
    let ecdsa = pki.issue("ecdsa", &["mx.example.test"], false);
    let backend = FakeBackend::start(FakeKind::Echo).await;
    // RSA listed first: ECDSA is still preferred for a client that can verify it.
    let yaml = config_yaml(
        &[&rsa, &ecdsa],
        &[listener_yaml("e", "imap", "implicit", backend.addr)],
        "",
    );
    let proxy = Proxy::start(&yaml, pki.dir.path()).await;
    let addr = proxy.addr("e");
    let rsa_leaf = pem_leaf(&rsa.cert);
    let ecdsa_leaf = pem_leaf(&ecdsa.cert);
    let tls12_rsa_suites: Vec<_> = rustls::crypto::aws_lc_rs::default_provider()
        .cipher_suites
        .into_iter()
        .filter(|s| format!("{:?}", s.suite()).starts_with("TLS_ECDHE_RSA_"))
        .collect();
    for versions in [vec![&rustls::version::TLS13], vec![&rustls::version::TLS12]] {
        for (keep, expected, what) in [
            (is_rsa as fn(_) -> bool, &rsa_leaf, "RSA-only"),
            (is_ecdsa, &ecdsa_leaf, "ECDSA-only"),
            (|_| true, &ecdsa_leaf, "any scheme"),
        ] {
            let config = client_with_schemes(&pki.ca_der, &versions, keep, None);
            let stream = tls_connect(addr, "mx.example.test", config)
                .await
                .unwrap_or_else(|e| panic!("{what} {versions:?}: {e}"));
            assert_eq!(&leaf_der(&stream), expected, "{what} {versions:?}");
        }
    }
    let config = client_with_schemes(
        &pki.ca_der,
        &[&rustls::version::TLS12],
        |_| true,
        Some(tls12_rsa_suites),
    );
    let stream = tls_connect(addr, "mx.example.test", config).await.unwrap();
    assert_eq!(
        leaf_der(&stream),
        rsa_leaf,
        "TLS 1.2 with ECDHE_RSA suites only"
    );

    let metrics = proxy.metrics.encode();
    for cert in [&rsa, &ecdsa] {
        assert!(
            metrics.contains(&format!(
                "mailfront_certificate_not_after_timestamp_seconds{{certificate=\"{}\"}}",
                cert.cert.display()
            )),
            "{metrics}"
        );
    }

    // `check`: fine as it is; a second RSA certificate for the name can never be served.
    let path = pki.dir.path().join("pair.yaml");
    std::fs::write(&path, &yaml).unwrap();
    let (ok, out) = mailfront_check(path.to_str().unwrap());
    assert!(ok && !out.contains("warning"), "{out}");
    let rsa2 = pki.issue("rsa2", &["mx.example.test"], true);
    let yaml = config_yaml(
        &[&rsa, &ecdsa, &rsa2],
        &[listener_yaml("e", "imap", "implicit", backend.addr)],
        "",
    );
    std::fs::write(&path, &yaml).unwrap();
    let (ok, out) = mailfront_check(path.to_str().unwrap());
    assert!(ok, "{out}");
    assert!(
        out.contains(&format!(
            "warning: certificate {} (RSA) is never served for mx.example.test",
            rsa2.cert.display()
        )),
        "{out}"
    );
    assert_eq!(out.matches("warning").count(), 1, "{out}");
    proxy.stop().await;
}

/// Runs `mailfront health ARGS` off the runtime; its exit status and output.
async fn mailfront_health(args: Vec<String>) -> (bool, String) {
    tokio::task::spawn_blocking(move || {
        let out = Command::new(env!("CARGO_BIN_EXE_mailfront"))
            .arg("health")
            .args(&args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    })
    .await
    .unwrap()
}

/// `mailfront health` (the image's HEALTHCHECK): 0 while /readyz says 200, found from the
/// config's metrics address or a URL; 1 once shutdown begins, and 1 with nothing listening.
#[tokio::test]
async fn health_subcommand_exits_0_only_while_the_proxy_is_ready() {
    let OneListener {
        pki,
        cert,
        backend,
        proxy,
    } = one_listener(FakeKind::Echo, "e", "imap").await;
    let admin = proxy.admin.unwrap();
    let url = format!("http://{admin}/readyz");
    let mut ready = false;
    for _ in 0..100 {
        if mailfront_health(vec!["--url".into(), url.clone()]).await.0 {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        ready,
        "{:?}",
        mailfront_health(vec!["--url".into(), url.clone()]).await
    );
    // The same, from a config whose metrics listen on every address: asked on loopback.
    let yaml = config_yaml(
        &[&cert],
        &[listener_yaml("e", "imap", "implicit", backend.addr)],
        "",
    )
    .replace(
        "metrics:\n  listen: \"127.0.0.1:0\"",
        &format!("metrics:\n  listen: \"0.0.0.0:{}\"", admin.port()),
    );
    let path = pki.dir.path().join("health.yaml");
    std::fs::write(&path, yaml).unwrap();
    let (ok, out) = mailfront_health(vec!["--config".into(), path.to_str().unwrap().into()]).await;
    assert!(ok, "{out}");
    assert!(out.contains("200"), "{out}");

    proxy.control.shutdown.cancel();
    let mut unhealthy = false;
    for _ in 0..100 {
        let (ok, _) = mailfront_health(vec!["--url".into(), url.clone()]).await;
        if !ok {
            unhealthy = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(unhealthy);
    // Nothing listening at all.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let (ok, out) =
        mailfront_health(vec!["--url".into(), format!("http://127.0.0.1:{port}")]).await;
    assert!(!ok);
    assert!(out.contains("cannot connect"), "{out}");
}

/// SIGTERM while a client on an implicit-TLS port has connected but sent no ClientHello: the
/// server's drain reaches the handshake, and the connection is closed, as every pre-login session
/// is, not at `tls.handshake_timeout` (set far past `TIMEOUT` here). That it is closed at once,
/// and counted as `shutdown`, is
/// `drivers::timing::a_graceful_shutdown_closes_a_connection_that_has_not_sent_its_client_hello_at_once`'s.
#[tokio::test]
async fn a_graceful_shutdown_closes_a_connection_that_has_not_sent_its_client_hello() {
    let pki = Pki::new();
    let cert = pki.issue("mx", &["mx.example.test"], false);
    let backend = FakeBackend::start(FakeKind::Echo).await;
    let yaml = config_yaml(
        &[&cert],
        &[listener_yaml("e", "imap", "implicit", backend.addr)],
        "",
    )
    .replace(
        "  reload_interval: 100ms\n",
        "  reload_interval: 100ms\n  handshake_timeout: 60s\n",
    );
    let proxy = Proxy::start(&yaml, pki.dir.path()).await;
    let mut tcp = tokio::net::TcpStream::connect(proxy.addr("e"))
        .await
        .unwrap();
    // Accepted, and waiting for the hello.
    eventually(|| {
        proxy
            .metrics
            .encode()
            .contains(r#"mailfront_connections_active{listener="e",protocol="imap"} 1"#)
    })
    .await;
    proxy.control.shutdown.cancel();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(TIMEOUT, tcp.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "still open {TIMEOUT:?} after shutdown began");
    assert!(rest.is_empty());
    assert!(backend.recorder.connections().is_empty());
}

/// A listener port already taken: the run fails naming the listener and the OS error once, not
/// "… (os error 98): Address already in use (os error 98)".
#[test]
fn a_port_in_use_is_reported_once() {
    let pki = Pki::new();
    let cert = pki.issue("mx", &["mx.example.test"], false);
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let yaml = config_yaml(
        &[&cert],
        &[listener_yaml("e", "imap", "implicit", addr)
            .replace("listen: \"127.0.0.1:0\"", &format!("listen: \"{addr}\""))],
        "",
    );
    let path = pki.dir.path().join("taken.yaml");
    std::fs::write(&path, yaml).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_mailfront"))
        .args(["--config", path.to_str().unwrap()])
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stderr.lines().last().unwrap();
    assert!(
        last.starts_with(&format!(
            "mailfront: listeners[0] (e): cannot listen on {addr}: "
        )),
        "{stderr}"
    );
    assert_eq!(last.matches("os error").count(), 1, "{last}");
}
