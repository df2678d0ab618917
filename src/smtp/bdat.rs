//! BDAT chunk framing (RFC 3030 §2): exactly `size` octets follow the command line, binary,
//! never dot-stuffed, never scanned for an end marker and never parsed as commands (RFC 3030 §2:
//! the count alone frames the chunk, so content that looks like commands stays content).
//!
//! To prepend the Received field, the first chunk of each transaction is forwarded as
//! `BDAT <size + header_len> [LAST]` followed by the header and then the client's octets
//! (RFC 3030 §2: the size counts every octet of the chunk, so it must grow with the field);
//! later chunks keep their command line. RSET or a new MAIL makes the
//! next chunk a first chunk again. A refused BDAT still has its octets consumed and dropped.
//!
//! Smuggling (CVE-2023-51764 family): chunk content is framed by count, but a message received
//! by BDAT may later be relayed with DATA, where a bare CR or LF can end it early. So BDAT content
//! is held to the same rule as DATA content ([`crate::smtp::data`]): lines end with CRLF only.
//! [`ContentScanner`] checks the message across its chunks (a CR ending one chunk and the LF
//! starting the next are one CRLF); on a violation the driver sends nothing more, drops the
//! backend connection so the message can never complete, and answers `554 5.6.0` (the DATA
//! policy). BINARYMIME is therefore not offered to clients.

use crate::smtp::command::Bdat;
use crate::smtp::data::BareLineEnding;

/// Counts down the octets of one chunk as they arrive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkReader {
    remaining: u64,
}

impl ChunkReader {
    pub fn new(size: u64) -> Self {
        ChunkReader { remaining: size }
    }

    pub fn is_done(&self) -> bool {
        self.remaining == 0
    }

    /// Octets of the chunk still to come.
    pub fn remaining(&self) -> u64 {
        self.remaining
    }

    /// Takes the chunk's share of `input`: `input[..n]` belongs to the chunk (forward it, or
    /// drop it for a refused BDAT); the rest is the next command.
    pub fn take(&mut self, input: &[u8]) -> usize {
        let n = usize::try_from(self.remaining)
            .unwrap_or(usize::MAX)
            .min(input.len());
        self.remaining -= n as u64;
        n
    }
}

/// Checks the content of one BDAT message, chunk after chunk and read after read, for bare CR
/// and bare LF (RFC 5321 §2.3.8). Split-invariant: the verdict does not depend on where chunk or
/// read boundaries fall.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ContentScanner {
    /// The last octet so far was a CR (its LF may start the next read or chunk).
    after_cr: bool,
    violation: Option<BareLineEnding>,
}

impl ContentScanner {
    pub fn new() -> Self {
        Self::default()
    }

    /// Scans the next octets of the message; `ends_message` when they end it (the last octet of
    /// a `LAST` chunk), where a trailing CR can no longer be completed. `Err` on the first bare
    /// CR or LF; every later call returns the same error. Forward these octets only on `Ok`.
    pub fn scan(&mut self, input: &[u8], ends_message: bool) -> Result<(), BareLineEnding> {
        if let Some(kind) = self.violation {
            return Err(kind);
        }
        if let Some(kind) = first_bare_line_ending(input, self.after_cr) {
            self.violation = Some(kind);
            return Err(kind);
        }
        if let Some(&last) = input.last() {
            self.after_cr = last == b'\r';
        }
        if ends_message && self.after_cr {
            self.violation = Some(BareLineEnding::Cr);
            return Err(BareLineEnding::Cr);
        }
        Ok(())
    }

    /// The message ends here (`BDAT 0 LAST`): `Err` when its last octet was a bare CR.
    pub fn finish(&mut self) -> Result<(), BareLineEnding> {
        self.scan(b"", true)
    }
}

/// The first bare CR or LF in `input`, in stream order, given whether the octet before it was a
/// CR. Visits only the CR and LF octets (a SIMD search), not every octet; a CR that is the last
/// octet is not judged here (its LF may come in the next read).
fn first_bare_line_ending(input: &[u8], after_cr: bool) -> Option<BareLineEnding> {
    if after_cr && input.first().is_some_and(|&b| b != b'\n') {
        return Some(BareLineEnding::Cr);
    }
    for at in memchr::memchr2_iter(b'\r', b'\n', input) {
        if input.get(at) == Some(&b'\r') {
            if input.get(at + 1).is_some_and(|&next| next != b'\n') {
                return Some(BareLineEnding::Cr);
            }
        } else {
            let cr_before = match at.checked_sub(1) {
                Some(before) => input.get(before) == Some(&b'\r'),
                None => after_cr,
            };
            if !cr_before {
                return Some(BareLineEnding::Lf);
            }
        }
    }
    None
}

/// The chunk plus the header would not fit a chunk-size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("BDAT chunk size {size} plus {header_len} header octets overflows")]
pub struct ChunkTooLarge {
    pub size: u64,
    pub header_len: usize,
}

/// `BDAT <size>[ LAST]\r\n`.
pub fn bdat_command(size: u64, last: bool) -> Vec<u8> {
    let mut line = format!("BDAT {size}").into_bytes();
    if last {
        line.extend_from_slice(b" LAST");
    }
    line.extend_from_slice(b"\r\n");
    line
}

/// The command line for the first chunk of a transaction, grown by the Received header that
/// the driver writes right after it (`BDAT 0 LAST` becomes `BDAT <header_len> LAST`).
pub fn first_chunk_command(bdat: Bdat, header_len: usize) -> Result<Vec<u8>, ChunkTooLarge> {
    let grown = u64::try_from(header_len)
        .ok()
        .and_then(|h| bdat.size.checked_add(h))
        .ok_or(ChunkTooLarge {
            size: bdat.size,
            header_len,
        })?;
    Ok(bdat_command(grown, bdat.last))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::smtp::command::Command;

    #[test]
    fn first_chunk_grows_by_the_header_length() {
        let bdat = Bdat {
            size: 5,
            last: false,
        };
        assert_eq!(first_chunk_command(bdat, 120).unwrap(), b"BDAT 125\r\n");
        let bdat = Bdat {
            size: 0,
            last: true,
        };
        assert_eq!(
            first_chunk_command(bdat, 120).unwrap(),
            b"BDAT 120 LAST\r\n"
        );
    }

    #[test]
    fn oversized_first_chunk_is_an_error_not_a_wrap() {
        let bdat = Bdat {
            size: u64::MAX,
            last: true,
        };
        assert!(first_chunk_command(bdat, 1).is_err());
    }

    #[test]
    fn emitted_command_parses_back() {
        let line = bdat_command(42, true);
        assert_eq!(
            Command::parse(&line[..line.len() - 2]),
            Command::Bdat(Bdat {
                size: 42,
                last: true
            })
        );
    }

    #[test]
    fn chunk_content_is_taken_by_count_and_the_rest_is_commands() {
        // R13: "BDAT 5\r\nabcdeBDAT 0 LAST\r\n" in one segment.
        let input = b"abcdeBDAT 0 LAST\r\n";
        let mut reader = ChunkReader::new(5);
        let n = reader.take(input);
        assert_eq!(&input[..n], b"abcde");
        assert!(reader.is_done());
        assert_eq!(reader.take(b"more"), 0);
    }

    /// The verdict for a message sent as `chunks` (the last one `LAST`), each chunk read in
    /// pieces of `reads` octets, as the driver feeds the scanner.
    fn verdict(chunks: &[&[u8]], reads: usize) -> Result<(), BareLineEnding> {
        let mut scanner = ContentScanner::new();
        for (i, chunk) in chunks.iter().enumerate() {
            let last = i + 1 == chunks.len();
            if chunk.is_empty() && last {
                return scanner.finish();
            }
            let mut reader = ChunkReader::new(chunk.len() as u64);
            for piece in chunk.chunks(reads.max(1)) {
                let n = reader.take(piece);
                scanner.scan(&piece[..n], last && reader.is_done())?;
            }
        }
        Ok(())
    }

    #[test]
    fn bdat_content_with_a_bare_cr_or_lf_is_refused_wherever_the_boundaries_fall() {
        let cases: [(&[u8], Result<(), BareLineEnding>); 12] = [
            (b"Subject: x\r\n\r\nbody\r\n", Ok(())),
            (b"", Ok(())),
            (b"no line end at all", Ok(())),
            (b"\r\n.\r\nQUIT\r\n", Ok(())),
            (b"a\nb\r\n", Err(BareLineEnding::Lf)),
            (b"\n", Err(BareLineEnding::Lf)),
            (b"a\rb\r\n", Err(BareLineEnding::Cr)),
            (b"a\r\r\n", Err(BareLineEnding::Cr)),
            (b"body\r\n.\n", Err(BareLineEnding::Lf)),
            (b"ends with a CR\r", Err(BareLineEnding::Cr)),
            (b"\r", Err(BareLineEnding::Cr)),
            (b"x\r\n\n", Err(BareLineEnding::Lf)),
        ];
        for (message, expected) in cases {
            for reads in [1, 2, 3, 7, 512] {
                // Every way of cutting the message into two chunks, and a trailing BDAT 0 LAST.
                for cut in 0..=message.len() {
                    let (a, b) = message.split_at(cut);
                    assert_eq!(verdict(&[a, b], reads), expected, "{message:?} at {cut}");
                    assert_eq!(verdict(&[a, b, b""], reads), expected, "{message:?}");
                }
                assert_eq!(verdict(&[message], reads), expected, "{message:?}");
            }
        }
    }

    #[test]
    fn a_crlf_split_across_chunks_is_one_line_end_and_a_violation_is_latched() {
        assert_eq!(verdict(&[b"line one\r", b"\nline two\r\n"], 512), Ok(()));
        assert_eq!(
            verdict(&[b"line one\r", b"\r\n"], 512),
            Err(BareLineEnding::Cr)
        );
        assert_eq!(verdict(&[b"line one\r", b""], 512), Err(BareLineEnding::Cr));
        let mut scanner = ContentScanner::new();
        assert_eq!(scanner.scan(b"a\nb", false), Err(BareLineEnding::Lf));
        assert_eq!(scanner.scan(b"clean\r\n", false), Err(BareLineEnding::Lf));
    }

    /// The octet-by-octet definition the SIMD search must agree with.
    fn reference(input: &[u8], mut after_cr: bool) -> Option<BareLineEnding> {
        for &byte in input {
            let bare = match (after_cr, byte) {
                (true, b'\n') => None,
                (true, _) => Some(BareLineEnding::Cr),
                (false, b'\n') => Some(BareLineEnding::Lf),
                (false, _) => None,
            };
            if bare.is_some() {
                return bare;
            }
            after_cr = byte == b'\r';
        }
        None
    }

    #[test]
    fn the_search_agrees_with_the_octet_by_octet_definition() {
        let alphabet = [b'a', b'\r', b'\n', b'.'];
        for len in 0..=7u32 {
            for n in 0..4usize.pow(len) {
                let input: Vec<u8> = (0..len).map(|i| alphabet[n / 4usize.pow(i) % 4]).collect();
                for after_cr in [false, true] {
                    assert_eq!(
                        first_bare_line_ending(&input, after_cr),
                        reference(&input, after_cr),
                        "{input:?} after_cr={after_cr}"
                    );
                }
            }
        }
    }

    #[test]
    fn chunk_content_that_looks_like_commands_is_still_content() {
        let content = b"\r\n.\r\nQUIT\r\n";
        for size in [1, 2, 3, 7, 512] {
            let mut reader = ChunkReader::new(content.len() as u64);
            let mut got = Vec::new();
            for piece in content.chunks(size) {
                let n = reader.take(piece);
                got.extend_from_slice(&piece[..n]);
            }
            assert_eq!(got, content);
            assert!(reader.is_done());
        }
    }
}
