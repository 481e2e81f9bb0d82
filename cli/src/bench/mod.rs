//! `kvcache bench`: benchmarks that print ratios against baselines measured in the same run.

pub mod attention;
mod attention_gpu;
pub mod decode;
pub mod hybrid;
pub mod node;
pub mod placement;
pub mod prefix;
pub mod tenants;

/// Which benchmark.
#[derive(clap::Subcommand, Debug)]
pub enum Bench {
    /// Decode-attention kernels vs read bandwidth and the multiply-add peak.
    Attention(attention::Args),
    /// Weighted rendezvous placement over a simulated cluster.
    Placement(placement::Args),
    /// Decode through the worker vs the kernel alone (warm) and vs node get throughput (cold).
    Decode(decode::Args),
    /// Cache-node put/get over gRPC vs Redis and loopback TCP; recovery rate; index bytes.
    Node(node::Args),
    /// Prefix reuse: dedup of a shared prompt, longest-prefix match latency, cold pull of a
    /// cached prefix vs node get.
    Prefix(prefix::Args),
    /// What enforcing tenants costs: small calls and page reads with a tenants file vs open.
    Tenants(tenants::Args),
    /// Hybrid layer kinds: a sliding-window layer from 8K to 1M tokens vs a full layer; sparse
    /// MLA (DeepSeek-V3.2) vs dense MLA at 128K.
    Hybrid(hybrid::Args),
}

/// Run a benchmark.
pub fn run(b: Bench) -> anyhow::Result<()> {
    match b {
        Bench::Attention(a) => attention::run(a),
        Bench::Node(a) => node::run(a),
        Bench::Decode(a) => decode::run(a),
        Bench::Placement(a) => placement::run(a),
        Bench::Prefix(a) => prefix::run(a),
        Bench::Tenants(a) => tenants::run(a),
        Bench::Hybrid(a) => hybrid::run(a),
    }
}

/// The node-get baseline of the decode and prefix benches: `keys` read straight from the nodes
/// by 8 tasks of 16-page requests (as `bench node` reads). Returns bytes per second.
pub async fn node_get_rate(client: &kvcache_client::Client, keys: &[kvcache_core::PageKey]) -> anyhow::Result<f64> {
    let t = std::time::Instant::now();
    let mut tasks = Vec::new();
    for ch in keys.chunks(keys.len().div_ceil(8).max(1)) {
        let (c, ch) = (client.clone(), ch.to_vec());
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            for sub in ch.chunks(16) {
                for p in c.get_pages(sub).await?.into_iter().flatten() {
                    n += p.payload.len() as u64;
                }
            }
            Ok::<u64, kvcache_client::ClientError>(n)
        }));
    }
    let mut got = 0;
    for t in tasks {
        got += t.await??;
    }
    Ok(got as f64 / t.elapsed().as_secs_f64())
}

/// Last-level cache size from sysfs (index3, else the largest level found), in bytes.
/// The median of non-empty samples (the upper one of an even count).
/// What a process has used so far, from /proc (zeros where it cannot be read).
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcStat {
    /// CPU seconds, user + system (10 ms resolution).
    pub cpu_s: f64,
    /// Minor page faults (pages mapped in without I/O: first touches, zeroed or shared).
    pub minor_faults: u64,
}

/// [`ProcStat`] of process `pid`.
pub fn proc_stat(pid: u32) -> ProcStat {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return ProcStat::default() };
    // The fields after the command name (which may hold spaces and parentheses): state is
    // field 3, minflt 10, utime 14, stime 15.
    let Some(rest) = s.rsplit(')').next() else { return ProcStat::default() };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let tick = 100.0; // USER_HZ on Linux
    ProcStat { cpu_s: (num(11) + num(12)) as f64 / tick, minor_faults: num(7) }
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub fn llc_bytes() -> u64 {
    let mut best = 0;
    for i in 0..8 {
        let p = format!("/sys/devices/system/cpu/cpu0/cache/index{i}/size");
        if let Ok(s) = std::fs::read_to_string(p) {
            let s = s.trim();
            let (n, mult) = if let Some(k) = s.strip_suffix('K') {
                (k, 1u64 << 10)
            } else if let Some(m) = s.strip_suffix('M') {
                (m, 1 << 20)
            } else {
                (s, 1)
            };
            if let Ok(v) = n.parse::<u64>() {
                best = best.max(v * mult);
            }
        }
    }
    if best == 0 { 32 << 20 } else { best }
}
