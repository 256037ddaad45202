//! Reads a provider's response body as it streams past the gateway, to
//! learn the response model and token usage, without ever holding it back.
//!
//! Compressed bodies (`gzip`, `deflate`) are decoded incrementally: each byte
//! is decoded once, as its chunk passes. `text/event-stream` bodies are split
//! into events across chunk boundaries; an event that may report usage is
//! read as it passes, and the model is read once, at the end (see
//! [`Events`]). Other bodies are JSON, kept whole up to [`FULL_JSON_BYTES`]
//! and beyond that as a head and a tail window (usage comes last), so
//! memory stays bounded.

use std::io::Write;

use flate2::write::{GzDecoder, ZlibDecoder};

use super::sse::SseParser;
use super::usage::{may_name_model, may_report_usage, observe, observe_window, Observed, UsageGap};

/// JSON bodies up to this size are parsed whole.
pub const FULL_JSON_BYTES: usize = 4 * 1024 * 1024;
const HEAD_BYTES: usize = 16 * 1024;
const TAIL_BYTES: usize = 64 * 1024;
/// The largest stream event kept unread for its model (see [`Events`]);
/// a larger one is read as it passes. Chat events are a few hundred bytes.
const KEPT_EVENT_BYTES: usize = 4 * 1024;

/// Per-response reading state.
pub struct ResponseReader {
    decoder: Decoder,
    body: Body,
    observed: Observed,
    unreadable: Option<UsageGap>,
}

enum Decoder {
    Identity,
    Gzip(GzDecoder<Vec<u8>>),
    Deflate(ZlibDecoder<Vec<u8>>),
    Unsupported,
}

enum Body {
    Events(Events),
    Json(JsonWindow),
}

/// An event stream as it is read.
///
/// Every event names the model, but the stream's first chunk is what a
/// client waits for, and parsing the first event's JSON as it passed
/// cost the first byte 14 to 24 µs here (bench/RESULTS.md entry 51: cold
/// code, on a machine the processor shares with Envoy). So the first event
/// that mentions `"model"` is kept unread, and read at the end only if
/// no event read for usage named a model (OpenAI's last event, with the
/// usage, names it too). Events that may report usage are read as they
/// pass, as before.
#[derive(Default)]
struct Events {
    parser: SseParser,
    /// The first event that mentions `"model"`, unread.
    kept: Option<Vec<u8>>,
    /// An event mentioning `"model"` was seen (kept, or read at once).
    model_seen: bool,
}

impl ResponseReader {
    /// A reader for a response with these `content-type` and
    /// `content-encoding` header values.
    pub fn new(content_type: Option<&[u8]>, content_encoding: Option<&[u8]>) -> Self {
        let is_sse = content_type.is_some_and(|ct| {
            ct.len() >= 17 && ct[..17].eq_ignore_ascii_case(b"text/event-stream")
        });
        let decoder = match content_encoding.map(<[u8]>::trim_ascii) {
            None | Some(b"") | Some(b"identity") => Decoder::Identity,
            Some(e) if e.eq_ignore_ascii_case(b"gzip") || e.eq_ignore_ascii_case(b"x-gzip") => {
                Decoder::Gzip(GzDecoder::new(Vec::new()))
            }
            Some(e) if e.eq_ignore_ascii_case(b"deflate") => {
                Decoder::Deflate(ZlibDecoder::new(Vec::new()))
            }
            Some(_) => Decoder::Unsupported,
        };
        let unreadable = matches!(decoder, Decoder::Unsupported).then_some(UsageGap::Encoding);
        Self {
            decoder,
            body: if is_sse {
                Body::Events(Events::default())
            } else {
                Body::Json(JsonWindow::default())
            },
            observed: Observed::default(),
            unreadable,
        }
    }

    pub fn is_event_stream(&self) -> bool {
        matches!(self.body, Body::Events(_))
    }

    /// Reads one chunk of the body as it was on the wire.
    pub fn push(&mut self, chunk: &[u8]) {
        if self.unreadable.is_some() || chunk.is_empty() {
            return;
        }
        let decoded = match &mut self.decoder {
            Decoder::Identity => {
                Self::consume(&mut self.body, &mut self.observed, chunk);
                return;
            }
            Decoder::Gzip(d) => d.write_all(chunk).map(|()| std::mem::take(d.get_mut())),
            Decoder::Deflate(d) => d.write_all(chunk).map(|()| std::mem::take(d.get_mut())),
            Decoder::Unsupported => return,
        };
        match decoded {
            Ok(plain) => Self::consume(&mut self.body, &mut self.observed, &plain),
            Err(_) => self.unreadable = Some(UsageGap::Corrupt),
        }
    }

    /// Ends the body and tells what it said.
    pub fn finish(mut self) -> Result<Observed, UsageGap> {
        let rest = match &mut self.decoder {
            Decoder::Gzip(d) => Some(d.try_finish().map(|()| std::mem::take(d.get_mut()))),
            Decoder::Deflate(d) => Some(d.try_finish().map(|()| std::mem::take(d.get_mut()))),
            Decoder::Identity | Decoder::Unsupported => None,
        };
        if let Some(e) = self.unreadable {
            return Err(e);
        }
        match rest {
            Some(Ok(plain)) => Self::consume(&mut self.body, &mut self.observed, &plain),
            Some(Err(_)) => return Err(UsageGap::Corrupt),
            None => {}
        }
        match self.body {
            Body::Json(window) => self.observed.merge(window.observe()),
            Body::Events(Events {
                kept: Some(event), ..
            }) if self.observed.model.is_none() => {
                // Kept only if the filter found no usage in it: this
                // read can add the model and nothing else.
                self.observed.merge(observe(&event));
            }
            Body::Events(_) => {}
        }
        Ok(self.observed)
    }

    fn consume(body: &mut Body, observed: &mut Observed, plain: &[u8]) {
        match body {
            Body::Events(Events {
                parser,
                kept,
                model_seen,
            }) => parser.push(plain, &mut |data| {
                if may_report_usage(data) {
                    observed.merge(observe(data));
                } else if !*model_seen && may_name_model(data) {
                    *model_seen = true;
                    if data.len() <= KEPT_EVENT_BYTES {
                        *kept = Some(data.to_vec());
                    } else {
                        observed.merge(observe(data));
                    }
                }
            }),
            Body::Json(window) => window.push(plain),
        }
    }
}

/// A JSON body: whole while small, else its head and a sliding tail.
#[derive(Default)]
struct JsonWindow {
    head: Vec<u8>,
    tail: Vec<u8>,
    windowed: bool,
}

impl JsonWindow {
    fn push(&mut self, plain: &[u8]) {
        if !self.windowed && self.head.len() + plain.len() <= FULL_JSON_BYTES {
            self.head.extend_from_slice(plain);
            return;
        }
        if !self.windowed {
            self.windowed = true;
            self.tail = self.head.split_off(HEAD_BYTES.min(self.head.len()));
            self.head.shrink_to_fit();
        }
        self.tail.extend_from_slice(plain);
        // Trim in steps, not per chunk, so each byte is moved a bounded
        // number of times.
        if self.tail.len() > 2 * TAIL_BYTES {
            self.tail.drain(..self.tail.len() - TAIL_BYTES);
        }
    }

    fn observe(self) -> Observed {
        if self.windowed {
            observe_window(&self.head, &self.tail)
        } else {
            observe(&self.head)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::write::GzEncoder;
    use flate2::Compression;

    const SSE: &str = concat!(
        "data: {\"model\":\"gpt-4o-mini-2024-07-18\",\"choices\":[{\"delta\":{\"content\":\"Hi\"}}],\"usage\":null}\n\n",
        "data: {\"model\":\"gpt-4o-mini-2024-07-18\",\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":4,\"total_tokens\":13,",
        "\"prompt_tokens_details\":{\"cached_tokens\":2},\"completion_tokens_details\":{\"reasoning_tokens\":1}}}\n\n",
        "data: [DONE]\n\n"
    );

    fn read(reader: &mut ResponseReader, body: &[u8], piece: usize) {
        for chunk in body.chunks(piece) {
            reader.push(chunk);
        }
    }

    #[test]
    fn sse_usage_from_last_chunk_whatever_the_chunking() {
        for piece in [1, 7, 64, SSE.len()] {
            let mut r = ResponseReader::new(Some(b"text/event-stream; charset=utf-8"), None);
            assert!(r.is_event_stream());
            read(&mut r, SSE.as_bytes(), piece);
            let o = r.finish().unwrap();
            assert_eq!(o.model.as_deref(), Some("gpt-4o-mini-2024-07-18"));
            assert_eq!(
                (o.usage.input, o.usage.output, o.usage.total),
                (Some(9), Some(4), Some(13))
            );
            assert_eq!(
                (o.usage.cached_input, o.usage.reasoning),
                (Some(2), Some(1))
            );
        }
    }

    fn events(events: &[&str]) -> String {
        events.iter().map(|e| format!("data: {e}\n\n")).collect()
    }

    fn stream_model(body: &str, piece: usize) -> Option<String> {
        let mut r = ResponseReader::new(Some(b"text/event-stream"), None);
        read(&mut r, body.as_bytes(), piece);
        r.finish().unwrap().model
    }

    #[test]
    fn stream_model_without_usage_is_read_at_the_end() {
        let body = events(&[
            r#"{"type":"ping"}"#,
            r#"{"model":"first","choices":[{"delta":{"content":"a"}}]}"#,
            r#"{"model":"second","choices":[{"delta":{"content":"b"}}]}"#,
            "[DONE]",
        ]);
        for piece in [1, 5, body.len()] {
            // The first event that names a model, whatever the chunking.
            assert_eq!(stream_model(&body, piece).as_deref(), Some("first"));
        }
        // Kept unread until the end, not read as it passed.
        let mut r = ResponseReader::new(Some(b"text/event-stream"), None);
        r.push(body.as_bytes());
        assert_eq!(r.observed.model, None);
        assert!(matches!(&r.body, Body::Events(e) if e.kept.is_some()));
    }

    #[test]
    fn stream_model_from_an_event_read_for_usage_comes_first() {
        let body = events(&[
            r#"{"model":"first","choices":[],"usage":null}"#,
            r#"{"model":"last","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1}}"#,
        ]);
        assert_eq!(stream_model(&body, body.len()).as_deref(), Some("last"));
        // Anthropic: the model comes with the input count, first.
        let body = events(&[
            r#"{"type":"message_start","message":{"model":"claude","usage":{"input_tokens":5}}}"#,
            r#"{"type":"message_delta","usage":{"output_tokens":2}}"#,
        ]);
        assert_eq!(stream_model(&body, 3).as_deref(), Some("claude"));
    }

    #[test]
    fn a_large_first_event_is_read_as_it_passes() {
        let content = "x".repeat(KEPT_EVENT_BYTES);
        let event = format!(r#"{{"model":"m","choices":[{{"delta":{{"content":"{content}"}}}}]}}"#);
        let mut r = ResponseReader::new(Some(b"text/event-stream"), None);
        r.push(events(&[&event]).as_bytes());
        assert_eq!(r.observed.model.as_deref(), Some("m"));
        assert!(matches!(&r.body, Body::Events(e) if e.kept.is_none()));
        assert_eq!(r.finish().unwrap().model.as_deref(), Some("m"));
    }

    #[test]
    fn a_token_spelling_model_is_not_taken_for_the_model() {
        let body = events(&[
            r#"{"choices":[{"delta":{"content":"model"}}]}"#,
            r#"{"model":"m","choices":[{"delta":{"content":"b"}}]}"#,
            "[DONE]",
        ]);
        assert_eq!(stream_model(&body, body.len()).as_deref(), Some("m"));
    }

    #[test]
    fn stream_without_a_model_has_none() {
        let body = events(&[r#"{"choices":[{"delta":{"content":"the \"model\" said"}}]}"#]);
        assert_eq!(stream_model(&body, body.len()), None);
    }

    #[test]
    fn gzip_is_decoded_incrementally() {
        let mut enc = GzEncoder::new(Vec::new(), Compression::default());
        enc.write_all(SSE.as_bytes()).unwrap();
        let gz = enc.finish().unwrap();
        let mut r = ResponseReader::new(Some(b"text/event-stream"), Some(b"gzip"));
        read(&mut r, &gz, 5);
        assert_eq!(r.finish().unwrap().usage.total, Some(13));
    }

    #[test]
    fn json_small_and_large() {
        let small = br#"{"model":"m","usage":{"prompt_tokens":3,"completion_tokens":2}}"#;
        let mut r = ResponseReader::new(Some(b"application/json"), None);
        read(&mut r, small, 10);
        let o = r.finish().unwrap();
        assert_eq!((o.model.as_deref(), o.usage.total()), (Some("m"), Some(5)));

        let mut big = br#"{"object":"list","data":[{"embedding":["#.to_vec();
        while big.len() < FULL_JSON_BYTES + 100_000 {
            big.extend_from_slice(b"0.0123,");
        }
        big.extend_from_slice(
            br#"0.1]}],"model":"emb","usage":{"prompt_tokens":11,"total_tokens":11}}"#,
        );
        let mut r = ResponseReader::new(Some(b"application/json"), None);
        read(&mut r, &big, 16 * 1024);
        let o = r.finish().unwrap();
        assert_eq!((o.model.as_deref(), o.usage.input), (Some("emb"), Some(11)));
    }

    #[test]
    fn unsupported_or_corrupt_encoding_is_reported() {
        let mut r = ResponseReader::new(Some(b"application/json"), Some(b"br"));
        r.push(b"\x1b\x00");
        assert_eq!(r.finish().unwrap_err(), UsageGap::Encoding);
        let mut r = ResponseReader::new(Some(b"application/json"), Some(b"gzip"));
        r.push(b"this is not gzip at all");
        assert_eq!(r.finish().unwrap_err(), UsageGap::Corrupt);
    }
}
