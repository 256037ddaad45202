//! How many input tokens a request will use, guessed before it is sent, for
//! its reservation. The real count replaces the guess when the response
//! says it (`ai_gateway_token_estimate_ratio` shows how far off it was).
//!
//! The rule: one token per four bytes of the request body (English text
//! runs at about four characters per token, and the JSON around the
//! messages counts too, so the guess leans high), except base64 `data:`
//! URLs (images, audio, files), which count [`TOKENS_PER_DATA_URL`] each
//! instead of their length: a high-detail image costs OpenAI 765 to 1,105
//! tokens however many bytes encode it.

use std::sync::LazyLock;

use memchr::memmem;

/// Tokens a `data:...;base64,...` URL counts for.
pub const TOKENS_PER_DATA_URL: u64 = 1_000;

/// Bytes per token for everything else.
const BYTES_PER_TOKEN: u64 = 4;

/// What marks a base64 payload. Its searcher is built once: built per
/// call (`memmem::find`), it was most of an admission's estimate, which
/// sits before a request's first byte (bench/RESULTS.md entry 67).
static BASE64_MARK: LazyLock<memmem::Finder<'static>> =
    LazyLock::new(|| memmem::Finder::new(b";base64,"));

/// The input token estimate of a request body.
pub fn input_tokens(body: &[u8]) -> u64 {
    let mut counted = body.len() as u64;
    let mut data_urls = 0;
    let mut rest = body;
    // A base64 payload holds no quote, so the string ends at the next one.
    while let Some(at) = BASE64_MARK.find(rest) {
        let payload = &rest[at + 8..];
        let end = memchr::memchr(b'"', payload).unwrap_or(payload.len());
        counted -= end as u64;
        data_urls += 1;
        rest = &payload[end..];
    }
    counted.div_ceil(BYTES_PER_TOKEN) + data_urls * TOKENS_PER_DATA_URL
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn four_bytes_a_token_and_data_urls_a_thousand() {
        assert_eq!(input_tokens(b""), 0);
        assert_eq!(input_tokens(b"12345678"), 2);
        assert_eq!(input_tokens(b"123456789"), 3);
        let image = format!(
            r#"{{"model":"m","messages":[{{"role":"user","content":[{{"type":"image_url","image_url":{{"url":"data:image/png;base64,{}"}}}}]}}]}}"#,
            "A".repeat(1_000_000)
        );
        let estimate = input_tokens(image.as_bytes());
        let rest = (image.len() - 1_000_000) as u64;
        assert_eq!(estimate, rest.div_ceil(4) + 1_000);
        // Two images, and a string that only mentions the marker.
        let two = format!(
            r#"{{"a":"x;base64,{}","b":"y;base64,QQ==","c":"z"}}"#,
            "B".repeat(400)
        );
        assert_eq!(
            input_tokens(two.as_bytes()),
            ((two.len() - 404) as u64).div_ceil(4) + 2_000
        );
    }
}
