//! Reads: pages with failover across owners, draining nodes and the rest, each page checked as a
//! node checks a write; Lookup; leases.

use crate::*;
use kvcache_core::validate::{self, ValidationError};
use std::collections::HashMap;
use std::time::Duration;
use tonic::Status;

impl Client {
    /// Read candidates of a sequence: its live owners, then draining nodes (still serving reads).
    pub fn read_candidates(&self, seq: &SequenceKey) -> Vec<NodeRef> {
        let r = self.routing();
        let reps = self.namespace(&seq.namespace).map_or(1, |n| n.replication as usize);
        r.read_candidates(seq, reps)
    }

    /// Read pages, in order: `None` is a miss. Fails over across owners per sequence.
    pub async fn get_pages(&self, keys: &[PageKey]) -> Result<Vec<Option<FetchedPage>>, ClientError> {
        let mut out: Vec<Option<FetchedPage>> = vec![None; keys.len()];
        let mut by_seq: HashMap<&SequenceKey, Vec<usize>> = HashMap::new();
        for (i, k) in keys.iter().enumerate() {
            by_seq.entry(&k.sequence).or_default().push(i);
        }
        for (seq, idx) in by_seq {
            let cands = self.read_candidates(seq);
            let mut want = idx;
            let mut tried = Vec::new();
            let mut last_err = None;
            for node in cands {
                if want.is_empty() {
                    break;
                }
                tried.push(node.node_id.clone());
                let sub: Vec<PageKey> = want.iter().map(|&i| keys[i].clone()).collect();
                match self.get_from(&node, &sub).await {
                    Ok(got) => {
                        let mut still = Vec::new();
                        for (i, p) in want.into_iter().zip(got) {
                            match p {
                                Some(p) => out[i] = Some(p),
                                None => still.push(i),
                            }
                        }
                        want = still;
                    }
                    Err(e) => last_err = Some(e),
                }
            }
            if !want.is_empty()
                && let Some(ClientError::Unavailable { last, .. }) = last_err
                && tried.len() == self.read_candidates(seq).len()
                && want.len() == keys.iter().filter(|k| &k.sequence == seq).count()
            {
                return Err(ClientError::Unavailable { tried, last });
            }
        }
        Ok(out)
    }

    /// Read pages from one node: `None` is a miss (or a payload that failed its CRC).
    pub async fn get_from(&self, node: &NodeRef, keys: &[PageKey]) -> Result<Vec<Option<FetchedPage>>, ClientError> {
        self.get_from_into(node, keys, |b| b).await
    }

    /// [`Self::get_from`] with each verified payload passed through `place` as its response
    /// message arrives, while the rest of the stream is still coming in (a worker copies pages
    /// into its cache memory there, so the copy overlaps the transfer and each received frame
    /// buffer is released early).
    ///
    /// Every page is validated with `kvcache_core::validate::page`, the check a node applies to
    /// a write, and must carry the key asked for: a payload whose CRC fails is a miss; anything
    /// else wrong is [`ClientError::BadPage`].
    pub async fn get_from_into(
        &self,
        node: &NodeRef,
        keys: &[PageKey],
        mut place: impl FnMut(Bytes) -> Bytes,
    ) -> Result<Vec<Option<FetchedPage>>, ClientError> {
        let mut routing = self.routing();
        if let Some(k) = keys.iter().find(|k| !routing.namespaces.contains_key(&k.sequence.namespace)) {
            routing = self.refresh().await?;
            if !routing.namespaces.contains_key(&k.sequence.namespace) {
                return Err(ClientError::NotFound(format!("unknown namespace {:?}", k.sequence.namespace)));
            }
        }
        let ch = self.node_channel(&node.node_id, &node.address)?;
        let req = self.req(pb::GetPagesRequest { keys: keys.iter().map(|k| k.into()).collect(), ranges: vec![] });
        let mut out: Vec<Option<FetchedPage>> = Vec::with_capacity(keys.len());
        let mut bad: Option<String> = None;
        let r = zerocopy::get_pages(ch, req, MAX_MESSAGE_BYTES, |m| {
            for item in m.items {
                let want = keys.get(out.len());
                let page = match (item.status, item.page) {
                    (s, Some(p)) if s == pb::PageStatus::Ok as i32 => {
                        let write_seq = p.write_seq;
                        match validate::page(p, |n| routing.namespaces.get(n)) {
                            Ok((_, v)) if Some(&v.key) == want => Some(FetchedPage {
                                key: v.key,
                                token_count: v.token_count,
                                write_seq,
                                prefix_hash: v.prefix_hash,
                                payload: place(v.payload),
                            }),
                            Ok((_, v)) => {
                                bad.get_or_insert(format!("asked for {want:?}, got {:?}", v.key));
                                None
                            }
                            // Corrupted in flight or at rest: a miss, as a node treats it.
                            Err(validate::PageRejection::Invalid(ValidationError::Checksum { .. })) => None,
                            Err(e) => {
                                bad.get_or_insert(e.to_string());
                                None
                            }
                        }
                    }
                    (s, _) if s == pb::PageStatus::Invalid as i32 => {
                        return Err(Status::invalid_argument(item.message));
                    }
                    _ => None,
                };
                out.push(page);
            }
            Ok(())
        })
        .await;
        if let Some(reason) = bad {
            tracing::warn!(node = %node.node_id, %reason, "a node sent a bad page");
            return Err(ClientError::BadPage { node: node.node_id.clone(), reason });
        }
        match r {
            Ok(()) if out.len() == keys.len() => Ok(out),
            Ok(()) => Err(ClientError::Unavailable {
                tried: vec![node.node_id.clone()],
                last: format!("stream ended after {} of {} pages", out.len(), keys.len()),
            }),
            Err(s) if retryable(&s) => {
                Err(ClientError::Unavailable { tried: vec![node.node_id.clone()], last: s.message().to_owned() })
            }
            Err(s) => Err(s.into()),
        }
    }

    /// The rows of `tokens` (strictly ascending) of one layer of `seq` from one node, as one
    /// compact payload of `tokens.len()` tokens in the layer's layout; `None` when a page holding
    /// one of them is not there. Its length is checked against the layout.
    pub async fn get_rows_from(
        &self,
        node: &NodeRef,
        seq: &SequenceKey,
        layer: u32,
        tokens: Vec<u32>,
    ) -> Result<Option<Bytes>, ClientError> {
        let ns = self.namespace_of(seq)?;
        let n = tokens.len();
        let mut c = self.node(&node.node_id, &node.address)?;
        let req = pb::GetRowsRequest { sequence: Some(seq.into()), layer, tokens };
        let r = c.get_rows(self.req(req)).await?.into_inner();
        if !r.found {
            return Ok(None);
        }
        let want = ns.layout_for(layer).payload_bytes(n);
        if r.rows.len() != want {
            return Err(ClientError::BadPage {
                node: node.node_id.clone(),
                reason: format!("GetRows answered {} bytes for {n} rows of {want}", r.rows.len()),
            });
        }
        Ok(Some(r.rows))
    }

    /// Lookup on one node.
    pub async fn lookup_on(
        &self,
        node: &NodeRef,
        seq: &SequenceKey,
        prefix_hashes: Vec<u64>,
        layer: Option<u32>,
    ) -> Result<Holding, ClientError> {
        let mut c = self.node(&node.node_id, &node.address)?;
        let req = pb::LookupRequest { sequence: Some(seq.into()), prefix_hashes, layer };
        Ok(c.lookup(self.req(req)).await?.into_inner().into())
    }

    /// Lookup on the first owner that answers: which pages exist, and the longest cached prefix.
    pub async fn lookup(&self, seq: &SequenceKey, prefix_hashes: Vec<u64>) -> Result<Holding, ClientError> {
        let mut tried = Vec::new();
        let mut last = String::from("no live cache node");
        for n in self.read_candidates(seq) {
            tried.push(n.node_id.clone());
            match self.lookup_on(&n, seq, prefix_hashes.clone(), None).await {
                Ok(r) => return Ok(r),
                Err(ClientError::Unavailable { last: l, .. }) => last = l,
                Err(e) => return Err(e),
            }
        }
        Err(ClientError::Unavailable { tried, last })
    }

    /// Pin a sequence on its first owner for `ttl`. Returns (node, lease id). A sequence over a
    /// cached prefix has the prefix's pages pinned on their own nodes for as long (at most 10
    /// minutes; those pins expire, they are not released).
    pub async fn lease(&self, seq: &SequenceKey, ttl: Duration) -> Result<(NodeRef, u64), ClientError> {
        let node = self
            .read_candidates(seq)
            .into_iter()
            .next()
            .ok_or_else(|| ClientError::Unavailable { tried: vec![], last: "no live cache node".into() })?;
        let id = self.lease_on(&node, seq, ttl).await?;
        let held = self.lookup_on(&node, seq, vec![], Some(0)).await?;
        if !held.prefix.is_empty() {
            self.match_prefix(&seq.namespace, &held.prefix, Some(ttl)).await?;
        }
        Ok((node, id))
    }

    /// Pin a sequence on `node` for `ttl`. Returns the lease id.
    pub async fn lease_on(&self, node: &NodeRef, seq: &SequenceKey, ttl: Duration) -> Result<u64, ClientError> {
        let mut c = self.node(&node.node_id, &node.address)?;
        let ttl_ms = ttl.as_millis().min(u32::MAX as u128) as u32;
        let r = c.lease(self.req(pb::LeaseRequest { sequence: Some(seq.into()), ttl_ms })).await?.into_inner();
        Ok(r.lease_id)
    }

    /// Release a lease taken with [`Client::lease`].
    pub async fn release(&self, node: &NodeRef, lease_id: u64) -> Result<bool, ClientError> {
        let mut c = self.node(&node.node_id, &node.address)?;
        Ok(c.release(pb::ReleaseRequest { lease_id }).await?.into_inner().released)
    }
}
