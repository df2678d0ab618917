//! The SMTP policy gate: one pure function deciding, for each client line, whether it reaches
//! the backend. It holds mailfront's central security property: no credential, no mail
//! transaction and no trusted-peer command (XCLIENT/XFORWARD) ever crosses to the backend unless
//! the rules below allow it.
//!
//! Rule order (first match wins):
//! 1. XCLIENT/XFORWARD → `500 5.5.1`, in every state (the backend
//!    trusts mailfront's address, so a forwarded `XCLIENT LOGIN=` is an authentication bypass).
//! 2. STARTTLS → `554 5.5.1` when TLS is active or the listener is implicit; `501 5.5.4` with
//!    parameters; otherwise [`Verdict::StartTls`] (RFC 3207 §4). Never forwarded.
//! 3. Before TLS: EHLO, HELO, NOOP, RSET, QUIT pass (the driver answers them itself while no
//!    backend is connected, see [`crate::smtp::cleartext`]); AUTH gets `530 5.7.0` whatever its
//!    argument (RFC 8314 §4.1); with `require_tls_for_mail` every other command gets
//!    `530 5.7.0` (RFC 3207 §4); otherwise MAIL, RCPT, DATA and BDAT pass (MAIL with REQUIRETLS
//!    gets `555 5.5.4`: REQUIRETLS is never advertised before TLS, RFC 8689; Postfix answers the
//!    same) and every other command still gets `530 5.7.0`.
//! 4. A line with unusable syntax gets its own reply ([`SyntaxError::reply`]).
//! 5. After a STARTTLS upgrade and before the new EHLO/HELO: MAIL, RCPT, DATA, BDAT, AUTH get
//!    `503 5.5.1` (RFC 3207 §4.2: the backend still holds the pre-TLS EHLO state).
//! 6. AUTH when already authenticated → `503 5.5.1` (RFC 4954 §4).
//! 7. MAIL with REQUIRETLS when the backend did not advertise it → `555 5.5.4`.
//! 8. BDAT when the backend did not advertise CHUNKING → `502 5.5.1`.
//! 9. Everything else is forwarded.
//!
//! A refused BDAT always comes with [`Verdict::DiscardChunk`]: its octets follow the command
//! line and must be consumed and dropped, never read as commands (RFC 3030 §4.2).
//!
//! SASL lines after a backend 334 are a separate input ([`ClientInput::SaslResponse`]): they are
//! forwarded when the client connection is TLS and their framing is clean (a bare CR, bare LF or
//! NUL gets its `500 5.5.2`, and the driver cancels the exchange). An exchange can only start after TLS (rule 3),
//! so the cleartext case refuses defensively.

use crate::config::TlsMode;
use crate::smtp::command::{Command, SaslResponse, SyntaxError, Verb};
use crate::smtp::local_reply;

/// What the gate needs to know about the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GateState {
    pub listener: TlsMode,
    /// The client connection is TLS now.
    pub client_tls: bool,
    /// Listener option: refuse every transaction command before TLS (default true).
    pub require_tls_for_mail: bool,
    /// The backend's last EHLO reply offered REQUIRETLS.
    pub backend_requiretls: bool,
    /// The backend's last EHLO reply offered CHUNKING.
    pub backend_chunking: bool,
    /// Set on a STARTTLS upgrade, cleared when the next EHLO/HELO is forwarded.
    pub needs_ehlo: bool,
    /// The backend answered an AUTH with 235.
    pub authenticated: bool,
}

impl GateState {
    /// The state of a new session on a listener, before any command.
    pub fn new(listener: TlsMode, require_tls_for_mail: bool) -> Self {
        GateState {
            listener,
            client_tls: listener == TlsMode::Implicit,
            require_tls_for_mail,
            backend_requiretls: false,
            backend_chunking: false,
            needs_ehlo: false,
            authenticated: false,
        }
    }
}

/// One client line, as the driver framed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientInput<'a> {
    /// A command line (outside an AUTH exchange).
    Command(&'a Command),
    /// A line inside an AUTH exchange (after a backend 334).
    SaslResponse(SaslResponse),
}

/// What the driver does with the line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Send the line to the backend and relay its reply in order.
    Forward,
    /// Answer the client with these bytes (in order with pending backend replies); send nothing
    /// to the backend.
    Reply(&'static [u8]),
    /// A refused BDAT: answer with `reply` and drop the next `octets` octets of client input.
    DiscardChunk { octets: u64, reply: &'static [u8] },
    /// Answer [`local_reply::STARTTLS_READY`], drop every byte buffered after the command, and
    /// run the TLS handshake; then set `client_tls` and `needs_ehlo`.
    StartTls,
}

/// The gate. Pure: the same state and line always give the same verdict.
pub fn decide(state: &GateState, input: ClientInput<'_>) -> Verdict {
    match input {
        ClientInput::SaslResponse(SaslResponse::Invalid(error)) => Verdict::Reply(error.reply()),
        ClientInput::SaslResponse(_) if state.client_tls => Verdict::Forward,
        ClientInput::SaslResponse(_) => Verdict::Reply(local_reply::MUST_STARTTLS),
        ClientInput::Command(command) => decide_command(state, command),
    }
}

fn decide_command(state: &GateState, command: &Command) -> Verdict {
    let verb = command.verb();
    let refuse = |reply: &'static [u8]| match command {
        Command::Bdat(bdat) => Verdict::DiscardChunk {
            octets: bdat.size,
            reply,
        },
        _ => Verdict::Reply(reply),
    };

    // 1. Trusted-peer commands never pass.
    if matches!(verb, Verb::Xclient | Verb::Xforward) {
        return Verdict::Reply(local_reply::COMMAND_NOT_RECOGNIZED);
    }

    // 2. STARTTLS is answered here, never forwarded.
    if verb == Verb::StartTls {
        return if state.client_tls || state.listener == TlsMode::Implicit {
            Verdict::Reply(local_reply::TLS_ALREADY_ACTIVE)
        } else if let Command::Invalid { error, .. } = command {
            Verdict::Reply(error.reply())
        } else {
            Verdict::StartTls
        };
    }

    // 3. Before TLS.
    if !state.client_tls {
        match verb {
            Verb::Ehlo | Verb::Helo | Verb::Noop | Verb::Rset | Verb::Quit => {}
            Verb::Auth => return Verdict::Reply(local_reply::MUST_STARTTLS),
            _ if state.require_tls_for_mail => return refuse(local_reply::MUST_STARTTLS),
            Verb::Mail | Verb::Rcpt | Verb::Data | Verb::Bdat => {
                if matches!(command, Command::Mail(mail) if mail.requiretls) {
                    return Verdict::Reply(local_reply::REQUIRETLS_UNSUPPORTED);
                }
            }
            _ => return Verdict::Reply(local_reply::MUST_STARTTLS),
        }
    }

    // 4. Unusable syntax.
    if let Command::Invalid { error, .. } = command {
        return Verdict::Reply(SyntaxError::reply(*error));
    }

    // 5. RFC 3207 §4.2: a new EHLO after STARTTLS before anything stateful.
    if state.needs_ehlo
        && matches!(
            verb,
            Verb::Mail | Verb::Rcpt | Verb::Data | Verb::Bdat | Verb::Auth
        )
    {
        return refuse(local_reply::SEND_EHLO_FIRST);
    }

    match command {
        // 6.
        Command::Auth(_) if state.authenticated => {
            Verdict::Reply(local_reply::ALREADY_AUTHENTICATED)
        }
        // 7.
        Command::Mail(mail) if mail.requiretls && !state.backend_requiretls => {
            Verdict::Reply(local_reply::REQUIRETLS_UNSUPPORTED)
        }
        // 8.
        Command::Bdat(_) if !state.backend_chunking => refuse(local_reply::BDAT_NOT_SUPPORTED),
        // 9.
        _ => Verdict::Forward,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::smtp::local_reply::*;

    /// A 587 session before STARTTLS, defaults (require_tls_for_mail = true).
    fn plain() -> GateState {
        GateState {
            backend_chunking: true,
            ..GateState::new(TlsMode::Starttls, true)
        }
    }

    /// A session after STARTTLS and the new EHLO.
    fn upgraded() -> GateState {
        GateState {
            client_tls: true,
            ..plain()
        }
    }

    /// A 465 session.
    fn implicit() -> GateState {
        GateState {
            backend_chunking: true,
            ..GateState::new(TlsMode::Implicit, true)
        }
    }

    fn check(state: GateState, line: &str, expected: Verdict) {
        let command = Command::parse(line.as_bytes());
        assert_eq!(
            decide(&state, ClientInput::Command(&command)),
            expected,
            "{line:?} in {state:?}"
        );
    }

    const FORWARD: Verdict = Verdict::Forward;
    const fn reply(bytes: &'static [u8]) -> Verdict {
        Verdict::Reply(bytes)
    }

    #[test]
    fn gate_table() {
        let lax = GateState {
            require_tls_for_mail: false,
            ..plain()
        };
        let after_starttls = GateState {
            needs_ehlo: true,
            ..upgraded()
        };
        let authed = GateState {
            authenticated: true,
            ..upgraded()
        };
        let rtls = GateState {
            backend_requiretls: true,
            ..upgraded()
        };
        let no_chunking = GateState {
            backend_chunking: false,
            ..upgraded()
        };
        let table: Vec<(GateState, &str, Verdict)> = vec![
            // Before TLS on a STARTTLS listener.
            (plain(), "EHLO client.example.org", FORWARD),
            (plain(), "HELO client", FORWARD),
            (plain(), "NOOP", FORWARD),
            (plain(), "RSET", FORWARD),
            (plain(), "QUIT", FORWARD),
            (plain(), "STARTTLS", Verdict::StartTls),
            (plain(), "starttls", Verdict::StartTls),
            (plain(), "STARTTLS now", reply(STARTTLS_SYNTAX)),
            (
                plain(),
                "AUTH PLAIN AGFsaWNlAHNlY3JldA==",
                reply(MUST_STARTTLS),
            ),
            (plain(), "AUTH PLAIN !!!not-base64", reply(MUST_STARTTLS)),
            (plain(), "AUTH LOGIN", reply(MUST_STARTTLS)),
            (plain(), "AUTH", reply(MUST_STARTTLS)),
            (plain(), "MAIL FROM:<a@b>", reply(MUST_STARTTLS)),
            (plain(), "MAIL FROM:<a@b> REQUIRETLS", reply(MUST_STARTTLS)),
            (plain(), "MAIL nonsense", reply(MUST_STARTTLS)),
            (plain(), "RCPT TO:<a@b>", reply(MUST_STARTTLS)),
            (plain(), "DATA", reply(MUST_STARTTLS)),
            (plain(), "VRFY bob", reply(MUST_STARTTLS)),
            (plain(), "HELP", reply(MUST_STARTTLS)),
            (plain(), "FOO", reply(MUST_STARTTLS)),
            (
                plain(),
                "BDAT 10 LAST",
                Verdict::DiscardChunk {
                    octets: 10,
                    reply: MUST_STARTTLS,
                },
            ),
            (
                plain(),
                "XCLIENT LOGIN=victim",
                reply(COMMAND_NOT_RECOGNIZED),
            ),
            (
                plain(),
                "XFORWARD ADDR=1.2.3.4",
                reply(COMMAND_NOT_RECOGNIZED),
            ),
            (plain(), "NOOP\rMAIL FROM:<a@b>", reply(BARE_CR_IN_COMMAND)),
            // Before TLS with require_tls_for_mail: false.
            (lax, "MAIL FROM:<a@b>", FORWARD),
            (
                lax,
                "MAIL FROM:<a@b> REQUIRETLS",
                reply(REQUIRETLS_UNSUPPORTED),
            ),
            (lax, "RCPT TO:<a@b>", FORWARD),
            (lax, "DATA", FORWARD),
            (lax, "AUTH PLAIN AGFsaWNlAHNlY3JldA==", reply(MUST_STARTTLS)),
            (lax, "XCLIENT ADDR=1.2.3.4", reply(COMMAND_NOT_RECOGNIZED)),
            (lax, "VRFY bob", reply(MUST_STARTTLS)),
            (lax, "FOO", reply(MUST_STARTTLS)),
            (lax, "NOOP", FORWARD),
            (lax, "MAIL TO:<x>", reply(MAIL_SYNTAX)),
            // After STARTTLS, before the new EHLO.
            (after_starttls, "MAIL FROM:<a@b>", reply(SEND_EHLO_FIRST)),
            (after_starttls, "RCPT TO:<a@b>", reply(SEND_EHLO_FIRST)),
            (after_starttls, "DATA", reply(SEND_EHLO_FIRST)),
            (
                after_starttls,
                "AUTH PLAIN AGFsaWNlAHNlY3JldA==",
                reply(SEND_EHLO_FIRST),
            ),
            (
                after_starttls,
                "BDAT 3",
                Verdict::DiscardChunk {
                    octets: 3,
                    reply: SEND_EHLO_FIRST,
                },
            ),
            (after_starttls, "EHLO client", FORWARD),
            (after_starttls, "NOOP", FORWARD),
            (after_starttls, "STARTTLS", reply(TLS_ALREADY_ACTIVE)),
            // After STARTTLS and EHLO.
            (upgraded(), "AUTH PLAIN AGFsaWNlAHNlY3JldA==", FORWARD),
            (upgraded(), "AUTH LOGIN", FORWARD),
            (upgraded(), "MAIL FROM:<a@b> SIZE=100", FORWARD),
            (
                upgraded(),
                "MAIL FROM:<a@b> REQUIRETLS",
                reply(REQUIRETLS_UNSUPPORTED),
            ),
            (
                upgraded(),
                "MAIL FROM:<a@b> requiretls",
                reply(REQUIRETLS_UNSUPPORTED),
            ),
            (upgraded(), "RCPT TO:<a@b>", FORWARD),
            (upgraded(), "DATA", FORWARD),
            (upgraded(), "BDAT 5 LAST", FORWARD),
            (upgraded(), "VRFY bob", FORWARD),
            (upgraded(), "FOO bar", FORWARD),
            (upgraded(), "STARTTLS", reply(TLS_ALREADY_ACTIVE)),
            (upgraded(), "STARTTLS x", reply(TLS_ALREADY_ACTIVE)),
            (
                upgraded(),
                "XCLIENT LOGIN=victim",
                reply(COMMAND_NOT_RECOGNIZED),
            ),
            (upgraded(), "xforward NAME=x", reply(COMMAND_NOT_RECOGNIZED)),
            (upgraded(), "BDAT x", reply(BDAT_SYNTAX)),
            (upgraded(), "MAIL <a@b>", reply(MAIL_SYNTAX)),
            (rtls, "MAIL FROM:<a@b> REQUIRETLS", FORWARD),
            (
                no_chunking,
                "BDAT 7",
                Verdict::DiscardChunk {
                    octets: 7,
                    reply: BDAT_NOT_SUPPORTED,
                },
            ),
            (no_chunking, "DATA", FORWARD),
            // Authenticated.
            (
                authed,
                "AUTH PLAIN AGFsaWNlAHNlY3JldA==",
                reply(ALREADY_AUTHENTICATED),
            ),
            (authed, "XCLIENT LOGIN=other", reply(COMMAND_NOT_RECOGNIZED)),
            (authed, "MAIL FROM:<a@b>", FORWARD),
            // Implicit TLS.
            (implicit(), "STARTTLS", reply(TLS_ALREADY_ACTIVE)),
            (implicit(), "AUTH PLAIN AGFsaWNlAHNlY3JldA==", FORWARD),
            (implicit(), "MAIL FROM:<a@b>", FORWARD),
            (
                implicit(),
                "XCLIENT ADDR=1.2.3.4",
                reply(COMMAND_NOT_RECOGNIZED),
            ),
        ];
        for (state, line, expected) in table {
            check(state, line, expected);
        }
    }

    #[test]
    fn auth_before_starttls_is_refused_identically_whatever_the_credential() {
        let lines = [
            "AUTH PLAIN AGFsaWNlAHZhbGlk",
            "AUTH PLAIN AGFsaWNlAGludmFsaWQ=",
            "AUTH PLAIN =",
            "AUTH LOGIN",
            "auth xoauth2 dXNlcj1h",
            "AUTH PLAIN abc\rdef",
        ];
        for line in lines {
            let command = Command::parse(line.as_bytes());
            for state in [
                plain(),
                GateState {
                    require_tls_for_mail: false,
                    ..plain()
                },
            ] {
                assert_eq!(
                    decide(&state, ClientInput::Command(&command)),
                    Verdict::Reply(MUST_STARTTLS),
                    "{line:?}"
                );
            }
        }
    }

    #[test]
    fn starttls_is_answered_locally_and_never_forwarded_in_any_state() {
        for state in [plain(), upgraded(), implicit()] {
            let command = Command::parse(b"STARTTLS");
            assert_ne!(
                decide(&state, ClientInput::Command(&command)),
                Verdict::Forward
            );
        }
    }

    #[test]
    fn xclient_and_xforward_are_never_forwarded_in_any_state() {
        let states = [
            plain(),
            upgraded(),
            implicit(),
            GateState {
                authenticated: true,
                ..upgraded()
            },
            GateState {
                require_tls_for_mail: false,
                ..plain()
            },
        ];
        for line in [
            "XCLIENT LOGIN=x",
            "XFORWARD ADDR=1.2.3.4",
            " xclient\tNAME=x",
        ] {
            let command = Command::parse(line.as_bytes());
            for state in states {
                assert_eq!(
                    decide(&state, ClientInput::Command(&command)),
                    Verdict::Reply(COMMAND_NOT_RECOGNIZED)
                );
            }
        }
    }

    #[test]
    fn sasl_lines_are_forwarded_only_over_tls() {
        for response in [SaslResponse::Data, SaslResponse::Cancel] {
            assert_eq!(
                decide(&upgraded(), ClientInput::SaslResponse(response)),
                Verdict::Forward
            );
            assert_eq!(
                decide(&plain(), ClientInput::SaslResponse(response)),
                Verdict::Reply(MUST_STARTTLS)
            );
        }
    }

    #[test]
    fn bad_line_endings_are_refused_in_every_state_and_auth_before_tls_keeps_its_530() {
        use crate::smtp::receiver::{CommandReceiver, LineMode};
        let line = |bytes: &[u8], mode| {
            let (_, result) = CommandReceiver::default().receive(bytes, mode);
            result.unwrap().unwrap()
        };
        let lax = GateState {
            require_tls_for_mail: false,
            ..plain()
        };
        let authed = GateState {
            authenticated: true,
            ..upgraded()
        };
        let cases: [(&[u8], &[u8]); 5] = [
            (b"EHLO a\n", BARE_LF_IN_COMMAND),
            (b"NOOP\rMAIL FROM:<a@b>\r\n", BARE_CR_IN_COMMAND),
            (b"RSET\0XCLIENT\r\n", NUL_IN_COMMAND),
            (b"MAIL FROM:<a@b>\n", BARE_LF_IN_COMMAND),
            (b"RCPT TO:<a@b>\rDATA\r\n", BARE_CR_IN_COMMAND),
        ];
        for (bytes, expected) in cases {
            let command = Command::from_line(&line(bytes, LineMode::Command));
            for state in [upgraded(), implicit(), authed] {
                assert_eq!(
                    decide(&state, ClientInput::Command(&command)),
                    reply(expected),
                    "{bytes:?}"
                );
            }
            for state in [lax, plain()] {
                let before = decide(&state, ClientInput::Command(&command));
                assert!(before == reply(expected) || before == reply(MUST_STARTTLS));
            }
        }
        // STARTTLS ended by a bare LF is not a STARTTLS: no handshake starts.
        let command = Command::from_line(&line(b"STARTTLS\n", LineMode::Command));
        assert_eq!(
            decide(&plain(), ClientInput::Command(&command)),
            reply(BARE_LF_IN_COMMAND)
        );
        for bytes in [
            &b"AUTH PLAIN AGFsaWNl\n"[..],
            b"AUTH PLAIN a\rb\r\n",
            b"AUTH\0\r\n",
        ] {
            let command = Command::from_line(&line(bytes, LineMode::Command));
            assert_eq!(
                decide(&plain(), ClientInput::Command(&command)),
                reply(MUST_STARTTLS)
            );
            assert_ne!(
                decide(&upgraded(), ClientInput::Command(&command)),
                Verdict::Forward
            );
        }
        let sasl: [(&[u8], &[u8]); 5] = [
            (b"AGFsaWNl\n", BARE_LF_IN_COMMAND),
            (b"*\n", BARE_LF_IN_COMMAND),
            (b"AGFs\raWNl\r\n", BARE_CR_IN_COMMAND),
            (b"*\r\r\n", BARE_CR_IN_COMMAND),
            (b"AG\0\r\n", NUL_IN_COMMAND),
        ];
        for (bytes, expected) in sasl {
            let response = SaslResponse::from_line(&line(bytes, LineMode::SaslResponse));
            assert_eq!(
                decide(&upgraded(), ClientInput::SaslResponse(response)),
                reply(expected),
                "{bytes:?}"
            );
        }
        let ok = SaslResponse::from_line(&line(b"*\r\n", LineMode::SaslResponse));
        assert_eq!(ok, SaslResponse::Cancel);
    }

    #[test]
    fn new_session_state_follows_the_listener() {
        assert!(GateState::new(TlsMode::Implicit, true).client_tls);
        assert!(!GateState::new(TlsMode::Starttls, true).client_tls);
    }
}
