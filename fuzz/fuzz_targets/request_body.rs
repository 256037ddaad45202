//! The request-body reader: never panics; whenever it accepts a body,
//! rewriting `model` gives valid JSON naming the new model; and every
//! parser a provider might use reads the same model from an accepted body:
//! first-wins, last-wins, and case-insensitive (Go's `encoding/json`).
#![no_main]

use std::fmt;

use ai_gateway_extproc::openai::request::{rewrite_model, summarize};
use libfuzzer_sys::fuzz_target;
use serde::de::{Deserializer, MapAccess, Visitor};

fuzz_target!(|data: &[u8]| {
    let Ok(summary) = summarize(data) else {
        return;
    };
    assert!(summary.model_span.end <= data.len());
    let out = rewrite_model(data, &summary.model_span, "fuzz/model");
    let v: serde_json::Value = serde_json::from_slice(&out).expect("rewrite broke the JSON");
    assert_eq!(v["model"], "fuzz/model");

    // The top-level entries in order, duplicates kept, as a provider's
    // parser meets them.
    let entries = serde_json::Deserializer::from_slice(data)
        .deserialize_map(Entries)
        .expect("an accepted body is a JSON object");
    for fold in [exact as fn(&str) -> String, go_fold] {
        let model_matches: Vec<Option<String>> = entries
            .iter()
            .filter(|(k, _)| fold(k) == fold("model"))
            .map(|(_, v)| serde_json::from_str::<String>(v.get()).ok())
            .collect();
        let first = model_matches.first().cloned().flatten();
        let last = model_matches.last().cloned().flatten();
        assert_eq!(first.as_deref(), Some(&*summary.model), "first-wins parser disagrees");
        assert_eq!(last.as_deref(), Some(&*summary.model), "last-wins parser disagrees");
    }
});

fn exact(key: &str) -> String {
    key.to_string()
}

/// Go's `encoding/json` key folding, written independently of the gateway:
/// ASCII upper case, and for other runes `ToUpper(ToLower(r))`, which maps
/// `ſ`, `K` (Kelvin), `ı` and `İ` onto ASCII letters.
fn go_fold(key: &str) -> String {
    key.chars()
        .map(|c| match c {
            'a'..='z' => c.to_ascii_uppercase(),
            '\u{017f}' => 'S',
            '\u{212a}' => 'K',
            '\u{0131}' | '\u{0130}' => 'I',
            _ => c,
        })
        .collect()
}

struct Entries;

impl<'de> Visitor<'de> for Entries {
    // Raw values: skipped without recursion, as deep as the gateway allows.
    type Value = Vec<(String, Box<serde_json::value::RawValue>)>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::new();
        while let Some(entry) = map.next_entry::<String, Box<serde_json::value::RawValue>>()? {
            out.push(entry);
        }
        Ok(out)
    }
}
