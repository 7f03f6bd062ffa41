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

use bytes::{Buf, BufMut, BytesMut};
use netproc_auth::{ApiKeyStore, KeySpec, PrivilegeSet};
use netproc_client::Client;
use netproc_server::{CallContext, CallError, ServerHandle};
use netproc_testkit::{TestPki, cpu_micros, env_or, median, percentile};
use netproc_wire::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const PAYLOAD: usize = 64;

#[derive(Debug, Clone, Copy)]
struct Run {
    calls: u64,
    secs: f64,
    cpu_us: u64,
    p50_us: f64,
    p99_us: f64,
    allocs: u64,
}

impl Run {
    fn rate(&self) -> f64 {
        self.calls as f64 / self.secs
    }
    fn cpu_per_call(&self) -> f64 {
        self.cpu_us as f64 / self.calls.max(1) as f64
    }
    fn allocs_per_call(&self) -> f64 {
        self.allocs as f64 / self.calls.max(1) as f64
    }
}

// ---------------------------------------------------------------- raw echo

async fn raw_server(listener: TcpListener, acceptor: tokio_rustls::TlsAcceptor) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            return;
        };
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            let (mut rd, mut wr) = tokio::io::split(tls);
            let mut buf = BytesMut::with_capacity(64 * 1024);
            let mut out = BytesMut::with_capacity(64 * 1024);
            loop {
                match rd.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                while buf.len() >= 4 {
                    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
                    if buf.len() < 4 + len {
                        break;
                    }
                    out.extend_from_slice(&buf[..4 + len]);
                    buf.advance(4 + len);
                }
                if !out.is_empty() {
                    if wr.write_all(&out).await.is_err() || wr.flush().await.is_err() {
                        return;
                    }
                    out.clear();
                }
            }
        });
    }
}

/// One raw connection keeping `k` requests in flight until `stop`.
async fn raw_client_conn(
    addr: std::net::SocketAddr,
    connector: tokio_rustls::TlsConnector,
    k: usize,
    stop: Arc<AtomicBool>,
    calls: Arc<AtomicU64>,
    latencies: Option<Arc<std::sync::Mutex<Vec<u64>>>>,
) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let name = netproc_pki::rustls::ServerName::try_from("localhost").unwrap();
    let tls = connector.connect(name, tcp).await.unwrap();
    let (mut rd, mut wr) = tokio::io::split(tls);
    let frame = |out: &mut BytesMut, id: u64| {
        out.put_u32((8 + PAYLOAD) as u32);
        out.put_u64(id);
        out.put_slice(&[7u8; PAYLOAD]);
    };
    let mut sent_at = std::collections::HashMap::new();
    let mut out = BytesMut::new();
    let mut next_id = 0u64;
    for _ in 0..k {
        sent_at.insert(next_id, Instant::now());
        frame(&mut out, next_id);
        next_id += 1;
    }
    wr.write_all(&out).await.unwrap();
    out.clear();
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut local_lat = Vec::new();
    loop {
        if rd.read_buf(&mut buf).await.unwrap_or(0) == 0 {
            break;
        }
        let mut done = 0;
        while buf.len() >= 4 {
            let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
            if buf.len() < 4 + len {
                break;
            }
            let id = u64::from_be_bytes(buf[4..12].try_into().unwrap());
            if let Some(t) = sent_at.remove(&id)
                && latencies.is_some()
            {
                local_lat.push(t.elapsed().as_nanos() as u64);
            }
            buf.advance(4 + len);
            done += 1;
        }
        calls.fetch_add(done, Ordering::Relaxed);
        if stop.load(Ordering::Relaxed) {
            break;
        }
        for _ in 0..done {
            sent_at.insert(next_id, Instant::now());
            frame(&mut out, next_id);
            next_id += 1;
        }
        if wr.write_all(&out).await.is_err() {
            break;
        }
        out.clear();
    }
    if let Some(l) = latencies {
        l.lock().unwrap().extend(local_lat);
    }
}

async fn run_raw(
    pki: &TestPki,
    c: usize,
    k: usize,
    secs: f64,
    server_rt: &tokio::runtime::Handle,
) -> Run {
    let server_cfg = netproc_pki::server_config(
        &pki.server.identity().unwrap(),
        &pki.ca.trust_anchors(),
        &[],
    )
    .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = server_rt.spawn(raw_server(
        listener,
        tokio_rustls::TlsAcceptor::from(Arc::new(server_cfg)),
    ));
    let client_cfg = netproc_pki::client_config(
        &pki.client.identity().unwrap(),
        &pki.ca.trust_anchors(),
        &[],
    )
    .unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_cfg));
    let stop = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicU64::new(0));
    let lat = (k == 1).then(|| Arc::new(std::sync::Mutex::new(Vec::new())));
    // Warm up the connections before measuring: start, then reset the count.
    let tasks: Vec<_> = (0..c)
        .map(|_| {
            tokio::spawn(raw_client_conn(
                addr,
                connector.clone(),
                k,
                stop.clone(),
                calls.clone(),
                lat.clone(),
            ))
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    if let Some(l) = &lat {
        l.lock().unwrap().clear();
    }
    let (start_calls, start_cpu, start, start_allocs) = (
        calls.load(Ordering::Relaxed),
        cpu_micros(),
        Instant::now(),
        allocations(),
    );
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    let (end_calls, end_cpu, elapsed, end_allocs) = (
        calls.load(Ordering::Relaxed),
        cpu_micros(),
        start.elapsed(),
        allocations(),
    );
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    server.abort();
    let mut sorted = lat
        .map(|l| std::mem::take(&mut *l.lock().unwrap()))
        .unwrap_or_default();
    sorted.sort_unstable();
    Run {
        calls: end_calls - start_calls,
        secs: elapsed.as_secs_f64(),
        cpu_us: end_cpu - start_cpu,
        p50_us: percentile(&sorted, 0.5),
        p99_us: percentile(&sorted, 0.99),
        allocs: (end_allocs - start_allocs) as u64,
    }
}

// ---------------------------------------------------------------- netproc

async fn start_netproc(pki: &TestPki) -> (ServerHandle, netproc_auth::ApiKey) {
    let keys = Arc::new(ApiKeyStore::in_memory());
    let (_, key) = keys.create(KeySpec::new(PrivilegeSet::all())).unwrap();
    // The reference's request buckets allow 200 calls/s per connection:
    // raise them out of the way, as a load test must.
    let server = pki
        .server_builder("bench", keys)
        .options(netproc_testkit::unlimited())
        .function("add", |_: CallContext, (a, b): (i64, i64)| async move {
            Ok::<_, CallError>(a + b)
        })
        .scripts(netproc_script::ScriptRuntime::builder().build())
        .function("echo", |_: CallContext, (v,): (Value,)| async move {
            Ok::<_, CallError>(v)
        })
        .start()
        .await
        .unwrap();
    (server, key)
}

async fn run_netproc(
    pki: &TestPki,
    server: &ServerHandle,
    key: &netproc_auth::ApiKey,
    c: usize,
    k: usize,
    secs: f64,
    (function, args): (&'static str, Vec<Value>),
) -> Run {
    // One server name per connection: the client keeps one connection per name.
    let mut builder = Client::builder();
    for i in 0..c {
        builder = builder.server(
            format!("c{i}"),
            pki.endpoint(&pki.client, server.local_addr(), key),
        );
    }
    let client = builder.build().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicU64::new(0));
    let lat = (k == 1).then(|| Arc::new(std::sync::Mutex::new(Vec::new())));
    let mut tasks = Vec::new();
    for i in 0..c {
        let s = client.server(&format!("c{i}")).unwrap();
        s.session().await.unwrap();
        for _ in 0..k {
            let (s, stop, calls, lat, args) = (
                s.clone(),
                stop.clone(),
                calls.clone(),
                lat.clone(),
                args.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let mut local = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    let op = netproc_wire::Operation::Invoke {
                        function: function.to_owned(),
                        args: args.clone(),
                    };
                    let _: Value = s.execute(op).await.expect("bench call");
                    if lat.is_some() {
                        local.push(t.elapsed().as_nanos() as u64);
                    }
                    calls.fetch_add(1, Ordering::Relaxed);
                }
                if let Some(l) = lat {
                    l.lock().unwrap().extend(local);
                }
            }));
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    if let Some(l) = &lat {
        l.lock().unwrap().clear();
    }
    let (start_calls, start_cpu, start, start_allocs) = (
        calls.load(Ordering::Relaxed),
        cpu_micros(),
        Instant::now(),
        allocations(),
    );
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    let (end_calls, end_cpu, elapsed, end_allocs) = (
        calls.load(Ordering::Relaxed),
        cpu_micros(),
        start.elapsed(),
        allocations(),
    );
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    let mut sorted = lat
        .map(|l| std::mem::take(&mut *l.lock().unwrap()))
        .unwrap_or_default();
    sorted.sort_unstable();
    Run {
        calls: end_calls - start_calls,
        secs: elapsed.as_secs_f64(),
        cpu_us: end_cpu - start_cpu,
        p50_us: percentile(&sorted, 0.5),
        p99_us: percentile(&sorted, 0.99),
        allocs: (end_allocs - start_allocs) as u64,
    }
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
            let r = client_rt.block_on(run_raw(pki, c, k, secs, server_rt));
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
    let secs: f64 = env_or("NETPROC_BENCH_SECS", 5.0);
    let rounds: usize = env_or("NETPROC_BENCH_ROUNDS", 3);
    let runtime = || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    };
    let pki = TestPki::new();
    // Layout 1: one runtime for everything.
    let rt = runtime();
    let (server, key) = rt.block_on(start_netproc(&pki));
    compare(
        "one-runtime",
        &pki,
        (&server, &key),
        &rt,
        rt.handle(),
        (secs, rounds),
    );
    // Layout 2: servers on one runtime, clients on another.
    let server_rt = runtime();
    let client_rt = runtime();
    let (server2, key2) = server_rt.block_on(start_netproc(&pki));
    compare(
        "two-runtimes",
        &pki,
        (&server2, &key2),
        &client_rt,
        server_rt.handle(),
        (secs, rounds),
    );
    server_rt.block_on(server2.shutdown(Duration::from_secs(1)));
    rt.block_on(async {
        // A trivial script function against the same function in Rust.
        let definer = Client::builder()
            .server(
                "s",
                pki.endpoint(&pki.client, server.local_addr(), &key),
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
            let n = run_netproc(&pki, &server, &key, 4, 32, secs, ("add", args.clone())).await;
            let sc = run_netproc(&pki, &server, &key, 4, 32, secs, ("sadd", args.clone())).await;
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
        server.shutdown(Duration::from_secs(1)).await;
    });
}
