//! BDAT chunk framing (RFC 3030 §2): exactly `size` octets follow the command line, binary,
//! never dot-stuffed, never scanned for an end marker and never parsed as commands (§9.1 R13).
//!
//! To prepend the Received field, the first chunk of each transaction is forwarded as
//! `BDAT <size + header_len> [LAST]` followed by the header and then the client's octets
//! (protocol-reference §2.7); later chunks keep their command line. RSET or a new MAIL makes the
//! next chunk a first chunk again. A refused BDAT still has its octets consumed and dropped.

use crate::smtp::command::Bdat;

/// Counts down the octets of one chunk as they arrive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkReader {
    remaining: u64,
}

impl ChunkReader {
    pub fn new(size: u64) -> Self {
        ChunkReader { remaining: size }
    }

    /// Octets of the chunk still to come.
    pub fn remaining(&self) -> u64 {
        self.remaining
    }

    pub fn is_done(&self) -> bool {
        self.remaining == 0
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
