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
//! Eviction: least-recently-used whole sequences, chosen by a scan of last-use ticks at eviction
//! time. LRU because KV-cache reuse is strongly recency-driven (a conversation's next turn, a
//! shared system prompt) and whole sequences because a partial sequence is useless to a decode.
//! Leased sequences are skipped; if nothing can be evicted the write is RESOURCE_EXHAUSTED.
//!
//! Recovery: every pool file is scanned in parallel; headers are verified, payload CRCs too
//! unless the previous shutdown was clean (then a page's payload CRC is checked on its first
//! read instead); the newest write of each page is kept, the rest freed.

use crate::pool::{self, PoolFile};
use bytes::Bytes;
use dashmap::DashMap;
use kvcache_core::page::{HEADER_BYTES, PageHeader};
use kvcache_core::validate::{self, AppendCmd, ValidPage, ValidationError};
use kvcache_core::{Namespace, PageKey, PageLayout, SequenceKey};
use parking_lot::{Mutex, RwLock};
use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

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
}

struct Sequence {
    key: SequenceKey,
    ns: Arc<NsEntry>,
    inner: Mutex<SeqInner>,
    last_use: AtomicU64,
}

#[derive(Default)]
struct SeqInner {
    layers: Vec<Vec<Option<PageEntry>>>,
    /// Set when evicted or deleted: the sequence is no longer in the map.
    removed: bool,
    /// (lease id, expiry).
    leases: Vec<(u64, Instant)>,
}

impl SeqInner {
    fn pinned(&self, now: Instant) -> bool {
        self.leases.iter().any(|&(_, t)| t > now)
    }

    fn layer_tokens(&self, layer: usize, page_tokens: u32) -> u64 {
        match self.layers.get(layer).and_then(|l| l.iter().rposition(|p| p.is_some()).map(|i| (i, l[i]))) {
            Some((i, Some(e))) => i as u64 * page_tokens as u64 + e.tokens as u64,
            _ => 0,
        }
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
    /// write_seq per page index (0 = missing).
    pub write_seqs: Vec<u64>,
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
    /// Per namespace: (name, sequences, pages, bytes, tokens of layer 0).
    pub namespaces: Vec<(String, u64, u64, u64, u64)>,
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
    ns_by_id: RwLock<HashMap<u64, Arc<NsEntry>>>,
    pools: RwLock<Pools>,
    sequences: DashMap<SequenceKey, Arc<Sequence>>,
    prefixes: DashMap<(u64, u64), u32>,
    leases: DashMap<u64, SequenceKey>,
    write_seq: AtomicU64,
    tick: AtomicU64,
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
            ns_by_id: RwLock::new(HashMap::new()),
            pools: RwLock::new(Pools::default()),
            sequences: DashMap::new(),
            prefixes: DashMap::new(),
            leases: DashMap::new(),
            write_seq: AtomicU64::new(1),
            tick: AtomicU64::new(1),
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
            std::thread::Builder::new().name("kvcache-flush".into()).spawn(move || flusher(weak, period))?;
        }
        Ok(store)
    }

    /// The configuration.
    pub fn config(&self) -> &StoreConfig {
        &self.cfg
    }

    // ---- namespaces ----

    fn load_namespaces(&self) -> Result<(), StoreError> {
        for ns in crate::registry::load(&self.cfg.data_dir)? {
            self.insert_namespace(ns);
        }
        Ok(())
    }

    fn insert_namespace(&self, ns: Namespace) -> Arc<NsEntry> {
        let layout = ns.layout();
        let entry = Arc::new(NsEntry { slot_bytes: slot_bytes_for(&layout), layout, ns });
        self.ns_by_id.write().insert(entry.ns.id(), entry.clone());
        self.namespaces.write().insert(entry.ns.name.clone(), entry.clone());
        entry
    }

    fn save_namespaces(&self) -> Result<(), StoreError> {
        let mut all = self.namespaces();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(crate::registry::save(&self.cfg.data_dir, &all)?)
    }

    /// Register a namespace (idempotent for an identical definition). Returns whether it was new.
    pub fn ensure_namespace(&self, ns: Namespace) -> Result<bool, StoreError> {
        let _g = self.ns_file.lock();
        if let Some(e) = self.namespace(&ns.name) {
            return if e.ns.same_definition(&ns) { Ok(false) } else { Err(StoreError::NamespaceConflict(ns.name)) };
        }
        let slot = slot_bytes_for(&ns.layout());
        if slot as u64 > self.cfg.capacity {
            return Err(StoreError::Full(format!(
                "a page of namespace {} needs a {slot}-byte slot, capacity is {} bytes",
                ns.name, self.cfg.capacity
            )));
        }
        self.insert_namespace(ns);
        self.save_namespaces()?;
        Ok(true)
    }

    /// A registered namespace.
    pub fn namespace(&self, name: &str) -> Option<Arc<NsEntry>> {
        self.namespaces.read().get(name).cloned()
    }

    /// Every registered namespace.
    pub fn namespaces(&self) -> Vec<Namespace> {
        self.namespaces.read().values().map(|e| e.ns.clone()).collect()
    }

    fn ns_of(&self, name: &str) -> Result<Arc<NsEntry>, StoreError> {
        self.namespace(name).ok_or_else(|| StoreError::UnknownNamespace(name.to_owned()))
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

    // ---- slots ----

    fn file(&self, id: u32) -> Option<Arc<PoolFile>> {
        self.pools.read().files.get(id as usize).and_then(|f| f.clone())
    }

    fn slots_per_file(&self, slot_bytes: usize) -> u32 {
        let seg = self.cfg.segment_bytes.min(self.cfg.capacity / 4).max(slot_bytes as u64);
        ((seg / slot_bytes as u64).max(1)).min(u32::MAX as u64) as u32
    }

    /// Take a slot of `slot_bytes`, growing the pool or evicting LRU sequences (never `exclude`).
    ///
    /// Writers are spread over up to [`WRITE_STRIPES`] files of the class: a buffered `pwrite`
    /// holds the file's inode lock for the whole copy, so concurrent puts into one file run one
    /// at a time (and spin on the lock). Each thread has a stripe number and starts its search
    /// at the class's open file of that number; while the pool is under half its capacity, a
    /// thread whose number is past the class's open files opens another file rather than share
    /// (so a class has at most `WRITE_STRIPES` files with free slots it opened for this).
    fn alloc_slot(&self, slot_bytes: usize, exclude: &SequenceKey) -> Result<(Arc<PoolFile>, u32), StoreError> {
        let stripe = write_stripe() % WRITE_STRIPES;
        let mut may_stripe = true;
        // Bounded: each round evicts a sequence or fails.
        for _ in 0..100_000 {
            let eager = {
                let pools = self.pools.read();
                let open: Vec<&Arc<PoolFile>> =
                    pools.files.iter().flatten().filter(|f| f.slot_bytes == slot_bytes && f.has_free()).collect();
                let eager = may_stripe && stripe >= open.len() && self.room_to_stripe(&pools, slot_bytes);
                if !eager && !open.is_empty() {
                    let k = stripe % open.len();
                    for f in open[k..].iter().chain(&open[..k]) {
                        if let Some(s) = f.alloc() {
                            return Ok(((*f).clone(), s));
                        }
                    }
                }
                eager
            };
            if eager {
                // A file that only spreads writers: if it cannot be had, share an open one.
                may_stripe = false;
                match self.grow(slot_bytes, Some(stripe)) {
                    Ok(Some(r)) => return Ok(r),
                    Ok(None) => continue,
                    Err(e) => {
                        tracing::warn!(error = %e, "could not open another pool file to spread writes");
                        continue;
                    }
                }
            }
            if let Some(r) = self.grow(slot_bytes, None)? {
                return Ok(r);
            }
            if !self.evict_one(exclude) {
                return Err(StoreError::Full(format!(
                    "no free {slot_bytes}-byte slot within the {}-byte capacity and every resident sequence is leased or in use",
                    self.cfg.capacity
                )));
            }
        }
        Err(StoreError::Full("eviction did not free a slot".into()))
    }

    /// Whether a class may open one more file to spread writers: only while the pool, with that
    /// file, stays within half its capacity, so striping never crowds out other size classes.
    fn room_to_stripe(&self, pools: &Pools, slot_bytes: usize) -> bool {
        let bytes = self.slots_per_file(slot_bytes) as u64 * slot_bytes as u64;
        pools.total_bytes + bytes <= self.cfg.capacity / 2
    }

    /// Create a pool file of `slot_bytes` slots if the capacity allows, reclaiming empty files
    /// of other size classes first when it does not. `stripe`: a file opened only so that
    /// writer stripe has a file of its own; nothing is reclaimed for it, and `None` (the stripe
    /// has a file by now, or there is no room) means "take a slot from an open file".
    fn grow(&self, slot_bytes: usize, stripe: Option<usize>) -> Result<Option<(Arc<PoolFile>, u32)>, StoreError> {
        let mut pools = self.pools.write();
        if let Some(stripe) = stripe {
            let open = pools.files.iter().flatten().filter(|f| f.slot_bytes == slot_bytes && f.has_free()).count();
            if stripe < open || !self.room_to_stripe(&pools, slot_bytes) {
                return Ok(None);
            }
        } else {
            // Another thread may have grown the class meanwhile.
            for f in pools.files.iter().flatten() {
                if f.slot_bytes == slot_bytes
                    && let Some(s) = f.alloc()
                {
                    return Ok(Some((f.clone(), s)));
                }
            }
        }
        let mut slots = self.slots_per_file(slot_bytes);
        let mut bytes = slots as u64 * slot_bytes as u64;
        if pools.total_bytes + bytes > self.cfg.capacity {
            // Return the capacity of empty files (any class, including failed ones).
            let empty: Vec<u32> =
                pools.files.iter().flatten().filter(|f| f.try_remove_if_empty()).map(|f| f.id).collect();
            for id in empty {
                if let Some(f) = pools.files[id as usize].take() {
                    pools.total_bytes -= f.file_bytes();
                    let _ = std::fs::remove_file(&f.path);
                }
            }
        }
        if pools.total_bytes + bytes > self.cfg.capacity {
            // Fit what is left, if at least one slot.
            let left = self.cfg.capacity - pools.total_bytes.min(self.cfg.capacity);
            slots = (left / slot_bytes as u64) as u32;
            if slots == 0 {
                return Ok(None);
            }
            bytes = slots as u64 * slot_bytes as u64;
        }
        let id = pools.files.len() as u32;
        let f = Arc::new(PoolFile::create(&self.cfg.data_dir, id, slot_bytes, slots, self.cfg.storage.clone())?);
        fsync_dir(&self.cfg.data_dir)?;
        pools.total_bytes += bytes;
        let s = f.alloc().expect("a new pool file has free slots");
        pools.files.push(Some(f.clone()));
        Ok(Some((f, s)))
    }

    // ---- eviction ----

    /// Evict the least recently used sequence that is not leased, not locked and not
    /// `exclude`. Returns false when there is none.
    fn evict_one(&self, exclude: &SequenceKey) -> bool {
        let now = Instant::now();
        let mut victim: Option<Arc<Sequence>> = None;
        for e in self.sequences.iter() {
            let s = e.value();
            if &s.key == exclude {
                continue;
            }
            let Some(inner) = s.inner.try_lock() else { continue };
            if inner.removed || inner.pinned(now) {
                continue;
            }
            drop(inner);
            if victim.as_ref().is_none_or(|v| s.last_use.load(Ordering::Relaxed) < v.last_use.load(Ordering::Relaxed)) {
                victim = Some(s.clone());
            }
        }
        let Some(v) = victim else { return false };
        let Some(mut inner) = v.inner.try_lock() else { return true };
        if inner.removed || inner.pinned(now) {
            return true;
        }
        self.remove_sequence_locked(&v, &mut inner);
        self.counters.evictions.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Drop every page of a locked sequence and unlink it from the map.
    fn remove_sequence_locked(&self, seq: &Arc<Sequence>, inner: &mut SeqInner) -> u64 {
        let mut n = 0;
        for layer in std::mem::take(&mut inner.layers) {
            for e in layer.into_iter().flatten() {
                self.retire_entry(&seq.ns, &e, true);
                n += 1;
            }
        }
        inner.removed = true;
        for (id, _) in inner.leases.drain(..) {
            self.leases.remove(&id);
        }
        self.sequences.remove_if(&seq.key, |_, v| Arc::ptr_eq(v, seq));
        n
    }

    fn retire_entry(&self, ns: &NsEntry, e: &PageEntry, layer0: bool) {
        if let Some(f) = self.file(e.file) {
            f.retire(e.slot);
        }
        self.counters.pages.fetch_sub(1, Ordering::Relaxed);
        self.counters
            .used_bytes
            .fetch_sub((HEADER_BYTES + ns.layout.payload_bytes(e.tokens as usize)) as u64, Ordering::Relaxed);
        if e.prefix_hash != 0 && layer0 {
            self.prefixes.remove_if_mut(&(ns.ns.id(), e.prefix_hash), |_, c| {
                *c -= 1;
                *c == 0
            });
        }
    }

    // ---- writes ----

    fn touch(&self, seq: &Sequence) {
        seq.last_use.store(self.tick.fetch_add(1, Ordering::Relaxed), Ordering::Relaxed);
    }

    fn sequence(&self, ns: &Arc<NsEntry>, key: &SequenceKey) -> Arc<Sequence> {
        self.sequences
            .entry(key.clone())
            .or_insert_with(|| {
                Arc::new(Sequence {
                    key: key.clone(),
                    ns: ns.clone(),
                    inner: Mutex::new(SeqInner::default()),
                    last_use: AtomicU64::new(self.tick.fetch_add(1, Ordering::Relaxed)),
                })
            })
            .clone()
    }

    /// Write one page into a fresh slot (not yet published).
    fn write_slot(
        &self,
        ns: &NsEntry,
        key: &PageKey,
        tokens: u32,
        prefix_hash: u64,
        payload: &[u8],
        crc: u32,
    ) -> Result<PageEntry, StoreError> {
        let (file, slot) = self.alloc_slot(ns.slot_bytes, &key.sequence)?;
        let write_seq = self.write_seq.fetch_add(1, Ordering::AcqRel);
        let header = PageHeader {
            codec: ns.ns.codec,
            namespace_id: ns.ns.id(),
            sequence_id: key.sequence.sequence_id.clone(),
            layer: key.layer,
            page_index: key.page_index,
            token_count: tokens,
            payload_len: payload.len() as u32,
            write_seq,
            prefix_hash,
            payload_crc: crc,
        };
        if let Err(e) = file.write_page(slot, &header.encode(), payload) {
            tracing::error!(file = %file.path.display(), error = %e, "page write failed: pool file taken out of service");
            return Err(e.into());
        }
        if self.cfg.durability == Durability::Sync {
            if let Err(e) = file.flush_slot(slot) {
                tracing::error!(file = %file.path.display(), error = %e, "msync failed: pool file taken out of service");
                return Err(e.into());
            }
        } else {
            // Flushed later, in the background: counted in the writeback backlog until then.
            self.bytes_written.fetch_add(payload.len() as u64, Ordering::AcqRel);
        }
        Ok(PageEntry { file: file.id, slot, tokens, crc, write_seq, prefix_hash, verified: true })
    }

    /// Publish `entry` at `key` in a locked sequence, keeping the newest write (and, for a
    /// `handoff` copy, keeping any held page with at least as many tokens). Returns whether
    /// `entry` was published; if not, its slot is freed.
    fn publish_locked(
        &self,
        seq: &Sequence,
        inner: &mut SeqInner,
        key: &PageKey,
        entry: PageEntry,
        handoff: bool,
    ) -> bool {
        let layers = &mut inner.layers;
        if layers.len() <= key.layer as usize {
            layers.resize_with(key.layer as usize + 1, Vec::new);
        }
        let pages = &mut layers[key.layer as usize];
        if pages.len() <= key.page_index as usize {
            pages.resize(key.page_index as usize + 1, None);
        }
        let slot = &mut pages[key.page_index as usize];
        let layer0 = key.layer == 0;
        if let Some(o) = slot
            && (o.write_seq > entry.write_seq || (handoff && o.tokens >= entry.tokens))
        {
            // The held page wins: the new slot was never counted, only free it.
            if let Some(f) = self.file(entry.file) {
                f.retire(entry.slot);
            }
            return false;
        }
        let old = slot.replace(entry);
        self.counters.pages.fetch_add(1, Ordering::Relaxed);
        self.counters
            .used_bytes
            .fetch_add((HEADER_BYTES + seq.ns.layout.payload_bytes(entry.tokens as usize)) as u64, Ordering::Relaxed);
        if entry.prefix_hash != 0 && layer0 {
            *self.prefixes.entry((seq.ns.ns.id(), entry.prefix_hash)).or_insert(0) += 1;
        }
        if let Some(o) = old {
            self.retire_entry(&seq.ns, &o, layer0);
        }
        true
    }

    /// Store pages validated against their namespaces (`kvcache_core::validate::page`; the
    /// service validates, and fences stale epochs, before calling). Returns pages and payload
    /// bytes stored.
    pub fn put_pages(&self, pages: Vec<ValidPage>, mode: PutMode) -> Result<(u64, u64), StoreError> {
        let (mut n, mut bytes) = (0, 0);
        for v in pages {
            let ns = self.ns_of(&v.key.sequence.namespace)?;
            let handoff = mode == PutMode::Handoff;
            if handoff && self.holds_at_least(&v.key, v.token_count) {
                continue; // skip the write; the check is repeated under the lock at publish
            }
            let entry = self.write_slot(&ns, &v.key, v.token_count, v.prefix_hash, &v.payload, v.payload_crc)?;
            if self.publish_retrying(&ns, &v.key, entry, handoff) {
                n += 1;
                bytes += v.payload.len() as u64;
            }
        }
        Ok((n, bytes))
    }

    /// The registered namespaces by name: what a caller validates pages against.
    pub fn namespace_table(&self) -> HashMap<String, Arc<NsEntry>> {
        self.namespaces.read().clone()
    }

    /// Whether the page at `key` is held with at least `tokens` tokens.
    fn holds_at_least(&self, key: &PageKey, tokens: u32) -> bool {
        let Some(seq) = self.sequences.get(&key.sequence).map(|s| s.clone()) else { return false };
        let inner = seq.inner.lock();
        !inner.removed
            && inner
                .layers
                .get(key.layer as usize)
                .and_then(|l| l.get(key.page_index as usize))
                .is_some_and(|e| e.is_some_and(|e| e.tokens >= tokens))
    }

    fn publish_retrying(&self, ns: &Arc<NsEntry>, key: &PageKey, entry: PageEntry, handoff: bool) -> bool {
        loop {
            let seq = self.sequence(ns, &key.sequence);
            let mut inner = seq.inner.lock();
            if inner.removed {
                continue; // evicted or deleted meanwhile: publish into a fresh sequence
            }
            let published = self.publish_locked(&seq, &mut inner, key, entry, handoff);
            drop(inner);
            self.touch(&seq);
            return published;
        }
    }

    /// Keys of every sequence held.
    pub fn sequence_keys(&self) -> Vec<SequenceKey> {
        self.sequences.iter().map(|e| e.key().clone()).collect()
    }

    /// Apply a validated append (`kvcache_core::validate::append`): its tokens go to the end of
    /// each of its layers, the partial last page copied on write.
    pub fn append(&self, cmd: &AppendCmd) -> Result<Vec<Appended>, StoreError> {
        let AppendCmd { sequence: key, layers, tokens, payload, expected_position } = cmd;
        let (tokens, expected_position) = (*tokens, *expected_position);
        let ns = self.ns_of(&key.namespace)?;
        let layout = ns.layout;
        let per_layer = layout.payload_bytes(tokens as usize);
        let pt = ns.ns.page_tokens;
        loop {
            let seq = self.sequence(&ns, key);
            let mut inner = seq.inner.lock();
            if inner.removed {
                continue;
            }
            if let Some(expected) = expected_position {
                for &l in layers {
                    let actual = inner.layer_tokens(l as usize, pt);
                    if actual != expected {
                        return Err(StoreError::Position { layer: l, expected, actual });
                    }
                }
            }
            let mut out = Vec::with_capacity(layers.len());
            for (i, &l) in layers.iter().enumerate() {
                let new = &payload[i * per_layer..(i + 1) * per_layer];
                let mut pos = inner.layer_tokens(l as usize, pt);
                let mut done = 0u32;
                let mut last_write_seq = 0;
                while done < tokens {
                    let page_index = (pos / pt as u64) as u32;
                    let in_page = (pos % pt as u64) as u32;
                    let take = (pt - in_page).min(tokens - done);
                    let mut chunk = vec![0u8; layout.payload_bytes(take as usize)];
                    layout.slice_tokens(new, tokens as usize, done as usize, take as usize, &mut chunk);
                    let pkey = PageKey { sequence: key.clone(), layer: l, page_index };
                    let merged;
                    let body: &[u8] = if in_page > 0 {
                        // Copy-on-write: the partial page's tokens followed by the new ones.
                        let old = inner.layers[l as usize][page_index as usize].expect("partial page present");
                        let held = self
                            .hold_verified(&seq, &mut inner, &pkey, &old)
                            .ok_or_else(|| StoreError::PartialPageLost(pkey.clone()))?;
                        let mut m = vec![0u8; layout.payload_bytes((in_page + take) as usize)];
                        layout.concat(&held[..], in_page as usize, &chunk, take as usize, &mut m);
                        merged = m;
                        &merged
                    } else {
                        &chunk
                    };
                    let crc = kvcache_core::checksum::crc32c(body);
                    let entry = self.write_slot(&ns, &pkey, in_page + take, 0, body, crc)?;
                    self.publish_locked(&seq, &mut inner, &pkey, entry, false);
                    last_write_seq = entry.write_seq;
                    done += take;
                    pos += take as u64;
                }
                out.push(Appended { tokens: pos, last_write_seq });
            }
            drop(inner);
            self.touch(&seq);
            return Ok(out);
        }
    }

    /// Delete a sequence. Returns pages deleted.
    pub fn delete(&self, key: &SequenceKey) -> Result<u64, StoreError> {
        let Some(seq) = self.sequences.get(key).map(|s| s.clone()) else { return Ok(0) };
        let mut inner = seq.inner.lock();
        if inner.removed {
            return Ok(0);
        }
        let files: Vec<u32> = inner.layers.iter().flatten().flatten().map(|e| e.file).collect();
        let n = self.remove_sequence_locked(&seq, &mut inner);
        drop(inner);
        if self.cfg.durability == Durability::Sync {
            // The zeroed headers must be on disk before the delete is acknowledged.
            let mut files = files;
            files.sort_unstable();
            files.dedup();
            for id in files {
                if let Some(f) = self.file(id) {
                    f.flush()?;
                }
            }
        }
        Ok(n)
    }

    // ---- reads ----

    /// Take a hold on `e`'s payload, verifying its CRC first if that was deferred. Drops the
    /// entry (a miss from now on) when its file failed or its bytes do not verify.
    fn hold_verified(&self, seq: &Sequence, inner: &mut SeqInner, key: &PageKey, e: &PageEntry) -> Option<Bytes> {
        let ok_file = self.file(e.file).filter(|f| !f.is_failed());
        let Some(file) = ok_file else {
            self.drop_entry(seq, inner, key);
            return None;
        };
        let len = seq.ns.layout.payload_bytes(e.tokens as usize);
        let hold = file.hold(e.slot);
        if !e.verified {
            let bytes = &hold.bytes()[HEADER_BYTES..HEADER_BYTES + len];
            if kvcache_core::checksum::crc32c(bytes) != e.crc {
                drop(hold);
                tracing::warn!(sequence = %key.sequence.sequence_id, layer = key.layer, page = key.page_index, "page failed its checksum on first read: dropped");
                self.counters.corrupt.fetch_add(1, Ordering::Relaxed);
                self.drop_entry(seq, inner, key);
                return None;
            }
            if let Some(Some(p)) =
                inner.layers.get_mut(key.layer as usize).and_then(|l| l.get_mut(key.page_index as usize))
            {
                p.verified = true;
            }
        }
        Some(hold.into_payload(len))
    }

    fn drop_entry(&self, seq: &Sequence, inner: &mut SeqInner, key: &PageKey) {
        if let Some(e) = inner.layers.get_mut(key.layer as usize).and_then(|l| l.get_mut(key.page_index as usize))
            && let Some(old) = e.take()
        {
            self.retire_entry(&seq.ns, &old, key.layer == 0);
        }
    }

    /// Read one page: `Ok(None)` is a miss.
    pub fn get(&self, key: &PageKey) -> Result<Option<StoredPage>, StoreError> {
        let ns = self.ns_of(&key.sequence.namespace)?;
        validate::page_key(&ns.ns, key)?;
        let r = self.get_in(key);
        let c = if r.is_some() { &self.counters.hits } else { &self.counters.misses };
        c.fetch_add(1, Ordering::Relaxed);
        Ok(r)
    }

    /// Read one page without counting it as a hit or miss (internal copies).
    pub(crate) fn get_in(&self, key: &PageKey) -> Option<StoredPage> {
        let seq = self.sequences.get(&key.sequence).map(|s| s.clone())?;
        let mut inner = seq.inner.lock();
        let e = (*inner.layers.get(key.layer as usize)?.get(key.page_index as usize)?)?;
        let payload = self.hold_verified(&seq, &mut inner, key, &e)?;
        drop(inner);
        self.touch(&seq);
        Some(StoredPage {
            token_count: e.tokens,
            write_seq: e.write_seq,
            crc: e.crc,
            prefix_hash: e.prefix_hash,
            payload,
        })
    }

    /// Page counts of a sequence's layers (`None` if the sequence is not held).
    pub fn sequence_pages(&self, key: &SequenceKey) -> Option<Vec<u32>> {
        let seq = self.sequences.get(key).map(|s| s.clone())?;
        let inner = seq.inner.lock();
        Some(inner.layers.iter().map(|l| l.len() as u32).collect())
    }

    /// Extents of every layer of a sequence, and how many leading `prefix_hashes` are cached in
    /// the namespace.
    pub fn lookup(
        &self,
        key: &SequenceKey,
        prefix_hashes: &[u64],
        only_layer: Option<u32>,
    ) -> Result<(bool, Vec<LayerExtent>, u32), StoreError> {
        let ns = self.ns_of(&key.namespace)?;
        let cached = prefix_hashes.iter().take_while(|h| self.prefixes.contains_key(&(ns.ns.id(), **h))).count() as u32;
        let Some(seq) = self.sequences.get(key).map(|s| s.clone()) else { return Ok((false, Vec::new(), cached)) };
        let inner = seq.inner.lock();
        let layers = inner
            .layers
            .iter()
            .enumerate()
            .filter(|(i, _)| only_layer.is_none_or(|o| o as usize == *i))
            .map(|(i, l)| LayerExtent {
                layer: i as u32,
                tokens: inner.layer_tokens(i, ns.ns.page_tokens),
                pages: l.iter().filter(|p| p.is_some()).count() as u32,
                write_seqs: l.iter().map(|p| p.map_or(0, |e| e.write_seq)).collect(),
            })
            .collect();
        Ok((!inner.removed, layers, cached))
    }

    // ---- leases ----

    /// Pin a sequence for `ttl`. Returns (lease id, expiry).
    pub fn lease(&self, key: &SequenceKey, ttl: Duration) -> Result<(u64, Instant), StoreError> {
        let seq = self
            .sequences
            .get(key)
            .map(|s| s.clone())
            .ok_or_else(|| StoreError::NoSequence(key.sequence_id.clone()))?;
        let mut inner = seq.inner.lock();
        if inner.removed {
            return Err(StoreError::NoSequence(key.sequence_id.clone()));
        }
        let now = Instant::now();
        inner.leases.retain(|&(id, t)| {
            let live = t > now;
            if !live {
                self.leases.remove(&id);
            }
            live
        });
        let id = self.lease_seq.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed);
        let until = now + ttl;
        inner.leases.push((id, until));
        self.leases.insert(id, key.clone());
        self.counters.leases.fetch_add(1, Ordering::Relaxed);
        Ok((id, until))
    }

    /// Release a lease; false if unknown or expired.
    pub fn release(&self, lease_id: u64) -> bool {
        let Some((_, key)) = self.leases.remove(&lease_id) else { return false };
        let Some(seq) = self.sequences.get(&key).map(|s| s.clone()) else { return false };
        let mut inner = seq.inner.lock();
        let before = inner.leases.len();
        inner.leases.retain(|&(id, _)| id != lease_id);
        before != inner.leases.len()
    }

    // ---- stats, flush, shutdown ----

    /// Counters and gauges, with index memory measured from the live structures.
    pub fn stats(&self) -> StoreStats {
        let now = Instant::now();
        let mut index = 0usize;
        let mut active_leases = 0u64;
        let mut per_ns: HashMap<String, (u64, u64, u64, u64)> = HashMap::new();
        // Clone the handles first: a sequence lock must never be awaited while a map shard is
        // locked (delete and eviction take them in the other order).
        let seqs: Vec<Arc<Sequence>> = self.sequences.iter().map(|e| e.value().clone()).collect();
        for s in &seqs {
            let inner = s.inner.lock();
            index += std::mem::size_of::<SequenceKey>()
                + s.key.namespace.capacity()
                + s.key.sequence_id.capacity()
                + std::mem::size_of::<Sequence>()
                + 2 * std::mem::size_of::<usize>() // Arc counts
                + std::mem::size_of::<Arc<Sequence>>()
                + inner.layers.capacity() * std::mem::size_of::<Vec<Option<PageEntry>>>()
                + inner.layers.iter().map(|l| l.capacity() * std::mem::size_of::<Option<PageEntry>>()).sum::<usize>()
                + inner.leases.capacity() * std::mem::size_of::<(u64, Instant)>();
            active_leases += inner.leases.iter().filter(|l| l.1 > now).count() as u64;
            let u = per_ns.entry(s.key.namespace.clone()).or_default();
            u.0 += 1;
            for l in &inner.layers {
                for p in l.iter().flatten() {
                    u.1 += 1;
                    u.2 += (HEADER_BYTES + s.ns.layout.payload_bytes(p.tokens as usize)) as u64;
                }
            }
            u.3 += inner.layer_tokens(0, s.ns.ns.page_tokens);
        }
        index += self.prefixes.len() * (std::mem::size_of::<((u64, u64), u32)>() + 8);
        let pools = self.pools.read();
        let files: Vec<_> = pools.files.iter().flatten().collect();
        let (rs, rb) = *self.recovery.lock();
        StoreStats {
            capacity_bytes: self.cfg.capacity,
            pool_bytes: pools.total_bytes,
            used_bytes: self.counters.used_bytes.load(Ordering::Relaxed),
            pages: self.counters.pages.load(Ordering::Relaxed),
            sequences: self.sequences.len() as u64,
            evictions: self.counters.evictions.load(Ordering::Relaxed),
            active_leases,
            index_bytes: index as u64,
            pool_files: files.iter().filter(|f| !f.is_failed()).count() as u64,
            pool_files_failed: files.iter().filter(|f| f.is_failed()).count() as u64,
            get_hits: self.counters.hits.load(Ordering::Relaxed),
            get_misses: self.counters.misses.load(Ordering::Relaxed),
            corrupt_pages_dropped: self.counters.corrupt.load(Ordering::Relaxed),
            leases_granted: self.counters.leases.load(Ordering::Relaxed),
            namespaces: per_ns.into_iter().map(|(n, u)| (n, u.0, u.1, u.2, u.3)).collect(),
            recovery_seconds: rs,
            recovery_bytes: rb,
        }
    }

    /// Flush every pool file with unflushed writes. Failed files are taken out of service.
    pub fn flush(&self) -> Vec<io::Error> {
        let upto = self.bytes_written.load(Ordering::Acquire);
        let files: Vec<_> = self.pools.read().files.iter().flatten().cloned().collect();
        let mut errs = Vec::new();
        for f in files {
            if let Err(e) = f.flush() {
                tracing::error!(file = %f.path.display(), error = %e, "msync failed: pool file taken out of service");
                errs.push(e);
            }
        }
        self.bytes_flushed.fetch_max(upto, Ordering::AcqRel);
        errs
    }

    /// Page bytes written and not yet covered by a completed flush: under async durability, the
    /// node's share of the dirty page cache the kernel still has to write back. While it is
    /// small, a write only copies into the page cache; a large one means writeback is behind
    /// and a write may be throttled by the kernel.
    pub fn writeback_backlog(&self) -> u64 {
        let flushed = self.bytes_flushed.load(Ordering::Acquire);
        self.bytes_written.load(Ordering::Acquire).saturating_sub(flushed)
    }

    /// Clean shutdown: flush everything and leave the marker that lets the next start skip
    /// payload verification.
    pub fn close(&self) -> Result<(), StoreError> {
        if let Some(e) = self.flush().into_iter().next() {
            return Err(e.into());
        }
        std::fs::File::create(self.cfg.data_dir.join(CLEAN_MARKER))?.sync_all()?;
        fsync_dir(&self.cfg.data_dir)?;
        Ok(())
    }

    /// Fault injection: make page writes to every current pool file fail.
    #[doc(hidden)]
    pub fn inject_write_failure(&self) {
        for f in self.pools.read().files.iter().flatten() {
            f.inject_write_failure();
        }
    }

    /// Fault injection: make the next flush of every pool file fail.
    #[doc(hidden)]
    pub fn inject_flush_failure(&self) {
        for f in self.pools.read().files.iter().flatten() {
            f.inject_flush_failure();
        }
    }

    // ---- recovery ----

    fn recover(&self) -> Result<(), StoreError> {
        let started = Instant::now();
        let dir = &self.cfg.data_dir;
        let marker = dir.join(CLEAN_MARKER);
        let clean = marker.exists();
        if clean {
            std::fs::remove_file(&marker)?;
            fsync_dir(dir)?;
        }
        let mut found = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some((slot_bytes, id)) = name.to_str().and_then(pool::parse_file_name) else { continue };
            match PoolFile::open(entry.path(), id, slot_bytes, self.cfg.storage.clone()) {
                Ok(f) => found.push(Arc::new(f)),
                Err(e) => {
                    // Shorter than one slot (a torn file extension): nothing in it can verify.
                    tracing::warn!(file = %entry.path().display(), error = %e, "unusable pool file removed");
                    std::fs::remove_file(entry.path())?;
                }
            }
        }
        let ns_by_id = self.ns_by_id.read().clone();
        // Scan files in parallel: (file index, slot, key, entry).
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get()).min(found.len().max(1));
        let scanned: Vec<Vec<(usize, PageKey, PageEntry)>> = std::thread::scope(|sc| {
            let handles: Vec<_> = (0..threads)
                .map(|t| {
                    let found = &found;
                    let ns_by_id = &ns_by_id;
                    sc.spawn(move || {
                        let mut out = Vec::new();
                        for (fi, f) in found.iter().enumerate().skip(t).step_by(threads) {
                            for slot in 0..f.slots {
                                if let Some((k, e)) = scan_slot(f, slot, ns_by_id, clean) {
                                    out.push((fi, k, e));
                                }
                            }
                        }
                        out
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("scan thread")).collect()
        });
        let mut best: HashMap<PageKey, (usize, PageEntry)> = HashMap::new();
        let mut used: Vec<Vec<bool>> = found.iter().map(|f| vec![false; f.slots as usize]).collect();
        let mut max_seq = 0;
        for (fi, k, e) in scanned.into_iter().flatten() {
            max_seq = max_seq.max(e.write_seq);
            match best.get(&k) {
                Some((_, b)) if b.write_seq >= e.write_seq => {}
                _ => {
                    best.insert(k, (fi, e));
                }
            }
        }
        let mut pools = Pools::default();
        let max_id = found.iter().map(|f| f.id).max();
        if let Some(m) = max_id {
            pools.files.resize(m as usize + 1, None);
        }
        for f in &found {
            pools.total_bytes += f.file_bytes();
            pools.files[f.id as usize] = Some(f.clone());
        }
        let scanned_bytes = pools.total_bytes;
        let n_pages = best.len();
        for (k, (fi, mut e)) in best {
            used[fi][e.slot as usize] = true;
            e.file = found[fi].id;
            let ns = ns_by_id[&namespace_id_of(&k)].clone();
            let seq = self.sequence(&ns, &k.sequence);
            let mut inner = seq.inner.lock();
            self.publish_locked(&seq, &mut inner, &k, e, false);
        }
        for (fi, f) in found.iter().enumerate() {
            let mut free = Vec::new();
            for slot in (0..f.slots).rev() {
                if !used[fi][slot as usize] {
                    // Superseded, unverifiable or never written: make sure it stays free.
                    if f.slot(slot)[..4] != [0; 4] {
                        f.unalloc(slot);
                    }
                    free.push(slot);
                }
            }
            f.set_free_list(free);
        }
        *self.pools.write() = pools;
        self.write_seq.store(max_seq + 1, Ordering::Release);
        let secs = started.elapsed().as_secs_f64();
        *self.recovery.lock() = (secs, scanned_bytes);
        if scanned_bytes > 0 {
            tracing::info!(pages = n_pages, bytes = scanned_bytes, seconds = secs, clean, "recovered pool files");
        }
        Ok(())
    }
}

fn namespace_id_of(k: &PageKey) -> u64 {
    kvcache_core::key::namespace_id(&k.sequence.namespace)
}

/// Verify one slot: header CRC, known namespace, layout-consistent size and — unless the last
/// shutdown was clean — the payload CRC.
fn scan_slot(
    f: &PoolFile,
    slot: u32,
    ns_by_id: &HashMap<u64, Arc<NsEntry>>,
    clean: bool,
) -> Option<(PageKey, PageEntry)> {
    let bytes = f.slot(slot);
    if bytes[..4] != kvcache_core::page::MAGIC {
        return None;
    }
    let h = PageHeader::decode(bytes).ok()?;
    let ns = ns_by_id.get(&h.namespace_id)?;
    let plen = h.payload_len as usize;
    if h.codec != ns.ns.codec
        || h.token_count == 0
        || h.token_count > ns.ns.page_tokens
        || h.layer >= ns.ns.model.num_layers
        || plen != ns.layout.payload_bytes(h.token_count as usize)
        || HEADER_BYTES + plen > f.slot_bytes
    {
        return None;
    }
    if !clean && h.verify_payload(&bytes[HEADER_BYTES..HEADER_BYTES + plen]).is_err() {
        return None;
    }
    let key = PageKey {
        sequence: SequenceKey { namespace: ns.ns.name.clone(), sequence_id: h.sequence_id },
        layer: h.layer,
        page_index: h.page_index,
    };
    Some((
        key,
        PageEntry {
            file: f.id,
            slot,
            tokens: h.token_count,
            crc: h.payload_crc,
            write_seq: h.write_seq,
            prefix_hash: h.prefix_hash,
            verified: !clean,
        },
    ))
}

fn flusher(store: Weak<PageStore>, period: Duration) {
    loop {
        std::thread::sleep(period);
        let Some(s) = store.upgrade() else { return };
        s.flush();
    }
}
