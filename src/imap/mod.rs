//! IMAP support: sans-I/O codec, rewriters and the session driver.
//!
//! - [`codec`]: client-command receiver (tags, literals, AUTHENTICATE exchanges), bounded.
//! - [`command`]: strict pre-login receiver, grammar parser and canonical encoder for the gate.
//! - [`response`]: backend-response receiver (greeting, tagged completions, continuations).
//! - [`capability`]: capability-list rewriting for the client's view.
//! - [`id`]: ID parsing and rewriting with mailfront's `tls` field, and mailfront's own ID.
//! - [`policy`]: the gate deciding forward / rewrite / refuse / STARTTLS per command.
//! - [`reply`]: responses mailfront writes itself.
//! - [`session`]: the driver that runs them against the client and backend streams.

pub mod capability;
pub mod codec;
pub mod command;
pub mod id;
pub mod policy;
pub mod prelogin;
pub mod reply;
pub mod response;
pub mod session;

#[cfg(test)]
pub(crate) mod split;
