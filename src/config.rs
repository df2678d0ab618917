//! Configuration: the YAML model ([`Config`]), its defaults, and validation into a checked
//! [`RuntimeConfig`] so the rest of the code never re-checks a value.
//!
//! Parsing ([`Config::from_yaml`]) is separate from file I/O ([`load`]), and validation reports
//! every problem at once, each naming the key it is about.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

mod backends;
pub use backends::{
    BackendHealthSection, BackendList, BackendTls, BackendTlsSection, Backends, Route,
    RouteSection, SniPattern, literal_socket_addr,
};

/// The built-in default: `mailfront` with no `--config` runs exactly the shipped example.
pub const EMBEDDED_DEFAULT: &str = include_str!("../config.yaml.example");

/// One problem in a configuration, with the key it concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    /// Dotted path of the key, e.g. `listeners[1].backend`.
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

/// Everything wrong with a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Syntax(String),
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<ConfigProblem>),
}

/// `protocol:` of a listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Smtp,
    Imap,
    Pop3,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Smtp => "smtp",
            Protocol::Imap => "imap",
            Protocol::Pop3 => "pop3",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `tls:` of a listener: TLS from the first byte (465/993/995) or after STARTTLS/STLS (587/143/110).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    Implicit,
    Starttls,
}

impl TlsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            TlsMode::Implicit => "implicit",
            TlsMode::Starttls => "starttls",
        }
    }
}

/// `tls.min_version`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum MinTlsVersion {
    #[serde(rename = "1.2")]
    Tls12,
    #[serde(rename = "1.3")]
    Tls13,
}

/// `log.format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// A duration written as "30s", "5m", "1h" or "250ms".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConfigDuration(pub Duration);

impl<'de> Deserialize<'de> for ConfigDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // Refused inside the visitor, while the scalar is read: yaml_serde then names the key
        // (`timeouts.idle`); an error after `String::deserialize` named only the section.
        deserializer.deserialize_str(DurationVisitor)
    }
}

struct DurationVisitor;

impl serde::de::Visitor<'_> for DurationVisitor {
    type Value = ConfigDuration;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a duration like \"30s\", \"5m\", \"1h\", \"1m30s\" or \"250ms\"")
    }

    fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<ConfigDuration, E> {
        parse_duration(text).map(ConfigDuration).ok_or_else(|| {
            E::custom(format!(
                "invalid duration {text:?}: write it like \"30s\", \"5m\", \"1h\", \"1m30s\" or \"250ms\""
            ))
        })
    }
}

/// Parses "250ms", "30s", "5m", "1h" and sums of them like "1m30s".
fn parse_duration(text: &str) -> Option<Duration> {
    let mut rest = text.trim();
    if rest.is_empty() {
        return None;
    }
    let mut total = Duration::ZERO;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit())?;
        if digits == 0 {
            return None;
        }
        let (number, after) = rest.split_at(digits);
        let number: u64 = number.parse().ok()?;
        let unit_len = after
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(after.len());
        let (unit, next) = after.split_at(unit_len);
        let part = match unit {
            "ms" => Duration::from_millis(number),
            "s" => Duration::from_secs(number),
            "m" => Duration::from_secs(number.checked_mul(60)?),
            "h" => Duration::from_secs(number.checked_mul(3600)?),
            _ => return None,
        };
        total = total.checked_add(part)?;
        rest = next;
    }
    Some(total)
}

/// The file as written. Every struct refuses unknown keys, so a typo is an error, not a default.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub hostname: String,
    #[serde(default)]
    pub tls: TlsSection,
    pub listeners: Vec<ListenerSection>,
    #[serde(default)]
    pub metrics: Option<MetricsSection>,
    #[serde(default)]
    pub log: LogSection,
    #[serde(default)]
    pub timeouts: TimeoutsSection,
    #[serde(default)]
    pub limits: LimitsSection,
    /// Counts shared by the replicas of one deployment, in Redis or Valkey
    /// ([`crate::shared_state`]); absent, each replica counts alone.
    #[serde(default)]
    pub shared_state: Option<SharedStateSection>,
}

/// `shared_state`: where the replicas keep the counts behind `limits.auth_failures_per_ip` and
/// `limits.connections_per_ip`, so that N replicas enforce one budget, not N.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SharedStateSection {
    /// `redis://[user[:password]@]host:port[/db]`, or `rediss://` for TLS (always verified).
    pub redis: String,
    /// A file whose content (one line, trailing newline ignored) is the password: a mounted
    /// Kubernetes Secret. Overrides a password in the URL.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// PEM bundle of the CA(s) that sign the server's certificate for `rediss://`; the
    /// system's roots without it.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// How long one operation may take before this replica counts alone (fails open).
    #[serde(default = "default_shared_timeout")]
    pub timeout: ConfigDuration,
    /// Inserted after `mailfront:` in every key, so deployments can share one Redis.
    #[serde(default)]
    pub key_prefix: String,
    /// How long a replica's connection slots outlive it if it dies without releasing them;
    /// refreshed every third of it.
    #[serde(default = "default_shared_lease")]
    pub lease: ConfigDuration,
}

/// The checked `shared_state`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedStateConfig {
    pub url: String,
    pub password_file: Option<PathBuf>,
    pub ca: Option<PathBuf>,
    pub timeout: Duration,
    pub key_prefix: String,
    pub lease: Duration,
}

/// A Redis round trip on a cluster network is well under a millisecond; 50 ms means the store
/// is in trouble, and a login waits at most that long before this replica counts alone.
pub const DEFAULT_SHARED_TIMEOUT: Duration = Duration::from_millis(50);
/// A killed replica's slots are freed within one lease (15 s), well inside 30 s; refreshing
/// every 5 s leaves two refreshes of slack before a slow replica's lease runs out.
pub const DEFAULT_SHARED_LEASE: Duration = Duration::from_secs(15);
/// Operations that take longer than this are no protection: cap the configurable timeout.
const MAX_SHARED_TIMEOUT: Duration = Duration::from_secs(5);
/// Below a second, refreshes (a third of the lease) would be a busy loop.
const MIN_SHARED_LEASE: Duration = Duration::from_secs(1);
/// Key prefixes are parts of Redis key names: short, and no separator or glob characters.
const MAX_KEY_PREFIX: usize = 64;

fn default_shared_timeout() -> ConfigDuration {
    ConfigDuration(DEFAULT_SHARED_TIMEOUT)
}
fn default_shared_lease() -> ConfigDuration {
    ConfigDuration(DEFAULT_SHARED_LEASE)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    #[serde(default)]
    pub certificates: Vec<CertificateSection>,
    #[serde(default = "default_min_version")]
    pub min_version: MinTlsVersion,
    #[serde(default = "default_handshake_timeout")]
    pub handshake_timeout: ConfigDuration,
    #[serde(default = "default_reload_interval")]
    pub reload_interval: ConfigDuration,
    #[serde(default = "default_session_tickets")]
    pub session_tickets: usize,
    #[serde(default)]
    pub ticket_key_file: Option<PathBuf>,
}

impl Default for TlsSection {
    fn default() -> Self {
        TlsSection {
            certificates: Vec::new(),
            min_version: default_min_version(),
            handshake_timeout: default_handshake_timeout(),
            reload_interval: default_reload_interval(),
            session_tickets: default_session_tickets(),
            ticket_key_file: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateSection {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerSection {
    pub name: String,
    pub protocol: Protocol,
    pub listen: String,
    pub tls: TlsMode,
    pub backend: BackendList,
    #[serde(default)]
    pub routes: Vec<RouteSection>,
    #[serde(default)]
    pub backend_tls: Option<BackendTlsSection>,
    #[serde(default)]
    pub backend_health: Option<BackendHealthSection>,
    #[serde(default)]
    pub max_connections: Option<usize>,
    #[serde(default)]
    pub require_tls_for_mail: Option<bool>,
    #[serde(default)]
    pub backend_proxy_protocol: bool,
    #[serde(default)]
    pub proxy_protocol_from: Vec<String>,
    #[serde(default)]
    pub backend_client_info: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSection {
    pub listen: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSection {
    #[serde(default)]
    pub format: LogFormat,
    #[serde(default = "default_log_level")]
    pub level: String,
}

impl Default for LogSection {
    fn default() -> Self {
        LogSection {
            format: LogFormat::default(),
            level: default_log_level(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeoutsSection {
    #[serde(default = "default_backend_connect")]
    pub backend_connect: ConfigDuration,
    #[serde(default = "default_idle")]
    pub idle: ConfigDuration,
    #[serde(default = "default_login")]
    pub login: ConfigDuration,
    #[serde(default = "default_data_reply")]
    pub data_reply: ConfigDuration,
    #[serde(default = "default_relay_idle")]
    pub relay_idle: ConfigDuration,
    #[serde(default = "default_shutdown_grace")]
    pub shutdown_grace: ConfigDuration,
}

impl Default for TimeoutsSection {
    fn default() -> Self {
        TimeoutsSection {
            backend_connect: default_backend_connect(),
            idle: default_idle(),
            login: default_login(),
            data_reply: default_data_reply(),
            relay_idle: default_relay_idle(),
            shutdown_grace: default_shutdown_grace(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsSection {
    #[serde(default = "default_smtp_line")]
    pub smtp_line: usize,
    #[serde(default = "default_imap_line")]
    pub imap_line: usize,
    #[serde(default = "default_imap_literal")]
    pub imap_literal: usize,
    #[serde(default = "default_pop3_line")]
    pub pop3_line: usize,
    #[serde(default = "default_preauth_commands")]
    pub preauth_commands: usize,
    #[serde(default = "default_connections_per_ip")]
    pub connections_per_ip: u32,
    #[serde(default = "default_auth_failures_per_ip")]
    pub auth_failures_per_ip: u32,
    #[serde(default = "default_auth_failure_window")]
    pub auth_failure_window: ConfigDuration,
    #[serde(default = "default_listen_backlog")]
    pub listen_backlog: u32,
}

impl Default for LimitsSection {
    fn default() -> Self {
        LimitsSection {
            smtp_line: default_smtp_line(),
            imap_line: default_imap_line(),
            imap_literal: default_imap_literal(),
            pop3_line: default_pop3_line(),
            preauth_commands: default_preauth_commands(),
            connections_per_ip: default_connections_per_ip(),
            auth_failures_per_ip: default_auth_failures_per_ip(),
            auth_failure_window: default_auth_failure_window(),
            listen_backlog: default_listen_backlog(),
        }
    }
}

// Defaults live here, in one place; config.yaml.example documents the same values.

/// A client that has not finished the TLS handshake in 10 s is gone or stalling on purpose: a
/// real handshake takes a few round trips, well under a second even on a slow mobile link.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often certificate files are checked: a renewed certificate (cert-manager, certbot) is
/// in service within seconds, and reading two small files every 5 s costs nothing.
pub const DEFAULT_RELOAD_INTERVAL: Duration = Duration::from_secs(5);
/// Most TLS 1.3 tickets per handshake: each is about 200 octets of the server's flight, and a
/// mail client opens a handful of parallel connections at most.
pub const MAX_SESSION_TICKETS: usize = 8;
/// Connecting to the backend, which sits on the same host or network: 10 s is far beyond a
/// healthy connect and still short enough that the client gets a clear refusal, not a hang.
pub const DEFAULT_BACKEND_CONNECT: Duration = Duration::from_secs(10);
/// Silence allowed before authentication or between SMTP commands: RFC 5321 §4.5.3.2.7 asks
/// a server to wait at least 5 minutes for the next command.
pub const DEFAULT_IDLE: Duration = Duration::from_secs(5 * 60);
/// The whole time from accept to authentication, however much the client sends: Dovecot's own
/// `login_timeout` (3 min). A person typing a password or a client retrying a refused one needs
/// seconds; a client trickling bytes to hold a pre-login session needs this to end.
pub const DEFAULT_LOGIN: Duration = Duration::from_secs(3 * 60);
/// The backend's reply after the end of message data: RFC 5321 §4.5.3.2.6 asks the client
/// to wait 10 minutes for it, and mailfront is that client towards the backend.
pub const DEFAULT_DATA_REPLY: Duration = Duration::from_secs(10 * 60);
/// Silence allowed after IMAP/POP3 login: above the 29 minutes after which an IMAP client
/// re-issues IDLE (RFC 9051 §6.3.13), so idling clients are never cut.
pub const DEFAULT_RELAY_IDLE: Duration = Duration::from_secs(60 * 60);
/// On SIGTERM, time for live sessions to finish (a message in flight, a LOGOUT): 30 s covers
/// them, and deploy/ sets the pod's terminationGracePeriodSeconds (45) above it so Kubernetes
/// does not kill the process first.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// Longest SMTP command line mailfront reads (AUTH lines get 12288, RFC 4954 §4): Postfix's
/// `line_length_limit`. What reaches the backend is never the client's line but mailfront's
/// re-encoding of it, at most 512 octets (1280 for MAIL, 1024 for RCPT, see
/// [`crate::smtp::canonical`]), so this bounds only what is read and judged; reading more than
/// the longest line any backend takes serves nothing.
pub const DEFAULT_SMTP_LINE: usize = 2048;
/// Longest IMAP line before authentication: RFC 7162 §4 has clients keep command lines to
/// about 8192 octets, so a server should accept that much.
pub const DEFAULT_IMAP_LINE: usize = 8192;
/// Largest IMAP literal before authentication. Only LOGIN and ID take strings then: a user name
/// or password is at most a few hundred octets, an ID value at most 1024 (RFC 2971 §3.3), and
/// tokens go through AUTHENTICATE, whose lines have their own bound. 8 KiB, the same as a
/// command line (`limits.imap_line`), is still far above what Dovecot's login process takes
/// for a command's arguments (about 1 KiB). A session holds up to a line and a literal while it
/// reads a command, so this bounds what an unfinished literal costs: at 64 KiB it took a
/// pre-login session from 31 to 91 KiB; at 8 KiB a session holds at most 16 KiB of command.
pub const DEFAULT_IMAP_LITERAL: usize = 8 * 1024;
/// Longest POP3 command line: RFC 1939 §3 allows 255 octets per command; twice that leaves
/// room for long RFC 2449 arguments.
pub const DEFAULT_POP3_LINE: usize = 512;
/// IMAP/POP3 commands allowed before authentication succeeds: a real client needs fewer than
/// ten (CAPABILITY, ID, STARTTLS, AUTHENTICATE and a retry), so 50 only stops a brute force.
pub const DEFAULT_PREAUTH_COMMANDS: usize = 50;
/// Sessions one client address (an IPv6 /64) may hold before authenticating, across all
/// listeners: a mail client opens a handful (IMAP opens a few in parallel, plus SMTP), and even
/// a NAT gateway in front of an office rarely has 50 logins in progress at one instant, because
/// authenticated sessions do not count.
pub const DEFAULT_CONNECTIONS_PER_IP: u32 = 50;
/// Login attempts that did not succeed one client address (an IPv6 /64) may have in
/// `limits.auth_failure_window` before its further attempts are refused here (each charged when
/// sent, refunded on success): a person mistyping a password, or a phone retrying an old one on
/// three accounts, stays well below 10.
pub const DEFAULT_AUTH_FAILURES_PER_IP: u32 = 10;
/// 10 failures per 10 minutes is one guess a minute: a dictionary attack on one address gets
/// nowhere, and a throttled person waits minutes, not hours.
pub const DEFAULT_AUTH_FAILURE_WINDOW: Duration = Duration::from_secs(600);

/// Connections the kernel queues, handshake done, before mailfront accepts them: nginx's 511.
/// std's and tokio's 128 overflows in a reconnect storm (every client of a restarted replica
/// at once), and an overflowing queue drops SYNs, which clients retry only after a second or
/// more. Linux caps the value at `net.core.somaxconn` (4096 since 5.4).
pub const DEFAULT_LISTEN_BACKLOG: u32 = 511;
/// The largest `limits.listen_backlog`: `net.core.somaxconn`'s own historical maximum; a
/// larger queue only holds clients longer than they will wait.
pub const MAX_LISTEN_BACKLOG: u32 = 65535;

/// A listener name labels metrics and logs: 64 octets is plenty for a name and keeps label
/// values short.
const MAX_LISTENER_NAME: usize = 64;

// The smallest limits that still let a standards-following client work: below them a
// configuration would refuse legitimate traffic, so validation says so.
/// RFC 5321 §4.5.3.1.4: a command line of 512 octets must be accepted.
const MIN_SMTP_LINE: usize = 512;
/// An IMAP LOGIN line with a long user name and password, or a CAPABILITY-heavy ID, fits 1 KiB.
const MIN_IMAP_LINE: usize = 1024;
/// The same for a LOGIN argument sent as a literal.
const MIN_IMAP_LITERAL: usize = 1024;
/// RFC 1939 §3: a POP3 command line is at most 255 octets, so that much must be accepted.
const MIN_POP3_LINE: usize = 255;
/// At least the login command itself.
const MIN_PREAUTH_COMMANDS: usize = 1;

fn default_min_version() -> MinTlsVersion {
    MinTlsVersion::Tls12
}
fn default_handshake_timeout() -> ConfigDuration {
    ConfigDuration(DEFAULT_HANDSHAKE_TIMEOUT)
}
fn default_reload_interval() -> ConfigDuration {
    ConfigDuration(DEFAULT_RELOAD_INTERVAL)
}
/// rustls' default: two tickets, so a client opening two connections at once resumes both
/// (TLS 1.3 tickets are single-use, RFC 8446 §C.4).
fn default_session_tickets() -> usize {
    2
}
fn default_log_level() -> String {
    "info".to_owned()
}
fn default_backend_connect() -> ConfigDuration {
    ConfigDuration(DEFAULT_BACKEND_CONNECT)
}
fn default_idle() -> ConfigDuration {
    ConfigDuration(DEFAULT_IDLE)
}
fn default_login() -> ConfigDuration {
    ConfigDuration(DEFAULT_LOGIN)
}
fn default_data_reply() -> ConfigDuration {
    ConfigDuration(DEFAULT_DATA_REPLY)
}
fn default_relay_idle() -> ConfigDuration {
    ConfigDuration(DEFAULT_RELAY_IDLE)
}
fn default_shutdown_grace() -> ConfigDuration {
    ConfigDuration(DEFAULT_SHUTDOWN_GRACE)
}
fn default_smtp_line() -> usize {
    DEFAULT_SMTP_LINE
}
fn default_imap_line() -> usize {
    DEFAULT_IMAP_LINE
}
fn default_imap_literal() -> usize {
    DEFAULT_IMAP_LITERAL
}
fn default_pop3_line() -> usize {
    DEFAULT_POP3_LINE
}
fn default_preauth_commands() -> usize {
    DEFAULT_PREAUTH_COMMANDS
}
fn default_connections_per_ip() -> u32 {
    DEFAULT_CONNECTIONS_PER_IP
}
fn default_auth_failures_per_ip() -> u32 {
    DEFAULT_AUTH_FAILURES_PER_IP
}
fn default_auth_failure_window() -> ConfigDuration {
    ConfigDuration(DEFAULT_AUTH_FAILURE_WINDOW)
}
fn default_listen_backlog() -> u32 {
    DEFAULT_LISTEN_BACKLOG
}

/// Default cap on concurrent sessions per listener: an idle TLS session costs mailfront some
/// tens of KiB, so 10,000 fit in a few hundred MiB, and the cap keeps a flood from taking the
/// process (or the backend's process limit) down before it is noticed.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;

/// A backend address: kept as written, because a DNS name is resolved again over time (every
/// address it has is a backend of its own).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BackendAddress {
    pub host: String,
    pub port: u16,
}

impl fmt::Display for BackendAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

fn parse_backend(text: &str) -> Result<BackendAddress, String> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(BackendAddress {
            host: addr.ip().to_string(),
            port: addr.port(),
        });
    }
    let (host, port) = text
        .rsplit_once(':')
        .ok_or_else(|| format!("{text:?} is not host:port"))?;
    let port: u16 = port
        .parse()
        .map_err(|_| format!("{text:?} has no valid port"))?;
    // Resolved at each connect, so only a host name is worth accepting: a name the resolver
    // could never look up fails here, at startup, instead of at the first client.
    let valid_name = crate::dns::is_host_name(host);
    if !valid_name {
        return Err(format!("{host:?} is neither an IP address nor a DNS name"));
    }
    if port == 0 {
        return Err("port 0 is not a valid backend port".to_owned());
    }
    Ok(BackendAddress {
        host: host.to_owned(),
        port,
    })
}

/// A listener after validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerConfig {
    pub name: String,
    pub protocol: Protocol,
    pub listen: SocketAddr,
    pub tls: TlsMode,
    /// `backend`, `routes`, `backend_tls` and `backend_health`.
    pub backend: Backends,
    pub max_connections: usize,
    /// SMTP on a STARTTLS listener: refuse MAIL FROM before TLS (default true).
    pub require_tls_for_mail: bool,
    /// Send a PROXY protocol v2 header first on every backend connection, so the backend sees
    /// the client's address (Postfix `smtpd_upstream_proxy_protocol`, Dovecot `haproxy = yes`).
    pub backend_proxy_protocol: bool,
    /// Load balancers allowed to connect, each connection starting with a PROXY protocol v1/v2
    /// header whose source address then stands for the client; empty: off.
    pub proxy_protocol_from: Vec<crate::cidr::Network>,
    /// Tell the backend the client's address in its own protocol: SMTP and POP3 XCLIENT, IMAP
    /// ID `x-originating-*` (see [`crate::client_info`]).
    pub backend_client_info: bool,
}

/// TLS settings after validation. Certificate files are loaded (and checked) by [`crate::tls`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    pub certificates: Vec<CertificateSection>,
    pub min_version: MinTlsVersion,
    pub handshake_timeout: Duration,
    pub reload_interval: Duration,
    /// TLS 1.3 tickets sent after each full handshake; 0: no tickets (nor TLS 1.2 ones).
    pub session_tickets: usize,
    /// Keys that seal tickets, shared by replicas; `None`: a key of this process only.
    pub ticket_key_file: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timeouts {
    pub backend_connect: Duration,
    pub idle: Duration,
    /// From accept to authentication, not restarted by traffic (see [`DEFAULT_LOGIN`]).
    pub login: Duration,
    pub data_reply: Duration,
    pub relay_idle: Duration,
    pub shutdown_grace: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    pub smtp_line: usize,
    pub imap_line: usize,
    pub imap_literal: usize,
    pub pop3_line: usize,
    pub preauth_commands: usize,
    /// Unauthenticated sessions per client address across all listeners; 0: no limit.
    pub connections_per_ip: u32,
    /// Login attempts that did not succeed per client address within `auth_failure_window`
    /// ([`crate::limits::AuthThrottle`]); 0: no throttle.
    pub auth_failures_per_ip: u32,
    pub auth_failure_window: Duration,
}

/// The checked configuration the proxy runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeConfig {
    pub hostname: String,
    pub tls: TlsConfig,
    pub listeners: Vec<ListenerConfig>,
    pub metrics_listen: Option<SocketAddr>,
    pub log_format: LogFormat,
    pub log_level: String,
    pub timeouts: Timeouts,
    pub limits: Limits,
    /// `limits.listen_backlog`: the accept queue of every listener and of the metrics
    /// endpoint. Here rather than in [`Limits`], which sessions carry: only binding uses it.
    pub listen_backlog: u32,
    /// `shared_state`; `None`: every replica counts alone.
    pub shared_state: Option<SharedStateConfig>,
}

impl Config {
    /// Parses YAML text; unknown keys and wrong types are errors that name the key.
    pub fn from_yaml(text: &str) -> Result<Config, ConfigError> {
        yaml_serde::from_str(text).map_err(|e| ConfigError::Syntax(e.to_string()))
    }

    /// Checks every value, reporting all problems at once. Relative certificate paths are
    /// resolved against `base_dir` (the config file's directory).
    pub fn validate(self, base_dir: &Path) -> Result<RuntimeConfig, ConfigError> {
        let mut problems = Vec::new();
        let mut problem =
            |key: String, message: String| problems.push(ConfigProblem { key, message });

        // Written into SMTP greetings, EHLO replies and Received fields (RFC 5321 §4.1.2 Domain).
        if !crate::dns::is_host_name(&self.hostname) {
            problem(
                "hostname".into(),
                format!("{:?} is not a valid DNS host name", self.hostname),
            );
        }

        let certificates = self
            .tls
            .certificates
            .iter()
            .map(|c| CertificateSection {
                cert: base_dir.join(&c.cert),
                key: base_dir.join(&c.key),
            })
            .collect::<Vec<_>>();
        if self.tls.handshake_timeout.0.is_zero() {
            problem("tls.handshake_timeout".into(), "must be more than 0".into());
        }
        if self.tls.reload_interval.0.is_zero() {
            problem("tls.reload_interval".into(), "must be more than 0".into());
        }
        if self.tls.session_tickets > MAX_SESSION_TICKETS {
            problem(
                "tls.session_tickets".into(),
                format!("at most {MAX_SESSION_TICKETS} (0 turns tickets off)"),
            );
        }
        if self.tls.ticket_key_file.is_some() && self.tls.session_tickets == 0 {
            problem(
                "tls.ticket_key_file".into(),
                "set, but tls.session_tickets is 0: no ticket would use it".into(),
            );
        }

        if self.listeners.is_empty() {
            problem(
                "listeners".into(),
                "at least one listener is required".into(),
            );
        }
        let mut listeners = Vec::new();
        let mut names = std::collections::HashSet::new();
        let mut addresses = std::collections::HashSet::new();
        for (i, l) in self.listeners.iter().enumerate() {
            let key = |field: &str| format!("listeners[{i}].{field}");
            let name_ok = !l.name.is_empty()
                && l.name.len() <= MAX_LISTENER_NAME
                && l.name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !name_ok {
                problem(
                    key("name"),
                    format!(
                        "{:?} must be 1-{MAX_LISTENER_NAME} letters, digits, '-' or '_'",
                        l.name
                    ),
                );
            } else if !names.insert(l.name.clone()) {
                problem(
                    key("name"),
                    format!("{:?} is used by another listener", l.name),
                );
            }
            let listen = match l.listen.parse::<SocketAddr>() {
                Ok(addr) => {
                    if addr.port() != 0 && !addresses.insert(addr) {
                        problem(key("listen"), format!("{addr} is used by another listener"));
                    }
                    Some(addr)
                }
                Err(_) => {
                    problem(
                        key("listen"),
                        format!(
                            "{:?} is not an address:port (IPv6 as \"[::]:993\")",
                            l.listen
                        ),
                    );
                    None
                }
            };
            let backend = backends::validate(
                &backends::Written {
                    backend: &l.backend,
                    routes: &l.routes,
                    tls: l.backend_tls.as_ref(),
                    health: l.backend_health.as_ref(),
                },
                base_dir,
                &mut |field, message| problem(key(&field), message),
            );
            if l.max_connections == Some(0) {
                problem(key("max_connections"), "must be at least 1".into());
            }
            if l.require_tls_for_mail.is_some()
                && (l.protocol != Protocol::Smtp || l.tls != TlsMode::Starttls)
            {
                problem(
                    key("require_tls_for_mail"),
                    "applies only to smtp listeners with tls: starttls".into(),
                );
            }
            let mut proxy_protocol_from = Vec::new();
            for (i, net) in l.proxy_protocol_from.iter().enumerate() {
                match crate::cidr::Network::parse(net) {
                    Ok(n) => proxy_protocol_from.push(n),
                    Err(message) => {
                        problem(format!("{}[{i}]", key("proxy_protocol_from")), message)
                    }
                }
            }
            if let (Some(listen), Some(backend)) = (listen, backend) {
                listeners.push(ListenerConfig {
                    name: l.name.clone(),
                    protocol: l.protocol,
                    listen,
                    tls: l.tls,
                    backend,
                    max_connections: l.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS),
                    require_tls_for_mail: l.require_tls_for_mail.unwrap_or(true),
                    backend_proxy_protocol: l.backend_proxy_protocol,
                    proxy_protocol_from,
                    backend_client_info: l.backend_client_info,
                });
            }
        }

        let metrics_listen = match &self.metrics {
            None => None,
            Some(m) => match m.listen.parse::<SocketAddr>() {
                Ok(addr) => Some(addr),
                Err(_) => {
                    problem(
                        "metrics.listen".into(),
                        format!("{:?} is not an address:port", m.listen),
                    );
                    None
                }
            },
        };

        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err()
            || !log_directives_have_levels(&self.log.level)
        {
            problem(
                "log.level".into(),
                format!(
                    "{:?} is not a level (error, warn, info, debug, trace) or filter",
                    self.log.level
                ),
            );
        }

        let t = &self.timeouts;
        for (name, value) in [
            ("timeouts.backend_connect", t.backend_connect),
            ("timeouts.idle", t.idle),
            ("timeouts.login", t.login),
            ("timeouts.data_reply", t.data_reply),
            ("timeouts.relay_idle", t.relay_idle),
        ] {
            if value.0.is_zero() {
                problem(name.into(), "must be more than 0".into());
            }
        }

        let lim = &self.limits;
        for (name, value, minimum) in [
            ("limits.smtp_line", lim.smtp_line, MIN_SMTP_LINE),
            ("limits.imap_line", lim.imap_line, MIN_IMAP_LINE),
            ("limits.imap_literal", lim.imap_literal, MIN_IMAP_LITERAL),
            ("limits.pop3_line", lim.pop3_line, MIN_POP3_LINE),
            (
                "limits.preauth_commands",
                lim.preauth_commands,
                MIN_PREAUTH_COMMANDS,
            ),
        ] {
            if value < minimum {
                problem(
                    name.into(),
                    format!("{value} is below the minimum of {minimum}"),
                );
            }
        }

        if lim.auth_failures_per_ip > crate::limits::MAX_AUTH_FAILURES_PER_IP {
            problem(
                "limits.auth_failures_per_ip".into(),
                format!(
                    "{} is above the maximum of {}",
                    lim.auth_failures_per_ip,
                    crate::limits::MAX_AUTH_FAILURES_PER_IP
                ),
            );
        }
        if !(1..=MAX_LISTEN_BACKLOG).contains(&lim.listen_backlog) {
            problem(
                "limits.listen_backlog".into(),
                format!("{} is outside 1-{MAX_LISTEN_BACKLOG}", lim.listen_backlog),
            );
        }
        if lim.auth_failures_per_ip > 0 && lim.auth_failure_window.0.is_zero() {
            problem(
                "limits.auth_failure_window".into(),
                "must be more than 0 (set limits.auth_failures_per_ip to 0 to turn the throttle off)"
                    .into(),
            );
        }

        let shared_state = self.shared_state.as_ref().and_then(|section| {
            let checked = validate_shared_state(section, base_dir);
            if let Err(found) = &checked {
                problems.extend(found.iter().cloned());
            }
            checked.ok()
        });

        if !problems.is_empty() {
            return Err(ConfigError::Invalid(problems));
        }
        Ok(RuntimeConfig {
            hostname: self.hostname.to_ascii_lowercase(),
            tls: TlsConfig {
                certificates,
                min_version: self.tls.min_version,
                handshake_timeout: self.tls.handshake_timeout.0,
                reload_interval: self.tls.reload_interval.0,
                session_tickets: self.tls.session_tickets,
                ticket_key_file: self.tls.ticket_key_file.as_ref().map(|p| base_dir.join(p)),
            },
            listeners,
            metrics_listen,
            log_format: self.log.format,
            log_level: self.log.level,
            timeouts: Timeouts {
                backend_connect: t.backend_connect.0,
                idle: t.idle.0,
                login: t.login.0,
                data_reply: t.data_reply.0,
                relay_idle: t.relay_idle.0,
                shutdown_grace: t.shutdown_grace.0,
            },
            limits: Limits {
                smtp_line: lim.smtp_line,
                imap_line: lim.imap_line,
                imap_literal: lim.imap_literal,
                pop3_line: lim.pop3_line,
                preauth_commands: lim.preauth_commands,
                connections_per_ip: lim.connections_per_ip,
                auth_failures_per_ip: lim.auth_failures_per_ip,
                auth_failure_window: lim.auth_failure_window.0,
            },
            listen_backlog: lim.listen_backlog,
            shared_state,
        })
    }
}

/// Checks `shared_state` without touching the network or the files (the files are read when
/// the client is built: at start, and by `mailfront check`).
fn validate_shared_state(
    section: &SharedStateSection,
    base_dir: &Path,
) -> Result<SharedStateConfig, Vec<ConfigProblem>> {
    let mut problems = Vec::new();
    let mut problem = |key: &str, message: String| {
        problems.push(ConfigProblem {
            key: format!("shared_state.{key}"),
            message,
        });
    };
    match crate::shared_state::check_url(&section.redis) {
        Err(message) => problem("redis", message),
        Ok(false) if section.ca.is_some() => problem(
            "ca",
            "set, but shared_state.redis is not rediss:// (TLS)".into(),
        ),
        Ok(_) => {}
    }
    if section.timeout.0.is_zero() || section.timeout.0 > MAX_SHARED_TIMEOUT {
        problem(
            "timeout",
            format!("must be more than 0 and at most {MAX_SHARED_TIMEOUT:?}"),
        );
    }
    if section.lease.0 < MIN_SHARED_LEASE {
        problem("lease", format!("must be at least {MIN_SHARED_LEASE:?}"));
    }
    let prefix_ok = section.key_prefix.len() <= MAX_KEY_PREFIX
        && section
            .key_prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if !prefix_ok {
        problem(
            "key_prefix",
            format!(
                "{:?} must be at most {MAX_KEY_PREFIX} letters, digits, '-', '_' or '.'",
                section.key_prefix
            ),
        );
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(SharedStateConfig {
        url: section.redis.clone(),
        password_file: section.password_file.as_ref().map(|p| base_dir.join(p)),
        ca: section.ca.as_ref().map(|p| base_dir.join(p)),
        timeout: section.timeout.0,
        key_prefix: section.key_prefix.clone(),
        lease: section.lease.0,
    })
}

/// The tracing filter mailfront runs with: the operator's (`log.level`, or `RUST_LOG`), with
/// `rustls=error` added unless it names rustls itself or its default level is `debug` or
/// `trace`. rustls logs a warning for what a peer sends (an alert, a message out of place, a
/// malformed hello), one per connection at whatever pace a client likes; each failed handshake
/// is already counted in `mailfront_tls_handshake_failures_total{reason}` and its cause is in
/// the session's close line, so rustls's lines are shown only where debug lines are.
pub fn log_filter(text: &str) -> String {
    use tracing::level_filters::LevelFilter;
    let mut names_rustls = false;
    let mut debug_by_default = false;
    for directive in text.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let target = directive
            .split(['[', '='])
            .next()
            .unwrap_or_default()
            .trim();
        if !directive.contains(['[', '='])
            && let Ok(level) = target.parse::<LevelFilter>()
        {
            debug_by_default = level >= LevelFilter::DEBUG;
        } else if target == "rustls" || target.starts_with("rustls::") {
            names_rustls = true;
        }
    }
    if names_rustls || debug_by_default {
        text.to_owned()
    } else if text.trim().is_empty() {
        "rustls=error".to_owned()
    } else {
        format!("{text},rustls=error")
    }
}

/// Whether every directive of a `log.level` filter names a level. `EnvFilter` takes a bare word
/// as a target (`warning` means "everything from the target `warning`"), so a misspelt level
/// would pass and the proxy would then log nothing at all: a bare word must be a level, and
/// `target=level` must end in one.
fn log_directives_have_levels(text: &str) -> bool {
    use tracing::level_filters::LevelFilter;
    text.split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .all(|directive| match directive.rsplit_once('=') {
            Some((_, level)) => level.trim().parse::<LevelFilter>().is_ok(),
            None if directive.contains('[') => true,
            None => directive.parse::<LevelFilter>().is_ok(),
        })
}

/// Reads and validates a config file, or the embedded default when `path` is `None`.
pub fn load(path: Option<&Path>) -> Result<RuntimeConfig, ConfigError> {
    load_hashed(path).map(|(config, _)| config)
}

/// As [`load`], with the [`content_hash`] of the text it was read from (what a reload compares
/// to notice a change: content, not mtimes, so a Kubernetes ConfigMap's symlink swap counts and
/// a `touch` does not).
pub fn load_hashed(path: Option<&Path>) -> Result<(RuntimeConfig, String), ConfigError> {
    match path {
        None => {
            let config = Config::from_yaml(EMBEDDED_DEFAULT)?.validate(Path::new("."))?;
            Ok((config, content_hash(EMBEDDED_DEFAULT.as_bytes())))
        }
        Some(path) => {
            let text = read_file(path)?;
            let hash = content_hash(text.as_bytes());
            let base = path.parent().unwrap_or(Path::new("."));
            Ok((Config::from_yaml(&text)?.validate(base)?, hash))
        }
    }
}

/// Reads a config file's text.
pub fn read_file(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Octets of SHA-256 kept in [`content_hash`]: 48 bits tell a config's versions apart (a
/// collision among the few hundred versions a deployment ever has is a one-in-a-billion event)
/// and keep the `mailfront_config_info` label short.
const CONTENT_HASH_OCTETS: usize = 6;

/// A short hex hash of a config file's content, for `mailfront_config_info{hash}` and to notice
/// a changed file.
pub fn content_hash(text: &[u8]) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, text);
    digest
        .as_ref()
        .iter()
        .take(CONTENT_HASH_OCTETS)
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(yaml: &str) -> Vec<ConfigProblem> {
        match Config::from_yaml(yaml).and_then(|c| c.validate(Path::new("/"))) {
            Err(ConfigError::Invalid(p)) => p,
            other => panic!("expected validation problems, got {other:?}"),
        }
    }

    /// A duration the parser refuses is reported on its own key, not only its section.
    #[test]
    fn a_bad_duration_names_its_key() {
        for (yaml, key) in [
            ("timeouts:\n  login: 1m\n  idle: 5x\n", "timeouts.idle: "),
            ("tls:\n  handshake_timeout: 5\n", "tls.handshake_timeout: "),
            (
                "listeners:\n  - name: a\n    backend_health:\n      interval: soon\n",
                "listeners[0].backend_health.interval: ",
            ),
        ] {
            let err = Config::from_yaml(&format!("hostname: mx.example.test\n{yaml}"))
                .unwrap_err()
                .to_string();
            assert!(err.starts_with(key), "{err}");
            assert!(err.contains("invalid duration"), "{err}");
        }
        // Other errors are as before.
        let err = Config::from_yaml("hostname: mx.example.test\ntimeouts:\n  idel: 5s\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `idel`"), "{err}");
    }

    const MINIMAL: &str = "hostname: mx.example.test\nlisteners:\n  - name: imaps\n    protocol: imap\n    listen: \"127.0.0.1:0\"\n    tls: implicit\n    backend: \"127.0.0.1:143\"\n";

    #[test]
    fn shipped_example_is_valid_and_is_the_embedded_default() {
        let config = load(None).unwrap();
        assert_eq!(config.hostname, "mx.example.test");
        assert_eq!(config.listeners.len(), 4);
        assert!(config.tls.certificates.is_empty());
        assert_eq!(config.timeouts.idle, Duration::from_secs(300));
        let on_disk =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config.yaml.example"))
                .unwrap();
        assert_eq!(on_disk, EMBEDDED_DEFAULT);
    }

    #[test]
    fn a_log_level_that_is_not_a_level_is_refused_not_taken_as_a_target() {
        for bad in [
            "warning",
            "notice",
            "verbose",
            "info,mailfront=loud",
            "Warn,x",
        ] {
            let keys: Vec<String> = problems(&format!("{MINIMAL}log:\n  level: \"{bad}\"\n"))
                .into_iter()
                .map(|p| p.key)
                .collect();
            assert_eq!(keys, ["log.level"], "{bad}");
        }
        for good in [
            "warn",
            "INFO",
            "info,mailfront=debug",
            "off",
            "error,rustls=warn",
        ] {
            let yaml = format!("{MINIMAL}log:\n  level: \"{good}\"\n");
            let config = Config::from_yaml(&yaml).unwrap().validate(Path::new("/"));
            assert!(config.is_ok(), "{good}");
        }
    }

    #[test]
    fn minimal_config_gets_documented_defaults() {
        let config = Config::from_yaml(MINIMAL)
            .unwrap()
            .validate(Path::new("/"))
            .unwrap();
        assert_eq!(config.tls.min_version, MinTlsVersion::Tls12);
        assert_eq!(config.tls.handshake_timeout, Duration::from_secs(10));
        assert_eq!(config.limits.smtp_line, 2048);
        assert_eq!(config.limits.imap_literal, 8192);
        assert_eq!(config.limits.connections_per_ip, 50);
        assert_eq!(config.limits.auth_failures_per_ip, 10);
        assert_eq!(
            config.limits.auth_failure_window,
            Duration::from_secs(10 * 60)
        );
        // The wait for the final reply to end of data is at least 10 minutes
        // (RFC 5321 §4.5.3.2.6).
        assert!(config.timeouts.data_reply >= Duration::from_secs(600));
        assert_eq!(config.listeners[0].max_connections, DEFAULT_MAX_CONNECTIONS);
        assert_eq!(config.metrics_listen, None);
        // Dovecot's login_timeout.
        assert_eq!(config.timeouts.login, Duration::from_secs(180));
    }

    #[test]
    fn session_tickets_are_bounded_and_a_key_file_needs_them() {
        let keys = |tls: &str| -> Vec<String> {
            problems(&format!("{MINIMAL}tls:\n{tls}"))
                .into_iter()
                .map(|p| p.key)
                .collect()
        };
        assert_eq!(keys("  session_tickets: 9\n"), ["tls.session_tickets"]);
        assert_eq!(
            keys("  session_tickets: 0\n  ticket_key_file: keys\n"),
            ["tls.ticket_key_file"]
        );
        let config = Config::from_yaml(&format!("{MINIMAL}tls:\n  ticket_key_file: t/keys\n"))
            .unwrap()
            .validate(Path::new("/etc/mailfront"))
            .unwrap();
        assert_eq!(config.tls.session_tickets, 2);
        assert_eq!(
            config.tls.ticket_key_file.as_deref(),
            Some(Path::new("/etc/mailfront/t/keys"))
        );
    }

    #[test]
    fn a_zero_login_timeout_is_refused_and_named() {
        let keys: Vec<String> = problems(&format!("{MINIMAL}timeouts:\n  login: 0s\n"))
            .into_iter()
            .map(|p| p.key)
            .collect();
        assert_eq!(keys, ["timeouts.login"]);
        let config = Config::from_yaml(&format!("{MINIMAL}timeouts:\n  login: 600ms\n"))
            .unwrap()
            .validate(Path::new("/"))
            .unwrap();
        assert_eq!(config.timeouts.login, Duration::from_millis(600));
    }

    #[test]
    fn the_auth_throttle_is_checked_and_zero_turns_it_off() {
        let keys: Vec<String> = problems(&format!(
            "{MINIMAL}limits:\n  auth_failures_per_ip: 101\n  auth_failure_window: 0s\n"
        ))
        .into_iter()
        .map(|p| p.key)
        .collect();
        assert_eq!(
            keys,
            ["limits.auth_failures_per_ip", "limits.auth_failure_window"]
        );
        let off = Config::from_yaml(&format!(
            "{MINIMAL}limits:\n  auth_failures_per_ip: 0\n  auth_failure_window: 0s\n"
        ))
        .unwrap()
        .validate(Path::new("/"))
        .unwrap();
        assert_eq!(off.limits.auth_failures_per_ip, 0);
    }

    #[test]
    fn the_listen_backlog_defaults_to_nginx_511_and_is_bounded() {
        let backlog = |yaml: &str| {
            Config::from_yaml(&format!("{MINIMAL}{yaml}"))
                .and_then(|c| c.validate(Path::new("/")))
                .map(|c| c.listen_backlog)
        };
        assert_eq!(backlog("").unwrap(), 511);
        assert_eq!(backlog("limits:\n  listen_backlog: 1\n").unwrap(), 1);
        assert_eq!(
            backlog("limits:\n  listen_backlog: 65535\n").unwrap(),
            65535
        );
        for bad in [0, 65536] {
            let found = problems(&format!("{MINIMAL}limits:\n  listen_backlog: {bad}\n"));
            assert_eq!(found.len(), 1, "{found:?}");
            assert_eq!(found[0].key, "limits.listen_backlog");
            assert!(found[0].message.contains("outside 1-65535"), "{found:?}");
        }
        // Not a number at all: a syntax error naming the key.
        let err = backlog("limits:\n  listen_backlog: -1\n").unwrap_err();
        assert!(err.to_string().contains("listen_backlog"), "{err}");
    }

    #[test]
    fn rustls_is_quiet_below_debug_unless_the_filter_names_it() {
        for (written, used) in [
            ("info", "info,rustls=error"),
            ("warn", "warn,rustls=error"),
            ("INFO", "INFO,rustls=error"),
            (
                "info,mailfront::smtp=debug",
                "info,mailfront::smtp=debug,rustls=error",
            ),
            // tokio_rustls is another crate.
            (
                "info,tokio_rustls=debug",
                "info,tokio_rustls=debug,rustls=error",
            ),
            ("", "rustls=error"),
            // A debug or trace default shows everything, rustls included.
            ("debug", "debug"),
            ("trace,hyper=info", "trace,hyper=info"),
            // Named: the operator's word stands.
            ("info,rustls=warn", "info,rustls=warn"),
            ("info,rustls::check=debug", "info,rustls::check=debug"),
            ("warn, rustls", "warn, rustls"),
            ("info,rustls[handshake]=warn", "info,rustls[handshake]=warn"),
        ] {
            assert_eq!(log_filter(written), used, "{written:?}");
            assert!(
                tracing_subscriber::EnvFilter::try_new(log_filter(written)).is_ok(),
                "{written:?}"
            );
        }
    }

    #[test]
    fn unknown_key_at_every_depth_is_refused_and_named() {
        let cases = [
            ("hostnme: x\n", "hostnme"),
            ("tls:\n  min_versoin: \"1.2\"\n", "min_versoin"),
            ("log:\n  colour: true\n", "colour"),
            ("timeouts:\n  idel: 5s\n", "idel"),
            ("limits:\n  smtp_lines: 5\n", "smtp_lines"),
            ("metrics:\n  listen: \"127.0.0.1:1\"\n  path: /m\n", "path"),
        ];
        for (extra, key) in cases {
            let yaml = format!("{MINIMAL}{extra}");
            let err = Config::from_yaml(&yaml).unwrap_err().to_string();
            assert!(err.contains(key), "{key}: {err}");
        }
        let in_listener =
            MINIMAL.replace("    tls: implicit\n", "    tls: implicit\n    backnd: x\n");
        assert!(
            Config::from_yaml(&in_listener)
                .unwrap_err()
                .to_string()
                .contains("backnd")
        );
    }

    #[test]
    fn every_bad_value_is_reported_at_once_with_its_key() {
        let yaml = "hostname: \"bad host\"\nlisteners:\n  - name: a\n    protocol: smtp\n    listen: \"nowhere\"\n    tls: implicit\n    backend: \"10.0.0.5\"\n  - name: a\n    protocol: imap\n    listen: \"[::1]:0\"\n    tls: implicit\n    backend: \"host:99999\"\n    require_tls_for_mail: true\nmetrics:\n  listen: \"localhost\"\nlimits:\n  smtp_line: 10\n";
        let keys: Vec<String> = problems(yaml).into_iter().map(|p| p.key).collect();
        for expected in [
            "hostname",
            "listeners[0].listen",
            "listeners[0].backend",
            "listeners[1].name",
            "listeners[1].backend",
            "listeners[1].require_tls_for_mail",
            "metrics.listen",
            "limits.smtp_line",
        ] {
            assert!(
                keys.iter().any(|k| k == expected),
                "{expected} missing from {keys:?}"
            );
        }
    }

    #[test]
    fn bad_enum_values_name_the_allowed_ones() {
        let err = Config::from_yaml(&MINIMAL.replace("protocol: imap", "protocol: nntp"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("smtp") && err.contains("listeners"), "{err}");
        let err = Config::from_yaml(&format!("{MINIMAL}tls:\n  min_version: \"1.1\"\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("1.2"), "{err}");
    }

    #[test]
    fn durations_parse_in_all_units_and_refuse_garbage() {
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("30s"), Some(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Some(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("1h0m5s"), Some(Duration::from_secs(3605)));
        assert_eq!(parse_duration("1m 30s"), None);
        assert_eq!(parse_duration(""), None);
        assert_eq!(parse_duration("5"), None);
        assert_eq!(parse_duration("s"), None);
        assert_eq!(parse_duration("5 fortnights"), None);
        assert_eq!(parse_duration("99999999999999999999h"), None);
    }

    #[test]
    fn backend_accepts_ipv4_ipv6_and_dns_names() {
        assert_eq!(
            parse_backend("10.0.0.5:587").unwrap().to_string(),
            "10.0.0.5:587"
        );
        assert_eq!(parse_backend("[::1]:143").unwrap().to_string(), "[::1]:143");
        assert_eq!(
            parse_backend("dovecot.mail.svc:143").unwrap().host,
            "dovecot.mail.svc"
        );
        assert!(parse_backend("dovecot").is_err());
        assert!(parse_backend("bad_name:1").is_err());
        assert!(parse_backend("-bad.example:1").is_err());
        assert!(parse_backend("bad-.example:1").is_err());
        assert!(parse_backend("a..b:1").is_err());
    }

    #[test]
    fn proxy_protocol_from_and_backend_client_info_default_off_and_are_checked() {
        let config = Config::from_yaml(MINIMAL)
            .unwrap()
            .validate(Path::new("/"))
            .unwrap();
        assert!(config.listeners[0].proxy_protocol_from.is_empty());
        assert!(!config.listeners[0].backend_client_info);
        let on = MINIMAL.replace(
            "    tls: implicit\n",
            "    tls: implicit\n    proxy_protocol_from: [\"10.0.0.0/8\", \"2001:db8::/32\", \"192.0.2.7\"]\n    backend_client_info: true\n",
        );
        let config = Config::from_yaml(&on)
            .unwrap()
            .validate(Path::new("/"))
            .unwrap();
        let l = &config.listeners[0];
        assert_eq!(l.proxy_protocol_from.len(), 3);
        assert!(l.backend_client_info);
        let bad = MINIMAL.replace(
            "    tls: implicit\n",
            "    tls: implicit\n    proxy_protocol_from: [\"10.0.0.0/8\", \"10.0.0.1/8\", \"lb\"]\n",
        );
        let keys: Vec<String> = problems(&bad).into_iter().map(|p| p.key).collect();
        assert_eq!(
            keys,
            [
                "listeners[0].proxy_protocol_from[1]",
                "listeners[0].proxy_protocol_from[2]"
            ]
        );
    }

    #[test]
    fn backend_proxy_protocol_defaults_off_and_takes_only_a_boolean() {
        let config = Config::from_yaml(MINIMAL)
            .unwrap()
            .validate(Path::new("/"))
            .unwrap();
        assert!(!config.listeners[0].backend_proxy_protocol);
        assert!(
            load(None)
                .unwrap()
                .listeners
                .iter()
                .all(|l| !l.backend_proxy_protocol),
            "the shipped listeners keep talking plain to their backends"
        );
        let on = MINIMAL.replace(
            "    tls: implicit\n",
            "    tls: implicit\n    backend_proxy_protocol: true\n",
        );
        let config = Config::from_yaml(&on)
            .unwrap()
            .validate(Path::new("/"))
            .unwrap();
        assert!(config.listeners[0].backend_proxy_protocol);
        let bad = MINIMAL.replace(
            "    tls: implicit\n",
            "    tls: implicit\n    backend_proxy_protocol: v2\n",
        );
        let err = Config::from_yaml(&bad).unwrap_err().to_string();
        assert!(err.contains("listeners"), "{err}");
    }

    #[test]
    fn relative_certificate_paths_resolve_against_the_config_directory() {
        let yaml = format!(
            "{MINIMAL}tls:\n  certificates:\n    - cert: tls/c.pem\n      key: tls/k.pem\n"
        );
        let config = Config::from_yaml(&yaml)
            .unwrap()
            .validate(Path::new("/etc/mailfront"))
            .unwrap();
        assert_eq!(
            config.tls.certificates[0].cert,
            Path::new("/etc/mailfront/tls/c.pem")
        );
    }
}
