#![allow(missing_docs)]
//! Helpers shared by the store tests.
#![allow(dead_code)]

use bytes::Bytes;
use kvcache_core::validate::{self, ValidPage, codec_to_wire};
use kvcache_core::{AttentionKind, Codec, ModelSpec, Namespace, PageKey, SequenceKey};
use kvcache_node::{PageStore, PutMode, StoreConfig, StoreError};
use kvcache_proto::v1 as pb;
use std::path::Path;
use std::sync::Arc;

/// A small GQA namespace: 3 layers, 2 KV heads of 4 dims, bf16, 4 tokens per page
/// (payload 32 B per token, 128 B per full page, one 4 KiB slot per page).
pub fn small_ns() -> Namespace {
    Namespace {
        name: "test.small".into(),
        tenant: "t".into(),
        model: ModelSpec {
            name: "tiny".into(),
            attention: AttentionKind::Gqa,
            num_layers: 3,
            num_q_heads: 4,
            num_kv_heads: 2,
            head_dim: 4,
            kv_lora_rank: 0,
            rope_dim: 0,
            softmax_scale: 0.5,
            layers: Vec::new(),
            sinks: false,
            indexer: None,
        },
        codec: Codec::Bf16,
        page_tokens: 4,
        replication: 1,
        prefix_seed: 1,
    }
}

pub const SLOT: u64 = 4096;

pub fn open(dir: &Path, slots: u64) -> Arc<PageStore> {
    let mut cfg = StoreConfig::new(dir, slots * SLOT);
    cfg.segment_bytes = slots * SLOT;
    let s = PageStore::open(cfg).unwrap();
    s.ensure_namespace(small_ns()).unwrap();
    s
}

/// [`open`] through a power-loss simulator, with no background flush (flushes happen when the
/// test says so, or per write under `sync`).
pub fn open_watched(
    dir: &Path,
    slots: u64,
    durability: kvcache_node::Durability,
    power: &Arc<kvcache_node::powerloss::PowerLoss>,
) -> Arc<PageStore> {
    let mut cfg = StoreConfig::new(dir, slots * SLOT);
    cfg.segment_bytes = slots * SLOT;
    cfg.durability = durability;
    cfg.flush_interval = std::time::Duration::from_secs(3600);
    cfg.storage = Some(power.clone());
    let s = PageStore::open(cfg).unwrap();
    s.ensure_namespace(small_ns()).unwrap();
    s
}

pub fn key(seq: &str, layer: u32, page: u32) -> PageKey {
    PageKey { sequence: SequenceKey::new("test.small", seq), layer, page_index: page }
}

pub fn payload(ns: &Namespace, tokens: u32, seed: u8) -> Vec<u8> {
    (0..ns.layout().payload_bytes(tokens as usize)).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

pub fn page(k: &PageKey, tokens: u32, body: Vec<u8>) -> pb::Page {
    pb::Page {
        key: Some(k.into()),
        codec: codec_to_wire(Codec::Bf16),
        token_count: tokens,
        write_seq: 0,
        payload_crc32c: kvcache_core::checksum::crc32c(&body),
        prefix_hash: 0,
        payload: Bytes::from(body),
        ..Default::default()
    }
}

/// A wire page validated as the service validates it before the store sees it.
pub fn valid(s: &PageStore, p: pb::Page) -> ValidPage {
    let nss = s.namespace_table();
    validate::page(p, |n| nss.get(n).map(|e| &e.ns)).unwrap().1
}

/// Put wire pages through validation (as the service does), replacing held ones.
pub fn put_wire(s: &PageStore, pages: Vec<pb::Page>) -> Result<(u64, u64), StoreError> {
    put_wire_with(s, pages, PutMode::Write)
}

/// [`put_wire`] with a put mode.
pub fn put_wire_with(s: &PageStore, pages: Vec<pb::Page>, mode: PutMode) -> Result<(u64, u64), StoreError> {
    let pages = pages.into_iter().map(|p| valid(s, p)).collect();
    s.put_pages(pages, mode).map(|o| (o.written, o.bytes))
}

/// Append through validation (as the service does).
pub fn append(
    s: &PageStore,
    seq: &SequenceKey,
    layer: Option<u32>,
    tokens: u32,
    body: &[u8],
    expected: Option<u64>,
) -> Result<Vec<kvcache_node::store::Appended>, StoreError> {
    let ns = s.namespace(&seq.namespace).unwrap();
    let cmd = validate::append(&ns.ns, seq.clone(), layer, tokens, Bytes::copy_from_slice(body), expected)?;
    s.append(&cmd)
}

pub fn put(s: &PageStore, k: &PageKey, tokens: u32, seed: u8) -> Vec<u8> {
    let body = payload(&small_ns(), tokens, seed);
    put_wire(s, vec![page(k, tokens, body.clone())]).unwrap();
    body
}

pub fn get(s: &PageStore, k: &PageKey) -> Option<Vec<u8>> {
    s.get(k).unwrap().map(|p| p.payload.to_vec())
}
