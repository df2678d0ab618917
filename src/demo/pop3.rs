//! The demo's cleartext POP3 server, behind mailfront's 995 listener (RFC 1939, CAPA from RFC
//! 2449, AUTH PLAIN from RFC 5034): USER/PASS or AUTH PLAIN as user demo, then STAT, LIST,
//! UIDL, RETR, TOP, NOOP, RSET, QUIT. Message 1 is a welcome message; the messages submitted
//! through mailfront follow. Nothing is ever deleted.

use std::sync::Arc;

use tokio::io::AsyncWriteExt;

use super::io::{self, MAX_LINE, Session};
use super::store::{self, Mailbox};

const WELCOME: &str = "\
You read this through mailfront: TLS from your client to mailfront's POP3 listener, cleartext
from mailfront to this demo POP3 server.

Messages 2 and on are the ones you submitted through mailfront's SMTP listeners (465 with
implicit TLS, 587 with STARTTLS). Each starts with the Received field mailfront added, which
names the TLS version's cipher and key exchange group that protected the submission (RFC 8314
section 4.3), for example:

  Received: from [127.0.0.1] (localhost [127.0.0.1])
          by mailfront.demo (mailfront) with ESMTPSA id 4LZ1qk0xA2bC
          tls TLS_AES_256_GCM_SHA384 group X25519MLKEM768;
          Mon, 23 Nov 2026 12:00:00 +0000

Over IMAP (port 993 in production), message 1 shows what mailfront told the IMAP server about
the TLS of your session.
";

/// One POP3 session.
pub async fn serve(mut s: Session, mailbox: Arc<Mailbox>) -> std::io::Result<()> {
    s.get_mut()
        .write_all(b"+OK mailfront demo POP3 server ready\r\n")
        .await?;
    let mut user: Option<String> = None;
    let mut messages: Option<Vec<Arc<[u8]>>> = None;
    while let Some(line) = io::read_line(&mut s, MAX_LINE).await? {
        let line = io::text(&line);
        let (verb, rest) = io::verb(&line);
        let reply: Vec<u8> = match (verb.as_str(), &messages) {
            ("CAPA", _) => {
                b"+OK Capability list follows\r\nUSER\r\nSASL PLAIN\r\nUIDL\r\nTOP\r\n.\r\n"
                    .to_vec()
            }
            ("QUIT", _) => {
                s.get_mut().write_all(b"+OK Bye\r\n").await?;
                return Ok(());
            }
            ("NOOP", _) => b"+OK\r\n".to_vec(),
            ("USER", None) => {
                user = Some(rest.to_owned());
                b"+OK\r\n".to_vec()
            }
            ("PASS", None) => {
                let ok = user
                    .take()
                    .is_some_and(|u| io::credentials_ok(u.as_bytes(), rest.as_bytes()));
                login(ok, &mut messages, &mailbox)
            }
            ("AUTH", None) => {
                let (mechanism, initial) = io::verb(rest);
                let ok = if mechanism == "PLAIN" {
                    let response = if initial.is_empty() {
                        s.get_mut().write_all(b"+ \r\n").await?;
                        io::text(&io::read_line(&mut s, MAX_LINE).await?.unwrap_or_default())
                    } else {
                        initial.to_owned()
                    };
                    io::plain_ok(&response)
                } else {
                    false
                };
                login(ok, &mut messages, &mailbox)
            }
            (_, None) => b"-ERR Log in first (user demo, password demo)\r\n".to_vec(),
            ("STAT", Some(m)) => {
                let size: usize = m.iter().map(|m| m.len()).sum();
                format!("+OK {} {size}\r\n", m.len()).into_bytes()
            }
            ("LIST" | "UIDL", Some(m)) => listing(&verb, rest, m),
            ("RETR", Some(m)) => match message(rest, m) {
                Some(message) => {
                    let mut out = format!("+OK {} octets\r\n", message.len()).into_bytes();
                    out.extend(dot_stuffed(message));
                    out
                }
                None => b"-ERR No such message\r\n".to_vec(),
            },
            ("TOP", Some(m)) => {
                let (number, lines) = rest.split_once(' ').unwrap_or((rest, "0"));
                match (message(number, m), lines.trim().parse::<usize>()) {
                    (Some(message), Ok(lines)) => {
                        let (header, body) = store::split(message);
                        let mut top = header.to_vec();
                        for line in body.split_inclusive(|&b| b == b'\n').take(lines) {
                            top.extend_from_slice(line);
                        }
                        let mut out = b"+OK\r\n".to_vec();
                        out.extend(dot_stuffed(&top));
                        out
                    }
                    _ => b"-ERR No such message\r\n".to_vec(),
                }
            }
            ("RSET", Some(_)) => b"+OK\r\n".to_vec(),
            ("DELE", Some(_)) => b"-ERR The demo keeps every message\r\n".to_vec(),
            _ => b"-ERR Not implemented by the demo server\r\n".to_vec(),
        };
        s.get_mut().write_all(&reply).await?;
    }
    Ok(())
}

/// After USER/PASS or AUTH: the maildrop as it is now, or a refusal.
fn login(ok: bool, messages: &mut Option<Vec<Arc<[u8]>>>, mailbox: &Mailbox) -> Vec<u8> {
    if !ok {
        return b"-ERR [AUTH] Authentication failed (user demo, password demo)\r\n".to_vec();
    }
    let maildrop = mailbox.snapshot(store::welcome(WELCOME));
    tracing::info!(
        messages = maildrop.len(),
        "demo POP3 server: user demo logged in"
    );
    let reply = format!("+OK Logged in, {} messages\r\n", maildrop.len());
    *messages = Some(maildrop);
    reply.into_bytes()
}

/// Message `number` (1-based) of the maildrop.
fn message<'m>(number: &str, messages: &'m [Arc<[u8]>]) -> Option<&'m [u8]> {
    let number: usize = number.trim().parse().ok()?;
    messages.get(number.checked_sub(1)?).map(|m| &**m)
}

/// LIST or UIDL, of one message or all (RFC 1939 §5 and §7).
fn listing(verb: &str, arg: &str, messages: &[Arc<[u8]>]) -> Vec<u8> {
    let entry = |n: usize, m: &[u8]| {
        if verb == "LIST" {
            format!("{n} {}", m.len())
        } else {
            format!("{n} demo-{n}")
        }
    };
    if arg.trim().is_empty() {
        let mut out = format!("+OK {} messages\r\n", messages.len());
        for (i, m) in messages.iter().enumerate() {
            out.push_str(&entry(i + 1, m));
            out.push_str("\r\n");
        }
        out.push_str(".\r\n");
        return out.into_bytes();
    }
    match (message(arg, messages), arg.trim().parse::<usize>()) {
        (Some(m), Ok(n)) => format!("+OK {}\r\n", entry(n, m)).into_bytes(),
        _ => b"-ERR No such message\r\n".to_vec(),
    }
}

/// A multi-line response body (RFC 1939 §3): lines starting with `.` get another, and the
/// terminating `.` line follows.
fn dot_stuffed(message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + 8);
    for line in message.split_inclusive(|&b| b == b'\n') {
        if line.starts_with(b".") {
            out.push(b'.');
        }
        out.extend_from_slice(line);
    }
    if !out.is_empty() && !out.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_stuffing() {
        assert_eq!(dot_stuffed(b"a\r\n.b\r\n"), b"a\r\n..b\r\n.\r\n");
        assert_eq!(dot_stuffed(b"a"), b"a\r\n.\r\n");
        assert_eq!(dot_stuffed(b""), b".\r\n");
    }

    #[test]
    fn listings() {
        let m: Vec<Arc<[u8]>> = vec![Arc::from(&b"ab"[..]), Arc::from(&b"cde"[..])];
        assert_eq!(
            listing("LIST", "", &m),
            b"+OK 2 messages\r\n1 2\r\n2 3\r\n.\r\n"
        );
        assert_eq!(listing("UIDL", "2", &m), b"+OK 2 demo-2\r\n");
        assert!(listing("LIST", "3", &m).starts_with(b"-ERR"));
        assert!(listing("LIST", "0", &m).starts_with(b"-ERR"));
        assert!(message("x", &m).is_none());
    }
}
