//! The demo's one mailbox, shared by its SMTP server (which adds to it) and its IMAP and POP3
//! servers (which read it). In memory only; message 1 is always a welcome message made for the
//! reader, so the first message submitted is message 2.

use std::sync::{Arc, Mutex, PoisonError};

/// The most messages the mailbox keeps: a demo, not a mail store.
pub const MAX_MESSAGES: usize = 100;
/// The largest message the SMTP server takes (advertised as SIZE).
pub const MAX_MESSAGE: usize = 1024 * 1024;

/// The messages submitted so far, oldest first.
#[derive(Debug, Default)]
pub struct Mailbox {
    messages: Mutex<Vec<Arc<[u8]>>>,
}

impl Mailbox {
    /// Adds a message; returns its number as IMAP and POP3 show it (the welcome message is 1),
    /// or `None` when the mailbox is full.
    pub fn add(&self, message: Vec<u8>) -> Option<usize> {
        let mut messages = self.messages.lock().unwrap_or_else(PoisonError::into_inner);
        if messages.len() >= MAX_MESSAGES {
            return None;
        }
        messages.push(message.into());
        Some(messages.len() + 1)
    }

    /// The messages as a session sees them from now on: `welcome` first, then every message
    /// submitted so far.
    pub fn snapshot(&self, welcome: Vec<u8>) -> Vec<Arc<[u8]>> {
        let messages = self.messages.lock().unwrap_or_else(PoisonError::into_inner);
        std::iter::once(Arc::from(welcome))
            .chain(messages.iter().cloned())
            .collect()
    }
}

/// The welcome message: `body` under a few header fields, CRLF line ends.
pub fn welcome(body: &str) -> Vec<u8> {
    let date = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc2822)
        .unwrap_or_default();
    let mut text = format!(
        "From: mailfront demo <demo@mailfront.demo>\n\
         To: demo@example.test\n\
         Subject: Welcome to the mailfront demo\n\
         Date: {date}\n\
         Message-ID: <welcome@mailfront.demo>\n\
         \n\
         {body}"
    );
    if !text.ends_with('\n') {
        text.push('\n');
    }
    text.replace('\n', "\r\n").into_bytes()
}

/// The header of a message (up to and including the empty line), and its body.
pub fn split(message: &[u8]) -> (&[u8], &[u8]) {
    match message.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(end) => message.split_at(end + 4),
        None => (message, &[]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_start_after_the_welcome_message() {
        let mailbox = Mailbox::default();
        assert_eq!(mailbox.add(b"a\r\n".to_vec()), Some(2));
        assert_eq!(mailbox.add(b"b\r\n".to_vec()), Some(3));
        let seen = mailbox.snapshot(b"w\r\n".to_vec());
        assert_eq!(seen.len(), 3);
        assert_eq!(&*seen[0], b"w\r\n");
        assert_eq!(&*seen[2], b"b\r\n");
        for _ in 3..MAX_MESSAGES + 1 {
            mailbox.add(Vec::new());
        }
        assert_eq!(mailbox.add(Vec::new()), None);
    }

    #[test]
    fn welcome_has_crlf_and_splits() {
        let message = welcome("line one\nline two\n");
        assert!(!message.windows(2).any(|w| w[1] == b'\n' && w[0] != b'\r'));
        let (header, body) = split(&message);
        assert!(header.starts_with(b"From: "));
        assert!(header.ends_with(b"\r\n\r\n"));
        assert_eq!(body, b"line one\r\nline two\r\n");
    }
}
