//! `kvcache dev` as a process, `kvcache load` against it (closed and open loop, JSON report and
//! PNG plot), then a clean stop on SIGTERM.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

/// `kvcache dev`, killed if the test ends (or fails) before stopping it.
struct Dev(Child);

impl Drop for Dev {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

#[test]
fn load_against_kvcache_dev_reports_every_request_and_dev_stops_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let mut dev = Dev(Command::new(env!("CARGO_BIN_EXE_kvcache"))
        .args(["dev", "--listen", "127.0.0.1:0", "--node-capacity", "256MiB", "--data-dir"])
        .arg(dir.path().join("dev"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap());
    let mut lines = BufReader::new(dev.0.stdout.take().unwrap()).lines();
    let coord = loop {
        let l = lines.next().expect("dev exited").unwrap();
        if let Some(a) = l.trim().strip_prefix("coordinator") {
            break a.trim().to_owned();
        }
    };
    let drain = std::thread::spawn(move || lines.map_while(Result::ok).collect::<Vec<_>>());
    for (scenario, extra) in [
        ("decode", vec!["--concurrency", "4"]),
        ("mixed", vec!["--rate", "40"]),
        ("prefill", vec!["--concurrency", "2"]),
    ] {
        let json = dir.path().join(format!("{scenario}.json"));
        let png = dir.path().join(format!("{scenario}.png"));
        let out = Command::new(env!("CARGO_BIN_EXE_kvcache"))
            .args([
                "load",
                "--coordinator",
                &coord,
                "--scenario",
                scenario,
                "--requests",
                "30",
                "--duration",
                "20",
                "--context",
                "200",
                "--sequences",
                "3",
                "--preset",
                "qwen2.5-7b",
            ])
            .args(&extra)
            .arg("--json")
            .arg(&json)
            .arg("--plot")
            .arg(&png)
            .output()
            .unwrap();
        assert!(out.status.success(), "{scenario}: {}", String::from_utf8_lossy(&out.stderr));
        let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        assert_eq!(r["requests"], 30, "{scenario}: {r}");
        assert_eq!(r["success_rate"], 1.0, "{scenario}: {r}");
        for k in ["min", "p50", "p90", "p99", "p99.9", "max"] {
            assert!(r["latency_ms"][k].as_f64().unwrap() > 0.0, "{scenario}: latency {k}");
        }
        assert!(r["bytes_per_s"].as_f64().unwrap() > 0.0);
        assert_eq!(&std::fs::read(&png).unwrap()[..8], b"\x89PNG\r\n\x1a\n");
    }
    let _ = Command::new("kill").arg("-TERM").arg(dev.0.id().to_string()).status();
    let mut ok = false;
    for _ in 0..200 {
        if let Ok(Some(s)) = dev.0.try_wait() {
            ok = s.success();
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    drop(dev);
    let out = drain.join().unwrap();
    assert!(ok && out.iter().any(|l| l.contains("stopped cleanly")), "dev did not stop cleanly: {out:?}");
}
