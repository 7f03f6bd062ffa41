//! The seam under the authority's SQL: statements with `$1` placeholders,
//! arguments and rows in a few plain types, so one body of SQL
//! ([`crate::sql`]) runs on SQLite and PostgreSQL.

use crate::types::{AuthorityError, DatabaseError};

/// `v` as a database integer (saturating).
pub(crate) fn i64_of(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A database integer as `u64` (negative: 0).
pub(crate) fn u64_of(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// `v` as stored in a byte column (postcard).
pub(crate) fn encode<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, AuthorityError> {
    postcard::to_stdvec(v).map_err(|e| AuthorityError::Database(DatabaseError::new("", e)))
}

/// A statement's argument.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Arg<'a> {
    I(i64),
    S(&'a str),
    B(&'a [u8]),
}

impl From<i64> for Arg<'_> {
    fn from(v: i64) -> Self {
        Arg::I(v)
    }
}

impl<'a> From<&'a str> for Arg<'a> {
    fn from(v: &'a str) -> Self {
        Arg::S(v)
    }
}

impl<'a> From<&'a String> for Arg<'a> {
    fn from(v: &'a String) -> Self {
        Arg::S(v)
    }
}

impl<'a> From<&'a [u8]> for Arg<'a> {
    fn from(v: &'a [u8]) -> Self {
        Arg::B(v)
    }
}

impl<'a> From<&'a Vec<u8>> for Arg<'a> {
    fn from(v: &'a Vec<u8>) -> Self {
        Arg::B(v)
    }
}

/// `[Arg]` from values: `args![target, i64_of(seq)]`.
macro_rules! args {
    ($($v:expr),* $(,)?) => { &[$(crate::query::Arg::from($v)),*] };
}
pub(crate) use args;

/// A value read back.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Cell {
    Null,
    I(i64),
    // Produced by backends with a boolean type (PostgreSQL).
    #[allow(dead_code)]
    Bool(bool),
    S(String),
    B(Vec<u8>),
}

/// One row of a result.
#[derive(Debug, Clone, Default)]
pub(crate) struct Row(pub(crate) Vec<Cell>);

fn bad_cell(i: usize, want: &str) -> AuthorityError {
    AuthorityError::Database(DatabaseError::new(
        "",
        format!("column {i}: expected {want}"),
    ))
}

impl Row {
    pub(crate) fn i64(&self, i: usize) -> Result<i64, AuthorityError> {
        match self.0.get(i) {
            Some(Cell::I(v)) => Ok(*v),
            Some(Cell::Bool(b)) => Ok(i64::from(*b)),
            _ => Err(bad_cell(i, "an integer")),
        }
    }
    pub(crate) fn opt_i64(&self, i: usize) -> Result<Option<i64>, AuthorityError> {
        match self.0.get(i) {
            Some(Cell::Null) => Ok(None),
            _ => self.i64(i).map(Some),
        }
    }
    pub(crate) fn bool(&self, i: usize) -> Result<bool, AuthorityError> {
        match self.0.get(i) {
            Some(Cell::Bool(b)) => Ok(*b),
            Some(Cell::I(v)) => Ok(*v != 0),
            _ => Err(bad_cell(i, "a boolean")),
        }
    }
    pub(crate) fn string(&self, i: usize) -> Result<String, AuthorityError> {
        match self.0.get(i) {
            Some(Cell::S(v)) => Ok(v.clone()),
            _ => Err(bad_cell(i, "text")),
        }
    }
    pub(crate) fn opt_string(&self, i: usize) -> Result<Option<String>, AuthorityError> {
        match self.0.get(i) {
            Some(Cell::Null) => Ok(None),
            _ => self.string(i).map(Some),
        }
    }
    pub(crate) fn bytes(&self, i: usize) -> Result<Vec<u8>, AuthorityError> {
        match self.0.get(i) {
            Some(Cell::B(v)) => Ok(v.clone()),
            _ => Err(bad_cell(i, "bytes")),
        }
    }
}

/// Which database a statement runs on, for the few statements that differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dialect {
    Sqlite,
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    Postgres,
}

/// What the store needs of a database, inside one transaction: run a
/// statement, read rows. Statements use `$1`, `$2`, … placeholders.
pub(crate) trait Sql {
    /// The database's dialect.
    fn dialect(&self) -> Dialect {
        Dialect::Sqlite
    }
    /// Runs a statement; how many rows it changed.
    fn exec(&mut self, sql: &str, args: &[Arg<'_>]) -> Result<u64, AuthorityError>;
    /// Runs a query; every row.
    fn query(&mut self, sql: &str, args: &[Arg<'_>]) -> Result<Vec<Row>, AuthorityError>;
    /// Runs a query; its first row, if any.
    fn first(&mut self, sql: &str, args: &[Arg<'_>]) -> Result<Option<Row>, AuthorityError> {
        Ok(self.query(sql, args)?.into_iter().next())
    }
    /// Runs statements in order, in one round trip where the backend can
    /// (PostgreSQL pipelines them); each one's rows. No statement may
    /// need an earlier one's result except through the database.
    fn pipeline(&mut self, stmts: &[Stmt<'_>]) -> Result<Vec<Vec<Row>>, AuthorityError> {
        match self.pipeline_until_error(stmts) {
            (_, Some(e)) => Err(e),
            (rows, None) => Ok(rows),
        }
    }
    /// [`Sql::pipeline`], keeping the rows of the statements before the
    /// first failure (which may explain it).
    fn pipeline_until_error(
        &mut self,
        stmts: &[Stmt<'_>],
    ) -> (Vec<Vec<Row>>, Option<AuthorityError>) {
        let mut out = Vec::with_capacity(stmts.len());
        for (sql, args) in stmts {
            match self.query(sql, args) {
                Ok(rows) => out.push(rows),
                Err(e) => return (out, Some(e)),
            }
        }
        (out, None)
    }
}

/// A statement and its arguments, for [`Sql::pipeline`].
pub(crate) type Stmt<'a> = (&'static str, Vec<Arg<'a>>);

/// A [`Stmt`]: `stmt!("… $1 …", target)`.
macro_rules! stmt {
    ($sql:expr $(, $v:expr)* $(,)?) => { ($sql, vec![$(crate::query::Arg::from($v)),*]) };
}
pub(crate) use stmt;
