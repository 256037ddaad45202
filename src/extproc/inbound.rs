//! One message from Envoy, with a body or a header map taken out of
//! gRPC's receive buffer without a copy.
//!
//! Why: prost decodes a `bytes` field into a fresh `Vec<u8>` (envoy-types
//! generates `HttpBody.body` that way), so while a request body of 8 MB
//! is decoded the processor holds it twice, tonic's receive buffer and
//! prost's vector, and spends a copy and its page faults on it (about a
//! sixth of a large body's CPU, `bench/RESULTS.md` entry 19). Headers are
//! small but many: envoy-types makes each one a `String` and a `Vec`, two
//! allocations and a copy per header, on every request's first message
//! (entry 46).
//!
//! The body has one place on the wire: field `body` of the `HttpBody` in
//! `ProcessingRequest.request_body` or `.response_body`. [`decode`] finds
//! it, hands it on as a [`Bytes`] slice of the receive buffer (tonic's
//! buffer is a `BytesMut`, which splits without copying), and lets prost
//! decode every other field. A header map is the `HttpHeaders` in
//! `.request_headers` or `.response_headers`; prost decodes it into
//! [`HeaderList`], whose names and values are `Bytes` and so slices of
//! the same buffer. A message shaped in any other way (neither, a
//! repeated field, a deprecated group or attributes map, a header that is
//! not UTF-8 where envoy-types wants a `String`, a buffer in pieces) is
//! decoded by envoy-types' prost types as a whole, so this never reads a
//! message differently from prost: the `inbound` fuzz target checks
//! exactly that.

use std::ops::Range;

use bytes::{Buf, Bytes};
use envoy_types::pb::envoy::service::ext_proc::v3::{
    processing_request::Request, HttpBody, HttpHeaders, ProcessingRequest,
};
use prost::{DecodeError, Message};

use super::headers::{HeaderField, HeaderList};

/// `ProcessingRequest` fields of its `request` oneof (headers, bodies,
/// trailers of both directions).
const REQUEST_ONEOF: Range<usize> = 2..8;
const REQUEST_HEADERS_FIELD: usize = 2;
const RESPONSE_HEADERS_FIELD: usize = 3;
const REQUEST_BODY_FIELD: usize = 4;
const RESPONSE_BODY_FIELD: usize = 5;
/// `HttpBody.body`.
const BODY_FIELD: usize = 1;
/// `HttpHeaders.attributes` (deprecated): not in [`HeadersView`].
const HEADERS_ATTRIBUTES_FIELD: usize = 2;

const VARINT: usize = 0;
const FIXED64: usize = 1;
const LENGTH_DELIMITED: usize = 2;
const FIXED32: usize = 5;

/// A message from Envoy. For a body message, the body is in `body` and
/// the `HttpBody` inside `message` has an empty `body`; for a headers
/// message, the headers are in `headers` and the `HttpHeaders` inside
/// `message` has none. Both are empty for any other message.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Inbound {
    pub message: ProcessingRequest,
    pub body: Bytes,
    pub headers: HeaderList,
}

impl From<ProcessingRequest> for Inbound {
    /// Moves the body or the header map out of a decoded message (a
    /// `Vec` or `String` becomes `Bytes` without a copy).
    fn from(mut message: ProcessingRequest) -> Self {
        let (body, headers) = match &mut message.request {
            Some(Request::RequestBody(b) | Request::ResponseBody(b)) => (
                Bytes::from(std::mem::take(&mut b.body)),
                HeaderList::default(),
            ),
            Some(Request::RequestHeaders(h) | Request::ResponseHeaders(h)) => (
                Bytes::new(),
                h.headers.take().map(HeaderList::from).unwrap_or_default(),
            ),
            _ => (Bytes::new(), HeaderList::default()),
        };
        Self {
            message,
            body,
            headers,
        }
    }
}

/// `HttpHeaders` as it is read here: its header map's names and values
/// are views (`attributes`, deprecated, is never sent; a message that
/// has it goes to prost).
#[derive(Clone, PartialEq, prost::Message)]
struct HeadersView {
    #[prost(message, optional, tag = "1")]
    headers: Option<HeaderMapView>,
    #[prost(bool, tag = "3")]
    end_of_stream: bool,
}

/// `envoy.config.core.v3.HeaderMap`, its headers as views.
#[derive(Clone, PartialEq, prost::Message)]
struct HeaderMapView {
    #[prost(message, repeated, tag = "1")]
    headers: Vec<HeaderField>,
}

/// Decodes the whole of `buf` (one gRPC message) as a `ProcessingRequest`.
pub fn decode(buf: &mut impl Buf) -> Result<Inbound, DecodeError> {
    let len = buf.remaining();
    let Some(data) = buf.chunk().get(..len) else {
        // In pieces: not tonic's buffer. prost reads pieces as they come.
        return ProcessingRequest::decode(buf).map(Inbound::from);
    };
    let Some(oneof) = the_request(data) else {
        return ProcessingRequest::decode(buf).map(Inbound::from);
    };
    match (oneof.number, oneof.wire_type) {
        (REQUEST_HEADERS_FIELD | RESPONSE_HEADERS_FIELD, LENGTH_DELIMITED) => {
            let response = oneof.number == RESPONSE_HEADERS_FIELD;
            if !plain_headers(&data[oneof.value.clone()]) {
                return ProcessingRequest::decode(buf).map(Inbound::from);
            }
            // The message as `Bytes`: a split of tonic's buffer, which the
            // header views then slice.
            let whole = buf.copy_to_bytes(len);
            match headers_in_place(&whole, &oneof, response) {
                Some(inbound) => Ok(inbound),
                // prost refuses a piece: let it say why about the whole.
                None => ProcessingRequest::decode(whole).map(Inbound::from),
            }
        }
        (REQUEST_BODY_FIELD | RESPONSE_BODY_FIELD, LENGTH_DELIMITED) => {
            let Some(at) = locate_body(data, oneof) else {
                return ProcessingRequest::decode(buf).map(Inbound::from);
            };
            body_in_place(buf, at)
        }
        _ => ProcessingRequest::decode(buf).map(Inbound::from),
    }
}

/// A headers message read with its header map as views of `whole`;
/// `None` where prost would read it otherwise or refuse it.
fn headers_in_place(whole: &Bytes, oneof: &Field, response: bool) -> Option<Inbound> {
    let data = &whole[..];
    let mut message =
        ProcessingRequest::decode(data[..oneof.whole.start].chain(&data[oneof.whole.end..]))
            .ok()?;
    let view = HeadersView::decode(whole.slice(oneof.value.clone())).ok()?;
    let fields = view.headers.map(|m| m.headers).unwrap_or_default();
    // envoy-types' names and values are `String`s: prost refuses a
    // message where one is not UTF-8, and so must this.
    let utf8 = |b: &Bytes| simdutf8::basic::from_utf8(b).is_ok();
    if !fields.iter().all(|f| utf8(&f.key) && utf8(&f.value)) {
        return None;
    }
    let headers = HttpHeaders {
        end_of_stream: view.end_of_stream,
        ..HttpHeaders::default()
    };
    message.request = Some(if response {
        Request::ResponseHeaders(headers)
    } else {
        Request::RequestHeaders(headers)
    });
    Some(Inbound {
        message,
        body: Bytes::new(),
        headers: HeaderList::new(fields),
    })
}

/// Whether an encoded `HttpHeaders` has only the fields [`HeadersView`]
/// reads as envoy-types does (and can be walked).
fn plain_headers(payload: &[u8]) -> bool {
    Fields::new(payload).all(|f| f.is_some_and(|f| f.number != HEADERS_ATTRIBUTES_FIELD))
}

/// A body message read with its body as a view of `buf`.
fn body_in_place(buf: &mut impl Buf, at: BodyAt) -> Result<Inbound, DecodeError> {
    let len = buf.remaining();
    let Some(data) = buf.chunk().get(..len) else {
        // `decode` found the buffer in one piece; should that ever not
        // hold, prost reads it in pieces rather than this panicking.
        return ProcessingRequest::decode(buf).map(Inbound::from);
    };
    // Everything but the body, in wire order, decoded by prost: the
    // message's fields around the body message, and the body message's
    // fields around the body.
    let rest = ProcessingRequest::decode(data[..at.field.start].chain(&data[at.field.end..]));
    let http_body = HttpBody::decode(
        data[at.payload.start..at.body_field.start].chain(&data[at.body.end..at.payload.end]),
    );
    let (Ok(mut message), Ok(http_body)) = (rest, http_body) else {
        // prost refuses a piece: let it say why about the whole message.
        return ProcessingRequest::decode(buf).map(Inbound::from);
    };
    message.request = Some(if at.response {
        Request::ResponseBody(http_body)
    } else {
        Request::RequestBody(http_body)
    });
    buf.advance(at.body.start);
    let body = buf.copy_to_bytes(at.body.len());
    buf.advance(len - at.body.end);
    Ok(Inbound {
        message,
        body,
        headers: HeaderList::default(),
    })
}

/// Where the body sits in an encoded `ProcessingRequest`.
#[derive(Debug, PartialEq)]
struct BodyAt {
    /// Whether it is `response_body` (else `request_body`).
    response: bool,
    /// The body message's field, key and length included.
    field: Range<usize>,
    /// The body message's own bytes.
    payload: Range<usize>,
    /// The `body` field within it, key and length included.
    body_field: Range<usize>,
    /// The body's bytes.
    body: Range<usize>,
}

/// The one field of the message's `request` oneof; `None` when there is
/// not exactly one, or the message cannot be walked (left to prost).
fn the_request(data: &[u8]) -> Option<Field> {
    let mut oneof = None;
    let mut oneof_fields = 0;
    for field in Fields::new(data) {
        let field = field?;
        if REQUEST_ONEOF.contains(&field.number) {
            oneof_fields += 1;
            oneof = Some(field);
        }
    }
    oneof.filter(|_| oneof_fields == 1)
}

/// Finds the body in a body message (`oneof`, one of the message's
/// fields) with one `body` field; `None` for anything else (left to
/// prost).
fn locate_body(data: &[u8], oneof: Field) -> Option<BodyAt> {
    let response = oneof.number == RESPONSE_BODY_FIELD;
    let payload = oneof.value.clone();
    let mut body = None;
    for field in Fields::new(&data[payload.clone()]) {
        let field = field?;
        if field.number == BODY_FIELD {
            if body.is_some() || field.wire_type != LENGTH_DELIMITED {
                return None;
            }
            body = Some(field);
        }
    }
    let body = body?;
    let shift = |r: Range<usize>| r.start + payload.start..r.end + payload.start;
    Some(BodyAt {
        response,
        field: oneof.whole,
        body_field: shift(body.whole),
        body: shift(body.value),
        payload,
    })
}

/// One field of an encoded message: its number, wire type, where it is
/// whole and where its value is (for a length-delimited field, without
/// the length).
#[derive(Debug)]
struct Field {
    number: usize,
    wire_type: usize,
    whole: Range<usize>,
    value: Range<usize>,
}

/// The top-level fields of an encoded message, in order. Yields `None`
/// (and stops) at anything it cannot walk: a truncated field, field
/// number 0, a group or an unknown wire type.
struct Fields<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Fields<'a> {
    fn new(data: &'a [u8]) -> Self {
        Self { data, at: 0 }
    }

    fn next_field(&mut self) -> Option<Field> {
        let start = self.at;
        let mut rest = &self.data[start..];
        let key = varint(&mut rest)?;
        // prost refuses keys past 32 bits and field number 0.
        if u32::try_from(key).is_err() || key >> 3 == 0 {
            return None;
        }
        let (number, wire_type) = (key >> 3, key & 7);
        let offset = |rest: &[u8]| self.data.len() - rest.len();
        let value = match wire_type {
            VARINT => {
                let value_start = offset(rest);
                varint(&mut rest)?;
                value_start..offset(rest)
            }
            FIXED64 | FIXED32 | LENGTH_DELIMITED => {
                let len = match wire_type {
                    FIXED64 => 8,
                    FIXED32 => 4,
                    _ => varint(&mut rest)?,
                };
                let value_start = offset(rest);
                value_start..value_start.checked_add(len)?
            }
            _ => return None,
        };
        if value.end > self.data.len() {
            return None;
        }
        self.at = value.end;
        Some(Field {
            number,
            wire_type,
            whole: start..value.end,
            value,
        })
    }
}

impl Iterator for Fields<'_> {
    type Item = Option<Field>;

    fn next(&mut self) -> Option<Option<Field>> {
        if self.at >= self.data.len() {
            return None;
        }
        let field = self.next_field();
        if field.is_none() {
            // Nothing after an unreadable field can be trusted.
            self.at = self.data.len();
        }
        Some(field)
    }
}

/// A base-128 varint, as prost reads one (its public reader of length
/// delimiters is that reader). A varint past `usize` is `None`: on a
/// 32-bit target prost then reads the message whole.
fn varint(buf: &mut &[u8]) -> Option<usize> {
    prost::decode_length_delimiter(buf).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    use bytes::BytesMut;
    use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue, Metadata};
    use envoy_types::pb::envoy::service::ext_proc::v3::{HttpHeaders, ProtocolConfiguration};
    use envoy_types::pb::google::protobuf::Struct;

    fn request_body(body: &[u8], end_of_stream: bool) -> ProcessingRequest {
        ProcessingRequest {
            request: Some(Request::RequestBody(HttpBody {
                body: body.to_vec(),
                end_of_stream,
                ..HttpBody::default()
            })),
            ..ProcessingRequest::default()
        }
    }

    /// Every field Envoy may send beside the body, on both sides of it
    /// once encoded (prost writes fields in tag order: 2 to 7 before 8 to
    /// 13).
    fn with_everything(mut message: ProcessingRequest) -> ProcessingRequest {
        message.metadata_context = Some(Metadata {
            filter_metadata: [("envoy.lb".to_string(), Struct::default())].into(),
            ..Metadata::default()
        });
        message.attributes =
            [("envoy.filters.http.ext_proc".to_string(), Struct::default())].into();
        message.observability_mode = true;
        message.protocol_config = Some(ProtocolConfiguration {
            request_body_mode: 1,
            send_body_without_waiting_for_header_response: true,
            ..ProtocolConfiguration::default()
        });
        message
    }

    fn field(number: usize, value: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        prost::encode_length_delimiter((number << 3) | LENGTH_DELIMITED, &mut out).unwrap();
        prost::encode_length_delimiter(value.len(), &mut out).unwrap();
        out.extend_from_slice(value);
        out
    }

    /// What prost alone makes of `encoded`, as an [`Inbound`].
    fn by_prost(encoded: &[u8]) -> Result<Inbound, DecodeError> {
        ProcessingRequest::decode(encoded).map(Inbound::from)
    }

    /// Our reading equals prost's, a message or an error alike.
    fn same_as_prost(
        ours: Result<Inbound, DecodeError>,
        prost: Result<Inbound, DecodeError>,
        case: &str,
    ) {
        match (ours, prost) {
            (Ok(ours), Ok(prost)) => assert_eq!(ours, prost, "{case}"),
            (Err(ours), Err(prost)) => assert_eq!(ours, prost, "{case}"),
            (ours, prost) => panic!("{case}: {ours:?} against prost's {prost:?}"),
        }
    }

    /// A decoder under test: the result, and whether the part under test
    /// was read in place.
    type InPlaceDecode = fn(&[u8]) -> (Result<Inbound, DecodeError>, bool);

    /// Each case, encoded and decoded by `decode`, reads as prost reads
    /// it and as the message it was; `what` (the body or the headers) is
    /// read in place exactly where the case says.
    fn read_as_prost(
        cases: Vec<(&str, ProcessingRequest, bool)>,
        decode: InPlaceDecode,
        what: &str,
    ) {
        for (case, message, in_place) in cases {
            let encoded = message.encode_to_vec();
            let (ours, read_in_place) = decode(&encoded);
            let ours = ours.unwrap_or_else(|e| panic!("{case}: {e}"));
            assert_eq!(ours, by_prost(&encoded).unwrap(), "{case}");
            assert_eq!(ours, Inbound::from(message), "{case}");
            assert_eq!(read_in_place, in_place, "{case}: {what} read in place");
        }
    }

    /// Decodes `encoded` from a `BytesMut`, as tonic holds it: returns
    /// the result and whether the body is a view of that buffer.
    fn decode_in_place(encoded: &[u8]) -> (Result<Inbound, DecodeError>, bool) {
        let mut buf = BytesMut::from(encoded);
        let span = buf.as_ptr() as usize..buf.as_ptr() as usize + buf.len();
        let decoded = decode(&mut buf);
        if decoded.is_ok() {
            assert_eq!(buf.remaining(), 0, "the whole message is consumed");
        }
        let in_place = decoded.as_ref().is_ok_and(|d| {
            let at = d.body.as_ptr() as usize;
            !d.body.is_empty() && span.contains(&at) && at + d.body.len() <= span.end
        });
        (decoded, in_place)
    }

    /// Decodes `encoded` from a `BytesMut`, as tonic holds it: returns the
    /// result and whether every header name and value is a view of that
    /// buffer (`false` without headers).
    fn decode_headers_in_place(encoded: &[u8]) -> (Result<Inbound, DecodeError>, bool) {
        let mut buf = BytesMut::from(encoded);
        let span = buf.as_ptr() as usize..buf.as_ptr() as usize + buf.len();
        let decoded = decode(&mut buf);
        let inside = |b: &[u8]| {
            let at = b.as_ptr() as usize;
            span.contains(&at) && at + b.len() <= span.end
        };
        let in_place = decoded.as_ref().is_ok_and(|d| {
            d.headers.iter().next().is_some()
                && d.headers
                    .iter()
                    .all(|(k, v)| inside(k) && (v.is_empty() || inside(v)))
        });
        (decoded, in_place)
    }

    fn header_map(pairs: &[(&str, &[u8])]) -> HeaderMap {
        HeaderMap {
            headers: pairs
                .iter()
                .map(|(k, v)| HeaderValue {
                    key: (*k).into(),
                    raw_value: v.to_vec(),
                    ..HeaderValue::default()
                })
                .collect(),
        }
    }

    fn headers_message(
        response: bool,
        map: Option<HeaderMap>,
        end_of_stream: bool,
    ) -> ProcessingRequest {
        let h = HttpHeaders {
            headers: map,
            end_of_stream,
            ..HttpHeaders::default()
        };
        ProcessingRequest {
            request: Some(if response {
                Request::ResponseHeaders(h)
            } else {
                Request::RequestHeaders(h)
            }),
            ..ProcessingRequest::default()
        }
    }

    #[test]
    fn reads_header_maps_as_prost_does_and_in_place() {
        let request = header_map(&[
            (":method", b"POST"),
            (":path", b"/v1/chat/completions"),
            ("x-request-id", b"0d7f"),
            ("authorization", b"Bearer sk-client"),
            ("content-length", b"42"),
        ]);
        let old_envoy = HeaderMap {
            headers: vec![HeaderValue {
                key: ":status".into(),
                value: "429".into(),
                ..HeaderValue::default()
            }],
        };
        let not_utf8_value = header_map(&[("x-ai-eg-x", b"\xff\xfe")]);
        let empty_value = header_map(&[("x-ai-eg-empty", b"")]);
        // (case, message, headers read in place)
        let cases: Vec<(&str, ProcessingRequest, bool)> = vec![
            (
                "request headers",
                headers_message(false, Some(request.clone()), false),
                true,
            ),
            (
                "bodiless request",
                headers_message(false, Some(request.clone()), true),
                true,
            ),
            (
                "request headers and every other field",
                with_everything(headers_message(false, Some(request), false)),
                true,
            ),
            (
                "response headers",
                headers_message(
                    true,
                    Some(header_map(&[
                        (":status", b"200"),
                        ("content-type", b"text/event-stream"),
                    ])),
                    false,
                ),
                true,
            ),
            (
                "an older Envoy's value field",
                headers_message(true, Some(old_envoy), false),
                true,
            ),
            (
                "raw_value need not be UTF-8",
                headers_message(false, Some(not_utf8_value), false),
                true,
            ),
            (
                "an empty value",
                headers_message(false, Some(empty_value), false),
                true,
            ),
            (
                "an empty header map",
                headers_message(false, Some(HeaderMap::default()), false),
                false,
            ),
            ("no header map", headers_message(true, None, true), false),
        ];
        read_as_prost(cases, decode_headers_in_place, "headers");
    }

    #[test]
    fn odd_header_maps_read_as_prost_reads_them() {
        let header = |parts: &[&[u8]]| field(1, &parts.concat());
        let key = |k: &[u8]| field(1, k);
        let raw = |v: &[u8]| field(3, v);
        let map = |headers: &[&[u8]]| field(1, &headers.concat());
        let end_of_stream = [0x18, 0x01]; // field 3, varint 1
        let unknown_fixed32 = [(9 << 3) | 5, 1, 2, 3, 4];
        let cat = |parts: &[&[u8]]| parts.concat();
        let request_headers = |payload: &[u8]| field(REQUEST_HEADERS_FIELD, payload);
        let status = header(&[&key(b":status"), &raw(b"200")]);
        // (case, encoded, headers read in place)
        let cases: Vec<(&str, Vec<u8>, bool)> = vec![
            (
                "end_of_stream before the map",
                request_headers(&cat(&[&end_of_stream, &map(&[&status])])),
                true,
            ),
            (
                "the map twice: prost merges them",
                request_headers(&cat(&[
                    &map(&[&status]),
                    &map(&[&header(&[&key(b"a"), &raw(b"b")])]),
                ])),
                true,
            ),
            (
                "a key twice: prost keeps the last",
                request_headers(&map(&[&header(&[&key(b"x"), &key(b"y"), &raw(b"v")])])),
                true,
            ),
            (
                "unknown fields in a header and the map",
                request_headers(&map(&[
                    &header(&[&unknown_fixed32, &key(b"k"), &raw(b"v")]),
                    &unknown_fixed32,
                ])),
                true,
            ),
            (
                "the deprecated attributes map: prost reads it",
                request_headers(&cat(&[
                    &map(&[&status]),
                    &field(HEADERS_ATTRIBUTES_FIELD, &[]),
                ])),
                false,
            ),
            (
                "a name that is not UTF-8: prost refuses it",
                request_headers(&map(&[&header(&[&key(b"\xff"), &raw(b"v")])])),
                false,
            ),
            (
                "a value field that is not UTF-8: prost refuses it",
                request_headers(&map(&[&header(&[&key(b"k"), &field(2, b"\xff")])])),
                false,
            ),
            (
                "a header's key as a varint: prost refuses it",
                request_headers(&map(&[&header(&[&[0x08, 0x01]])])),
                false,
            ),
            (
                "headers twice in the oneof: prost merges them",
                cat(&[
                    &request_headers(&map(&[&status])),
                    &request_headers(&end_of_stream),
                ]),
                false,
            ),
            (
                "response headers, then request headers: the last wins",
                cat(&[
                    &field(RESPONSE_HEADERS_FIELD, &map(&[&status])),
                    &request_headers(&map(&[&status])),
                ]),
                false,
            ),
        ];
        for (case, encoded, in_place) in cases {
            let prost = by_prost(&encoded);
            let (ours, headers_in_place) = decode_headers_in_place(&encoded);
            same_as_prost(ours, prost, case);
            assert_eq!(headers_in_place, in_place, "{case}: headers read in place");
        }
    }

    #[test]
    fn broken_header_messages_get_prosts_error() {
        let whole = headers_message(
            false,
            Some(header_map(&[
                (":path", b"/v1/models"),
                ("x-request-id", b"r"),
            ])),
            true,
        )
        .encode_to_vec();
        for cut in 1..whole.len() {
            let prost = by_prost(&whole[..cut]);
            let (ours, _) = decode_headers_in_place(&whole[..cut]);
            same_as_prost(ours, prost, &format!("cut at {cut}"));
        }
    }

    #[test]
    fn reads_every_message_as_prost_does_and_bodies_in_place() {
        let big = vec![b'x'; 300_000];
        let response = |body: &[u8]| ProcessingRequest {
            request: Some(Request::ResponseBody(HttpBody {
                body: body.to_vec(),
                end_of_stream: true,
                ..HttpBody::default()
            })),
            ..ProcessingRequest::default()
        };
        let headers = ProcessingRequest {
            request: Some(Request::RequestHeaders(HttpHeaders {
                headers: Some(HeaderMap {
                    headers: vec![HeaderValue {
                        key: ":path".into(),
                        raw_value: b"/v1/chat/completions".to_vec(),
                        ..HeaderValue::default()
                    }],
                }),
                ..HttpHeaders::default()
            })),
            ..ProcessingRequest::default()
        };
        // (case, message, body read in place)
        let cases: Vec<(&str, ProcessingRequest, bool)> = vec![
            (
                "request body",
                request_body(br#"{"model":"m"}"#, true),
                true,
            ),
            (
                "request body, trailers follow",
                request_body(b"{}", false),
                true,
            ),
            ("large request body", request_body(&big, true), true),
            ("empty request body", request_body(b"", true), false),
            (
                "request body and every other field",
                with_everything(request_body(b"{}", true)),
                true,
            ),
            ("response chunk", response(b"data: {}\n\n"), true),
            (
                "response chunk and every other field",
                with_everything(response(&big)),
                true,
            ),
            ("request headers", headers.clone(), false),
            (
                "headers and every other field",
                with_everything(headers),
                false,
            ),
            ("nothing", ProcessingRequest::default(), false),
        ];
        read_as_prost(cases, decode_in_place, "body");
    }

    #[test]
    fn odd_wire_shapes_read_as_prost_reads_them() {
        let body_message = |payload: &[u8]| field(REQUEST_BODY_FIELD, payload);
        let end_of_stream = [0x10, 0x01]; // field 2, varint 1
        let unknown_fixed32 = [(9 << 3) | 5, 1, 2, 3, 4];
        let unknown_fixed64 = [(9 << 3) | 1, 1, 2, 3, 4, 5, 6, 7, 8];
        let group = [(9 << 3) | 3, (9 << 3) | 4];
        let headers = field(2, &[]);
        let cat = |parts: &[&[u8]]| parts.concat();
        // (case, encoded, whether a body comes out)
        let cases: Vec<(&str, Vec<u8>, bool)> = vec![
            (
                "end_of_stream before the body",
                body_message(&cat(&[&end_of_stream, &field(BODY_FIELD, b"abc")])),
                true,
            ),
            (
                "unknown fields around the body",
                body_message(&cat(&[
                    &unknown_fixed32,
                    &field(BODY_FIELD, b"abc"),
                    &unknown_fixed64,
                ])),
                true,
            ),
            (
                "the body twice: prost keeps the last",
                body_message(&cat(&[
                    &field(BODY_FIELD, b"one"),
                    &field(BODY_FIELD, b"two"),
                ])),
                true,
            ),
            (
                "the body message twice: prost merges them",
                cat(&[
                    &body_message(&field(BODY_FIELD, b"one")),
                    &body_message(&end_of_stream),
                ]),
                true,
            ),
            (
                "headers then a body: the last oneof field wins",
                cat(&[&headers, &body_message(&field(BODY_FIELD, b"abc"))]),
                true,
            ),
            (
                "a body then headers",
                cat(&[&body_message(&field(BODY_FIELD, b"abc")), &headers]),
                false,
            ),
            (
                "a group beside the body",
                body_message(&cat(&[&group, &field(BODY_FIELD, b"abc")])),
                true,
            ),
            (
                "the body field as a varint",
                body_message(&[0x08, 0x01]),
                false,
            ),
            (
                "a body message without a body",
                body_message(&end_of_stream),
                false,
            ),
        ];
        for (case, encoded, in_place) in cases {
            let prost = by_prost(&encoded);
            let (ours, _) = decode_in_place(&encoded);
            assert_eq!(ours.is_ok(), prost.is_ok(), "{case}: {ours:?} / {prost:?}");
            if let (Ok(ours), Ok(prost)) = (ours, prost) {
                assert_eq!(ours, prost, "{case}");
                assert_eq!(!ours.body.is_empty(), in_place, "{case}: has a body");
            }
        }
    }

    #[test]
    fn broken_messages_get_prosts_error() {
        let whole = request_body(b"{\"model\":\"m\"}", true).encode_to_vec();
        let mut cases: Vec<(String, Vec<u8>)> = (1..whole.len())
            .map(|cut| (format!("cut at {cut}"), whole[..cut].to_vec()))
            .collect();
        cases.push(("field number 0".into(), vec![0x02, 0x00]));
        cases.push(("wire type 7".into(), vec![0x27]));
        cases.push((
            "a length past the end".into(),
            vec![0x22, 0xff, 0xff, 0xff, 0xff, 0x0f],
        ));
        cases.push((
            "an endless varint".into(),
            vec![0x10; 1].into_iter().chain([0xff; 11]).collect(),
        ));
        for (case, encoded) in cases {
            let prost = by_prost(&encoded);
            let (ours, _) = decode_in_place(&encoded);
            same_as_prost(ours, prost, &case);
        }
    }

    #[test]
    fn a_buffer_in_pieces_is_read_by_prost() {
        let encoded = request_body(b"{\"model\":\"m\"}", true).encode_to_vec();
        let (head, tail) = encoded.split_at(5);
        let mut pieces = head.chain(tail);
        let decoded = decode(&mut pieces).unwrap();
        assert_eq!(decoded, by_prost(&encoded).unwrap());
        assert_eq!(pieces.remaining(), 0);
    }
}
