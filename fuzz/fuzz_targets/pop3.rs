//! POP3 command and response receivers, gate and CAPA rewriter: no panic on any input, the same
//! events whether the input arrives whole or in reads of a size taken from the first byte, and
//! a differential check of what the gate lets through: before TLS nothing reaches the backend;
//! after TLS the bytes written to the backend, re-parsed by a strict framer written here from
//! RFC 1939 / RFC 5034, are CRLF-terminated lines without CR, LF or NUL inside, each a
//! whitelisted command or an AUTH continuation, never XCLIENT/XOIP; and the CAPA a listener that
//! routes by user shows offers only mechanisms that name the user first, and no STLS.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailfront::pop3::capa::{CapaView, rewrite_capa, rewrite_greeting};
use mailfront::pop3::codec::{
    ClientEvent, CommandLimits, CommandReceiver, Expect, ResponseLimits, ResponseReceiver,
    ServerEvent,
};
use mailfront::pop3::policy::{Decision, Local, after_tls, before_tls};

/// Runs the framer and gate; returns the events and what would reach the backend, as
/// (line, is-a-SASL-continuation) pairs.
fn run_client(input: &[u8], chunk: usize, tls: bool) -> (Vec<ClientEvent>, Vec<(Vec<u8>, bool)>) {
    let mut rx = CommandReceiver::new(CommandLimits {
        command: 32,
        sasl_line: 64,
    });
    let mut buf = Vec::new();
    let mut events = Vec::new();
    let mut backend = Vec::new();
    for piece in input.chunks(chunk.max(1)) {
        buf.extend_from_slice(piece);
        loop {
            let step = rx.next(&buf);
            assert!(step.consumed <= buf.len());
            buf.drain(..step.consumed);
            let Some(event) = step.event else { break };
            events.push(event.clone());
            match &event {
                ClientEvent::Command(cmd) if !tls => match before_tls(cmd) {
                    Local::StartTls(_) | Local::Quit(_) => return (events, backend),
                    Local::Reply(_) | Local::RefuseCredentials(_) => {}
                },
                ClientEvent::Command(cmd) => match after_tls(cmd) {
                    Decision::Forward { request, expect } => {
                        backend.push((request.canonical(), false));
                        if expect == Expect::Sasl {
                            rx.begin_sasl();
                        }
                    }
                    Decision::Reply(_) => {}
                },
                ClientEvent::SaslResponse(line) => {
                    // The backend's answer to each continuation ends the exchange here.
                    backend.push((line.canonical(), true));
                    rx.end_sasl();
                }
                ClientEvent::Rejected(_) => {}
            }
        }
    }
    (events, backend)
}

/// An independent strict reading of one line mailfront sent to the backend.
fn check_backend_line(line: &[u8], sasl: bool) {
    let content = line
        .strip_suffix(b"\r\n")
        .expect("every line ends with CRLF");
    assert!(
        !content.iter().any(|&b| b == b'\r' || b == b'\n' || b == 0),
        "CR, LF or NUL inside {line:?}"
    );
    if sasl {
        let base64 = |b: &u8| b.is_ascii_alphanumeric() || *b == b'+' || *b == b'/' || *b == b'=';
        assert!(content == b"*" || content.iter().all(base64), "{line:?}");
        return;
    }
    let keyword = content.split(|&b| b == b' ').next().unwrap_or_default();
    assert!(
        [&b"CAPA"[..], b"USER", b"PASS", b"AUTH", b"QUIT"].contains(&keyword),
        "not whitelisted: {line:?}"
    );
    // APOP never, on any listener: the client only ever sees mailfront's greeting, which has
    // no timestamp (RFC 1939 §7).
    assert_ne!(keyword, b"APOP");
}

/// What a listener that routes by user shows: no `STLS` (TLS is up), and on the `SASL` line only
/// mechanisms whose first client response names the user, each a valid mechanism name.
fn check_routed_capa(shown: &[u8]) {
    for line in shown.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let mut words = line.split(|&b| b == b' ');
        let keyword = words.next().unwrap_or_default();
        assert!(
            !keyword.eq_ignore_ascii_case(b"STLS"),
            "STLS shown: {shown:?}"
        );
        if keyword.eq_ignore_ascii_case(b"SASL") {
            for mechanism in words.filter(|w| !w.is_empty()) {
                assert!(
                    mailfront::sasl::is_routable(mechanism),
                    "{:?} shown on a routed listener: {shown:?}",
                    String::from_utf8_lossy(mechanism)
                );
            }
        }
    }
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
                    for view in [CapaView::Cleartext, CapaView::Tls, CapaView::Routed] {
                        let once = rewrite_capa(&r.raw, view);
                        assert_eq!(rewrite_capa(&once, view), once);
                    }
                    check_routed_capa(&rewrite_capa(&r.raw, CapaView::Routed));
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
        let tls = selector & 0x40 != 0;
        let whole = run_client(input, input.len(), tls);
        assert_eq!(run_client(input, chunk, tls), whole);
        let (_, backend) = whole;
        if !tls {
            assert!(backend.is_empty(), "forwarded before TLS: {backend:?}");
        }
        for (line, sasl) in &backend {
            check_backend_line(line, *sasl);
        }
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
