//! The messages of netproc/1, and their layered decoding.
//!
//! # Compatibility rule
//!
//! postcard encodes a struct as its fields in order, with no names and no
//! lengths, so **a struct can never gain a field**. Messages evolve only by
//! adding enum variants at the end (a new message kind, a new operation, a new
//! authentication method); existing variants and their fields are frozen.
//! That is why the first version already carries request deadlines,
//! `GoAway { reason, last_id }`, `Auth` as an enum of methods, the limits
//! announced in `AuthOk`, error details as a [`Value`] and the
//! [`Operation::Extension`] escape hatch for higher layers.

use std::fmt;

use bytes::{BufMut, BytesMut};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::frame::{FRAME_HEADER_LEN, FrameError, check_body_len};
use crate::value::take_value_error;
use crate::{ErrorCode, Value};

/// The protocol version this crate speaks, sent in `Auth` and `AuthOk`.
pub const PROTOCOL_VERSION: u32 = 1;

/// The TLS ALPN protocol name of netproc/1. Servers refuse connections that
/// did not negotiate it.
pub const ALPN_PROTOCOL: &[u8] = b"netproc/1";

// ---------------------------------------------------------------------------
// Client → server
// ---------------------------------------------------------------------------

/// A message from client to server.
///
/// Encode with [`ClientMessage::encode`]; decode a frame body with
/// [`ClientMessage::decode`], whose errors say how the server must answer.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub enum ClientMessage {
    /// Kind 0: the first message of a session, and only then.
    Auth(Auth),
    /// Kind 1: a call or other operation.
    Request(Request),
    /// Kind 2: stop work on request `id`; it is answered `cancelled`.
    Cancel {
        /// The request to cancel.
        id: u64,
    },
    /// Kind 3: a heartbeat; the server answers `Pong` with the same nonce.
    Ping {
        /// Echoed in the `Pong`.
        nonce: u64,
    },
    /// Kind 4: `Auth` with options the client announces (its inbound frame
    /// limit first). Sent in place of `Auth` as the first message; a server
    /// that predates it answers `not_authenticated`, and the client then
    /// connects again with plain `Auth`.
    AuthWithOptions(AuthWithOptions),
}

const CLIENT_KIND_AUTH: u32 = 0;
const CLIENT_KIND_REQUEST: u32 = 1;
const CLIENT_KIND_CANCEL: u32 = 2;
const CLIENT_KIND_PING: u32 = 3;
const CLIENT_KIND_AUTH_WITH_OPTIONS: u32 = 4;

/// `Auth` plus options, as a `Value` map so that later options can be
/// added without a new message: a receiver ignores keys it does not know,
/// so an option must be safe to ignore.
///
/// | key | type | meaning |
/// | --- | --- | --- |
/// | `max_inbound_frame_bytes` | Int, 1 024 to 2^32 − 1 | the largest frame body the client accepts; the server never sends a larger one (a result that would be larger is answered `frame_too_large`) |
///
/// ```
/// use netproc_wire::{Auth, AuthMethod, AuthWithOptions, SecretString, PROTOCOL_VERSION};
///
/// let auth = Auth {
///     version: PROTOCOL_VERSION,
///     method: AuthMethod::ApiKey(SecretString::new("npk_…")),
///     client_name: None,
/// };
/// let msg = AuthWithOptions::new(auth).with_max_inbound_frame_bytes(4 << 20);
/// assert_eq!(msg.max_inbound_frame_bytes(), Some(4 << 20));
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuthWithOptions {
    /// The authentication itself, as in plain `Auth`.
    pub auth: Auth,
    /// A map of option name to value.
    pub options: Value,
}

/// The smallest inbound frame limit a peer may announce: every error
/// answer fits in it.
pub const MIN_ANNOUNCED_FRAME_BYTES: u32 = 1024;

impl AuthWithOptions {
    /// `auth` with no options.
    pub fn new(auth: Auth) -> AuthWithOptions {
        AuthWithOptions {
            auth,
            options: Value::Map(std::collections::BTreeMap::new()),
        }
    }

    /// Announces the largest frame body the client accepts.
    pub fn with_max_inbound_frame_bytes(mut self, bytes: u32) -> AuthWithOptions {
        if !matches!(self.options, Value::Map(_)) {
            self.options = Value::Map(std::collections::BTreeMap::new());
        }
        if let Value::Map(m) = &mut self.options {
            m.insert(
                "max_inbound_frame_bytes".to_owned(),
                Value::Int(i64::from(bytes)),
            );
        }
        self
    }

    /// The announced inbound frame limit, if present and valid (an Int in
    /// `MIN_ANNOUNCED_FRAME_BYTES..=u32::MAX`; anything else is ignored).
    pub fn max_inbound_frame_bytes(&self) -> Option<u32> {
        let Value::Map(m) = &self.options else {
            return None;
        };
        match m.get("max_inbound_frame_bytes") {
            Some(Value::Int(n)) => u32::try_from(*n)
                .ok()
                .filter(|n| *n >= MIN_ANNOUNCED_FRAME_BYTES),
            _ => None,
        }
    }
}

/// The authentication message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Auth {
    /// The protocol version the client speaks: [`PROTOCOL_VERSION`].
    pub version: u32,
    /// The credential.
    pub method: AuthMethod,
    /// A name for logs (length-capped and escaped by the server).
    pub client_name: Option<String>,
}

/// How a client proves who it is, inside the TLS channel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum AuthMethod {
    /// Tag 0: an API key, `npk_<id>_<secret>`.
    ApiKey(SecretString),
    /// Tag 1: an Ed25519 signature bound to this TLS connection (reserved:
    /// servers that do not support it answer `authentication_failed`).
    Ed25519(Ed25519Proof),
}

/// A proof of possession of an Ed25519 key, bound to one TLS connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ed25519Proof {
    /// The registered key's id.
    pub key_id: String,
    /// Unix time in milliseconds when the proof was made.
    pub timestamp_ms: u64,
    /// Signature over key id, the connection's TLS exporter value and the timestamp.
    #[serde(with = "as_bytes")]
    pub signature: Vec<u8>,
}

impl Ed25519Proof {
    /// The bytes an [`Ed25519Proof`] signs: a domain tag, the key id
    /// (length-prefixed), the connection's 32-byte TLS exporter value and
    /// the timestamp (big-endian milliseconds).
    pub fn signed_message(key_id: &str, channel_binding: &[u8; 32], timestamp_ms: u64) -> Vec<u8> {
        const DOMAIN: &[u8] = b"netproc-auth-ed25519-v1\0";
        let mut out = Vec::with_capacity(DOMAIN.len() + 4 + key_id.len() + 32 + 8);
        out.extend_from_slice(DOMAIN);
        out.extend_from_slice(
            &u32::try_from(key_id.len())
                .unwrap_or(u32::MAX)
                .to_be_bytes(),
        );
        out.extend_from_slice(key_id.as_bytes());
        out.extend_from_slice(channel_binding);
        out.extend_from_slice(&timestamp_ms.to_be_bytes());
        out
    }
}

/// A secret string: zeroized on drop, redacted in `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretString(Zeroizing<String>);

impl SecretString {
    /// Wraps a secret.
    pub fn new(secret: impl Into<String>) -> Self {
        SecretString(Zeroizing::new(secret.into()))
    }

    /// The secret itself. Never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretString(<redacted>)")
    }
}

impl Serialize for SecretString {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for SecretString {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(SecretString::new)
    }
}

/// A request: an id chosen by the client, an operation and an optional deadline.
///
/// Ids must be strictly increasing within a session; responses carry the id
/// and may arrive in any order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    /// Chosen by the client, strictly increasing within a session.
    pub id: u64,
    /// What to do.
    pub op: Operation,
    /// Milliseconds the client will wait, counted from when the server reads
    /// the request; past it the server answers `timeout`. `None`: the
    /// server's own limit only.
    pub deadline_ms: Option<u32>,
}

/// An operation, with the privilege each needs listed in DESIGN.md.
///
/// Tags are the variant's position, starting at 0; new operations are only
/// ever appended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Operation {
    /// Tag 0: call a function.
    Invoke {
        /// The function's name.
        function: String,
        /// Positional arguments.
        args: Vec<Value>,
    },
    /// Tag 1: define (or replace) a run-time function.
    DefineFunction(DefineFunction),
    /// Tag 2: remove a run-time function (unknown names succeed).
    UndefineFunction {
        /// The function's name.
        name: String,
    },
    /// Tag 3: define (or replace) a constant.
    DefineConstant {
        /// The constant's name.
        name: String,
        /// Its value.
        value: Value,
    },
    /// Tag 4: remove a constant.
    UndefineConstant {
        /// The constant's name.
        name: String,
    },
    /// Tag 5: define a dependency importable by scripts.
    DefineDependency {
        /// The name scripts import it under.
        alias: String,
        /// Where the module comes from.
        source: DependencySource,
    },
    /// Tag 6: remove a dependency.
    UndefineDependency {
        /// The dependency's alias.
        alias: String,
        /// Remove it even if functions import it.
        force: bool,
    },
    /// Tag 7: list the functions the caller may call.
    ListFunctions,
    /// Tag 8: list the constants.
    ListConstants,
    /// Tag 9: list the dependencies.
    ListDependencies,
    /// Tag 10 (admin): the server's name, version and uptime.
    ServerInfo,
    /// Tag 11 (admin): the abuse-control counters.
    AbuseMetrics,
    /// Tag 12 (admin): the live sessions.
    ListSessions,
    /// Tag 13 (admin): close one session (`disconnected_by_admin`).
    DisconnectSession {
        /// The session id from `AuthOk` or the sessions listing.
        session_id: u64,
    },
    /// Tag 14 (admin): close every session of a principal.
    DisconnectPrincipal {
        /// The principal's id.
        principal: String,
    },
    /// Tag 15 (admin): the blocked addresses and keys.
    ListBlocked,
    /// Tag 16 (admin): lift a block.
    Unblock {
        /// An address or key id as listed by `ListBlocked`.
        entry: String,
    },
    /// Tag 17 (admin): the abuse-control limits in force.
    GetLimits,
    /// Tag 18 (admin): change abuse-control limits at run time.
    SetLimits {
        /// The new limits, in the shape `GetLimits` returns.
        limits: Value,
    },
    /// Tag 19: an operation added by a higher layer (e.g. propagation),
    /// dispatched by name.
    Extension {
        /// The extension's registered name.
        name: String,
        /// Its payload, in the extension's own encoding.
        #[serde(with = "as_bytes")]
        payload: Vec<u8>,
    },
    /// Tag 20 (admin): reload the server's certificate, client CAs, CRLs and
    /// key store from their sources.
    Reload,
}

/// Number of operation tags this version knows.
pub(crate) const OPERATION_COUNT: u32 = 21;

impl Operation {
    /// The operation's name, as used in messages and audit events.
    pub fn name(&self) -> &'static str {
        match self {
            Operation::Invoke { .. } => "invoke",
            Operation::DefineFunction(_) => "define_function",
            Operation::UndefineFunction { .. } => "undefine_function",
            Operation::DefineConstant { .. } => "define_constant",
            Operation::UndefineConstant { .. } => "undefine_constant",
            Operation::DefineDependency { .. } => "define_dependency",
            Operation::UndefineDependency { .. } => "undefine_dependency",
            Operation::ListFunctions => "list_functions",
            Operation::ListConstants => "list_constants",
            Operation::ListDependencies => "list_dependencies",
            Operation::ServerInfo => "server_info",
            Operation::AbuseMetrics => "abuse_metrics",
            Operation::ListSessions => "list_sessions",
            Operation::DisconnectSession { .. } => "disconnect_session",
            Operation::DisconnectPrincipal { .. } => "disconnect_principal",
            Operation::ListBlocked => "list_blocked",
            Operation::Unblock { .. } => "unblock",
            Operation::GetLimits => "get_limits",
            Operation::SetLimits { .. } => "set_limits",
            Operation::Extension { .. } => "extension",
            Operation::Reload => "reload",
        }
    }
}

/// A run-time function definition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DefineFunction {
    /// The function's name, an identifier.
    pub name: String,
    /// The script source.
    pub source: String,
    /// SHA-256 of `source` as UTF-8; the server checks it.
    pub source_sha256: [u8; 32],
    /// A description for listings.
    pub description: Option<String>,
    /// Limits of this function's own.
    pub limits: Option<FunctionLimits>,
}

impl DefineFunction {
    /// A definition of `name` from `source`, its SHA-256 filled in, with no
    /// description or limits of its own.
    ///
    /// ```
    /// use netproc_wire::DefineFunction;
    ///
    /// let def = DefineFunction::new("double", "fn double(x) { x * 2 }");
    /// assert!(def.source_matches());
    /// ```
    pub fn new(name: impl Into<String>, source: impl Into<String>) -> Self {
        let source = source.into();
        DefineFunction {
            name: name.into(),
            source_sha256: Self::source_digest(&source),
            source,
            description: None,
            limits: None,
        }
    }

    /// The SHA-256 of a function's source as UTF-8: what `source_sha256`
    /// holds and what a server compares definitions by.
    pub fn source_digest(source: &str) -> [u8; 32] {
        use sha2::Digest;
        sha2::Sha256::digest(source.as_bytes()).into()
    }

    /// Whether `source_sha256` is the SHA-256 of `source`; a server refuses
    /// a definition where it is not.
    pub fn source_matches(&self) -> bool {
        Self::source_digest(&self.source) == self.source_sha256
    }
}

/// Limits a function declares for itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionLimits {
    /// A token bucket for calls to this function.
    pub rate: Option<RateLimit>,
    /// At most this many calls at once.
    pub max_concurrency: Option<u32>,
}

/// A token bucket: `tokens_per_interval` every `interval_ms`, up to `burst_tokens`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateLimit {
    /// Tokens added per interval.
    pub tokens_per_interval: u32,
    /// The interval, in milliseconds.
    pub interval_ms: u32,
    /// The bucket's capacity.
    pub burst_tokens: u32,
}

/// Where a dependency's module comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum DependencySource {
    /// Tag 0: script source defined at run time.
    Script(String),
    /// Tag 1: a module the embedding application registered under this name.
    Host(String),
}

// ---------------------------------------------------------------------------
// Server → client
// ---------------------------------------------------------------------------

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

const SERVER_KIND_AUTH_OK: u32 = 0;
const SERVER_KIND_RESPONSE: u32 = 1;
const SERVER_KIND_ERROR: u32 = 2;
const SERVER_KIND_PONG: u32 = 3;
const SERVER_KIND_GO_AWAY: u32 = 4;

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

// ---------------------------------------------------------------------------
// Encoding
// ---------------------------------------------------------------------------

/// A message could not be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// The encoded body is larger than the frame limit.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// Serialization failed (not expected for netproc's own types).
    #[error("serialization failed: {0}")]
    Serialize(String),
}

/// A postcard flavor that appends to a `BytesMut`.
struct BytesMutFlavor<'a>(&'a mut BytesMut);

impl postcard::ser_flavors::Flavor for BytesMutFlavor<'_> {
    type Output = ();
    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        self.0.put_u8(data);
        Ok(())
    }
    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        self.0.extend_from_slice(data);
        Ok(())
    }
    fn finalize(self) -> postcard::Result<()> {
        Ok(())
    }
}

/// Appends `msg` as one frame to `dst`. On error `dst` is left as it was.
fn encode_frame_of<T: Serialize>(
    msg: &T,
    dst: &mut BytesMut,
    limit: u32,
) -> Result<(), EncodeError> {
    let start = dst.len();
    dst.put_u32(0);
    if let Err(e) = postcard::serialize_with_flavor(msg, BytesMutFlavor(dst)) {
        dst.truncate(start);
        return Err(EncodeError::Serialize(e.to_string()));
    }
    let body_len = dst.len() - start - FRAME_HEADER_LEN;
    if let Err(e) = check_body_len(body_len, limit) {
        dst.truncate(start);
        return Err(e.into());
    }
    // check_body_len guarantees it fits in a u32.
    dst[start..start + FRAME_HEADER_LEN].copy_from_slice(&(body_len as u32).to_be_bytes());
    Ok(())
}

impl ClientMessage {
    /// Appends this message as one frame (header and body) to `dst`.
    ///
    /// Fails, leaving `dst` unchanged, if the body would exceed `limit`.
    pub fn encode(&self, dst: &mut BytesMut, limit: u32) -> Result<(), EncodeError> {
        encode_frame_of(self, dst, limit)
    }

    /// Decodes one frame body.
    ///
    /// The error variant tells the server how to answer: see [`DecodeError`].
    ///
    /// ```
    /// use bytes::BytesMut;
    /// use netproc_wire::{ClientMessage, DecodeError, ErrorCode, FrameDecoder};
    ///
    /// let mut out = BytesMut::new();
    /// ClientMessage::Ping { nonce: 7 }.encode(&mut out, 1024).unwrap();
    /// let mut decoder = FrameDecoder::new(1024);
    /// decoder.feed(&out);
    /// let body = decoder.next_frame().unwrap().unwrap();
    /// assert_eq!(ClientMessage::decode(&body).unwrap(), ClientMessage::Ping { nonce: 7 });
    ///
    /// // Request 9 with operation tag 200: answered `invalid_operation`, session stays open.
    /// let err = ClientMessage::decode(&[1, 9, 200, 1]).unwrap_err();
    /// assert_eq!(err, DecodeError::InvalidOperation { id: 9, tag: 200 });
    /// assert_eq!(err.code(), ErrorCode::InvalidOperation);
    /// ```
    pub fn decode(body: &[u8]) -> Result<ClientMessage, DecodeError> {
        let msg = Self::decode_loose(body)?;
        // Every value has exactly one encoding (wire contract §3).
        if canonical_len(&msg) != body.len() {
            return Err(match &msg {
                ClientMessage::Request(r) if is_canonical_request_head(body, r.id) => {
                    DecodeError::InvalidRequest {
                        id: r.id,
                        reason: NON_CANONICAL.to_owned(),
                    }
                }
                _ => DecodeError::malformed(NON_CANONICAL.to_owned()),
            });
        }
        Ok(msg)
    }

    /// Decodes without the canonical-encoding check.
    fn decode_loose(body: &[u8]) -> Result<ClientMessage, DecodeError> {
        let (kind, rest) = take::<u32>(body).map_err(DecodeError::malformed)?;
        match kind {
            CLIENT_KIND_AUTH => {
                // The version comes first, so a peer speaking another version
                // is told so even if the rest of its Auth is laid out differently.
                let (version, _) = take::<u32>(rest).map_err(DecodeError::malformed)?;
                if version != PROTOCOL_VERSION {
                    return Err(DecodeError::UnsupportedVersion { version });
                }
                take_all(rest)
                    .map(ClientMessage::Auth)
                    .map_err(DecodeError::malformed)
            }
            CLIENT_KIND_AUTH_WITH_OPTIONS => {
                // Its Auth comes first, version first: checked as for Auth.
                let (version, _) = take::<u32>(rest).map_err(DecodeError::malformed)?;
                if version != PROTOCOL_VERSION {
                    return Err(DecodeError::UnsupportedVersion { version });
                }
                take_all(rest)
                    .map(ClientMessage::AuthWithOptions)
                    .map_err(DecodeError::malformed)
            }
            CLIENT_KIND_REQUEST => decode_request(rest).map(ClientMessage::Request),
            CLIENT_KIND_CANCEL => take_all(rest)
                .map(|id| ClientMessage::Cancel { id })
                .map_err(DecodeError::malformed),
            CLIENT_KIND_PING => take_all(rest)
                .map(|nonce| ClientMessage::Ping { nonce })
                .map_err(DecodeError::malformed),
            kind => Err(DecodeError::UnsupportedMessageType { kind }),
        }
    }
}

/// Whether a request's kind and id (its envelope) are canonical, so that a
/// non-canonical payload is the request's fault (`invalid_request` with the
/// id) rather than the envelope's (`protocol_error`).
fn is_canonical_request_head(body: &[u8], id: u64) -> bool {
    let head = varint_len(u64::from(CLIENT_KIND_REQUEST)) + varint_len(id);
    let Some(bytes) = body.get(..head) else {
        return false;
    };
    matches!(
        take::<u32>(bytes).and_then(|(_, rest)| take::<u64>(rest)),
        Ok((got, rest)) if got == id && rest.is_empty()
    )
}

fn decode_request(bytes: &[u8]) -> Result<Request, DecodeError> {
    let (id, rest) = take::<u64>(bytes).map_err(DecodeError::malformed)?;
    let invalid = |reason: String| DecodeError::InvalidRequest { id, reason };
    let (tag, _) = take::<u32>(rest).map_err(invalid)?;
    if tag >= OPERATION_COUNT {
        return Err(DecodeError::InvalidOperation { id, tag });
    }
    let (op, rest) = take::<Operation>(rest).map_err(invalid)?;
    let (deadline_ms, rest) = take::<Option<u32>>(rest).map_err(invalid)?;
    if !rest.is_empty() {
        return Err(invalid(trailing(rest)));
    }
    Ok(Request {
        id,
        op,
        deadline_ms,
    })
}

impl ServerMessage {
    /// Appends this message as one frame (header and body) to `dst`.
    ///
    /// Fails, leaving `dst` unchanged, if the body would exceed `limit`.
    pub fn encode(&self, dst: &mut BytesMut, limit: u32) -> Result<(), EncodeError> {
        encode_frame_of(self, dst, limit)
    }

    /// Decodes one frame body. A client treats any error except
    /// [`DecodeError::UnsupportedMessageType`] as fatal for the connection.
    pub fn decode(body: &[u8]) -> Result<ServerMessage, DecodeError> {
        let (kind, rest) = take::<u32>(body).map_err(DecodeError::malformed)?;
        let msg = match kind {
            SERVER_KIND_AUTH_OK => take_all(rest).map(ServerMessage::AuthOk),
            SERVER_KIND_RESPONSE => take_all(rest).map(ServerMessage::Response),
            SERVER_KIND_ERROR => take_all(rest).map(ServerMessage::Error),
            SERVER_KIND_PONG => take_all(rest).map(|nonce| ServerMessage::Pong { nonce }),
            SERVER_KIND_GO_AWAY => take_all(rest).map(ServerMessage::GoAway),
            kind => return Err(DecodeError::UnsupportedMessageType { kind }),
        };
        let msg = msg.map_err(DecodeError::malformed)?;
        if canonical_len(&msg) != body.len() {
            return Err(DecodeError::malformed(NON_CANONICAL.to_owned()));
        }
        Ok(msg)
    }
}

// ---------------------------------------------------------------------------
// Decoding
// ---------------------------------------------------------------------------

/// Why a frame body did not decode, and so how to answer it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The envelope (message kind, or a non-request payload) does not decode:
    /// answer `protocol_error` and close.
    #[error("malformed message: {reason}")]
    Malformed {
        /// What was wrong, safe to send to the peer.
        reason: String,
    },
    /// A message kind this version does not know: answer
    /// `unsupported_message_type`; the session stays open.
    #[error("unsupported message type {kind}")]
    UnsupportedMessageType {
        /// The kind received.
        kind: u32,
    },
    /// `Auth` for another protocol version: answer `unsupported_version` and close.
    #[error("unsupported protocol version {version}")]
    UnsupportedVersion {
        /// The version the peer asked for.
        version: u32,
    },
    /// A request with an unknown operation tag: answer `invalid_operation`
    /// with the id.
    #[error("request {id}: unknown operation tag {tag}")]
    InvalidOperation {
        /// The request's id.
        id: u64,
        /// The unknown tag.
        tag: u32,
    },
    /// A request whose operation payload does not decode: answer
    /// `invalid_request` with the id.
    #[error("request {id}: {reason}")]
    InvalidRequest {
        /// The request's id.
        id: u64,
        /// What was wrong, safe to send to the peer.
        reason: String,
    },
}

impl DecodeError {
    fn malformed(reason: String) -> Self {
        DecodeError::Malformed { reason }
    }

    /// The wire error code to answer with.
    pub fn code(&self) -> ErrorCode {
        match self {
            DecodeError::Malformed { .. } => ErrorCode::ProtocolError,
            DecodeError::UnsupportedMessageType { .. } => ErrorCode::UnsupportedMessageType,
            DecodeError::UnsupportedVersion { .. } => ErrorCode::UnsupportedVersion,
            DecodeError::InvalidOperation { .. } => ErrorCode::InvalidOperation,
            DecodeError::InvalidRequest { .. } => ErrorCode::InvalidRequest,
        }
    }

    /// The request id, when the error belongs to one request.
    pub fn request_id(&self) -> Option<u64> {
        match self {
            DecodeError::InvalidOperation { id, .. } | DecodeError::InvalidRequest { id, .. } => {
                Some(*id)
            }
            _ => None,
        }
    }

    /// Whether the connection must close after answering.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            DecodeError::Malformed { .. } | DecodeError::UnsupportedVersion { .. }
        )
    }
}

/// What a peer is told about bytes that did not decode: the contract's own
/// words (docs/wire-contract.md §7), never a decoder's internals.
fn describe(e: postcard::Error) -> String {
    use postcard::Error as E;
    if let Some(reason) = take_value_error() {
        return reason.to_owned();
    }
    match e {
        E::DeserializeUnexpectedEnd => "the message ends before its last field",
        E::DeserializeBadVarint => "a varint is longer than its type allows",
        E::DeserializeBadBool => "a bool is neither 0 nor 1",
        E::DeserializeBadChar | E::DeserializeBadUtf8 => "a string is not valid UTF-8",
        E::DeserializeBadOption => "an option tag is neither 0 nor 1",
        E::DeserializeBadEnum => "an enum tag is unknown",
        _ => "a field does not decode",
    }
    .to_owned()
}

/// The reason given for a value encoded in more bytes than it needs.
pub(crate) const NON_CANONICAL: &str =
    "non-canonical encoding: a value is encoded in more bytes than it needs";

/// A postcard flavor that only counts bytes.
struct Count(usize);

impl postcard::ser_flavors::Flavor for Count {
    type Output = usize;
    fn try_push(&mut self, _: u8) -> postcard::Result<()> {
        self.0 += 1;
        Ok(())
    }
    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        self.0 += data.len();
        Ok(())
    }
    fn finalize(self) -> postcard::Result<usize> {
        Ok(self.0)
    }
}

/// The length of `v`'s one canonical encoding. Decoding then comparing
/// this with the bytes consumed refuses every overlong varint (lengths,
/// counts, integers, tags) in one pass, with no allocation.
fn canonical_len<T: Serialize + ?Sized>(v: &T) -> usize {
    postcard::serialize_with_flavor(v, Count(0)).unwrap_or(usize::MAX)
}

/// Bytes of the canonical varint of `n`.
fn varint_len(n: u64) -> usize {
    (64 - (n | 1).leading_zeros() as usize).div_ceil(7)
}

/// Decodes a `T` from the front of `bytes`, returning the rest.
fn take<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<(T, &'a [u8]), String> {
    take_value_error();
    postcard::take_from_bytes(bytes).map_err(describe)
}

/// Decodes a `T` that must use all of `bytes` (postcard's `from_bytes`
/// ignores trailing bytes; we refuse them).
fn take_all<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, String> {
    let (value, rest) = take(bytes)?;
    if rest.is_empty() {
        Ok(value)
    } else {
        Err(trailing(rest))
    }
}

fn trailing(rest: &[u8]) -> String {
    format!("{} trailing bytes after the message", rest.len())
}

/// serde helpers for `Vec<u8>` as postcard bytes (length, raw bytes).
mod as_bytes {
    use serde::de::DeserializeSeed;
    use serde::{Deserializer, Serializer};

    use crate::value::BytesSeed;

    pub(crate) fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        BytesSeed.deserialize(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body_of(msg: &ClientMessage) -> Vec<u8> {
        let mut out = BytesMut::new();
        msg.encode(&mut out, u32::MAX).unwrap();
        out[FRAME_HEADER_LEN..].to_vec()
    }

    #[test]
    fn kind_constants_match_the_enum_order() {
        let cases = [
            (
                ClientMessage::Auth(Auth {
                    version: 1,
                    method: AuthMethod::ApiKey(SecretString::new("k")),
                    client_name: None,
                }),
                CLIENT_KIND_AUTH,
            ),
            (
                ClientMessage::Request(Request {
                    id: 1,
                    op: Operation::ListFunctions,
                    deadline_ms: None,
                }),
                CLIENT_KIND_REQUEST,
            ),
            (ClientMessage::Cancel { id: 1 }, CLIENT_KIND_CANCEL),
            (ClientMessage::Ping { nonce: 1 }, CLIENT_KIND_PING),
            (
                ClientMessage::AuthWithOptions(AuthWithOptions::new(Auth {
                    version: 1,
                    method: AuthMethod::ApiKey(SecretString::new("k")),
                    client_name: None,
                })),
                CLIENT_KIND_AUTH_WITH_OPTIONS,
            ),
        ];
        for (msg, kind) in cases {
            assert_eq!(u32::from(body_of(&msg)[0]), kind, "{msg:?}");
        }
    }

    #[test]
    fn operation_count_matches_the_last_tag() {
        let msg = ClientMessage::Request(Request {
            id: 0,
            op: Operation::Reload,
            deadline_ms: None,
        });
        // kind, id, tag
        assert_eq!(u32::from(body_of(&msg)[2]), OPERATION_COUNT - 1);
    }

    #[test]
    fn secrets_are_redacted_in_debug() {
        let auth = AuthMethod::ApiKey(SecretString::new("npk_abc_supersecret"));
        assert!(!format!("{auth:?}").contains("supersecret"));
    }

    #[test]
    fn each_layer_of_bad_input_gets_its_own_error() {
        // Empty body: no kind.
        assert!(matches!(
            ClientMessage::decode(&[]),
            Err(DecodeError::Malformed { .. })
        ));
        // Unknown kind.
        assert_eq!(
            ClientMessage::decode(&[9]),
            Err(DecodeError::UnsupportedMessageType { kind: 9 })
        );
        // Request without an id.
        assert!(matches!(
            ClientMessage::decode(&[1]),
            Err(DecodeError::Malformed { .. })
        ));
        // Request 5, no tag.
        assert!(matches!(
            ClientMessage::decode(&[1, 5]),
            Err(DecodeError::InvalidRequest { id: 5, .. })
        ));
        // Request 5, unknown tag.
        assert_eq!(
            ClientMessage::decode(&[1, 5, 21]),
            Err(DecodeError::InvalidOperation { id: 5, tag: 21 })
        );
        // Request 5, Invoke with a truncated payload.
        assert!(matches!(
            ClientMessage::decode(&[1, 5, 0, 3, b'a']),
            Err(DecodeError::InvalidRequest { id: 5, .. })
        ));
        // Request 5, ListFunctions, no deadline, then a trailing byte.
        let err = ClientMessage::decode(&[1, 5, 7, 0, 0]).unwrap_err();
        assert!(
            matches!(&err, DecodeError::InvalidRequest { id: 5, reason } if reason.contains("trailing"))
        );
        // Ping with a trailing byte.
        assert!(matches!(
            ClientMessage::decode(&[3, 1, 0]),
            Err(DecodeError::Malformed { .. })
        ));
        // Auth for version 2.
        assert_eq!(
            ClientMessage::decode(&[0, 2]),
            Err(DecodeError::UnsupportedVersion { version: 2 })
        );
    }

    #[test]
    fn value_errors_keep_their_reason_inside_requests() {
        // Request 1, Invoke "f" with one argument nested 100 deep.
        let mut body = vec![1, 1, 0, 1, b'f', 1];
        body.extend(std::iter::repeat_n([6u8, 1], 100).flatten());
        body.extend([0, 0]);
        let err = ClientMessage::decode(&body).unwrap_err();
        assert!(
            matches!(&err, DecodeError::InvalidRequest { id: 1, reason } if reason.contains("nested too deeply")),
            "{err:?}"
        );
    }

    #[test]
    fn encode_over_limit_leaves_the_buffer_untouched() {
        let mut out = BytesMut::from(&b"xy"[..]);
        let msg = ServerMessage::Response(Response {
            id: 1,
            outcome: Outcome::Ok(Value::Bytes(vec![0; 100])),
        });
        assert!(matches!(
            msg.encode(&mut out, 50),
            Err(EncodeError::Frame(FrameError::FrameTooLarge { .. }))
        ));
        assert_eq!(out.as_ref(), b"xy");
    }
}
