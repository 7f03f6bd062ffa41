//! The `netproc` command: its clap model, the remote commands (call, define,
//! constants, dependency, admin, metrics) and their output. `pki`, `keys`,
//! `serve`, `creds`, `bench` and `demo` live in their own modules.

/// `println!` for command output, except that a closed stdout (`netproc …
/// | head -c 1`) ends the process quietly with exit 0, as Unix tools do,
/// instead of panicking.
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::cli::write_stdout(format_args!("{}\n", format_args!($($arg)*)))
    };
}

#[cfg(unix)]
mod admin_socket;
mod bench;
mod creds;
mod demo;
mod dev_pki;
mod doctor;
mod enroll;
mod keys;
pub(crate) mod output;
mod pki;
mod serve;

use keys::{KeysCommand, keys};
use pki::{PkiCommand, pki};
use serve::serve;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Parser, Subcommand};
use netproc::client::{Client, ClientError, ServerOutcome};
use netproc::config::{ClientFile, json};
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

/// Writes command output to stdout. A closed pipe ends the process with
/// exit 0 (the reader has what it wanted); any other write error with 1.
pub(crate) fn write_stdout(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(args).and_then(|()| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: cannot write the output: {e}");
        std::process::exit(1);
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
    /// JSON output (and errors as JSON on stderr) instead of tables and
    /// sentences. Output that is not a terminal is JSON anyway.
    #[arg(long, global = true)]
    pub(crate) json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Two servers in-process with a throwaway PKI: calls, all_servers, a script, refused clients.
    #[command(after_help = "Example: netproc demo")]
    Demo,
    /// Make and inspect certificates.
    #[command(subcommand)]
    Pki(PkiCommand),
    /// Manage an API-key store (only hashes are stored).
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Run a credential-propagation authority from a TOML file: deliver
    /// changes made with `netproc creds` to every target, until SIGINT or SIGTERM.
    #[command(after_help = "Example: netproc authority --config authority.toml")]
    Authority {
        /// The authority configuration.
        #[arg(long)]
        config: PathBuf,
    },
    /// The enrollment service: new hosts get short-lived certificates with a token.
    #[command(subcommand)]
    Ca(enroll::CaCommand),
    /// Get a certificate from an enrollment service with a one-time token
    /// (the key is made here and never sent), or make tokens (`token create`).
    #[command(
        after_help = "Example: netproc enroll --server ca.example:7443 --name alice --token npe1_… --ca-fingerprint 3a5f… --out tls/"
    )]
    Enroll(enroll::EnrollArgs),
    /// Drive an authority: init, ensure, rotate, revoke, status, sync, targets, list.
    #[command(subcommand)]
    Creds(creds::CredsCommand),
    /// Run a server from a TOML file.
    #[command(
        after_help = "Example: netproc serve --config netproc.toml --check && netproc serve --config netproc.toml"
    )]
    Serve {
        /// The server configuration.
        #[arg(long)]
        config: PathBuf,
        /// Check the configuration and every file it names (TLS files, CRLs,
        /// key store), print what was found and exit, without binding.
        #[arg(long)]
        check: bool,
    },
    /// Call a function on a server or on all_servers; prints the result as JSON.
    #[command(
        after_help = "Example: netproc call --config client.toml server_1 echo '\"hi\"'; netproc call all_servers add -d '[2, 3]' (with NETPROC_CONFIG set)"
    )]
    Call {
        #[command(flatten)]
        target: Target,
        /// The function.
        function: String,
        /// Arguments, each a JSON value.
        args: Vec<String>,
        /// All the arguments as one JSON array instead: inline, `@FILE`, or
        /// `@-` for standard input (e.g. `-d @args.json`).
        #[arg(short = 'd', long = "data", conflicts_with = "args")]
        data: Option<String>,
    },
    /// Define a script function from a source file.
    #[command(
        after_help = "Example: netproc define --config client.toml all_servers double --source double.rhai"
    )]
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
    #[command(after_help = "Example: netproc undefine --config client.toml all_servers double")]
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
    #[command(after_help = "Example: netproc functions --config client.toml server_1")]
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
    /// Administer a server: with a key that has admin_privileges, or on
    /// the server's machine through its local admin socket (`--socket`).
    ///
    /// Examples: `netproc admin --config client.toml server_1 blocked`,
    /// `netproc admin --socket /run/netproc/admin.sock unblock <key id>`.
    Admin {
        /// The client configuration (see `call`); not with --socket.
        #[arg(long, default_value_os_t = default_client_config())]
        config: PathBuf,
        /// A server name from the file, or all_servers; not with --socket.
        #[arg(required_unless_present = "socket")]
        server: Option<String>,
        /// The server's local admin socket (its `admin_socket`): no
        /// certificate or key, for the server's own user (and
        /// `admin_socket_uids`); failed logins from the network cannot
        /// block it.
        #[arg(long, conflicts_with = "server")]
        socket: Option<PathBuf>,
        /// The deadline of the operation (500ms, 5s, 1m).
        #[arg(long, value_parser = bench::parse_duration)]
        timeout: Option<Duration>,
        /// More log output on stderr: -v info, -vv debug.
        #[arg(short, long, action = clap::ArgAction::Count)]
        verbose: u8,
        #[command(subcommand)]
        op: AdminOp,
    },
    /// The abuse-control metrics of a server.
    #[command(after_help = "Example: netproc metrics --config client.toml server_1 --json")]
    Metrics {
        #[command(flatten)]
        target: Target,
    },
    /// A load generator: calls/s and latency percentiles.
    #[command(
        after_help = "Example: netproc bench --config client.toml server_1 --connections 4 --in-flight 32 --duration 5s"
    )]
    Bench(bench::BenchArgs),
    /// Check a client file and the servers it names (files, certificates,
    /// address, TCP, TLS, authentication, privileges, clock skew), or a
    /// server file with --server-config; each problem with a fix. Exit 0
    /// all good, 1 problems found, 2 bad usage.
    ///
    /// Examples: `netproc doctor`, `netproc doctor --config client.toml server_1`,
    /// `netproc doctor --server-config netproc.toml --json`.
    Doctor {
        /// The client configuration (default as for the remote commands).
        #[arg(long, default_value_os_t = default_client_config(), conflicts_with = "server_config")]
        config: PathBuf,
        /// Only this server of the client file (default: every one).
        server: Option<String>,
        /// Check this server configuration instead of a client file.
        #[arg(long)]
        server_config: Option<PathBuf>,
    },
    /// Who a server takes you to be: principal, key, privileges,
    /// allow-list, expiry, certificate binding, and the server's clock.
    #[command(after_help = "Example: netproc whoami --config client.toml server_1")]
    Whoami {
        #[command(flatten)]
        target: Target,
    },
    /// Print a shell completion script, e.g.
    /// `netproc completions bash > ~/.local/share/bash-completion/completions/netproc`.
    #[command(
        after_help = "Example: netproc completions bash > ~/.local/share/bash-completion/completions/netproc"
    )]
    Completions {
        /// The shell: bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

/// Which server(s), from which client file.
#[derive(Debug, clap::Args)]
pub(crate) struct Target {
    /// The client configuration. Default: `NETPROC_CONFIG`, else
    /// `$XDG_CONFIG_HOME/netproc/client.toml` (`~/.config/…`), which must
    /// not be writable by group or others.
    #[arg(long, default_value_os_t = default_client_config())]
    pub(crate) config: PathBuf,
    /// A server name from the file, or all_servers.
    pub(crate) server: String,
    /// The deadline of each operation (500ms, 5s, 1m); the server is told
    /// it. Default: the file's `request_timeout_ms`, else 30 s.
    #[arg(long, value_parser = bench::parse_duration)]
    pub(crate) timeout: Option<Duration>,
    /// More log output on stderr: -v info, -vv debug (NETPROC_LOG overrides).
    #[arg(short, long, action = clap::ArgAction::Count)]
    pub(crate) verbose: u8,
}

/// Runs `op` on one server, under `timeout` (`--timeout`) if given.
pub(crate) async fn run_on(
    server: &netproc::client::ServerRef,
    op: Operation,
    timeout: Option<Duration>,
) -> Result<Value, ClientError> {
    match timeout {
        Some(t) => server.execute_with_timeout(op, t).await,
        None => server.execute(op).await,
    }
}

#[derive(Debug, Subcommand)]
enum ConstantsAction {
    /// List the constants.
    #[command(after_help = "Example: netproc constants --config client.toml server_1 list")]
    List,
    /// Set a constant.
    #[command(after_help = "Example: netproc constants --config client.toml server_1 set limit 10")]
    Set {
        /// The constant's name.
        name: String,
        /// Its value, as JSON.
        value: String,
    },
    /// Remove a constant.
    #[command(after_help = "Example: netproc constants --config client.toml server_1 unset limit")]
    Unset {
        /// The constant's name.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
enum DependencyAction {
    /// List the dependencies.
    #[command(after_help = "Example: netproc dependency --config client.toml server_1 list")]
    List,
    /// Define a dependency from a Rhai source file or a host module.
    #[command(
        after_help = "Example: netproc dependency --config client.toml server_1 define geo --source geo.rhai"
    )]
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
    #[command(
        after_help = "Example: netproc dependency --config client.toml server_1 undefine geo --force"
    )]
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
    #[command(after_help = "Example: netproc admin --config client.toml server_1 info")]
    Info,
    /// The live sessions.
    #[command(after_help = "Example: netproc admin --config client.toml server_1 sessions")]
    Sessions,
    /// End one session.
    #[command(
        after_help = "Example: netproc admin --config client.toml server_1 disconnect-session 42"
    )]
    DisconnectSession {
        /// The session id, from `sessions`.
        id: u64,
    },
    /// End every session of a principal.
    #[command(
        after_help = "Example: netproc admin --config client.toml server_1 disconnect-principal k3x9q2m7w1ab"
    )]
    DisconnectPrincipal {
        /// The principal (key id or certificate identity).
        principal: String,
    },
    /// The blocked addresses and principals.
    #[command(after_help = "Example: netproc admin --socket run/admin.sock blocked")]
    Blocked,
    /// Lift a block.
    #[command(
        after_help = "Example: netproc admin --config client.toml server_1 unblock 203.0.113.7"
    )]
    Unblock {
        /// The entry, as `blocked` lists it.
        entry: String,
    },
    /// The abuse-control limits in force.
    #[command(after_help = "Example: netproc admin --config client.toml server_1 limits --json")]
    Limits,
    /// The abuse-control metrics, as JSON.
    #[command(after_help = "Example: netproc admin --config client.toml server_1 metrics")]
    Metrics,
    /// Re-read TLS files, the key store and propagation keys.
    #[command(after_help = "Example: netproc admin --config client.toml server_1 reload")]
    Reload,
}

pub(crate) async fn run(cli: Cli) -> Result<(), Failure> {
    output::set_json(cli.json);
    match cli.command {
        Command::Demo => demo::demo().await.map_err(Failure::from),
        Command::Pki(cmd) => {
            let publish = cmd.publish_to();
            pki(cmd)?;
            match publish {
                Some((config, cert)) => creds::deny_cert_file(&config, &cert).await,
                None => Ok(()),
            }
        }
        Command::Keys(cmd) => keys(cmd),
        Command::Serve {
            config,
            check: true,
        } => serve::check(&config),
        Command::Serve {
            config,
            check: false,
        } => serve(&config).await,
        Command::Authority { config } => creds::authority(&config).await,
        Command::Creds(cmd) => creds::creds(cmd).await,
        Command::Ca(cmd) => enroll::ca(cmd).await,
        Command::Enroll(args) => enroll::enroll(args).await,
        Command::Call {
            target,
            function,
            args,
            data,
        } => {
            let args = match data {
                Some(data) => data_args(&data)?,
                None => args
                    .iter()
                    .map(|a| {
                        let j: serde_json::Value = serde_json::from_str(a)
                            .map_err(|e| usage(format!("argument {a:?} is not JSON: {e}")))?;
                        json::to_value(j).map_err(usage)
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            };
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
        Command::Admin {
            config,
            server,
            socket,
            timeout,
            verbose,
            op,
        } => {
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
            match (socket, server) {
                (Some(path), _) => {
                    serve::init_client_logging(verbose);
                    let done = done(&op);
                    let v = admin_socket::run(&path, op, timeout).await?;
                    report(done, "the admin socket", false, v);
                    Ok(())
                }
                (None, Some(server)) => {
                    let target = Target {
                        config,
                        server,
                        timeout,
                        verbose,
                    };
                    execute(&target, op).await
                }
                (None, None) => Err(usage("admin: give a server name or --socket PATH")),
            }
        }
        Command::Metrics { target } => metrics(&target).await,
        Command::Bench(args) => bench::run(args).await,
        Command::Doctor {
            server_config: Some(path),
            ..
        } => doctor::server(&path),
        Command::Doctor { config, server, .. } => {
            serve::init_client_logging(0);
            doctor::client(&config, server.as_deref()).await
        }
        Command::Whoami { target } => whoami(&target).await,
        Command::Completions { shell } => {
            let mut script = Vec::new();
            clap_complete::generate(
                shell,
                &mut <Cli as clap::CommandFactory>::command(),
                "netproc",
                &mut script,
            );
            write_stdout(format_args!("{}", String::from_utf8_lossy(&script)));
            Ok(())
        }
    }
}

fn client(target: &Target) -> Result<Client, Failure> {
    serve::init_client_logging(target.verbose);
    let file = load_client_file(&target.config)?;
    file.client(&target.config).map_err(usage)
}

/// The per-user client file: `$XDG_CONFIG_HOME/netproc/client.toml`, or
/// `~/.config/netproc/client.toml`.
fn user_client_config() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("netproc").join("client.toml"))
}

/// `--config`'s default: `NETPROC_CONFIG`, else the per-user file.
fn default_client_config() -> PathBuf {
    std::env::var_os("NETPROC_CONFIG")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(user_client_config)
        .unwrap_or_else(|| PathBuf::from("client.toml"))
}

/// Loads a client file; the per-user default is refused if group or
/// others can write it (anyone who can edit it can point the client at
/// their server).
pub(crate) fn load_client_file(path: &Path) -> Result<ClientFile, Failure> {
    #[cfg(unix)]
    if user_client_config().as_deref() == Some(path) {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(path)
            && meta.permissions().mode() & 0o022 != 0
        {
            return Err(usage(format!(
                "{}: group or others can write it; `chmod go-w {}`",
                path.display(),
                path.display()
            )));
        }
    }
    ClientFile::load(path).map_err(usage)
}

/// Runs an operation on one server or all, prints JSON, and fails with the
/// error's code on stderr.
async fn execute(target: &Target, op: Operation) -> Result<(), Failure> {
    let client = client(target)?;
    if target.server == netproc::client::ALL_SERVERS {
        let all = client.all_servers();
        let results = match target.timeout {
            Some(t) => tokio::time::timeout(t, all.execute(op))
                .await
                .map_err(|_| {
                    failed(format!("timeout: no answer from every server within {t:?}"))
                })?,
            None => all.execute(op).await,
        };
        let any_error = results.values().any(Result::is_err);
        let out: BTreeMap<String, ServerOutcome<serde_json::Value>> = results
            .into_iter()
            .map(|(k, r)| (k, ServerOutcome::from(r.map(json::from_value))))
            .collect();
        output::show(&serde_json::to_value(&out).unwrap_or_default());
        return if any_error {
            Err(failed("some servers failed"))
        } else {
            Ok(())
        };
    }
    let server = client.server(&target.server).map_err(usage)?;
    let done = done(&op);
    let is_call = matches!(op, Operation::Invoke { .. });
    let v = run_on(&server, op, target.timeout)
        .await
        .map_err(|e| failed(describe(&e)))?;
    report(done, &target.server, is_call, v);
    Ok(())
}

/// Prints an operation's answer: for a change, what was done (`done`) on
/// `on`; a call's result as JSON; anything else with [`output::show`].
fn report(done: Option<String>, on: &str, is_call: bool, v: Value) {
    let message = match (done, &v) {
        // A change: say what was done, not `null`.
        (Some(what), Value::Null) => format!("{what} on {on}"),
        (Some(what), Value::Map(report)) if report.contains_key("restart_required") => {
            reload_line(&what, on, report)
        }
        (Some(what), Value::Int(n)) => format!("{what} on {on}: {n} session(s) closed"),
        (Some(what), Value::Bool(true)) => format!("{what} on {on}"),
        (Some(what), Value::Bool(false)) => format!("nothing to do: not {what} on {on}"),
        // A call's result is the function's value: JSON, always.
        (_, _) if is_call => {
            outln!(
                "{}",
                serde_json::to_string_pretty(&json::from_value(v)).unwrap_or_default()
            );
            return;
        }
        (_, _) => {
            output::show(&json::from_value(v));
            return;
        }
    };
    output::done(
        &message,
        serde_json::json!({"server": on, "result": json::from_value(v)}),
    );
}

/// What a changing operation did, for its success line; `None` for the
/// operations whose answer is the output (listings, calls).
fn done(op: &Operation) -> Option<String> {
    Some(match op {
        Operation::DefineFunction(def) => format!("defined function {}", def.name),
        Operation::UndefineFunction { name } => format!("removed function {name}"),
        Operation::DefineConstant { name, .. } => format!("set constant {name}"),
        Operation::UndefineConstant { name } => format!("removed constant {name}"),
        Operation::DefineDependency { alias, .. } => format!("defined dependency {alias}"),
        Operation::UndefineDependency { alias, .. } => format!("removed dependency {alias}"),
        Operation::DisconnectSession { session_id } => format!("disconnected session {session_id}"),
        Operation::DisconnectPrincipal { principal } => format!("disconnected {principal}"),
        Operation::Unblock { entry } => format!("unblocked {entry}"),
        Operation::Reload => "reloaded TLS files and keys".to_owned(),
        _ => return None,
    })
}

/// The success line of `admin reload`: sessions closed, and the changed
/// settings that need a restart, said plainly.
fn reload_line(what: &str, server: &str, report: &BTreeMap<String, Value>) -> String {
    let closed = match report.get("sessions_closed") {
        Some(Value::Int(n)) => *n,
        _ => 0,
    };
    let mut line = format!("{what} on {server}: {closed} session(s) closed");
    if let Some(Value::List(fields)) = report.get("restart_required")
        && !fields.is_empty()
    {
        let names: Vec<String> = fields
            .iter()
            .map(|f| match f {
                Value::String(s) => s.clone(),
                other => format!("{other:?}"),
            })
            .collect();
        line.push_str(&format!(
            "; restart_required: {} (changed in the file; they apply only after a restart)",
            names.join(", ")
        ));
    }
    line
}

/// `--data`: a JSON array of arguments, inline, from `@FILE` or from `@-`
/// (standard input).
fn data_args(data: &str) -> Result<Vec<Value>, Failure> {
    let text = match data.strip_prefix('@') {
        Some("-") => std::io::read_to_string(std::io::stdin())
            .map_err(|e| usage(format!("--data @-: {e}")))?,
        Some(file) => {
            std::fs::read_to_string(file).map_err(|e| usage(format!("--data @{file}: {e}")))?
        }
        None => data.to_owned(),
    };
    let j: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| usage(format!("--data is not JSON: {e}")))?;
    match json::to_value(j).map_err(usage)? {
        Value::List(args) => Ok(args),
        _ => Err(usage("--data must be a JSON array of the arguments")),
    }
}

fn describe(e: &ClientError) -> String {
    format!("{}: {e}", e.code())
}

async fn whoami(target: &Target) -> Result<(), Failure> {
    let client = client(target)?;
    let server = client.server(&target.server).map_err(usage)?;
    let me = match target.timeout {
        Some(t) => tokio::time::timeout(t, server.who_am_i())
            .await
            .map_err(|_| failed(format!("timeout: no answer within {t:?}")))?,
        None => server.who_am_i().await,
    }
    .map_err(|e| failed(describe(&e)))?;
    let mut j = serde_json::to_value(&me).unwrap_or_default();
    if !output::for_scripts() {
        // Times for people.
        for field in ["expires_at_ms", "cert_not_after_ms", "server_time_ms"] {
            if let Some(ms) = j[field].as_u64() {
                j[field] = output::rfc3339_ms(ms).into();
            }
        }
    }
    output::show(&j);
    Ok(())
}

async fn metrics(target: &Target) -> Result<(), Failure> {
    let client = client(target)?;
    let server = client.server(&target.server).map_err(usage)?;
    let v = run_on(&server, Operation::AbuseMetrics, target.timeout)
        .await
        .map_err(|e| failed(describe(&e)))?;
    output::show(&json::from_value(v));
    Ok(())
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

    /// `--help` tells the whole story: every argument has a description,
    /// every command that does something an example.
    #[test]
    fn every_flag_is_described_and_every_command_has_an_example() {
        fn walk(cmd: &clap::Command, path: &str, problems: &mut Vec<String>) {
            let path = format!("{path} {}", cmd.get_name()).trim().to_owned();
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if matches!(id, "help" | "version") {
                    continue;
                }
                if arg.get_help().is_none() && arg.get_long_help().is_none() {
                    problems.push(format!("{path}: argument {id} has no description"));
                }
            }
            if cmd.get_about().is_none() && path != "netproc" {
                problems.push(format!("{path}: no description"));
            }
            let text = format!(
                "{}{}",
                cmd.get_long_about()
                    .map(ToString::to_string)
                    .unwrap_or_default(),
                cmd.get_after_help()
                    .map(ToString::to_string)
                    .unwrap_or_default()
            );
            let has_subcommands = cmd.get_subcommands().next().is_some();
            if !has_subcommands && path != "netproc" && !text.contains("Example") {
                problems.push(format!("{path}: no example"));
            }
            for sub in cmd.get_subcommands() {
                if sub.get_name() != "help" {
                    walk(sub, &path, problems);
                }
            }
        }
        let mut problems = Vec::new();
        walk(&Cli::command(), "", &mut problems);
        assert!(problems.is_empty(), "{}", problems.join("\n"));
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
            let Command::Admin {
                server, op: got, ..
            } = parse(&format!("admin {c} {op}"))
            else {
                panic!("{op}")
            };
            assert_eq!(format!("{got:?}"), want);
            assert_eq!(server.as_deref(), Some("server_1"));
            // The same through the local admin socket.
            let Command::Admin {
                server: None,
                socket: Some(_),
                op: got,
                ..
            } = parse(&format!("admin --socket /run/netproc/admin.sock {op}"))
            else {
                panic!("--socket {op}")
            };
            assert_eq!(format!("{got:?}"), want);
        }
    }

    #[test]
    fn remote_commands_take_a_timeout_and_verbosity() {
        let Command::Call { target, .. } = parse("call --config c.toml s1 echo 1 --timeout 2s -vv")
        else {
            panic!()
        };
        assert_eq!(target.timeout, Some(Duration::from_secs(2)));
        assert_eq!(target.verbose, 2);
        let Command::Admin {
            timeout, verbose, ..
        } = parse("admin --config c.toml s1 -v --timeout 500ms info")
        else {
            panic!()
        };
        assert_eq!((timeout, verbose), (Some(Duration::from_millis(500)), 1));
        let args = [
            "netproc",
            "call",
            "--config",
            "c.toml",
            "s1",
            "f",
            "--timeout",
            "soon",
        ];
        assert!(Cli::try_parse_from(args).is_err());
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
