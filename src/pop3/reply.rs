//! Responses mailfront writes to POP3 clients itself (RFC 1939 §3; RFC 2449 §8 and RFC 3206
//! response codes).

/// USER, PASS, APOP or AUTH before TLS: one fixed answer whatever the credential
/// (RFC 8314 §4.1; `[AUTH]` per RFC 3206, wording after Dovecot's). No `+OK` to USER either,
/// because pipelining clients send `USER x\r\nPASS y` together.
pub fn err_cleartext_auth() -> Vec<u8> {
    b"-ERR [AUTH] Cleartext authentication disallowed; issue STLS first\r\n".to_vec()
}

/// The greeting on a `starttls` listener, written before any backend exists. No APOP
/// timestamp (RFC 1939 §7): it would have to be the backend's, and there is no backend yet.
pub fn greeting(hostname: &str) -> Vec<u8> {
    format!("+OK {hostname} ready\r\n").into_bytes()
}

/// CAPA before STLS (RFC 2449 §5): only STLS, the one thing mailfront can truthfully offer
/// without the backend. After STLS the client must ask again (RFC 2595 §4) and then sees the
/// backend's list.
pub fn capa_before_tls() -> Vec<u8> {
    b"+OK Capability list follows\r\nSTLS\r\n.\r\n".to_vec()
}

/// PASS with no USER before it (RFC 1939 §7: PASS only right after a successful USER).
pub fn err_no_user() -> Vec<u8> {
    b"-ERR No user name given\r\n".to_vec()
}

/// USER over TLS before the backend is connected (RFC 1939 §7): remembered, and sent to the
/// backend right before the PASS that needs it.
pub fn user_ok() -> Vec<u8> {
    b"+OK\r\n".to_vec()
}

/// QUIT before STLS (RFC 1939 §6: no UPDATE state without a login).
pub fn quit_ok() -> Vec<u8> {
    b"+OK Logging out\r\n".to_vec()
}

/// NOOP or RSET before login: RFC 1939 §5 allows them only in the TRANSACTION state.
pub fn err_not_authorized_yet() -> Vec<u8> {
    b"-ERR Command not valid before authentication\r\n".to_vec()
}

/// APOP on any listener: the client never saw the backend's timestamp (RFC 1939 §7), only
/// mailfront's greeting, which has none.
pub fn err_apop_unavailable() -> Vec<u8> {
    b"-ERR APOP not available here; use USER/PASS or AUTH\r\n".to_vec()
}

/// STLS accepted: TLS starts right after this CRLF (RFC 2595 §4).
pub fn stls_ok() -> Vec<u8> {
    b"+OK Begin TLS negotiation\r\n".to_vec()
}

/// STLS when TLS is already active (RFC 2595 §4 example wording).
pub fn stls_refused() -> Vec<u8> {
    b"-ERR Command not permitted when TLS active\r\n".to_vec()
}

/// STLS with arguments.
pub fn stls_malformed() -> Vec<u8> {
    b"-ERR STLS takes no arguments\r\n".to_vec()
}

/// XCLIENT / XOIP from a client: they would be trusted as coming from mailfront.
pub fn err_not_permitted() -> Vec<u8> {
    b"-ERR Command not permitted\r\n".to_vec()
}

/// The backend cannot be reached or broke the protocol (RFC 3206 SYS/TEMP).
pub fn err_unavailable() -> Vec<u8> {
    b"-ERR [SYS/TEMP] Server temporarily unavailable\r\n".to_vec()
}

/// The client was silent too long before authenticating.
pub fn err_idle_timeout() -> Vec<u8> {
    b"-ERR Disconnected for inactivity\r\n".to_vec()
}

/// The client had not authenticated within `timeouts.login` of connecting, however busy it
/// was. No RFC 2449 response code: nothing about it is temporary or the server's.
pub fn err_login_timeout() -> Vec<u8> {
    b"-ERR Disconnected: login took too long\r\n".to_vec()
}

/// Too many commands before authentication (`limits.preauth_commands`).
pub fn err_too_many_commands() -> Vec<u8> {
    b"-ERR Too many commands before authentication\r\n".to_vec()
}

/// The client's address already holds `limits.connections_per_ip` sessions that have not
/// logged in: the greeting is this `-ERR` instead (RFC 1939 §4 allows a negative greeting;
/// RFC 3206 SYS/TEMP: try again later).
pub fn err_too_many_connections() -> Vec<u8> {
    b"-ERR [SYS/TEMP] Too many connections from your address\r\n".to_vec()
}

/// PASS, APOP or AUTH from an address with `limits.auth_failures_per_ip` failed logins in its
/// window: answered here, never forwarded. SYS/TEMP (RFC 3206 §4) says the failure is
/// temporary and not about these credentials; `[AUTH]` would tell the user the password is
/// wrong.
pub fn err_auth_throttled() -> Vec<u8> {
    b"-ERR [SYS/TEMP] Too many failed logins, try again later\r\n".to_vec()
}

/// The proxy is shutting down.
pub fn err_shutdown() -> Vec<u8> {
    b"-ERR [SYS/TEMP] Server shutting down\r\n".to_vec()
}

/// CAPA on a listener that routes by user while its sessions learned nothing of the backends
/// yet: only what mailfront can honour with any POP3 backend, since it never connects to learn
/// more. USER/PASS is the one login every RFC 1939 server takes (§7); SASL (RFC 5034) is
/// optional, so no mechanism is offered; TOP, UIDL and PIPELINING concern the TRANSACTION
/// state, which is the backend's, and are left out rather than promised (RFC 2449 §5: a client
/// asks CAPA again after login).
pub fn capa_routed_default() -> Vec<u8> {
    b"+OK Capability list follows\r\nUSER\r\n.\r\n".to_vec()
}

/// The answer to `AUTH` with no argument (the RFC 1734-style mechanism list Dovecot answers),
/// written here on a listener that routes by user.
pub fn mechanism_list<'a>(mechanisms: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut out = b"+OK\r\n".to_vec();
    for mechanism in mechanisms {
        out.extend_from_slice(mechanism);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
    out
}

/// AUTH naming a mechanism a listener that routes by user cannot route (CRAM-MD5, EXTERNAL, …):
/// RFC 5034 §4, an unsupported mechanism gets a negative response.
pub fn err_mechanism_unsupported() -> Vec<u8> {
    b"-ERR Unsupported authentication mechanism\r\n".to_vec()
}

/// An empty server challenge (RFC 5034 §4: `+` SP and the base64 challenge, here none), written
/// by mailfront to get the client's first response before any backend is chosen.
pub fn sasl_empty_challenge() -> Vec<u8> {
    b"+ \r\n".to_vec()
}

/// The LOGIN mechanism's first challenge, `Username:` in base64 (draft-murchison-sasl-login
/// §2.1), played by mailfront as nginx does.
pub fn sasl_username_challenge() -> Vec<u8> {
    b"+ VXNlcm5hbWU6\r\n".to_vec()
}

/// The LOGIN mechanism's second challenge, `Password:` in base64.
pub fn sasl_password_challenge() -> Vec<u8> {
    b"+ UGFzc3dvcmQ6\r\n".to_vec()
}

/// The client answered a challenge of mailfront's own with `*`: RFC 5034 §4, the server
/// rejects the AUTH command with a negative response. No credential was checked.
pub fn err_auth_cancelled() -> Vec<u8> {
    b"-ERR Authentication cancelled\r\n".to_vec()
}

/// The client answered a challenge of mailfront's own with a line that is not base64
/// (RFC 5034 §4: responses are base64).
pub fn err_sasl_response_invalid() -> Vec<u8> {
    b"-ERR Invalid base64 in the response\r\n".to_vec()
}

/// A login whose user name cannot be read (a malformed PLAIN message, OAUTHBEARER without
/// `a=`): it cannot be routed, and it is answered as the failed login it is (RFC 3206 AUTH).
pub fn err_auth_failed() -> Vec<u8> {
    b"-ERR [AUTH] Authentication failed\r\n".to_vec()
}

/// `user_lookup` refused the login (its `Auth-Status`): RFC 3206 AUTH, with the lookup's text
/// kept to printable ASCII and [`crate::machine::MAX_REFUSAL_TEXT`] octets, whatever reached the machine.
pub fn err_login_refused(text: &str) -> Vec<u8> {
    let text = crate::machine::refusal_text(text, "Authentication failed");
    format!("-ERR [AUTH] {text}\r\n").into_bytes()
}
