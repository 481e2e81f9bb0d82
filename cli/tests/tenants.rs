//! Tenants on a local cluster with a tenants file, over gRPC: every RPC of every service tried
//! with no token, an unknown token, another tenant's, the owner's and an admin's (a table over
//! `kvcache_net::auth::ACCESS`, so an RPC without a case here fails the test); quotas (own
//! eviction first, then RESOURCE_EXHAUSTED, the other tenant untouched); a rate limit refused
//! and recovered; a revoked token refused after the file changes.

use kvcache_cli::cluster::{LocalCluster, LocalClusterConfig};
use kvcache_cli::synth::{Rng, prefill_pages};
use kvcache_client::{Client, ClientConfig, ClientError};
use kvcache_core::{Namespace, SequenceKey};
use kvcache_net::Tls;
use kvcache_net::auth::{ACCESS, Access, token_sha256};
use kvcache_proto::v1 as pb;
use kvcache_proto::v1::attention_worker_client::AttentionWorkerClient;
use kvcache_proto::v1::cache_node_client::CacheNodeClient;
use kvcache_proto::v1::coordinator_client::CoordinatorClient;
use std::path::Path;
use std::time::{Duration, Instant};
use tonic::Code;

const NS: &str = "a.model";

fn hash(t: &str) -> String {
    hex::encode(token_sha256(t))
}

/// Tenants a (owner of NS), b (the other), ops (admin), q (a quota), r (a rate limit), c (one
/// call in flight at a time).
fn tenants_file(q_quota: u64) -> String {
    format!(
        r#"
[tenants.a]
token_sha256 = "{}"
[tenants.b]
token_sha256 = "{}"
[tenants.ops]
token_sha256 = "{}"
admin = true
[tenants.q]
token_sha256 = "{}"
quota = {q_quota}
[tenants.r]
token_sha256 = "{}"
requests_per_second = 5
[tenants.c]
token_sha256 = "{}"
concurrent_requests = 1
"#,
        hash("token-a"),
        hash("token-b"),
        hash("token-ops"),
        hash("token-q"),
        hash("token-r"),
        hash("token-c"),
    )
}

fn model() -> pb::ModelSpec {
    pb::ModelSpec {
        name: "tiny".into(),
        attention: pb::AttentionKind::Gqa as i32,
        num_layers: 2,
        num_q_heads: 4,
        num_kv_heads: 2,
        head_dim: 64,
        ..Default::default()
    }
}

fn ns_request(name: &str, tenant: &str) -> pb::CreateNamespaceRequest {
    pb::CreateNamespaceRequest {
        name: name.into(),
        tenant: tenant.into(),
        model: Some(model()),
        codec: pb::Codec::Bf16 as i32,
        page_tokens: 16,
        replication: 1,
        ..Default::default()
    }
}

async fn start(dir: &Path, nodes: usize, q_quota: u64) -> (LocalCluster, std::path::PathBuf) {
    let file = dir.join("tenants.toml");
    std::fs::write(&file, tenants_file(q_quota)).unwrap();
    let auth = kvcache_net::Auth::load(&file).unwrap();
    auth.spawn_reloader();
    let mut cfg = LocalClusterConfig::new(dir.join("data"));
    cfg.nodes = nodes;
    cfg.node_capacity = 64 << 20;
    cfg.auth = auth;
    (LocalCluster::start(cfg).await.unwrap(), file)
}

async fn client(coordinator: &str, token: &str) -> Client {
    let cfg = ClientConfig { token: Some(token.into()), ..Default::default() };
    Client::connect_with(coordinator, cfg).await.unwrap()
}

/// Raw stubs whose calls carry `token` (or none).
struct Stubs {
    coord: CoordinatorClient<kvcache_net::Channel>,
    node: CacheNodeClient<kvcache_net::Channel>,
    worker: AttentionWorkerClient<kvcache_net::Channel>,
    reflection: tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient<kvcache_net::Channel>,
}

fn stubs(cluster: &LocalCluster, token: Option<&str>) -> Stubs {
    let tls = match token {
        Some(t) => Tls::none().with_token(t).unwrap(),
        None => Tls::none(),
    };
    let ch = |a: &str| kvcache_net::channel(a, &tls).unwrap();
    Stubs {
        coord: CoordinatorClient::new(ch(&cluster.coordinator)),
        node: CacheNodeClient::new(ch(&cluster.nodes[0])),
        worker: AttentionWorkerClient::new(ch(&cluster.worker)),
        reflection: tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient::new(ch(
            &cluster.nodes[0]
        )),
    }
}

/// What the table needs of the cluster: NS's definition, a page of it, a lease on it.
struct Ctx {
    ns: Namespace,
    seq: SequenceKey,
    page: pb::Page,
    lease_id: u64,
    epoch: u64,
}

/// Call `path` through `s`. Ok(saw) when the call passed authorization: `saw` says whether the
/// answer showed NS (for calls that list). A refusal a call answers in its body (an AppendBatch
/// item, Release of another tenant's lease) comes back as that status.
async fn call(path: &str, s: &mut Stubs, c: &Ctx) -> Result<bool, tonic::Status> {
    let seq = || Some(pb::SequenceKey::from(&c.seq));
    let nsname = || NS.to_string();
    let lists = |nss: &[pb::Namespace]| nss.iter().any(|n| n.name == NS);
    Ok(match path {
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo" => {
            let req = tonic_reflection::pb::v1::ServerReflectionRequest {
                host: String::new(),
                message_request: Some(
                    tonic_reflection::pb::v1::server_reflection_request::MessageRequest::ListServices(String::new()),
                ),
            };
            let mut r = s.reflection.server_reflection_info(tokio_stream::iter([req])).await?.into_inner();
            r.message().await?;
            true
        }
        "/kvcache.v1.Coordinator/RegisterNode" => {
            // No node in it: an operator gets past authorization to INVALID_ARGUMENT.
            s.coord.register_node(pb::RegisterNodeRequest { node: None }).await.map(|_| true).or_else(past_auth)?
        }
        "/kvcache.v1.Coordinator/Heartbeat" => {
            s.coord.heartbeat(pb::HeartbeatRequest { node_id: "nobody".into(), ..Default::default() }).await?;
            true
        }
        "/kvcache.v1.Coordinator/Drain" => {
            s.coord.drain(pb::DrainRequest { node_id: "nobody".into() }).await.map(|_| true).or_else(past_auth)?
        }
        "/kvcache.v1.Coordinator/RegisterWorker" => {
            s.coord.register_worker(pb::RegisterWorkerRequest::default()).await.map(|_| true).or_else(past_auth)?
        }
        "/kvcache.v1.Coordinator/ClusterStatus" => {
            lists(&s.coord.cluster_status(pb::ClusterStatusRequest {}).await?.into_inner().namespaces)
        }
        "/kvcache.v1.Coordinator/GetShardMap" => {
            lists(&s.coord.get_shard_map(pb::GetShardMapRequest {}).await?.into_inner().namespaces)
        }
        "/kvcache.v1.Coordinator/WatchShardMap" => {
            let mut w = s.coord.watch_shard_map(pb::WatchShardMapRequest { after_epoch: 0 }).await?.into_inner();
            lists(&w.message().await?.expect("a first map").namespaces)
        }
        "/kvcache.v1.Coordinator/CreateNamespace" => {
            s.coord.create_namespace(ns_request(NS, "a")).await?;
            true
        }
        "/kvcache.v1.Coordinator/GetNamespace" => {
            s.coord.get_namespace(pb::GetNamespaceRequest { name: nsname() }).await?;
            true
        }
        "/kvcache.v1.Coordinator/ListNamespaces" => {
            lists(&s.coord.list_namespaces(pb::ListNamespacesRequest {}).await?.into_inner().namespaces)
        }
        "/kvcache.v1.CacheNode/PutPages" => {
            let req = pb::PutPagesRequest { epoch: c.epoch, pages: vec![c.page.clone()], handoff: false };
            s.node.put_pages(tokio_stream::iter([req])).await?;
            true
        }
        "/kvcache.v1.CacheNode/GetPages" => {
            let key = c.page.key.clone();
            let mut r =
                s.node.get_pages(pb::GetPagesRequest { keys: key.into_iter().collect(), ranges: vec![] }).await?;
            while r.get_mut().message().await?.is_some() {}
            true
        }
        "/kvcache.v1.CacheNode/AppendTokens" => s
            .node
            .append_tokens(pb::AppendTokensRequest { epoch: c.epoch, sequence: seq(), ..Default::default() })
            .await
            .map(|_| true)
            .or_else(past_auth)?,
        "/kvcache.v1.CacheNode/AppendBatch" => {
            let item = pb::AppendTokensRequest { epoch: c.epoch, sequence: seq(), ..Default::default() };
            let r = s.node.append_batch(pb::AppendBatchRequest { appends: vec![item] }).await?.into_inner();
            let code = Code::from_i32(r.results[0].code);
            if matches!(code, Code::PermissionDenied | Code::Unauthenticated) {
                return Err(tonic::Status::new(code, r.results[0].message.clone()));
            }
            true
        }
        "/kvcache.v1.CacheNode/GetRows" => {
            s.node.get_rows(pb::GetRowsRequest { sequence: seq(), layer: 0, tokens: vec![0] }).await?;
            true
        }
        "/kvcache.v1.CacheNode/Lookup" => {
            s.node.lookup(pb::LookupRequest { sequence: seq(), ..Default::default() }).await?;
            true
        }
        "/kvcache.v1.CacheNode/MatchPrefix" => {
            s.node.match_prefix(pb::MatchPrefixRequest { namespace: nsname(), keys: vec![], lease_ms: 0 }).await?;
            true
        }
        "/kvcache.v1.CacheNode/DeleteSequence" => {
            // Of a sequence nobody wrote: the owner's delete removes nothing the table needs.
            let other = pb::SequenceKey { namespace: nsname(), sequence_id: "never-written".into() };
            s.node.delete_sequence(pb::DeleteSequenceRequest { epoch: c.epoch, sequence: Some(other) }).await?;
            true
        }
        "/kvcache.v1.CacheNode/CreateSequence" => {
            let other = pb::SequenceKey { namespace: nsname(), sequence_id: "over-a-prefix".into() };
            s.node
                .create_sequence(pb::CreateSequenceRequest {
                    epoch: c.epoch,
                    sequence: Some(other),
                    prefix: vec![],
                    seal: false,
                })
                .await
                .map(|_| true)
                .or_else(past_auth)?
        }
        "/kvcache.v1.CacheNode/Lease" => {
            s.node.lease(pb::LeaseRequest { sequence: seq(), ttl_ms: 60_000 }).await?;
            true
        }
        "/kvcache.v1.CacheNode/Release" => {
            // Another tenant's lease is answered as an unknown one; the owner releases it (and
            // the table's next owner call leases again).
            let released = s.node.release(pb::ReleaseRequest { lease_id: c.lease_id }).await?.into_inner().released;
            if !released {
                return Err(tonic::Status::permission_denied("not released"));
            }
            true
        }
        "/kvcache.v1.CacheNode/Stats" => {
            s.node.stats(pb::StatsRequest {}).await?.into_inner().namespaces.iter().any(|u| u.namespace == NS)
        }
        "/kvcache.v1.CacheNode/EnsureNamespace" => {
            s.node.ensure_namespace(pb::EnsureNamespaceRequest { namespace: Some((&c.ns).into()) }).await?;
            true
        }
        "/kvcache.v1.AttentionWorker/Decode" => s
            .worker
            .decode(pb::DecodeRequest {
                namespace: nsname(),
                layer: 0,
                items: vec![],
                softmax_scale: 0.0,
                ..Default::default()
            })
            .await
            .map(|_| true)
            .or_else(past_auth)?,
        other => panic!("{other} has no case in this test: add one (who may call it, and what it shows)"),
    })
}

/// A refusal after authorization (bad input, unknown ids) counts as "let through".
fn past_auth(s: tonic::Status) -> Result<bool, tonic::Status> {
    if matches!(s.code(), Code::Unauthenticated | Code::PermissionDenied) { Err(s) } else { Ok(true) }
}

/// How `path` treats the tenant that does not own NS: refused, or answered without NS.
enum Other {
    Refused,
    Filtered,
}

fn other_rule(path: &str) -> Other {
    match path {
        "/kvcache.v1.Coordinator/GetShardMap"
        | "/kvcache.v1.Coordinator/WatchShardMap"
        | "/kvcache.v1.Coordinator/ListNamespaces"
        | "/kvcache.v1.CacheNode/Stats"
        | "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo" => Other::Filtered,
        _ => Other::Refused,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_refuses_no_token_an_unknown_token_and_another_tenant_and_serves_its_owner() {
    let dir = tempfile::tempdir().unwrap();
    let (cluster, _file) = start(dir.path(), 1, 1 << 30).await;
    let a = client(&cluster.coordinator, "token-a").await;
    let ns = a.create_namespace(ns_request(NS, "")).await.unwrap();
    assert_eq!(ns.tenant, "a", "an empty tenant is filled in with the caller's");
    let seq = SequenceKey::new(NS, "s1");
    let mut rng = Rng::new(7);
    let pages = prefill_pages(&ns, &seq, 2, 20, &mut rng);
    a.put_pages(pages.clone()).await.unwrap();
    let epoch = a.routing().epoch;

    let mut cases = 0;
    for (path, need) in ACCESS {
        if *need == Access::Public {
            continue;
        }
        for who in [None, Some("not-a-token"), Some("token-b"), Some("token-ops"), Some("token-a")] {
            // A fresh lease of the owner's for Release to find.
            let lease_id = a.lease(&seq, Duration::from_secs(60)).await.unwrap().1;
            let ctx = Ctx { ns: ns.clone(), seq: seq.clone(), page: pages[0].clone(), lease_id, epoch };
            let mut s = stubs(&cluster, who);
            let got = call(path, &mut s, &ctx).await;
            let what = format!("{path} as {who:?}: {got:?}");
            match (who, need) {
                (None | Some("not-a-token"), _) => {
                    assert_eq!(got.unwrap_err().code(), Code::Unauthenticated, "{what}")
                }
                (Some("token-ops"), Access::Operator) => assert!(got.is_ok(), "{what}"),
                (Some(_), Access::Operator) => assert_eq!(got.unwrap_err().code(), Code::PermissionDenied, "{what}"),
                (Some("token-a"), _) => assert!(got.is_ok_and(|saw| saw), "{what}"),
                (Some(t), _) => match other_rule(path) {
                    Other::Filtered => {
                        if path.contains("Reflection") {
                            assert!(got.is_ok(), "{what}")
                        } else {
                            // An admin lists every namespace; a tenant only its own.
                            assert!(got.is_ok_and(|saw| saw == (t == "token-ops")), "{what}")
                        }
                    }
                    // GetNamespace: an admin may see any namespace's definition.
                    Other::Refused if t == "token-ops" && path.ends_with("/GetNamespace") => {
                        assert!(got.is_ok(), "{what}")
                    }
                    // CreateNamespace: an admin may create for any tenant.
                    Other::Refused if t == "token-ops" && path.ends_with("/CreateNamespace") => {
                        assert!(got.is_ok(), "{what}")
                    }
                    Other::Refused => assert_eq!(got.unwrap_err().code(), Code::PermissionDenied, "{what}"),
                },
            }
            cases += 1;
        }
    }
    assert!(cases >= 5 * 24, "{cases} cases");

    // Through the client: b cannot read a's pages, and sees no trace of the namespace.
    let b = client(&cluster.coordinator, "token-b").await;
    assert!(b.namespace(NS).is_none(), "b's shard map shows a's namespace");
    let e = b.create_namespace(ns_request("b.model", "a")).await.unwrap_err();
    assert!(matches!(e, ClientError::PermissionDenied(_)), "{e}");
    b.create_namespace(ns_request("b.model", "b")).await.unwrap();
    // The health probe needs no token.
    let mut h = tonic_health::pb::health_client::HealthClient::new(kvcache_client::channel(&cluster.nodes[0]).unwrap());
    h.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.unwrap();
    cluster.stop().await.unwrap();
}

async fn tenant_usage(admin: &Client, tenant: &str) -> Option<pb::TenantUsage> {
    let (_, s) = admin.node_stats().await.into_iter().next()?;
    s.ok()?.tenants.into_iter().find(|t| t.tenant == tenant)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_over_its_quota_evicts_its_own_pages_first_then_is_refused_and_never_touches_another_s() {
    let dir = tempfile::tempdir().unwrap();
    // One sequence here: 2 layers × 2 pages of 16 tokens × 2 KV heads × 64 × 2 (K, V) × 2 bytes
    // = 4 × (128 + 8 KiB) ≈ 33 KiB. A quota of 120 KiB holds three.
    let quota = 120 << 10;
    let (cluster, _file) = start(dir.path(), 1, quota).await;
    let ops = client(&cluster.coordinator, "token-ops").await;
    let a = client(&cluster.coordinator, "token-a").await;
    let q = client(&cluster.coordinator, "token-q").await;
    let ns_a = a.create_namespace(ns_request("a.keep", "")).await.unwrap();
    let ns_q = q.create_namespace(ns_request("q.burst", "")).await.unwrap();
    // The node learns its share with a heartbeat.
    let deadline = Instant::now() + Duration::from_secs(20);
    while tenant_usage(&ops, "q").await.is_none_or(|u| u.quota_bytes == 0) {
        assert!(Instant::now() < deadline, "the node never learnt q's share");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(tenant_usage(&ops, "q").await.unwrap().quota_bytes, quota, "one node holds the whole quota");
    let mut rng = Rng::new(3);
    let a_seq = SequenceKey::new("a.keep", "kept");
    a.put_pages(prefill_pages(&ns_a, &a_seq, 2, 32, &mut rng)).await.unwrap();
    // q writes eight sequences: each past the third evicts q's oldest.
    for i in 0..8 {
        let s = SequenceKey::new("q.burst", format!("s{i}"));
        q.put_pages(prefill_pages(&ns_q, &s, 2, 32, &mut rng)).await.unwrap();
        let u = tenant_usage(&ops, "q").await.unwrap();
        assert!(u.bytes <= quota, "q holds {} bytes over its {quota}", u.bytes);
    }
    let u = tenant_usage(&ops, "q").await.unwrap();
    assert!(u.quota_evictions >= 5, "{u:?}");
    let held: Vec<bool> = {
        let mut v = Vec::new();
        for i in 0..8 {
            v.push(q.lookup(&SequenceKey::new("q.burst", format!("s{i}")), vec![]).await.unwrap().exists);
        }
        v
    };
    assert_eq!(held, [false, false, false, false, false, true, true, true], "the oldest went first");
    // a's sequence was never touched.
    assert!(a.lookup(&a_seq, vec![]).await.unwrap().exists);
    // With everything of its own leased, q is refused.
    for i in 5..8 {
        q.lease(&SequenceKey::new("q.burst", format!("s{i}")), Duration::from_secs(60)).await.unwrap();
    }
    let e = q.put_pages(prefill_pages(&ns_q, &SequenceKey::new("q.burst", "s8"), 2, 32, &mut rng)).await.unwrap_err();
    assert!(matches!(&e, ClientError::ResourceExhausted(m) if m.contains("quota")), "{e}");
    assert!(tenant_usage(&ops, "q").await.unwrap().quota_refusals >= 1);
    assert!(a.lookup(&a_seq, vec![]).await.unwrap().exists);
    // A tenant's own stats show only itself.
    let (_, st) = q.node_stats().await.into_iter().next().unwrap();
    let st = st.unwrap();
    assert!(st.namespaces.iter().all(|n| n.namespace == "q.burst"), "{:?}", st.namespaces);
    assert!(st.tenants.iter().all(|t| t.tenant == "q"));
    cluster.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_tenant_is_told_when_to_retry_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let (cluster, _file) = start(dir.path(), 1, 1 << 30).await;
    let mut s = stubs(&cluster, Some("token-r"));
    let mut refused = None;
    for _ in 0..50 {
        match s.coord.list_namespaces(pb::ListNamespacesRequest {}).await {
            Ok(_) => {}
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    let e = refused.expect("50 calls at once never hit a limit of 5 per second");
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    let ms: u64 = e.metadata().get("kvcache-retry-after-ms").unwrap().to_str().unwrap().parse().unwrap();
    assert!(ms >= 1, "{ms}");
    // Other tenants are not slowed by it.
    stubs(&cluster, Some("token-a")).coord.list_namespaces(pb::ListNamespacesRequest {}).await.unwrap();
    // After the hint (bounded retries), r is served again.
    tokio::time::sleep(Duration::from_millis(ms)).await;
    let mut ok = false;
    for _ in 0..20 {
        if s.coord.list_namespaces(pb::ListNamespacesRequest {}).await.is_ok() {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok, "r never recovered");
    cluster.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_holds_its_place_among_the_tenant_s_calls_until_it_ends() {
    let dir = tempfile::tempdir().unwrap();
    let (cluster, _file) = start(dir.path(), 1, 1 << 30).await;
    let mut s = stubs(&cluster, Some("token-c"));
    let mut watch = s.coord.watch_shard_map(pb::WatchShardMapRequest { after_epoch: 0 }).await.unwrap().into_inner();
    watch.message().await.unwrap().expect("a first map");
    // The watch is still open: c's one place is taken.
    let e = s.coord.list_namespaces(pb::ListNamespacesRequest {}).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("concurrent"), "{}", e.message());
    assert!(e.metadata().get("kvcache-retry-after-ms").is_some());
    // Other tenants are not counted with c.
    stubs(&cluster, Some("token-a")).coord.list_namespaces(pb::ListNamespacesRequest {}).await.unwrap();
    drop(watch);
    let mut ok = false;
    for _ in 0..100 {
        if s.coord.list_namespaces(pb::ListNamespacesRequest {}).await.is_ok() {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ok, "c's place was never given back after its stream ended");
    cluster.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_removed_from_the_file_is_refused_for_new_calls() {
    let dir = tempfile::tempdir().unwrap();
    let (cluster, file) = start(dir.path(), 1, 1 << 30).await;
    let b = client(&cluster.coordinator, "token-b").await;
    b.create_namespace(ns_request("b.model", "")).await.unwrap();
    // Revoke b: its entry now names another token.
    let text = std::fs::read_to_string(&file).unwrap().replace(&hash("token-b"), &hash("token-b2"));
    let tmp = dir.path().join("tenants.toml.new");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, &file).unwrap(); // as a Secret update swaps the file
    let changed = Instant::now();
    let mut s = stubs(&cluster, Some("token-b"));
    let mut node = stubs(&cluster, Some("token-b"));
    let deadline = changed + Duration::from_secs(20);
    loop {
        let c = s.coord.list_namespaces(pb::ListNamespacesRequest {}).await;
        let n = node.node.stats(pb::StatsRequest {}).await;
        if let (Err(c), Err(n)) = (&c, &n) {
            assert_eq!((c.code(), n.code()), (Code::Unauthenticated, Code::Unauthenticated));
            break;
        }
        assert!(Instant::now() < deadline, "b's token still accepted 20 s after the file changed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("revoked after {:?}", changed.elapsed());
    // The new token works, for the same tenant and its namespace.
    let b2 = client(&cluster.coordinator, "token-b2").await;
    assert!(b2.namespace("b.model").is_some());
    cluster.stop().await.unwrap();
}
