//! Model-based test: random puts, gets, appends, deletes, flushes, clean restarts and power
//! losses against a `BTreeMap` model. A get returns exactly the model's bytes or (never here: the
//! store is large enough not to evict) a miss; a deleted page never comes back after a clean
//! restart.
//!
//! A power loss ([`kvcache_node::powerloss`]) loses every write not covered by a completed flush
//! and tears the last one at a 4 KiB sector boundary. What async durability promises, and what
//! is checked after each: the store comes back exactly as it was at its last completed flush
//! (or clean shutdown) — every page present then is present with the same bytes, nothing
//! written later is there — except that the one write in flight may have reached the disk: then
//! one page retired (deleted, or replaced) after the flush may be gone, or one page written after
//! it may be there whole (its header landed on a slot already holding exactly its payload, as
//! when a deleted sequence is written again with the same bytes). Never wrong bytes.

mod common;

use common::*;
use kvcache_core::SequenceKey;
use kvcache_node::powerloss::PowerLoss;
use kvcache_node::{Durability, PageStore};
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::sync::Arc;

#[derive(Debug, Clone)]
enum Op {
    Put {
        seq: u8,
        layer: u32,
        page: u32,
        tokens: u32,
        seed: u8,
    },
    Get {
        seq: u8,
        layer: u32,
        page: u32,
    },
    Append {
        seq: u8,
        layer: Option<u32>,
        tokens: u32,
        seed: u8,
    },
    Delete {
        seq: u8,
    },
    Flush,
    Restart,
    /// Power loss; `tear` picks how many sectors of the write in flight reached the disk.
    Crash {
        tear: u8,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..3, 0u32..3, 0u32..4, 1u32..=4, any::<u8>()).prop_map(|(seq, layer, page, tokens, seed)| Op::Put { seq, layer, page, tokens, seed }),
        4 => (0u8..3, 0u32..3, 0u32..6).prop_map(|(seq, layer, page)| Op::Get { seq, layer, page }),
        4 => (0u8..3, proptest::option::of(0u32..3), 1u32..6, any::<u8>()).prop_map(|(seq, layer, tokens, seed)| Op::Append { seq, layer, tokens, seed }),
        1 => (0u8..3).prop_map(|seq| Op::Delete { seq }),
        1 => Just(Op::Flush),
        1 => Just(Op::Restart),
        2 => any::<u8>().prop_map(|tear| Op::Crash { tear }),
    ]
}

type Model = BTreeMap<(u8, u32, u32), Vec<u8>>;

fn layer_tokens(m: &Model, seq: u8, layer: u32, tb: usize) -> u64 {
    m.range((seq, layer, 0)..=(seq, layer, u32::MAX))
        .next_back()
        .map_or(0, |(&(_, _, p), v)| p as u64 * 4 + (v.len() / tb) as u64)
}

fn model_append(m: &mut Model, seq: u8, layer: u32, new: &[u8], tokens: u32) {
    let l = small_ns().layout();
    let tb = l.token_bytes();
    let mut pos = layer_tokens(m, seq, layer, tb);
    let mut done = 0;
    while done < tokens {
        let page = (pos / 4) as u32;
        let in_page = (pos % 4) as u32;
        let take = (4 - in_page).min(tokens - done);
        let mut chunk = vec![0u8; l.payload_bytes(take as usize)];
        l.slice_tokens(new, tokens as usize, done as usize, take as usize, &mut chunk);
        let body = if in_page > 0 {
            let old = &m[&(seq, layer, page)];
            let mut out = vec![0u8; l.payload_bytes((in_page + take) as usize)];
            l.concat(old, in_page as usize, &chunk, take as usize, &mut out);
            out
        } else {
            chunk
        };
        m.insert((seq, layer, page), body);
        done += take;
        pos += take as u64;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
    #[test]
    fn store_matches_a_btreemap_through_restarts_and_power_losses(ops in proptest::collection::vec(op(), 1..60)) {
        let dir = tempfile::tempdir().unwrap();
        let power = Arc::new(PowerLoss::new());
        let reopen = || open_watched(dir.path(), 2048, Durability::Async, &power);
        let mut store = reopen();
        let mut model: Model = BTreeMap::new();
        // The model as of the last completed flush or clean shutdown: what a power loss leaves.
        let mut durable: Model = BTreeMap::new();
        let ns = small_ns();
        let l = ns.layout();
        for op in ops {
            match op {
                Op::Put { seq, layer, page, tokens, seed } => {
                    let v = put(&store, &key(&format!("s{seq}"), layer, page), tokens, seed);
                    model.insert((seq, layer, page), v);
                }
                Op::Get { seq, layer, page } => {
                    let got = get(&store, &key(&format!("s{seq}"), layer, page));
                    prop_assert_eq!(got.as_ref(), model.get(&(seq, layer, page)));
                }
                Op::Append { seq, layer, tokens, seed } => {
                    let layers: Vec<u32> = layer.map_or((0..3).collect(), |l| vec![l]);
                    let body = payload(&ns, tokens * layers.len() as u32, seed);
                    let sk = SequenceKey::new("test.small", format!("s{seq}"));
                    let got = append(&store, &sk, layer, tokens, &body, None).unwrap();
                    let per = l.payload_bytes(tokens as usize);
                    for (i, &ly) in layers.iter().enumerate() {
                        model_append(&mut model, seq, ly, &body[i * per..(i + 1) * per], tokens);
                        prop_assert_eq!(got[i].tokens, layer_tokens(&model, seq, ly, l.token_bytes()));
                    }
                }
                Op::Delete { seq } => {
                    store.delete(&SequenceKey::new("test.small", format!("s{seq}"))).unwrap();
                    model.retain(|k, _| k.0 != seq);
                }
                Op::Flush => {
                    prop_assert!(store.flush().is_empty());
                    prop_assert_eq!(power.unflushed_writes(), 0);
                    durable = model.clone();
                }
                Op::Restart => {
                    store.close().unwrap();
                    drop(store);
                    store = reopen();
                    durable = model.clone();
                }
                Op::Crash { tear } => {
                    drop(store);
                    let report = power.crash(|sectors| tear as usize % (sectors + 1)).unwrap();
                    store = reopen();
                    // Exactly the durable state, but for the one write in flight, which may have
                    // reached the disk: a page retired after the flush gone, or a header landing
                    // on a payload already there completing a page written after it.
                    let mut missing = Vec::new();
                    for (k, v) in &durable {
                        let got = get(&store, &key(&format!("s{}", k.0), k.1, k.2));
                        match got {
                            Some(g) => prop_assert_eq!(&g, v, "{:?} came back with other bytes", k),
                            None => missing.push(*k),
                        }
                    }
                    let mut extra = Vec::new();
                    for k in model.keys().filter(|k| !durable.contains_key(k)) {
                        if let Some(g) = get(&store, &key(&format!("s{}", k.0), k.1, k.2)) {
                            prop_assert_eq!(&g, &model[k], "{:?} came back with bytes never written", k);
                            extra.push(*k);
                        }
                    }
                    let landed = report.torn.is_some_and(|t| t.1 > 0);
                    prop_assert!(
                        missing.len() + extra.len() == 0 || (missing.len() + extra.len() == 1 && landed),
                        "lost {:?}, gained {:?} after {:?}", missing, extra, report
                    );
                    prop_assert_eq!(store.stats().pages, (durable.len() - missing.len() + extra.len()) as u64, "pages written after the last flush came back");
                    model = durable.clone();
                    // A sequence with a page gone or gained may have a hole: drop it whole, in
                    // both, durably.
                    if !missing.is_empty() || !extra.is_empty() {
                        for (seq, _, _) in missing.into_iter().chain(extra) {
                            store.delete(&SequenceKey::new("test.small", format!("s{seq}"))).unwrap();
                            model.retain(|k, _| k.0 != seq);
                        }
                        prop_assert!(store.flush().is_empty());
                        durable = model.clone();
                    }
                }
            }
        }
        for seq in 0..3u8 {
            for layer in 0..3 {
                for page in 0..80 {
                    let got = get(&store, &key(&format!("s{seq}"), layer, page));
                    prop_assert_eq!(got.as_ref(), model.get(&(seq, layer, page)), "s{} l{} p{}", seq, layer, page);
                }
            }
        }
        prop_assert_eq!(store.stats().pages, model.len() as u64);
    }
}

/// Under `sync` every acknowledged write was flushed: a power loss keeps every acknowledged page
/// byte for byte; and a delete, once acknowledged, stays done whichever way the write in flight
/// tears.
#[test]
fn a_power_loss_never_loses_a_page_acknowledged_under_sync() {
    for tear in 0..3usize {
        let dir = tempfile::tempdir().unwrap();
        let power = Arc::new(PowerLoss::new());
        let mut store = open_watched(dir.path(), 256, Durability::Sync, &power);
        let mut model: Model = BTreeMap::new();
        let check = |store: &PageStore, model: &Model, report: &kvcache_node::powerloss::CrashReport| {
            for ((seq, layer, page), v) in model {
                let got = get(store, &key(&format!("s{seq}"), *layer, *page));
                assert_eq!(got.as_ref(), Some(v), "s{seq} l{layer} p{page} lost after {report:?}");
            }
            assert_eq!(store.stats().pages, model.len() as u64);
        };
        for round in 0..2u32 {
            for i in 0..45u32 {
                let (seq, layer, page) = ((i % 3) as u8, i % 2, i / 6);
                let v = put(&store, &key(&format!("s{seq}"), layer, page), 1 + (i + round) % 4, (i + round) as u8);
                model.insert((seq, layer, page), v);
            }
            drop(store);
            let report = power.crash(|sectors| tear.min(sectors)).unwrap();
            store = open_watched(dir.path(), 256, Durability::Sync, &power);
            check(&store, &model, &report);
        }
        store.delete(&SequenceKey::new("test.small", "s2")).unwrap();
        model.retain(|k, _| k.0 != 2);
        drop(store);
        let report = power.crash(|sectors| tear.min(sectors)).unwrap();
        let store = open_watched(dir.path(), 256, Durability::Sync, &power);
        check(&store, &model, &report);
    }
}
