//! kvcache-core: the domain model of the KV-cache service. No I/O.
//!
//! - [`spec`]: [`ModelSpec`] (MHA/GQA/MQA/MLA geometry, and per-layer kinds: full, sliding,
//!   chunked, linear attention, Mamba2, MLP-only; sinks; the DSA indexer) and presets exact to
//!   published configs, with bytes per token for every codec and bytes per sequence; which
//!   prefix every layer kind can restore.
//! - [`codec`]: row codecs (bf16, f16, fp8-e4m3 with power-of-two tile scales, int8 with a row
//!   scale). Encode from f32, decode to f32; error bounds stated on each.
//! - [`layout`]: [`PageLayout`], where each token's K/V (or MLA latent) sits in a page payload, and
//!   the token-range copies appends need.
//! - [`checksum`]: the CRC-32C every page payload and header carries.
//! - [`page`]: the 128-byte self-describing [`PageHeader`] with its CRC-32C checks.
//! - [`content`]: [`ContentKey`], the chained SHA-256 key of a full page's content, and the
//!   reserved sequence ids content pages are stored under.
//! - [`key`]: namespaces, sequence and page keys, and their compact hashed ids.
//! - [`prefix`]: the legacy 64-bit prefix-hash chain (read for old clients; [`content`] replaces it).
//! - [`placement`]: weighted rendezvous hashing (top-R owners, zone-diverse).
//! - [`routing`]: the validated [`ShardMap`] and [`Routing`] over it (owners, read candidates,
//!   sticky workers) — what every process that follows the cluster routes with.
//! - [`size`]: byte sizes as flags and files write them (`1.5GiB`), and back for people.
//! - [`state`]: recurrent states of linear-attention and Mamba2 layers as stamped full pages.
//! - [`testing`]: the printed, replayable seed of randomized tests.
//! - [`validate`]: `TryFrom` of wire messages into domain types, with [`ValidationError`]s whose
//!   messages say what was wrong and what was expected.
//!
//! Invariants: a [`Namespace`] value is always internally consistent (dims non-zero, codec
//! compatible, page size in range), and a [`validate::ValidPage`] always has a payload whose
//! length equals what its layout demands and whose CRC matched.

pub mod checksum;
pub mod codec;
pub mod content;
pub mod key;
pub mod layout;
pub mod page;
pub mod placement;
pub mod prefix;
pub mod routing;
pub mod size;
pub mod spec;
pub mod state;
pub mod testing;
pub mod validate;

pub use codec::Codec;
pub use content::ContentKey;
pub use key::{Namespace, PageKey, SequenceKey};
pub use layout::PageLayout;
pub use page::{PageError, PageHeader};
pub use routing::{NodeRef, Routing, ShardMap};
pub use spec::{AttentionKind, ModelSpec};
pub use validate::ValidationError;
