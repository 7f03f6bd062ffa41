//! TOML configuration for servers and clients.
//!
//! Paths in a file are relative to the file's directory. Unknown fields are
//! errors; an error names the file, the line and the field.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::auth::ApiKeyStore;
use crate::client::{Client, ServerEndpoint};
use crate::pki::{Crl, Ed25519Key, Identity, TrustAnchors};
use crate::script::{ScriptLimits, ScriptRuntime};
use crate::server::{
    AuthControls, ConnectionControls, RequestControls, Server, ServerBuilder, ServerOptions,
    SessionControls,
};
use crate::wire::SecretString;

/// A configuration file could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid: the message names the line and the field.
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong, where.
        message: String,
    },
}

fn read<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    let invalid = |e: toml::de::Error, field: Option<String>| {
        let line = e
            .span()
            .map(|span| text[..span.start.min(text.len())].matches('\n').count() + 1);
        let mut message = String::new();
        if let Some(line) = line {
            message.push_str(&format!("line {line}: "));
        }
        // The field path (`auth_controls.block_duration_ms`); when the
        // message names the field itself (an unknown field), its table.
        if let Some(field) = field.filter(|f| !f.is_empty() && f != ".") {
            let (parent, last) = field.rsplit_once('.').unwrap_or(("", &field));
            let shown = if e.message().contains(&format!("`{last}`")) {
                parent
            } else {
                &field
            };
            if !shown.is_empty() {
                message.push_str(&format!("{shown}: "));
            }
        }
        message.push_str(e.message().trim_end());
        ConfigError::Invalid {
            path: path.to_owned(),
            message,
        }
    };
    let de = toml::Deserializer::parse(&text).map_err(|e| invalid(e, None))?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        let field = e.path().to_string();
        invalid(e.into_inner(), Some(field))
    })
}
/// `p` as written in a file in `dir`: absolute as is, else relative to `dir`.
fn relative_to(dir: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_owned()
    } else {
        dir.join(p)
    }
}

fn invalid(path: &Path, message: impl fmt::Display) -> ConfigError {
    ConfigError::Invalid {
        path: path.to_owned(),
        message: message.to_string(),
    }
}

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
    /// Reload when the TLS files or the key store change, checking every
    /// this many milliseconds. Off when absent (SIGHUP and
    /// `netproc admin reload` always work).
    pub watch_interval_ms: Option<u64>,
    /// Receive credentials from a propagation authority.
    pub propagation: Option<PropagationConfig>,
    #[serde(skip)]
    dir: PathBuf,
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
}

impl PropagationConfig {
    /// The trusted keys, decoded.
    fn public_keys(&self) -> Result<Vec<[u8; 32]>, String> {
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

/// 64 hex digits (surrounding whitespace ignored) → 32 bytes.
fn parse_hex32(text: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(text.trim(), &mut out)
        .ok()
        .map(|()| out)
}

/// Appends `bytes` as lowercase hex, with no intermediate strings (the
/// bytes may be a secret seed).
fn push_hex(out: &mut String, bytes: &[u8; 32]) {
    let mut digits = zeroize::Zeroizing::new([0u8; 64]);
    // 64 digits for 32 bytes: the lengths match, so encoding cannot fail.
    if hex::encode_to_slice(bytes, &mut digits[..]).is_ok() {
        out.extend(digits.iter().map(|&d| char::from(d)));
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
        }
        Ok(file)
    }
    fn resolve(&self, p: &Path) -> PathBuf {
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

    /// The files a reload re-reads: certificate, key, CA bundle, CRLs, key store.
    pub fn watched_files(&self) -> Vec<PathBuf> {
        let t = &self.tls;
        [&t.cert, &t.key, &t.client_ca]
            .into_iter()
            .chain(&t.crls)
            .chain([&self.key_store])
            .map(|p| self.resolve(p))
            .collect()
    }

    /// Reads the TLS files (for a start or a reload).
    pub fn tls_material(&self) -> Result<(Identity, TrustAnchors, Vec<Crl>), String> {
        let identity = Identity::load(self.resolve(&self.tls.cert), self.resolve(&self.tls.key))
            .map_err(|e| format!("tls.cert / tls.key: {e}"))?;
        let roots = TrustAnchors::load(self.resolve(&self.tls.client_ca))
            .map_err(|e| format!("tls.client_ca: {e}"))?;
        let crls = self
            .tls
            .crls
            .iter()
            .map(|p| Crl::load(self.resolve(p)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("tls.crls: {e}"))?;
        Ok((identity, roots, crls))
    }

    /// A server builder from this file: TLS files loaded, key store opened,
    /// scripts and state directory set, and a reload source re-reading the
    /// TLS files and the key store. Add native functions, then `start`; call
    /// `follow_key_store` with the returned store so revocations end live
    /// sessions.
    pub fn builder(
        &self,
        config_path: &Path,
    ) -> Result<(ServerBuilder, Arc<ApiKeyStore>), ConfigError> {
        let err = |e: &dyn fmt::Display| invalid(config_path, e);
        let (identity, roots, crls) = self.tls_material().map_err(|e| err(&e))?;
        let keys = Arc::new(ApiKeyStore::open(self.resolve(&self.key_store)).map_err(|e| err(&e))?);
        // Propagation: the target holds received keys in the state directory.
        // One state database, shared by the server and the propagation
        // target (each with its own tables).
        let state = match self.state_dir.as_ref().map(|d| self.resolve(d)) {
            Some(dir) => Some(
                crate::server::StateDatabase::open(&dir)
                    .map_err(|e| err(&format!("state_dir: {e}")))?,
            ),
            None => None,
        };
        let target = match (self.propagation.as_ref().filter(|p| p.enabled), &state) {
            (Some(p), Some(db)) => {
                let mut target = crate::propagation::TargetConfig::new(
                    p.target_name.clone().unwrap_or_else(|| self.name.clone()),
                    p.public_keys().map_err(|e| err(&e))?,
                );
                if let Some(ms) = p.freshness_ms {
                    target.freshness = Duration::from_millis(ms);
                }
                Some(
                    crate::propagation::PropagationTarget::open(target, Arc::clone(&keys), db)
                        .map_err(|e| err(&e))?,
                )
            }
            _ => None,
        };
        // A reload re-reads the key store, the TLS files and, with
        // propagation, the trusted authority keys from this file.
        let reload_keys = Arc::clone(&keys);
        let file = self.clone();
        let reload_target = target.clone();
        let path = config_path.to_owned();
        let source: crate::server::ReloadSource = Arc::new(move || {
            if let Some(target) = &reload_target {
                let now = ServerFile::load(&path).map_err(|e| e.to_string())?;
                let trusted = now
                    .propagation
                    .as_ref()
                    .filter(|p| p.enabled)
                    .map(PropagationConfig::public_keys)
                    .transpose()?
                    .unwrap_or_default();
                target
                    .set_authority_keys(trusted)
                    .map_err(|e| e.to_string())?;
            }
            reload_keys.reload().map_err(|e| e.to_string())?;
            file.tls_material()
        });
        let mut builder = Server::builder(self.name.clone(), identity, roots, Arc::clone(&keys))
            .reload_source(source)
            .bind(self.bind)
            .crls(crls)
            .options(self.options());
        let scripts = self.scripts.clone().unwrap_or(ScriptsConfig {
            enabled: true,
            workers: None,
            max_operations: None,
            wall_clock_ms: None,
        });
        if scripts.enabled {
            let mut limits = ScriptLimits::default();
            if let Some(n) = scripts.max_operations {
                limits.max_operations = n;
            }
            if let Some(ms) = scripts.wall_clock_ms {
                limits.wall_clock_ms = ms;
            }
            let mut rt = ScriptRuntime::builder().limits(limits);
            if let Some(n) = scripts.workers {
                rt = rt.workers(n);
            }
            builder = builder.scripts(rt.build());
        }
        if let Some(target) = &target {
            builder = target.install(builder);
        }
        if let Some(db) = state {
            builder = builder.state(db);
        }
        Ok((builder, keys))
    }
}

/// One `[servers.<name>]` entry of a client file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct ClientServer {
    /// The server's address.
    pub address: SocketAddr,
    /// The name its certificate must be valid for.
    pub server_name: String,
    /// This client's certificate (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM, mode 0600).
    pub key: PathBuf,
    /// The CA that signs the server's certificate.
    pub ca: PathBuf,
    /// A file holding the API key (mode 0600).
    pub api_key_file: Option<PathBuf>,
    /// An environment variable holding the API key.
    pub api_key_env: Option<String>,
    /// The API key inline (allowed, but warned about).
    pub api_key: Option<String>,
    /// Local address to connect from.
    pub bind: Option<IpAddr>,
    /// Default call deadline, ms. Default 30 000.
    pub request_timeout_ms: Option<u64>,
}

/// A client configuration file.
///
/// ```toml
/// [servers.server_1]
/// address = "127.0.0.1:6767"
/// server_name = "localhost"
/// cert = "pki/client.crt"
/// key = "pki/client.key"
/// ca = "pki/ca.crt"
/// api_key_file = "client.key.txt"   # or api_key_env = "NETPROC_API_KEY"
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct ClientFile {
    /// The servers, by name (`all_servers` is reserved).
    pub servers: BTreeMap<String, ClientServer>,
    #[serde(skip)]
    dir: PathBuf,
}

impl ClientFile {
    /// Reads a client file.
    pub fn load(path: impl AsRef<Path>) -> Result<ClientFile, ConfigError> {
        let path = path.as_ref();
        let mut file: ClientFile = read(path)?;
        file.dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Ok(file)
    }
    fn resolve(&self, p: &Path) -> PathBuf {
        relative_to(&self.dir, p)
    }

    /// Builds the client: loads identities and CAs, reads the API keys (or
    /// Ed25519 keys).
    pub fn client(&self, config_path: &Path) -> Result<Client, ConfigError> {
        self.client_in(config_path, "servers")
    }

    /// [`client`](Self::client), naming fields under `section` in errors.
    fn client_in(&self, config_path: &Path, section: &str) -> Result<Client, ConfigError> {
        let mut builder = Client::builder();
        for (name, s) in &self.servers {
            let field = |f: &str| format!("{section}.{name}.{f}");
            let err =
                |f: &str, e: &dyn fmt::Display| invalid(config_path, format!("{}: {e}", field(f)));
            let key = match (&s.api_key_file, &s.api_key_env, &s.api_key) {
                (Some(file), None, None) => {
                    let bytes = crate::pki::read_secret_file(&self.resolve(file))
                        .map_err(|e| err("api_key_file", &e))?;
                    String::from_utf8_lossy(&bytes).trim().to_owned()
                }
                (None, Some(var), None) => {
                    std::env::var(var).map_err(|e| err("api_key_env", &e))?
                }
                (None, None, Some(inline)) => {
                    tracing::warn!(server = %name, "an inline api_key is readable by anyone who can read the config; prefer api_key_file or api_key_env");
                    inline.clone()
                }
                _ => {
                    return Err(invalid(
                        config_path,
                        format!(
                            "{}: give exactly one of api_key_file, api_key_env, api_key",
                            field("api_key")
                        ),
                    ));
                }
            };
            let identity = Identity::load(self.resolve(&s.cert), self.resolve(&s.key))
                .map_err(|e| err("cert", &e))?;
            let roots = TrustAnchors::load(self.resolve(&s.ca)).map_err(|e| err("ca", &e))?;
            // `npe_<id>_<seed hex>` (from `keys create --ed25519`) is an
            // Ed25519 key; anything else is an API key.
            let mut ep = match parse_ed25519_credential(&key) {
                Some(Ok((id, signing))) => ServerEndpoint::with_ed25519(
                    s.address,
                    s.server_name.clone(),
                    identity,
                    roots,
                    id,
                    Arc::new(signing),
                ),
                Some(Err(e)) => return Err(err("api_key", &e)),
                None => ServerEndpoint::new(
                    s.address,
                    s.server_name.clone(),
                    identity,
                    roots,
                    SecretString::new(key),
                ),
            };
            if let Some(ip) = s.bind {
                ep = ep.bind(ip);
            }
            if let Some(ms) = s.request_timeout_ms {
                ep = ep.request_timeout(Duration::from_millis(ms));
            }
            builder = builder.server(name.clone(), ep);
        }
        builder.build().map_err(|e| invalid(config_path, e))
    }
}

/// An authority configuration file: its database, its signing key, and
/// how to reach each target (the same fields as a client file's servers;
/// the API key there must hold `receive_credentials` on that server).
///
/// ```toml
/// database = "authority.db"
/// signing_key = "authority.ed25519"   # made by `netproc creds init`
///
/// [targets.server_1]
/// address = "127.0.0.1:6767"
/// server_name = "localhost"
/// cert = "pki/authority.crt"
/// key = "pki/authority.key"
/// ca = "pki/ca.crt"
/// api_key_file = "authority-server_1.key.txt"
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct AuthorityFile {
    /// The authority's SQLite database (created if missing).
    pub database: PathBuf,
    /// A file holding the authority's Ed25519 signing key (64 hex digits of
    /// seed, mode 0600).
    pub signing_key: PathBuf,
    /// Log format. Default text.
    #[serde(default)]
    pub log_format: LogFormat,
    /// Targets delivered to at once, at most. Default 16.
    pub max_concurrent_deliveries: Option<usize>,
    /// How long one delivery may take, ms. Default 5 000.
    pub delivery_timeout_ms: Option<u64>,
    /// The targets, by name (the name each server's propagation expects:
    /// its `propagation.target_name`, or its `name`).
    #[serde(default)]
    pub targets: BTreeMap<String, ClientServer>,
    #[serde(skip)]
    dir: PathBuf,
}

impl AuthorityFile {
    /// Reads an authority file.
    pub fn load(path: impl AsRef<Path>) -> Result<AuthorityFile, ConfigError> {
        let path = path.as_ref();
        let mut file: AuthorityFile = read(path)?;
        file.dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Ok(file)
    }

    /// The signing key file, resolved.
    pub fn signing_key_path(&self) -> PathBuf {
        relative_to(&self.dir, &self.signing_key)
    }

    /// Creates the signing key file if it does not exist; returns the
    /// public key (hex), for the servers' `authority_public_keys`.
    pub fn init_signing_key(&self) -> Result<String, String> {
        let path = self.signing_key_path();
        if !path.exists() {
            let key = Ed25519Key::generate().map_err(|e| e.to_string())?;
            let mut text = zeroize::Zeroizing::new(String::with_capacity(64));
            push_hex(&mut text, key.seed());
            crate::pki::write_secret_file(&path, text.as_bytes(), false)
                .map_err(|e| e.to_string())?;
        }
        Ok(hex::encode(self.signing_key()?.public_key()))
    }

    fn signing_key(&self) -> Result<Ed25519Key, String> {
        let path = self.signing_key_path();
        let bytes = crate::pki::read_secret_file(&path).map_err(|e| e.to_string())?;
        let mut seed = zeroize::Zeroizing::new([0u8; 32]);
        let text = std::str::from_utf8(&bytes).unwrap_or("");
        if hex::decode_to_slice(text.trim(), &mut *seed).is_err() {
            return Err(format!("{}: expected 64 hex digits", path.display()));
        }
        Ed25519Key::from_seed(&seed).map_err(|e| e.to_string())
    }

    /// Opens the authority: database, signing key, and a netproc client of
    /// every target. Blocking (opens the database).
    pub fn authority(
        &self,
        config_path: &Path,
    ) -> Result<crate::propagation::Authority, ConfigError> {
        let err = |e: &dyn fmt::Display| invalid(config_path, e);
        let key = self
            .signing_key()
            .map_err(|e| err(&format!("signing_key: {e}")))?;
        let clients = ClientFile {
            servers: self.targets.clone(),
            dir: self.dir.clone(),
        };
        let client = clients.client_in(config_path, "targets")?;
        let mut config = crate::propagation::AuthorityConfig::new(
            relative_to(&self.dir, &self.database),
            self.targets.keys().cloned().collect(),
        );
        if let Some(n) = self.max_concurrent_deliveries {
            config.max_concurrent_deliveries = n.max(1);
        }
        if let Some(ms) = self.delivery_timeout_ms {
            config.delivery_timeout = Duration::from_millis(ms.max(1));
        }
        let transport = Arc::new(crate::propagation::NetprocTransport::new(client));
        crate::propagation::Authority::open(config, key, transport).map_err(|e| err(&e))
    }
}

/// JSON ↔ [`Value`](crate::wire::Value), for command lines and files.
pub mod json {
    use std::collections::BTreeMap;

    use crate::wire::Value;

    /// A JSON value as a netproc value: integers that fit stay integers,
    /// other numbers are floats; an integer above `i64::MAX` is refused.
    pub fn to_value(j: serde_json::Value) -> Result<Value, String> {
        Ok(match j {
            serde_json::Value::Null => Value::Null,
            serde_json::Value::Bool(b) => Value::Bool(b),
            serde_json::Value::Number(n) => {
                if let Some(i) = n.as_i64() {
                    Value::Int(i)
                } else if n.is_u64() {
                    return Err(format!("{n} does not fit in a signed 64-bit integer"));
                } else {
                    Value::Float(n.as_f64().unwrap_or(f64::NAN))
                }
            }
            serde_json::Value::String(s) => Value::String(s),
            serde_json::Value::Array(a) => {
                Value::List(a.into_iter().map(to_value).collect::<Result<_, _>>()?)
            }
            serde_json::Value::Object(o) => Value::Map(
                o.into_iter()
                    .map(|(k, v)| Ok((k, to_value(v)?)))
                    .collect::<Result<BTreeMap<_, _>, String>>()?,
            ),
        })
    }

    /// A netproc value as JSON; bytes become an array of numbers.
    pub fn from_value(v: Value) -> serde_json::Value {
        match v {
            Value::Null => serde_json::Value::Null,
            Value::Bool(b) => b.into(),
            Value::Int(i) => i.into(),
            Value::Float(f) => {
                serde_json::Number::from_f64(f).map_or(serde_json::Value::Null, Into::into)
            }
            Value::String(s) => s.into(),
            Value::Bytes(b) => b.into_iter().map(serde_json::Value::from).collect(),
            Value::List(l) => l.into_iter().map(from_value).collect(),
            Value::Map(m) => m
                .into_iter()
                .map(|(k, v)| (k, from_value(v)))
                .collect::<serde_json::Map<_, _>>()
                .into(),
        }
    }
}

/// Parses an `npe_<key id>_<64 hex digits of seed>` credential; `None` when
/// the text is not one (an API key).
fn parse_ed25519_credential(text: &str) -> Option<Result<(String, Ed25519Key), String>> {
    let rest = text.strip_prefix("npe_")?;
    let parsed = (|| {
        let (id, hex) = rest.split_once('_').ok_or("expected npe_<id>_<seed>")?;
        let mut seed = zeroize::Zeroizing::new([0u8; 32]);
        if hex::decode_to_slice(hex, &mut *seed).is_err() {
            return Err("the Ed25519 seed must be 64 hex digits");
        }
        let key = Ed25519Key::from_seed(&seed).map_err(|_| "invalid Ed25519 seed")?;
        Ok((id.to_owned(), key))
    })();
    Some(parsed.map_err(str::to_owned))
}

/// Formats an Ed25519 credential for a key file: `npe_<key id>_<seed as 64
/// hex digits>`. A client config's `api_key_file` accepts it in place of an
/// API key. The result is secret; it is zeroized on drop.
pub fn format_ed25519_credential(id: &str, key: &Ed25519Key) -> zeroize::Zeroizing<String> {
    let mut out = zeroize::Zeroizing::new(format!("npe_{id}_"));
    out.reserve(64); // no reallocation, so no stray copy of the seed
    push_hex(&mut out, key.seed());
    out
}

#[cfg(test)]
mod ed25519_tests {
    use super::*;

    #[test]
    fn ed25519_credentials_round_trip_and_api_keys_are_not_taken_for_them() {
        let key = Ed25519Key::generate().unwrap();
        let text = format_ed25519_credential("abc123", &key);
        let (id, back) = parse_ed25519_credential(&text).unwrap().unwrap();
        assert_eq!(id, "abc123");
        assert_eq!(back.public_key(), key.public_key());
        assert!(parse_ed25519_credential("npk_abc_secret").is_none());
        assert!(parse_ed25519_credential("npe_abc_zz").unwrap().is_err());
        assert!(
            parse_ed25519_credential("npe_nounderscore")
                .unwrap()
                .is_err()
        );
    }
}
