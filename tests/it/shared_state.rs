//! `shared_state`: several mailfront replicas counting the per-address limits in one real
//! `redis-server` (started here on a free loopback port). Failures spread over replicas add up to
//! one `auth_failures_per_ip` budget; unauthenticated sessions spread over them add up to one
//! `connections_per_ip`; a slot freed on one is usable on another at once; a replica killed with
//! SIGKILL frees its slots when its lease runs out; with the store down every replica counts
//! alone (fails open, and says so in metrics), and counts in the store again once it returns.
// Helpers outside #[test] functions: clippy's allow-*-in-tests does not reach them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::time::Duration;

use crate::common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const HOST: &str = "mx.example.test";

type Tls = BufReader<tokio_rustls::client::TlsStream<TcpStream>>;

/// Replicas in front of one fake IMAP backend, sharing one Redis.
struct Fleet {
    pki: Pki,
    cert: IssuedCert,
    backend: FakeBackend,
    redis: RedisServer,
    prefix: String,
    /// More `shared_state` keys (`password_file`), and the URL if not the server's own.
    shared: String,
    url: String,
    replicas: Vec<Proxy>,
}

impl Fleet {
    /// `None` (SKIPPED) without redis-server.
    async fn start(test: &str, replicas: usize, limits: &str) -> Option<Fleet> {
        let redis = RedisServer::start(test)?;
        let url = redis.url();
        Some(Self::start_on(redis, &url, "", replicas, limits).await)
    }

    /// Replicas on a Redis already started, with `url` and more `shared_state` keys.
    async fn start_on(
        redis: RedisServer,
        url: &str,
        shared: &str,
        replicas: usize,
        limits: &str,
    ) -> Fleet {
        let pki = Pki::new();
        let cert = pki.issue("mx", &[HOST], false);
        let backend = FakeBackend::start(FakeKind::Imap).await;
        let mut fleet = Fleet {
            pki,
            cert,
            backend,
            redis,
            prefix: format!("t{:08x}", fastrand::u32(..)),
            shared: shared.to_owned(),
            url: url.to_owned(),
            replicas: Vec::new(),
        };
        for _ in 0..replicas {
            let proxy = Proxy::start(&fleet.yaml(limits), fleet.pki.dir.path()).await;
            fleet.replicas.push(proxy);
        }
        for i in 0..replicas {
            fleet.wait_up(i).await;
        }
        fleet
    }

    fn yaml(&self, limits: &str) -> String {
        config_yaml(
            &[&self.cert],
            &[
                listener_yaml("imaps", "imap", "implicit", self.backend.addr),
                listener_yaml("starttls", "imap", "starttls", self.backend.addr),
            ],
            &format!(
                "limits:\n{limits}shared_state:\n  redis: \"{}\"\n  key_prefix: {}\n  lease: 2s\n  timeout: 200ms\n{}",
                self.url, self.prefix, self.shared
            ),
        )
    }

    fn metric(&self, replica: usize, series: &str) -> f64 {
        metric(&self.replicas[replica].metrics.encode(), series).unwrap_or(0.0)
    }

    async fn wait_up(&self, replica: usize) {
        let up = || self.metric(replica, "mailfront_shared_state_up") == 1.0;
        eventually(up).await;
    }

    async fn imaps(&self, replica: usize) -> Tls {
        self.imaps_from(replica, "127.0.0.1:0").await
    }

    /// Implicit TLS from `from` (a loopback address), greeted.
    async fn imaps_from(&self, replica: usize, from: &str) -> Tls {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(from.parse().unwrap()).unwrap();
        let tcp = socket
            .connect(self.replicas[replica].addr("imaps"))
            .await
            .unwrap();
        let config = client_config(
            &self.pki.ca_der,
            &[&rustls::version::TLS13, &rustls::version::TLS12],
            None,
        );
        let tls = tls_upgrade(tcp, HOST, config).await.unwrap();
        let mut tls = BufReader::new(tls);
        let greeting = read_line(&mut tls).await;
        assert!(greeting.starts_with("* OK"), "{greeting}");
        tls
    }

    /// A STARTTLS-listener session's greeting (the refusal is a cleartext BYE).
    async fn plain(&self, replica: usize) -> (BufReader<TcpStream>, String) {
        plain_to(self.replicas[replica].addr("starttls")).await
    }
}

async fn plain_to(addr: SocketAddr) -> (BufReader<TcpStream>, String) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut tcp = BufReader::new(tcp);
    let greeting = read_line(&mut tcp).await;
    (tcp, greeting)
}

async fn imap_login(c: &mut Tls, tag: &str, password: &str) -> String {
    c.get_mut()
        .write_all(format!("{tag} LOGIN u {password}\r\n").as_bytes())
        .await
        .unwrap();
    read_until_tag(c, tag).await
}

const THROTTLED: &str = "NO [UNAVAILABLE]";
const FAILED: &str = "NO [AUTHENTICATIONFAILED]";

#[tokio::test]
async fn failures_spread_over_three_replicas_add_up_to_one_budget() {
    let Some(f) = Fleet::start(
        "failures_spread_over_three_replicas_add_up_to_one_budget",
        3,
        "  connections_per_ip: 0\n  auth_failures_per_ip: 3\n  auth_failure_window: 60s\n",
    )
    .await
    else {
        return;
    };
    // One wrong password on each replica: three in all, the budget.
    for (i, tag) in ["a", "b", "c"].iter().enumerate() {
        let mut c = f.imaps(i).await;
        let reply = imap_login(&mut c, tag, &format!("wrong-{tag}")).await;
        assert!(reply.contains(FAILED), "{reply}");
    }
    // Each replica has seen one failure only, yet every one now refuses, even the right
    // password, without asking the backend.
    for (i, tag) in ["d", "e", "f"].iter().enumerate() {
        let mut c = f.imaps(i).await;
        let reply = imap_login(&mut c, tag, "secret").await;
        assert!(reply.contains(THROTTLED), "replica {i}: {reply}");
    }
    let seen = f.backend.recorder.all_text();
    assert!(seen.contains("wrong-c"), "{seen}");
    assert!(
        !seen.contains("secret"),
        "a throttled login reached the backend"
    );
    assert_eq!(
        f.metric(0, r#"mailfront_shared_state_fallbacks_total{op="charge"}"#),
        0.0
    );
    // The store holds the three charges, under the prefix, keyed by address.
    let mut redis = f.redis.client().await;
    let key = format!("mailfront:{}:auth:127.0.0.1", f.prefix);
    let held: i64 = redis::cmd("ZCARD")
        .arg(&key)
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(held, 3);
}

#[tokio::test]
async fn concurrent_sessions_on_two_replicas_never_check_more_than_the_budget() {
    let Some(f) = Fleet::start(
        "concurrent_sessions_on_two_replicas_never_check_more_than_the_budget",
        2,
        "  connections_per_ip: 0\n  auth_failures_per_ip: 4\n  auth_failure_window: 60s\n",
    )
    .await
    else {
        return;
    };
    // 16 sessions, 8 on each replica, send a wrong password at once.
    let mut sessions = Vec::new();
    for i in 0..16 {
        sessions.push(f.imaps(i % 2).await);
    }
    let mut tasks = Vec::new();
    for (i, mut c) in sessions.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            imap_login(&mut c, "a", &format!("guess{i:02}")).await
        }));
    }
    let mut failed = 0;
    let mut throttled = 0;
    for task in tasks {
        let reply = task.await.unwrap();
        if reply.contains(FAILED) {
            failed += 1;
        } else if reply.contains(THROTTLED) {
            throttled += 1;
        }
    }
    assert_eq!((failed, throttled), (4, 12));
    let seen = f.backend.recorder.all_text();
    let checked = (0..16)
        .filter(|i| seen.contains(&format!("guess{i:02}")))
        .count();
    assert_eq!(checked, 4, "the backend checked more than the budget");
}

#[tokio::test]
async fn a_successful_login_is_refunded_across_replicas() {
    let Some(f) = Fleet::start(
        "a_successful_login_is_refunded_across_replicas",
        2,
        "  connections_per_ip: 0\n  auth_failures_per_ip: 1\n  auth_failure_window: 60s\n",
    )
    .await
    else {
        return;
    };
    for _ in 0..3 {
        let mut c = f.imaps(0).await;
        assert!(imap_login(&mut c, "a", "secret").await.contains("a OK"));
    }
    let mut redis = f.redis.client().await;
    let key = format!("mailfront:{}:auth:127.0.0.1", f.prefix);
    let empty = || async {
        let mut redis = redis.clone();
        let n: i64 = redis::cmd("ZCARD")
            .arg(&key)
            .query_async(&mut redis)
            .await
            .unwrap();
        n == 0
    };
    for _ in 0..100 {
        if empty().await {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(empty().await, "refunds reach the store");
    let _ = &mut redis;
    // The budget of one is whole: a failure on the other replica is still checked.
    let mut c = f.imaps(1).await;
    assert!(imap_login(&mut c, "b", "wrong").await.contains(FAILED));
}

#[tokio::test]
async fn unauthenticated_sessions_over_two_replicas_add_up_to_one_limit() {
    let Some(f) = Fleet::start(
        "unauthenticated_sessions_over_two_replicas_add_up_to_one_limit",
        2,
        "  connections_per_ip: 2\n  auth_failures_per_ip: 0\n",
    )
    .await
    else {
        return;
    };
    let (first, greeting) = f.plain(0).await;
    assert!(greeting.starts_with("* OK"), "{greeting}");
    let (_second, greeting) = f.plain(1).await;
    assert!(greeting.starts_with("* OK"), "{greeting}");
    // Each replica holds one: locally under the limit, together at it.
    for i in 0..2 {
        let (_refused, greeting) = f.plain(i).await;
        assert!(greeting.starts_with("* BYE"), "replica {i}: {greeting}");
    }
    let mut implicit = TcpStream::connect(f.replicas[1].addr("imaps"))
        .await
        .unwrap();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(TIMEOUT, implicit.read_to_end(&mut rest)).await;
    assert!(
        read.is_ok() && rest.is_empty(),
        "implicit TLS closes at once"
    );

    // The slot freed on replica 0 is usable on replica 1 within a second.
    drop(first);
    let mut admitted = false;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(25)).await;
        let (_s, greeting) = f.plain(1).await;
        if greeting.starts_with("* OK") {
            admitted = true;
            break;
        }
    }
    assert!(admitted, "a freed slot was not usable on the other replica");
}

#[tokio::test]
async fn a_killed_replica_frees_its_slots_when_its_lease_runs_out() {
    let Some(f) = Fleet::start(
        "a_killed_replica_frees_its_slots_when_its_lease_runs_out",
        1,
        "  connections_per_ip: 1\n  auth_failures_per_ip: 0\n",
    )
    .await
    else {
        return;
    };
    // A real process, killed with SIGKILL: no cleanup runs.
    let yaml = format!(
        "{}log:\n  format: json\n  level: info\n",
        f.yaml("  connections_per_ip: 1\n  auth_failures_per_ip: 0\n")
    );
    let path = f.pki.dir.path().join("killed.yaml");
    std::fs::write(&path, yaml).unwrap();
    let mut child = Binary::start(&path);
    let addr = child.address("starttls");
    child.seen_or_wait_for(&["shared state store reachable"]);
    let (held, greeting) = plain_to(addr).await;
    assert!(greeting.starts_with("* OK"), "{greeting}");
    let (_refused, greeting) = f.plain(0).await;
    assert!(greeting.starts_with("* BYE"), "{greeting}");

    let killed_at = tokio::time::Instant::now();
    child.kill();
    drop(held);
    let mut admitted = false;
    while killed_at.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (_s, greeting) = f.plain(0).await;
        if greeting.starts_with("* OK") {
            admitted = true;
            break;
        }
    }
    assert!(admitted, "the killed replica's slot was never freed");
    // The lease is 2 s in this test; allow scheduling slack, far under the 30 s promise.
    assert!(
        killed_at.elapsed() < Duration::from_secs(6),
        "freed after {:?}",
        killed_at.elapsed()
    );
}

#[tokio::test]
async fn with_the_store_down_replicas_count_alone_and_resume_when_it_returns() {
    let Some(mut f) = Fleet::start(
        "with_the_store_down_replicas_count_alone_and_resume_when_it_returns",
        2,
        "  connections_per_ip: 0\n  auth_failures_per_ip: 2\n  auth_failure_window: 60s\n",
    )
    .await
    else {
        return;
    };
    f.redis.kill();
    // Logins go on: the first may be the one that notices (waiting the timeout at most).
    let mut c = f.imaps(0).await;
    assert!(imap_login(&mut c, "a", "secret").await.contains("a OK"));
    let down = || f.metric(0, "mailfront_shared_state_up") == 0.0;
    eventually(down).await;
    // Each replica counts alone, exactly as without shared_state: two failures on replica 0
    // throttle it there, while replica 1 still checks its own two.
    for tag in ["b", "c"] {
        let mut c = f.imaps(0).await;
        assert!(imap_login(&mut c, tag, "wrong").await.contains(FAILED));
    }
    let mut c = f.imaps(0).await;
    assert!(imap_login(&mut c, "d", "wrong").await.contains(THROTTLED));
    let mut c = f.imaps(1).await;
    assert!(imap_login(&mut c, "e", "wrong").await.contains(FAILED));
    assert!(f.metric(0, r#"mailfront_shared_state_fallbacks_total{op="charge"}"#) >= 2.0);

    // The store returns (empty, as a restarted one without persistence): the replicas use it
    // again within about a second, and count together. From a second address: one failure on
    // each replica spends its budget of two, and the third attempt is refused on either.
    f.redis.restart();
    f.wait_up(0).await;
    f.wait_up(1).await;
    for (i, tag) in [(0, "f"), (1, "g")] {
        let mut c = f.imaps_from(i, "127.0.0.2:0").await;
        assert!(imap_login(&mut c, tag, "wrong").await.contains(FAILED));
    }
    let mut c = f.imaps_from(0, "127.0.0.2:0").await;
    assert!(imap_login(&mut c, "h", "wrong").await.contains(THROTTLED));
    let mut redis = f.redis.client().await;
    let live: i64 = redis::cmd("ZCARD")
        .arg(format!("mailfront:{}:replicas", f.prefix))
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(live, 2);
}

/// The rules the Helm chart's Valkey gives mailfront's ACL user (`sharedState.valkey.auth`):
/// read from the chart itself, so this test checks what the chart deploys.
fn chart_acl_rules() -> String {
    std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/helm/mailfront/files/valkey-acl-rules"
    ))
    .unwrap()
    .lines()
    .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    .collect::<Vec<_>>()
    .join(" ")
}

/// `shared_state.password_file` with an ACL user named in the URL, as the Helm chart's Valkey
/// runs it: the default user off, mailfront's user limited to its keys and commands by the
/// chart's rules. The counts are shared, and `mailfront check --online` logs in too.
#[tokio::test]
async fn a_password_file_and_an_acl_user_share_the_counts() {
    let test = "a_password_file_and_an_acl_user_share_the_counts";
    let Some(dir) = redis_server_or_skip(test).map(|_| tempfile::tempdir().unwrap()) else {
        return;
    };
    let acl = dir.path().join("users.acl");
    std::fs::write(
        &acl,
        format!(
            "user default off\nuser mailfront on >s3cret-pw {}\n",
            chart_acl_rules()
        ),
    )
    .unwrap();
    let password = dir.path().join("password");
    std::fs::write(&password, "s3cret-pw\n").unwrap();
    let redis = RedisServer::start_with(
        test,
        &["--aclfile", acl.to_str().unwrap()],
        "mailfront:s3cret-pw@",
    )
    .unwrap();
    let url = format!("redis://mailfront@127.0.0.1:{}/0", redis.port);
    let shared = format!("  password_file: {}\n", password.display());
    let f = Fleet::start_on(
        redis,
        &url,
        &shared,
        2,
        "  connections_per_ip: 2\n  auth_failures_per_ip: 2\n  auth_failure_window: 60s\n",
    )
    .await;
    // One wrong password on each replica spends the budget of two: both now refuse.
    for (i, tag) in [(0, "a"), (1, "b")] {
        let mut c = f.imaps(i).await;
        assert!(imap_login(&mut c, tag, "wrong").await.contains(FAILED));
    }
    for (i, tag) in [(0, "c"), (1, "d")] {
        let mut c = f.imaps(i).await;
        assert!(imap_login(&mut c, tag, "secret").await.contains(THROTTLED));
    }
    for i in 0..2 {
        assert_eq!(f.metric(i, "mailfront_shared_state_up"), 1.0);
        for op in ["charge", "acquire", "release", "refund"] {
            assert_eq!(
                f.metric(
                    i,
                    &format!("mailfront_shared_state_fallbacks_total{{op=\"{op}\"}}")
                ),
                0.0,
                "replica {i}: {op} fell back to counting alone"
            );
        }
    }
    let mut redis = f.redis.client().await;
    let held: i64 = redis::cmd("ZCARD")
        .arg(format!("mailfront:{}:auth:127.0.0.1", f.prefix))
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(held, 2);

    // mailfront check --online: the same URL and password file, one PING.
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "hostname: {HOST}\nlisteners:\n  - name: imaps\n    protocol: imap\n    listen: \"127.0.0.1:0\"\n    tls: implicit\n    backend: \"127.0.0.1:1\"\nshared_state:\n  redis: \"{url}\"\n{shared}"
        ),
    )
    .unwrap();
    let check = std::process::Command::new(env!("CARGO_BIN_EXE_mailfront"))
        .args(["check", "--online", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&check.stdout);
    assert!(
        check.status.success() && out.contains("PING answered"),
        "{out}{}",
        String::from_utf8_lossy(&check.stderr)
    );
    std::fs::write(&password, "wrong-pw\n").unwrap();
    let check = std::process::Command::new(env!("CARGO_BIN_EXE_mailfront"))
        .args(["check", "--online", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!check.status.success(), "a wrong password passed the PING");
}

/// A rotated password: the server changes it and drops mailfront's connections (as a Valkey
/// restarted with a new Secret does), and the Secret mounted as `password_file` changes. The
/// replica's reconnection with the old password is refused; it counts alone meanwhile, reads
/// the file again and is back in the store without a restart.
#[tokio::test]
async fn a_rotated_password_file_is_read_again_when_the_store_refuses() {
    let test = "a_rotated_password_file_is_read_again_when_the_store_refuses";
    let Some(redis) = RedisServer::start_with(test, &["--requirepass", "old-pw"], ":old-pw@")
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let password = dir.path().join("password");
    std::fs::write(&password, "old-pw\n").unwrap();
    let url = redis.url();
    let shared = format!("  password_file: {}\n", password.display());
    let f = Fleet::start_on(
        redis,
        &url,
        &shared,
        1,
        "  connections_per_ip: 0\n  auth_failures_per_ip: 5\n  auth_failure_window: 60s\n",
    )
    .await;

    std::fs::write(&password, "new-pw\n").unwrap();
    let mut admin = f.redis.client().await;
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("requirepass")
        .arg("new-pw")
        .query_async(&mut admin)
        .await
        .unwrap();
    let _: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("normal")
        .arg("SKIPME")
        .arg("yes")
        .query_async(&mut admin)
        .await
        .unwrap();
    let down = || f.metric(0, "mailfront_shared_state_up") == 0.0;
    eventually(down).await;
    f.wait_up(0).await;
    // And it counts in the store again.
    let mut c = f.imaps(0).await;
    assert!(imap_login(&mut c, "a", "wrong").await.contains(FAILED));
    let held: i64 = redis::cmd("ZCARD")
        .arg(format!("mailfront:{}:auth:127.0.0.1", f.prefix))
        .query_async(&mut admin)
        .await
        .unwrap();
    assert_eq!(held, 1);
}
