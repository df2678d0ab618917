//! Why a session ended and on which side: the `reason` and `side` of the close log line and of
//! `mailfront_sessions_closed_total`. Below the session and metrics layers, so both can name it.

use std::io;

/// Where the event that ended a session happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    /// The client connection: its bytes, its TCP, or its TLS records after the handshake.
    Client,
    /// The backend connection.
    Backend,
    /// The client's TLS handshake (implicit, or after STARTTLS/STLS).
    Tls,
    /// mailfront itself: a graceful shutdown.
    Proxy,
}

impl Side {
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Backend => "backend",
            Side::Tls => "tls",
            Side::Proxy => "proxy",
        }
    }
}

/// Why a session ended, for the close log line and the close counter.
///
/// The `reason` label values ([`EndReason::as_str`]) are the ones operators alert on; a new
/// cause gets a new side or a new value, never a changed meaning for an old one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndReason {
    /// The client said goodbye (QUIT/LOGOUT) or closed its connection: a TCP FIN, or a TLS close
    /// with or without close_notify (see [`EndReason::client_io`]).
    ClientClosed,
    BackendClosed,
    /// The client sent nothing, or read nothing, within the idle timeout.
    ClientIdle,
    /// The client had not authenticated within `timeouts.login` of its connection, however much
    /// it sent meanwhile.
    LoginTimeout,
    /// `user_lookup` refused a login without `Auth-Wait`: the session ends after the refusal,
    /// as nginx's does.
    LoginRefused,
    BackendTimeout,
    BackendUnavailable,
    /// The handshake failed; the detail is its reason class and cause.
    TlsHandshakeFailed(String),
    Shutdown,
    /// A peer broke the protocol or a limit badly enough that we closed: the client (a command
    /// line or limit) or the backend (a reply mailfront cannot frame).
    ProtocolViolation {
        side: Side,
        detail: String,
    },
    /// A read or write failed on one side (a reset, a TLS record error).
    Io {
        side: Side,
        error: String,
    },
}

impl EndReason {
    /// A failed read or write on the client connection.
    ///
    /// A TLS client that closes TCP without close_notify (rustls reports `UnexpectedEof`) has
    /// closed its connection, just as a cleartext client's FIN does: most clients (mbsync,
    /// offlineimap, neomutt, s-nail) do exactly that after LOGOUT or QUIT. RFC 8446 §6.1 makes
    /// the missing alert matter to an application that could be fooled by a truncated
    /// response; mailfront consumes nothing after the client's last byte (the backend sees the
    /// same end either way), so it is a normal close here, not an I/O error.
    /// A write that timed out is a client that stopped reading: idle.
    pub fn client_io(error: &io::Error) -> EndReason {
        match error.kind() {
            io::ErrorKind::UnexpectedEof => EndReason::ClientClosed,
            io::ErrorKind::TimedOut => EndReason::ClientIdle,
            _ => EndReason::Io {
                side: Side::Client,
                error: error.to_string(),
            },
        }
    }

    /// A failed read or write on the backend connection; a write that timed out is a backend
    /// that stopped reading.
    pub fn backend_io(error: &io::Error) -> EndReason {
        match error.kind() {
            io::ErrorKind::TimedOut => EndReason::BackendTimeout,
            _ => EndReason::Io {
                side: Side::Backend,
                error: error.to_string(),
            },
        }
    }

    /// The client broke the protocol or a limit.
    pub fn client_violation(detail: impl Into<String>) -> EndReason {
        EndReason::ProtocolViolation {
            side: Side::Client,
            detail: detail.into(),
        }
    }

    /// The backend sent something mailfront cannot frame.
    pub fn backend_violation(detail: impl Into<String>) -> EndReason {
        EndReason::ProtocolViolation {
            side: Side::Backend,
            detail: detail.into(),
        }
    }

    /// The `reason` label.
    pub fn as_str(&self) -> &'static str {
        self.class().reason()
    }

    /// The `side` label.
    pub fn side(&self) -> Side {
        self.class().side()
    }

    /// The free-text detail of the close log line (empty when the reason says it all).
    pub fn detail(&self) -> &str {
        match self {
            EndReason::ProtocolViolation { detail, .. }
            | EndReason::Io { error: detail, .. }
            | EndReason::TlsHandshakeFailed(detail) => detail,
            _ => "",
        }
    }

    /// The reason and side without their detail: one series of the close counter.
    pub fn class(&self) -> CloseClass {
        match self {
            EndReason::ClientClosed => CloseClass::ClientClosed,
            EndReason::BackendClosed => CloseClass::BackendClosed,
            EndReason::ClientIdle => CloseClass::ClientIdle,
            EndReason::LoginTimeout => CloseClass::LoginTimeout,
            EndReason::LoginRefused => CloseClass::LoginRefused,
            EndReason::BackendTimeout => CloseClass::BackendTimeout,
            EndReason::BackendUnavailable => CloseClass::BackendUnavailable,
            EndReason::TlsHandshakeFailed(_) => CloseClass::TlsHandshakeFailed,
            EndReason::Shutdown => CloseClass::Shutdown,
            EndReason::ProtocolViolation {
                side: Side::Backend,
                ..
            } => CloseClass::BackendProtocolViolation,
            // Only the two peers break the protocol; the other sides are never constructed.
            EndReason::ProtocolViolation { .. } => CloseClass::ClientProtocolViolation,
            EndReason::Io {
                side: Side::Backend,
                ..
            } => CloseClass::BackendIo,
            EndReason::Io { .. } => CloseClass::ClientIo,
        }
    }
}

/// Every (reason, side) pair a session can end with: the fixed label set of the close counter,
/// so each series exists from the start and no other can appear.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloseClass {
    ClientClosed,
    BackendClosed,
    ClientIdle,
    BackendTimeout,
    BackendUnavailable,
    TlsHandshakeFailed,
    Shutdown,
    ClientProtocolViolation,
    BackendProtocolViolation,
    ClientIo,
    BackendIo,
    LoginTimeout,
    LoginRefused,
}

impl CloseClass {
    pub const ALL: [CloseClass; 13] = [
        CloseClass::ClientClosed,
        CloseClass::BackendClosed,
        CloseClass::ClientIdle,
        CloseClass::BackendTimeout,
        CloseClass::BackendUnavailable,
        CloseClass::TlsHandshakeFailed,
        CloseClass::Shutdown,
        CloseClass::ClientProtocolViolation,
        CloseClass::BackendProtocolViolation,
        CloseClass::ClientIo,
        CloseClass::BackendIo,
        CloseClass::LoginTimeout,
        CloseClass::LoginRefused,
    ];

    /// Position in [`CloseClass::ALL`], for an array of counter handles.
    pub fn index(self) -> usize {
        self as usize
    }

    pub fn reason(self) -> &'static str {
        match self {
            CloseClass::ClientClosed => "client_closed",
            CloseClass::BackendClosed => "backend_closed",
            CloseClass::ClientIdle => "client_idle",
            CloseClass::LoginTimeout => "login_timeout",
            CloseClass::LoginRefused => "login_refused",
            CloseClass::BackendTimeout => "backend_timeout",
            CloseClass::BackendUnavailable => "backend_unavailable",
            CloseClass::TlsHandshakeFailed => "tls_handshake_failed",
            CloseClass::Shutdown => "shutdown",
            CloseClass::ClientProtocolViolation | CloseClass::BackendProtocolViolation => {
                "protocol_violation"
            }
            CloseClass::ClientIo | CloseClass::BackendIo => "io_error",
        }
    }

    pub fn side(self) -> Side {
        match self {
            CloseClass::ClientClosed
            | CloseClass::ClientIdle
            | CloseClass::LoginTimeout
            | CloseClass::LoginRefused
            | CloseClass::ClientProtocolViolation
            | CloseClass::ClientIo => Side::Client,
            CloseClass::BackendClosed
            | CloseClass::BackendTimeout
            | CloseClass::BackendUnavailable
            | CloseClass::BackendProtocolViolation
            | CloseClass::BackendIo => Side::Backend,
            CloseClass::TlsHandshakeFailed => Side::Tls,
            CloseClass::Shutdown => Side::Proxy,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_labels_keep_their_values_and_gain_a_side() {
        let cases = [
            (EndReason::ClientClosed, "client_closed", "client"),
            (EndReason::BackendClosed, "backend_closed", "backend"),
            (EndReason::ClientIdle, "client_idle", "client"),
            (EndReason::LoginTimeout, "login_timeout", "client"),
            (EndReason::LoginRefused, "login_refused", "client"),
            (EndReason::BackendTimeout, "backend_timeout", "backend"),
            (
                EndReason::BackendUnavailable,
                "backend_unavailable",
                "backend",
            ),
            (
                EndReason::TlsHandshakeFailed("x".into()),
                "tls_handshake_failed",
                "tls",
            ),
            (EndReason::Shutdown, "shutdown", "proxy"),
            (
                EndReason::client_violation("too many commands"),
                "protocol_violation",
                "client",
            ),
            (
                EndReason::backend_violation("bad reply"),
                "protocol_violation",
                "backend",
            ),
            (
                EndReason::client_io(&io::Error::from(io::ErrorKind::ConnectionReset)),
                "io_error",
                "client",
            ),
            (
                EndReason::backend_io(&io::Error::from(io::ErrorKind::ConnectionReset)),
                "io_error",
                "backend",
            ),
        ];
        for (reason, label, side) in cases {
            assert_eq!(reason.as_str(), label, "{reason:?}");
            assert_eq!(reason.side().as_str(), side, "{reason:?}");
        }
    }

    #[test]
    fn a_tls_close_without_close_notify_is_a_client_close() {
        let eof = io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "peer closed connection without sending TLS close_notify",
        );
        assert_eq!(EndReason::client_io(&eof), EndReason::ClientClosed);
        assert_eq!(EndReason::client_io(&eof).detail(), "");
    }

    #[test]
    fn timed_out_writes_are_idle_peers_on_their_own_side() {
        let timeout = io::Error::new(io::ErrorKind::TimedOut, "write timed out");
        assert_eq!(EndReason::client_io(&timeout), EndReason::ClientIdle);
        assert_eq!(EndReason::backend_io(&timeout), EndReason::BackendTimeout);
    }

    #[test]
    fn io_errors_keep_their_cause_as_detail() {
        let reset = io::Error::new(io::ErrorKind::ConnectionReset, "connection reset by peer");
        let reason = EndReason::backend_io(&reset);
        assert_eq!(reason.detail(), "connection reset by peer");
        assert_eq!(reason.class(), CloseClass::BackendIo);
    }

    #[test]
    fn every_class_sits_at_its_index() {
        for (i, class) in CloseClass::ALL.iter().enumerate() {
            assert_eq!(class.index(), i);
        }
    }
}
