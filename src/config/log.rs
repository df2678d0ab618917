//! `log:` (format and level filter) and `metrics:` (the Prometheus endpoint's address):
//! what the proxy tells its operator, and where.

use std::net::SocketAddr;

use serde::Deserialize;

/// `log.format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSection {
    pub listen: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSection {
    #[serde(default)]
    pub format: LogFormat,
    #[serde(default = "default_log_level")]
    pub level: String,
}

impl Default for LogSection {
    fn default() -> Self {
        LogSection {
            format: LogFormat::default(),
            level: default_log_level(),
        }
    }
}

fn default_log_level() -> String {
    "info".to_owned()
}

/// Checks `metrics`: `None` when the section is absent or its address does not parse.
/// `problem(key, message)` gets each fault, the key from the file's root.
pub(super) fn validate_metrics(
    section: Option<&MetricsSection>,
    problem: &mut dyn FnMut(String, String),
) -> Option<SocketAddr> {
    let m = section?;
    match m.listen.parse::<SocketAddr>() {
        Ok(addr) => Some(addr),
        Err(_) => {
            problem(
                "metrics.listen".into(),
                format!("{:?} is not an address:port", m.listen),
            );
            None
        }
    }
}

/// Checks `log`: the level must be a level or a filter whose every directive names one.
/// `problem(key, message)` gets each fault, the key from the file's root.
pub(super) fn validate(section: &LogSection, problem: &mut dyn FnMut(String, String)) {
    if tracing_subscriber::EnvFilter::try_new(&section.level).is_err()
        || !log_directives_have_levels(&section.level)
    {
        problem(
            "log.level".into(),
            format!(
                "{:?} is not a level (error, warn, info, debug, trace) or filter",
                section.level
            ),
        );
    }
}

/// The tracing filter mailfront runs with: the operator's (`log.level`, or `RUST_LOG`), with
/// `rustls=error` added unless it names rustls itself or its default level is `debug` or
/// `trace`. rustls logs a warning for what a peer sends (an alert, a message out of place, a
/// malformed hello), one per connection at whatever pace a client likes; each failed handshake
/// is already counted in `mailfront_tls_handshake_failures_total{reason}` and its cause is in
/// the session's close line, so rustls's lines are shown only where debug lines are.
pub fn log_filter(text: &str) -> String {
    use tracing::level_filters::LevelFilter;
    let mut names_rustls = false;
    let mut debug_by_default = false;
    for directive in text.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let target = directive
            .split(['[', '='])
            .next()
            .unwrap_or_default()
            .trim();
        if !directive.contains(['[', '='])
            && let Ok(level) = target.parse::<LevelFilter>()
        {
            debug_by_default = level >= LevelFilter::DEBUG;
        } else if target == "rustls" || target.starts_with("rustls::") {
            names_rustls = true;
        }
    }
    if names_rustls || debug_by_default {
        text.to_owned()
    } else if text.trim().is_empty() {
        "rustls=error".to_owned()
    } else {
        format!("{text},rustls=error")
    }
}

/// Whether every directive of a `log.level` filter names a level. `EnvFilter` takes a bare word
/// as a target (`warning` means "everything from the target `warning`"), so a misspelt level
/// would pass and the proxy would then log nothing at all: a bare word must be a level, and
/// `target=level` must end in one.
fn log_directives_have_levels(text: &str) -> bool {
    use tracing::level_filters::LevelFilter;
    text.split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .all(|directive| match directive.rsplit_once('=') {
            Some((_, level)) => level.trim().parse::<LevelFilter>().is_ok(),
            None if directive.contains('[') => true,
            None => directive.parse::<LevelFilter>().is_ok(),
        })
}
