//! The real `mailfront` binary as a child process, for what only a process shows: its JSON log,
//! its exit, and state shared between two processes (ticket keys).

use std::io::{BufRead, BufReader as StdBufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// The real binary, logging JSON to stderr; lines are collected on a thread.
pub struct Binary {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Binary {
    pub fn start(config: &std::path::Path) -> Binary {
        let mut child = Command::new(env!("CARGO_BIN_EXE_mailfront"))
            .args(["--config", config.to_str().unwrap()])
            .env_remove("RUST_LOG")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in StdBufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Binary {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits for a log line containing all of `needles`.
    #[allow(
        clippy::disallowed_methods,
        reason = "a blocking wait on the child process's log lines, outside tokio: wall time is right"
    )]
    pub fn wait_for(&mut self, needles: &[&str]) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            if let Ok(line) = self.lines.recv_timeout(Duration::from_millis(100)) {
                self.seen.push(line.clone());
                if needles.iter().all(|n| line.contains(n)) {
                    return line;
                }
            }
        }
        panic!(
            "no log line with {needles:?}; saw:\n{}",
            self.seen.join("\n")
        );
    }

    pub fn stop(mut self) -> Vec<String> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
        while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(200)) {
            self.seen.push(line);
        }
        self.seen
    }
}

/// A field of a JSON log line (events are flattened, so fields sit at the top level), else
/// of the innermost span that carries it. Strings come back unquoted, other values as JSON.
pub fn json_field(line: &str, key: &str) -> Option<String> {
    let event: serde_json::Value = serde_json::from_str(line).ok()?;
    let value = event.get(key).or_else(|| {
        event
            .get("spans")?
            .as_array()?
            .iter()
            .rev()
            .find_map(|span| span.get(key))
    })?;
    Some(match value {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    })
}

impl Binary {
    /// The address a listener named `name` bound (from its `listening` log line).
    pub fn address(&mut self, name: &str) -> std::net::SocketAddr {
        let line = self.wait_for(&["listening", &format!("\"{name}\"")]);
        json_field(&line, "address").unwrap().parse().unwrap()
    }
}
