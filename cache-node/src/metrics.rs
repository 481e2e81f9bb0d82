//! The node's metric series, every one labelled `node="<node id>"`, so several nodes in one
//! process (`kvcache dev`) export one series each instead of overwriting one another. One label
//! value per node the process runs: bounded.
//!
//! Handles are registered once, when the node starts (at 0, so dashboards and alerts see them
//! before traffic); the hot path increments a held handle and never looks a key up.

use crate::handoff::PassReport;
use crate::store::StoreStats;
use kvcache_telemetry::names as n;
use metrics::{Counter, Gauge};

/// Every series of one node.
pub struct NodeMetrics {
    /// Pages served.
    pub page_hits: Counter,
    /// Pages asked for and not held.
    pub page_misses: Counter,
    /// Payload bytes served.
    pub bytes_out: Counter,
    /// Payload bytes stored (puts and appends).
    pub bytes_in: Counter,
    handoff_copied: Counter,
    handoff_current: Counter,
    handoff_failed: Counter,
    handoff_bytes: Counter,
    handoff_released: Counter,
    stored_bytes: Gauge,
    capacity_bytes: Gauge,
    pool_bytes: Gauge,
    pages: Gauge,
    sequences: Gauge,
    leases: Gauge,
    pool_files_failed: Gauge,
    index_bytes: Gauge,
    recovery_seconds: Gauge,
    epoch: Gauge,
    evictions: Counter,
    corrupt_pages: Counter,
    node_id: String,
}

impl NodeMetrics {
    /// The series of node `node_id`, registered at 0.
    pub fn new(node_id: &str) -> Self {
        let id = node_id.to_owned();
        let c = |name: &'static str| {
            let h = metrics::counter!(name, "node" => id.clone());
            h.increment(0);
            h
        };
        let outcome = |o: &'static str| {
            let h = metrics::counter!(n::NODE_HANDOFF_SEQUENCES, "node" => id.clone(), "outcome" => o);
            h.increment(0);
            h
        };
        let g = |name: &'static str| metrics::gauge!(name, "node" => id.clone());
        let evictions = metrics::counter!(n::NODE_EVICTIONS, "node" => id.clone(), "reason" => "capacity");
        evictions.increment(0);
        Self {
            page_hits: c(n::NODE_PAGE_HITS),
            page_misses: c(n::NODE_PAGE_MISSES),
            bytes_out: c(n::NODE_BYTES_OUT),
            bytes_in: c(n::NODE_BYTES_IN),
            handoff_copied: outcome("copied"),
            handoff_current: outcome("current"),
            handoff_failed: outcome("failed"),
            handoff_bytes: c(n::NODE_HANDOFF_BYTES),
            handoff_released: c(n::NODE_HANDOFF_RELEASED),
            stored_bytes: g(n::NODE_STORED_BYTES),
            capacity_bytes: g(n::NODE_CAPACITY_BYTES),
            pool_bytes: g(n::NODE_POOL_BYTES),
            pages: g(n::NODE_PAGES),
            sequences: g(n::NODE_SEQUENCES),
            leases: g(n::NODE_LEASES),
            pool_files_failed: g(n::NODE_POOL_FILES_FAILED),
            index_bytes: g(n::NODE_INDEX_BYTES),
            recovery_seconds: g(n::NODE_RECOVERY_SECONDS),
            epoch: g(n::NODE_EPOCH),
            evictions,
            corrupt_pages: c(n::NODE_CORRUPT_PAGES),
            node_id: node_id.to_owned(),
        }
    }

    /// Publish the store's gauges (and the counters it keeps itself).
    pub fn publish(&self, st: &StoreStats, epoch: u64) {
        self.stored_bytes.set(st.used_bytes as f64);
        self.capacity_bytes.set(st.capacity_bytes as f64);
        self.pool_bytes.set(st.pool_bytes as f64);
        self.pages.set(st.pages as f64);
        self.sequences.set(st.sequences as f64);
        self.leases.set(st.active_leases as f64);
        self.pool_files_failed.set(st.pool_files_failed as f64);
        self.index_bytes.set(st.index_bytes as f64);
        self.recovery_seconds.set(st.recovery_seconds);
        self.epoch.set(epoch as f64);
        self.evictions.absolute(st.evictions);
        self.corrupt_pages.absolute(st.corrupt_pages_dropped);
        // Per namespace (bounded: namespaces are created by operators, not by traffic).
        for u in &st.namespaces {
            let ns = u.name.clone();
            for (event, v) in [
                ("get_hit", u.get_hits),
                ("get_miss", u.get_misses),
                ("dedup_hit", u.dedup_hits),
                ("conflict", u.conflicts),
                ("eviction", u.evictions),
                ("match_hit", u.match_hits),
                ("match_miss", u.match_misses),
                ("window_release", u.window_releases),
            ] {
                metrics::counter!(n::NODE_NAMESPACE_EVENTS, "node" => self.node_id.clone(), "namespace" => ns.clone(), "event" => event)
                    .absolute(v);
            }
            metrics::gauge!(n::NODE_NAMESPACE_BYTES, "node" => self.node_id.clone(), "namespace" => ns)
                .set(u.bytes as f64);
        }
        // Per tenant (bounded by the tenants file).
        let mut reads: std::collections::BTreeMap<&str, (u64, u64)> = Default::default();
        for u in &st.namespaces {
            let r = reads.entry(u.tenant.as_str()).or_default();
            r.0 += u.get_hits;
            r.1 += u.get_misses;
        }
        for (tenant, (hits, misses)) in reads {
            for (result, v) in [("hit", hits), ("miss", misses)] {
                metrics::counter!(n::TENANT_PAGE_READS, "node" => self.node_id.clone(), "tenant" => tenant.to_owned(), "result" => result)
                    .absolute(v);
            }
        }
        for t in &st.tenants {
            metrics::gauge!(n::TENANT_STORED_BYTES, "node" => self.node_id.clone(), "tenant" => t.tenant.clone())
                .set(t.bytes as f64);
            if t.quota_bytes > 0 {
                metrics::gauge!(n::TENANT_QUOTA_BYTES, "node" => self.node_id.clone(), "tenant" => t.tenant.clone())
                    .set(t.quota_bytes as f64);
            }
        }
    }

    /// Count what a handoff pass did.
    pub fn handoff(&self, r: &PassReport) {
        self.handoff_copied.increment(r.copied);
        self.handoff_current.increment(r.current);
        self.handoff_failed.increment(r.failed);
        self.handoff_bytes.increment(r.bytes);
        self.handoff_released.increment(r.released);
    }
}
