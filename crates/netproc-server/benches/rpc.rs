//! netproc native calls against a raw tokio-rustls length-prefixed echo,
//! in one process and one runtime, alternated, medians of several rounds.
//!
//! `cargo bench -p netproc-server --bench rpc`
//! Environment: `NETPROC_BENCH_SECS` (default 5), `NETPROC_BENCH_ROUNDS` (default 3).
//!
//! Both systems use the same PKI, TLS 1.3 with client certificates, 64-byte
//! payloads. The raw echo does no dispatch at all: it is the floor.
//!
//! Two layouts: one 2-thread runtime for clients and servers, and separate
//! 2-thread runtimes (servers on one, clients on the other). Allocations
//! per call (client and server together: one process) are counted by an
//! instrumented global allocator (`stats_alloc`).

#[global_allocator]
static ALLOC: &stats_alloc::StatsAlloc<std::alloc::System> = &stats_alloc::INSTRUMENTED_SYSTEM;

fn allocations() -> usize {
    ALLOC.stats().allocations
}

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use netproc_client::Client;
use netproc_server::ServerHandle;
use netproc_testkit::bench::{PAYLOAD, Run, bench_server, raw_echo, run_netproc, run_raw, runtime};
use netproc_testkit::{TestPki, cpu_micros, env_or, median};
use netproc_wire::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn start_netproc(pki: &TestPki) -> (ServerHandle, netproc_auth::ApiKey) {
    let (builder, key) = bench_server(pki);
    let server = builder
        .scripts(netproc_script::ScriptRuntime::builder().build())
        .start()
        .await
        .unwrap();
    (server, key)
}

// ---------------------------------------------------------------- large payloads

/// `size`-byte binary echoes, C=1 K=4, raw then netproc, `rounds` times:
/// MB/s of payload echoed (each way).
fn payloads(
    pki: &TestPki,
    (server, key): (&ServerHandle, &netproc_auth::ApiKey),
    rt: &tokio::runtime::Runtime,
    (secs, rounds): (f64, usize),
) {
    for size in [64 * 1024, 1024 * 1024] {
        let (mut raw, mut np) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            raw.push(rt.block_on(run_raw(pki, (1, 4, size), secs, rt.handle())));
            let echo = vec![Value::Bytes(vec![7u8; size].into())];
            np.push(rt.block_on(run_netproc(pki, server, key, 1, 4, secs, ("echo", echo))));
        }
        let m = |runs: &[Run], f: &dyn Fn(&Run) -> f64| median(runs.iter().map(f).collect());
        let mbps = |r: &Run| r.rate() * size as f64 / 1e6;
        let (rm, nm) = (m(&raw, &mbps), m(&np, &mbps));
        println!(
            "payload {} KiB C=1 K=4 median: raw {rm:.0} MB/s, {:.0} µs CPU/call, {:.1} allocs/call | netproc {nm:.0} MB/s, {:.0} µs CPU/call, {:.1} allocs/call | throughput ratio {:.2}x",
            size / 1024,
            m(&raw, &Run::cpu_per_call),
            m(&raw, &Run::allocs_per_call),
            m(&np, &Run::cpu_per_call),
            m(&np, &Run::allocs_per_call),
            nm / rm
        );
    }
}

// ---------------------------------------------------------------- handshakes

/// New TCP + TLS 1.3 mTLS handshake + one 64-byte round trip, `par` at a
/// time, for `secs`: connections per second and CPU per connection.
async fn handshakes_raw(pki: &TestPki, par: usize, secs: f64) -> (f64, f64) {
    let (addr, connector, server) = raw_echo(pki, &tokio::runtime::Handle::current()).await;
    let result = timed(par, secs, move |_| {
        let connector = connector.clone();
        async move {
            let tcp = TcpStream::connect(addr).await.unwrap();
            tcp.set_nodelay(true).unwrap();
            let name = netproc_pki::rustls::ServerName::try_from("localhost").unwrap();
            let mut tls = connector.connect(name, tcp).await.unwrap();
            let mut frame = BytesMut::new();
            frame.put_u32(PAYLOAD as u32);
            frame.put_slice(&[7u8; PAYLOAD]);
            tls.write_all(&frame).await.unwrap();
            let mut back = [0u8; 4 + PAYLOAD];
            tls.read_exact(&mut back).await.unwrap();
        }
    })
    .await;
    server.abort();
    result
}

/// New connection + TLS + authentication + one echo call, `par` at a
/// time, for `secs`: each loop keeps one client (its TLS configuration
/// built once, as the raw loop's connector is) and closes its connection
/// after each call, so the next call connects afresh.
async fn handshakes_netproc(
    pki: &TestPki,
    (server, key): (&ServerHandle, &netproc_auth::ApiKey),
    par: usize,
    secs: f64,
) -> (f64, f64) {
    let endpoint = pki.endpoint(&pki.client, server.local_addr(), key);
    let clients: Vec<Client> = (0..par)
        .map(|_| {
            Client::builder()
                .server("s", endpoint.clone())
                .build()
                .unwrap()
        })
        .collect();
    let clients = Arc::new(clients);
    timed(par, secs, move |i| {
        let clients = clients.clone();
        async move {
            let client = &clients[i];
            let s = client.server("s").unwrap();
            let echo = vec![Value::Bytes(vec![7u8; PAYLOAD].into())];
            let _: Value = s
                .execute(netproc_wire::Operation::Invoke {
                    function: "echo".into(),
                    args: echo,
                })
                .await
                .expect("bench call");
            client.flush_server("s").unwrap();
        }
    })
    .await
}

/// Runs `one` in `par` loops for `secs`: (per second, µs CPU each).
async fn timed<F, Fut>(par: usize, secs: f64, one: F) -> (f64, f64)
where
    F: Fn(usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let (start, cpu) = (Instant::now(), cpu_micros());
    let loops: Vec<_> = (0..par)
        .map(|i| {
            let (one, stop, done) = (one.clone(), stop.clone(), done.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    one(i).await;
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    stop.store(true, Ordering::Relaxed);
    for l in loops {
        let _ = l.await;
    }
    let n = done.load(Ordering::Relaxed).max(1) as f64;
    (
        n / start.elapsed().as_secs_f64(),
        (cpu_micros() - cpu) as f64 / n,
    )
}

// ---------------------------------------------------------------- idle memory

/// Resident bytes of this process.
fn rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

/// Run in a child process (a fresh heap): opens `n` connections of one
/// system, each after one round trip, and prints RSS growth per
/// connection (client and server sides together: one process).
fn idle_child(system: &str, n: usize) {
    let rt = runtime();
    let pki = TestPki::new();
    rt.block_on(async {
        let per_conn = if system == "raw" {
            let (addr, connector, _server) =
                raw_echo(&pki, &tokio::runtime::Handle::current()).await;
            let mut held = Vec::with_capacity(n);
            // One first, so one-time costs are not counted.
            let open = async || {
                let tcp = TcpStream::connect(addr).await.unwrap();
                let name = netproc_pki::rustls::ServerName::try_from("localhost").unwrap();
                let mut tls = connector.connect(name, tcp).await.unwrap();
                tls.write_all(&[0, 0, 0, 1, 7]).await.unwrap();
                let mut back = [0u8; 5];
                tls.read_exact(&mut back).await.unwrap();
                tls
            };
            held.push(open().await);
            let before = (rss(), heap());
            for _ in 0..n {
                held.push(open().await);
            }
            per_connection(before, n)
        } else {
            let (server, key) = start_netproc(&pki).await;
            let mut builder = Client::builder();
            for i in 0..=n {
                let mut endpoint = pki.endpoint(&pki.client, server.local_addr(), &key);
                endpoint = endpoint.heartbeat_interval(None);
                builder = builder.server(format!("c{i}"), endpoint);
            }
            let client = builder.build().unwrap();
            let call = async |i: usize| {
                let s = client.server(&format!("c{i}")).unwrap();
                let _: Value = s
                    .execute(netproc_wire::Operation::Invoke {
                        function: "add".into(),
                        args: vec![Value::Int(1), Value::Int(2)],
                    })
                    .await
                    .unwrap();
            };
            call(0).await;
            let before = (rss(), heap());
            for i in 1..=n {
                call(i).await;
            }
            per_connection(before, n)
        };
        // Read by `idle`: resident KiB, heap KiB.
        println!(
            "idle-result {:.1} {:.1}",
            per_conn.0 / 1024.0,
            per_conn.1 / 1024.0
        );
    });
}

/// Live heap bytes of this process.
fn heap() -> i64 {
    let s = ALLOC.stats();
    s.bytes_allocated as i64 - s.bytes_deallocated as i64 + s.bytes_reallocated as i64
}

/// (resident, heap) bytes per connection since `before`.
fn per_connection((rss0, heap0): (u64, i64), n: usize) -> (f64, f64) {
    (
        (rss() - rss0) as f64 / n as f64,
        (heap() - heap0) as f64 / n as f64,
    )
}

/// Runs [`idle_child`] for both systems in child processes, `rounds` times.
fn idle(n: usize, rounds: usize) {
    let exe = std::env::current_exe().unwrap();
    let mut results: std::collections::BTreeMap<&str, Vec<f64>> = Default::default();
    let mut heaps: std::collections::BTreeMap<&str, Vec<f64>> = Default::default();
    for _ in 0..rounds {
        for system in ["raw", "netproc"] {
            let out = std::process::Command::new(&exe)
                .arg("--bench")
                .env("NETPROC_BENCH_IDLE", format!("{system}:{n}"))
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            let fields: Vec<f64> = text
                .lines()
                .find_map(|l| l.strip_prefix("idle-result "))
                .map(|l| l.split(' ').filter_map(|v| v.parse().ok()).collect())
                .unwrap_or_default();
            results
                .entry(system)
                .or_default()
                .push(fields.first().copied().unwrap_or(f64::NAN));
            heaps
                .entry(system)
                .or_default()
                .push(fields.get(1).copied().unwrap_or(f64::NAN));
        }
    }
    let (raw, np) = (
        median(results["raw"].clone()),
        median(results["netproc"].clone()),
    );
    let (raw_heap, np_heap) = (
        median(heaps["raw"].clone()),
        median(heaps["netproc"].clone()),
    );
    println!(
        "idle {n} connections, median: raw {raw:.1} KiB resident, {raw_heap:.1} KiB heap per connection | netproc {np:.1} KiB resident, {np_heap:.1} KiB heap per connection (client and server sides, one process) | netproc − raw {:.1} KiB resident, {:.1} KiB heap",
        np - raw,
        np_heap - raw_heap
    );
}

/// C=4 K=32 and C=1 K=1, raw then netproc, `rounds` times; clients run
/// on `client_rt`, servers were started on `server_rt`.
fn compare(
    layout: &str,
    pki: &TestPki,
    (server, key): (&ServerHandle, &netproc_auth::ApiKey),
    client_rt: &tokio::runtime::Runtime,
    server_rt: &tokio::runtime::Handle,
    (secs, rounds): (f64, usize),
) {
    for (c, k) in [(4usize, 32usize), (1, 1)] {
        let mut raw_runs = Vec::new();
        let mut np_runs = Vec::new();
        for round in 0..rounds {
            let r = client_rt.block_on(run_raw(pki, (c, k, PAYLOAD), secs, server_rt));
            let echo = vec![Value::Bytes(vec![7u8; PAYLOAD].into())];
            let n = client_rt.block_on(run_netproc(pki, server, key, c, k, secs, ("echo", echo)));
            println!(
                "{layout} C={c} K={k} round {round}: raw {:>9.0} calls/s {:>5.1} µs CPU/call {:>5.1} allocs/call p50 {:>6.1} µs | netproc {:>9.0} calls/s {:>5.1} µs CPU/call {:>5.1} allocs/call p50 {:>6.1} µs",
                r.rate(),
                r.cpu_per_call(),
                r.allocs_per_call(),
                r.p50_us,
                n.rate(),
                n.cpu_per_call(),
                n.allocs_per_call(),
                n.p50_us
            );
            raw_runs.push(r);
            np_runs.push(n);
        }
        let m = |runs: &[Run], f: fn(&Run) -> f64| median(runs.iter().map(f).collect());
        let (rr, nr) = (m(&raw_runs, Run::rate), m(&np_runs, Run::rate));
        let (rc, nc) = (
            m(&raw_runs, Run::cpu_per_call),
            m(&np_runs, Run::cpu_per_call),
        );
        let (ra, na) = (
            m(&raw_runs, Run::allocs_per_call),
            m(&np_runs, Run::allocs_per_call),
        );
        println!(
            "{layout} C={c} K={k} median: raw {rr:.0} calls/s, {rc:.1} µs CPU/call, {ra:.1} allocs/call | netproc {nr:.0} calls/s, {nc:.1} µs CPU/call, {na:.1} allocs/call | throughput ratio {:.2}x, CPU/call ratio {:.2}x",
            nr / rr,
            nc / rc
        );
        if k == 1 {
            let (rp, np) = (m(&raw_runs, |r| r.p50_us), m(&np_runs, |r| r.p50_us));
            let (rp99, np99) = (m(&raw_runs, |r| r.p99_us), m(&np_runs, |r| r.p99_us));
            println!(
                "{layout} C={c} K={k} latency: raw p50 {rp:.1} µs p99 {rp99:.1} µs | netproc p50 {np:.1} µs p99 {np99:.1} µs | p50 ratio {:.2}x",
                np / rp
            );
        }
    }
}

fn main() {
    // `cargo test --all-targets` runs benches as tests with `--bench` absent: do nothing then.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    netproc_testkit::bench::count_allocations_with(allocations);
    let secs: f64 = env_or("NETPROC_BENCH_SECS", 5.0);
    let rounds: usize = env_or("NETPROC_BENCH_ROUNDS", 3);
    if let Ok(idle) = std::env::var("NETPROC_BENCH_IDLE") {
        let (system, n) = idle.split_once(':').unwrap_or(("netproc", "500"));
        idle_child(system, n.parse().unwrap_or(500));
        return;
    }
    let pki = TestPki::new();
    // One system alone, one single-threaded runtime, C=4 K=32: for profilers. With
    // `NETPROC_BENCH_CALLS`, instructions per call are the difference of
    // two runs with different counts, divided by the difference in calls.
    if let Ok(only) = std::env::var("NETPROC_BENCH_ONLY") {
        // One thread: the same interleaving run after run, so instruction
        // counts repeat (under valgrind threads run one at a time anyway).
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (server, key) = rt.block_on(start_netproc(&pki));
        let run = match only.as_str() {
            "raw" => rt.block_on(run_raw(&pki, (4, 32, PAYLOAD), secs, rt.handle())),
            _ => {
                let echo = vec![Value::Bytes(vec![7u8; PAYLOAD].into())];
                rt.block_on(run_netproc(
                    &pki,
                    &server,
                    &key,
                    4,
                    32,
                    secs,
                    ("echo", echo),
                ))
            }
        };
        println!(
            "{only} alone C=4 K=32: {} calls, {:.0} calls/s, {:.2} µs CPU/call, {:.2} allocs/call",
            run.calls,
            run.rate(),
            run.cpu_per_call(),
            run.allocs_per_call()
        );
        return;
    }
    // `NETPROC_BENCH_PARTS`: a comma-separated subset of calls, payloads,
    // handshakes, idle, script (default: all).
    let parts = std::env::var("NETPROC_BENCH_PARTS").unwrap_or_default();
    let part = |name: &str| parts.is_empty() || parts.split(',').any(|p| p.trim() == name);
    let rt = runtime();
    let (server, key) = rt.block_on(start_netproc(&pki));
    if part("calls") {
        calls(&pki, (&server, &key), &rt, (secs, rounds));
    }
    if part("payloads") {
        payloads(&pki, (&server, &key), &rt, (secs, rounds));
    }
    if part("handshakes") {
        for round in 0..rounds {
            let (raw, raw_cpu) = rt.block_on(handshakes_raw(&pki, 2, secs));
            let (np, np_cpu) = rt.block_on(handshakes_netproc(&pki, (&server, &key), 2, secs));
            println!(
                "connect + one call, 2 at a time, round {round}: raw {raw:.0}/s {raw_cpu:.0} µs CPU each | netproc (with auth) {np:.0}/s {np_cpu:.0} µs CPU each | ratio {:.2}x",
                np / raw
            );
        }
    }
    if part("idle") {
        idle(500, rounds);
    }
    if part("script") {
        script(&pki, (&server, &key), &rt, (secs, rounds));
    }
    rt.block_on(server.shutdown(Duration::from_secs(1)));
}

/// Both layouts: one runtime for everything, then servers on one runtime
/// and clients on another.
fn calls(
    pki: &TestPki,
    (server, key): (&ServerHandle, &netproc_auth::ApiKey),
    rt: &tokio::runtime::Runtime,
    (secs, rounds): (f64, usize),
) {
    compare(
        "one-runtime",
        pki,
        (server, key),
        rt,
        rt.handle(),
        (secs, rounds),
    );
    // Layout 2: servers on one runtime, clients on another.
    let server_rt = runtime();
    let client_rt = runtime();
    let (server2, key2) = server_rt.block_on(start_netproc(pki));
    compare(
        "two-runtimes",
        pki,
        (&server2, &key2),
        &client_rt,
        server_rt.handle(),
        (secs, rounds),
    );
    server_rt.block_on(server2.shutdown(Duration::from_secs(1)));
}

/// A trivial script function against the same function in Rust.
fn script(
    pki: &TestPki,
    (server, key): (&ServerHandle, &netproc_auth::ApiKey),
    rt: &tokio::runtime::Runtime,
    (secs, rounds): (f64, usize),
) {
    rt.block_on(async {
        // A trivial script function against the same function in Rust.
        let definer = Client::builder()
            .server(
                "s",
                pki.endpoint(&pki.client, server.local_addr(), key),
            )
            .build()
            .unwrap();
        definer
            .server("s")
            .unwrap()
            .define_function("sadd", "fn sadd(a, b) { a + b }")
            .await
            .unwrap();
        let (mut native, mut script) = (Vec::new(), Vec::new());
        let args = vec![Value::Int(20), Value::Int(22)];
        for round in 0..rounds {
            let n = run_netproc(pki, server, key, 4, 32, secs, ("add", args.clone())).await;
            let sc = run_netproc(pki, server, key, 4, 32, secs, ("sadd", args.clone())).await;
            println!(
                "add C=4 K=32 round {round}: native {:>9.0} calls/s {:>6.1} µs CPU/call | script {:>9.0} calls/s {:>6.1} µs CPU/call",
                n.rate(), n.cpu_per_call(), sc.rate(), sc.cpu_per_call()
            );
            native.push(n);
            script.push(sc);
        }
        let m = |runs: &[Run], f: fn(&Run) -> f64| median(runs.iter().map(f).collect());
        println!(
            "add C=4 K=32 median: native {:.0} calls/s, {:.1} µs CPU/call | script {:.0} calls/s, {:.1} µs CPU/call",
            m(&native, Run::rate), m(&native, Run::cpu_per_call), m(&script, Run::rate), m(&script, Run::cpu_per_call)
        );
    });
}
