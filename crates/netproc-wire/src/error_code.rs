//! The stable error codes of the protocol.

use std::fmt;
use std::str::FromStr;

macro_rules! error_codes {
    ($( $(#[$doc:meta])* $variant:ident => $name:literal, )*) => {
        /// A stable, snake_case error code: part of the wire contract.
        ///
        /// Codes travel as strings. A code this version does not know decodes
        /// to [`ErrorCode::Unknown`] with its text, so a newer peer's codes are
        /// never a decoding failure.
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[non_exhaustive]
        pub enum ErrorCode {
            $( $(#[$doc])* $variant, )*
            /// A code this version of netproc does not know (sent by a newer peer).
            Unknown(String),
        }

        impl ErrorCode {
            /// Every known code, in declaration order.
            pub const ALL: &'static [ErrorCode] = &[ $( ErrorCode::$variant, )* ];

            /// The code as it travels on the wire.
            pub fn as_str(&self) -> &str {
                match self {
                    $( ErrorCode::$variant => $name, )*
                    ErrorCode::Unknown(s) => s,
                }
            }

            fn from_known(s: &str) -> Option<ErrorCode> {
                match s {
                    $( $name => Some(ErrorCode::$variant), )*
                    _ => None,
                }
            }
        }
    };
}

error_codes! {
    /// The credential was not accepted. The peer learns no more than that.
    AuthenticationFailed => "authentication_failed",
    /// A message other than `Auth` arrived before authentication.
    NotAuthenticated => "not_authenticated",
    /// Too many failed authentications from this address or for this key.
    AuthThrottled => "auth_throttled",
    /// The principal lacks the privilege the operation needs.
    InsufficientPrivileges => "insufficient_privileges",
    /// A request rate limit was reached (`details.scope`, `details.retry_after_ms`).
    RateLimited => "rate_limited",
    /// A connection admission limit was reached.
    ConnectionLimited => "connection_limited",
    /// Too many TLS handshakes or unauthenticated sessions are in progress.
    HandshakeLimited => "handshake_limited",
    /// A request could not be decoded or is not valid in this session.
    InvalidRequest => "invalid_request",
    /// The request named an operation this server does not know.
    InvalidOperation => "invalid_operation",
    /// A message kind this peer does not know (the session stays open).
    UnsupportedMessageType => "unsupported_message_type",
    /// The function ran and returned an error.
    OperationFailed => "operation_failed",
    /// No function of that name is defined.
    FunctionNotFound => "function_not_found",
    /// The arguments do not have the shape the function expects.
    InvalidArgument => "invalid_argument",
    /// A frame's declared length is above the current limit.
    FrameTooLarge => "frame_too_large",
    /// The byte stream is not valid netproc/1; the connection closes.
    ProtocolError => "protocol_error",
    /// A script hit a sandbox limit or failed at run time.
    ScriptError => "script_error",
    /// A deadline passed.
    Timeout => "timeout",
    /// The call was cancelled.
    Cancelled => "cancelled",
    /// A bounded server queue is full (`details.retry_after_ms`).
    Overloaded => "overloaded",
    /// The peer speaks a protocol version this side does not.
    UnsupportedVersion => "unsupported_version",
    /// The principal already has as many sessions as it may.
    TooManySessions => "too_many_sessions",
    /// An internal error; details are in the server's log only.
    Internal => "internal",
    /// The server is shutting down (a `GoAway` reason).
    ShuttingDown => "shutting_down",
    /// The session's certificate or key was revoked (a `GoAway` reason).
    CredentialRevoked => "credential_revoked",
    /// The session's client certificate expired (a `GoAway` reason).
    CertificateExpired => "certificate_expired",
    /// A newer session of the same principal replaced this one (a `GoAway` reason).
    SessionReplaced => "session_replaced",
    /// The principal's privileges changed (a `GoAway` reason).
    PrivilegesChanged => "privileges_changed",
    /// The session was silent for too long (a `GoAway` reason).
    IdleTimeout => "idle_timeout",
    /// An administrator closed the session (a `GoAway` reason).
    DisconnectedByAdmin => "disconnected_by_admin",
    /// Client side only: the server could not be reached.
    Unavailable => "unavailable",
    /// Client side only: the TLS handshake failed.
    TlsError => "tls_error",
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ErrorCode {
    type Err = std::convert::Infallible;

    /// Never fails: an unknown code becomes [`ErrorCode::Unknown`].
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(ErrorCode::from_known(s).unwrap_or_else(|| ErrorCode::Unknown(s.to_owned())))
    }
}

impl From<&str> for ErrorCode {
    fn from(s: &str) -> Self {
        ErrorCode::from_known(s).unwrap_or_else(|| ErrorCode::Unknown(s.to_owned()))
    }
}

impl serde::Serialize for ErrorCode {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> serde::Deserialize<'de> for ErrorCode {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct CodeVisitor;
        impl serde::de::Visitor<'_> for CodeVisitor {
            type Value = ErrorCode;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an error code string")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ErrorCode, E> {
                Ok(ErrorCode::from(v))
            }
        }
        deserializer.deserialize_str(CodeVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_known_code_round_trips_through_its_name() {
        for code in ErrorCode::ALL {
            assert_eq!(&code.as_str().parse::<ErrorCode>().unwrap(), code);
        }
    }

    #[test]
    fn names_are_unique_snake_case() {
        let mut names: Vec<&str> = ErrorCode::ALL.iter().map(ErrorCode::as_str).collect();
        for n in &names {
            assert!(
                n.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{n}"
            );
        }
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ErrorCode::ALL.len());
    }

    #[test]
    fn unknown_code_is_kept_not_rejected() {
        let code: ErrorCode = "brand_new_code".parse().unwrap();
        assert_eq!(code, ErrorCode::Unknown("brand_new_code".into()));
        assert_eq!(code.as_str(), "brand_new_code");
    }
}
