//! The POP3 session driver: the AUTHORIZATION state ([`Prelogin`]) run by the one driver
//! loop ([`crate::driver::serve`]), then the plain byte relay.

use crate::pop3::codec::CommandLimits;
use crate::pop3::prelogin::{Prelogin, Settings};
use crate::session::{ClientStream, EndReason, Session};
use crate::transport::Transport;

/// Serves one POP3 client connection from the first greeting to the close.
pub async fn serve<S: Transport>(client: ClientStream<S>, session: &mut Session) -> EndReason {
    let limits = &session.listener().limits;
    let settings = Settings {
        listener: session.listener().config.tls,
        hostname: session.hostname().to_owned(),
        limits: CommandLimits {
            command: limits.pop3_line.max(16),
            ..CommandLimits::default()
        },
        max_commands: limits.preauth_commands,
        client_info: session
            .listener()
            .config
            .backend_client_info
            .then_some(session.client_addr()),
        learned_capa: session.listener().learned.pop3_capa(),
        routed: session.listener().routes_users(),
    };
    let machine = Prelogin::new(settings, session.tls().is_some());
    let hold_limit = machine.longest_event();
    crate::driver::serve(machine, client, session, hold_limit).await
}
