//! The SMTP session: the settings of one submission session's machine ([`SmtpMachine`], where
//! every decision lives) from its listener and client, run by the one driver loop
//! ([`crate::driver::serve`]) from the greeting to QUIT.

use time::OffsetDateTime;

use crate::session::{ClientStream, EndReason, Session};
use crate::smtp::machine::{Settings, SmtpMachine};
use crate::smtp::received::ReceivedId;
use crate::smtp::receiver::DEFAULT_AUTH_LINE_LIMIT;
use crate::transport::Transport;

/// Serves one SMTP submission session (465 or 587) until QUIT, an error or shutdown.
pub async fn serve<S: Transport>(client: ClientStream<S>, session: &mut Session) -> EndReason {
    let listener = &session.listener();
    let settings = Settings {
        listener: listener.config.tls,
        require_tls_for_mail: listener.config.require_tls_for_mail,
        hostname: listener.hostname.clone(),
        line_limit: listener.limits.smtp_line,
        auth_line_limit: DEFAULT_AUTH_LINE_LIMIT,
        client_info: listener.config.backend_client_info,
        client: session.client_addr(),
        local: session.local_addr(),
        clock: OffsetDateTime::now_utc,
        received_id: ReceivedId::random,
        learned_ehlo: listener.learned.ehlo(),
        routed: listener.routes_users(),
    };
    let machine = SmtpMachine::new(settings, session.tls().map(|t| t.facts()));
    // Client bytes held while the machine waits for replies: one command line's worth.
    let hold_limit = listener.limits.smtp_line;
    crate::driver::serve(machine, client, session, hold_limit).await
}
