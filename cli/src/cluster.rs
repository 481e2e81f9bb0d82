//! A local cluster: a coordinator, `nodes` cache nodes and a worker, each on its own loopback
//! port, with embedded coordinator state and pool files under one data directory. All in this
//! process by default; with [`LocalClusterConfig::processes`] the coordinator and the nodes run
//! as processes of the `kvcache` binary (as a deployment runs them), the worker still here.

use kvcache_client::Client;
use kvcache_coordinator::{ClusterState, CoordinatorConfig};
use kvcache_node::{Durability, PageStore, StoreConfig};
use kvcache_proto::v1 as pb;
use kvcache_worker::{Worker, WorkerConfig};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Settings of a local cluster.
#[derive(Debug, Clone)]
pub struct LocalClusterConfig {
    /// Data directory (coordinator state and one sub-directory per node).
    pub data_dir: PathBuf,
    /// Cache nodes.
    pub nodes: usize,
    /// Capacity of each node.
    pub node_capacity: u64,
    /// Durability of the nodes.
    pub durability: Durability,
    /// Worker page-cache bound.
    pub worker_cache_bytes: u64,
    /// Host to bind (loopback).
    pub host: String,
    /// Worker prefetch of layer L+1.
    pub worker_prefetch: bool,
    /// Worker page cache preallocated and faulted in at start.
    pub worker_cache_prefault: bool,
    /// The GPU the worker computes on (`None`: the CPU kernels).
    pub worker_device: Option<std::sync::Arc<kvcache_attention::gpu::Gpu>>,
    /// TLS of every listener and every call between the services (plaintext by default).
    pub tls: kvcache_net::Tls,
    /// Where the coordinator listens (`None`: a free port on `host`). The other services always
    /// take free ports: clients find them through the coordinator.
    pub coordinator_listen: Option<String>,
    /// The tenants every service enforces (open by default). The cluster's own processes show
    /// each other a service token made up at start, so the file needs no `[service]`.
    pub auth: kvcache_net::Auth,
    /// Run the coordinator and the nodes as child processes of this `kvcache` binary
    /// (`kvcache coordinator`, `kvcache node`) instead of tasks of this process: the worker then
    /// shares its process, allocator and runtime with nothing but its callers, as in a
    /// deployment. (Plaintext and open tenants only.)
    pub processes: Option<PathBuf>,
}

impl LocalClusterConfig {
    /// Three nodes of 2 GiB under `data_dir`, a worker with a 1 GiB cache.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            nodes: 3,
            node_capacity: 2 << 30,
            durability: Durability::Async,
            worker_cache_bytes: 1 << 30,
            host: "127.0.0.1".into(),
            worker_prefetch: true,
            worker_cache_prefault: false,
            worker_device: None,
            tls: kvcache_net::Tls::none(),
            coordinator_listen: None,
            auth: kvcache_net::Auth::open(),
            processes: None,
        }
    }
}

struct Service {
    name: String,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

/// A running local cluster.
pub struct LocalCluster {
    /// Coordinator address (host:port).
    pub coordinator: String,
    /// Node addresses.
    pub nodes: Vec<String>,
    /// Worker address.
    pub worker: String,
    /// The worker (for its counters).
    pub worker_handle: Arc<Worker>,
    services: Vec<Service>,
    /// How the services call each other (with the cluster's service token under tenants).
    service_tls: kvcache_net::Tls,
}

fn exposure(cfg: &LocalClusterConfig) -> kvcache_net::Exposure {
    kvcache_net::Exposure { tls: cfg.tls.clone(), auth: cfg.auth.clone(), health_listener: None }
}

fn stop_pair() -> (oneshot::Sender<()>, impl std::future::Future<Output = ()> + Send + 'static) {
    let (tx, rx) = oneshot::channel::<()>();
    (tx, async move {
        let _ = rx.await;
    })
}

impl LocalCluster {
    /// Start everything; returns once the coordinator sees every node and the worker is
    /// registered.
    pub async fn start(mut cfg: LocalClusterConfig) -> anyhow::Result<LocalCluster> {
        std::fs::create_dir_all(&cfg.data_dir)?;
        if cfg.auth.enforced() {
            // The services call each other with a token only they know.
            let token = hex::encode(rand::random::<[u8; 32]>());
            cfg.auth.add_service_token(&token);
            cfg.tls = cfg.tls.clone().with_token(&token)?;
        }
        let mut services = Vec::new();
        let (coordinator, nodes) = match cfg.processes.clone() {
            Some(exe) => start_processes(&cfg, &exe, &mut services).await?,
            None => start_in_process(&cfg, &mut services).await?,
        };
        // Wait for the nodes to be in the map.
        let client = Client::connect_with(
            &coordinator,
            kvcache_client::ClientConfig { tls: cfg.tls.clone(), ..Default::default() },
        )
        .await?;
        for _ in 0..200 {
            if client.refresh().await?.live_nodes().len() == cfg.nodes {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        anyhow::ensure!(client.routing().live_nodes().len() == cfg.nodes, "cache nodes did not register");
        // Worker.
        let wcfg = WorkerConfig {
            cache_bytes: cfg.worker_cache_bytes,
            prefetch: cfg.worker_prefetch,
            cache_prefault: cfg.worker_cache_prefault,
            device: cfg.worker_device.clone(),
            ..WorkerConfig::default()
        };
        let worker = Worker::new(client.clone(), wcfg);
        let l = tokio::net::TcpListener::bind((cfg.host.as_str(), 0)).await?;
        let waddr = l.local_addr()?.to_string();
        let (tx, stop) = stop_pair();
        let w = worker.clone();
        let ex = exposure(&cfg);
        let task = tokio::spawn(async move {
            if let Err(e) = kvcache_worker::run(w, l, ex, stop).await {
                tracing::error!(error = %e, "worker failed");
            }
        });
        services.push(Service { name: "worker".into(), stop: Some(tx), task });
        kvcache_worker::register(&client, "worker-0", &waddr).await?;
        Ok(LocalCluster { coordinator, nodes, worker: waddr, worker_handle: worker, services, service_tls: cfg.tls })
    }

    /// The TLS settings (and, with tenants, the service token) the services call each other
    /// with: a client built with them acts as kvcache's own processes do (every namespace).
    pub fn service_tls(&self) -> kvcache_net::Tls {
        self.service_tls.clone()
    }

    /// Stop cache node `i` (as a lost node: the coordinator notices when its heartbeats stop).
    pub async fn stop_node(&mut self, i: usize) -> anyhow::Result<()> {
        let name = format!("node-{i}");
        let pos = self.services.iter().position(|s| s.name == name).ok_or_else(|| anyhow::anyhow!("no {name}"))?;
        let mut s = self.services.remove(pos);
        if let Some(tx) = s.stop.take() {
            let _ = tx.send(());
        }
        tokio::time::timeout(Duration::from_secs(20), s.task)
            .await
            .map_err(|_| anyhow::anyhow!("{name} did not stop within 20 s"))?
            .ok();
        Ok(())
    }

    /// Stop every service (worker first, coordinator last) and wait for clean shutdowns.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        let mut order: Vec<Service> = self.services.drain(..).collect();
        order.reverse();
        for mut s in order {
            if let Some(tx) = s.stop.take() {
                let _ = tx.send(());
            }
            match tokio::time::timeout(Duration::from_secs(20), s.task).await {
                Ok(_) => {}
                Err(_) => anyhow::bail!("{} did not stop within 20 s", s.name),
            }
        }
        Ok(())
    }
}

/// The coordinator and the nodes as tasks of this process; their addresses.
async fn start_in_process(
    cfg: &LocalClusterConfig,
    services: &mut Vec<Service>,
) -> anyhow::Result<(String, Vec<String>)> {
    // Coordinator.
    let mut ccfg = CoordinatorConfig::new(cfg.data_dir.join("coordinator"));
    ccfg.join_ramp = Duration::ZERO;
    ccfg.node_timeout = Duration::from_secs(5);
    ccfg.heartbeat_interval = Duration::from_millis(500);
    let state = ClusterState::open(ccfg)?;
    let l = match &cfg.coordinator_listen {
        Some(a) => bind(a, "--listen").await?,
        None => tokio::net::TcpListener::bind((cfg.host.as_str(), 0)).await?,
    };
    let coordinator = l.local_addr()?.to_string();
    let (tx, stop) = stop_pair();
    let ex = exposure(cfg);
    let task = tokio::spawn(async move {
        if let Err(e) = kvcache_coordinator::run(state, l, ex, stop).await {
            tracing::error!(error = %e, "coordinator failed");
        }
    });
    services.push(Service { name: "coordinator".into(), stop: Some(tx), task });
    // Nodes.
    let mut nodes = Vec::new();
    for i in 0..cfg.nodes {
        let mut scfg = StoreConfig::new(cfg.data_dir.join(format!("node-{i}")), cfg.node_capacity);
        scfg.durability = cfg.durability;
        let store = tokio::task::spawn_blocking(move || PageStore::open(scfg)).await??;
        let l = tokio::net::TcpListener::bind((cfg.host.as_str(), 0)).await?;
        let addr = l.local_addr()?.to_string();
        let id = format!("node-{i}");
        let ncfg = kvcache_node::NodeConfig {
            coordinator: Some(coordinator.clone()),
            tls: cfg.tls.clone(),
            ..kvcache_node::NodeConfig::standalone(id.clone(), addr.clone())
        };
        let (tx, stop) = stop_pair();
        let ex = exposure(cfg);
        let task = tokio::spawn(async move {
            if let Err(e) = kvcache_node::run(store, ncfg, l, ex, stop).await {
                tracing::error!(error = %e, "cache node failed");
            }
        });
        services.push(Service { name: format!("node-{i}"), stop: Some(tx), task });
        nodes.push(addr);
    }
    Ok((coordinator, nodes))
}

/// A child process and the address it printed (`… listening on ADDR`); it is killed when
/// dropped.
pub struct ChildProcess {
    child: std::process::Child,
    /// The address it listens on.
    pub addr: String,
}

impl ChildProcess {
    /// Its process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Start `exe ARGS` (a `kvcache` service: logging at `warn`, or `KVCACHE_CHILD_LOG`) and wait
/// (bounded) for its "listening on" line; its output is drained.
pub async fn spawn_child(exe: &std::path::Path, args: Vec<std::ffi::OsString>) -> anyhow::Result<ChildProcess> {
    use std::io::BufRead;
    let name = args.first().map(|a| a.to_string_lossy().into_owned()).unwrap_or_default();
    let mut child = std::process::Command::new(exe)
        .args(&args)
        .env("RUST_LOG", std::env::var("KVCACHE_CHILD_LOG").unwrap_or_else(|_| "warn".into()))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| anyhow::anyhow!("cannot start {} {name}: {e}", exe.display()))?;
    let out = child.stdout.take().expect("piped");
    let (tx, rx) = oneshot::channel();
    std::thread::spawn(move || {
        let mut lines = std::io::BufReader::new(out).lines();
        let addr = lines
            .by_ref()
            .map_while(Result::ok)
            .find_map(|l| l.split("listening on ").nth(1).map(|a| a.trim().to_owned()));
        let _ = tx.send(addr);
        // Keep draining, so the child never blocks on a full pipe.
        for _ in lines {}
    });
    let mut child = ChildProcess { child, addr: String::new() };
    match tokio::time::timeout(Duration::from_secs(30), rx).await {
        Ok(Ok(Some(addr))) => {
            child.addr = addr;
            Ok(child)
        }
        Ok(_) => anyhow::bail!("kvcache {name} exited before listening (its errors are above)"),
        Err(_) => anyhow::bail!("kvcache {name} did not listen within 30 s"),
    }
}

/// A service that is a child process: stopped by killing it.
fn child_service(name: String, child: ChildProcess) -> Service {
    let (tx, stop) = stop_pair();
    let task = tokio::spawn(async move {
        stop.await;
        let _ = tokio::task::spawn_blocking(move || drop(child)).await;
    });
    Service { name, stop: Some(tx), task }
}

/// The coordinator and the nodes as processes of `exe`; their addresses.
async fn start_processes(
    cfg: &LocalClusterConfig,
    exe: &std::path::Path,
    services: &mut Vec<Service>,
) -> anyhow::Result<(String, Vec<String>)> {
    anyhow::ensure!(
        cfg.tls.is_plaintext() && !cfg.auth.enforced(),
        "a local cluster of processes runs plaintext with open tenants only"
    );
    let listen = format!("{}:0", cfg.host);
    let os = |v: &[&str]| v.iter().map(std::ffi::OsString::from).collect::<Vec<_>>();
    let mut args = os(&[
        "coordinator",
        "--listen",
        cfg.coordinator_listen.as_deref().unwrap_or(&listen),
        "--join-ramp",
        "0s",
        "--node-timeout",
        "5s",
        "--heartbeat-interval",
        "500ms",
        "--data-dir",
    ]);
    args.push(cfg.data_dir.join("coordinator").into());
    let c = spawn_child(exe, args).await?;
    let coordinator = c.addr.clone();
    services.push(child_service("coordinator".into(), c));
    let mut nodes = Vec::new();
    for i in 0..cfg.nodes {
        let id = format!("node-{i}");
        let durability = match cfg.durability {
            Durability::Async => "async",
            Durability::Sync => "sync",
        };
        let capacity = cfg.node_capacity.to_string();
        let mut args = os(&[
            "node",
            "--listen",
            &listen,
            "--node-id",
            &id,
            "--capacity",
            &capacity,
            "--durability",
            durability,
            "--coordinator",
            &coordinator,
            "--data-dir",
        ]);
        args.push(cfg.data_dir.join(&id).into());
        let n = spawn_child(exe, args).await?;
        nodes.push(n.addr.clone());
        services.push(child_service(id, n));
    }
    Ok((coordinator, nodes))
}

/// Bind the listener a flag names, with an error that says which flag, which address, and what
/// to do about it.
pub async fn bind(addr: &str, flag: &str) -> anyhow::Result<tokio::net::TcpListener> {
    let port = addr.rsplit_once(':').map(|(_, p)| p);
    if port.is_none_or(|p| p.parse::<u16>().is_err()) {
        anyhow::bail!("{flag}: bad address {addr:?}: write host:port with a port in 0..=65535 (0 picks a free one)");
    }
    tokio::net::TcpListener::bind(addr).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::AddrInUse => anyhow::anyhow!(
            "cannot listen on {addr} ({flag}): the address is in use, probably by another kvcache process; \
             stop it, or choose another address with {flag} (port 0 picks a free one)"
        ),
        std::io::ErrorKind::AddrNotAvailable => {
            anyhow::anyhow!("cannot listen on {addr} ({flag}): no interface of this machine has that address")
        }
        std::io::ErrorKind::PermissionDenied => {
            anyhow::anyhow!("cannot listen on {addr} ({flag}): permission denied (ports below 1024 need privileges)")
        }
        _ => anyhow::anyhow!("cannot listen on {addr} ({flag}): {e}"),
    })
}

/// The line a person reads when the coordinator at `addr` did not answer `s`: what failed, where,
/// the likely cause and what to do.
pub fn coordinator_error(addr: &str, s: &tonic::Status) -> anyhow::Error {
    match s.code() {
        // The link's message names the replicas tried and the cause.
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => anyhow::anyhow!(
            "{} — is `kvcache dev` (or `kvcache coordinator`) running? `kvcache dev` listens on 127.0.0.1:7000 \
             and prints its address; give another with --coordinator",
            s.message()
        ),
        tonic::Code::Unauthenticated => anyhow::anyhow!(
            "the coordinator at {addr} runs with tenants and refused the call: {} — give your token with --token \
             or KVCACHE_TOKEN",
            s.message()
        ),
        tonic::Code::PermissionDenied => anyhow::anyhow!(
            "the coordinator at {addr} refused the call: {} — this needs an admin tenant's token",
            s.message()
        ),
        tonic::Code::Unimplemented => anyhow::anyhow!(
            "{addr} is not a coordinator (it does not serve kvcache.v1.Coordinator; a cache node or worker port?) — \
             give the coordinator's address with --coordinator"
        ),
        _ => anyhow::anyhow!("the coordinator at {addr} refused the call: {} ({:?})", s.message(), s.code()),
    }
}

/// The cluster's status from the coordinator at `addr`, with errors for people.
pub async fn cluster_status(addr: &str, tls: &kvcache_net::Tls) -> anyhow::Result<pb::ClusterStatusResponse> {
    let link = kvcache_net::CoordinatorLink::new(addr, tls, Duration::from_secs(5))
        .map_err(|e| anyhow::anyhow!("--coordinator: {e}"))?;
    link.call(|mut c| async move { c.cluster_status(pb::ClusterStatusRequest {}).await })
        .await
        .map(tonic::Response::into_inner)
        .map_err(|s| coordinator_error(addr, &s))
}

/// A client of the cluster whose coordinator is at `addr`, with errors for people.
pub async fn connect(addr: &str, cfg: kvcache_client::ClientConfig) -> anyhow::Result<Client> {
    let mut tls = cfg.tls.clone();
    if let Some(t) = &cfg.token {
        tls = tls.with_token(t).map_err(|e| anyhow::anyhow!("--token: {e}"))?;
    }
    let link = kvcache_net::CoordinatorLink::new(addr, &tls, Duration::from_secs(5))
        .map_err(|e| anyhow::anyhow!("--coordinator: {e}"))?;
    link.refresh().await.map_err(|s| coordinator_error(addr, &s))?;
    Ok(Client::connect_with(addr, cfg).await?)
}

/// `--device`: `cpu` → `None`; `cuda`, `cuda:N` → that GPU, opened (a clear error when the
/// machine has no driver or no such device), its compiled kernels cached in the default place.
pub fn open_device(s: &str) -> anyhow::Result<Option<std::sync::Arc<kvcache_attention::gpu::Gpu>>> {
    open_device_with_cache(s, kvcache_attention::gpu::cache_dir())
}

/// [`open_device`] with the kernel cache in `cache`.
pub fn open_device_with_cache(
    s: &str,
    cache: Option<std::path::PathBuf>,
) -> anyhow::Result<Option<std::sync::Arc<kvcache_attention::gpu::Gpu>>> {
    let ordinal = match s {
        "cpu" => return Ok(None),
        "cuda" | "gpu" => 0,
        _ => s
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("unknown device {s:?}: expected cpu, cuda or cuda:N"))?,
    };
    let gpu = kvcache_attention::gpu::Gpu::open_with_cache(ordinal, cache)
        .map_err(|e| anyhow::anyhow!("--device {s}: {e}"))?;
    tracing::info!(device = %gpu.describe(), "computing attention on the GPU");
    Ok(Some(gpu))
}
