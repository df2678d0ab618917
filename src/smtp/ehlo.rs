//! EHLO reply rewriting (RFC 5321 §4.1.1.1) and the backend capabilities the gate needs.
//!
//! The client sees the backend's EHLO keywords, except:
//! - STARTTLS, XCLIENT and XFORWARD are always removed: the backend's STARTTLS is never ours
//!   to offer (RFC 3207 §4.2: never after TLS), and the X-commands only work because the
//!   backend trusts mailfront's address (offered to a client, they would let it set its own
//!   login and address on the backend).
//! - Before TLS, AUTH (and legacy `AUTH=` lines) and REQUIRETLS are removed (RFC 4954 §9,
//!   RFC 8314 §4.1; RFC 8689: only in a TLS session), and on a `starttls` listener our own
//!   STARTTLS is added.
//! - After TLS, AUTH is kept without the mechanisms mailfront cannot relay: EXTERNAL (the
//!   backend never sees the client certificate), GSSAPI, GS2-KRB5 and DIGEST-MD5 (they can
//!   negotiate a security layer (RFC 4422 §3.7) that would make the rest of the session
//!   opaque). REQUIRETLS is kept only when the backend advertised it.
//! - BINARYMIME is removed: mailfront holds BDAT content to CRLF line ends like DATA content
//!   (smuggling defence, see [`crate::smtp::bdat`]), so a binary body could not pass.
//! - `SIZE n` optionally shrinks by a reserve for the Received field mailfront adds, so a
//!   message that passes `MAIL SIZE=` (RFC 1870) is not refused with 552 because of it.
//! - The first line's domain becomes mailfront's hostname when one is given (the backend's
//!   name is an internal host's); the
//!   rest of that line is kept.
//!
//! Everything else passes unchanged, text byte-exact; the continuation markers are rebuilt so
//! the last line uses `250 `.

use crate::config::TlsMode;
use crate::sasl;
use crate::smtp::reply::Reply;

/// SASL mechanisms never offered to clients.
const UNRELAYABLE_MECHANISMS: [&[u8]; 4] = [b"EXTERNAL", b"GSSAPI", b"GS2-KRB5", b"DIGEST-MD5"];

/// The client-side facts the rewrite depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EhloContext<'a> {
    pub client_tls: bool,
    pub listener: TlsMode,
    /// Replaces the domain on the first line; `None` keeps the backend's.
    pub hostname: Option<&'a str>,
    /// Octets subtracted from the backend's `SIZE` limit (0: unchanged).
    pub size_reserve: u64,
}

/// What the backend's EHLO reply offered; feeds [`crate::smtp::policy::GateState`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BackendCapabilities {
    pub pipelining: bool,
    pub chunking: bool,
    pub binarymime: bool,
    pub requiretls: bool,
    pub starttls: bool,
    pub smtputf8: bool,
    pub eightbitmime: bool,
    pub enhanced_status_codes: bool,
    /// `SIZE n`; `Some(0)` means no fixed limit (RFC 1870).
    pub size: Option<u64>,
    /// Mechanisms from `AUTH` lines, as sent.
    pub auth_mechanisms: Vec<Vec<u8>>,
}

impl BackendCapabilities {
    /// Reads a 250 EHLO reply; anything else (a HELO fallback, an error) offers nothing.
    pub fn from_ehlo(reply: &Reply) -> Self {
        let mut caps = BackendCapabilities::default();
        if reply.code() != 250 {
            return caps;
        }
        for text in reply.lines().skip(1) {
            let mut words = words(text);
            let Some(keyword) = words.next() else {
                continue;
            };
            let is = |name: &[u8]| keyword.eq_ignore_ascii_case(name);
            if is(b"PIPELINING") {
                caps.pipelining = true;
            } else if is(b"CHUNKING") {
                caps.chunking = true;
            } else if is(b"BINARYMIME") {
                caps.binarymime = true;
            } else if is(b"REQUIRETLS") {
                caps.requiretls = true;
            } else if is(b"STARTTLS") {
                caps.starttls = true;
            } else if is(b"SMTPUTF8") {
                caps.smtputf8 = true;
            } else if is(b"8BITMIME") {
                caps.eightbitmime = true;
            } else if is(b"ENHANCEDSTATUSCODES") {
                caps.enhanced_status_codes = true;
            } else if is(b"SIZE") {
                caps.size = words
                    .next()
                    .and_then(|v| std::str::from_utf8(v).ok())
                    .and_then(|v| v.parse().ok())
                    .or(Some(0));
            } else if is(b"AUTH") {
                caps.auth_mechanisms.extend(words.map(<[u8]>::to_vec));
            }
        }
        caps
    }
}

/// Rewrites the backend's EHLO reply for the client. Replies other than 250 pass unchanged.
pub fn rewrite_ehlo(reply: &Reply, ctx: &EhloContext<'_>) -> Vec<u8> {
    if reply.code() != 250 {
        return reply.raw().to_vec();
    }
    let mut lines = reply.lines();
    let first = lines.next().unwrap_or_default();
    let mut out: Vec<Vec<u8>> = vec![first_line(first, ctx.hostname)];
    for text in lines {
        if let Some(kept) = keep_keyword(text, ctx) {
            out.push(kept);
        }
    }
    if ctx.listener == TlsMode::Starttls && !ctx.client_tls {
        out.push(b"STARTTLS".to_vec());
    }
    assemble(reply.code(), &out)
}

/// On a listener that routes by user: `reply` (an EHLO reply as the client would see it)
/// without the SASL mechanisms that cannot be routed ([`sasl::is_routable`]: CRAM-MD5,
/// DIGEST-MD5, EXTERNAL, GSSAPI, …), on `AUTH` and legacy `AUTH=` lines alike; a line left with
/// none is dropped. mailfront refuses those mechanisms on such a listener (their first response
/// names no user, so no backend can be chosen for them), and offering them would only invite
/// that refusal (RFC 4954 §3: the client picks from what EHLO lists). Replies other than 250
/// pass unchanged.
pub fn routable_mechanisms_only(reply: &Reply) -> Vec<u8> {
    if reply.code() != 250 {
        return reply.raw().to_vec();
    }
    let mut lines = reply.lines();
    let mut out: Vec<Vec<u8>> = vec![lines.next().unwrap_or_default().to_vec()];
    for text in lines {
        if is_auth_line(text) {
            out.extend(filter_auth(text, sasl::is_routable));
        } else {
            out.push(text.to_vec());
        }
    }
    assemble(reply.code(), &out)
}

/// One reply from its code and line texts, the continuation markers rebuilt so the last line
/// uses `code SP`.
fn assemble(code: u16, texts: &[Vec<u8>]) -> Vec<u8> {
    let code = code.to_string();
    let mut raw = Vec::new();
    let count = texts.len();
    for (i, text) in texts.iter().enumerate() {
        raw.extend_from_slice(code.as_bytes());
        raw.push(if i + 1 == count { b' ' } else { b'-' });
        raw.extend_from_slice(text);
        raw.extend_from_slice(b"\r\n");
    }
    raw
}

/// An `AUTH …` or legacy `AUTH=…` keyword line.
fn is_auth_line(text: &[u8]) -> bool {
    let keyword = words(text).next().unwrap_or_default();
    keyword.eq_ignore_ascii_case(b"AUTH")
        || keyword
            .split_at_checked(5)
            .is_some_and(|(head, _)| head.eq_ignore_ascii_case(b"AUTH="))
}

fn words(text: &[u8]) -> impl Iterator<Item = &[u8]> {
    text.split(|&b| b == b' ' || b == b'\t')
        .filter(|w| !w.is_empty())
}

fn first_line(text: &[u8], hostname: Option<&str>) -> Vec<u8> {
    let Some(hostname) =
        hostname.filter(|h| !h.is_empty() && h.bytes().all(|b| b.is_ascii_graphic()))
    else {
        return text.to_vec();
    };
    let rest = match text.iter().position(|&b| b == b' ') {
        Some(pos) => text.get(pos..).unwrap_or_default(),
        None => b"",
    };
    [hostname.as_bytes(), rest].concat()
}

/// The line to send for one keyword line, or `None` to drop it.
fn keep_keyword(text: &[u8], ctx: &EhloContext<'_>) -> Option<Vec<u8>> {
    let keyword = words(text).next().unwrap_or_default();
    let is = |name: &[u8]| keyword.eq_ignore_ascii_case(name);
    if is(b"STARTTLS") || is(b"XCLIENT") || is(b"XFORWARD") || is(b"BINARYMIME") {
        return None;
    }
    if is_auth_line(text) {
        return ctx
            .client_tls
            .then(|| filter_auth(text, relayable))
            .flatten();
    }
    if is(b"REQUIRETLS") {
        return ctx.client_tls.then(|| text.to_vec());
    }
    if is(b"SIZE") && ctx.size_reserve > 0 {
        return Some(shrink_size(text, ctx.size_reserve));
    }
    Some(text.to_vec())
}

/// Whether mailfront can relay a mechanism at all ([`UNRELAYABLE_MECHANISMS`]).
fn relayable(mechanism: &[u8]) -> bool {
    !UNRELAYABLE_MECHANISMS
        .iter()
        .any(|bad| mechanism.eq_ignore_ascii_case(bad))
}

/// Keeps the mechanisms `keep` accepts on an `AUTH m1 m2` or legacy `AUTH=m1 m2` line; `None`
/// if none is left.
fn filter_auth(text: &[u8], keep: fn(&[u8]) -> bool) -> Option<Vec<u8>> {
    let mut parts = words(text);
    let first = parts.next()?;
    // `AUTH=PLAIN LOGIN`: the first mechanism is glued to the keyword.
    let (keyword, glued) = match first.split_at_checked(5) {
        Some((head, mech)) if head.eq_ignore_ascii_case(b"AUTH=") => (head, Some(mech)),
        _ => (first, None),
    };
    let mechanisms: Vec<&[u8]> = glued
        .into_iter()
        .chain(parts)
        .filter(|m| !m.is_empty() && keep(m))
        .collect();
    if mechanisms.is_empty() {
        return None;
    }
    let mut line = keyword.to_vec();
    let separator: &[u8] = if glued.is_some() { b"" } else { b" " };
    line.extend_from_slice(separator);
    line.extend_from_slice(&mechanisms.join(&b' '));
    Some(line)
}

fn shrink_size(text: &[u8], reserve: u64) -> Vec<u8> {
    let mut parts = words(text);
    let keyword = parts.next().unwrap_or_default();
    let limit = parts
        .next()
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|v| v.parse::<u64>().ok());
    match limit {
        // 0 or absent means "no fixed limit" (RFC 1870 §4): nothing to shrink.
        Some(limit) if limit > 0 && parts.next().is_none() => {
            let shrunk = limit.saturating_sub(reserve).max(1);
            [keyword, b" ", shrunk.to_string().as_bytes()].concat()
        }
        _ => text.to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BACKEND: &[u8] = b"250-backend.local Hello client [10.0.0.1]\r\n\
250-PIPELINING\r\n\
250-SIZE 10240000\r\n\
250-VRFY\r\n\
250-ETRN\r\n\
250-STARTTLS\r\n\
250-AUTH PLAIN LOGIN GSSAPI EXTERNAL\r\n\
250-AUTH=PLAIN LOGIN\r\n\
250-ENHANCEDSTATUSCODES\r\n\
250-8BITMIME\r\n\
250-XCLIENT NAME ADDR PROTO HELO\r\n\
250-XFORWARD NAME ADDR\r\n\
250-DSN\r\n\
250-SMTPUTF8\r\n\
250-REQUIRETLS\r\n\
250 CHUNKING\r\n";

    fn ctx(client_tls: bool, listener: TlsMode) -> EhloContext<'static> {
        EhloContext {
            client_tls,
            listener,
            hostname: None,
            size_reserve: 0,
        }
    }

    fn keywords(raw: &[u8]) -> Vec<String> {
        let reply = Reply::parse(raw).expect("rewritten reply parses");
        reply
            .lines()
            .skip(1)
            .map(|l| String::from_utf8_lossy(l).into_owned())
            .collect()
    }

    #[test]
    fn binarymime_is_never_offered_because_bdat_content_must_have_crlf_line_ends() {
        let raw = b"250-backend.local\r\n250-CHUNKING\r\n250-binarymime\r\n250 8BITMIME\r\n";
        let reply = Reply::parse(raw).unwrap();
        assert!(BackendCapabilities::from_ehlo(&reply).binarymime);
        for tls in [false, true] {
            let out = rewrite_ehlo(&reply, &ctx(tls, TlsMode::Implicit));
            assert_eq!(keywords(&out), vec!["CHUNKING", "8BITMIME"]);
        }
    }

    #[test]
    fn before_tls_on_a_starttls_listener_auth_is_hidden_and_our_starttls_is_offered() {
        let out = rewrite_ehlo(
            &Reply::parse(BACKEND).unwrap(),
            &ctx(false, TlsMode::Starttls),
        );
        assert_eq!(
            keywords(&out),
            vec![
                "PIPELINING",
                "SIZE 10240000",
                "VRFY",
                "ETRN",
                "ENHANCEDSTATUSCODES",
                "8BITMIME",
                "DSN",
                "SMTPUTF8",
                "CHUNKING",
                "STARTTLS"
            ]
        );
        assert!(out.starts_with(b"250-backend.local Hello client [10.0.0.1]\r\n"));
        assert!(out.ends_with(b"250 STARTTLS\r\n"));
    }

    #[test]
    fn after_tls_auth_is_kept_without_unrelayable_mechanisms_and_no_starttls() {
        for listener in [TlsMode::Starttls, TlsMode::Implicit] {
            let out = rewrite_ehlo(&Reply::parse(BACKEND).unwrap(), &ctx(true, listener));
            assert_eq!(
                keywords(&out),
                vec![
                    "PIPELINING",
                    "SIZE 10240000",
                    "VRFY",
                    "ETRN",
                    "AUTH PLAIN LOGIN",
                    "AUTH=PLAIN LOGIN",
                    "ENHANCEDSTATUSCODES",
                    "8BITMIME",
                    "DSN",
                    "SMTPUTF8",
                    "REQUIRETLS",
                    "CHUNKING"
                ]
            );
            assert!(out.ends_with(b"250 CHUNKING\r\n"));
        }
    }

    #[test]
    fn requiretls_is_not_invented_when_the_backend_lacks_it() {
        let raw = b"250-b\r\n250-AUTH PLAIN\r\n250 8BITMIME\r\n";
        let out = rewrite_ehlo(&Reply::parse(raw).unwrap(), &ctx(true, TlsMode::Implicit));
        assert_eq!(keywords(&out), vec!["AUTH PLAIN", "8BITMIME"]);
    }

    #[test]
    fn auth_line_with_only_unrelayable_mechanisms_disappears() {
        let raw = b"250-b\r\n250-AUTH GSSAPI EXTERNAL\r\n250-AUTH=DIGEST-MD5\r\n250 X\r\n";
        let out = rewrite_ehlo(&Reply::parse(raw).unwrap(), &ctx(true, TlsMode::Implicit));
        assert_eq!(keywords(&out), vec!["X"]);
    }

    #[test]
    fn a_routed_listener_shows_only_mechanisms_that_name_the_user_first() {
        let raw = b"250-b\r\n250-AUTH PLAIN CRAM-MD5 LOGIN scram-sha-256 DIGEST-MD5\r\n\
250-AUTH=CRAM-MD5 XOAUTH2\r\n250-AUTH NTLM GSSAPI\r\n250 PIPELINING\r\n";
        let out = routable_mechanisms_only(&Reply::parse(raw).unwrap());
        assert_eq!(
            out,
            b"250-b\r\n250-AUTH PLAIN LOGIN scram-sha-256\r\n250-AUTH=XOAUTH2\r\n\
250 PIPELINING\r\n"
        );
        // The last line going away leaves the markers right; other replies pass unchanged.
        let out =
            routable_mechanisms_only(&Reply::parse(b"250-b\r\n250 AUTH CRAM-MD5\r\n").unwrap());
        assert_eq!(out, b"250 b\r\n");
        let refusal = b"554 5.7.1 no\r\n";
        assert_eq!(
            routable_mechanisms_only(&Reply::parse(refusal).unwrap()),
            refusal
        );
    }

    #[test]
    fn continuation_markers_stay_correct_when_the_last_line_is_removed() {
        let raw = b"250-b\r\n250-PIPELINING\r\n250 STARTTLS\r\n";
        let out = rewrite_ehlo(&Reply::parse(raw).unwrap(), &ctx(true, TlsMode::Implicit));
        assert_eq!(out, b"250-b\r\n250 PIPELINING\r\n");
        let raw = b"250-b\r\n250 XCLIENT NAME\r\n";
        let out = rewrite_ehlo(&Reply::parse(raw).unwrap(), &ctx(true, TlsMode::Implicit));
        assert_eq!(out, b"250 b\r\n");
    }

    #[test]
    fn a_single_line_reply_gains_starttls_as_a_continuation() {
        let out = rewrite_ehlo(
            &Reply::parse(b"250 backend\r\n").unwrap(),
            &ctx(false, TlsMode::Starttls),
        );
        assert_eq!(out, b"250-backend\r\n250 STARTTLS\r\n");
    }

    #[test]
    fn keywords_are_matched_case_insensitively() {
        let raw = b"250-b\r\n250-starttls\r\n250-Auth plain\r\n250-xClient NAME\r\n250 ok\r\n";
        let out = rewrite_ehlo(&Reply::parse(raw).unwrap(), &ctx(false, TlsMode::Starttls));
        assert_eq!(keywords(&out), vec!["ok", "STARTTLS"]);
    }

    #[test]
    fn the_first_line_carries_our_hostname_when_given() {
        let context = EhloContext {
            hostname: Some("mx.example.test"),
            ..ctx(true, TlsMode::Implicit)
        };
        let out = rewrite_ehlo(&Reply::parse(BACKEND).unwrap(), &context);
        assert!(out.starts_with(b"250-mx.example.test Hello client [10.0.0.1]\r\n"));
        let out = rewrite_ehlo(&Reply::parse(b"250 backend\r\n").unwrap(), &context);
        assert_eq!(out, b"250 mx.example.test\r\n");
        let evil = EhloContext {
            hostname: Some("x\r\n250 AUTH PLAIN"),
            ..context
        };
        let out = rewrite_ehlo(&Reply::parse(b"250 backend\r\n").unwrap(), &evil);
        assert_eq!(out, b"250 backend\r\n");
    }

    #[test]
    fn size_shrinks_by_the_reserve_and_zero_stays_unlimited() {
        let context = EhloContext {
            size_reserve: 1024,
            ..ctx(true, TlsMode::Implicit)
        };
        let out = rewrite_ehlo(
            &Reply::parse(b"250-b\r\n250 SIZE 10240000\r\n").unwrap(),
            &context,
        );
        assert_eq!(keywords(&out), vec!["SIZE 10238976"]);
        let out = rewrite_ehlo(&Reply::parse(b"250-b\r\n250 SIZE 0\r\n").unwrap(), &context);
        assert_eq!(keywords(&out), vec!["SIZE 0"]);
        let out = rewrite_ehlo(&Reply::parse(b"250-b\r\n250 SIZE\r\n").unwrap(), &context);
        assert_eq!(keywords(&out), vec!["SIZE"]);
    }

    #[test]
    fn error_replies_pass_unchanged() {
        let raw = b"550 5.7.1 go away\r\n";
        let out = rewrite_ehlo(&Reply::parse(raw).unwrap(), &ctx(false, TlsMode::Starttls));
        assert_eq!(out, raw);
    }

    #[test]
    fn backend_capabilities_are_read_from_the_reply() {
        let caps = BackendCapabilities::from_ehlo(&Reply::parse(BACKEND).unwrap());
        assert!(caps.pipelining && caps.chunking && caps.requiretls && caps.starttls);
        assert!(caps.smtputf8 && caps.eightbitmime && caps.enhanced_status_codes);
        assert!(!caps.binarymime);
        assert_eq!(caps.size, Some(10_240_000));
        assert_eq!(
            caps.auth_mechanisms,
            vec![
                b"PLAIN".to_vec(),
                b"LOGIN".to_vec(),
                b"GSSAPI".to_vec(),
                b"EXTERNAL".to_vec()
            ]
        );
        let none = BackendCapabilities::from_ehlo(&Reply::parse(b"250 b\r\n").unwrap());
        assert_eq!(none, BackendCapabilities::default());
    }
}
