//! The README's quick start, run for real: starts the built `mailfront demo` on free ports, runs
//! the "try it" lines of README.md (curl, swaks, python3, openssl) in their order against it, and
//! checks what each prints. The lines come from README.md itself, and the demo must print the
//! same ones (with its actual ports), so README, demo and test cannot drift apart.
// Helpers outside #[test] functions: clippy's allow-*-in-tests does not reach them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use crate::common::tool_or_skip;

/// The README's "try it" block: the lines of the first ```sh block after the marker comment.
fn readme_try_it() -> Vec<String> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let (_, after) = readme
        .split_once("<!-- quickstart-try-it:")
        .expect("README.md has no <!-- quickstart-try-it: --> marker");
    let (_, block) = after
        .split_once("```sh\n")
        .expect("no ```sh block after the marker");
    let (block, _) = block.split_once("```").expect("the ```sh block never ends");
    block.lines().map(str::to_owned).collect()
}

/// The demo's default ports, as the README writes them, and the name of each in the banner.
const PORTS: [(&str, u16); 5] = [
    ("imaps", 10993),
    ("pop3s", 10995),
    ("submissions", 10465),
    ("submission", 10587),
    ("metrics", 9090),
];

/// `mailfront demo` on free ports, its banner read, the rest of its log collected.
struct Demo {
    child: Child,
    /// The "try it" lines as the demo printed them (comments and commands, unindented).
    try_it: Vec<String>,
    /// Actual port for each default one.
    ports: Vec<(u16, u16)>,
    log: Arc<Mutex<Vec<String>>>,
}

impl Demo {
    fn start() -> Demo {
        let mut child = Command::new(env!("CARGO_BIN_EXE_mailfront"))
            .args([
                "demo",
                "--imaps",
                "0",
                "--pop3s",
                "0",
                "--submissions",
                "0",
                "--submission",
                "0",
                "--metrics",
                "0",
            ])
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        let log = Arc::new(Mutex::new(Vec::new()));
        let collected = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                collected.lock().unwrap().push(line.clone());
                let _ = tx.send(line);
            }
        });
        // The banner: the listener lines, then "Try it", the lines to try, the closing line.
        let mut ports = Vec::new();
        let mut try_it = Vec::new();
        let mut in_try_it = false;
        loop {
            let line = rx
                .recv_timeout(Duration::from_secs(20))
                .unwrap_or_else(|_| panic!("no banner; log:\n{}", log.lock().unwrap().join("\n")));
            if line.starts_with("The demo servers log") {
                break;
            }
            if line.starts_with("Try it") {
                in_try_it = true;
                continue;
            }
            if in_try_it {
                try_it.push(line.strip_prefix("  ").unwrap_or(&line).to_owned());
                continue;
            }
            let words: Vec<&str> = line.split_whitespace().collect();
            if let [name, address, ..] = words.as_slice()
                && let Some((_, default)) = PORTS.iter().find(|(n, _)| n == name)
            {
                let port = address.rsplit(':').next().unwrap();
                let port: u16 = port.trim_end_matches("/metrics").parse().unwrap();
                assert!(
                    address.starts_with("127.0.0.1:") || address.starts_with("http://127.0.0.1:"),
                    "the demo must listen on loopback only: {line}"
                );
                ports.push((*default, port));
            }
        }
        assert_eq!(ports.len(), PORTS.len(), "ports in the banner: {ports:?}");
        Demo {
            child,
            try_it,
            ports,
            log,
        }
    }

    /// `text` with the default ports replaced by the actual ones (whole numbers only).
    fn actual(&self, text: &str) -> String {
        replace_ports(text, self.ports.iter().copied())
    }

    /// `text` with the actual ports replaced by the default ones.
    fn default(&self, text: &str) -> String {
        replace_ports(text, self.ports.iter().map(|&(d, a)| (a, d)))
    }

    /// SIGTERM; returns the exit status and the whole log.
    fn stop(mut self) -> (std::process::ExitStatus, Vec<String>) {
        Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        let status = wait_with_timeout(&mut self.child, Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(100));
        let log = self.log.lock().unwrap().clone();
        (status, log)
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[allow(
    clippy::disallowed_methods,
    reason = "a blocking wait for a child process, outside tokio: wall time is right"
)]
fn wait_with_timeout(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the demo did not exit within {limit:?} of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Replaces each `from` port in `text` by its `to`, where it stands as a whole number.
fn replace_ports(text: &str, map: impl Iterator<Item = (u16, u16)> + Clone) -> String {
    let mut out = String::new();
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let (before, from_digits) = rest.split_at(digits);
        out.push_str(before);
        let end = from_digits
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(from_digits.len());
        let (number, after) = from_digits.split_at(end);
        let replaced = number
            .parse::<u16>()
            .ok()
            .and_then(|n| map.clone().find(|(from, _)| *from == n))
            .map(|(_, to)| to.to_string());
        out.push_str(replaced.as_deref().unwrap_or(number));
        rest = after;
    }
    out
}

/// What one "try it" command must print, by what it runs. Every command of the README must have
/// an entry, so a new one cannot go untested.
fn expectation(command: &str) -> (&'static str, &'static [&'static str]) {
    let table: [(&str, &str, &[&str]); 7] = [
        (
            "imaps://",
            "curl",
            &[
                "Subject: Welcome to the mailfront demo",
                "tls: TLS_",
                "ID (\"tls\" \"TLS_",
            ],
        ),
        ("smtps://", "curl", &[]),
        (
            "pop3s://",
            "curl",
            &[
                "Received: from ",
                "by mailfront.demo (mailfront) with ESMTPSA id ",
                "\ttls TLS_",
                " group ",
                "Subject: hello",
                "Hello through mailfront.",
            ],
        ),
        (
            "swaks ",
            "swaks",
            &[
                "<-  220 2.0.0 Ready to start TLS",
                "<~  235 2.7.0 Authentication successful",
                "<~  250 2.0.0 Ok: stored as message 3",
            ],
        ),
        // Welcome, the curl message and the swaks message.
        ("poplib", "python3", &["[b'1 ", "b'2 ", "b'3 "]),
        (
            "s_client",
            "openssl",
            &["Protocol version: TLSv1.3", "CN = mailfront.demo"],
        ),
        (
            "/metrics",
            "curl",
            &[
                "mailfront_tls_handshakes_total{cipher=\"TLS_",
                "listener=\"imaps\"",
                "listener=\"submission\"",
            ],
        ),
    ];
    let (_, tool, needles) = table
        .iter()
        .find(|(key, _, _)| command.contains(key))
        .unwrap_or_else(|| panic!("tests/it/quickstart.rs has no expectation for: {command}"));
    (tool, needles)
}

#[test]
fn readme_quick_start_runs_against_the_demo() {
    let readme = readme_try_it();
    let commands: Vec<&String> = readme
        .iter()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .collect();
    assert!(commands.len() >= 5, "README try-it block: {readme:?}");
    for command in &commands {
        assert!(
            !command.contains("0.0.0.0"),
            "the quick start binds loopback only: {command}"
        );
        expectation(command);
    }

    let demo = Demo::start();
    let printed: Vec<String> = demo.try_it.iter().map(|l| demo.default(l)).collect();
    let printed: Vec<&String> = printed.iter().filter(|l| !l.trim().is_empty()).collect();
    let documented: Vec<&String> = readme.iter().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        printed, documented,
        "the demo's \"try it\" lines (left) and README.md's (right) differ"
    );

    for command in commands {
        let (tool, needles) = expectation(command);
        if !tool_or_skip("readme_quick_start_runs_against_the_demo", tool) {
            continue;
        }
        let actual = demo.actual(command);
        let output = Command::new("timeout")
            .args(["30", "sh", "-c", &actual])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            output.status.success(),
            "{actual}\nexited {:?}:\n{text}",
            output.status
        );
        for needle in needles {
            assert!(
                text.contains(needle),
                "{actual}\nprinted no {needle:?}:\n{text}"
            );
        }
    }

    let (status, log) = demo.stop();
    assert!(status.success(), "the demo exited {status:?} on SIGTERM");
    let log = log.join("\n");
    // What the demo's servers received from mailfront, in its own log.
    assert!(
        log.contains("demo IMAP server: ID received from mailfront before the login"),
        "{log}"
    );
    assert!(log.contains("received=\"Received: from "), "{log}");
    assert!(log.contains("SIGTERM received"), "{log}");
}

#[test]
fn port_replacement_is_by_whole_number() {
    let map = [(10993u16, 1u16), (9090, 2)];
    assert_eq!(
        replace_ports("127.0.0.1:10993 109930 9090/x 19090", map.iter().copied()),
        "127.0.0.1:1 109930 2/x 19090"
    );
}
