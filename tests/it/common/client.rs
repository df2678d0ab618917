//! The client side: a real rustls client trusting the test CA, and line readers bounded by
//! the test timeout.

use std::net::SocketAddr;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, BufReader};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::TIMEOUT;

/// A rustls client config trusting the test CA, with the given versions and suites.
pub fn client_config(
    ca: &CertificateDer<'static>,
    versions: &[&'static rustls::SupportedProtocolVersion],
    suites: Option<Vec<rustls::SupportedCipherSuite>>,
) -> Arc<rustls::ClientConfig> {
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    if let Some(suites) = suites {
        provider.cipher_suites = suites;
    }
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// Connects with TLS to `addr`, sending `sni`.
pub async fn tls_connect(
    addr: SocketAddr,
    sni: &str,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(sni.to_string()).unwrap();
    tokio::time::timeout(TIMEOUT, TlsConnector::from(config).connect(name, tcp))
        .await
        .map_err(|_| std::io::Error::other("handshake timeout"))?
}

/// Upgrades an established plain stream to TLS (after STARTTLS).
pub async fn tls_upgrade<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    sni: &str,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<TlsStream<S>> {
    let name = ServerName::try_from(sni.to_string()).unwrap();
    tokio::time::timeout(TIMEOUT, TlsConnector::from(config).connect(name, stream))
        .await
        .map_err(|_| std::io::Error::other("handshake timeout"))?
}

/// Reads one CRLF-terminated line (bounded by the test timeout).
pub async fn read_line<S: AsyncRead + Unpin>(stream: &mut BufReader<S>) -> String {
    let mut line = Vec::new();
    tokio::time::timeout(TIMEOUT, stream.read_until(b'\n', &mut line))
        .await
        .expect("timed out reading a line")
        .unwrap();
    String::from_utf8_lossy(&line).into_owned()
}

/// Reads an SMTP reply, all lines of it.
pub async fn read_smtp_reply<S: AsyncRead + Unpin>(stream: &mut BufReader<S>) -> String {
    let mut all = String::new();
    loop {
        let line = read_line(stream).await;
        if line.is_empty() {
            return all;
        }
        all.push_str(&line);
        if line.len() < 4 || line.as_bytes()[3] == b' ' {
            return all;
        }
    }
}

/// Reads IMAP lines until one starts with `tag `.
pub async fn read_until_tag<S: AsyncRead + Unpin>(stream: &mut BufReader<S>, tag: &str) -> String {
    let mut all = String::new();
    loop {
        let line = read_line(stream).await;
        if line.is_empty() {
            return all;
        }
        all.push_str(&line);
        if line.starts_with(&format!("{tag} ")) {
            return all;
        }
    }
}
