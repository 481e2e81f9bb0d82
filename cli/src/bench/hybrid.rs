//! `kvcache bench hybrid`: what hybrid and long-context layer kinds cost, each against a baseline
//! from the same run (also the hybrid part of `kvcache demo`).
//!
//! - sliding: a gpt-oss sliding-window layer (128 tokens) prefilled to 8K … 1M tokens and decoded
//!   through the worker: bytes the nodes hold for it and bytes a decode step pulls, against what
//!   a full-attention layer of the same model holds at that length. Every page of the prompt is
//!   put; the nodes release what falls out of the window.
//! - sparse: DeepSeek-V3.2's sparse MLA at 128K tokens (the indexer scores every token, attention
//!   reads the top 2,048) against dense MLA over the same latents (a DeepSeek-V3 namespace holding
//!   the same pages): bytes pulled by a cold step and time per warm step, and the sparse output
//!   against the float64 reference over the same choice.

use super::median;
use bytes::Bytes;
use kvcache_attention::hybrid::{encode_indexer_key, indexer_scores, top_k};
use kvcache_attention::{AttnShape, KvPage, reference};
use kvcache_cli::cluster::{LocalCluster, LocalClusterConfig};
use kvcache_cli::synth::{Rng, tokens_payload};
use kvcache_client::{Client, SequenceStatus, wire_page};
use kvcache_core::{Namespace, PageKey, SequenceKey};
use kvcache_proto::v1 as pb;
use serde::Serialize;
use std::time::Instant;

/// Flags of `kvcache bench hybrid`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Context lengths of the sliding-window run, comma-separated.
    #[arg(long, default_value = "8192,65536,262144,1048576", value_delimiter = ',')]
    sliding_contexts: Vec<u64>,
    /// Context of the sparse MLA run, in tokens.
    #[arg(long, default_value_t = 131_072)]
    sparse_context: usize,
    /// Warm decode steps timed per run.
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// One sliding-window run.
#[derive(Serialize, Debug)]
pub struct Sliding {
    pub model: String,
    pub window: u32,
    pub context: u64,
    /// Bytes the nodes hold for the sliding layer of the sequence (headers included).
    pub stored_bytes: u64,
    /// What a full-attention layer of the same model holds at this length (payload).
    pub full_layer_bytes: u64,
    /// Bytes the first decode step pulled (cold worker), and the warm steps' mean.
    pub cold_pull_bytes: u64,
    pub warm_pull_bytes: f64,
    /// Tokens attended to.
    pub attended: u64,
    pub warm_step_ms: f64,
    pub max_rel_error: f64,
}

/// The sparse-vs-dense run.
#[derive(Serialize, Debug, Default)]
pub struct Sparse {
    pub context: usize,
    pub topk: u32,
    pub sparse_cold_pull_bytes: u64,
    pub dense_cold_pull_bytes: u64,
    pub sparse_cold_step_ms: f64,
    pub dense_cold_step_ms: f64,
    pub sparse_warm_step_ms: f64,
    pub dense_warm_step_ms: f64,
    pub sparse_warm_pull_bytes: f64,
    /// Of a warm step (worker's own accounting, medians): the sparse step's fetch part (the
    /// indexer's scoring and the rows read) and its attention; the dense step's attention.
    pub sparse_warm_fetch_ms: f64,
    pub sparse_warm_attention_ms: f64,
    pub dense_warm_attention_ms: f64,
    pub max_rel_error: f64,
}

async fn namespace(client: &Client, name: &str, preset: &str) -> anyhow::Result<Namespace> {
    Ok(client
        .create_namespace(pb::CreateNamespaceRequest {
            name: name.into(),
            preset: preset.into(),
            codec: pb::Codec::Bf16 as i32,
            page_tokens: 64,
            replication: 1,
            ..Default::default()
        })
        .await?)
}

async fn held_bytes(client: &Client, ns: &str) -> anyhow::Result<u64> {
    let mut b = 0;
    for (_, s) in client.node_stats().await {
        b += s?.namespaces.iter().filter(|u| u.namespace == ns).map(|u| u.bytes).sum::<u64>();
    }
    Ok(b)
}

/// Prefill layer 0 (sliding) of a gpt-oss sequence to `context` tokens and decode `steps`
/// steps with sinks, checked against the float64 reference over the window.
pub async fn sliding(client: &Client, name: &str, context: u64, steps: usize) -> anyhow::Result<Sliding> {
    let ns = namespace(client, name, "gpt-oss-20b").await?;
    let kind = ns.model.layer(0);
    let kvcache_core::spec::LayerKind::Sliding { window } = kind else { anyhow::bail!("layer 0 is not sliding") };
    let shape = AttnShape::new(&ns.model, ns.layout());
    let seq = SequenceKey::new(name, format!("ctx{context}"));
    let mut rng = Rng::new(context);
    let pt = ns.page_tokens as u64;
    // Pages outside the last window's pages share one payload (their bytes are never read);
    // the last ones are random and kept to check the output.
    let filler = Bytes::from(tokens_payload(&ns, pt as usize, &mut rng));
    let pages = context.div_ceil(pt);
    let keep_from = pages.saturating_sub(window as u64 / pt + 2);
    let mut mirror: Vec<(Vec<u8>, usize)> = Vec::new();
    let mut batch = Vec::new();
    for i in 0..pages {
        let n = (context - i * pt).min(pt) as usize;
        let body = if i >= keep_from || n < pt as usize {
            let b = tokens_payload(&ns, n, &mut rng);
            mirror.push((b.clone(), n));
            Bytes::from(b)
        } else {
            filler.clone()
        };
        batch.push(wire_page(
            &ns,
            &PageKey { sequence: seq.clone(), layer: 0, page_index: i as u32 },
            n as u32,
            0,
            body,
        ));
        if batch.len() == 32 {
            client.put_pages(std::mem::take(&mut batch)).await?;
        }
    }
    client.put_pages(batch).await?;
    let stored = held_bytes(client, name).await?;
    let mirror_first = keep_from;
    let sinks = rng.vec(shape.q_heads, 2.0);
    let (mut cold, mut warm, mut times, mut max_err, mut attended) = (0, 0u64, Vec::new(), 0f64, 0);
    let mut total = context;
    for step in 0..=steps {
        let q = rng.vec(shape.q_len(), 1.0);
        let tok = tokens_payload(&ns, 1, &mut rng);
        let l = ns.layout();
        match mirror.last_mut() {
            Some((p, n)) if (*n as u64) < pt => {
                let mut m = vec![0u8; l.payload_bytes(*n + 1)];
                l.concat(p, *n, &tok, 1, &mut m);
                *p = m;
                *n += 1;
            }
            _ => mirror.push((tok.clone(), 1)),
        }
        total += 1;
        let t = Instant::now();
        let r = client
            .decode(pb::DecodeRequest {
                namespace: name.into(),
                layer: 0,
                items: vec![pb::DecodeItem {
                    new_kv: Bytes::from(tok),
                    ..pb::DecodeItem::with_query(&seq.sequence_id, &q)
                }],
                sinks: kvcache_proto::f32le::to_bytes(&sinks),
                ..Default::default()
            })
            .await?;
        let ms = t.elapsed().as_secs_f64() * 1e3;
        let res = &r.results[0];
        anyhow::ensure!(res.status == SequenceStatus::Ok, "sliding decode: {}", res.message);
        attended = res.context_tokens;
        if step == 0 {
            cold = r.stats.bytes_pulled;
        } else {
            warm += r.stats.bytes_pulled;
            times.push(ms);
        }
        // The reference over the mirrored pages, skipping to the window's first token.
        let start = kind.read_range(total).start - mirror_first * pt;
        let kv: Vec<KvPage> = mirror.iter().map(|(p, n)| KvPage { payload: p, tokens: *n }).collect();
        let (want, _) = reference::attention_window(&shape, &q, &kv, start as usize, Some(&sinks));
        max_err = max_err.max(reference::rel_l2(&res.output_f32(), &want));
    }
    let _ = client.delete(&seq).await;
    Ok(Sliding {
        model: "gpt-oss-20b".into(),
        window,
        context,
        stored_bytes: stored,
        full_layer_bytes: context * ns.layout().token_bytes() as u64,
        cold_pull_bytes: cold,
        warm_pull_bytes: warm as f64 / steps.max(1) as f64,
        attended,
        warm_step_ms: median(times),
        max_rel_error: max_err,
    })
}

/// Sparse MLA (DeepSeek-V3.2, top-2,048) against dense MLA over the same `context` latents.
pub async fn sparse(client: &Client, prefix: &str, context: usize, steps: usize) -> anyhow::Result<Sparse> {
    let sp = namespace(client, &format!("{prefix}.dsv32"), "deepseek-v3.2").await?;
    let dense = namespace(client, &format!("{prefix}.dsv3"), "deepseek-v3").await?;
    let ix = sp.model.indexer.expect("indexer");
    let shape = AttnShape::new(&sp.model, sp.layout());
    let (s_seq, d_seq) = (SequenceKey::new(&sp.name, "s"), SequenceKey::new(&dense.name, "s"));
    let mut rng = Rng::new(context as u64 ^ 0xd5a);
    let pt = sp.page_tokens as usize;
    let il = sp.indexer_layer(0).expect("indexer layer");
    let mut mirror: Vec<(Vec<u8>, usize)> = Vec::new();
    let mut keys: Vec<u8> = Vec::with_capacity((context + steps + 1) * ix.bytes_per_token());
    let mut key = vec![0u8; ix.bytes_per_token()];
    let (mut sb, mut db) = (Vec::new(), Vec::new());
    for i in 0..context.div_ceil(pt) {
        let n = (context - i * pt).min(pt);
        let body = Bytes::from(tokens_payload(&sp, n, &mut rng));
        let mut kp = Vec::with_capacity(n * ix.bytes_per_token());
        for _ in 0..n {
            encode_indexer_key(&ix, &rng.vec(128, 1.0), &mut key);
            kp.extend_from_slice(&key);
        }
        keys.extend_from_slice(&kp);
        mirror.push((body.to_vec(), n));
        let k = |s: &SequenceKey, layer| PageKey { sequence: s.clone(), layer, page_index: i as u32 };
        sb.push(wire_page(&sp, &k(&s_seq, 0), n as u32, 0, body.clone()));
        sb.push(wire_page(&sp, &k(&s_seq, il), n as u32, 0, Bytes::from(kp)));
        db.push(wire_page(&dense, &k(&d_seq, 0), n as u32, 0, body));
        if sb.len() >= 32 {
            client.put_pages(std::mem::take(&mut sb)).await?;
            client.put_pages(std::mem::take(&mut db)).await?;
        }
    }
    client.put_pages(sb).await?;
    client.put_pages(db).await?;
    let iq = rng.vec((ix.num_heads * ix.head_dim) as usize, 1.0);
    let w = rng.vec(ix.num_heads as usize, 1.0);
    let (mut out, mut max_err) = (Sparse { context, topk: ix.topk, ..Default::default() }, 0f64);
    let (mut st, mut dt, mut sw) = (Vec::new(), Vec::new(), 0u64);
    let (mut sf, mut sa, mut da) = (Vec::new(), Vec::new(), Vec::new());
    for step in 0..=steps {
        let q = rng.vec(shape.q_len(), 1.0);
        let tok = tokens_payload(&sp, 1, &mut rng);
        encode_indexer_key(&ix, &rng.vec(128, 1.0), &mut key);
        keys.extend_from_slice(&key);
        match mirror.last_mut() {
            Some((p, n)) if *n < pt => {
                p.extend_from_slice(&tok);
                *n += 1;
            }
            _ => mirror.push((tok.clone(), 1)),
        }
        let b = |v: &[f32]| kvcache_proto::f32le::to_bytes(v);
        let t = Instant::now();
        let r = client
            .decode(pb::DecodeRequest {
                namespace: sp.name.clone(),
                layer: 0,
                items: vec![pb::DecodeItem {
                    new_kv: Bytes::from(tok.clone()),
                    new_index_key: Bytes::from(key.clone()),
                    index_query: b(&iq),
                    index_weights: b(&w),
                    ..pb::DecodeItem::with_query("s", &q)
                }],
                ..Default::default()
            })
            .await?;
        let s_ms = t.elapsed().as_secs_f64() * 1e3;
        anyhow::ensure!(r.results[0].status == SequenceStatus::Ok, "sparse: {}", r.results[0].message);
        let t = Instant::now();
        let rd = client
            .decode(pb::DecodeRequest {
                namespace: dense.name.clone(),
                layer: 0,
                items: vec![pb::DecodeItem { new_kv: Bytes::from(tok), ..pb::DecodeItem::with_query("s", &q) }],
                ..Default::default()
            })
            .await?;
        let d_ms = t.elapsed().as_secs_f64() * 1e3;
        anyhow::ensure!(rd.results[0].status == SequenceStatus::Ok, "dense: {}", rd.results[0].message);
        if step == 0 {
            out.sparse_cold_pull_bytes = r.stats.bytes_pulled;
            out.dense_cold_pull_bytes = rd.stats.bytes_pulled;
            out.sparse_cold_step_ms = s_ms;
            out.dense_cold_step_ms = d_ms;
            // The output against the float64 reference over the same choice.
            let mut scores = Vec::new();
            indexer_scores(&ix, &iq, &w, &keys, &mut scores)?;
            let chosen = top_k(&scores, ix.topk as usize);
            let src: Vec<(&[u8], usize)> = mirror.iter().map(|(p, n)| (&p[..], *n)).collect();
            let rows = kvcache_attention::hybrid::gather_rows(&src, sp.layout().token_bytes(), &chosen)?;
            let (want, _) = reference::attention(&shape, &q, &[KvPage { payload: &rows, tokens: chosen.len() }]);
            max_err = reference::rel_l2(&r.results[0].output_f32(), &want);
        } else {
            st.push(s_ms);
            dt.push(d_ms);
            sw += r.stats.bytes_pulled;
            sf.push(r.stats.fetch_micros as f64 / 1e3);
            sa.push(r.stats.compute_micros as f64 / 1e3);
            da.push(rd.stats.compute_micros as f64 / 1e3);
        }
    }
    out.sparse_warm_step_ms = median(st);
    out.dense_warm_step_ms = median(dt);
    out.sparse_warm_pull_bytes = sw as f64 / steps.max(1) as f64;
    out.sparse_warm_fetch_ms = median(sf);
    out.sparse_warm_attention_ms = median(sa);
    out.dense_warm_attention_ms = median(da);
    out.max_rel_error = max_err;
    let _ = client.delete(&s_seq).await;
    let _ = client.delete(&d_seq).await;
    Ok(out)
}

/// Run `kvcache bench hybrid`.
pub fn run(a: Args) -> anyhow::Result<()> {
    anyhow::ensure!(a.steps > 0 && a.sparse_context > 0, "steps and sparse-context must be > 0");
    tokio::runtime::Runtime::new()?.block_on(async move {
        let tmp = tempfile::tempdir()?;
        let mut cfg = LocalClusterConfig::new(tmp.path());
        cfg.nodes = 1;
        cfg.node_capacity = 3 << 30;
        cfg.worker_cache_bytes = 2 << 30;
        let cluster = LocalCluster::start(cfg).await?;
        let client = Client::connect(&cluster.coordinator).await?;
        let mut slides = Vec::new();
        for &c in &a.sliding_contexts {
            slides.push(sliding(&client, &format!("bench.oss.{c}"), c, a.steps).await?);
        }
        let sp = sparse(&client, "bench", a.sparse_context, a.steps).await?;
        cluster.stop().await?;
        if a.json {
            println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "sliding": slides, "sparse": sp }))?);
        } else {
            print_sliding(&slides);
            print_sparse(&sp, false);
        }
        for r in &slides {
            anyhow::ensure!(r.max_rel_error <= 1e-5, "sliding {}: rel L2 {:e}", r.context, r.max_rel_error);
        }
        anyhow::ensure!(sp.max_rel_error <= 1e-5, "sparse: rel L2 {:e}", sp.max_rel_error);
        Ok(())
    })
}

pub fn print_sliding(rs: &[Sliding]) {
    let h = |b: f64| crate::util::human_bytes(b);
    println!("\nSliding-window layer (gpt-oss, window 128, sinks): one sequence, decode through the worker\n");
    println!(
        "{:>10} {:>12} {:>16} {:>12} {:>12} {:>9} {:>10} {:>9}",
        "context", "stored", "full layer", "cold pull", "warm pull", "attended", "warm ms", "rel err"
    );
    for r in rs {
        println!(
            "{:>10} {:>12} {:>16} {:>12} {:>12} {:>9} {:>10.2} {:>9.1e}",
            r.context,
            h(r.stored_bytes as f64),
            h(r.full_layer_bytes as f64),
            h(r.cold_pull_bytes as f64),
            h(r.warm_pull_bytes),
            r.attended,
            r.warm_step_ms,
            r.max_rel_error
        );
    }
    println!(
        "stored: what the node holds for the layer (pages released as the window moves); full layer: the same length in a full-attention layer."
    );
}

/// `dense_on_gpu`: the worker computes dense MLA on a GPU (sparse MLA, a few gathered rows per
/// sequence, stays on its CPU), so the warm-step ratio compares two devices; the line says so.
pub fn print_sparse(r: &Sparse, dense_on_gpu: bool) {
    let h = |b: f64| crate::util::human_bytes(b);
    let wheres = if dense_on_gpu { " (sparse on the worker's CPU, dense on its GPU)" } else { "" };
    println!(
        "\nSparse MLA (DeepSeek-V3.2 indexer, top-{}) vs dense MLA over the same {} latents, one layer, 128 heads{}:\n\
         cold step pulled {} sparse (indexer keys + chosen rows) vs {} dense ({:.1}x less); cold step {:.1} ms vs {:.1} ms;\n\
         warm step {:.2} ms sparse (pulls {}) vs {:.2} ms dense ({:.2}x); output vs float64 over the same choice: rel err {:.1e}.\n\
         of a warm step: sparse fetch (indexer scoring, rows) {:.1} ms + attention {:.1} ms; dense attention {:.1} ms.",
        r.topk,
        r.context,
        wheres,
        h(r.sparse_cold_pull_bytes as f64),
        h(r.dense_cold_pull_bytes as f64),
        r.dense_cold_pull_bytes as f64 / r.sparse_cold_pull_bytes.max(1) as f64,
        r.sparse_cold_step_ms,
        r.dense_cold_step_ms,
        r.sparse_warm_step_ms,
        h(r.sparse_warm_pull_bytes),
        r.dense_warm_step_ms,
        r.dense_warm_step_ms / r.sparse_warm_step_ms.max(1e-9),
        r.max_rel_error,
        r.sparse_warm_fetch_ms,
        r.sparse_warm_attention_ms,
        r.dense_warm_attention_ms
    );
}
