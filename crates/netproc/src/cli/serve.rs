//! `netproc serve`: run a server from its file, logging, signals.

use std::path::Path;
use std::time::Duration;

use netproc::config::{LogFormat, ServerFile};
use netproc::server::{CallContext, CallError};
use netproc::wire::Value;

use super::{Failure, failed, usage};

/// How often `serve` checks the key store's file when `watch_interval_ms`
/// is not set.
const KEY_STORE_POLL: Duration = Duration::from_secs(1);

pub(crate) fn init_logging(format: LogFormat) {
    init_logging_at(format, "info");
}

/// Logging for the client commands: warnings (so a config warning, such as
/// an inline `api_key`, reaches the operator), info with `-v`, debug with
/// `-vv`; `NETPROC_LOG` or `RUST_LOG` override.
pub(crate) fn init_client_logging(verbose: u8) {
    let level = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    init_logging_at(LogFormat::Text, level);
}

fn init_logging_at(format: LogFormat, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("NETPROC_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder
            // Colour only on a terminal, and never under NO_COLOR.
            .with_ansi(
                std::io::IsTerminal::is_terminal(&std::io::stderr())
                    && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()),
            )
            .try_init(),
    };
}

/// `serve --check`: the configuration and every file it names, without
/// binding or creating anything. Problems are usage errors (exit 2).
pub(crate) fn check(config: &Path) -> Result<(), Failure> {
    let file = ServerFile::load(config).map_err(usage)?;
    let (identity, _roots, crls) = file
        .tls_material()
        .map_err(|e| usage(format!("{}: {e}", config.display())))?;
    let cert = identity.cert_identity();
    let keys = file.open_key_store(config).map_err(usage)?;
    let days_left = cert
        .not_after
        .duration_since(std::time::SystemTime::now())
        .map_or(0, |d| d.as_secs() / 86_400);
    outln!("{}: ok", config.display());
    outln!(
        "  certificate  {} ({} days left)",
        cert.fingerprint,
        days_left
    );
    outln!("  CRLs         {}", crls.len());
    outln!("  keys         {}", keys.list().len());
    Ok(())
}

pub(crate) async fn serve(config: &Path) -> Result<(), Failure> {
    let file = ServerFile::load(config).map_err(usage)?;
    init_logging(file.log_format);
    if let Some(addr) = file.metrics_addr {
        install_metrics(addr)?;
    }
    let assembled = file.assemble(config).map_err(usage)?;
    let (builder, keys) = (assembled.builder, assembled.keys);
    let server = builder
        // A built-in diagnostic function, for `netproc bench`.
        .function("echo", |_: CallContext, (v,): (Value,)| async move {
            Ok::<_, CallError>(v)
        })
        .start()
        .await
        .map_err(failed)?;
    server.follow_key_store(&keys);
    #[cfg(unix)]
    if let Some(path) = file.admin_socket_path()
        && let Err(e) = server.serve_admin_socket(&path, file.admin_socket_uids.clone())
    {
        server.shutdown(Duration::from_secs(1)).await;
        return Err(usage(format!("{}: {e}", config.display())));
    }
    if file.metrics_addr.is_some() {
        // Gauges current at each scrape.
        server.refresh_gauges_every(Duration::from_secs(1));
    }
    // The key store is always watched (each `netproc keys …` change takes
    // effect within about a second, and a bad file keeps the last good
    // keys); the TLS files only when asked.
    let key_interval = file
        .watch_interval_ms
        .map_or(KEY_STORE_POLL, |ms| Duration::from_millis(ms.max(100)));
    server.watch_key_store(keys, file.key_store_path(), key_interval);
    if let Some(ms) = file.watch_interval_ms {
        server.watch_files(file.watched_files(), Duration::from_millis(ms.max(100)));
    }
    // Deliveries through the broker: this server dials out and consumes
    // its queue (RPC is served whether the broker is up or not).
    let (stop_receiver, receiver_stopped) = tokio::sync::watch::channel(false);
    let receiver = assembled.amqp_receiver.map(|r| {
        let mut stopped = receiver_stopped;
        tokio::spawn(async move {
            r.run(async move {
                let _ = stopped.wait_for(|s| *s).await;
            })
            .await;
        })
    });
    outln!("listening on {}", server.local_addr());
    // SIGHUP reloads; SIGINT or SIGTERM ends the loop.
    while let Signal::Reload = wait_for_signal().await {
        match server.reload().await {
            Ok(report) => tracing::info!(
                sessions_closed = report.sessions_closed,
                "reloaded certificates, CRLs and keys"
            ),
            Err(e) => {
                tracing::warn!(error = %e, "reload refused; the last good configuration stays")
            }
        }
    }
    tracing::info!("shutting down");
    // The broker consumer stops taking requests and finishes the one in hand.
    let _ = stop_receiver.send(true);
    if let Some(task) = receiver {
        let _ = task.await;
    }
    server.shutdown(Duration::from_secs(10)).await;
    Ok(())
}

/// Serves Prometheus metrics at `addr`/metrics.
pub(crate) fn install_metrics(addr: std::net::SocketAddr) -> Result<(), Failure> {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(addr)
        .install()
        .map_err(|e| failed(format!("metrics endpoint {addr}: {e}")))?;
    tracing::info!(%addr, "Prometheus metrics at /metrics");
    Ok(())
}

pub(crate) enum Signal {
    /// SIGHUP: reload certificates, CRLs and the key store.
    Reload,
    /// SIGINT or SIGTERM: stop gracefully.
    Stop,
}

pub(crate) async fn wait_for_signal() -> Signal {
    #[cfg(unix)]
    {
        use std::sync::OnceLock;
        use tokio::signal::unix::{Signal as Unix, SignalKind, signal};
        use tokio::sync::Mutex;
        // Registered once, kept for the process: a signal between two waits is not lost.
        static SIGNALS: OnceLock<Option<Mutex<(Unix, Unix, Unix)>>> = OnceLock::new();
        let signals = SIGNALS.get_or_init(|| {
            match (
                signal(SignalKind::interrupt()),
                signal(SignalKind::terminate()),
                signal(SignalKind::hangup()),
            ) {
                (Ok(i), Ok(t), Ok(h)) => Some(Mutex::new((i, t, h))),
                _ => None,
            }
        });
        if let Some(signals) = signals {
            let mut guard = signals.lock().await;
            let (int, term, hup) = &mut *guard;
            return tokio::select! {
                _ = int.recv() => Signal::Stop,
                _ = term.recv() => Signal::Stop,
                _ = hup.recv() => Signal::Reload,
            };
        }
    }
    let _ = tokio::signal::ctrl_c().await;
    Signal::Stop
}
