//! `kvcache bench node`: put/get throughput of a cache node over gRPC on loopback, side by side
//! in the same run with `redis-server` (SET/GET of the same sizes, key count and concurrency,
//! persistence off) and raw loopback TCP as the ceiling; plus restart recovery rate, index bytes
//! per page, and each server's CPU seconds per GB from its own process accounting. Each client
//! has its own connection, gRPC's as Redis's.

use bytes::Bytes;
use kvcache_cli::cluster::ChildProcess;
use kvcache_core::{AttentionKind, Codec, ModelSpec, Namespace, PageKey, SequenceKey};
use kvcache_proto::v1 as pb;
use kvcache_proto::v1::cache_node_client::CacheNodeClient;
use serde::Serialize;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

/// Flags of `kvcache bench node`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Page sizes in bytes.
    #[arg(long, value_delimiter = ',', default_value = "65536,262144")]
    sizes: Vec<usize>,
    /// Concurrent clients.
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Distinct bytes written and read (spread over distinct pages).
    #[arg(long, default_value = "512MiB", value_parser = crate::util::parse_bytes)]
    working_set: u64,
    /// Seconds of the get phase.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Pages per put message / keys per get request (Redis pipelines the same number).
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize, Default, Clone)]
struct SizeResult {
    page_bytes: usize,
    pages: usize,
    /// Put into freed slots (the second pass), and SET after a FLUSHALL.
    put_bytes_per_s: f64,
    get_bytes_per_s: f64,
    redis_set_bytes_per_s: f64,
    redis_get_bytes_per_s: f64,
    put_vs_redis: f64,
    get_vs_redis: f64,
    /// The first pass of each: a fresh pool against an empty Redis.
    put_fresh_bytes_per_s: f64,
    redis_set_fresh_bytes_per_s: f64,
    put_fresh_vs_redis: f64,
    node_cpu_s_per_gb_get: f64,
    redis_cpu_s_per_gb_get: f64,
    /// The bench's own CPU per GB read in each get phase: the gRPC client's (frames decoded,
    /// pages checked) against the RESP client's. Clients and servers share the host's cores.
    client_cpu_s_per_gb_get: f64,
    redis_client_cpu_s_per_gb_get: f64,
    node_cpu_s_per_gb_put: f64,
    redis_cpu_s_per_gb_set: f64,
    /// The bench's own CPU per GB written in the steady-state put / SET pass.
    client_cpu_s_per_gb_put: f64,
    redis_client_cpu_s_per_gb_set: f64,
    recovery_bytes_per_s: f64,
    index_bytes_per_page: f64,
}

#[derive(Serialize)]
struct Report {
    tcp_bytes_per_s: f64,
    get_bytes_per_s: f64,
    put_bytes_per_s: f64,
    redis_get_bytes_per_s: f64,
    redis_set_bytes_per_s: f64,
    get_vs_redis: f64,
    put_vs_redis: f64,
    /// Put into a fresh pool ÷ SET into an empty Redis (worst size).
    put_fresh_vs_redis: f64,
    recovery_bytes_per_s: f64,
    index_bytes_per_page: f64,
    sizes: Vec<SizeResult>,
}

/// CPU seconds (user + system) a process has used, from /proc.
fn cpu_seconds(pid: u32) -> f64 {
    super::proc_stat(pid).cpu_s
}

struct Server {
    child: Child,
    addr: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start_node(dir: &std::path::Path, capacity: u64) -> anyhow::Result<ChildProcess> {
    let mut args: Vec<std::ffi::OsString> =
        ["node", "--listen", "127.0.0.1:0", "--node-id", "bench", "--capacity", &capacity.to_string(), "--data-dir"]
            .iter()
            .map(Into::into)
            .collect();
    args.push(dir.into());
    kvcache_cli::cluster::spawn_child(&std::env::current_exe()?, args).await
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn start_redis() -> anyhow::Result<Option<Server>> {
    let port = free_port()?;
    let child = match Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "no",
        ])
        .args(["--proto-max-bulk-len", "1gb", "--client-query-buffer-limit", "1gb"])
        .stdout(Stdio::null())
        .spawn()
    {
        Ok(c) => c,
        Err(_) => return Ok(None),
    };
    let addr = format!("127.0.0.1:{port}");
    for _ in 0..100 {
        if std::net::TcpStream::connect(&addr).is_ok() {
            return Ok(Some(Server { child, addr }));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    anyhow::bail!("redis-server did not start")
}

fn namespace(page_bytes: usize) -> Namespace {
    // bf16 GQA with 64-token pages: kv_heads · 2 (K,V) · 128 · 2 B · 64 = page_bytes.
    let kv = (page_bytes / (64 * 2 * 128 * 2)).max(1) as u32;
    Namespace {
        name: format!("bench.p{page_bytes}"),
        tenant: "bench".into(),
        model: ModelSpec {
            name: "bench".into(),
            attention: if kv == 1 { AttentionKind::Mqa } else { AttentionKind::Mha },
            num_layers: 1,
            num_q_heads: kv,
            num_kv_heads: kv,
            head_dim: 128,
            kv_lora_rank: 0,
            rope_dim: 0,
            softmax_scale: 0.088,
            layers: Vec::new(),
            sinks: false,
            indexer: None,
        },
        codec: Codec::Bf16,
        page_tokens: 64,
        replication: 1,
        prefix_seed: 1,
    }
}

/// Raw loopback TCP, one stream: the ceiling.
fn tcp_ceiling(bytes: u64) -> anyhow::Result<f64> {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let reader = std::thread::spawn(move || -> std::io::Result<u64> {
        let (mut s, _) = l.accept()?;
        let mut buf = vec![0u8; 1 << 20];
        let mut n = 0u64;
        loop {
            let k = s.read(&mut buf)?;
            if k == 0 {
                return Ok(n);
            }
            n += k as u64;
        }
    });
    let mut s = std::net::TcpStream::connect(addr)?;
    let buf = vec![7u8; 1 << 20];
    let t = Instant::now();
    let mut sent = 0;
    while sent < bytes {
        s.write_all(&buf)?;
        sent += buf.len() as u64;
    }
    drop(s);
    let got = reader.join().map_err(|_| anyhow::anyhow!("reader panicked"))??;
    Ok(got as f64 / t.elapsed().as_secs_f64())
}

/// Run `kvcache bench node`.
pub fn run(a: Args) -> anyhow::Result<()> {
    let tcp = tcp_ceiling(2 << 30)?;
    eprintln!("loopback TCP, one stream: {:.2} GB/s", tcp / 1e9);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let mut sizes = Vec::new();
    for &size in &a.sizes {
        sizes.push(rt.block_on(one_size(&a, size))?);
    }
    let best = |f: fn(&SizeResult) -> f64| sizes.iter().map(f).fold(0.0, f64::max);
    let report = Report {
        tcp_bytes_per_s: tcp,
        get_bytes_per_s: best(|s| s.get_bytes_per_s),
        put_bytes_per_s: best(|s| s.put_bytes_per_s),
        redis_get_bytes_per_s: best(|s| s.redis_get_bytes_per_s),
        redis_set_bytes_per_s: best(|s| s.redis_set_bytes_per_s),
        get_vs_redis: sizes.iter().map(|s| s.get_vs_redis).fold(f64::INFINITY, f64::min),
        put_vs_redis: sizes.iter().map(|s| s.put_vs_redis).fold(f64::INFINITY, f64::min),
        put_fresh_vs_redis: sizes.iter().map(|s| s.put_fresh_vs_redis).fold(f64::INFINITY, f64::min),
        recovery_bytes_per_s: sizes.iter().map(|s| s.recovery_bytes_per_s).fold(f64::INFINITY, f64::min),
        index_bytes_per_page: best(|s| s.index_bytes_per_page),
        sizes,
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "{:>9} {:>10} {:>10} {:>8} {:>10} {:>10} {:>8} {:>10} {:>10} {:>8} {:>13} {:>13} {:>11} {:>9}",
            "page",
            "put GB/s",
            "SET GB/s",
            "put÷SET",
            "put fresh",
            "SET empty",
            "fresh÷",
            "get GB/s",
            "GET GB/s",
            "get÷GET",
            "node cpu s/GB",
            "redis cpu s/GB",
            "recov GB/s",
            "idx B/pg"
        );
        for s in &report.sizes {
            println!(
                "{:>9} {:>10.2} {:>10.2} {:>8.2} {:>10.2} {:>10.2} {:>8.2} {:>10.2} {:>10.2} {:>8.2} {:>13.2} {:>13.2} {:>11.2} {:>9.1}",
                s.page_bytes,
                s.put_bytes_per_s / 1e9,
                s.redis_set_bytes_per_s / 1e9,
                s.put_vs_redis,
                s.put_fresh_bytes_per_s / 1e9,
                s.redis_set_fresh_bytes_per_s / 1e9,
                s.put_fresh_vs_redis,
                s.get_bytes_per_s / 1e9,
                s.redis_get_bytes_per_s / 1e9,
                s.get_vs_redis,
                s.node_cpu_s_per_gb_get,
                s.redis_cpu_s_per_gb_get,
                s.recovery_bytes_per_s / 1e9,
                s.index_bytes_per_page
            );
        }
        println!(
            "put/SET: into freed slots / after FLUSHALL (steady state); fresh: a new pool / an empty Redis.\nloopback TCP ceiling (one stream): {:.2} GB/s; CPU s/GB are the get phase's, from /proc of each server",
            tcp / 1e9
        );
    }
    Ok(())
}

fn key(ns: &str, i: usize) -> PageKey {
    PageKey { sequence: SequenceKey::new(ns, format!("s{}", i / 64)), layer: 0, page_index: (i % 64) as u32 }
}

async fn one_size(a: &Args, size: usize) -> anyhow::Result<SizeResult> {
    let ns = namespace(size);
    let pages = (a.working_set as usize / size).max(a.clients * a.batch);
    let payloads: Vec<(Bytes, u32)> = (0..16)
        .map(|v| {
            let b = Bytes::from((0..size).map(|i| (i * 31 + v * 7) as u8).collect::<Vec<_>>());
            let crc = kvcache_core::checksum::crc32c(&b);
            (b, crc)
        })
        .collect();
    let dir = tempfile::tempdir()?;
    let cap = (pages as u64 * (size as u64 + 4096)) * 2 + (64 << 20);
    let node = start_node(dir.path(), cap).await?;
    let ch = kvcache_client::channel(&node.addr)?;
    let client = CacheNodeClient::new(ch.clone()).max_decoding_message_size(1 << 30).max_encoding_message_size(1 << 30);
    client.clone().ensure_namespace(pb::EnsureNamespaceRequest { namespace: Some((&ns).into()) }).await?;
    // One connection per client, as each Redis client has its own.
    let chans = (0..a.clients).map(|_| kvcache_client::channel(&node.addr)).collect::<Result<Vec<_>, _>>()?;
    let wire = |i: usize| {
        let (b, crc) = &payloads[i % payloads.len()];
        pb::Page {
            key: Some((&key(&ns.name, i)).into()),
            codec: pb::Codec::Bf16 as i32,
            token_count: 64,
            write_seq: 0,
            payload_crc32c: *crc,
            prefix_hash: 0,
            payload: b.clone(),
            ..Default::default()
        }
    };
    // Put, twice: into a fresh pool (every slot new, so every write also allocates page-cache
    // memory), then, after deleting every sequence, again into the freed slots — a running
    // node's steady state, where evictions and deletes keep recycling slots.
    let put_pass = || async {
        let cpu0 = cpu_seconds(node.id());
        let own0 = cpu_seconds(std::process::id());
        let t = Instant::now();
        let mut tasks = Vec::new();
        for (c, ch) in chans.iter().enumerate() {
            let mut cl =
                CacheNodeClient::new(ch.clone()).max_decoding_message_size(1 << 30).max_encoding_message_size(1 << 30);
            let mine: Vec<pb::PutPagesRequest> = (c..pages)
                .step_by(a.clients)
                .collect::<Vec<_>>()
                .chunks(a.batch)
                .map(|ch| pb::PutPagesRequest {
                    epoch: 0,
                    pages: ch.iter().map(|&i| wire(i)).collect(),
                    handoff: false,
                })
                .collect();
            tasks.push(tokio::spawn(async move { cl.put_pages(tokio_stream::iter(mine)).await.map(|_| ()) }));
        }
        for t in tasks {
            t.await??;
        }
        let secs = t.elapsed().as_secs_f64();
        Ok::<(f64, f64, f64), anyhow::Error>((
            secs,
            cpu_seconds(node.id()) - cpu0,
            cpu_seconds(std::process::id()) - own0,
        ))
    };
    let put_bytes = (pages * size) as f64;
    let (fresh_secs, _, _) = put_pass().await?;
    for s in 0..pages.div_ceil(64) {
        let sequence = Some((&SequenceKey::new(&ns.name, format!("s{s}"))).into());
        client.clone().delete_sequence(pb::DeleteSequenceRequest { epoch: 0, sequence }).await?;
    }
    let (put_secs, node_put_cpu, client_put_cpu) = put_pass().await?;
    // Get: random batches for `seconds`.
    let cpu0 = cpu_seconds(node.id());
    let own0 = cpu_seconds(std::process::id());
    let t = Instant::now();
    let deadline = t + Duration::from_secs_f64(a.seconds);
    let mut tasks = Vec::new();
    for (c, ch) in chans.iter().enumerate() {
        let ch = ch.clone();
        let nsn = ns.name.clone();
        let batch = a.batch;
        tasks.push(tokio::spawn(async move {
            let mut x = 0x9e37_79b9u64 + c as u64;
            let mut got = 0u64;
            while Instant::now() < deadline {
                let keys: Vec<pb::PageKey> = (0..batch)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        (&key(&nsn, (x % pages as u64) as usize)).into()
                    })
                    .collect();
                // The Rust client's read path (frames decoded as they arrived, no reassembly copy).
                let req = tonic::Request::new(pb::GetPagesRequest { keys, ranges: vec![] });
                kvcache_client::zerocopy::get_pages(ch.clone(), req, 1 << 30, |m| {
                    for it in m.items {
                        if it.status != pb::PageStatus::Ok as i32 {
                            return Err(tonic::Status::not_found("bench page missing"));
                        }
                        got += it.page.map_or(0, |p| p.payload.len() as u64);
                    }
                    Ok(())
                })
                .await?;
            }
            Ok::<u64, anyhow::Error>(got)
        }));
    }
    let mut get_bytes = 0u64;
    for t in tasks {
        get_bytes += t.await??;
    }
    let get_secs = t.elapsed().as_secs_f64();
    let node_get_cpu = cpu_seconds(node.id()) - cpu0;
    let client_get_cpu = cpu_seconds(std::process::id()) - own0;
    let stats = client.clone().stats(pb::StatsRequest {}).await?.into_inner();
    let index_per_page = stats.index_bytes as f64 / stats.pages.max(1) as f64;
    // Recovery: SIGKILL (no clean marker: every payload CRC is verified) and restart.
    drop(node);
    let node = start_node(dir.path(), cap).await?;
    let mut c2 = CacheNodeClient::new(kvcache_client::channel(&node.addr)?);
    let st = c2.stats(pb::StatsRequest {}).await?.into_inner();
    anyhow::ensure!(st.pages as usize == pages, "recovered {} of {pages} pages", st.pages);
    let recovery = st.recovery_bytes as f64 / st.recovery_seconds.max(1e-9);
    drop(node);
    // Redis, same sizes, keys, concurrency and batching.
    let mut r = SizeResult {
        page_bytes: size,
        pages,
        put_bytes_per_s: put_bytes / put_secs,
        put_fresh_bytes_per_s: put_bytes / fresh_secs,
        get_bytes_per_s: get_bytes as f64 / get_secs,
        node_cpu_s_per_gb_put: node_put_cpu / (put_bytes / 1e9),
        client_cpu_s_per_gb_put: client_put_cpu / (put_bytes / 1e9),
        node_cpu_s_per_gb_get: node_get_cpu / (get_bytes as f64 / 1e9),
        client_cpu_s_per_gb_get: client_get_cpu / (get_bytes as f64 / 1e9),
        recovery_bytes_per_s: recovery,
        index_bytes_per_page: index_per_page,
        ..Default::default()
    };
    if let Some(redis) = start_redis()? {
        let rb = redis_bench(a, &redis, size, pages, &payloads).await?;
        let (fresh, set, set_cpu, get, get_cpu) = (rb.set_fresh, rb.set, rb.set_cpu, rb.get, rb.get_cpu);
        r.redis_client_cpu_s_per_gb_get = rb.client_get_cpu;
        r.redis_client_cpu_s_per_gb_set = rb.client_set_cpu;
        r.redis_set_fresh_bytes_per_s = fresh;
        r.put_fresh_vs_redis = r.put_fresh_bytes_per_s / fresh;
        r.redis_set_bytes_per_s = set;
        r.redis_get_bytes_per_s = get;
        r.redis_cpu_s_per_gb_set = set_cpu;
        r.redis_cpu_s_per_gb_get = get_cpu;
        r.put_vs_redis = r.put_bytes_per_s / set;
        r.get_vs_redis = r.get_bytes_per_s / get;
    } else {
        eprintln!("redis-server not on PATH: no Redis baseline");
    }
    eprintln!(
        "{size} B pages: put {:.2} GB/s (fresh pool {:.2}), get {:.2} GB/s; Redis SET {:.2} (empty {:.2}), GET {:.2}; recovery {:.2} GB/s; {:.1} index B/page",
        r.put_bytes_per_s / 1e9,
        r.put_fresh_bytes_per_s / 1e9,
        r.get_bytes_per_s / 1e9,
        r.redis_set_bytes_per_s / 1e9,
        r.redis_set_fresh_bytes_per_s / 1e9,
        r.redis_get_bytes_per_s / 1e9,
        r.recovery_bytes_per_s / 1e9,
        r.index_bytes_per_page
    );
    eprintln!(
        "{size} B pages, get phase CPU s/GB: node {:.2}, its gRPC clients {:.2}; Redis {:.2}, its RESP clients {:.2}",
        r.node_cpu_s_per_gb_get, r.client_cpu_s_per_gb_get, r.redis_cpu_s_per_gb_get, r.redis_client_cpu_s_per_gb_get
    );
    eprintln!(
        "{size} B pages, put phase CPU s/GB: node {:.2}, its gRPC clients {:.2}; Redis {:.2}, its RESP clients {:.2}",
        r.node_cpu_s_per_gb_put, r.client_cpu_s_per_gb_put, r.redis_cpu_s_per_gb_set, r.redis_client_cpu_s_per_gb_set
    );
    Ok(r)
}

fn resp_cmd(buf: &mut Vec<u8>, parts: &[&[u8]]) {
    buf.extend_from_slice(format!("*{}\r\n", parts.len()).as_bytes());
    for p in parts {
        buf.extend_from_slice(format!("${}\r\n", p.len()).as_bytes());
        buf.extend_from_slice(p);
        buf.extend_from_slice(b"\r\n");
    }
}

async fn read_line(r: &mut tokio::io::BufReader<tokio::net::TcpStream>, line: &mut String) -> anyhow::Result<()> {
    line.clear();
    r.read_line(line).await?;
    anyhow::ensure!(!line.is_empty(), "redis closed the connection");
    Ok(())
}

/// Redis's side of one page size: rates in bytes/s, CPU in seconds per GB.
struct RedisResult {
    set_fresh: f64,
    set: f64,
    set_cpu: f64,
    client_set_cpu: f64,
    get: f64,
    get_cpu: f64,
    client_get_cpu: f64,
}

async fn redis_bench(
    a: &Args,
    redis: &Server,
    size: usize,
    pages: usize,
    payloads: &[(Bytes, u32)],
) -> anyhow::Result<RedisResult> {
    let pid = redis.child.id();
    // SET twice, as the node's put: into an empty server, then again after a FLUSHALL (its
    // allocator reusing what it freed).
    let set_pass = || async {
        let cpu0 = cpu_seconds(pid);
        let own0 = cpu_seconds(std::process::id());
        let t = Instant::now();
        let mut tasks = Vec::new();
        for c in 0..a.clients {
            let addr = redis.addr.clone();
            let payloads: Vec<Bytes> = payloads.iter().map(|p| p.0.clone()).collect();
            let batch = a.batch;
            let clients = a.clients;
            tasks.push(tokio::spawn(async move {
                let s = tokio::net::TcpStream::connect(&addr).await?;
                s.set_nodelay(true)?;
                let mut r = tokio::io::BufReader::with_capacity(1 << 20, s);
                let mine: Vec<usize> = (c..pages).step_by(clients).collect();
                let mut line = String::new();
                for ch in mine.chunks(batch) {
                    let mut buf = Vec::with_capacity(ch.len() * (size + 64));
                    for &i in ch {
                        resp_cmd(&mut buf, &[b"SET", format!("k{i}").as_bytes(), &payloads[i % payloads.len()]]);
                    }
                    r.get_mut().write_all(&buf).await?;
                    for _ in ch {
                        read_line(&mut r, &mut line).await?;
                        anyhow::ensure!(line.starts_with("+OK"), "redis SET: {line}");
                    }
                }
                Ok::<(), anyhow::Error>(())
            }));
        }
        for t in tasks {
            t.await??;
        }
        let set_secs = t.elapsed().as_secs_f64();
        let set_cpu = cpu_seconds(pid) - cpu0;
        Ok::<(f64, f64, f64), anyhow::Error>((set_secs, set_cpu, cpu_seconds(std::process::id()) - own0))
    };
    let (fresh_secs, _, _) = set_pass().await?;
    {
        let s = tokio::net::TcpStream::connect(&redis.addr).await?;
        let mut r = tokio::io::BufReader::new(s);
        let mut buf = Vec::new();
        resp_cmd(&mut buf, &[b"FLUSHALL", b"SYNC"]);
        r.get_mut().write_all(&buf).await?;
        let mut line = String::new();
        read_line(&mut r, &mut line).await?;
        anyhow::ensure!(line.starts_with("+OK"), "redis FLUSHALL: {line}");
    }
    let (set_secs, set_cpu, own_set_cpu) = set_pass().await?;
    let set_bytes = (pages * size) as f64;
    let own0 = cpu_seconds(std::process::id());
    let cpu0 = cpu_seconds(pid);
    let t = Instant::now();
    let deadline = t + Duration::from_secs_f64(a.seconds);
    let mut tasks = Vec::new();
    for c in 0..a.clients {
        let addr = redis.addr.clone();
        let batch = a.batch;
        tasks.push(tokio::spawn(async move {
            let s = tokio::net::TcpStream::connect(&addr).await?;
            s.set_nodelay(true)?;
            let mut r = tokio::io::BufReader::with_capacity(1 << 20, s);
            let mut x = 0x51_7cc1_b727_220au64 + c as u64;
            let mut got = 0u64;
            let mut line = String::new();
            let mut val = vec![0u8; size + 2];
            while Instant::now() < deadline {
                let mut buf = Vec::new();
                for _ in 0..batch {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    resp_cmd(&mut buf, &[b"GET", format!("k{}", x % pages as u64).as_bytes()]);
                }
                r.get_mut().write_all(&buf).await?;
                for _ in 0..batch {
                    read_line(&mut r, &mut line).await?;
                    let n: usize = line
                        .trim_end()
                        .strip_prefix('$')
                        .and_then(|v| v.parse().ok())
                        .ok_or_else(|| anyhow::anyhow!("redis GET: {line}"))?;
                    r.read_exact(&mut val[..n + 2]).await?;
                    got += n as u64;
                }
            }
            Ok::<u64, anyhow::Error>(got)
        }));
    }
    let mut get_bytes = 0u64;
    for t in tasks {
        get_bytes += t.await??;
    }
    let get_secs = t.elapsed().as_secs_f64();
    let get_cpu = cpu_seconds(pid) - cpu0;
    let client_cpu = cpu_seconds(std::process::id()) - own0;
    Ok(RedisResult {
        set_fresh: set_bytes / fresh_secs,
        set: set_bytes / set_secs,
        set_cpu: set_cpu / (set_bytes / 1e9),
        client_set_cpu: own_set_cpu / (set_bytes / 1e9),
        get: get_bytes as f64 / get_secs,
        get_cpu: get_cpu / (get_bytes as f64 / 1e9),
        client_get_cpu: client_cpu / (get_bytes as f64 / 1e9),
    })
}
