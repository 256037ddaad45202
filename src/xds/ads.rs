//! Envoy's aggregated discovery service (ADS): one gRPC stream per Envoy
//! carrying its clusters, listener and routes.
//!
//! State of the world, not delta: the gateway has one listener, one route
//! configuration and a cluster per backend (tens, not thousands), so
//! sending a kind's full list when it changes costs nothing worth a
//! protocol with per-resource bookkeeping on both sides; a full list also
//! removes what is gone without a separate message. What changes is sent,
//! kind by kind, clusters first (see `ResourceType::ALL`); a kind whose
//! resources did not change is not sent again.
//!
//! The protocol, per kind: every response carries a nonce; Envoy answers
//! each with a request naming it, with the version it now runs (ACK), or
//! with the version it keeps and an error (NACK). A request naming an
//! older nonce is stale (a newer response is on its way) and ignored.

use std::sync::Arc;

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryService;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use super::resources::{Resource, ResourceType, Snapshot};
use super::served::{Following, ServedResources};
use crate::shutdown;

/// Responses queued per stream: Envoy reads them as they come; a change
/// sends at most one per kind.
const QUEUE: usize = 4;

/// The ADS service.
pub struct AdsService {
    served: Arc<ServedResources>,
    shutdown: watch::Receiver<bool>,
}

impl AdsService {
    pub fn new(served: Arc<ServedResources>, shutdown: watch::Receiver<bool>) -> Self {
        Self { served, shutdown }
    }
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for AdsService {
    type StreamAggregatedResourcesStream = ReceiverStream<Result<DiscoveryResponse, Status>>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let (tx, rx) = mpsc::channel(QUEUE);
        let (stream, updates) = AdsStream::new(Arc::clone(&self.served));
        tokio::spawn(stream.run(request.into_inner(), updates, tx, self.shutdown.clone()));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    type DeltaAggregatedResourcesStream = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;

    async fn delta_aggregated_resources(
        &self,
        _request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        Err(Status::unimplemented(
            "this processor serves state-of-the-world ADS (api_type: GRPC); render the bootstrap with `ai-gateway-extproc envoy-config`",
        ))
    }
}

/// One Envoy's stream.
struct AdsStream {
    served: Arc<ServedResources>,
    following: Following,
    /// The version this stream serves now.
    snapshot: Arc<Snapshot>,
    subscriptions: [Option<Subscription>; 3],
    last_nonce: u64,
    /// The newest version this Envoy accepted whole.
    acked: u64,
    /// Envoy's node id, for log lines.
    node: String,
}

/// What Envoy asked for of one kind, and what it was last sent.
struct Subscription {
    /// Empty: everything of the kind.
    names: Vec<String>,
    sent: Option<Sent>,
}

struct Sent {
    nonce: String,
    version: u64,
    resources: Vec<Resource>,
    /// Envoy's answer: `None` until it comes, then accepted or not.
    accepted: Option<bool>,
}

/// The response channel closed: Envoy went away.
struct Closed;

impl AdsStream {
    /// A stream, and the channel of the versions it follows.
    fn new(served: Arc<ServedResources>) -> (Self, watch::Receiver<Arc<Snapshot>>) {
        let (snapshot, updates) = served.follow();
        let stream = Self {
            following: served.follower(),
            served,
            snapshot,
            subscriptions: [None, None, None],
            last_nonce: 0,
            acked: 0,
            node: String::new(),
        };
        (stream, updates)
    }

    async fn run(
        mut self,
        mut inbound: Streaming<DiscoveryRequest>,
        mut updates: watch::Receiver<Arc<Snapshot>>,
        tx: mpsc::Sender<Result<DiscoveryResponse, Status>>,
        stop: watch::Receiver<bool>,
    ) {
        let stopping = shutdown::requested(stop);
        tokio::pin!(stopping);
        loop {
            let outcome = tokio::select! {
                _ = &mut stopping => {
                    // Envoy keeps what it has and reconnects to the next
                    // processor.
                    let _ = tx.send(Err(Status::unavailable("the processor is shutting down"))).await;
                    break;
                }
                message = inbound.next() => match message {
                    Some(Ok(request)) => self.on_request(request, &tx).await,
                    Some(Err(status)) => {
                        tracing::debug!(node = %self.node, error = %status, "xDS stream broke");
                        break;
                    }
                    None => break,
                },
                changed = updates.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let snapshot = Arc::clone(&updates.borrow_and_update());
                    self.on_snapshot(snapshot, &tx).await
                }
            };
            if outcome.is_err() {
                break;
            }
        }
        if !self.node.is_empty() {
            tracing::info!(node = %self.node, "Envoy stopped following the configuration over xDS");
        }
    }

    async fn on_request(
        &mut self,
        request: DiscoveryRequest,
        tx: &mpsc::Sender<Result<DiscoveryResponse, Status>>,
    ) -> Result<(), Closed> {
        if self.node.is_empty() {
            if let Some(node) = &request.node {
                self.node = node.id.clone();
                tracing::info!(node = %self.node, version = self.snapshot.version, "Envoy follows the configuration over xDS");
            }
        }
        let Some(ty) = ResourceType::from_type_url(&request.type_url) else {
            // Not something this processor serves; Envoy asks only for what
            // its bootstrap says, so this is a foreign bootstrap.
            tracing::debug!(type_url = %request.type_url, "xDS request for a kind not served");
            return Ok(());
        };
        let subscription = self.subscriptions[ty as usize].get_or_insert_with(|| Subscription {
            names: Vec::new(),
            sent: None,
        });
        if let Some(sent) = &mut subscription.sent {
            if request.response_nonce != sent.nonce {
                // Stale (answers an older response) or a repeated first
                // request: the newest response answers it.
                if !request.response_nonce.is_empty()
                    || request.resource_names == subscription.names
                {
                    return Ok(());
                }
            } else if sent.accepted.is_none() {
                let accepted = request.error_detail.is_none();
                sent.accepted = Some(accepted);
                if let Some(error) = &request.error_detail {
                    self.served
                        .rejected(sent.version, ty, &self.node, &error.message);
                }
            }
        }
        let renamed = subscription.sent.is_none() || request.resource_names != subscription.names;
        if renamed {
            subscription.names = request.resource_names;
            self.send(ty, tx).await?;
        }
        self.check_accepted();
        Ok(())
    }

    async fn on_snapshot(
        &mut self,
        snapshot: Arc<Snapshot>,
        tx: &mpsc::Sender<Result<DiscoveryResponse, Status>>,
    ) -> Result<(), Closed> {
        self.snapshot = snapshot;
        for ty in ResourceType::ALL {
            let changed = match &self.subscriptions[ty as usize] {
                Some(Subscription {
                    names,
                    sent: Some(sent),
                }) => self.snapshot.resources.select(ty, names) != sent.resources,
                _ => false,
            };
            if changed {
                self.send(ty, tx).await?;
            }
        }
        self.check_accepted();
        Ok(())
    }

    async fn send(
        &mut self,
        ty: ResourceType,
        tx: &mpsc::Sender<Result<DiscoveryResponse, Status>>,
    ) -> Result<(), Closed> {
        let Some(subscription) = &mut self.subscriptions[ty as usize] else {
            return Ok(());
        };
        self.last_nonce += 1;
        let nonce = self.last_nonce.to_string();
        let resources = self.snapshot.resources.select(ty, &subscription.names);
        let response = DiscoveryResponse {
            version_info: self.snapshot.version.to_string(),
            resources: resources.iter().map(|r| r.body.clone()).collect(),
            type_url: ty.type_url().to_string(),
            nonce: nonce.clone(),
            ..Default::default()
        };
        subscription.sent = Some(Sent {
            nonce,
            version: self.snapshot.version,
            resources,
            accepted: None,
        });
        tx.send(Ok(response)).await.map_err(|_| Closed)
    }

    /// Once Envoy answered everything it was sent, it has answered the
    /// version served; once it accepted every kind of it (all three:
    /// routes are asked for once the listener arrived), it runs that
    /// version whole.
    fn check_accepted(&mut self) {
        let pending = self
            .subscriptions
            .iter()
            .flatten()
            .any(|s| s.sent.as_ref().is_some_and(|s| s.accepted.is_none()));
        if !pending && self.subscriptions.iter().any(Option::is_some) {
            self.following.answered(self.snapshot.version);
        }
        if self.acked == self.snapshot.version {
            return;
        }
        let whole = self.subscriptions.iter().all(|s| {
            s.as_ref()
                .and_then(|s| s.sent.as_ref())
                .is_some_and(|s| s.accepted == Some(true))
        });
        if whole {
            self.acked = self.snapshot.version;
            self.served.accepted(&self.snapshot, &self.node);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::metrics::Metrics;
    use crate::xds::ResourceSet;
    use envoy_types::pb::google::rpc::Status as RpcStatus;
    use std::path::Path;

    const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
    const LDS: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
    const RDS: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";

    fn config(backends: &[&str]) -> Config {
        let mut yaml = String::from("backends:\n");
        for b in backends {
            yaml.push_str(&format!(
                "  - {{name: {b}, url: 'http://10.0.0.1:1', api_key_file: k}}\n"
            ));
        }
        yaml.push_str(&format!(
            "models: [{{name: '*', backend: {}}}]\n",
            backends[0]
        ));
        Config::from_text(&yaml, Path::new("t.yaml")).unwrap()
    }

    fn served() -> Arc<ServedResources> {
        let metrics = Arc::new(Metrics::new().unwrap());
        Arc::new(ServedResources::new(&config(&["a"]), None, metrics).unwrap())
    }

    fn request(type_url: &str, nonce: &str, names: &[&str]) -> DiscoveryRequest {
        DiscoveryRequest {
            type_url: type_url.into(),
            response_nonce: nonce.into(),
            resource_names: names.iter().map(|n| n.to_string()).collect(),
            ..Default::default()
        }
    }

    fn nack(type_url: &str, nonce: &str) -> DiscoveryRequest {
        DiscoveryRequest {
            error_detail: Some(RpcStatus {
                code: 3,
                message: "no".into(),
                details: vec![],
            }),
            ..request(type_url, nonce, &[])
        }
    }

    /// A response as the tests see it: (kind, version, nonce, resources).
    type Row = (String, String, String, usize);

    /// The responses a stream sent so far.
    fn sent(rx: &mut mpsc::Receiver<Result<DiscoveryResponse, Status>>) -> Vec<Row> {
        let mut out = Vec::new();
        while let Ok(Ok(r)) = rx.try_recv() {
            let kind = r
                .type_url
                .rsplit('.')
                .next()
                .unwrap_or_default()
                .to_string();
            out.push((kind, r.version_info, r.nonce, r.resources.len()));
        }
        out
    }

    fn row(kind: &str, version: &str, nonce: &str, count: usize) -> Row {
        (kind.into(), version.into(), nonce.into(), count)
    }

    fn metric(served: &ServedResources, needle: &str) -> String {
        let text = String::from_utf8(served.metrics().render()).unwrap();
        text.lines()
            .find(|l| l.starts_with(needle))
            .unwrap_or_default()
            .to_string()
    }

    #[tokio::test]
    async fn first_requests_acks_and_stale_nonces() {
        let served = served();
        let (mut stream, _updates) = AdsStream::new(Arc::clone(&served));
        let (tx, mut rx) = mpsc::channel(16);
        // (request, what is sent in answer)
        let table: Vec<(DiscoveryRequest, Vec<Row>)> = vec![
            (request(CDS, "", &[]), vec![row("Cluster", "1", "1", 1)]),
            (request(LDS, "", &[]), vec![row("Listener", "1", "2", 1)]),
            // ACKs: nothing to send.
            (request(CDS, "1", &[]), vec![]),
            (request(LDS, "2", &[]), vec![]),
            (
                request(RDS, "", &["ai-gateway"]),
                vec![row("RouteConfiguration", "1", "3", 1)],
            ),
            // A name nobody serves: an empty list, as the protocol says.
            (
                request(RDS, "3", &["other"]),
                vec![row("RouteConfiguration", "1", "4", 0)],
            ),
            // Stale: answers nonce 3, 4 is out.
            (request(RDS, "3", &["ai-gateway"]), vec![]),
            (
                request(RDS, "4", &["ai-gateway"]),
                vec![row("RouteConfiguration", "1", "5", 1)],
            ),
            (request(RDS, "5", &["ai-gateway"]), vec![]),
            // Not a kind served here.
            (request("type.googleapis.com/envoy.Other", "", &[]), vec![]),
        ];
        for (i, (req, expected)) in table.into_iter().enumerate() {
            assert!(stream.on_request(req, &tx).await.is_ok());
            assert_eq!(sent(&mut rx), expected, "row {i}");
        }
        assert_eq!(stream.acked, 1);
        assert!(metric(&served, "ai_gateway_xds_version{state=\"acked\"}").ends_with(" 1"));
    }

    #[tokio::test]
    async fn a_change_sends_what_changed_and_a_nack_is_not_resent() {
        let served = served();
        let (mut stream, mut updates) = AdsStream::new(Arc::clone(&served));
        let (tx, mut rx) = mpsc::channel(16);
        for req in [
            request(CDS, "", &[]),
            request(LDS, "", &[]),
            request(RDS, "", &["ai-gateway"]),
            request(CDS, "1", &[]),
            request(LDS, "2", &[]),
            request(RDS, "3", &["ai-gateway"]),
        ] {
            assert!(stream.on_request(req, &tx).await.is_ok());
        }
        sent(&mut rx);

        // A second backend: a cluster and a route, the listener unchanged.
        let two = ResourceSet::render(&config(&["a", "b"]), None).unwrap();
        assert_eq!(served.publish(two.clone()), Some(2));
        assert_eq!(served.publish(two), None, "nothing new to serve");
        assert!(updates.has_changed().unwrap());
        let next = Arc::clone(&updates.borrow_and_update());
        assert!(stream.on_snapshot(next, &tx).await.is_ok());
        assert_eq!(
            sent(&mut rx),
            [
                row("Cluster", "2", "4", 2),
                row("RouteConfiguration", "2", "5", 1)
            ]
        );

        // Not answered yet: a reload waiting on it would wait.
        let patience = std::time::Duration::from_millis(10);
        assert!(!served.answered(2, patience).await);

        // Envoy rejects the clusters, accepts the routes.
        assert!(stream.on_request(nack(CDS, "4"), &tx).await.is_ok());
        assert!(stream
            .on_request(request(RDS, "5", &["ai-gateway"]), &tx)
            .await
            .is_ok());
        assert_eq!(sent(&mut rx), [], "a rejected version is not sent again");
        assert!(
            served.answered(2, patience).await,
            "a rejection is an answer"
        );
        assert_eq!(stream.acked, 1, "not accepted whole");
        assert!(metric(&served, "ai_gateway_xds_nacks_total").ends_with(" 1"));
        // An Envoy connecting now starts from the version accepted.
        let (fresh, _) = served.follow();
        assert_eq!(fresh.version, 1);

        // The next change is sent, and accepted.
        let three = ResourceSet::render(&config(&["a", "c"]), None).unwrap();
        assert_eq!(served.publish(three), Some(3));
        let next = Arc::clone(&updates.borrow_and_update());
        assert!(stream.on_snapshot(next, &tx).await.is_ok());
        assert_eq!(
            sent(&mut rx),
            [
                row("Cluster", "3", "6", 2),
                row("RouteConfiguration", "3", "7", 1)
            ]
        );
        for req in [request(CDS, "6", &[]), request(RDS, "7", &["ai-gateway"])] {
            assert!(stream.on_request(req, &tx).await.is_ok());
        }
        assert_eq!(stream.acked, 3);
        assert_eq!(served.follow().0.version, 3);
        assert_eq!(served.followers(), 1);
        drop(stream);
        assert_eq!(served.followers(), 0, "a stream gone no longer counts");
        assert!(served.answered(4, patience).await, "nobody to wait for");
    }
}
