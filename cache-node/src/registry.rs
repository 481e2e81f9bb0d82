//! The namespace registry file (`namespaces.json` in the data directory): the namespaces a node
//! knows, so its pool files can be read back after a restart before the coordinator is reached.
//!
//! Its own versioned format, not a wire message: the file outlives any one version of the
//! protocol. JSON, one record per namespace with names rather than enum numbers:
//!
//! ```json
//! {"format": "kvcache-namespaces", "version": 1, "namespaces": [
//!   {"name": "prod.llama", "tenant": "prod", "codec": "bf16", "page_tokens": 64,
//!    "replication": 2, "prefix_seed": 1234,
//!    "model": {"name": "llama-3-8b", "attention": "gqa", "num_layers": 32, "num_q_heads": 32,
//!              "num_kv_heads": 8, "head_dim": 128, "kv_lora_rank": 0, "rope_dim": 0,
//!              "softmax_scale": 0.088388346}}]}
//! ```
//!
//! A hybrid model adds `"layers": [{"type": "sliding", "window": 128}, {"type": "full"}, ...]`,
//! `"sinks": true` and `"indexer": {"num_heads": 64, "head_dim": 128, "topk": 2048}` as it has
//! them; files without these fields (every file before hybrid models) read as dense models.
//!
//! Every record is validated as a namespace from the network is (the one validator in
//! `kvcache_core::validate`); a record that does not validate fails the start with the file and
//! the reason, rather than silently dropping the pages it would describe. Written atomically
//! (temporary file, fsync, rename, fsync of the directory). A node upgraded from the protobuf
//! registry (`namespaces.pb`) reads that once and writes this format.

use kvcache_core::spec::{IndexerSpec, LayerKind};
use kvcache_core::{AttentionKind, Codec, ModelSpec, Namespace};
use kvcache_proto::v1 as pb;
use serde::{Deserialize, Serialize};
use std::io::{self, Write};
use std::path::Path;

/// File name of the registry.
pub const FILE: &str = "namespaces.json";
/// The protobuf registry older nodes wrote (read once, on upgrade).
const LEGACY_FILE: &str = "namespaces.pb";
const FORMAT: &str = "kvcache-namespaces";
const VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
struct RegistryFile {
    format: String,
    version: u32,
    namespaces: Vec<NamespaceRecord>,
}

#[derive(Serialize, Deserialize)]
struct NamespaceRecord {
    name: String,
    tenant: String,
    codec: String,
    page_tokens: u32,
    replication: u32,
    prefix_seed: u64,
    model: ModelRecord,
}

#[derive(Serialize, Deserialize)]
struct ModelRecord {
    name: String,
    attention: String,
    num_layers: u32,
    num_q_heads: u32,
    num_kv_heads: u32,
    head_dim: u32,
    kv_lora_rank: u32,
    rope_dim: u32,
    softmax_scale: f32,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    layers: Vec<LayerKind>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    sinks: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    indexer: Option<IndexerSpec>,
}

fn invalid(path: &Path, why: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("namespace registry {}: {why}", path.display()))
}

impl From<&Namespace> for NamespaceRecord {
    fn from(n: &Namespace) -> Self {
        let m = &n.model;
        Self {
            name: n.name.clone(),
            tenant: n.tenant.clone(),
            codec: n.codec.as_str().to_owned(),
            page_tokens: n.page_tokens,
            replication: n.replication,
            prefix_seed: n.prefix_seed,
            model: ModelRecord {
                name: m.name.clone(),
                attention: m.attention.as_str().to_ascii_lowercase(),
                num_layers: m.num_layers,
                num_q_heads: m.num_q_heads,
                num_kv_heads: m.num_kv_heads,
                head_dim: m.head_dim,
                kv_lora_rank: m.kv_lora_rank,
                rope_dim: m.rope_dim,
                softmax_scale: m.softmax_scale,
                layers: m.layers.clone(),
                sinks: m.sinks,
                indexer: m.indexer,
            },
        }
    }
}

impl NamespaceRecord {
    /// The namespace, validated as one from the network would be.
    fn into_namespace(self) -> Result<Namespace, String> {
        let attention = match self.model.attention.as_str() {
            "mha" => AttentionKind::Mha,
            "gqa" => AttentionKind::Gqa,
            "mqa" => AttentionKind::Mqa,
            "mla" => AttentionKind::Mla,
            a => return Err(format!("namespace {:?}: unknown attention kind {a:?}", self.name)),
        };
        let codec = Codec::parse(&self.codec)
            .ok_or_else(|| format!("namespace {:?}: unknown codec {:?}", self.name, self.codec))?;
        let m = self.model;
        let model = ModelSpec {
            name: m.name,
            attention,
            num_layers: m.num_layers,
            num_q_heads: m.num_q_heads,
            num_kv_heads: m.num_kv_heads,
            head_dim: m.head_dim,
            kv_lora_rank: m.kv_lora_rank,
            rope_dim: m.rope_dim,
            softmax_scale: m.softmax_scale,
            layers: m.layers,
            sinks: m.sinks,
            indexer: m.indexer,
        };
        let ns = Namespace {
            name: self.name,
            tenant: self.tenant,
            model,
            codec,
            page_tokens: self.page_tokens,
            replication: self.replication,
            prefix_seed: self.prefix_seed,
        };
        // The same checks as a namespace from the coordinator.
        Namespace::try_from(pb::Namespace::from(&ns)).map_err(|e| format!("namespace {:?}: {e}", ns.name))
    }
}

/// The namespaces registered in `dir` (none when there is no registry yet).
pub fn load(dir: &Path) -> io::Result<Vec<Namespace>> {
    let path = dir.join(FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return load_legacy(dir),
        Err(e) => return Err(e),
    };
    let file: RegistryFile = serde_json::from_slice(&bytes).map_err(|e| invalid(&path, e))?;
    if file.format != FORMAT {
        return Err(invalid(&path, format!("format {:?}, expected {FORMAT:?}", file.format)));
    }
    if file.version != VERSION {
        return Err(invalid(&path, format!("version {} is not one this build reads ({VERSION})", file.version)));
    }
    file.namespaces.into_iter().map(|r| r.into_namespace().map_err(|e| invalid(&path, e))).collect()
}

fn load_legacy(dir: &Path) -> io::Result<Vec<Namespace>> {
    use prost::Message;
    let path = dir.join(LEGACY_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let list = pb::ListNamespacesResponse::decode(bytes.as_slice()).map_err(|e| invalid(&path, e))?;
    list.namespaces.into_iter().map(|n| Namespace::try_from(n).map_err(|e| invalid(&path, e))).collect()
}

/// Write `namespaces` as the registry of `dir`, atomically; a legacy registry is removed after.
pub fn save(dir: &Path, namespaces: &[Namespace]) -> io::Result<()> {
    let file = RegistryFile {
        format: FORMAT.into(),
        version: VERSION,
        namespaces: namespaces.iter().map(NamespaceRecord::from).collect(),
    };
    let bytes = serde_json::to_vec_pretty(&file).map_err(io::Error::other)?;
    let tmp = dir.join(format!("{FILE}.tmp"));
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, dir.join(FILE))?;
    match std::fs::remove_file(dir.join(LEGACY_FILE)) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns(name: &str, preset: &str, codec: Codec) -> Namespace {
        Namespace {
            name: name.into(),
            tenant: "t".into(),
            model: ModelSpec::preset(preset).unwrap(),
            codec,
            page_tokens: 64,
            replication: 2,
            prefix_seed: 0xdead_beef_cafe,
        }
    }

    #[test]
    fn a_registry_round_trips_and_a_legacy_one_is_upgraded() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load(dir.path()).unwrap().is_empty());
        let all = vec![ns("a.llama", "llama-3-8b", Codec::Bf16), ns("b.dsv3", "deepseek-v3", Codec::Fp8E4m3)];
        save(dir.path(), &all).unwrap();
        assert_eq!(load(dir.path()).unwrap(), all);
        // Hybrid models keep their layer kinds, sinks and indexer across a restart.
        let hybrid: Vec<Namespace> = ["gpt-oss-20b", "qwen3-next-80b-a3b", "deepseek-v3.2", "nemotron-h-8b"]
            .iter()
            .enumerate()
            .map(|(i, p)| ns(&format!("h{i}"), p, Codec::Bf16))
            .collect();
        let hdir = tempfile::tempdir().unwrap();
        save(hdir.path(), &hybrid).unwrap();
        assert_eq!(load(hdir.path()).unwrap(), hybrid);
        let text = std::fs::read_to_string(hdir.path().join(FILE)).unwrap();
        assert!(text.contains("\"type\": \"sliding\"") && text.contains("\"window\": 128"), "{text}");
        // Names, not enum numbers, in the file.
        let text = std::fs::read_to_string(dir.path().join(FILE)).unwrap();
        assert!(text.contains("\"attention\": \"mla\"") && text.contains("\"codec\": \"fp8-e4m3\""), "{text}");

        let old = tempfile::tempdir().unwrap();
        let list = pb::ListNamespacesResponse { namespaces: all.iter().map(pb::Namespace::from).collect() };
        std::fs::write(old.path().join(LEGACY_FILE), prost::Message::encode_to_vec(&list)).unwrap();
        let got = load(old.path()).unwrap();
        assert_eq!(got, all);
        save(old.path(), &got).unwrap();
        assert!(!old.path().join(LEGACY_FILE).exists());
        assert_eq!(load(old.path()).unwrap(), all);
    }

    #[test]
    fn a_registry_that_does_not_validate_is_refused_with_the_file_and_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        save(dir.path(), &[ns("a.llama", "llama-3-8b", Codec::Bf16)]).unwrap();
        let path = dir.path().join(FILE);
        let text = std::fs::read_to_string(&path).unwrap();
        for (from, to, says) in [
            ("\"page_tokens\": 64", "\"page_tokens\": 0", "page"),
            ("\"codec\": \"bf16\"", "\"codec\": \"bf17\"", "unknown codec \"bf17\""),
            ("\"version\": 1", "\"version\": 9", "version 9"),
            ("\"num_layers\": 32", "\"num_layers\": 0", "num_layers 0"),
        ] {
            std::fs::write(&path, text.replace(from, to)).unwrap();
            let e = load(dir.path()).unwrap_err().to_string();
            assert!(e.contains(says) && e.contains("namespaces.json"), "{to}: {e}");
        }
        std::fs::write(&path, &text[..text.len() / 2]).unwrap();
        assert_eq!(load(dir.path()).unwrap_err().kind(), io::ErrorKind::InvalidData);
    }
}
