//! Propagation benchmark: time from `rotate` to every target `success`
//! (20 netproc servers in this process, real TLS on 127.0.0.1), and events
//! per second to one target — over TLS, and in-process as the baseline
//! measured in the same run.
//!
//! With RabbitMQ at `NETPROC_TEST_AMQP_URL` (default
//! `amqp://guest:guest@127.0.0.1:5672/%2f`), the same two measures through
//! the broker (20 more targets consuming their queues), alternated with
//! TLS.
//!
//! `cargo bench -p netproc-propagation --bench propagation`
//! (`NETPROC_BENCH_ROUNDS`, default 20 rotations; `NETPROC_BENCH_EVENTS`,
//! default 20 000 events per throughput run).

use std::sync::Arc;
use std::time::{Duration, Instant};

use netproc_auth::{ApiKeyStore, KeySpec};
use netproc_client::Client;
use netproc_pki::Ed25519Key;
use netproc_propagation::{
    Authority, AuthorityConfig, CredentialSpec, DeliveryState, LocalTransport, NetprocTransport,
    PropagationTarget, TargetConfig, Transport,
};
use netproc_server::ServerHandle;
use netproc_testkit::{TestPki, cpu_micros, env_or, median};

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

struct Fleet {
    _servers: Vec<ServerHandle>,
    targets: Vec<Arc<PropagationTarget>>,
    client: Client,
    names: Vec<String>,
}

async fn fleet(n: usize, dir: &std::path::Path, trusted: [u8; 32]) -> Fleet {
    let pki = TestPki::new();
    let authority_cert = pki.client_cert("authority");
    let mut servers = Vec::new();
    let mut targets = Vec::new();
    let mut names = Vec::new();
    let mut client = Client::builder();
    for i in 0..n {
        let name = format!("t{i}");
        let state = dir.join(&name);
        std::fs::create_dir_all(&state).unwrap();
        let keys = Arc::new(ApiKeyStore::in_memory());
        let (_, key) = keys
            .create(KeySpec::new("receive_credentials".parse().unwrap()))
            .unwrap();
        let db = netproc_server::StateDatabase::open(&state).unwrap();
        let target = PropagationTarget::open(
            TargetConfig::new(&name, vec![trusted]),
            Arc::clone(&keys),
            &db,
        )
        .unwrap();
        let builder = pki.server_builder(&name, Arc::clone(&keys)).state(db);
        let server = target.install(builder).start().await.unwrap();
        server.follow_key_store(&keys);
        client = client.server(
            &name,
            pki.endpoint(&authority_cert, server.local_addr(), &key),
        );
        servers.push(server);
        targets.push(target);
        names.push(name);
    }
    Fleet {
        _servers: servers,
        targets,
        client: client.build().unwrap(),
        names,
    }
}

fn authority(
    dir: &std::path::Path,
    db: &str,
    key: Ed25519Key,
    names: &[String],
    transport: Arc<dyn Transport>,
) -> Authority {
    let config = AuthorityConfig::new(dir.join(db), names.to_vec());
    Authority::open(config, key, transport).unwrap()
}

async fn all_success(a: &Authority, id: &str) -> bool {
    a.status(id)
        .await
        .unwrap()
        .iter()
        .all(|s| s.state == DeliveryState::Success)
}

/// Ensures `events` credentials on `target` (concurrently: group commit),
/// then times one `sync` delivering them. Returns (events/s, CPU µs per
/// event, ensure commits/s).
async fn throughput(a: &Authority, target: &str, events: usize, round: usize) -> (f64, f64, f64) {
    let started = Instant::now();
    let mut pending = Vec::new();
    for i in 0..events {
        let a = a.clone();
        let id = format!("r{round}-k{i}");
        let target = target.to_owned();
        pending.push(tokio::spawn(async move {
            a.ensure(
                CredentialSpec::api_key(
                    id,
                    "invoke_functions"
                        .parse::<netproc_auth::PrivilegeSet>()
                        .unwrap(),
                ),
                &[target.as_str()],
            )
            .await
            .unwrap();
        }));
    }
    for p in pending {
        p.await.unwrap();
    }
    let commits = events as f64 / started.elapsed().as_secs_f64();
    let cpu = cpu_micros();
    let started = Instant::now();
    let report = a.sync().await;
    let elapsed = started.elapsed();
    let cpu = cpu_micros() - cpu;
    assert!(report.all_ok(), "{report:?}");
    let delivered: usize = report.targets.iter().map(|t| t.delivered).sum();
    assert_eq!(delivered, events);
    (
        events as f64 / elapsed.as_secs_f64(),
        cpu as f64 / events as f64,
        commits,
    )
}

fn main() {
    let rt = netproc_testkit::bench::runtime();
    rt.block_on(async {
        let rounds = env_or("NETPROC_BENCH_ROUNDS", 20);
        let events = env_or("NETPROC_BENCH_EVENTS", 20_000);
        let dir = tempfile::tempdir().unwrap();
        let signing = Ed25519Key::generate().unwrap();
        let seed = *signing.seed();
        let fleet = fleet(20, dir.path(), signing.public_key()).await;

        // 1. rotate → all 20 targets success, over TLS.
        let tls = authority(dir.path(), "tls.db", signing, &fleet.names, Arc::new(NetprocTransport::new(fleet.client.clone())));
        let names: Vec<&str> = fleet.names.iter().map(String::as_str).collect();
        let started = Instant::now();
        tls.ensure(CredentialSpec::api_key("svc", "invoke_functions".parse::<netproc_auth::PrivilegeSet>().unwrap()), &names)
            .await
            .unwrap();
        assert!(tls.sync().await.all_ok());
        let cold = started.elapsed();
        let mut times = Vec::new();
        for _ in 0..rounds {
            let started = Instant::now();
            tls.rotate("svc", None).await.unwrap();
            let report = tls.sync().await;
            assert!(report.all_ok(), "{report:?}");
            times.push(started.elapsed());
            assert!(all_success(&tls, "svc").await);
        }
        times.sort();
        println!(
            "rotate → 20 targets success: first (connect + TLS + auth + snapshot) {:.1} ms; then {rounds} rotations: median {:.2} ms, p90 {:.2} ms, max {:.2} ms (target ≤ 500 ms)",
            ms(cold),
            ms(times[times.len() / 2]),
            ms(times[times.len() * 9 / 10]),
            ms(*times.last().unwrap()),
        );

        // 2. events/s to one target: TLS and in-process alternated.
        // The baseline: the same target code and state database, no network
        // (a target of its own: two authorities must not share a target).
        let local_state = dir.path().join("local");
        std::fs::create_dir_all(&local_state).unwrap();
        let mut local = LocalTransport::new();
        local.add(
            PropagationTarget::open(
                TargetConfig::new("local", vec![Ed25519Key::from_seed(&seed).unwrap().public_key()]),
                Arc::new(ApiKeyStore::in_memory()),
                &netproc_server::StateDatabase::open(&local_state).unwrap(),
            )
            .unwrap(),
        );
        let inproc = authority(dir.path(), "local.db", Ed25519Key::from_seed(&seed).unwrap(), &["local".to_owned()], Arc::new(local));
        assert!(inproc.sync().await.all_ok());
        let (mut t_rate, mut t_cpu, mut l_rate, mut l_cpu, mut commits) = (vec![], vec![], vec![], vec![], vec![]);
        for round in 0..3 {
            let (r, c, k) = throughput(&tls, "t0", events, round).await;
            t_rate.push(r);
            t_cpu.push(c);
            commits.push(k);
            let (r, c, k) = throughput(&inproc, "local", events, round).await;
            l_rate.push(r);
            l_cpu.push(c);
            commits.push(k);
        }
        println!(
            "events/s to one target ({events} per run, medians of 3): TLS {:.0} events/s @ {:.1} µs CPU/event; in-process baseline {:.0} events/s @ {:.1} µs → {:.2}× (target ≥ 5,000 events/s)",
            median(t_rate.clone()),
            median(t_cpu),
            median(l_rate.clone()),
            median(l_cpu),
            median(t_rate) / median(l_rate),
        );
        println!(
            "authority commits (concurrent ensure, group commit): median {:.0} changes/s",
            median(commits)
        );
        let held = fleet.targets[0].cursor();
        println!("t0 cursor after the runs: {held}");

        // 3. The same through RabbitMQ, when there is one.
        if let Some(url) = netproc_testkit::amqp_or_skip("propagation bench (amqp)").await {
            amqp(&url, dir.path(), &seed, rounds, events, &tls).await;
        }
    });
}

async fn amqp(
    url: &str,
    dir: &std::path::Path,
    seed: &[u8; 32],
    rounds: usize,
    events: usize,
    tls: &Authority,
) {
    use netproc_propagation::{AmqpConfig, AmqpReceiver, AmqpTransport};
    let mut config = AmqpConfig::new(url);
    config.prefix = format!("bench-{}", std::process::id());
    let public = Ed25519Key::from_seed(seed).unwrap().public_key();
    let mut names = Vec::new();
    let mut reply_keys = Vec::new();
    let mut receivers = Vec::new();
    for i in 0..20 {
        let name = format!("q{i}");
        let state = dir.join(&name);
        std::fs::create_dir_all(&state).unwrap();
        let target = PropagationTarget::open(
            TargetConfig::new(&name, vec![public]),
            Arc::new(ApiKeyStore::in_memory()),
            &netproc_server::StateDatabase::open(&state).unwrap(),
        )
        .unwrap();
        let reply = Ed25519Key::generate().unwrap();
        reply_keys.push((name.clone(), reply.public_key()));
        receivers.push(AmqpReceiver::new(config.clone(), target, reply).unwrap());
        names.push(name);
    }
    let transport = AmqpTransport::new(config.clone(), public, reply_keys).unwrap();
    transport.connect().await.unwrap();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let tasks: Vec<_> = receivers
        .into_iter()
        .map(|r| {
            let mut stopped = stopped.clone();
            tokio::spawn(async move {
                r.run(async move {
                    let _ = stopped.wait_for(|s| *s).await;
                })
                .await;
            })
        })
        .collect();
    let a = authority(
        dir,
        "amqp.db",
        Ed25519Key::from_seed(seed).unwrap(),
        &names,
        Arc::new(transport),
    );
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    a.ensure(
        CredentialSpec::api_key(
            "svc",
            "invoke_functions"
                .parse::<netproc_auth::PrivilegeSet>()
                .unwrap(),
        ),
        &refs,
    )
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !a.sync().await.all_ok() {
        assert!(
            Instant::now() < deadline,
            "the broker targets never answered"
        );
    }
    let mut times = Vec::new();
    for _ in 0..rounds {
        let started = Instant::now();
        a.rotate("svc", None).await.unwrap();
        let report = a.sync().await;
        assert!(report.all_ok(), "{report:?}");
        times.push(started.elapsed());
    }
    times.sort();
    println!(
        "AMQP rotate → 20 targets success: {rounds} rotations: median {:.2} ms, p90 {:.2} ms, max {:.2} ms (target ≤ 500 ms)",
        ms(times[times.len() / 2]),
        ms(times[times.len() * 9 / 10]),
        ms(*times.last().unwrap()),
    );
    let (mut q_rate, mut q_cpu, mut t_rate, mut t_cpu) = (vec![], vec![], vec![], vec![]);
    for round in 0..3 {
        let (r, c, _) = throughput(&a, "q0", events, 100 + round).await;
        q_rate.push(r);
        q_cpu.push(c);
        let (r, c, _) = throughput(tls, "t0", events, 200 + round).await;
        t_rate.push(r);
        t_cpu.push(c);
    }
    println!(
        "events/s to one target ({events} per run, medians of 3): AMQP {:.0} events/s @ {:.1} µs CPU/event; TLS (same run) {:.0} events/s @ {:.1} µs → {:.2}× (target ≥ 5,000 events/s)",
        median(q_rate.clone()),
        median(q_cpu),
        median(t_rate.clone()),
        median(t_cpu),
        median(q_rate) / median(t_rate),
    );
    stop.send(true).unwrap();
    for t in tasks {
        t.await.unwrap();
    }
    // The bench's queues and exchanges go with it.
    drop(netproc_testkit::AmqpCleanup {
        url: url.to_owned(),
        queues: names
            .iter()
            .map(|n| config.target_queue(n).unwrap())
            .collect(),
        exchanges: vec![
            format!("{}.replies", config.prefix),
            format!("{}.dead", config.prefix),
        ],
    });
}
