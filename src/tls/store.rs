//! The certificate store: an atomically swapped SNI map, so a reload never disturbs a handshake
//! in progress or a live session, and a broken file on reload keeps the old certificates.
//!
//! One name may have one certificate per key type (an ECDSA and an RSA certificate, as nginx
//! and Postfix allow): the handshake gets the ECDSA one when the client can verify it (its
//! signature schemes, and for TLS 1.2 its cipher suites) and the RSA one otherwise, because
//! the legacy clients this proxy exists for often know RSA only.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;
use aws_lc_rs::digest;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{CipherSuite, SignatureAlgorithm, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use zeroize::Zeroizing;

use super::TlsError;
use crate::config::CertificateSection;

/// One certificate as loaded, for logs and the expiry metric.
#[derive(Debug, Clone)]
pub struct LoadedCertificate {
    /// A stable label, unique per certificate in service: its file path (the hostname for the
    /// self-signed fallback). Two certificates for one name (ECDSA and RSA) differ here.
    pub label: String,
    /// DNS names the certificate is selected for.
    pub names: Vec<String>,
    /// notAfter of the leaf, as a Unix timestamp.
    pub not_after: i64,
    pub self_signed: bool,
    /// `ECDSA`, `RSA`, `Ed25519`…: the key type, one certificate of each per name.
    pub key_type: String,
    /// Names this certificate can never be served for: an earlier certificate has the same
    /// name and the same key type, and the first listed wins.
    pub shadowed: Vec<String>,
}

impl LoadedCertificate {
    /// What `mailfront check` and the logs warn about: names this certificate never serves.
    pub fn shadowed_warning(&self) -> Option<String> {
        (!self.shadowed.is_empty()).then(|| {
            format!(
                "certificate {} ({}) is never served for {}: an earlier tls.certificates entry has the same name and key type, and the first listed wins",
                self.label,
                self.key_type,
                self.shadowed.join(", ")
            )
        })
    }
}

/// The certificates for one name, at most one per key type, most preferred first (ECDSA, then
/// EdDSA, then RSA); never empty.
#[derive(Clone)]
struct Candidates(Vec<Arc<CertifiedKey>>);

impl Candidates {
    /// Adds `key` unless one of its type is there already; false when it was shadowed.
    fn add(&mut self, key: &Arc<CertifiedKey>) -> bool {
        let algorithm = key.key.algorithm();
        if self.0.iter().any(|k| k.key.algorithm() == algorithm) {
            return false;
        }
        self.0.push(key.clone());
        self.0.sort_by_key(|k| preference(k.key.algorithm()));
        true
    }

    /// The first candidate the client can use, else the most preferred (the handshake then
    /// fails as it would have with that one alone).
    fn choose(
        &self,
        schemes: &[SignatureScheme],
        suites: &[CipherSuite],
        provider: &CryptoProvider,
    ) -> Option<Arc<CertifiedKey>> {
        if self.0.len() > 1 {
            for key in &self.0 {
                if suites_allow(key.key.algorithm(), suites, provider)
                    && key.key.choose_scheme(schemes).is_some()
                {
                    return Some(key.clone());
                }
            }
        }
        self.0.first().cloned()
    }
}

/// Lower is preferred: ECDSA signatures are smaller and cheaper than RSA ones.
fn preference(algorithm: SignatureAlgorithm) -> u8 {
    match algorithm {
        SignatureAlgorithm::ECDSA => 0,
        SignatureAlgorithm::ED25519 | SignatureAlgorithm::ED448 => 1,
        SignatureAlgorithm::RSA => 2,
        _ => 3,
    }
}

/// Whether the client offers a cipher suite this server has that works with a key of this
/// type: any TLS 1.3 suite, or a TLS 1.2 `ECDHE_ECDSA_*` / `ECDHE_RSA_*` one as the key needs
/// (RFC 5246 §7.4.2). A TLS 1.2 client with only RSA suites may still list ECDSA signature
/// schemes, so the schemes alone do not decide.
fn suites_allow(
    algorithm: SignatureAlgorithm,
    suites: &[CipherSuite],
    provider: &CryptoProvider,
) -> bool {
    provider.cipher_suites.iter().any(|ours| {
        suites.contains(&ours.suite()) && ours.usable_for_signature_algorithm(algorithm)
    })
}

fn key_type_name(algorithm: SignatureAlgorithm) -> String {
    match algorithm {
        SignatureAlgorithm::ECDSA => "ECDSA".to_owned(),
        SignatureAlgorithm::RSA => "RSA".to_owned(),
        SignatureAlgorithm::ED25519 => "Ed25519".to_owned(),
        SignatureAlgorithm::ED448 => "Ed448".to_owned(),
        other => format!("{other:?}"),
    }
}

struct CertMap {
    exact: HashMap<String, Candidates>,
    /// Keyed by the parent domain of a `*.parent` name.
    wildcard: HashMap<String, Candidates>,
    /// For a client without SNI, or with a name no certificate has: the first certificate of
    /// each key type, in the order listed.
    default: Candidates,
    loaded: Vec<LoadedCertificate>,
    /// A SHA-256 over every file as read, to notice changes cheaply without keeping the
    /// private key's bytes around; empty for the self-signed fallback, which has no files.
    fingerprint: Fingerprint,
}

/// What a reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReloadOutcome {
    Unchanged,
    Reloaded,
}

/// Certificates chosen by SNI, swappable at run time.
pub struct CertStore {
    sources: Vec<CertificateSection>,
    hostname: String,
    provider: Arc<CryptoProvider>,
    current: ArcSwap<CertMap>,
}

impl fmt::Debug for CertStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertStore")
            .field("sources", &self.sources)
            .field("loaded", &self.current.load().loaded)
            .finish()
    }
}

impl CertStore {
    /// Loads the configured certificates, or makes a self-signed one for `hostname` when none is
    /// configured. Any unreadable, unparsable or mismatched file is an error naming it.
    pub fn load(sources: &[CertificateSection], hostname: &str) -> Result<CertStore, TlsError> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let map = build_map(sources, hostname, &provider)?;
        Ok(CertStore {
            sources: sources.to_vec(),
            hostname: hostname.to_owned(),
            provider,
            current: ArcSwap::from_pointee(map),
        })
    }

    /// Whether the store runs on a generated self-signed certificate.
    pub fn is_self_signed(&self) -> bool {
        self.sources.is_empty()
    }

    /// The certificates now in service.
    pub fn loaded(&self) -> Vec<LoadedCertificate> {
        self.current.load().loaded.clone()
    }

    /// Re-reads the files; swaps in the new set only if every file loads and the bytes changed
    /// (or `force`). On error the old certificates stay in service.
    pub fn reload(&self, force: bool) -> Result<ReloadOutcome, TlsError> {
        if self.sources.is_empty() {
            return Ok(ReloadOutcome::Unchanged);
        }
        if !force {
            // A read error here is reported by the full load below.
            if let Ok(fingerprint) = read_fingerprint(&self.sources)
                && fingerprint == self.current.load().fingerprint
            {
                return Ok(ReloadOutcome::Unchanged);
            }
        }
        let map = build_map(&self.sources, &self.hostname, &self.provider)?;
        if !force && map.fingerprint == self.current.load().fingerprint {
            return Ok(ReloadOutcome::Unchanged);
        }
        self.current.store(Arc::new(map));
        Ok(ReloadOutcome::Reloaded)
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let map = self.current.load();
        let candidates = match client_hello.server_name() {
            None => &map.default,
            Some(name) => {
                let name = name.to_ascii_lowercase();
                if let Some(candidates) = map.exact.get(&name) {
                    candidates
                } else if let Some((_, parent)) = name.split_once('.')
                    && let Some(candidates) = map.wildcard.get(parent)
                {
                    candidates
                } else {
                    &map.default
                }
            }
        };
        candidates.choose(
            client_hello.signature_schemes(),
            client_hello.cipher_suites(),
            &self.provider,
        )
    }
}

/// SHA-256 over the configured files. A collision-resistant hash, so a changed file cannot
/// look unchanged (std's `DefaultHasher` makes no such promise); aws-lc-rs is rustls's own
/// crypto provider, so it adds nothing to the build.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Fingerprint(Vec<u8>);

/// Feeds the files, in order, to one hash: each length-prefixed, so moving bytes from one file
/// to the next changes the result.
struct FingerprintBuilder(digest::Context);

impl FingerprintBuilder {
    fn new() -> Self {
        FingerprintBuilder(digest::Context::new(&digest::SHA256))
    }

    fn add(&mut self, bytes: &[u8]) {
        self.0.update(&(bytes.len() as u64).to_le_bytes());
        self.0.update(bytes);
    }

    fn finish(self) -> Fingerprint {
        Fingerprint(self.0.finish().as_ref().to_vec())
    }
}

/// Adds `key` to `name`'s candidates; false when one of its key type is there already.
fn add_candidate(
    map: &mut HashMap<String, Candidates>,
    name: &str,
    key: &Arc<CertifiedKey>,
) -> bool {
    match map.get_mut(name) {
        Some(candidates) => candidates.add(key),
        None => {
            map.insert(name.to_owned(), Candidates(vec![key.clone()]));
            true
        }
    }
}

fn read_fingerprint(sources: &[CertificateSection]) -> std::io::Result<Fingerprint> {
    let mut fingerprint = FingerprintBuilder::new();
    for source in sources {
        for path in [&source.cert, &source.key] {
            // Wiped on drop: the key file is read here only to be hashed.
            let bytes = Zeroizing::new(std::fs::read(path)?);
            fingerprint.add(&bytes);
        }
    }
    Ok(fingerprint.finish())
}

fn build_map(
    sources: &[CertificateSection],
    hostname: &str,
    provider: &CryptoProvider,
) -> Result<CertMap, TlsError> {
    if sources.is_empty() {
        return self_signed_map(hostname, provider);
    }
    let mut exact: HashMap<String, Candidates> = HashMap::new();
    let mut wildcard: HashMap<String, Candidates> = HashMap::new();
    let mut loaded = Vec::new();
    let mut default: Option<Candidates> = None;
    let mut fingerprint = FingerprintBuilder::new();
    for (index, source) in sources.iter().enumerate() {
        let cert_bytes = read_file(index, "cert", &source.cert)?;
        // The PEM text of the private key: wiped when this iteration ends, once parsed.
        let key_bytes = Zeroizing::new(read_file(index, "key", &source.key)?);
        fingerprint.add(&cert_bytes);
        fingerprint.add(&key_bytes);
        let certified = certified_key(&cert_bytes, &key_bytes, provider).map_err(|e| match e {
            PairError::Cert(problem) => pem_error(index, "cert", &source.cert, problem),
            PairError::Key(problem) => pem_error(index, "key", &source.key, problem),
            PairError::Mismatch(e) => TlsError::Mismatch {
                index,
                problem: format!(
                    "key {} does not belong to certificate {}: {e}",
                    source.key.display(),
                    source.cert.display()
                ),
            },
        })?;
        let mut info = describe(&certified, &source.cert.display().to_string(), false)
            .map_err(|problem| pem_error(index, "cert", &source.cert, problem))?;
        let certified = Arc::new(certified);
        for name in &info.names {
            let name = name.to_ascii_lowercase();
            // Per key type, the first certificate listed for a name wins, as the order in the
            // file says; a later one of the same type is reported, never served for that name.
            let added = match name.strip_prefix("*.") {
                Some(parent) => add_candidate(&mut wildcard, parent, &certified),
                None => add_candidate(&mut exact, &name, &certified),
            };
            if !added {
                info.shadowed.push(name);
            }
        }
        match &mut default {
            Some(default) => {
                default.add(&certified);
            }
            None => default = Some(Candidates(vec![certified.clone()])),
        }
        loaded.push(info);
    }
    let Some(default) = default else {
        return self_signed_map(hostname, provider);
    };
    Ok(CertMap {
        exact,
        wildcard,
        default,
        loaded,
        fingerprint: fingerprint.finish(),
    })
}

/// Why a certificate file and a key file do not make a certified key: each names its file's
/// real problem, so a file that is not a certificate is not reported as a key mismatch.
#[derive(Debug)]
enum PairError {
    Cert(String),
    Key(String),
    Mismatch(rustls::Error),
}

/// The chain of a PEM certificate file and the key of a PEM key file, checked in the order
/// that names the first real problem: the certificate file holds certificates that parse as
/// X.509, the key file a key the provider can sign with, and only then that the two belong
/// together.
fn certified_key(
    cert_bytes: &[u8],
    key_bytes: &[u8],
    provider: &CryptoProvider,
) -> Result<CertifiedKey, PairError> {
    use rustls_pki_types::pem::Error as PemError;
    let chain = CertificateDer::pem_slice_iter(cert_bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PairError::Cert(format!("not a valid PEM file: {e}")))?;
    if chain.is_empty() {
        return Err(PairError::Cert(format!(
            "no PEM certificate found: {}",
            what_is_in(cert_bytes, Wanted::Certificate)
        )));
    }
    for (n, der) in chain.iter().enumerate() {
        if let Err(e) = x509_parser::parse_x509_certificate(der.as_ref()) {
            return Err(PairError::Cert(format!(
                "CERTIFICATE block {} of {} is not an X.509 certificate: {e}",
                n + 1,
                chain.len()
            )));
        }
    }
    let key = PrivateKeyDer::from_pem_slice(key_bytes).map_err(|e| {
        PairError::Key(match e {
            PemError::NoItemsFound => format!(
                "no PEM private key found: {}",
                what_is_in(key_bytes, Wanted::PrivateKey)
            ),
            e => format!("not a valid PEM file: {e}"),
        })
    })?;
    let signing_key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| PairError::Key(format!("the private key cannot be used: {e}")))?;
    let certified = CertifiedKey::new(chain, signing_key);
    match certified.keys_match() {
        // rustls' own rule (`CertifiedKey::from_der`): a key whose public half the provider
        // cannot tell is not refused.
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {
            Ok(certified)
        }
        Err(e @ rustls::Error::InconsistentKeys(_)) => Err(PairError::Mismatch(e)),
        Err(e) => Err(PairError::Cert(format!(
            "cannot read the certificate's public key: {e}"
        ))),
    }
}

/// What a PEM file was searched for.
#[derive(Clone, Copy)]
enum Wanted {
    Certificate,
    PrivateKey,
}

/// Says what a file holds instead of the PEM block it should: nothing, other PEM blocks (a key
/// where the certificate belongs, or the reverse), DER, or text that is not PEM.
fn what_is_in(bytes: &[u8], wanted: Wanted) -> String {
    use rustls_pki_types::pem::SectionKind;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return "the file is empty".into();
    }
    let mut kinds: Vec<&str> = Vec::new();
    for (kind, der) in <(SectionKind, Vec<u8>)>::pem_slice_iter(bytes).map_while(Result::ok) {
        // The decoded bytes may be a private key: wiped at once, only the kind is kept.
        drop(Zeroizing::new(der));
        let name = match kind {
            SectionKind::Certificate => "CERTIFICATE",
            SectionKind::PrivateKey => "PRIVATE KEY",
            SectionKind::RsaPrivateKey => "RSA PRIVATE KEY",
            SectionKind::EcPrivateKey => "EC PRIVATE KEY",
            SectionKind::PublicKey => "PUBLIC KEY",
            SectionKind::Csr => "CERTIFICATE REQUEST",
            SectionKind::Crl => "X509 CRL",
            _ => "other",
        };
        if !kinds.contains(&name) {
            kinds.push(name);
        }
    }
    let (begin, swapped, der_hint) = match wanted {
        Wanted::Certificate => (
            "-----BEGIN CERTIFICATE-----",
            "is this the key file?",
            "openssl x509 -inform der",
        ),
        Wanted::PrivateKey => (
            "-----BEGIN PRIVATE KEY-----",
            "is this the certificate file?",
            "openssl pkey -inform der",
        ),
    };
    if !kinds.is_empty() {
        let holds_the_other = match wanted {
            Wanted::Certificate => kinds.iter().any(|k| k.ends_with("PRIVATE KEY")),
            Wanted::PrivateKey => kinds.contains(&"CERTIFICATE"),
        };
        return format!(
            "the file holds only {} blocks{}",
            kinds.join(", "),
            if holds_the_other {
                format!(" ({swapped})")
            } else {
                String::new()
            }
        );
    }
    // A DER SEQUENCE starts with 0x30: a certificate or key in binary form.
    if bytes.first() == Some(&0x30) {
        return format!(
            "the file is not PEM but looks like binary DER (convert it with `{der_hint}`)"
        );
    }
    format!("the file is not PEM (no `{begin}` line)")
}

/// How long the generated certificate is valid: a year, like a CA-issued one, rather than
/// rcgen's default of 1975 to 4096 that certificate checkers flag.
const SELF_SIGNED_VALIDITY: time::Duration = time::Duration::days(365);

/// A self-signed ECDSA P-256 certificate for `hostname` (subject CN and SAN), valid from an hour
/// before `now` (clock skew) for [`SELF_SIGNED_VALIDITY`].
fn self_signed(
    hostname: &str,
    now: time::OffsetDateTime,
) -> Result<(rcgen::Certificate, rcgen::KeyPair), rcgen::Error> {
    let mut params = rcgen::CertificateParams::new(vec![hostname.to_owned()])?;
    let mut name = rcgen::DistinguishedName::new();
    name.push(rcgen::DnType::CommonName, hostname);
    params.distinguished_name = name;
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + SELF_SIGNED_VALIDITY;
    let key = rcgen::KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    Ok((cert, key))
}

fn self_signed_map(hostname: &str, provider: &CryptoProvider) -> Result<CertMap, TlsError> {
    let (cert, key) = self_signed(hostname, time::OffsetDateTime::now_utc())
        .map_err(|e| TlsError::SelfSigned(e.to_string()))?;
    let chain = vec![cert.der().clone()];
    let key = PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let certified = CertifiedKey::from_der(chain, key, provider)
        .map_err(|e| TlsError::SelfSigned(e.to_string()))?;
    let info = describe(&certified, hostname, true).map_err(TlsError::SelfSigned)?;
    let certified = Candidates(vec![Arc::new(certified)]);
    Ok(CertMap {
        exact: HashMap::from([(hostname.to_ascii_lowercase(), certified.clone())]),
        wildcard: HashMap::new(),
        default: certified,
        loaded: vec![info],
        fingerprint: Fingerprint::default(),
    })
}

fn read_file(index: usize, field: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        index,
        field,
        path: path.display().to_string(),
        source,
    })
}

fn pem_error(index: usize, field: &'static str, path: &Path, problem: String) -> TlsError {
    TlsError::Pem {
        index,
        field,
        path: path.display().to_string(),
        problem,
    }
}

/// Reads the leaf's DNS names (SAN, else CN), notAfter and key type; `label` names it in the
/// metric and logs.
fn describe(
    certified: &CertifiedKey,
    label: &str,
    self_signed: bool,
) -> Result<LoadedCertificate, String> {
    let leaf = certified.end_entity_cert().map_err(|e| e.to_string())?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref())
        .map_err(|e| format!("cannot parse certificate: {e}"))?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(dns) = name {
                names.push(dns.to_ascii_lowercase());
            }
        }
    }
    if names.is_empty() {
        for cn in cert.subject().iter_common_name() {
            if let Ok(cn) = cn.as_str() {
                names.push(cn.to_ascii_lowercase());
            }
        }
    }
    Ok(LoadedCertificate {
        label: label.to_owned(),
        names,
        not_after: cert.validity().not_after.timestamp(),
        self_signed,
        key_type: key_type_name(certified.key.algorithm()),
        shadowed: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fingerprint(files: &[&[u8]]) -> Fingerprint {
        let mut builder = FingerprintBuilder::new();
        for file in files {
            builder.add(file);
        }
        builder.finish()
    }

    #[test]
    fn fingerprint_is_a_sha256_not_the_file_bytes() {
        let key = b"-----BEGIN PRIVATE KEY-----\nsecret\n-----END PRIVATE KEY-----\n";
        let f = fingerprint(&[b"cert", key]);
        assert_eq!(f.0.len(), 32);
        assert!(!f.0.windows(6).any(|w| w == b"secret"));
        assert_eq!(f, fingerprint(&[b"cert", key]));
    }

    /// A self-signed certificate and its key, as PEM files in `dir`.
    fn pair(dir: &Path, name: &str) -> CertificateSection {
        let generated = rcgen::generate_simple_self_signed(vec![format!("{name}.test")]).unwrap();
        let cert = dir.join(format!("{name}.crt"));
        let key = dir.join(format!("{name}.key"));
        std::fs::write(&cert, generated.cert.pem()).unwrap();
        std::fs::write(&key, generated.signing_key.serialize_pem()).unwrap();
        CertificateSection { cert, key }
    }

    fn load_error(section: &CertificateSection) -> String {
        CertStore::load(std::slice::from_ref(section), "mx.test")
            .err()
            .unwrap()
            .to_string()
    }

    /// Each broken certificate file is reported as what it is, on the `cert` key, never as a
    /// key that does not belong.
    #[test]
    fn a_file_that_is_not_a_certificate_is_named_as_such() {
        let dir = tempfile::tempdir().unwrap();
        let good = pair(dir.path(), "a");
        let cases: [(&str, Vec<u8>, &str); 6] = [
            (
                "garbage",
                b"hello, this is not a certificate\n".to_vec(),
                "no PEM certificate found: the file is not PEM (no `-----BEGIN CERTIFICATE-----` line)",
            ),
            (
                "empty",
                Vec::new(),
                "no PEM certificate found: the file is empty",
            ),
            (
                "key-only",
                std::fs::read(&good.key).unwrap(),
                "no PEM certificate found: the file holds only PRIVATE KEY blocks (is this the key file?)",
            ),
            (
                "der",
                {
                    let pem = std::fs::read(&good.cert).unwrap();
                    CertificateDer::from_pem_slice(&pem).unwrap().to_vec()
                },
                "looks like binary DER (convert it with `openssl x509 -inform der`)",
            ),
            (
                // Well-formed PEM whose base64 is not a certificate: this one used to be
                // "key … does not belong to certificate …: BadEncoding".
                "garbage-in-pem",
                b"-----BEGIN CERTIFICATE-----\nZ2FyYmFnZQ==\n-----END CERTIFICATE-----\n".to_vec(),
                "CERTIFICATE block 1 of 1 is not an X.509 certificate",
            ),
            (
                "bad-base64",
                b"-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n".to_vec(),
                "not a valid PEM file: base64 decode error",
            ),
        ];
        for (name, bytes, expected) in cases {
            let cert = dir.path().join(format!("{name}.crt"));
            std::fs::write(&cert, bytes).unwrap();
            let err = load_error(&CertificateSection {
                cert: cert.clone(),
                key: good.key.clone(),
            });
            assert!(
                err.starts_with(&format!("tls.certificates[0].cert: {}: ", cert.display())),
                "{name}: {err}"
            );
            assert!(err.contains(expected), "{name}: {err}");
            assert!(!err.contains("does not belong"), "{name}: {err}");
        }
    }

    #[test]
    fn a_file_that_is_not_a_key_is_named_as_such() {
        let dir = tempfile::tempdir().unwrap();
        let good = pair(dir.path(), "a");
        let cases: [(&str, Vec<u8>, &str); 3] = [
            (
                "empty",
                Vec::new(),
                "no PEM private key found: the file is empty",
            ),
            (
                "cert-only",
                std::fs::read(&good.cert).unwrap(),
                "no PEM private key found: the file holds only CERTIFICATE blocks (is this the certificate file?)",
            ),
            (
                "garbage-in-pem",
                b"-----BEGIN PRIVATE KEY-----\nZ2FyYmFnZQ==\n-----END PRIVATE KEY-----\n".to_vec(),
                "the private key cannot be used",
            ),
        ];
        for (name, bytes, expected) in cases {
            let key = dir.path().join(format!("{name}.key"));
            std::fs::write(&key, bytes).unwrap();
            let err = load_error(&CertificateSection {
                cert: good.cert.clone(),
                key: key.clone(),
            });
            assert!(
                err.starts_with(&format!("tls.certificates[0].key: {}: ", key.display())),
                "{name}: {err}"
            );
            assert!(err.contains(expected), "{name}: {err}");
        }
    }

    #[test]
    fn a_key_of_another_certificate_is_still_a_mismatch() {
        let dir = tempfile::tempdir().unwrap();
        let a = pair(dir.path(), "a");
        let b = pair(dir.path(), "b");
        let err = load_error(&CertificateSection {
            cert: a.cert.clone(),
            key: b.key.clone(),
        });
        assert!(
            err.starts_with(&format!(
                "tls.certificates[0]: key {} does not belong to certificate {}",
                b.key.display(),
                a.cert.display()
            )),
            "{err}"
        );
        // And the right pair loads.
        assert_eq!(
            CertStore::load(&[a], "mx.test").unwrap().loaded()[0].names,
            ["a.test"]
        );
    }

    /// The fallback certificate names the host (not "rcgen self signed cert") and is valid
    /// for a year from now (not 1975 to 4096).
    #[test]
    fn the_self_signed_certificate_names_the_host_and_lasts_a_year() {
        let store = CertStore::load(&[], "mx.example.test").unwrap();
        let map = store.current.load();
        let leaf = map.default.0[0].end_entity_cert().unwrap().to_vec();
        let (_, cert) = x509_parser::parse_x509_certificate(&leaf).unwrap();
        assert_eq!(cert.subject().to_string(), "CN=mx.example.test");
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let validity = cert.validity();
        assert!((now - 3700..=now).contains(&validity.not_before.timestamp()));
        let year = 365 * 24 * 3600;
        assert!((now + year - 60..=now + year + 60).contains(&validity.not_after.timestamp()));
        assert!(map.loaded[0].self_signed);
    }

    #[test]
    fn fingerprint_changes_when_bytes_move_between_files() {
        assert_ne!(fingerprint(&[b"ab", b"c"]), fingerprint(&[b"a", b"bc"]));
        assert_ne!(fingerprint(&[b"ab", b"c"]), fingerprint(&[b"ab", b"d"]));
    }
}
