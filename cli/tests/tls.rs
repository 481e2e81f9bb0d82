//! TLS end to end with real processes: a coordinator, a cache node and a worker, each its own
//! `kvcache` process with mTLS on its listener and on every call it makes. A client whose
//! certificate the cluster CA signed stores, reads back and decodes; a plaintext client, a TLS
//! client without a certificate and one whose certificate another CA signed are all refused;
//! the plaintext probe port answers `grpc.health.v1` and nothing else.

mod common;

use bytes::Bytes;
use common::spawn;
use kvcache_cli::synth::{Rng, prefill_pages, tokens_payload};
use kvcache_client::{Client, ClientConfig};
use kvcache_core::SequenceKey;
use kvcache_net::Tls;
use kvcache_proto::v1 as pb;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A CA and a leaf certificate (for localhost and 127.0.0.1) it signed, as PEM files.
struct Pki {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

fn pki(dir: &Path, name: &str) -> Pki {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, format!("{name} CA"));
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let mut leaf = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
    leaf.distinguished_name.push(DnType::CommonName, format!("{name} peer"));
    let key = KeyPair::generate().unwrap();
    let cert = leaf.signed_by(&key, &ca).unwrap();
    let p = Pki {
        ca: dir.join(format!("{name}-ca.pem")),
        cert: dir.join(format!("{name}.pem")),
        key: dir.join(format!("{name}-key.pem")),
    };
    std::fs::write(&p.ca, ca.pem()).unwrap();
    std::fs::write(&p.cert, cert.pem()).unwrap();
    std::fs::write(&p.key, key.serialize_pem()).unwrap();
    p
}

fn tls_flags(p: &Pki) -> Vec<String> {
    ["--tls-cert", p.cert.to_str().unwrap(), "--tls-key", p.key.to_str().unwrap(), "--tls-ca", p.ca.to_str().unwrap()]
        .map(str::to_owned)
        .to_vec()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn tls(identity: Option<&Pki>, ca: &Pki) -> Tls {
    let id = identity.map(|p| (std::fs::read(&p.cert).unwrap(), std::fs::read(&p.key).unwrap()));
    let ca = std::fs::read(&ca.ca).unwrap();
    Tls::from_pem(id.as_ref().map(|(c, k)| (c.as_slice(), k.as_slice())), Some(&ca), None).unwrap()
}

async fn connect(addr: &str, tls: Tls) -> Result<Client, kvcache_client::ClientError> {
    let cfg = ClientConfig { tls, watch: false, timeout: Duration::from_secs(5), ..Default::default() };
    tokio::time::timeout(Duration::from_secs(20), Client::connect_with(addr, cfg)).await.expect("connect hung")
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
    let mut ready = false;
    for _ in 0..200 {
        if let Ok(r) = client.refresh().await
            && r.live_nodes().len() == 1
            && r.workers.len() == 1
        {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ready, "the node and the worker did not register over mTLS");
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
    let shape = kvcache_attention::AttnShape::new(&ns.model, ns.layout());
    let r = client
        .decode(pb::DecodeRequest {
            namespace: "tls".into(),
            layer: 0,
            items: vec![pb::DecodeItem {
                sequence_id: "s0".into(),
                query: kvcache_proto::f32le::to_bytes(&rng.vec(shape.q_len(), 1.0)),
                new_kv: Bytes::from(tokens_payload(&ns, 1, &mut rng)),
                new_token_id: None,
            }],
            softmax_scale: 0.0,
        })
        .await
        .expect("decode over mTLS");
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
