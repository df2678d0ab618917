//! Timing moved here from the real-socket suites (`imap`, `pop3`, `smtp`, `limits`,
//! `foundation`), where it was waited out on the wall clock and judged by windows ("between
//! 450 ms and 3 s") that a loaded machine breaks: the idle and login deadlines, the auth
//! throttle's window and the graceful drain, each asserted here to the exact virtual instant.
//! Those suites keep a real-socket test where the configuration has to reach a session or the
//! server has to act (a short configured timeout, no assertion on how long it took).

use std::net::IpAddr;

use mailfront::close::CloseClass;
use mailfront::limits::AuthThrottle;
use tokio::task::JoinHandle;

use super::*;

/// How often a trickling client sends an octet: well inside [`IDLE`] and [`SHORT_LOGIN`], and
/// no divisor of either, so no octet arrives at the instant a deadline fires.
const TICK: Duration = Duration::from_secs(7);

/// `limits.auth_failure_window` of the throttle tests: inside [`IDLE`], so a session can wait it
/// out without idling.
const WINDOW: Duration = Duration::from_secs(120);

/// The client address every [`session`] has.
fn client_ip() -> IpAddr {
    "192.0.2.10".parse().unwrap()
}

/// Runs the listener's protocol driver on `io`, after the TLS handshake on an implicit-TLS
/// listener, and logs the close (which counts it in the close metrics), as the server does.
async fn run(mut session: Session, io: DuplexStream) -> EndReason {
    let context = session.listener().clone();
    let client = match context.config.tls {
        TlsMode::Starttls => ClientStream::Plain(io),
        TlsMode::Implicit => {
            let (client, info, took) = ClientStream::Plain(io)
                .upgrade(&context.handshaker)
                .await
                .unwrap();
            session.tls_established(info, took, false);
            client
        }
    };
    let reason = match context.config.protocol {
        Protocol::Smtp => mailfront::smtp::session::serve(client, &mut session).await,
        Protocol::Imap => mailfront::imap::session::serve(client, &mut session).await,
        Protocol::Pop3 => mailfront::pop3::session::serve(client, &mut session).await,
    };
    session.log_close(&reason);
    reason
}

/// `session` served on a new pipe: the client's end of it, and the session's task.
fn start(session: Session) -> (DuplexStream, JoinHandle<EndReason>) {
    let (client, io) = duplex(PIPE);
    (client, tokio::spawn(run(session, io)))
}

/// Sends `octets` one every [`TICK`], cycling, so no line ever ends, until the session says
/// something unasked; returns that line. Fails after `most` of virtual time.
async fn trickle_until_answered<S: AsyncRead + AsyncWrite + Unpin>(
    client: &mut S,
    octets: &[u8],
    most: Duration,
) -> String {
    let started = Instant::now();
    for octet in octets.iter().cycle() {
        if let Ok(said) = tokio::time::timeout(TICK, line(client)).await {
            return said;
        }
        assert!(started.elapsed() < most, "never cut off");
        client.write_all(&[*octet]).await.unwrap();
    }
    String::new()
}

/// The login deadline's end: `reason` is the one the close metric counts as
/// `reason="login_timeout",side="client"`, and it was counted once.
fn assert_login_timeout(context: &ListenerContext, reason: &EndReason) {
    assert_eq!(*reason, EndReason::LoginTimeout);
    assert_eq!(reason.as_str(), "login_timeout");
    assert_eq!(reason.side().as_str(), "client");
    assert_eq!(context.metrics.sessions_closed(CloseClass::LoginTimeout), 1);
}

// ---- idle -------------------------------------------------------------------------------------

/// From `pop3::an_idle_client_is_told_before_the_close`: on an implicit-TLS listener, a client
/// that says nothing after mailfront's greeting is told so exactly `timeouts.idle` later, and no
/// backend was ever connected.
#[tokio::test(start_paused = true)]
async fn pop3_an_idle_client_is_told_before_the_close_after_exactly_the_idle_timeout() {
    let pki = pki();
    let (context, mut backends) = listener(Protocol::Pop3, TlsMode::Implicit, &pki);
    let (io, server) = start(session(context));
    let mut client = tls_client(io, &pki).await;
    assert_eq!(line(&mut client).await, format!("+OK {HOST} ready\r\n"));
    let greeted = Instant::now();
    assert_eq!(
        line(&mut client).await,
        "-ERR Disconnected for inactivity\r\n"
    );
    assert_eq!(greeted.elapsed(), IDLE);
    assert_eq!(rest(&mut client).await, "");
    assert_eq!(server.await.unwrap(), EndReason::ClientIdle);
    assert!(backends.try_recv().is_err(), "no backend connection");
}

/// From `pop3::an_idle_cleartext_client_is_told_before_the_close`: octets that never end a line
/// do not keep a cleartext session: with one every [`TICK`], the goodbye still comes exactly
/// `timeouts.idle` after the greeting, and no backend was ever connected.
#[tokio::test(start_paused = true)]
async fn pop3_trickled_octets_without_a_line_end_do_not_keep_a_cleartext_session() {
    let pki = pki();
    let (context, mut backends) = listener(Protocol::Pop3, TlsMode::Starttls, &pki);
    let (mut client, server) = start(session(context));
    assert_eq!(line(&mut client).await, format!("+OK {HOST} ready\r\n"));
    let greeted = Instant::now();
    assert_eq!(
        trickle_until_answered(&mut client, b"CAPA", 2 * IDLE).await,
        "-ERR Disconnected for inactivity\r\n"
    );
    assert_eq!(greeted.elapsed(), IDLE);
    assert_eq!(rest(&mut client).await, "");
    assert_eq!(server.await.unwrap(), EndReason::ClientIdle);
    assert!(backends.try_recv().is_err(), "a backend was connected");
}

/// From `smtp::idle_client_gets_421_4_4_2_and_is_closed`: after EHLO on 465, a client that
/// says nothing more gets 421 4.4.2 exactly `timeouts.idle` after its last reply.
#[tokio::test(start_paused = true)]
async fn smtp_idle_client_gets_421_4_4_2_after_exactly_the_idle_timeout() {
    let pki = pki();
    let (context, mut backends) = listener(Protocol::Smtp, TlsMode::Implicit, &pki);
    let (io, server) = start(session(context));
    let mut client = tls_client(io, &pki).await;
    // Greeted at once; the first EHLO connects (no backend EHLO learned yet).
    assert_eq!(line(&mut client).await, format!("220 {HOST} ESMTP\r\n"));
    client.write_all(b"EHLO c.example\r\n").await.unwrap();
    let mut backend = backends.recv().await.unwrap();
    backend.write_all(b"220 backend ESMTP\r\n").await.unwrap();
    expect(&mut backend, b"EHLO c.example\r\n").await;
    backend
        .write_all(b"250-backend\r\n250 AUTH PLAIN\r\n")
        .await
        .unwrap();
    smtp_reply(&mut client).await;
    let answered = Instant::now();
    assert_eq!(
        line(&mut client).await,
        format!("421 4.4.2 {HOST} Error: timeout exceeded, closing transmission channel\r\n")
    );
    assert_eq!(answered.elapsed(), IDLE);
    assert_eq!(rest(&mut client).await, "");
    assert_eq!(server.await.unwrap(), EndReason::ClientIdle);
}

/// From `smtp::a_client_that_never_reads_its_replies_is_dropped_after_the_idle_timeout` (house
/// rule: a deadline on every wait, writes included): a client that pipelines commands without
/// ever reading a reply fills the pipe back to the proxy, whose write then stalls; the session
/// is dropped exactly `timeouts.idle` later instead of pinning its buffers.
#[tokio::test(start_paused = true)]
async fn smtp_a_client_that_never_reads_its_replies_is_dropped_after_exactly_the_idle_timeout() {
    let pki = pki();
    let (mut context, mut backends) = listener(Protocol::Smtp, TlsMode::Starttls, &pki);
    // Far more commands than the client sends: only the stalled write may end the session.
    Arc::get_mut(&mut context).unwrap().limits.preauth_commands = usize::MAX;
    let (mut client, server) = start(session(context));
    let started = Instant::now();
    let batch = b"XCLIENT\r\n".repeat(10_000);
    let mut sent = 0usize;
    while client.write_all(&batch).await.is_ok() {
        sent += batch.len();
        assert!(sent < 100 * batch.len(), "the proxy kept reading");
    }
    assert_eq!(started.elapsed(), IDLE);
    assert_eq!(server.await.unwrap(), EndReason::ClientIdle);
    assert!(backends.try_recv().is_err(), "a backend was connected");
}

/// From `pop3::a_silent_backend_is_not_kept_alive_by_a_trickling_client`: a backend that never
/// answers PASS ends the session exactly `timeouts.idle` after the PASS went out, however often
/// the client sends an octet meanwhile.
#[tokio::test(start_paused = true)]
async fn pop3_a_silent_backend_is_not_kept_alive_by_a_trickling_client() {
    let pki = pki();
    let (context, mut backends) = listener(Protocol::Pop3, TlsMode::Implicit, &pki);
    let (io, server) = start(session(context));
    let mut client = tls_client(io, &pki).await;
    // mailfront's greeting and +OK to USER; the PASS connects, right after the USER goes out.
    assert_eq!(line(&mut client).await, format!("+OK {HOST} ready\r\n"));
    client.write_all(b"USER u\r\n").await.unwrap();
    assert_eq!(line(&mut client).await, "+OK\r\n");
    client.write_all(b"PASS secret\r\n").await.unwrap();
    let mut backend = backends.recv().await.unwrap();
    backend.write_all(b"+OK fake POP3 ready\r\n").await.unwrap();
    expect(&mut backend, b"USER u\r\n").await;
    backend.write_all(b"+OK\r\n").await.unwrap();
    expect(&mut backend, b"PASS secret\r\n").await;
    let sent = Instant::now();
    assert_eq!(
        trickle_until_answered(&mut client, b"x", 2 * IDLE).await,
        "-ERR [SYS/TEMP] Server temporarily unavailable\r\n"
    );
    assert_eq!(sent.elapsed(), IDLE);
    assert_eq!(server.await.unwrap(), EndReason::BackendTimeout);
}

/// From `imap::a_silent_backend_is_not_kept_alive_by_a_trickling_client`: the same for a LOGIN
/// the backend never answers.
#[tokio::test(start_paused = true)]
async fn imap_a_silent_backend_is_not_kept_alive_by_a_trickling_client() {
    let pki = pki();
    let (context, mut backends) = listener(Protocol::Imap, TlsMode::Implicit, &pki);
    let (io, server) = start(session(context));
    let mut client = tls_client(io, &pki).await;
    let mut backend = backends.recv().await.unwrap();
    backend
        .write_all(b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] ready\r\n")
        .await
        .unwrap();
    assert!(line(&mut client).await.starts_with("* OK"));
    client.write_all(b"a LOGIN u secret\r\n").await.unwrap();
    assert!(line(&mut backend).await.starts_with("a LOGIN "));
    let sent = Instant::now();
    assert_eq!(
        trickle_until_answered(&mut client, b"x", 2 * IDLE).await,
        "* BYE [UNAVAILABLE] Server temporarily unavailable\r\n"
    );
    assert_eq!(sent.elapsed(), IDLE);
    assert_eq!(server.await.unwrap(), EndReason::BackendTimeout);
}

// ---- login ------------------------------------------------------------------------------------

/// From `imap::a_trickling_client_is_cut_off_at_the_login_timeout`: a client that keeps sending
/// octets of a line it never ends is logged out exactly `timeouts.login` after it connected,
/// closed as `login_timeout` on the client's side; on 993 and in cleartext on 143 alike, where
/// no backend is connected at all.
#[tokio::test(start_paused = true)]
async fn imap_a_trickling_client_is_cut_off_at_exactly_the_login_timeout() {
    let pki = pki();
    let (context, mut backends) = short_login(Protocol::Imap, TlsMode::Implicit, &pki);
    let started = Instant::now();
    let (io, server) = start(session(context.clone()));
    let mut client = tls_client(io, &pki).await;
    let mut backend = backends.recv().await.unwrap();
    backend
        .write_all(b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] ready\r\n")
        .await
        .unwrap();
    assert!(line(&mut client).await.starts_with("* OK"));
    assert_eq!(
        trickle_until_answered(&mut client, b"a NOOP", 2 * SHORT_LOGIN).await,
        "* BYE Autologout; login took too long\r\n"
    );
    assert_eq!(started.elapsed(), SHORT_LOGIN);
    assert_eq!(rest(&mut client).await, "");
    assert_login_timeout(&context, &server.await.unwrap());

    let (context, mut backends) = short_login(Protocol::Imap, TlsMode::Starttls, &pki);
    let started = Instant::now();
    let (mut client, server) = start(session(context.clone()));
    assert!(line(&mut client).await.starts_with("* OK"));
    assert_eq!(
        trickle_until_answered(&mut client, b"a NOOP", 2 * SHORT_LOGIN).await,
        "* BYE Autologout; login took too long\r\n"
    );
    assert_eq!(started.elapsed(), SHORT_LOGIN);
    assert_login_timeout(&context, &server.await.unwrap());
    assert!(backends.try_recv().is_err(), "a backend was connected");
}

/// From `pop3::a_trickling_client_is_cut_off_at_the_login_timeout`.
#[tokio::test(start_paused = true)]
async fn pop3_a_trickling_client_is_cut_off_at_exactly_the_login_timeout() {
    let pki = pki();
    let (context, mut backends) = short_login(Protocol::Pop3, TlsMode::Implicit, &pki);
    let started = Instant::now();
    let (io, server) = start(session(context.clone()));
    let mut client = tls_client(io, &pki).await;
    assert_eq!(line(&mut client).await, format!("+OK {HOST} ready\r\n"));
    assert_eq!(
        trickle_until_answered(&mut client, b"CAPA", 2 * SHORT_LOGIN).await,
        "-ERR Disconnected: login took too long\r\n"
    );
    assert_eq!(started.elapsed(), SHORT_LOGIN);
    assert_eq!(rest(&mut client).await, "");
    assert_login_timeout(&context, &server.await.unwrap());
    assert!(backends.try_recv().is_err(), "a backend was connected");
}

/// From `smtp::a_trickling_client_is_cut_off_at_the_login_timeout`: after EHLO on 465, and in
/// cleartext on 587 before TLS, where no backend is connected.
#[tokio::test(start_paused = true)]
async fn smtp_a_trickling_client_is_cut_off_at_exactly_the_login_timeout() {
    let login_timeout_reply =
        format!("421 4.4.2 {HOST} Error: login timeout exceeded, closing transmission channel\r\n");
    let pki = pki();
    let (context, mut backends) = short_login(Protocol::Smtp, TlsMode::Implicit, &pki);
    let started = Instant::now();
    let (io, server) = start(session(context.clone()));
    let mut client = tls_client(io, &pki).await;
    // Greeted at once; the first EHLO connects (no backend EHLO learned yet).
    assert_eq!(line(&mut client).await, format!("220 {HOST} ESMTP\r\n"));
    client.write_all(b"EHLO c.example\r\n").await.unwrap();
    let mut backend = backends.recv().await.unwrap();
    backend.write_all(b"220 backend ESMTP\r\n").await.unwrap();
    expect(&mut backend, b"EHLO c.example\r\n").await;
    backend.write_all(b"250 backend\r\n").await.unwrap();
    smtp_reply(&mut client).await;
    assert_eq!(
        trickle_until_answered(&mut client, b"NOOP", 2 * SHORT_LOGIN).await,
        login_timeout_reply
    );
    assert_eq!(started.elapsed(), SHORT_LOGIN);
    assert_eq!(rest(&mut client).await, "");
    assert_login_timeout(&context, &server.await.unwrap());

    let (context, mut backends) = short_login(Protocol::Smtp, TlsMode::Starttls, &pki);
    let started = Instant::now();
    let (mut client, server) = start(session(context.clone()));
    assert_eq!(line(&mut client).await, format!("220 {HOST} ESMTP\r\n"));
    assert_eq!(
        trickle_until_answered(&mut client, b"EHLO x", 2 * SHORT_LOGIN).await,
        login_timeout_reply
    );
    assert_eq!(started.elapsed(), SHORT_LOGIN);
    assert_login_timeout(&context, &server.await.unwrap());
    assert!(backends.try_recv().is_err(), "a backend was connected");
}

/// From `pop3::a_logged_in_client_is_not_cut_off_at_the_login_timeout`: once the backend
/// accepts PASS the deadline is gone; the relay runs on past it.
#[tokio::test(start_paused = true)]
async fn pop3_session_logged_in_outlives_the_login_timeout() {
    let pki = pki();
    let (context, mut backends) = short_login(Protocol::Pop3, TlsMode::Implicit, &pki);
    let (io, server) = start(session(context));
    let mut client = tls_client(io, &pki).await;
    // mailfront's greeting and +OK to USER; the PASS connects, right after the USER goes out.
    assert_eq!(line(&mut client).await, format!("+OK {HOST} ready\r\n"));
    client.write_all(b"USER u\r\n").await.unwrap();
    assert_eq!(line(&mut client).await, "+OK\r\n");
    client.write_all(b"PASS secret\r\n").await.unwrap();
    let mut backend = backends.recv().await.unwrap();
    backend.write_all(b"+OK fake POP3 ready\r\n").await.unwrap();
    expect(&mut backend, b"USER u\r\n").await;
    backend.write_all(b"+OK\r\n").await.unwrap();
    expect(&mut backend, b"PASS secret\r\n").await;
    backend.write_all(b"+OK Logged in.\r\n").await.unwrap();
    assert_eq!(line(&mut client).await, "+OK Logged in.\r\n");
    tokio::time::sleep(SHORT_LOGIN * 2).await;
    client.write_all(b"STAT\r\n").await.unwrap();
    expect(&mut backend, b"STAT\r\n").await;
    backend.write_all(b"+OK 0 0\r\n").await.unwrap();
    assert_eq!(line(&mut client).await, "+OK 0 0\r\n");
    drop(client);
    assert_eq!(server.await.unwrap(), EndReason::ClientClosed);
}

// ---- the auth throttle's window -----------------------------------------------------------------

/// A session on `protocol`'s implicit-TLS listener whose client address may fail to log in
/// twice in [`WINDOW`]; the throttle is returned to watch.
fn throttled(
    protocol: Protocol,
    pki: &Certs,
) -> (
    AuthThrottle,
    DuplexStream,
    JoinHandle<EndReason>,
    UnboundedReceiver<DuplexStream>,
) {
    let (context, backends) = listener(protocol, TlsMode::Implicit, pki);
    let throttle = AuthThrottle::new(2, WINDOW);
    let s = session(context).with_auth_throttle(throttle.clone());
    let (io, server) = start(s);
    (throttle, io, server, backends)
}

/// From `limits::imap_logins_are_refused_locally_after_the_failures_while_a_second_address_is_served`
/// (its last step, which slept out a 2 s window): two wrong passwords, then LOGIN is refused here
/// until exactly [`WINDOW`] after them, not a moment before, and then goes to the backend again.
#[tokio::test(start_paused = true)]
async fn imap_a_throttled_address_may_log_in_again_exactly_when_its_failures_leave_the_window() {
    let pki = pki();
    let (throttle, io, server, mut backends) = throttled(Protocol::Imap, &pki);
    let mut client = tls_client(io, &pki).await;
    let mut backend = backends.recv().await.unwrap();
    backend
        .write_all(b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] ready\r\n")
        .await
        .unwrap();
    assert!(line(&mut client).await.starts_with("* OK"));
    for tag in ["a", "b"] {
        client
            .write_all(format!("{tag} LOGIN u wrong\r\n").as_bytes())
            .await
            .unwrap();
        assert!(
            line(&mut backend)
                .await
                .starts_with(&format!("{tag} LOGIN "))
        );
        let no = format!("{tag} NO [AUTHENTICATIONFAILED] Authentication failed.\r\n");
        backend.write_all(no.as_bytes()).await.unwrap();
        assert_eq!(line(&mut client).await, no);
    }
    let failed = Instant::now();
    let refused =
        |tag: &str| format!("{tag} NO [UNAVAILABLE] Too many failed logins, try again later\r\n");
    client.write_all(b"c LOGIN u secret\r\n").await.unwrap();
    assert_eq!(line(&mut client).await, refused("c"));
    tokio::time::sleep(WINDOW - Duration::from_millis(1)).await;
    assert!(throttle.throttled(client_ip()));
    client.write_all(b"d LOGIN u secret\r\n").await.unwrap();
    assert_eq!(line(&mut client).await, refused("d"));
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(failed.elapsed(), WINDOW);
    assert!(!throttle.throttled(client_ip()));
    client.write_all(b"e LOGIN u secret\r\n").await.unwrap();
    // The next line the backend sees: neither refused LOGIN reached it.
    assert!(line(&mut backend).await.starts_with("e LOGIN "));
    backend.write_all(b"e OK logged in\r\n").await.unwrap();
    assert_eq!(line(&mut client).await, "e OK logged in\r\n");
    drop(client);
    assert_eq!(server.await.unwrap(), EndReason::ClientClosed);
}

/// From `limits::pop3_pass_is_refused_locally_after_the_failures_while_a_second_address_is_served`.
#[tokio::test(start_paused = true)]
async fn pop3_a_throttled_address_may_log_in_again_exactly_when_its_failures_leave_the_window() {
    let pki = pki();
    let (throttle, io, server, mut backends) = throttled(Protocol::Pop3, &pki);
    let mut client = tls_client(io, &pki).await;
    assert_eq!(line(&mut client).await, format!("+OK {HOST} ready\r\n"));
    // The first USER is answered here and goes out right before the first PASS, which connects.
    client.write_all(b"USER u\r\n").await.unwrap();
    assert_eq!(line(&mut client).await, "+OK\r\n");
    client.write_all(b"PASS wrong\r\n").await.unwrap();
    let mut backend = backends.recv().await.unwrap();
    backend.write_all(b"+OK fake POP3 ready\r\n").await.unwrap();
    expect(&mut backend, b"USER u\r\n").await;
    backend.write_all(b"+OK\r\n").await.unwrap();
    let user = async |client: &mut TlsStream<DuplexStream>, backend: &mut DuplexStream| {
        client.write_all(b"USER u\r\n").await.unwrap();
        expect(backend, b"USER u\r\n").await;
        backend.write_all(b"+OK\r\n").await.unwrap();
        assert_eq!(line(client).await, "+OK\r\n");
    };
    for round in 0..2 {
        if round > 0 {
            user(&mut client, &mut backend).await;
            client.write_all(b"PASS wrong\r\n").await.unwrap();
        }
        expect(&mut backend, b"PASS wrong\r\n").await;
        backend
            .write_all(b"-ERR [AUTH] Authentication failed.\r\n")
            .await
            .unwrap();
        assert_eq!(
            line(&mut client).await,
            "-ERR [AUTH] Authentication failed.\r\n"
        );
    }
    let failed = Instant::now();
    let refused = "-ERR [SYS/TEMP] Too many failed logins, try again later\r\n";
    user(&mut client, &mut backend).await;
    client.write_all(b"PASS secret\r\n").await.unwrap();
    assert_eq!(line(&mut client).await, refused);
    tokio::time::sleep(WINDOW - Duration::from_millis(1)).await;
    assert!(throttle.throttled(client_ip()));
    user(&mut client, &mut backend).await;
    client.write_all(b"PASS secret\r\n").await.unwrap();
    assert_eq!(line(&mut client).await, refused);
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(failed.elapsed(), WINDOW);
    assert!(!throttle.throttled(client_ip()));
    user(&mut client, &mut backend).await;
    client.write_all(b"PASS secret\r\n").await.unwrap();
    // The next line the backend sees after its USER: neither refused PASS reached it.
    expect(&mut backend, b"PASS secret\r\n").await;
    backend.write_all(b"+OK Logged in.\r\n").await.unwrap();
    assert_eq!(line(&mut client).await, "+OK Logged in.\r\n");
    drop(client);
    assert_eq!(server.await.unwrap(), EndReason::ClientClosed);
}

/// From `limits::smtp_auth_gets_454_after_the_failures_while_a_second_address_is_served`.
#[tokio::test(start_paused = true)]
async fn smtp_a_throttled_address_may_auth_again_exactly_when_its_failures_leave_the_window() {
    let pki = pki();
    let (throttle, io, server, mut backends) = throttled(Protocol::Smtp, &pki);
    let mut client = tls_client(io, &pki).await;
    // Greeted at once; the first EHLO connects (no backend EHLO learned yet).
    assert_eq!(line(&mut client).await, format!("220 {HOST} ESMTP\r\n"));
    client.write_all(b"EHLO c.example\r\n").await.unwrap();
    let mut backend = backends.recv().await.unwrap();
    backend.write_all(b"220 backend ESMTP\r\n").await.unwrap();
    expect(&mut backend, b"EHLO c.example\r\n").await;
    backend
        .write_all(b"250-backend\r\n250 AUTH PLAIN\r\n")
        .await
        .unwrap();
    smtp_reply(&mut client).await;
    // RFC 4616 PLAIN: NUL "u" NUL password.
    for wrong in ["AHUAd3Jvbmc=", "AHUAd3Jvbmcy"] {
        let auth = format!("AUTH PLAIN {wrong}\r\n");
        client.write_all(auth.as_bytes()).await.unwrap();
        expect(&mut backend, auth.as_bytes()).await;
        backend
            .write_all(b"535 5.7.8 Authentication failed\r\n")
            .await
            .unwrap();
        assert_eq!(
            line(&mut client).await,
            "535 5.7.8 Authentication failed\r\n"
        );
    }
    let failed = Instant::now();
    let refused = "454 4.7.0 Too many failed authentications, try again later\r\n";
    client
        .write_all(b"AUTH PLAIN AHUAc2VjcmV0\r\n")
        .await
        .unwrap();
    assert_eq!(line(&mut client).await, refused);
    tokio::time::sleep(WINDOW - Duration::from_millis(1)).await;
    assert!(throttle.throttled(client_ip()));
    client
        .write_all(b"AUTH PLAIN AHUAc2VjcmV0\r\n")
        .await
        .unwrap();
    assert_eq!(line(&mut client).await, refused);
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(failed.elapsed(), WINDOW);
    assert!(!throttle.throttled(client_ip()));
    client
        .write_all(b"AUTH PLAIN AHUAc2VjcmV0\r\n")
        .await
        .unwrap();
    // The next line the backend sees: neither refused AUTH reached it.
    expect(&mut backend, b"AUTH PLAIN AHUAc2VjcmV0\r\n").await;
    backend.write_all(b"235 2.7.0 ok\r\n").await.unwrap();
    assert_eq!(line(&mut client).await, "235 2.7.0 ok\r\n");
    drop(client);
    assert_eq!(server.await.unwrap(), EndReason::ClientClosed);
}

// ---- the graceful drain -----------------------------------------------------------------------

/// A session whose drain signal is its own token (the server's `control.shutdown`), apart from
/// its hard stop (`Session::shutdown`, cancelled when the grace runs out): both returned.
fn draining(context: Arc<ListenerContext>) -> (Session, CancellationToken, CancellationToken) {
    let drain = CancellationToken::new();
    let hard_stop = CancellationToken::new();
    let s = Session::admitted(
        context,
        "192.0.2.10:50000".parse().unwrap(),
        "192.0.2.1:993".parse().unwrap(),
        mailfront::session::Admitted {
            via: None,
            hard_stop: hard_stop.clone(),
            draining: drain.clone(),
            per_ip: None,
            auth_throttle: None,
        },
    );
    (s, drain, hard_stop)
}

/// From `imap::shutdown_before_login_says_bye` and the first half of
/// `imap::drain_says_bye_before_login_at_once_and_keeps_relays_until_the_grace_runs_out`: a
/// session before login gets its BYE the instant the drain begins, not at the hard stop, on 993
/// and in cleartext on 143.
#[tokio::test(start_paused = true)]
async fn imap_shutdown_before_login_says_bye_at_once() {
    let pki = pki();
    let bye = "* BYE [UNAVAILABLE] Server shutting down\r\n";
    let (context, mut backends) = listener(Protocol::Imap, TlsMode::Implicit, &pki);
    let (s, drain, hard_stop) = draining(context);
    let (io, server) = start(s);
    let mut client = tls_client(io, &pki).await;
    let mut backend = backends.recv().await.unwrap();
    backend
        .write_all(b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] ready\r\n")
        .await
        .unwrap();
    assert!(line(&mut client).await.starts_with("* OK"));
    tokio::time::sleep(Duration::from_secs(5)).await;
    let began = Instant::now();
    drain.cancel();
    assert_eq!(line(&mut client).await, bye);
    assert_eq!(rest(&mut client).await, "");
    assert_eq!(began.elapsed(), Duration::ZERO);
    assert_eq!(server.await.unwrap(), EndReason::Shutdown);
    assert!(!hard_stop.is_cancelled());

    let (context, _backends) = listener(Protocol::Imap, TlsMode::Starttls, &pki);
    let (s, drain, _) = draining(context);
    let (mut client, server) = start(s);
    assert!(line(&mut client).await.starts_with("* OK"));
    tokio::time::sleep(Duration::from_secs(5)).await;
    let began = Instant::now();
    drain.cancel();
    assert_eq!(line(&mut client).await, bye);
    assert_eq!(rest(&mut client).await, "");
    assert_eq!(began.elapsed(), Duration::ZERO);
    assert_eq!(server.await.unwrap(), EndReason::Shutdown);
}

/// From the second half of
/// `imap::drain_says_bye_before_login_at_once_and_keeps_relays_until_the_grace_runs_out`: a
/// logged-in relay goes on working after the drain began, for as long as the grace lasts, and
/// is closed the instant the hard stop comes.
#[tokio::test(start_paused = true)]
async fn imap_drain_keeps_a_logged_in_relay_until_the_hard_stop() {
    let pki = pki();
    let (context, mut backends) = listener(Protocol::Imap, TlsMode::Implicit, &pki);
    let (s, drain, hard_stop) = draining(context);
    let (io, server) = start(s);
    let mut client = tls_client(io, &pki).await;
    let mut backend = backends.recv().await.unwrap();
    backend
        .write_all(b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] ready\r\n")
        .await
        .unwrap();
    assert!(line(&mut client).await.starts_with("* OK"));
    client.write_all(b"a LOGIN u secret\r\n").await.unwrap();
    assert!(line(&mut backend).await.starts_with("a LOGIN "));
    backend.write_all(b"a OK logged in\r\n").await.unwrap();
    assert_eq!(line(&mut client).await, "a OK logged in\r\n");

    drain.cancel();
    // Longer than any grace a test would configure: the relay does not end by itself.
    tokio::time::sleep(Duration::from_secs(100)).await;
    client.write_all(b"b SELECT INBOX\r\n").await.unwrap();
    expect(&mut backend, b"b SELECT INBOX\r\n").await;
    backend.write_all(b"b OK selected\r\n").await.unwrap();
    assert_eq!(line(&mut client).await, "b OK selected\r\n");
    tokio::time::sleep(Duration::from_secs(100)).await;
    let stopped = Instant::now();
    hard_stop.cancel();
    assert_eq!(rest(&mut client).await, "");
    assert_eq!(stopped.elapsed(), Duration::ZERO);
    assert_eq!(server.await.unwrap(), EndReason::Shutdown);
}

/// From `pop3::shutdown_before_login_says_goodbye`.
#[tokio::test(start_paused = true)]
async fn pop3_shutdown_before_login_says_goodbye_at_once() {
    let pki = pki();
    let (context, mut backends) = listener(Protocol::Pop3, TlsMode::Implicit, &pki);
    let (s, drain, hard_stop) = draining(context);
    let (io, server) = start(s);
    let mut client = tls_client(io, &pki).await;
    assert_eq!(line(&mut client).await, format!("+OK {HOST} ready\r\n"));
    tokio::time::sleep(Duration::from_secs(5)).await;
    let began = Instant::now();
    drain.cancel();
    assert_eq!(
        line(&mut client).await,
        "-ERR [SYS/TEMP] Server shutting down\r\n"
    );
    assert_eq!(rest(&mut client).await, "");
    assert_eq!(began.elapsed(), Duration::ZERO);
    assert_eq!(server.await.unwrap(), EndReason::Shutdown);
    assert!(!hard_stop.is_cancelled());
    assert!(backends.try_recv().is_err(), "no backend connection");
}

/// From `smtp::shutdown_sends_421_4_3_2_between_commands`: between transactions on 465, and in
/// the cleartext phase of 587 (no backend at all), 421 4.3.2 the instant the drain begins.
#[tokio::test(start_paused = true)]
async fn smtp_shutdown_sends_421_4_3_2_between_commands_at_once() {
    let pki = pki();
    let goodbye =
        format!("421 4.3.2 {HOST} Service shutting down, closing transmission channel\r\n");
    let (context, mut backends) = listener(Protocol::Smtp, TlsMode::Implicit, &pki);
    let (s, drain, hard_stop) = draining(context);
    let (io, server) = start(s);
    let mut client = tls_client(io, &pki).await;
    // Greeted at once; the first EHLO connects (no backend EHLO learned yet).
    assert_eq!(line(&mut client).await, format!("220 {HOST} ESMTP\r\n"));
    client.write_all(b"EHLO c.example\r\n").await.unwrap();
    let mut backend = backends.recv().await.unwrap();
    backend.write_all(b"220 backend ESMTP\r\n").await.unwrap();
    expect(&mut backend, b"EHLO c.example\r\n").await;
    backend.write_all(b"250 backend\r\n").await.unwrap();
    smtp_reply(&mut client).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let began = Instant::now();
    drain.cancel();
    assert_eq!(line(&mut client).await, goodbye);
    assert_eq!(rest(&mut client).await, "");
    assert_eq!(began.elapsed(), Duration::ZERO);
    assert_eq!(server.await.unwrap(), EndReason::Shutdown);
    assert!(!hard_stop.is_cancelled());

    let (context, mut backends) = listener(Protocol::Smtp, TlsMode::Starttls, &pki);
    let (s, drain, _) = draining(context);
    let (mut client, server) = start(s);
    assert_eq!(line(&mut client).await, format!("220 {HOST} ESMTP\r\n"));
    tokio::time::sleep(Duration::from_secs(5)).await;
    let began = Instant::now();
    drain.cancel();
    assert_eq!(line(&mut client).await, goodbye);
    assert_eq!(rest(&mut client).await, "");
    assert_eq!(began.elapsed(), Duration::ZERO);
    assert_eq!(server.await.unwrap(), EndReason::Shutdown);
    assert!(backends.try_recv().is_err(), "a backend was connected");
}

/// From `smtp::sigterm_between_bdat_chunks_lets_the_message_finish_then_421`: between BDAT
/// chunks the message is underway, so the drain waits for its last chunk however long it takes
/// (within the grace), and the 421 follows the backend's verdict at once.
#[tokio::test(start_paused = true)]
async fn smtp_drain_between_bdat_chunks_lets_the_message_finish_then_421() {
    let pki = pki();
    let (context, mut backends) = listener(Protocol::Smtp, TlsMode::Implicit, &pki);
    let (s, drain, _) = draining(context);
    let (io, server) = start(s);
    let mut client = tls_client(io, &pki).await;
    // Greeted at once; the first EHLO connects (no backend EHLO learned yet).
    assert_eq!(line(&mut client).await, format!("220 {HOST} ESMTP\r\n"));
    client.write_all(b"EHLO c.example\r\n").await.unwrap();
    let mut backend = backends.recv().await.unwrap();
    backend.write_all(b"220 backend ESMTP\r\n").await.unwrap();
    expect(&mut backend, b"EHLO c.example\r\n").await;
    backend
        .write_all(b"250-backend\r\n250 CHUNKING\r\n")
        .await
        .unwrap();
    smtp_reply(&mut client).await;
    for (command, answer) in [
        (
            &b"MAIL FROM:<a@example.test>\r\n"[..],
            &b"250 2.1.0 Ok\r\n"[..],
        ),
        (b"RCPT TO:<b@example.test>\r\n", b"250 2.1.5 Ok\r\n"),
    ] {
        client.write_all(command).await.unwrap();
        expect(&mut backend, command).await;
        backend.write_all(answer).await.unwrap();
        assert_eq!(line(&mut client).await.as_bytes(), answer);
    }
    let chunk1 = b"Subject: bdat\r\n\r\nfirst\r\n";
    client
        .write_all(format!("BDAT {}\r\n", chunk1.len()).as_bytes())
        .await
        .unwrap();
    client.write_all(chunk1).await.unwrap();
    let mut got = Vec::new();
    while !got.ends_with(b"first\r\n") {
        got.extend_from_slice(line(&mut backend).await.as_bytes());
    }
    assert!(
        String::from_utf8_lossy(&got).contains("BDAT "),
        "{}",
        String::from_utf8_lossy(&got)
    );
    backend.write_all(b"250 2.0.0 chunk ok\r\n").await.unwrap();
    assert_eq!(line(&mut client).await, "250 2.0.0 chunk ok\r\n");

    drain.cancel();
    tokio::time::sleep(Duration::from_secs(20)).await;
    let chunk2 = b"second\r\n";
    client
        .write_all(format!("BDAT {} LAST\r\n", chunk2.len()).as_bytes())
        .await
        .unwrap();
    client.write_all(chunk2).await.unwrap();
    expect(&mut backend, b"BDAT 8 LAST\r\nsecond\r\n").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let verdict = Instant::now();
    backend
        .write_all(b"250 2.0.0 Ok: queued as FAKE\r\n")
        .await
        .unwrap();
    assert_eq!(line(&mut client).await, "250 2.0.0 Ok: queued as FAKE\r\n");
    assert!(line(&mut client).await.starts_with("421 4.3.2 "));
    assert_eq!(rest(&mut client).await, "");
    assert_eq!(verdict.elapsed(), Duration::ZERO);
    assert_eq!(server.await.unwrap(), EndReason::Shutdown);
}

/// From `foundation::a_graceful_shutdown_closes_a_connection_that_has_not_sent_its_client_hello`:
/// on an implicit-TLS port, a client that connected but sent no ClientHello is closed the
/// instant the drain begins, not at `tls.handshake_timeout`, and closed as `shutdown`. Served as
/// the server serves a connection (`connection::serve_stream`), where that handshake runs.
#[tokio::test(start_paused = true)]
async fn a_graceful_shutdown_closes_a_connection_that_has_not_sent_its_client_hello_at_once() {
    let pki = pki();
    let (context, mut backends) = listener(Protocol::Imap, TlsMode::Implicit, &pki);
    let (s, drain, _) = draining(context.clone());
    let (mut client, io) = duplex(PIPE);
    let server = tokio::spawn(mailfront::testing::serve_stream(io, s));
    tokio::time::sleep(Duration::from_secs(5)).await;
    let began = Instant::now();
    drain.cancel();
    assert_eq!(rest(&mut client).await, "");
    assert_eq!(began.elapsed(), Duration::ZERO);
    server.await.unwrap();
    assert_eq!(context.metrics.sessions_closed(CloseClass::Shutdown), 1);
    assert!(backends.try_recv().is_err(), "a backend was connected");
}
