//! The integration tests, as one test binary: `common` (the test CA, the in-process proxy, the
//! fake backends, the clients) compiles once and the tests link once, instead of once per file.
//! One module per suite; run one with `cargo test --test it smtp::` (a module path filter), or
//! one test with `cargo test --test it smtp::idle_client_gets_421_4_4_2_and_is_closed`.
//!
//! Every test shares this process: state that is global to it (the one tracing subscriber of
//! `reload::a_changed_log_level_applies_at_once`) must be set up so other tests are unaffected.

mod common;

mod backends;
mod client_identity;
mod drivers;
mod foundation;
mod imap;
mod layering;
mod limits;
mod observability;
mod pop3;
mod proxy_protocol;
mod quickstart;
mod reload;
mod routing;
mod shared_state;
mod smtp;
mod tickets;
mod tls_versions;
