//! The PostgreSQL backend (feature `postgres`): the same SQL as SQLite
//! ([`crate::sql`]) over `tokio-postgres` on the database thread,
//! versioned migrations, transactions rerun on deadlock or serialization
//! failure, reconnection, TLS through the workspace's rustls.
//!
//! Why one thread with its own current-thread runtime (not a pool on the
//! application's runtime): the authority's store is one writer with group
//! commit — jobs queue, one transaction runs them all, each in a savepoint
//! — and that thread drives SQLite the same way, so the whole store is one
//! body of SQL over one seam; the thread's runtime never touches the
//! application's. Statements that do not depend on each other's results
//! are pipelined ([`Sql::pipeline`]): sent together, one round trip.
//! Connection poolers in transaction mode are not supported (the thread
//! holds one session).

use std::time::Duration;

use tokio::runtime::Runtime;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, Config, NoTls, Statement};

use crate::db::{Conn, Db};
use crate::query::{Arg, Cell, Dialect, Row, Sql, Stmt};
use crate::types::{AuthorityError, DatabaseError, PostgresOptions};

/// Versioned migrations: each runs once, in order, under an advisory lock
/// (several authority processes may start together).
const MIGRATIONS: &[&str] = &[
    // 1: the store's tables (as SQLite's, in PostgreSQL's types).
    "CREATE TABLE meta (
        key TEXT PRIMARY KEY,
        value BIGINT NOT NULL
    );
    INSERT INTO meta (key, value) VALUES ('change_id', 0);
    CREATE TABLE credentials (
        id TEXT PRIMARY KEY,
        credential BYTEA NOT NULL,
        updated_at_ms BIGINT NOT NULL
    );
    CREATE TABLE targets (
        name TEXT PRIMARY KEY,
        next_seq BIGINT NOT NULL DEFAULT 1,
        acked_seq BIGINT NOT NULL DEFAULT 0,
        snapshot_needed BIGINT NOT NULL DEFAULT 1,
        attempts BIGINT NOT NULL DEFAULT 0,
        last_error TEXT,
        last_attempt_ms BIGINT,
        next_attempt_ms BIGINT NOT NULL DEFAULT 0
    );
    CREATE TABLE credential_targets (
        credential_id TEXT NOT NULL,
        target TEXT NOT NULL,
        PRIMARY KEY (credential_id, target)
    );
    CREATE INDEX credential_targets_by_target ON credential_targets (target);
    CREATE TABLE outbox (
        target TEXT NOT NULL,
        seq BIGINT NOT NULL,
        change_id BIGINT NOT NULL,
        credential_id TEXT NOT NULL,
        kind BYTEA NOT NULL,
        PRIMARY KEY (target, seq)
    );
    CREATE TABLE delivery (
        target TEXT NOT NULL,
        credential_id TEXT NOT NULL,
        seq BIGINT NOT NULL,
        error TEXT,
        PRIMARY KEY (target, credential_id)
    );",
    // 2: the delivery lease (one row): who delivers, in which epoch, until
    // when — in PostgreSQL's clock, never the processes'.
    "CREATE TABLE leader (
        id BIGINT PRIMARY KEY CHECK (id = 1),
        holder TEXT NOT NULL,
        epoch BIGINT NOT NULL,
        since TIMESTAMPTZ NOT NULL,
        expires_at TIMESTAMPTZ NOT NULL
    );
    INSERT INTO leader (id, holder, epoch, since, expires_at) VALUES (1, '', 0, now(), now());",
    // 3: who made each change (the process's name, and the database role
    // PostgreSQL authenticated), and revoked ids kept as tombstones.
    "CREATE TABLE changes (
        change_id BIGINT PRIMARY KEY,
        credential_id TEXT NOT NULL,
        action TEXT NOT NULL,
        changed_by TEXT NOT NULL,
        db_role TEXT DEFAULT current_user,
        at_ms BIGINT NOT NULL
    );
    CREATE INDEX changes_by_credential ON changes (credential_id);
    CREATE TABLE tombstones (
        id TEXT PRIMARY KEY,
        revoked_at_ms BIGINT NOT NULL,
        revoked_by TEXT NOT NULL
    );",
    // 4: least privilege. A role that may not write the tables records
    // change requests through `netproc_request` (SECURITY DEFINER, its
    // search_path pinned to this schema; the requester's login role is
    // recorded by the database, never taken from the caller) and reads
    // their outcome through `netproc_request_outcome` (its own requests
    // only). The leader applies them. Neither function is PUBLIC's.
    "CREATE TABLE change_requests (
        id BIGSERIAL PRIMARY KEY,
        action TEXT NOT NULL,
        credential_id TEXT NOT NULL,
        body BYTEA NOT NULL,
        requested_by TEXT NOT NULL,
        label TEXT NOT NULL,
        requested_at TIMESTAMPTZ NOT NULL DEFAULT now(),
        state TEXT NOT NULL DEFAULT 'pending',
        result BYTEA,
        done_at TIMESTAMPTZ
    );
    CREATE INDEX change_requests_pending ON change_requests (id) WHERE state = 'pending';
    GRANT SELECT ON netproc_schema TO PUBLIC;
    DO $do$
    BEGIN
      EXECUTE format($f$
        CREATE FUNCTION netproc_request(p_action text, p_credential_id text, p_body bytea, p_label text)
        RETURNS bigint LANGUAGE plpgsql SECURITY DEFINER SET search_path = %I, pg_temp AS $b$
        DECLARE
          rid bigint;
        BEGIN
          IF p_action NOT IN ('ensure', 'rotate', 'revoke') THEN
            RAISE EXCEPTION 'unknown change request action';
          END IF;
          IF length(p_credential_id) > 64 OR length(p_label) > 256 OR length(p_body) > 65536 THEN
            RAISE EXCEPTION 'change request too large';
          END IF;
          IF (SELECT count(*) FROM change_requests WHERE state = 'pending') >= 10000 THEN
            RAISE EXCEPTION 'too many pending change requests';
          END IF;
          INSERT INTO change_requests (action, credential_id, body, requested_by, label)
            VALUES (p_action, p_credential_id, p_body, session_user, p_label)
            RETURNING id INTO rid;
          RETURN rid;
        END $b$$f$, current_schema());
      EXECUTE format($f$
        CREATE FUNCTION netproc_request_outcome(p_id bigint)
        RETURNS TABLE (state text, result bytea) LANGUAGE sql STABLE SECURITY DEFINER
        SET search_path = %I, pg_temp AS $b$
          SELECT r.state, r.result FROM change_requests r
          WHERE r.id = p_id AND r.requested_by = session_user
        $b$$f$, current_schema());
    END $do$;
    REVOKE ALL ON FUNCTION netproc_request(text, text, bytea, text) FROM PUBLIC;
    REVOKE ALL ON FUNCTION netproc_request_outcome(bigint) FROM PUBLIC;",
    // 5: client certificates denied fleet-wide, until their notAfter.
    "CREATE TABLE denied_certs (
        label TEXT PRIMARY KEY,
        cert BYTEA NOT NULL,
        not_after_ms BIGINT NOT NULL,
        denied_at_ms BIGINT NOT NULL,
        denied_by TEXT NOT NULL
    );",
    // 6: certificate denials by request too (the function replaced in
    // place: its owner, grants and pinned search_path stay).
    "DO $do$
    BEGIN
      EXECUTE format($f$
        CREATE OR REPLACE FUNCTION netproc_request(p_action text, p_credential_id text, p_body bytea, p_label text)
        RETURNS bigint LANGUAGE plpgsql SECURITY DEFINER SET search_path = %I, pg_temp AS $b$
        DECLARE
          rid bigint;
        BEGIN
          IF p_action NOT IN ('ensure', 'rotate', 'revoke', 'deny-cert', 'allow-cert') THEN
            RAISE EXCEPTION 'unknown change request action';
          END IF;
          IF length(p_credential_id) > 512 OR length(p_label) > 256 OR length(p_body) > 65536 THEN
            RAISE EXCEPTION 'change request too large';
          END IF;
          IF (SELECT count(*) FROM change_requests WHERE state = 'pending') >= 10000 THEN
            RAISE EXCEPTION 'too many pending change requests';
          END IF;
          INSERT INTO change_requests (action, credential_id, body, requested_by, label)
            VALUES (p_action, p_credential_id, p_body, session_user, p_label)
            RETURNING id INTO rid;
          RETURN rid;
        END $b$$f$, current_schema());
    END $do$;
    REVOKE ALL ON FUNCTION netproc_request(text, text, bytea, text) FROM PUBLIC;",
];

/// Whether `database` names PostgreSQL rather than a SQLite file.
pub(crate) fn is_postgres(database: &std::path::Path) -> bool {
    let s = database.to_string_lossy();
    s.starts_with("postgres://") || s.starts_with("postgresql://")
}

/// A PostgreSQL error as text: the server's SQLSTATE and message when it
/// sent one (tokio-postgres alone says only "db error"), never its detail
/// (which may quote values).
struct Pg(tokio_postgres::Error);

impl std::fmt::Display for Pg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0.as_db_error() {
            Some(db) => write!(f, "{} ({})", db.message(), db.code().code()),
            None => write!(f, "{}", self.0),
        }
    }
}

fn db_error(context: &str, e: impl std::fmt::Display) -> AuthorityError {
    AuthorityError::Database(DatabaseError::new(context.to_owned(), e.to_string()))
}

fn connect(rt: &Runtime, options: &PostgresOptions) -> Result<Client, AuthorityError> {
    let mut config: Config = options
        .url
        .parse()
        .map_err(|e| db_error("database URL", Pg(e)))?;
    if let Some(pw) = &options.password {
        config.password(pw.as_bytes());
    }
    config.connect_timeout(Duration::from_secs(5));
    let plain = match config.get_ssl_mode() {
        tokio_postgres::config::SslMode::Disable => true,
        // libpq's default: TLS when it can be checked (a CA is given).
        tokio_postgres::config::SslMode::Prefer => options.ca_pem.is_none(),
        _ => false,
    };
    let unavailable = |e: tokio_postgres::Error| {
        AuthorityError::Unavailable(format!("connecting to PostgreSQL: {}", Pg(e)))
    };
    // The connection's task runs on the thread's runtime whenever the
    // thread waits on it (`block_on`).
    let client = if plain {
        let (client, connection) = rt.block_on(config.connect(NoTls)).map_err(unavailable)?;
        rt.spawn(connection);
        client
    } else {
        let Some(pem) = &options.ca_pem else {
            return Err(db_error(
                "database",
                "sslmode asks for TLS: give the server's CA (database_ca)",
            ));
        };
        let roots =
            netproc_pki::TrustAnchors::from_pem(pem).map_err(|e| db_error("database_ca", e))?;
        let tls = netproc_pki::service_client_config(
            &roots,
            &netproc_pki::TlsOptions::default().allow_tls12(true),
        )
        .map_err(|e| db_error("database TLS", e))?;
        let tls = tokio_postgres_rustls::MakeRustlsConnect::new(tls);
        let (client, connection) = rt.block_on(config.connect(tls)).map_err(unavailable)?;
        rt.spawn(connection);
        client
    };
    if let Some(schema) = &options.schema {
        if !schema
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_')
            || schema.is_empty()
        {
            return Err(db_error("database schema", "1 or more of [A-Za-z0-9_]"));
        }
        rt.block_on(client.batch_execute(&format!("SET search_path TO {schema}")))
            .map_err(|e| db_error("search_path", Pg(e)))?;
    }
    Ok(client)
}

/// Runs the migrations not yet applied (all of them with `create`; with
/// `create` false, a database with none is refused: `netproc creds init`
/// makes it), then registers `targets`. Answers whether this role may only
/// request changes (it cannot write the tables but may call
/// `netproc_request`); such a role registers nothing.
fn migrate(
    rt: &Runtime,
    client: &mut Client,
    options: &PostgresOptions,
    create: bool,
    targets: &[String],
) -> Result<bool, AuthorityError> {
    rt.block_on(async {
        let tx = client
            .transaction()
            .await
            .map_err(|e| db_error("migrations", Pg(e)))?;
        if let Some(schema) = options.schema.as_ref().filter(|_| create) {
            tx.batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {schema}"))
                .await
                .map_err(|e| db_error("schema", Pg(e)))?;
        }
        // One migrator at a time, across processes.
        tx.batch_execute("SELECT pg_advisory_xact_lock(7304519245566221)")
            .await
            .map_err(|e| db_error("migration lock", Pg(e)))?;
        let known: bool = tx
            .query_one("SELECT to_regclass('netproc_schema') IS NOT NULL", &[])
            .await
            .map_err(|e| db_error("migrations", Pg(e)))?
            .get(0);
        if !known && create {
            tx.batch_execute("CREATE TABLE netproc_schema (version BIGINT NOT NULL)")
                .await
                .map_err(|e| db_error("migrations", Pg(e)))?;
        }
        let version: i64 = match known {
            true => tx
                .query_opt("SELECT version FROM netproc_schema", &[])
                .await
                .map_err(|e| db_error("migrations", Pg(e)))?
                .map_or(0, |r| r.get(0)),
            false => 0,
        };
        if version == 0 && !create {
            return Err(db_error(
                "database",
                "no netproc authority tables here; `netproc creds init` creates them",
            ));
        }
        // A role that may only request changes migrates nothing (it could
        // not): it needs only the request functions (migration 4).
        let (writer, requester): (bool, bool) = match version {
            0 => (true, false),
            _ => tx
                .query_one(
                    "SELECT has_table_privilege('credentials', 'UPDATE'),
                       CASE WHEN to_regprocedure('netproc_request(text, text, bytea, text)') IS NULL
                         THEN false
                         ELSE has_function_privilege(
                           to_regprocedure('netproc_request(text, text, bytea, text)')::oid, 'EXECUTE')
                       END",
                    &[],
                )
                .await
                .map(|r| (r.get(0), r.get(1)))
                .map_err(|e| db_error("privileges", Pg(e)))?,
        };
        if !writer && !requester {
            return Err(db_error(
                "database",
                "this role may neither write the authority's tables nor request changes (EXECUTE on netproc_request)",
            ));
        }
        if writer && (version as usize) < MIGRATIONS.len() {
            for (i, m) in MIGRATIONS.iter().enumerate().skip(version as usize) {
                tx.batch_execute(m)
                    .await
                    .map_err(|e| db_error(&format!("migration {}", i + 1), Pg(e)))?;
            }
            tx.batch_execute("DELETE FROM netproc_schema")
                .await
                .map_err(|e| db_error("migrations", Pg(e)))?;
            tx.execute(
                "INSERT INTO netproc_schema (version) VALUES ($1)",
                &[&(MIGRATIONS.len() as i64)],
            )
            .await
            .map_err(|e| db_error("migrations", Pg(e)))?;
        }
        if writer {
            for t in targets {
                tx.execute(
                    "INSERT INTO targets (name) VALUES ($1) ON CONFLICT DO NOTHING",
                    &[t],
                )
                .await
                .map_err(|e| db_error("targets", Pg(e)))?;
            }
        }
        tx.commit().await.map_err(|e| db_error("migrations", Pg(e)))?;
        Ok(!writer)
    })
}

struct PgConn {
    /// Drives the connection; only this thread enters it.
    rt: Runtime,
    client: Client,
    options: PostgresOptions,
    retry: bool,
    /// Prepared statements by SQL text: one round trip per statement
    /// instead of two. Cleared on reconnection.
    statements: std::collections::HashMap<String, Statement>,
    /// Savepoint statements between two jobs, sent with the next job's
    /// first pipeline rather than in a round trip of their own.
    deferred: Option<String>,
}

impl PgConn {
    fn statement(&mut self, sql: &str) -> Result<Statement, AuthorityError> {
        if let Some(st) = self.statements.get(sql) {
            return Ok(st.clone());
        }
        match self.rt.block_on(self.client.prepare(sql)) {
            Ok(st) => {
                self.statements.insert(sql.to_owned(), st.clone());
                Ok(st)
            }
            Err(e) => Err(self.check(e)),
        }
    }

    fn check(&mut self, e: tokio_postgres::Error) -> AuthorityError {
        use tokio_postgres::error::SqlState;
        if let Some(code) = e.code()
            && (*code == SqlState::T_R_DEADLOCK_DETECTED
                || *code == SqlState::T_R_SERIALIZATION_FAILURE)
        {
            self.retry = true;
        }
        db_error("", Pg(e))
    }
}

fn params<'a>(args: &'a [Arg<'a>]) -> Vec<&'a (dyn ToSql + Sync)> {
    args.iter()
        .map(|a| -> &(dyn ToSql + Sync) {
            match a {
                Arg::I(v) => v,
                Arg::S(v) => v,
                Arg::B(v) => v,
            }
        })
        .collect()
}

fn row(r: &tokio_postgres::Row) -> Result<Row, AuthorityError> {
    let mut out = Vec::with_capacity(r.len());
    for (i, col) in r.columns().iter().enumerate() {
        let get_err = |e: tokio_postgres::Error| db_error("reading a row", Pg(e));
        let cell = match *col.type_() {
            Type::INT8 => r
                .try_get::<_, Option<i64>>(i)
                .map_err(get_err)?
                .map(Cell::I),
            Type::INT4 => r
                .try_get::<_, Option<i32>>(i)
                .map_err(get_err)?
                .map(|v| Cell::I(i64::from(v))),
            Type::INT2 => r
                .try_get::<_, Option<i16>>(i)
                .map_err(get_err)?
                .map(|v| Cell::I(i64::from(v))),
            Type::BOOL => r
                .try_get::<_, Option<bool>>(i)
                .map_err(get_err)?
                .map(Cell::Bool),
            Type::BYTEA => r
                .try_get::<_, Option<Vec<u8>>>(i)
                .map_err(get_err)?
                .map(Cell::B),
            _ => r
                .try_get::<_, Option<String>>(i)
                .map_err(get_err)?
                .map(Cell::S),
        };
        out.push(cell.unwrap_or(Cell::Null));
    }
    Ok(Row(out))
}

impl Sql for PgConn {
    fn dialect(&self) -> Dialect {
        Dialect::Postgres
    }

    fn exec(&mut self, sql: &str, args: &[Arg<'_>]) -> Result<u64, AuthorityError> {
        self.flush()?;
        let st = self.statement(sql)?;
        let p = params(args);
        match self.rt.block_on(self.client.execute(&st, &p)) {
            Ok(n) => Ok(n),
            Err(e) => Err(self.check(e)),
        }
    }

    fn query(&mut self, sql: &str, args: &[Arg<'_>]) -> Result<Vec<Row>, AuthorityError> {
        self.flush()?;
        let st = self.statement(sql)?;
        let p = params(args);
        match self.rt.block_on(self.client.query(&st, &p)) {
            Ok(rows) => rows.iter().map(row).collect(),
            Err(e) => Err(self.check(e)),
        }
    }

    fn pipeline_until_error(
        &mut self,
        stmts: &[Stmt<'_>],
    ) -> (Vec<Vec<Row>>, Option<AuthorityError>) {
        let mut prepared = Vec::with_capacity(stmts.len());
        for (sql, _) in stmts {
            match self.statement(sql) {
                Ok(st) => prepared.push(st),
                Err(e) => return (Vec::new(), Some(e)),
            }
        }
        let params: Vec<_> = stmts.iter().map(|(_, a)| params(a)).collect();
        // Polled together, the queries are sent together (tokio-postgres
        // pipelines them) and run in order.
        let client = &self.client;
        let deferred = self.deferred.take();
        let (before, results) = self.rt.block_on(futures_util::future::join(
            async {
                match &deferred {
                    Some(sql) => client.batch_execute(sql).await,
                    None => Ok(()),
                }
            },
            futures_util::future::join_all(
                prepared
                    .iter()
                    .zip(&params)
                    .map(|(st, p)| client.query(st, p)),
            ),
        ));
        if let Err(e) = before {
            return (Vec::new(), Some(self.check(e)));
        }
        let mut out = Vec::with_capacity(results.len());
        for r in results {
            let rows = match r {
                Ok(rows) => rows.iter().map(row).collect::<Result<_, _>>(),
                // The first failure is the cause; the rest failed after it.
                Err(e) => Err(self.check(e)),
            };
            match rows {
                Ok(rows) => out.push(rows),
                Err(e) => return (out, Some(e)),
            }
        }
        (out, None)
    }
}

impl PgConn {
    /// Sends the deferred savepoint statements, if any, on their own.
    fn flush(&mut self) -> Result<(), AuthorityError> {
        match self.deferred.take() {
            Some(sql) => self
                .rt
                .block_on(self.client.batch_execute(&sql))
                .map_err(|e| self.check(e)),
            None => Ok(()),
        }
    }
}

impl Conn for PgConn {
    fn batch(&mut self, sql: &str) -> Result<(), DatabaseError> {
        // Between two jobs: sent with the next job's first pipeline.
        if sql.ends_with("SAVEPOINT job") && !sql.starts_with("BEGIN") {
            self.deferred = Some(match self.deferred.take() {
                Some(before) => format!("{before}; {sql}"),
                None => sql.to_owned(),
            });
            return Ok(());
        }
        let sql = match self.deferred.take() {
            // A new transaction or one undone: nothing left to send.
            _ if sql == "ROLLBACK" || sql.starts_with("BEGIN") => sql.to_owned(),
            Some(before) => format!("{before}; {sql}"),
            None => sql.to_owned(),
        };
        let sql = sql.as_str();
        // A lost session (PostgreSQL restarted, the network cut): connect
        // again before the next transaction; the jobs of a transaction in
        // flight fail and their callers retry.
        if sql.starts_with("BEGIN") && self.client.is_closed() {
            match connect(&self.rt, &self.options) {
                Ok(c) => {
                    self.client = c;
                    self.statements.clear();
                }
                Err(AuthorityError::Database(e)) => return Err(e),
                Err(e) => return Err(DatabaseError::new("reconnecting", e.to_string())),
            }
        }
        let done = self.rt.block_on(self.client.batch_execute(sql));
        done.map_err(|e| {
            use tokio_postgres::error::SqlState;
            if e.code().is_some_and(|c| {
                *c == SqlState::T_R_DEADLOCK_DETECTED || *c == SqlState::T_R_SERIALIZATION_FAILURE
            }) {
                self.retry = true;
            }
            DatabaseError::new(sql.split(' ').next().unwrap_or(""), Pg(e).to_string())
        })
    }

    fn begin(&self) -> &'static str {
        "BEGIN ISOLATION LEVEL READ COMMITTED"
    }

    fn take_retry(&mut self) -> bool {
        std::mem::take(&mut self.retry)
    }
}

/// Connects, migrates (creating the tables only with `create`), registers
/// `targets`, and starts the database thread; and whether this role may
/// only request changes. Blocking.
pub(crate) fn open(
    options: &PostgresOptions,
    create: bool,
    targets: &[String],
) -> Result<(Db, bool), AuthorityError> {
    let (options, targets) = (options.clone(), targets.to_vec());
    let mode = std::sync::Arc::new(std::sync::Mutex::new(false));
    let answer = std::sync::Arc::clone(&mode);
    let db = Db::spawn_with("netproc-authority-pg", move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| db_error("the database thread's runtime", e))?;
        let mut client = connect(&rt, &options)?;
        let requests_only = migrate(&rt, &mut client, &options, create, &targets)?;
        *mode
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = requests_only;
        Ok(PgConn {
            rt,
            client,
            options,
            retry: false,
            statements: std::collections::HashMap::new(),
            deferred: None,
        })
    })?;
    let requests_only = *answer
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    Ok((db, requests_only))
}
