//! Backend reply parsing (RFC 5321 §4.2): `code-text` continuation lines, then `code SP text`.
//!
//! Replies are matched to commands in order (one reply per command, §4.2), so the receiver
//! yields each complete multi-line reply as one [`Reply`] with its raw bytes for byte-exact
//! pass-through. Line length and line count are bounded; a backend that breaks the grammar has
//! desynchronised the session, so the driver should answer `421` ([`local_reply::backend_error`])
//! and close both sides.
//!
//! [`local_reply::backend_error`]: crate::smtp::local_reply::backend_error

use std::fmt;
use std::ops::Range;

use crate::line::{find_line, trim_line_end};

/// Default longest reply line, terminator included. RFC 5321 §4.5.3.1.5 says 512, but real
/// servers send longer text (Postfix rejects with the recipient quoted), so be generous.
pub const DEFAULT_REPLY_LINE_LIMIT: usize = 4096;
/// The shortest line limit a receiver takes: `250 x\r\n` plus slack, so a tiny limit still
/// frames the shortest well-formed reply line (three digits, a separator, CRLF).
const MIN_REPLY_LINE: usize = 8;
/// Default most lines in one reply (an EHLO reply has a few dozen at most).
pub const DEFAULT_REPLY_MAX_LINES: usize = 256;

/// A backend reply that cannot be parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    #[error("backend reply line longer than {limit} octets")]
    LineTooLong { limit: usize },
    #[error("backend reply longer than {limit} lines")]
    TooManyLines { limit: usize },
    #[error("backend reply line without a valid reply code")]
    Malformed,
    #[error("backend reply continues code {first} with code {got}")]
    InconsistentCode { first: u16, got: u16 },
}

/// An enhanced status code `class.subject.detail` (RFC 3463, carried per RFC 2034).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EnhancedStatus {
    pub class: u8,
    pub subject: u16,
    pub detail: u16,
}

impl fmt::Display for EnhancedStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.class, self.subject, self.detail)
    }
}

/// One complete reply from the backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    code: u16,
    raw: Vec<u8>,
    /// Ranges in `raw` of each line's text: after `code` and the separator, before the
    /// terminator.
    texts: Vec<Range<usize>>,
}

impl Reply {
    /// Parses a complete reply held in one buffer (tests, rewriters); `None` unless `raw` is
    /// exactly one well-formed reply.
    pub fn parse(raw: &[u8]) -> Option<Reply> {
        let mut receiver = ReplyReceiver::new(raw.len().max(MIN_REPLY_LINE), usize::MAX);
        match receiver.receive(raw) {
            (n, Ok(Some(reply))) if n == raw.len() => Some(reply),
            _ => None,
        }
    }

    /// The three-digit code.
    pub fn code(&self) -> u16 {
        self.code
    }

    /// The bytes exactly as the backend sent them.
    pub fn raw(&self) -> &[u8] {
        &self.raw
    }

    /// Each line's text, without code, separator or terminator.
    pub fn lines(&self) -> impl Iterator<Item = &[u8]> {
        self.texts
            .iter()
            .map(|r| self.raw.get(r.clone()).unwrap_or_default())
    }

    /// 2yz: positive completion.
    pub fn is_positive(&self) -> bool {
        (200..300).contains(&self.code)
    }

    /// 3yz: intermediate (354 after DATA, 334 in AUTH).
    #[cfg(test)]
    fn is_intermediate(&self) -> bool {
        (300..400).contains(&self.code)
    }

    /// 4yz or 5yz.
    #[cfg(test)]
    fn is_negative(&self) -> bool {
        self.code >= 400
    }

    /// The enhanced status code at the start of the first line, if its class matches the
    /// reply code's first digit (RFC 2034 §4).
    pub fn enhanced_status(&self) -> Option<EnhancedStatus> {
        let text = self.lines().next()?;
        let word = text.split(|&b| b == b' ').next()?;
        let mut parts = word.split(|&b| b == b'.');
        let class = parse_number(parts.next()?, 1)?;
        let subject = parse_number(parts.next()?, 3)?;
        let detail = parse_number(parts.next()?, 3)?;
        if parts.next().is_some() || u16::from(class_digit(self.code)) != class {
            return None;
        }
        Some(EnhancedStatus {
            class: u8::try_from(class).ok()?,
            subject,
            detail,
        })
    }
}

fn class_digit(code: u16) -> u8 {
    u8::try_from(code / 100).unwrap_or(0)
}

fn parse_number(digits: &[u8], max_len: usize) -> Option<u16> {
    if digits.is_empty() || digits.len() > max_len || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// Parses `ddd` at the start of a reply line: first digit 2–5, second 0–5 (RFC 5321 §4.2).
fn parse_code(line: &[u8]) -> Option<(u16, bool)> {
    let text = trim_line_end(line);
    let (digits, rest) = text.split_at_checked(3)?;
    let [a, b, c] = digits else { return None };
    if !(b'2'..=b'5').contains(a) || !(b'0'..=b'5').contains(b) || !c.is_ascii_digit() {
        return None;
    }
    let code = u16::from(a - b'0') * 100 + u16::from(b - b'0') * 10 + u16::from(c - b'0');
    let last = match rest.first() {
        None | Some(b' ') => true,
        Some(b'-') => false,
        Some(_) => return None,
    };
    Some((code, last))
}

/// Accumulates backend bytes into complete replies.
#[derive(Debug, Clone)]
pub struct ReplyReceiver {
    raw: Vec<u8>,
    texts: Vec<Range<usize>>,
    /// Bytes of `raw` belonging to a line not yet ended.
    partial_from: usize,
    code: Option<u16>,
    line_limit: usize,
    max_lines: usize,
    discarding: bool,
}

impl Default for ReplyReceiver {
    fn default() -> Self {
        Self::new(DEFAULT_REPLY_LINE_LIMIT, DEFAULT_REPLY_MAX_LINES)
    }
}

impl ReplyReceiver {
    /// `line_limit` counts the terminator.
    pub fn new(line_limit: usize, max_lines: usize) -> Self {
        ReplyReceiver {
            raw: Vec::new(),
            texts: Vec::new(),
            partial_from: 0,
            code: None,
            line_limit: line_limit.max(MIN_REPLY_LINE),
            max_lines: max_lines.max(1),
            discarding: false,
        }
    }

    /// True when no part of a reply is buffered.
    #[cfg(test)]
    fn is_idle(&self) -> bool {
        self.raw.is_empty() && !self.discarding
    }

    /// Consumes `input` up to the end of one reply. Returns octets consumed and `Ok(Some)` for a
    /// complete reply, `Ok(None)` when all input was consumed without completing one, or `Err`
    /// (the partial reply is dropped; an over-long line is skipped up to its LF).
    pub fn receive(&mut self, input: &[u8]) -> (usize, Result<Option<Reply>, ReplyError>) {
        let mut consumed = 0;
        loop {
            let rest = input.get(consumed..).unwrap_or_default();
            if rest.is_empty() {
                return (consumed, Ok(None));
            }
            if self.discarding {
                match rest.iter().position(|&b| b == b'\n') {
                    Some(pos) => {
                        self.discarding = false;
                        consumed += pos + 1;
                        continue;
                    }
                    None => return (input.len(), Ok(None)),
                }
            }
            let held = self.raw.len() - self.partial_from;
            let budget = self.line_limit.saturating_sub(held);
            match find_line(rest, budget) {
                Ok(Some(n)) => {
                    consumed += n;
                    self.raw
                        .extend_from_slice(rest.get(..n).unwrap_or_default());
                    match self.end_line() {
                        Ok(Some(reply)) => return (consumed, Ok(Some(reply))),
                        Ok(None) => {}
                        Err(e) => return (consumed, Err(e)),
                    }
                }
                Ok(None) => {
                    self.raw.extend_from_slice(rest);
                    return (input.len(), Ok(None));
                }
                Err(_) => {
                    consumed += budget;
                    let limit = self.line_limit;
                    self.clear();
                    self.discarding = true;
                    // Skip the rest of the line now if it is here, so the error is reported once.
                    let rest = input.get(consumed..).unwrap_or_default();
                    if let Some(pos) = rest.iter().position(|&b| b == b'\n') {
                        self.discarding = false;
                        consumed += pos + 1;
                    } else {
                        consumed = input.len();
                    }
                    return (consumed, Err(ReplyError::LineTooLong { limit }));
                }
            }
        }
    }

    /// Handles the line just completed at `raw[partial_from..]`.
    fn end_line(&mut self) -> Result<Option<Reply>, ReplyError> {
        let start = self.partial_from;
        let line = self.raw.get(start..).unwrap_or_default();
        let Some((code, last)) = parse_code(line) else {
            self.clear();
            return Err(ReplyError::Malformed);
        };
        if let Some(first) = self.code.filter(|&first| first != code) {
            self.clear();
            return Err(ReplyError::InconsistentCode { first, got: code });
        }
        self.code = Some(code);
        let text_end = start + trim_line_end(line).len();
        let text_start = (start + 4).min(text_end);
        self.texts.push(text_start..text_end);
        self.partial_from = self.raw.len();
        if last {
            let reply = Reply {
                code,
                raw: std::mem::take(&mut self.raw),
                texts: std::mem::take(&mut self.texts),
            };
            self.clear();
            return Ok(Some(reply));
        }
        if self.texts.len() >= self.max_lines {
            let limit = self.max_lines;
            self.clear();
            return Err(ReplyError::TooManyLines { limit });
        }
        Ok(None)
    }

    fn clear(&mut self) {
        self.raw.clear();
        self.texts.clear();
        self.partial_from = 0;
        self.code = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Event {
        Reply(u16, Vec<u8>, Vec<Vec<u8>>),
        Error(ReplyError),
    }

    fn run(receiver: &mut ReplyReceiver, chunks: &[&[u8]]) -> Vec<Event> {
        let mut events = Vec::new();
        for chunk in chunks {
            let mut rest: &[u8] = chunk;
            while !rest.is_empty() {
                let (n, result) = receiver.receive(rest);
                assert!(n <= rest.len());
                rest = &rest[n..];
                match result {
                    Ok(Some(r)) => events.push(Event::Reply(
                        r.code(),
                        r.raw().to_vec(),
                        r.lines().map(<[u8]>::to_vec).collect(),
                    )),
                    Ok(None) => assert!(rest.is_empty()),
                    Err(e) => events.push(Event::Error(e)),
                }
            }
        }
        events
    }

    #[test]
    fn multi_line_reply_is_one_reply_with_its_raw_bytes() {
        let raw = b"250-mx.example\r\n250-PIPELINING\r\n250 CHUNKING\r\n";
        let reply = Reply::parse(raw).unwrap();
        assert_eq!(reply.code(), 250);
        assert_eq!(reply.raw(), raw);
        let lines: Vec<&[u8]> = reply.lines().collect();
        assert_eq!(lines, vec![&b"mx.example"[..], b"PIPELINING", b"CHUNKING"]);
        assert!(reply.is_positive());
    }

    #[test]
    fn code_only_and_bare_lf_lines_are_accepted() {
        let reply = Reply::parse(b"354\n").unwrap();
        assert_eq!(reply.code(), 354);
        assert!(reply.is_intermediate());
        assert_eq!(reply.lines().collect::<Vec<_>>(), vec![&b""[..]]);
        let reply = Reply::parse(b"334 \r\n").unwrap();
        assert_eq!(reply.lines().collect::<Vec<_>>(), vec![&b""[..]]);
    }

    #[test]
    fn enhanced_status_is_read_when_its_class_matches() {
        let reply = Reply::parse(b"550 5.7.1 Relaying denied\r\n").unwrap();
        assert_eq!(
            reply.enhanced_status(),
            Some(EnhancedStatus {
                class: 5,
                subject: 7,
                detail: 1
            })
        );
        assert_eq!(reply.enhanced_status().unwrap().to_string(), "5.7.1");
        assert!(reply.is_negative());
        assert_eq!(
            Reply::parse(b"250 5.7.1 odd\r\n")
                .unwrap()
                .enhanced_status(),
            None
        );
        assert_eq!(Reply::parse(b"250 ok\r\n").unwrap().enhanced_status(), None);
        assert_eq!(
            Reply::parse(b"250 2.1.1234 x\r\n")
                .unwrap()
                .enhanced_status(),
            None
        );
    }

    #[test]
    fn malformed_and_inconsistent_replies_are_errors() {
        let mut rx = ReplyReceiver::default();
        assert_eq!(
            run(&mut rx, &[b"hello\r\n"]),
            vec![Event::Error(ReplyError::Malformed)]
        );
        assert_eq!(
            run(&mut rx, &[b"250x\r\n", b"650 x\r\n", b"2\r\n"]),
            vec![Event::Error(ReplyError::Malformed); 3]
        );
        assert_eq!(
            run(&mut rx, &[b"250-a\r\n251 b\r\n"]),
            vec![Event::Error(ReplyError::InconsistentCode {
                first: 250,
                got: 251
            })]
        );
        assert!(rx.is_idle());
    }

    #[test]
    fn over_long_line_is_an_error_and_never_buffered() {
        let mut rx = ReplyReceiver::new(64, 4);
        let mut input = b"250 ".to_vec();
        input.extend(std::iter::repeat_n(b'x', 10_000));
        input.extend_from_slice(b"\r\n220 ok\r\n");
        for size in [1, 7, 512, input.len()] {
            let events = run(&mut rx, &input.chunks(size).collect::<Vec<_>>());
            assert_eq!(events.len(), 2, "{size}");
            assert_eq!(
                events[0],
                Event::Error(ReplyError::LineTooLong { limit: 64 })
            );
            assert!(matches!(events[1], Event::Reply(220, _, _)));
            assert!(rx.raw.len() < 64);
        }
    }

    #[test]
    fn too_many_lines_is_an_error() {
        let mut rx = ReplyReceiver::new(64, 3);
        let events = run(&mut rx, &[b"250-a\r\n250-b\r\n250-c\r\n250 d\r\n"]);
        assert_eq!(
            events[0],
            Event::Error(ReplyError::TooManyLines { limit: 3 })
        );
        // The parser resynchronises at the next line; "250 d" alone is a reply.
        assert!(matches!(events[1..], [Event::Reply(250, _, _)]));
        let events = run(&mut rx, &[b"250-a\r\n250-b\r\n250 c\r\n"]);
        assert!(matches!(events[..], [Event::Reply(250, _, _)]));
    }

    #[test]
    fn receiver_stops_after_each_reply_so_replies_match_commands_in_order() {
        let input = b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n";
        let mut rx = ReplyReceiver::default();
        let (n, r) = rx.receive(input);
        assert_eq!(n, 14);
        assert_eq!(r.unwrap().unwrap().code(), 250);
    }

    #[test]
    fn receiver_is_split_invariant() {
        let mut corpus = Vec::new();
        corpus.extend_from_slice(b"220-mx.example ESMTP\r\n220 ready\r\n");
        corpus.extend_from_slice(b"250-mx.example\r\n250-PIPELINING\r\n250-SIZE 1000\r\n");
        corpus.extend_from_slice(b"250-AUTH PLAIN LOGIN\r\n250 8BITMIME\r\n");
        corpus.extend_from_slice(b"334 \r\n235 2.7.0 ok\n250\r\n");
        corpus.extend_from_slice(b"nonsense\r\n");
        corpus.extend(std::iter::repeat_n(b'5', 5000));
        corpus.extend_from_slice(b"\r\n554-5.6.0 no\r\n554 5.6.0 \xff\xfe\r\n");
        let mut whole = ReplyReceiver::default();
        let expected = run(&mut whole, &[&corpus]);
        assert_eq!(expected.len(), 8, "{expected:?}");
        for size in [1, 2, 3, 4, 7, 16, 64, 512] {
            let mut rx = ReplyReceiver::default();
            assert_eq!(
                run(&mut rx, &corpus.chunks(size).collect::<Vec<_>>()),
                expected,
                "chunk size {size}"
            );
        }
        for split in 0..corpus.len().min(300) {
            let mut rx = ReplyReceiver::default();
            let (a, b) = corpus.split_at(split);
            assert_eq!(run(&mut rx, &[a, b]), expected, "split at {split}");
        }
    }
}
