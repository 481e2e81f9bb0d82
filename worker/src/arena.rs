//! A preallocated, pre-touched memory region for the page cache's payloads.
//!
//! Pulled pages arrive as slices of the HTTP/2 frame buffers they were received in. Kept in the
//! cache as they are, every byte a cold pull brings in lands in memory the process has never
//! touched, and the kernel faults it in and zeroes it first — several times the cost of copying
//! it. An [`Arena`] is one anonymous mapping of the cache's size, populated when the worker
//! starts (as GPU engines preallocate their KV block pools): a pulled page is copied into a slot
//! of it and the frame buffer is freed at once, so the allocator reuses it for the next frame.
//!
//! Layout: 2 MiB chunks (huge-page sized; the mapping asks for transparent huge pages). A chunk
//! serves one slot size — the page's length rounded up to 4 KiB — so a namespace's full pages
//! pack a chunk with at most 4 KiB of waste per page; an emptied chunk returns to the free list
//! and can serve another size. Pages over 2 MiB, and pages that find no free slot, are not
//! copied: the cache keeps the received bytes as before.
//!
//! A decode step builds each sequence's grown last page (old payload + the appended token) here
//! too ([`Arena::fill_with`]). A cache is full in steady state, so the arena keeps a reserve of
//! chunks that pulled pages may not take: without it every grown page landed in fresh memory
//! once the cache had filled, and a 64-sequence GPU step faulted in 600–900 pages.

use bytes::Bytes;
use memmap2::{MmapOptions, MmapRaw};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;

/// Bytes per chunk.
pub const CHUNK: usize = 2 << 20;
const SLOT_ALIGN: usize = 4096;

/// The region and its free lists.
pub struct Arena {
    /// Slots are written through raw pointers and read as slices of their own bytes only, never
    /// as one slice of the whole region (writers and readers of different slots run at once).
    map: MmapRaw,
    state: Mutex<State>,
    /// Free chunks that only [`Arena::fill_with`] may take.
    reserve: usize,
}

struct State {
    free_chunks: Vec<u32>,
    chunks: Vec<Chunk>,
    /// Chunks with a free slot, by slot size.
    partial: HashMap<usize, Vec<u32>>,
}

#[derive(Default)]
struct Chunk {
    /// Slot size (0 while the chunk is free).
    slot: usize,
    free: Vec<u16>,
    used: u16,
}

impl Arena {
    /// A region of `bytes` (rounded down to whole chunks), its pages faulted in now when
    /// `prefault`. `None` when it is smaller than one chunk or the mapping fails.
    pub fn new(bytes: u64, prefault: bool) -> Option<Arc<Self>> {
        Self::with_reserve(bytes, 0, prefault)
    }

    /// [`Arena::new`] with `reserve` bytes more (whole chunks), kept for pages built here.
    pub fn with_reserve(bytes: u64, reserve: u64, prefault: bool) -> Option<Arc<Self>> {
        let reserve = usize::try_from(reserve).ok()?.div_ceil(CHUNK);
        if usize::try_from(bytes).ok()? < CHUNK {
            return None;
        }
        let chunks = usize::try_from(bytes).ok()? / CHUNK + reserve;
        if chunks == 0 {
            return None;
        }
        let map = MmapRaw::from(MmapOptions::new().len(chunks * CHUNK).map_anon().ok()?);
        // Huge pages first, so the prefault below (and any later first touch) maps 2 MiB at a
        // time where the kernel allows THP on `madvise`.
        #[cfg(target_os = "linux")]
        let _ = map.advise(memmap2::Advice::HugePage);
        if prefault {
            #[cfg(target_os = "linux")]
            let populated = map.advise(memmap2::Advice::PopulateWrite).is_ok();
            #[cfg(not(target_os = "linux"))]
            let populated = false;
            if !populated {
                for off in (0..map.len()).step_by(SLOT_ALIGN) {
                    // SAFETY: inside the fresh mapping, which nothing else refers to yet.
                    unsafe { map.as_mut_ptr().add(off).write_volatile(0) };
                }
            }
        }
        let state = State {
            free_chunks: (0..chunks as u32).rev().collect(),
            chunks: (0..chunks).map(|_| Chunk::default()).collect(),
            partial: HashMap::new(),
        };
        Some(Arc::new(Self { map, state: Mutex::new(state), reserve }))
    }

    /// The region's start and length (for registering it with a GPU driver, so that pages in it
    /// go to the device by DMA).
    pub fn region(&self) -> (*mut u8, usize) {
        (self.map.as_mut_ptr(), self.map.len())
    }

    /// `src` copied into a free slot, as `Bytes` that free the slot when the last clone drops;
    /// `None` when it is empty, over a chunk, or no slot of its size is free.
    pub fn copy_in(self: &Arc<Self>, src: &[u8]) -> Option<Bytes> {
        if src.is_empty() || src.len() > CHUNK {
            return None;
        }
        let (chunk, index, slot) = self.alloc(src.len().div_ceil(SLOT_ALIGN) * SLOT_ALIGN, false)?;
        let off = chunk as usize * CHUNK + index as usize * slot;
        // SAFETY: the slot `[off, off + slot)` lies inside the mapping and belongs to this call
        // alone from `alloc` until the `Slot` made below drops; no `&[u8]` of it exists yet.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.map.as_mut_ptr().add(off), src.len()) };
        Some(Bytes::from_owner(Slot { arena: self.clone(), chunk, index, off, len: src.len() }))
    }

    /// A slot of `len` bytes written by `fill` (which must write every byte: the slot holds
    /// whatever a freed page left there), as for [`Arena::copy_in`]; `None` as there.
    pub fn fill_with(self: &Arc<Self>, len: usize, fill: impl FnOnce(&mut [u8])) -> Option<Bytes> {
        if len == 0 || len > CHUNK {
            return None;
        }
        let (chunk, index, slot) = self.alloc(len.div_ceil(SLOT_ALIGN) * SLOT_ALIGN, true)?;
        let off = chunk as usize * CHUNK + index as usize * slot;
        // SAFETY: as in `copy_in`: the slot is this call's alone until the `Slot` below owns it,
        // and this is the only reference to its bytes; initialized memory (the mapping is).
        fill(unsafe { std::slice::from_raw_parts_mut(self.map.as_mut_ptr().add(off), len) });
        Some(Bytes::from_owner(Slot { arena: self.clone(), chunk, index, off, len }))
    }

    /// A slot of `slot` bytes; a new chunk only while more than the reserve is free, unless
    /// `reserved` (a page built here).
    fn alloc(&self, slot: usize, reserved: bool) -> Option<(u32, u16, usize)> {
        let mut st = self.state.lock();
        let st = &mut *st;
        let c = match st.partial.get(&slot).and_then(|v| v.last().copied()) {
            Some(c) => c,
            None => {
                if !reserved && st.free_chunks.len() <= self.reserve {
                    return None;
                }
                let c = st.free_chunks.pop()?;
                let ch = &mut st.chunks[c as usize];
                ch.slot = slot;
                ch.free = (0..(CHUNK / slot) as u16).rev().collect();
                st.partial.entry(slot).or_default().push(c);
                c
            }
        };
        let ch = &mut st.chunks[c as usize];
        let index = ch.free.pop().expect("a partial chunk has a free slot");
        ch.used += 1;
        if ch.free.is_empty() {
            let v = st.partial.get_mut(&slot).expect("listed");
            v.retain(|&x| x != c);
        }
        Some((c, index, slot))
    }

    fn free(&self, chunk: u32, index: u16) {
        let mut st = self.state.lock();
        let st = &mut *st;
        let ch = &mut st.chunks[chunk as usize];
        let slot = ch.slot;
        let was_full = ch.free.is_empty();
        ch.free.push(index);
        ch.used -= 1;
        if ch.used == 0 {
            *ch = Chunk::default();
            if let Some(v) = st.partial.get_mut(&slot) {
                v.retain(|&x| x != chunk);
            }
            st.free_chunks.push(chunk);
        } else if was_full {
            st.partial.entry(slot).or_default().push(chunk);
        }
    }

    /// (chunks in use, slots in use).
    pub fn usage(&self) -> (usize, usize) {
        let st = self.state.lock();
        let used: Vec<&Chunk> = st.chunks.iter().filter(|c| c.used > 0).collect();
        (used.len(), used.iter().map(|c| c.used as usize).sum())
    }
}

/// One occupied slot: the owner behind a payload's `Bytes`.
struct Slot {
    arena: Arc<Arena>,
    chunk: u32,
    index: u16,
    off: usize,
    len: usize,
}

impl AsRef<[u8]> for Slot {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: the slot was written before this owner existed and is not written again until
        // it drops; the region lives as long as the `Arc` held here.
        unsafe { std::slice::from_raw_parts(self.arena.map.as_ptr().add(self.off), self.len) }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.arena.free(self.chunk, self.index);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(n: usize, seed: u8) -> Vec<u8> {
        (0..n).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
    }

    #[test]
    fn copies_hold_their_bytes_and_slots_are_reused_after_the_last_clone() {
        let a = Arena::new(2 * CHUNK as u64, false).unwrap();
        let p = bytes(72 * 1024, 1);
        let x = a.copy_in(&p).unwrap();
        let y = x.clone();
        assert_eq!(&x[..], &p[..]);
        assert_eq!(a.usage(), (1, 1));
        drop(x);
        assert_eq!(a.usage(), (1, 1), "a clone still refers to the slot");
        assert_eq!(&y[..], &p[..]);
        drop(y);
        assert_eq!(a.usage(), (0, 0), "the emptied chunk is free again");
    }

    #[test]
    fn a_chunk_serves_one_size_and_fills_before_the_next_is_taken() {
        let a = Arena::new(3 * CHUNK as u64, true).unwrap();
        // 72 KiB slots: 28 per chunk, so 29 pages take two chunks.
        let mut pages: Vec<Bytes> = (0..29).map(|i| a.copy_in(&bytes(72 * 1024, i)).unwrap()).collect();
        assert_eq!(a.usage(), (2, 29));
        pages.extend((29..56).map(|i| a.copy_in(&bytes(72 * 1024, i)).unwrap()));
        assert_eq!(a.usage(), (2, 56), "the second chunk fills before a third is taken");
        // Another size takes the third chunk; then the region is full for every size.
        let big: Vec<Bytes> = (0..8).map(|i| a.copy_in(&bytes(256 * 1024, 100 + i)).unwrap()).collect();
        assert_eq!(a.usage(), (3, 64));
        assert!(a.copy_in(&bytes(256 * 1024, 0)).is_none(), "no 256 KiB slot left");
        assert!(a.copy_in(&bytes(72 * 1024, 0)).is_none(), "no 72 KiB slot left");
        assert!(a.copy_in(&bytes(100 * 1024, 0)).is_none(), "no free chunk for a new size");
        for (i, p) in pages.iter().enumerate() {
            assert_eq!(&p[..], &bytes(72 * 1024, i as u8)[..]);
        }
        for (i, p) in big.iter().enumerate() {
            assert_eq!(&p[..], &bytes(256 * 1024, 100 + i as u8)[..]);
        }
        // Freeing one 72 KiB page makes room for exactly one, in its slot.
        drop(pages.remove(5));
        let again = a.copy_in(&bytes(72 * 1024, 200)).unwrap();
        assert!(a.copy_in(&bytes(72 * 1024, 201)).is_none());
        assert_eq!(&again[..], &bytes(72 * 1024, 200)[..]);
        assert_eq!(&pages[5][..], &bytes(72 * 1024, 6)[..], "its neighbours are untouched");
    }

    #[test]
    fn an_emptied_chunk_can_serve_another_size() {
        let a = Arena::new(CHUNK as u64, false).unwrap();
        let x = a.copy_in(&bytes(64 * 1024, 3)).unwrap();
        assert!(a.copy_in(&bytes(256 * 1024, 3)).is_none());
        drop(x);
        let y = a.copy_in(&bytes(256 * 1024, 4)).unwrap();
        assert_eq!(&y[..], &bytes(256 * 1024, 4)[..]);
    }

    #[test]
    fn a_filled_slot_holds_what_was_written_over_a_freed_page() {
        let a = Arena::new(CHUNK as u64, false).unwrap();
        // A page freed leaves its bytes in the slot the next fill of that size takes.
        drop(a.copy_in(&bytes(40 * 1024, 7)).unwrap());
        let want = bytes(40 * 1024 - 100, 9);
        let x = a.fill_with(want.len(), |dst| dst.copy_from_slice(&want)).unwrap();
        assert_eq!(&x[..], &want[..]);
        assert_eq!(a.usage(), (1, 1));
        assert!(a.fill_with(0, |_| unreachable!()).is_none());
        assert!(a.fill_with(CHUNK + 1, |_| unreachable!()).is_none());
        drop(x);
        assert_eq!(a.usage(), (0, 0));
    }

    #[test]
    fn pulled_pages_leave_the_reserve_to_built_ones() {
        let a = Arena::with_reserve(CHUNK as u64, 1, false).unwrap();
        let pulled = a.copy_in(&bytes(CHUNK, 1)).unwrap();
        assert!(a.copy_in(&bytes(4096, 2)).is_none(), "the last free chunk is the reserve");
        let built = a.fill_with(4096, |d| d.copy_from_slice(&bytes(4096, 3))).unwrap();
        assert_eq!(&built[..], &bytes(4096, 3)[..]);
        assert_eq!(&pulled[..], &bytes(CHUNK, 1)[..]);
        // A chunk a built page opened serves pulled pages of its size too.
        assert_eq!(&a.copy_in(&bytes(4096, 4)).unwrap()[..], &bytes(4096, 4)[..]);
    }

    #[test]
    fn grown_pages_are_built_in_the_arena_while_it_has_room_then_fresh() {
        use kvcache_core::{Codec, ModelSpec, PageLayout};
        let spec = ModelSpec::preset("llama-3-8b").unwrap();
        let layout = PageLayout::new(&spec, Codec::Bf16, 64);
        let old = Bytes::from(bytes(layout.payload_bytes(5), 1));
        let rows = Bytes::from(bytes(layout.payload_bytes(1), 2));
        let a = Arena::new(CHUNK as u64, false).unwrap();
        let arena = Some(a.clone());
        let g = crate::Grown { old: old.clone(), old_tokens: 5, rows: rows.clone(), layout, pending: false, arena };
        let want = layout.concat_vec(&old, 5, &rows, 1);
        let (base, len) = a.region();
        let inside = |b: &Bytes| (base as usize..base as usize + len).contains(&(b.as_ptr() as usize));
        let mut built = Vec::new();
        loop {
            let b = g.merge();
            assert_eq!(&b[..], &want[..]);
            if !inside(&b) {
                break;
            }
            built.push(b);
            assert!(built.len() <= CHUNK / SLOT_ALIGN, "more pages than slots");
        }
        // 24 KiB pages: the chunk's 85 slots, then fresh memory.
        assert_eq!(built.len(), CHUNK / want.len().next_multiple_of(SLOT_ALIGN));
    }

    #[test]
    fn empty_and_oversized_pages_and_tiny_regions_are_refused() {
        assert!(Arena::new(CHUNK as u64 - 1, false).is_none());
        let a = Arena::new(CHUNK as u64, false).unwrap();
        assert!(a.copy_in(&[]).is_none());
        assert!(a.copy_in(&vec![0u8; CHUNK + 1]).is_none());
        assert!(a.copy_in(&vec![9u8; CHUNK]).is_some(), "one chunk-sized page fits");
    }

    #[test]
    fn concurrent_copies_and_drops_never_share_a_slot() {
        let a = Arena::new(4 * CHUNK as u64, false).unwrap();
        std::thread::scope(|s| {
            for t in 0..4u8 {
                let a = a.clone();
                s.spawn(move || {
                    let mut held = Vec::new();
                    for i in 0..400u32 {
                        let len = [4096, 18 * 1024, 72 * 1024][(i % 3) as usize];
                        let seed = t.wrapping_mul(50).wrapping_add(i as u8);
                        if let Some(b) = a.copy_in(&bytes(len, seed)) {
                            held.push((b, len, seed));
                        }
                        if held.len() > 12 {
                            let (b, len, seed) = held.remove((i as usize * 7) % held.len());
                            assert_eq!(&b[..], &bytes(len, seed)[..]);
                        }
                    }
                    for (b, len, seed) in held {
                        assert_eq!(&b[..], &bytes(len, seed)[..]);
                    }
                });
            }
        });
        assert_eq!(a.usage(), (0, 0));
    }
}
