//! Reading a request body: find `model` (and `stream`) without building a
//! JSON tree, and rewrite `model` in place when the route asks for it.
//!
//! The body is validated as a whole (UTF-8, one JSON object, nothing after
//! it) because the provider will parse it too: anything it could read
//! differently from us is rejected here. Values other than `model` and
//! `stream` are skipped by serde_json without allocating, and serde_json's
//! recursion limit turns absurd nesting into an error instead of a stack
//! overflow.

use std::borrow::Cow;
use std::fmt;
use std::ops::Range;

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, Visitor};
use serde_json::value::RawValue;

use crate::config::check_model_name;

/// What the gateway needs from a request body.
#[derive(Debug, PartialEq, Eq)]
pub struct RequestSummary<'a> {
    /// The requested model, unescaped.
    pub model: Cow<'a, str>,
    /// Byte range of the `model` value (quotes included) in the body.
    pub model_span: Range<usize>,
    /// `"stream": true` was asked for.
    pub stream: bool,
}

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
    #[error("The `model` field {0}.")]
    InvalidModel(String),
}

impl BodyError {
    /// Whether the problem is the model name rather than the body's syntax.
    pub fn is_model_error(&self) -> bool {
        matches!(
            self,
            Self::ModelMissing
                | Self::ModelNotString
                | Self::DuplicateModel
                | Self::InvalidModel(_)
        )
    }
}

/// Reads `model` and `stream` from a JSON request body.
pub fn summarize(body: &[u8]) -> Result<RequestSummary<'_>, BodyError> {
    let text = std::str::from_utf8(body).map_err(|e| BodyError::NotUtf8(e.valid_up_to()))?;
    if text.trim().is_empty() {
        return Err(BodyError::Empty);
    }
    let mut de = serde_json::Deserializer::from_str(text);
    let fields = de::Deserializer::deserialize_any(&mut de, TopLevel).map_err(classify)?;
    de.end().map_err(classify)?;
    let fields = fields?;

    let raw = fields.model.ok_or(BodyError::ModelMissing)?;
    let raw_text = raw.get();
    let model: Cow<'_, str> = if raw_text.starts_with('"') && !raw_text.contains('\\') {
        // The common case: no escapes, borrow the characters between quotes.
        Cow::Borrowed(&raw_text[1..raw_text.len() - 1])
    } else {
        Cow::Owned(serde_json::from_str::<String>(raw_text).map_err(|_| BodyError::ModelNotString)?)
    };
    check_model_name(&model).map_err(BodyError::InvalidModel)?;

    // `RawValue::get` borrows from `text`, so its address gives its offset.
    let start = raw_text.as_ptr() as usize - text.as_ptr() as usize;
    let stream = matches!(fields.stream.map(RawValue::get), Some("true"));
    Ok(RequestSummary {
        model,
        model_span: start..start + raw_text.len(),
        stream,
    })
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

fn classify(e: serde_json::Error) -> BodyError {
    if e.is_data() {
        // Our visitor's "not an object" arrives as a data error.
        BodyError::NotObject
    } else {
        BodyError::NotJson(e.to_string())
    }
}

/// The top-level fields we keep, as raw slices of the body.
struct Fields<'a> {
    model: Option<&'a RawValue>,
    stream: Option<&'a RawValue>,
}

/// Visits the top-level object. Keys are compared after unescaping, so
/// `"mod\u0065l"` counts as `model`, exactly as the provider will read it.
struct TopLevel;

/// The visitor's result: a semantic error is kept apart from a syntax one.
type VisitResult<'a> = Result<Fields<'a>, BodyError>;

impl<'de> Visitor<'de> for TopLevel {
    type Value = VisitResult<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut fields = Fields {
            model: None,
            stream: None,
        };
        let mut duplicate = false;
        while let Some(key) = map.next_key_seed(KeySeed)? {
            match &*key {
                "model" => {
                    let value: &'de RawValue = map.next_value()?;
                    duplicate |= fields.model.replace(value).is_some();
                }
                "stream" => {
                    let value: &'de RawValue = map.next_value()?;
                    fields.stream = Some(value);
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        if duplicate {
            // Parsers disagree on duplicate keys (first wins, last wins);
            // routing on one value while the provider reads another would
            // bill one model and serve another, so refuse the request.
            return Ok(Err(BodyError::DuplicateModel));
        }
        Ok(Ok(fields))
    }
}

/// Deserializes a key borrowed when possible, owned when it had escapes.
struct KeySeed;

impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = Cow<'de, str>;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Cow<'de, str>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string key")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Cow::Borrowed(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Cow::Owned(v.to_owned()))
            }
        }
        d.deserialize_str(KeyVisitor)
    }
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
    fn header_injection_in_model_is_refused() {
        let err = summarize(br#"{"model":"gpt\r\nx-ai-eg-backend: evil"}"#).unwrap_err();
        assert!(matches!(err, BodyError::InvalidModel(_)));
        assert!(err.is_model_error());
        let err = summarize(br#"{"model":"a\u0000b"}"#).unwrap_err();
        assert!(matches!(err, BodyError::InvalidModel(_)));
    }

    #[test]
    fn deep_nesting_is_skipped_without_recursion() {
        // serde_json skips ignored values with an explicit stack, so deep
        // nesting outside `model` is valid JSON that routes, and cannot
        // overflow ours.
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
