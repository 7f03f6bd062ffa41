//! Credential propagation for netproc: an authority that keeps API keys and
//! Ed25519 keys in step across a fleet of servers.
//!
//! - [`Authority`] (full mode): the source of truth. [`ensure`](Authority::ensure),
//!   [`rotate`](Authority::rotate), [`revoke`](Authority::revoke) commit to its
//!   own SQLite database; [`sync`](Authority::sync) and [`run`](Authority::run)
//!   deliver one signed event per change per target, with per-target `seq`,
//!   acknowledgements, retries with backoff, and snapshots for new or reset
//!   targets; [`status`](Authority::status) says where each credential stands.
//! - [`PropagationTarget`] (receive-only): installed on a netproc server, it
//!   checks each event ([`Verifier`]: trusted signer, signature over the exact
//!   bytes, target name, freshness, order), commits keys and cursor to the
//!   server's state database, and applies them to the live
//!   [`ApiKeyStore`](netproc_auth::ApiKeyStore) — revoked, rotated and changed
//!   keys end their sessions.
//! - [`Transport`]: bytes to a named target and back. [`NetprocTransport`]
//!   uses netproc's own mTLS channel; [`LocalTransport`] stays in-process;
//!   with the `amqp` feature, `AmqpTransport` and `AmqpReceiver` carry the
//!   same signed events through RabbitMQ for targets the authority cannot
//!   dial (replies signed by each target's own key); [`MixedTransport`]
//!   gives each target its own.
//!
//! Events never carry a secret: an API key travels as the SHA-256 of its
//! secret, an Ed25519 key as its public key. See `docs/propagation.md`.
//!
//! ```
//! use std::sync::Arc;
//! use std::time::SystemTime;
//! use netproc_auth::ApiKeyStore;
//! use netproc_pki::{CaParams, CertificateAuthority, Ed25519Key, LeafParams};
//! use netproc_propagation::*;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let signing = Ed25519Key::generate()?;
//!
//! // A target: a server's key store and state directory.
//! let store = Arc::new(ApiKeyStore::in_memory());
//! let state = netproc_server::StateDatabase::open(dir.path())?;
//! let target = PropagationTarget::open(
//!     TargetConfig::new("server_1", vec![signing.public_key()]),
//!     Arc::clone(&store),
//!     &state,
//! )?;
//! let mut transport = LocalTransport::new(); // NetprocTransport over mTLS in production
//! transport.add(target);
//!
//! // The authority: its database, its signing key, its targets.
//! let config = AuthorityConfig::new(dir.path().join("authority.db"), vec!["server_1".into()]);
//! let authority = Authority::open(config, signing, Arc::new(transport))?;
//! let created = authority
//!     .ensure(CredentialSpec::api_key("billing", "invoke_functions".parse::<netproc_auth::PrivilegeSet>()?), &["server_1"])
//!     .await?;
//! let key = created.api_key.expect("a new API key is returned once");
//! assert!(authority.sync().await.all_ok());
//!
//! // The key now works on the target, which only ever saw its hash.
//! let cert = CertificateAuthority::generate(&CaParams::new("ca"))?.issue(&LeafParams::client("c"))?;
//! assert!(store.verify(key.expose(), cert.cert_identity(), SystemTime::now()).is_ok());
//! assert_eq!(authority.status("billing").await?[0].state, DeliveryState::Success);
//! # Ok(())
//! # }
//! ```
#![forbid(unsafe_code)]
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

#[cfg(feature = "amqp")]
mod amqp;
mod authority;
mod db;
mod delivery;
mod event;
mod plan;
#[cfg(feature = "postgres")]
mod postgres;
mod query;
mod requests;
mod sql;
mod sqlite;
mod store;
mod target;
mod transport;
mod types;
mod wire;

#[cfg(feature = "amqp")]
pub use amqp::{
    AmqpConfig, AmqpError, AmqpOutcome, AmqpReceiver, AmqpReply, AmqpRequest, AmqpTransport,
    MAX_AMQP_MESSAGE,
};
pub use authority::Authority;
pub use transport::{
    LocalTransport, MixedTransport, NetprocTransport, Outgoing, Transport, TransportError,
};
pub use types::{
    AuthorityConfig, AuthorityError, ChangeRecord, CredentialInfo, CredentialSpec, DatabaseError,
    DeliveryState, Ensured, LeaderInfo, PostgresOptions, SyncReport, TargetDelivery, TargetState,
    TargetSync,
};

pub use event::{
    Ack, CertRef, Check, Credential, EncodeError, EpochEvent, Event, EventKind, RejectReason,
    SignError, SignedEvent, Signer, Verifier, sign, sign_with_epoch,
};
pub use target::{DEFAULT_FRESHNESS, PropagationTarget, TargetConfig, TargetError};
pub use wire::{
    Delivery, DeliveryReply, EXTENSION, EXTENSION_V2, EXTENSION_V3, MAX_EVENTS_PER_DELIVERY,
};
