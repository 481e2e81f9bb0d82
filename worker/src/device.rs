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
//! `cache_bytes`. As in the host cache, recency is kept per layer of a sequence (a step reads a
//! layer whole): a warm step costs one map lookup per sequence and one comparison per page, and
//! the least recently used layer the current batch does not read is evicted first. A batch whose pages do not fit is refused whole (`RESOURCE_EXHAUSTED`, with the
//! reason), never answered wrong.

use bytes::Bytes;
use kvcache_attention::gpu::{DevicePages, DeviceRef, Gpu, GpuError, GpuItem};
use kvcache_attention::{AttentionError, AttnShape};
use kvcache_core::{PageLayout, SequenceKey};
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// One sequence layer's pages in the slab: slot and payload identity per page index.
struct LayerSlots {
    slots: Vec<usize>,
    /// (address, length) of the payload each slot holds, and the payload itself, held so that
    /// the address cannot be reused by other bytes while the slot claims it.
    held: Vec<((usize, usize), Bytes)>,
    tick: u64,
}

struct Slab {
    layout: PageLayout,
    pages: DevicePages,
    map: HashMap<(SequenceKey, u32), LayerSlots>,
    /// tick → layer, least recently used first.
    lru: BTreeMap<u64, (SequenceKey, u32)>,
    free: Vec<usize>,
    tick: u64,
    /// Host staging of one page (planes spread a full page apart).
    staging: Vec<u8>,
}

/// HBM page slots of one GPU.
pub struct DeviceCache {
    gpu: Arc<Gpu>,
    bytes: u64,
    slabs: Mutex<Vec<Slab>>,
    uploads: std::sync::atomic::AtomicU64,
}

/// One sequence of a GPU decode: (sequence, layer), query, pages (host payloads and tokens,
/// from the first its window reads), window skip.
pub(crate) type DeviceItem = ((SequenceKey, u32), Vec<f32>, Vec<(Bytes, usize)>, usize);

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

    fn upload(&self, slab: &mut Slab, slot: usize, payload: &[u8], tokens: usize) -> Result<(), GpuError> {
        self.gpu.write_page_with(&mut slab.pages, slot, payload, tokens, &mut slab.staging)?;
        self.uploads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
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
                    staging: Vec::new(),
                });
                slabs.last_mut().expect("pushed")
            }
        };
        let need: usize = items.iter().map(|i| i.2.len()).sum();
        if need > slab.pages.len() {
            return Err(GpuError::OutOfMemory(format!(
                "the batch reads {need} pages, more than the {} the GPU page cache holds (raise --cache-bytes)",
                slab.pages.len()
            )));
        }
        // Touch every layer of the batch first, so that eviction below never takes one of them.
        let batch_start = slab.tick + 1;
        for (key, _, _, _) in items {
            slab.tick += 1;
            let tick = slab.tick;
            if let Some(e) = slab.map.get_mut(key) {
                slab.lru.remove(&e.tick);
                e.tick = tick;
            } else {
                slab.map.insert(key.clone(), LayerSlots { slots: Vec::new(), held: Vec::new(), tick });
            }
            slab.lru.insert(tick, key.clone());
        }
        let mut slots: Vec<Vec<usize>> = Vec::with_capacity(items.len());
        for (key, _, pages, _) in items {
            let mut entry = slab.map.remove(key).expect("touched above");
            // Pages past the new list (a window moved on) give their slots back.
            while entry.slots.len() > pages.len() {
                slab.free.push(entry.slots.pop().expect("len checked"));
                entry.held.pop();
            }
            for (i, (b, tokens)) in pages.iter().enumerate() {
                let id = (b.as_ptr() as usize, b.len());
                if i < entry.slots.len() && entry.held[i].0 == id {
                    continue;
                }
                if i >= entry.slots.len() {
                    let slot = match slab.free.pop() {
                        Some(f) => f,
                        None => {
                            // Free the least recently used layer this batch does not read.
                            let (&t, _) = slab.lru.iter().next().expect("a full slab has layers");
                            if t >= batch_start {
                                slab.map.insert(key.clone(), entry);
                                return Err(GpuError::OutOfMemory(
                                    "the GPU page cache is full with this batch's own pages".into(),
                                ));
                            }
                            let old = slab.lru.remove(&t).expect("present");
                            let gone = slab.map.remove(&old).expect("lru entry");
                            slab.free.extend(gone.slots);
                            slab.free.pop().expect("an evicted layer holds a slot")
                        }
                    };
                    entry.slots.push(slot);
                    entry.held.push((id, b.clone()));
                } else {
                    entry.held[i] = (id, b.clone());
                }
                self.upload(slab, entry.slots[i], b, *tokens)?;
            }
            slots.push(entry.slots.clone());
            slab.map.insert(key.clone(), entry);
        }
        let refs: Vec<Vec<DeviceRef>> = slots.iter().map(|s| s.iter().map(|&i| slab.pages.page(i)).collect()).collect();
        let gi: Vec<GpuItem> =
            items.iter().zip(&refs).map(|((_, q, _, skip), r)| GpuItem { q, pages: r, skip: *skip }).collect();
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
