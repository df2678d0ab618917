//! What mailfront says to a backend on its own behalf, as pure functions over lines: whether a
//! greeting arrived, and the STARTTLS/STLS/STARTTLS exchange of `backend_tls: {mode: starttls}`.
//! The pool feeds complete lines in and acts on the [`Step`] it gets back.

use crate::config::Protocol;

/// Longest line read from a backend before a session is handed over (a greeting or a reply in
/// the STARTTLS exchange): an IMAP greeting with a long CAPABILITY list is about 1 KiB, and an
/// EHLO reply line is at most 512 octets (RFC 5321 §4.5.3.1.5).
pub const MAX_LINE: usize = 8 * 1024;

/// The tag of mailfront's own IMAP STARTTLS command.
const IMAP_TAG: &str = "M1";

/// The first complete line in `buf` (LF included), if one arrived.
pub fn first_line(buf: &[u8]) -> Option<&[u8]> {
    let end = buf.iter().position(|&b| b == b'\n')?;
    buf.get(..=end)
}

fn starts_with_ignore_case(line: &[u8], prefix: &[u8]) -> bool {
    line.get(..prefix.len())
        .is_some_and(|head| head.eq_ignore_ascii_case(prefix))
}

/// An SMTP reply line's code and whether it is the last line (`250 x`, not `250-x`; RFC 5321
/// §4.2.1).
fn smtp_line(line: &[u8]) -> Option<(u16, bool)> {
    let code = line.get(..3)?;
    if !code.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let code = std::str::from_utf8(code).ok()?.parse().ok()?;
    let last = !matches!(line.get(3), Some(b'-'));
    Some((code, last))
}

/// Whether the backend's first line is a service greeting: any complete line counts for the
/// session path, where the driver passes a refusal on to the client as before; this tells an
/// active check whether the server said yes.
pub fn greeting_is_positive(protocol: Protocol, line: &[u8]) -> bool {
    match protocol {
        Protocol::Smtp => smtp_line(line).is_some_and(|(code, _)| code == 220),
        Protocol::Imap => starts_with_ignore_case(line, b"* OK"),
        Protocol::Pop3 => starts_with_ignore_case(line, b"+OK"),
    }
}

/// What to do after a line of the STARTTLS exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Read another line.
    Read,
    /// Write these bytes, then read.
    Send(Vec<u8>),
    /// The backend agreed: run the TLS handshake now (nothing may be buffered).
    Handshake,
    /// The backend refused or broke the protocol.
    Fail(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Greeting,
    /// SMTP only: the EHLO reply.
    Ehlo,
    Starttls,
    Done,
}

/// The exchange that upgrades a backend connection before anything of the client's is sent:
/// SMTP greeting, `EHLO`, `STARTTLS` (RFC 3207 §4); IMAP greeting, `STARTTLS` (RFC 9051
/// §6.2.1); POP3 greeting, `STLS` (RFC 2595 §4).
#[derive(Debug)]
pub struct Starttls {
    protocol: Protocol,
    ehlo: Vec<u8>,
    state: State,
    greeting: Vec<u8>,
}

impl Starttls {
    /// `hostname` is mailfront's own, for the SMTP EHLO.
    pub fn new(protocol: Protocol, hostname: &str) -> Starttls {
        Starttls {
            protocol,
            ehlo: format!("EHLO {hostname}\r\n").into_bytes(),
            state: State::Greeting,
            greeting: Vec::new(),
        }
    }

    /// Feeds one complete line from the backend.
    pub fn line(&mut self, line: &[u8]) -> Step {
        let step = match (self.protocol, self.state) {
            (_, State::Done) => Step::Fail("backend spoke after agreeing to STARTTLS".into()),
            (Protocol::Smtp, State::Greeting) => {
                self.greeting.extend_from_slice(line);
                match smtp_line(line) {
                    Some((220, false)) => Step::Read,
                    Some((220, true)) => {
                        self.state = State::Ehlo;
                        Step::Send(self.ehlo.clone())
                    }
                    _ => Step::Fail(refusal("greeting", line)),
                }
            }
            (Protocol::Smtp, State::Ehlo) => match smtp_line(line) {
                Some((250, false)) => Step::Read,
                Some((250, true)) => {
                    self.state = State::Starttls;
                    Step::Send(b"STARTTLS\r\n".to_vec())
                }
                _ => Step::Fail(refusal("EHLO", line)),
            },
            (Protocol::Smtp, State::Starttls) => match smtp_line(line) {
                Some((220, true)) => Step::Handshake,
                Some((220, false)) => Step::Read,
                _ => Step::Fail(refusal("STARTTLS", line)),
            },
            (Protocol::Imap, State::Greeting) if greeting_is_positive(Protocol::Imap, line) => {
                self.state = State::Starttls;
                Step::Send(format!("{IMAP_TAG} STARTTLS\r\n").into_bytes())
            }
            (Protocol::Imap, State::Starttls) if line.starts_with(b"* ") => Step::Read,
            (Protocol::Imap, State::Starttls)
                if starts_with_ignore_case(line, format!("{IMAP_TAG} OK").as_bytes()) =>
            {
                Step::Handshake
            }
            (Protocol::Pop3, State::Greeting) if greeting_is_positive(Protocol::Pop3, line) => {
                self.greeting.extend_from_slice(line);
                self.state = State::Starttls;
                Step::Send(b"STLS\r\n".to_vec())
            }
            (Protocol::Pop3, State::Starttls) if greeting_is_positive(Protocol::Pop3, line) => {
                Step::Handshake
            }
            (_, state) => Step::Fail(refusal(
                if state == State::Greeting {
                    "greeting"
                } else {
                    "STARTTLS"
                },
                line,
            )),
        };
        if step == Step::Handshake {
            self.state = State::Done;
        }
        step
    }

    /// The greeting the session's driver reads once TLS is up, as if the backend had just sent
    /// it: SMTP and POP3 get the backend's own (an SMTP server starts afresh after STARTTLS,
    /// and a POP3 APOP timestamp stays valid); IMAP gets a plain `* OK` without the cleartext
    /// capability list, which RFC 9051 §6.2.1 says to discard, so the driver asks again.
    pub fn replay_greeting(&self) -> Vec<u8> {
        match self.protocol {
            Protocol::Imap => b"* OK backend ready over TLS\r\n".to_vec(),
            Protocol::Smtp | Protocol::Pop3 => self.greeting.clone(),
        }
    }
}

/// A refusal for the log: the step and the backend's line, printable and short.
fn refusal(step: &str, line: &[u8]) -> String {
    let text: String = String::from_utf8_lossy(line)
        .chars()
        .filter(|c| !c.is_control())
        .take(120)
        .collect();
    format!("{step} refused: {text:?}")
}

/// Sent to end an active check politely, so the backend does not log an aborted session.
pub fn goodbye(protocol: Protocol) -> &'static [u8] {
    match protocol {
        Protocol::Smtp | Protocol::Pop3 => b"QUIT\r\n",
        Protocol::Imap => b"M0 LOGOUT\r\n",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(protocol: Protocol, lines: &[&str]) -> Vec<Step> {
        let mut m = Starttls::new(protocol, "mx.example.test");
        lines.iter().map(|l| m.line(l.as_bytes())).collect()
    }

    #[test]
    fn smtp_greets_ehlos_and_starts_tls() {
        let steps = run(
            Protocol::Smtp,
            &[
                "220-mail.internal ESMTP\r\n",
                "220 ready\r\n",
                "250-mail.internal\r\n",
                "250 STARTTLS\r\n",
                "220 2.0.0 go ahead\r\n",
            ],
        );
        assert_eq!(
            steps,
            [
                Step::Read,
                Step::Send(b"EHLO mx.example.test\r\n".to_vec()),
                Step::Read,
                Step::Send(b"STARTTLS\r\n".to_vec()),
                Step::Handshake
            ]
        );
        let mut m = Starttls::new(Protocol::Smtp, "mx");
        m.line(b"220 a\r\n");
        assert_eq!(m.replay_greeting(), b"220 a\r\n");
    }

    #[test]
    fn refusals_at_every_step_fail() {
        assert!(matches!(
            run(Protocol::Smtp, &["554 no\r\n"])[0],
            Step::Fail(_)
        ));
        assert!(matches!(
            run(
                Protocol::Smtp,
                &["220 a\r\n", "250 a\r\n", "454 TLS not available\r\n"]
            )[2],
            Step::Fail(_)
        ));
        assert!(matches!(
            run(Protocol::Imap, &["* BYE\r\n"])[0],
            Step::Fail(_)
        ));
        assert!(matches!(
            run(Protocol::Imap, &["* OK\r\n", "M1 BAD no\r\n"])[1],
            Step::Fail(_)
        ));
        assert!(matches!(
            run(Protocol::Pop3, &["+OK\r\n", "-ERR no\r\n"])[1],
            Step::Fail(_)
        ));
        assert!(matches!(
            run(Protocol::Pop3, &["+OK\r\n", "+OK\r\n", "+OK\r\n"])[2],
            Step::Fail(_)
        ));
    }

    #[test]
    fn imap_and_pop3_upgrade_and_replay_a_greeting() {
        assert_eq!(
            run(
                Protocol::Imap,
                &[
                    "* OK [CAPABILITY IMAP4rev1 STARTTLS] hi\r\n",
                    "* OK x\r\n",
                    "m1 ok go\r\n"
                ]
            ),
            [
                Step::Send(b"M1 STARTTLS\r\n".to_vec()),
                Step::Read,
                Step::Handshake
            ]
        );
        let mut m = Starttls::new(Protocol::Imap, "mx");
        m.line(b"* OK [CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED] hi\r\n");
        assert!(!m.replay_greeting().windows(10).any(|w| w == b"CAPABILITY"));
        let mut m = Starttls::new(Protocol::Pop3, "mx");
        assert_eq!(m.line(b"+OK <1.2@x>\r\n"), Step::Send(b"STLS\r\n".to_vec()));
        assert_eq!(m.line(b"+OK begin\r\n"), Step::Handshake);
        assert_eq!(m.replay_greeting(), b"+OK <1.2@x>\r\n");
    }

    #[test]
    fn greetings_are_judged_per_protocol() {
        assert!(greeting_is_positive(Protocol::Smtp, b"220 x\r\n"));
        assert!(greeting_is_positive(Protocol::Smtp, b"220-x\r\n"));
        assert!(!greeting_is_positive(Protocol::Smtp, b"421 busy\r\n"));
        assert!(greeting_is_positive(Protocol::Imap, b"* ok x\r\n"));
        assert!(!greeting_is_positive(Protocol::Imap, b"* BYE\r\n"));
        assert!(greeting_is_positive(Protocol::Pop3, b"+OK\r\n"));
        assert!(!greeting_is_positive(Protocol::Pop3, b"-ERR\r\n"));
        assert_eq!(first_line(b"a\r\nb"), Some(&b"a\r\n"[..]));
        assert_eq!(first_line(b"a"), None);
    }
}
