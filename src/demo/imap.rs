//! The demo's cleartext IMAP server, behind mailfront's 993 listener: CAPABILITY, ID, LOGIN and
//! AUTHENTICATE PLAIN (user demo), then LIST, SELECT/EXAMINE of INBOX, FETCH and UID FETCH of
//! whole messages, headers, texts, sizes and UIDs, SEARCH, STATUS, CLOSE, LOGOUT. Enough for
//! curl, Python's imaplib and a first look with a mail client; read-only.
//!
//! It records the ID command mailfront sends before the login (RFC 2971, with the `tls` field of
//! draft-ietf-uta-email-deep §7.1) and shows it in message 1, the welcome message, so a client
//! sees what the backend learnt about its TLS.

use std::collections::BTreeSet;
use std::sync::Arc;

use tokio::io::AsyncWriteExt;

use super::io::{self, MAX_LINE, Session};
use super::store::{self, Mailbox};

/// The largest literal the demo server reads (a user name or password in LOGIN).
const MAX_LITERAL: usize = 8192;
/// The largest command, literals included.
const MAX_COMMAND: usize = 64 * 1024;

/// Before the login: what a client (here, mailfront) may use.
const CAPABILITY: &str = "IMAP4rev1 ID SASL-IR AUTH=PLAIN";
/// After it.
const CAPABILITY_AUTHENTICATED: &str = "IMAP4rev1 ID";

/// One IMAP session.
pub async fn serve(mut s: Session, mailbox: Arc<Mailbox>) -> std::io::Result<()> {
    let greeting = format!("* OK [CAPABILITY {CAPABILITY}] mailfront demo IMAP server ready\r\n");
    s.get_mut().write_all(greeting.as_bytes()).await?;
    let mut state = State::default();
    while let Some(command) = read_command(&mut s).await? {
        let first_line_end = command
            .iter()
            .position(|&b| b == b'\n')
            .unwrap_or(command.len());
        let (first, _) = command
            .split_at_checked(first_line_end)
            .unwrap_or((&[], &[]));
        let line = io::text(first);
        let (tag, rest) = line.split_once(' ').unwrap_or((&line, ""));
        let tag = tag.to_owned();
        let (verb, _) = io::verb(rest);
        // The arguments as bytes, literals included: everything after "tag VERB ".
        let skip = tag.len() + 1 + verb.len() + 1;
        let args = command.get(skip..).unwrap_or_default();
        let args = args.strip_suffix(b"\n").unwrap_or(args);
        let args = args.strip_suffix(b"\r").unwrap_or(args);
        if verb == "LOGOUT" {
            let bye = format!("* BYE Logging out\r\n{tag} OK LOGOUT completed\r\n");
            s.get_mut().write_all(bye.as_bytes()).await?;
            return Ok(());
        }
        let reply = match verb.as_str() {
            "AUTHENTICATE" if !state.authenticated => {
                authenticate(&mut s, &mut state, &tag, args).await?
            }
            _ => state.command(&tag, &verb, args, &mailbox),
        };
        s.get_mut().write_all(&reply).await?;
    }
    Ok(())
}

/// A session's state.
#[derive(Default)]
struct State {
    /// The arguments of the ID command mailfront sent, as received.
    id: Option<String>,
    authenticated: bool,
    /// The selected INBOX: the messages as they were when it was selected.
    selected: Option<Vec<Arc<[u8]>>>,
}

impl State {
    /// Everything but LOGOUT and AUTHENTICATE: one reply, written at once.
    fn command(&mut self, tag: &str, verb: &str, args: &[u8], mailbox: &Mailbox) -> Vec<u8> {
        let ok = |text: &str| format!("{tag} OK {text}\r\n").into_bytes();
        let text = String::from_utf8_lossy(args);
        match (verb, self.authenticated) {
            ("CAPABILITY", _) => {
                let caps = if self.authenticated {
                    CAPABILITY_AUTHENTICATED
                } else {
                    CAPABILITY
                };
                format!("* CAPABILITY {caps}\r\n{tag} OK CAPABILITY completed\r\n").into_bytes()
            }
            ("NOOP" | "CHECK", _) => ok("NOOP completed"),
            ("ID", _) => {
                if self.id.is_none() && !self.authenticated {
                    tracing::info!(id = %text, "demo IMAP server: ID received from mailfront before the login");
                    self.id = Some(text.into_owned());
                }
                format!("* ID (\"name\" \"mailfront-demo-imap\")\r\n{tag} OK ID completed\r\n")
                    .into_bytes()
            }
            ("STARTTLS", _) => {
                format!("{tag} BAD mailfront speaks TLS to clients; this server does not\r\n")
                    .into_bytes()
            }
            ("LOGIN", false) => {
                let strings = strings(args).unwrap_or_default();
                match strings.as_slice() {
                    [user, password] if io::credentials_ok(user, password) => self.logged_in(tag),
                    _ => format!(
                        "{tag} NO [AUTHENTICATIONFAILED] Authentication failed (user demo, password demo)\r\n"
                    )
                    .into_bytes(),
                }
            }
            ("LOGIN", true) => format!("{tag} BAD Already logged in\r\n").into_bytes(),
            (_, false) => {
                format!("{tag} BAD Log in first (user demo, password demo)\r\n").into_bytes()
            }
            ("ENABLE", true) => format!("* ENABLED\r\n{tag} OK ENABLE completed\r\n").into_bytes(),
            ("LIST" | "LSUB", true) => {
                let pattern = strings(args)
                    .and_then(|s| s.into_iter().nth(1))
                    .unwrap_or_default();
                let listed = if pattern.is_empty() {
                    // RFC 3501 §6.3.8: an empty pattern asks for the hierarchy delimiter.
                    format!("* {verb} (\\Noselect) \"/\" \"\"\r\n")
                } else {
                    format!("* {verb} (\\HasNoChildren) \"/\" INBOX\r\n")
                };
                format!("{listed}{tag} OK {verb} completed\r\n").into_bytes()
            }
            ("SELECT" | "EXAMINE", true) => {
                let mailbox_name = strings(args)
                    .and_then(|s| s.into_iter().next())
                    .unwrap_or_default();
                if !mailbox_name.eq_ignore_ascii_case(b"INBOX") {
                    self.selected = None;
                    return format!("{tag} NO [NONEXISTENT] The demo has INBOX only\r\n")
                        .into_bytes();
                }
                let messages = mailbox.snapshot(store::welcome(&self.welcome()));
                let n = messages.len();
                self.selected = Some(messages);
                format!(
                    "* FLAGS (\\Seen)\r\n* OK [PERMANENTFLAGS ()] Read-only demo\r\n* {n} EXISTS\r\n* 0 RECENT\r\n* OK [UIDVALIDITY 1] UIDs valid\r\n* OK [UIDNEXT {}] Predicted next UID\r\n{tag} OK [READ-ONLY] {verb} completed\r\n",
                    n + 1
                )
                .into_bytes()
            }
            ("STATUS", true) => {
                let n = mailbox.snapshot(Vec::new()).len();
                format!(
                    "* STATUS INBOX (MESSAGES {n} RECENT 0 UIDNEXT {} UIDVALIDITY 1 UNSEEN 0)\r\n{tag} OK STATUS completed\r\n",
                    n + 1
                )
                .into_bytes()
            }
            ("CLOSE" | "UNSELECT", true) => {
                self.selected = None;
                ok("Closed")
            }
            (verb, true) => match &self.selected {
                None => format!("{tag} BAD Select INBOX first\r\n").into_bytes(),
                Some(messages) => selected(tag, verb, &text, messages),
            },
        }
    }

    fn logged_in(&mut self, tag: &str) -> Vec<u8> {
        self.authenticated = true;
        tracing::info!("demo IMAP server: user demo logged in");
        format!("{tag} OK [CAPABILITY {CAPABILITY_AUTHENTICATED}] Logged in\r\n").into_bytes()
    }

    /// Message 1's text: what mailfront told this server about the client's TLS.
    fn welcome(&self) -> String {
        let told = match &self.id {
            Some(id) => {
                let tls = id_field(id, "tls").unwrap_or_else(|| "(none)".into());
                format!(
                    "Before your login, mailfront sent this server an IMAP ID command (RFC 2971)\n\
                     with a \"tls\" field naming the cipher that protects your session\n\
                     (draft-ietf-uta-email-deep section 7.1), so that a server such as Dovecot\n\
                     (imap_id_log = *) logs it:\n\
                     \n\
                     \x20 tls: {tls}\n\
                     \n\
                     The whole ID this server received from mailfront:\n\
                     \n\
                     \x20 ID {id}\n"
                )
            }
            None => "mailfront sent this server no ID command before your login.\n".into(),
        };
        format!(
            "You read this through mailfront: TLS from your client to mailfront's IMAP listener,\n\
             cleartext from mailfront to this demo IMAP server.\n\
             \n\
             {told}\n\
             Messages 2 and on are the ones you submitted through mailfront's SMTP listeners\n\
             (465 with implicit TLS, 587 with STARTTLS); each starts with the Received field\n\
             mailfront added, naming the cipher and key exchange group of the submission.\n"
        )
    }
}

/// AUTHENTICATE PLAIN (RFC 3501 §6.2.2), with SASL-IR (RFC 4959) or a continuation.
async fn authenticate(
    s: &mut Session,
    state: &mut State,
    tag: &str,
    args: &[u8],
) -> std::io::Result<Vec<u8>> {
    let args = io::text(args);
    let (mechanism, initial) = io::verb(&args);
    if mechanism != "PLAIN" {
        return Ok(format!("{tag} NO [CANNOT] The demo knows PLAIN only\r\n").into_bytes());
    }
    let response = if initial.is_empty() {
        s.get_mut().write_all(b"+ \r\n").await?;
        io::text(&io::read_line(s, MAX_LINE).await?.unwrap_or_default())
    } else {
        initial.to_owned()
    };
    Ok(if response == "*" {
        format!("{tag} BAD Authentication cancelled\r\n").into_bytes()
    } else if io::plain_ok(&response) {
        state.logged_in(tag)
    } else {
        format!(
            "{tag} NO [AUTHENTICATIONFAILED] Authentication failed (user demo, password demo)\r\n"
        )
        .into_bytes()
    })
}

/// Commands of the selected state: FETCH, SEARCH and their UID forms (UIDs are the message
/// numbers: nothing is ever expunged), and the read-only refusals.
fn selected(tag: &str, verb: &str, args: &str, messages: &[Arc<[u8]>]) -> Vec<u8> {
    let (verb, args, uid) = if verb == "UID" {
        let (sub, rest) = io::verb(args);
        (sub, rest, true)
    } else {
        (verb.to_owned(), args, false)
    };
    match verb.as_str() {
        "FETCH" => match fetch(args, uid, messages) {
            Ok(mut out) => {
                out.extend(format!("{tag} OK FETCH completed\r\n").into_bytes());
                out
            }
            Err(why) => format!("{tag} BAD {why}\r\n").into_bytes(),
        },
        "SEARCH" => {
            let all: Vec<String> = (1..=messages.len()).map(|n| n.to_string()).collect();
            format!(
                "* SEARCH {}\r\n{tag} OK SEARCH completed (the demo finds every message)\r\n",
                all.join(" ")
            )
            .into_bytes()
        }
        "STORE" | "COPY" | "MOVE" | "EXPUNGE" | "APPEND" => {
            format!("{tag} NO [CANNOT] The demo mailbox is read-only\r\n").into_bytes()
        }
        _ => format!("{tag} BAD Not implemented by the demo server\r\n").into_bytes(),
    }
}

/// The untagged FETCH responses for `set items`, or why not.
fn fetch(args: &str, uid: bool, messages: &[Arc<[u8]>]) -> Result<Vec<u8>, String> {
    let (set, items) = args
        .split_once(' ')
        .ok_or_else(|| "FETCH needs a sequence set and items".to_owned())?;
    let numbers = sequence_set(set, messages.len()).ok_or("bad sequence set")?;
    let mut wanted = fetch_items(items)?;
    if uid && !wanted.contains(&Item::Uid) {
        // RFC 3501 §6.4.8: UID FETCH answers always carry the UID.
        wanted.insert(0, Item::Uid);
    }
    let mut out = Vec::new();
    for n in numbers {
        let Some(message) = n.checked_sub(1).and_then(|i| messages.get(i)) else {
            continue;
        };
        let (header, text) = store::split(message);
        out.extend(format!("* {n} FETCH (").into_bytes());
        for (i, item) in wanted.iter().enumerate() {
            if i > 0 {
                out.push(b' ');
            }
            let literal = |name: &str, bytes: &[u8]| {
                let mut v = format!("{name} {{{}}}\r\n", bytes.len()).into_bytes();
                v.extend_from_slice(bytes);
                v
            };
            out.extend(match item {
                Item::Uid => format!("UID {n}").into_bytes(),
                Item::Flags => b"FLAGS (\\Seen)".to_vec(),
                Item::Size => format!("RFC822.SIZE {}", message.len()).into_bytes(),
                Item::InternalDate => b"INTERNALDATE \"01-Jan-2026 00:00:00 +0000\"".to_vec(),
                Item::Whole(name) => literal(name, message),
                Item::Header(name) => literal(name, header),
                Item::Text(name) => literal(name, text),
            });
        }
        out.extend_from_slice(b")\r\n");
    }
    Ok(out)
}

/// A FETCH data item the demo can answer; the name is how the response writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Item {
    Uid,
    Flags,
    Size,
    InternalDate,
    Whole(&'static str),
    Header(&'static str),
    Text(&'static str),
}

/// The items of a FETCH (RFC 3501 §6.4.5), one or a parenthesised list; partial ranges
/// (`<0.100>`) are ignored (the whole section is sent).
fn fetch_items(items: &str) -> Result<Vec<Item>, String> {
    let items = items.trim();
    let items = items
        .strip_prefix('(')
        .and_then(|i| i.strip_suffix(')'))
        .unwrap_or(items);
    // Split on spaces outside brackets: BODY[HEADER.FIELDS (A B)] is one item.
    let mut names = Vec::new();
    let mut depth = 0usize;
    let mut current = String::new();
    for c in items.chars() {
        match c {
            '[' => depth += 1,
            ']' => depth = depth.saturating_sub(1),
            _ => {}
        }
        if c == ' ' && depth == 0 {
            names.push(std::mem::take(&mut current));
        } else {
            current.push(c);
        }
    }
    names.push(current);
    let mut wanted = Vec::new();
    for name in names.iter().filter(|n| !n.is_empty()) {
        let upper = name.to_ascii_uppercase();
        let bare = upper.split_once('<').map_or(upper.as_str(), |(b, _)| b);
        let add: &[Item] = match bare {
            "UID" => &[Item::Uid],
            "FLAGS" => &[Item::Flags],
            "RFC822.SIZE" => &[Item::Size],
            "INTERNALDATE" => &[Item::InternalDate],
            "FAST" | "ALL" => &[Item::Flags, Item::InternalDate, Item::Size],
            "BODY[]" | "BODY.PEEK[]" => &[Item::Whole("BODY[]")],
            "RFC822" => &[Item::Whole("RFC822")],
            "BODY[HEADER]" | "BODY.PEEK[HEADER]" => &[Item::Header("BODY[HEADER]")],
            "RFC822.HEADER" => &[Item::Header("RFC822.HEADER")],
            "BODY[TEXT]" | "BODY.PEEK[TEXT]" => &[Item::Text("BODY[TEXT]")],
            "RFC822.TEXT" => &[Item::Text("RFC822.TEXT")],
            _ => {
                return Err(format!(
                    "FETCH {name} is not implemented by the demo server"
                ));
            }
        };
        for item in add {
            if !wanted.contains(item) {
                wanted.push(*item);
            }
        }
    }
    if wanted.is_empty() {
        return Err("FETCH needs items".into());
    }
    Ok(wanted)
}

/// A sequence set (`1`, `2:4`, `3:*`, `1,3`) over messages 1..=`count`, in order; numbers
/// outside are dropped (RFC 3501 §9, `seq-number`).
fn sequence_set(set: &str, count: usize) -> Option<BTreeSet<usize>> {
    let number = |s: &str| -> Option<usize> {
        if s == "*" {
            Some(count)
        } else {
            s.parse().ok().filter(|&n| n > 0)
        }
    };
    let mut numbers = BTreeSet::new();
    for part in set.split(',') {
        let (low, high) = match part.split_once(':') {
            Some((a, b)) => (number(a)?, number(b)?),
            None => (number(part)?, number(part)?),
        };
        let (low, high) = (low.min(high), low.max(high));
        numbers.extend((low.max(1)..=high.min(count)).filter(|n| *n >= 1));
    }
    Some(numbers)
}

/// Reads one command: its line, and for each literal (`{n}` or `{n+}` at a line's end) its
/// octets and the rest of the command (RFC 3501 §4.3, RFC 7888). `None` at the end of the
/// stream.
async fn read_command(s: &mut Session) -> std::io::Result<Option<Vec<u8>>> {
    let Some(mut command) = io::read_line(s, MAX_LINE).await? else {
        return Ok(None);
    };
    while let Some((n, synchronising)) = literal_at_end(&command) {
        if n > MAX_LITERAL || command.len() + n > MAX_COMMAND {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "literal too large for the demo",
            ));
        }
        if synchronising {
            s.get_mut().write_all(b"+ Ready\r\n").await?;
        }
        command.extend(io::read_exact(s, n).await?);
        let Some(rest) = io::read_line(s, MAX_LINE).await? else {
            return Ok(None);
        };
        command.extend(rest);
    }
    Ok(Some(command))
}

/// `{n}` (synchronising) or `{n+}` at the end of a line.
fn literal_at_end(line: &[u8]) -> Option<(usize, bool)> {
    let line = line.strip_suffix(b"\r\n")?;
    let line = line.strip_suffix(b"}")?;
    let open = line.iter().rposition(|&b| b == b'{')?;
    let (_, inner) = line.split_at_checked(open + 1)?;
    let (digits, synchronising) = match inner.strip_suffix(b"+") {
        Some(digits) => (digits, false),
        None => (inner, true),
    };
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some((n, synchronising))
}

/// The strings of a command's arguments: atoms, quoted strings and literals (RFC 3501 §4.3),
/// with parentheses skipped. `None` if one is malformed.
fn strings(mut input: &[u8]) -> Option<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    loop {
        while let Some(rest) = input
            .strip_prefix(b" ")
            .or_else(|| input.strip_prefix(b"("))
            .or_else(|| input.strip_prefix(b")"))
        {
            input = rest;
        }
        let Some((&first, rest)) = input.split_first() else {
            return Some(out);
        };
        match first {
            b'"' => {
                let mut value = Vec::new();
                let mut escaped = false;
                let mut end = None;
                for (i, &b) in rest.iter().enumerate() {
                    if escaped {
                        value.push(b);
                        escaped = false;
                    } else if b == b'\\' {
                        escaped = true;
                    } else if b == b'"' {
                        end = Some(i);
                        break;
                    } else {
                        value.push(b);
                    }
                }
                let (_, after) = rest.split_at_checked(end? + 1)?;
                out.push(value);
                input = after;
            }
            b'{' => {
                let close = rest.iter().position(|&b| b == b'}')?;
                let (digits, after) = rest.split_at_checked(close)?;
                let digits = digits.strip_suffix(b"+").unwrap_or(digits);
                let n: usize = std::str::from_utf8(digits).ok()?.parse().ok()?;
                let after = after.strip_prefix(b"}\r\n")?;
                let (value, after) = after.split_at_checked(n)?;
                out.push(value.to_vec());
                input = after;
            }
            _ => {
                let end = input
                    .iter()
                    .position(|&b| b == b' ' || b == b'(' || b == b')')
                    .unwrap_or(input.len());
                let (atom, after) = input.split_at_checked(end)?;
                out.push(atom.to_vec());
                input = after;
            }
        }
    }
}

/// The value of `field` in an ID parameter list (`("tls" "TLS_…" …)`), compared
/// case-insensitively (RFC 2971 §3.3).
fn id_field(id: &str, field: &str) -> Option<String> {
    let values = strings(id.as_bytes())?;
    values
        .chunks(2)
        .find(|pair| {
            pair.first()
                .is_some_and(|f| f.eq_ignore_ascii_case(field.as_bytes()))
        })
        .and_then(|pair| pair.get(1))
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_of_atoms_quoted_and_literals() {
        assert_eq!(
            strings(b"demo \"de\\\"mo\"").unwrap(),
            vec![b"demo".to_vec(), b"de\"mo".to_vec()]
        );
        assert_eq!(
            strings(b"{4}\r\ndemo {4+}\r\nd mo").unwrap(),
            vec![b"demo".to_vec(), b"d mo".to_vec()]
        );
        assert_eq!(strings(b"\"unterminated"), None);
        assert_eq!(strings(b"{9}\r\nshort"), None);
        assert_eq!(strings(b"").unwrap(), Vec::<Vec<u8>>::new());
    }

    #[test]
    fn literals_at_line_ends() {
        assert_eq!(literal_at_end(b"a LOGIN {4}\r\n"), Some((4, true)));
        assert_eq!(literal_at_end(b"a LOGIN {4+}\r\n"), Some((4, false)));
        assert_eq!(literal_at_end(b"a LOGIN {}\r\n"), None);
        assert_eq!(literal_at_end(b"a LOGIN x\r\n"), None);
    }

    #[test]
    fn id_fields() {
        let id = "(\"name\" \"x\" \"TLS\" \"TLS_AES_128_GCM_SHA256\" \"x-session-id\" NIL)";
        assert_eq!(id_field(id, "tls").unwrap(), "TLS_AES_128_GCM_SHA256");
        assert_eq!(id_field(id, "missing"), None);
    }

    #[test]
    fn sequence_sets() {
        let set = |s, n| sequence_set(s, n).map(|s| s.into_iter().collect::<Vec<_>>());
        assert_eq!(set("1", 3), Some(vec![1]));
        assert_eq!(set("2:*", 3), Some(vec![2, 3]));
        assert_eq!(set("*:2", 3), Some(vec![2, 3]));
        assert_eq!(set("1,3,9", 3), Some(vec![1, 3]));
        assert_eq!(set("1:*", 0), Some(vec![]));
        assert_eq!(set("0", 3), None);
        assert_eq!(set("x", 3), None);
    }

    #[test]
    fn fetch_items_and_responses() {
        assert_eq!(
            fetch_items("(UID RFC822.SIZE BODY.PEEK[])").unwrap(),
            vec![Item::Uid, Item::Size, Item::Whole("BODY[]")]
        );
        assert_eq!(fetch_items("RFC822").unwrap(), vec![Item::Whole("RFC822")]);
        assert!(fetch_items("(BODY.PEEK[HEADER.FIELDS (SUBJECT)])").is_err());
        let messages: Vec<Arc<[u8]>> = vec![Arc::from(&b"S: a\r\n\r\nbody\r\n"[..])];
        assert_eq!(
            fetch("1 BODY[]", true, &messages).unwrap(),
            b"* 1 FETCH (UID 1 BODY[] {14}\r\nS: a\r\n\r\nbody\r\n)\r\n"
        );
        assert_eq!(
            fetch("1:* (BODY[TEXT])", false, &messages).unwrap(),
            b"* 1 FETCH (BODY[TEXT] {6}\r\nbody\r\n)\r\n"
        );
        assert!(fetch("5 BODY[]", false, &messages).unwrap().is_empty());
    }
}
