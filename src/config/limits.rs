//! `limits:`: line and literal sizes, commands before login, the per-address counts and the
//! listen backlog; checked into [`Limits`].

use std::time::Duration;

use serde::Deserialize;

use super::ConfigDuration;

/// Longest SMTP command line mailfront reads (AUTH lines get 12288, RFC 4954 §4): Postfix's
/// `line_length_limit`. What reaches the backend is never the client's line but mailfront's
/// re-encoding of it, at most 512 octets (1280 for MAIL, 1024 for RCPT, see
/// [`crate::smtp::canonical`]), so this bounds only what is read and judged; reading more than
/// the longest line any backend takes serves nothing.
pub const DEFAULT_SMTP_LINE: usize = 2048;
/// Longest IMAP line before authentication: RFC 7162 §4 has clients keep command lines to
/// about 8192 octets, so a server should accept that much.
pub const DEFAULT_IMAP_LINE: usize = 8192;
/// Largest IMAP literal before authentication. Only LOGIN and ID take strings then: a user name
/// or password is at most a few hundred octets, an ID value at most 1024 (RFC 2971 §3.3), and
/// tokens go through AUTHENTICATE, whose lines have their own bound. 8 KiB, the same as a
/// command line (`limits.imap_line`), is still far above what Dovecot's login process takes
/// for a command's arguments (about 1 KiB). A session holds up to a line and a literal while it
/// reads a command, so this bounds what an unfinished literal costs: at 64 KiB it took a
/// pre-login session from 31 to 91 KiB; at 8 KiB a session holds at most 16 KiB of command.
pub const DEFAULT_IMAP_LITERAL: usize = 8 * 1024;
/// Longest POP3 command line: RFC 1939 §3 allows 255 octets per command; twice that leaves
/// room for long RFC 2449 arguments.
pub const DEFAULT_POP3_LINE: usize = 512;
/// IMAP/POP3 commands allowed before authentication succeeds: a real client needs fewer than
/// ten (CAPABILITY, ID, STARTTLS, AUTHENTICATE and a retry), so 50 only stops a brute force.
pub const DEFAULT_PREAUTH_COMMANDS: usize = 50;
/// Sessions one client address (an IPv6 /64) may hold before authenticating, across all
/// listeners: a mail client opens a handful (IMAP opens a few in parallel, plus SMTP), and even
/// a NAT gateway in front of an office rarely has 50 logins in progress at one instant, because
/// authenticated sessions do not count.
pub const DEFAULT_CONNECTIONS_PER_IP: u32 = 50;
/// Login attempts that did not succeed one client address (an IPv6 /64) may have in
/// `limits.auth_failure_window` before its further attempts are refused here (each charged when
/// sent, refunded on success): a person mistyping a password, or a phone retrying an old one on
/// three accounts, stays well below 10.
pub const DEFAULT_AUTH_FAILURES_PER_IP: u32 = 10;
/// 10 failures per 10 minutes is one guess a minute: a dictionary attack on one address gets
/// nowhere, and a throttled person waits minutes, not hours.
pub const DEFAULT_AUTH_FAILURE_WINDOW: Duration = Duration::from_secs(600);

/// Connections the kernel queues, handshake done, before mailfront accepts them: nginx's 511.
/// std's and tokio's 128 overflows in a reconnect storm (every client of a restarted replica
/// at once), and an overflowing queue drops SYNs, which clients retry only after a second or
/// more. Linux caps the value at `net.core.somaxconn` (4096 since 5.4).
pub const DEFAULT_LISTEN_BACKLOG: u32 = 511;
/// The largest `limits.listen_backlog`: `net.core.somaxconn`'s own historical maximum; a
/// larger queue only holds clients longer than they will wait.
pub const MAX_LISTEN_BACKLOG: u32 = 65535;

// The smallest limits that still let a standards-following client work: below them a
// configuration would refuse legitimate traffic, so validation says so.
/// RFC 5321 §4.5.3.1.4: a command line of 512 octets must be accepted.
const MIN_SMTP_LINE: usize = 512;
/// An IMAP LOGIN line with a long user name and password, or a CAPABILITY-heavy ID, fits 1 KiB.
const MIN_IMAP_LINE: usize = 1024;
/// The same for a LOGIN argument sent as a literal.
const MIN_IMAP_LITERAL: usize = 1024;
/// RFC 1939 §3: a POP3 command line is at most 255 octets, so that much must be accepted.
const MIN_POP3_LINE: usize = 255;
/// At least the login command itself.
const MIN_PREAUTH_COMMANDS: usize = 1;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsSection {
    #[serde(default = "default_smtp_line")]
    pub smtp_line: usize,
    #[serde(default = "default_imap_line")]
    pub imap_line: usize,
    #[serde(default = "default_imap_literal")]
    pub imap_literal: usize,
    #[serde(default = "default_pop3_line")]
    pub pop3_line: usize,
    #[serde(default = "default_preauth_commands")]
    pub preauth_commands: usize,
    #[serde(default = "default_connections_per_ip")]
    pub connections_per_ip: u32,
    #[serde(default = "default_auth_failures_per_ip")]
    pub auth_failures_per_ip: u32,
    #[serde(default = "default_auth_failure_window")]
    pub auth_failure_window: ConfigDuration,
    #[serde(default = "default_listen_backlog")]
    pub listen_backlog: u32,
}

impl Default for LimitsSection {
    fn default() -> Self {
        LimitsSection {
            smtp_line: default_smtp_line(),
            imap_line: default_imap_line(),
            imap_literal: default_imap_literal(),
            pop3_line: default_pop3_line(),
            preauth_commands: default_preauth_commands(),
            connections_per_ip: default_connections_per_ip(),
            auth_failures_per_ip: default_auth_failures_per_ip(),
            auth_failure_window: default_auth_failure_window(),
            listen_backlog: default_listen_backlog(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    pub smtp_line: usize,
    pub imap_line: usize,
    pub imap_literal: usize,
    pub pop3_line: usize,
    pub preauth_commands: usize,
    /// Unauthenticated sessions per client address across all listeners; 0: no limit.
    pub connections_per_ip: u32,
    /// Login attempts that did not succeed per client address within `auth_failure_window`
    /// ([`crate::limits::AuthThrottle`]); 0: no throttle.
    pub auth_failures_per_ip: u32,
    pub auth_failure_window: Duration,
}

fn default_smtp_line() -> usize {
    DEFAULT_SMTP_LINE
}
fn default_imap_line() -> usize {
    DEFAULT_IMAP_LINE
}
fn default_imap_literal() -> usize {
    DEFAULT_IMAP_LITERAL
}
fn default_pop3_line() -> usize {
    DEFAULT_POP3_LINE
}
fn default_preauth_commands() -> usize {
    DEFAULT_PREAUTH_COMMANDS
}
fn default_connections_per_ip() -> u32 {
    DEFAULT_CONNECTIONS_PER_IP
}
fn default_auth_failures_per_ip() -> u32 {
    DEFAULT_AUTH_FAILURES_PER_IP
}
fn default_auth_failure_window() -> ConfigDuration {
    ConfigDuration(DEFAULT_AUTH_FAILURE_WINDOW)
}
fn default_listen_backlog() -> u32 {
    DEFAULT_LISTEN_BACKLOG
}

/// Checks `limits`: each size at least what a standards-following client needs, the throttle
/// and the backlog within their bounds. `problem(key, message)` gets each fault, the key from
/// the file's root. The backlog is not part of [`Limits`] (only binding uses it): the caller
/// reads it from the section.
pub(super) fn validate(section: &LimitsSection, problem: &mut dyn FnMut(String, String)) -> Limits {
    let lim = section;
    for (name, value, minimum) in [
        ("limits.smtp_line", lim.smtp_line, MIN_SMTP_LINE),
        ("limits.imap_line", lim.imap_line, MIN_IMAP_LINE),
        ("limits.imap_literal", lim.imap_literal, MIN_IMAP_LITERAL),
        ("limits.pop3_line", lim.pop3_line, MIN_POP3_LINE),
        (
            "limits.preauth_commands",
            lim.preauth_commands,
            MIN_PREAUTH_COMMANDS,
        ),
    ] {
        if value < minimum {
            problem(
                name.into(),
                format!("{value} is below the minimum of {minimum}"),
            );
        }
    }

    if lim.auth_failures_per_ip > crate::limits::MAX_AUTH_FAILURES_PER_IP {
        problem(
            "limits.auth_failures_per_ip".into(),
            format!(
                "{} is above the maximum of {}",
                lim.auth_failures_per_ip,
                crate::limits::MAX_AUTH_FAILURES_PER_IP
            ),
        );
    }
    if !(1..=MAX_LISTEN_BACKLOG).contains(&lim.listen_backlog) {
        problem(
            "limits.listen_backlog".into(),
            format!("{} is outside 1-{MAX_LISTEN_BACKLOG}", lim.listen_backlog),
        );
    }
    if lim.auth_failures_per_ip > 0 && lim.auth_failure_window.0.is_zero() {
        problem(
            "limits.auth_failure_window".into(),
            "must be more than 0 (set limits.auth_failures_per_ip to 0 to turn the throttle off)"
                .into(),
        );
    }
    Limits {
        smtp_line: lim.smtp_line,
        imap_line: lim.imap_line,
        imap_literal: lim.imap_literal,
        pop3_line: lim.pop3_line,
        preauth_commands: lim.preauth_commands,
        connections_per_ip: lim.connections_per_ip,
        auth_failures_per_ip: lim.auth_failures_per_ip,
        auth_failure_window: lim.auth_failure_window.0,
    }
}
