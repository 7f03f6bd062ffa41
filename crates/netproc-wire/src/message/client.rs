//! Client → server: the messages a client sends.

use std::fmt;

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::Value;

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

pub(super) const CLIENT_KIND_AUTH: u32 = 0;
pub(super) const CLIENT_KIND_REQUEST: u32 = 1;
pub(super) const CLIENT_KIND_CANCEL: u32 = 2;
pub(super) const CLIENT_KIND_PING: u32 = 3;
pub(super) const CLIENT_KIND_AUTH_WITH_OPTIONS: u32 = 4;

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
    /// The protocol version the client speaks: [`PROTOCOL_VERSION`](crate::PROTOCOL_VERSION).
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
    #[serde(with = "super::codec::as_bytes")]
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
        #[serde(with = "super::codec::as_bytes")]
        payload: Vec<u8>,
    },
    /// Tag 20 (admin): reload the server's certificate, client CAs, CRLs and
    /// key store from their sources.
    Reload,
    /// Tag 21: who the server takes the caller to be (principal, key,
    /// privileges, allow-list, expiry, certificate binding) and the
    /// server's clock. Any authenticated caller may ask. A server that
    /// predates it answers `invalid_operation`.
    WhoAmI,
}

/// Number of operation tags this version knows.
pub(crate) const OPERATION_COUNT: u32 = 22;

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
            Operation::WhoAmI => "whoami",
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
