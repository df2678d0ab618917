//! The PROXY protocol header a load balancer puts in front of a client's bytes
//! (HAProxy `doc/proxy-protocol.txt`, v1 text and v2 binary), read on listeners with
//! `proxy_protocol_from`.
//!
//! Sans-I/O and bounded: [`HeaderReader`] frames the header itself and says how many more octets
//! it may be given ([`HeaderReader::wanted`]) without ever reaching past the header's end, so
//! a driver that reads at most that many never takes an octet of the TLS ClientHello or of the
//! protocol that follows (and needs no buffer to hand back). The framed header is then decoded
//! by the `ppp` crate.
//!
//! Framing rules:
//! - The first [`MIN_HEADER`] octets may always be read: no valid header of either version is
//!   shorter (`PROXY UNKNOWN\r\n` is 15, the v2 fixed part 16).
//! - v2: 16 fixed octets, then exactly the announced length. A header longer than
//!   [`MAX_V2_HEADER`] is refused as `too_long` before its body is read.
//! - v1: one octet at a time after the first 15 (a v1 line has no length field), up to CRLF,
//!   at most [`MAX_V1_HEADER`] (107) octets (§2.1).
//!
//! What a header means for the session ([`Header`]):
//! - `PROXY` with TCP over IPv4/IPv6: the source address is the client's, the destination the
//!   address it reached.
//! - v2 `LOCAL` (§2.2: "the connection was established on purpose by the proxy without being
//!   relayed", i.e. a health check): closed quietly by the caller.
//! - v1 `UNKNOWN`, or v2 `PROXY` with `AF_UNSPEC`: §2.1/§2.2 say the receiver uses the real
//!   connection endpoints, so the balancer's own address stands for the client.
//! - v2 over UDP or UNIX sockets cannot carry a mail session: refused as malformed.
//! - TLVs are read past but not used: mailfront terminates TLS itself, and what it tells the
//!   backend is written fresh ([`crate::proxy_protocol`]).

use std::net::{IpAddr, SocketAddr};

/// The 12 octets every v2 header starts with (§2.2).
pub const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// How every v1 header starts (§2.1).
pub const V1_PREFIX: &[u8; 6] = b"PROXY ";
/// No valid header is shorter: `PROXY UNKNOWN\r\n`.
pub const MIN_HEADER: usize = 15;
/// §2.1: "a receiver may read up to 107 characters" for the v1 line, CRLF included.
pub const MAX_V1_HEADER: usize = 107;
/// The v2 fixed part: signature, version/command, family/protocol, length.
pub const V2_FIXED: usize = 16;
/// v2 headers may announce 65,535 octets of addresses and TLVs; balancers send far less (AWS
/// NLB's VPC endpoint id, Azure's link id, GCP's PSC id, HAProxy's SSL TLVs are each under 300
/// octets). 4 KiB leaves room for all of them together and bounds what one connection makes
/// mailfront hold before it is trusted with anything.
pub const MAX_V2_HEADER: usize = 4096;

/// What the balancer said about the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// A relayed client: its address and the address it connected to.
    Proxy {
        source: SocketAddr,
        destination: SocketAddr,
    },
    /// v2 `LOCAL`: the balancer's own connection (a health check); nothing to serve.
    Local,
    /// v1 `UNKNOWN` or v2 `AF_UNSPEC`: relayed, but the balancer does not say from where.
    Unknown,
}

/// Why a connection's header was refused. Each has a metric label ([`HeaderError::as_str`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// The first octets are not a PROXY header (a client speaking TLS or the protocol directly).
    #[error("no PROXY protocol header")]
    Missing,
    #[error("malformed PROXY protocol header: {0}")]
    Malformed(String),
    #[error("PROXY protocol header longer than {0} octets")]
    TooLong(usize),
}

impl HeaderError {
    /// The metric label: `missing`, `malformed` or `too_long`.
    pub fn as_str(&self) -> &'static str {
        match self {
            HeaderError::Missing => "missing",
            HeaderError::Malformed(_) => "malformed",
            HeaderError::TooLong(_) => "too_long",
        }
    }
}

/// Which version the first octets announced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Version {
    Undecided,
    V1,
    V2,
}

/// One connection's header, fed octets as they arrive.
#[derive(Debug)]
pub struct HeaderReader {
    buf: Vec<u8>,
    version: Version,
    /// Set once a result was returned: the reader takes nothing more.
    done: bool,
}

impl Default for HeaderReader {
    fn default() -> Self {
        HeaderReader::new()
    }
}

impl HeaderReader {
    pub fn new() -> HeaderReader {
        HeaderReader {
            buf: Vec::with_capacity(MIN_HEADER + 1),
            version: Version::Undecided,
            done: false,
        }
    }

    /// How many octets may be fed next without passing the end of the header; 0 once a result
    /// was returned. Never more than [`MAX_V2_HEADER`].
    pub fn wanted(&self) -> usize {
        if self.done {
            return 0;
        }
        let have = self.buf.len();
        match self.version {
            Version::Undecided => MIN_HEADER.saturating_sub(have).max(1),
            Version::V1 => MIN_HEADER.saturating_sub(have).max(1),
            Version::V2 if have < V2_FIXED => V2_FIXED - have,
            Version::V2 => self.v2_total().saturating_sub(have).max(1),
        }
    }

    /// Takes octets from `input` and returns how many it consumed, which is never past the end
    /// of the header (the rest belongs to the protocol after it), and the result once there is
    /// one. `Ok(None)`: more octets are needed.
    pub fn feed(&mut self, input: &[u8]) -> (usize, Result<Option<Header>, HeaderError>) {
        let mut used: usize = 0;
        while !self.done {
            let want = self.wanted();
            let Some(chunk) = input.get(used..used.saturating_add(want).min(input.len())) else {
                break;
            };
            if chunk.is_empty() {
                break;
            }
            used += chunk.len();
            self.buf.extend_from_slice(chunk);
            match self.step() {
                Ok(None) => {}
                result => {
                    self.done = true;
                    return (used, result);
                }
            }
        }
        (used, Ok(None))
    }

    /// The connection ended before a whole header: what to report.
    pub fn closed_early(&self) -> HeaderError {
        if self.buf.is_empty() {
            HeaderError::Missing
        } else {
            HeaderError::Malformed(format!(
                "connection closed after {} octets of the header",
                self.buf.len()
            ))
        }
    }

    /// v2 total length from the fixed part (only called with at least 16 octets).
    fn v2_total(&self) -> usize {
        let len = match (self.buf.get(14), self.buf.get(15)) {
            (Some(&hi), Some(&lo)) => usize::from(u16::from_be_bytes([hi, lo])),
            _ => 0,
        };
        V2_FIXED + len
    }

    /// Looks at what has been collected so far.
    fn step(&mut self) -> Result<Option<Header>, HeaderError> {
        if self.version == Version::Undecided {
            let n = self.buf.len();
            if V2_SIGNATURE.starts_with(&self.buf) || self.buf.starts_with(V2_SIGNATURE) {
                if n >= V2_SIGNATURE.len() {
                    self.version = Version::V2;
                }
            } else if V1_PREFIX.starts_with(&self.buf) || self.buf.starts_with(V1_PREFIX) {
                if n >= V1_PREFIX.len() {
                    self.version = Version::V1;
                }
            } else {
                return Err(HeaderError::Missing);
            }
            if self.version == Version::Undecided {
                return Ok(None);
            }
        }
        match self.version {
            Version::V1 => self.step_v1(),
            Version::V2 => self.step_v2(),
            Version::Undecided => Ok(None),
        }
    }

    fn step_v1(&mut self) -> Result<Option<Header>, HeaderError> {
        let line = self.buf.as_slice();
        // CR and LF only as the final pair: a lone one anywhere is not a v1 header.
        if let Some(pos) = line.iter().position(|&b| b == b'\r' || b == b'\n') {
            let tail = line.get(pos..).unwrap_or_default();
            return match tail {
                b"\r" => Ok(None),
                b"\r\n" => decode_v1(line).map(Some),
                _ => Err(HeaderError::Malformed(
                    "stray CR or LF in the v1 line".into(),
                )),
            };
        }
        if line.len() >= MAX_V1_HEADER {
            return Err(HeaderError::TooLong(MAX_V1_HEADER));
        }
        Ok(None)
    }

    fn step_v2(&mut self) -> Result<Option<Header>, HeaderError> {
        if self.buf.len() < V2_FIXED {
            return Ok(None);
        }
        let total = self.v2_total();
        if total > MAX_V2_HEADER {
            return Err(HeaderError::TooLong(MAX_V2_HEADER));
        }
        if self.buf.len() < total {
            return Ok(None);
        }
        decode_v2(&self.buf).map(Some)
    }
}

/// Decodes a complete v1 line (CRLF included) with `ppp`.
fn decode_v1(line: &[u8]) -> Result<Header, HeaderError> {
    use ppp::v1;
    let header =
        v1::Header::try_from(line).map_err(|e| HeaderError::Malformed(format!("v1: {e}")))?;
    // ppp stops at the first CR; the framing above makes that the end of `line`.
    if header.header.len() != line.len() {
        return Err(HeaderError::Malformed("v1: trailing octets".into()));
    }
    Ok(match header.addresses {
        v1::Addresses::Tcp4(a) => Header::Proxy {
            source: SocketAddr::new(IpAddr::V4(a.source_address), a.source_port),
            destination: SocketAddr::new(IpAddr::V4(a.destination_address), a.destination_port),
        },
        v1::Addresses::Tcp6(a) => Header::Proxy {
            source: SocketAddr::new(IpAddr::V6(a.source_address), a.source_port),
            destination: SocketAddr::new(IpAddr::V6(a.destination_address), a.destination_port),
        },
        v1::Addresses::Unknown => Header::Unknown,
    })
}

/// Decodes a complete v2 header with `ppp`.
fn decode_v2(bytes: &[u8]) -> Result<Header, HeaderError> {
    use ppp::v2;
    let header =
        v2::Header::try_from(bytes).map_err(|e| HeaderError::Malformed(format!("v2: {e}")))?;
    if header.command == v2::Command::Local {
        // §2.2: the receiver must accept LOCAL and ignore the address information.
        return Ok(Header::Local);
    }
    match header.protocol {
        v2::Protocol::Stream | v2::Protocol::Unspecified => {}
        v2::Protocol::Datagram => {
            return Err(HeaderError::Malformed("v2: a datagram connection".into()));
        }
    }
    match header.addresses {
        v2::Addresses::IPv4(a) if header.protocol == v2::Protocol::Stream => Ok(Header::Proxy {
            source: SocketAddr::new(IpAddr::V4(a.source_address), a.source_port),
            destination: SocketAddr::new(IpAddr::V4(a.destination_address), a.destination_port),
        }),
        v2::Addresses::IPv6(a) if header.protocol == v2::Protocol::Stream => Ok(Header::Proxy {
            source: SocketAddr::new(IpAddr::V6(a.source_address), a.source_port),
            destination: SocketAddr::new(IpAddr::V6(a.destination_address), a.destination_port),
        }),
        v2::Addresses::Unspecified => Ok(Header::Unknown),
        v2::Addresses::Unix(_) => Err(HeaderError::Malformed("v2: a UNIX socket".into())),
        _ => Err(HeaderError::Malformed(
            "v2: an address without a stream protocol".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// Feeds `input` in chunks of `n`, never more than `wanted()`, the way the driver reads.
    fn read_in_chunks(input: &[u8], n: usize) -> (usize, Result<Option<Header>, HeaderError>) {
        let mut r = HeaderReader::new();
        let mut pos = 0;
        loop {
            let want = r.wanted().min(n);
            assert!(want > 0, "wanted() is 0 before a result");
            let end = (pos + want).min(input.len());
            let chunk = &input[pos..end];
            if chunk.is_empty() {
                return (pos, Err(r.closed_early()));
            }
            let (used, result) = r.feed(chunk);
            assert_eq!(used, chunk.len(), "a chunk within wanted() is taken whole");
            pos += used;
            match result {
                Ok(None) => {}
                other => return (pos, other),
            }
        }
    }

    /// Every way of cutting the input gives the same result and consumes the same octets.
    fn read(input: &[u8]) -> (usize, Result<Option<Header>, HeaderError>) {
        let whole = {
            let mut r = HeaderReader::new();
            let (used, result) = r.feed(input);
            match result {
                Ok(None) => (used, Err(r.closed_early())),
                other => (used, other),
            }
        };
        for n in [1, 2, 3, 7, 15, 16, 64, 512] {
            let (used, result) = read_in_chunks(input, n);
            // After a refusal only its kind matters (the message may name another flaw, and
            // where the octets went does not matter: the connection closes).
            match (&result, &whole.1) {
                (Err(a), Err(b)) => assert_eq!(a.as_str(), b.as_str(), "chunks of {n}"),
                _ => assert_eq!((used, &result), (whole.0, &whole.1), "chunks of {n}"),
            }
        }
        whole
    }

    fn v2(command: u8, family: u8, body: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.push(command);
        h.push(family);
        h.extend_from_slice(&(body.len() as u16).to_be_bytes());
        h.extend_from_slice(body);
        h
    }

    const CLIENT_HELLO: &[u8] = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03";

    #[test]
    fn the_specs_v1_examples_are_read() {
        // §2.1's examples.
        let (used, r) = read(b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n");
        assert_eq!(used, 56);
        assert_eq!(
            r,
            Ok(Some(Header::Proxy {
                source: v4("255.255.255.255:65535"),
                destination: v4("255.255.255.255:65535"),
            }))
        );
        let line = b"PROXY TCP6 ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n";
        assert!(matches!(read(line).1, Err(HeaderError::Malformed(_))));
        let (_, r) = read(b"PROXY TCP6 2001:db8::1 2001:db8::2 40000 993\r\n");
        assert_eq!(
            r,
            Ok(Some(Header::Proxy {
                source: "[2001:db8::1]:40000".parse().unwrap(),
                destination: "[2001:db8::2]:993".parse().unwrap(),
            }))
        );
        assert_eq!(read(b"PROXY UNKNOWN\r\n"), (15, Ok(Some(Header::Unknown))));
        assert_eq!(
            read(b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n").1,
            Ok(Some(Header::Unknown))
        );
    }

    #[test]
    fn nothing_after_the_header_is_consumed() {
        for header in [
            b"PROXY TCP4 192.0.2.1 198.51.100.2 40000 993\r\n".to_vec(),
            v2(
                0x21,
                0x11,
                &[192, 0, 2, 1, 198, 51, 100, 2, 0x9c, 0x40, 0x03, 0xe1],
            ),
            v2(0x20, 0x00, &[]),
        ] {
            let mut input = header.clone();
            input.extend_from_slice(CLIENT_HELLO);
            let (used, result) = read(&input);
            assert_eq!(used, header.len());
            assert!(matches!(result, Ok(Some(_))));
            // And a driver that reads only wanted() never asks for an octet past the header.
            let mut r = HeaderReader::new();
            let mut pos = 0;
            while r.wanted() > 0 {
                let want = r.wanted();
                assert!(pos + want <= header.len(), "asked past the header");
                let (used, _) = r.feed(&input[pos..pos + want]);
                pos += used;
            }
            assert_eq!(pos, header.len());
        }
    }

    #[test]
    fn v2_proxy_local_and_unspec_are_read() {
        let body = [192, 0, 2, 1, 198, 51, 100, 2, 0x9c, 0x40, 0x03, 0xe1];
        assert_eq!(
            read(&v2(0x21, 0x11, &body)).1,
            Ok(Some(Header::Proxy {
                source: v4("192.0.2.1:40000"),
                destination: v4("198.51.100.2:993"),
            }))
        );
        let mut six = Vec::new();
        six.extend_from_slice(
            &"2001:db8::1"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
        );
        six.extend_from_slice(
            &"2001:db8::2"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
        );
        six.extend_from_slice(&[0x9c, 0x40, 0x02, 0x4b]);
        assert_eq!(
            read(&v2(0x21, 0x21, &six)).1,
            Ok(Some(Header::Proxy {
                source: "[2001:db8::1]:40000".parse().unwrap(),
                destination: "[2001:db8::2]:587".parse().unwrap(),
            }))
        );
        // LOCAL, with or without addresses (health checks).
        assert_eq!(read(&v2(0x20, 0x00, &[])).1, Ok(Some(Header::Local)));
        assert_eq!(read(&v2(0x20, 0x11, &body)).1, Ok(Some(Header::Local)));
        assert_eq!(read(&v2(0x21, 0x00, &[])).1, Ok(Some(Header::Unknown)));
        // TLVs after the addresses are read past (an AWS VPC endpoint id, 0xEA).
        let mut with_tlv = body.to_vec();
        with_tlv.extend_from_slice(&[0xEA, 0x00, 0x05, 0x01, b'v', b'p', b'c', b'e']);
        let header = v2(0x21, 0x11, &with_tlv);
        assert_eq!(read(&header).0, header.len());
    }

    #[test]
    fn what_is_not_a_header_is_missing() {
        for input in [
            CLIENT_HELLO,
            b"EHLO client.example\r\n",
            b"a1 LOGIN alice secret\r\n",
            b"PROXZ TCP4",
            b"\r\n\r\n\0\r\nQUIX\n\x21\x11\x00\x0c",
            b"proxy TCP4 192.0.2.1 198.51.100.2 1 2\r\n",
            b"",
        ] {
            assert_eq!(read(input).1, Err(HeaderError::Missing), "{input:?}");
        }
        // Refused at the first octet that cannot start a header: nothing more is asked for.
        let mut r = HeaderReader::new();
        assert_eq!(r.feed(b"\x16").1, Err(HeaderError::Missing));
        assert_eq!(r.wanted(), 0);
    }

    #[test]
    fn hostile_and_truncated_headers_are_refused() {
        let malformed = [
            &b"PROXY TCP4 192.0.2.1 198.51.100.2 40000\r\n"[..],
            b"PROXY TCP4 192.0.2.1 198.51.100.2 40000 99999\r\n",
            b"PROXY TCP4 192.0.2.1 198.51.100.2 040000 993\r\n",
            b"PROXY TCP4 2001:db8::1 198.51.100.2 40000 993\r\n",
            b"PROXY TCP5 192.0.2.1 198.51.100.2 40000 993\r\n",
            b"PROXY TCP4 192.0.2.1 198.51.100.2 40000 993\n",
            b"PROXY TCP4 192.0.2.1\r198.51.100.2 40000 993\r\n",
            b"PROXY TCP4 192.0.2.1 198.51.100.2 40000 993 extra\r\n",
            b"PROXY TCP4 192.0.2.1  198.51.100.2 40000 993\r\n",
            b"PROXY TCP4 192.0.2.1 198.51.100.2 40000 993\r\r\n",
        ];
        for input in malformed {
            assert!(
                matches!(read(input).1, Err(HeaderError::Malformed(_))),
                "{:?}: {:?}",
                String::from_utf8_lossy(input),
                read(input).1
            );
        }
        let body = [192, 0, 2, 1, 198, 51, 100, 2, 0x9c, 0x40, 0x03, 0xe1];
        for header in [
            v2(0x11, 0x11, &body),       // version 1 in a v2 header
            v2(0x22, 0x11, &body),       // command 2
            v2(0x21, 0x41, &body),       // family 4
            v2(0x21, 0x13, &body),       // protocol 3
            v2(0x21, 0x12, &body),       // UDP
            v2(0x21, 0x31, &[0u8; 216]), // UNIX
            v2(0x21, 0x11, &body[..8]),  // shorter than its addresses
            v2(0x21, 0x21, &body),       // IPv6 with IPv4's length
        ] {
            assert!(
                matches!(read(&header).1, Err(HeaderError::Malformed(_))),
                "{header:x?}: {:?}",
                read(&header).1
            );
        }
        // Truncated: the connection closes mid-header.
        let whole = v2(0x21, 0x11, &body);
        for cut in 1..whole.len() {
            assert!(matches!(
                read(&whole[..cut]).1,
                Err(HeaderError::Malformed(_))
            ));
        }
        let line = b"PROXY TCP4 192.0.2.1 198.51.100.2 40000 993\r\n";
        for cut in 1..line.len() {
            assert!(matches!(
                read(&line[..cut]).1,
                Err(HeaderError::Malformed(_))
            ));
        }
    }

    #[test]
    fn over_long_headers_are_refused_before_their_body_is_read() {
        let mut line = b"PROXY UNKNOWN ".to_vec();
        line.resize(MAX_V1_HEADER + 10, b'x');
        assert_eq!(read(&line).1, Err(HeaderError::TooLong(MAX_V1_HEADER)));
        // Exactly 107 octets with CRLF is fine.
        let mut fits = b"PROXY UNKNOWN ".to_vec();
        fits.resize(MAX_V1_HEADER - 2, b'x');
        fits.extend_from_slice(b"\r\n");
        assert_eq!(read(&fits), (MAX_V1_HEADER, Ok(Some(Header::Unknown))));
        // v2 announcing 65535 octets: refused after the 16 fixed ones.
        let mut big = V2_SIGNATURE.to_vec();
        big.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        big.resize(70_000, 0);
        assert_eq!(
            read(&big),
            (V2_FIXED, Err(HeaderError::TooLong(MAX_V2_HEADER)))
        );
        assert_eq!(
            read_in_chunks(&big, 1).0,
            V2_FIXED,
            "refused before the body is read"
        );
        // The largest allowed one is read.
        let mut body = vec![192, 0, 2, 1, 198, 51, 100, 2, 0x9c, 0x40, 0x03, 0xe1];
        let pad = MAX_V2_HEADER - V2_FIXED - body.len() - 3;
        body.push(0x04); // PP2_TYPE_NOOP
        body.extend_from_slice(&(pad as u16).to_be_bytes());
        body.resize(MAX_V2_HEADER - V2_FIXED, 0);
        let header = v2(0x21, 0x11, &body);
        assert_eq!(header.len(), MAX_V2_HEADER);
        assert!(matches!(
            read(&header),
            (MAX_V2_HEADER, Ok(Some(Header::Proxy { .. })))
        ));
        let mut over = body.clone();
        over.push(0);
        assert_eq!(
            read(&v2(0x21, 0x11, &over)).1,
            Err(HeaderError::TooLong(MAX_V2_HEADER))
        );
    }

    #[test]
    fn random_input_never_panics_and_never_reads_past_the_header() {
        let mut rng = fastrand::Rng::with_seed(13);
        let prefixes: [&[u8]; 3] = [b"", V2_SIGNATURE, V1_PREFIX];
        for _ in 0..20_000 {
            let mut input = prefixes[rng.usize(..prefixes.len())].to_vec();
            let n = rng.usize(..200);
            input.extend((0..n).map(|_| rng.u8(..)));
            let (used, result) = read(&input);
            assert!(used <= input.len());
            if let Ok(Some(_)) = result {
                assert!(used <= MAX_V2_HEADER);
            }
        }
    }

    #[test]
    fn error_labels_are_a_closed_set() {
        assert_eq!(HeaderError::Missing.as_str(), "missing");
        assert_eq!(HeaderError::Malformed(String::new()).as_str(), "malformed");
        assert_eq!(HeaderError::TooLong(1).as_str(), "too_long");
    }
}
