//! The OpenAI-compatible API as the gateway sees it: which paths exist,
//! what a request body must hold, and how errors and model lists look.
//!
//! Nothing here knows about Envoy; the ext_proc handler maps these types
//! onto Envoy's protocol.

pub mod error;
mod json_blocks;
mod json_string;
pub mod json_syntax;
pub mod models;
pub mod request;
pub mod response;
pub mod sse;
pub mod usage;

/// The API endpoints the gateway serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    ChatCompletions,
    Completions,
    Embeddings,
    Responses,
    /// Anthropic's Messages format, which TARS also serves.
    Messages,
    /// `GET /v1/models`
    ModelList,
    /// `GET /v1/models/{id}`; the id may itself contain `/`.
    Model,
}

impl Endpoint {
    /// Classifies a request path (query string already removed).
    pub fn from_path(path: &str) -> Option<Self> {
        Some(match path {
            "/v1/chat/completions" => Self::ChatCompletions,
            "/v1/completions" => Self::Completions,
            "/v1/embeddings" => Self::Embeddings,
            "/v1/responses" => Self::Responses,
            "/v1/messages" => Self::Messages,
            "/v1/models" => Self::ModelList,
            p if p.len() > "/v1/models/".len() && p.starts_with("/v1/models/") => Self::Model,
            _ => return None,
        })
    }

    /// The one HTTP method this endpoint answers.
    pub fn method(self) -> &'static str {
        match self {
            Self::ModelList | Self::Model => "GET",
            _ => "POST",
        }
    }

    /// Whether the request carries a JSON body naming a `model`.
    pub fn has_model_body(self) -> bool {
        self.method() == "POST"
    }

    /// A short, fixed name for metrics labels.
    pub fn label(self) -> &'static str {
        match self {
            Self::ChatCompletions => "chat_completions",
            Self::Completions => "completions",
            Self::Embeddings => "embeddings",
            Self::Responses => "responses",
            Self::Messages => "messages",
            Self::ModelList => "models",
            Self::Model => "model",
        }
    }

    /// The `gen_ai.operation.name` of this endpoint, for logs and metrics.
    pub fn operation(self) -> &'static str {
        match self {
            Self::ChatCompletions | Self::Messages | Self::Responses => "chat",
            Self::Completions => "text_completion",
            Self::Embeddings => "embeddings",
            Self::ModelList | Self::Model => "models",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Endpoint;

    #[test]
    fn paths() {
        assert_eq!(
            Endpoint::from_path("/v1/chat/completions"),
            Some(Endpoint::ChatCompletions)
        );
        assert_eq!(
            Endpoint::from_path("/v1/messages"),
            Some(Endpoint::Messages)
        );
        assert_eq!(Endpoint::from_path("/v1/models"), Some(Endpoint::ModelList));
        assert_eq!(
            Endpoint::from_path("/v1/models/xai/grok-4.5"),
            Some(Endpoint::Model)
        );
        assert_eq!(Endpoint::from_path("/v1/models/"), None);
        assert_eq!(Endpoint::from_path("/v1/chat/completions/"), None);
        assert_eq!(Endpoint::from_path("/v2/chat/completions"), None);
        assert_eq!(Endpoint::ModelList.method(), "GET");
        assert!(Endpoint::Embeddings.has_model_body());
    }
}
