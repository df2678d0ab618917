//! SASL rules the three protocols share (RFC 4422): what a response line may hold, how a
//! mechanism name is written in a log, and which login name a mechanism's first client
//! response carries.
//!
//! Bottom layer and pure: byte slices in, values out; nothing here reads a socket or logs. The
//! IMAP, POP3 and SMTP codecs check SASL lines with [`is_base64_response`]; the pre-login
//! machines label logins with [`mechanism_for_log`] and learn the session's user name for its
//! close line from [`user_in_first_response`].
//!
//! A password never leaves this module: the decoded responses that carry one (PLAIN, LOGIN's
//! second line is never decoded at all) are wiped when dropped, and only the login name is
//! returned.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use zeroize::Zeroizing;

/// Longest SASL mechanism name (RFC 4422 §3.1: `sasl-mech = 1*20mech-char`).
pub const MAX_MECHANISM_LEN: usize = 20;

/// Whether `line` (without its line end) is a SASL response a backend may receive on a
/// continuation line: base64 in the RFC 4648 §4 alphabet, whole 4-character quanta, `=` only as
/// correct final padding, and zero pad bits (the canonical encoding, RFC 4648 §3.5), or the
/// empty string (an empty response). A lone `=` is not one: it means an empty *initial*
/// response only ([`is_initial_response`]); on a continuation line IMAP refuses it (RFC 9051
/// §6.2.2 grammar), and so does mailfront for every protocol. `*`, the client's cancel, is not
/// base64: callers look for it first.
///
/// Strict on purpose: a response line holds no separator or anything else a backend's tokenizer
/// could act on, and every backend decodes what passes.
pub fn is_base64_response(line: &[u8]) -> bool {
    STANDARD.decode(line).is_ok()
}

/// Whether `response` is an initial response a command may carry (SMTP AUTH, IMAP
/// AUTHENTICATE with SASL-IR, POP3 AUTH): non-empty base64 as [`is_base64_response`], or `=`
/// alone, the empty initial response (RFC 4954 §4, RFC 5034 §4, RFC 4959 §3).
pub fn is_initial_response(response: &[u8]) -> bool {
    response == b"=" || (!response.is_empty() && is_base64_response(response))
}

/// A mechanism name for logs and metric labels: an RFC 4422 §3.1 name
/// (`[A-Z0-9-_]{1,20}`, compared without regard to case, so written upper-cased), or
/// `"invalid"` for anything else. Whatever a client sends as a mechanism, the log shows a
/// name from a closed alphabet of bounded length, never a credential pasted in its place.
pub fn mechanism_for_log(name: &[u8]) -> String {
    let valid = (1..=MAX_MECHANISM_LEN).contains(&name.len())
        && name
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if valid {
        String::from_utf8_lossy(name).to_ascii_uppercase()
    } else {
        "invalid".to_owned()
    }
}

/// The login name a mechanism's first client response carries (`initial_response_b64`: the
/// base64 text as sent, or `=`): the authentication identity, never the authorization
/// identity, which names whom the login acts for, not who proves it.
///
/// - PLAIN (RFC 4616 §2, `[authzid] NUL authcid NUL passwd`): the authcid.
/// - SCRAM-* (RFC 5802 §5.1, §7): the `n=` attribute of client-first-message-bare, with its
///   `=2C` and `=3D` decoded.
/// - OAUTHBEARER (RFC 7628 §3.1): the `a=` of the GS2 header (RFC 5801 §4), decoded the same
///   way; `None` when the client left it out.
/// - XOAUTH2 (Google's, as Dovecot takes it): the `user=` field.
/// - LOGIN and every other mechanism: `None`. LOGIN sends the name as a response of its own
///   ([`login_mechanism_username`]); EXTERNAL, GSSAPI and the rest carry none a proxy can read.
///
/// `None` too for anything malformed, and for a name that is empty or holds a NUL, CR or LF.
pub fn authentication_identity(mechanism: &[u8], initial_response_b64: &[u8]) -> Option<Vec<u8>> {
    let decoded = decode(initial_response_b64)?;
    let is = |name: &[u8]| mechanism.eq_ignore_ascii_case(name);
    let name = if is(b"PLAIN") {
        plain_authcid(&decoded)?
    } else if mechanism
        .get(..6)
        .is_some_and(|prefix| prefix.eq_ignore_ascii_case(b"SCRAM-"))
    {
        scram_username(&decoded)?
    } else if is(b"OAUTHBEARER") {
        oauthbearer_authzid(&decoded)?
    } else if is(b"XOAUTH2") {
        xoauth2_user(&decoded)?
    } else {
        return None;
    };
    plain_name(name)
}

/// The user name a LOGIN mechanism client sends (base64, as sent) in answer to the server's
/// `Username:` challenge, or as its initial response (draft-murchison-sasl-login §2). `None`
/// when it is not strict base64, or decodes to an empty name or one with a NUL, CR or LF.
pub fn login_mechanism_username(line_b64: &[u8]) -> Option<Vec<u8>> {
    plain_name(decode(line_b64)?.to_vec())
}

/// The user name in the first client response of an exchange with `mechanism`, whichever of
/// the two a mechanism uses: [`login_mechanism_username`] for LOGIN,
/// [`authentication_identity`] for the rest. What the machines put on the close line.
pub fn user_in_first_response(mechanism: &[u8], response_b64: &[u8]) -> Option<Vec<u8>> {
    if mechanism.eq_ignore_ascii_case(b"LOGIN") {
        login_mechanism_username(response_b64)
    } else {
        authentication_identity(mechanism, response_b64)
    }
}

/// Whether a login with `mechanism` can be routed by user (`user_affinity`, `user_map`,
/// `user_lookup`): the client's first response names the user ([`user_in_first_response`]),
/// so mailfront can hold it until the backend is chosen. CRAM-MD5 and DIGEST-MD5 name the user
/// only after the server's challenge, which the backend would have to send before it is
/// chosen; EXTERNAL, GSSAPI, NTLM, ANONYMOUS and the rest name none a proxy can read. A routed
/// listener hides the others from its capabilities and refuses them.
pub fn is_routable(mechanism: &[u8]) -> bool {
    let is = |name: &[u8]| mechanism.eq_ignore_ascii_case(name);
    // A name of the RFC 4422 §3.1 shape only: `SCRAM-SHA-256AUTHENTICATE` is no mechanism (the
    // IMAP fuzz target found it routed, logged as `invalid`).
    is_mechanism_name(mechanism)
        && (is(b"PLAIN")
            || is(b"LOGIN")
            || is(b"OAUTHBEARER")
            || is(b"XOAUTH2")
            || mechanism
                .get(..6)
                .is_some_and(|prefix| prefix.eq_ignore_ascii_case(b"SCRAM-")))
}

/// Whether `name` is a SASL mechanism name (RFC 4422 §3.1: `[A-Z0-9-_]{1,20}`, compared without
/// regard to case): what [`mechanism_for_log`] writes as itself rather than `"invalid"`. A
/// protocol's grammar may take longer names (an IMAP atom), which no mechanism has.
pub fn is_mechanism_name(name: &[u8]) -> bool {
    (1..=MAX_MECHANISM_LEN).contains(&name.len())
        && name
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The password of a PLAIN response (base64, as sent), for `user_lookup.send_password`; wiped
/// when dropped. `None` when malformed.
pub fn plain_password(response_b64: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
    let decoded = decode(response_b64)?;
    let mut parts = decoded.split(|&b| b == 0);
    let (_authzid, _authcid, passwd) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    Some(Zeroizing::new(passwd.to_vec()))
}

/// The password a LOGIN mechanism client sends (base64, as sent) in answer to `Password:`,
/// for `user_lookup.send_password`; wiped when dropped. `None` when not strict base64.
pub fn login_mechanism_password(line_b64: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
    decode(line_b64)
}

/// Strict base64 decoding; `=` (an empty initial response) decodes to nothing. Wiped on drop:
/// a PLAIN response holds the password.
fn decode(b64: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
    if b64 == b"=" {
        return Some(Zeroizing::new(Vec::new()));
    }
    STANDARD.decode(b64).ok().map(Zeroizing::new)
}

/// A login name worth keeping: not empty, and no NUL, CR or LF.
fn plain_name(name: Vec<u8>) -> Option<Vec<u8>> {
    let clean = !name.is_empty() && !name.iter().any(|&b| matches!(b, 0 | b'\r' | b'\n'));
    clean.then_some(name)
}

/// RFC 4616 §2: `message = [authzid] UTF8NUL authcid UTF8NUL passwd`; exactly two NULs.
fn plain_authcid(message: &[u8]) -> Option<Vec<u8>> {
    let mut parts = message.split(|&b| b == 0);
    let (_authzid, authcid, _passwd) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    Some(authcid.to_vec())
}

/// RFC 5802 §7: `client-first-message = gs2-header client-first-message-bare`, where
/// `gs2-header = gs2-cbind-flag "," [authzid] ","` and
/// `client-first-message-bare = [reserved-mext ","] username "," nonce ["," extensions]`.
fn scram_username(message: &[u8]) -> Option<Vec<u8>> {
    let mut fields = message.split(|&b| b == b',');
    gs2_cbind_flag(fields.next()?)?;
    let _authzid = fields.next()?;
    let mut field = fields.next()?;
    if field.starts_with(b"m=") {
        // reserved-mext: an extension a server must refuse, but the name still follows.
        field = fields.next()?;
    }
    let username = field.strip_prefix(b"n=")?;
    // The nonce must follow: a message cut short is not a client-first-message.
    fields.next()?.strip_prefix(b"r=")?;
    saslname(username)
}

/// RFC 7628 §3.1: `client-resp = (gs2-header kvsep *kvpair kvsep) / kvsep`; the name is the
/// GS2 header's `authzid = "a=" saslname` (RFC 5801 §4).
fn oauthbearer_authzid(message: &[u8]) -> Option<Vec<u8>> {
    let header = message.split(|&b| b == 0x01).next()?;
    let mut fields = header.split(|&b| b == b',');
    gs2_cbind_flag(fields.next()?)?;
    let authzid = fields.next()?.strip_prefix(b"a=")?;
    // The header ends with its second comma: nothing after it before the kvsep.
    if fields.next() != Some(&[][..]) || fields.next().is_some() {
        return None;
    }
    saslname(authzid)
}

/// XOAUTH2: `"user=" user ^A "auth=Bearer " token ^A ^A`.
fn xoauth2_user(message: &[u8]) -> Option<Vec<u8>> {
    let first = message.split(|&b| b == 0x01).next()?;
    first.strip_prefix(b"user=").map(<[u8]>::to_vec)
}

/// `gs2-cbind-flag = ("p=" cb-name) / "n" / "y"` (RFC 5801 §4).
fn gs2_cbind_flag(flag: &[u8]) -> Option<()> {
    let ok = flag == b"n"
        || flag == b"y"
        || flag
            .strip_prefix(b"p=")
            .is_some_and(|name| !name.is_empty());
    ok.then_some(())
}

/// `saslname = 1*(value-safe-char / "=2C" / "=3D")` (RFC 5802 §7, RFC 5801 §4): `=2C` is a
/// comma, `=3D` an equals sign, any other `=` makes the name invalid.
fn saslname(text: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len());
    let mut rest = text;
    while let Some((&b, after)) = rest.split_first() {
        if b == b'=' {
            let (code, after) = after.split_at_checked(2)?;
            out.push(match code {
                b"2C" | b"2c" => b',',
                b"3D" | b"3d" => b'=',
                _ => return None,
            });
            rest = after;
        } else if b == b',' || b == 0 {
            return None;
        } else {
            out.push(b);
            rest = after;
        }
    }
    (!out.is_empty()).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(raw: &[u8]) -> Vec<u8> {
        STANDARD.encode(raw).into_bytes()
    }

    #[test]
    fn responses_are_strict_base64_and_a_lone_equals_sign_only_starts_an_exchange() {
        assert!(is_initial_response(b"="));
        assert!(!is_base64_response(b"="), "not on a continuation line");
        assert!(
            !is_initial_response(b""),
            "an absent initial response is no argument"
        );
        assert!(is_initial_response(b"AGFsaWNlAHNlY3JldA=="));
        assert!(!is_initial_response(b"QQ="));
        for ok in [
            &b""[..],
            b"AAAA",
            b"AA==",
            b"AAA=",
            b"+/09",
            b"QUIT",
            b"AGFsaWNlAHNlY3JldA==",
        ] {
            assert!(is_base64_response(ok), "{ok:?}");
        }
        for bad in [
            &b"A"[..],
            b"QQ",
            b"QQ=",
            b"A===",
            b"=AAA",
            b"AA=A",
            b"==",
            b"QQ===",
            b"AA A",
            b"AA\xffA",
            b"QQ=\x85",
            b"QUJD\t",
            b"*",
            b"* ",
            b"QU IT",
            // Non-zero pad bits: not the canonical encoding of anything.
            b"QR==",
            b"QUJ=",
            b"AAAA\r",
        ] {
            assert!(!is_base64_response(bad), "{bad:?}");
        }
    }

    #[test]
    fn mechanism_names_for_logs_come_from_a_closed_alphabet() {
        assert_eq!(mechanism_for_log(b"PLAIN"), "PLAIN");
        assert_eq!(mechanism_for_log(b"scram-sha-256"), "SCRAM-SHA-256");
        assert_eq!(mechanism_for_log(b"x-oauth_2"), "X-OAUTH_2");
        assert_eq!(mechanism_for_log(&[b'A'; 20]), "A".repeat(20));
        for bad in [
            &b""[..],
            &[b'A'; 21],
            b"PL\"AIN",
            b"AGFsaWNlAHNlY3JldA==",
            b"PLAIN ",
            b"PL\xc3\xa4IN",
            b"PL\nAIN",
        ] {
            assert_eq!(mechanism_for_log(bad), "invalid", "{bad:?}");
        }
    }

    #[test]
    fn plain_yields_the_authentication_identity_not_the_authorization_identity() {
        let id = |raw: &[u8]| authentication_identity(b"PLAIN", &b64(raw));
        assert_eq!(id(b"\0alice\0secret"), Some(b"alice".to_vec()));
        assert_eq!(id(b"admin\0alice\0secret"), Some(b"alice".to_vec()));
        assert_eq!(
            authentication_identity(b"plain", &b64(b"\0alice\0secret")),
            Some(b"alice".to_vec()),
            "mechanism names compare without regard to case"
        );
        // Malformed: too few or too many NULs, no authcid, a line break in the name.
        for raw in [
            &b"alice"[..],
            b"\0alice",
            b"\0alice\0secret\0more",
            b"\0\0secret",
            b"",
            b"\0al\nice\0secret",
            b"\0al\rice\0secret",
        ] {
            assert_eq!(id(raw), None, "{raw:?}");
        }
        // Not base64, or the empty initial response.
        assert_eq!(authentication_identity(b"PLAIN", b"AGFsaWNl!"), None);
        assert_eq!(authentication_identity(b"PLAIN", b"="), None);
        assert_eq!(authentication_identity(b"PLAIN", b""), None);
    }

    #[test]
    fn scram_yields_the_n_attribute_decoded() {
        let id = |raw: &[u8]| authentication_identity(b"SCRAM-SHA-256", &b64(raw));
        // RFC 7677 §3's example.
        assert_eq!(
            id(b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"),
            Some(b"user".to_vec())
        );
        assert_eq!(
            authentication_identity(b"scram-sha-1-plus", &b64(b"p=tls-exporter,,n=bob,r=abc")),
            Some(b"bob".to_vec())
        );
        // The authorization identity is not the name.
        assert_eq!(id(b"n,a=admin,n=alice,r=abc"), Some(b"alice".to_vec()));
        assert_eq!(id(b"y,,n=a=2Cb=3Dc,r=abc"), Some(b"a,b=c".to_vec()));
        assert_eq!(id(b"n,,m=ext,n=alice,r=abc"), Some(b"alice".to_vec()));
        for raw in [
            &b"n,,n=,r=abc"[..],
            b"n,,n=alice",
            b"n,,r=abc,n=alice",
            b"x,,n=alice,r=abc",
            b"p=,,n=alice,r=abc",
            b"n,,n=al=2ice,r=abc",
            b"n,,n=alice=,r=abc",
            b"n,,n=al\nice,r=abc",
            b"n,,n=al\0ice,r=abc",
            b"n,",
            b"",
        ] {
            assert_eq!(id(raw), None, "{raw:?}");
        }
    }

    #[test]
    fn oauthbearer_yields_the_gs2_authzid() {
        let id = |raw: &[u8]| authentication_identity(b"OAUTHBEARER", &b64(raw));
        // RFC 7628 §4.1's example.
        assert_eq!(
            id(b"n,a=user@example.com,\x01host=server.example.com\x01port=143\x01auth=Bearer vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg==\x01\x01"),
            Some(b"user@example.com".to_vec())
        );
        assert_eq!(
            id(b"n,a=a=2Cb,\x01auth=Bearer x\x01\x01"),
            Some(b"a,b".to_vec())
        );
        for raw in [
            // No authzid: the name is only in the token, which mailfront does not read.
            &b"n,,\x01auth=Bearer x\x01\x01"[..],
            b"\x01",
            b"n,a=user\x01auth=Bearer x\x01\x01",
            b"n,a=user,x,\x01auth=Bearer x\x01\x01",
            b"q,a=user,\x01auth=Bearer x\x01\x01",
            b"n,a=us=er,\x01",
        ] {
            assert_eq!(id(raw), None, "{raw:?}");
        }
    }

    #[test]
    fn xoauth2_yields_the_user_field() {
        let id = |raw: &[u8]| authentication_identity(b"XOAUTH2", &b64(raw));
        assert_eq!(
            id(b"user=someuser@example.com\x01auth=Bearer ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg\x01\x01"),
            Some(b"someuser@example.com".to_vec())
        );
        for raw in [
            &b"auth=Bearer x\x01user=bob\x01\x01"[..],
            b"user=\x01auth=Bearer x\x01\x01",
            b"user=bo\rb\x01auth=Bearer x\x01\x01",
            b"",
        ] {
            assert_eq!(id(raw), None, "{raw:?}");
        }
    }

    #[test]
    fn login_and_other_mechanisms_carry_no_identity_in_their_first_response() {
        for mechanism in [
            &b"LOGIN"[..],
            b"EXTERNAL",
            b"GSSAPI",
            b"CRAM-MD5",
            b"",
            b"SCRAM",
        ] {
            assert_eq!(
                authentication_identity(mechanism, &b64(b"\0alice\0secret")),
                None,
                "{mechanism:?}"
            );
        }
        // LOGIN's name is a response of its own.
        assert_eq!(
            login_mechanism_username(&b64(b"alice")),
            Some(b"alice".to_vec())
        );
        assert_eq!(login_mechanism_username(b"YWxpY2U"), None, "unpadded");
        assert_eq!(login_mechanism_username(b"="), None);
        assert_eq!(login_mechanism_username(b""), None);
        assert_eq!(login_mechanism_username(&b64(b"al\0ice")), None);
        assert_eq!(
            user_in_first_response(b"login", &b64(b"alice")),
            Some(b"alice".to_vec())
        );
        assert_eq!(
            user_in_first_response(b"PLAIN", &b64(b"\0alice\0secret")),
            Some(b"alice".to_vec())
        );
    }

    #[test]
    fn arbitrary_input_never_panics_nor_yields_a_line_break() {
        let mut rng = fastrand::Rng::with_seed(7);
        let alphabet = b"nya=,pr2C3D\x00\x01\r\nuser=AZaz09+/";
        for _ in 0..20_000 {
            let len = rng.usize(..40);
            let raw: Vec<u8> = (0..len)
                .map(|_| alphabet[rng.usize(..alphabet.len())])
                .collect();
            for mechanism in [
                &b"PLAIN"[..],
                b"SCRAM-SHA-1",
                b"OAUTHBEARER",
                b"XOAUTH2",
                b"LOGIN",
            ] {
                for input in [&raw[..], &b64(&raw)[..]] {
                    let found = [
                        authentication_identity(mechanism, input),
                        user_in_first_response(mechanism, input),
                    ];
                    for name in found.into_iter().flatten() {
                        assert!(!name.is_empty());
                        assert!(!name.iter().any(|&b| matches!(b, 0 | b'\r' | b'\n')));
                    }
                }
            }
            let _ = is_base64_response(&raw);
            let label = mechanism_for_log(&raw);
            assert!(label.len() <= MAX_MECHANISM_LEN);
        }
    }

    #[test]
    fn routable_mechanisms_name_the_user_in_their_first_response() {
        for routable in [
            "PLAIN",
            "login",
            "SCRAM-SHA-256",
            "scram-sha-1-plus",
            "OAUTHBEARER",
            "XOAUTH2",
        ] {
            assert!(is_routable(routable.as_bytes()), "{routable}");
        }
        for not in [
            "CRAM-MD5",
            "DIGEST-MD5",
            "EXTERNAL",
            "GSSAPI",
            "NTLM",
            "ANONYMOUS",
            "SCRAM",
            "",
            "SCRAM-SHA-256AUTHENTICATE",
            "SCRAM-SHA 256",
        ] {
            assert!(!is_routable(not.as_bytes()), "{not}");
        }
    }

    #[test]
    fn mechanism_names_are_what_the_log_writes_as_themselves() {
        for name in [&b"PLAIN"[..], b"scram-sha-256", b"X_OAUTH-2", &[b'A'; 20]] {
            assert!(is_mechanism_name(name), "{name:?}");
            assert_ne!(mechanism_for_log(name), "invalid");
        }
        for name in [
            &b""[..],
            &[b'A'; 21],
            b"SCRAM-SHA-256AUTHENTICATE",
            b"PL.AIN",
            b"PLAIN ",
            b"PL\xc3\xa4IN",
        ] {
            assert!(!is_mechanism_name(name), "{name:?}");
            assert_eq!(mechanism_for_log(name), "invalid");
        }
    }

    #[test]
    fn passwords_come_out_of_plain_and_login_responses() {
        let plain = STANDARD.encode(b"admin\0alice\0s3cret");
        assert_eq!(
            plain_password(plain.as_bytes())
                .as_deref()
                .map(Vec::as_slice),
            Some(&b"s3cret"[..])
        );
        assert!(plain_password(STANDARD.encode(b"alice\0s3cret").as_bytes()).is_none());
        assert!(plain_password(b"not base64!").is_none());
        let login = STANDARD.encode(b"pw");
        assert_eq!(
            login_mechanism_password(login.as_bytes())
                .as_deref()
                .map(Vec::as_slice),
            Some(&b"pw"[..])
        );
    }
}
