//! [`PlacementIndex`]: exact placement answers in one integer compare per node for most keys.

#[cfg(target_arch = "x86_64")]
use super::avx512::*;
use super::*;

/// A placement index over a fixed candidate list that answers exactly like [`place`] without a
/// logarithm per node. Built once per shard map.
///
/// Only a few nodes can matter for a key: the best `r` overall, the best of each zone, and the
/// best `r` without a zone. The exact score `-w / ln u` lies between `w·u / (1 - u)` and
/// `w / (1 - u)` (from `1 - u ≤ -ln u ≤ (1 - u) / u`), and neither bound needs a logarithm.
///
/// A lookup first makes one pass against a threshold `T` guessed from the weights (`guess`):
/// at build time each node gets the smallest draw with which its upper bound can reach `T`
/// (`cutoff`), so the pass is one [`draw`] and one integer compare per node (eight
/// nodes per AVX-512 block, four blocks per step, dispatched at run time; portable code
/// elsewhere), with no bookkeeping. The few survivors (~`Σw / T`: 6 at r = 1) then give the
/// leaders' lower bounds; if those reach `T` — 99.7% of lookups — every pruned node falls short
/// of them and only the survivors need the logarithm. Otherwise the lookup scans again,
/// adaptively: blocks in order, the threshold rising with the leaders found so far. Pruning
/// keeps a relative margin of 1e-9 over the rounding of both sides, so the answer is
/// [`place`]'s, ties included.
#[derive(Debug, Clone)]
pub struct PlacementIndex {
    nodes: Vec<Candidate>,
    /// Eligible nodes in blocks of eight: hashes, weights (padding has weight -1), indices and
    /// zone ids ([`NO_ZONE`] for none).
    hashes: Vec<[u64; BLOCK]>,
    weights: Vec<[f64; BLOCK]>,
    index: Vec<[u32; BLOCK]>,
    zone: Vec<[u16; BLOCK]>,
    /// Distinct named zones among eligible nodes.
    zones: usize,
    /// Whether some eligible node has no zone.
    unzoned: bool,
    /// For r = 1..=[`GUESSED_R`]: the guessed threshold `T` (0 = none), whether it is a
    /// guess of the zone leaders' threshold ([`Leaders::s_threshold`]) and, per node, the
    /// smallest draw with which it may reach it ([`cutoff`]).
    cutoffs: Vec<(f64, bool, Vec<[u64; BLOCK]>)>,
    avx512: bool,
}

pub(super) const BLOCK: usize = 8;
/// Replica counts with a guessed first pass; larger ones scan adaptively only.
pub(super) const GUESSED_R: usize = 4;
/// Up to this many zones, a guessed pass checks the zone leaders' threshold
/// ([`Leaders::s_threshold`]) rather than the general one.
pub(super) const S_ZONES: usize = 16;
pub(super) const NO_ZONE: u16 = u16::MAX;
/// Prune only when a bound falls short by more than this relative margin.
pub(super) const MARGIN: f64 = 1.0 - 1e-9;

impl PlacementIndex {
    /// Index `nodes` (weights ≤ 0 are never chosen).
    pub fn new(nodes: &[Candidate]) -> Self {
        Self::with_guess_scale(nodes, 1.0)
    }

    /// [`Self::new`] with every guessed threshold multiplied by `scale`: tests use it to make
    /// the guesses fail (and exercise the rescan) or keep many survivors.
    fn with_guess_scale(nodes: &[Candidate], scale: f64) -> Self {
        let eligible: Vec<usize> =
            (0..nodes.len()).filter(|&i| nodes[i].weight > 0.0 && nodes[i].weight.is_finite()).collect();
        let mut names: Vec<&str> = eligible.iter().map(|&i| nodes[i].zone.as_str()).filter(|z| !z.is_empty()).collect();
        names.sort_unstable();
        names.dedup();
        let blocks = eligible.len().div_ceil(BLOCK);
        let mut hashes = vec![[0u64; BLOCK]; blocks];
        let mut weights = vec![[-1.0f64; BLOCK]; blocks];
        let mut index = vec![[u32::MAX; BLOCK]; blocks];
        let mut zone = vec![[NO_ZONE; BLOCK]; blocks];
        for (k, &i) in eligible.iter().enumerate() {
            let (b, l) = (k / BLOCK, k % BLOCK);
            hashes[b][l] = nodes[i].node_hash;
            weights[b][l] = nodes[i].weight;
            index[b][l] = i as u32;
            let z = nodes[i].zone.as_str();
            // More than 65,535 zones share the last id: still correct (more survivors), just slower.
            zone[b][l] = if z.is_empty() {
                NO_ZONE
            } else {
                names.binary_search(&z).map_or(NO_ZONE - 1, |p| p.min(NO_ZONE as usize - 1) as u16)
            };
        }
        #[cfg(target_arch = "x86_64")]
        let avx512 = std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512dq");
        #[cfg(not(target_arch = "x86_64"))]
        let avx512 = false;
        let unzoned = eligible.iter().any(|&i| nodes[i].zone.is_empty());
        let zones = names.len().min(NO_ZONE as usize);
        let total_weight = eligible.iter().map(|&i| nodes[i].weight).sum();
        let unzoned_weight = eligible.iter().filter(|&&i| nodes[i].zone.is_empty()).map(|&i| nodes[i].weight).sum();
        let mut zone_weight = vec![0.0f64; names.len()];
        for &i in &eligible {
            if let Ok(p) = names.binary_search(&nodes[i].zone.as_str()) {
                zone_weight[p] += nodes[i].weight;
            }
        }
        let min_zone_weight = zone_weight.iter().copied().fold(f64::INFINITY, f64::min);
        let unzoned_weights: Vec<f64> =
            eligible.iter().filter(|&&i| nodes[i].zone.is_empty()).map(|&i| nodes[i].weight).collect();
        let cutoffs = (1..=GUESSED_R)
            .map(|r| {
                let zoned = r > 1 && zones > 0;
                let s_mode = zoned && zones <= S_ZONES && zones + unzoned_weights.len() >= r;
                let mut t = if s_mode {
                    guess_leaders(r, total_weight, &zone_weight, &unzoned_weights)
                } else {
                    guess(r, total_weight, zoned.then_some((min_zone_weight, unzoned.then_some(unzoned_weight))))
                };
                if blocks < 4 {
                    t = 0.0; // small clusters: the adaptive scan is as good
                }
                let t = t * scale;
                let c = weights.iter().map(|b| b.map(|w| if t > 0.0 { cutoff(w, t) } else { u64::MAX })).collect();
                (t, s_mode, c)
            })
            .collect();
        Self { nodes: nodes.to_vec(), hashes, weights, index, zone, zones, unzoned, cutoffs, avx512 }
    }

    /// The candidates.
    pub fn nodes(&self) -> &[Candidate] {
        &self.nodes
    }

    /// Same answer as `place(key_hash, nodes, r)`.
    pub fn place(&self, key_hash: u64, r: usize) -> Vec<usize> {
        if r == 0 || self.hashes.is_empty() {
            return Vec::new();
        }
        // Lower bounds of the leaders: the best r overall, the best r without a zone, and the
        // best of each zone (only once r > 1: the first owner ignores zones).
        let zoned = r > 1 && self.zones > 0;
        // The working vectors are reused across calls on a thread: a lookup allocates only its
        // answer.
        WORK.with_borrow_mut(|w| {
            let Work { leaders, survivors, scored } = w;
            leaders.reset(r, if zoned { self.zones } else { 0 }, zoned && self.unzoned);
            survivors.clear();
            // First one pass with a guessed fixed threshold: no leader bookkeeping while
            // scanning, and only a handful of survivors. Valid when the survivors' own leaders
            // end up at or above the guess (every pruned node then falls short of them, as in
            // the adaptive scan); otherwise scan again adaptively.
            let (guess, s_mode, cutoffs) =
                self.cutoffs.get(r - 1).map_or((0.0, false, &[][..]), |(t, s, c)| (*t, *s, &c[..]));
            let mut thr = 0.0;
            if guess > 0.0 {
                self.scan_fixed(key_hash, cutoffs, survivors);
                survivors.retain(|&(slot, _)| self.weight(slot) > 0.0);
                for &(slot, d) in survivors.iter() {
                    let (one_minus_u, u) = bounds(d);
                    leaders.offer(self.weight(slot) / one_minus_u * u, self.zone_of(slot));
                }
                thr = if s_mode { leaders.s_threshold() } else { leaders.threshold() } * MARGIN;
            }
            if thr < guess || guess == 0.0 {
                leaders.reset(r, if zoned { self.zones } else { 0 }, zoned && self.unzoned);
                survivors.clear();
                self.dispatch(key_hash, leaders, survivors);
                thr = leaders.threshold() * MARGIN;
            }
            scored.clear();
            scored.extend(survivors.iter().filter_map(|&(slot, d)| {
                let w = self.weight(slot);
                let (b, l) = (slot as usize / BLOCK, slot as usize % BLOCK);
                (w / bounds(d).0 >= thr).then(|| (score_of(d, w), self.index[b][l], self.zone[b][l]))
            }));
            if self.zones >= NO_ZONE as usize - 1 {
                // Zone ids are not unique past 65,534 zones: compare names.
                let mut named: Vec<(f64, usize)> = scored.iter().map(|&(s, i, _)| (s, i as usize)).collect();
                return select(&mut named, &self.nodes, r);
            }
            select_ids(scored, r)
        })
    }

    #[inline(always)]
    fn weight(&self, slot: u32) -> f64 {
        self.weights[slot as usize / BLOCK][slot as usize % BLOCK]
    }

    #[inline(always)]
    fn zone_of(&self, slot: u32) -> u16 {
        self.zone[slot as usize / BLOCK][slot as usize % BLOCK]
    }

    /// The adaptive [`Self::scan`] with the fastest block mask this CPU has.
    #[inline(always)]
    fn dispatch(&self, key_hash: u64, leaders: &mut Leaders, survivors: &mut Vec<(u32, u64)>) {
        #[cfg(target_arch = "x86_64")]
        if self.avx512 {
            // SAFETY: the CPU has AVX-512F and AVX-512DQ (checked in `new`).
            return unsafe { self.scan_avx512(key_hash, leaders, survivors) };
        }
        self.scan(key_hash, leaders, survivors, |b, thr| self.block_mask(b, key_hash, thr));
    }

    /// Remember as survivors the nodes whose draw reaches their cutoff: a draw, a compare.
    fn scan_fixed(&self, key_hash: u64, cutoffs: &[[u64; BLOCK]], survivors: &mut Vec<(u32, u64)>) {
        #[cfg(target_arch = "x86_64")]
        if self.avx512 {
            // SAFETY: the CPU has AVX-512F and AVX-512DQ (checked in `new`).
            return unsafe { self.scan_fixed_avx512(key_hash, cutoffs, survivors) };
        }
        for (b, (h, c)) in self.hashes.iter().zip(cutoffs).enumerate() {
            for l in 0..BLOCK {
                let d = draw(h[l], key_hash);
                if d >= c[l] {
                    survivors.push(((b * BLOCK + l) as u32, d));
                }
            }
        }
    }

    /// Scan every block with `mask` (which lanes may reach the threshold), offering the lower
    /// bound of each node that does to `leaders` and remembering it as a survivor; the leaders'
    /// threshold then applies to the next block.
    #[inline(always)]
    fn scan(
        &self,
        key_hash: u64,
        leaders: &mut Leaders,
        survivors: &mut Vec<(u32, u64)>,
        mask: impl Fn(usize, f64) -> u8,
    ) {
        let mut thr = 0.0;
        for b in 0..self.hashes.len() {
            let mut m = mask(b, thr);
            if m == 0 {
                continue;
            }
            while m != 0 {
                let l = m.trailing_zeros() as usize;
                m &= m - 1;
                let d = draw(self.hashes[b][l], key_hash);
                let (one_minus_u, u) = bounds(d);
                let upper = self.weights[b][l] / one_minus_u;
                if upper < thr {
                    continue;
                }
                leaders.offer(upper * u, self.zone[b][l]);
                survivors.push(((b * BLOCK + l) as u32, d));
            }
            thr = leaders.threshold() * MARGIN;
        }
    }

    /// [`Self::scan`] with AVX-512 block masks, compiled for AVX-512 so they inline.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512dq")]
    fn scan_avx512(&self, key_hash: u64, leaders: &mut Leaders, survivors: &mut Vec<(u32, u64)>) {
        self.scan(key_hash, leaders, survivors, |b, thr| {
            block_mask_avx512(&self.hashes[b], &self.weights[b], key_hash, thr)
        })
    }

    /// [`Self::scan_fixed`] with AVX-512, four blocks per step: four independent draws in
    /// flight and one branch per 32 nodes.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512dq")]
    fn scan_fixed_avx512(&self, key_hash: u64, cutoffs: &[[u64; BLOCK]], survivors: &mut Vec<(u32, u64)>) {
        use std::arch::x86_64::*;
        const STEP: usize = 4;
        let mut push = |b: usize, mut m: u64, draws: [__m512i; STEP]| {
            // SAFETY: four vectors of eight u64 are 32 u64.
            let d: [u64; STEP * BLOCK] = unsafe { std::mem::transmute(draws) };
            while m != 0 {
                let bit = m.trailing_zeros() as usize;
                m &= m - 1;
                survivors.push(((b * BLOCK + bit) as u32, d[bit]));
            }
        };
        let full = self.hashes.len() / STEP * STEP;
        for (s, (h, c)) in self.hashes[..full].chunks_exact(STEP).zip(cutoffs[..full].chunks_exact(STEP)).enumerate() {
            let d = [
                draws_avx512(&h[0], key_hash),
                draws_avx512(&h[1], key_hash),
                draws_avx512(&h[2], key_hash),
                draws_avx512(&h[3], key_hash),
            ];
            let m = (above_cutoff_avx512(d[0], &c[0]) as u64)
                | (above_cutoff_avx512(d[1], &c[1]) as u64) << 8
                | (above_cutoff_avx512(d[2], &c[2]) as u64) << 16
                | (above_cutoff_avx512(d[3], &c[3]) as u64) << 24;
            if m != 0 {
                push(s * STEP, m, d);
            }
        }
        for (b, (h, c)) in self.hashes.iter().zip(cutoffs).enumerate().skip(full) {
            let d = draws_avx512(h, key_hash);
            let m = above_cutoff_avx512(d, c);
            if m != 0 {
                let z = _mm512_setzero_si512();
                push(b, m as u64, [d, z, z, z]);
            }
        }
    }

    /// Bit `l` set when lane `l` of block `b` has `w ≥ thr · (1 - u)`, i.e. an upper bound that
    /// reaches `thr`.
    #[inline(always)]
    fn block_mask(&self, b: usize, key_hash: u64, thr: f64) -> u8 {
        let mut mask = 0u8;
        for l in 0..BLOCK {
            let (one_minus_u, _) = bounds(draw(self.hashes[b][l], key_hash));
            mask |= u8::from(self.weights[b][l] >= thr * one_minus_u) << l;
        }
        mask
    }
}

/// A threshold that the leaders' bounds almost always end up above, for `r` owners out of a
/// total weight `total`, with zones `(lightest zone's weight, weight without a zone if any)`;
/// 0 where a pass with it would keep too many nodes to pay.
///
/// The scores `-w / ln u` of a group of nodes of total weight `W` are the reciprocals of an
/// exponential race: the `k`-th best is `W / Γ(k)`, `Γ(k)` a sum of `k` unit exponentials, so
/// `W / (4 + 2k)` is beaten with probability 99.7–99.8% for k = 1..4 (`P(Γ(k) > 4 + 2k)` =
/// 0.25%, 0.30%, 0.25%, 0.20%). A node survives a pass with it with probability ~`w / T`, about
/// `W / T` survivors in all. When a guess fails the lookup scans again the adaptive way, so
/// the answer never depends on it.
pub(super) fn guess(r: usize, total: f64, zones: Option<(f64, Option<f64>)>) -> f64 {
    let q = |k: usize| 4.0 + 2.0 * k as f64;
    let mut t = total / q(r);
    if let Some((lightest, unzoned)) = zones {
        t = t.min(lightest / q(1));
        if let Some(u) = unzoned {
            t = t.min(u / q(r));
        }
    }
    if t > 0.0 && total / t <= 64.0 { t } else { 0.0 }
}

/// [`guess`] for the zone leaders' threshold ([`Leaders::s_threshold`]): the largest `T` at
/// which at least `r` of the zone leaders and zoneless nodes score `≥ T` with probability
/// 99.7%. A zone of weight `W_z` has its leader's score `≥ T` with probability `1 − e^(−W_z/T)`
/// (an exponential race), a zoneless node of weight `w` with `1 − e^(−w/T)`, independently; the
/// count is Poisson-binomial, summed by dynamic programming, and `T` found by bisection. With
/// three equal zones and r = 2 this is `W / 10.3` against `W / 18` for the general guess, so
/// a pass keeps ~10 nodes instead of ~18.
pub(super) fn guess_leaders(r: usize, total: f64, zones: &[f64], unzoned: &[f64]) -> f64 {
    let fail = |t: f64| {
        // p[k] = P(exactly k of the members so far reach t), k < r; the rest reached r.
        let mut p = vec![0.0f64; r];
        p[0] = 1.0;
        for &w in zones.iter().chain(unzoned) {
            let hit = 1.0 - (-w / t).exp();
            for k in (0..r).rev() {
                p[k] = p[k] * (1.0 - hit) + if k > 0 { p[k - 1] * hit } else { 0.0 };
            }
        }
        p.iter().sum::<f64>()
    };
    let (mut lo, mut hi) = (total / 64.0, total);
    if total.is_nan() || total <= 0.0 || fail(lo) > 0.003 {
        return 0.0;
    }
    for _ in 0..50 {
        let mid = (lo * hi).sqrt();
        if fail(mid) <= 0.003 { lo = mid } else { hi = mid }
    }
    lo
}

/// The smallest draw with which a node of weight `w` may reach threshold `t`: a draw below it
/// has `1 - u > w / t`, so even the upper bound `w / (1 - u)` of its score falls short of `t`.
/// Computed as `2^64 - 2^64·(w/t)` (not from `1 - w/t`, which loses a tiny `w/t` to rounding),
/// with `w/t` raised by a relative 1e-12 and the cutoff lowered by 2^16 draws (`u` steps by
/// 2^-53, 2^11 draws), so rounding can only keep a node, never drop one. Padding (`w < 0`)
/// gets `u64::MAX`; the one draw that reaches it is dropped by its negative weight.
pub(super) fn cutoff(w: f64, t: f64) -> u64 {
    const TWO_64: f64 = 18_446_744_073_709_551_616.0;
    if w < 0.0 {
        return u64::MAX;
    }
    let reach = w / t * (1.0 + 1e-12) * TWO_64;
    if reach >= TWO_64 {
        return 0;
    }
    // `as` truncates: 2^64 - 1 - ⌊reach⌋ ≤ 2^64 - reach.
    u64::MAX.saturating_sub(reach as u64).saturating_sub(1 << 16)
}

/// `(1 - u, u)` of a draw, `u` exactly as [`score_of`] computes it.
#[inline(always)]
pub(super) fn bounds(draw: u64) -> (f64, f64) {
    let u = unit(draw);
    (1.0 - u, u)
}

/// `u ∈ (0, 1)` of a draw.
#[inline(always)]
pub(super) fn unit(draw: u64) -> f64 {
    ((draw >> 11) as f64 + 0.5) / (1u64 << 53) as f64
}

/// Per-thread working vectors of [`PlacementIndex::place`].
pub(super) struct Work {
    leaders: Leaders,
    /// (slot = block · 8 + lane, draw) of the nodes that may matter.
    survivors: Vec<(u32, u64)>,
    /// (score, node index, zone id) of the survivors that reach the final threshold.
    scored: Vec<(f64, u32, u16)>,
}

thread_local! {
    static WORK: std::cell::RefCell<Work> = std::cell::RefCell::new(Work {
        leaders: Leaders::new(1, 0, false),
        survivors: Vec::new(),
        scored: Vec::new(),
    });
}

/// Lower bounds of the leading scores: the best `r` overall, the best `r` without a zone, the
/// best one of each zone. A node whose upper bound is below all of these cannot be chosen.
pub(super) struct Leaders {
    r: usize,
    overall: Vec<f64>,
    /// Tracked only when zones matter and some node has none.
    track_unzoned: bool,
    unzoned: Vec<f64>,
    /// Best lower bound per zone id (0 = none yet); empty when zones do not matter.
    per_zone: Vec<f64>,
}

impl Leaders {
    /// Start over for `r` owners and `zones` zones.
    fn reset(&mut self, r: usize, zones: usize, track_unzoned: bool) {
        self.r = r;
        self.track_unzoned = track_unzoned;
        self.overall.clear();
        self.unzoned.clear();
        self.per_zone.clear();
        self.per_zone.resize(zones, 0.0);
    }

    fn new(r: usize, zones: usize, track_unzoned: bool) -> Self {
        Self {
            r,
            overall: Vec::with_capacity(r + 1),
            track_unzoned,
            unzoned: Vec::with_capacity(r + 1),
            per_zone: vec![0.0; zones],
        }
    }

    /// The lowest bound a node must reach to matter (0 until every group has its leaders).
    #[inline(always)]
    fn threshold(&self) -> f64 {
        let full = |v: &Vec<f64>, k: usize| if v.len() < k { 0.0 } else { v[k - 1] };
        let mut t = full(&self.overall, self.r);
        if self.track_unzoned {
            t = t.min(full(&self.unzoned, self.r));
        }
        if !self.per_zone.is_empty() {
            for &z in &self.per_zone {
                t = t.min(z);
            }
        }
        t
    }

    /// The `r`-th best of the zone leaders' and zoneless nodes' lower bounds (0 while fewer are
    /// known). With zones in play and at least `r` such candidates in the cluster, the owners
    /// are exactly the best `r` of them (the first pass of [`select`] takes each zone's best
    /// and every zoneless node, in score order, and fills all `r`), so no other node can
    /// matter. At least [`Self::threshold`], which must also cover the second pass.
    fn s_threshold(&self) -> f64 {
        let mut best = [0.0f64; S_ZONES + GUESSED_R];
        let mut n = 0;
        for &x in self.per_zone.iter().chain(&self.unzoned) {
            // Insert into the descending prefix, keeping at most r.
            let mut i = n.min(self.r);
            if i == self.r && best[i - 1] >= x {
                continue;
            }
            if i == self.r {
                i -= 1;
            }
            while i > 0 && best[i - 1] < x {
                best[i] = best[i - 1];
                i -= 1;
            }
            best[i] = x;
            n = (n + 1).min(self.r);
        }
        if n < self.r { 0.0 } else { best[self.r - 1] }
    }

    fn offer(&mut self, lower: f64, zone: u16) {
        fn insert(v: &mut Vec<f64>, k: usize, x: f64) {
            let pos = v.partition_point(|&y| y >= x);
            if pos < k {
                v.insert(pos, x);
                v.truncate(k);
            }
        }
        insert(&mut self.overall, self.r, lower);
        if zone == NO_ZONE {
            if self.track_unzoned {
                insert(&mut self.unzoned, self.r, lower);
            }
        } else if let Some(z) = self.per_zone.get_mut(zone as usize) {
            *z = z.max(lower);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(n: usize) -> Vec<Candidate> {
        (0..n).map(|i| Candidate::new(format!("node-{i}"), 1.0, "")).collect()
    }

    #[test]
    fn join_moves_about_one_nth_and_only_to_the_new_node() {
        let before = nodes(10);
        let after = nodes(11);
        let keys = 20_000u64;
        let mut moved = 0;
        for k in 0..keys {
            let h = xxhash_rust::xxh3::xxh3_64(&k.to_le_bytes());
            let a = place(h, &before, 1)[0];
            let b = place(h, &after, 1)[0];
            if a != b {
                assert_eq!(b, 10, "a key moved between two old nodes");
                moved += 1;
            }
        }
        let frac = moved as f64 / keys as f64;
        assert!((frac - 1.0 / 11.0).abs() < 0.01, "moved {frac}");
    }

    #[test]
    fn leave_moves_only_the_leaver_s_keys_and_replicas_are_distinct() {
        let before = nodes(10);
        let mut after = nodes(10);
        after[3].weight = 0.0; // node-3 leaves
        for k in 0..20_000u64 {
            let h = xxhash_rust::xxh3::xxh3_64(&k.to_le_bytes());
            let a = place(h, &before, 1)[0];
            let b = place(h, &after, 1)[0];
            assert!(a == b || a == 3, "key {k} moved from {a} to {b}");
            let r3 = place(h, &before, 3);
            assert_eq!(r3.len(), 3);
            assert!(r3[0] != r3[1] && r3[1] != r3[2] && r3[0] != r3[2]);
        }
    }

    #[test]
    fn the_index_answers_exactly_like_full_rendezvous() {
        let mut ns: Vec<Candidate> =
            (0..57).map(|i| Candidate::new(format!("n{i}"), [1.0, 2.0, 0.5, 0.0][i % 4], "")).collect();
        let plain = PlacementIndex::new(&ns);
        for k in 0..3000u64 {
            let h = xxhash_rust::xxh3::xxh3_64(&k.to_le_bytes());
            for r in 1..4 {
                assert_eq!(plain.place(h, r), place(h, &ns, r), "key {k} r {r}");
            }
        }
        for (i, n) in ns.iter_mut().enumerate() {
            n.zone = format!("z{}", i % 3);
        }
        let zoned = PlacementIndex::new(&ns);
        for k in 0..3000u64 {
            let h = xxhash_rust::xxh3::xxh3_64(&k.to_le_bytes());
            for r in 1..5 {
                assert_eq!(zoned.place(h, r), place(h, &ns, r), "zoned key {k} r {r}");
            }
        }
    }

    #[test]
    fn the_index_agrees_with_arbitrary_weights_and_sizes() {
        // Every node its own weight class, sizes around the block width, zones or not.
        let mut x = 0x1234_5678_9abc_def0u64;
        let mut rnd = || {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            x >> 11
        };
        for n in [1usize, 2, 7, 8, 9, 16, 17, 100, 1000] {
            for zoned in [false, true] {
                let ns: Vec<Candidate> = (0..n)
                    .map(|i| {
                        let w = if rnd() % 10 == 0 { 0.0 } else { (rnd() % 1000) as f64 / 97.0 + 0.01 };
                        Candidate::new(format!("n{i}"), w, if zoned { format!("z{}", i % 4) } else { String::new() })
                    })
                    .collect();
                let index = PlacementIndex::new(&ns);
                // The portable scan too, on machines that would take the AVX-512 one, and guesses
                // too high to hold (the rescan) or far too low (many survivors).
                let portable = PlacementIndex { avx512: false, ..index.clone() };
                let high = PlacementIndex::with_guess_scale(&ns, 4.0);
                let low = PlacementIndex { avx512: false, ..PlacementIndex::with_guess_scale(&ns, 0.05) };
                for _ in 0..300 {
                    let h = rnd() ^ (rnd() << 40);
                    for r in 1..5 {
                        let want = place(h, &ns, r);
                        assert_eq!(index.place(h, r), want, "n {n} zoned {zoned} key {h} r {r}");
                        assert_eq!(portable.place(h, r), want, "portable: n {n} zoned {zoned} key {h} r {r}");
                        assert_eq!(high.place(h, r), want, "high guess: n {n} zoned {zoned} key {h} r {r}");
                        assert_eq!(low.place(h, r), want, "low guess: n {n} zoned {zoned} key {h} r {r}");
                    }
                }
            }
        }
    }

    #[test]
    fn a_draw_below_its_cutoff_cannot_reach_the_threshold() {
        let mut x = 0x0bad_cafe_dead_beefu64;
        let mut rnd = || {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            x
        };
        for _ in 0..20_000 {
            // Weights from 1e-12 to 1e3 of the threshold, across magnitudes.
            let t = (rnd() >> 11) as f64 / (1u64 << 53) as f64 * 1e3 + 1e-3;
            let w = t * 10f64.powi((rnd() % 16) as i32 - 12) * ((rnd() >> 11) as f64 / (1u64 << 53) as f64 + 0.5);
            let c = cutoff(w, t);
            if c == 0 {
                continue;
            }
            for d in [c - 1, c - 1 - (rnd() % (1 << 20)).min(c - 1)] {
                let (one_minus_u, _) = bounds(d);
                assert!(w / one_minus_u < t, "w {w} t {t} draw {d} cutoff {c}");
            }
        }
        assert_eq!(cutoff(-1.0, 1.0), u64::MAX);
        assert_eq!(cutoff(2.0, 1.0), 0);
    }

    /// Chi-square statistics of the draw, each checked well past five standard deviations of
    /// its distribution (df + 5·√(2·df)); the inputs are fixed, so the test is deterministic.
    #[test]
    fn draws_are_uniform_and_independent() {
        let hash = |i: u64| xxhash_rust::xxh3::xxh3_64(&i.to_le_bytes());
        let chi2 =
            |obs: &[u64], expected: f64| obs.iter().map(|&o| (o as f64 - expected).powi(2) / expected).sum::<f64>();
        let bound = |df: f64| df + 5.0 * (2.0 * df).sqrt();
        // The top byte of the draw over random (node, key) pairs.
        let mut top = [0u64; 256];
        for i in 0..1_000_000u64 {
            top[(draw(hash(i), hash(i ^ 1 << 40)) >> 56) as usize] += 1;
        }
        let c = chi2(&top, 1_000_000.0 / 256.0);
        assert!(c < bound(255.0), "top byte chi2 {c}");
        // One node's draws over many keys.
        let mut top = [0u64; 256];
        for k in 0..1_000_000u64 {
            top[(draw(hash(7), hash(k)) >> 56) as usize] += 1;
        }
        let c = chi2(&top, 1_000_000.0 / 256.0);
        assert!(c < bound(255.0), "one node's chi2 {c}");
        // Owners with weights 1, 2, 3: each node's share is its weight's.
        let ns: Vec<Candidate> = (0..30).map(|i| Candidate::new(format!("n{i}"), 1.0 + (i % 3) as f64, "")).collect();
        let mut wins = [0u64; 30];
        let keys = 300_000u64;
        for k in 0..keys {
            wins[place(hash(k), &ns, 1)[0]] += 1;
        }
        let c: f64 = (0..30)
            .map(|i| {
                let e = keys as f64 * ns[i].weight / 60.0;
                (wins[i] as f64 - e).powi(2) / e
            })
            .sum();
        assert!(c < bound(29.0), "weighted share chi2 {c}");
        // Replica pairs: every ordered (first, second) owner pair of six equal nodes as likely.
        let ns = nodes(6);
        let mut pairs = [0u64; 36];
        for k in 0..300_000u64 {
            let o = place(hash(k), &ns, 2);
            pairs[o[0] * 6 + o[1]] += 1;
        }
        let distinct: Vec<u64> = (0..36).filter(|i| i / 6 != i % 6).map(|i| pairs[i]).collect();
        let c = chi2(&distinct, 300_000.0 / 30.0);
        assert!(c < bound(29.0), "pair chi2 {c}");
    }

    #[test]
    fn weights_set_the_share() {
        let mut ns = nodes(2);
        ns[1].weight = 3.0;
        let wins =
            (0..20_000u64).filter(|k| place(xxhash_rust::xxh3::xxh3_64(&k.to_le_bytes()), &ns, 1)[0] == 1).count();
        let share = wins as f64 / 20_000.0;
        assert!((share - 0.75).abs() < 0.02, "share {share}");
    }

    #[test]
    fn replicas_prefer_distinct_zones_and_skip_zero_weight() {
        let mut ns = nodes(4);
        ns[0].zone = "a".into();
        ns[1].zone = "a".into();
        ns[2].zone = "b".into();
        ns[3].weight = 0.0;
        for k in 0..200u64 {
            let owners = place(k.wrapping_mul(0x9e37_79b9_7f4a_7c15), &ns, 2);
            assert_eq!(owners.len(), 2);
            assert!(owners.contains(&2), "zone b must hold a replica: {owners:?}");
            assert!(!owners.contains(&3));
        }
        assert_eq!(place(1, &ns, 5).len(), 3);
    }
}
