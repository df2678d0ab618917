//! The IMAP gate: one pure function that decides what happens to each client command before
//! authentication (RFC 9051 §6.2.1–§6.2.3, RFC 8314 §4.1, RFC 2971).
//!
//! It holds mailfront's central security property for IMAP: no credential is forwarded before
//! TLS, and the answer to a refused LOGIN/AUTHENTICATE is the same whatever the credentials.

use crate::config::TlsMode;
use crate::imap::codec::CommandStart;
use crate::imap::reply;

/// The session facts the gate depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GateState {
    pub listener: TlsMode,
    /// TLS is active on the client side (implicit, or after STARTTLS).
    pub tls_active: bool,
    /// The backend advertises `ID`; without it no ID is sent (it would answer BAD).
    pub backend_has_id: bool,
    /// The backend advertises `SASL-IR` (RFC 4959); without it an initial response is refused
    /// here, as the backend would, and never forwarded.
    pub backend_has_sasl_ir: bool,
    /// An ID carrying mailfront's fields (its own, or a rewritten client ID) already reached the
    /// backend in this session.
    pub id_sent: bool,
}

/// What the driver does with a command, decided from its first line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Forward this line and the rest of the command as is (stream mode); relay the backend's
    /// `+` continuations and responses.
    Forward,
    /// LOGIN or AUTHENTICATE over TLS. If `inject_id`, first send
    /// [`crate::imap::id::build_id_command`] with a [`crate::imap::id::mailfront_tag`], swallow
    /// the backend's `* ID` and that tag's completion, and set `id_sent`. Then forward the
    /// command; if `sasl`, call [`crate::imap::codec::CommandReceiver::begin_sasl`]. Hold any
    /// further client bytes until the command's tagged completion: OK → relay mode.
    Authenticate { inject_id: bool, sasl: bool },
    /// The first client ID over TLS to a backend with `ID`: call `collect_command()`, parse the
    /// [`crate::imap::codec::ClientEvent::Collected`] command with
    /// [`crate::imap::id::parse_id_command`] and forward
    /// [`crate::imap::id::rewrite_client_id`] (or answer [`reply::id_malformed`] on error), then
    /// set `id_sent`.
    RewriteId,
    /// Write these bytes to the client, call `discard_command()`; nothing reaches the backend.
    Reply(Vec<u8>),
    /// Write these bytes, drop every client byte after this command (pipelined plaintext must
    /// never run after the upgrade: CERT VU#555316, RFC 9051 §6.2.1), then run the TLS
    /// handshake and start a fresh command receiver.
    StartTls(Vec<u8>),
}

/// `AUTHENTICATE mech <initial response>` (RFC 4959 §7: the response follows the mechanism).
fn has_initial_response(cmd: &CommandStart) -> bool {
    let args = cmd.arguments();
    args.iter()
        .position(|&b| b == b' ')
        .is_some_and(|space| args.get(space + 1..).is_some_and(|ir| !ir.is_empty()))
}

/// Decides what happens to a command in the not-authenticated state.
pub fn decide(state: &GateState, cmd: &CommandStart) -> Decision {
    let tag = cmd.tag.as_slice();
    let cleartext = !state.tls_active;
    if cmd.is("STARTTLS") {
        if !cmd.arguments().is_empty() || cmd.literal.is_some() {
            return Decision::Reply(reply::starttls_malformed(tag));
        }
        return match (state.listener, state.tls_active) {
            (TlsMode::Starttls, false) => Decision::StartTls(reply::starttls_ok(tag)),
            _ => Decision::Reply(reply::starttls_refused(tag)),
        };
    }
    if cmd.is("LOGIN") || cmd.is("AUTHENTICATE") {
        if cleartext {
            return Decision::Reply(reply::privacy_required(tag));
        }
        let sasl = cmd.is("AUTHENTICATE");
        if sasl && cmd.literal.is_some() {
            // RFC 9051 §6.2.2: the initial response "MUST be transmitted outside of a quoted
            // string or literal"; the SASL exchange could not be followed after one.
            return Decision::Reply(reply::authenticate_malformed(tag));
        }
        if sasl && has_initial_response(cmd) && !state.backend_has_sasl_ir {
            // Not advertised to the client either (the view is the backend's list), so this is
            // the backend's own answer to an unexpected initial response (RFC 4959 §3).
            return Decision::Reply(reply::sasl_ir_unsupported(tag));
        }
        return Decision::Authenticate {
            inject_id: state.backend_has_id && !state.id_sent,
            sasl,
        };
    }
    if cmd.is("ID") {
        // Answered here before TLS (the backend's first ID must carry `tls`), when the backend
        // lacks ID (a client `tls` field must never reach it unchecked), and after our fields
        // went once (the backend learns the cipher exactly once; Dovecot trusts only the first).
        if cleartext || !state.backend_has_id || state.id_sent {
            return Decision::Reply(reply::id_nil(tag));
        }
        return Decision::RewriteId;
    }
    if cmd.is("COMPRESS") {
        return Decision::Reply(reply::not_before_authentication(tag));
    }
    Decision::Forward
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start(line: &[u8]) -> CommandStart {
        let mut rx = crate::imap::codec::CommandReceiver::default();
        match rx.next(line).event {
            Some(crate::imap::codec::ClientEvent::Command(c)) => c,
            other => panic!("no command: {other:?}"),
        }
    }

    const STARTTLS_PLAIN: GateState = GateState {
        listener: TlsMode::Starttls,
        tls_active: false,
        backend_has_id: true,
        backend_has_sasl_ir: true,
        id_sent: false,
    };
    const STARTTLS_UPGRADED: GateState = GateState {
        tls_active: true,
        ..STARTTLS_PLAIN
    };
    const IMPLICIT: GateState = GateState {
        listener: TlsMode::Implicit,
        tls_active: true,
        backend_has_id: true,
        backend_has_sasl_ir: true,
        id_sent: false,
    };

    #[test]
    fn gate_table() {
        use Decision::*;
        let privacy = |t: &[u8]| Reply(reply::privacy_required(t));
        let auth = |inject_id, sasl| Authenticate { inject_id, sasl };
        let rows: Vec<(GateState, &[u8], Decision)> = vec![
            // Credentials before TLS: refused, identically, whatever they are (RFC 8314 §4.1).
            (STARTTLS_PLAIN, b"a LOGIN u p\r\n", privacy(b"a")),
            (STARTTLS_PLAIN, b"a login other secret\r\n", privacy(b"a")),
            (STARTTLS_PLAIN, b"a LOGIN {5}\r\n", privacy(b"a")),
            (STARTTLS_PLAIN, b"a LOGIN {5+}\r\n", privacy(b"a")),
            (STARTTLS_PLAIN, b"a AUTHENTICATE PLAIN\r\n", privacy(b"a")),
            (
                STARTTLS_PLAIN,
                b"a AUTHENTICATE PLAIN AGFsaWNlAHNlY3JldA==\r\n",
                privacy(b"a"),
            ),
            // STARTTLS.
            (
                STARTTLS_PLAIN,
                b"a STARTTLS\r\n",
                StartTls(b"a OK Begin TLS negotiation now\r\n".to_vec()),
            ),
            (
                STARTTLS_PLAIN,
                b"a starttls\r\n",
                StartTls(b"a OK Begin TLS negotiation now\r\n".to_vec()),
            ),
            (
                STARTTLS_PLAIN,
                b"a STARTTLS x\r\n",
                Reply(reply::starttls_malformed(b"a")),
            ),
            (
                STARTTLS_UPGRADED,
                b"a STARTTLS\r\n",
                Reply(b"a BAD TLS is already active\r\n".to_vec()),
            ),
            (
                IMPLICIT,
                b"a STARTTLS\r\n",
                Reply(b"a BAD TLS is already active\r\n".to_vec()),
            ),
            // Over TLS: credentials go through, after our ID exactly once.
            (IMPLICIT, b"a LOGIN u p\r\n", auth(true, false)),
            (IMPLICIT, b"a AUTHENTICATE PLAIN\r\n", auth(true, true)),
            (
                GateState {
                    id_sent: true,
                    ..IMPLICIT
                },
                b"a LOGIN u p\r\n",
                auth(false, false),
            ),
            (
                GateState {
                    backend_has_id: false,
                    ..IMPLICIT
                },
                b"a LOGIN u p\r\n",
                auth(false, false),
            ),
            (STARTTLS_UPGRADED, b"a LOGIN {1}\r\n", auth(true, false)),
            // ID.
            (
                STARTTLS_PLAIN,
                b"a ID NIL\r\n",
                Reply(b"* ID NIL\r\na OK ID completed\r\n".to_vec()),
            ),
            (IMPLICIT, b"a ID NIL\r\n", RewriteId),
            (
                GateState {
                    id_sent: true,
                    ..IMPLICIT
                },
                b"a ID (\"tls\" \"forged\")\r\n",
                Reply(reply::id_nil(b"a")),
            ),
            (
                GateState {
                    backend_has_id: false,
                    ..IMPLICIT
                },
                b"a ID (\"tls\" \"forged\")\r\n",
                Reply(reply::id_nil(b"a")),
            ),
            // AUTHENTICATE: an initial response only where the backend takes one; never a
            // literal.
            (
                IMPLICIT,
                b"a AUTHENTICATE PLAIN AGFsaWNlAHNlY3JldA==\r\n",
                auth(true, true),
            ),
            (IMPLICIT, b"a AUTHENTICATE PLAIN =\r\n", auth(true, true)),
            (
                GateState {
                    backend_has_sasl_ir: false,
                    ..IMPLICIT
                },
                b"a AUTHENTICATE PLAIN AGFsaWNlAHNlY3JldA==\r\n",
                Reply(reply::sasl_ir_unsupported(b"a")),
            ),
            (
                GateState {
                    backend_has_sasl_ir: false,
                    ..IMPLICIT
                },
                b"a AUTHENTICATE PLAIN\r\n",
                auth(true, true),
            ),
            (
                IMPLICIT,
                b"a AUTHENTICATE PLAIN {8+}\r\n",
                Reply(reply::authenticate_malformed(b"a")),
            ),
            (
                GateState {
                    backend_has_sasl_ir: false,
                    ..STARTTLS_PLAIN
                },
                b"a AUTHENTICATE PLAIN {8}\r\n",
                privacy(b"a"),
            ),
            // Everything else passes.
            (STARTTLS_PLAIN, b"a CAPABILITY\r\n", Forward),
            (STARTTLS_PLAIN, b"a NOOP\r\n", Forward),
            (STARTTLS_PLAIN, b"a LOGOUT\r\n", Forward),
            (IMPLICIT, b"a SELECT INBOX\r\n", Forward),
            (
                IMPLICIT,
                b"a COMPRESS DEFLATE\r\n",
                Reply(reply::not_before_authentication(b"a")),
            ),
        ];
        for (state, line, want) in rows {
            assert_eq!(
                decide(&state, &start(line)),
                want,
                "{state:?} {:?}",
                String::from_utf8_lossy(line)
            );
        }
    }
}
