//! Membership, epochs, namespaces and persistence of the coordinator state.

use kvcache_coordinator::{ClusterState, CoordinatorConfig};
use kvcache_proto::v1 as pb;
use std::time::Duration;

fn info(id: &str, zone: &str) -> pb::NodeInfo {
    pb::NodeInfo {
        node_id: id.into(),
        address: format!("{id}:1"),
        capacity_bytes: 1 << 30,
        zone: zone.into(),
        labels: Default::default(),
    }
}

fn cfg(dir: &std::path::Path) -> CoordinatorConfig {
    let mut c = CoordinatorConfig::new(dir);
    c.join_ramp = Duration::ZERO;
    c.node_timeout = Duration::from_millis(100);
    c
}

fn state_of(s: &ClusterState, id: &str) -> (i32, f64) {
    let m = s.shard_map();
    let n = m.nodes.iter().find(|n| n.node.as_ref().unwrap().node_id == id).unwrap();
    (n.state, n.weight)
}

#[test]
fn nodes_join_time_out_rejoin_and_drain_with_a_monotonic_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let s = ClusterState::open(cfg(dir.path())).unwrap();
    let e1 = s.register_node(info("a", "z1")).unwrap();
    let e2 = s.register_node(info("b", "z2")).unwrap();
    assert!(e2 > e1);
    assert_eq!(s.register_node(info("b", "z2")).unwrap(), e2, "an identical re-registration changes nothing");
    assert_eq!(state_of(&s, "a").0, pb::NodeState::Up as i32);
    // b keeps heartbeating, a goes silent.
    std::thread::sleep(Duration::from_millis(150));
    assert!(s.heartbeat(&pb::HeartbeatRequest { node_id: "b".into(), ..Default::default() }).1);
    assert!(s.tick().unwrap());
    assert_eq!(state_of(&s, "a"), (pb::NodeState::Down as i32, 0.0));
    assert_eq!(state_of(&s, "b").0, pb::NodeState::Up as i32);
    let e3 = s.epoch();
    assert!(e3 > e2);
    assert!(
        !s.heartbeat(&pb::HeartbeatRequest { node_id: "a".into(), ..Default::default() }).1,
        "a down node must re-register"
    );
    // a rejoins with the same id.
    let e4 = s.register_node(info("a", "z1")).unwrap();
    assert!(e4 > e3);
    assert_eq!(state_of(&s, "a").0, pb::NodeState::Up as i32);
    // Drain b: out of placement (weight 0) but still listed.
    let e5 = s.drain("b").unwrap();
    assert!(e5 > e4);
    assert_eq!(state_of(&s, "b"), (pb::NodeState::Draining as i32, 0.0));
    assert!(s.drain("nope").is_err());
}

#[test]
fn a_new_node_ramps_in_over_the_join_ramp() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(dir.path());
    c.join_ramp = Duration::from_millis(300);
    c.node_timeout = Duration::from_secs(60);
    let s = ClusterState::open(c).unwrap();
    s.register_node(info("a", "")).unwrap();
    let (_, w0) = state_of(&s, "a");
    assert!((w0 - 0.25).abs() < 1e-9, "starts at a quarter: {w0}");
    for _ in 0..40 {
        std::thread::sleep(Duration::from_millis(25));
        s.tick().unwrap();
    }
    let (_, w1) = state_of(&s, "a");
    assert!((w1 - 1.0).abs() < 1e-9, "full weight after the ramp: {w1}");
}

#[test]
fn namespaces_are_validated_immutable_and_survive_a_restart_with_the_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let s = ClusterState::open(cfg(dir.path())).unwrap();
    let req = |name: &str, preset: &str| pb::CreateNamespaceRequest {
        name: name.into(),
        tenant: "t".into(),
        preset: preset.into(),
        ..Default::default()
    };
    let ns = s.create_namespace(req("a.v3", "deepseek-v3")).unwrap();
    assert_eq!(ns.page_tokens, 64);
    assert_eq!(ns.replication, 1);
    assert_eq!(s.create_namespace(req("a.v3", "deepseek-v3")).unwrap().prefix_seed, ns.prefix_seed, "idempotent");
    assert!(s.create_namespace(req("a.v3", "llama-3-8b")).unwrap_err().to_string().contains("immutable"));
    assert!(s.create_namespace(req("a.x", "gpt-5")).unwrap_err().to_string().contains("unknown preset"));
    assert!(s.create_namespace(req("Bad Name", "llama-3-8b")).is_err());
    let mut r = req("a.pt", "llama-3-8b");
    r.page_tokens = 10_000;
    assert!(s.create_namespace(r).unwrap_err().to_string().contains("page_tokens 10000"));
    let mut r = req("a.explicit", "");
    r.model = Some(pb::ModelSpec {
        attention: pb::AttentionKind::Gqa as i32,
        num_layers: 2,
        num_q_heads: 6,
        num_kv_heads: 4,
        head_dim: 64,
        ..Default::default()
    });
    assert!(s.create_namespace(r).unwrap_err().to_string().contains("not a multiple"));
    s.register_node(info("a", "")).unwrap();
    let epoch = s.epoch();
    drop(s);
    let s = ClusterState::open(cfg(dir.path())).unwrap();
    assert_eq!(s.epoch(), epoch);
    assert_eq!(s.namespace("a.v3").unwrap().prefix_seed, ns.prefix_seed);
    // Nodes come back down until they heartbeat; re-registering bumps past the old epoch.
    assert_eq!(state_of(&s, "a").0, pb::NodeState::Down as i32);
    assert!(s.register_node(info("a", "")).unwrap() > epoch);
}
