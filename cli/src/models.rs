//! `kvcache models`: the footprint table of the presets, per token and per sequence.

use kvcache_core::{Codec, ModelSpec};
use serde::Serialize;
use std::collections::BTreeMap;

/// Flags of `kvcache models`.
#[derive(clap::Args)]
pub struct Args {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Tokens in the sequence whose footprint `bytes_per_sequence` gives (windows, chunks and
    /// recurrent states make it more than bytes per token × tokens, or less).
    #[arg(long, default_value_t = 131_072, value_parser = clap::value_parser!(u64).range(1..=1 << 32))]
    context: u64,
}

#[derive(Serialize)]
struct CodecFootprint {
    bytes_per_token_layer: usize,
    bytes_per_token: usize,
    tokens_per_gib: u64,
}

#[derive(Serialize)]
struct Row {
    name: String,
    attention: &'static str,
    layers: u32,
    q_heads: u32,
    kv_heads: u32,
    head_dim: u32,
    kv_lora_rank: u32,
    rope_dim: u32,
    softmax_scale: f32,
    bytes_per_token_layer: usize,
    bytes_per_token: usize,
    tokens_per_gib: u64,
    mha_bytes_per_token_layer: usize,
    mha_ratio: f64,
    /// The layer mix ("12 sliding(128) + 12 full, sinks").
    layer_kinds: String,
    hybrid: bool,
    /// Tokens `bytes_per_sequence` is for.
    context: u64,
    /// Payload bytes one sequence of `context` tokens keeps over all layers (bf16 rows, fp8
    /// indexer keys, f32/bf16 states).
    bytes_per_sequence: u64,
    /// Of which fixed-size recurrent/conv state.
    state_bytes_per_sequence: u64,
    /// The same model with every token-mixing layer full multi-head attention in bf16.
    mha_bytes_per_sequence: u64,
    codecs: BTreeMap<&'static str, CodecFootprint>,
}

fn rows(context: u64) -> Vec<Row> {
    ModelSpec::presets()
        .into_iter()
        .map(|m| {
            let gib = 1u64 << 30;
            let codecs = Codec::ALL
                .into_iter()
                .map(|c| {
                    let per = m.bytes_per_token(c);
                    (
                        c.as_str(),
                        CodecFootprint {
                            bytes_per_token_layer: m.bytes_per_token_layer(c),
                            bytes_per_token: per,
                            tokens_per_gib: gib / per as u64,
                        },
                    )
                })
                .collect();
            let bf16 = m.bytes_per_token(Codec::Bf16);
            // Layers that mix tokens (attention, linear, Mamba2); an MLP-only layer has nothing to cache.
            let mixing = m.layer_kinds().filter(|k| *k != kvcache_core::spec::LayerKind::None).count() as u64;
            let mha_seq = m.mha_bytes_per_token_layer() as u64 * context * mixing;
            Row {
                layer_kinds: m.layer_summary(),
                hybrid: m.is_hybrid(),
                context,
                bytes_per_sequence: m.bytes_per_sequence(context, Codec::Bf16),
                state_bytes_per_sequence: m.layer_kinds().map(|k| k.state_bytes() as u64).sum(),
                mha_bytes_per_sequence: mha_seq,
                attention: m.attention.as_str(),
                layers: m.num_layers,
                q_heads: m.num_q_heads,
                kv_heads: m.num_kv_heads,
                head_dim: m.head_dim,
                kv_lora_rank: m.kv_lora_rank,
                rope_dim: m.rope_dim,
                softmax_scale: m.softmax_scale,
                bytes_per_token_layer: m.bytes_per_token_layer(Codec::Bf16),
                bytes_per_token: bf16,
                tokens_per_gib: gib / bf16 as u64,
                mha_bytes_per_token_layer: m.mha_bytes_per_token_layer(),
                mha_ratio: m.mha_bytes_per_token_layer() as f64 / m.bytes_per_token_layer(Codec::Bf16) as f64,
                codecs,
                name: m.name,
            }
        })
        .collect()
}

/// Run `kvcache models`.
pub fn run(args: Args) -> anyhow::Result<()> {
    let rows = rows(args.context);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{:<19} {:<4} {:>6} {:>7} {:>14} {:>10} {:>12} {:>12} {:>10} {:>10} {:>12} {:>8}",
        "model",
        "attn",
        "layers",
        "q-heads",
        "kv/latent",
        "B/tok/lyr",
        "B/tok bf16",
        "B/tok fp8",
        "B/tok int8",
        "tok/GiB",
        "tok/GiB fp8",
        "MHA÷"
    );
    for r in &rows {
        let kv = if r.attention == "MLA" {
            format!("{}+{}", r.kv_lora_rank, r.rope_dim)
        } else {
            format!("{}×{}", r.kv_heads, r.head_dim)
        };
        println!(
            "{:<19} {:<4} {:>6} {:>7} {:>14} {:>10} {:>12} {:>12} {:>10} {:>10} {:>12} {:>7.1}×",
            r.name,
            r.attention,
            r.layers,
            r.q_heads,
            kv,
            r.bytes_per_token_layer,
            r.bytes_per_token,
            r.codecs["fp8-e4m3"].bytes_per_token,
            r.codecs["int8"].bytes_per_token,
            r.tokens_per_gib,
            r.codecs["fp8-e4m3"].tokens_per_gib,
            r.mha_ratio
        );
    }
    println!(
        "\nB/tok/lyr: bytes one token keeps in one layer (bf16). MHA÷: the same model with full multi-head K/V, over this."
    );
    println!(
        "B/tok: over the layers that keep tokens (a sliding or chunked layer only while the token is in its window)."
    );
    let ctx = human_tokens(args.context);
    println!("\nOne sequence of {ctx} tokens (bf16 rows, fp8 indexer keys, f32 recurrent + bf16 conv states):\n");
    println!("{:<19} {:>11} {:>14} {:>9} {:>9}  layers", "model", "per seq", "of which state", "MHA÷", "MLA÷");
    let mla = rows.iter().find(|r| r.name == "deepseek-v3").map(|r| r.bytes_per_sequence as f64);
    for r in &rows {
        let seq = r.bytes_per_sequence as f64;
        println!(
            "{:<19} {:>11} {:>14} {:>8.1}× {:>8.2}×  {}",
            r.name,
            kvcache_core::size::human_bytes(r.bytes_per_sequence as f64),
            if r.state_bytes_per_sequence > 0 {
                kvcache_core::size::human_bytes(r.state_bytes_per_sequence as f64)
            } else {
                "-".into()
            },
            r.mha_bytes_per_sequence as f64 / seq,
            mla.map_or(f64::NAN, |m| seq / m),
            r.layer_kinds
        );
    }
    println!(
        "\nper seq: payload bytes (no page headers) one sequence keeps over all layers. MHA÷: the same model with every \
         token-mixing layer full multi-head attention, over this. MLA÷: this over DeepSeek-V3's MLA at the same length."
    );
    Ok(())
}

fn human_tokens(n: u64) -> String {
    match n {
        n if n >= 1 << 20 && n % (1 << 20) == 0 => format!("{}Mi", n >> 20),
        n if n >= 1024 && n % 1024 == 0 => format!("{}K", n >> 10),
        n => n.to_string(),
    }
}
