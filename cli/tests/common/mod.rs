//! Helpers for tests that run the real `kvcache` binary.
#![allow(dead_code, missing_docs)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

/// A running `kvcache` process and the address it printed.
pub struct Proc {
    pub child: Child,
    pub addr: String,
}

impl Proc {
    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait (bounded) for a clean exit; returns whether it exited 0.
    pub fn terminate(&mut self) -> bool {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        for _ in 0..200 {
            if let Ok(Some(s)) = self.child.try_wait() {
                return s.success();
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        self.kill();
        false
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Start `kvcache ARGS` and wait for its "listening on ADDR" line.
pub fn spawn(args: &[&str]) -> Proc {
    spawn_env(args, &[])
}

/// `kvcache dev` on free loopback ports with its data in `dir`; the address is its coordinator's.
pub fn spawn_dev(dir: &str) -> Proc {
    spawn_until(&["dev", "--listen", "127.0.0.1:0", "--node-capacity", "64MiB", "--data-dir", dir], &[], |l| {
        l.trim().strip_prefix("coordinator").map(|a| a.trim().to_owned())
    })
}

/// [`spawn`] with extra environment variables.
pub fn spawn_env(args: &[&str], envs: &[(&str, &str)]) -> Proc {
    spawn_until(args, envs, |l| l.split("listening on ").nth(1).map(|a| a.trim().to_owned()))
}

/// Start `kvcache ARGS` and wait for the stdout line `addr_of` finds an address in.
pub fn spawn_until(args: &[&str], envs: &[(&str, &str)], addr_of: impl Fn(&str) -> Option<String>) -> Proc {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kvcache"))
        .args(args)
        .env("RUST_LOG", "warn")
        .envs(envs.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn kvcache");
    let out = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(out).lines();
    let addr = loop {
        let line = lines.next().expect("process exited before listening").expect("read stdout");
        if let Some(a) = addr_of(&line) {
            break a;
        }
    };
    // Keep draining stdout so the process never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    Proc { child, addr }
}

/// `kvcache node` NODE_ID on loopback registered with `coord`, its pool under `dir/NODE_ID`,
/// plus `extra` flags and `envs`.
pub fn node(
    id: &str,
    coord: &str,
    dir: &std::path::Path,
    capacity: &str,
    extra: &[&str],
    envs: &[(&str, &str)],
) -> Proc {
    let d = dir.join(id);
    let mut args =
        vec!["node", "--listen", "127.0.0.1:0", "--coordinator", coord, "--node-id", id, "--capacity", capacity];
    args.extend(["--data-dir", d.to_str().unwrap()]);
    args.extend(extra);
    spawn_env(&args, envs)
}

/// `kvcache coordinator` on loopback with state in `dir/coord`, tuned for tests: nodes time out
/// after 2 s, no join ramp, 200 ms heartbeats; plus `extra` flags.
pub fn fast_coordinator(dir: &std::path::Path, extra: &[&str]) -> Proc {
    let d = dir.join("coord");
    let mut args = vec!["coordinator", "--listen", "127.0.0.1:0", "--data-dir", d.to_str().unwrap()];
    args.extend(["--node-timeout", "2s", "--join-ramp", "0s", "--heartbeat-interval", "200ms"]);
    args.extend(extra);
    spawn(&args)
}

/// A CA and a leaf certificate (for localhost and 127.0.0.1) it signed, as PEM files, and a
/// second leaf of the same CA (a client's own identity) with its DER.
pub struct Pki {
    pub ca: std::path::PathBuf,
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
    pub client_cert: std::path::PathBuf,
    pub client_key: std::path::PathBuf,
    pub client_der: Vec<u8>,
}

pub fn pki(dir: &std::path::Path, name: &str) -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, format!("{name} CA"));
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let mut leaf = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
    leaf.distinguished_name.push(DnType::CommonName, format!("{name} peer"));
    let key = KeyPair::generate().unwrap();
    let cert = leaf.signed_by(&key, &ca).unwrap();
    let mut other = CertificateParams::new(vec!["client".to_owned()]).unwrap();
    other.distinguished_name.push(DnType::CommonName, format!("{name} client"));
    let client_key = KeyPair::generate().unwrap();
    let client = other.signed_by(&client_key, &ca).unwrap();
    let p = Pki {
        ca: dir.join(format!("{name}-ca.pem")),
        cert: dir.join(format!("{name}.pem")),
        key: dir.join(format!("{name}-key.pem")),
        client_cert: dir.join(format!("{name}-client.pem")),
        client_key: dir.join(format!("{name}-client-key.pem")),
        client_der: client.der().to_vec(),
    };
    std::fs::write(&p.ca, ca.pem()).unwrap();
    std::fs::write(&p.cert, cert.pem()).unwrap();
    std::fs::write(&p.key, key.serialize_pem()).unwrap();
    std::fs::write(&p.client_cert, client.pem()).unwrap();
    std::fs::write(&p.client_key, client_key.serialize_pem()).unwrap();
    p
}
