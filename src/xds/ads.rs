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
use super::served::ServedResources;
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
        let stream = AdsStream::new(Arc::clone(&self.served));
        tokio::spawn(stream.run(request.into_inner(), tx, self.shutdown.clone()));
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
    fn new(served: Arc<ServedResources>) -> Self {
        let (snapshot, _) = served.follow();
        Self {
            served,
            snapshot,
            subscriptions: [None, None, None],
            last_nonce: 0,
            acked: 0,
            node: String::new(),
        }
    }

    async fn run(
        mut self,
        mut inbound: Streaming<DiscoveryRequest>,
        tx: mpsc::Sender<Result<DiscoveryResponse, Status>>,
        stop: watch::Receiver<bool>,
    ) {
        let (first, mut updates) = self.served.follow();
        self.snapshot = first;
        self.served.metrics().xds_stream(1);
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
        self.served.metrics().xds_stream(-1);
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

    /// Once Envoy accepted every kind of the version served (all three:
    /// routes are asked for once the listener arrived), it runs that
    /// version whole.
    fn check_accepted(&mut self) {
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
