//! mailfront: a TLS front proxy for email submission and access (RFC 8314).
//!
//! # Layout
//! Dependencies point one way, top to bottom; nothing imports a layer above it.
//! - [`server`]: binding, accept loops, connection limits, certificate reload, graceful shutdown;
//!   [`limits`] counts each client address's unauthenticated sessions across listeners and
//!   charges its login attempts (charged when sent, refunded on success);
//!   [`server::Server::run`] takes already-bound sockets so tests run the proxy in-process on
//!   port 0. `admission` turns each accepted socket into a session (canonical addresses, the
//!   PROXY header, the per-address limits); `connection` hands it to its protocol's driver. [`fd_limit`]
//!   raises the open-files limit at start and checks it against `max_connections`.
//!   [`shared_state`] keeps those two counts in Redis/Valkey when replicas must share them.
//! - [`routing`]: the backend chosen by the user who logs in (`user_lookup`, nginx's
//!   `auth_http`; `user_map`; `user_affinity`), each listener's router giving the pool a
//!   target ([`backend::Pool::connect_to`]).
//! - The driver: [`driver::serve`], the one loop that runs every protocol's sans-I/O machine
//!   ([`smtp::machine`], and the IMAP and POP3 not-authenticated machines [`imap::prelogin`],
//!   [`pop3::prelogin`], which then hand over to the relay) through the contract in
//!   [`machine`], which sits at the bottom beside them. The protocols' `session` modules only
//!   build each machine's settings.
//! - Below them: [`session`] (per-connection context, the client stream STARTTLS upgrades, timed
//!   writes, the close log), [`close`] (why a session ended, and on which side), [`backend`] (each listener's pool of backend addresses:
//!   selection, health, SNI routes, TLS to the backend; byte counting; the connector tests replace), `relay` (the post-login byte relay), `proxy_protocol` (the PROXY
//!   v2 header sent to the backend), [`proxy_header`] (the PROXY header read from a load
//!   balancer), [`client_info`] (the client's address told to the backend in its own protocol), [`tls`] (certificate store, SNI, hot reload, IANA names), [`metrics`].
//! - At the bottom: [`config`] (the YAML model, validated into [`config::RuntimeConfig`]), `line`
//!   (bounded line framing and the pull-style `Step`), `dns`, `transport`, [`sasl`] (the SASL
//!   rules the three protocols share), and the sans-I/O
//!   codecs, gates and rewriters under [`smtp`], [`imap`] and [`pop3`].
#![forbid(unsafe_code)]

pub(crate) mod admission;
pub mod backend;
pub mod cidr;
pub mod client_info;
pub mod close;
pub mod config;
pub(crate) mod connection;
pub(crate) mod dns;
pub mod driver;
pub mod fd_limit;
pub mod imap;
pub mod limits;
pub(crate) mod line;
pub(crate) mod log_throttle;
pub mod logging;
pub mod machine;
pub mod metrics;
pub mod pop3;
pub mod probe;
pub mod proxy_header;
pub(crate) mod proxy_protocol;
pub(crate) mod relay;
pub mod reload;
pub mod routing;
pub mod sasl;
pub mod server;
pub mod session;
pub mod shared_state;
pub mod smtp;
pub mod tls;
pub(crate) mod transport;

/// What the integration tests drive directly that nothing outside the crate needs: not part of
/// the API, and free to change with the tests.
#[doc(hidden)]
pub mod testing {
    /// A connection served as the server serves an accepted one, over any stream (the driver
    /// tests pass one end of `tokio::io::duplex`).
    pub use crate::connection::serve_stream;
    /// The RFC 5321/8314 grammar of a Received field, to check the one the proxy wrote.
    pub use crate::smtp::received::check_received_abnf;
}
