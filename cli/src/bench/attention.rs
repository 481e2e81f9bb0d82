//! `kvcache bench attention`: GQA (Llama-3-8B layer) and MLA (DeepSeek-V3 layer) decode at 4K,
//! 32K and 128K tokens, bf16 and fp8, one thread and all threads, over a working set several
//! times the last-level cache, against read bandwidth and the multiply-add peak measured in the
//! same run.

use super::median;
use kvcache_attention::{AttnShape, Backend, KvPage, Options, decode, peak};
use kvcache_core::{Codec, ModelSpec, PageLayout};
use serde::Serialize;
use std::time::Instant;

/// Flags of `kvcache bench attention`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Context lengths in tokens.
    #[arg(long, value_delimiter = ',', default_value = "4096,32768,131072")]
    tokens: Vec<usize>,
    /// Codecs.
    #[arg(long, value_delimiter = ',', default_value = "bf16,fp8-e4m3")]
    codecs: Vec<String>,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 1.0)]
    seconds: f64,
    /// Working set as a multiple of the last-level cache.
    #[arg(long, default_value_t = 3.0)]
    llc_multiple: f64,
    /// Backend (avx512, avx512-bf16, avx2, portable); default: the fastest the calibration
    /// measures here for each shape.
    #[arg(long)]
    backend: Option<String>,
    /// CPU: queries with f32 values below bf16 precision (default: bf16 values, as an engine
    /// computing in bf16 sends; the AVX-512 BF16 path scores those with `vdpbf16ps`).
    #[arg(long)]
    f32_query: bool,
    /// Where the kernels run: `cpu`, or `cuda` / `cuda:N` for the GPU backend (its own shapes:
    /// batch × tokens of 1 × 128K, 8 × 32K, 64 × 4K, 128 × 8K; `--tokens` is for the CPU).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// GPU: models to run (llama-3-8b, deepseek-v3).
    #[arg(long, value_delimiter = ',', default_value = "llama-3-8b,deepseek-v3")]
    models: Vec<String>,
    /// GPU: skip the torch baselines.
    #[arg(long)]
    no_torch: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// `cpu` → None, `cuda` → Some(0), `cuda:N` → Some(N).
pub fn parse_device(s: &str) -> anyhow::Result<Option<usize>> {
    match s {
        "cpu" => Ok(None),
        "cuda" | "gpu" => Ok(Some(0)),
        _ => s
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .map(Some)
            .ok_or_else(|| anyhow::anyhow!("unknown device {s:?}: expected cpu, cuda or cuda:N")),
    }
}

#[derive(Serialize)]
struct Row {
    model: String,
    codec: String,
    tokens: usize,
    threads: usize,
    ms_per_step: f64,
    kv_bytes_per_s: f64,
    flops_per_s: f64,
    bandwidth_fraction: f64,
    peak_fraction: f64,
    /// Against the roofline: the lower of the read bandwidth and the peak over the kernel's
    /// flops per byte, both measured next to this row.
    roofline_fraction: f64,
    backend: String,
    /// Read bandwidth and multiply-add peak measured next to this row (see `run`): the
    /// fractions are against these, so a host whose capacity drifts during the run is
    /// compared with itself.
    adjacent_read_bandwidth_bytes_per_s: f64,
    adjacent_peak_flops_per_s: f64,
}

#[derive(Serialize)]
struct Report {
    backend: String,
    llc_bytes: u64,
    working_set_bytes: u64,
    read_bandwidth_bytes_per_s: f64,
    read_bandwidth_all_threads_bytes_per_s: f64,
    peaks: Vec<(String, f64)>,
    dot_peak_flops_per_s: f64,
    gqa_bytes_per_s: f64,
    gqa_bandwidth_fraction: f64,
    /// GQA bf16, longest context, one thread: kernel rate over the roofline measured next to it.
    gqa_roofline_fraction: f64,
    mla_flops_per_s: f64,
    mla_peak_fraction: f64,
    rows: Vec<Row>,
}

/// Pages for `copies` layers of `tokens` tokens, random values.
fn make_layers(layout: &PageLayout, tokens: usize, copies: usize) -> Vec<Vec<(Vec<u8>, usize)>> {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut rnd = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        ((x >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
    };
    // Encode one page's worth of values per distinct page; copies share the value pattern but are
    // distinct allocations, so every step reads fresh memory.
    let pt = layout.page_tokens;
    let full: Vec<f32> = (0..layout.planes * pt * layout.shape.width).map(|_| rnd()).collect();
    let full_page = layout.encode(&full, pt);
    (0..copies)
        .map(|_| {
            let mut pages = Vec::new();
            let mut left = tokens;
            while left > 0 {
                let n = left.min(pt);
                if n == pt {
                    pages.push((full_page.clone(), n));
                } else {
                    let vals: Vec<f32> = (0..layout.planes * n * layout.shape.width).map(|_| rnd()).collect();
                    pages.push((layout.encode(&vals, n), n));
                }
                left -= n;
            }
            pages
        })
        .collect()
}

/// Run `kvcache bench attention`.
pub fn run(args: Args) -> anyhow::Result<()> {
    if let Some(ordinal) = parse_device(&args.device)? {
        let codecs = args
            .codecs
            .iter()
            .map(|c| Codec::parse(c).ok_or_else(|| anyhow::anyhow!("unknown codec {c}")))
            .collect::<anyhow::Result<Vec<_>>>()?;
        return super::attention_gpu::run(ordinal, &codecs, &args.models, !args.no_torch, args.seconds, args.json);
    }
    // A named backend, or per shape the one the calibration measures fastest here.
    let forced = match &args.backend {
        Some(b) => Some(Backend::parse(b).ok_or_else(|| anyhow::anyhow!("unknown backend {b}"))?),
        None => None,
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let llc = super::llc_bytes();
    let ws = ((llc as f64 * args.llc_multiple) as u64).clamp(256 << 20, 3 << 30);
    eprintln!(
        "backend {}, {threads} threads, LLC {} MiB, working set {} MiB, {} queries",
        forced.map_or("calibrated per shape".to_string(), |b| b.to_string()),
        llc >> 20,
        ws >> 20,
        if args.f32_query { "f32" } else { "bf16-valued" }
    );

    let buf: Vec<u64> = (0..ws / 8).map(|i| i.wrapping_mul(0x9e37_79b9)).collect();
    let bw1 = peak::read_bandwidth(&buf, 1, 3);
    let bwn = peak::read_bandwidth(&buf, threads, 3);
    let peaks = peak::compute_peaks();
    let dot_peak = peaks.iter().map(|p| p.flops_per_s).fold(0.0, f64::max);
    let best_name = peaks.iter().max_by(|a, b| a.flops_per_s.total_cmp(&b.flops_per_s)).map_or("", |p| p.name);
    eprintln!("read bandwidth {:.1} GB/s (1 thread), {:.1} GB/s ({threads} threads)", bw1 / 1e9, bwn / 1e9);
    for p in &peaks {
        eprintln!("peak {:<14} {:.1} GFLOP/s", p.name, p.flops_per_s / 1e9);
    }

    let mut rows = Vec::new();
    for model in ["llama-3-8b", "deepseek-v3"] {
        let spec = ModelSpec::preset(model).expect("preset");
        for codec_name in &args.codecs {
            let codec = Codec::parse(codec_name).ok_or_else(|| anyhow::anyhow!("unknown codec {codec_name}"))?;
            for &tokens in &args.tokens {
                let layout = PageLayout::new(&spec, codec, 64);
                let shape = AttnShape::new(&spec, layout);
                let backend = match forced {
                    Some(b) => b,
                    None => {
                        let timed = kvcache_attention::calibrate::calibrate(&shape, !args.f32_query);
                        let list: Vec<String> = timed.iter().map(|(b, s)| format!("{b} {:.2} ms", s * 1e3)).collect();
                        eprintln!("{model} {}: calibration {}", codec.as_str(), list.join(", "));
                        kvcache_attention::calibrate::backend_for(&shape, !args.f32_query)
                    }
                };
                let layer_bytes = layout.payload_bytes(tokens) as u64;
                let copies = (ws / layer_bytes.max(1)).clamp(2, 512) as usize;
                let layers = make_layers(&layout, tokens, copies);
                let kvs: Vec<Vec<KvPage>> =
                    layers.iter().map(|l| l.iter().map(|(p, n)| KvPage { payload: p, tokens: *n }).collect()).collect();
                // Multiples of 1/8 are bf16 values; the f32 queries add a part below bf16 precision.
                let q: Vec<f32> = (0..shape.q_len())
                    .map(|i| ((i % 17) as f32 - 8.0) / 8.0 + if args.f32_query { (i % 5) as f32 * 1e-4 } else { 0.0 })
                    .collect();
                let mut out = vec![0f32; shape.out_len()];
                let mut lse = vec![0f32; shape.q_heads];
                let flops_per_token = 2.0 * shape.q_heads as f64 * (shape.qk_width + shape.v_width) as f64;
                for th in [1, threads] {
                    if th == threads
                        && th == 1
                        && rows.iter().any(|r: &Row| {
                            r.tokens == tokens && r.threads == 1 && r.model == model && r.codec == codec_name.as_str()
                        })
                    {
                        continue;
                    }
                    let opts = Options { backend, threads: th, min_split_tokens: 2048 };
                    // ROUNDS slices of the measurement, each right after a fresh baseline
                    // sample (one streaming pass, one peak loop): each fraction is the median
                    // of the slices' kernel rate over their adjacent baseline, so drift in what
                    // the shared host gives us cancels instead of landing on one side.
                    const ROUNDS: usize = 3;
                    let (mut steps, mut secs_total) = (0usize, 0.0f64);
                    let (mut bw_ratios, mut pk_ratios, mut bw_adj, mut pk_adj) = (vec![], vec![], vec![], vec![]);
                    let mut roof_ratios = vec![];
                    let flops_per_byte = flops_per_token / layout.token_bytes() as f64;
                    for _ in 0..ROUNDS {
                        let bw_now = peak::read_bandwidth(&buf, th, 1);
                        // The peak on `th` threads at once (on a shared host the second core
                        // is not a given).
                        let pk_now: f64 = std::thread::scope(|s| {
                            let hs: Vec<_> =
                                (0..th).map(|_| s.spawn(|| peak::measure(best_name).unwrap_or(dot_peak))).collect();
                            hs.into_iter().map(|h| h.join().expect("peak thread")).sum()
                        });
                        let (mut n, t) = (0usize, Instant::now());
                        while t.elapsed().as_secs_f64() < args.seconds / ROUNDS as f64 || n < 1 {
                            decode(&shape, &q, &kvs[(steps + n) % copies], &opts, &mut out, &mut lse)?;
                            n += 1;
                        }
                        let secs = t.elapsed().as_secs_f64();
                        bw_ratios.push(layer_bytes as f64 * n as f64 / secs / bw_now);
                        roof_ratios.push(layer_bytes as f64 * n as f64 / secs / bw_now.min(pk_now / flops_per_byte));
                        pk_ratios.push(flops_per_token * tokens as f64 * n as f64 / secs / pk_now);
                        bw_adj.push(bw_now);
                        pk_adj.push(pk_now);
                        steps += n;
                        secs_total += secs;
                    }
                    let secs = secs_total / steps as f64;
                    let bps = layer_bytes as f64 / secs;
                    let fps = flops_per_token * tokens as f64 / secs;
                    let row = Row {
                        model: model.into(),
                        codec: codec.as_str().into(),
                        tokens,
                        threads: th,
                        ms_per_step: secs * 1e3,
                        kv_bytes_per_s: bps,
                        flops_per_s: fps,
                        bandwidth_fraction: median(bw_ratios),
                        peak_fraction: median(pk_ratios),
                        roofline_fraction: median(roof_ratios),
                        backend: backend.to_string(),
                        adjacent_read_bandwidth_bytes_per_s: median(bw_adj),
                        adjacent_peak_flops_per_s: median(pk_adj),
                    };
                    eprintln!(
                        "{model:<12} {:<9} {tokens:>7} tok {th} thr: {:>8.3} ms/step {:>7.2} GB/s ({:>5.1}% of read bw {:.1}) {:>7.1} GFLOP/s ({:>5.1}% of peak {:.1})",
                        codec.as_str(),
                        row.ms_per_step,
                        bps / 1e9,
                        row.bandwidth_fraction * 100.0,
                        row.adjacent_read_bandwidth_bytes_per_s / 1e9,
                        fps / 1e9,
                        row.peak_fraction * 100.0,
                        row.adjacent_peak_flops_per_s / 1e9
                    );
                    rows.push(row);
                }
            }
        }
    }
    let pick = |model: &str| {
        rows.iter()
            .filter(|r| r.model == model && r.codec == "bf16" && r.threads == 1)
            .max_by(|a, b| a.tokens.cmp(&b.tokens))
    };
    let gqa = pick("llama-3-8b");
    let mla = pick("deepseek-v3");
    let gqa_bw = gqa.map_or(0.0, |r| r.adjacent_read_bandwidth_bytes_per_s);
    let mla_peak = mla.map_or(0.0, |r| r.adjacent_peak_flops_per_s);
    let report = Report {
        backend: forced.map_or("calibrated".to_string(), |b| b.to_string()),
        llc_bytes: llc,
        working_set_bytes: ws,
        read_bandwidth_bytes_per_s: bw1,
        read_bandwidth_all_threads_bytes_per_s: bwn,
        peaks: peaks.iter().map(|p| (p.name.to_string(), p.flops_per_s)).collect(),
        dot_peak_flops_per_s: dot_peak,
        gqa_bytes_per_s: gqa.map_or(0.0, |r| r.kv_bytes_per_s),
        gqa_bandwidth_fraction: gqa.map_or(0.0, |r| r.bandwidth_fraction),
        gqa_roofline_fraction: gqa.map_or(0.0, |r| r.roofline_fraction),
        mla_flops_per_s: mla.map_or(0.0, |r| r.flops_per_s),
        mla_peak_fraction: mla.map_or(0.0, |r| r.peak_fraction),
        rows,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "GQA (llama-3-8b bf16, longest context, 1 thread): {:.2} GB/s = {:.1}% of the read bandwidth measured next to it ({:.2} GB/s)",
            report.gqa_bytes_per_s / 1e9,
            report.gqa_bandwidth_fraction * 100.0,
            gqa_bw / 1e9
        );
        println!(
            "MLA (deepseek-v3 bf16, longest context, 1 thread): {:.1} GFLOP/s = {:.1}% of the best multiply-add peak measured next to it ({:.1} GFLOP/s)",
            report.mla_flops_per_s / 1e9,
            report.mla_peak_fraction * 100.0,
            mla_peak / 1e9
        );
    }
    Ok(())
}
