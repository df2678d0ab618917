//! The demo's cleartext SMTP submission server, behind mailfront's 465 and 587 listeners:
//! EHLO/HELO, AUTH PLAIN and LOGIN (user demo), MAIL, RCPT, DATA, RSET, NOOP, QUIT. Every
//! accepted message goes to the one mailbox as mailfront delivered it, Received field
//! included, and that field is logged.

use std::sync::Arc;

use tokio::io::AsyncWriteExt;

use super::io::{self, MAX_LINE, Session};
use super::store::{MAX_MESSAGE, Mailbox, split};

/// A DATA line may be longer than a command: RFC 5321 §4.5.3.1.6 allows 1000 octets, and
/// clients send longer ones anyway; the message as a whole is bounded by [`MAX_MESSAGE`].
const MAX_DATA_LINE: usize = 64 * 1024;

/// One SMTP session.
pub async fn serve(mut s: Session, mailbox: Arc<Mailbox>) -> std::io::Result<()> {
    s.get_mut()
        .write_all(b"220 smtp.demo ESMTP mailfront demo SMTP server\r\n")
        .await?;
    let mut authenticated = false;
    let mut from = false;
    let mut recipients = 0usize;
    while let Some(line) = io::read_line(&mut s, MAX_LINE).await? {
        let line = io::text(&line);
        let (verb, rest) = io::verb(&line);
        let reply: String = match verb.as_str() {
            "EHLO" => {
                from = false;
                recipients = 0;
                format!(
                    "250-smtp.demo\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-ENHANCEDSTATUSCODES\r\n250-SIZE {MAX_MESSAGE}\r\n250 AUTH PLAIN LOGIN\r\n"
                )
            }
            "HELO" => {
                from = false;
                recipients = 0;
                "250 smtp.demo\r\n".into()
            }
            "AUTH" if authenticated => "503 5.5.1 Already authenticated\r\n".into(),
            "AUTH" => {
                authenticated = auth(&mut s, rest).await?;
                if authenticated {
                    tracing::info!("demo SMTP server: user demo logged in");
                    "235 2.7.0 Authentication successful\r\n".into()
                } else {
                    "535 5.7.8 Authentication failed (user demo, password demo)\r\n".into()
                }
            }
            "MAIL" if !authenticated => "530 5.7.0 Authentication required\r\n".into(),
            "MAIL" => {
                from = true;
                recipients = 0;
                "250 2.1.0 Ok\r\n".into()
            }
            "RCPT" if !from => "503 5.5.1 MAIL first\r\n".into(),
            "RCPT" => {
                recipients += 1;
                "250 2.1.5 Ok (every message goes to the demo mailbox)\r\n".into()
            }
            "DATA" if recipients == 0 => "503 5.5.1 RCPT first\r\n".into(),
            "DATA" => {
                s.get_mut()
                    .write_all(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                    .await?;
                from = false;
                recipients = 0;
                match read_data(&mut s).await? {
                    Some(message) => store(&mailbox, message),
                    None => "552 5.3.4 Message too big for the demo\r\n".into(),
                }
            }
            "RSET" => {
                from = false;
                recipients = 0;
                "250 2.0.0 Ok\r\n".into()
            }
            "NOOP" => "250 2.0.0 Ok\r\n".into(),
            "QUIT" => {
                s.get_mut().write_all(b"221 2.0.0 Bye\r\n").await?;
                return Ok(());
            }
            _ => "502 5.5.2 Not implemented by the demo server\r\n".into(),
        };
        s.get_mut().write_all(reply.as_bytes()).await?;
    }
    Ok(())
}

/// AUTH PLAIN or LOGIN (RFC 4954), with or without an initial response. `true`: user demo with
/// its password.
async fn auth(s: &mut Session, args: &str) -> std::io::Result<bool> {
    let (mechanism, initial) = io::verb(args);
    let initial = Some(initial).filter(|i| !i.is_empty());
    match mechanism.as_str() {
        "PLAIN" => {
            let response = match initial {
                Some(response) => response.to_owned(),
                None => challenge(s, "").await?,
            };
            Ok(io::plain_ok(&response))
        }
        "LOGIN" => {
            let user = match initial {
                Some(user) => user.to_owned(),
                None => challenge(s, "Username:").await?,
            };
            let password = challenge(s, "Password:").await?;
            Ok(
                match (io::base64_decode(&user), io::base64_decode(&password)) {
                    (Some(user), Some(password)) => io::credentials_ok(&user, &password),
                    _ => false,
                },
            )
        }
        _ => Ok(false),
    }
}

/// Sends a `334` challenge and reads the client's response line.
async fn challenge(s: &mut Session, prompt: &str) -> std::io::Result<String> {
    let line = format!("334 {}\r\n", io::base64_encode(prompt.as_bytes()));
    s.get_mut().write_all(line.as_bytes()).await?;
    let response = io::read_line(s, MAX_LINE).await?.unwrap_or_default();
    Ok(io::text(&response))
}

/// Reads DATA content up to the lone `.` (RFC 5321 §4.1.1.4), undoing dot-stuffing. `None`: over
/// [`MAX_MESSAGE`] (read to its end all the same, so the session stays in step).
async fn read_data(s: &mut Session) -> std::io::Result<Option<Vec<u8>>> {
    let mut message = Vec::new();
    let mut too_big = false;
    loop {
        let Some(line) = io::read_line(s, MAX_DATA_LINE).await? else {
            return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
        };
        if line == b".\r\n" {
            break;
        }
        let line = line.strip_prefix(b".").unwrap_or(&line);
        if message.len() + line.len() > MAX_MESSAGE {
            too_big = true;
        }
        if !too_big {
            message.extend_from_slice(line);
        }
    }
    Ok((!too_big).then_some(message))
}

/// Adds a message to the mailbox and logs the Received field it arrived with.
fn store(mailbox: &Mailbox, message: Vec<u8>) -> String {
    let received = received_field(&message);
    let size = message.len();
    match mailbox.add(message) {
        Some(number) => {
            tracing::info!(
                number,
                size,
                received = received.as_deref().unwrap_or("none"),
                "demo SMTP server: message stored; read it with POP3 RETR {number} or IMAP FETCH {number}"
            );
            format!("250 2.0.0 Ok: stored as message {number}\r\n")
        }
        None => "452 4.3.1 The demo mailbox is full: restart the demo\r\n".into(),
    }
}

/// The first Received field of a message's header, unfolded.
fn received_field(message: &[u8]) -> Option<String> {
    let (header, _) = split(message);
    let header = String::from_utf8_lossy(header);
    let mut field: Option<String> = None;
    for line in header.split("\r\n") {
        match &mut field {
            Some(f) if line.starts_with([' ', '\t']) => {
                f.push(' ');
                f.push_str(line.trim());
            }
            Some(_) => break,
            None if line.len() > 9
                && line
                    .get(..9)
                    .is_some_and(|n| n.eq_ignore_ascii_case("received:")) =>
            {
                field = Some(line.to_owned());
            }
            None => {}
        }
    }
    field
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_received_field_is_unfolded() {
        let message = b"Received: from a (b [c])\r\n\tby d (mailfront) with ESMTPSA id x\r\n\ttls TLS_AES_128_GCM_SHA256 group X25519MLKEM768;\r\n\tMon, 1 Jan 2026 00:00:00 +0000\r\nSubject: s\r\n\r\nbody\r\nReceived: no\r\n";
        assert_eq!(
            received_field(message).unwrap(),
            "Received: from a (b [c]) by d (mailfront) with ESMTPSA id x tls TLS_AES_128_GCM_SHA256 group X25519MLKEM768; Mon, 1 Jan 2026 00:00:00 +0000"
        );
        assert_eq!(received_field(b"Subject: s\r\n\r\nReceived: x\r\n"), None);
    }
}
