//! Backend reply framing and EHLO rewriting: no panic, split invariance, and every rewritten
//! EHLO reply is itself one well-formed reply.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailfront::config::TlsMode;
use mailfront::smtp::ehlo::{BackendCapabilities, EhloContext, rewrite_ehlo};
use mailfront::smtp::reply::{Reply, ReplyReceiver};

fn run(chunks: &[&[u8]]) -> Vec<Result<Reply, ()>> {
    let mut receiver = ReplyReceiver::new(128, 16);
    let mut events = Vec::new();
    for chunk in chunks {
        let mut rest = *chunk;
        while !rest.is_empty() {
            let (n, result) = receiver.receive(rest);
            assert!(n <= rest.len());
            rest = &rest[n..];
            match result {
                Ok(Some(reply)) => events.push(Ok(reply)),
                Ok(None) => assert!(rest.is_empty()),
                Err(_) => events.push(Err(())),
            }
        }
    }
    events
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, input)) = data.split_first() else {
        return;
    };
    let split = usize::from(first).min(input.len());
    let whole = run(&[input]);
    let (a, b) = input.split_at(split);
    assert_eq!(run(&[a, b]), whole);

    for reply in whole.iter().flatten() {
        let _ = reply.enhanced_status();
        let _ = BackendCapabilities::from_ehlo(reply);
        for (client_tls, listener) in [
            (false, TlsMode::Starttls),
            (true, TlsMode::Starttls),
            (true, TlsMode::Implicit),
        ] {
            let ctx = EhloContext {
                client_tls,
                listener,
                hostname: Some("mx.example.test"),
                size_reserve: u64::from(first),
            };
            let rewritten = rewrite_ehlo(reply, &ctx);
            if reply.code() == 250 {
                let parsed = Reply::parse(&rewritten);
                // A backend line containing a bare CR or odd bytes stays one line: only LF splits.
                assert!(parsed.is_some(), "{rewritten:?}");
            }
        }
    }
});
