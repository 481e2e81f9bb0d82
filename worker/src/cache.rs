//! The worker's page cache: bounded by bytes, least-recently-used out, keyed by page and
//! validated against the (node, write_seq) a lookup reports, so a changed page is never used.

use bytes::Bytes;
use kvcache_core::PageKey;
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

struct Slot {
    page: CachedPage,
    tick: u64,
}

#[derive(Default)]
struct Inner {
    map: HashMap<PageKey, Slot>,
    lru: BTreeMap<u64, PageKey>,
    used: u64,
    tick: u64,
    hits: u64,
    misses: u64,
}

/// Bounded LRU page cache.
pub struct PageCache {
    capacity: u64,
    inner: Mutex<Inner>,
}

impl PageCache {
    /// A cache of at most `capacity` payload bytes.
    pub fn new(capacity: u64) -> Self {
        Self { capacity, inner: Mutex::new(Inner::default()) }
    }

    /// The page if the cached version is (`node`, `write_seq`).
    pub fn get(&self, key: &PageKey, node: &str, write_seq: u64) -> Option<CachedPage> {
        let mut g = self.inner.lock();
        let g = &mut *g;
        g.tick += 1;
        let tick = g.tick;
        let hit = match g.map.get_mut(key) {
            Some(s) if &*s.page.node == node && s.page.write_seq == write_seq => {
                g.lru.remove(&s.tick);
                s.tick = tick;
                g.lru.insert(tick, key.clone());
                Some(s.page.clone())
            }
            _ => None,
        };
        if hit.is_some() {
            g.hits += 1;
        } else {
            g.misses += 1;
        }
        hit
    }

    /// The cached version of a page, whatever it is (for applying an append locally).
    pub fn peek(&self, key: &PageKey) -> Option<CachedPage> {
        self.inner.lock().map.get(key).map(|s| s.page.clone())
    }

    /// Insert (replacing any older version), evicting least-recently-used pages to fit.
    pub fn insert(&self, key: PageKey, page: CachedPage) {
        let len = page.bytes.len() as u64;
        if len > self.capacity {
            return;
        }
        let mut g = self.inner.lock();
        let g = &mut *g;
        if let Some(old) = g.map.remove(&key) {
            g.lru.remove(&old.tick);
            g.used -= old.page.bytes.len() as u64;
        }
        while g.used + len > self.capacity {
            let Some((_, k)) = g.lru.pop_first() else { break };
            if let Some(s) = g.map.remove(&k) {
                g.used -= s.page.bytes.len() as u64;
            }
        }
        g.tick += 1;
        let tick = g.tick;
        g.lru.insert(tick, key.clone());
        g.map.insert(key, Slot { page, tick });
        g.used += len;
    }

    /// (bytes used, pages, hits, misses).
    pub fn stats(&self) -> (u64, u64, u64, u64) {
        let g = self.inner.lock();
        (g.used, g.map.len() as u64, g.hits, g.misses)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvcache_core::SequenceKey;

    fn key(i: u32) -> PageKey {
        PageKey { sequence: SequenceKey::new("n", "s"), layer: 0, page_index: i }
    }

    fn page(n: usize, ws: u64) -> CachedPage {
        CachedPage { node: "a".into(), write_seq: ws, tokens: 1, bytes: Bytes::from(vec![0u8; n]) }
    }

    #[test]
    fn stays_within_capacity_and_evicts_least_recently_used() {
        let c = PageCache::new(300);
        c.insert(key(0), page(100, 1));
        c.insert(key(1), page(100, 1));
        c.insert(key(2), page(100, 1));
        assert!(c.get(&key(0), "a", 1).is_some());
        c.insert(key(3), page(100, 1));
        assert!(c.get(&key(1), "a", 1).is_none(), "page 1 was least recently used");
        assert!(c.get(&key(0), "a", 1).is_some());
        assert_eq!(c.stats().0, 300);
    }

    #[test]
    fn a_different_version_is_a_miss() {
        let c = PageCache::new(1000);
        c.insert(key(0), page(10, 5));
        assert!(c.get(&key(0), "a", 6).is_none());
        assert!(c.get(&key(0), "b", 5).is_none());
        assert!(c.get(&key(0), "a", 5).is_some());
    }
}
