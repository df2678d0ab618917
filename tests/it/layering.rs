//! Keeps CONTRIBUTING.md's layering diagram true: the sans-I/O bottom layer (the protocol
//! codecs, gates and machines under `src/smtp`, `src/imap`, `src/pop3`, the machine contract
//! `src/machine.rs` and the shared SASL rules `src/sasl.rs`) imports nothing from the layers above it — no driver loop, no
//! session, server, backend, metrics or limits. Read from the source text, so a new `use` of a
//! driver module in a pure file fails here before review.
//!
//! The protocols' `session.rs` files are the exception by design: they are where a protocol
//! meets the driver, as settings builders that call `driver::serve`.

use std::path::{Path, PathBuf};

/// What a pure file may name under `crate::`: the bottom layer itself.
const ALLOWED: &[&str] = &[
    "crate::line",
    "crate::config",
    "crate::client_info",
    "crate::cidr",
    "crate::dns",
    "crate::machine",
    "crate::smtp",
    "crate::imap",
    "crate::pop3",
    "crate::sasl",
    // The IANA name tables: pure functions over numbers.
    "crate::tls::names",
];

fn pure_files() -> Vec<PathBuf> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = vec![src.join("machine.rs"), src.join("sasl.rs")];
    for dir in ["smtp", "imap", "pop3"] {
        // A directory that cannot be read lists nothing, and the checks below then fail on
        // the files they expect.
        for entry in std::fs::read_dir(src.join(dir))
            .into_iter()
            .flatten()
            .flatten()
        {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "rs")
                && path.file_name().is_some_and(|n| n != "session.rs")
            {
                files.push(path);
            }
        }
    }
    files.sort();
    assert!(files.len() > 20, "too few source files found: {files:?}");
    files
}

/// The `crate::…` paths a file names outside its test module.
fn crate_paths(text: &str) -> Vec<String> {
    let code = text.split("#[cfg(test)]").next().unwrap_or_default();
    let mut paths = Vec::new();
    for (i, _) in code.match_indices("crate::") {
        let rest = &code[i..];
        let end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or(rest.len());
        paths.push(rest[..end].trim_end_matches(':').to_owned());
    }
    paths
}

#[test]
fn the_sans_io_layer_imports_nothing_from_above() {
    let mut offences = Vec::new();
    for file in pure_files() {
        let text = std::fs::read_to_string(&file).unwrap();
        for path in crate_paths(&text) {
            let allowed = ALLOWED
                .iter()
                .any(|a| path == *a || path.starts_with(&format!("{a}::")));
            if !allowed {
                offences.push(format!("{}: {path}", file.display()));
            }
        }
    }
    assert!(
        offences.is_empty(),
        "pure modules name layers above them:\n{}",
        offences.join("\n")
    );
}

#[test]
fn no_machine_imports_the_driver_and_the_sessions_only_build_settings() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    for file in pure_files() {
        let text = std::fs::read_to_string(&file).unwrap();
        let code = text.split("#[cfg(test)]").next().unwrap_or_default();
        assert!(
            !code.contains("crate::driver"),
            "{} names the driver loop",
            file.display()
        );
    }
    // The contract does not live in the loop's file.
    let driver = std::fs::read_to_string(src.join("driver.rs")).unwrap();
    assert!(!driver.contains("pub trait Machine"));
    // Each protocol's session.rs builds its machine's settings and hands it to the one loop:
    // one async fn, one await, no loop of its own, and small.
    for protocol in ["smtp", "imap", "pop3"] {
        let path = src.join(protocol).join("session.rs");
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("crate::driver::serve("), "{}", path.display());
        assert_eq!(text.matches("async fn").count(), 1, "{}", path.display());
        assert_eq!(text.matches(".await").count(), 1, "{}", path.display());
        assert!(!text.contains("loop {"), "{}", path.display());
        let lines = text.lines().count();
        assert!(lines < 60, "{} has {lines} lines", path.display());
    }
}

#[test]
fn the_check_sees_an_offence() {
    let paths = crate_paths(
        "use crate::session::Session;\nuse crate::line::Step;\n#[cfg(test)]\nuse crate::server::x;",
    );
    assert_eq!(paths, ["crate::session::Session", "crate::line::Step"]);
}
