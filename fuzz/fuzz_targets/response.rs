//! The response reader (content decoding, SSE or JSON, usage): never
//! panics, whatever the bytes and the headers claim; reads a plain body
//! the same however it is chunked (a stream's model is read late, from a
//! kept event); and the filters that spare stream events a parse never
//! turn down one that reports usage or names a model.
#![no_main]

use ai_gateway_extproc::openai::response::ResponseReader;
use ai_gateway_extproc::openai::usage::{may_name_model, may_report_usage, observe};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, body)) = data.split_first() else {
        return;
    };
    let content_type: &[u8] = if flags & 1 == 0 { b"text/event-stream" } else { b"application/json" };
    let encoding: Option<&[u8]> = match flags >> 1 & 3 {
        0 => None,
        1 => Some(b"gzip"),
        2 => Some(b"deflate"),
        _ => Some(b"br"),
    };
    let read = |piece: usize| {
        let mut reader = ResponseReader::new(Some(content_type), encoding);
        for chunk in body.chunks(piece) {
            reader.push(chunk);
        }
        reader.finish()
    };
    let chunked = read(1 + (flags as usize >> 3));
    if encoding.is_none() && !body.is_empty() {
        assert_eq!(chunked, read(body.len()), "the chunking changed what was read");
    }
    // A key written with escapes is the filters' stated blind spot.
    if !body.contains(&b'\\') {
        let observed = observe(body);
        if !observed.usage.is_empty() {
            assert!(may_report_usage(body), "an event with usage was turned down");
        }
        if observed.model.is_some() {
            assert!(may_name_model(body), "an event naming a model was turned down");
        }
    }
});
