//! Library side of the `kvcache` binary: pieces that the subcommands, benchmarks and
//! end-to-end tests share.
//!
//! - [`cluster`]: a whole local cluster (coordinator, cache nodes, worker) in one process on
//!   loopback ports — what `kvcache dev` and `kvcache demo` run.
//! - [`synth`]: deterministic synthetic K/V and queries, and the float64 check of outputs.

pub mod cluster;
pub mod synth;
