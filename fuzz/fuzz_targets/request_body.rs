//! The request-body reader: never panics, and whenever it accepts a body,
//! rewriting `model` gives valid JSON naming the new model.
#![no_main]

use ai_gateway_extproc::openai::request::{rewrite_model, summarize};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(summary) = summarize(data) {
        assert!(summary.model_span.end <= data.len());
        let out = rewrite_model(data, &summary.model_span, "fuzz/model");
        let v: serde_json::Value = serde_json::from_slice(&out).expect("rewrite broke the JSON");
        assert_eq!(v["model"], "fuzz/model");
    }
});
