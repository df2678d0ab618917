//! The IMAP gate: one pure function deciding, for each parsed client command in the
//! not-authenticated state, whether mailfront answers it, refuses it, or lets it reach the
//! backend (re-encoded by [`crate::imap::command::encode`], never as the client's bytes). The
//! machine ([`crate::imap::prelogin`]) asks it and acts on the [`Verdict`]; it does not decide
//! again.
//!
//! Rule order (first match wins):
//! 1. A synchronising literal announced at the end of a line (the client waits for `+`,
//!    RFC 9051 §7.5): after TLS only LOGIN and ID take one (a user name, a password, an ID value)
//!    → [`Verdict::AcceptLiteral`]. Every other is refused before its octets are sent: before TLS
//!    LOGIN/AUTHENTICATE get the cleartext refusal of rule 4 and any other command
//!    [`Refusal::LiteralBeforeTls`]; after TLS AUTHENTICATE gets
//!    [`Refusal::AuthenticateMalformed`] (RFC 9051 §6.2.2: no literal in AUTHENTICATE) and any
//!    other command [`Refusal::LiteralNotAccepted`].
//! 2. After TLS, a tag of the shape of mailfront's own ([`id::is_mailfront_tag`]) →
//!    [`Refusal::TagReserved`]: the backend's answers to those tags are mailfront's and never
//!    reach the client, so a client command under one would never be answered.
//! 3. STARTTLS: before TLS → [`Local::StartTls`]; with TLS active (implicit, or upgraded) →
//!    [`Refusal::TlsAlreadyActive`] (RFC 9051 §6.2.1: "MUST always respond with a tagged BAD").
//!    STARTTLS with arguments → [`Refusal::StartTlsMalformed`], in every state.
//! 4. LOGIN or AUTHENTICATE before TLS → [`Refusal::CleartextAuth`], whatever the credential:
//!    one `NO [PRIVACYREQUIRED]` (RFC 8314 §4.1, RFC 5530 §3), as the `LOGINDISABLED` in
//!    [`CLEARTEXT_CAPABILITIES`] announces (RFC 9051 §6.2.3, §7.2.2).
//! 5. Before TLS mailfront is the whole server, with no backend: CAPABILITY → its own list
//!    ([`Local::Capability`]), NOOP → OK, LOGOUT → BYE and close (RFC 9051 §6.1.3), ID → NIL
//!    (RFC 2971 §3.2), so that the backend's first ID, the one Dovecot trusts, comes after TLS
//!    and carries mailfront's `tls` field.
//! 6. ID after TLS: [`Verdict::ForwardId`] (the client's ID with mailfront's fields added) when
//!    the backend offers ID and mailfront's fields have not gone yet; [`Local::IdNil`] otherwise
//!    (a second ID could only carry fields mailfront cannot vouch for).
//! 7. AUTHENTICATE with an initial response when the backend lacks SASL-IR →
//!    [`Refusal::SaslIrUnsupported`], the backend's own answer (RFC 4959 §3); the client was not
//!    shown SASL-IR either.
//! 8. LOGIN or AUTHENTICATE after TLS → [`Verdict::ChargeLogin`]: charged against
//!    `limits.auth_failures_per_ip` before anything of it goes out ([`Input::Charged`]).
//! 9. CAPABILITY, NOOP and LOGOUT after TLS → [`Verdict::Forward`].
//! 10. Any other command → [`Refusal::NotBeforeAuthentication`]: never forwarded before login,
//!     so a backend extension (XCLIENT, COMPRESS…) can never be reached without credentials
//!     (RFC 9051 §6.1–§6.2 list what the not-authenticated state takes).
//!
//! The charge ([`Input::Charged`]): granted → [`Verdict::Forward`]; refused →
//! [`Refusal::Throttled`], answered here and never forwarded.
//!
//! What stays in the machine: framing refusals (the receiver's own), the
//! `limits.preauth_commands` count (every command and refused literal counts), the encoding of
//! what goes out, and ID rewriting and the SASL exchange itself.

use crate::imap::command::Command;
use crate::imap::id;
use crate::imap::reply;

/// Untagged capability list mailfront shows before TLS: it cannot know the backend's yet, and
/// the client must ask again after STARTTLS anyway (RFC 9051 §6.2.1). `LOGINDISABLED`: no
/// LOGIN or AUTHENTICATE before TLS (RFC 9051 §6.2.3, RFC 8314 §4.1).
pub const CLEARTEXT_CAPABILITIES: &[u8] = b"IMAP4rev1 STARTTLS LOGINDISABLED";

/// What the gate needs to know about the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GateState {
    /// The client connection is TLS now (implicit, or after STARTTLS).
    pub tls: bool,
    /// The backend's capabilities list ID (RFC 2971).
    pub backend_id: bool,
    /// The backend's capabilities list SASL-IR (RFC 4959).
    pub backend_sasl_ir: bool,
    /// An ID carrying mailfront's fields already went to the backend.
    pub id_sent: bool,
}

/// One client input the gate judges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input<'a> {
    /// A complete, parsed command.
    Command { tag: &'a [u8], command: &'a Command },
    /// A synchronising literal ends a line of the command called `name` (as the client wrote it).
    Literal { name: &'a [u8] },
    /// The answer to [`Verdict::ChargeLogin`]: whether `limits.auth_failures_per_ip` let the
    /// held login through.
    Charged { granted: bool },
}

/// A command mailfront answers itself, not a refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Local {
    /// Before TLS: [`CLEARTEXT_CAPABILITIES`].
    Capability,
    /// Before TLS: `OK`.
    Noop,
    /// Before TLS: `* BYE`, `OK`, then the session ends (RFC 9051 §6.1.3).
    Logout,
    /// Before TLS: `OK`, then drop whatever the client pipelined and run the TLS handshake
    /// (RFC 9051 §6.2.1).
    StartTls,
    /// `ID NIL` (RFC 2971 §3.2).
    IdNil,
}

impl Local {
    /// What mailfront writes to the client for it.
    pub fn reply(self, tag: &[u8]) -> Vec<u8> {
        match self {
            Local::Capability => {
                let mut out = b"* CAPABILITY ".to_vec();
                out.extend_from_slice(CLEARTEXT_CAPABILITIES);
                out.extend_from_slice(b"\r\n");
                out.extend_from_slice(&reply::tagged(tag, "OK", "CAPABILITY completed"));
                out
            }
            Local::Noop => reply::tagged(tag, "OK", "NOOP completed"),
            Local::Logout => {
                let mut out = b"* BYE Logging out\r\n".to_vec();
                out.extend_from_slice(&reply::tagged(tag, "OK", "LOGOUT completed"));
                out
            }
            Local::StartTls => reply::starttls_ok(tag),
            Local::IdNil => reply::id_nil(tag),
        }
    }
}

/// Why a command is answered by mailfront and never forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// LOGIN or AUTHENTICATE before TLS (RFC 8314 §4.1).
    CleartextAuth,
    /// A literal before TLS, on a command that is not a login.
    LiteralBeforeTls,
    /// A literal after TLS on a command that takes none before login.
    LiteralNotAccepted,
    /// AUTHENTICATE with a literal (RFC 9051 §6.2.2).
    AuthenticateMalformed,
    /// STARTTLS with TLS already active (RFC 9051 §6.2.1).
    TlsAlreadyActive,
    /// STARTTLS with arguments.
    StartTlsMalformed,
    /// A command outside the not-authenticated whitelist.
    NotBeforeAuthentication,
    /// A client tag of the shape of mailfront's own.
    TagReserved,
    /// AUTHENTICATE with an initial response, the backend without SASL-IR (RFC 4959 §3).
    SaslIrUnsupported,
    /// A login from an address at `limits.auth_failures_per_ip`.
    Throttled,
}

impl Refusal {
    /// The tagged reply mailfront writes for it.
    pub fn reply(self, tag: &[u8]) -> Vec<u8> {
        match self {
            Refusal::CleartextAuth => reply::privacy_required(tag),
            Refusal::LiteralBeforeTls => {
                reply::tagged(tag, "BAD", "Literal not accepted before STARTTLS")
            }
            Refusal::LiteralNotAccepted => reply::tagged(tag, "BAD", "Literal not accepted here"),
            Refusal::AuthenticateMalformed => reply::authenticate_malformed(tag),
            Refusal::TlsAlreadyActive => reply::starttls_refused(tag),
            Refusal::StartTlsMalformed => reply::starttls_malformed(tag),
            Refusal::NotBeforeAuthentication => reply::not_before_authentication(tag),
            Refusal::TagReserved => reply::tagged(tag, "BAD", "Tag reserved"),
            Refusal::SaslIrUnsupported => reply::sasl_ir_unsupported(tag),
            Refusal::Throttled => reply::auth_throttled(tag),
        }
    }
}

/// What the machine does with the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Answer here ([`Local::reply`]); nothing reaches the backend.
    Local(Local),
    /// Answer with [`Refusal::reply`]; nothing reaches the backend.
    Refuse(Refusal),
    /// Write `+` and read the literal's octets.
    AcceptLiteral,
    /// Send the client's ID with mailfront's fields added; mailfront's fields are then sent.
    ForwardId,
    /// Hold the encoded login until it is charged; the answer is [`Input::Charged`].
    ChargeLogin,
    /// Send the command, re-encoded.
    Forward,
}

/// The gate. Pure: the same state and input always give the same verdict.
pub fn decide(state: &GateState, input: Input<'_>) -> Verdict {
    match input {
        Input::Literal { name } => literal(state, name),
        Input::Charged { granted: true } => Verdict::Forward,
        Input::Charged { granted: false } => Verdict::Refuse(Refusal::Throttled),
        Input::Command { tag, command } => decide_command(state, tag, command),
    }
}

/// Rule 1.
fn literal(state: &GateState, name: &[u8]) -> Verdict {
    let is = |word: &[u8]| name.eq_ignore_ascii_case(word);
    match (state.tls, is(b"LOGIN") || is(b"AUTHENTICATE")) {
        (false, true) => Verdict::Refuse(Refusal::CleartextAuth),
        (false, false) => Verdict::Refuse(Refusal::LiteralBeforeTls),
        (true, _) if is(b"LOGIN") || is(b"ID") => Verdict::AcceptLiteral,
        (true, _) if is(b"AUTHENTICATE") => Verdict::Refuse(Refusal::AuthenticateMalformed),
        (true, _) => Verdict::Refuse(Refusal::LiteralNotAccepted),
    }
}

fn decide_command(state: &GateState, tag: &[u8], command: &Command) -> Verdict {
    // 2. mailfront's own tags.
    if state.tls && id::is_mailfront_tag(tag) {
        return Verdict::Refuse(Refusal::TagReserved);
    }
    match command {
        // 3. STARTTLS.
        Command::StartTls if state.tls => Verdict::Refuse(Refusal::TlsAlreadyActive),
        Command::StartTls => Verdict::Local(Local::StartTls),
        // 4. Credentials before TLS.
        Command::Login { .. } | Command::Authenticate { .. } if !state.tls => {
            Verdict::Refuse(Refusal::CleartextAuth)
        }
        // 5. The cleartext dialogue.
        Command::Capability if !state.tls => Verdict::Local(Local::Capability),
        Command::Noop if !state.tls => Verdict::Local(Local::Noop),
        Command::Logout if !state.tls => Verdict::Local(Local::Logout),
        Command::Id(_) if !state.tls => Verdict::Local(Local::IdNil),
        // 6. ID over TLS.
        Command::Id(_) if state.backend_id && !state.id_sent => Verdict::ForwardId,
        Command::Id(_) => Verdict::Local(Local::IdNil),
        // 7. SASL-IR the backend does not take.
        Command::Authenticate {
            initial_response: Some(_),
            ..
        } if !state.backend_sasl_ir => Verdict::Refuse(Refusal::SaslIrUnsupported),
        // 8. Logins are charged first.
        Command::Login { .. } | Command::Authenticate { .. } => Verdict::ChargeLogin,
        // 9. What the not-authenticated state takes.
        Command::Capability | Command::Noop | Command::Logout => Verdict::Forward,
        // 10. Everything else.
        Command::Other { name } if name.eq_ignore_ascii_case(b"STARTTLS") => {
            Verdict::Refuse(Refusal::StartTlsMalformed)
        }
        Command::Other { .. } => Verdict::Refuse(Refusal::NotBeforeAuthentication),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::imap::id::IdCommand;

    /// Before TLS; the backend flags cannot matter (there is no backend yet).
    const CLEARTEXT: GateState = GateState {
        tls: false,
        backend_id: false,
        backend_sasl_ir: false,
        id_sent: false,
    };
    /// TLS, a backend offering ID and SASL-IR, nothing of mailfront's sent yet.
    const TLS_FULL: GateState = GateState {
        tls: true,
        backend_id: true,
        backend_sasl_ir: true,
        id_sent: false,
    };
    /// TLS, a backend offering neither ID nor SASL-IR.
    const TLS_BARE: GateState = GateState {
        tls: true,
        backend_id: false,
        backend_sasl_ir: false,
        id_sent: false,
    };
    /// TLS, a backend offering ID and SASL-IR, mailfront's ID already sent.
    const TLS_ID_SENT: GateState = GateState {
        tls: true,
        backend_id: true,
        backend_sasl_ir: true,
        id_sent: true,
    };
    const STATES: [GateState; 4] = [CLEARTEXT, TLS_FULL, TLS_BARE, TLS_ID_SENT];

    fn login() -> Command {
        Command::Login {
            username: b"alice".to_vec(),
            password: b"secret".to_vec(),
        }
    }

    fn authenticate(ir: Option<&[u8]>) -> Command {
        Command::Authenticate {
            mechanism: b"PLAIN".to_vec(),
            initial_response: ir.map(<[u8]>::to_vec),
        }
    }

    fn id() -> Command {
        Command::Id(IdCommand {
            tag: b"a".to_vec(),
            params: None,
        })
    }

    fn other(name: &[u8]) -> Command {
        Command::Other {
            name: name.to_vec(),
        }
    }

    #[test]
    fn every_state_and_command_has_its_verdict() {
        use Local as L;
        use Refusal as R;
        use Verdict::{AcceptLiteral, ChargeLogin, Forward, ForwardId};
        let local = Verdict::Local;
        let refuse = Verdict::Refuse;
        // Per row: the input, then the verdict in CLEARTEXT, TLS_FULL, TLS_BARE, TLS_ID_SENT.
        let commands: Vec<(&[u8], Command, [Verdict; 4])> = vec![
            (
                b"a",
                Command::Capability,
                [local(L::Capability), Forward, Forward, Forward],
            ),
            (
                b"a",
                Command::Noop,
                [local(L::Noop), Forward, Forward, Forward],
            ),
            (
                b"a",
                Command::Logout,
                [local(L::Logout), Forward, Forward, Forward],
            ),
            (
                b"a",
                Command::StartTls,
                [
                    local(L::StartTls),
                    refuse(R::TlsAlreadyActive),
                    refuse(R::TlsAlreadyActive),
                    refuse(R::TlsAlreadyActive),
                ],
            ),
            (b"a", other(b"starttls"), [refuse(R::StartTlsMalformed); 4]),
            (
                b"a",
                login(),
                [
                    refuse(R::CleartextAuth),
                    ChargeLogin,
                    ChargeLogin,
                    ChargeLogin,
                ],
            ),
            (
                b"a",
                authenticate(None),
                [
                    refuse(R::CleartextAuth),
                    ChargeLogin,
                    ChargeLogin,
                    ChargeLogin,
                ],
            ),
            (
                b"a",
                authenticate(Some(b"AGFsaWNlAHNlY3JldA==")),
                [
                    refuse(R::CleartextAuth),
                    ChargeLogin,
                    refuse(R::SaslIrUnsupported),
                    ChargeLogin,
                ],
            ),
            (
                b"a",
                id(),
                [local(L::IdNil), ForwardId, local(L::IdNil), local(L::IdNil)],
            ),
            (
                b"a",
                other(b"SELECT"),
                [refuse(R::NotBeforeAuthentication); 4],
            ),
            (
                b"a",
                other(b"XCLIENT"),
                [refuse(R::NotBeforeAuthentication); 4],
            ),
            // mailfront's own tag shape: reserved once a backend could answer it.
            (
                b"mf0123456789abcdef",
                Command::Noop,
                [
                    local(L::Noop),
                    refuse(R::TagReserved),
                    refuse(R::TagReserved),
                    refuse(R::TagReserved),
                ],
            ),
            (
                b"mf0123456789abcdef",
                login(),
                [
                    refuse(R::CleartextAuth),
                    refuse(R::TagReserved),
                    refuse(R::TagReserved),
                    refuse(R::TagReserved),
                ],
            ),
        ];
        for (tag, command, want) in &commands {
            for (state, want) in STATES.iter().zip(want) {
                let input = Input::Command { tag, command };
                assert_eq!(decide(state, input), *want, "{command:?} in {state:?}");
            }
        }

        let literals: Vec<(&[u8], [Verdict; 4])> = vec![
            (
                b"LOGIN",
                [
                    refuse(R::CleartextAuth),
                    AcceptLiteral,
                    AcceptLiteral,
                    AcceptLiteral,
                ],
            ),
            (
                b"login",
                [
                    refuse(R::CleartextAuth),
                    AcceptLiteral,
                    AcceptLiteral,
                    AcceptLiteral,
                ],
            ),
            (
                b"ID",
                [
                    refuse(R::LiteralBeforeTls),
                    AcceptLiteral,
                    AcceptLiteral,
                    AcceptLiteral,
                ],
            ),
            (
                b"Authenticate",
                [
                    refuse(R::CleartextAuth),
                    refuse(R::AuthenticateMalformed),
                    refuse(R::AuthenticateMalformed),
                    refuse(R::AuthenticateMalformed),
                ],
            ),
            (
                b"SELECT",
                [
                    refuse(R::LiteralBeforeTls),
                    refuse(R::LiteralNotAccepted),
                    refuse(R::LiteralNotAccepted),
                    refuse(R::LiteralNotAccepted),
                ],
            ),
        ];
        for (name, want) in &literals {
            for (state, want) in STATES.iter().zip(want) {
                let input = Input::Literal { name };
                assert_eq!(decide(state, input), *want, "literal {name:?} in {state:?}");
            }
        }

        for state in &STATES {
            let granted = Input::Charged { granted: true };
            let refused = Input::Charged { granted: false };
            assert_eq!(decide(state, granted), Forward);
            assert_eq!(decide(state, refused), refuse(R::Throttled));
        }
    }

    #[test]
    fn before_tls_the_backend_flags_change_nothing() {
        let mut inputs: Vec<Command> = vec![
            Command::Capability,
            Command::Noop,
            Command::Logout,
            Command::StartTls,
            login(),
            authenticate(Some(b"=")),
            id(),
            other(b"SELECT"),
        ];
        inputs.push(authenticate(None));
        for bits in 0..8u8 {
            let state = GateState {
                tls: false,
                backend_id: bits & 1 != 0,
                backend_sasl_ir: bits & 2 != 0,
                id_sent: bits & 4 != 0,
            };
            for command in &inputs {
                let input = Input::Command { tag: b"a", command };
                assert_eq!(
                    decide(&state, input),
                    decide(&CLEARTEXT, input),
                    "{command:?}"
                );
                let verdict = decide(&state, input);
                assert!(
                    !matches!(
                        verdict,
                        Verdict::Forward | Verdict::ForwardId | Verdict::ChargeLogin
                    ),
                    "nothing goes to a backend before TLS: {command:?}"
                );
            }
        }
    }

    #[test]
    fn every_refusal_is_a_tagged_reply() {
        for refusal in [
            Refusal::CleartextAuth,
            Refusal::LiteralBeforeTls,
            Refusal::LiteralNotAccepted,
            Refusal::AuthenticateMalformed,
            Refusal::TlsAlreadyActive,
            Refusal::StartTlsMalformed,
            Refusal::NotBeforeAuthentication,
            Refusal::TagReserved,
            Refusal::SaslIrUnsupported,
            Refusal::Throttled,
        ] {
            let reply = refusal.reply(b"t1");
            assert!(reply.starts_with(b"t1 NO ") || reply.starts_with(b"t1 BAD "));
            assert!(reply.ends_with(b"\r\n"), "{refusal:?}");
        }
        assert_eq!(
            Local::Capability.reply(b"a"),
            b"* CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED\r\na OK CAPABILITY completed\r\n"
        );
        assert_eq!(
            Local::Logout.reply(b"a"),
            b"* BYE Logging out\r\na OK LOGOUT completed\r\n"
        );
    }
}
