//! The `kvcache` binary: parses flags and calls into the library crates. Subcommands:
//! - `demo`: the main job (local cluster, prefill, decode, the cost table).
//! - `load`: load tests against a running cluster.
//! - `models`: footprint table of the model presets.
//! - `node`, `coordinator`, `worker`: the three services; `dev`: all of them in one process.
//! - `status`: the cluster as the coordinator sees it; `drain`: empty a node before removing it.
//! - `token`: a new random token and the tenants-file entry that admits it.
//! - `bench`: benchmarks.

mod bench;
mod demo;
mod load;
mod malloc;
mod models;
mod node;
mod plot;
mod serve;
mod util;

use clap::{Parser, Subcommand};

/// kvcache: a distributed, sharded KV-cache service for LLM inference.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// On an error, print its whole cause chain (also when RUST_LOG is set).
    #[arg(short, long, global = true)]
    verbose: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the KV-cache footprint of every model preset, per codec.
    Models(models::Args),
    /// The main job: a local cluster, four attention designs, prefill, decode, the cost table.
    Demo(demo::Args),
    /// Load-test a running cluster (prefill, decode, mixed; closed or open loop).
    Load(load::Args),
    /// Write a synthetic request trace (Mooncake's JSON-lines format) for `kvcache load
    /// --scenario trace`: shared prompts of Zipf popularity and multi-turn conversations.
    GenTrace(GenTraceArgs),
    /// Run a cache node.
    Node(node::Args),
    /// Run the coordinator.
    Coordinator(serve::CoordinatorArgs),
    /// Run an attention worker.
    Worker(serve::WorkerArgs),
    /// Run a whole local cluster (coordinator, 3 nodes, worker) on loopback until Ctrl-C.
    Dev(serve::DevArgs),
    /// Show the cluster: nodes, states, capacity, epoch, namespaces.
    Status(serve::StatusArgs),
    /// Drain a cache node: out of placement; its sequences move to their new owners.
    Drain(serve::DrainArgs),
    /// Make a random token and print it with the tenants-file entry (its SHA-256) that admits it.
    Token(TokenArgs),
    /// Benchmarks (ratios against baselines measured in the same run).
    #[command(subcommand)]
    Bench(bench::Bench),
}

/// Flags of `kvcache gen-trace`.
#[derive(clap::Args, Debug)]
struct GenTraceArgs {
    /// Requests to generate.
    #[arg(long, default_value_t = 10_000)]
    requests: usize,
    /// Seed (the same seed writes the same trace).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Where to write the JSON lines.
    #[arg(long)]
    out: std::path::PathBuf,
}

/// Flags of `kvcache token`.
#[derive(clap::Args, Debug)]
struct TokenArgs {
    /// The tenant the entry is for (`service`: the [service] entry kvcache's processes use).
    #[arg(default_value = "service")]
    tenant: String,
}

fn main() -> std::process::ExitCode {
    malloc::tune();
    let cli = Cli::parse();
    let verbose = cli.verbose || std::env::var_os("RUST_LOG").is_some();
    match run(cli.command) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line for people: what failed, where, and what to do. The chain of causes
            // below it only with -v or RUST_LOG.
            eprintln!("error: {e}");
            if verbose {
                for cause in e.chain().skip(1) {
                    eprintln!("  caused by: {cause}");
                }
            }
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Models(a) => models::run(a),
        Command::Node(a) => node::run(a),
        Command::Demo(a) => demo::run(a),
        Command::Load(a) => load::run(a),
        Command::GenTrace(a) => {
            let t = kvcache_cli::trace::generate(a.requests, a.seed);
            std::fs::write(&a.out, kvcache_cli::trace::to_jsonl(&t))
                .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", a.out.display()))?;
            let blocks: usize = t.iter().map(|r| r.hash_ids.len()).sum();
            println!("wrote {} requests ({blocks} blocks of 512 tokens) to {}", t.len(), a.out.display());
            Ok(())
        }
        Command::Coordinator(a) => serve::coordinator(a),
        Command::Worker(a) => serve::worker(a),
        Command::Dev(a) => serve::dev(a),
        Command::Status(a) => serve::status(a),
        Command::Drain(a) => serve::drain(a),
        Command::Token(a) => {
            let token = hex::encode(rand::random::<[u8; 32]>());
            let hash = hex::encode(kvcache_net::auth::token_sha256(&token));
            let section =
                if a.tenant == "service" { "[service]".to_owned() } else { format!("[tenants.{}]", a.tenant) };
            println!("token (give it to the caller; it is not stored anywhere):\n  {token}");
            println!("tenants file entry:\n  {section}\n  token_sha256 = \"{hash}\"");
            Ok(())
        }
        Command::Bench(b) => bench::run(b),
    }
}
