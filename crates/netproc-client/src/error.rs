//! The client's typed errors.

use std::fmt;
use std::time::Duration;

use netproc_wire::{ErrorBody, ErrorCode, Value};
use serde::Serialize;
use serde::ser::SerializeMap;

/// Why a TLS handshake failed, from rustls' reason.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum TlsFailure {
    /// The server's certificate is not from a trusted CA.
    UnknownIssuer,
    /// The server's certificate is not valid for the name dialled.
    BadServerName,
    /// The server's certificate expired.
    Expired,
    /// The server's certificate is not valid yet.
    NotYetValid,
    /// The server's certificate was revoked.
    Revoked,
    /// The server's certificate matched none of the configured pins.
    PinMismatch,
    /// The server refused this client's certificate (it sent this alert).
    RejectedByServer(String),
    /// Anything else.
    Other,
}

/// Everything a call can fail with. Each variant names the server.
///
/// [`code`](ClientError::code) maps it to the protocol's stable codes, and
/// `Serialize` gives `{code, message, details?}` for JSON output.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The server could not be reached (code `unavailable`).
    #[error("{server}: cannot connect: {message}")]
    Connect {
        /// The server's name.
        server: String,
        /// The I/O error kind.
        kind: std::io::ErrorKind,
        /// What happened.
        message: String,
    },
    /// The TLS handshake failed (code `tls_error`).
    #[error("{server}: TLS handshake failed: {message}")]
    Tls {
        /// The server's name.
        server: String,
        /// Why, classified.
        reason: TlsFailure,
        /// rustls' message.
        message: String,
    },
    /// The credential was refused.
    #[error("{server}: authentication failed")]
    AuthenticationFailed {
        /// The server's name.
        server: String,
    },
    /// Too many failed authentications; retry later.
    #[error("{server}: authentication throttled: {message}")]
    AuthThrottled {
        /// The server's name.
        server: String,
        /// When to retry, if the server said.
        retry_after: Option<Duration>,
        /// What was throttled (`ip`, `api_key`, `pending_auth_attempts_per_ip`,
        /// `ip_overflow`, `api_key_overflow`), if the server said.
        scope: Option<String>,
        /// The server's message.
        message: String,
    },
    /// The credential lacks the privilege.
    #[error("{server}: insufficient privileges: {message}")]
    InsufficientPrivileges {
        /// The server's name.
        server: String,
        /// Names the operation and the privilege it needs.
        message: String,
    },
    /// No such function on the server.
    #[error("{server}: function not found: {message}")]
    FunctionNotFound {
        /// The server's name.
        server: String,
        /// The server's message.
        message: String,
    },
    /// The arguments do not fit the function (or could not be encoded).
    #[error("{server}: invalid argument: {message}")]
    InvalidArgument {
        /// The server's name.
        server: String,
        /// What was expected.
        message: String,
    },
    /// A rate limit; never retried automatically.
    #[error("{server}: rate limited: {message}")]
    RateLimited {
        /// The server's name.
        server: String,
        /// When to retry, if the server said.
        retry_after: Option<Duration>,
        /// Which limit (`per_connection`, `in_flight_per_connection`, …).
        scope: Option<String>,
        /// The server's message.
        message: String,
    },
    /// A deadline passed (the call's, or connecting's).
    #[error("{server}: timed out: {message}")]
    Timeout {
        /// The server's name.
        server: String,
        /// Which deadline.
        message: String,
    },
    /// The call was cancelled.
    #[error("{server}: cancelled")]
    Cancelled {
        /// The server's name.
        server: String,
    },
    /// The server is shutting down.
    #[error("{server}: server shutting down: {message}")]
    ShuttingDown {
        /// The server's name.
        server: String,
        /// The server's message.
        message: String,
    },
    /// The client's local queue of calls is full.
    #[error("{server}: overloaded: {message}")]
    Overloaded {
        /// The server's name.
        server: String,
        /// What is full.
        message: String,
    },
    /// Any other error the server answered.
    #[error("{server}: {code}: {message}")]
    Remote {
        /// The server's name.
        server: String,
        /// The server's code.
        code: ErrorCode,
        /// The server's message.
        message: String,
        /// The server's details.
        details: Value,
    },
    /// The server sent something that makes no sense here.
    #[error("{server}: invalid response: {message}")]
    InvalidResponse {
        /// The server's name.
        server: String,
        /// What was wrong.
        message: String,
    },
    /// No server of that name is configured.
    #[error("no server named {server:?} is configured")]
    UnknownServer {
        /// The name asked for.
        server: String,
    },
    /// The client configuration is invalid.
    #[error("invalid client configuration: {message}")]
    Config {
        /// What is wrong.
        message: String,
    },
}

fn retry_after(details: &Value) -> Option<Duration> {
    match details {
        Value::Map(m) => match m.get("retry_after_ms") {
            Some(Value::Int(ms)) if *ms >= 0 => Some(Duration::from_millis(ms.unsigned_abs())),
            _ => None,
        },
        _ => None,
    }
}

fn scope(details: &Value) -> Option<String> {
    match details {
        Value::Map(m) => match m.get("scope") {
            Some(Value::String(s)) => Some(s.clone()),
            _ => None,
        },
        _ => None,
    }
}

impl ClientError {
    /// The error a server answered, typed.
    pub fn from_remote(server: &str, body: ErrorBody) -> ClientError {
        let server = server.to_owned();
        let ErrorBody {
            code,
            message,
            details,
        } = body;
        match code {
            ErrorCode::AuthenticationFailed => ClientError::AuthenticationFailed { server },
            ErrorCode::AuthThrottled => ClientError::AuthThrottled {
                server,
                retry_after: retry_after(&details),
                scope: scope(&details),
                message,
            },
            ErrorCode::InsufficientPrivileges => {
                ClientError::InsufficientPrivileges { server, message }
            }
            ErrorCode::FunctionNotFound => ClientError::FunctionNotFound { server, message },
            ErrorCode::InvalidArgument => ClientError::InvalidArgument { server, message },
            ErrorCode::RateLimited => ClientError::RateLimited {
                server,
                retry_after: retry_after(&details),
                scope: scope(&details),
                message,
            },
            ErrorCode::Timeout => ClientError::Timeout { server, message },
            ErrorCode::Cancelled => ClientError::Cancelled { server },
            ErrorCode::ShuttingDown => ClientError::ShuttingDown { server, message },
            code => ClientError::Remote {
                server,
                code,
                message,
                details,
            },
        }
    }

    /// The stable code: the server's, or `unavailable` / `tls_error` /
    /// `timeout` / `overloaded` for failures before a server answered.
    pub fn code(&self) -> ErrorCode {
        match self {
            ClientError::Connect { .. } => ErrorCode::Unavailable,
            ClientError::Tls { .. } => ErrorCode::TlsError,
            ClientError::AuthenticationFailed { .. } => ErrorCode::AuthenticationFailed,
            ClientError::AuthThrottled { .. } => ErrorCode::AuthThrottled,
            ClientError::InsufficientPrivileges { .. } => ErrorCode::InsufficientPrivileges,
            ClientError::FunctionNotFound { .. } => ErrorCode::FunctionNotFound,
            ClientError::InvalidArgument { .. } | ClientError::Config { .. } => {
                ErrorCode::InvalidArgument
            }
            ClientError::RateLimited { .. } => ErrorCode::RateLimited,
            ClientError::Timeout { .. } => ErrorCode::Timeout,
            ClientError::Cancelled { .. } => ErrorCode::Cancelled,
            ClientError::ShuttingDown { .. } => ErrorCode::ShuttingDown,
            ClientError::Overloaded { .. } => ErrorCode::Overloaded,
            ClientError::Remote { code, .. } => code.clone(),
            ClientError::InvalidResponse { .. } => ErrorCode::ProtocolError,
            ClientError::UnknownServer { .. } => ErrorCode::Unavailable,
        }
    }

    /// The server the error concerns.
    pub fn server(&self) -> Option<&str> {
        match self {
            ClientError::Config { .. } => None,
            ClientError::Connect { server, .. }
            | ClientError::Tls { server, .. }
            | ClientError::AuthenticationFailed { server }
            | ClientError::AuthThrottled { server, .. }
            | ClientError::InsufficientPrivileges { server, .. }
            | ClientError::FunctionNotFound { server, .. }
            | ClientError::InvalidArgument { server, .. }
            | ClientError::RateLimited { server, .. }
            | ClientError::Timeout { server, .. }
            | ClientError::Cancelled { server }
            | ClientError::ShuttingDown { server, .. }
            | ClientError::Overloaded { server, .. }
            | ClientError::Remote { server, .. }
            | ClientError::InvalidResponse { server, .. }
            | ClientError::UnknownServer { server } => Some(server),
        }
    }

    fn details(&self) -> Value {
        let mut m = std::collections::BTreeMap::new();
        match self {
            ClientError::RateLimited {
                retry_after, scope, ..
            } => {
                if let Some(r) = retry_after {
                    m.insert(
                        "retry_after_ms".to_owned(),
                        Value::Int(r.as_millis() as i64),
                    );
                }
                if let Some(s) = scope {
                    m.insert("scope".to_owned(), Value::from(s.as_str()));
                }
            }
            ClientError::AuthThrottled {
                retry_after: Some(r),
                ..
            } => {
                m.insert(
                    "retry_after_ms".to_owned(),
                    Value::Int(r.as_millis() as i64),
                );
            }
            ClientError::Remote { details, .. } => return details.clone(),
            _ => {}
        }
        if m.is_empty() {
            Value::Null
        } else {
            Value::Map(m)
        }
    }
}

impl Serialize for ClientError {
    /// `{code, message, details?}`, the reference's error shape.
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let details = self.details();
        let mut map = s.serialize_map(None)?;
        map.serialize_entry("code", self.code().as_str())?;
        map.serialize_entry("message", &self.to_string())?;
        if details != Value::Null {
            map.serialize_entry("details", &JsonValue(&details))?;
        }
        map.end()
    }
}

/// Serializes a `Value` in its natural shape (numbers, strings, lists,
/// maps), for JSON output.
struct JsonValue<'a>(&'a Value);

impl Serialize for JsonValue<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Value::Null => s.serialize_unit(),
            Value::Bool(b) => s.serialize_bool(*b),
            Value::Int(i) => s.serialize_i64(*i),
            Value::Float(f) => s.serialize_f64(*f),
            Value::String(v) => s.serialize_str(v),
            Value::Bytes(b) => s.collect_seq(b.iter()),
            Value::List(l) => s.collect_seq(l.iter().map(JsonValue)),
            Value::Map(m) => s.collect_map(m.iter().map(|(k, v)| (k, JsonValue(v)))),
        }
    }
}

/// One server's result in a fan-out, serialized as the reference's
/// `{state: "ok", result}` or `{state: "error", error: {code, message, details?}}`.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum ServerOutcome<R> {
    /// The server answered with a result.
    Ok {
        /// The result.
        result: R,
    },
    /// The call failed on that server.
    Error {
        /// Why.
        error: ClientError,
    },
}

impl<R> From<Result<R, ClientError>> for ServerOutcome<R> {
    fn from(r: Result<R, ClientError>) -> Self {
        match r {
            Ok(result) => ServerOutcome::Ok { result },
            Err(error) => ServerOutcome::Error { error },
        }
    }
}

impl fmt::Display for TlsFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TlsFailure::UnknownIssuer => f.write_str("certificate from an unknown CA"),
            TlsFailure::BadServerName => f.write_str("certificate not valid for the server name"),
            TlsFailure::Expired => f.write_str("certificate expired"),
            TlsFailure::NotYetValid => f.write_str("certificate not yet valid"),
            TlsFailure::Revoked => f.write_str("certificate revoked"),
            TlsFailure::PinMismatch => f.write_str("certificate matches no pin"),
            TlsFailure::RejectedByServer(alert) => {
                write!(f, "the server refused our certificate ({alert})")
            }
            TlsFailure::Other => f.write_str("TLS failure"),
        }
    }
}

/// Classifies a rustls error.
pub(crate) fn classify_tls(e: &rustls::Error) -> TlsFailure {
    use rustls::{CertificateError as C, Error as E};
    match e {
        E::InvalidCertificate(c) => match c {
            C::UnknownIssuer => TlsFailure::UnknownIssuer,
            C::NotValidForName | C::NotValidForNameContext { .. } => TlsFailure::BadServerName,
            C::Expired | C::ExpiredContext { .. } => TlsFailure::Expired,
            C::NotValidYet | C::NotValidYetContext { .. } => TlsFailure::NotYetValid,
            C::Revoked => TlsFailure::Revoked,
            C::Other(o) if o.0.downcast_ref::<netproc_pki::PinMismatch>().is_some() => {
                TlsFailure::PinMismatch
            }
            _ => TlsFailure::Other,
        },
        E::AlertReceived(alert) => TlsFailure::RejectedByServer(format!("{alert:?}")),
        _ => TlsFailure::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_serialize_in_the_reference_shape() {
        let ok: ServerOutcome<i64> = Ok(5).into();
        assert_eq!(
            serde_json::to_value(&ok).unwrap(),
            serde_json::json!({"state": "ok", "result": 5})
        );
        let err: ServerOutcome<i64> = Err(ClientError::RateLimited {
            server: "s1".into(),
            retry_after: Some(Duration::from_millis(40)),
            scope: Some("per_ip".into()),
            message: "slow down".into(),
        })
        .into();
        let json = serde_json::to_value(&err).unwrap();
        assert_eq!(json["state"], "error");
        assert_eq!(json["error"]["code"], "rate_limited");
        assert_eq!(json["error"]["details"]["retry_after_ms"], 40);
        assert_eq!(json["error"]["details"]["scope"], "per_ip");
        let unavailable = ClientError::Connect {
            server: "s2".into(),
            kind: std::io::ErrorKind::ConnectionRefused,
            message: "refused".into(),
        };
        assert_eq!(unavailable.code(), ErrorCode::Unavailable);
    }
}
