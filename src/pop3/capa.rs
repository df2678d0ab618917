//! Rewriting the backend's CAPA response for the client (RFC 2449 §5, RFC 2595 §4) and its
//! greeting. Pure functions; lines not rewritten stay byte-exact.

use crate::line::trim_line_end;

/// Which advertisement the client must see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CapaView {
    /// A backend list shown in cleartext: `USER` and the `SASL` line hidden (no way to
    /// authenticate in cleartext), `STLS` shown, as nginx does with `starttls only`. The session
    /// no longer uses it: before STLS there is no backend, and mailfront answers CAPA itself
    /// ([`crate::pop3::reply::capa_before_tls`]).
    Cleartext,
    /// TLS active: the cleartext backend's `STLS` hidden, and `EXTERNAL` removed from `SASL`
    /// because the client certificate never reaches the backend (RFC 8314 §4.2).
    Tls,
    /// As [`CapaView::Tls`], on a listener that routes by user: `SASL` keeps only the
    /// mechanisms whose first client response names the user ([`crate::sasl::is_routable`]),
    /// since mailfront must hold the login before it knows the backend.
    Routed,
}

fn first_word(line: &[u8]) -> &[u8] {
    let content = trim_line_end(line);
    let end = content
        .iter()
        .position(|&b| b == b' ')
        .unwrap_or(content.len());
    content.get(..end).unwrap_or_default()
}

/// Rewrites a whole multi-line CAPA response (`+OK …`, capability lines, `.`). Anything that is
/// not a complete `+OK` multi-line response is returned unchanged.
pub fn rewrite_capa(raw: &[u8], view: CapaView) -> Vec<u8> {
    let lines: Vec<&[u8]> = raw.split_inclusive(|&b| b == b'\n').collect();
    let (Some(first), Some(last)) = (lines.first(), lines.last()) else {
        return raw.to_vec();
    };
    if !first.starts_with(b"+OK") || trim_line_end(last) != b"." || lines.len() < 2 {
        return raw.to_vec();
    }
    let body = lines.get(1..lines.len() - 1).unwrap_or_default();
    let mut out = Vec::with_capacity(raw.len() + 8);
    out.extend_from_slice(first);
    let mut has_stls = false;
    for line in body {
        let word = first_word(line);
        let is = |name: &str| word.eq_ignore_ascii_case(name.as_bytes());
        has_stls |= is("STLS");
        match view {
            // Dovecot offers XCLIENT to mailfront (login_trusted_networks), not to the client,
            // which could not use it anyway (refused by the gate).
            _ if is("XCLIENT") => {}
            CapaView::Cleartext if is("USER") || is("SASL") => {}
            CapaView::Tls | CapaView::Routed if is("STLS") => {}
            CapaView::Tls | CapaView::Routed if is("SASL") => {
                let content = trim_line_end(line);
                let kept: Vec<&[u8]> = content
                    .split(|&b| b == b' ')
                    .enumerate()
                    .filter(|(i, token)| {
                        *i == 0
                            || (!token.eq_ignore_ascii_case(b"EXTERNAL")
                                && (view != CapaView::Routed || crate::sasl::is_routable(token)))
                    })
                    .map(|(_, token)| token)
                    .collect();
                if kept.len() > 1 {
                    out.extend_from_slice(&kept.join(&b' '));
                    out.extend_from_slice(line.get(content.len()..).unwrap_or_default());
                }
            }
            _ => out.extend_from_slice(line),
        }
    }
    if view == CapaView::Cleartext && !has_stls {
        out.extend_from_slice(b"STLS\r\n");
    }
    out.extend_from_slice(last);
    out
}

/// Rewrites the multi-line answer to `AUTH` with no argument (the RFC 1734-style mechanism
/// list, one per line): `EXTERNAL` goes, as from CAPA's `SASL` line, because the client
/// certificate never reaches the backend (RFC 8314 §4.2). Anything else is returned unchanged.
pub fn rewrite_mechanisms(raw: &[u8]) -> Vec<u8> {
    let lines: Vec<&[u8]> = raw.split_inclusive(|&b| b == b'\n').collect();
    let (Some(first), Some(last)) = (lines.first(), lines.last()) else {
        return raw.to_vec();
    };
    if !first.starts_with(b"+OK") || trim_line_end(last) != b"." || lines.len() < 2 {
        return raw.to_vec();
    }
    lines
        .iter()
        .filter(|line| !first_word(line).eq_ignore_ascii_case(b"EXTERNAL"))
        .flat_map(|line| line.iter().copied())
        .collect()
}

/// The mechanisms of a CAPA response's `SASL` line (RFC 2449 §6.3) that a listener routing by
/// user can route ([`crate::sasl::is_routable`]), in the backend's order: what mailfront answers
/// `AUTH` with no argument with, without a backend. None when the response is not a `+OK` one or
/// has no `SASL` line.
pub fn routable_mechanisms(raw: &[u8]) -> Vec<&[u8]> {
    if !raw.starts_with(b"+OK") {
        return Vec::new();
    }
    raw.split_inclusive(|&b| b == b'\n')
        .skip(1)
        .map(trim_line_end)
        .take_while(|line| *line != b".")
        .filter(|line| first_word(line).eq_ignore_ascii_case(b"SASL"))
        .flat_map(|line| line.split(|&b| b == b' ').skip(1))
        .filter(|token| !token.is_empty() && crate::sasl::is_routable(token))
        .collect()
}

/// Whether a `+OK` greeting starts with Dovecot's `[XCLIENT]` code: how Dovecot's pop3-login
/// tells a peer in `login_trusted_networks` that it accepts XCLIENT (its CAPA does not list it).
pub fn greeting_offers_xclient(raw: &[u8]) -> bool {
    raw.strip_prefix(b"+OK ")
        .and_then(|rest| rest.get(..9))
        .is_some_and(|code| code.eq_ignore_ascii_case(b"[XCLIENT]"))
}

/// Removes Dovecot's `[XCLIENT]` code from a `+OK` greeting: it tells the client the server
/// trusts XCLIENT from this peer, which is mailfront, not the client: the client must not learn
/// that a command it can never use exists.
/// The APOP timestamp and the rest stay as sent.
pub fn rewrite_greeting(raw: &[u8]) -> Vec<u8> {
    if !greeting_offers_xclient(raw) {
        return raw.to_vec();
    }
    let after = raw.get(13..).unwrap_or_default();
    let after = after.strip_prefix(b" ").unwrap_or(after);
    let mut out = b"+OK ".to_vec();
    out.extend_from_slice(after);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAPA: &[u8] = b"+OK\r\nCAPA\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nPIPELINING\r\nAUTH-RESP-CODE\r\nSTLS\r\nUSER\r\nSASL PLAIN LOGIN EXTERNAL\r\n.\r\n";

    #[test]
    fn cleartext_capa_hides_user_and_sasl_and_keeps_stls() {
        assert_eq!(
            rewrite_capa(CAPA, CapaView::Cleartext),
            b"+OK\r\nCAPA\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nPIPELINING\r\nAUTH-RESP-CODE\r\nSTLS\r\n.\r\n"
        );
    }

    #[test]
    fn cleartext_capa_adds_stls_when_the_backend_lacks_it() {
        assert_eq!(
            rewrite_capa(
                b"+OK Capability list follows\r\nTOP\r\nUSER\r\n.\r\n",
                CapaView::Cleartext
            ),
            b"+OK Capability list follows\r\nTOP\r\nSTLS\r\n.\r\n"
        );
    }

    #[test]
    fn tls_capa_hides_stls_and_external() {
        assert_eq!(
            rewrite_capa(CAPA, CapaView::Tls),
            b"+OK\r\nCAPA\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nPIPELINING\r\nAUTH-RESP-CODE\r\nUSER\r\nSASL PLAIN LOGIN\r\n.\r\n"
        );
        assert_eq!(
            rewrite_capa(b"+OK\r\nSASL EXTERNAL\r\n.\r\n", CapaView::Tls),
            b"+OK\r\n.\r\n"
        );
    }

    #[test]
    fn a_routed_listener_shows_only_the_mechanisms_it_can_route() {
        let capa = b"+OK\r\nSTLS\r\nUSER\r\nSASL PLAIN CRAM-MD5 LOGIN EXTERNAL SCRAM-SHA-256 GSSAPI\r\n.\r\n";
        assert_eq!(
            rewrite_capa(capa, CapaView::Routed),
            b"+OK\r\nUSER\r\nSASL PLAIN LOGIN SCRAM-SHA-256\r\n.\r\n"
        );
        assert_eq!(
            rewrite_capa(
                b"+OK\r\nSASL CRAM-MD5 DIGEST-MD5\r\nTOP\r\n.\r\n",
                CapaView::Routed
            ),
            b"+OK\r\nTOP\r\n.\r\n",
            "a SASL line with nothing routable goes"
        );
        assert_eq!(
            rewrite_capa(CAPA, CapaView::Tls),
            b"+OK\r\nCAPA\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nPIPELINING\r\nAUTH-RESP-CODE\r\nUSER\r\nSASL PLAIN LOGIN\r\n.\r\n",
            "the TLS view keeps what it kept"
        );
        assert_eq!(
            routable_mechanisms(capa),
            [&b"PLAIN"[..], b"LOGIN", b"SCRAM-SHA-256"]
        );
        for raw in [&b"-ERR no\r\n"[..], b"+OK\r\nUSER\r\n.\r\n", b""] {
            assert!(routable_mechanisms(raw).is_empty());
        }
    }

    #[test]
    fn xclient_offered_to_mailfront_is_never_shown_to_the_client() {
        let capa = b"+OK\r\nTOP\r\nxclient\r\nUSER\r\n.\r\n";
        assert_eq!(
            rewrite_capa(capa, CapaView::Tls),
            b"+OK\r\nTOP\r\nUSER\r\n.\r\n"
        );
        assert_eq!(
            rewrite_capa(capa, CapaView::Cleartext),
            b"+OK\r\nTOP\r\nSTLS\r\n.\r\n"
        );
    }

    #[test]
    fn the_auth_mechanism_list_loses_external_and_keeps_the_rest_byte_exact() {
        assert_eq!(
            rewrite_mechanisms(b"+OK\r\nPLAIN\r\nexternal\r\nLOGIN\n.\r\n"),
            b"+OK\r\nPLAIN\r\nLOGIN\n.\r\n"
        );
        for raw in [&b"-ERR no\r\n"[..], b"+OK\r\n", b""] {
            assert_eq!(rewrite_mechanisms(raw), raw);
        }
    }

    #[test]
    fn non_capa_input_is_unchanged() {
        for raw in [&b"-ERR no\r\n"[..], b"+OK\r\n", b"+OK\r\nTOP\r\n", b""] {
            assert_eq!(rewrite_capa(raw, CapaView::Cleartext), raw);
        }
    }

    #[test]
    fn xclient_greeting_code_is_removed_and_apop_timestamp_kept() {
        assert_eq!(
            rewrite_greeting(b"+OK [XCLIENT] Dovecot ready.\r\n"),
            b"+OK Dovecot ready.\r\n"
        );
        assert_eq!(
            rewrite_greeting(b"+OK POP3 ready <1896.697170952@dbc.mtview.ca.us>\r\n"),
            b"+OK POP3 ready <1896.697170952@dbc.mtview.ca.us>\r\n"
        );
    }
}
