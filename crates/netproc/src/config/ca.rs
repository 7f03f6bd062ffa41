//! The enrollment service's file (`netproc ca serve --config ca.toml`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::{ConfigError, LogFormat, invalid, read, relative_to};

/// An enrollment service: where it listens, the online intermediate CA
/// (its key mode 0600, refused otherwise), the offline root it chains to,
/// and its state database.
///
/// ```toml
/// listen = "0.0.0.0:7443"                 # never the RPC port
/// names = ["ca.example.internal"]         # what clients dial; its certificate is issued for them
/// root = "pki/ca.crt"                     # the root, offline: only its certificate here
/// intermediate_cert = "pki/online.crt"    # `netproc pki issue-intermediate`
/// intermediate_key = "pki/online.key"
/// state = "enroll.db"
/// trust_domain = "example.internal"       # in each certificate's URI SAN
/// notifier = ["/usr/local/bin/page-ops"]  # pairing: told each request on stdin
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct CaFile {
    /// Where to listen.
    pub listen: SocketAddr,
    /// DNS names or IP addresses clients reach the service by.
    pub names: Vec<String>,
    /// The root CA certificate (PEM).
    pub root: PathBuf,
    /// The online intermediate's certificate (PEM).
    pub intermediate_cert: PathBuf,
    /// Its key (PEM, mode 0600).
    pub intermediate_key: PathBuf,
    /// Other roots during a CA rotation (PEM files): announced with every
    /// certificate issued and trusted for renewal — the next root before
    /// the switch, the previous one after it.
    #[serde(default)]
    pub bundle: Vec<PathBuf>,
    /// The token and issue database: a SQLite file (created if missing),
    /// or `postgres://user@host/db` so several service instances share it.
    pub state: PathBuf,
    /// PostgreSQL: an environment variable holding the password.
    pub state_password_env: Option<String>,
    /// PostgreSQL: a file holding the password (mode 0600).
    pub state_password_file: Option<PathBuf>,
    /// PostgreSQL with `sslmode=require` or `verify-full`: the server's CA.
    pub state_ca: Option<PathBuf>,
    /// PostgreSQL: the schema holding the tables (created if missing).
    pub state_schema: Option<String>,
    /// The trust domain of every issued URI SAN
    /// (`netproc://<trust_domain>/<profile>/<name>`). Default
    /// `netproc.local`.
    pub trust_domain: Option<String>,
    /// Client certificates' lifetime, hours (default 24).
    pub client_lifetime_hours: Option<u64>,
    /// Server certificates' lifetime, hours (default 24).
    pub server_lifetime_hours: Option<u64>,
    /// Connections per source address per minute (default 30).
    pub per_ip_per_minute: Option<u32>,
    /// Pairing: the program told about each request (argv, run without a
    /// shell; the message — name, source, time, the string to check, the
    /// code — on its standard input). Without it, pairing is off.
    #[serde(default)]
    pub notifier: Vec<String>,
    /// Pairing: how long a request waits for its code, seconds (default 600).
    pub pairing_ttl_s: Option<u64>,
    /// The credential authority (authority.toml) that registers the
    /// Ed25519 keys tokens grant (`enroll token create --privileges`), on
    /// every target of that file; `netproc authority` delivers them.
    pub authority: Option<PathBuf>,
    /// Where to serve Prometheus metrics (`/metrics`), if anywhere.
    pub metrics_addr: Option<SocketAddr>,
    /// Log format. Default text.
    #[serde(default)]
    pub log_format: LogFormat,
    #[serde(skip)]
    dir: PathBuf,
}

impl CaFile {
    /// Reads a CA file.
    pub fn load(path: impl AsRef<Path>) -> Result<CaFile, ConfigError> {
        let path = path.as_ref();
        let mut file: CaFile = read(path)?;
        file.dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        if file.names.is_empty() {
            return Err(invalid(
                path,
                "names: at least one name clients reach the service by",
            ));
        }
        Ok(file)
    }

    /// The token store: SQLite, or PostgreSQL when `state` is a
    /// `postgres://` URL.
    pub async fn store(
        &self,
        config_path: &Path,
    ) -> Result<crate::enroll::TokenStore, ConfigError> {
        let state = self.state.to_string_lossy();
        if !(state.starts_with("postgres://") || state.starts_with("postgresql://")) {
            return crate::enroll::TokenStore::open(relative_to(&self.dir, &self.state))
                .map_err(|e| invalid(config_path, format!("state: {e}")));
        }
        let err =
            |field: &str, e: &dyn std::fmt::Display| invalid(config_path, format!("{field}: {e}"));
        let mut o = crate::enroll::PostgresStore::new(state.into_owned());
        o.password = super::password_from(
            &self.dir,
            self.state_password_env.as_ref(),
            self.state_password_file.as_ref(),
            ("state_password_env", "state_password_file"),
        )
        .map_err(|(field, e)| err(field, &e))?;
        if let Some(ca) = &self.state_ca {
            o.ca_pem =
                Some(std::fs::read(relative_to(&self.dir, ca)).map_err(|e| err("state_ca", &e))?);
        }
        o.schema = self.state_schema.clone();
        crate::enroll::TokenStore::connect_postgres(&o)
            .await
            .map_err(|e| match e {
                crate::enroll::EnrollError::State(_) => ConfigError::Unavailable {
                    path: config_path.to_owned(),
                    message: format!("state: {e}"),
                },
                e => err("state", &e),
            })
    }

    /// The root's certificate.
    pub fn root(
        &self,
        config_path: &Path,
    ) -> Result<rustls_pki_types::CertificateDer<'static>, ConfigError> {
        let anchors = crate::pki::TrustAnchors::load(relative_to(&self.dir, &self.root))
            .map_err(|e| invalid(config_path, format!("root: {e}")))?;
        anchors
            .certificates()
            .first()
            .cloned()
            .ok_or_else(|| invalid(config_path, "root: no certificate"))
    }

    /// The online intermediate (its key file must be mode 0600).
    pub fn intermediate(
        &self,
        config_path: &Path,
    ) -> Result<crate::pki::CertificateAuthority, ConfigError> {
        crate::pki::CertificateAuthority::load(
            relative_to(&self.dir, &self.intermediate_cert),
            relative_to(&self.dir, &self.intermediate_key),
        )
        .map_err(|e| {
            invalid(
                config_path,
                format!("intermediate_cert / intermediate_key: {e}"),
            )
        })
    }

    /// The credential authority of `authority`, if set: it registers the
    /// keys tokens grant, and its deny list keeps denied certificates from
    /// renewing. Blocking (opens the authority's database).
    pub fn authority(
        &self,
        config_path: &Path,
    ) -> Result<Option<(crate::propagation::Authority, Vec<String>)>, ConfigError> {
        let Some(path) = &self.authority else {
            return Ok(None);
        };
        let path = relative_to(&self.dir, path);
        let file = super::AuthorityFile::load(&path)
            .map_err(|e| invalid(config_path, format!("authority: {e}")))?;
        let authority = file.authority(&path)?;
        Ok(Some((authority, file.target_names())))
    }

    /// The registrar of granted keys through `authority` (see
    /// [`authority`](Self::authority)), on `targets`.
    pub fn registrar(
        authority: crate::propagation::Authority,
        targets: Vec<String>,
    ) -> std::sync::Arc<dyn crate::enroll::KeyRegistrar> {
        std::sync::Arc::new(AuthorityRegistrar { authority, targets })
    }

    /// The service's settings (the bundle's files read: errors name them).
    pub fn service_config(
        &self,
        config_path: &Path,
    ) -> Result<crate::enroll::EnrollConfig, ConfigError> {
        let mut c = crate::enroll::EnrollConfig::new(self.listen, self.names.clone());
        for file in &self.bundle {
            let anchors = crate::pki::TrustAnchors::load(relative_to(&self.dir, file))
                .map_err(|e| invalid(config_path, format!("bundle: {e}")))?;
            c.bundle.extend(anchors.certificates().iter().cloned());
        }
        if let Some(d) = &self.trust_domain {
            c.trust_domain = d.clone();
        }
        if let Some(h) = self.client_lifetime_hours {
            c.client_lifetime = Duration::from_secs(h.max(1) * 3600);
        }
        if let Some(h) = self.server_lifetime_hours {
            c.server_lifetime = Duration::from_secs(h.max(1) * 3600);
        }
        if let Some(n) = self.per_ip_per_minute {
            c.per_ip_per_minute = n.max(1);
        }
        if !self.notifier.is_empty() {
            c.notifier = Some(crate::enroll::Notifier::Command(self.notifier.clone()));
        }
        if let Some(s) = self.pairing_ttl_s {
            c.pairing_ttl = Duration::from_secs(s.clamp(10, 86_400));
        }
        Ok(c)
    }
}

/// Registers enrolled Ed25519 keys with the credential authority, on every
/// target of its file; the key id is the enrolled name with `.` and `_`
/// made `-`.
struct AuthorityRegistrar {
    authority: crate::propagation::Authority,
    targets: Vec<String>,
}

impl std::fmt::Debug for AuthorityRegistrar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthorityRegistrar")
            .field("targets", &self.targets)
            .finish_non_exhaustive()
    }
}

impl crate::enroll::KeyRegistrar for AuthorityRegistrar {
    fn register<'a>(
        &'a self,
        key: &'a crate::enroll::KeyRegistration,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<String, String>> + Send + 'a>>
    {
        Box::pin(async move {
            let id: String = key
                .name
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
                .collect();
            let privileges: crate::auth::PrivilegeSet = key
                .privileges
                .join(",")
                .parse()
                .map_err(|e| format!("privileges: {e}"))?;
            let mut spec = crate::auth::KeySpec::new(privileges)
                .binding(key.binding.parse().map_err(|e| format!("binding: {e}"))?);
            if let Some(functions) = &key.functions {
                spec = spec.functions(functions.clone());
            }
            let credential =
                crate::propagation::CredentialSpec::ed25519(id.clone(), key.public_key, spec)
                    .recreate(true);
            let targets: Vec<&str> = self.targets.iter().map(String::as_str).collect();
            self.authority
                .ensure(credential, &targets)
                .await
                .map_err(|e| e.to_string())?;
            Ok(id)
        })
    }
}
