//! A user's first hour, against the real binary: each wrong invocation prints one line that
//! says what failed, where (the address, flag or path) and what to do; two processes never share
//! a data directory.

mod common;

use std::process::{Command, Output};

/// Run `kvcache ARGS` to completion without RUST_LOG (what a user sees by default).
fn kvcache(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kvcache")).args(args).env_remove("RUST_LOG").output().expect("run kvcache")
}

/// A loopback port nothing listens on.
fn closed_port() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

/// The failure's stderr, checked to be one line (clap's usage lines aside).
fn one_line_error(args: &[&str]) -> String {
    let out = kvcache(args);
    assert!(!out.status.success(), "kvcache {args:?} succeeded");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let first = err.lines().next().unwrap_or_default().to_owned();
    if !first.contains("invalid value") {
        assert_eq!(err.trim_end().lines().count(), 1, "kvcache {args:?} printed more than one line:\n{err}");
    }
    first
}

#[test]
fn wrong_invocations_print_one_line_that_says_what_and_where() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("n");
    let data = data.to_str().unwrap();
    let closed = closed_port();
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = busy.local_addr().unwrap().to_string();
    let cases: Vec<(Vec<&str>, Vec<String>)> = vec![
        (
            vec!["status", "--coordinator", &closed],
            vec![format!("error: cannot reach the coordinator at {closed} (Connection refused"), "kvcache dev".into()],
        ),
        (vec!["load", "--coordinator", &closed], vec![format!("cannot reach the coordinator at {closed}")]),
        (
            vec!["node", "--coordinator", "a:7000,b", "--data-dir", data],
            vec!["'--coordinator <COORDINATOR>': bad address \"b\": no port".into()],
        ),
        (vec!["worker", "--advertise", "w:99999"], vec!["'--advertise <ADVERTISE>': bad address \"w:99999\"".into()]),
        (vec!["drain", "--coordinator", &closed, "node-0"], vec![format!("cannot reach the coordinator at {closed}")]),
        (
            vec!["demo", "--coordinator", &closed],
            vec![format!("cannot reach the coordinator at {closed}"), "--coordinator".into()],
        ),
        (
            vec!["status", "--coordinator", "localhost"],
            vec!["'--coordinator <COORDINATOR>': bad address \"localhost\": no port: write host:port".into()],
        ),
        (
            vec!["status", "--coordinator", "127.0.0.1:70000"],
            vec!["bad address \"127.0.0.1:70000\": port \"70000\" is not a number in 1..=65535".into()],
        ),
        (
            vec!["node", "--data-dir", data, "--listen", &busy],
            vec![format!("cannot listen on {busy} (--listen): the address is in use"), "choose another address".into()],
        ),
        (vec!["node", "--data-dir", data, "--listen", "localhost"], vec!["--listen: bad address \"localhost\"".into()]),
        (vec!["node", "--capacity", "0"], vec!["'--capacity <CAPACITY>'".into(), "at least 1 byte".into()]),
        (vec!["node", "--capacity", "10G"], vec!["ambiguous: write 10GiB (binary) or 10GB (decimal)".into()]),
        (vec!["node", "--capacity", "1.5 parsecs"], vec!["unknown unit \"parsecs\"".into()]),
        (vec!["dev", "--node-capacity", "1.2.3GiB"], vec!["'--node-capacity <NODE_CAPACITY>'".into()]),
        (
            vec!["node", "--data-dir", data, "--capacity", "10000TiB"],
            vec![format!("--capacity 10000 TiB is larger than the filesystem that holds {data}")],
        ),
        (
            vec!["dev", "--data-dir", data, "--listen", "127.0.0.1:0", "--node-capacity", "5000TiB"],
            vec!["--node-capacity × --nodes 15000 TiB is larger than the filesystem".into()],
        ),
    ];
    for (args, wants) in cases {
        let line = one_line_error(&args);
        for want in wants {
            assert!(line.contains(&want), "kvcache {args:?}:\n  got  {line:?}\n  want {want:?}");
        }
    }
}

#[test]
fn a_second_process_on_a_data_directory_is_refused_and_told_who_holds_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("node");
    let data = data.to_str().unwrap();
    let first = common::spawn(&["node", "--listen", "127.0.0.1:0", "--data-dir", data, "--capacity", "64MiB"]);
    let pid = first.child.id();
    let line = one_line_error(&["node", "--listen", "127.0.0.1:0", "--data-dir", data, "--capacity", "64MiB"]);
    assert!(
        line.contains(&format!("data directory {data} is in use by another kvcache process (pid {pid})"))
            && line.contains("another --data-dir"),
        "{line}"
    );
    // A client pointed at the node's port instead of the coordinator's.
    let line = one_line_error(&["status", "--coordinator", &first.addr]);
    assert!(line.contains(&format!("{} is not a coordinator", first.addr)), "{line}");
    // The same for the coordinator's state, and for `kvcache dev` over a running one.
    let coord = dir.path().join("coord");
    let coord = coord.to_str().unwrap();
    let c = common::spawn(&["coordinator", "--listen", "127.0.0.1:0", "--data-dir", coord]);
    let line = one_line_error(&["coordinator", "--listen", "127.0.0.1:0", "--data-dir", coord]);
    assert!(line.contains(&format!("(pid {})", c.child.id())), "{line}");
    let dev = dir.path().join("dev");
    let dev = dev.to_str().unwrap();
    let mut d = common::spawn_dev(dev);
    let line = one_line_error(&["dev", "--listen", "127.0.0.1:0", "--data-dir", dev]);
    assert!(line.contains("is in use by another kvcache process") && line.contains(dev), "{line}");
    assert!(d.terminate(), "the first dev stops cleanly");
    // Once the holder is gone, the directory can be taken again.
    drop(first);
    let again = common::spawn(&["node", "--listen", "127.0.0.1:0", "--data-dir", data, "--capacity", "64MiB"]);
    drop(again);
}

#[test]
fn a_cluster_with_tenants_says_which_token_a_command_lacks() {
    use kvcache_net::auth::token_sha256;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tenants.toml");
    let h = |t: &str| hex::encode(token_sha256(t));
    std::fs::write(
        &file,
        format!(
            "[tenants.a]\ntoken_sha256 = \"{}\"\n[tenants.ops]\ntoken_sha256 = \"{}\"\nadmin = true\n",
            h("ta"),
            h("tops")
        ),
    )
    .unwrap();
    let f = file.to_str().unwrap();
    let dev = dir.path().join("dev");
    let mut d = common::spawn_until(
        &[
            "dev",
            "--listen",
            "127.0.0.1:0",
            "--node-capacity",
            "64MiB",
            "--data-dir",
            dev.to_str().unwrap(),
            "--tenants",
            f,
        ],
        &[],
        |l| l.trim().strip_prefix("coordinator").map(|a| a.trim().to_owned()),
    );
    let line = one_line_error(&["status", "--coordinator", &d.addr]);
    assert!(line.contains("runs with tenants") && line.contains("--token or KVCACHE_TOKEN"), "{line}");
    let line = one_line_error(&["status", "--coordinator", &d.addr, "--token", "ta"]);
    assert!(line.contains("needs an admin tenant"), "{line}");
    let out = kvcache(&["status", "--coordinator", &d.addr, "--token", "tops"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // A node given the file but no service token would be refused by everyone: it says so.
    let line = one_line_error(&[
        "node",
        "--tenants",
        f,
        "--coordinator",
        &d.addr,
        "--data-dir",
        dir.path().join("n").to_str().unwrap(),
    ]);
    assert!(line.contains("--tenants without --token"), "{line}");
    // A broken file is refused at start, naming the tenant and key.
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[tenants.a]\nqouta = \"1GiB\"\n").unwrap();
    let line = one_line_error(&[
        "coordinator",
        "--listen",
        "127.0.0.1:0",
        "--tenants",
        bad.to_str().unwrap(),
        "--data-dir",
        dir.path().join("c").to_str().unwrap(),
    ]);
    assert!(line.contains("bad.toml") && line.contains("qouta"), "{line}");
    assert!(d.terminate(), "dev stops cleanly");
}
