//! Envoy's half of the configuration, served live over xDS by the
//! processor from the same watched file as its own half: a config edit
//! applies to both at once, with no control plane and no Envoy restart.
//!
//! - `encode`: the rendered JSON resources as the protobuf messages xDS
//!   carries;
//! - `resources`: one configuration's clusters, listener and routes;
//! - `served`: the version served, and what Envoy accepted or rejected;
//! - `ads`: the aggregated discovery stream, one per Envoy.

mod ads;
mod encode;
mod resources;
mod served;

pub use ads::AdsService;
pub use encode::EncodeError;
pub use resources::{ResourceSet, ResourceType, Snapshot};
pub use served::ServedResources;
