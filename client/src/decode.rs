//! Decode through the attention workers: each sequence to its sticky worker (rendezvous over the
//! registered workers), the results reassembled in request order.

use crate::*;
use kvcache_net::Channel;
use kvcache_proto::v1::attention_worker_client::AttentionWorkerClient;
use std::collections::HashMap;

impl Client {
    /// Send a decode batch, each sequence to its sticky worker (rendezvous over the registered
    /// workers), and reassemble the results in request order.
    #[tracing::instrument(target = "kvcache::client", name = "client.decode", skip_all, fields(namespace = %req.namespace, layer = req.layer, sequences = req.items.len()))]
    pub async fn decode(&self, req: pb::DecodeRequest) -> Result<DecodeOutput, ClientError> {
        let routing = self.routing();
        if routing.workers.is_empty() {
            return Err(ClientError::Unavailable { tried: vec![], last: "no worker registered".into() });
        }
        let mut groups: HashMap<usize, Vec<usize>> = HashMap::new();
        for (i, it) in req.items.iter().enumerate() {
            let seq = SequenceKey::new(req.namespace.clone(), it.sequence_id.clone());
            groups.entry(routing.worker_for(&seq)).or_default().push(i);
        }
        let mut futs = Vec::new();
        for (w, idx) in groups {
            let info = routing.workers[w].clone();
            let sub = pb::DecodeRequest {
                namespace: req.namespace.clone(),
                layer: req.layer,
                items: idx.iter().map(|&i| req.items[i].clone()).collect(),
                softmax_scale: req.softmax_scale,
                sinks: req.sinks.clone(),
                vector_dtype: req.vector_dtype,
            };
            let mut c = self.worker(&info)?;
            let r = self.req(sub);
            futs.push(async move { (idx, info.worker_id, c.decode(r).await) });
        }
        let mut results: Vec<Option<pb::DecodeResult>> = vec![None; req.items.len()];
        let mut stats = DecodeStats::default();
        for (idx, worker, r) in futures::future::join_all(futs).await {
            let r = r.map_err(|s| match ClientError::from(s) {
                ClientError::Unavailable { last, .. } => ClientError::Unavailable { tried: vec![worker.clone()], last },
                e => e,
            })?;
            let r = r.into_inner();
            if let Some(s) = r.stats {
                stats.bytes_pulled += s.bytes_pulled;
                stats.pages_pulled += s.pages_pulled;
                stats.pages_cached += s.pages_cached;
                stats.compute_micros = stats.compute_micros.max(s.compute_micros);
                stats.fetch_micros = stats.fetch_micros.max(s.fetch_micros);
                stats.append_micros = stats.append_micros.max(s.append_micros);
                stats.sequences_overlapped += s.sequences_overlapped;
                stats.sequences_recomputed += s.sequences_recomputed;
            }
            for (i, res) in idx.into_iter().zip(r.results) {
                results[i] = Some(res);
            }
        }
        // An unknown encoding was refused by the worker; none reaches here.
        let dtype = pb::VectorDtype::try_from(req.vector_dtype).unwrap_or(pb::VectorDtype::F32);
        let missing = |i: usize| SequenceResult {
            sequence_id: req.items[i].sequence_id.clone(),
            status: SequenceStatus::Unknown(0),
            message: "no worker answered for this sequence".into(),
            output: Bytes::new(),
            output_dtype: dtype,
            lse: Vec::new(),
            context_tokens: 0,
        };
        Ok(DecodeOutput {
            results: results
                .into_iter()
                .enumerate()
                .map(|(i, r)| r.map_or_else(|| missing(i), |r| SequenceResult { output_dtype: dtype, ..r.into() }))
                .collect(),
            stats,
        })
    }

    pub(crate) fn worker(
        &self,
        w: &kvcache_core::routing::WorkerRef,
    ) -> Result<AttentionWorkerClient<Channel>, ClientError> {
        let mut ws = self.inner.workers.lock();
        if let Some(c) = ws.get(&w.address) {
            return Ok(c.clone());
        }
        let c = AttentionWorkerClient::new(channel_with(&w.address, &self.inner.cfg.tls)?)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        ws.insert(w.address.clone(), c.clone());
        Ok(c)
    }
}
