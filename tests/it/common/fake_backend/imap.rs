//! The fake IMAP backend.

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use super::{FakeOptions, RecordingStream, auth_gate, auth_plain_reply, delay_failure};

/// A small IMAP server: greeting, CAPABILITY, ID, LOGIN (quoted, atom or literal password),
/// AUTHENTICATE PLAIN (SASL-IR or continuation), LIST, SELECT/EXAMINE, FETCH 1, LOGOUT;
/// anything else gets a tagged OK.
pub(super) async fn fake_imap(
    stream: RecordingStream,
    options: &FakeOptions,
) -> std::io::Result<()> {
    let mut stream = BufReader::new(stream);
    let caps = &options.imap_capabilities;
    let greeting = if options.imap_preauth {
        "* PREAUTH fake IMAP ready, logged in as you\r\n".to_string()
    } else if options.imap_greeting_capabilities {
        format!("* OK [CAPABILITY {caps}] fake IMAP ready\r\n")
    } else {
        "* OK fake IMAP ready\r\n".to_string()
    };
    stream.get_mut().write_all(greeting.as_bytes()).await?;
    let mut line = Vec::new();
    loop {
        line.clear();
        if stream.read_until(b'\n', &mut line).await? == 0 {
            return Ok(());
        }
        // Absorb synchronising and non-synchronising literals.
        let mut full = line.clone();
        while let Some(n) = literal_len(&full) {
            if !full.ends_with(b"+}\r\n") {
                stream.get_mut().write_all(b"+ OK\r\n").await?;
            }
            let mut lit = vec![0u8; n];
            stream.read_exact(&mut lit).await?;
            full.extend_from_slice(&lit);
            let mut rest = Vec::new();
            stream.read_until(b'\n', &mut rest).await?;
            full.extend_from_slice(&rest);
        }
        let text = String::from_utf8_lossy(&full).trim_end().to_string();
        let mut words = text.splitn(3, ' ');
        let tag = words.next().unwrap_or("*").to_string();
        let cmd = words.next().unwrap_or("").to_ascii_uppercase();
        let args = words.next().unwrap_or("").to_string();
        let gated = if cmd == "LOGIN" || cmd == "AUTHENTICATE" {
            auth_gate(
                &mut stream,
                options,
                format!("{tag} NO early bytes arrived before this answer\r\n"),
            )
            .await?
        } else {
            None
        };
        let out = match cmd.as_str() {
            "CAPABILITY" => format!("* CAPABILITY {caps}\r\n{tag} OK CAPABILITY completed\r\n"),
            "ID" => format!("* ID (\"name\" \"fake\")\r\n{tag} OK ID completed\r\n"),
            "LOGIN" | "AUTHENTICATE" if gated.is_some() => gated.unwrap_or_default(),
            "LOGIN" => {
                if text.contains(&options.password) {
                    format!("{tag} OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n")
                } else {
                    format!("{tag} NO [AUTHENTICATIONFAILED] Authentication failed.\r\n")
                }
            }
            "AUTHENTICATE" => {
                let mut parts = args.split(' ');
                let _mech = parts.next();
                let ir = match parts.next() {
                    Some(ir) => ir.to_string(),
                    None => {
                        stream.get_mut().write_all(b"+ \r\n").await?;
                        let mut resp = Vec::new();
                        stream.read_until(b'\n', &mut resp).await?;
                        String::from_utf8_lossy(&resp).trim_end().to_string()
                    }
                };
                if ir == "*" {
                    format!("{tag} BAD Authentication aborted\r\n")
                } else if auth_plain_reply(&ir, &options.password).starts_with("235") {
                    format!("{tag} OK Logged in\r\n")
                } else {
                    format!("{tag} NO [AUTHENTICATIONFAILED] Authentication failed.\r\n")
                }
            }
            "LIST" => {
                format!("* LIST (\\HasNoChildren) \"/\" INBOX\r\n{tag} OK List completed\r\n")
            }
            "SELECT" | "EXAMINE" => format!(
                "* FLAGS (\\Seen)\r\n* 1 EXISTS\r\n* 0 RECENT\r\n* OK [UIDVALIDITY 1] UIDs valid\r\n* OK [UIDNEXT 2] next\r\n{tag} OK [READ-WRITE] Select completed\r\n"
            ),
            "FETCH" | "UID" => {
                let body = "Subject: hi\r\n\r\nhello imap\r\n";
                format!(
                    "* 1 FETCH (UID 1 BODY[] {{{}}}\r\n{})\r\n{tag} OK Fetch completed\r\n",
                    body.len(),
                    body
                )
            }
            "LOGOUT" => {
                stream
                    .get_mut()
                    .write_all(
                        format!("* BYE Logging out\r\n{tag} OK Logout completed\r\n").as_bytes(),
                    )
                    .await?;
                return Ok(());
            }
            "STARTTLS" => format!("{tag} BAD TLS not available on the backend\r\n"),
            _ => format!("{tag} OK {cmd} completed\r\n"),
        };
        let login = cmd == "LOGIN" || cmd == "AUTHENTICATE";
        delay_failure(options, login && out.contains(" NO ")).await;
        stream.get_mut().write_all(out.as_bytes()).await?;
    }
}

fn literal_len(line: &[u8]) -> Option<usize> {
    let text = std::str::from_utf8(line).ok()?;
    let text = text.strip_suffix("\r\n")?;
    let text = text.strip_suffix('}')?;
    let open = text.rfind('{')?;
    text[open + 1..].trim_end_matches(['+', '-']).parse().ok()
}
