//! Canonical re-encoding of SMTP commands: the only bytes of a client command that ever reach
//! the backend are the ones written here, from the parsed command.
//!
//! Why: a gate is only as good as the agreement between how mailfront frames a line and how the
//! backend does. Postfix reads a command line only up to `line_length_limit` (2048 octets),
//! executes that prefix and skips the rest, so a client line padded past 2048 octets meant one
//! thing to mailfront and another to Postfix (`BDAT` + 2040 spaces + `300 LAST`: mailfront
//! streamed 300 octets of chunk, Postfix refused the size-less BDAT and ran the 300 octets as
//! commands nobody judged). Forwarding the client's bytes can never be made safe against every
//! backend's tokenizer; writing the command anew can:
//! - the verb in its canonical spelling, one SP between words, the parameters exactly as parsed,
//!   CRLF — so every backend splits the line where mailfront did;
//! - never longer than a limit every backend reads whole: RFC 5321 §4.5.3.1.4's 512 octets,
//!   plus, for MAIL and RCPT, what the extensions that add parameters allow (below), and never
//!   more than Postfix's 2048 ([`BACKEND_LINE_CEILING`]);
//! - an AUTH whose initial response would take the line past 512 octets is sent without it, and
//!   the response follows the backend's empty `334` challenge (RFC 4954 §4: "the client MUST NOT
//!   use the initial-response parameter" then); SASL lines may be 12288 octets (RFC 4954 §4).
//!
//! A command that cannot be written within its limit is answered `500 5.5.2` and never
//! forwarded. XCLIENT, XFORWARD and STARTTLS never get here: the gate answers them.

use crate::smtp::bdat::bdat_command;
use crate::smtp::command::{Command, SyntaxError, Verb, words};

/// Longest command line in general, CRLF included (RFC 5321 §4.5.3.1.4).
pub const COMMAND_LINE_LIMIT: usize = 512;

/// Longest `MAIL FROM` line: 512 plus the increments the parameter-adding extensions declare:
/// SIZE 26 (RFC 1870 §4), RET/ENVID 100 (RFC 3461 §4), AUTH= 500 (RFC 4954 §5), BODY 16
/// (RFC 6152 §2), SMTPUTF8 10 (RFC 6531 §3.4), REQUIRETLS 11 (RFC 8689 §4), MT-PRIORITY 16
/// (RFC 6710 §3): 1191, rounded up. Far below [`BACKEND_LINE_CEILING`].
pub const MAIL_LINE_LIMIT: usize = 1280;

/// Longest `RCPT TO` line: 512 plus 500 for NOTIFY/ORCPT (RFC 3461 §4), rounded up.
pub const RCPT_LINE_LIMIT: usize = 1024;

/// Longest SASL line sent after a `334`, CRLF included (RFC 4954 §4: 12288 octets; Postfix's
/// `smtpd_sasl_response_limit` default is the same).
pub const SASL_LINE_LIMIT: usize = 12288;

/// Postfix's `line_length_limit` default: no command line mailfront writes comes near it, so
/// Postfix always reads each one whole and can never execute a prefix.
pub const BACKEND_LINE_CEILING: usize = 2048;

const _: () = assert!(MAIL_LINE_LIMIT < BACKEND_LINE_CEILING);
const _: () = assert!(RCPT_LINE_LIMIT < BACKEND_LINE_CEILING);
const _: () = assert!(COMMAND_LINE_LIMIT < BACKEND_LINE_CEILING);

/// What the driver sends for one command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Encoded {
    /// One command line, CRLF included.
    Line(Vec<u8>),
    /// An AUTH whose initial response does not fit a command line: `command` (AUTH and the
    /// mechanism) first; on the backend's `334` (the empty challenge, RFC 4954 §4) `response`
    /// is sent in its place and the `334` is never shown to the client, which already sent its
    /// response. Any other reply is the answer to the client's AUTH.
    AuthSplit { command: Vec<u8>, response: Vec<u8> },
}

/// Why a command cannot be forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Unencodable {
    /// Its canonical form is longer than every backend is sure to read whole.
    #[error("command longer than {limit} octets once re-encoded")]
    TooLong { limit: usize },
    /// Not a command this module writes (an invalid line, XCLIENT, STARTTLS): the gate answers
    /// those before anything is forwarded.
    #[error("command has no canonical form: {0}")]
    Syntax(SyntaxError),
}

/// Writes `command`, parsed from the line `text` (without its terminator), in canonical form.
pub fn encode(command: &Command, text: &[u8]) -> Result<Encoded, Unencodable> {
    match command {
        Command::Mail(mail) => {
            let mut out = b"MAIL FROM:<".to_vec();
            out.extend_from_slice(&mail.reverse_path);
            out.push(b'>');
            push_parameters(&mut out, &mail.parameters);
            finish(out, MAIL_LINE_LIMIT)
        }
        Command::Rcpt(rcpt) => {
            let Some(path) = &rcpt.forward_path else {
                return Err(Unencodable::Syntax(SyntaxError::Rcpt));
            };
            let mut out = b"RCPT TO:<".to_vec();
            out.extend_from_slice(path);
            out.push(b'>');
            push_parameters(&mut out, &rcpt.parameters);
            finish(out, RCPT_LINE_LIMIT)
        }
        // At most 18 digits (the parser's bound): always far below any limit.
        Command::Bdat(bdat) => Ok(Encoded::Line(bdat_command(bdat.size, bdat.last))),
        Command::Auth(auth) => {
            let mut out = b"AUTH ".to_vec();
            out.extend(auth.mechanism.iter().map(u8::to_ascii_uppercase));
            let Some(initial) = &auth.initial_response else {
                return finish(out, COMMAND_LINE_LIMIT);
            };
            if out.len() + 1 + initial.len() + 2 <= COMMAND_LINE_LIMIT {
                out.push(b' ');
                out.extend_from_slice(initial);
                return finish(out, COMMAND_LINE_LIMIT);
            }
            let command = finish_line(out, COMMAND_LINE_LIMIT)?;
            let response = finish_line(initial.clone(), SASL_LINE_LIMIT)?;
            Ok(Encoded::AuthSplit { command, response })
        }
        Command::Invalid { error, .. } => Err(Unencodable::Syntax(*error)),
        Command::StartTls | Command::Xclient | Command::Xforward => {
            Err(Unencodable::Syntax(SyntaxError::NotForwarded))
        }
        Command::Ehlo(_)
        | Command::Helo(_)
        | Command::Data
        | Command::Rset
        | Command::Noop
        | Command::Quit
        | Command::Help
        | Command::Vrfy
        | Command::Expn
        | Command::Unknown => {
            // The verb and its words as the parser split them: the canonical spelling of a
            // known verb, an unknown one as written (the backend answers it).
            let mut tokens = words(text);
            let written = tokens.next().unwrap_or_default();
            let mut out = match canonical_verb(command.verb()) {
                Some(verb) => verb.to_vec(),
                None => written.to_vec(),
            };
            for word in tokens {
                out.push(b' ');
                out.extend_from_slice(word);
            }
            finish(out, COMMAND_LINE_LIMIT)
        }
    }
}

/// The spelling mailfront writes for a verb it knows.
fn canonical_verb(verb: Verb) -> Option<&'static [u8]> {
    Some(match verb {
        Verb::Ehlo => b"EHLO",
        Verb::Helo => b"HELO",
        Verb::Mail => b"MAIL",
        Verb::Rcpt => b"RCPT",
        Verb::Data => b"DATA",
        Verb::Bdat => b"BDAT",
        Verb::Rset => b"RSET",
        Verb::Noop => b"NOOP",
        Verb::Quit => b"QUIT",
        Verb::StartTls => b"STARTTLS",
        Verb::Auth => b"AUTH",
        Verb::Xclient => b"XCLIENT",
        Verb::Xforward => b"XFORWARD",
        Verb::Help => b"HELP",
        Verb::Vrfy => b"VRFY",
        Verb::Expn => b"EXPN",
        Verb::Unknown => return None,
    })
}

fn push_parameters(out: &mut Vec<u8>, parameters: &[crate::smtp::command::Parameter]) {
    for parameter in parameters {
        out.push(b' ');
        out.extend_from_slice(&parameter.keyword);
        if let Some(value) = &parameter.value {
            out.push(b'=');
            out.extend_from_slice(value);
        }
    }
}

fn finish(line: Vec<u8>, limit: usize) -> Result<Encoded, Unencodable> {
    finish_line(line, limit).map(Encoded::Line)
}

/// Adds the CRLF and checks the whole line against `limit`.
fn finish_line(mut line: Vec<u8>, limit: usize) -> Result<Vec<u8>, Unencodable> {
    if line.len() + 2 > limit {
        return Err(Unencodable::TooLong { limit });
    }
    line.extend_from_slice(b"\r\n");
    Ok(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(line: &str) -> Result<Encoded, Unencodable> {
        encode(&Command::parse(line.as_bytes()), line.as_bytes())
    }

    fn enc_line(line: &str) -> String {
        match enc(line) {
            Ok(Encoded::Line(bytes)) => String::from_utf8(bytes).unwrap(),
            other => panic!("{line:?}: {other:?}"),
        }
    }

    #[test]
    fn commands_are_rewritten_with_single_spaces_and_canonical_verbs() {
        assert_eq!(
            enc_line("ehlo   client.example "),
            "EHLO client.example\r\n"
        );
        assert_eq!(enc_line("\tHELO\tx"), "HELO x\r\n");
        assert_eq!(
            enc_line("mail from:<a@b.example>  SIZE=10\tBODY=8BITMIME"),
            "MAIL FROM:<a@b.example> SIZE=10 BODY=8BITMIME\r\n"
        );
        assert_eq!(enc_line("MAIL FROM: a@b"), "MAIL FROM:<a@b>\r\n");
        assert_eq!(enc_line("MAIL FROM:<>"), "MAIL FROM:<>\r\n");
        assert_eq!(
            enc_line("rcpt to:<c@d>   NOTIFY=NEVER"),
            "RCPT TO:<c@d> NOTIFY=NEVER\r\n"
        );
        assert_eq!(enc_line("RCPT TO:<\"a b\"@d>"), "RCPT TO:<\"a b\"@d>\r\n");
        assert_eq!(enc_line("data"), "DATA\r\n");
        assert_eq!(enc_line("rset"), "RSET\r\n");
        assert_eq!(enc_line("noop   some   words"), "NOOP some words\r\n");
        assert_eq!(enc_line("vrfy  postmaster"), "VRFY postmaster\r\n");
        assert_eq!(enc_line("xyzzy  a\tb"), "xyzzy a b\r\n");
        assert_eq!(enc_line("bdat 100  last"), "BDAT 100 LAST\r\n");
        assert_eq!(enc_line("BDAT 7"), "BDAT 7\r\n");
        assert_eq!(enc_line("auth plain AGEAYg=="), "AUTH PLAIN AGEAYg==\r\n");
        assert_eq!(enc_line("AUTH login"), "AUTH LOGIN\r\n");
        assert_eq!(enc_line("AUTH PLAIN ="), "AUTH PLAIN =\r\n");
    }

    #[test]
    fn padding_can_never_move_a_word_past_the_backend_cut() {
        // The smuggling shape: words far apart become one line of a few octets.
        let padded = format!("BDAT{}300 LAST", " ".repeat(2040));
        assert_eq!(enc_line(&padded), "BDAT 300 LAST\r\n");
        let padded = format!("MAIL FROM:<a@b>{}SIZE=1", " ".repeat(3000));
        assert_eq!(enc_line(&padded), "MAIL FROM:<a@b> SIZE=1\r\n");
    }

    #[test]
    fn every_command_has_its_limit() {
        let at = |prefix: &str, total: usize| {
            format!("{prefix}{}", "a".repeat(total - prefix.len() - 2))
        };
        assert!(matches!(enc(&at("NOOP ", 512)), Ok(Encoded::Line(l)) if l.len() == 512));
        assert_eq!(
            enc(&at("NOOP ", 513)),
            Err(Unencodable::TooLong { limit: 512 })
        );
        assert!(matches!(enc(&at("EHLO ", 512)), Ok(Encoded::Line(l)) if l.len() == 512));
        assert_eq!(
            enc(&at("EHLO ", 513)),
            Err(Unencodable::TooLong { limit: 512 })
        );
        let mail = |n: usize| format!("MAIL FROM:<a@b> ENVID={}", "x".repeat(n));
        let mail_len = |n: usize| mail(n).len() + 2;
        let fits = 1280 - mail_len(0);
        assert!(matches!(enc(&mail(fits)), Ok(Encoded::Line(l)) if l.len() == 1280));
        assert_eq!(
            enc(&mail(fits + 1)),
            Err(Unencodable::TooLong { limit: 1280 })
        );
        let rcpt = |n: usize| format!("RCPT TO:<a@b> ORCPT=rfc822;{}", "x".repeat(n));
        let fits = 1024 - (rcpt(0).len() + 2);
        assert!(matches!(enc(&rcpt(fits)), Ok(Encoded::Line(l)) if l.len() == 1024));
        assert_eq!(
            enc(&rcpt(fits + 1)),
            Err(Unencodable::TooLong { limit: 1024 })
        );
        // Whatever passes, passes under Postfix's cut.
        for line in ["NOOP", "MAIL FROM:<a@b>", "RCPT TO:<a@b>"] {
            if let Ok(Encoded::Line(l)) = enc(line) {
                assert!(l.len() < BACKEND_LINE_CEILING);
            }
        }
    }

    #[test]
    fn a_long_initial_response_follows_an_empty_challenge() {
        let token = "QUJD".repeat(1000);
        let line = format!("AUTH xoauth2 {token}");
        assert_eq!(
            enc(&line),
            Ok(Encoded::AuthSplit {
                command: b"AUTH XOAUTH2\r\n".to_vec(),
                response: format!("{token}\r\n").into_bytes(),
            })
        );
        // Just fits the command line: sent whole. (Whole base64 quanta, so the mechanism's
        // length sets the line's.)
        let ir = "A".repeat(512 - "AUTH CRAM-MD5 ".len() - 2);
        assert!(
            matches!(enc(&format!("AUTH CRAM-MD5 {ir}")), Ok(Encoded::Line(l)) if l.len() == 512)
        );
        assert!(matches!(
            enc(&format!("AUTH X-TOKEN-1 {ir}")),
            Ok(Encoded::AuthSplit { .. })
        ));
        // Past what a SASL line may be.
        let ir = "A".repeat(SASL_LINE_LIMIT);
        assert_eq!(
            enc(&format!("AUTH PLAIN {ir}")),
            Err(Unencodable::TooLong {
                limit: SASL_LINE_LIMIT
            })
        );
    }

    #[test]
    fn lines_the_gate_answers_have_no_canonical_form() {
        for line in [
            "XCLIENT LOGIN=x",
            "XFORWARD ADDR=1.2.3.4",
            "STARTTLS",
            "MAIL TO:<x>",
            "BDAT x",
            "bdat 0100 last",
            "RCPT TO:<a b@c>",
            "RCPT",
            "AUTH PLAIN QQ== extra",
            "AUTH PL@IN",
        ] {
            assert!(matches!(enc(line), Err(Unencodable::Syntax(_))), "{line}");
        }
    }
}
