//! Envoy's resources for one configuration, encoded for xDS: the
//! clusters, the listener and its route configuration.

use envoy_types::pb::google::protobuf::Any;

use super::encode::{release_freed_memory, EncodeError, Encoder};
use crate::config::Config;
use crate::envoy_config::{EnvoyResources, RouteSource};

/// The kinds of resource the processor serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResourceType {
    Cluster,
    Listener,
    RouteConfiguration,
}

impl ResourceType {
    /// In the order a change is sent: clusters before the listener and the
    /// routes that use them, so a route never points at a cluster Envoy
    /// does not have yet.
    pub const ALL: [ResourceType; 3] = [
        ResourceType::Cluster,
        ResourceType::Listener,
        ResourceType::RouteConfiguration,
    ];

    /// The protobuf message of this kind.
    pub fn message(self) -> &'static str {
        match self {
            ResourceType::Cluster => "envoy.config.cluster.v3.Cluster",
            ResourceType::Listener => "envoy.config.listener.v3.Listener",
            ResourceType::RouteConfiguration => "envoy.config.route.v3.RouteConfiguration",
        }
    }

    pub fn type_url(self) -> &'static str {
        match self {
            ResourceType::Cluster => "type.googleapis.com/envoy.config.cluster.v3.Cluster",
            ResourceType::Listener => "type.googleapis.com/envoy.config.listener.v3.Listener",
            ResourceType::RouteConfiguration => {
                "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
            }
        }
    }

    pub fn from_type_url(url: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.type_url() == url)
    }

    /// For log lines.
    pub fn plural(self) -> &'static str {
        match self {
            ResourceType::Cluster => "clusters",
            ResourceType::Listener => "listeners",
            ResourceType::RouteConfiguration => "routes",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// One named resource.
#[derive(Debug, Clone)]
pub struct Resource {
    pub name: String,
    pub body: Any,
    /// What it was encoded from. Two renders of one resource are equal as
    /// JSON but not always as bytes: protobuf maps (a `Struct`'s fields,
    /// the access log's format) are encoded in hash order.
    source: serde_json::Value,
}

impl PartialEq for Resource {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name && self.source == other.source
    }
}

/// Every resource Envoy gets for one configuration.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ResourceSet {
    by_type: [Vec<Resource>; 3],
}

impl ResourceSet {
    /// The resources for `config`; `secret` as in [`EnvoyResources::new`].
    pub fn render(config: &Config, secret: Option<&str>) -> Result<Self, EncodeError> {
        let rendered = EnvoyResources::new(config, secret, RouteSource::Xds);
        let encoder = Encoder::new()?;
        let mut set = Self::default();
        let mut add = |ty: ResourceType, json: serde_json::Value| -> Result<(), EncodeError> {
            set.by_type[ty.index()].push(Resource {
                name: json["name"].as_str().unwrap_or_default().to_string(),
                body: encoder.encode(ty.message(), &json)?,
                source: json,
            });
            Ok(())
        };
        for cluster in rendered.clusters {
            add(ResourceType::Cluster, cluster)?;
        }
        add(ResourceType::Listener, rendered.listener)?;
        add(ResourceType::RouteConfiguration, rendered.route_config)?;
        drop(encoder);
        release_freed_memory();
        Ok(set)
    }

    /// The resources of a kind, all of them (`names` empty: a wildcard
    /// subscription) or those named.
    pub fn select(&self, ty: ResourceType, names: &[String]) -> Vec<Resource> {
        self.by_type[ty.index()]
            .iter()
            .filter(|r| names.is_empty() || names.contains(&r.name))
            .cloned()
            .collect()
    }

    /// The names of a kind's resources.
    pub fn names(&self, ty: ResourceType) -> impl Iterator<Item = &str> {
        self.by_type[ty.index()].iter().map(|r| r.name.as_str())
    }
}

/// A resource set with the version it is served as.
#[derive(Debug)]
pub struct Snapshot {
    pub version: u64,
    pub resources: ResourceSet,
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::cluster::v3::Cluster;
    use envoy_types::pb::envoy::config::listener::v3::Listener;
    use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
    use prost::Message;
    use std::path::Path;

    fn config(yaml: &str) -> Config {
        Config::from_text(yaml, Path::new("t.yaml")).unwrap()
    }

    /// Every resource a config renders encodes, including a chain with its
    /// upstream filters and a TLS backend: the renderer writes nothing
    /// Envoy's types do not have.
    #[test]
    fn a_full_config_encodes() {
        let c = config(
            "backends:\n  - {name: a, url: 'http://10.0.0.1:1', api_key_file: k}\n  - {name: b, url: 'https://b.example/v1', api_key_file: k}\nmodels:\n  - {name: m, backend: a, fallbacks: [{backend: b}]}\n  - {name: o, backend: b}\n",
        );
        let set = ResourceSet::render(&c, Some("s3cr3t-s3cr3t-s3cr3t-s3cr3t-s3cr3t")).unwrap();
        let clusters: Vec<&str> = set.names(ResourceType::Cluster).collect();
        assert_eq!(clusters, ["a", "b", "chain~a~b"]);
        for r in set.select(ResourceType::Cluster, &[]) {
            let cluster = Cluster::decode(r.body.value.as_slice()).unwrap();
            assert_eq!(cluster.name, r.name);
        }
        let listener = &set.select(ResourceType::Listener, &[])[0];
        let listener = Listener::decode(listener.body.value.as_slice()).unwrap();
        assert_eq!(listener.name, "ai-gateway");
        let routes = &set.select(ResourceType::RouteConfiguration, &["ai-gateway".into()])[0];
        let routes = RouteConfiguration::decode(routes.body.value.as_slice()).unwrap();
        // a, b, the chain, and the last 404.
        assert_eq!(routes.virtual_hosts[0].routes.len(), 4);
        assert!(set
            .select(ResourceType::RouteConfiguration, &["other".into()])
            .is_empty());
    }

    #[test]
    fn type_urls_round_trip() {
        for ty in ResourceType::ALL {
            assert_eq!(ResourceType::from_type_url(ty.type_url()), Some(ty));
            assert!(ty.type_url().ends_with(ty.message()));
        }
        assert_eq!(ResourceType::from_type_url("type.googleapis.com/x"), None);
    }
}
