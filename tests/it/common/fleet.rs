//! Backends that can be killed and brought back on the same port, for the pool tests: small
//! IMAP and SMTP servers that say which one they are, optionally behind TLS (implicit or after
//! STARTTLS), counting the sessions they took.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use super::TIMEOUT;
use super::pki::IssuedCert;

/// What a fleet backend speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Speaks {
    Imap,
    Smtp,
}

/// How a fleet backend protects its port.
#[derive(Clone)]
pub enum FleetTls {
    None,
    /// TLS from the first byte.
    Implicit(Arc<rustls::ServerConfig>),
    /// IMAP STARTTLS / SMTP STARTTLS before anything else works.
    Starttls(Arc<rustls::ServerConfig>),
}

/// A rustls server config from an issued certificate.
pub fn server_tls(cert: &IssuedCert) -> Arc<rustls::ServerConfig> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert.cert)
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = PrivateKeyDer::from_pem_file(&cert.key).unwrap();
    Arc::new(
        rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap(),
    )
}

/// One backend of a fleet.
pub struct FleetBackend {
    pub name: String,
    pub addr: SocketAddr,
    speaks: Speaks,
    tls: FleetTls,
    /// Sessions that got past the greeting (and TLS), over every life of this backend.
    pub sessions: Arc<AtomicUsize>,
    tasks: Option<JoinSet<()>>,
}

impl FleetBackend {
    pub async fn start(name: &str, speaks: Speaks, tls: FleetTls) -> FleetBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut backend = FleetBackend {
            name: name.to_owned(),
            addr: listener.local_addr().unwrap(),
            speaks,
            tls,
            sessions: Arc::new(AtomicUsize::new(0)),
            tasks: None,
        };
        backend.serve(listener);
        backend
    }

    pub fn sessions(&self) -> usize {
        self.sessions.load(Ordering::SeqCst)
    }

    /// Closes the port and every open connection at once, as a crashed server would.
    pub fn kill(&mut self) {
        if let Some(mut tasks) = self.tasks.take() {
            tasks.abort_all();
        }
    }

    /// Listens again on the same port.
    pub async fn revive(&mut self) {
        let listener = TcpListener::bind(self.addr).await.unwrap();
        self.serve(listener);
    }

    fn serve(&mut self, listener: TcpListener) {
        let mut tasks = JoinSet::new();
        let name = self.name.clone();
        let speaks = self.speaks;
        let tls = self.tls.clone();
        let sessions = self.sessions.clone();
        // Connections live in a set owned by the accept task, so aborting it drops them all.
        tasks.spawn(async move {
            let mut connections = JoinSet::new();
            while let Ok((tcp, _)) = listener.accept().await {
                let name = name.clone();
                let tls = tls.clone();
                let sessions = sessions.clone();
                connections.spawn(async move {
                    let _ = tokio::time::timeout(
                        TIMEOUT * 6,
                        serve_one(tcp, &name, speaks, tls, sessions),
                    )
                    .await;
                });
            }
        });
        self.tasks = Some(tasks);
    }
}

impl Drop for FleetBackend {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn serve_one(
    tcp: TcpStream,
    name: &str,
    speaks: Speaks,
    tls: FleetTls,
    sessions: Arc<AtomicUsize>,
) -> std::io::Result<()> {
    match tls {
        FleetTls::None => {
            sessions.fetch_add(1, Ordering::SeqCst);
            converse(BufReader::new(tcp), name, speaks, true).await
        }
        FleetTls::Implicit(config) => {
            let stream = TlsAcceptor::from(config).accept(tcp).await?;
            sessions.fetch_add(1, Ordering::SeqCst);
            converse(BufReader::new(stream), name, speaks, true).await
        }
        FleetTls::Starttls(config) => {
            let mut plain = BufReader::new(tcp);
            greet(plain.get_mut(), name, speaks).await?;
            loop {
                let line = read(&mut plain).await?;
                let upper = line.to_ascii_uppercase();
                match speaks {
                    Speaks::Smtp if upper.starts_with("EHLO") => {
                        plain
                            .get_mut()
                            .write_all(format!("250-{name}\r\n250 STARTTLS\r\n").as_bytes())
                            .await?;
                    }
                    Speaks::Smtp if upper.starts_with("STARTTLS") => {
                        plain.get_mut().write_all(b"220 2.0.0 go ahead\r\n").await?;
                        break;
                    }
                    Speaks::Imap if upper.contains(" STARTTLS") => {
                        let tag = line.split(' ').next().unwrap_or("*").to_owned();
                        plain
                            .get_mut()
                            .write_all(format!("{tag} OK begin TLS\r\n").as_bytes())
                            .await?;
                        break;
                    }
                    _ => {
                        plain.get_mut().write_all(b"530 STARTTLS first\r\n").await?;
                    }
                }
            }
            assert!(plain.buffer().is_empty(), "bytes pipelined after STARTTLS");
            let stream = TlsAcceptor::from(config).accept(plain.into_inner()).await?;
            sessions.fetch_add(1, Ordering::SeqCst);
            converse(BufReader::new(stream), name, speaks, false).await
        }
    }
}

async fn greet<W: AsyncWrite + Unpin>(
    w: &mut W,
    name: &str,
    speaks: Speaks,
) -> std::io::Result<()> {
    let greeting = match speaks {
        Speaks::Imap => format!("* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN ID] {name} ready\r\n"),
        Speaks::Smtp => format!("220 {name} ESMTP\r\n"),
    };
    w.write_all(greeting.as_bytes()).await
}

async fn read<R: AsyncRead + Unpin>(r: &mut BufReader<R>) -> std::io::Result<String> {
    let mut line = String::new();
    if r.read_line(&mut line).await? == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(line.trim_end().to_owned())
}

/// The session proper: every reply names the backend, so a client can tell which one it got.
async fn converse<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: BufReader<S>,
    name: &str,
    speaks: Speaks,
    greeting: bool,
) -> std::io::Result<()> {
    if greeting {
        greet(s.get_mut(), name, speaks).await?;
    }
    loop {
        let line = read(&mut s).await?;
        let (tag, rest) = line.split_once(' ').unwrap_or((line.as_str(), ""));
        let command = rest.split(' ').next().unwrap_or("").to_ascii_uppercase();
        let reply = match speaks {
            Speaks::Imap => match command.as_str() {
                "CAPABILITY" => {
                    format!("* CAPABILITY IMAP4rev1 AUTH=PLAIN ID\r\n{tag} OK done\r\n")
                }
                "ID" => format!("* ID NIL\r\n{tag} OK done\r\n"),
                "LOGIN" => format!("{tag} OK [CAPABILITY IMAP4rev1] {name} logged in\r\n"),
                "LOGOUT" => {
                    let bye = format!("* BYE {name}\r\n{tag} OK bye\r\n");
                    s.get_mut().write_all(bye.as_bytes()).await?;
                    return Ok(());
                }
                _ => format!("* OK served by {name}\r\n{tag} OK done\r\n"),
            },
            Speaks::Smtp => match tag.to_ascii_uppercase().as_str() {
                "EHLO" => format!("250-{name}\r\n250-PIPELINING\r\n250 AUTH PLAIN\r\n"),
                "QUIT" => {
                    s.get_mut().write_all(b"221 2.0.0 bye\r\n").await?;
                    return Ok(());
                }
                _ => format!("250 2.0.0 {name}\r\n"),
            },
        };
        s.get_mut().write_all(reply.as_bytes()).await?;
    }
}

/// GETs `path` from the admin endpoint.
pub async fn scrape(admin: SocketAddr) -> String {
    let mut tcp = TcpStream::connect(admin).await.unwrap();
    tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    tokio::time::timeout(TIMEOUT, tcp.read_to_string(&mut out))
        .await
        .unwrap()
        .unwrap();
    out
}

/// The value of the one series whose line starts with `series` (name and labels), if present.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}
