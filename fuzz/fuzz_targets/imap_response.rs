//! IMAP backend-response receiver and capability rewriter: no panic on any input, and the same
//! responses whether the input arrives whole or in reads of a size taken from the first byte.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailfront::imap::capability::{CapabilityView, rewrite_response};
use mailfront::imap::response::{ResponseLimits, ResponseReceiver, ServerEvent};

fn run(input: &[u8], chunk: usize) -> Vec<ServerEvent> {
    let mut rx = ResponseReceiver::new(ResponseLimits {
        line: 96,
        response: 256,
    });
    let mut buf = Vec::new();
    let mut events = Vec::new();
    for piece in input.chunks(chunk.max(1)) {
        buf.extend_from_slice(piece);
        loop {
            let step = rx.next(&buf);
            assert!(step.consumed <= buf.len());
            buf.drain(..step.consumed);
            let Some(event) = step.event else { break };
            if let ServerEvent::Greeting(r) | ServerEvent::Response(r) = &event {
                for view in [CapabilityView::Cleartext, CapabilityView::Tls] {
                    if let Some(once) = rewrite_response(&r.raw, view) {
                        // Rewriting is idempotent: the client's view is stable.
                        assert_eq!(
                            rewrite_response(&once, view).as_deref(),
                            Some(once.as_slice())
                        );
                    }
                }
            }
            events.push(event);
        }
    }
    events
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, input)) = data.split_first() else {
        return;
    };
    let whole = run(input, input.len());
    assert_eq!(run(input, usize::from(selector) + 1), whole);
});
