//! Strict pre-login IMAP command receiver, parser and canonical encoder.
//!
//! After TLS and before login mailfront forwards to the backend only commands it parsed in full,
//! written again by [`encode`], never the client's bytes: a framing disagreement with the backend
//! (a brace the backend does not take for a literal, a bare LF it takes for a line end) then has
//! nothing to smuggle, because what the backend receives is exactly what the gate approved.
//! Before TLS the same receiver feeds mailfront's own cleartext dialogue.
//!
//! Pull-style and sans-I/O: the driver keeps its read buffer, calls [`CommandReceiver::next`],
//! drains `consumed` octets and acts on the [`Event`]. The events do not depend on how the input
//! was split into reads.
//!
//! Framing (RFC 9051 §2.2, §4.3, §9; RFC 7888):
//! - Lines end in CRLF. A bare LF line end, a CR elsewhere in a line or a NUL is refused; the
//!   receiver resynchronises after the LF, where a backend that accepts bare LF (Dovecot) would
//!   also start its next command.
//! - A literal is recognised only where the grammar puts a string: a whole token after SP or
//!   `(`, outside quoted strings, at the very end of a line: `{n}` (synchronising, the receiver
//!   asks the driver via [`Event::LiteralRequested`]) or `{n+}` (RFC 7888, read unasked). A brace
//!   inside an atom (`x{5+}`) is atom text. `~{n}` (literal8, RFC 3516 / RFC 9051 §9 only after
//!   login) and malformed announcements are refused.
//! - Once the last line has arrived the whole command (lines and literal contents, literal
//!   boundaries kept) is parsed against the grammar of the commands the gate knows.

use crate::imap::id::{IdCommand, IdPair, MAX_FIELD_LEN, MAX_PAIRS, MAX_VALUE_LEN};
use crate::line::Step;
use crate::line::find_line;

/// Longest accepted tag. RFC 9051 sets none; real clients use a few octets, and a bound keeps
/// every reply that echoes the tag short.
pub const MAX_TAG_LEN: usize = 64;

/// Longest string [`encode`] writes as a quoted string; longer ones become literals, so the
/// canonical command never has a line longer than the backend's limit (Dovecot's login process
/// allows 8192 octets) because of one argument.
pub const MAX_QUOTED_LEN: usize = 1024;

/// Bounds enforced inside the receiver, so a client can never make it buffer more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// One line including its CRLF (`limits.imap_line`).
    pub line: usize,
    /// One literal's octets (`limits.imap_literal`).
    pub literal: usize,
    /// A whole command: all lines and literals together.
    pub command: usize,
    /// One SASL response line including CRLF (RFC 4954's 12288-octet size class).
    pub sasl_line: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            line: 8192,
            literal: 65536,
            command: 65536 + 8192,
            sasl_line: 12288,
        }
    }
}

/// A fully parsed pre-login command. Only these are ever written to the backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Capability,
    Noop,
    Logout,
    StartTls,
    /// `LOGIN astring astring`, the strings decoded (quotes and escapes removed, literal content).
    Login {
        username: Vec<u8>,
        password: Vec<u8>,
    },
    /// `AUTHENTICATE atom [SP initial-resp]` (RFC 9051 §6.2.2, RFC 4959): the mechanism
    /// upper-cased; the initial response is validated base64 or exactly `=`.
    Authenticate {
        mechanism: Vec<u8>,
        initial_response: Option<Vec<u8>>,
    },
    /// `ID NIL` or `ID (field value …)` (RFC 2971); the tag inside is this command's tag.
    Id(IdCommand),
    /// Any other syntactically valid command name, whatever its arguments (its literals were
    /// still framed and consumed). The name as the client sent it.
    Other {
        name: Vec<u8>,
    },
}

/// Why input was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    #[error("line longer than {limit} octets")]
    LineTooLong { limit: usize },
    #[error("literal of {size} octets exceeds the {limit}-octet limit")]
    LiteralTooBig { size: u64, limit: usize },
    #[error("command longer than {limit} octets")]
    CommandTooLong { limit: usize },
    #[error("missing or invalid tag")]
    InvalidTag,
    #[error("missing or invalid command name")]
    InvalidCommandName,
    /// Bare CR, bare LF line end (LF not preceded by CR), or NUL in a line.
    #[error("bare CR, bare LF or NUL in a command line")]
    ForbiddenOctet,
    /// `~{`, `{}`, `{+}`, `{x}`, a size overflow … at a literal position.
    #[error("malformed or unsupported literal")]
    MalformedLiteral,
    /// The arguments do not match the command's grammar.
    #[error("syntax error in the command's arguments")]
    Syntax,
}

/// A refused command. The receiver has already resynchronised, or entered its failed state when
/// `fatal` (the client's framing can no longer be followed, e.g. an over-limit or malformed
/// non-synchronising literal is streaming): then the driver writes [`Rejection::reply`] and
/// `* BYE`, and closes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub tag: Option<Vec<u8>>,
    pub error: CommandError,
    pub fatal: bool,
}

impl Rejection {
    /// Tagged `BAD` when the tag is known (RFC 9051 §2.2.1: a BAD instead of `+` tells the client
    /// not to send a synchronising literal), untagged `* BAD` otherwise; oversize gets
    /// `[TOOBIG]` (RFC 9051 §7.1, RFC 7888 §4).
    pub fn reply(&self) -> Vec<u8> {
        let text: &[u8] = match self.error {
            CommandError::LineTooLong { .. } => b"[TOOBIG] Command line too long",
            CommandError::LiteralTooBig { .. } => b"[TOOBIG] Literal too big",
            CommandError::CommandTooLong { .. } => b"[TOOBIG] Command too long",
            CommandError::InvalidTag => b"Missing or invalid tag",
            CommandError::InvalidCommandName => b"Missing or invalid command name",
            CommandError::ForbiddenOctet => b"Lines must end in CRLF, without bare CR or NUL",
            CommandError::MalformedLiteral => b"Malformed or unsupported literal",
            CommandError::Syntax => b"Syntax error in arguments",
        };
        let mut out = Vec::with_capacity(text.len() + 16);
        out.extend_from_slice(self.tag.as_deref().unwrap_or(b"*"));
        out.extend_from_slice(b" BAD ");
        out.extend_from_slice(text);
        out.extend_from_slice(b"\r\n");
        out
    }
}

/// One client line during AUTHENTICATE (RFC 9051 §6.2.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SaslLine {
    /// `*`: the client cancels.
    Cancel,
    /// A valid response ([`crate::sasl::is_base64_response`]: base64, possibly empty),
    /// without the line end.
    Response(Vec<u8>),
    /// Anything else (not base64, bare LF line end, CR, NUL…): the driver cancels instead.
    Invalid,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A synchronising literal `{size}` ends a line of command `tag name`. Nothing more is parsed
    /// until [`CommandReceiver::accept_literal`] (the driver writes `+`) or
    /// [`CommandReceiver::refuse_literal`] (the driver writes its refusal; the command is
    /// dropped). `size` is within the limits.
    LiteralRequested {
        tag: Vec<u8>,
        name: Vec<u8>,
        size: usize,
    },
    /// A complete, fully parsed command.
    Command {
        tag: Vec<u8>,
        command: Command,
    },
    /// Between [`CommandReceiver::begin_sasl`] and [`CommandReceiver::end_sasl`]: one line.
    Sasl(SaslLine),
    Rejected(Rejection),
}

/// One piece of the command being assembled: a line's text (without its line end and without
/// the literal announcement ending it) or a literal's octets. The sequence alternates and
/// starts and ends with text, so the parser knows a literal stands exactly where a text piece
/// ends: literal content is never scanned as syntax.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(Vec<u8>),
    Literal(Vec<u8>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Waiting for the first line of a command.
    Idle,
    /// Waiting for the line that follows a literal.
    Continuation,
    /// A synchronising literal was announced; waiting for the driver.
    AwaitDecision { size: usize },
    /// Reading literal octets.
    Literal { remaining: usize },
    /// Dropping the rest of an over-long line.
    SkipLine,
    /// Every line is a SASL response.
    Sasl,
    /// Unrecoverable: everything is dropped.
    Failed,
}

/// What ends a line, as far as framing goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Announcement {
    None,
    /// A well-formed `{size}` / `{size+}`; `start` is the index of `{`.
    Literal {
        size: u64,
        sync: bool,
        start: usize,
    },
    /// Literal8 or a malformed announcement; `sync` when it has no `+`.
    Malformed {
        sync: bool,
    },
}

impl Announcement {
    /// The client sends octets after this line without waiting for us.
    fn streams(self) -> bool {
        matches!(
            self,
            Announcement::Literal { sync: false, .. } | Announcement::Malformed { sync: false }
        )
    }
}

/// What one framing state made of the octets in front of it ([`CommandReceiver::next`]).
#[derive(Debug)]
enum Progress {
    /// Consumed this many octets and moved to another state: go on with the rest.
    More(usize),
    /// The step to return, `consumed` counted from where this state began.
    Done(Step<Event>),
}

/// The strict receiver; see the module documentation.
#[derive(Debug, Clone)]
pub struct CommandReceiver {
    limits: Limits,
    state: State,
    tag: Vec<u8>,
    name: Vec<u8>,
    parts: Vec<Part>,
    /// Octets of the current command so far: lines with their line ends, and literal sizes.
    total: usize,
    /// The literal being read.
    literal: Vec<u8>,
    /// Tag of the last command delivered, for a refusal during its SASL exchange.
    last_tag: Option<Vec<u8>>,
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
            tag: Vec::new(),
            name: Vec::new(),
            parts: Vec::new(),
            total: 0,
            literal: Vec::new(),
            last_tag: None,
        }
    }

    /// Parses as much of `buf` as yields the next event; the caller drains `consumed`.
    pub fn next(&mut self, buf: &[u8]) -> Step<Event> {
        let mut consumed = 0;
        loop {
            let rest = buf.get(consumed..).unwrap_or_default();
            let progress = match self.state {
                // Unrecoverable: everything is dropped.
                State::Failed => Progress::Done(Step::need(rest.len())),
                State::AwaitDecision { .. } => Progress::Done(Step::need(0)),
                State::SkipLine => self.skip_line(rest),
                State::Literal { remaining } => self.literal_octets(rest, remaining),
                State::Sasl => Progress::Done(self.sasl_response(rest)),
                State::Idle | State::Continuation => self.command_line(rest),
            };
            match progress {
                Progress::More(n) => consumed += n,
                Progress::Done(step) => {
                    return Step {
                        consumed: consumed + step.consumed,
                        event: step.event,
                    };
                }
            }
        }
    }

    /// [`State::SkipLine`]: drops octets up to and including the next LF.
    fn skip_line(&mut self, rest: &[u8]) -> Progress {
        match rest.iter().position(|&b| b == b'\n') {
            Some(pos) => {
                self.state = State::Idle;
                Progress::More(pos + 1)
            }
            None => Progress::Done(Step::need(rest.len())),
        }
    }

    /// [`State::Literal`]: takes up to `remaining` octets of literal content; a complete literal
    /// becomes a part of the command and the line after it is awaited.
    fn literal_octets(&mut self, rest: &[u8], remaining: usize) -> Progress {
        let take = remaining.min(rest.len());
        self.literal
            .extend_from_slice(rest.get(..take).unwrap_or_default());
        let remaining = remaining - take;
        if remaining == 0 {
            self.parts
                .push(Part::Literal(std::mem::take(&mut self.literal)));
            self.state = State::Continuation;
            Progress::More(take)
        } else {
            self.state = State::Literal { remaining };
            Progress::Done(Step::need(take))
        }
    }

    /// [`State::Sasl`]: one whole response line, or nothing yet.
    fn sasl_response(&mut self, rest: &[u8]) -> Step<Event> {
        if rest.is_empty() {
            return Step::need(0);
        }
        match find_line(rest, self.limits.sasl_line) {
            Ok(None) => Step::need(0),
            Ok(Some(n)) => {
                Step::event(n, Event::Sasl(sasl_line(rest.get(..n).unwrap_or_default())))
            }
            Err(_) => {
                // The backend waits for one whole response line; an endless one cannot be
                // resynchronised.
                let error = CommandError::LineTooLong {
                    limit: self.limits.sasl_line,
                };
                let event = self.reject(self.last_tag.clone(), error, true);
                Step::event(rest.len(), event)
            }
        }
    }

    /// [`State::Idle`] or [`State::Continuation`]: one line of a command. A line that does not
    /// end the command (it announces a literal read unasked) lets the caller go on.
    fn command_line(&mut self, rest: &[u8]) -> Progress {
        if rest.is_empty() {
            return Progress::Done(Step::need(0));
        }
        match find_line(rest, self.limits.line) {
            Ok(None) => Progress::Done(Step::need(0)),
            Ok(Some(n)) => match self.on_line(rest.get(..n).unwrap_or_default()) {
                Some(event) => Progress::Done(Step::event(n, event)),
                None => Progress::More(n),
            },
            Err(_) => {
                // Never parse from the middle of a line: drop it up to its LF.
                let head = rest.get(..self.limits.line).unwrap_or(rest);
                let tag = match self.state {
                    State::Continuation => Some(self.tag.clone()),
                    _ => tag_prefix(head),
                };
                let error = CommandError::LineTooLong {
                    limit: self.limits.line,
                };
                let event = self.reject(tag, error, false);
                self.state = State::SkipLine;
                Progress::Done(Step::event(head.len(), event))
            }
        }
    }

    /// The driver wrote `+`: read the announced literal.
    pub fn accept_literal(&mut self) {
        if let State::AwaitDecision { size } = self.state {
            self.state = State::Literal { remaining: size };
        }
    }

    /// The driver refused the literal: the client will not send it; the command is dropped.
    pub fn refuse_literal(&mut self) {
        if let State::AwaitDecision { .. } = self.state {
            self.clear_command();
            self.state = State::Idle;
        }
    }

    /// True while waiting for the driver's accept/refuse decision.
    #[cfg(test)]
    fn awaits_literal_decision(&self) -> bool {
        matches!(self.state, State::AwaitDecision { .. })
    }

    /// The driver forwarded AUTHENTICATE: until [`CommandReceiver::end_sasl`] every client line
    /// is a SASL response, even one that looks like a command (RFC 9051 §6.2.2).
    pub fn begin_sasl(&mut self) {
        if self.state != State::Failed {
            self.clear_command();
            self.state = State::Sasl;
        }
    }

    /// The AUTHENTICATE exchange is over (the backend sent its tagged completion).
    pub fn end_sasl(&mut self) {
        if self.state == State::Sasl {
            self.state = State::Idle;
        }
    }

    pub fn in_sasl(&self) -> bool {
        self.state == State::Sasl
    }

    /// No partial command buffered: between commands, not in SASL, not awaiting a decision.
    #[cfg(test)]
    fn is_idle(&self) -> bool {
        self.state == State::Idle
    }

    fn clear_command(&mut self) {
        self.tag.clear();
        self.name.clear();
        self.parts.clear();
        self.total = 0;
        self.literal.clear();
    }

    /// Drops the current command; back to idle, or failed when `fatal`.
    fn reject(&mut self, tag: Option<Vec<u8>>, error: CommandError, fatal: bool) -> Event {
        self.clear_command();
        self.state = if fatal { State::Failed } else { State::Idle };
        Event::Rejected(Rejection { tag, error, fatal })
    }

    /// One complete line (LF included) in the idle or continuation state.
    fn on_line(&mut self, line: &[u8]) -> Option<Event> {
        let content = line.strip_suffix(b"\n").unwrap_or(line);
        let (content, crlf) = match content.strip_suffix(b"\r") {
            Some(content) => (content, true),
            None => (content, false),
        };
        let first = self.state == State::Idle;
        if first && crlf && content.is_empty() {
            // An empty line between commands carries nothing.
            return None;
        }
        let announcement = announcement(content);
        let streams = announcement.streams();
        let forbidden = !crlf || content.iter().any(|&b| b == b'\r' || b == 0);
        if first {
            if forbidden {
                return Some(self.reject(
                    tag_prefix(content),
                    CommandError::ForbiddenOctet,
                    streams,
                ));
            }
            let (tag, name, args_start) = match split_tag_name(content) {
                Ok(found) => found,
                Err((tag, error)) => return Some(self.reject(tag, error, streams)),
            };
            self.tag = tag.to_vec();
            self.name = name.to_vec();
            self.total = line.len();
            self.text_and_literal(content, args_start, announcement)
        } else {
            let tag = Some(self.tag.clone());
            if forbidden {
                return Some(self.reject(tag, CommandError::ForbiddenOctet, streams));
            }
            self.total = self.total.saturating_add(line.len());
            self.text_and_literal(content, 0, announcement)
        }
    }

    /// Records the text `content[from..]` of a line, then starts its literal or, when the line
    /// announces none, parses the whole command.
    fn text_and_literal(
        &mut self,
        content: &[u8],
        from: usize,
        announcement: Announcement,
    ) -> Option<Event> {
        let tag = Some(self.tag.clone());
        let limit = self.limits.command;
        if self.total > limit {
            let error = CommandError::CommandTooLong { limit };
            return Some(self.reject(tag, error, announcement.streams()));
        }
        match announcement {
            Announcement::None => {
                let text = content.get(from..).unwrap_or_default().to_vec();
                self.parts.push(Part::Text(text));
                let parsed = parse_command(&self.tag, &self.name, &self.parts);
                let tag = std::mem::take(&mut self.tag);
                Some(match parsed {
                    Some(command) => {
                        self.clear_command();
                        self.state = State::Idle;
                        self.last_tag = Some(tag.clone());
                        Event::Command { tag, command }
                    }
                    None => self.reject(Some(tag), CommandError::Syntax, false),
                })
            }
            Announcement::Malformed { sync } => {
                Some(self.reject(tag, CommandError::MalformedLiteral, !sync))
            }
            Announcement::Literal { size, sync, start } => {
                let fits = usize::try_from(size)
                    .ok()
                    .filter(|&size| size <= self.limits.literal);
                let Some(size) = fits else {
                    let error = CommandError::LiteralTooBig {
                        size,
                        limit: self.limits.literal,
                    };
                    return Some(self.reject(tag, error, !sync));
                };
                self.total = self.total.saturating_add(size);
                if self.total > limit {
                    let error = CommandError::CommandTooLong { limit };
                    return Some(self.reject(tag, error, !sync));
                }
                let text = content.get(from..start).unwrap_or_default().to_vec();
                self.parts.push(Part::Text(text));
                self.literal.clear();
                if sync {
                    self.state = State::AwaitDecision { size };
                    Some(Event::LiteralRequested {
                        tag: self.tag.clone(),
                        name: self.name.clone(),
                        size,
                    })
                } else {
                    self.state = State::Literal { remaining: size };
                    None
                }
            }
        }
    }
}

/// ATOM-CHAR: any CHAR except atom-specials (RFC 9051 §9).
fn is_atom_char(b: u8) -> bool {
    (0x21..0x7f).contains(&b)
        && !matches!(b, b'(' | b')' | b'{' | b'%' | b'*' | b'"' | b'\\' | b']')
}

/// ASTRING-CHAR = ATOM-CHAR / resp-specials.
fn is_astring_char(b: u8) -> bool {
    is_atom_char(b) || b == b']'
}

/// tag = 1*<any ASTRING-CHAR except "+">.
fn is_tag_char(b: u8) -> bool {
    is_astring_char(b) && b != b'+'
}

/// The tag of a line that starts `tag SP`, when it is a valid one (for refusals).
fn tag_prefix(line: &[u8]) -> Option<Vec<u8>> {
    let len = line.iter().position(|&b| !is_tag_char(b))?;
    let (tag, rest) = line.split_at_checked(len)?;
    (!tag.is_empty() && tag.len() <= MAX_TAG_LEN && rest.first() == Some(&b' '))
        .then(|| tag.to_vec())
}

type TagError<'a> = (Option<Vec<u8>>, CommandError);

/// `tag SP name`, and where the arguments start (at their SP, or the end of the line).
fn split_tag_name(content: &[u8]) -> Result<(&[u8], &[u8], usize), TagError<'_>> {
    let tag_len = content
        .iter()
        .position(|&b| !is_tag_char(b))
        .unwrap_or(content.len());
    let tag = content.get(..tag_len).unwrap_or_default();
    let after = content.get(tag_len..).unwrap_or_default();
    if tag.is_empty() || tag.len() > MAX_TAG_LEN {
        return Err((None, CommandError::InvalidTag));
    }
    match after.first() {
        None => return Err((Some(tag.to_vec()), CommandError::InvalidCommandName)),
        Some(b' ') => {}
        Some(_) => return Err((None, CommandError::InvalidTag)),
    }
    let name_start = tag_len + 1;
    let rest = content.get(name_start..).unwrap_or_default();
    let name_len = rest
        .iter()
        .position(|&b| !is_atom_char(b))
        .unwrap_or(rest.len());
    let name = rest.get(..name_len).unwrap_or_default();
    let after_name = rest.get(name_len..).unwrap_or_default();
    if name.is_empty() || !(after_name.is_empty() || after_name.first() == Some(&b' ')) {
        return Err((Some(tag.to_vec()), CommandError::InvalidCommandName));
    }
    Ok((tag, name, name_start + name_len))
}

/// Finds a literal announced at the end of a line (without its line end).
///
/// Only a whole token counts: after SP or `(` outside quoted strings, running to the end of the
/// line. Quotes are tracked so `"{5}"` is string content, and an unterminated quote ends the
/// command (the parser then refuses it).
fn announcement(content: &[u8]) -> Announcement {
    let mut in_quote = false;
    let mut escaped = false;
    let mut token_start = None;
    for (i, &b) in content.iter().enumerate() {
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
        } else if b == b' ' || b == b'(' {
            token_start = Some(i + 1);
        }
    }
    let Some(start) = token_start.filter(|_| !in_quote) else {
        return Announcement::None;
    };
    let token = content.get(start..).unwrap_or_default();
    let Some(inner) = token.strip_suffix(b"}") else {
        return Announcement::None;
    };
    if token.contains(&b'"') {
        return Announcement::None;
    }
    if let Some(inner) = inner.strip_prefix(b"~{") {
        // literal8 (RFC 3516) is only valid after login.
        return Announcement::Malformed {
            sync: !inner.ends_with(b"+"),
        };
    }
    let Some(inner) = inner.strip_prefix(b"{") else {
        // A brace inside an atom (`x{5}`) is atom text, not a literal.
        return Announcement::None;
    };
    let (digits, sync) = match inner.strip_suffix(b"+") {
        Some(digits) => (digits, false),
        None => (inner, true),
    };
    let size = if digits.is_empty() {
        None
    } else {
        digits.iter().try_fold(0u64, |acc, &d| {
            if !d.is_ascii_digit() {
                return None;
            }
            acc.checked_mul(10)?.checked_add(u64::from(d - b'0'))
        })
    };
    match size {
        Some(size) => Announcement::Literal { size, sync, start },
        None => Announcement::Malformed { sync },
    }
}

/// A cursor over the assembled command's parts.
struct Args<'a> {
    parts: &'a [Part],
    index: usize,
    pos: usize,
}

impl<'a> Args<'a> {
    fn text(&self) -> &'a [u8] {
        match self.parts.get(self.index) {
            Some(Part::Text(text)) => text.get(self.pos..).unwrap_or_default(),
            _ => &[],
        }
    }

    fn peek(&self) -> Option<u8> {
        self.text().first().copied()
    }

    fn eat(&mut self, b: u8) -> bool {
        if self.peek() == Some(b) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn sp(&mut self) -> Option<()> {
        self.eat(b' ').then_some(())
    }

    fn at_end(&self) -> bool {
        self.text().is_empty() && self.index + 1 >= self.parts.len()
    }

    /// The literal standing where the current text ends.
    fn literal(&mut self) -> Option<&'a [u8]> {
        if !self.text().is_empty() {
            return None;
        }
        match self.parts.get(self.index + 1) {
            Some(Part::Literal(data)) => {
                self.index += 2;
                self.pos = 0;
                Some(data)
            }
            _ => None,
        }
    }

    fn run(&mut self, accept: impl Fn(u8) -> bool) -> &'a [u8] {
        let text = self.text();
        let len = text.iter().position(|&b| !accept(b)).unwrap_or(text.len());
        self.pos += len;
        text.get(..len).unwrap_or_default()
    }

    /// quoted = DQUOTE *QUOTED-CHAR DQUOTE, escapes only for `"` and `\`; 8-bit allowed
    /// (IMAP4rev2 quoted strings carry UTF-8). CR, LF and NUL never reach here.
    fn quoted(&mut self) -> Option<Vec<u8>> {
        if !self.eat(b'"') {
            return None;
        }
        let mut out = Vec::new();
        loop {
            let b = self.peek()?;
            self.pos += 1;
            match b {
                b'"' => return Some(out),
                b'\\' => {
                    let escaped = self.peek().filter(|&e| e == b'"' || e == b'\\')?;
                    self.pos += 1;
                    out.push(escaped);
                }
                _ => out.push(b),
            }
        }
    }

    /// string = quoted / literal (CHAR8: no NUL).
    fn string(&mut self) -> Option<Vec<u8>> {
        if self.peek() == Some(b'"') {
            return self.quoted();
        }
        self.literal()
            .filter(|data| !data.contains(&0))
            .map(<[u8]>::to_vec)
    }

    /// astring = 1*ASTRING-CHAR / string.
    fn astring(&mut self) -> Option<Vec<u8>> {
        let atom = self.run(is_astring_char);
        if atom.is_empty() {
            self.string()
        } else {
            Some(atom.to_vec())
        }
    }

    /// nstring = string / NIL; `Some(None)` for NIL.
    fn nstring(&mut self) -> Option<Option<Vec<u8>>> {
        match self.peek() {
            Some(b) if is_atom_char(b) => self
                .run(is_atom_char)
                .eq_ignore_ascii_case(b"NIL")
                .then_some(None),
            _ => self.string().map(Some),
        }
    }
}

/// Parses the assembled command; `None` is a syntax error.
fn parse_command(tag: &[u8], name: &[u8], parts: &[Part]) -> Option<Command> {
    let mut args = Args {
        parts,
        index: 0,
        pos: 0,
    };
    let command = match name.to_ascii_uppercase().as_slice() {
        b"CAPABILITY" => Command::Capability,
        b"NOOP" => Command::Noop,
        b"LOGOUT" => Command::Logout,
        b"STARTTLS" => Command::StartTls,
        b"LOGIN" => {
            args.sp()?;
            let username = args.astring()?;
            args.sp()?;
            let password = args.astring()?;
            Command::Login { username, password }
        }
        b"AUTHENTICATE" => {
            // RFC 9051 §6.2.2: the mechanism is an atom and the initial response base64 on the
            // same line; no literal anywhere.
            args.sp()?;
            let mechanism = args.run(is_atom_char).to_ascii_uppercase();
            if mechanism.is_empty() {
                return None;
            }
            let initial_response = if args.eat(b' ') {
                let ir = args.run(|_| true);
                if !crate::sasl::is_initial_response(ir) {
                    return None;
                }
                Some(ir.to_vec())
            } else {
                None
            };
            Command::Authenticate {
                mechanism,
                initial_response,
            }
        }
        b"ID" => {
            args.sp()?;
            let params = if args.eat(b'(') {
                let mut pairs = Vec::new();
                if !args.eat(b')') {
                    loop {
                        let field = args.string().filter(|f| f.len() <= MAX_FIELD_LEN)?;
                        args.sp()?;
                        let value = args
                            .nstring()
                            .filter(|v| v.as_ref().is_none_or(|v| v.len() <= MAX_VALUE_LEN))?;
                        pairs.push(IdPair { field, value });
                        if pairs.len() > MAX_PAIRS {
                            return None;
                        }
                        if args.eat(b')') {
                            break;
                        }
                        args.sp()?;
                    }
                }
                Some(pairs)
            } else if args.run(is_atom_char).eq_ignore_ascii_case(b"NIL") {
                None
            } else {
                return None;
            };
            Command::Id(IdCommand {
                tag: tag.to_vec(),
                params,
            })
        }
        _ => {
            return Some(Command::Other {
                name: name.to_vec(),
            });
        }
    };
    args.at_end().then_some(command)
}

/// Classifies one SASL response line (LF included).
fn sasl_line(line: &[u8]) -> SaslLine {
    let content = line.strip_suffix(b"\n").unwrap_or(line);
    let Some(content) = content.strip_suffix(b"\r") else {
        return SaslLine::Invalid;
    };
    if content == b"*" {
        SaslLine::Cancel
    } else if crate::sasl::is_base64_response(content) {
        SaslLine::Response(content.to_vec())
    } else {
        SaslLine::Invalid
    }
}

/// Writes a command as pieces: a synchronising literal ends the current piece.
struct Writer {
    pieces: Vec<Vec<u8>>,
    current: Vec<u8>,
    literal_plus: bool,
}

impl Writer {
    fn raw(&mut self, bytes: &[u8]) {
        self.current.extend_from_slice(bytes);
    }

    /// A string as a quoted string when it can be one, else as a literal.
    fn string(&mut self, s: &[u8]) {
        let quotable = s.len() <= MAX_QUOTED_LEN
            && s.iter()
                .all(|&b| (0x01..0x80).contains(&b) && b != b'\r' && b != b'\n');
        if quotable {
            self.current.push(b'"');
            for &b in s {
                if b == b'"' || b == b'\\' {
                    self.current.push(b'\\');
                }
                self.current.push(b);
            }
            self.current.push(b'"');
        } else if self.literal_plus {
            self.raw(format!("{{{}+}}\r\n", s.len()).as_bytes());
            self.raw(s);
        } else {
            self.raw(format!("{{{}}}\r\n", s.len()).as_bytes());
            self.pieces.push(std::mem::take(&mut self.current));
            self.raw(s);
        }
    }
}

/// Canonical encoding of a command for the backend: the pieces to send, the first at once,
/// each later one after the backend's `+` (one piece per synchronising literal). With
/// `literal_plus` everything is one piece using `{n+}`. Strings are quoted when 7-bit without
/// CR/LF/NUL and at most [`MAX_QUOTED_LEN`] octets, else literals. `Other` and `StartTls` are
/// never encoded, nor anything the parser could not have produced (a NUL in a string, an
/// invalid mechanism or initial response).
pub fn encode(tag: &[u8], command: &Command, literal_plus: bool) -> Option<Vec<Vec<u8>>> {
    if tag.is_empty() || tag.len() > MAX_TAG_LEN || !tag.iter().all(|&b| is_tag_char(b)) {
        return None;
    }
    let mut w = Writer {
        pieces: Vec::new(),
        current: tag.to_vec(),
        literal_plus,
    };
    match command {
        Command::Capability => w.raw(b" CAPABILITY"),
        Command::Noop => w.raw(b" NOOP"),
        Command::Logout => w.raw(b" LOGOUT"),
        Command::StartTls | Command::Other { .. } => return None,
        Command::Login { username, password } => {
            if username.contains(&0) || password.contains(&0) {
                return None;
            }
            w.raw(b" LOGIN ");
            w.string(username);
            w.raw(b" ");
            w.string(password);
        }
        Command::Authenticate {
            mechanism,
            initial_response,
        } => {
            if mechanism.is_empty() || !mechanism.iter().all(|&b| is_atom_char(b)) {
                return None;
            }
            w.raw(b" AUTHENTICATE ");
            w.raw(mechanism);
            if let Some(ir) = initial_response {
                if !crate::sasl::is_initial_response(ir) {
                    return None;
                }
                w.raw(b" ");
                w.raw(ir);
            }
        }
        Command::Id(id) => {
            w.raw(b" ID ");
            match &id.params {
                None => w.raw(b"NIL"),
                Some(pairs) => {
                    w.raw(b"(");
                    for (i, pair) in pairs.iter().enumerate() {
                        if pair.field.contains(&0)
                            || pair.value.as_ref().is_some_and(|v| v.contains(&0))
                        {
                            return None;
                        }
                        if i > 0 {
                            w.raw(b" ");
                        }
                        w.string(&pair.field);
                        w.raw(b" ");
                        match &pair.value {
                            Some(value) => w.string(value),
                            None => w.raw(b"NIL"),
                        }
                    }
                    w.raw(b")");
                }
            }
        }
    }
    w.raw(b"\r\n");
    w.pieces.push(w.current);
    Some(w.pieces)
}

/// A SASL line for the backend: a response and CRLF; a cancel (also for an invalid line) `*`.
pub fn encode_sasl(line: &SaslLine) -> Vec<u8> {
    match line {
        SaslLine::Response(b64) => {
            let mut out = Vec::with_capacity(b64.len() + 2);
            out.extend_from_slice(b64);
            out.extend_from_slice(b"\r\n");
            out
        }
        SaslLine::Cancel | SaslLine::Invalid => b"*\r\n".to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::line::split::{CHUNKS, drive};

    /// Plays a driver that accepts every literal, enters SASL after an AUTHENTICATE without
    /// initial response and leaves it after one SASL line.
    fn run_with(input: &[u8], chunk: usize, limits: Limits) -> Vec<Event> {
        let mut rx = CommandReceiver::new(limits);
        let (events, _) = drive(
            &mut rx,
            input,
            chunk,
            |rx, buf| rx.next(buf),
            |rx, event| {
                match event {
                    Event::LiteralRequested { .. } => rx.accept_literal(),
                    Event::Command {
                        command:
                            Command::Authenticate {
                                initial_response: None,
                                ..
                            },
                        ..
                    } => rx.begin_sasl(),
                    Event::Sasl(_) => rx.end_sasl(),
                    _ => {}
                }
                true
            },
        );
        events
    }

    /// The events for `input`, checked to be the same whatever the read sizes.
    fn events_with(input: &[u8], limits: Limits) -> Vec<Event> {
        let whole = run_with(input, 0, limits);
        for chunk in CHUNKS {
            assert_eq!(
                run_with(input, chunk, limits),
                whole,
                "chunk {chunk} of {:?}",
                String::from_utf8_lossy(input)
            );
        }
        whole
    }

    fn events(input: &[u8]) -> Vec<Event> {
        events_with(input, Limits::default())
    }

    fn cmd(tag: &str, command: Command) -> Event {
        Event::Command {
            tag: tag.into(),
            command,
        }
    }

    fn rej(tag: Option<&str>, error: CommandError, fatal: bool) -> Event {
        Event::Rejected(Rejection {
            tag: tag.map(Into::into),
            error,
            fatal,
        })
    }

    fn lit(tag: &str, name: &str, size: usize) -> Event {
        Event::LiteralRequested {
            tag: tag.into(),
            name: name.into(),
            size,
        }
    }

    fn login(username: &[u8], password: &[u8]) -> Command {
        Command::Login {
            username: username.to_vec(),
            password: password.to_vec(),
        }
    }

    fn auth(mechanism: &str, ir: Option<&str>) -> Command {
        Command::Authenticate {
            mechanism: mechanism.into(),
            initial_response: ir.map(Into::into),
        }
    }

    type Pairs<'a> = &'a [(&'a [u8], Option<&'a [u8]>)];

    fn id(tag: &str, pairs: Option<Pairs<'_>>) -> Command {
        Command::Id(IdCommand {
            tag: tag.into(),
            params: pairs.map(|pairs| {
                pairs
                    .iter()
                    .map(|(f, v)| IdPair {
                        field: f.to_vec(),
                        value: v.map(<[u8]>::to_vec),
                    })
                    .collect()
            }),
        })
    }

    fn other(name: &str) -> Command {
        Command::Other { name: name.into() }
    }

    use CommandError::*;

    fn check_table(table: &[(&[u8], Vec<Event>)]) {
        for (input, expected) in table {
            assert_eq!(
                &events(input),
                expected,
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn the_whitelisted_commands_parse() {
        check_table(&[
            (b"a CAPABILITY\r\n", vec![cmd("a", Command::Capability)]),
            (b"a1 noop\r\n", vec![cmd("a1", Command::Noop)]),
            (b"z LogOut\r\n", vec![cmd("z", Command::Logout)]),
            (b"t STARTTLS\r\n", vec![cmd("t", Command::StartTls)]),
            (
                b"a LOGIN alice secret1\r\n",
                vec![cmd("a", login(b"alice", b"secret1"))],
            ),
            (
                b"a login \"alice\" ]x]\r\n",
                vec![cmd("a", login(b"alice", b"]x]"))],
            ),
            (
                b"a AUTHENTICATE plain AGFsaWNlAHNlY3JldA==\r\n",
                vec![cmd("a", auth("PLAIN", Some("AGFsaWNlAHNlY3JldA==")))],
            ),
            (
                b"a AUTHENTICATE PLAIN =\r\n",
                vec![cmd("a", auth("PLAIN", Some("=")))],
            ),
            (b"a ID NIL\r\n", vec![cmd("a", id("a", None))]),
            (b"a id nil\r\n", vec![cmd("a", id("a", None))]),
            (b"a ID ()\r\n", vec![cmd("a", id("a", Some(&[])))]),
            (
                b"a ID (\"name\" \"mutt\" \"os\" NIL)\r\n",
                vec![cmd(
                    "a",
                    id("a", Some(&[(b"name", Some(b"mutt")), (b"os", None)])),
                )],
            ),
            (b"a SELECT INBOX\r\n", vec![cmd("a", other("SELECT"))]),
            (
                b"a select \"unterminated\r\n",
                vec![cmd("a", other("select"))],
            ),
            (b"\r\n\r\na NOOP\r\n", vec![cmd("a", Command::Noop)]),
        ]);
    }

    #[test]
    fn braces_inside_atoms_are_atom_text_not_literals() {
        check_table(&[
            // A smuggling attempt: were `x{24+}` a literal, the LOGIN line would hide inside the
            // NOOP. A literal is a whole token (RFC 9051 §9), so this is atom text, and the LOGIN
            // is a command of its own, for the gate.
            (
                b"a2 NOOP x{24+}\r\na3 LOGIN alice secret1\r\n\r\n",
                vec![
                    rej(Some("a2"), Syntax, false),
                    cmd("a3", login(b"alice", b"secret1")),
                ],
            ),
            (
                b"a NOOP x{5+}\r\nhello\r\n",
                vec![
                    rej(Some("a"), Syntax, false),
                    rej(Some("hello"), InvalidCommandName, false),
                ],
            ),
            (b"a NOOP x{5}\r\n", vec![rej(Some("a"), Syntax, false)]),
            (b"a NOOP x~{5+}\r\n", vec![rej(Some("a"), Syntax, false)]),
            (
                b"a LOGIN x{5} p\r\nb NOOP\r\n",
                vec![rej(Some("a"), Syntax, false), cmd("b", Command::Noop)],
            ),
            (
                b"a LOGIN u x{5}\r\nhello\r\n",
                vec![
                    rej(Some("a"), Syntax, false),
                    rej(Some("hello"), InvalidCommandName, false),
                ],
            ),
            // A literal announced mid-line is no literal: the grammar refuses the brace.
            (b"a LOGIN {5} pass\r\n", vec![rej(Some("a"), Syntax, false)]),
            // Directly after a literal (no SP) a brace is not at a literal position either.
            (
                b"a LOGIN {5}\r\nalice{3}\r\nb NOOP\r\n",
                vec![
                    lit("a", "LOGIN", 5),
                    rej(Some("a"), Syntax, false),
                    cmd("b", Command::Noop),
                ],
            ),
            (
                b"a SELECT x{3+}\r\nabc\r\n",
                vec![
                    cmd("a", other("SELECT")),
                    rej(Some("abc"), InvalidCommandName, false),
                ],
            ),
        ]);
    }

    #[test]
    fn malformed_and_binary_literals_are_refused() {
        check_table(&[
            (
                b"a NOOP {}\r\nb NOOP\r\n",
                vec![
                    rej(Some("a"), MalformedLiteral, false),
                    cmd("b", Command::Noop),
                ],
            ),
            // `{+}`: the client streams an unknown number of octets.
            (
                b"a NOOP {+}\r\nb NOOP\r\n",
                vec![rej(Some("a"), MalformedLiteral, true)],
            ),
            (
                b"a LOGIN {abc}\r\nb NOOP\r\n",
                vec![
                    rej(Some("a"), MalformedLiteral, false),
                    cmd("b", Command::Noop),
                ],
            ),
            (
                b"a LOGIN {5a+}\r\nb NOOP\r\n",
                vec![rej(Some("a"), MalformedLiteral, true)],
            ),
            (
                b"a LOGIN {99999999999999999999}\r\nb NOOP\r\n",
                vec![
                    rej(Some("a"), MalformedLiteral, false),
                    cmd("b", Command::Noop),
                ],
            ),
            (
                b"a LOGIN {99999999999999999999+}\r\nb NOOP\r\n",
                vec![rej(Some("a"), MalformedLiteral, true)],
            ),
            // literal8 (RFC 3516) is never valid before login.
            (
                b"a LOGIN ~{5}\r\nb NOOP\r\n",
                vec![
                    rej(Some("a"), MalformedLiteral, false),
                    cmd("b", Command::Noop),
                ],
            ),
            (
                b"a LOGIN ~{5+}\r\nalice p\r\nb NOOP\r\n",
                vec![rej(Some("a"), MalformedLiteral, true)],
            ),
            (
                b"a ID (~{4+}\r\nname NIL)\r\n",
                vec![rej(Some("a"), MalformedLiteral, true)],
            ),
            (
                b"a LOGIN u {5}}\r\nb NOOP\r\n",
                vec![
                    rej(Some("a"), MalformedLiteral, false),
                    cmd("b", Command::Noop),
                ],
            ),
        ]);
    }

    #[test]
    fn empty_literals_are_empty_strings() {
        check_table(&[
            (
                b"a LOGIN {0}\r\n {0}\r\n\r\n",
                vec![
                    lit("a", "LOGIN", 0),
                    lit("a", "LOGIN", 0),
                    cmd("a", login(b"", b"")),
                ],
            ),
            (
                b"a LOGIN {0+}\r\n {0+}\r\n\r\n",
                vec![cmd("a", login(b"", b""))],
            ),
            (b"a LOGIN \"\" \"\"\r\n", vec![cmd("a", login(b"", b""))]),
        ]);
    }

    #[test]
    fn braces_inside_quoted_strings_are_string_content() {
        check_table(&[
            (
                b"a LOGIN \"{5}\" \"p\"\r\n",
                vec![cmd("a", login(b"{5}", b"p"))],
            ),
            (
                b"a LOGIN \"u\" \"{5+}\"\r\nb NOOP\r\n",
                vec![cmd("a", login(b"u", b"{5+}")), cmd("b", Command::Noop)],
            ),
            (
                b"a LOGIN \"u\" \"x {5}\"\r\n",
                vec![cmd("a", login(b"u", b"x {5}"))],
            ),
            // An unterminated quote hides the brace: no literal, and a syntax error.
            (
                b"a LOGIN u \"p {5}\r\nb NOOP\r\n",
                vec![rej(Some("a"), Syntax, false), cmd("b", Command::Noop)],
            ),
            (
                b"a LOGIN u \"p\\\" {5}\r\nb NOOP\r\n",
                vec![rej(Some("a"), Syntax, false), cmd("b", Command::Noop)],
            ),
            (
                b"a ID (\"x\" \"(\" \"y\" \"{3}\")\r\n",
                vec![cmd(
                    "a",
                    id("a", Some(&[(b"x", Some(b"(")), (b"y", Some(b"{3}"))])),
                )],
            ),
        ]);
    }

    #[test]
    fn literals_in_every_allowed_position() {
        check_table(&[
            (
                b"a LOGIN {5}\r\nalice \"pw\"\r\n",
                vec![lit("a", "LOGIN", 5), cmd("a", login(b"alice", b"pw"))],
            ),
            (
                b"a LOGIN alice {7}\r\nsecret1\r\n",
                vec![lit("a", "LOGIN", 7), cmd("a", login(b"alice", b"secret1"))],
            ),
            (
                b"a LOGIN {5}\r\nalice {7}\r\nsecret1\r\n",
                vec![
                    lit("a", "LOGIN", 5),
                    lit("a", "LOGIN", 7),
                    cmd("a", login(b"alice", b"secret1")),
                ],
            ),
            // RFC 7888 non-synchronising literals arrive unasked; content is never syntax.
            (
                b"a LOGIN {5+}\r\na\"{1}  {7+}\r\ns\r\n\0 1}\r\n",
                vec![Event::Rejected(Rejection {
                    tag: Some(b"a".to_vec()),
                    error: Syntax,
                    fatal: false,
                })],
            ),
            (
                b"a LOGIN {5+}\r\na\"{1} {6+}\r\ns\r\n{1}\r\n",
                vec![cmd("a", login(b"a\"{1}", b"s\r\n{1}"))],
            ),
            (
                b"a ID ({4}\r\nname {3}\r\nfoo)\r\n",
                vec![
                    lit("a", "ID", 4),
                    lit("a", "ID", 3),
                    cmd("a", id("a", Some(&[(b"name", Some(b"foo"))]))),
                ],
            ),
            (
                b"a ID (\"name\" {3+}\r\nf\xc3\xbc \"os\" NIL)\r\n",
                vec![cmd(
                    "a",
                    id("a", Some(&[(b"name", Some(b"f\xc3\xbc")), (b"os", None)])),
                )],
            ),
            // Other commands are still framed: their literals are consumed.
            (
                b"a SELECT {5}\r\nINBOX\r\nb NOOP\r\n",
                vec![
                    lit("a", "SELECT", 5),
                    cmd("a", other("SELECT")),
                    cmd("b", Command::Noop),
                ],
            ),
        ]);
    }

    #[test]
    fn literals_in_disallowed_positions_are_syntax_errors() {
        check_table(&[
            (
                b"a AUTHENTICATE {5}\r\nPLAIN\r\n",
                vec![lit("a", "AUTHENTICATE", 5), rej(Some("a"), Syntax, false)],
            ),
            (
                b"a AUTHENTICATE PLAIN {4+}\r\nAAA=\r\nb NOOP\r\n",
                vec![rej(Some("a"), Syntax, false), cmd("b", Command::Noop)],
            ),
            (
                b"a NOOP {3+}\r\nabc\r\n",
                vec![rej(Some("a"), Syntax, false)],
            ),
            (
                b"a CAPABILITY {3}\r\nabc\r\n",
                vec![lit("a", "CAPABILITY", 3), rej(Some("a"), Syntax, false)],
            ),
            (
                b"a STARTTLS {0}\r\n\r\n",
                vec![lit("a", "STARTTLS", 0), rej(Some("a"), Syntax, false)],
            ),
            (
                b"a LOGOUT {1+}\r\nx\r\n",
                vec![rej(Some("a"), Syntax, false)],
            ),
            // The ID field-value list needs its SP: `(` then a literal is fine, `)` is not.
            (
                b"a ID NIL {1+}\r\nx\r\n",
                vec![rej(Some("a"), Syntax, false)],
            ),
            // No literal stands in for the command name.
            (
                b"a {5}\r\nb NOOP\r\n",
                vec![
                    rej(Some("a"), InvalidCommandName, false),
                    cmd("b", Command::Noop),
                ],
            ),
            (
                b"a {5+}\r\nNOOP\r\n",
                vec![rej(Some("a"), InvalidCommandName, true)],
            ),
        ]);
    }

    #[test]
    fn bare_lf_bare_cr_and_nul_are_refused_and_resynchronise_after_the_lf() {
        check_table(&[
            // Dovecot takes the bare LF for a line end too, so both see the LOGIN separately.
            (
                b"a NOOP\na LOGIN u p\r\n",
                vec![
                    rej(Some("a"), ForbiddenOctet, false),
                    cmd("a", login(b"u", b"p")),
                ],
            ),
            (
                b"a NOOP\rb NOOP\r\nc NOOP\r\n",
                vec![
                    rej(Some("a"), ForbiddenOctet, false),
                    cmd("c", Command::Noop),
                ],
            ),
            (
                b"a LOGIN u\0 p\r\nb NOOP\r\n",
                vec![
                    rej(Some("a"), ForbiddenOctet, false),
                    cmd("b", Command::Noop),
                ],
            ),
            (
                b"\nb NOOP\r\n",
                vec![rej(None, ForbiddenOctet, false), cmd("b", Command::Noop)],
            ),
            (
                b"\0\r\nb NOOP\r\n",
                vec![rej(None, ForbiddenOctet, false), cmd("b", Command::Noop)],
            ),
            (
                b"a LOGIN u \"p\rq\"\r\nb NOOP\r\n",
                vec![
                    rej(Some("a"), ForbiddenOctet, false),
                    cmd("b", Command::Noop),
                ],
            ),
            // In a line after a literal.
            (
                b"a LOGIN {1}\r\nu p\nb NOOP\r\n",
                vec![
                    lit("a", "LOGIN", 1),
                    rej(Some("a"), ForbiddenOctet, false),
                    cmd("b", Command::Noop),
                ],
            ),
            // A refused line announcing a streaming literal ends the session.
            (
                b"a LOGIN u {5+}\nhello\r\n",
                vec![rej(Some("a"), ForbiddenOctet, true)],
            ),
            // A literal's content may hold CR, LF and 8-bit octets, but not NUL (CHAR8).
            (
                b"a LOGIN u {3+}\r\n\r\n\xff\r\n",
                vec![cmd("a", login(b"u", b"\r\n\xff"))],
            ),
            (
                b"a LOGIN u {3+}\r\na\0b\r\nc NOOP\r\n",
                vec![rej(Some("a"), Syntax, false), cmd("c", Command::Noop)],
            ),
        ]);
    }

    #[test]
    fn a_cr_at_a_read_boundary_completes_the_line() {
        // Split invariance checks every chunking; this one ends the first read on the CR.
        let input = b"a LOGIN u p\r\nb NOOP\r\n";
        let mut rx = CommandReceiver::default();
        let step = rx.next(&input[..12]);
        assert_eq!(
            step,
            Step {
                consumed: 0,
                event: None
            }
        );
        let step = rx.next(input);
        assert_eq!(step.consumed, 13);
        assert_eq!(step.event, Some(cmd("a", login(b"u", b"p"))));
        assert_eq!(events(input).len(), 2);
    }

    #[test]
    fn tags_are_checked() {
        let long = format!("{} NOOP\r\n", "t".repeat(MAX_TAG_LEN + 1));
        let max = format!("{} NOOP\r\n", "t".repeat(MAX_TAG_LEN));
        check_table(&[
            (b"a+1 NOOP\r\n", vec![rej(None, InvalidTag, false)]),
            (b"+ NOOP\r\n", vec![rej(None, InvalidTag, false)]),
            (b"* NOOP\r\n", vec![rej(None, InvalidTag, false)]),
            (b"a(b NOOP\r\n", vec![rej(None, InvalidTag, false)]),
            (b" NOOP\r\n", vec![rej(None, InvalidTag, false)]),
            (b"a\r\n", vec![rej(Some("a"), InvalidCommandName, false)]),
            (
                b"a  NOOP\r\n",
                vec![rej(Some("a"), InvalidCommandName, false)],
            ),
            (
                b"a NO\"OP\r\n",
                vec![rej(Some("a"), InvalidCommandName, false)],
            ),
            (
                b"a N\xc3\xb6OP\r\n",
                vec![rej(Some("a"), InvalidCommandName, false)],
            ),
            (long.as_bytes(), vec![rej(None, InvalidTag, false)]),
            (
                max.as_bytes(),
                vec![cmd(&"t".repeat(MAX_TAG_LEN), Command::Noop)],
            ),
            (b"a] NOOP\r\n", vec![cmd("a]", Command::Noop)]),
        ]);
    }

    #[test]
    fn quoted_strings_take_8bit_and_only_two_escapes() {
        check_table(&[
            (
                "a LOGIN \"jürgen\" \"pässwörd\"\r\n".as_bytes(),
                vec![cmd("a", login("jürgen".as_bytes(), "pässwörd".as_bytes()))],
            ),
            (
                b"a LOGIN \"a\\\"b\" \"c\\\\d\"\r\n",
                vec![cmd("a", login(b"a\"b", b"c\\d"))],
            ),
            (
                b"a LOGIN \"a\\nb\" p\r\n",
                vec![rej(Some("a"), Syntax, false)],
            ),
            // 8-bit is not an atom character.
            (
                "a LOGIN jürgen p\r\n".as_bytes(),
                vec![rej(Some("a"), Syntax, false)],
            ),
        ]);
    }

    #[test]
    fn argument_grammar_is_strict() {
        let pairs31: String = (0..31).map(|i| format!("\"f{i}\" \"v\" ")).collect();
        let pairs30: String = (0..30).map(|i| format!("\"f{i}\" \"v\" ")).collect();
        let id31 = format!("a ID ({})\r\n", pairs31.trim_end());
        let id30 = format!("a ID ({})\r\n", pairs30.trim_end());
        let field31 = format!("a ID (\"{}\" NIL)\r\n", "f".repeat(31));
        let value1025 = format!("a ID (\"f\" \"{}\")\r\n", "v".repeat(1025));
        let value1024 = format!("a ID (\"f\" \"{}\")\r\n", "v".repeat(1024));
        for bad in [
            &b"a NOOP x\r\n"[..],
            b"a CAPABILITY IMAP4rev1\r\n",
            b"a STARTTLS \r\n",
            b"a NOOP \r\n",
            b"a LOGIN\r\n",
            b"a LOGIN alice\r\n",
            b"a LOGIN alice \r\n",
            b"a LOGIN alice pw extra\r\n",
            b"a LOGIN  alice pw\r\n",
            b"a LOGIN alice (pw)\r\n",
            b"a AUTHENTICATE\r\n",
            b"a AUTHENTICATE \r\n",
            b"a AUTHENTICATE PLAIN \r\n",
            b"a AUTHENTICATE PLAIN AAA\r\n",
            b"a AUTHENTICATE PLAIN QR==\r\n",
            b"a AUTHENTICATE PLAIN A===\r\n",
            b"a AUTHENTICATE PLAIN ==\r\n",
            b"a AUTHENTICATE PLAIN AAAA AAAA\r\n",
            b"a AUTHENTICATE \"PLAIN\"\r\n",
            b"a ID\r\n",
            b"a ID \r\n",
            b"a ID (\"name\")\r\n",
            b"a ID (\"name\" \"x\"\r\n",
            b"a ID (\"name\" \"x\") junk\r\n",
            b"a ID (name \"x\")\r\n",
            b"a ID (\"name\" x)\r\n",
            b"a ID ( \"name\" \"x\")\r\n",
            b"a ID (\"name\" \"x\" )\r\n",
            b"a ID (\"name\"  \"x\")\r\n",
            b"a ID FOO\r\n",
            b"a ID NIL NIL\r\n",
            id31.as_bytes(),
            field31.as_bytes(),
            value1025.as_bytes(),
        ] {
            assert_eq!(
                events(bad),
                vec![rej(Some("a"), Syntax, false)],
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        // NIL is a valid astring atom for LOGIN (the username "NIL").
        assert_eq!(
            events(b"a LOGIN NIL pw\r\n"),
            vec![cmd("a", login(b"NIL", b"pw"))]
        );
        for good in [id30.as_bytes(), value1024.as_bytes()] {
            assert!(matches!(
                events(good).as_slice(),
                [Event::Command {
                    command: Command::Id(_),
                    ..
                }]
            ));
        }
    }

    #[test]
    fn sasl_lines_are_validated() {
        check_table(&[
            (
                b"a AUTHENTICATE PLAIN\r\nAGFsaWNlAHNlY3JldA==\r\nb NOOP\r\n",
                vec![
                    cmd("a", auth("PLAIN", None)),
                    Event::Sasl(SaslLine::Response(b"AGFsaWNlAHNlY3JldA==".to_vec())),
                    cmd("b", Command::Noop),
                ],
            ),
            (
                b"a AUTHENTICATE PLAIN\r\n*\r\n",
                vec![cmd("a", auth("PLAIN", None)), Event::Sasl(SaslLine::Cancel)],
            ),
            (
                b"a AUTHENTICATE PLAIN\r\n\r\n",
                vec![
                    cmd("a", auth("PLAIN", None)),
                    Event::Sasl(SaslLine::Response(Vec::new())),
                ],
            ),
        ]);
        for bad in [
            &b"AAA\r\n"[..],
            b"QR==\r\n",
            b"AAAA\n",
            b"AA\rA=\r\n",
            b"AA\0=\r\n",
            b"AAAA \r\n",
            b" *\r\n",
            b"*\n",
            b"a NOOP\r\n",
            b"AA=A\r\n",
            b"A===\r\n",
        ] {
            let mut input = b"a AUTHENTICATE X\r\n".to_vec();
            input.extend_from_slice(bad);
            input.extend_from_slice(b"b NOOP\r\n");
            assert_eq!(
                events(&input),
                vec![
                    cmd("a", auth("X", None)),
                    Event::Sasl(SaslLine::Invalid),
                    cmd("b", Command::Noop),
                ],
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(
            encode_sasl(&SaslLine::Response(b"AA==".to_vec())),
            b"AA==\r\n"
        );
        assert_eq!(encode_sasl(&SaslLine::Cancel), b"*\r\n");
        assert_eq!(encode_sasl(&SaslLine::Invalid), b"*\r\n");
    }

    #[test]
    fn an_over_long_sasl_line_is_fatal() {
        let limits = Limits {
            sasl_line: 6,
            ..Limits::default()
        };
        // Exactly the limit is fine.
        assert_eq!(
            events_with(b"a AUTHENTICATE X\r\nQUJD\r\n", limits),
            vec![
                cmd("a", auth("X", None)),
                Event::Sasl(SaslLine::Response(b"QUJD".to_vec()))
            ]
        );
        assert_eq!(
            events_with(b"a AUTHENTICATE X\r\nQUJDQUJD\r\nb NOOP\r\n", limits),
            vec![
                cmd("a", auth("X", None)),
                rej(Some("a"), LineTooLong { limit: 6 }, true)
            ]
        );
    }

    #[test]
    fn a_line_of_exactly_the_limit_passes_and_one_octet_more_is_skipped_whole() {
        let limits = Limits {
            line: 16,
            ..Limits::default()
        };
        assert_eq!(b"a LOGIN abc de\r\n".len(), 16);
        assert_eq!(
            events_with(b"a LOGIN abc de\r\n", limits),
            vec![cmd("a", login(b"abc", b"de"))]
        );
        // The rest of the long line is never parsed, even when it looks like a command.
        assert_eq!(
            events_with(b"a LOGIN abc def\r\nb NOOP\r\n", limits),
            vec![
                rej(Some("a"), LineTooLong { limit: 16 }, false),
                cmd("b", Command::Noop)
            ]
        );
        assert_eq!(
            events_with(b"a NOOP         \r\nc LOGIN u p\r\nb NOOP\r\n", limits),
            vec![
                rej(Some("a"), LineTooLong { limit: 16 }, false),
                cmd("c", login(b"u", b"p")),
                cmd("b", Command::Noop)
            ]
        );
        assert_eq!(
            events_with(b"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\r\nb NOOP\r\n", limits),
            vec![
                rej(None, LineTooLong { limit: 16 }, false),
                cmd("b", Command::Noop)
            ]
        );
        // A line after a literal has the same limit.
        assert_eq!(
            events_with(b"a LOGIN {1}\r\nu ppppppppppppppppp\r\nb NOOP\r\n", limits),
            vec![
                lit("a", "LOGIN", 1),
                rej(Some("a"), LineTooLong { limit: 16 }, false),
                cmd("b", Command::Noop)
            ]
        );
    }

    #[test]
    fn over_limit_literals_and_commands_are_refused() {
        let limits = Limits {
            literal: 10,
            // `a LOGIN {10}\r\n` + 10 + ` {10}\r\n` + 10 + `\r\n`: 14 + 10 + 7 + 10 + 2.
            command: 43,
            ..Limits::default()
        };
        let too_big = LiteralTooBig {
            size: 11,
            limit: 10,
        };
        let too_long = CommandTooLong { limit: 43 };
        for (input, expected) in [
            (
                &b"a LOGIN {11}\r\nb NOOP\r\n"[..],
                vec![rej(Some("a"), too_big, false), cmd("b", Command::Noop)],
            ),
            (
                b"a LOGIN {11+}\r\nb NOOP\r\n",
                vec![rej(Some("a"), too_big, true)],
            ),
            (
                b"a LOGIN {10}\r\n0123456789 {10}\r\n0123456789\r\n",
                vec![
                    lit("a", "LOGIN", 10),
                    lit("a", "LOGIN", 10),
                    cmd("a", login(b"0123456789", b"0123456789")),
                ],
            ),
            (
                b"a LOGIN {10}\r\n0123456789 {10}\r\n0123456789 x\r\nb NOOP\r\n",
                vec![
                    lit("a", "LOGIN", 10),
                    lit("a", "LOGIN", 10),
                    rej(Some("a"), too_long, false),
                    cmd("b", Command::Noop),
                ],
            ),
            (
                b"a X {10}\r\n0123456789 {10}\r\n0123456789 {10}\r\nb NOOP\r\n",
                vec![
                    lit("a", "X", 10),
                    lit("a", "X", 10),
                    rej(Some("a"), too_long, false),
                    cmd("b", Command::Noop),
                ],
            ),
            (
                b"a X {10+}\r\n0123456789 {10+}\r\n0123456789 {10+}\r\nb NOOP\r\n",
                vec![rej(Some("a"), too_long, true)],
            ),
        ] {
            assert_eq!(
                events_with(input, limits),
                expected,
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn a_refused_literal_drops_the_command() {
        let mut rx = CommandReceiver::default();
        let step = rx.next(b"a LOGIN {5}\r\n");
        assert_eq!(step.consumed, 13);
        assert_eq!(step.event, Some(lit("a", "LOGIN", 5)));
        assert!(rx.awaits_literal_decision());
        assert!(!rx.is_idle());
        // Nothing is read while the decision is pending.
        assert_eq!(
            rx.next(b"b NOOP\r\n"),
            Step {
                consumed: 0,
                event: None
            }
        );
        rx.refuse_literal();
        assert!(rx.is_idle());
        let step = rx.next(b"b NOOP\r\n");
        assert_eq!(step.event, Some(cmd("b", Command::Noop)));
        // accept/refuse outside a decision change nothing.
        rx.accept_literal();
        rx.refuse_literal();
        assert!(rx.is_idle());
    }

    #[test]
    fn sasl_mode_is_entered_and_left_by_the_driver() {
        let mut rx = CommandReceiver::default();
        rx.begin_sasl();
        assert!(rx.in_sasl());
        assert!(!rx.is_idle());
        let step = rx.next(b"a NOOP\r\n");
        assert_eq!(step.event, Some(Event::Sasl(SaslLine::Invalid)));
        rx.end_sasl();
        assert!(rx.is_idle());
        assert_eq!(rx.next(b"a NOOP\r\n").event, Some(cmd("a", Command::Noop)));
    }

    #[test]
    fn rejections_reply_tagged_or_untagged() {
        let r = Rejection {
            tag: Some(b"a1".to_vec()),
            error: LiteralTooBig { size: 9, limit: 1 },
            fatal: false,
        };
        assert_eq!(r.reply(), b"a1 BAD [TOOBIG] Literal too big\r\n");
        let r = Rejection {
            tag: None,
            error: ForbiddenOctet,
            fatal: false,
        };
        assert!(r.reply().starts_with(b"* BAD "));
        assert!(r.reply().ends_with(b"\r\n"));
    }

    fn round_trip_table() -> Vec<Command> {
        let long = vec![b'u'; MAX_QUOTED_LEN + 1];
        vec![
            Command::Capability,
            Command::Noop,
            Command::Logout,
            login(b"alice", b"secret1"),
            login(b"", b""),
            login(b"a\"b\\c", b"{5}"),
            login(b"NIL", b"x y (z)"),
            login("jürgen".as_bytes(), b"p"),
            login(b"u", b"line\r\nbreak"),
            login(b"u", b"\x7f\x01"),
            login(&long, b"\xff"),
            auth("PLAIN", None),
            auth("PLAIN", Some("=")),
            auth("XOAUTH2", Some("AGFsaWNlAHNlY3JldA==")),
            auth("SCRAM-SHA-256", Some("QUJD")),
            id("t", None),
            id("t", Some(&[])),
            id(
                "t",
                Some(&[
                    (b"name", Some(b"mu\"tt\\")),
                    (b"os", None),
                    (b"f\xc3\xbc", Some(b"x\r\ny")),
                ]),
            ),
        ]
    }

    /// Feeds the encoded pieces one by one: each piece but the last must end exactly where the
    /// receiver asks for the literal, the last exactly at the command's end.
    fn reparse(tag: &[u8], pieces: &[Vec<u8>]) -> Command {
        let mut rx = CommandReceiver::default();
        let (last, first) = pieces.split_last().unwrap();
        for piece in first {
            let step = rx.next(piece);
            assert_eq!(step.consumed, piece.len());
            assert!(matches!(step.event, Some(Event::LiteralRequested { .. })));
            rx.accept_literal();
        }
        let step = rx.next(last);
        assert_eq!(step.consumed, last.len());
        match step.event {
            Some(Event::Command { tag: t, command }) => {
                assert_eq!(t, tag);
                command
            }
            other => panic!("{other:?} for {pieces:?}"),
        }
    }

    #[test]
    fn encode_round_trips_through_the_receiver() {
        for command in round_trip_table() {
            let command = match command {
                Command::Id(mut id) => {
                    id.tag = b"t".to_vec();
                    Command::Id(id)
                }
                other => other,
            };
            for literal_plus in [false, true] {
                let pieces = encode(b"t", &command, literal_plus).unwrap();
                if literal_plus {
                    assert_eq!(pieces.len(), 1);
                }
                assert_eq!(reparse(b"t", &pieces), command, "{pieces:?}");
                // Split invariance of the whole encoded stream too.
                let events = events(&pieces.concat());
                assert_eq!(
                    events.last(),
                    Some(&cmd("t", command.clone())),
                    "{pieces:?}"
                );
            }
        }
    }

    #[test]
    fn encode_writes_canonical_bytes() {
        let one = |tag: &[u8], command: &Command| encode(tag, command, false).unwrap().concat();
        assert_eq!(one(b"a", &Command::Capability), b"a CAPABILITY\r\n");
        assert_eq!(one(b"a", &Command::Noop), b"a NOOP\r\n");
        assert_eq!(one(b"a", &Command::Logout), b"a LOGOUT\r\n");
        assert_eq!(
            one(b"a", &login(b"alice", b"secret")),
            b"a LOGIN \"alice\" \"secret\"\r\n"
        );
        assert_eq!(
            one(b"a", &login(b"a\"b", b"c\\d")),
            b"a LOGIN \"a\\\"b\" \"c\\\\d\"\r\n"
        );
        assert_eq!(
            encode(b"a", &login("jü".as_bytes(), b"p\r\n"), false),
            Some(vec![
                b"a LOGIN {3}\r\n".to_vec(),
                b"j\xc3\xbc {3}\r\n".to_vec(),
                b"p\r\n\r\n".to_vec()
            ])
        );
        assert_eq!(
            encode(b"a", &login("jü".as_bytes(), b"p"), true),
            Some(vec![b"a LOGIN {3+}\r\nj\xc3\xbc \"p\"\r\n".to_vec()])
        );
        let long = vec![b'x'; MAX_QUOTED_LEN + 1];
        let pieces = encode(b"a", &login(&long, b"p"), false).unwrap();
        assert_eq!(
            pieces[0],
            format!("a LOGIN {{{}}}\r\n", long.len()).as_bytes()
        );
        assert_eq!(one(b"a", &auth("PLAIN", None)), b"a AUTHENTICATE PLAIN\r\n");
        assert_eq!(
            one(b"a", &auth("PLAIN", Some("AGE="))),
            b"a AUTHENTICATE PLAIN AGE=\r\n"
        );
        assert_eq!(one(b"a", &id("x", None)), b"a ID NIL\r\n");
        assert_eq!(
            one(
                b"a",
                &id("a", Some(&[(b"name", Some(b"m\"")), (b"os", None)]))
            ),
            b"a ID (\"name\" \"m\\\"\" \"os\" NIL)\r\n"
        );
        assert_eq!(one(b"a", &id("a", Some(&[]))), b"a ID ()\r\n");
        // Never encoded: answered locally, or not something the parser produces.
        assert_eq!(encode(b"a", &Command::StartTls, true), None);
        assert_eq!(encode(b"a", &other("SELECT"), true), None);
        assert_eq!(encode(b"a", &login(b"u\0", b"p"), true), None);
        assert_eq!(encode(b"a", &auth("PL AIN", None), true), None);
        assert_eq!(encode(b"a", &auth("PLAIN", Some("QR==")), true), None);
        assert_eq!(encode(b"a+", &Command::Noop, true), None);
        assert_eq!(encode(b"", &Command::Noop, true), None);
    }

    /// Pseudo-random input from fragments that matter to the framer.
    fn random_input(rng: &mut fastrand::Rng) -> Vec<u8> {
        const FRAGMENTS: &[&[u8]] = &[
            b"{",
            b"}",
            b"+",
            b"~",
            b"\"",
            b"\\",
            b"\r",
            b"\n",
            b"\r\n",
            b" ",
            b"(",
            b")",
            b"\0",
            b"\xff",
            b"0",
            b"1",
            b"5",
            b"9",
            b"a",
            b"*",
            b"=",
            b"A",
            b"LOGIN ",
            b"ID (",
            b"NOOP",
            b"AUTHENTICATE ",
            b"NIL",
            b"{3}\r\n",
            b"{2+}\r\n",
            b"~{1+}\r\n",
            b"a1 ",
            b"{99999999999999999999}",
            b"AAAA",
        ];
        let mut out = Vec::new();
        for _ in 0..rng.usize(0..60) {
            if rng.u8(..) < 32 {
                out.push(rng.u8(..));
            } else {
                out.extend_from_slice(FRAGMENTS[rng.usize(..FRAGMENTS.len())]);
            }
        }
        out
    }

    #[test]
    fn random_input_never_panics_and_stays_bounded() {
        let limits = Limits {
            line: 24,
            literal: 8,
            command: 48,
            sasl_line: 16,
        };
        let mut rng = fastrand::Rng::with_seed(0x6d61_696c_6672_6f6e);
        for _ in 0..4000 {
            let input = random_input(&mut rng);
            let chunk = rng.usize(1..9);
            let mut rx = CommandReceiver::new(limits);
            let mut buf = Vec::new();
            let mut events = Vec::new();
            let mut sasl_lines = 0;
            for piece in input.chunks(chunk) {
                buf.extend_from_slice(piece);
                loop {
                    let step = rx.next(&buf);
                    assert!(step.consumed <= buf.len());
                    buf.drain(..step.consumed);
                    let buffered: usize = rx
                        .parts
                        .iter()
                        .map(|p| match p {
                            Part::Text(t) | Part::Literal(t) => t.len(),
                        })
                        .sum::<usize>()
                        + rx.literal.len();
                    assert!(buffered <= limits.command, "{input:?}");
                    assert!(rx.literal.len() <= limits.literal);
                    let Some(event) = step.event else { break };
                    match &event {
                        Event::LiteralRequested { size, .. } => {
                            assert!(*size <= limits.literal);
                            rx.accept_literal();
                        }
                        Event::Command {
                            tag,
                            command: command @ Command::Authenticate { .. },
                        } => {
                            let pieces = encode(tag, command, true).unwrap();
                            let mut again = CommandReceiver::default();
                            let step = again.next(&pieces[0]);
                            assert_eq!(step.event, Some(event.clone()));
                            rx.begin_sasl();
                        }
                        Event::Command { tag, command } => {
                            if let Some(pieces) = encode(tag, command, true) {
                                let mut again = CommandReceiver::default();
                                assert_eq!(again.next(&pieces[0]).event, Some(event.clone()));
                            }
                        }
                        Event::Sasl(_) => {
                            sasl_lines += 1;
                            if sasl_lines % 2 == 0 {
                                rx.end_sasl();
                            }
                        }
                        Event::Rejected(_) => {}
                    }
                    events.push(event);
                }
                // The driver never has to hold more than a line plus one read.
                assert!(
                    buf.len() < limits.line.max(limits.sasl_line) + chunk,
                    "{input:?}"
                );
            }
            // Split invariance on random input as well (same driver, whole input).
            let whole = run_with(&input, 0, limits);
            if !input.is_empty() && !events.iter().any(|e| matches!(e, Event::Sasl(_))) {
                assert_eq!(events, whole, "{input:?}");
            }
        }
    }
}
