//! Test support: drive a pull-style receiver over an input delivered in chunks, the way a
//! session driver does, so tests can prove the events do not depend on how reads split.

use crate::imap::codec::Step;

/// The chunk sizes every receiver is checked with (house rule).
pub const CHUNKS: [usize; 8] = [1, 2, 3, 4, 7, 16, 64, 512];

/// Feeds `input` in `chunk`-sized reads (0 = all at once); after each read calls `next` until
/// it needs more, draining what it consumed, and lets `react` play the driver. Returns the
/// events and the octets left unconsumed. `react` returns `false` to stop (e.g. STARTTLS).
pub fn drive<R, E: Clone>(
    rx: &mut R,
    input: &[u8],
    chunk: usize,
    mut next: impl FnMut(&mut R, &[u8]) -> Step<E>,
    mut react: impl FnMut(&mut R, &E) -> bool,
) -> (Vec<E>, Vec<u8>) {
    let chunk = if chunk == 0 {
        input.len().max(1)
    } else {
        chunk
    };
    let mut buf = Vec::new();
    let mut events = Vec::new();
    for piece in input.chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            let step = next(rx, &buf);
            buf.drain(..step.consumed);
            match step.event {
                Some(event) => {
                    events.push(event.clone());
                    if !react(rx, &event) {
                        return (events, buf);
                    }
                }
                None => break,
            }
        }
    }
    (events, buf)
}
