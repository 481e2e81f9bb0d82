//! `kvcache bench decode`: decode steps through the worker against the kernel alone on the same
//! batch (warm: the worker's cache holds the context), and cold steps (empty cache) against the
//! node's get throughput measured in the same run.

use super::median;
use bytes::Bytes;
use kvcache_attention::{AttnShape, BatchItem, KvPage, decode_batch};
use kvcache_cli::cluster::{LocalCluster, LocalClusterConfig};
use kvcache_cli::synth::{Mirror, Rng, prefill_pages, tokens_payload};
use kvcache_client::Client;
use kvcache_core::{PageKey, SequenceKey};
use kvcache_proto::v1 as pb;
use serde::Serialize;
use std::time::Instant;

/// Flags of `kvcache bench decode`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Context tokens per sequence.
    #[arg(long, default_value_t = 8192)]
    context: usize,
    /// Sequences per batch.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Warm steps timed.
    #[arg(long, default_value_t = 20)]
    steps: usize,
    /// Cold batches, each read once through the worker and once straight from the nodes.
    #[arg(long, default_value_t = 4)]
    cold_batches: usize,
    /// Run the worker without `--cache-prefault` (its cache then keeps the received frame
    /// buffers, fresh memory the kernel faults in on a cold pull).
    #[arg(long)]
    no_cache_prefault: bool,
    /// Where the worker computes: `cpu`, or `cuda` / `cuda:N` (the kernel-alone baseline then
    /// runs on the same GPU, over the batch's pages already in device memory).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Models to run (llama-3-8b, deepseek-v3).
    #[arg(long, value_delimiter = ',', default_value = "llama-3-8b,deepseek-v3")]
    models: Vec<String>,
    /// How queries and outputs travel (`DecodeRequest.vector_dtype`): `bf16`, what an engine's
    /// activations are, or `f32`.
    #[arg(long, default_value = "bf16", value_parser = ["bf16", "f32"])]
    wire: String,
    /// Run the coordinator and the nodes as tasks of this process. By default they are
    /// processes of their own (`kvcache coordinator`, `kvcache node`), as a deployment runs them:
    /// in one process the nodes' append work shares the worker's allocator, address space and
    /// runtime threads, and a step's host work measures several times its cost.
    #[arg(long)]
    in_process: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct ModelRow {
    model: String,
    /// The encoding of queries and outputs on the wire.
    wire: String,
    kernel_ms: f64,
    warm_step_ms: f64,
    /// Where a warm step's time goes inside the worker: appends, lookups and cache reads
    /// (fetch), then the kernel (compute).
    warm_fetch_ms: f64,
    /// Of the fetch: the write-through append of the step's tokens, until every owner answered.
    warm_append_ms: f64,
    warm_compute_ms: f64,
    /// This process (the worker and the client) over the warm steps, per step: CPU time (all
    /// threads; 10 ms resolution over the steps together) and minor page faults.
    warm_cpu_ms_per_step: f64,
    warm_minor_faults_per_step: f64,
    /// Of the warm steps' sequences, the fraction computed while their append was in flight
    /// (and confirmed by the owners).
    warm_overlapped: f64,
    /// On a GPU: the decode and merge kernels alone (planned once, launched and waited for),
    /// without the query upload, plan and read-back that `kernel_ms` includes.
    gpu_kernels_only_ms: Option<f64>,
    /// Median over the warm steps of (step ÷ kernel alone on the same batch, run right after).
    warm_step_over_kernel: f64,
    cold_step_ms: f64,
    cold_fetch_bytes_per_s: f64,
    node_get_bytes_per_s: f64,
    /// Median over the cold batches of (cold fetch ÷ node get of the same pages, read right
    /// after): each pair is measured a fraction of a second apart, so the host's drift cancels.
    cold_fetch_vs_node_get: f64,
    /// Median over the cold batches of (the pages' bytes ÷ the whole cold step, ÷ node get): the
    /// pull, the copy into the worker's compute memory (HBM on a GPU), the kernels and the call.
    cold_step_vs_node_get: f64,
}

#[derive(Serialize)]
struct Report {
    /// The coordinator and the nodes ran as tasks of the bench's process (`--in-process`), not
    /// as processes of their own.
    nodes_in_process: bool,
    warm_step_over_kernel: f64,
    cold_fetch_vs_node_get: f64,
    models: Vec<ModelRow>,
}

/// Run `kvcache bench decode`.
pub fn run(a: Args) -> anyhow::Result<()> {
    tokio::runtime::Runtime::new()?.block_on(async move {
        // RUST_LOG=kvcache_worker=debug: the worker's per-step phases, as JSON lines on stdout.
        let _tracing = std::env::var_os("RUST_LOG").map(|_| kvcache_telemetry::trace::init("kvcache-bench"));
        let tmp = tempfile::tempdir()?;
        let gpu = kvcache_cli::cluster::open_device(&a.device)?;
        let mut cfg = LocalClusterConfig::new(tmp.path());
        cfg.worker_prefetch = false;
        // Bytes per token and layer of the models run (bf16 pages of 64 tokens).
        let mut per_token = Vec::new();
        for m in &a.models {
            let spec = kvcache_core::ModelSpec::preset(m)
                .ok_or_else(|| anyhow::anyhow!("unknown model {m} (llama-3-8b or deepseek-v3)"))?;
            per_token.push(kvcache_core::PageLayout::new(&spec, kvcache_core::Codec::Bf16, 64).token_bytes());
        }
        let largest = per_token.iter().copied().max().unwrap_or(4096);
        // The nodes hold every batch of every model; the worker's cache twice the larger model's
        // warm batch (the cold batches pass through it).
        let need = (per_token.iter().sum::<usize>() * a.context * a.batch * (1 + a.cold_batches.max(1))) as u64;
        cfg.worker_cache_bytes = (4u64 << 30).max((largest * a.context * a.batch * 2) as u64);
        cfg.worker_cache_prefault = !a.no_cache_prefault;
        cfg.node_capacity = (4u64 << 30).max(need / 2);
        cfg.worker_device = gpu.clone();
        if !a.in_process {
            cfg.processes = Some(std::env::current_exe()?);
        }
        let cluster = LocalCluster::start(cfg).await?;
        let client = Client::connect(&cluster.coordinator).await?;
        let mut rows = Vec::new();
        for preset in a.models.iter().map(String::as_str) {
            let name = format!("bench.{preset}");
            let ns = client
                .create_namespace(pb::CreateNamespaceRequest { name: name.clone(), tenant: "bench".into(), preset: preset.into(), page_tokens: 64, replication: 1, ..Default::default() })
                .await?;
            let shape = AttnShape::new(&ns.model, ns.layout());
            let mut rng = Rng::new(99);
            // One batch kept warm, the others read cold.
            let mut groups: Vec<Vec<(SequenceKey, Mirror)>> = Vec::new();
            for g in 0..1 + a.cold_batches.max(1) {
                let mut v = Vec::new();
                for i in 0..a.batch {
                    let key = SequenceKey::new(&name, format!("g{g}-s{i}"));
                    let pages = prefill_pages(&ns, &key, 1, a.context, &mut rng);
                    for ch in pages.chunks(32) {
                        client.put_pages(ch.to_vec()).await?;
                    }
                    v.push((key, Mirror::from_wire(&pages, 0)));
                }
                groups.push(v);
            }
            let dtype = if a.wire == "f32" { pb::VectorDtype::F32 } else { pb::VectorDtype::Bf16 };
            // On a GPU, the shape's kernels are compiled (or loaded from the disk cache) before
            // anything is timed: the worker shares this process's device, so a cold step then
            // measures the pull and the copy into HBM, not a one-time compile.
            if let Some(g) = &gpu {
                let (p, n) = &groups[0][0].1.pages[0];
                let dp = g.upload_pages(&shape.layout, &[KvPage { payload: p, tokens: *n }])?;
                let q = vec![0u8; shape.q_len() * 2];
                let refs = dp.pages();
                let item = kvcache_attention::gpu::GpuItem { q: kvcache_attention::gpu::Query::Bf16(&q), pages: &refs, skip: 0 };
                g.decode_batch_each(&shape, &[item], true)?;
                g.decode_batch_each(&shape, &[kvcache_attention::gpu::GpuItem { q: kvcache_attention::gpu::Query::F32(&vec![0f32; shape.q_len()]), ..item }], false)?;
            }
            let req = |g: &mut Vec<(SequenceKey, Mirror)>, rng: &mut Rng, append: bool| {
                let items = g
                    .iter_mut()
                    .map(|(k, m)| {
                        let tok = if append { tokens_payload(&ns, 1, rng) } else { Vec::new() };
                        if append {
                            m.append(&ns, &tok);
                        }
                        pb::DecodeItem { sequence_id: k.sequence_id.clone(), query: dtype.encode(&rng.vec(shape.q_len(), 1.0)), new_kv: Bytes::from(tok), new_token_id: None, ..Default::default() }
                    })
                    .collect();
                pb::DecodeRequest { namespace: name.clone(), layer: 0, items, softmax_scale: 0.0, vector_dtype: dtype as i32, ..Default::default() }
            };
            // Cold: the first call on a batch nobody has read, then the node-get baseline on the
            // same pages straight from the nodes (8 tasks of 16-page requests, as `bench node`).
            let (mut cold_ms, mut cold_rate, mut node_rate, mut ratio) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            let mut step_ratio = Vec::new();
            for g in groups.iter_mut().skip(1) {
                let r = req(g, &mut rng, false);
                let t = Instant::now();
                let resp = client.decode(r).await?;
                let ms = t.elapsed().as_secs_f64() * 1e3;
                let st = resp.stats;
                if let Some(bad) = resp.results.iter().find(|r| r.status != kvcache_client::SequenceStatus::Ok) {
                    anyhow::bail!("cold step: sequence {} answered {:?}: {}", bad.sequence_id, bad.status, bad.message);
                }
                let cold = st.bytes_pulled as f64 / (st.fetch_micros.max(1) as f64 / 1e6);
                let keys: Vec<PageKey> = g
                    .iter()
                    .flat_map(|(k, m)| (0..m.pages.len()).map(move |i| PageKey { sequence: k.clone(), layer: 0, page_index: i as u32 }))
                    .collect();
                let node = super::node_get_rate(&client, &keys).await?;
                cold_ms.push(ms);
                cold_rate.push(cold);
                node_rate.push(node);
                ratio.push(cold / node);
                step_ratio.push(st.bytes_pulled as f64 / (ms / 1e3) / node);
            }
            // Warm: batch 0, one token appended per step, cache hot after the first call. Each
            // step is paired with the kernel alone on the same batch (the context the step just
            // computed, same thread count as the worker) right after it, and the ratio is the
            // median of the per-pair ratios: this host's drift moves both halves of a pair.
            client.decode(req(&mut groups[0], &mut rng, true)).await?;
            // On a GPU, the kernel alone reads the batch's pages from device memory, uploaded
            // once here (the context then differs from each step's by at most `steps` tokens).
            let dev_pages = match &gpu {
                Some(g) => Some(
                    groups[0]
                        .iter()
                        .map(|(_, m)| {
                            let kv: Vec<KvPage> = m.pages.iter().map(|(p, n)| KvPage { payload: p, tokens: *n }).collect();
                            g.upload_pages(&shape.layout, &kv)
                        })
                        .collect::<Result<Vec<_>, _>>()?,
                ),
                None => None,
            };
            let mut bufs: Vec<(Vec<f32>, Vec<f32>)> = (0..a.batch).map(|_| (vec![0f32; shape.out_len()], vec![0f32; shape.q_heads])).collect();
            let (mut warm, mut kern, mut warm_ratio) = (Vec::new(), Vec::new(), Vec::new());
            let (mut warm_fetch, mut warm_compute, mut warm_append) = (Vec::new(), Vec::new(), Vec::new());
            let (mut overlapped, mut computed, mut kernels_only) = (0u64, 0u64, Vec::new());
            let (mut step_cpu, mut step_faults) = (0.0, 0u64);
            for _ in 0..a.steps {
                let r = req(&mut groups[0], &mut rng, true);
                let before = super::proc_stat(std::process::id());
                let t = Instant::now();
                let resp = client.decode(r).await?;
                let w = t.elapsed().as_secs_f64() * 1e3;
                let after = super::proc_stat(std::process::id());
                step_cpu += after.cpu_s - before.cpu_s;
                step_faults += after.minor_faults.saturating_sub(before.minor_faults);
                let st = resp.stats;
                warm_fetch.push(st.fetch_micros as f64 / 1e3);
                warm_append.push(st.append_micros as f64 / 1e3);
                warm_compute.push(st.compute_micros as f64 / 1e3);
                overlapped += st.sequences_overlapped;
                computed += resp.results.len() as u64;
                if let Some(bad) = resp.results.iter().find(|r| r.status != kvcache_client::SequenceStatus::Ok) {
                    anyhow::bail!("warm step: sequence {} answered {:?}: {}", bad.sequence_id, bad.status, bad.message);
                }
                let kv: Vec<Vec<KvPage>> = groups[0].iter().map(|(_, m)| m.pages.iter().map(|(p, n)| KvPage { payload: p, tokens: *n }).collect()).collect();
                // Queries as the worker sees them (bf16 values on a bf16 wire), so the kernel
                // alone runs the path the worker's does.
                let qs: Vec<Vec<f32>> = (0..a.batch)
                    .map(|_| rng.vec(shape.q_len(), 1.0))
                    .map(|q| if dtype == pb::VectorDtype::Bf16 { q.iter().map(|x| f32::from_bits((x.to_bits() + 0x8000) & 0xffff_0000)).collect() } else { q })
                    .collect();
                let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
                let opts = kvcache_attention::calibrate::options_for(&shape, threads, &qs.iter().map(|q| &q[..]).collect::<Vec<_>>());
                let items: Vec<BatchItem> = qs.iter().zip(&kv).map(|(q, p)| BatchItem::new(q, p)).collect();
                let mut outs: Vec<(&mut [f32], &mut [f32])> = bufs.iter_mut().map(|(o, l)| (&mut o[..], &mut l[..])).collect();
                let t = Instant::now();
                let k = match (&gpu, &dev_pages) {
                    (Some(g), Some(dp)) => {
                        let refs: Vec<Vec<kvcache_attention::gpu::DeviceRef>> = dp.iter().map(|d| d.pages()).collect();
                        let gi: Vec<kvcache_attention::gpu::GpuItem> =
                            qs.iter().zip(&refs).map(|(q, r)| kvcache_attention::gpu::GpuItem { q: kvcache_attention::gpu::Query::F32(q), pages: r, skip: 0 }).collect();
                        g.decode_batch(&shape, &gi)?;
                        let k = t.elapsed().as_secs_f64() * 1e3;
                        // The kernels alone: planned once, then launched and waited for.
                        let mut plan = g.plan(&shape, &gi)?;
                        g.launch(&mut plan)?;
                        g.synchronize()?;
                        let t = Instant::now();
                        g.launch(&mut plan)?;
                        g.synchronize()?;
                        kernels_only.push(t.elapsed().as_secs_f64() * 1e3);
                        k
                    }
                    _ => {
                        decode_batch(&shape, &items, &opts, &mut outs)?;
                        t.elapsed().as_secs_f64() * 1e3
                    }
                };
                warm.push(w);
                kern.push(k);
                warm_ratio.push(w / k);
            }
            let (k, w) = (median(kern), median(warm));
            let (cold_fetch, node_get) = (median(cold_rate), median(node_rate));
            let row = ModelRow {
                model: preset.into(),
                wire: a.wire.clone(),
                kernel_ms: k,
                warm_step_ms: w,
                warm_fetch_ms: median(warm_fetch),
                warm_append_ms: median(warm_append),
                warm_compute_ms: median(warm_compute),
                warm_cpu_ms_per_step: step_cpu * 1e3 / a.steps.max(1) as f64,
                warm_minor_faults_per_step: step_faults as f64 / a.steps.max(1) as f64,
                warm_overlapped: overlapped as f64 / computed.max(1) as f64,
                gpu_kernels_only_ms: (!kernels_only.is_empty()).then(|| median(kernels_only)),
                warm_step_over_kernel: median(warm_ratio),
                cold_step_ms: median(cold_ms),
                cold_fetch_bytes_per_s: cold_fetch,
                node_get_bytes_per_s: node_get,
                cold_fetch_vs_node_get: median(ratio),
                cold_step_vs_node_get: median(step_ratio),
            };
            let only = row.gpu_kernels_only_ms.map(|k| format!(" (the kernels alone {k:.2} ms)")).unwrap_or_default();
            eprintln!(
                "{preset}: kernel {:.2} ms{only}, warm step {:.2} ms ({:.2}×; worker fetch {:.2} + compute {:.2} ms, append {:.2} ms, {:.0}% of sequences computed while appending; {} queries and outputs; this process {:.1} CPU ms and {:.0} page faults per step), cold step {:.1} ms ({:.2}× node get, the copy into compute memory and the kernels included), cold fetch {:.2} GB/s vs node get {:.2} GB/s ({:.2}×)",
                row.kernel_ms, row.warm_step_ms, row.warm_step_over_kernel, row.warm_fetch_ms, row.warm_compute_ms, row.warm_append_ms, row.warm_overlapped * 100.0, row.wire, row.warm_cpu_ms_per_step, row.warm_minor_faults_per_step, row.cold_step_ms, row.cold_step_vs_node_get, cold_fetch / 1e9, node_get / 1e9, row.cold_fetch_vs_node_get
            );
            rows.push(row);
        }
        cluster.stop().await?;
        let report = Report {
            nodes_in_process: a.in_process,
            warm_step_over_kernel: rows.iter().map(|r| r.warm_step_over_kernel).fold(0.0, f64::max),
            cold_fetch_vs_node_get: rows.iter().map(|r| r.cold_fetch_vs_node_get).fold(f64::INFINITY, f64::min),
            models: rows,
        };
        if a.json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            println!("warm step / kernel alone (worst model): {:.2}×; cold fetch / node get (worst model): {:.2}×", report.warm_step_over_kernel, report.cold_fetch_vs_node_get);
        }
        Ok(())
    })
}
