//! Who is calling: credentials, principals and the `Authenticator` trait.

use std::collections::BTreeSet;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::SystemTime;

use netproc_pki::CertIdentity;
use netproc_wire::SecretString;

use crate::PrivilegeSet;

/// A boxed, sendable future, as returned by [`Authenticator::authenticate`].
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What a client presented inside the TLS channel.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Credential {
    /// An API key, `npk_<id>_<secret>`.
    ApiKey(SecretString),
    /// A proof of possession of a registered Ed25519 key, with the TLS
    /// exporter value of the connection it arrived on (computed by the
    /// server, never taken from the client).
    Ed25519 {
        /// What the client sent.
        proof: netproc_wire::Ed25519Proof,
        /// This connection's exporter value
        /// ([`AUTH_EXPORTER_LABEL`](netproc_pki::AUTH_EXPORTER_LABEL), 32 bytes).
        channel_binding: [u8; 32],
    },
}

/// Everything an authenticator may look at.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct AuthRequest {
    /// The presented credential.
    pub credential: Credential,
    /// The peer's address.
    pub peer: SocketAddr,
    /// The verified client certificate: subject, SANs, serial, fingerprint.
    pub cert: Arc<CertIdentity>,
}

impl AuthRequest {
    /// A request, as the server builds it.
    pub fn new(credential: Credential, peer: SocketAddr, cert: Arc<CertIdentity>) -> AuthRequest {
        AuthRequest {
            credential,
            peer,
            cert,
        }
    }
}

/// An authenticated caller. Fixed for the life of its session.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Principal {
    /// A stable id (for an API key: its key id).
    pub id: String,
    /// What it may do.
    pub privileges: PrivilegeSet,
    /// If set, the only functions it may call.
    pub functions: Option<BTreeSet<String>>,
    /// When its credential expires.
    pub expires_at: Option<SystemTime>,
    /// The API key id it authenticated with, if any.
    pub key_id: Option<String>,
    /// The generation of that key's secret (incremented by each rotation).
    pub key_generation: Option<u64>,
    /// Overrides the server's `max_sessions_per_principal` (0 = no cap).
    pub max_sessions: Option<u32>,
    /// Overrides the server's `single_active_session`.
    pub single_active_session: Option<bool>,
    /// The certificate its key is bound to, as written in the key store
    /// (`sha256:…`, `dns:…`, …), if any: for `whoami`.
    pub cert_binding: Option<String>,
}

impl Principal {
    /// A principal with these privileges and no other attributes.
    pub fn new(id: impl Into<String>, privileges: PrivilegeSet) -> Principal {
        Principal {
            id: id.into(),
            privileges,
            functions: None,
            expires_at: None,
            key_id: None,
            key_generation: None,
            max_sessions: None,
            single_active_session: None,
            cert_binding: None,
        }
    }

    /// Restricts the functions it may call.
    pub fn with_functions<I: IntoIterator<Item = S>, S: Into<String>>(
        mut self,
        functions: I,
    ) -> Principal {
        self.functions = Some(functions.into_iter().map(Into::into).collect());
        self
    }

    /// Sets an expiry.
    pub fn with_expiry(mut self, expires_at: SystemTime) -> Principal {
        self.expires_at = Some(expires_at);
        self
    }

    /// Records the API key (and secret generation) it authenticated with.
    pub fn with_key(mut self, key_id: impl Into<String>, generation: u64) -> Principal {
        self.key_id = Some(key_id.into());
        self.key_generation = Some(generation);
        self
    }

    /// Whether it may call `function` (its allow-list, if any, names it).
    pub fn may_call(&self, function: &str) -> bool {
        self.functions.as_ref().is_none_or(|f| f.contains(function))
    }
}

/// Authentication refused. The peer is told only `authentication_failed`;
/// `reason` goes to the audit log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("authentication refused: {reason}")]
#[non_exhaustive]
pub struct AuthRejected {
    /// Why, for the audit log only. Never contains a secret.
    pub reason: String,
    /// Whether the failure counts against the API key id it claimed (for
    /// the failed-auth blocklist). False when the key is bound to another
    /// certificate: holders of other certificates must not be able to lock
    /// a bound key out.
    pub counts_against_key: bool,
}

impl AuthRejected {
    /// A refusal with an audit reason, counting against the claimed key.
    pub fn new(reason: impl Into<String>) -> AuthRejected {
        AuthRejected {
            reason: reason.into(),
            counts_against_key: true,
        }
    }

    /// Marks the failure as not counting against the claimed key.
    pub fn not_against_key(mut self) -> AuthRejected {
        self.counts_against_key = false;
        self
    }
}

/// Decides who a connecting client is.
///
/// Usable as `Arc<dyn Authenticator>`. An implementation that returns an
/// error or panics refuses the client (`authentication_failed`); it never
/// takes the server down.
pub trait Authenticator: Send + Sync + 'static {
    /// Authenticates one request.
    fn authenticate<'a>(
        &'a self,
        request: AuthRequest,
    ) -> BoxFuture<'a, Result<Principal, AuthRejected>>;

    /// Whether a key id (API key or Ed25519 key) exists: `Some(true)` or
    /// `Some(false)`, or `None` if this authenticator cannot tell (the
    /// default).
    ///
    /// The server uses it for the failed-authentication blocklist: a failure
    /// counts against a key id only when the id is known to exist, so that
    /// made-up ids cannot fill the per-key table; failures with unknown ids
    /// (or when the answer is `None`) count against the address only. Key
    /// ids are not secret; this must be cheap and must not block.
    fn knows_key_id(&self, key_id: &str) -> Option<bool> {
        let _ = key_id;
        None
    }
}

impl<A: Authenticator + ?Sized> Authenticator for Arc<A> {
    fn authenticate<'a>(
        &'a self,
        request: AuthRequest,
    ) -> BoxFuture<'a, Result<Principal, AuthRejected>> {
        (**self).authenticate(request)
    }

    fn knows_key_id(&self, key_id: &str) -> Option<bool> {
        (**self).knows_key_id(key_id)
    }
}

/// An [`Authenticator`] from an async closure.
///
/// ```
/// use netproc_auth::{authenticator_fn, AuthRejected, Credential, Principal, PrivilegeSet};
///
/// let auth = authenticator_fn(|req| async move {
///     let Credential::ApiKey(key) = &req.credential else {
///         return Err(AuthRejected::new("unsupported credential"));
///     };
///     if key.expose() == "let-me-in" {
///         Ok(Principal::new("demo", "invoke_functions".parse().unwrap()))
///     } else {
///         Err(AuthRejected::new("wrong key"))
///     }
/// });
/// # let _: std::sync::Arc<dyn netproc_auth::Authenticator> = std::sync::Arc::new(auth);
/// ```
pub fn authenticator_fn<F, Fut>(f: F) -> FnAuthenticator<F>
where
    F: Fn(AuthRequest) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Principal, AuthRejected>> + Send + 'static,
{
    FnAuthenticator(f)
}

/// See [`authenticator_fn`].
pub struct FnAuthenticator<F>(F);

impl<F> fmt::Debug for FnAuthenticator<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FnAuthenticator")
    }
}

impl<F, Fut> Authenticator for FnAuthenticator<F>
where
    F: Fn(AuthRequest) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Principal, AuthRejected>> + Send + 'static,
{
    fn authenticate<'a>(
        &'a self,
        request: AuthRequest,
    ) -> BoxFuture<'a, Result<Principal, AuthRejected>> {
        Box::pin((self.0)(request))
    }
}
