//! One Decode call, in the order it runs: [`Worker::decode`] = parse (the whole request is
//! checked before anything is written) → speculate (each appending sequence whose layer the
//! cache knows: that layer plus the new token) → append (the step's new tokens, one AppendBatch
//! per owning node), running alongside the compute of the speculated sequences → confirm (each
//! speculation against its owner's answer) → fetch (the other sequences' layers, one task per
//! sequence) → compute (theirs, on a blocking thread, an answer per sequence) → respond
//! (statuses, outputs, metrics, the next layer's prefetch).

use crate::fetch::Speculated;
use crate::{Fetched, Grown, SeqFailure, Worker};
use bytes::Bytes;
use kvcache_attention::gpu::{Output, Query};
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
    /// Each item's query as f32 (empty where `raw_queries` holds it).
    pub(crate) queries: Arc<Vec<Vec<f32>>>,
    /// On a GPU with bf16 vectors: each item's query as it came (the device widens it).
    pub(crate) raw_queries: Arc<Vec<Bytes>>,
    /// How queries came and outputs go.
    pub(crate) dtype: pb::VectorDtype,
}

/// What the kernel answered for one sequence (by its index in the request).
struct Computed {
    item: usize,
    result: Result<(), AttentionError>,
    output: Output,
    lse: Vec<f32>,
    /// The pages computed on, given back (a confirmed speculation keeps its list for the next
    /// step).
    pages: Vec<(Bytes, usize)>,
}

/// One item's append outcome: every owner's answer, or why the write failed.
pub(crate) type AppendAnswer = Result<Vec<AppendAck>, ClientError>;

/// Each item's append outcome (`None`: the item appended nothing).
pub(crate) type Appended = Vec<Option<AppendAnswer>>;

impl Worker {
    /// Answer one decode batch.
    pub async fn decode(self: &Arc<Self>, req: pb::DecodeRequest) -> Result<pb::DecodeResponse, Status> {
        let started = Instant::now();
        let faults0 = tracing::enabled!(tracing::Level::TRACE).then(process_faults);
        if let Some(ns) = self.namespace(&req.namespace).await
            && req.layer < ns.model.num_layers
            && let LayerKind::Linear(spec) = ns.model.layer(req.layer)
        {
            return self.decode_linear(&req, ns, spec).await;
        }
        let parsed = self.parse(&req).await?;
        let parsed_at = started.elapsed();
        let n = req.items.len();
        // Sequences whose layer the cache knows: computed while their append is in flight.
        // (One thread: spread over eight, the H200 host's 64-sequence steps took longer, the
        // threads meeting on the cache's lock.)
        let mut spec: Vec<Option<Speculated>> = req
            .items
            .iter()
            .zip(&parsed.seqs)
            .map(|(it, seq)| {
                let eligible = parsed.ns.model.indexer.is_none() && !it.new_kv.is_empty();
                eligible.then(|| self.speculate(&parsed.ns, seq, parsed.layer, &it.new_kv)).flatten()
            })
            .collect();
        tracing::debug!(parse = ?parsed_at, speculate = ?(started.elapsed() - parsed_at), items = n, "decode step ready");
        let mut stats = pb::DecodeStats::default();
        let mut computed = Vec::new();
        let t_append = Instant::now();
        let (appended, index_appended) = if spec.iter().any(Option::is_some) {
            stats.fetch_micros = started.elapsed().as_micros() as u64;
            let ready: Vec<Ready> =
                spec.iter_mut().enumerate().filter_map(|(i, s)| s.as_mut().map(|s| ready(i, &mut s.fetched))).collect();
            let append = async {
                let a = self.append(&parsed, &req.items).await;
                (a, t_append.elapsed())
            };
            let compute = async {
                let t = Instant::now();
                (self.compute(&parsed, ready).await, t.elapsed())
            };
            let ((a, append_time), (c, compute_time)) = tokio::join!(append, compute);
            stats.append_micros = append_time.as_micros() as u64;
            stats.compute_micros = compute_time.as_micros() as u64;
            computed = c?;
            a
        } else {
            let a = self.append(&parsed, &req.items).await;
            stats.append_micros = t_append.elapsed().as_micros() as u64;
            a
        };
        // Keep each speculation its owner's answer confirms; the others go the usual way.
        let joined_at = started.elapsed();
        let mut fetched: Vec<Option<Result<Fetched, SeqFailure>>> = (0..n).map(|_| None).collect();
        for (i, s) in spec.into_iter().enumerate() {
            let Some(s) = s else { continue };
            let pages = computed.iter_mut().find(|c| c.item == i).map(|c| std::mem::take(&mut c.pages));
            let confirmed = match (&appended[i], pages) {
                (Some(Ok(acks)), Some(pages)) => self.confirm(&parsed.seqs[i], parsed.layer, &s, acks, pages),
                _ => false,
            };
            if confirmed {
                stats.sequences_overlapped += 1;
                fetched[i] = Some(Ok(s.fetched));
            } else {
                stats.sequences_recomputed += 1;
                computed.retain(|c: &Computed| c.item != i);
            }
        }
        let rest: Vec<usize> = (0..n).filter(|&i| fetched[i].is_none()).collect();
        if !rest.is_empty() {
            let got = if parsed.ns.model.indexer.is_some() {
                self.fetch_sparse(&parsed, &req.items, appended, index_appended).await.into_iter().enumerate().collect()
            } else {
                let mut appended = appended;
                let todo = rest.iter().map(|&i| (i, appended[i].take())).collect();
                self.fetch(&parsed, &req.items, todo).await
            };
            let mut got = got;
            let ready: Vec<Ready> = got.iter_mut().filter_map(|(i, f)| f.as_mut().ok().map(|f| ready(*i, f))).collect();
            for (i, f) in got {
                fetched[i] = Some(f);
            }
            if stats.fetch_micros == 0 {
                stats.fetch_micros = started.elapsed().as_micros() as u64;
            }
            if !ready.is_empty() {
                let t = Instant::now();
                computed.extend(self.compute(&parsed, ready).await?);
                stats.compute_micros += t.elapsed().as_micros() as u64;
            }
        }
        let mut fetched: Vec<Result<Fetched, SeqFailure>> = fetched
            .into_iter()
            .map(|f| f.unwrap_or_else(|| Err(SeqFailure::Miss("the sequence was not fetched".into()))))
            .collect();
        for f in fetched.iter().flatten() {
            stats.bytes_pulled += f.bytes;
            stats.pages_pulled += f.pulled;
            stats.pages_cached += f.cached;
        }
        let responding_at = started.elapsed();
        let results = respond(&req.items, &mut fetched, computed, parsed.dtype);
        self.counters.sequences.fetch_add(n as u64, Ordering::Relaxed);
        self.export_metrics(&results, &stats);
        tracing::debug!(
            joined = ?joined_at,
            confirm = ?(responding_at - joined_at),
            total = ?started.elapsed(),
            items = n,
            "decode step done"
        );
        if let Some(f) = faults0 {
            tracing::trace!(faults = process_faults().saturating_sub(f), "decode step's page faults (the process's)");
        }
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
        let raw = self.device.is_some() && dtype == pb::VectorDtype::Bf16 && ns.model.indexer.is_none();
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
            // A GPU takes bf16 queries as they came (widened on the device): checked in place.
            let q = if raw { Vec::new() } else { dtype.decode(&it.query).unwrap_or_default() };
            let bad = if raw {
                kvcache_core::codec::first_non_finite_bf16(&it.query)
            } else {
                kvcache_core::codec::first_non_finite_f32(&q)
            };
            if let Some(j) = bad {
                let v = dtype.decode(&it.query[j * dtype.width()..(j + 1) * dtype.width()]).unwrap_or_default();
                return Err(Status::invalid_argument(format!(
                    "item {i} (sequence {:?}): query value {j} is {} (every value must be finite)",
                    it.sequence_id, v[0]
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
        let raw_queries =
            if raw { Arc::new(req.items.iter().map(|it| it.query.clone()).collect()) } else { Arc::default() };
        Ok(Parsed { ns, layer: req.layer, shape, sinks, index, seqs, queries: Arc::new(queries), raw_queries, dtype })
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

    /// The layers of the items `todo` names (with each one's append answer): from the cache
    /// when the append's answer names exactly what it holds, else looked up and pulled. One
    /// task per sequence: responses are decoded and cached on every runtime thread, not all on
    /// the thread polling this request.
    async fn fetch(
        self: &Arc<Self>,
        p: &Parsed,
        items: &[pb::DecodeItem],
        todo: Vec<(usize, Option<AppendAnswer>)>,
    ) -> Vec<(usize, Result<Fetched, SeqFailure>)> {
        let layer = p.layer;
        // On a GPU, each sequence's pulled pages go up as soon as they are in, while the rest
        // of the batch is still arriving.
        // (`KVCACHE_GPU_PRELOAD=0` copies them at the compute instead, to compare.)
        let preload = std::env::var_os("KVCACHE_GPU_PRELOAD").is_none_or(|v| v != "0");
        let device = self.device.clone().filter(|_| preload && p.ns.model.indexer.is_none());
        let layout = p.shape.layout;
        let (index, tasks): (Vec<usize>, Vec<_>) = todo
            .into_iter()
            .map(|(i, acks)| {
                let (me, ns, seq) = (self.clone(), p.ns.clone(), p.seqs[i].clone());
                let new_kv = items[i].new_kv.clone();
                let device = device.clone();
                let task = tokio::spawn(
                    async move {
                        if let Some(acks) = acks {
                            let acks = acks.map_err(|e| SeqFailure::WriteFailed(e.to_string()))?;
                            let grew = me.apply_append(&ns, &seq, layer, &acks, &new_kv);
                            if let Some(mut f) = me.cached_layer(&ns, &seq, layer, &acks) {
                                // The device mirror extends its copy of the old last page in place.
                                f.grown = grew
                                    .filter(|(b, _)| f.pages.last().is_some_and(|p| p.0.as_ptr() == b.as_ptr()))
                                    .map(|g| g.1);
                                return Ok(f);
                            }
                        }
                        let f = me.fetch_layer(&seq, layer).await?;
                        if let Some(dev) = device.filter(|_| f.pulled > 0) {
                            let pages = f.pages.clone();
                            // Best effort: a layer that does not fit is the decode's to refuse.
                            let up = tokio::task::spawn_blocking(move || dev.preload(&layout, (seq, layer), &pages));
                            if let Ok(Err(e)) = up.await {
                                tracing::debug!(error = %e, "pages not copied to the GPU ahead of the decode");
                            }
                        }
                        Ok(f)
                    }
                    .in_current_span(),
                );
                (i, task)
            })
            .unzip();
        index.into_iter().zip(join_fetches(tasks).await).collect()
    }

    /// Attention for the sequences `ready` names (with their pages), on a blocking thread: an
    /// answer per sequence (cached data the kernel refuses is that sequence's alone).
    async fn compute(&self, p: &Parsed, ready: Vec<Ready>) -> Result<Vec<Computed>, Status> {
        let (shape, threads, sinks) = (p.shape, self.cfg.threads, p.sinks.clone());
        // Sparse MLA reads a few gathered rows per sequence: it stays on the CPU.
        let device = self.device.clone().filter(|_| p.ns.model.indexer.is_none());
        let (seqs, layer, queries, raw) = (p.seqs.clone(), p.layer, p.queries.clone(), p.raw_queries.clone());
        // Outputs rounded to bf16 on the device when they travel so (sinks rescale f32 first).
        let bf16_out = p.dtype == pb::VectorDtype::Bf16 && sinks.is_none();
        let mut ok = ready;
        let handed = Instant::now();
        let r = tokio::task::spawn_blocking(move || {
            let started = handed.elapsed();
            let faults0 = tracing::enabled!(tracing::Level::TRACE).then(thread_faults);
            // Per ready item: the kernel's verdict, output and LSE (zeros and −∞ when refused).
            let answers: Vec<Answer> = match device {
                Some(dev) => {
                    let items: Vec<crate::device::DeviceItem> = ok
                        .iter()
                        .map(|(i, pages, skip, grown)| crate::device::DeviceItem {
                            key: (seqs[*i].clone(), layer),
                            q: match raw.get(*i) {
                                Some(b) => Query::Bf16(b),
                                None => Query::F32(&queries[*i]),
                            },
                            pages,
                            skip: *skip,
                            grown: grown.as_ref(),
                        })
                        .collect();
                    let (answers, built) = dev.decode(&shape, &items, bf16_out).map_err(|e| match e {
                        kvcache_attention::gpu::GpuError::OutOfMemory(m) => Status::resource_exhausted(m),
                        kvcache_attention::gpu::GpuError::Unsupported(m) => Status::failed_precondition(m),
                        e => Status::internal(format!("GPU decode: {e}")),
                    })?;
                    drop(items);
                    // The pending last pages, built while the kernels ran, take their places.
                    for ((_, pages, _, _), b) in ok.iter_mut().zip(built) {
                        if let (Some(b), Some(last)) = (b, pages.last_mut()) {
                            last.0 = b;
                        }
                    }
                    answers
                        .into_iter()
                        .map(|r| match r {
                            Ok((o, l)) => (Ok(()), o, l),
                            Err(e) => (
                                Err(e),
                                Output::F32(vec![0f32; shape.out_len()]),
                                vec![f32::NEG_INFINITY; shape.q_heads],
                            ),
                        })
                        .collect()
                }
                None => {
                    // A pending last page (built by the GPU path) is built here first.
                    for (_, pages, _, grown) in &mut ok {
                        if let (Some(g), Some(last)) = (grown.as_ref().filter(|g| g.pending), pages.last_mut()) {
                            last.0 = g.merge();
                        }
                    }
                    let kv: Vec<Vec<KvPage>> = ok
                        .iter()
                        .map(|(_, ps, _, _)| ps.iter().map(|(b, n)| KvPage { payload: b, tokens: *n }).collect())
                        .collect();
                    let items: Vec<BatchItem> = ok
                        .iter()
                        .zip(&kv)
                        .map(|((i, _, skip, _), p)| BatchItem { skip: *skip, ..BatchItem::new(&queries[*i], p) })
                        .collect();
                    let mut bufs: Vec<(Vec<f32>, Vec<f32>)> =
                        items.iter().map(|_| (vec![0f32; shape.out_len()], vec![0f32; shape.q_heads])).collect();
                    let mut outs: Vec<(&mut [f32], &mut [f32])> =
                        bufs.iter_mut().map(|(o, l)| (&mut o[..], &mut l[..])).collect();
                    let qs: Vec<&[f32]> = items.iter().map(|it| it.q).collect();
                    let opts = kvcache_attention::calibrate::options_for(&shape, threads, &qs);
                    let each = kvcache_attention::decode_batch_each(&shape, &items, &opts, &mut outs);
                    each.into_iter().zip(bufs).map(|(r, (o, l))| (r, Output::F32(o), l)).collect()
                }
            };
            Ok(ok
                .into_iter()
                .zip(answers)
                .map(|((item, pages, _, _), (result, mut output, mut lse))| {
                    let result = match (&sinks, result) {
                        (Some(s), Ok(())) => match &mut output {
                            Output::F32(o) => kvcache_attention::hybrid::apply_sinks(s, shape.v_width, o, &mut lse),
                            Output::Bf16(_) => unreachable!("sinks ask for f32 outputs"),
                        },
                        (_, r) => r,
                    };
                    Computed { item, result, output, lse, pages }
                })
                .collect::<Vec<_>>())
            .map(|c| (c, started, faults0.map(|f| thread_faults().saturating_sub(f)), Instant::now()))
        })
        .await
        .map_err(|e| Status::internal(format!("attention task failed: {e}")))?;
        r.map(|(c, started, faults, done)| {
            tracing::trace!(started = ?started, resumed = ?done.elapsed(), faults, "compute hand-off");
            c
        })
    }

    fn export_metrics(&self, results: &[pb::DecodeResult], stats: &pb::DecodeStats) {
        let bytes_pulled = stats.bytes_pulled;
        use kvcache_telemetry::names as n;
        let (used, _, hits, misses) = self.cache.stats();
        metrics::counter!(n::WORKER_CACHE_HITS).absolute(hits);
        metrics::counter!(n::WORKER_CACHE_MISSES).absolute(misses);
        metrics::gauge!(n::WORKER_CACHE_BYTES).set(used as f64);
        metrics::counter!(n::WORKER_BYTES_PULLED).absolute(self.counters.bytes_pulled.load(Ordering::Relaxed));
        metrics::histogram!(n::WORKER_BYTES_PER_STEP).record(bytes_pulled as f64);
        metrics::counter!(n::WORKER_OVERLAPPED).increment(stats.sequences_overlapped);
        metrics::counter!(n::WORKER_RECOMPUTED).increment(stats.sequences_recomputed);
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

/// One ready sequence's kernel verdict, output and LSE (zeros and −∞ when refused).
type Answer = (Result<(), AttentionError>, Output, Vec<f32>);

/// A sequence ready to compute: (item, its pages, tokens of the first page before the window,
/// how its last page grew this step).
type Ready = (usize, Vec<(Bytes, usize)>, usize, Option<Grown>);

/// Hand a fetched layer's pages to the compute (moved, not cloned: a 32K-token layer is 512
/// pages), keeping the context length its answer reports.
/// Minor page faults of the calling thread so far (0 where /proc cannot tell): at trace level,
/// the compute reports how many of a step's first touches were its own.
fn thread_faults() -> u64 {
    faults_in("/proc/thread-self/stat")
}

/// [`thread_faults`] of the whole process.
fn process_faults() -> u64 {
    faults_in("/proc/self/stat")
}

fn faults_in(stat: &str) -> u64 {
    let s = std::fs::read_to_string(stat).unwrap_or_default();
    // Field 10 (minflt), counted after the command name's closing parenthesis (field 2).
    s.rsplit(')').next().and_then(|r| r.split_whitespace().nth(7)).and_then(|v| v.parse().ok()).unwrap_or(0)
}

fn ready(i: usize, f: &mut Fetched) -> Ready {
    f.context = f.pages.iter().map(|p| p.1 as u64).sum::<u64>() - f.skip as u64;
    (i, std::mem::take(&mut f.pages), f.skip, f.grown.take())
}

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

/// One result per item, in request order: its status and message, and for the ones computed
/// the output, LSE and context length.
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
        r.context_tokens = fetched[c.item].as_ref().map_or(0, |f| f.context);
        r.output = match c.output {
            Output::F32(o) => dtype.encode(&o),
            // Rounded on the device, as the request asked.
            Output::Bf16(b) => Bytes::from(b),
        };
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
