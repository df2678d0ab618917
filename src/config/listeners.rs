//! `listeners:`: each listener's name, protocol, address and TLS mode, its backend keys
//! (checked by [`super::backends`]), its user routing keys (`user_affinity`, `user_map`,
//! `user_lookup`, used by [`crate::routing`]), and its per-listener options; checked into
//! [`ListenerConfig`]s.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::backends::{
    self, BackendHealthSection, BackendList, BackendTlsSection, Backends, RouteSection,
};
use super::{ConfigDuration, Protocol, TlsMode};

/// Default cap on concurrent sessions per listener: an idle TLS session costs mailfront some
/// tens of KiB, so 10,000 fit in a few hundred MiB, and the cap keeps a flood from taking the
/// process (or the backend's process limit) down before it is noticed.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;

/// A listener name labels metrics and logs: 64 octets is plenty for a name and keeps label
/// values short.
const MAX_LISTENER_NAME: usize = 64;

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
    /// The backend chosen by a hash of the login name over `backend` (see
    /// [`crate::routing::affinity`]).
    #[serde(default)]
    pub user_affinity: bool,
    /// A YAML file mapping login names and `@domain`s to backends, relative to the config file.
    #[serde(default)]
    pub user_map: Option<PathBuf>,
    /// nginx's `auth_http` protocol: an HTTP service names each user's backend.
    #[serde(default)]
    pub user_lookup: Option<UserLookupSection>,
}

/// `user_lookup:` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserLookupSection {
    /// `http://host[:port]/path` or `https://…`.
    pub url: String,
    /// The whole lookup: a free slot, the connection, the request and the answer's head.
    #[serde(default)]
    pub timeout: Option<ConfigDuration>,
    /// Send the password as `Auth-Pass` (nginx always does; off by default here).
    #[serde(default)]
    pub send_password: bool,
    /// Networks an `Auth-Server` answer may name (CIDRs or bare addresses); absent: the
    /// addresses of the listener's own backends.
    #[serde(default)]
    pub allowed_backends: Option<Vec<String>>,
    /// Lookups in flight at once (and keep-alive connections kept) per listener and replica.
    #[serde(default)]
    pub max_concurrent: Option<usize>,
    /// PEM bundle that signs the lookup service's certificate (`https://` only); absent: the
    /// system's roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Extra request headers, nginx's `auth_http_header` (a shared secret, for instance).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

/// Default `user_lookup.timeout`: nginx's `auth_http_timeout` is 60 s, but a login that waits
/// that long has been given up by its client; a routing service that answers at all answers
/// within milliseconds.
pub const DEFAULT_LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest `user_lookup.timeout`: within `timeouts.login`'s spirit, a lookup may not hold a
/// login for more than a minute.
const MAX_LOOKUP_TIMEOUT: Duration = Duration::from_secs(60);
/// Default `user_lookup.max_concurrent`: a replica logging in 1,000 users a second against a
/// service answering in 20 ms has 20 lookups in flight; 32 covers that and bounds the sockets
/// (and idle keep-alive connections) one listener holds towards the service.
pub const DEFAULT_LOOKUP_CONCURRENCY: usize = 32;
/// Largest `user_lookup.max_concurrent`: each slot may hold a socket.
const MAX_LOOKUP_CONCURRENCY: usize = 1024;
/// Most `user_lookup.headers`, and the longest value: a shared secret or two, not a payload.
const MAX_LOOKUP_HEADERS: usize = 16;
const MAX_LOOKUP_HEADER_VALUE: usize = 1024;
/// The longest `user_lookup.url`: bounds what every request repeats.
const MAX_LOOKUP_URL: usize = 2048;
/// Header names mailfront writes itself; `user_lookup.headers` may not replace them.
const OWN_HEADERS: &[&str] = &[
    "host",
    "connection",
    "content-length",
    "transfer-encoding",
    "auth-method",
    "auth-user",
    "auth-pass",
    "auth-protocol",
    "auth-login-attempt",
    "client-ip",
    "client-port",
    "auth-ssl",
    "auth-ssl-protocol",
    "auth-ssl-cipher",
    "auth-smtp-helo",
];

/// How a listener chooses each user's backend, checked. All off by default: the listener's
/// pool (least connections) for everyone.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserRouting {
    /// `user_affinity`.
    pub affinity: bool,
    /// `user_map`, resolved against the config file's directory.
    pub map: Option<PathBuf>,
    /// `user_lookup`.
    pub lookup: Option<UserLookup>,
}

impl UserRouting {
    /// Whether any of the three is on (sessions then need the login name to pick a backend).
    pub fn is_on(&self) -> bool {
        self.affinity || self.map.is_some() || self.lookup.is_some()
    }
}

/// A checked `user_lookup`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserLookup {
    pub url: LookupUrl,
    pub timeout: Duration,
    pub send_password: bool,
    /// `None`: the addresses of the listener's own backends (`backend` and `routes`).
    pub allowed_backends: Option<Vec<crate::cidr::Network>>,
    pub max_concurrent: usize,
    /// Resolved against the config file's directory.
    pub ca_file: Option<PathBuf>,
    /// In the order written (sorted by name, as the YAML mapping was read).
    pub headers: Vec<(String, String)>,
}

/// A checked `user_lookup.url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LookupUrl {
    /// `https://`.
    pub tls: bool,
    /// A DNS name (lowercased) or an IP address (IPv6 without brackets).
    pub host: String,
    pub port: u16,
    /// The path and query, starting with `/`.
    pub path: String,
}

impl LookupUrl {
    /// Parses `http[s]://host[:port][/path[?query]]`: no user info (it would be sent nowhere),
    /// no fragment (RFC 9110 §4.2.1 leaves it out of requests).
    pub fn parse(text: &str) -> Result<LookupUrl, String> {
        if text.len() > MAX_LOOKUP_URL {
            return Err(format!("longer than {MAX_LOOKUP_URL} octets"));
        }
        let (tls, rest) = if let Some(rest) = strip_prefix_ignore_case(text, "http://") {
            (false, rest)
        } else if let Some(rest) = strip_prefix_ignore_case(text, "https://") {
            (true, rest)
        } else {
            return Err(format!("{text:?} is not an http:// or https:// URL"));
        };
        let (authority, path) = rest
            .find(['/', '?'])
            .and_then(|i| rest.split_at_checked(i))
            .unwrap_or((rest, "/"));
        if authority.contains('@') {
            return Err(format!(
                "{text:?}: user information in the URL is not supported; use user_lookup.headers"
            ));
        }
        let default_port = if tls { 443 } else { 80 };
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (ip, after) = v6
                .split_once(']')
                .ok_or_else(|| format!("{text:?}: unclosed \"[\""))?;
            let port = match after.strip_prefix(':') {
                Some(p) => Some(p),
                None if after.is_empty() => None,
                None => return Err(format!("{text:?}: bad port")),
            };
            let ip: std::net::Ipv6Addr = ip
                .parse()
                .map_err(|_| format!("{text:?}: {ip:?} is not an IPv6 address"))?;
            (ip.to_string(), port)
        } else {
            match authority.rsplit_once(':') {
                Some((host, port)) => (host.to_ascii_lowercase(), Some(port)),
                None => (authority.to_ascii_lowercase(), None),
            }
        };
        let port = match port {
            None => default_port,
            Some(p) => match p.parse::<u16>() {
                Ok(p) if p != 0 => p,
                _ => return Err(format!("{text:?}: bad port {p:?}")),
            },
        };
        let is_ip = host.parse::<std::net::IpAddr>().is_ok();
        if !is_ip && !crate::dns::is_host_name(&host) {
            return Err(format!(
                "{text:?}: {host:?} is neither an IP address nor a DNS name"
            ));
        }
        if path.contains('#') {
            return Err(format!("{text:?}: a fragment (#) is not sent; remove it"));
        }
        // RFC 3986 §3.3 and §3.4: pchar, "/" and "?"; percent-encode anything else.
        let path_ok = path
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/?%".contains(&b));
        if !path_ok {
            return Err(format!(
                "{text:?}: the path may hold only RFC 3986 characters (percent-encode the rest)"
            ));
        }
        let path = if path.starts_with('?') {
            format!("/{path}")
        } else {
            path.to_owned()
        };
        Ok(LookupUrl {
            tls,
            host,
            port,
            path,
        })
    }

    /// The `Host` header: the host, and the port when it is not the scheme's default.
    pub fn authority(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        let default_port = if self.tls { 443 } else { 80 };
        if self.port == default_port {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }
}

impl fmt::Display for LookupUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "https" } else { "http" };
        write!(f, "{scheme}://{}{}", self.authority(), self.path)
    }
}

fn strip_prefix_ignore_case<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    let head = text.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| text.get(prefix.len()..))
        .flatten()
}

/// A header name is an RFC 9110 §5.6.2 token.
fn is_token(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Checks `user_affinity`, `user_map` and `user_lookup` of one listener; `problem(key,
/// message)` gets each fault, the key relative to the listener.
fn validate_routing(
    l: &ListenerSection,
    base_dir: &Path,
    problem: &mut dyn FnMut(String, String),
) -> Option<UserRouting> {
    let mut ok = true;
    let mut problem = |key: &str, message: String| {
        ok = false;
        problem(key.to_owned(), message);
    };
    let lookup = l.user_lookup.as_ref().and_then(|section| {
        let url = LookupUrl::parse(&section.url)
            .map_err(|message| problem("user_lookup.url", message))
            .ok();
        let timeout = section.timeout.map_or(DEFAULT_LOOKUP_TIMEOUT, |t| t.0);
        if timeout.is_zero() || timeout > MAX_LOOKUP_TIMEOUT {
            problem(
                "user_lookup.timeout",
                format!("must be more than 0 and at most {MAX_LOOKUP_TIMEOUT:?}"),
            );
        }
        let max_concurrent = section
            .max_concurrent
            .unwrap_or(DEFAULT_LOOKUP_CONCURRENCY);
        if max_concurrent == 0 || max_concurrent > MAX_LOOKUP_CONCURRENCY {
            problem(
                "user_lookup.max_concurrent",
                format!("must be 1-{MAX_LOOKUP_CONCURRENCY}"),
            );
        }
        let allowed_backends = section.allowed_backends.as_ref().map(|list| {
            if list.is_empty() {
                problem(
                    "user_lookup.allowed_backends",
                    "empty: no answer could be used; leave it out for the listener's own backends"
                        .into(),
                );
            }
            let mut networks = Vec::new();
            for (i, net) in list.iter().enumerate() {
                match crate::cidr::Network::parse(net) {
                    Ok(n) => networks.push(n),
                    Err(message) => problem(&format!("user_lookup.allowed_backends[{i}]"), message),
                }
            }
            networks
        });
        if section.ca_file.is_some() && url.as_ref().is_some_and(|u| !u.tls) {
            problem(
                "user_lookup.ca_file",
                "set, but user_lookup.url is not https://".into(),
            );
        }
        if section.headers.len() > MAX_LOOKUP_HEADERS {
            problem(
                "user_lookup.headers",
                format!("{} headers; at most {MAX_LOOKUP_HEADERS}", section.headers.len()),
            );
        }
        let mut headers = Vec::new();
        for (name, value) in &section.headers {
            let key = format!("user_lookup.headers.{name}");
            if !is_token(name) {
                problem(&key, "a header name is letters, digits and -".into());
            } else if OWN_HEADERS.iter().any(|own| own.eq_ignore_ascii_case(name)) {
                problem(&key, "mailfront sets this header itself".into());
            }
            // RFC 9110 §5.5: visible characters, spaces and tabs inside.
            let value_ok = value.len() <= MAX_LOOKUP_HEADER_VALUE
                && value.trim() == value
                && value.bytes().all(|b| b == b' ' || b == b'\t' || b.is_ascii_graphic());
            if !value_ok {
                problem(
                    &key,
                    format!(
                        "a value is at most {MAX_LOOKUP_HEADER_VALUE} visible ASCII characters, no leading or trailing space"
                    ),
                );
            }
            headers.push((name.clone(), value.clone()));
        }
        url.map(|url| UserLookup {
            url,
            timeout,
            send_password: section.send_password,
            allowed_backends,
            max_concurrent,
            ca_file: section.ca_file.as_ref().map(|p| base_dir.join(p)),
            headers,
        })
    });
    ok.then(|| UserRouting {
        affinity: l.user_affinity,
        map: l.user_map.as_ref().map(|p| base_dir.join(p)),
        lookup,
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
    /// `user_affinity`, `user_map` and `user_lookup`: how the login name picks the backend.
    pub routing: UserRouting,
}

/// Checks every listener: names and addresses unique, each listener's own keys valid.
/// `problem(key, message)` gets each fault, the key from the file's root (`listeners[1].listen`).
/// A listener with a fault in its address or backend keys is left out of the result (the
/// caller refuses the whole file anyway).
pub(super) fn validate(
    written: &[ListenerSection],
    base_dir: &Path,
    problem: &mut dyn FnMut(String, String),
) -> Vec<ListenerConfig> {
    if written.is_empty() {
        problem(
            "listeners".into(),
            "at least one listener is required".into(),
        );
    }
    let mut listeners = Vec::new();
    let mut names = HashSet::new();
    let mut addresses = HashSet::new();
    for (i, l) in written.iter().enumerate() {
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
                Err(message) => problem(format!("{}[{i}]", key("proxy_protocol_from")), message),
            }
        }
        let routing = validate_routing(l, base_dir, &mut |field, message| {
            problem(key(&field), message)
        });
        if let (Some(listen), Some(backend), Some(routing)) = (listen, backend, routing) {
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
                routing,
            });
        }
    }
    listeners
}

#[cfg(test)]
mod tests {
    use super::super::{Config, ConfigError};
    use super::*;

    const HEAD: &str = "hostname: mx.example.test\nlisteners:\n  - name: imaps\n    protocol: imap\n    listen: \"127.0.0.1:0\"\n    tls: implicit\n    backend: [\"10.0.0.1:143\", \"dovecot.mail.svc:143\"]\n";

    fn load(extra: &str) -> Result<UserRouting, Vec<String>> {
        let config =
            Config::from_yaml(&format!("{HEAD}{extra}")).map_err(|e| vec![e.to_string()])?;
        match config.validate(Path::new("/etc/mailfront")) {
            Ok(mut c) => Ok(c.listeners.remove(0).routing),
            Err(ConfigError::Invalid(problems)) => {
                Err(problems.into_iter().map(|p| p.to_string()).collect())
            }
            Err(e) => Err(vec![e.to_string()]),
        }
    }

    #[test]
    fn user_routing_is_off_by_default() {
        let routing = load("").unwrap();
        assert_eq!(routing, UserRouting::default());
        assert!(!routing.is_on());
    }

    #[test]
    fn the_three_keys_and_their_defaults() {
        let routing = load("    user_affinity: true\n    user_map: maps/users.yaml\n    user_lookup:\n      url: \"http://auth.mail.svc:8080/auth?x=1\"\n").unwrap();
        assert!(routing.is_on() && routing.affinity);
        // Relative to the config file, as certificate and CA paths are.
        assert_eq!(
            routing.map.as_deref(),
            Some(Path::new("/etc/mailfront/maps/users.yaml"))
        );
        let lookup = routing.lookup.unwrap();
        assert_eq!(lookup.url.to_string(), "http://auth.mail.svc:8080/auth?x=1");
        assert_eq!(lookup.url.authority(), "auth.mail.svc:8080");
        assert_eq!(lookup.timeout, DEFAULT_LOOKUP_TIMEOUT);
        assert!(!lookup.send_password);
        assert_eq!(lookup.allowed_backends, None);
        assert_eq!(lookup.max_concurrent, DEFAULT_LOOKUP_CONCURRENCY);
        assert_eq!(lookup.ca_file, None);
        assert!(lookup.headers.is_empty());
        let full = load("    user_lookup:\n      url: \"https://[2001:db8::1]/\"\n      timeout: 250ms\n      send_password: true\n      allowed_backends: [\"10.0.0.0/24\", \"2001:db8::/64\"]\n      max_concurrent: 4\n      ca_file: auth-ca.pem\n      headers:\n        X-Auth-Key: \"s3cret value\"\n").unwrap();
        let lookup = full.lookup.unwrap();
        assert!(lookup.url.tls && lookup.send_password);
        assert_eq!(lookup.url.authority(), "[2001:db8::1]");
        assert_eq!(lookup.url.port, 443);
        assert_eq!(lookup.timeout, Duration::from_millis(250));
        assert_eq!(lookup.allowed_backends.unwrap().len(), 2);
        assert_eq!(lookup.max_concurrent, 4);
        assert_eq!(
            lookup.ca_file.as_deref(),
            Some(Path::new("/etc/mailfront/auth-ca.pem"))
        );
        assert_eq!(
            lookup.headers,
            [("X-Auth-Key".to_owned(), "s3cret value".to_owned())]
        );
    }

    #[test]
    fn every_bad_routing_key_is_named() {
        let yaml = "    user_affinity: yes please\n";
        assert!(load(yaml).unwrap_err().join(" ").contains("listeners"));
        let yaml = "    user_lookup:\n      url: \"ftp://auth/\"\n      timeout: 0s\n      max_concurrent: 0\n      allowed_backends: [\"10.0.0.1/8\"]\n      ca_file: x.pem\n      headers:\n        Auth-User: x\n        \"bad name\": x\n        X-Ok: \" padded\"\n";
        let problems = load(yaml).unwrap_err();
        for key in [
            "listeners[0].user_lookup.url:",
            "listeners[0].user_lookup.timeout:",
            "listeners[0].user_lookup.max_concurrent:",
            "listeners[0].user_lookup.allowed_backends[0]:",
            "listeners[0].user_lookup.headers.Auth-User: mailfront sets",
            "listeners[0].user_lookup.headers.bad name:",
            "listeners[0].user_lookup.headers.X-Ok:",
        ] {
            assert!(
                problems.iter().any(|p| p.starts_with(key)),
                "{key} in {problems:?}"
            );
        }
        let problems =
            load("    user_lookup:\n      url: \"http://auth/\"\n      ca_file: x.pem\n      allowed_backends: []\n")
                .unwrap_err();
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with("listeners[0].user_lookup.ca_file: set, but")),
            "{problems:?}"
        );
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with("listeners[0].user_lookup.allowed_backends: empty")),
            "{problems:?}"
        );
        let typo =
            load("    user_lookup:\n      url: \"http://auth/\"\n      send_pasword: true\n")
                .unwrap_err();
        assert!(typo.join(" ").contains("send_pasword"), "{typo:?}");
        let missing = load("    user_lookup:\n      timeout: 1s\n").unwrap_err();
        assert!(missing.join(" ").contains("url"), "{missing:?}");
    }

    #[test]
    fn lookup_urls_are_http_or_https_with_a_host_and_an_origin_form_path() {
        let ok = [
            ("http://auth", "http://auth/", "auth", 80, "/"),
            (
                "HTTP://Auth.Example:8080",
                "http://auth.example:8080/",
                "auth.example",
                8080,
                "/",
            ),
            (
                "https://auth.example/mail/auth?key=a%20b",
                "https://auth.example/mail/auth?key=a%20b",
                "auth.example",
                443,
                "/mail/auth?key=a%20b",
            ),
            (
                "http://127.0.0.1:9000?x",
                "http://127.0.0.1:9000/?x",
                "127.0.0.1",
                9000,
                "/?x",
            ),
            ("http://[::1]:81/a", "http://[::1]:81/a", "::1", 81, "/a"),
            (
                "https://auth.example:443/",
                "https://auth.example/",
                "auth.example",
                443,
                "/",
            ),
        ];
        for (text, shown, host, port, path) in ok {
            let url = LookupUrl::parse(text).unwrap();
            assert_eq!(url.to_string(), shown, "{text}");
            assert_eq!(
                (url.host.as_str(), url.port, url.path.as_str()),
                (host, port, path)
            );
        }
        for bad in [
            "auth:80/x",
            "ftp://auth/",
            "http://",
            "http://user:pw@auth/",
            "http://auth:0/",
            "http://auth:99999/",
            "http://auth/x#frag",
            "http://auth/a b",
            "http://bad_host/",
            "http://[::1/",
            "http://[zz]/",
            "http://auth:/",
        ] {
            assert!(LookupUrl::parse(bad).is_err(), "{bad}");
        }
        assert!(LookupUrl::parse(&format!("http://a/{}", "x".repeat(MAX_LOOKUP_URL))).is_err());
    }
}
