//! The worker's page cache: bounded by bytes, keyed by page and validated against the
//! (node, write_seq) a lookup or an append reports, so a changed page is never used.
//!
//! Recency is kept per layer of a sequence, not per page: a decode step reads a layer whole
//! (attention needs every page of it), so a layer's pages are used together and age together,
//! and the least recently used layer goes first. A warm step then costs one lock, one hash and
//! one recency update per sequence, not one per page (128 per layer at 8K tokens and 64-token
//! pages). Only the layer being written is ever left partial: by an eviction that finds nothing
//! else to evict.

use bytes::Bytes;
use kvcache_core::{PageKey, SequenceKey};
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// A cached page version.
#[derive(Debug, Clone)]
pub struct CachedPage {
    /// Node it came from (write_seqs are per node).
    pub node: Arc<str>,
    /// Its write_seq on that node.
    pub write_seq: u64,
    /// Tokens.
    pub tokens: u32,
    /// Payload.
    pub bytes: Bytes,
}

#[derive(Default)]
struct Layer {
    /// Index = page index.
    pages: Vec<Option<CachedPage>>,
    bytes: u64,
    tick: u64,
    /// What an owner last said the layer holds, when its pages were read whole from here.
    extent: Option<Extent>,
    /// The full pages the last confirmed speculation computed on, kept as its list (see
    /// [`SpecPages`]).
    spec: Option<SpecPages>,
}

/// The full pages of a layer (from `start` on, all from `node`) that a confirmed speculation
/// computed on, as the list it computed on: the next step's speculation takes the list (one
/// move) instead of cloning each page's handle out of the cache (a cache miss per page: ~2.6 ms
/// for 64 sequences × 512 pages), and the step gives it back when the owner confirms it. Every
/// page is a version with its write_seq; the owner's answer validates them, as it validates
/// pages read from the cache.
#[derive(Debug, Default)]
pub struct SpecPages {
    /// The owner the pages are versions of.
    pub node: Arc<str>,
    /// Index of the first page.
    pub start: usize,
    /// (payload, tokens): every page full.
    pub pages: Vec<(Bytes, usize)>,
    /// Each page's write_seq on `node`.
    pub write_seqs: Vec<u64>,
}

/// A layer's extent on the owner its cached pages came from, as last validated: what a step
/// that appends one token can compute on before the owner answers (the answer then confirms or
/// refutes it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extent {
    /// The owner.
    pub node: Arc<str>,
    /// Tokens of the layer, its prefix's included.
    pub tokens: u64,
    /// Leading pages that are the sequence's prefix (content pages).
    pub prefix_pages: u32,
}

#[derive(Default)]
struct Inner {
    map: HashMap<SequenceKey, BTreeMap<u32, Layer>>,
    /// tick → layer, least recently used first.
    lru: BTreeMap<u64, (SequenceKey, u32)>,
    used: u64,
    pages: u64,
    tick: u64,
    hits: u64,
    misses: u64,
}

/// Whether a cached page is the version (`node`, `write_seq`); write_seq 0 is a missing page.
fn is_version(p: &CachedPage, node: &str, write_seq: u64) -> bool {
    write_seq != 0 && p.write_seq == write_seq && &*p.node == node
}

impl Inner {
    fn layer_mut(&mut self, seq: &SequenceKey, layer: u32) -> Option<&mut Layer> {
        self.map.get_mut(seq)?.get_mut(&layer)
    }

    /// Make the layer the most recently used one.
    fn touch(&mut self, seq: &SequenceKey, layer: u32) {
        self.tick += 1;
        let tick = self.tick;
        let Some(l) = self.map.get_mut(seq).and_then(|m| m.get_mut(&layer)) else { return };
        let old = std::mem::replace(&mut l.tick, tick);
        let k = self.lru.remove(&old).unwrap_or_else(|| (seq.clone(), layer));
        self.lru.insert(tick, k);
    }

    fn remove_layer(&mut self, seq: &SequenceKey, layer: u32) {
        let Some(m) = self.map.get_mut(seq) else { return };
        if let Some(l) = m.remove(&layer) {
            self.lru.remove(&l.tick);
            self.used -= l.bytes;
            self.pages -= l.pages.iter().flatten().count() as u64;
        }
        if m.is_empty() {
            self.map.remove(seq);
        }
    }
}

/// Bounded page cache, least recently used layer out.
pub struct PageCache {
    capacity: u64,
    inner: Mutex<Inner>,
}

impl PageCache {
    /// A cache of at most `capacity` payload bytes.
    pub fn new(capacity: u64) -> Self {
        Self { capacity, inner: Mutex::new(Inner::default()) }
    }

    /// The layer's pages whose cached version is (`node`, `write_seqs[i]`), `None` for the
    /// others (a write_seq of 0 is never cached). Counts a hit or a miss per page and makes the
    /// layer the most recently used.
    pub fn layer(&self, seq: &SequenceKey, layer: u32, node: &str, write_seqs: &[u64]) -> Vec<Option<CachedPage>> {
        self.layer_from(seq, layer, node, 0, write_seqs)
    }

    /// [`layer`](Self::layer) of the pages from index `start` on (`write_seqs[0]` is page
    /// `start`'s): a sequence over a prefix holds its own pages after the prefix's.
    pub fn layer_from(
        &self,
        seq: &SequenceKey,
        layer: u32,
        node: &str,
        start: usize,
        write_seqs: &[u64],
    ) -> Vec<Option<CachedPage>> {
        let mut g = self.inner.lock();
        let got: Vec<Option<CachedPage>> = match g.layer_mut(seq, layer) {
            Some(l) => write_seqs
                .iter()
                .enumerate()
                .map(|(i, &ws)| {
                    l.pages.get(start + i).and_then(|p| p.as_ref()).filter(|p| is_version(p, node, ws)).cloned()
                })
                .collect(),
            None => vec![None; write_seqs.len()],
        };
        let hits = got.iter().flatten().count() as u64;
        g.hits += hits;
        g.misses += write_seqs.len() as u64 - hits;
        g.touch(seq, layer);
        got
    }

    /// The whole layer if every page of it is cached as (`node`, `write_seqs[i]`), in order;
    /// otherwise `None` without counting anything (the caller then reads the layer through
    /// [`layer`](Self::layer), which counts).
    pub fn whole_layer(
        &self,
        seq: &SequenceKey,
        layer: u32,
        node: &str,
        write_seqs: &[u64],
    ) -> Option<Vec<CachedPage>> {
        self.whole_layer_from(seq, layer, node, 0, write_seqs)
    }

    /// [`whole_layer`](Self::whole_layer) of the pages from index `start` on.
    pub fn whole_layer_from(
        &self,
        seq: &SequenceKey,
        layer: u32,
        node: &str,
        start: usize,
        write_seqs: &[u64],
    ) -> Option<Vec<CachedPage>> {
        let mut g = self.inner.lock();
        let l = g.layer_mut(seq, layer)?;
        if write_seqs.is_empty() || l.pages.len() < start + write_seqs.len() {
            return None;
        }
        let got = write_seqs
            .iter()
            .zip(&l.pages[start..])
            .map(|(&ws, p)| p.as_ref().filter(|p| is_version(p, node, ws)).cloned())
            .collect::<Option<Vec<_>>>()?;
        g.hits += got.len() as u64;
        g.touch(seq, layer);
        Some(got)
    }

    /// Pages `[start, start + count)` of the layer if every one is cached from `node`, in
    /// order, as (payload, tokens, write_seq), whatever their versions (the caller validates
    /// them later against an owner's answer); makes the layer the most recently used. Counts
    /// nothing.
    pub fn pages_from(
        &self,
        seq: &SequenceKey,
        layer: u32,
        node: &str,
        start: usize,
        count: usize,
    ) -> Option<Vec<(Bytes, u32, u64)>> {
        let mut g = self.inner.lock();
        let l = g.layer_mut(seq, layer)?;
        let got = l
            .pages
            .get(start..start + count)?
            .iter()
            .map(|p| p.as_ref().filter(|p| &*p.node == node).map(|p| (p.bytes.clone(), p.tokens, p.write_seq)))
            .collect::<Option<Vec<_>>>()?;
        g.touch(seq, layer);
        Some(got)
    }

    /// Remember what `extent.node` said the layer holds (its pages were just read whole from
    /// here, or pulled). Forgotten with the layer. Drops a kept speculation list.
    pub fn set_extent(&self, seq: &SequenceKey, layer: u32, extent: Extent) {
        if let Some(l) = self.inner.lock().layer_mut(seq, layer) {
            l.extent = Some(extent);
            l.spec = None;
        }
    }

    /// Take the layer's kept speculation list if it holds exactly the full pages
    /// `[start, start + count)` from `node` (else it is left, and `None`).
    pub fn take_spec_pages(
        &self,
        seq: &SequenceKey,
        layer: u32,
        node: &str,
        start: usize,
        count: usize,
    ) -> Option<SpecPages> {
        let mut g = self.inner.lock();
        let l = g.layer_mut(seq, layer)?;
        let fits = l.spec.as_ref().is_some_and(|s| *s.node == *node && s.start == start && s.pages.len() == count);
        let got = if fits { l.spec.take() } else { None };
        if got.is_some() {
            g.touch(seq, layer);
        }
        got
    }

    /// Keep a confirmed speculation's list for the layer's next step (dropped with the layer,
    /// or by the next [`Self::set_extent`]).
    pub fn keep_spec_pages(&self, seq: &SequenceKey, layer: u32, spec: SpecPages) {
        if let Some(l) = self.inner.lock().layer_mut(seq, layer) {
            l.spec = Some(spec);
        }
    }

    /// The layer's last validated extent, if the layer is cached.
    pub fn extent(&self, seq: &SequenceKey, layer: u32) -> Option<Extent> {
        let g = self.inner.lock();
        g.map.get(seq)?.get(&layer)?.extent.clone()
    }

    /// Content pages (page 0 of a content key's layer), which are immutable: any cached copy is
    /// the page, whichever node it came from. Counts hits and misses and makes each present one
    /// the most recently used.
    pub fn content(&self, keys: &[PageKey]) -> Vec<Option<CachedPage>> {
        let mut g = self.inner.lock();
        let got: Vec<Option<CachedPage>> = keys
            .iter()
            .map(|k| g.layer_mut(&k.sequence, k.layer).and_then(|l| l.pages.first().cloned().flatten()))
            .collect();
        for (k, p) in keys.iter().zip(&got) {
            if p.is_some() {
                g.touch(&k.sequence, k.layer);
            }
        }
        let hits = got.iter().flatten().count() as u64;
        g.hits += hits;
        g.misses += keys.len() as u64 - hits;
        got
    }

    /// The cached version of a page, whatever it is (for applying an append locally). Neither
    /// counted nor a use.
    pub fn peek(&self, key: &PageKey) -> Option<CachedPage> {
        let g = self.inner.lock();
        let l = g.map.get(&key.sequence)?.get(&key.layer)?;
        l.pages.get(key.page_index as usize)?.clone()
    }

    /// Insert (replacing any older version), evicting least recently used layers to fit; the
    /// page's own layer goes last, and only when the page does not fit beside it.
    pub fn insert(&self, key: PageKey, page: CachedPage) {
        let idx = key.page_index;
        self.insert_layer(&key.sequence, key.layer, [(idx, page)]);
    }

    /// [`PageCache::insert`] for pages of one layer, under one lock: a pull caches a sequence's
    /// pages in one go (512 at 32K tokens), not one lock and one recency update per page.
    pub fn insert_layer(&self, seq: &SequenceKey, layer: u32, pages: impl IntoIterator<Item = (u32, CachedPage)>) {
        let mut g = self.inner.lock();
        let g = &mut *g;
        let mut any = false;
        for (idx, page) in pages {
            let len = page.bytes.len() as u64;
            if len > self.capacity {
                continue;
            }
            let idx = idx as usize;
            if let Some(old) = g.layer_mut(seq, layer).and_then(|l| {
                // A kept speculation list holding the replaced version goes with it (it would
                // hold that version's bytes outside the budget).
                if l.spec.as_ref().is_some_and(|s| (s.start..s.start + s.pages.len()).contains(&idx)) {
                    l.spec = None;
                }
                let old = l.pages.get_mut(idx).and_then(Option::take)?;
                l.bytes -= old.bytes.len() as u64;
                Some(old)
            }) {
                g.used -= old.bytes.len() as u64;
                g.pages -= 1;
            }
            while g.used + len > self.capacity {
                let victim =
                    g.lru.values().find(|(s, l)| !(s == seq && *l == layer)).or_else(|| g.lru.values().next()).cloned();
                let Some((s, l)) = victim else { break };
                g.remove_layer(&s, l);
            }
            if g.layer_mut(seq, layer).is_none() {
                // New layers start most recent, so that eviction takes others first.
                g.map.entry(seq.clone()).or_default().insert(layer, Layer::default());
                g.touch(seq, layer);
            }
            let l = g.layer_mut(seq, layer).expect("present");
            if l.pages.len() <= idx {
                l.pages.resize(idx + 1, None);
            }
            l.pages[idx] = Some(page);
            l.bytes += len;
            g.used += len;
            g.pages += 1;
            any = true;
        }
        if any {
            g.touch(seq, layer);
        }
    }

    /// Drop the cached pages of a layer before page `first`: a sliding window or chunk moved
    /// past them, and the node released them.
    pub fn drop_before(&self, seq: &SequenceKey, layer: u32, first: usize) {
        let mut g = self.inner.lock();
        let g = &mut *g;
        let Some(l) = g.layer_mut(seq, layer) else { return };
        l.spec = None;
        let (mut bytes, mut pages) = (0, 0);
        // Back from the window's start to the first hole: earlier pages went at earlier steps,
        // so a step costs the pages it drops, not the layer's length.
        let end = first.min(l.pages.len());
        for p in l.pages[..end].iter_mut().rev() {
            let Some(p) = p.take() else { break };
            bytes += p.bytes.len() as u64;
            pages += 1;
        }
        l.bytes -= bytes;
        g.used -= bytes;
        g.pages -= pages;
    }

    /// (bytes used, pages, hits, misses).
    pub fn stats(&self) -> (u64, u64, u64, u64) {
        let g = self.inner.lock();
        (g.used, g.pages, g.hits, g.misses)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seq: &str, layer: u32, i: u32) -> PageKey {
        PageKey { sequence: SequenceKey::new("n", seq), layer, page_index: i }
    }

    fn page(n: usize, ws: u64) -> CachedPage {
        CachedPage { node: "a".into(), write_seq: ws, tokens: 1, bytes: Bytes::from(vec![ws as u8; n]) }
    }

    fn current(c: &PageCache, seq: &str, layer: u32, ws: &[u64]) -> Vec<bool> {
        c.layer(&SequenceKey::new("n", seq), layer, "a", ws).iter().map(Option::is_some).collect()
    }

    #[test]
    fn stays_within_capacity_and_evicts_the_least_recently_used_layer() {
        let c = PageCache::new(400);
        for (s, l) in [("x", 0), ("y", 0), ("x", 1)] {
            c.insert(key(s, l, 0), page(100, 1));
        }
        c.insert(key("y", 0, 1), page(100, 1));
        assert_eq!(c.stats().0, 400);
        // x/0 and x/1 are read, so y/0 (two pages, one written after x/1) is now the least
        // recently used layer.
        assert_eq!(current(&c, "x", 0, &[1]), [true]);
        assert_eq!(current(&c, "x", 1, &[1]), [true]);
        c.insert(key("z", 0, 0), page(100, 1));
        assert_eq!(current(&c, "y", 0, &[1, 1]), [false, false], "the whole layer goes");
        assert_eq!(current(&c, "x", 0, &[1]), [true]);
        assert_eq!(current(&c, "x", 1, &[1]), [true]);
        assert_eq!(c.stats().0, 300);
        assert_eq!(c.stats().1, 3);
    }

    #[test]
    fn a_layer_inserted_in_one_go_is_cached_and_evicts_as_page_by_page() {
        // The same history through both paths: two layers, then a third that needs room, with
        // a replaced page and one larger than the whole cache among its pages.
        let (one, each) = (PageCache::new(500), PageCache::new(500));
        type Pages = Vec<(u32, CachedPage)>;
        let layers: [(&str, u32, Pages); 3] = [
            ("x", 0, (0..2).map(|i| (i, page(100, 1))).collect()),
            ("y", 0, (0..2).map(|i| (i, page(100, 1))).collect()),
            (
                "z",
                1,
                vec![(0, page(100, 1)), (1, page(100, 1)), (0, page(100, 2)), (2, page(900, 1)), (3, page(100, 1))],
            ),
        ];
        for (s, l, pages) in &layers {
            one.insert_layer(&SequenceKey::new("n", *s), *l, pages.clone());
            for (i, p) in pages {
                each.insert(key(s, *l, *i), p.clone());
            }
            assert_eq!(one.stats(), each.stats(), "after {s}/{l}");
        }
        for c in [&one, &each] {
            // x/0 (least recently used) went for z/1's third page; the page too large for the
            // cache was never kept.
            assert_eq!(c.stats().0, 500);
            assert_eq!(current(c, "x", 0, &[1, 1]), [false, false]);
            assert_eq!(current(c, "y", 0, &[1, 1]), [true, true]);
            assert_eq!(current(c, "z", 1, &[2, 1, 1, 1]), [true, true, false, true]);
        }
    }

    #[test]
    fn a_layer_larger_than_the_cache_keeps_its_newest_pages_within_capacity() {
        let c = PageCache::new(250);
        for i in 0..5 {
            c.insert(key("x", 0, i), page(100, 1));
            assert!(c.stats().0 <= 250);
        }
        assert!(c.peek(&key("x", 0, 4)).is_some());
        assert_eq!(c.stats().0, c.stats().1 * 100);
    }

    #[test]
    fn a_kept_speculation_list_is_taken_once_only_where_it_fits_and_goes_with_a_replaced_page() {
        let c = PageCache::new(10_000);
        let seq = SequenceKey::new("n", "x");
        for i in 0..4 {
            c.insert(key("x", 0, i), page(10, 1));
        }
        let list = |start: usize, n: usize| SpecPages {
            node: "a".into(),
            start,
            pages: (0..n).map(|_| (Bytes::from(vec![1u8; 10]), 1)).collect(),
            write_seqs: vec![1; n],
        };
        c.keep_spec_pages(&seq, 0, list(1, 2));
        assert!(c.take_spec_pages(&seq, 0, "b", 1, 2).is_none(), "another owner's");
        assert!(c.take_spec_pages(&seq, 0, "a", 0, 2).is_none(), "another start");
        assert!(c.take_spec_pages(&seq, 0, "a", 1, 3).is_none(), "another length");
        let got = c.take_spec_pages(&seq, 0, "a", 1, 2).expect("fits");
        assert_eq!((got.start, got.pages.len(), got.write_seqs.len()), (1, 2, 2));
        assert!(c.take_spec_pages(&seq, 0, "a", 1, 2).is_none(), "taken");
        // A new version of a page in the list drops it; one past it does not.
        c.keep_spec_pages(&seq, 0, list(1, 2));
        c.insert(key("x", 0, 3), page(10, 2));
        c.keep_spec_pages(&seq, 0, c.take_spec_pages(&seq, 0, "a", 1, 2).expect("page 3 is past it"));
        c.insert(key("x", 0, 2), page(10, 2));
        assert!(c.take_spec_pages(&seq, 0, "a", 1, 2).is_none(), "page 2 was replaced");
        // So does a new extent, and a window moving on.
        c.keep_spec_pages(&seq, 0, list(1, 2));
        c.set_extent(&seq, 0, Extent { node: "a".into(), tokens: 4, prefix_pages: 0 });
        assert!(c.take_spec_pages(&seq, 0, "a", 1, 2).is_none());
        c.keep_spec_pages(&seq, 0, list(1, 2));
        c.drop_before(&seq, 0, 1);
        assert!(c.take_spec_pages(&seq, 0, "a", 1, 2).is_none());
    }

    #[test]
    fn a_different_version_is_a_miss() {
        let c = PageCache::new(1000);
        c.insert(key("x", 0, 0), page(10, 5));
        assert_eq!(current(&c, "x", 0, &[6]), [false]);
        assert!(c.layer(&SequenceKey::new("n", "x"), 0, "b", &[5])[0].is_none());
        assert_eq!(current(&c, "x", 0, &[5]), [true]);
        assert_eq!(current(&c, "x", 0, &[0]), [false], "write_seq 0 is a missing page");
        let (_, _, hits, misses) = c.stats();
        assert_eq!((hits, misses), (1, 3));
    }

    #[test]
    fn whole_layer_is_all_or_nothing_and_counts_only_when_whole() {
        let c = PageCache::new(1000);
        let s = SequenceKey::new("n", "x");
        c.insert(key("x", 0, 0), page(10, 1));
        c.insert(key("x", 0, 1), page(10, 2));
        assert!(c.whole_layer(&s, 0, "a", &[1, 2, 3]).is_none(), "a page more than cached");
        assert!(c.whole_layer(&s, 0, "a", &[1, 3]).is_none(), "a newer version");
        assert!(c.whole_layer(&s, 0, "b", &[1, 2]).is_none(), "another node");
        assert!(c.whole_layer(&s, 0, "a", &[]).is_none());
        assert_eq!(c.stats().2 + c.stats().3, 0);
        let got = c.whole_layer(&s, 0, "a", &[1, 2]).expect("whole");
        assert_eq!(got.iter().map(|p| p.bytes[0]).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(c.stats().2, 2);
    }

    #[test]
    fn replacing_a_page_keeps_the_accounting() {
        let c = PageCache::new(1000);
        c.insert(key("x", 0, 0), page(10, 1));
        c.insert(key("x", 0, 0), page(30, 2));
        assert_eq!((c.stats().0, c.stats().1), (30, 1));
        assert_eq!(c.peek(&key("x", 0, 0)).map(|p| p.write_seq), Some(2));
        c.insert(key("x", 0, 3), page(5, 1));
        assert!(c.peek(&key("x", 0, 2)).is_none());
        assert_eq!((c.stats().0, c.stats().1), (35, 2));
    }
}
