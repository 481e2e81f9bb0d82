//! High availability on etcd: the state lives under `{prefix}/state` (the ShardMap, encoded),
//! replicas elect a leader through an etcd election bound to a short lease, followers keep
//! their copy current (answering reads and watches) and refuse writes with the leader's address,
//! and the leader writes each commit in a transaction guarded by its election key, so a replica
//! that lost its lease can never overwrite a newer leader's state. A new leader starts from the
//! latest state in etcd, so the epoch never goes backwards.
//!
//! With TLS ([`EtcdTls`]: the `--etcd-ca`, `--etcd-cert`, `--etcd-key` flags) every connection to
//! etcd goes over rustls, the stack every other kvcache channel uses: the CA verifies etcd's
//! server certificate, the certificate and key are the client identity etcd's
//! `--client-cert-auth` asks for.

use crate::state::{ClusterState, StateSink};
use etcd_client::{Client, Compare, CompareOp, ConnectOptions, Txn, TxnOp};
use kvcache_proto::v1 as pb;
use prost::Message;
use std::sync::Arc;
use std::time::Duration;

/// Lease TTL in seconds: a dead leader is replaced within about this long.
const LEASE_TTL: i64 = 3;

/// TLS of the connections to etcd (`None`: plaintext).
pub type EtcdTls = Option<tonic::transport::ClientTlsConfig>;

async fn connect(endpoints: &[String], tls: &EtcdTls) -> Result<Client, String> {
    let opts = tls.clone().map(|t| ConnectOptions::new().with_tls(t));
    Client::connect(endpoints, opts).await.map_err(|e| format!("etcd {endpoints:?}: {e}"))
}

/// Writes commits to etcd from a thread with its own runtime and its own etcd connection.
/// Commits run while the state lock is held; if the write needed the main runtime, handlers
/// blocked on that lock could starve the very tasks that drive the etcd connection.
struct EtcdSink {
    tx: std::sync::Mutex<std::sync::mpsc::Sender<WriteRequest>>,
}

/// An encoded state and where to send whether the fenced write succeeded.
type WriteRequest = (Vec<u8>, std::sync::mpsc::Sender<Result<bool, String>>);

impl EtcdSink {
    fn start(endpoints: Vec<String>, tls: EtcdTls, state_key: String, leader_key: Vec<u8>) -> Result<EtcdSink, String> {
        let (tx, rx) = std::sync::mpsc::channel::<WriteRequest>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
        std::thread::Builder::new()
            .name("kvcache-etcd-writer".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                let client = match rt.block_on(connect(&endpoints, &tls)) {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                while let Ok((bytes, reply)) = rx.recv() {
                    let mut kv = client.kv_client();
                    let txn = Txn::new()
                        .when([Compare::version(leader_key.clone(), CompareOp::Greater, 0)])
                        .and_then([TxnOp::put(state_key.clone(), bytes, None)]);
                    let r = rt.block_on(async {
                        tokio::time::timeout(Duration::from_secs(5), kv.txn(txn))
                            .await
                            .map_err(|_| "etcd write timed out".to_string())
                    });
                    let _ = reply.send(r.and_then(|r| r.map(|r| r.succeeded()).map_err(|e| e.to_string())));
                }
            })
            .map_err(|e| e.to_string())?;
        ready_rx.recv().map_err(|e| e.to_string())??;
        Ok(EtcdSink { tx: std::sync::Mutex::new(tx) })
    }
}

impl StateSink for EtcdSink {
    fn save(&self, map: &pb::ShardMap) -> Result<bool, String> {
        let (reply, answer) = std::sync::mpsc::channel();
        self.tx
            .lock()
            .map_err(|_| "etcd writer poisoned")?
            .send((map.encode_to_vec(), reply))
            .map_err(|_| "etcd writer stopped")?;
        // Let the runtime move other tasks off this thread while the write is in flight.
        let wait = || answer.recv().map_err(|_| "etcd writer stopped".to_string())?;
        match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(wait)
            }
            _ => wait(),
        }
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
    tls: EtcdTls,
) -> Result<(), String> {
    let mut client = connect(&endpoints, &tls).await?;
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
    let sink = tokio::task::spawn_blocking({
        let (endpoints, state_key) = (endpoints.clone(), state_key.clone());
        move || EtcdSink::start(endpoints, tls, state_key, leader_key)
    })
    .await
    .map_err(|e| e.to_string())??;
    state.lead(Box::new(sink), advertise.clone());
    tracing::info!(%advertise, epoch = state.epoch(), "elected leader coordinator");
    // Leading: if the lease cannot be kept, another replica will take over; stop writing now.
    let _ = keepalive.await;
    tracing::error!("lost the etcd lease: stepping down");
    state.follow(String::new());
    std::process::exit(3);
}
