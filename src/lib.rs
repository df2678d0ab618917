//! mailfront: a TLS front proxy for email submission and access (RFC 8314).
//!
//! # Layout
//! - [`config`]: the YAML model, defaults, and validation into a checked [`config::RuntimeConfig`].
//! - [`tls`]: certificate store with SNI selection and hot reload, IANA names, self-signed fallback.
//! - [`server`]: binding, accept loops, connection limits, certificate reload, graceful shutdown;
//!   [`server::Server::run`] takes already-bound sockets so tests run the proxy in-process on port 0.
//! - [`session`]: per-connection context and the client stream that STARTTLS upgrades.
//! - [`backend`]: connecting to the cleartext backend with a deadline; byte counting.
//! - [`proxy_protocol`]: the HAProxy PROXY v2 header optionally sent first to the backend.
//! - [`close`]: why a session ended and on which side (client, backend, TLS, mailfront).
//! - [`relay`]: the byte relay used once a protocol no longer needs parsing.
//! - `dns`: the one DNS host-name check used by config, SMTP and PROXY v2.
//! - [`transport`]: the byte-stream bound the drivers are generic over (TCP, or an in-memory
//!   pipe in tests).
//! - [`line`](mod@line): bounded line framing shared by the three protocol codecs.
//! - [`smtp`], [`imap`], [`pop3`]: sans-I/O codecs and rewriters plus the session drivers.
//! - [`metrics`]: Prometheus handles and the `/metrics`, `/healthz`, `/readyz` endpoint.
#![forbid(unsafe_code)]

pub mod backend;
pub mod close;
pub mod config;
pub(crate) mod dns;
pub mod imap;
pub mod line;
pub mod metrics;
pub mod pop3;
pub mod proxy_protocol;
pub mod relay;
pub mod server;
pub mod session;
pub mod smtp;
pub mod tls;
pub mod transport;
