//! POP3 receivers for the AUTHORIZATION state (RFC 1939 §3, RFC 2449, RFC 5034).
//!
//! Pull-style like the IMAP codec (`line::Step` is shared): the driver passes its read buffer,
//! drains `consumed`, and acts on the event. Client side: one command per line, or SASL
//! responses between [`CommandReceiver::begin_sasl`] and [`CommandReceiver::end_sasl`]. Server
//! side: responses framed by what the driver said to expect for each forwarded command
//! ([`ResponseReceiver::expect`]), because POP3 responses do not say whether they are
//! multi-line.

use std::collections::VecDeque;

use crate::line::Step;
use crate::line::{find_line, trim_line_end};

/// Longest command line (`limits.pop3_line`; RFC 2449 §4 allows 255 octets, clients exceed it).
pub const DEFAULT_COMMAND_LIMIT: usize = 512;
/// Longest AUTH continuation line (RFC 5034 leaves it open; 12 KiB as for SMTP AUTH, RFC 4954).
pub const DEFAULT_SASL_LINE_LIMIT: usize = 12288;
/// Longest backend line (RFC 1939 §3 says 512 for responses; SASL challenges are longer).
pub const DEFAULT_RESPONSE_LINE_LIMIT: usize = 12288;
/// Largest multi-line response before authentication (CAPA, AUTH mechanism list).
pub const DEFAULT_MULTILINE_LIMIT: usize = 65536;
/// Longest command keyword accepted (RFC 1939 keywords are 3–4 characters; extensions longer).
const MAX_KEYWORD_LEN: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommandLimits {
    pub command: usize,
    pub sasl_line: usize,
}

impl Default for CommandLimits {
    fn default() -> Self {
        CommandLimits {
            command: DEFAULT_COMMAND_LIMIT,
            sasl_line: DEFAULT_SASL_LINE_LIMIT,
        }
    }
}

/// One client command line, framed strictly: the keyword and what follows its space. The line
/// end and the client's raw bytes are not kept: what goes on to the backend is rebuilt from a
/// parsed [`crate::pop3::request::Request`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    /// The keyword, ASCII-uppercased (RFC 1939 §3: keywords are case-insensitive).
    pub keyword: Vec<u8>,
    /// Everything after the first SP, exactly; `None` when the line has no SP. Never contains
    /// CR, LF or NUL.
    pub arguments: Option<Vec<u8>>,
}

impl Command {
    pub fn is(&self, keyword: &str) -> bool {
        self.keyword == keyword.as_bytes()
    }

    /// Everything after the keyword and its space (empty when none).
    pub fn arguments(&self) -> &[u8] {
        self.arguments.as_deref().unwrap_or_default()
    }

    pub fn has_arguments(&self) -> bool {
        !self.arguments().is_empty()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    #[error("command line longer than {limit} octets")]
    LineTooLong { limit: usize },
    #[error("missing or invalid command keyword")]
    InvalidKeyword,
    #[error("CR or NUL inside a command line")]
    ForbiddenOctet,
    #[error("line ended by a bare LF")]
    BareLineFeed,
}

/// Refused input. `fatal` (an over-long SASL line: the backend waits for a whole line) means
/// answer `-ERR`, then close.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub error: CommandError,
    pub fatal: bool,
}

impl Rejection {
    pub fn reply(&self) -> Vec<u8> {
        match self.error {
            CommandError::LineTooLong { .. } => b"-ERR Command line too long\r\n".to_vec(),
            CommandError::InvalidKeyword => b"-ERR Unknown command\r\n".to_vec(),
            CommandError::ForbiddenOctet => {
                b"-ERR CR or NUL not allowed in a command line\r\n".to_vec()
            }
            CommandError::BareLineFeed => b"-ERR Command lines must end with CRLF\r\n".to_vec(),
        }
    }
}

/// One client line during an AUTH exchange (RFC 5034 §4), checked and re-emitted canonically.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SaslLine {
    /// Valid base64, possibly empty.
    Response(Vec<u8>),
    /// `*`: the client cancels.
    Cancel,
    /// Anything else (bad base64, a bare LF, a CR or NUL inside): never forwarded; mailfront
    /// sends `*` instead so the backend ends the exchange with `-ERR`.
    Invalid,
}

impl SaslLine {
    /// The line mailfront writes to the backend.
    pub fn canonical(&self) -> Vec<u8> {
        match self {
            SaslLine::Response(data) => [data.as_slice(), b"\r\n"].concat(),
            SaslLine::Cancel | SaslLine::Invalid => b"*\r\n".to_vec(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientEvent {
    Command(Command),
    SaslResponse(SaslLine),
    Rejected(Rejection),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClientState {
    Command,
    Sasl,
    SkipLine,
    Failed,
}

#[derive(Debug, Clone)]
pub struct CommandReceiver {
    limits: CommandLimits,
    state: ClientState,
}

impl Default for CommandReceiver {
    fn default() -> Self {
        Self::new(CommandLimits::default())
    }
}

impl CommandReceiver {
    pub fn new(limits: CommandLimits) -> Self {
        CommandReceiver {
            limits,
            state: ClientState::Command,
        }
    }

    /// The driver forwarded `AUTH mechanism …`: client lines are SASL responses until the
    /// backend's `+OK` or `-ERR` ([`CommandReceiver::end_sasl`]).
    pub fn begin_sasl(&mut self) {
        if self.state == ClientState::Command {
            self.state = ClientState::Sasl;
        }
    }

    pub fn end_sasl(&mut self) {
        if self.state == ClientState::Sasl {
            self.state = ClientState::Command;
        }
    }

    pub fn in_sasl(&self) -> bool {
        self.state == ClientState::Sasl
    }

    pub fn next(&mut self, buf: &[u8]) -> Step<ClientEvent> {
        let mut consumed = 0;
        loop {
            let rest = buf.get(consumed..).unwrap_or_default();
            let (used, event) = self.advance(rest);
            consumed += used;
            if event.is_some() || used == 0 {
                return Step { consumed, event };
            }
        }
    }

    fn advance(&mut self, rest: &[u8]) -> (usize, Option<ClientEvent>) {
        match self.state {
            ClientState::Failed => (rest.len(), None),
            ClientState::SkipLine => match rest.iter().position(|&b| b == b'\n') {
                Some(pos) => {
                    self.state = ClientState::Command;
                    (pos + 1, None)
                }
                None => (rest.len(), None),
            },
            ClientState::Sasl => match find_line(rest, self.limits.sasl_line) {
                Ok(None) => (0, None),
                Err(_) => {
                    self.state = ClientState::Failed;
                    let error = CommandError::LineTooLong {
                        limit: self.limits.sasl_line,
                    };
                    (
                        rest.len(),
                        Some(ClientEvent::Rejected(Rejection { error, fatal: true })),
                    )
                }
                Ok(Some(n)) => {
                    let line = match strict_content(rest.get(..n).unwrap_or_default()) {
                        Ok(b"*") => SaslLine::Cancel,
                        Ok(data) if crate::sasl::is_base64_response(data) => {
                            SaslLine::Response(data.to_vec())
                        }
                        _ => SaslLine::Invalid,
                    };
                    (n, Some(ClientEvent::SaslResponse(line)))
                }
            },
            ClientState::Command => match find_line(rest, self.limits.command) {
                Ok(None) => (0, None),
                Err(_) => {
                    self.state = ClientState::SkipLine;
                    let error = CommandError::LineTooLong {
                        limit: self.limits.command,
                    };
                    (
                        self.limits.command.min(rest.len()),
                        Some(ClientEvent::Rejected(Rejection {
                            error,
                            fatal: false,
                        })),
                    )
                }
                Ok(Some(n)) => {
                    let event = match strict_content(rest.get(..n).unwrap_or_default()) {
                        Ok(content) => parse_command(content),
                        Err(error) => ClientEvent::Rejected(Rejection {
                            error,
                            fatal: false,
                        }),
                    };
                    (n, Some(event))
                }
            },
        }
    }
}

/// The content of a framed line (LF included) without its CRLF, or why it is refused. Dovecot
/// also ends a line at a bare LF, and other servers may stop at a bare CR or a NUL: before
/// authentication only CRLF ends a line, so both sides always agree where one ends.
fn strict_content(line: &[u8]) -> Result<&[u8], CommandError> {
    let body = line.strip_suffix(b"\n").unwrap_or(line);
    let content = body.strip_suffix(b"\r").ok_or(CommandError::BareLineFeed)?;
    if content.iter().any(|&b| b == b'\r' || b == b'\n' || b == 0) {
        return Err(CommandError::ForbiddenOctet);
    }
    Ok(content)
}

/// `keyword [SP arguments]` (RFC 1939 §3). An empty line has no keyword.
fn parse_command(content: &[u8]) -> ClientEvent {
    let (keyword, arguments) = match content.iter().position(|&b| b == b' ') {
        Some(pos) => (
            content.get(..pos).unwrap_or_default(),
            Some(content.get(pos + 1..).unwrap_or_default().to_vec()),
        ),
        None => (content, None),
    };
    if keyword.is_empty()
        || keyword.len() > MAX_KEYWORD_LEN
        || !keyword.iter().all(u8::is_ascii_alphanumeric)
    {
        return ClientEvent::Rejected(Rejection {
            error: CommandError::InvalidKeyword,
            fatal: false,
        });
    }
    ClientEvent::Command(Command {
        keyword: keyword.to_ascii_uppercase(),
        arguments,
    })
}

/// The shape of the response to a forwarded command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// One line (`USER`, `QUIT`, `STLS`, `NOOP`, `LIST n`, …).
    SingleLine,
    /// `+OK` starts a multi-line response ending with `.` (RFC 1939 §3): `CAPA`, `AUTH` with no
    /// argument, `LIST`/`UIDL` with no argument, `RETR`, `TOP`.
    MultiLine,
    /// A single line whose `+OK` means the user is authenticated (`PASS`, `APOP`).
    Authentication,
    /// An AUTH exchange: `+ …` challenges until a final `+OK` (authenticated) or `-ERR`.
    Sasl,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    Err,
    /// `+ …` SASL challenge (RFC 5034 §4).
    Continuation,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Exactly as received; for multi-line responses every line up to and including `.CRLF`.
    pub raw: Vec<u8>,
    pub status: Status,
    /// What the driver said to expect (`None` for the greeting and unsolicited lines).
    pub expect: Option<Expect>,
}

impl Response {
    /// The `+OK` that ends AUTHORIZATION: the driver switches to the byte relay after
    /// forwarding it (RFC 1939 §6, RFC 5034 §4).
    pub fn authenticated(&self) -> bool {
        self.status == Status::Ok
            && matches!(self.expect, Some(Expect::Authentication | Expect::Sasl))
    }

    /// Whether this response ends the command it answers (a challenge does not).
    pub fn is_final(&self) -> bool {
        self.status != Status::Continuation
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponseLimits {
    pub line: usize,
    pub multiline: usize,
}

impl Default for ResponseLimits {
    fn default() -> Self {
        ResponseLimits {
            line: DEFAULT_RESPONSE_LINE_LIMIT,
            multiline: DEFAULT_MULTILINE_LIMIT,
        }
    }
}

/// Fatal: answer the client with [`crate::pop3::reply::err_unavailable`] and close.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ResponseError {
    #[error("backend line longer than {limit} octets")]
    LineTooLong { limit: usize },
    #[error("backend multi-line response longer than {limit} octets")]
    MultiLineTooLong { limit: usize },
    #[error("backend response is not +OK or -ERR")]
    Malformed,
    #[error("backend greeting is not +OK")]
    InvalidGreeting,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerEvent {
    /// The first line (RFC 1939 §4). A `-ERR` greeting is delivered too: relay it and close.
    Greeting(Response),
    Response(Response),
    Rejected(ResponseError),
}

#[derive(Debug, Clone)]
pub struct ResponseReceiver {
    limits: ResponseLimits,
    expected: VecDeque<Expect>,
    greeted: bool,
    /// A multi-line response being assembled.
    partial: Vec<u8>,
    failed: bool,
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
            expected: VecDeque::new(),
            greeted: false,
            partial: Vec::new(),
            failed: false,
        }
    }

    /// Record that a command was forwarded, in order (pipelining, RFC 2449 §6.6). The driver
    /// bounds how many are outstanding (`limits.preauth_commands`).
    pub fn expect(&mut self, expect: Expect) {
        self.expected.push_back(expect);
    }

    pub fn next(&mut self, buf: &[u8]) -> Step<ServerEvent> {
        let mut consumed = 0;
        loop {
            let rest = buf.get(consumed..).unwrap_or_default();
            let (used, event) = self.advance(rest);
            consumed += used;
            if event.is_some() || used == 0 {
                return Step { consumed, event };
            }
        }
    }

    fn fail(&mut self, error: ResponseError) -> Option<ServerEvent> {
        self.failed = true;
        self.partial.clear();
        Some(ServerEvent::Rejected(error))
    }

    fn advance(&mut self, rest: &[u8]) -> (usize, Option<ServerEvent>) {
        if self.failed {
            return (rest.len(), None);
        }
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
        if !self.partial.is_empty() {
            // Inside a multi-line body: lines until a lone `.` (RFC 1939 §3; `..` is stuffed).
            if self.partial.len().saturating_add(n) > self.limits.multiline {
                return (
                    n,
                    self.fail(ResponseError::MultiLineTooLong {
                        limit: self.limits.multiline,
                    }),
                );
            }
            self.partial.extend_from_slice(line);
            if trim_line_end(line) != b"." {
                return (n, None);
            }
            let raw = std::mem::take(&mut self.partial);
            let expect = self.expected.pop_front();
            return (
                n,
                Some(ServerEvent::Response(Response {
                    raw,
                    status: Status::Ok,
                    expect,
                })),
            );
        }
        let content = trim_line_end(line);
        let status = if starts_with_word(content, b"+OK") {
            Status::Ok
        } else if starts_with_word(content, b"-ERR") {
            Status::Err
        } else if content == b"+" || content.starts_with(b"+ ") {
            Status::Continuation
        } else {
            let error = if self.greeted {
                ResponseError::Malformed
            } else {
                ResponseError::InvalidGreeting
            };
            return (n, self.fail(error));
        };
        if !self.greeted {
            self.greeted = true;
            if status == Status::Continuation {
                return (n, self.fail(ResponseError::InvalidGreeting));
            }
            return (
                n,
                Some(ServerEvent::Greeting(Response {
                    raw: line.to_vec(),
                    status,
                    expect: None,
                })),
            );
        }
        let expect = self.expected.front().copied();
        match (status, expect) {
            (Status::Continuation, Some(Expect::Sasl)) => (
                n,
                Some(ServerEvent::Response(Response {
                    raw: line.to_vec(),
                    status,
                    expect,
                })),
            ),
            (Status::Continuation, _) => (n, self.fail(ResponseError::Malformed)),
            (Status::Ok, Some(Expect::MultiLine)) => {
                self.partial.extend_from_slice(line);
                (n, None)
            }
            _ => {
                self.expected.pop_front();
                (
                    n,
                    Some(ServerEvent::Response(Response {
                        raw: line.to_vec(),
                        status,
                        expect,
                    })),
                )
            }
        }
    }
}

/// `word` followed by a space or the end of the line (status indicators are case-sensitive in
/// practice; RFC 1939 §3 spells them in upper case).
fn starts_with_word(content: &[u8], word: &[u8]) -> bool {
    content
        .strip_prefix(word)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with(b" "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::line::split::{CHUNKS, drive};

    /// A driver stand-in: AUTH with a mechanism begins SASL, a SASL line `end` ends it.
    fn client_events(input: &[u8], chunk: usize, limits: CommandLimits) -> Vec<ClientEvent> {
        let mut rx = CommandReceiver::new(limits);
        let react = |rx: &mut CommandReceiver, event: &ClientEvent| {
            match event {
                ClientEvent::Command(c) if c.is("AUTH") && c.has_arguments() => rx.begin_sasl(),
                ClientEvent::SaslResponse(SaslLine::Response(d)) if d == b"ZW5k" => rx.end_sasl(),
                ClientEvent::Command(c) if c.is("STLS") => return false,
                _ => {}
            }
            true
        };
        drive(&mut rx, input, chunk, |rx, buf| rx.next(buf), react).0
    }

    fn client_split_invariant(input: &[u8], limits: CommandLimits) -> Vec<ClientEvent> {
        let whole = client_events(input, 0, limits);
        for chunk in CHUNKS {
            assert_eq!(client_events(input, chunk, limits), whole, "chunk {chunk}");
        }
        whole
    }

    fn command(keyword: &str, arguments: Option<&[u8]>) -> ClientEvent {
        ClientEvent::Command(Command {
            keyword: keyword.into(),
            arguments: arguments.map(<[u8]>::to_vec),
        })
    }

    fn rejected(error: CommandError) -> ClientEvent {
        ClientEvent::Rejected(Rejection {
            error,
            fatal: false,
        })
    }

    #[test]
    fn commands_are_split_into_keyword_and_arguments() {
        let got = client_split_invariant(
            b"capa\r\nUSER alice\r\nPASS  two words \r\nlist 1\r\nAUTH \r\n",
            CommandLimits::default(),
        );
        assert_eq!(
            got,
            vec![
                command("CAPA", None),
                command("USER", Some(b"alice")),
                command("PASS", Some(b" two words ")),
                command("LIST", Some(b"1")),
                command("AUTH", Some(b"")),
            ]
        );
    }

    #[test]
    fn only_crlf_ends_a_line_and_cr_nul_and_bare_lf_are_refused() {
        let got = client_split_invariant(
            b"USER a\nUSER b\rPASS c\r\nUSER \0\r\n\n\r\n \r\nUS\xffER\r\nUSER\tx\r\nNOOP\r\n",
            CommandLimits::default(),
        );
        assert_eq!(
            got,
            vec![
                rejected(CommandError::BareLineFeed),
                rejected(CommandError::ForbiddenOctet),
                rejected(CommandError::ForbiddenOctet),
                rejected(CommandError::BareLineFeed),
                rejected(CommandError::InvalidKeyword),
                rejected(CommandError::InvalidKeyword),
                rejected(CommandError::InvalidKeyword),
                rejected(CommandError::InvalidKeyword),
                command("NOOP", None),
            ]
        );
    }

    #[test]
    fn a_cr_at_the_end_of_one_read_and_the_lf_at_the_start_of_the_next_is_a_crlf() {
        let mut rx = CommandReceiver::default();
        let mut buf = b"USER alice\r".to_vec();
        let step = rx.next(&buf);
        assert_eq!((step.consumed, step.event), (0, None));
        buf.extend_from_slice(b"\nPASS x\r");
        let step = rx.next(&buf);
        assert_eq!(step.event, Some(command("USER", Some(b"alice"))));
        buf.drain(..step.consumed);
        assert_eq!(buf, b"PASS x\r");
        buf.push(b'\n');
        assert_eq!(rx.next(&buf).event, Some(command("PASS", Some(b"x"))));
    }

    #[test]
    fn auth_exchange_lines_are_sasl_responses_checked_and_canonical() {
        let got = client_split_invariant(
            b"AUTH PLAIN\r\nQUIT\r\n*\r\n\r\nUSER a\r\nAG=A\r\nAGFs\nAG\rFs\r\nAG\0A\r\n* \r\nZW5k\r\nNOOP\r\n",
            CommandLimits::default(),
        );
        use SaslLine::*;
        assert_eq!(
            got,
            vec![
                command("AUTH", Some(b"PLAIN")),
                // Valid base64 is data even when it spells a command.
                ClientEvent::SaslResponse(Response(b"QUIT".to_vec())),
                ClientEvent::SaslResponse(Cancel),
                ClientEvent::SaslResponse(Response(Vec::new())),
                ClientEvent::SaslResponse(Invalid),
                ClientEvent::SaslResponse(Invalid),
                ClientEvent::SaslResponse(Invalid),
                ClientEvent::SaslResponse(Invalid),
                ClientEvent::SaslResponse(Invalid),
                ClientEvent::SaslResponse(Invalid),
                ClientEvent::SaslResponse(Response(b"ZW5k".to_vec())),
                command("NOOP", None),
            ]
        );
        assert_eq!(Invalid.canonical(), b"*\r\n");
        assert_eq!(Response(b"AGFs".to_vec()).canonical(), b"AGFs\r\n");
    }

    #[test]
    fn over_long_command_is_refused_and_the_receiver_resynchronises() {
        let limits = CommandLimits {
            command: 16,
            sasl_line: 34,
        };
        let got = client_split_invariant(b"USER aaaaaaaaaaaaaaaaaaaaaaaaaa\r\nNOOP\r\n", limits);
        assert_eq!(
            got,
            vec![
                rejected(CommandError::LineTooLong { limit: 16 }),
                command("NOOP", None),
            ]
        );
        // Exactly the limit (CRLF included) passes, one octet more does not.
        let got = client_split_invariant(b"USER aaaaaaaaa\r\nUSER aaaaaaaaaa\r\n", limits);
        assert_eq!(
            got,
            vec![
                command("USER", Some(b"aaaaaaaaa")),
                rejected(CommandError::LineTooLong { limit: 16 }),
            ]
        );
        // SASL lines get the larger allowance, exactly; past it the session ends.
        let data = [[b'A'; 30].as_slice(), b"=="].concat();
        let exact = [b"AUTH X\r\n".as_slice(), &data, b"\r\n"].concat();
        let got = client_split_invariant(&exact, limits);
        assert_eq!(got[1], ClientEvent::SaslResponse(SaslLine::Response(data)));
        let over = [b"AUTH X\r\n".as_slice(), &[b'A'; 34], b"==\r\nNOOP\r\n"].concat();
        let got = client_split_invariant(&over, limits);
        assert_eq!(got.len(), 2);
        assert!(matches!(&got[1], ClientEvent::Rejected(r) if r.fatal));
    }

    #[test]
    fn default_limit_is_512_octets() {
        let mut line = b"USER ".to_vec();
        line.extend_from_slice(&[b'a'; 505]);
        line.extend_from_slice(b"\r\n");
        assert_eq!(line.len(), 512);
        assert!(matches!(
            CommandReceiver::default().next(&line).event,
            Some(ClientEvent::Command(_))
        ));
        line.insert(5, b'a');
        assert!(matches!(
            CommandReceiver::default().next(&line).event,
            Some(ClientEvent::Rejected(_))
        ));
    }

    #[test]
    fn stls_with_pipelined_user_exposes_the_bytes_to_drop() {
        let buf = b"STLS\r\nUSER x\r\n";
        let step = CommandReceiver::default().next(buf);
        assert_eq!(step.event, Some(command("STLS", None)));
        assert_eq!(&buf[step.consumed..], b"USER x\r\n");
    }

    fn server_events(
        input: &[u8],
        chunk: usize,
        expects: &[Expect],
        limits: ResponseLimits,
    ) -> Vec<ServerEvent> {
        let mut rx = ResponseReceiver::new(limits);
        for e in expects {
            rx.expect(*e);
        }
        drive(&mut rx, input, chunk, |rx, buf| rx.next(buf), |_, _| true).0
    }

    fn server_split_invariant(
        input: &[u8],
        expects: &[Expect],
        limits: ResponseLimits,
    ) -> Vec<ServerEvent> {
        let whole = server_events(input, 0, expects, limits);
        for chunk in CHUNKS {
            assert_eq!(
                server_events(input, chunk, expects, limits),
                whole,
                "chunk {chunk}"
            );
        }
        whole
    }

    fn ok(raw: &[u8], status: Status, expect: Option<Expect>) -> ServerEvent {
        ServerEvent::Response(Response {
            raw: raw.to_vec(),
            status,
            expect,
        })
    }

    #[test]
    fn responses_follow_the_expected_shapes_in_order() {
        let input = b"+OK [XCLIENT] Dovecot ready. <1.2@host>\r\n\
+OK\r\nCAPA\r\n..odd\r\nSTLS\r\nSASL PLAIN\r\n.\r\n\
+OK\r\n\
-ERR [AUTH] Authentication failed.\r\n\
-ERR no capa\r\n\
+ \r\n\
+ YWJj\r\n\
+OK Logged in.\r\n";
        use Expect::*;
        let got = server_split_invariant(
            input,
            &[MultiLine, SingleLine, Authentication, MultiLine, Sasl],
            ResponseLimits::default(),
        );
        assert_eq!(
            got,
            vec![
                ServerEvent::Greeting(Response {
                    raw: b"+OK [XCLIENT] Dovecot ready. <1.2@host>\r\n".to_vec(),
                    status: Status::Ok,
                    expect: None
                }),
                ok(
                    b"+OK\r\nCAPA\r\n..odd\r\nSTLS\r\nSASL PLAIN\r\n.\r\n",
                    Status::Ok,
                    Some(MultiLine)
                ),
                ok(b"+OK\r\n", Status::Ok, Some(SingleLine)),
                ok(
                    b"-ERR [AUTH] Authentication failed.\r\n",
                    Status::Err,
                    Some(Authentication)
                ),
                ok(b"-ERR no capa\r\n", Status::Err, Some(MultiLine)),
                ok(b"+ \r\n", Status::Continuation, Some(Sasl)),
                ok(b"+ YWJj\r\n", Status::Continuation, Some(Sasl)),
                ok(b"+OK Logged in.\r\n", Status::Ok, Some(Sasl)),
            ]
        );
        let ServerEvent::Response(last) = got.last().unwrap() else {
            panic!()
        };
        assert!(last.authenticated() && last.is_final());
        let ServerEvent::Response(failed) = &got[3] else {
            panic!()
        };
        assert!(!failed.authenticated());
    }

    #[test]
    fn pass_ok_means_authenticated() {
        let got = server_split_invariant(
            b"+OK hi\r\n+OK maildrop locked\r\n",
            &[Expect::Authentication],
            ResponseLimits::default(),
        );
        let ServerEvent::Response(r) = &got[1] else {
            panic!()
        };
        assert!(r.authenticated());
    }

    #[test]
    fn continuation_outside_sasl_and_bad_greetings_are_fatal() {
        let got = server_events(
            b"+OK hi\r\n+ x\r\n+OK\r\n",
            0,
            &[Expect::SingleLine],
            ResponseLimits::default(),
        );
        assert_eq!(got[1], ServerEvent::Rejected(ResponseError::Malformed));
        assert_eq!(got.len(), 2);
        for greeting in [&b"* OK imap\r\n"[..], b"+ \r\n", b"220 smtp\r\n"] {
            let got = server_events(greeting, 0, &[], ResponseLimits::default());
            assert_eq!(
                got,
                vec![ServerEvent::Rejected(ResponseError::InvalidGreeting)]
            );
        }
        let got = server_events(
            b"-ERR [SYS/TEMP] busy\r\n",
            0,
            &[],
            ResponseLimits::default(),
        );
        assert!(matches!(&got[0], ServerEvent::Greeting(r) if r.status == Status::Err));
        let got = server_events(b"+OK hi\r\n+OKAY\r\n", 0, &[], ResponseLimits::default());
        assert_eq!(got[1], ServerEvent::Rejected(ResponseError::Malformed));
    }

    #[test]
    fn response_limits_are_enforced() {
        let limits = ResponseLimits {
            line: 16,
            multiline: 24,
        };
        let got = server_split_invariant(
            b"+OK hi\r\n-ERR 0123456789abcdef\r\n",
            &[Expect::SingleLine],
            limits,
        );
        assert_eq!(
            got[1],
            ServerEvent::Rejected(ResponseError::LineTooLong { limit: 16 })
        );
        let got = server_split_invariant(
            b"+OK hi\r\n+OK\r\nTOP\r\nUIDL\r\nUSER\r\nSTLS\r\nX\r\n.\r\n",
            &[Expect::MultiLine],
            limits,
        );
        assert_eq!(
            got[1],
            ServerEvent::Rejected(ResponseError::MultiLineTooLong { limit: 24 })
        );
    }

    #[test]
    fn unsolicited_lines_have_no_expectation() {
        let got = server_split_invariant(b"+OK hi\r\n-ERR bye\r\n", &[], ResponseLimits::default());
        assert_eq!(got[1], ok(b"-ERR bye\r\n", Status::Err, None));
    }
}
