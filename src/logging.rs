//! Logging: text or JSON lines on stderr, behind a level filter that a configuration reload can
//! change in place ([`LogHandle`]). The format is fixed for the life of the process: it decides
//! the subscriber's type, and swapping it would put a dynamic layer in front of every event for
//! a change made once in a deployment's life, so a changed `log.format` needs a restart.

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

use crate::config::LogFormat;

/// What a reload needs of the logging setup.
pub trait LogControl: Send + Sync {
    /// Applies `level` (a level or an `EnvFilter` directive, already validated) to every event
    /// from now on.
    fn set_level(&self, level: &str) -> Result<(), String>;
}

type Setter = Box<dyn Fn(EnvFilter) -> Result<(), String> + Send + Sync>;

/// The installed subscriber's filter, swappable.
pub struct LogHandle {
    set: Setter,
    /// `RUST_LOG` was set at start: it wins over `log.level`, at start and on reloads.
    env_override: bool,
}

impl LogControl for LogHandle {
    fn set_level(&self, level: &str) -> Result<(), String> {
        if self.env_override {
            return Err("RUST_LOG is set and takes precedence over log.level".into());
        }
        let filter =
            EnvFilter::try_new(crate::config::log_filter(level)).map_err(|e| e.to_string())?;
        (self.set)(filter)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("cannot install the logger: {0}")]
pub struct InitError(String);

/// Installs the process's subscriber: `RUST_LOG` if set, else `level`; `ansi` colours only for
/// a person at a terminal.
pub fn init<W>(
    format: LogFormat,
    level: &str,
    writer: W,
    ansi: bool,
) -> Result<LogHandle, InitError>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    // RUST_LOG when set and valid, else `log.level`; either way rustls's per-connection
    // warnings only where debug lines are shown (see `config::log_filter`).
    let from_env = std::env::var(EnvFilter::DEFAULT_ENV)
        .ok()
        .filter(|text| EnvFilter::try_new(text).is_ok());
    let env_override = from_env.is_some();
    let written = from_env.unwrap_or_else(|| level.to_owned());
    let filter = EnvFilter::try_new(crate::config::log_filter(&written))
        .unwrap_or_else(|_| EnvFilter::new(crate::config::log_filter("info")));
    let set: Setter = match format {
        LogFormat::Json => {
            let builder = tracing_subscriber::fmt()
                .json()
                .flatten_event(true)
                // The session's span (listener, protocol, client, session id) as `span`.
                .with_current_span(true)
                .with_span_list(false)
                .with_env_filter(filter)
                .with_writer(writer)
                .with_ansi(ansi)
                .with_filter_reloading();
            let handle = builder.reload_handle();
            builder.try_init().map_err(|e| InitError(e.to_string()))?;
            Box::new(move |f| handle.reload(f).map_err(|e| e.to_string()))
        }
        LogFormat::Text => {
            let builder = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_writer(writer)
                .with_ansi(ansi)
                .with_filter_reloading();
            let handle = builder.reload_handle();
            builder.try_init().map_err(|e| InitError(e.to_string()))?;
            Box::new(move |f| handle.reload(f).map_err(|e| e.to_string()))
        }
    };
    Ok(LogHandle { set, env_override })
}
