//! The authority's store: changes committed per second with group commit,
//! SQLite against PostgreSQL in the same run (rounds alternated, medians).
//!
//! Two kinds of change, each its own figure: updates (a privilege change
//! of an existing id — every change after the first) and creates (a new
//! API key id: insert-if-absent and a generated secret).
//!
//! `cargo bench -p netproc-propagation --bench store` (PostgreSQL at
//! `NETPROC_TEST_POSTGRES_URL`, default `postgres://postgres@127.0.0.1:5432/test`;
//! SQLite only, with a line, when absent). `NETPROC_BENCH_SECS` (default
//! 3), `NETPROC_BENCH_ROUNDS` (default 3), `NETPROC_BENCH_TASKS` (callers
//! at once, default 64).
//!
//! Then failover on PostgreSQL: two processes of one authority (1 s lease,
//! `NETPROC_BENCH_FAILOVERS` times, default 10): the leader stops without
//! releasing its lease (as a killed process would), and the time until the
//! standby holds it is measured; p50 and p99.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use netproc_pki::Ed25519Key;
use netproc_propagation::{
    Authority, AuthorityConfig, CredentialSpec, LocalTransport, PostgresOptions, Transport,
};
use netproc_testkit::{env_or, median, postgres_or_skip};

/// Changes per second by `tasks` callers for `secs`: updates of the ids
/// `k{task}-{0..100}` (made before), or with `create = Some(round)` new
/// ids.
async fn changes_per_second(
    authority: Arc<Authority>,
    tasks: usize,
    secs: f64,
    create: Option<usize>,
) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut handles = Vec::new();
    for t in 0..tasks {
        let (authority, stop, done) = (Arc::clone(&authority), stop.clone(), done.clone());
        handles.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let id = match create {
                    Some(round) => format!("n{round}-{t}-{i}"),
                    None => format!("k{t}-{}", i % 100),
                };
                // Every ensure is a real change: a new expiry each time.
                static VERSION: AtomicU64 = AtomicU64::new(0);
                let expires = std::time::UNIX_EPOCH
                    + Duration::from_secs(4_000_000_000 + VERSION.fetch_add(1, Ordering::Relaxed));
                let key = netproc_auth::KeySpec::new(
                    "invoke_functions"
                        .parse::<netproc_auth::PrivilegeSet>()
                        .unwrap(),
                )
                .expires_at(expires);
                let made = authority
                    .ensure(CredentialSpec::api_key(&id, key), &["a", "b", "c"])
                    .await
                    .unwrap();
                assert!(made.changed);
                done.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (n0, t0) = (done.load(Ordering::Relaxed), Instant::now());
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    let rate = (done.load(Ordering::Relaxed) - n0) as f64 / t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        let _ = h.await;
    }
    rate
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let secs: f64 = env_or("NETPROC_BENCH_SECS", 3.0);
    let rounds: usize = env_or("NETPROC_BENCH_ROUNDS", 3);
    let tasks: usize = env_or("NETPROC_BENCH_TASKS", 64);
    let rt = netproc_testkit::bench::runtime();
    rt.block_on(async {
        let targets = vec!["a".to_owned(), "b".to_owned(), "c".to_owned()];
        let transport: Arc<dyn Transport> = Arc::new(LocalTransport::new());
        let dir = tempfile::tempdir().unwrap();
        let sqlite = Arc::new(
            Authority::open(
                AuthorityConfig::new(dir.path().join("a.db"), targets.clone()),
                Ed25519Key::generate().unwrap(),
                Arc::clone(&transport),
            )
            .unwrap(),
        );
        let pg_url = postgres_or_skip("store bench").await;
        let schema = format!("np_bench_{}", std::process::id());
        let pg = pg_url.as_ref().map(|url| {
            let mut o = PostgresOptions::new(url.clone());
            o.schema = Some(schema.clone());
            let mut config = AuthorityConfig::new("unused", targets.clone());
            config.postgres = Some(o);
            Arc::new(
                Authority::open(config, Ed25519Key::generate().unwrap(), Arc::clone(&transport))
                    .unwrap(),
            )
        });
        // The ids the updates change, made first (not timed).
        for authority in std::iter::once(&sqlite).chain(pg.as_ref()) {
            for t in 0..tasks {
                for j in 0..100 {
                    let spec = CredentialSpec::api_key(
                        format!("k{t}-{j}"),
                        "admin_privileges".parse::<netproc_auth::PrivilegeSet>().unwrap(),
                    );
                    authority.ensure(spec, &["a", "b", "c"]).await.unwrap();
                }
            }
        }
        let mut figures: [Vec<f64>; 4] = Default::default();
        for round in 0..rounds {
            let mut line = Vec::new();
            for (k, create) in [None, Some(round)].into_iter().enumerate() {
                let l = changes_per_second(Arc::clone(&sqlite), tasks, secs, create).await;
                let p = match &pg {
                    Some(pg) => changes_per_second(Arc::clone(pg), tasks, secs, create).await,
                    None => 0.0,
                };
                figures[2 * k].push(l);
                figures[2 * k + 1].push(p);
                let what = if create.is_some() { "creates" } else { "updates" };
                line.push(format!("{what}: SQLite {l:.0}/s, PostgreSQL {p:.0}/s"));
            }
            println!("round {round}: {} ({tasks} callers, 3 targets each)", line.join(" | "));
        }
        let [lu, pu, lc, pc] = figures.map(median);
        println!(
            "median: updates: SQLite {lu:.0}/s, PostgreSQL {pu:.0}/s | creates: SQLite {lc:.0}/s, PostgreSQL {pc:.0}/s"
        );
        if let Some(url) = &pg_url {
            let failovers: usize = env_or("NETPROC_BENCH_FAILOVERS", 10);
            let mut times = Vec::new();
            let mut o = PostgresOptions::new(url.clone());
            o.schema = Some(format!("{schema}_failover"));
            let process = || {
                let mut config = AuthorityConfig::new("unused", targets.clone());
                config.postgres = Some(o.clone());
                config.lease = Duration::from_secs(1);
                config.poll_interval = Duration::from_millis(10);
                Authority::open(config, Ed25519Key::generate().unwrap(), Arc::clone(&transport))
                    .unwrap()
            };
            let mut leader = process();
            let (mut stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let l = leader.clone();
            let mut task = tokio::spawn(async move { l.run(async { let _ = stopped.await; }).await });
            for _ in 0..failovers {
                // Wait for the current leader to hold the lease.
                while leader.leader().await.unwrap().is_none_or(|i| i.expires_ms < netproc_wire::unix_ms(std::time::SystemTime::now())) {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                let before = leader.leader().await.unwrap().unwrap();
                let standby = process();
                let (next_stop, next_stopped) = tokio::sync::oneshot::channel::<()>();
                let s = standby.clone();
                let next_task = tokio::spawn(async move { s.run(async { let _ = next_stopped.await; }).await });
                // The leader dies: its lease is not released.
                let t0 = Instant::now();
                let _ = stop.send(());
                let _ = task.await;
                loop {
                    if let Some(now) = standby.leader().await.unwrap()
                        && now.epoch > before.epoch
                    {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                times.push(t0.elapsed().as_nanos() as u64);
                (leader, stop, task) = (standby, next_stop, next_task);
            }
            let _ = stop.send(());
            let _ = task.await;
            times.sort_unstable();
            println!(
                "failover (1 s lease) over {}: p50 {:.0} ms, p99 {:.0} ms",
                times.len(),
                netproc_testkit::percentile(&times, 0.5) / 1000.0,
                netproc_testkit::percentile(&times, 0.99) / 1000.0
            );
        }
        if let Some(url) = pg_url {
            let _ = std::thread::spawn(move || {
                if let Ok(mut c) = postgres::Client::connect(&url, postgres::NoTls) {
                    let _ = c.batch_execute(&format!(
                        "DROP SCHEMA IF EXISTS {schema} CASCADE; DROP SCHEMA IF EXISTS {schema}_failover CASCADE"
                    ));
                }
            })
            .join();
        }
    });
}
