//! The backend chosen by the user who logs in: each listener's [`Router`] turns a login name
//! (and what else nginx's `auth_http` wants to know) into a [`Target`] the pool connects to
//! ([`crate::backend::Pool::connect_to`]).
//!
//! The order is fixed (the issue "The backend chosen by the user who logs in"):
//! 1. `user_lookup` ([`lookup`], nginx's `auth_http`): a backend, a refusal, or no opinion;
//! 2. `user_map` ([`user_map`]): the name's entry, else its domain's;
//! 3. `user_affinity` ([`affinity`]): a rendezvous hash of the name over the listener's pool;
//!    without it, the pool's least connections.
//!
//! A wrong backend is worse than no backend: a looked-up or mapped backend that is down is a
//! temporary failure ([`Target::Fixed`] never falls back to another server, which would show
//! the user an empty mailbox), and so is a lookup that fails. Only affinity moves users, since
//! on shared storage every backend has every mailbox.
//!
//! `mailfront_user_routes_total{listener,source,result}` counts each routed login once, under
//! the source that decided; `mailfront_user_lookup_duration_seconds` times every lookup;
//! `mailfront_user_map_reloads_total` counts map files re-read.

pub mod affinity;
pub mod lookup;
pub mod user_map;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::time::Instant;

use crate::config::{BackendAddress, Backends, ListenerConfig, Protocol, UserRouting};
use crate::log_throttle::LogThrottle;
use crate::metrics::RoutingMetrics;
use crate::tls::ReloadOutcome;
use lookup::{Answer, Lookup, LookupSetupError};
use user_map::{UserMap, UserMapError};

/// A lookup service in trouble is logged at most this often per listener (every login would
/// otherwise log it); each failure is counted, and each session's own line says why.
const TROUBLE_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// One login to route: what the gate parsed, and what `auth_http` sends about the session.
#[derive(Debug, Clone, Copy)]
pub struct RouteRequest<'a> {
    pub protocol: Protocol,
    /// The authentication identity (not the authorization identity), as the client sent it.
    pub user: &'a [u8],
    /// Sent to a lookup only with `user_lookup.send_password: true`.
    pub password: Option<&'a [u8]>,
    /// nginx's `Auth-Method` spelling ([`lookup::method_name`]).
    pub method: &'a str,
    /// 1 for the session's first login attempt (`Auth-Login-Attempt`).
    pub attempt: u32,
    pub client: SocketAddr,
    /// The client's TLS: version and cipher suite, IANA names (`TLSv1.3`,
    /// `TLS_AES_128_GCM_SHA256`).
    pub tls: Option<(&'a str, &'a str)>,
    /// SMTP: the EHLO/HELO argument.
    pub helo: Option<&'a [u8]>,
}

/// Where a login's session goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The listener's pool, least connections (SNI routes as ever).
    Pool,
    /// The listener's pool in the rendezvous order of `key` (the lowercased login name).
    Affinity { key: String },
    /// Exactly these backends, in order, and no other: a looked-up or mapped user.
    Fixed {
        backends: Vec<BackendAddress>,
        source: Source,
    },
}

impl Target {
    /// The routing source, for logs and metrics.
    pub fn source(&self) -> Source {
        match self {
            Target::Pool => Source::Pool,
            Target::Affinity { .. } => Source::Affinity,
            Target::Fixed { source, .. } => *source,
        }
    }
}

/// What decided a login's backend (`mailfront_user_routes_total{source}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Lookup,
    Map,
    Affinity,
    Pool,
}

impl Source {
    pub const ALL: [Source; 4] = [Source::Lookup, Source::Map, Source::Affinity, Source::Pool];

    pub fn as_str(self) -> &'static str {
        match self {
            Source::Lookup => "lookup",
            Source::Map => "map",
            Source::Affinity => "affinity",
            Source::Pool => "pool",
        }
    }
}

/// How routing one login ended (`mailfront_user_routes_total{result}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteResult {
    Ok,
    /// The lookup refused the login (its `Auth-Status`).
    Refused,
    /// The lookup did not answer within `user_lookup.timeout`.
    Timeout,
    /// Unreachable, not 2xx, or a malformed answer.
    Error,
    /// `user_lookup.max_concurrent` lookups in flight for the whole timeout.
    Busy,
    /// An `Auth-Server` outside `user_lookup.allowed_backends`.
    Disallowed,
}

impl RouteResult {
    pub const ALL: [RouteResult; 6] = [
        RouteResult::Ok,
        RouteResult::Refused,
        RouteResult::Timeout,
        RouteResult::Error,
        RouteResult::Busy,
        RouteResult::Disallowed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RouteResult::Ok => "ok",
            RouteResult::Refused => "refused",
            RouteResult::Timeout => "timeout",
            RouteResult::Error => "error",
            RouteResult::Busy => "busy",
            RouteResult::Disallowed => "disallowed",
        }
    }
}

/// Why a login has no backend.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// The lookup refused the login; no backend is contacted. The caller answers the client's
    /// command with `text` (SMTP: after `smtp_code`, by default `535 5.7.8`, RFC 4954 §6),
    /// counts a failed login (`limits.auth_failures_per_ip`), and, as nginx does, with `wait`
    /// waits that long before the reply and lets the client try again, without it ends the
    /// session after the reply.
    #[error("login refused by user_lookup: {text}")]
    Refused {
        text: String,
        smtp_code: Option<String>,
        wait: Option<Duration>,
    },
    /// No usable answer (the lookup timed out, failed or answered nonsense): a temporary
    /// failure (`NO [UNAVAILABLE]`, `454 4.7.0`, `-ERR [SYS/TEMP]`), never another backend.
    #[error("no backend for this login: {reason}")]
    Unavailable { reason: String },
}

/// Why a listener's router cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum RoutingError {
    #[error(transparent)]
    Map(#[from] UserMapError),
    #[error(transparent)]
    Lookup(#[from] LookupSetupError),
}

/// What a router was built from, and the parts built.
struct Inner {
    settings: UserRouting,
    /// The listener's backends: the default allow-list of the lookup.
    backends: Backends,
    map: Option<Arc<UserMap>>,
    lookup: Option<Arc<Lookup>>,
}

/// One listener's user routing, rebuilt in place by a reload ([`Router::update`]).
pub struct Router {
    listener: String,
    protocol: Protocol,
    metrics: RoutingMetrics,
    inner: ArcSwap<Inner>,
    trouble: Mutex<LogThrottle>,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let inner = self.inner.load();
        f.debug_struct("Router")
            .field("listener", &self.listener)
            .field("settings", &inner.settings)
            .finish_non_exhaustive()
    }
}

impl Router {
    /// The router of `listener`: reads `user_map` and `user_lookup.ca_file` (blocking);
    /// connects to nothing. A file that cannot be used is an error naming it.
    pub fn new(listener: &ListenerConfig, metrics: RoutingMetrics) -> Result<Router, RoutingError> {
        let inner = Inner::build(listener, None)?;
        Ok(Router {
            listener: listener.name.clone(),
            protocol: listener.protocol,
            metrics,
            inner: ArcSwap::from_pointee(inner),
            trouble: Mutex::new(LogThrottle::new(TROUBLE_LOG_INTERVAL)),
        })
    }

    /// A reload's settings for this listener: logins routed afterwards use them. Parts whose
    /// settings did not change are kept (the map in service, the lookup's connections); a
    /// new map file or CA bundle is read here (blocking). `Ok(false)`: nothing changed. An
    /// error changes nothing.
    pub fn update(&self, listener: &ListenerConfig) -> Result<bool, RoutingError> {
        let current = self.inner.load_full();
        if current.settings == listener.routing && current.backends == listener.backend {
            return Ok(false);
        }
        let next = Inner::build(listener, Some(&current))?;
        self.inner.store(Arc::new(next));
        Ok(true)
    }

    /// Whether logins on this listener need routing at all (any of `user_affinity`,
    /// `user_map`, `user_lookup` is on): the session then waits for the login name before it
    /// connects.
    pub fn needs_user(&self) -> bool {
        self.inner.load().settings.is_on()
    }

    /// The backend of one login: lookup, then map, then affinity or the pool. Bounded by
    /// `user_lookup.timeout` (the only wait).
    pub async fn route(&self, request: &RouteRequest<'_>) -> Result<Target, RouteError> {
        let inner = self.inner.load_full();
        // Nothing to decide (and nothing counted): the pool, as before routing existed.
        if !inner.settings.is_on() {
            return Ok(Target::Pool);
        }
        if let Some(lookup) = &inner.lookup {
            let started = Instant::now();
            let answer = lookup.query(request).await;
            self.metrics.lookup_took(started.elapsed().as_secs_f64());
            match answer {
                Ok(Answer::Backend(addr)) => {
                    self.metrics.routed(Source::Lookup, RouteResult::Ok);
                    return Ok(Target::Fixed {
                        backends: vec![BackendAddress {
                            host: addr.ip().to_string(),
                            port: addr.port(),
                        }],
                        source: Source::Lookup,
                    });
                }
                Ok(Answer::Refused {
                    text,
                    smtp_code,
                    wait,
                }) => {
                    self.metrics.routed(Source::Lookup, RouteResult::Refused);
                    tracing::debug!(listener = %self.listener, text = %text, wait_s = wait.map(|w| w.as_secs()), "user_lookup refused the login");
                    return Err(RouteError::Refused {
                        text,
                        smtp_code,
                        wait,
                    });
                }
                Ok(Answer::NoBackend) => {}
                Err(e) => {
                    let result = e.result();
                    self.metrics.routed(Source::Lookup, result);
                    self.trouble(&e, lookup.url());
                    return Err(RouteError::Unavailable {
                        reason: format!("user_lookup: {e}"),
                    });
                }
            }
        }
        if let Some(map) = &inner.map
            && let Some(backends) = map.lookup(request.user)
        {
            self.metrics.routed(Source::Map, RouteResult::Ok);
            return Ok(Target::Fixed {
                backends: backends.to_vec(),
                source: Source::Map,
            });
        }
        if inner.settings.affinity {
            self.metrics.routed(Source::Affinity, RouteResult::Ok);
            let key = String::from_utf8_lossy(&request.user.to_ascii_lowercase()).into_owned();
            return Ok(Target::Affinity { key });
        }
        self.metrics.routed(Source::Pool, RouteResult::Ok);
        Ok(Target::Pool)
    }

    /// Logs a lookup failure, at most every [`TROUBLE_LOG_INTERVAL`].
    fn trouble(&self, e: &lookup::LookupError, url: &crate::config::LookupUrl) {
        let logged = self
            .trouble
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .occurred(Instant::now());
        if let Some(suppressed) = logged {
            let result = e.result().as_str();
            tracing::warn!(listener = %self.listener, protocol = %self.protocol, url = %url, result, error = %e, suppressed, "user_lookup failed: logins get a temporary failure");
        }
    }

    /// Re-reads `user_map` and `user_lookup.ca_file` when their content changed (or `force`,
    /// on SIGHUP): each change is logged and counted; a bad file keeps the one in service.
    /// Blocking (file reads): run it off the async threads.
    pub fn reload_files(&self, force: bool) {
        let inner = self.inner.load_full();
        if let Some(map) = &inner.map {
            match map.reload(force) {
                Ok(ReloadOutcome::Reloaded) => {
                    self.metrics.map_reload(true);
                    let (names, domains) = map.len();
                    tracing::info!(listener = %self.listener, path = %map.path().display(), names, domains, "user_map reloaded");
                }
                Ok(ReloadOutcome::Unchanged) => {}
                Err(e) => {
                    self.metrics.map_reload(false);
                    tracing::error!(listener = %self.listener, error = %e, "user_map reload failed: keeping the map in service");
                }
            }
        }
        if let Some(lookup) = &inner.lookup {
            match lookup.reload_ca() {
                Ok(true) => {
                    tracing::info!(listener = %self.listener, "user_lookup.ca_file reloaded")
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::error!(listener = %self.listener, error = %e, "user_lookup.ca_file reload failed: keeping the CA bundle in service")
                }
            }
        }
    }

    /// The user map in service (tests, diagnostics).
    pub fn user_map(&self) -> Option<Arc<UserMap>> {
        self.inner.load().map.clone()
    }
}

/// What `mailfront check` (and a reload, before anything changes) asks of a listener's
/// routing: its `user_map` parsed whole, its `user_lookup` client built (`ca_file` read).
/// Blocking.
pub fn check(listener: &ListenerConfig) -> Result<(), RoutingError> {
    Inner::build(listener, None).map(|_| ())
}

impl Inner {
    /// The parts `listener` asks for, reusing those of `current` whose settings are the same.
    fn build(listener: &ListenerConfig, current: Option<&Inner>) -> Result<Inner, RoutingError> {
        let routing = &listener.routing;
        let map = match (&routing.map, current) {
            (None, _) => None,
            (Some(path), Some(current)) if current.settings.map.as_ref() == Some(path) => {
                current.map.clone()
            }
            (Some(path), _) => Some(Arc::new(UserMap::load(path)?)),
        };
        let lookup = match (&routing.lookup, current) {
            (None, _) => None,
            (Some(settings), Some(current))
                if current.settings.lookup.as_ref() == Some(settings)
                    && current.backends == listener.backend =>
            {
                current.lookup.clone()
            }
            (Some(settings), _) => Some(Arc::new(Lookup::new(settings, &listener.backend)?)),
        };
        Ok(Inner {
            settings: routing.clone(),
            backends: listener.backend.clone(),
            map,
            lookup,
        })
    }
}

#[cfg(test)]
mod tests;
