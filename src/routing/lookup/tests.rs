//! Tests of the `auth_http` client against a fake service written here: a raw TCP listener on
//! 127.0.0.1 port 0 that records each request head as sent and answers from a script, so the
//! exact request bytes and keep-alive are visible.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::*;
use crate::cidr::Network;
use crate::config::{BackendAddress, Backends, LookupUrl, Protocol, UserLookup};

/// What the fake answers to its `n`th request (from 0): the whole response, or `None` to hold
/// the connection without answering.
type Script = Arc<dyn Fn(usize) -> Option<String> + Send + Sync>;

struct Fake {
    addr: SocketAddr,
    heads: Arc<Mutex<Vec<String>>>,
    connections: Arc<AtomicUsize>,
}

impl Fake {
    fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }
    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

async fn fake(script: impl Fn(usize) -> Option<String> + Send + Sync + 'static) -> Fake {
    fake_with(script, None).await
}

async fn fake_with(
    script: impl Fn(usize) -> Option<String> + Send + Sync + 'static,
    tls: Option<tokio_rustls::TlsAcceptor>,
) -> Fake {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let heads = Arc::new(Mutex::new(Vec::new()));
    let connections = Arc::new(AtomicUsize::new(0));
    let script: Script = Arc::new(script);
    let requests = Arc::new(AtomicUsize::new(0));
    {
        let heads = heads.clone();
        let connections = connections.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                connections.fetch_add(1, Ordering::SeqCst);
                let (heads, script, requests, tls) =
                    (heads.clone(), script.clone(), requests.clone(), tls.clone());
                tokio::spawn(async move {
                    match tls {
                        None => serve(tcp, heads, script, requests).await,
                        Some(acceptor) => {
                            if let Ok(stream) = acceptor.accept(tcp).await {
                                serve(stream, heads, script, requests).await;
                            }
                        }
                    }
                });
            }
        });
    }
    Fake {
        addr,
        heads,
        connections,
    }
}

/// One connection: heads read and answered in turn until the client closes.
async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    heads: Arc<Mutex<Vec<String>>>,
    script: Script,
    requests: Arc<AtomicUsize>,
) {
    let mut buf = Vec::new();
    loop {
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head: Vec<u8> = buf.drain(..end).collect();
        heads
            .lock()
            .unwrap()
            .push(String::from_utf8_lossy(&head).into_owned());
        let n = requests.fetch_add(1, Ordering::SeqCst);
        match script(n) {
            Some(answer) => {
                if stream.write_all(answer.as_bytes()).await.is_err() {
                    return;
                }
                // `Connection: close` says so; `X-Then-Close` closes a keep-alive connection
                // once answered, as a server timing out an idle connection does.
                if answer.contains("\r\nConnection: close\r\n")
                    || answer.contains("\r\nX-Then-Close:")
                {
                    let _ = stream.shutdown().await;
                    return;
                }
            }
            None => std::future::pending::<()>().await,
        }
    }
}

/// An `auth_http` answer with these headers and an empty body.
fn answer(headers: &str) -> String {
    format!("HTTP/1.1 200 OK\r\n{headers}Content-Length: 0\r\n\r\n")
}

fn ok_backend(server: &str, port: u16) -> String {
    answer(&format!(
        "Auth-Status: OK\r\nAuth-Server: {server}\r\nAuth-Port: {port}\r\n"
    ))
}

fn settings(fake: &Fake) -> UserLookup {
    UserLookup {
        url: LookupUrl::parse(&format!("http://{}/auth?v=1", fake.addr)).unwrap(),
        timeout: Duration::from_secs(5),
        send_password: false,
        allowed_backends: Some(vec![Network::parse("127.0.0.0/8").unwrap()]),
        max_concurrent: 4,
        ca_file: None,
        headers: Vec::new(),
    }
}

fn backends() -> Backends {
    Backends::single(BackendAddress {
        host: "127.0.0.1".into(),
        port: 143,
    })
}

fn request() -> RouteRequest<'static> {
    RouteRequest {
        protocol: Protocol::Imap,
        user: b"alice@example.org",
        password: Some(b"secret pw"),
        method: "plain",
        attempt: 1,
        client: "192.0.2.7:52000".parse().unwrap(),
        tls: Some(("TLSv1.3", "TLS_AES_128_GCM_SHA256")),
        helo: None,
    }
}

/// A request head's lines after the request line, as (lowercased name, value).
fn fields(head: &str) -> Vec<(String, String)> {
    head.lines()
        .skip(1)
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (name, value) = l.split_once(": ").unwrap();
            (name.to_ascii_lowercase(), value.to_owned())
        })
        .collect()
}

#[tokio::test]
async fn every_header_is_sent_as_nginx_sends_it() {
    let fake = fake(|_| Some(ok_backend("127.0.0.5", 2143))).await;
    let mut lookup = settings(&fake);
    lookup.send_password = true;
    lookup.headers = vec![("X-Auth-Key".into(), "s3cret".into())];
    let client = Lookup::new(&lookup, &backends()).unwrap();
    let r = RouteRequest {
        protocol: Protocol::Smtp,
        user: "Al ice%\"'@exämple.org".as_bytes(),
        password: Some(b"p@ss word%"),
        method: "plain",
        attempt: 2,
        client: "[2001:db8::7]:52000".parse().unwrap(),
        tls: Some(("TLSv1.3", "TLS_AES_128_GCM_SHA256")),
        helo: Some(b"client.example"),
    };
    let answer = client.query(&r).await.unwrap();
    assert_eq!(answer, Answer::Backend("127.0.0.5:2143".parse().unwrap()));
    let heads = fake.heads();
    assert_eq!(heads.len(), 1);
    assert!(
        heads[0].starts_with("GET /auth?v=1 HTTP/1.1\r\n"),
        "{}",
        heads[0]
    );
    let expected: Vec<(String, String)> = [
        ("host", fake.addr.to_string()),
        ("auth-method", "plain".into()),
        ("auth-user", "Al%20ice%25%22%27@ex%C3%A4mple.org".into()),
        ("auth-pass", "p@ss%20word%25".into()),
        ("auth-protocol", "smtp".into()),
        ("auth-login-attempt", "2".into()),
        ("client-ip", "2001:db8::7".into()),
        ("client-port", "52000".into()),
        ("auth-ssl", "on".into()),
        ("auth-ssl-protocol", "TLSv1.3".into()),
        ("auth-ssl-cipher", "TLS_AES_128_GCM_SHA256".into()),
        ("auth-smtp-helo", "client.example".into()),
        ("x-auth-key", "s3cret".into()),
    ]
    .into_iter()
    .map(|(n, v)| (n.to_owned(), v))
    .collect();
    assert_eq!(fields(&heads[0]), expected, "{}", heads[0]);
    // Title case, as nginx writes its names (but for the acronyms HTTP lets us not keep).
    assert!(heads[0].contains("\r\nAuth-User: "), "{}", heads[0]);
    assert!(heads[0].contains("\r\nClient-Ip: "), "{}", heads[0]);
}

#[tokio::test]
async fn without_send_password_the_password_stays_here_and_no_tls_no_helo_for_imap() {
    let fake = fake(|_| Some(ok_backend("127.0.0.1", 143))).await;
    let client = Lookup::new(&settings(&fake), &backends()).unwrap();
    let mut r = request();
    r.tls = None;
    r.helo = Some(b"ignored for imap");
    client.query(&r).await.unwrap();
    let head = &fake.heads()[0];
    let names: Vec<String> = fields(head).into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        names,
        [
            "host",
            "auth-method",
            "auth-user",
            "auth-protocol",
            "auth-login-attempt",
            "client-ip",
            "client-port"
        ],
        "{head}"
    );
    assert!(!head.contains("secret"), "{head}");
}

#[tokio::test]
async fn a_refusal_carries_its_text_auth_wait_and_for_smtp_the_error_code() {
    let fake = fake(|n| {
        Some(answer(match n {
            0 | 1 => {
                "Auth-Status: Invalid login or password\r\nAuth-Wait: 3\r\nAuth-Error-Code: 535 5.7.8\r\n"
            }
            2 => "Auth-Status: Account locked\r\nAuth-Wait: 0\r\nAuth-Error-Code: 250 ok\r\n",
            3 => "Auth-Status: \x01\r\nAuth-Wait: 99999\r\n",
            _ => "Auth-Status: Temporary server problem, try again later\r\nAuth-Error-Code: 451 4.3.0\r\n",
        }))
    })
    .await;
    let client = Lookup::new(&settings(&fake), &backends()).unwrap();
    let smtp = RouteRequest {
        protocol: Protocol::Smtp,
        ..request()
    };
    assert_eq!(
        client.query(&smtp).await.unwrap(),
        Answer::Refused {
            text: "Invalid login or password".into(),
            smtp_code: Some("535 5.7.8".into()),
            wait: Some(Duration::from_secs(3)),
        }
    );
    // Not SMTP: no reply code.
    assert_eq!(
        client.query(&request()).await.unwrap(),
        Answer::Refused {
            text: "Invalid login or password".into(),
            smtp_code: None,
            wait: Some(Duration::from_secs(3)),
        }
    );
    // Auth-Wait: 0 is nginx's "close now"; a code that is no failure is not used.
    assert_eq!(
        client.query(&smtp).await.unwrap(),
        Answer::Refused {
            text: "Account locked".into(),
            smtp_code: None,
            wait: None,
        }
    );
    // A control character in the text: not an answer (whether hyper or the parser says so).
    let err = client.query(&smtp).await.unwrap_err();
    assert!(
        matches!(err, LookupError::Http(_) | LookupError::Malformed(_)),
        "{err}"
    );
    assert_eq!(
        client.query(&smtp).await.unwrap(),
        Answer::Refused {
            text: "Temporary server problem, try again later".into(),
            smtp_code: Some("451 4.3.0".into()),
            wait: None,
        }
    );
}

#[tokio::test]
async fn refusal_texts_are_one_bounded_printable_line_and_waits_are_capped() {
    let long = "x".repeat(500);
    let headers = HeaderMap::from_iter([
        (
            HeaderName::from_static("auth-status"),
            HeaderValue::from_str(&format!("  {long}  ")).unwrap(),
        ),
        (
            HeaderName::from_static("auth-wait"),
            HeaderValue::from_static("100000"),
        ),
    ]);
    let Answer::Refused { text, wait, .. } =
        parse_answer(StatusCode::OK, &headers, Protocol::Pop3).unwrap()
    else {
        panic!("not a refusal");
    };
    assert_eq!(text.len(), MAX_TEXT);
    assert_eq!(wait, Some(MAX_AUTH_WAIT));
    let headers = HeaderMap::from_iter([(
        HeaderName::from_static("auth-status"),
        HeaderValue::from_bytes("Wrong password \u{e9}".as_bytes()).unwrap(),
    )]);
    assert!(matches!(
        parse_answer(StatusCode::OK, &headers, Protocol::Pop3),
        Err(LookupError::Malformed(_))
    ));
    for (code, ok) in [
        ("535 5.7.8", true),
        ("454 4.7.0", true),
        ("535", true),
        ("535 4.7.8", false),
        ("250 2.0.0", false),
        ("5355", false),
        ("535 5.7", false),
        ("535 5.7.8 extra", false),
        ("535 5.1234.8", false),
        ("", false),
    ] {
        assert_eq!(is_smtp_error_code(code), ok, "{code:?}");
    }
}

#[tokio::test]
async fn ok_without_a_server_is_no_opinion_and_half_a_server_is_malformed() {
    let fake = fake(|n| {
        Some(match n {
            0 => answer("Auth-Status: OK\r\n"),
            1 => answer("Auth-Status: OK\r\nAuth-Server: 127.0.0.1\r\n"),
            2 => answer("Auth-Status: OK\r\nAuth-Server: mail.example\r\nAuth-Port: 143\r\n"),
            3 => answer("Auth-Status: OK\r\nAuth-Server: 127.0.0.1\r\nAuth-Port: 0\r\n"),
            4 => answer("Auth-Wait: 1\r\n"),
            5 => answer("Auth-Status: WAIT\r\nAuth-Wait: 1\r\n"),
            6 => "HTTP/1.1 502 Bad Gateway\r\nAuth-Status: OK\r\nContent-Length: 0\r\n\r\n".into(),
            7 => answer("Auth-Status: OK\r\nAuth-Server: [::ffff:127.0.0.9]\r\nAuth-Port: 993\r\n"),
            _ => "garbage\r\n\r\n".into(),
        })
    })
    .await;
    let client = Lookup::new(&settings(&fake), &backends()).unwrap();
    assert_eq!(client.query(&request()).await.unwrap(), Answer::NoBackend);
    for _ in 0..5 {
        let err = client.query(&request()).await.unwrap_err();
        assert!(matches!(err, LookupError::Malformed(_)), "{err}");
        assert_eq!(err.result(), RouteResult::Error);
    }
    let err = client.query(&request()).await.unwrap_err();
    assert!(matches!(err, LookupError::Status(502)), "{err}");
    // A mapped IPv4 address is the IPv4 address (and is checked as such).
    assert_eq!(
        client.query(&request()).await.unwrap(),
        Answer::Backend("127.0.0.9:993".parse().unwrap())
    );
    assert!(matches!(
        client.query(&request()).await,
        Err(LookupError::Http(_))
    ));
}

#[tokio::test]
async fn an_auth_server_outside_the_allow_list_is_a_failure() {
    let fake = fake(|n| {
        Some(match n {
            0 => ok_backend("192.0.2.66", 143),
            1 => ok_backend("127.0.0.1", 143),
            2 => ok_backend("127.0.0.2", 143),
            3 => ok_backend("127.0.0.1", 993),
            _ => ok_backend("::1", 143),
        })
    })
    .await;
    let explicit = Lookup::new(&settings(&fake), &backends()).unwrap();
    let err = explicit.query(&request()).await.unwrap_err();
    assert!(
        matches!(err, LookupError::Disallowed(a) if a == "192.0.2.66:143".parse::<SocketAddr>().unwrap()),
        "{err}"
    );
    assert_eq!(err.result(), RouteResult::Disallowed);
    // By default: the listener's own backends' addresses, any port.
    let mut own = settings(&fake);
    own.allowed_backends = None;
    let default = Lookup::new(&own, &backends()).unwrap();
    assert_eq!(
        default.query(&request()).await.unwrap(),
        Answer::Backend("127.0.0.1:143".parse().unwrap())
    );
    assert!(matches!(
        default.query(&request()).await,
        Err(LookupError::Disallowed(_))
    ));
    assert_eq!(
        default.query(&request()).await.unwrap(),
        Answer::Backend("127.0.0.1:993".parse().unwrap())
    );
    // A backend name stands for what it resolves to.
    let named = Backends::single(BackendAddress {
        host: "localhost".into(),
        port: 143,
    });
    let by_name = Lookup::new(&own, &named).unwrap();
    let resolved: Vec<IpAddr> = tokio::net::lookup_host("localhost:143")
        .await
        .unwrap()
        .map(|a| a.ip())
        .collect();
    let result = by_name.query(&request()).await;
    if resolved.contains(&"::1".parse::<IpAddr>().unwrap()) {
        assert_eq!(
            result.unwrap(),
            Answer::Backend("[::1]:143".parse().unwrap())
        );
    } else {
        assert!(matches!(result, Err(LookupError::Disallowed(_))));
    }
}

#[tokio::test]
async fn two_lookups_share_one_keep_alive_connection() {
    let fake = fake(|_| Some(ok_backend("127.0.0.1", 143))).await;
    let client = Lookup::new(&settings(&fake), &backends()).unwrap();
    for _ in 0..3 {
        client.query(&request()).await.unwrap();
    }
    assert_eq!(fake.heads().len(), 3);
    assert_eq!(fake.connections(), 1);
}

#[tokio::test]
async fn a_connection_the_service_closes_is_replaced() {
    // HTTP/1.0 without keep-alive, as nginx-era scripts answer: one connection each.
    let fake = fake(|_| {
        Some("HTTP/1.0 200 OK\r\nAuth-Status: OK\r\nAuth-Server: 127.0.0.1\r\nAuth-Port: 143\r\nConnection: close\r\n\r\n".into())
    })
    .await;
    let client = Lookup::new(&settings(&fake), &backends()).unwrap();
    for _ in 0..2 {
        assert_eq!(
            client.query(&request()).await.unwrap(),
            Answer::Backend("127.0.0.1:143".parse().unwrap())
        );
    }
    assert_eq!(fake.connections(), 2);
}

#[tokio::test]
async fn an_idle_connection_the_service_closed_is_not_reused() {
    let fake = fake(|_| {
        Some(answer(
            "Auth-Status: OK\r\nAuth-Server: 127.0.0.1\r\nAuth-Port: 143\r\nX-Then-Close: 1\r\n",
        ))
    })
    .await;
    let client = Lookup::new(&settings(&fake), &backends()).unwrap();
    for _ in 0..3 {
        assert_eq!(
            client.query(&request()).await.unwrap(),
            Answer::Backend("127.0.0.1:143".parse().unwrap())
        );
        // Time for the connection's driver to see the close.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(fake.heads().len(), 3);
    assert_eq!(fake.connections(), 3);
}

#[tokio::test]
async fn the_body_is_ignored_and_a_long_one_closes_the_connection() {
    let body = "b".repeat(MAX_BODY + 1);
    let fake = fake(move |_| {
        Some(format!(
            "HTTP/1.1 200 OK\r\nAuth-Status: OK\r\nAuth-Server: 127.0.0.1\r\nAuth-Port: 143\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ))
    })
    .await;
    let client = Lookup::new(&settings(&fake), &backends()).unwrap();
    for _ in 0..2 {
        assert_eq!(
            client.query(&request()).await.unwrap(),
            Answer::Backend("127.0.0.1:143".parse().unwrap())
        );
    }
    assert_eq!(fake.connections(), 2);
}

#[tokio::test]
async fn a_head_past_the_bound_is_refused() {
    let filler = format!("X-Filler: {}\r\n", "f".repeat(1000));
    let fake =
        fake(move |_| Some(answer(&format!("Auth-Status: OK\r\n{}", filler.repeat(20))))).await;
    let client = Lookup::new(&settings(&fake), &backends()).unwrap();
    let err = client.query(&request()).await.unwrap_err();
    assert!(matches!(err, LookupError::Http(_)), "{err}");
}

#[tokio::test]
async fn an_unreachable_service_is_an_error() {
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    let mut lookup = settings(&Fake {
        addr,
        heads: Default::default(),
        connections: Default::default(),
    });
    lookup.timeout = Duration::from_secs(2);
    let client = Lookup::new(&lookup, &backends()).unwrap();
    let err = client.query(&request()).await.unwrap_err();
    assert!(matches!(err, LookupError::Connect { .. }), "{err}");
    assert_eq!(err.result(), RouteResult::Error);
}

#[tokio::test(start_paused = true)]
async fn a_silent_service_times_out() {
    let fake = fake(|_| None).await;
    let client = Lookup::new(&settings(&fake), &backends()).unwrap();
    let started = Instant::now();
    let err = client.query(&request()).await.unwrap_err();
    assert!(matches!(err, LookupError::Timeout(_)), "{err}");
    assert_eq!(err.result(), RouteResult::Timeout);
    assert!(started.elapsed() >= Duration::from_secs(5));
}

#[tokio::test(start_paused = true)]
async fn past_max_concurrent_a_lookup_waits_then_is_busy() {
    let fake = fake(|_| Some(ok_backend("127.0.0.1", 143))).await;
    let client = Lookup::new(&settings(&fake), &backends()).unwrap();
    // Every slot taken for longer than the timeout.
    let held = client.permits.acquire_many(4).await.unwrap();
    let started = Instant::now();
    let err = client.query(&request()).await.unwrap_err();
    assert!(matches!(err, LookupError::Busy(4)), "{err}");
    assert_eq!(err.result(), RouteResult::Busy);
    assert!(started.elapsed() >= Duration::from_secs(5));
    assert!(fake.heads().is_empty());
    drop(held);
    assert_eq!(client.permits.available_permits(), 4);
}

#[tokio::test]
async fn https_is_verified_against_ca_file() {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.clone().self_signed(&ca_key).unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);
    let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &issuer)
        .unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let fake = fake_with(|_| Some(ok_backend("127.0.0.1", 143)), Some(acceptor)).await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let mut lookup = settings(&fake);
    lookup.url = LookupUrl::parse(&format!("https://{}/auth", fake.addr)).unwrap();
    lookup.ca_file = Some(ca_file.clone());
    let client = Lookup::new(&lookup, &backends()).unwrap();
    for _ in 0..2 {
        assert_eq!(
            client.query(&request()).await.unwrap(),
            Answer::Backend("127.0.0.1:143".parse().unwrap())
        );
    }
    assert_eq!(fake.connections(), 1);
    assert!(!client.reload_ca().unwrap());
    // Another CA: the service's certificate no longer verifies for new connections.
    let other_key = rcgen::KeyPair::generate().unwrap();
    let other = ca_params.self_signed(&other_key).unwrap();
    std::fs::write(&ca_file, other.pem()).unwrap();
    assert!(client.reload_ca().unwrap());
    client.lock_idle().clear();
    let err = client.query(&request()).await.unwrap_err();
    assert!(
        matches!(&err, LookupError::Connect { detail, .. } if detail.starts_with("TLS")),
        "{err}"
    );
    // A missing bundle is named at setup.
    lookup.ca_file = Some(dir.path().join("missing.pem"));
    let err = Lookup::new(&lookup, &backends()).unwrap_err().to_string();
    assert!(err.starts_with("user_lookup.ca_file "), "{err}");
}

#[test]
fn logins_and_passwords_are_escaped_as_nginx_escapes_them() {
    assert_eq!(escape(b"alice@example.org"), "alice@example.org");
    assert_eq!(escape(b"a b%c\"d'e"), "a%20b%25c%22d%27e");
    assert_eq!(escape(b"\r\n\t\x00\x7f\xff"), "%0D%0A%09%00%7F%FF");
    assert_eq!(escape(b"+/=?&;:~!#"), "+/=?&;:~!#");
    assert_eq!(method_name("PLAIN"), "plain");
    assert_eq!(method_name("LOGIN"), "plain");
    assert_eq!(method_name("CRAM-MD5"), "cram-md5");
    assert_eq!(method_name("apop"), "apop");
    assert_eq!(method_name("EXTERNAL"), "external");
    assert_eq!(method_name("XOAUTH2"), "xoauth2");
}
