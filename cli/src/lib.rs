//! Library side of the `kvcache` binary: pieces that the subcommands, benchmarks and
//! end-to-end tests share.
//!
//! - [`cluster`]: a whole local cluster (coordinator, cache nodes, worker) in one process on
//!   loopback ports — what `kvcache dev` and `kvcache demo` run.
//! - [`trace`]: Mooncake-format request traces, a generator, an exact LRU simulation of their
//!   prefix hits, and their replay against a cluster (`kvcache load --scenario trace`).
//! - [`synth`]: deterministic synthetic K/V and queries, and the float64 check of outputs.

pub mod cluster;
pub mod synth;
pub mod trace;
