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

// One module per section, each with its written form, its defaults (config.yaml.example
// documents the same values), its checked form and its `validate`; `Config::validate` runs
// them all and reports every problem at once.
mod backends;
mod limits;
mod listeners;
mod log;
mod shared_state;
mod timeouts;
mod tls;
pub use backends::MAX_BACKENDS;
pub use backends::{
    BackendHealthSection, BackendList, BackendTls, BackendTlsSection, Backends, Route,
    RouteSection, SniPattern, literal_socket_addr,
};
pub use limits::{
    DEFAULT_AUTH_FAILURE_WINDOW, DEFAULT_AUTH_FAILURES_PER_IP, DEFAULT_CONNECTIONS_PER_IP,
    DEFAULT_IMAP_LINE, DEFAULT_IMAP_LITERAL, DEFAULT_LISTEN_BACKLOG, DEFAULT_POP3_LINE,
    DEFAULT_PREAUTH_COMMANDS, DEFAULT_SMTP_LINE, Limits, LimitsSection, MAX_LISTEN_BACKLOG,
};
pub use listeners::{
    DEFAULT_LOOKUP_CONCURRENCY, DEFAULT_LOOKUP_TIMEOUT, DEFAULT_MAX_CONNECTIONS, ListenerConfig,
    ListenerSection, LookupUrl, UserLookup, UserLookupSection, UserRouting,
};
pub use log::{LogFormat, LogSection, MetricsSection, log_filter};
pub use shared_state::{
    DEFAULT_SHARED_LEASE, DEFAULT_SHARED_TIMEOUT, SharedStateConfig, SharedStateSection,
};
pub use timeouts::{
    DEFAULT_BACKEND_CONNECT, DEFAULT_DATA_REPLY, DEFAULT_IDLE, DEFAULT_LOGIN, DEFAULT_RELAY_IDLE,
    DEFAULT_SHUTDOWN_GRACE, Timeouts, TimeoutsSection,
};
pub use tls::{
    CertificateSection, DEFAULT_HANDSHAKE_TIMEOUT, DEFAULT_RELOAD_INTERVAL, MAX_SESSION_TICKETS,
    MinTlsVersion, TlsConfig, TlsSection,
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

/// Parses one `host:port` (an IP address, IPv6 in brackets, or a DNS name): a `backend` entry,
/// or a backend in a `user_map` file.
pub(crate) fn parse_backend(text: &str) -> Result<BackendAddress, String> {
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
        let tls = tls::validate(&self.tls, base_dir, &mut problem);
        let listeners = listeners::validate(&self.listeners, base_dir, &mut problem);
        let metrics_listen = log::validate_metrics(self.metrics.as_ref(), &mut problem);
        log::validate(&self.log, &mut problem);
        let timeouts = timeouts::validate(&self.timeouts, &mut problem);
        let limits = limits::validate(&self.limits, &mut problem);
        let shared_state = self
            .shared_state
            .as_ref()
            .and_then(|section| shared_state::validate(section, base_dir, &mut problem));

        if !problems.is_empty() {
            return Err(ConfigError::Invalid(problems));
        }
        Ok(RuntimeConfig {
            hostname: self.hostname.to_ascii_lowercase(),
            tls,
            listeners,
            metrics_listen,
            log_format: self.log.format,
            log_level: self.log.level,
            timeouts,
            limits,
            listen_backlog: self.limits.listen_backlog,
            shared_state,
        })
    }
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
