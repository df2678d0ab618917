//! Rewriting the backend's capability lists for the client (RFC 9051 §6.1.1, §6.2.1, §6.2.3).
//!
//! Pure functions over bytes. Everything not rewritten stays byte-exact: tokens keep their
//! spelling and order, and a removed token takes one adjacent space with it.

use crate::imap::response::response_code;
use crate::line::trim_line_end;
use crate::sasl;

/// Which advertisement the client must see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CapabilityView {
    /// A `tls: starttls` listener before STARTTLS: `STARTTLS` and `LOGINDISABLED` shown, every
    /// `AUTH=` removed (RFC 9051 §6.2.3, §6.2.2), as nginx does with `starttls only`. `SASL-IR`
    /// goes too: with no mechanism to use it is noise, and a client
    /// must re-read capabilities after STARTTLS anyway (RFC 9051 §6.2.1).
    Cleartext,
    /// TLS is active (implicit, or after STARTTLS): the cleartext backend's `STARTTLS` and
    /// `LOGINDISABLED` are removed (RFC 9051 §6.2.1 "SHOULD NOT advertise the STARTTLS
    /// capability"), and `AUTH=EXTERNAL`, because the client certificate never reaches the
    /// backend (RFC 8314 §4.2).
    Tls,
    /// [`CapabilityView::Tls`] on a listener that routes by user (`user_affinity`, `user_map`,
    /// `user_lookup`): every `AUTH=` mechanism that cannot be routed ([`routable`]:
    /// CRAM-MD5, DIGEST-MD5, GSSAPI, …) goes too, since mailfront must read the user name from
    /// the client's first response before it chooses the backend that would send a challenge
    /// (issue 22).
    TlsRouted,
}

fn is_removed(token: &[u8], view: CapabilityView) -> bool {
    let upper = |s: &str| token.eq_ignore_ascii_case(s.as_bytes());
    match view {
        CapabilityView::Cleartext => {
            upper("SASL-IR")
                || token
                    .get(..5)
                    .is_some_and(|p| p.eq_ignore_ascii_case(b"AUTH="))
        }
        CapabilityView::Tls => {
            upper("STARTTLS") || upper("LOGINDISABLED") || upper("AUTH=EXTERNAL")
        }
        CapabilityView::TlsRouted => {
            is_removed(token, CapabilityView::Tls)
                || token
                    .split_at_checked(5)
                    .is_some_and(|(prefix, mechanism)| {
                        prefix.eq_ignore_ascii_case(b"AUTH=") && !routable(mechanism)
                    })
        }
    }
}

/// Whether a routed listener offers and takes `mechanism`: a SASL mechanism name
/// ([`sasl::is_mechanism_name`], at most 20 characters, which an IMAP atom need not be) whose
/// first client response names the user ([`sasl::is_routable`]).
pub fn routable(mechanism: &[u8]) -> bool {
    sasl::is_mechanism_name(mechanism) && sasl::is_routable(mechanism)
}

/// Rewrites a space-separated capability list (the part after `CAPABILITY `).
pub fn rewrite_list(list: &[u8], view: CapabilityView) -> Vec<u8> {
    let kept: Vec<&[u8]> = list
        .split(|&b| b == b' ')
        .filter(|token| !is_removed(token, view))
        .collect();
    let mut out = kept.join(&b' ');
    if view == CapabilityView::Cleartext {
        for needed in ["STARTTLS", "LOGINDISABLED"] {
            if !kept
                .iter()
                .any(|token| token.eq_ignore_ascii_case(needed.as_bytes()))
            {
                if !out.is_empty() {
                    out.push(b' ');
                }
                out.extend_from_slice(needed.as_bytes());
            }
        }
    }
    out
}

/// Rewrites a whole response if it carries capabilities: untagged `* CAPABILITY …`, or a
/// `[CAPABILITY …]` code in a status response (greeting, `* OK`, tagged OK). `None` when the
/// response carries none, so the driver forwards its own bytes.
///
/// The tagged OK of a successful LOGIN/AUTHENTICATE lists post-authentication capabilities;
/// the driver forwards that one untouched (RFC 9051 §6.2.2).
pub fn rewrite_response(raw: &[u8], view: CapabilityView) -> Option<Vec<u8>> {
    let line_len = raw
        .iter()
        .position(|&b| b == b'\n')
        .map_or(raw.len(), |p| p + 1);
    let (line, tail) = raw.split_at_checked(line_len)?;
    let content = trim_line_end(line);
    let line_end = line.get(content.len()..).unwrap_or_default();
    let (start, end) = capability_span(content)?;
    let before = content.get(..start)?;
    let list = content.get(start..end)?;
    let after = content.get(end..)?;
    let mut out = Vec::with_capacity(raw.len() + 24);
    out.extend_from_slice(before);
    let rewritten = rewrite_list(list, view);
    if list.is_empty() && !rewritten.is_empty() && !before.ends_with(b" ") {
        out.push(b' ');
    }
    out.extend_from_slice(&rewritten);
    out.extend_from_slice(after);
    out.extend_from_slice(line_end);
    out.extend_from_slice(tail);
    Some(out)
}

/// The capability tokens a response carries (untagged `* CAPABILITY …` or a `[CAPABILITY …]`
/// code), so the driver can learn whether the backend supports ID; `None` when it carries none.
pub fn capabilities(raw: &[u8]) -> Option<Vec<&[u8]>> {
    let line_len = raw
        .iter()
        .position(|&b| b == b'\n')
        .map_or(raw.len(), |p| p + 1);
    let content = trim_line_end(raw.get(..line_len)?);
    let (start, end) = capability_span(content)?;
    let list = content.get(start..end)?;
    Some(
        list.split(|&b| b == b' ')
            .filter(|t| !t.is_empty())
            .collect(),
    )
}

/// The byte range of the capability list in a first line, if it has one.
fn capability_span(content: &[u8]) -> Option<(usize, usize)> {
    let first_space = content.iter().position(|&b| b == b' ')?;
    let after_tag = content.get(first_space + 1..)?;
    let word_end = after_tag
        .iter()
        .position(|&b| b == b' ')
        .unwrap_or(after_tag.len());
    let word = after_tag.get(..word_end)?;
    let word_start = first_space + 1;
    if content.starts_with(b"* ") && word.eq_ignore_ascii_case(b"CAPABILITY") {
        let start = (word_start + word_end + 1).min(content.len());
        return Some((start, content.len()));
    }
    let is_status = [&b"OK"[..], b"NO", b"BAD", b"PREAUTH", b"BYE"]
        .iter()
        .any(|s| word.eq_ignore_ascii_case(s));
    if !is_status {
        return None;
    }
    let text_start = word_start + word_end + 1;
    let text = content.get(text_start..)?;
    let code = response_code(text)?;
    if !code.eq_ignore_ascii_case(b"CAPABILITY") {
        return None;
    }
    // "[" + "CAPABILITY" + " "
    let list_start = text_start + 1 + code.len() + 1;
    let close = text.iter().position(|&b| b == b']')?;
    let list_end = text_start + close;
    if list_start > list_end {
        // `[CAPABILITY]` with no list.
        return Some((list_end, list_end));
    }
    Some((list_start, list_end))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rw(raw: &[u8], view: CapabilityView) -> Vec<u8> {
        rewrite_response(raw, view).unwrap()
    }

    #[test]
    fn cleartext_view_hides_auth_and_shows_starttls_and_logindisabled() {
        let out = rw(
            b"* CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN AUTH=LOGIN ID\r\n",
            CapabilityView::Cleartext,
        );
        assert_eq!(out, b"* CAPABILITY IMAP4rev1 ID STARTTLS LOGINDISABLED\r\n");
    }

    #[test]
    fn sasl_ir_is_hidden_before_tls_and_shown_after() {
        let caps = b"* CAPABILITY IMAP4rev1 sasl-ir AUTH=PLAIN\r\n";
        assert_eq!(
            rw(caps, CapabilityView::Cleartext),
            b"* CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED\r\n"
        );
        assert_eq!(rw(caps, CapabilityView::Tls), caps);
    }

    #[test]
    fn tls_view_removes_starttls_logindisabled_and_external() {
        let out = rw(
            b"* CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED AUTH=PLAIN AUTH=EXTERNAL ID\r\n",
            CapabilityView::Tls,
        );
        assert_eq!(out, b"* CAPABILITY IMAP4rev1 AUTH=PLAIN ID\r\n");
    }

    #[test]
    fn the_routed_view_also_hides_every_mechanism_that_cannot_be_routed() {
        let list =
            b"IMAP4rev1 STARTTLS SASL-IR AUTH=PLAIN AUTH=CRAM-MD5 auth=login AUTH=DIGEST-MD5 \
                     AUTH=SCRAM-SHA-256 AUTH=GSSAPI AUTH=OAUTHBEARER AUTH=XOAUTH2 AUTH=EXTERNAL \
                     AUTH=NTLM AUTH= AUTH=SCRAM-SHA-256-AND-MORE-THAN-20 ID";
        assert_eq!(
            rewrite_list(list, CapabilityView::TlsRouted),
            b"IMAP4rev1 SASL-IR AUTH=PLAIN auth=login AUTH=SCRAM-SHA-256 AUTH=OAUTHBEARER \
              AUTH=XOAUTH2 ID"
        );
        assert_eq!(
            rw(
                b"a NO [CAPABILITY IMAP4rev1 AUTH=CRAM-MD5 AUTH=PLAIN] no\r\n",
                CapabilityView::TlsRouted
            ),
            b"a NO [CAPABILITY IMAP4rev1 AUTH=PLAIN] no\r\n"
        );
        assert_eq!(
            rewrite_list(b"IMAP4rev1 AUTH=CRAM-MD5", CapabilityView::Tls),
            b"IMAP4rev1 AUTH=CRAM-MD5",
            "only a routed listener hides them"
        );
    }

    #[test]
    fn greeting_code_is_rewritten_and_the_text_is_kept() {
        let out = rw(
            b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN STARTTLS] Dovecot ready.\r\n",
            CapabilityView::Cleartext,
        );
        assert_eq!(
            out,
            b"* OK [CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED] Dovecot ready.\r\n"
        );
        let out = rw(
            b"* OK [CAPABILITY IMAP4rev1 STARTTLS AUTH=PLAIN] Dovecot ready.\r\n",
            CapabilityView::Tls,
        );
        assert_eq!(
            out,
            b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] Dovecot ready.\r\n"
        );
    }

    #[test]
    fn tagged_ok_code_is_rewritten() {
        let out = rw(
            b"a1 OK [CAPABILITY IMAP4rev1 LOGINDISABLED] Done\r\n",
            CapabilityView::Tls,
        );
        assert_eq!(out, b"a1 OK [CAPABILITY IMAP4rev1] Done\r\n");
    }

    #[test]
    fn case_and_spelling_of_kept_tokens_survive() {
        let out = rw(
            b"* capability imap4rev1 starttls x-Odd\n",
            CapabilityView::Tls,
        );
        assert_eq!(out, b"* capability imap4rev1 x-Odd\n");
        let out = rw(
            b"* capability imap4rev1 starttls Auth=Plain\r\n",
            CapabilityView::Cleartext,
        );
        assert_eq!(out, b"* capability imap4rev1 starttls LOGINDISABLED\r\n");
    }

    #[test]
    fn responses_without_capabilities_are_left_alone() {
        assert_eq!(
            rewrite_response(b"* OK [ALERT] hi\r\n", CapabilityView::Tls),
            None
        );
        assert_eq!(rewrite_response(b"* ID NIL\r\n", CapabilityView::Tls), None);
        assert_eq!(rewrite_response(b"+ \r\n", CapabilityView::Tls), None);
        assert_eq!(
            rewrite_response(b"a OK done\r\n", CapabilityView::Tls),
            None
        );
    }

    #[test]
    fn empty_capability_code_gets_the_cleartext_additions() {
        let out = rw(b"* OK [CAPABILITY] hi\r\n", CapabilityView::Cleartext);
        assert_eq!(out, b"* OK [CAPABILITY STARTTLS LOGINDISABLED] hi\r\n");
    }

    #[test]
    fn rewriting_is_idempotent() {
        for view in [CapabilityView::Cleartext, CapabilityView::Tls] {
            let once = rw(
                b"* CAPABILITY IMAP4rev1 STARTTLS AUTH=PLAIN LOGINDISABLED\r\n",
                view,
            );
            assert_eq!(rw(&once, view), once);
        }
    }

    #[test]
    fn capabilities_are_read_from_untagged_data_and_response_codes() {
        let tokens = |raw: &[u8]| capabilities(raw).map(|t| t.concat());
        assert_eq!(
            capabilities(b"* CAPABILITY IMAP4rev1 ID\r\n"),
            Some(vec![&b"IMAP4rev1"[..], b"ID"])
        );
        assert_eq!(
            capabilities(b"* OK [CAPABILITY IMAP4rev1 SASL-IR ID] ready\r\n"),
            Some(vec![&b"IMAP4rev1"[..], b"SASL-IR", b"ID"])
        );
        assert_eq!(tokens(b"* OK [CAPABILITY] ready\r\n"), Some(Vec::new()));
        assert_eq!(capabilities(b"* OK ready\r\n"), None);
        assert_eq!(capabilities(b"* ID (\"name\" \"x\")\r\n"), None);
    }
}
