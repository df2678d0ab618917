//! Client-command receiver for the IMAP not-authenticated state (RFC 9051 §2.2, §4.3; RFC 7888).
//!
//! Pull-style and sans-I/O: the driver keeps its own read buffer, calls
//! [`CommandReceiver::next`] with it, drains `consumed` octets and acts on the event. A command
//! arrives as pieces so the driver can decide from the first line (tag and name) *before* any
//! literal octet is forwarded: [`ClientEvent::Command`], then for each literal announced at a line
//! end a [`ClientEvent::Literal`] and a further [`ClientEvent::Segment`]. After the first line the
//! driver may switch the command to *collect* mode (the rest arrives as one
//! [`ClientEvent::Collected`], used for ID rewriting) or *discard* mode (the rest is swallowed, used
//! when mailfront answers the command itself).
//!
//! Synchronising literals `{n}` wait for a `+` continuation (RFC 9051 §2.2.1). In stream mode the
//! backend sends it and the driver relays it; in collect mode the receiver asks the driver to send
//! one ([`ClientEvent::ContinuationRequired`]). Non-synchronising literals `{n+}` (RFC 7888; the
//! LITERAL- extension uses the same `{n+}` syntax with a 4096-octet cap) arrive unasked. `~{n}`
//! literal8 (RFC 3516) is framed the same way so the parser stays in step.

use crate::line::{find_line, trim_line_end};

/// Longest command line before authentication (Dovecot's `IMAP_LOGIN_MAX_LINE_LENGTH`).
pub const DEFAULT_LINE_LIMIT: usize = 8192;
/// Largest literal accepted before authentication (`limits.imap_literal`).
pub const DEFAULT_LITERAL_LIMIT: usize = 65536;
/// Largest command the receiver assembles in collect mode (all lines and literals together).
pub const DEFAULT_COLLECT_LIMIT: usize = 65536;

/// Bounds enforced inside the receiver, so a client can never make it buffer more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// One line including its CRLF.
    pub line: usize,
    /// One literal's octets.
    pub literal: usize,
    /// A whole command in collect mode.
    pub collect: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            line: DEFAULT_LINE_LIMIT,
            literal: DEFAULT_LITERAL_LIMIT,
            collect: DEFAULT_COLLECT_LIMIT,
        }
    }
}

/// A literal announced at the end of a line: `{n}`, `{n+}`, `~{n}` or `~{n+}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LiteralSpec {
    pub size: usize,
    /// `{n}`: the client waits for a `+` continuation before sending the octets.
    pub synchronizing: bool,
    /// `~{n}` (literal8, RFC 3516).
    pub binary: bool,
}

/// The first line of a command: enough to decide before anything else is forwarded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandStart {
    pub tag: Vec<u8>,
    /// The command name as sent (compare with [`CommandStart::is`]).
    pub name: Vec<u8>,
    /// The line exactly as received, CRLF included.
    pub raw: Vec<u8>,
    /// The literal this line announces, if any; `None` means the command is complete.
    pub literal: Option<LiteralSpec>,
}

impl CommandStart {
    /// Case-insensitive command name comparison (RFC 9051 §9: names are case-insensitive).
    pub fn is(&self, name: &str) -> bool {
        self.name.eq_ignore_ascii_case(name.as_bytes())
    }

    /// The first line after `tag SP name`, without the separating space and the line end
    /// (a trailing literal announcement included).
    pub fn arguments(&self) -> &[u8] {
        let line = trim_line_end(&self.raw);
        let skip = self.tag.len() + 1 + self.name.len();
        let rest = line.get(skip..).unwrap_or_default();
        rest.strip_prefix(b" ").unwrap_or(rest)
    }
}

/// A later line of the current command, after a literal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub raw: Vec<u8>,
    pub literal: Option<LiteralSpec>,
}

/// A whole command assembled in collect mode: every line and literal exactly as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Collected {
    pub tag: Vec<u8>,
    pub name: Vec<u8>,
    pub raw: Vec<u8>,
}

/// One client line during an AUTHENTICATE exchange (RFC 9051 §6.2.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaslResponse {
    pub raw: Vec<u8>,
    /// The line is a single `*`: the client cancels; the backend answers with a tagged BAD.
    pub cancel: bool,
}

/// Why the receiver refused input. The receiver has already resynchronised when it reports one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    #[error("command line longer than {limit} octets")]
    LineTooLong { limit: usize },
    #[error("literal of {size} octets exceeds the {limit}-octet limit")]
    LiteralTooBig {
        size: u64,
        limit: usize,
        synchronizing: bool,
    },
    #[error("command longer than {limit} octets")]
    CommandTooLong { limit: usize },
    #[error("missing or invalid tag")]
    InvalidTag,
    #[error("missing or invalid command name")]
    InvalidCommandName,
    #[error("unterminated quoted string")]
    UnterminatedQuote,
    #[error("CR or NUL inside a command line")]
    ForbiddenOctet,
}

/// A refused command or line. `fatal` means the session cannot be resynchronised (part of the
/// command already went to the backend, or the client streams an oversized non-synchronising
/// literal): write [`Rejection::reply`] plus a `* BYE` and close.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub tag: Option<Vec<u8>>,
    pub error: CommandError,
    pub fatal: bool,
}

impl Rejection {
    /// The protocol-correct answer: tagged BAD when the tag is known (RFC 9051 §2.2.1: a BAD
    /// before the `+` stops the client sending the literal), untagged `* BAD` otherwise.
    /// Oversize gets the `[TOOBIG]` code (RFC 9051 §7.1, RFC 7888 §4).
    pub fn reply(&self) -> Vec<u8> {
        let text: &[u8] = match self.error {
            CommandError::LineTooLong { .. } => b"[TOOBIG] Command line too long",
            CommandError::LiteralTooBig { .. } => b"[TOOBIG] Literal too big",
            CommandError::CommandTooLong { .. } => b"[TOOBIG] Command too long",
            CommandError::InvalidTag => b"Missing or invalid tag",
            CommandError::InvalidCommandName => b"Missing or invalid command name",
            CommandError::UnterminatedQuote => b"Unterminated quoted string",
            CommandError::ForbiddenOctet => b"CR or NUL not allowed in a command line",
        };
        let mut out = Vec::with_capacity(text.len() + 16);
        out.extend_from_slice(self.tag.as_deref().unwrap_or(b"*"));
        out.extend_from_slice(b" BAD ");
        out.extend_from_slice(text);
        out.extend_from_slice(b"\r\n");
        out
    }
}

/// What the receiver found in the driver's buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientEvent {
    /// The first line of a command. Decide now (see [`crate::imap::policy::decide`]); in stream
    /// mode forward `raw` as is.
    Command(CommandStart),
    /// Stream mode: a further line of the current command, to forward as is.
    Segment(Segment),
    /// Stream mode: the octets of the literal just announced, to forward as is.
    Literal(Vec<u8>),
    /// Collect mode: a synchronising literal was announced; write `+ …` to the client.
    ContinuationRequired(LiteralSpec),
    /// Collect mode: the whole command.
    Collected(Collected),
    /// SASL mode: one client response line, to forward as is.
    SaslResponse(SaslResponse),
    /// Refused input; see [`Rejection`].
    Rejected(Rejection),
}

/// One call's outcome: drain `consumed` octets from the front of the buffer, then act on
/// `event`. `event == None` means everything usable was consumed and more input is needed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step<E> {
    pub consumed: usize,
    pub event: Option<E>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Stream,
    Collect,
    Discard,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// Waiting for the first line of a command.
    Idle,
    /// Waiting for `remaining` literal octets of the current command.
    Literal { spec: LiteralSpec, remaining: usize },
    /// Waiting for the next line of the current command.
    Segment,
    /// Dropping the rest of an over-long line, then back to `Idle`.
    SkipLine,
    /// Client lines are SASL responses.
    Sasl,
    /// Unrecoverable; everything is dropped.
    Failed,
}

/// The receiver; see the module documentation for the driving loop.
#[derive(Debug, Clone)]
pub struct CommandReceiver {
    limits: Limits,
    state: State,
    mode: Mode,
    tag: Vec<u8>,
    name: Vec<u8>,
    /// Literal octets (stream mode) or the whole command (collect mode) being assembled.
    buffer: Vec<u8>,
    /// Whether any piece after the first line was handed out in stream mode.
    streamed: bool,
    pending: Option<ClientEvent>,
}

impl Default for CommandReceiver {
    fn default() -> Self {
        Self::new(Limits::default())
    }
}

impl CommandReceiver {
    pub fn new(limits: Limits) -> Self {
        CommandReceiver {
            limits,
            state: State::Idle,
            mode: Mode::Stream,
            tag: Vec::new(),
            name: Vec::new(),
            buffer: Vec::new(),
            streamed: false,
            pending: None,
        }
    }

    /// True between commands (no partial command, not in an AUTHENTICATE exchange).
    pub fn is_idle(&self) -> bool {
        self.state == State::Idle && self.pending.is_none()
    }

    /// True while the receiver waits for the octets of a synchronising literal, i.e. the client
    /// waits for a `+`. If the backend answers the command with a tagged response instead, call
    /// [`CommandReceiver::discard_command`]: the client will not send the literal.
    pub fn awaits_synchronizing_literal(&self) -> bool {
        matches!(self.state, State::Literal { spec, .. } if spec.synchronizing)
    }

    /// Call right after a [`ClientEvent::Command`]: deliver the whole command as one
    /// [`ClientEvent::Collected`]. For a synchronising literal the next event is
    /// [`ClientEvent::ContinuationRequired`].
    pub fn collect_command(&mut self) {
        if self.mode != Mode::Stream || self.streamed {
            return;
        }
        self.mode = Mode::Collect;
        match self.state {
            State::Literal { spec, .. } => {
                if self.buffer.len().saturating_add(spec.size) > self.limits.collect {
                    let error = CommandError::CommandTooLong {
                        limit: self.limits.collect,
                    };
                    self.pending = Some(self.oversize(error, spec.synchronizing));
                } else if spec.synchronizing {
                    self.pending = Some(ClientEvent::ContinuationRequired(spec));
                }
            }
            State::Idle => {
                // The command was complete in its first line.
                self.pending = Some(ClientEvent::Collected(Collected {
                    tag: std::mem::take(&mut self.tag),
                    name: std::mem::take(&mut self.name),
                    raw: std::mem::take(&mut self.buffer),
                }));
                self.mode = Mode::Stream;
            }
            _ => {}
        }
    }

    /// Swallow the rest of the current command (mailfront answered it, or the backend refused a
    /// synchronising literal). A pending synchronising literal will not be sent by the client, so
    /// the command ends at once; a non-synchronising literal is read and dropped, as is every
    /// later line of the command.
    pub fn discard_command(&mut self) {
        self.pending = None;
        self.buffer.clear();
        match self.state {
            State::Literal { spec, .. } if spec.synchronizing => self.end_command(),
            State::Literal { .. } | State::Segment => self.mode = Mode::Discard,
            _ => {}
        }
    }

    /// The driver forwarded `AUTHENTICATE`: until [`CommandReceiver::end_sasl`], every client
    /// line is a SASL response, even one that looks like a command (RFC 9051 §6.2.2).
    pub fn begin_sasl(&mut self) {
        if self.state == State::Idle {
            self.state = State::Sasl;
        }
    }

    /// True during an AUTHENTICATE exchange: the next client line is a SASL response.
    pub fn in_sasl(&self) -> bool {
        self.state == State::Sasl
    }

    /// The backend sent the tagged completion of the AUTHENTICATE command.
    pub fn end_sasl(&mut self) {
        if self.state == State::Sasl {
            self.state = State::Idle;
        }
    }

    fn end_command(&mut self) {
        self.state = State::Idle;
        self.mode = Mode::Stream;
        self.streamed = false;
        self.buffer.clear();
    }

    fn reject(&mut self, tag: Option<Vec<u8>>, error: CommandError, fatal: bool) -> ClientEvent {
        if fatal {
            self.state = State::Failed;
            self.buffer.clear();
        }
        ClientEvent::Rejected(Rejection { tag, error, fatal })
    }

    /// Parses as much of `buf` as yields the next event.
    pub fn next(&mut self, buf: &[u8]) -> Step<ClientEvent> {
        let mut consumed = 0;
        loop {
            if let Some(event) = self.pending.take() {
                return Step {
                    consumed,
                    event: Some(event),
                };
            }
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

    /// One transition: octets used and the event, if any. `(0, None)` means "need more".
    fn advance(&mut self, rest: &[u8]) -> (usize, Option<ClientEvent>) {
        match self.state.clone() {
            State::Failed => (rest.len(), None),
            State::SkipLine => match rest.iter().position(|&b| b == b'\n') {
                Some(pos) => {
                    self.state = State::Idle;
                    (pos + 1, None)
                }
                None => (rest.len(), None),
            },
            State::Idle => self.first_line(rest),
            State::Segment => self.segment(rest),
            State::Literal { spec, remaining } => self.literal(rest, spec, remaining),
            State::Sasl => match find_line(rest, self.limits.line) {
                Ok(None) => (0, None),
                Err(_) => {
                    // The backend waits for a whole response line; it cannot be resynchronised.
                    let event = self.reject(
                        None,
                        CommandError::LineTooLong {
                            limit: self.limits.line,
                        },
                        true,
                    );
                    (rest.len(), Some(event))
                }
                Ok(Some(n)) => {
                    let raw = rest.get(..n).unwrap_or_default().to_vec();
                    let cancel = trim_line_end(&raw) == b"*";
                    (
                        n,
                        Some(ClientEvent::SaslResponse(SaslResponse { raw, cancel })),
                    )
                }
            },
        }
    }

    fn first_line(&mut self, rest: &[u8]) -> (usize, Option<ClientEvent>) {
        let n = match find_line(rest, self.limits.line) {
            Ok(None) => return (0, None),
            Ok(Some(n)) => n,
            Err(_) => {
                let head = rest.get(..self.limits.line).unwrap_or(rest);
                let tag = parse_tag(head).map(|(tag, _)| tag.to_vec());
                self.state = State::SkipLine;
                let event = self.reject(
                    tag,
                    CommandError::LineTooLong {
                        limit: self.limits.line,
                    },
                    false,
                );
                return (head.len(), Some(event));
            }
        };
        let raw = rest.get(..n).unwrap_or_default();
        let content = trim_line_end(raw);
        if content.is_empty() {
            // A stray empty line carries nothing to forward or answer.
            return (n, None);
        }
        let (tag, after_tag) = match parse_tag(content) {
            Some(found) => found,
            None => return (n, Some(self.reject(None, CommandError::InvalidTag, false))),
        };
        let tag = tag.to_vec();
        let literal = match scan_line(content) {
            Ok(literal) => literal,
            Err(error) => return (n, Some(self.reject(Some(tag), error, false))),
        };
        let name_len = after_tag
            .iter()
            .position(|&b| !is_atom_char(b))
            .unwrap_or(after_tag.len());
        let (name, after_name) = after_tag
            .split_at_checked(name_len)
            .unwrap_or((after_tag, b""));
        if name.is_empty() || !(after_name.is_empty() || after_name.starts_with(b" ")) {
            return (
                n,
                Some(self.reject(Some(tag), CommandError::InvalidCommandName, false)),
            );
        }
        self.tag = tag.clone();
        self.name = name.to_vec();
        self.mode = Mode::Stream;
        self.streamed = false;
        // Kept in case the driver switches to collect mode.
        self.buffer.clear();
        self.buffer.extend_from_slice(raw);
        if let Some(event) = self.announce(literal) {
            return (n, Some(event));
        }
        let start = CommandStart {
            tag,
            name: name.to_vec(),
            raw: raw.to_vec(),
            literal,
        };
        (n, Some(ClientEvent::Command(start)))
    }

    /// Moves to the state a line's literal announcement (or its absence) leads to. Returns a
    /// rejection when the literal is over the limit.
    fn announce(&mut self, literal: Option<LiteralSpec>) -> Option<ClientEvent> {
        let Some(spec) = literal else {
            self.state = State::Idle;
            return None;
        };
        let collected = if self.mode == Mode::Collect {
            self.buffer.len()
        } else {
            0
        };
        if spec.size > self.limits.literal {
            return Some(self.too_big(spec.size as u64, spec.synchronizing));
        }
        if self.mode == Mode::Collect && collected.saturating_add(spec.size) > self.limits.collect {
            let error = CommandError::CommandTooLong {
                limit: self.limits.collect,
            };
            return Some(self.oversize(error, spec.synchronizing));
        }
        self.state = State::Literal {
            spec,
            remaining: spec.size,
        };
        None
    }

    fn too_big(&mut self, size: u64, synchronizing: bool) -> ClientEvent {
        let error = CommandError::LiteralTooBig {
            size,
            limit: self.limits.literal,
            synchronizing,
        };
        self.oversize(error, synchronizing)
    }

    /// A synchronising literal can be refused cleanly (the client waits for `+`); a
    /// non-synchronising one is already on its way, so the session ends (RFC 7888 §4).
    fn oversize(&mut self, error: CommandError, synchronizing: bool) -> ClientEvent {
        let tag = Some(self.tag.clone());
        let fatal = !synchronizing || self.streamed;
        self.end_command();
        self.reject(tag, error, fatal)
    }

    fn segment(&mut self, rest: &[u8]) -> (usize, Option<ClientEvent>) {
        let n = match find_line(rest, self.limits.line) {
            Ok(None) => return (0, None),
            Ok(Some(n)) => n,
            Err(_) => {
                let used = self.limits.line.min(rest.len());
                let tag = Some(self.tag.clone());
                let fatal = self.streamed;
                self.end_command();
                self.state = State::SkipLine;
                let event = self.reject(
                    tag,
                    CommandError::LineTooLong {
                        limit: self.limits.line,
                    },
                    fatal,
                );
                return (used, Some(event));
            }
        };
        let raw = rest.get(..n).unwrap_or_default();
        let scanned = scan_line(trim_line_end(raw));
        match self.mode {
            Mode::Discard => {
                match scanned {
                    // A synchronising literal will never be sent: the client saw our answer.
                    Ok(Some(spec)) if !spec.synchronizing => {
                        if spec.size > self.limits.literal {
                            return (n, Some(self.too_big(spec.size as u64, false)));
                        }
                        self.state = State::Literal {
                            spec,
                            remaining: spec.size,
                        };
                    }
                    _ => self.end_command(),
                }
                (n, None)
            }
            Mode::Stream => {
                self.streamed = true;
                let literal = match scanned {
                    Ok(literal) => literal,
                    Err(error) => {
                        let tag = Some(self.tag.clone());
                        self.end_command();
                        return (n, Some(self.reject(tag, error, true)));
                    }
                };
                if let Some(event) = self.announce(literal) {
                    return (n, Some(event));
                }
                (
                    n,
                    Some(ClientEvent::Segment(Segment {
                        raw: raw.to_vec(),
                        literal,
                    })),
                )
            }
            Mode::Collect => {
                let literal = match scanned {
                    Ok(literal) => literal,
                    Err(error) => {
                        let tag = Some(self.tag.clone());
                        self.end_command();
                        return (n, Some(self.reject(tag, error, false)));
                    }
                };
                if self.buffer.len().saturating_add(n) > self.limits.collect {
                    // Non-fatal unless a non-synchronising literal is already on its way.
                    let error = CommandError::CommandTooLong {
                        limit: self.limits.collect,
                    };
                    let synchronizing = literal.is_none_or(|spec| spec.synchronizing);
                    return (n, Some(self.oversize(error, synchronizing)));
                }
                self.buffer.extend_from_slice(raw);
                if let Some(event) = self.announce(literal) {
                    return (n, Some(event));
                }
                match literal {
                    None => (n, Some(self.finish_collect())),
                    Some(spec) if spec.synchronizing => {
                        (n, Some(ClientEvent::ContinuationRequired(spec)))
                    }
                    Some(_) => (n, None),
                }
            }
        }
    }

    fn finish_collect(&mut self) -> ClientEvent {
        let collected = Collected {
            tag: std::mem::take(&mut self.tag),
            name: std::mem::take(&mut self.name),
            raw: std::mem::take(&mut self.buffer),
        };
        self.end_command();
        ClientEvent::Collected(collected)
    }

    fn literal(
        &mut self,
        rest: &[u8],
        spec: LiteralSpec,
        remaining: usize,
    ) -> (usize, Option<ClientEvent>) {
        if rest.is_empty() && remaining > 0 {
            return (0, None);
        }
        let take = remaining.min(rest.len());
        let chunk = rest.get(..take).unwrap_or_default();
        let left = remaining - take;
        match self.mode {
            Mode::Discard => {}
            Mode::Stream | Mode::Collect => self.buffer.extend_from_slice(chunk),
        }
        if left > 0 {
            self.state = State::Literal {
                spec,
                remaining: left,
            };
            return (take, None);
        }
        self.state = State::Segment;
        match self.mode {
            Mode::Stream => {
                self.streamed = true;
                // Only the literal's octets: the first line was kept in `buffer` before it.
                let start = self.buffer.len().saturating_sub(spec.size);
                let data = self.buffer.split_off(start);
                self.buffer.clear();
                (take, Some(ClientEvent::Literal(data)))
            }
            Mode::Collect | Mode::Discard => (take, None),
        }
    }
}

/// `tag SP`: the tag and what follows the space (RFC 9051 §9 `tag`).
fn parse_tag(line: &[u8]) -> Option<(&[u8], &[u8])> {
    let end = line.iter().position(|&b| !is_tag_char(b))?;
    let (tag, rest) = line.split_at_checked(end)?;
    let rest = rest.strip_prefix(b" ")?;
    if tag.is_empty() {
        None
    } else {
        Some((tag, rest))
    }
}

/// ATOM-CHAR: any CHAR except atom-specials (RFC 9051 §9).
pub(crate) fn is_atom_char(b: u8) -> bool {
    (0x21..0x7f).contains(&b)
        && !matches!(b, b'(' | b')' | b'{' | b'%' | b'*' | b'"' | b'\\' | b']')
}

/// tag = 1*<any ASTRING-CHAR except "+">.
fn is_tag_char(b: u8) -> bool {
    (is_atom_char(b) || b == b']') && b != b'+'
}

/// Checks one line (without its line end) and finds a literal announced at its end.
///
/// Quoted strings are tracked so that `{5}` inside quotes is never taken for a literal and an
/// unterminated quote is refused: mailfront and the backend must agree on where a command ends,
/// or pipelined bytes could run on the backend without passing the gate.
pub(crate) fn scan_line(content: &[u8]) -> Result<Option<LiteralSpec>, CommandError> {
    let mut in_quote = false;
    let mut escaped = false;
    for &b in content {
        if b == b'\r' || b == 0 {
            return Err(CommandError::ForbiddenOctet);
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
        return Err(CommandError::UnterminatedQuote);
    }
    Ok(literal_at_end(content))
}

/// `{n}` / `{n+}` / `~{n}` / `~{n+}` at the very end of a line.
fn literal_at_end(content: &[u8]) -> Option<LiteralSpec> {
    let inner_end = content.strip_suffix(b"}")?;
    let open = inner_end.iter().rposition(|&b| b == b'{')?;
    let (before, inner) = inner_end.split_at_checked(open).unwrap_or((b"", b""));
    let inner = inner.get(1..).unwrap_or_default();
    let (digits, synchronizing) = match inner.strip_suffix(b"+") {
        Some(digits) => (digits, false),
        None => (inner, true),
    };
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let size = digits
        .iter()
        .try_fold(0u64, |acc, &d| {
            acc.checked_mul(10)?.checked_add(u64::from(d - b'0'))
        })
        .unwrap_or(u64::MAX);
    let size = usize::try_from(size).unwrap_or(usize::MAX);
    Some(LiteralSpec {
        size,
        synchronizing,
        binary: before.ends_with(b"~"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TlsMode;
    use crate::imap::policy::{Decision, GateState, decide};
    use crate::imap::split::{CHUNKS, drive};

    /// Plays a simple driver: AUTHENTICATE enters SASL until a line `end-sasl`, ID is collected,
    /// LOGIN/AUTHENTICATE are discarded when `refuse_auth`.
    fn react(refuse_auth: bool) -> impl FnMut(&mut CommandReceiver, &ClientEvent) -> bool {
        move |rx, event| {
            match event {
                ClientEvent::Command(c) if c.is("ID") => rx.collect_command(),
                ClientEvent::Command(c)
                    if refuse_auth && (c.is("LOGIN") || c.is("AUTHENTICATE")) =>
                {
                    rx.discard_command()
                }
                ClientEvent::Command(c) if c.is("AUTHENTICATE") => rx.begin_sasl(),
                ClientEvent::SaslResponse(r) if r.raw.starts_with(b"end-sasl") => rx.end_sasl(),
                ClientEvent::Command(c) if c.is("STARTTLS") => return false,
                _ => {}
            }
            true
        }
    }

    fn events_with(
        input: &[u8],
        chunk: usize,
        limits: Limits,
        refuse_auth: bool,
    ) -> (Vec<ClientEvent>, Vec<u8>) {
        let mut rx = CommandReceiver::new(limits);
        drive(
            &mut rx,
            input,
            chunk,
            |rx, buf| rx.next(buf),
            react(refuse_auth),
        )
    }

    fn events(input: &[u8]) -> Vec<ClientEvent> {
        events_with(input, 0, Limits::default(), false).0
    }

    /// Same events (and leftover) whatever the read sizes.
    fn assert_split_invariant(input: &[u8], limits: Limits, refuse_auth: bool) -> Vec<ClientEvent> {
        let whole = events_with(input, 0, limits, refuse_auth).0;
        for chunk in CHUNKS {
            assert_eq!(
                events_with(input, chunk, limits, refuse_auth).0,
                whole,
                "chunk {chunk}"
            );
        }
        whole
    }

    fn command(raw: &[u8]) -> ClientEvent {
        let mut rx = CommandReceiver::default();
        rx.next(raw).event.unwrap()
    }

    fn start(tag: &str, name: &str, raw: &[u8], literal: Option<LiteralSpec>) -> ClientEvent {
        ClientEvent::Command(CommandStart {
            tag: tag.into(),
            name: name.into(),
            raw: raw.to_vec(),
            literal,
        })
    }

    fn sync(size: usize) -> Option<LiteralSpec> {
        Some(LiteralSpec {
            size,
            synchronizing: true,
            binary: false,
        })
    }

    fn nonsync(size: usize) -> Option<LiteralSpec> {
        Some(LiteralSpec {
            size,
            synchronizing: false,
            binary: false,
        })
    }

    #[test]
    fn simple_commands_parse_tag_and_name() {
        assert_eq!(
            events(b"a1 CAPABILITY\r\nA2 noop\n"),
            vec![
                start("a1", "CAPABILITY", b"a1 CAPABILITY\r\n", None),
                start("A2", "noop", b"A2 noop\n", None)
            ]
        );
    }

    #[test]
    fn arguments_exclude_tag_name_and_line_end() {
        let ClientEvent::Command(c) = command(b"t LOGIN \"a b\" {3}\r\n") else {
            panic!()
        };
        assert_eq!(c.arguments(), b"\"a b\" {3}");
        let ClientEvent::Command(c) = command(b"t NOOP\r\n") else {
            panic!()
        };
        assert_eq!(c.arguments(), b"");
    }

    #[test]
    fn literals_are_framed_in_stream_mode() {
        let input = b"a LOGIN {4+}\r\nuser {4}\r\npass\r\nb NOOP\r\n";
        let got = assert_split_invariant(input, Limits::default(), false);
        assert_eq!(
            got,
            vec![
                start("a", "LOGIN", b"a LOGIN {4+}\r\n", nonsync(4)),
                ClientEvent::Literal(b"user".to_vec()),
                ClientEvent::Segment(Segment {
                    raw: b" {4}\r\n".to_vec(),
                    literal: sync(4)
                }),
                ClientEvent::Literal(b"pass".to_vec()),
                ClientEvent::Segment(Segment {
                    raw: b"\r\n".to_vec(),
                    literal: None
                }),
                start("b", "NOOP", b"b NOOP\r\n", None),
            ]
        );
    }

    #[test]
    fn literal_containing_crlf_and_command_text_stays_data() {
        let input = b"a LOGIN {13+}\r\nb LOGOUT\r\n{1} {2+}\r\n\r\n\r\nc NOOP\r\n";
        let got = assert_split_invariant(input, Limits::default(), false);
        assert_eq!(got[1], ClientEvent::Literal(b"b LOGOUT\r\n{1}".to_vec()));
        assert_eq!(got[3], ClientEvent::Literal(b"\r\n".to_vec()));
        assert_eq!(got[5], start("c", "NOOP", b"c NOOP\r\n", None));
        assert_eq!(got.len(), 6);
    }

    #[test]
    fn literal8_and_zero_length_literals_are_framed() {
        let got = events(b"a X ~{3}\r\nabc {0}\r\n\r\n");
        assert_eq!(
            got[0],
            start(
                "a",
                "X",
                b"a X ~{3}\r\n",
                Some(LiteralSpec {
                    size: 3,
                    synchronizing: true,
                    binary: true
                })
            )
        );
        assert_eq!(got[1], ClientEvent::Literal(b"abc".to_vec()));
        assert_eq!(got[3], ClientEvent::Literal(Vec::new()));
        assert_eq!(got.len(), 5);
    }

    #[test]
    fn braces_inside_quotes_are_not_literals() {
        let got = events(b"a LOGIN \"u\" \"{5}\"\r\nb NOOP\r\n");
        assert_eq!(
            got[0],
            start("a", "LOGIN", b"a LOGIN \"u\" \"{5}\"\r\n", None)
        );
        assert_eq!(got[1], start("b", "NOOP", b"b NOOP\r\n", None));
    }

    #[test]
    fn an_unterminated_quote_hiding_a_literal_is_refused_so_the_next_line_is_gated() {
        // The backend would take `{12}` as text and run the next line; we must not forward it.
        let got = events(b"a NOOP \"{12}\r\nb LOGIN u p\r\n");
        assert_eq!(
            got[0],
            ClientEvent::Rejected(Rejection {
                tag: Some(b"a".to_vec()),
                error: CommandError::UnterminatedQuote,
                fatal: false
            })
        );
        assert_eq!(got[1], start("b", "LOGIN", b"b LOGIN u p\r\n", None));
    }

    #[test]
    fn escaped_quotes_do_not_end_a_quoted_string() {
        let got = events(b"a LOGIN \"x\\\" {3}\"\r\n");
        assert_eq!(
            got,
            vec![start("a", "LOGIN", b"a LOGIN \"x\\\" {3}\"\r\n", None)]
        );
    }

    #[test]
    fn bare_cr_and_nul_in_a_command_line_are_refused() {
        for input in [&b"a NOOP\rb LOGIN u p\r\n"[..], b"a NO\0OP\r\n"] {
            let ClientEvent::Rejected(r) = command(input) else {
                panic!()
            };
            assert_eq!(r.error, CommandError::ForbiddenOctet);
            assert_eq!(
                r.reply(),
                b"a BAD CR or NUL not allowed in a command line\r\n"
            );
        }
    }

    #[test]
    fn missing_tag_or_name_is_refused_with_untagged_or_tagged_bad() {
        let ClientEvent::Rejected(r) = command(b"+x NOOP\r\n") else {
            panic!()
        };
        assert_eq!((r.tag, r.error), (None, CommandError::InvalidTag));
        let ClientEvent::Rejected(r) = command(b"NOOP\r\n") else {
            panic!()
        };
        assert_eq!(r.reply(), b"* BAD Missing or invalid tag\r\n");
        let ClientEvent::Rejected(r) = command(b"a {5}\r\n") else {
            panic!()
        };
        assert_eq!(r.reply(), b"a BAD Missing or invalid command name\r\n");
        let ClientEvent::Rejected(r) = command(b"a LOGIN{5}\r\n") else {
            panic!()
        };
        assert_eq!(r.error, CommandError::InvalidCommandName);
    }

    #[test]
    fn empty_lines_are_skipped() {
        assert_eq!(
            events(b"\r\n\na NOOP\r\n"),
            vec![start("a", "NOOP", b"a NOOP\r\n", None)]
        );
    }

    #[test]
    fn over_long_line_is_refused_then_the_receiver_resynchronises() {
        let limits = Limits {
            line: 16,
            ..Limits::default()
        };
        let mut input = b"t7 NOOP ".to_vec();
        input.extend_from_slice(&[b'x'; 40]);
        input.extend_from_slice(b"\r\nb NOOP\r\n");
        let got = assert_split_invariant(&input, limits, false);
        assert_eq!(
            got,
            vec![
                ClientEvent::Rejected(Rejection {
                    tag: Some(b"t7".to_vec()),
                    error: CommandError::LineTooLong { limit: 16 },
                    fatal: false
                }),
                start("b", "NOOP", b"b NOOP\r\n", None),
            ]
        );
        let ClientEvent::Rejected(r) = &got[0] else {
            panic!()
        };
        assert_eq!(r.reply(), b"t7 BAD [TOOBIG] Command line too long\r\n");
    }

    #[test]
    fn line_exactly_at_the_limit_is_accepted() {
        let limits = Limits {
            line: 10,
            ..Limits::default()
        };
        let (got, _) = events_with(b"a NOOP x\r\n", 0, limits, false);
        assert_eq!(got, vec![start("a", "NOOP", b"a NOOP x\r\n", None)]);
    }

    #[test]
    fn oversized_synchronizing_literal_is_refused_before_the_continuation() {
        let limits = Limits {
            literal: 8,
            ..Limits::default()
        };
        let (got, _) = events_with(b"a LOGIN {9}\r\nb NOOP\r\n", 0, limits, false);
        let ClientEvent::Rejected(r) = &got[0] else {
            panic!()
        };
        assert!(!r.fatal);
        assert_eq!(
            r.error,
            CommandError::LiteralTooBig {
                size: 9,
                limit: 8,
                synchronizing: true
            }
        );
        assert_eq!(r.reply(), b"a BAD [TOOBIG] Literal too big\r\n");
        // The client never sends the literal; the next line is a command.
        assert_eq!(got[1], start("b", "NOOP", b"b NOOP\r\n", None));
    }

    #[test]
    fn oversized_non_synchronizing_literal_is_fatal() {
        let limits = Limits {
            literal: 8,
            ..Limits::default()
        };
        let got = assert_split_invariant(b"a LOGIN {4097+}\r\nb LOGIN u p\r\n", limits, false);
        assert_eq!(got.len(), 1);
        let ClientEvent::Rejected(r) = &got[0] else {
            panic!()
        };
        assert!(r.fatal);
        let got = events(b"a X {99999999999999999999999}\r\n");
        let ClientEvent::Rejected(r) = &got[0] else {
            panic!()
        };
        assert!(matches!(r.error, CommandError::LiteralTooBig { .. }));
    }

    #[test]
    fn login_with_literal_password_before_tls_is_refused_without_forwarding_the_literal() {
        let plain = GateState {
            listener: TlsMode::Starttls,
            tls_active: false,
            backend_has_id: true,
            backend_has_sasl_ir: true,
            id_sent: false,
        };
        for input in [
            &b"a LOGIN {5}\r\nb NOOP\r\n"[..],
            b"a LOGIN {5+}\r\nalice {6+}\r\nsecret\r\nb NOOP\r\n",
            b"a LOGIN alice {6+}\r\nsecret\r\nb NOOP\r\n",
            b"a LOGIN {5+}\r\nalice {6}\r\nb NOOP\r\n",
        ] {
            for chunk in [0, 1, 3, 7] {
                let mut rx = CommandReceiver::default();
                let mut forwarded: Vec<u8> = Vec::new();
                let mut replies: Vec<u8> = Vec::new();
                drive(
                    &mut rx,
                    input,
                    chunk,
                    |rx, buf| rx.next(buf),
                    |rx, event| {
                        match event {
                            ClientEvent::Command(c) => match decide(&plain, c) {
                                Decision::Reply(r) => {
                                    replies.extend_from_slice(&r);
                                    rx.discard_command();
                                }
                                Decision::Forward => forwarded.extend_from_slice(&c.raw),
                                other => panic!("{other:?}"),
                            },
                            ClientEvent::Segment(s) => forwarded.extend_from_slice(&s.raw),
                            ClientEvent::Literal(l) => forwarded.extend_from_slice(l),
                            other => panic!("{other:?}"),
                        }
                        true
                    },
                );
                assert_eq!(
                    forwarded,
                    b"b NOOP\r\n",
                    "{:?}",
                    String::from_utf8_lossy(input)
                );
                assert_eq!(
                    replies,
                    b"a NO [PRIVACYREQUIRED] Cleartext authentication disallowed; use STARTTLS first\r\n"
                );
                assert!(rx.is_idle());
            }
        }
    }

    #[test]
    fn starttls_with_pipelined_login_exposes_the_bytes_to_drop() {
        let mut rx = CommandReceiver::default();
        let buf = b"a STARTTLS\r\nb LOGIN u p\r\n";
        let step = rx.next(buf);
        let Some(ClientEvent::Command(c)) = step.event else {
            panic!()
        };
        let plain = GateState {
            listener: TlsMode::Starttls,
            tls_active: false,
            backend_has_id: true,
            backend_has_sasl_ir: true,
            id_sent: false,
        };
        assert_eq!(
            decide(&plain, &c),
            Decision::StartTls(b"a OK Begin TLS negotiation now\r\n".to_vec())
        );
        assert_eq!(step.consumed, 12);
        assert_eq!(&buf[step.consumed..], b"b LOGIN u p\r\n");
        // With the split driver the remainder stays unconsumed whatever the read sizes.
        for chunk in CHUNKS {
            let (got, left) = events_with(buf, chunk, Limits::default(), false);
            assert_eq!(got.len(), 1);
            assert!(b"b LOGIN u p\r\n".starts_with(&left));
        }
    }

    #[test]
    fn collect_mode_assembles_the_whole_command_and_asks_for_continuations() {
        let input = b"a ID (\"name\" {4}\r\nmutt \"os\" {5+}\r\nLinux)\r\nb NOOP\r\n";
        let got = assert_split_invariant(input, Limits::default(), false);
        assert_eq!(
            got,
            vec![
                start("a", "ID", b"a ID (\"name\" {4}\r\n", sync(4)),
                ClientEvent::ContinuationRequired(sync(4).unwrap()),
                ClientEvent::Collected(Collected {
                    tag: b"a".to_vec(),
                    name: b"ID".to_vec(),
                    raw: b"a ID (\"name\" {4}\r\nmutt \"os\" {5+}\r\nLinux)\r\n".to_vec()
                }),
                start("b", "NOOP", b"b NOOP\r\n", None),
            ]
        );
    }

    #[test]
    fn collecting_a_one_line_command_yields_it_at_once() {
        let got = assert_split_invariant(b"a ID NIL\r\nb NOOP\r\n", Limits::default(), false);
        assert_eq!(
            got[1],
            ClientEvent::Collected(Collected {
                tag: b"a".to_vec(),
                name: b"ID".to_vec(),
                raw: b"a ID NIL\r\n".to_vec()
            })
        );
        assert_eq!(got.len(), 3);
    }

    #[test]
    fn collect_mode_is_bounded() {
        let limits = Limits {
            line: 64,
            literal: 64,
            collect: 40,
        };
        let got = assert_split_invariant(b"a ID (\"a\" {30}\r\n", limits, false);
        let ClientEvent::Rejected(r) = &got[1] else {
            panic!("{got:?}")
        };
        assert_eq!(r.error, CommandError::CommandTooLong { limit: 40 });
        assert!(!r.fatal);
        let got = assert_split_invariant(
            b"a ID (\"a\" {20+}\r\n01234567890123456789 \"b\" \"cccccccc\")\r\nb NOOP\r\n",
            limits,
            false,
        );
        let ClientEvent::Rejected(r) = &got[1] else {
            panic!("{got:?}")
        };
        assert_eq!(r.error, CommandError::CommandTooLong { limit: 40 });
        assert_eq!(got[2], start("b", "NOOP", b"b NOOP\r\n", None));
    }

    #[test]
    fn sasl_lines_are_responses_until_the_exchange_ends() {
        let input = b"a AUTHENTICATE PLAIN\r\nb LOGOUT\r\n*\r\nend-sasl\r\nc NOOP\r\n";
        let got = assert_split_invariant(input, Limits::default(), false);
        assert_eq!(
            got,
            vec![
                start("a", "AUTHENTICATE", b"a AUTHENTICATE PLAIN\r\n", None),
                ClientEvent::SaslResponse(SaslResponse {
                    raw: b"b LOGOUT\r\n".to_vec(),
                    cancel: false
                }),
                ClientEvent::SaslResponse(SaslResponse {
                    raw: b"*\r\n".to_vec(),
                    cancel: true
                }),
                ClientEvent::SaslResponse(SaslResponse {
                    raw: b"end-sasl\r\n".to_vec(),
                    cancel: false
                }),
                start("c", "NOOP", b"c NOOP\r\n", None),
            ]
        );
    }

    #[test]
    fn over_long_sasl_line_is_fatal() {
        let limits = Limits {
            line: 8,
            ..Limits::default()
        };
        let got = assert_split_invariant(
            b"a AUTHENTICATE X\r\n0123456789\r\n",
            Limits { line: 20, ..limits },
            false,
        );
        assert_eq!(got.len(), 2);
        let mut rx = CommandReceiver::new(limits);
        rx.begin_sasl();
        let ClientEvent::Rejected(r) = rx.next(b"0123456789\r\n").event.unwrap() else {
            panic!()
        };
        assert!(r.fatal);
    }

    #[test]
    fn discard_swallows_the_rest_of_a_refused_command() {
        let input = b"a LOGIN {5+}\r\nalice {6+}\r\nsecret\r\nb NOOP\r\n";
        let got = assert_split_invariant(input, Limits::default(), true);
        assert_eq!(
            got,
            vec![
                start("a", "LOGIN", b"a LOGIN {5+}\r\n", nonsync(5)),
                start("b", "NOOP", b"b NOOP\r\n", None)
            ]
        );
    }

    #[test]
    fn backend_refusing_a_synchronizing_literal_ends_the_command() {
        let mut rx = CommandReceiver::default();
        let step = rx.next(b"a LOGIN {5}\r\n");
        assert!(matches!(step.event, Some(ClientEvent::Command(_))));
        assert!(rx.awaits_synchronizing_literal());
        rx.discard_command();
        assert!(rx.is_idle());
        assert_eq!(
            rx.next(b"b NOOP\r\n").event,
            Some(start("b", "NOOP", b"b NOOP\r\n", None))
        );
    }

    #[test]
    fn mid_command_error_after_streaming_is_fatal() {
        let limits = Limits {
            line: 16,
            ..Limits::default()
        };
        let got = assert_split_invariant(b"a LOGIN {1}\r\nx 0123456789abcdef\r\n", limits, false);
        let ClientEvent::Rejected(r) = &got[2] else {
            panic!("{got:?}")
        };
        assert!(r.fatal);
    }

    #[test]
    fn corpus_is_split_invariant() {
        let corpus: &[&[u8]] = &[
            b"a CAPABILITY\r\nb ID (\"name\" \"x\")\r\nc LOGIN {3}\r\nabc {3+}\r\ndef\r\nd NOOP\r\n",
            b"a AUTHENTICATE PLAIN =\r\nAGEAYg==\r\nend-sasl\r\nb LOGOUT\r\n",
            b"x\r\n\r\n\"bad\r\na NOOP \"unterminated\r\nb ~{2+}\r\nhi\r\n",
            b"a ID ({1}\r\nx {0}\r\n)\r\na STARTTLS\r\nb LOGIN u p\r\n",
        ];
        for input in corpus {
            assert_split_invariant(input, Limits::default(), false);
            assert_split_invariant(input, Limits::default(), true);
            assert_split_invariant(
                input,
                Limits {
                    line: 12,
                    literal: 2,
                    collect: 20,
                },
                false,
            );
        }
    }
}
