//! Client command framing, parsing and the policy gate: no panic, and the same lines whether
//! the input arrives whole or split at a position taken from the first byte.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailfront::config::TlsMode;
use mailfront::smtp::command::{Command, SaslResponse};
use mailfront::smtp::policy::{ClientInput, GateState, Verdict, decide};
use mailfront::smtp::receiver::{CommandReceiver, Line, LineMode};

#[derive(Debug, PartialEq, Eq)]
enum Event {
    Line(Line),
    TooLong,
}

fn run(chunks: &[&[u8]], mode: LineMode) -> Vec<Event> {
    // Small limits so over-long lines are reached often.
    let mut receiver = CommandReceiver::new(64, 256);
    let mut events = Vec::new();
    for chunk in chunks {
        let mut rest = *chunk;
        while !rest.is_empty() {
            let (n, result) = receiver.receive(rest, mode);
            assert!(n <= rest.len());
            rest = &rest[n..];
            match result {
                Ok(Some(line)) => events.push(Event::Line(line)),
                Ok(None) => assert!(rest.is_empty()),
                Err(_) => events.push(Event::TooLong),
            }
        }
    }
    events
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, input)) = data.split_first() else {
        return;
    };
    let mode = if first & 1 == 0 {
        LineMode::Command
    } else {
        LineMode::SaslResponse
    };
    let split = usize::from(first).min(input.len());
    let whole = run(&[input], mode);
    let (a, b) = input.split_at(split);
    assert_eq!(run(&[a, b], mode), whole);

    let states = [
        GateState::new(TlsMode::Starttls, true),
        GateState::new(TlsMode::Starttls, false),
        GateState::new(TlsMode::Implicit, true),
    ];
    for event in &whole {
        let Event::Line(line) = event else { continue };
        let text = line.text();
        // Line endings are framing: nothing forwarded may hold a bare CR, a NUL, or have
        // been ended by a bare LF, in any state.
        let clean = !line.ends_with_bare_lf() && !text.contains(&b'\r') && !text.contains(&0);
        let sasl = SaslResponse::from_line(line);
        if decide(&states[2], ClientInput::SaslResponse(sasl)) == Verdict::Forward {
            assert!(clean);
        }
        let command = Command::from_line(line);
        for state in &states {
            let verdict = decide(state, ClientInput::Command(&command));
            if verdict == Verdict::Forward {
                assert!(clean);
            }
            // The central property: nothing but the allowed verbs crosses before TLS.
            if !state.client_tls && verdict == Verdict::Forward {
                assert!(!matches!(
                    command,
                    Command::Auth(_) | Command::Xclient | Command::Xforward
                ));
            }
        }
    }
});
