//! Envoy's resources from their JSON form to the protobuf messages xDS
//! carries.
//!
//! The renderer (`crate::envoy_config`) writes resources as Envoy's proto3
//! JSON, the form the static bootstrap prints. `envoy-types` has Envoy's
//! Rust types but no JSON mapping, so the descriptors of the types the
//! renderer uses are compiled at build time (`build.rs`) and the JSON is
//! encoded through them: one renderer for both bootstraps and xDS, and a
//! field the renderer misspells is an error here rather than a field Envoy
//! silently never sees.
//!
//! The descriptor pool takes a few megabytes and a few milliseconds to
//! build; it is built per encoding (a config change) and dropped after,
//! rather than held for the life of the process, and the memory it used is
//! handed back (measured: an idle processor held 6 MiB more without).

use envoy_types::pb::google::protobuf::Any;
use prost_reflect::{DescriptorPool, DynamicMessage};
use serde_json::Value;

static DESCRIPTORS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/envoy_descriptors.bin"));

const TYPE_URL_PREFIX: &str = "type.googleapis.com/";

/// Why a resource cannot be encoded: a defect of the renderer (or of the
/// build), never of the user's config, which is validated before.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("Envoy's descriptors are unusable: {0}")]
    Descriptors(#[from] prost_reflect::DescriptorError),
    #[error("no descriptor for Envoy type {0}")]
    UnknownType(String),
    #[error("cannot encode {message}: {source}")]
    Json {
        message: String,
        #[source]
        source: serde_json::Error,
    },
}

/// Encodes rendered resources.
pub struct Encoder {
    pool: DescriptorPool,
}

impl Encoder {
    pub fn new() -> Result<Self, EncodeError> {
        Ok(Self {
            pool: DescriptorPool::decode(DESCRIPTORS)?,
        })
    }

    /// `json` as the protobuf message `message` (a full name such as
    /// `envoy.config.cluster.v3.Cluster`), wrapped in an `Any`.
    pub fn encode(&self, message: &str, json: &Value) -> Result<Any, EncodeError> {
        let descriptor = self
            .pool
            .get_message_by_name(message)
            .ok_or_else(|| EncodeError::UnknownType(message.to_string()))?;
        let dynamic =
            DynamicMessage::deserialize(descriptor, json).map_err(|source| EncodeError::Json {
                message: message.to_string(),
                source,
            })?;
        Ok(Any {
            type_url: format!("{TYPE_URL_PREFIX}{message}"),
            value: prost::Message::encode_to_vec(&dynamic),
        })
    }
}

/// Hands memory freed on the heap back to the system. glibc keeps what a
/// dropped pool freed in its arenas, where an idle processor would hold it
/// for good; other allocators return it themselves.
pub fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns unused heap pages to the system; it
    // may be called at any time from any thread.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::cluster::v3::Cluster;
    use prost::Message;
    use serde_json::json;

    #[test]
    fn json_becomes_envoy_types_messages() {
        let encoder = Encoder::new().unwrap();
        let any = encoder
            .encode(
                "envoy.config.cluster.v3.Cluster",
                &json!({
                    "name": "b",
                    "connect_timeout": "0.25s",
                    "type": "LOGICAL_DNS",
                    "typed_extension_protocol_options": {
                        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                            "explicit_http_config": {"http_protocol_options": {}},
                        },
                    },
                }),
            )
            .unwrap();
        assert_eq!(
            any.type_url,
            "type.googleapis.com/envoy.config.cluster.v3.Cluster"
        );
        let cluster = Cluster::decode(any.value.as_slice()).unwrap();
        assert_eq!(cluster.name, "b");
        assert_eq!(cluster.connect_timeout.unwrap().nanos, 250_000_000);
        let options = &cluster.typed_extension_protocol_options
            ["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"];
        assert!(options.type_url.ends_with("HttpProtocolOptions"));
    }

    #[test]
    fn a_misspelled_field_or_type_is_an_error() {
        let encoder = Encoder::new().unwrap();
        let err = encoder
            .encode(
                "envoy.config.cluster.v3.Cluster",
                &json!({"name": "b", "nmae": 1}),
            )
            .unwrap_err();
        assert!(err.to_string().contains("nmae"), "{err}");
        assert!(encoder.encode("envoy.Nothing", &json!({})).is_err());
        let any = json!({"name": "b", "cluster_type": {"name": "x", "typed_config": {"@type": "type.googleapis.com/envoy.Nothing"}}});
        assert!(encoder
            .encode("envoy.config.cluster.v3.Cluster", &any)
            .is_err());
    }
}
