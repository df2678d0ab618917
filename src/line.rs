//! Bounded line framing shared by the SMTP, IMAP and POP3 codecs.
//!
//! Pure functions over byte slices: they never read a socket, so the same code serves the
//! session drivers, unit tests and fuzz targets.

/// One call's outcome of a pull-style receiver: drain `consumed` octets from the front of the
/// buffer, then act on `event`. `event == None` means everything usable was consumed and more
/// input is needed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step<E> {
    pub consumed: usize,
    pub event: Option<E>,
}

impl<E> Step<E> {
    /// Drain `consumed` octets; nothing to act on until more input arrives.
    pub fn need(consumed: usize) -> Step<E> {
        Step {
            consumed,
            event: None,
        }
    }

    /// Drain `consumed` octets, then act on `event`.
    pub fn event(consumed: usize, event: E) -> Step<E> {
        Step {
            consumed,
            event: Some(event),
        }
    }
}

/// A line grew past the limit before its terminating LF arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("line longer than {limit} octets")]
pub struct LineTooLong {
    pub limit: usize,
}

/// Finds the first complete line in `buf`.
///
/// Returns `Ok(Some(n))` where `buf[..n]` is the line including its LF, `Ok(None)` when more bytes
/// are needed, and `Err` when no LF occurs within `limit` octets (the terminator included), so a
/// peer can never make the caller buffer more than `limit` bytes for one line.
pub fn find_line(buf: &[u8], limit: usize) -> Result<Option<usize>, LineTooLong> {
    let window = &buf[..buf.len().min(limit)];
    match window.iter().position(|&b| b == b'\n') {
        Some(pos) => Ok(Some(pos + 1)),
        None if buf.len() >= limit => Err(LineTooLong { limit }),
        None => Ok(None),
    }
}

/// Strips one trailing CRLF or LF.
pub fn trim_line_end(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// Test support: drive a pull-style receiver over an input delivered in chunks, the way a
/// session driver does, so tests can prove the events do not depend on how reads split.
#[cfg(test)]
pub(crate) mod split {

    use super::Step;

    /// The chunk sizes every receiver is checked with (house rule).
    pub const CHUNKS: [usize; 8] = [1, 2, 3, 4, 7, 16, 64, 512];

    /// Feeds `input` in `chunk`-sized reads (0 = all at once); after each read calls `next` until
    /// it needs more, draining what it consumed, and lets `react` play the driver. Returns the
    /// events and the octets left unconsumed. `react` returns `false` to stop (e.g. STARTTLS).
    pub fn drive<R, E: Clone>(
        rx: &mut R,
        input: &[u8],
        chunk: usize,
        mut next: impl FnMut(&mut R, &[u8]) -> Step<E>,
        mut react: impl FnMut(&mut R, &E) -> bool,
    ) -> (Vec<E>, Vec<u8>) {
        let chunk = if chunk == 0 {
            input.len().max(1)
        } else {
            chunk
        };
        let mut buf = Vec::new();
        let mut events = Vec::new();
        for piece in input.chunks(chunk) {
            buf.extend_from_slice(piece);
            loop {
                let step = next(rx, &buf);
                buf.drain(..step.consumed);
                match step.event {
                    Some(event) => {
                        events.push(event.clone());
                        if !react(rx, &event) {
                            return (events, buf);
                        }
                    }
                    None => break,
                }
            }
        }
        (events, buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn complete_line_is_found_with_its_terminator() {
        assert_eq!(find_line(b"EHLO x\r\nMAIL", 100), Ok(Some(8)));
    }

    #[test]
    fn partial_line_needs_more() {
        assert_eq!(find_line(b"EHLO x\r", 100), Ok(None));
    }

    #[test]
    fn line_at_exact_limit_is_accepted_and_one_more_octet_is_refused() {
        assert_eq!(find_line(b"abc\n", 4), Ok(Some(4)));
        assert_eq!(find_line(b"abcd\n", 4), Err(LineTooLong { limit: 4 }));
        assert_eq!(find_line(b"abcd", 4), Err(LineTooLong { limit: 4 }));
    }

    #[test]
    fn trim_handles_crlf_lf_and_none() {
        assert_eq!(trim_line_end(b"a\r\n"), b"a");
        assert_eq!(trim_line_end(b"a\n"), b"a");
        assert_eq!(trim_line_end(b"a"), b"a");
    }
}
