//! The propagation authority's file (`netproc creds --config`).

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use super::{
    ClientFile, ClientServer, ConfigError, LogFormat, invalid, push_hex, read, relative_to,
};
use crate::client::Client;
use crate::pki::Ed25519Key;

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
///
/// # Targets the authority cannot dial: through RabbitMQ.
/// [amqp]
/// url = "amqp://127.0.0.1:5672/%2f"
/// username = "netproc-authority"
/// password_env = "NETPROC_AMQP_PASSWORD"
///
/// [amqp_targets.server_2]
/// reply_public_key = "<64 hex digits: the public half of server_2's propagation.reply_key>"
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct AuthorityFile {
    /// The authority's SQLite database, or `postgres://user@host/db` for
    /// PostgreSQL (several authority processes share it); `netproc creds
    /// init` creates it (or its tables), every other command refuses a
    /// missing one.
    pub database: PathBuf,
    /// PostgreSQL: an environment variable holding the password.
    pub database_password_env: Option<String>,
    /// PostgreSQL: a file holding the password (mode 0600).
    pub database_password_file: Option<PathBuf>,
    /// PostgreSQL with `sslmode=require` or `verify-full`: the CA that
    /// signs the server's certificate (PEM).
    pub database_ca: Option<PathBuf>,
    /// PostgreSQL: the schema holding the tables (default: the
    /// connection's own).
    pub database_schema: Option<String>,
    /// PostgreSQL: the delivery lease, ms (default 10 000): one `netproc
    /// authority` delivers; a standby takes over once the leader has not
    /// renewed for this long.
    pub lease_ms: Option<u64>,
    /// PostgreSQL, a role that may only request changes: how long `creds
    /// ensure|rotate|revoke` wait for the leader to apply a request, ms
    /// (default 30 000).
    pub request_timeout_ms: Option<u64>,
    /// A file holding the authority's Ed25519 signing key (64 hex digits of
    /// seed, mode 0600). Needed by every authority process and by `creds
    /// init` and `creds sync`; on PostgreSQL, a role that may only request
    /// changes (`docs/propagation.md`, "Least privilege") goes without.
    #[serde(default)]
    pub signing_key: Option<PathBuf>,
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
    /// The broker, for `amqp_targets`.
    pub amqp: Option<super::AmqpSettings>,
    /// Targets reached through the broker (`[amqp]`), by name; a name is
    /// in `targets` or here, not both.
    #[serde(default)]
    pub amqp_targets: BTreeMap<String, AmqpTarget>,
    #[serde(skip)]
    dir: PathBuf,
}

/// A target reached through the broker.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct AmqpTarget {
    /// The public half of the target's reply key (64 hex digits): only
    /// replies it signs count.
    pub reply_public_key: String,
}

impl AuthorityFile {
    /// Reads an authority file.
    pub fn load(path: impl AsRef<Path>) -> Result<AuthorityFile, ConfigError> {
        let path = path.as_ref();
        let mut file: AuthorityFile = read(path)?;
        file.dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Ok(file)
    }

    /// The signing key file, resolved (`None`: not set).
    pub fn signing_key_path(&self) -> Option<PathBuf> {
        self.signing_key.as_ref().map(|k| relative_to(&self.dir, k))
    }

    /// Creates the signing key file if it does not exist; returns the
    /// public key (hex), for the servers' `authority_public_keys`.
    pub fn init_signing_key(&self) -> Result<String, String> {
        let path = self.signing_key_path().ok_or("signing_key: not set")?;
        if !path.exists() {
            let key = Ed25519Key::generate().map_err(|e| e.to_string())?;
            let mut text = zeroize::Zeroizing::new(String::with_capacity(64));
            push_hex(&mut text, key.seed());
            crate::pki::write_secret_file(&path, text.as_bytes(), false)
                .map_err(|e| e.to_string())?;
        }
        Ok(hex::encode(self.signing_key()?.public_key()))
    }

    /// `database` and its companions as the store takes them; errors name
    /// the field, and never carry the password.
    fn postgres_options(
        &self,
        config_path: &Path,
    ) -> Result<crate::propagation::PostgresOptions, ConfigError> {
        let err = |field: &str, e: &dyn fmt::Display| invalid(config_path, format!("{field}: {e}"));
        let mut o =
            crate::propagation::PostgresOptions::new(self.database.to_string_lossy().into_owned());
        o.password = super::password_from(
            &self.dir,
            self.database_password_env.as_ref(),
            self.database_password_file.as_ref(),
            ("database_password_env", "database_password_file"),
        )
        .map_err(|(field, e)| err(field, &e))?;
        if let Some(ca) = &self.database_ca {
            o.ca_pem = Some(
                std::fs::read(relative_to(&self.dir, ca)).map_err(|e| err("database_ca", &e))?,
            );
        }
        o.schema = self.database_schema.clone();
        Ok(o)
    }

    fn signing_key(&self) -> Result<Ed25519Key, String> {
        let path = self.signing_key_path().ok_or("not set")?;
        super::read_ed25519_seed(&path)
    }

    /// Opens the authority: database, signing key, and a netproc client of
    /// every target. Blocking (opens the database). A missing database is
    /// an error naming the field: only [`init_database`](Self::init_database)
    /// (`netproc creds init`) creates one, so a mistyped path cannot start
    /// an empty authority.
    pub fn authority(
        &self,
        config_path: &Path,
    ) -> Result<crate::propagation::Authority, ConfigError> {
        let database = relative_to(&self.dir, &self.database);
        if !self.is_postgres() && !database.exists() {
            return Err(invalid(
                config_path,
                format!(
                    "database: {}: no such file; `netproc creds init --config {}` creates it",
                    database.display(),
                    config_path.display()
                ),
            ));
        }
        let clients = ClientFile {
            servers: self.targets.clone(),
            dir: self.dir.clone(),
        };
        let client = clients.client_in(config_path, "targets")?;
        self.open(config_path, client, false)
    }

    /// Each target's transport: `direct` (mTLS) or `amqp`.
    pub fn transport_of(&self, target: &str) -> &'static str {
        if self.amqp_targets.contains_key(target) {
            "amqp"
        } else {
            "direct"
        }
    }

    /// Every target's name: direct and through the broker.
    pub fn target_names(&self) -> Vec<String> {
        self.targets
            .keys()
            .chain(self.amqp_targets.keys())
            .cloned()
            .collect()
    }

    /// The transport: direct for `targets`, the broker for `amqp_targets`.
    fn transport(
        &self,
        config_path: &Path,
        client: Client,
        authority: [u8; 32],
    ) -> Result<Arc<dyn crate::propagation::Transport>, ConfigError> {
        let direct = Arc::new(crate::propagation::NetprocTransport::new(client));
        if self.amqp_targets.is_empty() {
            return Ok(direct);
        }
        let err = |e: &dyn fmt::Display| invalid(config_path, e);
        if let Some(both) = self
            .amqp_targets
            .keys()
            .find(|n| self.targets.contains_key(*n))
        {
            return Err(err(&format!(
                "amqp_targets.{both}: also in targets; a target has one transport"
            )));
        }
        let settings = self
            .amqp
            .as_ref()
            .ok_or_else(|| err(&"amqp_targets: needs [amqp] (the broker)"))?;
        let config = settings.config(&self.dir).map_err(|e| err(&e))?;
        let mut keys = Vec::new();
        for (name, t) in &self.amqp_targets {
            let key = super::parse_hex32(&t.reply_public_key).ok_or_else(|| {
                err(&format!(
                    "amqp_targets.{name}.reply_public_key: expected 64 hex digits"
                ))
            })?;
            keys.push((name.clone(), key));
        }
        let broker: Arc<dyn crate::propagation::Transport> = Arc::new(
            crate::propagation::AmqpTransport::new(config, authority, keys)
                .map_err(|e| err(&format!("amqp_targets: {e}")))?,
        );
        let mut mixed = crate::propagation::MixedTransport::new();
        for name in self.targets.keys() {
            mixed.route(name.clone(), Arc::clone(&direct) as _);
        }
        for name in self.amqp_targets.keys() {
            mixed.route(name.clone(), Arc::clone(&broker));
        }
        Ok(Arc::new(mixed))
    }

    /// The certificate files the authority delivers with, by target name
    /// (resolved).
    pub fn target_cert_paths(&self) -> Vec<(String, PathBuf)> {
        self.targets
            .iter()
            .map(|(name, t)| (name.clone(), relative_to(&self.dir, &t.cert)))
            .collect()
    }

    /// Whether `database` is a PostgreSQL URL.
    pub fn is_postgres(&self) -> bool {
        let s = self.database.to_string_lossy();
        s.starts_with("postgres://") || s.starts_with("postgresql://")
    }

    /// Creates the authority's database if it does not exist (and its
    /// tables); needs the signing key, not the targets' files. Blocking.
    pub fn init_database(&self, config_path: &Path) -> Result<(), ConfigError> {
        // No deliveries happen here: a client of no server is enough.
        let client = Client::builder()
            .build()
            .map_err(|e| invalid(config_path, e))?;
        self.open(config_path, client, true).map(drop)
    }

    fn open(
        &self,
        config_path: &Path,
        client: Client,
        create: bool,
    ) -> Result<crate::propagation::Authority, ConfigError> {
        let err = |e: &dyn fmt::Display| invalid(config_path, e);
        // Without a signing key only a role that may only request changes
        // can work (it signs nothing): checked once the database has said.
        let ephemeral = self.signing_key.is_none() && self.is_postgres() && !create;
        let key = match ephemeral {
            true => Ed25519Key::generate().map_err(|e| err(&e))?,
            false => self
                .signing_key()
                .map_err(|e| err(&format!("signing_key: {e}")))?,
        };
        let mut config = crate::propagation::AuthorityConfig::new(
            relative_to(&self.dir, &self.database),
            self.target_names(),
        );
        if let Some(n) = self.max_concurrent_deliveries {
            config.max_concurrent_deliveries = n.max(1);
        }
        if let Some(ms) = self.delivery_timeout_ms {
            config.delivery_timeout = Duration::from_millis(ms.max(1));
        }
        config.create_database = create;
        if let Some(ms) = self.lease_ms {
            config.lease = Duration::from_millis(ms.max(100));
        }
        if let Some(ms) = self.request_timeout_ms {
            config.request_timeout = Duration::from_millis(ms.max(1));
        }
        if self.is_postgres() {
            config.postgres = Some(self.postgres_options(config_path)?);
        }
        let transport = self.transport(config_path, client, key.public_key())?;
        let authority =
            crate::propagation::Authority::open(config, key, transport).map_err(|e| match e {
                crate::propagation::AuthorityError::Unavailable(_) => ConfigError::Unavailable {
                    path: config_path.to_owned(),
                    message: format!("database: {e}"),
                },
                e => err(&e),
            })?;
        if ephemeral && !authority.requests_only() {
            return Err(err(
                &"signing_key: not set (only a PostgreSQL role that may only request changes goes without one)",
            ));
        }
        Ok(authority)
    }
}
