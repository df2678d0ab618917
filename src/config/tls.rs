//! `tls:`: the client-facing certificates, the lowest TLS version, the handshake's time limit,
//! how often certificate files are checked, and session tickets; checked into a [`TlsConfig`]
//! (the certificate files themselves are loaded and checked by [`crate::tls`]).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::ConfigDuration;

/// `tls.min_version`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum MinTlsVersion {
    #[serde(rename = "1.2")]
    Tls12,
    #[serde(rename = "1.3")]
    Tls13,
}

/// A client that has not finished the TLS handshake in 10 s is gone or stalling on purpose: a
/// real handshake takes a few round trips, well under a second even on a slow mobile link.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often certificate files are checked: a renewed certificate (cert-manager, certbot) is
/// in service within seconds, and reading two small files every 5 s costs nothing.
pub const DEFAULT_RELOAD_INTERVAL: Duration = Duration::from_secs(5);
/// Most TLS 1.3 tickets per handshake: each is about 200 octets of the server's flight, and a
/// mail client opens a handful of parallel connections at most.
pub const MAX_SESSION_TICKETS: usize = 8;

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

/// Checks `tls`; relative certificate and key paths are resolved against `base_dir`.
/// `problem(key, message)` gets each fault, the key from the file's root (`tls.reload_interval`).
pub(super) fn validate(
    section: &TlsSection,
    base_dir: &Path,
    problem: &mut dyn FnMut(String, String),
) -> TlsConfig {
    let certificates = section
        .certificates
        .iter()
        .map(|c| CertificateSection {
            cert: base_dir.join(&c.cert),
            key: base_dir.join(&c.key),
        })
        .collect::<Vec<_>>();
    if section.handshake_timeout.0.is_zero() {
        problem("tls.handshake_timeout".into(), "must be more than 0".into());
    }
    if section.reload_interval.0.is_zero() {
        problem("tls.reload_interval".into(), "must be more than 0".into());
    }
    if section.session_tickets > MAX_SESSION_TICKETS {
        problem(
            "tls.session_tickets".into(),
            format!("at most {MAX_SESSION_TICKETS} (0 turns tickets off)"),
        );
    }
    if section.ticket_key_file.is_some() && section.session_tickets == 0 {
        problem(
            "tls.ticket_key_file".into(),
            "set, but tls.session_tickets is 0: no ticket would use it".into(),
        );
    }
    TlsConfig {
        certificates,
        min_version: section.min_version,
        handshake_timeout: section.handshake_timeout.0,
        reload_interval: section.reload_interval.0,
        session_tickets: section.session_tickets,
        ticket_key_file: section.ticket_key_file.as_ref().map(|p| base_dir.join(p)),
    }
}
