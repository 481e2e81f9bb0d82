//! Cluster state: membership, namespaces, workers, epoch; persisted and published as shard maps.

use kvcache_core::key::DEFAULT_PAGE_TOKENS;
use kvcache_core::validate::{self, ValidationError};
use kvcache_core::{ModelSpec, Namespace};
use kvcache_proto::v1 as pb;
use parking_lot::Mutex;
use prost::Message;
use std::collections::BTreeMap;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;

/// Coordinator settings.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    /// Where `coordinator-state.pb` lives.
    pub data_dir: PathBuf,
    /// A node silent for this long is marked down.
    pub node_timeout: Duration,
    /// A newly joined node's weight grows from a quarter to full over this long (in 4 steps).
    pub join_ramp: Duration,
    /// Heartbeat period nodes are told to use.
    pub heartbeat_interval: Duration,
}

impl CoordinatorConfig {
    /// Defaults: 10 s node timeout, 1 s heartbeats, 60 s join ramp.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            node_timeout: Duration::from_secs(10),
            join_ramp: Duration::from_secs(60),
            heartbeat_interval: Duration::from_secs(1),
        }
    }
}

/// What went wrong.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// Malformed request.
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    /// Bad request beyond wire validation.
    #[error("{0}")]
    BadRequest(String),
    /// Unknown namespace or node.
    #[error("{0}")]
    NotFound(String),
    /// Namespace exists with another definition.
    #[error("namespace {0:?} already exists with a different definition (namespaces are immutable)")]
    Conflict(String),
    /// State file failure.
    #[error("state persistence failed: {0}")]
    Io(#[from] io::Error),
    /// The data directory is held by another process.
    #[error(transparent)]
    DataDir(#[from] kvcache_net::DataDirError),
    /// This replica is a follower; writes go to the leader.
    #[error("not the leader coordinator (leader: {0:?})")]
    NotLeader(String),
}

#[derive(Debug, Clone)]
struct NodeRec {
    info: pb::NodeInfo,
    state: pb::NodeState,
    joined: Instant,
    ramp_step: u32,
    last_heartbeat: Instant,
    last_heartbeat_wall: SystemTime,
    used_bytes: u64,
    pages: u64,
    sequences: u64,
}

struct Inner {
    epoch: u64,
    nodes: BTreeMap<String, NodeRec>,
    namespaces: BTreeMap<String, Namespace>,
    workers: BTreeMap<String, pb::WorkerInfo>,
}

/// Where the state is persisted besides (or instead of) the local file: implemented by the
/// etcd backend. `save` returns false when this replica is no longer allowed to write (it lost
/// leadership), which makes the commit fail.
pub trait StateSink: Send + Sync {
    /// Persist `map`; Ok(false) if fenced off.
    fn save(&self, map: &pb::ShardMap) -> Result<bool, String>;
}

/// Who may write: this replica (leader) or another one at `leader` (follower).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leadership {
    /// Whether this replica accepts writes.
    pub is_leader: bool,
    /// Address of the leader ("" when unknown).
    pub leader: String,
}

/// The coordinator's state.
pub struct ClusterState {
    /// The exclusive hold on `cfg.data_dir`, released when the state is dropped.
    _dir_lock: kvcache_net::DataDirLock,
    cfg: CoordinatorConfig,
    inner: Mutex<Inner>,
    tx: watch::Sender<Arc<pb::ShardMap>>,
    leadership: Mutex<Leadership>,
    sink: Mutex<Option<Box<dyn StateSink>>>,
}

const STATE_FILE: &str = "coordinator-state.pb";
const RAMP_STEPS: u32 = 4;

fn ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl ClusterState {
    /// Load the persisted state (or start empty). Nodes come back DOWN until they heartbeat.
    pub fn open(cfg: CoordinatorConfig) -> Result<Arc<ClusterState>, CoordinatorError> {
        let dir_lock = kvcache_net::DataDirLock::acquire(&cfg.data_dir)?;
        let mut inner =
            Inner { epoch: 0, nodes: BTreeMap::new(), namespaces: BTreeMap::new(), workers: BTreeMap::new() };
        match std::fs::read(cfg.data_dir.join(STATE_FILE)) {
            Ok(b) => {
                let m = pb::ShardMap::decode(b.as_slice())
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{STATE_FILE}: {e}")))?;
                inner.epoch = m.epoch;
                for n in m.namespaces {
                    let ns = Namespace::try_from(n)?;
                    inner.namespaces.insert(ns.name.clone(), ns);
                }
                let now = Instant::now();
                for sn in m.nodes {
                    if let Some(info) = sn.node {
                        inner.nodes.insert(
                            info.node_id.clone(),
                            NodeRec {
                                info,
                                state: pb::NodeState::Down,
                                joined: now,
                                ramp_step: RAMP_STEPS,
                                last_heartbeat: now,
                                last_heartbeat_wall: SystemTime::now(),
                                used_bytes: 0,
                                pages: 0,
                                sequences: 0,
                            },
                        );
                    }
                }
                for w in m.workers {
                    inner.workers.insert(w.worker_id.clone(), w);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        let map = Arc::new(Self::map_of(&cfg, &inner));
        let (tx, _) = watch::channel(map);
        Ok(Arc::new(ClusterState {
            _dir_lock: dir_lock,
            cfg,
            inner: Mutex::new(inner),
            tx,
            leadership: Mutex::new(Leadership { is_leader: true, leader: String::new() }),
            sink: Mutex::new(None),
        }))
    }

    /// Who may write now.
    pub fn leadership(&self) -> Leadership {
        self.leadership.lock().clone()
    }

    /// Become a follower of `leader` (HA mode): writes are refused and redirected.
    pub fn follow(&self, leader: String) {
        *self.sink.lock() = None;
        *self.leadership.lock() = Leadership { is_leader: false, leader };
    }

    /// Become the leader, persisting every commit through `sink` from now on.
    pub fn lead(&self, sink: Box<dyn StateSink>, me: String) {
        *self.sink.lock() = Some(sink);
        // Give every node a full timeout to heartbeat to the new leader before judging it.
        let now = Instant::now();
        for n in self.inner.lock().nodes.values_mut() {
            n.last_heartbeat = now;
        }
        *self.leadership.lock() = Leadership { is_leader: true, leader: me };
    }

    /// Replace the state with `map` (a follower catching up with the leader's writes, or a new
    /// leader loading the latest state). Ignored unless `map` is newer. Node states are taken as
    /// persisted; their liveness clocks restart.
    pub fn load_map(&self, map: pb::ShardMap) -> Result<bool, CoordinatorError> {
        let mut inner = self.inner.lock();
        if map.epoch <= inner.epoch && inner.epoch != 0 {
            return Ok(false);
        }
        let now = Instant::now();
        inner.epoch = map.epoch;
        inner.namespaces.clear();
        for n in map.namespaces {
            let ns = Namespace::try_from(n)?;
            inner.namespaces.insert(ns.name.clone(), ns);
        }
        let old = std::mem::take(&mut inner.nodes);
        for sn in map.nodes {
            let Some(info) = sn.node else { continue };
            let state = pb::NodeState::try_from(sn.state).unwrap_or(pb::NodeState::Down);
            let prev = old.get(&info.node_id);
            inner.nodes.insert(
                info.node_id.clone(),
                NodeRec {
                    state,
                    joined: prev.map_or(now, |p| p.joined),
                    ramp_step: prev.map_or(RAMP_STEPS, |p| p.ramp_step),
                    last_heartbeat: now,
                    last_heartbeat_wall: SystemTime::now(),
                    used_bytes: prev.map_or(0, |p| p.used_bytes),
                    pages: prev.map_or(0, |p| p.pages),
                    sequences: prev.map_or(0, |p| p.sequences),
                    info,
                },
            );
        }
        inner.workers = map.workers.into_iter().map(|w| (w.worker_id.clone(), w)).collect();
        let m = Self::map_of(&self.cfg, &inner);
        self.tx.send_replace(Arc::new(m));
        Ok(true)
    }

    /// Settings.
    pub fn config(&self) -> &CoordinatorConfig {
        &self.cfg
    }

    fn weight(cfg: &CoordinatorConfig, n: &NodeRec) -> f64 {
        if n.state != pb::NodeState::Up {
            return 0.0;
        }
        let cap = (n.info.capacity_bytes.max(1)) as f64 / (1u64 << 30) as f64;
        if cfg.join_ramp.is_zero() { cap } else { cap * n.ramp_step as f64 / RAMP_STEPS as f64 }
    }

    fn map_of(cfg: &CoordinatorConfig, inner: &Inner) -> pb::ShardMap {
        pb::ShardMap {
            epoch: inner.epoch,
            nodes: inner
                .nodes
                .values()
                .map(|n| pb::ShardNode {
                    node: Some(n.info.clone()),
                    state: n.state as i32,
                    weight: Self::weight(cfg, n),
                })
                .collect(),
            namespaces: inner.namespaces.values().map(|n| n.into()).collect(),
            workers: inner.workers.values().cloned().collect(),
        }
    }

    /// Bump the epoch, persist, publish. Called with the lock held.
    fn commit(&self, inner: &mut Inner) -> Result<u64, CoordinatorError> {
        let l = self.leadership();
        if !l.is_leader {
            return Err(CoordinatorError::NotLeader(l.leader));
        }
        inner.epoch += 1;
        let map = Self::map_of(&self.cfg, inner);
        if let Err(e) = self.persist(&map) {
            inner.epoch -= 1;
            return Err(e);
        }
        self.tx.send_replace(Arc::new(map));
        Ok(inner.epoch)
    }

    fn persist(&self, map: &pb::ShardMap) -> Result<(), CoordinatorError> {
        if let Some(sink) = self.sink.lock().as_ref() {
            match sink.save(map) {
                Ok(true) => {}
                Ok(false) => {
                    self.leadership.lock().is_leader = false;
                    return Err(CoordinatorError::NotLeader(String::new()));
                }
                Err(e) => return Err(io::Error::other(e).into()),
            }
        }
        use std::io::Write;
        let dir = &self.cfg.data_dir;
        let tmp = dir.join(format!("{STATE_FILE}.tmp"));
        let path = dir.join(STATE_FILE);
        // The error names the file: "state persistence failed" alone does not say where.
        let at = |what: &str, p: &std::path::Path, e: io::Error| {
            io::Error::new(e.kind(), format!("{what} {}: {e}", p.display()))
        };
        let mut f = std::fs::File::create(&tmp).map_err(|e| at("creating", &tmp, e))?;
        f.write_all(&map.encode_to_vec()).and_then(|_| f.sync_all()).map_err(|e| at("writing", &tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| at("renaming into", &path, e))?;
        std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| at("syncing", dir, e))?;
        Ok(())
    }

    /// The current map.
    pub fn shard_map(&self) -> Arc<pb::ShardMap> {
        self.tx.borrow().clone()
    }

    /// A receiver of every new map.
    pub fn subscribe(&self) -> watch::Receiver<Arc<pb::ShardMap>> {
        self.tx.subscribe()
    }

    /// The current epoch.
    pub fn epoch(&self) -> u64 {
        self.inner.lock().epoch
    }

    /// Every namespace.
    pub fn namespaces(&self) -> Vec<Namespace> {
        self.inner.lock().namespaces.values().cloned().collect()
    }

    /// Register (or re-register) a node. A rejoin with the same id keeps its ramp if it never
    /// went down.
    pub fn register_node(&self, info: pb::NodeInfo) -> Result<u64, CoordinatorError> {
        if info.node_id.is_empty() || info.node_id.len() > 128 {
            return Err(CoordinatorError::BadRequest("node_id must be 1..=128 bytes".into()));
        }
        if info.address.is_empty() {
            return Err(CoordinatorError::BadRequest("node address is empty".into()));
        }
        if info.capacity_bytes == 0 {
            return Err(CoordinatorError::BadRequest("node capacity_bytes is 0".into()));
        }
        let mut inner = self.inner.lock();
        let now = Instant::now();
        let ramp = if self.cfg.join_ramp.is_zero() { RAMP_STEPS } else { 1 };
        let changed = match inner.nodes.get_mut(&info.node_id) {
            Some(n) => {
                let same = n.info == info && n.state == pb::NodeState::Up;
                n.last_heartbeat = now;
                n.last_heartbeat_wall = SystemTime::now();
                if !same {
                    if n.state == pb::NodeState::Down {
                        n.joined = now;
                        n.ramp_step = ramp;
                    }
                    n.info = info;
                    n.state = pb::NodeState::Up;
                }
                !same
            }
            None => {
                inner.nodes.insert(
                    info.node_id.clone(),
                    NodeRec {
                        info,
                        state: pb::NodeState::Up,
                        joined: now,
                        ramp_step: ramp,
                        last_heartbeat: now,
                        last_heartbeat_wall: SystemTime::now(),
                        used_bytes: 0,
                        pages: 0,
                        sequences: 0,
                    },
                );
                true
            }
        };
        if changed { self.commit(&mut inner) } else { Ok(inner.epoch) }
    }

    /// Record a heartbeat. Returns (epoch, known).
    pub fn heartbeat(&self, r: &pb::HeartbeatRequest) -> (u64, bool) {
        let mut inner = self.inner.lock();
        let epoch = inner.epoch;
        match inner.nodes.get_mut(&r.node_id) {
            Some(n) if n.state != pb::NodeState::Down => {
                n.last_heartbeat = Instant::now();
                n.last_heartbeat_wall = SystemTime::now();
                n.used_bytes = r.used_bytes;
                n.pages = r.pages;
                n.sequences = r.sequences;
                (epoch, true)
            }
            _ => (epoch, false),
        }
    }

    /// Take a node out of placement; it keeps serving reads.
    pub fn drain(&self, node_id: &str) -> Result<u64, CoordinatorError> {
        let mut inner = self.inner.lock();
        let n = inner
            .nodes
            .get_mut(node_id)
            .ok_or_else(|| CoordinatorError::NotFound(format!("unknown node {node_id:?}")))?;
        if n.state == pb::NodeState::Draining {
            return Ok(inner.epoch);
        }
        n.state = pb::NodeState::Draining;
        self.commit(&mut inner)
    }

    /// Register a worker for sticky decode routing.
    pub fn register_worker(&self, w: pb::WorkerInfo) -> Result<u64, CoordinatorError> {
        if w.worker_id.is_empty() || w.address.is_empty() {
            return Err(CoordinatorError::BadRequest("worker_id and address are required".into()));
        }
        let mut inner = self.inner.lock();
        if inner.workers.get(&w.worker_id) == Some(&w) {
            return Ok(inner.epoch);
        }
        inner.workers.insert(w.worker_id.clone(), w);
        self.commit(&mut inner)
    }

    /// Mark nodes silent for longer than the timeout as down, and advance join ramps. Returns
    /// whether anything changed.
    pub fn tick(&self) -> Result<bool, CoordinatorError> {
        let mut inner = self.inner.lock();
        let now = Instant::now();
        let mut changed = false;
        for n in inner.nodes.values_mut() {
            if matches!(n.state, pb::NodeState::Up | pb::NodeState::Draining)
                && now.duration_since(n.last_heartbeat) > self.cfg.node_timeout
            {
                tracing::warn!(node = %n.info.node_id, "node missed heartbeats: marked down");
                n.state = pb::NodeState::Down;
                changed = true;
            }
            if n.state == pb::NodeState::Up && n.ramp_step < RAMP_STEPS && !self.cfg.join_ramp.is_zero() {
                let step = 1
                    + (now.duration_since(n.joined).as_secs_f64() / self.cfg.join_ramp.as_secs_f64()
                        * (RAMP_STEPS - 1) as f64) as u32;
                let step = step.min(RAMP_STEPS);
                if step != n.ramp_step {
                    n.ramp_step = step;
                    changed = true;
                }
            }
        }
        if changed {
            self.commit(&mut inner)?;
        }
        Ok(changed)
    }

    /// Create a namespace (idempotent for an identical definition).
    pub fn create_namespace(&self, r: pb::CreateNamespaceRequest) -> Result<Namespace, CoordinatorError> {
        validate::namespace_name(&r.name)?;
        let model = if !r.preset.is_empty() {
            ModelSpec::preset(&r.preset).ok_or_else(|| {
                CoordinatorError::BadRequest(format!(
                    "unknown preset {:?}: expected one of {}",
                    r.preset,
                    ModelSpec::preset_names().join(", ")
                ))
            })?
        } else {
            ModelSpec::try_from(r.model.ok_or(ValidationError::Missing("model (or preset)"))?)?
        };
        let codec = if r.codec == 0 { kvcache_core::Codec::Bf16 } else { validate::codec(r.codec)? };
        let page_tokens = if r.page_tokens == 0 { DEFAULT_PAGE_TOKENS } else { r.page_tokens };
        let replication = if r.replication == 0 { 1 } else { r.replication };
        validate::namespace_params(page_tokens, replication)?;
        let ns = Namespace {
            name: r.name,
            tenant: r.tenant,
            model,
            codec,
            page_tokens,
            replication,
            prefix_seed: rand::random(),
        };
        let mut inner = self.inner.lock();
        if let Some(existing) = inner.namespaces.get(&ns.name) {
            return if existing.same_definition(&ns) {
                Ok(existing.clone())
            } else {
                Err(CoordinatorError::Conflict(ns.name))
            };
        }
        inner.namespaces.insert(ns.name.clone(), ns.clone());
        self.commit(&mut inner)?;
        Ok(ns)
    }

    /// One namespace.
    pub fn namespace(&self, name: &str) -> Result<Namespace, CoordinatorError> {
        self.inner
            .lock()
            .namespaces
            .get(name)
            .cloned()
            .ok_or_else(|| CoordinatorError::NotFound(format!("unknown namespace {name:?}")))
    }

    /// The ClusterStatus answer.
    pub fn status(&self, leader: String) -> pb::ClusterStatusResponse {
        let inner = self.inner.lock();
        pb::ClusterStatusResponse {
            epoch: inner.epoch,
            nodes: inner
                .nodes
                .values()
                .map(|n| pb::NodeStatus {
                    node: Some(pb::ShardNode {
                        node: Some(n.info.clone()),
                        state: n.state as i32,
                        weight: Self::weight(&self.cfg, n),
                    }),
                    used_bytes: n.used_bytes,
                    pages: n.pages,
                    sequences: n.sequences,
                    last_heartbeat_unix_ms: ms(n.last_heartbeat_wall),
                })
                .collect(),
            namespaces: inner.namespaces.values().map(|n| n.into()).collect(),
            workers: inner.workers.values().cloned().collect(),
            leader,
        }
    }
}
