//! `kvcache load`: load against a running cluster. Scenarios `prefill` (put a new sequence's
//! pages), `decode` (one decode step through the worker, appending a token), `mixed` (one
//! prefill per ten decodes). Closed loop (`--concurrency`) or open loop (`--rate`, latency
//! measured from each request's intended start, so a stalled server cannot hide its queueing:
//! coordinated omission corrected). Bounded by `--duration` and/or `--requests`.

use bytes::Bytes;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use kvcache_attention::AttnShape;
use kvcache_cli::synth::{Rng, prefill_pages, tokens_payload};
use kvcache_client::{Client, ClientError, SequenceStatus};
use kvcache_core::{Namespace, SequenceKey};
use kvcache_proto::v1 as pb;
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Scenario.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    /// Put a new sequence's pages.
    Prefill,
    /// A decode step through the worker.
    Decode,
    /// One prefill per ten decodes.
    Mixed,
    /// Replay a request trace (`--trace`): match, pull hits, put misses.
    Trace,
}

/// Flags of `kvcache load`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Coordinator address.
    #[arg(long, env = "KVCACHE_COORDINATOR", default_value = "127.0.0.1:7000", value_parser = crate::util::parse_addresses)]
    coordinator: String,
    #[command(flatten)]
    tls: kvcache_net::TlsArgs,
    /// What each request does.
    #[arg(long, value_enum, default_value = "decode")]
    scenario: Scenario,
    /// Closed loop: requests in flight at all times.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Open loop: requests per second (overrides --concurrency).
    #[arg(long)]
    rate: Option<f64>,
    /// Stop after this many seconds.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Stop after this many requests.
    #[arg(long)]
    requests: Option<u64>,
    /// Model preset of the load namespace.
    #[arg(long, default_value = "llama-3-8b")]
    preset: String,
    /// Codec (bf16, f16, fp8-e4m3, int8).
    #[arg(long, default_value = "bf16")]
    codec: String,
    /// Tokens per prefilled sequence.
    #[arg(long, default_value_t = 1024)]
    context: usize,
    /// Sequences decoded (prefilled before the measurement).
    #[arg(long, default_value_t = 16)]
    sequences: usize,
    /// Replication factor of the load namespace.
    #[arg(long, default_value_t = 1)]
    replication: u32,
    /// Trace to replay with `--scenario trace`: JSON lines in Mooncake's format (timestamp,
    /// input_length, output_length, hash_ids of 512-token blocks). `kvcache gen-trace` makes one.
    #[arg(long)]
    trace: Option<PathBuf>,
    /// Trace replay: also append each request's output tokens to a sequence of its own.
    #[arg(long)]
    append_output: bool,
    /// Explicit model dims instead of --preset (GQA): layers.
    #[arg(long, requires_all = ["q_heads", "kv_heads", "head_dim"])]
    layers: Option<u32>,
    /// Explicit model dims: query heads.
    #[arg(long)]
    q_heads: Option<u32>,
    /// Explicit model dims: K/V heads.
    #[arg(long)]
    kv_heads: Option<u32>,
    /// Explicit model dims: head dimension.
    #[arg(long)]
    head_dim: Option<u32>,
    /// Write the full report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Draw latency percentiles and throughput over time into this PNG.
    #[arg(long)]
    plot: Option<PathBuf>,
}

/// Per-second sample of the run.
#[derive(Serialize, Clone, Default)]
pub struct Second {
    /// Seconds since start.
    pub t: u64,
    /// Requests completed in this second.
    pub requests: u64,
    /// p50 latency (ms) of this second.
    pub p50_ms: f64,
    /// p99 latency (ms) of this second.
    pub p99_ms: f64,
}

/// The run's parameters, as given (so a report is read without the command line).
#[derive(Serialize)]
pub struct Parameters {
    scenario: Scenario,
    preset: String,
    codec: String,
    context_tokens: usize,
    sequences: usize,
    replication: u32,
    /// Closed loop: requests in flight (absent in open loop).
    concurrency: Option<usize>,
    /// Open loop: requests per second (absent in closed loop).
    rate_per_s: Option<f64>,
    duration_s: f64,
    /// The request limit, if one was set.
    max_requests: Option<u64>,
}

/// The load report.
#[derive(Serialize)]
pub struct Report {
    parameters: Parameters,
    scenario: Scenario,
    mode: String,
    seconds: f64,
    requests: u64,
    ok: u64,
    success_rate: f64,
    requests_per_s: f64,
    bytes_per_s: f64,
    errors: BTreeMap<String, u64>,
    latency_ms: BTreeMap<String, f64>,
    /// Throughput and latency over time.
    pub timeline: Vec<Second>,
}

struct Shared {
    client: Client,
    ns: Namespace,
    shape: AttnShape,
    decode_seqs: Vec<String>,
    next: AtomicU64,
    bytes: AtomicU64,
    ok: AtomicU64,
    errors: Mutex<BTreeMap<String, u64>>,
    hist: Mutex<Histogram<u64>>,
    per_sec: Mutex<Vec<Histogram<u64>>>,
    start: Instant,
    scenario: Scenario,
    context: usize,
    run: u64,
}

fn code(e: &ClientError) -> &'static str {
    match e {
        ClientError::Miss(_) => "MISS",
        ClientError::InvalidArgument(_) => "INVALID_ARGUMENT",
        ClientError::Unavailable { .. } => "UNAVAILABLE",
        ClientError::PermissionDenied(_) => "PERMISSION_DENIED",
        ClientError::NotFound(_) => "NOT_FOUND",
        ClientError::BadPage { .. } => "BAD_PAGE",
        ClientError::ResourceExhausted(_) => "RESOURCE_EXHAUSTED",
        ClientError::DataLoss(_) => "DATA_LOSS",
        ClientError::FailedPrecondition(_) => "FAILED_PRECONDITION",
        ClientError::Other { .. } => "OTHER",
    }
}

impl Shared {
    async fn one(&self, i: u64) -> Result<u64, &'static str> {
        let prefill = match self.scenario {
            Scenario::Prefill => true,
            Scenario::Decode => false,
            Scenario::Mixed => i % 11 == 10,
            Scenario::Trace => unreachable!("trace replays run in run_trace"),
        };
        let mut rng = Rng::new(i ^ (self.run << 32));
        if prefill {
            let key = SequenceKey::new(&self.ns.name, format!("load-{}-p{i}", self.run));
            let pages = prefill_pages(&self.ns, &key, 1, self.context, &mut rng);
            let n: u64 = pages.iter().map(|p| p.payload.len() as u64).sum();
            self.client.put_pages(pages).await.map_err(|e| code(&e))?;
            Ok(n)
        } else {
            let id = &self.decode_seqs[(i as usize) % self.decode_seqs.len()];
            let item = pb::DecodeItem {
                sequence_id: id.clone(),
                query: kvcache_proto::f32le::to_bytes(&rng.vec(self.shape.q_len(), 1.0)),
                new_kv: Bytes::from(tokens_payload(&self.ns, 1, &mut rng)),
                new_token_id: None,
                ..Default::default()
            };
            let r = self
                .client
                .decode(pb::DecodeRequest {
                    namespace: self.ns.name.clone(),
                    layer: 0,
                    items: vec![item],
                    softmax_scale: 0.0,
                    ..Default::default()
                })
                .await
                .map_err(|e| code(&e))?;
            let res = r.results.first().ok_or("EMPTY")?;
            match res.status {
                SequenceStatus::Ok => Ok(res.context_tokens * self.ns.layout().token_bytes() as u64),
                SequenceStatus::Miss => Err("MISS"),
                SequenceStatus::BadData => Err("BAD_DATA"),
                SequenceStatus::WriteFailed => Err("WRITE_FAILED"),
                SequenceStatus::Unknown(_) => Err("UNKNOWN_STATUS"),
            }
        }
    }

    fn record(&self, r: Result<u64, &'static str>, intended: Instant) {
        let lat = intended.elapsed().as_micros().max(1) as u64;
        match r {
            Ok(b) => {
                self.ok.fetch_add(1, Ordering::Relaxed);
                self.bytes.fetch_add(b, Ordering::Relaxed);
            }
            Err(c) => *self.errors.lock().expect("errors").entry(c.to_string()).or_default() += 1,
        }
        let _ = self.hist.lock().expect("hist").record(lat);
        let sec = intended.duration_since(self.start).as_secs() as usize;
        let mut ps = self.per_sec.lock().expect("per second");
        while ps.len() <= sec {
            ps.push(Histogram::new(3).expect("histogram"));
        }
        let _ = ps[sec].record(lat);
    }
}

/// The model of the load namespace: `--preset`, or the explicit dims (GQA) when given.
fn model_request(a: &Args, name: &str, codec: kvcache_core::Codec, page_tokens: u32) -> pb::CreateNamespaceRequest {
    let mut r = pb::CreateNamespaceRequest {
        name: name.into(),
        // No tenant named: on a cluster with tenants the coordinator makes it the caller's.
        codec: kvcache_core::validate::codec_to_wire(codec),
        page_tokens,
        replication: a.replication,
        ..Default::default()
    };
    match (a.layers, a.q_heads, a.kv_heads, a.head_dim) {
        (Some(l), Some(q), Some(kv), Some(d)) => {
            r.name = format!("{name}.l{l}q{q}kv{kv}d{d}");
            r.model = Some(pb::ModelSpec {
                name: format!("gqa-l{l}-q{q}-kv{kv}-d{d}"),
                attention: if kv == q {
                    pb::AttentionKind::Mha
                } else if kv == 1 {
                    pb::AttentionKind::Mqa
                } else {
                    pb::AttentionKind::Gqa
                } as i32,
                num_layers: l,
                num_q_heads: q,
                num_kv_heads: kv,
                head_dim: d,
                ..Default::default()
            });
        }
        _ => r.preset = a.preset.clone(),
    }
    r
}

/// The client of the cluster `--coordinator` names, and the `--codec` of the load namespace.
async fn connect(a: &Args) -> anyhow::Result<(Client, kvcache_core::Codec)> {
    let codec = kvcache_core::Codec::parse(&a.codec).ok_or_else(|| anyhow::anyhow!("unknown codec {}", a.codec))?;
    let tls = kvcache_net::Tls::load(&a.tls)?;
    let cfg = kvcache_client::ClientConfig { tls, ..Default::default() };
    Ok((kvcache_cli::cluster::connect(&a.coordinator, cfg).await?, codec))
}

/// `kvcache load --scenario trace`: replay a trace and compare its hit ratio with an exact LRU
/// simulation at the cluster's capacity.
fn run_trace(a: Args) -> anyhow::Result<()> {
    use kvcache_cli::trace;
    let path = a
        .trace
        .clone()
        .ok_or_else(|| anyhow::anyhow!("--scenario trace needs --trace FILE (make one with `kvcache gen-trace`)"))?;
    let text =
        std::fs::read_to_string(&path).map_err(|e| anyhow::anyhow!("cannot read trace {}: {e}", path.display()))?;
    let mut reqs = trace::parse(&text)?;
    if let Some(n) = a.requests {
        reqs.truncate(n as usize);
    }
    anyhow::ensure!(!reqs.is_empty(), "trace {} has no requests", path.display());
    tokio::runtime::Runtime::new()?.block_on(async move {
        let (client, codec) = connect(&a).await?;
        let base = if a.layers.is_some() { "trace".to_owned() } else { format!("trace.{}", a.preset) };
        let name = format!("{base}.{}.r{}", codec.as_str(), a.replication);
        let ns = client.create_namespace(model_request(&a, &name, codec, trace::BLOCK_TOKENS)).await?;
        let opts = trace::ReplayOptions { append_output: a.append_output, concurrency: 1 };
        let r = trace::replay(&client, &ns, &reqs, &opts).await?;
        println!(
            "trace replay: {} requests, {} prompt tokens in {:.1} s; hit ratio {:.3} (exact LRU at {} blocks {:.3}, no eviction {:.3}; {:.3}x LRU)",
            r.requests, r.prompt_tokens, r.seconds, r.hit_ratio, r.capacity_blocks, r.lru_hit_ratio, r.infinite_hit_ratio, r.vs_lru
        );
        println!(
            "pulled {:.1} MB, put {:.1} MB, {} pages deduplicated; match ms p50 {:.2} p99 {:.2}; request ms p50 {:.2} p99 {:.2}",
            r.bytes_pulled as f64 / 1e6,
            r.bytes_put as f64 / 1e6,
            r.pages_deduplicated,
            r.match_ms["p50"],
            r.match_ms["p99"],
            r.request_ms["p50"],
            r.request_ms["p99"]
        );
        if let Some(p) = &a.json {
            let mut v = serde_json::to_value(&r)?;
            v["parameters"] = serde_json::json!({
                "trace": path.display().to_string(),
                "namespace": ns.name,
                "model": ns.model.name,
                "codec": a.codec,
                "replication": a.replication,
                "append_output": a.append_output,
            });
            std::fs::write(p, serde_json::to_string_pretty(&v)?)?;
        }
        Ok(())
    })
}

/// Run `kvcache load`.
pub fn run(a: Args) -> anyhow::Result<()> {
    if a.scenario == Scenario::Trace {
        return run_trace(a);
    }
    anyhow::ensure!(a.duration > 0.0 || a.requests.is_some(), "give --duration and/or --requests");
    anyhow::ensure!(a.rate.is_none_or(|r| r > 0.0 && r.is_finite()), "--rate must be > 0");
    tokio::runtime::Runtime::new()?.block_on(async move {
        let (client, codec) = connect(&a).await?;
        let ns = client
            .create_namespace(model_request(
                &a,
                &format!("load.{}.{}.r{}", if a.layers.is_some() { "dims" } else { &a.preset }, codec.as_str(), a.replication),
                codec,
                64,
            ))
            .await?;
        let run = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
        let mut decode_seqs = Vec::new();
        if a.scenario != Scenario::Prefill {
            let mut rng = Rng::new(run);
            for i in 0..a.sequences.max(1) {
                let key = SequenceKey::new(&ns.name, format!("load-{run}-d{i}"));
                client.put_pages(prefill_pages(&ns, &key, 1, a.context, &mut rng)).await?;
                decode_seqs.push(key.sequence_id);
            }
        }
        let shared = Arc::new(Shared {
            shape: AttnShape::new(&ns.model, ns.layout()),
            client,
            ns,
            decode_seqs,
            next: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            ok: AtomicU64::new(0),
            errors: Mutex::new(BTreeMap::new()),
            hist: Mutex::new(Histogram::new(3)?),
            per_sec: Mutex::new(Vec::new()),
            start: Instant::now(),
            scenario: a.scenario,
            context: a.context,
            run,
        });
        let limit = a.requests.unwrap_or(u64::MAX);
        let deadline = shared.start + Duration::from_secs_f64(if a.duration > 0.0 { a.duration } else { 1e9 });
        let bar = if std::io::stderr().is_terminal() {
            let b = match a.requests {
                Some(n) => ProgressBar::new(n),
                None => ProgressBar::new((a.duration * 10.0) as u64),
            };
            b.set_style(
                ProgressStyle::with_template("{spinner} {elapsed_precise} [{bar:30}] {msg}").expect("template"),
            );
            b
        } else {
            ProgressBar::hidden()
        };
        let ticker = {
            let (s, bar) = (shared.clone(), bar.clone());
            let by_requests = a.requests.is_some();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    let done = s.hist.lock().expect("hist").len();
                    if by_requests {
                        bar.set_position(done);
                    } else {
                        bar.set_position((s.start.elapsed().as_secs_f64() * 10.0) as u64);
                    }
                    bar.set_message(format!("{done} requests, {} ok", s.ok.load(Ordering::Relaxed)));
                }
            })
        };
        let mode;
        if let Some(rate) = a.rate {
            mode = format!("open loop, {rate} req/s");
            let interval = Duration::from_secs_f64(1.0 / rate);
            let mut tasks = tokio::task::JoinSet::new();
            let mut i = 0u64;
            loop {
                let intended = shared.start + interval.mul_f64(i as f64);
                if i >= limit || intended >= deadline {
                    break;
                }
                tokio::time::sleep_until(intended.into()).await;
                let s = shared.clone();
                tasks.spawn(async move {
                    let r = s.one(i).await;
                    s.record(r, intended);
                });
                i += 1;
                while let Some(r) = tasks.try_join_next() {
                    r?;
                }
            }
            while let Some(r) = tasks.join_next().await {
                r?;
            }
        } else {
            mode = format!("closed loop, {} in flight", a.concurrency);
            let mut tasks = Vec::new();
            for _ in 0..a.concurrency.max(1) {
                let s = shared.clone();
                tasks.push(tokio::spawn(async move {
                    loop {
                        let i = s.next.fetch_add(1, Ordering::Relaxed);
                        if i >= limit || Instant::now() >= deadline {
                            break;
                        }
                        let t = Instant::now();
                        let r = s.one(i).await;
                        s.record(r, t);
                    }
                }));
            }
            for t in tasks {
                t.await?;
            }
        }
        ticker.abort();
        bar.finish_and_clear();
        let secs = shared.start.elapsed().as_secs_f64();
        let h = shared.hist.lock().expect("hist").clone();
        let requests = h.len();
        let ok = shared.ok.load(Ordering::Relaxed);
        let ms = |q: f64| h.value_at_quantile(q) as f64 / 1e3;
        let latency: BTreeMap<String, f64> = [
            ("min", h.min() as f64 / 1e3),
            ("p50", ms(0.5)),
            ("p90", ms(0.9)),
            ("p99", ms(0.99)),
            ("p99.9", ms(0.999)),
            ("max", h.max() as f64 / 1e3),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let timeline = shared
            .per_sec
            .lock()
            .expect("per second")
            .iter()
            .enumerate()
            .map(|(t, h)| Second {
                t: t as u64,
                requests: h.len(),
                p50_ms: h.value_at_quantile(0.5) as f64 / 1e3,
                p99_ms: h.value_at_quantile(0.99) as f64 / 1e3,
            })
            .collect();
        let report = Report {
            parameters: Parameters {
                scenario: a.scenario,
                preset: a.preset.clone(),
                codec: a.codec.clone(),
                context_tokens: a.context,
                sequences: a.sequences,
                replication: a.replication,
                concurrency: a.rate.is_none().then_some(a.concurrency),
                rate_per_s: a.rate,
                duration_s: a.duration,
                max_requests: a.requests,
            },
            scenario: a.scenario,
            mode,
            seconds: secs,
            requests,
            ok,
            success_rate: if requests == 0 { 0.0 } else { ok as f64 / requests as f64 },
            requests_per_s: requests as f64 / secs,
            bytes_per_s: shared.bytes.load(Ordering::Relaxed) as f64 / secs,
            errors: shared.errors.lock().expect("errors").clone(),
            latency_ms: latency,
            timeline,
        };
        println!(
            "{:?} ({}): {} requests in {:.1} s = {:.1} req/s, {:.1} MB/s ({}), success {:.2}%",
            report.scenario,
            report.mode,
            report.requests,
            report.seconds,
            report.requests_per_s,
            report.bytes_per_s / 1e6,
            if a.scenario == Scenario::Prefill { "payload put" } else { "KV attended" },
            report.success_rate * 100.0
        );
        println!(
            "latency ms: min {:.2}  p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}",
            report.latency_ms["min"],
            report.latency_ms["p50"],
            report.latency_ms["p90"],
            report.latency_ms["p99"],
            report.latency_ms["p99.9"],
            report.latency_ms["max"]
        );
        if !report.errors.is_empty() {
            println!(
                "errors: {}",
                report.errors.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", ")
            );
        }
        if let Some(p) = &a.json {
            std::fs::write(p, serde_json::to_string_pretty(&report)?)?;
        }
        if let Some(p) = &a.plot {
            let title = format!(
                "kvcache load: {:?}, {} {}, {}",
                a.scenario, a.preset, a.codec, report.mode
            )
            .to_lowercase();
            let subtitle = format!(
                "{} tokens of context, {} sequences; {} requests in {:.1} s, p50 {:.2} ms, p99 {:.2} ms, success {:.1}%",
                a.context,
                a.sequences,
                report.requests,
                report.seconds,
                report.latency_ms["p50"],
                report.latency_ms["p99"],
                report.success_rate * 100.0
            );
            crate::plot::draw(&report.timeline, &title, &subtitle, p)?;
        }
        Ok(())
    })
}
