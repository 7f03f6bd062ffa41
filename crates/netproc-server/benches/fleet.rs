//! Shared limits on Redis (docs/fleet.md): what they cost, whether they
//! hold, and how fast a block reaches the fleet.
//!
//! `cargo bench -p netproc-server --bench fleet` (needs Redis at
//! `NETPROC_TEST_REDIS_URL`, default `redis://127.0.0.1:6379`; prints a skip
//! line otherwise). `NETPROC_BENCH_SECS` (default 3), `NETPROC_BENCH_ROUNDS`
//! (default 3).
//!
//! 1. Cost: C=4 K=32 echo calls against a server with local limits and one
//!    with the same limits shared (far above the load), alternated; calls/s,
//!    CPU per call, and Redis script calls per 1,000 calls.
//! 2. Correctness under load: three servers, a per-key budget that bites,
//!    calls spread over the three; achieved against allowed.
//! 3. Block propagation: a key blocked by failures on one server, the
//!    delay until another refuses it; p50 and p99.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use netproc_auth::{ApiKeyStore, KeySpec, PrivilegeSet};
use netproc_client::{Client, ClientError};
use netproc_server::{CallContext, CallError, ServerHandle, ServerOptions, SharedLimits};
use netproc_testkit::{TestPki, cpu_micros, env_or, median, percentile, redis_or_skip};
use netproc_wire::{SecretString, Value};

async fn script_calls(url: &str) -> u64 {
    let client = redis::Client::open(url).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await
        .unwrap();
    info.lines()
        .filter(|l| l.starts_with("cmdstat_evalsha:") || l.starts_with("cmdstat_eval:"))
        .filter_map(|l| {
            l.split("calls=")
                .nth(1)?
                .split(',')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

async fn cleanup(url: &str, fleet: &str) {
    let client = redis::Client::open(url).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("netproc:{fleet}:*"))
        .query_async(&mut conn)
        .await
        .unwrap_or_default();
    if !keys.is_empty() {
        let _: redis::RedisResult<()> = redis::cmd("DEL").arg(&keys).query_async(&mut conn).await;
    }
}

fn limited(per_key: (u32, u32)) -> ServerOptions {
    let mut o = netproc_testkit::unlimited();
    let b = &mut o.request_controls.per_api_key;
    b.enabled = true;
    b.tokens_per_interval = per_key.0;
    b.interval_ms = 1000;
    b.burst_tokens = per_key.1;
    o
}

async fn server(
    pki: &TestPki,
    keys: &Arc<ApiKeyStore>,
    o: ServerOptions,
    shared: Option<SharedLimits>,
) -> ServerHandle {
    let mut b = pki
        .server_builder("bench", Arc::clone(keys))
        .options(o)
        .function("echo", |_: CallContext, (v,): (Value,)| async move {
            Ok::<_, CallError>(v)
        });
    let wait = shared.is_some();
    if let Some(s) = shared {
        b = b.shared_limits(s);
    }
    let s = b.start().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while wait && s.abuse_metrics().shared_limits_connected == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    s
}

/// Echo calls at C connections × K in flight for `secs`: (ok, refused, CPU µs).
async fn load(
    pki: &TestPki,
    servers: &[&ServerHandle],
    key: &SecretString,
    c: usize,
    k: usize,
    secs: f64,
) -> (u64, u64, u64, f64) {
    let mut builder = Client::builder();
    for i in 0..c {
        let s = servers[i % servers.len()];
        builder = builder.server(
            format!("c{i}"),
            netproc_client::ServerEndpoint::new(
                s.local_addr(),
                "localhost",
                pki.client.identity().unwrap(),
                pki.ca.trust_anchors(),
                key.clone(),
            ),
        );
    }
    let client = builder.build().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, refused) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut tasks = Vec::new();
    for i in 0..c {
        let s = client.server(&format!("c{i}")).unwrap();
        s.session().await.unwrap();
        for _ in 0..k {
            let (s, stop, ok, refused) = (s.clone(), stop.clone(), ok.clone(), refused.clone());
            tasks.push(tokio::spawn(async move {
                let args = vec![Value::Bytes(vec![7u8; 64].into())];
                while !stop.load(Ordering::Relaxed) {
                    let op = netproc_wire::Operation::Invoke {
                        function: "echo".into(),
                        args: args.clone(),
                    };
                    match s.execute(op).await {
                        Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(ClientError::RateLimited { .. }) => {
                            refused.fetch_add(1, Ordering::Relaxed)
                        }
                        Err(e) => panic!("{e:?}"),
                    };
                }
            }));
        }
    }
    let (cpu0, t0) = (cpu_micros(), Instant::now());
    let (ok0, ref0) = (ok.load(Ordering::Relaxed), refused.load(Ordering::Relaxed));
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    let elapsed = t0.elapsed().as_secs_f64();
    let (ok1, ref1, cpu1) = (
        ok.load(Ordering::Relaxed),
        refused.load(Ordering::Relaxed),
        cpu_micros(),
    );
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    (ok1 - ok0, ref1 - ref0, cpu1 - cpu0, elapsed)
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let secs: f64 = env_or("NETPROC_BENCH_SECS", 3.0);
    let rounds: usize = env_or("NETPROC_BENCH_ROUNDS", 3);
    let rt = netproc_testkit::bench::runtime();
    rt.block_on(async {
        let Some(url) = redis_or_skip("fleet bench").await else { return };
        let fleet = format!("bench-{}", std::process::id());
        let pki = TestPki::new();
        let keys = Arc::new(ApiKeyStore::in_memory());
        let (_, key) = keys.create(KeySpec::new(PrivilegeSet::all())).unwrap();
        let secret = key.to_secret();

        // 1. The cost, limits far above the load.
        let far = limited((100_000_000, 100_000_000));
        let local = server(&pki, &keys, far.clone(), None).await;
        let shared = server(&pki, &keys, far, Some(SharedLimits::new(&url, &fleet))).await;
        let (mut lr, mut sr, mut lc, mut sc, mut trips) = (vec![], vec![], vec![], vec![], vec![]);
        for round in 0..rounds {
            let (ok, _, cpu, t) = load(&pki, &[&local], &secret, 4, 32, secs).await;
            lr.push(ok as f64 / t);
            lc.push(cpu as f64 / ok.max(1) as f64);
            let before = script_calls(&url).await;
            let (ok2, refused2, cpu2, t2) = load(&pki, &[&shared], &secret, 4, 32, secs).await;
            if refused2 > 0 {
                println!("  (shared: {refused2} calls refused: the limits were meant to be far above the load)");
            }
            let after = script_calls(&url).await;
            sr.push(ok2 as f64 / t2);
            sc.push(cpu2 as f64 / ok2.max(1) as f64);
            trips.push((after - before) as f64 * 1000.0 / ok2.max(1) as f64);
            println!(
                "cost round {round}: local {:>9.0} calls/s {:>5.1} µs CPU/call | shared {:>9.0} calls/s {:>5.1} µs CPU/call, {:.2} Redis scripts per 1,000 calls",
                lr[round], lc[round], sr[round], sc[round], trips[round]
            );
        }
        let (l, s) = (median(lr), median(sr));
        println!(
            "cost median (C=4 K=32): local {l:.0} calls/s, {:.1} µs CPU/call | shared {s:.0} calls/s, {:.1} µs CPU/call | ratio {:.2}x | {:.2} Redis scripts per 1,000 calls",
            median(lc), median(sc), s / l, median(trips)
        );
        drop((local, shared));
        cleanup(&url, &fleet).await;

        // 2. A budget that bites, over three servers.
        let (rate, burst) = (2_000u32, 4_000u32);
        let fleet2 = format!("{fleet}-bite");
        let mut three = Vec::new();
        for _ in 0..3 {
            three.push(server(&pki, &keys, limited((rate, burst)), Some(SharedLimits::new(&url, &fleet2))).await);
        }
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let refs: Vec<&ServerHandle> = three.iter().collect();
        let t0 = Instant::now();
        let (ok, refused, _, _) = load(&pki, &refs, &secret, 6, 8, secs).await;
        let elapsed = t0.elapsed().as_secs_f64();
        let allowed = f64::from(burst) + f64::from(rate) * elapsed;
        println!(
            "bite: {ok} ok, {refused} refused in {elapsed:.2} s over 3 servers; allowed {allowed:.0} (+ bound {:.0}); achieved/allowed {:.3}",
            0.05 * f64::from(burst),
            ok as f64 / allowed
        );
        drop(three);
        cleanup(&url, &fleet2).await;

        // 3. Block propagation: failures on A, refused on B.
        let fleet3 = format!("{fleet}-blocks");
        let mut o = netproc_testkit::unlimited();
        o.auth_controls.enable_blocklist = true;
        o.auth_controls.max_failed_auth_per_api_key_per_window = 1;
        o.auth_controls.max_failed_auth_per_ip_per_window = 1_000_000;
        let a = server(&pki, &keys, o.clone(), Some(SharedLimits::new(&url, &fleet3))).await;
        let b = server(&pki, &keys, o, Some(SharedLimits::new(&url, &fleet3))).await;
        let mut delays = Vec::new();
        for _ in 0..50 {
            let (info, _) = keys.create(KeySpec::new(PrivilegeSet::all())).unwrap();
            let before = b.abuse_metrics().blocked_api_key_count;
            let wrong = SecretString::new(format!("npk_{}_{}", info.id, "Z".repeat(32)));
            let c = Client::builder()
                .server("a", netproc_client::ServerEndpoint::new(a.local_addr(), "localhost", pki.client.identity().unwrap(), pki.ca.trust_anchors(), wrong))
                .build()
                .unwrap();
            let _ = c.server("a").unwrap().session().await;
            let t = Instant::now();
            while b.abuse_metrics().blocked_api_key_count <= before && t.elapsed() < Duration::from_secs(5) {
                tokio::task::yield_now().await;
            }
            delays.push(t.elapsed().as_nanos() as u64);
        }
        delays.sort_unstable();
        println!(
            "block propagation A -> B over {} blocks: p50 {:.0} µs, p99 {:.0} µs",
            delays.len(),
            percentile(&delays, 0.5),
            percentile(&delays, 0.99)
        );
        drop((a, b));
        cleanup(&url, &fleet3).await;
    });
}
