//! Responses mailfront writes to POP3 clients itself (RFC 1939 §3; RFC 2449 §8 and RFC 3206
//! response codes).

/// USER, PASS, APOP or AUTH before TLS: one fixed answer whatever the credential
/// (RFC 8314 §4.1; `[AUTH]` per RFC 3206, wording after Dovecot's). No `+OK` to USER either,
/// because pipelining clients send `USER x\r\nPASS y` together.
pub fn err_cleartext_auth() -> Vec<u8> {
    b"-ERR [AUTH] Cleartext authentication disallowed; issue STLS first\r\n".to_vec()
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

/// Too many commands before authentication (`limits.preauth_commands`).
pub fn err_too_many_commands() -> Vec<u8> {
    b"-ERR Too many commands before authentication\r\n".to_vec()
}

/// The proxy is shutting down.
pub fn err_shutdown() -> Vec<u8> {
    b"-ERR [SYS/TEMP] Server shutting down\r\n".to_vec()
}
