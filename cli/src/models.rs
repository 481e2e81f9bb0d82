//! `kvcache models`: the footprint table of the presets.

use kvcache_core::{Codec, ModelSpec};
use serde::Serialize;
use std::collections::BTreeMap;

/// Flags of `kvcache models`.
#[derive(clap::Args)]
pub struct Args {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
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
    codecs: BTreeMap<&'static str, CodecFootprint>,
}

fn rows() -> Vec<Row> {
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
            Row {
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
    let rows = rows();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{:<12} {:<4} {:>6} {:>7} {:>14} {:>10} {:>12} {:>12} {:>10} {:>10} {:>12} {:>8}",
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
            "{:<12} {:<4} {:>6} {:>7} {:>14} {:>10} {:>12} {:>12} {:>10} {:>10} {:>12} {:>7.1}×",
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
    Ok(())
}
