//! Request traces in the format Mooncake published with its FAST'25 paper, a generator of such
//! traces, an exact LRU simulation of their prefix hits, and their replay against a cluster.
//!
//! A trace is JSON lines: `{"timestamp": ms, "input_length": tokens, "output_length": tokens,
//! "hash_ids": [ids of the prompt's 512-token blocks]}`. Equal ids mean equal content and an
//! equal prefix up to that block, so a block id is a content key: the replay stores block `id` as
//! the content page of `ContentKey::from_engine_key("trace-block-<id>")`, one page of 512 tokens
//! per layer.
//!
//! A request's hit is the longest leading run of its blocks the cache holds (the cluster answers
//! it with one MatchPrefix per node); its hit tokens are that many blocks' tokens, at most its
//! input length (the last block may be partial).

use crate::synth::content_page;
use hdrhistogram::Histogram;
use kvcache_client::Client;
use kvcache_core::{ContentKey, Namespace};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

/// Tokens per trace block (Mooncake's hash block size).
pub const BLOCK_TOKENS: u32 = 512;

/// One request of a trace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Arrival, in milliseconds from the start of the trace.
    pub timestamp: u64,
    /// Prompt tokens.
    pub input_length: u64,
    /// Generated tokens.
    pub output_length: u64,
    /// Block ids of the prompt, in order.
    pub hash_ids: Vec<u64>,
}

/// Parse a trace (JSON lines; blank lines skipped). Errors name the line and what is wrong.
pub fn parse(text: &str) -> anyhow::Result<Vec<Request>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let r: Request = serde_json::from_str(line).map_err(|e| {
            anyhow::anyhow!("trace line {}: {e} (expected timestamp, input_length, output_length, hash_ids)", i + 1)
        })?;
        let blocks = r.input_length.div_ceil(BLOCK_TOKENS as u64);
        anyhow::ensure!(
            r.hash_ids.len() as u64 == blocks,
            "trace line {}: {} hash_ids for {} input tokens; expected {blocks} (one per {BLOCK_TOKENS}-token block)",
            i + 1,
            r.hash_ids.len(),
            r.input_length
        );
        out.push(r);
    }
    Ok(out)
}

/// Write a trace as JSON lines.
pub fn to_jsonl(reqs: &[Request]) -> String {
    reqs.iter().map(|r| serde_json::to_string(r).expect("serializable") + "\n").collect()
}

/// A deterministic generator (xorshift).
struct Gen(u64);

impl Gen {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Generate `requests` requests shaped like a chat and document-QA service: shared system
/// prompts and documents of Zipf popularity, multi-turn conversations whose next turn repeats
/// the whole history (prompt and answer) and adds a question.
pub fn generate(requests: usize, seed: u64) -> Vec<Request> {
    let mut g = Gen(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mut next_id = 0u64;
    let fresh = |n: u64, next_id: &mut u64| -> Vec<u64> {
        let v = (*next_id..*next_id + n).collect();
        *next_id += n;
        v
    };
    // 64 shared prefixes of 2..=24 blocks; Zipf(1) popularity.
    let prefixes: Vec<Vec<u64>> = (0..64).map(|_| fresh(2 + g.below(23), &mut next_id)).collect();
    let weights: Vec<f64> = (1..=prefixes.len()).map(|r| 1.0 / r as f64).collect();
    let total: f64 = weights.iter().sum();
    let mut sessions: Vec<Vec<u64>> = Vec::new();
    let mut out = Vec::with_capacity(requests);
    let mut t = 0u64;
    for _ in 0..requests {
        t += 1 + g.below(200);
        let follow_up = !sessions.is_empty() && g.unit() < 0.5;
        let ids = if follow_up {
            // The conversation's history (its last prompt and answer) plus a new question.
            let s = g.below(sessions.len() as u64) as usize;
            let mut ids = sessions[s].clone();
            ids.extend(fresh(1 + g.below(3), &mut next_id));
            sessions[s] = ids.clone();
            ids
        } else {
            let mut x = g.unit() * total;
            let mut p = 0;
            while p + 1 < weights.len() && x >= weights[p] {
                x -= weights[p];
                p += 1;
            }
            let mut ids = prefixes[p].clone();
            ids.extend(fresh(1 + g.below(4), &mut next_id));
            if sessions.len() < 256 {
                sessions.push(ids.clone());
            } else {
                let s = g.below(256) as usize;
                sessions[s] = ids.clone();
            }
            ids
        };
        let input_length = (ids.len() as u64 - 1) * BLOCK_TOKENS as u64 + 1 + g.below(BLOCK_TOKENS as u64);
        out.push(Request { timestamp: t, input_length, output_length: 16 + g.below(500), hash_ids: ids });
    }
    out
}

/// Exact LRU over blocks at `capacity` blocks (`None`: no eviction). Per request: the hit is
/// the leading run of its blocks held, then every block of it is used in order (hits move to
/// most recent, misses are inserted, evicting the least recently used). Returns hit tokens.
pub fn simulate_lru(reqs: &[Request], capacity: Option<u64>) -> u64 {
    let mut last: HashMap<u64, u64> = HashMap::new();
    let mut order: BTreeMap<u64, u64> = BTreeMap::new();
    let mut tick = 0u64;
    let mut hit_tokens = 0;
    for r in reqs {
        let hits = r.hash_ids.iter().take_while(|id| last.contains_key(id)).count() as u64;
        hit_tokens += (hits * BLOCK_TOKENS as u64).min(r.input_length);
        for id in &r.hash_ids {
            tick += 1;
            if let Some(old) = last.insert(*id, tick) {
                order.remove(&old);
            } else if capacity.is_some_and(|c| order.len() as u64 >= c)
                && let Some((_, victim)) = order.pop_first()
            {
                last.remove(&victim);
            }
            order.insert(tick, *id);
        }
    }
    hit_tokens
}

/// The content key of trace block `id`.
pub fn block_key(id: u64) -> ContentKey {
    ContentKey::from_engine_key(&format!("trace-block-{id}"))
}

/// What a replay measured.
#[derive(Debug, Clone, Serialize)]
pub struct ReplayReport {
    /// Requests replayed.
    pub requests: u64,
    /// Prompt tokens over all requests.
    pub prompt_tokens: u64,
    /// Prompt tokens served from the cache (the matched prefix).
    pub hit_tokens: u64,
    /// `hit_tokens / prompt_tokens`.
    pub hit_ratio: f64,
    /// 512-token blocks of this model the cluster holds.
    pub capacity_blocks: u64,
    /// Hit ratio of an exact LRU simulation of the same requests at `capacity_blocks`.
    pub lru_hit_ratio: f64,
    /// Hit ratio with no eviction at all (the ceiling).
    pub infinite_hit_ratio: f64,
    /// `hit_ratio / lru_hit_ratio`.
    pub vs_lru: f64,
    /// Bytes pulled (hits) and put (misses), payload only.
    pub bytes_pulled: u64,
    /// Payload bytes put.
    pub bytes_put: u64,
    /// Pages the nodes already held when put (deduplicated writes).
    pub pages_deduplicated: u64,
    /// Pages a match promised that the pull did not find (evicted in between).
    pub pages_lost_after_match: u64,
    /// Output tokens appended (with `append_output`).
    pub output_tokens_appended: u64,
    /// Seconds the replay took.
    pub seconds: f64,
    /// Latency of MatchPrefix over the cluster (ms): p50, p99, max.
    pub match_ms: BTreeMap<String, f64>,
    /// Latency of whole requests (match, pull, put), ms: p50, p99, max.
    pub request_ms: BTreeMap<String, f64>,
}

/// Options of a replay.
#[derive(Debug, Clone)]
pub struct ReplayOptions {
    /// Append each request's output tokens to a sequence of its own.
    pub append_output: bool,
    /// Requests in flight (1 keeps the trace order exactly, as the LRU simulation assumes).
    pub concurrency: usize,
}

/// Blocks of `ns` (page of [`BLOCK_TOKENS`] tokens) the cluster holds: every node's capacity in
/// whole slots of one page per layer.
pub async fn capacity_blocks(client: &Client, ns: &Namespace) -> anyhow::Result<u64> {
    let slot = kvcache_node::store::slot_bytes_for(&ns.layout()) as u64;
    let mut blocks = 0;
    for (id, s) in client.node_stats().await {
        let s = s.map_err(|e| anyhow::anyhow!("stats of {id}: {e}"))?;
        blocks += s.capacity_bytes / slot / ns.model.num_layers as u64;
    }
    Ok(blocks / ns.replication.max(1) as u64)
}

fn ms(h: &Histogram<u64>) -> BTreeMap<String, f64> {
    [("p50", h.value_at_quantile(0.5)), ("p99", h.value_at_quantile(0.99)), ("max", h.max())]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v as f64 / 1e3))
        .collect()
}

/// Replay `reqs` against the cluster in namespace `ns` (whose pages must be [`BLOCK_TOKENS`]
/// tokens): each request matches its longest cached prefix, pulls the hit pages, puts the
/// missed ones, and with `append_output` appends its output tokens to a sequence of its own.
pub async fn replay(
    client: &Client,
    ns: &Namespace,
    reqs: &[Request],
    opts: &ReplayOptions,
) -> anyhow::Result<ReplayReport> {
    anyhow::ensure!(
        ns.page_tokens == BLOCK_TOKENS,
        "a trace replay needs {BLOCK_TOKENS}-token pages; namespace {} has {}",
        ns.name,
        ns.page_tokens
    );
    let capacity = capacity_blocks(client, ns).await?;
    let layers = ns.model.num_layers;
    let page_bytes = ns.layout().payload_bytes(BLOCK_TOKENS as usize) as u64;
    let start = Instant::now();
    let mut match_h = Histogram::<u64>::new(3)?;
    let mut req_h = Histogram::<u64>::new(3)?;
    let (mut hit_tokens, mut pulled, mut put, mut dedup, mut lost, mut appended) = (0, 0, 0, 0, 0, 0);
    let run = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos() as u64;
    for (w, window) in reqs.chunks(opts.concurrency.max(1)).enumerate() {
        let futs = window.iter().enumerate().map(|(j, r)| async move {
            let t0 = Instant::now();
            let keys: Vec<ContentKey> = r.hash_ids.iter().map(|&id| block_key(id)).collect();
            // No pin: a page evicted between the match and the pull only ends the hit early (counted).
            let m = client.match_prefix(&ns.name, &keys, None).await?;
            let t_match = t0.elapsed();
            let got = client.get_content(&ns.name, &keys[..m.pages], 0..layers).await?;
            let found = got.iter().filter(|p| p.is_some()).count() as u64;
            // A page evicted between the match and the pull makes the hit end before it.
            let whole = got.chunks(layers as usize).take_while(|k| k.iter().all(Option::is_some)).count();
            let lost = (m.pages * layers as usize) as u64 - found;
            let pages: Vec<_> =
                keys[whole..].iter().flat_map(|k| (0..layers).map(move |l| content_page(ns, k, l))).collect();
            let n_put = pages.len() as u64;
            let ack = if pages.is_empty() { Default::default() } else { client.put_content(&ns.name, pages).await? };
            if whole > 0 && whole < keys.len() {
                // The put made the new tail most recent; touch the chain again so its head is
                // (eviction then takes the chain from its end: measured +1-3% hit ratio).
                client.match_prefix(&ns.name, &keys, None).await?;
            }
            let mut appended = 0;
            if opts.append_output && r.output_length > 0 {
                let seq = kvcache_core::SequenceKey::new(&ns.name, format!("trace-{run:x}-{}", w * 1024 + j));
                let n = r.output_length.min(1 << 16) as u32;
                let mut rng = crate::synth::Rng::new(run ^ j as u64);
                let payload: Vec<u8> =
                    (0..layers).flat_map(|_| crate::synth::tokens_payload(ns, n as usize, &mut rng)).collect();
                client.append(&seq, None, n, bytes::Bytes::from(payload), vec![]).await?;
                appended = n as u64;
            }
            let hit = (whole as u64 * BLOCK_TOKENS as u64).min(r.input_length);
            anyhow::Ok((
                t_match,
                t0.elapsed(),
                hit,
                found * page_bytes,
                n_put * page_bytes,
                ack.deduplicated,
                lost,
                appended,
            ))
        });
        for res in futures::future::join_all(futs).await {
            let (tm, tr, hit, b_pull, b_put, d, l, a) = res?;
            let _ = match_h.record(tm.as_micros().max(1) as u64);
            let _ = req_h.record(tr.as_micros().max(1) as u64);
            hit_tokens += hit;
            pulled += b_pull;
            put += b_put;
            dedup += d;
            lost += l;
            appended += a;
        }
    }
    let prompt_tokens: u64 = reqs.iter().map(|r| r.input_length).sum();
    let ratio = |hits: u64| if prompt_tokens == 0 { 0.0 } else { hits as f64 / prompt_tokens as f64 };
    let hit_ratio = ratio(hit_tokens);
    let lru = ratio(simulate_lru(reqs, Some(capacity)));
    Ok(ReplayReport {
        requests: reqs.len() as u64,
        prompt_tokens,
        hit_tokens,
        hit_ratio,
        capacity_blocks: capacity,
        lru_hit_ratio: lru,
        infinite_hit_ratio: ratio(simulate_lru(reqs, None)),
        vs_lru: if lru > 0.0 { hit_ratio / lru } else { f64::NAN },
        bytes_pulled: pulled,
        bytes_put: put,
        pages_deduplicated: dedup,
        pages_lost_after_match: lost,
        output_tokens_appended: appended,
        seconds: start.elapsed().as_secs_f64(),
        match_ms: ms(&match_h),
        request_ms: ms(&req_h),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mooncake_lines_and_names_the_bad_one() {
        let text = "{\"timestamp\": 0, \"input_length\": 1000, \"output_length\": 10, \"hash_ids\": [0, 1]}\n\n\
                    {\"timestamp\": 5, \"input_length\": 512, \"output_length\": 3, \"hash_ids\": [0]}\n";
        let r = parse(text).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].hash_ids, [0, 1]);
        let e =
            parse("{\"timestamp\": 0, \"input_length\": 2000, \"output_length\": 1, \"hash_ids\": [0]}").unwrap_err();
        assert!(e.to_string().contains("line 1") && e.to_string().contains("expected 4"), "{e}");
        let e = parse("{\"timestamp\": 0}").unwrap_err();
        assert!(e.to_string().contains("line 1"), "{e}");
        assert_eq!(parse(&to_jsonl(&r)).unwrap(), r, "round trip");
    }

    #[test]
    fn the_lru_simulation_counts_leading_hits_and_evicts_the_least_recent() {
        let req = |ids: &[u64]| Request {
            timestamp: 0,
            input_length: ids.len() as u64 * 512,
            output_length: 0,
            hash_ids: ids.to_vec(),
        };
        let reqs = [req(&[1, 2, 3]), req(&[1, 2, 4]), req(&[5, 6]), req(&[1, 2, 3])];
        // Unbounded: 2 of 3 blocks, then 0, then 3: 5 blocks.
        assert_eq!(simulate_lru(&reqs, None), 5 * 512);
        // 4 blocks: after [5, 6] the cache is {2, 4, 5, 6} (1 and 3 evicted), so the last request
        // misses at its first block: plain LRU evicts a chain's head first.
        assert_eq!(simulate_lru(&reqs, Some(4)), 2 * 512);
        // A hit stops at the first missing block even if later ones are held.
        assert_eq!(simulate_lru(&[req(&[1, 2]), req(&[9, 2])], None), 0);
    }

    #[test]
    fn generated_traces_share_prefixes_and_are_reproducible() {
        let a = generate(500, 1);
        assert_eq!(a, generate(500, 1));
        assert_ne!(a, generate(500, 2));
        assert!(parse(&to_jsonl(&a)).is_ok(), "generated traces are valid");
        let inf = simulate_lru(&a, None) as f64 / a.iter().map(|r| r.input_length).sum::<u64>() as f64;
        assert!(inf > 0.3, "a generated trace reuses prefixes: infinite-cache hit ratio {inf}");
        assert!(a.windows(2).all(|w| w[0].timestamp < w[1].timestamp));
    }
}
