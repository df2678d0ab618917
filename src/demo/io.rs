//! What the demo's three mail servers share: the accept loop, bounded line reading with a
//! timeout, and the few codecs they all need (base64 for SASL PLAIN and LOGIN).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::store::Mailbox;

/// How long a demo server waits for the next line: mailfront's relay keeps an idle client's
/// backend connection open, so this is as long as an IMAP client may idle (RFC 9051 §5.4's
/// 30-minute autologout).
pub const IDLE: Duration = Duration::from_secs(30 * 60);

/// The longest command line a demo server reads, CRLF included: mailfront itself sends at most
/// a few KiB (its IMAP ID line is at most 4096 octets).
pub const MAX_LINE: usize = 8192;

/// A demo server's session, run on one accepted connection.
pub type Session = BufReader<TcpStream>;

/// Accepts connections until `shutdown`, each served by `serve` in a task of its own.
pub async fn accept_loop<F, Fut>(
    name: &'static str,
    listener: TcpListener,
    mailbox: Arc<Mailbox>,
    shutdown: CancellationToken,
    serve: F,
) where
    F: Fn(Session, Arc<Mailbox>) -> Fut,
    Fut: Future<Output = std::io::Result<()>> + Send + 'static,
{
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, _)) => {
                let session = serve(BufReader::new(stream), mailbox.clone());
                tokio::spawn(async move {
                    if let Err(e) = session.await {
                        tracing::debug!(error = %e, "demo {name} server: session ended");
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "demo {name} server: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Why a demo session ends early.
fn error(text: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, text.to_owned())
}

/// Reads one line of at most `max` octets (LF included) within [`IDLE`]. `None` at the end of
/// the stream; an error for a longer line or a timeout.
pub async fn read_line<R>(reader: &mut R, max: usize) -> std::io::Result<Option<Vec<u8>>>
where
    R: AsyncBufRead + Unpin,
{
    let mut line = Vec::new();
    let limit = u64::try_from(max).unwrap_or(u64::MAX);
    let read = tokio::time::timeout(
        IDLE,
        (&mut *reader).take(limit).read_until(b'\n', &mut line),
    )
    .await
    .map_err(|_| error("idle timeout"))??;
    if read == 0 {
        return Ok(None);
    }
    if !line.ends_with(b"\n") {
        return Err(error("line too long, or cut short"));
    }
    Ok(Some(line))
}

/// Reads exactly `n` octets within [`IDLE`].
pub async fn read_exact<R>(reader: &mut R, n: usize) -> std::io::Result<Vec<u8>>
where
    R: AsyncBufRead + Unpin,
{
    let mut bytes = vec![0; n];
    tokio::time::timeout(IDLE, reader.read_exact(&mut bytes))
        .await
        .map_err(|_| error("idle timeout"))??;
    Ok(bytes)
}

/// A line without its CRLF (or LF), as text; invalid UTF-8 is replaced, not refused (the demo
/// compares it with ASCII only).
pub fn text(line: &[u8]) -> String {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    String::from_utf8_lossy(line).into_owned()
}

/// Splits `verb rest` at the first space; the verb in upper case.
pub fn verb(line: &str) -> (String, &str) {
    match line.split_once(' ') {
        Some((verb, rest)) => (verb.to_ascii_uppercase(), rest),
        None => (line.to_ascii_uppercase(), ""),
    }
}

/// Decodes base64 (RFC 4648 §4, padded), as SASL sends it.
pub fn base64_decode(text: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .ok()
}

/// Whether a SASL PLAIN response (RFC 4616: authzid NUL authcid NUL passwd, base64) names the
/// demo user with its password (an authzid, if any, must be the user too).
pub fn plain_ok(response: &str) -> bool {
    let Some(decoded) = base64_decode(response) else {
        return false;
    };
    let mut parts = decoded.split(|&b| b == 0);
    let (Some(authzid), Some(user), Some(password), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    (authzid.is_empty() || authzid == super::USER.as_bytes()) && credentials_ok(user, password)
}

/// The demo user and its password.
pub fn credentials_ok(user: &[u8], password: &[u8]) -> bool {
    user == super::USER.as_bytes() && password == super::PASSWORD.as_bytes()
}

/// `text` as base64, for SASL challenges.
pub fn base64_encode(text: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sasl_plain() {
        assert!(plain_ok(&base64_encode(b"\0demo\0demo")));
        assert!(plain_ok(&base64_encode(b"demo\0demo\0demo")));
        assert!(!plain_ok(&base64_encode(b"other\0demo\0demo")));
        assert!(!plain_ok(&base64_encode(b"\0demo\0wrong")));
        assert!(!plain_ok(&base64_encode(b"\0demo\0demo\0")));
        assert!(!plain_ok("not base64!"));
        assert!(!plain_ok(""));
    }

    #[tokio::test]
    async fn lines_are_bounded() {
        let mut input: &[u8] = b"short\r\nmuch too long\r\n";
        assert_eq!(
            read_line(&mut input, 8).await.unwrap().unwrap(),
            b"short\r\n"
        );
        assert!(read_line(&mut input, 8).await.is_err());
        let mut empty: &[u8] = b"";
        assert!(read_line(&mut empty, 8).await.unwrap().is_none());
        assert_eq!(text(b"a b\r\n"), "a b");
        assert_eq!(verb("mail FROM:<x>"), ("MAIL".to_owned(), "FROM:<x>"));
    }
}
