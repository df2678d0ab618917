//! Counts shared by the replicas of one deployment, kept in Redis (≥ 6) or Valkey
//! (`shared_state`): the login attempts behind `limits.auth_failures_per_ip` and the
//! unauthenticated sessions behind `limits.connections_per_ip`. Without it each replica counts
//! alone, and N replicas give a password guesser N budgets.
//!
//! # Keys
//!
//! Every key starts `mailfront:` plus `key_prefix:` when one is set. A client address is written
//! as [`IpKey`] shows it (`192.0.2.1`, or `2001:db8:1:2::/64`), so IPv6 counts by /64 and NAT64
//! clients as their IPv4 address, as locally.
//! - `…auth:<address>`: a sorted set of login charges, scored by the Redis server's clock in
//!   milliseconds, members `<replica id>:<counter>`, expiring one window after its last charge.
//! - `…replicas`: a sorted set of live replicas, scored by when their lease runs out.
//! - `…conn:<replica id>`: a hash, field = address, value = that replica's unauthenticated
//!   sessions from it; expires with the replica's lease unless refreshed.
//!
//! Scripts read keys they are not given in `KEYS` (the live replicas' hashes): a single Redis or
//! Valkey server (with replicas or Sentinel behind one address) works, Redis Cluster does not.
//!
//! # Round trips
//!
//! - Login attempt from an address this replica already throttles: none (refused locally).
//! - Any other login attempt, while the store is up: one script call ([`CHARGE`]) before the
//!   login is forwarded. Its verdict needs the shared count, so this is the one round trip a
//!   successful login pays (`bench/shared_state.py` measures it).
//! - Refund (the login succeeded) and a failure verdict: no wait. The refund is a `ZREM` sent
//!   without waiting for its answer; a failure keeps the charge already taken.
//! - Accepted connection, with `connections_per_ip` on and the local count under the limit:
//!   one script call ([`ACQUIRE`]). Its release (login or close): none awaited.
//! - Every third of the lease: one script call per replica ([`REFRESH`]), which also rewrites
//!   the replica's hash from its own table, so a release lost in a blip heals within seconds.
//!
//! # Failure: open, loudly
//!
//! An operation that errs or takes longer than `timeout` marks the store down: it and every
//! later operation count locally, exactly as without `shared_state`, and nothing is refused
//! because of the outage. The transitions are logged once each (warn down, info up), the gauge
//! `mailfront_shared_state_up` shows the state and `mailfront_shared_state_fallbacks_total{op}`
//! counts the operations that counted locally. While down, a background task pings every second;
//! once it answers, operations use it again. The local counts kept meanwhile are not merged into
//! the store: charges taken alone stay local (and keep counting locally), sessions admitted alone
//! are not added to the shared total.
//!
//! # Password
//!
//! `password_file` (with an ACL user from the URL, or the default user) is read at start, and
//! again each time the background task finds the store down: a password is only sent when a
//! connection is made, so a rotated Secret matters once the store refuses or drops this
//! replica, and is then used for the next connection (`SharedState::renew_password`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use prometheus::{IntCounterVec, IntGauge, Opts, Registry};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ConnectionAddr, IntoConnectionInfo, Script};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tokio_util::sync::CancellationToken;
use zeroize::Zeroizing;

use crate::config::SharedStateConfig;
use crate::limits::IpKey;

/// Why `shared_state` cannot be set up (at start and in `mailfront check`; never for an
/// unreachable server, which only makes the replica count alone).
#[derive(Debug, thiserror::Error)]
pub enum SharedStateError {
    #[error("shared_state.redis: {0}")]
    Url(String),
    #[error("shared_state.password_file {path}: {detail}")]
    PasswordFile {
        path: std::path::PathBuf,
        detail: String,
    },
    #[error("shared_state.ca {path}: {detail}")]
    Ca {
        path: std::path::PathBuf,
        detail: String,
    },
    #[error("shared_state: {0}")]
    Client(String),
    #[error("shared_state metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// A password file is one line; a Secret mounted by mistake over something large is an error.
const MAX_PASSWORD_FILE: u64 = 4096;

/// How long building the first connection may take, in the background task: it runs off every
/// client's path, so it may be longer than `timeout`, but a black-holed address must not stall
/// the task past the next refresh.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// While the store is down, how often the background task tries it again: a returning store is
/// used within about a second.
const RETRY_INTERVAL: Duration = Duration::from_secs(1);

/// What a valid `shared_state.redis` looks like, checked without the network. `Ok(true)`: TLS.
pub fn check_url(url: &str) -> Result<bool, String> {
    let scheme_ok = ["redis://", "rediss://", "valkey://", "valkeys://"]
        .iter()
        .any(|s| url.starts_with(s));
    if !scheme_ok {
        return Err("must be redis://host:port/db or rediss://host:port/db (TLS)".into());
    }
    if url.contains("#insecure") {
        return Err("#insecure is refused: rediss:// always verifies the server".into());
    }
    let info = url
        .into_connection_info()
        .map_err(|_| "is not a valid Redis URL".to_string())?;
    match info.addr() {
        ConnectionAddr::Tcp(host, _) if !host.is_empty() => Ok(false),
        ConnectionAddr::TcpTls { host, .. } if !host.is_empty() => Ok(true),
        _ => Err("names no host".into()),
    }
}

/// Reads `password_file`: its content less one trailing newline.
fn read_password(path: &std::path::Path) -> Result<Zeroizing<String>, SharedStateError> {
    let fail = |detail: String| SharedStateError::PasswordFile {
        path: path.to_path_buf(),
        detail,
    };
    let meta = std::fs::metadata(path).map_err(|e| fail(e.to_string()))?;
    if !meta.is_file() {
        return Err(fail("not a regular file".into()));
    }
    if meta.len() > MAX_PASSWORD_FILE {
        return Err(fail(format!("larger than {MAX_PASSWORD_FILE} bytes")));
    }
    let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
    let password = text
        .strip_suffix("\r\n")
        .or_else(|| text.strip_suffix('\n'))
        .unwrap_or(&text);
    if password.is_empty() {
        return Err(fail("empty".into()));
    }
    if password.contains(['\r', '\n']) {
        return Err(fail("more than one line".into()));
    }
    Ok(Zeroizing::new(password.to_string()))
}

/// Reads `ca` and checks that it holds at least one certificate.
fn read_ca(path: &std::path::Path) -> Result<Vec<u8>, SharedStateError> {
    let fail = |detail: String| SharedStateError::Ca {
        path: path.to_path_buf(),
        detail,
    };
    let pem = std::fs::read(path).map_err(|e| fail(e.to_string()))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| fail(e.to_string()))?;
    if certs.is_empty() {
        return Err(fail("no CERTIFICATE in the file".into()));
    }
    Ok(pem)
}

/// Builds the client from the checked configuration, reading the password file and the CA;
/// connects to nothing. `mailfront check` calls it too.
pub fn client(config: &SharedStateConfig) -> Result<redis::Client, SharedStateError> {
    let password = config
        .password_file
        .as_deref()
        .map(read_password)
        .transpose()?;
    client_with(config, password.as_deref().map(String::as_str))
}

/// [`client`] with the password already read (`None`: the URL's, if any); reads the CA.
fn client_with(
    config: &SharedStateConfig,
    password: Option<&str>,
) -> Result<redis::Client, SharedStateError> {
    let tls = check_url(&config.url).map_err(SharedStateError::Url)?;
    let mut info = config
        .url
        .as_str()
        .into_connection_info()
        .map_err(|e| SharedStateError::Url(e.to_string()))?;
    if let Some(password) = password {
        let settings = info.redis_settings().clone().set_password(password);
        info = info.set_redis_settings(settings);
    }
    let built = match (&config.ca, tls) {
        (Some(ca), true) => redis::Client::build_with_tls(
            info,
            redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(read_ca(ca)?),
            },
        ),
        (Some(_), false) => {
            return Err(SharedStateError::Url(
                "ca is set but the URL is not rediss:// (TLS)".into(),
            ));
        }
        (None, _) => redis::Client::open(info),
    };
    built.map_err(|e| SharedStateError::Client(e.to_string()))
}

/// `try_charge` across replicas: drops the charges that left the window, then adds this one if
/// the address has fewer than the limit. The clock is the Redis server's (`TIME`; scripts are
/// replicated by effects since Redis 5), so the replicas' clocks do not matter.
/// KEYS[1] the address's set; ARGV limit, window in ms, charge id. Returns 1 granted, 0 refused.
pub const CHARGE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('ZADD', KEYS[1], now, ARGV[3])
  redis.call('PEXPIRE', KEYS[1], window)
  return 1
end
return 0
";

/// `try_acquire` across replicas: sums the address's sessions over the live replicas (those
/// whose lease has not run out) and counts one more for this replica if under the limit.
/// KEYS[1] the replica set, KEYS[2] this replica's hash; ARGV the hash key prefix, this replica's
/// id, the address, the limit, the lease in ms. Returns 1 granted, 0 refused.
pub const ACQUIRE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[5])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local total = tonumber(redis.call('HGET', KEYS[2], ARGV[3]) or '0') or 0
for _, replica in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  if replica ~= ARGV[2] then
    total = total + (tonumber(redis.call('HGET', ARGV[1] .. replica, ARGV[3]) or '0') or 0)
  end
end
if total >= tonumber(ARGV[4]) then
  return 0
end
redis.call('HINCRBY', KEYS[2], ARGV[3], 1)
redis.call('PEXPIRE', KEYS[2], lease)
redis.call('ZADD', KEYS[1], now + lease, ARGV[2])
redis.call('PEXPIRE', KEYS[1], lease)
return 1
";

/// Gives back one session slot. KEYS[1] this replica's hash; ARGV the address.
pub const RELEASE: &str = r"
local n = redis.call('HINCRBY', KEYS[1], ARGV[1], -1)
if n <= 0 then
  redis.call('HDEL', KEYS[1], ARGV[1])
end
return n
";

/// Renews this replica's lease and rewrites its hash from its own table of sessions counted in
/// the store, so a release lost in a network blip is healed. KEYS[1] the replica set, KEYS[2]
/// this replica's hash; ARGV this replica's id, the lease in ms, then address, count pairs.
pub const REFRESH: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[2])
redis.call('DEL', KEYS[2])
for i = 3, #ARGV - 1, 2 do
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
end
redis.call('PEXPIRE', KEYS[2], lease)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + lease, ARGV[1])
redis.call('PEXPIRE', KEYS[1], lease)
return 1
";

/// The operations counted in `mailfront_shared_state_fallbacks_total{op}`.
#[derive(Debug, Clone, Copy)]
pub enum Op {
    Charge,
    Refund,
    Acquire,
    Release,
}

impl Op {
    fn label(self) -> &'static str {
        match self {
            Op::Charge => "charge",
            Op::Refund => "refund",
            Op::Acquire => "acquire",
            Op::Release => "release",
        }
    }
}

/// The connection to the shared store and this replica's identity in it. Cheap to share
/// (`Arc`); the background task ([`SharedState::maintain`]) connects, renews the lease and
/// notices the store's return.
pub struct SharedState {
    /// Kept to read `password_file` again (see `SharedState::renew_password`).
    config: SharedStateConfig,
    /// The client, and the password from `password_file` it was built with.
    client: Mutex<(redis::Client, Option<Zeroizing<String>>)>,
    conn: Mutex<Option<ConnectionManager>>,
    up: AtomicBool,
    replica: String,
    /// `mailfront:` or `mailfront:<key_prefix>:`.
    prefix: String,
    timeout: Duration,
    lease: Duration,
    next_charge: AtomicU64,
    charge: Script,
    acquire: Script,
    release: Script,
    refresh: Script,
    up_gauge: IntGauge,
    fallbacks: IntCounterVec,
}

impl std::fmt::Debug for SharedState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedState")
            .field("replica", &self.replica)
            .field("prefix", &self.prefix)
            .field("up", &self.is_up())
            .finish_non_exhaustive()
    }
}

/// This process's id among the replicas: the pod name (`HOSTNAME`) for people reading the keys,
/// plus 32 random bits, so a restarted pod with the same name never reuses its predecessor's
/// charge ids or hash.
fn replica_id() -> String {
    let host: String = std::env::var("HOSTNAME")
        .unwrap_or_default()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
        .take(63)
        .collect();
    let host = if host.is_empty() {
        "mailfront".to_string()
    } else {
        host
    };
    format!("{host}-{:08x}", fastrand::u32(..))
}

impl SharedState {
    /// Builds the client (reading the password file and CA) and registers the metrics; does
    /// not connect: [`SharedState::maintain`] does, in the background.
    pub fn new(
        config: &SharedStateConfig,
        registry: &Registry,
    ) -> Result<Arc<SharedState>, SharedStateError> {
        let password = config
            .password_file
            .as_deref()
            .map(read_password)
            .transpose()?;
        let client = client_with(config, password.as_deref().map(String::as_str))?;
        let up_gauge = IntGauge::new(
            "mailfront_shared_state_up",
            "1 while the shared store (shared_state.redis) answers; 0 while this replica counts alone",
        )?;
        registry.register(Box::new(up_gauge.clone()))?;
        let fallbacks = IntCounterVec::new(
            Opts::new(
                "mailfront_shared_state_fallbacks_total",
                "Operations on the shared counts that this replica did alone because the store was down or slow",
            ),
            &["op"],
        )?;
        registry.register(Box::new(fallbacks.clone()))?;
        for op in [Op::Charge, Op::Refund, Op::Acquire, Op::Release] {
            fallbacks.with_label_values(&[op.label()]);
        }
        let prefix = if config.key_prefix.is_empty() {
            "mailfront:".to_string()
        } else {
            format!("mailfront:{}:", config.key_prefix)
        };
        Ok(Arc::new(SharedState {
            config: config.clone(),
            client: Mutex::new((client, password)),
            conn: Mutex::new(None),
            up: AtomicBool::new(false),
            replica: replica_id(),
            prefix,
            timeout: config.timeout,
            lease: config.lease,
            next_charge: AtomicU64::new(0),
            charge: Script::new(CHARGE),
            acquire: Script::new(ACQUIRE),
            release: Script::new(RELEASE),
            refresh: Script::new(REFRESH),
            up_gauge,
            fallbacks,
        }))
    }

    /// This replica's id in the store.
    pub fn replica(&self) -> &str {
        &self.replica
    }

    /// Whether operations go to the store now.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    fn redis_client(&self) -> redis::Client {
        self.client
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .0
            .clone()
    }

    /// While the store is down: reads `password_file` again and, when its content changed (a
    /// rotated Secret), rebuilds the client with it and drops the connection, so the next
    /// attempt authenticates with the new password. A password is only ever sent when a
    /// connection is made, and an authenticated connection outlives a password change on the
    /// server; so the file matters when the store refused or dropped this replica, which is
    /// when it is read. A file that cannot be read keeps the password in use (logged at debug
    /// level: the outage itself is logged already).
    fn renew_password(&self) {
        let Some(path) = &self.config.password_file else {
            return;
        };
        let password = match read_password(path) {
            Ok(password) => password,
            Err(e) => {
                tracing::debug!(error = %e, "shared_state.password_file: cannot read it again; keeping the password in use");
                return;
            }
        };
        let mut current = self.client.lock().unwrap_or_else(PoisonError::into_inner);
        if current.1.as_ref() == Some(&password) {
            return;
        }
        match client_with(&self.config, Some(&password)) {
            Ok(client) => {
                *current = (client, Some(password));
                drop(current);
                *self.conn.lock().unwrap_or_else(PoisonError::into_inner) = None;
                tracing::info!(path = %path.display(), "shared_state.password_file changed: connecting with the new password");
            }
            Err(e) => {
                tracing::debug!(error = %e, "shared_state: cannot rebuild the client; keeping the password in use");
            }
        }
    }

    fn connection(&self) -> Option<ConnectionManager> {
        self.conn
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn mark_up(&self) {
        if !self.up.swap(true, Ordering::Relaxed) {
            self.up_gauge.set(1);
            tracing::info!(replica = %self.replica, "shared state store reachable: counting limits across replicas");
        }
    }

    fn mark_down(&self, error: &str) {
        if self.up.swap(false, Ordering::Relaxed) {
            self.up_gauge.set(0);
            tracing::warn!(replica = %self.replica, error, "shared state store unreachable: this replica counts limits alone until it returns");
        }
    }

    /// Counts `op` as done alone.
    fn fell_back(&self, op: Op) {
        self.fallbacks.with_label_values(&[op.label()]).inc();
    }

    /// Runs one store call within `timeout`; `None` (counted and, on an error, marking the store
    /// down) when the store is down, errs or is slow.
    async fn call<T, F, Fut>(&self, op: Op, f: F) -> Option<T>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let conn = match self.connection() {
            Some(conn) if self.is_up() => conn,
            _ => {
                self.fell_back(op);
                return None;
            }
        };
        match tokio::time::timeout(self.timeout, f(conn)).await {
            Ok(Ok(value)) => Some(value),
            Ok(Err(e)) => {
                self.mark_down(&e.to_string());
                self.fell_back(op);
                None
            }
            Err(_) => {
                self.mark_down("timed out");
                self.fell_back(op);
                None
            }
        }
    }

    fn auth_key(&self, key: IpKey) -> String {
        format!("{}auth:{key}", self.prefix)
    }

    fn replicas_key(&self) -> String {
        format!("{}replicas", self.prefix)
    }

    fn conn_key(&self) -> String {
        format!("{}conn:{}", self.prefix, self.replica)
    }

    /// A charge id unique across replicas and restarts.
    pub fn charge_id(&self) -> String {
        let n = self.next_charge.fetch_add(1, Ordering::Relaxed);
        format!("{}:{n}", self.replica)
    }

    /// One login attempt charged in the store ([`CHARGE`]): `Some(true)` granted, `Some(false)`
    /// refused, `None` when the store could not answer (count alone).
    pub async fn charge(&self, key: IpKey, id: &str, limit: u32, window: Duration) -> Option<bool> {
        let set = self.auth_key(key);
        let window_ms = u64::try_from(window.as_millis()).unwrap_or(u64::MAX).max(1);
        let script = &self.charge;
        self.call(Op::Charge, |mut conn| async move {
            script
                .key(set)
                .arg(limit)
                .arg(window_ms)
                .arg(id)
                .invoke_async::<i64>(&mut conn)
                .await
        })
        .await
        .map(|granted| granted == 1)
    }

    /// Gives back a charge (`ZREM`), without waiting for the answer.
    pub fn refund(self: &Arc<Self>, key: IpKey, id: String) {
        let this = self.clone();
        spawn(async move {
            let set = this.auth_key(key);
            this.call(Op::Refund, |mut conn| async move {
                redis::cmd("ZREM")
                    .arg(set)
                    .arg(id)
                    .query_async::<i64>(&mut conn)
                    .await
            })
            .await;
        });
    }

    /// One more unauthenticated session from `key` on this replica, if the live replicas hold
    /// fewer than `limit` ([`ACQUIRE`]). `None`: count alone.
    pub async fn acquire(&self, key: IpKey, limit: u32) -> Option<bool> {
        let replicas = self.replicas_key();
        let own = self.conn_key();
        let hash_prefix = format!("{}conn:", self.prefix);
        let lease_ms = self.lease_ms();
        let script = &self.acquire;
        let replica = self.replica.clone();
        self.call(Op::Acquire, |mut conn| async move {
            script
                .key(replicas)
                .key(own)
                .arg(hash_prefix)
                .arg(replica)
                .arg(key.to_string())
                .arg(limit)
                .arg(lease_ms)
                .invoke_async::<i64>(&mut conn)
                .await
        })
        .await
        .map(|granted| granted == 1)
    }

    /// Gives back a session slot ([`RELEASE`]), without waiting for the answer.
    pub fn release(self: &Arc<Self>, key: IpKey) {
        let this = self.clone();
        spawn(async move {
            let own = this.conn_key();
            let script = &this.release;
            this.call(Op::Release, |mut conn| async move {
                script
                    .key(own)
                    .arg(key.to_string())
                    .invoke_async::<i64>(&mut conn)
                    .await
            })
            .await;
        });
    }

    fn lease_ms(&self) -> u64 {
        u64::try_from(self.lease.as_millis())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    /// Connects if not connected yet, renews the lease and rewrites this replica's hash from
    /// `slots`; marks the store up or down by the outcome.
    async fn refresh_once(&self, slots: &[(IpKey, u32)]) {
        if !self.is_up() {
            self.renew_password();
        }
        let conn = match self.connection() {
            Some(conn) => conn,
            None => {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(CONNECT_TIMEOUT))
                    .set_response_timeout(Some(self.timeout))
                    .set_number_of_retries(1);
                let made = tokio::time::timeout(
                    CONNECT_TIMEOUT,
                    ConnectionManager::new_with_config(self.redis_client(), config),
                )
                .await;
                match made {
                    Ok(Ok(conn)) => {
                        *self.conn.lock().unwrap_or_else(PoisonError::into_inner) =
                            Some(conn.clone());
                        conn
                    }
                    Ok(Err(e)) => return self.mark_down(&e.to_string()),
                    Err(_) => return self.mark_down("connect timed out"),
                }
            }
        };
        let mut invocation = self.refresh.key(self.replicas_key());
        invocation
            .key(self.conn_key())
            .arg(&self.replica)
            .arg(self.lease_ms());
        for (key, count) in slots {
            invocation.arg(key.to_string()).arg(*count);
        }
        let mut conn = conn;
        // A refresh carries the whole table: allow it more than one operation's timeout.
        let limit = self.timeout.max(Duration::from_millis(500));
        match tokio::time::timeout(limit, invocation.invoke_async::<i64>(&mut conn)).await {
            Ok(Ok(_)) => self.mark_up(),
            Ok(Err(e)) => self.mark_down(&e.to_string()),
            Err(_) => self.mark_down("timed out"),
        }
    }

    /// The background task: connects, renews this replica's lease every third of it (with the
    /// table of sessions counted in the store, from `slots`), retries every second while the
    /// store is down, and on shutdown removes this replica's hash so its slots free at once.
    pub async fn maintain<S>(self: Arc<Self>, slots: S, shutdown: CancellationToken)
    where
        S: Fn() -> Vec<(IpKey, u32)> + Send + Sync + 'static,
    {
        let period = self.lease / 3;
        loop {
            self.refresh_once(&slots()).await;
            let wait = if self.is_up() {
                period
            } else {
                RETRY_INTERVAL.min(period)
            };
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(wait) => {}
            }
        }
        if let Some(mut conn) = self.connection().filter(|_| self.is_up()) {
            let own = self.conn_key();
            let replicas = self.replicas_key();
            let gone = async {
                redis::cmd("DEL")
                    .arg(&own)
                    .query_async::<i64>(&mut conn)
                    .await?;
                redis::cmd("ZREM")
                    .arg(&replicas)
                    .arg(&self.replica)
                    .query_async::<i64>(&mut conn)
                    .await
            };
            let _ = tokio::time::timeout(self.timeout, gone).await;
        }
    }

    /// Pings the store once (`mailfront check --online`).
    pub async fn ping(&self) -> Result<(), SharedStateError> {
        let attempt = async {
            let mut conn = self
                .redis_client()
                .get_multiplexed_async_connection()
                .await?;
            redis::cmd("PING").query_async::<String>(&mut conn).await
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, attempt).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(SharedStateError::Client(e.to_string())),
            Err(_) => Err(SharedStateError::Client("timed out".into())),
        }
    }
}

/// Spawns fire-and-forget work on the current runtime, if there is one (a guard dropped outside
/// tokio, as at process exit, has nothing to tell the store: the lease frees its slots).
fn spawn<F>(work: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    if let Ok(handle) = tokio::runtime::Handle::try_current() {
        handle.spawn(work);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(check_url("redis://127.0.0.1:6379/0"), Ok(false));
        assert_eq!(check_url("rediss://redis.example:6380/1"), Ok(true));
        assert_eq!(check_url("redis://user:pw@valkey:6379"), Ok(false));
        assert!(check_url("http://x").is_err());
        assert!(check_url("redis+unix:///tmp/x").is_err());
        assert!(check_url("rediss://h:1/#insecure").is_err());
        assert!(check_url("redis://").is_err());
        assert!(check_url("").is_err());
    }

    #[test]
    fn password_file_is_one_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pw");
        std::fs::write(&path, "s3cret\n").unwrap();
        assert_eq!(read_password(&path).unwrap().as_str(), "s3cret");
        std::fs::write(&path, "a\nb\n").unwrap();
        assert!(read_password(&path).is_err());
        std::fs::write(&path, "").unwrap();
        assert!(read_password(&path).is_err());
        assert!(read_password(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn ca_must_hold_a_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, "not a pem").unwrap();
        assert!(read_ca(&path).is_err());
        let config = SharedStateConfig {
            url: "redis://127.0.0.1:1".into(),
            password_file: None,
            ca: Some(path),
            timeout: Duration::from_millis(50),
            key_prefix: String::new(),
            lease: Duration::from_secs(15),
        };
        assert!(client(&config).is_err(), "ca without rediss://");
    }
}
