//! IMAP client-command receiver, gate and ID rewriter: no panic on any input, and the same
//! events whether the input arrives whole or in reads of a size taken from the first byte.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailfront::config::TlsMode;
use mailfront::imap::codec::{ClientEvent, CommandReceiver, Limits};
use mailfront::imap::id::{parse_id_command, rewrite_client_id};
use mailfront::imap::policy::{Decision, GateState, decide};

/// Plays a driver: the gate decides each command, SASL ends on a client `*`.
fn run(input: &[u8], chunk: usize, state: GateState) -> Vec<ClientEvent> {
    let limits = Limits {
        line: 64,
        literal: 32,
        collect: 128,
    };
    let mut rx = CommandReceiver::new(limits);
    let mut buf = Vec::new();
    let mut events = Vec::new();
    for piece in input.chunks(chunk.max(1)) {
        buf.extend_from_slice(piece);
        loop {
            let step = rx.next(&buf);
            assert!(step.consumed <= buf.len());
            buf.drain(..step.consumed);
            let Some(event) = step.event else { break };
            match &event {
                ClientEvent::Command(cmd) => match decide(&state, cmd) {
                    Decision::Reply(_) => rx.discard_command(),
                    Decision::RewriteId => rx.collect_command(),
                    Decision::Authenticate { sasl: true, .. } => rx.begin_sasl(),
                    Decision::StartTls(_) => return events,
                    _ => {}
                },
                ClientEvent::Collected(c) => {
                    if let Ok(id) = parse_id_command(&c.raw) {
                        let out = rewrite_client_id(&id, &[("tls", "TLS_AES_128_GCM_SHA256")]);
                        assert!(parse_id_command(&out).is_ok());
                    }
                }
                ClientEvent::SaslResponse(r) if r.cancel => rx.end_sasl(),
                _ => {}
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
    let state = GateState {
        listener: if selector & 0x80 == 0 {
            TlsMode::Starttls
        } else {
            TlsMode::Implicit
        },
        tls_active: selector & 0x40 != 0,
        backend_has_id: selector & 0x20 != 0,
        backend_has_sasl_ir: selector & 0x10 != 0,
        id_sent: false,
    };
    let whole = run(input, input.len(), state);
    let chunk = usize::from(selector & 0x1f) + 1;
    assert_eq!(run(input, chunk, state), whole);
});
