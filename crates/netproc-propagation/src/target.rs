//! The receiving side: a netproc server that applies an authority's events
//! to its live key store and keeps them, with its cursor, in its state
//! database.

use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, SystemTime};

use netproc_auth::{ApiKeyStore, PropagatedChange, PropagationError};
use netproc_server::{CallContext, CallError, ExtensionHandler, ServerBuilder, StateDatabase};
use netproc_wire::{ErrorCode, Privilege};
use rusqlite::{Connection, OptionalExtension, params};

use crate::wire::{
    Delivery, DeliveryReply, EXTENSION, EXTENSION_V2, EXTENSION_V3, MAX_EVENTS_PER_DELIVERY,
};
use crate::{Ack, CertRef, Check, Credential, EventKind, RejectReason, Verifier};

/// How far an event's signing time may be from the target's clock, unless
/// configured otherwise.
pub const DEFAULT_FRESHNESS: Duration = Duration::from_secs(300);

/// The owner of the target's tables in the server's state database.
const OWNER: &str = "netproc-propagation.target";

/// The target's tables, beside the server's own, by schema version
/// (`IF NOT EXISTS`: databases made before versioning already hold them).
const MIGRATIONS: &[&str] = &[
    "
    CREATE TABLE IF NOT EXISTS propagation_cursor (
        target TEXT PRIMARY KEY,
        seq INTEGER NOT NULL
    );
    CREATE TABLE IF NOT EXISTS propagated_keys (
        id TEXT PRIMARY KEY,
        credential BLOB NOT NULL
    );
    CREATE TABLE IF NOT EXISTS propagation_snapshot (
        target TEXT PRIMARY KEY,
        total INTEGER NOT NULL,
        next_index INTEGER NOT NULL,
        credentials BLOB NOT NULL
    );",
    "
    CREATE TABLE IF NOT EXISTS propagation_epoch (
        target TEXT PRIMARY KEY,
        epoch INTEGER NOT NULL
    );",
    "
    CREATE TABLE IF NOT EXISTS propagation_denied (
        cert BLOB PRIMARY KEY,
        not_after_ms INTEGER NOT NULL
    );",
];

/// Why a target could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TargetError {
    /// The state database could not be opened or read.
    #[error("propagation state in {path}: {source}")]
    Database {
        /// The database file.
        path: std::path::PathBuf,
        /// What failed.
        source: rusqlite::Error,
    },
    /// No trusted authority key was given.
    #[error("propagation is enabled but no authority public key is trusted")]
    NoTrustedKey,
}

/// How a target checks what it receives.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct TargetConfig {
    /// This target's name, as the authority addresses it (usually the
    /// server's name).
    pub name: String,
    /// Authority public keys whose events are accepted (several, so the
    /// authority's key can be rotated or replaced).
    pub authority_public_keys: Vec<[u8; 32]>,
    /// The freshness window ([`DEFAULT_FRESHNESS`] by default).
    pub freshness: Duration,
}

impl TargetConfig {
    /// A target named `name` trusting these authority keys.
    pub fn new(name: impl Into<String>, authority_public_keys: Vec<[u8; 32]>) -> TargetConfig {
        TargetConfig {
            name: name.into(),
            authority_public_keys,
            freshness: DEFAULT_FRESHNESS,
        }
    }
}

struct State {
    cursor: u64,
    /// The highest authority epoch applied (second event format); lower
    /// ones are refused as a deposed leader's.
    epoch: u64,
    /// A multi-part snapshot received up to (not including) part `next`.
    partial: Option<Partial>,
}

/// The parts of a snapshot received so far (persisted with the cursor).
#[derive(Clone, serde::Serialize, serde::Deserialize)]
struct Partial {
    total: u32,
    next: u32,
    credentials: Vec<Credential>,
}

/// A server's propagation endpoint. Install it on a server with
/// [`install`](Self::install); the server must also follow the same key
/// store ([`ServerHandle::follow_key_store`](netproc_server::ServerHandle::follow_key_store))
/// so that revoked, rotated and changed keys end their sessions.
pub struct PropagationTarget {
    me: Weak<PropagationTarget>,
    /// Replaced whole when the trusted authority keys change.
    verifier: std::sync::RwLock<Arc<Verifier>>,
    freshness: Duration,
    name: String,
    store: Arc<ApiKeyStore>,
    /// The client certificates denied through the authority; the server
    /// it is installed on refuses them ([`install`](Self::install)).
    deny: netproc_pki::DenyList,
    state: Mutex<State>,
    /// The server's state database, which holds the target's tables.
    db: StateDatabase,
}

impl std::fmt::Debug for PropagationTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PropagationTarget")
            .field("name", &self.name)
            .field("cursor", &self.cursor())
            .finish_non_exhaustive()
    }
}

impl PropagationTarget {
    /// Opens the target's state in the server's state database (its tables
    /// registered through [`StateDatabase::migrate`]), loads the propagated
    /// keys and the cursor it holds into `store`, and is ready to receive.
    /// Give the same database to the server
    /// ([`ServerBuilder::state`](netproc_server::ServerBuilder::state)).
    /// Blocking: call it before the server starts, or from `spawn_blocking`.
    pub fn open(
        config: TargetConfig,
        store: Arc<ApiKeyStore>,
        db: &StateDatabase,
    ) -> Result<Arc<PropagationTarget>, TargetError> {
        if config.authority_public_keys.is_empty() {
            return Err(TargetError::NoTrustedKey);
        }
        let path = db.path().to_owned();
        let db_err = |source| TargetError::Database {
            path: path.clone(),
            source,
        };
        db.migrate(OWNER, MIGRATIONS).map_err(db_err)?;
        let (cursor, rows, snapshot, epoch) = db
            .with_connection(|conn| load(conn, &config.name))
            .map_err(db_err)?;
        let deny = netproc_pki::DenyList::new();
        deny.replace(db.with_connection(load_denied).map_err(db_err)?);
        let mut keys = Vec::new();
        for (id, bytes) in rows {
            match postcard::from_bytes::<Credential>(&bytes)
                .map_err(|e| e.to_string())
                .and_then(|c| c.to_key())
            {
                Ok(k) => keys.push(k),
                Err(e) => {
                    tracing::warn!(key = %id, error = %e, "skipping an unreadable propagated key")
                }
            }
        }
        let partial = snapshot.and_then(|(total, next, bytes)| {
            Some(Partial {
                total: u32::try_from(total).ok()?,
                next: u32::try_from(next).ok()?,
                credentials: postcard::from_bytes(&bytes).ok()?,
            })
        });
        // A key configured locally since it was received: the local one wins.
        keys.retain(
            |k| match store.check_propagated(&PropagatedChange::Upsert(k.clone())) {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(key = %k.id, error = %e, "not loading a propagated key");
                    false
                }
            },
        );
        for k in &keys {
            schedule_expiry(&store, k);
        }
        if let Err(e) = store.apply_propagated(PropagatedChange::Replace(keys)) {
            tracing::warn!(error = %e, "propagated keys not loaded");
        }
        Ok(Arc::new_cyclic(|me| PropagationTarget {
            me: me.clone(),
            verifier: std::sync::RwLock::new(Arc::new(Verifier::new(
                config.name.clone(),
                config.authority_public_keys,
                config.freshness,
            ))),
            freshness: config.freshness,
            name: config.name,
            store,
            deny,
            state: Mutex::new(State {
                cursor,
                epoch,
                partial,
            }),
            db: db.clone(),
        }))
    }

    /// Registers the delivery operation on `builder`, for principals holding
    /// `receive_credentials` (or `admin_privileges` / `all_privileges`).
    /// Registers every delivery extension: the first event format, the
    /// second (epoch-fenced, [`EXTENSION_V2`]) and the third (with the
    /// certificate deny list, [`EXTENSION_V3`]) — registering one is how a
    /// target announces it accepts that format. Gives the server the
    /// target's deny list ([`ServerBuilder::deny_list`]).
    pub fn install(self: &Arc<Self>, builder: ServerBuilder) -> ServerBuilder {
        builder
            .deny_list(self.deny.clone())
            .extension(
                EXTENSION_V3,
                Privilege::ReceiveCredentials,
                Arc::new(EpochHandler(Arc::clone(self))) as Arc<dyn ExtensionHandler>,
            )
            .extension(
                EXTENSION,
                Privilege::ReceiveCredentials,
                Arc::clone(self) as Arc<dyn ExtensionHandler>,
            )
            .extension(
                EXTENSION_V2,
                Privilege::ReceiveCredentials,
                Arc::new(EpochHandler(Arc::clone(self))) as Arc<dyn ExtensionHandler>,
            )
    }

    /// The highest authority epoch applied (0 before any event of the
    /// second format).
    pub fn epoch(&self) -> u64 {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .epoch
    }

    /// The client certificates denied through the authority (the list the
    /// server this target is installed on consults).
    pub fn deny_list(&self) -> &netproc_pki::DenyList {
        &self.deny
    }

    /// The last applied `seq` (0 before any).
    pub fn cursor(&self) -> u64 {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .cursor
    }

    /// This target's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Replaces the trusted authority public keys, effective for the next
    /// delivery: to rotate the authority's key, trust old and new, switch
    /// the authority, then trust only the new one (after a compromise,
    /// drop the old one at once). An empty list is refused.
    pub fn set_authority_keys(&self, keys: Vec<[u8; 32]>) -> Result<(), TargetError> {
        if keys.is_empty() {
            return Err(TargetError::NoTrustedKey);
        }
        let verifier = Arc::new(Verifier::new(self.name.clone(), keys, self.freshness));
        *self
            .verifier
            .write()
            .unwrap_or_else(PoisonError::into_inner) = verifier;
        Ok(())
    }

    /// Handles one delivery at `now`: checks every event, commits what is
    /// applied (keys and cursor, one transaction), then applies it to the
    /// live store and answers. Blocking (SQLite); the extension handler runs
    /// it on the blocking pool. If the state database cannot commit, nothing
    /// is applied and the error is returned (the authority retries later).
    pub fn deliver(
        &self,
        delivery: &Delivery,
        now: SystemTime,
    ) -> Result<DeliveryReply, TargetError> {
        self.deliver_format(delivery, now, false)
    }

    /// [`deliver`](Self::deliver) for a delivery whose events are in the
    /// second format ([`EpochEvent`](crate::EpochEvent)): an event signed in
    /// an epoch below the highest this target has applied is refused
    /// ([`RejectReason::StaleLeader`]); a higher epoch is kept with the
    /// cursor, in the same transaction. Once a target holds an epoch, events
    /// of the first format (no epoch) are refused the same way: they would
    /// bypass the fence.
    pub fn deliver_epoch(
        &self,
        delivery: &Delivery,
        now: SystemTime,
    ) -> Result<DeliveryReply, TargetError> {
        self.deliver_format(delivery, now, true)
    }

    fn deliver_format(
        &self,
        delivery: &Delivery,
        now: SystemTime,
        with_epoch: bool,
    ) -> Result<DeliveryReply, TargetError> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let mut cursor = state.cursor;
        let mut epoch = state.epoch;
        let mut acks = Vec::with_capacity(delivery.events.len());
        let mut conflicts = Vec::new();
        let mut staged: Vec<Staged> = Vec::new();
        let mut partial = state.partial.clone();
        let verifier = Arc::clone(&self.verifier.read().unwrap_or_else(PoisonError::into_inner));
        // The signatures first, a large batch on several threads; then the
        // checks that depend on order (cursor, epoch), one by one.
        let signatures = verifier.signatures(&delivery.events, with_epoch);
        for (signed, signature) in delivery.events.iter().zip(signatures) {
            let check = if with_epoch {
                let (check, signed_in) =
                    verifier.check_signed(signed, signature, cursor, Some(epoch), now);
                // Authentic and for this target: its epoch is the newest
                // this target has seen of the authority.
                epoch = epoch.max(signed_in);
                check
            } else {
                match verifier
                    .check_signed(signed, signature, cursor, None, now)
                    .0
                {
                    // Once fenced by epochs, the first format (which has no
                    // epoch) would bypass the fence: refused.
                    Check::Apply(_) if epoch > 0 => {
                        Check::Ack(Ack::Rejected(RejectReason::StaleLeader))
                    }
                    other => other,
                }
            };
            let event = match check {
                Check::Ack(ack) => {
                    acks.push(ack);
                    continue;
                }
                Check::Apply(event) => event,
            };
            let kind = match event.kind {
                EventKind::SnapshotPart {
                    index,
                    total,
                    credentials,
                } => {
                    let continues = partial
                        .as_ref()
                        .is_some_and(|p| p.next == index && p.total == total);
                    if index >= total || (index > 0 && !continues) {
                        // Not the part this target is waiting for: start over.
                        tracing::debug!(target_name = %self.name, seq = event.seq, index, total, "snapshot part out of sequence");
                        acks.push(Ack::NeedsSnapshot);
                        continue;
                    }
                    cursor = event.seq;
                    let p = partial.get_or_insert_with(|| Partial {
                        total,
                        next: 0,
                        credentials: Vec::new(),
                    });
                    if index == 0 {
                        p.credentials.clear();
                        p.total = total;
                    }
                    p.credentials.extend(credentials);
                    p.next = index + 1;
                    if p.next < total {
                        acks.push(Ack::Applied);
                        continue;
                    }
                    let all = partial.take().map(|p| p.credentials).unwrap_or_default();
                    EventKind::Snapshot(all)
                }
                other => {
                    // Any other event in order abandons an unfinished snapshot.
                    partial = None;
                    other
                }
            };
            // Authentic and in order: this seq is consumed whatever the
            // content, so one bad credential cannot hold up the others.
            cursor = event.seq;
            let ack = match stage(&self.store, kind, &mut conflicts) {
                Ok(s) => {
                    staged.push(s);
                    Ack::Applied
                }
                Err(reason) => Ack::Rejected(reason),
            };
            tracing::debug!(target_name = %self.name, seq = event.seq, event_id = event.event_id, ?ack, "propagation event");
            acks.push(ack);
        }
        if cursor != state.cursor || epoch != state.epoch {
            let persisted = self.db.with_connection(|conn| {
                persist(conn, &self.name, cursor, epoch, &staged, partial.as_ref())
            });
            if let Err(source) = persisted {
                tracing::error!(target_name = %self.name, error = %source, "cannot persist propagated keys; nothing applied");
                return Err(TargetError::Database {
                    path: self.db.path().to_owned(),
                    source,
                });
            }
            state.cursor = cursor;
            state.epoch = epoch;
            state.partial = partial;
            for s in staged {
                let change = match s.change {
                    Change::Key(change) => change,
                    Change::Deny(entries) => {
                        self.deny.extend(entries.iter().map(denied));
                        continue;
                    }
                    Change::Allow(cert) => {
                        self.deny.remove(&cert.to_denied());
                        continue;
                    }
                    Change::DenyAll(entries) => {
                        self.deny.replace(entries.iter().map(denied));
                        continue;
                    }
                };
                if let PropagatedChange::Upsert(k) = &change {
                    schedule_expiry(&self.store, k);
                }
                if let PropagatedChange::Replace(all) = &change {
                    all.iter().for_each(|k| schedule_expiry(&self.store, k));
                }
                if let Err(e) = self.store.apply_propagated(change) {
                    tracing::warn!(target_name = %self.name, error = %e, "a propagated change was refused by the key store");
                }
            }
            metrics::gauge!("netproc_denied_certificates").set(self.deny.len() as f64);
        }
        Ok(DeliveryReply {
            cursor: state.cursor,
            acks,
            conflicts,
        })
    }
}

struct Staged {
    change: Change,
    persist: Persist,
}

/// What a staged event changes once committed.
enum Change {
    Key(PropagatedChange),
    Deny(Vec<(CertRef, u64)>),
    Allow(CertRef),
    DenyAll(Vec<(CertRef, u64)>),
}

enum Persist {
    Put(String, Vec<u8>),
    Delete(String),
    Replace(Vec<(String, Vec<u8>)>),
    /// (encoded certificate reference, until unix ms)
    DenyPut(Vec<u8>, i64),
    DenyDelete(Vec<u8>),
    DenyReplace(Vec<(Vec<u8>, i64)>),
}

/// A deny entry as the server's list holds it.
fn denied((cert, not_after): &(CertRef, u64)) -> (netproc_pki::DeniedCert, SystemTime) {
    (cert.to_denied(), netproc_wire::from_unix_ms(*not_after))
}

/// Turns an event into a key-store change and what to store, or the
/// reason it is refused.
fn stage(
    store: &ApiKeyStore,
    kind: EventKind,
    conflicts: &mut Vec<String>,
) -> Result<Staged, RejectReason> {
    let encode = |c: &Credential| postcard::to_stdvec(c).map_err(|_| RejectReason::Malformed);
    let refused = |e: PropagationError| match e {
        PropagationError::Conflict(_) => RejectReason::Conflict,
        _ => RejectReason::Malformed,
    };
    match kind {
        EventKind::Upsert(c) => {
            let key = c.to_key().map_err(|_| RejectReason::Malformed)?;
            let change = PropagatedChange::Upsert(key);
            store.check_propagated(&change).map_err(refused)?;
            Ok(Staged {
                persist: Persist::Put(c.id.clone(), encode(&c)?),
                change: Change::Key(change),
            })
        }
        EventKind::Delete { id } => {
            let change = PropagatedChange::Delete { id: id.clone() };
            store.check_propagated(&change).map_err(refused)?;
            Ok(Staged {
                change: Change::Key(change),
                persist: Persist::Delete(id),
            })
        }
        EventKind::Snapshot(all) => {
            let mut keys = Vec::with_capacity(all.len());
            let mut rows = Vec::with_capacity(all.len());
            for c in &all {
                let key = c.to_key().map_err(|_| RejectReason::Malformed)?;
                match store.check_propagated(&PropagatedChange::Upsert(key.clone())) {
                    Err(PropagationError::Conflict(id)) => conflicts.push(id),
                    Err(_) => return Err(RejectReason::Malformed),
                    Ok(()) => {
                        rows.push((c.id.clone(), encode(c)?));
                        keys.push(key);
                    }
                }
            }
            let change = PropagatedChange::Replace(keys);
            store.check_propagated(&change).map_err(refused)?;
            Ok(Staged {
                change: Change::Key(change),
                persist: Persist::Replace(rows),
            })
        }
        // Assembled into a Snapshot by the caller.
        EventKind::SnapshotPart { .. } => Err(RejectReason::Malformed),
        EventKind::DenyCert { cert, not_after } => Ok(Staged {
            persist: Persist::DenyPut(encode_cert(&cert)?, ms(not_after)),
            change: Change::Deny(vec![(cert, not_after)]),
        }),
        EventKind::AllowCert { cert } => Ok(Staged {
            persist: Persist::DenyDelete(encode_cert(&cert)?),
            change: Change::Allow(cert),
        }),
        EventKind::DenyList(all) => {
            if all.len() > netproc_pki::DenyList::MAX_ENTRIES {
                return Err(RejectReason::Malformed);
            }
            let rows = all
                .iter()
                .map(|(c, t)| Ok((encode_cert(c)?, ms(*t))))
                .collect::<Result<_, RejectReason>>()?;
            Ok(Staged {
                persist: Persist::DenyReplace(rows),
                change: Change::DenyAll(all),
            })
        }
    }
}

fn encode_cert(c: &CertRef) -> Result<Vec<u8>, RejectReason> {
    postcard::to_stdvec(c).map_err(|_| RejectReason::Malformed)
}

fn ms(t: u64) -> i64 {
    i64::try_from(t).unwrap_or(i64::MAX)
}

/// The deny entries kept, their certificates not yet expired.
fn load_denied(
    conn: &mut Connection,
) -> rusqlite::Result<Vec<(netproc_pki::DeniedCert, SystemTime)>> {
    let mut st = conn.prepare("SELECT cert, not_after_ms FROM propagation_denied")?;
    let rows = st
        .query_map([], |r| Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, i64>(1)?)))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(rows
        .into_iter()
        .filter_map(|(cert, until)| {
            let cert: CertRef = postcard::from_bytes(&cert).ok()?;
            Some(denied(&(cert, u64::try_from(until).ok()?)))
        })
        .collect())
}

/// A stored snapshot in progress: (total, next index, credentials).
type StoredPartial = (i64, i64, Vec<u8>);

/// What the target keeps: its cursor, the propagated keys (id, encoded
/// credential) and a snapshot in progress.
#[allow(clippy::type_complexity)]
fn load(
    conn: &mut Connection,
    name: &str,
) -> rusqlite::Result<(u64, Vec<(String, Vec<u8>)>, Option<StoredPartial>, u64)> {
    let cursor: u64 = conn
        .query_row(
            "SELECT seq FROM propagation_cursor WHERE target = ?1",
            params![name],
            |r| r.get::<_, i64>(0),
        )
        .optional()?
        .map_or(0, |s| s.max(0) as u64);
    let rows = {
        let mut st = conn.prepare("SELECT id, credential FROM propagated_keys ORDER BY id")?;
        st.query_map([], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?))
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?
    };
    let partial = conn
        .query_row(
            "SELECT total, next_index, credentials FROM propagation_snapshot WHERE target = ?1",
            params![name],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()?;
    let epoch: u64 = conn
        .query_row(
            "SELECT epoch FROM propagation_epoch WHERE target = ?1",
            params![name],
            |r| r.get::<_, i64>(0),
        )
        .optional()?
        .map_or(0, |e| e.max(0) as u64);
    Ok((cursor, rows, partial, epoch))
}

fn persist(
    conn: &mut Connection,
    name: &str,
    cursor: u64,
    epoch: u64,
    staged: &[Staged],
    partial: Option<&Partial>,
) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    match partial {
        Some(p) => {
            let bytes = postcard::to_stdvec(&p.credentials)
                .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
            tx.execute(
                "INSERT INTO propagation_snapshot (target, total, next_index, credentials) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(target) DO UPDATE SET total = excluded.total, next_index = excluded.next_index,
                   credentials = excluded.credentials",
                params![name, i64::from(p.total), i64::from(p.next), bytes],
            )?;
        }
        None => {
            tx.execute(
                "DELETE FROM propagation_snapshot WHERE target = ?1",
                params![name],
            )?;
        }
    }
    for s in staged {
        match &s.persist {
            Persist::Put(id, bytes) => {
                tx.execute(
                    "INSERT INTO propagated_keys (id, credential) VALUES (?1, ?2)
                     ON CONFLICT(id) DO UPDATE SET credential = excluded.credential",
                    params![id, bytes],
                )?;
            }
            Persist::Delete(id) => {
                tx.execute("DELETE FROM propagated_keys WHERE id = ?1", params![id])?;
            }
            Persist::Replace(rows) => {
                tx.execute("DELETE FROM propagated_keys", [])?;
                let mut st = tx.prepare_cached(
                    "INSERT INTO propagated_keys (id, credential) VALUES (?1, ?2)",
                )?;
                for (id, bytes) in rows {
                    st.execute(params![id, bytes])?;
                }
            }
            Persist::DenyPut(cert, until) => {
                tx.execute(
                    "INSERT INTO propagation_denied (cert, not_after_ms) VALUES (?1, ?2)
                     ON CONFLICT(cert) DO UPDATE SET not_after_ms = excluded.not_after_ms",
                    params![cert, until],
                )?;
            }
            Persist::DenyDelete(cert) => {
                tx.execute(
                    "DELETE FROM propagation_denied WHERE cert = ?1",
                    params![cert],
                )?;
            }
            Persist::DenyReplace(rows) => {
                tx.execute("DELETE FROM propagation_denied", [])?;
                let mut st = tx.prepare_cached(
                    "INSERT INTO propagation_denied (cert, not_after_ms) VALUES (?1, ?2)
                     ON CONFLICT(cert) DO UPDATE SET not_after_ms = excluded.not_after_ms",
                )?;
                for (cert, until) in rows {
                    st.execute(params![cert, until])?;
                }
            }
        }
    }
    // Entries whose certificates have expired are not needed any more.
    tx.execute(
        "DELETE FROM propagation_denied WHERE not_after_ms <= ?1",
        params![ms(netproc_wire::unix_ms(SystemTime::now()))],
    )?;
    tx.execute(
        "INSERT INTO propagation_cursor (target, seq) VALUES (?1, ?2)
         ON CONFLICT(target) DO UPDATE SET seq = excluded.seq",
        params![name, i64::try_from(cursor).unwrap_or(i64::MAX)],
    )?;
    if epoch > 0 {
        tx.execute(
            "INSERT INTO propagation_epoch (target, epoch) VALUES (?1, ?2)
             ON CONFLICT(target) DO UPDATE SET epoch = max(epoch, excluded.epoch)",
            params![name, i64::try_from(epoch).unwrap_or(i64::MAX)],
        )?;
    }
    tx.commit()
}

/// Ends a rotated key's overlap window on time: its previous secret's
/// sessions are closed when the window closes. Without a runtime (tests
/// calling `deliver` directly) the secret still stops working on time;
/// only the closing of sessions waits for the next change.
fn schedule_expiry(store: &Arc<ApiKeyStore>, key: &netproc_auth::PropagatedKey) {
    let Some(previous) = key.previous else {
        return;
    };
    let Ok(handle) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let until = netproc_wire::from_unix_ms(previous.valid_until_ms);
    let wait = until.duration_since(SystemTime::now()).unwrap_or_default();
    let store = Arc::downgrade(store);
    let id = key.id.clone();
    handle.spawn(async move {
        tokio::time::sleep(wait).await;
        if let Some(store) = store.upgrade() {
            store.expire_previous(&id, previous.generation);
        }
    });
}

/// Counts acknowledgements (`netproc_propagation_events_total{ack}`) and
/// audits refusals that point at a forger or a misconfiguration.
fn record(acks: &[Ack], principal: &str, peer: std::net::SocketAddr) {
    for ack in acks {
        let label = match ack {
            Ack::Applied => "applied",
            Ack::Duplicate => "duplicate",
            Ack::NeedsSnapshot => "needs_snapshot",
            Ack::Rejected(RejectReason::Conflict) => "conflict",
            Ack::Rejected(RejectReason::BadSignature) => "bad_signature",
            Ack::Rejected(RejectReason::UnknownSigner) => "unknown_signer",
            Ack::Rejected(RejectReason::WrongTarget) => "wrong_target",
            Ack::Rejected(RejectReason::Stale) => "stale",
            Ack::Rejected(RejectReason::StaleLeader) => "stale_leader",
            Ack::Rejected(_) => "malformed",
        };
        metrics::counter!("netproc_propagation_events_total", "ack" => label).increment(1);
        if matches!(
            ack,
            Ack::Rejected(
                RejectReason::BadSignature
                    | RejectReason::UnknownSigner
                    | RejectReason::WrongTarget
                    | RejectReason::Stale
                    | RejectReason::StaleLeader
            )
        ) {
            tracing::warn!(target: netproc_server::AUDIT_TARGET, event = "propagation_rejected", reason = label, principal = ?principal, %peer, "a propagation event was refused");
        }
    }
}

impl ExtensionHandler for PropagationTarget {
    fn handle(
        &self,
        ctx: CallContext,
        payload: Vec<u8>,
    ) -> netproc_auth::BoxFuture<'static, Result<Vec<u8>, CallError>> {
        self.handle_format(ctx, payload, false)
    }
}

/// The second delivery extension ([`EXTENSION_V2`]): events with epochs.
struct EpochHandler(Arc<PropagationTarget>);

impl ExtensionHandler for EpochHandler {
    fn handle(
        &self,
        ctx: CallContext,
        payload: Vec<u8>,
    ) -> netproc_auth::BoxFuture<'static, Result<Vec<u8>, CallError>> {
        self.0.handle_format(ctx, payload, true)
    }
}

impl PropagationTarget {
    fn handle_format(
        &self,
        ctx: CallContext,
        payload: Vec<u8>,
        with_epoch: bool,
    ) -> netproc_auth::BoxFuture<'static, Result<Vec<u8>, CallError>> {
        let principal = ctx.principal().id.clone();
        let peer = ctx.peer();
        let delivery = Delivery::decode(&payload);
        let this = self.me.upgrade();
        Box::pin(async move {
            let delivery = delivery.map_err(|_| {
                CallError::with_code(ErrorCode::InvalidRequest, "not a propagation delivery")
            })?;
            if delivery.events.len() > MAX_EVENTS_PER_DELIVERY {
                return Err(CallError::with_code(
                    ErrorCode::InvalidRequest,
                    format!("at most {MAX_EVENTS_PER_DELIVERY} events per delivery"),
                ));
            }
            let this =
                this.ok_or_else(|| CallError::with_code(ErrorCode::Unavailable, "shutting down"))?;
            let reply = tokio::task::spawn_blocking(move || {
                this.deliver_format(&delivery, SystemTime::now(), with_epoch)
            })
            .await
            .map_err(|_| CallError::new("the delivery could not be applied"))?;
            if let Ok(r) = &reply {
                record(&r.acks, &principal, peer);
            }
            // The details are in the server's log, not for the peer.
            reply.map(|r| r.encode()).map_err(|_| {
                CallError::new("the delivery could not be stored; nothing was applied")
            })
        })
    }
}
