//! What the IMAP and POP3 pre-login phases share: the vocabulary between a protocol's sans-I/O
//! not-authenticated state machine and the one I/O loop that drives it.
//!
//! Both protocols run the same phases before login (RFC 8314 §4.1): on a STARTTLS listener a
//! cleartext dialogue answered locally with no backend, the TLS handshake, the backend connection,
//! then only commands the gate parsed reach the backend, re-encoded, until the backend accepts a
//! login and the session becomes a plain relay. The phases and their transitions are the same;
//! only the bytes differ. So a protocol supplies a [`Machine`] (its parser, gate and reply texts)
//! and the loop that moves bytes, runs the handshake, connects and keeps the timers is written
//! once.

use crate::metrics::IdSource;

/// What the driver must do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Keep reading (and write whatever output is pending).
    Run,
    /// Connect to the backend, then call [`Machine::backend_connected`].
    Connect,
    /// Write pending output, then run the TLS handshake on the client stream and call
    /// [`Machine::tls_started`]. Everything the client pipelined after STARTTLS/STLS was
    /// dropped.
    StartTls,
    /// The backend accepted a login: write pending output, then relay, sending
    /// [`Machine::held`] first.
    Authenticated,
    /// Write pending output and close.
    End(End),
}

/// Why the not-authenticated phase ended without a login.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// LOGOUT/QUIT, or the client closed.
    ClientClosed,
    BackendClosed,
    /// The backend refused service in a greeting the client never sees (POP3 `-ERR` after STLS,
    /// when the client already had mailfront's greeting): the client was told the service is
    /// unavailable.
    BackendUnavailable,
    /// The backend broke the protocol (or greeted with IMAP PREAUTH).
    BackendProtocol(String),
    /// The client broke the protocol or a limit badly enough to close.
    ProtocolViolation(String),
}

/// Facts for metrics and logs, drained by the driver with [`Machine::take_notices`]. Never a
/// credential: mechanisms are labels built from parsed commands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// The backend answered a login (IMAP LOGIN/AUTHENTICATE, POP3 PASS/APOP/AUTH).
    Auth { ok: bool, mechanism: String },
    /// A login refused because TLS is not active (RFC 8314 §4.1).
    CleartextAuthRefused { mechanism: String },
    /// IMAP only: an ID carrying the `tls` field went to the backend.
    IdFieldAdded(IdSource),
}

/// A protocol's not-authenticated state, as the shared driver loop sees it.
///
/// The driver writes [`Machine::take_to_backend`] then [`Machine::take_to_client`] after every
/// call, and acts on [`Machine::next`]. The machine never touches a socket or a clock: it says
/// when the idle timer restarts ([`Machine::client_input`], [`Machine::backend_input`]) and whom
/// a timeout is charged to ([`Machine::waiting_for_backend`]).
pub trait Machine {
    /// The protocol's name in logs and metric labels (`imap`, `pop3`).
    const PROTOCOL: &'static str;

    fn next(&self) -> Next;

    /// Bytes to write to the client now.
    fn take_to_client(&mut self) -> Vec<u8>;

    /// Bytes to write to the backend now.
    fn take_to_backend(&mut self) -> Vec<u8>;

    fn take_notices(&mut self) -> Vec<Notice>;

    /// Client bytes arrived. Returns whether the idle timer restarts: bytes the machine only
    /// holds must not keep a session alive while it waits for the backend.
    fn client_input(&mut self, bytes: &[u8]) -> bool;

    /// Backend bytes arrived. Returns whether the idle timer restarts.
    fn backend_input(&mut self, bytes: &[u8]) -> bool;

    /// The driver connected to the backend after [`Next::Connect`].
    fn backend_connected(&mut self);

    /// The backend closed its side.
    fn backend_closed(&mut self);

    /// The handshake after [`Next::StartTls`] succeeded, with this IANA cipher suite name.
    fn tls_started(&mut self, cipher: String);

    /// Once [`Next::Authenticated`]: client bytes sent after the login command, and backend
    /// bytes after its completion. Both go out before the plain relay.
    fn held(&mut self) -> (Vec<u8>, Vec<u8>);

    /// Whether the driver should read from the client now: not while `hold_limit` client bytes
    /// are held, and never after STARTTLS (the handshake reads the socket itself).
    fn wants_client_input(&self, hold_limit: usize) -> bool;

    /// Whether the next thing expected is the backend's: a timeout then is the backend's
    /// ([`Machine::bye_unavailable`]), otherwise the client's ([`Machine::bye_idle`]).
    fn waiting_for_backend(&self) -> bool;

    /// Sent before closing when the backend cannot be reached, fails or stays silent.
    fn bye_unavailable() -> Vec<u8>;

    /// Sent before closing a client that was silent too long.
    fn bye_idle() -> Vec<u8>;

    /// Sent before closing because the proxy is shutting down.
    fn bye_shutdown() -> Vec<u8>;
}
