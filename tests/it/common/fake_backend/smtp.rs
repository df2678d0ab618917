//! The fake SMTP backend.

use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use super::{FakeOptions, RecordingStream, auth_plain_reply, delay_failure};

/// A small but honest SMTP server: EHLO, AUTH PLAIN/LOGIN, MAIL, RCPT, DATA, BDAT, RSET, NOOP,
/// QUIT. Message content is discarded (the recorder keeps it).
pub(super) async fn fake_smtp(
    stream: RecordingStream,
    options: &FakeOptions,
) -> std::io::Result<()> {
    let mut stream = BufReader::new(stream);
    stream
        .get_mut()
        .write_all(options.smtp_greeting.as_bytes())
        .await?;
    if !options.smtp_greeting.starts_with("220") {
        return Ok(());
    }
    let mut line = Vec::new();
    loop {
        line.clear();
        if stream.read_until(b'\n', &mut line).await? == 0 {
            return Ok(());
        }
        let text = String::from_utf8_lossy(&line).trim_end().to_string();
        let upper = text.to_ascii_uppercase();
        let pipelining = options.ehlo_extensions.iter().any(|e| e == "PIPELINING");
        let group_end = !["MAIL", "RCPT", "RSET", "BDAT"]
            .iter()
            .any(|v| upper.starts_with(v));
        if options.strict_sync
            && (group_end || (!pipelining && !upper.starts_with("BDAT")))
            && sent_too_early(&mut stream).await
        {
            return desync(&mut stream).await;
        }
        if let Some(verb) = &options.smtp_421_on
            && upper.starts_with(verb.as_str())
        {
            let mut stream = stream.into_inner();
            stream
                .write_all(b"421 4.3.0 backend.test going down\r\n")
                .await?;
            return stream.shutdown().await;
        }
        let reply: String = if upper.starts_with("EHLO") {
            let mut r = String::from("250-backend.test\r\n");
            for (i, ext) in options.ehlo_extensions.iter().enumerate() {
                let sep = if i + 1 == options.ehlo_extensions.len() {
                    ' '
                } else {
                    '-'
                };
                r.push_str(&format!("250{sep}{ext}\r\n"));
            }
            if options.ehlo_extensions.is_empty() {
                r = "250 backend.test\r\n".into();
            }
            r
        } else if upper.starts_with("HELO") {
            "250 backend.test\r\n".into()
        } else if upper.starts_with("XCLIENT ") && options.refuse_xclient {
            "550 5.7.0 Error: insufficient authorization\r\n".into()
        } else if upper.starts_with("XCLIENT ") {
            // Postfix: the session restarts, with a new greeting.
            "220 backend.test ESMTP\r\n".into()
        } else if upper.starts_with("AUTH PLAIN ") {
            auth_plain_reply(&text["AUTH PLAIN ".len()..], &options.password)
        } else if upper == "AUTH PLAIN" {
            stream.get_mut().write_all(b"334 \r\n").await?;
            line.clear();
            stream.read_until(b'\n', &mut line).await?;
            let resp = String::from_utf8_lossy(&line).trim_end().to_string();
            if resp == "*" {
                "501 5.0.0 Authentication aborted\r\n".into()
            } else {
                auth_plain_reply(&resp, &options.password)
            }
        } else if upper.starts_with("MAIL FROM")
            || upper.starts_with("RCPT TO")
            || upper.starts_with("RSET")
            || upper.starts_with("NOOP")
        {
            "250 2.0.0 OK\r\n".into()
        } else if upper == "DATA" && options.refuse_data {
            "554 5.5.1 Error: no valid recipients\r\n".into()
        } else if upper == "DATA" {
            stream
                .get_mut()
                .write_all(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                .await?;
            if options.die_in_data {
                line.clear();
                stream.read_until(b'\n', &mut line).await?;
                return Ok(());
            }
            // Read content until a line that is exactly ".\r\n".
            let mut size = 0usize;
            loop {
                line.clear();
                if stream.read_until(b'\n', &mut line).await? == 0 {
                    return Ok(());
                }
                if line == b".\r\n" {
                    break;
                }
                size += line.len();
            }
            if options.strict_sync && sent_too_early(&mut stream).await {
                return desync(&mut stream).await;
            }
            format!("250 2.0.0 Ok: queued as FAKE{size}\r\n")
        } else if upper.starts_with("BDAT ") {
            let mut parts = upper.split_whitespace().skip(1);
            let size: usize = parts.next().and_then(|s| s.parse().ok()).unwrap_or(0);
            let last = parts.next() == Some("LAST");
            let mut chunk = vec![0u8; size];
            stream.read_exact(&mut chunk).await?;
            if options.strict_sync && !pipelining && sent_too_early(&mut stream).await {
                return desync(&mut stream).await;
            }
            if last {
                format!("250 2.0.0 Ok: queued as BDAT{size}\r\n")
            } else {
                format!("250 2.0.0 {size} octets received\r\n")
            }
        } else if upper.starts_with("QUIT") {
            stream.get_mut().write_all(b"221 2.0.0 Bye\r\n").await?;
            return Ok(());
        } else if upper.starts_with("STARTTLS") {
            "454 4.7.0 TLS not available on the backend\r\n".into()
        } else {
            "502 5.5.2 Error: command not recognized\r\n".into()
        };
        delay_failure(
            options,
            upper.starts_with("AUTH") && reply.starts_with("535"),
        )
        .await;
        stream.get_mut().write_all(reply.as_bytes()).await?;
    }
}

/// Whether the client sent more before this reply was written (waits briefly to see).
async fn sent_too_early(stream: &mut BufReader<RecordingStream>) -> bool {
    if !stream.buffer().is_empty() {
        return true;
    }
    matches!(
        tokio::time::timeout(Duration::from_millis(30), stream.fill_buf()).await,
        Ok(Ok(buf)) if !buf.is_empty()
    )
}

async fn desync(stream: &mut BufReader<RecordingStream>) -> std::io::Result<()> {
    stream
        .get_mut()
        .write_all(b"554 5.5.0 Error: SMTP protocol synchronization\r\n")
        .await?;
    stream.get_mut().shutdown().await
}
