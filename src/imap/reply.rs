//! Responses mailfront writes to IMAP clients itself (RFC 9051 §7.1; RFC 5530 codes).

/// `<tag> <status> <text>\r\n`.
pub fn tagged(tag: &[u8], status: &str, text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(tag.len() + status.len() + text.len() + 4);
    out.extend_from_slice(tag);
    out.push(b' ');
    out.extend_from_slice(status.as_bytes());
    out.push(b' ');
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(b"\r\n");
    out
}

/// LOGIN or AUTHENTICATE before TLS: one fixed answer whatever the credentials
/// (RFC 8314 §4.1; RFC 5530 PRIVACYREQUIRED; wording after Dovecot's).
pub fn privacy_required(tag: &[u8]) -> Vec<u8> {
    tagged(
        tag,
        "NO",
        "[PRIVACYREQUIRED] Cleartext authentication disallowed; use STARTTLS first",
    )
}

/// STARTTLS accepted: TLS starts right after this line's CRLF (RFC 9051 §6.2.1).
pub fn starttls_ok(tag: &[u8]) -> Vec<u8> {
    tagged(tag, "OK", "Begin TLS negotiation now")
}

/// STARTTLS on an implicit-TLS port or a second time (RFC 9051 §6.2.1 "MUST always respond with
/// a tagged BAD").
pub fn starttls_refused(tag: &[u8]) -> Vec<u8> {
    tagged(tag, "BAD", "TLS is already active")
}

/// AUTHENTICATE with a literal (RFC 9051 §6.2.2: never inside a quoted string or literal).
pub fn authenticate_malformed(tag: &[u8]) -> Vec<u8> {
    tagged(tag, "BAD", "Initial response must not be a literal")
}

/// AUTHENTICATE with an initial response when the backend lacks SASL-IR, which the client was
/// not shown either: the backend's own answer would be BAD (RFC 4959 §3).
pub fn sasl_ir_unsupported(tag: &[u8]) -> Vec<u8> {
    tagged(
        tag,
        "BAD",
        "SASL-IR not supported; send AUTHENTICATE without it",
    )
}

/// STARTTLS with arguments or a literal.
pub fn starttls_malformed(tag: &[u8]) -> Vec<u8> {
    tagged(tag, "BAD", "STARTTLS takes no arguments")
}

/// A client ID answered here (see [`crate::imap::prelogin`]): before TLS, so the
/// backend's first ID (the only one Dovecot trusts) is the one carrying the `tls` field after
/// STARTTLS; when the backend lacks ID; and after mailfront's fields already went once.
/// RFC 2971 §3.2 allows NIL: "no information".
pub fn id_nil(tag: &[u8]) -> Vec<u8> {
    let mut out = b"* ID NIL\r\n".to_vec();
    out.extend_from_slice(&tagged(tag, "OK", "ID completed"));
    out
}

/// Any command outside the not-authenticated whitelist (RFC 9051 §6.1–§6.2, RFC 2971): answered
/// here and never forwarded, so a backend extension (XCLIENT, COMPRESS…) can never be reached
/// before login.
pub fn not_before_authentication(tag: &[u8]) -> Vec<u8> {
    tagged(tag, "BAD", "Command not allowed before authentication")
}

/// The backend cannot be reached or broke the protocol (RFC 9051 §7.1.5; RFC 5530 UNAVAILABLE).
pub fn bye_unavailable() -> Vec<u8> {
    b"* BYE [UNAVAILABLE] Server temporarily unavailable\r\n".to_vec()
}

/// The backend greeted with PREAUTH: relaying it would hand out an authenticated session
/// without credentials (RFC 9051 §7.1.4).
pub fn bye_preauth() -> Vec<u8> {
    b"* BYE [UNAVAILABLE] Server misconfigured\r\n".to_vec()
}

/// The client was silent too long before authenticating.
pub fn bye_idle_timeout() -> Vec<u8> {
    b"* BYE Autologout; idle for too long\r\n".to_vec()
}

/// The client had not authenticated within `timeouts.login` of connecting, however busy it
/// was: a server-initiated logout (RFC 9051 §7.1.5), in the idle timeout's words.
pub fn bye_login_timeout() -> Vec<u8> {
    b"* BYE Autologout; login took too long\r\n".to_vec()
}

/// Too many commands before authentication (`limits.preauth_commands`).
pub fn bye_too_many_commands() -> Vec<u8> {
    b"* BYE Too many commands before authentication\r\n".to_vec()
}

/// The client's address already holds `limits.connections_per_ip` sessions that have not
/// logged in: the greeting is this BYE instead (RFC 9051 §7.1.5; RFC 5530 UNAVAILABLE).
pub fn bye_too_many_connections() -> Vec<u8> {
    b"* BYE [UNAVAILABLE] Too many connections from your address\r\n".to_vec()
}

/// LOGIN or AUTHENTICATE from an address with `limits.auth_failures_per_ip` failed logins in
/// its window: answered here, never forwarded. UNAVAILABLE (RFC 5530 §3) says it is temporary
/// and not about these credentials, so a client does not tell its user the password is wrong.
pub fn auth_throttled(tag: &[u8]) -> Vec<u8> {
    tagged(
        tag,
        "NO",
        "[UNAVAILABLE] Too many failed logins, try again later",
    )
}

/// A login `user_lookup` refused on a routed listener (issue 22): its `Auth-Status` text, kept
/// to printable ASCII and [`crate::machine::MAX_REFUSAL_TEXT`] octets so no CR, LF or control reaches the
/// client (RFC 9051 §7.1 `text`), under AUTHENTICATIONFAILED (RFC 5530 §3).
pub fn login_refused(tag: &[u8], text: &str) -> Vec<u8> {
    let text = crate::machine::refusal_text(text, "Authentication failed");
    tagged(tag, "NO", &format!("[AUTHENTICATIONFAILED] {text}"))
}

/// A routed login whose user name mailfront cannot read (a malformed PLAIN response,
/// OAUTHBEARER without `a=`): no backend can be chosen, so it fails here as a wrong credential
/// would (RFC 5530 §3 AUTHENTICATIONFAILED).
pub fn authentication_failed(tag: &[u8]) -> Vec<u8> {
    tagged(tag, "NO", "[AUTHENTICATIONFAILED] Authentication failed")
}

/// A routed login with no backend now (the lookup failed, the user's backend is down): a
/// temporary failure (RFC 5530 §3 UNAVAILABLE); the client may try again.
pub fn login_unavailable(tag: &[u8]) -> Vec<u8> {
    tagged(
        tag,
        "NO",
        "[UNAVAILABLE] Server temporarily unavailable, try again later",
    )
}

/// AUTHENTICATE with a mechanism a routed listener cannot route (CRAM-MD5, DIGEST-MD5,
/// GSSAPI…), hidden from its capabilities too: "NO - unsupported authentication mechanism"
/// (RFC 9051 §6.2.2).
pub fn mechanism_not_routable(tag: &[u8]) -> Vec<u8> {
    tagged(tag, "NO", "Unsupported authentication mechanism")
}

/// The client cancelled (`*`) an AUTHENTICATE mailfront was answering itself: "it MUST reject
/// the AUTHENTICATE command by sending a tagged BAD response" (RFC 9051 §6.2.2).
pub fn authenticate_cancelled(tag: &[u8]) -> Vec<u8> {
    tagged(tag, "BAD", "Authentication cancelled")
}

/// A response that is not base64 to a challenge mailfront sent itself: tagged BAD
/// (RFC 9051 §6.2.2, "an invalid base64 string").
pub fn authenticate_invalid(tag: &[u8]) -> Vec<u8> {
    tagged(tag, "BAD", "Invalid base64 response")
}

/// The session ends after a login `user_lookup` refused without `Auth-Wait` (as nginx does):
/// the server is closing the connection (RFC 9051 §7.1.5).
pub fn bye_login_refused() -> Vec<u8> {
    b"* BYE Login refused\r\n".to_vec()
}

/// mailfront's own empty challenge (RFC 9051 §6.2.2, `"+" SP base64`, here empty): a routed
/// listener holds the client's first response before it chooses the backend.
pub const SASL_CONTINUATION: &[u8] = b"+ \r\n";

/// The LOGIN mechanism's challenges, which a routed listener sends itself as nginx does:
/// `Username:` and `Password:` in base64 (draft-murchison-sasl-login §2).
pub const SASL_LOGIN_USERNAME: &[u8] = b"+ VXNlcm5hbWU6\r\n";
pub const SASL_LOGIN_PASSWORD: &[u8] = b"+ UGFzc3dvcmQ6\r\n";

/// The proxy is shutting down.
pub fn bye_shutdown() -> Vec<u8> {
    b"* BYE [UNAVAILABLE] Server shutting down\r\n".to_vec()
}

/// After a fatal [`crate::imap::command::Rejection`].
pub fn bye_protocol_error() -> Vec<u8> {
    b"* BYE Protocol error\r\n".to_vec()
}

/// A `+` continuation mailfront sends itself for a literal it accepted (RFC 9051 §7.5).
pub fn continuation() -> Vec<u8> {
    b"+ Ready for literal data\r\n".to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_text_reaches_the_client_as_one_clean_line() {
        assert_eq!(
            login_refused(b"a", "Invalid login or password"),
            b"a NO [AUTHENTICATIONFAILED] Invalid login or password\r\n"
        );
        assert_eq!(
            login_refused(b"a", "bad\r\n* OK injected\u{7}\u{e9}"),
            b"a NO [AUTHENTICATIONFAILED] bad* OK injected\r\n"
        );
        assert_eq!(
            login_refused(b"a", " \r\n"),
            b"a NO [AUTHENTICATIONFAILED] Authentication failed\r\n"
        );
        let long = login_refused(b"a", &"x".repeat(5000));
        assert_eq!(
            long.len(),
            "a NO [AUTHENTICATIONFAILED] \r\n".len() + crate::machine::MAX_REFUSAL_TEXT
        );
    }

    #[test]
    fn the_login_mechanism_challenges_are_username_and_password() {
        use base64::Engine as _;
        let decode = |line: &[u8]| {
            let b64 = line
                .strip_prefix(b"+ ")
                .unwrap()
                .strip_suffix(b"\r\n")
                .unwrap();
            base64::engine::general_purpose::STANDARD
                .decode(b64)
                .unwrap()
        };
        assert_eq!(decode(SASL_LOGIN_USERNAME), b"Username:");
        assert_eq!(decode(SASL_LOGIN_PASSWORD), b"Password:");
    }
}
