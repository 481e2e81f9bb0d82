//! Coordinator HA on a real etcd (Debian's `etcd-server`; built with `--features etcd`): two
//! coordinator processes elect a leader, writes reach it through either replica, the leader is
//! SIGKILLed and the other takes over within seconds with the state intact and the epoch moving
//! forward only; a node follows the new leader.
#![cfg(feature = "etcd")]

mod common;

use common::spawn;
use kvcache_client::Client;
use kvcache_proto::v1 as pb;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

struct Etcd(std::process::Child);

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A one-member etcd on free loopback ports with its data under `dir`, serving https with `tls`
/// (and requiring client certificates of its CA) or plain http; returns it and its endpoint.
fn etcd(dir: &std::path::Path, tls: Option<&common::Pki>) -> (Etcd, String) {
    let (cp, pp) = (free_port(), free_port());
    let scheme = if tls.is_some() { "https" } else { "http" };
    let client_url = format!("{scheme}://127.0.0.1:{cp}");
    let peer_url = format!("http://127.0.0.1:{pp}");
    let mut cmd = Command::new("etcd");
    cmd.args(["--name", "t", "--listen-client-urls", &client_url, "--advertise-client-urls", &client_url])
        .args(["--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url])
        .args(["--initial-cluster", &format!("t={peer_url}")])
        .arg("--data-dir")
        .arg(dir.join("etcd"))
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(p) = tls {
        cmd.arg("--cert-file").arg(&p.cert).arg("--key-file").arg(&p.key).arg("--trusted-ca-file").arg(&p.ca);
        cmd.arg("--client-cert-auth");
    }
    let e = Etcd(cmd.spawn().expect("etcd on PATH (Debian package etcd-server)"));
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", cp)).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    (e, format!("127.0.0.1:{cp}"))
}

async fn status(addr: &str) -> Option<pb::ClusterStatusResponse> {
    let mut c = kvcache_proto::v1::coordinator_client::CoordinatorClient::new(kvcache_client::channel(addr).ok()?);
    c.cluster_status(pb::ClusterStatusRequest {}).await.ok().map(|r| r.into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_fails_over_with_state_intact_and_a_monotonic_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let (_etcd, etcd_ep) = etcd(dir.path(), None);
    let coordinator = |i: usize| {
        let d = dir.path().join(format!("c{i}"));
        spawn(&[
            "coordinator",
            "--listen",
            "127.0.0.1:0",
            "--etcd-endpoints",
            &etcd_ep,
            "--node-timeout",
            "3s",
            "--join-ramp",
            "0s",
            "--data-dir",
            d.to_str().unwrap(),
        ])
    };
    let mut c = [coordinator(0), coordinator(1)];
    let both = format!("{},{}", c[0].addr, c[1].addr);
    // One of them is elected.
    let deadline = Instant::now() + Duration::from_secs(20);
    let leader = loop {
        assert!(Instant::now() < deadline, "no leader elected");
        if let Some(s) = status(&c[0].addr).await
            && !s.leader.is_empty()
            && s.leader != "self"
        {
            break s.leader;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let (li, fi) = if leader == c[0].addr { (0, 1) } else { (1, 0) };
    // Writes through the follower reach the leader.
    let client = Client::connect(&format!("{},{}", c[fi].addr, c[li].addr)).await.unwrap();
    client
        .create_namespace(pb::CreateNamespaceRequest {
            name: "ha.one".into(),
            preset: "deepseek-v3".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let ndir = dir.path().join("n");
    let _node = spawn(&[
        "node",
        "--listen",
        "127.0.0.1:0",
        "--coordinator",
        &both,
        "--node-id",
        "n0",
        "--capacity",
        "64MiB",
        "--data-dir",
        ndir.to_str().unwrap(),
    ]);
    let deadline = Instant::now() + Duration::from_secs(20);
    let e1 = loop {
        assert!(Instant::now() < deadline, "the node did not register with the leader");
        if let Some(s) = status(&c[li].addr).await
            && s.nodes.iter().any(|n| n.node.as_ref().is_some_and(|sn| sn.state == pb::NodeState::Up as i32))
        {
            break s.epoch;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Kill the leader; the follower takes over.
    c[li].kill();
    let t = Instant::now();
    let survivor = c[fi].addr.clone();
    let s = loop {
        assert!(t.elapsed() < Duration::from_secs(20), "no failover within 20 s");
        if let Some(s) = status(&survivor).await
            && s.leader == survivor
        {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!("failover took {:?}", t.elapsed());
    assert!(s.epoch >= e1, "epoch went backwards: {} < {e1}", s.epoch);
    assert!(s.namespaces.iter().any(|n| n.name == "ha.one"), "namespace lost in failover");
    client
        .create_namespace(pb::CreateNamespaceRequest {
            name: "ha.two".into(),
            preset: "llama-3-8b".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    // The node finds the new leader (bounded wait: it may have been marked down while the
    // election ran) and is up under it.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s2 = status(&survivor).await.unwrap();
        let up =
            s2.nodes.iter().filter(|n| n.node.as_ref().is_some_and(|sn| sn.state == pb::NodeState::Up as i32)).count();
        if up == 1 {
            assert!(s2.epoch > e1);
            assert!(s2.namespaces.iter().any(|n| n.name == "ha.two"));
            break;
        }
        assert!(Instant::now() < deadline, "the node is not up under the new leader: {s2:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The coordinators' etcd connection over TLS (rustls): etcd serves https and requires client
/// certificates; a coordinator given the CA, certificate and key is elected and keeps its state
/// there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_etcd_connection_runs_over_mutual_tls() {
    let dir = tempfile::tempdir().unwrap();
    let p = common::pki(dir.path(), "etcd");
    let (_etcd, etcd_ep) = etcd(dir.path(), Some(&p));
    let d = dir.path().join("c0");
    let c = spawn(&[
        "coordinator",
        "--listen",
        "127.0.0.1:0",
        "--etcd-endpoints",
        &etcd_ep,
        "--etcd-ca",
        p.ca.to_str().unwrap(),
        "--etcd-cert",
        p.client_cert.to_str().unwrap(),
        "--etcd-key",
        p.client_key.to_str().unwrap(),
        "--data-dir",
        d.to_str().unwrap(),
    ]);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        assert!(Instant::now() < deadline, "not elected over TLS");
        if let Some(s) = status(&c.addr).await
            && s.leader == c.addr
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A write goes through the fenced transaction in etcd.
    let client = Client::connect(&c.addr).await.unwrap();
    client
        .create_namespace(pb::CreateNamespaceRequest {
            name: "tls.one".into(),
            preset: "llama-3-8b".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    // Half the flags is refused at start with what is missing.
    let out = Command::new(env!("CARGO_BIN_EXE_kvcache"))
        .args(["coordinator", "--listen", "127.0.0.1:0", "--etcd-endpoints", &etcd_ep])
        .arg("--etcd-cert")
        .arg(&p.client_cert)
        .arg("--data-dir")
        .arg(dir.path().join("c1"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("need --etcd-ca"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
