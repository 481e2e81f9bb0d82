//! `kvcache bench prefix`: prefix reuse on a local 3-node cluster, each figure against a
//! baseline from the same run.
//!
//! - dedup: sequences sharing a prompt, each with tokens of its own, store the prompt once:
//!   bytes the nodes report against (shared + own tokens) and against every sequence storing
//!   its whole context;
//! - match: the longest-prefix match of a long prompt over the cluster (one MatchPrefix per
//!   node, all at once) against one Lookup round trip to one node;
//! - pull: a cold worker pulling a cached prefix for a decode (its pages spread over every node)
//!   against a plain node get of the same pages (8 tasks of 16-page requests, as `bench decode`).

use super::median;
use bytes::Bytes;
use hdrhistogram::Histogram;
use kvcache_attention::AttnShape;
use kvcache_cli::cluster::{LocalCluster, LocalClusterConfig};
use kvcache_cli::synth::{Rng, content_pages, tokens_payload};
use kvcache_client::Client;
use kvcache_core::{ContentKey, Namespace, PageKey, SequenceKey};
use kvcache_proto::v1 as pb;
use serde::Serialize;
use std::time::{Duration, Instant};

/// Flags of `kvcache bench prefix`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Sequences sharing the prompt (dedup).
    #[arg(long, default_value_t = 100)]
    sequences: usize,
    /// Shared prompt tokens (dedup).
    #[arg(long, default_value_t = 4096)]
    shared_tokens: usize,
    /// Tokens of each sequence's own (dedup).
    #[arg(long, default_value_t = 256)]
    own_tokens: usize,
    /// Prompt tokens of the match (64-token pages).
    #[arg(long, default_value_t = 131_072)]
    match_tokens: usize,
    /// Matches timed.
    #[arg(long, default_value_t = 300)]
    matches: usize,
    /// Cached prefix tokens a cold worker pulls.
    #[arg(long, default_value_t = 32_768)]
    pull_tokens: usize,
    /// Cold pulls timed (each of its own prefix).
    #[arg(long, default_value_t = 4)]
    pulls: usize,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Dedup {
    sequences: usize,
    shared_tokens: usize,
    own_tokens: usize,
    payload_bytes_per_token: u64,
    /// Bytes the nodes hold for the namespace (headers included).
    stored_bytes: u64,
    /// stored ÷ (shared + sequences × own) tokens' payload: 1.0 is perfect sharing.
    stored_over_shared_plus_own: f64,
    /// stored ÷ sequences × (shared + own) tokens' payload (no sharing).
    stored_over_unshared: f64,
    pages_deduplicated: u64,
}

#[derive(Serialize)]
struct Match {
    pages: usize,
    nodes: usize,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    /// One Lookup round trip to one node, same run: the floor of any cluster call.
    lookup_p50_ms: f64,
    p50_over_lookup: f64,
}

#[derive(Serialize)]
struct Pull {
    tokens: usize,
    pages: usize,
    bytes: u64,
    cold_fetch_bytes_per_s: f64,
    node_get_bytes_per_s: f64,
    /// Median over the pulls of (cold worker fetch ÷ node get of the same pages right after).
    cold_fetch_vs_node_get: f64,
}

#[derive(Serialize)]
struct Report {
    dedup: Dedup,
    matched: Match,
    pull: Pull,
}

fn model(name: &str, layers: u32, kv_heads: u32, head_dim: u32) -> pb::CreateNamespaceRequest {
    pb::CreateNamespaceRequest {
        name: name.into(),
        tenant: "bench".into(),
        model: Some(pb::ModelSpec {
            name: format!("gqa-l{layers}-kv{kv_heads}-d{head_dim}"),
            attention: pb::AttentionKind::Gqa as i32,
            num_layers: layers,
            num_q_heads: 4 * kv_heads,
            num_kv_heads: kv_heads,
            head_dim,
            ..Default::default()
        }),
        codec: pb::Codec::Bf16 as i32,
        page_tokens: 64,
        replication: 1,
        ..Default::default()
    }
}

fn prompt(tokens: usize, seed: u32) -> Vec<u32> {
    (0..tokens as u32).map(|i| i.wrapping_mul(2_654_435_761) ^ seed.wrapping_mul(0x9e37_79b9)).collect()
}

async fn put_prompt(client: &Client, ns: &Namespace, keys: &[ContentKey]) -> anyhow::Result<u64> {
    let mut dedup = 0;
    for ch in keys.chunks(64) {
        dedup += client.put_content(&ns.name, content_pages(ns, ch)).await?.deduplicated;
    }
    Ok(dedup)
}

async fn dedup(client: &Client, a: &Args) -> anyhow::Result<Dedup> {
    // Llama-3-8B's layer geometry (8 KV heads of 128), 4 layers: 16 KiB per token.
    let ns = client.create_namespace(model("bench.prefix.dedup", 4, 8, 128)).await?;
    let keys = client.content_keys(&ns.name, &prompt(a.shared_tokens, 1))?;
    let mut dedup = 0;
    let mut rng = Rng::new(5);
    let layers = ns.model.num_layers;
    for i in 0..a.sequences {
        // Every request brings the whole prompt, as an engine that prefilled it would: what is
        // already stored is acknowledged without a write.
        let m = client.match_prefix(&ns.name, &keys, None).await?;
        dedup += put_prompt(client, &ns, &keys[m.pages..]).await?;
        let seq = SequenceKey::new(&ns.name, format!("seq-{i}"));
        client.create_sequence(&seq, &keys, None).await?;
        let own: Vec<u8> = (0..layers).flat_map(|_| tokens_payload(&ns, a.own_tokens, &mut rng)).collect();
        client.append(&seq, None, a.own_tokens as u32, Bytes::from(own), vec![]).await?;
    }
    let mut stored = 0;
    for (id, s) in client.node_stats().await {
        let s = s.map_err(|e| anyhow::anyhow!("stats of {id}: {e}"))?;
        stored += s.namespaces.iter().filter(|u| u.namespace == ns.name).map(|u| u.bytes).sum::<u64>();
    }
    let per_token = ns.layout().token_bytes() as u64 * layers as u64;
    let shared = (a.shared_tokens + a.sequences * a.own_tokens) as u64 * per_token;
    let unshared = (a.sequences * (a.shared_tokens + a.own_tokens)) as u64 * per_token;
    Ok(Dedup {
        sequences: a.sequences,
        shared_tokens: a.shared_tokens,
        own_tokens: a.own_tokens,
        payload_bytes_per_token: per_token,
        stored_bytes: stored,
        stored_over_shared_plus_own: stored as f64 / shared as f64,
        stored_over_unshared: stored as f64 / unshared as f64,
        pages_deduplicated: dedup,
    })
}

async fn matching(client: &Client, a: &Args) -> anyhow::Result<Match> {
    // One small layer: the match is about keys, not bytes.
    let ns = client.create_namespace(model("bench.prefix.match", 1, 1, 64)).await?;
    let keys = client.content_keys(&ns.name, &prompt(a.match_tokens, 2))?;
    put_prompt(client, &ns, &keys).await?;
    let node = client.routing().live_nodes().first().cloned().ok_or_else(|| anyhow::anyhow!("no node"))?;
    let probe = SequenceKey::new(&ns.name, "probe");
    let (mut h, mut base) = (Histogram::<u64>::new(3)?, Vec::new());
    for i in 0..a.matches + 10 {
        let t = Instant::now();
        let m = client.match_prefix(&ns.name, &keys, None).await?;
        let us = t.elapsed().as_micros() as u64;
        anyhow::ensure!(m.pages == keys.len(), "the match found {} of {} pages", m.pages, keys.len());
        let t = Instant::now();
        client.lookup_on(&node, &probe, vec![], Some(0)).await?;
        let lookup = t.elapsed().as_secs_f64() * 1e3;
        if i >= 10 {
            h.record(us.max(1))?;
            base.push(lookup);
        }
    }
    let lookup = median(base);
    let p50 = h.value_at_quantile(0.5) as f64 / 1e3;
    Ok(Match {
        pages: keys.len(),
        nodes: client.routing().live_nodes().len(),
        p50_ms: p50,
        p99_ms: h.value_at_quantile(0.99) as f64 / 1e3,
        max_ms: h.max() as f64 / 1e3,
        lookup_p50_ms: lookup,
        p50_over_lookup: p50 / lookup,
    })
}

async fn pull(client: &Client, a: &Args) -> anyhow::Result<Pull> {
    // Llama-3-8B's layer geometry, 2 layers (layer 0 is decoded).
    let ns = client.create_namespace(model("bench.prefix.pull", 2, 8, 128)).await?;
    let shape = AttnShape::new(&ns.model, ns.layout());
    let mut rng = Rng::new(9);
    let (mut cold, mut node, mut ratio, mut bytes, mut pages) = (Vec::new(), Vec::new(), Vec::new(), 0, 0);
    for round in 0..a.pulls.max(1) {
        let keys = client.content_keys(&ns.name, &prompt(a.pull_tokens, 100 + round as u32))?;
        put_prompt(client, &ns, &keys).await?;
        let seq = SequenceKey::new(&ns.name, format!("pull-{round}"));
        client.create_sequence(&seq, &keys, Some(Duration::from_secs(60))).await?;
        let item = pb::DecodeItem {
            sequence_id: seq.sequence_id.clone(),
            query: kvcache_proto::f32le::to_bytes(&rng.vec(shape.q_len(), 1.0)),
            new_kv: Bytes::new(),
            new_token_id: None,
            ..Default::default()
        };
        let r = client
            .decode(pb::DecodeRequest {
                namespace: ns.name.clone(),
                layer: 0,
                items: vec![item],
                softmax_scale: 0.0,
                ..Default::default()
            })
            .await?;
        anyhow::ensure!(r.results.iter().all(|r| r.status == kvcache_client::SequenceStatus::Ok), "cold pull missed");
        let st = r.stats;
        anyhow::ensure!(st.pages_pulled as usize == keys.len(), "pulled {} pages of {}", st.pages_pulled, keys.len());
        let c = st.bytes_pulled as f64 / (st.fetch_micros.max(1) as f64 / 1e6);
        // The same pages straight from the nodes.
        let want: Vec<PageKey> = keys
            .iter()
            .map(|k| PageKey { sequence: SequenceKey::content(&ns.name, k), layer: 0, page_index: 0 })
            .collect();
        let n = super::node_get_rate(client, &want).await?;
        cold.push(c);
        node.push(n);
        ratio.push(c / n);
        bytes = st.bytes_pulled;
        pages = keys.len();
    }
    Ok(Pull {
        tokens: a.pull_tokens,
        pages,
        bytes,
        cold_fetch_bytes_per_s: median(cold),
        node_get_bytes_per_s: median(node),
        cold_fetch_vs_node_get: median(ratio),
    })
}

/// Run `kvcache bench prefix`.
pub fn run(a: Args) -> anyhow::Result<()> {
    tokio::runtime::Runtime::new()?.block_on(async move {
        let tmp = tempfile::tempdir()?;
        let mut cfg = LocalClusterConfig::new(tmp.path());
        cfg.worker_prefetch = false;
        cfg.worker_cache_bytes = 2 << 30;
        cfg.worker_cache_prefault = true;
        cfg.node_capacity = 3 << 30;
        crate::util::check_fits_disk("the benchmark cluster (3 nodes)", 3 * cfg.node_capacity, tmp.path())?;
        let cluster = LocalCluster::start(cfg).await?;
        let client = Client::connect(&cluster.coordinator).await?;
        let dedup = dedup(&client, &a).await?;
        eprintln!(
            "dedup: {} sequences × ({} shared + {} own tokens) stored in {:.1} MB = {:.3}× (shared + own), {:.3}× unshared; {} pages deduplicated",
            dedup.sequences,
            dedup.shared_tokens,
            dedup.own_tokens,
            dedup.stored_bytes as f64 / 1e6,
            dedup.stored_over_shared_plus_own,
            dedup.stored_over_unshared,
            dedup.pages_deduplicated
        );
        let matched = matching(&client, &a).await?;
        eprintln!(
            "match: {} pages over {} nodes: p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms; one Lookup p50 {:.3} ms ({:.1}×)",
            matched.pages, matched.nodes, matched.p50_ms, matched.p99_ms, matched.max_ms, matched.lookup_p50_ms, matched.p50_over_lookup
        );
        let pull = pull(&client, &a).await?;
        eprintln!(
            "pull: a cold worker pulled a cached {}-token prefix ({} pages, {:.1} MB) at {:.2} GB/s; node get of the same pages {:.2} GB/s ({:.2}×)",
            pull.tokens,
            pull.pages,
            pull.bytes as f64 / 1e6,
            pull.cold_fetch_bytes_per_s / 1e9,
            pull.node_get_bytes_per_s / 1e9,
            pull.cold_fetch_vs_node_get
        );
        cluster.stop().await?;
        let report = Report { dedup, matched, pull };
        if a.json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        }
        Ok(())
    })
}
