//! The PROXY v1/v2 header reader (`listeners[].proxy_protocol_from`): no panic, never consumes
//! past the header (whatever follows belongs to TLS or the protocol), never asks for more than
//! its bound, and reads the same whether the octets come whole, in two pieces, or one at a time.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailfront::proxy_header::{Header, HeaderError, HeaderReader, MAX_V1_HEADER, MAX_V2_HEADER};

/// Feeds `input` in pieces of at most `piece` octets, as the driver does (never more than
/// `wanted()`); returns the octets consumed and the result.
fn run(input: &[u8], piece: usize) -> (usize, Result<Option<Header>, HeaderError>) {
    let mut reader = HeaderReader::new();
    let mut pos = 0;
    loop {
        let want = reader.wanted();
        assert!(want > 0 && want <= MAX_V2_HEADER, "wanted {want}");
        let end = (pos + want.min(piece)).min(input.len());
        if pos == end {
            return (pos, Err(reader.closed_early()));
        }
        let (used, result) = reader.feed(&input[pos..end]);
        assert_eq!(used, end - pos, "a piece within wanted() is taken whole");
        pos += used;
        match result {
            Ok(None) => {}
            done => {
                assert_eq!(reader.wanted(), 0);
                return (pos, done);
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, input)) = data.split_first() else {
        return;
    };
    let whole = run(input, usize::MAX);
    // Fed more than it wants at once, it still stops at the header's end.
    let mut greedy = HeaderReader::new();
    let (used, result) = greedy.feed(input);
    assert!(used <= input.len());
    let piece = usize::from(first).max(1);
    for other in [run(input, piece), run(input, 1)] {
        match (&other.1, &whole.1) {
            (Err(a), Err(b)) => assert_eq!(a.as_str(), b.as_str()),
            _ => assert_eq!(other, whole),
        }
    }
    if let Ok(Some(header)) = &whole.1 {
        assert_eq!(result, Ok(Some(*header)));
        assert_eq!(used, whole.0, "the greedy feed stops at the same octet");
        let limit = if input.first() == Some(&b'P') {
            MAX_V1_HEADER
        } else {
            MAX_V2_HEADER
        };
        assert!(whole.0 <= limit);
    }
});
