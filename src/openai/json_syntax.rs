//! JSON syntax without a tree: where a value ends, checked as strictly as
//! serde_json checks a value it skips.
//!
//! Why not serde_json's own skip: a request body is mostly one or two huge
//! strings (a coding agent's context is source code), and serde_json leaves
//! its 8-byte string loop and comes back at every escape, one every 26 bytes
//! or so in source code. Strings are scanned a 64-byte block at a time
//! instead (`json_string`; `bench/RESULTS.md` entries 56 to 59). SIMD JSON
//! crates were measured too: sonic-rs recurses once per nesting level and
//! aborts the process on a 20 KB body; simd-json needs a mutable copy of the
//! body.
//!
//! What is accepted is what serde_json accepts when it skips a value
//! (`IgnoredAny`): strings without raw control bytes and with valid escapes
//! (`\u` takes four hex digits; surrogates are not paired, as serde_json
//! does not pair them in skipped strings), JSON numbers, `true`, `false`,
//! `null`, and arrays and objects nested to any depth. Nesting is tracked
//! with a bit per level on the heap, never by recursion. Strings' contents
//! must be UTF-8 (`json_string` checks them); everywhere else the grammar
//! allows ASCII only, so a text accepted here is valid UTF-8.
//! The `request_body` fuzz target checks acceptance against serde_json.

use std::fmt;
use std::ops::Range;

use super::json_string::string_end;

/// Where and why a text is not JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntaxError {
    pub what: &'static str,
    /// Byte offset of the offending byte (the text's length at its end).
    pub at: usize,
}

impl SyntaxError {
    pub(super) fn new(what: &'static str, at: usize) -> Self {
        Self { what, at }
    }
}

impl fmt::Display for SyntaxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at byte {}", self.what, self.at)
    }
}

/// Why a text is not one JSON object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ObjectError {
    /// It is JSON, but not an object. An array is counted so as soon as
    /// its `[` is seen, as serde_json refuses it before reading it.
    NotObject,
    Syntax(SyntaxError),
}

impl From<SyntaxError> for ObjectError {
    fn from(e: SyntaxError) -> Self {
        Self::Syntax(e)
    }
}

/// Walks the object that is the whole of `text` (whitespace around it
/// aside), handing `each` every member's key (quotes included) and value
/// as byte ranges, in order. A syntax error anywhere ends the walk, also
/// after `each` has seen earlier members.
pub fn for_each_member(
    text: &[u8],
    mut each: impl FnMut(Range<usize>, Range<usize>) -> Result<(), SyntaxError>,
) -> Result<(), ObjectError> {
    let mut at = skip_whitespace(text, 0);
    match text.get(at) {
        Some(b'{') => {}
        Some(b'[') => return Err(ObjectError::NotObject),
        _ => {
            value_end(text, at)?;
            return Err(ObjectError::NotObject);
        }
    }
    at = skip_whitespace(text, at + 1);
    if text.get(at) == Some(&b'}') {
        at += 1;
    } else {
        loop {
            let (key, start) = member(text, at)?;
            let end = value_end(text, start)?;
            each(key, start..end)?;
            at = skip_whitespace(text, end);
            match text.get(at) {
                Some(b',') => at = skip_whitespace(text, at + 1),
                Some(b'}') => {
                    at += 1;
                    break;
                }
                Some(_) => return Err(SyntaxError::new("expected `,` or `}`", at).into()),
                None => return Err(SyntaxError::new("unexpected end", at).into()),
            }
        }
    }
    let end = skip_whitespace(text, at);
    if end != text.len() {
        return Err(SyntaxError::new("trailing characters", end).into());
    }
    Ok(())
}

/// The index of the first byte at or after `at` that is not JSON
/// whitespace.
pub fn skip_whitespace(text: &[u8], mut at: usize) -> usize {
    while let Some(b' ' | b'\n' | b'\r' | b'\t') = text.get(at) {
        at += 1;
    }
    at
}

/// Where the value that starts at `at` ends (the index after it).
pub fn value_end(text: &[u8], mut at: usize) -> Result<usize, SyntaxError> {
    let mut open = Nesting::default();
    loop {
        // A value starts at `at`.
        match text.get(at) {
            Some(b'"') => at = string_end(text, at + 1)?,
            Some(b'-' | b'0'..=b'9') => at = number_end(text, at)?,
            Some(b't') => at = literal_end(text, at, b"true")?,
            Some(b'f') => at = literal_end(text, at, b"false")?,
            Some(b'n') => at = literal_end(text, at, b"null")?,
            Some(b'[') => {
                at = skip_whitespace(text, at + 1);
                if text.get(at) == Some(&b']') {
                    at += 1;
                } else {
                    open.push(Container::Array);
                    continue;
                }
            }
            Some(b'{') => {
                at = skip_whitespace(text, at + 1);
                if text.get(at) == Some(&b'}') {
                    at += 1;
                } else {
                    open.push(Container::Object);
                    at = member(text, at)?.1;
                    continue;
                }
            }
            Some(_) => return Err(SyntaxError::new("expected a value", at)),
            None => return Err(SyntaxError::new("unexpected end", at)),
        }
        // A value ended at `at`: close what it ends, or go to the next one.
        loop {
            let Some(container) = open.innermost() else {
                return Ok(at);
            };
            at = skip_whitespace(text, at);
            match (text.get(at), container) {
                (Some(b','), Container::Array) => {
                    at = skip_whitespace(text, at + 1);
                    break;
                }
                (Some(b','), Container::Object) => {
                    at = member(text, skip_whitespace(text, at + 1))?.1;
                    break;
                }
                (Some(b']'), Container::Array) | (Some(b'}'), Container::Object) => {
                    open.pop();
                    at += 1;
                }
                (Some(_), Container::Array) => {
                    return Err(SyntaxError::new("expected `,` or `]`", at))
                }
                (Some(_), Container::Object) => {
                    return Err(SyntaxError::new("expected `,` or `}`", at))
                }
                (None, _) => return Err(SyntaxError::new("unexpected end", at)),
            }
        }
    }
}

/// Reads an object member's `"key":` starting at `at`; returns the key
/// (quotes included) and where its value starts.
fn member(text: &[u8], at: usize) -> Result<(Range<usize>, usize), SyntaxError> {
    if text.get(at) != Some(&b'"') {
        return Err(SyntaxError::new("expected a string key", at));
    }
    let key_end = string_end(text, at + 1)?;
    let colon = skip_whitespace(text, key_end);
    if text.get(colon) != Some(&b':') {
        return Err(SyntaxError::new("expected `:`", colon));
    }
    Ok((at..key_end, skip_whitespace(text, colon + 1)))
}

/// Where the number that starts at `at` ends, by JSON's grammar:
/// `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`.
fn number_end(text: &[u8], mut at: usize) -> Result<usize, SyntaxError> {
    let invalid = |at| SyntaxError::new("invalid number", at);
    if text.get(at) == Some(&b'-') {
        at += 1;
    }
    match text.get(at) {
        Some(b'0') => {
            at += 1;
            if text.get(at).is_some_and(u8::is_ascii_digit) {
                return Err(invalid(at));
            }
        }
        Some(b'1'..=b'9') => at = digits_end(text, at),
        _ => return Err(invalid(at)),
    }
    if text.get(at) == Some(&b'.') {
        let end = digits_end(text, at + 1);
        if end == at + 1 {
            return Err(invalid(end));
        }
        at = end;
    }
    if let Some(b'e' | b'E') = text.get(at) {
        at += 1;
        if let Some(b'+' | b'-') = text.get(at) {
            at += 1;
        }
        let end = digits_end(text, at);
        if end == at {
            return Err(invalid(end));
        }
        at = end;
    }
    Ok(at)
}

fn digits_end(text: &[u8], mut at: usize) -> usize {
    while text.get(at).is_some_and(u8::is_ascii_digit) {
        at += 1;
    }
    at
}

fn literal_end(text: &[u8], at: usize, literal: &[u8]) -> Result<usize, SyntaxError> {
    match text.get(at..at + literal.len()) {
        Some(found) if found == literal => Ok(at + literal.len()),
        _ => Err(SyntaxError::new("invalid literal", at)),
    }
}

#[derive(Clone, Copy)]
enum Container {
    Array,
    Object,
}

/// The open containers, innermost last: one bit each, so a body that is
/// nothing but `[` needs an eighth of its size, and one up to 64 deep
/// (every real request) no allocation at all.
#[derive(Default)]
struct Nesting {
    /// Depths 0 to 63.
    first: u64,
    /// Depths from 64 on, 64 a word.
    deeper: Vec<u64>,
    depth: usize,
}

impl Nesting {
    fn word(&mut self, depth: usize) -> &mut u64 {
        match (depth / 64).checked_sub(1) {
            None => &mut self.first,
            Some(i) => {
                if i == self.deeper.len() {
                    self.deeper.push(0);
                }
                &mut self.deeper[i]
            }
        }
    }

    fn push(&mut self, container: Container) {
        let bit = 1 << (self.depth % 64);
        let word = self.word(self.depth);
        match container {
            Container::Object => *word |= bit,
            Container::Array => *word &= !bit,
        }
        self.depth += 1;
    }

    fn innermost(&self) -> Option<Container> {
        let top = self.depth.checked_sub(1)?;
        let word = match (top / 64).checked_sub(1) {
            None => self.first,
            Some(i) => self.deeper[i],
        };
        Some(if word >> (top % 64) & 1 == 1 {
            Container::Object
        } else {
            Container::Array
        })
    }

    fn pop(&mut self) {
        self.depth = self.depth.saturating_sub(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::de::IgnoredAny;

    /// Table: each text, as a whole value, and whether serde_json skips it.
    #[test]
    fn accepts_what_serde_json_skips() {
        let long = "x".repeat(200);
        let cases: Vec<String> = vec![
            r#""""#.into(),
            r#""a\"b\\c\/d\b\f\n\r\t\u00e9\uD83D\ude00""#.into(),
            r#""\ud800""#.into(),
            r#""\u12""#.into(),
            r#""\u12g4""#.into(),
            r#""\x""#.into(),
            "\"a\u{1}b\"".into(),
            "\"a\u{7f}b\"".into(),
            "\"é\u{1F600}\"".into(),
            format!(r#""{long}\n{long}\"{long}""#),
            format!("\"{long}\u{1f}\""),
            format!("\"{long}"),
            format!("\"{long}\\"),
            format!("\"{}\\u00", "y".repeat(61)),
            "0".into(),
            "-0".into(),
            "01".into(),
            "-".into(),
            "1.".into(),
            "1.5e".into(),
            "1.5e+7".into(),
            "1E-0".into(),
            "-12.50e999".into(),
            ".5".into(),
            "+1".into(),
            "true".into(),
            "tru".into(),
            "nul".into(),
            "false".into(),
            "[]".into(),
            "[ ]".into(),
            "[1,]".into(),
            "[,1]".into(),
            "[1 2]".into(),
            "[1,[2,{\"a\":[3]}],{}]".into(),
            "{}".into(),
            "{ \"a\" : 1 , \"b\" : [ ] }".into(),
            "{\"a\":1,}".into(),
            "{\"a\" 1}".into(),
            "{1:2}".into(),
            "{\"a\":1]".into(),
            "[1}".into(),
            "[".into(),
            "{\"a\":".into(),
            "\u{a0}1".into(),
        ];
        for text in &cases {
            let serde_json_skips = serde_json::from_str::<IgnoredAny>(text).is_ok();
            let ours =
                value_end(text.as_bytes(), 0).map(|end| skip_whitespace(text.as_bytes(), end));
            assert_eq!(
                ours.is_ok() && ours == Ok(text.len()),
                serde_json_skips,
                "{text:?}: {ours:?}"
            );
        }
    }

    #[test]
    fn ends_where_the_value_ends() {
        assert_eq!(value_end(br#""ab" ,"#, 0), Ok(4));
        assert_eq!(value_end(b"12,", 0), Ok(2));
        assert_eq!(value_end(b"[1, {\"a\": null}] x", 0), Ok(16));
        assert_eq!(value_end(b"true}", 0), Ok(4));
    }

    #[test]
    fn deep_nesting_needs_no_stack() {
        let depth = 1_000_000;
        let text = format!("{}{}", "[{\"a\":".repeat(depth), "}]".repeat(depth));
        // Each level is `[{"a":` and `}]`: an array holding an object.
        let mut closed = text.into_bytes();
        closed.splice(depth * 6..depth * 6, *b"1");
        assert_eq!(value_end(&closed, 0), Ok(closed.len()));
        assert!(value_end(&closed[..closed.len() - 1], 0).is_err());
    }

    /// Around each word of the nesting record (64 levels), a closer must
    /// still match its opener: every level is checked, not just the first
    /// word's.
    #[test]
    fn closers_match_openers_across_words() {
        for depth in [1, 63, 64, 65, 127, 128, 129, 200] {
            // Level i is an object when i is odd: `[{"a":[{"a":...`.
            let open: String = (0..depth)
                .map(|i| if i % 2 == 1 { "{\"a\":" } else { "[" })
                .collect();
            let close = |wrong_at: Option<usize>| -> String {
                (0..depth)
                    .rev()
                    .map(|i| match (i % 2 == 1) != (Some(i) == wrong_at) {
                        true => "}",
                        false => "]",
                    })
                    .collect()
            };
            let text = format!("{open}1{}", close(None));
            assert_eq!(
                value_end(text.as_bytes(), 0),
                Ok(text.len()),
                "depth {depth}"
            );
            for wrong in [0, depth / 2, depth - 1] {
                let text = format!("{open}1{}", close(Some(wrong)));
                assert!(
                    value_end(text.as_bytes(), 0).is_err(),
                    "depth {depth}, wrong closer at level {wrong}"
                );
            }
        }
    }
}
