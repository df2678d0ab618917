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
use crate::smtp::receiver::LineError;

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

/// Why a line is answered by mailfront and never forwarded. The reply bytes, the log line and
/// the metrics all come from this one value, so a driver never works out the reason again
/// from the bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// XCLIENT/XFORWARD from a client: the backend trusts them from mailfront only.
    TrustedPeerCommand,
    /// STARTTLS when TLS is already active (implicit or upgraded).
    TlsAlreadyActive,
    /// AUTH (or a SASL line) before TLS, whatever the credential: RFC 8314 §4.1.
    CleartextAuth,
    /// Any other command that needs TLS first (RFC 3207 §4).
    MustStartTls,
    /// MAIL with REQUIRETLS where it cannot be honoured (RFC 8689).
    RequireTlsUnsupported,
    /// A line mailfront cannot judge safely or at all (bare CR/LF, NUL, bad MAIL/BDAT/STARTTLS).
    Syntax(SyntaxError),
    /// A command or SASL line over its limit.
    TooLong(LineError),
    /// A stateful command after STARTTLS before the new EHLO (RFC 3207 §4.2).
    SendEhloFirst,
    /// AUTH after a successful AUTH (RFC 4954 §4).
    AlreadyAuthenticated,
    /// BDAT when the backend does not offer CHUNKING.
    BdatNotSupported,
    /// RCPT, DATA or BDAT with no transaction open (no MAIL reached a backend yet).
    NeedMail,
    /// A command mailfront does not know, answered while no backend is connected.
    NotRecognized,
    /// On a listener that routes by user, a command that needs a login before one (MAIL where
    /// mail needs TLS, VRFY, EXPN, HELP): no backend is chosen before a login names the user.
    AuthRequired,
    /// On a listener that routes by user, AUTH with a mechanism whose first response does not
    /// name the user ([`crate::sasl::is_routable`]).
    MechanismNotRoutable,
}

impl Refusal {
    /// The reply mailfront writes for it.
    pub fn reply(self) -> &'static [u8] {
        match self {
            Refusal::TrustedPeerCommand => local_reply::COMMAND_NOT_RECOGNIZED,
            Refusal::TlsAlreadyActive => local_reply::TLS_ALREADY_ACTIVE,
            Refusal::CleartextAuth | Refusal::MustStartTls => local_reply::MUST_STARTTLS,
            Refusal::RequireTlsUnsupported => local_reply::REQUIRETLS_UNSUPPORTED,
            Refusal::Syntax(error) => error.reply(),
            Refusal::TooLong(error) => error.reply(),
            Refusal::SendEhloFirst => local_reply::SEND_EHLO_FIRST,
            Refusal::AlreadyAuthenticated => local_reply::ALREADY_AUTHENTICATED,
            Refusal::BdatNotSupported => local_reply::BDAT_NOT_SUPPORTED,
            Refusal::NeedMail => local_reply::NEED_MAIL,
            Refusal::NotRecognized => local_reply::COMMAND_NOT_RECOGNIZED,
            Refusal::AuthRequired => local_reply::AUTH_REQUIRED,
            Refusal::MechanismNotRoutable => local_reply::MECHANISM_NOT_ROUTABLE,
        }
    }

    /// A fixed name for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::TrustedPeerCommand => "trusted_peer_command",
            Refusal::TlsAlreadyActive => "tls_already_active",
            Refusal::CleartextAuth => "cleartext_auth",
            Refusal::MustStartTls => "must_starttls",
            Refusal::RequireTlsUnsupported => "requiretls_unsupported",
            Refusal::Syntax(SyntaxError::BareCr) => "bare_cr",
            Refusal::Syntax(SyntaxError::BareLf) => "bare_lf",
            Refusal::Syntax(SyntaxError::Nul) => "nul",
            Refusal::Syntax(_) => "syntax",
            Refusal::TooLong(_) => "too_long",
            Refusal::SendEhloFirst => "send_ehlo_first",
            Refusal::AlreadyAuthenticated => "already_authenticated",
            Refusal::BdatNotSupported => "bdat_not_supported",
            Refusal::NeedMail => "need_mail",
            Refusal::NotRecognized => "not_recognized",
            Refusal::AuthRequired => "auth_required",
            Refusal::MechanismNotRoutable => "mechanism_not_routable",
        }
    }
}

/// What the driver does with the line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Send the line to the backend and relay its reply in order.
    Forward,
    /// Answer the client with the refusal's reply (in order with pending backend replies); send
    /// nothing to the backend.
    Refuse(Refusal),
    /// A refused BDAT: answer the refusal and drop the next `octets` octets of client input.
    DiscardChunk { octets: u64, refusal: Refusal },
    /// Answer [`local_reply::STARTTLS_READY`], drop every byte buffered after the command, and
    /// run the TLS handshake; then set `client_tls` and `needs_ehlo`.
    StartTls,
}

/// The gate. Pure: the same state and line always give the same verdict.
pub fn decide(state: &GateState, input: ClientInput<'_>) -> Verdict {
    match input {
        ClientInput::SaslResponse(SaslResponse::Invalid(error)) => {
            Verdict::Refuse(Refusal::Syntax(error))
        }
        ClientInput::SaslResponse(_) if state.client_tls => Verdict::Forward,
        ClientInput::SaslResponse(_) => Verdict::Refuse(Refusal::CleartextAuth),
        ClientInput::Command(command) => decide_command(state, command),
    }
}

/// A command or SASL line over its limit. Before TLS an over-long AUTH gets the same answer
/// as any AUTH (RFC 8314 §4.1: one indication whatever the credential, its length included).
pub fn too_long(state: &GateState, error: LineError) -> Refusal {
    match error {
        LineError::AuthTooLong { .. } if !state.client_tls => Refusal::CleartextAuth,
        _ => Refusal::TooLong(error),
    }
}

fn decide_command(state: &GateState, command: &Command) -> Verdict {
    let verb = command.verb();
    let refuse = |refusal: Refusal| match command {
        Command::Bdat(bdat) => Verdict::DiscardChunk {
            octets: bdat.size,
            refusal,
        },
        _ => Verdict::Refuse(refusal),
    };

    // 1. Trusted-peer commands never pass.
    if matches!(verb, Verb::Xclient | Verb::Xforward) {
        return Verdict::Refuse(Refusal::TrustedPeerCommand);
    }

    // 2. STARTTLS is answered here, never forwarded.
    if verb == Verb::StartTls {
        return if state.client_tls || state.listener == TlsMode::Implicit {
            Verdict::Refuse(Refusal::TlsAlreadyActive)
        } else if let Command::Invalid { error, .. } = command {
            Verdict::Refuse(Refusal::Syntax(*error))
        } else {
            Verdict::StartTls
        };
    }

    // 3. Before TLS.
    if !state.client_tls {
        match verb {
            Verb::Ehlo | Verb::Helo | Verb::Noop | Verb::Rset | Verb::Quit => {}
            Verb::Auth => return Verdict::Refuse(Refusal::CleartextAuth),
            _ if state.require_tls_for_mail => return refuse(Refusal::MustStartTls),
            Verb::Mail | Verb::Rcpt | Verb::Data | Verb::Bdat => {
                if matches!(command, Command::Mail(mail) if mail.requiretls) {
                    return Verdict::Refuse(Refusal::RequireTlsUnsupported);
                }
            }
            _ => return Verdict::Refuse(Refusal::MustStartTls),
        }
    }

    // 4. Unusable syntax.
    if let Command::Invalid { error, .. } = command {
        return Verdict::Refuse(Refusal::Syntax(*error));
    }

    // 5. RFC 3207 §4.2: a new EHLO after STARTTLS before anything stateful.
    if state.needs_ehlo
        && matches!(
            verb,
            Verb::Mail | Verb::Rcpt | Verb::Data | Verb::Bdat | Verb::Auth
        )
    {
        return refuse(Refusal::SendEhloFirst);
    }

    match command {
        // 6.
        Command::Auth(_) if state.authenticated => Verdict::Refuse(Refusal::AlreadyAuthenticated),
        // 7.
        Command::Mail(mail) if mail.requiretls && !state.backend_requiretls => {
            Verdict::Refuse(Refusal::RequireTlsUnsupported)
        }
        // 8.
        Command::Bdat(_) if !state.backend_chunking => refuse(Refusal::BdatNotSupported),
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
    const fn refuse(refusal: Refusal) -> Verdict {
        Verdict::Refuse(refusal)
    }

    /// The bytes the client gets for a refused line (empty when nothing is refused).
    fn reply_of(verdict: Verdict) -> &'static [u8] {
        match verdict {
            Verdict::Refuse(refusal) | Verdict::DiscardChunk { refusal, .. } => refusal.reply(),
            Verdict::Forward | Verdict::StartTls => b"",
        }
    }

    #[test]
    fn refusals_before_tls_share_a_reply_but_not_a_reason() {
        assert_eq!(Refusal::CleartextAuth.reply(), MUST_STARTTLS);
        assert_eq!(Refusal::MustStartTls.reply(), MUST_STARTTLS);
        assert_ne!(
            Refusal::CleartextAuth.as_str(),
            Refusal::MustStartTls.as_str()
        );
    }

    #[test]
    fn an_over_long_auth_line_before_tls_is_refused_like_any_auth() {
        let error = LineError::AuthTooLong { limit: 12288 };
        assert_eq!(too_long(&plain(), error), Refusal::CleartextAuth);
        assert_eq!(too_long(&upgraded(), error), Refusal::TooLong(error));
        assert_eq!(too_long(&upgraded(), error).reply(), AUTH_LINE_TOO_LONG);
        let long = LineError::CommandTooLong { limit: 512 };
        assert_eq!(too_long(&plain(), long), Refusal::TooLong(long));
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
            (
                plain(),
                "STARTTLS now",
                refuse(Refusal::Syntax(SyntaxError::StartTls)),
            ),
            (
                plain(),
                "AUTH PLAIN AGFsaWNlAHNlY3JldA==",
                refuse(Refusal::CleartextAuth),
            ),
            (
                plain(),
                "AUTH PLAIN !!!not-base64",
                refuse(Refusal::CleartextAuth),
            ),
            (plain(), "AUTH LOGIN", refuse(Refusal::CleartextAuth)),
            (plain(), "AUTH", refuse(Refusal::CleartextAuth)),
            (plain(), "MAIL FROM:<a@b>", refuse(Refusal::MustStartTls)),
            (
                plain(),
                "MAIL FROM:<a@b> REQUIRETLS",
                refuse(Refusal::MustStartTls),
            ),
            (plain(), "MAIL nonsense", refuse(Refusal::MustStartTls)),
            (plain(), "RCPT TO:<a@b>", refuse(Refusal::MustStartTls)),
            (plain(), "DATA", refuse(Refusal::MustStartTls)),
            (plain(), "VRFY bob", refuse(Refusal::MustStartTls)),
            (plain(), "HELP", refuse(Refusal::MustStartTls)),
            (plain(), "FOO", refuse(Refusal::MustStartTls)),
            (
                plain(),
                "BDAT 10 LAST",
                Verdict::DiscardChunk {
                    octets: 10,
                    refusal: Refusal::MustStartTls,
                },
            ),
            (
                plain(),
                "XCLIENT LOGIN=victim",
                refuse(Refusal::TrustedPeerCommand),
            ),
            (
                plain(),
                "XFORWARD ADDR=1.2.3.4",
                refuse(Refusal::TrustedPeerCommand),
            ),
            (
                plain(),
                "NOOP\rMAIL FROM:<a@b>",
                refuse(Refusal::Syntax(SyntaxError::BareCr)),
            ),
            // Before TLS with require_tls_for_mail: false.
            (lax, "MAIL FROM:<a@b>", FORWARD),
            (
                lax,
                "MAIL FROM:<a@b> REQUIRETLS",
                refuse(Refusal::RequireTlsUnsupported),
            ),
            (lax, "RCPT TO:<a@b>", FORWARD),
            (lax, "DATA", FORWARD),
            (
                lax,
                "AUTH PLAIN AGFsaWNlAHNlY3JldA==",
                refuse(Refusal::CleartextAuth),
            ),
            (
                lax,
                "XCLIENT ADDR=1.2.3.4",
                refuse(Refusal::TrustedPeerCommand),
            ),
            (lax, "VRFY bob", refuse(Refusal::MustStartTls)),
            (lax, "FOO", refuse(Refusal::MustStartTls)),
            (lax, "NOOP", FORWARD),
            (
                lax,
                "MAIL TO:<x>",
                refuse(Refusal::Syntax(SyntaxError::Mail)),
            ),
            // After STARTTLS, before the new EHLO.
            (
                after_starttls,
                "MAIL FROM:<a@b>",
                refuse(Refusal::SendEhloFirst),
            ),
            (
                after_starttls,
                "RCPT TO:<a@b>",
                refuse(Refusal::SendEhloFirst),
            ),
            (after_starttls, "DATA", refuse(Refusal::SendEhloFirst)),
            (
                after_starttls,
                "AUTH PLAIN AGFsaWNlAHNlY3JldA==",
                refuse(Refusal::SendEhloFirst),
            ),
            (
                after_starttls,
                "BDAT 3",
                Verdict::DiscardChunk {
                    octets: 3,
                    refusal: Refusal::SendEhloFirst,
                },
            ),
            (after_starttls, "EHLO client", FORWARD),
            (after_starttls, "NOOP", FORWARD),
            (
                after_starttls,
                "STARTTLS",
                refuse(Refusal::TlsAlreadyActive),
            ),
            // After STARTTLS and EHLO.
            (upgraded(), "AUTH PLAIN AGFsaWNlAHNlY3JldA==", FORWARD),
            (upgraded(), "AUTH LOGIN", FORWARD),
            (upgraded(), "MAIL FROM:<a@b> SIZE=100", FORWARD),
            (
                upgraded(),
                "MAIL FROM:<a@b> REQUIRETLS",
                refuse(Refusal::RequireTlsUnsupported),
            ),
            (
                upgraded(),
                "MAIL FROM:<a@b> requiretls",
                refuse(Refusal::RequireTlsUnsupported),
            ),
            (upgraded(), "RCPT TO:<a@b>", FORWARD),
            (upgraded(), "DATA", FORWARD),
            (upgraded(), "BDAT 5 LAST", FORWARD),
            (upgraded(), "VRFY bob", FORWARD),
            (upgraded(), "FOO bar", FORWARD),
            (upgraded(), "STARTTLS", refuse(Refusal::TlsAlreadyActive)),
            (upgraded(), "STARTTLS x", refuse(Refusal::TlsAlreadyActive)),
            (
                upgraded(),
                "XCLIENT LOGIN=victim",
                refuse(Refusal::TrustedPeerCommand),
            ),
            (
                upgraded(),
                "xforward NAME=x",
                refuse(Refusal::TrustedPeerCommand),
            ),
            (
                upgraded(),
                "BDAT x",
                refuse(Refusal::Syntax(SyntaxError::Bdat)),
            ),
            (
                upgraded(),
                "MAIL <a@b>",
                refuse(Refusal::Syntax(SyntaxError::Mail)),
            ),
            (rtls, "MAIL FROM:<a@b> REQUIRETLS", FORWARD),
            (
                no_chunking,
                "BDAT 7",
                Verdict::DiscardChunk {
                    octets: 7,
                    refusal: Refusal::BdatNotSupported,
                },
            ),
            (no_chunking, "DATA", FORWARD),
            // Authenticated.
            (
                authed,
                "AUTH PLAIN AGFsaWNlAHNlY3JldA==",
                refuse(Refusal::AlreadyAuthenticated),
            ),
            (
                authed,
                "XCLIENT LOGIN=other",
                refuse(Refusal::TrustedPeerCommand),
            ),
            (authed, "MAIL FROM:<a@b>", FORWARD),
            // Implicit TLS.
            (implicit(), "STARTTLS", refuse(Refusal::TlsAlreadyActive)),
            (implicit(), "AUTH PLAIN AGFsaWNlAHNlY3JldA==", FORWARD),
            (implicit(), "MAIL FROM:<a@b>", FORWARD),
            (
                implicit(),
                "XCLIENT ADDR=1.2.3.4",
                refuse(Refusal::TrustedPeerCommand),
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
                    refuse(Refusal::CleartextAuth),
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
                    refuse(Refusal::TrustedPeerCommand)
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
                refuse(Refusal::CleartextAuth)
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
                    reply_of(decide(&state, ClientInput::Command(&command))),
                    expected,
                    "{bytes:?}"
                );
            }
            for state in [lax, plain()] {
                let before = decide(&state, ClientInput::Command(&command));
                assert!(reply_of(before) == expected || before == refuse(Refusal::MustStartTls));
            }
        }
        // STARTTLS ended by a bare LF is not a STARTTLS: no handshake starts.
        let command = Command::from_line(&line(b"STARTTLS\n", LineMode::Command));
        assert_eq!(
            decide(&plain(), ClientInput::Command(&command)),
            refuse(Refusal::Syntax(SyntaxError::BareLf))
        );
        for bytes in [
            &b"AUTH PLAIN AGFsaWNl\n"[..],
            b"AUTH PLAIN a\rb\r\n",
            b"AUTH\0\r\n",
        ] {
            let command = Command::from_line(&line(bytes, LineMode::Command));
            // The same 530 whatever the framing; `AUTH\0` is no AUTH verb, so it is not
            // counted as a cleartext authentication attempt.
            let verdict = decide(&plain(), ClientInput::Command(&command));
            assert_eq!(reply_of(verdict), MUST_STARTTLS, "{bytes:?}");
            if command.verb() == Verb::Auth {
                assert_eq!(verdict, refuse(Refusal::CleartextAuth), "{bytes:?}");
            }
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
                reply_of(decide(&upgraded(), ClientInput::SaslResponse(response))),
                expected,
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
