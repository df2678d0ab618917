//! The fake POP3 backend.

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use super::{FakeOptions, RecordingStream, auth_gate, auth_plain_reply, delay_failure};

/// A small POP3 server: CAPA, USER/PASS, AUTH PLAIN, STAT, LIST, UIDL, RETR, QUIT.
pub(super) async fn fake_pop3(
    stream: RecordingStream,
    options: &FakeOptions,
) -> std::io::Result<()> {
    let mut stream = BufReader::new(stream);
    stream
        .get_mut()
        .write_all(options.pop3_greeting.as_bytes())
        .await?;
    let mut line = Vec::new();
    let body = "Subject: hi\r\n\r\nhello pop3\r\n";
    loop {
        line.clear();
        if stream.read_until(b'\n', &mut line).await? == 0 {
            return Ok(());
        }
        let text = String::from_utf8_lossy(&line).trim_end().to_string();
        let upper = text.to_ascii_uppercase();
        let authenticating = ["PASS ", "APOP ", "AUTH "]
            .iter()
            .any(|k| upper.starts_with(k));
        let gated = if authenticating {
            auth_gate(
                &mut stream,
                options,
                "-ERR early bytes arrived before this answer\r\n".into(),
            )
            .await?
        } else {
            None
        };
        let out = if let Some(early) = gated {
            early
        } else if upper.starts_with("XCLIENT ") {
            "+OK\r\n".to_owned()
        } else if upper == "CAPA" {
            let mut r = String::from("+OK Capability list follows\r\n");
            for c in &options.pop3_capa {
                r.push_str(c);
                r.push_str("\r\n");
            }
            r.push_str(".\r\n");
            r
        } else if upper.starts_with("USER ") {
            "+OK\r\n".into()
        } else if upper.starts_with("PASS ") {
            if text[5..] == options.password {
                "+OK Logged in.\r\n".into()
            } else {
                "-ERR [AUTH] Authentication failed.\r\n".into()
            }
        } else if upper == "AUTH" {
            "+OK\r\nPLAIN\r\nEXTERNAL\r\n.\r\n".into()
        } else if upper.starts_with("APOP ") {
            "+OK Logged in.\r\n".into()
        } else if upper.starts_with("AUTH PLAIN") {
            let ir = if text.len() > "AUTH PLAIN ".len() {
                text["AUTH PLAIN ".len()..].to_string()
            } else {
                stream.get_mut().write_all(b"+ \r\n").await?;
                let mut resp = Vec::new();
                stream.read_until(b'\n', &mut resp).await?;
                String::from_utf8_lossy(&resp).trim_end().to_string()
            };
            if auth_plain_reply(&ir, &options.password).starts_with("235") {
                "+OK Logged in.\r\n".into()
            } else {
                "-ERR [AUTH] Authentication failed.\r\n".into()
            }
        } else if upper == "STAT" {
            format!("+OK 1 {}\r\n", body.len())
        } else if upper == "LIST" {
            format!("+OK 1 messages\r\n1 {}\r\n.\r\n", body.len())
        } else if upper == "UIDL" {
            "+OK\r\n1 uid1\r\n.\r\n".into()
        } else if upper.starts_with("RETR") {
            format!("+OK {} octets\r\n{}.\r\n", body.len(), body)
        } else if upper == "QUIT" {
            stream.get_mut().write_all(b"+OK Logging out.\r\n").await?;
            return Ok(());
        } else if upper == "STLS" {
            "-ERR TLS not available on the backend\r\n".into()
        } else {
            "-ERR Unknown command\r\n".into()
        };
        delay_failure(options, authenticating && out.starts_with("-ERR")).await;
        stream.get_mut().write_all(out.as_bytes()).await?;
    }
}
