//! Strict pre-login IMAP receiver with a differential oracle: arbitrary bytes in arbitrary
//! reads, every literal accepted; each parsed command is written again with `encode` and the
//! bytes the backend would receive are re-parsed by an independent strict parser (imap-codec),
//! piece by piece as a server would read them. It must find exactly one command, with the same
//! tag, kind and arguments, ask for a `+` exactly where mailfront waits for one, and see nothing
//! for commands mailfront never forwards (STARTTLS, anything else).
#![no_main]

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use imap_codec::decode::{CommandDecodeError, Decoder};
use imap_codec::imap_types::auth::AuthenticateData;
use imap_codec::imap_types::command::CommandBody;
use imap_codec::imap_types::core::LiteralMode;
use imap_codec::{AuthenticateDataCodec, CommandCodec};
use libfuzzer_sys::fuzz_target;
use mailfront::imap::command::{
    Command, CommandReceiver, Event, Limits, SaslLine, encode, encode_sasl,
};

/// The backend's view of `encode`'s pieces, compared with what mailfront parsed.
fn oracle(tag: &[u8], command: &Command) {
    for literal_plus in [false, true] {
        let pieces = encode(tag, command, literal_plus);
        if matches!(command, Command::StartTls | Command::Other { .. }) {
            assert!(pieces.is_none(), "{command:?} must never be forwarded");
            continue;
        }
        let Some(pieces) = pieces else {
            panic!("a parsed command does not encode: {command:?}");
        };
        assert!(!pieces.is_empty());
        if literal_plus {
            assert_eq!(pieces.len(), 1);
        }
        let mut sent = Vec::new();
        for (i, piece) in pieces.iter().enumerate() {
            sent.extend_from_slice(piece);
            let last = i + 1 == pieces.len();
            match CommandCodec::default().decode(&sent) {
                // The backend stops for a `+` exactly where the next piece waits for one.
                Err(CommandDecodeError::LiteralFound {
                    tag: t,
                    mode: LiteralMode::Sync,
                    ..
                }) if !last => assert_eq!(t.as_ref().as_bytes(), tag),
                Ok((rest, parsed)) if last => {
                    assert!(rest.is_empty(), "one command only: {sent:?}");
                    assert_eq!(parsed.tag.as_ref().as_bytes(), tag);
                    same(command, &parsed.body, &sent);
                }
                other => panic!("imap-codec: {other:?} for piece {i} of {pieces:?}"),
            }
        }
    }
}

fn same(ours: &Command, theirs: &CommandBody<'_>, sent: &[u8]) {
    match (ours, theirs) {
        (Command::Capability, CommandBody::Capability)
        | (Command::Noop, CommandBody::Noop)
        | (Command::Logout, CommandBody::Logout) => {}
        (
            Command::Login { username, password },
            CommandBody::Login {
                username: u,
                password: p,
            },
        ) => {
            assert_eq!(u.as_ref(), username.as_slice());
            assert_eq!(p.declassify().as_ref(), password.as_slice());
        }
        (
            Command::Authenticate {
                mechanism,
                initial_response,
            },
            CommandBody::Authenticate {
                mechanism: m,
                initial_response: ir,
            },
        ) => {
            assert!(m.as_ref().as_bytes().eq_ignore_ascii_case(mechanism));
            let ours = initial_response.as_ref().map(|ir| {
                if ir == b"=" {
                    Vec::new()
                } else {
                    STANDARD
                        .decode(ir)
                        .unwrap_or_else(|e| panic!("{e}: {ir:?}"))
                }
            });
            let theirs = ir.as_ref().map(|ir| ir.declassify().to_vec());
            assert_eq!(ours, theirs, "{sent:?}");
        }
        (Command::Id(id), CommandBody::Id { parameters }) => {
            let theirs = parameters.as_ref().map(|pairs| {
                pairs
                    .iter()
                    .map(|(f, v)| {
                        (
                            f.as_ref().to_vec(),
                            v.0.as_ref().map(|v| v.as_ref().to_vec()),
                        )
                    })
                    .collect::<Vec<_>>()
            });
            let ours = id.params.as_ref().map(|pairs| {
                pairs
                    .iter()
                    .map(|p| (p.field.clone(), p.value.clone()))
                    .collect::<Vec<_>>()
            });
            assert_eq!(ours, theirs, "{sent:?}");
        }
        _ => panic!("kind differs: {ours:?} vs {theirs:?} from {sent:?}"),
    }
}

/// A SASL line as the backend reads it.
fn sasl_oracle(line: &SaslLine) {
    let out = encode_sasl(line);
    match (line, AuthenticateDataCodec::default().decode(&out)) {
        (SaslLine::Cancel | SaslLine::Invalid, Ok((rest, AuthenticateData::Cancel))) => {
            assert!(rest.is_empty())
        }
        (SaslLine::Response(b64), Ok((rest, AuthenticateData::Continue(data)))) => {
            assert!(rest.is_empty());
            assert_eq!(
                STANDARD.decode(b64).ok().as_deref(),
                Some(&data.declassify()[..])
            );
        }
        (line, other) => panic!("{line:?}: imap-codec {other:?}"),
    }
}

/// Plays a driver accepting every literal; AUTHENTICATE without an initial response enters
/// SASL, which ends at a cancel or after two lines.
fn run(input: &[u8], chunk: usize, limits: Limits, check: bool) -> Vec<Event> {
    let mut rx = CommandReceiver::new(limits);
    let mut buf = Vec::new();
    let mut events = Vec::new();
    let mut sasl_lines = 0;
    for piece in input.chunks(chunk.max(1)) {
        buf.extend_from_slice(piece);
        loop {
            let step = rx.next(&buf);
            assert!(step.consumed <= buf.len());
            buf.drain(..step.consumed);
            let Some(event) = step.event else { break };
            match &event {
                Event::LiteralRequested { size, .. } => {
                    assert!(*size <= limits.literal);
                    rx.accept_literal();
                }
                Event::Command { tag, command } => {
                    if check {
                        oracle(tag, command);
                    }
                    if let Command::Authenticate {
                        initial_response: None,
                        ..
                    } = command
                    {
                        rx.begin_sasl();
                        sasl_lines = 0;
                    }
                }
                Event::Sasl(line) => {
                    if check {
                        sasl_oracle(line);
                    }
                    sasl_lines += 1;
                    if *line == SaslLine::Cancel || sasl_lines == 2 {
                        rx.end_sasl();
                    }
                }
                Event::Rejected(r) => {
                    assert!(r.reply().ends_with(b"\r\n"));
                }
            }
            events.push(event);
        }
        // The driver never holds more than one line and one read.
        assert!(buf.len() < limits.line.max(limits.sasl_line) + chunk.max(1));
    }
    events
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, input)) = data.split_first() else {
        return;
    };
    let limits = if selector & 0x80 == 0 {
        Limits {
            line: 64,
            literal: 48,
            command: 192,
            sasl_line: 48,
        }
    } else {
        Limits::default()
    };
    let whole = run(input, input.len(), limits, true);
    let chunk = usize::from(selector & 0x3f) + 1;
    assert_eq!(run(input, chunk, limits, false), whole);
});
