//! The order of messages on an ext_proc stream. Envoy opens one stream per
//! HTTP request and sends, in this order: the request headers, the request
//! body (if the request has one), the response headers, the response body.
//!
//! Anything else is not Envoy following its protocol: a body before any
//! headers, a second request, a message after the processor answered the
//! request itself. Such a stream gets a gRPC error (Envoy fails the request
//! closed), never an answer: an answer to a body message can carry the
//! routing header and the provider key.

use std::fmt;

/// One kind of ext_proc message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Message {
    RequestHeaders,
    RequestBody,
    RequestTrailers,
    ResponseHeaders,
    ResponseBody,
    ResponseTrailers,
}

/// Where a stream stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Stage {
    /// Nothing yet: only request headers may come.
    #[default]
    Start,
    /// The request is under way; `body` says whether more body may come.
    Request { body: bool },
    /// The response is under way; `body` likewise.
    Response { body: bool },
    /// The processor answered the request itself: the stream is over.
    Answered,
}

/// A message that came out of order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutOfOrder {
    pub message: Message,
    stage: Stage,
}

impl fmt::Display for OutOfOrder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let at = match self.stage {
            Stage::Start => "before the request headers",
            Stage::Request { .. } => "during the request",
            Stage::Response { .. } => "during the response",
            Stage::Answered => "after the processor answered the request itself",
        };
        write!(
            f,
            "ext_proc message {:?} out of order ({at}); one request per stream, headers first",
            self.message
        )
    }
}

/// Tracks one stream's messages.
#[derive(Debug, Default)]
pub struct StreamOrder {
    stage: Stage,
}

impl StreamOrder {
    /// Accepts the next message, or says it is out of order.
    /// `end_of_stream` is the message's own flag (headers or body).
    pub fn accept(&mut self, message: Message, end_of_stream: bool) -> Result<(), OutOfOrder> {
        use Message::*;
        let next = match (self.stage, message) {
            (Stage::Start, RequestHeaders) => Stage::Request {
                body: !end_of_stream,
            },
            // The body is BUFFERED: it comes whole, in one message, whose
            // `end_of_stream` is false when trailers follow (HTTP/2).
            (Stage::Request { body: true }, RequestBody) => Stage::Request { body: false },
            // The response may start before the request body ended (Envoy
            // answered it locally, e.g. a 413).
            (Stage::Request { .. }, ResponseHeaders) => Stage::Response {
                body: !end_of_stream,
            },
            (Stage::Response { body: true }, ResponseBody) => Stage::Response {
                body: !end_of_stream,
            },
            (stage, message) => return Err(OutOfOrder { message, stage }),
        };
        self.stage = next;
        Ok(())
    }

    /// The processor answered the request itself: nothing may follow.
    pub fn answered(&mut self) {
        self.stage = Stage::Answered;
    }

    /// The request headers arrived (the exchange has a request to report).
    pub fn started(&self) -> bool {
        self.stage != Stage::Start
    }
}

#[cfg(test)]
mod tests {
    use super::Message::*;
    use super::*;

    /// Messages with their end-of-stream flags.
    type Stream<'a> = &'a [(Message, bool)];

    fn run(messages: Stream<'_>, answered_after: Option<usize>) -> Result<(), OutOfOrder> {
        let mut order = StreamOrder::default();
        for (i, (m, eos)) in messages.iter().enumerate() {
            order.accept(*m, *eos)?;
            if answered_after == Some(i) {
                order.answered();
            }
        }
        Ok(())
    }

    #[test]
    fn envoy_orders_are_accepted() {
        let ok: &[Stream<'_>] = &[
            // POST, routed, streamed answer.
            &[
                (RequestHeaders, false),
                (RequestBody, true),
                (ResponseHeaders, false),
                (ResponseBody, false),
                (ResponseBody, true),
            ],
            // GET, answer without body.
            &[(RequestHeaders, true), (ResponseHeaders, true)],
            // Trailers after the body (they are not sent to the processor).
            &[
                (RequestHeaders, false),
                (RequestBody, false),
                (ResponseHeaders, true),
            ],
            // Envoy's own 413 before the body ended.
            &[
                (RequestHeaders, false),
                (ResponseHeaders, false),
                (ResponseBody, true),
            ],
        ];
        for messages in ok {
            assert!(run(messages, None).is_ok(), "{messages:?}");
        }
    }

    /// Table: what an attacker on the socket tried, and more.
    #[test]
    fn anything_else_is_refused() {
        let refused: &[(Stream<'_>, Option<usize>)] = &[
            // A body with no headers first (was answered with the key).
            (&[(RequestBody, true)], None),
            // A body after the processor answered the headers (401).
            (&[(RequestHeaders, false), (RequestBody, true)], Some(0)),
            // Anything after an immediate response.
            (&[(RequestHeaders, true), (ResponseHeaders, true)], Some(0)),
            // A second request on the same stream.
            (
                &[
                    (RequestHeaders, false),
                    (RequestBody, true),
                    (RequestHeaders, false),
                ],
                None,
            ),
            // A body the headers said would not come, or a second one.
            (&[(RequestHeaders, true), (RequestBody, true)], None),
            (
                &[
                    (RequestHeaders, false),
                    (RequestBody, true),
                    (RequestBody, true),
                ],
                None,
            ),
            (
                &[
                    (RequestHeaders, false),
                    (RequestBody, false),
                    (RequestBody, true),
                ],
                None,
            ),
            // Response parts out of place.
            (&[(ResponseHeaders, false)], None),
            (&[(RequestHeaders, false), (ResponseBody, true)], None),
            (
                &[
                    (RequestHeaders, false),
                    (RequestBody, true),
                    (ResponseHeaders, true),
                    (ResponseBody, true),
                ],
                None,
            ),
            (
                &[
                    (RequestHeaders, false),
                    (RequestBody, true),
                    (ResponseHeaders, false),
                    (RequestBody, true),
                ],
                None,
            ),
            // Trailers are never asked for.
            (&[(RequestHeaders, false), (RequestTrailers, true)], None),
            (
                &[
                    (RequestHeaders, false),
                    (RequestBody, true),
                    (ResponseHeaders, false),
                    (ResponseTrailers, true),
                ],
                None,
            ),
        ];
        for (messages, answered) in refused {
            let err = run(messages, *answered).unwrap_err();
            assert!(err.to_string().contains("out of order"), "{err}");
        }
    }
}
