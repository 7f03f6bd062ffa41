//! The server's state database: one SQLite file in the state directory.
//!
//! WAL mode with `synchronous=NORMAL`: a committed change survives a killed
//! process (not a power loss; use `FULL` for that, at a large cost in
//! commits per second). A change is acknowledged to the client only after
//! its transaction commits. All access goes through `spawn_blocking`, never
//! a runtime thread.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use netproc_wire::{Value, ValueLimits};
use rusqlite::{Connection, OptionalExtension, params};

/// The schema, by version. Each step runs once, in a transaction.
const MIGRATIONS: &[&str] = &[
    // 1: run-time definitions (owned by the script registry) and constants.
    "CREATE TABLE script_functions (
        name TEXT PRIMARY KEY,
        source TEXT NOT NULL,
        source_sha256 BLOB NOT NULL,
        description TEXT,
        defined_by TEXT NOT NULL,
        defined_at_ms INTEGER NOT NULL
    );
    CREATE TABLE script_dependencies (
        alias TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        source TEXT NOT NULL,
        defined_by TEXT NOT NULL,
        defined_at_ms INTEGER NOT NULL
    );
    CREATE TABLE constants (
        name TEXT PRIMARY KEY,
        value BLOB NOT NULL
    );",
];

/// A stored function definition.
pub(crate) struct StoredFunction {
    pub(crate) name: String,
    pub(crate) source: String,
    pub(crate) description: Option<String>,
    pub(crate) defined_by: String,
    pub(crate) defined_at_ms: u64,
}

/// A stored dependency.
pub(crate) struct StoredDependency {
    pub(crate) alias: String,
    pub(crate) kind: String,
    pub(crate) source: String,
    pub(crate) defined_by: String,
    pub(crate) defined_at_ms: u64,
}

pub(crate) struct StateDb {
    conn: Mutex<Connection>,
    path: PathBuf,
}

/// Why the state database could not be used.
pub(crate) type DbResult<T> = Result<T, rusqlite::Error>;

impl StateDb {
    /// Opens (or creates) `<dir>/netproc.db` and brings its schema up to date.
    pub(crate) fn open(dir: &Path) -> DbResult<StateDb> {
        let path = dir.join("netproc.db");
        let mut conn = Connection::open(&path)?;
        // Other owners' work (a delivery's transaction) can hold the write
        // lock briefly: wait for it rather than fail.
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)",
            [],
        )?;
        let current: i64 = conn
            .query_row("SELECT version FROM schema_version", [], |r| r.get(0))
            .optional()?
            .unwrap_or(0);
        for (i, sql) in MIGRATIONS
            .iter()
            .enumerate()
            .skip(usize::try_from(current).unwrap_or(0))
        {
            let tx = conn.transaction()?;
            tx.execute_batch(sql)?;
            tx.execute("DELETE FROM schema_version", [])?;
            tx.execute(
                "INSERT INTO schema_version (version) VALUES (?1)",
                params![i as i64 + 1],
            )?;
            tx.commit()?;
        }
        Ok(StateDb {
            conn: Mutex::new(conn),
            path,
        })
    }

    fn with<T>(&self, f: impl FnOnce(&mut Connection) -> DbResult<T>) -> DbResult<T> {
        let mut conn = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        f(&mut conn)
    }

    pub(crate) fn put_function(&self, f: &StoredFunction, sha256: &[u8; 32]) -> DbResult<()> {
        self.with(|c| {
            c.execute(
                "INSERT INTO script_functions (name, source, source_sha256, description, defined_by, defined_at_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT(name) DO UPDATE SET source = excluded.source, source_sha256 = excluded.source_sha256,
                   description = excluded.description, defined_by = excluded.defined_by, defined_at_ms = excluded.defined_at_ms",
                params![f.name, f.source, &sha256[..], f.description, f.defined_by, f.defined_at_ms as i64],
            )
            .map(drop)
        })
    }

    pub(crate) fn delete_function(&self, name: &str) -> DbResult<()> {
        self.with(|c| {
            c.execute(
                "DELETE FROM script_functions WHERE name = ?1",
                params![name],
            )
            .map(drop)
        })
    }

    pub(crate) fn put_dependency(&self, d: &StoredDependency) -> DbResult<()> {
        self.with(|c| {
            c.execute(
                "INSERT INTO script_dependencies (alias, kind, source, defined_by, defined_at_ms) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT(alias) DO UPDATE SET kind = excluded.kind, source = excluded.source,
                   defined_by = excluded.defined_by, defined_at_ms = excluded.defined_at_ms",
                params![d.alias, d.kind, d.source, d.defined_by, d.defined_at_ms as i64],
            )
            .map(drop)
        })
    }

    pub(crate) fn delete_dependency(&self, alias: &str) -> DbResult<()> {
        self.with(|c| {
            c.execute(
                "DELETE FROM script_dependencies WHERE alias = ?1",
                params![alias],
            )
            .map(drop)
        })
    }

    pub(crate) fn put_constant(&self, name: &str, value: &Value) -> DbResult<()> {
        self.with(|c| {
            c.execute(
                "INSERT INTO constants (name, value) VALUES (?1, ?2) ON CONFLICT(name) DO UPDATE SET value = excluded.value",
                params![name, value.encode()],
            )
            .map(drop)
        })
    }

    pub(crate) fn delete_constant(&self, name: &str) -> DbResult<()> {
        self.with(|c| {
            c.execute("DELETE FROM constants WHERE name = ?1", params![name])
                .map(drop)
        })
    }

    pub(crate) fn load_functions(&self) -> DbResult<Vec<StoredFunction>> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT name, source, description, defined_by, defined_at_ms FROM script_functions ORDER BY name",
            )?;
            let rows = st.query_map([], |r| {
                Ok(StoredFunction {
                    name: r.get(0)?,
                    source: r.get(1)?,
                    description: r.get(2)?,
                    defined_by: r.get(3)?,
                    defined_at_ms: r.get::<_, i64>(4)?.max(0) as u64,
                })
            })?;
            rows.collect()
        })
    }

    pub(crate) fn load_dependencies(&self) -> DbResult<Vec<StoredDependency>> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT alias, kind, source, defined_by, defined_at_ms FROM script_dependencies ORDER BY alias",
            )?;
            let rows = st.query_map([], |r| {
                Ok(StoredDependency {
                    alias: r.get(0)?,
                    kind: r.get(1)?,
                    source: r.get(2)?,
                    defined_by: r.get(3)?,
                    defined_at_ms: r.get::<_, i64>(4)?.max(0) as u64,
                })
            })?;
            rows.collect()
        })
    }

    /// Stored constants; an undecodable one is reported and skipped.
    pub(crate) fn load_constants(&self) -> DbResult<Vec<(String, Value)>> {
        self.with(|c| {
            let mut st = c.prepare("SELECT name, value FROM constants ORDER BY name")?;
            let rows = st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?)))?;
            let mut out = Vec::new();
            for row in rows {
                let (name, bytes) = row?;
                match Value::decode(&bytes, ValueLimits::default()) {
                    Ok(v) => out.push((name, v)),
                    Err(e) => tracing::warn!(constant = %name, error = %e, "skipping an unreadable stored constant"),
                }
            }
            Ok(out)
        })
    }
}

/// The server's state database: one SQLite file, `<state dir>/netproc.db`,
/// in WAL mode with `synchronous=NORMAL`, opened once and shared by the
/// server and the crates built on it. Each owner keeps its own tables and
/// brings them up to date with [`migrate`](Self::migrate); all access goes
/// through one connection ([`with_connection`](Self::with_connection)).
///
/// Every method blocks on SQLite: call them before the server starts or
/// from `tokio::task::spawn_blocking`, never on a runtime thread.
///
/// ```
/// use netproc_server::StateDatabase;
///
/// let dir = tempfile::tempdir().unwrap();
/// let db = StateDatabase::open(dir.path()).unwrap();
/// db.migrate("example", &["CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT)"])
///     .unwrap();
/// db.with_connection(|c| c.execute("INSERT INTO notes (text) VALUES ('hi')", []))
///     .unwrap();
/// // Steps that already ran are not run again.
/// db.migrate("example", &["CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT)"])
///     .unwrap();
/// ```
#[derive(Clone)]
pub struct StateDatabase {
    pub(crate) db: Arc<StateDb>,
}

impl fmt::Debug for StateDatabase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StateDatabase")
            .field("path", &self.db.path)
            .finish()
    }
}

/// The owner name of the server's own tables (kept in the original
/// `schema_version` table).
const SERVER_OWNER: &str = "netproc-server";

impl StateDatabase {
    /// Opens (or creates) `<dir>/netproc.db` — creating `dir` if needed —
    /// and brings the server's own tables up to date.
    pub fn open(dir: &Path) -> Result<StateDatabase, crate::ServerError> {
        let state = |source: Box<dyn std::error::Error + Send + Sync>| crate::ServerError::State {
            path: dir.to_owned(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(|e| state(Box::new(e)))?;
        let db = StateDb::open(dir).map_err(|e| state(Box::new(e)))?;
        Ok(StateDatabase { db: Arc::new(db) })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.db.path
    }

    /// Brings `owner`'s tables up to date: `steps[i]` is schema version
    /// `i + 1`; each step that has not run yet runs once, in a transaction
    /// with the new version. Steps are only ever appended. `owner` names a
    /// crate or component (`netproc-server` is the server's own).
    pub fn migrate(&self, owner: &str, steps: &[&str]) -> rusqlite::Result<()> {
        if owner == SERVER_OWNER {
            return Err(rusqlite::Error::InvalidParameterName(format!(
                "{owner} is the server's own schema"
            )));
        }
        self.with_connection(|conn| {
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_versions (
                    owner TEXT PRIMARY KEY,
                    version INTEGER NOT NULL
                )",
                [],
            )?;
            let current: i64 = conn
                .query_row(
                    "SELECT version FROM schema_versions WHERE owner = ?1",
                    params![owner],
                    |r| r.get(0),
                )
                .optional()?
                .unwrap_or(0);
            for (i, sql) in steps
                .iter()
                .enumerate()
                .skip(usize::try_from(current).unwrap_or(0))
            {
                let tx = conn.transaction()?;
                tx.execute_batch(sql)?;
                tx.execute(
                    "INSERT INTO schema_versions (owner, version) VALUES (?1, ?2)
                     ON CONFLICT(owner) DO UPDATE SET version = excluded.version",
                    params![owner, i as i64 + 1],
                )?;
                tx.commit()?;
            }
            Ok(())
        })
    }

    /// Runs `f` with the database's connection (held exclusively for the
    /// call). A change is durable once `f`'s transaction commits.
    pub fn with_connection<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>,
    ) -> rusqlite::Result<T> {
        self.db.with(f)
    }
}
