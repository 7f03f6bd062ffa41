//! The authority: the source of truth for credentials and targets.

use std::collections::{BTreeSet, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use netproc_auth::{ApiKey, CertBinding, PrivilegeSet, valid_key_id};
use netproc_pki::Ed25519Key;
use rusqlite::{Connection, OptionalExtension, params};

use crate::db::Db;
use crate::transport::Transport;
use crate::wire::{Delivery, DeliveryReply};
use crate::{Ack, Credential, Event, EventKind, RejectReason, sign};

/// Events per delivery request, at most.
const BATCH_EVENTS: usize = 256;
/// Encoded events per delivery request, at most (the server's default
/// frame limit after authentication is 1 MiB).
const BATCH_BYTES: usize = 768 * 1024;

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
    Database(String),
    /// The authority is shutting down.
    #[error("the authority is closed")]
    Closed,
}

impl From<rusqlite::Error> for AuthorityError {
    fn from(e: rusqlite::Error) -> Self {
        AuthorityError::Database(e.to_string())
    }
}

/// How an authority runs.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct AuthorityConfig {
    /// The SQLite database file (created if missing).
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
    /// How often [`Authority::run`] looks for work written by another
    /// process (250 ms), and how often it probes every target's cursor (60 s).
    pub poll_interval: Duration,
    /// See `poll_interval`.
    pub probe_interval: Duration,
    /// A snapshot larger than this (encoded credentials, bytes) is sent in
    /// parts (512 KiB; a part must fit the server's frame limit, 1 MiB by
    /// default).
    pub snapshot_part_bytes: usize,
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
        }
    }
}

/// What a credential should be: [`Authority::ensure`]'s input.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct CredentialSpec {
    /// The key id: 1 to 64 characters of `[a-z0-9-]`.
    pub id: String,
    /// For an Ed25519 credential, its public key; `None` for an API key
    /// (whose secret the authority generates).
    pub ed25519_public_key: Option<[u8; 32]>,
    /// Its privileges.
    pub privileges: PrivilegeSet,
    /// If set, the only functions it may call.
    pub functions: Option<BTreeSet<String>>,
    /// If set, the certificate it must be presented over.
    pub binding: Option<CertBinding>,
    /// If set, when it stops working.
    pub expires_at: Option<SystemTime>,
}

impl CredentialSpec {
    /// An API key with id `id` and these privileges.
    pub fn api_key(id: impl Into<String>, privileges: PrivilegeSet) -> CredentialSpec {
        CredentialSpec {
            id: id.into(),
            ed25519_public_key: None,
            privileges,
            functions: None,
            binding: None,
            expires_at: None,
        }
    }

    /// An Ed25519 key with id `id`, this public key and these privileges.
    pub fn ed25519(
        id: impl Into<String>,
        public_key: [u8; 32],
        privileges: PrivilegeSet,
    ) -> CredentialSpec {
        CredentialSpec {
            ed25519_public_key: Some(public_key),
            ..CredentialSpec::api_key(id, privileges)
        }
    }

    /// Restricts the functions it may call.
    pub fn functions<I: IntoIterator<Item = S>, S: Into<String>>(mut self, f: I) -> Self {
        self.functions = Some(f.into_iter().map(Into::into).collect());
        self
    }

    /// Binds it to a certificate.
    pub fn binding(mut self, binding: CertBinding) -> Self {
        self.binding = Some(binding);
        self
    }

    /// Makes it expire.
    pub fn expires_at(mut self, at: SystemTime) -> Self {
        self.expires_at = Some(at);
        self
    }
}

/// What [`Authority::ensure`] did.
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

/// One target's row in [`Authority::status`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TargetDelivery {
    /// The target.
    pub target: String,
    /// Where the credential stands there.
    pub state: DeliveryState,
}

/// One target as [`Authority::targets`] lists it.
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

/// One credential as [`Authority::credentials`] lists it (never a secret
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

/// What [`Authority::sync`] did.
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

struct Inner {
    db: Db,
    key: Ed25519Key,
    transport: Arc<dyn Transport>,
    config: AuthorityConfig,

    /// One delivery at a time per target (one lock per configured target).
    delivering: std::collections::HashMap<String, tokio::sync::Mutex<()>>,
    wake: tokio::sync::Notify,
}

/// The authority (full mode). Cheap to clone; every clone is the same
/// authority.
///
/// Every change commits to its SQLite database before it is acknowledged
/// (changes made together share one commit), then is delivered to each
/// target as one signed event; [`run`](Self::run) keeps delivering in the
/// background, [`sync`](Self::sync) delivers now. Delivery is at least once
/// and ordered per target; targets apply idempotently.
#[derive(Clone)]
pub struct Authority {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority")
            .field("database", &self.inner.config.database)
            .field("targets", &self.inner.config.targets)
            .finish_non_exhaustive()
    }
}

fn now_ms() -> u64 {
    unix_ms(SystemTime::now())
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn i64_of(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn u64_of(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// Target names: 1 to 128 of `[A-Za-z0-9._:-]`.
fn valid_target_name(name: &str) -> bool {
    (1..=128).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b))
}

fn decode_credential(bytes: &[u8]) -> Result<Credential, AuthorityError> {
    postcard::from_bytes(bytes)
        .map_err(|e| AuthorityError::Database(format!("unreadable credential: {e}")))
}

fn encode<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, AuthorityError> {
    postcard::to_stdvec(v).map_err(|e| AuthorityError::Database(e.to_string()))
}

fn load_credential(c: &Connection, id: &str) -> Result<Option<Credential>, AuthorityError> {
    c.query_row(
        "SELECT credential FROM credentials WHERE id = ?1",
        params![id],
        |r| r.get::<_, Vec<u8>>(0),
    )
    .optional()?
    .map(|b| decode_credential(&b))
    .transpose()
}

fn credential_targets(c: &Connection, id: &str) -> Result<BTreeSet<String>, AuthorityError> {
    let mut st =
        c.prepare_cached("SELECT target FROM credential_targets WHERE credential_id = ?1")?;
    let rows = st.query_map(params![id], |r| r.get::<_, String>(0))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

fn next_change_id(c: &Connection) -> Result<u64, AuthorityError> {
    Ok(u64_of(c.query_row(
        "UPDATE meta SET value = value + 1 WHERE key = 'change_id' RETURNING value",
        [],
        |r| r.get::<_, i64>(0),
    )?))
}

fn allocate_seq(c: &Connection, target: &str) -> Result<u64, AuthorityError> {
    c.query_row(
        "UPDATE targets SET next_seq = next_seq + 1 WHERE name = ?1 RETURNING next_seq - 1",
        params![target],
        |r| r.get::<_, i64>(0),
    )
    .optional()?
    .map(u64_of)
    .ok_or_else(|| AuthorityError::UnknownTarget(target.to_owned()))
}

/// Queues `kind` for `target` under a new seq, and records it as the
/// credential's latest change there.
fn enqueue(
    c: &Connection,
    target: &str,
    change_id: u64,
    credential_id: &str,
    kind: &EventKind,
) -> Result<(), AuthorityError> {
    let seq = i64_of(allocate_seq(c, target)?);
    c.prepare_cached(
        "INSERT INTO outbox (target, seq, change_id, credential_id, kind) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![target, seq, i64_of(change_id), credential_id, encode(kind)?])?;
    c.prepare_cached(
        "INSERT INTO delivery (target, credential_id, seq, error) VALUES (?1, ?2, ?3, NULL)
         ON CONFLICT(target, credential_id) DO UPDATE SET seq = excluded.seq, error = NULL",
    )?
    .execute(params![target, credential_id, seq])?;
    Ok(())
}

/// A batch ready to sign and send.
struct Batch {
    /// (seq, change id, kind)
    events: Vec<(u64, u64, EventKind)>,
}

impl Authority {
    /// Opens (or creates) the authority's database and registers the
    /// configured targets. `signing_key` signs every event; targets must
    /// trust its public key. Blocking for the open only.
    pub fn open(
        config: AuthorityConfig,
        signing_key: Ed25519Key,
        transport: Arc<dyn Transport>,
    ) -> Result<Authority, AuthorityError> {
        if let Some(bad) = config.targets.iter().find(|t| !valid_target_name(t)) {
            return Err(AuthorityError::Invalid(format!(
                "target name {bad:?}: expected 1 to 128 characters of [A-Za-z0-9._:-]"
            )));
        }
        let db = Db::open(&config.database, &config.targets)?;
        let delivering = config
            .targets
            .iter()
            .map(|t| (t.clone(), tokio::sync::Mutex::new(())))
            .collect();
        Ok(Authority {
            inner: Arc::new(Inner {
                db,
                key: signing_key,
                transport,
                config,

                delivering,
                wake: tokio::sync::Notify::new(),
            }),
        })
    }

    /// The authority's public key, for the targets' `authority_public_keys`.
    pub fn public_key(&self) -> [u8; 32] {
        self.inner.key.public_key()
    }

    /// Creates or updates a credential and the set of targets it is on.
    /// On creation of an API key the authority generates its secret and
    /// returns it here, once (only its hash is stored). Targets dropped from
    /// the set get a delete. Idempotent: asking for what already is changes
    /// nothing and sends nothing.
    pub async fn ensure(
        &self,
        spec: CredentialSpec,
        targets: &[&str],
    ) -> Result<Ensured, AuthorityError> {
        if !valid_key_id(&spec.id) {
            return Err(AuthorityError::Invalid(format!(
                "key id {:?}: expected 1 to 64 characters of [a-z0-9-]",
                spec.id.chars().take(64).collect::<String>()
            )));
        }
        let wanted: BTreeSet<String> = targets.iter().map(|t| (*t).to_owned()).collect();
        let result = self
            .inner
            .db
            .run(move |c| ensure_in(c, &spec, &wanted))
            .await?;
        if result.changed {
            self.inner.wake.notify_one();
        }
        Ok(result)
    }

    /// Gives an API key a new secret (same id, generation + 1), returned
    /// here once. Its hash is committed before this returns, so a caller
    /// that loses the secret rotates again. The old secret stops working on
    /// each target when the change arrives there — or, with `overlap`, that
    /// long after this call, so clients can switch without a gap.
    pub async fn rotate(
        &self,
        id: &str,
        overlap: Option<Duration>,
    ) -> Result<ApiKey, AuthorityError> {
        let id = id.to_owned();
        let key = self
            .inner
            .db
            .run(move |c| {
                let mut cred = load_credential(c, &id)?
                    .ok_or_else(|| AuthorityError::UnknownCredential(id.clone()))?;
                let Some(old_hash) = cred.secret_sha256 else {
                    return Err(AuthorityError::NotAnApiKey(id.clone()));
                };
                let (key, hash) =
                    ApiKey::generate(&id).map_err(|e| AuthorityError::Invalid(e.to_string()))?;
                cred.previous = overlap.map(|d| {
                    (
                        old_hash,
                        cred.generation,
                        now_ms().saturating_add(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
                    )
                });
                cred.secret_sha256 = Some(hash);
                cred.generation += 1;
                save_and_send(
                    c,
                    &cred,
                    &credential_targets(c, &id)?,
                    &BTreeSet::new(),
                    true,
                )?;
                Ok(key)
            })
            .await?;
        self.inner.wake.notify_one();
        Ok(key)
    }

    /// Removes a credential from the authority and, once delivered, from
    /// every target; its sessions there are closed.
    pub async fn revoke(&self, id: &str) -> Result<(), AuthorityError> {
        let id = id.to_owned();
        self.inner
            .db
            .run(move |c| {
                if load_credential(c, &id)?.is_none() {
                    return Err(AuthorityError::UnknownCredential(id.clone()));
                }
                let targets = credential_targets(c, &id)?;
                c.execute("DELETE FROM credentials WHERE id = ?1", params![id])?;
                c.execute(
                    "DELETE FROM credential_targets WHERE credential_id = ?1",
                    params![id],
                )?;
                let change_id = next_change_id(c)?;
                for t in &targets {
                    enqueue(c, t, change_id, &id, &EventKind::Delete { id: id.clone() })?;
                }
                Ok(())
            })
            .await?;
        self.inner.wake.notify_one();
        Ok(())
    }

    /// Where credential `id` stands on each target (a revoked one: until
    /// its deletion is delivered everywhere).
    pub async fn status(&self, id: &str) -> Result<Vec<TargetDelivery>, AuthorityError> {
        let id = id.to_owned();
        let in_flight = self.in_flight();
        self.inner
            .db
            .run(move |c| {
                let mut st = c.prepare_cached(
                    "SELECT d.target, d.seq, d.error, t.acked_seq, t.attempts, t.last_error, t.last_attempt_ms
                     FROM delivery d JOIN targets t ON t.name = d.target
                     WHERE d.credential_id = ?1 ORDER BY d.target",
                )?;
                let rows = st.query_map(params![id], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        u64_of(r.get(1)?),
                        r.get::<_, Option<String>>(2)?,
                        u64_of(r.get(3)?),
                        r.get::<_, i64>(4)?,
                        r.get::<_, Option<String>>(5)?,
                        r.get::<_, Option<i64>>(6)?,
                    ))
                })?;
                let mut out = Vec::new();
                for row in rows {
                    let (target, seq, error, acked, attempts, last_error, last_ms) = row?;
                    let last_attempt = last_ms.map(|ms| UNIX_EPOCH + Duration::from_millis(u64_of(ms)));
                    let attempts = u32::try_from(attempts).unwrap_or(u32::MAX);
                    let state = if let Some(reason) = error {
                        DeliveryState::Error { reason, attempts: attempts.max(1), last_attempt }
                    } else if acked >= seq {
                        DeliveryState::Success
                    } else if in_flight.contains(&target) {
                        DeliveryState::Sent
                    } else if let Some(reason) = last_error.filter(|_| attempts > 0) {
                        DeliveryState::Error { reason, attempts, last_attempt }
                    } else {
                        DeliveryState::Pending
                    };
                    out.push(TargetDelivery { target, state });
                }
                if out.is_empty() && load_credential(c, &id)?.is_none() {
                    return Err(AuthorityError::UnknownCredential(id.clone()));
                }
                Ok(out)
            })
            .await
    }

    /// Every known target's delivery state.
    pub async fn targets(&self) -> Result<Vec<TargetState>, AuthorityError> {
        self.inner
            .db
            .run(|c| {
                let mut st = c.prepare_cached(
                    "SELECT name, acked_seq, next_seq, snapshot_needed, attempts, last_error,
                       (SELECT COUNT(*) FROM outbox o WHERE o.target = t.name AND o.seq > t.acked_seq)
                     FROM targets t ORDER BY name",
                )?;
                let rows = st.query_map([], |r| {
                    Ok(TargetState {
                        name: r.get(0)?,
                        acked_seq: u64_of(r.get(1)?),
                        last_seq: u64_of(r.get::<_, i64>(2)?.saturating_sub(1)),
                        snapshot_needed: r.get::<_, i64>(3)? != 0,
                        attempts: u32::try_from(r.get::<_, i64>(4)?).unwrap_or(u32::MAX),
                        last_error: r.get(5)?,
                        pending_events: u64_of(r.get(6)?),
                    })
                })?;
                Ok(rows.collect::<Result<_, _>>()?)
            })
            .await
    }

    /// Every credential, without secrets.
    pub async fn credentials(&self) -> Result<Vec<CredentialInfo>, AuthorityError> {
        self.inner
            .db
            .run(|c| {
                let mut st =
                    c.prepare_cached("SELECT id, credential FROM credentials ORDER BY id")?;
                let rows = st.query_map([], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?))
                })?;
                let mut out = Vec::new();
                for row in rows {
                    let (id, bytes) = row?;
                    let cred = decode_credential(&bytes)?;
                    out.push(CredentialInfo {
                        kind: if cred.ed25519_public_key.is_some() {
                            "ed25519"
                        } else {
                            "api_key"
                        },
                        generation: cred.generation,
                        privileges: cred.privileges,
                        targets: credential_targets(c, &id)?.into_iter().collect(),
                        id,
                    });
                }
                Ok(out)
            })
            .await
    }

    /// Delivers everything pending to every target now (ignoring backoff),
    /// and probes targets with nothing pending for their cursor, so one that
    /// lost its state gets a snapshot. Concurrent across targets up to
    /// `max_concurrent_deliveries`; a slow or dead target only holds its own
    /// slot, for at most `delivery_timeout` per request.
    pub async fn sync(&self) -> SyncReport {
        let names = self.inner.config.targets.clone();
        self.deliver_all(names, true).await
    }

    /// Delivers in the background until `shutdown` completes: right after
    /// each local change, on every `poll_interval` for changes written by
    /// another process (e.g. `netproc creds`), retrying failed targets with
    /// exponential backoff and jitter, and probing every target's cursor on
    /// every `probe_interval`.
    pub async fn run(&self, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut last_probe: Option<Instant> = None;
        loop {
            let probe = last_probe.is_none_or(|t| t.elapsed() >= self.inner.config.probe_interval);
            if probe {
                last_probe = Some(Instant::now());
                let report = self
                    .deliver_all(self.inner.config.targets.clone(), true)
                    .await;
                log_report(&report);
            } else {
                match self.due_targets().await {
                    Ok(due) if !due.is_empty() => log_report(&self.deliver_all(due, false).await),
                    Ok(_) => {}
                    Err(e) => tracing::error!(error = %e, "cannot read pending deliveries"),
                }
            }
            tokio::select! {
                () = &mut shutdown => return,
                () = self.inner.wake.notified() => {}
                () = tokio::time::sleep(self.inner.config.poll_interval) => {}
            }
        }
    }

    /// Targets being delivered to now: those whose delivery lock is held
    /// (released on every exit, cancellation included).
    fn in_flight(&self) -> HashSet<String> {
        self.inner
            .delivering
            .iter()
            .filter(|(_, lock)| lock.try_lock().is_err())
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// Configured targets with work to do whose backoff has passed.
    async fn due_targets(&self) -> Result<Vec<String>, AuthorityError> {
        let names = self.inner.config.targets.clone();
        self.inner
            .db
            .run(move |c| {
                let mut st = c.prepare_cached(
                    "SELECT name FROM targets t WHERE next_attempt_ms <= ?1 AND (snapshot_needed != 0
                       OR EXISTS (SELECT 1 FROM outbox o WHERE o.target = t.name AND o.seq > t.acked_seq))",
                )?;
                let rows = st.query_map(params![i64_of(now_ms())], |r| r.get::<_, String>(0))?;
                let due: Vec<String> = rows.collect::<Result<_, _>>()?;
                Ok(due.into_iter().filter(|n| names.contains(n)).collect())
            })
            .await
    }

    async fn deliver_all(&self, names: Vec<String>, probe: bool) -> SyncReport {
        let limit = self.inner.config.max_concurrent_deliveries.max(1);
        let targets = futures_util::stream::iter(names)
            .map(|name| async move {
                let outcome = self.deliver_target(&name, probe).await;
                TargetSync {
                    target: name,
                    delivered: outcome.0,
                    error: outcome.1,
                }
            })
            .buffer_unordered(limit)
            .collect::<Vec<_>>()
            .await;
        SyncReport { targets }
    }

    /// Delivers to one target until it is up to date or fails.
    async fn deliver_target(&self, name: &str, probe: bool) -> (usize, Option<String>) {
        let Some(lock) = self.inner.delivering.get(name) else {
            return (0, Some(format!("target {name:?} is not configured")));
        };
        // Another task delivering to it (run and sync at once): wait, then
        // deliver what is left.
        let _one_at_a_time = lock.lock().await;
        self.deliver_target_inner(name, probe).await
    }

    async fn deliver_target_inner(&self, name: &str, mut probe: bool) -> (usize, Option<String>) {
        let mut delivered = 0;
        // Bounded: each round either empties the queue or fails.
        for _ in 0..10_000 {
            let target = name.to_owned();
            let part_bytes = self.inner.config.snapshot_part_bytes;
            let batch = match self
                .inner
                .db
                .run(move |c| prepare(c, &target, part_bytes))
                .await
            {
                Ok(b) => b,
                Err(e) => return (delivered, Some(e.to_string())),
            };
            if batch.events.is_empty() && !probe {
                return (delivered, None);
            }
            probe = false;
            // Signing a full batch takes milliseconds: off the runtime's threads.
            let inner = Arc::clone(&self.inner);
            let target = name.to_owned();
            let signed =
                tokio::task::spawn_blocking(move || sign_batch(&inner.key, &target, batch.events))
                    .await;
            let (request, sent) = match signed {
                Ok(Ok(signed)) => signed,
                Ok(Err(e)) => return (delivered, Some(e)),
                Err(e) => return (delivered, Some(e.to_string())),
            };
            let answer = tokio::time::timeout(
                self.inner.config.delivery_timeout,
                self.inner.transport.deliver(name, request),
            )
            .await;
            let reply = match answer {
                Err(_) => Err("delivery timed out".to_owned()),
                Ok(Err(e)) => Err(e.to_string()),
                Ok(Ok(bytes)) => {
                    DeliveryReply::decode(&bytes).map_err(|e| format!("unreadable reply: {e}"))
                }
            };
            let target = name.to_owned();
            let config = self.inner.config.clone();

            let done = self
                .inner
                .db
                .run(move |c| complete(c, &target, &config, &sent, reply))
                .await;
            match done {
                Ok(Progress {
                    acked,
                    error: None,
                    more,
                }) => {
                    delivered += acked;
                    if !more {
                        return (delivered, None);
                    }
                }
                Ok(Progress {
                    acked,
                    error: Some(e),
                    ..
                }) => return (delivered + acked, Some(e)),
                Err(e) => return (delivered, Some(e.to_string())),
            }
        }
        (delivered, None)
    }
}

/// What was sent: each event's seq, and its credential id with whether it
/// was a deletion (`None` for a snapshot).
type Sent = Vec<(u64, Option<(String, bool)>)>;

/// Signs a batch for `target` now: the encoded request and what it holds.
fn sign_batch(
    key: &Ed25519Key,
    target: &str,
    events: Vec<(u64, u64, EventKind)>,
) -> Result<(Vec<u8>, Sent), String> {
    let now = SystemTime::now();
    let mut signed = Vec::with_capacity(events.len());
    let mut sent = Vec::with_capacity(events.len());
    for (seq, change_id, kind) in events {
        let mut event = Event::new(target, seq, now, kind);
        event.event_id = change_id;
        signed.push(sign(&event, key).map_err(|e| e.to_string())?);
        let credential = match event.kind {
            EventKind::Upsert(c) => Some((c.id, false)),
            EventKind::Delete { id } => Some((id, true)),
            EventKind::Snapshot(_) | EventKind::SnapshotPart { .. } => None,
        };
        sent.push((seq, credential));
    }
    Ok((Delivery::new(signed).encode(), sent))
}

fn log_report(report: &SyncReport) {
    for t in &report.targets {
        match &t.error {
            Some(e) => {
                tracing::warn!(target_name = %t.target, error = %e, "propagation delivery failed")
            }
            None if t.delivered > 0 => {
                tracing::info!(target_name = %t.target, events = t.delivered, "propagation delivered")
            }
            None => {}
        }
    }
}

fn ensure_in(
    c: &Connection,
    spec: &CredentialSpec,
    wanted: &BTreeSet<String>,
) -> Result<Ensured, AuthorityError> {
    for t in wanted {
        let known: Option<i64> = c
            .query_row("SELECT 1 FROM targets WHERE name = ?1", params![t], |r| {
                r.get(0)
            })
            .optional()?;
        if known.is_none() {
            return Err(AuthorityError::UnknownTarget(t.clone()));
        }
    }
    let old = load_credential(c, &spec.id)?;
    let old_targets = credential_targets(c, &spec.id)?;
    let mut api_key = None;
    let mut cred = match &old {
        Some(o) => {
            if o.ed25519_public_key.is_some() != spec.ed25519_public_key.is_some() {
                return Err(AuthorityError::Invalid(format!(
                    "credential {} exists as another kind (API key vs Ed25519); revoke it first",
                    spec.id
                )));
            }
            let mut c = o.clone();
            if spec.ed25519_public_key.is_some() && spec.ed25519_public_key != o.ed25519_public_key
            {
                c.ed25519_public_key = spec.ed25519_public_key;
                c.generation += 1;
            }
            c
        }
        None => {
            let mut c = Credential {
                id: spec.id.clone(),
                generation: 1,
                ..Credential::default()
            };
            match spec.ed25519_public_key {
                Some(pk) => c.ed25519_public_key = Some(pk),
                None => {
                    let (key, hash) = ApiKey::generate(&spec.id)
                        .map_err(|e| AuthorityError::Invalid(e.to_string()))?;
                    c.secret_sha256 = Some(hash);
                    api_key = Some(key);
                }
            }
            c
        }
    };
    cred.privileges = spec.privileges.names();
    cred.functions = spec.functions.as_ref().map(|f| f.iter().cloned().collect());
    cred.binding = spec.binding.as_ref().map(ToString::to_string);
    cred.expires_at = spec
        .expires_at
        .map(|t| t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()));
    let credential_changed = old.as_ref() != Some(&cred);
    let changed = credential_changed || &old_targets != wanted;
    if changed {
        save_and_send(c, &cred, wanted, &old_targets, credential_changed)?;
    }
    Ok(Ensured {
        created: old.is_none(),
        changed,
        api_key,
    })
}

/// Stores `cred` on `targets` and queues: an upsert for each target that
/// needs it (all of them if the credential changed, the new ones
/// otherwise), a delete for each target in `old_targets` it left.
fn save_and_send(
    c: &Connection,
    cred: &Credential,
    targets: &BTreeSet<String>,
    old_targets: &BTreeSet<String>,
    credential_changed: bool,
) -> Result<(), AuthorityError> {
    c.execute(
        "INSERT INTO credentials (id, credential, updated_at_ms) VALUES (?1, ?2, ?3)
         ON CONFLICT(id) DO UPDATE SET credential = excluded.credential, updated_at_ms = excluded.updated_at_ms",
        params![cred.id, encode(cred)?, i64_of(now_ms())],
    )?;
    c.execute(
        "DELETE FROM credential_targets WHERE credential_id = ?1",
        params![cred.id],
    )?;
    let change_id = next_change_id(c)?;
    for t in targets {
        c.prepare_cached("INSERT INTO credential_targets (credential_id, target) VALUES (?1, ?2)")?
            .execute(params![cred.id, t])?;
        if credential_changed || !old_targets.contains(t) {
            enqueue(c, t, change_id, &cred.id, &EventKind::Upsert(cred.clone()))?;
        }
    }
    for t in old_targets.difference(targets) {
        enqueue(
            c,
            t,
            change_id,
            &cred.id,
            &EventKind::Delete {
                id: cred.id.clone(),
            },
        )?;
    }
    Ok(())
}

/// Queues a snapshot of everything `target` should hold, in parts of about
/// `part_bytes`, superseding everything queued before it.
fn queue_snapshot(
    c: &Connection,
    target: &str,
    acked: u64,
    part_bytes: usize,
) -> Result<(), AuthorityError> {
    let mut st = c.prepare_cached(
        "SELECT c.credential FROM credentials c JOIN credential_targets ct ON ct.credential_id = c.id
         WHERE ct.target = ?1 ORDER BY c.id",
    )?;
    let rows = st.query_map(params![target], |r| r.get::<_, Vec<u8>>(0))?;
    let mut parts: Vec<Vec<Credential>> = vec![Vec::new()];
    let mut size = 0;
    for row in rows {
        let row = row?;
        let last = parts.last().map_or(0, Vec::len);
        if last > 0 && size + row.len() > part_bytes {
            parts.push(Vec::new());
            size = 0;
        }
        size += row.len();
        if let Some(p) = parts.last_mut() {
            p.push(decode_credential(&row)?);
        }
    }
    let total = u32::try_from(parts.len())
        .map_err(|_| AuthorityError::Invalid("snapshot too large".into()))?;
    let mut first = None;
    let mut last = 0;
    for (index, credentials) in (0..total).zip(parts) {
        let kind = if total == 1 {
            EventKind::Snapshot(credentials)
        } else {
            EventKind::SnapshotPart {
                index,
                total,
                credentials,
            }
        };
        last = allocate_seq(c, target)?;
        first.get_or_insert(last);
        c.prepare_cached(
            "INSERT INTO outbox (target, seq, change_id, credential_id, kind) VALUES (?1, ?2, 0, '', ?3)",
        )?
        .execute(params![target, i64_of(last), encode(&kind)?])?;
    }
    let first = first.unwrap_or(last);
    c.execute(
        "DELETE FROM outbox WHERE target = ?1 AND seq < ?2",
        params![target, i64_of(first)],
    )?;
    c.execute(
        "UPDATE delivery SET seq = ?2, error = NULL WHERE target = ?1 AND seq > ?3",
        params![target, i64_of(last), i64_of(acked)],
    )?;
    c.execute(
        "UPDATE targets SET snapshot_needed = 0 WHERE name = ?1",
        params![target],
    )?;
    Ok(())
}

/// Whether `target`'s backlog is longer than a snapshot would be: more
/// queued events than one batch and than the credentials it should hold.
/// (Many changes to few credentials while it was away: one snapshot says
/// it all.)
fn far_behind(c: &Connection, target: &str, acked: u64) -> Result<bool, AuthorityError> {
    let backlog: i64 = c
        .prepare_cached("SELECT COUNT(*) FROM outbox WHERE target = ?1 AND seq > ?2")?
        .query_row(params![target, i64_of(acked)], |r| r.get(0))?;
    if u64_of(backlog) <= BATCH_EVENTS as u64 {
        return Ok(false);
    }
    let held: i64 = c
        .prepare_cached("SELECT COUNT(*) FROM credential_targets WHERE target = ?1")?
        .query_row(params![target], |r| r.get(0))?;
    Ok(backlog > held)
}

/// The next batch for `target`: a snapshot first if it needs one (or is
/// far behind), then queued events in order.
fn prepare(c: &Connection, target: &str, part_bytes: usize) -> Result<Batch, AuthorityError> {
    let (acked, snapshot_needed): (u64, bool) = c
        .query_row(
            "SELECT acked_seq, snapshot_needed FROM targets WHERE name = ?1",
            params![target],
            |r| Ok((u64_of(r.get(0)?), r.get::<_, i64>(1)? != 0)),
        )
        .optional()?
        .ok_or_else(|| AuthorityError::UnknownTarget(target.to_owned()))?;
    if snapshot_needed || far_behind(c, target, acked)? {
        queue_snapshot(c, target, acked, part_bytes)?;
    }
    let mut events = Vec::new();
    let mut bytes = 0;
    let after = acked;
    let mut st = c.prepare_cached(
        "SELECT seq, change_id, kind FROM outbox WHERE target = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
    )?;
    let rows = st.query_map(params![target, i64_of(after), BATCH_EVENTS as i64], |r| {
        Ok((
            u64_of(r.get(0)?),
            u64_of(r.get(1)?),
            r.get::<_, Vec<u8>>(2)?,
        ))
    })?;
    for row in rows {
        let (seq, change_id, kind) = row?;
        if bytes + kind.len() > BATCH_BYTES && !events.is_empty() {
            break;
        }
        bytes += kind.len() + 128;
        let kind: EventKind = postcard::from_bytes(&kind)
            .map_err(|e| AuthorityError::Database(format!("unreadable queued event: {e}")))?;
        events.push((seq, change_id, kind));
    }
    Ok(Batch { events })
}

struct Progress {
    acked: usize,
    error: Option<String>,
    more: bool,
}

/// Records a target's answer (or the failure to get one).
fn complete(
    c: &Connection,
    target: &str,
    config: &AuthorityConfig,
    sent: &[(u64, Option<(String, bool)>)],
    reply: Result<DeliveryReply, String>,
) -> Result<Progress, AuthorityError> {
    let now = now_ms();
    let (acked, next_seq, attempts): (u64, u64, u32) = c.query_row(
        "SELECT acked_seq, next_seq, attempts FROM targets WHERE name = ?1",
        params![target],
        |r| {
            Ok((
                u64_of(r.get(0)?),
                u64_of(r.get(1)?),
                u32::try_from(r.get::<_, i64>(2)?).unwrap_or(u32::MAX),
            ))
        },
    )?;
    let reply = match reply {
        Ok(r) if r.acks.len() == sent.len() => r,
        Ok(_) => {
            return fail(
                c,
                target,
                config,
                attempts,
                now,
                "the reply does not answer every event".into(),
            );
        }
        Err(e) => return fail(c, target, config, attempts, now, e),
    };
    let mut snapshot_needed = None;
    let mut refusal = None;
    let mut acked_now = 0;
    for ((seq, credential), ack) in sent.iter().zip(&reply.acks) {
        match ack {
            Ack::Applied | Ack::Duplicate => acked_now += 1,
            Ack::NeedsSnapshot => snapshot_needed = Some(true),
            Ack::Rejected(reason @ (RejectReason::Conflict | RejectReason::Malformed))
                if *seq <= reply.cursor =>
            {
                acked_now += 1;
                if let Some((id, _)) = credential {
                    c.execute(
                        "UPDATE delivery SET error = ?3 WHERE target = ?1 AND credential_id = ?2 AND seq = ?4",
                        params![target, id, reason.to_string(), i64_of(*seq)],
                    )?;
                }
            }
            Ack::Rejected(reason) => refusal = Some(format!("rejected: {reason}")),
        }
    }
    for id in &reply.conflicts {
        c.execute(
            "UPDATE delivery SET error = 'conflict' WHERE target = ?1 AND credential_id = ?2",
            params![target, id],
        )?;
    }
    let mut new_acked = acked.max(reply.cursor);
    if reply.cursor >= next_seq {
        // The target is ahead of this database (restored from a backup?):
        // continue above its cursor, from a snapshot.
        c.execute(
            "UPDATE targets SET next_seq = ?2 WHERE name = ?1",
            params![target, i64_of(reply.cursor + 1)],
        )?;
        snapshot_needed = Some(true);
    } else if reply.cursor < acked {
        // The target lost its state: bring it back with a snapshot.
        new_acked = reply.cursor;
        snapshot_needed = Some(true);
    }
    c.execute(
        "UPDATE targets SET acked_seq = ?2 WHERE name = ?1",
        params![target, i64_of(new_acked)],
    )?;
    if let Some(needed) = snapshot_needed {
        c.execute(
            "UPDATE targets SET snapshot_needed = ?2 WHERE name = ?1",
            params![target, i64::from(needed)],
        )?;
    }
    c.execute(
        "DELETE FROM outbox WHERE target = ?1 AND seq <= ?2",
        params![target, i64_of(new_acked)],
    )?;
    // Forget delivered deletions (their credential is gone): by id for the
    // deletes in this batch, by a scan after a snapshot (which may have
    // superseded any number of them).
    for (seq, credential) in sent {
        if let Some((id, true)) = credential
            && *seq <= new_acked
        {
            c.prepare_cached(
                "DELETE FROM delivery WHERE target = ?1 AND credential_id = ?2 AND seq <= ?3 AND error IS NULL
                   AND NOT EXISTS (SELECT 1 FROM credential_targets WHERE credential_id = ?2 AND target = ?1)",
            )?
            .execute(params![target, id, i64_of(new_acked)])?;
        }
    }
    let snapshot_delivered = sent
        .iter()
        .any(|(seq, credential)| credential.is_none() && *seq <= new_acked);
    if snapshot_delivered {
        c.execute(
            "DELETE FROM delivery WHERE target = ?1 AND seq <= ?2 AND error IS NULL AND credential_id NOT IN
               (SELECT credential_id FROM credential_targets WHERE target = ?1)",
            params![target, i64_of(new_acked)],
        )?;
    }
    if let Some(reason) = refusal {
        let mut p = fail(c, target, config, attempts, now, reason)?;
        p.acked = acked_now;
        return Ok(p);
    }
    c.execute(
        "UPDATE targets SET attempts = 0, last_error = NULL, last_attempt_ms = ?2, next_attempt_ms = 0 WHERE name = ?1",
        params![target, i64_of(now)],
    )?;
    let more: bool = c.query_row(
        "SELECT snapshot_needed != 0 OR EXISTS (SELECT 1 FROM outbox WHERE target = ?1 AND seq > ?2) FROM targets WHERE name = ?1",
        params![target, i64_of(new_acked)],
        |r| r.get(0),
    )?;
    Ok(Progress {
        acked: acked_now,
        error: None,
        more: more && (acked_now > 0 || snapshot_needed == Some(true)),
    })
}

/// Counts a failed attempt and schedules the next with exponential backoff
/// and jitter (between half and all of the doubled delay).
fn fail(
    c: &Connection,
    target: &str,
    config: &AuthorityConfig,
    attempts: u32,
    now: u64,
    reason: String,
) -> Result<Progress, AuthorityError> {
    let attempts = attempts.saturating_add(1);
    let base = u64::try_from(config.base_backoff.as_millis()).unwrap_or(u64::MAX);
    let max = u64::try_from(config.max_backoff.as_millis()).unwrap_or(u64::MAX);
    let delay = base
        .saturating_mul(1u64 << attempts.min(20).saturating_sub(1))
        .min(max);
    let mut r = [0u8; 2];
    let _ = netproc_pki::random_bytes(&mut r);
    let jitter = u64::from(u16::from_le_bytes(r));
    let delay = delay / 2 + (delay / 2).saturating_mul(jitter) / u64::from(u16::MAX);
    c.execute(
        "UPDATE targets SET attempts = ?2, last_error = ?3, last_attempt_ms = ?4, next_attempt_ms = ?5 WHERE name = ?1",
        params![target, i64::from(attempts), reason, i64_of(now), i64_of(now.saturating_add(delay))],
    )?;
    Ok(Progress {
        acked: 0,
        error: Some(reason),
        more: false,
    })
}
