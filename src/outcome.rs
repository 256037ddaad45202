//! How a request ended. One name per outcome, the same in the request log
//! line (`outcome=`) and in the metrics (`outcome` label); the README
//! defines them.

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Forwarded; the provider answered with a success status and the
    /// response ended.
    Success,
    /// Forwarded; the provider (or Envoy on its way there) answered 400 or
    /// above.
    UpstreamError,
    /// Forwarded; the exchange ended before the response did (the client
    /// left, a reset).
    Cancelled,
    /// The gateway refused the request itself, with an OpenAI-shaped error;
    /// no provider saw it.
    Rejected,
    /// The gateway answered the request itself (its own model list).
    Answered,
}

impl Outcome {
    pub fn label(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::UpstreamError => "upstream_error",
            Self::Cancelled => "cancelled",
            Self::Rejected => "rejected",
            Self::Answered => "answered",
        }
    }

    /// Whether a provider was called (the GenAI metrics count only these).
    pub fn forwarded(self) -> bool {
        matches!(self, Self::Success | Self::UpstreamError | Self::Cancelled)
    }
}
