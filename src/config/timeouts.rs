//! `timeouts:`: how long each wait of a session may last, from the backend connect to the
//! shutdown grace; checked into [`Timeouts`].

use std::time::Duration;

use serde::Deserialize;

use super::ConfigDuration;

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

/// Checks `timeouts`: every wait but the shutdown grace must be more than 0.
/// `problem(key, message)` gets each fault, the key from the file's root.
pub(super) fn validate(
    section: &TimeoutsSection,
    problem: &mut dyn FnMut(String, String),
) -> Timeouts {
    let t = section;
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
    Timeouts {
        backend_connect: t.backend_connect.0,
        idle: t.idle.0,
        login: t.login.0,
        data_reply: t.data_reply.0,
        relay_idle: t.relay_idle.0,
        shutdown_grace: t.shutdown_grace.0,
    }
}
