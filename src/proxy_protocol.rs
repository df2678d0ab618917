//! HAProxy PROXY protocol version 2 (`doc/proxy-protocol.txt`), sent to the backend so that
//! Postfix (`smtpd_upstream_proxy_protocol = haproxy`) and Dovecot (`haproxy = yes`) see the
//! client's address instead of mailfront's, and their per-IP throttling works per client.
//!
//! Sans-I/O: [`encode_v2`] turns the two endpoints and what TLS negotiated into the bytes the
//! session writes first on the backend connection, in one write (§2.2: "the sender must ensure
//! that all the protocol header is sent at once").
//!
//! What is sent, and why (Dovecot's and Postfix's PROXY v2 readers decide what is safe):
//! - `PP2_TYPE_SSL` only when TLS is up: its `PP2_CLIENT_SSL` bit makes Dovecot treat the session
//!   as TLS-secured, so it must never be claimed for a cleartext client. `verify` is non-zero
//!   because no client certificate is ever requested; no CERT bits, no CN.
//! - `PP2_TYPE_AUTHORITY` only for an SNI that is a plain DNS name: Dovecot rejects the whole
//!   connection when the value is not a valid DNS name.
//! - Inside `PP2_TYPE_SSL`, beside version and cipher: `PP2_SUBTYPE_SSL_GROUP` (0x26, the key
//!   exchange group, e.g. `X25519MLKEM768`) and `PP2_SUBTYPE_SSL_SIG_SCHEME` (0x27, what the
//!   server signed the handshake with, e.g. `rsa_pss_rsae_sha256`), US-ASCII IANA names as the
//!   current specification defines them. The group is what RFC 8314 §4.3 asks to record; each
//!   is left out when there is none (TLS 1.2 resumption has no key exchange, resumption signs
//!   nothing) or it has no IANA name.
//! - Never `PP2_TYPE_ALPN`: Dovecot rejects the connection unless it equals the service's
//!   protocol, and mail clients rarely send ALPN anyway.
//! - The whole header stays far below Postfix's 536-byte peek (its
//!   `HAPROXY_HEADER_MAX_LEN`; Dovecot allows 1500): the tests check the longest one.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use crate::tls::TlsInfo;

/// The 12-byte signature every v2 header starts with (§2.2): one definition, shared with the
/// reader of balancers' headers.
pub const SIGNATURE: [u8; 12] = *crate::proxy_header::V2_SIGNATURE;

/// A v2 header with the LOCAL command and no addresses (§2.2): the sender's own connection, as
/// for a health check.
pub fn local_header() -> Vec<u8> {
    let mut header = SIGNATURE.to_vec();
    // Version 2, command LOCAL; family and transport UNSPEC; no address block.
    header.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
    header
}
/// Version 2, command PROXY: the connection is relayed for the addresses that follow.
pub const VERSION_PROXY: u8 = 0x21;
/// AF_INET + STREAM.
pub const FAMILY_TCP4: u8 = 0x11;
/// AF_INET6 + STREAM.
pub const FAMILY_TCP6: u8 = 0x21;

pub const PP2_TYPE_AUTHORITY: u8 = 0x02;
pub const PP2_TYPE_SSL: u8 = 0x20;
pub const PP2_SUBTYPE_SSL_VERSION: u8 = 0x21;
pub const PP2_SUBTYPE_SSL_CIPHER: u8 = 0x23;
pub const PP2_SUBTYPE_SSL_GROUP: u8 = 0x26;
pub const PP2_SUBTYPE_SSL_SIG_SCHEME: u8 = 0x27;
pub const PP2_CLIENT_SSL: u8 = 0x01;
/// `verify` of `PP2_TYPE_SSL`: zero means "a client certificate was presented and verified";
/// mailfront never asks for one, so any non-zero value is the truth. HAProxy sends 1 here too.
pub const VERIFY_NO_CLIENT_CERT: u32 = 1;

/// Longest string put in an SSL sub-TLV (version, cipher, group, signature scheme). The longest
/// IANA cipher name is 45 characters, group and scheme names are under 25; anything longer (an
/// unexpected label) is left out rather than truncated. 48 keeps the worst case of all four
/// plus the longest AUTHORITY within Postfix's 536-byte peek.
pub const MAX_SSL_STRING_LEN: usize = 48;

/// The header for a relayed connection: `client` is the peer of the client-facing socket,
/// `local` the address the client connected to, `tls` what was negotiated if TLS is up now.
///
/// Addresses: both share one family. Admission (`src/admission.rs`) has already made an
/// IPv4-mapped IPv6 address (`::ffff:a.b.c.d`, from a dual-stack socket) IPv4, so an IPv4 client
/// on a dual-stack listener gets a TCP4 header (§6.1). If the families still differ, the IPv4
/// one is written as an IPv4-mapped IPv6 address and the header is TCP6, which loses nothing.
pub fn encode_v2(client: SocketAddr, local: SocketAddr, tls: Option<&TlsInfo>) -> Vec<u8> {
    match tls {
        None => encode(client, local, None),
        Some(tls) => {
            let (version, cipher) = (tls.version_name(), tls.cipher_name());
            let details = SslDetails {
                version: &version,
                cipher: &cipher,
                group: tls.iana_group_name(),
                sig_scheme: tls.iana_signature_scheme_name(),
                sni: tls.sni.as_deref(),
            };
            encode(client, local, Some(&details))
        }
    }
}

/// What the SSL and AUTHORITY TLVs carry: the version and cipher by name (HAProxy sends
/// `TLSv1.3` and a cipher name, and Dovecot and Postfix log them as text).
struct SslDetails<'a> {
    version: &'a str,
    cipher: &'a str,
    group: Option<&'a str>,
    sig_scheme: Option<&'a str>,
    sni: Option<&'a str>,
}

fn encode(client: SocketAddr, local: SocketAddr, tls: Option<&SslDetails<'_>>) -> Vec<u8> {
    let mut body = Vec::with_capacity(128);
    let family = match (client.ip(), local.ip()) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => {
            body.extend_from_slice(&src.octets());
            body.extend_from_slice(&dst.octets());
            FAMILY_TCP4
        }
        (src, dst) => {
            body.extend_from_slice(&as_v6(src).octets());
            body.extend_from_slice(&as_v6(dst).octets());
            FAMILY_TCP6
        }
    };
    body.extend_from_slice(&client.port().to_be_bytes());
    body.extend_from_slice(&local.port().to_be_bytes());

    if let Some(tls) = tls {
        let mut ssl = Vec::with_capacity(64);
        ssl.push(PP2_CLIENT_SSL);
        ssl.extend_from_slice(&VERIFY_NO_CLIENT_CERT.to_be_bytes());
        if let Some(version) = ssl_string(tls.version) {
            push_tlv(&mut ssl, PP2_SUBTYPE_SSL_VERSION, version);
        }
        if let Some(cipher) = ssl_string(tls.cipher) {
            push_tlv(&mut ssl, PP2_SUBTYPE_SSL_CIPHER, cipher);
        }
        if let Some(group) = tls.group.and_then(ssl_string) {
            push_tlv(&mut ssl, PP2_SUBTYPE_SSL_GROUP, group);
        }
        if let Some(scheme) = tls.sig_scheme.and_then(ssl_string) {
            push_tlv(&mut ssl, PP2_SUBTYPE_SSL_SIG_SCHEME, scheme);
        }
        push_tlv(&mut body, PP2_TYPE_SSL, &ssl);
        if let Some(name) = tls.sni.and_then(authority) {
            push_tlv(&mut body, PP2_TYPE_AUTHORITY, name.as_bytes());
        }
    }

    let mut header = Vec::with_capacity(16 + body.len());
    header.extend_from_slice(&SIGNATURE);
    header.push(VERSION_PROXY);
    header.push(family);
    // Bounded by the named limits above (at most a few hundred bytes), so this never saturates.
    let len = u16::try_from(body.len()).unwrap_or(u16::MAX);
    header.extend_from_slice(&len.to_be_bytes());
    header.extend_from_slice(&body);
    header
}

/// The SNI as AUTHORITY, if it is a DNS host name Dovecot will accept (see [`crate::dns`]).
/// On top of the shared check: a trailing root dot is dropped (RFC 6066 §3 forbids it in SNI,
/// but rustls passes it through), and a name whose last label is all digits is left out,
/// because Dovecot would take it for an IP literal, which RFC 6066 §3 also forbids in SNI.
/// rustls has already lowercased it; lowercasing again costs nothing.
fn authority(sni: &str) -> Option<String> {
    let name = sni.strip_suffix('.').unwrap_or(sni);
    (crate::dns::is_host_name(name) && !crate::dns::has_numeric_tld(name))
        .then(|| name.to_ascii_lowercase())
}

/// A version or cipher string, if it is short printable ASCII.
fn ssl_string(value: &str) -> Option<&[u8]> {
    let ok = !value.is_empty()
        && value.len() <= MAX_SSL_STRING_LEN
        && value.bytes().all(|b| b.is_ascii_graphic());
    ok.then_some(value.as_bytes())
}

fn push_tlv(out: &mut Vec<u8>, kind: u8, value: &[u8]) {
    let len = u16::try_from(value.len()).unwrap_or(u16::MAX);
    out.push(kind);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(value.get(..usize::from(len)).unwrap_or(value));
}

fn as_v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_local_header_is_the_signature_then_local_and_nothing() {
        let header = local_header();
        assert_eq!(header.len(), 16);
        assert_eq!(header.get(..12), Some(&b"\r\n\r\n\0\r\nQUIT\n"[..]));
        assert_eq!(header.get(12..), Some(&[0x20, 0x00, 0x00, 0x00][..]));
    }

    /// Postfix peeks at most this many bytes for the whole header (`HAPROXY_HEADER_MAX_LEN`).
    const POSTFIX_HEADER_LIMIT: usize = 536;
    /// Longest DNS name sent as AUTHORITY (RFC 1035 §2.3.4, without the root dot).
    const MAX_AUTHORITY_LEN: usize = crate::dns::MAX_NAME_LEN;

    /// A header taken apart field by field, the way a receiver reads it.
    #[derive(Debug, PartialEq)]
    struct Decoded {
        command: u8,
        family: u8,
        src: IpAddr,
        dst: IpAddr,
        sport: u16,
        dport: u16,
        tlvs: Vec<(u8, Vec<u8>)>,
    }

    fn take<'a>(bytes: &mut &'a [u8], n: usize) -> &'a [u8] {
        let (head, tail) = bytes.split_at(n);
        *bytes = tail;
        head
    }

    fn be16(b: &[u8]) -> u16 {
        u16::from_be_bytes([b[0], b[1]])
    }

    fn tlvs(mut rest: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut out = Vec::new();
        while !rest.is_empty() {
            let kind = take(&mut rest, 1)[0];
            let len = be16(take(&mut rest, 2)) as usize;
            out.push((kind, take(&mut rest, len).to_vec()));
        }
        out
    }

    fn decode(header: &[u8]) -> Decoded {
        let mut rest = header;
        assert_eq!(take(&mut rest, 12), SIGNATURE);
        let ver_cmd = take(&mut rest, 1)[0];
        assert_eq!(ver_cmd >> 4, 2, "version nibble");
        let family = take(&mut rest, 1)[0];
        let len = be16(take(&mut rest, 2)) as usize;
        assert_eq!(rest.len(), len, "len covers exactly the rest");
        let (src, dst) = match family {
            FAMILY_TCP4 => {
                let s: [u8; 4] = take(&mut rest, 4).try_into().unwrap();
                let d: [u8; 4] = take(&mut rest, 4).try_into().unwrap();
                (IpAddr::from(s), IpAddr::from(d))
            }
            FAMILY_TCP6 => {
                let s: [u8; 16] = take(&mut rest, 16).try_into().unwrap();
                let d: [u8; 16] = take(&mut rest, 16).try_into().unwrap();
                (IpAddr::from(s), IpAddr::from(d))
            }
            other => panic!("unexpected family {other:#x}"),
        };
        let sport = be16(take(&mut rest, 2));
        let dport = be16(take(&mut rest, 2));
        Decoded {
            command: ver_cmd & 0x0F,
            family,
            src,
            dst,
            sport,
            dport,
            tlvs: tlvs(rest),
        }
    }

    fn tls(cipher: rustls::CipherSuite, sni: Option<&str>) -> TlsInfo {
        TlsInfo {
            version: rustls::ProtocolVersion::TLSv1_3,
            cipher,
            group: Some(rustls::NamedGroup::X25519MLKEM768),
            sni: sni.map(str::to_owned),
            signature_scheme: Some(rustls::SignatureScheme::RSA_PSS_SHA256),
        }
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn ipv4_cleartext_header_matches_the_reference_bytes() {
        let h = encode_v2(addr("192.0.2.7:50000"), addr("198.51.100.1:587"), None);
        let mut expected = SIGNATURE.to_vec();
        expected.extend_from_slice(&[0x21, 0x11, 0x00, 0x0C]);
        expected.extend_from_slice(&[192, 0, 2, 7, 198, 51, 100, 1]);
        expected.extend_from_slice(&[0xC3, 0x50, 0x02, 0x4B]);
        assert_eq!(h, expected);
    }

    #[test]
    fn ipv6_cleartext_header_matches_the_reference_bytes() {
        let h = encode_v2(addr("[2001:db8::1]:40000"), addr("[2001:db8::2]:993"), None);
        let mut expected = SIGNATURE.to_vec();
        expected.extend_from_slice(&[0x21, 0x21, 0x00, 0x24]);
        expected.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        expected.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        expected.extend_from_slice(&[0x9C, 0x40, 0x03, 0xE1]);
        assert_eq!(h, expected);
    }

    #[test]
    fn ipv4_mapped_peer_is_sent_as_tcp4_with_both_addresses_mapped_down() {
        // As admission hands the addresses over from a dual-stack socket.
        let canonical = crate::admission::canonical;
        let d = decode(&encode_v2(
            canonical(addr("[::ffff:203.0.113.9]:1234")),
            canonical(addr("[::ffff:10.0.0.1]:465")),
            None,
        ));
        assert_eq!(d.family, FAMILY_TCP4);
        assert_eq!(d.src, addr("203.0.113.9:0").ip());
        assert_eq!(d.dst, addr("10.0.0.1:0").ip());
        assert_eq!((d.sport, d.dport), (1234, 465));
    }

    #[test]
    fn mixed_families_are_sent_as_tcp6_with_the_ipv4_side_mapped_up() {
        let d = decode(&encode_v2(
            addr("203.0.113.9:1234"),
            addr("[2001:db8::2]:465"),
            None,
        ));
        assert_eq!(d.family, FAMILY_TCP6);
        assert_eq!(d.src, addr("[::ffff:203.0.113.9]:0").ip());
        assert_eq!(d.dst, addr("[2001:db8::2]:0").ip());
    }

    #[test]
    fn cleartext_client_gets_no_ssl_tlv_and_no_authority() {
        let d = decode(&encode_v2(addr("127.0.0.2:1"), addr("127.0.0.1:2"), None));
        assert_eq!(d.command, 0x1);
        assert!(d.tlvs.is_empty(), "{:?}", d.tlvs);
    }

    #[test]
    fn tls_client_gets_ssl_tlv_with_client_bit_nonzero_verify_version_and_iana_cipher() {
        let info = tls(
            rustls::CipherSuite::TLS13_AES_256_GCM_SHA384,
            Some("mx.example.test"),
        );
        let d = decode(&encode_v2(
            addr("127.0.0.2:5555"),
            addr("127.0.0.1:993"),
            Some(&info),
        ));
        assert_eq!(d.src, addr("127.0.0.2:0").ip());
        let kinds: Vec<u8> = d.tlvs.iter().map(|(k, _)| *k).collect();
        assert_eq!(kinds, [PP2_TYPE_SSL, PP2_TYPE_AUTHORITY]);
        let ssl = &d.tlvs[0].1;
        assert_eq!(ssl[0], PP2_CLIENT_SSL, "SSL bit only, no CERT bits");
        let verify = u32::from_be_bytes(ssl[1..5].try_into().unwrap());
        assert_ne!(verify, 0, "no client certificate was verified");
        let subs = tlvs(&ssl[5..]);
        assert_eq!(
            subs,
            [
                (PP2_SUBTYPE_SSL_VERSION, b"TLSv1.3".to_vec()),
                (PP2_SUBTYPE_SSL_CIPHER, b"TLS_AES_256_GCM_SHA384".to_vec()),
                (PP2_SUBTYPE_SSL_GROUP, b"X25519MLKEM768".to_vec()),
                (PP2_SUBTYPE_SSL_SIG_SCHEME, b"rsa_pss_rsae_sha256".to_vec()),
            ]
        );
        assert_eq!(d.tlvs[1].1, b"mx.example.test");
    }

    #[test]
    fn group_and_signature_scheme_are_left_out_when_there_is_none_or_no_iana_name() {
        let ssl_subtypes = |info: &TlsInfo| -> Vec<u8> {
            let d = decode(&encode_v2(
                addr("127.0.0.2:1"),
                addr("127.0.0.1:2"),
                Some(info),
            ));
            tlvs(&d.tlvs[0].1[5..]).iter().map(|(k, _)| *k).collect()
        };
        let mut resumed = tls(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256, None);
        resumed.group = None;
        resumed.signature_scheme = None;
        assert_eq!(
            ssl_subtypes(&resumed),
            [PP2_SUBTYPE_SSL_VERSION, PP2_SUBTYPE_SSL_CIPHER]
        );
        let mut odd = tls(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256, None);
        odd.group = Some(rustls::NamedGroup::Unknown(0xFAFA));
        odd.signature_scheme = Some(rustls::SignatureScheme::Unknown(0xFAFA));
        assert_eq!(
            ssl_subtypes(&odd),
            [PP2_SUBTYPE_SSL_VERSION, PP2_SUBTYPE_SSL_CIPHER]
        );
        let mut ecdsa = tls(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256, None);
        ecdsa.group = Some(rustls::NamedGroup::secp256r1);
        ecdsa.signature_scheme = Some(rustls::SignatureScheme::ECDSA_NISTP256_SHA256);
        let d = decode(&encode_v2(
            addr("127.0.0.2:1"),
            addr("127.0.0.1:2"),
            Some(&ecdsa),
        ));
        let subs = tlvs(&d.tlvs[0].1[5..]);
        assert_eq!(subs[2], (PP2_SUBTYPE_SSL_GROUP, b"secp256r1".to_vec()));
        assert_eq!(
            subs[3],
            (
                PP2_SUBTYPE_SSL_SIG_SCHEME,
                b"ecdsa_secp256r1_sha256".to_vec()
            )
        );
    }

    #[test]
    fn no_alpn_tlv_is_ever_sent() {
        let info = tls(
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256,
            Some("imap.example.test"),
        );
        for h in [
            encode_v2(addr("127.0.0.2:1"), addr("127.0.0.1:2"), Some(&info)),
            encode_v2(addr("[::1]:1"), addr("[::1]:2"), Some(&info)),
            encode_v2(addr("127.0.0.2:1"), addr("127.0.0.1:2"), None),
        ] {
            assert!(decode(&h).tlvs.iter().all(|(k, _)| *k != 0x01));
        }
    }

    #[test]
    fn authority_is_sent_only_for_a_valid_dns_name() {
        for (sni, expected) in [
            (None, None),
            (Some("mx.example.test"), Some("mx.example.test")),
            (Some("MX.Example.Test"), Some("mx.example.test")),
            (Some("mx.example.test."), Some("mx.example.test")),
            (Some("localhost"), Some("localhost")),
            (Some("192.0.2.1"), None),
            (Some("::1"), None),
            (Some("under_score.example"), None),
            (Some("-bad.example"), None),
            (Some("bad-.example"), None),
            (Some("a..b"), None),
            (Some(""), None),
            (Some("tab\there.example"), None),
            (Some("host.123"), None),
        ] {
            let info = tls(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256, sni);
            let d = decode(&encode_v2(
                addr("127.0.0.2:1"),
                addr("127.0.0.1:2"),
                Some(&info),
            ));
            let got = d
                .tlvs
                .iter()
                .find(|(k, _)| *k == PP2_TYPE_AUTHORITY)
                .map(|(_, v)| String::from_utf8(v.clone()).unwrap());
            assert_eq!(got.as_deref(), expected, "sni {sni:?}");
        }
        let long_label = format!("{}.example", "a".repeat(64));
        assert_eq!(authority(&long_label), None);
        let too_long = vec!["a".repeat(63); 5].join(".");
        assert!(too_long.len() > MAX_AUTHORITY_LEN);
        assert_eq!(authority(&too_long), None);
    }

    #[test]
    fn header_with_every_tlv_and_the_longest_sni_fits_postfixs_536_byte_peek() {
        // 253 octets: four labels of 63 with dots, minus one character.
        let longest = format!(
            "{}.{}.{}.{}",
            "a".repeat(63),
            "b".repeat(63),
            "c".repeat(63),
            "d".repeat(61)
        );
        assert_eq!(longest.len(), MAX_AUTHORITY_LEN);
        let info = tls(
            rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
            Some(&longest),
        );
        let h = encode_v2(
            addr("[2001:db8::1]:65535"),
            addr("[2001:db8::2]:65535"),
            Some(&info),
        );
        let d = decode(&h);
        assert_eq!(d.family, FAMILY_TCP6);
        assert!(
            d.tlvs
                .iter()
                .any(|(k, v)| *k == PP2_TYPE_AUTHORITY && v.len() == 253)
        );
        assert!(h.len() <= POSTFIX_HEADER_LIMIT, "{} bytes", h.len());
        // Even the worst case the limits allow: the longest strings each sub-TLV may carry.
        let (version, cipher, group, scheme) = (
            "v".repeat(MAX_SSL_STRING_LEN),
            "c".repeat(MAX_SSL_STRING_LEN),
            "g".repeat(MAX_SSL_STRING_LEN),
            "s".repeat(MAX_SSL_STRING_LEN),
        );
        let worst = SslDetails {
            version: &version,
            cipher: &cipher,
            group: Some(&group),
            sig_scheme: Some(&scheme),
            sni: Some(&longest),
        };
        let h = encode(
            addr("[2001:db8::1]:1"),
            addr("[2001:db8::2]:2"),
            Some(&worst),
        );
        assert!(h.len() <= POSTFIX_HEADER_LIMIT, "{} bytes", h.len());
    }

    #[test]
    fn overlong_or_unprintable_ssl_strings_are_left_out_not_truncated() {
        let cipher = "X".repeat(MAX_SSL_STRING_LEN + 1);
        let info = SslDetails {
            version: "TLS v1",
            cipher: &cipher,
            group: Some(""),
            sig_scheme: Some(&cipher),
            sni: None,
        };
        let d = decode(&encode(
            addr("127.0.0.2:1"),
            addr("127.0.0.1:2"),
            Some(&info),
        ));
        let ssl = &d.tlvs[0].1;
        assert_eq!(ssl.len(), 5, "only client and verify: {ssl:?}");
    }

    /// The encoder's output read back by the `ppp` crate, a PROXY v2 parser written apart from
    /// this module, so the encoder is not checked only against the `decode` above.
    mod decoded_by_ppp {
        use super::*;
        use ppp::v2::{Addresses, Command, Header, Protocol, Type, TypeLengthValue, Version};

        fn parse(bytes: &[u8]) -> Header<'_> {
            let header = Header::try_from(bytes).unwrap();
            assert_eq!(
                header.len(),
                bytes.len(),
                "the whole header, nothing after it"
            );
            assert_eq!(header.version, Version::Two);
            assert_eq!(header.command, Command::Proxy);
            assert_eq!(header.protocol, Protocol::Stream);
            header
        }

        fn tlvs<'a>(header: &'a Header<'_>) -> Vec<TypeLengthValue<'a>> {
            header.tlvs().collect::<Result<_, _>>().unwrap()
        }

        /// The SSL TLV's fields: client bits, verify, then its sub-TLVs, parsed with ppp too
        /// (sub-TLVs share the TLV layout).
        fn ssl(value: &[u8]) -> (u8, u32, Vec<(u8, String)>) {
            let (&client, rest) = value.split_first().unwrap();
            let (verify, subs) = rest.split_at(4);
            let subs = ppp::v2::TypeLengthValues::from(subs)
                .map(|t| {
                    let t = t.unwrap();
                    (t.kind, String::from_utf8(t.value.to_vec()).unwrap())
                })
                .collect();
            (client, u32::from_be_bytes(verify.try_into().unwrap()), subs)
        }

        #[test]
        fn ipv4_addresses_and_ports() {
            let bytes = encode_v2(addr("192.0.2.7:50000"), addr("198.51.100.1:587"), None);
            let header = parse(&bytes);
            let Addresses::IPv4(ip) = header.addresses else {
                panic!("{:?}", header.addresses)
            };
            assert_eq!(
                ip.source_address,
                "192.0.2.7".parse::<std::net::Ipv4Addr>().unwrap()
            );
            assert_eq!(ip.source_port, 50000);
            assert_eq!(
                ip.destination_address,
                "198.51.100.1".parse::<std::net::Ipv4Addr>().unwrap()
            );
            assert_eq!(ip.destination_port, 587);
            assert!(tlvs(&header).is_empty(), "no TLV without TLS");
        }

        #[test]
        fn ipv6_addresses_and_ports() {
            let bytes = encode_v2(addr("[2001:db8::1]:40000"), addr("[2001:db8::2]:993"), None);
            let header = parse(&bytes);
            let Addresses::IPv6(ip) = header.addresses else {
                panic!("{:?}", header.addresses)
            };
            assert_eq!(
                ip.source_address,
                "2001:db8::1".parse::<Ipv6Addr>().unwrap()
            );
            assert_eq!(ip.source_port, 40000);
            assert_eq!(
                ip.destination_address,
                "2001:db8::2".parse::<Ipv6Addr>().unwrap()
            );
            assert_eq!(ip.destination_port, 993);
        }

        #[test]
        fn mixed_families_become_ipv6_with_the_ipv4_side_mapped() {
            let bytes = encode_v2(addr("192.0.2.7:1"), addr("[2001:db8::2]:993"), None);
            let Addresses::IPv6(ip) = parse(&bytes).addresses else {
                panic!("expected IPv6")
            };
            assert_eq!(
                ip.source_address,
                "::ffff:192.0.2.7".parse::<Ipv6Addr>().unwrap()
            );
        }

        #[test]
        fn ssl_tlv_carries_the_client_bit_verify_version_and_cipher() {
            let info = tls(rustls::CipherSuite::TLS13_AES_256_GCM_SHA384, None);
            for (client, local) in [
                ("192.0.2.7:50000", "198.51.100.1:993"),
                ("[2001:db8::1]:40000", "[2001:db8::2]:993"),
            ] {
                let bytes = encode_v2(addr(client), addr(local), Some(&info));
                let header = parse(&bytes);
                let tlvs = tlvs(&header);
                let ssl_tlvs: Vec<_> = tlvs.iter().filter(|t| t.kind == Type::SSL as u8).collect();
                assert_eq!(ssl_tlvs.len(), 1, "exactly one SSL TLV");
                let (client_bits, verify, subs) = ssl(&ssl_tlvs[0].value);
                assert_eq!(client_bits, 0x01, "PP2_CLIENT_SSL, and no certificate bits");
                assert_ne!(verify, 0, "no client certificate was verified");
                assert_eq!(
                    subs,
                    vec![
                        (Type::SSLVersion as u8, "TLSv1.3".to_owned()),
                        (Type::SSLCipher as u8, "TLS_AES_256_GCM_SHA384".to_owned()),
                        (PP2_SUBTYPE_SSL_GROUP, "X25519MLKEM768".to_owned()),
                        (PP2_SUBTYPE_SSL_SIG_SCHEME, "rsa_pss_rsae_sha256".to_owned()),
                    ]
                );
                assert!(
                    !tlvs.iter().any(|t| t.kind == Type::ALPN as u8),
                    "ALPN is never sent"
                );
            }
        }

        #[test]
        fn authority_tlv_carries_the_sni() {
            let info = tls(
                rustls::CipherSuite::TLS13_AES_128_GCM_SHA256,
                Some("MX.Example.Test."),
            );
            let bytes = encode_v2(addr("192.0.2.7:1"), addr("198.51.100.1:2"), Some(&info));
            let header = parse(&bytes);
            let authority: Vec<_> = tlvs(&header)
                .into_iter()
                .filter(|t| t.kind == Type::Authority as u8)
                .map(|t| t.value.to_vec())
                .collect();
            assert_eq!(authority, vec![b"mx.example.test".to_vec()]);

            let info = tls(
                rustls::CipherSuite::TLS13_AES_128_GCM_SHA256,
                Some("192.0.2.1"),
            );
            let bytes = encode_v2(addr("192.0.2.7:1"), addr("198.51.100.1:2"), Some(&info));
            let header = parse(&bytes);
            assert!(
                !tlvs(&header)
                    .iter()
                    .any(|t| t.kind == Type::Authority as u8)
            );
        }

        #[test]
        fn the_longest_header_parses_whole() {
            let longest = format!(
                "{}.{}.{}.{}",
                "a".repeat(63),
                "b".repeat(63),
                "c".repeat(63),
                "d".repeat(61)
            );
            let info = tls(
                rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
                Some(&longest),
            );
            let bytes = encode_v2(
                addr("[2001:db8::1]:1"),
                addr("[2001:db8::2]:2"),
                Some(&info),
            );
            let header = parse(&bytes);
            let kinds: Vec<u8> = tlvs(&header).iter().map(|t| t.kind).collect();
            assert_eq!(kinds, vec![Type::SSL as u8, Type::Authority as u8]);
        }
    }
}
