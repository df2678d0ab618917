//! TLS session tickets sealed with keys from a file, so every replica that mounts the same file
//! (a Kubernetes Secret) resumes the sessions of the others.
//!
//! # The key file
//! Raw bytes, a concatenation of 80-byte keys, the length nginx's `ssl_session_ticket_key` uses
//! (`openssl rand 80 > ticket.keys`). Each key is a 16-byte name, written in clear at the front
//! of every ticket so decryption finds its key without trying them all, then 64 secret bytes,
//! from which HKDF-SHA256 derives an AES-256-GCM-SIV key. The first key seals new tickets; every
//! key opens them. To rotate, put a new key first and drop the last one a ticket lifetime later:
//! `cat <(openssl rand 80) ticket.keys | head -c 240 > new.keys` (keeps three keys).
//!
//! Not nginx's or HAProxy's ticket format (they use AES-CBC with HMAC); only the file's length
//! convention is shared. GCM-SIV because one key seals tickets for months across replicas with
//! random nonces: a repeated nonce reveals only that two tickets are equal, where plain GCM
//! would leak its authentication key.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use aws_lc_rs::aead::{AES_256_GCM_SIV, Aad, NONCE_LEN, Nonce, RandomizedNonceKey};
use aws_lc_rs::{digest, hkdf};
use rustls::server::ProducesTickets;
use zeroize::Zeroizing;

use super::ReloadOutcome;

/// Octets per key in the file: nginx's 80-byte `ssl_session_ticket_key` length.
pub const KEY_LEN: usize = 80;
/// Octets of the key name at the front of each key and of each ticket.
const NAME_LEN: usize = 16;
/// Keys a file may hold: a current key and a few older ones still decrypting is all rotation
/// needs; the bound keeps a wrong file (a certificate mounted by mistake) from becoming keys.
pub const MAX_KEYS: usize = 16;
/// Seconds a client is told a ticket is good for: rustls' own ticketer's six hours. Keys are
/// not erased on a timer here; the operator's rotation of the file bounds a key's life.
const LIFETIME_SECS: u32 = 6 * 60 * 60;
/// AES-256-GCM-SIV's tag.
const TAG_LEN: usize = 16;
/// Binds the derived keys to this use, so the same 64 bytes used elsewhere give another key.
const HKDF_SALT: &[u8] = b"mailfront session ticket key v1";

/// The longest valid file, [`MAX_KEYS`] keys. One octet more is read, so a longer file is seen
/// to be too long (and refused) instead of being cut to its first keys, while a file that never
/// ends (a device, a growing log mounted by mistake) costs no more than that.
const MAX_FILE_LEN: usize = MAX_KEYS * KEY_LEN;

/// Why a ticket key file was refused.
#[derive(Debug, thiserror::Error)]
pub enum TicketKeyError {
    #[error("tls.ticket_key_file: cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "tls.ticket_key_file: {path} is a {kind}, not a regular file (symbolic links to one are fine)"
    )]
    NotAFile { path: String, kind: &'static str },
    #[error("tls.ticket_key_file: {path}: {problem}")]
    Invalid { path: String, problem: String },
}

/// One key: its name and the AEAD key derived from its secret.
struct TicketKey {
    name: [u8; NAME_LEN],
    aead: RandomizedNonceKey,
}

/// The keys in service, first one sealing.
struct KeySet {
    keys: Vec<TicketKey>,
    /// SHA-256 of the file, so an unchanged file is not parsed again.
    fingerprint: Vec<u8>,
}

/// Ticket keys from a file, swapped atomically on reload; a bad file keeps the keys in service.
pub struct TicketKeys {
    path: PathBuf,
    current: ArcSwap<KeySet>,
}

impl fmt::Debug for TicketKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TicketKeys")
            .field("path", &self.path)
            .field("keys", &self.current.load().keys.len())
            .finish()
    }
}

impl TicketKeys {
    /// Reads the key file; any problem is an error naming it.
    pub fn load(path: &Path) -> Result<TicketKeys, TicketKeyError> {
        let set = read_set(path)?;
        Ok(TicketKeys {
            path: path.to_owned(),
            current: ArcSwap::from_pointee(set),
        })
    }

    /// How many keys are in service.
    pub fn len(&self) -> usize {
        self.current.load().keys.len()
    }

    /// Always false: a loaded file holds at least one key.
    pub fn is_empty(&self) -> bool {
        self.current.load().keys.is_empty()
    }

    /// Re-reads the file; swaps the keys only if it changed (or `force`) and parses. On error
    /// the keys in service stay.
    pub fn reload(&self, force: bool) -> Result<ReloadOutcome, TicketKeyError> {
        let set = read_set(&self.path)?;
        if !force && set.fingerprint == self.current.load().fingerprint {
            return Ok(ReloadOutcome::Unchanged);
        }
        self.current.store(Arc::new(set));
        Ok(ReloadOutcome::Reloaded)
    }
}

impl ProducesTickets for TicketKeys {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        LIFETIME_SECS
    }

    /// `name ‖ nonce ‖ ciphertext ‖ tag`, the name also authenticated as associated data.
    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        let set = self.current.load();
        let key = set.keys.first()?;
        let mut sealed = Vec::with_capacity(plain.len() + TAG_LEN);
        sealed.extend_from_slice(plain);
        let nonce = key
            .aead
            .seal_in_place_append_tag(Aad::from(&key.name), &mut sealed)
            .ok()?;
        let mut ticket = Vec::with_capacity(NAME_LEN + NONCE_LEN + sealed.len());
        ticket.extend_from_slice(&key.name);
        ticket.extend_from_slice(nonce.as_ref());
        ticket.extend_from_slice(&sealed);
        Some(ticket)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        let (name, rest) = cipher.split_at_checked(NAME_LEN)?;
        let (nonce, sealed) = rest.split_at_checked(NONCE_LEN)?;
        let set = self.current.load();
        let key = set.keys.iter().find(|k| k.name.as_slice() == name)?;
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut buf = sealed.to_vec();
        let plain_len = key
            .aead
            .open_in_place(nonce, Aad::from(name), &mut buf)
            .ok()?
            .len();
        buf.truncate(plain_len);
        Some(buf)
    }
}

/// Reads at most [`MAX_FILE_LEN`] + 1 octets of a regular file (after symbolic links, which a
/// Kubernetes Secret mount is made of). Opened with O_NONBLOCK, so a FIFO in the file's place
/// is refused at once instead of blocking the open until a writer comes; anything but a
/// regular file (FIFO, device, directory, socket) is refused before a byte is read.
fn read_file(path: &Path) -> Result<Zeroizing<Vec<u8>>, TicketKeyError> {
    use rustix::fs::{Mode, OFlags};
    use std::io::Read;
    use std::os::unix::fs::FileTypeExt;

    let read_error = |source: std::io::Error| TicketKeyError::Read {
        path: path.display().to_string(),
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
        return Err(TicketKeyError::NotAFile {
            path: path.display().to_string(),
            kind,
        });
    }
    // Wiped on drop: the secret halves of the keys.
    let mut bytes = Zeroizing::new(Vec::with_capacity(MAX_FILE_LEN + 1));
    file.take(MAX_FILE_LEN as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(read_error)?;
    Ok(bytes)
}

fn read_set(path: &Path) -> Result<KeySet, TicketKeyError> {
    let bytes = read_file(path)?;
    if bytes.len() > MAX_FILE_LEN {
        return Err(TicketKeyError::Invalid {
            path: path.display().to_string(),
            problem: format!(
                "longer than {MAX_FILE_LEN} bytes: at most {MAX_KEYS} keys of {KEY_LEN} bytes"
            ),
        });
    }
    let keys = parse(&bytes).map_err(|problem| TicketKeyError::Invalid {
        path: path.display().to_string(),
        problem,
    })?;
    Ok(KeySet {
        keys,
        fingerprint: digest::digest(&digest::SHA256, &bytes).as_ref().to_vec(),
    })
}

/// Splits the file into keys, refusing a length that is not 1..=[`MAX_KEYS`] whole keys and a
/// name used twice (a ticket must name one key).
fn parse(bytes: &[u8]) -> Result<Vec<TicketKey>, String> {
    if bytes.is_empty() || !bytes.len().is_multiple_of(KEY_LEN) {
        return Err(format!(
            "{} bytes: the file must hold whole {KEY_LEN}-byte keys (make one with `openssl rand {KEY_LEN}`)",
            bytes.len()
        ));
    }
    let count = bytes.len() / KEY_LEN;
    if count > MAX_KEYS {
        return Err(format!("{count} keys: at most {MAX_KEYS}"));
    }
    let mut keys: Vec<TicketKey> = Vec::with_capacity(count);
    for (index, chunk) in bytes.chunks_exact(KEY_LEN).enumerate() {
        let (name, secret) = chunk
            .split_first_chunk::<NAME_LEN>()
            .ok_or_else(|| format!("key {index} is short"))?;
        if keys.iter().any(|k| &k.name == name) {
            return Err(format!("key {index} has the same name as an earlier key"));
        }
        keys.push(TicketKey {
            name: *name,
            aead: derive(secret).ok_or_else(|| format!("key {index}: cannot derive a key"))?,
        });
    }
    Ok(keys)
}

/// A key length for HKDF's expand.
struct Len(usize);

impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

fn derive(secret: &[u8]) -> Option<RandomizedNonceKey> {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, HKDF_SALT).extract(secret);
    let len = AES_256_GCM_SIV.key_len();
    let mut key = Zeroizing::new([0u8; 32]);
    let out = key.get_mut(..len)?;
    prk.expand(&[b"aes-256-gcm-siv"], Len(len))
        .ok()?
        .fill(out)
        .ok()?;
    RandomizedNonceKey::new(&AES_256_GCM_SIV, out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8) -> Vec<u8> {
        (0..KEY_LEN as u8)
            .map(|i| i.wrapping_mul(7) ^ seed)
            .collect()
    }

    fn keys_file(dir: &Path, keys: &[Vec<u8>]) -> PathBuf {
        let path = dir.join("ticket.keys");
        std::fs::write(&path, keys.concat()).unwrap();
        path
    }

    #[test]
    fn a_ticket_opens_to_what_was_sealed_and_carries_the_key_name() {
        let dir = tempfile::tempdir().unwrap();
        let keys = TicketKeys::load(&keys_file(dir.path(), &[key(1)])).unwrap();
        let ticket = keys.encrypt(b"resumption state").unwrap();
        assert_eq!(ticket.get(..NAME_LEN), key(1).get(..NAME_LEN));
        assert_eq!(keys.decrypt(&ticket).unwrap(), b"resumption state");
        // Two tickets for the same state differ (random nonces).
        assert_ne!(ticket, keys.encrypt(b"resumption state").unwrap());
    }

    #[test]
    fn rotation_seals_with_the_new_first_key_and_still_opens_with_the_old() {
        let dir = tempfile::tempdir().unwrap();
        let path = keys_file(dir.path(), &[key(1)]);
        let keys = TicketKeys::load(&path).unwrap();
        let old_ticket = keys.encrypt(b"old").unwrap();

        keys_file(dir.path(), &[key(2), key(1)]);
        assert_eq!(keys.reload(false).unwrap(), ReloadOutcome::Reloaded);
        assert_eq!(keys.reload(false).unwrap(), ReloadOutcome::Unchanged);
        assert_eq!(keys.len(), 2);
        let new_ticket = keys.encrypt(b"new").unwrap();
        assert_eq!(new_ticket.get(..NAME_LEN), key(2).get(..NAME_LEN));
        assert_eq!(keys.decrypt(&old_ticket).unwrap(), b"old");
        assert_eq!(keys.decrypt(&new_ticket).unwrap(), b"new");

        // Once the old key leaves the file, its tickets no longer open.
        keys_file(dir.path(), &[key(2)]);
        keys.reload(false).unwrap();
        assert_eq!(keys.decrypt(&old_ticket), None);
        assert_eq!(keys.decrypt(&new_ticket).unwrap(), b"new");
    }

    #[test]
    fn a_bad_file_on_reload_keeps_the_keys_in_service() {
        let dir = tempfile::tempdir().unwrap();
        let path = keys_file(dir.path(), &[key(1)]);
        let keys = TicketKeys::load(&path).unwrap();
        let ticket = keys.encrypt(b"state").unwrap();

        std::fs::write(&path, b"not a key file").unwrap();
        let err = keys.reload(false).unwrap_err().to_string();
        assert!(err.starts_with("tls.ticket_key_file:"), "{err}");
        assert!(err.contains("80-byte keys"), "{err}");
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(
            keys.reload(true),
            Err(TicketKeyError::Read { .. })
        ));

        assert_eq!(keys.decrypt(&ticket).unwrap(), b"state");
        let fresh = keys.encrypt(b"fresh").unwrap();
        assert_eq!(fresh.get(..NAME_LEN), key(1).get(..NAME_LEN));
    }

    /// Loads on a thread, failing the test instead of hanging it if the load blocks.
    fn load_within_seconds(path: &Path) -> Result<TicketKeys, TicketKeyError> {
        let (tx, rx) = std::sync::mpsc::channel();
        let path = path.to_owned();
        std::thread::spawn(move || tx.send(TicketKeys::load(&path)));
        rx.recv_timeout(std::time::Duration::from_secs(10))
            .expect("loading the ticket key file blocked")
    }

    #[test]
    fn a_fifo_in_place_of_the_file_is_refused_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ticket.keys");
        let made = std::process::Command::new("mkfifo")
            .arg(&path)
            .status()
            .unwrap();
        assert!(made.success());
        let err = load_within_seconds(&path).unwrap_err();
        assert!(
            matches!(err, TicketKeyError::NotAFile { kind: "FIFO", .. }),
            "{err}"
        );
        assert!(err.to_string().contains("not a regular file"), "{err}");
    }

    #[test]
    fn a_device_or_a_directory_is_refused_before_any_read() {
        // /dev/zero never ends: it used to be read until memory ran out.
        let err = load_within_seconds(Path::new("/dev/zero")).unwrap_err();
        assert!(
            matches!(
                err,
                TicketKeyError::NotAFile {
                    kind: "character device",
                    ..
                }
            ),
            "{err}"
        );
        let dir = tempfile::tempdir().unwrap();
        let err = load_within_seconds(dir.path()).unwrap_err();
        assert!(
            matches!(
                err,
                TicketKeyError::NotAFile {
                    kind: "directory",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn a_symlink_to_a_key_file_is_followed() {
        // A Kubernetes Secret volume: ticket.keys -> ..data/ticket.keys -> the real file.
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("..2026_01_01");
        std::fs::create_dir(&data).unwrap();
        keys_file(&data, &[key(1), key(2)]);
        std::os::unix::fs::symlink("..2026_01_01", dir.path().join("..data")).unwrap();
        let link = dir.path().join("ticket.keys");
        std::os::unix::fs::symlink("..data/ticket.keys", &link).unwrap();
        assert_eq!(TicketKeys::load(&link).unwrap().len(), 2);
    }

    #[test]
    fn a_file_longer_than_the_most_keys_is_refused_not_cut_short() {
        let dir = tempfile::tempdir().unwrap();
        let most: Vec<Vec<u8>> = (0..MAX_KEYS as u8).map(key).collect();
        let path = keys_file(dir.path(), &most);
        assert_eq!(TicketKeys::load(&path).unwrap().len(), MAX_KEYS);
        // One octet more, then one key more: both refused, neither truncated to 16 keys.
        for extra in [vec![0u8], key(200)] {
            std::fs::write(&path, [most.concat(), extra].concat()).unwrap();
            let err = TicketKeys::load(&path).unwrap_err().to_string();
            assert!(
                err.contains(&format!("longer than {} bytes", MAX_KEYS * KEY_LEN)),
                "{err}"
            );
        }
    }

    #[test]
    fn files_of_the_wrong_shape_are_refused() {
        assert!(parse(b"").is_err());
        assert!(parse(&[0; KEY_LEN - 1]).is_err());
        assert!(parse(&[0; KEY_LEN + 1]).is_err());
        assert!(parse(&vec![0; KEY_LEN * (MAX_KEYS + 1)]).is_err());
        // The same name twice: a ticket could not say which key sealed it.
        let err = parse(&[key(1), key(1)].concat()).err().unwrap();
        assert!(err.contains("same name"), "{err}");
        assert_eq!(parse(&[key(1), key(2)].concat()).unwrap().len(), 2);
    }

    #[test]
    fn forged_truncated_and_unknown_tickets_do_not_open() {
        let dir = tempfile::tempdir().unwrap();
        let keys = TicketKeys::load(&keys_file(dir.path(), &[key(1)])).unwrap();
        let ticket = keys.encrypt(b"state").unwrap();
        for len in 0..ticket.len() {
            assert_eq!(keys.decrypt(ticket.get(..len).unwrap()), None, "{len}");
        }
        let mut flipped = ticket.clone();
        if let Some(last) = flipped.last_mut() {
            *last ^= 1;
        }
        assert_eq!(keys.decrypt(&flipped), None);
        // Another file's keys do not open it.
        let other = TicketKeys::load(&keys_file(dir.path(), &[key(3)])).unwrap();
        assert_eq!(other.decrypt(&ticket), None);
    }
}
