//! Authentication and authorisation for netproc.
//!
//! A netproc client authenticates twice: with its certificate in the TLS
//! handshake, then with a credential inside the channel. This crate decides
//! the second step and what follows from it:
//!
//! - [`Authenticator`]: the async trait a server calls with the presented
//!   [`Credential`], the peer address and the verified certificate
//!   ([`AuthRequest`]); it returns a [`Principal`] or refuses. Usable as
//!   `Arc<dyn Authenticator>`; [`authenticator_fn`] adapts an async closure.
//! - [`ApiKeyStore`]: the built-in authenticator. Keys `npk_<id>_<secret>`,
//!   stored as SHA-256 hashes, compared in constant time, optionally bound to
//!   a certificate ([`CertBinding`]), expiring, with per-key privileges and
//!   function allow-lists; create / list / rotate / revoke; a JSON file
//!   written 0600.
//! - [`PrivilegeSet`] and [`authorize`]: the one check every operation passes.
//!
//! # Example
//!
//! ```
//! use std::sync::Arc;
//! use std::time::SystemTime;
//! use netproc_auth::*;
//! use netproc_pki::{CaParams, CertificateAuthority, LeafParams};
//! use netproc_wire::Operation;
//!
//! let ca = CertificateAuthority::generate(&CaParams::new("ca")).unwrap();
//! let alice = ca.issue(&LeafParams::client("alice")).unwrap();
//! let mallory = ca.issue(&LeafParams::client("mallory")).unwrap();
//!
//! let store = ApiKeyStore::in_memory();
//! let spec = KeySpec::new("invoke_functions".parse().unwrap())
//!     .binding(CertBinding::Fingerprint(alice.cert_identity().fingerprint));
//! let (_, key) = store.create(spec).unwrap();
//!
//! // Over alice's certificate the key works; over mallory's it does not.
//! let principal = store.verify(key.expose(), alice.cert_identity(), SystemTime::now()).unwrap();
//! assert!(store.verify(key.expose(), mallory.cert_identity(), SystemTime::now()).is_err());
//!
//! let call = Operation::Invoke { function: "add".into(), args: vec![] };
//! assert!(authorize(&principal, &call).is_ok());
//! assert!(authorize(&principal, &Operation::ListSessions).is_err());
//! ```
#![forbid(unsafe_code)]
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

mod authenticator;
mod authorize;
mod keystore;
mod privileges;

// The public interface.
pub use authenticator::{
    AuthRejected, AuthRequest, Authenticator, BoxFuture, Credential, FnAuthenticator, Principal,
    authenticator_fn,
};
pub use authorize::{InsufficientPrivileges, authorize, authorize_privilege, required_privilege};
pub use keystore::{
    ApiKey, ApiKeyStore, CertBinding, ED25519_FRESHNESS, KeyChange, KeyInfo, KeySpec,
    KeyStoreError, PreviousSecret, PropagatedChange, PropagatedKey, PropagatedSecret,
    PropagationError, valid_key_id,
};
pub use privileges::PrivilegeSet;
