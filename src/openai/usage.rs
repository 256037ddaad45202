//! Token usage as providers report it, in the three shapes TARS serves:
//!
//! - OpenAI chat, completions, embeddings: `usage.prompt_tokens`,
//!   `completion_tokens`, `total_tokens`, `prompt_tokens_details.cached_tokens`,
//!   `completion_tokens_details.reasoning_tokens`; in a stream, on the last
//!   chunk (whose `choices` is empty) when `stream_options.include_usage`;
//! - OpenAI Responses: `usage.input_tokens`, `output_tokens`,
//!   `input_tokens_details.cached_tokens`, `output_tokens_details.reasoning_tokens`;
//!   in a stream, on the `response.completed` event's `response`;
//! - Anthropic Messages: `usage.input_tokens`, `output_tokens`,
//!   `cache_read_input_tokens`, `cache_creation_input_tokens`; in a stream,
//!   input on `message_start`'s `message` and the final output count on
//!   `message_delta`.
//!
//! Counted as the OpenTelemetry GenAI conventions say: input tokens include
//! every input token, cached or not (`gen_ai.usage.input_tokens`), with the
//! cache reads and writes as parts of it
//! (`gen_ai.usage.cache_read.input_tokens`,
//! `gen_ai.usage.cache_creation.input_tokens`). OpenAI's `prompt_tokens`
//! already include cached tokens; Anthropic reports the three apart, so
//! their sum is the input. Money depends on this (see `spend`).
//!
//! Only the fields named here are read; everything else is skipped.

use std::sync::LazyLock;

use memchr::memmem::Finder;
use serde::Deserialize;

/// Token counts of one exchange; `None` where the provider said nothing.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TokenUsage {
    pub input: Option<u64>,
    pub output: Option<u64>,
    pub total: Option<u64>,
    /// Input tokens served from the provider's prompt cache (part of
    /// `input`).
    pub cached_input: Option<u64>,
    /// Input tokens written to the provider's prompt cache (part of
    /// `input`; Anthropic's `cache_creation_input_tokens`).
    pub cache_write: Option<u64>,
    pub reasoning: Option<u64>,
}

impl TokenUsage {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// Total as reported, else input + output.
    pub fn total(&self) -> Option<u64> {
        self.total.or(match (self.input, self.output) {
            (Some(i), Some(o)) => Some(i + o),
            _ => None,
        })
    }

    /// Takes every count `later` has: a later event knows more (Anthropic
    /// sends input first and the final output count last).
    fn merge(&mut self, later: TokenUsage) {
        self.input = later.input.or(self.input);
        self.output = later.output.or(self.output);
        self.total = later.total.or(self.total);
        self.cached_input = later.cached_input.or(self.cached_input);
        self.cache_write = later.cache_write.or(self.cache_write);
        self.reasoning = later.reasoning.or(self.reasoning);
    }
}

/// Why a successful response has no usage to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsageGap {
    /// The provider did not report it (e.g. a stream without
    /// `stream_options.include_usage`).
    NotReported,
    /// A `content-encoding` the gateway does not decode (e.g. `br`).
    Encoding,
    /// The compressed body was corrupt.
    Corrupt,
}

impl UsageGap {
    pub fn label(self) -> &'static str {
        match self {
            Self::NotReported => "not_reported",
            Self::Encoding => "encoding",
            Self::Corrupt => "corrupt",
        }
    }
}

/// What one response body, or one stream event, tells.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Observed {
    pub model: Option<String>,
    pub usage: TokenUsage,
}

impl Observed {
    /// Folds in what a later event says.
    pub fn merge(&mut self, later: Observed) {
        if self.model.is_none() {
            self.model = later.model;
        }
        self.usage.merge(later.usage);
    }
}

#[derive(Deserialize)]
struct Envelope {
    model: Option<String>,
    usage: Option<Usage>,
    /// Anthropic `message_start`.
    message: Option<Inner>,
    /// OpenAI Responses stream events.
    response: Option<Inner>,
}

#[derive(Deserialize)]
struct Inner {
    model: Option<String>,
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct Usage {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    total_tokens: Option<u64>,
    prompt_tokens_details: Option<Details>,
    input_tokens_details: Option<Details>,
    completion_tokens_details: Option<Details>,
    output_tokens_details: Option<Details>,
    cache_read_input_tokens: Option<u64>,
    cache_creation_input_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct Details {
    cached_tokens: Option<u64>,
    reasoning_tokens: Option<u64>,
}

impl From<Usage> for TokenUsage {
    fn from(u: Usage) -> Self {
        let cached = |d: &Option<Details>| d.as_ref().and_then(|d| d.cached_tokens);
        let reasoning = |d: &Option<Details>| d.as_ref().and_then(|d| d.reasoning_tokens);
        // Anthropic counts cache reads and writes apart from `input_tokens`.
        let anthropic_cache =
            u.cache_read_input_tokens.is_some() || u.cache_creation_input_tokens.is_some();
        let input = match (u.prompt_tokens, u.input_tokens) {
            (Some(p), _) => Some(p),
            (None, Some(i)) if anthropic_cache => Some(
                i.saturating_add(u.cache_read_input_tokens.unwrap_or(0))
                    .saturating_add(u.cache_creation_input_tokens.unwrap_or(0)),
            ),
            (None, i) => i,
        };
        TokenUsage {
            input,
            output: u.completion_tokens.or(u.output_tokens),
            total: u.total_tokens,
            cached_input: cached(&u.prompt_tokens_details)
                .or(cached(&u.input_tokens_details))
                .or(u.cache_read_input_tokens),
            cache_write: u.cache_creation_input_tokens,
            reasoning: reasoning(&u.completion_tokens_details)
                .or(reasoning(&u.output_tokens_details)),
        }
    }
}

/// Reads model and usage from one JSON document (a response body or an SSE
/// event's data). Not JSON, or not an object: nothing observed.
pub fn observe(json: &[u8]) -> Observed {
    let Ok(env) = serde_json::from_slice::<Envelope>(json) else {
        return Observed::default();
    };
    let mut seen = Observed {
        model: env.model,
        usage: env.usage.map(TokenUsage::from).unwrap_or_default(),
    };
    for inner in [env.message, env.response].into_iter().flatten() {
        seen.merge(Observed {
            model: inner.model,
            usage: inner.usage.map(TokenUsage::from).unwrap_or_default(),
        });
    }
    seen
}

/// Reads model and usage from a window of a JSON body too large to keep:
/// its `head` and its `tail`. Providers put `usage` last and `model` near
/// either end, so this finds them without the middle (embeddings vectors).
pub fn observe_window(head: &[u8], tail: &[u8]) -> Observed {
    let usage = memchr::memmem::rfind(tail, b"\"usage\"")
        .and_then(|at| value_after_key(&tail[at + b"\"usage\"".len()..]))
        .and_then(|v| {
            serde_json::Deserializer::from_slice(v)
                .into_iter::<Usage>()
                .next()?
                .ok()
        })
        .map(TokenUsage::from)
        .unwrap_or_default();
    let model = [head, tail].into_iter().find_map(|part| {
        let at = memchr::memmem::find(part, b"\"model\"")?;
        let v = value_after_key(&part[at + b"\"model\"".len()..])?;
        serde_json::Deserializer::from_slice(v)
            .into_iter::<String>()
            .next()?
            .ok()
    });
    Observed { model, usage }
}

/// Whether a stream event may report usage: some `"usage"` in it is a
/// key whose value is not `null`.
///
/// Why: OpenAI streams with `stream_options.include_usage` (and the
/// Responses API's events) carry `"usage": null` in every event but the
/// last, and parsing each of them for nothing was most of the CPU spent
/// reading a stream (bench/RESULTS.md entry 45). An event this turns down
/// has no usage [`observe`] would find: a `"usage"` key with a value
/// other than `null` is always let through, and a false alarm (the word
/// quoted inside a string) only costs a parse. A key
/// written with escapes (`"\u0075sage"`) is not seen, as it was not by
/// the plain search this refines.
pub fn may_report_usage(event: &[u8]) -> bool {
    const KEY: &[u8] = b"\"usage\"";
    // Built once: building the searcher cost more than running it on an
    // event of a few hundred bytes.
    static FINDER: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(KEY));
    FINDER.find_iter(event).any(|at| {
        value_after_key(&event[at + KEY.len()..]).is_some_and(|v| !v.starts_with(b"null"))
    })
}

/// Whether an event may name a model: some `"model"` in it is a key whose
/// value is a string. The word as a string value (a streamed token
/// `"model"`) is not a key, and taking it for one would make the stream's
/// reader keep that event instead of one that names the model. A key
/// written with escapes is not seen, as with [`may_report_usage`].
pub fn may_name_model(event: &[u8]) -> bool {
    const KEY: &[u8] = b"\"model\"";
    static FINDER: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(KEY));
    FINDER
        .find_iter(event)
        .any(|at| value_after_key(&event[at + KEY.len()..]).is_some_and(|v| v.starts_with(b"\"")))
}

/// The bytes after `: ` following a key, if what follows is a key's colon.
fn value_after_key(after_key: &[u8]) -> Option<&[u8]> {
    let rest = after_key.trim_ascii_start().strip_prefix(b":")?;
    Some(rest.trim_ascii_start())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openai_chat_with_details() {
        let o = observe(br#"{"id":"x","model":"gpt-4o-mini-2024-07-18","choices":[],"usage":{"prompt_tokens":100,"completion_tokens":20,"total_tokens":120,"prompt_tokens_details":{"cached_tokens":64},"completion_tokens_details":{"reasoning_tokens":8},"total_cost":0.0001}}"#);
        assert_eq!(o.model.as_deref(), Some("gpt-4o-mini-2024-07-18"));
        assert_eq!(
            o.usage,
            TokenUsage {
                input: Some(100),
                output: Some(20),
                total: Some(120),
                cached_input: Some(64),
                cache_write: None,
                reasoning: Some(8)
            }
        );
    }

    #[test]
    fn openai_stream_chunk_without_usage() {
        let o = observe(br#"{"model":"m","choices":[{"delta":{"content":"hi"}}],"usage":null}"#);
        assert!(o.usage.is_empty());
        assert_eq!(o.model.as_deref(), Some("m"));
    }

    #[test]
    fn embeddings() {
        let o = observe(br#"{"object":"list","data":[{"embedding":[0.1]}],"model":"e","usage":{"prompt_tokens":5,"total_tokens":5}}"#);
        assert_eq!(o.usage.input, Some(5));
        assert_eq!(o.usage.output, None);
        assert_eq!(o.usage.total(), Some(5));
    }

    #[test]
    fn responses_api_completed_event() {
        let o = observe(br#"{"type":"response.completed","response":{"model":"gpt-5","usage":{"input_tokens":30,"output_tokens":12,"total_tokens":42,"input_tokens_details":{"cached_tokens":10},"output_tokens_details":{"reasoning_tokens":4}}}}"#);
        assert_eq!(o.model.as_deref(), Some("gpt-5"));
        assert_eq!(
            o.usage,
            TokenUsage {
                input: Some(30),
                output: Some(12),
                total: Some(42),
                cached_input: Some(10),
                cache_write: None,
                reasoning: Some(4)
            }
        );
    }

    /// Anthropic reports cache reads and writes apart from `input_tokens`;
    /// the input counted is their sum, as the GenAI conventions say.
    #[test]
    fn anthropic_stream_merges_start_and_delta() {
        let mut o = observe(br#"{"type":"message_start","message":{"model":"claude-sonnet-4","usage":{"input_tokens":25,"output_tokens":1,"cache_read_input_tokens":20,"cache_creation_input_tokens":5}}}"#);
        o.merge(observe(
            br#"{"type":"content_block_delta","delta":{"text":"x"}}"#,
        ));
        o.merge(observe(br#"{"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":15}}"#));
        assert_eq!(o.model.as_deref(), Some("claude-sonnet-4"));
        assert_eq!(o.usage.input, Some(50));
        assert_eq!(o.usage.output, Some(15));
        assert_eq!(o.usage.cached_input, Some(20));
        assert_eq!(o.usage.cache_write, Some(5));
        assert_eq!(o.usage.total(), Some(65));
    }

    /// OpenAI's prompt tokens already include the cached ones.
    #[test]
    fn openai_cached_tokens_are_part_of_the_input() {
        let o = observe(br#"{"usage":{"prompt_tokens":100,"completion_tokens":5,"prompt_tokens_details":{"cached_tokens":80}}}"#);
        assert_eq!(
            (o.usage.input, o.usage.cached_input, o.usage.cache_write),
            (Some(100), Some(80), None)
        );
        let o = observe(br#"{"usage":{"input_tokens":30,"output_tokens":2,"input_tokens_details":{"cached_tokens":10}}}"#);
        assert_eq!((o.usage.input, o.usage.cached_input), (Some(30), Some(10)));
    }

    #[test]
    fn window_finds_usage_at_the_end_and_model_at_either_end() {
        let head = br#"{"object":"list","data":[{"embedding":[0.1,0.2"#;
        let tail = br#"0.3]}],"model":"text-embedding-3-small","usage":{"prompt_tokens":7,"total_tokens":7}}"#;
        let o = observe_window(head, tail);
        assert_eq!(o.model.as_deref(), Some("text-embedding-3-small"));
        assert_eq!(o.usage.input, Some(7));
        // A "model" that is a value, not a key, is not taken for one.
        let o = observe_window(
            br#"{"role":"model","x":1"#,
            br#""usage" : {"input_tokens":3}}"#,
        );
        assert_eq!(o.model, None);
        assert_eq!(o.usage.input, Some(3));
    }

    #[test]
    fn garbage_observes_nothing() {
        assert_eq!(observe(b"[DONE]"), Observed::default());
        assert_eq!(observe(b"[1,2]"), Observed::default());
        assert_eq!(
            observe(br#"{"usage":{"prompt_tokens":-1}}"#),
            Observed::default()
        );
    }

    /// The model filter says no only where `observe` finds no model.
    #[test]
    fn events_that_may_name_a_model() {
        for (event, may) in [
            (&br#"{"model":"m","choices":[]}"#[..], true),
            (br#"{"model" : "m"}"#, true),
            (br#"{"message":{"model":"claude"}}"#, true),
            (br#"{"type":"ping"}"#, false),
            (br#"{"content":"the \"model\" said"}"#, false),
            (br#"{"choices":[{"delta":{"content":"model"}}]}"#, false),
            (br#"{"model":null}"#, false),
            (b"", false),
        ] {
            assert_eq!(
                may_name_model(event),
                may,
                "{}",
                String::from_utf8_lossy(event)
            );
            if !may {
                assert_eq!(observe(event).model, None);
            }
        }
    }

    /// The filter says no only where `observe` finds no usage.
    #[test]
    fn events_without_usage_are_turned_down_and_no_other() {
        let cases: &[(&str, &[u8], bool)] = &[
            (
                "OpenAI chunk, include_usage",
                br#"{"model":"m","choices":[{"delta":{"content":"Hi"}}],"usage":null}"#,
                false,
            ),
            ("spaces around the colon", br#"{"usage" :  null}"#, false),
            ("no usage key", br#"{"model":"m","choices":[]}"#, false),
            (
                "usage as a string value",
                br#"{"choices":[{"delta":{"content":"usage"}}],"x":"usage"}"#,
                false,
            ),
            (
                "OpenAI last chunk",
                br#"{"model":"m","choices":[],"usage":{"prompt_tokens":9,"completion_tokens":4}}"#,
                true,
            ),
            (
                "a string value \"usage\" before the real key",
                br#"{"content":"usage","usage":{"prompt_tokens":1}}"#,
                true,
            ),
            (
                "null in one place, usage in another (Responses)",
                br#"{"usage":null,"response":{"usage":{"input_tokens":3}}}"#,
                true,
            ),
            (
                "Anthropic message_start",
                br#"{"type":"message_start","message":{"usage":{"input_tokens":3}}}"#,
                true,
            ),
            (
                "newline before the value",
                b"{\"usage\":\n{\"prompt_tokens\":2}}",
                true,
            ),
            ("truncated after the key", br#"{"usage""#, false),
        ];
        for (name, event, expected) in cases {
            assert_eq!(may_report_usage(event), *expected, "{name}");
            if !expected {
                assert!(
                    observe(event).usage.is_empty(),
                    "{name}: observe finds usage"
                );
            } else {
                assert!(
                    !observe(event).usage.is_empty(),
                    "{name}: observe finds none"
                );
            }
        }
    }
}
