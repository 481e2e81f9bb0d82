//! Storage by layer kind: sliding-window and chunked layers keep only the pages their attention
//! can still read, through appends, puts and a restart; full layers keep every page.

mod common;

use common::*;
use kvcache_core::spec::LayerKind;
use kvcache_core::{Namespace, PageKey, SequenceKey};

/// Layer 0 slides over 6 tokens, layer 1 attends within chunks of 8, layer 2 is full; 4 tokens
/// per page.
fn windowed() -> Namespace {
    let mut ns = small_ns();
    ns.name = "test.window".into();
    ns.model.layers = vec![LayerKind::Sliding { window: 6 }, LayerKind::Chunked { chunk: 8 }, LayerKind::Full];
    ns
}

fn wkey(seq: &str, layer: u32, page: u32) -> PageKey {
    PageKey { sequence: SequenceKey::new("test.window", seq), layer, page_index: page }
}

/// Which pages of `layer` the store holds for `seq`, by index.
fn held(s: &kvcache_node::PageStore, seq: &str, layer: u32) -> Vec<u32> {
    let (_, ext, _) = s.lookup(&SequenceKey::new("test.window", seq), &[], Some(layer)).unwrap();
    ext.first().map_or(Vec::new(), |e| {
        e.write_seqs.iter().enumerate().filter(|(_, w)| **w != 0).map(|(i, _)| i as u32).collect()
    })
}

/// The pages a layer of `kind` must hold at `n` tokens of 4-token pages.
fn live(kind: LayerKind, n: u64) -> Vec<u32> {
    if n == 0 {
        return Vec::new();
    }
    (kind.first_live_page(n, 4)..=((n - 1) / 4) as u32).collect()
}

#[test]
fn windowed_layers_release_pages_as_the_sequence_advances_and_stay_released_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), 64);
    let ns = windowed();
    s.ensure_namespace(ns.clone()).unwrap();
    let seq = SequenceKey::new("test.window", "s");
    let mut n = 0u64;
    // One token at a time over all three layers, then a 9-token append.
    for step in 0..41 {
        let tokens = if step == 40 { 9 } else { 1 };
        let body: Vec<u8> = (0..3).flat_map(|_| payload(&ns, tokens, step as u8)).collect();
        append(&s, &seq, None, tokens, &body, Some(n)).unwrap();
        n += tokens as u64;
        for (layer, kind) in ns.model.layer_kinds().enumerate() {
            assert_eq!(held(&s, "s", layer as u32), live(kind, n), "layer {layer} ({kind:?}) at {n} tokens");
        }
    }
    assert_eq!(n, 49);
    // Released pages read as misses; live ones hold their tokens.
    assert!(s.get(&wkey("s", 0, 0)).unwrap().is_none());
    assert!(s.get(&wkey("s", 0, 10)).unwrap().is_some());
    assert_eq!(s.get(&wkey("s", 0, 12)).unwrap().unwrap().token_count, 1);
    assert!(s.get(&wkey("s", 2, 0)).unwrap().is_some(), "full layers keep every page");
    let st = s.stats();
    let want_pages = (0..3).map(|l| live(ns.model.layer(l), n).len() as u64).sum::<u64>();
    assert_eq!(st.pages, want_pages);
    let nss = st.namespaces.iter().find(|u| u.name == "test.window").unwrap();
    assert!(nss.window_releases > 0);
    // After a restart the released pages stay gone and the live ones come back.
    s.close().unwrap();
    drop(s);
    let s = open(dir.path(), 64);
    s.ensure_namespace(ns.clone()).unwrap();
    for (layer, kind) in ns.model.layer_kinds().enumerate() {
        assert_eq!(held(&s, "s", layer as u32), live(kind, n), "layer {layer} after restart");
    }
    // The sequence goes on from where it was.
    let body: Vec<u8> = (0..3).flat_map(|_| payload(&ns, 1, 1)).collect();
    append(&s, &seq, None, 1, &body, Some(n)).unwrap();
    assert_eq!(held(&s, "s", 0), live(LayerKind::Sliding { window: 6 }, n + 1));
}

#[test]
fn a_put_of_a_whole_prompt_keeps_only_the_window() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), 64);
    let ns = windowed();
    s.ensure_namespace(ns.clone()).unwrap();
    // Ten full pages of the sliding layer and the chunked one, in one put, in reverse order.
    let mut pages = Vec::new();
    for layer in [0, 1] {
        for p in (0..10).rev() {
            pages.push(page(&wkey("p", layer, p), 4, payload(&ns, 4, p as u8)));
        }
    }
    put_wire(&s, pages).unwrap();
    assert_eq!(held(&s, "p", 0), vec![8, 9], "40 tokens, window 6: tokens 34..40");
    assert_eq!(held(&s, "p", 1), vec![8, 9], "40 tokens, chunk 8: tokens 32..40");
}

#[test]
fn get_rows_cuts_the_chosen_tokens_out_of_their_pages() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), 64);
    let ns = windowed();
    s.ensure_namespace(ns.clone()).unwrap();
    let layout = ns.layout();
    // Layer 2 (full): 10 tokens in pages of 4, token t's rows filled with t.
    let body = |t: u32| vec![t as u8; layout.payload_bytes(1)];
    let seq = SequenceKey::new("test.window", "r");
    for t in 0..10u32 {
        append(&s, &seq, Some(2), 1, &body(t), Some(t as u64)).unwrap();
    }
    let rows = s.get_rows(&seq, 2, &[1, 4, 9]).unwrap().unwrap();
    assert_eq!(rows.len(), layout.payload_bytes(3));
    // [planes][3 tokens][row]: every row of token t is t.
    for plane in 0..layout.planes {
        for (j, t) in [1u8, 4, 9].iter().enumerate() {
            let r = &rows[(plane * 3 + j) * layout.row_bytes..(plane * 3 + j + 1) * layout.row_bytes];
            assert!(r.iter().all(|b| b == t), "plane {plane} token {t}");
        }
    }
    let e = s.get_rows(&seq, 2, &[3, 10]).unwrap_err().to_string();
    assert!(e.contains("sparse index) is 10") && e.contains("< 10, the tokens layer 2 holds"), "{e}");
    assert!(s.get_rows(&seq, 0, &[0]).is_err(), "layer 0 holds nothing");
    assert_eq!(
        s.get_rows(&SequenceKey::new("test.window", "gone"), 2, &[0]).unwrap(),
        None,
        "no such sequence: a miss"
    );
}
