//! `backend_tls`: the rustls client that encrypts the hop to the backend, verifying its
//! certificate against `ca` (a PEM bundle) or the system's roots.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::TlsConnector;

use crate::config::{BackendTls, TlsMode};

/// Why `backend_tls` cannot be set up (at startup, so a bad `ca` is found before any client).
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("backend_tls.ca {path}: {detail}")]
    Ca { path: PathBuf, detail: String },
    #[error("backend_tls: no system root certificates found ({detail}); set ca")]
    NoSystemRoots { detail: String },
    #[error("backend_tls: {0}")]
    Rustls(#[from] rustls::Error),
}

/// A listener's TLS client towards its backends.
#[derive(Clone)]
pub struct BackendTlsClient {
    pub mode: TlsMode,
    connector: TlsConnector,
    server_name: Option<ServerName<'static>>,
}

impl std::fmt::Debug for BackendTlsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendTlsClient")
            .field("mode", &self.mode)
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl BackendTlsClient {
    /// Loads the roots (`ca`, or the system's) and builds the client.
    pub fn new(tls: &BackendTls) -> Result<BackendTlsClient, TlsSetupError> {
        let roots = match &tls.ca {
            Some(path) => ca_roots(path)?,
            None => system_roots()?,
        };
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let server_name = tls
            .server_name
            .as_ref()
            .and_then(|n| ServerName::try_from(n.clone()).ok());
        Ok(BackendTlsClient {
            mode: tls.mode,
            connector: TlsConnector::from(Arc::new(config)),
            server_name,
        })
    }

    /// Runs the client handshake on `stream`, checking `server_name` or else `host` (the
    /// backend's host as configured: a DNS name, or an IP address checked against the
    /// certificate's IP SANs).
    pub async fn handshake<S>(
        &self,
        stream: S,
        host: &str,
    ) -> io::Result<tokio_rustls::client::TlsStream<S>>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let name = match &self.server_name {
            Some(name) => name.clone(),
            None => ServerName::try_from(host.to_owned())
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?,
        };
        self.connector.connect(name, stream).await
    }
}

fn ca_roots(path: &PathBuf) -> Result<RootCertStore, TlsSetupError> {
    let fail = |detail: String| TlsSetupError::Ca {
        path: path.clone(),
        detail,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| fail(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| fail(e.to_string()))?;
    if certs.is_empty() {
        return Err(fail("no CERTIFICATE in the file".into()));
    }
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(fail("no usable CA certificate in the file".into()));
    }
    Ok(roots)
}

fn system_roots() -> Result<RootCertStore, TlsSetupError> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        let detail = found.errors.first().map_or_else(
            || "the trust store is empty".to_owned(),
            ToString::to_string,
        );
        return Err(TlsSetupError::NoSystemRoots { detail });
    }
    Ok(roots)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tls(ca: Option<PathBuf>) -> BackendTls {
        BackendTls {
            mode: TlsMode::Implicit,
            ca,
            server_name: Some("backend.example.test".into()),
        }
    }

    #[test]
    fn a_ca_bundle_must_exist_and_hold_a_certificate() {
        let dir = std::env::temp_dir().join(format!("mailfront-backend-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let missing = dir.join("missing.pem");
        assert!(matches!(
            BackendTlsClient::new(&tls(Some(missing))),
            Err(TlsSetupError::Ca { .. })
        ));
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "no PEM here\n").unwrap();
        let err = BackendTlsClient::new(&tls(Some(empty))).unwrap_err();
        assert!(err.to_string().contains("no CERTIFICATE"), "{err}");
        let key = rcgen::KeyPair::generate().unwrap();
        let ca = rcgen::CertificateParams::new(vec!["ca.example.test".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let good = dir.join("ca.pem");
        std::fs::write(&good, ca.pem()).unwrap();
        let client = BackendTlsClient::new(&tls(Some(good))).unwrap();
        assert_eq!(client.mode, TlsMode::Implicit);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
