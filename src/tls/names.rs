//! IANA names for what a TLS handshake negotiated.
//!
//! The Received `tls`/`group` clauses (RFC 8314 §4.3), the IMAP ID "tls" field, logs and metric
//! labels all use these names, from this one place. rustls spells TLS 1.3 suites `TLS13_…` and
//! some groups in another case, and its `as_str()` is gone in 0.24, so the names are built from
//! the 16-bit code points with our own tables.

use std::borrow::Cow;

/// IANA "TLS Cipher Suite Registry" names of every suite a rustls provider can negotiate, plus
/// the CCM suite for completeness.
const CIPHER_SUITES: &[(u16, &str)] = &[
    (0x1301, "TLS_AES_128_GCM_SHA256"),
    (0x1302, "TLS_AES_256_GCM_SHA384"),
    (0x1303, "TLS_CHACHA20_POLY1305_SHA256"),
    (0x1304, "TLS_AES_128_CCM_SHA256"),
    (0xC02B, "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256"),
    (0xC02C, "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384"),
    (0xCCA9, "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256"),
    (0xC02F, "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256"),
    (0xC030, "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384"),
    (0xCCA8, "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256"),
];

/// IANA "TLS Supported Groups" names.
const GROUPS: &[(u16, &str)] = &[
    (0x0017, "secp256r1"),
    (0x0018, "secp384r1"),
    (0x0019, "secp521r1"),
    (0x001D, "x25519"),
    (0x001E, "x448"),
    (0x0100, "ffdhe2048"),
    (0x0101, "ffdhe3072"),
    (0x0102, "ffdhe4096"),
    (0x0103, "ffdhe6144"),
    (0x0104, "ffdhe8192"),
    (0x0200, "MLKEM512"),
    (0x0201, "MLKEM768"),
    (0x0202, "MLKEM1024"),
    (0x11EB, "SecP256r1MLKEM768"),
    (0x11EC, "X25519MLKEM768"),
    (0x11ED, "SecP384r1MLKEM1024"),
];

/// IANA "TLS SignatureScheme" names (RFC 8446 §4.2.3 and later registrations): what the
/// server signed its handshake with.
const SIGNATURE_SCHEMES: &[(u16, &str)] = &[
    (0x0201, "rsa_pkcs1_sha1"),
    (0x0203, "ecdsa_sha1"),
    (0x0401, "rsa_pkcs1_sha256"),
    (0x0501, "rsa_pkcs1_sha384"),
    (0x0601, "rsa_pkcs1_sha512"),
    (0x0403, "ecdsa_secp256r1_sha256"),
    (0x0503, "ecdsa_secp384r1_sha384"),
    (0x0603, "ecdsa_secp521r1_sha512"),
    (0x0804, "rsa_pss_rsae_sha256"),
    (0x0805, "rsa_pss_rsae_sha384"),
    (0x0806, "rsa_pss_rsae_sha512"),
    (0x0807, "ed25519"),
    (0x0808, "ed448"),
    (0x0809, "rsa_pss_pss_sha256"),
    (0x080A, "rsa_pss_pss_sha384"),
    (0x080B, "rsa_pss_pss_sha512"),
    (0x0904, "mldsa44"),
    (0x0905, "mldsa65"),
    (0x0906, "mldsa87"),
];

fn lookup(table: &[(u16, &'static str)], code: u16) -> Option<&'static str> {
    table
        .iter()
        .find(|(c, _)| *c == code)
        .map(|(_, name)| *name)
}

/// The IANA name of a cipher suite, if known. The Received `tls` clause writes its own hex form
/// (RFC 8314 §4.3 `tls-cipher-hex`) when this is None.
pub fn known_cipher_suite_name(code: u16) -> Option<&'static str> {
    lookup(CIPHER_SUITES, code)
}

/// The IANA name of a cipher suite, or `0x1301`-style hex for one we do not know.
pub fn cipher_suite_name(code: u16) -> Cow<'static, str> {
    match known_cipher_suite_name(code) {
        Some(name) => Cow::Borrowed(name),
        None => Cow::Owned(format!("0x{code:04x}")),
    }
}

/// The IANA name of a key-exchange group, if known. The Received `group` clause must start with
/// a letter (RFC 8314 §4.3 `dh-group`), so callers that write it leave it out when this is None.
pub fn known_group_name(code: u16) -> Option<&'static str> {
    lookup(GROUPS, code)
}

/// The IANA name of a key-exchange group, or `0x11ed`-style hex for logs and metrics.
pub fn group_name(code: u16) -> Cow<'static, str> {
    match known_group_name(code) {
        Some(name) => Cow::Borrowed(name),
        None => Cow::Owned(format!("0x{code:04x}")),
    }
}

/// The IANA name of a signature scheme, if known (the PROXY v2 `PP2_SUBTYPE_SSL_SIG_SCHEME`
/// value, e.g. `rsa_pss_rsae_sha256`).
pub fn known_signature_scheme_name(code: u16) -> Option<&'static str> {
    lookup(SIGNATURE_SCHEMES, code)
}

/// `TLSv1.2` / `TLSv1.3`: the OpenSSL/HAProxy spelling operators grep for.
pub fn protocol_version_name(version: rustls::ProtocolVersion) -> Cow<'static, str> {
    match u16::from(version) {
        0x0300 => Cow::Borrowed("SSLv3"),
        0x0301 => Cow::Borrowed("TLSv1"),
        0x0302 => Cow::Borrowed("TLSv1.1"),
        0x0303 => Cow::Borrowed("TLSv1.2"),
        0x0304 => Cow::Borrowed("TLSv1.3"),
        other => Cow::Owned(format!("0x{other:04x}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every suite, group and version our provider can negotiate has a registry name (no hex
    /// fallback), both in the tables and through the `TlsInfo` methods the edges call.
    #[test]
    fn every_suite_and_group_of_our_provider_has_an_iana_name() {
        let provider = rustls::crypto::aws_lc_rs::default_provider();
        let suites = provider
            .cipher_suites
            .iter()
            .chain(rustls::crypto::aws_lc_rs::ALL_CIPHER_SUITES)
            .map(|s| s.suite());
        let groups = provider
            .kx_groups
            .iter()
            .chain(rustls::crypto::aws_lc_rs::ALL_KX_GROUPS)
            .map(|g| g.name());
        for suite in suites {
            let code = u16::from(suite);
            assert!(
                known_cipher_suite_name(code).is_some(),
                "suite {code:#06x} has no IANA name"
            );
        }
        for group in groups {
            let code = u16::from(group);
            assert!(
                known_group_name(code).is_some(),
                "group {code:#06x} has no IANA name"
            );
        }
        for version in rustls::ALL_VERSIONS {
            let name = protocol_version_name(version.version);
            assert!(name.starts_with("TLSv1."), "{name}");
        }
        for (suite, group) in provider
            .cipher_suites
            .iter()
            .zip(provider.kx_groups.iter().cycle())
        {
            let info = crate::tls::TlsInfo {
                version: suite.version().version,
                cipher: suite.suite(),
                group: Some(group.name()),
                sni: None,
                signature_scheme: None,
            };
            for name in [info.version_name(), info.cipher_name(), info.group_name()] {
                assert!(!name.starts_with("0x"), "{info:?}: {name}");
            }
            assert_eq!(
                info.iana_group_name().map(Cow::Borrowed),
                Some(info.group_name())
            );
        }
    }

    #[test]
    fn every_signature_scheme_the_provider_knows_has_an_iana_name() {
        let provider = rustls::crypto::aws_lc_rs::default_provider();
        for scheme in provider
            .signature_verification_algorithms
            .supported_schemes()
        {
            assert!(
                known_signature_scheme_name(u16::from(scheme)).is_some(),
                "{scheme:?} has no IANA name"
            );
        }
        assert_eq!(
            known_signature_scheme_name(0x0804),
            Some("rsa_pss_rsae_sha256")
        );
        assert_eq!(
            known_signature_scheme_name(0x0403),
            Some("ecdsa_secp256r1_sha256")
        );
        assert_eq!(known_signature_scheme_name(0xFEFE), None);
    }

    #[test]
    fn without_a_key_exchange_the_group_is_none() {
        let info = crate::tls::TlsInfo {
            version: rustls::ProtocolVersion::TLSv1_2,
            cipher: rustls::CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
            group: None,
            sni: None,
            signature_scheme: None,
        };
        assert_eq!(info.group_name(), "none");
        assert_eq!(info.iana_group_name(), None);
        assert_eq!(info.version_name(), "TLSv1.2");
        assert_eq!(info.cipher_name(), "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256");
    }

    #[test]
    fn names_follow_the_iana_spelling_not_rustls() {
        let table = [
            (0x1301, "TLS_AES_128_GCM_SHA256"),
            (0x1302, "TLS_AES_256_GCM_SHA384"),
            (0x1303, "TLS_CHACHA20_POLY1305_SHA256"),
            (0xC02B, "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256"),
            (0xC02C, "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384"),
            (0xCCA9, "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256"),
            (0xC02F, "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256"),
            (0xC030, "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384"),
            (0xCCA8, "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256"),
        ];
        for (code, name) in table {
            assert_eq!(cipher_suite_name(code), name);
        }
        assert_eq!(group_name(0x001D), "x25519");
        assert_eq!(group_name(0x0017), "secp256r1");
        assert_eq!(group_name(0x0018), "secp384r1");
        assert_eq!(group_name(0x11EC), "X25519MLKEM768");
        assert_eq!(group_name(0x11EB), "SecP256r1MLKEM768");
        assert_eq!(group_name(0x0201), "MLKEM768");
    }

    #[test]
    fn unknown_codes_fall_back_to_four_hex_digits() {
        assert_eq!(cipher_suite_name(0x00ff), "0x00ff");
        assert_eq!(known_cipher_suite_name(0x00ff), None);
        assert_eq!(group_name(0xabcd), "0xabcd");
        assert_eq!(known_group_name(0xabcd), None);
    }

    #[test]
    fn provider_names_match_what_rustls_negotiates() {
        // The rustls constants and our table agree on code points.
        assert_eq!(
            cipher_suite_name(u16::from(rustls::CipherSuite::TLS13_AES_256_GCM_SHA384)),
            "TLS_AES_256_GCM_SHA384"
        );
        assert_eq!(group_name(u16::from(rustls::NamedGroup::X25519)), "x25519");
        assert_eq!(
            protocol_version_name(rustls::ProtocolVersion::TLSv1_3),
            "TLSv1.3"
        );
        assert_eq!(
            protocol_version_name(rustls::ProtocolVersion::TLSv1_2),
            "TLSv1.2"
        );
    }
}
