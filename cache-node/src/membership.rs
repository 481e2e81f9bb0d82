//! A node's side of cluster membership: register with the coordinator, heartbeat with stats,
//! learn the epoch (for write fencing) and the namespaces. Runs until aborted; survives
//! coordinator restarts by re-registering.

use crate::store::PageStore;
use kvcache_core::Namespace;
use kvcache_proto::v1 as pb;
use kvcache_proto::v1::coordinator_client::CoordinatorClient;
use std::sync::Arc;
use std::time::Duration;

fn apply(store: &PageStore, epoch: u64, namespaces: Vec<pb::Namespace>) {
    store.advance_epoch(epoch);
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

/// Register `info` with the coordinator (a comma-separated list of replicas; a follower's
/// redirect to the leader is followed) and heartbeat forever.
pub async fn join_cluster(store: Arc<PageStore>, coordinator: String, info: pb::NodeInfo, tls: kvcache_net::Tls) {
    let replicas: Vec<String> = coordinator.split(',').map(|a| a.trim().to_owned()).filter(|a| !a.is_empty()).collect();
    if replicas.is_empty() {
        tracing::error!("no coordinator address");
        return;
    }
    let endpoint = |addr: &str| {
        kvcache_net::endpoint(addr, &tls)
            .map(|e| e.connect_timeout(Duration::from_secs(2)).timeout(Duration::from_secs(5)).connect_lazy())
    };
    let mut current = replicas[0].clone();
    let mut next = 0usize;
    let mut backoff = Duration::from_millis(100);
    // Addresses that refused a connection since the last success: a follower's leader hint
    // pointing at one of them is stale (the election is still running), so it is not followed.
    let mut dead: Vec<String> = Vec::new();
    let mut failures = 0usize;
    let mut switch = |status: &tonic::Status, current: &mut String, dead: &mut Vec<String>| {
        let hint = status
            .metadata()
            .get(kvcache_proto::metadata::LEADER)
            .and_then(|v| v.to_str().ok())
            .filter(|l| !l.is_empty())
            .map(str::to_owned);
        match hint {
            Some(l) if !dead.contains(&l) && l != *current => *current = l,
            _ => {
                if status.metadata().get(kvcache_proto::metadata::LEADER).is_none() && !dead.contains(current) {
                    dead.push(current.clone());
                }
                next = (next + 1) % replicas.len();
                *current = replicas[next].clone();
            }
        }
    };
    loop {
        let Ok(ch) = endpoint(&current) else {
            tracing::error!(coordinator = %current, "bad coordinator address");
            return;
        };
        let mut c = CoordinatorClient::new(ch);
        let reg = c.register_node(pb::RegisterNodeRequest { node: Some(info.clone()) }).await;
        let interval = match reg {
            Ok(r) => {
                let r = r.into_inner();
                let s = store.clone();
                let (epoch, nss) = (r.epoch, r.namespaces);
                let _ = tokio::task::spawn_blocking(move || apply(&s, epoch, nss)).await;
                tracing::info!(epoch = r.epoch, coordinator = %current, "registered with the coordinator");
                backoff = Duration::from_millis(100);
                dead.clear();
                failures = 0;
                Duration::from_millis(r.heartbeat_interval_ms.clamp(50, 60_000) as u64)
            }
            Err(e) => {
                tracing::warn!(error = %e, coordinator = %current, "registration failed; retrying");
                switch(&e, &mut current, &mut dead);
                failures += 1;
                // Sleep once per round over the replicas, not after every refusal.
                if failures.is_multiple_of(replicas.len()) {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    dead.clear();
                }
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
            match c.heartbeat(hb).await {
                Ok(r) => {
                    let r = r.into_inner();
                    if !r.known {
                        break; // the coordinator forgot us (restart, or we were marked down)
                    }
                    let s = store.clone();
                    let _ = tokio::task::spawn_blocking(move || apply(&s, r.epoch, r.namespaces)).await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "heartbeat failed");
                    switch(&e, &mut current, &mut dead);
                    break;
                }
            }
        }
    }
}
