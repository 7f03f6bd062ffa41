//! What can go wrong defining or running a script.

use std::collections::BTreeMap;
use std::time::Duration;

use netproc_wire::{ErrorCode, Value};

/// A script error, mapped to exactly one wire code by [`code`](Self::code).
/// Messages carry the script's own line and column, never a server path or
/// a Rust detail.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ScriptError {
    /// The source does not compile (`invalid_argument`).
    #[error("syntax error at line {line}, column {column}: {message}")]
    Syntax {
        /// What is wrong.
        message: String,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
    },
    /// The source compiles but is not a function definition as required
    /// (`invalid_argument`).
    #[error("{0}")]
    Shape(String),
    /// An argument or result has no counterpart (`invalid_argument`).
    #[error("{0}")]
    InvalidArgument(String),
    /// The script threw (`operation_failed`, with its message).
    #[error("{message}")]
    Thrown {
        /// The thrown value, as text.
        message: String,
    },
    /// A deadline passed: the wall-clock limit or the caller's (`timeout`).
    #[error("the script ran out of time")]
    Timeout,
    /// The call was cancelled (`cancelled`).
    #[error("the script was cancelled")]
    Cancelled,
    /// A sandbox limit (`script_error` with `details.kind`:
    /// `operations_exceeded`, `too_large`, `stack_overflow`).
    #[error("script limit reached ({kind}): {message}")]
    Limit {
        /// Which limit.
        kind: &'static str,
        /// Details for people.
        message: String,
    },
    /// Any other run-time failure (`script_error`, kind `runtime_error`).
    #[error("script error at line {line}, column {column}: {message}")]
    Runtime {
        /// What happened.
        message: String,
        /// 1-based line (0 if unknown).
        line: usize,
        /// 1-based column (0 if unknown).
        column: usize,
    },
    /// The work queue is full (`overloaded`, with `retry_after_ms`).
    #[error("the script workers are busy")]
    Overloaded {
        /// A suggested wait.
        retry_after: Duration,
    },
    /// No such dependency, or a host module that was not registered
    /// (`invalid_argument`).
    #[error("{0}")]
    UnknownDependency(String),
    /// The runtime has stopped (`internal`).
    #[error("the script runtime has stopped")]
    Stopped,
}

impl ScriptError {
    /// The wire code.
    pub fn code(&self) -> ErrorCode {
        match self {
            ScriptError::Syntax { .. }
            | ScriptError::Shape(_)
            | ScriptError::InvalidArgument(_)
            | ScriptError::UnknownDependency(_) => ErrorCode::InvalidArgument,
            ScriptError::Thrown { .. } => ErrorCode::OperationFailed,
            ScriptError::Timeout => ErrorCode::Timeout,
            ScriptError::Cancelled => ErrorCode::Cancelled,
            ScriptError::Limit { .. } | ScriptError::Runtime { .. } => ErrorCode::ScriptError,
            ScriptError::Overloaded { .. } => ErrorCode::Overloaded,
            ScriptError::Stopped => ErrorCode::Internal,
        }
    }

    /// Structured details for the wire.
    pub fn details(&self) -> Value {
        let mut m = BTreeMap::new();
        match self {
            ScriptError::Syntax { line, column, .. } => {
                m.insert("line".to_owned(), Value::Int(*line as i64));
                m.insert("column".to_owned(), Value::Int(*column as i64));
            }
            ScriptError::Limit { kind, .. } => {
                m.insert("kind".to_owned(), Value::from(*kind));
            }
            ScriptError::Runtime {
                message,
                line,
                column,
            } => {
                m.insert("kind".to_owned(), Value::from("runtime_error"));
                m.insert("message".to_owned(), Value::from(message.as_str()));
                m.insert("line".to_owned(), Value::Int(*line as i64));
                m.insert("column".to_owned(), Value::Int(*column as i64));
            }
            ScriptError::Overloaded { retry_after } => {
                m.insert(
                    "retry_after_ms".to_owned(),
                    Value::Int(retry_after.as_millis().max(1) as i64),
                );
            }
            _ => return Value::Null,
        }
        Value::Map(m)
    }
}

/// Classifies a Rhai error (looking through nested function-call frames).
pub(crate) fn classify(err: rhai::EvalAltResult) -> ScriptError {
    use rhai::EvalAltResult as E;
    let pos = err.position();
    let (line, column) = (pos.line().unwrap_or(0), pos.position().unwrap_or(0));
    match err {
        E::ErrorInFunctionCall(_, _, inner, _) | E::ErrorInModule(_, inner, _) => classify(*inner),
        E::ErrorRuntime(value, _) => ScriptError::Thrown {
            message: if value.is_string() {
                value.into_string().unwrap_or_default()
            } else {
                value.to_string()
            },
        },
        E::ErrorTerminated(token, _) => {
            if token.clone().into_string().ok().as_deref() == Some("cancelled") {
                ScriptError::Cancelled
            } else {
                ScriptError::Timeout
            }
        }
        E::ErrorTooManyOperations(_) => ScriptError::Limit {
            kind: "operations_exceeded",
            message: "the script exceeded its operation limit".into(),
        },
        E::ErrorStackOverflow(_) => ScriptError::Limit {
            kind: "stack_overflow",
            message: "the script exceeded its call depth".into(),
        },
        E::ErrorDataTooLarge(what, _) => ScriptError::Limit {
            kind: "too_large",
            message: format!("{what} exceeds its limit"),
        },
        other => ScriptError::Runtime {
            message: other.to_string(),
            line,
            column,
        },
    }
}
