//! Which protocol versions a client's first TLS record offers: a bounded, sans-I/O look at the
//! ClientHello, used only to name why a handshake failed.
//!
//! rustls checks the ClientHello for a signature_algorithms extension before it negotiates the
//! version, so a TLS 1.0/1.1 client (which never sends one: RFC 5246 §7.4.1.4.1 added it in
//! TLS 1.2) fails as "missing extension" rather than "protocol version". Reading the offered
//! versions ourselves lets the failure be counted for what it is.
//!
//! The look is confined to the first record (RFC 8446 §5.1: at most 2^14 octets of fragment), it
//! never allocates, and anything it cannot read in full is [`Sniff::Unreadable`]: the caller then
//! keeps rustls' own classification.

/// TLS 1.2 on the wire (RFC 5246 §6.2.1).
pub const TLS1_2: u16 = 0x0303;
/// TLS 1.3 on the wire (RFC 8446 §4.2.1).
pub const TLS1_3: u16 = 0x0304;

/// The most octets the sniffer needs: a record header and the largest plaintext fragment
/// (RFC 8446 §5.1, RFC 5246 §6.2.1).
pub const MAX_FIRST_RECORD: usize = RECORD_HEADER + MAX_FRAGMENT;

const RECORD_HEADER: usize = 5;
const MAX_FRAGMENT: usize = 1 << 14;
const CONTENT_TYPE_HANDSHAKE: u8 = 22;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const EXTENSION_SUPPORTED_VERSIONS: u16 = 43;
/// SSL 3.0, the lowest version with the `{3, minor}` encoding; bit n of [`Offered`] is 0x0300 + n.
const SSL3: u16 = 0x0300;

/// What the first record says, given the bytes received so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sniff {
    /// The first record is not complete yet.
    NeedMore,
    /// A ClientHello whose versions could be read in full.
    Offered(Offered),
    /// Not a ClientHello readable within one record: not TLS, malformed, or fragmented across
    /// records. Nothing can be said about its versions.
    Unreadable,
}

/// The SSL 3.0 to TLS 1.3 versions a ClientHello offers (GREASE, DTLS and unknown values are
/// left out: they can never be negotiated).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Offered {
    mask: u8,
}

impl Offered {
    fn with(mut self, version: u16) -> Offered {
        if let Some(bit) = version
            .checked_sub(SSL3)
            .filter(|n| *n <= TLS1_3 - SSL3)
            .and_then(|n| 1u8.checked_shl(u32::from(n)))
        {
            self.mask |= bit;
        }
        self
    }

    /// Every version from SSL 3.0 up to `highest`: what a ClientHello without supported_versions
    /// offers. Its legacy_version is the highest version the client supports (RFC 5246 §7.4.1.2),
    /// and TLS 1.3 can only be offered in supported_versions (RFC 8446 §4.2.1), so a
    /// legacy_version above TLS 1.2 still offers at most TLS 1.2.
    fn up_to(highest: u16) -> Offered {
        (SSL3..=highest.min(TLS1_2)).fold(Offered::default(), Offered::with)
    }

    /// Whether the client offers `version`.
    pub fn includes(self, version: u16) -> bool {
        Offered::default().with(version).mask & self.mask != 0
    }

    /// Whether the client offers any of `accepted`.
    pub fn any_of(self, accepted: &[u16]) -> bool {
        accepted.iter().any(|v| self.includes(*v))
    }

    /// The highest version offered, if any.
    pub fn highest(self) -> Option<u16> {
        (SSL3..=TLS1_3).rev().find(|v| self.includes(*v))
    }
}

/// Reads the versions offered by the ClientHello at the start of `received` (the bytes a client
/// sent first, possibly more than one record). Pure: calling it again on a longer prefix of the
/// same stream gives the same answer once it stops answering [`Sniff::NeedMore`], and it never
/// needs more than [`MAX_FIRST_RECORD`] octets to answer.
pub fn sniff(received: &[u8]) -> Sniff {
    let Some(&first) = received.first() else {
        return Sniff::NeedMore;
    };
    if first & 0x80 != 0 {
        return sniff_sslv2(received);
    }
    if first != CONTENT_TYPE_HANDSHAKE {
        return Sniff::Unreadable;
    }
    let Some((header, rest)) = received.split_at_checked(RECORD_HEADER) else {
        return Sniff::NeedMore;
    };
    let mut h = Reader(header);
    let (Some(_type), Some(record_version), Some(length)) = (h.u8(), h.u16(), h.u16()) else {
        return Sniff::Unreadable;
    };
    let length = usize::from(length);
    // legacy_record_version is 0x03xx for every TLS version (RFC 8446 §5.1).
    if record_version >> 8 != 3 || length == 0 || length > MAX_FRAGMENT {
        return Sniff::Unreadable;
    }
    let Some(fragment) = rest.get(..length) else {
        return Sniff::NeedMore;
    };
    match client_hello_versions(fragment) {
        Some(offered) => Sniff::Offered(offered),
        None => Sniff::Unreadable,
    }
}

/// The ClientHello inside one handshake record fragment (RFC 8446 §4.1.2, RFC 5246 §7.4.1.2).
/// `None` when it does not fit in the fragment or is malformed.
fn client_hello_versions(fragment: &[u8]) -> Option<Offered> {
    let mut r = Reader(fragment);
    if r.u8()? != HANDSHAKE_CLIENT_HELLO {
        return None;
    }
    let length = usize::try_from(r.u24()?).ok()?;
    // A ClientHello longer than this record continues in the next one: not ours to read.
    let mut hello = Reader(r.take(length)?);
    let legacy_version = hello.u16()?;
    hello.take(32)?; // random
    hello.vec8()?; // legacy_session_id
    hello.vec16()?; // cipher_suites
    hello.vec8()?; // legacy_compression_methods
    if hello.0.is_empty() {
        // Extensions are optional before TLS 1.2 (RFC 5246 §7.4.1.2).
        return Some(Offered::up_to(legacy_version));
    }
    let mut extensions = Reader(hello.vec16()?);
    let mut supported: Option<Offered> = None;
    while !extensions.0.is_empty() {
        let kind = extensions.u16()?;
        let data = extensions.vec16()?;
        if kind != EXTENSION_SUPPORTED_VERSIONS {
            continue;
        }
        // At most one extension of a type (RFC 8446 §4.2); a repeat leaves nothing to trust.
        if supported.is_some() {
            return None;
        }
        let mut data = Reader(data);
        let mut list = Reader(data.vec8()?);
        if !data.0.is_empty() || list.0.len() % 2 != 0 {
            return None;
        }
        let mut offered = Offered::default();
        while let Some(version) = list.u16() {
            offered = offered.with(version);
        }
        supported = Some(offered);
    }
    // With supported_versions present, legacy_version is ignored (RFC 8446 §4.2.1).
    Some(supported.unwrap_or_else(|| Offered::up_to(legacy_version)))
}

/// A version-2 CLIENT-HELLO as TLS 1.0-1.2 clients may send for compatibility (RFC 5246
/// Appendix E.2): two length octets with the high bit set, msg_type 1, then the highest version
/// the client supports. rustls accepts none; reading its version only names why.
fn sniff_sslv2(received: &[u8]) -> Sniff {
    let mut r = Reader(received);
    let (Some(_length), Some(msg_type), Some(version)) = (r.u16(), r.u8(), r.u16()) else {
        return Sniff::NeedMore;
    };
    if msg_type != HANDSHAKE_CLIENT_HELLO {
        return Sniff::Unreadable;
    }
    Sniff::Offered(Offered::up_to(version))
}

/// A cursor over a byte string that answers `None` instead of reading past its end.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.0.split_at_checked(n)?;
        self.0 = rest;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }

    fn u16(&mut self) -> Option<u16> {
        let [a, b] = *self.take(2)? else { return None };
        Some(u16::from_be_bytes([a, b]))
    }

    fn u24(&mut self) -> Option<u32> {
        let [a, b, c] = *self.take(3)? else {
            return None;
        };
        Some(u32::from_be_bytes([0, a, b, c]))
    }

    fn vec8(&mut self) -> Option<&'a [u8]> {
        let n = self.u8()?;
        self.take(usize::from(n))
    }

    fn vec16(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()?;
        self.take(usize::from(n))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    // Captured from `openssl s_client` (OpenSSL 3.0) against a listening socket:
    // `-tls1 -cipher DEFAULT@SECLEVEL=0`, `-tls1_1 -cipher DEFAULT@SECLEVEL=0`, `-tls1_2`,
    // `-tls1_3`, and no version option.
    const TLS1_0_HELLO: &[u8] = include_bytes!("../../tests/data/client_hello/openssl-tls1_0.bin");
    const TLS1_1_HELLO: &[u8] = include_bytes!("../../tests/data/client_hello/openssl-tls1_1.bin");
    const TLS1_2_HELLO: &[u8] = include_bytes!("../../tests/data/client_hello/openssl-tls1_2.bin");
    const TLS1_3_HELLO: &[u8] = include_bytes!("../../tests/data/client_hello/openssl-tls1_3.bin");
    const DEFAULT_HELLO: &[u8] =
        include_bytes!("../../tests/data/client_hello/openssl-default.bin");

    const TLS1_0: u16 = 0x0301;
    const TLS1_1: u16 = 0x0302;
    const BOTH: &[u16] = &[TLS1_2, TLS1_3];
    const ONLY_1_3: &[u16] = &[TLS1_3];

    fn offered(bytes: &[u8]) -> Offered {
        match sniff(bytes) {
            Sniff::Offered(o) => o,
            other => panic!("expected versions, got {other:?}"),
        }
    }

    /// A ClientHello as rustls itself sends it (TLS 1.2 and 1.3, X25519MLKEM768 key share: more
    /// than one TCP segment).
    fn rustls_hello() -> Vec<u8> {
        let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
        let name = rustls_pki_types::ServerName::try_from("mx.example.test").unwrap();
        let mut conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name).unwrap();
        let mut out = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut out).unwrap();
        }
        out
    }

    #[test]
    fn captured_hellos_offer_what_openssl_was_told() {
        let o = offered(TLS1_0_HELLO);
        assert_eq!(o.highest(), Some(TLS1_0));
        assert!(!o.any_of(BOTH));
        let o = offered(TLS1_1_HELLO);
        assert_eq!(o.highest(), Some(TLS1_1));
        assert!(o.includes(TLS1_0));
        assert!(!o.any_of(BOTH));
        // `-tls1_2` sends no supported_versions: legacy_version 1.2 offers 1.2 and below.
        let o = offered(TLS1_2_HELLO);
        assert_eq!(o.highest(), Some(TLS1_2));
        assert!(o.any_of(BOTH));
        assert!(!o.any_of(ONLY_1_3));
        // `-tls1_3`: legacy_version says 1.2, supported_versions only 1.3, which wins.
        let o = offered(TLS1_3_HELLO);
        assert_eq!(o.highest(), Some(TLS1_3));
        assert!(!o.includes(TLS1_2));
        assert!(o.any_of(ONLY_1_3));
        let o = offered(DEFAULT_HELLO);
        assert!(o.includes(TLS1_2) && o.includes(TLS1_3));
        assert!(o.any_of(ONLY_1_3));
    }

    #[test]
    fn rustls_hello_offers_both() {
        let hello = rustls_hello();
        assert!(hello.len() > 1460, "{} octets", hello.len());
        let o = offered(&hello);
        assert!(o.includes(TLS1_2) && o.includes(TLS1_3));
    }

    #[test]
    fn every_strict_prefix_needs_more_and_later_bytes_change_nothing() {
        let rustls = rustls_hello();
        for hello in [
            TLS1_0_HELLO,
            TLS1_1_HELLO,
            TLS1_2_HELLO,
            TLS1_3_HELLO,
            DEFAULT_HELLO,
            &rustls,
        ] {
            let whole = sniff(hello);
            assert!(matches!(whole, Sniff::Offered(_)));
            for cut in 0..hello.len() {
                assert_eq!(sniff(&hello[..cut]), Sniff::NeedMore, "cut at {cut}");
            }
            // What follows the first record (early data, the next record, garbage) is not read.
            let mut longer = hello.to_vec();
            longer.extend_from_slice(&[0x17, 0x03, 0x03, 0xff, 0xff, 0]);
            assert_eq!(sniff(&longer), whole);
        }
    }

    /// Replaces the extensions of a captured hello with `extensions`, fixing every length.
    fn with_extensions(hello: &[u8], legacy_version: u16, extensions: &[u8]) -> Vec<u8> {
        // The captured TLS 1.0 hello: 5 header + 4 handshake header + 2 version + 32 random +
        // 1 empty session id, then 2 + 18 suites and 2 compression octets.
        let body_prefix = &hello[9 + 2..9 + 2 + 32 + 1 + 2 + 18 + 2];
        let mut body = legacy_version.to_be_bytes().to_vec();
        body.extend_from_slice(body_prefix);
        if !extensions.is_empty() {
            body.extend_from_slice(&(extensions.len() as u16).to_be_bytes());
            body.extend_from_slice(extensions);
        }
        let mut handshake = vec![1];
        handshake.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        handshake.extend_from_slice(&body);
        let mut record = vec![22, 3, 1];
        record.extend_from_slice(&(handshake.len() as u16).to_be_bytes());
        record.extend_from_slice(&handshake);
        record
    }

    fn supported_versions(versions: &[u16]) -> Vec<u8> {
        let mut ext = vec![0, 43];
        ext.extend_from_slice(&((versions.len() * 2 + 1) as u16).to_be_bytes());
        ext.push((versions.len() * 2) as u8);
        for v in versions {
            ext.extend_from_slice(&v.to_be_bytes());
        }
        ext
    }

    #[test]
    fn supported_versions_overrides_legacy_version() {
        // Legacy 1.2 but only 1.1 and 1.0 listed (and a GREASE value): nothing acceptable.
        let hello = with_extensions(
            TLS1_0_HELLO,
            TLS1_2,
            &supported_versions(&[0x0a0a, TLS1_1, TLS1_0]),
        );
        let o = offered(&hello);
        assert_eq!(o.highest(), Some(TLS1_1));
        assert!(!o.any_of(BOTH));
        // Legacy 1.0 with supported_versions listing 1.3 is a TLS 1.3 client.
        let hello = with_extensions(TLS1_0_HELLO, TLS1_0, &supported_versions(&[TLS1_3]));
        assert!(offered(&hello).any_of(ONLY_1_3));
        // No extensions at all: legacy_version decides; TLS 1.3 needs supported_versions.
        let hello = with_extensions(TLS1_0_HELLO, TLS1_3, &[]);
        let o = offered(&hello);
        assert!(o.includes(TLS1_2) && !o.includes(TLS1_3));
        // Only unknown versions listed: none offered.
        let hello = with_extensions(TLS1_0_HELLO, TLS1_2, &supported_versions(&[0x7f1c, 0xfefd]));
        assert_eq!(offered(&hello).highest(), None);
    }

    #[test]
    fn malformed_or_fragmented_hellos_are_unreadable() {
        let sv = supported_versions(&[TLS1_3]);
        // Twice the same extension.
        let twice = [sv.clone(), sv.clone()].concat();
        assert_eq!(
            sniff(&with_extensions(TLS1_0_HELLO, TLS1_2, &twice)),
            Sniff::Unreadable
        );
        // Odd-length version list.
        let odd = [0, 43, 0, 4, 3, 3, 4, 0];
        assert_eq!(
            sniff(&with_extensions(TLS1_0_HELLO, TLS1_2, &odd)),
            Sniff::Unreadable
        );
        // Extension data longer than the extensions block.
        let long = [0, 43, 0, 9, 2, 3, 4];
        assert_eq!(
            sniff(&with_extensions(TLS1_0_HELLO, TLS1_2, &long)),
            Sniff::Unreadable
        );
        // A ClientHello longer than its record (continued in the next one).
        let mut fragmented = TLS1_2_HELLO.to_vec();
        fragmented[3..5].copy_from_slice(&100u16.to_be_bytes());
        fragmented.truncate(105);
        assert_eq!(sniff(&fragmented), Sniff::Unreadable);
        // Not a ClientHello: a ServerHello, an alert record, application data, plaintext, HTTP.
        let mut server_hello = TLS1_2_HELLO.to_vec();
        server_hello[5] = 2;
        assert_eq!(sniff(&server_hello), Sniff::Unreadable);
        for garbage in [
            &b"\x15\x03\x03\x00\x02\x02\x46"[..],
            b"\x17\x03\x03\x00\x01x",
            b"a1 LOGIN alice secret\r\n",
            b"EHLO x\r\n",
            b"GET / HTTP/1.1\r\n",
            b"\x16\x02\x00\x00\x01\x01",
            b"\x16\x03\x01\x00\x00",
            b"\x16\x03\x01\x40\x01",
            b"\x16\x03\x01\xff\xff",
        ] {
            assert_eq!(sniff(garbage), Sniff::Unreadable, "{garbage:?}");
        }
    }

    #[test]
    fn sslv2_compatible_hello_names_its_version() {
        // RFC 5246 E.2: length 0x802e, CLIENT-HELLO, version 3.1, then lengths and data.
        let hello = b"\x80\x2e\x01\x03\x01\x00\x15\x00\x00\x00\x10";
        assert_eq!(sniff(&hello[..4]), Sniff::NeedMore);
        let o = offered(hello);
        assert_eq!(o.highest(), Some(TLS1_0));
        assert!(!o.any_of(BOTH));
        assert_eq!(sniff(b"\x80\x2e\x04\x03\x01"), Sniff::Unreadable);
    }

    #[test]
    fn never_panics_on_hostile_input() {
        // Deterministic pseudo-random bytes, and every single-octet corruption of real hellos.
        let mut x: u32 = 0x1234_5678;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x
        };
        for _ in 0..20_000 {
            let len = (next() % 300) as usize;
            let mut bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if let Some(b) = bytes.first_mut() {
                *b = if next() % 2 == 0 { 22 } else { *b };
            }
            let _ = sniff(&bytes);
        }
        for hello in [TLS1_0_HELLO, TLS1_3_HELLO, DEFAULT_HELLO] {
            for at in 0..hello.len() {
                for value in [0u8, 1, 0x7f, 0x80, 0xff] {
                    let mut bytes = hello.to_vec();
                    bytes[at] = value;
                    let _ = sniff(&bytes);
                }
            }
        }
    }
}
