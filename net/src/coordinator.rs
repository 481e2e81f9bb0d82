//! The link to the coordinator: the one piece every process that follows the cluster uses (the
//! client, a node's membership and handoff, the worker through its client).
//!
//! - Replicas: `--coordinator a:7000,b:7000`. A call goes to the replica in use; a follower's
//!   refusal carries the leader's address (`kvcache-leader` metadata) and the call follows it,
//!   unless that address refused a connection since the last success (the hint is stale while an
//!   election runs). A replica that cannot be reached is skipped for the next one. After a full
//!   round the link waits 250 ms between tries (an election takes a few seconds).
//! - The shard map: [`CoordinatorLink::watch`] keeps the current [`Routing`] with a
//!   `WatchShardMap` stream (never polling); [`CoordinatorLink::subscribe`] hands out a
//!   `tokio::sync::watch` receiver that wakes on every new epoch. A map older than the one held is
//!   never installed.
//!
//! Invariant: the routing held only moves forward in epoch.

use crate::Channel;
use crate::{NetError, Tls};
use kvcache_core::Routing;
use kvcache_proto::v1 as pb;
use kvcache_proto::v1::coordinator_client::CoordinatorClient;
use parking_lot::Mutex;
use std::future::Future;
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::sync::watch;
use tonic::{Code, Status};

/// A handle on the coordinator replicas and the shard map they serve. Cheap to clone.
#[derive(Clone)]
pub struct CoordinatorLink {
    inner: Arc<Inner>,
}

struct Inner {
    replicas: Vec<String>,
    tls: Tls,
    /// Deadline of each unary call.
    timeout: Duration,
    state: Mutex<State>,
    routing: watch::Sender<Arc<Routing>>,
    watch: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

struct State {
    /// Index of the replica tried last from the configured list.
    next: usize,
    /// Address in use (a replica, or the leader a follower named).
    current: String,
    client: CoordinatorClient<Channel>,
    /// Addresses that refused a connection since the last success.
    dead: Vec<String>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(h) = self.watch.lock().take() {
            h.abort();
        }
    }
}

/// Whether a coordinator call that failed with `s` should be tried at another replica.
fn failover(s: &Status) -> bool {
    matches!(s.code(), Code::Unavailable | Code::DeadlineExceeded | Code::Unknown | Code::Cancelled)
}

impl CoordinatorLink {
    /// A link to the comma-separated coordinator replicas `addrs`. Connects lazily; fails only on
    /// an address that cannot be used (no port, port out of range, bad host).
    pub fn new(addrs: &str, tls: &Tls, timeout: Duration) -> Result<Self, NetError> {
        let replicas: Vec<String> = addrs.split(',').map(|a| a.trim().to_owned()).filter(|a| !a.is_empty()).collect();
        if replicas.is_empty() {
            return Err(NetError::Config("no coordinator address given".into()));
        }
        for r in &replicas {
            crate::check_address(r)?;
        }
        let client = Self::client_for(&replicas[0], tls)?;
        let (routing, _) = watch::channel(Arc::new(Routing::default()));
        Ok(Self {
            inner: Arc::new(Inner {
                state: Mutex::new(State { next: 0, current: replicas[0].clone(), client, dead: Vec::new() }),
                replicas,
                tls: tls.clone(),
                timeout,
                routing,
                watch: Mutex::new(None),
            }),
        })
    }

    fn client_for(addr: &str, tls: &Tls) -> Result<CoordinatorClient<Channel>, NetError> {
        Ok(CoordinatorClient::new(crate::channel(addr, tls)?))
    }

    /// The configured replicas.
    pub fn replicas(&self) -> &[String] {
        &self.inner.replicas
    }

    /// The address calls go to now.
    pub fn current(&self) -> String {
        self.inner.state.lock().current.clone()
    }

    /// The coordinator client in use (the leader, once known).
    pub fn client(&self) -> CoordinatorClient<Channel> {
        self.inner.state.lock().client.clone()
    }

    /// Move off the replica that answered `s`: to the leader it named, or to the next replica.
    fn switch(&self, s: &Status) {
        let hint = s
            .metadata()
            .get(kvcache_proto::metadata::LEADER)
            .and_then(|v| v.to_str().ok())
            .filter(|l| !l.is_empty())
            .map(str::to_owned);
        let mut st = self.inner.state.lock();
        let target = match hint {
            Some(l) if !st.dead.contains(&l) && l != st.current => l,
            _ => {
                // No leader metadata at all: the replica itself did not answer.
                if s.metadata().get(kvcache_proto::metadata::LEADER).is_none() && !st.dead.contains(&st.current) {
                    let cur = st.current.clone();
                    st.dead.push(cur);
                }
                st.next = (st.next + 1) % self.inner.replicas.len();
                self.inner.replicas[st.next].clone()
            }
        };
        match Self::client_for(&target, &self.inner.tls) {
            Ok(c) => {
                st.client = c;
                st.current = target;
            }
            Err(e) => tracing::warn!(coordinator = %target, error = %e, "unusable leader address; not followed"),
        }
    }

    /// Run a unary coordinator call (each try under the link's deadline), following a
    /// follower's redirect to the leader and failing over across the replicas. The error of a
    /// call no replica answered names the replicas and the last cause.
    pub async fn call<T, F, Fut>(&self, f: F) -> Result<T, Status>
    where
        F: Fn(CoordinatorClient<Channel>) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let n = self.inner.replicas.len();
        let mut last = Status::unavailable("not tried");
        for attempt in 0..(2 * n + 4) {
            let r = match tokio::time::timeout(self.inner.timeout, f(self.client())).await {
                Ok(r) => r,
                Err(_) => Err(Status::deadline_exceeded(format!("no answer within {:?}", self.inner.timeout))),
            };
            match r {
                Ok(v) => {
                    self.inner.state.lock().dead.clear();
                    return Ok(v);
                }
                Err(s) if failover(&s) => {
                    self.switch(&s);
                    last = s;
                    if attempt + 1 >= n {
                        // Every replica was tried once: an election may be in progress.
                        if (attempt + 1) % n == 0 {
                            self.inner.state.lock().dead.clear();
                        }
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                }
                Err(s) => return Err(s),
            }
        }
        Err(Status::new(
            last.code(),
            format!("cannot reach the coordinator at {} ({})", self.inner.replicas.join(","), crate::root_cause(&last)),
        ))
    }

    /// The current routing snapshot.
    pub fn routing(&self) -> Arc<Routing> {
        self.inner.routing.borrow().clone()
    }

    /// A receiver that wakes on every routing of a newer epoch.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Routing>> {
        self.inner.routing.subscribe()
    }

    /// Install `map` unless the link holds a newer one; returns the routing held after.
    pub fn install(&self, map: pb::ShardMap) -> Arc<Routing> {
        install(&self.inner, map);
        self.routing()
    }

    /// Fetch the shard map now and install it.
    pub async fn refresh(&self) -> Result<Arc<Routing>, Status> {
        let map = self.call(|mut c| async move { c.get_shard_map(pb::GetShardMapRequest {}).await }).await?;
        Ok(self.install(map.into_inner()))
    }

    /// Keep the routing current with a `WatchShardMap` stream, from now until the last handle
    /// is dropped. Idempotent.
    pub fn watch(&self) {
        let mut w = self.inner.watch.lock();
        if w.is_none() {
            *w = Some(tokio::spawn(watch_loop(Arc::downgrade(&self.inner))));
        }
    }
}

fn install(inner: &Inner, map: pb::ShardMap) {
    let next = Arc::new(Routing::from(map));
    inner.routing.send_if_modified(|cur| {
        if next.epoch > cur.epoch {
            *cur = next;
            true
        } else {
            // The same epoch again (a refresh): nothing changed, no one is woken.
            false
        }
    });
}

async fn watch_loop(inner: Weak<Inner>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let Some(i) = inner.upgrade() else { return };
        let after = i.routing.borrow().epoch;
        let link = CoordinatorLink { inner: i };
        let mut coord = link.client();
        drop(link);
        match coord.watch_shard_map(pb::WatchShardMapRequest { after_epoch: after }).await {
            Ok(s) => {
                let mut s = s.into_inner();
                backoff = Duration::from_millis(100);
                while let Ok(Some(map)) = s.message().await {
                    let Some(i) = inner.upgrade() else { return };
                    install(&i, map);
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "shard map watch failed; retrying");
                if failover(&e) {
                    let Some(i) = inner.upgrade() else { return };
                    CoordinatorLink { inner: i }.switch(&e);
                }
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}
