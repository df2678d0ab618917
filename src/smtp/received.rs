//! The Received field mailfront prepends to every message received over TLS
//! (RFC 5321 §4.4, RFC 3848, RFC 8314 §4.3):
//!
//! ```text
//! Received: from client.example.org (unknown [192.0.2.10])
//!     by mx.example.test (mailfront) with ESMTPSA id 4LZ1qk0xPq7a
//!     tls TLS_AES_256_GCM_SHA384 group x25519;
//!     Sun, 22 Nov 2026 12:00:00 +0000
//! ```
//!
//! Clause order follows Opt-info: `with`, `id`, `for`, then the additional-registered `tls` and
//! `group` clauses (RFC 5321 §4.4 Opt-info, RFC 8314 §4.3). TCP-info is `unknown [ip]`, as Postfix writes it when it has no
//! verified reverse name (mailfront does no DNS). Client text only ever appears after
//! validation: an EHLO argument that is not a Domain or address literal is replaced by the
//! address literal of the connection and shown only as a sanitised `(helo=…)` comment, so no
//! client text can break the field's grammar.
//! (Continuation lines start with one TAB.) Lines are folded with CRLF TAB and stay far below 998 octets (RFC 5322 §2.1.1).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use time::format_description::well_known::Rfc2822;
use time::{OffsetDateTime, UtcOffset};

/// Longest mailbox put in the `for` clause (RFC 5321 §4.5.3.1.3 path limit).
const MAX_PATH: usize = 256;
/// Longest sanitised EHLO text in the `(helo=…)` comment.
const MAX_HELO_COMMENT: usize = 64;
/// Used for `by` if the configured hostname is not a Domain (config validation should stop it).
const FALLBACK_HOSTNAME: &str = "localhost";
/// Length of a random id: 62^12 (about 2^71) values, so ids do not repeat in a log's lifetime.
const ID_LEN: usize = 12;
/// Longest caller-chosen id: a session id fits, and the clause stays short.
#[cfg(test)]
const MAX_ID_LEN: usize = 64;
/// Longest cipher or group name written: IANA names are under 60 characters, so anything
/// longer is not one and is left out (or written in hex) rather than put in a header.
const MAX_TLS_NAME_LEN: usize = 128;
/// RFC 5322 §2.1.1: a line must not exceed 998 characters, CRLF excluded.
const MAX_LINE_LEN: usize = 998;

/// The `with` protocol (RFC 3848).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WithProtocol {
    /// HELO session: RFC 3848 adds S/A only to ESMTP (as Postfix does).
    Smtp,
    /// EHLO over TLS (RFC 8314 §4.3 names ESMTPS the TLS indicator, implicit TLS included).
    Esmtps,
    /// EHLO over TLS after a 235 to AUTH (RFC 4954 §7).
    Esmtpsa,
}

impl WithProtocol {
    /// The protocol for a TLS session: `ehlo` false after HELO, `authenticated` after a 235.
    pub fn for_session(ehlo: bool, authenticated: bool) -> Self {
        match (ehlo, authenticated) {
            (false, _) => WithProtocol::Smtp,
            (true, false) => WithProtocol::Esmtps,
            (true, true) => WithProtocol::Esmtpsa,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            WithProtocol::Smtp => "SMTP",
            WithProtocol::Esmtps => "ESMTPS",
            WithProtocol::Esmtpsa => "ESMTPSA",
        }
    }
}

/// The `id` clause value: alphanumeric, so always an Atom.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedId(String);

impl ReceivedId {
    /// A fresh random id (not secret; it only ties the header to mailfront's logs).
    pub fn random() -> Self {
        ReceivedId((0..ID_LEN).map(|_| fastrand::alphanumeric()).collect())
    }

    /// An id chosen by the caller (tests: a fixed one): 1–64 ASCII letters and digits.
    #[cfg(test)]
    pub(crate) fn new(id: &str) -> Option<Self> {
        (!id.is_empty() && id.len() <= MAX_ID_LEN && id.bytes().all(|b| b.is_ascii_alphanumeric()))
            .then(|| ReceivedId(id.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The negotiated cipher suite: its IANA name when known, and its code point for the hex form
/// RFC 8314 §4.3 allows when the name is unknown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TlsCipher<'a> {
    pub iana_name: Option<&'a str>,
    pub code: u16,
}

impl TlsCipher<'static> {
    /// The suite rustls negotiated, named from the IANA table in [`crate::tls::names`].
    pub fn negotiated(suite: rustls::CipherSuite) -> Self {
        let code = u16::from(suite);
        TlsCipher {
            iana_name: crate::tls::names::known_cipher_suite_name(code),
            code,
        }
    }
}

/// Everything the field says.
#[derive(Debug, Clone, Copy)]
pub struct ReceivedInfo<'a> {
    /// The client's EHLO/HELO argument from after TLS (RFC 3207 §4.2), unvalidated.
    pub helo: &'a [u8],
    /// The client address (from the TCP connection or a trusted PROXY header).
    pub client_ip: IpAddr,
    /// mailfront's configured hostname.
    pub hostname: &'a str,
    pub protocol: WithProtocol,
    pub id: &'a ReceivedId,
    /// The recipient, only when exactly one RCPT was accepted by the backend (RFC 5321 §4.4: with
    /// several, a `for` clause would reveal the other recipients, RFC 5321 §7.2); path
    /// without angle brackets. Left out unless it is a plain `local@domain` mailbox.
    pub recipient: Option<&'a [u8]>,
    pub cipher: TlsCipher<'a>,
    /// The IANA group name; the clause is left out when unknown (there is no hex form).
    pub group: Option<&'a str>,
    pub date: OffsetDateTime,
}

/// Builds the complete field, ending in CRLF, ready to put before the message content.
pub fn received_header(info: &ReceivedInfo<'_>) -> Vec<u8> {
    let ip = address_literal(info.client_ip);
    let mut out = String::with_capacity(256);
    out.push_str("Received: from ");
    match std::str::from_utf8(info.helo)
        .ok()
        .filter(|h| is_domain(h) || is_address_literal(h))
    {
        Some(helo) => {
            out.push_str(helo);
            out.push_str(" (unknown ");
            out.push_str(&ip);
            out.push(')');
        }
        None => {
            out.push_str(&ip);
            out.push_str(" (unknown ");
            out.push_str(&ip);
            out.push(')');
            if !info.helo.is_empty() {
                out.push_str(" (helo=");
                out.push_str(&sanitised_comment(info.helo));
                out.push(')');
            }
        }
    }
    out.push_str("\r\n\tby ");
    out.push_str(if is_domain(info.hostname) {
        info.hostname
    } else {
        FALLBACK_HOSTNAME
    });
    out.push_str(" (mailfront) with ");
    out.push_str(info.protocol.as_str());
    out.push_str(" id ");
    out.push_str(info.id.as_str());
    if let Some(recipient) = info
        .recipient
        .and_then(|r| std::str::from_utf8(r).ok())
        .filter(|r| is_plain_mailbox(r))
    {
        out.push_str("\r\n\tfor <");
        out.push_str(recipient);
        out.push('>');
    }
    out.push_str("\r\n\ttls ");
    match info.cipher.iana_name.filter(|n| is_tls_cipher_name(n)) {
        Some(name) => out.push_str(name),
        None => out.push_str(&format!("0x{:04X}", info.cipher.code)),
    }
    if let Some(group) = info.group.filter(|g| is_dh_group(g)) {
        out.push_str(" group ");
        out.push_str(group);
    }
    out.push_str(";\r\n\t");
    out.push_str(&rfc5322_date(info.date));
    out.push_str("\r\n");
    out.into_bytes()
}

/// `[192.0.2.10]` or `[IPv6:2001:db8::1]` (RFC 5321 §4.1.3). An IPv4 client on a dual-stack
/// listener shows as IPv4: admission (`src/admission.rs`) made its mapped address IPv4 already.
pub fn address_literal(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => format!("[{v4}]"),
        IpAddr::V6(v6) => format!("[IPv6:{v6}]"),
    }
}

/// RFC 5322 §3.3 date-time as `time`'s RFC 2822 format writes it:
/// `Sun, 22 Nov 2026 12:00:00 +0000`. That is the form RFC 5322 §3.3 asks generators for: a
/// day-of-week, a two-digit day (`1*2DIGIT`, zero-padded), a four-digit year of 1900 or later
/// and a numeric `+hhmm`/`-hhmm` zone, never an obsolete zone name.
pub fn rfc5322_date(date: OffsetDateTime) -> String {
    // `time` refuses a year before 1900 and an offset with seconds, which RFC 5322 cannot
    // express: retry in UTC (drops offset seconds), and for a clock that far off write the
    // epoch, so the field stays well-formed rather than the message being refused.
    date.format(&Rfc2822)
        .or_else(|_| date.to_offset(UtcOffset::UTC).format(&Rfc2822))
        .unwrap_or_else(|_| EPOCH_DATE.to_owned())
}

/// What [`rfc5322_date`] writes for a date RFC 5322 cannot represent.
const EPOCH_DATE: &str = "Thu, 01 Jan 1970 00:00:00 +0000";

/// RFC 5321 §4.1.2 Domain: `sub-domain *("." sub-domain)`, `sub-domain = Let-dig [Ldh-str]`,
/// which is the shared host-name check. A name of 254 or 255 octets (RFC 5321 §4.5.3.1.2
/// allows them; DNS cannot hold them) is shown as a `(helo=…)` comment instead.
fn is_domain(s: &str) -> bool {
    crate::dns::is_host_name(s)
}

/// `[IPv4]` or `[IPv6:addr]` (RFC 5321 §4.1.3), checked by parsing the address.
fn is_address_literal(s: &str) -> bool {
    let Some(inner) = s.strip_prefix('[').and_then(|s| s.strip_suffix(']')) else {
        return false;
    };
    if let Some((_, v6)) = inner
        .split_at_checked(5)
        .filter(|(tag, _)| tag.eq_ignore_ascii_case("IPv6:"))
    {
        return v6.parse::<Ipv6Addr>().is_ok();
    }
    inner.parse::<Ipv4Addr>().is_ok()
}

/// `local@domain` with a Dot-string local part (RFC 5321 §4.1.2) and a Domain or address
/// literal; quoted local parts and source routes are left out rather than escaped.
fn is_plain_mailbox(s: &str) -> bool {
    let Some((local, domain)) = s.rsplit_once('@') else {
        return false;
    };
    s.len() <= MAX_PATH
        && !local.is_empty()
        && local.split('.').all(|atom| {
            !atom.is_empty()
                && atom
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-/=?^_`{|}~".contains(&b))
        })
        && (is_domain(domain) || is_address_literal(domain))
}

/// RFC 8314 §4.3 `tls-cipher-name = ALPHA *(ALPHA / DIGIT / "_")`.
fn is_tls_cipher_name(s: &str) -> bool {
    let mut bytes = s.bytes();
    bytes.next().is_some_and(|b| b.is_ascii_alphabetic())
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && s.len() <= MAX_TLS_NAME_LEN
}

/// RFC 8314 §4.3 `dh-group = ALPHA *(ALPHA / DIGIT / "_" / "-")`.
fn is_dh_group(s: &str) -> bool {
    let mut bytes = s.bytes();
    bytes.next().is_some_and(|b| b.is_ascii_alphabetic())
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        && s.len() <= MAX_TLS_NAME_LEN
}

/// Client text made safe inside a comment: no parentheses, backslash, `;`, quotes, controls,
/// whitespace or 8-bit octets survive, and it is truncated.
fn sanitised_comment(text: &[u8]) -> String {
    text.iter()
        .take(MAX_HELO_COMMENT)
        .map(|&b| {
            if b.is_ascii_alphanumeric() || b".-_:[]@".contains(&b) {
                char::from(b)
            } else {
                '?'
            }
        })
        .collect()
}

// ---- A small checker for the RFC 8314 §4.3 clauses inside an RFC 5321 §4.4 Stamp. ----
// Public but hidden: the integration tests check the field the proxy really wrote with it,
// through `mailfront::testing`.

/// Checks a Received field as mailfront writes it: the physical layout (CRLF only, WSP-led
/// continuation lines, no line over 998 octets), then the unfolded Stamp: clause order, the
/// `tls-cipher-clause` and `dh-group` grammar, exactly one `;` followed by a date-time.
#[doc(hidden)]
pub fn check_received_abnf(header: &str) -> Result<(), String> {
    ensure(header.ends_with("\r\n"), "field does not end with CRLF")?;
    for (i, line) in header.trim_end_matches("\r\n").split("\r\n").enumerate() {
        ensure(line.len() <= MAX_LINE_LEN, "line too long")?;
        ensure(!line.contains('\r') && !line.contains('\n'), "bare CR/LF")?;
        ensure(line.is_ascii(), "8-bit octet")?;
        ensure(
            i == 0 || line.starts_with(['\t', ' ']),
            "continuation without WSP",
        )?;
    }
    let unfolded = header.trim_end_matches("\r\n").replace("\r\n", "");
    let stamp = unfolded
        .strip_prefix("Received:")
        .ok_or("no Received: field name")?;
    let (clauses, date) = stamp.split_once(';').ok_or("no ';' before the date")?;
    ensure(!date.contains(';'), "a second ';'")?;
    check_date(date.trim_start())?;

    let tokens = tokens_outside_comments(clauses)?;
    let mut it = tokens.iter().map(String::as_str).peekable();
    let mut word = |expected: Option<&str>, what: &str| -> Result<String, String> {
        match (it.next(), expected) {
            (Some(w), Some(e)) if w == e => Ok(w.to_owned()),
            (Some(w), None) => Ok(w.to_owned()),
            (found, _) => Err(format!("expected {what}, found {found:?}")),
        }
    };
    // from <domain> by <domain> with <proto> id <atom> [for <path>] tls <cipher> [group <g>]
    word(Some("from"), "from")?;
    word(None, "the from domain")?;
    word(Some("by"), "by")?;
    word(None, "the by domain")?;
    word(Some("with"), "with")?;
    let protocol = word(None, "the with protocol")?;
    ensure(
        matches!(protocol.as_str(), "SMTP" | "ESMTPS" | "ESMTPSA"),
        "with protocol",
    )?;
    word(Some("id"), "id")?;
    let id = word(None, "the id")?;
    ensure(id.bytes().all(|b| b.is_ascii_alphanumeric()), "id atom")?;
    let mut next = word(None, "tls or for")?;
    if next == "for" {
        let path = word(None, "the for path")?;
        ensure(path.starts_with('<') && path.ends_with('>'), "for path")?;
        next = word(None, "tls")?;
    }
    // tls-cipher-clause = CFWS "tls" FWS tls-cipher [ CFWS tls-dh-group-clause ]
    ensure(next == "tls", "tls clause")?;
    let cipher = word(None, "tls-cipher")?;
    ensure(abnf_tls_cipher(&cipher), "tls-cipher grammar")?;
    if let Ok(group_kw) = word(None, "group") {
        ensure(group_kw == "group", "group clause")?;
        let group = word(None, "dh-group")?;
        ensure(abnf_dh_group(&group), "dh-group grammar")?;
        ensure(
            word(None, "nothing").is_err(),
            "nothing after the tls clause",
        )?;
    }
    Ok(())
}

fn ensure(ok: bool, what: &str) -> Result<(), String> {
    if ok {
        Ok(())
    } else {
        Err(format!("Received field: {what}"))
    }
}

/// Whitespace-separated tokens with balanced RFC 5322 comments removed.
fn tokens_outside_comments(s: &str) -> Result<Vec<String>, String> {
    let mut depth = 0usize;
    let mut escaped = false;
    let mut cleaned = String::new();
    for c in s.chars() {
        if depth > 0 {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '(' {
                depth += 1;
            } else if c == ')' {
                depth -= 1;
                if depth == 0 {
                    cleaned.push(' ');
                }
            }
        } else if c == '(' {
            depth = 1;
        } else {
            ensure(c != ')', "unbalanced ')'")?;
            cleaned.push(c);
        }
    }
    ensure(depth == 0, "unclosed comment")?;
    Ok(cleaned.split_whitespace().map(str::to_owned).collect())
}

/// `tls-cipher = tls-cipher-name / tls-cipher-hex`
fn abnf_tls_cipher(s: &str) -> bool {
    if let Some(hex) = s.strip_prefix("0x") {
        return hex.len() == 4 && hex.bytes().all(|b| b.is_ascii_hexdigit());
    }
    let mut b = s.bytes();
    b.next().is_some_and(|c| c.is_ascii_alphabetic())
        && b.all(|c| c.is_ascii_alphanumeric() || c == b'_')
}

/// `dh-group = ALPHA *(ALPHA / DIGIT / "_" / "-")`
fn abnf_dh_group(s: &str) -> bool {
    let mut b = s.bytes();
    b.next().is_some_and(|c| c.is_ascii_alphabetic())
        && b.all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-')
}

/// `day-name "," SP day SP month SP year SP hh:mm:ss SP zone` with a 4-digit year.
fn check_date(s: &str) -> Result<(), String> {
    let digits = |p: &str, n: usize| p.len() == n && p.bytes().all(|b| b.is_ascii_digit());
    match s.split(' ').collect::<Vec<&str>>().as_slice() {
        [day_name, day, month, year, clock, zone] => {
            ensure(day_name.ends_with(',') && day_name.len() == 4, "day name")?;
            ensure(digits(day, 2), "day")?;
            ensure(month.len() == 3, "month")?;
            ensure(digits(year, 4), "4-digit year")?;
            ensure(clock.len() == 8, "time of day")?;
            ensure(
                zone.len() == 5 && zone.starts_with(['+', '-']),
                "numeric zone",
            )
        }
        _ => Err(format!("Received field: date {s:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn date() -> OffsetDateTime {
        // Sun, 22 Nov 2026 12:00:00 +0000
        OffsetDateTime::from_unix_timestamp(1_795_348_800).unwrap()
    }

    fn info<'a>(id: &'a ReceivedId) -> ReceivedInfo<'a> {
        ReceivedInfo {
            helo: b"client.example.org",
            client_ip: "192.0.2.10".parse().unwrap(),
            hostname: "mx.example.test",
            protocol: WithProtocol::Esmtpsa,
            id,
            recipient: None,
            cipher: TlsCipher {
                iana_name: Some("TLS_AES_256_GCM_SHA384"),
                code: 0x1302,
            },
            group: Some("x25519"),
            date: date(),
        }
    }

    fn text(bytes: Vec<u8>) -> String {
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn the_field_has_the_documented_shape() {
        let id = ReceivedId::new("4LZ1qk0x").unwrap();
        assert_eq!(
            text(received_header(&info(&id))),
            "Received: from client.example.org (unknown [192.0.2.10])\r\n\
             \tby mx.example.test (mailfront) with ESMTPSA id 4LZ1qk0x\r\n\
             \ttls TLS_AES_256_GCM_SHA384 group x25519;\r\n\
             \tSun, 22 Nov 2026 12:00:00 +0000\r\n"
        );
    }

    #[test]
    fn for_comes_after_id_and_before_tls() {
        let id = ReceivedId::new("abc").unwrap();
        let header = text(received_header(&ReceivedInfo {
            recipient: Some(b"bob@example.com"),
            ..info(&id)
        }));
        let (id_at, for_at, tls_at) = (
            header.find(" id ").unwrap(),
            header.find("for <bob@example.com>").unwrap(),
            header.find("tls ").unwrap(),
        );
        assert!(id_at < for_at && for_at < tls_at, "{header}");
        check_abnf(&header);
    }

    #[test]
    fn unusual_recipients_are_left_out_rather_than_escaped() {
        let id = ReceivedId::random();
        for rcpt in [
            &b"\"a b\"@example.com"[..],
            b"@relay:bob@example.com",
            b"bob@ex ample.com",
            b"bob>\r\nX-Evil: 1@example.com",
            b"b\xc3\xb6b@example.com",
        ] {
            let header = text(received_header(&ReceivedInfo {
                recipient: Some(rcpt),
                ..info(&id)
            }));
            assert!(!header.contains("for "), "{header}");
            check_abnf(&header);
        }
    }

    #[test]
    fn unknown_group_is_omitted_and_unknown_cipher_becomes_hex() {
        let id = ReceivedId::random();
        let header = text(received_header(&ReceivedInfo {
            cipher: TlsCipher {
                iana_name: None,
                code: 0xc02f,
            },
            group: None,
            ..info(&id)
        }));
        assert!(header.contains("\ttls 0xC02F;\r\n"), "{header}");
        check_abnf(&header);
        // Debug-style names are not IANA names (RFC 8314 §4.3 wants the registry's) and never leak.
        let header = text(received_header(&ReceivedInfo {
            cipher: TlsCipher {
                iana_name: Some("TLS13_AES_128_GCM_SHA256 (0x1301)"),
                code: 0x1301,
            },
            group: Some("NamedGroup(0x11ed)"),
            ..info(&id)
        }));
        assert!(header.contains("\ttls 0x1301;\r\n"), "{header}");
        check_abnf(&header);
    }

    /// The clauses are written from what rustls negotiated: IANA names (`TLS_AES_…`, not
    /// rustls' `TLS13_AES_…`), for every suite and group the provider offers; hex only for a
    /// suite outside the table.
    #[test]
    fn tls_and_group_clauses_name_what_rustls_negotiated() {
        let provider = rustls::crypto::aws_lc_rs::default_provider();
        let id = ReceivedId::random();
        for (suite, group) in provider
            .cipher_suites
            .iter()
            .zip(provider.kx_groups.iter().cycle())
        {
            let tls = crate::tls::TlsInfo {
                version: suite.version().version,
                cipher: suite.suite(),
                group: Some(group.name()),
                sni: None,
                signature_scheme: None,
            };
            let header = text(received_header(&ReceivedInfo {
                cipher: TlsCipher::negotiated(tls.cipher),
                group: tls.iana_group_name(),
                ..info(&id)
            }));
            let clause = format!(
                "\ttls {} group {};\r\n",
                tls.cipher_name(),
                tls.group_name()
            );
            assert!(header.contains(&clause), "{header}");
            // Only the clause is checked: the random id elsewhere in the field may spell "0x".
            assert!(
                !clause.contains("0x") && !clause.contains("TLS13_"),
                "{header}"
            );
            check_abnf(&header);
        }
        let header = text(received_header(&ReceivedInfo {
            cipher: TlsCipher::negotiated(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256),
            group: None,
            ..info(&id)
        }));
        assert!(
            header.contains("\ttls TLS_AES_128_GCM_SHA256;\r\n"),
            "{header}"
        );
        let header = text(received_header(&ReceivedInfo {
            cipher: TlsCipher::negotiated(rustls::CipherSuite::from(0x00ff)),
            ..info(&id)
        }));
        assert!(
            header.contains("\ttls 0x00FF group x25519;\r\n"),
            "{header}"
        );
        check_abnf(&header);
    }

    #[test]
    fn post_quantum_group_name_is_kept() {
        let id = ReceivedId::random();
        let header = text(received_header(&ReceivedInfo {
            group: Some("X25519MLKEM768"),
            ..info(&id)
        }));
        assert!(header.contains(" group X25519MLKEM768;"));
        check_abnf(&header);
    }

    #[test]
    fn hostile_ehlo_never_breaks_the_field() {
        let id = ReceivedId::random();
        let long = vec![b'a'; 300];
        let hostile: Vec<&[u8]> = vec![
            b"a(b)c;d",
            b"evil\r\nX-Injected: yes",
            b"\xff\xfe\x80",
            &long,
            b"a\\)b",
            b"x; Mon, 1 Jan 2001 00:00:00 +0000",
            b"",
            b"-bad-.example",
            b"[999.1.1.1]",
            b"[IPv6:zz::1]",
        ];
        for helo in hostile {
            let header = text(received_header(&ReceivedInfo { helo, ..info(&id) }));
            assert!(
                header.starts_with("Received: from [192.0.2.10] (unknown [192.0.2.10])"),
                "{header}"
            );
            assert_eq!(header.matches(';').count(), 1, "{header}");
            check_abnf(&header);
        }
    }

    #[test]
    fn address_literal_ehlo_is_kept() {
        let id = ReceivedId::random();
        for helo in [&b"[192.0.2.1]"[..], b"[IPv6:::1]", b"[ipv6:2001:db8::1]"] {
            let header = text(received_header(&ReceivedInfo { helo, ..info(&id) }));
            let expected = format!(
                "Received: from {} (unknown",
                std::str::from_utf8(helo).unwrap()
            );
            assert!(header.starts_with(&expected), "{header}");
            check_abnf(&header);
        }
    }

    #[test]
    fn client_address_literals_follow_rfc_5321() {
        assert_eq!(
            address_literal("2001:db8::1".parse().unwrap()),
            "[IPv6:2001:db8::1]"
        );
        assert_eq!(address_literal("192.0.2.1".parse().unwrap()), "[192.0.2.1]");
        let id = ReceivedId::random();
        let header = text(received_header(&ReceivedInfo {
            client_ip: "2001:db8::1".parse().unwrap(),
            ..info(&id)
        }));
        assert!(header.contains("(unknown [IPv6:2001:db8::1])"));
    }

    #[test]
    fn with_protocol_follows_rfc_3848() {
        assert_eq!(WithProtocol::for_session(true, true).as_str(), "ESMTPSA");
        assert_eq!(WithProtocol::for_session(true, false).as_str(), "ESMTPS");
        assert_eq!(WithProtocol::for_session(false, true).as_str(), "SMTP");
    }

    #[test]
    fn random_ids_are_alphanumeric_atoms() {
        let id = ReceivedId::random();
        assert_eq!(id.as_str().len(), ID_LEN);
        assert!(ReceivedId::new(id.as_str()).is_some());
        assert!(ReceivedId::new("a b").is_none());
        assert!(ReceivedId::new("").is_none());
    }

    #[test]
    fn dates_use_a_numeric_zone_and_four_digit_year() {
        let d = date().to_offset(time::UtcOffset::from_hms(-8, -30, 0).unwrap());
        assert_eq!(rfc5322_date(d), "Sun, 22 Nov 2026 03:30:00 -0830");
        let d = OffsetDateTime::from_unix_timestamp(0).unwrap();
        assert_eq!(rfc5322_date(d), "Thu, 01 Jan 1970 00:00:00 +0000");
        // Single-digit days are zero-padded (RFC 5322 §3.3 `day = 1*2DIGIT`).
        let d = OffsetDateTime::from_unix_timestamp(1_775_001_600).unwrap();
        assert_eq!(rfc5322_date(d), "Wed, 01 Apr 2026 00:00:00 +0000");
    }

    #[test]
    fn dates_rfc_5322_cannot_express_stay_well_formed() {
        // An offset with seconds is written in UTC.
        let d = date().to_offset(time::UtcOffset::from_hms(1, 0, 30).unwrap());
        assert_eq!(rfc5322_date(d), "Sun, 22 Nov 2026 12:00:00 +0000");
        // A year before 1900 falls back to the epoch.
        let d = OffsetDateTime::from_unix_timestamp(-3_000_000_000).unwrap();
        assert_eq!(rfc5322_date(d), EPOCH_DATE);
        check_date(&rfc5322_date(d)).unwrap();
    }

    #[test]
    fn invalid_configured_hostname_falls_back() {
        let id = ReceivedId::random();
        let header = text(received_header(&ReceivedInfo {
            hostname: "mx\r\nX: y",
            ..info(&id)
        }));
        assert!(header.contains("\tby localhost (mailfront)"));
        check_abnf(&header);
    }

    fn check_abnf(header: &str) {
        if let Err(e) = check_received_abnf(header) {
            panic!("{e}\n{header}");
        }
    }
}
