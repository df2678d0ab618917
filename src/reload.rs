//! What a configuration reload would change: the difference between the configuration in
//! service and a new, validated one, as a [`Plan`] the server applies and `mailfront check
//! --against` prints. Pure: no sockets, no files, no clock.
//!
//! Every key either applies in place, applies to sessions that start afterwards, or is named
//! in [`Plan::needs_restart`]; none is silently ignored.

use crate::config::{ListenerConfig, RuntimeConfig};

/// The changes from one configuration to the next.
#[derive(Debug, Default)]
pub struct Plan {
    /// Listeners to bind and start.
    pub added: Vec<ListenerConfig>,
    /// Listeners (by name) that stop accepting; their sessions go on.
    pub removed: Vec<String>,
    /// Listeners kept whose address changed: bound anew, the old socket closed.
    pub rebound: Vec<String>,
    /// The TLS server settings (`tls.*` but the reload interval, or `hostname`) changed:
    /// new handshakes use new ones.
    pub tls: bool,
    /// The certificate list or `hostname` (the self-signed fallback's name) changed.
    pub certificates: bool,
    /// `tls.ticket_key_file` names another file.
    pub ticket_keys: bool,
    /// The new `log.level`, when it changed.
    pub log_level: Option<String>,
    /// One line per change, as logged and printed.
    pub changes: Vec<String>,
    /// One line per change that takes a restart.
    pub needs_restart: Vec<String>,
}

impl Plan {
    /// Nothing to do.
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty() && self.needs_restart.is_empty()
    }
}

/// Compares the configuration in service (`old`) with `new`.
pub fn plan(old: &RuntimeConfig, new: &RuntimeConfig) -> Plan {
    let mut plan = Plan::default();
    let find = |list: &[ListenerConfig], name: &str| list.iter().find(|l| l.name == name).cloned();

    for l in &old.listeners {
        if find(&new.listeners, &l.name).is_none() {
            plan.removed.push(l.name.clone());
            plan.changes.push(format!(
                "listeners.{}: removed ({}); its sessions go on",
                l.name, l.listen
            ));
        }
    }
    for l in &new.listeners {
        match find(&old.listeners, &l.name) {
            None => {
                plan.changes.push(format!(
                    "listeners.{}: added ({} {} on {}, backend {})",
                    l.name,
                    l.protocol,
                    l.tls.as_str(),
                    l.listen,
                    l.backend
                ));
                plan.added.push(l.clone());
            }
            Some(was) if was != *l => {
                if was.listen != l.listen {
                    plan.rebound.push(l.name.clone());
                    plan.changes.push(format!(
                        "listeners.{}: listen {} -> {}; sessions accepted on the old address go on",
                        l.name, was.listen, l.listen
                    ));
                }
                if was.backend != l.backend {
                    plan.changes.push(format!(
                        "listeners.{}: backends {} -> {} (new sessions; relaying sessions stay on their backend)",
                        l.name, was.backend, l.backend
                    ));
                }
                if was.routing != l.routing {
                    plan.changes.push(format!(
                        "listeners.{}: user routing (user_affinity, user_map, user_lookup) for logins from now on",
                        l.name
                    ));
                }
                let mut was_rest = was.clone();
                was_rest.listen = l.listen;
                was_rest.backend = l.backend.clone();
                was_rest.routing = l.routing.clone();
                if was_rest != *l {
                    plan.changes.push(format!(
                        "listeners.{}: settings (protocol, tls, max_connections, proxy protocol, client info) apply to new sessions",
                        l.name
                    ));
                }
            }
            Some(_) => {}
        }
    }

    if old.hostname != new.hostname {
        plan.changes.push(format!(
            "hostname: {} -> {} (new sessions)",
            old.hostname, new.hostname
        ));
        plan.tls = true;
        plan.certificates = true;
    }
    let (ot, nt) = (&old.tls, &new.tls);
    if ot.certificates != nt.certificates {
        plan.certificates = true;
        plan.tls = true;
        plan.changes
            .push("tls.certificates: new list, loaded for new handshakes".into());
    }
    if ot.ticket_key_file != nt.ticket_key_file {
        plan.ticket_keys = true;
        plan.tls = true;
        plan.changes
            .push("tls.ticket_key_file: another file, for new tickets".into());
    }
    if ot.min_version != nt.min_version
        || ot.session_tickets != nt.session_tickets
        || ot.handshake_timeout != nt.handshake_timeout
    {
        plan.tls = true;
        plan.changes
            .push("tls (min_version, session_tickets, handshake_timeout): new handshakes".into());
    }
    if ot.reload_interval != nt.reload_interval {
        plan.changes.push(format!(
            "tls.reload_interval: {:?} -> {:?}",
            ot.reload_interval, nt.reload_interval
        ));
    }
    if old.timeouts != new.timeouts {
        plan.changes
            .push("timeouts: new sessions (shutdown_grace: the next shutdown)".into());
    }
    if old.limits != new.limits {
        plan.changes
            .push("limits: new sessions; the per-address tables keep their counts".into());
    }
    if old.log_level != new.log_level {
        plan.changes
            .push(format!("log.level: {} -> {}", old.log_level, new.log_level));
        plan.log_level = Some(new.log_level.clone());
    }
    if old.log_format != new.log_format {
        plan.needs_restart.push(format!(
            "log.format: {:?} -> {:?} (the format is fixed at start)",
            old.log_format, new.log_format
        ));
    }
    if old.metrics_listen != new.metrics_listen {
        plan.needs_restart.push(format!(
            "metrics.listen: {} -> {} (the endpoint keeps its socket)",
            show(old.metrics_listen),
            show(new.metrics_listen)
        ));
    }
    if old.listen_backlog != new.listen_backlog {
        plan.needs_restart.push(format!(
            "limits.listen_backlog: {} -> {} (listeners bound from now on use it; the others keep theirs)",
            old.listen_backlog, new.listen_backlog
        ));
    }
    if old.shared_state != new.shared_state {
        // The client, its replica lease and the tables' link to it are made once at start.
        plan.needs_restart.push(
            "shared_state (the store the limits are shared through is chosen at start)".to_owned(),
        );
    }
    plan
}

fn show(addr: Option<std::net::SocketAddr>) -> String {
    addr.map_or_else(|| "off".to_owned(), |a| a.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::path::Path;

    #[test]
    fn a_changed_shared_state_needs_a_restart() {
        let base = "hostname: h\nlisteners:\n  - name: imaps\n    protocol: imap\n    listen: \"127.0.0.1:0\"\n    tls: implicit\n    backend: \"127.0.0.1:143\"\n";
        let load = |yaml: &str| {
            Config::from_yaml(yaml)
                .unwrap()
                .validate(Path::new("/"))
                .unwrap()
        };
        let old = load(base);
        let new = load(&format!(
            "{base}shared_state:\n  redis: \"redis://127.0.0.1:6379/0\"\n"
        ));
        let plan = plan(&old, &new);
        assert!(
            plan.needs_restart
                .iter()
                .any(|item| item.starts_with("shared_state")),
            "{:?}",
            plan.needs_restart
        );
    }

    fn config(yaml: &str) -> RuntimeConfig {
        Config::from_yaml(yaml)
            .unwrap()
            .validate(Path::new("/"))
            .unwrap()
    }

    const BASE: &str = "hostname: mx.example.test\nlisteners:\n  - name: imaps\n    protocol: imap\n    listen: \"127.0.0.1:993\"\n    tls: implicit\n    backend: \"10.0.0.1:143\"\n";

    #[test]
    fn the_same_configuration_plans_nothing() {
        assert!(plan(&config(BASE), &config(BASE)).is_empty());
    }

    #[test]
    fn listeners_added_removed_moved_and_backends_changed_are_each_named() {
        let new = "hostname: mx.example.test\nlisteners:\n  - name: imaps\n    protocol: imap\n    listen: \"127.0.0.1:1993\"\n    tls: implicit\n    backend: [\"10.0.0.2:143\"]\n  - name: pop3s\n    protocol: pop3\n    listen: \"127.0.0.1:995\"\n    tls: implicit\n    backend: \"10.0.0.1:110\"\n";
        let p = plan(&config(BASE), &config(new));
        assert_eq!(p.added.len(), 1);
        assert_eq!(p.rebound, ["imaps"]);
        assert!(p.removed.is_empty());
        assert!(
            p.changes
                .iter()
                .any(|c| c.contains("10.0.0.1:143 -> 10.0.0.2:143")),
            "{p:?}"
        );
        let back = plan(&config(new), &config(BASE));
        assert_eq!(back.removed, ["pop3s"]);
        assert!(p.needs_restart.is_empty());
    }

    #[test]
    fn what_cannot_change_in_place_is_named_as_needing_a_restart() {
        let new = format!(
            "{BASE}metrics:\n  listen: \"127.0.0.1:9100\"\nlog:\n  format: json\n  level: debug\nlimits:\n  listen_backlog: 100\n  connections_per_ip: 3\n"
        );
        let p = plan(&config(BASE), &config(&new));
        let restart = p.needs_restart.join("\n");
        for key in ["metrics.listen", "log.format", "limits.listen_backlog"] {
            assert!(restart.contains(key), "{key}: {restart}");
        }
        assert_eq!(p.log_level.as_deref(), Some("debug"));
        assert!(p.changes.iter().any(|c| c.starts_with("limits:")));
    }

    #[test]
    fn user_routing_changes_are_named_and_apply_in_place() {
        let new = format!("{BASE}    user_affinity: true\n");
        let p = plan(&config(BASE), &config(&new));
        assert!(
            p.changes.iter().any(|c| c.contains("user routing")),
            "{p:?}"
        );
        assert!(
            !p.changes.iter().any(|c| c.contains("settings (protocol")),
            "{p:?}"
        );
        assert!(p.needs_restart.is_empty() && p.added.is_empty() && p.rebound.is_empty());
    }
}
