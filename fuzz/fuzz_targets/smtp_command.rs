//! Client command framing, parsing, the policy gate and the canonical re-encoding: no panic, the
//! same lines whether the input arrives whole or split at a position taken from the first byte,
//! and every forwarded command written by mailfront as one clean line under every backend's
//! limit that means what the client's line meant (re-parsing it gives the same command).
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailfront::config::TlsMode;
use mailfront::smtp::canonical::{self, BACKEND_LINE_CEILING, Encoded, SASL_LINE_LIMIT};
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
                check_encoding(&command, text);
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

/// What reaches the backend for a forwarded command: mailfront's own line(s), each one clean
/// and under the cut of every backend, re-parsing to the same command, and a fixpoint.
fn check_encoding(command: &Command, text: &[u8]) {
    let Ok(encoded) = canonical::encode(command, text) else {
        return;
    };
    let line = match &encoded {
        Encoded::Line(line) => line.clone(),
        Encoded::AuthSplit { command, response } => {
            assert!(response.len() <= SASL_LINE_LIMIT);
            assert!(response.ends_with(b"\r\n"));
            let body = &response[..response.len() - 2];
            assert!(
                !body
                    .iter()
                    .any(|&b| b == b'\r' || b == b'\n' || b == 0 || b == b' ')
            );
            command.clone()
        }
    };
    assert!(line.len() < BACKEND_LINE_CEILING, "{} octets", line.len());
    assert!(line.ends_with(b"\r\n"));
    let body = &line[..line.len() - 2];
    assert!(!body.iter().any(|&b| b == b'\r' || b == b'\n' || b == 0));
    assert!(!body.windows(2).any(|w| w == b"  "), "single spaces");
    assert!(!body.iter().any(|&b| b == b'\t' || b == 0x0b || b == 0x0c));
    let again = Command::parse(body);
    assert_eq!(again.verb(), command.verb());
    if let Encoded::Line(_) = encoded {
        if matches!(
            command,
            Command::Mail(_) | Command::Rcpt(_) | Command::Bdat(_)
        ) {
            assert_eq!(
                &again,
                command,
                "re-parse of {:?}",
                String::from_utf8_lossy(body)
            );
        }
        assert_eq!(canonical::encode(&again, body), Ok(encoded), "a fixpoint");
    }
}
