//! Server → client: the messages a server sends.

use serde::{Deserialize, Serialize};

use crate::{ErrorCode, Value};

/// A message from server to client.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub enum ServerMessage {
    /// Kind 0: authentication succeeded.
    AuthOk(AuthOk),
    /// Kind 1: the answer to a request.
    Response(Response),
    /// Kind 2: an error not tied to a request. The server closes the
    /// connection after it, except for `unsupported_message_type`.
    Error(ErrorBody),
    /// Kind 3: the answer to a `Ping`.
    Pong {
        /// The ping's nonce.
        nonce: u64,
    },
    /// Kind 4: the server is ending the session.
    GoAway(GoAway),
}

pub(super) const SERVER_KIND_AUTH_OK: u32 = 0;
pub(super) const SERVER_KIND_RESPONSE: u32 = 1;
pub(super) const SERVER_KIND_ERROR: u32 = 2;
pub(super) const SERVER_KIND_PONG: u32 = 3;
pub(super) const SERVER_KIND_GO_AWAY: u32 = 4;

/// What a server tells a newly authenticated client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuthOk {
    /// The protocol version the server speaks.
    pub version: u32,
    /// The server's configured name.
    pub server_name: String,
    /// This session's id (for logs and admin operations).
    pub session_id: u64,
    /// The privileges granted, by name (names a client does not know are kept).
    pub privileges: Vec<String>,
    /// Limits the client should respect.
    pub limits: AnnouncedLimits,
    /// The server closes a session silent for this long; 0 = never.
    pub idle_timeout_ms: u64,
}

/// Limits a server announces in `AuthOk`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnnouncedLimits {
    /// Requests a client may have in flight on this session.
    pub max_in_flight_requests: u32,
    /// Largest frame body the server accepts before authentication.
    pub max_pre_auth_frame_bytes: u32,
    /// Largest frame body the server accepts after authentication.
    pub max_post_auth_frame_bytes: u32,
}

/// The answer to one request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    /// The request's id.
    pub id: u64,
    /// The result or the error.
    pub outcome: Outcome,
}

/// A request's result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Outcome {
    /// Tag 0: success, with the result.
    Ok(Value),
    /// Tag 1: failure.
    Err(ErrorBody),
}

/// An error as sent to the peer: a stable code, a human message, and
/// structured details (`Value::Null` when there are none).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The stable code.
    pub code: ErrorCode,
    /// A message for people; never internal details.
    pub message: String,
    /// Structured details, e.g. `{retry_after_ms, scope}`.
    pub details: Value,
}

impl ErrorBody {
    /// An error without details.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ErrorBody {
            code,
            message: message.into(),
            details: Value::Null,
        }
    }

    /// Adds structured details.
    pub fn with_details(mut self, details: Value) -> Self {
        self.details = details;
        self
    }
}

/// The server is ending the session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GoAway {
    /// Why: `shutting_down`, `credential_revoked`, `idle_timeout`, …
    pub reason: ErrorCode,
    /// The highest request id the server will still answer. On
    /// `shutting_down` those calls finish; on other reasons they are answered
    /// with `reason`.
    pub last_id: u64,
    /// A message for people.
    pub message: String,
}
