//! The server file (`netproc serve --config`): its tables and checks.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{ConfigError, invalid, parse_hex32, read, relative_to};
use crate::server::{
    AuthControls, ConnectionControls, RequestControls, ServerOptions, SessionControls,
};

/// `[tls]` of a server file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct ServerTls {
    /// The server's certificate chain (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM, mode 0600).
    pub key: PathBuf,
    /// The CA bundle client certificates must chain to.
    pub client_ca: PathBuf,
    /// CRLs for client certificates.
    #[serde(default)]
    pub crls: Vec<PathBuf>,
}

/// `[scripts]` of a server file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct ScriptsConfig {
    /// Whether clients may define script functions. Default true.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Worker threads. Default: the available cores.
    pub workers: Option<usize>,
    /// Operations per call. Default 1 000 000.
    pub max_operations: Option<u64>,
    /// Wall-clock limit per call, ms. Default 1000.
    pub wall_clock_ms: Option<u64>,
}

fn yes() -> bool {
    true
}

/// Log output format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// A server configuration file (`netproc serve --config netproc.toml`).
///
/// ```toml
/// name = "server_1"
/// bind = "127.0.0.1:6767"
/// key_store = "keys.json"
/// state_dir = "state"            # optional: persist run-time definitions
/// log_format = "text"            # or "json"
/// metrics_addr = "127.0.0.1:9464"  # optional Prometheus endpoint
///
/// [tls]
/// cert = "pki/server.crt"
/// key = "pki/server.key"
/// client_ca = "pki/ca.crt"
/// crls = ["pki/ca.crl"]
///
/// [request_controls.per_connection]   # any abuse-control knob; defaults otherwise
/// burst_tokens = 800
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct ServerFile {
    /// The server's name, announced to clients.
    pub name: String,
    /// Listen address.
    pub bind: SocketAddr,
    /// TLS files.
    pub tls: ServerTls,
    /// The API-key store (JSON, mode 0600; see `netproc keys`).
    pub key_store: PathBuf,
    /// Where run-time definitions are kept; in memory when absent.
    pub state_dir: Option<PathBuf>,
    /// Log format. Default text.
    #[serde(default)]
    pub log_format: LogFormat,
    /// Serve Prometheus metrics (`GET /metrics`, plain HTTP) on this address.
    pub metrics_addr: Option<SocketAddr>,
    /// Script functions. Enabled with defaults when absent.
    pub scripts: Option<ScriptsConfig>,
    /// Admission, handshake and framing limits.
    #[serde(default)]
    pub connection_controls: ConnectionControls,
    /// Failed-authentication limits.
    #[serde(default)]
    pub auth_controls: AuthControls,
    /// Request limits.
    #[serde(default)]
    pub request_controls: RequestControls,
    /// Session limits.
    #[serde(default)]
    pub session_controls: SessionControls,
    /// Reload when the TLS files change, checking every this many
    /// milliseconds; off when absent (SIGHUP and `netproc admin reload`
    /// always work). The key store is watched in any case: every second,
    /// or at this interval when set.
    pub watch_interval_ms: Option<u64>,
    /// Receive credentials from a propagation authority.
    pub propagation: Option<PropagationConfig>,
    /// A local Unix socket for the admin operations (`netproc admin
    /// --socket PATH`), for the server's own user and `admin_socket_uids`:
    /// the way in when the admin's key is blocked. Off when absent. Its
    /// directory must not be writable by group or others.
    pub admin_socket: Option<PathBuf>,
    /// Other user ids allowed on `admin_socket`.
    #[serde(default)]
    pub admin_socket_uids: Vec<u32>,
    /// Share request budgets, failed logins and blocks with the fleet
    /// through Redis (docs/fleet.md).
    pub shared_limits: Option<SharedLimitsConfig>,
    /// Load balancers (addresses or networks, `10.0.0.2`, `10.1.0.0/16`)
    /// whose connections start with a PROXY protocol v2 header giving the
    /// client's address. Empty: none (the default).
    #[serde(default)]
    pub proxy_protocol_from: Vec<String>,
    #[serde(skip)]
    pub(super) dir: PathBuf,
}

/// `[shared_limits]` of a server file: one budget across every server of
/// a fleet, through Redis (docs/fleet.md).
///
/// ```toml
/// [shared_limits]
/// redis_url = "redis://10.0.0.9:6379"      # or rediss://… with `ca`
/// password_env = "NETPROC_REDIS_PASSWORD"  # or password_file, or in the URL
/// fleet = "payments"
/// ```
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct SharedLimitsConfig {
    /// `redis://host:port[/db]` or `rediss://…`; a password may be in it,
    /// but is better in `password_env` or `password_file`. Never logged.
    pub redis_url: String,
    /// An environment variable holding the password.
    pub password_env: Option<String>,
    /// A file holding the password (mode 0600).
    pub password_file: Option<PathBuf>,
    /// The fleet's name: servers with the same Redis and name share limits.
    pub fleet: String,
    /// For `rediss://`: the CA that signs Redis's certificate (PEM).
    pub ca: Option<PathBuf>,
    /// What is shared: any of `per_api_key`, `per_ip`, `failed_auth`
    /// (failed-login windows and blocks). Default: all three.
    #[serde(default = "all_scopes")]
    pub share: Vec<String>,
    /// The overshoot bound as a share of a bucket's burst. Default 0.05.
    pub epsilon: Option<f64>,
    /// Each server's share of a budget while Redis is unreachable.
    /// Default 1 / the servers last seen.
    pub fallback_share: Option<f64>,
}

fn all_scopes() -> Vec<String> {
    ["per_api_key", "per_ip", "failed_auth"]
        .map(str::to_owned)
        .to_vec()
}

/// `[propagation]` of a server file: this server receives credentials
/// from an authority (see `docs/propagation.md`). Needs `state_dir`, where
/// the received keys and the cursor are kept.
///
/// ```toml
/// [propagation]
/// enabled = true
/// authority_public_keys = ["<64 hex digits, from `netproc creds init`>"]
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct PropagationConfig {
    /// Off unless true.
    #[serde(default)]
    pub enabled: bool,
    /// Authority public keys (hex) whose events are accepted; several while
    /// the authority's key is being replaced.
    #[serde(default)]
    pub authority_public_keys: Vec<String>,
    /// The name the authority addresses this server by; the server's `name`
    /// when absent.
    pub target_name: Option<String>,
    /// How far an event's signing time may be from this server's clock, ms.
    /// Default 300 000.
    pub freshness_ms: Option<u64>,
    /// How deliveries arrive: `direct` (the authority dials this server
    /// over mTLS; the default) or `amqp` (this server dials out to the
    /// broker and consumes its queue; needs `amqp` and `reply_key`). The
    /// direct way stays open either way.
    pub transport: Option<String>,
    /// `transport = "amqp"`: the broker.
    pub amqp: Option<super::AmqpSettings>,
    /// `transport = "amqp"`: a file holding this server's Ed25519 reply
    /// key (64 hex digits of seed, mode 0600; `netproc creds reply-key`
    /// makes one and prints its public half for the authority's
    /// `amqp_targets.<name>.reply_public_key`).
    pub reply_key: Option<PathBuf>,
}

impl PropagationConfig {
    /// The trusted authority keys, decoded; the error names the bad one.
    pub fn public_keys(&self) -> Result<Vec<[u8; 32]>, String> {
        self.authority_public_keys
            .iter()
            .map(|k| {
                parse_hex32(k).ok_or_else(|| {
                    format!("propagation.authority_public_keys: {k:?} is not 64 hex digits")
                })
            })
            .collect()
    }
}

impl ServerFile {
    /// Reads and checks a server file.
    pub fn load(path: impl AsRef<Path>) -> Result<ServerFile, ConfigError> {
        let path = path.as_ref();
        let mut file: ServerFile = read(path)?;
        file.dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        file.options().validate().map_err(|e| invalid(path, e))?;
        if let Some(p) = file.propagation.as_ref().filter(|p| p.enabled) {
            if file.state_dir.is_none() {
                return Err(invalid(
                    path,
                    "propagation.enabled needs state_dir (received keys and the cursor are kept there)",
                ));
            }
            if p.public_keys().map_err(|e| invalid(path, e))?.is_empty() {
                return Err(invalid(
                    path,
                    "propagation.authority_public_keys: at least one key is needed",
                ));
            }
            match p.transport.as_deref() {
                None | Some("direct") => {}
                Some("amqp") if p.amqp.is_none() => {
                    return Err(invalid(
                        path,
                        "propagation.amqp: needed with transport = \"amqp\" (the broker)",
                    ));
                }
                Some("amqp") if p.reply_key.is_none() => {
                    return Err(invalid(
                        path,
                        "propagation.reply_key: needed with transport = \"amqp\"",
                    ));
                }
                Some("amqp") => {}
                Some(other) => {
                    return Err(invalid(
                        path,
                        format!(
                            "propagation.transport: {other:?}: expected \"direct\" or \"amqp\""
                        ),
                    ));
                }
            }
        }
        Ok(file)
    }
    pub(super) fn resolve(&self, p: &Path) -> PathBuf {
        relative_to(&self.dir, p)
    }

    /// The abuse-control and session settings.
    pub fn options(&self) -> ServerOptions {
        let mut o = ServerOptions::default();
        o.connection_controls = self.connection_controls.clone();
        o.auth_controls = self.auth_controls.clone();
        o.request_controls = self.request_controls.clone();
        o.session_controls = self.session_controls.clone();
        o
    }

    /// The TLS files a reload re-reads: certificate, key, CA bundle, CRLs
    /// (the key store is watched on its own: [`key_store_path`](Self::key_store_path)).
    pub fn watched_files(&self) -> Vec<PathBuf> {
        let t = &self.tls;
        [&t.cert, &t.key, &t.client_ca]
            .into_iter()
            .chain(&t.crls)
            .map(|p| self.resolve(p))
            .collect()
    }

    /// The settings of `now` (the file as it reads today) that differ from
    /// this one's and that a running server applies only after a restart:
    /// a reload applies the TLS files, CRLs, the key store and the trusted
    /// authority keys, nothing else.
    pub fn restart_required(&self, now: &ServerFile) -> Vec<&'static str> {
        fn differs<T: std::fmt::Debug>(a: &T, b: &T) -> bool {
            format!("{a:?}") != format!("{b:?}")
        }
        let without_keys = |p: &Option<PropagationConfig>| {
            p.clone().map(|mut p| {
                p.authority_public_keys.clear();
                p
            })
        };
        let mut changed = Vec::new();
        let mut check = |field: &'static str, differ: bool| {
            if differ {
                changed.push(field);
            }
        };
        check("name", self.name != now.name);
        check("bind", self.bind != now.bind);
        check("tls", differs(&self.tls, &now.tls));
        check("key_store", self.key_store != now.key_store);
        check("state_dir", self.state_dir != now.state_dir);
        check("log_format", self.log_format != now.log_format);
        check("metrics_addr", self.metrics_addr != now.metrics_addr);
        check("scripts", differs(&self.scripts, &now.scripts));
        check(
            "connection_controls",
            self.connection_controls != now.connection_controls,
        );
        check("auth_controls", self.auth_controls != now.auth_controls);
        check(
            "request_controls",
            self.request_controls != now.request_controls,
        );
        check(
            "session_controls",
            self.session_controls != now.session_controls,
        );
        check(
            "watch_interval_ms",
            self.watch_interval_ms != now.watch_interval_ms,
        );
        check("admin_socket", self.admin_socket != now.admin_socket);
        check("shared_limits", self.shared_limits != now.shared_limits);
        check(
            "proxy_protocol_from",
            self.proxy_protocol_from != now.proxy_protocol_from,
        );
        check(
            "admin_socket_uids",
            self.admin_socket_uids != now.admin_socket_uids,
        );
        check(
            "propagation",
            differs(
                &without_keys(&self.propagation),
                &without_keys(&now.propagation),
            ),
        );
        changed
    }

    /// The admin socket's path, resolved against the file's directory.
    pub fn admin_socket_path(&self) -> Option<PathBuf> {
        self.admin_socket.as_deref().map(|p| self.resolve(p))
    }

    /// The key store's path, resolved against the file's directory.
    pub fn key_store_path(&self) -> PathBuf {
        self.resolve(&self.key_store)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "name = \"s\"\nbind = \"127.0.0.1:7000\"\nkey_store = \"k.json\"\nstate_dir = \"st\"\n[tls]\ncert = \"a\"\nkey = \"b\"\nclient_ca = \"c\"\n";

    fn file(text: &str) -> ServerFile {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.toml");
        std::fs::write(&path, text).unwrap();
        ServerFile::load(&path).unwrap()
    }

    #[test]
    fn a_reload_names_the_settings_only_a_restart_applies() {
        let before = file(BASE);
        assert!(before.restart_required(&file(BASE)).is_empty());
        let key = "0".repeat(64);
        let with_propagation = format!(
            "{}[propagation]\nenabled = true\nauthority_public_keys = [\"{key}\"]\n",
            BASE.replace("7000", "7001")
        );
        assert_eq!(
            before.restart_required(&file(&with_propagation)),
            vec!["bind", "propagation"]
        );
        // The trusted keys are applied by a reload: not a restart field.
        let propagating = file(&with_propagation);
        let other_key = with_propagation.replace(&key, &"1".repeat(64));
        assert!(propagating.restart_required(&file(&other_key)).is_empty());
    }
}
