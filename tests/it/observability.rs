//! Metrics and logs as an operator reads them: handshake counters by version and IANA cipher,
//! cleartext refusals, readiness, JSON logs that carry the cipher but never a secret, close
//! reasons with the side they happened on, and per-protocol families only where they can move.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common::*;
use base64::prelude::{BASE64_STANDARD, Engine as _};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};

async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = String::new();
    tcp.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test]
async fn handshake_counters_carry_exact_versions_and_iana_ciphers_and_cleartext_auth_is_counted() {
    let pki = Pki::new();
    let cert = pki.issue("mx", &["mx.example.test"], false);
    let imap = FakeBackend::start(FakeKind::Imap).await;
    let smtp = FakeBackend::start(FakeKind::Smtp).await;
    let yaml = config_yaml(
        &[&cert],
        &[
            listener_yaml("imaps", "imap", "implicit", imap.addr),
            listener_yaml("submission", "smtp", "starttls", smtp.addr),
        ],
        "",
    );
    let proxy = Proxy::start(&yaml, pki.dir.path()).await;
    let admin = proxy.admin.unwrap();

    // Two TLS 1.3 sessions with CHACHA20, three TLS 1.2 sessions with ECDHE-ECDSA AES-128-GCM.
    use rustls::crypto::aws_lc_rs::cipher_suite as cs;
    for _ in 0..2 {
        let config = client_config(
            &pki.ca_der,
            &[&rustls::version::TLS13],
            Some(vec![cs::TLS13_CHACHA20_POLY1305_SHA256]),
        );
        let tls = tls_connect(proxy.addr("imaps"), "mx.example.test", config)
            .await
            .unwrap();
        let mut tls = BufReader::new(tls);
        assert!(read_line(&mut tls).await.starts_with("* OK"));
    }
    for _ in 0..3 {
        let config = client_config(
            &pki.ca_der,
            &[&rustls::version::TLS12],
            Some(vec![cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256]),
        );
        let tls = tls_connect(proxy.addr("imaps"), "mx.example.test", config)
            .await
            .unwrap();
        let mut tls = BufReader::new(tls);
        assert!(read_line(&mut tls).await.starts_with("* OK"));
    }

    // A cleartext AUTH on the STARTTLS submission listener is refused and counted.
    let tcp = tokio::net::TcpStream::connect(proxy.addr("submission"))
        .await
        .unwrap();
    let mut plain = BufReader::new(tcp);
    assert!(read_smtp_reply(&mut plain).await.starts_with("220"));
    plain
        .get_mut()
        .write_all(b"EHLO client.example\r\n")
        .await
        .unwrap();
    read_smtp_reply(&mut plain).await;
    plain
        .get_mut()
        .write_all(b"AUTH PLAIN AHVzZXIAc2VjcmV0\r\n")
        .await
        .unwrap();
    assert!(read_smtp_reply(&mut plain).await.starts_with("530 5.7.0"));

    let ready = http_get(admin, "/readyz").await;
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
    let metrics = http_get(admin, "/metrics").await;
    let handshakes: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("mailfront_tls_handshakes_total{"))
        .collect();
    assert_eq!(
        handshakes.len(),
        2,
        "exactly two version/cipher series: {handshakes:#?}"
    );
    assert!(
        handshakes
            .iter()
            .any(|l| l.contains(r#"cipher="TLS_CHACHA20_POLY1305_SHA256""#)
                && l.contains(r#"version="TLSv1.3""#)
                && l.ends_with(" 2")),
        "{handshakes:#?}"
    );
    assert!(
        handshakes.iter().any(|l| l
            .contains(r#"cipher="TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256""#)
            && l.contains(r#"version="TLSv1.2""#)
            && l.ends_with(" 3")),
        "{handshakes:#?}"
    );
    assert!(
        metrics.contains(
            r#"mailfront_cleartext_auth_refused_total{listener="submission",protocol="smtp"} 1"#
        ),
        "{metrics}"
    );
    assert!(
        !smtp.recorder.all_text().contains("AUTH"),
        "the backend never saw the AUTH"
    );
}

#[tokio::test]
async fn json_log_of_an_authenticated_session_carries_the_cipher_and_no_secret() {
    const PASSWORD: &str = "correct-horse-battery-staple-7781";
    let pki = Pki::new();
    let cert = pki.issue("mx", &["mx.example.test"], false);
    let imap = FakeBackend::start_with(
        FakeKind::Imap,
        FakeOptions {
            password: PASSWORD.into(),
            ..FakeOptions::default()
        },
    )
    .await;
    let yaml = config_yaml(
        &[&cert],
        &[listener_yaml("imaps", "imap", "implicit", imap.addr)],
        "log:\n  format: json\n  level: trace,hyper=info,rustls=info\n",
    );
    let path = pki.dir.path().join("config.yaml");
    std::fs::write(&path, yaml).unwrap();
    let mut binary = Binary::start(&path);
    let listening = binary.wait_for(&["listening", "imaps"]);
    let address: std::net::SocketAddr = json_field(&listening, "address").unwrap().parse().unwrap();

    let tls = tls_connect(
        address,
        "mx.example.test",
        client_config(&pki.ca_der, &[&rustls::version::TLS13], None),
    )
    .await
    .unwrap();
    let cipher = mailfront::tls::names::cipher_suite_name(u16::from(
        tls.get_ref().1.negotiated_cipher_suite().unwrap().suite(),
    ))
    .into_owned();
    let mut tls = BufReader::new(tls);
    read_line(&mut tls).await;
    tls.get_mut()
        .write_all(format!("a1 LOGIN alice \"{PASSWORD}\"\r\n").as_bytes())
        .await
        .unwrap();
    assert!(read_until_tag(&mut tls, "a1").await.contains("a1 OK"));
    let plain = BASE64_STANDARD.encode(format!("\0alice\0{PASSWORD}").as_bytes());
    tls.get_mut().write_all(b"a2 LOGOUT\r\n").await.unwrap();
    read_until_tag(&mut tls, "a2").await;
    drop(tls);
    binary.wait_for(&["session closed", "imaps"]);
    let lines = binary.stop();

    let established = lines
        .iter()
        .find(|l| l.contains("tls established"))
        .expect("a TLS event");
    assert_eq!(
        json_field(established, "cipher").as_deref(),
        Some(cipher.as_str())
    );
    let closed = lines.iter().find(|l| l.contains("session closed")).unwrap();
    assert_eq!(
        json_field(closed, "cipher").as_deref(),
        Some(cipher.as_str())
    );
    // Which backend served it, and the session's id (the IMAP ID `x-session-id` where
    // `backend_client_info` sends one).
    let backend = imap.addr.to_string();
    assert_eq!(
        json_field(closed, "backend").as_deref(),
        Some(backend.as_str())
    );
    // The LOGIN's user name, never the password.
    assert_eq!(json_field(closed, "user").as_deref(), Some("alice"));
    let id = json_field(closed, "session_id").unwrap();
    assert_eq!(id.len(), 16, "{closed}");
    assert!(id.chars().all(|c| c.is_ascii_alphanumeric()), "{closed}");
    let auth = lines
        .iter()
        .find(|l| json_field(l, "message").is_some_and(|m| m.to_ascii_lowercase().contains("auth")))
        .unwrap_or_else(|| panic!("an authentication event in:\n{}", lines.join("\n")));
    assert_eq!(
        json_field(auth, "cipher").as_deref(),
        Some(cipher.as_str()),
        "{auth}"
    );
    for line in &lines {
        assert!(
            serde_json::from_str::<serde_json::Value>(line).is_ok_and(|v| v.is_object()),
            "every line is a JSON object: {line}"
        );
        assert!(!line.contains(PASSWORD), "password leaked: {line}");
        assert!(!line.contains(&plain), "SASL payload leaked: {line}");
        assert_eq!(duplicate_keys(line), Vec::<String>::new(), "{line}");
    }
}

#[tokio::test]
async fn json_log_of_an_accepted_message_has_no_key_twice() {
    // The helper itself: serde_json would keep the second `a` silently.
    assert_eq!(
        duplicate_keys(r#"{"a":1,"b":{"c":1,"c":2},"a":3}"#),
        ["c", "a"]
    );
    assert!(duplicate_keys(r#"{"a":[{"b":1},{"b":2}]}"#).is_empty());

    let pki = Pki::new();
    let cert = pki.issue("mx", &["mx.example.test"], false);
    let smtp = FakeBackend::start(FakeKind::Smtp).await;
    let yaml = config_yaml(
        &[&cert],
        &[listener_yaml("submissions", "smtp", "implicit", smtp.addr)],
        "log:\n  format: json\n  level: info\n",
    );
    let path = pki.dir.path().join("config.yaml");
    std::fs::write(&path, yaml).unwrap();
    let mut binary = Binary::start(&path);
    let address = binary.address("submissions");

    let tls = tls_connect(
        address,
        "mx.example.test",
        client_config(&pki.ca_der, &[&rustls::version::TLS13], None),
    )
    .await
    .unwrap();
    let mut tls = BufReader::new(tls);
    let plain = BASE64_STANDARD.encode(b"\0alice\0secret");
    assert!(read_smtp_reply(&mut tls).await.starts_with("220"));
    for (command, code) in [
        ("EHLO client.example.test".to_owned(), "250"),
        (format!("AUTH PLAIN {plain}"), "235"),
        ("MAIL FROM:<a@example.test>".to_owned(), "250"),
        ("RCPT TO:<b@example.test>".to_owned(), "250"),
        ("DATA".to_owned(), "354"),
        ("Subject: t\r\n\r\nhello\r\n.".to_owned(), "250"),
        ("QUIT".to_owned(), "221"),
    ] {
        tls.get_mut()
            .write_all(format!("{command}\r\n").as_bytes())
            .await
            .unwrap();
        let reply = read_smtp_reply(&mut tls).await;
        assert!(reply.starts_with(code), "{command}: {reply}");
    }
    drop(tls);
    let accepted = binary.wait_for(&["message accepted"]);
    assert_eq!(
        json_field(&accepted, "message").as_deref(),
        Some("message accepted")
    );
    assert_eq!(
        json_field(&accepted, "message_number").as_deref(),
        Some("1")
    );
    binary.wait_for(&["session closed", "submissions"]);
    for line in binary.stop() {
        assert_eq!(duplicate_keys(&line), Vec::<String>::new(), "{line}");
    }
}

/// Logs in on an implicit-TLS IMAP listener and returns the stream, now in the relay.
async fn imap_logged_in(
    addr: std::net::SocketAddr,
    pki: &Pki,
) -> BufReader<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tls = tls_connect(
        addr,
        "mx.example.test",
        client_config(&pki.ca_der, &[&rustls::version::TLS13], None),
    )
    .await
    .unwrap();
    let mut tls = BufReader::new(tls);
    assert!(read_line(&mut tls).await.starts_with("* OK"));
    tls.get_mut()
        .write_all(b"a1 LOGIN alice secret\r\n")
        .await
        .unwrap();
    assert!(read_until_tag(&mut tls, "a1").await.contains("a1 OK"));
    tls
}

/// Ends a client's TLS session the way most mail clients do after LOGOUT or QUIT: the TCP
/// socket closes and no close_notify is ever sent.
fn drop_without_close_notify(
    tls: BufReader<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
) {
    let (tcp, _) = tls.into_inner().into_inner();
    drop(tcp);
}

#[tokio::test]
async fn a_client_that_drops_tcp_without_close_notify_after_its_goodbye_is_logged_as_a_client_close()
 {
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
        "log:\n  format: json\n  level: info\n",
    );
    let path = pki.dir.path().join("config.yaml");
    std::fs::write(&path, yaml).unwrap();
    let mut binary = Binary::start(&path);
    let mut address = |name: &str| -> std::net::SocketAddr {
        let line = binary.wait_for(&["listening", &format!("\"{name}\"")]);
        json_field(&line, "address").unwrap().parse().unwrap()
    };
    let (imaps, pop3s, submissions) = (address("imaps"), address("pop3s"), address("submissions"));
    let config = || client_config(&pki.ca_der, &[&rustls::version::TLS13], None);

    // IMAP: LOGOUT in the relay after login; the backend says BYE and closes.
    let mut tls = imap_logged_in(imaps, &pki).await;
    tls.get_mut().write_all(b"a2 LOGOUT\r\n").await.unwrap();
    assert!(read_until_tag(&mut tls, "a2").await.contains("a2 OK"));
    drop_without_close_notify(tls);

    // POP3: QUIT after login.
    let mut tls = BufReader::new(
        tls_connect(pop3s, "mx.example.test", config())
            .await
            .unwrap(),
    );
    assert!(read_line(&mut tls).await.starts_with("+OK"));
    tls.get_mut()
        .write_all(b"USER alice\r\nPASS secret\r\n")
        .await
        .unwrap();
    assert!(read_line(&mut tls).await.starts_with("+OK"));
    assert!(read_line(&mut tls).await.starts_with("+OK"));
    tls.get_mut().write_all(b"QUIT\r\n").await.unwrap();
    assert!(read_line(&mut tls).await.starts_with("+OK"));
    drop_without_close_notify(tls);

    // SMTP: QUIT.
    let mut tls = BufReader::new(
        tls_connect(submissions, "mx.example.test", config())
            .await
            .unwrap(),
    );
    assert!(read_smtp_reply(&mut tls).await.starts_with("220"));
    tls.get_mut().write_all(b"QUIT\r\n").await.unwrap();
    assert!(read_smtp_reply(&mut tls).await.starts_with("221"));
    drop_without_close_notify(tls);

    for listener in ["imaps", "pop3s", "submissions"] {
        let closed = binary.wait_for(&["session closed", &format!("\"{listener}\"")]);
        assert_eq!(
            json_field(&closed, "reason").as_deref(),
            Some("client_closed"),
            "{closed}"
        );
        assert_eq!(
            json_field(&closed, "side").as_deref(),
            Some("client"),
            "{closed}"
        );
        assert_eq!(
            json_field(&closed, "detail").as_deref(),
            Some(""),
            "{closed}"
        );
    }
    binary.stop();
}

/// An IMAP backend that accepts any LOGIN, then resets the connection (TCP RST) at the first
/// command after it.
async fn resetting_imap_backend() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut tcp = BufReader::new(tcp);
                tcp.get_mut()
                    .write_all(b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] ready\r\n")
                    .await
                    .unwrap();
                let mut logged_in = false;
                loop {
                    let line = read_line(&mut tcp).await;
                    if line.is_empty() {
                        return;
                    }
                    if logged_in {
                        tcp.get_ref().set_zero_linger().unwrap();
                        return;
                    }
                    let tag = line.split(' ').next().unwrap_or("*").to_owned();
                    logged_in = line.to_ascii_uppercase().contains(" LOGIN ");
                    tcp.get_mut()
                        .write_all(format!("{tag} OK done\r\n").as_bytes())
                        .await
                        .unwrap();
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn the_close_counter_names_the_side_that_reset_the_relay() {
    let pki = Pki::new();
    let cert = pki.issue("mx", &["mx.example.test"], false);
    let imap = FakeBackend::start(FakeKind::Imap).await;
    let resetting = resetting_imap_backend().await;
    let yaml = config_yaml(
        &[&cert],
        &[
            listener_yaml("client-resets", "imap", "implicit", imap.addr),
            listener_yaml("backend-resets", "imap", "implicit", resetting),
        ],
        "",
    );
    let proxy = Proxy::start(&yaml, pki.dir.path()).await;
    let series = |listener: &str, reason: &str, side: &str| {
        format!(
            r#"mailfront_sessions_closed_total{{listener="{listener}",protocol="imap",reason="{reason}",side="{side}"}} "#
        )
    };
    let count = |needle: &str| -> Option<u64> {
        proxy
            .metrics
            .encode()
            .lines()
            .find_map(|l| l.strip_prefix(needle))
            .and_then(|n| n.parse().ok())
    };

    // The client resets its TCP connection in the relay.
    let tls = imap_logged_in(proxy.addr("client-resets"), &pki).await;
    let (tcp, _) = tls.into_inner().into_inner();
    tcp.set_zero_linger().unwrap();
    drop(tcp);
    let client_io = series("client-resets", "io_error", "client");
    eventually(|| count(&client_io) == Some(1)).await;
    assert_eq!(
        count(&series("client-resets", "io_error", "backend")),
        Some(0)
    );

    // The backend resets at the first command relayed after login.
    let mut tls = imap_logged_in(proxy.addr("backend-resets"), &pki).await;
    tls.get_mut().write_all(b"a2 NOOP\r\n").await.unwrap();
    let backend_io = series("backend-resets", "io_error", "backend");
    eventually(|| count(&backend_io) == Some(1)).await;
    assert_eq!(
        count(&series("backend-resets", "io_error", "client")),
        Some(0)
    );
    assert_eq!(
        count(&series("backend-resets", "client_closed", "client")),
        Some(0)
    );
}

#[tokio::test]
async fn per_protocol_counters_are_exported_only_for_listeners_of_their_protocol() {
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
    // Listener handles are created as the server starts, in its own task.
    eventually(|| {
        let text = proxy.metrics.encode();
        ["imaps", "pop3s", "submissions"].iter().all(|name| {
            text.contains(&format!(
                r#"mailfront_sessions_closed_total{{listener="{name}","#
            ))
        })
    })
    .await;
    let text = proxy.metrics.encode();
    let listeners_of = |family: &str| -> Vec<&str> {
        let mut names: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with(&format!("{family}{{")))
            .filter_map(|l| l.split("listener=\"").nth(1)?.split('"').next())
            .collect();
        names.dedup();
        names
    };
    assert_eq!(
        listeners_of("mailfront_imap_id_tls_fields_added_total"),
        ["imaps"]
    );
    assert_eq!(
        listeners_of("mailfront_received_fields_added_total"),
        ["submissions"]
    );
    assert_eq!(
        listeners_of("mailfront_messages_submitted_total"),
        ["submissions"]
    );
    // Families every listener can move stay on every listener.
    let mut closed = listeners_of("mailfront_sessions_closed_total");
    closed.sort_unstable();
    closed.dedup();
    assert_eq!(closed, ["imaps", "pop3s", "submissions"]);
}

/// A handshake record holding a Finished where the ClientHello belongs: rustls refuses it and
/// logs a warning of its own ("Received a Finished handshake message while expecting …").
const OUT_OF_PLACE_HANDSHAKE: &[u8] = b"\x16\x03\x01\x00\x08\x14\x00\x00\x04\x00\x00\x00\x00";

/// Runs the binary with `level`, sends `count` bad handshakes to an implicit-TLS listener, and
/// returns its log lines and the handshake failures counted with reason `other`.
async fn bad_handshakes(level: &str, count: usize) -> (Vec<String>, String) {
    let pki = Pki::new();
    let cert = pki.issue("mx", &["mx.example.test"], false);
    let imap = FakeBackend::start(FakeKind::Imap).await;
    let yaml = config_yaml(
        &[&cert],
        &[listener_yaml("imaps", "imap", "implicit", imap.addr)],
        &format!("log:\n  format: json\n  level: \"{level}\"\n"),
    );
    let path = pki.dir.path().join("config.yaml");
    std::fs::write(&path, yaml).unwrap();
    let mut binary = Binary::start(&path);
    let admin: std::net::SocketAddr =
        json_field(&binary.wait_for(&["metrics endpoint listening"]), "address")
            .unwrap()
            .parse()
            .unwrap();
    let address = binary.address("imaps");
    for _ in 0..count {
        let mut tcp = tokio::net::TcpStream::connect(address).await.unwrap();
        tcp.write_all(OUT_OF_PLACE_HANDSHAKE).await.unwrap();
        // The alert, then the close.
        let mut rest = Vec::new();
        let _ = tcp.read_to_end(&mut rest).await;
    }
    for _ in 0..count {
        binary.wait_for(&["session closed", "imaps"]);
    }
    let metrics = http_get(admin, "/metrics").await;
    let failures = metrics
        .lines()
        .find(|l| {
            l.starts_with("mailfront_tls_handshake_failures_total{")
                && l.contains("reason=\"other\"")
        })
        .unwrap_or_default()
        .to_owned();
    (binary.stop(), failures)
}

#[tokio::test]
async fn rustls_warnings_a_client_can_provoke_are_counted_not_logged_at_info() {
    let (lines, failures) = bad_handshakes("info", 3).await;
    assert!(failures.ends_with(" 3"), "{failures}");
    let from_rustls: Vec<_> = lines.iter().filter(|l| l.contains("rustls::")).collect();
    assert!(from_rustls.is_empty(), "{from_rustls:#?}");

    // The same lines are there when the filter asks for them: the check above can fail.
    let (lines, _) = bad_handshakes("info,rustls=warn", 1).await;
    assert!(
        lines
            .iter()
            .any(|l| l.contains("rustls::") && l.contains("WARN")),
        "{}",
        lines.join("\n")
    );
}
