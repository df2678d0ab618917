//! `backend_tls`: the rustls client that encrypts the hop to the backend, verifying its
//! certificate against `ca` (a PEM bundle) or the system's roots. The bundle is re-read like
//! the certificates ([`BackendTlsClient::reloaded`]): a CA rotated on disk is used without a
//! restart, and a broken bundle keeps the one in service.

use std::io;
use std::path::{Path, PathBuf};
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
    /// SHA-256 of the `ca` file as loaded, to notice a change; `None` with the system's roots.
    ca_digest: Option<Vec<u8>>,
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
        match &tls.ca {
            Some(path) => {
                let bytes = read_ca(path)?;
                Self::with_roots(tls, ca_roots(path, &bytes)?, Some(digest(&bytes)))
            }
            None => Self::with_roots(tls, system_roots()?, None),
        }
    }

    /// Re-reads `ca` (blocking: it reads a file): a new client when the file's bytes changed
    /// and still make a bundle, `None` when they did not change (or the system's roots are in
    /// use, which are read once), an error when the file cannot be used.
    pub fn reloaded(&self, tls: &BackendTls) -> Result<Option<BackendTlsClient>, TlsSetupError> {
        let Some(path) = &tls.ca else {
            return Ok(None);
        };
        let bytes = read_ca(path)?;
        let digest = digest(&bytes);
        if self.ca_digest.as_ref() == Some(&digest) {
            return Ok(None);
        }
        Self::with_roots(tls, ca_roots(path, &bytes)?, Some(digest)).map(Some)
    }

    fn with_roots(
        tls: &BackendTls,
        roots: RootCertStore,
        ca_digest: Option<Vec<u8>>,
    ) -> Result<BackendTlsClient, TlsSetupError> {
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
            ca_digest,
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

fn read_ca(path: &Path) -> Result<Vec<u8>, TlsSetupError> {
    std::fs::read(path).map_err(|e| TlsSetupError::Ca {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })
}

/// SHA-256 of a CA bundle, with rustls's own provider.
fn digest(bytes: &[u8]) -> Vec<u8> {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes)
        .as_ref()
        .to_vec()
}

fn ca_roots(path: &Path, bytes: &[u8]) -> Result<RootCertStore, TlsSetupError> {
    let fail = |detail: String| TlsSetupError::Ca {
        path: path.to_path_buf(),
        detail,
    };
    let certs = CertificateDer::pem_slice_iter(bytes)
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
        let client = BackendTlsClient::new(&tls(Some(good.clone()))).unwrap();
        assert_eq!(client.mode, TlsMode::Implicit);
        // Unchanged: nothing to swap. Changed and good: a new client. Broken: an error.
        assert!(client.reloaded(&tls(Some(good.clone()))).unwrap().is_none());
        let key = rcgen::KeyPair::generate().unwrap();
        let other = rcgen::CertificateParams::new(vec!["ca2.example.test".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        std::fs::write(&good, format!("{}{}", ca.pem(), other.pem())).unwrap();
        let next = client.reloaded(&tls(Some(good.clone()))).unwrap().unwrap();
        assert!(next.reloaded(&tls(Some(good.clone()))).unwrap().is_none());
        std::fs::write(&good, "no PEM here\n").unwrap();
        assert!(next.reloaded(&tls(Some(good.clone()))).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
