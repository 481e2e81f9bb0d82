//! Prefix reuse: content pages by key (see `kvcache_core::content`).
//!
//! Every call groups its keys by the node they are placed on and talks to all of those nodes at
//! once, one call each: a 2,048-page prompt spread over the cluster is matched in one round trip
//! per node, and pulled from every node in parallel.
//!
//! - [`Client::match_prefix`]: the longest leading run of keys held with every layer. A node
//!   that cannot be reached has its keys asked of their next replica; without one they count as
//!   absent, so a lost node shortens the prefix, never fails the call.
//! - [`Client::put_content`]: pages by key to every live owner; a key already held with the same
//!   bytes is a cheap no-op the answer counts (`deduplicated`), one held with other bytes is
//!   refused (FAILED_PRECONDITION) and never overwritten.
//! - [`Client::get_content`]: pages by key and layer, misses and unreachable nodes retried on
//!   the next replica.

use crate::*;
use kvcache_core::ContentKey;
use kvcache_core::validate::codec_to_wire;
use std::ops::Range;
use std::time::Duration;

/// The answer of [`Client::match_prefix`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrefixMatch {
    /// The longest prefix every layer can be restored from: the leading keys held with every
    /// layer, or for a hybrid model by each layer kind's rule
    /// (`kvcache_core::ModelSpec::restorable_prefix`). What a request can pull instead of
    /// computing.
    pub pages: usize,
    /// Per key: held with every layer on one of its owners.
    pub present: Vec<bool>,
    /// Per key: the layer groups held on one of its owners (bits of `kvcache_core::spec::held`).
    pub held: Vec<u32>,
}

/// The answer of [`Client::put_content`], summed over the owners written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ContentPut {
    /// Pages written.
    pub written: u64,
    /// Pages already held with the same bytes (nothing written).
    pub deduplicated: u64,
}

/// After a round, how many absent keys past the matched run are asked of their next replica.
const RETRY_WINDOW: usize = 64;

/// Largest PutPages message a content put sends (pages are batched up to it).
const PUT_MESSAGE_BYTES: usize = 16 << 20;

/// Build a content page for the wire: page 0 of the content sequence of `key`, full.
pub fn content_page(ns: &Namespace, key: &ContentKey, layer: u32, payload: Bytes) -> pb::Page {
    pb::Page {
        key: Some(pb::PageKey {
            sequence: Some(pb::SequenceKey { namespace: ns.name.clone(), sequence_id: key.sequence_id() }),
            layer,
            page_index: 0,
        }),
        codec: codec_to_wire(ns.codec),
        token_count: ns.page_tokens,
        write_seq: 0,
        payload_crc32c: kvcache_core::checksum::crc32c(&payload),
        prefix_hash: 0,
        payload,
        ..Default::default()
    }
}

/// A content page that carries its chain record (its token ids and the key before it): the
/// node recomputes the key from them and refuses the page unless they match. Its key is
/// computed here: `ContentKey::chain(seed, parent, tokens)`.
pub fn content_page_chained(
    ns: &Namespace,
    parent: Option<&ContentKey>,
    tokens: &[u32],
    layer: u32,
    payload: Bytes,
) -> (ContentKey, pb::Page) {
    let key = ContentKey::chain(ns.prefix_seed, parent, tokens);
    let mut p = content_page(ns, &key, layer, payload);
    p.token_ids = tokens.to_vec();
    p.parent_key = parent.map_or_else(Bytes::new, |k| Bytes::copy_from_slice(&k.0));
    (key, p)
}

impl Client {
    /// The content keys of every full page of `tokens` in namespace `ns` (its seed and page
    /// size): what [`Client::match_prefix`] and [`Client::put_content`] take.
    pub fn content_keys(&self, ns: &str, tokens: &[u32]) -> Result<Vec<ContentKey>, ClientError> {
        let n = self.namespace(ns).ok_or_else(|| ClientError::NotFound(format!("namespace {ns:?}")))?;
        Ok(ContentKey::chain_all(n.prefix_seed, tokens, n.page_tokens as usize))
    }

    /// The longest leading run of `keys` (a prompt's content keys, in order) that the cluster
    /// holds with every layer. With `lease`, the present keys are pinned on their nodes for that
    /// long, so the pull that follows finds them.
    pub async fn match_prefix(
        &self,
        ns: &str,
        keys: &[ContentKey],
        lease: Option<Duration>,
    ) -> Result<PrefixMatch, ClientError> {
        let n = self.namespace(ns).ok_or_else(|| ClientError::NotFound(format!("namespace {ns:?}")))?;
        let routing = self.routing();
        let cands: Vec<Vec<usize>> =
            keys.iter().map(|k| routing.read_candidate_indices(k.placement_hash(ns), n.replication as usize)).collect();
        let mut present = vec![false; keys.len()];
        let mut held = vec![0u32; keys.len()];
        let groups = n.model.held_groups();
        // Keys to ask (again): every key at first; then those whose node failed, and the absent
        // keys just past the matched run (a replica may hold what a new owner does not yet).
        let mut ask = vec![true; keys.len()];
        let mut next = vec![0usize; keys.len()];
        let lease_ms = lease.map_or(0, |d| d.as_millis().clamp(1, 600_000) as u32);
        let rounds = cands.iter().map(Vec::len).max().unwrap_or(0);
        for round in 0..rounds {
            if round > 0 {
                let leading = present.iter().take_while(|p| **p).count();
                for i in leading..keys.len().min(leading + RETRY_WINDOW) {
                    ask[i] |= !present[i];
                }
            }
            let mut by_node: HashMap<usize, Vec<usize>> = HashMap::new();
            for i in 0..keys.len() {
                if !std::mem::take(&mut ask[i]) || present[i] {
                    continue;
                }
                if let Some(&node) = cands[i].get(next[i]) {
                    by_node.entry(node).or_default().push(i);
                    next[i] += 1;
                }
            }
            if by_node.is_empty() {
                break;
            }
            let calls = by_node.into_iter().map(|(node, idx)| {
                let node = routing.node_at(node).clone();
                let req = pb::MatchPrefixRequest {
                    namespace: ns.to_owned(),
                    keys: idx.iter().map(|&i| Bytes::copy_from_slice(&keys[i].0)).collect(),
                    lease_ms,
                };
                async move {
                    let r = match self.node(&node.node_id, &node.address) {
                        Ok(mut c) => c.match_prefix(self.req(req)).await.map(|r| {
                            let r = r.into_inner();
                            // A node that answers no groups (an older node) holds what it
                            // says is present whole.
                            let h = if r.held.len() == r.present.len() {
                                r.held
                            } else {
                                r.present.iter().map(|&p| if p { groups } else { 0 }).collect()
                            };
                            r.present.into_iter().zip(h).collect::<Vec<(bool, u32)>>()
                        }),
                        Err(e) => Err(Status::unavailable(e.to_string())),
                    };
                    (node, idx, r)
                }
            });
            for (node, idx, r) in futures::future::join_all(calls).await {
                match r {
                    Ok(p) if p.len() == idx.len() => {
                        for (i, (p, h)) in idx.into_iter().zip(p) {
                            present[i] |= p;
                            held[i] |= h;
                        }
                    }
                    Ok(p) => {
                        tracing::warn!(node = %node.node_id, asked = idx.len(), answered = p.len(), "MatchPrefix answered the wrong number of keys: counted absent");
                    }
                    // A node that does not know the namespace holds none of its pages.
                    Err(s) if unknown_namespace(&s) => {}
                    Err(s) if retryable(&s) => {
                        tracing::warn!(node = %node.node_id, error = %s.message(), "MatchPrefix failed: its keys go to their next replica");
                        for i in idx {
                            ask[i] = true;
                        }
                    }
                    Err(s) => return Err(s.into()),
                }
            }
        }
        let pages = if n.model.is_hybrid() {
            n.model.restorable_prefix(&held, n.page_tokens)
        } else {
            present.iter().take_while(|p| **p).count()
        };
        Ok(PrefixMatch { pages, present, held })
    }

    /// Create `seq` over the content pages of `prefix` on every live owner of the sequence: its
    /// first `prefix.len()` pages are those pages (referenced, never copied), its own pages and
    /// appends follow. With `pin`, the prefix's pages are also pinned on their nodes for that
    /// long (at most 10 minutes; a decode re-pins what it pulls). Idempotent.
    pub async fn create_sequence(
        &self,
        seq: &SequenceKey,
        prefix: &[ContentKey],
        pin: Option<Duration>,
    ) -> Result<(), ClientError> {
        let ns = self.namespace_of(seq)?;
        if pin.is_some() {
            self.match_prefix(&seq.namespace, prefix, pin).await?;
        }
        // A state layer starts from the snapshot at the prefix's end: copied (decode overwrites
        // a sequence's state), where token layers reference the prefix's pages.
        let mut states = Vec::new();
        if let Some(last) = prefix.last() {
            for layer in (0..ns.model.num_layers).filter(|&l| ns.model.layer(l).keeps_state()) {
                let Some(st) = self.get_state_snapshot(&ns.name, last, layer).await? else {
                    return Err(ClientError::Miss(format!(
                        "no state snapshot of layer {layer} at the prefix's end ({last}): match the prefix again"
                    )));
                };
                states.push((layer, st));
            }
        }
        self.create_on_owners(seq, &ns, prefix.to_vec(), false).await?;
        for (layer, st) in states {
            self.put_state(seq, layer, &st).await?;
        }
        Ok(())
    }

    /// Seal the full pages `seq` holds after its prefix into content pages, so that the next
    /// request whose prompt continues the same way (a conversation's next turn) finds them.
    /// `token_ids` are the sequence's token ids from the end of its prefix on. Each page that is
    /// full on every layer (and whose ids are given) is put under its chained key with its chain
    /// record (the nodes check it), then the sequence's prefix is extended over those pages and
    /// its own copies dropped. Pages without ids stay the sequence's own (correct, just not
    /// shareable). Returns the pages sealed.
    pub async fn seal(&self, seq: &SequenceKey, token_ids: &[u32]) -> Result<usize, ClientError> {
        let ns = self.namespace_of(seq)?;
        let held = self.lookup(seq, vec![]).await?;
        let pt = ns.page_tokens as usize;
        // The layers that keep tokens (a hybrid model's state and MLP-only layers have none to
        // seal: an engine stores state snapshots itself, `put_state_snapshot`).
        let layers: Vec<u32> = (0..ns.stored_layers()).filter(|&l| ns.layer_kind(l).keeps_tokens()).collect();
        let extents: Option<Vec<u64>> =
            layers.iter().map(|&l| held.layers.iter().find(|e| e.layer == l).map(|e| e.tokens)).collect();
        let Some(extents) = extents.filter(|_| held.exists) else { return Ok(0) };
        let p = held.prefix.len();
        let tokens = extents.into_iter().min().unwrap_or(0) as usize;
        let n = (tokens / pt).saturating_sub(p).min(token_ids.len() / pt);
        if n == 0 || layers.is_empty() {
            return Ok(0);
        }
        let nl = layers.len();
        let want: Vec<PageKey> = (0..n)
            .flat_map(|j| layers.iter().map(move |&l| (j, l)))
            .map(|(j, l)| PageKey { sequence: seq.clone(), layer: l, page_index: (p + j) as u32 })
            .collect();
        let got = self.get_pages(&want).await?;
        let mut parent = held.prefix.last().copied();
        let (mut keys, mut pages) = (Vec::with_capacity(n), Vec::with_capacity(want.len()));
        for j in 0..n {
            let toks = &token_ids[j * pt..(j + 1) * pt];
            let mut key = None;
            for (li, &l) in layers.iter().enumerate() {
                let page = got[j * nl + li].as_ref().filter(|g| g.token_count as usize == pt);
                let page = match page {
                    Some(page) => page,
                    // A sliding or chunked layer released its pages before its window: the key
                    // is sealed without them (a prefix needs them only near its end).
                    None if ns.layer_kind(l) != kvcache_core::spec::LayerKind::Full => continue,
                    None => return Err(ClientError::Miss(format!("page {} of layer {l} to seal", p + j))),
                };
                let (k, wire) = content_page_chained(&ns, parent.as_ref(), toks, l, page.payload.clone());
                key = Some(k);
                pages.push(wire);
            }
            let Some(key) = key else {
                return Err(ClientError::Miss(format!("page {} to seal is held by no layer", p + j)));
            };
            keys.push(key);
            parent = keys.last().copied();
        }
        self.put_content(&ns.name, pages).await?;
        let prefix: Vec<ContentKey> = held.prefix.iter().chain(&keys).copied().collect();
        self.create_on_owners(seq, &ns, prefix, true).await?;
        Ok(n)
    }

    /// CreateSequence of `seq` over `prefix` (sealing with `seal`) on every live owner.
    async fn create_on_owners(
        &self,
        seq: &SequenceKey,
        ns: &Namespace,
        prefix: Vec<ContentKey>,
        seal: bool,
    ) -> Result<(), ClientError> {
        let prefix: Vec<Bytes> = prefix.iter().map(|k| Bytes::copy_from_slice(&k.0)).collect();
        self.write_all_owners(seq, ns, |c, epoch| {
            let req = pb::CreateSequenceRequest { epoch, sequence: Some(seq.into()), prefix: prefix.clone(), seal };
            async move {
                let mut c = c;
                c.create_sequence(req).await.map(|_| ())
            }
        })
        .await
        .map(|_| ())
    }

    /// Store content pages ([`content_page`]) on every live owner of their keys: one PutPages
    /// stream per node. Fails only when some key reached none of its owners, or a node refused
    /// a page (a key held with other bytes: FAILED_PRECONDITION).
    pub async fn put_content(&self, ns: &str, pages: Vec<pb::Page>) -> Result<ContentPut, ClientError> {
        let n = self.namespace(ns).ok_or_else(|| ClientError::NotFound(format!("namespace {ns:?}")))?;
        let mut keys: Vec<SequenceKey> = Vec::with_capacity(pages.len());
        for p in &pages {
            let seq = p
                .key
                .clone()
                .and_then(|k| k.sequence)
                .ok_or_else(|| ClientError::InvalidArgument("page without a key".into()))
                .and_then(|k| SequenceKey::try_from(k).map_err(|e| ClientError::InvalidArgument(e.to_string())))?;
            if !seq.is_content() || seq.namespace != ns {
                return Err(ClientError::InvalidArgument(format!(
                    "put_content takes content pages of namespace {ns:?}; got sequence {:?} of {:?}",
                    seq.sequence_id, seq.namespace
                )));
            }
            keys.push(seq);
        }
        let mut out = ContentPut::default();
        let mut pending: Vec<usize> = (0..pages.len()).collect();
        let mut acked = vec![false; pages.len()];
        let mut last = String::from("no live cache node");
        for attempt in 0..3 {
            let routing = if attempt == 0 { self.routing() } else { self.refresh().await? };
            let mut by_node: HashMap<String, (NodeRef, Vec<usize>)> = HashMap::new();
            for &i in &pending {
                for o in routing.owners(&keys[i], n.replication as usize) {
                    by_node.entry(o.node_id.clone()).or_insert_with(|| (o.clone(), Vec::new())).1.push(i);
                }
            }
            let epoch = routing.epoch;
            let calls = by_node.into_values().map(|(node, idx)| {
                let n = &n;
                let mut msgs = Vec::new();
                let mut cur = pb::PutPagesRequest { epoch, pages: Vec::new(), handoff: false };
                let mut size = 0;
                for &i in &idx {
                    if size + pages[i].payload.len() > PUT_MESSAGE_BYTES && !cur.pages.is_empty() {
                        msgs.push(std::mem::replace(
                            &mut cur,
                            pb::PutPagesRequest { epoch, pages: Vec::new(), handoff: false },
                        ));
                        size = 0;
                    }
                    size += pages[i].payload.len();
                    cur.pages.push(pages[i].clone());
                }
                msgs.push(cur);
                async move {
                    let r = match self.node(&node.node_id, &node.address) {
                        Ok(mut c) => {
                            let mut r = c.put_pages(tokio_stream::iter(msgs.clone())).await;
                            if let Err(s) = &r
                                && unknown_namespace(s)
                            {
                                let ens = pb::EnsureNamespaceRequest { namespace: Some(n.into()) };
                                r = match c.ensure_namespace(ens).await {
                                    Ok(_) => c.put_pages(tokio_stream::iter(msgs)).await,
                                    Err(e) => Err(e),
                                };
                            }
                            r.map(|r| r.into_inner())
                        }
                        Err(e) => Err(Status::unavailable(e.to_string())),
                    };
                    (node, idx, r)
                }
            });
            let mut stale = false;
            for (node, idx, r) in futures::future::join_all(calls).await {
                match r {
                    Ok(r) => {
                        out.written += r.pages_written;
                        out.deduplicated += r.pages_deduplicated;
                        for i in idx {
                            acked[i] = true;
                        }
                    }
                    Err(s) if stale_epoch(&s) => stale = true,
                    Err(s) if retryable(&s) => {
                        tracing::warn!(node = %node.node_id, error = %s.message(), "content put reached only some owners");
                        last = s.message().to_owned();
                    }
                    Err(s) => return Err(s.into()),
                }
            }
            pending.retain(|&i| !acked[i]);
            if pending.is_empty() || !stale {
                break;
            }
        }
        if !pending.is_empty() {
            return Err(ClientError::Unavailable {
                tried: vec![],
                last: format!("{} pages reached no owner: {last}", pending.len()),
            });
        }
        Ok(out)
    }

    /// Read content pages: for each key, its `layers`, key-major (`keys[0]` layer
    /// `layers.start` first). `None` is a miss on every replica.
    pub async fn get_content(
        &self,
        ns: &str,
        keys: &[ContentKey],
        layers: Range<u32>,
    ) -> Result<Vec<Option<FetchedPage>>, ClientError> {
        self.get_content_into(ns, keys, layers, |b| b).await
    }

    /// [`get_content`](Self::get_content) with each verified payload passed through `place` as
    /// its message arrives (a worker copies pages into its cache memory there). Each node's share
    /// is split over its connections, so a long prefix streams from every node on several
    /// connections at once.
    pub async fn get_content_into(
        &self,
        ns: &str,
        keys: &[ContentKey],
        layers: Range<u32>,
        place: impl Fn(Bytes) -> Bytes + Sync,
    ) -> Result<Vec<Option<FetchedPage>>, ClientError> {
        let n = self.namespace(ns).ok_or_else(|| ClientError::NotFound(format!("namespace {ns:?}")))?;
        if layers.end > n.stored_layers() || layers.is_empty() {
            return Err(ClientError::InvalidArgument(format!(
                "layers {}..{} out of range: the model has {} layers{}",
                layers.start,
                layers.end,
                n.model.num_layers,
                if n.model.indexer.is_some() { " (and as many indexer layers after them)" } else { "" }
            )));
        }
        let per = layers.len();
        let routing = self.routing();
        let seqs: Vec<SequenceKey> = keys.iter().map(|k| SequenceKey::content(ns, k)).collect();
        let cands: Vec<Vec<NodeRef>> =
            seqs.iter().map(|s| routing.read_candidates(s, n.replication as usize)).collect();
        let mut out: Vec<Option<FetchedPage>> = vec![None; keys.len() * per];
        let mut next = vec![0usize; keys.len()];
        let rounds = cands.iter().map(Vec::len).max().unwrap_or(0);
        for _ in 0..rounds {
            let mut by_node: HashMap<String, (NodeRef, Vec<usize>)> = HashMap::new();
            for (k, c) in cands.iter().enumerate() {
                let missing = (0..per).any(|l| out[k * per + l].is_none());
                if let (true, Some(node)) = (missing, c.get(next[k])) {
                    by_node.entry(node.node_id.clone()).or_insert_with(|| (node.clone(), Vec::new())).1.push(k);
                    next[k] += 1;
                }
            }
            if by_node.is_empty() {
                break;
            }
            // Each node's share split over its connections: one connection is one core's work
            // on each end, and a node's pages then stream on several at once.
            let lanes = self.connections_per_node();
            let mut parts = Vec::new();
            for (node, ks) in by_node.into_values() {
                let items: Vec<usize> =
                    ks.iter().flat_map(|&k| (0..per).map(move |l| k * per + l)).filter(|&i| out[i].is_none()).collect();
                for part in items.chunks(items.len().div_ceil(lanes).max(1)) {
                    parts.push((node.clone(), part.to_vec()));
                }
            }
            let place = &place;
            let calls = parts.into_iter().map(|(node, items)| {
                let want: Vec<PageKey> = items
                    .iter()
                    .map(|&i| PageKey {
                        sequence: seqs[i / per].clone(),
                        layer: layers.start + (i % per) as u32,
                        page_index: 0,
                    })
                    .collect();
                async move { (node.node_id.clone(), items, self.get_from_into(&node, &want, place).await) }
            });
            for (node, items, r) in futures::future::join_all(calls).await {
                match r {
                    Ok(got) => {
                        for (i, p) in items.into_iter().zip(got) {
                            out[i] = p;
                        }
                    }
                    Err(ClientError::Unavailable { last, .. }) => {
                        tracing::warn!(node = %node, error = %last, "content read failed: next replica");
                    }
                    Err(e @ ClientError::BadPage { .. }) => {
                        tracing::warn!(node = %node, error = %e, "content read answered a bad page: next replica");
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(out)
    }
}
