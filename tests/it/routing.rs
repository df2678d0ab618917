//! The backend chosen by the user who logs in (`user_affinity`, `user_map`, `user_lookup`), with
//! the proxy in-process in front of fleet backends that name themselves in every reply and record
//! the logins they receive, and a fake nginx `auth_http` service that records every request:
//! - affinity: each user's concurrent sessions on one backend, two replicas agreeing, failover
//!   to the next backend in the user's hash order and back;
//! - map: exact name, then domain, then the listener's backend; case; reload; a bad file kept
//!   out; a mapped backend that is down is a temporary failure, never another backend;
//! - lookup: every request header, the answer's backend, refusal, `Auth-Wait`, unreachable,
//!   timeout, the `Auth-Server` allow-list;
//! - SMTP and POP3 routing, and the SASL forms (PLAIN with and without initial response, LOGIN);
//! - lazy connect: sessions that never log in cost no backend connection, and what they are shown
//!   before login is the backend's, less what a routed listener must hide;
//! - observability: `mailfront_user_routes_total` and the `authentication` log line.

// Helpers outside #[test] functions: clippy's allow-*-in-tests does not reach them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::prelude::{BASE64_STANDARD, Engine as _};
use mailfront::routing::affinity;
use tokio::io::{AsyncRead, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_rustls::client::TlsStream;

use crate::common::*;

const SNI: &str = "mx.example.test";

type Tls = BufReader<TlsStream<TcpStream>>;

/// Held sessions would make `Proxy::stop` wait out the default 30 s grace. These tests hold more
/// unauthenticated sessions from 127.0.0.1 than `limits.connections_per_ip` allows, and have more
/// logins in flight at once than `limits.auth_failures_per_ip` (a login counts against it until
/// its backend accepts it).
const EXTRA: &str = "timeouts:\n  shutdown_grace: 200ms\nlimits:\n  connections_per_ip: 0\n  auth_failures_per_ip: 0\n";

/// A CA, the proxy's certificate, and a client trusting it.
struct Setup {
    pki: Pki,
    cert: IssuedCert,
    client: Arc<rustls::ClientConfig>,
}

impl Setup {
    fn new() -> Setup {
        let pki = Pki::new();
        let cert = pki.issue("mx", &[SNI], false);
        let client = client_config(&pki.ca_der, &[&rustls::version::TLS13], None);
        Setup { pki, cert, client }
    }

    fn dir(&self) -> &Path {
        self.pki.dir.path()
    }

    fn yaml(&self, listeners: &[String]) -> String {
        config_yaml(&[&self.cert], listeners, EXTRA)
    }

    async fn proxy(&self, listeners: &[String]) -> Proxy {
        Proxy::start(&self.yaml(listeners), self.dir()).await
    }

    /// Writes `file` (relative to the config) whole at once, as a ConfigMap update or an
    /// editor's save-and-rename does: the reloader never reads half a file.
    fn write(&self, file: &str, text: &str) -> PathBuf {
        let path = self.dir().join(file);
        let tmp = self.dir().join(format!(".{file}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        path
    }
}

/// One listener's YAML with a list of backends and `extra` keys (indented 4).
fn listener(name: &str, protocol: &str, tls: &str, backends: &[SocketAddr], extra: &str) -> String {
    let list: Vec<String> = backends.iter().map(|b| format!("\"{b}\"")).collect();
    format!(
        "  - name: {name}\n    protocol: {protocol}\n    listen: \"127.0.0.1:0\"\n    tls: {tls}\n    backend: [{}]\n{extra}",
        list.join(", ")
    )
}

/// `user_lookup` keys (indented 4) with a short timeout and `more` keys (indented 6).
fn user_lookup(url: &str, more: &str) -> String {
    format!("    user_lookup:\n      url: \"{url}\"\n      timeout: 300ms\n{more}")
}

/// A fleet backend speaking `protocol` (`imap`, `smtp`, `pop3`) in cleartext.
async fn fleet(name: &str, protocol: &str) -> FleetBackend {
    match protocol {
        "imap" => FleetBackend::start(name, Speaks::Imap, FleetTls::None).await,
        "smtp" => FleetBackend::start(name, Speaks::Smtp, FleetTls::None).await,
        "pop3" => FleetBackend::start_pop3(name, FleetTls::None).await,
        other => panic!("no fleet backend speaks {other}"),
    }
}

/// An address nothing listens on.
fn closed_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// `mailfront_user_routes_total{listener,source,result}`; panics if the series is not exported
/// (each one a listener can move is, from the start).
fn routes(proxy: &Proxy, listener: &str, source: &str, result: &str) -> f64 {
    let text = proxy.metrics.encode();
    let series = format!(
        "mailfront_user_routes_total{{listener=\"{listener}\",result=\"{result}\",source=\"{source}\"}}"
    );
    metric(&text, &series).unwrap_or_else(|| panic!("no {series} in:\n{text}"))
}

/// `mailfront_user_map_reloads_total{listener,result}`.
fn map_reloads(proxy: &Proxy, listener: &str, result: &str) -> f64 {
    let text = proxy.metrics.encode();
    let series =
        format!("mailfront_user_map_reloads_total{{listener=\"{listener}\",result=\"{result}\"}}");
    metric(&text, &series).unwrap_or_else(|| panic!("no {series} in:\n{text}"))
}

// ---------------------------------------------------------------------------------------------
// Clients

async fn tls(addr: SocketAddr, client: Arc<rustls::ClientConfig>) -> Tls {
    BufReader::new(tls_connect(addr, SNI, client).await.unwrap())
}

/// Lines up to and including the one that is exactly `.` (a POP3 multi-line answer).
async fn read_multiline<S: AsyncRead + Unpin>(s: &mut BufReader<S>) -> String {
    let mut all = String::new();
    loop {
        let line = read_line(s).await;
        assert!(!line.is_empty(), "closed inside a multi-line answer: {all}");
        all.push_str(&line);
        if line == ".\r\n" {
            return all;
        }
    }
}

/// Everything until the proxy closes the connection (bounded by the test timeout).
async fn read_to_end<S: AsyncRead + Unpin>(s: &mut BufReader<S>) -> String {
    let mut all = String::new();
    loop {
        let line = read_line(s).await;
        if line.is_empty() {
            return all;
        }
        all.push_str(&line);
    }
}

async fn send<S: AsyncRead + tokio::io::AsyncWrite + Unpin>(s: &mut BufReader<S>, line: &str) {
    s.get_mut()
        .write_all(format!("{line}\r\n").as_bytes())
        .await
        .unwrap();
}

/// An IMAP quoted string.
fn q(text: &str) -> String {
    format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""))
}

fn b64(text: &str) -> String {
    BASE64_STANDARD.encode(text.as_bytes())
}

/// An IMAP session on an implicit-TLS listener, past the greeting.
async fn imap_session(addr: SocketAddr, client: Arc<rustls::ClientConfig>) -> Tls {
    let mut s = tls(addr, client).await;
    let greeting = read_line(&mut s).await;
    assert!(greeting.starts_with("* OK"), "{greeting}");
    s
}

/// One IMAP command and its response, up to the tagged line.
async fn imap<S: AsyncRead + tokio::io::AsyncWrite + Unpin>(
    s: &mut BufReader<S>,
    tag: &str,
    command: &str,
) -> String {
    send(s, &format!("{tag} {command}")).await;
    read_until_tag(s, tag).await
}

/// A new IMAP session and its LOGIN's response.
async fn imap_login(
    addr: SocketAddr,
    client: Arc<rustls::ClientConfig>,
    user: &str,
    password: &str,
) -> (Tls, String) {
    let mut s = imap_session(addr, client).await;
    let reply = imap(&mut s, "a", &format!("LOGIN {} {}", q(user), q(password))).await;
    (s, reply)
}

/// The fleet backend a login reached (`… NAME logged in`), if one accepted it.
fn logged_in_at(reply: &str) -> Option<String> {
    reply.lines().find_map(|line| {
        let before = line.trim_end().strip_suffix(" logged in")?;
        before.rsplit(' ').next().map(str::to_owned)
    })
}

/// The fleet backend that answered an SMTP AUTH with `235 2.7.0 NAME ok`.
fn authenticated_at(reply: &str) -> Option<String> {
    reply
        .trim_end()
        .strip_prefix("235 2.7.0 ")?
        .strip_suffix(" ok")
        .map(str::to_owned)
}

/// Where `user`'s LOGIN lands through `addr` (the session is dropped).
async fn lands_on(addr: SocketAddr, client: &Arc<rustls::ClientConfig>, user: &str) -> String {
    let (_s, reply) = imap_login(addr, client.clone(), user, "secret").await;
    logged_in_at(&reply).unwrap_or_else(|| panic!("{user}: not logged in: {reply}"))
}

/// A fleet login as the backend must have received it.
fn login(mechanism: &str, authzid: &str, user: &str, password: &str) -> FleetLogin {
    FleetLogin {
        mechanism: mechanism.into(),
        // mailfront always sends the mechanism alone and answers the backend's challenges.
        initial_response: false,
        authzid: authzid.into(),
        user: user.into(),
        password: password.into(),
    }
}

// ---------------------------------------------------------------------------------------------
// Affinity

/// `User3@Example.org` for `user3@example.org`.
fn capitalized(user: &str) -> String {
    user.split('@')
        .map(|part| {
            let mut chars = part.chars();
            chars
                .next()
                .map(|c| c.to_ascii_uppercase().to_string() + chars.as_str())
                .unwrap_or_default()
        })
        .collect::<Vec<_>>()
        .join("@")
}

/// The issue's reproduction: 11 users, 3 sessions each, held open over 3 backends. Least
/// connections split every user; with `user_affinity` each user's sessions share one backend,
/// the first of the user's rendezvous order ([`affinity::order`]), whatever the spelling of the
/// name, and a second replica with the same backend list agrees without any shared state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn affinity_holds_each_users_concurrent_sessions_on_one_backend_and_two_replicas_agree() {
    let setup = Setup::new();
    let fleet = [
        fleet("b0", "imap").await,
        fleet("b1", "imap").await,
        fleet("b2", "imap").await,
    ];
    let addrs: Vec<SocketAddr> = fleet.iter().map(|b| b.addr).collect();
    let listeners = [listener(
        "imaps",
        "imap",
        "implicit",
        &addrs,
        "    user_affinity: true\n",
    )];
    let one = setup.proxy(&listeners).await;
    let two = setup.proxy(&listeners).await;
    let users: Vec<String> = (0..11).map(|i| format!("user{i}@example.org")).collect();

    let mut held = Vec::new();
    let mut placements = Vec::new();
    for proxy in [&one, &two] {
        let mut logins = JoinSet::new();
        for user in &users {
            // Names are compared case-insensitively (Dovecot's %Lu).
            for spelling in [user.clone(), user.to_ascii_uppercase(), capitalized(user)] {
                let (addr, client, user) =
                    (proxy.addr("imaps"), setup.client.clone(), user.clone());
                logins.spawn(async move {
                    let (s, reply) = imap_login(addr, client, &spelling, "secret").await;
                    (user, spelling, reply, s)
                });
            }
        }
        let mut on: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        while let Some(done) = logins.join_next().await {
            let (user, spelling, reply, s) = done.unwrap();
            let name = logged_in_at(&reply)
                .unwrap_or_else(|| panic!("{spelling}: not logged in: {reply}"));
            on.entry(user).or_default().insert(name);
            held.push(s);
        }
        for user in &users {
            let first = affinity::order(user.as_bytes(), &addrs)[0];
            assert_eq!(
                on[user],
                BTreeSet::from([fleet[first].name.clone()]),
                "{user}: its three sessions, on the first backend of its order"
            );
        }
        assert_eq!(routes(proxy, "imaps", "affinity", "ok"), 33.0);
        placements.push(on);
    }
    assert_eq!(placements[0], placements[1], "the two replicas disagree");
    let used: BTreeSet<&String> = placements[0].values().flatten().collect();
    assert!(used.len() > 1, "every user on one backend: {used:?}");
    // Each backend got exactly the sessions of its users (and perhaps a replica's probe).
    for b in &fleet {
        let users_here = placements[0]
            .values()
            .filter(|names| names.contains(&b.name))
            .count();
        assert_eq!(b.logins().len(), users_here * 6, "{}", b.name);
    }
    drop(held);
    one.stop().await;
    two.stop().await;
}

/// When a user's backend is out of rotation, every replica sends the user's new sessions to the
/// same next backend of the user's order (only affinity moves users), and back once it returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn affinity_fails_over_to_the_same_next_backend_on_every_replica_and_comes_back() {
    let setup = Setup::new();
    let mut fleet = [
        fleet("b0", "imap").await,
        fleet("b1", "imap").await,
        fleet("b2", "imap").await,
    ];
    let addrs: Vec<SocketAddr> = fleet.iter().map(|b| b.addr).collect();
    let listeners = [listener(
        "imaps",
        "imap",
        "implicit",
        &addrs,
        "    user_affinity: true\n",
    )];
    let one = setup.proxy(&listeners).await;
    let two = setup.proxy(&listeners).await;
    let user = "alice@example.org";
    let order = affinity::order(user.as_bytes(), &addrs);
    let (home, next) = (fleet[order[0]].name.clone(), fleet[order[1]].name.clone());
    for proxy in [&one, &two] {
        assert_eq!(
            lands_on(proxy.addr("imaps"), &setup.client, user).await,
            home
        );
    }

    fleet[order[0]].kill();
    for proxy in [&one, &two] {
        for _ in 0..3 {
            assert_eq!(
                lands_on(proxy.addr("imaps"), &setup.client, user).await,
                next,
                "while {home} is down"
            );
        }
    }
    // A session opened meanwhile, held across the return.
    let (mut stays, reply) = imap_login(one.addr("imaps"), setup.client.clone(), user, "pw").await;
    assert_eq!(logged_in_at(&reply), Some(next.clone()), "{reply}");

    // Back on the same port: once its back-off (1 s after one failure) runs out, the user's
    // new sessions go home again, on both replicas; meanwhile never to a third backend.
    fleet[order[0]].revive().await;
    for proxy in [&one, &two] {
        let mut back = false;
        for _ in 0..60 {
            let name = lands_on(proxy.addr("imaps"), &setup.client, user).await;
            if name == home {
                back = true;
                break;
            }
            assert_eq!(name, next, "a third backend");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(back, "{user} never came back to {home}");
        assert_eq!(
            lands_on(proxy.addr("imaps"), &setup.client, user).await,
            home
        );
    }
    // Only new sessions move.
    let noop = imap(&mut stays, "n", "NOOP").await;
    assert!(noop.contains(&format!("served by {next}")), "{noop}");
    drop(stays);
    one.stop().await;
    two.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Map

fn map_text(entries: &[(&str, &FleetBackend)]) -> String {
    entries
        .iter()
        .map(|(key, b)| format!("\"{key}\": \"{}\"\n", b.addr))
        .collect()
}

/// An exact name wins over its domain, an unmapped user gets the listener's own backend, names
/// and domains are compared case-insensitively; a rewritten file is used by the next logins, and
/// a bad one keeps the map in service (counted as a failed reload).
#[tokio::test]
async fn user_map_routes_by_name_then_domain_then_default_follows_a_rewrite_and_keeps_the_old_map_over_a_bad_one()
 {
    let setup = Setup::new();
    let (b0, b1, b2) = (
        fleet("b0", "imap").await,
        fleet("b1", "imap").await,
        fleet("b2", "imap").await,
    );
    // A list of backends for a domain is fine too.
    setup.write(
        "users.yaml",
        &format!(
            "alice@example.org: \"{}\"\n\"@example.org\": [\"{}\"]\n",
            b1.addr, b2.addr
        ),
    );
    // The path is relative to the config file.
    let proxy = setup
        .proxy(&[listener(
            "imaps",
            "imap",
            "implicit",
            &[b0.addr],
            "    user_map: users.yaml\n",
        )])
        .await;
    let addr = proxy.addr("imaps");
    let c = &setup.client;
    for (user, expected) in [
        ("alice@example.org", "b1"),
        ("ALICE@Example.ORG", "b1"),
        ("bob@example.org", "b2"),
        ("Bob@EXAMPLE.org", "b2"),
        ("carol@other.test", "b0"),
        // The domain is what follows the last @; `example.org` alone is a name, not mapped.
        ("example.org", "b0"),
    ] {
        assert_eq!(lands_on(addr, c, user).await, expected, "{user}");
    }
    assert_eq!(routes(&proxy, "imaps", "map", "ok"), 4.0);
    assert_eq!(routes(&proxy, "imaps", "pool", "ok"), 2.0);
    assert_eq!(
        b1.logins(),
        [
            login("LOGIN", "", "alice@example.org", "secret"),
            login("LOGIN", "", "ALICE@Example.ORG", "secret"),
        ]
    );

    // A migration step: alice moves, the domain moves back, carol gets an entry.
    setup.write(
        "users.yaml",
        &map_text(&[
            ("alice@example.org", &b2),
            ("@example.org", &b0),
            ("Carol@Other.Test", &b1),
        ]),
    );
    eventually(|| map_reloads(&proxy, "imaps", "success") == 1.0).await;
    for (user, expected) in [
        ("alice@example.org", "b2"),
        ("bob@example.org", "b0"),
        ("carol@other.test", "b1"),
    ] {
        assert_eq!(
            lands_on(addr, c, user).await,
            expected,
            "{user} after the rewrite"
        );
    }

    // A bad file: logged, counted, and the map in service stays.
    setup.write(
        "users.yaml",
        &format!(
            "alice@example.org: \"{}\"\nbob@example.org: [unclosed\n",
            b1.addr
        ),
    );
    eventually(|| map_reloads(&proxy, "imaps", "failure") >= 1.0).await;
    for (user, expected) in [
        ("alice@example.org", "b2"),
        ("bob@example.org", "b0"),
        ("carol@other.test", "b1"),
    ] {
        assert_eq!(
            lands_on(addr, c, user).await,
            expected,
            "{user} after a bad file"
        );
    }
    assert_eq!(map_reloads(&proxy, "imaps", "success"), 1.0);
    proxy.stop().await;
}

/// The reload half of the test above, on counters only: a changed map file is re-read on the
/// certificates' schedule and counted; a bad one is counted as a failure, and an unchanged file
/// is not re-read.
#[tokio::test]
async fn user_map_reloads_are_counted_success_and_failure() {
    let setup = Setup::new();
    let b0 = fleet("b0", "imap").await;
    setup.write("users.yaml", &map_text(&[("alice@example.org", &b0)]));
    let proxy = setup
        .proxy(&[listener(
            "imaps",
            "imap",
            "implicit",
            &[b0.addr],
            "    user_map: users.yaml\n",
        )])
        .await;
    // Several reload intervals (100 ms) with the file unchanged: nothing counted.
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_eq!(map_reloads(&proxy, "imaps", "success"), 0.0);
    assert_eq!(map_reloads(&proxy, "imaps", "failure"), 0.0);
    setup.write(
        "users.yaml",
        &map_text(&[("alice@example.org", &b0), ("@example.org", &b0)]),
    );
    eventually(|| map_reloads(&proxy, "imaps", "success") == 1.0).await;
    setup.write("users.yaml", "alice@example.org: not-an-address\n");
    eventually(|| map_reloads(&proxy, "imaps", "failure") >= 1.0).await;
    assert_eq!(map_reloads(&proxy, "imaps", "success"), 1.0);
    proxy.stop().await;
}

/// A wrong backend is worse than no backend: a user mapped to a backend that is down gets the
/// temporary failure, the listener's own backend never sees the login, and the session goes on.
#[tokio::test]
async fn a_mapped_backend_that_is_down_is_a_temporary_failure_never_another_backend() {
    let setup = Setup::new();
    let b0 = fleet("b0", "imap").await;
    let dead = closed_port();
    setup.write("users.yaml", &format!("dave@example.org: \"{dead}\"\n"));
    let proxy = setup
        .proxy(&[listener(
            "imaps",
            "imap",
            "implicit",
            &[b0.addr],
            "    user_map: users.yaml\n",
        )])
        .await;
    let mut s = imap_session(proxy.addr("imaps"), setup.client.clone()).await;
    let reply = imap(&mut s, "a", "LOGIN dave@example.org secret").await;
    assert!(reply.starts_with("a NO [UNAVAILABLE]"), "{reply}");
    assert!(b0.logins().is_empty(), "{:?}", b0.logins());
    // The session goes on: another user's login on the same connection.
    let reply = imap(&mut s, "b", "LOGIN carol@other.test secret").await;
    assert_eq!(logged_in_at(&reply).as_deref(), Some("b0"), "{reply}");
    assert_eq!(
        b0.logins(),
        [login("LOGIN", "", "carol@other.test", "secret")]
    );
    drop(s);
    proxy.stop().await;
}

/// A login the chosen backend refuses drops that backend: the next login on the same
/// connection is routed afresh, by its own name.
#[tokio::test]
async fn a_refused_login_drops_the_backend_and_the_next_login_is_routed_by_its_own_name() {
    let setup = Setup::new();
    let (b0, b1, b2) = (
        fleet("b0", "imap").await,
        fleet("b1", "imap").await,
        fleet("b2", "imap").await,
    );
    setup.write(
        "users.yaml",
        &map_text(&[("alice@example.org", &b1), ("@example.net", &b2)]),
    );
    let proxy = setup
        .proxy(&[listener(
            "imaps",
            "imap",
            "implicit",
            &[b0.addr],
            "    user_map: users.yaml\n",
        )])
        .await;
    let mut s = imap_session(proxy.addr("imaps"), setup.client.clone()).await;
    let reply = imap(
        &mut s,
        "a",
        &format!("LOGIN alice@example.org {FLEET_WRONG_PASSWORD}"),
    )
    .await;
    assert!(
        reply.contains("a NO") && reply.contains("b1 says no"),
        "{reply}"
    );
    let reply = imap(&mut s, "b", "LOGIN bob@example.net secret").await;
    assert_eq!(logged_in_at(&reply).as_deref(), Some("b2"), "{reply}");
    assert_eq!(
        b1.logins(),
        [login(
            "LOGIN",
            "",
            "alice@example.org",
            FLEET_WRONG_PASSWORD
        )]
    );
    assert_eq!(
        b2.logins(),
        [login("LOGIN", "", "bob@example.net", "secret")]
    );
    assert!(b0.logins().is_empty());
    // Now relayed to b2.
    assert!(imap(&mut s, "n", "NOOP").await.contains("served by b2"));
    drop(s);
    proxy.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Lookup (nginx auth_http)

/// The IANA name of the session's cipher suite, and the client's own port.
fn tls_facts(s: &Tls) -> (String, u16) {
    let (tcp, conn) = s.get_ref().get_ref();
    let cipher = mailfront::tls::names::cipher_suite_name(u16::from(
        conn.negotiated_cipher_suite().unwrap().suite(),
    ))
    .into_owned();
    (cipher, tcp.local_addr().unwrap().port())
}

/// Every header nginx's `auth_http` sends, checked on the IMAP, POP3 and SMTP requests: the
/// user and password URL-escaped as nginx does, `Auth-Pass` only with `send_password: true`,
/// `Auth-SMTP-Helo` only for SMTP, the client's address and TLS facts, extra `headers`; and an
/// `Auth-Status: OK` answer's `Auth-Server`/`Auth-Port` is the backend the login reaches.
#[tokio::test]
async fn lookup_requests_carry_every_auth_http_header_and_the_answer_picks_the_backend() {
    let setup = Setup::new();
    let (b0, b1) = (fleet("b0", "imap").await, fleet("b1", "imap").await);
    let (p0, p1) = (fleet("p0", "pop3").await, fleet("p1", "pop3").await);
    let (s0, s1) = (fleet("s0", "smtp").await, fleet("s1", "smtp").await);
    let (imap_to, pop3_to, smtp_to) = (b1.addr, p1.addr, s1.addr);
    // b1, p1 and s1 are none of the listeners' backends, but on the same address: the default
    // allow-list (the listener's backends' addresses) lets them through.
    let auth = AuthHttp::start(move |r| match r.header("Auth-Protocol") {
        Some("imap") => AuthReply::ok(imap_to),
        Some("pop3") => AuthReply::ok(pop3_to),
        Some("smtp") => AuthReply::ok(smtp_to),
        _ => AuthReply::refuse("which protocol?"),
    })
    .await;
    let url = |via: &str| auth.url(&format!("/auth?via={via}"));
    let proxy = setup
        .proxy(&[
            listener(
                "imaps",
                "imap",
                "implicit",
                &[b0.addr],
                &user_lookup(
                    &url("imaps"),
                    "      headers:\n        X-Auth-Key: s3cret\n",
                ),
            ),
            listener(
                "imaps-pass",
                "imap",
                "implicit",
                &[b0.addr],
                &user_lookup(&url("imaps-pass"), "      send_password: true\n"),
            ),
            listener(
                "pop3s",
                "pop3",
                "implicit",
                &[p0.addr],
                &user_lookup(&url("pop3s"), ""),
            ),
            listener(
                "smtps",
                "smtp",
                "implicit",
                &[s0.addr],
                &user_lookup(&url("smtps"), ""),
            ),
        ])
        .await;
    let user = "imap alice%\"x'@example.org";
    let escaped_user = "imap%20alice%25%22x%27@example.org";
    let password = "pa ss%w'";
    let escaped_password = "pa%20ss%25w%27";

    // IMAP, TLS 1.3, without the password.
    let mut s = imap_session(proxy.addr("imaps"), setup.client.clone()).await;
    let (cipher13, port) = tls_facts(&s);
    let reply = imap(&mut s, "a", &format!("LOGIN {} {}", q(user), q(password))).await;
    assert_eq!(logged_in_at(&reply).as_deref(), Some("b1"), "{reply}");
    assert_eq!(b1.logins(), [login("LOGIN", "", user, password)]);
    let requests = auth.requests();
    assert_eq!(requests.len(), 1, "{requests:?}");
    let r = &requests[0];
    assert_eq!(
        (r.method.as_str(), r.path.as_str()),
        ("GET", "/auth?via=imaps")
    );
    let expected = [
        ("host", auth.addr.to_string()),
        ("auth-method", "plain".into()),
        ("auth-user", escaped_user.into()),
        ("auth-protocol", "imap".into()),
        ("auth-login-attempt", "1".into()),
        ("client-ip", "127.0.0.1".into()),
        ("client-port", port.to_string()),
        ("auth-ssl", "on".into()),
        ("auth-ssl-protocol", "TLSv1.3".into()),
        ("auth-ssl-cipher", cipher13.clone()),
        ("x-auth-key", "s3cret".into()),
    ];
    for (name, value) in &expected {
        assert_eq!(r.header(name), Some(value.as_str()), "{name} in {r:?}");
    }
    assert_eq!(
        r.header("Auth-Pass"),
        None,
        "the password went to a lookup: {r:?}"
    );
    assert_eq!(r.header("Auth-SMTP-Helo"), None, "{r:?}");
    drop(s);

    // IMAP with send_password, over TLS 1.2.
    let tls12 = client_config(&setup.pki.ca_der, &[&rustls::version::TLS12], None);
    let mut s = imap_session(proxy.addr("imaps-pass"), tls12).await;
    let (cipher12, port) = tls_facts(&s);
    let reply = imap(&mut s, "a", &format!("LOGIN {} {}", q(user), q(password))).await;
    assert_eq!(logged_in_at(&reply).as_deref(), Some("b1"), "{reply}");
    let r = auth.requests().pop().unwrap();
    assert_eq!(r.path, "/auth?via=imaps-pass");
    assert_eq!(r.header("Auth-Pass"), Some(escaped_password), "{r:?}");
    assert_eq!(r.header("Auth-SSL-Protocol"), Some("TLSv1.2"));
    assert_eq!(r.header("Auth-SSL-Cipher"), Some(cipher12.as_str()));
    assert_eq!(r.header("Client-Port"), Some(port.to_string().as_str()));
    assert_eq!(r.header("X-Auth-Key"), None, "headers are per listener");
    drop(s);

    // POP3 USER/PASS.
    let mut s = tls(proxy.addr("pop3s"), setup.client.clone()).await;
    let (_, port) = tls_facts(&s);
    assert!(read_line(&mut s).await.starts_with("+OK"));
    send(&mut s, "USER pop-alice").await;
    assert!(read_line(&mut s).await.starts_with("+OK"));
    send(&mut s, "PASS secret").await;
    assert_eq!(read_line(&mut s).await, "+OK p1 logged in\r\n");
    assert_eq!(p1.logins(), [login("USER", "", "pop-alice", "secret")]);
    let r = auth.requests().pop().unwrap();
    for (name, value) in [
        ("Auth-Protocol", "pop3"),
        ("Auth-Method", "plain"),
        ("Auth-User", "pop-alice"),
        ("Auth-Login-Attempt", "1"),
        ("Client-Port", &port.to_string()),
        ("Auth-SSL", "on"),
        ("Auth-SSL-Cipher", &cipher13),
    ] {
        assert_eq!(r.header(name), Some(value), "{name} in {r:?}");
    }
    assert_eq!(r.header("Auth-Pass"), None);
    assert_eq!(r.header("Auth-SMTP-Helo"), None);
    drop(s);

    // SMTP AUTH PLAIN after EHLO: the EHLO argument goes along.
    let mut s = tls(proxy.addr("smtps"), setup.client.clone()).await;
    assert!(read_smtp_reply(&mut s).await.starts_with("220"));
    send(&mut s, "EHLO client.example.test").await;
    assert!(read_smtp_reply(&mut s).await.starts_with("250"));
    send(
        &mut s,
        &format!("AUTH PLAIN {}", b64("\0smtp-alice@example.org\0secret")),
    )
    .await;
    let reply = read_smtp_reply(&mut s).await;
    assert_eq!(authenticated_at(&reply).as_deref(), Some("s1"), "{reply}");
    assert_eq!(
        s1.logins(),
        [login("PLAIN", "", "smtp-alice@example.org", "secret")]
    );
    let r = auth.requests().pop().unwrap();
    for (name, value) in [
        ("Auth-Protocol", "smtp"),
        ("Auth-Method", "plain"),
        ("Auth-User", "smtp-alice@example.org"),
        ("Auth-SMTP-Helo", "client.example.test"),
        ("Auth-SSL", "on"),
    ] {
        assert_eq!(r.header(name), Some(value), "{name} in {r:?}");
    }
    assert_eq!(r.header("Auth-Pass"), None);
    drop(s);

    assert_eq!(auth.requests().len(), 4);
    for l in ["imaps", "imaps-pass", "pop3s", "smtps"] {
        assert_eq!(routes(&proxy, l, "lookup", "ok"), 1.0, "{l}");
    }
    // Only the probes reached the listeners' own backends, no login.
    assert!(b0.logins().is_empty() && p0.logins().is_empty() && s0.logins().is_empty());
    proxy.stop().await;
}

/// Any `Auth-Status` but OK refuses the login with that text (SMTP: with `Auth-Error-Code`),
/// no backend hears of it, and without `Auth-Wait` the session ends, as in nginx.
#[tokio::test]
async fn lookup_refusal_text_reaches_the_client_no_backend_is_contacted_and_the_session_ends() {
    let setup = Setup::new();
    let (b0, p0, s0) = (
        fleet("b0", "imap").await,
        fleet("p0", "pop3").await,
        fleet("s0", "smtp").await,
    );
    let auth = AuthHttp::start(|r| match r.header("Auth-Protocol") {
        Some("smtp") => AuthReply::refuse("Go away").with("Auth-Error-Code", "535 5.7.0"),
        _ => AuthReply::refuse("Invalid login or password"),
    })
    .await;
    let url = auth.url("/auth");
    let proxy = setup
        .proxy(&[
            listener(
                "imaps",
                "imap",
                "implicit",
                &[b0.addr],
                &user_lookup(&url, ""),
            ),
            listener(
                "pop3s",
                "pop3",
                "implicit",
                &[p0.addr],
                &user_lookup(&url, ""),
            ),
            listener(
                "smtps",
                "smtp",
                "implicit",
                &[s0.addr],
                &user_lookup(&url, ""),
            ),
        ])
        .await;
    let mut s = imap_session(proxy.addr("imaps"), setup.client.clone()).await;
    let reply = imap(&mut s, "a", "LOGIN mallory secret").await;
    assert!(
        reply.ends_with("a NO [AUTHENTICATIONFAILED] Invalid login or password\r\n"),
        "{reply}"
    );
    let rest = read_to_end(&mut s).await;
    assert!(!rest.contains("OK"), "{rest}");

    let mut s = tls(proxy.addr("pop3s"), setup.client.clone()).await;
    assert!(read_line(&mut s).await.starts_with("+OK"));
    send(&mut s, &format!("AUTH PLAIN {}", b64("\0mallory\0secret"))).await;
    assert_eq!(
        read_line(&mut s).await,
        "-ERR [AUTH] Invalid login or password\r\n"
    );
    assert!(!read_to_end(&mut s).await.contains("+OK"));

    let mut s = tls(proxy.addr("smtps"), setup.client.clone()).await;
    assert!(read_smtp_reply(&mut s).await.starts_with("220"));
    send(&mut s, "EHLO client.example.test").await;
    assert!(read_smtp_reply(&mut s).await.starts_with("250"));
    send(&mut s, &format!("AUTH PLAIN {}", b64("\0mallory\0secret"))).await;
    assert_eq!(read_smtp_reply(&mut s).await, "535 5.7.0 Go away\r\n");
    let rest = read_to_end(&mut s).await;
    assert!(!rest.starts_with("2"), "{rest}");

    // Each listener's backend saw its capability probe, nothing else.
    assert_eq!(
        [&b0, &p0, &s0].map(FleetBackend::accepted),
        [1, 1, 1],
        "a refused login reached a backend"
    );
    assert!(b0.logins().is_empty() && p0.logins().is_empty() && s0.logins().is_empty());
    for l in ["imaps", "pop3s", "smtps"] {
        assert_eq!(routes(&proxy, l, "lookup", "refused"), 1.0, "{l}");
    }
    proxy.stop().await;
}

/// A refusal with `Auth-Wait: N` is answered after N seconds, and the client may try again on
/// the same connection (`Auth-Login-Attempt` counts the tries).
#[tokio::test]
async fn lookup_auth_wait_delays_the_refusal_and_the_client_may_try_again() {
    let setup = Setup::new();
    let (b0, b1) = (fleet("b0", "imap").await, fleet("b1", "imap").await);
    let to = b1.addr;
    let auth = AuthHttp::start(move |r| match r.header("Auth-Login-Attempt") {
        Some("1") => AuthReply::refuse("Slow down").with("Auth-Wait", "1"),
        _ => AuthReply::ok(to),
    })
    .await;
    let proxy = setup
        .proxy(&[listener(
            "imaps",
            "imap",
            "implicit",
            &[b0.addr],
            &user_lookup(&auth.url("/"), ""),
        )])
        .await;
    let mut s = imap_session(proxy.addr("imaps"), setup.client.clone()).await;
    let asked = Instant::now();
    let reply = imap(&mut s, "a", "LOGIN waiter secret").await;
    let waited = asked.elapsed();
    assert!(
        reply.ends_with("a NO [AUTHENTICATIONFAILED] Slow down\r\n"),
        "{reply}"
    );
    assert!(
        waited >= Duration::from_millis(950),
        "answered after {waited:?}"
    );
    assert!(waited < Duration::from_secs(3), "answered after {waited:?}");
    let reply = imap(&mut s, "b", "LOGIN waiter secret").await;
    assert_eq!(logged_in_at(&reply).as_deref(), Some("b1"), "{reply}");
    let attempts: Vec<String> = auth
        .requests()
        .iter()
        .map(|r| r.header("Auth-Login-Attempt").unwrap().to_owned())
        .collect();
    assert_eq!(attempts, ["1", "2"]);
    // One keep-alive connection for both.
    assert_eq!(auth.connections(), 1);
    assert_eq!(routes(&proxy, "imaps", "lookup", "refused"), 1.0);
    assert_eq!(routes(&proxy, "imaps", "lookup", "ok"), 1.0);
    drop(s);
    proxy.stop().await;
}

/// A lookup service that cannot be reached, or does not answer within `user_lookup.timeout`,
/// gives the login the protocol's temporary failure (`NO [UNAVAILABLE]`, `454 4.7.0`,
/// `-ERR [SYS/TEMP]`); no backend is tried and the session goes on.
#[tokio::test]
async fn lookup_unreachable_or_timed_out_is_a_temporary_failure_and_the_session_goes_on() {
    let setup = Setup::new();
    let (b0, b1) = (fleet("b0", "imap").await, fleet("b1", "imap").await);
    let (p0, s0) = (fleet("p0", "pop3").await, fleet("s0", "smtp").await);
    let to = b1.addr;
    let slow = AuthHttp::start(move |_| AuthReply::ok(to).after(Duration::from_secs(3))).await;
    let dead = format!("http://{}/auth", closed_port());
    let proxy = setup
        .proxy(&[
            listener(
                "imaps-dead",
                "imap",
                "implicit",
                &[b0.addr],
                &user_lookup(&dead, ""),
            ),
            listener(
                "imaps-slow",
                "imap",
                "implicit",
                &[b0.addr],
                &user_lookup(&slow.url("/auth"), ""),
            ),
            listener(
                "pop3s-dead",
                "pop3",
                "implicit",
                &[p0.addr],
                &user_lookup(&dead, ""),
            ),
            listener(
                "smtps-dead",
                "smtp",
                "implicit",
                &[s0.addr],
                &user_lookup(&dead, ""),
            ),
        ])
        .await;
    for (name, result) in [("imaps-dead", "error"), ("imaps-slow", "timeout")] {
        let mut s = imap_session(proxy.addr(name), setup.client.clone()).await;
        let asked = Instant::now();
        let reply = imap(&mut s, "a", "LOGIN alice secret").await;
        assert!(reply.starts_with("a NO [UNAVAILABLE]"), "{name}: {reply}");
        assert!(
            asked.elapsed() < Duration::from_secs(2),
            "{name}: {:?}",
            asked.elapsed()
        );
        // The session goes on, and the client may try again.
        assert!(imap(&mut s, "b", "NOOP").await.contains("b OK"), "{name}");
        let reply = imap(&mut s, "c", "LOGIN alice secret").await;
        assert!(reply.starts_with("c NO [UNAVAILABLE]"), "{name}: {reply}");
        assert_eq!(routes(&proxy, name, "lookup", result), 2.0, "{name}");
        drop(s);
    }
    assert_eq!(slow.requests().len(), 2);
    // Every lookup timed, answered or not.
    let text = proxy.metrics.encode();
    for name in ["imaps-dead", "imaps-slow"] {
        let series = format!("mailfront_user_lookup_duration_seconds_count{{listener=\"{name}\"}}");
        assert_eq!(metric(&text, &series), Some(2.0), "{series} in:\n{text}");
    }

    let mut s = tls(proxy.addr("pop3s-dead"), setup.client.clone()).await;
    assert!(read_line(&mut s).await.starts_with("+OK"));
    send(&mut s, "USER alice").await;
    assert!(read_line(&mut s).await.starts_with("+OK"));
    send(&mut s, "PASS secret").await;
    assert!(read_line(&mut s).await.starts_with("-ERR [SYS/TEMP]"));
    send(&mut s, &format!("AUTH PLAIN {}", b64("\0alice\0secret"))).await;
    assert!(read_line(&mut s).await.starts_with("-ERR [SYS/TEMP]"));
    send(&mut s, "NOOP").await;
    assert!(read_line(&mut s).await.starts_with("-ERR"), "not logged in");
    drop(s);

    let mut s = tls(proxy.addr("smtps-dead"), setup.client.clone()).await;
    assert!(read_smtp_reply(&mut s).await.starts_with("220"));
    send(&mut s, "EHLO client.example.test").await;
    assert!(read_smtp_reply(&mut s).await.starts_with("250"));
    send(&mut s, &format!("AUTH PLAIN {}", b64("\0alice\0secret"))).await;
    let reply = read_smtp_reply(&mut s).await;
    assert!(reply.starts_with("454 4.7.0"), "{reply}");
    send(&mut s, "NOOP").await;
    assert!(
        read_smtp_reply(&mut s).await.starts_with("250"),
        "the session goes on"
    );
    drop(s);

    assert_eq!(routes(&proxy, "pop3s-dead", "lookup", "error"), 2.0);
    assert_eq!(routes(&proxy, "smtps-dead", "lookup", "error"), 1.0);
    assert!(b0.logins().is_empty() && b1.logins().is_empty());
    assert!(p0.logins().is_empty() && s0.logins().is_empty());
    assert_eq!(b1.accepted(), 0);
    proxy.stop().await;
}

/// An `Auth-Server` outside the allow-list (by default the listener's own backends' addresses)
/// is a temporary failure: a compromised lookup cannot send a password anywhere. The backend is
/// never contacted; `allowed_backends` widens the list.
#[tokio::test]
async fn lookup_auth_server_outside_the_allow_list_is_a_temporary_failure_and_never_contacted() {
    let setup = Setup::new();
    let b0 = fleet("b0", "imap").await;
    let evil = FleetBackend::start_on("127.0.0.2", "evil", Speaks::Imap, FleetTls::None).await;
    let to = evil.addr;
    let auth = AuthHttp::start(move |_| AuthReply::ok(to)).await;
    let url = auth.url("/auth");
    let proxy = setup
        .proxy(&[
            listener(
                "imaps",
                "imap",
                "implicit",
                &[b0.addr],
                &user_lookup(&url, ""),
            ),
            listener(
                "imaps-wide",
                "imap",
                "implicit",
                &[b0.addr],
                &user_lookup(&url, "      allowed_backends: [\"127.0.0.0/30\"]\n"),
            ),
        ])
        .await;
    let mut s = imap_session(proxy.addr("imaps"), setup.client.clone()).await;
    let reply = imap(&mut s, "a", "LOGIN alice secret").await;
    assert!(reply.starts_with("a NO [UNAVAILABLE]"), "{reply}");
    assert_eq!(evil.accepted(), 0, "the disallowed backend was contacted");
    assert!(b0.logins().is_empty(), "another backend got the login");
    assert!(imap(&mut s, "b", "NOOP").await.contains("b OK"));
    assert_eq!(routes(&proxy, "imaps", "lookup", "disallowed"), 1.0);
    drop(s);

    let (_s, reply) = imap_login(
        proxy.addr("imaps-wide"),
        setup.client.clone(),
        "alice",
        "pw",
    )
    .await;
    assert_eq!(logged_in_at(&reply).as_deref(), Some("evil"), "{reply}");
    assert_eq!(routes(&proxy, "imaps-wide", "lookup", "ok"), 1.0);
    drop(_s);
    proxy.stop().await;
}

/// `Auth-Status: OK` without `Auth-Server`: the lookup has no opinion, and the rest of the
/// order decides (`user_map`, then the pool).
#[tokio::test]
async fn lookup_ok_without_a_backend_leaves_the_choice_to_the_map_then_the_pool() {
    let setup = Setup::new();
    let (b0, b1) = (fleet("b0", "imap").await, fleet("b1", "imap").await);
    let auth = AuthHttp::start(|_| AuthReply::ok_without_backend()).await;
    setup.write("users.yaml", &map_text(&[("alice@example.org", &b1)]));
    let proxy = setup
        .proxy(&[listener(
            "imaps",
            "imap",
            "implicit",
            &[b0.addr],
            &format!(
                "{}    user_map: users.yaml\n",
                user_lookup(&auth.url("/"), "")
            ),
        )])
        .await;
    let addr = proxy.addr("imaps");
    assert_eq!(
        lands_on(addr, &setup.client, "alice@example.org").await,
        "b1"
    );
    assert_eq!(lands_on(addr, &setup.client, "bob@example.org").await, "b0");
    assert_eq!(auth.requests().len(), 2);
    assert_eq!(routes(&proxy, "imaps", "map", "ok"), 1.0);
    assert_eq!(routes(&proxy, "imaps", "pool", "ok"), 1.0);
    assert_eq!(routes(&proxy, "imaps", "lookup", "ok"), 0.0);
    proxy.stop().await;
}

// ---------------------------------------------------------------------------------------------
// SMTP and POP3 routing, SASL forms

/// SMTP submission routed by `user_map` to two backends, by AUTH PLAIN with and without an
/// initial response and AUTH LOGIN: mailfront sends the backend the mechanism alone and answers
/// its challenges, so the backend gets the client's credentials whatever form the client used.
#[tokio::test]
async fn smtp_auth_is_routed_by_the_user_map_in_every_sasl_form() {
    let setup = Setup::new();
    let (s0, s1, s2) = (
        fleet("s0", "smtp").await,
        fleet("s1", "smtp").await,
        fleet("s2", "smtp").await,
    );
    setup.write(
        "users.yaml",
        &map_text(&[("alice@example.org", &s1), ("@example.net", &s2)]),
    );
    let proxy = setup
        .proxy(&[listener(
            "smtps",
            "smtp",
            "implicit",
            &[s0.addr],
            "    user_map: users.yaml\n",
        )])
        .await;
    let session = async || {
        let mut s = tls(proxy.addr("smtps"), setup.client.clone()).await;
        assert!(read_smtp_reply(&mut s).await.starts_with("220"));
        send(&mut s, "EHLO client.example.test").await;
        let ehlo = read_smtp_reply(&mut s).await;
        assert!(ehlo.contains("AUTH PLAIN LOGIN"), "{ehlo}");
        s
    };

    // PLAIN with an initial response; then mail goes to the same backend.
    let mut s = session().await;
    send(
        &mut s,
        &format!("AUTH PLAIN {}", b64("\0alice@example.org\0pw-a")),
    )
    .await;
    let reply = read_smtp_reply(&mut s).await;
    assert_eq!(authenticated_at(&reply).as_deref(), Some("s1"), "{reply}");
    send(&mut s, "MAIL FROM:<alice@example.org>").await;
    assert_eq!(read_smtp_reply(&mut s).await, "250 2.0.0 s1\r\n");
    drop(s);

    // PLAIN without: mailfront's own empty challenge.
    let mut s = session().await;
    send(&mut s, "AUTH PLAIN").await;
    assert_eq!(read_smtp_reply(&mut s).await, "334 \r\n");
    send(&mut s, &b64("\0bob@example.net\0pw-b")).await;
    let reply = read_smtp_reply(&mut s).await;
    assert_eq!(authenticated_at(&reply).as_deref(), Some("s2"), "{reply}");
    drop(s);

    // LOGIN: mailfront asks for the user name and the password itself.
    let mut s = session().await;
    send(&mut s, "AUTH LOGIN").await;
    assert_eq!(read_smtp_reply(&mut s).await, "334 VXNlcm5hbWU6\r\n");
    send(&mut s, &b64("carol@Example.NET")).await;
    assert_eq!(read_smtp_reply(&mut s).await, "334 UGFzc3dvcmQ6\r\n");
    send(&mut s, &b64("pw-c")).await;
    let reply = read_smtp_reply(&mut s).await;
    assert_eq!(authenticated_at(&reply).as_deref(), Some("s2"), "{reply}");
    drop(s);

    // Unmapped: the listener's backend.
    let mut s = session().await;
    send(
        &mut s,
        &format!("AUTH PLAIN {}", b64("\0dave@other.test\0pw-d")),
    )
    .await;
    let reply = read_smtp_reply(&mut s).await;
    assert_eq!(authenticated_at(&reply).as_deref(), Some("s0"), "{reply}");
    drop(s);

    assert_eq!(
        s1.logins(),
        [login("PLAIN", "", "alice@example.org", "pw-a")]
    );
    assert_eq!(
        s2.logins(),
        [
            login("PLAIN", "", "bob@example.net", "pw-b"),
            login("LOGIN", "", "carol@Example.NET", "pw-c"),
        ]
    );
    assert_eq!(s0.logins(), [login("PLAIN", "", "dave@other.test", "pw-d")]);
    assert_eq!(routes(&proxy, "smtps", "map", "ok"), 3.0);
    assert_eq!(routes(&proxy, "smtps", "pool", "ok"), 1.0);
    proxy.stop().await;
}

/// POP3 routed by `user_map` to two backends, by USER/PASS, AUTH PLAIN with and without an
/// initial response, and AUTH LOGIN.
#[tokio::test]
async fn pop3_logins_are_routed_by_the_user_map_in_every_form() {
    let setup = Setup::new();
    let (p0, p1, p2) = (
        fleet("p0", "pop3").await,
        fleet("p1", "pop3").await,
        fleet("p2", "pop3").await,
    );
    setup.write(
        "users.yaml",
        &map_text(&[("alice@example.org", &p1), ("@example.net", &p2)]),
    );
    let proxy = setup
        .proxy(&[listener(
            "pop3s",
            "pop3",
            "implicit",
            &[p0.addr],
            "    user_map: users.yaml\n",
        )])
        .await;
    let session = async || {
        let mut s = tls(proxy.addr("pop3s"), setup.client.clone()).await;
        assert!(read_line(&mut s).await.starts_with("+OK"));
        s
    };

    let mut s = session().await;
    send(&mut s, "USER alice@example.org").await;
    assert!(read_line(&mut s).await.starts_with("+OK"));
    send(&mut s, "PASS pw-a").await;
    assert_eq!(read_line(&mut s).await, "+OK p1 logged in\r\n");
    send(&mut s, "STAT").await;
    assert_eq!(read_line(&mut s).await, "+OK served by p1\r\n");
    drop(s);

    let mut s = session().await;
    send(
        &mut s,
        &format!("AUTH PLAIN {}", b64("\0bob@example.net\0pw-b")),
    )
    .await;
    assert_eq!(read_line(&mut s).await, "+OK p2 logged in\r\n");
    drop(s);

    let mut s = session().await;
    send(&mut s, "AUTH PLAIN").await;
    assert_eq!(read_line(&mut s).await, "+ \r\n");
    send(&mut s, &b64("\0carol@example.net\0pw-c")).await;
    assert_eq!(read_line(&mut s).await, "+OK p2 logged in\r\n");
    drop(s);

    let mut s = session().await;
    send(&mut s, "AUTH LOGIN").await;
    assert_eq!(read_line(&mut s).await, "+ VXNlcm5hbWU6\r\n");
    send(&mut s, &b64("erin@example.net")).await;
    assert_eq!(read_line(&mut s).await, "+ UGFzc3dvcmQ6\r\n");
    send(&mut s, &b64("pw-e")).await;
    assert_eq!(read_line(&mut s).await, "+OK p2 logged in\r\n");
    drop(s);

    let mut s = session().await;
    send(&mut s, "USER dave@other.test").await;
    assert!(read_line(&mut s).await.starts_with("+OK"));
    send(&mut s, "PASS pw-d").await;
    assert_eq!(read_line(&mut s).await, "+OK p0 logged in\r\n");
    drop(s);

    assert_eq!(
        p1.logins(),
        [login("USER", "", "alice@example.org", "pw-a")]
    );
    assert_eq!(
        p2.logins(),
        [
            login("PLAIN", "", "bob@example.net", "pw-b"),
            login("PLAIN", "", "carol@example.net", "pw-c"),
            login("LOGIN", "", "erin@example.net", "pw-e"),
        ]
    );
    assert_eq!(p0.logins(), [login("USER", "", "dave@other.test", "pw-d")]);
    assert_eq!(routes(&proxy, "pop3s", "map", "ok"), 4.0);
    assert_eq!(routes(&proxy, "pop3s", "pool", "ok"), 1.0);
    proxy.stop().await;
}

/// IMAP AUTHENTICATE on a routed listener: PLAIN with SASL-IR (routed by the authentication
/// identity, not the authorization identity), PLAIN without (mailfront's own `+ `), and LOGIN
/// (mailfront's own `Username:`/`Password:`), each on the mapped backend with the client's
/// credentials.
#[tokio::test]
async fn imap_authenticate_plain_with_and_without_initial_response_and_login_are_routed() {
    let setup = Setup::new();
    let (b0, b1, b2) = (
        fleet("b0", "imap").await,
        fleet("b1", "imap").await,
        fleet("b2", "imap").await,
    );
    setup.write(
        "users.yaml",
        &map_text(&[("alice@example.org", &b1), ("@example.net", &b2)]),
    );
    let proxy = setup
        .proxy(&[listener(
            "imaps",
            "imap",
            "implicit",
            &[b0.addr],
            "    user_map: users.yaml\n",
        )])
        .await;
    let addr = proxy.addr("imaps");

    // SASL-IR; the authorization identity maps elsewhere (b2) and must not decide.
    let mut s = imap_session(addr, setup.client.clone()).await;
    let caps = imap(&mut s, "c", "CAPABILITY").await;
    assert!(
        caps.contains(" SASL-IR") && caps.contains(" AUTH=PLAIN"),
        "{caps}"
    );
    let ir = b64("bob@example.net\0alice@example.org\0pw-a");
    let reply = imap(&mut s, "a", &format!("AUTHENTICATE PLAIN {ir}")).await;
    assert_eq!(logged_in_at(&reply).as_deref(), Some("b1"), "{reply}");
    assert!(reply.starts_with("a OK"), "{reply}");
    assert!(imap(&mut s, "n", "NOOP").await.contains("served by b1"));
    drop(s);

    // PLAIN without an initial response.
    let mut s = imap_session(addr, setup.client.clone()).await;
    send(&mut s, "a AUTHENTICATE PLAIN").await;
    assert_eq!(read_line(&mut s).await, "+ \r\n");
    send(&mut s, &b64("\0carol@example.net\0pw-c")).await;
    let reply = read_until_tag(&mut s, "a").await;
    assert_eq!(logged_in_at(&reply).as_deref(), Some("b2"), "{reply}");
    drop(s);

    // LOGIN.
    let mut s = imap_session(addr, setup.client.clone()).await;
    send(&mut s, "a AUTHENTICATE LOGIN").await;
    assert_eq!(read_line(&mut s).await, "+ VXNlcm5hbWU6\r\n");
    send(&mut s, &b64("dave@example.net")).await;
    assert_eq!(read_line(&mut s).await, "+ UGFzc3dvcmQ6\r\n");
    send(&mut s, &b64("pw-d")).await;
    let reply = read_until_tag(&mut s, "a").await;
    assert_eq!(logged_in_at(&reply).as_deref(), Some("b2"), "{reply}");
    assert!(imap(&mut s, "n", "NOOP").await.contains("served by b2"));
    drop(s);

    assert_eq!(
        b1.logins(),
        [login(
            "PLAIN",
            "bob@example.net",
            "alice@example.org",
            "pw-a"
        )]
    );
    assert_eq!(
        b2.logins(),
        [
            login("PLAIN", "", "carol@example.net", "pw-c"),
            login("LOGIN", "", "dave@example.net", "pw-d"),
        ]
    );
    // A mechanism whose user name comes only after the backend's challenge cannot be routed:
    // hidden, and refused here without a backend.
    let mut s = imap_session(addr, setup.client.clone()).await;
    let caps = imap(&mut s, "c", "CAPABILITY").await;
    assert!(!caps.contains("CRAM-MD5"), "{caps}");
    let reply = imap(&mut s, "a", "AUTHENTICATE CRAM-MD5").await;
    assert!(reply.starts_with("a NO"), "{reply}");
    drop(s);
    assert!(b0.logins().is_empty());
    assert_eq!(
        [&b0, &b1, &b2]
            .map(FleetBackend::accepted)
            .iter()
            .sum::<usize>(),
        4,
        "the probe and three logins"
    );
    assert_eq!(routes(&proxy, "imaps", "map", "ok"), 3.0);
    proxy.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Lazy connect

/// What a session shows before login, in comparable form.
#[derive(Debug, PartialEq, Eq)]
struct Shown {
    greeting: String,
    /// IMAP capability tokens, SMTP EHLO lines after the first, POP3 CAPA lines.
    capabilities: Vec<String>,
}

/// The IMAP capability list a routed listener must show after TLS: the backend's, less
/// CRAM-MD5 (its user name comes only after the backend's challenge).
fn imap_expected() -> Vec<String> {
    FLEET_IMAP_CAPABILITIES
        .split(' ')
        .filter(|t| *t != "AUTH=CRAM-MD5")
        .map(str::to_owned)
        .collect()
}

fn smtp_expected() -> Vec<String> {
    FLEET_SMTP_EHLO
        .iter()
        .map(|k| k.replace(" CRAM-MD5", ""))
        .collect()
}

fn pop3_expected() -> Vec<String> {
    FLEET_POP3_CAPA
        .iter()
        .map(|k| k.replace(" CRAM-MD5", ""))
        .collect()
}

fn imap_tokens(response: &str) -> Vec<String> {
    let line = response
        .lines()
        .find_map(|l| l.strip_prefix("* CAPABILITY "))
        .unwrap_or_else(|| panic!("no CAPABILITY in {response}"));
    line.split(' ').map(str::to_owned).collect()
}

fn smtp_keywords(reply: &str) -> Vec<String> {
    reply
        .lines()
        .skip(1)
        .map(|l| l.get(4..).unwrap_or("").to_owned())
        .collect()
}

/// One session that never logs in: handshake(s), the capability request, held open.
async fn never_logs_in(
    protocol: &'static str,
    tls_mode: &'static str,
    addr: SocketAddr,
    client: Arc<rustls::ClientConfig>,
) -> (Shown, Box<dyn Send>) {
    match (protocol, tls_mode) {
        ("imap", "implicit") => {
            let mut s = tls(addr, client).await;
            let greeting = read_line(&mut s).await;
            let caps = imap(&mut s, "c", "CAPABILITY").await;
            let shown = Shown {
                greeting,
                capabilities: imap_tokens(&caps),
            };
            (shown, Box::new(s))
        }
        ("imap", "starttls") => {
            let mut p = BufReader::new(TcpStream::connect(addr).await.unwrap());
            let greeting = read_line(&mut p).await;
            let cleartext = imap(&mut p, "c", "CAPABILITY").await;
            assert!(cleartext.contains("STARTTLS"), "{cleartext}");
            assert!(!cleartext.contains("AUTH="), "{cleartext}");
            assert!(imap(&mut p, "s", "STARTTLS").await.starts_with("s OK"));
            let mut s = BufReader::new(tls_upgrade(p.into_inner(), SNI, client).await.unwrap());
            let caps = imap(&mut s, "d", "CAPABILITY").await;
            let shown = Shown {
                greeting,
                capabilities: imap_tokens(&caps),
            };
            (shown, Box::new(s))
        }
        ("smtp", "implicit") => {
            let mut s = tls(addr, client).await;
            let greeting = read_smtp_reply(&mut s).await;
            send(&mut s, "EHLO client.example.test").await;
            let ehlo = read_smtp_reply(&mut s).await;
            assert!(ehlo.starts_with(&format!("250-{SNI}")), "{ehlo}");
            let shown = Shown {
                greeting,
                capabilities: smtp_keywords(&ehlo),
            };
            (shown, Box::new(s))
        }
        ("smtp", "starttls") => {
            let mut p = BufReader::new(TcpStream::connect(addr).await.unwrap());
            let greeting = read_smtp_reply(&mut p).await;
            send(&mut p, "EHLO client.example.test").await;
            let cleartext = read_smtp_reply(&mut p).await;
            assert!(cleartext.contains("STARTTLS"), "{cleartext}");
            send(&mut p, "STARTTLS").await;
            assert!(read_smtp_reply(&mut p).await.starts_with("220"));
            let mut s = BufReader::new(tls_upgrade(p.into_inner(), SNI, client).await.unwrap());
            send(&mut s, "EHLO client.example.test").await;
            let ehlo = read_smtp_reply(&mut s).await;
            assert!(ehlo.starts_with(&format!("250-{SNI}")), "{ehlo}");
            let shown = Shown {
                greeting,
                capabilities: smtp_keywords(&ehlo),
            };
            (shown, Box::new(s))
        }
        ("pop3", "implicit") => {
            let mut s = tls(addr, client).await;
            let greeting = read_line(&mut s).await;
            send(&mut s, "CAPA").await;
            let capa = read_multiline(&mut s).await;
            let lines: Vec<&str> = capa.lines().collect();
            assert!(lines[0].starts_with("+OK"), "{capa}");
            let shown = Shown {
                greeting,
                capabilities: lines[1..lines.len() - 1]
                    .iter()
                    .map(|l| (*l).to_owned())
                    .collect(),
            };
            (shown, Box::new(s))
        }
        other => panic!("no such case {other:?}"),
    }
}

/// 20 sessions that only handshake, ask for capabilities and stay open: the listener's backend
/// sees exactly one connection in all (the capability probe), and every session is shown the
/// backend's capabilities less what a routed listener hides, under mailfront's own greeting.
async fn lazy_connect(protocol: &'static str, tls_mode: &'static str, expected: Vec<String>) {
    let setup = Setup::new();
    let backend = fleet("backend7", protocol).await;
    let proxy = setup
        .proxy(&[listener(
            "routed",
            protocol,
            tls_mode,
            &[backend.addr],
            "    user_affinity: true\n",
        )])
        .await;
    let mut sessions = JoinSet::new();
    for _ in 0..20 {
        let (addr, client) = (proxy.addr("routed"), setup.client.clone());
        sessions.spawn(never_logs_in(protocol, tls_mode, addr, client));
    }
    let mut held = Vec::new();
    while let Some(done) = sessions.join_next().await {
        let (shown, s) = done.unwrap();
        assert!(
            !shown.greeting.contains("backend7") && !shown.greeting.contains('<'),
            "{protocol}/{tls_mode}: the backend's greeting reached the client: {}",
            shown.greeting
        );
        assert_eq!(shown.capabilities, expected, "{protocol}/{tls_mode}");
        held.push(s);
    }
    assert_eq!(
        backend.accepted(),
        1,
        "{protocol}/{tls_mode}: backend connections for 20 sessions that never logged in"
    );
    assert!(backend.logins().is_empty());
    drop(held);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lazy_connect_imap_implicit_tls() {
    lazy_connect("imap", "implicit", imap_expected()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lazy_connect_imap_starttls() {
    lazy_connect("imap", "starttls", imap_expected()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lazy_connect_smtp_implicit_tls() {
    lazy_connect("smtp", "implicit", smtp_expected()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lazy_connect_smtp_starttls() {
    lazy_connect("smtp", "starttls", smtp_expected()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lazy_connect_pop3_implicit_tls() {
    lazy_connect("pop3", "implicit", pop3_expected()).await;
}

/// What a session shows before login, on a routed implicit-TLS listener of `protocol`: IMAP
/// capability tokens, SMTP EHLO keywords, POP3 CAPA lines.
async fn shown_before_login(
    protocol: &'static str,
    addr: SocketAddr,
    client: Arc<rustls::ClientConfig>,
) -> Vec<String> {
    never_logs_in(protocol, "implicit", addr, client)
        .await
        .0
        .capabilities
}

/// What a routed listener shows before login is its own backends' (learned by the probe): a
/// login routed to a mapped backend outside the pool (a legacy server offering something else)
/// does not change what the listener's next sessions are shown.
#[tokio::test]
async fn a_mapped_backends_capabilities_do_not_become_what_the_listener_shows_before_login() {
    let setup = Setup::new();
    let mut fleets = Vec::new();
    let mut listeners = Vec::new();
    for protocol in ["imap", "smtp", "pop3"] {
        let (pool, legacy) = (
            fleet("pool", protocol).await,
            fleet("legacy", protocol).await,
        );
        legacy.advertise("XLEGACY");
        let map = format!("{protocol}.yaml");
        setup.write(&map, &map_text(&[("alice@example.org", &legacy)]));
        listeners.push(listener(
            protocol,
            protocol,
            "implicit",
            &[pool.addr],
            &format!("    user_map: {map}\n"),
        ));
        fleets.push((protocol, pool, legacy));
    }
    let proxy = setup.proxy(&listeners).await;
    let expected = [imap_expected(), smtp_expected(), pop3_expected()];
    let mut leaked = Vec::new();
    for ((protocol, _pool, legacy), expected) in fleets.iter().zip(expected) {
        let addr = proxy.addr(protocol);
        let before = shown_before_login(protocol, addr, setup.client.clone()).await;
        assert_eq!(before, expected, "{protocol}");
        // alice logs in on the legacy backend.
        let mut s = tls(addr, setup.client.clone()).await;
        match *protocol {
            "imap" => {
                read_line(&mut s).await;
                let reply = imap(&mut s, "a", "LOGIN alice@example.org secret").await;
                assert_eq!(logged_in_at(&reply).as_deref(), Some("legacy"), "{reply}");
            }
            "smtp" => {
                read_smtp_reply(&mut s).await;
                send(&mut s, "EHLO client.example.test").await;
                read_smtp_reply(&mut s).await;
                send(
                    &mut s,
                    &format!("AUTH PLAIN {}", b64("\0alice@example.org\0secret")),
                )
                .await;
                let reply = read_smtp_reply(&mut s).await;
                assert_eq!(
                    authenticated_at(&reply).as_deref(),
                    Some("legacy"),
                    "{reply}"
                );
            }
            _ => {
                read_line(&mut s).await;
                send(
                    &mut s,
                    &format!("AUTH PLAIN {}", b64("\0alice@example.org\0secret")),
                )
                .await;
                assert_eq!(read_line(&mut s).await, "+OK legacy logged in\r\n");
            }
        }
        assert_eq!(legacy.logins().len(), 1, "{protocol}");
        drop(s);
        let after = shown_before_login(protocol, addr, setup.client.clone()).await;
        if after != expected {
            leaked.push(format!("{protocol}: {after:?}"));
        }
    }
    assert!(
        leaked.is_empty(),
        "the legacy backend's capabilities became the listener's: {leaked:?}"
    );
    proxy.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Observability

/// The `authentication` log line of a routed login names the route source and the backend; the
/// counter of routed logins moves under the source that decided. The real binary, for its JSON
/// log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_authentication_log_line_names_the_route_and_the_backend() {
    let setup = Setup::new();
    let (b0, b1) = (fleet("b0", "imap").await, fleet("b1", "imap").await);
    setup.write("users.yaml", &map_text(&[("alice@example.org", &b1)]));
    let yaml = config_yaml(
        &[&setup.cert],
        &[
            listener(
                "imaps-map",
                "imap",
                "implicit",
                &[b0.addr],
                "    user_map: users.yaml\n",
            ),
            listener(
                "imaps-aff",
                "imap",
                "implicit",
                &[b0.addr, b1.addr],
                "    user_affinity: true\n",
            ),
        ],
        "log:\n  format: json\n  level: info\n",
    );
    let path = setup.dir().join("config.yaml");
    std::fs::write(&path, yaml).unwrap();
    let mut binary = Binary::start(&path);
    let mut address = |name: &str| -> SocketAddr {
        let line = binary.seen_or_wait_for(&["listening", &format!("\"{name}\"")]);
        json_field(&line, "address").unwrap().parse().unwrap()
    };
    let map_addr = address("imaps-map");
    let aff_addr = address("imaps-aff");
    let admin: SocketAddr = json_field(
        &binary.seen_or_wait_for(&["metrics endpoint listening"]),
        "address",
    )
    .unwrap()
    .parse()
    .unwrap();

    let (mut s, reply) =
        imap_login(map_addr, setup.client.clone(), "alice@example.org", "pw").await;
    assert_eq!(logged_in_at(&reply).as_deref(), Some("b1"), "{reply}");
    imap(&mut s, "z", "LOGOUT").await;
    drop(s);
    let user = "bob@example.org";
    let home = [b0.addr, b1.addr][affinity::order(user.as_bytes(), &[b0.addr, b1.addr])[0]];
    let (mut s, reply) = imap_login(aff_addr, setup.client.clone(), user, "pw").await;
    assert!(logged_in_at(&reply).is_some(), "{reply}");
    imap(&mut s, "z", "LOGOUT").await;
    drop(s);
    let metrics = scrape(admin).await;

    let auth = |binary: &mut Binary, listener: &str| {
        let line = binary.seen_or_wait_for(&["\"authentication\"", &format!("\"{listener}\"")]);
        assert_eq!(
            json_field(&line, "message").as_deref(),
            Some("authentication"),
            "{line}"
        );
        line
    };
    let line = auth(&mut binary, "imaps-map");
    assert_eq!(
        json_field(&line, "result").as_deref(),
        Some("success"),
        "{line}"
    );
    assert_eq!(json_field(&line, "route").as_deref(), Some("map"), "{line}");
    assert_eq!(
        json_field(&line, "backend"),
        Some(b1.addr.to_string()),
        "{line}"
    );
    let line = auth(&mut binary, "imaps-aff");
    assert_eq!(
        json_field(&line, "route").as_deref(),
        Some("affinity"),
        "{line}"
    );
    assert_eq!(
        json_field(&line, "backend"),
        Some(home.to_string()),
        "{line}"
    );
    binary.stop();

    for (listener, source) in [("imaps-map", "map"), ("imaps-aff", "affinity")] {
        let series = format!(
            "mailfront_user_routes_total{{listener=\"{listener}\",result=\"ok\",source=\"{source}\"}}"
        );
        assert_eq!(
            metric(&metrics, &series),
            Some(1.0),
            "{series} in:\n{metrics}"
        );
    }
    assert!(
        metrics.contains(
            "mailfront_user_map_reloads_total{listener=\"imaps-map\",result=\"failure\"} 0"
        ),
        "{metrics}"
    );
}

/// A listener whose own backends do not answer (a silent pool: the probe cannot learn what to
/// show before login) still greets every session at once, with one probe for a burst of
/// sessions rather than one each in turn, and a mapped user on a live backend still logs in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_pool_costs_one_probe_for_a_burst_and_mapped_users_still_log_in() {
    let setup = Setup::new();
    let live = fleet("live", "imap").await;
    // Accepts and never says a word.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = accepted.clone();
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = silent.accept().await {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            held.push(tcp);
        }
    });
    setup.write(
        "users.yaml",
        &format!("erin@example.org: \"{}\"\n", live.addr),
    );
    let yaml = config_yaml(
        &[&setup.cert],
        &[listener(
            "imaps",
            "imap",
            "implicit",
            &[silent_addr],
            "    user_map: users.yaml\n",
        )],
        &EXTRA.replacen(
            "shutdown_grace: 200ms\n",
            "shutdown_grace: 200ms\n  backend_connect: 300ms\n",
            1,
        ),
    );
    let proxy = Proxy::start(&yaml, setup.dir()).await;
    let started = Instant::now();
    let mut sessions = JoinSet::new();
    for _ in 0..8 {
        let (addr, client) = (proxy.addr("imaps"), setup.client.clone());
        sessions.spawn(async move {
            let mut s = imap_session(addr, client).await;
            imap(&mut s, "c", "CAPABILITY").await
        });
    }
    while let Some(reply) = sessions.join_next().await {
        let reply = reply.unwrap();
        assert!(reply.contains("* CAPABILITY IMAP4rev1"), "{reply}");
        assert!(reply.contains("c OK"), "{reply}");
    }
    // One probe for the burst, bounded by timeouts.backend_connect; not eight in a row.
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the burst waited {:?}",
        started.elapsed()
    );
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
    let mut s = imap_session(proxy.addr("imaps"), setup.client.clone()).await;
    let reply = imap(&mut s, "a", "LOGIN erin@example.org secret").await;
    assert_eq!(logged_in_at(&reply).as_deref(), Some("live"), "{reply}");
    drop(s);
    proxy.stop().await;
    hold.abort();
}
