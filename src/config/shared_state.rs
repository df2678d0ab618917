//! `shared_state:`: the Redis or Valkey store where the replicas of one deployment keep the
//! counts behind `limits.auth_failures_per_ip` and `limits.connections_per_ip`; checked into a
//! [`SharedStateConfig`] without touching the network.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::ConfigDuration;

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

/// Checks `shared_state` without touching the network or the files (the files are read when
/// the client is built: at start, and by `mailfront check`). `problem(key, message)` gets each
/// fault, the key from the file's root (`shared_state.lease`); `None` when there was one.
pub(super) fn validate(
    section: &SharedStateSection,
    base_dir: &Path,
    problem: &mut dyn FnMut(String, String),
) -> Option<SharedStateConfig> {
    let mut ok = true;
    let mut problem = |key: &str, message: String| {
        ok = false;
        problem(format!("shared_state.{key}"), message);
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
    ok.then(|| SharedStateConfig {
        url: section.redis.clone(),
        password_file: section.password_file.as_ref().map(|p| base_dir.join(p)),
        ca: section.ca.as_ref().map(|p| base_dir.join(p)),
        timeout: section.timeout.0,
        key_prefix: section.key_prefix.clone(),
        lease: section.lease.0,
    })
}
