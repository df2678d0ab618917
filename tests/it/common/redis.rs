//! A real `redis-server` on a free loopback port, for the `shared_state` tests: no persistence,
//! its own working directory, killed when dropped. Without the program the tests print a SKIPPED
//! line and pass, unless `MAILFRONT_REQUIRE_TOOLS=1` (CI) makes them fail.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A running `redis-server`.
pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
    /// Configuration directives beyond the defaults (`--requirepass …`, `--aclfile …`).
    extra: Vec<String>,
    /// `user:password@` for the test's own client, where the server asks for one.
    auth: String,
}

/// `redis-server`'s path, or `None` after a SKIPPED line; panics instead when
/// `MAILFRONT_REQUIRE_TOOLS=1`.
pub fn redis_server_or_skip(test: &str) -> Option<&'static str> {
    const PROGRAM: &str = "redis-server";
    if super::have(PROGRAM) {
        return Some(PROGRAM);
    }
    if std::env::var("MAILFRONT_REQUIRE_TOOLS").as_deref() == Ok("1") {
        panic!("{test}: redis-server not found and MAILFRONT_REQUIRE_TOOLS=1");
    }
    eprintln!("SKIPPED {test}: redis-server not found (apt-get install redis-server)");
    None
}

/// A port nothing listens on now: bound to port 0, then released for redis-server to take.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl RedisServer {
    /// Starts `redis-server` on a free port, or `None` when it is missing (see
    /// [`redis_server_or_skip`]).
    pub fn start(test: &str) -> Option<RedisServer> {
        Self::start_with(test, &[], "")
    }

    /// As [`RedisServer::start`], with more directives (`["--requirepass", "pw"]`) and the
    /// `user:password@` (or `:password@`) the test's own [`RedisServer::client`] logs in with.
    pub fn start_with(test: &str, extra: &[&str], auth: &str) -> Option<RedisServer> {
        redis_server_or_skip(test)?;
        let mut server = RedisServer {
            child: None,
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            auth: auth.to_owned(),
        };
        server.restart();
        Some(server)
    }

    /// `redis://127.0.0.1:<port>/0`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Starts it (again) on the same port, empty, and waits until it answers PING.
    #[allow(
        clippy::disallowed_methods,
        reason = "a blocking wait for a child process, outside tokio: wall time is right"
    )]
    pub fn restart(&mut self) {
        self.kill();
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.dir.path().to_str().unwrap(),
            ])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            if self.ping() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server on port {} did not answer PING", self.port);
    }

    fn ping(&self) -> bool {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
        if s.write_all(b"PING\r\n").is_err() {
            return false;
        }
        // With a password required, the answer is an error, which says it runs all the same.
        let mut buf = [0u8; 7];
        s.read_exact(&mut buf).is_ok() && (&buf == b"+PONG\r\n" || &buf == b"-NOAUTH")
    }

    /// Stops it at once (SIGKILL), as a crash or a network cut would look to mailfront.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// A client for the test's own look at the keys.
    pub async fn client(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(format!("redis://{}127.0.0.1:{}/0", self.auth, self.port))
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}
