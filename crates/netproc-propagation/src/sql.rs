//! The authority's store in SQL, once for every backend: every function
//! here runs inside one transaction of a backend's database thread
//! ([`crate::db`]), through the small [`Sql`] seam (statements with `$1`
//! placeholders; rows of integers, text, bytes, booleans). SQLite and
//! PostgreSQL differ only below that seam and in their schema.
//!
//! Over 600 lines on purpose: it is the SQL of every store operation in one
//! place.

use netproc_wire::unix_ms;
use std::collections::{BTreeSet, HashSet};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use netproc_auth::{ApiKey, BoxFuture};

use crate::db::Db;
use crate::plan::{BATCH_EVENTS, backoff, batch_len, wants_snapshot};
use crate::query::{Arg, Dialect, Row, Sql, Stmt, args, stmt};
use crate::requests::Body;
use crate::store::{Batch, Progress, Sent, Store};
use crate::types::*;
use crate::wire::DeliveryReply;
use crate::{Ack, CertRef, Credential, EventKind, RejectReason};

pub(crate) fn now_ms() -> u64 {
    unix_ms(SystemTime::now())
}

pub(crate) use crate::query::{encode, i64_of, u64_of};

/// Target names: 1 to 128 of `[A-Za-z0-9._:-]`.
pub(crate) fn valid_target_name(name: &str) -> bool {
    (1..=128).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b))
}

pub(crate) fn decode_credential(bytes: &[u8]) -> Result<Credential, AuthorityError> {
    postcard::from_bytes(bytes)
        .map_err(|e| AuthorityError::Database(DatabaseError::new("unreadable credential", e)))
}

pub(crate) fn load_credential(
    c: &mut dyn Sql,
    id: &str,
) -> Result<Option<Credential>, AuthorityError> {
    c.first(
        "SELECT credential FROM credentials WHERE id = $1",
        args![id],
    )?
    .map(|r| decode_credential(&r.bytes(0)?))
    .transpose()
}

pub(crate) fn credential_targets(
    c: &mut dyn Sql,
    id: &str,
) -> Result<BTreeSet<String>, AuthorityError> {
    c.query(
        "SELECT target FROM credential_targets WHERE credential_id = $1",
        args![id],
    )?
    .iter()
    .map(|r| r.string(0))
    .collect()
}

/// Who makes a change: the process (as it says: `user@host pid N`), and
/// the database role that asked for it when that is not this session's
/// own (a change request's requester; empty: PostgreSQL records the
/// session's role).
#[derive(Clone, Copy)]
pub(crate) struct By<'a> {
    pub(crate) process: &'a str,
    pub(crate) role: &'a str,
}

/// Changes kept in the `changes` table (who made each): the newest this
/// many; older ones are pruned now and then.
const CHANGES_KEPT: i64 = 100_000;

/// The writes of one change, sent as one pipeline: numbering the change,
/// then queueing its events, then anything else.
struct Writes<'a> {
    dialect: Dialect,
    stmts: Vec<Stmt<'a>>,
    /// Statements that return a row only when their target exists.
    checks: Vec<(usize, &'a str)>,
    /// The statement that returns the new change's id.
    change_at: Option<usize>,
    /// The statement that inserts a new credential if no other process
    /// did: it returns a row only then.
    absent: Option<(usize, &'a str)>,
}

impl<'a> Writes<'a> {
    fn new(c: &dyn Sql) -> Writes<'a> {
        Writes {
            dialect: c.dialect(),
            stmts: Vec::new(),
            checks: Vec::new(),
            change_at: None,
            absent: None,
        }
    }

    fn push(&mut self, stmt: Stmt<'a>) {
        self.stmts.push(stmt);
    }

    /// Numbers a new change (the `change_id` counter, whose row stays
    /// locked until the transaction ends) and records what it does to
    /// which credential and who asked (PostgreSQL adds the database role
    /// it authenticated).
    fn change(&mut self, credential_id: &'a str, action: &'a str, by: By<'a>, now: i64) {
        match self.dialect {
            Dialect::Postgres => self.stmts.push(stmt!(
                "WITH m AS (UPDATE meta SET value = value + 1 WHERE key = 'change_id' RETURNING value)
                 INSERT INTO changes (change_id, credential_id, action, changed_by, at_ms, db_role)
                 SELECT value, $1, $2, $3, $4, COALESCE(NULLIF($5, ''), current_user) FROM m
                 RETURNING change_id",
                credential_id,
                action,
                by.process,
                now,
                by.role
            )),
            Dialect::Sqlite => {
                self.stmts.push(stmt!(
                    "UPDATE meta SET value = value + 1 WHERE key = 'change_id'"
                ));
                self.stmts.push(stmt!(
                    "INSERT INTO changes (change_id, credential_id, action, changed_by, at_ms, db_role)
                     SELECT value, $1, $2, $3, $4, NULLIF($5, '') FROM meta WHERE key = 'change_id'
                     RETURNING change_id",
                    credential_id,
                    action,
                    by.process,
                    now,
                    by.role
                ));
            }
        }
        self.change_at = Some(self.stmts.len() - 1);
    }

    /// Queues `kind` (encoded) for `target` under its next seq, as part of
    /// the change numbered before, and records it as the credential's
    /// latest change there (PostgreSQL: one statement).
    fn enqueue(&mut self, target: &'a str, credential_id: &'a str, kind: &'a [u8]) {
        self.checks.push((self.stmts.len(), target));
        match self.dialect {
            Dialect::Postgres => self.stmts.push(stmt!(
                "WITH s AS (UPDATE targets SET next_seq = next_seq + 1 WHERE name = $1
                            RETURNING name, next_seq - 1 AS seq),
                 o AS (INSERT INTO outbox (target, seq, change_id, credential_id, kind)
                       SELECT name, seq, (SELECT value FROM meta WHERE key = 'change_id'), $2, $3 FROM s)
                 INSERT INTO delivery (target, credential_id, seq, error)
                 SELECT name, $2, seq, NULL FROM s
                 ON CONFLICT (target, credential_id) DO UPDATE SET seq = excluded.seq, error = NULL
                 RETURNING 1",
                target,
                credential_id,
                kind
            )),
            Dialect::Sqlite => self.stmts.extend([
                stmt!(
                    "UPDATE targets SET next_seq = next_seq + 1 WHERE name = $1 RETURNING 1",
                    target
                ),
                stmt!(
                    "INSERT INTO outbox (target, seq, change_id, credential_id, kind)
                     SELECT name, next_seq - 1, (SELECT value FROM meta WHERE key = 'change_id'), $2, $3
                     FROM targets WHERE name = $1",
                    target,
                    credential_id,
                    kind
                ),
                stmt!(
                    "INSERT INTO delivery (target, credential_id, seq, error)
                     SELECT name, $2, next_seq - 1, NULL FROM targets WHERE name = $1
                     ON CONFLICT (target, credential_id) DO UPDATE SET seq = excluded.seq, error = NULL",
                    target,
                    credential_id
                ),
            ]),
        }
    }

    /// Sends it all; `Err(UnknownTarget)` if an event's target does not
    /// exist. Every thousandth change prunes the oldest change records.
    fn run(self, c: &mut dyn Sql) -> Result<(), AuthorityError> {
        let (rows, failed) = c.pipeline_until_error(&self.stmts);
        // Another process created the id: its credential's later writes
        // may have failed over that (they roll back with the savepoint).
        if let Some((i, id)) = self.absent
            && rows.get(i).is_some_and(Vec::is_empty)
        {
            return Err(AuthorityError::AlreadyExists(id.to_owned()));
        }
        if let Some(e) = failed {
            return Err(e);
        }
        for (i, target) in &self.checks {
            if rows.get(*i).is_none_or(Vec::is_empty) {
                return Err(AuthorityError::UnknownTarget((*target).to_owned()));
            }
        }
        let change_id = self
            .change_at
            .and_then(|i| rows.get(i)?.first().map(|r| r.i64(0)))
            .transpose()?;
        if let Some(id) = change_id.filter(|id| id % 1_000 == 0) {
            c.exec(
                "DELETE FROM changes WHERE change_id <= $1",
                args![id - CHANGES_KEPT],
            )?;
        }
        Ok(())
    }
}

/// The statement that reads a credential to change it, locking its row
/// until the transaction ends (PostgreSQL; SQLite has one writer): a
/// change reads what the one before it wrote, so each writes only its own
/// fields (a rotation and a privilege change made at once both stay).
fn load_for_change(c: &dyn Sql) -> &'static str {
    match c.dialect() {
        Dialect::Sqlite => "SELECT credential FROM credentials WHERE id = $1",
        Dialect::Postgres => "SELECT credential FROM credentials WHERE id = $1 FOR UPDATE",
    }
}

/// A credential (its row locked, [`load_for_change`]) and its targets.
fn credential_for_change(
    c: &mut dyn Sql,
    id: &str,
) -> Result<(Option<Credential>, BTreeSet<String>), AuthorityError> {
    let rows = c.pipeline(&[
        stmt!(load_for_change(c), id),
        stmt!(
            "SELECT target FROM credential_targets WHERE credential_id = $1",
            id
        ),
    ])?;
    credential_and_targets(&rows[0], &rows[1])
}

fn credential_and_targets(
    credential: &[Row],
    targets: &[Row],
) -> Result<(Option<Credential>, BTreeSet<String>), AuthorityError> {
    let cred = credential
        .first()
        .map(|r| decode_credential(&r.bytes(0)?))
        .transpose()?;
    let targets = targets
        .iter()
        .map(|r| r.string(0))
        .collect::<Result<_, _>>()?;
    Ok((cred, targets))
}

/// The next seq for `target`. The counter row stays locked until the
/// transaction ends (PostgreSQL: a row lock; SQLite: the one writer), so
/// seqs and snapshots are serialised per target across processes.
pub(crate) fn allocate_seq(c: &mut dyn Sql, target: &str) -> Result<u64, AuthorityError> {
    c.first(
        "UPDATE targets SET next_seq = next_seq + 1 WHERE name = $1 RETURNING next_seq - 1",
        args![target],
    )?
    .map(|r| r.i64(0).map(u64_of))
    .transpose()?
    .ok_or_else(|| AuthorityError::UnknownTarget(target.to_owned()))
}

pub(crate) fn ensure_in(
    c: &mut dyn Sql,
    spec: &CredentialSpec,
    wanted: &BTreeSet<String>,
    by: By<'_>,
    secret: Option<[u8; 32]>,
) -> Result<Ensured, AuthorityError> {
    // Every read in one round trip. (Each target the change is sent to is
    // checked as its event is queued.)
    let reads = [
        stmt!(load_for_change(c), &spec.id),
        stmt!(
            "SELECT target FROM credential_targets WHERE credential_id = $1",
            &spec.id
        ),
        stmt!("SELECT 1 FROM tombstones WHERE id = $1", &spec.id),
    ];
    let rows = c.pipeline(&reads)?;
    let (old, old_targets) = credential_and_targets(&rows[0], &rows[1])?;
    if old.is_none() && !rows[2].is_empty() {
        // A revoked id stays revoked unless asked.
        if !spec.recreate {
            return Err(AuthorityError::Revoked(spec.id.clone()));
        }
        c.exec("DELETE FROM tombstones WHERE id = $1", args![&spec.id])?;
    }
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
                // A requester made the secret and sent only its hash.
                None if secret.is_some() => c.secret_sha256 = secret,
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
    cred.privileges = spec.key.privileges.names();
    cred.functions = spec
        .key
        .functions
        .as_ref()
        .map(|f| f.iter().cloned().collect());
    cred.binding = spec.key.binding.as_ref().map(ToString::to_string);
    cred.expires_at = spec
        .key
        .expires_at
        .map(|t| t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()));
    let credential_changed = old.as_ref() != Some(&cred);
    let changed = credential_changed || &old_targets != wanted;
    if changed {
        let action = if old.is_none() { "create" } else { "update" };
        save_and_send(
            c,
            &cred,
            wanted,
            &old_targets,
            credential_changed,
            action,
            by,
        )?;
    }
    Ok(Ensured {
        created: old.is_none(),
        changed,
        api_key,
    })
}

/// Stores `cred` on `targets` and queues: an upsert for each target that
/// needs it (all of them if the credential changed, the new ones
/// otherwise), a delete for each target in `current` (where it is now) it
/// left.
pub(crate) fn save_and_send(
    c: &mut dyn Sql,
    cred: &Credential,
    targets: &BTreeSet<String>,
    current: &BTreeSet<String>,
    credential_changed: bool,
    action: &str,
    by: By<'_>,
) -> Result<(), AuthorityError> {
    let bytes = encode(cred)?;
    let upsert = encode(&EventKind::Upsert(cred.clone()))?;
    let delete = encode(&EventKind::Delete {
        id: cred.id.clone(),
    })?;
    let now = i64_of(now_ms());
    // Every write in one round trip.
    let mut w = Writes::new(c);
    if action == "create" {
        // Insert-if-absent: with several authority processes, exactly one
        // creator of an id gets the secret (PostgreSQL makes the second
        // wait for the first's commit, then finds the row; its writes
        // are rolled back with its savepoint).
        w.absent = Some((w.stmts.len(), &cred.id));
        w.push(stmt!(
            "INSERT INTO credentials (id, credential, updated_at_ms) VALUES ($1, $2, $3)
             ON CONFLICT (id) DO NOTHING RETURNING id",
            &cred.id,
            &bytes,
            now
        ));
    } else {
        w.push(stmt!(
            "INSERT INTO credentials (id, credential, updated_at_ms) VALUES ($1, $2, $3)
             ON CONFLICT (id) DO UPDATE SET credential = excluded.credential, updated_at_ms = excluded.updated_at_ms",
            &cred.id,
            &bytes,
            now
        ));
    }
    w.change(&cred.id, action, by, now);
    for t in targets.difference(current) {
        w.push(stmt!(
            "INSERT INTO credential_targets (credential_id, target) VALUES ($1, $2)",
            &cred.id,
            t
        ));
    }
    for t in current.difference(targets) {
        w.push(stmt!(
            "DELETE FROM credential_targets WHERE credential_id = $1 AND target = $2",
            &cred.id,
            t
        ));
        w.enqueue(t, &cred.id, &delete);
    }
    for t in targets {
        if credential_changed || !current.contains(t) {
            w.enqueue(t, &cred.id, &upsert);
        }
    }
    w.run(c)
}

/// Queues a snapshot of everything `target` should hold, in parts of about
/// `part_bytes`, superseding everything queued before it. Its content is
/// read in the transaction that assigns its seqs, after the target's
/// counter row is locked: a change that commits first is in it, one that
/// commits later gets a later seq.
pub(crate) fn queue_snapshot(
    c: &mut dyn Sql,
    target: &str,
    acked: u64,
    part_bytes: usize,
) -> Result<(), AuthorityError> {
    // Lock the counter row first (a no-op update), then read.
    c.exec(
        "UPDATE targets SET next_seq = next_seq WHERE name = $1",
        args![target],
    )?;
    let rows = c.query(
        "SELECT c.credential FROM credentials c JOIN credential_targets ct ON ct.credential_id = c.id
         WHERE ct.target = $1 ORDER BY c.id",
        args![target],
    )?;
    let mut parts: Vec<Vec<Credential>> = vec![Vec::new()];
    let mut size = 0;
    for row in rows {
        let row = row.bytes(0)?;
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
    let mut last;
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
        let kind = encode(&kind)?;
        c.exec(
            "INSERT INTO outbox (target, seq, change_id, credential_id, kind) VALUES ($1, $2, 0, '', $3)",
            args![target, i64_of(last), &kind],
        )?;
    }
    // Then the whole deny list, which replaces the target's.
    let now = i64_of(now_ms());
    let denied = c.query(
        "SELECT cert, not_after_ms FROM denied_certs WHERE not_after_ms > $1 ORDER BY label",
        args![now],
    )?;
    let list = denied
        .iter()
        .map(|r| {
            let cert: CertRef = postcard::from_bytes(&r.bytes(0)?).map_err(|e| {
                AuthorityError::Database(DatabaseError::new("unreadable denied certificate", e))
            })?;
            Ok((cert, u64_of(r.i64(1)?)))
        })
        .collect::<Result<Vec<_>, AuthorityError>>()?;
    last = allocate_seq(c, target)?;
    first.get_or_insert(last);
    c.exec(
        "INSERT INTO outbox (target, seq, change_id, credential_id, kind) VALUES ($1, $2, 0, '', $3)",
        args![target, i64_of(last), &encode(&EventKind::DenyList(list))?],
    )?;
    let first = first.unwrap_or(last);
    c.exec(
        "DELETE FROM outbox WHERE target = $1 AND seq < $2",
        args![target, i64_of(first)],
    )?;
    c.exec(
        "UPDATE delivery SET seq = $2, error = NULL WHERE target = $1 AND seq > $3",
        args![target, i64_of(last), i64_of(acked)],
    )?;
    c.exec(
        "UPDATE targets SET snapshot_needed = 0 WHERE name = $1",
        args![target],
    )?;
    Ok(())
}

/// Whether `target`'s backlog is longer than a snapshot would be: more
/// queued events than one batch and than the credentials it should hold.
/// (Many changes to few credentials while it was away: one snapshot says
/// it all.)
pub(crate) fn far_behind(
    c: &mut dyn Sql,
    target: &str,
    acked: u64,
) -> Result<bool, AuthorityError> {
    let count = |c: &mut dyn Sql, sql: &str, args: &[Arg<'_>]| -> Result<u64, AuthorityError> {
        Ok(c.first(sql, args)?
            .map(|r| r.i64(0))
            .transpose()?
            .map_or(0, u64_of))
    };
    let backlog = count(
        c,
        "SELECT COUNT(*) FROM outbox WHERE target = $1 AND seq > $2",
        args![target, i64_of(acked)],
    )?;
    // Short backlogs never get a snapshot: skip counting what it holds.
    if backlog <= BATCH_EVENTS as u64 {
        return Ok(false);
    }
    let held = count(
        c,
        "SELECT COUNT(*) FROM credential_targets WHERE target = $1",
        args![target],
    )?;
    Ok(wants_snapshot(false, backlog, held))
}

/// The next batch for `target`: a snapshot first if it needs one (or is
/// far behind), then queued events in order.
pub(crate) fn prepare(
    c: &mut dyn Sql,
    target: &str,
    part_bytes: usize,
) -> Result<Batch, AuthorityError> {
    let row = c
        .first(
            "SELECT acked_seq, snapshot_needed FROM targets WHERE name = $1",
            args![target],
        )?
        .ok_or_else(|| AuthorityError::UnknownTarget(target.to_owned()))?;
    let (acked, snapshot_needed) = (u64_of(row.i64(0)?), row.bool(1)?);
    if snapshot_needed || far_behind(c, target, acked)? {
        queue_snapshot(c, target, acked, part_bytes)?;
    }
    let rows = c.query(
        "SELECT o.seq, o.change_id, o.kind, ch.changed_by, ch.db_role FROM outbox o
         LEFT JOIN changes ch ON ch.change_id = o.change_id
         WHERE o.target = $1 AND o.seq > $2 ORDER BY o.seq LIMIT $3",
        args![target, i64_of(acked), BATCH_EVENTS as i64],
    )?;
    let n = batch_len(rows.iter().map(|r| r.bytes(2).map_or(0, |k| k.len())));
    let mut events = Vec::new();
    let mut authors = Vec::new();
    for r in rows.iter().take(n) {
        let kind: EventKind = postcard::from_bytes(&r.bytes(2)?).map_err(|e| {
            AuthorityError::Database(DatabaseError::new("unreadable queued event", e))
        })?;
        events.push((u64_of(r.i64(0)?), u64_of(r.i64(1)?), kind));
        authors.push((r.opt_string(3)?, r.opt_string(4)?));
    }
    Ok(Batch { events, authors })
}

/// Records a target's answer (or the failure to get one).
pub(crate) fn complete(
    c: &mut dyn Sql,
    target: &str,
    config: &AuthorityConfig,
    sent: &[(u64, Option<(String, bool)>)],
    reply: Result<DeliveryReply, String>,
) -> Result<Progress, AuthorityError> {
    let now = now_ms();
    let row = c
        .first(
            "SELECT acked_seq, next_seq, attempts FROM targets WHERE name = $1",
            args![target],
        )?
        .ok_or_else(|| AuthorityError::UnknownTarget(target.to_owned()))?;
    let (acked, next_seq, attempts) = (
        u64_of(row.i64(0)?),
        u64_of(row.i64(1)?),
        u32::try_from(row.i64(2)?).unwrap_or(u32::MAX),
    );
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
                    let reason = reason.to_string();
                    c.exec(
                        "UPDATE delivery SET error = $3 WHERE target = $1 AND credential_id = $2 AND seq = $4",
                        args![target, id, &reason, i64_of(*seq)],
                    )?;
                }
            }
            Ack::Rejected(reason) => refusal = Some(format!("rejected: {reason}")),
        }
    }
    for id in &reply.conflicts {
        c.exec(
            "UPDATE delivery SET error = 'conflict' WHERE target = $1 AND credential_id = $2",
            args![target, id],
        )?;
    }
    let mut new_acked = acked.max(reply.cursor);
    if reply.cursor >= next_seq {
        // The target is ahead of this database (restored from a backup?):
        // continue above its cursor, from a snapshot.
        c.exec(
            "UPDATE targets SET next_seq = $2 WHERE name = $1",
            args![target, i64_of(reply.cursor + 1)],
        )?;
        snapshot_needed = Some(true);
    } else if reply.cursor < acked {
        // The target lost its state: bring it back with a snapshot.
        new_acked = reply.cursor;
        snapshot_needed = Some(true);
    }
    c.exec(
        "UPDATE targets SET acked_seq = $2 WHERE name = $1",
        args![target, i64_of(new_acked)],
    )?;
    if let Some(needed) = snapshot_needed {
        c.exec(
            "UPDATE targets SET snapshot_needed = $2 WHERE name = $1",
            args![target, i64::from(needed)],
        )?;
    }
    c.exec(
        "DELETE FROM outbox WHERE target = $1 AND seq <= $2",
        args![target, i64_of(new_acked)],
    )?;
    // Forget delivered deletions (their credential is gone): by id for the
    // deletes in this batch, by a scan after a snapshot (which may have
    // superseded any number of them).
    for (seq, credential) in sent {
        if let Some((id, true)) = credential
            && *seq <= new_acked
        {
            c.exec(
                "DELETE FROM delivery WHERE target = $1 AND credential_id = $2 AND seq <= $3 AND error IS NULL
                   AND NOT EXISTS (SELECT 1 FROM credential_targets WHERE credential_id = $2 AND target = $1)",
                args![target, id, i64_of(new_acked)],
            )?;
        }
    }
    let snapshot_delivered = sent
        .iter()
        .any(|(seq, credential)| credential.is_none() && *seq <= new_acked);
    if snapshot_delivered {
        c.exec(
            "DELETE FROM delivery WHERE target = $1 AND seq <= $2 AND error IS NULL AND credential_id NOT IN
               (SELECT credential_id FROM credential_targets WHERE target = $1)
               AND credential_id NOT IN (SELECT label FROM denied_certs)",
            args![target, i64_of(new_acked)],
        )?;
    }
    if let Some(reason) = refusal {
        let mut p = fail(c, target, config, attempts, now, reason)?;
        p.acked = acked_now;
        return Ok(p);
    }
    c.exec(
        "UPDATE targets SET attempts = 0, last_error = NULL, last_attempt_ms = $2, next_attempt_ms = 0 WHERE name = $1",
        args![target, i64_of(now)],
    )?;
    let more = c
        .first(
            "SELECT snapshot_needed != 0 OR EXISTS (SELECT 1 FROM outbox WHERE target = $1 AND seq > $2) FROM targets WHERE name = $1",
            args![target, i64_of(new_acked)],
        )?
        .map(|r| r.bool(0))
        .transpose()?
        .unwrap_or(false);
    Ok(Progress {
        acked: acked_now,
        error: None,
        more: more && (acked_now > 0 || snapshot_needed == Some(true)),
    })
}

/// Counts a failed attempt and schedules the next with exponential backoff
/// and jitter (between half and all of the doubled delay).
pub(crate) fn fail(
    c: &mut dyn Sql,
    target: &str,
    config: &AuthorityConfig,
    attempts: u32,
    now: u64,
    reason: String,
) -> Result<Progress, AuthorityError> {
    let attempts = attempts.saturating_add(1);
    let mut r = [0u8; 2];
    let _ = netproc_pki::random_bytes(&mut r);
    let delay = backoff(
        attempts,
        config.base_backoff,
        config.max_backoff,
        u16::from_le_bytes(r),
    );
    let delay = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
    c.exec(
        "UPDATE targets SET attempts = $2, last_error = $3, last_attempt_ms = $4, next_attempt_ms = $5 WHERE name = $1",
        args![
            target,
            i64::from(attempts),
            &reason,
            i64_of(now),
            i64_of(now.saturating_add(delay))
        ],
    )?;
    Ok(Progress {
        acked: 0,
        error: Some(reason),
        more: false,
    })
}

/// The store over a database thread ([`Db`]): SQLite (embedded) or
/// PostgreSQL, the same SQL.
pub(crate) struct SqlStore {
    db: Db,
    /// Who this process's changes are recorded as made by.
    actor: std::sync::Arc<str>,
    /// PostgreSQL (change requests exist only there).
    postgres: bool,
    /// A role that may only request changes (PostgreSQL): how long to wait
    /// for each to be applied.
    requests: Option<Duration>,
}

impl SqlStore {
    pub(crate) fn new(db: Db, postgres: bool, requests: Option<Duration>) -> SqlStore {
        SqlStore {
            db,
            actor: actor().into(),
            postgres,
            requests,
        }
    }

    /// Runs `f` in the next transaction as this process (and, on
    /// PostgreSQL, the session's own database role).
    async fn run_as_me<T: Send + 'static>(
        &self,
        mut f: impl FnMut(&mut dyn Sql, By<'_>) -> Result<T, AuthorityError> + Send + 'static,
    ) -> Result<T, AuthorityError> {
        let who = std::sync::Arc::clone(&self.actor);
        self.db
            .run(move |c| {
                let by = By {
                    process: &who,
                    role: "",
                };
                f(c, by)
            })
            .await
    }

    /// Records a change request and waits for the leader's outcome.
    async fn request(
        &self,
        timeout: Duration,
        action: &'static str,
        id: String,
        body: crate::requests::Body,
    ) -> Result<crate::requests::Outcome, AuthorityError> {
        let label = std::sync::Arc::clone(&self.actor);
        let request = self
            .db
            .run(move |c| crate::requests::submit(c, action, &id, &body, &label))
            .await?;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(outcome) = self
                .db
                .run(move |c| crate::requests::outcome(c, request))
                .await?
            {
                return outcome.into_result();
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(AuthorityError::NotApplied { request });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `ensure` by request: a new API key's secret is made here and only
    /// its hash is sent; it is handed out if the request created the key.
    async fn request_ensure(
        &self,
        timeout: Duration,
        spec: CredentialSpec,
        targets: BTreeSet<String>,
    ) -> Result<Ensured, AuthorityError> {
        let key = match spec.ed25519_public_key {
            Some(_) => None,
            None => Some(
                ApiKey::generate(&spec.id).map_err(|e| AuthorityError::Invalid(e.to_string()))?,
            ),
        };
        let body = crate::requests::Body::ensure(&spec, targets, key.as_ref().map(|k| k.1));
        match self
            .request(timeout, "ensure", spec.id.clone(), body)
            .await?
        {
            crate::requests::Outcome::Ensured { created, changed } => Ok(Ensured {
                created,
                changed,
                api_key: key.filter(|_| created).map(|k| k.0),
            }),
            _ => Err(AuthorityError::Database(DatabaseError::new(
                "change request",
                "an unexpected outcome",
            ))),
        }
    }
}

/// Gives API key `id` the secret whose hash is `hash`.
pub(crate) fn rotate_in(
    c: &mut dyn Sql,
    id: &str,
    overlap: Option<Duration>,
    hash: [u8; 32],
    by: By<'_>,
) -> Result<(), AuthorityError> {
    let (cred, targets) = credential_for_change(c, id)?;
    let mut cred = cred.ok_or_else(|| AuthorityError::UnknownCredential(id.to_owned()))?;
    let Some(old_hash) = cred.secret_sha256 else {
        return Err(AuthorityError::NotAnApiKey(id.to_owned()));
    };
    cred.previous = overlap.map(|d| {
        (
            old_hash,
            cred.generation,
            now_ms().saturating_add(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        )
    });
    cred.secret_sha256 = Some(hash);
    cred.generation += 1;
    save_and_send(c, &cred, &targets, &targets, true, "rotate", by)
}

/// Removes credential `id` everywhere, leaving a tombstone.
pub(crate) fn revoke_in(c: &mut dyn Sql, id: &str, by: By<'_>) -> Result<(), AuthorityError> {
    let (cred, targets) = credential_for_change(c, id)?;
    if cred.is_none() {
        return Err(AuthorityError::UnknownCredential(id.to_owned()));
    }
    let delete = encode(&EventKind::Delete { id: id.to_owned() })?;
    let now = i64_of(now_ms());
    let mut w = Writes::new(c);
    w.push(stmt!("DELETE FROM credentials WHERE id = $1", id));
    w.push(stmt!(
        "DELETE FROM credential_targets WHERE credential_id = $1",
        id
    ));
    // A tombstone: `ensure` does not bring the id back unless asked.
    w.push(stmt!(
        "INSERT INTO tombstones (id, revoked_at_ms, revoked_by) VALUES ($1, $2, $3)
         ON CONFLICT (id) DO UPDATE SET revoked_at_ms = excluded.revoked_at_ms, revoked_by = excluded.revoked_by",
        id,
        now,
        by.process
    ));
    w.change(id, "revoke", by, now);
    for t in &targets {
        w.enqueue(t, id, &delete);
    }
    w.run(c)
}

/// This process, as its changes record it: `user@host pid N` (the
/// database role PostgreSQL authenticated is recorded beside it).
fn actor() -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".into());
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default();
    format!("{user}@{host} pid {}", std::process::id())
}

/// Takes or renews the lease (PostgreSQL; SQLite has one delivering
/// process by design, always epoch 1). Expiry is in the database's clock.
pub(crate) fn lease_in(
    c: &mut dyn Sql,
    holder: &str,
    ttl: Duration,
) -> Result<Option<u64>, AuthorityError> {
    if c.dialect() == Dialect::Sqlite {
        return Ok(Some(1));
    }
    let ms = i64_of(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX));
    let row = c.first(
        "UPDATE leader SET
           epoch = CASE WHEN holder = $1 AND expires_at > now() THEN epoch ELSE epoch + 1 END,
           since = CASE WHEN holder = $1 AND expires_at > now() THEN since ELSE now() END,
           holder = $1,
           expires_at = now() + CAST($2 AS BIGINT) * interval '1 millisecond'
         WHERE id = 1 AND (holder = $1 OR expires_at <= now())
         RETURNING epoch",
        args![holder, ms],
    )?;
    row.map(|r| r.i64(0).map(u64_of)).transpose()
}

pub(crate) fn leader_in(c: &mut dyn Sql) -> Result<Option<LeaderInfo>, AuthorityError> {
    if c.dialect() == Dialect::Sqlite {
        return Ok(None);
    }
    let row = c.first(
        "SELECT holder, epoch,
           CAST(EXTRACT(EPOCH FROM since) * 1000 AS BIGINT),
           CAST(EXTRACT(EPOCH FROM expires_at) * 1000 AS BIGINT)
         FROM leader WHERE id = 1 AND epoch > 0",
        &[],
    )?;
    row.map(|r| {
        Ok(LeaderInfo {
            holder: r.string(0)?,
            epoch: u64_of(r.i64(1)?),
            since_ms: u64_of(r.i64(2)?),
            expires_ms: u64_of(r.i64(3)?),
        })
    })
    .transpose()
}

impl Store for SqlStore {
    fn lease(
        &self,
        holder: String,
        ttl: Duration,
    ) -> BoxFuture<'_, Result<Option<u64>, AuthorityError>> {
        Box::pin(self.db.run(move |c| lease_in(c, &holder, ttl)))
    }

    fn leader(&self) -> BoxFuture<'_, Result<Option<LeaderInfo>, AuthorityError>> {
        Box::pin(self.db.run(leader_in))
    }

    fn ensure(
        &self,
        spec: CredentialSpec,
        targets: BTreeSet<String>,
    ) -> BoxFuture<'_, Result<Ensured, AuthorityError>> {
        Box::pin(async move {
            if let Some(timeout) = self.requests {
                return self.request_ensure(timeout, spec, targets).await;
            }
            self.run_as_me(move |c, by| ensure_in(c, &spec, &targets, by, None))
                .await
        })
    }

    fn rotate(
        &self,
        id: String,
        overlap: Option<Duration>,
    ) -> BoxFuture<'_, Result<ApiKey, AuthorityError>> {
        Box::pin(async move {
            let (key, hash) =
                ApiKey::generate(&id).map_err(|e| AuthorityError::Invalid(e.to_string()))?;
            if let Some(timeout) = self.requests {
                let body = crate::requests::Body::rotate(hash, overlap);
                let id2 = id.clone();
                self.request(timeout, "rotate", id2, body).await?;
                return Ok(key);
            }
            self.run_as_me(move |c, by| rotate_in(c, &id, overlap, hash, by))
                .await?;
            Ok(key)
        })
    }

    fn revoke(&self, id: String) -> BoxFuture<'_, Result<(), AuthorityError>> {
        Box::pin(async move {
            if let Some(timeout) = self.requests {
                let body = crate::requests::Body::default();
                return self.request(timeout, "revoke", id, body).await.map(|_| ());
            }
            self.run_as_me(move |c, by| revoke_in(c, &id, by)).await
        })
    }

    fn requests_only(&self) -> bool {
        self.requests.is_some()
    }

    fn deny_cert(
        &self,
        cert: CertRef,
        not_after_ms: u64,
    ) -> BoxFuture<'_, Result<(), AuthorityError>> {
        Box::pin(async move {
            if let Some(timeout) = self.requests {
                let (label, body) = (cert.label(), Body::cert(cert, Some(not_after_ms)));
                return self
                    .request(timeout, "deny-cert", label, body)
                    .await
                    .map(drop);
            }
            self.run_as_me(move |c, by| deny_cert_in(c, &cert, not_after_ms, by))
                .await
        })
    }

    fn allow_cert(&self, cert: CertRef) -> BoxFuture<'_, Result<(), AuthorityError>> {
        Box::pin(async move {
            if let Some(timeout) = self.requests {
                let (label, body) = (cert.label(), Body::cert(cert, None));
                return self
                    .request(timeout, "allow-cert", label, body)
                    .await
                    .map(drop);
            }
            self.run_as_me(move |c, by| allow_cert_in(c, &cert, by))
                .await
        })
    }

    fn denied_certs(&self) -> BoxFuture<'_, Result<Vec<(CertRef, u64)>, AuthorityError>> {
        Box::pin(self.db.run(denied_certs_in))
    }

    fn apply_requests(&self) -> BoxFuture<'_, Result<usize, AuthorityError>> {
        Box::pin(async move {
            if !self.postgres {
                return Ok(0);
            }
            let pending = self.db.run(crate::requests::pending).await?;
            let n = pending.len();
            let applying = pending.into_iter().map(|id| {
                let who = std::sync::Arc::clone(&self.actor);
                self.db.run(move |c| apply_request(c, id, &who))
            });
            for applied in futures_util::future::join_all(applying).await {
                applied?;
            }
            Ok(n)
        })
    }

    fn status(
        &self,
        id: String,
        in_flight: HashSet<String>,
    ) -> BoxFuture<'_, Result<Vec<TargetDelivery>, AuthorityError>> {
        Box::pin(self.db.run(move |c| {
            let rows = c.query(
                "SELECT d.target, d.seq, d.error, t.acked_seq, t.attempts, t.last_error, t.last_attempt_ms
                 FROM delivery d JOIN targets t ON t.name = d.target
                 WHERE d.credential_id = $1 ORDER BY d.target",
                args![&id],
            )?;
            let mut out = Vec::new();
            for r in rows {
                let (target, seq, error, acked) =
                    (r.string(0)?, u64_of(r.i64(1)?), r.opt_string(2)?, u64_of(r.i64(3)?));
                let (attempts, last_error, last_ms) = (r.i64(4)?, r.opt_string(5)?, r.opt_i64(6)?);
                let last_attempt = last_ms.map(|ms| netproc_wire::from_unix_ms(u64_of(ms)));
                let attempts = u32::try_from(attempts).unwrap_or(u32::MAX);
                let state = if let Some(reason) = error {
                    DeliveryState::Error {
                        reason,
                        attempts: attempts.max(1),
                        last_attempt,
                    }
                } else if acked >= seq {
                    DeliveryState::Success
                } else if in_flight.contains(&target) {
                    DeliveryState::Sent
                } else if let Some(reason) = last_error.filter(|_| attempts > 0) {
                    DeliveryState::Error {
                        reason,
                        attempts,
                        last_attempt,
                    }
                } else {
                    DeliveryState::Pending
                };
                out.push(TargetDelivery { target, state });
            }
            if out.is_empty() && load_credential(c, &id)?.is_none() {
                return Err(AuthorityError::UnknownCredential(id.clone()));
            }
            Ok(out)
        }))
    }

    fn targets(&self) -> BoxFuture<'_, Result<Vec<TargetState>, AuthorityError>> {
        Box::pin(self.db.run(|c| {
            let rows = c.query(
                "SELECT name, acked_seq, next_seq, snapshot_needed, attempts, last_error,
                   (SELECT COUNT(*) FROM outbox o WHERE o.target = t.name AND o.seq > t.acked_seq)
                 FROM targets t ORDER BY name",
                &[],
            )?;
            rows.iter()
                .map(|r| {
                    Ok(TargetState {
                        name: r.string(0)?,
                        acked_seq: u64_of(r.i64(1)?),
                        last_seq: u64_of(r.i64(2)?.saturating_sub(1)),
                        snapshot_needed: r.bool(3)?,
                        attempts: u32::try_from(r.i64(4)?).unwrap_or(u32::MAX),
                        last_error: r.opt_string(5)?,
                        pending_events: u64_of(r.i64(6)?),
                    })
                })
                .collect()
        }))
    }

    fn credentials(&self) -> BoxFuture<'_, Result<Vec<CredentialInfo>, AuthorityError>> {
        Box::pin(self.db.run(|c| {
            let rows = c.query("SELECT id, credential FROM credentials ORDER BY id", &[])?;
            let mut out = Vec::new();
            for r in rows {
                let (id, bytes) = (r.string(0)?, r.bytes(1)?);
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
        }))
    }

    fn history(
        &self,
        id: Option<String>,
        limit: u32,
    ) -> BoxFuture<'_, Result<Vec<ChangeRecord>, AuthorityError>> {
        Box::pin(self.db.run(move |c| {
            let rows = c.query(
                "SELECT change_id, credential_id, action, changed_by, db_role, at_ms FROM changes
                 WHERE $1 = '' OR credential_id = $1 ORDER BY change_id DESC LIMIT $2",
                args![id.as_deref().unwrap_or(""), i64::from(limit)],
            )?;
            rows.iter()
                .map(|r| {
                    Ok(ChangeRecord {
                        change_id: u64_of(r.i64(0)?),
                        credential_id: r.string(1)?,
                        action: r.string(2)?,
                        changed_by: r.string(3)?,
                        db_role: r.opt_string(4)?,
                        at: netproc_wire::from_unix_ms(u64_of(r.i64(5)?)),
                    })
                })
                .collect()
        }))
    }

    fn due_targets(
        &self,
        names: Vec<String>,
        now_ms: u64,
    ) -> BoxFuture<'_, Result<Vec<String>, AuthorityError>> {
        Box::pin(self.db.run(move |c| {
            let rows = c.query(
                "SELECT name FROM targets t WHERE next_attempt_ms <= $1 AND (snapshot_needed != 0
                   OR EXISTS (SELECT 1 FROM outbox o WHERE o.target = t.name AND o.seq > t.acked_seq))",
                args![i64_of(now_ms)],
            )?;
            let due = rows
                .iter()
                .map(|r| r.string(0))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(due.into_iter().filter(|n| names.contains(n)).collect())
        }))
    }

    fn prepare(
        &self,
        target: String,
        part_bytes: usize,
    ) -> BoxFuture<'_, Result<Batch, AuthorityError>> {
        Box::pin(self.db.run(move |c| prepare(c, &target, part_bytes)))
    }

    fn complete(
        &self,
        target: String,
        config: AuthorityConfig,
        sent: Sent,
        reply: Result<DeliveryReply, String>,
    ) -> BoxFuture<'_, Result<Progress, AuthorityError>> {
        Box::pin(
            self.db
                .run(move |c| complete(c, &target, &config, &sent, reply.clone())),
        )
    }
}

/// Applies change request `request` if it is still pending, recording its
/// outcome in the same transaction; audited. `who` is this process.
fn apply_request(c: &mut dyn Sql, request: u64, who: &str) -> Result<(), AuthorityError> {
    use crate::requests::{Outcome, Refusal};
    let Some(r) = crate::requests::claim(c, request)? else {
        return Ok(());
    };
    let process = format!("{} (request {request}, applied by {who})", r.label);
    let by = By {
        process: &process,
        role: &r.requested_by,
    };
    // Its own savepoint: a refused request still gets its outcome written.
    c.exec("SAVEPOINT request", &[])?;
    let result = match &r.body {
        None => Err(AuthorityError::Invalid("unreadable request".into())),
        Some(body) => run_request(c, &r.action, &r.credential_id, body, by),
    };
    let outcome = match result {
        Ok(o) => {
            c.exec("RELEASE SAVEPOINT request", &[])?;
            o
        }
        Err(e) => {
            c.exec("ROLLBACK TO SAVEPOINT request", &[])?;
            Outcome::Refused(Refusal::from(&e))
        }
    };
    tracing::info!(
        target: netproc_server::AUDIT_TARGET,
        event = "change_request",
        request,
        action = %r.action,
        credential = %r.credential_id,
        requested_by = %r.requested_by,
        label = %r.label,
        outcome = ?outcome,
        "applying a change request"
    );
    crate::requests::record(c, request, &outcome)
}

fn run_request(
    c: &mut dyn Sql,
    action: &str,
    id: &str,
    body: &crate::requests::Body,
    by: By<'_>,
) -> Result<crate::requests::Outcome, AuthorityError> {
    use crate::requests::Outcome;
    match action {
        "ensure" => {
            let spec = body.spec(id)?;
            let k = &spec.key;
            if k.label.is_some() || k.max_sessions.is_some() || k.single_active_session.is_some() {
                return Err(AuthorityError::Invalid(
                    "label and session policy are not propagated".into(),
                ));
            }
            if spec.ed25519_public_key.is_none() && body.secret_sha256.is_none() {
                return Err(AuthorityError::Invalid(
                    "a new API key needs its secret's hash".into(),
                ));
            }
            let targets: BTreeSet<String> = body.targets.iter().cloned().collect();
            let ensured = ensure_in(c, &spec, &targets, by, body.secret_sha256)?;
            Ok(Outcome::Ensured {
                created: ensured.created,
                changed: ensured.changed,
            })
        }
        "rotate" => {
            let hash = body.secret_sha256.ok_or_else(|| {
                AuthorityError::Invalid("a rotation needs the new secret's hash".into())
            })?;
            rotate_in(c, id, body.overlap_ms.map(Duration::from_millis), hash, by)?;
            Ok(Outcome::Done)
        }
        "revoke" => {
            revoke_in(c, id, by)?;
            Ok(Outcome::Done)
        }
        "deny-cert" | "allow-cert" => {
            let cert = body
                .cert
                .as_ref()
                .ok_or_else(|| AuthorityError::Invalid("no certificate named".into()))?;
            match (action, body.not_after_ms) {
                ("deny-cert", Some(until)) => deny_cert_in(c, cert, until, by)?,
                ("deny-cert", None) => {
                    return Err(AuthorityError::Invalid("a denial needs its expiry".into()));
                }
                _ => allow_cert_in(c, cert, by)?,
            }
            Ok(Outcome::Done)
        }
        other => Err(AuthorityError::Invalid(format!("unknown action {other:?}"))),
    }
}

/// Denies `cert` on every target until `not_after_ms` (its notAfter).
pub(crate) fn deny_cert_in(
    c: &mut dyn Sql,
    cert: &CertRef,
    not_after_ms: u64,
    by: By<'_>,
) -> Result<(), AuthorityError> {
    let now = now_ms();
    if not_after_ms <= now {
        return Err(AuthorityError::Invalid(
            "the certificate has expired already: it is refused anyway".into(),
        ));
    }
    let (label, bytes) = (cert.label(), encode(cert)?);
    let kind = encode(&EventKind::DenyCert {
        cert: cert.clone(),
        not_after: not_after_ms,
    })?;
    let targets = all_targets(c)?;
    c.exec(
        "DELETE FROM denied_certs WHERE not_after_ms <= $1",
        args![i64_of(now)],
    )?;
    let now = i64_of(now);
    let mut w = Writes::new(c);
    w.push(stmt!(
        "INSERT INTO denied_certs (label, cert, not_after_ms, denied_at_ms, denied_by) VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (label) DO UPDATE SET not_after_ms = excluded.not_after_ms,
           denied_at_ms = excluded.denied_at_ms, denied_by = excluded.denied_by",
        &label,
        &bytes,
        i64_of(not_after_ms),
        now,
        by.process
    ));
    w.change(&label, "deny-cert", by, now);
    for t in &targets {
        w.enqueue(t, &label, &kind);
    }
    w.run(c)
}

/// Stops denying `cert` everywhere.
pub(crate) fn allow_cert_in(
    c: &mut dyn Sql,
    cert: &CertRef,
    by: By<'_>,
) -> Result<(), AuthorityError> {
    let label = cert.label();
    if c.first(
        "DELETE FROM denied_certs WHERE label = $1 RETURNING label",
        args![&label],
    )?
    .is_none()
    {
        return Err(AuthorityError::UnknownCredential(label));
    }
    let kind = encode(&EventKind::AllowCert { cert: cert.clone() })?;
    let targets = all_targets(c)?;
    let now = i64_of(now_ms());
    let mut w = Writes::new(c);
    w.change(&label, "allow-cert", by, now);
    for t in &targets {
        w.enqueue(t, &label, &kind);
    }
    w.run(c)
}

fn all_targets(c: &mut dyn Sql) -> Result<Vec<String>, AuthorityError> {
    c.query("SELECT name FROM targets ORDER BY name", &[])?
        .iter()
        .map(|r| r.string(0))
        .collect()
}

/// The certificates denied now, with their expiry (unix ms).
pub(crate) fn denied_certs_in(c: &mut dyn Sql) -> Result<Vec<(CertRef, u64)>, AuthorityError> {
    c.query(
        "SELECT cert, not_after_ms FROM denied_certs WHERE not_after_ms > $1 ORDER BY label",
        args![i64_of(now_ms())],
    )?
    .iter()
    .map(|r| {
        let cert: CertRef = postcard::from_bytes(&r.bytes(0)?).map_err(|e| {
            AuthorityError::Database(DatabaseError::new("unreadable denied certificate", e))
        })?;
        Ok((cert, u64_of(r.i64(1)?)))
    })
    .collect()
}
