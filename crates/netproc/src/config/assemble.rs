//! A server file made into a server: TLS material loaded, key store opened,
//! scripts, state and propagation wired, reload sources set.

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::{ConfigError, PropagationConfig, ScriptsConfig, ServerFile, invalid};
use crate::auth::ApiKeyStore;
use crate::pki::{Crl, Identity, TrustAnchors};
use crate::script::{ScriptLimits, ScriptRuntime};
use crate::server::{Server, ServerBuilder};

impl ServerFile {
    /// `[shared_limits]` as the server takes it: the password put into the
    /// URL, the CA read, the scopes checked (errors name the field).
    fn shared_limits(
        &self,
        c: &crate::config::SharedLimitsConfig,
        config_path: &Path,
    ) -> Result<crate::server::SharedLimits, ConfigError> {
        let err = |field: &str, e: &dyn std::fmt::Display| {
            invalid(config_path, format!("shared_limits.{field}: {e}"))
        };
        let password = super::password_from(
            &self.dir,
            c.password_env.as_ref(),
            c.password_file.as_ref(),
            ("password_env", "password_file"),
        )
        .map_err(|(field, e)| err(field, &e))?;
        let url = match password {
            Some(pw) => with_password(&c.redis_url, &pw).map_err(|e| err("redis_url", &e))?,
            None => c.redis_url.clone(),
        };
        let mut shared = crate::server::SharedLimits::new(url, c.fleet.clone());
        for scope in &c.share {
            if !["per_api_key", "per_ip", "failed_auth"].contains(&scope.as_str()) {
                return Err(err(
                    "share",
                    &format!("{scope:?}: expected per_api_key, per_ip or failed_auth"),
                ));
            }
        }
        let has = |s: &str| c.share.iter().any(|x| x == s);
        shared = shared
            .share_keys(has("per_api_key"))
            .share_addresses(has("per_ip"))
            .share_failures(has("failed_auth"));
        if let Some(e) = c.epsilon {
            if !(0.001..=0.5).contains(&e) {
                return Err(err("epsilon", &"between 0.001 and 0.5"));
            }
            shared = shared.epsilon(e);
        }
        if let Some(f) = c.fallback_share {
            if !(0.001..=1.0).contains(&f) {
                return Err(err("fallback_share", &"between 0.001 and 1"));
            }
            shared = shared.fallback_share(f);
        }
        if let Some(ca) = &c.ca {
            let pem = std::fs::read(self.resolve(ca)).map_err(|e| err("ca", &e))?;
            shared = shared.ca_pem(pem);
        }
        Ok(shared)
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

    /// Opens the key store the file names. It must exist: a server over no
    /// keys would refuse every client with `authentication_failed` and say
    /// nothing, so a missing file is an error naming `key_store`.
    pub fn open_key_store(&self, config_path: &Path) -> Result<ApiKeyStore, ConfigError> {
        let path = self.resolve(&self.key_store);
        if !path.exists() {
            return Err(invalid(
                config_path,
                format!(
                    "key_store: {}: no such file; `netproc keys create --store {}` creates it",
                    path.display(),
                    path.display()
                ),
            ));
        }
        ApiKeyStore::open(path).map_err(|e| invalid(config_path, format!("key_store: {e}")))
    }

    /// A server builder from this file: TLS files loaded, key store opened,
    /// scripts and state directory set, and a reload source re-reading the
    /// TLS files and the key store. Add native functions, then `start`; call
    /// `follow_key_store` with the returned store so revocations end live
    /// sessions. A file whose propagation comes through the broker
    /// (`propagation.transport = "amqp"`) is refused here: use
    /// [`assemble`](Self::assemble), which also gives the broker consumer.
    pub fn builder(
        &self,
        config_path: &Path,
    ) -> Result<(ServerBuilder, Arc<ApiKeyStore>), ConfigError> {
        let a = self.assemble(config_path)?;
        if a.amqp_receiver.is_some() {
            return Err(invalid(
                config_path,
                "propagation.transport = \"amqp\" needs ServerFile::assemble (it runs the broker consumer)",
            ));
        }
        Ok((a.builder, a.keys))
    }

    /// [`builder`](Self::builder), plus the broker consumer when
    /// propagation comes through RabbitMQ: run it (`AmqpReceiver::run`)
    /// beside the started server, until shutdown.
    pub fn assemble(&self, config_path: &Path) -> Result<Assembled, ConfigError> {
        let err = |e: &dyn fmt::Display| invalid(config_path, e);
        let (identity, roots, crls) = self.tls_material().map_err(|e| err(&e))?;
        let keys = Arc::new(self.open_key_store(config_path)?);
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
            // The file is read once: to say plainly which changed settings
            // this reload does not apply (in the log and in the reply), and
            // for the trusted authority keys.
            let now = ServerFile::load(&path);
            let restart_required = match &now {
                Ok(now) => file
                    .restart_required(now)
                    .into_iter()
                    .map(str::to_owned)
                    .collect(),
                Err(e) => {
                    tracing::warn!(error = %e, "the server file no longer loads; the running settings stay");
                    Vec::new()
                }
            };
            if let Some(target) = &reload_target {
                let now = now.map_err(|e| e.to_string())?;
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
            let (identity, roots, crls) = file.tls_material()?;
            Ok(crate::server::ReloadMaterial::new(identity, roots, crls)
                .with_restart_required(restart_required))
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
        if !self.proxy_protocol_from.is_empty() {
            let trusted = self
                .proxy_protocol_from
                .iter()
                .map(|p| p.parse())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| invalid(config_path, format!("proxy_protocol_from: {e}")))?;
            builder = builder.proxy_protocol_from(trusted);
        }
        if let Some(shared) = &self.shared_limits {
            builder = builder.shared_limits(self.shared_limits(shared, config_path)?);
        }
        if let Some(db) = state {
            builder = builder.state(db);
        }
        let amqp_receiver = match (self.propagation.as_ref().filter(|p| p.enabled), &target) {
            (Some(p), Some(target)) if p.transport.as_deref() == Some("amqp") => {
                let settings = p
                    .amqp
                    .as_ref()
                    .ok_or_else(|| err(&"propagation.amqp: needed with transport = \"amqp\""))?;
                let amqp = settings
                    .config(&self.dir)
                    .map_err(|e| err(&format!("propagation.{e}")))?;
                let key_path = p
                    .reply_key
                    .as_ref()
                    .map(|k| self.resolve(k))
                    .ok_or_else(|| {
                        err(&"propagation.reply_key: needed with transport = \"amqp\"")
                    })?;
                let reply_key = super::read_ed25519_seed(&key_path)
                    .map_err(|e| err(&format!("propagation.reply_key: {e}")))?;
                Some(
                    crate::propagation::AmqpReceiver::new(amqp, Arc::clone(target), reply_key)
                        .map_err(|e| err(&format!("propagation: {e}")))?,
                )
            }
            _ => None,
        };
        Ok(Assembled {
            builder,
            keys,
            amqp_receiver,
        })
    }
}

/// A server file made ready to start: see [`ServerFile::assemble`].
#[non_exhaustive]
pub struct Assembled {
    /// The server's builder.
    pub builder: ServerBuilder,
    /// Its key store (give it to `follow_key_store` once started).
    pub keys: Arc<ApiKeyStore>,
    /// The broker consumer, when `propagation.transport = "amqp"`.
    pub amqp_receiver: Option<crate::propagation::AmqpReceiver>,
}

impl std::fmt::Debug for Assembled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Assembled")
            .field("amqp_receiver", &self.amqp_receiver)
            .finish_non_exhaustive()
    }
}

/// `redis://host…` with `:password@` put in (percent-encoded); refused when
/// the URL already has one.
fn with_password(url: &str, password: &str) -> Result<String, String> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| "expected redis://… or rediss://…".to_owned())?;
    if rest.split('/').next().unwrap_or("").contains('@') {
        return Err("the URL has credentials already; give the password in one place".into());
    }
    Ok(format!(
        "{scheme}://:{}@{rest}",
        super::percent_encode(password)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_is_encoded_into_the_url_once() {
        assert_eq!(
            with_password("redis://h:6379/0", "p@ss:w/rd").unwrap(),
            "redis://:p%40ss%3Aw%2Frd@h:6379/0"
        );
        assert!(with_password("redis://:x@h:6379", "y").is_err());
        assert!(with_password("h:6379", "y").is_err());
    }
}
