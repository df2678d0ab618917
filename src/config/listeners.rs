//! `listeners:`: each listener's name, protocol, address and TLS mode, its backend keys
//! (checked by [`super::backends`]), and its per-listener options; checked into
//! [`ListenerConfig`]s.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;

use serde::Deserialize;

use super::backends::{
    self, BackendHealthSection, BackendList, BackendTlsSection, Backends, RouteSection,
};
use super::{Protocol, TlsMode};

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
    listeners
}
