//! Tests of the router: the order lookup, map, affinity or pool; what each failure gives;
//! reloads of the settings and of the map file; the metrics.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::*;
use crate::config::Config;

/// A fake `auth_http` service answering every request with the headers `answer(user)` gives
/// for the request's `Auth-User`; counts requests.
async fn service(
    answer: impl Fn(&str) -> String + Send + Sync + 'static,
) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let answer = Arc::new(answer);
    let requests = count.clone();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let (answer, requests) = (answer.clone(), requests.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        let mut chunk = [0u8; 2048];
                        match tcp.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                    buf.drain(..end);
                    requests.fetch_add(1, Ordering::SeqCst);
                    let user = head
                        .lines()
                        .find_map(|l| l.strip_prefix("Auth-User: "))
                        .unwrap_or_default()
                        .to_owned();
                    let reply = format!(
                        "HTTP/1.1 200 OK\r\n{}Content-Length: 0\r\n\r\n",
                        answer(&user)
                    );
                    if tcp.write_all(reply.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, count)
}

/// The first listener of a config whose listener section ends with `extra`, paths relative to
/// `dir`.
fn listener(dir: &Path, extra: &str) -> ListenerConfig {
    let yaml = format!(
        "hostname: mx.example.test\nlisteners:\n  - name: imaps\n    protocol: imap\n    listen: \"127.0.0.1:0\"\n    tls: implicit\n    backend: [\"127.0.0.1:1143\", \"127.0.0.2:1143\"]\n{extra}"
    );
    Config::from_yaml(&yaml)
        .unwrap()
        .validate(dir)
        .unwrap()
        .listeners
        .remove(0)
}

fn new_router(l: &ListenerConfig) -> (Router, crate::metrics::Metrics) {
    let metrics = crate::metrics::Metrics::register(&prometheus::Registry::new()).unwrap();
    let router = Router::new(l, metrics.routing(l)).unwrap();
    (router, metrics)
}

fn login(user: &'static [u8]) -> RouteRequest<'static> {
    RouteRequest {
        protocol: Protocol::Imap,
        user,
        password: Some(b"pw"),
        method: "plain",
        attempt: 1,
        client: "192.0.2.7:52000".parse().unwrap(),
        tls: Some(("TLSv1.3", "TLS_AES_128_GCM_SHA256")),
        helo: None,
    }
}

fn fixed(list: &[&str], source: Source) -> Target {
    Target::Fixed {
        backends: list
            .iter()
            .map(|a| crate::config::parse_backend(a).unwrap())
            .collect(),
        source,
    }
}

#[tokio::test]
async fn without_user_keys_everyone_goes_to_the_pool() {
    let dir = tempfile::tempdir().unwrap();
    let l = listener(dir.path(), "");
    let (router, metrics) = new_router(&l);
    assert!(!router.needs_user());
    assert_eq!(router.route(&login(b"alice")).await.unwrap(), Target::Pool);
    // No series for a listener that routes nobody.
    assert!(!metrics.encode().contains("mailfront_user_routes_total{"));
}

#[tokio::test]
async fn lookup_then_map_then_affinity() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("users.yaml"),
        "carol@example.org: \"10.0.0.9:143\"\nlookedup@example.org: \"10.0.0.8:143\"\n\"@example.net\": [\"10.0.1.1:143\", \"10.0.1.2:143\"]\n",
    )
    .unwrap();
    let (service, requests) = service(|user| match user {
        "lookedup@example.org" => {
            "Auth-Status: OK\r\nAuth-Server: 127.0.0.2\r\nAuth-Port: 1143\r\n".into()
        }
        "mallory@example.org" => "Auth-Status: Go away\r\nAuth-Wait: 2\r\n".into(),
        "evil@example.org" => {
            "Auth-Status: OK\r\nAuth-Server: 203.0.113.5\r\nAuth-Port: 143\r\n".into()
        }
        "broken@example.org" => "X-Nothing: here\r\n".into(),
        _ => "Auth-Status: OK\r\n".into(),
    })
    .await;
    let l = listener(
        dir.path(),
        &format!(
            "    user_affinity: true\n    user_map: users.yaml\n    user_lookup:\n      url: \"http://{service}/auth\"\n"
        ),
    );
    let (router, metrics) = new_router(&l);
    assert!(router.needs_user());
    // The lookup's backend wins over the map's, and must be one of the listener's own.
    assert_eq!(
        router.route(&login(b"lookedup@example.org")).await.unwrap(),
        fixed(&["127.0.0.2:1143"], Source::Lookup)
    );
    // The lookup has no opinion: the map's name, then its domain.
    assert_eq!(
        router.route(&login(b"carol@example.org")).await.unwrap(),
        fixed(&["10.0.0.9:143"], Source::Map)
    );
    assert_eq!(
        router.route(&login(b"Dave@Example.NET")).await.unwrap(),
        fixed(&["10.0.1.1:143", "10.0.1.2:143"], Source::Map)
    );
    // Unmapped: affinity, by the lowercased name.
    assert_eq!(
        router.route(&login(b"Erin@Example.org")).await.unwrap(),
        Target::Affinity {
            key: "erin@example.org".into()
        }
    );
    // A refusal is the lookup's word: no map, no backend.
    assert_eq!(
        router
            .route(&login(b"mallory@example.org"))
            .await
            .unwrap_err(),
        RouteError::Refused {
            text: "Go away".into(),
            smtp_code: None,
            wait: Some(Duration::from_secs(2)),
        }
    );
    // A failed lookup is a temporary failure, never the map or the pool.
    for user in [&b"evil@example.org"[..], b"broken@example.org"] {
        let err = router
            .route(&RouteRequest { user, ..login(b"") })
            .await
            .unwrap_err();
        assert!(matches!(err, RouteError::Unavailable { .. }), "{err}");
    }
    assert_eq!(requests.load(Ordering::SeqCst), 7);
    let m = metrics.routing(&l);
    assert_eq!(m.routes(Source::Lookup, RouteResult::Ok), 1);
    assert_eq!(m.routes(Source::Map, RouteResult::Ok), 2);
    assert_eq!(m.routes(Source::Affinity, RouteResult::Ok), 1);
    assert_eq!(m.routes(Source::Lookup, RouteResult::Refused), 1);
    assert_eq!(m.routes(Source::Lookup, RouteResult::Disallowed), 1);
    assert_eq!(m.routes(Source::Lookup, RouteResult::Error), 1);
    assert_eq!(m.lookups(), 7);
    let text = metrics.encode();
    for line in [
        r#"mailfront_user_routes_total{listener="imaps",result="timeout",source="lookup"} 0"#,
        r#"mailfront_user_routes_total{listener="imaps",result="busy",source="lookup"} 0"#,
        r#"mailfront_user_map_reloads_total{listener="imaps",result="failure"} 0"#,
        r#"mailfront_user_lookup_duration_seconds_count{listener="imaps"} 7"#,
    ] {
        assert!(text.contains(line), "{line}\n{text}");
    }
    // Without affinity the pool takes the rest.
    let l = listener(dir.path(), "    user_map: users.yaml\n");
    let (router, metrics) = new_router(&l);
    assert_eq!(
        router.route(&login(b"erin@example.org")).await.unwrap(),
        Target::Pool
    );
    assert!(
        metrics.encode().contains(
            r#"mailfront_user_routes_total{listener="imaps",result="ok",source="pool"} 1"#
        )
    );
}

#[tokio::test]
async fn the_map_file_is_reloaded_on_change_and_a_bad_one_keeps_the_map() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("users.yaml");
    std::fs::write(&path, "alice@example.org: \"10.0.0.5:143\"\n").unwrap();
    let l = listener(dir.path(), "    user_map: users.yaml\n");
    let (router, metrics) = new_router(&l);
    let m = metrics.routing(&l);
    router.reload_files(false);
    assert_eq!((m.map_reloads(true), m.map_reloads(false)), (0, 0));
    std::fs::write(&path, "alice@example.org: \"10.0.0.6:143\"\n").unwrap();
    router.reload_files(false);
    assert_eq!(m.map_reloads(true), 1);
    assert_eq!(
        router.route(&login(b"alice@example.org")).await.unwrap(),
        fixed(&["10.0.0.6:143"], Source::Map)
    );
    std::fs::write(&path, "alice@example.org: 10.0.0.7\n").unwrap();
    router.reload_files(false);
    assert_eq!(m.map_reloads(false), 1);
    assert_eq!(
        router.route(&login(b"alice@example.org")).await.unwrap(),
        fixed(&["10.0.0.6:143"], Source::Map)
    );
    // Fixed back to what is in service: nothing to swap. SIGHUP reads it again anyway.
    std::fs::write(&path, "alice@example.org: \"10.0.0.6:143\"\n").unwrap();
    router.reload_files(false);
    assert_eq!(m.map_reloads(true), 1);
    router.reload_files(true);
    assert_eq!(m.map_reloads(true), 2);
}

#[tokio::test]
async fn a_reload_keeps_what_did_not_change_and_builds_what_did() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.yaml"), "alice: \"10.0.0.1:143\"\n").unwrap();
    std::fs::write(dir.path().join("b.yaml"), "alice: \"10.0.0.2:143\"\n").unwrap();
    let l = listener(dir.path(), "    user_map: a.yaml\n");
    let (router, _metrics) = new_router(&l);
    let before = router.user_map().unwrap();
    assert!(!router.update(&l).unwrap());
    let mut affinity = l.clone();
    affinity.routing.affinity = true;
    assert!(router.update(&affinity).unwrap());
    assert!(Arc::ptr_eq(&before, &router.user_map().unwrap()));
    let other = listener(dir.path(), "    user_map: b.yaml\n");
    assert!(router.update(&other).unwrap());
    assert_eq!(
        router.route(&login(b"alice")).await.unwrap(),
        fixed(&["10.0.0.2:143"], Source::Map)
    );
    // A map that cannot be read changes nothing.
    let missing = listener(dir.path(), "    user_map: missing.yaml\n");
    assert!(matches!(router.update(&missing), Err(RoutingError::Map(_))));
    assert!(check(&missing).is_err());
    assert!(check(&other).is_ok());
    assert_eq!(
        router.route(&login(b"alice")).await.unwrap(),
        fixed(&["10.0.0.2:143"], Source::Map)
    );
    // Off again: the pool for everyone.
    assert!(router.update(&listener(dir.path(), "")).unwrap());
    assert!(!router.needs_user());
    assert_eq!(router.route(&login(b"alice")).await.unwrap(), Target::Pool);
}
