//! The answer to [`Operation::WhoAmI`](crate::Operation::WhoAmI).

use serde::{Deserialize, Serialize};

/// Who the server takes the caller to be, and its clock: the result of
/// [`Operation::WhoAmI`](crate::Operation::WhoAmI), carried as a `Value`
/// map with these keys (a reader ignores keys it does not know, so later
/// servers may add some).
///
/// ```
/// use netproc_wire::{WhoAmI, from_value, to_value};
///
/// let me = WhoAmI {
///     principal: "k1".into(),
///     key_id: Some("k1".into()),
///     key_generation: Some(1),
///     privileges: vec!["invoke_functions".into()],
///     functions: None,
///     expires_at_ms: None,
///     cert_binding: None,
///     cert_fingerprint: "ab12…".into(),
///     cert_not_after_ms: 1_900_000_000_000,
///     session_id: 7,
///     server_name: "api".into(),
///     server_time_ms: 1_800_000_000_000,
/// };
/// let back: WhoAmI = from_value(to_value(&me).unwrap()).unwrap();
/// assert_eq!(back, me);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WhoAmI {
    /// The principal's id.
    pub principal: String,
    /// The API or Ed25519 key the session authenticated with.
    pub key_id: Option<String>,
    /// That key's secret generation (one more per rotation).
    pub key_generation: Option<u64>,
    /// The principal's privileges, by name.
    pub privileges: Vec<String>,
    /// If set, the only functions the principal may call.
    pub functions: Option<Vec<String>>,
    /// When the credential expires, in unix milliseconds.
    pub expires_at_ms: Option<u64>,
    /// The certificate the key is bound to (`sha256:…`, `dns:…`, …), if any.
    pub cert_binding: Option<String>,
    /// SHA-256 of the client certificate the server verified, hex.
    pub cert_fingerprint: String,
    /// When that certificate expires, in unix milliseconds.
    pub cert_not_after_ms: u64,
    /// The session's id.
    pub session_id: u64,
    /// The server's name.
    pub server_name: String,
    /// The server's clock when it answered, in unix milliseconds (for
    /// clock-skew checks).
    pub server_time_ms: u64,
}
