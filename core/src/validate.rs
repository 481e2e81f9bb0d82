//! Validation of wire messages into domain types, once, at the edge.
//!
//! Everything the network sends goes through here before it is used. Each failure is a
//! [`ValidationError`] whose message says what was wrong and what was expected; services map it
//! to INVALID_ARGUMENT.

use crate::codec::Codec;
use crate::key::{MAX_NAMESPACE_BYTES, MAX_SEQUENCE_ID_BYTES, Namespace, PAGE_TOKENS_RANGE, PageKey, SequenceKey};
use crate::spec::{AttentionKind, IndexerSpec, LayerKind, LinearKind, LinearSpec, Mamba2Spec, ModelSpec};
use bytes::Bytes;
use kvcache_proto::v1 as pb;

/// A malformed wire message.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ValidationError {
    /// A content page (page key) used as a sequence page, or not a full page.
    #[error("content page: {0}")]
    ContentPage(String),
    /// A required field is absent.
    #[error("missing field `{0}`")]
    Missing(&'static str),
    /// Codec enum value not known, or unspecified.
    #[error("unknown codec {0}: expected bf16, f16, fp8-e4m3 or int8")]
    UnknownCodec(i32),
    /// Codec does not match the namespace.
    #[error("codec {got} does not match namespace {namespace}, which stores {expected}")]
    CodecMismatch {
        /// Namespace.
        namespace: String,
        /// Sent.
        got: &'static str,
        /// Namespace codec.
        expected: &'static str,
    },
    /// Namespace name invalid.
    #[error("invalid namespace name {0:?}: expected [a-z0-9][a-z0-9._-]{{0,62}}")]
    NamespaceName(String),
    /// Sequence id invalid.
    #[error("invalid sequence id: {0}")]
    SequenceId(String),
    /// A request that does not fit the kind of the layer it names.
    #[error("layer {layer}: {why}")]
    LayerKind {
        /// The layer.
        layer: u32,
        /// What does not fit.
        why: String,
    },
    /// Layer out of range.
    #[error("layer {layer} out of range: model has {layers} layers")]
    LayerOutOfRange {
        /// Sent.
        layer: u32,
        /// Model layers.
        layers: u32,
    },
    /// Token count out of range for a page.
    #[error("token count {got} out of range: pages hold 1..={page_tokens} tokens")]
    TokenCount {
        /// Sent.
        got: u32,
        /// Page size.
        page_tokens: u32,
    },
    /// Payload length does not match the layout.
    #[error("payload is {got} bytes, but {tokens} tokens of this namespace's layout are {expected} bytes")]
    PayloadLength {
        /// Sent.
        got: usize,
        /// Layout size.
        expected: usize,
        /// Token count.
        tokens: u32,
    },
    /// Payload CRC mismatch.
    #[error("payload checksum mismatch: page says {stored:#010x}, payload is {computed:#010x}")]
    Checksum {
        /// Sent CRC.
        stored: u32,
        /// Computed.
        computed: u32,
    },
    /// Model spec invalid.
    #[error("invalid model spec: {0}")]
    Model(String),
    /// Page size invalid.
    #[error("page_tokens {0} out of range: expected 1..=4096")]
    PageTokens(u32),
    /// Replication factor invalid.
    #[error("replication factor {0} out of range: expected 1..=5")]
    Replication(u32),
    /// Generic count out of range.
    #[error("{what} is {got}, expected {expected}")]
    Count {
        /// What was counted.
        what: &'static str,
        /// Sent.
        got: u64,
        /// Expected, in words.
        expected: String,
    },
}

/// Parse a wire codec value.
pub fn codec(v: i32) -> Result<Codec, ValidationError> {
    match pb::Codec::try_from(v) {
        Ok(pb::Codec::Bf16) => Ok(Codec::Bf16),
        Ok(pb::Codec::F16) => Ok(Codec::F16),
        Ok(pb::Codec::Fp8E4m3) => Ok(Codec::Fp8E4m3),
        Ok(pb::Codec::Int8) => Ok(Codec::Int8),
        _ => Err(ValidationError::UnknownCodec(v)),
    }
}

/// Wire value of a codec.
pub fn codec_to_wire(c: Codec) -> i32 {
    c.tag() as i32
}

/// Check a namespace name.
pub fn namespace_name(name: &str) -> Result<(), ValidationError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAMESPACE_BYTES
        && name
            .bytes()
            .enumerate()
            .all(|(i, b)| b.is_ascii_lowercase() || b.is_ascii_digit() || (i > 0 && matches!(b, b'.' | b'_' | b'-')));
    if ok { Ok(()) } else { Err(ValidationError::NamespaceName(name.to_owned())) }
}

impl TryFrom<pb::SequenceKey> for SequenceKey {
    type Error = ValidationError;
    fn try_from(k: pb::SequenceKey) -> Result<Self, Self::Error> {
        namespace_name(&k.namespace)?;
        if k.sequence_id.is_empty() {
            return Err(ValidationError::SequenceId("empty".into()));
        }
        if k.sequence_id.len() > MAX_SEQUENCE_ID_BYTES {
            return Err(ValidationError::SequenceId(format!(
                "{} bytes, at most {MAX_SEQUENCE_ID_BYTES}",
                k.sequence_id.len()
            )));
        }
        if crate::content::is_content_id(&k.sequence_id)
            && crate::content::ContentKey::from_sequence_id(&k.sequence_id).is_none()
        {
            return Err(ValidationError::SequenceId(format!(
                "{:?} starts with '#', which is reserved for content page keys ('#' + 43 base64url characters)",
                k.sequence_id
            )));
        }
        Ok(SequenceKey { namespace: k.namespace, sequence_id: k.sequence_id })
    }
}

impl TryFrom<pb::PageKey> for PageKey {
    type Error = ValidationError;
    fn try_from(k: pb::PageKey) -> Result<Self, Self::Error> {
        let sequence = k.sequence.ok_or(ValidationError::Missing("key.sequence"))?.try_into()?;
        Ok(PageKey { sequence, layer: k.layer, page_index: k.page_index })
    }
}

impl From<&SequenceKey> for pb::SequenceKey {
    fn from(k: &SequenceKey) -> Self {
        pb::SequenceKey { namespace: k.namespace.clone(), sequence_id: k.sequence_id.clone() }
    }
}

impl From<&PageKey> for pb::PageKey {
    fn from(k: &PageKey) -> Self {
        pb::PageKey { sequence: Some((&k.sequence).into()), layer: k.layer, page_index: k.page_index }
    }
}

fn attention(v: i32) -> Result<AttentionKind, ValidationError> {
    match pb::AttentionKind::try_from(v) {
        Ok(pb::AttentionKind::Mha) => Ok(AttentionKind::Mha),
        Ok(pb::AttentionKind::Gqa) => Ok(AttentionKind::Gqa),
        Ok(pb::AttentionKind::Mqa) => Ok(AttentionKind::Mqa),
        Ok(pb::AttentionKind::Mla) => Ok(AttentionKind::Mla),
        _ => Err(ValidationError::Model(format!("unknown attention kind {v}: expected MHA, GQA, MQA or MLA"))),
    }
}

impl TryFrom<pb::ModelSpec> for ModelSpec {
    type Error = ValidationError;
    fn try_from(m: pb::ModelSpec) -> Result<Self, Self::Error> {
        let kind = attention(m.attention)?;
        let bad = |s: String| Err(ValidationError::Model(s));
        if m.num_layers == 0 || m.num_layers > 1024 {
            return bad(format!("num_layers {} out of range 1..=1024", m.num_layers));
        }
        if m.num_q_heads == 0 || m.num_q_heads > 1024 {
            return bad(format!("num_q_heads {} out of range 1..=1024", m.num_q_heads));
        }
        let mut kv = m.num_kv_heads;
        match kind {
            AttentionKind::Mla => {
                if m.kv_lora_rank == 0 || m.kv_lora_rank > 4096 || m.rope_dim > 1024 {
                    return bad(format!(
                        "MLA needs kv_lora_rank in 1..=4096 and rope_dim ≤ 1024, got {} and {}",
                        m.kv_lora_rank, m.rope_dim
                    ));
                }
                kv = 1;
            }
            _ => {
                if m.head_dim == 0 || m.head_dim > 1024 {
                    return bad(format!("head_dim {} out of range 1..=1024", m.head_dim));
                }
                if kind == AttentionKind::Mha && kv == 0 {
                    kv = m.num_q_heads;
                }
                if kind == AttentionKind::Mqa && kv == 0 {
                    kv = 1;
                }
                if kv == 0 || !m.num_q_heads.is_multiple_of(kv) {
                    return bad(format!("num_q_heads {} is not a multiple of num_kv_heads {kv}", m.num_q_heads));
                }
                let consistent = match kind {
                    AttentionKind::Mha => kv == m.num_q_heads,
                    AttentionKind::Mqa => kv == 1,
                    _ => true,
                };
                if !consistent {
                    return bad(format!("{} with {kv} KV heads for {} query heads", kind.as_str(), m.num_q_heads));
                }
            }
        }
        if !(m.softmax_scale.is_finite() && m.softmax_scale >= 0.0) {
            return bad(format!("softmax_scale {} must be finite and ≥ 0", m.softmax_scale));
        }
        if !m.layers.is_empty() && m.layers.len() != m.num_layers as usize {
            return bad(format!("layers lists {} kinds for a model of {} layers", m.layers.len(), m.num_layers));
        }
        let layers = m.layers.into_iter().enumerate().map(|(i, l)| layer_kind(i, l)).collect::<Result<Vec<_>, _>>()?;
        let indexer = match m.indexer {
            None => None,
            Some(_) if kind != AttentionKind::Mla => return bad("an indexer needs MLA attention".into()),
            Some(i) => {
                if i.num_heads == 0 || i.num_heads > 1024 || i.head_dim == 0 || i.head_dim > 1024 || i.topk == 0 {
                    return bad(format!(
                        "indexer needs num_heads and head_dim in 1..=1024 and topk ≥ 1, got {}, {} and {}",
                        i.num_heads, i.head_dim, i.topk
                    ));
                }
                Some(IndexerSpec { num_heads: i.num_heads, head_dim: i.head_dim, topk: i.topk })
            }
        };
        if layers.iter().any(|l| matches!(l, LayerKind::Sliding { .. } | LayerKind::Chunked { .. }))
            && kind == AttentionKind::Mla
            && indexer.is_some()
        {
            return bad("sparse MLA layers cannot also be windowed".into());
        }
        let mut spec = ModelSpec {
            name: m.name,
            attention: kind,
            num_layers: m.num_layers,
            num_q_heads: m.num_q_heads,
            num_kv_heads: kv,
            head_dim: m.head_dim,
            kv_lora_rank: if kind == AttentionKind::Mla { m.kv_lora_rank } else { 0 },
            rope_dim: if kind == AttentionKind::Mla { m.rope_dim } else { 0 },
            softmax_scale: m.softmax_scale,
            // Every layer full is written as no list, so both spellings are one definition.
            layers: if layers.iter().all(|l| *l == LayerKind::Full) { Vec::new() } else { layers },
            sinks: m.attention_sinks,
            indexer,
        };
        if spec.softmax_scale == 0.0 {
            spec.softmax_scale = 1.0 / (spec.qk_width() as f32).sqrt();
        }
        Ok(spec)
    }
}

/// Dims of a state layer: each in 1..=`max`.
fn dims(layer: usize, what: &str, fields: &[(&str, u32, u32)]) -> Result<(), ValidationError> {
    for &(name, v, max) in fields {
        if v == 0 || v > max {
            return Err(ValidationError::Model(format!("layer {layer} ({what}): {name} {v} out of range 1..={max}")));
        }
    }
    Ok(())
}

fn layer_kind(i: usize, l: pb::LayerSpec) -> Result<LayerKind, ValidationError> {
    use pb::layer_spec::Kind;
    let bad = |s: String| Err(ValidationError::Model(format!("layer {i}: {s}")));
    match l.kind {
        None => bad("no kind set: expected full, sliding, chunked, linear, mamba2 or none".into()),
        Some(Kind::Full(_)) => Ok(LayerKind::Full),
        Some(Kind::None(_)) => Ok(LayerKind::None),
        Some(Kind::Sliding(s)) if s.window == 0 => bad("sliding window 0: expected ≥ 1 token".into()),
        Some(Kind::Sliding(s)) => Ok(LayerKind::Sliding { window: s.window }),
        Some(Kind::Chunked(c)) if c.chunk == 0 => bad("chunk 0: expected ≥ 1 token".into()),
        Some(Kind::Chunked(c)) => Ok(LayerKind::Chunked { chunk: c.chunk }),
        Some(Kind::Linear(x)) => {
            let kind = match pb::LinearKind::try_from(x.kind) {
                Ok(pb::LinearKind::GatedDeltaNet) => LinearKind::GatedDeltaNet,
                Ok(pb::LinearKind::Kda) => LinearKind::Kda,
                _ => return bad(format!("unknown linear kind {}: expected GATED_DELTA_NET or KDA", x.kind)),
            };
            dims(
                i,
                "linear",
                &[
                    ("num_k_heads", x.num_k_heads, 1024),
                    ("num_v_heads", x.num_v_heads, 1024),
                    ("head_k_dim", x.head_k_dim, 1024),
                    ("head_v_dim", x.head_v_dim, 1024),
                    ("conv_kernel", x.conv_kernel, 64),
                ],
            )?;
            if !x.num_v_heads.is_multiple_of(x.num_k_heads) {
                return bad(format!(
                    "num_v_heads {} is not a multiple of num_k_heads {}",
                    x.num_v_heads, x.num_k_heads
                ));
            }
            if kind == LinearKind::Kda && x.num_v_heads != x.num_k_heads {
                return bad(format!(
                    "KDA has one head count, got {} key and {} value heads",
                    x.num_k_heads, x.num_v_heads
                ));
            }
            Ok(LayerKind::Linear(LinearSpec {
                kind,
                num_k_heads: x.num_k_heads,
                num_v_heads: x.num_v_heads,
                head_k_dim: x.head_k_dim,
                head_v_dim: x.head_v_dim,
                conv_kernel: x.conv_kernel,
            }))
        }
        Some(Kind::Mamba2(x)) => {
            dims(
                i,
                "mamba2",
                &[
                    ("num_heads", x.num_heads, 1024),
                    ("head_dim", x.head_dim, 1024),
                    ("state_size", x.state_size, 1024),
                    ("n_groups", x.n_groups, 1024),
                    ("conv_kernel", x.conv_kernel, 64),
                ],
            )?;
            if !x.num_heads.is_multiple_of(x.n_groups) {
                return bad(format!("mamba2 num_heads {} is not a multiple of n_groups {}", x.num_heads, x.n_groups));
            }
            Ok(LayerKind::Mamba2(Mamba2Spec {
                num_heads: x.num_heads,
                head_dim: x.head_dim,
                state_size: x.state_size,
                n_groups: x.n_groups,
                conv_kernel: x.conv_kernel,
            }))
        }
    }
}

impl From<&LayerKind> for pb::LayerSpec {
    fn from(k: &LayerKind) -> Self {
        use pb::layer_spec::Kind;
        let kind = match *k {
            LayerKind::Full => Kind::Full(pb::FullAttention {}),
            LayerKind::None => Kind::None(pb::NoCache {}),
            LayerKind::Sliding { window } => Kind::Sliding(pb::SlidingWindow { window }),
            LayerKind::Chunked { chunk } => Kind::Chunked(pb::ChunkedAttention { chunk }),
            LayerKind::Linear(l) => Kind::Linear(pb::LinearAttention {
                kind: match l.kind {
                    LinearKind::GatedDeltaNet => pb::LinearKind::GatedDeltaNet,
                    LinearKind::Kda => pb::LinearKind::Kda,
                } as i32,
                num_k_heads: l.num_k_heads,
                num_v_heads: l.num_v_heads,
                head_k_dim: l.head_k_dim,
                head_v_dim: l.head_v_dim,
                conv_kernel: l.conv_kernel,
            }),
            LayerKind::Mamba2(m) => Kind::Mamba2(pb::Mamba2 {
                num_heads: m.num_heads,
                head_dim: m.head_dim,
                state_size: m.state_size,
                n_groups: m.n_groups,
                conv_kernel: m.conv_kernel,
            }),
        };
        pb::LayerSpec { kind: Some(kind) }
    }
}

impl From<&ModelSpec> for pb::ModelSpec {
    fn from(m: &ModelSpec) -> Self {
        let attention = match m.attention {
            AttentionKind::Mha => pb::AttentionKind::Mha,
            AttentionKind::Gqa => pb::AttentionKind::Gqa,
            AttentionKind::Mqa => pb::AttentionKind::Mqa,
            AttentionKind::Mla => pb::AttentionKind::Mla,
        };
        pb::ModelSpec {
            name: m.name.clone(),
            attention: attention as i32,
            num_layers: m.num_layers,
            num_q_heads: m.num_q_heads,
            num_kv_heads: m.num_kv_heads,
            head_dim: m.head_dim,
            kv_lora_rank: m.kv_lora_rank,
            rope_dim: m.rope_dim,
            softmax_scale: m.softmax_scale,
            layers: m.layers.iter().map(Into::into).collect(),
            attention_sinks: m.sinks,
            indexer: m.indexer.map(|i| pb::IndexerSpec { num_heads: i.num_heads, head_dim: i.head_dim, topk: i.topk }),
        }
    }
}

/// Check page size and replication factor.
pub fn namespace_params(page_tokens: u32, replication: u32) -> Result<(), ValidationError> {
    if !PAGE_TOKENS_RANGE.contains(&page_tokens) {
        return Err(ValidationError::PageTokens(page_tokens));
    }
    if !(1..=5).contains(&replication) {
        return Err(ValidationError::Replication(replication));
    }
    Ok(())
}

impl TryFrom<pb::Namespace> for Namespace {
    type Error = ValidationError;
    fn try_from(n: pb::Namespace) -> Result<Self, Self::Error> {
        namespace_name(&n.name)?;
        let model = n.model.ok_or(ValidationError::Missing("namespace.model"))?.try_into()?;
        let codec = codec(n.codec)?;
        namespace_params(n.page_tokens, n.replication)?;
        Ok(Namespace {
            name: n.name,
            tenant: n.tenant,
            model,
            codec,
            page_tokens: n.page_tokens,
            replication: n.replication,
            prefix_seed: n.prefix_seed,
        })
    }
}

impl From<&Namespace> for pb::Namespace {
    fn from(n: &Namespace) -> Self {
        pb::Namespace {
            name: n.name.clone(),
            tenant: n.tenant.clone(),
            model: Some((&n.model).into()),
            codec: codec_to_wire(n.codec),
            page_tokens: n.page_tokens,
            replication: n.replication,
            prefix_seed: n.prefix_seed,
        }
    }
}

/// Check that `layer` exists in `ns`'s model.
pub fn layer(ns: &Namespace, layer: u32) -> Result<(), ValidationError> {
    if layer >= ns.model.num_layers && !ns.is_indexer_layer(layer) {
        return Err(ValidationError::LayerOutOfRange { layer, layers: ns.model.num_layers });
    }
    Ok(())
}

/// Largest page index accepted (2^24 pages of ≥ 1 token: far beyond any context).
pub const MAX_PAGE_INDEX: u32 = 1 << 24;

/// Check a page key against its namespace.
pub fn page_key(ns: &Namespace, key: &PageKey) -> Result<(), ValidationError> {
    layer(ns, key.layer)?;
    let kind = ns.layer_kind(key.layer);
    if kind == LayerKind::None {
        return Err(ValidationError::LayerKind {
            layer: key.layer,
            why: format!("an MLP-only layer of {}: it keeps no cache", ns.model.name),
        });
    }
    let states = ns.state_pages(key.layer);
    if kind.keeps_state() && key.page_index >= states {
        return Err(ValidationError::LayerKind {
            layer: key.layer,
            why: format!(
                "a {} layer keeps one state of {} bytes in {states} pages: page_index {} out of range",
                kind.as_str(),
                kind.state_bytes(),
                key.page_index
            ),
        });
    }
    if key.page_index >= MAX_PAGE_INDEX {
        return Err(ValidationError::Count {
            what: "page_index",
            got: key.page_index as u64,
            expected: format!("< {MAX_PAGE_INDEX}"),
        });
    }
    Ok(())
}

/// A page that passed every check against its namespace: key in range, codec equal, token count
/// within the page size, payload exactly the layout's size, CRC matching.
#[derive(Debug, Clone)]
pub struct ValidPage {
    /// Key.
    pub key: PageKey,
    /// Tokens.
    pub token_count: u32,
    /// Prefix hash (0 = none).
    pub prefix_hash: u64,
    /// CRC-32C of the payload (verified).
    pub payload_crc: u32,
    /// Payload (a slice of the receive buffer).
    pub payload: Bytes,
}

/// Validate a wire page against the namespace `lookup` resolves for its key.
pub fn page<'a>(
    p: pb::Page,
    lookup: impl FnOnce(&str) -> Option<&'a Namespace>,
) -> Result<(&'a Namespace, ValidPage), PageRejection> {
    let key: PageKey = p.key.ok_or(ValidationError::Missing("page.key"))?.try_into()?;
    let ns = lookup(&key.sequence.namespace)
        .ok_or_else(|| PageRejection::UnknownNamespace(key.sequence.namespace.clone()))?;
    page_key(ns, &key)?;
    let c = codec(p.codec)?;
    if c != ns.codec {
        return Err(ValidationError::CodecMismatch {
            namespace: ns.name.clone(),
            got: c.as_str(),
            expected: ns.codec.as_str(),
        }
        .into());
    }
    if p.token_count == 0 || p.token_count > ns.page_tokens {
        return Err(ValidationError::TokenCount { got: p.token_count, page_tokens: ns.page_tokens }.into());
    }
    let state = ns.layer_kind(key.layer).keeps_state();
    if state && p.token_count != ns.page_tokens {
        return Err(ValidationError::LayerKind {
            layer: key.layer,
            why: format!(
                "a state page is a full page ({} tokens' worth of bytes); got token_count {}",
                ns.page_tokens, p.token_count
            ),
        }
        .into());
    }
    if key.sequence.is_content() && ((key.page_index != 0 && !state) || p.token_count != ns.page_tokens) {
        return Err(ValidationError::ContentPage(format!(
            "a content page is one full page at index 0 ({} tokens); got page {} with {} tokens",
            ns.page_tokens, key.page_index, p.token_count
        ))
        .into());
    }
    if !p.token_ids.is_empty() || !p.parent_key.is_empty() {
        content_chain(ns, &key, &p.token_ids, &p.parent_key)?;
    }
    let expected = ns.layout_for(key.layer).payload_bytes(p.token_count as usize);
    if p.payload.len() != expected {
        return Err(ValidationError::PayloadLength { got: p.payload.len(), expected, tokens: p.token_count }.into());
    }
    let computed = crate::checksum::crc32c(&p.payload);
    if computed != p.payload_crc32c {
        return Err(ValidationError::Checksum { stored: p.payload_crc32c, computed }.into());
    }
    Ok((
        ns,
        ValidPage {
            key,
            token_count: p.token_count,
            prefix_hash: p.prefix_hash,
            payload_crc: computed,
            payload: p.payload,
        },
    ))
}

/// Check a content page's key against the chain its token ids and parent key record:
/// `key == ContentKey::chain(seed, parent, token_ids)`.
pub fn content_chain(ns: &Namespace, key: &PageKey, token_ids: &[u32], parent: &[u8]) -> Result<(), ValidationError> {
    let Some(k) = key.sequence.content_key() else {
        return Err(ValidationError::ContentPage("token_ids and parent_key are for content pages only".into()));
    };
    if token_ids.len() != ns.page_tokens as usize {
        return Err(ValidationError::ContentPage(format!(
            "{} token ids for a page of {} tokens",
            token_ids.len(),
            ns.page_tokens
        )));
    }
    let parent = match parent.len() {
        0 => None,
        32 => crate::content::ContentKey::from_bytes(parent),
        n => return Err(ValidationError::ContentPage(format!("parent_key is {n} bytes: a content key is 32"))),
    };
    let computed = crate::content::ContentKey::chain(ns.prefix_seed, parent.as_ref(), token_ids);
    if computed != k {
        return Err(ValidationError::ContentPage(format!(
            "key {k} does not match its content's chain (its token ids and parent key give {computed})"
        )));
    }
    Ok(())
}

/// Why a page was refused: malformed, or addressed to a namespace this side does not know.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PageRejection {
    /// Malformed.
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    /// Unknown namespace.
    #[error("unknown namespace {0:?}")]
    UnknownNamespace(String),
}

/// An append that passed every check against its namespace: layers in range, a token count in
/// `1..=65536`, a payload of exactly `layers × tokens` tokens in page layout.
#[derive(Debug, Clone)]
pub struct AppendCmd {
    /// The sequence extended.
    pub sequence: SequenceKey,
    /// Layers extended, ascending: one, or every layer of the model.
    pub layers: Vec<u32>,
    /// Tokens appended to each layer.
    pub tokens: u32,
    /// Each layer's tokens in page layout, layer after layer.
    pub payload: Bytes,
    /// Refuse the append unless every layer holds exactly this many tokens.
    pub expected_position: Option<u64>,
}

/// Validate an append of `tokens` tokens to `layer` (or every layer, `None`) of `sequence`.
pub fn append(
    ns: &Namespace,
    sequence: SequenceKey,
    layer: Option<u32>,
    tokens: u32,
    payload: Bytes,
    expected_position: Option<u64>,
) -> Result<AppendCmd, ValidationError> {
    if sequence.is_content() {
        return Err(ValidationError::ContentPage(
            "content pages are immutable: append to a sequence, not to a page key".into(),
        ));
    }
    let layers: Vec<u32> = match layer {
        Some(l) => {
            self::layer(ns, l)?;
            let kind = ns.layer_kind(l);
            if !kind.keeps_tokens() {
                return Err(ValidationError::LayerKind {
                    layer: l,
                    why: if kind.keeps_state() {
                        format!(
                            "a {} layer keeps one state per sequence: put it whole, tokens are not appended",
                            kind.as_str()
                        )
                    } else {
                        format!("an MLP-only layer of {}: it keeps no cache", ns.model.name)
                    },
                });
            }
            vec![l]
        }
        // Every layer that keeps tokens (indexer keys go by their own layer).
        None => (0..ns.model.num_layers).filter(|&l| ns.model.layer(l).keeps_tokens()).collect(),
    };
    let rows = layers.first().map_or(ns.layout(), |&l| ns.layout_for(l));
    append_payload_with(&rows, tokens, layers.len(), payload.len())?;
    Ok(AppendCmd { sequence, layers, tokens, payload, expected_position })
}

/// Validate an append payload: `layers` layers of `tokens` tokens each in page layout.
pub fn append_payload(ns: &Namespace, tokens: u32, layers: usize, payload_len: usize) -> Result<(), ValidationError> {
    append_payload_with(&ns.layout(), tokens, layers, payload_len)
}

/// [`append_payload`] for pages of `layout`.
pub fn append_payload_with(
    layout: &crate::PageLayout,
    tokens: u32,
    layers: usize,
    payload_len: usize,
) -> Result<(), ValidationError> {
    if tokens == 0 || tokens > 1 << 16 {
        return Err(ValidationError::Count { what: "token_count", got: tokens as u64, expected: "1..=65536".into() });
    }
    let expected = layers * layout.payload_bytes(tokens as usize);
    if payload_len != expected {
        return Err(ValidationError::PayloadLength { got: payload_len, expected, tokens });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns() -> Namespace {
        Namespace {
            name: "tenant-a.llama".into(),
            tenant: "a".into(),
            model: ModelSpec::preset("llama-3-8b").unwrap(),
            codec: Codec::Bf16,
            page_tokens: 16,
            replication: 1,
            prefix_seed: 1,
        }
    }

    fn wire_page(ns: &Namespace, tokens: u32) -> pb::Page {
        let payload = Bytes::from(vec![3u8; ns.layout().payload_bytes(tokens as usize)]);
        pb::Page {
            key: Some(pb::PageKey {
                sequence: Some(pb::SequenceKey { namespace: ns.name.clone(), sequence_id: "s1".into() }),
                layer: 3,
                page_index: 0,
            }),
            codec: codec_to_wire(ns.codec),
            token_count: tokens,
            write_seq: 0,
            payload_crc32c: crate::checksum::crc32c(&payload),
            prefix_hash: 0,
            payload,
            ..Default::default()
        }
    }

    fn reject(p: pb::Page) -> String {
        let n = ns();
        page(p, |_| Some(&n)).unwrap_err().to_string()
    }

    #[test]
    fn a_good_page_passes() {
        let n = ns();
        let (_, v) = page(wire_page(&n, 5), |_| Some(&n)).unwrap();
        assert_eq!(v.token_count, 5);
        assert_eq!(v.key.layer, 3);
    }

    #[test]
    fn each_malformed_page_gets_its_error() {
        let n = ns();
        let mut p = wire_page(&n, 5);
        p.key.as_mut().unwrap().layer = 80;
        assert_eq!(reject(p), "layer 80 out of range: model has 32 layers");

        let mut p = wire_page(&n, 5);
        p.codec = codec_to_wire(Codec::Fp8E4m3);
        assert!(reject(p).contains("codec fp8-e4m3 does not match"));

        let mut p = wire_page(&n, 5);
        p.codec = 17;
        assert!(reject(p).contains("unknown codec 17"));

        let mut p = wire_page(&n, 5);
        p.token_count = 17;
        assert!(reject(p).contains("token count 17 out of range"));

        let mut p = wire_page(&n, 5);
        p.payload = p.payload.slice(1..);
        assert!(reject(p).contains("but 5 tokens"));

        let mut p = wire_page(&n, 5);
        p.payload_crc32c ^= 1;
        assert!(reject(p).contains("checksum mismatch"));

        let mut p = wire_page(&n, 5);
        p.key.as_mut().unwrap().sequence.as_mut().unwrap().sequence_id = "x".repeat(65);
        assert!(reject(p).contains("65 bytes, at most 64"));

        let mut p = wire_page(&n, 5);
        p.key.as_mut().unwrap().sequence.as_mut().unwrap().namespace = "Bad Name".into();
        assert!(reject(p).contains("invalid namespace name"));

        let mut p = wire_page(&n, 5);
        p.key = None;
        assert_eq!(reject(p), "missing field `page.key`");

        let p = wire_page(&n, 5);
        assert!(matches!(page(p, |_| None), Err(PageRejection::UnknownNamespace(_))));
    }

    #[test]
    fn hybrid_specs_round_trip_and_bad_layers_are_named() {
        for p in ModelSpec::presets() {
            let wire: pb::ModelSpec = (&p).into();
            assert_eq!(ModelSpec::try_from(wire).unwrap(), p, "{}", p.name);
        }
        let err = |f: &dyn Fn(&mut pb::ModelSpec)| {
            let mut m: pb::ModelSpec = (&ModelSpec::preset("gpt-oss-20b").unwrap()).into();
            f(&mut m);
            ModelSpec::try_from(m).unwrap_err().to_string()
        };
        use pb::layer_spec::Kind;
        let e = err(&|m| m.layers[4].kind = Some(Kind::Sliding(pb::SlidingWindow { window: 0 })));
        assert!(e.contains("layer 4") && e.contains("window 0"), "{e}");
        let e = err(&|m| m.layers[3].kind = Some(Kind::Chunked(pb::ChunkedAttention { chunk: 0 })));
        assert!(e.contains("layer 3") && e.contains("chunk 0"), "{e}");
        let e = err(&|m| m.layers[2].kind = None);
        assert!(e.contains("layer 2") && e.contains("no kind"), "{e}");
        let e = err(&|m| {
            m.layers.pop();
        });
        assert!(e.contains("23 kinds for a model of 24 layers"), "{e}");
        let e = err(&|m| m.indexer = Some(pb::IndexerSpec { num_heads: 64, head_dim: 128, topk: 2048 }));
        assert!(e.contains("indexer needs MLA"), "{e}");
        let mut q: pb::ModelSpec = (&ModelSpec::preset("qwen3-next-80b-a3b").unwrap()).into();
        if let Some(Kind::Linear(l)) = &mut q.layers[0].kind {
            l.num_v_heads = 17;
        }
        let e = ModelSpec::try_from(q).unwrap_err().to_string();
        assert!(e.contains("layer 0") && e.contains("num_v_heads 17"), "{e}");
        let mut n: pb::ModelSpec = (&ModelSpec::preset("nemotron-h-8b").unwrap()).into();
        if let Some(Kind::Mamba2(x)) = &mut n.layers[0].kind {
            x.state_size = 0;
        }
        let e = ModelSpec::try_from(n).unwrap_err().to_string();
        assert!(e.contains("layer 0 (mamba2): state_size 0"), "{e}");
        // Every layer full, listed, is the dense model.
        let mut d: pb::ModelSpec = (&ModelSpec::preset("llama-3-8b").unwrap()).into();
        d.layers = (0..32).map(|_| (&LayerKind::Full).into()).collect();
        assert_eq!(ModelSpec::try_from(d).unwrap(), ModelSpec::preset("llama-3-8b").unwrap());
    }

    #[test]
    fn model_specs_are_checked() {
        let good: pb::ModelSpec = (&ModelSpec::preset("deepseek-v3").unwrap()).into();
        let back = ModelSpec::try_from(good.clone()).unwrap();
        assert_eq!(back, ModelSpec::preset("deepseek-v3").unwrap());

        let mut m: pb::ModelSpec = (&ModelSpec::preset("llama-3-8b").unwrap()).into();
        m.num_kv_heads = 5;
        assert!(ModelSpec::try_from(m).unwrap_err().to_string().contains("not a multiple"));
        let mut m = good.clone();
        m.kv_lora_rank = 0;
        assert!(ModelSpec::try_from(m).unwrap_err().to_string().contains("kv_lora_rank"));
        let mut m = good;
        m.attention = 0;
        assert!(ModelSpec::try_from(m).unwrap_err().to_string().contains("unknown attention kind"));
    }

    #[test]
    fn namespace_round_trips_and_bad_params_are_rejected() {
        let n = ns();
        let wire: pb::Namespace = (&n).into();
        assert_eq!(Namespace::try_from(wire.clone()).unwrap(), n);
        let mut w = wire.clone();
        w.page_tokens = 0;
        assert_eq!(Namespace::try_from(w).unwrap_err(), ValidationError::PageTokens(0));
        let mut w = wire;
        w.replication = 9;
        assert_eq!(Namespace::try_from(w).unwrap_err(), ValidationError::Replication(9));
        assert!(append_payload(&n, 1, 32, 32 * 4096).is_ok());
        assert!(append_payload(&n, 1, 1, 4095).is_err());
    }
}
