//! `mailfront demo`: the newcomer's first run. In one process, three small cleartext mail
//! servers ([`imap`], [`pop3`], [`smtp`], sharing one [`store::Mailbox`]) and mailfront itself
//! in front of them, with a self-signed certificate, all on 127.0.0.1; then it prints what to try
//! (curl, swaks, openssl, python3) to see a login, the IMAP ID `tls` field the backend received
//! and the Received field mailfront adds to a message submitted over TLS.
//!
//! Part of the binary, not the library: nothing else uses these servers, and they are only as
//! complete as the commands of [`try_it`] and common clients need (one user, one mailbox, no
//! persistence). They still keep the house rules: bounded lines and messages, a timeout on every
//! wait, no panics on what a peer sends.

mod imap;
mod io;
mod pop3;
mod smtp;
mod store;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use mailfront::config::Config;
use mailfront::server::{self, Control, Server};
use tokio::net::TcpListener;

/// The one user the demo servers know.
pub const USER: &str = "demo";
/// Its password.
pub const PASSWORD: &str = "demo";
/// mailfront's `hostname` in the demo: the Received field's `by` and the self-signed
/// certificate's name.
const HOSTNAME: &str = "mailfront.demo";

/// The ports of `mailfront demo`, all on 127.0.0.1 (never on other addresses: the demo user's
/// password is public). 0 picks a free port; the banner says which.
#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {
    /// IMAP, implicit TLS (993 in production).
    #[arg(long, default_value_t = DEFAULT_PORTS.imaps, value_name = "PORT")]
    pub imaps: u16,
    /// POP3, implicit TLS (995 in production).
    #[arg(long, default_value_t = DEFAULT_PORTS.pop3s, value_name = "PORT")]
    pub pop3s: u16,
    /// SMTP submission, implicit TLS (465 in production).
    #[arg(long, default_value_t = DEFAULT_PORTS.submissions, value_name = "PORT")]
    pub submissions: u16,
    /// SMTP submission, STARTTLS (587 in production).
    #[arg(long, default_value_t = DEFAULT_PORTS.submission, value_name = "PORT")]
    pub submission: u16,
    /// /metrics, /healthz and /readyz.
    #[arg(long, default_value_t = DEFAULT_PORTS.metrics, value_name = "PORT")]
    pub metrics: u16,
}

/// The demo's ports once bound (the actual ones where 0 was asked for).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ports {
    pub imaps: u16,
    pub pop3s: u16,
    pub submissions: u16,
    pub submission: u16,
    pub metrics: u16,
}

/// The default ports, as the README's quick start names them.
pub const DEFAULT_PORTS: Ports = Ports {
    imaps: 10993,
    pop3s: 10995,
    submissions: 10465,
    submission: 10587,
    metrics: 9090,
};

/// The commands to try, each with what it shows: the README's quick start lists the same ones
/// for [`DEFAULT_PORTS`] (tests/it/quickstart.rs checks that they match, then runs them).
pub fn try_it(p: Ports) -> Vec<(&'static str, String)> {
    let Ports {
        imaps,
        pop3s,
        submissions,
        submission,
        metrics,
    } = p;
    vec![
        (
            "IMAP over TLS: log in and read message 1, which shows the ID \"tls\" field the IMAP server got from mailfront",
            format!("curl -sk 'imaps://127.0.0.1:{imaps}/INBOX;UID=1' -u {USER}:{PASSWORD}"),
        ),
        (
            "SMTP submission over TLS (465): send a message",
            format!(
                "printf 'Subject: hello\\r\\n\\r\\nHello through mailfront.\\r\\n' | curl -sk smtps://127.0.0.1:{submissions} -u {USER}:{PASSWORD} --mail-from {USER}@example.test --mail-rcpt {USER}@example.test -T -"
            ),
        ),
        (
            "POP3 over TLS: read it back (message 2), with the Received field mailfront added",
            format!("curl -sk pop3s://127.0.0.1:{pop3s}/2 -u {USER}:{PASSWORD}"),
        ),
        (
            "SMTP submission with STARTTLS (587), another client",
            format!(
                "swaks --server 127.0.0.1:{submission} --tls --auth-user {USER} --auth-password {PASSWORD} --from {USER}@example.test --to {USER}@example.test"
            ),
        ),
        (
            "Python's poplib: the messages in the mailbox",
            format!(
                "python3 -c 'import poplib, ssl; p = poplib.POP3_SSL(\"127.0.0.1\", {pop3s}, context=ssl._create_unverified_context()); p.user(\"{USER}\"); p.pass_(\"{PASSWORD}\"); print(p.list()[1])'"
            ),
        ),
        (
            "The TLS handshake (version, cipher, key exchange group, certificate)",
            format!("openssl s_client -connect 127.0.0.1:{imaps} -brief </dev/null"),
        ),
        (
            "Metrics: the handshakes so far, by version, cipher and group",
            format!(
                "curl -s http://127.0.0.1:{metrics}/metrics | grep ^mailfront_tls_handshakes_total"
            ),
        ),
    ]
}

/// Runs the demo until SIGINT or SIGTERM.
pub fn run(args: &DemoArgs) -> anyhow::Result<()> {
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    mailfront::logging::init(
        mailfront::config::LogFormat::Text,
        "info",
        std::io::stderr,
        ansi,
    )?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(serve(args.clone()))
}

async fn serve(args: DemoArgs) -> anyhow::Result<()> {
    let mailbox = Arc::new(store::Mailbox::default());
    let loopback = |port| SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let imap_backend = TcpListener::bind(loopback(0)).await?;
    let pop3_backend = TcpListener::bind(loopback(0)).await?;
    let smtp_backend = TcpListener::bind(loopback(0)).await?;
    let backends = Backends {
        imap: imap_backend.local_addr()?,
        pop3: pop3_backend.local_addr()?,
        smtp: smtp_backend.local_addr()?,
    };
    let shutdown = tokio_util::sync::CancellationToken::new();
    tokio::spawn(io::accept_loop(
        "IMAP",
        imap_backend,
        mailbox.clone(),
        shutdown.clone(),
        imap::serve,
    ));
    tokio::spawn(io::accept_loop(
        "POP3",
        pop3_backend,
        mailbox.clone(),
        shutdown.clone(),
        pop3::serve,
    ));
    tokio::spawn(io::accept_loop(
        "SMTP",
        smtp_backend,
        mailbox.clone(),
        shutdown.clone(),
        smtp::serve,
    ));

    let yaml = config_yaml(&args, &backends);
    let config = Config::from_yaml(&yaml)
        .and_then(|c| c.validate(Path::new(".")))
        .context("the demo's configuration")?;
    let registry = prometheus::Registry::new();
    let server = Server::new(config.clone(), &registry)?;
    let bound = server::bind(&config).await.context(
        "cannot listen (another demo running? choose other ports: mailfront demo --help)",
    )?;
    let port = |name: &str| {
        bound
            .addresses()
            .iter()
            .find(|(n, _)| n == name)
            .map_or(0, |(_, a)| a.port())
    };
    let ports = Ports {
        imaps: port("imaps"),
        pop3s: port("pop3s"),
        submissions: port("submissions"),
        submission: port("submission"),
        metrics: bound.admin_address().map_or(0, |a| a.port()),
    };
    eprint!("{}", banner(ports, &backends));

    let control = Control::default();
    spawn_signal_handlers(control.clone())?;
    let result = server.run(bound, control).await;
    shutdown.cancel();
    result?;
    Ok(())
}

/// Where the demo's own mail servers listen (ephemeral loopback ports).
struct Backends {
    imap: SocketAddr,
    pop3: SocketAddr,
    smtp: SocketAddr,
}

/// mailfront's configuration for the demo: the four listeners of config.yaml.example on
/// loopback, in front of the demo servers; no certificate (so the self-signed one); metrics on
/// loopback; a short drain, so Ctrl-C stops it at once.
fn config_yaml(args: &DemoArgs, backends: &Backends) -> String {
    let listener = |name: &str, protocol: &str, port: u16, tls: &str, backend: SocketAddr| {
        format!(
            "  - name: {name}\n    protocol: {protocol}\n    listen: \"127.0.0.1:{port}\"\n    tls: {tls}\n    backend: \"{backend}\"\n"
        )
    };
    let mut yaml = format!("hostname: {HOSTNAME}\ntls:\n  certificates: []\nlisteners:\n");
    yaml.push_str(&listener(
        "submissions",
        "smtp",
        args.submissions,
        "implicit",
        backends.smtp,
    ));
    yaml.push_str(&listener(
        "submission",
        "smtp",
        args.submission,
        "starttls",
        backends.smtp,
    ));
    yaml.push_str(&listener(
        "imaps",
        "imap",
        args.imaps,
        "implicit",
        backends.imap,
    ));
    yaml.push_str(&listener(
        "pop3s",
        "pop3",
        args.pop3s,
        "implicit",
        backends.pop3,
    ));
    yaml.push_str(&format!(
        "metrics:\n  listen: \"127.0.0.1:{}\"\ntimeouts:\n  shutdown_grace: 1s\n",
        args.metrics
    ));
    yaml
}

/// What the demo prints before it serves: where everything listens and what to try.
fn banner(ports: Ports, backends: &Backends) -> String {
    let mut text = format!(
        "\n\
         mailfront demo: mailfront in front of three small cleartext mail servers, all on 127.0.0.1\n\
         user {USER:?}, password {PASSWORD:?}; a self-signed certificate for {HOSTNAME} (so curl -k)\n\
         \n\
         \x20 imaps        127.0.0.1:{imaps:<5}  implicit TLS  -> demo IMAP server {imap} (cleartext)\n\
         \x20 pop3s        127.0.0.1:{pop3s:<5}  implicit TLS  -> demo POP3 server {pop3}\n\
         \x20 submissions  127.0.0.1:{submissions:<5}  implicit TLS  -> demo SMTP server {smtp}\n\
         \x20 submission   127.0.0.1:{submission:<5}  STARTTLS      -> demo SMTP server {smtp}\n\
         \x20 metrics      http://127.0.0.1:{metrics}/metrics\n\
         \n\
         Try it, from another terminal:\n",
        imaps = ports.imaps,
        pop3s = ports.pop3s,
        submissions = ports.submissions,
        submission = ports.submission,
        metrics = ports.metrics,
        imap = backends.imap,
        pop3 = backends.pop3,
        smtp = backends.smtp,
    );
    for (what, command) in try_it(ports) {
        text.push_str(&format!("  # {what}\n  {command}\n"));
    }
    text.push_str(
        "The demo servers log what they receive from mailfront below. Ctrl-C stops the demo.\n\n",
    );
    text
}

/// SIGINT (Ctrl-C) and SIGTERM stop the demo; there is nothing to reload.
fn spawn_signal_handlers(control: Control) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    tokio::spawn(async move {
        tokio::select! {
            _ = terminate.recv() => tracing::info!("SIGTERM received: stopping the demo"),
            _ = interrupt.recv() => tracing::info!("SIGINT received: stopping the demo"),
        }
        control.shutdown.cancel();
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_demo_config_is_valid_and_binds_loopback_only() {
        let args = DemoArgs {
            imaps: 10993,
            pop3s: 10995,
            submissions: 10465,
            submission: 10587,
            metrics: 9090,
        };
        let backend = SocketAddr::from((Ipv4Addr::LOCALHOST, 1));
        let backends = Backends {
            imap: backend,
            pop3: backend,
            smtp: backend,
        };
        let config = Config::from_yaml(&config_yaml(&args, &backends))
            .unwrap()
            .validate(Path::new("."))
            .unwrap();
        assert_eq!(config.listeners.len(), 4);
        assert!(config.listeners.iter().all(|l| l.listen.ip().is_loopback()));
        assert!(config.metrics_listen.unwrap().ip().is_loopback());
        assert!(config.tls.certificates.is_empty());
    }

    #[test]
    fn the_banner_names_every_port_and_command() {
        let text = banner(
            DEFAULT_PORTS,
            &Backends {
                imap: SocketAddr::from((Ipv4Addr::LOCALHOST, 1)),
                pop3: SocketAddr::from((Ipv4Addr::LOCALHOST, 2)),
                smtp: SocketAddr::from((Ipv4Addr::LOCALHOST, 3)),
            },
        );
        for port in ["10993", "10995", "10465", "10587", "9090"] {
            assert!(text.contains(&format!("127.0.0.1:{port}")), "{port}");
        }
        for (_, command) in try_it(DEFAULT_PORTS) {
            assert!(text.contains(&format!("\n  {command}\n")), "{command}");
        }
        assert!(!text.contains("0.0.0.0"));
    }
}
