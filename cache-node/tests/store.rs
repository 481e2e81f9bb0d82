//! Page store behaviour: eviction, leases, capacity, readers vs slot reuse, recovery,
//! corruption, and a model-based test against a BTreeMap with restart and crash steps.

mod common;

use common::*;
use kvcache_core::SequenceKey;
use kvcache_node::{PutMode, StoreError};
use std::time::Duration;

#[test]
fn put_then_get_returns_the_same_bytes_and_overwrite_keeps_the_newest() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), 8);
    let k = key("a", 1, 0);
    let v1 = put(&s, &k, 4, 1);
    assert_eq!(get(&s, &k), Some(v1));
    let v2 = put(&s, &k, 2, 2);
    assert_eq!(get(&s, &k), Some(v2));
    assert_eq!(get(&s, &key("a", 1, 1)), None);
    assert_eq!(s.stats().pages, 1);
}

#[test]
fn full_node_evicts_the_least_recently_used_sequence() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), 4);
    for name in ["s0", "s1", "s2", "s3"] {
        put(&s, &key(name, 0, 0), 4, 0);
    }
    // Touch s0 so s1 is the oldest.
    assert!(get(&s, &key("s0", 0, 0)).is_some());
    put(&s, &key("s4", 0, 0), 4, 0);
    assert!(get(&s, &key("s1", 0, 0)).is_none(), "s1 was the LRU sequence");
    for name in ["s0", "s2", "s3", "s4"] {
        assert!(get(&s, &key(name, 0, 0)).is_some(), "{name} evicted");
    }
    let st = s.stats();
    assert_eq!(st.evictions, 1);
    assert!(st.pool_bytes <= st.capacity_bytes);
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 32, ..Default::default() })]
    /// Against a reference recency list: after random reads of a full store, each new sequence
    /// evicts exactly the least recently used one, and a leased one is never chosen.
    #[test]
    fn evictions_follow_exact_lru_order_and_skip_leased_sequences(
        touches in proptest::collection::vec(0usize..8, 0..40),
        leased in proptest::option::of(0usize..8),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path(), 8);
        let name = |i: usize| format!("s{i}");
        let mut order: Vec<String> = Vec::new(); // least recently used first
        let use_ = |order: &mut Vec<String>, n: String| {
            order.retain(|x| *x != n);
            order.push(n);
        };
        for i in 0..8 {
            put(&s, &key(&name(i), 0, 0), 4, i as u8);
            use_(&mut order, name(i));
        }
        for t in touches {
            proptest::prop_assert!(get(&s, &key(&name(t), 0, 0)).is_some());
            use_(&mut order, name(t));
        }
        if let Some(l) = leased {
            s.lease(&kvcache_core::SequenceKey::new("test.small", name(l)), std::time::Duration::from_secs(60)).unwrap();
        }
        for j in 0..4 {
            let fresh = format!("new{j}");
            put(&s, &key(&fresh, 0, 0), 4, 1);
            let victim = order.iter().position(|n| leased.is_none_or(|l| *n != name(l))).unwrap();
            let gone = order.remove(victim);
            proptest::prop_assert!(get(&s, &key(&gone, 0, 0)).is_none(), "{} should have been evicted", gone);
            order.push(fresh);
            for n in &order {
                proptest::prop_assert!(get(&s, &key(n, 0, 0)).is_some(), "{} was evicted", n);
            }
            // Those checks were reads: the order is as it was, every resident read once in order.
            let resident = order.clone();
            for n in resident {
                use_(&mut order, n);
            }
        }
    }
}

#[test]
fn leased_sequences_are_not_evicted_and_all_pinned_is_resource_exhausted() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), 2);
    put(&s, &key("a", 0, 0), 4, 0);
    put(&s, &key("b", 0, 0), 4, 0);
    let (la, _) = s.lease(&SequenceKey::new("test.small", "a"), Duration::from_secs(60)).unwrap();
    s.lease(&SequenceKey::new("test.small", "b"), Duration::from_secs(60)).unwrap();
    let err =
        put_wire(&s, vec![page(&key("c", 0, 0), 4, payload(&small_ns(), 4, 0))]).expect_err("everything is pinned");
    assert!(matches!(err, StoreError::Full(_)), "{err}");
    assert!(get(&s, &key("a", 0, 0)).is_some() && get(&s, &key("b", 0, 0)).is_some());
    // Releasing a's lease makes it the one to go.
    assert!(s.release(la));
    assert!(!s.release(la));
    put(&s, &key("c", 0, 0), 4, 0);
    assert!(get(&s, &key("a", 0, 0)).is_none());
    assert!(get(&s, &key("b", 0, 0)).is_some());
}

#[test]
fn expired_leases_no_longer_pin() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), 1);
    put(&s, &key("a", 0, 0), 4, 0);
    s.lease(&SequenceKey::new("test.small", "a"), Duration::from_millis(20)).unwrap();
    std::thread::sleep(Duration::from_millis(60));
    put(&s, &key("b", 0, 0), 4, 0);
    assert!(get(&s, &key("a", 0, 0)).is_none());
    assert_eq!(s.stats().active_leases, 0);
}

#[test]
fn a_slot_is_not_reused_while_a_reader_holds_its_page() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), 2);
    let v = put(&s, &key("a", 0, 0), 4, 7);
    let held = s.get(&key("a", 0, 0)).unwrap().unwrap().payload;
    s.delete(&SequenceKey::new("test.small", "a")).unwrap();
    // Fill the node: the held slot must not be handed out.
    put(&s, &key("b", 0, 0), 4, 9);
    let err = put_wire(&s, vec![page(&key("b", 0, 1), 4, payload(&small_ns(), 4, 9))]);
    assert!(err.is_err(), "the held slot was reused");
    assert_eq!(&held[..], &v[..]);
    drop(held);
    put(&s, &key("b", 0, 1), 4, 9);
}

#[test]
fn a_handoff_copy_never_replaces_a_page_with_as_many_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), 8);
    let ns = small_ns();
    let k = key("h", 1, 0);
    let newer = put(&s, &k, 3, 1);
    let copy = |tokens: u32, seed: u8| page(&k, tokens, payload(&ns, tokens, seed));
    // Fewer or as many tokens: the held page stays, nothing is counted as written.
    assert_eq!(put_wire_with(&s, vec![copy(2, 7)], PutMode::Handoff).unwrap(), (0, 0));
    assert_eq!(put_wire_with(&s, vec![copy(3, 8)], PutMode::Handoff).unwrap(), (0, 0));
    assert_eq!(get(&s, &k), Some(newer));
    // More tokens, or a page not held: stored.
    let longer = payload(&ns, 4, 9);
    assert_eq!(put_wire_with(&s, vec![page(&k, 4, longer.clone())], PutMode::Handoff).unwrap().0, 1);
    assert_eq!(get(&s, &k), Some(longer));
    let k2 = key("h", 1, 1);
    assert_eq!(put_wire_with(&s, vec![page(&k2, 1, payload(&ns, 1, 3))], PutMode::Handoff).unwrap().0, 1);
    let st = s.stats();
    assert_eq!((st.pages, st.sequences), (2, 1), "skipped copies are not counted");
    // An ordinary put still overwrites.
    let shorter = put(&s, &k, 2, 4);
    assert_eq!(get(&s, &k), Some(shorter));
}

fn tokens(v: Vec<kvcache_node::store::Appended>) -> Vec<u64> {
    v.iter().map(|a| a.tokens).collect()
}

#[test]
fn append_fills_the_partial_page_then_starts_new_ones() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), 64);
    let ns = small_ns();
    let l = ns.layout();
    let seq = SequenceKey::new("test.small", "a");
    let first = payload(&ns, 3, 1);
    assert_eq!(tokens(append(&s, &seq, Some(2), 3, &first, Some(0)).unwrap()), vec![3]);
    let more = payload(&ns, 6, 2);
    assert_eq!(tokens(append(&s, &seq, Some(2), 6, &more, None).unwrap()), vec![9]);
    // A retried append at a stale position is refused.
    assert!(matches!(append(&s, &seq, Some(2), 6, &more, Some(3)), Err(StoreError::Position { actual: 9, .. })));
    let mut all = vec![0u8; l.payload_bytes(9)];
    l.concat(&first, 3, &more, 6, &mut all);
    for (pi, (start, n)) in [(0usize, 4usize), (4, 4), (8, 1)].into_iter().enumerate() {
        let mut want = vec![0u8; l.payload_bytes(n)];
        l.slice_tokens(&all, 9, start, n, &mut want);
        assert_eq!(get(&s, &key("a", 2, pi as u32)).unwrap(), want, "page {pi}");
    }
    // All layers at once.
    // One token for each of the 3 layers.
    let every = payload(&ns, 3, 5);
    assert_eq!(tokens(append(&s, &seq, None, 1, &every, None).unwrap()), vec![1, 1, 10]);
    assert!(matches!(append(&s, &seq, Some(3), 1, &every[..32], None), Err(StoreError::Invalid(_))));
}

#[test]
fn clean_and_unclean_restarts_keep_every_page() {
    for clean in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path(), 32);
        let mut want = Vec::new();
        for i in 0..10u32 {
            let k = key(&format!("s{}", i % 3), i % 3, i);
            want.push((k.clone(), put(&s, &k, 1 + i % 4, i as u8)));
        }
        // An overwrite: the newest write must win after restart.
        let k0 = want[0].0.clone();
        want[0].1 = put(&s, &k0, 2, 99);
        if clean {
            s.close().unwrap();
        }
        drop(s);
        let s = open(dir.path(), 32);
        for (k, v) in &want {
            assert_eq!(get(&s, k).as_ref(), Some(v), "{k:?} clean={clean}");
        }
        assert_eq!(s.stats().pages, 10);
        // New writes do not collide with recovered slots.
        let k = key("new", 0, 0);
        let v = put(&s, &k, 4, 3);
        assert_eq!(get(&s, &k), Some(v));
        for (k, v) in &want {
            assert_eq!(get(&s, k).as_ref(), Some(v));
        }
    }
}

#[test]
fn deleted_pages_do_not_come_back_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), 8);
    put(&s, &key("a", 0, 0), 4, 1);
    put(&s, &key("b", 0, 0), 4, 2);
    assert_eq!(s.delete(&SequenceKey::new("test.small", "a")).unwrap(), 1);
    drop(s);
    let s = open(dir.path(), 8);
    assert!(get(&s, &key("a", 0, 0)).is_none());
    assert!(get(&s, &key("b", 0, 0)).is_some());
}

/// The pool file and offset of the slot holding `seq`'s page (found by its header).
fn locate(dir: &std::path::Path, seq: &str) -> (std::path::PathBuf, usize) {
    for e in std::fs::read_dir(dir).unwrap() {
        let path = e.unwrap().path();
        if path.extension().is_none_or(|e| e != "pool") {
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        for (i, slot) in bytes.chunks(SLOT as usize).enumerate() {
            if let Ok(h) = kvcache_core::PageHeader::decode(slot)
                && h.sequence_id == seq
            {
                return (path, i * SLOT as usize);
            }
        }
    }
    panic!("page of {seq} not found");
}

#[test]
fn torn_last_page_is_a_miss_at_every_cut_and_the_others_survive() {
    let ns = small_ns();
    let page_len = 128 + ns.layout().payload_bytes(4);
    for cut in 0..page_len {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path(), 4);
        let a = put(&s, &key("a", 0, 0), 4, 1);
        let b = put(&s, &key("b", 0, 0), 4, 2);
        drop(s);
        // Tear page b: keep `cut` bytes, the rest of the page is what the disk had before
        // (zeros) or garbage.
        let (path, base) = locate(dir.path(), "b");
        let mut bytes = std::fs::read(&path).unwrap();
        let before = bytes[base..base + page_len].to_vec();
        for (i, b) in bytes[base + cut..base + page_len].iter_mut().enumerate() {
            *b = if cut % 2 == 0 { 0 } else { (i as u8).wrapping_mul(13) };
        }
        let changed = before != bytes[base..base + page_len];
        std::fs::write(&path, &bytes).unwrap();
        let s = open(dir.path(), 4);
        assert_eq!(get(&s, &key("a", 0, 0)), Some(a.clone()), "cut {cut}");
        let got = get(&s, &key("b", 0, 0));
        if changed {
            assert!(got.is_none(), "cut {cut}: a torn page was served");
        } else {
            assert_eq!(got, Some(b), "cut {cut}: an intact page was lost");
        }
    }
}

#[test]
fn a_truncated_pool_file_loses_only_the_cut_page() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), 4);
    let a = put(&s, &key("a", 0, 0), 4, 1);
    put(&s, &key("b", 0, 0), 4, 2);
    drop(s);
    let (path, base) = locate(dir.path(), "b");
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(base as u64 + 200).unwrap();
    drop(f);
    let s = open(dir.path(), 4);
    assert_eq!(get(&s, &key("a", 0, 0)), Some(a));
    assert!(get(&s, &key("b", 0, 0)).is_none());
}

#[test]
fn flipped_bits_are_misses_after_clean_and_unclean_restarts() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(kvcache_core::testing::test_seed());
    for clean in [false, true] {
        for _ in 0..20 {
            let dir = tempfile::tempdir().unwrap();
            let s = open(dir.path(), 8);
            let mut vals = Vec::new();
            for i in 0..4u32 {
                vals.push(put(&s, &key(&format!("s{i}"), 0, 0), 4, i as u8));
            }
            if clean {
                s.close().unwrap();
            }
            drop(s);
            let victim = rng.random_range(0..4usize);
            let (path, base) = locate(dir.path(), &format!("s{victim}"));
            let mut bytes = std::fs::read(&path).unwrap();
            let bit = rng.random_range(0..(128 + 128) * 8);
            bytes[base + bit / 8] ^= 1 << (bit % 8);
            std::fs::write(&path, &bytes).unwrap();
            let s = open(dir.path(), 8);
            for (i, v) in vals.iter().enumerate() {
                let got = get(&s, &key(&format!("s{i}"), 0, 0));
                if i == victim {
                    assert!(got.is_none(), "flipped bit {bit} of page {i} served (clean={clean})");
                } else {
                    assert_eq!(got.as_ref(), Some(v));
                }
            }
        }
    }
}

#[test]
fn a_failed_flush_turns_the_file_s_pages_into_misses() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), 4);
    put(&s, &key("a", 0, 0), 4, 1);
    s.inject_flush_failure();
    assert!(!s.flush().is_empty());
    assert!(get(&s, &key("a", 0, 0)).is_none());
    assert_eq!(s.stats().pool_files_failed, 1);
}

#[test]
fn a_failed_write_is_an_error_and_never_a_half_page() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), 64);
    // Past half the capacity, so the failing write shares a file with stored pages (below it,
    // a new file may be opened just to spread writers).
    let a: Vec<_> = (0..40u32).map(|i| put(&s, &key("a", 0, i), 4, i as u8)).collect();
    s.inject_write_failure();
    let p = page(&key("b", 0, 0), 4, payload(&small_ns(), 4, 2));
    assert!(matches!(put_wire(&s, vec![p.clone()]), Err(StoreError::Io(_))));
    // The file is out of service: its pages are misses, the failed page never appears, and
    // every page of the other files reads back.
    let mut lost = 0;
    for (i, v) in a.iter().enumerate() {
        match get(&s, &key("a", 0, i as u32)) {
            None => lost += 1,
            Some(got) => assert_eq!(&got, v),
        }
    }
    assert!((1..40).contains(&lost), "{lost} of 40 pages lost with one failed file");
    assert!(get(&s, &key("b", 0, 0)).is_none());
    assert_eq!(s.stats().pool_files_failed, 1);
    // A retry lands in a new pool file and reads back.
    put_wire(&s, vec![p]).unwrap();
    assert!(get(&s, &key("b", 0, 0)).is_some());
}

#[test]
fn index_memory_is_under_128_bytes_per_page() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), 3100);
    // 100 sequences × 3 layers × 10 pages.
    for q in 0..100 {
        let ns = small_ns();
        let body = payload(&ns, 4, 1);
        let pages: Vec<_> = (0..3)
            .flat_map(|l| (0..10).map(move |p| (l, p)))
            .map(|(l, p)| page(&key(&format!("seq-{q:04}"), l, p), 4, body.clone()))
            .collect();
        put_wire(&s, pages).unwrap();
    }
    let st = s.stats();
    assert_eq!(st.pages, 3000);
    let per = st.index_bytes as f64 / st.pages as f64;
    assert!(per <= 128.0, "{per} index bytes per page");
}

#[test]
fn stale_epochs_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), 4);
    s.advance_epoch(5);
    assert!(matches!(s.check_epoch(4), Err(StoreError::StaleEpoch { got: 4, current: 5 })));
    s.advance_epoch(3);
    assert_eq!(s.epoch(), 5, "epochs never go backwards");
    s.check_epoch(5).unwrap();
    s.check_epoch(6).unwrap();
}

#[test]
fn stats_and_deletes_running_together_never_deadlock() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), 512);
    for i in 0..200 {
        put(&s, &key(&format!("s{i}"), 0, 0), 4, 1);
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let s2 = s.clone();
    let stats = std::thread::spawn(move || {
        for _ in 0..200 {
            let _ = s2.stats();
        }
    });
    let s3 = s.clone();
    std::thread::spawn(move || {
        for i in 0..200 {
            s3.delete(&SequenceKey::new("test.small", format!("s{i}"))).unwrap();
        }
        stats.join().unwrap();
        tx.send(()).unwrap();
    });
    rx.recv_timeout(Duration::from_secs(60)).expect("stats() and delete() deadlocked");
    assert_eq!(s.stats().pages, 0);
}

#[test]
fn concurrent_writers_are_spread_over_several_pool_files() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), 4096);
    std::thread::scope(|sc| {
        for t in 0..8u8 {
            let s = s.clone();
            sc.spawn(move || {
                for i in 0..16u32 {
                    put(&s, &key(&format!("w{t}"), 0, i), 4, t);
                }
            });
        }
    });
    let files = std::fs::read_dir(dir.path())
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with("pool-"))
        .count();
    // 128 pages fit in one file of this size; a buffered write locks its file, so the writers
    // get files of their own.
    assert!(files >= 2, "128 pages from 8 threads went to {files} pool file(s)");
    for t in 0..8u8 {
        for i in 0..16u32 {
            assert_eq!(get(&s, &key(&format!("w{t}"), 0, i)), Some(payload(&small_ns(), 4, t)));
        }
    }
}

#[test]
fn the_writeback_backlog_counts_page_bytes_until_a_flush_covers_them() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = kvcache_node::StoreConfig::new(dir.path(), 16 * SLOT);
    cfg.segment_bytes = 16 * SLOT;
    cfg.flush_interval = Duration::from_secs(3600); // no background flush during the test
    let s = kvcache_node::PageStore::open(cfg).unwrap();
    s.ensure_namespace(small_ns()).unwrap();
    assert_eq!(s.writeback_backlog(), 0);
    let a = put(&s, &key("a", 0, 0), 4, 1);
    let b = put(&s, &key("a", 0, 1), 2, 2);
    assert_eq!(s.writeback_backlog(), (a.len() + b.len()) as u64);
    assert!(s.flush().is_empty());
    assert_eq!(s.writeback_backlog(), 0);
    let c = put(&s, &key("b", 0, 0), 3, 3);
    assert_eq!(s.writeback_backlog(), c.len() as u64);
}
