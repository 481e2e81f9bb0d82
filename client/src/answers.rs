//! The domain types the client takes and answers with: appends and their acknowledgements,
//! extents and holdings (Lookup), fetched pages. No wire type leaves the client in an answer.

use bytes::Bytes;
use kvcache_core::{PageKey, SequenceKey};
use kvcache_proto::v1 as pb;

/// One append of [`Client::append_many`].
#[derive(Debug, Clone)]
pub struct AppendItem {
    /// The sequence.
    pub sequence: SequenceKey,
    /// One layer, or every layer (`None`).
    pub layer: Option<u32>,
    /// Tokens appended.
    pub tokens: u32,
    /// Their K/V (or latents) in page layout, per layer.
    pub payload: Bytes,
    /// Optional token ids, extending the prefix-hash chain.
    pub token_ids: Vec<u32>,
    /// Ask each owner for the layer's extent after the append (single-layer appends).
    pub return_extent: bool,
}

impl AppendItem {
    /// The AppendTokens request of this item, routed with `epoch`.
    pub(crate) fn request(&self, epoch: u64) -> pb::AppendTokensRequest {
        pb::AppendTokensRequest {
            epoch,
            sequence: Some((&self.sequence).into()),
            layer: self.layer.unwrap_or(0),
            all_layers: self.layer.is_none(),
            token_count: self.tokens,
            expected_position: None,
            payload: self.payload.clone(),
            token_ids: self.token_ids.clone(),
            return_extent: self.return_extent,
        }
    }
}

/// A node's answer to an append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppendAck {
    /// The node.
    pub node_id: String,
    /// Tokens each appended layer holds now, in the append's layer order.
    pub layer_tokens: Vec<u64>,
    /// write_seq of each appended layer's last page.
    pub last_page_write_seqs: Vec<u64>,
    /// The layer's extent after the append, when asked for (single-layer appends).
    pub extent: Option<LayerExtent>,
}

impl AppendAck {
    pub(crate) fn new(node_id: String, r: pb::AppendTokensResponse) -> Self {
        Self {
            node_id,
            layer_tokens: r.layer_tokens,
            last_page_write_seqs: r.last_page_write_seqs,
            extent: r.extent.map(LayerExtent::from),
        }
    }
}

/// What a node holds of one layer of a sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerExtent {
    /// The layer.
    pub layer: u32,
    /// Tokens of the layer, its prefix's included.
    pub tokens: u64,
    /// Pages of the sequence's own held.
    pub pages: u32,
    /// write_seq of each page, by page index (0: missing; the prefix's pages are 0).
    pub page_write_seqs: Vec<u64>,
    /// Leading pages that are the sequence's prefix (content pages, [`Holding::prefix`]).
    pub prefix_pages: u32,
}

impl From<pb::LayerExtent> for LayerExtent {
    fn from(l: pb::LayerExtent) -> Self {
        Self {
            layer: l.layer,
            tokens: l.tokens,
            pages: l.pages,
            page_write_seqs: l.page_write_seqs,
            prefix_pages: l.prefix_pages,
        }
    }
}

/// A node's answer to a Lookup: what it holds of a sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holding {
    /// Whether the node holds the sequence at all.
    pub exists: bool,
    /// Per layer asked for: its extent.
    pub layers: Vec<LayerExtent>,
    /// Leading prefix hashes cached on the node (in any sequence of the namespace).
    pub prefix_pages_cached: u32,
    /// The sequence's prefix: the content keys of its first pages (empty: none). A key of the
    /// wrong length is left out, which makes the prefix shorter than its extents say: a reader
    /// then finds the sequence incomplete (a miss), never misplaced.
    pub prefix: Vec<kvcache_core::ContentKey>,
}

impl From<pb::LookupResponse> for Holding {
    fn from(r: pb::LookupResponse) -> Self {
        Self {
            exists: r.exists,
            layers: r.layers.into_iter().map(LayerExtent::from).collect(),
            prefix_pages_cached: r.prefix_pages_cached,
            prefix: r.prefix.iter().filter_map(|k| kvcache_core::ContentKey::from_bytes(k)).collect(),
        }
    }
}

/// A page read from a node, checked as the node checks a write (the key asked for, its
/// namespace's codec, a token count within the page size, a payload of exactly that many
/// tokens, the CRC).
#[derive(Debug, Clone)]
pub struct FetchedPage {
    /// Key.
    pub key: PageKey,
    /// Tokens in the page.
    pub token_count: u32,
    /// The node's write sequence number of the page (changes whenever the page does).
    pub write_seq: u64,
    /// Prefix hash (0 = none).
    pub prefix_hash: u64,
    /// Payload in the namespace's page layout.
    pub payload: Bytes,
}

/// How one sequence of a decode batch came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SequenceStatus {
    /// Attention computed: `output` and `lse` hold it.
    Ok,
    /// The sequence's pages are not available (evicted, deleted, owner lost): recompute.
    Miss,
    /// Writing the new token through to the owners failed; attention was not computed.
    WriteFailed,
    /// The cached pages hold NaN or infinite values: recompute and overwrite the sequence.
    BadData,
    /// A status this client does not know (a newer worker), by its wire number.
    Unknown(i32),
}

impl From<i32> for SequenceStatus {
    fn from(v: i32) -> Self {
        match pb::SequenceStatus::try_from(v) {
            Ok(pb::SequenceStatus::Ok) => Self::Ok,
            Ok(pb::SequenceStatus::Miss) => Self::Miss,
            Ok(pb::SequenceStatus::WriteFailed) => Self::WriteFailed,
            Ok(pb::SequenceStatus::BadData) => Self::BadData,
            _ => Self::Unknown(v),
        }
    }
}

/// One sequence's answer to a decode step.
#[derive(Debug, Clone, PartialEq)]
pub struct SequenceResult {
    /// The sequence.
    pub sequence_id: String,
    /// How it came out.
    pub status: SequenceStatus,
    /// Why, when not OK.
    pub message: String,
    /// `[q_heads][v width]` in [`Self::output_dtype`], little-endian (empty unless OK); see
    /// [`Self::output_f32`].
    pub output: Bytes,
    /// The encoding of `output`: the request's `vector_dtype`.
    pub output_dtype: pb::VectorDtype,
    /// Natural-log log-sum-exp of the scaled scores, per query head.
    pub lse: Vec<f32>,
    /// Tokens attended to.
    pub context_tokens: u64,
}

impl SequenceResult {
    /// The output as f32 values, widened from bf16 when the request asked for it (empty unless
    /// OK, or when its length is no whole number of values).
    pub fn output_f32(&self) -> Vec<f32> {
        self.output_dtype.decode(&self.output).unwrap_or_default()
    }
}

impl From<pb::DecodeResult> for SequenceResult {
    fn from(r: pb::DecodeResult) -> Self {
        Self {
            status: r.status.into(),
            sequence_id: r.sequence_id,
            message: r.message,
            output: r.output,
            output_dtype: pb::VectorDtype::F32,
            lse: r.lse,
            context_tokens: r.context_tokens,
        }
    }
}

/// What a decode step cost, summed over the workers that answered it (times: the slowest).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DecodeStats {
    /// Payload bytes pulled from the nodes.
    pub bytes_pulled: u64,
    /// Pages pulled.
    pub pages_pulled: u64,
    /// Pages served from the workers' caches.
    pub pages_cached: u64,
    /// Attention compute time.
    pub compute_micros: u64,
    /// Time until the pages the first compute reads were in hand (includes `append_micros`
    /// unless the step overlapped its appends with the compute).
    pub fetch_micros: u64,
    /// The write-through of the step's new tokens, until every owner answered.
    pub append_micros: u64,
    /// Sequences computed while their append was in flight, and kept.
    pub sequences_overlapped: u64,
    /// Sequences computed that way whose owner's answer refuted the pages: computed again.
    pub sequences_recomputed: u64,
}

/// A decode step's answer: one result per item, in request order.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodeOutput {
    /// Per sequence, in request order.
    pub results: Vec<SequenceResult>,
    /// Cost.
    pub stats: DecodeStats,
}
