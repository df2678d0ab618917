//! The typed POP3 commands mailfront understands before authentication, parsed strictly from a
//! framed [`Command`] and re-emitted in canonical form (RFC 1939 §3, RFC 2449, RFC 5034).
//!
//! Whatever reaches the backend before login is built here from the parsed value, never copied
//! from the client's bytes: if mailfront and the backend disagreed on where a command or an
//! argument ends, the client could smuggle a command past the gate. The parser accepts only the
//! AUTHORIZATION-state commands (RFC 1939 §4, RFC 2449 §5, RFC 2595 §4, RFC 5034 §4) that
//! Dovecot's pop3-login also accepts, minus XCLIENT/XOIP, which only mailfront may send.

use crate::pop3::codec::Command;

/// An APOP digest is 16 octets in hexadecimal (RFC 1939 §7).
const APOP_DIGEST_LEN: usize = 32;

/// A command parsed from a client line in the AUTHORIZATION state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Capa,
    Stls,
    Quit,
    /// RFC 1939 §5 allows NOOP and RSET only in the TRANSACTION state; parsed so they can be
    /// answered locally.
    Noop,
    Rset,
    /// `USER name`: the rest of the line is the name (as Dovecot takes it).
    User(Vec<u8>),
    /// `PASS string`: the rest of the line, spaces included (RFC 1939 §7).
    Pass(Vec<u8>),
    Apop {
        name: Vec<u8>,
        digest: Vec<u8>,
    },
    /// `AUTH` with no argument: the mechanism list (RFC 1734 style; Dovecot answers it).
    AuthList,
    /// `AUTH mechanism [initial-response]` (RFC 5034 §4); the mechanism upper-cased, the initial
    /// response valid base64 or `=`.
    Auth {
        mechanism: Vec<u8>,
        initial: Option<Vec<u8>>,
    },
}

/// Why a line is not a [`Request`]; each maps to the `-ERR` mailfront answers itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("unknown command")]
    Unknown,
    #[error("command takes no arguments")]
    UnexpectedArguments,
    #[error("missing argument")]
    MissingArgument,
    #[error("invalid argument")]
    InvalidArgument,
    #[error("invalid SASL mechanism name")]
    InvalidMechanism,
    #[error("initial response is not base64")]
    InvalidInitialResponse,
}

impl RequestError {
    pub fn reply(&self) -> Vec<u8> {
        match self {
            RequestError::Unknown => b"-ERR Unknown command\r\n".to_vec(),
            RequestError::UnexpectedArguments => b"-ERR Command takes no arguments\r\n".to_vec(),
            RequestError::MissingArgument => b"-ERR Missing argument\r\n".to_vec(),
            RequestError::InvalidArgument => b"-ERR Invalid argument\r\n".to_vec(),
            RequestError::InvalidMechanism => b"-ERR Invalid SASL mechanism\r\n".to_vec(),
            RequestError::InvalidInitialResponse => {
                b"-ERR Invalid base64 in the initial response\r\n".to_vec()
            }
        }
    }
}

impl Request {
    /// Parses a framed command. The framer already refused CR, LF and NUL inside the line.
    pub fn parse(cmd: &Command) -> Result<Request, RequestError> {
        let args = cmd.arguments.as_deref().filter(|a| !a.is_empty());
        let none = |request: Request| match args {
            None => Ok(request),
            Some(_) => Err(RequestError::UnexpectedArguments),
        };
        match cmd.keyword.as_slice() {
            b"CAPA" => none(Request::Capa),
            b"STLS" => none(Request::Stls),
            b"QUIT" => none(Request::Quit),
            b"NOOP" => none(Request::Noop),
            b"RSET" => none(Request::Rset),
            b"USER" => Ok(Request::User(text_argument(args)?.to_vec())),
            b"PASS" => Ok(Request::Pass(text_argument(args)?.to_vec())),
            b"APOP" => {
                let args = text_argument(args)?;
                let mut parts = args.split(|&b| b == b' ');
                let (Some(name), Some(digest), None) = (parts.next(), parts.next(), parts.next())
                else {
                    return Err(RequestError::InvalidArgument);
                };
                if name.is_empty()
                    || digest.len() != APOP_DIGEST_LEN
                    || !digest.iter().all(u8::is_ascii_hexdigit)
                {
                    return Err(RequestError::InvalidArgument);
                }
                Ok(Request::Apop {
                    name: name.to_vec(),
                    digest: digest.to_vec(),
                })
            }
            b"AUTH" => {
                let Some(args) = args else {
                    return Ok(Request::AuthList);
                };
                let mut parts = args.split(|&b| b == b' ');
                let mechanism = parts.next().unwrap_or_default();
                let initial = parts.next();
                if parts.next().is_some() {
                    return Err(RequestError::InvalidArgument);
                }
                if mechanism.is_empty()
                    || mechanism.len() > crate::sasl::MAX_MECHANISM_LEN
                    || !mechanism
                        .iter()
                        .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_')
                {
                    return Err(RequestError::InvalidMechanism);
                }
                // RFC 5034 §4: base64, or `=` for an empty initial response.
                if let Some(ir) = initial
                    && !crate::sasl::is_initial_response(ir)
                {
                    return Err(RequestError::InvalidInitialResponse);
                }
                Ok(Request::Auth {
                    mechanism: mechanism.to_ascii_uppercase(),
                    initial: initial.map(<[u8]>::to_vec),
                })
            }
            _ => Err(RequestError::Unknown),
        }
    }

    /// The line mailfront writes to the backend: `KEYWORD [SP arguments] CRLF`.
    pub fn canonical(&self) -> Vec<u8> {
        let simple = |keyword: &[u8]| [keyword, b"\r\n"].concat();
        let with = |keyword: &[u8], args: &[&[u8]]| {
            let mut out = keyword.to_vec();
            for arg in args {
                out.push(b' ');
                out.extend_from_slice(arg);
            }
            out.extend_from_slice(b"\r\n");
            out
        };
        match self {
            Request::Capa => simple(b"CAPA"),
            Request::Stls => simple(b"STLS"),
            Request::Quit => simple(b"QUIT"),
            Request::Noop => simple(b"NOOP"),
            Request::Rset => simple(b"RSET"),
            Request::User(name) => with(b"USER", &[name]),
            Request::Pass(password) => with(b"PASS", &[password]),
            Request::Apop { name, digest } => with(b"APOP", &[name, digest]),
            Request::AuthList => simple(b"AUTH"),
            Request::Auth {
                mechanism,
                initial: None,
            } => with(b"AUTH", &[mechanism]),
            Request::Auth {
                mechanism,
                initial: Some(ir),
            } => with(b"AUTH", &[mechanism, ir]),
        }
    }

    /// What the log may say about the command: the keyword and, for AUTH, the mechanism; never
    /// an argument that could be a secret.
    pub fn log_name(&self) -> String {
        match self {
            Request::Auth { mechanism, .. } => {
                format!("AUTH {}", crate::sasl::mechanism_for_log(mechanism))
            }
            other => {
                let line = other.canonical();
                let end = line
                    .iter()
                    .position(|&b| b == b' ' || b == b'\r')
                    .unwrap_or(line.len());
                String::from_utf8_lossy(line.get(..end).unwrap_or_default()).into_owned()
            }
        }
    }
}

/// A required argument that is free text (a name, a password): non-empty, and no control
/// characters besides HT. CR, LF and NUL never get here; the rest could still confuse a backend
/// or its logs, and no credential needs them.
fn text_argument(args: Option<&[u8]>) -> Result<&[u8], RequestError> {
    let args = args.ok_or(RequestError::MissingArgument)?;
    if args.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f) {
        return Err(RequestError::InvalidArgument);
    }
    Ok(args)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(keyword: &[u8], arguments: Option<&[u8]>) -> Command {
        Command {
            keyword: keyword.to_vec(),
            arguments: arguments.map(<[u8]>::to_vec),
        }
    }

    #[test]
    fn parse_and_canonical_form_table() {
        use RequestError::*;
        let rows: Vec<(Command, Result<&[u8], RequestError>)> = vec![
            (cmd(b"CAPA", None), Ok(b"CAPA\r\n")),
            (cmd(b"CAPA", Some(b"")), Ok(b"CAPA\r\n")),
            (cmd(b"CAPA", Some(b"x")), Err(UnexpectedArguments)),
            (cmd(b"QUIT", None), Ok(b"QUIT\r\n")),
            (cmd(b"STLS", Some(b"now")), Err(UnexpectedArguments)),
            (cmd(b"USER", None), Err(MissingArgument)),
            (cmd(b"USER", Some(b"")), Err(MissingArgument)),
            (cmd(b"USER", Some(b"alice")), Ok(b"USER alice\r\n")),
            (cmd(b"USER", Some(b"al\x1bice")), Err(InvalidArgument)),
            (
                cmd(b"USER", Some("j\u{f6}rg".as_bytes())),
                Ok("USER j\u{f6}rg\r\n".as_bytes()),
            ),
            // RFC 1939 §7: the password is the rest of the line, spaces and all.
            (
                cmd(b"PASS", Some(b" two  words ")),
                Ok(b"PASS  two  words \r\n"),
            ),
            (cmd(b"PASS", Some(b"tab\there")), Ok(b"PASS tab\there\r\n")),
            (cmd(b"PASS", None), Err(MissingArgument)),
            (
                cmd(b"APOP", Some(b"alice c4c9334bac560ecc979e58001b3e22fb")),
                Ok(b"APOP alice c4c9334bac560ecc979e58001b3e22fb\r\n"),
            ),
            (cmd(b"APOP", Some(b"alice xyz")), Err(InvalidArgument)),
            (
                cmd(b"APOP", Some(b"alice  c4c9334bac560ecc979e58001b3e22fb")),
                Err(InvalidArgument),
            ),
            (cmd(b"AUTH", None), Ok(b"AUTH\r\n")),
            (cmd(b"AUTH", Some(b"plain")), Ok(b"AUTH PLAIN\r\n")),
            (cmd(b"AUTH", Some(b"PLAIN =")), Ok(b"AUTH PLAIN =\r\n")),
            (
                cmd(b"AUTH", Some(b"PLAIN AGFsaWNlAHNlY3JldA==")),
                Ok(b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n"),
            ),
            (
                cmd(b"AUTH", Some(b"PLAIN AGFsaWNl!")),
                Err(InvalidInitialResponse),
            ),
            (
                cmd(b"AUTH", Some(b"PLAIN abc")),
                Err(InvalidInitialResponse),
            ),
            (
                cmd(b"AUTH", Some(b"PLAIN a===")),
                Err(InvalidInitialResponse),
            ),
            (cmd(b"AUTH", Some(b"PLAIN ")), Err(InvalidInitialResponse)),
            (cmd(b"AUTH", Some(b"PLAIN x y")), Err(InvalidArgument)),
            (cmd(b"AUTH", Some(b" PLAIN")), Err(InvalidMechanism)),
            (cmd(b"AUTH", Some(b"PL{AIN")), Err(InvalidMechanism)),
            (
                cmd(b"AUTH", Some(b"ABCDEFGHIJKLMNOPQRSTU")),
                Err(InvalidMechanism),
            ),
            (cmd(b"XCLIENT", Some(b"ADDR=1.2.3.4")), Err(Unknown)),
            (cmd(b"STAT", None), Err(Unknown)),
        ];
        for (command, want) in rows {
            let got = Request::parse(&command).map(|r| r.canonical());
            assert_eq!(got, want.map(<[u8]>::to_vec), "{command:?}");
        }
    }

    #[test]
    fn the_logged_name_never_carries_credentials() {
        assert_eq!(Request::Pass(b"s3cret".to_vec()).log_name(), "PASS");
        assert_eq!(Request::User(b"alice".to_vec()).log_name(), "USER");
        assert_eq!(
            Request::Auth {
                mechanism: b"PLAIN".to_vec(),
                initial: Some(b"AGFsaWNlAHMzY3JldA==".to_vec())
            }
            .log_name(),
            "AUTH PLAIN"
        );
        assert_eq!(Request::AuthList.log_name(), "AUTH");
    }
}
