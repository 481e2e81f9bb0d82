//! The `Coordinator` gRPC service; coordinator errors become statuses here and nowhere else.

use crate::state::{ClusterState, CoordinatorError};
use kvcache_net::{Auth, Caller};
use kvcache_proto::v1 as pb;
use kvcache_proto::v1::coordinator_server::Coordinator;
use std::pin::Pin;
use std::sync::Arc;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

/// Map a coordinator error to its status.
pub fn status(e: CoordinatorError) -> Status {
    match e {
        CoordinatorError::Invalid(_) | CoordinatorError::BadRequest(_) => Status::invalid_argument(e.to_string()),
        CoordinatorError::NotFound(_) => Status::not_found(e.to_string()),
        CoordinatorError::Conflict(_) => Status::already_exists(e.to_string()),
        CoordinatorError::Io(_) | CoordinatorError::DataDir(_) => Status::unavailable(e.to_string()),
        CoordinatorError::NotLeader(ref leader) => {
            let mut s = Status::unavailable(e.to_string());
            if let Ok(v) = leader.parse() {
                s.metadata_mut().insert(kvcache_proto::metadata::LEADER, v);
            }
            s
        }
    }
}

/// Refuse a write on a follower, pointing at the leader.
fn leader_only(state: &ClusterState) -> Result<(), Status> {
    let l = state.leadership();
    if l.is_leader { Ok(()) } else { Err(status(CoordinatorError::NotLeader(l.leader))) }
}

/// The Coordinator service.
pub struct CoordinatorService {
    state: Arc<ClusterState>,
    /// The tenants: who sees which namespaces, and the quotas split into node shares.
    auth: Auth,
    closing: tokio::sync::watch::Receiver<bool>,
    /// The watch streams' tasks: shutdown waits for them.
    pub(crate) tasks: tokio_util::task::TaskTracker,
}

impl CoordinatorService {
    /// Serve `state`; watch streams end when `closing` turns true (so a graceful shutdown does
    /// not wait forever on them).
    pub fn new(state: Arc<ClusterState>, auth: Auth, closing: tokio::sync::watch::Receiver<bool>) -> Self {
        Self { state, auth, closing, tasks: tokio_util::task::TaskTracker::new() }
    }

    /// Node `node_id`'s share of every tenant's quota and reserved bytes.
    fn shares(&self, node_id: &str) -> Vec<pb::TenantShare> {
        tenant_shares(&self.auth.tenants(), &self.state.shard_map(), node_id)
    }
}

/// Node `node_id`'s share of each tenant's quota and reserved bytes: split by placement weight
/// over the nodes that hold pages — UP and DRAINING (a draining node keeps its share until its
/// pages moved and it left) — so the shares never add up to more than the quota. A DOWN node
/// (heard from again only when it registers) is counted as if it held its weight's share.
/// Tenants with neither a quota nor a reserve are left out.
pub fn tenant_shares(t: &kvcache_net::auth::Tenants, map: &pb::ShardMap, node_id: &str) -> Vec<pb::TenantShare> {
    let holds = |s: i32| s == pb::NodeState::Up as i32 || s == pb::NodeState::Draining as i32;
    let Some(me) = map.nodes.iter().find(|n| n.node.as_ref().is_some_and(|i| i.node_id == node_id)) else {
        return Vec::new();
    };
    let mut total: f64 = map.nodes.iter().filter(|n| holds(n.state)).map(|n| n.weight.max(0.0)).sum();
    if !holds(me.state) {
        total += me.weight.max(0.0);
    }
    let frac = if total > 0.0 { (me.weight.max(0.0) / total).min(1.0) } else { 0.0 };
    t.tenants
        .values()
        .filter(|t| t.quota.is_some() || t.reserved > 0)
        .map(|t| pb::TenantShare {
            tenant: t.name.clone(),
            // A quota never rounds down to "none" (0).
            quota_bytes: t.quota.map_or(0, |q| ((q as f64 * frac) as u64).max(1)),
            reserved_bytes: (t.reserved as f64 * frac) as u64,
        })
        .collect()
}

/// `map` with only the namespaces `caller` may see.
fn visible(map: &pb::ShardMap, caller: &Caller) -> pb::ShardMap {
    if caller.is_operator() {
        return map.clone();
    }
    let mut m = map.clone();
    m.namespaces.retain(|n| caller.sees(&n.tenant));
    m
}

/// Mark silent nodes down and advance join ramps, forever (aborted by [`crate::run`]).
pub async fn maintenance(state: Arc<ClusterState>) {
    let period = (state.config().node_timeout / 4).max(std::time::Duration::from_millis(50));
    let mut iv = tokio::time::interval(period);
    loop {
        iv.tick().await;
        if !state.leadership().is_leader {
            export_gauges(&state);
            continue;
        }
        if let Err(e) = state.tick() {
            tracing::error!(error = %e, "coordinator maintenance failed");
        }
        export_gauges(&state);
    }
}

fn export_gauges(state: &ClusterState) {
    use kvcache_telemetry::names as n;
    let map = state.shard_map();
    metrics::gauge!(n::COORDINATOR_EPOCH).set(map.epoch as f64);
    metrics::gauge!(n::COORDINATOR_NAMESPACES).set(map.namespaces.len() as f64);
    for (st, label) in [(pb::NodeState::Up, "up"), (pb::NodeState::Draining, "draining"), (pb::NodeState::Down, "down")]
    {
        let c = map.nodes.iter().filter(|x| x.state == st as i32).count();
        metrics::gauge!(n::COORDINATOR_NODES, "state" => label).set(c as f64);
    }
}

type MapStream = Pin<Box<dyn Stream<Item = Result<pb::ShardMap, Status>> + Send>>;

#[tonic::async_trait]
impl Coordinator for CoordinatorService {
    async fn register_node(
        &self,
        r: Request<pb::RegisterNodeRequest>,
    ) -> Result<Response<pb::RegisterNodeResponse>, Status> {
        leader_only(&self.state)?;
        let node = r.into_inner().node.ok_or_else(|| Status::invalid_argument("missing field `node`"))?;
        let id = node.node_id.clone();
        let epoch = self.state.register_node(node).map_err(status)?;
        tracing::info!(node = %id, epoch, "node registered");
        Ok(Response::new(pb::RegisterNodeResponse {
            epoch,
            heartbeat_interval_ms: self.state.config().heartbeat_interval.as_millis() as u32,
            namespaces: self.state.namespaces().iter().map(|n| n.into()).collect(),
            tenant_shares: self.shares(&id),
        }))
    }

    async fn heartbeat(&self, r: Request<pb::HeartbeatRequest>) -> Result<Response<pb::HeartbeatResponse>, Status> {
        leader_only(&self.state)?;
        let r = r.into_inner();
        let (epoch, known) = self.state.heartbeat(&r);
        Ok(Response::new(pb::HeartbeatResponse {
            epoch,
            known,
            namespaces: self.state.namespaces().iter().map(|n| n.into()).collect(),
            tenant_shares: self.shares(&r.node_id),
        }))
    }

    async fn drain(&self, r: Request<pb::DrainRequest>) -> Result<Response<pb::DrainResponse>, Status> {
        let epoch = self.state.drain(&r.into_inner().node_id).map_err(status)?;
        Ok(Response::new(pb::DrainResponse { epoch }))
    }

    async fn register_worker(
        &self,
        r: Request<pb::RegisterWorkerRequest>,
    ) -> Result<Response<pb::RegisterWorkerResponse>, Status> {
        let r = r.into_inner();
        let epoch = self
            .state
            .register_worker(pb::WorkerInfo { worker_id: r.worker_id, address: r.address })
            .map_err(status)?;
        Ok(Response::new(pb::RegisterWorkerResponse { epoch }))
    }

    async fn get_shard_map(&self, r: Request<pb::GetShardMapRequest>) -> Result<Response<pb::ShardMap>, Status> {
        Ok(Response::new(visible(&self.state.shard_map(), &Caller::of(&r))))
    }

    type WatchShardMapStream = MapStream;

    async fn watch_shard_map(&self, r: Request<pb::WatchShardMapRequest>) -> Result<Response<MapStream>, Status> {
        let caller = Caller::of(&r);
        let after = r.into_inner().after_epoch;
        let mut rx = self.state.subscribe();
        let mut closing = self.closing.clone();
        let (tx, out) = tokio::sync::mpsc::channel(4);
        self.tasks.spawn(async move {
            let mut last = after;
            loop {
                let map = rx.borrow_and_update().clone();
                if map.epoch > last || last == 0 {
                    last = map.epoch;
                    if tx.send(Ok(visible(&map, &caller))).await.is_err() {
                        return;
                    }
                }
                tokio::select! {
                    r = rx.changed() => if r.is_err() { return },
                    _ = async {
                        while !*closing.borrow_and_update() {
                            if closing.changed().await.is_err() {
                                break;
                            }
                        }
                    } => {
                        let _ = tx.send(Err(Status::unavailable("coordinator shutting down"))).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(out))))
    }

    async fn create_namespace(
        &self,
        r: Request<pb::CreateNamespaceRequest>,
    ) -> Result<Response<pb::Namespace>, Status> {
        let caller = Caller::of(&r);
        let mut req = r.into_inner();
        if let Some(t) = caller.tenant() {
            if req.tenant.is_empty() {
                req.tenant = t.name.clone();
            } else if req.tenant != t.name && !t.admin {
                return Err(Status::permission_denied(format!(
                    "tenant {:?} cannot create a namespace for tenant {:?}",
                    t.name, req.tenant
                )));
            }
        }
        let ns = self.state.create_namespace(req).map_err(status)?;
        Ok(Response::new((&ns).into()))
    }

    async fn get_namespace(&self, r: Request<pb::GetNamespaceRequest>) -> Result<Response<pb::Namespace>, Status> {
        let caller = Caller::of(&r);
        let ns = self.state.namespace(&r.into_inner().name).map_err(status)?;
        if !caller.sees(&ns.tenant) {
            caller.check_namespace(&ns.name, &ns.tenant)?;
        }
        Ok(Response::new((&ns).into()))
    }

    async fn list_namespaces(
        &self,
        r: Request<pb::ListNamespacesRequest>,
    ) -> Result<Response<pb::ListNamespacesResponse>, Status> {
        let caller = Caller::of(&r);
        Ok(Response::new(pb::ListNamespacesResponse {
            namespaces: self.state.namespaces().iter().filter(|n| caller.sees(&n.tenant)).map(|n| n.into()).collect(),
        }))
    }

    async fn cluster_status(
        &self,
        _r: Request<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        let l = self.state.leadership();
        Ok(Response::new(self.state.status(if l.leader.is_empty() { "self".into() } else { l.leader })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, state: pb::NodeState, weight: f64) -> pb::ShardNode {
        pb::ShardNode {
            node: Some(pb::NodeInfo { node_id: id.into(), ..Default::default() }),
            state: state as i32,
            weight,
        }
    }

    #[test]
    fn quotas_split_over_the_up_nodes_by_weight_and_rebalance_when_one_drains() {
        let t = kvcache_net::auth::Tenants::parse(&format!(
            "[tenants.a]\ntoken_sha256 = \"{}\"\nquota = 4000\nreserved = 400\n[tenants.free]\ntoken_sha256 = \"{}\"\n",
            "11".repeat(32),
            "22".repeat(32)
        ))
        .unwrap();
        let up = pb::NodeState::Up;
        let mut map = pb::ShardMap {
            nodes: vec![node("n0", up, 1.0), node("n1", up, 1.0), node("n2", up, 2.0)],
            ..Default::default()
        };
        let share = |m: &pb::ShardMap, id: &str| tenant_shares(&t, m, id);
        // A tenant without quota or reserve gets no entry (no limit).
        assert_eq!(share(&map, "n0").len(), 1);
        let q = |m: &pb::ShardMap, id: &str| share(m, id)[0].quota_bytes;
        assert_eq!((q(&map, "n0"), q(&map, "n1"), q(&map, "n2")), (1000, 1000, 2000));
        assert_eq!(share(&map, "n2")[0].reserved_bytes, 200);
        // n2 drains: it keeps its share until it leaves, so the shares never add up to more than
        // the quota; once it is gone (down, then out of the map) the others split it.
        map.nodes[2].state = pb::NodeState::Draining as i32;
        assert_eq!((q(&map, "n0"), q(&map, "n1"), q(&map, "n2")), (1000, 1000, 2000));
        map.nodes[2].state = pb::NodeState::Down as i32;
        assert_eq!((q(&map, "n0"), q(&map, "n1")), (2000, 2000));
        map.nodes.pop();
        assert_eq!((q(&map, "n0"), q(&map, "n1")), (2000, 2000));
        // A node the map does not know gets nothing.
        assert!(share(&map, "n9").is_empty());
    }
}
