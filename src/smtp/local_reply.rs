//! Replies mailfront writes itself (codes per RFC 5321 §4.2.2). Each carries an enhanced status
//! code (RFC 3463) whether or not the backend advertises ENHANCEDSTATUSCODES: clients decide by
//! the three-digit code.

/// Answer to STARTTLS on a `starttls` listener before TLS (RFC 3207 §4); the driver then drops
/// every byte buffered after the command and starts the handshake.
pub const STARTTLS_READY: &[u8] = b"220 2.0.0 Ready to start TLS\r\n";
/// Any command but EHLO, HELO, NOOP, RSET, QUIT, STARTTLS before TLS (RFC 3207 §4), and AUTH
/// before TLS whatever its credential (RFC 8314 §4.1: one indication for valid and invalid).
pub const MUST_STARTTLS: &[u8] = b"530 5.7.0 Must issue a STARTTLS command first\r\n";
/// STARTTLS when TLS is already active, implicit or upgraded (Postfix wording).
pub const TLS_ALREADY_ACTIVE: &[u8] = b"554 5.5.1 Error: TLS already active\r\n";
/// STARTTLS with parameters (RFC 3207 §4: 501).
pub const STARTTLS_SYNTAX: &[u8] = b"501 5.5.4 Syntax: STARTTLS\r\n";
/// MAIL with REQUIRETLS that cannot be honoured: an option not advertised is unknown
/// (RFC 5321 §4.1.1.11: 555), as Postfix answers it.
pub const REQUIRETLS_UNSUPPORTED: &[u8] = b"555 5.5.4 Unsupported option: REQUIRETLS\r\n";
/// Client XCLIENT/XFORWARD: answered as an unknown X-command (RFC 5321 §4.1.5), revealing
/// nothing about the backend trusting mailfront with them.
pub const COMMAND_NOT_RECOGNIZED: &[u8] = b"500 5.5.1 Error: command not recognized\r\n";
/// A command line over the limit (RFC 5321 §4.5.3.1.4, §4.2.2).
pub const LINE_TOO_LONG: &[u8] = b"500 5.5.2 Line too long\r\n";
/// An AUTH line or SASL response over the limit (RFC 4954 §4).
pub const AUTH_LINE_TOO_LONG: &[u8] = b"500 5.5.6 Authentication Exchange line is too long\r\n";
/// A command line with a CR not followed by LF (RFC 5321 §2.3.8).
pub const BARE_CR_IN_COMMAND: &[u8] = b"500 5.5.2 Error: bare CR in command line\r\n";
/// A command line ended by an LF without CR (RFC 5321 §2.3.8; see `SyntaxError::BareLf`).
pub const BARE_LF_IN_COMMAND: &[u8] = b"500 5.5.2 Error: bare LF in command line\r\n";
/// A NUL in a command line is never forwarded (see `SyntaxError::Nul`).
pub const NUL_IN_COMMAND: &[u8] = b"500 5.5.2 Error: NUL in command line\r\n";
/// NOOP and RSET answered by mailfront before TLS, when no backend is connected yet.
pub const OK: &[u8] = b"250 2.0.0 Ok\r\n";
/// RCPT or DATA before TLS with no transaction open (no MAIL ever reached a backend), with
/// `require_tls_for_mail: false` (RFC 5321 §4.1.4: 503 bad sequence).
pub const NEED_MAIL: &[u8] = b"503 5.5.1 Error: need MAIL command\r\n";
/// MAIL without a parsable `FROM:<path>` (RFC 5321 §4.1.4: bad argument is 501).
pub const MAIL_SYNTAX: &[u8] = b"501 5.5.4 Syntax: MAIL FROM:<address>\r\n";
/// BDAT without a valid chunk size (RFC 3030 §2).
pub const BDAT_SYNTAX: &[u8] = b"501 5.5.4 Syntax: BDAT <size> [LAST]\r\n";
/// RCPT without a parsable `TO:<path>` (it is never forwarded).
pub const RCPT_SYNTAX: &[u8] = b"501 5.5.4 Syntax: RCPT TO:<address>\r\n";
/// AUTH with an unusable mechanism name or initial response (RFC 4954 §4).
pub const AUTH_SYNTAX: &[u8] = b"501 5.5.4 Syntax: AUTH mechanism [initial-response]\r\n";
/// A SASL line that is not base64 (RFC 4954 §4; Postfix's own wording).
pub const SASL_SYNTAX: &[u8] = b"501 5.5.2 Cannot decode response\r\n";
/// A transaction or AUTH command after STARTTLS before the new EHLO (RFC 3207 §4.2 reset).
pub const SEND_EHLO_FIRST: &[u8] = b"503 5.5.1 Error: send HELO/EHLO first\r\n";
/// AUTH from an address with `limits.auth_failures_per_ip` failed logins in its window:
/// answered here, never forwarded. 454 4.7.0 is RFC 4954 §6's temporary authentication failure,
/// so a client retries later instead of asking its user for another password.
pub const AUTH_THROTTLED: &[u8] = b"454 4.7.0 Too many failed authentications, try again later\r\n";
/// AUTH after a successful AUTH (RFC 4954 §4: 503).
pub const ALREADY_AUTHENTICATED: &[u8] = b"503 5.5.1 Error: already authenticated\r\n";
/// BDAT when the backend does not offer CHUNKING (so mailfront does not either).
pub const BDAT_NOT_SUPPORTED: &[u8] = b"502 5.5.1 Error: command not implemented\r\n";
/// End of a message refused for a bare CR or LF (smuggling defence, policy "reject"): 554
/// transaction failed, 5.6.0 "other media error" (RFC 3463): a permanent content error, so the
/// client reports it instead of retrying the same bytes.
pub const BARE_LINE_ENDING: &[u8] =
    b"554 5.6.0 Message refused: bare CR or LF in message content\r\n";

/// AUTH during a mail transaction (RFC 4954 §4), on a routed session whose MAIL went to the
/// listener's pool (Postfix's wording).
pub const AUTH_IN_TRANSACTION: &[u8] = b"503 5.5.1 Error: MAIL transaction in progress\r\n";

/// A command that needs a login, before one on a listener that routes by user: no backend is
/// chosen before a login names the user, so MAIL (where mail needs TLS), VRFY, EXPN and HELP are
/// answered here (RFC 4954 §6: 530 5.7.0, "Authentication required").
pub const AUTH_REQUIRED: &[u8] = b"530 5.7.0 Authentication required\r\n";
/// AUTH naming a mechanism that cannot be routed by user (CRAM-MD5, DIGEST-MD5, EXTERNAL,
/// GSSAPI, …) on a listener that routes by user: RFC 4954 §4 rejects an unsupported mechanism
/// with 504.
pub const MECHANISM_NOT_ROUTABLE: &[u8] = b"504 5.5.4 Unrecognized authentication type\r\n";
/// The client's `*` to a challenge mailfront wrote itself (RFC 4954 §4: the AUTH is rejected with
/// 501); no backend was contacted.
pub const AUTH_CANCELLED: &[u8] = b"501 5.7.0 Authentication aborted\r\n";
/// A login whose user name cannot be read (a malformed PLAIN, OAUTHBEARER without `a=`), on a
/// listener that routes by user: a failed authentication (RFC 4954 §6: 535 5.7.8), answered here.
pub const AUTH_FAILED: &[u8] = b"535 5.7.8 Authentication credentials invalid\r\n";
/// The code of a login refused by `user_lookup` when it gave no `Auth-Error-Code`
/// (RFC 4954 §6: 535 5.7.8, as nginx answers).
pub const AUTH_REFUSED_CODE: &str = "535 5.7.8";
/// No backend for a login now (the lookup failed, the chosen backend is down): RFC 4954 §6's
/// temporary authentication failure, so the client tries again later.
pub const AUTH_UNAVAILABLE: &[u8] = b"454 4.7.0 Temporary authentication failure\r\n";
/// The empty challenge mailfront writes itself for an AUTH without an initial response on a
/// listener that routes by user (RFC 4954 §4: `334` SP and base64, here none).
pub const SASL_EMPTY_CHALLENGE: &[u8] = b"334 \r\n";
/// The LOGIN mechanism's challenges, played by mailfront on a listener that routes by user:
/// `Username:` and `Password:` in base64 (draft-murchison-sasl-login §2, as nginx writes them).
pub const LOGIN_USERNAME_CHALLENGE: &[u8] = b"334 VXNlcm5hbWU6\r\n";
pub const LOGIN_PASSWORD_CHALLENGE: &[u8] = b"334 UGFzc3dvcmQ6\r\n";

/// A login `user_lookup` refused: `code` is its `Auth-Error-Code` (`535 5.7.0`), used only when
/// it reads as a 4yz/5yz code with an enhanced status code (RFC 3463) of the same class, else
/// [`AUTH_REFUSED_CODE`]; `text` its `Auth-Status` as [`crate::machine::refusal_text`] keeps
/// it (printable ASCII only, so it can never end the line or start another reply, bounded).
pub fn auth_refused(code: Option<&str>, text: &str) -> Vec<u8> {
    let code = code
        .filter(|code| is_failure_code(code))
        .unwrap_or(AUTH_REFUSED_CODE);
    let text = crate::machine::refusal_text(text, "Authentication credentials invalid");
    format!("{code} {text}\r\n").into_bytes()
}

/// `4yz x.y.z` or `5yz x.y.z` with the enhanced code's class equal to the reply's first digit
/// (RFC 3463 §2: 1 to 3 digits per subject and detail).
fn is_failure_code(code: &str) -> bool {
    let Some((reply, enhanced)) = code.split_once(' ') else {
        return false;
    };
    let reply_ok = reply.len() == 3
        && reply.bytes().all(|b| b.is_ascii_digit())
        && matches!(reply.as_bytes().first(), Some(b'4' | b'5'));
    let mut parts = enhanced.split('.');
    let class_ok = parts.next() == reply.get(..1);
    let rest_ok = (0..2).all(|_| {
        parts
            .next()
            .is_some_and(|p| (1..=3).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()))
    });
    reply_ok && class_ok && rest_ok && parts.next().is_none()
}

/// The greeting mailfront sends (RFC 5321 §4.2): it names the configured hostname, because the
/// backend's own greeting may name an internal host.
pub fn greeting(hostname: &str) -> Vec<u8> {
    format!("220 {} ESMTP\r\n", reply_text(hostname)).into_bytes()
}

/// mailfront's own EHLO reply before TLS on a `starttls` listener, when no backend is
/// connected: nothing of the backend's (its AUTH, SIZE or name) is shown before TLS, and the
/// client asks again after the handshake (RFC 3207 §4.2), getting the backend's list then.
pub fn cleartext_ehlo(hostname: &str) -> Vec<u8> {
    format!(
        "250-{}\r\n250-PIPELINING\r\n250-ENHANCEDSTATUSCODES\r\n250 STARTTLS\r\n",
        reply_text(hostname)
    )
    .into_bytes()
}

/// mailfront's EHLO reply after TLS on a listener that routes by user, while no backend has
/// told the listener its own (the driver probes one before it builds a routed session, so this
/// is rare): only what mailfront honours with any submission backend, since it never connects
/// to learn more. PIPELINING, because mailfront itself holds commands back from a backend that
/// does not pipeline (RFC 2920 §3.1); `AUTH PLAIN`, the one mechanism every submission backend
/// offers over TLS (RFC 4616; Dovecot's default `auth_mechanisms`). Nothing else: SIZE,
/// 8BITMIME, SMTPUTF8, CHUNKING, ENHANCEDSTATUSCODES and the rest depend on the backend.
pub fn routed_ehlo(hostname: &str) -> Vec<u8> {
    format!(
        "250-{}\r\n250-PIPELINING\r\n250 AUTH PLAIN\r\n",
        reply_text(hostname)
    )
    .into_bytes()
}

/// mailfront's answer to HELO: the backend's 250 text would name the backend, an internal host.
pub fn helo_reply(hostname: &str) -> Vec<u8> {
    format!("250 {}\r\n", reply_text(hostname)).into_bytes()
}

/// QUIT when no backend is left to answer it (after a refused message closed it).
pub const CLOSING: &[u8] = b"221 2.0.0 Bye\r\n";

/// The next command after a message refused for a bare CR/LF: the backend connection was
/// dropped to abort that message (no end of data may ever reach it), so the session ends.
pub fn closing_after_refusal(hostname: &str) -> Vec<u8> {
    format!(
        "421 4.7.0 {} Error: message refused, closing transmission channel\r\n",
        reply_text(hostname)
    )
    .into_bytes()
}

/// The backend could not be reached or went away (no RFC mandates 4.4.1).
pub fn backend_unavailable(hostname: &str) -> Vec<u8> {
    format!(
        "421 4.4.1 {} Service not available, closing transmission channel\r\n",
        reply_text(hostname)
    )
    .into_bytes()
}

/// `backend_client_info`: the backend offers XCLIENT but refused mailfront's, or could not be
/// asked. The session was meant to carry the client's identity and never goes on under
/// mailfront's own.
pub fn client_identity_refused(hostname: &str) -> Vec<u8> {
    format!(
        "421 4.7.0 {} Service not available, closing transmission channel\r\n",
        reply_text(hostname)
    )
    .into_bytes()
}

/// The backend broke the reply grammar; replies can no longer be matched to commands.
pub fn backend_error(hostname: &str) -> Vec<u8> {
    format!(
        "421 4.3.0 {} Backend protocol error, closing transmission channel\r\n",
        reply_text(hostname)
    )
    .into_bytes()
}

/// A client or backend stayed silent past its deadline (RFC 5321 §4.5.3.2).
pub fn timeout(hostname: &str) -> Vec<u8> {
    format!(
        "421 4.4.2 {} Error: timeout exceeded, closing transmission channel\r\n",
        reply_text(hostname)
    )
    .into_bytes()
}

/// The client's address already holds `limits.connections_per_ip` sessions that have not
/// authenticated: the greeting is this 421 instead (RFC 5321 §3.1 lets a server refuse service
/// with 421 in place of its 220; RFC 3463 X.7.0: a security or policy status).
pub fn too_many_connections(hostname: &str) -> Vec<u8> {
    format!(
        "421 4.7.0 {} Too many connections from your address, closing transmission channel\r\n",
        reply_text(hostname)
    )
    .into_bytes()
}

/// The client had not authenticated (nor, where cleartext mail is allowed, started a
/// transaction) within `timeouts.login` of connecting: 421 closes the channel (RFC 5321 §3.8),
/// 4.4.2 as for the idle timeout (RFC 3463), the text telling the two apart.
pub fn login_timeout(hostname: &str) -> Vec<u8> {
    format!(
        "421 4.4.2 {} Error: login timeout exceeded, closing transmission channel\r\n",
        reply_text(hostname)
    )
    .into_bytes()
}

/// Graceful shutdown: sent on the next command (RFC 5321 §3.8: 421 may answer any command).
pub fn shutting_down(hostname: &str) -> Vec<u8> {
    format!(
        "421 4.3.2 {} Service shutting down, closing transmission channel\r\n",
        reply_text(hostname)
    )
    .into_bytes()
}

/// Keeps configured text from breaking the reply line: no CR, LF or other controls.
fn reply_text(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_ascii_graphic() { c } else { '?' })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::smtp::reply::Reply;

    #[test]
    fn every_constant_reply_is_one_well_formed_line_with_an_enhanced_code() {
        for raw in [
            STARTTLS_READY,
            MUST_STARTTLS,
            TLS_ALREADY_ACTIVE,
            STARTTLS_SYNTAX,
            REQUIRETLS_UNSUPPORTED,
            COMMAND_NOT_RECOGNIZED,
            LINE_TOO_LONG,
            AUTH_LINE_TOO_LONG,
            BARE_CR_IN_COMMAND,
            BARE_LF_IN_COMMAND,
            NUL_IN_COMMAND,
            OK,
            NEED_MAIL,
            MAIL_SYNTAX,
            BDAT_SYNTAX,
            SEND_EHLO_FIRST,
            ALREADY_AUTHENTICATED,
            BDAT_NOT_SUPPORTED,
            BARE_LINE_ENDING,
            CLOSING,
            AUTH_REQUIRED,
            MECHANISM_NOT_ROUTABLE,
            AUTH_CANCELLED,
            AUTH_FAILED,
            AUTH_UNAVAILABLE,
        ] {
            let reply = Reply::parse(raw).unwrap();
            assert!(reply.enhanced_status().is_some(), "{raw:?}");
            assert!(raw.len() <= 512);
        }
    }

    #[test]
    fn hostname_replies_carry_the_hostname_and_cannot_be_split() {
        assert_eq!(
            greeting("mx.example.test"),
            b"220 mx.example.test ESMTP\r\n"
        );
        let evil = "mx\r\n250 injected";
        for raw in [
            greeting(evil),
            backend_unavailable(evil),
            backend_error(evil),
            timeout(evil),
            shutting_down(evil),
            helo_reply(evil),
            closing_after_refusal(evil),
            too_many_connections(evil),
        ] {
            assert!(Reply::parse(&raw).is_some(), "{raw:?}");
            assert_eq!(raw.iter().filter(|&&b| b == b'\n').count(), 1);
        }
        let ehlo = cleartext_ehlo(evil);
        let reply = Reply::parse(&ehlo).unwrap();
        assert_eq!(reply.code(), 250);
        assert_eq!(
            reply.lines().collect::<Vec<_>>(),
            [
                &b"mx??250?injected"[..],
                b"PIPELINING",
                b"ENHANCEDSTATUSCODES",
                b"STARTTLS"
            ]
        );
        assert_eq!(ehlo.iter().filter(|&&b| b == b'\n').count(), 4);
        assert!(backend_unavailable("h").starts_with(b"421 4.4.1 h "));
        assert!(timeout("h").starts_with(b"421 4.4.2 h "));
        assert!(shutting_down("h").starts_with(b"421 4.3.2 h "));
    }

    #[test]
    fn a_lookup_refusal_keeps_a_valid_code_and_a_clean_text() {
        assert_eq!(
            auth_refused(None, "Invalid login or password"),
            b"535 5.7.8 Invalid login or password\r\n"
        );
        assert_eq!(auth_refused(Some("535 5.7.0"), "Bad"), b"535 5.7.0 Bad\r\n");
        assert_eq!(
            auth_refused(Some("451 4.3.0"), "later"),
            b"451 4.3.0 later\r\n"
        );
        for bad in [
            "250 2.0.0",
            "535 4.7.0",
            "535",
            "53 5.7.0",
            "535 5.7",
            "535 5.7.0.1",
            "535 5.7.0\r\n250 x",
            "535 5.7.0000",
        ] {
            assert!(
                auth_refused(Some(bad), "x").starts_with(b"535 5.7.8 x"),
                "{bad:?}"
            );
        }
        let evil = auth_refused(None, "no\r\n235 2.7.0 ok");
        // The CR LF are dropped: one line, which no client reads as a second reply.
        assert_eq!(evil, b"535 5.7.8 no235 2.7.0 ok\r\n");
        assert_eq!(
            auth_refused(None, " "),
            b"535 5.7.8 Authentication credentials invalid\r\n"
        );
        let long = auth_refused(None, &"x".repeat(2000));
        assert!(long.len() <= 512 && Reply::parse(&long).is_some());
    }

    #[test]
    fn the_routed_ehlo_offers_only_what_any_backend_honours() {
        let ehlo = routed_ehlo("mx\r\n250 injected");
        let reply = Reply::parse(&ehlo).unwrap();
        assert_eq!(
            reply.lines().collect::<Vec<_>>(),
            [&b"mx??250?injected"[..], b"PIPELINING", b"AUTH PLAIN"]
        );
    }
}
