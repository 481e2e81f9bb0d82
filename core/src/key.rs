//! Namespaces, sequence keys and page keys.

use crate::codec::Codec;
use crate::layout::PageLayout;
use crate::spec::ModelSpec;
use xxhash_rust::xxh3::xxh3_64;

/// Longest sequence id in bytes (it is stored inline in every page header).
pub const MAX_SEQUENCE_ID_BYTES: usize = 64;
/// Longest namespace name in bytes.
pub const MAX_NAMESPACE_BYTES: usize = 63;
/// Smallest and largest page sizes in tokens.
pub const PAGE_TOKENS_RANGE: std::ops::RangeInclusive<u32> = 1..=4096;
/// Default tokens per page.
pub const DEFAULT_PAGE_TOKENS: u32 = 64;

/// The placement hash of sequence `id` of namespace `ns` (xxh3 of `ns ‖ 0 ‖ id`).
pub fn placement_hash(ns: &str, id: &[u8]) -> u64 {
    let mut buf = [0u8; MAX_NAMESPACE_BYTES + 1 + MAX_SEQUENCE_ID_BYTES];
    if ns.len() <= MAX_NAMESPACE_BYTES && id.len() <= MAX_SEQUENCE_ID_BYTES {
        buf[..ns.len()].copy_from_slice(ns.as_bytes());
        buf[ns.len() + 1..ns.len() + 1 + id.len()].copy_from_slice(id);
        return xxh3_64(&buf[..ns.len() + 1 + id.len()]);
    }
    let mut v = Vec::with_capacity(ns.len() + 1 + id.len());
    v.extend_from_slice(ns.as_bytes());
    v.push(0);
    v.extend_from_slice(id);
    xxh3_64(&v)
}

/// Stable 64-bit id of a namespace name, stored in page headers.
pub fn namespace_id(name: &str) -> u64 {
    xxh3_64(name.as_bytes())
}

/// One tenant's model revision: fixes the model, codec, page size and replication of its pages.
/// Always internally consistent (built by [`crate::validate`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Namespace {
    /// Name, `[a-z0-9][a-z0-9._-]{0,62}`.
    pub name: String,
    /// Owning tenant.
    pub tenant: String,
    /// Model geometry.
    pub model: ModelSpec,
    /// Page codec.
    pub codec: Codec,
    /// Tokens per page.
    pub page_tokens: u32,
    /// Replication factor.
    pub replication: u32,
    /// Prefix-hash seed.
    pub prefix_seed: u64,
}

impl Namespace {
    /// Id stored in page headers.
    pub fn id(&self) -> u64 {
        namespace_id(&self.name)
    }

    /// Payload layout of this namespace's pages.
    pub fn layout(&self) -> PageLayout {
        PageLayout::new(&self.model, self.codec, self.page_tokens as usize)
    }

    /// Layers a sequence stores pages in: the model's layers, then with a DSA indexer one
    /// indexer-key layer per model layer (`num_layers + l` holds layer `l`'s indexer keys).
    pub fn stored_layers(&self) -> u32 {
        self.model.num_layers * if self.model.indexer.is_some() { 2 } else { 1 }
    }

    /// Whether `layer` is an indexer-key layer (`num_layers + l`).
    pub fn is_indexer_layer(&self, layer: u32) -> bool {
        self.model.indexer.is_some() && layer >= self.model.num_layers && layer < 2 * self.model.num_layers
    }

    /// The indexer-key layer of model layer `layer`, when the model has an indexer.
    pub fn indexer_layer(&self, layer: u32) -> Option<u32> {
        self.model.indexer.is_some().then_some(self.model.num_layers + layer)
    }

    /// The page layout of `layer`: the model's rows, or indexer keys for an indexer layer.
    pub fn layout_for(&self, layer: u32) -> PageLayout {
        match self.model.indexer {
            Some(i) if self.is_indexer_layer(layer) => PageLayout::indexer(&i, self.codec, self.page_tokens as usize),
            _ => self.layout(),
        }
    }

    /// Kind of stored layer `layer` (an indexer layer is the kind of its model layer).
    pub fn layer_kind(&self, layer: u32) -> crate::spec::LayerKind {
        if self.is_indexer_layer(layer) {
            self.model.layer(layer - self.model.num_layers)
        } else {
            self.model.layer(layer)
        }
    }

    /// Pages one sequence's state takes in a state layer (linear attention, Mamba2): the state
    /// bytes in full pages, the last one zero-padded. 0 for other layers.
    pub fn state_pages(&self, layer: u32) -> u32 {
        let b = self.model.layer(layer).state_bytes();
        if b == 0 || self.is_indexer_layer(layer) { 0 } else { b.div_ceil(self.layout().page_bytes()) as u32 }
    }

    /// Whether `other` describes the same namespace (everything but the seed, which the creator
    /// picks, must agree).
    pub fn same_definition(&self, other: &Namespace) -> bool {
        self.name == other.name
            && self.tenant == other.tenant
            && self.model == other.model
            && self.codec == other.codec
            && self.page_tokens == other.page_tokens
            && self.replication == other.replication
    }
}

/// A sequence of one namespace.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SequenceKey {
    /// Namespace name.
    pub namespace: String,
    /// Sequence id (≤ 64 bytes).
    pub sequence_id: String,
}

impl SequenceKey {
    /// Build a key (unchecked; wire input goes through [`crate::validate`]).
    pub fn new(namespace: impl Into<String>, sequence_id: impl Into<String>) -> Self {
        Self { namespace: namespace.into(), sequence_id: sequence_id.into() }
    }

    /// The reserved sequence a content page of `key` is stored under (see [`crate::content`]).
    pub fn content(namespace: impl Into<String>, key: &crate::content::ContentKey) -> Self {
        Self { namespace: namespace.into(), sequence_id: key.sequence_id() }
    }

    /// The content key, when this is a content page's sequence.
    pub fn content_key(&self) -> Option<crate::content::ContentKey> {
        crate::content::ContentKey::from_sequence_id(&self.sequence_id)
    }

    /// Whether this is a content page's sequence (immutable full pages, page index 0).
    pub fn is_content(&self) -> bool {
        crate::content::is_content_id(&self.sequence_id)
    }

    /// Placement hash: what rendezvous hashing scores nodes against.
    pub fn placement_hash(&self) -> u64 {
        placement_hash(&self.namespace, self.sequence_id.as_bytes())
    }
}

/// One page: a layer's `page_tokens` consecutive tokens of one sequence.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PageKey {
    /// The sequence.
    pub sequence: SequenceKey,
    /// Layer index.
    pub layer: u32,
    /// Page index within the layer.
    pub page_index: u32,
}
