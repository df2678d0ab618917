//! XCLIENT to the backend (Postfix `XCLIENT_README`), sent by mailfront itself when
//! `backend_client_info` is on and the backend's EHLO offers it, so Postfix logs, throttles and
//! checks the real client instead of mailfront. A client's own XCLIENT is refused elsewhere
//! ([`crate::smtp::policy`]) and the keyword is removed from the EHLO the client sees.
//!
//! Sequence (driven by [`crate::smtp::session`]): the client's EHLO goes to the backend; if its
//! 250 lists XCLIENT, mailfront sends `XCLIENT ADDR=… PORT=… HELO=… PROTO=…` (and DESTADDR,
//! DESTPORT where listed), reads the new 220 greeting, and repeats the client's EHLO; the client
//! sees only that last EHLO reply. Postfix resets its session on XCLIENT, like a new connection.

use std::net::SocketAddr;

use crate::client_info::{plain_ip, smtp_xclient_addr, xtext};
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
pub struct XclientFacts<'a> {
    pub client: SocketAddr,
    /// The address the client connected to.
    pub local: SocketAddr,
    /// The client's own EHLO name, as it sent it.
    pub helo: &'a [u8],
    /// The client said EHLO (ESMTP) rather than HELO.
    pub esmtp: bool,
}

/// Longest XCLIENT line built: Postfix's `line_length_limit` default is 2048, and a HELO name
/// past 255 octets (RFC 1035 §2.3.4) is not a name anyway.
const MAX_HELO: usize = 255;

/// `XCLIENT ADDR=… PORT=… HELO=… PROTO=…[ DESTADDR=… DESTPORT=…]\r\n` with only the attributes
/// the backend listed, values xtext-encoded. `None` when the backend lists none of them.
pub fn command(offered: &[String], facts: &XclientFacts<'_>) -> Option<Vec<u8>> {
    let has = |name: &str| offered.iter().any(|o| o == name);
    let mut parts: Vec<String> = Vec::new();
    if has("ADDR") {
        parts.push(format!(
            "ADDR={}",
            xtext(smtp_xclient_addr(facts.client.ip()).as_bytes())
        ));
    }
    if has("PORT") {
        parts.push(format!("PORT={}", facts.client.port()));
    }
    if has("HELO") && !facts.helo.is_empty() && facts.helo.len() <= MAX_HELO {
        parts.push(format!("HELO={}", xtext(facts.helo)));
    }
    if has("PROTO") {
        parts.push(format!(
            "PROTO={}",
            if facts.esmtp { "ESMTP" } else { "SMTP" }
        ));
    }
    if has("DESTADDR") {
        let dest = match plain_ip(facts.local.ip()) {
            std::net::IpAddr::V6(v6) => format!("IPV6:{v6}"),
            v4 => v4.to_string(),
        };
        parts.push(format!("DESTADDR={}", xtext(dest.as_bytes())));
    }
    if has("DESTPORT") {
        parts.push(format!("DESTPORT={}", facts.local.port()));
    }
    if parts.is_empty() {
        return None;
    }
    Some(format!("XCLIENT {}\r\n", parts.join(" ")).into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(raw: &[u8]) -> Reply {
        Reply::parse(raw).unwrap()
    }

    fn facts<'a>(helo: &'a [u8]) -> XclientFacts<'a> {
        XclientFacts {
            client: "192.0.2.1:40000".parse().unwrap(),
            local: "198.51.100.2:587".parse().unwrap(),
            helo,
            esmtp: true,
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
    fn the_line_carries_only_what_the_backend_lists() {
        let all: Vec<String> = "NAME ADDR PROTO HELO REVERSE_NAME PORT LOGIN DESTADDR DESTPORT"
            .split(' ')
            .map(str::to_owned)
            .collect();
        assert_eq!(
            command(&all, &facts(b"client.example")).unwrap(),
            b"XCLIENT ADDR=192.0.2.1 PORT=40000 HELO=client.example PROTO=ESMTP DESTADDR=198.51.100.2 DESTPORT=587\r\n"
        );
        let older: Vec<String> = vec!["NAME".into(), "ADDR".into(), "PROTO".into(), "HELO".into()];
        assert_eq!(
            command(&older, &facts(b"client.example")).unwrap(),
            b"XCLIENT ADDR=192.0.2.1 HELO=client.example PROTO=ESMTP\r\n"
        );
        assert_eq!(command(&["NAME".to_owned()], &facts(b"x")), None);
    }

    #[test]
    fn values_that_need_it_are_xtext_and_ipv6_has_its_prefix() {
        let mut f = facts(b"we+ird=name \xc3\xa9");
        f.client = "[2001:db8::1]:1".parse().unwrap();
        f.local = "[::ffff:198.51.100.2]:465".parse().unwrap();
        f.esmtp = false;
        let all: Vec<String> = ["ADDR", "PORT", "HELO", "PROTO", "DESTADDR", "DESTPORT"]
            .map(str::to_owned)
            .to_vec();
        assert_eq!(
            String::from_utf8(command(&all, &f).unwrap()).unwrap(),
            "XCLIENT ADDR=IPV6:2001:db8::1 PORT=1 HELO=we+2Bird+3Dname+20+C3+A9 PROTO=SMTP DESTADDR=198.51.100.2 DESTPORT=465\r\n"
        );
        // No HELO attribute for an empty or absurdly long name.
        let long = vec![b'a'; 300];
        let line = command(&all, &facts(&long)).unwrap();
        assert!(!String::from_utf8(line).unwrap().contains("HELO="));
    }
}
