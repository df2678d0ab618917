//! Typed SMTP commands parsed from one client line (RFC 5321 §4.1, RFC 3030, RFC 4954).
//!
//! Parsing never fails outright: a line either becomes a typed command, [`Command::Unknown`]
//! (forwarded untouched), or [`Command::Invalid`] carrying the verb, so the policy gate can still
//! apply verb-based rules first (an `AUTH` with a malformed argument before TLS gets the same
//! 530 as any other AUTH, RFC 8314 §4.1).

use crate::smtp::local_reply;
use crate::smtp::receiver::Line;

/// The command verb, matched case-insensitively (RFC 5321 §2.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verb {
    Ehlo,
    Helo,
    Mail,
    Rcpt,
    Data,
    Bdat,
    Rset,
    Noop,
    Quit,
    StartTls,
    Auth,
    Xclient,
    Xforward,
    Help,
    Vrfy,
    Expn,
    /// Anything else; forwarded so the backend answers it.
    Unknown,
}

impl Verb {
    fn from_token(token: &[u8]) -> Verb {
        const VERBS: [(&[u8], Verb); 16] = [
            (b"EHLO", Verb::Ehlo),
            (b"HELO", Verb::Helo),
            (b"MAIL", Verb::Mail),
            (b"RCPT", Verb::Rcpt),
            (b"DATA", Verb::Data),
            (b"BDAT", Verb::Bdat),
            (b"RSET", Verb::Rset),
            (b"NOOP", Verb::Noop),
            (b"QUIT", Verb::Quit),
            (b"STARTTLS", Verb::StartTls),
            (b"AUTH", Verb::Auth),
            (b"XCLIENT", Verb::Xclient),
            (b"XFORWARD", Verb::Xforward),
            (b"HELP", Verb::Help),
            (b"VRFY", Verb::Vrfy),
            (b"EXPN", Verb::Expn),
        ];
        VERBS
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(token))
            .map_or(Verb::Unknown, |&(_, verb)| verb)
    }

    /// Whether a client must wait for this command's reply before sending more (RFC 2920 §3.1:
    /// EHLO, DATA, VRFY, EXPN, QUIT, NOOP end a group; so do extension commands such as AUTH and
    /// STARTTLS unless their RFC says otherwise). The driver uses it to never pipeline past a
    /// group end towards the backend (Postfix `smtpd_forbid_unauth_pipelining`).
    pub fn ends_pipeline_group(self) -> bool {
        !matches!(self, Verb::Mail | Verb::Rcpt | Verb::Rset | Verb::Bdat)
    }
}

/// A command line that is syntactically unusable; each maps to the reply mailfront writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SyntaxError {
    /// A CR not followed by LF inside a command line. A backend that splits lines at CR would
    /// see two commands where mailfront saw one (RFC 5321 §2.3.8), so it is never forwarded.
    #[error("bare CR in command line")]
    BareCr,
    /// A line ended by an LF without CR (RFC 5321 §2.3.8). Postfix before 3.9 ends a command
    /// there too, other servers do not: never forwarded, so mailfront and the backend can never
    /// disagree on where a command ends.
    #[error("bare LF in command line")]
    BareLf,
    /// A NUL inside a command line. A backend written in C may end the line there and act on a
    /// prefix mailfront never judged (`XCLIENT\0…`), so it is never forwarded.
    #[error("NUL in command line")]
    Nul,
    /// `MAIL` without a parsable `FROM:<path>`: its parameters (REQUIRETLS) cannot be checked.
    #[error("MAIL without a parsable FROM:<path>")]
    Mail,
    /// `BDAT` without a valid chunk size: the chunk cannot be framed (RFC 3030 §2).
    #[error("BDAT without a valid chunk size")]
    Bdat,
    /// `STARTTLS` takes no parameters (RFC 3207 §4).
    #[error("STARTTLS with parameters")]
    StartTls,
    /// `RCPT` without a parsable `TO:<path>`: it could not be written anew, so it is not sent.
    #[error("RCPT without a parsable TO:<path>")]
    Rcpt,
    /// `AUTH` whose mechanism is not a SASL name (RFC 4422 §3.1), whose initial response is not
    /// base64 or `=` (RFC 4954 §4), or with words after it.
    #[error("AUTH with an unusable mechanism or initial response")]
    Auth,
    /// A SASL line after a `334` that is neither `*` nor base64 (RFC 4954 §4).
    #[error("SASL response not in base64")]
    Sasl,
    /// A command the gate answers itself and never forwards (STARTTLS, XCLIENT, XFORWARD).
    #[error("command never forwarded")]
    NotForwarded,
}

impl SyntaxError {
    /// The reply mailfront sends instead of forwarding the line.
    pub fn reply(self) -> &'static [u8] {
        match self {
            SyntaxError::BareCr => local_reply::BARE_CR_IN_COMMAND,
            SyntaxError::BareLf => local_reply::BARE_LF_IN_COMMAND,
            SyntaxError::Nul => local_reply::NUL_IN_COMMAND,
            SyntaxError::Mail => local_reply::MAIL_SYNTAX,
            SyntaxError::Bdat => local_reply::BDAT_SYNTAX,
            SyntaxError::StartTls => local_reply::STARTTLS_SYNTAX,
            SyntaxError::Rcpt => local_reply::RCPT_SYNTAX,
            SyntaxError::Auth => local_reply::AUTH_SYNTAX,
            SyntaxError::Sasl => local_reply::SASL_SYNTAX,
            SyntaxError::NotForwarded => local_reply::COMMAND_NOT_RECOGNIZED,
        }
    }
}

/// One `keyword[=value]` ESMTP parameter of MAIL or RCPT (RFC 5321 §4.1.2 `esmtp-param`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parameter {
    pub keyword: Vec<u8>,
    pub value: Option<Vec<u8>>,
}

/// `BODY=` values (RFC 6152, RFC 3030).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    SevenBit,
    EightBitMime,
    /// Requires BDAT: DATA after it gets 503 from the backend (RFC 3030 §3).
    BinaryMime,
    Other(Vec<u8>),
}

/// `MAIL FROM:<reverse-path> [params]`. The raw line is forwarded; these fields are for policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MailFrom {
    /// The path without its angle brackets (empty for the null path `<>`).
    pub reverse_path: Vec<u8>,
    pub parameters: Vec<Parameter>,
    /// REQUIRETLS as a parameter, or as any whitespace-separated word of the line: matched
    /// conservatively so no backend tokenizer can see one that mailfront missed (RFC 8689).
    pub requiretls: bool,
    /// SIZE=n (RFC 1870) when present and numeric.
    pub size: Option<u64>,
    pub body: Option<Body>,
    pub smtputf8: bool,
}

/// `RCPT TO:<forward-path> [params]`. Always forwarded; the path feeds the Received `for` clause.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RcptTo {
    /// The path without angle brackets, when the line had a parsable `TO:<path>`.
    pub forward_path: Option<Vec<u8>>,
    pub parameters: Vec<Parameter>,
}

/// `BDAT chunk-size [LAST]` (RFC 3030 §2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bdat {
    pub size: u64,
    pub last: bool,
}

/// `AUTH mechanism [initial-response]` (RFC 4954 §4). Never validated here: the answer before
/// TLS must not depend on the credential (RFC 8314 §4.1), and after TLS the backend judges it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Auth {
    pub mechanism: Vec<u8>,
    pub initial_response: Option<Vec<u8>>,
}

/// A parsed client command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// EHLO and its argument (trimmed, possibly empty, unvalidated client text).
    Ehlo(Vec<u8>),
    Helo(Vec<u8>),
    Mail(MailFrom),
    Rcpt(RcptTo),
    Data,
    Bdat(Bdat),
    Rset,
    Noop,
    Quit,
    StartTls,
    Auth(Auth),
    Xclient,
    Xforward,
    Help,
    Vrfy,
    Expn,
    Unknown,
    /// A recognised verb with unusable syntax; never forwarded.
    Invalid {
        verb: Verb,
        error: SyntaxError,
    },
}

impl Command {
    /// Parses one framed line: [`Command::parse`] of its text, except that a line ended by a
    /// bare LF is [`SyntaxError::BareLf`] (a bare CR or NUL inside wins, as the first fault).
    pub fn from_line(line: &Line) -> Command {
        let command = Command::parse(line.text());
        match command {
            Command::Invalid { .. } => command,
            _ if line.ends_with_bare_lf() => Command::Invalid {
                verb: command.verb(),
                error: SyntaxError::BareLf,
            },
            _ => command,
        }
    }

    /// Parses one command line, given without its line terminator.
    pub fn parse(line: &[u8]) -> Command {
        let line = trim_separators(line);
        let (verb_token, args) = split_word(line);
        // A CR ends the verb too: a backend splitting lines at a bare CR would see this verb.
        let verb_token = verb_token.split(|&b| b == b'\r').next().unwrap_or_default();
        let verb = Verb::from_token(verb_token);
        if line.contains(&b'\r') {
            return Command::Invalid {
                verb,
                error: SyntaxError::BareCr,
            };
        }
        if line.contains(&0) {
            return Command::Invalid {
                verb,
                error: SyntaxError::Nul,
            };
        }
        let invalid = |error| Command::Invalid { verb, error };
        match verb {
            Verb::Ehlo => Command::Ehlo(args.to_vec()),
            Verb::Helo => Command::Helo(args.to_vec()),
            Verb::Mail => parse_mail(line, args).map_or(invalid(SyntaxError::Mail), Command::Mail),
            Verb::Rcpt => parse_rcpt(args).map_or(invalid(SyntaxError::Rcpt), Command::Rcpt),
            Verb::Data => Command::Data,
            Verb::Bdat => parse_bdat(args).map_or(invalid(SyntaxError::Bdat), Command::Bdat),
            Verb::Rset => Command::Rset,
            Verb::Noop => Command::Noop,
            Verb::Quit => Command::Quit,
            Verb::StartTls if args.is_empty() => Command::StartTls,
            Verb::StartTls => invalid(SyntaxError::StartTls),
            Verb::Auth => parse_auth(args).map_or(invalid(SyntaxError::Auth), Command::Auth),
            Verb::Xclient => Command::Xclient,
            Verb::Xforward => Command::Xforward,
            Verb::Help => Command::Help,
            Verb::Vrfy => Command::Vrfy,
            Verb::Expn => Command::Expn,
            Verb::Unknown => Command::Unknown,
        }
    }

    pub fn verb(&self) -> Verb {
        match self {
            Command::Ehlo(_) => Verb::Ehlo,
            Command::Helo(_) => Verb::Helo,
            Command::Mail(_) => Verb::Mail,
            Command::Rcpt(_) => Verb::Rcpt,
            Command::Data => Verb::Data,
            Command::Bdat(_) => Verb::Bdat,
            Command::Rset => Verb::Rset,
            Command::Noop => Verb::Noop,
            Command::Quit => Verb::Quit,
            Command::StartTls => Verb::StartTls,
            Command::Auth(_) => Verb::Auth,
            Command::Xclient => Verb::Xclient,
            Command::Xforward => Verb::Xforward,
            Command::Help => Verb::Help,
            Command::Vrfy => Verb::Vrfy,
            Command::Expn => Verb::Expn,
            Command::Unknown => Verb::Unknown,
            Command::Invalid { verb, .. } => *verb,
        }
    }
}

/// A client line inside an AUTH exchange, after a backend 334 (RFC 4954 §4): never a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaslResponse {
    /// `*`: the client cancels; forwarded, and the backend answers 501.
    Cancel,
    /// Anything else (base64 expected); forwarded verbatim for the backend to judge.
    Data,
    /// A line whose framing a backend could read differently (bare CR, bare LF, NUL): never
    /// forwarded; the exchange is cancelled instead.
    Invalid(SyntaxError),
}

impl SaslResponse {
    /// Classifies one framed SASL line: a bare LF ending it, or a CR or NUL inside it, make it
    /// [`SaslResponse::Invalid`] (a `*` included), whatever the rest.
    pub fn from_line(line: &Line) -> SaslResponse {
        let text = line.text();
        if text.contains(&b'\r') {
            SaslResponse::Invalid(SyntaxError::BareCr)
        } else if text.contains(&0) {
            SaslResponse::Invalid(SyntaxError::Nul)
        } else if line.ends_with_bare_lf() {
            SaslResponse::Invalid(SyntaxError::BareLf)
        } else {
            SaslResponse::parse(text)
        }
    }

    /// Classifies one SASL line, given without its line terminator.
    pub fn parse(line: &[u8]) -> SaslResponse {
        if line == b"*" {
            SaslResponse::Cancel
        } else if crate::sasl::is_base64_response(line) {
            SaslResponse::Data
        } else {
            SaslResponse::Invalid(SyntaxError::Sasl)
        }
    }
}

/// Separators between words. Postfix tokenizes on `isspace`, so a tab (or VT/FF) splits words
/// there too: treating only SP as a separator would let `XCLIENT\tADDR=…` slip past as unknown.
pub(crate) fn is_separator(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | 0x0b | 0x0c)
}

fn trim_separators(mut s: &[u8]) -> &[u8] {
    while let Some((first, rest)) = s.split_first() {
        if !is_separator(*first) {
            break;
        }
        s = rest;
    }
    while let Some((last, rest)) = s.split_last() {
        if !is_separator(*last) {
            break;
        }
        s = rest;
    }
    s
}

/// Splits off the first word; the rest is trimmed of separators.
pub(crate) fn split_word(s: &[u8]) -> (&[u8], &[u8]) {
    let s = trim_separators(s);
    match s.iter().position(|&b| is_separator(b)) {
        Some(pos) => {
            let (word, rest) = s.split_at(pos);
            (word, trim_separators(rest))
        }
        None => (s, &[]),
    }
}

pub(crate) fn words(s: &[u8]) -> impl Iterator<Item = &[u8]> {
    s.split(|&b| is_separator(b)).filter(|w| !w.is_empty())
}

fn strip_prefix_ignore_case<'a>(s: &'a [u8], prefix: &[u8]) -> Option<&'a [u8]> {
    let (head, rest) = s.split_at_checked(prefix.len())?;
    head.eq_ignore_ascii_case(prefix).then_some(rest)
}

/// Whether a path (without its brackets) can be written back as one token every backend reads
/// the same: no separator, bracket or control character outside a quoted string, and every
/// quoted string closed (RFC 5321 §4.1.2 `Quoted-string`). `<a b@c>` would otherwise be one
/// path to mailfront and two words to Postfix's tokenizer.
fn path_is_one_token(path: &[u8]) -> bool {
    let mut quoted = false;
    let mut escaped = false;
    for &b in path {
        if b < 0x20 || b == 0x7f {
            return false;
        }
        if escaped {
            escaped = false;
        } else if quoted && b == b'\\' {
            escaped = true;
        } else if b == b'"' {
            quoted = !quoted;
        } else if !quoted && (is_separator(b) || b == b'<' || b == b'>') {
            return false;
        }
    }
    !quoted && !escaped
}

/// Splits `<path> params` or `path params`; the path is returned without brackets. Quoted
/// local parts may contain `>` and spaces (RFC 5321 §4.1.2 `Quoted-string`). `None` when the
/// path is not one token ([`path_is_one_token`]).
fn split_path(s: &[u8]) -> Option<(&[u8], &[u8])> {
    let (path, rest) = split_path_raw(s)?;
    path_is_one_token(path).then_some((path, rest))
}

fn split_path_raw(s: &[u8]) -> Option<(&[u8], &[u8])> {
    let s = trim_separators(s);
    let Some(inner) = s.strip_prefix(b"<") else {
        let (path, rest) = split_word(s);
        return (!path.is_empty()).then_some((path, rest));
    };
    let mut quoted = false;
    let mut escaped = false;
    for (i, &b) in inner.iter().enumerate() {
        if escaped {
            escaped = false;
        } else if quoted && b == b'\\' {
            escaped = true;
        } else if b == b'"' {
            quoted = !quoted;
        } else if b == b'>' && !quoted {
            let (path, rest) = inner.split_at(i);
            let rest = rest.get(1..).unwrap_or_default();
            return Some((path, trim_separators(rest)));
        }
    }
    None
}

/// `esmtp-keyword = (ALPHA / DIGIT) *(ALPHA / DIGIT / "-")` (RFC 5321 §4.1.2).
fn is_esmtp_keyword(keyword: &[u8]) -> bool {
    keyword.first().is_some_and(|b| b.is_ascii_alphanumeric())
        && keyword
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b == b'-')
}

/// The `keyword[=value]` words after a path; `None` if a keyword is not an `esmtp-keyword`
/// (a backend would split such a word differently, or not at all).
fn parse_parameters(s: &[u8]) -> Option<Vec<Parameter>> {
    words(s)
        .map(|word| {
            let (keyword, value) = match word.iter().position(|&b| b == b'=') {
                Some(eq) => {
                    let (keyword, value) = word.split_at(eq);
                    (keyword, Some(value.get(1..).unwrap_or_default().to_vec()))
                }
                None => (word, None),
            };
            let clean = value
                .as_deref()
                .is_none_or(|v| v.iter().all(|&b| b >= 0x20 && b != 0x7f));
            (is_esmtp_keyword(keyword) && clean).then(|| Parameter {
                keyword: keyword.to_vec(),
                value,
            })
        })
        .collect()
}

fn parse_mail(line: &[u8], args: &[u8]) -> Option<MailFrom> {
    let after = strip_prefix_ignore_case(args, b"FROM:")?;
    let (path, params) = split_path(after)?;
    let parameters = parse_parameters(params)?;
    let find = |name: &[u8]| {
        parameters
            .iter()
            .find(|p| p.keyword.eq_ignore_ascii_case(name))
    };
    let requiretls = words(line).any(|w| w.eq_ignore_ascii_case(b"REQUIRETLS"));
    let size = find(b"SIZE")
        .and_then(|p| p.value.as_deref())
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|v| v.parse::<u64>().ok());
    let body = find(b"BODY").and_then(|p| p.value.as_deref()).map(|v| {
        if v.eq_ignore_ascii_case(b"7BIT") {
            Body::SevenBit
        } else if v.eq_ignore_ascii_case(b"8BITMIME") {
            Body::EightBitMime
        } else if v.eq_ignore_ascii_case(b"BINARYMIME") {
            Body::BinaryMime
        } else {
            Body::Other(v.to_vec())
        }
    });
    let smtputf8 = find(b"SMTPUTF8").is_some();
    Some(MailFrom {
        reverse_path: path.to_vec(),
        parameters,
        requiretls,
        size,
        body,
        smtputf8,
    })
}

fn parse_rcpt(args: &[u8]) -> Option<RcptTo> {
    let (path, params) = strip_prefix_ignore_case(args, b"TO:").and_then(split_path)?;
    Some(RcptTo {
        forward_path: Some(path.to_vec()),
        parameters: parse_parameters(params)?,
    })
}

/// Longest SASL mechanism name (RFC 4422 §3.1).
const MAX_MECHANISM: usize = 20;

/// `AUTH mechanism [initial-response]` (RFC 4954 §4): the mechanism a SASL name (RFC 4422 §3.1:
/// upper-case letters, digits, `-`, `_`; compared case-insensitively by every backend), the
/// response base64 or `=`, nothing after it.
fn parse_auth(args: &[u8]) -> Option<Auth> {
    let mut parts = words(args);
    let mechanism = parts.next()?;
    let initial = parts.next();
    if parts.next().is_some()
        || mechanism.len() > MAX_MECHANISM
        || !mechanism
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return None;
    }
    if let Some(initial) = initial
        && !crate::sasl::is_initial_response(initial)
    {
        return None;
    }
    Some(Auth {
        mechanism: mechanism.to_vec(),
        initial_response: initial.map(<[u8]>::to_vec),
    })
}

/// Longest accepted chunk-size: 18 digits always fits a u64, and no real chunk comes near it.
const MAX_CHUNK_SIZE_DIGITS: usize = 18;

fn parse_bdat(args: &[u8]) -> Option<Bdat> {
    let mut parts = words(args);
    let size = parts.next()?;
    // Digits only, no sign, no padding zeros (RFC 3030 §2 `chunk-size = 1*DIGIT`; a leading
    // zero is the one form two parsers could read differently as octal or as padding), and a
    // bound: the size mailfront streams must be the size the backend reads.
    if size.is_empty()
        || size.len() > MAX_CHUNK_SIZE_DIGITS
        || !size.iter().all(u8::is_ascii_digit)
        || (size.len() > 1 && size.first() == Some(&b'0'))
    {
        return None;
    }
    let size = std::str::from_utf8(size).ok()?.parse::<u64>().ok()?;
    let last = match parts.next() {
        None => false,
        Some(word) if word.eq_ignore_ascii_case(b"LAST") => true,
        Some(_) => return None,
    };
    if parts.next().is_some() {
        return None;
    }
    Some(Bdat { size, last })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verbs_are_case_insensitive() {
        assert_eq!(Command::parse(b"ehlo x"), Command::Ehlo(b"x".to_vec()));
        assert_eq!(Command::parse(b"QuIt"), Command::Quit);
        assert_eq!(Command::parse(b"sTaRtTlS"), Command::StartTls);
        assert_eq!(Command::parse(b"data"), Command::Data);
    }

    #[test]
    fn ehlo_keeps_its_argument_verbatim_and_trimmed() {
        assert_eq!(
            Command::parse(b"EHLO  client.example.org  "),
            Command::Ehlo(b"client.example.org".to_vec())
        );
        assert_eq!(Command::parse(b"HELO"), Command::Helo(Vec::new()));
    }

    #[test]
    fn mail_from_exposes_path_and_parameters() {
        let Command::Mail(mail) =
            Command::parse(b"MAIL FROM:<a@b.example> SIZE=1234 BODY=8BITMIME SMTPUTF8")
        else {
            panic!("not MAIL");
        };
        assert_eq!(mail.reverse_path, b"a@b.example");
        assert_eq!(mail.size, Some(1234));
        assert_eq!(mail.body, Some(Body::EightBitMime));
        assert!(mail.smtputf8);
        assert!(!mail.requiretls);
        assert_eq!(mail.parameters.len(), 3);
    }

    #[test]
    fn mail_from_detects_requiretls_in_any_case() {
        let Command::Mail(mail) = Command::parse(b"mail from:<a@b> requiretls") else {
            panic!("not MAIL");
        };
        assert!(mail.requiretls);
    }

    #[test]
    fn requiretls_is_detected_even_where_the_path_parse_would_hide_it() {
        // A quoted local part containing "> REQUIRETLS": a lenient backend tokenizer might
        // split here, so mailfront treats the word as present.
        let Command::Mail(mail) = Command::parse(b"MAIL FROM:<\"x> REQUIRETLS \"@b>") else {
            panic!("not MAIL");
        };
        assert!(mail.requiretls);
    }

    #[test]
    fn mail_from_accepts_the_null_path_and_a_space_after_the_colon() {
        let Command::Mail(mail) = Command::parse(b"MAIL FROM: <> BODY=BINARYMIME") else {
            panic!("not MAIL");
        };
        assert_eq!(mail.reverse_path, b"");
        assert_eq!(mail.body, Some(Body::BinaryMime));
    }

    #[test]
    fn mail_without_from_is_invalid_and_never_forwarded() {
        assert_eq!(
            Command::parse(b"MAIL TO:<a@b>"),
            Command::Invalid {
                verb: Verb::Mail,
                error: SyntaxError::Mail
            }
        );
        assert_eq!(
            Command::parse(b"MAIL FROM:<unclosed"),
            Command::Invalid {
                verb: Verb::Mail,
                error: SyntaxError::Mail
            }
        );
    }

    #[test]
    fn rcpt_exposes_the_forward_path() {
        let Command::Rcpt(rcpt) = Command::parse(b"RCPT TO:<bob@example.com> NOTIFY=NEVER") else {
            panic!("not RCPT");
        };
        assert_eq!(rcpt.forward_path.as_deref(), Some(&b"bob@example.com"[..]));
        assert_eq!(rcpt.parameters.len(), 1);
        // Without a path it could not be written anew: refused, never forwarded.
        for line in [
            &b"RCPT garbage"[..],
            b"RCPT TO:<a b@c>",
            b"RCPT TO:<a@b> =x",
            b"RCPT",
        ] {
            assert_eq!(
                Command::parse(line),
                Command::Invalid {
                    verb: Verb::Rcpt,
                    error: SyntaxError::Rcpt
                }
            );
        }
    }

    #[test]
    fn a_path_must_be_one_token_outside_its_quotes() {
        assert!(matches!(
            Command::parse(b"MAIL FROM:<\"a b>\"@c> SIZE=1"),
            Command::Mail(m) if m.reverse_path == b"\"a b>\"@c" && m.size == Some(1)
        ));
        for line in [
            &b"MAIL FROM:<a b@c>"[..],
            b"MAIL FROM:<a\tb@c>",
            b"MAIL FROM:<a<b@c>",
            b"MAIL FROM:<\"open@c>",
            b"MAIL FROM:<a@c> SIZE\x01=1",
            b"MAIL FROM:<a@c> -X=1",
        ] {
            assert!(
                matches!(
                    Command::parse(line),
                    Command::Invalid {
                        error: SyntaxError::Mail,
                        ..
                    }
                ),
                "{}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[test]
    fn auth_must_be_a_sasl_name_and_base64() {
        for line in [
            &b"AUTH"[..],
            b"AUTH PLAIN QQ== more",
            b"AUTH PLAIN QQ=Q",
            b"AUTH PL/AIN",
            b"AUTH ABCDEFGHIJKLMNOPQRSTU",
        ] {
            assert_eq!(
                Command::parse(line),
                Command::Invalid {
                    verb: Verb::Auth,
                    error: SyntaxError::Auth
                },
                "{}",
                String::from_utf8_lossy(line)
            );
        }
        assert!(matches!(
            Command::parse(b"AUTH x-oauth_2 ="),
            Command::Auth(_)
        ));
    }

    #[test]
    fn bdat_parses_size_and_last() {
        assert_eq!(
            Command::parse(b"BDAT 5"),
            Command::Bdat(Bdat {
                size: 5,
                last: false
            })
        );
        assert_eq!(
            Command::parse(b"bdat 0 last"),
            Command::Bdat(Bdat {
                size: 0,
                last: true
            })
        );
    }

    #[test]
    fn bdat_with_bad_size_or_extra_words_is_invalid() {
        for line in [
            &b"BDAT"[..],
            b"BDAT x",
            b"BDAT -1",
            b"BDAT 5 FIRST",
            b"BDAT 5 LAST x",
            b"BDAT 1234567890123456789",
            b"BDAT 007",
            b"BDAT 00 LAST",
            b"BDAT +5",
        ] {
            assert_eq!(
                Command::parse(line),
                Command::Invalid {
                    verb: Verb::Bdat,
                    error: SyntaxError::Bdat
                },
                "{}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[test]
    fn auth_keeps_mechanism_and_initial_response() {
        assert_eq!(
            Command::parse(b"AUTH PLAIN AGFsaWNlAHNlY3JldA=="),
            Command::Auth(Auth {
                mechanism: b"PLAIN".to_vec(),
                initial_response: Some(b"AGFsaWNlAHNlY3JldA==".to_vec())
            })
        );
        assert_eq!(
            Command::parse(b"auth login"),
            Command::Auth(Auth {
                mechanism: b"login".to_vec(),
                initial_response: None
            })
        );
    }

    #[test]
    fn starttls_with_parameters_is_invalid() {
        assert_eq!(
            Command::parse(b"STARTTLS foo"),
            Command::Invalid {
                verb: Verb::StartTls,
                error: SyntaxError::StartTls
            }
        );
    }

    #[test]
    fn xclient_is_recognised_even_after_leading_space_or_with_tab_separator() {
        assert_eq!(Command::parse(b"XCLIENT LOGIN=victim"), Command::Xclient);
        assert_eq!(Command::parse(b"  xclient\tADDR=1.2.3.4"), Command::Xclient);
        assert_eq!(Command::parse(b"XFORWARD NAME=x"), Command::Xforward);
    }

    #[test]
    fn nul_inside_a_command_line_is_invalid_and_keeps_its_verb() {
        assert_eq!(
            Command::parse(b"XCLIENT\0ADDR=1.2.3.4"),
            Command::Invalid {
                verb: Verb::Unknown,
                error: SyntaxError::Nul
            }
        );
        assert_eq!(Command::parse(b"AUTH PLAIN a\0b").verb(), Verb::Auth);
        assert_eq!(SyntaxError::Nul.reply(), local_reply::NUL_IN_COMMAND);
    }

    #[test]
    fn bare_cr_inside_a_command_line_is_invalid_whatever_the_verb() {
        assert_eq!(
            Command::parse(b"NOOP\rRCPT TO:<x@y>"),
            Command::Invalid {
                verb: Verb::Noop,
                error: SyntaxError::BareCr
            }
        );
        assert_eq!(
            Command::parse(b"AUTH PLAIN abc\r").verb(),
            Verb::Auth,
            "the verb survives so the TLS gate still applies first"
        );
    }

    #[test]
    fn unknown_and_informational_verbs_are_classified() {
        assert_eq!(Command::parse(b"TURN"), Command::Unknown);
        assert_eq!(Command::parse(b""), Command::Unknown);
        assert_eq!(Command::parse(b"HELP me"), Command::Help);
        assert_eq!(Command::parse(b"VRFY bob"), Command::Vrfy);
        assert_eq!(Command::parse(b"EXPN list"), Command::Expn);
        assert_eq!(Command::parse(b"NOOP anything"), Command::Noop);
        assert_eq!(Command::parse(b"RSET"), Command::Rset);
    }

    #[test]
    fn sasl_cancel_is_a_single_star() {
        assert_eq!(SaslResponse::parse(b"*"), SaslResponse::Cancel);
        // Base64 text, never a command, whatever the letters spell.
        assert_eq!(SaslResponse::parse(b"QUIT"), SaslResponse::Data);
        assert_eq!(SaslResponse::parse(b""), SaslResponse::Data);
        // Anything a tokenizer could split is not base64.
        for bad in [&b"* "[..], b"QU IT", b"XCLIENT LOGIN=x", b"QQ=\x85"] {
            assert_eq!(
                SaslResponse::parse(bad),
                SaslResponse::Invalid(SyntaxError::Sasl)
            );
        }
    }

    #[test]
    fn pipeline_group_ends_follow_rfc_2920() {
        for verb in [Verb::Mail, Verb::Rcpt, Verb::Rset, Verb::Bdat] {
            assert!(!verb.ends_pipeline_group());
        }
        for verb in [
            Verb::Ehlo,
            Verb::Data,
            Verb::Noop,
            Verb::Quit,
            Verb::Auth,
            Verb::StartTls,
            Verb::Vrfy,
            Verb::Unknown,
        ] {
            assert!(verb.ends_pipeline_group());
        }
    }
}
