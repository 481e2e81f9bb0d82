//! Tenants on this node: the bytes each one's pages take, its share of its quota, and the bytes
//! other tenants' writes never evict it below (its reserved share).
//!
//! Every page is charged to its namespace's tenant from the moment a write takes a slot for it
//! until the page is retired, so concurrent writers cannot overshoot a share together: a write
//! that would take the tenant past its share first evicts the tenant's own least recently used
//! unleased sequences, and is refused ([`StoreError::Quota`]) only when none is left. Without
//! shares (a cluster without tenants) the charge is one atomic add per page.

use super::*;

/// One tenant's account on this node.
#[derive(Debug)]
pub struct TenantLedger {
    /// The tenant ("" for namespaces of no tenant).
    pub name: String,
    /// Bytes charged: pages held and slots being written.
    charged: AtomicU64,
    /// Share of its quota here (`u64::MAX`: none).
    limit: AtomicU64,
    /// Share of its reserved bytes here.
    reserved: AtomicU64,
    /// Sequences evicted to stay within the share.
    pub(super) quota_evictions: AtomicU64,
    /// Writes refused: over the share with nothing of its own evictable.
    pub(super) quota_refusals: AtomicU64,
}

impl TenantLedger {
    fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            charged: AtomicU64::new(0),
            limit: AtomicU64::new(u64::MAX),
            reserved: AtomicU64::new(0),
            quota_evictions: AtomicU64::new(0),
            quota_refusals: AtomicU64::new(0),
        }
    }

    /// Bytes charged now.
    pub fn charged(&self) -> u64 {
        self.charged.load(Ordering::Relaxed)
    }

    /// Take `n` bytes if they fit the share.
    fn try_charge(&self, n: u64) -> bool {
        let limit = self.limit.load(Ordering::Relaxed);
        self.charged.fetch_update(Ordering::AcqRel, Ordering::Relaxed, |c| (c + n <= limit).then_some(c + n)).is_ok()
    }

    pub(super) fn charge(&self, n: u64) {
        self.charged.fetch_add(n, Ordering::AcqRel);
    }

    pub(super) fn release(&self, n: u64) {
        let _ = self.charged.fetch_update(Ordering::AcqRel, Ordering::Relaxed, |c| Some(c.saturating_sub(n)));
    }

    /// Whether evicting `bytes` of this tenant for another tenant's write keeps it at or above
    /// its reserved share.
    pub(super) fn may_lose(&self, bytes: u64) -> bool {
        let reserved = self.reserved.load(Ordering::Relaxed);
        reserved == 0 || self.charged().saturating_sub(bytes) >= reserved
    }
}

/// One tenant's share on this node, as the coordinator hands it out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantShare {
    /// Tenant.
    pub tenant: String,
    /// Bytes its pages may take here (`None`: no quota).
    pub quota: Option<u64>,
    /// Bytes other tenants' writes never evict it below.
    pub reserved: u64,
}

/// A tenant's usage, for Stats and metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TenantStats {
    /// Tenant.
    pub tenant: String,
    /// Bytes of its pages (and slots being written).
    pub bytes: u64,
    /// Its share of its quota here (0: none).
    pub quota_bytes: u64,
    /// Its reserved share here.
    pub reserved_bytes: u64,
    /// Its sequences evicted to keep it within its share.
    pub quota_evictions: u64,
    /// Its writes refused over its share.
    pub quota_refusals: u64,
}

impl PageStore {
    /// The ledger of `tenant`, made on first use.
    pub(super) fn ledger(&self, tenant: &str) -> Arc<TenantLedger> {
        if let Some(l) = self.tenants.read().get(tenant) {
            return l.clone();
        }
        self.tenants.write().entry(tenant.to_owned()).or_insert_with(|| Arc::new(TenantLedger::new(tenant))).clone()
    }

    /// Install this node's shares: every tenant not listed has no quota and no reserve.
    pub fn set_tenant_shares(&self, shares: &[TenantShare]) {
        for s in shares {
            let l = self.ledger(&s.tenant);
            l.limit.store(s.quota.unwrap_or(u64::MAX), Ordering::Relaxed);
            l.reserved.store(s.reserved, Ordering::Relaxed);
        }
        for (name, l) in self.tenants.read().iter() {
            if !shares.iter().any(|s| &s.tenant == name) {
                l.limit.store(u64::MAX, Ordering::Relaxed);
                l.reserved.store(0, Ordering::Relaxed);
            }
        }
    }

    /// Charge `bytes` of a new page of `ns` to its tenant, evicting the tenant's own least
    /// recently used sequences (never `exclude`) while it is over its share.
    pub(super) fn charge_tenant(&self, ns: &NsEntry, bytes: u64, exclude: &SequenceKey) -> Result<(), StoreError> {
        let t = &ns.tenant;
        // Bounded: each round evicts one of the tenant's sequences or gives up.
        for _ in 0..100_000 {
            if t.try_charge(bytes) {
                return Ok(());
            }
            if !self.evict_one(exclude, Victims::Of(t)) {
                t.quota_refusals.fetch_add(1, Ordering::Relaxed);
                return Err(StoreError::Quota {
                    tenant: t.name.clone(),
                    share: t.limit.load(Ordering::Relaxed),
                    held: t.charged(),
                });
            }
            t.quota_evictions.fetch_add(1, Ordering::Relaxed);
            metrics::counter!(kvcache_telemetry::names::TENANT_QUOTA_EVICTIONS, "tenant" => t.name.clone())
                .increment(1);
        }
        Err(StoreError::Full("quota eviction did not make room".into()))
    }

    /// The namespace a lease was granted on.
    pub fn lease_namespace(&self, lease_id: u64) -> Option<String> {
        self.leases.get(&lease_id).map(|k| k.namespace.clone())
    }

    /// Every tenant's usage and share.
    pub fn tenant_stats(&self) -> Vec<TenantStats> {
        let mut v: Vec<TenantStats> = self
            .tenants
            .read()
            .values()
            .map(|l| {
                let limit = l.limit.load(Ordering::Relaxed);
                TenantStats {
                    tenant: l.name.clone(),
                    bytes: l.charged(),
                    quota_bytes: if limit == u64::MAX { 0 } else { limit },
                    reserved_bytes: l.reserved.load(Ordering::Relaxed),
                    quota_evictions: l.quota_evictions.load(Ordering::Relaxed),
                    quota_refusals: l.quota_refusals.load(Ordering::Relaxed),
                }
            })
            .collect();
        v.sort_by(|a, b| a.tenant.cmp(&b.tenant));
        v
    }
}

/// Which sequences an eviction may take.
#[derive(Clone, Copy)]
pub(super) enum Victims<'a> {
    /// For a write of this tenant: any sequence, but another tenant's only while that tenant
    /// stays at or above its reserved share.
    For(&'a Arc<TenantLedger>),
    /// Only this tenant's (it is over its own share).
    Of(&'a Arc<TenantLedger>),
}

impl Victims<'_> {
    /// Whether a sequence of `owner` taking `bytes()` may go.
    pub(super) fn allows(&self, owner: &Arc<TenantLedger>, bytes: impl FnOnce() -> u64) -> bool {
        match self {
            Victims::For(w) => {
                Arc::ptr_eq(w, owner) || owner.reserved.load(Ordering::Relaxed) == 0 || owner.may_lose(bytes())
            }
            Victims::Of(t) => Arc::ptr_eq(t, owner),
        }
    }
}
