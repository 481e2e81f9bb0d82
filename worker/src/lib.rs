//! kvcache-worker: the AttentionWorker service.
//!
//! One `Decode` call is one layer for a batch of sequences. Per sequence the worker
//! 1. appends the new token's K/V (or latent) through the client to every owner (write-through;
//!    the whole batch's tokens in one `AppendBatch` call per node) and applies the same append
//!    to its cached copy of the last page, so the page it just wrote is not pulled back;
//! 2. takes the layer from its [`cache`] as is when the append's answer (the layer's extent on
//!    that owner) names exactly the pages it holds; otherwise asks the owners which pages they
//!    hold (`Lookup`), reads from the freshest one, and pulls only the pages whose
//!    (node, write_seq) it does not already hold — after the first step that is O(1) bytes per
//!    step, not O(context);
//! 3. computes attention for the whole batch with `kvcache-attention` on a blocking thread;
//! 4. starts pulling layer L+1's missing pages for the same sequences while the caller works.
//!
//! A sequence whose pages are gone gets `SEQUENCE_STATUS_MISS`; the rest of the batch is
//! answered. Malformed requests are INVALID_ARGUMENT with the reason.
//!
//! With `cache_prefault` the cache's payloads live in an [`arena`] preallocated and faulted in
//! at start: a pulled page is copied there and its frame buffer freed at once, instead of
//! keeping received bytes in memory the kernel must first fault in and zero.
//!
//! A pull of more than the last page runs under a lease on the node it reads from (released
//! when the pull ends, expiring after [`PULL_LEASE`] if the worker dies), so memory pressure on
//! the node cannot evict the sequence halfway through the stream. A page evicted between the
//! lookup and the lease comes back as a miss, which the sequence reports as a miss; the caller
//! recomputes. Warm steps (the new token's page at most) take no lease.

pub mod arena;
pub mod cache;

/// Longest a pull's lease pins a sequence when its release never comes (the worker died).
pub const PULL_LEASE: std::time::Duration = std::time::Duration::from_secs(60);

use bytes::Bytes;
use cache::{CachedPage, PageCache};
use kvcache_attention::{AttnShape, BatchItem, KvPage, Options};
use kvcache_client::{AppendAck, AppendItem, Client, ClientError};
use kvcache_core::{Namespace, PageKey, SequenceKey};
use kvcache_proto::v1 as pb;
use kvcache_proto::v1::attention_worker_server::AttentionWorker;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;
use tonic::{Request, Response, Status};
use tracing::Instrument;

/// Worker settings.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Page cache bound in bytes.
    pub cache_bytes: u64,
    /// Threads for the attention kernels.
    pub threads: usize,
    /// Prefetch layer L+1 while answering layer L.
    pub prefetch: bool,
    /// Keep cached payloads in an [`arena::Arena`] of `cache_bytes`, faulted in at start
    /// (the worker's resident memory is then the cache bound from the first moment).
    pub cache_prefault: bool,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            cache_bytes: 1 << 30,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            prefetch: true,
            cache_prefault: false,
        }
    }
}

/// Worker counters.
#[derive(Debug, Default)]
pub struct WorkerCounters {
    /// Payload bytes pulled from nodes.
    pub bytes_pulled: AtomicU64,
    /// Pages pulled from nodes.
    pub pages_pulled: AtomicU64,
    /// Decode steps answered (sequences).
    pub sequences: AtomicU64,
}

/// The attention worker.
pub struct Worker {
    client: Client,
    cache: PageCache,
    arena: Option<Arc<arena::Arena>>,
    cfg: WorkerConfig,
    /// Counters.
    pub counters: WorkerCounters,
    /// Work a call leaves running (lease releases, next-layer prefetch): shutdown waits for it.
    tasks: tokio_util::task::TaskTracker,
}

/// Why one sequence of a batch could not be answered.
enum SeqFailure {
    Miss(String),
    WriteFailed(String),
    /// The cached pages hold NaN or infinite values.
    BadData(String),
}

struct Fetched {
    pages: Vec<(Bytes, usize)>,
    bytes: u64,
    pulled: u64,
    cached: u64,
}

impl Worker {
    /// A worker reading through `client`.
    pub fn new(client: Client, cfg: WorkerConfig) -> Arc<Self> {
        let arena = if cfg.cache_prefault { arena::Arena::new(cfg.cache_bytes, true) } else { None };
        if cfg.cache_prefault && arena.is_none() {
            tracing::warn!(
                cache_bytes = cfg.cache_bytes,
                "no page-cache arena (under one 2 MiB chunk, or the mapping failed): cached pages stay in received buffers"
            );
        }
        Arc::new(Self {
            cache: PageCache::new(cfg.cache_bytes),
            arena,
            client,
            cfg,
            counters: WorkerCounters::default(),
            tasks: tokio_util::task::TaskTracker::new(),
        })
    }

    /// The page cache.
    pub fn cache(&self) -> &PageCache {
        &self.cache
    }

    async fn namespace(&self, name: &str) -> Option<Namespace> {
        if let Some(n) = self.client.namespace(name) {
            return Some(n);
        }
        self.client.refresh().await.ok()?;
        self.client.namespace(name)
    }

    /// Apply an acknowledged append to the cached copy of the layer's last page. With R > 1
    /// every owner acknowledges; the ack used is that of the owner the cached pages came from,
    /// so a layer's cached pages stay from one node.
    fn apply_append(&self, ns: &Namespace, seq: &SequenceKey, layer: u32, acks: &[AppendAck], new_kv: &Bytes) {
        let pt = ns.page_tokens as u64;
        let key = |i: u64| PageKey { sequence: seq.clone(), layer, page_index: i as u32 };
        let ack = acks
            .iter()
            .find(|a| {
                let tokens = a.layer_tokens.first().copied().unwrap_or(0);
                // The page the cache must already hold from this node: the last page's earlier
                // tokens, or the previous page when the token starts a new one.
                let held = if tokens <= 1 { None } else { Some((tokens - 2) / pt) };
                held.is_some_and(|i| self.cache.peek(&key(i)).is_some_and(|p| *p.node == *a.node_id))
            })
            .or(acks.first());
        let Some(ack) = ack else { return };
        let (Some(&tokens), Some(&ws)) = (ack.layer_tokens.first(), ack.last_page_write_seqs.first()) else {
            return;
        };
        if tokens == 0 {
            return;
        }
        let idx = (tokens - 1) / pt;
        let in_page = (tokens - idx * pt) as usize;
        let node: Arc<str> = ack.node_id.as_str().into();
        let bytes = if in_page == 1 {
            new_kv.clone()
        } else {
            let l = ns.layout();
            match self.cache.peek(&key(idx)) {
                // Lengths are checked here, not trusted: a cached page of the wrong size is
                // dropped and pulled again, never concatenated.
                Some(old)
                    if old.node == node
                        && old.tokens as usize == in_page - 1
                        && old.bytes.len() == l.payload_bytes(in_page - 1)
                        && new_kv.len() == l.payload_bytes(1) =>
                {
                    let mut merged = vec![0u8; l.payload_bytes(in_page)];
                    l.concat(&old.bytes, in_page - 1, new_kv, 1, &mut merged);
                    Bytes::from(merged)
                }
                _ => return,
            }
        };
        self.cache.insert(key(idx), CachedPage { node, write_seq: ws, tokens: in_page as u32, bytes });
    }

    /// The layer from the cache alone, when an owner's extent (from the append this step made)
    /// names exactly the pages the cache holds from that owner: the Lookup round trip is then
    /// redundant. Any page missing, stale or cached from another node: `None`, and the caller
    /// looks the layer up as usual.
    fn cached_layer(&self, seq: &SequenceKey, layer: u32, acks: &[AppendAck]) -> Option<Fetched> {
        let key = |i: usize| PageKey { sequence: seq.clone(), layer, page_index: i as u32 };
        // The owner the cached pages came from (with R > 1 every owner answers the append).
        let (node, ext) = acks.iter().find_map(|a| {
            let e = a.extent.as_ref().filter(|e| e.layer == layer && e.tokens > 0)?;
            self.cache.peek(&key(0)).is_some_and(|p| *p.node == *a.node_id).then_some((a.node_id.as_str(), e))
        })?;
        let pages = self.cache.whole_layer(seq, layer, node, &ext.page_write_seqs)?;
        let pages: Vec<(Bytes, usize)> = pages.into_iter().map(|p| (p.bytes, p.tokens as usize)).collect();
        let cached = pages.len() as u64;
        (pages.iter().map(|p| p.1 as u64).sum::<u64>() == ext.tokens).then_some(Fetched {
            pages,
            bytes: 0,
            pulled: 0,
            cached,
        })
    }

    /// Make sure the layer's pages are cached (from the freshest owner) and return them in order.
    async fn fetch_layer(&self, seq: &SequenceKey, layer: u32) -> Result<Fetched, SeqFailure> {
        let ns_r = self.client.namespace(&seq.namespace).map_or(1, |n| n.replication as usize);
        let cands: Vec<_> = self.client.read_candidates(seq).into_iter().take(ns_r.max(1) + 1).collect();
        let lookups =
            futures::future::join_all(cands.iter().map(|n| self.client.lookup_on(n, seq, vec![], Some(layer)))).await;
        let mut best: Option<(usize, u64, Vec<u64>)> = None;
        for (i, r) in lookups.into_iter().enumerate() {
            let Ok(r) = r else { continue };
            let Some(ext) = r.layers.into_iter().find(|l| l.layer == layer) else { continue };
            if ext.tokens > 0 && best.as_ref().is_none_or(|b| ext.tokens > b.1) {
                best = Some((i, ext.tokens, ext.page_write_seqs));
            }
        }
        let Some((ni, _tokens, seqs)) = best else {
            return Err(SeqFailure::Miss(format!("no live owner holds layer {layer} of {:?}", seq.sequence_id)));
        };
        let node = &cands[ni];
        let node_id: Arc<str> = node.node_id.as_str().into();
        if let Some(i) = seqs.iter().position(|&ws| ws == 0) {
            return Err(SeqFailure::Miss(format!("page {i} of layer {layer} is missing")));
        }
        let mut pages: Vec<Option<(Bytes, usize)>> = Vec::with_capacity(seqs.len());
        let mut missing = Vec::new();
        let mut cached = 0;
        for (i, p) in self.cache.layer(seq, layer, &node_id, &seqs).into_iter().enumerate() {
            match p {
                Some(p) => {
                    cached += 1;
                    pages.push(Some((p.bytes, p.tokens as usize)));
                }
                None => {
                    missing.push(PageKey { sequence: seq.clone(), layer, page_index: i as u32 });
                    pages.push(None);
                }
            }
        }
        let mut bytes = 0;
        let pulled = missing.len() as u64;
        if !missing.is_empty() {
            // A pull of more than the last page (a cold or evicted layer) runs under a lease, so
            // the node cannot evict the sequence halfway through the stream. The O(1) pull of a
            // warm step does not pay the extra round trip.
            let lease = if missing.len() > 1 { self.client.lease_on(node, seq, PULL_LEASE).await.ok() } else { None };
            // Into the arena, if there is one with room, as each message arrives; the frame
            // buffer goes back to the allocator once the pages received in it are copied out.
            let arena = &self.arena;
            let got = self
                .client
                .get_from_into(node, &missing, |b| arena.as_ref().and_then(|a| a.copy_in(&b)).unwrap_or(b))
                .await;
            if let Some(id) = lease {
                let (client, node) = (self.client.clone(), node.clone());
                self.tasks.spawn(async move {
                    if let Err(e) = client.release(&node, id).await {
                        tracing::debug!(error = %e, "lease release failed; it expires on its own");
                    }
                });
            }
            let got = got.map_err(|e| SeqFailure::Miss(e.to_string()))?;
            for (key, p) in missing.into_iter().zip(got) {
                let Some(p) = p else {
                    return Err(SeqFailure::Miss(format!("page {} of layer {layer} went missing", key.page_index)));
                };
                bytes += p.payload.len() as u64;
                let i = key.page_index as usize;
                pages[i] = Some((p.payload.clone(), p.token_count as usize));
                self.cache.insert(
                    key,
                    CachedPage {
                        node: node_id.clone(),
                        write_seq: p.write_seq,
                        tokens: p.token_count,
                        bytes: p.payload,
                    },
                );
            }
        }
        self.counters.bytes_pulled.fetch_add(bytes, Ordering::Relaxed);
        self.counters.pages_pulled.fetch_add(pulled, Ordering::Relaxed);
        Ok(Fetched { pages: pages.into_iter().map(|p| p.expect("filled")).collect(), bytes, pulled, cached })
    }

    fn export_metrics(&self, results: &[pb::DecodeResult], bytes_pulled: u64) {
        use kvcache_telemetry::names as n;
        let (used, _, hits, misses) = self.cache.stats();
        metrics::counter!(n::WORKER_CACHE_HITS).absolute(hits);
        metrics::counter!(n::WORKER_CACHE_MISSES).absolute(misses);
        metrics::gauge!(n::WORKER_CACHE_BYTES).set(used as f64);
        metrics::counter!(n::WORKER_BYTES_PULLED).absolute(self.counters.bytes_pulled.load(Ordering::Relaxed));
        metrics::histogram!(n::WORKER_BYTES_PER_STEP).record(bytes_pulled as f64);
        for r in results {
            let status = pb::SequenceStatus::try_from(r.status).map_or("unknown", |s| match s {
                pb::SequenceStatus::Ok => "ok",
                pb::SequenceStatus::Miss => "miss",
                pb::SequenceStatus::WriteFailed => "write_failed",
                pb::SequenceStatus::BadData => "bad_data",
                pb::SequenceStatus::Unspecified => "unknown",
            });
            metrics::counter!(n::WORKER_SEQUENCES, "status" => status).increment(1);
        }
    }

    /// Answer one decode batch.
    pub async fn decode(self: &Arc<Self>, req: pb::DecodeRequest) -> Result<pb::DecodeResponse, Status> {
        let started = Instant::now();
        let ns = self.namespace(&req.namespace).await.ok_or_else(|| {
            kvcache_proto::metadata::not_found(
                kvcache_proto::metadata::NOT_FOUND_NAMESPACE,
                format!("unknown namespace {:?}", req.namespace),
            )
        })?;
        kvcache_core::validate::layer(&ns, req.layer).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let layout = ns.layout();
        let mut shape = AttnShape::new(&ns.model, layout);
        if req.softmax_scale != 0.0 {
            if !(req.softmax_scale.is_finite() && req.softmax_scale > 0.0) {
                return Err(Status::invalid_argument(format!(
                    "softmax_scale {} must be finite and > 0",
                    req.softmax_scale
                )));
            }
            shape.scale = req.softmax_scale;
        }
        let mut seqs = Vec::with_capacity(req.items.len());
        let mut queries: Vec<Vec<f32>> = Vec::with_capacity(req.items.len());
        for (i, it) in req.items.iter().enumerate() {
            let seq = SequenceKey::try_from(pb::SequenceKey {
                namespace: req.namespace.clone(),
                sequence_id: it.sequence_id.clone(),
            })
            .map_err(|e| Status::invalid_argument(format!("item {i}: {e}")))?;
            if it.query.len() != shape.q_len() * 4 {
                return Err(Status::invalid_argument(format!(
                    "item {i}: query has {} bytes, expected {} ({} heads × {} f32, little-endian)",
                    it.query.len(),
                    shape.q_len() * 4,
                    shape.q_heads,
                    shape.qk_width
                )));
            }
            let q = kvcache_proto::f32le::from_bytes(&it.query).unwrap_or_default();
            if let Some(j) = q.iter().position(|x| !x.is_finite()) {
                return Err(Status::invalid_argument(format!(
                    "item {i} (sequence {:?}): query value {j} is {} (every value must be finite)",
                    it.sequence_id, q[j]
                )));
            }
            queries.push(q);
            if !it.new_kv.is_empty() && it.new_kv.len() != layout.payload_bytes(1) {
                return Err(Status::invalid_argument(format!(
                    "item {i}: new_kv is {} bytes, one token of namespace {} is {} bytes ({} codec)",
                    it.new_kv.len(),
                    ns.name,
                    layout.payload_bytes(1),
                    ns.codec.as_str()
                )));
            }
            if !it.new_kv.is_empty()
                && let Some(j) = layout.decode(&it.new_kv, 1).iter().position(|x| !x.is_finite())
            {
                return Err(Status::invalid_argument(format!(
                    "item {i} (sequence {:?}): new_kv value {j} is not finite (NaN or infinity, after decoding the {} codec)",
                    it.sequence_id,
                    ns.codec.as_str()
                )));
            }
            if seqs.contains(&seq) {
                return Err(Status::invalid_argument(format!(
                    "item {i}: sequence {:?} appears twice in the batch",
                    it.sequence_id
                )));
            }
            seqs.push(seq);
        }
        let layer = req.layer;
        // The step's new tokens, in one AppendBatch per owning node.
        let appending: Vec<usize> = (0..req.items.len()).filter(|&i| !req.items[i].new_kv.is_empty()).collect();
        let items = appending
            .iter()
            .map(|&i| AppendItem {
                sequence: seqs[i].clone(),
                layer: Some(layer),
                tokens: 1,
                payload: req.items[i].new_kv.clone(),
                token_ids: req.items[i].new_token_id.map(|t| vec![t]).unwrap_or_default(),
                return_extent: true,
            })
            .collect();
        let mut appended: Vec<Option<Result<Vec<AppendAck>, ClientError>>> =
            (0..req.items.len()).map(|_| None).collect();
        let many = self.client.append_many(items).await;
        for (i, r) in appending.into_iter().zip(many) {
            appended[i] = Some(r);
        }
        // One task per sequence: responses are decoded and cached on every runtime thread,
        // not all on the thread polling this request.
        let tasks: Vec<_> = appended
            .into_iter()
            .zip(&req.items)
            .zip(&seqs)
            .map(|((acks, it), seq)| {
                let (me, ns, seq) = (self.clone(), ns.clone(), seq.clone());
                let new_kv = it.new_kv.clone();
                tokio::spawn(
                    async move {
                        if let Some(acks) = acks {
                            let acks = acks.map_err(|e| SeqFailure::WriteFailed(e.to_string()))?;
                            me.apply_append(&ns, &seq, layer, &acks, &new_kv);
                            if let Some(f) = me.cached_layer(&seq, layer, &acks) {
                                return Ok(f);
                            }
                        }
                        me.fetch_layer(&seq, layer).await
                    }
                    .in_current_span(),
                )
            })
            .collect();
        let mut fetched = Vec::with_capacity(tasks.len());
        for t in tasks {
            fetched.push(t.await.unwrap_or_else(|e| Err(SeqFailure::Miss(format!("fetch task failed: {e}")))));
        }
        let fetch_micros = started.elapsed().as_micros() as u64;
        let mut stats = pb::DecodeStats { fetch_micros, ..Default::default() };
        for f in fetched.iter().flatten() {
            stats.bytes_pulled += f.bytes;
            stats.pages_pulled += f.pulled;
            stats.pages_cached += f.cached;
        }
        // Compute every sequence whose pages are here, on a blocking thread.
        let ok: Vec<(usize, Vec<(Bytes, usize)>)> =
            fetched.iter().enumerate().filter_map(|(i, f)| f.as_ref().ok().map(|f| (i, f.pages.clone()))).collect();
        let queries: Vec<Vec<f32>> = ok.iter().map(|(i, _)| std::mem::take(&mut queries[*i])).collect();
        let threads = self.cfg.threads;
        let t_compute = Instant::now();
        let computed = tokio::task::spawn_blocking(move || {
            let kv: Vec<Vec<KvPage>> =
                ok.iter().map(|(_, ps)| ps.iter().map(|(b, n)| KvPage { payload: b, tokens: *n }).collect()).collect();
            let items: Vec<BatchItem> = queries.iter().zip(&kv).map(|(q, p)| BatchItem { q, pages: p }).collect();
            let mut bufs: Vec<(Vec<f32>, Vec<f32>)> =
                items.iter().map(|_| (vec![0f32; shape.out_len()], vec![0f32; shape.q_heads])).collect();
            let mut outs: Vec<(&mut [f32], &mut [f32])> =
                bufs.iter_mut().map(|(o, l)| (&mut o[..], &mut l[..])).collect();
            let opts = Options { threads, ..Options::default() };
            let each = kvcache_attention::decode_batch_each(&shape, &items, &opts, &mut outs);
            (ok.into_iter().map(|(i, _)| i).zip(each).collect::<Vec<_>>(), bufs)
        })
        .await
        .map_err(|e| Status::internal(format!("attention task failed: {e}")))?;
        stats.compute_micros = t_compute.elapsed().as_micros() as u64;
        let (idx, bufs) = computed;
        // The query was checked above: what the kernel refuses now is the cached data of that
        // sequence alone, its own status; the rest of the batch is answered.
        for ((i, r), _) in idx.iter().zip(&bufs) {
            if let Err(e) = r {
                fetched[*i] = Err(SeqFailure::BadData(format!("attention refused the cached pages: {e}")));
            }
        }
        let mut results: Vec<pb::DecodeResult> = req
            .items
            .iter()
            .zip(&fetched)
            .map(|(it, f)| {
                let (status, message) = match f {
                    Ok(_) => (pb::SequenceStatus::Ok, String::new()),
                    Err(SeqFailure::Miss(m)) => (pb::SequenceStatus::Miss, m.clone()),
                    Err(SeqFailure::WriteFailed(m)) => (pb::SequenceStatus::WriteFailed, m.clone()),
                    Err(SeqFailure::BadData(m)) => (pb::SequenceStatus::BadData, m.clone()),
                };
                pb::DecodeResult {
                    sequence_id: it.sequence_id.clone(),
                    status: status as i32,
                    message,
                    ..Default::default()
                }
            })
            .collect();
        for ((i, r), (o, l)) in idx.into_iter().zip(bufs) {
            if r.is_err() {
                continue;
            }
            results[i].context_tokens = fetched[i].as_ref().map_or(0, |f| f.pages.iter().map(|p| p.1 as u64).sum());
            results[i].output = kvcache_proto::f32le::to_bytes(&o);
            results[i].lse = l;
        }
        self.counters.sequences.fetch_add(req.items.len() as u64, Ordering::Relaxed);
        self.export_metrics(&results, stats.bytes_pulled);
        // Pull the next layer's pages while the engine works on this one.
        if self.cfg.prefetch && layer + 1 < ns.model.num_layers {
            let me = self.clone();
            self.tasks.spawn(async move {
                for seq in seqs {
                    let _ = me.fetch_layer(&seq, layer + 1).await;
                }
            });
        }
        Ok(pb::DecodeResponse { results, stats: Some(stats) })
    }
}

/// The gRPC face of a [`Worker`].
pub struct WorkerService(pub Arc<Worker>);

#[tonic::async_trait]
impl AttentionWorker for WorkerService {
    async fn decode(&self, request: Request<pb::DecodeRequest>) -> Result<Response<pb::DecodeResponse>, Status> {
        self.0.decode(request.into_inner()).await.map(Response::new)
    }
}

/// Serve `worker` on `listener` until `shutdown`, with health and reflection.
pub async fn run(
    worker: Arc<Worker>,
    listener: tokio::net::TcpListener,
    exposure: kvcache_net::Exposure,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), kvcache_net::ServeError> {
    use kvcache_proto::v1::attention_worker_server::AttentionWorkerServer;
    let (health, health_svc) = tonic_health::server::health_reporter();
    health.set_serving::<AttentionWorkerServer<WorkerService>>().await;
    let reflection = kvcache_net::reflection()?;
    let server = kvcache_net::server(&exposure.tls)?;
    let probe = exposure.health_listener.map(|l| kvcache_net::serve_health(l, health_svc.clone()));
    let r = server
        .layer(kvcache_telemetry::GrpcMetricsLayer::new("worker"))
        .add_service(health_svc)
        .add_service(reflection)
        .add_service(
            AttentionWorkerServer::new(WorkerService(worker.clone()))
                .max_decoding_message_size(kvcache_client::MAX_MESSAGE_BYTES)
                .max_encoding_message_size(kvcache_client::MAX_MESSAGE_BYTES),
        )
        .serve_with_incoming_shutdown(kvcache_net::incoming(listener), shutdown)
        .await;
    if let Some(p) = probe {
        p.abort();
    }
    // Lease releases and prefetches the last calls started: wait for them (bounded), so the
    // nodes are not left with leases they only lose at expiry.
    worker.tasks.close();
    if tokio::time::timeout(SHUTDOWN_WAIT, worker.tasks.wait()).await.is_err() {
        tracing::warn!(left = worker.tasks.len(), "worker tasks still running at shutdown");
    }
    r?;
    Ok(())
}

/// Longest a stopping worker waits for the work its calls started.
pub const SHUTDOWN_WAIT: std::time::Duration = std::time::Duration::from_secs(20);

/// Register a worker with the coordinator (retrying until it succeeds or `attempts` run out).
pub async fn register(client: &Client, worker_id: &str, address: &str) -> Result<u64, Status> {
    let mut last = Status::unavailable("not attempted");
    for _ in 0..50 {
        match client
            .coordinator()
            .register_worker(pb::RegisterWorkerRequest { worker_id: worker_id.into(), address: address.into() })
            .await
        {
            Ok(r) => {
                let _ = client.refresh().await;
                return Ok(r.into_inner().epoch);
            }
            Err(e) => last = e,
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    Err(last)
}
