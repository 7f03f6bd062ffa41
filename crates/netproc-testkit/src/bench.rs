//! Bench scaffolding shared by the `rpc` bench and the peers comparison
//! (`benches/peers`): a raw tokio-rustls length-prefixed echo (the floor),
//! a netproc echo server and the load loops that drive both, measured the
//! same way (calls/s, process CPU per call, allocations per call, latency
//! percentiles).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, BytesMut};
use netproc_auth::{ApiKeyStore, KeySpec, PrivilegeSet};
use netproc_client::Client;
use netproc_server::{CallContext, CallError, ServerBuilder, ServerHandle};
use netproc_wire::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::{TestPki, cpu_micros, percentile};

/// The payload of the small-call runs, bytes.
pub const PAYLOAD: usize = 64;
/// The frame limit of both sides, for the large-payload runs.
pub const BIG_FRAME: u32 = 4 * 1024 * 1024;

static ALLOCATIONS: OnceLock<fn() -> usize> = OnceLock::new();

/// Sets the allocation counter of the bench binary (its global allocator:
/// `stats_alloc`); without one, allocations read as zero.
pub fn count_allocations_with(counter: fn() -> usize) {
    let _ = ALLOCATIONS.set(counter);
}

fn allocations() -> usize {
    ALLOCATIONS.get().map_or(0, |f| f())
}

/// One measured window.
#[derive(Debug, Clone, Copy)]
pub struct Run {
    /// Calls completed in the window.
    pub calls: u64,
    /// The window, seconds.
    pub secs: f64,
    /// Process CPU time in the window, µs.
    pub cpu_us: u64,
    /// Median latency, µs (K=1 runs only).
    pub p50_us: f64,
    /// 99th percentile latency, µs (K=1 runs only).
    pub p99_us: f64,
    /// Allocations in the window (whole process).
    pub allocs: u64,
}

impl Run {
    /// Calls per second.
    pub fn rate(&self) -> f64 {
        self.calls as f64 / self.secs
    }
    /// Process CPU µs per call.
    pub fn cpu_per_call(&self) -> f64 {
        self.cpu_us as f64 / self.calls.max(1) as f64
    }
    /// Allocations per call.
    pub fn allocs_per_call(&self) -> f64 {
        self.allocs as f64 / self.calls.max(1) as f64
    }
}

fn fixed_calls() -> Option<u64> {
    std::env::var("NETPROC_BENCH_CALLS")
        .ok()
        .and_then(|v| v.parse().ok())
}

/// The measured window: `secs`, or with `NETPROC_BENCH_CALLS` set, until
/// that many calls have completed (a fixed amount of work, for counting
/// instructions under callgrind).
pub async fn window(secs: f64, calls: &AtomicU64, start: u64) {
    match fixed_calls() {
        None => tokio::time::sleep(Duration::from_secs_f64(secs)).await,
        Some(n) => {
            while calls.load(Ordering::Relaxed) - start < n {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }
}

// ---------------------------------------------------------------- raw echo

/// The raw echo server: frames back as they come, one write per read.
pub async fn raw_server(listener: TcpListener, acceptor: tokio_rustls::TlsAcceptor) {
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
    (k, payload): (usize, usize),
    stop: Arc<AtomicBool>,
    calls: Arc<AtomicU64>,
    latencies: Option<Arc<std::sync::Mutex<Vec<u64>>>>,
) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let name = netproc_pki::rustls::ServerName::try_from("localhost").unwrap();
    let tls = connector.connect(name, tcp).await.unwrap();
    let (mut rd, mut wr) = tokio::io::split(tls);
    let body = vec![7u8; payload];
    let frame = |out: &mut BytesMut, id: u64| {
        out.put_u32((8 + payload) as u32);
        out.put_u64(id);
        out.put_slice(&body);
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

/// A 2-thread multi-thread runtime, the benches' unit of layout.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Starts the raw echo server on `server_rt`: its address, a connector
/// with the client certificate, and its task (abort it when done).
pub async fn raw_echo(
    pki: &TestPki,
    server_rt: &tokio::runtime::Handle,
) -> (
    std::net::SocketAddr,
    tokio_rustls::TlsConnector,
    tokio::task::JoinHandle<()>,
) {
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
    (
        addr,
        tokio_rustls::TlsConnector::from(Arc::new(client_cfg)),
        server,
    )
}

/// What load loops share: when to stop, the count of completed calls and,
/// for K=1 runs, each call's latency in ns.
#[derive(Debug)]
pub struct Load {
    /// Set to end the loops.
    pub stop: Arc<AtomicBool>,
    /// Calls completed.
    pub calls: Arc<AtomicU64>,
    /// Latencies (K=1 only): each loop adds its own at the end.
    pub latencies: Option<Arc<std::sync::Mutex<Vec<u64>>>>,
}

impl Load {
    /// For loops with `k` calls in flight per connection.
    pub fn new(k: usize) -> Load {
        Load {
            stop: Arc::new(AtomicBool::new(false)),
            calls: Arc::new(AtomicU64::new(0)),
            latencies: (k == 1).then(|| Arc::new(std::sync::Mutex::new(Vec::new()))),
        }
    }

    /// Spawns one caller: `call` after `call` until stopped, each counted
    /// (and timed, for K=1 runs). The caller's `state` (its client, its
    /// arguments) goes into each call and comes back out of it, so nothing
    /// is cloned per call that the loop would not clone by hand.
    pub fn spawn_caller<S, F, Fut>(&self, state: S, call: F) -> tokio::task::JoinHandle<()>
    where
        S: Send + 'static,
        F: Fn(S) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = S> + Send,
    {
        let (stop, calls, lat) = (
            self.stop.clone(),
            self.calls.clone(),
            self.latencies.clone(),
        );
        tokio::spawn(async move {
            let mut local = Vec::new();
            let mut state = state;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                state = call(state).await;
                if lat.is_some() {
                    local.push(t.elapsed().as_nanos() as u64);
                }
                calls.fetch_add(1, Ordering::Relaxed);
            }
            if let Some(l) = lat {
                l.lock().unwrap().extend(local);
            }
        })
    }

    /// Warms up 300 ms, measures one [`window`], stops the loops (`tasks`)
    /// and waits for them.
    pub async fn measure(self, secs: f64, tasks: Vec<tokio::task::JoinHandle<()>>) -> Run {
        // A fixed amount of work (`NETPROC_BENCH_CALLS`) counts from the
        // first call: no warm-up, whose length would vary between runs.
        if fixed_calls().is_none() {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        if let Some(l) = &self.latencies {
            l.lock().unwrap().clear();
        }
        let calls = &self.calls;
        let (start_calls, start_cpu, start, start_allocs) = (
            calls.load(Ordering::Relaxed),
            cpu_micros(),
            Instant::now(),
            allocations(),
        );
        window(secs, calls, start_calls).await;
        let (end_calls, end_cpu, elapsed, end_allocs) = (
            calls.load(Ordering::Relaxed),
            cpu_micros(),
            start.elapsed(),
            allocations(),
        );
        self.stop.store(true, Ordering::Relaxed);
        for t in tasks {
            let _ = t.await;
        }
        let mut sorted = self
            .latencies
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
}

/// `c` raw connections with `k` requests of `payload` bytes in flight
/// each, for `secs`; the server runs on `server_rt`.
pub async fn run_raw(
    pki: &TestPki,
    (c, k, payload): (usize, usize, usize),
    secs: f64,
    server_rt: &tokio::runtime::Handle,
) -> Run {
    let (addr, connector, server) = raw_echo(pki, server_rt).await;
    let load = Load::new(k);
    let tasks: Vec<_> = (0..c)
        .map(|_| {
            tokio::spawn(raw_client_conn(
                addr,
                connector.clone(),
                (k, payload),
                load.stop.clone(),
                load.calls.clone(),
                load.latencies.clone(),
            ))
        })
        .collect();
    let run = load.measure(secs, tasks).await;
    server.abort();
    run
}

// ---------------------------------------------------------------- netproc

/// A bench server: every limit that a load test would trip raised out of
/// the way (request buckets, new connections, pending authentications),
/// frames up to [`BIG_FRAME`], and two functions: `add(i64, i64)` and
/// `echo(value)`. Returns the builder (add more, then `start`) and an
/// API key with every privilege.
pub fn bench_server(pki: &TestPki) -> (ServerBuilder, netproc_auth::ApiKey) {
    let keys = Arc::new(ApiKeyStore::in_memory());
    let (_, key) = keys.create(KeySpec::new(PrivilegeSet::all())).unwrap();
    // The reference's request buckets allow 200 calls/s per connection:
    // raise them out of the way, as a load test must.
    let mut options = crate::unlimited();
    // Room for the 1 MiB payloads.
    options.connection_controls.max_post_auth_frame_bytes = BIG_FRAME;
    options.session_controls.max_outbound_bytes_per_connection = 2 * BIG_FRAME;
    // The handshake and idle-memory runs open connections as fast as they can.
    options
        .connection_controls
        .global_max_new_connections_per_window = 1 << 30;
    options
        .connection_controls
        .per_ip_max_new_connections_per_window = 1 << 30;
    options
        .auth_controls
        .max_pending_auth_attempts_per_ip_per_window = 1 << 30;
    let builder = pki
        .server_builder("bench", keys)
        .options(options)
        .function("add", |_: CallContext, (a, b): (i64, i64)| async move {
            Ok::<_, CallError>(a + b)
        })
        .function("echo", |_: CallContext, (v,): (Value,)| async move {
            Ok::<_, CallError>(v)
        });
    (builder, key)
}

/// `c` netproc connections with `k` calls of `function(args)` in flight
/// each, for `secs`.
pub async fn run_netproc(
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
        let mut endpoint = pki.endpoint(&pki.client, server.local_addr(), key);
        endpoint.max_frame_bytes = BIG_FRAME;
        builder = builder.server(format!("c{i}"), endpoint);
    }
    let client = builder.build().unwrap();
    let load = Load::new(k);
    let mut tasks = Vec::new();
    for i in 0..c {
        let s = client.server(&format!("c{i}")).unwrap();
        s.session().await.unwrap();
        for _ in 0..k {
            let state = (s.clone(), args.clone());
            tasks.push(load.spawn_caller(state, move |(s, args)| async move {
                let op = netproc_wire::Operation::Invoke {
                    function: function.to_owned(),
                    args: args.clone(),
                };
                let _: Value = s.execute(op).await.expect("bench call");
                (s, args)
            }));
        }
    }
    load.measure(secs, tasks).await
}
