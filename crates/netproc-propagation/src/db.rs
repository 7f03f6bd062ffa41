//! The authority's database: one SQLite connection owned by one thread.
//!
//! Jobs queue up while a transaction commits; the next transaction runs all
//! of them (each in its own savepoint, so one failing job does not undo the
//! others) and answers each only after the commit — changes that arrive
//! together share one commit.

use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rusqlite::Connection;

use crate::types::{AuthorityError, DatabaseError};

/// Jobs in one transaction, at most.
const MAX_JOBS_PER_COMMIT: usize = 512;

const SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS meta (
        key TEXT PRIMARY KEY,
        value INTEGER NOT NULL
    );
    INSERT OR IGNORE INTO meta (key, value) VALUES ('change_id', 0);
    CREATE TABLE IF NOT EXISTS credentials (
        id TEXT PRIMARY KEY,
        credential BLOB NOT NULL,
        updated_at_ms INTEGER NOT NULL
    );
    CREATE TABLE IF NOT EXISTS targets (
        name TEXT PRIMARY KEY,
        next_seq INTEGER NOT NULL DEFAULT 1,
        acked_seq INTEGER NOT NULL DEFAULT 0,
        snapshot_needed INTEGER NOT NULL DEFAULT 1,
        attempts INTEGER NOT NULL DEFAULT 0,
        last_error TEXT,
        last_attempt_ms INTEGER,
        next_attempt_ms INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE IF NOT EXISTS credential_targets (
        credential_id TEXT NOT NULL,
        target TEXT NOT NULL,
        PRIMARY KEY (credential_id, target)
    );
    CREATE INDEX IF NOT EXISTS credential_targets_by_target ON credential_targets (target);
    CREATE TABLE IF NOT EXISTS outbox (
        target TEXT NOT NULL,
        seq INTEGER NOT NULL,
        change_id INTEGER NOT NULL,
        credential_id TEXT NOT NULL,
        kind BLOB NOT NULL,
        PRIMARY KEY (target, seq)
    );
    CREATE TABLE IF NOT EXISTS delivery (
        target TEXT NOT NULL,
        credential_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        error TEXT,
        PRIMARY KEY (target, credential_id)
    );";

struct Job {
    /// Runs inside the shared transaction; `false` rolls its savepoint back.
    work: Box<dyn FnOnce(&Connection) -> bool + Send>,
    /// Answers the caller once the commit's outcome is known.
    finish: Box<dyn FnOnce(Option<DatabaseError>) + Send>,
}

pub(crate) struct Db {
    jobs: Mutex<mpsc::Sender<Job>>,
}

impl Db {
    /// Opens (or creates) the database and starts its thread.
    /// Registers `targets` that the database does not know yet (each gets
    /// a snapshot first).
    pub(crate) fn open(path: &Path, targets: &[String]) -> Result<Db, AuthorityError> {
        let db_err = |e: rusqlite::Error| {
            AuthorityError::Database(DatabaseError::new(path.display().to_string(), e))
        };
        let conn = Connection::open(path).map_err(db_err)?;
        conn.busy_timeout(Duration::from_secs(10)).map_err(db_err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(db_err)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(db_err)?;
        conn.execute_batch(SCHEMA).map_err(db_err)?;
        {
            let mut st = conn
                .prepare("INSERT OR IGNORE INTO targets (name) VALUES (?1)")
                .map_err(db_err)?;
            for t in targets {
                st.execute([t]).map_err(db_err)?;
            }
        }
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("netproc-authority-db".into())
            .spawn(move || actor(&conn, &rx))
            .map_err(|e| {
                AuthorityError::Database(DatabaseError::new("cannot start the database thread", e))
            })?;
        Ok(Db {
            jobs: Mutex::new(tx),
        })
    }

    /// Runs `f` in the next transaction; answers after it commits.
    pub(crate) async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, AuthorityError> + Send + 'static,
    ) -> Result<T, AuthorityError> {
        let slot: Arc<Mutex<Option<Result<T, AuthorityError>>>> = Arc::new(Mutex::new(None));
        let (tx, rx) = tokio::sync::oneshot::channel();
        let work_slot = Arc::clone(&slot);
        let job = Job {
            work: Box::new(move |conn| {
                let r = f(conn);
                let ok = r.is_ok();
                *work_slot.lock().unwrap_or_else(PoisonError::into_inner) = Some(r);
                ok
            }),
            finish: Box::new(move |commit_error| {
                let r = slot.lock().unwrap_or_else(PoisonError::into_inner).take();
                let out = match (commit_error, r) {
                    (Some(e), _) => Err(AuthorityError::Database(e)),
                    (None, Some(r)) => r,
                    (None, None) => Err(AuthorityError::Database(DatabaseError::new(
                        "",
                        "the change did not run",
                    ))),
                };
                let _ = tx.send(out);
            }),
        };
        self.jobs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .send(job)
            .map_err(|_| AuthorityError::Closed)?;
        rx.await.map_err(|_| AuthorityError::Closed)?
    }
}

fn actor(conn: &Connection, rx: &mpsc::Receiver<Job>) {
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        while jobs.len() < MAX_JOBS_PER_COMMIT {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE") {
            let e = DatabaseError::new("begin", e);
            for j in jobs {
                (j.finish)(Some(e.clone()));
            }
            continue;
        }
        let mut finishers = Vec::with_capacity(jobs.len());
        let mut failed: Option<DatabaseError> = None;
        for j in jobs {
            if failed.is_none() {
                if let Err(e) = conn.execute_batch("SAVEPOINT job") {
                    failed = Some(DatabaseError::new("", e));
                } else {
                    let ok = (j.work)(conn);
                    let end = if ok {
                        "RELEASE job"
                    } else {
                        "ROLLBACK TO job; RELEASE job"
                    };
                    if let Err(e) = conn.execute_batch(end) {
                        failed = Some(DatabaseError::new("", e));
                    }
                }
            }
            finishers.push(j.finish);
        }
        let outcome = match failed {
            Some(e) => Err(e),
            None => conn
                .execute_batch("COMMIT")
                .map_err(|e| DatabaseError::new("commit", e)),
        };
        if let Err(e) = outcome {
            let _ = conn.execute_batch("ROLLBACK");
            for f in finishers {
                f(Some(e.clone()));
            }
        } else {
            for f in finishers {
                f(None);
            }
        }
    }
}
