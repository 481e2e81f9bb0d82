//! Writes: puts, appends (one, or a batch with one AppendBatch per owning node) and deletes,
//! each to every live owner of the sequence. A stale-epoch refusal refreshes the map and retries
//! only at the owners that have not acknowledged (so nothing is applied twice); a node that does
//! not know the namespace yet is told it.

use crate::*;
use kvcache_net::Channel;
use kvcache_proto::v1::cache_node_client::CacheNodeClient;
use tonic::{Code, Status};

impl Client {
    /// Store pages (a prefill): each sequence's pages go to all of its live owners.
    pub async fn put_pages(&self, pages: Vec<pb::Page>) -> Result<(), ClientError> {
        let mut by_seq: HashMap<SequenceKey, Vec<pb::Page>> = HashMap::new();
        for p in pages {
            let key = p
                .key
                .clone()
                .and_then(|k| k.sequence)
                .ok_or_else(|| ClientError::InvalidArgument("page without a key".into()))?;
            let seq = SequenceKey::try_from(key).map_err(|e| ClientError::InvalidArgument(e.to_string()))?;
            by_seq.entry(seq).or_default().push(p);
        }
        let futs = by_seq.into_iter().map(|(seq, pages)| self.put_sequence_pages(seq, pages));
        for r in futures::future::join_all(futs).await {
            r?;
        }
        Ok(())
    }

    pub(crate) async fn put_sequence_pages(&self, seq: SequenceKey, pages: Vec<pb::Page>) -> Result<(), ClientError> {
        let ns = self.namespace_of(&seq)?;
        self.write_all_owners(&seq, &ns, |c, epoch| {
            let req = pb::PutPagesRequest { epoch, pages: pages.clone(), handoff: false };
            async move {
                let mut c = c;
                c.put_pages(tokio_stream::iter(vec![req])).await.map(|_| ())
            }
        })
        .await
        .map(|_| ())
    }

    /// Run `op` against every live owner of `seq`; refresh and retry once on a stale epoch, and
    /// push the namespace to a node that does not know it yet. Succeeds when every reachable
    /// owner succeeded and at least one did.
    pub(crate) async fn write_all_owners<T, F, Fut>(
        &self,
        seq: &SequenceKey,
        ns: &Namespace,
        op: F,
    ) -> Result<Vec<(String, T)>, ClientError>
    where
        F: Fn(CacheNodeClient<Channel>, u64) -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        self.write_owners_after(seq, ns, Vec::new(), op).await
    }

    /// [`write_all_owners`](Self::write_all_owners) when the owners in `ok` have already
    /// acknowledged this write (in an [`append_many`](Self::append_many) batch).
    pub(crate) async fn write_owners_after<T, F, Fut>(
        &self,
        seq: &SequenceKey,
        ns: &Namespace,
        mut ok: Vec<(String, T)>,
        op: F,
    ) -> Result<Vec<(String, T)>, ClientError>
    where
        F: Fn(CacheNodeClient<Channel>, u64) -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        let mut routing = self.routing();
        // Owners that acknowledged stay acknowledged: a retry (after a stale-epoch refusal or an
        // unknown namespace at another owner) goes only to the owners still missing, so an
        // append that one owner applied is never applied there twice.
        for attempt in 0..3 {
            let owners: Vec<_> = routing
                .owners(seq, ns.replication as usize)
                .into_iter()
                .filter(|o| !ok.iter().any(|(id, _)| *id == o.node_id))
                .collect();
            if owners.is_empty() {
                if ok.is_empty() {
                    return Err(ClientError::Unavailable { tried: vec![], last: "no live cache node".into() });
                }
                return Ok(ok);
            }
            let mut futs = Vec::new();
            for o in &owners {
                let c = self.node(&o.node_id, &o.address)?;
                futs.push(op(c, routing.epoch));
            }
            let results = futures::future::join_all(futs).await;
            let mut stale = false;
            let mut unknown_ns = Vec::new();
            let mut unreachable = Vec::new();
            for (o, r) in owners.iter().zip(results) {
                match r {
                    Ok(v) => ok.push((o.node_id.clone(), v)),
                    Err(s) if stale_epoch(&s) => stale = true,
                    Err(s) if unknown_namespace(&s) => unknown_ns.push(o.clone()),
                    Err(s) if retryable(&s) => unreachable.push((o.node_id.clone(), s.message().to_owned())),
                    Err(s) => return Err(s.into()),
                }
            }
            if stale && attempt < 2 {
                routing = self.refresh().await?;
                continue;
            }
            if !unknown_ns.is_empty() && attempt < 2 {
                for o in unknown_ns {
                    let mut c = self.node(&o.node_id, &o.address)?;
                    c.ensure_namespace(pb::EnsureNamespaceRequest { namespace: Some(ns.into()) }).await?;
                }
                continue;
            }
            if ok.is_empty() || stale {
                let tried = owners.iter().map(|o| o.node_id.clone()).collect();
                let last = unreachable.last().map(|u| u.1.clone()).unwrap_or_else(|| "stale shard map".into());
                return Err(ClientError::Unavailable { tried, last });
            }
            if !unreachable.is_empty() {
                tracing::warn!(sequence = %seq.sequence_id, unreachable = ?unreachable, "write reached only some owners");
            }
            return Ok(ok);
        }
        Err(ClientError::Unavailable { tried: vec![], last: "retries exhausted".into() })
    }

    /// Append the K/V (or latent) of `tokens` new tokens to one layer (or all, `layer = None`).
    /// Returns each owner's answer.
    pub async fn append(
        &self,
        seq: &SequenceKey,
        layer: Option<u32>,
        tokens: u32,
        payload: Bytes,
        token_ids: Vec<u32>,
    ) -> Result<Vec<AppendAck>, ClientError> {
        let item = AppendItem { sequence: seq.clone(), layer, tokens, payload, token_ids, return_extent: false };
        self.append_inner(&item, Vec::new()).await
    }

    /// [`append`](Self::append) to one layer, each owner also answering with the layer's extent
    /// after the append (`AppendTokensResponse.extent`): what a reader that caches the sequence
    /// needs to validate its copy without a separate `Lookup`.
    pub async fn append_with_extent(
        &self,
        seq: &SequenceKey,
        layer: u32,
        tokens: u32,
        payload: Bytes,
        token_ids: Vec<u32>,
    ) -> Result<Vec<AppendAck>, ClientError> {
        let item =
            AppendItem { sequence: seq.clone(), layer: Some(layer), tokens, payload, token_ids, return_extent: true };
        self.append_inner(&item, Vec::new()).await
    }

    /// Several appends, in one `AppendBatch` call per owning node rather than one call per
    /// append and owner (a decode step's new tokens for its whole batch). Each item ends as
    /// [`append`](Self::append) (or [`append_with_extent`](Self::append_with_extent)) would end
    /// it: an owner that refused the item as stale, did not know its namespace or could not be
    /// reached is retried for that item through the single-append path, and only the owners
    /// that have not acknowledged it, so no owner applies an item twice. Results in item order.
    pub async fn append_many(&self, items: Vec<AppendItem>) -> Vec<Result<Vec<AppendAck>, ClientError>> {
        let routing = self.routing();
        let mut results: Vec<Option<Result<Vec<AppendAck>, ClientError>>> = (0..items.len()).map(|_| None).collect();
        // Per node: its address and the items it owns.
        let mut per_node: Vec<(NodeRef, Vec<usize>)> = Vec::new();
        for (i, it) in items.iter().enumerate() {
            let ns = match self.namespace_of(&it.sequence) {
                Ok(ns) => ns,
                Err(e) => {
                    results[i] = Some(Err(e));
                    continue;
                }
            };
            for o in routing.owners(&it.sequence, ns.replication as usize) {
                match per_node.iter_mut().find(|(n, _)| n.node_id == o.node_id) {
                    Some((_, v)) => v.push(i),
                    None => per_node.push((o, vec![i])),
                }
            }
        }
        let calls = per_node.iter().map(|(node, idx)| {
            let req =
                pb::AppendBatchRequest { appends: idx.iter().map(|&i| items[i].request(routing.epoch)).collect() };
            let req = self.req(req);
            let c = self.node(&node.node_id, &node.address);
            async move {
                let mut c = c.map_err(|e| Status::unavailable(e.to_string()))?;
                let got = c.append_batch(req).await?.into_inner().results;
                if got.len() != idx.len() {
                    return Err(Status::internal(format!("{} answers to {} appends", got.len(), idx.len())));
                }
                Ok(got)
            }
        });
        let answers = futures::future::join_all(calls).await;
        // Per item: the owners that acknowledged it, and the refusals.
        let mut acked: Vec<Vec<(String, pb::AppendTokensResponse)>> = (0..items.len()).map(|_| Vec::new()).collect();
        let mut refused: Vec<Vec<Status>> = (0..items.len()).map(|_| Vec::new()).collect();
        for ((node, idx), answer) in per_node.iter().zip(answers) {
            match answer {
                Ok(got) => {
                    for (&i, r) in idx.iter().zip(got) {
                        match (r.code, r.response) {
                            (0, Some(resp)) => acked[i].push((node.node_id.clone(), resp)),
                            (code, _) => {
                                let mut s = Status::new(Code::from_i32(code), r.message);
                                if let Some(e) = r.node_epoch.and_then(|e| e.to_string().parse().ok()) {
                                    s.metadata_mut().insert(kvcache_proto::metadata::EPOCH, e);
                                }
                                if let Some(v) =
                                    Some(&r.not_found).filter(|v| !v.is_empty()).and_then(|v| v.parse().ok())
                                {
                                    s.metadata_mut().insert(kvcache_proto::metadata::NOT_FOUND, v);
                                }
                                refused[i].push(s);
                            }
                        }
                    }
                }
                Err(s) => idx.iter().for_each(|&i| refused[i].push(s.clone())),
            }
        }
        let mut retries = Vec::new();
        for (i, it) in items.into_iter().enumerate() {
            // Already answered: its namespace is unknown.
            if results[i].is_some() {
                continue;
            }
            let (ok, refused) = (std::mem::take(&mut acked[i]), std::mem::take(&mut refused[i]));
            if let Some(s) = refused
                .iter()
                .find(|s| !(stale_epoch(s) || unknown_namespace(s) || retryable(s) || s.code() == Code::Unimplemented))
            {
                results[i] = Some(Err(s.clone().into()));
            } else if refused.is_empty() && !ok.is_empty() {
                results[i] =
                    Some(Ok(ok.into_iter().map(|(node_id, response)| AppendAck::new(node_id, response)).collect()));
            } else {
                retries.push(async move {
                    let r = self.append_inner(&it, ok).await;
                    (i, r)
                });
            }
        }
        for (i, r) in futures::future::join_all(retries).await {
            results[i] = Some(r);
        }
        results.into_iter().map(|r| r.expect("every item answered")).collect()
    }

    /// One append through AppendTokens to every owner not in `acked` (owners that already
    /// applied it).
    pub(crate) async fn append_inner(
        &self,
        item: &AppendItem,
        acked: Vec<(String, pb::AppendTokensResponse)>,
    ) -> Result<Vec<AppendAck>, ClientError> {
        let ns = self.namespace_of(&item.sequence)?;
        let acks = self
            .write_owners_after(&item.sequence, &ns, acked, |c, epoch| {
                let req = self.req(item.request(epoch));
                async move {
                    let mut c = c;
                    c.append_tokens(req).await.map(|r| r.into_inner())
                }
            })
            .await?;
        Ok(acks.into_iter().map(|(node_id, response)| AppendAck::new(node_id, response)).collect())
    }

    /// Delete a sequence on every node that may hold it.
    pub async fn delete(&self, seq: &SequenceKey) -> Result<u64, ClientError> {
        let ns = self.namespace_of(seq)?;
        let acks = self
            .write_all_owners(seq, &ns, |c, epoch| {
                let req = pb::DeleteSequenceRequest { epoch, sequence: Some(seq.into()) };
                async move {
                    let mut c = c;
                    c.delete_sequence(req).await.map(|r| r.into_inner().pages_deleted)
                }
            })
            .await?;
        Ok(acks.iter().map(|a| a.1).max().unwrap_or(0))
    }
}

/// Build a wire page from its parts, computing the CRC.
pub fn wire_page(ns: &Namespace, key: &PageKey, token_count: u32, prefix_hash: u64, payload: Bytes) -> pb::Page {
    pb::Page {
        key: Some(key.into()),
        codec: codec_to_wire(ns.codec),
        token_count,
        write_seq: 0,
        payload_crc32c: kvcache_core::checksum::crc32c(&payload),
        prefix_hash,
        payload,
        ..Default::default()
    }
}
