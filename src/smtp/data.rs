//! The DATA content scanner: finds the end of a message and stops SMTP smuggling.
//!
//! Message content streams through byte-exact (dot-stuffing untouched, RFC 5321 §4.5.2); only
//! `<CRLF>.<CRLF>` ends it (§4.1.1.4), the scanner starting "just after CRLF" so a first line
//! of `.` ends an empty message.
//!
//! Policy "reject" against smuggling (CVE-2023-51764 family): a bare LF or bare CR (RFC 5321
//! §2.3.8 forbids them in content) refuses the message, because a backend or a later hop that
//! ends lines differently would otherwise see a second message mailfront never judged. The scanner guarantees that the bytes it
//! lets the driver forward are always a prefix of a stream with CRLF-only line ends: a CR is
//! held back until the next byte proves it is followed by LF, and forwarding stops just before
//! the first bare CR/LF. So no lenient backend can ever find `<LF>.<LF>`, `<CR>.<CR>`,
//! `<LF>.<CRLF>` or `<CRLF>.<LF>` in what it received. After the violation the scanner keeps
//! consuming (forwarding nothing) until the real `<CRLF>.<CRLF>`, so the client's smuggled
//! "commands" are swallowed as the content they were sent as.
//!
//! What the driver does on [`DataEvent::Refusing`] (recommended): stop writing to the backend and
//! close the backend connection at once without ever sending an end of data; RFC 5321 §3.8 makes
//! the backend cancel the open transaction. At [`DataEvent::EndRefused`] answer the client
//! [`local_reply::BARE_LINE_ENDING`] (`554 5.6.0`, a permanent content error, so the client does
//! not retry the same bytes forever), then, with no backend left, answer the next command with a
//! 421 and close (QUIT may still get 221). Never send `.\r\n` to end the truncated message: that
//! would deliver it.
//!
//! [`local_reply::BARE_LINE_ENDING`]: crate::smtp::local_reply::BARE_LINE_ENDING

use std::ops::Range;

/// The `.CRLF` that ends message data (RFC 5321 §4.1.1.4): the CRLF before it belongs to the
/// content, these three octets do not.
const END_OF_DATA_DOT_LINE: u64 = 3;

/// Which bare line-ending octet refused the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BareLineEnding {
    /// LF not preceded by CR.
    Lf,
    /// CR not followed by LF.
    Cr,
}

/// What one [`DataScanner::scan`] step found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataEvent {
    /// All input consumed; the message goes on.
    NeedMore,
    /// A bare CR/LF was just found: forward nothing more for this message (reported once).
    Refusing(BareLineEnding),
    /// `<CRLF>.<CRLF>` ended a clean message; the terminator is in this step's forward bytes.
    /// Input after `consumed` is the next commands (RFC 2920 §3.1).
    End,
    /// `<CRLF>.<CRLF>` ended a refused message; nothing of it was forwarded in this step.
    EndRefused(BareLineEnding),
}

/// One step of the scanner. The bytes to forward are `"\r"` if [`DataStep::held_cr`], then
/// `input[forward]`; [`DataStep::forward_parts`] gives both.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataStep {
    /// Octets of input consumed.
    pub consumed: usize,
    /// Forward the CR held back at the end of the previous step first.
    pub held_cr: bool,
    /// The part of this step's input to forward.
    pub forward: Range<usize>,
    pub event: DataEvent,
}

impl DataStep {
    /// The bytes to write to the backend, in order.
    pub fn forward_parts<'a>(&self, input: &'a [u8]) -> [&'a [u8]; 2] {
        let held: &'static [u8] = if self.held_cr { b"\r" } else { b"" };
        [held, input.get(self.forward.clone()).unwrap_or_default()]
    }
}

/// Where the scanner is relative to line structure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum At {
    /// After CRLF (or at the start of the content).
    LineStart,
    /// Inside a line.
    Text,
    /// After a CR (held back while the message is clean).
    Cr,
    /// After a `.` at the start of a line.
    Dot,
    /// After `.` CR at the start of a line.
    DotCr,
    /// After the terminator.
    Done,
}

/// Streaming state machine over the content of one DATA command.
#[derive(Debug, Clone)]
pub struct DataScanner {
    at: At,
    violation: Option<BareLineEnding>,
    received: u64,
}

impl Default for DataScanner {
    fn default() -> Self {
        Self::new()
    }
}

impl DataScanner {
    /// A scanner for content that starts right after the DATA command's CRLF (and after the 354).
    pub fn new() -> Self {
        DataScanner {
            at: At::LineStart,
            violation: None,
            received: 0,
        }
    }

    /// Whether the end of data has been seen.
    pub fn is_done(&self) -> bool {
        self.at == At::Done
    }

    /// Octets of message content received from the client so far: dot-stuffing and line ends
    /// counted as sent, the final `.CRLF` not counted once the end is seen.
    pub fn size(&self) -> u64 {
        if self.is_done() {
            self.received.saturating_sub(END_OF_DATA_DOT_LINE)
        } else {
            self.received
        }
    }

    /// Scans `input` up to the end of data or to a newly found violation.
    ///
    /// Call again with the unconsumed rest while it is non-empty and the event is not an end;
    /// after an end, the rest is command input. Calling after the end consumes nothing.
    pub fn scan(&mut self, input: &[u8]) -> DataStep {
        let done = |consumed, event| DataStep {
            consumed,
            held_cr: false,
            forward: 0..0,
            event,
        };
        if self.at == At::Done {
            return done(0, self.end_event());
        }
        let clean = self.violation.is_none();
        // A CR from the previous step is pending exactly when we start in a CR state.
        let held_cr_pending = clean && matches!(self.at, At::Cr | At::DotCr);
        let mut i = 0;
        loop {
            if self.at == At::Text {
                // Inside a line only CR and LF matter: jump to the next one (SIMD search) and
                // take the state machine's slow path only at line ends.
                let rest = input.get(i..).unwrap_or_default();
                i = memchr::memchr2(b'\r', b'\n', rest).map_or(input.len(), |at| i + at);
            }
            let Some(&byte) = input.get(i) else {
                break;
            };
            let next = match (self.at, byte) {
                (At::Cr, b'\n') => At::LineStart,
                (At::DotCr, b'\n') => At::Done,
                (At::Cr | At::DotCr, _) => {
                    if clean {
                        return self.refuse(BareLineEnding::Cr, i, held_cr_pending);
                    }
                    // Already refused: scan this byte afresh from inside a line.
                    self.at = At::Text;
                    continue;
                }
                (_, b'\n') if clean => {
                    return self.refuse(BareLineEnding::Lf, i, held_cr_pending);
                }
                (_, b'\n') => At::Text,
                (At::Dot, b'\r') => At::DotCr,
                (_, b'\r') => At::Cr,
                (At::LineStart, b'.') => At::Dot,
                _ => At::Text,
            };
            self.at = next;
            i += 1;
            if next == At::Done {
                self.count(i);
                return if clean {
                    DataStep {
                        consumed: i,
                        held_cr: held_cr_pending,
                        forward: 0..i,
                        event: DataEvent::End,
                    }
                } else {
                    done(i, self.end_event())
                };
            }
        }
        self.count(input.len());
        if !clean || input.is_empty() {
            return done(input.len(), DataEvent::NeedMore);
        }
        // Hold back a trailing CR: it is the last byte whenever we stop in a CR state.
        let end = if matches!(self.at, At::Cr | At::DotCr) {
            input.len().saturating_sub(1)
        } else {
            input.len()
        };
        DataStep {
            consumed: input.len(),
            held_cr: held_cr_pending,
            forward: 0..end,
            event: DataEvent::NeedMore,
        }
    }

    /// Records the first violation: a bare CR (the CR is `input[i - 1]`, or the held CR when
    /// `i == 0`) or a bare LF (`input[i]`). Everything before it is forwarded; nothing after.
    fn refuse(&mut self, kind: BareLineEnding, i: usize, held_cr_pending: bool) -> DataStep {
        // The byte after a bare CR is not consumed: the next step scans it from inside a line.
        let (consumed, forward_end) = match kind {
            BareLineEnding::Lf => (i + 1, i),
            BareLineEnding::Cr => (i, i.saturating_sub(1)),
        };
        self.at = At::Text;
        self.violation = Some(kind);
        self.count(consumed);
        DataStep {
            consumed,
            // With i > 0 the held CR was completed by an LF at input[0]: it is a clean CRLF.
            held_cr: held_cr_pending && i > 0,
            forward: 0..forward_end,
            event: DataEvent::Refusing(kind),
        }
    }

    fn count(&mut self, octets: usize) {
        self.received = self
            .received
            .saturating_add(u64::try_from(octets).unwrap_or(u64::MAX));
    }

    fn end_event(&self) -> DataEvent {
        match self.violation {
            Some(kind) => DataEvent::EndRefused(kind),
            None => DataEvent::End,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Everything a driver observes: the forwarded bytes, the events, and where the end fell.
    #[derive(Debug, PartialEq, Eq)]
    struct Outcome {
        forwarded: Vec<u8>,
        events: Vec<DataEvent>,
        /// Offset in the whole input just after the terminator.
        end_at: Option<usize>,
        size: u64,
    }

    fn run(chunks: &[&[u8]]) -> Outcome {
        let mut scanner = DataScanner::new();
        let mut forwarded = Vec::new();
        let mut events = Vec::new();
        let mut offset = 0;
        let mut end_at = None;
        'outer: for chunk in chunks {
            let mut rest: &[u8] = chunk;
            loop {
                let step = scanner.scan(rest);
                assert!(step.consumed <= rest.len());
                for part in step.forward_parts(rest) {
                    forwarded.extend_from_slice(part);
                }
                offset += step.consumed;
                rest = &rest[step.consumed..];
                match step.event {
                    DataEvent::NeedMore => {
                        assert!(rest.is_empty());
                        break;
                    }
                    DataEvent::End | DataEvent::EndRefused(_) => {
                        events.push(step.event);
                        end_at = Some(offset);
                        break 'outer;
                    }
                    DataEvent::Refusing(_) => events.push(step.event),
                }
            }
        }
        Outcome {
            forwarded,
            events,
            end_at,
            size: scanner.size(),
        }
    }

    fn whole(input: &[u8]) -> Outcome {
        run(&[input])
    }

    fn chunked(input: &[u8], size: usize) -> Outcome {
        run(&input.chunks(size).collect::<Vec<_>>())
    }

    /// Every CR is followed by LF and every LF preceded by CR, counting a trailing CR as pending.
    fn crlf_only(bytes: &[u8]) -> bool {
        bytes.iter().enumerate().all(|(i, &b)| match b {
            b'\r' => matches!(bytes.get(i + 1), Some(b'\n') | None),
            b'\n' => i > 0 && bytes[i - 1] == b'\r',
            _ => true,
        })
    }

    /// Would a lenient backend see an end of data anywhere before the real end?
    fn lenient_end_inside(bytes: &[u8]) -> bool {
        let seqs: [&[u8]; 5] = [b"\n.\n", b"\r\n.\n", b"\n.\r\n", b"\r.\r", b"\r\n.\r\n"];
        let padded = [b"\r\n", bytes].concat();
        seqs.iter()
            .any(|s| padded.windows(s.len()).any(|w| w == *s))
    }

    #[test]
    fn only_crlf_dot_crlf_ends_the_message_and_is_forwarded() {
        let input = b"Subject: x\r\n\r\nbody\r\n.\r\nMAIL FROM:<a@b>\r\n";
        let out = whole(input);
        assert_eq!(out.events, vec![DataEvent::End]);
        assert_eq!(out.forwarded, b"Subject: x\r\n\r\nbody\r\n.\r\n");
        assert_eq!(out.end_at, Some(input.len() - b"MAIL FROM:<a@b>\r\n".len()));
        assert_eq!(out.size, (b"Subject: x\r\n\r\nbody\r\n".len()) as u64);
    }

    #[test]
    fn a_first_line_of_dot_ends_an_empty_message() {
        let out = whole(b".\r\nQUIT\r\n");
        assert_eq!(out.events, vec![DataEvent::End]);
        assert_eq!(out.forwarded, b".\r\n");
        assert_eq!(out.end_at, Some(3));
        assert_eq!(out.size, 0);
    }

    #[test]
    fn dot_stuffed_lines_pass_through_untouched() {
        let input = b"..leading dot\r\n..\r\n.x\r\n.\r\n";
        let out = whole(input);
        assert_eq!(out.events, vec![DataEvent::End]);
        assert_eq!(out.forwarded, input);
    }

    #[test]
    fn smuggling_terminators_never_end_the_message_and_never_reach_the_backend() {
        for smuggle in [
            &b"\n.\n"[..],
            b"\r\n.\n",
            b"\n.\r\n",
            b"\r.\r",
            b"\r.\r\n",
            b"\n.\r",
        ] {
            let mut input = b"Subject: hi\r\n\r\nbody".to_vec();
            input.extend_from_slice(smuggle);
            input.extend_from_slice(b"MAIL FROM:<ceo@example.com>\r\nRCPT TO:<x@y>\r\nDATA\r\n");
            input.extend_from_slice(b"forged\r\n.\r\nQUIT\r\n");
            for size in [1, 2, 3, 4, 7, 16, 64, 512] {
                let out = chunked(&input, size);
                assert!(
                    matches!(
                        out.events[..],
                        [DataEvent::Refusing(_), DataEvent::EndRefused(_)]
                    ),
                    "{smuggle:?}: {:?}",
                    out.events
                );
                assert_eq!(out.end_at, Some(input.len() - b"QUIT\r\n".len()));
                assert!(crlf_only(&out.forwarded), "{:?}", out.forwarded);
                assert!(!lenient_end_inside(&out.forwarded), "{:?}", out.forwarded);
                assert!(out.forwarded.starts_with(b"Subject: hi\r\n\r\n"));
                assert!(!out.forwarded.windows(4).any(|w| w == b"MAIL"));
            }
        }
    }

    #[test]
    fn bare_lf_is_reported_as_lf_and_bare_cr_as_cr() {
        assert_eq!(
            whole(b"a\nb\r\n.\r\n").events,
            vec![
                DataEvent::Refusing(BareLineEnding::Lf),
                DataEvent::EndRefused(BareLineEnding::Lf)
            ]
        );
        assert_eq!(
            whole(b"a\rb\r\n.\r\n").events,
            vec![
                DataEvent::Refusing(BareLineEnding::Cr),
                DataEvent::EndRefused(BareLineEnding::Cr)
            ]
        );
        assert_eq!(whole(b"a\r\r\n.\r\n").forwarded, b"a");
        assert_eq!(whole(b"\n.\r\n").forwarded, b"");
    }

    #[test]
    fn content_before_a_bare_line_ending_is_forwarded_and_nothing_after() {
        let out = whole(b"one\r\ntwo\nthree\r\n.\r\n");
        assert_eq!(out.forwarded, b"one\r\ntwo");
        let out = whole(b"one\r\ntwo\rthree\r\n.\r\n");
        assert_eq!(out.forwarded, b"one\r\ntwo");
    }

    #[test]
    fn a_cr_at_a_chunk_edge_is_held_back_until_its_lf_arrives() {
        let mut scanner = DataScanner::new();
        let step = scanner.scan(b"abc\r");
        assert_eq!(step.forward_parts(b"abc\r"), [&b""[..], b"abc"]);
        let step = scanner.scan(b"\ndef");
        assert!(step.held_cr);
        assert_eq!(step.forward_parts(b"\ndef"), [&b"\r"[..], b"\ndef"]);
        // A held CR followed by anything else is a bare CR and is never forwarded.
        let mut scanner = DataScanner::new();
        scanner.scan(b"abc\r");
        let step = scanner.scan(b".\r");
        assert_eq!(step.event, DataEvent::Refusing(BareLineEnding::Cr));
        assert_eq!(step.forward_parts(b".\r"), [&b""[..], b""]);
        assert_eq!(step.consumed, 0);
    }

    #[test]
    fn size_counts_content_octets_as_received() {
        let out = whole(b"ab\r\n..c\r\n.\r\n");
        assert_eq!(out.size, 9);
    }

    #[test]
    fn scanning_after_the_end_consumes_nothing() {
        let mut scanner = DataScanner::new();
        assert_eq!(scanner.scan(b".\r\n").event, DataEvent::End);
        let step = scanner.scan(b"QUIT\r\n");
        assert_eq!((step.consumed, step.event), (0, DataEvent::End));
        assert!(scanner.is_done());
    }

    fn body_corpus() -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(b"From: a@b\r\nSubject: \xc3\xa9t\xc3\xa9\r\n\r\n");
        for i in 0..200u32 {
            match i % 5 {
                0 => body.extend_from_slice(b"..stuffed line\r\n"),
                1 => body.extend_from_slice(b".\xff\xfe\x00 binary-ish\r\n"),
                2 => body.extend_from_slice(b"\r\n"),
                3 => body.extend_from_slice(b"..\r\n"),
                _ => body.extend(std::iter::repeat_n(b'x', (i as usize * 7) % 300)),
            }
            body.extend_from_slice(b"\r\n");
        }
        body
    }

    #[test]
    fn scanner_is_split_invariant_over_a_clean_body() {
        let mut input = body_corpus();
        input.extend_from_slice(b".\r\nNOOP\r\n");
        let expected = whole(&input);
        assert_eq!(expected.events, vec![DataEvent::End]);
        assert_eq!(expected.forwarded, &input[..input.len() - 6]);
        for size in 1..=512 {
            assert_eq!(chunked(&input, size), expected, "chunk size {size}");
        }
        for split in 0..input.len() {
            let (a, b) = input.split_at(split);
            assert_eq!(run(&[a, b]), expected, "split at {split}");
        }
    }

    #[test]
    fn scanner_is_split_invariant_over_a_poisoned_body() {
        let mut input = body_corpus();
        input.extend_from_slice(b"evil\n.\nMAIL FROM:<x@y>\r\nx\r.\rRCPT\n.\r");
        input.extend_from_slice(b"more\r\n.\r\nQUIT\r\n");
        let expected = whole(&input);
        assert_eq!(
            expected.events,
            vec![
                DataEvent::Refusing(BareLineEnding::Lf),
                DataEvent::EndRefused(BareLineEnding::Lf)
            ]
        );
        assert_eq!(expected.end_at, Some(input.len() - 6));
        for size in [1, 2, 3, 4, 7, 16, 64, 512] {
            assert_eq!(chunked(&input, size), expected, "chunk size {size}");
        }
    }

    #[test]
    fn forwarded_bytes_are_crlf_clean_for_every_short_input() {
        // Exhaustive over all strings of length <= 7 in the alphabet that matters.
        let alphabet = [b'\r', b'\n', b'.', b'a'];
        let mut inputs: Vec<Vec<u8>> = vec![Vec::new()];
        let mut layer: Vec<Vec<u8>> = vec![Vec::new()];
        for _ in 0..7 {
            layer = layer
                .iter()
                .flat_map(|s| {
                    alphabet.iter().map(move |&b| {
                        let mut t = s.clone();
                        t.push(b);
                        t
                    })
                })
                .collect();
            inputs.extend(layer.iter().cloned());
        }
        for input in &inputs {
            let expected = whole(input);
            assert!(crlf_only(&expected.forwarded), "{input:?}");
            let before_end = match expected.events.last() {
                Some(DataEvent::End) => &expected.forwarded[..expected.forwarded.len() - 3],
                _ => &expected.forwarded[..],
            };
            assert!(!lenient_end_inside(before_end), "{input:?}");
            assert_eq!(chunked(input, 1), expected, "{input:?}");
        }
    }
}
