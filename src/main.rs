//! The `mailfront` binary: CLI, logging, signals and exit codes around [`mailfront::server`].

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use mailfront::config::{self, RuntimeConfig};
use mailfront::fd_limit;
use mailfront::logging;
use mailfront::reload;
use mailfront::server::{self, Control, Server};
use mailfront::tls::CertStore;

mod demo;

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
        /// Also print what reloading from this (running) configuration to the new one would
        /// change, and what would need a restart.
        #[arg(long, value_name = "OLD")]
        against: Option<PathBuf>,
        /// Also connect to `shared_state.redis` and ping it (otherwise only the URL, password
        /// file and CA are checked, offline).
        #[arg(long)]
        online: bool,
    },
    /// Try mailfront: small IMAP, POP3 and SMTP servers (user demo, password demo) with
    /// mailfront in front of them, all on 127.0.0.1, a self-signed certificate, and what to try.
    Demo(demo::DemoArgs),
    /// Ask a running mailfront whether it is ready: GET /readyz on the metrics address of the
    /// configuration, exit 0 on 200, else 1 (a Docker HEALTHCHECK in an image without a shell).
    Health {
        /// Ask this URL instead (`http://HOST:PORT/PATH`; the path defaults to /readyz).
        #[arg(long)]
        url: Option<String>,
    },
}

/// How long `mailfront health` waits for the whole exchange: well under Docker's default
/// HEALTHCHECK timeout (30s), and far more than a local /readyz needs.
const HEALTH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// The most of the answer `mailfront health` reads: the status line is all it needs.
const HEALTH_MAX_ANSWER: u64 = 1024;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Run) {
        Command::Check { against, online } => {
            check(cli.config.as_deref(), against.as_deref(), online)
        }
        Command::Health { url } => match health(cli.config.as_deref(), url.as_deref()) {
            Ok(status) => {
                println!("mailfront health: {status}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("mailfront health: {}", chain(&e));
                ExitCode::FAILURE
            }
        },
        Command::Demo(_) if cli.config.is_some() => {
            eprintln!("mailfront demo: --config does not apply (the demo makes its own)");
            ExitCode::FAILURE
        }
        Command::Demo(args) => match demo::run(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("mailfront demo: {}", chain(&e));
                ExitCode::FAILURE
            }
        },
        Command::Run => match run(cli.config.as_deref()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("mailfront: {}", chain(&e));
                ExitCode::FAILURE
            }
        },
    }
}

/// An error and its causes, `: `-separated like anyhow's `{:#}`, but without a cause whose text
/// the message already holds: most of our errors name their source in their own message (so a
/// log line with `error = %e` is complete), and `{:#}` would print the OS error twice
/// ("… (os error 98): Address already in use (os error 98)").
fn chain(error: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in error.chain() {
        let cause = cause.to_string();
        if text.contains(&cause) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&cause);
    }
    text
}

fn check(path: Option<&Path>, against: Option<&Path>, online: bool) -> ExitCode {
    let source = path
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "built-in default".into());
    let invalid = |e: &dyn std::fmt::Display| {
        eprintln!("{source}: invalid configuration:\n{e}");
        ExitCode::FAILURE
    };
    let text = match path {
        Some(p) => match config::read_file(p) {
            Ok(text) => text,
            Err(e) => return invalid(&e),
        },
        None => config::EMBEDDED_DEFAULT.to_owned(),
    };
    let base = path.and_then(Path::parent).unwrap_or(Path::new("."));
    // The same checks a reload makes: YAML, every value, backend_tls CAs, ticket keys.
    let config = match server::check(base, &text) {
        Ok(c) => c,
        Err(e) => return invalid(&e),
    };
    if let Some(shared) = &config.shared_state
        && let Err(e) = check_shared_state(shared, online)
    {
        return invalid(&format!("{e:#}"));
    }
    let store = match CertStore::load(&config.tls.certificates, &config.hostname) {
        Ok(store) => store,
        Err(e) => return invalid(&e),
    };
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
    for warning in store.loaded().iter().filter_map(|c| c.shadowed_warning()) {
        println!("warning: {warning}");
    }
    if let Some(old_path) = against {
        let old = match config::load(Some(old_path)) {
            Ok(old) => old,
            Err(e) => {
                eprintln!("{}: invalid configuration:\n{e}", old_path.display());
                return ExitCode::FAILURE;
            }
        };
        let plan = reload::plan(&old, &config);
        if plan.is_empty() {
            println!("a reload from {} would change nothing", old_path.display());
        }
        for change in &plan.changes {
            println!("reload would apply: {change}");
        }
        for item in &plan.needs_restart {
            println!("needs a restart: {item}");
        }
    }
    ExitCode::SUCCESS
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

/// `mailfront health`: one HTTP/1.0 GET, the status line read back. Returns it when it is 200.
fn health(config: Option<&Path>, url: Option<&str>) -> anyhow::Result<String> {
    let (authority, path) = match url {
        Some(url) => {
            let rest = url
                .strip_prefix("http://")
                .with_context(|| format!("{url}: only http:// URLs are supported"))?;
            match rest.split_once('/') {
                Some((authority, path)) => (authority.to_owned(), format!("/{path}")),
                None => (rest.to_owned(), "/readyz".to_owned()),
            }
        }
        None => {
            let config = config::load(config).context("invalid configuration")?;
            let mut addr = config
                .metrics_listen
                .context("metrics.listen is not set: nothing serves /readyz")?;
            // A server on every address answers on loopback.
            if addr.ip().is_unspecified() {
                addr.set_ip(match addr {
                    std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                    std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
                });
            }
            (addr.to_string(), "/readyz".to_owned())
        }
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let status = runtime.block_on(async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        tokio::time::timeout(HEALTH_TIMEOUT, async {
            let mut stream = tokio::net::TcpStream::connect(&authority)
                .await
                .with_context(|| format!("cannot connect to {authority}"))?;
            stream
                .write_all(format!("GET {path} HTTP/1.0\r\nHost: {authority}\r\n\r\n").as_bytes())
                .await?;
            let mut answer = Vec::new();
            (&mut stream)
                .take(HEALTH_MAX_ANSWER)
                .read_to_end(&mut answer)
                .await?;
            let answer = String::from_utf8_lossy(&answer);
            anyhow::Ok(answer.lines().next().unwrap_or_default().to_owned())
        })
        .await
        .with_context(|| format!("no answer from {authority} within {HEALTH_TIMEOUT:?}"))?
    })?;
    let code = status.split_whitespace().nth(1);
    if status.starts_with("HTTP/1.") && code == Some("200") {
        Ok(format!("http://{authority}{path}: {status}"))
    } else if status.is_empty() {
        anyhow::bail!("http://{authority}{path}: no HTTP answer")
    } else {
        anyhow::bail!("http://{authority}{path}: {status}")
    }
}

fn run(path: Option<&std::path::Path>) -> anyhow::Result<()> {
    let (config, hash) = config::load_hashed(path).context("invalid configuration")?;
    // Colours only for a person at a terminal, never in files or log collectors.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let log = logging::init(config.log_format, &config.log_level, std::io::stderr, ansi)?;
    raise_open_files(&config);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let registry = prometheus::Registry::new();
        let server = Server::new(config.clone(), &registry)?
            .with_source(path.map(Path::to_path_buf), hash)
            .with_log(Arc::new(log));
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

/// SIGTERM/SIGINT begin a graceful shutdown; SIGHUP reloads the configuration, certificates and
/// ticket keys.
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
                _ = hangup.recv() => { tracing::info!("SIGHUP received: reloading the configuration and certificates"); control.reload.notify_one(); }
            }
        }
    });
    Ok(())
}
