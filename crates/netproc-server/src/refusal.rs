//! Every refusal the server itself makes, and its one mapping to the wire:
//! code, message and `details`. Refusals with a retry carry
//! `{scope, retry_after_ms}`; the peer learns nothing beyond the contract's
//! words (no reason for an authentication failure, no internals).
//!
//! Errors raised by functions (`CallError`), scripts and the wire decoder
//! keep their own codes; everything the server decides is here.

use std::collections::BTreeMap;
use std::time::Duration;

use netproc_wire::{ErrorBody, ErrorCode, Value};

/// A refusal decided by the server.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Refused {
    /// A request limit (`scope`: which one).
    RateLimited {
        scope: &'static str,
        retry_after: Duration,
        message: &'static str,
    },
    /// An authentication limit or block (`scope`: which one).
    AuthThrottled {
        scope: &'static str,
        retry_after: Duration,
        message: &'static str,
    },
    /// The credential was refused; nothing more is said.
    AuthenticationFailed,
    /// The unauthenticated-session cap.
    HandshakeLimited,
    /// The principal's session cap.
    TooManySessions { max: u32 },
    /// The principal lacks a privilege (the message names it).
    InsufficientPrivileges(String),
    /// A request id of 0, or not above the last.
    InvalidRequestId { id: u64, last_id: u64 },
    /// The request's deadline was 0 ms.
    ZeroDeadline,
    /// The call did not finish within its limit.
    CallTimeout { limit: Duration },
    /// The call was cancelled.
    Cancelled,
    /// A function panicked (details stay in the log).
    Internal,
    /// A result larger than the client's frame limit.
    ResultTooLarge { limit: u32, size: u64 },
}

/// `{scope, retry_after_ms}` (at least 1 ms).
fn retry(scope: &str, retry_after: Duration) -> Value {
    let ms = u64::try_from(retry_after.as_millis())
        .unwrap_or(u64::MAX)
        .max(1);
    Value::Map(BTreeMap::from([
        ("retry_after_ms".to_owned(), int(ms)),
        ("scope".to_owned(), Value::from(scope)),
    ]))
}

fn int(n: u64) -> Value {
    Value::Int(i64::try_from(n).unwrap_or(i64::MAX))
}

impl Refused {
    /// The wire code.
    pub(crate) fn code(&self) -> ErrorCode {
        match self {
            Refused::RateLimited { .. } => ErrorCode::RateLimited,
            Refused::AuthThrottled { .. } => ErrorCode::AuthThrottled,
            Refused::AuthenticationFailed => ErrorCode::AuthenticationFailed,
            Refused::HandshakeLimited => ErrorCode::HandshakeLimited,
            Refused::TooManySessions { .. } => ErrorCode::TooManySessions,
            Refused::InsufficientPrivileges(_) => ErrorCode::InsufficientPrivileges,
            Refused::InvalidRequestId { .. } => ErrorCode::InvalidRequest,
            Refused::ZeroDeadline | Refused::CallTimeout { .. } => ErrorCode::Timeout,
            Refused::Cancelled => ErrorCode::Cancelled,
            Refused::Internal => ErrorCode::Internal,
            Refused::ResultTooLarge { .. } => ErrorCode::FrameTooLarge,
        }
    }

    /// The error as sent.
    pub(crate) fn into_body(self) -> ErrorBody {
        let code = self.code();
        let (message, details) = match self {
            Refused::RateLimited {
                scope,
                retry_after,
                message,
            }
            | Refused::AuthThrottled {
                scope,
                retry_after,
                message,
            } => (message.to_owned(), retry(scope, retry_after)),
            Refused::AuthenticationFailed => ("authentication failed".to_owned(), Value::Null),
            Refused::HandshakeLimited => {
                ("too many unauthenticated sessions".to_owned(), Value::Null)
            }
            Refused::TooManySessions { max } => (
                format!("the principal already has {max} sessions"),
                Value::Null,
            ),
            Refused::InsufficientPrivileges(message) => (message, Value::Null),
            Refused::InvalidRequestId { id, last_id } => (
                if id == 0 {
                    "request ids start at 1".to_owned()
                } else {
                    format!("request id {id} is not above the previous id {last_id}")
                },
                Value::Map(BTreeMap::from([
                    ("id".to_owned(), int(id)),
                    ("last_id".to_owned(), int(last_id)),
                ])),
            ),
            Refused::ZeroDeadline => ("the request's deadline is 0 ms".to_owned(), Value::Null),
            Refused::CallTimeout { limit } => (
                format!("the call did not finish within {} ms", limit.as_millis()),
                Value::Null,
            ),
            Refused::Cancelled => ("the call was cancelled".to_owned(), Value::Null),
            Refused::Internal => ("internal error".to_owned(), Value::Null),
            Refused::ResultTooLarge { limit, size } => (
                "the result is larger than the client's frame limit".to_owned(),
                Value::Map(BTreeMap::from([
                    ("limit".to_owned(), int(u64::from(limit))),
                    ("size".to_owned(), int(size)),
                ])),
            ),
        };
        ErrorBody::new(code, message).with_details(details)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_refusal_with_a_retry_carries_scope_and_retry_after_ms() {
        for r in [
            Refused::RateLimited {
                scope: "per_ip",
                retry_after: Duration::ZERO,
                message: "m",
            },
            Refused::AuthThrottled {
                scope: "ip",
                retry_after: Duration::from_millis(1500),
                message: "m",
            },
        ] {
            let body = r.into_body();
            let Value::Map(d) = &body.details else {
                panic!("{body:?}")
            };
            assert!(matches!(d["retry_after_ms"], Value::Int(ms) if ms >= 1));
            assert!(matches!(d["scope"], Value::String(_)));
        }
    }

    #[test]
    fn an_authentication_failure_says_nothing_more() {
        let body = Refused::AuthenticationFailed.into_body();
        assert_eq!(body.code, ErrorCode::AuthenticationFailed);
        assert_eq!(body.message, "authentication failed");
        assert_eq!(body.details, Value::Null);
    }

    #[test]
    fn an_oversized_result_names_the_limit_and_the_size() {
        let body = Refused::ResultTooLarge {
            limit: 1024,
            size: 2048,
        }
        .into_body();
        assert_eq!(body.code, ErrorCode::FrameTooLarge);
        let Value::Map(d) = &body.details else {
            panic!()
        };
        assert_eq!(d["limit"], Value::Int(1024));
        assert_eq!(d["size"], Value::Int(2048));
    }
}
