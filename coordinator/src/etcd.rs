//! High availability on etcd: the state lives under `{prefix}/state` (the ShardMap, encoded),
//! replicas elect a leader through an etcd election bound to a short lease, followers keep
//! their copy current (answering reads and watches) and refuse writes with the leader's address,
//! and the leader writes each commit in a transaction guarded by its election key, so a replica
//! that lost its lease can never overwrite a newer leader's state. A new leader starts from the
//! latest state in etcd, so the epoch never goes backwards.

use crate::state::{ClusterState, StateSink};
use etcd_client::{Client, Compare, CompareOp, Txn, TxnOp};
use kvcache_proto::v1 as pb;
use prost::Message;
use std::sync::Arc;
use std::time::Duration;

/// Lease TTL in seconds: a dead leader is replaced within about this long.
const LEASE_TTL: i64 = 3;

struct EtcdSink {
    client: Client,
    state_key: String,
    leader_key: Vec<u8>,
    rt: tokio::runtime::Handle,
}

impl StateSink for EtcdSink {
    fn save(&self, map: &pb::ShardMap) -> Result<bool, String> {
        let mut kv = self.client.kv_client();
        let txn = Txn::new()
            .when([Compare::version(self.leader_key.clone(), CompareOp::Greater, 0)])
            .and_then([TxnOp::put(self.state_key.clone(), map.encode_to_vec(), None)]);
        // Commits are rare (membership and namespace changes): block this handler's thread.
        let r = tokio::task::block_in_place(|| self.rt.block_on(kv.txn(txn))).map_err(|e| e.to_string())?;
        Ok(r.succeeded())
    }
}

async fn load(client: &mut Client, key: &str, state: &ClusterState) -> Result<(), String> {
    let r = client.get(key, None).await.map_err(|e| e.to_string())?;
    if let Some(kv) = r.kvs().first() {
        let map = pb::ShardMap::decode(kv.value()).map_err(|e| format!("{key}: {e}"))?;
        state.load_map(map).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Run this replica's part of the election forever: follow until elected, then lead. Returns an
/// error only when etcd cannot be reached at start; a leader that loses its lease exits the
/// process (its orchestrator restarts it as a follower).
pub async fn run(
    state: Arc<ClusterState>,
    endpoints: Vec<String>,
    prefix: String,
    advertise: String,
) -> Result<(), String> {
    let mut client = Client::connect(&endpoints, None).await.map_err(|e| format!("etcd {endpoints:?}: {e}"))?;
    let state_key = format!("{prefix}/state");
    let election = format!("{prefix}/leader");
    load(&mut client, &state_key, &state).await?;
    // Follow: refresh the state and the leader's address until elected.
    let follower = {
        let (state, mut c, key, election) = (state.clone(), client.clone(), state_key.clone(), election.clone());
        tokio::spawn(async move {
            loop {
                if !state.leadership().is_leader {
                    let _ = load(&mut c, &key, &state).await;
                    if let Ok(r) = c.leader(election.as_str()).await
                        && let Some(kv) = r.kv()
                    {
                        state.follow(String::from_utf8_lossy(kv.value()).into_owned());
                    }
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    };
    state.follow(String::new());
    let lease = client.lease_grant(LEASE_TTL, None).await.map_err(|e| e.to_string())?.id();
    let (mut keeper, mut acks) = client.lease_keep_alive(lease).await.map_err(|e| e.to_string())?;
    let keepalive = tokio::spawn(async move {
        loop {
            if keeper.keep_alive().await.is_err() {
                return;
            }
            match acks.message().await {
                Ok(Some(r)) if r.ttl() > 0 => {}
                _ => return,
            }
            tokio::time::sleep(Duration::from_millis(1000)).await;
        }
    });
    let won = client.campaign(election.as_str(), advertise.as_str(), lease).await.map_err(|e| e.to_string())?;
    let leader_key = won.leader().map(|l| l.key().to_vec()).ok_or("campaign returned no leader key")?;
    follower.abort();
    load(&mut client, &state_key, &state).await?;
    let sink = EtcdSink { client: client.clone(), state_key, leader_key, rt: tokio::runtime::Handle::current() };
    state.lead(Box::new(sink), advertise.clone());
    tracing::info!(%advertise, epoch = state.epoch(), "elected leader coordinator");
    // Leading: if the lease cannot be kept, another replica will take over; stop writing now.
    let _ = keepalive.await;
    tracing::error!("lost the etcd lease: stepping down");
    state.follow(String::new());
    std::process::exit(3);
}
