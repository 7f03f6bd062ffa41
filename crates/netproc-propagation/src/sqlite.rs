//! The embedded backend: one SQLite file (WAL, `synchronous=NORMAL`),
//! driven by the database thread ([`crate::db`]).

use std::path::Path;
use std::time::Duration;

use rusqlite::Connection;
use rusqlite::types::{ToSqlOutput, Value as SqliteValue, ValueRef};

use crate::db::{Conn, Db};
use crate::query::{Arg, Cell, Row, Sql};
use crate::types::{AuthorityError, DatabaseError};

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
    );
    CREATE TABLE IF NOT EXISTS changes (
        change_id INTEGER PRIMARY KEY,
        credential_id TEXT NOT NULL,
        action TEXT NOT NULL,
        changed_by TEXT NOT NULL,
        db_role TEXT,
        at_ms INTEGER NOT NULL
    );
    CREATE INDEX IF NOT EXISTS changes_by_credential ON changes (credential_id);
    CREATE TABLE IF NOT EXISTS tombstones (
        id TEXT PRIMARY KEY,
        revoked_at_ms INTEGER NOT NULL,
        revoked_by TEXT NOT NULL
    );
    CREATE TABLE IF NOT EXISTS denied_certs (
        label TEXT PRIMARY KEY,
        cert BLOB NOT NULL,
        not_after_ms INTEGER NOT NULL,
        denied_at_ms INTEGER NOT NULL,
        denied_by TEXT NOT NULL
    );";

/// `$1`-style placeholders as SQLite's `?1`.
fn sqlite_placeholders(sql: &str) -> String {
    sql.replace('$', "?")
}

impl rusqlite::ToSql for Arg<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(match self {
            Arg::I(v) => ToSqlOutput::Owned(SqliteValue::Integer(*v)),
            Arg::S(v) => ToSqlOutput::Borrowed(ValueRef::Text(v.as_bytes())),
            Arg::B(v) => ToSqlOutput::Borrowed(ValueRef::Blob(v)),
        })
    }
}

struct SqliteConn(Connection);

fn cell(v: ValueRef<'_>) -> Cell {
    match v {
        ValueRef::Null => Cell::Null,
        ValueRef::Integer(i) => Cell::I(i),
        ValueRef::Real(f) => Cell::I(f as i64),
        ValueRef::Text(t) => Cell::S(String::from_utf8_lossy(t).into_owned()),
        ValueRef::Blob(b) => Cell::B(b.to_vec()),
    }
}

impl Sql for SqliteConn {
    fn exec(&mut self, sql: &str, args: &[Arg<'_>]) -> Result<u64, AuthorityError> {
        let mut st = self.0.prepare_cached(&sqlite_placeholders(sql))?;
        Ok(st.execute(rusqlite::params_from_iter(args.iter()))? as u64)
    }

    fn query(&mut self, sql: &str, args: &[Arg<'_>]) -> Result<Vec<Row>, AuthorityError> {
        let mut st = self.0.prepare_cached(&sqlite_placeholders(sql))?;
        let n = st.column_count();
        let mut rows = st.query(rusqlite::params_from_iter(args.iter()))?;
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            let mut row = Vec::with_capacity(n);
            for i in 0..n {
                row.push(cell(r.get_ref(i)?));
            }
            out.push(Row(row));
        }
        Ok(out)
    }
}

impl Conn for SqliteConn {
    fn batch(&mut self, sql: &str) -> Result<(), DatabaseError> {
        self.0
            .execute_batch(sql)
            .map_err(|e| DatabaseError::new(sql.split(' ').next().unwrap_or(""), e))
    }

    fn begin(&self) -> &'static str {
        "BEGIN IMMEDIATE"
    }
}

/// Opens (or creates) the database at `path` and starts its thread.
/// Registers `targets` the database does not know yet (each gets a
/// snapshot first).
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
    Db::spawn(SqliteConn(conn), "netproc-authority-db")
}
