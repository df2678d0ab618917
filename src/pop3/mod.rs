//! POP3 support: sans-I/O codec, rewriters and the session driver.
//!
//! - [`codec`]: command receiver (with AUTH exchanges) and response receiver, bounded.
//! - [`capa`]: CAPA and greeting rewriting for the client's view.
//! - [`request`]: the typed commands allowed before login, parsed strictly, re-emitted
//!   canonically.
//! - [`policy`]: the gate deciding local answer / forward / STLS per command, before and after
//!   TLS.
//! - [`prelogin`]: the AUTHORIZATION state as a sans-I/O machine over the pieces above.
//! - [`reply`]: responses mailfront writes itself.
//! - [`session`]: the driver that runs them against the client and backend streams.

pub mod capa;
pub mod codec;
pub mod policy;
pub mod prelogin;
pub mod reply;
pub mod request;
pub mod session;
