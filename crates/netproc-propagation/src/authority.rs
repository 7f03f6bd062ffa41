//! The authority: the source of truth for credentials and targets.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use netproc_auth::{ApiKey, valid_key_id};
use rusqlite::params;

use crate::db::Db;
use crate::store::*;
use crate::transport::Transport;
use crate::types::*;
use crate::{EventKind, Signer};

pub(crate) struct Inner {
    pub(crate) db: Db,
    pub(crate) key: Arc<dyn Signer>,
    pub(crate) transport: Arc<dyn Transport>,
    /// The next delivery's correlation id.
    pub(crate) correlation: std::sync::atomic::AtomicU64,
    pub(crate) config: AuthorityConfig,

    /// One delivery at a time per target (one lock per configured target).
    pub(crate) delivering: std::collections::HashMap<String, tokio::sync::Mutex<()>>,
    pub(crate) wake: tokio::sync::Notify,
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
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority")
            .field("database", &self.inner.config.database)
            .field("targets", &self.inner.config.targets)
            .finish_non_exhaustive()
    }
}

impl Authority {
    /// Opens (or creates) the authority's database and registers the
    /// configured targets. `signer` signs every event (an
    /// [`Ed25519Key`](netproc_pki::Ed25519Key)
    /// from a file, or another [`Signer`]); targets must trust its public
    /// key. Blocking for the open only.
    pub fn open(
        config: AuthorityConfig,
        signer: impl Signer,
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
                key: Arc::new(signer),
                transport,
                correlation: std::sync::atomic::AtomicU64::new(1),
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
}
