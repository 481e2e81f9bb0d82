//! Content pages in the store: dedup and conflicts, MatchPrefix (all layers, touches, pins), an
//! eviction order that takes a chain from its end, and restarts that keep every page.

mod common;

use common::*;
use kvcache_core::{ContentKey, PageKey, SequenceKey};
use kvcache_node::StoreError;
use std::time::Duration;

fn chain(seed: u32, pages: usize) -> Vec<ContentKey> {
    let tokens: Vec<u32> = (0..(pages * 4) as u32).map(|t| t * 7 + seed * 1_000_003).collect();
    ContentKey::chain_all(small_ns().prefix_seed, &tokens, 4)
}

fn ckey(k: &ContentKey, layer: u32) -> PageKey {
    PageKey { sequence: SequenceKey::content("test.small", k), layer, page_index: 0 }
}

/// Every layer of `keys`, in chain order; payload seeded by the key and layer.
fn put_chain(s: &kvcache_node::PageStore, keys: &[ContentKey]) -> Result<(u64, u64), StoreError> {
    let pages = keys
        .iter()
        .flat_map(|k| (0..3).map(move |l| page(&ckey(k, l), 4, payload(&small_ns(), 4, k.0[0] ^ l as u8))))
        .collect();
    put_wire(s, pages)
}

fn present(s: &kvcache_node::PageStore, keys: &[ContentKey]) -> Vec<bool> {
    s.match_prefix("test.small", keys, None).unwrap()
}

/// Which keys are held, without touching them (a match would make them most recent).
fn held(s: &kvcache_node::PageStore, keys: &[ContentKey]) -> Vec<bool> {
    keys.iter()
        .map(|k| {
            let (exists, layers, _) = s.lookup(&SequenceKey::content("test.small", k), &[], None).unwrap();
            exists && layers.len() == 3 && layers.iter().all(|l| l.pages == 1)
        })
        .collect()
}

#[test]
fn a_second_put_of_a_key_is_a_counted_no_op_and_other_bytes_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), 64);
    let keys = chain(1, 3);
    assert_eq!(put_chain(&s, &keys).unwrap().0, 9);
    let used = s.stats().used_bytes;
    let pages: Vec<_> = keys
        .iter()
        .flat_map(|k| (0..3).map(move |l| page(&ckey(k, l), 4, payload(&small_ns(), 4, k.0[0] ^ l as u8))))
        .map(|p| valid(&s, p))
        .collect();
    let out = s.put_pages(pages, kvcache_node::PutMode::Write).unwrap();
    assert_eq!((out.written, out.deduplicated), (0, 9));
    assert_eq!(s.stats().used_bytes, used, "nothing written");

    // Same length, other bytes (and a CRC that differs): refused, the held page stays.
    let mut other = payload(&small_ns(), 4, 200);
    other[0] ^= 1;
    let e = put_wire(&s, vec![page(&ckey(&keys[1], 2), 4, other)]).unwrap_err();
    assert!(matches!(e, StoreError::ContentConflict { layer: 2, .. }), "{e:?}");
    let held = s.get(&ckey(&keys[1], 2)).unwrap().unwrap();
    assert_eq!(&held.payload[..], &payload(&small_ns(), 4, keys[1].0[0] ^ 2)[..]);
    let u = s.stats().namespaces.into_iter().find(|u| u.name == "test.small").unwrap();
    assert_eq!((u.content_keys, u.dedup_hits, u.conflicts), (3, 9, 1));
}

#[test]
fn a_match_counts_only_keys_with_every_layer() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), 64);
    let keys = chain(2, 4);
    put_chain(&s, &keys[..2]).unwrap();
    // Key 2 with two of its three layers, key 3 whole.
    put_wire(&s, (0..2).map(|l| page(&ckey(&keys[2], l), 4, payload(&small_ns(), 4, 1))).collect()).unwrap();
    put_chain(&s, &keys[3..]).unwrap();
    assert_eq!(present(&s, &keys), [true, true, false, true]);
    let u = s.stats().namespaces.into_iter().find(|u| u.name == "test.small").unwrap();
    assert_eq!((u.match_hits, u.match_misses), (3, 1));
    assert!(matches!(s.match_prefix("nope", &keys, None), Err(StoreError::UnknownNamespace(_))));
}

#[test]
fn eviction_takes_a_chain_from_its_end_and_spares_pinned_keys() {
    let dir = tempfile::tempdir().unwrap();
    // 24 slots: two chains of 4 keys × 3 layers fill them.
    let s = open(dir.path(), 24);
    let a = chain(3, 4);
    let b = chain(4, 4);
    put_chain(&s, &a).unwrap();
    put_chain(&s, &b).unwrap();
    // A match of a's first two keys makes them the most recent; then new pages need 6 slots
    // (two keys): a's end goes, not its matched head and not b, put after a.
    assert_eq!(present(&s, &a[..2]), [true, true]);
    put_chain(&s, &chain(5, 2)).unwrap();
    assert_eq!(held(&s, &a), [true, true, false, false], "a evicted from its end");
    assert_eq!(held(&s, &b), [true, true, true, true]);
    // b was put in chain order and is now the least recently used: its last key goes first.
    put_chain(&s, &chain(6, 1)).unwrap();
    assert_eq!(held(&s, &b), [true, true, true, false], "b evicted from its end");

    // A key pinned by a match with a lease survives what would evict it.
    assert_eq!(s.match_prefix("test.small", &b[2..3], Some(Duration::from_secs(60))).unwrap(), [true]);
    // Seven new keys fill every other slot: everything else goes, the pinned key stays.
    for seed in 10..17 {
        put_chain(&s, &chain(seed, 1)).unwrap();
    }
    assert!(held(&s, &b[2..3])[0], "the leased key was evicted");
    assert_eq!(held(&s, &a[..2]), [false, false]);
}

#[test]
fn content_pages_survive_a_restart_and_still_deduplicate() {
    let dir = tempfile::tempdir().unwrap();
    let keys = chain(7, 3);
    {
        let s = open(dir.path(), 64);
        put_chain(&s, &keys).unwrap();
        s.close().unwrap();
    }
    let s = open(dir.path(), 64);
    assert_eq!(present(&s, &keys), [true, true, true]);
    let pages: Vec<_> = keys
        .iter()
        .flat_map(|k| (0..3).map(move |l| page(&ckey(k, l), 4, payload(&small_ns(), 4, k.0[0] ^ l as u8))))
        .map(|p| valid(&s, p))
        .collect();
    assert_eq!(s.put_pages(pages, kvcache_node::PutMode::Write).unwrap().deduplicated, 9);
}

#[test]
fn a_sequence_over_a_prefix_keeps_it_across_restarts_and_until_it_goes() {
    let dir = tempfile::tempdir().unwrap();
    let keys = chain(8, 3);
    let seq = SequenceKey::new("test.small", "req");
    {
        let s = open(dir.path(), 64);
        assert!(s.create_sequence(&seq, &keys, false).unwrap());
        assert!(!s.create_sequence(&seq, &keys, false).unwrap(), "idempotent");
        assert!(matches!(s.create_sequence(&seq, &keys[..1], false), Err(StoreError::SequenceExists(_))));
        // Appends land after the prefix: 12 prefix tokens, then 2 of its own (page index 3).
        append(&s, &seq, Some(1), 2, &payload(&small_ns(), 2, 5), Some(12)).unwrap();
        // Its own pages may not overlap the prefix.
        let e = put_wire(
            &s,
            vec![page(&PageKey { sequence: seq.clone(), layer: 0, page_index: 1 }, 4, payload(&small_ns(), 4, 1))],
        );
        assert!(matches!(e, Err(StoreError::Invalid(_))), "{e:?}");
        // Sealing the open page (2 of 4 tokens, on one layer) is refused and changes nothing.
        let more: Vec<_> = keys.iter().chain(&chain(9, 1)).copied().collect();
        assert!(matches!(s.create_sequence(&seq, &more, true), Err(StoreError::Invalid(_))));
        assert_eq!(s.prefix_of(&seq).as_deref(), Some(&keys[..]));
        s.close().unwrap();
    }
    let s = open(dir.path(), 64);
    assert_eq!(s.prefix_of(&seq).as_deref(), Some(&keys[..]));
    let (exists, layers, _) = s.lookup(&seq, &[], None).unwrap();
    assert!(exists);
    assert_eq!(layers.iter().map(|l| (l.tokens, l.prefix_pages)).collect::<Vec<_>>(), [(12, 3), (14, 3), (12, 3)]);
    assert_eq!(layers[1].write_seqs.len(), 4);
    assert_eq!(s.get(&PageKey { sequence: seq.clone(), layer: 1, page_index: 3 }).unwrap().unwrap().token_count, 2);
    // Deleted, it is gone for good (its chain file too).
    s.delete(&seq).unwrap();
    s.close().unwrap();
    drop(s);
    let s = open(dir.path(), 64);
    assert_eq!(s.prefix_of(&seq), None);
    assert_eq!(std::fs::read_dir(dir.path().join("chains")).unwrap().count(), 0);
}
