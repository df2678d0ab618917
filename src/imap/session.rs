//! The IMAP session driver: the not-authenticated state ([`Prelogin`]) run by the shared
//! pre-login loop ([`crate::driver::serve`]), then the plain byte relay.

use crate::imap::command;
use crate::imap::prelogin::{Prelogin, Settings};
use crate::session::{ClientStream, EndReason, Session};
use crate::transport::Transport;

/// Serves one IMAP client connection from the greeting to the close.
pub async fn serve<S: Transport>(client: ClientStream<S>, session: &mut Session) -> EndReason {
    let limits = &session.listener().limits;
    let line = limits.imap_line.max(64);
    let settings = Settings {
        listener: session.listener().config.tls,
        hostname: session.hostname().to_owned(),
        limits: command::Limits {
            line,
            literal: limits.imap_literal,
            command: limits.imap_literal.saturating_add(line),
            sasl_line: command::Limits::default().sasl_line.max(line),
        },
        max_commands: limits.preauth_commands,
        learned_capability: session.listener().learned.imap_capability(),
        routed: session.listener().routes_users(),
        client_info: if session.listener().config.backend_client_info {
            // The session's own id, also on its close line.
            tracing::debug!("x-session-id for the backend's ID");
            crate::client_info::imap_id_fields(
                session.client_addr(),
                session.local_addr(),
                session.id(),
            )
        } else {
            Vec::new()
        },
    };
    // Client bytes held while the machine is not parsing them: one command's worth.
    let hold_limit = line + limits.imap_literal;
    let tls = session.tls().map(|t| t.facts());
    let machine = Prelogin::new(settings, tls, fastrand::u64(..));
    crate::driver::serve(machine, client, session, hold_limit).await
}
