//! The names the configuration and clients use, and what makes them safe:
//! backend names become Envoy cluster names and a header value, model names
//! travel in a header, TLS server names are DNS names.

/// Names used by the Envoy bootstrap itself; a backend must not take them.
pub const RESERVED_CLUSTER_NAMES: &[&str] = &["ai-gateway-extproc"];

/// The longest model name accepted, in the config and from clients.
pub const MAX_MODEL_NAME_LEN: usize = 256;

/// Why a name cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("must not be empty")]
    Empty,
    #[error("is longer than {0} bytes")]
    TooLong(usize),
    #[error("must not contain control characters")]
    Control,
    #[error("must not start or end with white space")]
    Padded,
    #[error("{0:?} may only use letters, digits, '-', '_' and '.'")]
    Alphabet(String),
    #[error("{0:?} is reserved for the gateway's own Envoy cluster")]
    Reserved(String),
    #[error("{0:?} is not a DNS name")]
    NotDns(String),
}

/// A model name must be able to travel in a header: no control characters
/// (which also rules out CR/LF header injection), bounded length.
pub fn check_model_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > MAX_MODEL_NAME_LEN {
        return Err(NameError::TooLong(MAX_MODEL_NAME_LEN));
    }
    if name.chars().any(|c| c.is_control()) {
        return Err(NameError::Control);
    }
    if name.trim() != name {
        return Err(NameError::Padded);
    }
    Ok(())
}

/// Backend names become Envoy cluster names and a header value: keep them to
/// a safe alphabet.
pub fn check_backend_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > 64 {
        return Err(NameError::TooLong(64));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(NameError::Alphabet(name.to_string()));
    }
    if RESERVED_CLUSTER_NAMES.contains(&name) {
        return Err(NameError::Reserved(name.to_string()));
    }
    Ok(())
}

/// A DNS name for SNI and the certificate check.
pub fn check_dns_name(name: &str) -> Result<(), NameError> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if ok {
        Ok(())
    } else {
        Err(NameError::NotDns(name.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_names_must_be_header_safe() {
        assert!(check_model_name("xai/grok-4.5").is_ok());
        assert!(check_model_name("vertex/gemini-2.5-pro:latest").is_ok());
        assert_eq!(check_model_name(""), Err(NameError::Empty));
        assert_eq!(check_model_name("a\r\nx-evil: 1"), Err(NameError::Control));
        assert_eq!(check_model_name("tab\there"), Err(NameError::Control));
        assert!(check_model_name(&"m".repeat(MAX_MODEL_NAME_LEN + 1)).is_err());
        assert_eq!(check_model_name(" padded"), Err(NameError::Padded));
    }

    #[test]
    fn backend_and_dns_names() {
        assert!(check_backend_name("tars-eu_1.b").is_ok());
        assert!(check_backend_name("bad name").is_err());
        assert!(check_backend_name("ai-gateway-extproc").is_err());
        assert!(check_dns_name("extproc.ai-gateway.internal").is_ok());
        assert!(check_dns_name("under_score.x").is_err());
        assert!(check_dns_name("a..b").is_err());
    }
}
