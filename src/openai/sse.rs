//! An incremental Server-Sent Events parser.
//!
//! Network chunks do not align with events: an event, a line, even a `\r\n`
//! pair may be split anywhere. The parser keeps only the unfinished line and
//! the data of the unfinished event between chunks, and hands each complete
//! event's `data` to the caller. Only `data:` fields matter to the gateway;
//! `event:`, `id:`, `retry:` and comments are skipped.
//!
//! Memory is bounded: an event whose data grows past [`MAX_EVENT_BYTES`] is
//! dropped (counted in [`SseParser::dropped`]) rather than buffered forever.

/// Largest event data kept; LLM stream events are a few hundred bytes.
pub const MAX_EVENT_BYTES: usize = 1024 * 1024;

#[derive(Debug, Default)]
pub struct SseParser {
    /// An unfinished line carried over from the previous chunk.
    line: Vec<u8>,
    /// The data of the event being read (lines joined by `\n`).
    data: Vec<u8>,
    has_data: bool,
    /// The previous chunk ended on `\r`: a leading `\n` completes that CRLF.
    after_cr: bool,
    /// The current event outgrew the limit; skip it to its end.
    overflow: bool,
    dropped: u64,
}

impl SseParser {
    pub fn new() -> Self {
        Self::default()
    }

    /// Events dropped for exceeding [`MAX_EVENT_BYTES`].
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Feeds a chunk; `on_event` gets the data of each event it completes.
    pub fn push(&mut self, mut chunk: &[u8], on_event: &mut impl FnMut(&[u8])) {
        if self.after_cr {
            self.after_cr = false;
            if let Some(rest) = chunk.strip_prefix(b"\n") {
                chunk = rest;
            }
        }
        // memchr: a vectorised scan; byte by byte, finding line ends was a
        // fifth of reading a stream's events (bench/RESULTS.md entry 45).
        while let Some(end) = memchr::memchr2(b'\n', b'\r', chunk) {
            let terminator_len = match (chunk[end], chunk.get(end + 1)) {
                (b'\r', Some(b'\n')) => 2,
                (b'\r', None) => {
                    self.after_cr = true;
                    1
                }
                _ => 1,
            };
            if self.line.is_empty() {
                self.line_done(&chunk[..end], on_event);
            } else {
                let mut line = std::mem::take(&mut self.line);
                line.extend_from_slice(&chunk[..end]);
                self.line_done(&line, on_event);
                line.clear();
                self.line = line;
            }
            chunk = &chunk[end + terminator_len..];
        }
        if self.line.len() + chunk.len() <= MAX_EVENT_BYTES {
            self.line.extend_from_slice(chunk);
        } else {
            self.overflow = true;
            self.line.clear();
        }
    }

    fn line_done(&mut self, line: &[u8], on_event: &mut impl FnMut(&[u8])) {
        if line.is_empty() {
            // A blank line ends the event.
            if self.overflow {
                self.dropped += 1;
            } else if self.has_data {
                on_event(&self.data);
            }
            self.data.clear();
            self.has_data = false;
            self.overflow = false;
            return;
        }
        let Some(value) = line.strip_prefix(b"data") else {
            return; // another field or a comment
        };
        let value = match value {
            [] => value,
            [b':', b' ', rest @ ..] | [b':', rest @ ..] => rest,
            _ => return, // a field whose name only starts with "data"
        };
        if self.overflow || self.data.len() + value.len() + 1 > MAX_EVENT_BYTES {
            self.overflow = true;
            self.data.clear();
            return;
        }
        if self.has_data {
            self.data.push(b'\n');
        }
        self.data.extend_from_slice(value);
        self.has_data = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(chunks: &[&[u8]]) -> Vec<String> {
        let mut p = SseParser::new();
        let mut out = Vec::new();
        for c in chunks {
            p.push(c, &mut |d| {
                out.push(String::from_utf8_lossy(d).into_owned())
            });
        }
        out
    }

    const STREAM: &[u8] =
        b"data: {\"a\":1}\n\nevent: ping\n: comment\n\ndata: line1\ndata:line2\n\ndata: [DONE]\n\n";

    #[test]
    fn whole_stream() {
        assert_eq!(events(&[STREAM]), ["{\"a\":1}", "line1\nline2", "[DONE]"]);
    }

    #[test]
    fn every_split_point_gives_the_same_events() {
        let expected = events(&[STREAM]);
        for i in 0..=STREAM.len() {
            for j in i..=STREAM.len() {
                let got = events(&[&STREAM[..i], &STREAM[i..j], &STREAM[j..]]);
                assert_eq!(got, expected, "split at {i},{j}");
            }
        }
    }

    #[test]
    fn crlf_and_cr_line_endings() {
        let crlf = b"data: x\r\n\r\ndata: y\r\r";
        assert_eq!(events(&[crlf]), ["x", "y"]);
        // CRLF split between chunks is one line end, not two.
        assert_eq!(events(&[b"data: x\r", b"\n\r\n"]), ["x"]);
    }

    #[test]
    fn oversized_event_is_dropped_and_parsing_recovers() {
        let mut p = SseParser::new();
        let mut out = Vec::new();
        let big = vec![b'x'; MAX_EVENT_BYTES + 10];
        p.push(b"data: ", &mut |d| out.push(d.to_vec()));
        for piece in big.chunks(4096) {
            p.push(piece, &mut |d| out.push(d.to_vec()));
        }
        p.push(b"\n\ndata: ok\n\n", &mut |d| out.push(d.to_vec()));
        assert_eq!(out, [b"ok".to_vec()]);
        assert_eq!(p.dropped(), 1);
    }

    #[test]
    fn unterminated_event_is_not_emitted() {
        assert!(events(&[b"data: partial"]).is_empty());
        assert!(events(&[b"datax: y\n\n"]).is_empty());
    }
}
