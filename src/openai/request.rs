//! Reading a request body: find `model` (and `stream`) without building a
//! JSON tree, and rewrite `model` in place when the route asks for it.
//!
//! The body is validated as a whole (UTF-8, one JSON object, nothing after
//! it) because the provider will parse it too: anything it could read
//! differently from us is rejected here. That includes every field the
//! gateway reads ([`READ_FIELDS`]): each must appear at most once, and in
//! exactly its spelling. Parsers disagree on duplicates (first or last
//! wins), and some match keys case-insensitively (Go's `encoding/json`, which
//! many OpenAI-compatible servers use, reads `"MODEL"` or `"Model"` as
//! `model`, and folds `ſ`, `K`, `ı` and `İ` to `s`, `k`, `i`, `i`), so
//! `{"model":"cheap","MODEL":"expensive"}` would be allowed and billed as
//! one model and served as another. Such bodies get a 400.
//!
//! The values the gateway does not read are only found and checked
//! ([`json_syntax`]: strings a 64-byte block at a time, nesting without
//! recursion); the few it reads are taken as byte ranges of the body.

use std::borrow::Cow;
use std::ops::Range;

use super::json_syntax::{self, ObjectError, SyntaxError};
use crate::config::{check_model_name, NameError};

/// What the gateway needs from a request body.
#[derive(Debug, PartialEq, Eq)]
pub struct RequestSummary<'a> {
    /// The requested model, unescaped.
    pub model: Cow<'a, str>,
    /// Byte range of the `model` value (quotes included) in the body.
    pub model_span: Range<usize>,
    /// `"stream": true` was asked for.
    pub stream: bool,
    /// The output cap the request names (`max_tokens`,
    /// `max_completion_tokens` or `max_output_tokens`), if a non-negative
    /// integer.
    pub max_output_tokens: Option<u64>,
}

/// The top-level fields the gateway reads: each must appear at most once,
/// spelled exactly so.
pub const READ_FIELDS: &[&str] = &[
    "model",
    "stream",
    "max_tokens",
    "max_completion_tokens",
    "max_output_tokens",
];

/// Why a body cannot be routed; each maps to a 400 with this text.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BodyError {
    #[error("The request body is not valid UTF-8 (invalid byte at offset {0}).")]
    NotUtf8(usize),
    #[error("The request body is empty; send a JSON object with a `model` field.")]
    Empty,
    #[error("The request body is not valid JSON: {0}.")]
    NotJson(String),
    #[error("The request body must be a JSON object with a `model` field.")]
    NotObject,
    #[error("The request body has no `model` field.")]
    ModelMissing,
    #[error("The `model` field must be a string.")]
    ModelNotString,
    #[error("The request body has more than one `model` field; send exactly one.")]
    DuplicateModel,
    #[error("The request body has a field {0:?} that some providers read as `model`; send exactly one field spelled `model`.")]
    ModelSpelling(String),
    #[error("The `model` field {0}.")]
    InvalidModel(#[source] NameError),
    #[error("The request body has more than one `{0}` field; send it once.")]
    DuplicateField(&'static str),
    #[error("The request body has a field {key:?} that some providers read as `{field}`; spell it `{field}`.")]
    FieldSpelling { key: String, field: &'static str },
}

impl BodyError {
    /// Whether the problem is the model name rather than the body's syntax.
    pub fn is_model_error(&self) -> bool {
        matches!(
            self,
            Self::ModelMissing
                | Self::ModelNotString
                | Self::DuplicateModel
                | Self::ModelSpelling(_)
                | Self::InvalidModel(_)
        )
    }
}

/// Reads `model` and `stream` from a JSON request body.
pub fn summarize(body: &[u8]) -> Result<RequestSummary<'_>, BodyError> {
    let fields = read_top_level(body).map_err(|e| match e {
        BodyError::NotJson(_) | BodyError::NotObject => unreadable(body, e),
        semantic => semantic,
    })?;

    let span = fields.model.ok_or(BodyError::ModelMissing)?;
    // The walk checked the body's UTF-8 (see `unreadable`): this cannot
    // fail, and costs the length of the model's name.
    let raw_text = std::str::from_utf8(&body[span.clone()])
        .map_err(|e| BodyError::NotUtf8(span.start + e.valid_up_to()))?;
    let model: Cow<'_, str> = if raw_text.starts_with('"') && !raw_text.contains('\\') {
        // The common case: no escapes, borrow the characters between quotes.
        Cow::Borrowed(&raw_text[1..raw_text.len() - 1])
    } else {
        Cow::Owned(serde_json::from_str::<String>(raw_text).map_err(|_| BodyError::ModelNotString)?)
    };
    check_model_name(&model).map_err(BodyError::InvalidModel)?;

    let stream = fields.stream.is_some_and(|s| &body[s] == b"true");
    let max_output_tokens = fields.max_output.and_then(|v| {
        std::str::from_utf8(&body[v])
            .ok()
            .and_then(|digits| digits.parse::<u64>().ok())
    });
    Ok(RequestSummary {
        model,
        model_span: span,
        stream,
        max_output_tokens,
    })
}

/// Why a body the walk could not read is refused, in the order a reader
/// of it wants: not UTF-8 anywhere, then empty, then its syntax.
///
/// The walk checks UTF-8 only where it must: in strings with a byte that
/// is not ASCII (JSON's grammar refuses such bytes anywhere else), so an
/// accepted body is valid UTF-8 and a mostly-ASCII one is read once, not
/// twice (`bench/RESULTS.md` entry 60). On refusal the whole body is
/// checked, which keeps the errors what a check up front would give.
fn unreadable(body: &[u8], syntax: BodyError) -> BodyError {
    match simdutf8::basic::from_utf8(body) {
        Err(_) => {
            // std says where; simdutf8's fast flavour only says whether.
            let valid_up_to = std::str::from_utf8(body).map_or_else(|e| e.valid_up_to(), str::len);
            BodyError::NotUtf8(valid_up_to)
        }
        Ok(text) if text.trim().is_empty() => BodyError::Empty,
        Ok(_) => syntax,
    }
}

/// Returns `body` with the `model` value at `span` replaced by `new_model`.
pub fn rewrite_model(body: &[u8], span: &Range<usize>, new_model: &str) -> Vec<u8> {
    // A JSON string encoding of a `&str` cannot fail.
    let encoded = serde_json::to_string(new_model).unwrap_or_default();
    let mut out = Vec::with_capacity(body.len() - span.len() + encoded.len());
    out.extend_from_slice(&body[..span.start]);
    out.extend_from_slice(encoded.as_bytes());
    out.extend_from_slice(&body[span.end..]);
    out
}

/// The top-level fields we keep, as byte ranges of the body.
#[derive(Default)]
struct Fields {
    model: Option<Range<usize>>,
    stream: Option<Range<usize>>,
    /// The first output cap seen (a request names one of them).
    max_output: Option<Range<usize>>,
    /// Which read fields were seen, in [`READ_FIELDS`] order.
    seen: [bool; READ_FIELDS.len()],
}

/// Reads the top-level object: its keys unescaped (so `"mod\u0065l"`
/// counts as `model`, exactly as the provider will read it), its values
/// only found. The first semantic problem is kept and the rest of the body
/// still read, so a syntax error anywhere wins (it is the clearer message).
fn read_top_level(body: &[u8]) -> Result<Fields, BodyError> {
    let mut fields = Fields::default();
    let mut problem = None;
    json_syntax::for_each_member(body, |key, value| {
        let key_text = key_text(&body[key.clone()]).ok_or(SyntaxError {
            what: "invalid escape in a key",
            at: key.start,
        })?;
        note_field(&mut fields, &mut problem, &key_text, value);
        Ok(())
    })
    .map_err(|e| match e {
        ObjectError::NotObject => BodyError::NotObject,
        ObjectError::Syntax(e) => BodyError::NotJson(describe(body, &e)),
    })?;
    match problem {
        Some(p) => Err(p),
        None => Ok(fields),
    }
}

/// Keeps a top-level member the gateway reads, or notes why the body is
/// refused (a read field twice, or spelled so that some parser reads it
/// as one).
fn note_field(
    fields: &mut Fields,
    problem: &mut Option<BodyError>,
    key: &str,
    value: Range<usize>,
) {
    let Some(index) = READ_FIELDS.iter().position(|f| *f == key) else {
        if let Some(field) = READ_FIELDS.iter().find(|f| folds_to(key, f)) {
            problem.get_or_insert(if *field == "model" {
                BodyError::ModelSpelling(key.to_owned())
            } else {
                BodyError::FieldSpelling {
                    key: key.to_owned(),
                    field,
                }
            });
        }
        return;
    };
    if std::mem::replace(&mut fields.seen[index], true) {
        problem.get_or_insert(match READ_FIELDS[index] {
            "model" => BodyError::DuplicateModel,
            field => BodyError::DuplicateField(field),
        });
    }
    match READ_FIELDS[index] {
        "model" => fields.model = Some(value),
        "stream" => fields.stream = Some(value),
        _ => {
            fields.max_output.get_or_insert(value);
        }
    }
}

/// A key's text (quotes included) unescaped: borrowed when it has no
/// escapes; `None` where serde_json would refuse it (an unpaired
/// surrogate). The walk has checked its UTF-8.
fn key_text(quoted: &[u8]) -> Option<Cow<'_, str>> {
    let quoted = std::str::from_utf8(quoted).ok()?;
    if quoted.contains('\\') {
        serde_json::from_str::<String>(quoted).ok().map(Cow::Owned)
    } else {
        Some(Cow::Borrowed(&quoted[1..quoted.len() - 1]))
    }
}

/// A syntax error as people read it: line and column, counted in bytes as
/// serde_json counts them.
fn describe(body: &[u8], e: &SyntaxError) -> String {
    let before = &body[..e.at.min(body.len())];
    let line = 1 + memchr::memchr_iter(b'\n', before).count();
    let column = before.len() - memchr::memrchr(b'\n', before).map_or(0, |n| n + 1) + 1;
    format!("{} at line {line} column {column}", e.what)
}

/// Whether `key` names `field` for a parser that matches keys without
/// regard to case: ASCII case, plus the non-ASCII letters whose simple case
/// mapping is an ASCII letter (`ſ` → S, `K` Kelvin → k, `ı` → I, `İ` → i),
/// as Go's `encoding/json`, Java's `equalsIgnoreCase` and .NET's
/// case-insensitive options fold them.
fn folds_to(key: &str, field: &str) -> bool {
    key.chars().count() == field.len()
        && key
            .chars()
            .zip(field.bytes())
            .all(|(c, f)| fold(c) == Some(f.to_ascii_uppercase()))
}

/// A character as an upper-case ASCII letter after case folding, if it
/// folds to one.
fn fold(c: char) -> Option<u8> {
    if c.is_ascii() {
        return Some((c as u8).to_ascii_uppercase());
    }
    let mut upper = c.to_uppercase();
    if let (Some(u), None) = (upper.next(), upper.next()) {
        if u.is_ascii() {
            return Some(u as u8);
        }
    }
    // `İ` lower-cases to `i` + a combining dot; per-character folds keep
    // the `i`.
    c.to_lowercase()
        .next()
        .filter(char::is_ascii)
        .map(|l| (l as u8).to_ascii_uppercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_model_and_stream() {
        let body =
            br#"{"messages":[{"role":"user","content":"Hi"}],"model":"gpt-4o-mini","stream":true}"#;
        let s = summarize(body).unwrap();
        assert_eq!(s.model, "gpt-4o-mini");
        assert!(s.stream);
        assert_eq!(&body[s.model_span.clone()], br#""gpt-4o-mini""#);
        assert!(matches!(s.model, Cow::Borrowed(_)));
    }

    #[test]
    fn stream_defaults_to_false() {
        assert!(!summarize(br#"{"model":"m"}"#).unwrap().stream);
        assert!(
            !summarize(br#"{"model":"m","stream":"true"}"#)
                .unwrap()
                .stream
        );
    }

    #[test]
    fn escaped_model_and_key_are_unescaped() {
        let s = summarize(br#"{"mod\u0065l":"xai\/grok-4.5"}"#).unwrap();
        assert_eq!(s.model, "xai/grok-4.5");
    }

    #[test]
    fn errors() {
        assert_eq!(summarize(b"").unwrap_err(), BodyError::Empty);
        assert_eq!(summarize(b"  \n").unwrap_err(), BodyError::Empty);
        assert_eq!(summarize(b"\xff\xfe").unwrap_err(), BodyError::NotUtf8(0));
        // Where it goes wrong, past SIMD's first block and mid-character.
        let mut long = format!(r#"{{"model":"m","messages":"{}"#, "é".repeat(40)).into_bytes();
        let at = long.len();
        long.extend_from_slice(b"\xc3\"}");
        assert_eq!(summarize(&long).unwrap_err(), BodyError::NotUtf8(at));
        long.truncate(at);
        long.extend_from_slice("é\"}".as_bytes());
        assert_eq!(summarize(&long).unwrap().model, "m");
        assert!(matches!(
            summarize(b"{\"model\":").unwrap_err(),
            BodyError::NotJson(_)
        ));
        assert!(matches!(
            summarize(b"model=gpt").unwrap_err(),
            BodyError::NotJson(_)
        ));
        assert_eq!(summarize(b"[1,2]").unwrap_err(), BodyError::NotObject);
        assert_eq!(summarize(b"\"model\"").unwrap_err(), BodyError::NotObject);
        assert_eq!(
            summarize(br#"{"messages":[]}"#).unwrap_err(),
            BodyError::ModelMissing
        );
        assert_eq!(
            summarize(br#"{"model":42}"#).unwrap_err(),
            BodyError::ModelNotString
        );
        assert_eq!(
            summarize(br#"{"model":null}"#).unwrap_err(),
            BodyError::ModelNotString
        );
        assert_eq!(
            summarize(br#"{"model":"a","model":"b"}"#).unwrap_err(),
            BodyError::DuplicateModel
        );
        assert_eq!(
            summarize(br#"{"model":"a","mod\u0065l":"b"}"#).unwrap_err(),
            BodyError::DuplicateModel
        );
        assert!(matches!(
            summarize(br#"{"model":"a"} {}"#).unwrap_err(),
            BodyError::NotJson(_)
        ));
        assert!(matches!(
            summarize(br#"{"model":""}"#).unwrap_err(),
            BodyError::InvalidModel(_)
        ));
    }

    #[test]
    fn syntax_errors_say_where() {
        for (body, message) in [
            (
                "{\"model\":\"m\",\n  \"x\": tru}",
                "invalid literal at line 2 column 8",
            ),
            (
                "{\"model\":\"m\"} {}",
                "trailing characters at line 1 column 15",
            ),
            (
                "{\"model\":\"m\",}",
                "expected a string key at line 1 column 14",
            ),
            ("{\"model\":\"m\"", "unexpected end at line 1 column 13"),
            ("{\"a\":\"\\x\"}", "invalid escape at line 1 column 7"),
            (
                "{\"\\ud800\":1}",
                "invalid escape in a key at line 1 column 2",
            ),
        ] {
            assert_eq!(
                summarize(body.as_bytes()).unwrap_err(),
                BodyError::NotJson(message.into()),
                "{body}"
            );
        }
    }

    /// Table: bodies a case-insensitive or first-wins parser would read
    /// differently from the gateway are refused, whatever the spelling.
    #[test]
    fn differently_spelled_or_repeated_read_fields_are_refused() {
        let model_cases = [
            r#"{"model":"gpt-4o-mini","MODEL":"gpt-5-expensive"}"#,
            r#"{"model":"gpt-4o-mini","Model":"gpt-5-expensive"}"#,
            r#"{"model":"gpt-4o-mini","mode\u004c":"gpt-5-expensive"}"#,
            r#"{"MODEL":"gpt-5-expensive","model":"gpt-4o-mini"}"#,
            r#"{"MODEL":"gpt-5-expensive"}"#,
            r#"{"mOdEl":"x","messages":[]}"#,
        ];
        for body in model_cases {
            let err = summarize(body.as_bytes()).unwrap_err();
            assert!(
                matches!(err, BodyError::ModelSpelling(_)),
                "{body}: {err:?}"
            );
            assert!(err.is_model_error(), "{body}");
        }
        let field_cases = [
            (r#"{"model":"m","STREAM":true}"#, "stream"),
            (r#"{"model":"m","\u017ftream":true}"#, "stream"),
            (r#"{"model":"m","max_to\u212Aens":99999}"#, "max_tokens"),
            (
                r#"{"model":"m","max_complet\u0131on_tokens":9}"#,
                "max_completion_tokens",
            ),
            (
                r#"{"model":"m","max_complet\u0130on_tokens":9}"#,
                "max_completion_tokens",
            ),
        ];
        for (body, field) in field_cases {
            match summarize(body.as_bytes()).unwrap_err() {
                BodyError::FieldSpelling { field: f, .. } => assert_eq!(f, field, "{body}"),
                other => panic!("{body}: {other:?}"),
            }
        }
        for (body, field) in [
            (r#"{"model":"m","stream":false,"stream":true}"#, "stream"),
            (
                r#"{"model":"m","max_tokens":1,"max_tokens":100000}"#,
                "max_tokens",
            ),
        ] {
            assert_eq!(
                summarize(body.as_bytes()).unwrap_err(),
                BodyError::DuplicateField(field),
                "{body}"
            );
        }
        // Look-alikes that fold to no read field pass, and nested keys are
        // not the top level's business.
        for body in [
            r#"{"model":"m","models":["x"],"modell":1,"mode":2}"#,
            r#"{"model":"m","metadata":{"MODEL":"x","model":"y"}}"#,
            r#"{"model":"m","\u00b5odel":1}"#,
        ] {
            assert_eq!(summarize(body.as_bytes()).unwrap().model, "m", "{body}");
        }
    }

    #[test]
    fn reads_the_output_cap() {
        let s = summarize(br#"{"model":"m","max_tokens":512}"#).unwrap();
        assert_eq!(s.max_output_tokens, Some(512));
        let s = summarize(br#"{"model":"m","max_completion_tokens":64}"#).unwrap();
        assert_eq!(s.max_output_tokens, Some(64));
        let s = summarize(br#"{"model":"m","max_output_tokens":-1}"#).unwrap();
        assert_eq!(s.max_output_tokens, None);
        assert_eq!(
            summarize(br#"{"model":"m"}"#).unwrap().max_output_tokens,
            None
        );
    }

    #[test]
    fn header_injection_in_model_is_refused() {
        let err = summarize(br#"{"model":"gpt\r\nx-ai-eg-backend: evil"}"#).unwrap_err();
        assert!(matches!(err, BodyError::InvalidModel(_)));
        assert!(err.is_model_error());
        let err = summarize(br#"{"model":"a\u0000b"}"#).unwrap_err();
        assert!(matches!(err, BodyError::InvalidModel(_)));
    }

    #[test]
    fn deep_nesting_is_skipped_without_recursion() {
        // Values are skipped with a stack on the heap, so deep nesting
        // outside `model` is valid JSON that routes, and cannot overflow
        // ours.
        let depth = 100_000;
        let mut body = String::from(r#"{"model":"m","x":"#);
        body.push_str(&"[".repeat(depth));
        body.push_str(&"]".repeat(depth));
        body.push('}');
        assert_eq!(summarize(body.as_bytes()).unwrap().model, "m");
        let mut nested_model = String::from(r#"{"model":"#);
        nested_model.push_str(&"[".repeat(depth));
        nested_model.push_str(&"]".repeat(depth));
        nested_model.push('}');
        assert!(summarize(nested_model.as_bytes()).is_err());
        let unbalanced = format!(r#"{{"model":"m","x":{}}}"#, "[".repeat(depth));
        assert!(matches!(
            summarize(unbalanced.as_bytes()).unwrap_err(),
            BodyError::NotJson(_)
        ));
    }

    #[test]
    fn invalid_utf8_inside_ignored_string_is_refused() {
        let mut body = br#"{"model":"m","messages":[{"content":""#.to_vec();
        body.push(0xC3);
        body.extend_from_slice(br#""}]}"#);
        assert!(matches!(
            summarize(&body).unwrap_err(),
            BodyError::NotUtf8(_)
        ));
    }

    #[test]
    fn rewrite_keeps_everything_else() {
        let body = br#"{ "stream" : false , "model" : "alias", "x": {"model":"inner"} }"#;
        let s = summarize(body).unwrap();
        let out = rewrite_model(body, &s.model_span, "real/\"quoted\"-model");
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["model"], "real/\"quoted\"-model");
        assert_eq!(v["x"]["model"], "inner");
        assert_eq!(v["stream"], false);
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{ "stream" : false , "model" : "real/\"quoted\"-model", "x": {"model":"inner"} }"#
        );
    }
}
