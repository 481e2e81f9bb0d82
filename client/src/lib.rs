//! kvcache-client: what engines, workers, the CLI and load tests use to reach a cluster.
//!
//! - This file: [`Client::connect`] fetches the shard map through a [`CoordinatorLink`] (leader
//!   redirects, replica failover) and keeps it current with a `WatchShardMap` stream (never
//!   polling); [`Routing`] (kvcache-core) is one immutable map snapshot with the placement inputs
//!   ready. The connection pool: `connections_per_node` HTTP/2 channels per node, used in turn.
//! - `writes`: puts, appends and deletes to every live owner; they succeed when every reachable
//!   owner has them (an owner that cannot be reached is reported, not waited for); a stale-epoch
//!   refusal refreshes the map and retries only at the owners that have not acknowledged.
//! - `reads`: pages from the owners in order (then draining nodes, which still serve reads),
//!   failing over on UNAVAILABLE, deadline exceeded, a miss or a bad page; every page received is
//!   checked with `kvcache_core::validate::page`, the check a node applies to a write. Lookup and
//!   leases.
//! - `content`: prefix reuse — match the longest cached prefix, put and get pages by content
//!   key, each call one request per node placed on, all nodes at once.
//! - `state`: states of linear-attention and Mamba2 layers, put and read whole (a torn read is a
//!   miss), and their snapshots at page boundaries under content keys.
//! - `decode`: decode batches through the sticky attention workers.
//! - `answers`: the domain types the client answers with ([`FetchedPage`], [`Holding`],
//!   [`AppendAck`], [`DecodeOutput`]); `error`: [`ClientError`] (miss, invalid argument, unavailable with the nodes
//!   tried, permission denied, not found, bad page).
//! - [`zerocopy`]: GetPages decoded from the HTTP/2 frames as they arrived, so a page payload
//!   is a slice of the frame that carried it (tonic's decoder would copy it once more).

mod answers;
mod content;
mod decode;
mod error;
mod reads;
mod state;
mod writes;
pub mod zerocopy;

pub use answers::{
    AppendAck, AppendItem, DecodeOutput, DecodeStats, FetchedPage, Holding, LayerExtent, SequenceResult, SequenceStatus,
};
pub use content::{ContentPut, PrefixMatch, content_page, content_page_chained};
pub use error::ClientError;
pub(crate) use error::{retryable, stale_epoch, unknown_namespace};
pub use kvcache_core::routing::{NodeRef, Routing};
pub use kvcache_net::CoordinatorLink;
pub use writes::wire_page;

use bytes::Bytes;
use kvcache_core::validate::codec_to_wire;
use kvcache_core::{Namespace, PageKey, SequenceKey};
use kvcache_net::Channel;
use kvcache_proto::v1 as pb;
use kvcache_proto::v1::attention_worker_client::AttentionWorkerClient;
use kvcache_proto::v1::cache_node_client::CacheNodeClient;
use kvcache_proto::v1::coordinator_client::CoordinatorClient;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tonic::{Code, Status};

pub use kvcache_net::MAX_MESSAGE_BYTES;

/// Client settings.
#[derive(Clone)]
pub struct ClientConfig {
    /// Deadline of each RPC.
    pub timeout: Duration,
    /// Keep the map current with a watch stream (off: the map changes only on refresh, e.g.
    /// after a stale-epoch refusal; for short-lived tools).
    pub watch: bool,
    /// TLS of every channel (coordinator, nodes, workers); plaintext by default.
    pub tls: kvcache_net::Tls,
    /// HTTP/2 connections kept to each cache node, calls spread over them in turn. One
    /// connection is read and written by one task at a time on each end, so its page traffic
    /// uses one core of the node and one of the client whatever else is idle; a few let a
    /// client's concurrent pulls and puts use the cores on both ends (docs/BENCHMARKS.md).
    /// Connections open lazily, on their first call.
    pub connections_per_node: usize,
    /// The tenant's token, sent as `authorization: Bearer <token>` on every call (coordinator,
    /// nodes, workers) when the cluster has tenants. `None`: no credential (an open cluster).
    pub token: Option<String>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(10),
            watch: true,
            tls: kvcache_net::Tls::none(),
            connections_per_node: 4,
            token: None,
        }
    }
}

impl std::fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientConfig")
            .field("timeout", &self.timeout)
            .field("watch", &self.watch)
            .field("tls", &self.tls)
            .field("connections_per_node", &self.connections_per_node)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

struct Inner {
    /// Settings; the token, if any, already moved into `cfg.tls`.
    cfg: ClientConfig,
    /// Coordinator replicas and the watched shard map.
    link: CoordinatorLink,
    /// Per node and address: its connections and the next one to use.
    nodes: Mutex<HashMap<String, (Vec<Channel>, usize)>>,
    workers: Mutex<HashMap<String, AttentionWorkerClient<Channel>>>,
}

/// A handle on a cluster. Cheap to clone.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

/// A plaintext HTTP/2 channel tuned for page streams (lazy: connects on first use).
pub fn channel(addr: &str) -> Result<Channel, ClientError> {
    channel_with(addr, &kvcache_net::Tls::none())
}

/// [`channel`] over TLS when `tls` calls over TLS.
pub fn channel_with(addr: &str, tls: &kvcache_net::Tls) -> Result<Channel, ClientError> {
    kvcache_net::channel(addr, tls).map_err(|e| ClientError::InvalidArgument(e.to_string()))
}

impl Client {
    /// Connect to the coordinator at `addr`, fetch the shard map and start watching it.
    pub async fn connect(addr: &str) -> Result<Client, ClientError> {
        Self::connect_with(addr, ClientConfig::default()).await
    }

    /// [`Client::connect`] with settings.
    pub async fn connect_with(addr: &str, mut cfg: ClientConfig) -> Result<Client, ClientError> {
        if let Some(t) = cfg.token.take() {
            cfg.tls = cfg.tls.with_token(&t).map_err(|e| ClientError::InvalidArgument(format!("token: {e}")))?;
        }
        let link = CoordinatorLink::new(addr, &cfg.tls, cfg.timeout)
            .map_err(|e| ClientError::InvalidArgument(e.to_string()))?;
        let watch = cfg.watch;
        let client = Client {
            inner: Arc::new(Inner {
                cfg,
                link,
                nodes: Mutex::new(HashMap::new()),
                workers: Mutex::new(HashMap::new()),
            }),
        };
        client.refresh().await?;
        if watch {
            client.inner.link.watch();
        }
        Ok(client)
    }

    /// The current routing snapshot.
    pub fn routing(&self) -> Arc<Routing> {
        self.inner.link.routing()
    }

    /// The link to the coordinator this client follows.
    pub fn link(&self) -> &CoordinatorLink {
        &self.inner.link
    }

    /// Re-fetch the shard map now.
    pub async fn refresh(&self) -> Result<Arc<Routing>, ClientError> {
        Ok(self.inner.link.refresh().await?)
    }

    pub(crate) fn node(&self, node_id: &str, addr: &str) -> Result<CacheNodeClient<Channel>, ClientError> {
        let ch = self.node_channel(node_id, addr)?;
        Ok(CacheNodeClient::new(ch)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES))
    }

    /// A channel to a node: the next of its pooled connections, in turn.
    /// HTTP/2 connections kept to each node (`ClientConfig::connections_per_node`).
    pub fn connections_per_node(&self) -> usize {
        self.inner.cfg.connections_per_node.max(1)
    }

    pub(crate) fn node_channel(&self, node_id: &str, addr: &str) -> Result<Channel, ClientError> {
        let mut nodes = self.inner.nodes.lock();
        let key = format!("{node_id}@{addr}");
        if let Some((chans, next)) = nodes.get_mut(&key) {
            *next = (*next + 1) % chans.len();
            return Ok(chans[*next].clone());
        }
        let n = self.inner.cfg.connections_per_node.max(1);
        let chans = (0..n).map(|_| channel_with(addr, &self.inner.cfg.tls)).collect::<Result<Vec<_>, _>>()?;
        let c = chans[0].clone();
        nodes.insert(key, (chans, 0));
        Ok(c)
    }

    /// A request with the deadline and the current trace context.
    pub(crate) fn req<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        r.set_timeout(self.inner.cfg.timeout);
        kvcache_telemetry::trace::inject(&mut r);
        r
    }

    /// The coordinator client in use (the leader, once known).
    pub fn coordinator(&self) -> CoordinatorClient<Channel> {
        self.inner.link.client()
    }

    /// Run a coordinator call, following a follower's redirect to the leader and failing over
    /// across the configured replicas ([`CoordinatorLink::call`]).
    pub async fn coord<T, F, Fut>(&self, f: F) -> Result<T, Status>
    where
        F: Fn(CoordinatorClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        self.inner.link.call(f).await
    }

    /// A namespace from the current map.
    pub fn namespace(&self, name: &str) -> Option<Namespace> {
        self.routing().namespaces.get(name).cloned()
    }

    /// Create (or open, if identical) a namespace, and make sure every live node knows it.
    pub async fn create_namespace(&self, r: pb::CreateNamespaceRequest) -> Result<Namespace, ClientError> {
        let ns = self
            .coord(|mut c| {
                let r = r.clone();
                async move { c.create_namespace(r).await }
            })
            .await?
            .into_inner();
        let ns = Namespace::try_from(ns).map_err(|e| ClientError::Other {
            code: Code::Internal,
            message: format!("coordinator sent a bad namespace: {e}"),
        })?;
        let routing = self.refresh().await?;
        for n in routing.live_nodes() {
            let mut c = self.node(&n.node_id, &n.address)?;
            if let Err(e) = c.ensure_namespace(pb::EnsureNamespaceRequest { namespace: Some((&ns).into()) }).await {
                tracing::warn!(node = %n.node_id, error = %e, "could not push namespace to node");
            }
        }
        Ok(ns)
    }

    pub(crate) fn namespace_of(&self, seq: &SequenceKey) -> Result<Namespace, ClientError> {
        self.namespace(&seq.namespace)
            .ok_or_else(|| ClientError::NotFound(format!("unknown namespace {:?}", seq.namespace)))
    }

    /// Stats of every live node.
    pub async fn node_stats(&self) -> Vec<(String, Result<pb::NodeStats, ClientError>)> {
        let mut out = Vec::new();
        for n in self.routing().live_nodes() {
            let r = async {
                let mut c = self.node(&n.node_id, &n.address)?;
                Ok(c.stats(pb::StatsRequest {}).await?.into_inner())
            }
            .await;
            out.push((n.node_id.clone(), r));
        }
        out
    }
}
