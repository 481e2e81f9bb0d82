//! A node's side of cluster membership: register with the coordinator, heartbeat with stats,
//! learn the epoch (for write fencing), the namespaces and this node's share of each tenant's
//! quota. Runs until aborted; survives
//! coordinator restarts by re-registering. Reaches the coordinator through the node's one
//! [`CoordinatorLink`] (shared with [`crate::handoff`]).

use crate::store::PageStore;
use kvcache_core::Namespace;
use kvcache_net::CoordinatorLink;
use kvcache_proto::v1 as pb;
use std::sync::Arc;
use std::time::Duration;

fn apply(store: &PageStore, epoch: u64, namespaces: Vec<pb::Namespace>, shares: Vec<pb::TenantShare>) {
    store.advance_epoch(epoch);
    let shares: Vec<crate::store::TenantShare> = shares
        .into_iter()
        .map(|s| crate::store::TenantShare {
            tenant: s.tenant,
            quota: (s.quota_bytes > 0).then_some(s.quota_bytes),
            reserved: s.reserved_bytes,
        })
        .collect();
    store.set_tenant_shares(&shares);
    for n in namespaces {
        match Namespace::try_from(n) {
            Ok(ns) => {
                if let Err(e) = store.ensure_namespace(ns) {
                    tracing::warn!(error = %e, "namespace from the coordinator refused");
                }
            }
            Err(e) => tracing::warn!(error = %e, "malformed namespace from the coordinator"),
        }
    }
}

/// Register `info` with the coordinator through `link` (leader redirects and replica failover
/// are the link's) and heartbeat until the task is aborted. A heartbeat the coordinator does not
/// recognise (it restarted, or marked this node down) or that no replica answers leads to a new
/// registration.
pub async fn join_cluster(store: Arc<PageStore>, link: CoordinatorLink, info: pb::NodeInfo) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let reg = link
            .call(|mut c| {
                let node = Some(info.clone());
                async move { c.register_node(pb::RegisterNodeRequest { node }).await }
            })
            .await;
        let interval = match reg {
            Ok(r) => {
                let r = r.into_inner();
                let s = store.clone();
                let (epoch, nss, shares) = (r.epoch, r.namespaces, r.tenant_shares);
                let _ = tokio::task::spawn_blocking(move || apply(&s, epoch, nss, shares)).await;
                tracing::info!(epoch = r.epoch, coordinator = %link.current(), "registered with the coordinator");
                backoff = Duration::from_millis(100);
                Duration::from_millis(r.heartbeat_interval_ms.clamp(50, 60_000) as u64)
            }
            Err(e) => {
                tracing::warn!(error = %e, "registration failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        loop {
            tokio::time::sleep(interval).await;
            let st = {
                let s = store.clone();
                match tokio::task::spawn_blocking(move || s.stats()).await {
                    Ok(st) => st,
                    Err(_) => continue,
                }
            };
            let hb = pb::HeartbeatRequest {
                node_id: info.node_id.clone(),
                used_bytes: st.used_bytes,
                pages: st.pages,
                sequences: st.sequences,
            };
            match link
                .call(|mut c| {
                    let hb = hb.clone();
                    async move { c.heartbeat(hb).await }
                })
                .await
            {
                Ok(r) => {
                    let r = r.into_inner();
                    if !r.known {
                        break; // the coordinator forgot us (restart, or we were marked down)
                    }
                    let s = store.clone();
                    let _ =
                        tokio::task::spawn_blocking(move || apply(&s, r.epoch, r.namespaces, r.tenant_shares)).await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "heartbeat failed; registering again");
                    break;
                }
            }
        }
    }
}
