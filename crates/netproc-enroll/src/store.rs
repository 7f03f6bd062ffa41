//! The service's state in SQLite: tokens by the SHA-256 of their secret
//! (single use by one conditional update, so two service instances sharing
//! the file never both honour one token) and the certificates issued.

use std::net::IpAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use rusqlite::{Connection, OptionalExtension, params};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::wire::RefusalCode;
use crate::{EnrollError, Profile};

/// What a token lets its holder obtain.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TokenSpec {
    /// The identity's name: the certificate's common name and the last
    /// part of its URI SAN.
    pub name: String,
    /// What kind of certificate.
    pub profile: Profile,
    /// DNS names and IP addresses (server profile only).
    pub sans: Vec<String>,
    /// Only from this source network (`10.0.0.0/8`, `::1/128`), if set.
    pub source: Option<String>,
    /// How long the token lasts (15 minutes by default).
    pub ttl: Duration,
    /// An Ed25519 key the new host may register through the credential
    /// authority, with these privileges (never more than the token says:
    /// no admin unless listed here).
    pub grant: Option<KeyGrant>,
}

/// What a key registered at enrollment may do.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct KeyGrant {
    /// Privilege names (`invoke_functions`, …).
    pub privileges: Vec<String>,
    /// A function allow-list, if any.
    pub functions: Option<Vec<String>>,
}

impl KeyGrant {
    /// A key with these privileges.
    pub fn new(privileges: Vec<String>) -> KeyGrant {
        KeyGrant {
            privileges,
            functions: None,
        }
    }
}

impl TokenSpec {
    /// A token for `name` under `profile`, for 15 minutes.
    pub fn new(name: impl Into<String>, profile: Profile) -> TokenSpec {
        TokenSpec {
            name: name.into(),
            profile,
            sans: Vec::new(),
            source: None,
            ttl: Duration::from_secs(15 * 60),
            grant: None,
        }
    }

    /// Checks names, SANs and the source network.
    pub fn validate(&self) -> Result<(), EnrollError> {
        crate::check_name(&self.name)?;
        if self.profile == Profile::Client && !self.sans.is_empty() {
            return Err(EnrollError::Invalid(
                "a client token carries no DNS or IP SANs".into(),
            ));
        }
        if self.sans.len() > 16 {
            return Err(EnrollError::Invalid("at most 16 SANs".into()));
        }
        for san in &self.sans {
            if san.parse::<IpAddr>().is_err() {
                crate::check_dns_name(san)?;
            }
        }
        if let Some(net) = &self.source {
            parse_cidr(net).ok_or_else(|| {
                EnrollError::Invalid(format!("source {net:?}: expected an address/prefix"))
            })?;
        }
        if let Some(g) = &self.grant {
            let plain = |s: &String| {
                !s.is_empty()
                    && s.len() <= 64
                    && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
            };
            if g.privileges.is_empty() || !g.privileges.iter().all(plain) {
                return Err(EnrollError::Invalid(
                    "grant: privilege names are [a-z0-9_], at least one".into(),
                ));
            }
            if g.functions
                .as_ref()
                .is_some_and(|f| f.len() > 64 || !f.iter().all(plain))
            {
                return Err(EnrollError::Invalid(
                    "grant: function names are [A-Za-z0-9_], at most 64".into(),
                ));
            }
        }
        if self.ttl.is_zero() || self.ttl > Duration::from_secs(7 * 24 * 3600) {
            return Err(EnrollError::Invalid(
                "a token lasts between 1 s and 7 days".into(),
            ));
        }
        Ok(())
    }
}

/// What the store records of an issued certificate.
pub(crate) struct IssuedRecord {
    pub(crate) serial: String,
    pub(crate) name: String,
    pub(crate) profile: Profile,
    pub(crate) spki: String,
    pub(crate) source: IpAddr,
    pub(crate) not_after: SystemTime,
}

/// A token as redeemed.
#[derive(Debug, Clone)]
pub(crate) struct Redeemed {
    pub(crate) name: String,
    pub(crate) profile: Profile,
    pub(crate) sans: Vec<String>,
    pub(crate) grant: Option<KeyGrant>,
}

/// The SQLite backend: blocking, run on the blocking pool by
/// [`TokenStore`].
#[derive(Clone)]
pub(crate) struct Sqlite {
    conn: Arc<Mutex<Connection>>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS enroll_tokens (
    hash BLOB PRIMARY KEY,
    name TEXT NOT NULL,
    profile TEXT NOT NULL,
    sans TEXT NOT NULL,
    source TEXT,
    grant_privileges TEXT,
    grant_functions TEXT,
    created_ms INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL,
    used_ms INTEGER
);
CREATE TABLE IF NOT EXISTS enroll_pairings (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    csr BLOB NOT NULL,
    code_hash BLOB NOT NULL,
    source TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL,
    tries INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL DEFAULT 'pending'
);
CREATE INDEX IF NOT EXISTS enroll_pairings_name ON enroll_pairings (name, state);
CREATE TABLE IF NOT EXISTS enroll_issued (
    serial TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    profile TEXT NOT NULL,
    spki_sha256 TEXT NOT NULL,
    source TEXT NOT NULL,
    issued_ms INTEGER NOT NULL,
    not_after_ms INTEGER NOT NULL,
    revoked_ms INTEGER
);
";

fn db_err(e: rusqlite::Error) -> EnrollError {
    EnrollError::State(e.to_string())
}

pub(crate) fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// A fresh token: 256 random bits.
pub(crate) fn new_token() -> Result<Zeroizing<String>, EnrollError> {
    let mut secret = Zeroizing::new([0u8; 32]);
    netproc_pki::random_bytes(&mut *secret).map_err(|e| EnrollError::State(e.to_string()))?;
    Ok(Zeroizing::new(format!("npe1_{}", hex::encode(*secret))))
}

/// Whether `peer` may use a token limited to `source` (a CIDR), if any.
pub(crate) fn source_allowed(source: Option<&str>, peer: IpAddr) -> bool {
    source
        .and_then(parse_cidr)
        .is_none_or(|net| in_network(peer, net))
}

/// SHA-256 of a token's secret: all the store keeps.
pub(crate) fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.trim().as_bytes()).into()
}

impl Sqlite {
    /// Opens (creating if needed) the state database at `path`.
    pub(crate) fn open(path: impl AsRef<Path>) -> Result<Sqlite, EnrollError> {
        let conn = Connection::open(path.as_ref()).map_err(db_err)?;
        conn.busy_timeout(Duration::from_secs(5)).map_err(db_err)?;
        conn.execute_batch("PRAGMA journal_mode = WAL;")
            .map_err(db_err)?;
        conn.execute_batch(SCHEMA).map_err(db_err)?;
        Ok(Sqlite {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Makes a token (256 random bits) for `spec`; only its hash is kept.
    /// The token is returned once. Blocking (SQLite).
    pub(crate) fn create(
        &self,
        spec: &TokenSpec,
        now: SystemTime,
    ) -> Result<Zeroizing<String>, EnrollError> {
        spec.validate()?;
        let token = new_token()?;
        let expires = now + spec.ttl;
        self.conn()
            .execute(
                "INSERT INTO enroll_tokens (hash, name, profile, sans, source, grant_privileges, grant_functions, created_ms, expires_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                params![
                    token_hash(&token).to_vec(),
                    spec.name,
                    spec.profile.as_str(),
                    spec.sans.join(","),
                    spec.source,
                    spec.grant.as_ref().map(|g| g.privileges.join(",")),
                    spec.grant
                        .as_ref()
                        .and_then(|g| g.functions.as_ref())
                        .map(|f| f.join(",")),
                    unix_ms(now),
                    unix_ms(expires),
                ],
            )
            .map_err(db_err)?;
        Ok(token)
    }

    /// Honours `token` once for (`name`, `profile`) from `peer`: refused
    /// `invalid_token` if unknown, expired or used (one code for all),
    /// `not_allowed` if it was made for another name, profile or source
    /// (the token stays usable then). Of two concurrent uses exactly one
    /// wins. Blocking (SQLite).
    pub(crate) fn redeem(
        &self,
        token: &str,
        name: &str,
        profile: &str,
        peer: IpAddr,
        now: SystemTime,
    ) -> Result<Redeemed, RefusalCode> {
        let hash = token_hash(token).to_vec();
        let conn = self.conn();
        let row = conn
            .query_row(
                "SELECT name, profile, sans, source, expires_ms, used_ms, grant_privileges, grant_functions FROM enroll_tokens WHERE hash = ?1",
                params![hash],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, Option<String>>(3)?,
                        r.get::<_, i64>(4)?,
                        r.get::<_, Option<i64>>(5)?,
                        r.get::<_, Option<String>>(6)?,
                        r.get::<_, Option<String>>(7)?,
                    ))
                },
            )
            .optional()
            .map_err(|_| RefusalCode::Internal)?;
        let Some((t_name, t_profile, sans, source, expires_ms, used_ms, privileges, functions)) =
            row
        else {
            return Err(RefusalCode::InvalidToken);
        };
        if used_ms.is_some() || expires_ms <= unix_ms(now) {
            return Err(RefusalCode::InvalidToken);
        }
        let from_source = source_allowed(source.as_deref(), peer);
        if t_name != name || t_profile != profile || !from_source {
            return Err(RefusalCode::NotAllowed);
        }
        let won = conn
            .execute(
                "UPDATE enroll_tokens SET used_ms = ?1 WHERE hash = ?2 AND used_ms IS NULL AND expires_ms > ?1",
                params![unix_ms(now), hash],
            )
            .map_err(|_| RefusalCode::Internal)?;
        if won != 1 {
            return Err(RefusalCode::InvalidToken);
        }
        let split = |s: String| s.split(',').map(str::to_owned).collect::<Vec<_>>();
        Ok(Redeemed {
            grant: privileges.map(|p| KeyGrant {
                privileges: split(p),
                functions: functions.map(split),
            }),
            name: t_name,
            profile: Profile::parse(&t_profile).ok_or(RefusalCode::Internal)?,
            sans: sans
                .split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect(),
        })
    }

    /// Records an issued certificate. Blocking (SQLite).
    pub(crate) fn record_issued(
        &self,
        issued: &IssuedRecord,
        now: SystemTime,
    ) -> Result<(), EnrollError> {
        self.conn()
            .execute(
                "INSERT INTO enroll_issued (serial, name, profile, spki_sha256, source, issued_ms, not_after_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    issued.serial.to_ascii_lowercase(),
                    issued.name,
                    issued.profile.as_str(),
                    issued.spki,
                    issued.source.to_string(),
                    unix_ms(now),
                    unix_ms(issued.not_after),
                ],
            )
            .map_err(db_err)?;
        Ok(())
    }

    /// Makes a redeemed token usable again (what it was for could not be
    /// completed). Blocking (SQLite).
    pub(crate) fn unspend(&self, token: &str) -> Result<(), EnrollError> {
        self.conn()
            .execute(
                "UPDATE enroll_tokens SET used_ms = NULL WHERE hash = ?1",
                params![token_hash(token).to_vec()],
            )
            .map_err(db_err)?;
        Ok(())
    }

    /// Marks an issued certificate revoked (it can no longer renew); false
    /// if this service did not issue it. Blocking (SQLite).
    pub(crate) fn revoke(&self, serial: &str, now: SystemTime) -> Result<bool, EnrollError> {
        let n = self
            .conn()
            .execute(
                "UPDATE enroll_issued SET revoked_ms = ?1 WHERE serial = ?2 AND revoked_ms IS NULL",
                params![unix_ms(now), serial.to_ascii_lowercase()],
            )
            .map_err(db_err)?;
        Ok(n == 1)
    }

    /// Serials of revoked certificates still valid (a CRL lists them until
    /// they expire). Blocking (SQLite).
    pub(crate) fn revoked_serials(&self, now: SystemTime) -> Result<Vec<String>, EnrollError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare("SELECT serial FROM enroll_issued WHERE revoked_ms IS NOT NULL AND not_after_ms > ?1 ORDER BY serial")
            .map_err(db_err)?;
        let rows = stmt
            .query_map(params![unix_ms(now)], |r| r.get::<_, String>(0))
            .map_err(db_err)?;
        rows.collect::<Result<Vec<_>, _>>().map_err(db_err)
    }

    /// Whether `serial` was issued here for (`name`, `profile`) and is not
    /// revoked. Blocking (SQLite).
    pub(crate) fn renewable(
        &self,
        serial: &str,
        name: &str,
        profile: Profile,
    ) -> Result<bool, EnrollError> {
        self.conn()
            .query_row(
                "SELECT count(*) FROM enroll_issued WHERE serial = ?1 AND name = ?2 AND profile = ?3 AND revoked_ms IS NULL",
                params![serial.to_ascii_lowercase(), name, profile.as_str()],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n == 1)
            .map_err(db_err)
    }

    /// Whether `name` holds a live certificate (unexpired, unrevoked) for
    /// a key other than `spki`: pairing cannot take such a name over.
    /// Blocking (SQLite).
    pub(crate) fn bound_elsewhere(
        &self,
        name: &str,
        spki: &str,
        now: SystemTime,
    ) -> Result<bool, EnrollError> {
        self.conn()
            .query_row(
                "SELECT count(*) FROM enroll_issued WHERE name = ?1 AND spki_sha256 != ?2 AND revoked_ms IS NULL AND not_after_ms > ?3",
                params![name, spki, unix_ms(now)],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n > 0)
            .map_err(db_err)
    }

    /// How many certificates were issued for `name`. Blocking (SQLite).
    pub(crate) fn issued_count(&self, name: &str) -> Result<u64, EnrollError> {
        self.conn()
            .query_row(
                "SELECT count(*) FROM enroll_issued WHERE name = ?1",
                params![name],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| u64::try_from(n).unwrap_or(0))
            .map_err(db_err)
    }
}

/// A pairing to record.
pub(crate) struct NewPairing {
    pub(crate) id: u64,
    pub(crate) name: String,
    pub(crate) csr: Vec<u8>,
    pub(crate) code: Zeroizing<String>,
    pub(crate) source: IpAddr,
    pub(crate) now: SystemTime,
    pub(crate) ttl: Duration,
    pub(crate) max_pending: u32,
}

/// Wrong codes a pairing takes before it closes.
pub(crate) const PAIRING_TRIES: i64 = 5;

/// The hash a pairing code is kept as: bound to its request.
pub(crate) fn code_hash(id: u64, code: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"netproc-enroll-code-v1\0");
    h.update(id.to_be_bytes());
    h.update(code.trim().as_bytes());
    h.finalize().into()
}

impl Sqlite {
    /// Records a pending pairing; refused when `max_pending` are pending
    /// in all, or 5 from `source`. Blocking (SQLite).
    pub(crate) fn create_pairing(&self, p: &NewPairing) -> Result<(), RefusalCode> {
        let NewPairing {
            id,
            ref name,
            ref csr,
            ref code,
            source,
            now,
            ttl,
            max_pending,
        } = *p;
        let conn = self.conn();
        let now_ms = unix_ms(now);
        let (all, from): (i64, i64) = conn
            .query_row(
                "SELECT count(*), coalesce(sum(source = ?2), 0) FROM enroll_pairings WHERE state = 'pending' AND expires_ms > ?1",
                params![now_ms, source.to_string()],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map_err(|_| RefusalCode::Internal)?;
        if all >= i64::from(max_pending) || from >= 5 {
            return Err(RefusalCode::RateLimited);
        }
        // Expired pairings are forgotten as new ones come.
        conn.execute(
            "DELETE FROM enroll_pairings WHERE expires_ms <= ?1 - 86400000",
            params![now_ms],
        )
        .map_err(|_| RefusalCode::Internal)?;
        conn.execute(
            "INSERT INTO enroll_pairings (id, name, csr, code_hash, source, created_ms, expires_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                id as i64,
                name,
                csr,
                code_hash(id, code).to_vec(),
                source.to_string(),
                now_ms,
                unix_ms(now + ttl),
            ],
        )
        .map_err(|_| RefusalCode::Internal)?;
        Ok(())
    }

    /// Checks a pairing code: the right one approves this request (once)
    /// and cancels every other pending request for the name; a wrong one
    /// counts, and the fifth closes the pairing. Returns the name and the
    /// stored certificate request. Blocking (SQLite).
    pub(crate) fn approve_pairing(
        &self,
        id: u64,
        code: &str,
        now: SystemTime,
    ) -> Result<(String, Vec<u8>), RefusalCode> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(|_| RefusalCode::Internal)?;
        let row = tx
            .query_row(
                "SELECT name, csr, code_hash, tries FROM enroll_pairings WHERE id = ?1 AND state = 'pending' AND expires_ms > ?2",
                params![id as i64, unix_ms(now)],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, Vec<u8>>(1)?,
                        r.get::<_, Vec<u8>>(2)?,
                        r.get::<_, i64>(3)?,
                    ))
                },
            )
            .optional()
            .map_err(|_| RefusalCode::Internal)?;
        let Some((name, csr, stored, tries)) = row else {
            return Err(RefusalCode::PairingClosed);
        };
        let given = code_hash(id, code);
        let right: bool = subtle::ConstantTimeEq::ct_eq(&given[..], &stored[..]).into();
        if !right {
            let closed = tries + 1 >= PAIRING_TRIES;
            tx.execute(
                "UPDATE enroll_pairings SET tries = tries + 1, state = CASE WHEN ?2 THEN 'closed' ELSE state END WHERE id = ?1",
                params![id as i64, closed],
            )
            .map_err(|_| RefusalCode::Internal)?;
            tx.commit().map_err(|_| RefusalCode::Internal)?;
            return Err(if closed {
                RefusalCode::PairingClosed
            } else {
                RefusalCode::WrongCode
            });
        }
        tx.execute(
            "UPDATE enroll_pairings SET state = 'approved' WHERE id = ?1",
            params![id as i64],
        )
        .map_err(|_| RefusalCode::Internal)?;
        tx.execute(
            "UPDATE enroll_pairings SET state = 'cancelled' WHERE name = ?1 AND state = 'pending'",
            params![name],
        )
        .map_err(|_| RefusalCode::Internal)?;
        tx.commit().map_err(|_| RefusalCode::Internal)?;
        Ok((name, csr))
    }
}

/// `addr/len`.
fn parse_cidr(text: &str) -> Option<(IpAddr, u8)> {
    let (addr, len) = text.split_once('/')?;
    let addr: IpAddr = addr.parse().ok()?;
    let len: u8 = len.parse().ok()?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    (len <= max).then_some((addr, len))
}

fn in_network(peer: IpAddr, (net, len): (IpAddr, u8)) -> bool {
    let peer = netproc_limits::ip_key(peer, 128);
    match (peer, net) {
        (IpAddr::V4(p), IpAddr::V4(n)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            u32::from(p) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(p), IpAddr::V6(n)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            u128::from(p) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local() -> IpAddr {
        "127.0.0.1".parse().unwrap()
    }

    #[test]
    fn a_token_works_once_for_its_name_and_profile_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = Sqlite::open(dir.path().join("s.db")).unwrap();
        let now = SystemTime::now();
        let token = store
            .create(&TokenSpec::new("alice", Profile::Client), now)
            .unwrap();
        assert!(token.starts_with("npe1_"));
        assert_eq!(
            store
                .redeem(&token, "bob", "client", local(), now)
                .unwrap_err(),
            RefusalCode::NotAllowed
        );
        assert_eq!(
            store
                .redeem(&token, "alice", "server", local(), now)
                .unwrap_err(),
            RefusalCode::NotAllowed
        );
        store
            .redeem(&token, "alice", "client", local(), now)
            .unwrap();
        assert_eq!(
            store
                .redeem(&token, "alice", "client", local(), now)
                .unwrap_err(),
            RefusalCode::InvalidToken
        );
        assert_eq!(
            store
                .redeem("npe1_00", "alice", "client", local(), now)
                .unwrap_err(),
            RefusalCode::InvalidToken
        );
        // Expired.
        let t2 = store
            .create(&TokenSpec::new("carol", Profile::Client), now)
            .unwrap();
        let later = now + Duration::from_secs(16 * 60);
        assert_eq!(
            store
                .redeem(&t2, "carol", "client", local(), later)
                .unwrap_err(),
            RefusalCode::InvalidToken
        );
        // Source network.
        let mut spec = TokenSpec::new("dave", Profile::Client);
        spec.source = Some("10.0.0.0/8".into());
        let t3 = store.create(&spec, now).unwrap();
        assert_eq!(
            store
                .redeem(&t3, "dave", "client", local(), now)
                .unwrap_err(),
            RefusalCode::NotAllowed
        );
        store
            .redeem(&t3, "dave", "client", "10.1.2.3".parse().unwrap(), now)
            .unwrap();
    }

    #[test]
    fn specs_are_checked() {
        let mut s = TokenSpec::new("alice", Profile::Client);
        s.sans = vec!["example.com".into()];
        assert!(s.validate().is_err());
        assert!(TokenSpec::new("a b", Profile::Client).validate().is_err());
        let mut s = TokenSpec::new("web", Profile::Server);
        s.sans = vec!["web.example".into(), "10.0.0.1".into()];
        assert!(s.validate().is_ok());
        s.source = Some("10.0.0.0/33".into());
        assert!(s.validate().is_err());
        assert!(in_network(
            "10.9.9.9".parse().unwrap(),
            parse_cidr("10.0.0.0/8").unwrap()
        ));
        assert!(in_network(
            "::1".parse().unwrap(),
            parse_cidr("::1/128").unwrap()
        ));
        assert!(!in_network(
            "::2".parse().unwrap(),
            parse_cidr("::1/128").unwrap()
        ));
    }
}
