//! `kvcache demo`: the main job. Starts a local cluster (or uses `--coordinator`), creates
//! namespaces for a GQA model, an MLA model in bf16 and fp8 and an MHA reference shape, prefills
//! sequences, decodes through the worker, checks outputs against float64, and prints what each
//! attention design costs — every number measured. Then prefix reuse, and hybrid models: a
//! gpt-oss sliding-window layer with sinks, and DeepSeek-V3.2's sparse MLA against dense MLA.

use bytes::Bytes;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use kvcache_attention::AttnShape;
use kvcache_cli::cluster::{LocalCluster, LocalClusterConfig};
use kvcache_cli::synth::{Mirror, Rng, check_output, prefill_pages, tokens_payload};
use kvcache_core::SequenceKey;
use kvcache_proto::v1 as pb;
use serde::Serialize;
use std::io::IsTerminal;
use std::time::Instant;

/// Flags of `kvcache demo`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Use a running cluster instead of starting one.
    #[arg(long, env = "KVCACHE_COORDINATOR", value_parser = crate::util::parse_addresses)]
    coordinator: Option<String>,
    /// Context length of each prefilled sequence, in tokens.
    #[arg(long, default_value_t = 8192)]
    context: usize,
    /// Sequences per model.
    #[arg(long, default_value_t = 2)]
    sequences: usize,
    /// Layers prefilled and decoded per sequence.
    #[arg(long, default_value_t = 2)]
    layers: u32,
    /// Decode steps (each step decodes every layer of every sequence, appending one token).
    #[arg(long, default_value_t = 16)]
    steps: usize,
    /// Where the worker of the cluster the demo starts computes attention: `cpu`, or `cuda` /
    /// `cuda:N`. Outputs are checked against the float64 reference either way (MLA on a GPU's
    /// tensor cores within 2e-3, every other path within 1e-5).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Print JSON instead of the table.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct ModelResult {
    label: String,
    namespace: String,
    attention: String,
    codec: String,
    bytes_per_token_layer_stored: f64,
    bytes_per_token_model: f64,
    tokens_fit_in_cluster: u64,
    /// The cluster capacity `tokens_fit_in_cluster` divides, in bytes.
    cluster_capacity_bytes: u64,
    cold_bytes_pulled_per_step: u64,
    warm_bytes_pulled_per_step: f64,
    decode_p50_ms: f64,
    decode_p99_ms: f64,
    tokens_per_s: f64,
    max_rel_error: f64,
    /// The bound `max_rel_error` is held to on this path.
    tolerance: f64,
}

fn bar(total: u64) -> ProgressBar {
    if std::io::stderr().is_terminal() {
        let b = ProgressBar::new(total);
        b.set_style(
            ProgressStyle::with_template("{msg:28} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}")
                .expect("template"),
        );
        b
    } else {
        ProgressBar::hidden()
    }
}

/// Run `kvcache demo`.
pub fn run(a: Args) -> anyhow::Result<()> {
    anyhow::ensure!(
        a.context > 0 && a.sequences > 0 && a.layers > 0 && a.steps > 0,
        "context, sequences, layers and steps must be > 0"
    );
    tokio::runtime::Runtime::new()?.block_on(async move {
        let tmp = tempfile::tempdir()?;
        anyhow::ensure!(
            a.coordinator.is_none() || a.device == "cpu",
            "--device sets the worker of the cluster the demo starts; a running cluster's worker has its own --device"
        );
        let gpu = kvcache_cli::cluster::open_device(&a.device)?;
        let (cluster, coordinator) = match &a.coordinator {
            Some(c) => (None, c.clone()),
            None => {
                let mut cfg = LocalClusterConfig::new(tmp.path());
                cfg.worker_device = gpu.clone();
                let c = LocalCluster::start(cfg).await?;
                let addr = c.coordinator.clone();
                (Some(c), addr)
            }
        };
        let client = kvcache_cli::cluster::connect(&coordinator, Default::default()).await?;
        let mut results = Vec::new();
        let models = [
            ("GQA Llama-3-8B", "llama-3-8b", pb::Codec::Bf16),
            ("MLA DeepSeek-V3", "deepseek-v3", pb::Codec::Bf16),
            ("MLA DeepSeek-V3 fp8", "deepseek-v3", pb::Codec::Fp8E4m3),
            ("MHA Llama-2-7B", "llama-2-7b", pb::Codec::Bf16),
        ];
        let run_id = std::process::id();
        for (label, preset, codec) in models {
            let codec_name = kvcache_core::validate::codec(codec as i32).map(|c| c.as_str()).unwrap_or("?");
            let name = format!("demo.{preset}.{codec_name}");
            let ns = client
                .create_namespace(pb::CreateNamespaceRequest {
                    name: name.clone(),
                    // No tenant named: on a cluster with tenants the coordinator makes it the caller's.
                    preset: preset.into(),
                    codec: codec as i32,
                    page_tokens: 64,
                    replication: 1,
                    ..Default::default()
                })
                .await?;
            let shape = AttnShape::new(&ns.model, ns.layout());
            let mut rng = Rng::new(0x5eed ^ preset.len() as u64 ^ codec as u64);
            // Prefill.
            let seqs: Vec<SequenceKey> =
                (0..a.sequences).map(|i| SequenceKey::new(&name, format!("r{run_id}-s{i}"))).collect();
            let total = (ns.layout().payload_bytes(a.context) * a.layers as usize * a.sequences) as u64;
            let pb_bar = bar(total);
            pb_bar.set_message(format!("prefill {label}"));
            let mut mirror = None;
            for (i, s) in seqs.iter().enumerate() {
                let pages = prefill_pages(&ns, s, a.layers, a.context, &mut rng);
                if i == 0 {
                    mirror = Some(Mirror::from_wire(&pages, 0));
                }
                for chunk in pages.chunks(32) {
                    let n: u64 = chunk.iter().map(|p| p.payload.len() as u64).sum();
                    client.put_pages(chunk.to_vec()).await?;
                    pb_bar.inc(n);
                }
            }
            pb_bar.finish_and_clear();
            let mut mirror = mirror.expect("one sequence");
            // Decode.
            let mut hist = Histogram::<u64>::new(3)?;
            let mut cold = 0u64;
            let mut warm = 0u64;
            let mut max_err: f64 = 0.0;
            let t0 = Instant::now();
            for step in 0..a.steps {
                for layer in 0..a.layers {
                    let mut items = Vec::new();
                    let mut q0 = Vec::new();
                    for (i, s) in seqs.iter().enumerate() {
                        // bf16 values, as an engine running the model in bf16 sends them.
                        let q: Vec<f32> = rng
                            .vec(shape.q_len(), 1.0)
                            .into_iter()
                            .map(|x| f32::from_bits(x.to_bits() & 0xffff_0000))
                            .collect();
                        let tok = tokens_payload(&ns, 1, &mut rng);
                        if i == 0 && layer == 0 {
                            mirror.append(&ns, &tok);
                            q0 = q.clone();
                        }
                        items.push(pb::DecodeItem {
                            sequence_id: s.sequence_id.clone(),
                            query: kvcache_proto::f32le::to_bytes(&q),
                            new_kv: Bytes::from(tok),
                            new_token_id: None,
                            ..Default::default()
                        });
                    }
                    let t = Instant::now();
                    let r = client
                        .decode(pb::DecodeRequest {
                            namespace: name.clone(),
                            layer,
                            items,
                            softmax_scale: 0.0,
                            ..Default::default()
                        })
                        .await?;
                    hist.record(t.elapsed().as_micros().max(1) as u64)?;
                    for res in &r.results {
                        anyhow::ensure!(
                            res.status == kvcache_client::SequenceStatus::Ok,
                            "{}: {}",
                            res.sequence_id,
                            res.message
                        );
                    }
                    let pulled = r.stats.bytes_pulled;
                    if step == 0 && layer == 0 {
                        // The first call finds an empty worker cache (later layers of step 0 may
                        // already be prefetched, so they are not counted as cold).
                        cold = pulled;
                    } else if step > 0 {
                        warm += pulled;
                    }
                    if layer == 0 && (step == 0 || step + 1 == a.steps || step % 8 == 0) {
                        max_err = max_err.max(check_output(&shape, &q0, &mirror.pages, &r.results[0].output_f32()));
                    }
                }
            }
            let decode_secs = t0.elapsed().as_secs_f64();
            // Footprint from the nodes' own accounting.
            let mut bytes = 0u64;
            let mut tokens = 0u64;
            let mut capacity = 0u64;
            for (_, s) in client.node_stats().await {
                let s = s?;
                capacity += s.capacity_bytes;
                for u in s.namespaces.iter().filter(|u| u.namespace == name) {
                    bytes += u.bytes;
                    tokens += u.tokens;
                }
            }
            let per_layer = bytes as f64 / (tokens.max(1) as f64 * a.layers as f64);
            let per_token = per_layer * ns.model.num_layers as f64;
            results.push(ModelResult {
                label: label.into(),
                namespace: name,
                attention: ns.model.attention.as_str().into(),
                codec: codec_name.into(),
                bytes_per_token_layer_stored: per_layer,
                bytes_per_token_model: per_token,
                tokens_fit_in_cluster: (capacity as f64 / per_token) as u64,
                cluster_capacity_bytes: capacity,
                cold_bytes_pulled_per_step: cold,
                warm_bytes_pulled_per_step: warm as f64
                    / ((a.steps.saturating_sub(1)) * a.layers as usize).max(1) as f64,
                decode_p50_ms: hist.value_at_quantile(0.5) as f64 / 1e3,
                decode_p99_ms: hist.value_at_quantile(0.99) as f64 / 1e3,
                tokens_per_s: (a.sequences * a.steps) as f64 / decode_secs,
                max_rel_error: max_err,
                // The tensor-core MLA kernel rounds P to bf16 (queries are bf16 already).
                tolerance: if gpu.is_some() && shape.latent { 2e-3 } else { 1e-5 },
            });
            for s in &seqs {
                let _ = client.delete(s).await;
            }
        }
        let reuse = prefix_reuse(&client, run_id).await?;
        let sliding =
            crate::bench::hybrid::sliding(&client, &format!("demo.gpt-oss.{run_id}"), a.context as u64, 4).await?;
        let sparse = crate::bench::hybrid::sparse(&client, &format!("demo.{run_id}"), a.context, 3).await?;
        if let Some(c) = cluster {
            c.stop().await?;
        }
        if a.json {
            println!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({
                    "models": results,
                    "prefix_reuse": reuse,
                    "hybrid": { "sliding": sliding, "sparse": sparse },
                }))?
            );
        } else {
            print_table(&a, &results);
            print_reuse(&reuse);
            crate::bench::hybrid::print_sliding(std::slice::from_ref(&sliding));
            crate::bench::hybrid::print_sparse(&sparse, gpu.is_some());
        }
        anyhow::ensure!(
            sliding.max_rel_error <= 1e-5 && sparse.max_rel_error <= 1e-5,
            "hybrid: output differs from the float64 reference (sliding {:e}, sparse {:e})",
            sliding.max_rel_error,
            sparse.max_rel_error
        );
        anyhow::ensure!(
            reuse.max_rel_error <= 1e-5,
            "prefix reuse: output differs from the float64 reference (rel L2 {:e})",
            reuse.max_rel_error
        );
        for r in &results {
            anyhow::ensure!(
                r.max_rel_error <= r.tolerance,
                "{}: output differs from the float64 reference (rel L2 {:e} > {:e})",
                r.label,
                r.max_rel_error,
                r.tolerance
            );
        }
        Ok(())
    })
}

/// What the prefix-reuse part of the demo measured.
#[derive(Serialize)]
struct Reuse {
    model: String,
    shared_prompt_tokens: usize,
    own_tokens: usize,
    /// Request B's prompt tokens found in the cache (whole pages).
    hit_tokens: u64,
    /// Bytes B pulled instead of computing them, and how long that took.
    pulled_bytes: u64,
    pull_ms: f64,
    /// What computing the hit would have cost instead (2 × parameters × tokens, the usual
    /// estimate of a prefill's FLOPs; an estimate, not a measurement).
    prefill_flops_saved_estimate: f64,
    /// Bytes the nodes hold for both requests, and what they would hold without sharing.
    stored_bytes: u64,
    stored_bytes_unshared: u64,
    /// Pages the worker pulled for the first decode of both requests (the shared prompt once).
    decode_pages_pulled: u64,
    max_rel_error: f64,
}

/// Two requests that share a system prompt: the first prefills and stores it by content, the
/// second finds it with one match, pulls it instead of computing it, and both decode over it.
async fn prefix_reuse(client: &kvcache_client::Client, run_id: u32) -> anyhow::Result<Reuse> {
    let name = "demo.prefix.llama-3-8b".to_owned();
    let ns = client
        .create_namespace(pb::CreateNamespaceRequest {
            name: name.clone(),
            // No tenant named: on a cluster with tenants the coordinator makes it the caller's.
            preset: "llama-3-8b".into(),
            codec: pb::Codec::Bf16 as i32,
            page_tokens: 64,
            replication: 1,
            ..Default::default()
        })
        .await?;
    let (shared, own) = (2048usize, 200usize);
    let layers = ns.model.num_layers;
    let shape = AttnShape::new(&ns.model, ns.layout());
    let system: Vec<u32> = (0..shared as u32).map(|i| i.wrapping_mul(2_654_435_761) ^ run_id).collect();
    let mut rng = Rng::new(run_id as u64);
    let mut mirrors = Vec::new();
    let (mut hit_tokens, mut pulled, mut pull_ms) = (0, 0, 0.0);
    for (r, user) in ["a", "b"].iter().enumerate() {
        let mut tokens = system.clone();
        tokens.extend((0..own as u32).map(|i| i * 7 + 1_000_000 * (r as u32 + 1)));
        let keys = client.content_keys(&name, &tokens)?;
        let t = Instant::now();
        let hit = client.match_prefix(&name, &keys, Some(std::time::Duration::from_secs(30))).await?;
        let got = client.get_content(&name, &keys[..hit.pages], 0..layers).await?;
        anyhow::ensure!(got.iter().all(Option::is_some), "a matched page went missing");
        if r == 1 {
            hit_tokens = (hit.pages * 64) as u64;
            pulled = got.iter().flatten().map(|p| p.payload.len() as u64).sum();
            pull_ms = t.elapsed().as_secs_f64() * 1e3;
        }
        // "Prefill" what missed (synthetic K/V standing in for the engine's), stored by content.
        let missed = kvcache_cli::synth::content_pages(&ns, &keys[hit.pages..]);
        for ch in missed.chunks(64) {
            client.put_content(&name, ch.to_vec()).await?;
        }
        let seq = SequenceKey::new(&name, format!("r{run_id}-{user}"));
        client.create_sequence(&seq, &keys, None).await?;
        let tail = tokens.len() - keys.len() * 64;
        let tail_kv: Vec<u8> = (0..layers).flat_map(|_| tokens_payload(&ns, tail, &mut rng)).collect();
        client.append(&seq, None, tail as u32, Bytes::from(tail_kv.clone()), vec![]).await?;
        let mut m = Mirror {
            pages: keys.iter().map(|k| (kvcache_cli::synth::content_page(&ns, k, 0).payload.to_vec(), 64)).collect(),
        };
        m.pages.push((tail_kv[..ns.layout().payload_bytes(tail)].to_vec(), tail));
        mirrors.push((seq, m));
    }
    // Both decode layer 0 in one batch: the worker pulls the shared prompt once.
    let mut items = Vec::new();
    let mut qs = Vec::new();
    for (seq, m) in mirrors.iter_mut() {
        let q = rng.vec(shape.q_len(), 1.0);
        let tok = tokens_payload(&ns, 1, &mut rng);
        m.append(&ns, &tok[..ns.layout().payload_bytes(1)]);
        items.push(pb::DecodeItem {
            sequence_id: seq.sequence_id.clone(),
            query: kvcache_proto::f32le::to_bytes(&q),
            new_kv: Bytes::from(tok),
            new_token_id: None,
            ..Default::default()
        });
        qs.push(q);
    }
    let r = client
        .decode(pb::DecodeRequest {
            namespace: name.clone(),
            layer: 0,
            items,
            softmax_scale: 0.0,
            ..Default::default()
        })
        .await?;
    let mut max_err: f64 = 0.0;
    for (i, res) in r.results.iter().enumerate() {
        anyhow::ensure!(res.status == kvcache_client::SequenceStatus::Ok, "{}: {}", res.sequence_id, res.message);
        max_err = max_err.max(check_output(&shape, &qs[i], &mirrors[i].1.pages, &res.output_f32()));
    }
    let mut stored = 0;
    for (_, s) in client.node_stats().await {
        stored += s?.namespaces.iter().filter(|u| u.namespace == name).map(|u| u.bytes).sum::<u64>();
    }
    let per_token = (ns.layout().token_bytes() * layers as usize) as u64;
    for (seq, _) in &mirrors {
        let _ = client.delete(seq).await;
    }
    Ok(Reuse {
        model: "llama-3-8b".into(),
        shared_prompt_tokens: shared,
        own_tokens: own,
        hit_tokens,
        pulled_bytes: pulled,
        pull_ms,
        prefill_flops_saved_estimate: 2.0 * 8.03e9 * hit_tokens as f64,
        stored_bytes: stored,
        stored_bytes_unshared: 2 * (shared + own) as u64 * per_token,
        decode_pages_pulled: r.stats.pages_pulled,
        max_rel_error: max_err,
    })
}

fn print_reuse(r: &Reuse) {
    println!(
        "\nPrefix reuse ({}): two requests share a {}-token system prompt, each with {} tokens of its own.\n\
         request b found {} of its {} prompt tokens cached (one MatchPrefix per node) and pulled them: {} in {:.1} ms,\n\
         instead of a prefill of ~{:.1} TFLOP (2 x 8.0B parameters x {} tokens, an estimate).\n\
         the nodes hold {} for both requests, {} without sharing ({:.2}x); the first decode of both pulled {} pages (layer 0:\n\
         the shared prompt once, then each request's own). rel err {:.1e}.",
        r.model,
        r.shared_prompt_tokens,
        r.own_tokens,
        r.hit_tokens,
        r.shared_prompt_tokens + r.own_tokens,
        crate::util::human_bytes(r.pulled_bytes as f64),
        r.pull_ms,
        r.prefill_flops_saved_estimate / 1e12,
        r.hit_tokens,
        crate::util::human_bytes(r.stored_bytes as f64),
        crate::util::human_bytes(r.stored_bytes_unshared as f64),
        r.stored_bytes_unshared as f64 / r.stored_bytes.max(1) as f64,
        r.decode_pages_pulled,
        r.max_rel_error
    );
}

fn print_table(a: &Args, rs: &[ModelResult]) {
    println!(
        "\nkvcache demo: {} sequences × {} tokens × {} layers per model; {} decode steps through the worker (each step: every layer, one new token per sequence)\n",
        a.sequences, a.context, a.layers, a.steps
    );
    println!(
        "{:<20} {:<4} {:<8} {:>11} {:>12} {:>14} {:>12} {:>12} {:>9} {:>9} {:>8} {:>9}",
        "model",
        "attn",
        "codec",
        "B/tok/layer",
        "B/tok model",
        "tokens fit",
        "cold pull",
        "warm pull",
        "p50 ms",
        "p99 ms",
        "tok/s",
        "rel err"
    );
    for r in rs {
        println!(
            "{:<20} {:<4} {:<8} {:>11.0} {:>12.0} {:>14} {:>12} {:>12} {:>9.2} {:>9.2} {:>8.1} {:>9.1e}",
            r.label,
            r.attention,
            r.codec,
            r.bytes_per_token_layer_stored,
            r.bytes_per_token_model,
            r.tokens_fit_in_cluster,
            crate::util::human_bytes(r.cold_bytes_pulled_per_step as f64),
            crate::util::human_bytes(r.warm_bytes_pulled_per_step),
            r.decode_p50_ms,
            r.decode_p99_ms,
            r.tokens_per_s,
            r.max_rel_error
        );
    }
    println!(
        "\nB/tok/layer is what the nodes report storing per token and layer (payload plus the 128-byte page header);\n\
         B/tok model multiplies it by the model's layers, and tokens fit divides the cluster's capacity ({}) by that.\n\
         cold pull is what the worker pulled for the first Decode call (one layer of every sequence, empty cache);\n\
         warm pull is the mean per later call, when the worker's page cache holds the context and the appended\n\
         token was applied to its cached last page as it was written through.\n\
         p50/p99 are per Decode call (one layer, all sequences); tok/s counts one token per sequence per step over\n\
         {} layers. rel err is the worst relative L2 error of a checked output against a float64 reference.",
        rs.first().map_or_else(|| "-".to_owned(), |r| crate::util::human_bytes(r.cluster_capacity_bytes as f64)),
        a.layers
    );
}
