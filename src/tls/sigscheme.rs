//! The signature scheme of a handshake, which rustls 0.23 does not report: each handshake gets
//! a copy of the server config whose certificate resolver wraps the chosen key, and the wrapper
//! notes the scheme rustls picks when it signs (`SigningKey::choose_scheme`, called once per
//! full handshake). The copy shares every `Arc` (session cache, ticketer, certificate store)
//! with the original, so resumption and hot reload behave as before; the cost is a few small
//! allocations and a copy of the chain's octets per full handshake.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use rustls::pki_types::SubjectPublicKeyInfoDer;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::{CertifiedKey, Signer, SigningKey};
use rustls::{ServerConfig, SignatureAlgorithm, SignatureScheme};

/// What one handshake's key chose; 0 until it signs (the scheme in the low 16 bits, plus one
/// bit so scheme 0x0000 would still read as chosen).
#[derive(Debug, Clone, Default)]
pub struct Chosen(Arc<AtomicU32>);

const SET: u32 = 1 << 16;

impl Chosen {
    pub fn get(&self) -> Option<SignatureScheme> {
        let v = self.0.load(Ordering::Relaxed);
        (v & SET != 0).then(|| SignatureScheme::from((v & 0xFFFF) as u16))
    }

    fn set(&self, scheme: SignatureScheme) {
        self.0
            .store(SET | u32::from(u16::from(scheme)), Ordering::Relaxed);
    }
}

/// A copy of `config` that records the signature scheme of the handshake it serves.
pub fn recording(config: &Arc<ServerConfig>) -> (Arc<ServerConfig>, Chosen) {
    let chosen = Chosen::default();
    let mut copy = ServerConfig::clone(config);
    copy.cert_resolver = Arc::new(RecordingResolver {
        inner: config.cert_resolver.clone(),
        chosen: chosen.clone(),
    });
    (Arc::new(copy), chosen)
}

#[derive(Debug)]
struct RecordingResolver {
    inner: Arc<dyn ResolvesServerCert>,
    chosen: Chosen,
}

impl ResolvesServerCert for RecordingResolver {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let key = self.inner.resolve(client_hello)?;
        let mut recorded = CertifiedKey::clone(&key);
        recorded.key = Arc::new(RecordingKey {
            inner: key.key.clone(),
            chosen: self.chosen.clone(),
        });
        Some(Arc::new(recorded))
    }

    fn only_raw_public_keys(&self) -> bool {
        self.inner.only_raw_public_keys()
    }
}

#[derive(Debug)]
struct RecordingKey {
    inner: Arc<dyn SigningKey>,
    chosen: Chosen,
}

impl SigningKey for RecordingKey {
    fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn Signer>> {
        let signer = self.inner.choose_scheme(offered)?;
        self.chosen.set(signer.scheme());
        Some(signer)
    }

    fn public_key(&self) -> Option<SubjectPublicKeyInfoDer<'_>> {
        self.inner.public_key()
    }

    fn algorithm(&self) -> SignatureAlgorithm {
        self.inner.algorithm()
    }
}
