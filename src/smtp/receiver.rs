//! Bounded framing of client command lines and SASL lines (RFC 5321 §4.5.3.1.4, RFC 4954 §4).
//!
//! The receiver never consumes past the end of one line, so between lines the driver can switch
//! what the next bytes mean: SASL responses after a backend 334, message content after a 354
//! (hand the rest to [`crate::smtp::data::DataScanner`]), a BDAT chunk (hand it to
//! [`crate::smtp::bdat::ChunkReader`]), or nothing at all after STARTTLS (drop the rest and call
//! [`CommandReceiver::reset`]).

use crate::line::{find_line, trim_line_end};
use crate::smtp::local_reply;

/// Default longest command line read, terminator included: `limits.smtp_line`'s default
/// ([`crate::config::DEFAULT_SMTP_LINE`]). What is forwarded is bounded separately, by the
/// canonical re-encoding ([`crate::smtp::canonical`]).
pub const DEFAULT_COMMAND_LINE_LIMIT: usize = crate::config::DEFAULT_SMTP_LINE;
/// Longest AUTH command or SASL response line, terminator included (RFC 4954 §4: "12288 octets
/// is considered to be a sufficient line length limit").
pub const DEFAULT_AUTH_LINE_LIMIT: usize = 12288;
/// Limits below this are raised to it, so the verb of every line is always seen.
const MIN_LINE_LIMIT: usize = 16;

/// What the next line is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineMode {
    /// An SMTP command (AUTH command lines get the AUTH limit).
    Command,
    /// A SASL response after a backend 334 (RFC 4954 §4).
    SaslResponse,
}

/// A line over its limit. Reported once its LF arrives: the over-long line is one command and
/// gets exactly one reply, in order with the replies to the commands before it (RFC 5321 §4.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LineError {
    #[error("command line longer than {limit} octets")]
    CommandTooLong { limit: usize },
    /// The driver must also end the backend's AUTH exchange (send `*`, swallow its 501).
    #[error("authentication exchange line longer than {limit} octets")]
    AuthTooLong { limit: usize },
}

impl LineError {
    /// `500 5.5.2` for commands, `500 5.5.6` for AUTH lines (RFC 4954 §6).
    pub fn reply(self) -> &'static [u8] {
        match self {
            LineError::CommandTooLong { .. } => local_reply::LINE_TOO_LONG,
            LineError::AuthTooLong { .. } => local_reply::AUTH_LINE_TOO_LONG,
        }
    }
}

/// One complete client line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    text: Vec<u8>,
    /// Ended by an LF with no CR before it.
    bare_lf: bool,
}

impl Line {
    /// The line without its terminator (CRLF or a bare LF). A CR left inside is a bare CR.
    pub fn text(&self) -> &[u8] {
        &self.text
    }

    /// Whether the line ended with a bare LF instead of CRLF (RFC 5321 §2.3.8). Postfix before
    /// 3.9 and Dovecot take a bare LF as a line end, other servers do not: a line framed this
    /// way is never forwarded (the driver refuses it with `500 5.5.2`), so the backend can never
    /// split the client's bytes differently from mailfront.
    pub fn ends_with_bare_lf(&self) -> bool {
        self.bare_lf
    }

    /// The line as forwarded: byte-exact, always ended by CRLF (mailfront's own terminator;
    /// lines ended by a bare LF are refused before they get here).
    pub fn to_wire(&self) -> Vec<u8> {
        let mut wire = Vec::with_capacity(self.text.len() + 2);
        wire.extend_from_slice(&self.text);
        wire.extend_from_slice(b"\r\n");
        wire
    }

    #[cfg(test)]
    fn into_text(self) -> Vec<u8> {
        self.text
    }

    /// A CRLF-terminated line of mailfront's own making (the AUTH of a login held for routing,
    /// which goes through the gate like a client's line once the backend is connected).
    pub(crate) fn own(text: Vec<u8>) -> Line {
        Line {
            text,
            bare_lf: false,
        }
    }

    /// A line with no text, CRLF-terminated: what stands for an over-long line whose bytes
    /// were dropped.
    pub fn empty() -> Line {
        Line {
            text: Vec::new(),
            bare_lf: false,
        }
    }
}

/// Accumulates bytes of the current line; at most one limit's worth is ever buffered.
#[derive(Debug, Clone)]
pub struct CommandReceiver {
    partial: Vec<u8>,
    command_limit: usize,
    auth_limit: usize,
    /// Set after a limit was crossed: bytes are dropped until the next LF.
    discarding: Option<LineError>,
}

impl Default for CommandReceiver {
    fn default() -> Self {
        Self::new(DEFAULT_COMMAND_LINE_LIMIT, DEFAULT_AUTH_LINE_LIMIT)
    }
}

impl CommandReceiver {
    /// Limits count the terminator. The AUTH limit is never below the command limit.
    pub fn new(command_limit: usize, auth_limit: usize) -> Self {
        let command_limit = command_limit.max(MIN_LINE_LIMIT);
        CommandReceiver {
            partial: Vec::new(),
            command_limit,
            auth_limit: auth_limit.max(command_limit),
            discarding: None,
        }
    }

    /// Forgets any partial line, e.g. after STARTTLS: pipelined cleartext must never run after
    /// the handshake (CVE-2011-0411, RFC 3207 §4.2).
    pub fn reset(&mut self) {
        self.partial.clear();
        self.discarding = None;
    }

    /// True when no partial line is buffered (the client is between commands).
    #[cfg(test)]
    fn is_idle(&self) -> bool {
        self.partial.is_empty() && self.discarding.is_none()
    }

    /// Consumes bytes of `input` up to and including the end of one line.
    ///
    /// Returns how many octets were consumed and `Ok(Some(line))` for a complete line,
    /// `Ok(None)` when every octet was consumed without completing one, or `Err` when a line
    /// over the limit has just ended (its bytes were dropped, never buffered).
    pub fn receive(
        &mut self,
        input: &[u8],
        mode: LineMode,
    ) -> (usize, Result<Option<Line>, LineError>) {
        if input.is_empty() {
            return (0, Ok(None));
        }
        if let Some(error) = self.discarding {
            return match input.iter().position(|&b| b == b'\n') {
                Some(pos) => {
                    self.discarding = None;
                    (pos + 1, Err(error))
                }
                None => (input.len(), Ok(None)),
            };
        }
        let (limit, error) = self.limit_for(input, mode);
        let budget = limit.saturating_sub(self.partial.len());
        match find_line(input, budget) {
            Ok(Some(n)) => {
                let (line, _) = input.split_at(n);
                self.partial.extend_from_slice(line);
                // Judged on the whole line: a CR at the end of one read and its LF at the start
                // of the next are one good CRLF.
                let bare_lf = !self.partial.ends_with(b"\r\n");
                let text = trim_line_end(&self.partial).to_vec();
                self.partial.clear();
                (n, Ok(Some(Line { text, bare_lf })))
            }
            Ok(None) => {
                self.partial.extend_from_slice(input);
                (input.len(), Ok(None))
            }
            Err(_) => {
                self.partial.clear();
                self.discarding = Some(error);
                let rest = input.get(budget..).unwrap_or_default();
                let (n, result) = self.receive(rest, mode);
                (budget + n, result)
            }
        }
    }

    /// The AUTH limit applies to SASL lines and to lines that start with `AUTH `.
    fn limit_for(&self, input: &[u8], mode: LineMode) -> (usize, LineError) {
        let auth = (
            self.auth_limit,
            LineError::AuthTooLong {
                limit: self.auth_limit,
            },
        );
        if mode == LineMode::SaslResponse {
            return auth;
        }
        let mut head = [0u8; 5];
        for (slot, byte) in head.iter_mut().zip(self.partial.iter().chain(input.iter())) {
            *slot = *byte;
        }
        let is_auth = head.split_at_checked(4).is_some_and(|(verb, sep)| {
            verb.eq_ignore_ascii_case(b"AUTH") && matches!(sep, [b' ' | b'\t'])
        });
        if is_auth {
            auth
        } else {
            (
                self.command_limit,
                LineError::CommandTooLong {
                    limit: self.command_limit,
                },
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a driver observes: lines and errors, in order.
    #[derive(Debug, PartialEq, Eq)]
    enum Event {
        Line(Vec<u8>),
        /// A line ended by a bare LF.
        BareLf(Vec<u8>),
        TooLong(LineError),
    }

    fn run(receiver: &mut CommandReceiver, chunks: &[&[u8]], mode: LineMode) -> Vec<Event> {
        let mut events = Vec::new();
        for chunk in chunks {
            let mut rest: &[u8] = chunk;
            while !rest.is_empty() {
                let (n, result) = receiver.receive(rest, mode);
                assert!(n > 0 && n <= rest.len());
                rest = &rest[n..];
                match result {
                    Ok(Some(line)) if line.ends_with_bare_lf() => {
                        events.push(Event::BareLf(line.into_text()))
                    }
                    Ok(Some(line)) => events.push(Event::Line(line.into_text())),
                    Ok(None) => assert!(rest.is_empty()),
                    Err(e) => events.push(Event::TooLong(e)),
                }
            }
        }
        events
    }

    fn chunked(input: &[u8], size: usize) -> Vec<&[u8]> {
        input.chunks(size).collect()
    }

    #[test]
    fn lines_are_returned_one_at_a_time_without_terminators() {
        let mut rx = CommandReceiver::default();
        let input = b"EHLO x\r\nMAIL FROM:<a@b>\r\nRCPT";
        let (n, r) = rx.receive(input, LineMode::Command);
        assert_eq!((n, r.unwrap().unwrap().text()), (8, &b"EHLO x"[..]));
        let (n2, r) = rx.receive(&input[n..], LineMode::Command);
        assert_eq!(r.unwrap().unwrap().text(), b"MAIL FROM:<a@b>");
        let (n3, r) = rx.receive(&input[n + n2..], LineMode::Command);
        assert_eq!((n3, r), (4, Ok(None)));
        assert!(!rx.is_idle());
        let (_, r) = rx.receive(b" TO:<c@d>\r\n", LineMode::Command);
        assert_eq!(r.unwrap().unwrap().text(), b"RCPT TO:<c@d>");
        assert!(rx.is_idle());
    }

    #[test]
    fn a_line_ended_by_a_bare_lf_is_marked_and_a_crlf_split_across_reads_is_not() {
        let mut rx = CommandReceiver::default();
        let (_, r) = rx.receive(b"NOOP\n", LineMode::Command);
        assert!(r.unwrap().unwrap().ends_with_bare_lf());
        let (_, r) = rx.receive(b"NOOP\r\n", LineMode::Command);
        let line = r.unwrap().unwrap();
        assert!(!line.ends_with_bare_lf());
        assert_eq!(line.to_wire(), b"NOOP\r\n");
        // CR at the end of one read, LF at the start of the next: one good CRLF.
        let (_, r) = rx.receive(b"NOOP\r", LineMode::Command);
        assert_eq!(r, Ok(None));
        let (_, r) = rx.receive(b"\nQUIT\r\n", LineMode::Command);
        let line = r.unwrap().unwrap();
        assert_eq!(line.text(), b"NOOP");
        assert!(!line.ends_with_bare_lf());
        // A CR inside the line and a bare LF at its end, in the SASL mode as well.
        let (_, r) = rx.receive(b"*\n", LineMode::SaslResponse);
        assert!(r.unwrap().unwrap().ends_with_bare_lf());
        let (_, r) = rx.receive(b"AGFsaWNl\r\r\n", LineMode::SaslResponse);
        let line = r.unwrap().unwrap();
        assert!(!line.ends_with_bare_lf());
        assert_eq!(line.text(), b"AGFsaWNl\r");
    }

    #[test]
    fn line_endings_are_judged_the_same_however_the_reads_fall() {
        let corpus: &[u8] = b"EHLO a\r\nNOOP\nRSET\r\r\nMAIL\0x\r\n\r\n\n\rQUIT\r\n";
        let mut whole = CommandReceiver::default();
        let expected = run(&mut whole, &[corpus], LineMode::Command);
        assert_eq!(
            expected,
            vec![
                Event::Line(b"EHLO a".to_vec()),
                Event::BareLf(b"NOOP".to_vec()),
                Event::Line(b"RSET\r".to_vec()),
                Event::Line(b"MAIL\0x".to_vec()),
                Event::Line(b"".to_vec()),
                Event::BareLf(b"".to_vec()),
                Event::Line(b"\rQUIT".to_vec()),
            ]
        );
        for split in 0..=corpus.len() {
            let (a, b) = corpus.split_at(split);
            let mut rx = CommandReceiver::default();
            assert_eq!(
                run(&mut rx, &[a, b], LineMode::Command),
                expected,
                "{split}"
            );
        }
        let mut rx = CommandReceiver::default();
        assert_eq!(
            run(&mut rx, &chunked(corpus, 1), LineMode::Command),
            expected
        );
    }

    #[test]
    fn over_long_line_is_reported_once_at_its_end_and_the_next_line_is_intact() {
        let mut rx = CommandReceiver::new(32, 64);
        let mut input = b"NOOP ".to_vec();
        input.extend(std::iter::repeat_n(b'a', 100));
        input.extend_from_slice(b"\r\nQUIT\r\n");
        let events = run(&mut rx, &[&input], LineMode::Command);
        assert_eq!(
            events,
            vec![
                Event::TooLong(LineError::CommandTooLong { limit: 32 }),
                Event::Line(b"QUIT".to_vec())
            ]
        );
        assert_eq!(
            LineError::CommandTooLong { limit: 32 }.reply(),
            b"500 5.5.2 Line too long\r\n"
        );
    }

    #[test]
    fn over_long_line_never_buffers_more_than_the_limit() {
        let mut rx = CommandReceiver::new(32, 64);
        for _ in 0..1000 {
            let (n, r) = rx.receive(&[b'x'; 100], LineMode::Command);
            assert_eq!((n, r), (100, Ok(None)));
            assert!(rx.partial.len() < 64);
        }
        let (_, r) = rx.receive(b"\r\n", LineMode::Command);
        assert_eq!(r, Err(LineError::CommandTooLong { limit: 32 }));
    }

    #[test]
    fn line_exactly_at_the_limit_is_accepted_and_one_more_octet_is_refused() {
        let mut rx = CommandReceiver::new(16, 16);
        let (_, r) = rx.receive(b"NOOP 123456789\r\n", LineMode::Command);
        assert!(r.unwrap().is_some());
        let (_, r) = rx.receive(b"NOOP 1234567890\r\n", LineMode::Command);
        assert_eq!(r, Err(LineError::CommandTooLong { limit: 16 }));
        // The same with the CR as the last octet of one read and the LF in the next.
        let (_, r) = rx.receive(b"NOOP 123456789\r", LineMode::Command);
        assert_eq!(r, Ok(None));
        let (_, r) = rx.receive(b"\n", LineMode::Command);
        assert!(!r.unwrap().unwrap().ends_with_bare_lf());
        let (_, r) = rx.receive(b"NOOP 1234567890\r", LineMode::Command);
        assert_eq!(r, Ok(None));
        let (_, r) = rx.receive(b"\n", LineMode::Command);
        assert_eq!(r, Err(LineError::CommandTooLong { limit: 16 }));
    }

    #[test]
    fn auth_lines_get_the_larger_limit_even_with_the_verb_split_across_reads() {
        let mut line = b"AUTH XOAUTH2 ".to_vec();
        line.extend(std::iter::repeat_n(b'A', 10_000));
        line.extend_from_slice(b"\r\n");
        for size in [1, 2, 3, 7, 512] {
            let mut rx = CommandReceiver::default();
            let events = run(&mut rx, &chunked(&line, size), LineMode::Command);
            assert_eq!(events, vec![Event::Line(line[..line.len() - 2].to_vec())]);
        }
        let mut long = b"NOOP ".to_vec();
        long.extend(std::iter::repeat_n(b'A', 10_000));
        long.extend_from_slice(b"\r\n");
        let mut rx = CommandReceiver::default();
        assert_eq!(
            run(&mut rx, &[&long], LineMode::Command),
            vec![Event::TooLong(LineError::CommandTooLong { limit: 2048 })]
        );
    }

    #[test]
    fn sasl_lines_get_the_auth_limit_and_its_own_error() {
        let mut rx = CommandReceiver::default();
        let mut line = vec![b'A'; 12_286];
        line.extend_from_slice(b"\r\n");
        assert_eq!(run(&mut rx, &[&line], LineMode::SaslResponse).len(), 1);
        let mut line = vec![b'A'; 12_287];
        line.extend_from_slice(b"\r\n");
        assert_eq!(
            run(&mut rx, &[&line], LineMode::SaslResponse),
            vec![Event::TooLong(LineError::AuthTooLong { limit: 12288 })]
        );
        assert_eq!(
            LineError::AuthTooLong { limit: 1 }.reply(),
            b"500 5.5.6 Authentication Exchange line is too long\r\n"
        );
    }

    #[test]
    fn reset_drops_a_partial_line_after_starttls() {
        let mut rx = CommandReceiver::default();
        let (_, r) = rx.receive(b"STARTTLS\r\nEHLO evil", LineMode::Command);
        assert_eq!(r.unwrap().unwrap().text(), b"STARTTLS");
        let _ = rx.receive(b"AUTH PLAIN", LineMode::Command);
        rx.reset();
        let (_, r) = rx.receive(b"EHLO good\r\n", LineMode::Command);
        assert_eq!(r.unwrap().unwrap().text(), b"EHLO good");
    }

    #[test]
    fn receiver_is_split_invariant() {
        let mut corpus = Vec::new();
        corpus.extend_from_slice(b"EHLO client.example.org\r\nMAIL FROM:<a@b> SIZE=10\r\n");
        corpus.extend_from_slice(b"RCPT TO:<c@d>\nNOOP\r\r\n");
        corpus.extend(std::iter::repeat_n(b'z', 5000));
        corpus.extend_from_slice(b"\r\nAUTH PLAIN ");
        corpus.extend(std::iter::repeat_n(b'A', 6000));
        corpus.extend_from_slice(b"\r\n\r\n\xff\xfe 8-bit\r\nQUIT\r\n");
        let mut whole = CommandReceiver::default();
        let expected = run(&mut whole, &[&corpus], LineMode::Command);
        assert_eq!(expected.len(), 9, "{expected:?}");
        for size in [1, 2, 3, 4, 7, 16, 64, 512] {
            let mut rx = CommandReceiver::default();
            assert_eq!(
                run(&mut rx, &chunked(&corpus, size), LineMode::Command),
                expected,
                "chunk size {size}"
            );
        }
        for split in 0..corpus.len().min(200) {
            let mut rx = CommandReceiver::default();
            let (a, b) = corpus.split_at(split);
            assert_eq!(run(&mut rx, &[a, b], LineMode::Command), expected);
        }
    }
}
