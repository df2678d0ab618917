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

    /// As [`Binary::wait_for`], but a line already seen (while waiting for another) counts too.
    pub fn seen_or_wait_for(&mut self, needles: &[&str]) -> String {
        let seen = self
            .seen
            .iter()
            .find(|line| needles.iter().all(|n| line.contains(n)));
        match seen {
            Some(line) => line.clone(),
            None => self.wait_for(needles),
        }
    }

    /// SIGKILL: the process dies without any cleanup, as a crashed pod does.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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

/// Keys that occur twice in one JSON object of `line`, at any depth. serde_json keeps the last
/// of two equal keys, so a collision (an event field named like one the formatter writes, such
/// as `message`) is invisible once the line is parsed into a `Value`; log collectors differ on
/// which of the two they keep.
pub fn duplicate_keys(line: &str) -> Vec<String> {
    use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

    struct Walk<'a>(&'a mut Vec<String>);

    impl<'de> DeserializeSeed<'de> for Walk<'_> {
        type Value = ();
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            d.deserialize_any(self)
        }
    }

    impl<'de> Visitor<'de> for Walk<'_> {
        type Value = ();
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("any JSON value")
        }
        fn visit_bool<E>(self, _: bool) -> Result<(), E> {
            Ok(())
        }
        fn visit_i64<E>(self, _: i64) -> Result<(), E> {
            Ok(())
        }
        fn visit_u64<E>(self, _: u64) -> Result<(), E> {
            Ok(())
        }
        fn visit_f64<E>(self, _: f64) -> Result<(), E> {
            Ok(())
        }
        fn visit_str<E>(self, _: &str) -> Result<(), E> {
            Ok(())
        }
        fn visit_unit<E>(self) -> Result<(), E> {
            Ok(())
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
            while seq.next_element_seed(Walk(&mut *self.0))?.is_some() {}
            Ok(())
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            let mut seen = std::collections::HashSet::new();
            while let Some(key) = map.next_key::<String>()? {
                if !seen.insert(key.clone()) {
                    self.0.push(key);
                }
                map.next_value_seed(Walk(&mut *self.0))?;
            }
            Ok(())
        }
    }

    let mut duplicates = Vec::new();
    let mut de = serde_json::Deserializer::from_str(line);
    Walk(&mut duplicates)
        .deserialize(&mut de)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
    duplicates
}
