//! Decode steps of linear-attention layers (Gated DeltaNet, KDA): each sequence's state read
//! whole from its owners, advanced one step from the request's q, k, v, decay and beta (no model
//! weights: `kvcache_attention::hybrid::linear_step`), its conv state rolled by the step's conv
//! input, written back to every owner, and the layer's output answered. A sequence without a
//! state (never put, evicted, or a read that met a write) is a miss; a state that goes
//! non-finite is BAD_DATA and is not written.

use crate::Worker;
use kvcache_attention::hybrid::{LinearInputs, check_linear, linear_step, roll_conv_state};
use kvcache_core::spec::LinearSpec;
use kvcache_core::{Namespace, SequenceKey};
use kvcache_proto::v1 as pb;
use std::sync::Arc;
use std::time::Instant;
use tonic::Status;

/// One item's inputs, checked.
struct Step {
    seq: SequenceKey,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    g: Vec<f32>,
    beta: Vec<f32>,
    conv: Vec<f32>,
}

fn f32s(i: usize, field: &str, b: &[u8]) -> Result<Vec<f32>, Status> {
    kvcache_proto::f32le::from_bytes(b).ok_or_else(|| {
        Status::invalid_argument(format!("item {i}: linear.{field} is {} bytes, not a whole number of f32", b.len()))
    })
}

impl Worker {
    /// Answer a decode batch of a linear-attention layer.
    pub(crate) async fn decode_linear(
        self: &Arc<Self>,
        req: &pb::DecodeRequest,
        ns: Namespace,
        spec: LinearSpec,
    ) -> Result<pb::DecodeResponse, Status> {
        let started = Instant::now();
        let layer = req.layer;
        // The step's inputs stay f32; the output comes back in the request's encoding.
        let dtype = crate::decode::vector_dtype(req)?;
        let scale = match req.softmax_scale {
            0.0 => 1.0 / (spec.head_k_dim as f32).sqrt(),
            s if s.is_finite() && s > 0.0 => s,
            s => return Err(Status::invalid_argument(format!("softmax_scale {s} must be finite and > 0"))),
        };
        if !req.sinks.is_empty() {
            return Err(Status::invalid_argument(format!(
                "layer {layer} is a {} linear-attention layer: sinks do not apply",
                ns.model.layer(layer).as_str()
            )));
        }
        let mut steps = Vec::with_capacity(req.items.len());
        for (i, it) in req.items.iter().enumerate() {
            let seq = SequenceKey::try_from(pb::SequenceKey {
                namespace: req.namespace.clone(),
                sequence_id: it.sequence_id.clone(),
            })
            .map_err(|e| Status::invalid_argument(format!("item {i}: {e}")))?;
            let Some(x) = &it.linear else {
                return Err(Status::invalid_argument(format!(
                    "item {i}: layer {layer} is a {} linear-attention layer: linear (q, k, v, g, beta) is required",
                    ns.model.layer(layer).as_str()
                )));
            };
            for (field, set) in [
                ("query", !it.query.is_empty()),
                ("new_kv", !it.new_kv.is_empty()),
                ("index_query", !it.index_query.is_empty()),
                ("new_index_key", !it.new_index_key.is_empty()),
            ] {
                if set {
                    return Err(Status::invalid_argument(format!(
                        "item {i}: layer {layer} is a linear-attention layer: {field} does not apply (send linear)"
                    )));
                }
            }
            let step = Step {
                seq,
                q: f32s(i, "q", &x.q)?,
                k: f32s(i, "k", &x.k)?,
                v: f32s(i, "v", &x.v)?,
                g: f32s(i, "g", &x.g)?,
                beta: f32s(i, "beta", &x.beta)?,
                conv: f32s(i, "conv_input", &x.conv_input)?,
            };
            let inputs = LinearInputs { q: &step.q, k: &step.k, v: &step.v, g: &step.g, beta: &step.beta };
            check_linear(&spec, &inputs)
                .map_err(|e| Status::invalid_argument(format!("item {i} (layer {layer}): linear.{e}")))?;
            if !step.conv.is_empty() && step.conv.len() != spec.conv_dim() {
                return Err(Status::invalid_argument(format!(
                    "item {i} (layer {layer}): linear.conv_input has {} values, expected {} (q, k and v channels)",
                    step.conv.len(),
                    spec.conv_dim()
                )));
            }
            if step.conv.iter().any(|v| !v.is_finite()) {
                return Err(Status::invalid_argument(format!(
                    "item {i} (layer {layer}): linear.conv_input holds a NaN or infinite value"
                )));
            }
            if steps.iter().any(|s: &Step| s.seq == step.seq) {
                return Err(Status::invalid_argument(format!(
                    "item {i}: sequence {:?} appears twice in the batch",
                    it.sequence_id
                )));
            }
            steps.push(step);
        }
        let tasks: Vec<_> = steps
            .into_iter()
            .map(|s| {
                let me = self.clone();
                tokio::spawn(async move { me.linear_one(&s, layer, spec, scale).await })
            })
            .collect();
        let mut results = Vec::with_capacity(tasks.len());
        let mut stats = pb::DecodeStats::default();
        for (it, t) in req.items.iter().zip(tasks) {
            let r = t.await.unwrap_or_else(|e| Err((pb::SequenceStatus::Miss, format!("task failed: {e}"))));
            let mut res = pb::DecodeResult { sequence_id: it.sequence_id.clone(), ..Default::default() };
            match r {
                Ok((out, pulled)) => {
                    res.status = pb::SequenceStatus::Ok as i32;
                    res.output = dtype.encode(&out);
                    stats.bytes_pulled += pulled;
                    stats.pages_pulled += ns.state_pages(layer) as u64;
                }
                Err((status, message)) => {
                    res.status = status as i32;
                    res.message = message;
                }
            }
            results.push(res);
        }
        stats.fetch_micros = started.elapsed().as_micros() as u64;
        self.counters.sequences.fetch_add(req.items.len() as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(pb::DecodeResponse { results, stats: Some(stats) })
    }

    /// One sequence's step: (output, state bytes pulled) or its status and message.
    async fn linear_one(
        &self,
        s: &Step,
        layer: u32,
        spec: LinearSpec,
        scale: f32,
    ) -> Result<(Vec<f32>, u64), (pb::SequenceStatus, String)> {
        let miss = |m: String| (pb::SequenceStatus::Miss, m);
        let Some(mut st) = self.client.get_state(&s.seq, layer).await.map_err(|e| miss(e.to_string()))? else {
            return Err(miss(format!(
                "no state of layer {layer} for {:?}: put it after prefill (put_state), or recompute",
                s.seq.sequence_id
            )));
        };
        let pulled = st.len() as u64;
        let (rec, conv) = st.split_at_mut(spec.recurrent_elems() * 4);
        let mut state: Vec<f32> =
            rec.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes"))).collect();
        let mut out = vec![0f32; (spec.num_v_heads * spec.head_v_dim) as usize];
        let x = LinearInputs { q: &s.q, k: &s.k, v: &s.v, g: &s.g, beta: &s.beta };
        linear_step(&spec, &mut state, &x, scale, &mut out).map_err(|e| {
            (pb::SequenceStatus::BadData, format!("the stored state of layer {layer} does not step: {e}"))
        })?;
        if !s.conv.is_empty() {
            roll_conv_state(conv, spec.conv_kernel as usize - 1, &s.conv)
                .map_err(|e| (pb::SequenceStatus::BadData, e.to_string()))?;
        }
        for (d, v) in rec.chunks_exact_mut(4).zip(&state) {
            d.copy_from_slice(&v.to_le_bytes());
        }
        self.client
            .put_state(&s.seq, layer, &st)
            .await
            .map_err(|e| (pb::SequenceStatus::WriteFailed, format!("writing the new state failed: {e}")))?;
        Ok((out, pulled))
    }
}
