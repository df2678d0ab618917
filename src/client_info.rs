//! Telling the backend who the client is, in the backend's own protocol
//! (`listeners[].backend_client_info`), for backends that do not read a PROXY v2 header but
//! trust mailfront's address: Postfix `smtpd_authorized_xclient_hosts` (SMTP XCLIENT),
//! Dovecot `login_trusted_networks` (POP3 XCLIENT, IMAP ID `x-originating-*`).
//!
//! The pieces here are shared by the three protocols and pure: address forms, xtext, the IMAP
//! ID fields, and the once-per-listener notices. Each protocol sends them where its exchange
//! allows: [`crate::smtp::xclient`], [`crate::pop3::prelogin`], [`crate::imap::prelogin`].
//! The address is always [`crate::session::Session::client_addr`]: the PROXY header's source
//! on listeners with `proxy_protocol_from`, the socket's peer otherwise.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};

/// The `ADDR` value of Postfix's XCLIENT: IPv6 addresses carry the `IPV6:` prefix of RFC 5321
/// §4.1.3 address literals (Postfix XCLIENT_README: "the IPV6: prefix is required").
pub fn smtp_xclient_addr(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("IPV6:{v6}"),
    }
}

/// xtext (RFC 3461 §4): `+`, `=`, controls, space and non-ASCII as `+XX`. XCLIENT values are
/// xtext (Postfix XCLIENT_README), and a client's EHLO name may hold any of those.
pub fn xtext(value: &[u8]) -> String {
    let mut out = String::with_capacity(value.len());
    for &b in value {
        if (b'!'..=b'~').contains(&b) && b != b'+' && b != b'=' {
            out.push(char::from(b));
        } else {
            // Writing to a String cannot fail.
            let _ = write!(out, "+{b:02X}");
        }
    }
    out
}

/// Longest session id sent (Dovecot takes up to 64 octets as `x-session-id`).
pub const SESSION_ID_LEN: usize = 16;

/// A fresh session id for the backend's logs: 16 characters of base62 from the process's
/// random source. Random rather than counted, so ids from several replicas do not collide.
pub fn new_session_id() -> String {
    const ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    (0..SESSION_ID_LEN)
        .map(|_| {
            let i = fastrand::usize(..ALPHABET.len());
            char::from(ALPHABET.get(i).copied().unwrap_or(b'0'))
        })
        .collect()
}

/// The ID fields Dovecot reads from a trusted proxy (`login_trusted_networks`): the client's
/// address and port, the address it connected to, and a session id for both sides' logs.
/// Sent beside mailfront's `tls` in the first ID of the connection; the same names from a
/// client are stripped ([`crate::imap::id::is_reserved_field`]).
pub fn imap_id_fields(
    client: SocketAddr,
    local: SocketAddr,
    session_id: &str,
) -> Vec<(&'static str, String)> {
    vec![
        ("x-originating-ip", client.ip().to_string()),
        ("x-originating-port", client.port().to_string()),
        ("x-connected-ip", local.ip().to_string()),
        ("x-connected-port", local.port().to_string()),
        ("x-session-id", session_id.to_owned()),
    ]
}

/// POP3 XCLIENT (Dovecot's pop3-login, offered by the greeting's `[XCLIENT]` code to `login_trusted_networks`): the
/// client's address and port. Dovecot parses `ADDR` as a bare address, no `IPV6:` prefix.
pub fn pop3_xclient_command(client: SocketAddr) -> Vec<u8> {
    format!("XCLIENT ADDR={} PORT={}\r\n", client.ip(), client.port()).into_bytes()
}

/// Something worth one log line per listener, not one per session: a backend that does not
/// offer, or refuses, what `backend_client_info` needs is a configuration matter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notice {
    NotOffered,
    Refused,
}

/// The notices a listener has logged already.
#[derive(Debug, Default)]
pub struct Notices {
    not_offered: AtomicBool,
    refused: AtomicBool,
}

impl Notices {
    /// True the first time `notice` is raised on this listener.
    pub fn first(&self, notice: Notice) -> bool {
        let flag = match notice {
            Notice::NotOffered => &self.not_offered,
            Notice::Refused => &self.refused,
        };
        !flag.swap(true, Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xtext_encodes_plus_equals_controls_space_and_8bit() {
        assert_eq!(xtext(b"client.example"), "client.example");
        assert_eq!(xtext(b"[192.0.2.1]"), "[192.0.2.1]");
        assert_eq!(xtext(b"a+b=c d"), "a+2Bb+3Dc+20d");
        assert_eq!(xtext(b"\x01\x7f\xc3\xa9"), "+01+7F+C3+A9");
        assert_eq!(xtext(b""), "");
    }

    #[test]
    fn addresses_take_the_form_each_backend_parses() {
        let v4: IpAddr = "192.0.2.1".parse().unwrap();
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        assert_eq!(smtp_xclient_addr(v4), "192.0.2.1");
        assert_eq!(smtp_xclient_addr(v6), "IPV6:2001:db8::1");
        assert_eq!(
            pop3_xclient_command(SocketAddr::new(v6, 40000)),
            b"XCLIENT ADDR=2001:db8::1 PORT=40000\r\n"
        );
        assert_eq!(
            pop3_xclient_command(SocketAddr::new(v4, 1)),
            b"XCLIENT ADDR=192.0.2.1 PORT=1\r\n"
        );
    }

    #[test]
    fn id_fields_name_both_ends_and_the_session() {
        let fields = imap_id_fields(
            "192.0.2.1:40000".parse().unwrap(),
            "[2001:db8::2]:993".parse().unwrap(),
            "abc",
        );
        assert_eq!(
            fields,
            vec![
                ("x-originating-ip", "192.0.2.1".to_owned()),
                ("x-originating-port", "40000".to_owned()),
                ("x-connected-ip", "2001:db8::2".to_owned()),
                ("x-connected-port", "993".to_owned()),
                ("x-session-id", "abc".to_owned()),
            ]
        );
        for (field, _) in &fields {
            assert!(crate::imap::id::is_reserved_field(field.as_bytes()));
        }
    }

    #[test]
    fn session_ids_are_short_alphanumeric_and_differ() {
        let a = new_session_id();
        assert_eq!(a.len(), SESSION_ID_LEN);
        assert!(a.bytes().all(|b| b.is_ascii_alphanumeric()));
        assert_ne!(a, new_session_id());
    }

    #[test]
    fn each_notice_is_raised_once_per_listener() {
        let notices = Notices::default();
        assert!(notices.first(Notice::NotOffered));
        assert!(!notices.first(Notice::NotOffered));
        assert!(notices.first(Notice::Refused));
        assert!(!notices.first(Notice::Refused));
    }
}
