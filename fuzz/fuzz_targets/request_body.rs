//! The request-body reader: never panics; its JSON syntax check accepts
//! exactly what serde_json accepts, value by value (where serde_json's
//! skip leaves UTF-8 to its caller, the walk refuses invalid UTF-8) and
//! body by body;
//! whenever it accepts a body, rewriting `model` gives valid JSON naming
//! the new model; and every parser a provider might use reads the same
//! model from an accepted body: first-wins, last-wins, and
//! case-insensitive (Go's `encoding/json`).
#![no_main]

use std::fmt;

use ai_gateway_extproc::openai::json_syntax::{skip_whitespace, value_end};
use ai_gateway_extproc::openai::request::{rewrite_model, summarize, BodyError};
use libfuzzer_sys::fuzz_target;
use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};

fuzz_target!(|data: &[u8]| {
    // One value, skipped: the gateway's walk against serde_json's. The
    // walk also checks UTF-8 (in strings; JSON's grammar allows ASCII only
    // elsewhere), which serde_json's skip leaves to its caller.
    let walked = value_end(data, skip_whitespace(data, 0))
        .is_ok_and(|end| skip_whitespace(data, end) == data.len());
    let skipped = serde_json::from_slice::<IgnoredAny>(data).is_ok();
    assert_eq!(
        walked,
        skipped && std::str::from_utf8(data).is_ok(),
        "the walk and serde_json disagree on a value"
    );

    // A body: refused for its syntax exactly when serde_json cannot read
    // it as an object of entries.
    let mut de = serde_json::Deserializer::from_slice(data);
    let readable = de.deserialize_map(Entries).is_ok() && de.end().is_ok();
    let summary = summarize(data);
    match &summary {
        Ok(_) => assert!(readable, "accepted a body serde_json cannot read"),
        Err(
            BodyError::NotJson(_) | BodyError::NotObject | BodyError::NotUtf8(_) | BodyError::Empty,
        ) => {
            assert!(!readable, "refused a body serde_json reads: {summary:?}")
        }
        Err(_) => assert!(
            readable,
            "a semantic refusal of a body serde_json cannot read"
        ),
    }
    let Ok(summary) = summary else {
        return;
    };
    assert!(summary.model_span.end <= data.len());
    let out = rewrite_model(data, &summary.model_span, "fuzz/model");
    // Read as entries, not as a `Value`: a `Value` refuses numbers out of
    // f64's range (`1e999`), which JSON allows and the body may hold.
    let mut de = serde_json::Deserializer::from_slice(&out);
    let rewritten = de.deserialize_map(Entries).expect("rewrite broke the JSON");
    de.end().expect("rewrite left something after the JSON");
    let models: Vec<_> = rewritten.iter().filter(|(k, _)| k == "model").collect();
    assert_eq!(models.len(), 1);
    assert_eq!(
        serde_json::from_str::<String>(models[0].1.get())
            .ok()
            .as_deref(),
        Some("fuzz/model")
    );

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
        assert_eq!(
            first.as_deref(),
            Some(&*summary.model),
            "first-wins parser disagrees"
        );
        assert_eq!(
            last.as_deref(),
            Some(&*summary.model),
            "last-wins parser disagrees"
        );
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
