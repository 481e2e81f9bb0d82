//! Handoff: moving sequences to the nodes that own them under the current shard map.
//!
//! Every node runs one handoff task. After each change of the shard-map epoch it walks the
//! sequences it holds whose owners changed since its last pass (all of them after a start), and
//! for each computes the owners under the map:
//!
//! - each owner other than this node is asked what it holds of the sequence (`Lookup`), and the
//!   pages it lacks, or holds with fewer tokens, are copied to it (`PutPages` with `handoff`, so a
//!   copy never clobbers a newer append that reached the owner meanwhile);
//! - if this node is not an owner (it is draining, or a joining node took its share) and every
//!   owner now holds the sequence, the local copy is dropped.
//!
//! That covers the three membership changes: a **drain** empties the node into the remaining
//! owners, then the node can go; a **join** moves the new node's share to it (its weight ramps up,
//! so its share arrives gradually); a **node loss** with R ≥ 2 is repaired by the surviving
//! replica copying to the next owner, restoring R copies. Every holder of a sequence may copy
//! it, but the `Lookup` first makes the second copy a no-op.
//!
//! Passes are driven by the node's [`CoordinatorLink`]: its watched shard map wakes the task on
//! every new epoch (no polling). Sequences whose copy failed are retried every `interval`; every
//! `full_interval` a pass looks at all sequences regardless (anti-entropy: it also repairs a
//! replica that missed a write).

use crate::PageStore;
use kvcache_core::validate;
use kvcache_core::{NodeRef, Routing};
use kvcache_core::{PageKey, SequenceKey};
use kvcache_net::Channel;
use kvcache_net::CoordinatorLink;
use kvcache_net::Tls;
use kvcache_proto::v1 as pb;
use kvcache_proto::v1::cache_node_client::CacheNodeClient;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Settings of the handoff task.
#[derive(Debug, Clone)]
pub struct HandoffConfig {
    /// Failed copies are retried this often.
    pub interval: Duration,
    /// A pass over every sequence (not only those whose owners changed) runs this often.
    pub full_interval: Duration,
    /// Payload bytes per `PutPages` message.
    pub batch_bytes: usize,
}

impl Default for HandoffConfig {
    fn default() -> Self {
        Self { interval: Duration::from_secs(30), full_interval: Duration::from_secs(600), batch_bytes: 8 << 20 }
    }
}

/// What one pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PassReport {
    /// Epoch of the map the pass used.
    pub epoch: u64,
    /// Sequences copied to at least one owner.
    pub copied: u64,
    /// Sequences every owner already held.
    pub current: u64,
    /// Sequences skipped because their owners did not change since the last pass.
    pub unchanged: u64,
    /// Sequences some copy failed for (retried next pass).
    pub failed: u64,
    /// Sequences dropped here after their owners got them.
    pub released: u64,
    /// Payload bytes copied.
    pub bytes: u64,
}

/// Run handoff passes for `node_id` until the task is aborted. A pass runs when `link`'s
/// watched shard map moves to a new epoch (the link must be watching), when failed copies are
/// due for a retry, and every `full_interval`; between them the task sleeps on the watch.
pub async fn run(
    store: Arc<PageStore>,
    node_id: String,
    link: CoordinatorLink,
    tls: Tls,
    cfg: HandoffConfig,
    metrics: Arc<crate::metrics::NodeMetrics>,
) {
    let mut peers = Peers { tls, clients: HashMap::new() };
    let mut maps = link.subscribe();
    let mut done_epoch = 0u64;
    let mut last_pass = Instant::now();
    let mut last_full: Option<Instant> = None;
    let mut prev: Option<Arc<Routing>> = None;
    let mut retry: HashSet<SequenceKey> = HashSet::new();
    loop {
        // Sleep until the map changes or the next retry / full pass is due.
        let full_due = last_full.map_or(Duration::ZERO, |t| cfg.full_interval.saturating_sub(t.elapsed()));
        let retry_in = if retry.is_empty() { full_due } else { cfg.interval.saturating_sub(last_pass.elapsed()) };
        // Without a map yet, only the watch can wake the task.
        let wait = if maps.borrow().epoch == 0 { Duration::MAX } else { full_due.min(retry_in) };
        if !wait.is_zero() {
            tokio::select! {
                changed = maps.changed() => if changed.is_err() { return },
                _ = tokio::time::sleep(wait.min(Duration::from_secs(86_400))) => {}
            }
        }
        let mut routing = maps.borrow_and_update().clone();
        if routing.epoch == 0 {
            continue; // no map yet
        }
        // The node learns epochs at its heartbeats too: a watch behind them is refreshed now.
        if routing.epoch < store.epoch() {
            match link.refresh().await {
                Ok(r) => routing = r,
                Err(e) => tracing::debug!(error = %e, "shard map refresh failed"),
            }
        }
        let full = last_full.is_none_or(|t| t.elapsed() >= cfg.full_interval);
        let retry_due = !retry.is_empty() && last_pass.elapsed() >= cfg.interval;
        if routing.epoch == done_epoch && !full && !retry_due {
            continue;
        }
        let since = if full { None } else { prev.as_deref() };
        let report = pass(&store, &node_id, &routing, since, &mut retry, &mut peers, &cfg).await;
        metrics.handoff(&report);
        if report.copied + report.failed + report.released > 0 {
            tracing::info!(?report, "handoff pass");
        }
        last_pass = Instant::now();
        if full {
            last_full = Some(last_pass);
        }
        done_epoch = routing.epoch;
        prev = Some(routing);
    }
}

/// Channels to the other nodes, by address.
pub struct Peers {
    tls: Tls,
    clients: HashMap<String, CacheNodeClient<Channel>>,
}

impl Peers {
    /// No channels yet; they are made on first use with `tls`.
    pub fn new(tls: Tls) -> Self {
        Self { tls, clients: HashMap::new() }
    }

    fn client(&mut self, addr: &str) -> Result<CacheNodeClient<Channel>, tonic::Status> {
        if let Some(c) = self.clients.get(addr) {
            return Ok(c.clone());
        }
        let ch = kvcache_net::endpoint(addr, &self.tls)
            .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?
            .timeout(Duration::from_secs(30))
            .connect_lazy();
        let c = CacheNodeClient::new(Channel::new(ch, &self.tls))
            .max_decoding_message_size(crate::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(crate::MAX_MESSAGE_BYTES);
        self.clients.insert(addr.to_owned(), c.clone());
        Ok(c)
    }
}

/// One pass over the held sequences under `routing`: all of them, or (given the map of the
/// previous pass as `since`) those whose owners changed and those in `retry`, which is left
/// holding the sequences whose copies failed.
pub async fn pass(
    store: &Arc<PageStore>,
    node_id: &str,
    routing: &Routing,
    since: Option<&Routing>,
    retry: &mut HashSet<SequenceKey>,
    peers: &mut Peers,
    cfg: &HandoffConfig,
) -> PassReport {
    let mut report = PassReport { epoch: routing.epoch, ..Default::default() };
    let ids = |v: Vec<NodeRef>| v.into_iter().map(|o| o.node_id).collect::<Vec<_>>();
    for key in store.sequence_keys() {
        let Some(ns) = routing.namespaces.get(&key.namespace) else { continue };
        let r = ns.replication.max(1) as usize;
        let owners = routing.owners(&key, r);
        if owners.is_empty() {
            continue; // no live node to hand to: keep it
        }
        if let Some(p) = since
            && !retry.contains(&key)
            && ids(p.owners(&key, r)) == ids(owners.clone())
        {
            report.unchanged += 1;
            continue;
        }
        let mut ok = true;
        let mut copied = 0u64;
        for o in owners.iter().filter(|o| o.node_id != node_id) {
            match copy_to(store, &key, o, routing.epoch, peers, cfg).await {
                Ok(b) => copied += b,
                Err(e) => {
                    tracing::warn!(sequence = %key.sequence_id, namespace = %key.namespace, owner = %o.node_id, error = %e, "handoff copy failed");
                    ok = false;
                }
            }
        }
        report.bytes += copied;
        if ok {
            retry.remove(&key);
        } else {
            retry.insert(key.clone());
        }
        if !ok {
            report.failed += 1;
        } else if copied > 0 {
            report.copied += 1;
        } else {
            report.current += 1;
        }
        if ok && !owners.iter().any(|o| o.node_id == node_id) {
            let (s, k, epoch) = (store.clone(), key.clone(), routing.epoch);
            // Refused (FAILED_PRECONDITION) when the node already saw a newer map: next pass.
            if let Ok(Ok(_)) =
                tokio::task::spawn_blocking(move || s.check_epoch(epoch).and_then(|_| s.delete(&k))).await
            {
                report.released += 1;
            } else {
                retry.insert(key);
            }
        }
    }
    report
}

/// Copy to `owner` the pages of `key` it lacks or holds with fewer tokens; returns payload bytes
/// copied.
async fn copy_to(
    store: &Arc<PageStore>,
    key: &SequenceKey,
    owner: &NodeRef,
    epoch: u64,
    peers: &mut Peers,
    cfg: &HandoffConfig,
) -> Result<u64, tonic::Status> {
    let mut c = peers.client(&owner.address)?;
    let theirs = c
        .lookup(pb::LookupRequest { sequence: Some(key.into()), prefix_hashes: Vec::new(), layer: None })
        .await?
        .into_inner();
    // A sequence over a prefix carries its prefix first (its own pages start after it).
    if let Some(prefix) = store.prefix_of(key)
        && theirs.prefix.is_empty()
    {
        let req = pb::CreateSequenceRequest {
            epoch,
            sequence: Some(key.into()),
            prefix: prefix.iter().map(|k| bytes::Bytes::copy_from_slice(&k.0)).collect(),
            seal: false,
        };
        c.create_sequence(req).await?;
    }
    let (s, k) = (store.clone(), key.clone());
    let pages = tokio::task::spawn_blocking(move || missing_pages(&s, &k, &theirs))
        .await
        .map_err(|e| tonic::Status::internal(e.to_string()))?;
    if pages.is_empty() {
        return Ok(0);
    }
    let mut msgs = Vec::new();
    let mut cur = pb::PutPagesRequest { epoch, pages: Vec::new(), handoff: true };
    let (mut cur_bytes, mut total) = (0usize, 0u64);
    for p in pages {
        cur_bytes += p.payload.len();
        total += p.payload.len() as u64;
        cur.pages.push(p);
        if cur_bytes >= cfg.batch_bytes {
            msgs.push(std::mem::replace(&mut cur, pb::PutPagesRequest { epoch, pages: Vec::new(), handoff: true }));
            cur_bytes = 0;
        }
    }
    if !cur.pages.is_empty() {
        msgs.push(cur);
    }
    c.put_pages(tokio_stream::iter(msgs)).await?;
    Ok(total)
}

/// The held pages of `key` that a node answering `theirs` lacks: pages it does not hold, and
/// those at or after its token count in layers where it holds fewer tokens than we do.
fn missing_pages(store: &PageStore, key: &SequenceKey, theirs: &pb::LookupResponse) -> Vec<pb::Page> {
    let Some(ns) = store.namespace(&key.namespace) else { return Vec::new() };
    let Ok((true, ours, _)) = store.lookup(key, &[], None) else { return Vec::new() };
    let page_tokens = u64::from(ns.ns.page_tokens);
    let codec = validate::codec_to_wire(ns.ns.codec);
    let mut out = Vec::new();
    for l in &ours {
        let t = theirs.layers.iter().find(|t| t.layer == l.layer && theirs.exists);
        let (their_tokens, their_seqs) = t.map_or((0, &[][..]), |t| (t.tokens, t.page_write_seqs.as_slice()));
        for (i, &ws) in l.write_seqs.iter().enumerate() {
            if ws == 0 {
                continue;
            }
            let held = their_seqs.get(i).is_some_and(|&w| w != 0);
            let behind = their_tokens < l.tokens && (i as u64) >= their_tokens / page_tokens;
            if held && !behind {
                continue;
            }
            let pk = PageKey { sequence: key.clone(), layer: l.layer, page_index: i as u32 };
            if let Some(p) = store.get_in(&pk) {
                out.push(pb::Page {
                    key: Some((&pk).into()),
                    codec,
                    token_count: p.token_count,
                    write_seq: 0,
                    payload_crc32c: p.crc,
                    prefix_hash: p.prefix_hash,
                    payload: p.payload,
                    ..Default::default()
                });
            }
        }
    }
    out
}
