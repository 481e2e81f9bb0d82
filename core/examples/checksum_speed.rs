//! CRC-32C throughput of `kvcache_core::checksum` against the `crc32c` crate (its previous
//! implementation), on page-sized buffers, alternated in one run.
//!
//! `cargo run --release -p kvcache-core --example checksum_speed`

use std::hint::black_box;
use std::time::Instant;

fn main() {
    println!("{:>9} {:>14} {:>14} {:>7}", "bytes", "kvcache GB/s", "crc32c GB/s", "ratio");
    for &n in &[124usize, 4096, 65_536, 262_144, 1 << 20] {
        let buf: Vec<u8> = (0..n).map(|i| (i * 31 + 7) as u8).collect();
        assert_eq!(kvcache_core::checksum::crc32c(&buf), crc32c::crc32c(&buf));
        let iters = ((1u64 << 30) / n as u64).max(1);
        let (mut ours, mut theirs) = (f64::MAX, f64::MAX);
        for _ in 0..3 {
            let t = Instant::now();
            for _ in 0..iters {
                black_box(kvcache_core::checksum::crc32c(black_box(&buf)));
            }
            ours = ours.min(t.elapsed().as_secs_f64());
            let t = Instant::now();
            for _ in 0..iters {
                black_box(crc32c::crc32c(black_box(&buf)));
            }
            theirs = theirs.min(t.elapsed().as_secs_f64());
        }
        let gb = (iters * n as u64) as f64 / 1e9;
        println!("{n:>9} {:>14.1} {:>14.1} {:>6.2}x", gb / ours, gb / theirs, theirs / ours);
    }
}
