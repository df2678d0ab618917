//! `user_lookup`: a client of nginx's `auth_http` protocol (ngx_mail_auth_http_module), so the
//! routing and authentication services operators already run for nginx mail answer mailfront
//! unchanged.
//!
//! **Request**: `GET <url path>` with `Host`, `Auth-Method` (nginx's spelling, see
//! [`method_name`]: `plain` for PLAIN, LOGIN and USER/PASS alike, `cram-md5`, `apop`,
//! `external`), `Auth-User` and, only with
//! `send_password: true`, `Auth-Pass` (both escaped as nginx does: space, `"`, `%`, `'`,
//! controls and octets above 0x7e as `%XX`), `Auth-Protocol` (`imap`, `pop3`, `smtp`),
//! `Auth-Login-Attempt`, `Client-IP`, `Client-Port`, on TLS `Auth-SSL: on` with
//! `Auth-SSL-Protocol` and `Auth-SSL-Cipher` (IANA names), for SMTP `Auth-SMTP-Helo` (escaped
//! likewise), then `user_lookup.headers` (nginx's `auth_http_header`). HTTP/1.1 with
//! keep-alive, where nginx sends HTTP/1.0 and closes; header names are written in title case
//! (`Client-Ip`), which HTTP compares case-insensitively (RFC 9110 §5.1).
//!
//! **Answer**: only the head counts (the body is read, at most [`MAX_BODY`] octets, and
//! ignored, as nginx ignores it). A status other than 2xx is a failure (nginx ignores the status
//! line; here a proxy's `502` page must not be read as an answer).
//! - `Auth-Status: OK` with `Auth-Server` (an IP address: nginx resolves nothing either) and
//!   `Auth-Port`: that backend, if the address is inside the allow-list
//!   (`user_lookup.allowed_backends`, by default the listener's own backends' addresses), else
//!   a failure: a compromised lookup cannot send users' passwords to a host of its choosing.
//! - `Auth-Status: OK` without either: the service has no opinion on the backend (an extension:
//!   nginx takes it as an error); the router goes on with `user_map`, then affinity or the pool.
//! - Any other `Auth-Status`: the login is refused with that text (at most [`MAX_TEXT`]
//!   printable characters); `Auth-Wait: N` (seconds, at most [`MAX_AUTH_WAIT`]) lets the client
//!   try again after N seconds, and without it the session ends, as in nginx; for SMTP
//!   `Auth-Error-Code` (`535 5.7.8`, checked) replaces the reply code.
//! - `Auth-Status: WAIT` (nginx: ask again after `Auth-Wait`) is not supported and is a failure.
//!   `Auth-User`/`Auth-Pass` in the answer (nginx logs in to the backend with them) are
//!   ignored: the client's own login command goes to the backend.
//!
//! Failures (no free slot within the timeout, unreachable, timed out, not 2xx, malformed, an
//! address outside the allow-list) are temporary: never a fallback to another backend.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper::client::conn::http1::{self, SendRequest};
use hyper::header::{HOST, HeaderName, HeaderValue};
use hyper::{HeaderMap, Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::{RouteRequest, RouteResult};
use crate::backend::tls::{BackendTlsClient, TlsSetupError};
use crate::config::{BackendAddress, Backends, LookupUrl, Protocol, TlsMode, UserLookup};

/// The answer's head, status line included: an `auth_http` answer is a handful of short
/// headers; a service sending more is broken or hostile, and this bounds what one costs.
pub const MAX_HEAD: usize = 16 * 1024;
/// Most header fields in an answer.
const MAX_HEADERS: usize = 64;
/// The answer's body is ignored; up to this much is read so the connection can be reused,
/// beyond it the connection is closed instead.
pub const MAX_BODY: usize = 16 * 1024;
/// Longest refusal text passed on to the client: a reply line, not a page.
pub const MAX_TEXT: usize = 200;
/// Longest `Auth-Wait` honoured: a refused client waits at most this before it may try again;
/// a service cannot park sessions for longer.
pub const MAX_AUTH_WAIT: Duration = Duration::from_secs(60);
/// An idle keep-alive connection is not reused after this: shorter than the usual server
/// keep-alive timeouts (nginx's 75 s, Node's 5 s is the exception the retry below covers), so a
/// reused connection is rarely one the server is closing.
const IDLE_REUSE: Duration = Duration::from_secs(30);
/// A connection is reused for at most this long after it opened, then closed: the service's
/// addresses (a Kubernetes Service, a DNS name) are looked up again at least this often.
const MAX_CONNECTION_AGE: Duration = Duration::from_secs(300);
/// How long a name in the listener's `backend` is trusted for the allow-list once resolved,
/// as the pool resolves it ([`crate::backend::pool::RESOLVE_INTERVAL`]).
const ALLOW_RESOLVE_INTERVAL: Duration = crate::backend::pool::RESOLVE_INTERVAL;

/// What the service answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// `Auth-Status: OK` naming an allowed backend.
    Backend(SocketAddr),
    /// `Auth-Status: OK` naming no backend: the rest of the routing order decides.
    NoBackend,
    /// Any other `Auth-Status`.
    Refused {
        text: String,
        /// SMTP only: `Auth-Error-Code`, checked (`4xx` or `5xx`, optionally with an enhanced
        /// status code); `None`: the protocol's usual authentication failure.
        smtp_code: Option<String>,
        /// `Auth-Wait`, when more than 0 (at most [`MAX_AUTH_WAIT`]).
        wait: Option<Duration>,
    },
}

/// Why a lookup gave no answer: all temporary failures.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    #[error("{0} lookups already in flight for the whole timeout")]
    Busy(usize),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("cannot connect to {url}: {detail}")]
    Connect { url: String, detail: String },
    #[error("{0}")]
    Http(String),
    #[error("HTTP status {0}: not an answer")]
    Status(u16),
    #[error("malformed answer: {0}")]
    Malformed(String),
    #[error("the request cannot be written: {0}")]
    Request(String),
    #[error("Auth-Server {0} is outside user_lookup.allowed_backends")]
    Disallowed(SocketAddr),
}

impl LookupError {
    /// The `result` label of `mailfront_user_routes_total{source="lookup"}`.
    pub fn result(&self) -> RouteResult {
        match self {
            LookupError::Busy(_) => RouteResult::Busy,
            LookupError::Timeout(_) => RouteResult::Timeout,
            LookupError::Disallowed(_) => RouteResult::Disallowed,
            LookupError::Connect { .. }
            | LookupError::Http(_)
            | LookupError::Status(_)
            | LookupError::Malformed(_)
            | LookupError::Request(_) => RouteResult::Error,
        }
    }
}

/// The networks an `Auth-Server` may be in.
enum Allowed {
    /// `user_lookup.allowed_backends`.
    Networks(Vec<crate::cidr::Network>),
    /// The listener's own backends: IP literals as they are, names as they resolve.
    Backends {
        literals: Vec<IpAddr>,
        names: Vec<BackendAddress>,
        /// The names' addresses and when they were looked up.
        resolved: Mutex<Option<(Instant, Vec<IpAddr>)>>,
    },
}

impl Allowed {
    fn new(lookup: &UserLookup, backends: &Backends) -> Allowed {
        if let Some(networks) = &lookup.allowed_backends {
            return Allowed::Networks(networks.clone());
        }
        let mut literals = Vec::new();
        let mut names = Vec::new();
        let all = backends
            .default
            .iter()
            .chain(backends.routes.iter().flat_map(|r| r.backend.iter()));
        for address in all {
            match address.host.parse::<IpAddr>() {
                Ok(ip) => literals.push(ip.to_canonical()),
                Err(_) if !names.contains(address) => names.push(address.clone()),
                Err(_) => {}
            }
        }
        Allowed::Backends {
            literals,
            names,
            resolved: Mutex::new(None),
        }
    }

    /// Whether `ip` may be used. Looks the listener's backend names up when their last answer
    /// is older than [`ALLOW_RESOLVE_INTERVAL`] (the caller bounds the wait); a failed lookup
    /// keeps the last answer.
    async fn allows(&self, ip: IpAddr) -> bool {
        let (literals, names, resolved) = match self {
            Allowed::Networks(networks) => return crate::cidr::any_contains(networks, ip),
            Allowed::Backends {
                literals,
                names,
                resolved,
            } => (literals, names, resolved),
        };
        if literals.contains(&ip) {
            return true;
        }
        if names.is_empty() {
            return false;
        }
        let lock = || resolved.lock().unwrap_or_else(PoisonError::into_inner);
        let fresh = lock()
            .as_ref()
            .filter(|(at, _)| at.elapsed() < ALLOW_RESOLVE_INTERVAL)
            .map(|(_, addrs)| addrs.contains(&ip));
        if let Some(found) = fresh {
            return found;
        }
        let mut addrs = Vec::new();
        let mut failed = false;
        for name in names {
            match tokio::net::lookup_host((name.host.as_str(), name.port)).await {
                Ok(found) => addrs.extend(found.map(|a| a.ip().to_canonical())),
                Err(_) => failed = true,
            }
        }
        let mut cached = lock();
        if failed && let Some((_, old)) = cached.as_ref() {
            addrs.extend(old.iter().copied());
        }
        addrs.sort();
        addrs.dedup();
        let found = addrs.contains(&ip);
        // Nothing at all (every lookup failed, no earlier answer): not kept, so the next
        // lookup asks again rather than refusing for a whole interval.
        if !(failed && addrs.is_empty()) {
            *cached = Some((Instant::now(), addrs));
        }
        found
    }
}

impl fmt::Debug for Allowed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Allowed::Networks(n) => f.debug_tuple("Networks").field(n).finish(),
            Allowed::Backends {
                literals, names, ..
            } => f
                .debug_struct("Backends")
                .field("literals", literals)
                .field("names", names)
                .finish_non_exhaustive(),
        }
    }
}

/// A keep-alive connection waiting for the next lookup.
struct Idle {
    sender: SendRequest<Empty<Bytes>>,
    opened: Instant,
    since: Instant,
}

/// One listener's `auth_http` client: a bounded pool of HTTP/1.1 keep-alive connections.
pub struct Lookup {
    url: LookupUrl,
    uri: Uri,
    host: HeaderValue,
    timeout: Duration,
    send_password: bool,
    max_concurrent: usize,
    allowed: Allowed,
    /// `https://`: verified against `ca_file` or the system roots, as `backend_tls` is.
    tls: ArcSwapOption<BackendTlsClient>,
    ca_file: Option<std::path::PathBuf>,
    headers: Vec<(HeaderName, HeaderValue)>,
    permits: Semaphore,
    idle: Mutex<Vec<Idle>>,
}

impl fmt::Debug for Lookup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lookup")
            .field("url", &self.url.to_string())
            .field("timeout", &self.timeout)
            .field("send_password", &self.send_password)
            .field("allowed", &self.allowed)
            .finish_non_exhaustive()
    }
}

/// Why a lookup client cannot be built (at start, by `mailfront check`, or by a reload).
#[derive(Debug, thiserror::Error)]
pub enum LookupSetupError {
    #[error("user_lookup.url {url}: {detail}")]
    Url { url: String, detail: String },
    #[error("user_lookup.headers.{name}: {detail}")]
    Header { name: String, detail: String },
    #[error("user_lookup.ca_file {path}: {detail}")]
    Ca { path: String, detail: String },
    #[error("user_lookup: no system root certificates found ({detail}); set ca_file")]
    NoSystemRoots { detail: String },
    #[error("user_lookup: {0}")]
    Rustls(String),
}

impl From<TlsSetupError> for LookupSetupError {
    fn from(e: TlsSetupError) -> LookupSetupError {
        match e {
            TlsSetupError::Ca { path, detail } => LookupSetupError::Ca {
                path: path.display().to_string(),
                detail,
            },
            TlsSetupError::NoSystemRoots { detail } => LookupSetupError::NoSystemRoots { detail },
            TlsSetupError::Rustls(e) => LookupSetupError::Rustls(e.to_string()),
        }
    }
}

impl Lookup {
    /// The client of `lookup` for a listener whose backends are `backends` (the default
    /// allow-list). Reads `ca_file` (blocking); connects to nothing.
    pub fn new(lookup: &UserLookup, backends: &Backends) -> Result<Lookup, LookupSetupError> {
        let url_error = |detail: String| LookupSetupError::Url {
            url: lookup.url.to_string(),
            detail,
        };
        let uri: Uri = lookup
            .url
            .path
            .parse()
            .map_err(|e: hyper::http::uri::InvalidUri| url_error(e.to_string()))?;
        let host =
            HeaderValue::from_str(&lookup.url.authority()).map_err(|e| url_error(e.to_string()))?;
        let mut headers = Vec::new();
        for (name, value) in &lookup.headers {
            let header_error = |detail: String| LookupSetupError::Header {
                name: name.clone(),
                detail,
            };
            let name =
                HeaderName::from_bytes(name.as_bytes()).map_err(|e| header_error(e.to_string()))?;
            let value = HeaderValue::from_str(value).map_err(|e| header_error(e.to_string()))?;
            headers.push((name, value));
        }
        let tls = if lookup.url.tls {
            Some(Arc::new(BackendTlsClient::new(&tls_settings(lookup))?))
        } else {
            None
        };
        Ok(Lookup {
            url: lookup.url.clone(),
            uri,
            host,
            timeout: lookup.timeout,
            send_password: lookup.send_password,
            max_concurrent: lookup.max_concurrent,
            allowed: Allowed::new(lookup, backends),
            tls: ArcSwapOption::new(tls),
            ca_file: lookup.ca_file.clone(),
            headers,
            permits: Semaphore::new(lookup.max_concurrent),
            idle: Mutex::new(Vec::new()),
        })
    }

    pub fn url(&self) -> &LookupUrl {
        &self.url
    }

    /// Re-reads `ca_file` (blocking): `Ok(true)` when it changed and new connections verify
    /// against it; an error keeps the bundle in service.
    pub fn reload_ca(&self) -> Result<bool, LookupSetupError> {
        let Some(current) = self.tls.load_full() else {
            return Ok(false);
        };
        if self.ca_file.is_none() {
            return Ok(false);
        }
        let settings = crate::config::BackendTls {
            mode: TlsMode::Implicit,
            ca: self.ca_file.clone(),
            server_name: None,
        };
        match current.reloaded(&settings)? {
            Some(next) => {
                self.tls.store(Some(Arc::new(next)));
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Asks the service about one login, all of it (a free slot, the connection, the request,
    /// the answer, the allow-list check) within `user_lookup.timeout`.
    pub async fn query(&self, request: &RouteRequest<'_>) -> Result<Answer, LookupError> {
        let deadline = Instant::now() + self.timeout;
        let Ok(permit) = tokio::time::timeout_at(deadline, self.permits.acquire()).await else {
            return Err(LookupError::Busy(self.max_concurrent));
        };
        // The semaphore is never closed; a closed one would refuse every lookup as busy.
        let Ok(_permit) = permit else {
            return Err(LookupError::Busy(self.max_concurrent));
        };
        match tokio::time::timeout_at(deadline, self.query_within(request)).await {
            Ok(result) => result,
            Err(_) => Err(LookupError::Timeout(self.timeout)),
        }
    }

    async fn query_within(&self, request: &RouteRequest<'_>) -> Result<Answer, LookupError> {
        let (status, headers) = self.exchange(request).await?;
        let answer = parse_answer(status, &headers, request.protocol)?;
        if let Answer::Backend(addr) = answer
            && !self.allowed.allows(addr.ip()).await
        {
            return Err(LookupError::Disallowed(addr));
        }
        Ok(answer)
    }

    /// One request and its answer's head: on an idle connection if one is ready, else on a new
    /// one. A reused connection the server closed before answering (it may have timed it out
    /// as it sat idle) is dropped and the request sent once more on a new one (a GET is
    /// idempotent, RFC 9110 §9.2.2); any other failure is the answer.
    async fn exchange(
        &self,
        request: &RouteRequest<'_>,
    ) -> Result<(StatusCode, HeaderMap), LookupError> {
        if let Some((mut sender, opened)) = self.take_idle().await {
            match sender.send_request(self.request(request)?).await {
                Ok(response) => return self.finish(sender, opened, response).await,
                Err(e) if e.is_canceled() || e.is_incomplete_message() => {}
                Err(e) => return Err(LookupError::Http(e.to_string())),
            }
        }
        let (mut sender, opened) = self.connect().await?;
        let response = sender
            .send_request(self.request(request)?)
            .await
            .map_err(|e| LookupError::Http(e.to_string()))?;
        self.finish(sender, opened, response).await
    }

    /// Reads the body (bounded) so the connection can serve the next lookup, and keeps it.
    async fn finish(
        &self,
        sender: SendRequest<Empty<Bytes>>,
        opened: Instant,
        response: hyper::Response<hyper::body::Incoming>,
    ) -> Result<(StatusCode, HeaderMap), LookupError> {
        let (parts, body) = response.into_parts();
        // Past the bound (or on an error) the connection is dropped, not reused; the head is
        // what counts either way.
        if Limited::new(body, MAX_BODY).collect().await.is_ok() {
            self.keep(sender, opened);
        }
        Ok((parts.status, parts.headers))
    }

    fn lock_idle(&self) -> std::sync::MutexGuard<'_, Vec<Idle>> {
        // Nothing panics while holding it; a poisoned list is still a list of connections.
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn keep(&self, sender: SendRequest<Empty<Bytes>>, opened: Instant) {
        let now = Instant::now();
        if sender.is_closed() || now.saturating_duration_since(opened) >= MAX_CONNECTION_AGE {
            return;
        }
        let mut idle = self.lock_idle();
        // At most one per slot: more could never be used at once.
        if idle.len() < self.max_concurrent {
            idle.push(Idle {
                sender,
                opened,
                since: now,
            });
        }
    }

    /// The most recently used idle connection that is still open, young enough and ready;
    /// stale ones are dropped (which closes them).
    async fn take_idle(&self) -> Option<(SendRequest<Empty<Bytes>>, Instant)> {
        loop {
            let mut idle = {
                let mut list = self.lock_idle();
                let now = Instant::now();
                list.retain(|i| {
                    !i.sender.is_closed()
                        && now.saturating_duration_since(i.since) < IDLE_REUSE
                        && now.saturating_duration_since(i.opened) < MAX_CONNECTION_AGE
                });
                list.pop()?
            };
            // Ready within moments when the last answer was read to its end; an error means
            // the server closed it.
            if idle.sender.ready().await.is_ok() {
                return Some((idle.sender, idle.opened));
            }
        }
    }

    /// A new connection (TLS up for `https://`), its driver spawned.
    async fn connect(&self) -> Result<(SendRequest<Empty<Bytes>>, Instant), LookupError> {
        let connect_error = |detail: String| LookupError::Connect {
            url: self.url.to_string(),
            detail,
        };
        let tcp = TcpStream::connect((self.url.host.as_str(), self.url.port))
            .await
            .map_err(|e| connect_error(e.to_string()))?;
        // One small request and answer per lookup: no reason for Nagle to hold either.
        let _ = tcp.set_nodelay(true);
        let opened = Instant::now();
        let sender = match self.tls.load_full() {
            None => handshake(tcp).await?,
            Some(tls) => {
                let stream = tls
                    .handshake(tcp, &self.url.host)
                    .await
                    .map_err(|e| connect_error(format!("TLS: {e}")))?;
                handshake(stream).await?
            }
        };
        Ok((sender, opened))
    }

    /// The `auth_http` request for one login.
    fn request(&self, r: &RouteRequest<'_>) -> Result<Request<Empty<Bytes>>, LookupError> {
        let value = |text: &str| {
            HeaderValue::from_str(text)
                .map_err(|_| LookupError::Request(format!("{text:?} is not a header value")))
        };
        let mut builder = Request::get(self.uri.clone())
            .header(HOST, self.host.clone())
            .header("Auth-Method", value(r.method)?)
            .header("Auth-User", value(&escape(r.user))?);
        if self.send_password
            && let Some(password) = r.password
        {
            builder = builder.header("Auth-Pass", value(&escape(password))?);
        }
        builder = builder
            .header("Auth-Protocol", r.protocol.as_str())
            .header("Auth-Login-Attempt", r.attempt)
            .header("Client-IP", r.client.ip().to_canonical().to_string())
            .header("Client-Port", r.client.port());
        if let Some((version, cipher)) = r.tls {
            builder = builder
                .header("Auth-SSL", "on")
                .header("Auth-SSL-Protocol", value(version)?)
                .header("Auth-SSL-Cipher", value(cipher)?);
        }
        if r.protocol == Protocol::Smtp
            && let Some(helo) = r.helo
        {
            builder = builder.header("Auth-SMTP-Helo", value(&escape(helo))?);
        }
        for (name, value) in &self.headers {
            builder = builder.header(name, value);
        }
        builder
            .body(Empty::new())
            .map_err(|e| LookupError::Request(e.to_string()))
    }
}

/// The TLS client settings of a lookup: `ca_file` or the system roots, the URL's host checked.
fn tls_settings(lookup: &UserLookup) -> crate::config::BackendTls {
    crate::config::BackendTls {
        mode: TlsMode::Implicit,
        ca: lookup.ca_file.clone(),
        server_name: None,
    }
}

/// The HTTP/1.1 handshake on `io` (nothing is exchanged yet), its connection driven by a task
/// of its own until either side closes it, and at most [`MAX_CONNECTION_AGE`] plus the longest
/// lookup.
async fn handshake<T>(io: T) -> Result<SendRequest<Empty<Bytes>>, LookupError>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = http1::Builder::new()
        .title_case_headers(true)
        .max_headers(MAX_HEADERS)
        .max_header_size(MAX_HEAD)
        .handshake(TokioIo::new(io))
        .await
        .map_err(|e| LookupError::Http(e.to_string()))?;
    let lifetime = MAX_CONNECTION_AGE + Duration::from_secs(60);
    tokio::spawn(async move {
        // An error here is the connection's end; the lookup using it sees it too.
        let _ = tokio::time::timeout(lifetime, connection).await;
    });
    Ok(sender)
}

/// nginx's `ngx_escape_uri(…, NGX_ESCAPE_MAIL_AUTH)`: space, `"`, `%`, `'`, the controls and
/// every octet above 0x7e as `%XX`; the rest as it is.
pub fn escape(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for &b in bytes {
        if b <= 0x20 || b >= 0x7f || matches!(b, b'"' | b'%' | b'\'') {
            out.push_str(&format!("%{b:02X}"));
        } else {
            out.push(char::from(b));
        }
    }
    out
}

/// nginx's `Auth-Method` spelling for a SASL mechanism or login command: `plain` for PLAIN,
/// LOGIN, IMAP LOGIN and POP3 USER/PASS (nginx sends `plain` for all of them), `apop`,
/// `cram-md5`, `external`; anything else lowercased (nginx has no spelling for SCRAM or
/// OAUTHBEARER, whose services must accept the mechanism's name).
pub fn method_name(mechanism: &str) -> String {
    let lower = mechanism.to_ascii_lowercase();
    match lower.as_str() {
        "plain" | "login" | "user" | "pass" => "plain".to_owned(),
        _ => lower,
    }
}

/// Reads the head of an answer.
fn parse_answer(
    status: StatusCode,
    headers: &HeaderMap,
    protocol: Protocol,
) -> Result<Answer, LookupError> {
    if !status.is_success() {
        return Err(LookupError::Status(status.as_u16()));
    }
    let text = |name: &str| -> Result<Option<&str>, LookupError> {
        headers
            .get(name)
            .map(|v| {
                v.to_str()
                    .map(str::trim)
                    .map_err(|_| LookupError::Malformed(format!("{name} is not ASCII")))
            })
            .transpose()
    };
    let Some(auth_status) = text("Auth-Status")? else {
        return Err(LookupError::Malformed("no Auth-Status".into()));
    };
    match auth_status {
        "OK" => {}
        "WAIT" => {
            return Err(LookupError::Malformed(
                "Auth-Status: WAIT is not supported".into(),
            ));
        }
        refused => {
            let wait = text("Auth-Wait")?
                .and_then(|w| w.parse::<u64>().ok())
                .filter(|&secs| secs > 0)
                .map(|secs| Duration::from_secs(secs).min(MAX_AUTH_WAIT));
            let smtp_code = if protocol == Protocol::Smtp {
                text("Auth-Error-Code")?
                    .filter(|code| is_smtp_error_code(code))
                    .map(str::to_owned)
            } else {
                None
            };
            return Ok(Answer::Refused {
                text: refusal_text(refused),
                smtp_code,
                wait,
            });
        }
    }
    match (text("Auth-Server")?, text("Auth-Port")?) {
        (None, None) => Ok(Answer::NoBackend),
        (Some(server), Some(port)) => {
            let host = server
                .strip_prefix('[')
                .and_then(|s| s.strip_suffix(']'))
                .unwrap_or(server);
            let ip: IpAddr = host.parse().map_err(|_| {
                LookupError::Malformed(format!(
                    "Auth-Server {:?} is not an IP address",
                    refusal_text(server)
                ))
            })?;
            let port = port
                .parse::<u16>()
                .ok()
                .filter(|&p| p != 0)
                .ok_or_else(|| {
                    LookupError::Malformed(format!(
                        "Auth-Port {:?} is not a port",
                        refusal_text(port)
                    ))
                })?;
            Ok(Answer::Backend(SocketAddr::new(ip.to_canonical(), port)))
        }
        (Some(_), None) => Err(LookupError::Malformed(
            "Auth-Server without Auth-Port".into(),
        )),
        (None, Some(_)) => Err(LookupError::Malformed(
            "Auth-Port without Auth-Server".into(),
        )),
    }
}

/// A refusal text fit for a reply line: printable ASCII, at most [`MAX_TEXT`] characters.
fn refusal_text(text: &str) -> String {
    let clean: String = text
        .chars()
        .filter(|c| c.is_ascii() && !c.is_ascii_control())
        .take(MAX_TEXT)
        .collect();
    let clean = clean.trim();
    if clean.is_empty() {
        "Authentication failed".to_owned()
    } else {
        clean.to_owned()
    }
}

/// An SMTP reply code for a failed AUTH: `4xx` or `5xx`, optionally followed by an enhanced
/// status code `class.subject.detail` whose class matches (RFC 5321 §4.2, RFC 3463 §2).
fn is_smtp_error_code(code: &str) -> bool {
    let (basic, enhanced) = match code.split_once(' ') {
        Some((b, e)) => (b, Some(e)),
        None => (code, None),
    };
    let basic_ok = basic.len() == 3
        && basic.bytes().all(|b| b.is_ascii_digit())
        && matches!(basic.as_bytes().first(), Some(b'4' | b'5'));
    let Some(enhanced) = enhanced else {
        return basic_ok;
    };
    let parts: Vec<&str> = enhanced.split('.').collect();
    basic_ok
        && parts.len() == 3
        && parts.first().copied() == basic.get(..1)
        && parts.iter().enumerate().all(|(i, p)| {
            let max = if i == 0 { 1 } else { 3 };
            !p.is_empty() && p.len() <= max && p.bytes().all(|b| b.is_ascii_digit())
        })
}

#[cfg(test)]
mod tests;
