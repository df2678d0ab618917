//! POP3 command and response receivers, gate and CAPA rewriter: no panic on any input, and the
//! same events whether the input arrives whole or in reads of a size taken from the first byte.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailfront::config::TlsMode;
use mailfront::pop3::capa::{CapaView, rewrite_capa, rewrite_greeting};
use mailfront::pop3::codec::{
    ClientEvent, CommandLimits, CommandReceiver, Expect, ResponseLimits, ResponseReceiver,
    ServerEvent,
};
use mailfront::pop3::policy::{Decision, GateState, decide};

fn run_client(input: &[u8], chunk: usize, state: GateState) -> Vec<ClientEvent> {
    let mut rx = CommandReceiver::new(CommandLimits {
        command: 32,
        sasl_line: 64,
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
            match &event {
                ClientEvent::Command(cmd) => match decide(&state, cmd) {
                    Decision::Forward {
                        expect: Expect::Sasl,
                    } => rx.begin_sasl(),
                    Decision::StartTls(_) => return events,
                    _ => {}
                },
                ClientEvent::SaslResponse { cancel: true, .. } => rx.end_sasl(),
                _ => {}
            }
            events.push(event);
        }
    }
    events
}

fn run_server(input: &[u8], chunk: usize, expects: &[Expect]) -> Vec<ServerEvent> {
    let mut rx = ResponseReceiver::new(ResponseLimits {
        line: 64,
        multiline: 256,
    });
    for expect in expects {
        rx.expect(*expect);
    }
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
                ServerEvent::Greeting(r) => {
                    rewrite_greeting(&r.raw);
                }
                ServerEvent::Response(r) => {
                    for view in [CapaView::Cleartext, CapaView::Tls] {
                        let once = rewrite_capa(&r.raw, view);
                        assert_eq!(rewrite_capa(&once, view), once);
                    }
                }
                ServerEvent::Rejected(_) => {}
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
    let chunk = usize::from(selector & 0x3f) + 1;
    if selector & 0x80 == 0 {
        let state = GateState {
            listener: TlsMode::Starttls,
            tls_active: selector & 0x40 != 0,
        };
        let whole = run_client(input, input.len(), state);
        assert_eq!(run_client(input, chunk, state), whole);
    } else {
        // The first bytes pick the expected response shapes, the rest is the backend's output.
        let shapes = [
            Expect::SingleLine,
            Expect::MultiLine,
            Expect::Authentication,
            Expect::Sasl,
        ];
        let (head, input) = input.split_at(input.len().min(4));
        let expects: Vec<Expect> = head.iter().map(|b| shapes[usize::from(b % 4)]).collect();
        let whole = run_server(input, input.len(), &expects);
        assert_eq!(run_server(input, chunk, &expects), whole);
    }
});
