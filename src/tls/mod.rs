//! TLS: the certificate store with SNI selection and hot reload, the rustls server configuration,
//! the handshake with its deadline, and what it negotiated ([`TlsInfo`]).

pub mod hello;
pub mod names;
mod sigscheme;
mod store;
mod tickets;

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use rustls::server::{Accepted, Acceptor};
use rustls::{CipherSuite, NamedGroup, ProtocolVersion, ServerConfig};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_rustls::StartHandshake;
use tokio_rustls::server::TlsStream;

use crate::config::{MinTlsVersion, TlsConfig};

pub use store::{CertStore, LoadedCertificate, ReloadOutcome};
pub use tickets::{TicketKeyError, TicketKeys};

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

/// What protected a session, as rustls reports it. Names for the Received clause, the IMAP ID
/// field, the PROXY v2 SSL TLV, logs and metrics are made where they are written, from the
/// IANA tables in [`names`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsInfo {
    pub version: ProtocolVersion,
    pub cipher: CipherSuite,
    /// `None` when no key exchange happened (TLS 1.2 resumption).
    pub group: Option<NamedGroup>,
    /// The SNI the client sent, lowercased by rustls.
    pub sni: Option<String>,
    /// The scheme the server signed the handshake with (CertificateVerify in TLS 1.3,
    /// ServerKeyExchange in TLS 1.2); `None` on resumption, where nothing is signed. rustls 0.23
    /// does not report it, so [`Handshaker`] records what the certificate's key chose
    /// ([`sigscheme`]).
    pub signature_scheme: Option<rustls::SignatureScheme>,
}

impl TlsInfo {
    /// Reads the negotiated parameters of a finished handshake; `None` only if rustls has no
    /// version or suite, which it always has once the handshake is complete.
    pub fn from_connection(conn: &rustls::ServerConnection) -> Option<TlsInfo> {
        Some(TlsInfo {
            version: conn.protocol_version()?,
            cipher: conn.negotiated_cipher_suite()?.suite(),
            group: conn.negotiated_key_exchange_group().map(|g| g.name()),
            sni: conn.server_name().map(str::to_owned),
            signature_scheme: None,
        })
    }

    /// The IANA signature scheme name (`rsa_pss_rsae_sha256`), only when there is one.
    pub fn iana_signature_scheme_name(&self) -> Option<&'static str> {
        self.signature_scheme
            .and_then(|s| names::known_signature_scheme_name(u16::from(s)))
    }

    /// What the protocol machines know of this handshake.
    pub fn facts(&self) -> crate::machine::TlsFacts {
        crate::machine::TlsFacts {
            version: self.version,
            cipher: self.cipher,
            group: self.group,
        }
    }

    /// `TLSv1.2` or `TLSv1.3`.
    pub fn version_name(&self) -> Cow<'static, str> {
        names::protocol_version_name(self.version)
    }

    /// The IANA cipher suite name, e.g. `TLS_AES_256_GCM_SHA384`, or `0x…` hex.
    pub fn cipher_name(&self) -> Cow<'static, str> {
        names::cipher_suite_name(u16::from(self.cipher))
    }

    /// The IANA group name, `0x…` hex for one without a name, `none` without a key exchange:
    /// the form logs and metric labels use.
    pub fn group_name(&self) -> Cow<'static, str> {
        match self.group {
            Some(group) => names::group_name(u16::from(group)),
            None => Cow::Borrowed("none"),
        }
    }

    /// The IANA group name, only when there is one (the Received `group` clause has no hex form).
    pub fn iana_group_name(&self) -> Option<&'static str> {
        self.group
            .and_then(|group| names::known_group_name(u16::from(group)))
    }
}

/// Why a handshake failed, as a small fixed set for metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeFailure {
    Timeout,
    /// The client offers no TLS version this server accepts (TLS 1.0/1.1, or TLS 1.2 when
    /// `tls.min_version` is 1.3).
    ProtocolVersion,
    NoSharedCipher,
    BadCertificate,
    /// The connection closed (FIN or reset) before the client sent a single octet: a TCP health
    /// check from a load balancer or kubelet, not a TLS client.
    ClosedBeforeHello,
    Io,
    Other,
}

impl HandshakeFailure {
    pub const ALL: [HandshakeFailure; 7] = [
        HandshakeFailure::Timeout,
        HandshakeFailure::ProtocolVersion,
        HandshakeFailure::NoSharedCipher,
        HandshakeFailure::BadCertificate,
        HandshakeFailure::ClosedBeforeHello,
        HandshakeFailure::Io,
        HandshakeFailure::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            HandshakeFailure::Timeout => "timeout",
            HandshakeFailure::ProtocolVersion => "protocol_version",
            HandshakeFailure::NoSharedCipher => "no_shared_cipher",
            HandshakeFailure::BadCertificate => "bad_certificate",
            HandshakeFailure::ClosedBeforeHello => "closed_before_hello",
            HandshakeFailure::Io => "io",
            HandshakeFailure::Other => "other",
        }
    }

    fn classify(err: &std::io::Error) -> HandshakeFailure {
        match err
            .get_ref()
            .and_then(|e| e.downcast_ref::<rustls::Error>())
        {
            Some(tls) => HandshakeFailure::classify_tls(tls),
            None => HandshakeFailure::Io,
        }
    }

    fn classify_tls(tls: &rustls::Error) -> HandshakeFailure {
        use rustls::{AlertDescription as A, Error as E, PeerIncompatible as P};
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

impl HandshakeError {
    /// The `detail` of the close log line: the reason class and the cause, e.g.
    /// `no_shared_cipher: peer is incompatible: NoCipherSuitesInCommon`.
    pub fn detail(&self) -> String {
        format!("{}: {}", self.reason.as_str(), self.message)
    }
}

/// Builds the rustls server config: TLS 1.2+ (or 1.3 only), the aws-lc-rs provider's suites
/// (all ECDHE + AEAD, RFC 9325) and groups (X25519MLKEM768 first), certificates by SNI, and
/// `tls.session_tickets` tickets sealed with `ticket_keys` (shared by replicas) or, without
/// them, with rustls' own ticketer (a key of this process, rotated every 6 hours).
pub fn server_config(
    tls: &TlsConfig,
    store: Arc<CertStore>,
    ticket_keys: Option<Arc<TicketKeys>>,
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
    config.send_tls13_tickets = tls.session_tickets;
    // Stateless tickets: nothing kept per ticket, and a ticket opens on any replica with the
    // same keys. With tickets off, no TLS 1.2 ticket either (the ticketer stays disabled).
    if tls.session_tickets > 0 {
        config.ticketer = match ticket_keys {
            Some(keys) => keys,
            None => rustls::crypto::aws_lc_rs::Ticketer::new()?,
        };
    }
    Ok(Arc::new(config))
}

/// The versions a server with this minimum accepts, as wire values for [`hello::Offered`]; the
/// same set [`server_config`] gives rustls.
fn accepted_versions(min: MinTlsVersion) -> &'static [u16] {
    match min {
        MinTlsVersion::Tls12 => &[hello::TLS1_3, hello::TLS1_2],
        MinTlsVersion::Tls13 => &[hello::TLS1_3],
    }
}

/// A fatal protocol_version alert (RFC 8446 §6.2, RFC 5246 §7.2.2) in a plaintext record.
/// rustls sends handshake_failure for a TLS 1.0/1.1 ClientHello (it misses signature_algorithms
/// before the version is looked at); a client told protocol_version can say why it failed.
const PROTOCOL_VERSION_ALERT: [u8; 7] = [21, 3, 3, 0, 2, 2, 70];

/// Octets read from the socket at a time once the first record has been looked at.
const READ_CHUNK: usize = 4096;

/// Runs server handshakes with one deadline covering the whole exchange.
#[derive(Clone)]
pub struct Handshaker {
    config: Arc<ServerConfig>,
    accepted: &'static [u16],
    timeout: Duration,
}

impl Handshaker {
    /// `min_version` must be the one `config` was built with ([`server_config`]): it decides
    /// which ClientHellos count as `protocol_version` failures.
    pub fn new(
        config: Arc<ServerConfig>,
        timeout: Duration,
        min_version: MinTlsVersion,
    ) -> Handshaker {
        Handshaker {
            config,
            accepted: accepted_versions(min_version),
            timeout,
        }
    }

    /// `tls.handshake_timeout`.
    pub fn timeout(&self) -> Duration {
        self.timeout
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
        match tokio::time::timeout(self.timeout, self.handshake(io)).await {
            Err(_) => Err(HandshakeError {
                reason: HandshakeFailure::Timeout,
                message: format!("no handshake within {:?}", self.timeout),
            }),
            Ok(Err(e)) => Err(e),
            Ok(Ok((stream, chosen))) => match TlsInfo::from_connection(stream.get_ref().1) {
                Some(mut info) => {
                    info.signature_scheme = chosen.get();
                    Ok((stream, info, started.elapsed()))
                }
                None => Err(HandshakeError {
                    reason: HandshakeFailure::Other,
                    message: "handshake complete without a negotiated version and suite".to_owned(),
                }),
            },
        }
    }

    /// Reads the ClientHello through rustls' [`Acceptor`], keeping the first record long enough
    /// to read its versions ([`hello::sniff`]), then finishes the handshake in tokio-rustls.
    ///
    /// The only cost on a successful handshake is one extra copy of the ClientHello (typically
    /// under 2 KiB), from this buffer into rustls'; after the hello, tokio-rustls reads the
    /// socket directly. [`tokio::net::TcpStream::peek`] would save that copy but cannot wait
    /// for the rest of a record split across TCP segments (a post-quantum key share makes most
    /// ClientHellos two segments) without polling.
    async fn handshake<IO>(
        &self,
        mut io: IO,
    ) -> Result<(TlsStream<IO>, sigscheme::Chosen), HandshakeError>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let mut acceptor = Acceptor::default();
        let mut buf: Vec<u8> = Vec::with_capacity(READ_CHUNK);
        let mut sniff = hello::Sniff::NeedMore;
        let mut received_any = false;
        let accepted: Accepted = loop {
            // Everything read goes to rustls; `buf` keeps bytes only while the first record
            // is incomplete, so it never holds more than `hello::MAX_FIRST_RECORD`.
            let limit = if sniff == hello::Sniff::NeedMore {
                hello::MAX_FIRST_RECORD.saturating_sub(buf.len())
            } else {
                buf.clear();
                READ_CHUNK
            };
            let start = buf.len();
            buf.reserve(limit.min(READ_CHUNK));
            let n = match (&mut io).take(limit as u64).read_buf(&mut buf).await {
                Ok(n) => n,
                Err(e) if !received_any && is_reset(&e) => return Err(closed_before_hello()),
                Err(e) => return Err(self.failure(HandshakeFailure::Io, sniff, e.to_string())),
            };
            if n == 0 {
                if !received_any {
                    return Err(closed_before_hello());
                }
                return Err(self.failure(
                    HandshakeFailure::Io,
                    sniff,
                    "connection closed before the ClientHello was complete".to_owned(),
                ));
            }
            received_any = true;
            if let Err(e) = feed(&mut acceptor, buf.get(start..).unwrap_or_default()) {
                // rustls refuses to buffer more: a ClientHello beyond any sane size.
                return Err(self.failure(HandshakeFailure::Other, sniff, e.to_string()));
            }
            if sniff == hello::Sniff::NeedMore {
                sniff = hello::sniff(&buf);
            }
            match acceptor.accept() {
                Ok(Some(accepted)) => break accepted,
                Ok(None) => {}
                Err((e, mut alert)) => {
                    let error =
                        self.failure(HandshakeFailure::classify_tls(&e), sniff, e.to_string());
                    let mut out = Vec::new();
                    if error.reason == HandshakeFailure::ProtocolVersion {
                        out.extend_from_slice(&PROTOCOL_VERSION_ALERT);
                    } else {
                        while alert.write(&mut out).is_ok_and(|n| n > 0) {}
                    }
                    // Best effort: the client may already be gone; the deadline bounds it.
                    let _ = io.write_all(&out).await;
                    let _ = io.flush().await;
                    return Err(error);
                }
            }
        };
        let (config, chosen) = sigscheme::recording(&self.config);
        StartHandshake::from_parts(accepted, io)
            .into_stream(config)
            .await
            .map(|stream| (stream, chosen))
            .map_err(|e| self.failure(HandshakeFailure::classify(&e), sniff, e.to_string()))
    }

    /// The failure to report: `protocol_version` when the ClientHello offered no version this
    /// server accepts, whatever rustls tripped over first; otherwise rustls' reason.
    fn failure(
        &self,
        reason: HandshakeFailure,
        sniff: hello::Sniff,
        message: String,
    ) -> HandshakeError {
        match sniff {
            hello::Sniff::Offered(offered) if !offered.any_of(self.accepted) => HandshakeError {
                reason: HandshakeFailure::ProtocolVersion,
                message: format!(
                    "client offers at most {}: {message}",
                    offered
                        .highest()
                        .map(
                            |v| names::protocol_version_name(rustls::ProtocolVersion::from(v))
                                .into_owned()
                        )
                        .unwrap_or_else(|| "no known version".to_owned())
                ),
            },
            _ => HandshakeError { reason, message },
        }
    }
}

/// Hands `bytes` to the acceptor, all of them (rustls takes at most one buffer's worth a call).
fn feed(acceptor: &mut Acceptor, mut bytes: &[u8]) -> std::io::Result<()> {
    while !bytes.is_empty() {
        if acceptor.read_tls(&mut bytes)? == 0 {
            break;
        }
    }
    Ok(())
}

fn is_reset(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::ConnectionAborted
    )
}

fn closed_before_hello() -> HandshakeError {
    HandshakeError {
        reason: HandshakeFailure::ClosedBeforeHello,
        message: "connection closed before any ClientHello octet".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;
    use tokio::io::{DuplexStream, duplex};

    const TLS1_0_HELLO: &[u8] = include_bytes!("../../tests/data/client_hello/openssl-tls1_0.bin");
    const TLS1_2_HELLO: &[u8] = include_bytes!("../../tests/data/client_hello/openssl-tls1_2.bin");

    fn handshaker(min: MinTlsVersion, timeout: Duration) -> Handshaker {
        let tls = TlsConfig {
            certificates: Vec::new(),
            min_version: min,
            handshake_timeout: timeout,
            reload_interval: Duration::from_secs(5),
            session_tickets: 2,
            ticket_key_file: None,
        };
        let store = Arc::new(CertStore::load(&[], "mx.example.test").unwrap());
        Handshaker::new(server_config(&tls, store, None).unwrap(), timeout, min)
    }

    /// A ClientHello as rustls sends it: TLS 1.2 and 1.3, an X25519MLKEM768 key share.
    fn rustls_hello() -> Vec<u8> {
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
        let name = rustls_pki_types::ServerName::try_from("mx.example.test").unwrap();
        let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        let mut out = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut out).unwrap();
        }
        out
    }

    /// Writes `bytes` one octet at a time, then waits for the server's answer until it closes.
    async fn dribble(mut client: DuplexStream, bytes: Vec<u8>) -> Vec<u8> {
        for b in bytes {
            client.write_all(&[b]).await.unwrap();
            tokio::task::yield_now().await;
        }
        let mut answer = Vec::new();
        let mut chunk = [0u8; 4096];
        // Enough to see the server's first flight; the test drops the server side after.
        while let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(200), client.read(&mut chunk)).await
        {
            if n == 0 {
                break;
            }
            answer.extend_from_slice(chunk.get(..n).unwrap());
        }
        answer
    }

    #[tokio::test]
    async fn a_hello_arriving_octet_by_octet_is_answered_with_a_server_hello() {
        let (client, server) = duplex(64);
        let client = tokio::spawn(dribble(client, rustls_hello()));
        let h = handshaker(MinTlsVersion::Tls12, Duration::from_secs(5));
        // The client reads the first flight and hangs up: an I/O failure, nothing else.
        let err = h.accept(server).await.err().unwrap();
        assert_eq!(err.reason, HandshakeFailure::Io);
        let answer = client.await.unwrap();
        // A handshake record carrying a ServerHello (RFC 8446 §4.1.3).
        assert_eq!(answer.first(), Some(&22));
        assert_eq!(answer.get(5), Some(&2), "{answer:?}");
    }

    #[tokio::test]
    async fn a_tls1_0_hello_octet_by_octet_is_a_protocol_version_failure() {
        let (client, server) = duplex(64);
        let client = tokio::spawn(dribble(client, TLS1_0_HELLO.to_vec()));
        let h = handshaker(MinTlsVersion::Tls12, Duration::from_secs(5));
        let err = h.accept(server).await.err().unwrap();
        assert_eq!(err.reason, HandshakeFailure::ProtocolVersion);
        assert!(err.message.contains("TLSv1"), "{}", err.message);
        assert_eq!(client.await.unwrap(), PROTOCOL_VERSION_ALERT);
    }

    #[tokio::test]
    async fn a_tls1_2_hello_is_a_protocol_version_failure_only_under_min_1_3() {
        let (client, server) = duplex(4096);
        let client = tokio::spawn(dribble(client, TLS1_2_HELLO.to_vec()));
        let h = handshaker(MinTlsVersion::Tls13, Duration::from_secs(5));
        let err = h.accept(server).await.err().unwrap();
        assert_eq!(err.reason, HandshakeFailure::ProtocolVersion);
        assert_eq!(client.await.unwrap(), PROTOCOL_VERSION_ALERT);

        let (client, server) = duplex(4096);
        let client = tokio::spawn(dribble(client, TLS1_2_HELLO.to_vec()));
        let h = handshaker(MinTlsVersion::Tls12, Duration::from_secs(5));
        let err = h.accept(server).await.err().unwrap();
        assert_eq!(err.reason, HandshakeFailure::Io);
        assert_eq!(client.await.unwrap().get(5), Some(&2));
    }

    #[tokio::test]
    async fn closing_before_a_byte_is_not_an_io_failure_but_closing_midway_is() {
        let h = handshaker(MinTlsVersion::Tls12, Duration::from_secs(5));
        let (client, server) = duplex(64);
        drop(client);
        let err = h.accept(server).await.err().unwrap();
        assert_eq!(err.reason, HandshakeFailure::ClosedBeforeHello);

        let (mut client, server) = duplex(64);
        client.write_all(&TLS1_0_HELLO[..20]).await.unwrap();
        drop(client);
        let err = h.accept(server).await.err().unwrap();
        assert_eq!(err.reason, HandshakeFailure::Io);
    }

    #[tokio::test]
    async fn silence_is_a_timeout() {
        let h = handshaker(MinTlsVersion::Tls12, Duration::from_millis(50));
        let (_client, server) = duplex(64);
        let err = h.accept(server).await.err().unwrap();
        assert_eq!(err.reason, HandshakeFailure::Timeout);
        // The close line's detail says what failed and why, not just that it did.
        assert_eq!(err.detail(), "timeout: no handshake within 50ms");
    }
}
