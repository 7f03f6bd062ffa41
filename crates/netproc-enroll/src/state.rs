//! The enrollment state behind one async handle: SQLite (run on the
//! blocking pool) or PostgreSQL (feature `postgres`).

use std::net::IpAddr;
use std::path::Path;
use std::time::SystemTime;

use zeroize::Zeroizing;

use crate::store::{IssuedRecord, NewPairing, Redeemed, Sqlite};
use crate::wire::RefusalCode;
use crate::{EnrollError, Profile, TokenSpec};

/// The tokens, pending pairings and issued certificates: in SQLite
/// ([`open`](Self::open)) or PostgreSQL ([`connect_postgres`](Self::connect_postgres),
/// feature `postgres`: several service instances on several hosts share
/// it; a token stays single-use across them). Cheap to clone.
#[derive(Clone)]
pub struct TokenStore {
    backend: Backend,
}

#[derive(Clone)]
enum Backend {
    Sqlite(Sqlite),
    #[cfg(feature = "postgres")]
    Postgres(crate::pg::Pg),
}

impl std::fmt::Debug for TokenStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.backend {
            Backend::Sqlite(_) => "sqlite",
            #[cfg(feature = "postgres")]
            Backend::Postgres(_) => "postgres",
        };
        f.debug_struct("TokenStore")
            .field("backend", &kind)
            .finish_non_exhaustive()
    }
}

/// What a SQLite operation answers when its blocking task died.
fn thread_failed<T>() -> Result<T, EnrollError> {
    Err(EnrollError::State("the database thread failed".into()))
}

/// Runs a blocking SQLite operation off the runtime's threads.
async fn blocking<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static, failed: R) -> R {
    tokio::task::spawn_blocking(f).await.unwrap_or(failed)
}

impl TokenStore {
    /// Opens (creating if needed) a SQLite state database at `path`.
    /// Blocking.
    pub fn open(path: impl AsRef<Path>) -> Result<TokenStore, EnrollError> {
        Ok(TokenStore {
            backend: Backend::Sqlite(Sqlite::open(path)?),
        })
    }

    /// Connects to PostgreSQL (`postgres://…`, TLS with `ca_pem` when the
    /// URL's `sslmode` asks for it), creating the tables in `schema` (or
    /// the connection's own) if needed.
    #[cfg(feature = "postgres")]
    pub async fn connect_postgres(
        options: &crate::PostgresStore,
    ) -> Result<TokenStore, EnrollError> {
        Ok(TokenStore {
            backend: Backend::Postgres(crate::pg::Pg::connect(options).await?),
        })
    }

    /// Makes a token (256 random bits) for `spec`; only its hash is kept.
    /// The token is returned once.
    pub async fn create(
        &self,
        spec: &TokenSpec,
        now: SystemTime,
    ) -> Result<Zeroizing<String>, EnrollError> {
        match &self.backend {
            Backend::Sqlite(db) => {
                let (db, spec) = (db.clone(), spec.clone());
                blocking(move || db.create(&spec, now), thread_failed()).await
            }
            #[cfg(feature = "postgres")]
            Backend::Postgres(db) => db.create(spec, now).await,
        }
    }

    /// Marks an issued certificate revoked (it can no longer renew); false
    /// if this service did not issue it.
    pub async fn revoke(&self, serial: &str, now: SystemTime) -> Result<bool, EnrollError> {
        match &self.backend {
            Backend::Sqlite(db) => {
                let (db, serial) = (db.clone(), serial.to_owned());
                blocking(move || db.revoke(&serial, now), thread_failed()).await
            }
            #[cfg(feature = "postgres")]
            Backend::Postgres(db) => db.revoke(serial, now).await,
        }
    }

    /// Serials of the revoked certificates that have not expired yet:
    /// what the intermediate's CRL lists (`netproc enroll crl`).
    pub async fn revoked_serials(&self, now: SystemTime) -> Result<Vec<String>, EnrollError> {
        match &self.backend {
            Backend::Sqlite(db) => {
                let db = db.clone();
                blocking(move || db.revoked_serials(now), thread_failed()).await
            }
            #[cfg(feature = "postgres")]
            Backend::Postgres(db) => db.revoked_serials(now).await,
        }
    }

    /// How many certificates were issued for `name`.
    pub async fn issued_count(&self, name: &str) -> Result<u64, EnrollError> {
        match &self.backend {
            Backend::Sqlite(db) => {
                let (db, name) = (db.clone(), name.to_owned());
                blocking(move || db.issued_count(&name), thread_failed()).await
            }
            #[cfg(feature = "postgres")]
            Backend::Postgres(db) => db.issued_count(name).await,
        }
    }

    pub(crate) async fn redeem(
        &self,
        token: &str,
        name: &str,
        profile: &str,
        peer: IpAddr,
        now: SystemTime,
    ) -> Result<Redeemed, RefusalCode> {
        match &self.backend {
            Backend::Sqlite(db) => {
                let (db, t, n, p) = (
                    db.clone(),
                    Zeroizing::new(token.to_owned()),
                    name.to_owned(),
                    profile.to_owned(),
                );
                blocking(
                    move || db.redeem(&t, &n, &p, peer, now),
                    Err(RefusalCode::Internal),
                )
                .await
            }
            #[cfg(feature = "postgres")]
            Backend::Postgres(db) => db.redeem(token, name, profile, peer, now).await,
        }
    }

    pub(crate) async fn unspend(&self, token: &str) -> Result<(), EnrollError> {
        match &self.backend {
            Backend::Sqlite(db) => {
                let (db, t) = (db.clone(), Zeroizing::new(token.to_owned()));
                blocking(move || db.unspend(&t), thread_failed()).await
            }
            #[cfg(feature = "postgres")]
            Backend::Postgres(db) => db.unspend(token).await,
        }
    }

    pub(crate) async fn record_issued(
        &self,
        issued: IssuedRecord,
        now: SystemTime,
    ) -> Result<(), EnrollError> {
        match &self.backend {
            Backend::Sqlite(db) => {
                let db = db.clone();
                blocking(move || db.record_issued(&issued, now), thread_failed()).await
            }
            #[cfg(feature = "postgres")]
            Backend::Postgres(db) => db.record_issued(&issued, now).await,
        }
    }

    pub(crate) async fn renewable(
        &self,
        serial: &str,
        name: &str,
        profile: Profile,
    ) -> Result<bool, EnrollError> {
        match &self.backend {
            Backend::Sqlite(db) => {
                let (db, s, n) = (db.clone(), serial.to_owned(), name.to_owned());
                blocking(move || db.renewable(&s, &n, profile), thread_failed()).await
            }
            #[cfg(feature = "postgres")]
            Backend::Postgres(db) => db.renewable(serial, name, profile).await,
        }
    }

    pub(crate) async fn bound_elsewhere(
        &self,
        name: &str,
        spki: &str,
        now: SystemTime,
    ) -> Result<bool, EnrollError> {
        match &self.backend {
            Backend::Sqlite(db) => {
                let (db, n, k) = (db.clone(), name.to_owned(), spki.to_owned());
                blocking(move || db.bound_elsewhere(&n, &k, now), thread_failed()).await
            }
            #[cfg(feature = "postgres")]
            Backend::Postgres(db) => db.bound_elsewhere(name, spki, now).await,
        }
    }

    pub(crate) async fn create_pairing(&self, p: NewPairing) -> Result<(), RefusalCode> {
        match &self.backend {
            Backend::Sqlite(db) => {
                let db = db.clone();
                blocking(move || db.create_pairing(&p), Err(RefusalCode::Internal)).await
            }
            #[cfg(feature = "postgres")]
            Backend::Postgres(db) => db.create_pairing(&p).await,
        }
    }

    pub(crate) async fn approve_pairing(
        &self,
        id: u64,
        code: &str,
        now: SystemTime,
    ) -> Result<(String, Vec<u8>), RefusalCode> {
        match &self.backend {
            Backend::Sqlite(db) => {
                let (db, c) = (db.clone(), Zeroizing::new(code.to_owned()));
                blocking(
                    move || db.approve_pairing(id, &c, now),
                    Err(RefusalCode::Internal),
                )
                .await
            }
            #[cfg(feature = "postgres")]
            Backend::Postgres(db) => db.approve_pairing(id, code, now).await,
        }
    }
}
