//! Shared test harness, by what it provides:
//! - `pki`: a test CA and server certificates;
//! - `proxy`: the proxy run in-process on port 0, and its config YAML;
//! - `fake_backend`: fake SMTP/IMAP/POP3/echo backends that record every byte they receive;
//! - `client`: a real rustls client and line readers;
//! - `binary`: the real binary as a child process, with its JSON log lines;
//! - `fleet`: backends that can be killed and revived, optionally behind TLS, that name
//!   themselves in their replies and record the logins they get (pool and routing tests);
//! - `auth_http`: a fake nginx `auth_http` service that records each request (routing tests);
//! - `redis`: a real `redis-server` on a free loopback port (`shared_state` tests).
//!
//! Everything is re-exported here, so test files just `use common::*`.
// Helpers outside #[test] functions: clippy's allow-*-in-tests does not reach them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod auth_http;
mod binary;
mod client;
mod fake_backend;
mod fleet;
mod pki;
mod proxy;
mod redis;

use std::time::Duration;

pub use auth_http::*;
pub use binary::*;
pub use client::*;
pub use fake_backend::*;
pub use fleet::*;
pub use pki::*;
pub use proxy::*;
pub use redis::*;

/// How long any single wait in a test may take before the test fails instead of hanging.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// Waits until `check` holds, polling (for effects in another task).
pub async fn eventually(mut check: impl FnMut() -> bool) {
    for _ in 0..200 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("condition never became true");
}

/// Whether a test that drives the real client `program` can run: `true` if it is on PATH.
/// Without it the test says so (a SKIPPED line) and returns early, unless
/// `MAILFRONT_REQUIRE_TOOLS=1` (set by `.ci/run`, which installs every such tool first): then a
/// missing tool fails the test, so CI can never pass a test that did not run.
pub fn tool_or_skip(test: &str, program: &str) -> bool {
    if have(program) {
        return true;
    }
    if std::env::var("MAILFRONT_REQUIRE_TOOLS").as_deref() == Ok("1") {
        panic!("{test}: {program} not found and MAILFRONT_REQUIRE_TOOLS=1");
    }
    eprintln!("SKIPPED {test}: {program} not found");
    false
}

/// Whether `program` is on PATH.
pub fn have(program: &str) -> bool {
    std::process::Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}
