//! Model-based test: random puts, gets, appends, deletes, clean restarts and crashes against a
//! `BTreeMap` model. A get returns exactly the model's bytes or (never here: the store is large
//! enough not to evict) a miss; a deleted page never comes back.

mod common;

use common::*;
use kvcache_core::SequenceKey;
use proptest::prelude::*;
use std::collections::BTreeMap;

#[derive(Debug, Clone)]
enum Op {
    Put { seq: u8, layer: u32, page: u32, tokens: u32, seed: u8 },
    Get { seq: u8, layer: u32, page: u32 },
    Append { seq: u8, layer: Option<u32>, tokens: u32, seed: u8 },
    Delete { seq: u8 },
    Restart,
    Crash,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..3, 0u32..3, 0u32..4, 1u32..=4, any::<u8>()).prop_map(|(seq, layer, page, tokens, seed)| Op::Put { seq, layer, page, tokens, seed }),
        4 => (0u8..3, 0u32..3, 0u32..6).prop_map(|(seq, layer, page)| Op::Get { seq, layer, page }),
        4 => (0u8..3, proptest::option::of(0u32..3), 1u32..6, any::<u8>()).prop_map(|(seq, layer, tokens, seed)| Op::Append { seq, layer, tokens, seed }),
        1 => (0u8..3).prop_map(|seq| Op::Delete { seq }),
        1 => Just(Op::Restart),
        1 => Just(Op::Crash),
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
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    #[test]
    fn store_matches_a_btreemap_through_restarts_and_crashes(ops in proptest::collection::vec(op(), 1..60)) {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(dir.path(), 2048);
        let mut model: Model = BTreeMap::new();
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
                    let got = store.append(0, &sk, layer, tokens, &body, None).unwrap();
                    let per = l.payload_bytes(tokens as usize);
                    for (i, &ly) in layers.iter().enumerate() {
                        model_append(&mut model, seq, ly, &body[i * per..(i + 1) * per], tokens);
                        prop_assert_eq!(got[i].tokens, layer_tokens(&model, seq, ly, l.token_bytes()));
                    }
                }
                Op::Delete { seq } => {
                    store.delete(0, &SequenceKey::new("test.small", format!("s{seq}"))).unwrap();
                    model.retain(|k, _| k.0 != seq);
                }
                Op::Restart => {
                    store.close().unwrap();
                    drop(store);
                    store = open(dir.path(), 2048);
                }
                Op::Crash => {
                    drop(store);
                    store = open(dir.path(), 2048);
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
