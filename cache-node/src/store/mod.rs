//! The page store: pool files, the index, the write path, eviction, leases and recovery.
//!
//! Index: `sequences` maps a [`SequenceKey`] to its [`Sequence`], whose mutex guards per-layer
//! vectors of [`PageEntry`] (40 bytes: file, slot, tokens, CRC, write_seq, prefix hash). The
//! per-sequence mutex serializes appends to one sequence and is the point where readers take
//! holds and writers publish and retire slots.
//!
//! Write path: validate → take a slot (evicting if full) → write payload, then header with CRC
//! (→ msync the slot under `sync` durability) → publish under the sequence lock, keeping the
//! newest write_seq → retire the replaced slot (freed when its last reader drops).
//!
//! Eviction: exactly the least-recently-used whole sequence, found in an ordered map of
//! last-use ticks in O(log n) per entry examined: a touch is one atomic store, and eviction
//! re-files entries touched since they were filed (each touch costs at most one re-filing). LRU because KV-cache reuse is strongly recency-driven (a conversation's next turn, a
//! shared system prompt) and whole sequences because a partial sequence is useless to a decode.
//! Leased sequences are skipped; if nothing can be evicted the write is RESOURCE_EXHAUSTED.
//!
//! Recovery: every pool file is scanned in parallel; headers are verified, payload CRCs too
//! unless the previous shutdown was clean (then a page's payload CRC is checked on its first
//! read instead); the newest write of each page is kept, the rest freed.
//!
//! One room per concern: [`namespaces`] (the registry), [`slots`] (allocation, striping, pool
//! growth), [`writes`] (puts, appends, publish, retire, deletes), [`reads`] (gets, extents), [`content`] (content pages: dedup, conflicts, prefix matches), [`chains`] (sequences over a
//! cached prefix),
//! [`eviction`], [`leases`], [`tenants`] (per-tenant bytes, quota shares, reserved shares),
//! [`stats`] (stats, flushes, shutdown), [`recovery`]. This file holds
//! the types and the epoch.

use crate::pool::{self, PoolFile};
use bytes::Bytes;
use dashmap::DashMap;
use kvcache_core::page::{HEADER_BYTES, PageHeader};
use kvcache_core::spec::LayerKind;
use kvcache_core::validate::{self, AppendCmd, ValidPage, ValidationError};
use kvcache_core::{Namespace, PageKey, PageLayout, SequenceKey};
use parking_lot::{Mutex, RwLock};
use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

mod chains;
mod content;
mod eviction;
mod leases;
mod namespaces;
mod reads;
mod recovery;
mod slots;
mod stats;
mod tenants;
mod writes;

pub use tenants::{TenantLedger, TenantShare, TenantStats};

/// When a put is acknowledged relative to its flush.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Flushed in the background (every `flush_interval`).
    Async,
    /// The page's slot is msync'ed before the put or append is acknowledged.
    Sync,
}

impl std::str::FromStr for Durability {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "async" => Ok(Self::Async),
            "sync" => Ok(Self::Sync),
            _ => Err(format!("unknown durability {s:?}: expected async or sync")),
        }
    }
}

/// How a put treats a page already held under the same key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutMode {
    /// Replace it (a client's write).
    Write,
    /// Keep a held page with at least as many tokens (a handoff copy from another node never
    /// clobbers a newer append that reached this one).
    Handoff,
}

/// Page store configuration.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Directory of the pool files, the namespace registry and the clean-shutdown marker.
    pub data_dir: PathBuf,
    /// Total bytes of pool files, never exceeded.
    pub capacity: u64,
    /// Flush policy.
    pub durability: Durability,
    /// Largest pool file (default 64 MiB; files are smaller when the capacity is small).
    pub segment_bytes: u64,
    /// Background flush period under async durability.
    pub flush_interval: Duration,
    /// Sees every pool-file write and flush: a power-loss simulation in tests
    /// ([`crate::powerloss::PowerLoss`]); `None` in production.
    pub storage: Option<Arc<dyn crate::powerloss::StorageObserver>>,
}

impl StoreConfig {
    /// Defaults for `data_dir` and `capacity`.
    pub fn new(data_dir: impl Into<PathBuf>, capacity: u64) -> Self {
        Self {
            data_dir: data_dir.into(),
            capacity,
            durability: Durability::Async,
            segment_bytes: 64 << 20,
            flush_interval: Duration::from_millis(100),
            storage: None,
        }
    }
}

/// What went wrong in the store. Mapped to a gRPC status in exactly one place (the service).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Malformed input.
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    /// The namespace is not registered on this node.
    #[error("unknown namespace {0:?}")]
    UnknownNamespace(String),
    /// A namespace of that name exists with another definition.
    #[error("namespace {0:?} already exists with a different definition (namespaces are immutable)")]
    NamespaceConflict(String),
    /// The write was routed with an older shard-map epoch.
    #[error("stale epoch {got}: this node is at epoch {current}; refresh the shard map and retry")]
    StaleEpoch {
        /// Epoch of the request.
        got: u64,
        /// Node epoch.
        current: u64,
    },
    /// No space and nothing evictable.
    #[error("node full: {0}")]
    Full(String),
    /// The tenant is at its share of its quota on this node and nothing of its own is
    /// evictable (all leased or in use).
    #[error(
        "tenant {tenant:?} is at its quota on this node ({held} of {share} bytes) and none of its own sequences can be evicted (leased or in use)"
    )]
    Quota {
        /// The tenant.
        tenant: String,
        /// Its share here.
        share: u64,
        /// Bytes it holds here.
        held: u64,
    },
    /// A content page put with other bytes than the page held under its key: never
    /// overwritten (it means a key collision or an engine that keys pages wrongly).
    #[error(
        "content page {key} layer {layer} is held with other bytes (CRC {held:#010x}, put {put:#010x}): refused, never overwritten"
    )]
    ContentConflict {
        /// The key (hex).
        key: String,
        /// Layer.
        layer: u32,
        /// CRC of the held page.
        held: u32,
        /// CRC of the page put.
        put: u32,
    },
    /// An append's expected position did not match.
    #[error("append position mismatch: layer {layer} has {actual} tokens, request expected {expected}")]
    Position {
        /// Layer.
        layer: u32,
        /// Sent.
        expected: u64,
        /// Stored.
        actual: u64,
    },
    /// The sequence is not held.
    #[error("sequence {0:?} not found")]
    NoSequence(String),
    /// CreateSequence of a sequence that exists with another prefix (or with pages of its own).
    #[error("sequence {0:?} already exists with another prefix or pages of its own; delete it first")]
    SequenceExists(String),
    /// Disk or mapping failure.
    #[error("storage error: {0}")]
    Io(#[from] io::Error),
    /// The partial last page an append extends failed verification and was dropped: the
    /// sequence cannot be extended, only recomputed.
    #[error("the partial last page {} of layer {} of sequence {:?} was lost (it failed verification); recompute the sequence", .0.page_index, .0.layer, .0.sequence.sequence_id)]
    PartialPageLost(PageKey),
    /// The data directory is held by another process, or cannot be taken.
    #[error(transparent)]
    DataDir(#[from] kvcache_net::DataDirError),
}

/// Index entry of one stored page.
#[derive(Debug, Clone, Copy)]
struct PageEntry {
    file: u32,
    slot: u32,
    tokens: u32,
    /// Payload bytes (the layer's layout: model rows, indexer keys or a state page).
    len: u32,
    crc: u32,
    write_seq: u64,
    prefix_hash: u64,
    /// False after a clean restart until the payload CRC was checked on first read.
    verified: bool,
}

/// A namespace as the node holds it.
#[derive(Debug)]
pub struct NsEntry {
    /// The namespace.
    pub ns: Namespace,
    /// Its page layout.
    pub layout: PageLayout,
    /// Slot size class of its pages.
    pub slot_bytes: usize,
    /// Prefix-reuse counters of this namespace on this node.
    pub counters: NsCounters,
    /// Its tenant's account on this node.
    pub tenant: Arc<TenantLedger>,
}

/// Per-namespace counters (Stats and metrics).
#[derive(Debug, Default)]
pub struct NsCounters {
    /// Page reads served.
    pub get_hits: AtomicU64,
    /// Page reads missed.
    pub get_misses: AtomicU64,
    /// Content pages put again with the same bytes: acknowledged, nothing written.
    pub dedup_hits: AtomicU64,
    /// Content pages put again with other bytes: refused (a collision or a buggy engine).
    pub conflicts: AtomicU64,
    /// Sequences (a content key counts as one) evicted.
    pub evictions: AtomicU64,
    /// Keys a MatchPrefix found with every layer present.
    pub match_hits: AtomicU64,
    /// Keys a MatchPrefix asked for and did not find whole.
    pub match_misses: AtomicU64,
    /// Pages of sliding-window and chunked layers released once outside what attention reads.
    pub window_releases: AtomicU64,
}

/// What one namespace holds on this node and how its reads went.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NamespaceStats {
    /// Name.
    pub name: String,
    /// Its tenant.
    pub tenant: String,
    /// Sequences held (content keys not counted).
    pub sequences: u64,
    /// Content keys held (each with up to one page per layer).
    pub content_keys: u64,
    /// Pages held.
    pub pages: u64,
    /// Bytes of pages held (header + payload).
    pub bytes: u64,
    /// Tokens of layer 0 over the sequences (content pages included).
    pub tokens: u64,
    /// Counters, as in [`NsCounters`].
    pub get_hits: u64,
    /// Page reads missed.
    pub get_misses: u64,
    /// Dedup hits.
    pub dedup_hits: u64,
    /// Refused conflicting puts.
    pub conflicts: u64,
    /// Evictions.
    pub evictions: u64,
    /// Match hits (keys).
    pub match_hits: u64,
    /// Match misses (keys).
    pub match_misses: u64,
    /// Window pages released.
    pub window_releases: u64,
}

/// What a put did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PutOutcome {
    /// Pages written.
    pub written: u64,
    /// Payload bytes written.
    pub bytes: u64,
    /// Content pages already held with the same bytes (nothing written).
    pub deduplicated: u64,
}

struct Sequence {
    key: SequenceKey,
    ns: Arc<NsEntry>,
    inner: Mutex<SeqInner>,
    /// Tick of the last use (written lock-free by every read and write).
    last_use: AtomicU64,
    /// The key this sequence is filed under in the eviction order (≤ `last_use`; changed only
    /// under that order's lock).
    lru_key: AtomicU64,
}

#[derive(Default)]
struct SeqInner {
    layers: Vec<Vec<Option<PageEntry>>>,
    /// Set when evicted or deleted: the sequence is no longer in the map.
    removed: bool,
    /// (lease id, expiry).
    leases: Vec<(u64, Instant)>,
    /// The content pages this sequence starts with (see `chains`): its own pages follow them.
    prefix: Option<Arc<[kvcache_core::ContentKey]>>,
}

impl SeqInner {
    fn pinned(&self, now: Instant) -> bool {
        self.leases.iter().any(|&(_, t)| t > now)
    }

    fn layer_tokens(&self, layer: usize, page_tokens: u32) -> u64 {
        match self.layers.get(layer).and_then(|l| l.iter().rposition(|p| p.is_some()).map(|i| (i, l[i]))) {
            Some((i, Some(e))) => i as u64 * page_tokens as u64 + e.tokens as u64,
            _ => self.prefix_pages() as u64 * page_tokens as u64,
        }
    }

    fn prefix_pages(&self) -> usize {
        self.prefix.as_ref().map_or(0, |p| p.len())
    }
}

/// A page read from the store.
#[derive(Debug, Clone)]
pub struct StoredPage {
    /// Tokens.
    pub token_count: u32,
    /// Write sequence number.
    pub write_seq: u64,
    /// Payload CRC-32C.
    pub crc: u32,
    /// Prefix hash.
    pub prefix_hash: u64,
    /// Payload: a slice of the mapping holding the slot.
    pub payload: Bytes,
}

/// The result of an append for one layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// Tokens in the layer after the append.
    pub tokens: u64,
    /// write_seq of the page now holding the layer's last token.
    pub last_write_seq: u64,
}

/// Per-layer extent for lookups.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerExtent {
    /// Layer.
    pub layer: u32,
    /// Tokens.
    pub tokens: u64,
    /// Pages present.
    pub pages: u32,
    /// write_seq per page index (0 = missing; the prefix's pages are 0).
    pub write_seqs: Vec<u64>,
    /// Leading pages that are the sequence's prefix (content pages held elsewhere).
    pub prefix_pages: u32,
}

/// Store counters and gauges.
#[derive(Debug, Clone, Default)]
pub struct StoreStats {
    /// Capacity.
    pub capacity_bytes: u64,
    /// Bytes of pool files.
    pub pool_bytes: u64,
    /// Bytes of stored pages (header + payload).
    pub used_bytes: u64,
    /// Pages.
    pub pages: u64,
    /// Sequences.
    pub sequences: u64,
    /// Sequences evicted.
    pub evictions: u64,
    /// Unexpired leases.
    pub active_leases: u64,
    /// Index memory in bytes (measured from the live structures).
    pub index_bytes: u64,
    /// Pool files in service.
    pub pool_files: u64,
    /// Pool files taken out of service.
    pub pool_files_failed: u64,
    /// Page reads served.
    pub get_hits: u64,
    /// Page reads missed.
    pub get_misses: u64,
    /// Pages dropped because they did not verify.
    pub corrupt_pages_dropped: u64,
    /// Leases granted since start.
    pub leases_granted: u64,
    /// Per namespace.
    pub namespaces: Vec<NamespaceStats>,
    /// Per tenant.
    pub tenants: Vec<TenantStats>,
    /// Last recovery: seconds and bytes scanned.
    pub recovery_seconds: f64,
    /// Bytes of pool files scanned by the last recovery.
    pub recovery_bytes: u64,
}

#[derive(Default)]
struct Pools {
    files: Vec<Option<Arc<PoolFile>>>,
    total_bytes: u64,
}

/// Files of one size class that concurrent writers are spread over (see `alloc_slot`).
const WRITE_STRIPES: usize = 8;

/// This thread's stripe: threads are numbered round-robin on their first write.
fn write_stripe() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static STRIPE: usize = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    STRIPE.with(|s| *s)
}

#[derive(Default)]
struct Counters {
    pages: AtomicU64,
    used_bytes: AtomicU64,
    evictions: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
    corrupt: AtomicU64,
    leases: AtomicU64,
}

/// The page store of one cache node.
pub struct PageStore {
    /// The exclusive hold on `cfg.data_dir`, released when the store is dropped.
    _dir_lock: kvcache_net::DataDirLock,
    cfg: StoreConfig,
    namespaces: RwLock<HashMap<String, Arc<NsEntry>>>,
    tenants: RwLock<HashMap<String, Arc<TenantLedger>>>,
    ns_by_id: RwLock<HashMap<u64, Arc<NsEntry>>>,
    pools: RwLock<Pools>,
    sequences: DashMap<SequenceKey, Arc<Sequence>>,
    prefixes: DashMap<(u64, u64), u32>,
    leases: DashMap<u64, SequenceKey>,
    write_seq: AtomicU64,
    tick: AtomicU64,
    /// Eviction order: each live sequence under a tick no later than its last use (`lru_key`).
    /// Touches do not move entries; eviction re-files an entry it finds touched since, so the
    /// first entry whose key is its last use is exactly the least recently used.
    lru: Mutex<std::collections::BTreeMap<u64, Arc<Sequence>>>,
    epoch: AtomicU64,
    lease_seq: AtomicU64,
    /// Page bytes written since start under async durability, and how many of them the last
    /// completed flush covered.
    bytes_written: AtomicU64,
    bytes_flushed: AtomicU64,
    counters: Counters,
    recovery: Mutex<(f64, u64)>,
    /// Serializes namespace registry writes.
    ns_file: Mutex<()>,
}

const CLEAN_MARKER: &str = "CLEAN";
/// Slots are whole 4 KiB pages of the mapping.
const SLOT_ALIGN: usize = 4096;

/// Slot size class of a namespace: header + full page, rounded up to 4 KiB.
pub fn slot_bytes_for(layout: &PageLayout) -> usize {
    (HEADER_BYTES + layout.page_bytes()).div_ceil(SLOT_ALIGN) * SLOT_ALIGN
}

fn fsync_dir(dir: &Path) -> io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

impl PageStore {
    /// Open (or create) the store under `cfg.data_dir`, recovering every verifiable page.
    pub fn open(cfg: StoreConfig) -> Result<Arc<PageStore>, StoreError> {
        // Before anything in the directory is read or written: a second process on it is
        // refused here, not after it has touched live pool files.
        let dir_lock = kvcache_net::DataDirLock::acquire(&cfg.data_dir)?;
        let store = Arc::new(PageStore {
            _dir_lock: dir_lock,
            namespaces: RwLock::new(HashMap::new()),
            tenants: RwLock::new(HashMap::new()),
            ns_by_id: RwLock::new(HashMap::new()),
            pools: RwLock::new(Pools::default()),
            sequences: DashMap::new(),
            prefixes: DashMap::new(),
            leases: DashMap::new(),
            write_seq: AtomicU64::new(1),
            tick: AtomicU64::new(1),
            lru: Mutex::new(std::collections::BTreeMap::new()),
            epoch: AtomicU64::new(0),
            lease_seq: AtomicU64::new(
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64),
            ),
            bytes_written: AtomicU64::new(0),
            bytes_flushed: AtomicU64::new(0),
            counters: Counters::default(),
            recovery: Mutex::new((0.0, 0)),
            ns_file: Mutex::new(()),
            cfg,
        });
        store.load_namespaces()?;
        store.recover()?;
        if store.cfg.durability == Durability::Async {
            let weak = Arc::downgrade(&store);
            let period = store.cfg.flush_interval;
            std::thread::Builder::new().name("kvcache-flush".into()).spawn(move || stats::flusher(weak, period))?;
        }
        Ok(store)
    }

    /// The configuration.
    pub fn config(&self) -> &StoreConfig {
        &self.cfg
    }

    // ---- epoch ----

    /// The node's shard-map epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Learn a newer epoch (never goes backwards).
    pub fn advance_epoch(&self, epoch: u64) {
        self.epoch.fetch_max(epoch, Ordering::AcqRel);
    }

    /// Refuse writes routed with an epoch the node has moved past. Epoch 0 (unrouted) is
    /// accepted only while the node itself is at epoch 0 (standalone).
    pub fn check_epoch(&self, epoch: u64) -> Result<(), StoreError> {
        let current = self.epoch();
        if epoch < current {
            return Err(StoreError::StaleEpoch { got: epoch, current });
        }
        Ok(())
    }
}
