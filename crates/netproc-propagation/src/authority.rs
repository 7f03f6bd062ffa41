//! The authority: the source of truth for credentials and targets.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use netproc_auth::{ApiKey, valid_key_id};

use crate::Signer;
use crate::sql::*;
use crate::store::*;
use crate::transport::Transport;
use crate::types::*;

pub(crate) struct Inner {
    /// What the authority persists.
    pub(crate) store: Arc<dyn Store>,
    pub(crate) key: Arc<dyn Signer>,
    pub(crate) transport: Arc<dyn Transport>,
    /// The next delivery's correlation id.
    pub(crate) correlation: std::sync::atomic::AtomicU64,
    pub(crate) config: AuthorityConfig,

    /// One delivery at a time per target (one lock per configured target).
    pub(crate) delivering: std::collections::HashMap<String, tokio::sync::Mutex<()>>,
    pub(crate) wake: tokio::sync::Notify,
    /// The delivery lease's epoch while this process leads (0 before).
    pub(crate) epoch: std::sync::atomic::AtomicU64,
    /// Targets that answered they predate the second event format.
    /// Targets that refused a newer event format: the newest each takes
    /// (absent: the newest of all).
    pub(crate) formats: std::sync::Mutex<std::collections::HashMap<String, u8>>,
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
        let (db, postgres, requests_only) = open_database(&config)?;
        let requests = requests_only.then_some(config.request_timeout);
        let store = SqlStore::new(db, postgres, requests);
        let delivering = config
            .targets
            .iter()
            .map(|t| (t.clone(), tokio::sync::Mutex::new(())))
            .collect();
        Ok(Authority {
            inner: Arc::new(Inner {
                store: Arc::new(store),
                key: Arc::new(signer),
                transport,
                correlation: std::sync::atomic::AtomicU64::new(1),
                config,

                delivering,
                wake: tokio::sync::Notify::new(),
                epoch: std::sync::atomic::AtomicU64::new(0),
                formats: std::sync::Mutex::new(std::collections::HashMap::new()),
            }),
        })
    }

    /// Denies a client certificate on every target — refused at the
    /// handshake, its live sessions ended with `credential_revoked` — until
    /// `not_after` (the certificate's own expiry: after it the certificate
    /// is refused anyway and the entry is dropped). Delivered like any
    /// change, only to targets that announce the format; `status` with
    /// [`CertRef::label`](crate::CertRef::label) says where it has landed.
    pub async fn deny_certificate(
        &self,
        cert: crate::CertRef,
        not_after: std::time::SystemTime,
    ) -> Result<(), AuthorityError> {
        let until = netproc_wire::unix_ms(not_after);
        self.inner.store.deny_cert(cert, until).await?;
        self.inner.wake.notify_one();
        Ok(())
    }

    /// Stops denying a certificate denied before (everywhere).
    pub async fn allow_certificate(&self, cert: &crate::CertRef) -> Result<(), AuthorityError> {
        self.inner.store.allow_cert(cert.clone()).await?;
        self.inner.wake.notify_one();
        Ok(())
    }

    /// The certificates denied now, with the time each entry ends.
    pub async fn denied_certificates(
        &self,
    ) -> Result<Vec<(crate::CertRef, std::time::SystemTime)>, AuthorityError> {
        Ok(self
            .inner
            .store
            .denied_certs()
            .await?
            .into_iter()
            .map(|(c, t)| (c, netproc_wire::from_unix_ms(t)))
            .collect())
    }

    /// Whether this process only records change requests: on PostgreSQL,
    /// a role that may not write the authority's tables (its `ensure`,
    /// `rotate` and `revoke` are applied by the leading authority process;
    /// it delivers nothing itself).
    pub fn requests_only(&self) -> bool {
        self.inner.store.requests_only()
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
        let k = &spec.key;
        if k.label.is_some() || k.max_sessions.is_some() || k.single_active_session.is_some() {
            return Err(AuthorityError::Invalid(
                "label and session policy are not propagated: set them on a server's own key store"
                    .into(),
            ));
        }
        let wanted: BTreeSet<String> = targets.iter().map(|t| (*t).to_owned()).collect();
        let result = self.inner.store.ensure(spec, wanted).await?;
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
        let key = self.inner.store.rotate(id.to_owned(), overlap).await?;
        self.inner.wake.notify_one();
        Ok(key)
    }

    /// Removes a credential from the authority and, once delivered, from
    /// every target; its sessions there are closed.
    pub async fn revoke(&self, id: &str) -> Result<(), AuthorityError> {
        self.inner.store.revoke(id.to_owned()).await?;
        self.inner.wake.notify_one();
        Ok(())
    }

    /// Where credential `id` stands on each target (a revoked one: until
    /// its deletion is delivered everywhere).
    pub async fn status(&self, id: &str) -> Result<Vec<TargetDelivery>, AuthorityError> {
        let in_flight = self.in_flight();
        self.inner.store.status(id.to_owned(), in_flight).await
    }

    /// Every known target's delivery state.
    pub async fn targets(&self) -> Result<Vec<TargetState>, AuthorityError> {
        self.inner.store.targets().await
    }

    /// Every credential, without secrets.
    pub async fn credentials(&self) -> Result<Vec<CredentialInfo>, AuthorityError> {
        self.inner.store.credentials().await
    }

    /// The newest `limit` recorded changes, newest first — of credential
    /// `id` only when given: who made each (the process, and on
    /// PostgreSQL the database role) and when. The newest 100,000 changes
    /// are kept.
    pub async fn history(
        &self,
        id: Option<&str>,
        limit: u32,
    ) -> Result<Vec<ChangeRecord>, AuthorityError> {
        self.inner.store.history(id.map(str::to_owned), limit).await
    }
}

/// The store's database: PostgreSQL when configured (or named by a
/// `postgres://` URL), else the SQLite file; whether it is PostgreSQL, and
/// whether this role may only request changes there.
fn open_database(config: &AuthorityConfig) -> Result<(crate::db::Db, bool, bool), AuthorityError> {
    #[cfg(feature = "postgres")]
    {
        let named = crate::postgres::is_postgres(&config.database)
            .then(|| PostgresOptions::new(config.database.to_string_lossy()));
        if let Some(options) = config.postgres.clone().or(named) {
            let (db, requests_only) =
                crate::postgres::open(&options, config.create_database, &config.targets)?;
            return Ok((db, true, requests_only));
        }
    }
    let url = config.database.to_string_lossy();
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return Err(AuthorityError::Invalid(
            "database: a PostgreSQL URL needs netproc-propagation's `postgres` feature".into(),
        ));
    }
    let db = crate::sqlite::open(&config.database, &config.targets)?;
    Ok((db, false, false))
}
