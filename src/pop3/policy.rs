//! The POP3 gate: one pure function deciding what happens to each client command in the
//! AUTHORIZATION state (RFC 2595 §4, RFC 8314 §4.1, RFC 5034).

pub use crate::config::TlsMode;
use crate::pop3::codec::{Command, Expect};
use crate::pop3::reply;

/// The session facts the gate depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GateState {
    pub listener: TlsMode,
    /// TLS is active on the client side (implicit, or after STLS).
    pub tls_active: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Forward the line as is and call `ResponseReceiver::expect(expect)`. For
    /// [`Expect::Sasl`] also call `CommandReceiver::begin_sasl` (and `end_sasl` on the final
    /// response). For [`Expect::Authentication`] and [`Expect::Sasl`] hold further client bytes
    /// until the response: `Response::authenticated()` → relay mode.
    Forward { expect: Expect },
    /// Write these bytes to the client; nothing reaches the backend.
    Reply(Vec<u8>),
    /// Write these bytes, drop every client byte after this command (CERT VU#555316,
    /// RFC 2595 §4), run the TLS handshake, start a fresh command receiver.
    StartTls(Vec<u8>),
}

/// Decides what happens to a command before authentication.
pub fn decide(state: &GateState, cmd: &Command) -> Decision {
    if cmd.is("STLS") {
        if cmd.has_arguments() {
            return Decision::Reply(reply::stls_malformed());
        }
        return match (state.listener, state.tls_active) {
            (TlsMode::Starttls, false) => Decision::StartTls(reply::stls_ok()),
            _ => Decision::Reply(reply::stls_refused()),
        };
    }
    let credentials = ["USER", "PASS", "APOP", "AUTH"].iter().any(|k| cmd.is(k));
    if credentials && !state.tls_active {
        return Decision::Reply(reply::err_cleartext_auth());
    }
    // Dovecot and Postfix trust these from mailfront's address; a client must never reach them.
    if cmd.is("XCLIENT") || cmd.is("XOIP") {
        return Decision::Reply(reply::err_not_permitted());
    }
    let expect = match () {
        _ if cmd.is("PASS") || cmd.is("APOP") => Expect::Authentication,
        _ if cmd.is("AUTH") && cmd.has_arguments() => Expect::Sasl,
        _ if cmd.is("CAPA") || cmd.is("RETR") || cmd.is("TOP") => Expect::MultiLine,
        _ if (cmd.is("AUTH") || cmd.is("LIST") || cmd.is("UIDL")) && !cmd.has_arguments() => {
            Expect::MultiLine
        }
        _ => Expect::SingleLine,
    };
    Decision::Forward { expect }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pop3::codec::{ClientEvent, CommandReceiver};

    fn cmd(line: &[u8]) -> Command {
        match CommandReceiver::default().next(line).event {
            Some(ClientEvent::Command(c)) => c,
            other => panic!("{other:?}"),
        }
    }

    const PLAIN: GateState = GateState {
        listener: TlsMode::Starttls,
        tls_active: false,
    };
    const UPGRADED: GateState = GateState {
        listener: TlsMode::Starttls,
        tls_active: true,
    };
    const IMPLICIT: GateState = GateState {
        listener: TlsMode::Implicit,
        tls_active: true,
    };

    #[test]
    fn gate_table() {
        use Decision::*;
        use Expect::*;
        let refused = || Reply(reply::err_cleartext_auth());
        let fwd = |expect| Forward { expect };
        let rows: Vec<(GateState, &[u8], Decision)> = vec![
            // O3: credentials before TLS, same answer whatever they are, never forwarded.
            (PLAIN, b"USER alice\r\n", refused()),
            (PLAIN, b"user bob\r\n", refused()),
            (PLAIN, b"PASS secret\r\n", refused()),
            (
                PLAIN,
                b"APOP alice c4c9334bac560ecc979e58001b3e22fb\r\n",
                refused(),
            ),
            (PLAIN, b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n", refused()),
            (PLAIN, b"AUTH\r\n", refused()),
            // O2: STLS.
            (
                PLAIN,
                b"STLS\r\n",
                StartTls(b"+OK Begin TLS negotiation\r\n".to_vec()),
            ),
            (
                PLAIN,
                b"stls\r\n",
                StartTls(b"+OK Begin TLS negotiation\r\n".to_vec()),
            ),
            (PLAIN, b"STLS now\r\n", Reply(reply::stls_malformed())),
            (
                UPGRADED,
                b"STLS\r\n",
                Reply(b"-ERR Command not permitted when TLS active\r\n".to_vec()),
            ),
            (IMPLICIT, b"STLS\r\n", Reply(reply::stls_refused())),
            // O5.
            (
                IMPLICIT,
                b"XCLIENT ADDR=1.2.3.4\r\n",
                Reply(reply::err_not_permitted()),
            ),
            (
                PLAIN,
                b"XOIP 1.2.3.4\r\n",
                Reply(reply::err_not_permitted()),
            ),
            // Over TLS: forwarded with the right response shape.
            (IMPLICIT, b"USER alice\r\n", fwd(SingleLine)),
            (IMPLICIT, b"PASS secret\r\n", fwd(Authentication)),
            (UPGRADED, b"APOP a b\r\n", fwd(Authentication)),
            (IMPLICIT, b"AUTH PLAIN =\r\n", fwd(Sasl)),
            (IMPLICIT, b"AUTH\r\n", fwd(MultiLine)),
            (PLAIN, b"CAPA\r\n", fwd(MultiLine)),
            (PLAIN, b"QUIT\r\n", fwd(SingleLine)),
            (PLAIN, b"NOOP\r\n", fwd(SingleLine)),
            (IMPLICIT, b"LIST\r\n", fwd(MultiLine)),
            (IMPLICIT, b"LIST 1\r\n", fwd(SingleLine)),
            (IMPLICIT, b"RETR 1\r\n", fwd(MultiLine)),
        ];
        for (state, line, want) in rows {
            assert_eq!(
                decide(&state, &cmd(line)),
                want,
                "{state:?} {:?}",
                String::from_utf8_lossy(line)
            );
        }
    }
}
