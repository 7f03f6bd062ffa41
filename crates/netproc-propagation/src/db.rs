//! The authority's database thread, for any backend: one connection owned
//! by one thread.
//!
//! Jobs queue up while a transaction commits; the next transaction runs all
//! of them (each in its own savepoint, so one failing job does not undo the
//! others) and answers each only after the commit — changes that arrive
//! together share one commit. A transaction the backend says to retry (a
//! PostgreSQL deadlock or serialization failure against another authority
//! process) is rolled back and run again, every job in it.

use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};

use crate::query::Sql;
use crate::types::{AuthorityError, DatabaseError};

/// Jobs in one transaction, at most.
const MAX_JOBS_PER_COMMIT: usize = 512;
/// Times a transaction is run again when the backend says to retry.
const MAX_RETRIES: usize = 8;

/// A backend's connection, as the database thread drives it.
pub(crate) trait Conn: Sql + Send + 'static {
    /// Runs statements without results (`BEGIN`, `SAVEPOINT job`, …).
    fn batch(&mut self, sql: &str) -> Result<(), DatabaseError>;
    /// How a write transaction starts.
    fn begin(&self) -> &'static str;
    /// Whether a statement failed since the last call in a way that asks
    /// for the whole transaction to be run again; clears the flag.
    fn take_retry(&mut self) -> bool {
        false
    }
}

/// A job's work: runs inside the shared transaction (again, if it is
/// retried); `false` rolls its savepoint back.
type Work = Box<dyn FnMut(&mut dyn Sql) -> bool + Send>;

struct Job {
    work: Work,
    /// Answers the caller once the commit's outcome is known.
    finish: Box<dyn FnOnce(Option<DatabaseError>) + Send>,
}

pub(crate) struct Db {
    jobs: Mutex<mpsc::Sender<Job>>,
}

impl Db {
    /// Starts the database thread over `conn`.
    pub(crate) fn spawn(conn: impl Conn, name: &str) -> Result<Db, AuthorityError> {
        Db::spawn_with(name, move || Ok(conn))
    }

    /// Starts the database thread, which first makes its connection with
    /// `make` (a client that must not run inside the caller's async
    /// runtime connects there). Blocks until `make` has answered.
    pub(crate) fn spawn_with<C: Conn>(
        name: &str,
        make: impl FnOnce() -> Result<C, AuthorityError> + Send + 'static,
    ) -> Result<Db, AuthorityError> {
        let (tx, rx) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || match make() {
                Ok(conn) => {
                    let _ = ready_tx.send(Ok(()));
                    actor(conn, &rx);
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            })
            .map_err(|e| {
                AuthorityError::Database(DatabaseError::new("cannot start the database thread", e))
            })?;
        ready_rx.recv().map_err(|_| AuthorityError::Closed)??;
        Ok(Db {
            jobs: Mutex::new(tx),
        })
    }

    /// Runs `f` in the next transaction; answers after it commits.
    pub(crate) async fn run<T: Send + 'static>(
        &self,
        mut f: impl FnMut(&mut dyn Sql) -> Result<T, AuthorityError> + Send + 'static,
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

fn actor(mut conn: impl Conn, rx: &mpsc::Receiver<Job>) {
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        while jobs.len() < MAX_JOBS_PER_COMMIT {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        let mut outcome = Ok(());
        for attempt in 0..=MAX_RETRIES {
            outcome = transaction(&mut conn, &mut jobs);
            let retry = conn.take_retry();
            if outcome.is_ok() && !retry {
                break;
            }
            let _ = conn.batch("ROLLBACK");
            if !retry || attempt == MAX_RETRIES {
                if outcome.is_ok() {
                    outcome = Err(DatabaseError::new("", "the transaction kept conflicting"));
                }
                break;
            }
            outcome = Ok(());
        }
        for j in jobs {
            (j.finish)(outcome.as_ref().err().cloned());
        }
    }
}

/// One transaction over every job, each in its savepoint; committed. The
/// statements between two jobs go as one batch (one round trip).
fn transaction(conn: &mut impl Conn, jobs: &mut [Job]) -> Result<(), DatabaseError> {
    let begin = conn.begin();
    conn.batch(&format!("{begin}; SAVEPOINT job"))?;
    let n = jobs.len();
    for (i, j) in jobs.iter_mut().enumerate() {
        let ok = (j.work)(&mut *conn);
        conn.batch(match (ok, i + 1 == n) {
            (true, false) => "RELEASE job; SAVEPOINT job",
            (false, false) => "ROLLBACK TO job; RELEASE job; SAVEPOINT job",
            (true, true) => "RELEASE job; COMMIT",
            (false, true) => "ROLLBACK TO job; RELEASE job; COMMIT",
        })?;
    }
    if n == 0 {
        conn.batch("RELEASE job; COMMIT")?;
    }
    Ok(())
}
