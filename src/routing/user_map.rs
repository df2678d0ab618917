//! `user_map`: a YAML file mapping login names and domains to backends, for sharded mailboxes
//! and migrations ("who is where today"), re-read when its content changes.
//!
//! ```yaml
//! alice@example.org: "10.0.0.5:143"            # one login name
//! "@example.org": ["imap-a.internal:143", "10.0.0.7:143"]   # a whole domain, in order
//! ```
//!
//! - An exact name wins over its domain (the part after the last `@`, RFC 5321 §4.1.2's
//!   Mailbox); names and domains are compared ASCII case-insensitively (Dovecot's `%Lu`).
//! - An unmapped name gets `None`: the caller falls back to the listener's own backends.
//! - A bad file (unreadable, too long, not YAML, a bad address, a key twice) is refused whole:
//!   [`UserMap::reload`] keeps the map in service and the caller logs and counts the failure.
//!
//! Loading reads a file (blocking); lookups are lock-free reads of the map in service.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use serde::Deserialize;
use serde::de::{MapAccess, Visitor};

use crate::config::{BackendAddress, MAX_BACKENDS};
use crate::tls::ReloadOutcome;

/// The largest map file: 16 MiB holds some 300,000 entries of a typical length, more than any
/// migration moves at once, while bounding what a file mounted by mistake (a log, a device)
/// costs to read and parse. One octet more is read, so a longer file is refused, not cut short.
pub const MAX_MAP_FILE: usize = 16 * 1024 * 1024;
/// The longest key: a Mailbox is at most 254 octets in practice (RFC 5321 §4.5.3.1.3 limits a
/// path, its angle brackets included, to 256).
const MAX_KEY: usize = 254;

/// Why a map file was refused.
#[derive(Debug, thiserror::Error)]
pub enum UserMapError {
    #[error("user_map {path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("user_map {path} is a {kind}, not a regular file (symbolic links to one are fine)")]
    NotAFile { path: PathBuf, kind: &'static str },
    #[error("user_map {path}: {problem}")]
    Invalid { path: PathBuf, problem: String },
}

/// One parsed map: lowercased key to backends in order.
#[derive(Debug, Default)]
struct Entries {
    /// `alice@example.org` (or a bare `alice`), lowercased.
    names: HashMap<Vec<u8>, Arc<[BackendAddress]>>,
    /// `example.org` for the key `@example.org`, lowercased.
    domains: HashMap<Vec<u8>, Arc<[BackendAddress]>>,
}

/// A map in service and the digest of the bytes it came from.
#[derive(Debug)]
struct Loaded {
    entries: Entries,
    digest: Vec<u8>,
}

/// A `user_map` file, swapped whole when it changes.
pub struct UserMap {
    path: PathBuf,
    current: ArcSwap<Loaded>,
}

impl fmt::Debug for UserMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let loaded = self.current.load();
        f.debug_struct("UserMap")
            .field("path", &self.path)
            .field("names", &loaded.entries.names.len())
            .field("domains", &loaded.entries.domains.len())
            .finish()
    }
}

impl UserMap {
    /// Reads and parses the file; any problem is an error naming it. Blocking.
    pub fn load(path: &Path) -> Result<UserMap, UserMapError> {
        let loaded = read(path)?;
        Ok(UserMap {
            path: path.to_owned(),
            current: ArcSwap::from_pointee(loaded),
        })
    }

    /// Parses map text (tests, and `load`).
    pub fn parse(text: &str) -> Result<UserMap, String> {
        let entries = parse(text)?;
        Ok(UserMap {
            path: PathBuf::new(),
            current: ArcSwap::from_pointee(Loaded {
                entries,
                digest: digest(text.as_bytes()),
            }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Re-reads the file; swaps the map only when its bytes changed (or `force`) and parse. On
    /// error the map in service stays. Blocking.
    pub fn reload(&self, force: bool) -> Result<ReloadOutcome, UserMapError> {
        let loaded = read(&self.path)?;
        if !force && loaded.digest == self.current.load().digest {
            return Ok(ReloadOutcome::Unchanged);
        }
        self.current.store(Arc::new(loaded));
        Ok(ReloadOutcome::Reloaded)
    }

    /// The backends of `user`: its own entry, else its domain's; `None` when neither is mapped.
    pub fn lookup(&self, user: &[u8]) -> Option<Arc<[BackendAddress]>> {
        let loaded = self.current.load();
        let lower = user.to_ascii_lowercase();
        if let Some(found) = loaded.entries.names.get(&lower) {
            return Some(found.clone());
        }
        let at = lower.iter().rposition(|&b| b == b'@')?;
        let domain = lower.get(at + 1..)?;
        loaded.entries.domains.get(domain).cloned()
    }

    /// Entries in service: (names, domains).
    pub fn len(&self) -> (usize, usize) {
        let loaded = self.current.load();
        (loaded.entries.names.len(), loaded.entries.domains.len())
    }
}

fn digest(bytes: &[u8]) -> Vec<u8> {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes)
        .as_ref()
        .to_vec()
}

fn read(path: &Path) -> Result<Loaded, UserMapError> {
    let bytes = read_bounded(path)?;
    let invalid = |problem: String| UserMapError::Invalid {
        path: path.to_owned(),
        problem,
    };
    if bytes.len() > MAX_MAP_FILE {
        return Err(invalid(format!("longer than {MAX_MAP_FILE} bytes")));
    }
    let text = std::str::from_utf8(&bytes).map_err(|e| invalid(format!("not UTF-8: {e}")))?;
    let entries = parse(text).map_err(invalid)?;
    Ok(Loaded {
        entries,
        digest: digest(&bytes),
    })
}

/// Reads at most [`MAX_MAP_FILE`] + 1 octets of a regular file, opened without blocking so a
/// FIFO put where the map belongs cannot hang a start, a check or a reload.
fn read_bounded(path: &Path) -> Result<Vec<u8>, UserMapError> {
    use rustix::fs::{Mode, OFlags};
    use std::io::Read;
    use std::os::unix::fs::FileTypeExt;

    let read_error = |source: std::io::Error| UserMapError::Read {
        path: path.to_owned(),
        source,
    };
    let fd = rustix::fs::open(
        path,
        OFlags::RDONLY | OFlags::NONBLOCK | OFlags::CLOEXEC | OFlags::NOCTTY,
        Mode::empty(),
    )
    .map_err(|e| read_error(e.into()))?;
    let file = std::fs::File::from(fd);
    let kind = file.metadata().map_err(read_error)?.file_type();
    if !kind.is_file() {
        let kind = if kind.is_fifo() {
            "FIFO"
        } else if kind.is_dir() {
            "directory"
        } else if kind.is_char_device() {
            "character device"
        } else if kind.is_block_device() {
            "block device"
        } else if kind.is_socket() {
            "socket"
        } else {
            "special file"
        };
        return Err(UserMapError::NotAFile {
            path: path.to_owned(),
            kind,
        });
    }
    let mut bytes = Vec::new();
    file.take(MAX_MAP_FILE as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(read_error)?;
    Ok(bytes)
}

/// The top-level mapping in file order, duplicates kept so they can be refused; each value
/// checked afterwards, so its problem names its key.
struct Pairs(Vec<(String, yaml_serde::Value)>);

impl<'de> Deserialize<'de> for Pairs {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct PairsVisitor;
        impl<'de> Visitor<'de> for PairsVisitor {
            type Value = Pairs;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(
                    "a mapping from a login name or \"@domain\" to \"host:port\" or a list of them",
                )
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Pairs, A::Error> {
                let mut pairs = Vec::new();
                while let Some(pair) = map.next_entry::<String, yaml_serde::Value>()? {
                    pairs.push(pair);
                }
                Ok(Pairs(pairs))
            }
            // An empty file (or one with only comments) is an empty map.
            fn visit_unit<E: serde::de::Error>(self) -> Result<Pairs, E> {
                Ok(Pairs(Vec::new()))
            }
            fn visit_none<E: serde::de::Error>(self) -> Result<Pairs, E> {
                Ok(Pairs(Vec::new()))
            }
        }
        deserializer.deserialize_any(PairsVisitor)
    }
}

/// Parses and checks a whole map; the first problem names its key.
fn parse(text: &str) -> Result<Entries, String> {
    let Pairs(pairs) = if text.trim().is_empty() {
        Pairs(Vec::new())
    } else {
        yaml_serde::from_str(text).map_err(|e| e.to_string())?
    };
    let mut entries = Entries::default();
    for (key, written) in pairs {
        let lower = key.to_ascii_lowercase();
        check_key(&lower).map_err(|problem| format!("{key:?}: {problem}"))?;
        let backends = backends(&written).map_err(|problem| format!("{key:?}: {problem}"))?;
        let (table, name) = match lower.strip_prefix('@') {
            Some(domain) => (&mut entries.domains, domain),
            None => (&mut entries.names, lower.as_str()),
        };
        if table
            .insert(name.as_bytes().to_vec(), backends.into())
            .is_some()
        {
            return Err(format!(
                "{key:?} is mapped twice (keys are compared case-insensitively)"
            ));
        }
    }
    Ok(entries)
}

/// A key is a login name (`alice@example.org`, or a bare `alice`) or `@` and a domain.
fn check_key(key: &str) -> Result<(), String> {
    if key.is_empty() || key.len() > MAX_KEY {
        return Err(format!("a key is 1-{MAX_KEY} octets"));
    }
    if key
        .bytes()
        .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
    {
        return Err("a key has no spaces or control characters".into());
    }
    if let Some(domain) = key.strip_prefix('@') {
        if domain.is_empty() || domain.contains('@') {
            return Err("a domain key is \"@\" followed by a domain".into());
        }
    } else if key.ends_with('@') {
        return Err("a login name does not end in \"@\"".into());
    }
    Ok(())
}

/// A value: one `host:port`, or a list of them.
fn backends(written: &yaml_serde::Value) -> Result<Vec<BackendAddress>, String> {
    let expected = || "expected \"host:port\" or a list of them".to_owned();
    let items: Vec<&str> = match written {
        yaml_serde::Value::String(one) => vec![one.as_str()],
        yaml_serde::Value::Sequence(many) => many
            .iter()
            .map(|item| item.as_str().ok_or_else(expected))
            .collect::<Result<_, _>>()?,
        _ => return Err(expected()),
    };
    if items.is_empty() {
        return Err("needs at least one host:port".into());
    }
    if items.len() > MAX_BACKENDS {
        return Err(format!("{} backends; at most {MAX_BACKENDS}", items.len()));
    }
    let mut out: Vec<BackendAddress> = Vec::with_capacity(items.len());
    for item in items {
        let address = crate::config::parse_backend(item)?;
        if out.contains(&address) {
            return Err(format!("{address} is listed twice"));
        }
        out.push(address);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn show(found: Option<Arc<[BackendAddress]>>) -> Option<String> {
        found.map(|list| {
            list.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(",")
        })
    }

    const MAP: &str = "\
# who is where
alice@example.org: \"10.0.0.5:143\"
\"@example.org\": [\"imap-a.internal:143\", \"10.0.0.7:143\"]
\"@Example.NET\": \"[2001:db8::5]:143\"
bob: \"10.0.0.9:143\"
";

    #[test]
    fn an_exact_name_wins_then_the_domain_then_nothing() {
        let map = UserMap::parse(MAP).unwrap();
        assert_eq!(
            show(map.lookup(b"alice@example.org")).unwrap(),
            "10.0.0.5:143"
        );
        assert_eq!(
            show(map.lookup(b"carol@example.org")).unwrap(),
            "imap-a.internal:143,10.0.0.7:143"
        );
        assert_eq!(
            show(map.lookup(b"dave@example.net")).unwrap(),
            "[2001:db8::5]:143"
        );
        assert_eq!(show(map.lookup(b"bob")).unwrap(), "10.0.0.9:143");
        // Unmapped: the caller's default.
        assert_eq!(map.lookup(b"eve@example.com"), None);
        assert_eq!(map.lookup(b"bob@example.com"), None);
        assert_eq!(map.lookup(b"example.org"), None);
        assert_eq!(map.lookup(b""), None);
        // The domain is what follows the last "@".
        assert_eq!(
            show(map.lookup(b"\"a@b\"@example.org")).unwrap(),
            "imap-a.internal:143,10.0.0.7:143"
        );
        assert_eq!(map.len(), (2, 2));
    }

    #[test]
    fn names_and_domains_are_case_insensitive() {
        let map = UserMap::parse(MAP).unwrap();
        for user in [
            &b"ALICE@EXAMPLE.ORG"[..],
            b"Alice@Example.Org",
            b"alice@EXAMPLE.org",
        ] {
            assert_eq!(show(map.lookup(user)).unwrap(), "10.0.0.5:143");
        }
        assert!(map.lookup(b"Carol@EXAMPLE.ORG").is_some());
        assert!(map.lookup(b"dave@example.NET").is_some());
        let twice = UserMap::parse(
            "Alice@example.org: \"10.0.0.1:143\"\nalice@EXAMPLE.org: \"10.0.0.2:143\"\n",
        )
        .unwrap_err();
        assert!(twice.contains("mapped twice"), "{twice}");
    }

    #[test]
    fn every_bad_entry_is_refused_with_its_key() {
        for (text, word) in [
            ("alice@example.org: \"10.0.0.5\"\n", "alice@example.org"),
            ("alice@example.org: []\n", "at least one"),
            ("\"@\": \"10.0.0.5:143\"\n", "domain"),
            ("\"a b\": \"10.0.0.5:143\"\n", "spaces"),
            ("\"alice@\": \"10.0.0.5:143\"\n", "does not end"),
            ("alice: [\"10.0.0.5:143\", \"10.0.0.5:143\"]\n", "twice"),
            ("alice: \"bad_host:143\"\n", "bad_host"),
            (
                "alice: {address: \"10.0.0.5:143\"}\n",
                "\"alice\": expected",
            ),
            ("alice: [[\"10.0.0.5:143\"]]\n", "\"alice\": expected"),
            ("alice: 143\n", "\"alice\": expected"),
            ("- alice\n", "mapping"),
            (
                "alice: \"10.0.0.5:143\"\nalice: \"10.0.0.6:143\"\n",
                "twice",
            ),
        ] {
            let err = UserMap::parse(text).unwrap_err();
            assert!(err.contains(word), "{text:?}: {err}");
        }
        assert_eq!(UserMap::parse("").unwrap().len(), (0, 0));
        assert_eq!(UserMap::parse("# nobody yet\n").unwrap().len(), (0, 0));
        let many: Vec<String> = (0..=MAX_BACKENDS)
            .map(|i| format!("\"10.0.1.{i}:143\""))
            .collect();
        let err = UserMap::parse(&format!("alice: [{}]\n", many.join(","))).unwrap_err();
        assert!(err.contains("at most"), "{err}");
    }

    #[test]
    fn a_changed_file_is_reloaded_and_a_bad_one_keeps_the_old_map() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users.yaml");
        std::fs::write(&path, "alice@example.org: \"10.0.0.5:143\"\n").unwrap();
        let map = UserMap::load(&path).unwrap();
        assert_eq!(map.reload(false).unwrap(), ReloadOutcome::Unchanged);
        assert_eq!(map.reload(true).unwrap(), ReloadOutcome::Reloaded);
        // A migration moves alice: the new file is in service at the next reload.
        std::fs::write(&path, "alice@example.org: \"10.0.0.6:143\"\n").unwrap();
        assert_eq!(map.reload(false).unwrap(), ReloadOutcome::Reloaded);
        assert_eq!(
            show(map.lookup(b"alice@example.org")).unwrap(),
            "10.0.0.6:143"
        );
        // A broken file is refused and alice stays where she is.
        std::fs::write(&path, "alice@example.org: [\n").unwrap();
        assert!(matches!(
            map.reload(false),
            Err(UserMapError::Invalid { .. })
        ));
        assert_eq!(
            show(map.lookup(b"alice@example.org")).unwrap(),
            "10.0.0.6:143"
        );
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(map.reload(true), Err(UserMapError::Read { .. })));
        assert_eq!(
            show(map.lookup(b"alice@example.org")).unwrap(),
            "10.0.0.6:143"
        );
    }

    #[test]
    fn only_a_bounded_regular_file_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let err = UserMap::load(dir.path()).unwrap_err();
        assert!(
            matches!(
                err,
                UserMapError::NotAFile {
                    kind: "directory",
                    ..
                }
            ),
            "{err}"
        );
        let fifo = dir.path().join("fifo");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        let err = UserMap::load(&fifo).unwrap_err();
        assert!(
            matches!(err, UserMapError::NotAFile { kind: "FIFO", .. }),
            "{err}"
        );
        let big = dir.path().join("big.yaml");
        std::fs::write(&big, vec![b'#'; MAX_MAP_FILE + 1]).unwrap();
        let err = UserMap::load(&big).unwrap_err().to_string();
        assert!(err.contains("longer than"), "{err}");
    }
}
