//! The backend keys of a listener: `backend` (one `host:port` or a list), `routes` (a backend
//! chosen by the client's SNI), `backend_tls` and `backend_health`, parsed and checked into a
//! [`Backends`] value the connection pool is built from.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::{BackendAddress, ConfigDuration, TlsMode};

/// Most addresses written under one `backend` key: enough for any real pool (a DNS name adds
/// its own addresses at run time), and a bound on what a typo in a generated file can cost.
pub const MAX_BACKENDS: usize = 64;
/// Most `routes` on one listener: every session walks them in order, so they stay a short list
/// (a hosting front with more customers uses `*.` wildcards).
pub const MAX_ROUTES: usize = 256;
/// Shortest active check interval: a check is a TCP connect and a greeting; more often than
/// once a second only loads the backend's logs.
pub const MIN_HEALTH_INTERVAL: Duration = Duration::from_secs(1);

/// `backend:` as written: one `host:port`, or a list of them, each a `host:port` or an
/// `{address, drain}` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum BackendList {
    One(String),
    Many(Vec<BackendItem>),
}

/// One item of a `backend:` list.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum BackendItem {
    Address(String),
    Entry(BackendEntrySection),
}

/// `{address: "10.0.0.5:143", drain: true}`: HAProxy's `set server state drain`. A draining
/// address takes no new sessions; the sessions it has go on until they end.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendEntrySection {
    pub address: String,
    #[serde(default)]
    pub drain: bool,
}

impl BackendList {
    /// Each item's `host:port` and whether it is marked drain.
    fn items(&self) -> Vec<(&str, bool)> {
        match self {
            BackendList::One(one) => vec![(one.as_str(), false)],
            BackendList::Many(many) => many
                .iter()
                .map(|item| match item {
                    BackendItem::Address(a) => (a.as_str(), false),
                    BackendItem::Entry(e) => (e.address.as_str(), e.drain),
                })
                .collect(),
        }
    }
}

/// One of `routes:`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSection {
    pub sni: String,
    pub backend: BackendList,
}

/// `backend_tls:`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendTlsSection {
    pub mode: TlsMode,
    #[serde(default)]
    pub ca: Option<PathBuf>,
    #[serde(default)]
    pub server_name: Option<String>,
}

/// `backend_health:`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendHealthSection {
    pub interval: ConfigDuration,
}

/// A `routes[].sni` pattern: an exact name, or `*.` plus a name, matching exactly one more
/// label (`*.example.com` matches `a.example.com`, not `example.com` nor `a.b.example.com`),
/// as certificate wildcards do (RFC 6125 §6.4.3). Kept lower-case; matched case-insensitively.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SniPattern {
    Exact(String),
    /// The part after `*.`.
    Wildcard(String),
}

impl SniPattern {
    pub fn parse(text: &str) -> Result<SniPattern, String> {
        let lower = text.to_ascii_lowercase();
        let (pattern, name) = match lower.strip_prefix("*.") {
            Some(rest) => (SniPattern::Wildcard(rest.to_owned()), rest),
            None => (SniPattern::Exact(lower.clone()), lower.as_str()),
        };
        if !crate::dns::is_host_name(name) || crate::dns::has_numeric_tld(name) {
            return Err(format!(
                "{text:?} is neither a DNS name nor \"*.\" followed by one (SNI carries only DNS names)"
            ));
        }
        Ok(pattern)
    }

    pub fn matches(&self, sni: &str) -> bool {
        match self {
            SniPattern::Exact(name) => sni.eq_ignore_ascii_case(name),
            SniPattern::Wildcard(parent) => sni.split_once('.').is_some_and(|(label, rest)| {
                !label.is_empty() && rest.eq_ignore_ascii_case(parent)
            }),
        }
    }
}

impl fmt::Display for SniPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SniPattern::Exact(name) => f.write_str(name),
            SniPattern::Wildcard(parent) => write!(f, "*.{parent}"),
        }
    }
}

/// A checked route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub sni: SniPattern,
    pub backend: Vec<BackendAddress>,
}

/// A checked `backend_tls`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendTls {
    pub mode: TlsMode,
    /// PEM bundle to verify against, resolved against the config directory; `None`: the
    /// system's roots.
    pub ca: Option<PathBuf>,
    /// The name checked in the backend's certificate; `None`: each backend's own host.
    pub server_name: Option<String>,
}

/// Where a listener's sessions go, after validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backends {
    /// `backend`: the default, for sessions no route matches.
    pub default: Vec<BackendAddress>,
    /// `routes`, in order: the first match wins.
    pub routes: Vec<Route>,
    pub tls: Option<BackendTls>,
    /// `backend_health.interval`; `None`: passive health only.
    pub health_interval: Option<Duration>,
    /// Entries written with `drain: true` (in `backend` or any route): no new sessions.
    pub draining: Vec<BackendAddress>,
}

impl Backends {
    /// One cleartext backend, no routes, no active checks: what a single `host:port` gives.
    pub fn single(address: BackendAddress) -> Backends {
        Backends {
            default: vec![address],
            routes: Vec::new(),
            tls: None,
            health_interval: None,
            draining: Vec::new(),
        }
    }

    /// Whether `address` is marked drain.
    pub fn is_draining(&self, address: &BackendAddress) -> bool {
        self.draining.contains(address)
    }

    /// The backends for a session whose client sent `sni`: the first matching route's, else the
    /// default.
    pub fn for_sni(&self, sni: Option<&str>) -> &[BackendAddress] {
        sni.and_then(|sni| self.routes.iter().find(|r| r.sni.matches(sni)))
            .map_or(&self.default, |r| &r.backend)
    }
}

impl fmt::Display for Backends {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |f: &mut fmt::Formatter<'_>, list: &[BackendAddress]| -> fmt::Result {
            for (i, address) in list.iter().enumerate() {
                if i > 0 {
                    f.write_str(",")?;
                }
                address.fmt(f)?;
                if self.is_draining(address) {
                    f.write_str("(drain)")?;
                }
            }
            Ok(())
        };
        list(f, &self.default)?;
        for route in &self.routes {
            write!(f, " {}=>", route.sni)?;
            list(f, &route.backend)?;
        }
        Ok(())
    }
}

/// The written backend keys of one listener.
pub struct Written<'a> {
    pub backend: &'a BackendList,
    pub routes: &'a [RouteSection],
    pub tls: Option<&'a BackendTlsSection>,
    pub health: Option<&'a BackendHealthSection>,
}

/// Checks one listener's backend keys; `problem(key, message)` gets each fault, the key relative
/// to the listener (`backend[1]`, `routes[0].sni`).
pub fn validate(
    written: &Written<'_>,
    base_dir: &Path,
    problem: &mut dyn FnMut(String, String),
) -> Option<Backends> {
    let mut draining = Vec::new();
    let default = addresses(written.backend, "backend", problem, &mut draining);
    if written.routes.len() > MAX_ROUTES {
        problem(
            "routes".into(),
            format!("{} routes; at most {MAX_ROUTES}", written.routes.len()),
        );
    }
    let mut routes = Vec::new();
    let mut ok = default.is_some();
    for (i, r) in written.routes.iter().enumerate() {
        let sni = SniPattern::parse(&r.sni)
            .map_err(|message| problem(format!("routes[{i}].sni"), message))
            .ok();
        let backend = addresses(
            &r.backend,
            &format!("routes[{i}].backend"),
            problem,
            &mut draining,
        );
        match (sni, backend) {
            (Some(sni), Some(backend)) => routes.push(Route { sni, backend }),
            _ => ok = false,
        }
    }
    let tls = written.tls.map(|t| {
        if let Some(name) = &t.server_name
            && !crate::dns::is_host_name(name)
            && name.parse::<std::net::IpAddr>().is_err()
        {
            problem(
                "backend_tls.server_name".into(),
                format!("{name:?} is neither a DNS name nor an IP address"),
            );
            ok = false;
        }
        BackendTls {
            mode: t.mode,
            ca: t.ca.as_ref().map(|ca| base_dir.join(ca)),
            server_name: t.server_name.as_ref().map(|n| n.to_ascii_lowercase()),
        }
    });
    let health_interval = written.health.map(|h| h.interval.0);
    if let Some(interval) = health_interval
        && interval < MIN_HEALTH_INTERVAL
    {
        problem(
            "backend_health.interval".into(),
            format!("{interval:?} is below the minimum of 1s"),
        );
        ok = false;
    }
    let default = default?;
    ok.then_some(Backends {
        default,
        routes,
        tls,
        health_interval,
        draining,
    })
}

/// One `backend` value: every entry parsed, none twice, at least one, at most [`MAX_BACKENDS`].
fn addresses(
    list: &BackendList,
    key: &str,
    problem: &mut dyn FnMut(String, String),
    draining: &mut Vec<BackendAddress>,
) -> Option<Vec<BackendAddress>> {
    let items = list.items();
    if items.is_empty() {
        problem(key.into(), "needs at least one host:port".into());
        return None;
    }
    if items.len() > MAX_BACKENDS {
        problem(
            key.into(),
            format!("{} entries; at most {MAX_BACKENDS}", items.len()),
        );
        return None;
    }
    let one = matches!(list, BackendList::One(_));
    let mut parsed = Vec::new();
    let mut ok = true;
    for (i, (item, drain)) in items.iter().enumerate() {
        let item_key = if one {
            key.to_owned()
        } else {
            format!("{key}[{i}]")
        };
        match super::parse_backend(item) {
            Ok(address) if parsed.contains(&address) => {
                problem(item_key, format!("{address} is listed twice"));
                ok = false;
            }
            Ok(address) => {
                if *drain && !draining.contains(&address) {
                    draining.push(address.clone());
                }
                parsed.push(address)
            }
            Err(message) => {
                problem(item_key, message);
                ok = false;
            }
        }
    }
    ok.then_some(parsed)
}

/// `SocketAddr` of an IP-literal backend, with no lookup.
pub fn literal_socket_addr(address: &BackendAddress) -> Option<SocketAddr> {
    address
        .host
        .parse::<std::net::IpAddr>()
        .ok()
        .map(|ip| SocketAddr::new(ip, address.port))
}

#[cfg(test)]
mod tests {
    use super::super::{Config, ConfigError};
    use super::*;

    const HEAD: &str = "hostname: mx.example.test\nlisteners:\n  - name: imaps\n    protocol: imap\n    listen: \"127.0.0.1:0\"\n    tls: implicit\n";

    fn load(extra: &str) -> Result<Backends, Vec<String>> {
        let config =
            Config::from_yaml(&format!("{HEAD}{extra}")).map_err(|e| vec![e.to_string()])?;
        match config.validate(Path::new("/etc/mailfront")) {
            Ok(mut c) => Ok(c.listeners.remove(0).backend),
            Err(ConfigError::Invalid(problems)) => {
                Err(problems.into_iter().map(|p| p.to_string()).collect())
            }
            Err(e) => Err(vec![e.to_string()]),
        }
    }

    #[test]
    fn backend_takes_one_address_or_a_list_and_the_other_keys_are_optional() {
        let one = load("    backend: \"10.0.0.1:143\"\n").unwrap();
        assert_eq!(one.default.len(), 1);
        assert!(one.routes.is_empty() && one.tls.is_none() && one.health_interval.is_none());
        let yaml = "    backend: [\"10.0.0.1:143\", \"dovecot.mail.svc.cluster.local:143\"]\n    routes:\n      - sni: \"*.Example.com\"\n        backend: \"10.0.0.9:143\"\n    backend_tls:\n      mode: starttls\n      ca: tls/ca.pem\n    backend_health:\n      interval: 5s\n";
        let many = load(yaml).unwrap();
        assert_eq!(many.default.len(), 2);
        assert_eq!(
            many.routes[0].sni,
            SniPattern::Wildcard("example.com".into())
        );
        let tls = many.tls.unwrap();
        assert_eq!(tls.mode, TlsMode::Starttls);
        assert_eq!(tls.ca.unwrap(), Path::new("/etc/mailfront/tls/ca.pem"));
        assert_eq!(tls.server_name, None);
        assert_eq!(many.health_interval, Some(Duration::from_secs(5)));
    }

    #[test]
    fn a_list_entry_may_be_marked_drain_and_the_string_form_still_works() {
        let yaml = "    backend: [{address: \"10.0.0.5:143\", drain: true}, \"10.0.0.6:143\", {address: \"10.0.0.7:143\"}]\n    routes:\n      - sni: a.example.com\n        backend: [{address: \"10.0.0.9:143\", drain: true}]\n";
        let backends = load(yaml).unwrap();
        assert_eq!(backends.default.len(), 3);
        let drained: Vec<String> = backends.draining.iter().map(ToString::to_string).collect();
        assert_eq!(drained, ["10.0.0.5:143", "10.0.0.9:143"]);
        assert_eq!(
            backends.to_string(),
            "10.0.0.5:143(drain),10.0.0.6:143,10.0.0.7:143 a.example.com=>10.0.0.9:143(drain)"
        );
        let typo = load("    backend: [{address: \"10.0.0.5:143\", drian: true}]\n").unwrap_err();
        assert!(typo.join(" ").contains("listeners"), "{typo:?}");
    }

    #[test]
    fn every_bad_backend_key_is_named() {
        let yaml = "    backend: [\"10.0.0.1:143\", \"nowhere\", \"10.0.0.1:143\"]\n    routes:\n      - sni: \"a.*.example\"\n        backend: []\n    backend_tls:\n      mode: implicit\n      server_name: \"bad name\"\n    backend_health:\n      interval: 100ms\n";
        let problems = load(yaml).unwrap_err();
        for key in [
            "listeners[0].backend[1]:",
            "listeners[0].backend[2]: 10.0.0.1:143 is listed twice",
            "listeners[0].routes[0].sni:",
            "listeners[0].routes[0].backend: needs at least one",
            "listeners[0].backend_tls.server_name:",
            "listeners[0].backend_health.interval:",
        ] {
            assert!(
                problems.iter().any(|p| p.starts_with(key)),
                "{key} in {problems:?}"
            );
        }
        for (extra, word) in [
            (
                "    backend: \"10.0.0.1:1\"\n    backend_tls:\n      mode: implicit\n      sni: x\n",
                "sni",
            ),
            (
                "    backend: \"10.0.0.1:1\"\n    routes:\n      - sni: a.example\n        backend: \"10.0.0.1:2\"\n        weight: 2\n",
                "weight",
            ),
            (
                "    backend: \"10.0.0.1:1\"\n    backend_health:\n      every: 1s\n",
                "every",
            ),
            (
                "    backend: \"10.0.0.1:1\"\n    backend_tls:\n      mode: always\n",
                "starttls",
            ),
        ] {
            let err = load(extra).unwrap_err().join("\n");
            assert!(err.contains(word), "{word}: {err}");
        }
    }

    #[test]
    fn sni_patterns_match_exact_names_and_one_wildcard_label() {
        let exact = SniPattern::parse("Mail.Example.COM").unwrap();
        let wild = SniPattern::parse("*.example.com").unwrap();
        let table = [
            (&exact, "mail.example.com", true),
            (&exact, "MAIL.example.com", true),
            (&exact, "x.mail.example.com", false),
            (&exact, "example.com", false),
            (&wild, "a.example.com", true),
            (&wild, "A.EXAMPLE.com", true),
            (&wild, "example.com", false),
            (&wild, "a.b.example.com", false),
            (&wild, ".example.com", false),
            (&wild, "aexample.com", false),
        ];
        for (pattern, sni, expected) in table {
            assert_eq!(pattern.matches(sni), expected, "{pattern} ~ {sni}");
        }
        for bad in [
            "",
            "*",
            "*.",
            "a.*.example.com",
            "**.example.com",
            "192.0.2.1",
            "*x.example.com",
            "bad_name.example",
        ] {
            assert!(SniPattern::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_first_matching_route_wins_and_the_default_takes_the_rest() {
        let a = |port| BackendAddress {
            host: "127.0.0.1".into(),
            port,
        };
        let backends = Backends {
            default: vec![a(1)],
            routes: vec![
                Route {
                    sni: SniPattern::parse("vip.example.com").unwrap(),
                    backend: vec![a(2)],
                },
                Route {
                    sni: SniPattern::parse("*.example.com").unwrap(),
                    backend: vec![a(3)],
                },
            ],
            tls: None,
            health_interval: None,
            draining: Vec::new(),
        };
        assert_eq!(backends.for_sni(Some("vip.example.com")), [a(2)]);
        assert_eq!(backends.for_sni(Some("other.example.com")), [a(3)]);
        assert_eq!(backends.for_sni(Some("example.com")), [a(1)]);
        assert_eq!(backends.for_sni(None), [a(1)]);
    }
}
