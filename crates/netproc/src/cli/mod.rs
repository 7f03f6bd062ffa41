//! Command-line parsing and the commands.

mod bench;
mod creds;
mod demo;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use clap::{Parser, Subcommand};
use netproc::auth::{ApiKeyStore, CertBinding, KeySpec, PrivilegeSet};
use netproc::client::{Client, ClientError, ServerOutcome};
use netproc::config::{ClientFile, LogFormat, ServerFile, json};
use netproc::pki::{
    CaParams, CertIdentity, CertificateAuthority, LeafParams, SubjectAltName, Validity,
};
use netproc::server::{CallContext, CallError};
use netproc::wire::{DependencySource, Operation, Value};

pub(crate) type Error = Box<dyn std::error::Error + Send + Sync>;

/// How a command failed: the exit code follows.
pub(crate) enum Failure {
    /// Bad usage or configuration: exit 2.
    Usage(String),
    /// The operation failed: exit 1.
    Failed(String),
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Failure::Failed(e.to_string())
    }
}

pub(crate) fn usage(e: impl std::fmt::Display) -> Failure {
    Failure::Usage(e.to_string())
}

pub(crate) fn failed(e: impl std::fmt::Display) -> Failure {
    Failure::Failed(e.to_string())
}

/// Secure remote procedure calls over mutual TLS with a private CA.
#[derive(Debug, Parser)]
#[command(name = "netproc", version, about)]
pub(crate) struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Two servers in-process with a throwaway PKI: calls, all_servers, a script, refused clients.
    Demo,
    /// Make and inspect certificates.
    #[command(subcommand)]
    Pki(PkiCommand),
    /// Manage an API-key store (only hashes are stored).
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Run a credential-propagation authority from a TOML file: deliver
    /// changes made with `netproc creds` to every target, until SIGINT or SIGTERM.
    Authority {
        /// The authority configuration.
        #[arg(long)]
        config: PathBuf,
    },
    /// Drive an authority: init, ensure, rotate, revoke, status, sync, targets, list.
    #[command(subcommand)]
    Creds(creds::CredsCommand),
    /// Run a server from a TOML file.
    Serve {
        /// The server configuration.
        #[arg(long)]
        config: PathBuf,
    },
    /// Call a function on a server or on all_servers; prints the result as JSON.
    Call {
        #[command(flatten)]
        target: Target,
        /// The function.
        function: String,
        /// Arguments, each a JSON value.
        args: Vec<String>,
    },
    /// Define a script function from a source file.
    Define {
        #[command(flatten)]
        target: Target,
        /// The function's name (an `fn` of that name in the source).
        name: String,
        /// The Rhai source file.
        #[arg(long)]
        source: PathBuf,
    },
    /// Remove a script function.
    Undefine {
        #[command(flatten)]
        target: Target,
        /// The function's name.
        name: String,
    },
    /// List, set or unset constants (`list` when no action is given).
    Constants {
        #[command(flatten)]
        target: Target,
        #[command(subcommand)]
        action: Option<ConstantsAction>,
    },
    /// List the functions you may call.
    Functions {
        #[command(flatten)]
        target: Target,
    },
    /// Define, remove or list the dependencies scripts can import (`list`
    /// when no action is given).
    Dependency {
        #[command(flatten)]
        target: Target,
        #[command(subcommand)]
        action: Option<DependencyAction>,
    },
    /// Administer a server (needs the admin privileges).
    Admin {
        #[command(flatten)]
        target: Target,
        #[command(subcommand)]
        op: AdminOp,
    },
    /// The abuse-control metrics of a server.
    Metrics {
        #[command(flatten)]
        target: Target,
        /// One JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// A load generator: calls/s and latency percentiles.
    Bench(bench::BenchArgs),
}

/// Which server(s), from which client file.
#[derive(Debug, clap::Args)]
pub(crate) struct Target {
    /// The client configuration.
    #[arg(long)]
    pub(crate) config: PathBuf,
    /// A server name from the file, or all_servers.
    pub(crate) server: String,
}

#[derive(Debug, Subcommand)]
enum ConstantsAction {
    /// List the constants.
    List,
    /// Set a constant.
    Set {
        /// The constant's name.
        name: String,
        /// Its value, as JSON.
        value: String,
    },
    /// Remove a constant.
    Unset {
        /// The constant's name.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
enum DependencyAction {
    /// List the dependencies.
    List,
    /// Define a dependency from a Rhai source file or a host module.
    Define {
        /// The name scripts import it by.
        alias: String,
        /// Rhai source file.
        #[arg(long, conflicts_with = "host", required_unless_present = "host")]
        source: Option<PathBuf>,
        /// A host module the server provides.
        #[arg(long)]
        host: Option<String>,
    },
    /// Remove a dependency.
    Undefine {
        /// The dependency's alias.
        alias: String,
        /// Remove even if functions import it.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Subcommand)]
enum AdminOp {
    /// The server's name, version, uptime and counts.
    Info,
    /// The live sessions.
    Sessions,
    /// End one session.
    DisconnectSession {
        /// The session id, from `sessions`.
        id: u64,
    },
    /// End every session of a principal.
    DisconnectPrincipal {
        /// The principal (key id or certificate identity).
        principal: String,
    },
    /// The blocked addresses and principals.
    Blocked,
    /// Lift a block.
    Unblock {
        /// The entry, as `blocked` lists it.
        entry: String,
    },
    /// The abuse-control limits in force.
    Limits,
    /// The abuse-control metrics, as JSON.
    Metrics,
    /// Re-read TLS files, the key store and propagation keys.
    Reload,
}

#[derive(Debug, Subcommand)]
enum PkiCommand {
    /// A new CA: ca.crt and ca.key (0600) in --out.
    Init {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "netproc CA")]
        name: String,
        #[arg(long, default_value_t = 3652)]
        days: u32,
        #[arg(long)]
        force: bool,
    },
    /// A server certificate for DNS names and IPs, signed by the CA in --ca-dir.
    IssueServer {
        #[arg(long)]
        ca_dir: PathBuf,
        /// Written as NAME.crt and NAME.key in --ca-dir.
        #[arg(long)]
        name: String,
        /// DNS names and IP addresses (repeat).
        #[arg(long = "san", required = true)]
        sans: Vec<String>,
        #[arg(long, default_value_t = 90)]
        days: u32,
        #[arg(long)]
        force: bool,
    },
    /// A client certificate, signed by the CA in --ca-dir.
    IssueClient {
        #[arg(long)]
        ca_dir: PathBuf,
        /// Common name; written as NAME.crt and NAME.key in --ca-dir.
        #[arg(long)]
        name: String,
        /// Extra SANs: uri:…, dns:…, email:…, ip:… (repeat).
        #[arg(long = "san")]
        sans: Vec<String>,
        #[arg(long, default_value_t = 90)]
        days: u32,
        #[arg(long)]
        force: bool,
    },
    /// Subject, SANs, validity, EKUs and fingerprint of a PEM certificate.
    Inspect { file: PathBuf },
    /// The SHA-256 fingerprint of a PEM certificate.
    Fingerprint { file: PathBuf },
}

#[derive(Debug, Subcommand)]
enum KeysCommand {
    /// Create a key; it is printed once, only its hash is stored.
    Create {
        #[arg(long)]
        store: PathBuf,
        /// Comma-separated privileges.
        #[arg(long, default_value = "invoke_functions")]
        privileges: String,
        /// Bind the key to this certificate (PEM file).
        #[arg(long)]
        bind_cert: Option<PathBuf>,
        /// Bind the key to a SAN or fingerprint (dns:…, uri:…, sha256:…).
        #[arg(long)]
        bind: Option<String>,
        /// Expire after this many days.
        #[arg(long)]
        expires_days: Option<u64>,
        /// Comma-separated function allow-list.
        #[arg(long)]
        functions: Option<String>,
        #[arg(long)]
        label: Option<String>,
        /// Also write the key to this file (mode 0600), for `api_key_file`.
        #[arg(long)]
        key_out: Option<PathBuf>,
        /// Make an Ed25519 key instead of an API key: only its public half is
        /// stored; the private credential (`npe_…`) works in `api_key_file`.
        #[arg(long)]
        ed25519: bool,
        /// This key's own cap on concurrent sessions (0 = none), over the server's.
        #[arg(long)]
        max_sessions: Option<u32>,
        /// One active session for this key: a new one replaces the old.
        #[arg(long)]
        single_active_session: bool,
    },
    /// List keys (never secrets).
    List {
        #[arg(long)]
        store: PathBuf,
    },
    /// Delete a key.
    Revoke {
        #[arg(long)]
        store: PathBuf,
        id: String,
    },
    /// New secret for a key; printed once.
    Rotate {
        #[arg(long)]
        store: PathBuf,
        id: String,
    },
}

pub(crate) async fn run(cli: Cli) -> Result<(), Failure> {
    match cli.command {
        Command::Demo => demo::demo().await.map_err(Failure::from),
        Command::Pki(cmd) => pki(cmd),
        Command::Keys(cmd) => keys(cmd),
        Command::Serve { config } => serve(&config).await,
        Command::Authority { config } => creds::authority(&config).await,
        Command::Creds(cmd) => creds::creds(cmd).await,
        Command::Call {
            target,
            function,
            args,
        } => {
            let args = args
                .iter()
                .map(|a| {
                    let j: serde_json::Value = serde_json::from_str(a)
                        .map_err(|e| usage(format!("argument {a:?} is not JSON: {e}")))?;
                    json::to_value(j).map_err(usage)
                })
                .collect::<Result<Vec<_>, _>>()?;
            execute(&target, Operation::Invoke { function, args }).await
        }
        Command::Define {
            target,
            name,
            source,
        } => {
            let source = std::fs::read_to_string(&source)
                .map_err(|e| usage(format!("{}: {e}", source.display())))?;
            let op = Operation::DefineFunction(netproc::wire::DefineFunction::new(name, source));
            execute(&target, op).await
        }
        Command::Undefine { target, name } => {
            execute(&target, Operation::UndefineFunction { name }).await
        }
        Command::Functions { target } => execute(&target, Operation::ListFunctions).await,
        Command::Constants { target, action } => {
            let op = match action.unwrap_or(ConstantsAction::List) {
                ConstantsAction::List => Operation::ListConstants,
                ConstantsAction::Set { name, value } => {
                    let j: serde_json::Value = serde_json::from_str(&value)
                        .map_err(|e| usage(format!("value is not JSON: {e}")))?;
                    Operation::DefineConstant {
                        name,
                        value: json::to_value(j).map_err(usage)?,
                    }
                }
                ConstantsAction::Unset { name } => Operation::UndefineConstant { name },
            };
            execute(&target, op).await
        }
        Command::Dependency { target, action } => {
            let op = match action.unwrap_or(DependencyAction::List) {
                DependencyAction::List => Operation::ListDependencies,
                DependencyAction::Define {
                    alias,
                    source,
                    host,
                } => {
                    let source = match (source, host) {
                        (Some(file), _) => DependencySource::Script(
                            std::fs::read_to_string(&file)
                                .map_err(|e| usage(format!("{}: {e}", file.display())))?,
                        ),
                        (None, Some(h)) => DependencySource::Host(h),
                        (None, None) => {
                            return Err(usage(
                                "dependency define: give --source FILE or --host NAME",
                            ));
                        }
                    };
                    Operation::DefineDependency { alias, source }
                }
                DependencyAction::Undefine { alias, force } => {
                    Operation::UndefineDependency { alias, force }
                }
            };
            execute(&target, op).await
        }
        Command::Admin { target, op } => {
            let op = match op {
                AdminOp::Info => Operation::ServerInfo,
                AdminOp::Sessions => Operation::ListSessions,
                AdminOp::DisconnectSession { id } => {
                    Operation::DisconnectSession { session_id: id }
                }
                AdminOp::DisconnectPrincipal { principal } => {
                    Operation::DisconnectPrincipal { principal }
                }
                AdminOp::Blocked => Operation::ListBlocked,
                AdminOp::Unblock { entry } => Operation::Unblock { entry },
                AdminOp::Limits => Operation::GetLimits,
                AdminOp::Metrics => Operation::AbuseMetrics,
                AdminOp::Reload => Operation::Reload,
            };
            execute(&target, op).await
        }
        Command::Metrics {
            target,
            json: as_json,
        } => metrics(&target, as_json).await,
        Command::Bench(args) => bench::run(args).await,
    }
}

fn client(target: &Target) -> Result<Client, Failure> {
    let file = ClientFile::load(&target.config).map_err(usage)?;
    file.client(&target.config).map_err(usage)
}

pub(crate) fn print_json(v: &serde_json::Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

/// Runs an operation on one server or all, prints JSON, and fails with the
/// error's code on stderr.
async fn execute(target: &Target, op: Operation) -> Result<(), Failure> {
    let client = client(target)?;
    if target.server == netproc::client::ALL_SERVERS {
        let results = client.all_servers().execute(op).await;
        let any_error = results.values().any(Result::is_err);
        let out: BTreeMap<String, ServerOutcome<serde_json::Value>> = results
            .into_iter()
            .map(|(k, r)| (k, ServerOutcome::from(r.map(json::from_value))))
            .collect();
        print_json(&serde_json::to_value(&out).unwrap_or_default());
        return if any_error {
            Err(failed("some servers failed"))
        } else {
            Ok(())
        };
    }
    let server = client.server(&target.server).map_err(usage)?;
    match server.execute(op).await {
        Ok(v) => {
            print_json(&json::from_value(v));
            Ok(())
        }
        Err(e) => Err(failed(describe(&e))),
    }
}

fn describe(e: &ClientError) -> String {
    format!("{}: {e}", e.code())
}

async fn metrics(target: &Target, as_json: bool) -> Result<(), Failure> {
    let client = client(target)?;
    let server = client.server(&target.server).map_err(usage)?;
    let v = server
        .execute(Operation::AbuseMetrics)
        .await
        .map_err(|e| failed(describe(&e)))?;
    let j = json::from_value(v);
    if as_json || !std::io::IsTerminal::is_terminal(&std::io::stdout()) {
        println!("{j}");
    } else if let serde_json::Value::Object(m) = j {
        for (k, v) in m {
            println!("{k:<44} {v}");
        }
    }
    Ok(())
}

fn pki(cmd: PkiCommand) -> Result<(), Failure> {
    let validity = |days: u32| Validity::days_from_now(days);
    match cmd {
        PkiCommand::Init {
            out,
            name,
            days,
            force,
        } => {
            std::fs::create_dir_all(&out).map_err(|e| failed(format!("{}: {e}", out.display())))?;
            let ca = CertificateAuthority::generate(&CaParams::new(name).validity(validity(days)))
                .map_err(failed)?;
            ca.save(out.join("ca.crt"), out.join("ca.key"), force)
                .map_err(failed)?;
            print_identity("ca", ca.cert_identity());
        }
        PkiCommand::IssueServer {
            ca_dir,
            name,
            sans,
            days,
            force,
        } => {
            let ca = CertificateAuthority::load(ca_dir.join("ca.crt"), ca_dir.join("ca.key"))
                .map_err(failed)?;
            let cert = ca
                .issue(&LeafParams::server(name.clone(), sans).validity(validity(days)))
                .map_err(failed)?;
            cert.save(
                ca_dir.join(format!("{name}.crt")),
                ca_dir.join(format!("{name}.key")),
                force,
            )
            .map_err(failed)?;
            print_identity(&name, cert.cert_identity());
        }
        PkiCommand::IssueClient {
            ca_dir,
            name,
            sans,
            days,
            force,
        } => {
            let ca = CertificateAuthority::load(ca_dir.join("ca.crt"), ca_dir.join("ca.key"))
                .map_err(failed)?;
            let mut params = LeafParams::client(name.clone()).validity(validity(days));
            for san in sans {
                params = params.san(san.parse::<SubjectAltName>().map_err(usage)?);
            }
            let cert = ca.issue(&params).map_err(failed)?;
            cert.save(
                ca_dir.join(format!("{name}.crt")),
                ca_dir.join(format!("{name}.key")),
                force,
            )
            .map_err(failed)?;
            print_identity(&name, cert.cert_identity());
        }
        PkiCommand::Inspect { file } => {
            print_identity(&file.display().to_string(), &load_cert(&file)?)
        }
        PkiCommand::Fingerprint { file } => println!("{}", load_cert(&file)?.fingerprint),
    }
    Ok(())
}

pub(crate) fn load_cert(file: &Path) -> Result<CertIdentity, Failure> {
    let pem = std::fs::read(file).map_err(|e| failed(format!("{}: {e}", file.display())))?;
    CertIdentity::from_pem(&pem, &file.display().to_string()).map_err(failed)
}

fn date(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!("unix {secs}")
}

fn print_identity(name: &str, id: &CertIdentity) {
    println!("{name}");
    println!("  subject      {}", id.subject);
    println!("  issuer       {}", id.issuer);
    let sans: Vec<String> = id.sans.iter().map(ToString::to_string).collect();
    println!(
        "  sans         {}",
        if sans.is_empty() {
            "-".into()
        } else {
            sans.join(", ")
        }
    );
    let ekus: Vec<String> = id.key_purposes.iter().map(ToString::to_string).collect();
    println!(
        "  key usage    {}",
        if ekus.is_empty() {
            "-".into()
        } else {
            ekus.join(", ")
        }
    );
    println!("  ca           {}", id.is_ca);
    println!("  serial       {}", id.serial);
    println!(
        "  valid        {} .. {}",
        date(id.not_before),
        date(id.not_after)
    );
    println!("  sha256       {}", id.fingerprint);
}

fn keys(cmd: KeysCommand) -> Result<(), Failure> {
    match cmd {
        KeysCommand::Create {
            store,
            privileges,
            bind_cert,
            bind,
            expires_days,
            functions,
            label,
            key_out,
            ed25519,
            max_sessions,
            single_active_session,
        } => {
            let keys = ApiKeyStore::open(&store).map_err(failed)?;
            let privileges: PrivilegeSet = privileges.parse().map_err(usage)?;
            let mut spec = KeySpec::new(privileges);
            match (bind_cert, bind) {
                (Some(file), None) => {
                    spec = spec.binding(CertBinding::Fingerprint(load_cert(&file)?.fingerprint))
                }
                (None, Some(b)) => spec = spec.binding(b.parse().map_err(usage)?),
                (None, None) => {}
                _ => return Err(usage("give --bind-cert or --bind, not both")),
            }
            if let Some(days) = expires_days {
                spec = spec.expires_at(SystemTime::now() + Duration::from_secs(days * 86_400));
            }
            if let Some(f) = functions {
                spec = spec.functions(f.split(',').map(str::trim).filter(|s| !s.is_empty()));
            }
            if let Some(l) = label {
                spec = spec.label(l);
            }
            spec = spec.session_policy(max_sessions, single_active_session.then_some(true));
            let (info, key) = if ed25519 {
                let signing = netproc::pki::Ed25519Key::generate().map_err(failed)?;
                let info = keys
                    .register_ed25519(spec, signing.public_key())
                    .map_err(failed)?;
                let text = netproc::config::format_ed25519_credential(&info.id, &signing);
                (info, netproc::wire::SecretString::new(text.to_string()))
            } else {
                let (info, key) = keys.create(spec).map_err(failed)?;
                (info, key.to_secret())
            };
            if let Some(path) = key_out {
                netproc::pki::write_secret_file(&path, key.expose().as_bytes(), false)
                    .map_err(failed)?;
                eprintln!(
                    "created key {} ({}); written to {} (0600)",
                    info.id,
                    info.privileges,
                    path.display()
                );
            } else {
                eprintln!(
                    "created key {} ({}); the key is shown once:",
                    info.id, info.privileges
                );
                println!("{}", key.expose());
            }
        }
        KeysCommand::List { store } => {
            let keys = ApiKeyStore::open(&store).map_err(failed)?;
            print_json(&serde_json::to_value(keys.list()).unwrap_or_default());
        }
        KeysCommand::Revoke { store, id } => {
            ApiKeyStore::open(&store)
                .map_err(failed)?
                .revoke(&id)
                .map_err(failed)?;
            eprintln!("revoked {id}");
        }
        KeysCommand::Rotate { store, id } => {
            let key = ApiKeyStore::open(&store)
                .map_err(failed)?
                .rotate(&id)
                .map_err(failed)?;
            eprintln!("rotated {id}; the new key is shown once:");
            println!("{}", key.expose());
        }
    }
    Ok(())
}

pub(crate) fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("NETPROC_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
    };
}

async fn serve(config: &Path) -> Result<(), Failure> {
    let file = ServerFile::load(config).map_err(usage)?;
    init_logging(file.log_format);
    if let Some(addr) = file.metrics_addr {
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(addr)
            .install()
            .map_err(|e| failed(format!("metrics endpoint {addr}: {e}")))?;
        tracing::info!(%addr, "Prometheus metrics at /metrics");
    }
    let (builder, keys) = file.builder(config).map_err(usage)?;
    let server = builder
        // A built-in diagnostic function, for `netproc bench`.
        .function("echo", |_: CallContext, (v,): (Value,)| async move {
            Ok::<_, CallError>(v)
        })
        .start()
        .await
        .map_err(failed)?;
    server.follow_key_store(&keys);
    if let Some(ms) = file.watch_interval_ms {
        server.watch_files(file.watched_files(), Duration::from_millis(ms.max(100)));
    }
    println!("listening on {}", server.local_addr());
    // SIGHUP reloads; SIGINT or SIGTERM ends the loop.
    while let Signal::Reload = wait_for_signal().await {
        match server.reload().await {
            Ok(closed) => tracing::info!(
                sessions_closed = closed,
                "reloaded certificates, CRLs and keys"
            ),
            Err(e) => {
                tracing::warn!(error = %e, "reload refused; the last good configuration stays")
            }
        }
    }
    tracing::info!("shutting down");
    server.shutdown(Duration::from_secs(10)).await;
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

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::*;

    fn parse(line: &str) -> Command {
        let args = std::iter::once("netproc").chain(line.split_whitespace());
        match Cli::try_parse_from(args) {
            Ok(cli) => cli.command,
            Err(e) => panic!("{line}: {e}"),
        }
    }

    #[test]
    fn the_model_is_consistent() {
        Cli::command().debug_assert();
    }

    /// Every form docs/operations.md shows parses into the operation it names.
    #[test]
    fn documented_command_lines_parse() {
        let c = "--config client.toml server_1";
        assert!(matches!(
            parse(&format!("constants {c} set limit 10")),
            Command::Constants { action: Some(ConstantsAction::Set { name, value }), .. }
                if name == "limit" && value == "10"
        ));
        assert!(matches!(
            parse(&format!("constants {c}")),
            Command::Constants { action: None, .. }
        ));
        assert!(matches!(
            parse(&format!("constants {c} unset limit")),
            Command::Constants {
                action: Some(ConstantsAction::Unset { .. }),
                ..
            }
        ));
        assert!(matches!(
            parse(&format!("dependency {c} define geo --source geo.rhai")),
            Command::Dependency { action: Some(DependencyAction::Define { alias, source: Some(_), host: None }), .. }
                if alias == "geo"
        ));
        assert!(matches!(
            parse(&format!("dependency {c} define text --host text")),
            Command::Dependency {
                action: Some(DependencyAction::Define {
                    source: None,
                    host: Some(_),
                    ..
                }),
                ..
            }
        ));
        assert!(matches!(
            parse(&format!("dependency {c} undefine geo --force")),
            Command::Dependency {
                action: Some(DependencyAction::Undefine { force: true, .. }),
                ..
            }
        ));
        for (op, want) in [
            ("info", "Info"),
            ("sessions", "Sessions"),
            ("blocked", "Blocked"),
            ("limits", "Limits"),
            ("metrics", "Metrics"),
            ("reload", "Reload"),
            ("disconnect-session 42", "DisconnectSession { id: 42 }"),
            (
                "disconnect-principal alice",
                "DisconnectPrincipal { principal: \"alice\" }",
            ),
            ("unblock 203.0.113.7", "Unblock { entry: \"203.0.113.7\" }"),
        ] {
            let Command::Admin { target, op: got } = parse(&format!("admin {c} {op}")) else {
                panic!("{op}")
            };
            assert_eq!(format!("{got:?}"), want);
            assert_eq!(target.server, "server_1");
        }
    }

    #[test]
    fn malformed_command_lines_are_usage_errors() {
        for line in [
            "admin --config c.toml s1",
            "admin --config c.toml s1 disconnect-session forty-two",
            "admin --config c.toml s1 bogus",
            "constants --config c.toml s1 set limit",
            "dependency --config c.toml s1 define geo",
            "dependency --config c.toml s1 define geo --source a.rhai --host text",
        ] {
            let args = std::iter::once("netproc").chain(line.split_whitespace());
            assert!(Cli::try_parse_from(args).is_err(), "{line}");
        }
    }
}
