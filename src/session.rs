//! One client connection: the client stream (plain until STARTTLS, or TLS from the start), the
//! per-listener context every protocol driver needs, and the one log line at close.

use std::borrow::Cow;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

use crate::backend::{self, BackendConnector, BackendStream, ByteCounters, ConnectError};
pub use crate::close::{EndReason, Side};
use crate::config::{Limits, ListenerConfig, Protocol, Timeouts};
use crate::limits::{AuthCharge, AuthThrottle, PerIpGuard};
use crate::metrics::ListenerMetrics;
use crate::proxy_protocol;
use crate::relay::{self, RelayEnd};
use crate::tls::{HandshakeError, Handshaker, TlsInfo};
use crate::transport::Transport;

/// Sending close_notify (or the FIN) at the end of a session: one small write, so only a peer
/// that stopped reading makes it wait at all.
const CLOSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);
/// Most octets [`ClientStream::cork`] queues in rustls: goodbyes are a few lines; anything
/// larger goes out through the ordinary, flow-controlled write.
const MAX_CORKED: usize = 16 * 1024;

/// What every session on one listener shares.
pub struct ListenerContext {
    pub config: ListenerConfig,
    /// Our own name, for Received "by" and for replies we write.
    pub hostname: String,
    pub timeouts: Timeouts,
    pub limits: Limits,
    pub handshaker: Handshaker,
    pub metrics: ListenerMetrics,
    /// How sessions reach the backend: the pool of `config.backend` in production, an in-memory
    /// pipe in driver tests.
    pub backend: BackendConnector,
    /// `backend_client_info` problems already logged for this listener.
    pub client_info_notices: crate::client_info::Notices,
    /// What this listener learned of its backends (by its capability probe, then from its
    /// sessions), for its sessions.
    pub learned: Learned,
    /// The listener's user routing (`user_affinity`, `user_map`, `user_lookup`); `None` in
    /// driver tests that route nothing.
    pub router: Option<std::sync::Arc<crate::routing::Router>>,
}

impl ListenerContext {
    /// Whether this listener chooses the backend by the user who logs in: its sessions then
    /// connect only with a login's name in hand ([`crate::machine::Machine::login_facts`]),
    /// never before.
    pub fn routes_users(&self) -> bool {
        self.router.as_ref().is_some_and(|r| r.needs_user())
    }
}

/// What one listener knows of its backends' pre-login dialogue, for its sessions: the
/// backend's SMTP EHLO reply, which an SMTP session with TLS up answers its client's EHLO with
/// before it connects (`smtp::machine`); the backend's IMAP pre-login capability list, which
/// an IMAP session with TLS up greets and answers CAPABILITY with before it connects
/// (`imap::prelogin`); and the backend's POP3 CAPA response, which a POP3 session answers CAPA
/// with before it connects (`pop3::prelogin`). Per replica and per listener; empty after a
/// restart or a reload, until the listener's capability probe ([`crate::probe`], run by the
/// first session while its protocol's entry is empty) fills it. Sessions that reach a backend
/// keep it current with what they see (the listener's pool only, not a mapped or looked-up
/// backend), and after a failed probe a session of a listener that does not route by user
/// connects early to fill it (the machines' fallback).
#[derive(Debug, Default)]
pub struct Learned {
    ehlo: std::sync::Mutex<Option<Vec<u8>>>,
    imap_capability: std::sync::Mutex<Option<Vec<u8>>>,
    pop3_capa: std::sync::Mutex<Option<Vec<u8>>>,
    /// Held while a capability probe runs ([`crate::probe::ensure_learned`]): one at a time;
    /// inside, when the last ones succeeded and failed.
    pub(crate) probing: tokio::sync::Mutex<crate::probe::ProbeState>,
}

impl Learned {
    /// Whether what a session of `protocol` shows before login is known.
    pub fn knows(&self, protocol: crate::config::Protocol) -> bool {
        use crate::config::Protocol;
        match protocol {
            Protocol::Imap => self.imap_capability().is_some(),
            Protocol::Pop3 => self.pop3_capa().is_some(),
            Protocol::Smtp => self.ehlo().is_some(),
        }
    }

    pub fn ehlo(&self) -> Option<Vec<u8>> {
        self.ehlo.lock().ok().and_then(|e| e.clone())
    }

    pub fn set_ehlo(&self, reply: Vec<u8>) {
        if let Ok(mut ehlo) = self.ehlo.lock() {
            *ehlo = Some(reply);
        }
    }

    /// The IMAP backend's pre-login capability list (the tokens after `CAPABILITY`, as the
    /// backend wrote them).
    pub fn imap_capability(&self) -> Option<Vec<u8>> {
        self.imap_capability.lock().ok().and_then(|c| c.clone())
    }

    pub fn set_imap_capability(&self, list: Vec<u8>) {
        if let Ok(mut capability) = self.imap_capability.lock() {
            *capability = Some(list);
        }
    }

    pub fn pop3_capa(&self) -> Option<Vec<u8>> {
        self.pop3_capa.lock().ok().and_then(|c| c.clone())
    }

    pub fn set_pop3_capa(&self, response: Vec<u8>) {
        if let Ok(mut capa) = self.pop3_capa.lock() {
            *capa = Some(response);
        }
    }

    /// Forgets what was learned (the fuzz target starts every input from a known state).
    pub fn forget(&self) {
        if let Ok(mut ehlo) = self.ehlo.lock() {
            *ehlo = None;
        }
        if let Ok(mut capability) = self.imap_capability.lock() {
            *capability = None;
        }
        if let Ok(mut capa) = self.pop3_capa.lock() {
            *capa = None;
        }
    }
}

/// The client side of a session. STARTTLS turns `Plain` into `Tls` by [`ClientStream::upgrade`],
/// which consumes the plain stream: whether a session is protected is a property of the value.
///
/// `S` is the transport under it: the accepted TCP socket in the server, one end of
/// [`tokio::io::duplex`] in driver tests.
pub enum ClientStream<S = TcpStream> {
    Plain(S),
    Tls(Box<TlsStream<S>>),
}

impl<S: Transport> ClientStream<S> {
    pub fn is_tls(&self) -> bool {
        matches!(self, ClientStream::Tls(_))
    }

    /// Runs the server handshake on a plain stream (after STARTTLS/STLS was answered). The caller
    /// must have discarded whatever the client pipelined after the command (CERT VU#555316):
    /// this reads only from the socket, never from any earlier buffer.
    pub async fn upgrade(
        self,
        handshaker: &Handshaker,
    ) -> Result<(ClientStream<S>, TlsInfo, std::time::Duration), UpgradeError> {
        match self {
            ClientStream::Tls(_) => Err(UpgradeError::AlreadyTls),
            ClientStream::Plain(plain) => {
                let (tls, info, took) = handshaker
                    .accept(plain)
                    .await
                    .map_err(UpgradeError::Handshake)?;
                Ok((ClientStream::Tls(Box::new(tls)), info, took))
            }
        }
    }

    /// Queues a session's last bytes inside TLS without writing them, so that [`Self::close`]
    /// sends them and the close_notify in one write: one segment instead of two for every
    /// goodbye (LOGOUT, QUIT), which is a measurable share of a short session's kernel time.
    /// Returns false, queuing nothing, on cleartext or for more than [`MAX_CORKED`] octets:
    /// the caller then writes them as usual.
    pub fn cork(&mut self, last: &[u8]) -> bool {
        match self {
            ClientStream::Tls(tls) if last.len() <= MAX_CORKED => {
                use std::io::Write as _;
                tls.get_mut().1.writer().write_all(last).is_ok()
            }
            _ => false,
        }
    }

    /// Sends TLS close_notify (RFC 8314 §3.4) or the TCP FIN, bounded by a short deadline.
    pub async fn close(&mut self) {
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, self.shutdown()).await;
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("STARTTLS on a connection that is already TLS")]
    AlreadyTls,
    #[error(transparent)]
    Handshake(HandshakeError),
}

impl<S: Transport> AsyncRead for ClientStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl<S: Transport> AsyncWrite for ClientStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_flush(cx),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            ClientStream::Plain(s) => s.is_write_vectored(),
            ClientStream::Tls(s) => s.is_write_vectored(),
        }
    }
}

/// Writes all of `bytes` and flushes, within `session`'s idle timeout: a peer that stops reading
/// cannot pin the session (or its buffers) forever.
pub(crate) async fn write_timed<W>(
    stream: &mut W,
    bytes: &[u8],
    session: &Session,
) -> io::Result<()>
where
    W: AsyncWrite + Unpin + ?Sized,
{
    let limit = session.listener.timeouts.idle;
    match tokio::time::timeout(limit, async {
        stream.write_all(bytes).await?;
        stream.flush().await
    })
    .await
    {
        Ok(result) => result,
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "write timed out")),
    }
}

/// STARTTLS/STLS, once the protocol driver has answered the command and dropped whatever the
/// client pipelined after it: runs the handshake; a failure is counted and logged here, and the
/// session ends (the stream was consumed, so there is nothing left to close).
pub async fn upgrade_client<S: Transport>(
    client: ClientStream<S>,
    listener: &ListenerContext,
    draining: &CancellationToken,
) -> Result<(ClientStream<S>, TlsInfo, std::time::Duration), EndReason> {
    // Mid-handshake there is no way to say goodbye in the protocol: a graceful shutdown closes
    // the connection at once, as it ends every other pre-login session.
    let upgraded = tokio::select! {
        upgraded = client.upgrade(&listener.handshaker) => upgraded,
        () = draining.cancelled() => return Err(EndReason::Shutdown),
    };
    upgraded.map_err(|e| {
        tracing::debug!(error = %e, "STARTTLS handshake failed");
        match &e {
            UpgradeError::Handshake(h) => {
                listener.metrics.handshake_failed(h.reason);
                EndReason::TlsHandshakeFailed(h.detail())
            }
            UpgradeError::AlreadyTls => EndReason::TlsHandshakeFailed(e.to_string()),
        }
    })
}

/// A login attempt charged against `limits.auth_failures_per_ip` and sent, waiting for the
/// backend's verdict ([`Session::charge_login`]). The driver settles it: [`LoginCharge::refund`]
/// when the backend accepted the login or no credential was checked, [`LoginCharge::keep`] when
/// the login failed. Dropped unsettled (the client hung up, the backend closed, the session
/// timed out before the verdict) it stays counted, and says so at debug level: that is the
/// charge a client that hangs up before a slow failure would otherwise escape.
pub struct LoginCharge {
    /// `None` without a throttle (driver tests): nothing to settle.
    held: Option<(AuthThrottle, AuthCharge)>,
}

impl LoginCharge {
    /// The attempt does not count: the backend accepted it, or checked no credential.
    pub fn refund(mut self) {
        if let Some((throttle, charge)) = self.held.take() {
            throttle.refund(charge);
        }
    }

    /// The backend refused the login: the attempt stays counted until it leaves the window.
    pub fn keep(mut self) {
        drop(self.held.take());
    }
}

impl Drop for LoginCharge {
    fn drop(&mut self) {
        if self.held.take().is_some() {
            tracing::debug!(
                "login attempt stays charged: the session ended before the backend's verdict"
            );
        }
    }
}

/// What admission decided about a connection beside its addresses: built by the server's
/// admission ([`crate::admission`]) and handed to [`Session::admitted`] once.
pub struct Admitted {
    /// The load balancer the connection came through, with `proxy_protocol_from`.
    pub via: Option<SocketAddr>,
    /// The hard stop: `timeouts.shutdown_grace` ran out.
    pub hard_stop: CancellationToken,
    /// The graceful drain began.
    pub draining: CancellationToken,
    /// The session's place in `limits.connections_per_ip`.
    pub per_ip: Option<PerIpGuard>,
    /// `limits.auth_failures_per_ip`.
    pub auth_throttle: Option<AuthThrottle>,
}

/// Per-connection state, built once ([`Session::new`], [`Session::admitted`]) with private
/// fields: the driver reads it through accessors and changes it only through the methods that
/// say what happened (TLS up, login, user, backend).
pub struct Session {
    listener: Arc<ListenerContext>,
    /// The client, as everything reads it: Received `from`, logs, `limits.connections_per_ip`,
    /// the auth throttle, and what the backend is told (PROXY v2, XCLIENT, ID). On listeners
    /// with `proxy_protocol_from` it is the load balancer's PROXY header source, otherwise the
    /// socket's peer; canonical either way (an IPv4 client of a dual-stack listener is its IPv4
    /// address, not `::ffff:a.b.c.d`: `src/admission.rs`).
    client_addr: SocketAddr,
    /// The address the client connected to: the PROXY header's destination behind a balancer,
    /// our side of the client socket otherwise. The destination in the PROXY v2 header.
    local_addr: SocketAddr,
    /// The load balancer the connection came through (the socket's peer), on listeners with
    /// `proxy_protocol_from`; logged beside `client`.
    via: Option<SocketAddr>,
    /// The hard stop: cancelled when `timeouts.shutdown_grace` runs out. It ends every session,
    /// authenticated relays included.
    shutdown: CancellationToken,
    /// Cancelled the moment a graceful shutdown begins (SIGTERM). Sessions that have not
    /// authenticated, and SMTP sessions with no message underway, say goodbye at once; a
    /// message in DATA/BDAT finishes first; authenticated relays wait for `shutdown`.
    /// [`Session::new`] sets it to `shutdown` itself (draining starts at the hard stop); the
    /// server replaces it with its own drain signal.
    draining: CancellationToken,
    counters: Arc<ByteCounters>,
    /// Set once TLS is up (at accept for implicit listeners, after STARTTLS otherwise).
    tls: Option<TlsInfo>,
    started: Instant,
    /// This session's place in `limits.connections_per_ip`, held until it authenticates.
    per_ip: Option<PerIpGuard>,
    /// `limits.auth_failures_per_ip`, shared by all listeners; `None` in driver tests.
    auth_throttle: Option<AuthThrottle>,
    /// Names the session in the close line and, with `backend_client_info`, in the backend's
    /// log (IMAP ID `x-session-id`), so the two can be matched.
    id: String,
    /// The backend address of the last connect, for the close line.
    backend: std::sync::Mutex<Option<SocketAddr>>,
    /// The user name the last login named as it went to the backend (IMAP LOGIN and
    /// AUTHENTICATE, POP3 USER, APOP and AUTH), for the close line.
    user: std::sync::Mutex<Option<String>>,
}

/// The longest user name the close line carries; a longer one is cut.
pub const MAX_LOGGED_USER: usize = 256;

impl Session {
    pub fn new(
        listener: Arc<ListenerContext>,
        client_addr: SocketAddr,
        local_addr: SocketAddr,
        shutdown: CancellationToken,
    ) -> Session {
        let counters = Arc::new(ByteCounters::reporting(
            listener.metrics.bytes_to_backend.clone(),
            listener.metrics.bytes_to_client.clone(),
        ));
        Session {
            listener,
            client_addr,
            local_addr,
            via: None,
            draining: shutdown.clone(),
            shutdown,
            counters,
            tls: None,
            started: Instant::now(),
            per_ip: None,
            auth_throttle: None,
            id: crate::client_info::new_session_id(),
            backend: std::sync::Mutex::new(None),
            user: std::sync::Mutex::new(None),
        }
    }

    /// A session the server admitted: [`Session::new`] with what admission decided.
    pub fn admitted(
        listener: Arc<ListenerContext>,
        client_addr: SocketAddr,
        local_addr: SocketAddr,
        admission: Admitted,
    ) -> Session {
        let mut session = Session::new(listener, client_addr, local_addr, admission.hard_stop);
        session.via = admission.via;
        session.draining = admission.draining;
        session.per_ip = admission.per_ip;
        session.auth_throttle = admission.auth_throttle;
        session
    }

    /// The same session, charging its logins against `throttle` (driver tests; the server
    /// passes it in [`Admitted`]).
    pub fn with_auth_throttle(mut self, throttle: AuthThrottle) -> Session {
        self.auth_throttle = Some(throttle);
        self
    }

    pub fn listener(&self) -> &Arc<ListenerContext> {
        &self.listener
    }

    /// The client, as everything reads it (see the field).
    pub fn client_addr(&self) -> SocketAddr {
        self.client_addr
    }

    /// The address the client connected to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// TLS, once up.
    pub fn tls(&self) -> Option<&TlsInfo> {
        self.tls.as_ref()
    }

    /// The session id of the close line and the IMAP ID `x-session-id`.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Cancelled when the graceful drain begins.
    pub fn draining(&self) -> &CancellationToken {
        &self.draining
    }

    /// Cancelled at the hard stop.
    pub fn hard_stop(&self) -> &CancellationToken {
        &self.shutdown
    }

    /// The session's place in `limits.connections_per_ip`, while it holds one (admission's
    /// shared count takes it there).
    pub(crate) fn per_ip_mut(&mut self) -> Option<&mut PerIpGuard> {
        self.per_ip.as_mut()
    }

    /// Notes the user name a login named, for the close line: at most [`MAX_LOGGED_USER`]
    /// characters, controls replaced, so a name sent as an IMAP literal cannot forge log lines.
    pub fn set_user(&self, name: &[u8]) {
        let name: String = String::from_utf8_lossy(name)
            .chars()
            .take(MAX_LOGGED_USER)
            .map(|c| if c.is_control() { '?' } else { c })
            .collect();
        if let Ok(mut user) = self.user.lock() {
            *user = Some(name);
        }
    }

    /// The backend accepted a login (or, for SMTP, a transaction): from now on the session no
    /// longer counts against `limits.connections_per_ip`, since the backend admitted it and an
    /// office behind one NAT address may hold hundreds of such sessions.
    pub fn authenticated(&mut self) {
        self.per_ip = None;
    }

    /// Charges one login attempt against the client's address before it goes out
    /// (`limits.auth_failures_per_ip`, [`AuthThrottle::try_charge`]). `None`: the address is
    /// throttled and the attempt must be answered locally. The driver holds the charge until the
    /// backend's verdict and settles it then ([`LoginCharge::refund`], [`LoginCharge::keep`]);
    /// a charge dropped unsettled (the session ended first) stays counted. With `shared_state`
    /// the charge is also taken in the shared store ([`AuthThrottle::charge`]).
    pub async fn charge_login(&self) -> Option<LoginCharge> {
        let held = match &self.auth_throttle {
            Some(throttle) => Some((
                throttle.clone(),
                throttle.charge(self.client_addr.ip()).await?,
            )),
            None => None,
        };
        Some(LoginCharge { held })
    }

    /// A login attempt refused locally because the address is throttled.
    pub fn auth_throttled(&self) {
        self.listener.metrics.auth_throttled.inc();
    }

    pub fn hostname(&self) -> &str {
        &self.listener.hostname
    }

    /// When `timeouts.login` runs out: fixed at accept, never moved by traffic, so a client
    /// trickling bytes cannot hold a not-authenticated session (and its backend) past it.
    pub fn login_deadline(&self) -> Instant {
        self.started + self.listener.timeouts.login
    }

    pub fn protocol(&self) -> Protocol {
        self.listener.config.protocol
    }

    /// Records a finished handshake (implicit or STARTTLS) in the session, metrics and log.
    pub fn tls_established(&mut self, info: TlsInfo, took: std::time::Duration, starttls: bool) {
        let m = &self.listener.metrics;
        m.handshake_succeeded(&info, took.as_secs_f64());
        if starttls {
            m.starttls_upgrades.inc();
        }
        tracing::info!(
            sni = info.sni.as_deref().unwrap_or("-"),
            tls_version = %info.version_name(),
            cipher = %info.cipher_name(),
            group = %info.group_name(),
            starttls,
            handshake_ms = took.as_millis() as u64,
            "tls established"
        );
        self.tls = Some(info);
    }

    /// Connects to the backend `target` names (the listener's pool, or where the listener's
    /// router sent a login), recording the time or failure. With `backend_proxy_protocol` the
    /// PROXY v2 header is the first thing written. It describes the session as it is at connect
    /// time: drivers connect only once TLS is up (after STARTTLS on those listeners), so the
    /// header carries the SSL TLV; only SMTP's cleartext mail, where allowed, connects before.
    pub async fn connect_backend_to(
        &self,
        target: &crate::routing::Target,
    ) -> Result<BackendStream, ConnectError> {
        let started = Instant::now();
        let m = &self.listener.metrics;
        let preamble = if self.listener.config.backend_proxy_protocol {
            proxy_protocol::encode_v2(self.client_addr, self.local_addr, self.tls.as_ref())
        } else {
            Vec::new()
        };
        let result = backend::connect_to(
            &self.listener.backend,
            self.listener.timeouts.backend_connect,
            self.counters.clone(),
            &preamble,
            // `routes` choose by the name the client asked for: known once TLS is up.
            self.tls.as_ref().and_then(|t| t.sni.as_deref()),
            target,
        )
        .await;
        match &result {
            Ok(stream) => {
                if let Ok(mut backend) = self.backend.lock() {
                    *backend = stream.peer();
                }
                m.backend_connect_duration
                    .observe(started.elapsed().as_secs_f64());
                if !preamble.is_empty() {
                    tracing::debug!(
                        bytes = preamble.len(),
                        tls = self.tls.is_some(),
                        "proxy protocol v2 header sent to the backend"
                    );
                }
            }
            Err(e) => {
                m.backend_connect_failures.inc();
                tracing::warn!(error = %e, "backend unavailable");
            }
        }
        result
    }

    /// Relays bytes both ways until the end; used once parsing is no longer needed.
    pub async fn relay<C>(&self, client: &mut C, backend: &mut BackendStream) -> EndReason
    where
        C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    {
        let idle = self.listener.timeouts.relay_idle;
        tokio::select! {
            end = relay::relay(client, backend, &self.counters, idle) => match end {
                RelayEnd::Closed => EndReason::ClientClosed,
                RelayEnd::Idle => EndReason::ClientIdle,
                // A client's TLS close without close_notify ends here as a normal close (see
                // `EndReason::client_io`): after LOGOUT or QUIT the backend's goodbye went
                // out and most clients then just drop TCP.
                RelayEnd::Error { side: Side::Backend, error } => EndReason::backend_io(&error),
                RelayEnd::Error { error, .. } => EndReason::client_io(&error),
            },
            () = self.shutdown.cancelled() => EndReason::Shutdown,
        }
    }

    /// The switch after a successful login (IMAP, POP3): bytes held on either side go first, in
    /// order, then a plain relay with no more parsing until the end.
    pub async fn relay_after_login<S: Transport>(
        &self,
        client: &mut ClientStream<S>,
        backend: &mut BackendStream,
        held_client: &[u8],
        held_backend: &[u8],
    ) -> EndReason {
        if !held_client.is_empty()
            && let Err(e) = write_timed(backend, held_client, self).await
        {
            client.close().await;
            return EndReason::backend_io(&e);
        }
        if !held_backend.is_empty()
            && let Err(e) = write_timed(client, held_backend, self).await
        {
            return EndReason::client_io(&e);
        }
        let reason = self.relay(client, backend).await;
        client.close().await;
        reason
    }

    /// The one line at close: who, what protected it, how much moved, how long, and why it ended.
    pub fn log_close(&self, reason: &EndReason) {
        let m = &self.listener.metrics;
        let to_backend = self.counters.to_backend();
        let to_client = self.counters.to_client();
        // What the relay has not reported yet.
        self.counters.report();
        let backend = self.backend.lock().ok().and_then(|b| *b);
        let user = self.user.lock().ok().and_then(|u| u.clone());
        let duration = self.started.elapsed();
        m.session_duration.observe(duration.as_secs_f64());
        m.session_closed(reason.class());
        let tls = self.tls.as_ref();
        tracing::info!(
            listener = %self.listener.config.name,
            protocol = %self.protocol(),
            client = %self.client_addr,
            via = %self.via.map_or_else(|| "-".to_owned(), |a| a.to_string()),
            session_id = %self.id,
            backend = %backend.map_or_else(|| "-".to_owned(), |a| a.to_string()),
            user = user.as_deref().unwrap_or("-"),
            sni = tls.and_then(|t| t.sni.as_deref()).unwrap_or("-"),
            tls_version = %tls.map_or(Cow::Borrowed("none"), TlsInfo::version_name),
            cipher = %tls.map_or(Cow::Borrowed("none"), TlsInfo::cipher_name),
            group = %tls.map_or(Cow::Borrowed("none"), TlsInfo::group_name),
            bytes_to_backend = to_backend,
            bytes_to_client = to_client,
            duration_ms = duration.as_millis() as u64,
            reason = reason.as_str(),
            side = reason.side().as_str(),
            detail = reason.detail(),
            "session closed"
        );
    }
}
