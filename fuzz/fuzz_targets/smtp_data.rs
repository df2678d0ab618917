//! DATA scanning: no panic, split invariance, and the smuggling property: what is forwarded
//! never contains a bare CR or LF, so no lenient backend can find an end of data early.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailfront::smtp::data::{DataEvent, DataScanner};

#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    forwarded: Vec<u8>,
    events: Vec<DataEvent>,
    end_at: Option<usize>,
    size: u64,
}

fn run(chunks: &[&[u8]]) -> Outcome {
    let mut scanner = DataScanner::new();
    let mut forwarded = Vec::new();
    let mut events = Vec::new();
    let mut offset = 0;
    let mut end_at = None;
    'outer: for chunk in chunks {
        let mut rest = *chunk;
        loop {
            let step = scanner.scan(rest);
            assert!(step.consumed <= rest.len());
            for part in step.forward_parts(rest) {
                forwarded.extend_from_slice(part);
            }
            offset += step.consumed;
            rest = &rest[step.consumed..];
            match step.event {
                DataEvent::NeedMore => break,
                DataEvent::End | DataEvent::EndRefused(_) => {
                    events.push(step.event);
                    end_at = Some(offset);
                    break 'outer;
                }
                DataEvent::Refusing(_) => events.push(step.event),
            }
        }
    }
    Outcome {
        forwarded,
        events,
        end_at,
        size: scanner.size(),
    }
}

/// Maps bytes onto the alphabet that matters most, so line-ending states are reached often.
fn into_alphabet(data: &[u8]) -> Vec<u8> {
    data.iter()
        .map(|&b| match b % 8 {
            0 | 1 => b'\r',
            2 | 3 => b'\n',
            4 | 5 => b'.',
            6 => b'a',
            _ => b,
        })
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let input = if first & 0x80 != 0 {
        into_alphabet(rest)
    } else {
        rest.to_vec()
    };
    let split = usize::from(first & 0x7f).min(input.len());
    let whole = run(&[&input]);
    let (a, b) = input.split_at(split);
    assert_eq!(run(&[a, b]), whole);

    let forwarded = &whole.forwarded;
    for (i, &byte) in forwarded.iter().enumerate() {
        match byte {
            b'\r' => assert!(matches!(forwarded.get(i + 1), Some(b'\n') | None)),
            b'\n' => assert!(i > 0 && forwarded.get(i - 1) == Some(&b'\r')),
            _ => {}
        }
    }
    let clean_end = whole.events.last() == Some(&DataEvent::End);
    let body = if clean_end {
        assert!(forwarded.ends_with(b"\r\n.\r\n") || forwarded == b".\r\n");
        &forwarded[..forwarded.len() - 3]
    } else {
        &forwarded[..]
    };
    let padded = [b"\r\n", body].concat();
    assert!(!padded.windows(5).any(|w| w == b"\r\n.\r\n"));
});
