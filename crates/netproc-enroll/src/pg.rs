//! The store in PostgreSQL (feature `postgres`): the same tables and the
//! same single-use rules as SQLite, for several service instances on
//! several hosts. One connection per instance, re-made when it closed.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio_postgres::{Client, Config, NoTls};
use zeroize::Zeroizing;

use crate::store::{
    IssuedRecord, KeyGrant, NewPairing, PAIRING_TRIES, Redeemed, code_hash, source_allowed,
    token_hash, unix_ms,
};
use crate::wire::RefusalCode;
use crate::{EnrollError, Profile, TokenSpec};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS enroll_tokens (
    hash BYTEA PRIMARY KEY,
    name TEXT NOT NULL,
    profile TEXT NOT NULL,
    sans TEXT NOT NULL,
    source TEXT,
    grant_privileges TEXT,
    grant_functions TEXT,
    created_ms BIGINT NOT NULL,
    expires_ms BIGINT NOT NULL,
    used_ms BIGINT
);
CREATE TABLE IF NOT EXISTS enroll_pairings (
    id BIGINT PRIMARY KEY,
    name TEXT NOT NULL,
    csr BYTEA NOT NULL,
    code_hash BYTEA NOT NULL,
    source TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    expires_ms BIGINT NOT NULL,
    tries BIGINT NOT NULL DEFAULT 0,
    state TEXT NOT NULL DEFAULT 'pending'
);
CREATE INDEX IF NOT EXISTS enroll_pairings_name ON enroll_pairings (name, state);
CREATE TABLE IF NOT EXISTS enroll_issued (
    serial TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    profile TEXT NOT NULL,
    spki_sha256 TEXT NOT NULL,
    source TEXT NOT NULL,
    issued_ms BIGINT NOT NULL,
    not_after_ms BIGINT NOT NULL,
    revoked_ms BIGINT
);
";

/// Where the PostgreSQL store is.
#[derive(Clone)]
#[non_exhaustive]
pub struct PostgresStore {
    /// `postgres://user@host:5432/db` (`sslmode=require` or `verify-full`
    /// for TLS, with [`ca_pem`](Self::ca_pem)).
    pub url: String,
    /// The password, if not in the URL (from env or a file: never logged).
    pub password: Option<String>,
    /// The CA that signs the server's certificate (PEM).
    pub ca_pem: Option<Vec<u8>>,
    /// The schema holding the tables (default: the connection's own).
    pub schema: Option<String>,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("schema", &self.schema)
            .finish_non_exhaustive()
    }
}

impl PostgresStore {
    /// The database at `url`.
    pub fn new(url: impl Into<String>) -> PostgresStore {
        PostgresStore {
            url: url.into(),
            password: None,
            ca_pem: None,
            schema: None,
        }
    }
}

/// A failed statement: logged here (the peer only hears `internal`).
fn internal(e: tokio_postgres::Error) -> RefusalCode {
    tracing::error!(error = %e, "the enrollment database failed");
    RefusalCode::Internal
}

fn db(e: impl std::fmt::Display) -> EnrollError {
    EnrollError::State(format!("PostgreSQL: {e}"))
}

async fn connect(o: &PostgresStore) -> Result<Client, EnrollError> {
    let mut config: Config = o
        .url
        .parse()
        .map_err(|_| db("the database URL does not parse"))?;
    if let Some(pw) = &o.password {
        config.password(pw.as_bytes());
    }
    config.connect_timeout(Duration::from_secs(5));
    let plain = match config.get_ssl_mode() {
        tokio_postgres::config::SslMode::Disable => true,
        tokio_postgres::config::SslMode::Prefer => o.ca_pem.is_none(),
        _ => false,
    };
    let client = if plain {
        let (client, connection) = config.connect(NoTls).await.map_err(db)?;
        tokio::spawn(connection);
        client
    } else {
        let pem = o
            .ca_pem
            .as_ref()
            .ok_or_else(|| db("sslmode asks for TLS: give the server's CA"))?;
        let roots = netproc_pki::TrustAnchors::from_pem(pem)?;
        let tls = netproc_pki::service_client_config(
            &roots,
            &netproc_pki::TlsOptions::default().allow_tls12(true),
        )?;
        let (client, connection) = config
            .connect(tokio_postgres_rustls::MakeRustlsConnect::new(tls))
            .await
            .map_err(db)?;
        tokio::spawn(connection);
        client
    };
    if let Some(schema) = &o.schema {
        if schema.is_empty()
            || !schema
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            return Err(EnrollError::Invalid(
                "schema: 1 or more of [A-Za-z0-9_]".into(),
            ));
        }
        client
            .batch_execute(&format!(
                "CREATE SCHEMA IF NOT EXISTS {schema}; SET search_path TO {schema}"
            ))
            .await
            .map_err(db)?;
    }
    client.batch_execute(SCHEMA).await.map_err(db)?;
    Ok(client)
}

#[derive(Clone)]
pub(crate) struct Pg {
    options: Arc<PostgresStore>,
    client: Arc<tokio::sync::Mutex<Client>>,
}

impl Pg {
    pub(crate) async fn connect(o: &PostgresStore) -> Result<Pg, EnrollError> {
        Ok(Pg {
            client: Arc::new(tokio::sync::Mutex::new(connect(o).await?)),
            options: Arc::new(o.clone()),
        })
    }

    /// The connection, re-made if it closed (the database restarted).
    async fn client(&self) -> Result<tokio::sync::MutexGuard<'_, Client>, EnrollError> {
        let mut c = self.client.lock().await;
        if c.is_closed() {
            *c = connect(&self.options).await?;
        }
        Ok(c)
    }

    pub(crate) async fn create(
        &self,
        spec: &TokenSpec,
        now: SystemTime,
    ) -> Result<Zeroizing<String>, EnrollError> {
        spec.validate()?;
        let token = crate::store::new_token()?;
        let grant = spec.grant.as_ref();
        self.client()
            .await?
            .execute(
                "INSERT INTO enroll_tokens (hash, name, profile, sans, source, grant_privileges, grant_functions, created_ms, expires_ms)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                &[
                    &token_hash(&token).to_vec(),
                    &spec.name,
                    &spec.profile.as_str(),
                    &spec.sans.join(","),
                    &spec.source,
                    &grant.map(|g| g.privileges.join(",")),
                    &grant.and_then(|g| g.functions.as_ref()).map(|f| f.join(",")),
                    &unix_ms(now),
                    &unix_ms(now + spec.ttl),
                ],
            )
            .await
            .map_err(db)?;
        Ok(token)
    }

    pub(crate) async fn redeem(
        &self,
        token: &str,
        name: &str,
        profile: &str,
        peer: IpAddr,
        now: SystemTime,
    ) -> Result<Redeemed, RefusalCode> {
        let hash = token_hash(token).to_vec();
        let c = self.client().await.map_err(|e| {
            tracing::error!(error = %e, "the enrollment database failed");
            RefusalCode::Internal
        })?;
        let row = c
            .query_opt(
                "SELECT name, profile, sans, source, expires_ms, used_ms, grant_privileges, grant_functions FROM enroll_tokens WHERE hash = $1",
                &[&hash],
            )
            .await
            .map_err(internal)?;
        let Some(row) = row else {
            return Err(RefusalCode::InvalidToken);
        };
        let (t_name, t_profile, sans): (String, String, String) =
            (row.get(0), row.get(1), row.get(2));
        let (source, expires_ms, used_ms): (Option<String>, i64, Option<i64>) =
            (row.get(3), row.get(4), row.get(5));
        let (privileges, functions): (Option<String>, Option<String>) = (row.get(6), row.get(7));
        if used_ms.is_some() || expires_ms <= unix_ms(now) {
            return Err(RefusalCode::InvalidToken);
        }
        if t_name != name || t_profile != profile || !source_allowed(source.as_deref(), peer) {
            return Err(RefusalCode::NotAllowed);
        }
        let won = c
            .execute(
                "UPDATE enroll_tokens SET used_ms = $1 WHERE hash = $2 AND used_ms IS NULL AND expires_ms > $1",
                &[&unix_ms(now), &hash],
            )
            .await
            .map_err(internal)?;
        if won != 1 {
            return Err(RefusalCode::InvalidToken);
        }
        let split = |s: String| s.split(',').map(str::to_owned).collect::<Vec<_>>();
        Ok(Redeemed {
            grant: privileges.map(|p| KeyGrant {
                privileges: split(p),
                functions: functions.map(split),
            }),
            profile: Profile::parse(&t_profile).ok_or(RefusalCode::Internal)?,
            name: t_name,
            sans: sans
                .split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect(),
        })
    }

    pub(crate) async fn unspend(&self, token: &str) -> Result<(), EnrollError> {
        self.client()
            .await?
            .execute(
                "UPDATE enroll_tokens SET used_ms = NULL WHERE hash = $1",
                &[&token_hash(token).to_vec()],
            )
            .await
            .map_err(db)?;
        Ok(())
    }

    pub(crate) async fn record_issued(
        &self,
        issued: &IssuedRecord,
        now: SystemTime,
    ) -> Result<(), EnrollError> {
        self.client()
            .await?
            .execute(
                "INSERT INTO enroll_issued (serial, name, profile, spki_sha256, source, issued_ms, not_after_ms)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
                &[
                    &issued.serial.to_ascii_lowercase(),
                    &issued.name,
                    &issued.profile.as_str(),
                    &issued.spki,
                    &issued.source.to_string(),
                    &unix_ms(now),
                    &unix_ms(issued.not_after),
                ],
            )
            .await
            .map_err(db)?;
        Ok(())
    }

    pub(crate) async fn revoke(&self, serial: &str, now: SystemTime) -> Result<bool, EnrollError> {
        let n = self
            .client()
            .await?
            .execute(
                "UPDATE enroll_issued SET revoked_ms = $1 WHERE serial = $2 AND revoked_ms IS NULL",
                &[&unix_ms(now), &serial.to_ascii_lowercase()],
            )
            .await
            .map_err(db)?;
        Ok(n == 1)
    }

    pub(crate) async fn revoked_serials(
        &self,
        now: SystemTime,
    ) -> Result<Vec<String>, EnrollError> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT serial FROM enroll_issued WHERE revoked_ms IS NOT NULL AND not_after_ms > $1 ORDER BY serial",
                &[&unix_ms(now)],
            )
            .await
            .map_err(db)?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    pub(crate) async fn renewable(
        &self,
        serial: &str,
        name: &str,
        profile: Profile,
    ) -> Result<bool, EnrollError> {
        let row = self
            .client()
            .await?
            .query_one(
                "SELECT count(*) FROM enroll_issued WHERE serial = $1 AND name = $2 AND profile = $3 AND revoked_ms IS NULL",
                &[&serial.to_ascii_lowercase(), &name, &profile.as_str()],
            )
            .await
            .map_err(db)?;
        Ok(row.get::<_, i64>(0) == 1)
    }

    pub(crate) async fn bound_elsewhere(
        &self,
        name: &str,
        spki: &str,
        now: SystemTime,
    ) -> Result<bool, EnrollError> {
        let row = self
            .client()
            .await?
            .query_one(
                "SELECT count(*) FROM enroll_issued WHERE name = $1 AND spki_sha256 != $2 AND revoked_ms IS NULL AND not_after_ms > $3",
                &[&name, &spki, &unix_ms(now)],
            )
            .await
            .map_err(db)?;
        Ok(row.get::<_, i64>(0) > 0)
    }

    pub(crate) async fn issued_count(&self, name: &str) -> Result<u64, EnrollError> {
        let row = self
            .client()
            .await?
            .query_one(
                "SELECT count(*) FROM enroll_issued WHERE name = $1",
                &[&name],
            )
            .await
            .map_err(db)?;
        Ok(u64::try_from(row.get::<_, i64>(0)).unwrap_or(0))
    }

    pub(crate) async fn create_pairing(&self, p: &NewPairing) -> Result<(), RefusalCode> {
        let mut c = self.client().await.map_err(|e| {
            tracing::error!(error = %e, "the enrollment database failed");
            RefusalCode::Internal
        })?;
        let tx = c.transaction().await.map_err(internal)?;
        let now_ms = unix_ms(p.now);
        let row = tx
            .query_one(
                "SELECT count(*), coalesce(sum(CASE WHEN source = $2 THEN 1 ELSE 0 END), 0)::BIGINT FROM enroll_pairings WHERE state = 'pending' AND expires_ms > $1",
                &[&now_ms, &p.source.to_string()],
            )
            .await
            .map_err(internal)?;
        let (all, from): (i64, i64) = (row.get(0), row.get(1));
        if all >= i64::from(p.max_pending) || from >= 5 {
            return Err(RefusalCode::RateLimited);
        }
        tx.execute(
            "DELETE FROM enroll_pairings WHERE expires_ms <= $1::BIGINT - 86400000",
            &[&now_ms],
        )
        .await
        .map_err(internal)?;
        tx.execute(
            "INSERT INTO enroll_pairings (id, name, csr, code_hash, source, created_ms, expires_ms)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
            &[
                &(p.id as i64),
                &p.name,
                &p.csr,
                &code_hash(p.id, &p.code).to_vec(),
                &p.source.to_string(),
                &now_ms,
                &unix_ms(p.now + p.ttl),
            ],
        )
        .await
        .map_err(internal)?;
        tx.commit().await.map_err(internal)
    }

    pub(crate) async fn approve_pairing(
        &self,
        id: u64,
        code: &str,
        now: SystemTime,
    ) -> Result<(String, Vec<u8>), RefusalCode> {
        let mut c = self.client().await.map_err(|e| {
            tracing::error!(error = %e, "the enrollment database failed");
            RefusalCode::Internal
        })?;
        let tx = c.transaction().await.map_err(internal)?;
        // Locked: two instances checking codes for one pairing take turns.
        let row = tx
            .query_opt(
                "SELECT name, csr, code_hash, tries FROM enroll_pairings WHERE id = $1 AND state = 'pending' AND expires_ms > $2 FOR UPDATE",
                &[&(id as i64), &unix_ms(now)],
            )
            .await
            .map_err(internal)?;
        let Some(row) = row else {
            return Err(RefusalCode::PairingClosed);
        };
        let (name, csr, stored, tries): (String, Vec<u8>, Vec<u8>, i64) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        let given = code_hash(id, code);
        let right: bool = subtle::ConstantTimeEq::ct_eq(&given[..], &stored[..]).into();
        if !right {
            let closed = tries + 1 >= PAIRING_TRIES;
            tx.execute(
                "UPDATE enroll_pairings SET tries = tries + 1, state = CASE WHEN $2 THEN 'closed' ELSE state END WHERE id = $1",
                &[&(id as i64), &closed],
            )
            .await
            .map_err(internal)?;
            tx.commit().await.map_err(internal)?;
            return Err(if closed {
                RefusalCode::PairingClosed
            } else {
                RefusalCode::WrongCode
            });
        }
        tx.execute(
            "UPDATE enroll_pairings SET state = 'approved' WHERE id = $1",
            &[&(id as i64)],
        )
        .await
        .map_err(internal)?;
        tx.execute(
            "UPDATE enroll_pairings SET state = 'cancelled' WHERE name = $1 AND state = 'pending'",
            &[&name],
        )
        .await
        .map_err(internal)?;
        tx.commit().await.map_err(internal)?;
        Ok((name, csr))
    }
}
