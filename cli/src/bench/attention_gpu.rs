//! `kvcache bench attention --device cuda`: the GPU kernels on the decode shapes of Llama-3-8B
//! (GQA) and DeepSeek-V3 (absorbed MLA), batch × tokens of 1 × 128K, 8 × 32K, 64 × 4K and
//! 128 × 8K, bf16 and fp8, against two baselines measured in the same run — the HBM read
//! bandwidth (a streaming-read kernel) for GQA and the bf16 tensor-core rate (a cuBLAS GEMM) for
//! MLA — and, when `python3` has torch with CUDA, against torch's SDPA (GQA) and bmm + softmax
//! (MLA) on the same shapes, also in the same run.

use kvcache_attention::AttnShape;
use kvcache_attention::gpu::{DevicePages, DeviceRef, Gpu, GpuItem, Query};
use kvcache_core::{Codec, ModelSpec, PageLayout};
use serde::Serialize;
use std::time::Instant;

/// The four decode shapes (batch, tokens per sequence).
pub const SHAPES: [(usize, usize); 4] = [(1, 131_072), (8, 32_768), (64, 4096), (128, 8192)];

#[derive(Serialize)]
struct Row {
    model: String,
    codec: String,
    batch: usize,
    tokens: usize,
    kernel: String,
    work_items: usize,
    ms_per_step: f64,
    tokens_per_s: f64,
    kv_bytes_per_s: f64,
    hbm_fraction: f64,
    flops_per_s: f64,
    tensor_peak_fraction: f64,
    torch_ms_per_step: Option<f64>,
    speedup_vs_torch: Option<f64>,
}

#[derive(Serialize)]
struct Report {
    device: String,
    hbm_read_bytes_per_s: f64,
    bf16_gemm_flops_per_s: Option<f64>,
    torch: Option<String>,
    rows: Vec<Row>,
}

const TORCH: &str = r#"
import json, sys, time
import torch
cfg = json.loads(sys.argv[1])
dev = 'cuda'
bf = torch.bfloat16
def bench(fn, secs):
    for _ in range(3): fn()
    torch.cuda.synchronize()
    n, t = 0, time.perf_counter()
    while True:
        fn(); n += 1
        if n % 5 == 0:
            torch.cuda.synchronize()
            if time.perf_counter() - t > secs: break
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n
out = {'torch': torch.__version__ + ' on ' + torch.cuda.get_device_name(0), 'rows': []}
for c in cfg['shapes']:
    b, T = c['batch'], c['tokens']
    torch.manual_seed(0)
    if c['model'] == 'gqa':
        q = torch.randn(b, 32, 1, 128, device=dev, dtype=bf)
        k = torch.randn(b, 8, T, 128, device=dev, dtype=bf)
        v = torch.randn(b, 8, T, 128, device=dev, dtype=bf)
        f = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    else:
        q = torch.randn(b, 128, 576, device=dev, dtype=bf)
        kv = torch.randn(b, T, 576, device=dev, dtype=bf)
        def f():
            s = torch.bmm(q, kv.transpose(1, 2)) * 0.1352
            p = torch.softmax(s.float(), dim=-1).to(bf)
            return torch.bmm(p, kv[:, :, :512])
    ms = bench(f, cfg['seconds']) * 1e3
    out['rows'].append({'model': c['model'], 'batch': b, 'tokens': T, 'ms': ms})
    del q
    torch.cuda.empty_cache()
print(json.dumps(out))
"#;

/// (model tag, batch, tokens, torch's ms per step).
type TorchRow = (String, usize, usize, f64);

/// Torch's time per step for each (model, batch, tokens), when python3 has torch with CUDA.
fn torch_baselines(seconds: f64) -> Option<(String, Vec<TorchRow>)> {
    let mut shapes = Vec::new();
    for m in ["gqa", "mla"] {
        for (b, t) in SHAPES {
            shapes.push(serde_json::json!({"model": m, "batch": b, "tokens": t}));
        }
    }
    let cfg = serde_json::json!({"shapes": shapes, "seconds": seconds}).to_string();
    let out = std::process::Command::new("python3").arg("-c").arg(TORCH).arg(cfg).output().ok()?;
    if !out.status.success() {
        eprintln!("torch baseline not run: {}", String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or(""));
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let rows = v["rows"]
        .as_array()?
        .iter()
        .filter_map(|r| {
            Some((
                r["model"].as_str()?.to_string(),
                r["batch"].as_u64()? as usize,
                r["tokens"].as_u64()? as usize,
                r["ms"].as_f64()?,
            ))
        })
        .collect();
    Some((v["torch"].as_str().unwrap_or("torch").to_string(), rows))
}

/// One encoded full page of random values.
fn random_page(layout: &PageLayout, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let vals: Vec<f32> = (0..layout.planes * layout.page_tokens * layout.shape.width)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
        })
        .collect();
    layout.encode(&vals, layout.page_tokens)
}

/// Time `plan` launches for about `seconds`; seconds per step.
fn time_steps(gpu: &Gpu, plans: &mut [kvcache_attention::gpu::Plan], seconds: f64) -> anyhow::Result<f64> {
    for p in plans.iter_mut() {
        gpu.launch(p)?;
    }
    gpu.synchronize()?;
    let (mut n, t) = (0usize, Instant::now());
    loop {
        let i = n % plans.len();
        gpu.launch(&mut plans[i])?;
        n += 1;
        if n.is_multiple_of(8) {
            gpu.synchronize()?;
            if t.elapsed().as_secs_f64() > seconds {
                break;
            }
        }
    }
    gpu.synchronize()?;
    Ok(t.elapsed().as_secs_f64() / n as f64)
}

/// Run the GPU attention bench on device `ordinal`.
pub fn run(
    ordinal: usize,
    codecs: &[Codec],
    models: &[String],
    torch: bool,
    seconds: f64,
    json: bool,
) -> anyhow::Result<()> {
    let gpu = Gpu::open(ordinal)?;
    eprintln!("device {}", gpu.describe());
    let hbm = gpu.read_bandwidth(4 << 30, 5)?;
    eprintln!("HBM read {:.0} GB/s (streaming read of 4 GiB, best of 5)", hbm / 1e9);
    let gemm = match gpu.gemm_peak(8192, 5) {
        Ok(f) => {
            eprintln!("bf16 GEMM 8192³ (cuBLAS) {:.0} TFLOP/s", f / 1e12);
            Some(f)
        }
        Err(e) => {
            eprintln!("no tensor-core baseline: {e}");
            None
        }
    };
    let torch = if torch { torch_baselines(seconds.min(1.0)) } else { None };
    if let Some((v, _)) = &torch {
        eprintln!("torch baseline: {v}");
    }
    let mut rows = Vec::new();
    for (model, tag) in [("llama-3-8b", "gqa"), ("deepseek-v3", "mla")] {
        if !models.iter().any(|m| m == model) {
            continue;
        }
        let spec = ModelSpec::preset(model).expect("preset");
        for &codec in codecs {
            let layout = PageLayout::new(&spec, codec, 64);
            let shape = AttnShape::new(&spec, layout);
            let page = random_page(&layout, 0x2545_f491_4f6c_dd1d);
            for (batch, tokens) in SHAPES {
                let pages_per_seq = tokens.div_ceil(64);
                let bytes = batch * layout.payload_bytes(tokens);
                // Copies of the batch so that the working set is at least 1 GiB (≫ the L2).
                let copies = (1usize << 30).div_ceil(bytes).clamp(1, 8);
                let mem: Vec<DevicePages> = (0..copies)
                    .map(|_| gpu.alloc_pages(&layout, batch * pages_per_seq, &page))
                    .collect::<Result<_, _>>()?;
                let refs: Vec<Vec<DeviceRef>> = mem.iter().map(|m| m.pages()).collect();
                let q: Vec<f32> = (0..batch * shape.q_len()).map(|i| ((i % 17) as f32 - 8.0) / 8.0).collect();
                let mut plans = Vec::new();
                for r in &refs {
                    let items: Vec<GpuItem> = (0..batch)
                        .map(|b| GpuItem {
                            q: Query::F32(&q[b * shape.q_len()..(b + 1) * shape.q_len()]),
                            pages: &r[b * pages_per_seq..(b + 1) * pages_per_seq],
                            skip: 0,
                        })
                        .collect();
                    plans.push(gpu.plan(&shape, &items)?);
                }
                let secs = time_steps(&gpu, &mut plans, seconds)?;
                let res = gpu.results(&plans[0])?;
                if let Some(Err(e)) = res.status.iter().find(|s| s.is_err()) {
                    anyhow::bail!("{model} {codec:?}: {e}");
                }
                let flops =
                    2.0 * shape.q_heads as f64 * (shape.qk_width + shape.v_width) as f64 * (batch * tokens) as f64;
                let torch_ms = torch
                    .as_ref()
                    .and_then(|(_, rs)| rs.iter().find(|r| r.0 == tag && r.1 == batch && r.2 == tokens).map(|r| r.3));
                let row = Row {
                    model: model.into(),
                    codec: codec.as_str().into(),
                    batch,
                    tokens,
                    kernel: plans[0].kernel_name().into(),
                    work_items: plans[0].work_items(),
                    ms_per_step: secs * 1e3,
                    tokens_per_s: (batch * tokens) as f64 / secs,
                    kv_bytes_per_s: bytes as f64 / secs,
                    hbm_fraction: bytes as f64 / secs / hbm,
                    flops_per_s: flops / secs,
                    tensor_peak_fraction: gemm.map_or(0.0, |g| flops / secs / g),
                    torch_ms_per_step: torch_ms.filter(|_| codec == Codec::Bf16),
                    speedup_vs_torch: torch_ms.filter(|_| codec == Codec::Bf16).map(|t| t / (secs * 1e3)),
                };
                eprintln!(
                    "{model:<12} {:<8} {batch:>3} × {tokens:>6}: {:>8.3} ms  {:>6.0} GB/s ({:>5.1}% HBM)  {:>6.1} TFLOP/s ({:>5.1}% of GEMM){}",
                    row.codec,
                    row.ms_per_step,
                    row.kv_bytes_per_s / 1e9,
                    row.hbm_fraction * 100.0,
                    row.flops_per_s / 1e12,
                    row.tensor_peak_fraction * 100.0,
                    row.torch_ms_per_step
                        .map(|t| format!("  torch {t:.3} ms ({:.2}×)", t / row.ms_per_step))
                        .unwrap_or_default()
                );
                rows.push(row);
            }
        }
    }
    let report = Report {
        device: gpu.describe(),
        hbm_read_bytes_per_s: hbm,
        bf16_gemm_flops_per_s: gemm,
        torch: torch.map(|t| t.0),
        rows,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    Ok(())
}
