//! The IMAP ID command (RFC 2971) with mailfront's `tls` field (draft-ietf-uta-email-deep §7.1).
//!
//! The backend must see mailfront's fields on the first ID of the connection, because Dovecot
//! trusts only that one. So a client ID is rewritten rather than forwarded: fields the client
//! must not set (they would be trusted as coming from mailfront) are removed, mailfront's own are
//! added, and the result keeps RFC 2971 §3.3's limits. Without a client ID the driver sends its
//! own with [`build_id_command`] and a tag from [`mailfront_tag`]. The client's ID is parsed by the
//! same strict receiver as every pre-login command ([`crate::imap::command`]).

/// RFC 2971 §3.3: "Implementations MUST NOT send more than 30 field-value pairs."
pub const MAX_PAIRS: usize = 30;
/// RFC 2971 §3.3: "Field strings MUST NOT be longer than 30 octets."
pub const MAX_FIELD_LEN: usize = 30;
/// RFC 2971 §3.3: "Value strings MUST NOT be longer than 1024 octets."
pub const MAX_VALUE_LEN: usize = 1024;
/// Longest ID line mailfront sends: half of Dovecot's 8 KB pre-login line limit
/// (`IMAP_LOGIN_MAX_LINE_LENGTH`), room enough for every real client's ID.
pub const MAX_ID_LINE: usize = 4096;

/// One field-value pair; `value: None` is NIL ("can not or will not specify").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdPair {
    pub field: Vec<u8>,
    pub value: Option<Vec<u8>>,
}

/// A parsed client `tag ID …` command; `params: None` is `ID NIL`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdCommand {
    pub tag: Vec<u8>,
    pub params: Option<Vec<IdPair>>,
}

/// Fields a client must not set, compared case-insensitively (RFC 2971 §3.3: strings are not
/// case-sensitive): mailfront's own `tls`, and Dovecot's proxy fields that it trusts from
/// `login_trusted_networks`, where mailfront sits: a client that set them would be believed.
pub fn is_reserved_field(field: &[u8]) -> bool {
    let lower = field.to_ascii_lowercase();
    let exact = [
        &b"tls"[..],
        b"x-session-id",
        b"x-session-ext-id",
        b"x-proxy-ttl",
        b"x-client-transport",
        b"x-multiplex",
    ];
    let prefixes = [&b"x-originating-"[..], b"x-connected-", b"x-forward-"];
    exact.contains(&lower.as_slice()) || prefixes.iter().any(|p| lower.starts_with(p))
}

/// What an IMAP4rev1 quoted string can carry: 7-bit TEXT-CHARs, no CR, LF or NUL (RFC 3501 §9;
/// RFC 9051 §4.3 allows UTF-8 only to IMAP4rev2 peers, and a strict backend parser refuses it).
/// Other pairs are dropped rather than sent as literals, which would need a round trip with the
/// backend; ID is informational, so losing one costs nothing.
fn quotable(s: &[u8]) -> bool {
    s.iter()
        .all(|&b| (0x01..=0x7f).contains(&b) && b != b'\r' && b != b'\n')
}

fn pair_fits(field: &[u8], value: Option<&[u8]>) -> bool {
    !field.is_empty()
        && field.len() <= MAX_FIELD_LEN
        && quotable(field)
        && value.is_none_or(|v| v.len() <= MAX_VALUE_LEN && quotable(v))
}

fn push_quoted(out: &mut Vec<u8>, s: &[u8]) {
    out.push(b'"');
    for &b in s {
        if b == b'"' || b == b'\\' {
            out.push(b'\\');
        }
        out.push(b);
    }
    out.push(b'"');
}

fn write_command(tag: &[u8], pairs: &[(&[u8], Option<&[u8]>)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + pairs.len() * 32);
    out.extend_from_slice(tag);
    out.extend_from_slice(b" ID ");
    if pairs.is_empty() {
        out.extend_from_slice(b"NIL\r\n");
        return out;
    }
    out.push(b'(');
    for (i, (field, value)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push(b' ');
        }
        push_quoted(&mut out, field);
        out.push(b' ');
        match value {
            Some(value) => push_quoted(&mut out, value),
            None => out.extend_from_slice(b"NIL"),
        }
    }
    out.extend_from_slice(b")\r\n");
    out
}

fn our_pairs<'a>(ours: &'a [(&'a str, &'a str)]) -> Vec<(&'a [u8], Option<&'a [u8]>)> {
    ours.iter()
        .map(|(f, v)| (f.as_bytes(), Some(v.as_bytes())))
        .filter(|(f, v)| pair_fits(f, *v))
        .take(MAX_PAIRS)
        .collect()
}

/// Rewrites a client ID for the backend: reserved fields and any field named like one of
/// `ours` removed, pairs over the RFC 2971 limits or unquotable dropped, `ours` appended
/// (e.g. `[("tls", "TLS_AES_128_GCM_SHA256")]`). `ID NIL` becomes `ID (ours…)`.
///
/// When the client already sent 30 pairs, its *last* ones are dropped to make room: ID is
/// informational (servers "MUST NOT make operational changes based on the data"), so losing a
/// client field is harmless while refusing the command would break clients for nothing.
pub fn rewrite_client_id(cmd: &IdCommand, ours: &[(&str, &str)]) -> Vec<u8> {
    let ours = our_pairs(ours);
    let room = MAX_PAIRS.saturating_sub(ours.len());
    let clients = cmd.params.iter().flatten().filter(|pair| {
        !is_reserved_field(&pair.field)
            && !ours
                .iter()
                .any(|(f, _)| f.eq_ignore_ascii_case(&pair.field))
            && pair_fits(&pair.field, pair.value.as_deref())
    });
    let mut pairs: Vec<(&[u8], Option<&[u8]>)> = clients
        .take(room)
        .map(|pair| (pair.field.as_slice(), pair.value.as_deref()))
        .collect();
    let client_pairs = pairs.len();
    pairs.extend(ours);
    // 30 pairs of 1024-octet values make a 31 KB line, which Dovecot refuses (its pre-login
    // line limit is 8 KB): then our `tls` would never be recorded. The client's last pairs go.
    let mut dropped = 0;
    loop {
        let line = write_command(&cmd.tag, &pairs);
        if line.len() <= MAX_ID_LINE || dropped == client_pairs {
            return line;
        }
        dropped += 1;
        pairs.remove(client_pairs - dropped);
    }
}

/// mailfront's own `tag ID (…)\r\n`, sent when the client has not sent ID before LOGIN or
/// AUTHENTICATE. The driver swallows the backend's `* ID` and the tagged completion.
pub fn build_id_command(tag: &[u8], ours: &[(&str, &str)]) -> Vec<u8> {
    write_command(tag, &our_pairs(ours))
}

/// A tag for mailfront's own commands: `mf` + 16 lowercase hex digits of `random` (pass
/// `fastrand::u64(..)`). A client tag of that shape is refused before login
/// ([`is_mailfront_tag`]), so the backend's answer to one of ours can never be taken for the
/// answer to a client's command, or the other way round.
pub fn mailfront_tag(random: u64) -> Vec<u8> {
    format!("mf{random:016x}").into_bytes()
}

/// Whether `tag` has the shape of [`mailfront_tag`] (tags compare exactly, RFC 9051 §2.2.1).
pub fn is_mailfront_tag(tag: &[u8]) -> bool {
    tag.len() == 18
        && tag.starts_with(b"mf")
        && tag
            .get(2..)
            .is_some_and(|hex| hex.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::imap::command::{Command, CommandReceiver, Event, Limits};

    /// Parses `raw` as the pre-login receiver does, every literal accepted: the ID, or `Err`.
    fn parse_id_command(raw: &[u8]) -> Result<IdCommand, ()> {
        let mut rx = CommandReceiver::new(Limits::default());
        let mut buf = raw.to_vec();
        loop {
            let step = rx.next(&buf);
            buf.drain(..step.consumed);
            match step.event {
                Some(Event::LiteralRequested { .. }) => rx.accept_literal(),
                Some(Event::Command {
                    command: Command::Id(id),
                    ..
                }) => return Ok(id),
                _ => return Err(()),
            }
        }
    }

    const OURS: &[(&str, &str)] = &[("tls", "TLS_AES_256_GCM_SHA384")];

    fn rewrite(raw: &[u8]) -> Vec<u8> {
        rewrite_client_id(&parse_id_command(raw).unwrap(), OURS)
    }

    #[test]
    fn client_id_gets_the_tls_field_appended() {
        assert_eq!(
            rewrite(b"a ID (\"name\" \"Thunderbird\" \"version\" \"128\")\r\n"),
            b"a ID (\"name\" \"Thunderbird\" \"version\" \"128\" \"tls\" \"TLS_AES_256_GCM_SHA384\")\r\n"
        );
    }

    #[test]
    fn id_nil_becomes_a_list_with_the_tls_field() {
        assert_eq!(
            rewrite(b"a ID NIL\r\n"),
            b"a ID (\"tls\" \"TLS_AES_256_GCM_SHA384\")\r\n"
        );
        assert_eq!(
            rewrite(b"a id nil\r\n"),
            b"a ID (\"tls\" \"TLS_AES_256_GCM_SHA384\")\r\n"
        );
        assert_eq!(
            rewrite(b"a ID ()\r\n"),
            b"a ID (\"tls\" \"TLS_AES_256_GCM_SHA384\")\r\n"
        );
    }

    #[test]
    fn forged_tls_and_dovecot_proxy_fields_are_removed_case_insensitively() {
        let out = rewrite(
            b"a ID (\"TLS\" \"fake\" \"X-Originating-IP\" \"1.2.3.4\" \"x-multiplex\" \"0\" \"x-forward-foo\" \"bar\" \"X-Session-Id\" \"s\" \"X-CONNECTED-IP\" \"1\" \"x-proxy-ttl\" \"9\" \"x-client-transport\" \"TLS\" \"x-session-ext-id\" \"e\" \"name\" \"mutt\")\r\n",
        );
        assert_eq!(
            out,
            b"a ID (\"name\" \"mutt\" \"tls\" \"TLS_AES_256_GCM_SHA384\")\r\n"
        );
    }

    #[test]
    fn pairs_a_strict_imap4rev1_parser_would_refuse_quoted_are_dropped() {
        // Found by the imap_prelogin fuzz target: imap-codec, like any IMAP4rev1 server, refuses
        // 8-bit octets in a quoted string, so such a pair must not reach the backend quoted.
        let cmd = IdCommand {
            tag: b"a".to_vec(),
            params: Some(vec![
                IdPair {
                    field: b"\x99*tls".to_vec(),
                    value: Some(b"x".to_vec()),
                },
                IdPair {
                    field: b"name".to_vec(),
                    value: Some("mütt".as_bytes().to_vec()),
                },
                IdPair {
                    field: b"version".to_vec(),
                    value: Some(b"1".to_vec()),
                },
            ]),
        };
        assert_eq!(
            rewrite_client_id(&cmd, OURS),
            b"a ID (\"version\" \"1\" \"tls\" \"TLS_AES_256_GCM_SHA384\")\r\n"
        );
    }

    #[test]
    fn an_id_too_long_for_the_backend_loses_the_clients_last_pairs_not_ours() {
        let params = (0..30)
            .map(|i| IdPair {
                field: format!("f{i}").into_bytes(),
                value: Some(vec![b'v'; MAX_VALUE_LEN]),
            })
            .collect();
        let cmd = IdCommand {
            tag: b"a".to_vec(),
            params: Some(params),
        };
        let out = rewrite_client_id(&cmd, OURS);
        assert!(out.len() <= MAX_ID_LINE, "{}", out.len());
        assert!(out.starts_with(b"a ID (\"f0\" \""));
        assert!(out.ends_with(b" \"tls\" \"TLS_AES_256_GCM_SHA384\")\r\n"));
    }

    #[test]
    fn our_tags_have_a_shape_we_can_recognise() {
        for seed in [0, 1, u64::MAX, 0x0123_4567_89ab_cdef] {
            assert!(is_mailfront_tag(&mailfront_tag(seed)));
        }
        for other in [
            &b"mf"[..],
            b"mfc",
            b"MF0123456789abcdef",
            b"mf0123456789abcdeg",
            b"a1",
        ] {
            assert!(!is_mailfront_tag(other), "{other:?}");
        }
    }

    #[test]
    fn a_field_named_like_one_of_ours_is_removed() {
        let ours = [("tls", "X"), ("x-originating-ip", "10.0.0.1")];
        let cmd = parse_id_command(b"a ID (\"name\" \"m\")\r\n").unwrap();
        assert_eq!(
            rewrite_client_id(&cmd, &ours),
            b"a ID (\"name\" \"m\" \"tls\" \"X\" \"x-originating-ip\" \"10.0.0.1\")\r\n"
        );
    }

    #[test]
    fn thirty_client_pairs_leave_room_for_ours_by_dropping_the_last() {
        let mut raw = b"a ID (".to_vec();
        for i in 0..30 {
            raw.extend_from_slice(format!("\"f{i}\" \"v{i}\" ").as_bytes());
        }
        raw.pop();
        raw.extend_from_slice(b")\r\n");
        let out = parse_id_command(&rewrite(&raw)).unwrap();
        let pairs = out.params.unwrap();
        assert_eq!(pairs.len(), MAX_PAIRS);
        assert_eq!(pairs[28].field, b"f28");
        assert_eq!(pairs[29].field, b"tls");
        assert!(!pairs.iter().any(|p| p.field == b"f29"));
    }

    #[test]
    fn oversized_fields_and_values_are_dropped() {
        let long_field = "f".repeat(31);
        let long_value = "v".repeat(1025);
        // The receiver refuses such an ID outright; the rewrite drops them on its own too.
        let pair = |f: &str, v: &str| IdPair {
            field: f.as_bytes().to_vec(),
            value: Some(v.as_bytes().to_vec()),
        };
        let cmd = IdCommand {
            tag: b"a".to_vec(),
            params: Some(vec![
                pair(&long_field, "x"),
                pair("ok", &long_value),
                pair("keep", &"v".repeat(1024)),
            ]),
        };
        let out = parse_id_command(&rewrite_client_id(&cmd, OURS)).unwrap();
        let fields: Vec<_> = out.params.unwrap().into_iter().map(|p| p.field).collect();
        assert_eq!(fields, vec![b"keep".to_vec(), b"tls".to_vec()]);
    }

    #[test]
    fn literal_values_are_read_and_rewritten_as_quoted_strings() {
        let out = rewrite(b"a ID (\"name\" {4}\r\nmu\"t \"os\" {5+}\r\nLinux \"x\" NIL)\r\n");
        assert_eq!(out, b"a ID (\"name\" \"mu\\\"t\" \"os\" \"Linux\" \"x\" NIL \"tls\" \"TLS_AES_256_GCM_SHA384\")\r\n");
    }

    #[test]
    fn values_that_cannot_be_quoted_are_dropped() {
        let out = rewrite(b"a ID (\"name\" {3}\r\na\r\n \"os\" \"x\")\r\n");
        assert_eq!(
            out,
            b"a ID (\"os\" \"x\" \"tls\" \"TLS_AES_256_GCM_SHA384\")\r\n"
        );
    }

    #[test]
    fn escaped_quotes_and_backslashes_round_trip() {
        let cmd = parse_id_command(b"t ID (\"a\\\\b\" \"c\\\"d\")\r\n").unwrap();
        assert_eq!(cmd.params.as_ref().unwrap()[0].field, b"a\\b");
        assert_eq!(
            cmd.params.as_ref().unwrap()[0].value.as_deref(),
            Some(&b"c\"d"[..])
        );
        assert_eq!(
            rewrite_client_id(&cmd, &[]),
            b"t ID (\"a\\\\b\" \"c\\\"d\")\r\n"
        );
    }

    #[test]
    fn malformed_id_lists_are_refused() {
        for raw in [
            &b"a ID\r\n"[..],
            b"a ID (\"name\")\r\n",
            b"a ID (\"name\" \"x\"\r\n",
            b"a ID (\"name\" \"x\") junk\r\n",
            b"a ID FOO\r\n",
            b"a ID (\"n\" {10}\r\nshort)\r\n",
            b"a ID (\"n\" \"x\r\n",
        ] {
            assert_eq!(
                parse_id_command(raw),
                Err(()),
                "{:?}",
                String::from_utf8_lossy(raw)
            );
        }
        assert_eq!(parse_id_command(b"a NOOP\r\n"), Err(()));
    }

    #[test]
    fn our_own_id_command_uses_our_tag() {
        let tag = mailfront_tag(0xdead_beef);
        assert_eq!(tag, b"mf00000000deadbeef");
        assert_eq!(
            build_id_command(&tag, OURS),
            b"mf00000000deadbeef ID (\"tls\" \"TLS_AES_256_GCM_SHA384\")\r\n"
        );
        assert_eq!(build_id_command(b"t", &[]), b"t ID NIL\r\n");
    }

    #[test]
    fn the_rewritten_command_parses_back_to_the_same_pairs() {
        let raw = b"a ID (\"name\" \"x\" \"v\" NIL)\r\n";
        let out = parse_id_command(&rewrite(raw)).unwrap();
        assert_eq!(out.params.unwrap().len(), 3);
    }
}
