//! kvcache-client: what engines, workers, the CLI and load tests use to reach a cluster.
//!
//! - [`Client::connect`] fetches the shard map through a [`CoordinatorLink`] (leader redirects,
//!   replica failover) and keeps it current with a `WatchShardMap` stream (never polling);
//!   [`Routing`] (kvcache-core) is one immutable map snapshot with the placement inputs ready.
//! - Calls are routed to the sequence's owners (top-R of weighted rendezvous over UP nodes) over a
//!   pool of one HTTP/2 channel per node. Writes go to every live owner and succeed when every
//!   reachable owner has them (an owner that cannot be reached is reported, not waited for); a
//!   stale-epoch refusal refreshes the map and retries once. Reads try owners in order (then
//!   draining nodes, which still serve reads) and fail over on UNAVAILABLE, deadline exceeded or a
//!   miss; every received payload's CRC-32C is checked.
//! - [`zerocopy`]: GetPages decoded from the HTTP/2 frames as they arrived, so a page payload
//!   is a slice of the frame that carried it (tonic's decoder would copy it once more).
//! - Errors reaching the caller are a [`ClientError`]: miss, invalid argument, unavailable (with
//!   the nodes tried), permission denied, not found.

pub mod zerocopy;

pub use kvcache_core::routing::{NodeRef, Routing};
pub use kvcache_net::CoordinatorLink;

use bytes::Bytes;
use kvcache_core::validate::{self, ValidationError, codec_to_wire};
use kvcache_core::{Namespace, PageKey, SequenceKey};
use kvcache_proto::v1 as pb;
use kvcache_proto::v1::attention_worker_client::AttentionWorkerClient;
use kvcache_proto::v1::cache_node_client::CacheNodeClient;
use kvcache_proto::v1::coordinator_client::CoordinatorClient;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tonic::transport::Channel;
use tonic::{Code, Status};

pub use kvcache_net::MAX_MESSAGE_BYTES;

/// A failure that reached the caller.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    /// The data is not in the cache (recompute).
    #[error("miss: {0}")]
    Miss(String),
    /// The request was malformed.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// No owner could serve the call.
    #[error("unavailable{}: {last}", if tried.is_empty() { String::new() } else { format!(" after trying {}", tried.join(", ")) })]
    Unavailable {
        /// Nodes tried, in order.
        tried: Vec<String>,
        /// The last error.
        last: String,
    },
    /// Not allowed.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// Unknown namespace or sequence.
    #[error("not found: {0}")]
    NotFound(String),
    /// A node sent a page that does not check out (wrong key, codec, size): a node bug or a
    /// corrupted stream. The read from that node is abandoned; other replicas may serve it.
    #[error("node {node} sent a bad page: {reason}")]
    BadPage {
        /// The node.
        node: String,
        /// What was wrong.
        reason: String,
    },
    /// Any other status.
    #[error("{0}")]
    Other(String),
}

impl From<Status> for ClientError {
    fn from(s: Status) -> Self {
        let m = s.message().to_owned();
        match s.code() {
            Code::InvalidArgument => Self::InvalidArgument(m),
            Code::PermissionDenied | Code::Unauthenticated => Self::PermissionDenied(m),
            Code::NotFound => Self::NotFound(m),
            Code::Unavailable | Code::DeadlineExceeded => Self::Unavailable { tried: vec![], last: m },
            _ => Self::Other(format!("{:?}: {m}", s.code())),
        }
    }
}

/// A node refusing a write routed with an older shard-map epoch than its own.
fn stale_epoch(s: &Status) -> bool {
    s.code() == Code::FailedPrecondition && s.metadata().get(kvcache_proto::metadata::EPOCH).is_some()
}

/// A node that has not learnt the namespace yet.
fn unknown_namespace(s: &Status) -> bool {
    kvcache_proto::metadata::is_unknown_namespace(s)
}

fn retryable(s: &Status) -> bool {
    matches!(s.code(), Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown | Code::Internal)
}

/// Client settings.
#[derive(Debug, Clone)]
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
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self { timeout: Duration::from_secs(10), watch: true, tls: kvcache_net::Tls::none(), connections_per_node: 4 }
    }
}

/// One append of [`Client::append_many`].
#[derive(Debug, Clone)]
pub struct AppendItem {
    /// The sequence.
    pub sequence: SequenceKey,
    /// One layer, or every layer (`None`).
    pub layer: Option<u32>,
    /// Tokens appended.
    pub tokens: u32,
    /// Their K/V (or latents) in page layout, per layer.
    pub payload: Bytes,
    /// Optional token ids, extending the prefix-hash chain.
    pub token_ids: Vec<u32>,
    /// Ask each owner for the layer's extent after the append (single-layer appends).
    pub return_extent: bool,
}

impl AppendItem {
    /// The AppendTokens request of this item, routed with `epoch`.
    fn request(&self, epoch: u64) -> pb::AppendTokensRequest {
        pb::AppendTokensRequest {
            epoch,
            sequence: Some((&self.sequence).into()),
            layer: self.layer.unwrap_or(0),
            all_layers: self.layer.is_none(),
            token_count: self.tokens,
            expected_position: None,
            payload: self.payload.clone(),
            token_ids: self.token_ids.clone(),
            return_extent: self.return_extent,
        }
    }
}

/// A node's answer to an append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppendAck {
    /// The node.
    pub node_id: String,
    /// Tokens each appended layer holds now, in the append's layer order.
    pub layer_tokens: Vec<u64>,
    /// write_seq of each appended layer's last page.
    pub last_page_write_seqs: Vec<u64>,
    /// The layer's extent after the append, when asked for (single-layer appends).
    pub extent: Option<LayerExtent>,
}

impl AppendAck {
    fn new(node_id: String, r: pb::AppendTokensResponse) -> Self {
        Self {
            node_id,
            layer_tokens: r.layer_tokens,
            last_page_write_seqs: r.last_page_write_seqs,
            extent: r.extent.map(LayerExtent::from),
        }
    }
}

/// What a node holds of one layer of a sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerExtent {
    /// The layer.
    pub layer: u32,
    /// Tokens held.
    pub tokens: u64,
    /// Pages held.
    pub pages: u32,
    /// write_seq of each page, by page index (0: missing).
    pub page_write_seqs: Vec<u64>,
}

impl From<pb::LayerExtent> for LayerExtent {
    fn from(l: pb::LayerExtent) -> Self {
        Self { layer: l.layer, tokens: l.tokens, pages: l.pages, page_write_seqs: l.page_write_seqs }
    }
}

/// A node's answer to a Lookup: what it holds of a sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holding {
    /// Whether the node holds the sequence at all.
    pub exists: bool,
    /// Per layer asked for: its extent.
    pub layers: Vec<LayerExtent>,
    /// Leading prefix hashes cached on the node (in any sequence of the namespace).
    pub prefix_pages_cached: u32,
}

impl From<pb::LookupResponse> for Holding {
    fn from(r: pb::LookupResponse) -> Self {
        Self {
            exists: r.exists,
            layers: r.layers.into_iter().map(LayerExtent::from).collect(),
            prefix_pages_cached: r.prefix_pages_cached,
        }
    }
}

/// A page read from a node, checked as the node checks a write (the key asked for, its
/// namespace's codec, a token count within the page size, a payload of exactly that many
/// tokens, the CRC).
#[derive(Debug, Clone)]
pub struct FetchedPage {
    /// Key.
    pub key: PageKey,
    /// Tokens in the page.
    pub token_count: u32,
    /// The node's write sequence number of the page (changes whenever the page does).
    pub write_seq: u64,
    /// Prefix hash (0 = none).
    pub prefix_hash: u64,
    /// Payload in the namespace's page layout.
    pub payload: Bytes,
}

struct Inner {
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
    pub async fn connect_with(addr: &str, cfg: ClientConfig) -> Result<Client, ClientError> {
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

    fn node(&self, node_id: &str, addr: &str) -> Result<CacheNodeClient<Channel>, ClientError> {
        let ch = self.node_channel(node_id, addr)?;
        Ok(CacheNodeClient::new(ch)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES))
    }

    /// A channel to a node: the next of its pooled connections, in turn.
    fn node_channel(&self, node_id: &str, addr: &str) -> Result<Channel, ClientError> {
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
    fn req<T>(&self, msg: T) -> tonic::Request<T> {
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
        let ns = Namespace::try_from(ns)
            .map_err(|e| ClientError::Other(format!("coordinator sent a bad namespace: {e}")))?;
        let routing = self.refresh().await?;
        for n in routing.live_nodes() {
            let mut c = self.node(&n.node_id, &n.address)?;
            if let Err(e) = c.ensure_namespace(pb::EnsureNamespaceRequest { namespace: Some((&ns).into()) }).await {
                tracing::warn!(node = %n.node_id, error = %e, "could not push namespace to node");
            }
        }
        Ok(ns)
    }

    /// Store pages (a prefill): each sequence's pages go to all of its live owners.
    pub async fn put_pages(&self, pages: Vec<pb::Page>) -> Result<(), ClientError> {
        let mut by_seq: HashMap<SequenceKey, Vec<pb::Page>> = HashMap::new();
        for p in pages {
            let key = p
                .key
                .clone()
                .and_then(|k| k.sequence)
                .ok_or_else(|| ClientError::InvalidArgument("page without a key".into()))?;
            let seq = SequenceKey::try_from(key).map_err(|e| ClientError::InvalidArgument(e.to_string()))?;
            by_seq.entry(seq).or_default().push(p);
        }
        let futs = by_seq.into_iter().map(|(seq, pages)| self.put_sequence_pages(seq, pages));
        for r in futures::future::join_all(futs).await {
            r?;
        }
        Ok(())
    }

    async fn put_sequence_pages(&self, seq: SequenceKey, pages: Vec<pb::Page>) -> Result<(), ClientError> {
        let ns = self.namespace_of(&seq)?;
        self.write_all_owners(&seq, &ns, |c, epoch| {
            let req = pb::PutPagesRequest { epoch, pages: pages.clone(), handoff: false };
            async move {
                let mut c = c;
                c.put_pages(tokio_stream::iter(vec![req])).await.map(|_| ())
            }
        })
        .await
        .map(|_| ())
    }

    fn namespace_of(&self, seq: &SequenceKey) -> Result<Namespace, ClientError> {
        self.namespace(&seq.namespace)
            .ok_or_else(|| ClientError::NotFound(format!("unknown namespace {:?}", seq.namespace)))
    }

    /// Run `op` against every live owner of `seq`; refresh and retry once on a stale epoch, and
    /// push the namespace to a node that does not know it yet. Succeeds when every reachable
    /// owner succeeded and at least one did.
    async fn write_all_owners<T, F, Fut>(
        &self,
        seq: &SequenceKey,
        ns: &Namespace,
        op: F,
    ) -> Result<Vec<(String, T)>, ClientError>
    where
        F: Fn(CacheNodeClient<Channel>, u64) -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        self.write_owners_after(seq, ns, Vec::new(), op).await
    }

    /// [`write_all_owners`](Self::write_all_owners) when the owners in `ok` have already
    /// acknowledged this write (in an [`append_many`](Self::append_many) batch).
    async fn write_owners_after<T, F, Fut>(
        &self,
        seq: &SequenceKey,
        ns: &Namespace,
        mut ok: Vec<(String, T)>,
        op: F,
    ) -> Result<Vec<(String, T)>, ClientError>
    where
        F: Fn(CacheNodeClient<Channel>, u64) -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        let mut routing = self.routing();
        // Owners that acknowledged stay acknowledged: a retry (after a stale-epoch refusal or an
        // unknown namespace at another owner) goes only to the owners still missing, so an
        // append that one owner applied is never applied there twice.
        for attempt in 0..3 {
            let owners: Vec<_> = routing
                .owners(seq, ns.replication as usize)
                .into_iter()
                .filter(|o| !ok.iter().any(|(id, _)| *id == o.node_id))
                .collect();
            if owners.is_empty() {
                if ok.is_empty() {
                    return Err(ClientError::Unavailable { tried: vec![], last: "no live cache node".into() });
                }
                return Ok(ok);
            }
            let mut futs = Vec::new();
            for o in &owners {
                let c = self.node(&o.node_id, &o.address)?;
                futs.push(op(c, routing.epoch));
            }
            let results = futures::future::join_all(futs).await;
            let mut stale = false;
            let mut unknown_ns = Vec::new();
            let mut unreachable = Vec::new();
            for (o, r) in owners.iter().zip(results) {
                match r {
                    Ok(v) => ok.push((o.node_id.clone(), v)),
                    Err(s) if stale_epoch(&s) => stale = true,
                    Err(s) if unknown_namespace(&s) => unknown_ns.push(o.clone()),
                    Err(s) if retryable(&s) => unreachable.push((o.node_id.clone(), s.message().to_owned())),
                    Err(s) => return Err(s.into()),
                }
            }
            if stale && attempt < 2 {
                routing = self.refresh().await?;
                continue;
            }
            if !unknown_ns.is_empty() && attempt < 2 {
                for o in unknown_ns {
                    let mut c = self.node(&o.node_id, &o.address)?;
                    c.ensure_namespace(pb::EnsureNamespaceRequest { namespace: Some(ns.into()) }).await?;
                }
                continue;
            }
            if ok.is_empty() || stale {
                let tried = owners.iter().map(|o| o.node_id.clone()).collect();
                let last = unreachable.last().map(|u| u.1.clone()).unwrap_or_else(|| "stale shard map".into());
                return Err(ClientError::Unavailable { tried, last });
            }
            if !unreachable.is_empty() {
                tracing::warn!(sequence = %seq.sequence_id, unreachable = ?unreachable, "write reached only some owners");
            }
            return Ok(ok);
        }
        Err(ClientError::Unavailable { tried: vec![], last: "retries exhausted".into() })
    }

    /// Append the K/V (or latent) of `tokens` new tokens to one layer (or all, `layer = None`).
    /// Returns each owner's answer.
    pub async fn append(
        &self,
        seq: &SequenceKey,
        layer: Option<u32>,
        tokens: u32,
        payload: Bytes,
        token_ids: Vec<u32>,
    ) -> Result<Vec<AppendAck>, ClientError> {
        let item = AppendItem { sequence: seq.clone(), layer, tokens, payload, token_ids, return_extent: false };
        self.append_inner(&item, Vec::new()).await
    }

    /// [`append`](Self::append) to one layer, each owner also answering with the layer's extent
    /// after the append (`AppendTokensResponse.extent`): what a reader that caches the sequence
    /// needs to validate its copy without a separate `Lookup`.
    pub async fn append_with_extent(
        &self,
        seq: &SequenceKey,
        layer: u32,
        tokens: u32,
        payload: Bytes,
        token_ids: Vec<u32>,
    ) -> Result<Vec<AppendAck>, ClientError> {
        let item =
            AppendItem { sequence: seq.clone(), layer: Some(layer), tokens, payload, token_ids, return_extent: true };
        self.append_inner(&item, Vec::new()).await
    }

    /// Several appends, in one `AppendBatch` call per owning node rather than one call per
    /// append and owner (a decode step's new tokens for its whole batch). Each item ends as
    /// [`append`](Self::append) (or [`append_with_extent`](Self::append_with_extent)) would end
    /// it: an owner that refused the item as stale, did not know its namespace or could not be
    /// reached is retried for that item through the single-append path, and only the owners
    /// that have not acknowledged it, so no owner applies an item twice. Results in item order.
    pub async fn append_many(&self, items: Vec<AppendItem>) -> Vec<Result<Vec<AppendAck>, ClientError>> {
        let routing = self.routing();
        let mut results: Vec<Option<Result<Vec<AppendAck>, ClientError>>> = (0..items.len()).map(|_| None).collect();
        // Per node: its address and the items it owns.
        let mut per_node: Vec<(NodeRef, Vec<usize>)> = Vec::new();
        for (i, it) in items.iter().enumerate() {
            let ns = match self.namespace_of(&it.sequence) {
                Ok(ns) => ns,
                Err(e) => {
                    results[i] = Some(Err(e));
                    continue;
                }
            };
            for o in routing.owners(&it.sequence, ns.replication as usize) {
                match per_node.iter_mut().find(|(n, _)| n.node_id == o.node_id) {
                    Some((_, v)) => v.push(i),
                    None => per_node.push((o, vec![i])),
                }
            }
        }
        let calls = per_node.iter().map(|(node, idx)| {
            let req =
                pb::AppendBatchRequest { appends: idx.iter().map(|&i| items[i].request(routing.epoch)).collect() };
            let req = self.req(req);
            let c = self.node(&node.node_id, &node.address);
            async move {
                let mut c = c.map_err(|e| Status::unavailable(e.to_string()))?;
                let got = c.append_batch(req).await?.into_inner().results;
                if got.len() != idx.len() {
                    return Err(Status::internal(format!("{} answers to {} appends", got.len(), idx.len())));
                }
                Ok(got)
            }
        });
        let answers = futures::future::join_all(calls).await;
        // Per item: the owners that acknowledged it, and the refusals.
        let mut acked: Vec<Vec<(String, pb::AppendTokensResponse)>> = (0..items.len()).map(|_| Vec::new()).collect();
        let mut refused: Vec<Vec<Status>> = (0..items.len()).map(|_| Vec::new()).collect();
        for ((node, idx), answer) in per_node.iter().zip(answers) {
            match answer {
                Ok(got) => {
                    for (&i, r) in idx.iter().zip(got) {
                        match (r.code, r.response) {
                            (0, Some(resp)) => acked[i].push((node.node_id.clone(), resp)),
                            (code, _) => {
                                let mut s = Status::new(Code::from_i32(code), r.message);
                                if let Some(e) = r.node_epoch.and_then(|e| e.to_string().parse().ok()) {
                                    s.metadata_mut().insert(kvcache_proto::metadata::EPOCH, e);
                                }
                                if let Some(v) =
                                    Some(&r.not_found).filter(|v| !v.is_empty()).and_then(|v| v.parse().ok())
                                {
                                    s.metadata_mut().insert(kvcache_proto::metadata::NOT_FOUND, v);
                                }
                                refused[i].push(s);
                            }
                        }
                    }
                }
                Err(s) => idx.iter().for_each(|&i| refused[i].push(s.clone())),
            }
        }
        let mut retries = Vec::new();
        for (i, it) in items.into_iter().enumerate() {
            // Already answered: its namespace is unknown.
            if results[i].is_some() {
                continue;
            }
            let (ok, refused) = (std::mem::take(&mut acked[i]), std::mem::take(&mut refused[i]));
            if let Some(s) = refused
                .iter()
                .find(|s| !(stale_epoch(s) || unknown_namespace(s) || retryable(s) || s.code() == Code::Unimplemented))
            {
                results[i] = Some(Err(s.clone().into()));
            } else if refused.is_empty() && !ok.is_empty() {
                results[i] =
                    Some(Ok(ok.into_iter().map(|(node_id, response)| AppendAck::new(node_id, response)).collect()));
            } else {
                retries.push(async move {
                    let r = self.append_inner(&it, ok).await;
                    (i, r)
                });
            }
        }
        for (i, r) in futures::future::join_all(retries).await {
            results[i] = Some(r);
        }
        results.into_iter().map(|r| r.expect("every item answered")).collect()
    }

    /// One append through AppendTokens to every owner not in `acked` (owners that already
    /// applied it).
    async fn append_inner(
        &self,
        item: &AppendItem,
        acked: Vec<(String, pb::AppendTokensResponse)>,
    ) -> Result<Vec<AppendAck>, ClientError> {
        let ns = self.namespace_of(&item.sequence)?;
        let acks = self
            .write_owners_after(&item.sequence, &ns, acked, |c, epoch| {
                let req = self.req(item.request(epoch));
                async move {
                    let mut c = c;
                    c.append_tokens(req).await.map(|r| r.into_inner())
                }
            })
            .await?;
        Ok(acks.into_iter().map(|(node_id, response)| AppendAck::new(node_id, response)).collect())
    }

    /// Delete a sequence on every node that may hold it.
    pub async fn delete(&self, seq: &SequenceKey) -> Result<u64, ClientError> {
        let ns = self.namespace_of(seq)?;
        let acks = self
            .write_all_owners(seq, &ns, |c, epoch| {
                let req = pb::DeleteSequenceRequest { epoch, sequence: Some(seq.into()) };
                async move {
                    let mut c = c;
                    c.delete_sequence(req).await.map(|r| r.into_inner().pages_deleted)
                }
            })
            .await?;
        Ok(acks.iter().map(|a| a.1).max().unwrap_or(0))
    }

    /// Read candidates of a sequence: its live owners, then draining nodes (still serving reads).
    pub fn read_candidates(&self, seq: &SequenceKey) -> Vec<NodeRef> {
        let r = self.routing();
        let reps = self.namespace(&seq.namespace).map_or(1, |n| n.replication as usize);
        r.read_candidates(seq, reps)
    }

    /// Read pages, in order: `None` is a miss. Fails over across owners per sequence.
    pub async fn get_pages(&self, keys: &[PageKey]) -> Result<Vec<Option<FetchedPage>>, ClientError> {
        let mut out: Vec<Option<FetchedPage>> = vec![None; keys.len()];
        let mut by_seq: HashMap<&SequenceKey, Vec<usize>> = HashMap::new();
        for (i, k) in keys.iter().enumerate() {
            by_seq.entry(&k.sequence).or_default().push(i);
        }
        for (seq, idx) in by_seq {
            let cands = self.read_candidates(seq);
            let mut want = idx;
            let mut tried = Vec::new();
            let mut last_err = None;
            for node in cands {
                if want.is_empty() {
                    break;
                }
                tried.push(node.node_id.clone());
                let sub: Vec<PageKey> = want.iter().map(|&i| keys[i].clone()).collect();
                match self.get_from(&node, &sub).await {
                    Ok(got) => {
                        let mut still = Vec::new();
                        for (i, p) in want.into_iter().zip(got) {
                            match p {
                                Some(p) => out[i] = Some(p),
                                None => still.push(i),
                            }
                        }
                        want = still;
                    }
                    Err(e) => last_err = Some(e),
                }
            }
            if !want.is_empty()
                && let Some(ClientError::Unavailable { last, .. }) = last_err
                && tried.len() == self.read_candidates(seq).len()
                && want.len() == keys.iter().filter(|k| &k.sequence == seq).count()
            {
                return Err(ClientError::Unavailable { tried, last });
            }
        }
        Ok(out)
    }

    /// Read pages from one node: `None` is a miss (or a payload that failed its CRC).
    pub async fn get_from(&self, node: &NodeRef, keys: &[PageKey]) -> Result<Vec<Option<FetchedPage>>, ClientError> {
        self.get_from_into(node, keys, |b| b).await
    }

    /// [`Self::get_from`] with each verified payload passed through `place` as its response
    /// message arrives, while the rest of the stream is still coming in (a worker copies pages
    /// into its cache memory there, so the copy overlaps the transfer and each received frame
    /// buffer is released early).
    ///
    /// Every page is validated with `kvcache_core::validate::page`, the check a node applies to
    /// a write, and must carry the key asked for: a payload whose CRC fails is a miss; anything
    /// else wrong is [`ClientError::BadPage`].
    pub async fn get_from_into(
        &self,
        node: &NodeRef,
        keys: &[PageKey],
        mut place: impl FnMut(Bytes) -> Bytes,
    ) -> Result<Vec<Option<FetchedPage>>, ClientError> {
        let mut routing = self.routing();
        if let Some(k) = keys.iter().find(|k| !routing.namespaces.contains_key(&k.sequence.namespace)) {
            routing = self.refresh().await?;
            if !routing.namespaces.contains_key(&k.sequence.namespace) {
                return Err(ClientError::NotFound(format!("unknown namespace {:?}", k.sequence.namespace)));
            }
        }
        let ch = self.node_channel(&node.node_id, &node.address)?;
        let req = self.req(pb::GetPagesRequest { keys: keys.iter().map(|k| k.into()).collect(), ranges: vec![] });
        let mut out: Vec<Option<FetchedPage>> = Vec::with_capacity(keys.len());
        let mut bad: Option<String> = None;
        let r = zerocopy::get_pages(ch, req, MAX_MESSAGE_BYTES, |m| {
            for item in m.items {
                let want = keys.get(out.len());
                let page = match (item.status, item.page) {
                    (s, Some(p)) if s == pb::PageStatus::Ok as i32 => {
                        let write_seq = p.write_seq;
                        match validate::page(p, |n| routing.namespaces.get(n)) {
                            Ok((_, v)) if Some(&v.key) == want => Some(FetchedPage {
                                key: v.key,
                                token_count: v.token_count,
                                write_seq,
                                prefix_hash: v.prefix_hash,
                                payload: place(v.payload),
                            }),
                            Ok((_, v)) => {
                                bad.get_or_insert(format!("asked for {want:?}, got {:?}", v.key));
                                None
                            }
                            // Corrupted in flight or at rest: a miss, as a node treats it.
                            Err(validate::PageRejection::Invalid(ValidationError::Checksum { .. })) => None,
                            Err(e) => {
                                bad.get_or_insert(e.to_string());
                                None
                            }
                        }
                    }
                    (s, _) if s == pb::PageStatus::Invalid as i32 => {
                        return Err(Status::invalid_argument(item.message));
                    }
                    _ => None,
                };
                out.push(page);
            }
            Ok(())
        })
        .await;
        if let Some(reason) = bad {
            tracing::warn!(node = %node.node_id, %reason, "a node sent a bad page");
            return Err(ClientError::BadPage { node: node.node_id.clone(), reason });
        }
        match r {
            Ok(()) if out.len() == keys.len() => Ok(out),
            Ok(()) => Err(ClientError::Unavailable {
                tried: vec![node.node_id.clone()],
                last: format!("stream ended after {} of {} pages", out.len(), keys.len()),
            }),
            Err(s) if retryable(&s) => {
                Err(ClientError::Unavailable { tried: vec![node.node_id.clone()], last: s.message().to_owned() })
            }
            Err(s) => Err(s.into()),
        }
    }

    /// Lookup on one node.
    pub async fn lookup_on(
        &self,
        node: &NodeRef,
        seq: &SequenceKey,
        prefix_hashes: Vec<u64>,
        layer: Option<u32>,
    ) -> Result<Holding, ClientError> {
        let mut c = self.node(&node.node_id, &node.address)?;
        let req = pb::LookupRequest { sequence: Some(seq.into()), prefix_hashes, layer };
        Ok(c.lookup(self.req(req)).await?.into_inner().into())
    }

    /// Lookup on the first owner that answers: which pages exist, and the longest cached prefix.
    pub async fn lookup(&self, seq: &SequenceKey, prefix_hashes: Vec<u64>) -> Result<Holding, ClientError> {
        let mut tried = Vec::new();
        let mut last = String::from("no live cache node");
        for n in self.read_candidates(seq) {
            tried.push(n.node_id.clone());
            match self.lookup_on(&n, seq, prefix_hashes.clone(), None).await {
                Ok(r) => return Ok(r),
                Err(ClientError::Unavailable { last: l, .. }) => last = l,
                Err(e) => return Err(e),
            }
        }
        Err(ClientError::Unavailable { tried, last })
    }

    /// Pin a sequence on its first owner for `ttl`. Returns (node, lease id).
    pub async fn lease(&self, seq: &SequenceKey, ttl: Duration) -> Result<(NodeRef, u64), ClientError> {
        let node = self
            .read_candidates(seq)
            .into_iter()
            .next()
            .ok_or_else(|| ClientError::Unavailable { tried: vec![], last: "no live cache node".into() })?;
        let id = self.lease_on(&node, seq, ttl).await?;
        Ok((node, id))
    }

    /// Pin a sequence on `node` for `ttl`. Returns the lease id.
    pub async fn lease_on(&self, node: &NodeRef, seq: &SequenceKey, ttl: Duration) -> Result<u64, ClientError> {
        let mut c = self.node(&node.node_id, &node.address)?;
        let ttl_ms = ttl.as_millis().min(u32::MAX as u128) as u32;
        let r = c.lease(self.req(pb::LeaseRequest { sequence: Some(seq.into()), ttl_ms })).await?.into_inner();
        Ok(r.lease_id)
    }

    /// Release a lease taken with [`Client::lease`].
    pub async fn release(&self, node: &NodeRef, lease_id: u64) -> Result<bool, ClientError> {
        let mut c = self.node(&node.node_id, &node.address)?;
        Ok(c.release(pb::ReleaseRequest { lease_id }).await?.into_inner().released)
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

    /// Send a decode batch, each sequence to its sticky worker (rendezvous over the registered
    /// workers), and reassemble the results in request order.
    #[tracing::instrument(target = "kvcache::client", name = "client.decode", skip_all, fields(namespace = %req.namespace, layer = req.layer, sequences = req.items.len()))]
    pub async fn decode(&self, req: pb::DecodeRequest) -> Result<pb::DecodeResponse, ClientError> {
        let routing = self.routing();
        if routing.workers.is_empty() {
            return Err(ClientError::Unavailable { tried: vec![], last: "no worker registered".into() });
        }
        let mut groups: HashMap<usize, Vec<usize>> = HashMap::new();
        for (i, it) in req.items.iter().enumerate() {
            let seq = SequenceKey::new(req.namespace.clone(), it.sequence_id.clone());
            groups.entry(routing.worker_for(&seq)).or_default().push(i);
        }
        let mut futs = Vec::new();
        for (w, idx) in groups {
            let info = routing.workers[w].clone();
            let sub = pb::DecodeRequest {
                namespace: req.namespace.clone(),
                layer: req.layer,
                items: idx.iter().map(|&i| req.items[i].clone()).collect(),
                softmax_scale: req.softmax_scale,
            };
            let mut c = self.worker(&info)?;
            let r = self.req(sub);
            futs.push(async move { (idx, info.worker_id, c.decode(r).await) });
        }
        let mut results: Vec<Option<pb::DecodeResult>> = vec![None; req.items.len()];
        let mut stats = pb::DecodeStats::default();
        for (idx, worker, r) in futures::future::join_all(futs).await {
            let r = r.map_err(|s| match ClientError::from(s) {
                ClientError::Unavailable { last, .. } => ClientError::Unavailable { tried: vec![worker.clone()], last },
                e => e,
            })?;
            let r = r.into_inner();
            if let Some(s) = r.stats {
                stats.bytes_pulled += s.bytes_pulled;
                stats.pages_pulled += s.pages_pulled;
                stats.pages_cached += s.pages_cached;
                stats.compute_micros = stats.compute_micros.max(s.compute_micros);
                stats.fetch_micros = stats.fetch_micros.max(s.fetch_micros);
            }
            for (i, res) in idx.into_iter().zip(r.results) {
                results[i] = Some(res);
            }
        }
        Ok(pb::DecodeResponse {
            results: results.into_iter().map(|r| r.unwrap_or_default()).collect(),
            stats: Some(stats),
        })
    }

    fn worker(&self, w: &kvcache_core::routing::WorkerRef) -> Result<AttentionWorkerClient<Channel>, ClientError> {
        let mut ws = self.inner.workers.lock();
        if let Some(c) = ws.get(&w.address) {
            return Ok(c.clone());
        }
        let c = AttentionWorkerClient::new(channel_with(&w.address, &self.inner.cfg.tls)?)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        ws.insert(w.address.clone(), c.clone());
        Ok(c)
    }
}

/// Build a wire page from its parts, computing the CRC.
pub fn wire_page(ns: &Namespace, key: &PageKey, token_count: u32, prefix_hash: u64, payload: Bytes) -> pb::Page {
    pb::Page {
        key: Some(key.into()),
        codec: codec_to_wire(ns.codec),
        token_count,
        write_seq: 0,
        payload_crc32c: kvcache_core::checksum::crc32c(&payload),
        prefix_hash,
        payload,
    }
}
