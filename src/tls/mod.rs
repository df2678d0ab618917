//! TLS: the certificate store with SNI selection and hot reload, the rustls server configuration,
//! the handshake with its deadline, and what it negotiated ([`TlsInfo`]).

pub mod names;
mod store;

use std::sync::Arc;
use std::time::Duration;

use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::config::{MinTlsVersion, TlsConfig};

pub use store::{CertStore, LoadedCertificate, ReloadOutcome};

/// Problems loading certificates or building the TLS configuration.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("tls.certificates[{index}].{field}: cannot read {path}: {source}")]
    Read {
        index: usize,
        field: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("tls.certificates[{index}].{field}: {path}: {problem}")]
    Pem {
        index: usize,
        field: &'static str,
        path: String,
        problem: String,
    },
    #[error("tls.certificates[{index}]: {problem}")]
    Mismatch { index: usize, problem: String },
    #[error("cannot make a self-signed certificate: {0}")]
    SelfSigned(String),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// What protected a session: every field the Received clause, ID field, logs and metrics need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsInfo {
    /// `TLSv1.2` or `TLSv1.3`.
    pub version: String,
    /// IANA cipher suite name, e.g. `TLS_AES_256_GCM_SHA384`.
    pub cipher: String,
    /// IANA group name, `None` when no key exchange happened (TLS 1.2 resumption) or unknown.
    pub group: Option<String>,
    /// Group name or hex code for logs and metrics (`none` when absent).
    pub group_label: String,
    /// The SNI the client sent, lowercased by rustls.
    pub sni: Option<String>,
}

impl TlsInfo {
    /// Reads the negotiated parameters of a finished handshake.
    pub fn from_connection(conn: &rustls::ServerConnection) -> TlsInfo {
        let version = conn
            .protocol_version()
            .map(|v| names::protocol_version_name(v).into_owned())
            .unwrap_or_else(|| "unknown".to_owned());
        let cipher = conn
            .negotiated_cipher_suite()
            .map(|s| names::cipher_suite_name(u16::from(s.suite())).into_owned())
            .unwrap_or_else(|| "unknown".to_owned());
        let group_code = conn
            .negotiated_key_exchange_group()
            .map(|g| u16::from(g.name()));
        TlsInfo {
            version,
            cipher,
            group: group_code
                .and_then(names::known_group_name)
                .map(str::to_owned),
            group_label: group_code
                .map(|c| names::group_name(c).into_owned())
                .unwrap_or_else(|| "none".to_owned()),
            sni: conn.server_name().map(str::to_owned),
        }
    }
}

/// Why a handshake failed, as a small fixed set for metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeFailure {
    Timeout,
    ProtocolVersion,
    NoSharedCipher,
    BadCertificate,
    Io,
    Other,
}

impl HandshakeFailure {
    pub const ALL: [HandshakeFailure; 6] = [
        HandshakeFailure::Timeout,
        HandshakeFailure::ProtocolVersion,
        HandshakeFailure::NoSharedCipher,
        HandshakeFailure::BadCertificate,
        HandshakeFailure::Io,
        HandshakeFailure::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            HandshakeFailure::Timeout => "timeout",
            HandshakeFailure::ProtocolVersion => "protocol_version",
            HandshakeFailure::NoSharedCipher => "no_shared_cipher",
            HandshakeFailure::BadCertificate => "bad_certificate",
            HandshakeFailure::Io => "io",
            HandshakeFailure::Other => "other",
        }
    }

    fn classify(err: &std::io::Error) -> HandshakeFailure {
        use rustls::{AlertDescription as A, Error as E, PeerIncompatible as P};
        let Some(tls) = err
            .get_ref()
            .and_then(|e| e.downcast_ref::<rustls::Error>())
        else {
            return HandshakeFailure::Io;
        };
        match tls {
            E::PeerIncompatible(
                P::Tls12NotOffered
                | P::Tls12NotOfferedOrEnabled
                | P::Tls13RequiredForQuic
                | P::SupportedVersionsExtensionRequired,
            )
            | E::AlertReceived(A::ProtocolVersion) => HandshakeFailure::ProtocolVersion,
            E::PeerIncompatible(
                P::NoCipherSuitesInCommon | P::NoKxGroupsInCommon | P::NoSignatureSchemesInCommon,
            )
            | E::AlertReceived(A::HandshakeFailure | A::InsufficientSecurity) => {
                HandshakeFailure::NoSharedCipher
            }
            E::AlertReceived(
                A::BadCertificate
                | A::UnknownCA
                | A::CertificateUnknown
                | A::CertificateExpired
                | A::UnsupportedCertificate,
            ) => HandshakeFailure::BadCertificate,
            _ => HandshakeFailure::Other,
        }
    }
}

/// A failed handshake: the reason class and a message for the log.
#[derive(Debug, thiserror::Error)]
#[error("TLS handshake failed ({}): {message}", .reason.as_str())]
pub struct HandshakeError {
    pub reason: HandshakeFailure,
    pub message: String,
}

/// Builds the rustls server config: TLS 1.2+ (or 1.3 only), the aws-lc-rs provider's suites
/// (all ECDHE + AEAD, RFC 9325) and groups (X25519MLKEM768 first), certificates by SNI.
pub fn server_config(
    tls: &TlsConfig,
    store: Arc<CertStore>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let versions: &[&rustls::SupportedProtocolVersion] = match tls.min_version {
        MinTlsVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        MinTlsVersion::Tls13 => &[&rustls::version::TLS13],
    };
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)?
        .with_no_client_auth()
        .with_cert_resolver(store);
    // Mail clients do not negotiate ALPN; none is offered.
    config.ignore_client_order = false;
    Ok(Arc::new(config))
}

/// Runs server handshakes with one deadline covering the whole exchange.
#[derive(Clone)]
pub struct Handshaker {
    acceptor: TlsAcceptor,
    timeout: Duration,
}

impl Handshaker {
    pub fn new(config: Arc<ServerConfig>, timeout: Duration) -> Handshaker {
        Handshaker {
            acceptor: TlsAcceptor::from(config),
            timeout,
        }
    }

    /// Performs the server side of a handshake; returns the stream, what was negotiated, and
    /// how long it took.
    pub async fn accept<IO>(
        &self,
        io: IO,
    ) -> Result<(TlsStream<IO>, TlsInfo, Duration), HandshakeError>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        // tokio's clock, so a test with tokio::time::pause sees the handshake take paused time.
        let started = tokio::time::Instant::now();
        match tokio::time::timeout(self.timeout, self.acceptor.accept(io)).await {
            Err(_) => Err(HandshakeError {
                reason: HandshakeFailure::Timeout,
                message: format!("no handshake within {:?}", self.timeout),
            }),
            Ok(Err(e)) => Err(HandshakeError {
                reason: HandshakeFailure::classify(&e),
                message: e.to_string(),
            }),
            Ok(Ok(stream)) => {
                let info = TlsInfo::from_connection(stream.get_ref().1);
                Ok((stream, info, started.elapsed()))
            }
        }
    }
}
