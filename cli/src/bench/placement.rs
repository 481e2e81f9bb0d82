//! `kvcache bench placement`: weighted rendezvous placement over a simulated cluster — lookup
//! time, load balance, movement on a join and a leave, and the shard map's wire size.

use kvcache_core::placement::{Candidate, PlacementIndex, place};
use kvcache_proto::v1 as pb;
use prost::Message;
use serde::Serialize;
use std::time::Instant;

/// Flags of `kvcache bench placement`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Simulated nodes.
    #[arg(long, default_value_t = 1000)]
    nodes: usize,
    /// Simulated sequences (placed once each for balance and movement).
    #[arg(long, default_value_t = 10_000_000)]
    sequences: usize,
    /// Replication factor for the lookup timing.
    #[arg(long, default_value_t = 1)]
    replicas: usize,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Report {
    nodes: usize,
    sequences: usize,
    lookup_ns: f64,
    /// The same lookups through the plain full computation (a log per node), measured in this run.
    baseline_lookup_ns: f64,
    speedup_over_baseline: f64,
    max_over_mean_load: f64,
    moved_fraction_on_join: f64,
    moved_fraction_on_leave: f64,
    ideal_fraction: f64,
    shard_map_bytes: usize,
}

fn key_hash(i: usize) -> u64 {
    xxhash_rust_like(i as u64)
}

/// A cheap 64-bit mix (splitmix64) standing in for the sequence-key hash.
fn xxhash_rust_like(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Run `kvcache bench placement`.
pub fn run(a: Args) -> anyhow::Result<()> {
    // Capacities vary 1–4 TiB so weights matter.
    let nodes: Vec<Candidate> = (0..a.nodes)
        .map(|i| Candidate::new(format!("node-{i:04}"), (1 + i % 4) as f64, format!("z{}", i % 3)))
        .collect();
    let total_w: f64 = nodes.iter().map(|n| n.weight).sum();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    // Owners before, after a join, after a leave (in parallel chunks).
    let mut joined = nodes.clone();
    joined.push(Candidate::new("node-new", 2.0, "z0"));
    let mut left = nodes.clone();
    left[7].weight = 0.0;
    let chunk = a.sequences.div_ceil(threads);
    let (idx_nodes, idx_joined, idx_left) =
        (PlacementIndex::new(&nodes), PlacementIndex::new(&joined), PlacementIndex::new(&left));
    let parts: Vec<(Vec<u64>, u64, u64)> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|t| {
                let (nodes, joined, left) = (&idx_nodes, &idx_joined, &idx_left);
                s.spawn(move || {
                    let mut load = vec![0u64; nodes.nodes().len()];
                    let (mut mj, mut ml) = (0, 0);
                    for i in (t * chunk)..((t + 1) * chunk).min(a.sequences) {
                        let h = key_hash(i);
                        let o = nodes.place(h, 1)[0];
                        load[o] += 1;
                        if joined.place(h, 1)[0] != o {
                            mj += 1;
                        }
                        if left.place(h, 1)[0] != o {
                            ml += 1;
                        }
                    }
                    (load, mj, ml)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("placement thread")).collect()
    });
    let mut load = vec![0u64; nodes.len()];
    let (mut mj, mut ml) = (0u64, 0u64);
    for (l, j, m) in parts {
        for (a, b) in load.iter_mut().zip(l) {
            *a += b;
        }
        mj += j;
        ml += m;
    }
    // Balance relative to each node's weight share.
    let max_over_mean =
        load.iter().zip(&nodes).map(|(&l, n)| l as f64 / (a.sequences as f64 * n.weight / total_w)).fold(0.0, f64::max);
    // Lookup time, one thread.
    let index = PlacementIndex::new(&nodes);
    let n = 200_000;
    let t = Instant::now();
    let mut sink = 0usize;
    for i in 0..n {
        sink ^= index.place(key_hash(i + 12345), a.replicas)[0];
    }
    std::hint::black_box(sink);
    let lookup_ns = t.elapsed().as_nanos() as f64 / n as f64;
    let nb = 20_000;
    let t = Instant::now();
    for i in 0..nb {
        sink ^= place(key_hash(i + 12345), &nodes, a.replicas)[0];
    }
    std::hint::black_box(sink);
    let baseline_lookup_ns = t.elapsed().as_nanos() as f64 / nb as f64;
    let map = pb::ShardMap {
        epoch: 1,
        nodes: nodes
            .iter()
            .map(|c| pb::ShardNode {
                node: Some(pb::NodeInfo {
                    node_id: c.node_id.clone(),
                    address: format!("{}.kvcache-node.kvcache.svc:7070", c.node_id),
                    capacity_bytes: (c.weight as u64) << 40,
                    zone: c.zone.clone(),
                    labels: Default::default(),
                }),
                state: pb::NodeState::Up as i32,
                weight: c.weight,
            })
            .collect(),
        namespaces: vec![],
        workers: vec![],
    };
    // The index must agree with the full computation.
    for i in 0..2000 {
        anyhow::ensure!(
            index.place(key_hash(i), a.replicas) == place(key_hash(i), &nodes, a.replicas),
            "index disagrees with rendezvous"
        );
    }
    let r = Report {
        nodes: a.nodes,
        sequences: a.sequences,
        lookup_ns,
        baseline_lookup_ns,
        speedup_over_baseline: baseline_lookup_ns / lookup_ns,
        max_over_mean_load: max_over_mean,
        moved_fraction_on_join: mj as f64 / a.sequences as f64,
        moved_fraction_on_leave: ml as f64 / a.sequences as f64,
        ideal_fraction: 2.0 / (total_w + 2.0),
        shard_map_bytes: map.encoded_len(),
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!(
            "{} nodes, {} sequences: lookup {:.0} ns (R={}; {:.1}x the full computation's {:.0} ns), max/mean load {:.3}, moved on join {:.4}% (the new node's weight share {:.4}%), on leave {:.4}% (the leaver's share {:.4}%), shard map {} B",
            r.nodes,
            r.sequences,
            r.lookup_ns,
            a.replicas,
            r.speedup_over_baseline,
            r.baseline_lookup_ns,
            r.max_over_mean_load,
            r.moved_fraction_on_join * 100.0,
            r.ideal_fraction * 100.0,
            r.moved_fraction_on_leave * 100.0,
            nodes[7].weight / total_w * 100.0,
            r.shard_map_bytes
        );
    }
    Ok(())
}
