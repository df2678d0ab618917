//! The POP3 gate: pure functions deciding what happens to each client command in the
//! AUTHORIZATION state (RFC 1939 §4, RFC 2595 §4, RFC 8314 §4.1, RFC 5034).
//!
//! Two phases, two functions, two result types. Before TLS ([`before_tls`]) there is no backend
//! at all and [`Local`] has no way to forward anything. After TLS ([`after_tls`]) only a
//! whitelist of parsed [`Request`]s goes on, as the canonical line mailfront builds.

pub use crate::config::TlsMode;
use crate::pop3::codec::{Command, Expect};
use crate::pop3::reply;
use crate::pop3::request::Request;

/// What mailfront does with a command on a `starttls` listener before STLS. Nothing here
/// reaches a backend: there is none yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Local {
    /// Write these bytes to the client.
    Reply(Vec<u8>),
    /// USER, PASS, APOP or AUTH with a mechanism in cleartext: write this refusal and count it
    /// (`mailfront_cleartext_auth_refused_total`).
    RefuseCredentials(Vec<u8>),
    /// Write these bytes, drop every client byte after this command (CERT VU#555316,
    /// RFC 2595 §4), run the TLS handshake.
    StartTls(Vec<u8>),
    /// Write these bytes and close (QUIT, RFC 1939 §6).
    Quit(Vec<u8>),
}

/// Decides a command received in cleartext on a `starttls` listener.
pub fn before_tls(cmd: &Command) -> Local {
    // Whatever the credential and however malformed, one answer (RFC 8314 §4.1): the reply
    // must not tell a scanner anything about the account or its syntax.
    if ["USER", "PASS", "APOP"].iter().any(|k| cmd.is(k)) {
        return Local::RefuseCredentials(reply::err_cleartext_auth());
    }
    if cmd.is("AUTH") {
        // A bare AUTH is mechanism discovery, not an attempt: same refusal, not counted.
        return if cmd.has_arguments() {
            Local::RefuseCredentials(reply::err_cleartext_auth())
        } else {
            Local::Reply(reply::err_cleartext_auth())
        };
    }
    if cmd.is("XCLIENT") || cmd.is("XOIP") {
        return Local::Reply(reply::err_not_permitted());
    }
    match Request::parse(cmd) {
        Ok(Request::Capa) => Local::Reply(reply::capa_before_tls()),
        Ok(Request::Stls) => Local::StartTls(reply::stls_ok()),
        Ok(Request::Quit) => Local::Quit(reply::quit_ok()),
        Ok(Request::Noop | Request::Rset) => Local::Reply(reply::err_not_authorized_yet()),
        Ok(
            Request::User(_)
            | Request::Pass(_)
            | Request::Apop { .. }
            | Request::AuthList
            | Request::Auth { .. },
        ) => Local::RefuseCredentials(reply::err_cleartext_auth()),
        Err(_) if cmd.is("STLS") => Local::Reply(reply::stls_malformed()),
        Err(e) => Local::Reply(e.reply()),
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Write `request.canonical()` to the backend and call `ResponseReceiver::expect(expect)`.
    /// For [`Expect::Sasl`] also call `CommandReceiver::begin_sasl` (and `end_sasl` on the final
    /// response). For [`Expect::Authentication`] and [`Expect::Sasl`] hold further client bytes
    /// until the response: `Response::authenticated()` → relay mode.
    Forward { request: Request, expect: Expect },
    /// Write these bytes to the client; nothing reaches the backend.
    Reply(Vec<u8>),
}

/// Decides a command received over TLS (implicit, or after STLS) before authentication, the
/// same on every listener.
pub fn after_tls(cmd: &Command) -> Decision {
    // Dovecot and Postfix trust these from mailfront's address; a client must never reach them.
    if cmd.is("XCLIENT") || cmd.is("XOIP") {
        return Decision::Reply(reply::err_not_permitted());
    }
    let request = match Request::parse(cmd) {
        Ok(request) => request,
        Err(_) if cmd.is("STLS") => return Decision::Reply(reply::stls_malformed()),
        Err(e) => return Decision::Reply(e.reply()),
    };
    let expect = match &request {
        Request::Stls => return Decision::Reply(reply::stls_refused()),
        Request::Noop | Request::Rset => {
            return Decision::Reply(reply::err_not_authorized_yet());
        }
        // The client never sees the backend's greeting: mailfront greets every session itself
        // (on 995 too, since the backend is connected only for a login), with no APOP
        // timestamp (RFC 1939 §7) to digest, so whatever it sends cannot be right.
        Request::Apop { .. } => return Decision::Reply(reply::err_apop_unavailable()),
        Request::Capa | Request::AuthList => Expect::MultiLine,
        Request::Pass(_) => Expect::Authentication,
        Request::Auth { .. } => Expect::Sasl,
        Request::User(_) | Request::Quit => Expect::SingleLine,
    };
    Decision::Forward { request, expect }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::line::split::{CHUNKS, drive};
    use crate::pop3::codec::{ClientEvent, CommandLimits, CommandReceiver, SaslLine};

    fn cmd(line: &[u8]) -> Command {
        match CommandReceiver::default().next(line).event {
            Some(ClientEvent::Command(c)) => c,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn before_tls_everything_is_answered_locally() {
        let refused = || Local::RefuseCredentials(reply::err_cleartext_auth());
        let rows: Vec<(&[u8], Local)> = vec![
            // Credentials: one answer whatever they are, well-formed or not.
            (b"USER alice\r\n", refused()),
            (b"user bob\r\n", refused()),
            (b"USER\r\n", refused()),
            (b"PASS secret\r\n", refused()),
            (b"PASS\r\n", refused()),
            (
                b"APOP alice c4c9334bac560ecc979e58001b3e22fb\r\n",
                refused(),
            ),
            (b"APOP x\r\n", refused()),
            (b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n", refused()),
            (b"AUTH PLAIN\r\n", refused()),
            (b"AUTH PLAIN !!!\r\n", refused()),
            // Discovery: the same refusal, not counted as an attempt.
            (b"AUTH\r\n", Local::Reply(reply::err_cleartext_auth())),
            (b"CAPA\r\n", Local::Reply(reply::capa_before_tls())),
            (b"capa\r\n", Local::Reply(reply::capa_before_tls())),
            (
                b"CAPA x\r\n",
                Local::Reply(b"-ERR Command takes no arguments\r\n".to_vec()),
            ),
            (b"STLS\r\n", Local::StartTls(reply::stls_ok())),
            (b"stls\r\n", Local::StartTls(reply::stls_ok())),
            (b"STLS now\r\n", Local::Reply(reply::stls_malformed())),
            (b"QUIT\r\n", Local::Quit(reply::quit_ok())),
            (b"NOOP\r\n", Local::Reply(reply::err_not_authorized_yet())),
            (b"RSET\r\n", Local::Reply(reply::err_not_authorized_yet())),
            (
                b"XCLIENT ADDR=1.2.3.4\r\n",
                Local::Reply(reply::err_not_permitted()),
            ),
            (
                b"XOIP 1.2.3.4\r\n",
                Local::Reply(reply::err_not_permitted()),
            ),
            (
                b"STAT\r\n",
                Local::Reply(b"-ERR Unknown command\r\n".to_vec()),
            ),
            (
                b"RETR 1\r\n",
                Local::Reply(b"-ERR Unknown command\r\n".to_vec()),
            ),
        ];
        for (line, want) in rows {
            assert_eq!(
                before_tls(&cmd(line)),
                want,
                "{:?}",
                String::from_utf8_lossy(line)
            );
        }
        assert_eq!(
            reply::capa_before_tls(),
            b"+OK Capability list follows\r\nSTLS\r\n.\r\n"
        );
    }

    #[test]
    fn after_tls_only_the_whitelist_is_forwarded_in_canonical_form() {
        use Expect::*;
        let fwd = |line: &[u8], expect| Ok((line.to_vec(), expect));
        let err = |reply: &[u8]| Err(reply.to_vec());
        let not_permitted = reply::err_not_permitted();
        let unknown = b"-ERR Unknown command\r\n";
        type Row<'a> = (&'a [u8], Result<(Vec<u8>, Expect), Vec<u8>>);
        let rows: Vec<Row> = vec![
            (b"user alice\r\n", fwd(b"USER alice\r\n", SingleLine)),
            (b"USER\r\n", err(b"-ERR Missing argument\r\n")),
            (b"PASS a b \r\n", fwd(b"PASS a b \r\n", Authentication)),
            // mailfront greets every session itself, with no APOP timestamp (RFC 1939 §7): a
            // client has nothing to digest, on 995 as on 110.
            (
                b"APOP alice c4c9334bac560ecc979e58001b3e22fb\r\n",
                Err(reply::err_apop_unavailable()),
            ),
            (b"auth plain =\r\n", fwd(b"AUTH PLAIN =\r\n", Sasl)),
            (b"AUTH PLAIN\r\n", fwd(b"AUTH PLAIN\r\n", Sasl)),
            (b"AUTH\r\n", fwd(b"AUTH\r\n", MultiLine)),
            (
                b"AUTH PLAIN AG!=\r\n",
                err(b"-ERR Invalid base64 in the initial response\r\n"),
            ),
            (b"CAPA\r\n", fwd(b"CAPA\r\n", MultiLine)),
            (b"QUIT\r\n", fwd(b"QUIT\r\n", SingleLine)),
            (b"STLS\r\n", Err(reply::stls_refused())),
            (b"STLS\r\n", Err(reply::stls_refused())),
            (b"STLS x\r\n", Err(reply::stls_malformed())),
            (b"NOOP\r\n", Err(reply::err_not_authorized_yet())),
            (b"XCLIENT ADDR=1.2.3.4\r\n", Err(not_permitted.clone())),
            (b"xoip 1.2.3.4\r\n", Err(not_permitted)),
            (b"LIST\r\n", err(unknown)),
            (b"RETR 1\r\n", err(unknown)),
            (b"UTF8\r\n", err(unknown)),
        ];
        for (line, want) in rows {
            let got = match after_tls(&cmd(line)) {
                Decision::Forward { request, expect } => Ok((request.canonical(), expect)),
                Decision::Reply(r) => Err(r),
            };
            assert_eq!(got, want, "{:?}", String::from_utf8_lossy(line));
        }
    }

    /// What a session would do with `input`: the replies mailfront writes itself and the bytes
    /// it writes to the backend. An AUTH exchange takes one SASL line, then the (simulated)
    /// backend ends it.
    fn transcript(input: &[u8], tls: bool, chunk: usize) -> (Vec<u8>, Vec<u8>) {
        let limits = CommandLimits {
            command: 32,
            sasl_line: 48,
        };
        let mut replies = Vec::new();
        let mut backend = Vec::new();
        drive(
            &mut CommandReceiver::new(limits),
            input,
            chunk,
            |rx, buf| rx.next(buf),
            |rx, event| {
                match event {
                    ClientEvent::Rejected(r) => replies.extend_from_slice(&r.reply()),
                    ClientEvent::SaslResponse(line) => {
                        backend.extend_from_slice(&line.canonical());
                        rx.end_sasl();
                    }
                    ClientEvent::Command(c) if !tls => match before_tls(c) {
                        Local::Reply(r) | Local::RefuseCredentials(r) => {
                            replies.extend_from_slice(&r)
                        }
                        Local::StartTls(r) | Local::Quit(r) => {
                            replies.extend_from_slice(&r);
                            return false;
                        }
                    },
                    ClientEvent::Command(c) => match after_tls(c) {
                        Decision::Reply(r) => replies.extend_from_slice(&r),
                        Decision::Forward { request, expect } => {
                            backend.extend_from_slice(&request.canonical());
                            if expect == Expect::Sasl {
                                rx.begin_sasl();
                            }
                        }
                    },
                }
                true
            },
        );
        (replies, backend)
    }

    /// The adversarial table: each input through the strict framer and the gate, before and
    /// after TLS, fed whole and in every chunk size. Before TLS nothing is ever forwarded; after
    /// TLS exactly the listed canonical lines are.
    #[test]
    fn adversarial_lines_are_refused_locally_and_never_forwarded_raw() {
        let bare_lf = b"-ERR Command lines must end with CRLF\r\n".to_vec();
        let octet = b"-ERR CR or NUL not allowed in a command line\r\n".to_vec();
        let unknown = b"-ERR Unknown command\r\n".to_vec();
        let long = b"-ERR Command line too long\r\n".to_vec();
        let refused = reply::err_cleartext_auth();
        // (input, replies before TLS, replies after TLS, forwarded after TLS)
        type Row<'a> = (&'a [u8], Vec<u8>, Vec<u8>, &'a [u8]);
        let rows: Vec<Row> = vec![
            (b"USER a\n", bare_lf.clone(), bare_lf.clone(), b""),
            (
                b"USER a\nPASS b\r\n",
                [bare_lf.clone(), refused.clone()].concat(),
                bare_lf.clone(),
                b"PASS b\r\n",
            ),
            (b"USER a\rPASS b\r\n", octet.clone(), octet.clone(), b""),
            (b"USER a\r\rPASS b\r\n", octet.clone(), octet.clone(), b""),
            (b"USER a\0b\r\n", octet.clone(), octet.clone(), b""),
            (b"CAPA\0\r\n", octet.clone(), octet.clone(), b""),
            (b"\r\n", unknown.clone(), unknown.clone(), b""),
            (b"\n", bare_lf.clone(), bare_lf.clone(), b""),
            (b" USER a\r\n", unknown.clone(), unknown.clone(), b""),
            (b"USER\ta\r\n", unknown.clone(), unknown.clone(), b""),
            (b"US\xffER a\r\n", unknown.clone(), unknown.clone(), b""),
            (
                b"USER \xc3\xa9\r\n",
                refused.clone(),
                Vec::new(),
                b"USER \xc3\xa9\r\n",
            ),
            (b"user  a\r\n", refused.clone(), Vec::new(), b"USER  a\r\n"),
            (
                b"pass  two words\r\n",
                refused.clone(),
                Vec::new(),
                b"PASS  two words\r\n",
            ),
            (
                b"USER\r\n",
                refused.clone(),
                b"-ERR Missing argument\r\n".to_vec(),
                b"",
            ),
            (
                b"XCLIENT ADDR=1.2.3.4\r\n",
                reply::err_not_permitted(),
                reply::err_not_permitted(),
                b"",
            ),
            // 32 octets with CRLF is the limit; one more is refused whole.
            (
                b"USER aaaaaaaaaaaaaaaaaaaaaaaaa\r\n",
                refused.clone(),
                Vec::new(),
                b"USER aaaaaaaaaaaaaaaaaaaaaaaaa\r\n",
            ),
            (
                b"USER aaaaaaaaaaaaaaaaaaaaaaaaaa\r\nCAPA\r\n",
                [long.clone(), reply::capa_before_tls()].concat(),
                long.clone(),
                b"CAPA\r\n",
            ),
            // AUTH continuation lines: base64 re-emitted, `*` kept, anything else a `*`.
            (
                b"AUTH PLAIN\r\nAGFsaWNlAHNlY3JldA==\r\n",
                [refused.clone(), unknown.clone()].concat(),
                Vec::new(),
                b"AUTH PLAIN\r\nAGFsaWNlAHNlY3JldA==\r\n",
            ),
            (
                b"AUTH PLAIN\r\n\r\n",
                [refused.clone(), unknown.clone()].concat(),
                Vec::new(),
                b"AUTH PLAIN\r\n\r\n",
            ),
            (
                b"AUTH PLAIN\r\n*\r\n",
                [refused.clone(), unknown.clone()].concat(),
                Vec::new(),
                b"AUTH PLAIN\r\n*\r\n",
            ),
            (
                b"AUTH PLAIN\r\nUSER a\r\n",
                [refused.clone(), refused.clone()].concat(),
                Vec::new(),
                b"AUTH PLAIN\r\n*\r\n",
            ),
            (
                b"AUTH PLAIN\r\nAGFs\n",
                [refused.clone(), bare_lf.clone()].concat(),
                Vec::new(),
                b"AUTH PLAIN\r\n*\r\n",
            ),
            (
                b"AUTH PLAIN\r\nAG\rFs\r\n",
                [refused.clone(), octet.clone()].concat(),
                Vec::new(),
                b"AUTH PLAIN\r\n*\r\n",
            ),
            (
                b"AUTH PLAIN\r\nAG\0Fs\r\n",
                [refused.clone(), octet.clone()].concat(),
                Vec::new(),
                b"AUTH PLAIN\r\n*\r\n",
            ),
            (
                b"AUTH PLAIN\r\n* \r\n",
                [refused.clone(), unknown.clone()].concat(),
                Vec::new(),
                b"AUTH PLAIN\r\n*\r\n",
            ),
            (
                b"AUTH PLAIN AG!=\r\n",
                refused.clone(),
                b"-ERR Invalid base64 in the initial response\r\n".to_vec(),
                b"",
            ),
            // STLS: what follows it is never looked at.
            (
                b"STLS\r\nUSER evil\r\n",
                reply::stls_ok(),
                [reply::stls_refused(), Vec::new()].concat(),
                b"USER evil\r\n",
            ),
        ];
        for (input, before, after, forwarded) in rows {
            let name = String::from_utf8_lossy(input);
            for chunk in std::iter::once(0).chain(CHUNKS) {
                let (replies, backend) = transcript(input, false, chunk);
                assert!(backend.is_empty(), "{name:?}");
                assert_eq!(
                    String::from_utf8_lossy(&replies),
                    String::from_utf8_lossy(&before),
                    "before TLS {name:?} chunk {chunk}"
                );
                let (replies, backend) = transcript(input, true, chunk);
                assert_eq!(
                    String::from_utf8_lossy(&replies),
                    String::from_utf8_lossy(&after),
                    "after TLS {name:?} chunk {chunk}"
                );
                assert_eq!(
                    String::from_utf8_lossy(&backend),
                    String::from_utf8_lossy(forwarded),
                    "forwarded {name:?} chunk {chunk}"
                );
            }
        }
        // SASL lines are not commands: a cancel stays a cancel.
        assert_eq!(SaslLine::Cancel.canonical(), b"*\r\n");
    }
}
