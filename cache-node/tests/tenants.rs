//! Tenants in the store: a tenant over its share evicts its own least recently used sequences,
//! then is refused; a full node never evicts another tenant below its reserved share; shares can
//! be changed and withdrawn; a restart charges every recovered page again.

mod common;

use common::*;
use kvcache_core::{Namespace, SequenceKey};
use kvcache_node::store::{TenantShare, TenantStats};
use kvcache_node::{PageStore, StoreError};
use std::time::Duration;

/// Header + payload of one 4-token page of the test model.
const PAGE: u64 = 128 + 128;

fn other_ns() -> Namespace {
    Namespace { name: "other.small".into(), tenant: "u".into(), ..small_ns() }
}

/// Put one one-page sequence of `ns`.
fn put_seq(s: &PageStore, ns: &str, seq: &str) -> Result<(u64, u64), StoreError> {
    let k = kvcache_core::PageKey { sequence: SequenceKey::new(ns, seq), layer: 0, page_index: 0 };
    put_wire(s, vec![page(&k, 4, payload(&small_ns(), 4, seq.len() as u8))])
}

fn held(s: &PageStore, ns: &str, seqs: impl IntoIterator<Item = String>) -> Vec<bool> {
    seqs.into_iter().map(|q| s.lookup(&SequenceKey::new(ns, q), &[], None).unwrap().0).collect()
}

fn tenant(s: &PageStore, name: &str) -> TenantStats {
    s.tenant_stats().into_iter().find(|t| t.tenant == name).unwrap()
}

#[test]
fn a_tenant_over_its_share_evicts_its_own_oldest_then_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), 64);
    s.ensure_namespace(other_ns()).unwrap();
    s.set_tenant_shares(&[TenantShare { tenant: "t".into(), quota: Some(3 * PAGE), reserved: 0 }]);
    put_seq(&s, "other.small", "u-kept").unwrap();
    for i in 0..6 {
        put_seq(&s, "test.small", &format!("s{i}")).unwrap();
        assert!(tenant(&s, "t").bytes <= 3 * PAGE, "over the share after s{i}: {:?}", tenant(&s, "t"));
    }
    assert_eq!(held(&s, "test.small", (0..6).map(|i| format!("s{i}"))), [false, false, false, true, true, true]);
    assert_eq!(tenant(&s, "t").quota_evictions, 3);
    assert_eq!(held(&s, "other.small", ["u-kept".to_owned()]), [true], "another tenant's page was evicted");
    // Everything of its own leased: refused, and counted.
    for i in 3..6 {
        s.lease(&SequenceKey::new("test.small", format!("s{i}")), Duration::from_secs(60)).unwrap();
    }
    let e = put_seq(&s, "test.small", "s6").unwrap_err();
    assert!(matches!(e, StoreError::Quota { ref tenant, .. } if tenant == "t"), "{e}");
    assert_eq!(tenant(&s, "t").quota_refusals, 1);
    assert_eq!(tenant(&s, "t").bytes, 3 * PAGE, "a refused write leaves no charge behind");
    // Withdrawn shares: no limit any more.
    s.set_tenant_shares(&[]);
    put_seq(&s, "test.small", "s6").unwrap();
    assert_eq!(tenant(&s, "t").quota_bytes, 0);
    // A restart charges the recovered pages again.
    drop(s);
    let s = open(dir.path(), 64);
    assert_eq!(tenant(&s, "t").bytes, 4 * PAGE);
    assert_eq!(tenant(&s, "u").bytes, PAGE);
}

#[test]
fn a_full_node_never_evicts_another_tenant_below_its_reserved_share() {
    let dir = tempfile::tempdir().unwrap();
    // Eight slots: eight one-page sequences.
    let s = open(dir.path(), 8);
    s.ensure_namespace(other_ns()).unwrap();
    s.set_tenant_shares(&[TenantShare { tenant: "u".into(), quota: None, reserved: 3 * PAGE }]);
    for i in 0..4 {
        put_seq(&s, "other.small", &format!("u{i}")).unwrap();
    }
    // t fills the node and keeps writing: u's oldest goes (u is one page over its reserve),
    // then only t's own.
    for i in 0..12 {
        put_seq(&s, "test.small", &format!("t{i}")).unwrap();
    }
    assert_eq!(held(&s, "other.small", (0..4).map(|i| format!("u{i}"))), [false, true, true, true]);
    assert_eq!(tenant(&s, "u").bytes, 3 * PAGE);
    assert_eq!(held(&s, "test.small", (0..12).map(|i| format!("t{i}"))).iter().filter(|h| **h).count(), 5);
    // u's own writes may still evict u (its reserve protects it from others only).
    for i in 4..8 {
        put_seq(&s, "other.small", &format!("u{i}")).unwrap();
    }
    assert!(tenant(&s, "u").bytes >= 3 * PAGE);
}
