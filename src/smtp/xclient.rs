//! XCLIENT to the backend (Postfix `XCLIENT_README`), sent by mailfront itself when
//! `backend_client_info` is on and the backend's EHLO offers it, so Postfix logs, throttles and
//! checks the real client instead of mailfront. A client's own XCLIENT is refused elsewhere
//! ([`crate::smtp::policy`]) and the keyword is removed from the EHLO the client sees.
//!
//! Sequence (driven by [`crate::smtp::session`]): right after the backend's 220 and before any
//! client command, mailfront says `EHLO <its hostname>`; if the 250 lists XCLIENT, it sends
//! `XCLIENT NAME=[UNAVAILABLE] ADDR=… PORT=…` (and DESTADDR, DESTPORT where listed) and reads
//! the new 220 greeting: Postfix restarts its session on XCLIENT, like a new connection, and the
//! client's own HELO/EHLO (or none) follows. Nothing the client says is an attribute, so no
//! client text can make the line too long, and HELO or no EHLO at all gets the same identity.

use std::net::SocketAddr;

use crate::client_info::{smtp_xclient_addr, xtext};
use crate::smtp::reply::Reply;

/// The attributes a 250 EHLO reply lists after `XCLIENT`, upper-cased; `None` when XCLIENT is
/// not offered.
pub fn offered(ehlo: &Reply) -> Option<Vec<String>> {
    if ehlo.code() != 250 {
        return None;
    }
    ehlo.lines().skip(1).find_map(|text| {
        let mut words = text
            .split(|&b| b == b' ' || b == b'\t')
            .filter(|w| !w.is_empty());
        let keyword = words.next()?;
        keyword.eq_ignore_ascii_case(b"XCLIENT").then(|| {
            words
                .map(|w| String::from_utf8_lossy(w).to_ascii_uppercase())
                .collect()
        })
    })
}

/// What the XCLIENT line says.
#[derive(Debug, Clone)]
pub struct XclientFacts {
    pub client: SocketAddr,
    /// The address the client connected to.
    pub local: SocketAddr,
}

/// `NAME` when mailfront knows no verified name for the client: Postfix then logs and writes
/// `unknown[address]`, as for a client without reverse DNS (XCLIENT_README).
const NAME_UNAVAILABLE: &str = "[UNAVAILABLE]";

/// `XCLIENT NAME=[UNAVAILABLE] ADDR=… PORT=…[ DESTADDR=… DESTPORT=…]\r\n` with only the
/// attributes the backend listed, values xtext-encoded; well under 512 octets. `None` when the
/// backend does not list ADDR: the client's address, the one thing XCLIENT is for here, could
/// not be said. NAME is always sent where listed, or Postfix would keep mailfront's own
/// verified name for the client.
pub fn command(offered: &[String], facts: &XclientFacts) -> Option<Vec<u8>> {
    let has = |name: &str| offered.iter().any(|o| o == name);
    if !has("ADDR") {
        return None;
    }
    let mut parts: Vec<String> = Vec::new();
    if has("NAME") {
        parts.push(format!("NAME={NAME_UNAVAILABLE}"));
    }
    parts.push(format!(
        "ADDR={}",
        xtext(smtp_xclient_addr(facts.client.ip()).as_bytes())
    ));
    if has("PORT") {
        parts.push(format!("PORT={}", facts.client.port()));
    }
    if has("DESTADDR") {
        let dest = match facts.local.ip() {
            std::net::IpAddr::V6(v6) => format!("IPV6:{v6}"),
            v4 => v4.to_string(),
        };
        parts.push(format!("DESTADDR={}", xtext(dest.as_bytes())));
    }
    if has("DESTPORT") {
        parts.push(format!("DESTPORT={}", facts.local.port()));
    }
    Some(format!("XCLIENT {}\r\n", parts.join(" ")).into_bytes())
}

/// The name mailfront gives in its own EHLO: its hostname where that is a plain domain
/// (letters, digits, `-`, `.`; RFC 5321 §4.1.2 `Domain`, at most 255 octets), else
/// `localhost`, so the probe can never be a malformed line.
pub fn ehlo_name(hostname: &str) -> &str {
    let plain = !hostname.is_empty()
        && hostname.len() <= 255
        && hostname
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    if plain { hostname } else { "localhost" }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(raw: &[u8]) -> Reply {
        Reply::parse(raw).unwrap()
    }

    fn facts() -> XclientFacts {
        XclientFacts {
            client: "192.0.2.1:40000".parse().unwrap(),
            local: "198.51.100.2:587".parse().unwrap(),
        }
    }

    #[test]
    fn the_offered_attributes_are_read_from_the_ehlo_reply() {
        let ehlo = reply(
            b"250-mx.example\r\n250-PIPELINING\r\n250-XCLIENT NAME ADDR PROTO HELO REVERSE_NAME PORT LOGIN DESTADDR DESTPORT\r\n250 8BITMIME\r\n",
        );
        let got = offered(&ehlo).unwrap();
        assert_eq!(got.len(), 9);
        assert!(got.contains(&"DESTPORT".to_owned()));
        assert_eq!(
            offered(&reply(b"250-mx\r\n250 xclient addr\r\n")),
            Some(vec!["ADDR".to_owned()])
        );
        assert_eq!(offered(&reply(b"250-mx\r\n250 PIPELINING\r\n")), None);
        // The greeting line is not a keyword line.
        assert_eq!(offered(&reply(b"250 XCLIENT ADDR\r\n")), None);
        assert_eq!(offered(&reply(b"502 5.5.1 no\r\n")), None);
    }

    #[test]
    fn the_line_carries_only_what_the_backend_lists_and_always_a_name() {
        let all: Vec<String> = "NAME ADDR PROTO HELO REVERSE_NAME PORT LOGIN DESTADDR DESTPORT"
            .split(' ')
            .map(str::to_owned)
            .collect();
        assert_eq!(
            command(&all, &facts()).unwrap(),
            b"XCLIENT NAME=[UNAVAILABLE] ADDR=192.0.2.1 PORT=40000 DESTADDR=198.51.100.2 DESTPORT=587\r\n"
        );
        let older: Vec<String> = vec!["NAME".into(), "ADDR".into(), "PROTO".into(), "HELO".into()];
        assert_eq!(
            command(&older, &facts()).unwrap(),
            b"XCLIENT NAME=[UNAVAILABLE] ADDR=192.0.2.1\r\n"
        );
        // Without ADDR there is nothing to say.
        assert_eq!(
            command(&["NAME".to_owned(), "PORT".to_owned()], &facts()),
            None
        );
    }

    #[test]
    fn ipv6_has_its_prefix_and_ipv4_has_none() {
        let mut f = facts();
        f.client = "[2001:db8::1]:1".parse().unwrap();
        f.local = "198.51.100.2:465".parse().unwrap();
        let all: Vec<String> = ["NAME", "ADDR", "PORT", "DESTADDR", "DESTPORT"]
            .map(str::to_owned)
            .to_vec();
        assert_eq!(
            String::from_utf8(command(&all, &f).unwrap()).unwrap(),
            "XCLIENT NAME=[UNAVAILABLE] ADDR=IPV6:2001:db8::1 PORT=1 DESTADDR=198.51.100.2 DESTPORT=465\r\n"
        );
    }

    #[test]
    fn the_probe_ehlo_name_is_always_a_plain_domain() {
        assert_eq!(ehlo_name("mx.example.test"), "mx.example.test");
        assert_eq!(ehlo_name("bad name"), "localhost");
        assert_eq!(ehlo_name(""), "localhost");
        assert_eq!(ehlo_name(&"a".repeat(300)), "localhost");
    }
}
