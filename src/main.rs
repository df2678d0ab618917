//! The `mailfront` binary: CLI, logging, signals and exit codes around [`mailfront::server`].

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use mailfront::config::{self, LogFormat, RuntimeConfig};
use mailfront::fd_limit;
use mailfront::server::{self, Control, Server};
use mailfront::tls::{CertStore, TicketKeys};

#[derive(Parser)]
#[command(
    name = "mailfront",
    version,
    about = "TLS front proxy for email submission and access (RFC 8314)"
)]
struct Cli {
    /// Configuration file (YAML). Without it, the built-in default (config.yaml.example) runs.
    #[arg(long, short = 'c', global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy (the default).
    Run,
    /// Validate the configuration and certificates, then exit 0 (valid) or 1.
    Check {
        /// Also connect to `shared_state.redis` and ping it (otherwise only the URL, password
        /// file and CA are checked, offline).
        #[arg(long)]
        online: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Run) {
        Command::Check { online } => check(cli.config.as_deref(), online),
        Command::Run => match run(cli.config.as_deref()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("mailfront: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

fn check(path: Option<&std::path::Path>, online: bool) -> ExitCode {
    let source = path
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "built-in default".into());
    let config = match config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{source}: invalid configuration:\n{e}");
            return ExitCode::FAILURE;
        }
    };
    // The CA bundles of `backend_tls`, as the server loads them at start.
    for (index, l) in config.listeners.iter().enumerate() {
        if let Some(tls) = &l.backend.tls
            && let Err(e) = mailfront::backend::tls::BackendTlsClient::new(tls)
        {
            eprintln!(
                "{source}: invalid configuration:\nlisteners[{index}] ({}): {e}",
                l.name
            );
            return ExitCode::FAILURE;
        }
    }
    if let Some(path) = &config.tls.ticket_key_file
        && let Err(e) = TicketKeys::load(path)
    {
        eprintln!("{source}: invalid configuration:\n{e}");
        return ExitCode::FAILURE;
    }
    if let Some(shared) = &config.shared_state
        && let Err(e) = check_shared_state(shared, online)
    {
        eprintln!("{source}: invalid configuration:\n{e}");
        return ExitCode::FAILURE;
    }
    match CertStore::load(&config.tls.certificates, &config.hostname) {
        Ok(store) => {
            println!(
                "{source}: configuration OK: {} listener(s), {} certificate(s){}",
                config.listeners.len(),
                store.loaded().len(),
                if store.is_self_signed() {
                    " (self-signed, none configured)"
                } else {
                    ""
                }
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{source}: invalid configuration:\n{e}");
            ExitCode::FAILURE
        }
    }
}

/// `shared_state`: the URL, password file and CA as the server reads them at start; with
/// `online`, a PING too.
fn check_shared_state(shared: &config::SharedStateConfig, online: bool) -> anyhow::Result<()> {
    let client = mailfront::shared_state::client(shared)?;
    drop(client);
    if online {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let state =
            mailfront::shared_state::SharedState::new(shared, &prometheus::Registry::new())?;
        runtime
            .block_on(state.ping())
            .context("shared_state.redis: PING failed")?;
        println!("shared_state.redis: PING answered");
    }
    Ok(())
}

fn init_logging(config: &RuntimeConfig) {
    use tracing_subscriber::EnvFilter;
    // RUST_LOG when set and valid, else `log.level`; either way rustls's per-connection
    // warnings only where debug lines are shown (see `config::log_filter`).
    let written = std::env::var(EnvFilter::DEFAULT_ENV)
        .ok()
        .filter(|text| EnvFilter::try_new(text).is_ok())
        .unwrap_or_else(|| config.log_level.clone());
    let filter = EnvFilter::try_new(config::log_filter(&written))
        .unwrap_or_else(|_| EnvFilter::new(config::log_filter("info")));
    // Colours only for a person at a terminal, never in files or log collectors.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    match config.log_format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init(),
        LogFormat::Text => builder.init(),
    }
}

fn run(path: Option<&std::path::Path>) -> anyhow::Result<()> {
    let config = config::load(path).context("invalid configuration")?;
    init_logging(&config);
    raise_open_files(&config);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let registry = prometheus::Registry::new();
        let server = Server::new(config.clone(), &registry)?;
        let bound = server::bind(&config).await?;
        let control = Control::default();
        spawn_signal_handlers(control.clone())?;
        server.run(bound, control).await?;
        Ok(())
    })
}

/// Raises the open-files soft limit to the hard limit, and warns when that is still below what
/// the listeners' `max_connections` may need (see [`fd_limit::needed`]).
fn raise_open_files(config: &RuntimeConfig) {
    let raised = fd_limit::raise();
    let show = |n: Option<u64>| n.map_or_else(|| "unlimited".to_owned(), |n| n.to_string());
    if let Some(e) = &raised.error {
        tracing::warn!(soft = %show(raised.before.soft), hard = %show(raised.before.hard), error = %e, "cannot raise the open files limit (RLIMIT_NOFILE) to its hard limit");
    } else if raised.after.soft != raised.before.soft {
        tracing::info!(from = %show(raised.before.soft), to = %show(raised.after.soft), "open files limit (RLIMIT_NOFILE) raised to the hard limit");
    }
    let needed = fd_limit::needed(config.listeners.iter().map(|l| l.max_connections));
    if let Some(limit) = fd_limit::shortfall(raised.after.soft, needed) {
        tracing::warn!(
            limit,
            needed,
            "open files limit (RLIMIT_NOFILE) is below what the listeners' max_connections may need (1.5 descriptors per session, client and backend): accepts will fail with 'Too many open files' before max_connections is reached; raise the hard limit (systemd LimitNOFILE=, ulimit -Hn, the container runtime's nofile) or lower max_connections"
        );
    }
}

/// SIGTERM/SIGINT begin a graceful shutdown; SIGHUP re-reads the certificates.
fn spawn_signal_handlers(control: Control) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut hangup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = terminate.recv() => { tracing::info!("SIGTERM received"); control.shutdown.cancel(); }
                _ = interrupt.recv() => { tracing::info!("SIGINT received"); control.shutdown.cancel(); }
                _ = hangup.recv() => { tracing::info!("SIGHUP received: reloading certificates"); control.reload.notify_one(); }
            }
        }
    });
    Ok(())
}
