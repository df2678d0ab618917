//! Prometheus metrics as a struct of typed handles registered on an injected registry, and the
//! HTTP endpoint serving `/metrics`, `/healthz` and `/readyz`.
//!
//! Label values come only from configuration (listener names, certificate names) or from closed
//! sets (protocol, TLS version, IANA cipher and group names, reasons) — never from client input.

use std::convert::Infallible;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::close::CloseClass;
use crate::config::{ListenerConfig, Protocol};
use crate::routing::{RouteResult, Source};
use crate::tls::{HandshakeFailure, LoadedCertificate, TlsInfo};

/// One listener's per-backend-address families (`mailfront_backend_*{listener,backend}`).
#[derive(Clone)]
pub struct BackendMetrics {
    listener: String,
    up: IntGaugeVec,
    draining: IntGaugeVec,
    sessions: IntGaugeVec,
    sessions_total: IntCounterVec,
    failures: IntCounterVec,
}

/// Why a backend address failed, for `mailfront_backend_failures_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendFailure {
    /// Refused, unreachable or reset while connecting (or sending the PROXY header).
    Refused,
    /// No connection, handshake or greeting within `timeouts.backend_connect`.
    Timeout,
    /// Closed, or sent something that is not a line, before its greeting.
    NoGreeting,
    /// The TLS handshake failed, certificate verification included.
    Tls,
    /// The backend refused STARTTLS/STLS, or broke the exchange.
    Starttls,
}

impl BackendFailure {
    pub const ALL: [BackendFailure; 5] = [
        BackendFailure::Refused,
        BackendFailure::Timeout,
        BackendFailure::NoGreeting,
        BackendFailure::Tls,
        BackendFailure::Starttls,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            BackendFailure::Refused => "refused",
            BackendFailure::Timeout => "timeout",
            BackendFailure::NoGreeting => "no_greeting",
            BackendFailure::Tls => "tls",
            BackendFailure::Starttls => "starttls",
        }
    }
}

/// Handles for one backend address.
#[derive(Clone)]
pub struct BackendAddressMetrics {
    pub up: IntGauge,
    pub draining: IntGauge,
    pub sessions: IntGauge,
    pub sessions_total: IntCounter,
}

impl BackendMetrics {
    /// The handles of `backend` (an `address:port`), created at 0 (up at 1: a new address is
    /// in rotation until it fails).
    pub fn address(&self, backend: &str) -> BackendAddressMetrics {
        let labels = [self.listener.as_str(), backend];
        let handles = BackendAddressMetrics {
            up: self.up.with_label_values(&labels),
            draining: self.draining.with_label_values(&labels),
            sessions: self.sessions.with_label_values(&labels),
            sessions_total: self.sessions_total.with_label_values(&labels),
        };
        handles.up.set(1);
        handles
    }

    pub fn failed(&self, backend: &str, reason: BackendFailure) {
        self.failures
            .with_label_values(&[self.listener.as_str(), backend, reason.as_str()])
            .inc();
    }

    /// Drops the series of an address DNS no longer returns, so a headless Service whose pods
    /// come and go does not grow the label set forever.
    pub fn forget(&self, backend: &str) {
        let labels = [self.listener.as_str(), backend];
        let _ = self.up.remove_label_values(&labels);
        let _ = self.draining.remove_label_values(&labels);
        let _ = self.sessions.remove_label_values(&labels);
        let _ = self.sessions_total.remove_label_values(&labels);
        for reason in BackendFailure::ALL {
            let _ = self.failures.remove_label_values(&[
                self.listener.as_str(),
                backend,
                reason.as_str(),
            ]);
        }
    }
}

/// Authentication outcome as the backend reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthResult {
    Success,
    Failure,
}

/// Where an IMAP ID "tls" field came from: the machines' word, a label here.
pub use crate::machine::IdSource;

/// Every metric family; [`ListenerMetrics`] holds the per-listener handles sessions use.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    connections_accepted: IntCounterVec,
    connections_active: IntGaugeVec,
    connections_refused: IntCounterVec,
    handshakes: IntCounterVec,
    handshake_failures: IntCounterVec,
    handshake_duration: HistogramVec,
    starttls_upgrades: IntCounterVec,
    cleartext_auth_refused: IntCounterVec,
    auth_throttled: IntCounterVec,
    auth_outcomes: IntCounterVec,
    messages_submitted: IntCounterVec,
    message_size: HistogramVec,
    received_fields: IntCounterVec,
    imap_id_fields: IntCounterVec,
    proxy_headers: IntCounterVec,
    backend_connect_failures: IntCounterVec,
    backend_connect_duration: HistogramVec,
    backend_up: IntGaugeVec,
    backend_draining: IntGaugeVec,
    config_reloads: IntCounterVec,
    config_info: IntGaugeVec,
    config_hash: Arc<Mutex<Option<String>>>,
    config_last_success: IntGauge,
    backend_sessions: IntGaugeVec,
    backend_sessions_total: IntCounterVec,
    backend_failures: IntCounterVec,
    relayed_bytes: IntCounterVec,
    session_duration: HistogramVec,
    sessions_closed: IntCounterVec,
    certificate_not_after: IntGaugeVec,
    certificate_reloads: IntCounterVec,
    ticket_key_reloads: IntCounterVec,
    backend_ca_reloads: IntCounterVec,
    user_routes: IntCounterVec,
    user_lookup_duration: HistogramVec,
    user_map_reloads: IntCounterVec,
    ready: IntGauge,
}

fn counter(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntCounterVec> {
    let c = IntCounterVec::new(Opts::new(name, help), labels)?;
    registry.register(Box::new(c.clone()))?;
    Ok(c)
}

fn gauge(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntGaugeVec> {
    let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
    registry.register(Box::new(g.clone()))?;
    Ok(g)
}

fn histogram(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: Vec<f64>,
) -> prometheus::Result<HistogramVec> {
    let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)?;
    registry.register(Box::new(h.clone()))?;
    Ok(h)
}

/// Handshake and connect latencies in seconds: 1 ms (a local backend) up to 10 s (the
/// default handshake and connect timeouts), roughly ×2.5 per step.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Session durations in seconds: a probe or failed login ends in under a second, a
/// submission in seconds, an IMAP session with IDLE lasts hours (4 h top bucket).
const SESSION_BUCKETS: &[f64] = &[
    0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 14400.0,
];
/// Message sizes in octets: 1 KiB to 64 MiB by ×4, covering a bare notification up to the
/// largest attachments mail servers commonly accept.
const SIZE_BUCKETS: &[f64] = &[
    1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0, 16777216.0, 67108864.0,
];

impl Metrics {
    /// Registers every family on `registry`, plus the process collector and build info.
    pub fn register(registry: &Registry) -> prometheus::Result<Metrics> {
        let r = registry;
        let l = &["listener", "protocol"][..];
        let build_info = IntGaugeVec::new(
            Opts::new(
                "mailfront_build_info",
                "Build of the running mailfront; always 1.",
            ),
            &["version"],
        )?;
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        r.register(Box::new(build_info))?;
        #[cfg(target_os = "linux")]
        r.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        let ready = IntGauge::new(
            "mailfront_ready",
            "1 while every listener is bound with a certificate loaded and no shutdown has begun.",
        )?;
        r.register(Box::new(ready.clone()))?;
        let config_reloads = counter(
            r,
            "mailfront_config_reloads_total",
            "Configuration reloads (SIGHUP or a changed file) by result; a failed reload changes nothing.",
            &["result"],
        )?;
        // Both series from the start, so a rate or an alert on failures has a 0 to start from.
        for result in ["success", "failure"] {
            config_reloads.with_label_values(&[result]);
        }
        let config_last_success = IntGauge::new(
            "mailfront_config_last_reload_success_timestamp_seconds",
            "Unix time the configuration in service was loaded (at start or by the last successful reload).",
        )?;
        r.register(Box::new(config_last_success.clone()))?;
        Ok(Metrics {
            config_reloads,
            config_info: gauge(
                r,
                "mailfront_config_info",
                "The configuration in service: a short SHA-256 of the file's content; always 1.",
                &["hash"],
            )?,
            config_hash: Arc::new(Mutex::new(None)),
            config_last_success,
            backend_draining: gauge(
                r,
                "mailfront_backend_draining",
                "1 while a backend address is marked drain: no new sessions, its sessions go on.",
                &["listener", "backend"],
            )?,
            registry: registry.clone(),
            connections_accepted: counter(
                r,
                "mailfront_connections_accepted_total",
                "Client connections accepted.",
                l,
            )?,
            connections_active: gauge(
                r,
                "mailfront_connections_active",
                "Client sessions open now.",
                l,
            )?,
            connections_refused: counter(
                r,
                "mailfront_connections_refused_total",
                "Client connections refused at accept, by reason: the listener's max_connections, or limits.connections_per_ip for the client's address.",
                &["listener", "protocol", "reason"],
            )?,
            handshakes: counter(
                r,
                "mailfront_tls_handshakes_total",
                "Completed TLS handshakes (implicit and STARTTLS) by version, IANA cipher suite and IANA group.",
                &["listener", "version", "cipher", "group"],
            )?,
            handshake_failures: counter(
                r,
                "mailfront_tls_handshake_failures_total",
                "Failed TLS handshakes by reason.",
                &["listener", "reason"],
            )?,
            handshake_duration: histogram(
                r,
                "mailfront_tls_handshake_duration_seconds",
                "Time to complete a TLS handshake.",
                &["listener"],
                LATENCY_BUCKETS.to_vec(),
            )?,
            starttls_upgrades: counter(
                r,
                "mailfront_starttls_upgrades_total",
                "Sessions upgraded to TLS by STARTTLS or STLS.",
                l,
            )?,
            cleartext_auth_refused: counter(
                r,
                "mailfront_cleartext_auth_refused_total",
                "Authentication attempts refused because the connection was not yet TLS (never forwarded).",
                l,
            )?,
            auth_throttled: counter(
                r,
                "mailfront_auth_throttled_total",
                "Authentication attempts refused because the client's address reached limits.auth_failures_per_ip failures within limits.auth_failure_window (never forwarded).",
                l,
            )?,
            auth_outcomes: counter(
                r,
                "mailfront_auth_outcomes_total",
                "Authentication outcomes as the backend answered them.",
                &["listener", "protocol", "result"],
            )?,
            messages_submitted: counter(
                r,
                "mailfront_messages_submitted_total",
                "Messages the backend accepted through this listener.",
                &["listener"],
            )?,
            message_size: histogram(
                r,
                "mailfront_message_size_bytes",
                "Size of accepted messages as the client sent them.",
                &["listener"],
                SIZE_BUCKETS.to_vec(),
            )?,
            received_fields: counter(
                r,
                "mailfront_received_fields_added_total",
                "Received header fields with the tls clause added to messages.",
                &["listener"],
            )?,
            imap_id_fields: counter(
                r,
                "mailfront_imap_id_tls_fields_added_total",
                "IMAP ID commands sent to the backend carrying the tls field.",
                &["listener", "source"],
            )?,
            proxy_headers: counter(
                r,
                "mailfront_proxy_protocol_headers_total",
                "PROXY protocol headers from load balancers (listeners with proxy_protocol_from), by result: proxy (a relayed client), local (a v2 LOCAL health check, closed quietly), unknown (v1 UNKNOWN or v2 AF_UNSPEC: served as the balancer's own address); refused: missing, malformed, too_long, timeout, untrusted (a peer outside proxy_protocol_from).",
                &["listener", "result"],
            )?,
            backend_connect_failures: counter(
                r,
                "mailfront_backend_connect_failures_total",
                "Failed connections to the backend (refused, unreachable, timed out).",
                &["listener"],
            )?,
            backend_connect_duration: histogram(
                r,
                "mailfront_backend_connect_duration_seconds",
                "Time to connect to the backend.",
                &["listener"],
                LATENCY_BUCKETS.to_vec(),
            )?,
            backend_up: gauge(
                r,
                "mailfront_backend_up",
                "1 while a backend address is in rotation, 0 while it rests after a failure (passive or active check).",
                &["listener", "backend"],
            )?,
            backend_sessions: gauge(
                r,
                "mailfront_backend_active_sessions",
                "Sessions connected to each backend address now (what least-connections balances).",
                &["listener", "backend"],
            )?,
            backend_sessions_total: counter(
                r,
                "mailfront_backend_sessions_total",
                "Sessions each backend address has taken.",
                &["listener", "backend"],
            )?,
            backend_failures: counter(
                r,
                "mailfront_backend_failures_total",
                "Failed connections to a backend address by reason: refused, timeout, no_greeting, tls (handshake or certificate verification), starttls; active checks count too.",
                &["listener", "backend", "reason"],
            )?,
            relayed_bytes: counter(
                r,
                "mailfront_relayed_bytes_total",
                "Bytes relayed, as application data.",
                &["listener", "direction"],
            )?,
            session_duration: histogram(
                r,
                "mailfront_session_duration_seconds",
                "Duration of client sessions.",
                l,
                SESSION_BUCKETS.to_vec(),
            )?,
            sessions_closed: counter(
                r,
                "mailfront_sessions_closed_total",
                "Sessions ended, by reason and by the side it happened on (client, backend, tls, proxy).",
                &["listener", "protocol", "reason", "side"],
            )?,
            certificate_not_after: gauge(
                r,
                "mailfront_certificate_not_after_timestamp_seconds",
                "notAfter of each certificate in service, as a Unix timestamp.",
                &["certificate"],
            )?,
            certificate_reloads: counter(
                r,
                "mailfront_certificate_reloads_total",
                "Certificate reloads by result; a failed reload keeps the previous certificates.",
                &["result"],
            )?,
            ticket_key_reloads: counter(
                r,
                "mailfront_ticket_key_reloads_total",
                "Session ticket key file reloads by result; a failed reload keeps the previous keys.",
                &["result"],
            )?,
            backend_ca_reloads: counter(
                r,
                "mailfront_backend_ca_reloads_total",
                "backend_tls.ca bundles re-read after a change, by listener and result; a failure keeps the bundle in service.",
                &["listener", "result"],
            )?,
            user_routes: counter(
                r,
                "mailfront_user_routes_total",
                "Logins routed on listeners with user_affinity, user_map or user_lookup, once each, by the source that decided (lookup, map, affinity, pool) and result: ok; for lookup also refused (the service's Auth-Status), timeout, error (unreachable, not 2xx, a malformed answer), busy (user_lookup.max_concurrent lookups in flight for the whole timeout), disallowed (an Auth-Server outside user_lookup.allowed_backends).",
                &["listener", "source", "result"],
            )?,
            user_lookup_duration: histogram(
                r,
                "mailfront_user_lookup_duration_seconds",
                "Time a user_lookup (nginx auth_http) took, waiting for a free slot included, whatever it answered.",
                &["listener"],
                LATENCY_BUCKETS.to_vec(),
            )?,
            user_map_reloads: counter(
                r,
                "mailfront_user_map_reloads_total",
                "user_map files re-read after a change (or SIGHUP), by listener and result; a failure keeps the map in service.",
                &["listener", "result"],
            )?,
            ready,
        })
    }

    /// The user routing handles of one listener, with the series its configuration can move
    /// created at 0 (a listener without `user_*` keys gets none).
    pub fn routing(&self, listener: &ListenerConfig) -> RoutingMetrics {
        let name = listener.name.as_str();
        let routing = &listener.routing;
        if routing.lookup.is_some() {
            for result in RouteResult::ALL {
                self.user_routes.with_label_values(&[
                    name,
                    Source::Lookup.as_str(),
                    result.as_str(),
                ]);
            }
        }
        if routing.map.is_some() {
            self.user_routes.with_label_values(&[
                name,
                Source::Map.as_str(),
                RouteResult::Ok.as_str(),
            ]);
            for result in ["success", "failure"] {
                self.user_map_reloads.with_label_values(&[name, result]);
            }
        }
        if routing.is_on() {
            let last = if routing.affinity {
                Source::Affinity
            } else {
                Source::Pool
            };
            self.user_routes
                .with_label_values(&[name, last.as_str(), RouteResult::Ok.as_str()]);
        }
        RoutingMetrics {
            listener: name.to_owned(),
            routes: self.user_routes.clone(),
            lookup_duration: self.user_lookup_duration.with_label_values(&[name]),
            map_reloads: self.user_map_reloads.clone(),
        }
    }

    /// The per-address backend families of one listener; addresses come from configuration and
    /// DNS, never from clients.
    pub fn backends(&self, listener: &str) -> BackendMetrics {
        BackendMetrics {
            listener: listener.to_owned(),
            up: self.backend_up.clone(),
            draining: self.backend_draining.clone(),
            sessions: self.backend_sessions.clone(),
            sessions_total: self.backend_sessions_total.clone(),
            failures: self.backend_failures.clone(),
        }
    }

    /// Handles for one listener, with every fixed label combination created so series start at 0.
    pub fn listener(&self, listener: &ListenerConfig) -> ListenerMetrics {
        let name = listener.name.as_str();
        let protocol = listener.protocol.as_str();
        let lp = [name, protocol];
        for reason in HandshakeFailure::ALL {
            self.handshake_failures
                .with_label_values(&[name, reason.as_str()]);
        }
        // Families only one protocol can move are registered for that protocol's listeners
        // only: a series that stays at 0 forever reads as "never happened", not "cannot".
        let smtp = (listener.protocol == Protocol::Smtp).then(|| SmtpMetrics {
            messages_submitted: self.messages_submitted.with_label_values(&[name]),
            message_size: self.message_size.with_label_values(&[name]),
            received_fields: self.received_fields.with_label_values(&[name]),
        });
        let imap = (listener.protocol == Protocol::Imap).then(|| ImapMetrics {
            id_from_client: self.imap_id_fields.with_label_values(&[name, "client"]),
            id_from_proxy: self.imap_id_fields.with_label_values(&[name, "proxy"]),
        });
        // Only listeners that read the header can move it.
        let proxy_headers = (!listener.proxy_protocol_from.is_empty()).then(|| {
            ProxyHeaderResult::ALL.map(|result| {
                self.proxy_headers
                    .with_label_values(&[name, result.as_str()])
            })
        });
        let closed = CloseClass::ALL.map(|class| {
            self.sessions_closed.with_label_values(&[
                name,
                protocol,
                class.reason(),
                class.side().as_str(),
            ])
        });
        ListenerMetrics {
            name: name.to_owned(),
            protocol: listener.protocol,
            accepted: self.connections_accepted.with_label_values(&lp),
            active: self.connections_active.with_label_values(&lp),
            refused: self.connections_refused.with_label_values(&[
                name,
                protocol,
                "max_connections",
            ]),
            refused_per_ip: self
                .connections_refused
                .with_label_values(&[name, protocol, "per_ip"]),
            handshakes: self.handshakes.clone(),
            handshake_failures: self.handshake_failures.clone(),
            handshake_duration: self.handshake_duration.with_label_values(&[name]),
            starttls_upgrades: self.starttls_upgrades.with_label_values(&lp),
            cleartext_auth_refused: self.cleartext_auth_refused.with_label_values(&lp),
            auth_throttled: self.auth_throttled.with_label_values(&lp),
            auth_success: self
                .auth_outcomes
                .with_label_values(&[name, protocol, "success"]),
            auth_failure: self
                .auth_outcomes
                .with_label_values(&[name, protocol, "failure"]),
            smtp,
            imap,
            proxy_headers,
            backend_connect_failures: self.backend_connect_failures.with_label_values(&[name]),
            backend_connect_duration: self.backend_connect_duration.with_label_values(&[name]),
            bytes_to_backend: self
                .relayed_bytes
                .with_label_values(&[name, "client_to_backend"]),
            bytes_to_client: self
                .relayed_bytes
                .with_label_values(&[name, "backend_to_client"]),
            session_duration: self.session_duration.with_label_values(&lp),
            closed,
        }
    }

    /// Publishes the notAfter of the certificates now in service (replacing the previous set).
    pub fn set_certificates(&self, certificates: &[LoadedCertificate]) {
        self.certificate_not_after.reset();
        for cert in certificates {
            self.certificate_not_after
                .with_label_values(&[cert.label.as_str()])
                .set(cert.not_after);
        }
    }

    pub fn certificate_reload(&self, success: bool) {
        self.certificate_reloads
            .with_label_values(&[if success { "success" } else { "failure" }])
            .inc();
    }

    pub fn backend_ca_reload(&self, listener: &str, success: bool) {
        self.backend_ca_reloads
            .with_label_values(&[listener, if success { "success" } else { "failure" }])
            .inc();
    }

    pub fn ticket_key_reload(&self, success: bool) {
        self.ticket_key_reloads
            .with_label_values(&[if success { "success" } else { "failure" }])
            .inc();
    }

    pub fn config_reload(&self, success: bool) {
        self.config_reloads
            .with_label_values(&[if success { "success" } else { "failure" }])
            .inc();
    }

    /// Publishes the hash of the configuration now in service (dropping the previous series)
    /// and the time it was loaded.
    pub fn set_config(&self, hash: &str) {
        let mut current = self
            .config_hash
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(old) = current.take()
            && old != hash
        {
            let _ = self.config_info.remove_label_values(&[old.as_str()]);
        }
        self.config_info.with_label_values(&[hash]).set(1);
        *current = Some(hash.to_owned());
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        self.config_last_success.set(now);
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.set(i64::from(ready));
    }

    /// The text exposition of everything registered.
    pub fn encode(&self) -> String {
        let mut buffer = Vec::new();
        // Encoding into a Vec cannot fail for the text format except on invalid metric state.
        if TextEncoder::new()
            .encode(&self.registry.gather(), &mut buffer)
            .is_err()
        {
            return String::new();
        }
        String::from_utf8(buffer).unwrap_or_default()
    }
}

/// One listener's user routing handles ([`crate::routing::Router`]).
#[derive(Clone)]
pub struct RoutingMetrics {
    listener: String,
    routes: IntCounterVec,
    lookup_duration: Histogram,
    map_reloads: IntCounterVec,
}

impl RoutingMetrics {
    /// One login routed by `source` with `result`.
    pub fn routed(&self, source: Source, result: RouteResult) {
        self.routes
            .with_label_values(&[self.listener.as_str(), source.as_str(), result.as_str()])
            .inc();
    }

    /// One lookup's duration.
    pub fn lookup_took(&self, seconds: f64) {
        self.lookup_duration.observe(seconds);
    }

    /// One `user_map` re-read that changed the map (`true`) or was refused (`false`).
    pub fn map_reload(&self, success: bool) {
        self.map_reloads
            .with_label_values(&[
                self.listener.as_str(),
                if success { "success" } else { "failure" },
            ])
            .inc();
    }

    /// How many logins `source` routed with `result` (tests, diagnostics).
    pub fn routes(&self, source: Source, result: RouteResult) -> u64 {
        self.routes
            .with_label_values(&[self.listener.as_str(), source.as_str(), result.as_str()])
            .get()
    }

    /// Lookups observed (tests, diagnostics).
    pub fn lookups(&self) -> u64 {
        self.lookup_duration.get_sample_count()
    }

    /// `user_map` reloads with `success` (tests, diagnostics).
    pub fn map_reloads(&self, success: bool) -> u64 {
        self.map_reloads
            .with_label_values(&[
                self.listener.as_str(),
                if success { "success" } else { "failure" },
            ])
            .get()
    }
}

/// Per-listener handles, resolved once so the session hot path never looks up labels by string.
#[derive(Clone)]
pub struct ListenerMetrics {
    pub name: String,
    pub protocol: Protocol,
    pub accepted: IntCounter,
    pub active: IntGauge,
    /// Refused because the listener's `max_connections` was reached.
    pub refused: IntCounter,
    /// Refused because the client's address reached `limits.connections_per_ip`.
    pub refused_per_ip: IntCounter,
    handshakes: IntCounterVec,
    handshake_failures: IntCounterVec,
    pub handshake_duration: Histogram,
    pub starttls_upgrades: IntCounter,
    pub cleartext_auth_refused: IntCounter,
    /// Login attempts refused locally by `limits.auth_failures_per_ip`.
    pub auth_throttled: IntCounter,
    auth_success: IntCounter,
    auth_failure: IntCounter,
    /// Present on SMTP listeners only.
    smtp: Option<SmtpMetrics>,
    /// Present on IMAP listeners only.
    imap: Option<ImapMetrics>,
    /// Present on listeners with `proxy_protocol_from` only; indexed by [`ProxyHeaderResult`].
    proxy_headers: Option<[IntCounter; ProxyHeaderResult::ALL.len()]>,
    pub backend_connect_failures: IntCounter,
    pub backend_connect_duration: Histogram,
    pub bytes_to_backend: IntCounter,
    pub bytes_to_client: IntCounter,
    pub session_duration: Histogram,
    /// Indexed by [`CloseClass::index`].
    closed: [IntCounter; CloseClass::ALL.len()],
}

/// Handles only an SMTP listener can move.
#[derive(Clone)]
struct SmtpMetrics {
    messages_submitted: IntCounter,
    message_size: Histogram,
    received_fields: IntCounter,
}

/// Handles only an IMAP listener can move.
#[derive(Clone)]
struct ImapMetrics {
    id_from_client: IntCounter,
    id_from_proxy: IntCounter,
}

/// What a load balancer's PROXY header came to (`mailfront_proxy_protocol_headers_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyHeaderResult {
    Proxy,
    Local,
    Unknown,
    Missing,
    Malformed,
    TooLong,
    Timeout,
    Untrusted,
}

impl ProxyHeaderResult {
    pub const ALL: [ProxyHeaderResult; 8] = [
        ProxyHeaderResult::Proxy,
        ProxyHeaderResult::Local,
        ProxyHeaderResult::Unknown,
        ProxyHeaderResult::Missing,
        ProxyHeaderResult::Malformed,
        ProxyHeaderResult::TooLong,
        ProxyHeaderResult::Timeout,
        ProxyHeaderResult::Untrusted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ProxyHeaderResult::Proxy => "proxy",
            ProxyHeaderResult::Local => "local",
            ProxyHeaderResult::Unknown => "unknown",
            ProxyHeaderResult::Missing => "missing",
            ProxyHeaderResult::Malformed => "malformed",
            ProxyHeaderResult::TooLong => "too_long",
            ProxyHeaderResult::Timeout => "timeout",
            ProxyHeaderResult::Untrusted => "untrusted",
        }
    }
}

impl ListenerMetrics {
    /// Counts one PROXY header outcome (listeners with `proxy_protocol_from` only).
    pub fn proxy_header(&self, result: ProxyHeaderResult) {
        let index = ProxyHeaderResult::ALL
            .iter()
            .position(|r| *r == result)
            .unwrap_or_default();
        if let Some(counter) = self.proxy_headers.as_ref().and_then(|c| c.get(index)) {
            counter.inc();
        }
    }

    pub fn handshake_succeeded(&self, info: &TlsInfo, seconds: f64) {
        // Known names are borrowed from static tables: no allocation per handshake.
        let (version, cipher, group) = (info.version_name(), info.cipher_name(), info.group_name());
        self.handshakes
            .with_label_values(&[self.name.as_str(), &version, &cipher, &group])
            .inc();
        self.handshake_duration.observe(seconds);
    }

    pub fn handshake_failed(&self, reason: HandshakeFailure) {
        self.handshake_failures
            .with_label_values(&[self.name.as_str(), reason.as_str()])
            .inc();
    }

    pub fn auth_outcome(&self, result: AuthResult) {
        match result {
            AuthResult::Success => self.auth_success.inc(),
            AuthResult::Failure => self.auth_failure.inc(),
        }
    }

    /// An IMAP ID carrying the tls field went to the backend (IMAP listeners only).
    pub fn id_field_added(&self, source: IdSource) {
        if let Some(imap) = &self.imap {
            match source {
                IdSource::Client => imap.id_from_client.inc(),
                IdSource::Proxy => imap.id_from_proxy.inc(),
            }
        }
    }

    /// The backend accepted a message (SMTP listeners only).
    pub fn message_accepted(&self, size: u64) {
        if let Some(smtp) = &self.smtp {
            smtp.messages_submitted.inc();
            smtp.message_size.observe(size as f64);
        }
    }

    /// A Received field with the tls clause went into a message (SMTP listeners only).
    pub fn received_field_added(&self) {
        if let Some(smtp) = &self.smtp {
            smtp.received_fields.inc();
        }
    }

    /// A session ended; counted once, by the close log line.
    pub fn session_closed(&self, class: CloseClass) {
        if let Some(counter) = self.closed.get(class.index()) {
            counter.inc();
        }
    }

    /// How many sessions ended with `class` (for tests and the close log).
    pub fn sessions_closed(&self, class: CloseClass) -> u64 {
        self.closed.get(class.index()).map_or(0, IntCounter::get)
    }
}

/// Readiness as the admin endpoint reports it.
#[derive(Debug, Default)]
pub struct Readiness(AtomicBool);

impl Readiness {
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::SeqCst);
    }
    pub fn get(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    if let Ok(value) = hyper::header::HeaderValue::from_str(content_type) {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}

fn route(
    req: &Request<Incoming>,
    metrics: &Metrics,
    readiness: &Readiness,
) -> Response<Full<Bytes>> {
    if req.method() != hyper::Method::GET && req.method() != hyper::Method::HEAD {
        return respond(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "method not allowed\n",
        );
    }
    match req.uri().path() {
        "/metrics" => respond(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            metrics.encode(),
        ),
        "/healthz" => respond(StatusCode::OK, "text/plain", "ok\n"),
        "/readyz" if readiness.get() => respond(StatusCode::OK, "text/plain", "ready\n"),
        "/readyz" => respond(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "not ready\n"),
        _ => respond(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    }
}

/// Pause after a failed accept (for example EMFILE): long enough not to spin on a persistent
/// error, short enough that the endpoint recovers as soon as descriptors free up.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);
/// A scraper sends its request at once; a connection that has not sent its headers in 10 s is
/// idle or hostile and would otherwise hold a task forever.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves the admin endpoint on an already-bound listener until `shutdown` fires.
pub async fn serve_admin(
    listener: TcpListener,
    metrics: Metrics,
    readiness: Arc<Readiness>,
    shutdown: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let (stream, _) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                tracing::warn!(error = %e, "metrics endpoint accept failed");
                tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                continue;
            }
        };
        let metrics = metrics.clone();
        let readiness = readiness.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let response = route(&req, &metrics, &readiness);
                async move { Ok::<_, Infallible>(response) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(io, service);
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "metrics connection ended with an error");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BackendAddress, Backends, TlsMode};

    fn listener() -> ListenerConfig {
        ListenerConfig {
            name: "imaps".into(),
            protocol: Protocol::Imap,
            listen: "127.0.0.1:0".parse().unwrap(),
            tls: TlsMode::Implicit,
            backend: Backends::single(BackendAddress {
                host: "127.0.0.1".into(),
                port: 143,
            }),
            max_connections: 1,
            require_tls_for_mail: true,
            backend_proxy_protocol: false,
            proxy_protocol_from: Vec::new(),
            backend_client_info: false,
            routing: Default::default(),
        }
    }

    #[test]
    fn handshake_counter_carries_version_iana_cipher_and_group() {
        let metrics = Metrics::register(&Registry::new()).unwrap();
        let handles = metrics.listener(&listener());
        let info = TlsInfo {
            version: rustls::ProtocolVersion::TLSv1_3,
            cipher: rustls::CipherSuite::TLS13_AES_128_GCM_SHA256,
            group: Some(rustls::NamedGroup::X25519),
            sni: None,
            signature_scheme: None,
        };
        handles.handshake_succeeded(&info, 0.002);
        handles.handshake_succeeded(&info, 0.002);
        let text = metrics.encode();
        assert!(
            text.contains(r#"mailfront_tls_handshakes_total{cipher="TLS_AES_128_GCM_SHA256",group="x25519",listener="imaps",version="TLSv1.3"} 2"#),
            "{text}"
        );
    }

    #[test]
    fn fixed_label_sets_start_at_zero() {
        let metrics = Metrics::register(&Registry::new()).unwrap();
        metrics.listener(&listener());
        let text = metrics.encode();
        assert!(text.contains(
            r#"mailfront_tls_handshake_failures_total{listener="imaps",reason="timeout"} 0"#
        ));
        assert!(text.contains(
            r#"mailfront_auth_outcomes_total{listener="imaps",protocol="imap",result="failure"} 0"#
        ));
        assert!(text.contains(
            r#"mailfront_cleartext_auth_refused_total{listener="imaps",protocol="imap"} 0"#
        ));
        assert!(
            text.contains(r#"mailfront_auth_throttled_total{listener="imaps",protocol="imap"} 0"#)
        );
        for reason in ["max_connections", "per_ip"] {
            assert!(text.contains(&format!(
                r#"mailfront_connections_refused_total{{listener="imaps",protocol="imap",reason="{reason}"}} 0"#
            )));
        }
        assert!(text.contains("mailfront_build_info{version=\""));
    }

    #[test]
    fn every_possible_close_starts_at_zero_with_its_side() {
        let metrics = Metrics::register(&Registry::new()).unwrap();
        let handles = metrics.listener(&listener());
        let text = metrics.encode();
        let series: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("mailfront_sessions_closed_total{"))
            .collect();
        assert_eq!(series.len(), CloseClass::ALL.len(), "{series:#?}");
        for needle in [
            r#"mailfront_sessions_closed_total{listener="imaps",protocol="imap",reason="client_closed",side="client"} 0"#,
            r#"mailfront_sessions_closed_total{listener="imaps",protocol="imap",reason="io_error",side="backend"} 0"#,
            r#"mailfront_sessions_closed_total{listener="imaps",protocol="imap",reason="io_error",side="client"} 0"#,
            r#"mailfront_sessions_closed_total{listener="imaps",protocol="imap",reason="tls_handshake_failed",side="tls"} 0"#,
            r#"mailfront_sessions_closed_total{listener="imaps",protocol="imap",reason="shutdown",side="proxy"} 0"#,
        ] {
            assert!(text.contains(needle), "{needle}\n{text}");
        }
        handles.session_closed(CloseClass::BackendIo);
        assert!(metrics.encode().contains(
            r#"mailfront_sessions_closed_total{listener="imaps",protocol="imap",reason="io_error",side="backend"} 1"#
        ));
        assert_eq!(handles.sessions_closed(CloseClass::BackendIo), 1);
        assert_eq!(handles.sessions_closed(CloseClass::ClientIo), 0);
    }

    #[test]
    fn proxy_header_results_exist_only_on_listeners_that_read_the_header() {
        let metrics = Metrics::register(&Registry::new()).unwrap();
        let plain = metrics.listener(&listener());
        let balanced = metrics.listener(&ListenerConfig {
            name: "behind-lb".into(),
            proxy_protocol_from: vec![crate::cidr::Network::parse("10.0.0.0/8").unwrap()],
            ..listener()
        });
        plain.proxy_header(ProxyHeaderResult::Missing);
        balanced.proxy_header(ProxyHeaderResult::Local);
        balanced.proxy_header(ProxyHeaderResult::Untrusted);
        let text = metrics.encode();
        assert!(!text.contains(r#"mailfront_proxy_protocol_headers_total{listener="imaps""#));
        for result in ProxyHeaderResult::ALL {
            let expected = if matches!(
                result,
                ProxyHeaderResult::Local | ProxyHeaderResult::Untrusted
            ) {
                1
            } else {
                0
            };
            let line = format!(
                r#"mailfront_proxy_protocol_headers_total{{listener="behind-lb",result="{}"}} {expected}"#,
                result.as_str()
            );
            assert!(text.contains(&line), "{line}");
        }
    }

    #[test]
    fn per_protocol_families_exist_only_for_their_protocol() {
        let metrics = Metrics::register(&Registry::new()).unwrap();
        let imap = metrics.listener(&listener());
        let pop3 = metrics.listener(&ListenerConfig {
            name: "pop3s".into(),
            protocol: Protocol::Pop3,
            ..listener()
        });
        let smtp = metrics.listener(&ListenerConfig {
            name: "submissions".into(),
            protocol: Protocol::Smtp,
            ..listener()
        });
        // Calls on a listener of another protocol move nothing and create nothing.
        pop3.id_field_added(IdSource::Client);
        pop3.received_field_added();
        pop3.message_accepted(10);
        imap.received_field_added();
        smtp.id_field_added(IdSource::Proxy);
        let text = metrics.encode();
        let listeners_of = |family: &str| -> Vec<String> {
            text.lines()
                .filter(|l| l.starts_with(family) && !l.starts_with('#'))
                .filter_map(|l| l.split("listener=\"").nth(1))
                .filter_map(|rest| rest.split('"').next())
                .map(str::to_owned)
                .collect()
        };
        let mut id = listeners_of("mailfront_imap_id_tls_fields_added_total{");
        id.dedup();
        assert_eq!(id, ["imaps"]);
        assert_eq!(
            listeners_of("mailfront_received_fields_added_total{"),
            ["submissions"]
        );
        assert_eq!(
            listeners_of("mailfront_messages_submitted_total{"),
            ["submissions"]
        );
        assert!(
            text.contains(r#"mailfront_received_fields_added_total{listener="submissions"} 0"#)
        );
        assert!(text.contains(
            r#"mailfront_imap_id_tls_fields_added_total{listener="imaps",source="client"} 0"#
        ));
    }

    #[test]
    fn certificate_expiry_is_a_unix_timestamp_per_certificate() {
        let metrics = Metrics::register(&Registry::new()).unwrap();
        metrics.set_certificates(&[LoadedCertificate {
            label: "mx.example.test".into(),
            names: vec!["mx.example.test".into()],
            not_after: 1_900_000_000,
            self_signed: false,
            key_type: "ECDSA".into(),
            shadowed: Vec::new(),
        }]);
        assert!(metrics
            .encode()
            .contains(r#"mailfront_certificate_not_after_timestamp_seconds{certificate="mx.example.test"} 1900000000"#));
    }
}
