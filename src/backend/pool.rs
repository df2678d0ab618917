//! A listener's backends: the addresses its `backend` and `routes` names resolve to, their
//! health, and the choice of one for each session.
//!
//! - **Selection**: least connections among the addresses in rotation, ties broken round-robin
//!   ([`health::plan`]). Least connections suits mail: IMAP sessions last hours (IDLE) while
//!   submissions last seconds, so counting open sessions balances real load where plain
//!   round-robin would pile long sessions on one server.
//! - **Names**: every configured name resolves to all its addresses, each a backend of its own,
//!   resolved again every [`RESOLVE_INTERVAL`] (a headless Kubernetes Service gives one address
//!   per ready pod). A failed lookup keeps the last answer.
//! - **Passive health**: a session's connect, TLS, STARTTLS or greeting that fails rests that
//!   address with exponential back-off ([`health`]) and the session tries the next one.
//! - **The greeting**: the pool reads the backend's first line itself, within
//!   `timeouts.backend_connect`, so "sends no greeting" is a failure the pool sees and can step
//!   over; the bytes are then handed to the driver ahead of the stream, which parses the greeting
//!   as before (a refusal such as `554` is still the driver's to pass on).
//! - **Active checks** (`backend_health.interval`): a connect and a positive greeting, then the
//!   protocol's goodbye; with `backend_proxy_protocol` the check opens with a PROXY v2 `LOCAL`
//!   header, which backends accept as a health check (HAProxy's `proxy-protocol.txt` §2.2).
//! - **Reload** ([`Pool::update`]): a listener keeps its pool across reloads; new settings
//!   replace the old ones for sessions that start afterwards, addresses still configured keep
//!   their health and counts, and an address no longer configured leaves rotation at once. Its
//!   sessions go on (their [`Lease`] holds the pool), and its metric series go with the last one.
//! - **Drain** (`{address, drain: true}`): the address takes no new sessions, its live sessions
//!   go on; `mailfront_backend_draining` says so.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use arc_swap::ArcSwap;
use std::time::Duration;
use tokio::sync::Notify;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::dialogue::{self, MAX_LINE, Starttls, Step};
use super::health::{self, Candidate, Health};
use super::tls::{BackendTlsClient, TlsSetupError};
use super::{BackendStream, ByteCounters, ConnectError};
use crate::config::{BackendAddress, Backends, ListenerConfig, Protocol, TlsMode};
use crate::metrics::{BackendAddressMetrics, BackendFailure, BackendMetrics};
use crate::routing::{Target, affinity};
use crate::transport::Transport;

/// How often names are looked up again: CoreDNS answers for a headless Service with a 30 s TTL
/// by default, so a pod that starts or stops is seen within about a minute.
pub const RESOLVE_INTERVAL: Duration = Duration::from_secs(30);
/// Most octets of STARTTLS exchange read from a backend: a greeting and an EHLO reply are a few
/// hundred octets; past this the backend is not speaking the protocol.
const MAX_DIALOGUE: usize = 64 * 1024;

/// One listener's backend addresses and their state.
pub struct Pool {
    listener: String,
    /// What the configuration says; swapped whole by [`Pool::update`].
    settings: ArcSwap<Settings>,
    /// Tells [`Pool::maintain`] that the settings changed (a new check interval, new names).
    changed: Notify,
    metrics: BackendMetrics,
    state: Mutex<State>,
    rotation: AtomicUsize,
}

/// A pool's configured settings: each attempt reads them once, so a reload never mixes two.
#[derive(Clone)]
struct Settings {
    protocol: Protocol,
    hostname: String,
    backends: Backends,
    proxy_protocol: bool,
    connect_timeout: Duration,
    tls: Option<BackendTlsClient>,
}

impl Settings {
    fn new(
        listener: &ListenerConfig,
        hostname: &str,
        connect_timeout: Duration,
        tls: Option<BackendTlsClient>,
    ) -> Settings {
        Settings {
            protocol: listener.protocol,
            hostname: hostname.to_owned(),
            backends: listener.backend.clone(),
            proxy_protocol: listener.backend_proxy_protocol,
            connect_timeout,
            tls,
        }
    }

    /// Whether `other` would make the same pool (the TLS client follows from `backends.tls`).
    fn same(&self, other: &Settings) -> bool {
        self.protocol == other.protocol
            && self.hostname == other.hostname
            && self.backends == other.backends
            && self.proxy_protocol == other.proxy_protocol
            && self.connect_timeout == other.connect_timeout
    }

    /// Every configured name, once.
    fn names(&self) -> Vec<BackendAddress> {
        let mut names: Vec<BackendAddress> = Vec::new();
        let all = self
            .backends
            .default
            .iter()
            .chain(self.backends.routes.iter().flat_map(|r| r.backend.iter()));
        for address in all {
            if !names.contains(address) {
                names.push(address.clone());
            }
        }
        names
    }
}

#[derive(Default)]
struct State {
    /// What each configured name resolved to last (IP literals: themselves).
    resolved: HashMap<BackendAddress, Vec<SocketAddr>>,
    members: HashMap<SocketAddr, Member>,
}

struct Member {
    active: u32,
    health: Health,
    /// Every name that resolves to it is marked drain.
    draining: bool,
    metrics: BackendAddressMetrics,
}

impl State {
    /// Whether some configured name still resolves to `addr`.
    fn configured(&self, addr: &SocketAddr) -> bool {
        self.resolved.values().any(|v| v.contains(addr))
    }
}

/// A session's place on one address: counted for least connections until dropped with the
/// backend stream.
pub struct Lease {
    pool: Arc<Pool>,
    addr: SocketAddr,
}

impl Lease {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut state = self.pool.lock();
        let last = match state.members.get_mut(&self.addr) {
            Some(member) => {
                member.active = member.active.saturating_sub(1);
                member.metrics.sessions.dec();
                member.active == 0
            }
            None => false,
        };
        // The last session on an address no longer configured (removed by a reload or gone
        // from DNS): the address and its series go now.
        if last && !state.configured(&self.addr) {
            state.members.remove(&self.addr);
            self.pool.metrics.forget(&self.addr.to_string());
        }
    }
}

/// Why one attempt failed.
#[derive(Debug)]
struct Failure {
    reason: BackendFailure,
    detail: String,
}

impl Failure {
    fn new(reason: BackendFailure, detail: impl Into<String>) -> Failure {
        Failure {
            reason,
            detail: detail.into(),
        }
    }
}

/// A connection ready for the driver: TLS up where configured, the greeting read.
struct Opened {
    stream: Box<dyn Transport>,
    replay: Vec<u8>,
}

impl Pool {
    /// A pool for `listener`; IP-literal backends are known at once, names once resolved. Fails
    /// only when `backend_tls` cannot load its roots.
    pub fn new(
        listener: &ListenerConfig,
        hostname: &str,
        connect_timeout: Duration,
        metrics: BackendMetrics,
    ) -> Result<Pool, TlsSetupError> {
        let tls = listener
            .backend
            .tls
            .as_ref()
            .map(BackendTlsClient::new)
            .transpose()?;
        let pool = Pool {
            listener: listener.name.clone(),
            settings: ArcSwap::from_pointee(Settings::new(
                listener,
                hostname,
                connect_timeout,
                tls,
            )),
            changed: Notify::new(),
            metrics,
            state: Mutex::new(State::default()),
            rotation: AtomicUsize::new(0),
        };
        pool.reconcile();
        Ok(pool)
    }

    /// A reload's settings for this listener's pool: sessions that start afterwards use them.
    /// Returns false, changing nothing, when they make the same pool. Addresses still configured
    /// keep their health and session counts; an address no longer configured leaves rotation
    /// now and is forgotten when its last session ends. Fails, changing nothing, only when a new
    /// `backend_tls` cannot load its roots.
    pub fn update(
        &self,
        listener: &ListenerConfig,
        hostname: &str,
        connect_timeout: Duration,
    ) -> Result<bool, TlsSetupError> {
        let current = self.settings();
        let mut next = Settings::new(listener, hostname, connect_timeout, None);
        if current.same(&next) {
            return Ok(false);
        }
        next.tls = if current.backends.tls == next.backends.tls {
            current.tls.clone()
        } else {
            next.backends
                .tls
                .as_ref()
                .map(BackendTlsClient::new)
                .transpose()?
        };
        self.settings.store(Arc::new(next));
        self.reconcile();
        self.changed.notify_one();
        Ok(true)
    }

    /// Re-reads the `backend_tls.ca` bundle (blocking: it reads a file); sessions that start
    /// afterwards verify against it. Ok(true) when it changed and was swapped in; an error
    /// changes nothing, so the bundle in service stays.
    pub fn reload_ca(&self) -> Result<bool, TlsSetupError> {
        let current = self.settings();
        let (Some(client), Some(tls)) = (&current.tls, &current.backends.tls) else {
            return Ok(false);
        };
        let Some(client) = client.reloaded(tls)? else {
            return Ok(false);
        };
        let mut next = Settings::clone(&current);
        next.tls = Some(client);
        // The reloader applies configuration reloads and this one in turn, from one task, so
        // nothing swapped the settings in between.
        self.settings.store(Arc::new(next));
        Ok(true)
    }

    /// The listener is gone: every address leaves rotation, idle ones and their series now, the
    /// others with their last session.
    pub fn retire(&self) {
        let mut state = self.lock();
        state.resolved.clear();
        let idle: Vec<SocketAddr> = state
            .members
            .iter()
            .filter(|(_, m)| m.active == 0)
            .map(|(addr, _)| *addr)
            .collect();
        for addr in idle {
            state.members.remove(&addr);
            self.metrics.forget(&addr.to_string());
        }
    }

    /// Brings the address table in line with the settings: IP literals are known at once,
    /// names no longer configured drop their answers, idle addresses nobody names go, and every
    /// address's drain flag follows its names.
    fn reconcile(&self) {
        let settings = self.settings();
        let names = settings.names();
        {
            let mut state = self.lock();
            state.resolved.retain(|name, _| names.contains(name));
        }
        for address in &names {
            if let Some(addr) = crate::config::literal_socket_addr(address) {
                self.install(address, vec![addr]);
            }
        }
        let mut state = self.lock();
        let gone: Vec<SocketAddr> = state
            .members
            .iter()
            .filter(|(addr, m)| m.active == 0 && !state.configured(addr))
            .map(|(addr, _)| *addr)
            .collect();
        for addr in gone {
            state.members.remove(&addr);
            self.metrics.forget(&addr.to_string());
        }
        self.mark_draining(&mut state, &settings.backends);
    }

    /// Sets each address's drain flag (and gauge): draining when every configured name that
    /// resolves to it is marked drain.
    fn mark_draining(&self, state: &mut State, backends: &Backends) {
        let State { resolved, members } = state;
        for (addr, member) in members.iter_mut() {
            let mut names = resolved.iter().filter(|(_, v)| v.contains(addr)).peekable();
            let draining =
                names.peek().is_some() && names.all(|(name, _)| backends.is_draining(name));
            if draining != member.draining {
                member.draining = draining;
                member.metrics.draining.set(i64::from(draining));
                if draining {
                    tracing::info!(listener = %self.listener, backend = %addr, sessions = member.active, "backend draining: no new sessions, its sessions go on");
                } else {
                    tracing::info!(listener = %self.listener, backend = %addr, "backend no longer draining");
                }
            }
        }
    }

    /// The settings now in force.
    fn settings(&self) -> Arc<Settings> {
        self.settings.load_full()
    }

    /// The configured backends now in force.
    pub fn backends(&self) -> Backends {
        self.settings().backends.clone()
    }

    /// Sessions open on `addr` now and whether it is in the pool at all (tests, diagnostics).
    pub fn sessions_on(&self, addr: SocketAddr) -> Option<u32> {
        self.lock().members.get(&addr).map(|m| m.active)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding it; if something did, the counts are still usable.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Every configured name, once.
    fn names(&self) -> Vec<BackendAddress> {
        self.settings().names()
    }

    /// Opens a connection for a session whose client sent `sni`: the first matching route's
    /// backends, else the default ones, tried in [`health::plan`] order. `preamble` (the PROXY
    /// header) goes first on the connection, before any TLS. The same as
    /// [`Pool::connect_to`] with [`Target::Pool`].
    pub async fn connect(
        self: &Arc<Self>,
        sni: Option<&str>,
        counters: Arc<ByteCounters>,
        preamble: &[u8],
    ) -> Result<BackendStream, ConnectError> {
        self.connect_to(&Target::Pool, sni, counters, preamble)
            .await
    }

    /// Opens a connection for a login routed to `target` ([`crate::routing`]):
    /// - [`Target::Pool`]: the SNI route's backends (else the default), least connections;
    /// - [`Target::Affinity`]: the same candidates (draining names left out) in the
    ///   rendezvous order of the key ([`affinity::order`]), those out of rotation skipped but
    ///   the order kept ([`health::plan_in_order`]): every replica sends the user to the same
    ///   backend, the next one in the order while it is down, and back once it returns;
    /// - [`Target::Fixed`]: exactly those backends, in order, with this listener's TLS and
    ///   PROXY settings, never another (a mapped or looked-up backend that is down is the
    ///   session's failure; drain does not apply, the mapping is explicit). An address that is
    ///   also one of the pool's shares its health and session count; a name the pool does not
    ///   know is looked up for this session (within `timeouts.backend_connect`).
    ///
    /// `preamble` (the PROXY header) goes first on the connection, before any TLS.
    pub async fn connect_to(
        self: &Arc<Self>,
        target: &Target,
        sni: Option<&str>,
        counters: Arc<ByteCounters>,
        preamble: &[u8],
    ) -> Result<BackendStream, ConnectError> {
        let settings = self.settings();
        let entries: Vec<BackendAddress> = match target {
            Target::Fixed { backends, .. } => backends.clone(),
            Target::Pool | Target::Affinity { .. } => settings.backends.for_sni(sni).to_vec(),
        };
        let label = || {
            entries
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(",")
        };
        let candidates = match target {
            Target::Fixed { .. } => {
                self.fixed_addresses(&entries, settings.connect_timeout)
                    .await
            }
            Target::Pool | Target::Affinity { .. } => {
                // A draining name takes no new session.
                let serving: Vec<BackendAddress> = entries
                    .iter()
                    .filter(|e| !settings.backends.is_draining(e))
                    .cloned()
                    .collect();
                self.addresses(&serving, settings.connect_timeout).await
            }
        };
        if candidates.is_empty() {
            return Err(ConnectError::Resolve {
                backend: label(),
                source: io::Error::new(io::ErrorKind::NotFound, "no address"),
            });
        }
        let order = {
            let state = self.lock();
            let known: Vec<Candidate> = candidates
                .iter()
                .map(|(addr, _)| {
                    state.members.get(addr).map_or(
                        Candidate {
                            active: 0,
                            health: Health::default(),
                        },
                        |m| Candidate {
                            active: m.active,
                            health: m.health.clone(),
                        },
                    )
                })
                .collect();
            let now = Instant::now();
            match target {
                Target::Pool => {
                    health::plan(&known, self.rotation.fetch_add(1, Ordering::Relaxed), now)
                }
                Target::Affinity { key } => {
                    let addrs: Vec<SocketAddr> = candidates.iter().map(|(a, _)| *a).collect();
                    health::plan_in_order(&known, &affinity::order(key.as_bytes(), &addrs), now)
                }
                Target::Fixed { .. } => {
                    let listed: Vec<usize> = (0..candidates.len()).collect();
                    health::plan_in_order(&known, &listed, now)
                }
            }
        };
        let mut last = String::new();
        let mut attempts = 0;
        for index in order {
            let Some((addr, host)) = candidates.get(index) else {
                continue;
            };
            attempts += 1;
            let lease = self.lease(*addr);
            match self.open(&settings, *addr, host, preamble).await {
                Ok(opened) => {
                    self.succeeded(*addr, true);
                    counters
                        .to_backend
                        .fetch_add(preamble.len() as u64, Ordering::Relaxed);
                    return Ok(BackendStream::new(
                        opened.stream,
                        counters,
                        opened.replay,
                        Some(lease),
                    ));
                }
                Err(failure) => {
                    last = format!("{addr}: {}", failure.detail);
                    self.failed(*addr, &failure, "session");
                }
            }
        }
        Err(ConnectError::Unavailable {
            backend: label(),
            attempts,
            last,
        })
    }

    /// The addresses of a [`Target::Fixed`]'s backends, in order, each with its host (for the
    /// TLS name): IP literals as they are, names the pool resolves from its answers, other
    /// names looked up now (not kept: the pool tracks only what it is configured with).
    async fn fixed_addresses(
        &self,
        entries: &[BackendAddress],
        timeout: Duration,
    ) -> Vec<(SocketAddr, String)> {
        let mut out: Vec<(SocketAddr, String)> = Vec::new();
        for entry in entries {
            let addrs = match crate::config::literal_socket_addr(entry) {
                Some(addr) => vec![addr],
                None if self.names().contains(entry) => {
                    let cached = self.lock().resolved.get(entry).cloned();
                    match cached {
                        Some(addrs) if !addrs.is_empty() => addrs,
                        _ => self.refresh(entry, timeout).await,
                    }
                }
                None => {
                    let lookup = tokio::net::lookup_host((entry.host.as_str(), entry.port));
                    match tokio::time::timeout(timeout, lookup).await {
                        Ok(Ok(found)) => {
                            let mut addrs: Vec<SocketAddr> = found.collect();
                            addrs.sort();
                            addrs
                        }
                        Ok(Err(e)) => {
                            tracing::warn!(listener = %self.listener, backend = %entry, error = %e, "cannot resolve the user's backend");
                            Vec::new()
                        }
                        Err(_) => {
                            tracing::warn!(listener = %self.listener, backend = %entry, "the user's backend: lookup timed out");
                            Vec::new()
                        }
                    }
                }
            };
            for addr in addrs {
                if !out.iter().any(|(a, _)| *a == addr) {
                    out.push((addr, entry.host.clone()));
                }
            }
        }
        out
    }

    /// The addresses of `entries` with the host each came from (for the TLS name), looking up
    /// a name that has no answer yet.
    async fn addresses(
        &self,
        entries: &[BackendAddress],
        timeout: Duration,
    ) -> Vec<(SocketAddr, String)> {
        let mut out: Vec<(SocketAddr, String)> = Vec::new();
        for entry in entries {
            let cached = self.lock().resolved.get(entry).cloned();
            let addrs = match cached {
                Some(addrs) if !addrs.is_empty() => addrs,
                _ => self.refresh(entry, timeout).await,
            };
            for addr in addrs {
                if !out.iter().any(|(a, _)| *a == addr) {
                    out.push((addr, entry.host.clone()));
                }
            }
        }
        out
    }

    /// Looks `entry` up again and installs the answer; a failure keeps the last one.
    async fn refresh(&self, entry: &BackendAddress, timeout: Duration) -> Vec<SocketAddr> {
        let lookup = tokio::net::lookup_host((entry.host.as_str(), entry.port));
        match tokio::time::timeout(timeout, lookup).await {
            Ok(Ok(found)) => {
                let mut addrs: Vec<SocketAddr> = found.collect();
                addrs.sort();
                addrs.dedup();
                if addrs.is_empty() {
                    tracing::warn!(listener = %self.listener, backend = %entry, "backend name has no address: keeping the last answer");
                } else if self.names().contains(entry) {
                    // Still configured (a reload may have removed it during the lookup).
                    self.install(entry, addrs);
                    let settings = self.settings();
                    self.mark_draining(&mut self.lock(), &settings.backends);
                }
            }
            Ok(Err(e)) => {
                tracing::warn!(listener = %self.listener, backend = %entry, error = %e, "cannot resolve backend: keeping the last answer");
            }
            Err(_) => {
                tracing::warn!(listener = %self.listener, backend = %entry, "backend lookup timed out: keeping the last answer");
            }
        }
        self.lock().resolved.get(entry).cloned().unwrap_or_default()
    }

    /// Records what `entry` resolves to: new addresses join in rotation, addresses no name
    /// returns any more leave once no session uses them.
    fn install(&self, entry: &BackendAddress, addrs: Vec<SocketAddr>) {
        let mut state = self.lock();
        let changed = state.resolved.get(entry) != Some(&addrs);
        for addr in &addrs {
            if !state.members.contains_key(addr) {
                let metrics = self.metrics.address(&addr.to_string());
                state.members.insert(
                    *addr,
                    Member {
                        active: 0,
                        health: Health::default(),
                        draining: false,
                        metrics,
                    },
                );
            }
        }
        state.resolved.insert(entry.clone(), addrs);
        if changed {
            let State { resolved, members } = &mut *state;
            let gone: Vec<SocketAddr> = members
                .iter()
                .filter(|(addr, m)| m.active == 0 && !resolved.values().any(|v| v.contains(addr)))
                .map(|(addr, _)| *addr)
                .collect();
            for addr in gone {
                members.remove(&addr);
                self.metrics.forget(&addr.to_string());
            }
            let now: Vec<String> = resolved
                .get(entry)
                .map(|v| v.iter().map(ToString::to_string).collect())
                .unwrap_or_default();
            tracing::info!(listener = %self.listener, backend = %entry, addresses = %now.join(","), "backend addresses");
        }
    }

    fn lease(self: &Arc<Self>, addr: SocketAddr) -> Lease {
        if let Some(member) = self.lock().members.get_mut(&addr) {
            member.active = member.active.saturating_add(1);
            member.metrics.sessions.inc();
        }
        Lease {
            pool: self.clone(),
            addr,
        }
    }

    fn succeeded(&self, addr: SocketAddr, session: bool) {
        let mut state = self.lock();
        if let Some(member) = state.members.get_mut(&addr) {
            if session {
                member.metrics.sessions_total.inc();
            }
            if member.health.succeeded() {
                member.metrics.up.set(1);
                tracing::info!(listener = %self.listener, backend = %addr, "backend is back in rotation");
            }
        }
    }

    fn failed(&self, addr: SocketAddr, failure: &Failure, by: &'static str) {
        let (was_up, backoff) = {
            let mut state = self.lock();
            match state.members.get_mut(&addr) {
                Some(member) => {
                    // Series exist for the pool's own addresses only: a mapped or looked-up
                    // backend outside it is in the session's log line, not a label forever.
                    self.metrics.failed(&addr.to_string(), failure.reason);
                    member.metrics.up.set(0);
                    let was_up = member.health.is_up();
                    (was_up, member.health.failed(Instant::now()))
                }
                None => (true, Duration::ZERO),
            }
        };
        let retry_in_ms = backoff.as_millis() as u64;
        let reason = failure.reason.as_str();
        let error = &failure.detail;
        // A warning when an address leaves rotation; while it stays out, each further failure
        // (an active check every interval, a probing session) only at debug.
        if was_up {
            tracing::warn!(listener = %self.listener, backend = %addr, reason, error = %error, by, retry_in_ms, "backend failed: out of rotation until its back-off ends");
        } else {
            tracing::debug!(listener = %self.listener, backend = %addr, reason, error = %error, by, retry_in_ms, "backend still failing");
        }
    }

    /// One attempt, all of it within `timeouts.backend_connect`.
    async fn open(
        &self,
        settings: &Settings,
        addr: SocketAddr,
        host: &str,
        preamble: &[u8],
    ) -> Result<Opened, Failure> {
        let within = settings.connect_timeout;
        match tokio::time::timeout(within, self.open_within(settings, addr, host, preamble)).await {
            Ok(result) => result,
            Err(_) => Err(Failure::new(
                BackendFailure::Timeout,
                format!("no connection, handshake and greeting within {within:?}"),
            )),
        }
    }

    async fn open_within(
        &self,
        settings: &Settings,
        addr: SocketAddr,
        host: &str,
        preamble: &[u8],
    ) -> Result<Opened, Failure> {
        let refused = |e: io::Error| Failure::new(BackendFailure::Refused, e.to_string());
        let mut tcp = TcpStream::connect(addr).await.map_err(refused)?;
        // Mail protocols are chatty request/response exchanges: do not let Nagle delay
        // replies (nor hold back the PROXY header).
        let _ = tcp.set_nodelay(true);
        if !preamble.is_empty() {
            // In one write on a fresh connection, so the header is never split (the PROXY
            // protocol asks senders to send it at once); before any TLS, as HAProxy does.
            tcp.write_all(preamble).await.map_err(refused)?;
        }
        let tls_failed = |e: io::Error| Failure::new(BackendFailure::Tls, e.to_string());
        match &settings.tls {
            None => {
                let replay = read_greeting(&mut tcp).await?;
                Ok(Opened {
                    stream: Box::new(tcp),
                    replay,
                })
            }
            Some(tls) if tls.mode == TlsMode::Implicit => {
                let mut stream = tls.handshake(tcp, host).await.map_err(tls_failed)?;
                let replay = read_greeting(&mut stream).await?;
                Ok(Opened {
                    stream: Box::new(stream),
                    replay,
                })
            }
            Some(tls) => {
                let replay = Self::starttls(settings, &mut tcp).await?;
                let stream = tls.handshake(tcp, host).await.map_err(tls_failed)?;
                Ok(Opened {
                    stream: Box::new(stream),
                    replay,
                })
            }
        }
    }

    /// The STARTTLS exchange on the cleartext connection; returns the greeting for the driver.
    async fn starttls(settings: &Settings, tcp: &mut TcpStream) -> Result<Vec<u8>, Failure> {
        let mut machine = Starttls::new(settings.protocol, &settings.hostname);
        let mut buf = Vec::new();
        let mut read = 0usize;
        loop {
            let end = fill_line(tcp, &mut buf).await?;
            read = read.saturating_add(end);
            if read > MAX_DIALOGUE {
                return Err(Failure::new(
                    BackendFailure::Starttls,
                    "STARTTLS exchange too long",
                ));
            }
            let line: Vec<u8> = buf.drain(..end).collect();
            match machine.line(&line) {
                Step::Read => {}
                Step::Send(bytes) => tcp
                    .write_all(&bytes)
                    .await
                    .map_err(|e| Failure::new(BackendFailure::Starttls, e.to_string()))?,
                Step::Handshake if buf.is_empty() => return Ok(machine.replay_greeting()),
                // Bytes after the go-ahead would be read as if protected (the injection of
                // CERT VU#555316, from the backend's side).
                Step::Handshake => {
                    return Err(Failure::new(
                        BackendFailure::Starttls,
                        "bytes after the STARTTLS reply",
                    ));
                }
                Step::Fail(detail) => return Err(Failure::new(BackendFailure::Starttls, detail)),
            }
        }
    }

    /// Resolves names every [`RESOLVE_INTERVAL`] and, with `backend_health`, checks every
    /// address every interval, until `shutdown`.
    pub async fn maintain(self: Arc<Self>, shutdown: CancellationToken) {
        let mut resolve = tokio::time::interval(RESOLVE_INTERVAL);
        resolve.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let checks = |interval: Option<Duration>| {
            interval.map(|every| {
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
                tick
            })
        };
        let mut interval = self.settings().backends.health_interval;
        let mut check = checks(interval);
        loop {
            let check_tick = async {
                match check.as_mut() {
                    Some(tick) => {
                        tick.tick().await;
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = self.changed.notified() => {
                    let now = self.settings().backends.health_interval;
                    if now != interval {
                        interval = now;
                        check = checks(interval);
                    }
                    // New names are looked up at once, not at the next tick.
                    resolve.reset_immediately();
                }
                _ = resolve.tick() => {
                    let timeout = self.settings().connect_timeout;
                    for name in self.names() {
                        if crate::config::literal_socket_addr(&name).is_none() {
                            self.refresh(&name, timeout).await;
                        }
                    }
                }
                () = check_tick => self.check_all(&shutdown).await,
            }
        }
    }

    /// One active check of every address, all at once (a black-holed one must not delay the
    /// others), each bounded by `timeouts.backend_connect`.
    async fn check_all(self: &Arc<Self>, shutdown: &CancellationToken) {
        let mut targets: Vec<(SocketAddr, String)> = Vec::new();
        {
            let state = self.lock();
            for (name, addrs) in &state.resolved {
                for addr in addrs {
                    if !targets.iter().any(|(a, _)| a == addr) {
                        targets.push((*addr, name.host.clone()));
                    }
                }
            }
        }
        let mut checks = tokio::task::JoinSet::new();
        for (addr, host) in targets {
            let pool = self.clone();
            checks.spawn(async move {
                let result = pool.check(addr, &host).await;
                (addr, result)
            });
        }
        loop {
            let next = tokio::select! {
                () = shutdown.cancelled() => return,
                next = checks.join_next() => next,
            };
            match next {
                None => return,
                Some(Ok((addr, Ok(())))) => self.succeeded(addr, false),
                Some(Ok((addr, Err(failure)))) => self.failed(addr, &failure, "active_check"),
                Some(Err(_)) => {}
            }
        }
    }

    /// A connect and a positive greeting (after TLS where configured), then a goodbye.
    async fn check(&self, addr: SocketAddr, host: &str) -> Result<(), Failure> {
        let settings = self.settings();
        let preamble: &[u8] = if settings.proxy_protocol {
            &crate::proxy_protocol::local_header()
        } else {
            &[]
        };
        let opened = self.open(&settings, addr, host, preamble).await?;
        let greeting = dialogue::first_line(&opened.replay).unwrap_or_default();
        if !dialogue::greeting_is_positive(settings.protocol, greeting) {
            let text: String = String::from_utf8_lossy(greeting)
                .chars()
                .filter(|c| !c.is_control())
                .take(120)
                .collect();
            return Err(Failure::new(
                BackendFailure::NoGreeting,
                format!("refused at greeting: {text:?}"),
            ));
        }
        let mut stream = opened.stream;
        let _ = tokio::time::timeout(settings.connect_timeout, async {
            stream
                .write_all(dialogue::goodbye(settings.protocol))
                .await?;
            stream.shutdown().await
        })
        .await;
        Ok(())
    }
}

/// Reads until the first line of the greeting is in; returns everything read, for the driver.
async fn read_greeting<S: AsyncRead + Unpin>(stream: &mut S) -> Result<Vec<u8>, Failure> {
    let mut buf = Vec::new();
    fill_line(stream, &mut buf).await?;
    Ok(buf)
}

/// Reads into `buf` until it holds a complete line; returns the line's length (LF included).
async fn fill_line<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut Vec<u8>,
) -> Result<usize, Failure> {
    let mut chunk = [0u8; 2048];
    loop {
        if let Some(line) = dialogue::first_line(buf) {
            return Ok(line.len());
        }
        if buf.len() >= MAX_LINE {
            return Err(Failure::new(
                BackendFailure::NoGreeting,
                format!("no line within {MAX_LINE} octets"),
            ));
        }
        match stream.read(&mut chunk).await {
            Ok(0) => {
                return Err(Failure::new(
                    BackendFailure::NoGreeting,
                    "closed before its greeting",
                ));
            }
            Ok(n) => buf.extend_from_slice(chunk.get(..n).unwrap_or_default()),
            Err(e) => return Err(Failure::new(BackendFailure::NoGreeting, e.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BackendAddress, Backends};

    fn pool(registry: &prometheus::Registry) -> Arc<Pool> {
        let metrics = crate::metrics::Metrics::register(registry).unwrap();
        let name = BackendAddress {
            host: "dovecot.mail.svc".into(),
            port: 143,
        };
        let listener = ListenerConfig {
            name: "imaps".into(),
            protocol: Protocol::Imap,
            listen: "127.0.0.1:0".parse().unwrap(),
            tls: TlsMode::Implicit,
            backend: Backends::single(name),
            max_connections: 1,
            require_tls_for_mail: true,
            backend_proxy_protocol: false,
            proxy_protocol_from: Vec::new(),
            backend_client_info: false,
            routing: Default::default(),
        };
        Arc::new(
            Pool::new(
                &listener,
                "mx.example.test",
                Duration::from_secs(1),
                metrics.backends("imaps"),
            )
            .unwrap(),
        )
    }

    fn addrs(list: &[&str]) -> Vec<SocketAddr> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn a_new_answer_adds_addresses_and_drops_those_gone_once_idle() {
        let registry = prometheus::Registry::new();
        let pool = pool(&registry);
        let name = pool.names().remove(0);
        pool.install(&name, addrs(&["10.0.0.1:143", "10.0.0.2:143"]));
        let held = pool.lease("10.0.0.2:143".parse().unwrap());
        pool.install(&name, addrs(&["10.0.0.3:143"]));
        let mut members: Vec<String> = pool
            .lock()
            .members
            .keys()
            .map(ToString::to_string)
            .collect();
        members.sort();
        // .1 is gone; .2 stays while a session uses it, and goes at the next answer after.
        assert_eq!(members, ["10.0.0.2:143", "10.0.0.3:143"]);
        let text = prometheus::TextEncoder::new()
            .encode_to_string(&registry.gather())
            .unwrap();
        assert!(!text.contains("10.0.0.1:143"), "{text}");
        assert!(text.contains(
            "mailfront_backend_active_sessions{backend=\"10.0.0.2:143\",listener=\"imaps\"} 1"
        ));
        drop(held);
        pool.install(&name, addrs(&["10.0.0.3:143", "10.0.0.4:143"]));
        assert_eq!(pool.lock().members.len(), 2);
    }

    /// A backend that greets every connection and holds it until the client goes; dropping
    /// (aborting) the task closes the listening socket.
    async fn greeter(addr: &str) -> (SocketAddr, tokio::task::JoinHandle<()>) {
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let _ = tcp.write_all(b"* OK ready\r\n").await;
                    let mut buf = [0u8; 64];
                    let _ = tcp.read(&mut buf).await;
                });
            }
        });
        (addr, task)
    }

    fn pool_of(
        registry: &prometheus::Registry,
        addrs: &[SocketAddr],
        drain: &[SocketAddr],
    ) -> Arc<Pool> {
        let metrics = crate::metrics::Metrics::register(registry).unwrap();
        let address = |a: &SocketAddr| BackendAddress {
            host: a.ip().to_string(),
            port: a.port(),
        };
        let mut backends = Backends::single(address(&addrs[0]));
        backends.default = addrs.iter().map(address).collect();
        backends.draining = drain.iter().map(address).collect();
        let listener = ListenerConfig {
            name: "imaps".into(),
            protocol: Protocol::Imap,
            listen: "127.0.0.1:0".parse().unwrap(),
            tls: TlsMode::Implicit,
            backend: backends,
            max_connections: 100,
            require_tls_for_mail: true,
            backend_proxy_protocol: false,
            proxy_protocol_from: Vec::new(),
            backend_client_info: false,
            routing: Default::default(),
        };
        Arc::new(
            Pool::new(
                &listener,
                "mx.example.test",
                Duration::from_secs(2),
                metrics.backends("imaps"),
            )
            .unwrap(),
        )
    }

    async fn connect(pool: &Arc<Pool>, target: &Target) -> Result<BackendStream, ConnectError> {
        pool.connect_to(target, None, Arc::new(ByteCounters::default()), &[])
            .await
    }

    fn affinity(user: &str) -> Target {
        Target::Affinity {
            key: user.to_ascii_lowercase(),
        }
    }

    fn fixed(addrs: &[SocketAddr]) -> Target {
        Target::Fixed {
            backends: addrs
                .iter()
                .map(|a| BackendAddress {
                    host: a.ip().to_string(),
                    port: a.port(),
                })
                .collect(),
            source: crate::routing::Source::Map,
        }
    }

    #[tokio::test]
    async fn affinity_holds_every_session_of_a_user_on_one_backend_on_every_replica() {
        let mut addrs = Vec::new();
        for _ in 0..3 {
            addrs.push(greeter("127.0.0.1:0").await.0);
        }
        let one = pool_of(&prometheus::Registry::new(), &addrs, &[]);
        // Another replica, configured with the same backends in another order.
        let mut reversed = addrs.clone();
        reversed.reverse();
        let other = pool_of(&prometheus::Registry::new(), &reversed, &[]);
        let mut held = Vec::new();
        for i in 0..8 {
            let user = format!("user{i}@example.org");
            let expected = addrs[affinity::order(user.as_bytes(), &addrs)[0]];
            // Three sessions at once, as a mail client opens them: least connections would
            // spread them; affinity keeps them together.
            for _ in 0..3 {
                let stream = connect(&one, &affinity(&user)).await.unwrap();
                assert_eq!(stream.peer(), Some(expected), "{user}");
                held.push(stream);
            }
            let elsewhere = connect(&other, &affinity(&user.to_ascii_uppercase()))
                .await
                .unwrap();
            assert_eq!(
                elsewhere.peer(),
                Some(expected),
                "{user} on the other replica"
            );
        }
        let counted: u32 = addrs.iter().filter_map(|a| one.sessions_on(*a)).sum();
        assert_eq!(counted, 24);
    }

    #[tokio::test]
    async fn a_user_fails_over_to_the_next_in_hash_order_and_comes_back() {
        let mut addrs = Vec::new();
        let mut tasks = Vec::new();
        for _ in 0..3 {
            let (addr, task) = greeter("127.0.0.1:0").await;
            addrs.push(addr);
            tasks.push(task);
        }
        let pool = pool_of(&prometheus::Registry::new(), &addrs, &[]);
        let user = "alice@example.org";
        let order = affinity::order(user.as_bytes(), &addrs);
        let (first, second) = (addrs[order[0]], addrs[order[1]]);
        assert_eq!(
            connect(&pool, &affinity(user)).await.unwrap().peer(),
            Some(first)
        );
        // The first choice goes down: the session goes to the second, on every replica the
        // same one, and the first rests.
        tasks[order[0]].abort();
        let _ = (&mut tasks[order[0]]).await;
        assert_eq!(
            connect(&pool, &affinity(user)).await.unwrap().peer(),
            Some(second)
        );
        assert_eq!(
            connect(&pool, &affinity(user)).await.unwrap().peer(),
            Some(second)
        );
        // It comes back (an active check finds it up): so does the user.
        let (back, _task) = greeter(&first.to_string()).await;
        assert_eq!(back, first);
        pool.succeeded(first, false);
        assert_eq!(
            connect(&pool, &affinity(user)).await.unwrap().peer(),
            Some(first)
        );
    }

    #[tokio::test]
    async fn affinity_leaves_draining_backends_out_and_keeps_the_order() {
        let mut addrs = Vec::new();
        for _ in 0..3 {
            addrs.push(greeter("127.0.0.1:0").await.0);
        }
        let user = "bob@example.org";
        let order = affinity::order(user.as_bytes(), &addrs);
        let pool = pool_of(&prometheus::Registry::new(), &addrs, &[addrs[order[0]]]);
        assert_eq!(
            connect(&pool, &affinity(user)).await.unwrap().peer(),
            Some(addrs[order[1]])
        );
    }

    #[tokio::test]
    async fn a_fixed_target_gets_exactly_its_backends_in_order_and_never_another() {
        let mut addrs = Vec::new();
        for _ in 0..2 {
            addrs.push(greeter("127.0.0.1:0").await.0);
        }
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dead = closed.local_addr().unwrap();
        drop(closed);
        let (outside, _task) = greeter("127.0.0.1:0").await;
        let pool = pool_of(
            &prometheus::Registry::new(),
            &[addrs[0], addrs[1], dead],
            &[],
        );
        for _ in 0..3 {
            assert_eq!(
                connect(&pool, &fixed(&[addrs[1]])).await.unwrap().peer(),
                Some(addrs[1])
            );
        }
        // In order: the first that answers.
        assert_eq!(
            connect(&pool, &fixed(&[dead, addrs[0]]))
                .await
                .unwrap()
                .peer(),
            Some(addrs[0])
        );
        // A mapped backend that is down is the session's failure, not another backend's
        // session.
        let err = connect(&pool, &fixed(&[dead])).await.unwrap_err();
        assert!(matches!(err, ConnectError::Unavailable { .. }), "{err}");
        // A backend outside the pool is reached with the pool's settings, and counted nowhere.
        let stream = connect(&pool, &fixed(&[outside])).await.unwrap();
        assert_eq!(stream.peer(), Some(outside));
        assert_eq!(pool.sessions_on(outside), None);
        // Target::Pool is today's connect.
        let any = connect(&pool, &Target::Pool).await.unwrap().peer().unwrap();
        assert!(addrs.contains(&any));
    }
}
