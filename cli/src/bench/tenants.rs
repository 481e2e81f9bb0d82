//! `kvcache bench tenants`: what enforcing tenants costs. Two local one-node clusters in this
//! process, one open and one with a tenants file of `--tenants` entries, each holding the same
//! pages; the same client work against each, alternated round by round: small calls (Lookup,
//! where the per-call check weighs most) per second, and page reads (bytes per second, where
//! the per-page namespace check and byte accounting run). Reports each ratio (with tenants ÷
//! open; 1.0 = free) as the median over rounds.

use kvcache_cli::cluster::{LocalCluster, LocalClusterConfig};
use kvcache_cli::synth::{Rng, prefill_pages};
use kvcache_client::{Client, ClientConfig};
use kvcache_core::{PageKey, SequenceKey};
use kvcache_proto::v1 as pb;
use serde::Serialize;
use std::time::{Duration, Instant};

/// Flags of `kvcache bench tenants`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Tenants in the file (the caller is one of them; the lookup is by token digest).
    #[arg(long, default_value_t = 1000)]
    tenants: usize,
    /// Rounds (each: both clusters, in alternating order).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Seconds of each small-call measurement.
    #[arg(long, default_value_t = 1.0)]
    seconds: f64,
    /// Concurrent callers.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Report {
    tenants: usize,
    rounds: usize,
    lookups_per_s_open: f64,
    lookups_per_s_tenants: f64,
    lookup_ratio: f64,
    get_bytes_per_s_open: f64,
    get_bytes_per_s_tenants: f64,
    get_ratio: f64,
}

struct Side {
    cluster: LocalCluster,
    client: Client,
    keys: Vec<PageKey>,
    seqs: Vec<SequenceKey>,
}

async fn side(dir: &std::path::Path, auth: kvcache_net::Auth, token: Option<String>) -> anyhow::Result<Side> {
    let mut cfg = LocalClusterConfig::new(dir);
    cfg.nodes = 1;
    cfg.node_capacity = 512 << 20;
    cfg.auth = auth;
    let cluster = LocalCluster::start(cfg).await?;
    let client = Client::connect_with(&cluster.coordinator, ClientConfig { token, ..Default::default() }).await?;
    let ns = client
        .create_namespace(pb::CreateNamespaceRequest {
            name: "bench.tenants".into(),
            preset: "llama-3-8b".into(),
            page_tokens: 16,
            ..Default::default()
        })
        .await?;
    // 64 sequences × 4 layers × 4 pages of 64 KiB (llama-3-8b: 2 KiB per token and layer).
    let mut rng = Rng::new(11);
    let (mut keys, mut seqs) = (Vec::new(), Vec::new());
    for i in 0..64 {
        let s = SequenceKey::new("bench.tenants", format!("s{i}"));
        client.put_pages(prefill_pages(&ns, &s, 4, 64, &mut rng)).await?;
        for layer in 0..4 {
            keys.extend((0..4).map(|p| PageKey { sequence: s.clone(), layer, page_index: p }));
        }
        seqs.push(s);
    }
    Ok(Side { cluster, client, keys, seqs })
}

/// Lookups per second by `n` concurrent callers for `secs`.
async fn lookups(s: &Side, n: usize, secs: f64) -> anyhow::Result<f64> {
    let until = Instant::now() + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for t in 0..n {
        let (c, seqs) = (s.client.clone(), s.seqs.clone());
        tasks.push(tokio::spawn(async move {
            let mut k = 0u64;
            while Instant::now() < until {
                c.lookup(&seqs[(k as usize + t) % seqs.len()], vec![]).await?;
                k += 1;
            }
            Ok::<u64, kvcache_client::ClientError>(k)
        }));
    }
    let t0 = Instant::now();
    let mut calls = 0;
    for t in tasks {
        calls += t.await??;
    }
    Ok(calls as f64 / t0.elapsed().as_secs_f64())
}

/// Run `kvcache bench tenants`.
pub fn run(a: Args) -> anyhow::Result<()> {
    anyhow::ensure!(a.tenants >= 1 && a.rounds >= 1, "--tenants and --rounds must be at least 1");
    tokio::runtime::Runtime::new()?.block_on(async move {
        let dir = tempfile::tempdir()?;
        let mut file = String::new();
        for i in 0..a.tenants {
            let h = hex::encode(kvcache_net::auth::token_sha256(&format!("bench-token-{i}")));
            file.push_str(&format!("[tenants.t{i}]\ntoken_sha256 = \"{h}\"\nquota = \"64GiB\"\n"));
        }
        let open = side(&dir.path().join("open"), kvcache_net::Auth::open(), None).await?;
        let auth = kvcache_net::Auth::from_toml(&file)?;
        let me = format!("bench-token-{}", a.tenants / 2);
        let with = side(&dir.path().join("tenants"), auth, Some(me)).await?;
        let (mut lo, mut lt, mut go, mut gt) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for r in 0..a.rounds {
            // Alternate which side goes first, so drift in the machine's speed falls on both.
            let order: [&Side; 2] = if r % 2 == 0 { [&open, &with] } else { [&with, &open] };
            for s in order {
                let l = lookups(s, a.concurrency, a.seconds).await?;
                let g = super::node_get_rate(&s.client, &s.keys).await?;
                if std::ptr::eq(s, &open) {
                    lo.push(l);
                    go.push(g);
                } else {
                    lt.push(l);
                    gt.push(g);
                }
            }
        }
        let ratio = |t: &[f64], o: &[f64]| super::median(t.iter().zip(o).map(|(t, o)| t / o).collect());
        let rep = Report {
            tenants: a.tenants,
            rounds: a.rounds,
            lookups_per_s_open: super::median(lo.clone()),
            lookups_per_s_tenants: super::median(lt.clone()),
            lookup_ratio: ratio(&lt, &lo),
            get_bytes_per_s_open: super::median(go.clone()),
            get_bytes_per_s_tenants: super::median(gt.clone()),
            get_ratio: ratio(&gt, &go),
        };
        if a.json {
            println!("{}", serde_json::to_string_pretty(&rep)?);
        } else {
            println!("tenants in the file: {} ({} rounds, medians)", rep.tenants, rep.rounds);
            println!(
                "lookups/s   open {:>10.0}   tenants {:>10.0}   ratio {:.3}",
                rep.lookups_per_s_open, rep.lookups_per_s_tenants, rep.lookup_ratio
            );
            println!(
                "get GB/s    open {:>10.2}   tenants {:>10.2}   ratio {:.3}",
                rep.get_bytes_per_s_open / 1e9,
                rep.get_bytes_per_s_tenants / 1e9,
                rep.get_ratio
            );
        }
        open.cluster.stop().await?;
        with.cluster.stop().await?;
        Ok(())
    })
}
