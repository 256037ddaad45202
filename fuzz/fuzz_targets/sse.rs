//! The SSE parser: never panics, and the events do not depend on where the
//! network split the stream.
#![no_main]

use ai_gateway_extproc::openai::sse::SseParser;
use libfuzzer_sys::fuzz_target;

fn events(chunks: &[&[u8]]) -> Vec<Vec<u8>> {
    let mut parser = SseParser::new();
    let mut out = Vec::new();
    for c in chunks {
        parser.push(c, &mut |e| out.push(e.to_vec()));
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let at = split as usize % (rest.len() + 1);
    assert_eq!(events(&[rest]), events(&[&rest[..at], &rest[at..]]));
});
