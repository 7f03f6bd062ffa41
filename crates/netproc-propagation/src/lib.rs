//! Credential propagation for netproc: an authority that keeps API keys and
//! Ed25519 keys in step across a fleet of servers.
//!
//! This release holds the part both ends agree on: the signed event
//! envelope and the target-side check that turns a delivery into an
//! acknowledgement. Events never carry a secret — only the SHA-256 of an API
//! key's secret, or an Ed25519 public key. The authority, its durable store
//! and the transports arrive in a later version.
//!
//! ```
//! use std::time::{Duration, SystemTime};
//! use netproc_pki::Ed25519Key;
//! use netproc_propagation::{Ack, Check, Event, EventKind, Verifier, sign};
//!
//! let authority = Ed25519Key::generate()?;
//! let now = SystemTime::now();
//! let event = Event::new("server_1", 1, now, EventKind::Delete { id: "k1".into() });
//! let signed = sign(&event, &authority)?;
//!
//! // On the target: trusted authority keys, its own name, a freshness window.
//! let verifier = Verifier::new("server_1", vec![authority.public_key()], Duration::from_secs(300));
//! match verifier.check(&signed, 0, now) {
//!     Check::Apply(e) => assert_eq!(e.seq, 1), // apply, persist cursor = 1, then ack Applied
//!     Check::Ack(ack) => panic!("refused: {ack:?}"),
//! }
//! // The same delivery again is a duplicate: nothing to do.
//! assert!(matches!(verifier.check(&signed, 1, now), Check::Ack(Ack::Duplicate)));

//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![forbid(unsafe_code)]
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

mod authority;
mod db;
mod event;
mod target;
mod transport;
mod wire;

pub use authority::{
    Authority, AuthorityConfig, AuthorityError, CredentialInfo, CredentialSpec, DeliveryState,
    Ensured, SyncReport, TargetDelivery, TargetState, TargetSync,
};
pub use transport::{LocalTransport, NetprocTransport, Transport, TransportError};

pub use event::{
    Ack, Check, Credential, EncodeError, Event, EventKind, RejectReason, SignedEvent, Verifier,
    sign,
};
pub use target::{DEFAULT_FRESHNESS, PropagationTarget, TargetConfig, TargetError};
pub use wire::{Delivery, DeliveryReply, EXTENSION, MAX_EVENTS_PER_DELIVERY};
