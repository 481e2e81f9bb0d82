//! One Decode call, in the order it runs: [`Worker::decode`] = parse (the whole request is
//! checked before anything is written) → append (the step's new tokens, one AppendBatch per
//! owning node) → fetch (each sequence's layer, one task per sequence) → compute (the batch's
//! attention on a blocking thread, an answer per sequence) → respond (statuses, outputs,
//! metrics, the next layer's prefetch).

use crate::{Fetched, SeqFailure, Worker};
use bytes::Bytes;
use kvcache_attention::{AttentionError, AttnShape, BatchItem, KvPage};
use kvcache_client::{AppendAck, AppendItem, ClientError};
use kvcache_core::spec::LayerKind;
use kvcache_core::{Namespace, SequenceKey};
use kvcache_proto::v1 as pb;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;
use tonic::Status;
use tracing::Instrument;

/// A Decode request checked whole.
pub(crate) struct Parsed {
    pub(crate) ns: Namespace,
    pub(crate) layer: u32,
    pub(crate) shape: AttnShape,
    /// The layer's sink logit per query head (models with attention sinks).
    pub(crate) sinks: Option<Vec<f32>>,
    /// Sparse MLA: each item's indexer query and per-head weights.
    pub(crate) index: Vec<Arc<(Vec<f32>, Vec<f32>)>>,
    /// One per item, in request order.
    pub(crate) seqs: Vec<SequenceKey>,
    pub(crate) queries: Vec<Vec<f32>>,
    /// How queries came and outputs go.
    pub(crate) dtype: pb::VectorDtype,
}

/// What the kernel answered for one sequence (by its index in the request).
struct Computed {
    item: usize,
    result: Result<(), AttentionError>,
    output: Vec<f32>,
    lse: Vec<f32>,
}

/// Each item's append outcome (`None`: the item appended nothing).
pub(crate) type Appended = Vec<Option<Result<Vec<AppendAck>, ClientError>>>;

impl Worker {
    /// Answer one decode batch.
    pub async fn decode(self: &Arc<Self>, req: pb::DecodeRequest) -> Result<pb::DecodeResponse, Status> {
        let started = Instant::now();
        if let Some(ns) = self.namespace(&req.namespace).await
            && req.layer < ns.model.num_layers
            && let LayerKind::Linear(spec) = ns.model.layer(req.layer)
        {
            return self.decode_linear(&req, ns, spec).await;
        }
        let mut parsed = self.parse(&req).await?;
        let t_append = Instant::now();
        let (appended, index_appended) = self.append(&parsed, &req.items).await;
        let append_micros = t_append.elapsed().as_micros() as u64;
        let mut fetched = if parsed.ns.model.indexer.is_some() {
            self.fetch_sparse(&parsed, &req.items, appended, index_appended).await
        } else {
            self.fetch(&parsed, &req.items, appended).await
        };
        let mut stats =
            pb::DecodeStats { fetch_micros: started.elapsed().as_micros() as u64, append_micros, ..Default::default() };
        for f in fetched.iter().flatten() {
            stats.bytes_pulled += f.bytes;
            stats.pages_pulled += f.pulled;
            stats.pages_cached += f.cached;
        }
        let t_compute = Instant::now();
        let computed = self.compute(&mut parsed, &fetched).await?;
        stats.compute_micros = t_compute.elapsed().as_micros() as u64;
        let results = respond(&req.items, &mut fetched, computed, parsed.dtype);
        self.counters.sequences.fetch_add(req.items.len() as u64, Ordering::Relaxed);
        self.export_metrics(&results, stats.bytes_pulled);
        // Pull the next layer's pages while the engine works on this one.
        let Parsed { ns, layer, seqs, .. } = parsed;
        if self.cfg.prefetch && layer + 1 < ns.model.num_layers && ns.model.layer(layer + 1).keeps_tokens() {
            let me = self.clone();
            // A sparse layer reads all of its indexer keys, and only the chosen latent pages.
            let next = ns.indexer_layer(layer + 1).unwrap_or(layer + 1);
            self.tasks.spawn(async move {
                for seq in seqs {
                    let _ = me.fetch_layer(&seq, next).await;
                }
            });
        }
        Ok(pb::DecodeResponse { results, stats: Some(stats) })
    }

    /// Check the whole request — namespace, layer, scale, and every item's id, query and new
    /// K/V — before anything is written, so a refused call leaves no trace.
    async fn parse(&self, req: &pb::DecodeRequest) -> Result<Parsed, Status> {
        let ns = self.namespace(&req.namespace).await.ok_or_else(|| {
            kvcache_proto::metadata::not_found(
                kvcache_proto::metadata::NOT_FOUND_NAMESPACE,
                format!("unknown namespace {:?}", req.namespace),
            )
        })?;
        kvcache_core::validate::layer(&ns, req.layer).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let dtype = vector_dtype(req)?;
        let kind = ns.model.layer(req.layer);
        match kind {
            LayerKind::None => {
                return Err(Status::invalid_argument(format!(
                    "layer {} of {} is an MLP-only layer: it keeps no cache to decode from",
                    req.layer, ns.model.name
                )));
            }
            LayerKind::Mamba2(_) => {
                return Err(Status::invalid_argument(format!(
                    "layer {} of {} is a Mamba2 layer: its state is stored and served (put_state/get_state), \
                     but the worker computes attention and gated-delta-rule layers only",
                    req.layer, ns.model.name
                )));
            }
            _ => {}
        }
        let sinks = match (ns.model.sinks, req.sinks.is_empty()) {
            (true, true) => {
                return Err(Status::invalid_argument(format!(
                    "layer {}: {} has attention sinks: sinks must carry {} f32 (one logit per query head)",
                    req.layer, ns.model.name, ns.model.num_q_heads
                )));
            }
            (false, false) => {
                return Err(Status::invalid_argument(format!(
                    "layer {}: sinks given, but {} has no attention sinks",
                    req.layer, ns.model.name
                )));
            }
            (true, false) => {
                let s = kvcache_proto::f32le::from_bytes(&req.sinks).unwrap_or_default();
                if s.len() != ns.model.num_q_heads as usize || s.len() * 4 != req.sinks.len() {
                    return Err(Status::invalid_argument(format!(
                        "layer {}: sinks has {} bytes, expected {} ({} heads × f32)",
                        req.layer,
                        req.sinks.len(),
                        ns.model.num_q_heads * 4,
                        ns.model.num_q_heads
                    )));
                }
                if s.iter().any(|x| !x.is_finite()) {
                    return Err(Status::invalid_argument(format!("layer {}: a sink logit is not finite", req.layer)));
                }
                Some(s)
            }
            (false, true) => None,
        };
        let layout = ns.layout();
        let mut shape = AttnShape::new(&ns.model, layout);
        if req.softmax_scale != 0.0 {
            if !(req.softmax_scale.is_finite() && req.softmax_scale > 0.0) {
                return Err(Status::invalid_argument(format!(
                    "softmax_scale {} must be finite and > 0",
                    req.softmax_scale
                )));
            }
            shape.scale = req.softmax_scale;
        }
        let mut seqs: Vec<SequenceKey> = Vec::with_capacity(req.items.len());
        let mut queries: Vec<Vec<f32>> = Vec::with_capacity(req.items.len());
        let mut index = Vec::new();
        for (i, it) in req.items.iter().enumerate() {
            let seq = SequenceKey::try_from(pb::SequenceKey {
                namespace: req.namespace.clone(),
                sequence_id: it.sequence_id.clone(),
            })
            .map_err(|e| Status::invalid_argument(format!("item {i}: {e}")))?;
            if it.linear.is_some() {
                return Err(Status::invalid_argument(format!(
                    "item {i}: layer {} is a {} attention layer: linear inputs do not apply",
                    req.layer,
                    kind.as_str()
                )));
            }
            if ns.model.indexer.is_none()
                && !(it.index_query.is_empty() && it.index_weights.is_empty() && it.new_index_key.is_empty())
            {
                return Err(Status::invalid_argument(format!(
                    "item {i}: index_query, index_weights and new_index_key apply to sparse MLA layers; {} has no indexer",
                    ns.model.name
                )));
            }
            if let Some(ix) = ns.model.indexer {
                index.push(Arc::new(sparse_inputs(i, req.layer, &ix, it)?));
            }
            if it.query.len() != shape.q_len() * dtype.width() {
                let other = match dtype {
                    pb::VectorDtype::F32 => pb::VectorDtype::Bf16,
                    pb::VectorDtype::Bf16 => pb::VectorDtype::F32,
                };
                let hint = if it.query.len() == shape.q_len() * other.width() {
                    format!("; that is the size of a {} query: is vector_dtype set?", dtype_name(other))
                } else {
                    String::new()
                };
                return Err(Status::invalid_argument(format!(
                    "item {i}: query has {} bytes, expected {} ({} heads × {} {}, little-endian){hint}",
                    it.query.len(),
                    shape.q_len() * dtype.width(),
                    shape.q_heads,
                    shape.qk_width,
                    dtype_name(dtype)
                )));
            }
            let q = dtype.decode(&it.query).unwrap_or_default();
            if let Some(j) = q.iter().position(|x| !x.is_finite()) {
                return Err(Status::invalid_argument(format!(
                    "item {i} (sequence {:?}): query value {j} is {} (every value must be finite)",
                    it.sequence_id, q[j]
                )));
            }
            queries.push(q);
            if !it.new_kv.is_empty() && it.new_kv.len() != layout.payload_bytes(1) {
                return Err(Status::invalid_argument(format!(
                    "item {i}: new_kv is {} bytes, one token of namespace {} is {} bytes ({} codec)",
                    it.new_kv.len(),
                    ns.name,
                    layout.payload_bytes(1),
                    ns.codec.as_str()
                )));
            }
            if !it.new_kv.is_empty()
                && let Some(j) = layout.decode(&it.new_kv, 1).iter().position(|x| !x.is_finite())
            {
                return Err(Status::invalid_argument(format!(
                    "item {i} (sequence {:?}): new_kv value {j} is not finite (NaN or infinity, after decoding the {} codec)",
                    it.sequence_id,
                    ns.codec.as_str()
                )));
            }
            if seqs.contains(&seq) {
                return Err(Status::invalid_argument(format!(
                    "item {i}: sequence {:?} appears twice in the batch",
                    it.sequence_id
                )));
            }
            seqs.push(seq);
        }
        Ok(Parsed { ns, layer: req.layer, shape, sinks, index, seqs, queries, dtype })
    }

    /// Write the step's new tokens through to every owner: one AppendBatch per owning node.
    /// A sparse MLA layer appends the token's indexer key to its indexer layer in the same
    /// batch; the second answer is that append's.
    async fn append(&self, p: &Parsed, items: &[pb::DecodeItem]) -> (Appended, Appended) {
        let appending: Vec<usize> = (0..items.len()).filter(|&i| !items[i].new_kv.is_empty()).collect();
        let il = p.ns.indexer_layer(p.layer);
        let mut batch = Vec::with_capacity(appending.len() * 2);
        for &i in &appending {
            batch.push(AppendItem {
                sequence: p.seqs[i].clone(),
                layer: Some(p.layer),
                tokens: 1,
                payload: items[i].new_kv.clone(),
                token_ids: items[i].new_token_id.map(|t| vec![t]).unwrap_or_default(),
                return_extent: true,
            });
            if let Some(il) = il {
                batch.push(AppendItem {
                    sequence: p.seqs[i].clone(),
                    layer: Some(il),
                    tokens: 1,
                    payload: items[i].new_index_key.clone(),
                    token_ids: Vec::new(),
                    return_extent: true,
                });
            }
        }
        let mut appended: Appended = (0..items.len()).map(|_| None).collect();
        let mut index: Appended = (0..items.len()).map(|_| None).collect();
        let mut answers = self.client.append_many(batch).await.into_iter();
        for i in appending {
            appended[i] = answers.next();
            if il.is_some() {
                index[i] = answers.next();
            }
        }
        (appended, index)
    }

    /// Each sequence's layer: from the cache when the append's answer names exactly what it
    /// holds, else looked up and pulled. One task per sequence: responses are decoded and
    /// cached on every runtime thread, not all on the thread polling this request.
    async fn fetch(
        self: &Arc<Self>,
        p: &Parsed,
        items: &[pb::DecodeItem],
        appended: Appended,
    ) -> Vec<Result<Fetched, SeqFailure>> {
        let layer = p.layer;
        let tasks: Vec<_> = appended
            .into_iter()
            .zip(items)
            .zip(&p.seqs)
            .map(|((acks, it), seq)| {
                let (me, ns, seq) = (self.clone(), p.ns.clone(), seq.clone());
                let new_kv = it.new_kv.clone();
                tokio::spawn(
                    async move {
                        if let Some(acks) = acks {
                            let acks = acks.map_err(|e| SeqFailure::WriteFailed(e.to_string()))?;
                            me.apply_append(&ns, &seq, layer, &acks, &new_kv);
                            if let Some(f) = me.cached_layer(&ns, &seq, layer, &acks) {
                                return Ok(f);
                            }
                        }
                        me.fetch_layer(&seq, layer).await
                    }
                    .in_current_span(),
                )
            })
            .collect();
        join_fetches(tasks).await
    }

    /// Attention for every sequence whose pages are here, on a blocking thread: an answer per
    /// sequence (cached data the kernel refuses is that sequence's alone).
    async fn compute(&self, p: &mut Parsed, fetched: &[Result<Fetched, SeqFailure>]) -> Result<Vec<Computed>, Status> {
        // (item, its pages, tokens of the first page before the window)
        type Ready = (usize, Vec<(Bytes, usize)>, usize);
        let ok: Vec<Ready> = fetched
            .iter()
            .enumerate()
            .filter_map(|(i, f)| f.as_ref().ok().map(|f| (i, f.pages.clone(), f.skip)))
            .collect();
        let queries: Vec<Vec<f32>> = ok.iter().map(|(i, _, _)| std::mem::take(&mut p.queries[*i])).collect();
        let (shape, threads, sinks) = (p.shape, self.cfg.threads, p.sinks.take());
        // Sparse MLA reads a few gathered rows per sequence: it stays on the CPU.
        let device = self.device.clone().filter(|_| p.ns.model.indexer.is_none());
        let (seqs, layer) = (p.seqs.clone(), p.layer);
        tokio::task::spawn_blocking(move || {
            // Per ready item: the kernel's verdict, output and LSE (zeros and −∞ when refused).
            let answers: Vec<Answer> = match device {
                Some(dev) => {
                    let items: Vec<crate::device::DeviceItem> = queries
                        .into_iter()
                        .zip(&ok)
                        .map(|(q, (i, pages, skip))| ((seqs[*i].clone(), layer), q, pages.clone(), *skip))
                        .collect();
                    let answers = dev.decode(&shape, &items).map_err(|e| match e {
                        kvcache_attention::gpu::GpuError::OutOfMemory(m) => Status::resource_exhausted(m),
                        kvcache_attention::gpu::GpuError::Unsupported(m) => Status::failed_precondition(m),
                        e => Status::internal(format!("GPU decode: {e}")),
                    })?;
                    answers
                        .into_iter()
                        .map(|r| match r {
                            Ok((o, l)) => (Ok(()), o, l),
                            Err(e) => (Err(e), vec![0f32; shape.out_len()], vec![f32::NEG_INFINITY; shape.q_heads]),
                        })
                        .collect()
                }
                None => {
                    let kv: Vec<Vec<KvPage>> = ok
                        .iter()
                        .map(|(_, ps, _)| ps.iter().map(|(b, n)| KvPage { payload: b, tokens: *n }).collect())
                        .collect();
                    let items: Vec<BatchItem> = queries
                        .iter()
                        .zip(&kv)
                        .zip(&ok)
                        .map(|((q, p), (_, _, skip))| BatchItem { skip: *skip, ..BatchItem::new(q, p) })
                        .collect();
                    let mut bufs: Vec<(Vec<f32>, Vec<f32>)> =
                        items.iter().map(|_| (vec![0f32; shape.out_len()], vec![0f32; shape.q_heads])).collect();
                    let mut outs: Vec<(&mut [f32], &mut [f32])> =
                        bufs.iter_mut().map(|(o, l)| (&mut o[..], &mut l[..])).collect();
                    let opts = kvcache_attention::calibrate::options_for(&shape, threads);
                    let each = kvcache_attention::decode_batch_each(&shape, &items, &opts, &mut outs);
                    each.into_iter().zip(bufs).map(|(r, (o, l))| (r, o, l)).collect()
                }
            };
            Ok(ok
                .into_iter()
                .zip(answers)
                .map(|((item, _, _), (result, mut output, mut lse))| {
                    let result = match (&sinks, result) {
                        (Some(s), Ok(())) => {
                            kvcache_attention::hybrid::apply_sinks(s, shape.v_width, &mut output, &mut lse)
                        }
                        (_, r) => r,
                    };
                    Computed { item, result, output, lse }
                })
                .collect())
        })
        .await
        .map_err(|e| Status::internal(format!("attention task failed: {e}")))?
    }

    fn export_metrics(&self, results: &[pb::DecodeResult], bytes_pulled: u64) {
        use kvcache_telemetry::names as n;
        let (used, _, hits, misses) = self.cache.stats();
        metrics::counter!(n::WORKER_CACHE_HITS).absolute(hits);
        metrics::counter!(n::WORKER_CACHE_MISSES).absolute(misses);
        metrics::gauge!(n::WORKER_CACHE_BYTES).set(used as f64);
        metrics::counter!(n::WORKER_BYTES_PULLED).absolute(self.counters.bytes_pulled.load(Ordering::Relaxed));
        metrics::histogram!(n::WORKER_BYTES_PER_STEP).record(bytes_pulled as f64);
        for r in results {
            let status = pb::SequenceStatus::try_from(r.status).map_or("unknown", |s| match s {
                pb::SequenceStatus::Ok => "ok",
                pb::SequenceStatus::Miss => "miss",
                pb::SequenceStatus::WriteFailed => "write_failed",
                pb::SequenceStatus::BadData => "bad_data",
                pb::SequenceStatus::Unspecified => "unknown",
            });
            metrics::counter!(n::WORKER_SEQUENCES, "status" => status).increment(1);
        }
    }
}

/// One result per item, in request order: its status and message, and for the ones computed
/// the output, LSE and context length.
/// One ready sequence's kernel verdict, output and LSE (zeros and −∞ when refused).
type Answer = (Result<(), AttentionError>, Vec<f32>, Vec<f32>);

/// Each fetch task's answer in order; a task that died is its sequence's miss.
pub(crate) async fn join_fetches(
    tasks: Vec<tokio::task::JoinHandle<Result<Fetched, SeqFailure>>>,
) -> Vec<Result<Fetched, SeqFailure>> {
    let mut fetched = Vec::with_capacity(tasks.len());
    for t in tasks {
        fetched.push(t.await.unwrap_or_else(|e| Err(SeqFailure::Miss(format!("fetch task failed: {e}")))));
    }
    fetched
}

fn respond(
    items: &[pb::DecodeItem],
    fetched: &mut [Result<Fetched, SeqFailure>],
    computed: Vec<Computed>,
    dtype: pb::VectorDtype,
) -> Vec<pb::DecodeResult> {
    // The query was checked at parse: what the kernel refuses now is that sequence's data.
    for c in &computed {
        if let Err(e) = &c.result {
            fetched[c.item] = Err(SeqFailure::BadData(format!("attention refused the cached pages: {e}")));
        }
    }
    let mut results: Vec<pb::DecodeResult> = items
        .iter()
        .zip(fetched.iter())
        .map(|(it, f)| {
            let (status, message) = match f {
                Ok(_) => (pb::SequenceStatus::Ok, String::new()),
                Err(SeqFailure::Miss(m) | SeqFailure::Raced(m)) => (pb::SequenceStatus::Miss, m.clone()),
                Err(SeqFailure::WriteFailed(m)) => (pb::SequenceStatus::WriteFailed, m.clone()),
                Err(SeqFailure::BadData(m)) => (pb::SequenceStatus::BadData, m.clone()),
            };
            pb::DecodeResult {
                sequence_id: it.sequence_id.clone(),
                status: status as i32,
                message,
                ..Default::default()
            }
        })
        .collect();
    for c in computed.into_iter().filter(|c| c.result.is_ok()) {
        let r = &mut results[c.item];
        r.context_tokens =
            fetched[c.item].as_ref().map_or(0, |f| f.pages.iter().map(|p| p.1 as u64).sum::<u64>() - f.skip as u64);
        r.output = dtype.encode(&c.output);
        r.lse = c.lse;
    }
    results
}

/// The request's vector encoding; an unknown value is refused.
pub(crate) fn vector_dtype(req: &pb::DecodeRequest) -> Result<pb::VectorDtype, Status> {
    pb::VectorDtype::try_from(req.vector_dtype).map_err(|_| {
        Status::invalid_argument(format!("vector_dtype {} is not a known encoding (0: f32, 1: bf16)", req.vector_dtype))
    })
}

/// "f32" or "bf16", for messages.
pub(crate) fn dtype_name(d: pb::VectorDtype) -> &'static str {
    match d {
        pb::VectorDtype::F32 => "f32",
        pb::VectorDtype::Bf16 => "bf16",
    }
}

/// A sparse MLA item's indexer query and weights, checked; and its new indexer key beside its
/// new latent.
fn sparse_inputs(
    i: usize,
    layer: u32,
    ix: &kvcache_core::spec::IndexerSpec,
    it: &pb::DecodeItem,
) -> Result<(Vec<f32>, Vec<f32>), Status> {
    let (h, d) = (ix.num_heads as usize, ix.head_dim as usize);
    let bad = |m: String| Err(Status::invalid_argument(format!("item {i} (layer {layer}, sparse MLA): {m}")));
    if it.index_query.len() != h * d * 4 {
        return bad(format!(
            "index_query has {} bytes, expected {} ({h} indexer heads × {d} f32)",
            it.index_query.len(),
            h * d * 4
        ));
    }
    if it.index_weights.len() != h * 4 {
        return bad(format!("index_weights has {} bytes, expected {} ({h} f32)", it.index_weights.len(), h * 4));
    }
    let q = kvcache_proto::f32le::from_bytes(&it.index_query).unwrap_or_default();
    let w = kvcache_proto::f32le::from_bytes(&it.index_weights).unwrap_or_default();
    if q.iter().chain(&w).any(|x| !x.is_finite()) {
        return bad("index_query and index_weights must be finite".into());
    }
    if it.new_kv.is_empty() != it.new_index_key.is_empty() {
        return bad("new_kv and new_index_key go together: a token's latent and its indexer key".into());
    }
    if !it.new_index_key.is_empty() && it.new_index_key.len() != ix.bytes_per_token() {
        return bad(format!(
            "new_index_key is {} bytes, expected {} ({d} fp8-e4m3 values and an f32 scale per 128)",
            it.new_index_key.len(),
            ix.bytes_per_token()
        ));
    }
    Ok((q, w))
}
