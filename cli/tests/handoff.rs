//! Handoff with real processes: a coordinator and cache nodes, each its own `kvcache` process.
//! A drained node empties itself into the remaining owners; a joining node receives its share
//! and the nodes that held it drop their copies; after a node is killed, the surviving replica
//! of each R = 2 sequence copies it to the next owner. Every page reads back bit-exact
//! throughout.

mod common;

use common::Proc;
use kvcache_cli::synth::{Rng, content_pages, prefill_pages, tokens_payload};
use kvcache_client::Client;
use kvcache_core::{PageKey, SequenceKey};
use kvcache_proto::v1 as pb;
use std::collections::HashMap;
use std::time::Duration;

fn node(i: usize, coord: &str, dir: &std::path::Path) -> Proc {
    common::node(&format!("n{i}"), coord, dir, "128MiB", &["--handoff-interval", "2s"], &[])
}

/// Which of `nodes` (id → address) hold `key`, by asking each one.
async fn holders(nodes: &HashMap<String, String>, key: &SequenceKey) -> Vec<String> {
    let mut out = Vec::new();
    for (id, addr) in nodes {
        let Ok(ch) = kvcache_client::channel(addr) else { continue };
        let mut c = pb::cache_node_client::CacheNodeClient::new(ch);
        let req = pb::LookupRequest { sequence: Some(key.into()), prefix_hashes: vec![], layer: None };
        if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(2), c.lookup(req)).await
            && r.get_ref().exists
        {
            out.push(id.clone());
        }
    }
    out.sort();
    out
}

/// Poll `cond` (bounded) until it holds.
async fn eventually<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let mut last = String::new();
    for _ in 0..120 {
        match cond().await {
            Ok(()) => return,
            Err(e) => last = e,
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("timed out waiting for {what}: {last}");
}

struct Written {
    key: SequenceKey,
    r: usize,
    pages: Vec<pb::Page>,
}

async fn reads_back(client: &Client, all: &[Written]) -> Result<(), String> {
    for w in all {
        let keys: Vec<PageKey> = w.pages.iter().map(|p| PageKey::try_from(p.key.clone().unwrap()).unwrap()).collect();
        let got = client.get_pages(&keys).await.map_err(|e| format!("{}: {e}", w.key.sequence_id))?;
        for (g, p) in got.iter().zip(&w.pages) {
            let g = g.as_ref().ok_or_else(|| format!("{}: page missing", w.key.sequence_id))?;
            if g.payload != p.payload {
                return Err(format!("{}: page bytes differ", w.key.sequence_id));
            }
        }
    }
    Ok(())
}

/// Every sequence is held by exactly min(R, live) of `live` nodes, and by nothing else listed.
async fn placed(all: &[Written], live: &HashMap<String, String>, gone: &HashMap<String, String>) -> Result<(), String> {
    for w in all {
        let h = holders(live, &w.key).await;
        if h.len() != w.r.min(live.len()) {
            return Err(format!("{} (R={}) held by {h:?}", w.key.sequence_id, w.r));
        }
        let g = holders(gone, &w.key).await;
        if !g.is_empty() {
            return Err(format!("{} still held by drained {g:?}", w.key.sequence_id));
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_join_and_node_loss_move_sequences_to_their_owners() {
    let dir = tempfile::tempdir().unwrap();
    let coord = common::fast_coordinator(dir.path(), &[]);
    let mut procs: Vec<Proc> = (0..3).map(|i| node(i, &coord.addr, dir.path())).collect();
    let addr_of = |procs: &[Proc], i: usize| (format!("n{i}"), procs[i].addr.clone());
    let client = Client::connect(&coord.addr).await.unwrap();
    eventually("3 nodes", || async {
        let r = client.refresh().await.map_err(|e| e.to_string())?;
        if r.live_nodes().len() == 3 { Ok(()) } else { Err(format!("{} live", r.live_nodes().len())) }
    })
    .await;
    let mut rng = Rng::new(3);
    let mut all = Vec::new();
    let mut prefixed: Vec<(SequenceKey, Vec<kvcache_core::ContentKey>)> = Vec::new();
    for r in [1u32, 2] {
        let name = format!("h.r{r}");
        let ns = client
            .create_namespace(pb::CreateNamespaceRequest {
                name: name.clone(),
                tenant: "t".into(),
                preset: "qwen2.5-7b".into(),
                codec: pb::Codec::Bf16 as i32,
                page_tokens: 16,
                replication: r,
                ..Default::default()
            })
            .await
            .unwrap();
        for i in 0..10 {
            let key = SequenceKey::new(&name, format!("s{i}"));
            let pages = prefill_pages(&ns, &key, 2, 20 + 5 * i, &mut rng);
            client.put_pages(pages.clone()).await.unwrap();
            all.push(Written { key, r: r as usize, pages });
        }
        // Content pages (placed by key, each key a sequence of its own) and a sequence over
        // them (its prefix travels with it) move like any sequence.
        let tokens: Vec<u32> = (0..8 * 16).map(|t| t * 3 + r).collect();
        let keys = client.content_keys(&name, &tokens).unwrap();
        let cpages = content_pages(&ns, &keys);
        client.put_content(&name, cpages.clone()).await.unwrap();
        for k in &keys {
            let key = SequenceKey::content(&name, k);
            let pages = cpages
                .iter()
                .filter(|p| p.key.as_ref().unwrap().sequence.as_ref().unwrap().sequence_id == key.sequence_id)
                .cloned()
                .collect();
            all.push(Written { key, r: r as usize, pages });
        }
        let over = SequenceKey::new(&name, "over");
        client.create_sequence(&over, &keys, None).await.unwrap();
        let tail = tokens_payload(&ns, 5, &mut rng);
        client.append(&over, Some(0), 5, bytes::Bytes::from(tail.clone()), vec![]).await.unwrap();
        let own = PageKey { sequence: over.clone(), layer: 0, page_index: 8 };
        let page = kvcache_client::wire_page(&ns, &own, 5, 0, bytes::Bytes::from(tail));
        all.push(Written { key: over.clone(), r: r as usize, pages: vec![page] });
        prefixed.push((over, keys));
    }
    let mut live: HashMap<String, String> = (0..3).map(|i| addr_of(&procs, i)).collect();
    placed(&all, &live, &HashMap::new()).await.expect("initial placement");

    // Drain n1: it empties into n0 and n2, and stops holding anything.
    let n1: HashMap<String, String> = [addr_of(&procs, 1)].into();
    live.remove("n1");
    let c = coord.addr.clone();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_kvcache"))
            .args(["drain", "--coordinator", &c, "n1", "--wait", "60s"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "kvcache drain: {said} {}", String::from_utf8_lossy(&out.stderr));
    assert!(said.contains("n1 holds no sequences"), "{said}");
    eventually("n1 drained into n0 and n2", || placed(&all, &live, &n1)).await;
    client.refresh().await.unwrap();
    eventually("reads after the drain", || reads_back(&client, &all)).await;
    for (seq, keys) in &prefixed {
        assert_eq!(&client.lookup(seq, vec![]).await.unwrap().prefix, keys, "{} lost its prefix", seq.namespace);
        assert_eq!(client.match_prefix(&seq.namespace, keys, None).await.unwrap().pages, keys.len());
    }

    // Join n3: its share arrives, and the nodes that held it let go.
    procs.push(node(3, &coord.addr, dir.path()));
    live.insert("n3".into(), procs[3].addr.clone());
    eventually("n3 received its share", || async {
        placed(&all, &live, &n1).await?;
        let mut held = 0;
        for w in &all {
            held += usize::from(holders(&live, &w.key).await.contains(&"n3".to_owned()));
        }
        if held > 0 { Ok(()) } else { Err("n3 holds nothing".into()) }
    })
    .await;
    client.refresh().await.unwrap();
    // Placement settles before every copy is readable through a fresh map (a holder may still be
    // streaming its pages while the counts already agree): reads must come right, boundedly.
    eventually("reads after the join", || reads_back(&client, &all)).await;
    for (seq, keys) in &prefixed {
        assert_eq!(&client.lookup(seq, vec![]).await.unwrap().prefix, keys, "{} lost its prefix", seq.namespace);
    }

    // Kill n0: each R = 2 sequence it held is copied from its surviving replica to the next
    // owner (R = 1 sequences on n0 are lost: that is what R = 1 means).
    procs[0].kill();
    live.remove("n0");
    let r2: Vec<Written> = all.into_iter().filter(|w| w.r == 2).collect();
    eventually("R = 2 restored after losing n0", || placed(&r2, &live, &n1)).await;
    client.refresh().await.unwrap();
    eventually("R = 2 reads after losing n0", || reads_back(&client, &r2)).await;
}
