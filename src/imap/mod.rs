//! IMAP support: sans-I/O codec, rewriters and the session driver.
//!
//! - [`command`]: strict pre-login receiver (tags, literals, AUTHENTICATE exchanges), grammar
//!   parser and canonical encoder: the only bytes that reach a backend before login.
//! - [`response`]: backend-response receiver (greeting, tagged completions, continuations).
//! - [`capability`]: capability-list rewriting for the client's view.
//! - [`id`]: ID rewriting with mailfront's `tls` field, and mailfront's own ID.
//! - [`policy`]: the gate, a pure function from the session's state and a parsed command to a
//!   verdict: answered here, refused, or forwarded.
//! - [`prelogin`]: the not-authenticated state as a sans-I/O machine: it acts on the gate's
//!   verdicts; local cleartext dialogue, ID, the LOGIN/AUTHENTICATE exchange.
//! - [`reply`]: responses mailfront writes itself.
//! - [`session`]: the I/O shell that runs the machine against the client and backend streams.

pub mod capability;
pub mod command;
pub mod id;
pub mod policy;
pub mod prelogin;
pub mod reply;
pub mod response;
pub mod session;
