//! The `kvcache` binary: parses flags and calls into the library crates. Subcommands:
//! - `models`: footprint table of the model presets.
//! - `node`: a cache node.
//! - `bench`: benchmarks.

mod bench;
mod models;
mod node;
mod util;

use clap::{Parser, Subcommand};

/// kvcache: a distributed, sharded KV-cache service for LLM inference.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the KV-cache footprint of every model preset, per codec.
    Models(models::Args),
    /// Run a cache node.
    Node(node::Args),
    /// Benchmarks (ratios against baselines measured in the same run).
    #[command(subcommand)]
    Bench(bench::Bench),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Models(a) => models::run(a),
        Command::Node(a) => node::run(a),
        Command::Bench(b) => bench::run(b),
    }
}
