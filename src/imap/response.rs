//! Server-response receiver for the backend→client direction before authentication
//! (RFC 9051 §2.2.2, §7).
//!
//! Pull-style like [`crate::imap::command`]: the driver calls [`ResponseReceiver::next`] with its
//! read buffer and drains `consumed`. Each event is one whole response (its first line, any
//! literals and their following lines), bounded by [`ResponseLimits`], with the few facts the
//! driver needs parsed: greeting, tagged completion, status, response code, continuation.

use crate::line::Step;
use crate::line::{find_line, trim_line_end};

/// Longest backend line before authentication.
pub const DEFAULT_RESPONSE_LINE_LIMIT: usize = 16384;
/// Largest whole response (lines and literals) before authentication.
pub const DEFAULT_RESPONSE_LIMIT: usize = 65536;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponseLimits {
    pub line: usize,
    pub response: usize,
}

impl Default for ResponseLimits {
    fn default() -> Self {
        ResponseLimits {
            line: DEFAULT_RESPONSE_LINE_LIMIT,
            response: DEFAULT_RESPONSE_LIMIT,
        }
    }
}

/// Status word of a status response (RFC 9051 §7.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    No,
    Bad,
    PreAuth,
    Bye,
}

impl Status {
    fn parse(word: &[u8]) -> Option<Status> {
        [
            (&b"OK"[..], Status::Ok),
            (b"NO", Status::No),
            (b"BAD", Status::Bad),
            (b"PREAUTH", Status::PreAuth),
            (b"BYE", Status::Bye),
        ]
        .into_iter()
        .find(|(name, _)| word.eq_ignore_ascii_case(name))
        .map(|(_, status)| status)
    }
}

/// Who a response is addressed to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResponseKind {
    /// `+ …`: a command continuation request (RFC 9051 §7.5).
    Continuation,
    /// `* …`.
    Untagged,
    /// `tag …`: the completion of the client command with this tag.
    Tagged { tag: Vec<u8> },
}

/// One whole server response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Exactly as received: first line, literals and following lines, line ends included.
    pub raw: Vec<u8>,
    pub kind: ResponseKind,
    /// For status responses (tagged OK/NO/BAD, untagged OK/NO/BAD/PREAUTH/BYE).
    pub status: Option<Status>,
    /// The name of the `[CODE …]` after the status word, as sent.
    pub code: Option<Vec<u8>>,
    /// The first word after `*` for untagged responses (`CAPABILITY`, `ID`, `OK`, `3`, …).
    pub keyword: Option<Vec<u8>>,
}

impl Response {
    /// `Some(status)` when this is the tagged completion of `tag` (tags compare exactly).
    pub fn completion_of(&self, tag: &[u8]) -> Option<Status> {
        match &self.kind {
            ResponseKind::Tagged { tag: own } if own == tag => self.status,
            _ => None,
        }
    }

    /// `* CAPABILITY …` (RFC 9051 §7.2.2).
    pub fn is_capability_data(&self) -> bool {
        self.kind == ResponseKind::Untagged && self.keyword_is("CAPABILITY")
    }

    /// `* ID …` (RFC 2971 §3.2).
    pub fn is_id_data(&self) -> bool {
        self.kind == ResponseKind::Untagged && self.keyword_is("ID")
    }

    /// The response carries a `[CAPABILITY …]` code.
    #[cfg(test)]
    fn has_capability_code(&self) -> bool {
        self.code
            .as_deref()
            .is_some_and(|code| code.eq_ignore_ascii_case(b"CAPABILITY"))
    }

    pub fn is_continuation(&self) -> bool {
        self.kind == ResponseKind::Continuation
    }

    fn keyword_is(&self, word: &str) -> bool {
        self.keyword
            .as_deref()
            .is_some_and(|k| k.eq_ignore_ascii_case(word.as_bytes()))
    }
}

/// A backend that breaks these is not followed further: answer the client with
/// [`crate::imap::reply::bye_unavailable`] and close.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ResponseError {
    #[error("backend line longer than {limit} octets")]
    LineTooLong { limit: usize },
    #[error("backend response longer than {limit} octets")]
    ResponseTooLong { limit: usize },
    #[error("backend greeting is not * OK, * PREAUTH or * BYE")]
    InvalidGreeting,
    #[error("malformed backend response")]
    Malformed,
}

/// What the receiver found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerEvent {
    /// The first response of the connection: `* OK`, `* PREAUTH` or `* BYE` (RFC 9051 §7.1).
    /// A PREAUTH greeting must never reach the client (see [`crate::imap::reply::bye_preauth`]).
    Greeting(Response),
    Response(Response),
    /// Fatal; the receiver drops everything after it.
    Rejected(ResponseError),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// At the start of a line of the current response (or of a new one when `partial` is empty).
    Line,
    Literal {
        remaining: usize,
    },
    Failed,
}

#[derive(Debug, Clone)]
pub struct ResponseReceiver {
    limits: ResponseLimits,
    state: State,
    greeted: bool,
    partial: Vec<u8>,
    first_line_len: usize,
}

impl Default for ResponseReceiver {
    fn default() -> Self {
        Self::new(ResponseLimits::default())
    }
}

impl ResponseReceiver {
    pub fn new(limits: ResponseLimits) -> Self {
        ResponseReceiver {
            limits,
            state: State::Line,
            greeted: false,
            partial: Vec::new(),
            first_line_len: 0,
        }
    }

    pub fn next(&mut self, buf: &[u8]) -> Step<ServerEvent> {
        let mut consumed = 0;
        loop {
            let rest = buf.get(consumed..).unwrap_or_default();
            let before = self.state.clone();
            let (used, event) = self.advance(rest);
            consumed += used;
            // A zero-length literal completes without input: progress is a state change too.
            if event.is_some() || (used == 0 && self.state == before) {
                return Step { consumed, event };
            }
        }
    }

    fn fail(&mut self, error: ResponseError) -> Option<ServerEvent> {
        self.state = State::Failed;
        self.partial.clear();
        Some(ServerEvent::Rejected(error))
    }

    fn advance(&mut self, rest: &[u8]) -> (usize, Option<ServerEvent>) {
        match self.state {
            State::Failed => (rest.len(), None),
            State::Literal { remaining } => {
                let take = remaining.min(rest.len());
                self.partial
                    .extend_from_slice(rest.get(..take).unwrap_or_default());
                self.state = if take == remaining {
                    State::Line
                } else {
                    State::Literal {
                        remaining: remaining - take,
                    }
                };
                (take, None)
            }
            State::Line => {
                let n = match find_line(rest, self.limits.line) {
                    Ok(None) => return (0, None),
                    Ok(Some(n)) => n,
                    Err(_) => {
                        return (
                            rest.len(),
                            self.fail(ResponseError::LineTooLong {
                                limit: self.limits.line,
                            }),
                        );
                    }
                };
                let line = rest.get(..n).unwrap_or_default();
                if self.partial.len().saturating_add(n) > self.limits.response {
                    return (
                        n,
                        self.fail(ResponseError::ResponseTooLong {
                            limit: self.limits.response,
                        }),
                    );
                }
                let first = self.partial.is_empty();
                self.partial.extend_from_slice(line);
                if first {
                    self.first_line_len = n;
                }
                let content = trim_line_end(line);
                // Continuation requests never announce literals; an unbalanced quote is the
                // client's text, not framing, so it does not hide a literal either.
                let literal = if first && content.starts_with(b"+") {
                    None
                } else {
                    literal_at_end(content)
                };
                if let Some(size) = literal {
                    if self.partial.len().saturating_add(size) > self.limits.response {
                        return (
                            n,
                            self.fail(ResponseError::ResponseTooLong {
                                limit: self.limits.response,
                            }),
                        );
                    }
                    self.state = State::Literal { remaining: size };
                    return (n, None);
                }
                let raw = std::mem::take(&mut self.partial);
                let first_line = raw.get(..self.first_line_len).unwrap_or_default();
                let Some(response) = classify(first_line, raw.clone()) else {
                    let error = if self.greeted {
                        ResponseError::Malformed
                    } else {
                        ResponseError::InvalidGreeting
                    };
                    return (n, self.fail(error));
                };
                if self.greeted {
                    return (n, Some(ServerEvent::Response(response)));
                }
                self.greeted = true;
                let greeting = response.kind == ResponseKind::Untagged
                    && matches!(
                        response.status,
                        Some(Status::Ok | Status::PreAuth | Status::Bye)
                    );
                if greeting {
                    (n, Some(ServerEvent::Greeting(response)))
                } else {
                    (n, self.fail(ResponseError::InvalidGreeting))
                }
            }
        }
    }
}

/// Parses the first line of a response into its kind, status, code and keyword.
fn classify(first_line: &[u8], raw: Vec<u8>) -> Option<Response> {
    let content = trim_line_end(first_line);
    if content.starts_with(b"+") {
        return Some(Response {
            raw,
            kind: ResponseKind::Continuation,
            status: None,
            code: None,
            keyword: None,
        });
    }
    let (head, rest) = split_word(content);
    if head.is_empty() {
        return None;
    }
    let kind = if head == b"*" {
        ResponseKind::Untagged
    } else if head.iter().all(|&b| (0x21..0x7f).contains(&b) && b != b'+') {
        ResponseKind::Tagged { tag: head.to_vec() }
    } else {
        return None;
    };
    let (word, after) = split_word(rest);
    let status = Status::parse(word);
    if matches!(kind, ResponseKind::Tagged { .. })
        && !matches!(status, Some(Status::Ok | Status::No | Status::Bad))
    {
        return None;
    }
    let code = status
        .and_then(|_| response_code(after))
        .map(<[u8]>::to_vec);
    let keyword = match kind {
        ResponseKind::Untagged if !word.is_empty() => Some(word.to_vec()),
        _ => None,
    };
    Some(Response {
        raw,
        kind,
        status,
        code,
        keyword,
    })
}

/// Splits at the first space: (word, rest after the space).
fn split_word(s: &[u8]) -> (&[u8], &[u8]) {
    match s.iter().position(|&b| b == b' ') {
        Some(pos) => (
            s.get(..pos).unwrap_or_default(),
            s.get(pos + 1..).unwrap_or_default(),
        ),
        None => (s, b""),
    }
}

/// The code name of `[NAME …]` at the start of resp-text.
pub(crate) fn response_code(text: &[u8]) -> Option<&[u8]> {
    let inner = text.strip_prefix(b"[")?;
    let end = inner.iter().position(|&b| b == b' ' || b == b']')?;
    inner.get(..end).filter(|name| !name.is_empty())
}

/// The size of a literal (`{n}`, `{n+}`, `~{n}`, `~{n+}`) announced at the very end of a
/// response line, outside quoted strings (RFC 9051 §4.3). A line with a CR or NUL inside, or an
/// unterminated quote, announces none: the backend's text is then not framing.
fn literal_at_end(content: &[u8]) -> Option<usize> {
    let mut in_quote = false;
    let mut escaped = false;
    for &b in content {
        if b == b'\r' || b == 0 {
            return None;
        }
        if in_quote {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_quote = false;
            }
        } else if b == b'"' {
            in_quote = true;
        }
    }
    if in_quote {
        return None;
    }
    let inner_end = content.strip_suffix(b"}")?;
    let open = inner_end.iter().rposition(|&b| b == b'{')?;
    let inner = inner_end.get(open + 1..)?;
    let digits = inner.strip_suffix(b"+").unwrap_or(inner);
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let size = digits.iter().try_fold(0u64, |acc, &d| {
        acc.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    });
    Some(
        size.and_then(|s| usize::try_from(s).ok())
            .unwrap_or(usize::MAX),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::imap::capability::{CapabilityView, rewrite_response};
    use crate::line::split::{CHUNKS, drive};

    fn events_with(input: &[u8], chunk: usize, limits: ResponseLimits) -> Vec<ServerEvent> {
        let mut rx = ResponseReceiver::new(limits);
        drive(&mut rx, input, chunk, |rx, buf| rx.next(buf), |_, _| true).0
    }

    fn assert_split_invariant(input: &[u8], limits: ResponseLimits) -> Vec<ServerEvent> {
        let whole = events_with(input, 0, limits);
        for chunk in CHUNKS {
            assert_eq!(events_with(input, chunk, limits), whole, "chunk {chunk}");
        }
        whole
    }

    fn responses(input: &[u8]) -> Vec<Response> {
        assert_split_invariant(input, ResponseLimits::default())
            .into_iter()
            .map(|event| match event {
                ServerEvent::Greeting(r) | ServerEvent::Response(r) => r,
                ServerEvent::Rejected(e) => panic!("{e}"),
            })
            .collect()
    }

    const SESSION: &[u8] = b"* OK [CAPABILITY IMAP4rev1 STARTTLS AUTH=PLAIN ID] Dovecot ready.\r\n\
* CAPABILITY IMAP4rev1 STARTTLS AUTH=PLAIN ID\r\n\
a1 OK Pre-login capabilities listed, post-login capabilities have more.\r\n\
* ID (\"name\" {7}\r\nDovecot \"x\" NIL)\r\n\
mf00000000000000ff OK ID completed.\r\n\
+ \r\n\
+ YWJj\r\n\
a2 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n\
a3 OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n";

    #[test]
    fn a_pre_auth_session_is_classified() {
        let got = responses(SESSION);
        assert_eq!(got.len(), 9);
        assert_eq!(got[0].status, Some(Status::Ok));
        assert!(got[0].has_capability_code());
        assert!(got[1].is_capability_data());
        assert_eq!(got[2].completion_of(b"a1"), Some(Status::Ok));
        assert_eq!(got[2].completion_of(b"a2"), None);
        assert!(got[3].is_id_data());
        assert_eq!(got[3].raw, b"* ID (\"name\" {7}\r\nDovecot \"x\" NIL)\r\n");
        assert_eq!(
            got[4].completion_of(b"mf00000000000000ff"),
            Some(Status::Ok)
        );
        assert!(got[5].is_continuation() && got[6].is_continuation());
        assert_eq!(got[7].completion_of(b"a2"), Some(Status::No));
        assert_eq!(got[7].code.as_deref(), Some(&b"AUTHENTICATIONFAILED"[..]));
        assert_eq!(got[8].completion_of(b"a3"), Some(Status::Ok));
        // Responses are byte-exact.
        let joined: Vec<u8> = got.iter().flat_map(|r| r.raw.clone()).collect();
        assert_eq!(joined, SESSION);
    }

    #[test]
    fn the_first_response_is_the_greeting() {
        let got = assert_split_invariant(
            b"* PREAUTH IMAP4rev1 ready\r\n* OK x\r\n",
            ResponseLimits::default(),
        );
        let ServerEvent::Greeting(g) = &got[0] else {
            panic!()
        };
        assert_eq!(g.status, Some(Status::PreAuth));
        assert!(matches!(got[1], ServerEvent::Response(_)));
        let got = events_with(b"* BYE overloaded\r\n", 0, ResponseLimits::default());
        let ServerEvent::Greeting(g) = &got[0] else {
            panic!()
        };
        assert_eq!(g.status, Some(Status::Bye));
    }

    #[test]
    fn anything_else_as_a_greeting_is_rejected() {
        for input in [
            &b"+ hi\r\n"[..],
            b"a OK hi\r\n",
            b"* CAPABILITY IMAP4rev1\r\n",
            b"220 smtp\r\n",
        ] {
            assert_eq!(
                events_with(input, 0, ResponseLimits::default()),
                vec![ServerEvent::Rejected(ResponseError::InvalidGreeting)]
            );
        }
    }

    #[test]
    fn malformed_responses_are_fatal() {
        let got = events_with(
            b"* OK hi\r\na FOO bar\r\n* OK more\r\n",
            0,
            ResponseLimits::default(),
        );
        assert_eq!(got[1], ServerEvent::Rejected(ResponseError::Malformed));
        assert_eq!(got.len(), 2);
    }

    #[test]
    fn limits_bound_lines_and_whole_responses() {
        let limits = ResponseLimits {
            line: 16,
            response: 32,
        };
        let got = assert_split_invariant(b"* OK hi\r\n* OK 0123456789abcdef\r\n", limits);
        assert_eq!(
            got[1],
            ServerEvent::Rejected(ResponseError::LineTooLong { limit: 16 })
        );
        let got = assert_split_invariant(b"* OK hi\r\n* ID ({40}\r\n", limits);
        assert_eq!(
            got[1],
            ServerEvent::Rejected(ResponseError::ResponseTooLong { limit: 32 })
        );
        let got = assert_split_invariant(
            b"* OK hi\r\n* X {1}\r\na {1}\r\nb {1}\r\nc {1}\r\nd {1}\r\ne\r\n",
            limits,
        );
        assert_eq!(
            got[1],
            ServerEvent::Rejected(ResponseError::ResponseTooLong { limit: 32 })
        );
    }

    #[test]
    fn zero_length_literal_completes_without_more_input() {
        let got = responses(b"* OK hi\r\n* ID (\"a\" {0}\r\n)\r\n");
        assert_eq!(got[1].raw, b"* ID (\"a\" {0}\r\n)\r\n");
    }

    #[test]
    fn literal_at_a_chunk_edge_keeps_the_response_whole() {
        let input = b"* OK hi\r\n* ID (\"name\" {4}\r\n\r\n)\r {4}\r\n)\r\n\r\na OK done\r\n";
        let got = responses(input);
        assert_eq!(
            got[1].raw,
            b"* ID (\"name\" {4}\r\n\r\n)\r {4}\r\n)\r\n\r\n".to_vec()
        );
        assert_eq!(got[2].completion_of(b"a"), Some(Status::Ok));
    }

    #[test]
    fn greeting_and_capability_data_rewrite_consistently() {
        let got = responses(SESSION);
        let before = rewrite_response(&got[0].raw, CapabilityView::Cleartext).unwrap();
        assert_eq!(
            before,
            b"* OK [CAPABILITY IMAP4rev1 STARTTLS ID LOGINDISABLED] Dovecot ready.\r\n"
        );
        let listed = rewrite_response(&got[1].raw, CapabilityView::Cleartext).unwrap();
        assert_eq!(
            listed,
            b"* CAPABILITY IMAP4rev1 STARTTLS ID LOGINDISABLED\r\n"
        );
        let after = rewrite_response(&got[1].raw, CapabilityView::Tls).unwrap();
        assert_eq!(after, b"* CAPABILITY IMAP4rev1 AUTH=PLAIN ID\r\n");
    }
}
