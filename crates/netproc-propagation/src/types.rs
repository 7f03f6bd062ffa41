//! The authority's public types: configuration, specs, errors, reports.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use netproc_auth::{ApiKey, KeySpec};

/// What went wrong in an authority operation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthorityError {
    /// No credential with this id.
    #[error("no credential with id {0:?}")]
    UnknownCredential(String),
    /// No target with this name.
    #[error("no target named {0:?}")]
    UnknownTarget(String),
    /// The credential or its targets are not valid.
    #[error("invalid credential: {0}")]
    Invalid(String),
    /// The credential is an Ed25519 key: it has no secret to rotate.
    #[error("credential {0} is an Ed25519 key; register a new public key with ensure instead")]
    NotAnApiKey(String),
    /// The database failed; nothing was changed.
    #[error("authority database: {0}")]
    Database(DatabaseError),
    /// The authority is shutting down.
    #[error("the authority is closed")]
    Closed,
    /// The database cannot be reached now (PostgreSQL down, the network
    /// cut); nothing was changed. Retrying later is safe.
    #[error("the authority's database cannot be reached: {0}")]
    Unavailable(String),
    /// Another process created this credential first (it has the secret);
    /// nothing was changed here.
    #[error("credential {0:?} was just created by another process")]
    AlreadyExists(String),
    /// This id was revoked; `ensure` brings it back only when asked to
    /// ([`CredentialSpec::recreate`], `netproc creds ensure --recreate`).
    #[error(
        "credential {0:?} was revoked; bring the id back with recreate (`netproc creds ensure --recreate`)"
    )]
    Revoked(String),
    /// PostgreSQL, a role that may only request changes: the request was
    /// recorded but no authority process applied it in time (none leads?).
    /// It stays queued and is applied when one does.
    #[error(
        "change request {request} is queued, but no authority process applied it in time (is `netproc authority` running?)"
    )]
    NotApplied {
        /// The request's number.
        request: u64,
    },
}

impl From<rusqlite::Error> for AuthorityError {
    fn from(e: rusqlite::Error) -> Self {
        AuthorityError::Database(DatabaseError::new("", e))
    }
}

/// A failure of the authority's database (or of decoding what it holds),
/// with its cause kept as the error's source.
#[derive(Debug, Clone)]
pub struct DatabaseError {
    context: String,
    source: std::sync::Arc<dyn std::error::Error + Send + Sync>,
}

impl DatabaseError {
    /// `source`, with what was being done (may be empty).
    pub fn new(
        context: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> DatabaseError {
        DatabaseError {
            context: context.into(),
            source: std::sync::Arc::from(source.into()),
        }
    }
}

impl std::fmt::Display for DatabaseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.context.is_empty() {
            write!(f, "{}", self.source)
        } else {
            write!(f, "{}: {}", self.context, self.source)
        }
    }
}

impl std::error::Error for DatabaseError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.source)
    }
}

/// Equal when they say the same (the causes are not comparable).
impl PartialEq for DatabaseError {
    fn eq(&self, other: &Self) -> bool {
        self.to_string() == other.to_string()
    }
}

impl Eq for DatabaseError {}

/// How an authority runs.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct AuthorityConfig {
    /// The SQLite database file (created if missing), or a `postgres://…`
    /// URL (feature `postgres`).
    pub database: PathBuf,
    /// The targets' names, as the transport knows them. A name seen for
    /// the first time gets a snapshot first.
    pub targets: Vec<String>,
    /// Targets delivered to at once, at most (16).
    pub max_concurrent_deliveries: usize,
    /// How long one delivery may take before it counts as failed (5 s).
    pub delivery_timeout: Duration,
    /// The first retry delay after a failure (200 ms); doubles per failure,
    /// with jitter, up to `max_backoff` (60 s).
    pub base_backoff: Duration,
    /// The longest retry delay.
    pub max_backoff: Duration,
    /// How often [`Authority::run`](crate::Authority::run) looks for work written by another
    /// process (250 ms), and how often it probes every target's cursor (60 s).
    pub poll_interval: Duration,
    /// See `poll_interval`.
    pub probe_interval: Duration,
    /// A snapshot larger than this (encoded credentials, bytes) is sent in
    /// parts (512 KiB; a part must fit the server's frame limit, 1 MiB by
    /// default).
    pub snapshot_part_bytes: usize,
    /// The store on PostgreSQL instead of SQLite (feature `postgres`). A
    /// `database` of `postgres://…` means the same, with default options.
    #[cfg(feature = "postgres")]
    pub postgres: Option<PostgresOptions>,
    /// PostgreSQL: how long the delivery lease lasts (10 s). The leader
    /// renews it every third of that; a standby takes over once it has
    /// expired. A leader that cannot renew in time stops delivering.
    pub lease: Duration,
    /// PostgreSQL only: create the tables if the database has none (what
    /// `netproc creds init` does). Without it such a database is refused,
    /// so a mistyped URL cannot start an empty authority. Default true.
    pub create_database: bool,
    /// PostgreSQL, for a role that may only request changes (see
    /// `docs/propagation.md`, "Least privilege"): how long `ensure`,
    /// `rotate` and `revoke` wait for the leader to apply the request
    /// before answering [`AuthorityError::NotApplied`] (30 s).
    pub request_timeout: Duration,
}

impl AuthorityConfig {
    /// Defaults for a database at `database` and these targets.
    pub fn new(database: impl Into<PathBuf>, targets: Vec<String>) -> AuthorityConfig {
        AuthorityConfig {
            database: database.into(),
            targets,
            max_concurrent_deliveries: 16,
            delivery_timeout: Duration::from_secs(5),
            base_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(60),
            poll_interval: Duration::from_millis(250),
            probe_interval: Duration::from_secs(60),
            snapshot_part_bytes: 512 * 1024,
            #[cfg(feature = "postgres")]
            postgres: None,
            create_database: true,
            lease: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
        }
    }
}

/// What a credential should be: [`Authority::ensure`](crate::Authority::ensure)'s input —
/// an id, for an Ed25519 credential its public key, and the key's own
/// [`KeySpec`] (privileges, functions, binding, expiry; label and session
/// policy are not propagated and are refused if set).
///
/// ```
/// use netproc_auth::{CertBinding, KeySpec, PrivilegeSet};
/// use netproc_propagation::CredentialSpec;
///
/// let privileges: PrivilegeSet = "invoke_functions".parse().unwrap();
/// let plain = CredentialSpec::api_key("billing", privileges);
/// let bound = CredentialSpec::api_key(
///     "billing",
///     KeySpec::new("invoke_functions".parse().unwrap())
///         .binding("dns:billing.internal".parse::<CertBinding>().unwrap()),
/// );
/// assert!(bound.key.binding.is_some() && plain.key.binding.is_none());
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct CredentialSpec {
    /// The key id: 1 to 64 characters of `[a-z0-9-]`.
    pub id: String,
    /// For an Ed25519 credential, its public key; `None` for an API key
    /// (whose secret the authority generates).
    pub ed25519_public_key: Option<[u8; 32]>,
    /// What the key may do, and where and until when.
    pub key: KeySpec,
    /// Bring back an id that was revoked (otherwise refused with
    /// [`AuthorityError::Revoked`]).
    pub recreate: bool,
}

impl CredentialSpec {
    /// An API key with id `id` (its secret generated by the authority).
    pub fn api_key(id: impl Into<String>, key: impl Into<KeySpec>) -> CredentialSpec {
        CredentialSpec {
            id: id.into(),
            ed25519_public_key: None,
            key: key.into(),
            recreate: false,
        }
    }

    /// Allows bringing back an id that was revoked (a new secret, a new
    /// start on every target); without it such an id is refused.
    #[must_use]
    pub fn recreate(mut self, yes: bool) -> CredentialSpec {
        self.recreate = yes;
        self
    }

    /// An Ed25519 key with id `id` and this public key.
    pub fn ed25519(
        id: impl Into<String>,
        public_key: [u8; 32],
        key: impl Into<KeySpec>,
    ) -> CredentialSpec {
        CredentialSpec {
            ed25519_public_key: Some(public_key),
            ..CredentialSpec::api_key(id, key)
        }
    }
}

/// What [`Authority::ensure`](crate::Authority::ensure) did.
#[derive(Debug)]
#[non_exhaustive]
pub struct Ensured {
    /// The credential was created.
    pub created: bool,
    /// Something changed (false: it was already as asked; nothing is sent).
    pub changed: bool,
    /// A new API key's only copy, when one was created.
    pub api_key: Option<ApiKey>,
}

/// Where one credential stands on one target.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeliveryState {
    /// Waiting to be sent.
    Pending,
    /// Being delivered now.
    Sent,
    /// The target holds the latest change.
    Success,
    /// The last attempt failed.
    Error {
        /// Why (a transport error, or the target's rejection reason).
        reason: String,
        /// Failed attempts in a row.
        attempts: u32,
        /// When the last attempt was made.
        last_attempt: Option<SystemTime>,
    },
}

/// One target's row in [`Authority::status`](crate::Authority::status).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TargetDelivery {
    /// The target.
    pub target: String,
    /// Where the credential stands there.
    pub state: DeliveryState,
}

/// One recorded change, as [`Authority::history`](crate::Authority::history)
/// lists it: who asked for what, when.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ChangeRecord {
    /// The change's number (increasing).
    pub change_id: u64,
    /// The credential it changed.
    pub credential_id: String,
    /// `create`, `update`, `rotate` or `revoke`.
    pub action: String,
    /// The process that made it: `user@host pid N`, as that process says.
    pub changed_by: String,
    /// PostgreSQL: the database role that made it (authenticated by the
    /// database); `None` on SQLite.
    pub db_role: Option<String>,
    /// When it was made.
    pub at: std::time::SystemTime,
}

/// One target as [`Authority::targets`](crate::Authority::targets) lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TargetState {
    /// Its name.
    pub name: String,
    /// The last `seq` it acknowledged.
    pub acked_seq: u64,
    /// The last `seq` allocated for it.
    pub last_seq: u64,
    /// Events waiting for it.
    pub pending_events: u64,
    /// It gets a snapshot next.
    pub snapshot_needed: bool,
    /// Failed attempts in a row.
    pub attempts: u32,
    /// The last failure.
    pub last_error: Option<String>,
}

/// One credential as [`Authority::credentials`](crate::Authority::credentials) lists it (never a secret
/// or its hash).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct CredentialInfo {
    /// The key id.
    pub id: String,
    /// `api_key` or `ed25519`.
    pub kind: &'static str,
    /// Its generation.
    pub generation: u64,
    /// Its privilege names.
    pub privileges: Vec<String>,
    /// The targets it is on.
    pub targets: Vec<String>,
}

/// One target's outcome in a [`SyncReport`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TargetSync {
    /// The target.
    pub target: String,
    /// Events it acknowledged in this sync.
    pub delivered: usize,
    /// Why it failed, if it did.
    pub error: Option<String>,
}

/// What [`Authority::sync`](crate::Authority::sync) did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SyncReport {
    /// Per target.
    pub targets: Vec<TargetSync>,
}

impl SyncReport {
    /// Every target answered.
    pub fn all_ok(&self) -> bool {
        self.targets.iter().all(|t| t.error.is_none())
    }
}

/// Where and how to reach PostgreSQL (feature `postgres`), for
/// [`AuthorityConfig::postgres`].
#[derive(Clone)]
#[non_exhaustive]
pub struct PostgresOptions {
    /// `postgres://user@host:port/db[?sslmode=…]`. A password may be in
    /// it, but is better in [`password`](Self::password).
    pub url: String,
    /// The password (from an environment variable or a file); never logged.
    pub password: Option<String>,
    /// For `sslmode=require` / `verify-full`: the CA that signs the
    /// server's certificate (PEM). The server's name is always checked.
    pub ca_pem: Option<Vec<u8>>,
    /// Tables in this schema instead of the connection's default (created
    /// if missing): one database can hold several authorities, or tests.
    pub schema: Option<String>,
}

impl std::fmt::Debug for PostgresOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresOptions")
            .field("schema", &self.schema)
            .finish_non_exhaustive()
    }
}

impl PostgresOptions {
    /// Options for `url`, no password, no CA, the default schema.
    pub fn new(url: impl Into<String>) -> PostgresOptions {
        PostgresOptions {
            url: url.into(),
            password: None,
            ca_pem: None,
            schema: None,
        }
    }
}

/// Who delivers for the authorities sharing one database
/// ([`Authority::leader`](crate::Authority::leader)).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LeaderInfo {
    /// The process holding the lease (host, pid and a random part).
    pub holder: String,
    /// Its term: one more at each takeover.
    pub epoch: u64,
    /// When it took the lease (unix ms, the database's clock).
    pub since_ms: u64,
    /// When the lease ends unless renewed (unix ms, the database's clock).
    pub expires_ms: u64,
}
