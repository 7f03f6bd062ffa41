//! Enrollment for netproc: a new host gets a short-lived certificate for a
//! key that never leaves it, with a one-time token, from an online
//! intermediate CA whose root stays offline.
//!
//! - [`EnrollService`]: its own TLS listener (ALPN `netproc-enroll/1`, a
//!   client certificate optional — the RPC listener always requires one),
//!   strict admission (a connection cap and a per-address window), one
//!   request per connection, every issue and refusal audited (never the
//!   token).
//! - [`TokenStore`]: tokens by the SHA-256 of their secret, single use by
//!   one conditional update, expiring, bound to a name, a profile and
//!   optionally a source network; the certificates issued.
//! - [`enroll_with_token`]: makes the key and a certificate request here,
//!   pins the root by fingerprint, checks what comes back.
//!
//! The protocol is in `docs/wire-contract.md` §11; flows and threat model
//! in `docs/enrollment.md`.
//!
//! ```
//! use std::time::SystemTime;
//! use netproc_enroll::*;
//! use netproc_pki::{CaParams, CertificateAuthority};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let root = CertificateAuthority::generate(&CaParams::new("root"))?; // stays offline
//! let online = root.issue_intermediate(&CaParams::new("online"))?;
//! let store = TokenStore::open(dir.path().join("enroll.db"))?;
//! let service = EnrollService::start(
//!     EnrollConfig::new("127.0.0.1:0".parse()?, vec!["127.0.0.1".into()]),
//!     online,
//!     root.certificate().clone(),
//!     store.clone(),
//! )
//! .await?;
//!
//! // The operator makes a token; the new host enrolls with it.
//! let token = store.create(&TokenSpec::new("alice", Profile::Client), SystemTime::now()).await?;
//! let enrolled = enroll_with_token(&TokenEnrollment::new(
//!     service.local_addr().to_string(),
//!     token.as_str(),
//!     "alice",
//!     Profile::Client,
//!     service.root_fingerprint(),
//! ))
//! .await?;
//! assert_eq!(enrolled.identity()?.cert_identity().common_name.as_deref(), Some("alice"));
//! // A token works once.
//! let again = TokenEnrollment::new(service.local_addr().to_string(), token.as_str(), "alice", Profile::Client, service.root_fingerprint());
//! assert!(matches!(enroll_with_token(&again).await, Err(EnrollError::Refused { code: RefusalCode::InvalidToken, .. })));
//! service.shutdown().await;
//! # Ok(())
//! # }
//! ```
#![forbid(unsafe_code)]
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

mod client;
mod pairing;
#[cfg(feature = "postgres")]
mod pg;
mod service;
mod state;
mod store;
pub mod wire;

pub use client::{
    Enrolled, EnrolledKey, Pairing, PendingPairing, Renewal, TokenEnrollment, enroll_with_token,
    keep_renewed, parse_fingerprint, renew, renew_at, start_pairing,
};
pub use pairing::{Notifier, PairingNotice, pairing_sas};
#[cfg(feature = "postgres")]
pub use pg::PostgresStore;
pub use service::{EnrollConfig, EnrollHandle, EnrollService, KeyRegistrar, KeyRegistration};
pub use state::TokenStore;
pub use store::{KeyGrant, TokenSpec};
pub use wire::RefusalCode;

/// What kind of certificate a token or a request is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Profile {
    /// clientAuth only, with exactly the token's name.
    Client,
    /// serverAuth, with the token's DNS names and IP addresses.
    Server,
}

impl Profile {
    /// `client` or `server`.
    pub fn as_str(self) -> &'static str {
        match self {
            Profile::Client => "client",
            Profile::Server => "server",
        }
    }

    /// From `client` or `server`.
    pub fn parse(text: &str) -> Option<Profile> {
        match text {
            "client" => Some(Profile::Client),
            "server" => Some(Profile::Server),
            _ => None,
        }
    }
}

/// Enrollment failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EnrollError {
    /// The service refused, with a stable code.
    #[error("{code}: {message}")]
    Refused {
        /// Why.
        code: RefusalCode,
        /// For humans.
        message: String,
    },
    /// Something given was not valid (a name, a spec, a setting).
    #[error("{0}")]
    Invalid(String),
    /// Certificates or keys.
    #[error(transparent)]
    Pki(#[from] netproc_pki::PkiError),
    /// The network.
    #[error("{0}")]
    Io(String),
    /// The TLS handshake failed (e.g. the root is not the pinned one).
    #[error("TLS: {0}")]
    Tls(String),
    /// The service's answer made no sense.
    #[error("protocol: {0}")]
    Protocol(String),
    /// The state database.
    #[error("state: {0}")]
    State(String),
}

/// A name: 1 to 64 of `[a-z0-9._-]`, starting with a letter or digit.
pub(crate) fn check_name(name: &str) -> Result<(), EnrollError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
        });
    if ok {
        Ok(())
    } else {
        Err(EnrollError::Invalid(format!(
            "name {:?}: 1 to 64 of [a-z0-9._-], starting with a letter or digit",
            name.chars().take(64).collect::<String>()
        )))
    }
}

/// A DNS name: labels of `[A-Za-z0-9-]`, at most 253 bytes.
pub(crate) fn check_dns_name(name: &str) -> Result<(), EnrollError> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        });
    if ok {
        Ok(())
    } else {
        Err(EnrollError::Invalid(format!("{name:?} is not a DNS name")))
    }
}
