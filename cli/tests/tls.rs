//! TLS end to end with real processes: a coordinator, a cache node and a worker, each its own
//! `kvcache` process with mTLS on its listener and on every call it makes. A client whose
//! certificate the cluster CA signed stores, reads back and decodes; a plaintext client, a TLS
//! client without a certificate and one whose certificate another CA signed are all refused;
//! the plaintext probe port answers `grpc.health.v1` and nothing else.

mod common;

use bytes::Bytes;
use common::spawn;
use common::{Pki, pki};
use kvcache_cli::synth::{Rng, prefill_pages, tokens_payload};
use kvcache_client::{Client, ClientConfig};
use kvcache_core::SequenceKey;
use kvcache_net::Tls;
use kvcache_proto::v1 as pb;
use std::time::Duration;

fn tls_flags(p: &Pki) -> Vec<String> {
    ["--tls-cert", p.cert.to_str().unwrap(), "--tls-key", p.key.to_str().unwrap(), "--tls-ca", p.ca.to_str().unwrap()]
        .map(str::to_owned)
        .to_vec()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn tls(identity: Option<&Pki>, ca: &Pki) -> Tls {
    tls_as(identity.map(|p| (&p.cert, &p.key)), ca)
}

fn tls_as(identity: Option<(&std::path::PathBuf, &std::path::PathBuf)>, ca: &Pki) -> Tls {
    let id = identity.map(|(c, k)| (std::fs::read(c).unwrap(), std::fs::read(k).unwrap()));
    let ca = std::fs::read(&ca.ca).unwrap();
    Tls::from_pem(id.as_ref().map(|(c, k)| (c.as_slice(), k.as_slice())), Some(&ca), None).unwrap()
}

async fn connect(addr: &str, tls: Tls) -> Result<Client, kvcache_client::ClientError> {
    let cfg = ClientConfig { tls, watch: false, timeout: Duration::from_secs(5), ..Default::default() };
    tokio::time::timeout(Duration::from_secs(20), Client::connect_with(addr, cfg)).await.expect("connect hung")
}

/// Whether the cluster's node and worker are in `client`'s map (bounded wait).
async fn members_registered(client: &Client) -> bool {
    for _ in 0..200 {
        if let Ok(r) = client.refresh().await
            && r.live_nodes().len() == 1
            && r.workers.len() == 1
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// One decode step of layer 0 of sequence `id` in `ns`, appending a token.
async fn decode_one(
    client: &Client,
    ns: &kvcache_core::Namespace,
    id: &str,
    rng: &mut Rng,
) -> Result<kvcache_client::DecodeOutput, kvcache_client::ClientError> {
    let shape = kvcache_attention::AttnShape::new(&ns.model, ns.layout());
    client
        .decode(pb::DecodeRequest {
            namespace: ns.name.clone(),
            layer: 0,
            items: vec![pb::DecodeItem {
                sequence_id: id.into(),
                query: kvcache_proto::f32le::to_bytes(&rng.vec(shape.q_len(), 1.0)),
                new_kv: Bytes::from(tokens_payload(ns, 1, rng)),
                new_token_id: None,
                ..Default::default()
            }],
            softmax_scale: 0.0,
            ..Default::default()
        })
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_everywhere_and_plaintext_probes() {
    let dir = tempfile::tempdir().unwrap();
    let good = pki(dir.path(), "cluster");
    let rogue = pki(dir.path(), "rogue");
    let flags = tls_flags(&good);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let probe = format!("127.0.0.1:{}", free_port());
    let mut args = vec!["--health-listen", &probe];
    args.extend(&flags);
    let coord = common::fast_coordinator(dir.path(), &args);
    let _node = common::node("n0", &coord.addr, dir.path(), "64MiB", &flags, &[]);
    let mut args =
        vec!["worker", "--listen", "127.0.0.1:0", "--coordinator", &coord.addr, "--worker-id", "w0", "--threads", "1"];
    args.extend(&flags);
    let _worker = spawn(&args);

    // The member client: the node registered over mTLS, so the map lists it and the worker.
    let client = connect(&coord.addr, tls(Some(&good), &good)).await.expect("mTLS client connects");
    assert!(members_registered(&client).await, "the node and the worker did not register over mTLS");
    let ns = client
        .create_namespace(pb::CreateNamespaceRequest {
            name: "tls".into(),
            tenant: "t".into(),
            preset: "qwen2.5-7b".into(),
            codec: pb::Codec::Bf16 as i32,
            page_tokens: 16,
            replication: 1,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut rng = Rng::new(5);
    let key = SequenceKey::new("tls", "s0");
    let pages = prefill_pages(&ns, &key, 1, 40, &mut rng);
    client.put_pages(pages.clone()).await.expect("put over mTLS");
    let keys: Vec<kvcache_core::PageKey> =
        (0..3).map(|i| kvcache_core::PageKey { sequence: key.clone(), layer: 0, page_index: i }).collect();
    let got = client.get_pages(&keys).await.expect("get over mTLS");
    assert_eq!(got.len(), 3);
    for (a, b) in got.iter().zip(&pages) {
        assert_eq!(a.as_ref().expect("page held").payload, b.payload, "page bytes changed on the way");
    }
    let r = decode_one(&client, &ns, "s0", &mut rng).await.expect("decode over mTLS");
    assert_eq!(r.results[0].status, kvcache_client::SequenceStatus::Ok);
    assert_eq!(r.results[0].context_tokens, 41);

    // Outsiders are refused: plaintext, TLS without a certificate, a certificate of another CA.
    assert!(connect(&coord.addr, Tls::none()).await.is_err(), "plaintext client accepted");
    assert!(connect(&coord.addr, tls(None, &good)).await.is_err(), "client without a certificate accepted");
    assert!(connect(&coord.addr, tls(Some(&rogue), &good)).await.is_err(), "certificate of another CA accepted");
    // And a client that trusts another CA does not talk to the cluster.
    assert!(connect(&coord.addr, tls(Some(&good), &rogue)).await.is_err(), "server verified against the wrong CA");

    // The probe port: plaintext health, SERVING, and no kvcache service on it.
    let ch = kvcache_net::channel(&probe, &Tls::none()).unwrap();
    let mut h = tonic_health::pb::health_client::HealthClient::new(ch.clone());
    let s = h
        .check(tonic_health::pb::HealthCheckRequest { service: "kvcache.v1.Coordinator".into() })
        .await
        .expect("health over the probe port")
        .into_inner();
    assert_eq!(s.status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);
    let mut c = pb::coordinator_client::CoordinatorClient::new(ch);
    let e = c.get_shard_map(pb::GetShardMapRequest {}).await.expect_err("the probe port served the coordinator");
    assert_eq!(e.code(), tonic::Code::Unimplemented);

    // `kvcache status` takes the same flags.
    let mut args = vec!["status", "--coordinator", coord.addr.as_str()];
    args.extend(&flags);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kvcache")).args(&args).output().unwrap();
    assert!(out.status.success(), "kvcache status over mTLS: {}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("n0"));
}

/// Tenants on top of mTLS, with real processes: the services call each other with the service
/// token; a client with the cluster's certificate still needs a tenant's token; a tenant whose
/// client certificate the file lists needs none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_on_top_of_mtls_by_token_and_by_certificate() {
    use kvcache_net::auth::{cert_sha256, token_sha256};
    let dir = tempfile::tempdir().unwrap();
    let good = pki(dir.path(), "cluster");
    let file = dir.path().join("tenants.toml");
    std::fs::write(
        &file,
        format!(
            "[service]\ntoken_sha256 = \"{}\"\n[tenants.t]\ntoken_sha256 = \"{}\"\n[tenants.byc]\ncert_sha256 = [\"{}\"]\n",
            hex::encode(token_sha256("svc-token")),
            hex::encode(token_sha256("t-token")),
            hex::encode(cert_sha256(&good.client_der)),
        ),
    )
    .unwrap();
    let mut flags = tls_flags(&good);
    flags.extend(["--tenants".to_owned(), file.to_str().unwrap().to_owned()]);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let svc = [("KVCACHE_TOKEN", "svc-token")];
    let coord = common::fast_coordinator(dir.path(), &flags);
    let _node = common::node("n0", &coord.addr, dir.path(), "64MiB", &flags, &svc);
    let mut args =
        vec!["worker", "--listen", "127.0.0.1:0", "--coordinator", &coord.addr, "--worker-id", "w0", "--threads", "1"];
    args.extend(&flags);
    let _worker = common::spawn_env(&args, &svc);

    // The tenant with a token, over the cluster's mTLS identity.
    let t = connect(&coord.addr, tls(Some(&good), &good).with_token("t-token").unwrap()).await.expect("tenant t");
    assert!(members_registered(&t).await, "the node and the worker did not register with the service token");
    let ns = t
        .create_namespace(pb::CreateNamespaceRequest {
            name: "t.tls".into(),
            preset: "qwen2.5-7b".into(),
            page_tokens: 16,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(ns.tenant, "t");
    let mut rng = Rng::new(9);
    let key = SequenceKey::new("t.tls", "s0");
    t.put_pages(prefill_pages(&ns, &key, 1, 20, &mut rng)).await.expect("put as t");
    let r = decode_one(&t, &ns, "s0", &mut rng).await.expect("decode as t: the worker pulls with the service token");
    assert_eq!(r.results[0].status, kvcache_client::SequenceStatus::Ok);

    // The cluster's certificate alone names no tenant.
    let e = connect(&coord.addr, tls(Some(&good), &good)).await.err().expect("certificate without a token accepted");
    assert!(matches!(e, kvcache_client::ClientError::PermissionDenied(_)), "{e}");
    // A listed client certificate is its tenant, with no token.
    let byc = connect(&coord.addr, tls_as(Some((&good.client_cert, &good.client_key)), &good)).await.expect("byc");
    assert!(byc.namespace("t.tls").is_none(), "byc sees t's namespace");
    let ns = byc
        .create_namespace(pb::CreateNamespaceRequest {
            name: "byc.m".into(),
            preset: "qwen2.5-7b".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(ns.tenant, "byc");
    let e = byc.lookup(&key, vec![]).await.unwrap_err();
    assert!(
        matches!(e, kvcache_client::ClientError::PermissionDenied(_) | kvcache_client::ClientError::NotFound(_)),
        "{e}"
    );
}
