//! The worker's pages in GPU memory (`kvcache worker --device cuda:N`).
//!
//! The host [`crate::cache`] stays the source of truth for which version of a page is current
//! (it validates every page against the (node, write_seq) the nodes report, and an append
//! replaces its copy of the last page with a new payload). This room mirrors those payloads into
//! HBM slots, one full page each, keyed by the payload itself: a `Bytes` is immutable and the
//! mirror holds a clone of it, so the same (address, length) can only ever be the same bytes.
//! A step uploads only the pages it has not seen (after the first step of a sequence: its last
//! page, which the append changed) and computes on the GPU.
//!
//! Slots are per page geometry (one slab per [`PageLayout`]), each bounded by the worker's
//! `cache_bytes`; the least recently used page not read by the current batch is overwritten
//! first. A batch whose pages do not fit is refused whole (`RESOURCE_EXHAUSTED`, with the
//! reason), never answered wrong.

use bytes::Bytes;
use kvcache_attention::gpu::{DevicePages, DeviceRef, Gpu, GpuError, GpuItem};
use kvcache_attention::{AttentionError, AttnShape};
use kvcache_core::PageLayout;
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

struct Entry {
    slot: usize,
    tick: u64,
    _hold: Bytes,
}

struct Slab {
    layout: PageLayout,
    pages: DevicePages,
    map: HashMap<(usize, usize), Entry>,
    lru: BTreeMap<u64, (usize, usize)>,
    free: Vec<usize>,
    tick: u64,
}

/// HBM page slots of one GPU.
pub struct DeviceCache {
    gpu: Arc<Gpu>,
    bytes: u64,
    slabs: Mutex<Vec<Slab>>,
    uploads: std::sync::atomic::AtomicU64,
}

/// One sequence of a GPU decode: query, pages (host payloads and tokens), window skip.
pub(crate) type DeviceItem = (Vec<f32>, Vec<(Bytes, usize)>, usize);

/// One sequence's answer: `(out, lse)` or why not.
pub(crate) type DeviceAnswer = Result<(Vec<f32>, Vec<f32>), AttentionError>;

impl DeviceCache {
    /// Slots on `gpu`, at most `bytes` per page geometry.
    pub fn new(gpu: Arc<Gpu>, bytes: u64) -> Self {
        Self { gpu, bytes, slabs: Mutex::new(Vec::new()), uploads: Default::default() }
    }

    /// The device.
    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    /// Pages copied to the device so far.
    pub fn uploads(&self) -> u64 {
        self.uploads.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Decode a batch on the GPU: `(out, lse)` or the error, per item.
    pub(crate) fn decode(&self, shape: &AttnShape, items: &[DeviceItem]) -> Result<Vec<DeviceAnswer>, GpuError> {
        let mut slabs = self.slabs.lock();
        let slab = match slabs.iter().position(|s| s.layout == shape.layout) {
            Some(i) => &mut slabs[i],
            None => {
                let slot = shape.layout.page_bytes().next_multiple_of(256) as u64;
                let cap = (self.bytes / slot).max(1) as usize;
                let pages = self.gpu.alloc_slots(&shape.layout, cap)?;
                slabs.push(Slab {
                    layout: shape.layout,
                    pages,
                    map: HashMap::new(),
                    lru: BTreeMap::new(),
                    free: (0..cap).rev().collect(),
                    tick: 0,
                });
                slabs.last_mut().expect("pushed")
            }
        };
        let need: usize = items.iter().map(|i| i.1.len()).sum();
        if need > slab.pages.len() {
            return Err(GpuError::OutOfMemory(format!(
                "the batch reads {need} pages, more than the {} the GPU page cache holds (raise --cache-bytes)",
                slab.pages.len()
            )));
        }
        slab.tick += 1;
        let batch_tick = slab.tick;
        let mut slots: Vec<Vec<usize>> = Vec::with_capacity(items.len());
        for (_, pages, _) in items {
            let mut s = Vec::with_capacity(pages.len());
            for (b, tokens) in pages {
                let key = (b.as_ptr() as usize, b.len());
                slab.tick += 1;
                let tick = slab.tick;
                if let Some(e) = slab.map.get_mut(&key) {
                    slab.lru.remove(&e.tick);
                    e.tick = tick;
                    slab.lru.insert(tick, key);
                    s.push(e.slot);
                    continue;
                }
                let slot = match slab.free.pop() {
                    Some(f) => f,
                    None => {
                        // Evict the least recently used page this batch does not read.
                        let (&old_tick, &old_key) = slab.lru.iter().next().expect("a full slab has entries");
                        debug_assert!(old_tick < batch_tick);
                        slab.lru.remove(&old_tick);
                        slab.map.remove(&old_key).expect("lru entry").slot
                    }
                };
                self.gpu.write_page(&mut slab.pages, slot, b, *tokens)?;
                self.uploads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                slab.map.insert(key, Entry { slot, tick, _hold: b.clone() });
                slab.lru.insert(tick, key);
                s.push(slot);
            }
            slots.push(s);
        }
        let refs: Vec<Vec<DeviceRef>> = slots.iter().map(|s| s.iter().map(|&i| slab.pages.page(i)).collect()).collect();
        let gi: Vec<GpuItem> =
            items.iter().zip(&refs).map(|((q, _, skip), r)| GpuItem { q, pages: r, skip: *skip }).collect();
        let out = self.gpu.decode_batch(shape, &gi)?;
        let (ol, hl) = (shape.out_len(), shape.q_heads);
        Ok(out
            .status
            .into_iter()
            .enumerate()
            .map(|(i, st)| {
                st.map(|()| (out.out[i * ol..(i + 1) * ol].to_vec(), out.lse[i * hl..(i + 1) * hl].to_vec()))
            })
            .collect())
    }
}
