//! The SASL rules the three protocols share (`src/sasl.rs`): no panic on any input; a login
//! name taken from a first response is never empty and never holds a NUL, CR or LF (it goes on
//! the close line); a log label is a valid mechanism name or `invalid`; and whatever passes
//! `is_base64_response` is `=` or decodes.
#![no_main]

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use libfuzzer_sys::fuzz_target;
use mailfront::sasl::{
    MAX_MECHANISM_LEN, authentication_identity, is_base64_response, login_mechanism_username,
    mechanism_for_log, user_in_first_response,
};

const MECHANISMS: [&[u8]; 7] = [
    b"PLAIN",
    b"SCRAM-SHA-256",
    b"scram-sha-1-plus",
    b"OAUTHBEARER",
    b"XOAUTH2",
    b"LOGIN",
    b"EXTERNAL",
];

fn check_name(name: Option<Vec<u8>>) {
    if let Some(name) = name {
        assert!(!name.is_empty());
        assert!(
            !name.iter().any(|&b| matches!(b, 0 | b'\r' | b'\n')),
            "{name:?}"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    // The first octet picks a mechanism (or takes the rest as one); the rest is the response,
    // both as sent (mostly not base64) and encoded, so the mechanisms' parsers see it.
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let encoded = STANDARD.encode(rest).into_bytes();
    let mechanism = MECHANISMS
        .get(usize::from(pick) % (MECHANISMS.len() + 1))
        .copied()
        .unwrap_or(rest);
    for response in [rest, &encoded] {
        check_name(authentication_identity(mechanism, response));
        check_name(user_in_first_response(mechanism, response));
        check_name(login_mechanism_username(response));
    }
    assert!(is_base64_response(&encoded));
    if is_base64_response(rest) {
        assert!(rest == b"=" || STANDARD.decode(rest).is_ok());
    }
    let label = mechanism_for_log(rest);
    assert!(
        label == "invalid"
            || (label.len() <= MAX_MECHANISM_LEN
                && label.bytes().all(|b| b.is_ascii_uppercase()
                    || b.is_ascii_digit()
                    || b == b'-'
                    || b == b'_')),
        "{label:?}"
    );
});
