//! The one DNS host-name check, shared by the configuration (mailfront's own hostname and
//! backend names), the SMTP Received field and the PROXY v2 AUTHORITY TLV.
//!
//! A pure function over a string: mailfront never resolves a name to validate it.

/// Longest name in text form, without the root dot: 255 octets on the wire (RFC 1035 §2.3.4)
/// are 253 characters once the length octets become dots.
pub const MAX_NAME_LEN: usize = 253;
/// Longest label (RFC 1035 §2.3.4).
pub const MAX_LABEL_LEN: usize = 63;

/// Whether `name` is a host name (RFC 1123 §2.1, RFC 952): dot-separated labels of 1-63 ASCII
/// letters, digits and hyphens, no hyphen first or last in a label, at most 253 octets, no
/// empty label (so no leading or trailing dot). This is also RFC 5321 §4.1.2's `Domain`
/// (`sub-domain = Let-dig [Ldh-str]`), so one check serves SMTP and DNS.
///
/// Underscores are refused: they name services (`_imaps._tcp`), never hosts, and neither
/// Postfix nor Dovecot accepts them in a host name. Callers with extra rules add them on top.
pub fn is_host_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name.split('.').all(|label| {
            let bytes = label.as_bytes();
            !bytes.is_empty()
                && bytes.len() <= MAX_LABEL_LEN
                && bytes
                    .iter()
                    .all(|b| b.is_ascii_alphanumeric() || *b == b'-')
                && bytes.first().is_some_and(u8::is_ascii_alphanumeric)
                && bytes.last().is_some_and(u8::is_ascii_alphanumeric)
        })
}

/// Whether the last label is all digits, as in `192.0.2.1` or `host.123`. No top-level domain
/// is numeric (RFC 3696 §2), and many parsers read such a name as an IPv4 address.
pub fn has_numeric_tld(name: &str) -> bool {
    name.rsplit('.')
        .next()
        .is_some_and(|tld| !tld.is_empty() && tld.bytes().all(|b| b.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_follow_rfc_1123() {
        let label63 = "a".repeat(63);
        let label64 = "a".repeat(64);
        // Four labels of 63 with three dots are 255 octets; trimmed to exactly 253.
        let longest = format!("{label63}.{label63}.{label63}.{}", "d".repeat(61));
        let too_long = format!("{longest}a");
        let table: &[(&str, bool)] = &[
            ("mx.example.test", true),
            ("MX.Example.Test", true),
            ("localhost", true),
            ("a", true),
            ("1.example", true),
            ("3com.example", true),
            ("xn--bcher-kva.example", true),
            ("a-b.example", true),
            ("192.0.2.1", true), // syntactically a host name; callers refuse it where it matters
            (&label63, true),
            (&longest, true),
            ("", false),
            (".", false),
            ("mx.example.test.", false),
            (".example", false),
            ("a..b", false),
            ("-bad.example", false),
            ("bad-.example", false),
            ("under_score.example", false),
            ("_imaps._tcp.example", false),
            ("space here.example", false),
            ("tab\there.example", false),
            ("mx\r\nX: y", false),
            ("*.example", false),
            ("b\u{f6}b.example", false),
            ("::1", false),
            ("[192.0.2.1]", false),
            (&label64, false),
            (&too_long, false),
        ];
        for (name, expected) in table {
            assert_eq!(is_host_name(name), *expected, "{name:?}");
        }
    }

    #[test]
    fn numeric_top_level_labels_are_spotted() {
        for (name, expected) in [
            ("192.0.2.1", true),
            ("host.123", true),
            ("123", true),
            ("mx.example.test", false),
            ("host.1a", false),
            ("1.example", false),
            ("", false),
        ] {
            assert_eq!(has_numeric_tld(name), expected, "{name:?}");
        }
    }
}
