//! End to end with real processes: a coordinator, three cache nodes and a worker, each its own
//! `kvcache` process on loopback. Decodes GQA sequences with R = 2 and R = 1 while a node is
//! SIGKILLed and restarted and the worker is restarted (the second time with its page cache in
//! a preallocated arena); every output is checked against the float64 reference over the data
//! the test wrote.

mod common;

use bytes::Bytes;
use common::{Proc, spawn};
use kvcache_attention::AttnShape;
use kvcache_cli::synth::{Mirror, Rng, check_output, prefill_pages, tokens_payload};
use kvcache_client::Client;
use kvcache_core::{Namespace, SequenceKey};
use kvcache_proto::v1 as pb;
use std::time::Duration;

fn node(i: usize, coord: &str, dir: &std::path::Path) -> Proc {
    common::node(&format!("n{i}"), coord, dir, "256MiB", &[], &[])
}

fn worker(coord: &str, extra: &[&str]) -> Proc {
    let mut args = vec![
        "worker",
        "--listen",
        "127.0.0.1:0",
        "--coordinator",
        coord,
        "--worker-id",
        "w0",
        "--cache-bytes",
        "64MiB",
        "--threads",
        "1",
    ];
    args.extend_from_slice(extra);
    spawn(&args)
}

async fn wait_for(client: &Client, what: &str, f: impl Fn(&kvcache_client::Routing) -> bool) {
    for _ in 0..300 {
        if let Ok(r) = client.refresh().await
            && f(&r)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

struct Seq {
    key: SequenceKey,
    mirror: Mirror,
}

async fn make(client: &Client, name: &str, r: u32, rng: &mut Rng) -> (Namespace, Vec<Seq>) {
    let ns = client
        .create_namespace(pb::CreateNamespaceRequest {
            name: name.into(),
            tenant: "e2e".into(),
            preset: "qwen2.5-7b".into(),
            codec: pb::Codec::Bf16 as i32,
            page_tokens: 16,
            replication: r,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut seqs = Vec::new();
    for i in 0..6 {
        let key = SequenceKey::new(name, format!("s{i}"));
        let pages = prefill_pages(&ns, &key, 1, 50 + 7 * i, rng);
        client.put_pages(pages.clone()).await.unwrap();
        seqs.push(Seq { key, mirror: Mirror::from_wire(&pages, 0) });
    }
    (ns, seqs)
}

/// One decode step for every live sequence; returns the ids that missed.
async fn step(client: &Client, ns: &Namespace, seqs: &mut [Seq], rng: &mut Rng, skip: &[String]) -> Vec<String> {
    let shape = AttnShape::new(&ns.model, ns.layout());
    let mut items = Vec::new();
    let mut qs = Vec::new();
    let mut toks = Vec::new();
    let active: Vec<usize> = (0..seqs.len()).filter(|&i| !skip.contains(&seqs[i].key.sequence_id)).collect();
    for &i in &active {
        let q = rng.vec(shape.q_len(), 1.0);
        let tok = tokens_payload(ns, 1, rng);
        items.push(pb::DecodeItem {
            sequence_id: seqs[i].key.sequence_id.clone(),
            query: kvcache_proto::f32le::to_bytes(&q),
            new_kv: Bytes::from(tok.clone()),
            new_token_id: None,
            ..Default::default()
        });
        qs.push(q);
        toks.push(tok);
    }
    let r = client
        .decode(pb::DecodeRequest {
            namespace: ns.name.clone(),
            layer: 0,
            items,
            softmax_scale: 0.0,
            ..Default::default()
        })
        .await
        .expect("decode call");
    let mut missed = Vec::new();
    for (k, &i) in active.iter().enumerate() {
        let res = &r.results[k];
        if res.status == kvcache_client::SequenceStatus::Ok {
            seqs[i].mirror.append(ns, &toks[k]);
            let e = check_output(&shape, &qs[k], &seqs[i].mirror.pages, &res.output_f32());
            assert!(
                e <= 1e-5,
                "{}: rel L2 {e:e} (context {} vs {})",
                res.sequence_id,
                res.context_tokens,
                seqs[i].mirror.tokens()
            );
        } else {
            missed.push(res.sequence_id.clone());
        }
    }
    missed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decode_survives_node_loss_with_r2_misses_explicitly_with_r1_and_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let _coord = common::fast_coordinator(dir.path(), &[]);
    let coord = _coord.addr.clone();
    let mut nodes: Vec<Proc> = (0..3).map(|i| node(i, &coord, dir.path())).collect();
    let mut w = worker(&coord, &[]);
    let client = Client::connect(&coord).await.unwrap();
    wait_for(&client, "3 nodes and a worker", |r| r.live_nodes().len() == 3 && r.workers.len() == 1).await;
    let mut rng = Rng::new(11);
    let (ns2, mut r2) = make(&client, "e2e.r2", 2, &mut rng).await;
    let (ns1, mut r1) = make(&client, "e2e.r1", 1, &mut rng).await;
    for _ in 0..5 {
        assert!(step(&client, &ns2, &mut r2, &mut rng, &[]).await.is_empty());
        assert!(step(&client, &ns1, &mut r1, &mut rng, &[]).await.is_empty());
    }
    // The node to kill: the one holding the most R = 1 sequences (the assertion below says so
    // if placement ever puts none or all six there).
    let owner = |s: &Seq| client.routing().owners(&s.key, 1)[0].node_id.clone();
    let victim = (0..3).max_by_key(|i| r1.iter().filter(|s| owner(s) == format!("n{i}")).count()).unwrap();
    let victim_id = format!("n{victim}");
    let on_victim: Vec<String> =
        r1.iter().filter(|s| owner(s) == victim_id).map(|s| s.key.sequence_id.clone()).collect();
    assert!(
        !on_victim.is_empty() && on_victim.len() < r1.len(),
        "placement put {} of {} R=1 sequences on {victim_id}",
        on_victim.len(),
        r1.len()
    );
    nodes[victim].kill();
    let mut missed_r1: Vec<String> = Vec::new();
    for _ in 0..8 {
        let m2 = step(&client, &ns2, &mut r2, &mut rng, &[]).await;
        assert!(m2.is_empty(), "R=2 sequences missed after losing one node: {m2:?}");
        let m1 = step(&client, &ns1, &mut r1, &mut rng, &missed_r1).await;
        for m in m1 {
            assert!(on_victim.contains(&m), "{m} missed but did not live on the killed node");
            missed_r1.push(m);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(missed_r1.len(), on_victim.len(), "every R=1 sequence of the killed node is an explicit miss");
    // The node restarts with its pages and rejoins.
    nodes[victim] = node(victim, &coord, dir.path());
    wait_for(&client, "the killed node back", |r| r.live_nodes().len() == 3).await;
    let stats = client.node_stats().await;
    let back = stats.iter().find(|(id, _)| *id == victim_id).unwrap().1.as_ref().unwrap();
    assert!(back.pages > 0, "{victim_id} came back empty");
    // Restart the worker: it refills its cache from the nodes and stays right.
    w.kill();
    // The restarted worker keeps its cache in a preallocated arena: the outputs must not change.
    w = worker(&coord, &["--cache-prefault"]);
    wait_for(&client, "the new worker", |r| r.workers.iter().any(|x| x.address == w.addr)).await;
    for _ in 0..3 {
        assert!(step(&client, &ns2, &mut r2, &mut rng, &[]).await.is_empty());
    }
    assert!(w.terminate(), "worker did not drain cleanly on SIGTERM");
    for n in &mut nodes {
        assert!(n.terminate(), "node did not drain cleanly on SIGTERM");
    }
}
