//! kvcache-worker: the AttentionWorker service.
//!
//! Rooms: [`service`] (the gRPC face, `run`, registration), `decode` (one call in steps: parse,
//! append, fetch, compute, respond; by layer kind: windows, chunks, sinks, sparse MLA), `fetch`
//! (a layer's pages: the append applied to the cache, the cache as is, or a lookup and pull —
//! only the window's pages for sliding and chunked layers), `linear` (gated-delta-rule layers:
//! the state read, stepped and written back), [`cache`] (the page cache), [`arena`], [`device`]
//! (the pages mirrored into GPU memory and the decode run there, with `--device cuda:N`).
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
//! Steps 1 and 3 overlap for a sequence whose layer the cache knows (the extent its owner last
//! confirmed): it is computed on the cached layer plus the new token while the append is in
//! flight, and the answer is kept only if the owner's acknowledgement names exactly those pages;
//! otherwise it goes through 2 and 3 again (`fetch`: `speculate`, `confirm`).
//!
//! A sequence whose pages are gone gets `SEQUENCE_STATUS_MISS`; the rest of the batch is
//! answered. Malformed requests are INVALID_ARGUMENT with the reason.
//!
//! With `cache_prefault` the cache's payloads live in an [`arena`] preallocated and faulted in
//! at start: a pulled page is copied there and its frame buffer freed at once, instead of
//! keeping received bytes in memory the kernel must first fault in and zero. A decode step's
//! grown last pages are built there too, in a reserve of 1/64 of the cache (at least 64 MiB)
//! that pulled pages leave alone.
//!
//! A pull of more than the last page runs under a lease on the node it reads from (released
//! when the pull ends, expiring after [`PULL_LEASE`] if the worker dies), so memory pressure on
//! the node cannot evict the sequence halfway through the stream. A page evicted between the
//! lookup and the lease comes back as a miss, which the sequence reports as a miss; the caller
//! recomputes. Warm steps (the new token's page at most) take no lease.

pub mod arena;
pub mod cache;
mod decode;
pub mod device;
mod fetch;
mod linear;
pub mod service;
mod sparse;

pub use service::{SHUTDOWN_WAIT, WorkerService, register, run};

/// Longest a pull's lease pins a sequence when its release never comes (the worker died).
pub const PULL_LEASE: std::time::Duration = std::time::Duration::from_secs(60);

use bytes::Bytes;
use cache::PageCache;
use kvcache_client::Client;
use kvcache_core::Namespace;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

/// Worker settings.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Page cache bound in bytes.
    pub cache_bytes: u64,
    /// Threads for the attention kernels.
    pub threads: usize,
    /// Prefetch layer L+1 while answering layer L.
    pub prefetch: bool,
    /// Keep cached payloads in an [`arena::Arena`] of `cache_bytes` (plus a reserve of 1/64,
    /// at least 64 MiB, for the grown last pages of decode steps), faulted in at start (the
    /// worker's resident memory is then the cache bound from the first moment).
    pub cache_prefault: bool,
    /// Compute on this GPU, its page slots in HBM bounded by `cache_bytes` per page geometry
    /// ([`device`]); `None`: the CPU kernels.
    pub device: Option<Arc<kvcache_attention::gpu::Gpu>>,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            cache_bytes: 1 << 30,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            prefetch: true,
            cache_prefault: false,
            device: None,
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
    device: Option<Arc<device::DeviceCache>>,
    arena: Option<Arc<arena::Arena>>,
    cfg: WorkerConfig,
    /// Counters.
    pub counters: WorkerCounters,
    /// Work a call leaves running (lease releases, next-layer prefetch): shutdown waits for it.
    tasks: tokio_util::task::TaskTracker,
    /// The prefix of each sequence over one (learnt from lookups), for the warm path.
    prefixes: dashmap::DashMap<kvcache_core::SequenceKey, Arc<[kvcache_core::ContentKey]>>,
    /// Stripes that make concurrent pulls of one prefix a single pull.
    content_locks: Vec<tokio::sync::Mutex<()>>,
}

/// Stripes of [`Worker::content_locks`].
const CONTENT_STRIPES: usize = 64;

/// Why one sequence of a batch could not be answered.
enum SeqFailure {
    Miss(String),
    /// The layer changed between the lookup and the read (a concurrent append): read again.
    Raced(String),
    WriteFailed(String),
    /// The cached pages hold NaN or infinite values.
    BadData(String),
}

#[derive(Default)]
struct Fetched {
    /// The pages attention reads, from the first one its window or chunk touches.
    pages: Vec<(Bytes, usize)>,
    /// Tokens of the first page before the window (0 for full attention).
    skip: usize,
    /// Pages (indices into `pages`, which holds an empty payload there) a sparse read left for
    /// [`Self::from`] to serve by rows.
    unpulled: Vec<usize>,
    /// The owner the layer was read from.
    from: Option<kvcache_client::NodeRef>,
    bytes: u64,
    pulled: u64,
    cached: u64,
    /// Tokens attended (set when the pages go to the compute).
    context: u64,
    /// The last page is a page the worker held plus this step's token (an append applied
    /// here): the GPU mirror writes the token's rows in place instead of the whole page.
    grown: Option<Grown>,
}

/// The last page of a layer as the version it replaced plus the rows appended to it.
#[derive(Clone)]
pub(crate) struct Grown {
    /// The previous payload (the mirror matches it by identity: a held `Bytes`).
    pub(crate) old: Bytes,
    /// Its tokens.
    pub(crate) old_tokens: usize,
    /// The appended token's compact payload (one token).
    pub(crate) rows: Bytes,
    /// The page's geometry.
    pub(crate) layout: kvcache_core::PageLayout,
    /// The grown page is not built yet: the last entry of the pages it goes with is an empty
    /// placeholder, and whoever computes builds it ([`Grown::merge`]) and puts it there. A GPU
    /// step writes only the new rows to the device, so it builds the page while its kernels run
    /// instead of before them.
    pub(crate) pending: bool,
    /// Where the grown page is built: the page cache's arena (memory touched at start, and
    /// page-locked for the GPU), else a fresh allocation — whose first touch faulted in every
    /// 4 KiB of a step's grown pages (~600 faults per 64-sequence GPU step).
    pub(crate) arena: Option<Arc<arena::Arena>>,
}

impl Grown {
    /// The grown page: the previous payload with the token's rows appended to every plane.
    pub(crate) fn merge(&self) -> Bytes {
        let (l, old, n, rows) = (&self.layout, &self.old[..], self.old_tokens, &self.rows[..]);
        self.arena
            .as_ref()
            .and_then(|a| a.fill_with(old.len() + rows.len(), |dst| l.concat(old, n, rows, 1, dst)))
            .unwrap_or_else(|| Bytes::from(l.concat_vec(old, n, rows, 1)))
    }
}

impl Worker {
    /// A worker reading through `client`.
    pub fn new(client: Client, cfg: WorkerConfig) -> Arc<Self> {
        // The reserve holds the steps' grown last pages once pulled pages fill the rest.
        let reserve = (cfg.cache_bytes / 64).max(32 * arena::CHUNK as u64);
        let arena = if cfg.cache_prefault { arena::Arena::with_reserve(cfg.cache_bytes, reserve, true) } else { None };
        if cfg.cache_prefault && arena.is_none() {
            tracing::warn!(
                cache_bytes = cfg.cache_bytes,
                "no page-cache arena (under one 2 MiB chunk, or the mapping failed): cached pages stay in received buffers"
            );
        }
        Arc::new(Self {
            cache: PageCache::new(cfg.cache_bytes),
            device: cfg.device.clone().map(|g| Arc::new(device::DeviceCache::new(g, cfg.cache_bytes, arena.clone()))),
            arena,
            client,
            cfg,
            counters: WorkerCounters::default(),
            prefixes: dashmap::DashMap::new(),
            content_locks: (0..CONTENT_STRIPES).map(|_| tokio::sync::Mutex::new(())).collect(),
            tasks: tokio_util::task::TaskTracker::new(),
        })
    }

    /// The page cache.
    pub fn cache(&self) -> &PageCache {
        &self.cache
    }

    /// The GPU page slots, when the worker computes on a GPU.
    pub fn device(&self) -> Option<&device::DeviceCache> {
        self.device.as_deref()
    }

    pub(crate) async fn namespace(&self, name: &str) -> Option<Namespace> {
        if let Some(n) = self.client.namespace(name) {
            return Some(n);
        }
        self.client.refresh().await.ok()?;
        self.client.namespace(name)
    }
}
