//! The proxy as a whole: bind, serve every listener, reload certificates, drain on shutdown.
//!
//! [`bind`] and [`Server::run`] are separate so tests bind port 0, learn the addresses, and run
//! the proxy in-process; the binary is one more caller.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prometheus::Registry;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backend::{BackendConnector, Pool, tls::TlsSetupError};
use crate::config::{ListenerConfig, RuntimeConfig, TlsMode};
use crate::connection::{read_proxy_header, refuse_per_ip, serve_connection};
use crate::limits::{AuthThrottle, PerIpLimiter};
use crate::log_throttle::LogThrottle;
use crate::metrics::{Metrics, ProxyHeaderResult, Readiness};
use crate::proxy_header::Header as ProxyHeader;
use crate::session::{ListenerContext, Session};
use crate::shared_state::SharedState;
use crate::tls::{
    self, CertStore, Handshaker, ReloadOutcome, TicketKeyError, TicketKeys, TlsError,
};

/// Sockets bound before the proxy starts.
pub struct Bound {
    pub listeners: Vec<(ListenerConfig, TcpListener)>,
    pub admin: Option<TcpListener>,
}

impl Bound {
    /// The address each listener is bound to, by name (tests bind port 0 and read this).
    pub fn addresses(&self) -> Vec<(String, SocketAddr)> {
        self.listeners
            .iter()
            .filter_map(|(c, l)| l.local_addr().ok().map(|a| (c.name.clone(), a)))
            .collect()
    }

    pub fn admin_address(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|l| l.local_addr().ok())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("listeners[{index}] ({name}): cannot listen on {addr}: {source}")]
    Bind {
        index: usize,
        name: String,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("metrics.listen: cannot listen on {addr}: {source}")]
    BindAdmin {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    TicketKeys(#[from] TicketKeyError),
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error(transparent)]
    SharedState(#[from] crate::shared_state::SharedStateError),
    #[error("listeners[{index}] ({name}): {source}")]
    BackendTls {
        index: usize,
        name: String,
        source: TlsSetupError,
    },
}

/// Binds every listener and the admin endpoint, each with `limits.listen_backlog`; an error
/// names the listener.
pub async fn bind(config: &RuntimeConfig) -> Result<Bound, StartError> {
    let mut listeners = Vec::new();
    for (index, l) in config.listeners.iter().enumerate() {
        let listener =
            listen(l.listen, config.listen_backlog).map_err(|source| StartError::Bind {
                index,
                name: l.name.clone(),
                addr: l.listen,
                source,
            })?;
        listeners.push((l.clone(), listener));
    }
    let admin = match config.metrics_listen {
        None => None,
        Some(addr) => Some(
            listen(addr, config.listen_backlog)
                .map_err(|source| StartError::BindAdmin { addr, source })?,
        ),
    };
    Ok(Bound { listeners, admin })
}

/// A listening socket as `TcpListener::bind` makes one (SO_REUSEADDR, so a restart binds while
/// the last run's connections sit in TIME_WAIT; IPV6_V6ONLY left at the system default, so
/// `[::]` also takes IPv4 where the host allows it), but with `backlog` instead of the fixed 128.
pub fn listen(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

/// How long to wait for sessions after the hard stop. Each one then only writes its goodbye
/// (one line and a TLS close_notify) and logs its close line: immediate for a client that is
/// still reading, so this bound only cuts off peers that stopped reading, whose sockets the
/// kernel closes when the process exits. It is short and named (it was a bare 5 s) because it
/// adds to `shutdown_grace` in the time a SIGTERM takes, which orchestrators must cover
/// (Kubernetes `terminationGracePeriodSeconds`).
pub const AFTER_HARD_STOP: Duration = Duration::from_secs(1);

/// Pause after a failed accept instead of spinning: out of file descriptors (EMFILE, ENFILE)
/// or kernel memory, the connection waiting in the queue would fail again at once. Short,
/// because descriptors come back as sessions end; taken after any failure, so an error that
/// does not go away cannot spin the loop either.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// At most one `accept failed` line per listener this often: out of descriptors, the loop fails
/// ten times a second (2,075 lines in 3.5 minutes were seen); each line carries the count of
/// failures left out since the one before.
const ACCEPT_ERROR_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// How the outside world steers a running proxy.
#[derive(Clone, Default)]
pub struct Control {
    /// Cancel to begin a graceful shutdown: /readyz turns 503, accepting stops, sessions with
    /// nothing to finish say goodbye at once, the rest get `timeouts.shutdown_grace`.
    pub shutdown: CancellationToken,
    /// Notify to re-read certificates now (SIGHUP).
    pub reload: Arc<Notify>,
}

/// A configured proxy, ready to run.
pub struct Server {
    config: RuntimeConfig,
    store: Arc<CertStore>,
    ticket_keys: Option<Arc<TicketKeys>>,
    metrics: Metrics,
    readiness: Arc<Readiness>,
    /// Each listener's backends, by listener name.
    pools: Vec<(String, Arc<Pool>)>,
    /// `shared_state`: the limits' counts shared with the other replicas.
    shared: Option<Arc<SharedState>>,
}

impl Server {
    /// Loads certificates and registers metrics on `registry`.
    pub fn new(config: RuntimeConfig, registry: &Registry) -> Result<Server, StartError> {
        let store = Arc::new(CertStore::load(&config.tls.certificates, &config.hostname)?);
        let ticket_keys = match &config.tls.ticket_key_file {
            Some(path) => Some(Arc::new(TicketKeys::load(path)?)),
            None => None,
        };
        let metrics = Metrics::register(registry)?;
        // Reads the password file and CA now (a bad one stops the start); connects later, in
        // the background, so an unreachable store never does.
        let shared = match &config.shared_state {
            Some(shared) => Some(SharedState::new(shared, registry)?),
            None => None,
        };
        // Here, not at run: a `backend_tls.ca` that cannot be read stops the start.
        let mut pools = Vec::new();
        for (index, l) in config.listeners.iter().enumerate() {
            let pool = Pool::new(
                l,
                &config.hostname,
                config.timeouts.backend_connect,
                metrics.backends(&l.name),
            )
            .map_err(|source| StartError::BackendTls {
                index,
                name: l.name.clone(),
                source,
            })?;
            pools.push((l.name.clone(), Arc::new(pool)));
        }
        Ok(Server {
            config,
            store,
            ticket_keys,
            metrics,
            readiness: Arc::new(Readiness::default()),
            pools,
            shared,
        })
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn cert_store(&self) -> &Arc<CertStore> {
        &self.store
    }

    /// Serves until `control.shutdown` is cancelled, then drains for the grace period.
    pub async fn run(self, bound: Bound, control: Control) -> Result<(), StartError> {
        let Server {
            config,
            store,
            ticket_keys,
            metrics,
            readiness,
            pools,
            shared,
        } = self;
        if store.is_self_signed() {
            tracing::warn!(
                hostname = %config.hostname,
                "NO CERTIFICATE CONFIGURED: serving a self-signed certificate that clients will not trust; set tls.certificates for production"
            );
        }
        metrics.set_certificates(&store.loaded());
        let tls_config = tls::server_config(&config.tls, store.clone(), ticket_keys.clone())?;
        let handshaker = Handshaker::new(
            tls_config,
            config.tls.handshake_timeout,
            config.tls.min_version,
        );

        let tracker = TaskTracker::new();
        // One table for all listeners: the limit is per client address, whatever port it uses.
        let per_ip = PerIpLimiter::with_shared(config.limits.connections_per_ip, shared.clone());
        // Likewise one failure count per address: a guesser may not rotate through ports.
        let auth_throttle = AuthThrottle::with_shared(
            config.limits.auth_failures_per_ip,
            config.limits.auth_failure_window,
            shared.clone(),
        );
        if let Some(shared) = &shared {
            tracing::info!(replica = %shared.replica(), "limits counted across replicas in shared_state");
            let slots = per_ip.clone();
            tracker.spawn(
                shared
                    .clone()
                    .maintain(move || slots.shared_slots(), control.shutdown.clone()),
            );
        }
        // Two signals for sessions: `control.shutdown` itself starts the drain (see
        // `Session::draining`), and `hard_stop`, cancelled only when the grace period runs out,
        // ends whatever is left (authenticated relays, a message the backend is still judging).
        let hard_stop = CancellationToken::new();

        if let Some(admin) = bound.admin {
            tracing::info!(address = %admin.local_addr().map(|a| a.to_string()).unwrap_or_default(), "metrics endpoint listening");
            tokio::spawn(crate::metrics::serve_admin(
                admin,
                metrics.clone(),
                readiness.clone(),
                // Still answering (/readyz with 503) while sessions drain.
                hard_stop.clone(),
            ));
        }

        tracker.spawn(reload_certificates(
            store.clone(),
            ticket_keys,
            metrics.clone(),
            config.tls.reload_interval,
            control.reload.clone(),
            control.shutdown.clone(),
        ));

        for (_, pool) in &pools {
            tracker.spawn(pool.clone().maintain(control.shutdown.clone()));
        }
        for (listener_config, listener) in bound.listeners {
            let Some(pool) = pools
                .iter()
                .find(|(name, _)| *name == listener_config.name)
                .map(|(_, pool)| pool.clone())
            else {
                continue;
            };
            let context = Arc::new(ListenerContext {
                hostname: config.hostname.clone(),
                timeouts: config.timeouts.clone(),
                limits: config.limits.clone(),
                handshaker: handshaker.clone(),
                metrics: metrics.listener(&listener_config),
                backend: BackendConnector::Pool(pool),
                client_info_notices: Default::default(),
                config: listener_config,
            });
            tracing::info!(
                listener = %context.config.name,
                protocol = %context.config.protocol,
                tls = context.config.tls.as_str(),
                address = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
                backend = %context.config.backend,
                proxy_protocol_from = context.config.proxy_protocol_from.len(),
                backend_client_info = context.config.backend_client_info,
                "listening"
            );
            tracker.spawn(accept_loop(
                listener,
                context,
                per_ip.clone(),
                auth_throttle.clone(),
                tracker.clone(),
                control.shutdown.clone(),
                hard_stop.clone(),
            ));
        }

        readiness.set(true);
        metrics.set_ready(true);
        control.shutdown.cancelled().await;
        readiness.set(false);
        metrics.set_ready(false);
        let grace = config.timeouts.shutdown_grace;
        tracing::info!(
            sessions = tracker.len(),
            grace_s = grace.as_secs(),
            "shutting down: no new connections, draining sessions"
        );
        tracker.close();
        // Sessions with nothing to finish said goodbye when `control.shutdown` fired (their
        // drain signal is a child of it); this waits for messages in DATA/BDAT and for
        // authenticated relays, and returns as soon as the last session ends.
        if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
            tracing::warn!(
                sessions = tracker.len(),
                "grace period over: closing the remaining sessions"
            );
            hard_stop.cancel();
            if tokio::time::timeout(AFTER_HARD_STOP, tracker.wait())
                .await
                .is_err()
            {
                tracing::warn!(
                    sessions = tracker.len(),
                    "sessions still writing their goodbye: exiting without them"
                );
            }
        }
        hard_stop.cancel();
        tracing::info!("stopped");
        Ok(())
    }
}

async fn accept_loop(
    listener: TcpListener,
    context: Arc<ListenerContext>,
    per_ip: PerIpLimiter,
    auth_throttle: AuthThrottle,
    tracker: TaskTracker,
    shutdown: CancellationToken,
    hard_stop: CancellationToken,
) {
    let permits = Arc::new(Semaphore::new(context.config.max_connections));
    let admission = Admission {
        context: context.clone(),
        per_ip,
        auth_throttle,
        shutdown: shutdown.clone(),
        hard_stop,
    };
    let behind_balancer = !context.config.proxy_protocol_from.is_empty();
    let mut accept_errors = LogThrottle::new(ACCEPT_ERROR_LOG_INTERVAL);
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let (tcp, peer) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                if let Some(suppressed) = accept_errors.occurred(tokio::time::Instant::now()) {
                    tracing::warn!(listener = %context.config.name, error = %e, suppressed, "accept failed");
                }
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        context.metrics.accepted.inc();
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            context.metrics.refused.inc();
            tracing::warn!(listener = %context.config.name, client = %peer, limit = context.config.max_connections, "connection limit reached: closing");
            drop(tcp);
            continue;
        };
        // The address the client reached (for the PROXY header); the bound address if the
        // socket cannot say, which only differs for wildcard binds.
        let local_addr = tcp.local_addr().unwrap_or(context.config.listen);
        if behind_balancer {
            // Dovecot's haproxy_trusted_networks rule: only the balancers may connect, and
            // their header names the client. Refused before any read, so a stranger cannot
            // claim an address.
            if !crate::cidr::any_contains(&context.config.proxy_protocol_from, peer.ip()) {
                context.metrics.proxy_header(ProxyHeaderResult::Untrusted);
                tracing::debug!(listener = %context.config.name, peer = %peer, "connection from outside proxy_protocol_from: closing");
                drop(tcp);
                continue;
            }
            // The header is read in the connection's own task: a slow balancer holds one
            // permit, never the accept loop.
            let admission = admission.clone();
            tracker.spawn(async move {
                admission.after_proxy_header(tcp, peer, local_addr).await;
                drop(permit);
            });
            continue;
        }
        // Before any handshake: a refused address costs no TLS work (and no session task).
        let Some(session) = admission.session(peer, local_addr, None) else {
            if context.config.tls == TlsMode::Implicit {
                drop(tcp);
                continue;
            }
            // The listener's permit is held while the refusal is written, so refusals are
            // bounded by max_connections like sessions are.
            let context = context.clone();
            tracker.spawn(async move {
                refuse_per_ip(tcp, &context).await;
                drop(permit);
            });
            continue;
        };
        let active = context.metrics.active.clone();
        let admission = admission.clone();
        tracker.spawn(async move {
            let mut session = session;
            if !admission.shared_admit(&mut session).await {
                drop(session);
                if admission.context.config.tls == TlsMode::Starttls {
                    refuse_per_ip(tcp, &admission.context).await;
                }
                drop(permit);
                return;
            }
            active.inc();
            serve_connection(tcp, session).await;
            active.dec();
            drop(permit);
        });
    }
}

/// What turns an accepted connection into a session: the shared per-address tables and the
/// shutdown signals.
#[derive(Clone)]
struct Admission {
    context: Arc<ListenerContext>,
    per_ip: PerIpLimiter,
    auth_throttle: AuthThrottle,
    shutdown: CancellationToken,
    hard_stop: CancellationToken,
}

impl Admission {
    /// A session for `client`, or `None` when its address is at `limits.connections_per_ip`
    /// (counted and logged here; the caller closes or refuses).
    fn session(
        &self,
        client: SocketAddr,
        local: SocketAddr,
        via: Option<SocketAddr>,
    ) -> Option<Session> {
        let context = &self.context;
        let Some(per_ip_guard) = self.per_ip.try_acquire(client.ip()) else {
            context.metrics.refused_per_ip.inc();
            tracing::debug!(listener = %context.config.name, client = %client, limit = context.limits.connections_per_ip, "per-address limit of unauthenticated sessions reached: refusing");
            return None;
        };
        let mut session = Session::new(context.clone(), client, local, self.hard_stop.clone());
        session.via = via;
        // A child, so a session can never cancel the whole server's shutdown signal.
        session.draining = self.shutdown.child_token();
        session.per_ip = Some(per_ip_guard);
        session.auth_throttle = Some(self.auth_throttle.clone());
        Some(session)
    }

    /// With `shared_state`, the replicas' shared count of unauthenticated sessions on a session
    /// the local count admitted (one bounded round trip, in the session's own task, never the
    /// accept loop's). `false`: the address is at its limit across replicas (counted and
    /// logged here; the caller refuses); with the store down, `true`.
    async fn shared_admit(&self, session: &mut Session) -> bool {
        let Some(guard) = session.per_ip.as_mut() else {
            return true;
        };
        if guard.share().await {
            return true;
        }
        let context = &self.context;
        context.metrics.refused_per_ip.inc();
        tracing::debug!(listener = %context.config.name, client = %session.client_addr, limit = context.limits.connections_per_ip, "per-address limit of unauthenticated sessions reached across replicas: refusing");
        false
    }

    /// A connection from a trusted balancer: reads its PROXY header, then serves the client it
    /// names, whose address from then on is the session's everywhere (limits included).
    async fn after_proxy_header(&self, mut tcp: TcpStream, peer: SocketAddr, local: SocketAddr) {
        let context = &self.context;
        // `tls.handshake_timeout` bounds the header too: it delays the handshake.
        let timeout = context.handshaker.timeout();
        let (client, local) = match read_proxy_header(&mut tcp, timeout).await {
            Ok(ProxyHeader::Proxy {
                source,
                destination,
            }) => {
                context.metrics.proxy_header(ProxyHeaderResult::Proxy);
                (source, destination)
            }
            Ok(ProxyHeader::Unknown) => {
                // §2.1/§2.2: the receiver then uses the connection's own endpoints.
                context.metrics.proxy_header(ProxyHeaderResult::Unknown);
                tracing::debug!(listener = %context.config.name, peer = %peer, "PROXY header without addresses: serving the balancer's own address");
                (peer, local)
            }
            Ok(ProxyHeader::Local) => {
                // A balancer's health check (v2 LOCAL): nothing to serve, nothing to log.
                context.metrics.proxy_header(ProxyHeaderResult::Local);
                return;
            }
            Err(e) => {
                context.metrics.proxy_header(e.result());
                tracing::info!(listener = %context.config.name, peer = %peer, error = %e, "PROXY protocol header refused: closing");
                return;
            }
        };
        let Some(mut session) = self.session(client, local, Some(peer)) else {
            if context.config.tls == TlsMode::Starttls {
                refuse_per_ip(tcp, context).await;
            }
            return;
        };
        if !self.shared_admit(&mut session).await {
            drop(session);
            if context.config.tls == TlsMode::Starttls {
                refuse_per_ip(tcp, context).await;
            }
            return;
        }
        let active = context.metrics.active.clone();
        active.inc();
        serve_connection(tcp, session).await;
        active.dec();
    }
}

async fn reload_certificates(
    store: Arc<CertStore>,
    ticket_keys: Option<Arc<TicketKeys>>,
    metrics: Metrics,
    interval: Duration,
    reload: Arc<Notify>,
    shutdown: CancellationToken,
) {
    loop {
        let forced = tokio::select! {
            () = shutdown.cancelled() => return,
            () = reload.notified() => true,
            () = tokio::time::sleep(interval) => false,
        };
        // File reads and key parsing are blocking work: keep them off the async workers.
        let worker = store.clone();
        let result = tokio::task::spawn_blocking(move || worker.reload(forced)).await;
        match result {
            Ok(Ok(ReloadOutcome::Reloaded)) => {
                metrics.certificate_reload(true);
                let loaded = store.loaded();
                metrics.set_certificates(&loaded);
                for cert in &loaded {
                    tracing::info!(certificate = %cert.label, not_after = cert.not_after, "certificate loaded");
                }
            }
            Ok(Ok(ReloadOutcome::Unchanged)) => {}
            Ok(Err(e)) => {
                metrics.certificate_reload(false);
                tracing::error!(error = %e, "certificate reload failed: keeping the certificates in service");
            }
            Err(e) => tracing::error!(error = %e, "certificate reload task failed"),
        }
        if let Some(keys) = &ticket_keys {
            reload_ticket_keys(keys, &metrics, forced).await;
        }
    }
}

/// Re-reads the ticket key file on the certificates' schedule; a bad file keeps the keys in
/// service, logged and counted.
async fn reload_ticket_keys(keys: &Arc<TicketKeys>, metrics: &Metrics, forced: bool) {
    let worker = keys.clone();
    match tokio::task::spawn_blocking(move || worker.reload(forced)).await {
        Ok(Ok(ReloadOutcome::Reloaded)) => {
            metrics.ticket_key_reload(true);
            tracing::info!(keys = keys.len(), "session ticket keys loaded");
        }
        Ok(Ok(ReloadOutcome::Unchanged)) => {}
        Ok(Err(e)) => {
            metrics.ticket_key_reload(false);
            tracing::error!(error = %e, "ticket key reload failed: keeping the keys in service");
        }
        Err(e) => tracing::error!(error = %e, "ticket key reload task failed"),
    }
}
