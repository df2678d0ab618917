//! The proxy as a whole: bind, serve every listener, reload the configuration (listeners,
//! backends, limits, TLS, log level) and certificates without dropping a session, drain on
//! shutdown.
//!
//! [`bind`] and [`Server::run`] are separate so tests bind port 0, learn the addresses, and run
//! the proxy in-process; the binary is one more caller.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prometheus::Registry;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::net::{TcpListener, TcpSocket};

use tokio::sync::{Notify, Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admission::Admission;
use crate::backend::{BackendConnector, Pool, tls::TlsSetupError};
use crate::config::{self, ConfigError, ListenerConfig, RuntimeConfig};
use crate::limits::{AuthThrottle, PerIpLimiter};
use crate::log_throttle::LogThrottle;
use crate::logging::LogControl;
use crate::metrics::{Metrics, Readiness};
use crate::reload::{self, Plan};
use crate::routing::{Router, RoutingError};
use crate::session::ListenerContext;
use crate::shared_state::SharedState;
use crate::tls::{
    self, CertStore, Handshaker, LoadedCertificate, ReloadOutcome, TicketKeyError, TicketKeys,
    TlsError,
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
    #[error("listeners[{index}] ({name}): {source}")]
    Routing {
        index: usize,
        name: String,
        source: RoutingError,
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
#[derive(Clone)]
pub struct Control {
    /// Cancel to begin a graceful shutdown: /readyz turns 503, accepting stops, sessions with
    /// nothing to finish say goodbye at once, the rest get `timeouts.shutdown_grace`.
    pub shutdown: CancellationToken,
    /// Notify to reload now (SIGHUP): the configuration file, then certificates and ticket keys.
    pub reload: Arc<Notify>,
    /// The outcome of each configuration reload, newest last.
    reloads: Arc<watch::Sender<Option<Arc<ReloadReport>>>>,
}

impl Default for Control {
    fn default() -> Self {
        Control {
            shutdown: CancellationToken::new(),
            reload: Arc::new(Notify::new()),
            reloads: Arc::new(watch::channel(None).0),
        }
    }
}

impl Control {
    /// Sees every reload's [`ReloadReport`] from now on.
    pub fn reloads(&self) -> watch::Receiver<Option<Arc<ReloadReport>>> {
        self.reloads.subscribe()
    }
}

/// What a configuration reload did.
#[derive(Debug, Clone)]
pub enum ReloadReport {
    /// The new configuration is in service (`changes` may be empty: nothing differed).
    Applied {
        hash: String,
        changes: Vec<String>,
        needs_restart: Vec<String>,
        /// Every listener's bound address now, by name.
        addresses: Vec<(String, SocketAddr)>,
    },
    /// Nothing changed; the last good configuration stays in service.
    Failed { problems: Vec<String> },
}

/// Where the configuration came from, for reloads.
struct Source {
    /// `None`: the built-in default, which never changes.
    path: Option<PathBuf>,
    hash: String,
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
    /// Each listener's user routing, by listener name.
    routers: Vec<(String, Arc<Router>)>,
    source: Option<Source>,
    log: Option<Arc<dyn LogControl>>,
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
            let pool = new_pool(&config, l, &metrics).map_err(|source| StartError::BackendTls {
                index,
                name: l.name.clone(),
                source,
            })?;
            pools.push((l.name.clone(), pool));
        }
        // Likewise a `user_map` or `user_lookup.ca_file` that cannot be used.
        let mut routers = Vec::new();
        for (index, l) in config.listeners.iter().enumerate() {
            let router = new_router(l, &metrics).map_err(|source| StartError::Routing {
                index,
                name: l.name.clone(),
                source,
            })?;
            routers.push((l.name.clone(), router));
        }
        Ok(Server {
            config,
            store,
            ticket_keys,
            metrics,
            readiness: Arc::new(Readiness::default()),
            pools,
            routers,
            source: None,
            log: None,
            shared,
        })
    }

    /// The configuration came from `path` (`None`: the built-in default) with content hash
    /// `hash` ([`crate::config::content_hash`]): SIGHUP, and a change of the file's content
    /// seen every `tls.reload_interval`, reload it.
    pub fn with_source(mut self, path: Option<PathBuf>, hash: String) -> Server {
        self.source = Some(Source { path, hash });
        self
    }

    /// Lets a reload change the log level.
    pub fn with_log(mut self, log: Arc<dyn LogControl>) -> Server {
        self.log = Some(log);
        self
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
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
            routers,
            source,
            log,
            shared,
        } = self;
        if store.is_self_signed() {
            tracing::warn!(
                hostname = %config.hostname,
                "NO CERTIFICATE CONFIGURED: serving a self-signed certificate that clients will not trust; set tls.certificates for production"
            );
        }
        publish_certificates(&metrics, &store.loaded());
        let tls = TlsState::new(&config, store, ticket_keys)?;

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
        let source = source.unwrap_or_else(|| Source {
            path: None,
            hash: String::new(),
        });
        if !source.hash.is_empty() {
            metrics.set_config(&source.hash);
        }
        let grace = Arc::new(AtomicU64::new(nanos(config.timeouts.shutdown_grace)));
        let mut live = Live {
            // One table for all listeners: the limit is per client address, whatever port it
            // uses. Likewise one failure count per address: a guesser may not rotate ports.
            per_ip,
            auth_throttle,
            config,
            hash: source.hash,
            failed_hash: None,
            path: source.path,
            tls,
            listeners: Vec::new(),
            metrics: metrics.clone(),
            tracker: tracker.clone(),
            shutdown: control.shutdown.clone(),
            hard_stop: hard_stop.clone(),
            log,
            grace: grace.clone(),
        };
        for (listener_config, listener) in bound.listeners {
            let Some(pool) = pools
                .iter()
                .find(|(name, _)| *name == listener_config.name)
                .map(|(_, pool)| pool.clone())
            else {
                continue;
            };
            let Some(router) = routers
                .iter()
                .find(|(name, _)| *name == listener_config.name)
                .map(|(_, router)| router.clone())
            else {
                continue;
            };
            live.start_listener(listener_config, Arc::new(listener), pool, router);
        }
        tracker.spawn(live.run(control.clone()));

        readiness.set(true);
        metrics.set_ready(true);
        control.shutdown.cancelled().await;
        readiness.set(false);
        metrics.set_ready(false);
        // The grace of the configuration in service now (a reload may have changed it).
        let grace = Duration::from_nanos(grace.load(Ordering::Relaxed));
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

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// A listener's pool, with its backend metrics.
fn new_pool(
    config: &RuntimeConfig,
    l: &ListenerConfig,
    metrics: &Metrics,
) -> Result<Arc<Pool>, TlsSetupError> {
    Pool::new(
        l,
        &config.hostname,
        config.timeouts.backend_connect,
        metrics.backends(&l.name),
    )
    .map(Arc::new)
}

/// A listener's router, with its routing metrics. Reads `user_map` and `user_lookup.ca_file`
/// (blocking).
fn new_router(l: &ListenerConfig, metrics: &Metrics) -> Result<Arc<Router>, RoutingError> {
    Router::new(l, metrics.routing(l)).map(Arc::new)
}

/// Sets the expiry gauge and warns about certificates that can never be served (the same name
/// and key type as an earlier one), which `mailfront check` also reports.
fn publish_certificates(metrics: &Metrics, loaded: &[LoadedCertificate]) {
    metrics.set_certificates(loaded);
    for warning in loaded
        .iter()
        .filter_map(LoadedCertificate::shadowed_warning)
    {
        tracing::warn!("{warning}");
    }
}

/// The TLS server side in service: certificates, ticket keys and the handshaker built on them.
struct TlsState {
    store: Arc<CertStore>,
    ticket_keys: Option<Arc<TicketKeys>>,
    handshaker: Handshaker,
}

impl TlsState {
    fn new(
        config: &RuntimeConfig,
        store: Arc<CertStore>,
        ticket_keys: Option<Arc<TicketKeys>>,
    ) -> Result<TlsState, TlsError> {
        let tls_config = tls::server_config(&config.tls, store.clone(), ticket_keys.clone())?;
        let handshaker = Handshaker::new(
            tls_config,
            config.tls.handshake_timeout,
            config.tls.min_version,
        );
        Ok(TlsState {
            store,
            ticket_keys,
            handshaker,
        })
    }
}

/// One listener in service.
struct LiveListener {
    config: ListenerConfig,
    socket: Arc<TcpListener>,
    pool: Arc<Pool>,
    /// The listener's user routing (`user_affinity`, `user_map`, `user_lookup`), updated in
    /// place by reloads.
    router: Arc<Router>,
    /// Stops the pool's resolution and checks.
    maintain: CancellationToken,
    /// Stops the accept loop (the listener removed or moved).
    accepting: CancellationToken,
    /// The context new sessions take; sessions keep the one they started with.
    context: watch::Sender<Arc<ListenerContext>>,
    /// `max_connections`, shared across a move to a new address.
    permits: Arc<Semaphore>,
}

impl LiveListener {
    fn address(&self) -> SocketAddr {
        self.socket.local_addr().unwrap_or(self.config.listen)
    }
}

/// Everything a reload may change, owned by the one task that reloads.
struct Live {
    config: RuntimeConfig,
    /// Content hash of the configuration in service.
    hash: String,
    /// Content hash of the last file that failed, so it is reported once, not every interval.
    failed_hash: Option<String>,
    path: Option<PathBuf>,
    tls: TlsState,
    listeners: Vec<LiveListener>,
    per_ip: PerIpLimiter,
    auth_throttle: AuthThrottle,
    metrics: Metrics,
    tracker: TaskTracker,
    shutdown: CancellationToken,
    hard_stop: CancellationToken,
    log: Option<Arc<dyn LogControl>>,
    grace: Arc<AtomicU64>,
}

/// What a reload loads from files before it changes anything.
struct Prepared {
    config: RuntimeConfig,
    hash: String,
    plan: Plan,
    store: Option<Arc<CertStore>>,
    ticket_keys: Option<Option<Arc<TicketKeys>>>,
}

impl Live {
    fn context(
        &self,
        l: &ListenerConfig,
        pool: &Arc<Pool>,
        router: &Arc<Router>,
    ) -> Arc<ListenerContext> {
        Arc::new(ListenerContext {
            hostname: self.config.hostname.clone(),
            timeouts: self.config.timeouts.clone(),
            limits: self.config.limits.clone(),
            handshaker: self.tls.handshaker.clone(),
            metrics: self.metrics.listener(l),
            backend: BackendConnector::Pool(pool.clone()),
            client_info_notices: Default::default(),
            learned: Default::default(),
            router: Some(router.clone()),
            config: l.clone(),
        })
    }

    /// Starts serving `config` on `socket`.
    fn start_listener(
        &mut self,
        config: ListenerConfig,
        socket: Arc<TcpListener>,
        pool: Arc<Pool>,
        router: Arc<Router>,
    ) {
        let maintain = self.shutdown.child_token();
        self.tracker.spawn(pool.clone().maintain(maintain.clone()));
        let context = self.context(&config, &pool, &router);
        let (sender, contexts) = watch::channel(context);
        let live = LiveListener {
            permits: Arc::new(Semaphore::new(config.max_connections)),
            config,
            socket,
            pool,
            router,
            maintain,
            accepting: self.shutdown.child_token(),
            context: sender,
        };
        self.accept(&live, contexts);
        self.listeners.push(live);
    }

    /// Spawns the accept loop of `live` on its current socket.
    fn accept(&self, live: &LiveListener, contexts: watch::Receiver<Arc<ListenerContext>>) {
        let config = &live.config;
        tracing::info!(
            listener = %config.name,
            protocol = %config.protocol,
            tls = config.tls.as_str(),
            address = %live.address(),
            backend = %config.backend,
            proxy_protocol_from = config.proxy_protocol_from.len(),
            backend_client_info = config.backend_client_info,
            "listening"
        );
        let context = contexts.borrow().clone();
        self.tracker.spawn(accept_loop(
            live.socket.clone(),
            contexts,
            live.permits.clone(),
            Admission {
                context,
                per_ip: self.per_ip.clone(),
                auth_throttle: self.auth_throttle.clone(),
                shutdown: self.shutdown.clone(),
                hard_stop: self.hard_stop.clone(),
            },
            self.tracker.clone(),
            live.accepting.clone(),
        ));
    }

    /// Reloads on SIGHUP and when the file's content changes; re-reads certificates and ticket
    /// keys every `tls.reload_interval`.
    async fn run(mut self, control: Control) {
        loop {
            let forced = tokio::select! {
                () = self.shutdown.cancelled() => return,
                () = control.reload.notified() => true,
                () = tokio::time::sleep(self.config.tls.reload_interval) => false,
            };
            if let Some(report) = self.reload_config(forced).await {
                control.reloads.send_replace(Some(Arc::new(report)));
            }
            self.reload_tls_files(forced).await;
            self.reload_backend_cas().await;
            self.reload_user_routing(forced).await;
        }
    }

    /// `user_map` files and `user_lookup.ca_file` bundles, on the certificates' schedule (and
    /// at once on SIGHUP): a changed file is used by logins routed afterwards; a bad one keeps
    /// the one in service, logged and counted (by the router).
    async fn reload_user_routing(&self, forced: bool) {
        for live in &self.listeners {
            if !live.config.routing.is_on() {
                continue;
            }
            let router = live.router.clone();
            if let Err(e) = tokio::task::spawn_blocking(move || router.reload_files(forced)).await {
                tracing::error!(error = %e, "user routing reload task failed");
            }
        }
    }

    /// `backend_tls.ca` bundles, on the certificates' schedule: a changed bundle is used by the
    /// sessions that start afterwards; a bad one keeps the bundle in service, logged and counted.
    async fn reload_backend_cas(&self) {
        for live in &self.listeners {
            let pool = live.pool.clone();
            let name = &live.config.name;
            match tokio::task::spawn_blocking(move || pool.reload_ca()).await {
                Ok(Ok(true)) => {
                    self.metrics.backend_ca_reload(name, true);
                    tracing::info!(listener = %name, "backend_tls.ca reloaded");
                }
                Ok(Ok(false)) => {}
                Ok(Err(e)) => {
                    self.metrics.backend_ca_reload(name, false);
                    tracing::error!(listener = %name, error = %e, "backend_tls.ca reload failed: keeping the CA bundle in service");
                }
                Err(e) => tracing::error!(error = %e, "backend_tls.ca reload task failed"),
            }
        }
    }

    /// Reads the file; reloads when forced or when its content changed. `None`: nothing to do.
    async fn reload_config(&mut self, forced: bool) -> Option<ReloadReport> {
        let path = self.path.clone()?;
        let read = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || config::read_file(&path)).await
        };
        let text = match read {
            Ok(Ok(text)) => text,
            Ok(Err(e)) => return self.failed(forced, None, vec![e.to_string()]),
            Err(e) => return self.failed(forced, None, vec![e.to_string()]),
        };
        let hash = config::content_hash(text.as_bytes());
        if !forced && (hash == self.hash || self.failed_hash.as_deref() == Some(hash.as_str())) {
            return None;
        }
        tracing::info!(path = %path.display(), hash = %hash, forced, "configuration reload");
        let old = self.config.clone();
        let store = self.tls.store.clone();
        let keys = self.tls.ticket_keys.clone();
        let prepared =
            tokio::task::spawn_blocking(move || prepare(&path, &text, hash, &old, store, keys))
                .await;
        let prepared = match prepared {
            Ok(Ok(prepared)) => prepared,
            Ok(Err((hash, problems))) => return self.failed(forced, Some(hash), problems),
            Err(e) => return self.failed(forced, None, vec![e.to_string()]),
        };
        Some(self.apply(prepared))
    }

    /// Logs and counts a reload that changed nothing.
    fn failed(
        &mut self,
        forced: bool,
        hash: Option<String>,
        problems: Vec<String>,
    ) -> Option<ReloadReport> {
        if !forced && hash.is_some() && hash == self.failed_hash {
            return None;
        }
        self.failed_hash = hash;
        self.metrics.config_reload(false);
        tracing::error!(
            problems = %problems.join("; "),
            "configuration reload failed: nothing changed, the last good configuration stays in service"
        );
        for problem in &problems {
            tracing::error!(problem = %problem, "invalid configuration");
        }
        Some(ReloadReport::Failed { problems })
    }

    /// Binds what is new, then swaps everything at once; a bind that fails changes nothing.
    fn apply(&mut self, prepared: Prepared) -> ReloadReport {
        let Prepared {
            config: new,
            hash,
            plan,
            store,
            ticket_keys,
        } = prepared;
        // 1. Everything that can fail, before anything changes.
        let mut sockets: Vec<(String, Arc<TcpListener>)> = Vec::new();
        let mut problems = Vec::new();
        for (index, l) in new.listeners.iter().enumerate() {
            let fresh =
                plan.added.iter().any(|a| a.name == l.name) || plan.rebound.contains(&l.name);
            if !fresh {
                continue;
            }
            // A removed listener's socket on the same address is handed over (a rename).
            let handed = self
                .listeners
                .iter()
                .find(|old| {
                    plan.removed.contains(&old.config.name)
                        && old.config.listen == l.listen
                        && l.listen.port() != 0
                })
                .map(|old| old.socket.clone());
            match handed {
                Some(socket) => sockets.push((l.name.clone(), socket)),
                None => match listen(l.listen, new.listen_backlog) {
                    Ok(socket) => sockets.push((l.name.clone(), Arc::new(socket))),
                    Err(e) => problems.push(format!(
                        "listeners[{index}] ({}): cannot listen on {}: {e}",
                        l.name, l.listen
                    )),
                },
            }
        }
        let mut pools: Vec<(String, Arc<Pool>)> = Vec::new();
        let mut routers: Vec<(String, Arc<Router>)> = Vec::new();
        for (index, l) in plan.added.iter().enumerate() {
            match new_pool(&new, l, &self.metrics) {
                Ok(pool) => pools.push((l.name.clone(), pool)),
                Err(e) => problems.push(format!("listeners[{index}] ({}): {e}", l.name)),
            }
            match new_router(l, &self.metrics) {
                Ok(router) => routers.push((l.name.clone(), router)),
                Err(e) => problems.push(format!("listeners[{index}] ({}): {e}", l.name)),
            }
        }
        let tls = if plan.tls {
            let store = store.unwrap_or_else(|| self.tls.store.clone());
            let keys = ticket_keys.unwrap_or_else(|| self.tls.ticket_keys.clone());
            match TlsState::new(&new, store, keys) {
                Ok(tls) => Some(tls),
                Err(e) => {
                    problems.push(e.to_string());
                    None
                }
            }
        } else {
            None
        };
        if !problems.is_empty() {
            return self
                .failed(true, Some(hash), problems)
                .unwrap_or(ReloadReport::Failed {
                    problems: Vec::new(),
                });
        }

        // 2. The swap: nothing below fails.
        if let Some(tls) = tls {
            if plan.certificates {
                publish_certificates(&self.metrics, &tls.store.loaded());
            }
            self.tls = tls;
        }
        let mut needs_restart = plan.needs_restart.clone();
        if let Some(level) = &plan.log_level {
            match &self.log {
                Some(log) => {
                    if let Err(e) = log.set_level(level) {
                        needs_restart.push(format!("log.level: not applied: {e}"));
                    }
                }
                None => {
                    needs_restart.push("log.level: this process has no reloadable logger".into())
                }
            }
        }
        self.per_ip.set_limit(new.limits.connections_per_ip);
        self.auth_throttle.set_limits(
            new.limits.auth_failures_per_ip,
            new.limits.auth_failure_window,
        );
        self.grace
            .store(nanos(new.timeouts.shutdown_grace), Ordering::Relaxed);
        self.config = new;

        let mut kept = Vec::new();
        for live in std::mem::take(&mut self.listeners) {
            if plan.removed.contains(&live.config.name) {
                live.accepting.cancel();
                live.maintain.cancel();
                live.pool.retire();
                tracing::info!(listener = %live.config.name, address = %live.address(), "listener removed: no longer accepting; its sessions go on");
            } else {
                kept.push(live);
            }
        }
        let config = self.config.clone();
        for mut live in kept {
            let Some(l) = config.listeners.iter().find(|l| l.name == live.config.name) else {
                continue;
            };
            if let Err(e) = live
                .pool
                .update(l, &config.hostname, config.timeouts.backend_connect)
            {
                tracing::error!(listener = %l.name, error = %e, "backend_tls: keeping the previous backends");
            }
            // Validated by the same check moments ago; a file that changed in between keeps the
            // routing in service.
            match live.router.update(l) {
                Ok(true) => {
                    // New series for what the listener routes by now.
                    self.metrics.routing(l);
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::error!(listener = %l.name, error = %e, "user routing: keeping the previous settings");
                }
            }
            resize(
                &live.permits,
                live.config.max_connections,
                l.max_connections,
            );
            live.config = l.clone();
            let context = self.context(l, &live.pool, &live.router);
            live.context.send_replace(context);
            if let Some((_, socket)) = sockets.iter().find(|(name, _)| *name == l.name) {
                live.accepting.cancel();
                live.socket = socket.clone();
                live.accepting = self.shutdown.child_token();
                self.accept(&live, live.context.subscribe());
            }
            self.listeners.push(live);
        }
        for l in &plan.added {
            let socket = sockets
                .iter()
                .find(|(name, _)| *name == l.name)
                .map(|(_, s)| s.clone());
            let pool = pools
                .iter()
                .find(|(name, _)| *name == l.name)
                .map(|(_, p)| p.clone());
            let router = routers
                .iter()
                .find(|(name, _)| *name == l.name)
                .map(|(_, r)| r.clone());
            if let (Some(socket), Some(pool), Some(router)) = (socket, pool, router) {
                self.start_listener(l.clone(), socket, pool, router);
            }
        }

        self.hash = hash.clone();
        self.failed_hash = None;
        self.metrics.config_reload(true);
        self.metrics.set_config(&hash);
        if plan.is_empty() {
            tracing::info!(hash = %hash, "configuration reloaded: nothing changed");
        }
        for change in &plan.changes {
            tracing::info!(hash = %hash, change = %change, "configuration reloaded");
        }
        for item in &needs_restart {
            tracing::warn!(hash = %hash, needs_restart = %item, "configuration change not applied: needs a restart");
        }
        ReloadReport::Applied {
            hash,
            changes: plan.changes,
            needs_restart,
            addresses: self
                .listeners
                .iter()
                .map(|l| (l.config.name.clone(), l.address()))
                .collect(),
        }
    }

    /// Certificates and ticket keys, on the configuration's schedule (and at once on SIGHUP).
    async fn reload_tls_files(&self, forced: bool) {
        let store = self.tls.store.clone();
        let worker = store.clone();
        let result = tokio::task::spawn_blocking(move || worker.reload(forced)).await;
        match result {
            Ok(Ok(ReloadOutcome::Reloaded)) => {
                self.metrics.certificate_reload(true);
                let loaded = store.loaded();
                publish_certificates(&self.metrics, &loaded);
                for cert in &loaded {
                    tracing::info!(certificate = %cert.label, not_after = cert.not_after, "certificate loaded");
                }
            }
            Ok(Ok(ReloadOutcome::Unchanged)) => {}
            Ok(Err(e)) => {
                self.metrics.certificate_reload(false);
                tracing::error!(error = %e, "certificate reload failed: keeping the certificates in service");
            }
            Err(e) => tracing::error!(error = %e, "certificate reload task failed"),
        }
        if let Some(keys) = &self.tls.ticket_keys {
            reload_ticket_keys(keys, &self.metrics, forced).await;
        }
    }
}

/// Changes a listener's `max_connections` in place: permits added at once; removed as sessions
/// end, by a task that takes them and forgets them.
fn resize(permits: &Arc<Semaphore>, old: usize, new: usize) {
    if new > old {
        permits.add_permits(new - old);
    } else if new < old {
        let take = u32::try_from(old - new).unwrap_or(u32::MAX);
        let permits = permits.clone();
        tokio::spawn(async move {
            if let Ok(taken) = permits.acquire_many_owned(take).await {
                taken.forget();
            }
        });
    }
}

/// Parses and validates `text` exactly as `mailfront check` does, and loads the files a
/// changed `tls` section names. Blocking (file reads). `Err`: the hash and every problem.
fn prepare(
    path: &Path,
    text: &str,
    hash: String,
    old: &RuntimeConfig,
    store: Arc<CertStore>,
    ticket_keys: Option<Arc<TicketKeys>>,
) -> Result<Prepared, (String, Vec<String>)> {
    let fail = |hash: &String, e: &dyn std::fmt::Display| {
        (
            hash.clone(),
            e.to_string().lines().map(str::to_owned).collect::<Vec<_>>(),
        )
    };
    let base = path.parent().unwrap_or(Path::new("."));
    let config = check(base, text).map_err(|e| fail(&hash, &e))?;
    let plan = reload::plan(old, &config);
    let store = if plan.certificates {
        Some(Arc::new(
            CertStore::load(&config.tls.certificates, &config.hostname)
                .map_err(|e| fail(&hash, &e))?,
        ))
    } else {
        drop(store);
        None
    };
    let ticket_keys = if plan.ticket_keys {
        Some(match &config.tls.ticket_key_file {
            Some(path) => Some(Arc::new(
                TicketKeys::load(path).map_err(|e| fail(&hash, &e))?,
            )),
            None => None,
        })
    } else {
        drop(ticket_keys);
        None
    };
    Ok(Prepared {
        config,
        hash,
        plan,
        store,
        ticket_keys,
    })
}

/// Why a configuration is refused: what `mailfront check` reports.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("listeners[{index}] ({name}): {source}")]
    BackendTls {
        index: usize,
        name: String,
        source: TlsSetupError,
    },
    #[error("listeners[{index}] ({name}): {source}")]
    Routing {
        index: usize,
        name: String,
        source: RoutingError,
    },
    #[error(transparent)]
    TicketKeys(#[from] TicketKeyError),
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// Parses and validates a configuration's text as `mailfront check` does: the YAML, every
/// value, the `backend_tls` CA bundles, each `user_map` (parsed whole) and
/// `user_lookup.ca_file`, and the ticket key file (the certificates are loaded by whoever
/// uses them). Relative paths resolve against `base_dir` (the file's directory).
pub fn check(base_dir: &Path, text: &str) -> Result<RuntimeConfig, CheckError> {
    let base = base_dir;
    let config = config::Config::from_yaml(text)?.validate(base)?;
    for (index, l) in config.listeners.iter().enumerate() {
        if let Some(tls) = &l.backend.tls {
            crate::backend::tls::BackendTlsClient::new(tls).map_err(|source| {
                CheckError::BackendTls {
                    index,
                    name: l.name.clone(),
                    source,
                }
            })?;
        }
        crate::routing::check(l).map_err(|source| CheckError::Routing {
            index,
            name: l.name.clone(),
            source,
        })?;
    }
    if let Some(path) = &config.tls.ticket_key_file {
        TicketKeys::load(path)?;
    }
    Ok(config)
}

async fn accept_loop(
    listener: Arc<TcpListener>,
    contexts: watch::Receiver<Arc<ListenerContext>>,
    permits: Arc<Semaphore>,
    mut admission: Admission,
    tracker: TaskTracker,
    stop: CancellationToken,
) {
    let mut accept_errors = LogThrottle::new(ACCEPT_ERROR_LOG_INTERVAL);
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        // The settings in service now: a reload since the last accept applies to this one.
        let context = contexts.borrow().clone();
        admission.context = context.clone();
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
        admission.admit(tcp, peer, permit, &tracker);
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

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = "hostname: mx.example.test\nlisteners:\n  - name: imaps\n    protocol: imap\n    listen: \"127.0.0.1:0\"\n    tls: implicit\n    backend: \"127.0.0.1:143\"\n";

    /// `mailfront check` (and every reload) parses each `user_map` whole and builds each
    /// `user_lookup` client, so a broken file is found before it is in service.
    #[test]
    fn check_parses_the_user_map_and_loads_the_lookup_ca() {
        let dir = tempfile::tempdir().unwrap();
        let map = format!("{CONFIG}    user_map: users.yaml\n");
        let err = check(dir.path(), &map).unwrap_err().to_string();
        assert!(
            err.starts_with("listeners[0] (imaps): user_map ") && err.contains("cannot read"),
            "{err}"
        );
        std::fs::write(dir.path().join("users.yaml"), "alice: 10.0.0.1\n").unwrap();
        let err = check(dir.path(), &map).unwrap_err().to_string();
        assert!(err.contains("\"alice\""), "{err}");
        std::fs::write(dir.path().join("users.yaml"), "alice: \"10.0.0.1:143\"\n").unwrap();
        let config = check(dir.path(), &map).unwrap();
        assert_eq!(
            config.listeners[0].routing.map.as_deref(),
            Some(dir.path().join("users.yaml").as_path())
        );
        let lookup = format!(
            "{CONFIG}    user_lookup:\n      url: \"https://auth.example/\"\n      ca_file: auth-ca.pem\n"
        );
        let err = check(dir.path(), &lookup).unwrap_err().to_string();
        assert!(
            err.starts_with("listeners[0] (imaps): user_lookup.ca_file "),
            "{err}"
        );
        let bad_url = format!("{CONFIG}    user_lookup:\n      url: \"auth.example\"\n");
        let err = check(dir.path(), &bad_url).unwrap_err().to_string();
        assert!(err.contains("listeners[0].user_lookup.url"), "{err}");
    }
}
