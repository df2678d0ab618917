//! The cleartext dialogue of a `starttls` listener, answered by mailfront itself: before TLS no
//! backend is connected, so no client byte can reach one (RFC 8314 §4.1; the nginx mail proxy
//! works the same way). Pure: one command in, one action out.
//!
//! - EHLO gets mailfront's own list, `PIPELINING`, `ENHANCEDSTATUSCODES` and `STARTTLS` only:
//!   nothing the backend offers is shown before TLS, and after the handshake the client must ask
//!   again (RFC 3207 §4.2), when it gets the backend's list. HELO gets `250 <hostname>`.
//! - NOOP and RSET get `250 2.0.0`, QUIT `221 2.0.0`, STARTTLS `220 2.0.0` and the handshake.
//! - Everything the gate refuses keeps the gate's reply ([`policy::decide`]): AUTH gets the same
//!   `530 5.7.0` whatever the credential, every other command `530 5.7.0` too (with
//!   `require_tls_for_mail`, the default), a line with a bare CR, bare LF or NUL `500 5.5.2`.
//! - With `require_tls_for_mail: false`, MAIL is the one command that needs a backend
//!   ([`Action::Connect`]); RCPT and DATA before any MAIL get `503 5.5.1` here, and BDAT is
//!   refused by the gate (no backend has offered CHUNKING yet).

use crate::smtp::command::{Command, Verb};
use crate::smtp::local_reply;
use crate::smtp::policy::{self, ClientInput, GateState, Refusal, Verdict};

/// What the driver does with one command line while no backend is connected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Answer with these bytes, in order with the other replies.
    Reply(Vec<u8>),
    /// Answer with the refusal's reply (the driver logs and counts it by its reason).
    Refuse(Refusal),
    /// A refused BDAT: answer the refusal and drop the chunk's `octets`.
    DiscardChunk { octets: u64, refusal: Refusal },
    /// Answer `220 2.0.0`, drop whatever was pipelined after the command, and hand over.
    StartTls,
    /// Answer `221 2.0.0` and end the session.
    Quit,
    /// The command needs the backend: connect, replay the client's EHLO/HELO, then forward it.
    Connect,
}

/// The answer to `command` before TLS with no backend connected (`state.client_tls` false).
pub fn respond(state: &GateState, hostname: &str, command: &Command) -> Action {
    match policy::decide(state, ClientInput::Command(command)) {
        Verdict::Refuse(refusal) => Action::Refuse(refusal),
        Verdict::DiscardChunk { octets, refusal } => Action::DiscardChunk { octets, refusal },
        Verdict::StartTls => Action::StartTls,
        Verdict::Forward => match command {
            Command::Ehlo(_) => Action::Reply(local_reply::cleartext_ehlo(hostname)),
            Command::Helo(_) => Action::Reply(local_reply::helo_reply(hostname)),
            Command::Noop | Command::Rset => Action::Reply(local_reply::OK.to_vec()),
            Command::Quit => Action::Quit,
            Command::Mail(_) => Action::Connect,
            _ if matches!(command.verb(), Verb::Rcpt | Verb::Data) => {
                Action::Refuse(Refusal::NeedMail)
            }
            // The gate forwards nothing else before TLS; refuse rather than connect for it.
            _ => Action::Refuse(Refusal::MustStartTls),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TlsMode;
    use crate::smtp::command::SyntaxError;
    use crate::smtp::local_reply::*;
    use crate::smtp::receiver::{CommandReceiver, LineMode};

    const HOST: &str = "mx.example.test";

    fn strict() -> GateState {
        GateState::new(TlsMode::Starttls, true)
    }

    fn lax() -> GateState {
        GateState::new(TlsMode::Starttls, false)
    }

    /// A whole client input, framed and answered as the driver does while nothing is connected:
    /// the replies in order, and whether a backend connection was asked for.
    fn dialogue(state: GateState, input: &[u8], reads: usize) -> (Vec<u8>, Vec<Action>) {
        let mut rx = CommandReceiver::default();
        let mut out = Vec::new();
        let mut actions = Vec::new();
        for chunk in input.chunks(reads.max(1)) {
            let mut rest = chunk;
            while !rest.is_empty() {
                let (n, result) = rx.receive(rest, LineMode::Command);
                rest = &rest[n.max(1).min(rest.len())..];
                match result {
                    Ok(None) => {}
                    Ok(Some(line)) => {
                        let action = respond(&state, HOST, &Command::from_line(&line));
                        match &action {
                            Action::Reply(reply) => out.extend_from_slice(reply),
                            Action::Refuse(refusal) => out.extend_from_slice(refusal.reply()),
                            _ => {}
                        }
                        actions.push(action);
                    }
                    Err(e) => out.extend_from_slice(policy::too_long(&state, e).reply()),
                }
            }
        }
        (out, actions)
    }

    #[test]
    fn the_cleartext_dialogue_is_answered_locally() {
        let table: Vec<(&str, Action)> = vec![
            (
                "EHLO client.example.org",
                Action::Reply(
                    b"250-mx.example.test\r\n250-PIPELINING\r\n250-ENHANCEDSTATUSCODES\r\n\
                      250 STARTTLS\r\n"
                        .to_vec(),
                ),
            ),
            ("ehlo", Action::Reply(cleartext_ehlo(HOST))),
            (
                "HELO client",
                Action::Reply(b"250 mx.example.test\r\n".to_vec()),
            ),
            ("NOOP", Action::Reply(OK.to_vec())),
            ("NOOP anything", Action::Reply(OK.to_vec())),
            ("RSET", Action::Reply(OK.to_vec())),
            ("QUIT", Action::Quit),
            ("STARTTLS", Action::StartTls),
            (
                "STARTTLS x",
                Action::Refuse(Refusal::Syntax(SyntaxError::StartTls)),
            ),
            (
                "AUTH PLAIN AGFsaWNlAHNlY3JldA==",
                Action::Refuse(Refusal::CleartextAuth),
            ),
            ("AUTH LOGIN", Action::Refuse(Refusal::CleartextAuth)),
            ("MAIL FROM:<a@b>", Action::Refuse(Refusal::MustStartTls)),
            ("RCPT TO:<a@b>", Action::Refuse(Refusal::MustStartTls)),
            ("DATA", Action::Refuse(Refusal::MustStartTls)),
            ("VRFY bob", Action::Refuse(Refusal::MustStartTls)),
            ("HELP", Action::Refuse(Refusal::MustStartTls)),
            ("FOO bar", Action::Refuse(Refusal::MustStartTls)),
            ("", Action::Refuse(Refusal::MustStartTls)),
            (
                "XCLIENT LOGIN=x",
                Action::Refuse(Refusal::TrustedPeerCommand),
            ),
            (
                "BDAT 5 LAST",
                Action::DiscardChunk {
                    octets: 5,
                    refusal: Refusal::MustStartTls,
                },
            ),
        ];
        for (line, expected) in table {
            let command = Command::parse(line.as_bytes());
            assert_eq!(respond(&strict(), HOST, &command), expected, "{line:?}");
        }
    }

    #[test]
    fn without_require_tls_for_mail_only_mail_asks_for_the_backend() {
        let table: Vec<(&str, Action)> = vec![
            ("MAIL FROM:<a@b>", Action::Connect),
            (
                "MAIL FROM:<a@b> REQUIRETLS",
                Action::Refuse(Refusal::RequireTlsUnsupported),
            ),
            ("RCPT TO:<a@b>", Action::Refuse(Refusal::NeedMail)),
            ("DATA", Action::Refuse(Refusal::NeedMail)),
            (
                "BDAT 3",
                Action::DiscardChunk {
                    octets: 3,
                    refusal: Refusal::BdatNotSupported,
                },
            ),
            ("VRFY bob", Action::Refuse(Refusal::MustStartTls)),
            ("EHLO x", Action::Reply(cleartext_ehlo(HOST))),
            (
                "AUTH PLAIN AGFsaWNlAHNlY3JldA==",
                Action::Refuse(Refusal::CleartextAuth),
            ),
        ];
        for (line, expected) in table {
            let command = Command::parse(line.as_bytes());
            assert_eq!(respond(&lax(), HOST, &command), expected, "{line:?}");
        }
    }

    #[test]
    fn a_pipelined_cleartext_dialogue_gets_every_reply_in_order_however_it_is_read() {
        let mut input =
            b"EHLO a\r\nNOOP\r\nAUTH PLAIN AGFsaWNl\r\nNOOP\nRSET\r\nMAIL\0\r\n".to_vec();
        input.extend_from_slice(b"AUTH XOAUTH2 ");
        input.extend(std::iter::repeat_n(b'A', 13_000));
        input.extend_from_slice(b"\r\nHELP\r\nQUIT\r\n");
        let expected = [
            cleartext_ehlo(HOST),
            OK.to_vec(),
            MUST_STARTTLS.to_vec(),
            BARE_LF_IN_COMMAND.to_vec(),
            OK.to_vec(),
            MUST_STARTTLS.to_vec(),
            MUST_STARTTLS.to_vec(),
            MUST_STARTTLS.to_vec(),
        ]
        .concat();
        for reads in [1, 2, 3, 7, 64, 512, input.len()] {
            let (out, actions) = dialogue(strict(), &input, reads);
            assert_eq!(
                String::from_utf8_lossy(&out),
                String::from_utf8_lossy(&expected),
                "reads of {reads}"
            );
            assert_eq!(actions.last(), Some(&Action::Quit));
            assert!(!actions.contains(&Action::Connect));
        }
        // A NUL in a command the gate passes before TLS is refused as such.
        let (out, _) = dialogue(strict(), b"NOOP \0x\r\n", 512);
        assert_eq!(out, NUL_IN_COMMAND);
    }
}
