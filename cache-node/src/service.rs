//! The `CacheNode` gRPC service. Every store error becomes a status here, in [`status`], and
//! nowhere else.

use crate::metrics::NodeMetrics;
use crate::store::{Durability, PageStore, PutMode, StoreError};
use kvcache_core::validate::{self, ValidationError};
use kvcache_core::{ContentKey, Namespace, PageKey, SequenceKey};
use kvcache_net::{Auth, Caller};
use kvcache_proto::v1 as pb;
use kvcache_proto::v1::cache_node_server::CacheNode;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

/// Most page keys one GetPages may ask for.
pub const MAX_GET_ITEMS: usize = 1 << 20;
/// Longest lease.
const MAX_LEASE: Duration = Duration::from_secs(3600);
/// Most keys one MatchPrefix may ask about (a 4M-token prompt of 64-token pages).
pub const MAX_MATCH_KEYS: usize = 1 << 16;
/// MatchPrefix calls of at most this many keys are answered without a blocking-pool hop.
const INLINE_MATCH_KEYS: usize = 4096;
/// Longest pin a MatchPrefix may ask for.
const MAX_MATCH_LEASE: Duration = Duration::from_secs(600);

/// Map a store error to the status the contract defines (common.proto).
pub fn status(e: StoreError) -> Status {
    match e {
        StoreError::Invalid(v) => Status::invalid_argument(v.to_string()),
        StoreError::UnknownNamespace(_) => {
            kvcache_proto::metadata::not_found(kvcache_proto::metadata::NOT_FOUND_NAMESPACE, e.to_string())
        }
        StoreError::NoSequence(_) => {
            kvcache_proto::metadata::not_found(kvcache_proto::metadata::NOT_FOUND_SEQUENCE, e.to_string())
        }
        StoreError::NamespaceConflict(_) => Status::already_exists(e.to_string()),
        StoreError::StaleEpoch { current, .. } => {
            let mut s = Status::failed_precondition(e.to_string());
            if let Ok(v) = current.to_string().parse() {
                s.metadata_mut().insert(kvcache_proto::metadata::EPOCH, v);
            }
            s
        }
        StoreError::Position { .. } | StoreError::ContentConflict { .. } | StoreError::SequenceExists(_) => {
            Status::failed_precondition(e.to_string())
        }
        StoreError::Full(_) | StoreError::Quota { .. } => Status::resource_exhausted(e.to_string()),
        StoreError::Io(_) | StoreError::DataDir(_) => Status::unavailable(e.to_string()),
        StoreError::PartialPageLost(_) => Status::data_loss(e.to_string()),
    }
}

fn invalid(e: ValidationError) -> Status {
    Status::invalid_argument(e.to_string())
}

/// The CacheNode service over a [`PageStore`].
pub struct NodeService {
    store: Arc<PageStore>,
    node_id: String,
    pub(crate) metrics: Arc<NodeMetrics>,
    /// Every task a call spawns (streamed responses): shutdown waits for them.
    pub(crate) tasks: tokio_util::task::TaskTracker,
    /// The tenants (their byte rates; who the caller is comes from the server's layer).
    pub(crate) auth: Auth,
    /// The coordinator, when in a cluster: a tenant's EnsureNamespace must match its map.
    link: Option<kvcache_net::CoordinatorLink>,
}

impl NodeService {
    /// Serve `store` as `node_id`, counting into `metrics`, open to every caller.
    pub fn new(store: Arc<PageStore>, node_id: String, metrics: Arc<NodeMetrics>) -> Self {
        Self { store, node_id, metrics, tasks: tokio_util::task::TaskTracker::new(), auth: Auth::open(), link: None }
    }

    /// Enforce `auth`'s byte rates; check tenants' EnsureNamespace against `link`'s map.
    pub fn with_tenants(mut self, auth: Auth, link: Option<kvcache_net::CoordinatorLink>) -> Self {
        self.auth = auth;
        self.link = link;
        self
    }

    /// NOT_FOUND for an unknown namespace, PERMISSION_DENIED for another tenant's.
    pub(crate) fn check_namespace(&self, caller: &Caller, namespace: &str) -> Result<(), Status> {
        if caller.is_trusted() {
            return Ok(());
        }
        let ns =
            self.store.namespace(namespace).ok_or_else(|| status(StoreError::UnknownNamespace(namespace.into())))?;
        caller.check_namespace(namespace, &ns.ns.tenant)
    }

    /// [`NodeService::check_namespace`] for each distinct namespace of `names` (in runs).
    fn check_namespaces<'a>(&self, caller: &Caller, names: impl Iterator<Item = &'a str>) -> Result<(), Status> {
        if caller.is_trusted() {
            return Ok(());
        }
        let mut last: Option<&str> = None;
        for n in names {
            if last != Some(n) {
                self.check_namespace(caller, n)?;
                last = Some(n);
            }
        }
        Ok(())
    }

    /// Whether the coordinator defines `ns` exactly so (refreshing its map once if it does not
    /// know the name yet); true outside a cluster.
    async fn coordinator_defines(&self, ns: &Namespace) -> bool {
        let Some(link) = &self.link else { return true };
        let same = |r: &kvcache_core::Routing| r.namespaces.get(&ns.name).is_some_and(|n| n.same_definition(ns));
        if same(&link.routing()) {
            return true;
        }
        match link.refresh().await {
            Ok(r) => same(&r),
            Err(_) => false,
        }
    }
}

/// Writes run on the async thread that received them instead of the blocking pool when they
/// are small and the page cache takes them without waiting. Each costs the payloads' checksum
/// and a copy into the page cache, with the bytes still in this core's cache from the socket
/// read; the pool's hand-off wakes another thread, which reads them again from the other core
/// (measured in `bench node`: node CPU per GB of puts 0.67–0.70 → 0.54–0.60 s at 64 KiB pages,
/// 0.61–0.66 → 0.49–0.53 s at 256 KiB; docs/BENCHMARKS.md). Never under sync durability (each
/// write waits for msync), nor while the node's writeback backlog is large (the kernel may
/// throttle the write).
///
/// Appends: a decode step's tokens for a few sequences (a copy-on-write of one partial page
/// each, 12–90 µs measured).
const INLINE_APPEND_BYTES: usize = 64 << 10;
/// At most this many appends inline (an AppendBatch of more goes to the pool in one hand-off).
const INLINE_APPENDS: usize = 4;
/// Puts: one PutPages message of up to this many payload bytes (eight 256 KiB pages: a few
/// hundred µs of checksum and copy at most).
const INLINE_PUT_BYTES: usize = 2 << 20;

fn inline_write(store: &PageStore, payload_bytes: usize, limit: usize) -> bool {
    static BACKLOG_LIMIT: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    store.config().durability == Durability::Async
        && payload_bytes <= limit
        && store.writeback_backlog() <= *BACKLOG_LIMIT.get_or_init(inline_backlog_limit)
}

/// Unflushed bytes beyond which writes go to the blocking pool: the kernel's background
/// writeback threshold (`vm.dirty_background_bytes`, or `vm.dirty_background_ratio` of the
/// memory of the host or of the container's memory cgroup, whichever is smaller). The kernel
/// throttles writers only above the midpoint of that and `vm.dirty_ratio`, so below it an
/// inline write only copies; past it the writes wait on the pool's threads, not the runtime's.
fn inline_backlog_limit() -> u64 {
    let read = |p: &str| std::fs::read_to_string(p).ok().and_then(|s| s.trim().parse::<u64>().ok());
    if let Some(b) = read("/proc/sys/vm/dirty_background_bytes").filter(|&b| b > 0) {
        return b;
    }
    let ratio = read("/proc/sys/vm/dirty_background_ratio").unwrap_or(10);
    let total = mem_total_bytes();
    let cgroup = read("/sys/fs/cgroup/memory.max").or_else(|| read("/sys/fs/cgroup/memory/memory.limit_in_bytes"));
    let memory = match (total, cgroup) {
        (Some(t), Some(c)) => t.min(c),
        (Some(t), None) => t,
        (None, Some(c)) => c,
        (None, None) => return 0, // unknown: every write takes the pool
    };
    memory / 100 * ratio
}

/// The host's memory, from `/proc/meminfo`.
fn mem_total_bytes() -> Option<u64> {
    let m = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 =
        m.lines().find_map(|l| l.strip_prefix("MemTotal:"))?.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kib * 1024)
}

fn inline_append(store: &PageStore, appends: usize, payload_bytes: usize) -> bool {
    appends <= INLINE_APPENDS && inline_write(store, payload_bytes, INLINE_APPEND_BYTES)
}

/// Most appends one AppendBatch may carry.
pub const MAX_BATCH_APPENDS: usize = 4096;

/// Tokens one GetRows may ask for.
pub const MAX_ROWS: usize = 65_536;

/// One append as AppendTokens applies it, answered with the layer's extent when asked.
fn append_one(store: &PageStore, r: pb::AppendTokensRequest) -> Result<pb::AppendTokensResponse, Status> {
    let seq = sequence(r.sequence)?;
    store.check_epoch(r.epoch).map_err(status)?;
    let layer = if r.all_layers { None } else { Some(r.layer) };
    let ns =
        store.namespace(&seq.namespace).ok_or_else(|| status(StoreError::UnknownNamespace(seq.namespace.clone())))?;
    let cmd = validate::append(&ns.ns, seq, layer, r.token_count, r.payload, r.expected_position).map_err(invalid)?;
    let seq = &cmd.sequence;
    let tokens = store.append(&cmd).map_err(status)?;
    // Read after the append, like a Lookup that follows it: a concurrent writer's newer pages
    // show up as newer write_seqs, never as stale ones.
    let extent = match layer {
        Some(l) if r.return_extent => store.lookup(seq, &[], Some(l)).map_err(status)?.1.into_iter().next(),
        _ => None,
    };
    Ok(pb::AppendTokensResponse {
        layer_tokens: tokens.iter().map(|a| a.tokens).collect(),
        last_page_write_seqs: tokens.iter().map(|a| a.last_write_seq).collect(),
        extent: extent.map(pb::LayerExtent::from),
    })
}

/// An append's outcome as an AppendBatch item: the status AppendTokens would have answered,
/// with a stale epoch's node epoch carried in the item instead of metadata.
fn append_result(r: Result<pb::AppendTokensResponse, Status>) -> pb::AppendResult {
    match r {
        Ok(response) => pb::AppendResult { code: 0, response: Some(response), ..Default::default() },
        Err(s) => pb::AppendResult {
            code: s.code() as i32,
            message: s.message().to_owned(),
            response: None,
            node_epoch: s
                .metadata()
                .get(kvcache_proto::metadata::EPOCH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok()),
            not_found: s
                .metadata()
                .get(kvcache_proto::metadata::NOT_FOUND)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned(),
        },
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, StoreError> + Send + 'static) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("store task failed: {e}")))?
        .map_err(status)
}

impl From<crate::store::LayerExtent> for pb::LayerExtent {
    fn from(l: crate::store::LayerExtent) -> Self {
        pb::LayerExtent {
            layer: l.layer,
            tokens: l.tokens,
            pages: l.pages,
            page_write_seqs: l.write_seqs,
            prefix_pages: l.prefix_pages,
        }
    }
}

fn sequence(k: Option<pb::SequenceKey>) -> Result<SequenceKey, Status> {
    k.ok_or_else(|| invalid(ValidationError::Missing("sequence")))?.try_into().map_err(invalid)
}

type PageStream = Pin<Box<dyn Stream<Item = Result<pb::GetPagesResponse, Status>> + Send>>;

/// Read one requested item: the response item (its page's payload left empty) and the payload,
/// a slice of the mapping that holds the slot. Counts hits, misses and bytes out.
pub(crate) fn page_item(store: &PageStore, m: &NodeMetrics, w: Wanted) -> (pb::PageItem, bytes::Bytes) {
    let item = |k, status: pb::PageStatus, message: String| pb::PageItem {
        key: Some(k),
        status: status as i32,
        page: None,
        message,
    };
    match w {
        Wanted::Bad(k, msg) => (item(k, pb::PageStatus::Invalid, msg), bytes::Bytes::new()),
        Wanted::Key(k, key) => match store.get(&key) {
            Ok(Some(p)) => {
                m.page_hits.increment(1);
                m.bytes_out.increment(p.payload.len() as u64);
                let codec = store.namespace(&key.sequence.namespace).map_or(0, |n| validate::codec_to_wire(n.ns.codec));
                let page = pb::Page {
                    key: Some(k.clone()),
                    codec,
                    token_count: p.token_count,
                    write_seq: p.write_seq,
                    payload_crc32c: p.crc,
                    prefix_hash: p.prefix_hash,
                    payload: bytes::Bytes::new(),
                    ..Default::default()
                };
                (pb::PageItem { page: Some(page), ..item(k, pb::PageStatus::Ok, String::new()) }, p.payload)
            }
            Ok(None) => {
                m.page_misses.increment(1);
                (item(k, pb::PageStatus::Miss, String::new()), bytes::Bytes::new())
            }
            Err(e) => (item(k, pb::PageStatus::Invalid, e.to_string()), bytes::Bytes::new()),
        },
    }
}

/// One requested item: a valid key or the reason it is not.
pub(crate) enum Wanted {
    Key(pb::PageKey, PageKey),
    Bad(pb::PageKey, String),
}

impl NodeService {
    /// Store one `PutPagesRequest` message of a PutPages stream, adding to `resp`.
    pub(crate) async fn put_message(
        &self,
        caller: &Caller,
        msg: pb::PutPagesRequest,
        resp: &mut pb::PutPagesResponse,
    ) -> Result<(), Status> {
        let bytes: usize = msg.pages.iter().map(|p| p.payload.len()).sum();
        self.check_namespaces(
            caller,
            msg.pages
                .iter()
                .map(|p| p.key.as_ref().and_then(|k| k.sequence.as_ref()).map_or("", |s| s.namespace.as_str())),
        )?;
        self.auth.charge_bytes(caller, bytes as u64)?;
        self.store.check_epoch(msg.epoch).map_err(status)?;
        // Every page is validated (key, codec, sizes, CRC) before any is written.
        let nss = self.store.namespace_table();
        let pages = msg
            .pages
            .into_iter()
            .map(|p| {
                validate::page(p, |n| nss.get(n).map(|e| &e.ns)).map(|(_, v)| v).map_err(|e| match e {
                    validate::PageRejection::Invalid(v) => status(StoreError::Invalid(v)),
                    validate::PageRejection::UnknownNamespace(n) => status(StoreError::UnknownNamespace(n)),
                })
            })
            .collect::<Result<Vec<_>, Status>>()?;
        let mode = if msg.handoff { PutMode::Handoff } else { PutMode::Write };
        let out = if inline_write(&self.store, bytes, INLINE_PUT_BYTES) {
            self.store.put_pages(pages, mode).map_err(status)?
        } else {
            let store = self.store.clone();
            blocking(move || store.put_pages(pages, mode)).await?
        };
        self.metrics.bytes_in.increment(out.bytes);
        resp.pages_written += out.written;
        resp.bytes_written += out.bytes;
        resp.pages_deduplicated += out.deduplicated;
        Ok(())
    }

    /// The store served.
    pub fn store(&self) -> &Arc<PageStore> {
        &self.store
    }

    /// The items of a GetPages request, in order (ranges expanded over the pages held).
    pub(crate) fn expand(&self, caller: &Caller, req: pb::GetPagesRequest) -> Result<Vec<Wanted>, Status> {
        self.check_namespaces(
            caller,
            req.keys
                .iter()
                .map(|k| k.sequence.as_ref().map_or("", |s| s.namespace.as_str()))
                .chain(req.ranges.iter().map(|r| r.sequence.as_ref().map_or("", |s| s.namespace.as_str()))),
        )?;
        // Refused while the caller's byte budget is in debt; charged as the pages go out.
        self.auth.charge_bytes(caller, 0)?;
        let mut out = Vec::with_capacity(req.keys.len());
        for k in req.keys {
            match PageKey::try_from(k.clone()) {
                Ok(key) => out.push(Wanted::Key(k, key)),
                Err(e) => out.push(Wanted::Bad(k, e.to_string())),
            }
        }
        for r in req.ranges {
            let seq = sequence(r.sequence)?;
            let ns = self
                .store
                .namespace(&seq.namespace)
                .ok_or_else(|| status(StoreError::UnknownNamespace(seq.namespace.clone())))?;
            // The model's layers by default; a DSA model's indexer layers on request.
            let layers = ns.ns.stored_layers();
            let layer_end = if r.layer_end == 0 { ns.ns.model.num_layers } else { r.layer_end };
            if r.layer_start >= layer_end || layer_end > layers {
                return Err(Status::invalid_argument(format!(
                    "layer range {}..{} invalid: model has {layers} layers",
                    r.layer_start, r.layer_end
                )));
            }
            let held = self.store.sequence_pages(&seq).unwrap_or_default();
            for layer in r.layer_start..layer_end {
                let end = if r.page_end == 0 { held.get(layer as usize).copied().unwrap_or(0) } else { r.page_end };
                for page_index in r.page_start..end {
                    let key = PageKey { sequence: seq.clone(), layer, page_index };
                    out.push(Wanted::Key((&key).into(), key));
                }
                if out.len() > MAX_GET_ITEMS {
                    break;
                }
            }
        }
        if out.len() > MAX_GET_ITEMS {
            return Err(Status::invalid_argument(format!("request covers more than {MAX_GET_ITEMS} pages; split it")));
        }
        Ok(out)
    }
}

#[tonic::async_trait]
impl CacheNode for NodeService {
    // PutPages and GetPages never reach these two: [`crate::zerocopy::ZeroCopyPages`] answers
    // them from the HTTP/2 frames (no reassembly copy in, no encoder copy out) before tonic's
    // router sees the request. They exist because the generated trait asks for them.
    async fn put_pages(
        &self,
        _request: Request<Streaming<pb::PutPagesRequest>>,
    ) -> Result<Response<pb::PutPagesResponse>, Status> {
        Err(Status::internal("PutPages is served by the zero-copy path; this server was built without it"))
    }

    type GetPagesStream = PageStream;

    async fn get_pages(&self, _request: Request<pb::GetPagesRequest>) -> Result<Response<PageStream>, Status> {
        Err(Status::internal("GetPages is served by the zero-copy path; this server was built without it"))
    }

    async fn append_tokens(
        &self,
        request: Request<pb::AppendTokensRequest>,
    ) -> Result<Response<pb::AppendTokensResponse>, Status> {
        let caller = Caller::of(&request);
        let r = request.into_inner();
        self.check_namespace(&caller, r.sequence.as_ref().map_or("", |s| s.namespace.as_str()))?;
        self.auth.charge_bytes(&caller, r.payload.len() as u64)?;
        self.metrics.bytes_in.increment(r.payload.len() as u64);
        let resp = if inline_append(&self.store, 1, r.payload.len()) {
            append_one(&self.store, r)?
        } else {
            let store = self.store.clone();
            tokio::task::spawn_blocking(move || append_one(&store, r))
                .await
                .map_err(|e| Status::internal(format!("store task failed: {e}")))??
        };
        Ok(Response::new(resp))
    }

    async fn append_batch(
        &self,
        request: Request<pb::AppendBatchRequest>,
    ) -> Result<Response<pb::AppendBatchResponse>, Status> {
        let caller = Caller::of(&request);
        let appends = request.into_inner().appends;
        if appends.len() > MAX_BATCH_APPENDS {
            return Err(Status::invalid_argument(format!(
                "{} appends in one AppendBatch; at most {MAX_BATCH_APPENDS}",
                appends.len()
            )));
        }
        let bytes: usize = appends.iter().map(|a| a.payload.len()).sum();
        self.auth.charge_bytes(&caller, bytes as u64)?;
        let appends_len = appends.len();
        self.metrics.bytes_in.increment(bytes as u64);
        // Each item is checked on its own: another tenant's is refused in its result. (Nothing
        // to check for kvcache's own processes and open clusters: the decode step's path.)
        let refused: Vec<Option<Status>> = if caller.is_trusted() {
            Vec::new()
        } else {
            appends
                .iter()
                .map(|a| self.check_namespace(&caller, a.sequence.as_ref().map_or("", |s| s.namespace.as_str())).err())
                .collect()
        };
        let store = self.store.clone();
        let run = move || {
            appends
                .into_iter()
                .enumerate()
                .map(|(i, r)| match refused.get(i).cloned().flatten() {
                    Some(s) => append_result(Err(s)),
                    None => append_result(append_one(&store, r)),
                })
                .collect()
        };
        let results = if inline_append(&self.store, appends_len, bytes) {
            run()
        } else {
            tokio::task::spawn_blocking(run).await.map_err(|e| Status::internal(format!("store task failed: {e}")))?
        };
        Ok(Response::new(pb::AppendBatchResponse { results }))
    }

    async fn get_rows(&self, request: Request<pb::GetRowsRequest>) -> Result<Response<pb::GetRowsResponse>, Status> {
        let caller = Caller::of(&request);
        let r = request.into_inner();
        let seq = sequence(r.sequence)?;
        self.check_namespace(&caller, &seq.namespace)?;
        if r.tokens.len() > MAX_ROWS {
            return Err(Status::invalid_argument(format!(
                "{} tokens in one GetRows; at most {MAX_ROWS}",
                r.tokens.len()
            )));
        }
        if let Some(i) = r.tokens.windows(2).position(|w| w[1] <= w[0]) {
            return Err(Status::invalid_argument(format!(
                "tokens must be strictly ascending: token {} is {} after {}",
                i + 1,
                r.tokens[i + 1],
                r.tokens[i]
            )));
        }
        let store = self.store.clone();
        let (layer, tokens) = (r.layer, r.tokens);
        let rows = blocking(move || store.get_rows(&seq, layer, &tokens)).await?;
        let rows = rows.unwrap_or_default();
        self.auth.charge_bytes(&caller, rows.len() as u64)?;
        self.metrics.bytes_out.increment(rows.len() as u64);
        Ok(Response::new(pb::GetRowsResponse { found: !rows.is_empty(), rows: rows.into() }))
    }

    async fn lookup(&self, request: Request<pb::LookupRequest>) -> Result<Response<pb::LookupResponse>, Status> {
        let caller = Caller::of(&request);
        let r = request.into_inner();
        let seq = sequence(r.sequence)?;
        self.check_namespace(&caller, &seq.namespace)?;
        let (exists, layers, cached) = self.store.lookup(&seq, &r.prefix_hashes, r.layer).map_err(status)?;
        let prefix = self
            .store
            .prefix_of(&seq)
            .map_or_else(Vec::new, |p| p.iter().map(|k| bytes::Bytes::copy_from_slice(&k.0)).collect());
        Ok(Response::new(pb::LookupResponse {
            prefix,
            exists,
            layers: layers.into_iter().map(pb::LayerExtent::from).collect(),
            prefix_pages_cached: cached,
        }))
    }

    async fn match_prefix(
        &self,
        request: Request<pb::MatchPrefixRequest>,
    ) -> Result<Response<pb::MatchPrefixResponse>, Status> {
        let caller = Caller::of(&request);
        let r = request.into_inner();
        validate::namespace_name(&r.namespace).map_err(invalid)?;
        self.check_namespace(&caller, &r.namespace)?;
        if r.keys.len() > MAX_MATCH_KEYS {
            return Err(Status::invalid_argument(format!(
                "{} keys in one MatchPrefix; at most {MAX_MATCH_KEYS}",
                r.keys.len()
            )));
        }
        if Duration::from_millis(r.lease_ms as u64) > MAX_MATCH_LEASE {
            return Err(Status::invalid_argument(format!("lease_ms {} out of range: at most 600000", r.lease_ms)));
        }
        let keys = r
            .keys
            .iter()
            .enumerate()
            .map(|(i, k)| {
                ContentKey::from_bytes(k).ok_or_else(|| {
                    Status::invalid_argument(format!("key {i} is {} bytes: a content key is 32 bytes", k.len()))
                })
            })
            .collect::<Result<Vec<_>, Status>>()?;
        let lease = (r.lease_ms > 0).then(|| Duration::from_millis(r.lease_ms as u64));
        // In-memory lookups, no I/O: a node's share of a long prompt is answered on the
        // runtime thread (a blocking-pool hop costs more than the work); larger ones off it.
        let got = if keys.len() <= INLINE_MATCH_KEYS {
            self.store.match_prefix_held(&r.namespace, &keys, lease).map_err(status)?
        } else {
            let store = self.store.clone();
            blocking(move || store.match_prefix_held(&r.namespace, &keys, lease)).await?
        };
        let (present, held) = got.into_iter().unzip();
        Ok(Response::new(pb::MatchPrefixResponse { present, held }))
    }

    async fn create_sequence(
        &self,
        request: Request<pb::CreateSequenceRequest>,
    ) -> Result<Response<pb::CreateSequenceResponse>, Status> {
        let caller = Caller::of(&request);
        let r = request.into_inner();
        let seq = sequence(r.sequence)?;
        self.check_namespace(&caller, &seq.namespace)?;
        self.store.check_epoch(r.epoch).map_err(status)?;
        let prefix = r
            .prefix
            .iter()
            .enumerate()
            .map(|(i, k)| {
                ContentKey::from_bytes(k).ok_or_else(|| {
                    Status::invalid_argument(format!("prefix key {i} is {} bytes: a content key is 32 bytes", k.len()))
                })
            })
            .collect::<Result<Vec<_>, Status>>()?;
        let store = self.store.clone();
        let seal = r.seal;
        let created = blocking(move || store.create_sequence(&seq, &prefix, seal)).await?;
        Ok(Response::new(pb::CreateSequenceResponse { created }))
    }

    async fn delete_sequence(
        &self,
        request: Request<pb::DeleteSequenceRequest>,
    ) -> Result<Response<pb::DeleteSequenceResponse>, Status> {
        let caller = Caller::of(&request);
        let r = request.into_inner();
        let seq = sequence(r.sequence)?;
        self.check_namespace(&caller, &seq.namespace)?;
        self.store.check_epoch(r.epoch).map_err(status)?;
        let store = self.store.clone();
        let n = blocking(move || store.delete(&seq)).await?;
        Ok(Response::new(pb::DeleteSequenceResponse { pages_deleted: n }))
    }

    async fn lease(&self, request: Request<pb::LeaseRequest>) -> Result<Response<pb::LeaseResponse>, Status> {
        let caller = Caller::of(&request);
        let r = request.into_inner();
        let seq = sequence(r.sequence)?;
        self.check_namespace(&caller, &seq.namespace)?;
        if r.ttl_ms == 0 || Duration::from_millis(r.ttl_ms as u64) > MAX_LEASE {
            return Err(Status::invalid_argument(format!("ttl_ms {} out of range: expected 1..=3600000", r.ttl_ms)));
        }
        let (id, until) = self.store.lease(&seq, Duration::from_millis(r.ttl_ms as u64)).map_err(status)?;
        let left = until.saturating_duration_since(std::time::Instant::now());
        let expires = std::time::SystemTime::now() + left;
        let ms = expires.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        Ok(Response::new(pb::LeaseResponse { lease_id: id, expires_unix_ms: ms }))
    }

    async fn release(&self, request: Request<pb::ReleaseRequest>) -> Result<Response<pb::ReleaseResponse>, Status> {
        let caller = Caller::of(&request);
        let id = request.into_inner().lease_id;
        // Another tenant's lease is answered as an unknown one: ids say nothing across tenants.
        let mine = caller.is_trusted()
            || self.store.lease_namespace(id).is_some_and(|ns| self.check_namespace(&caller, &ns).is_ok());
        Ok(Response::new(pb::ReleaseResponse { released: mine && self.store.release(id) }))
    }

    async fn stats(&self, request: Request<pb::StatsRequest>) -> Result<Response<pb::NodeStats>, Status> {
        let caller = Caller::of(&request);
        let store = self.store.clone();
        let mut s =
            tokio::task::spawn_blocking(move || store.stats()).await.map_err(|e| Status::internal(e.to_string()))?;
        if !caller.is_operator() {
            // A tenant sees its own namespaces and tenant entry, and node totals over them only.
            let name = caller.tenant().map_or("", |t| t.name.as_str());
            s.namespaces.retain(|u| u.tenant == name);
            s.tenants.retain(|t| t.tenant == name);
            s = crate::store::StoreStats {
                capacity_bytes: s.capacity_bytes,
                used_bytes: s.namespaces.iter().map(|u| u.bytes).sum(),
                pages: s.namespaces.iter().map(|u| u.pages).sum(),
                sequences: s.namespaces.iter().map(|u| u.sequences).sum(),
                get_hits: s.namespaces.iter().map(|u| u.get_hits).sum(),
                get_misses: s.namespaces.iter().map(|u| u.get_misses).sum(),
                evictions: s.namespaces.iter().map(|u| u.evictions).sum(),
                namespaces: s.namespaces,
                tenants: s.tenants,
                ..Default::default()
            };
        }
        Ok(Response::new(pb::NodeStats {
            node_id: self.node_id.clone(),
            capacity_bytes: s.capacity_bytes,
            used_bytes: s.used_bytes,
            pages: s.pages,
            sequences: s.sequences,
            epoch: self.store.epoch(),
            evictions: s.evictions,
            active_leases: s.active_leases,
            index_bytes: s.index_bytes,
            pool_files: s.pool_files,
            pool_files_failed: s.pool_files_failed,
            namespaces: s
                .namespaces
                .into_iter()
                .map(|u| pb::NamespaceUsage {
                    namespace: u.name,
                    sequences: u.sequences,
                    pages: u.pages,
                    bytes: u.bytes,
                    tokens: u.tokens,
                    content_keys: u.content_keys,
                    get_hits: u.get_hits,
                    get_misses: u.get_misses,
                    dedup_hits: u.dedup_hits,
                    conflicts: u.conflicts,
                    evictions: u.evictions,
                    match_hits: u.match_hits,
                    match_misses: u.match_misses,
                    window_releases: u.window_releases,
                })
                .collect(),
            get_hits: s.get_hits,
            get_misses: s.get_misses,
            corrupt_pages_dropped: s.corrupt_pages_dropped,
            leases_granted: s.leases_granted,
            recovery_seconds: s.recovery_seconds,
            recovery_bytes: s.recovery_bytes,
            tenants: s
                .tenants
                .into_iter()
                .map(|t| pb::TenantUsage {
                    tenant: t.tenant,
                    bytes: t.bytes,
                    quota_bytes: t.quota_bytes,
                    reserved_bytes: t.reserved_bytes,
                    quota_evictions: t.quota_evictions,
                    quota_refusals: t.quota_refusals,
                })
                .collect(),
        }))
    }

    async fn ensure_namespace(
        &self,
        request: Request<pb::EnsureNamespaceRequest>,
    ) -> Result<Response<pb::EnsureNamespaceResponse>, Status> {
        let caller = Caller::of(&request);
        let ns: Namespace = request
            .into_inner()
            .namespace
            .ok_or_else(|| invalid(ValidationError::Missing("namespace")))?
            .try_into()
            .map_err(invalid)?;
        if !caller.is_trusted() {
            // A tenant may only push its own namespace, as the coordinator defines it (no
            // squatting a name another tenant is about to create).
            caller.check_namespace(&ns.name, &ns.tenant)?;
            if !self.coordinator_defines(&ns).await {
                return Err(Status::failed_precondition(format!(
                    "namespace {:?} is not defined so by the coordinator: create it there first",
                    ns.name
                )));
            }
        }
        let store = self.store.clone();
        let created = blocking(move || store.ensure_namespace(ns)).await?;
        Ok(Response::new(pb::EnsureNamespaceResponse { created }))
    }
}

#[cfg(test)]
mod tests {
    #[cfg(target_os = "linux")]
    #[test]
    fn the_inline_backlog_limit_is_a_part_of_this_host_s_memory() {
        let total = super::mem_total_bytes().unwrap();
        let limit = super::inline_backlog_limit();
        let background_bytes: u64 =
            std::fs::read_to_string("/proc/sys/vm/dirty_background_bytes").map_or(0, |s| s.trim().parse().unwrap_or(0));
        if background_bytes > 0 {
            assert_eq!(limit, background_bytes);
        } else {
            assert!(limit > 0, "no inline writes at all");
            assert!(limit < total, "{limit} B is not below the host's memory");
        }
    }
}
