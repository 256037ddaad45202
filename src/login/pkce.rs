//! PKCE (RFC 7636): a random verifier kept by the client, its S256
//! challenge sent in the browser URL. Only the holder of the verifier can
//! exchange the code the browser brings back.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use sha2::{Digest, Sha256};

/// RFC 7636's unreserved characters, the verifier's alphabet.
const UNRESERVED: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~";

/// Verifier length: RFC 7636 allows 43 to 128 characters.
pub const VERIFIER_LEN: usize = 64;

/// A random string of `len` unreserved characters from the OS's CSPRNG.
pub fn random_unreserved(len: usize) -> Result<String, getrandom::Error> {
    let mut out = String::with_capacity(len);
    let mut buf = [0u8; 64];
    // Rejection sampling: bytes past the largest multiple of the alphabet's
    // size are dropped, so every character is equally likely.
    let limit = (256 / UNRESERVED.len() * UNRESERVED.len()) as u8;
    while out.len() < len {
        getrandom::fill(&mut buf)?;
        for &b in buf.iter().filter(|&&b| b < limit) {
            if out.len() == len {
                break;
            }
            out.push(UNRESERVED[b as usize % UNRESERVED.len()] as char);
        }
    }
    Ok(out)
}

/// The S256 challenge of `verifier`: base64url(SHA-256), no padding.
pub fn challenge(verifier: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc7636_appendix_b_example() {
        assert_eq!(
            challenge("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
    }

    #[test]
    fn verifiers_are_long_unreserved_and_distinct() {
        let a = random_unreserved(VERIFIER_LEN).unwrap();
        let b = random_unreserved(VERIFIER_LEN).unwrap();
        assert_eq!(a.len(), VERIFIER_LEN);
        assert!(a.bytes().all(|c| UNRESERVED.contains(&c)), "{a}");
        assert_ne!(a, b);
    }
}
