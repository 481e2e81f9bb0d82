//! The worker's pages in GPU memory (`kvcache worker --device cuda:N`).
//!
//! The host [`crate::cache`] stays the source of truth for which version of a page is current
//! (it validates every page against the (node, write_seq) the nodes report, and an append
//! replaces its copy of the last page with a new payload). This room mirrors those payloads into
//! HBM slots, one full page each, keyed by the payload itself: a `Bytes` is immutable and the
//! mirror holds a clone of it, so the same (address, length) can only ever be the same bytes.
//! A step uploads only the pages it has not seen, copied asynchronously ahead of the kernels on
//! the same stream, and computes on the GPU, its page table written from the slot numbers. A
//! cold pull hands each sequence's pages over as soon as they are in (`DeviceCache::preload`),
//! so the copies run while the rest of the batch is still arriving: full pages by DMA straight
//! from the host cache's arena (page-locked with the driver at start; a payload copied that way
//! is held until the stream is next waited for), the rest spread into two pinned buffers on
//! several threads. After the first step of a sequence that is its last page, which the append
//! changed: when the slot holds the page it grew from, only the appended token's rows are
//! written, in place (slots keep each plane a full page apart, so a row has a fixed address),
//! and the grown page itself — wanted on the host only, by the page cache — is built while the
//! kernels run (a speculated step leaves it pending, see `Grown::pending`).
//!
//! Slots are per page geometry (one slab per [`PageLayout`]), each bounded by the worker's
//! `cache_bytes`. As in the host cache, recency is kept per layer of a sequence (a step reads a
//! layer whole): a warm step costs one map lookup per sequence and one comparison per page, and
//! the least recently used layer the current batch does not read is evicted first. A batch whose
//! pages do not fit is refused whole (`RESOURCE_EXHAUSTED`, with the reason), never answered
//! wrong.

use crate::arena::Arena;
use bytes::Bytes;
use kvcache_attention::AttnShape;
use kvcache_attention::gpu::{
    DevicePages, Gpu, GpuError, HostRegion, PageWrite, Query, RowAppend, RowStaging, SlotSeq, Staging,
};
use kvcache_core::{PageLayout, SequenceKey};
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// One sequence layer's pages: slot per page index, the (address, length) of the payload the
/// slot holds (`NONE` while an upload is pending) and that payload. The payload is held so that
/// its address cannot be reused by other bytes while the slot claims it; the identities sit in
/// their own array, so that a warm step's walk reads 16 bytes per page of the mirror.
struct LayerSlots {
    slots: Vec<usize>,
    ids: Vec<(usize, usize)>,
    held: Vec<Option<Bytes>>,
    tick: u64,
}

/// No payload: a page is never empty, so no payload has length 0.
const NONE: (usize, usize) = (0, 0);

fn id(b: &Bytes) -> (usize, usize) {
    (b.as_ptr() as usize, b.len())
}

/// The slot bookkeeping of one slab, no device involved: which slot each page of a batch reads,
/// which pages must be uploaded first, and which layer gives its slots up when the slab is full.
pub(crate) struct SlotTable<K> {
    cap: usize,
    map: HashMap<K, LayerSlots>,
    /// tick → layer, least recently used first.
    lru: BTreeMap<u64, K>,
    free: Vec<usize>,
    tick: u64,
}

/// A page to copy to the device before the batch runs: (item, page index, slot, tokens the
/// slot already holds of it — 0: the whole page; more: only the rows after them).
pub(crate) type Upload = (usize, usize, usize, usize);

/// One item of [`SlotTable::assign`]: its layer, its pages, and when the last page is a held
/// page grown by rows, that page's previous payload and tokens and the rows appended.
pub(crate) type SlotItem<'a, K> = (K, &'a [(Bytes, usize)], Option<(&'a Bytes, usize, &'a [u8])>);

impl<K: Clone + Eq + std::hash::Hash> SlotTable<K> {
    pub(crate) fn new(cap: usize) -> Self {
        Self { cap, map: HashMap::new(), lru: BTreeMap::new(), free: (0..cap).rev().collect(), tick: 0 }
    }

    /// Assign slots to every page of a batch ([`SlotTable::slots`] then names them in page order)
    /// and say which uploads are needed (pages this slab does not hold as these very bytes; a
    /// last page that grew from the bytes its slot holds needs only its new rows). Evicts whole
    /// layers the batch does not read, least recently used first. A batch larger than the slab
    /// is refused.
    pub(crate) fn assign(&mut self, items: &[SlotItem<'_, K>]) -> Result<Vec<Upload>, String> {
        let need: usize = items.iter().map(|i| i.1.len()).sum();
        if need > self.cap {
            return Err(format!(
                "the batch reads {need} pages, more than the {} the GPU page cache holds (raise --cache-bytes)",
                self.cap
            ));
        }
        // Touch every layer of the batch first, so that eviction never takes one of them.
        let batch_start = self.tick + 1;
        for (key, _, _) in items {
            self.tick += 1;
            let tick = self.tick;
            if let Some(e) = self.map.get_mut(key) {
                self.lru.remove(&e.tick);
                e.tick = tick;
            } else {
                self.map.insert(key.clone(), LayerSlots { slots: Vec::new(), ids: Vec::new(), held: Vec::new(), tick });
            }
            self.lru.insert(tick, key.clone());
        }
        let mut uploads = Vec::new();
        for (item, (key, pages, grown)) in items.iter().enumerate() {
            let mut entry = self.map.remove(key).expect("touched above");
            // Pages past the new list (a window moved on) give their slots back.
            while entry.slots.len() > pages.len() {
                self.free.push(entry.slots.pop().expect("len checked"));
                entry.ids.pop();
                entry.held.pop();
            }
            // Pages the slots hold as these very bytes: one comparison each (the walk a warm
            // step costs), then the rest one by one.
            let same = pages.iter().zip(&entry.ids).take_while(|(p, h)| id(&p.0) == **h).count();
            for (i, (b, _)) in pages.iter().enumerate().skip(same) {
                if i < entry.slots.len() {
                    if entry.ids[i] == id(b) {
                        continue;
                    }
                    // The slot holds the page this one grew from: only the new rows go.
                    let from = match grown {
                        Some((old, n, _)) if i + 1 == pages.len() && entry.ids[i] == id(old) => *n,
                        _ => 0,
                    };
                    entry.ids[i] = NONE;
                    entry.held[i] = None;
                    uploads.push((item, i, entry.slots[i], from));
                    continue;
                } else {
                    while self.free.is_empty() {
                        // Free the least recently used layer this batch does not read.
                        let (&t, _) = self.lru.iter().next().expect("a full slab has layers");
                        if t >= batch_start {
                            self.map.insert(key.clone(), entry);
                            return Err("the GPU page cache is full with this batch's own pages".into());
                        }
                        let old = self.lru.remove(&t).expect("present");
                        let gone = self.map.remove(&old).expect("lru entry");
                        self.free.extend(gone.slots);
                    }
                    entry.slots.push(self.free.pop().expect("freed above"));
                    entry.ids.push(NONE);
                    entry.held.push(None);
                }
                uploads.push((item, i, entry.slots[i], 0));
            }
            self.map.insert(key.clone(), entry);
        }
        Ok(uploads)
    }

    /// The slots of `key`'s layer in page order, as the last [`SlotTable::assign`] left them.
    pub(crate) fn slots(&self, key: &K) -> &[usize] {
        self.map.get(key).map_or(&[], |e| &e.slots)
    }

    /// Page `page` of `key`'s layer now holds `b` on the device.
    pub(crate) fn landed(&mut self, key: &K, page: usize, b: &Bytes) {
        if let Some(e) = self.map.get_mut(key)
            && page < e.held.len()
        {
            e.ids[page] = id(b);
            e.held[page] = Some(b.clone());
        }
    }

    /// Drop a layer (an upload to it failed): its slots are free and claim nothing.
    pub(crate) fn forget(&mut self, key: &K) {
        if let Some(e) = self.map.remove(key) {
            self.lru.remove(&e.tick);
            self.free.extend(e.slots);
        }
    }

    #[cfg(test)]
    fn free_slots(&self) -> usize {
        self.free.len()
    }
}

struct Slab {
    layout: PageLayout,
    pages: DevicePages,
    table: SlotTable<(SequenceKey, u32)>,
    /// Pinned host buffers the uploads are staged through (planes spread a full page apart).
    staging: Staging,
    /// The buffers appended tokens' rows are staged through.
    rows: RowStaging,
    /// Payloads copied by DMA straight from the registered arena since the stream was last
    /// waited for: held so that their arena slots are not reused under the copy.
    inflight: Vec<Bytes>,
}

/// Bytes of each of a slab's two pinned staging buffers: a cold step's pages are spread into one
/// on several threads while the other's copies to the device run.
const STAGING_BYTES: usize = 32 << 20;

/// Rows staged per slab at first (grown when a step appends more): a warm step writes one
/// token per sequence.
const STAGING_ROWS: usize = 256;

/// HBM page slots of one GPU.
pub struct DeviceCache {
    gpu: Arc<Gpu>,
    bytes: u64,
    slabs: Mutex<Vec<Slab>>,
    uploads: std::sync::atomic::AtomicU64,
    /// The host page cache's arena, page-locked with the driver: full pages in it go up by DMA.
    /// (Declared before the arena, so it is unregistered before the mapping goes.)
    region: Option<HostRegion>,
    _arena: Option<Arc<Arena>>,
}

impl Drop for DeviceCache {
    fn drop(&mut self) {
        // Copies still reading the arena or the staging buffers finish before either goes.
        let _ = self.gpu.synchronize();
    }
}

/// One sequence of a GPU decode.
pub(crate) struct DeviceItem<'a> {
    /// (sequence, layer).
    pub(crate) key: (SequenceKey, u32),
    /// Query `[q_heads][qk_width]`, f32 or bf16 as it came.
    pub(crate) q: Query<'a>,
    /// Host payloads and tokens, from the first page its window reads.
    pub(crate) pages: &'a [(Bytes, usize)],
    /// Tokens of the first page before the window.
    pub(crate) skip: usize,
    /// The last page is a page held before plus rows appended this step.
    pub(crate) grown: Option<&'a crate::Grown>,
}

/// An item's pending last page (see [`crate::Grown::pending`]) and the page once built.
type Pending<'a> = (Option<&'a crate::Grown>, Option<Bytes>);

/// One sequence's answer: `(out, lse)` or why not.
pub(crate) type DeviceAnswer = kvcache_attention::gpu::SeqOutput;

impl DeviceCache {
    /// Slots on `gpu`, at most `bytes` per page geometry. With the host cache's `arena`, the
    /// arena is page-locked with the driver (once, at start), so that cold pages go up by DMA
    /// straight from where the pull put them, with no staging copy.
    pub fn new(gpu: Arc<Gpu>, bytes: u64, arena: Option<Arc<Arena>>) -> Self {
        let region = arena.as_ref().and_then(|a| {
            let (ptr, len) = a.region();
            let t = std::time::Instant::now();
            // SAFETY: the arena's mapping lives as long as `_arena`, which outlives `region`.
            match unsafe { gpu.register_host(ptr, len) } {
                Ok(r) => {
                    tracing::info!(bytes = len, took = ?t.elapsed(), "page-cache arena registered with the GPU driver");
                    Some(r)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "page-cache arena not registered with the GPU driver: pages go up staged");
                    None
                }
            }
        });
        Self { gpu, bytes, slabs: Mutex::new(Vec::new()), uploads: Default::default(), region, _arena: arena }
    }

    /// The device.
    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    /// Pages copied to the device so far.
    pub fn uploads(&self) -> u64 {
        self.uploads.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The slab of `layout` (allocated at first use).
    fn slab<'a>(&self, slabs: &'a mut Vec<Slab>, layout: &PageLayout) -> Result<&'a mut Slab, GpuError> {
        if let Some(i) = slabs.iter().position(|s| s.layout == *layout) {
            return Ok(&mut slabs[i]);
        }
        let slot = layout.page_bytes().next_multiple_of(256) as u64;
        let cap = (self.bytes / slot).max(1) as usize;
        let pages = self.gpu.alloc_slots(layout, cap)?;
        let staging = self.gpu.staging(layout, STAGING_BYTES)?;
        let rows = self.gpu.row_staging(layout, STAGING_ROWS)?;
        slabs.push(Slab { layout: *layout, pages, table: SlotTable::new(cap), staging, rows, inflight: Vec::new() });
        Ok(slabs.last_mut().expect("pushed"))
    }

    /// Copy a sequence layer's pages to the device ahead of its compute: a cold pull calls it as
    /// each sequence's pages arrive, so the copies run while the rest of the batch is still
    /// being pulled, and the decode that follows finds the pages there. The pages copied.
    pub(crate) fn preload(
        &self,
        layout: &PageLayout,
        key: (SequenceKey, u32),
        pages: &[(Bytes, usize)],
    ) -> Result<usize, GpuError> {
        let mut slabs = self.slabs.lock();
        let slab = self.slab(&mut slabs, layout)?;
        self.upload(slab, &[(key, pages, None)], &mut []).map(|(n, _)| n)
    }

    /// Assign the items' slots and copy up what the slab does not hold: whole pages through the
    /// staging buffers, a grown last page's new rows in place. `built` has an entry per item
    /// whose last page is pending (see [`crate::Grown::pending`]; empty: none is): a pending
    /// page that goes up whole is built here into it. The pages copied, and the (item, page)
    /// of the pending pages whose rows went up, to be marked landed once they are built.
    fn upload(
        &self,
        slab: &mut Slab,
        keyed: &[SlotItem<'_, (SequenceKey, u32)>],
        built: &mut [Pending<'_>],
    ) -> Result<(usize, Vec<(usize, usize)>), GpuError> {
        // The assignment below may evict layers: the arena slots copied from by DMA stay held
        // until those copies have run.
        if !slab.inflight.is_empty() {
            self.gpu.synchronize()?;
            slab.inflight.clear();
        }
        let t = std::time::Instant::now();
        let uploads = slab.table.assign(keyed).map_err(GpuError::OutOfMemory)?;
        let assigned = t.elapsed();
        let n_uploads = uploads.len();
        // Pages uploaded whole now; appended rows gathered and written in place in one go after.
        let mut rows: Vec<(RowAppend, usize, usize)> = Vec::new();
        let (mut whole, mut whole_at): (Vec<PageWrite>, Vec<(usize, usize)>) = (Vec::new(), Vec::new());
        let in_place = slab.layout.row_bytes.is_multiple_of(4);
        let pend: Vec<bool> = built.iter().map(|b| b.0.is_some()).collect();
        let is_pending = |item: usize, page: usize| page + 1 == keyed[item].1.len() && pend.get(item) == Some(&true);
        // The appended token's rows go after the `from` tokens the slot holds; anything else
        // goes up whole, a pending page built first.
        let by_rows = |item: usize, page: usize, from: usize| match &keyed[item].2 {
            Some((_, old_tokens, _)) => {
                in_place && from > 0 && from == *old_tokens && from + 1 == keyed[item].1[page].1
            }
            None => false,
        };
        for &(item, page, _, from) in &uploads {
            if !by_rows(item, page, from) && is_pending(item, page) && built[item].1.is_none() {
                built[item].1 = built[item].0.map(crate::Grown::merge);
            }
        }
        let built: &[Pending] = built;
        // A page's payload: the built one for a pending page.
        let payload = |item: usize, page: usize| -> &Bytes {
            match built.get(item) {
                Some((Some(_), Some(b))) if page + 1 == keyed[item].1.len() => b,
                _ => &keyed[item].1[page].0,
            }
        };
        let mut deferred = Vec::new();
        for (item, page, slot, from) in uploads {
            let (_, pages, grown) = &keyed[item];
            match grown {
                Some((_, _, new_rows)) if by_rows(item, page, from) => {
                    rows.push((RowAppend { index: slot, at: from, rows: new_rows }, item, page));
                }
                _ => {
                    whole.push(PageWrite { index: slot, payload: payload(item, page), tokens: pages[page].1 });
                    whole_at.push((item, page));
                }
            }
        }
        let r = self.gpu.write_pages_staged(&mut slab.pages, &whole, &mut slab.staging, self.region.as_ref());
        if let Ok(dma) = r
            && dma > 0
        {
            slab.inflight.extend(whole_at.iter().map(|&(item, page)| payload(item, page).clone()));
        }
        let mut r = r.map(|_| ());
        if r.is_ok() {
            for &(item, page) in &whole_at {
                slab.table.landed(&keyed[item].0, page, payload(item, page));
            }
        }
        if r.is_ok() && !rows.is_empty() {
            let appends: Vec<RowAppend> = rows.iter().map(|r| r.0).collect();
            r = self.gpu.append_rows(&mut slab.pages, &appends, &mut slab.rows);
            if r.is_ok() {
                for &(_, item, page) in &rows {
                    if is_pending(item, page) && built[item].1.is_none() {
                        deferred.push((item, page));
                    } else {
                        slab.table.landed(&keyed[item].0, page, payload(item, page));
                    }
                }
            }
        }
        if let Err(e) = r {
            // Copies already issued may still read arena slots the layers below let go.
            let _ = self.gpu.synchronize();
            // Nothing half-written may be taken for these bytes later.
            for (key, _, _) in keyed {
                slab.table.forget(key);
            }
            return Err(e);
        }
        self.uploads.fetch_add(n_uploads as u64, std::sync::atomic::Ordering::Relaxed);
        tracing::trace!(assign = ?assigned, copies = ?(t.elapsed() - assigned), pages = n_uploads, "GPU upload");
        Ok((n_uploads, deferred))
    }

    /// Decode a batch on the GPU: `(out, lse)` or the error, per item; outputs rounded to bf16
    /// on the device with `bf16_out`. With the answers, each item's pending last page (see
    /// [`crate::Grown::pending`]), built while the kernels ran (`None` for the others).
    pub(crate) fn decode(
        &self,
        shape: &AttnShape,
        items: &[DeviceItem],
        bf16_out: bool,
    ) -> Result<(Vec<DeviceAnswer>, Vec<Option<Bytes>>), GpuError> {
        let t0 = std::time::Instant::now();
        let mut slabs = self.slabs.lock();
        let slab = self.slab(&mut slabs, &shape.layout)?;
        let keyed: Vec<SlotItem<'_, (SequenceKey, u32)>> = items
            .iter()
            .map(|it| (it.key.clone(), it.pages, it.grown.map(|g| (&g.old, g.old_tokens, &g.rows[..]))))
            .collect();
        let mut built: Vec<Pending> = items.iter().map(|it| (it.grown.filter(|g| g.pending), None)).collect();
        let t = std::time::Instant::now();
        let (n_uploads, deferred) = self.upload(slab, &keyed, &mut built)?;
        let seqs: Vec<SlotSeq> =
            items.iter().map(|it| SlotSeq { q: it.q, slots: slab.table.slots(&it.key), skip: it.skip }).collect();
        let uploaded = t.elapsed();
        // The host builds the pending pages while the kernels run.
        let mut enqueued = (t.elapsed(), t.elapsed());
        let r = self.gpu.decode_slots_each_with(shape, &slab.pages, &seqs, bf16_out, || {
            enqueued.0 = t.elapsed();
            for b in &mut built {
                if let (Some(g), None) = b {
                    b.1 = Some(g.merge());
                }
            }
            enqueued.1 = t.elapsed();
        });
        // The decode waited for the stream (its read-back): every copy before it has run.
        if r.is_ok() {
            slab.inflight.clear();
            for (item, page) in deferred {
                if let Some(b) = &built[item].1 {
                    slab.table.landed(&keyed[item].0, page, b);
                }
            }
        }
        tracing::debug!(
            uploads = n_uploads,
            before = ?(t - t0),
            upload = ?uploaded,
            enqueued = ?(enqueued.0 - uploaded),
            built = ?(enqueued.1 - enqueued.0),
            decode = ?(t.elapsed() - uploaded),
            "GPU step"
        );
        Ok((r?, built.into_iter().map(|b| b.1).collect()))
    }
}

#[cfg(test)]
mod tests {
    use super::SlotTable;
    use bytes::Bytes;

    fn pages(n: usize) -> Vec<(Bytes, usize)> {
        (0..n).map(|i| (Bytes::from(vec![i as u8; 64]), 16)).collect()
    }

    /// On a GPU: a speculated step's pending last page goes up as its new rows where the slot
    /// holds the page it grew from, and whole — built first — where the slot went to another
    /// layer; either way the answer is the reference's over the grown page, and the page built
    /// is the old one with the row appended.
    #[test]
    #[ignore = "needs an NVIDIA GPU and driver: run with --include-ignored on a GPU machine"]
    fn pending_grown_pages_are_built_and_answer_as_the_grown_page() {
        use super::{DeviceCache, DeviceItem};
        use crate::Grown;
        use kvcache_attention::AttnShape;
        use kvcache_attention::gpu::{Gpu, Output, Query};
        use kvcache_attention::reference::{attention, rel_l2};
        use kvcache_core::{Codec, ModelSpec, PageLayout, SequenceKey};
        use rand::{Rng, SeedableRng};
        let gpu = Gpu::open(0).expect("a GPU (this test is for GPU machines)");
        let spec = ModelSpec::preset("llama-3-8b").expect("preset");
        let layout = PageLayout::new(&spec, Codec::Bf16, 16);
        let shape = AttnShape::new(&spec, layout);
        let mut rng = rand::rngs::StdRng::seed_from_u64(kvcache_core::testing::test_seed());
        let mut page = |n: usize| {
            let v: Vec<f32> =
                (0..layout.planes * n * layout.shape.width).map(|_| rng.random_range(-2.0..2.0)).collect();
            Bytes::from(layout.encode(&v, n))
        };
        // Room for one layer of four pages: reading layer B gives layer A's slots away.
        let slot = layout.page_bytes().next_multiple_of(256) as u64;
        let dev = DeviceCache::new(gpu, 4 * slot, None);
        let (a, b) = ((SequenceKey::new("n", "a"), 0u32), (SequenceKey::new("n", "b"), 0u32));
        let mut layer_a: Vec<(Bytes, usize)> = (0..3).map(|_| (page(16), 16)).collect();
        layer_a.push((page(5), 5));
        let layer_b: Vec<(Bytes, usize)> = (0..4).map(|_| (page(16), 16)).collect();
        let q: Vec<f32> = {
            let mut r = rand::rngs::StdRng::seed_from_u64(9);
            (0..shape.q_len()).map(|_| r.random_range(-1.0..1.0)).collect()
        };
        let run = |key: &(SequenceKey, u32), pages: &[(Bytes, usize)], grown: Option<&Grown>| {
            let item = DeviceItem { key: key.clone(), q: Query::F32(&q), pages, skip: 0, grown };
            let (mut answers, mut built) = dev.decode(&shape, &[item], false).expect("decode");
            let (out, _) = answers.pop().expect("one").expect("answered");
            let Output::F32(out) = out else { panic!("f32 outputs were asked for") };
            (out, built.pop().expect("one"))
        };
        run(&a, &layer_a, None);
        // Steps 1 and 2 find the slot holding the page they grew from (the second, the page the
        // first built); step 3 comes after layer B took the slab.
        for step in 1..=3 {
            if step == 3 {
                run(&b, &layer_b, None);
            }
            let (old, n) = layer_a.last().cloned().expect("a last page");
            let grown = Grown { old: old.clone(), old_tokens: n, rows: page(1), layout, pending: true, arena: None };
            let merged = grown.merge();
            let mut pending = layer_a.clone();
            *pending.last_mut().expect("a last page") = (Bytes::new(), n + 1);
            let (out, built) = run(&a, &pending, Some(&grown));
            let built = built.expect("the pending page was built");
            assert_eq!(built, merged, "step {step}: the built page");
            *layer_a.last_mut().expect("a last page") = (built, n + 1);
            let kv: Vec<_> =
                layer_a.iter().map(|(p, n)| kvcache_attention::KvPage { payload: p, tokens: *n }).collect();
            let (want, _) = attention(&shape, &q, &kv);
            let e = rel_l2(&out, &want);
            assert!(e <= 1e-5, "step {step}: rel L2 {e:e}");
        }
    }

    #[test]
    fn a_warm_step_uploads_only_the_page_that_changed() {
        let mut t = SlotTable::new(16);
        let mut a = pages(4);
        let up = t.assign(&[((1, 0), &a[..], None)]).unwrap();
        let slots = t.slots(&(1, 0)).to_vec();
        assert_eq!(up.len(), 4);
        for (item, page, _, _) in &up {
            assert_eq!(*item, 0);
            t.landed(&(1, 0), *page, &a[*page].0);
        }
        // Same bytes: nothing to upload, same slots.
        let up = t.assign(&[((1, 0), &a[..], None)]).unwrap();
        let again = t.slots(&(1, 0)).to_vec();
        assert!(up.is_empty());
        assert_eq!(again, slots);
        // The append wrote a new last page (new bytes): that page alone, into its own slot.
        a[3].0 = Bytes::from(vec![9u8; 80]);
        let up = t.assign(&[((1, 0), &a[..], None)]).unwrap();
        let again = t.slots(&(1, 0)).to_vec();
        assert_eq!(up, vec![(0, 3, slots[3], 0)]);
        assert_eq!(again, slots);
    }

    #[test]
    fn a_page_grown_from_the_one_its_slot_holds_uploads_only_its_new_rows() {
        let mut t = SlotTable::new(8);
        let mut a = pages(2);
        let up = t.assign(&[((1, 0), &a[..], None)]).unwrap();
        let slots = t.slots(&(1, 0)).to_vec();
        for (_, page, _, _) in &up {
            t.landed(&(1, 0), *page, &a[*page].0);
        }
        // The last page grew from the bytes its slot holds: rows after its 16 tokens only.
        let old = a[1].0.clone();
        a[1] = (Bytes::from(vec![7u8; 68]), 17);
        let up = t.assign(&[((1, 0), &a[..], Some((&old, 16, &[][..])))]).unwrap();
        assert_eq!(up, vec![(0, 1, slots[1], 16)]);
        t.landed(&(1, 0), 1, &a[1].0);
        // A claimed growth from bytes the slot does not hold: the whole page.
        let stranger = Bytes::from(vec![1u8; 68]);
        a[1] = (Bytes::from(vec![8u8; 72]), 18);
        let up = t.assign(&[((1, 0), &a[..], Some((&stranger, 17, &[][..])))]).unwrap();
        assert_eq!(up, vec![(0, 1, slots[1], 0)]);
    }

    #[test]
    fn an_upload_never_landed_is_uploaded_again() {
        let mut t = SlotTable::new(8);
        let a = pages(2);
        let up = t.assign(&[((1, 0), &a[..], None)]).unwrap();
        assert_eq!(up.len(), 2);
        t.landed(&(1, 0), 0, &a[0].0); // page 1's upload failed or never ran
        let up = t.assign(&[((1, 0), &a[..], None)]).unwrap();
        assert_eq!(up.iter().map(|u| u.1).collect::<Vec<_>>(), vec![1]);
        t.forget(&(1, 0));
        assert_eq!(t.free_slots(), 8);
    }

    #[test]
    fn a_full_slab_evicts_the_least_recent_layer_outside_the_batch_and_refuses_what_cannot_fit() {
        let mut t = SlotTable::new(6);
        let (a, b, c) = (pages(3), pages(3), pages(2));
        for (k, p) in [((1, 0), &a), ((2, 0), &b)] {
            let up = t.assign(&[(k, &p[..], None)]).unwrap();
            for (_, i, _, _) in up {
                t.landed(&k, i, &p[i].0);
            }
        }
        // Layer (1, 0) is the least recent: it goes; (2, 0) keeps its slots.
        let up = t.assign(&[((3, 0), &c[..], None)]).unwrap();
        assert_eq!(up.len(), 2);
        let up = t.assign(&[((2, 0), &b[..], None)]).unwrap();
        assert!(up.is_empty(), "the recent layer was not evicted");
        // More pages than slots: refused whole.
        let big = pages(7);
        assert!(t.assign(&[((4, 0), &big[..], None)]).unwrap_err().contains("more than the 6"));
        // Two layers of this batch that together fill the slab: nothing of theirs is evicted.
        let (d, e) = (pages(3), pages(3));
        let up = t.assign(&[((5, 0), &d[..], None), ((6, 0), &e[..], None)]).unwrap();
        assert_eq!(up.len(), 6);
        let mut all: Vec<usize> = [t.slots(&(5, 0)), t.slots(&(6, 0))].concat();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 6, "distinct slots");
    }

    #[test]
    fn a_window_that_moves_on_gives_slots_back() {
        let mut t = SlotTable::new(4);
        let a = pages(4);
        t.assign(&[((1, 0), &a[..], None)]).unwrap();
        t.assign(&[((1, 0), &a[2..], None)]).unwrap();
        assert_eq!(t.slots(&(1, 0)).len(), 2);
        assert_eq!(t.free_slots(), 2);
    }
}
