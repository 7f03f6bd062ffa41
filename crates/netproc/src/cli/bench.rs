//! `netproc bench`: a load generator, bounded by duration and call count.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use netproc::client::Client;
use netproc::config::ClientFile;
use netproc::wire::{Operation, Value};

use super::{Failure, Target, failed, run_on, usage};

/// Options of `netproc bench`.
#[derive(Debug, clap::Args)]
pub(crate) struct BenchArgs {
    #[command(flatten)]
    target: Target,
    /// Connections, each its own client.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Calls in flight per connection.
    #[arg(long, default_value_t = 32)]
    in_flight: usize,
    /// How long to run: 500ms, 5s, 1m.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    duration: Duration,
    /// Bytes of payload per call (sent as one bytes argument).
    #[arg(long, default_value_t = 64)]
    payload: usize,
    /// The function to call (`netproc serve` has a built-in `echo`).
    #[arg(long, default_value = "echo")]
    function: String,
    /// Measure full connect + TLS + auth + one call instead (2 at a time).
    #[arg(long)]
    new_connections: bool,
    /// Stop after this many calls.
    #[arg(long, default_value_t = 100_000_000)]
    max_calls: u64,
    /// Fail (exit 1) when more than this fraction of calls fail, after
    /// printing the report. Default 0.01 (1 %).
    #[arg(long, default_value_t = 0.01)]
    max_error_rate: f64,
    /// Instead of calling: open this many authenticated connections and
    /// hold them for --duration (to measure the server's memory per idle
    /// connection; raise `ulimit -n` first).
    #[arg(long)]
    hold: Option<usize>,
    /// With --hold: each held connection calls --function once per this
    /// interval (spread evenly over it), and the report adds latency
    /// percentiles: a fleet of mostly idle clients.
    #[arg(long, value_parser = parse_duration)]
    call_every: Option<Duration>,
    /// With --hold: connect from this many loopback addresses in turn,
    /// 127.0.0.1 to 127.0.0.N (the server's per-address limits then apply
    /// to each share). The server must be on IPv4 loopback.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=254))]
    sources: u8,
}

pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s.split_at(
        s.find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(s.len()),
    );
    let n: f64 = num.parse().map_err(|_| format!("invalid duration {s:?}"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" | "" => n,
        "m" => n * 60.0,
        _ => return Err(format!("invalid duration unit in {s:?} (ms, s, m)")),
    };
    Ok(Duration::from_secs_f64(secs))
}

struct Shared {
    histogram: std::sync::Mutex<Histogram<u64>>,
    errors: std::sync::Mutex<BTreeMap<String, u64>>,
    calls: AtomicU64,
    /// Of `calls`, those that failed (for the progress line).
    failed: AtomicU64,
    stop: AtomicBool,
}

impl Shared {
    fn new() -> Result<Shared, Failure> {
        Ok(Shared {
            histogram: std::sync::Mutex::new(
                Histogram::new_with_bounds(1, 60_000_000, 3).map_err(failed)?,
            ),
            errors: std::sync::Mutex::new(BTreeMap::new()),
            calls: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        })
    }

    fn record(&self, started: Instant, result: Result<Value, netproc::client::ClientError>) {
        match result {
            Ok(_) => {
                let us = u64::try_from(started.elapsed().as_micros())
                    .unwrap_or(u64::MAX)
                    .max(1);
                let _ = self
                    .histogram
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .record(us);
            }
            Err(e) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                *self
                    .errors
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .entry(e.code().to_string())
                    .or_default() += 1;
            }
        }
        self.calls.fetch_add(1, Ordering::Relaxed);
    }
}

pub(crate) async fn run(args: BenchArgs) -> Result<(), Failure> {
    if !(0.0..=1.0).contains(&args.max_error_rate) {
        return Err(usage("--max-error-rate is a fraction from 0 to 1"));
    }
    if args.target.server == netproc::client::ALL_SERVERS {
        return Err(usage("bench runs against one server"));
    }
    let file = super::load_client_file(&args.target.config)?;
    let make_client = || file.client(&args.target.config).map_err(usage);
    if let Some(n) = args.hold {
        return hold(&file, &args, n).await;
    }
    let shared = Arc::new(Shared::new()?);
    let op = Operation::Invoke {
        function: args.function.clone(),
        args: vec![Value::Bytes(vec![7; args.payload].into())],
    };
    let mut tasks = Vec::new();
    let started = Instant::now();
    let (workers, per_worker) = if args.new_connections {
        (2, 1)
    } else {
        (args.connections.max(1), args.in_flight.max(1))
    };
    for worker in 0..workers {
        let client: Client = make_client()?;
        let server = client.server(&args.target.server).map_err(usage)?;
        if !args.new_connections {
            server
                .session()
                .await
                .map_err(|e| failed(format!("{}: {e}", e.code())))?;
        }
        if worker == 0 {
            warn_about_limits(&server, workers).await;
        }
        for _ in 0..per_worker {
            let (shared, op, server, max) = (
                Arc::clone(&shared),
                op.clone(),
                server.clone(),
                args.max_calls,
            );
            let (file, config, name) = (
                file.clone(),
                args.target.config.clone(),
                args.target.server.clone(),
            );
            let new_connections = args.new_connections;
            let timeout = args.target.timeout;
            tasks.push(tokio::spawn(async move {
                while !shared.stop.load(Ordering::Relaxed)
                    && shared.calls.load(Ordering::Relaxed) < max
                {
                    let t = Instant::now();
                    let result = if new_connections {
                        match file.client(&config) {
                            Ok(c) => match c.server(&name) {
                                Ok(s) => run_on(&s, op.clone(), timeout).await,
                                Err(e) => Err(e),
                            },
                            Err(_) => break,
                        }
                    } else {
                        run_on(&server, op.clone(), timeout).await
                    };
                    shared.record(t, result);
                }
            }));
        }
    }
    let progress = (!super::output::json() && std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .then(|| {
            let bar = indicatif::ProgressBar::new(args.duration.as_millis() as u64);
            bar.set_style(
                indicatif::ProgressStyle::with_template("{bar:40} {elapsed}/{duration} {msg}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            bar
        });
    // Text progress where there is no terminal (a log, CI): a line a second.
    let lines = progress.is_none() && !super::output::json();
    let mut next_line = Duration::from_secs(1);
    let mut interrupted = false;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    while started.elapsed() < args.duration && shared.calls.load(Ordering::Relaxed) < args.max_calls
    {
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
            _ = &mut ctrl_c => {
                interrupted = true;
                break;
            }
        }
        let calls = shared.calls.load(Ordering::Relaxed);
        let failed_now = shared.failed.load(Ordering::Relaxed);
        if let Some(bar) = &progress {
            bar.set_position(started.elapsed().as_millis() as u64);
            let rate = (calls - failed_now) as f64 / started.elapsed().as_secs_f64();
            bar.set_message(format!("{rate:.0} ok calls/s, {failed_now} failed"));
        } else if lines && started.elapsed() >= next_line {
            eprintln!(
                "bench: {:.0} s of {:.0} s: {} ok, {failed_now} failed",
                started.elapsed().as_secs_f64(),
                args.duration.as_secs_f64(),
                calls - failed_now
            );
            next_line += Duration::from_secs(1);
        }
    }
    if interrupted {
        eprintln!("bench: interrupted; the figures are of the calls made so far");
    }
    shared.stop.store(true, Ordering::Relaxed);
    let elapsed = started.elapsed();
    for t in tasks {
        let _ = t.await;
    }
    if let Some(bar) = progress {
        bar.finish_and_clear();
    }
    let calls = shared.calls.load(Ordering::Relaxed);
    let h = shared
        .histogram
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let errors = shared
        .errors
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    // Only successful calls count as throughput; latency is of successes.
    let ok = h.len();
    let failed_calls: u64 = errors.values().sum();
    let rate = ok as f64 / elapsed.as_secs_f64();
    let error_rate = if calls == 0 {
        0.0
    } else {
        failed_calls as f64 / calls as f64
    };
    let quantile = |q: f64| (ok > 0).then(|| h.value_at_quantile(q));
    if super::output::json() {
        let line = serde_json::json!({
            "function": args.function,
            "connections": workers,
            "in_flight": per_worker,
            "new_connections": args.new_connections,
            "duration_s": elapsed.as_secs_f64(),
            "calls": calls,
            "ok_calls": ok,
            "failed_calls": failed_calls,
            "error_rate": error_rate,
            "calls_per_s": rate,
            "p50_us": quantile(0.5),
            "p90_us": quantile(0.9),
            "p99_us": quantile(0.99),
            "max_us": (ok > 0).then(|| h.max()),
            "errors": errors,
            "interrupted": interrupted,
        });
        outln!("{line}");
    } else {
        outln!(
            "{ok} successful calls in {:.2} s: {rate:.0} calls/s ({failed_calls} failed of {calls}, {:.1} %)",
            elapsed.as_secs_f64(),
            error_rate * 100.0
        );
        if ok > 0 {
            outln!(
                "latency µs (successes): p50 {} p90 {} p99 {} max {}",
                h.value_at_quantile(0.5),
                h.value_at_quantile(0.9),
                h.value_at_quantile(0.99),
                h.max()
            );
        }
        for (code, n) in &errors {
            outln!("errors {code}: {n}");
        }
    }
    if error_rate > args.max_error_rate {
        return Err(failed(format!(
            "{:.1} % of calls failed (over --max-error-rate {}): the figures above are not the server's throughput{}",
            error_rate * 100.0,
            args.max_error_rate,
            if errors.contains_key("rate_limited") {
                "; `rate_limited` means the server's request buckets refused the load (see request_controls)"
            } else {
                ""
            }
        )));
    }
    Ok(())
}

/// Says before the run when the server's request buckets will refuse a
/// closed-loop load (every call is sent as soon as the last is answered):
/// from `get_limits` when the key may read them, else the defaults.
async fn warn_about_limits(server: &netproc::client::ServerRef, connections: usize) {
    let known = server.execute(Operation::GetLimits).await.ok();
    let limits = known
        .as_ref()
        .map(|v| netproc::config::json::from_value(v.clone()));
    let bucket = |name: &str, default: u64| -> Option<u64> {
        match &limits {
            Some(l) => {
                let b = &l["request_controls"][name];
                (b["enabled"] != false).then(|| {
                    let per = b["interval_ms"].as_u64().unwrap_or(1000).max(1);
                    b["tokens_per_interval"].as_u64().unwrap_or(default) * 1000 / per
                })
            }
            None => Some(default),
        }
    };
    let per_connection = bucket("per_connection", 200);
    let caps: Vec<String> = [
        per_connection.map(|n| {
            format!(
                "{n}/s per connection ({} for {connections})",
                n * connections as u64
            )
        }),
        bucket("per_ip", 500).map(|n| format!("{n}/s per address")),
        bucket("per_api_key", 1000).map(|n| format!("{n}/s per key")),
    ]
    .into_iter()
    .flatten()
    .collect();
    if !caps.is_empty() {
        eprintln!(
            "bench: the server limits requests to {}{}; a closed-loop run exceeds them, and calls over them fail rate_limited. For a throughput test, disable or raise [request_controls] on the server under test.",
            caps.join(", "),
            if known.is_none() {
                " (its defaults: this key may not read the limits in force)"
            } else {
                ""
            }
        );
    }
}

/// Opens `n` authenticated connections (8 at a time), holds them for the
/// duration, and reports how many were established.
async fn hold(file: &ClientFile, args: &BenchArgs, n: usize) -> Result<(), Failure> {
    let started = Instant::now();
    let rss_before = resident_kib();
    let mut held = Vec::with_capacity(n);
    let mut failures: BTreeMap<String, u64> = BTreeMap::new();
    let mut pending = tokio::task::JoinSet::new();
    let mut launched = 0;
    // One file per source address: the same server entry, bound to it.
    let files = source_files(file, args)?;
    while held.len() + (failures.values().sum::<u64>() as usize) < n {
        while launched < n && pending.len() < 8 {
            let client = files[launched % files.len()]
                .client(&args.target.config)
                .map_err(usage)?;
            let name = args.target.server.clone();
            pending.spawn(async move {
                let server = client.server(&name)?;
                let (session_id, _) = server.session().await?;
                Ok::<_, netproc::client::ClientError>((server, session_id))
            });
            launched += 1;
        }
        match pending.join_next().await {
            Some(Ok(Ok(opened))) => held.push(opened),
            Some(Ok(Err(e))) => *failures.entry(e.code().to_string()).or_default() += 1,
            Some(Err(_)) | None => break,
        }
    }
    let opened_in = started.elapsed();
    let opened = held.len();
    let client_kib_per_connection =
        resident_kib().saturating_sub(rss_before) as f64 / opened.max(1) as f64;
    eprintln!(
        "holding {opened} connections (opened in {:.1} s); failures {failures:?}",
        opened_in.as_secs_f64()
    );
    let calls = Arc::new(Shared::new()?);
    let mut callers = tokio::task::JoinSet::new();
    if let Some(every) = args.call_every {
        let op = Operation::Invoke {
            function: args.function.clone(),
            args: vec![Value::Bytes(vec![7; args.payload].into())],
        };
        for (i, (server, _)) in held.iter().enumerate() {
            let (server, op, shared) = (server.clone(), op.clone(), Arc::clone(&calls));
            let offset = every.mul_f64(i as f64 / opened.max(1) as f64);
            let timeout = args.target.timeout;
            callers.spawn(async move {
                let mut tick =
                    tokio::time::interval_at(tokio::time::Instant::now() + offset, every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                while !shared.stop.load(Ordering::Relaxed) {
                    tick.tick().await;
                    let t = Instant::now();
                    shared.record(t, run_on(&server, op.clone(), timeout).await);
                }
            });
        }
    }
    tokio::time::sleep(args.duration).await;
    calls.stop.store(true, Ordering::Relaxed);
    callers.abort_all();
    // Held means the same session at the end: a connection the server
    // closed meanwhile comes back with a new session id (or not at all).
    let mut still = 0;
    for (server, session_id) in &held {
        if matches!(server.session().await, Ok((id, _)) if id == *session_id) {
            still += 1;
        }
    }
    let h = calls
        .histogram
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    let ok = h.len();
    let quantile = |q: f64| (ok > 0).then(|| h.value_at_quantile(q));
    outln!(
        "{}",
        serde_json::json!({
            "opened": opened,
            "held": still,
            "open_s": opened_in.as_secs_f64(),
            "errors": failures,
            "client_rss_kib_per_connection": client_kib_per_connection,
            "calls": calls.calls.load(Ordering::Relaxed),
            "call_errors": *calls.errors.lock().unwrap_or_else(std::sync::PoisonError::into_inner),
            "p50_us": quantile(0.5),
            "p99_us": quantile(0.99),
            "max_us": (ok > 0).then(|| h.max()),
        })
    );
    drop(held);
    Ok(())
}

/// The client file once per `--sources` address: the target server's entry
/// bound to 127.0.0.1, 127.0.0.2, …
fn source_files(file: &ClientFile, args: &BenchArgs) -> Result<Vec<ClientFile>, Failure> {
    if args.sources == 1 {
        return Ok(vec![file.clone()]);
    }
    let Some(entry) = file.servers.get(&args.target.server) else {
        return Err(usage(format!(
            "no server named {:?} in the client file",
            args.target.server
        )));
    };
    let loopback_v4 = matches!(
        &entry.address,
        netproc::client::ServerAddr::Socket(a) if a.is_ipv4() && a.ip().is_loopback()
    );
    if !loopback_v4 {
        return Err(usage(
            "--sources needs a server on IPv4 loopback (127.x.y.z)",
        ));
    }
    Ok((1..=args.sources)
        .map(|last| {
            let mut f = file.clone();
            if let Some(e) = f.servers.get_mut(&args.target.server) {
                e.bind = Some(std::net::IpAddr::V4(std::net::Ipv4Addr::new(
                    127, 0, 0, last,
                )));
            }
            f
        })
        .collect())
}

/// This process's resident memory, KiB (0 where /proc is absent).
fn resident_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}
