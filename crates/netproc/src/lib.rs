//! netproc: secure remote procedure calls over mutual TLS with a private
//! certificate authority.
//!
//! This facade re-exports the netproc crates, so an application depends on
//! one crate. What is available today:
//!
//! - [`wire`]: the netproc/1 protocol, sans-I/O (frames, messages, `Value`,
//!   error codes, privileges).
//! - [`pki`]: the private CA, PEM handling and strict rustls configurations.
//!
//! The server, client, authentication, abuse controls, scripts and credential
//! propagation arrive as their crates fill in; they will be re-exported here.
//!
//! # Example
//!
//! ```
//! use netproc::pki::{CaParams, CertificateAuthority, LeafParams};
//! use netproc::wire::{ClientMessage, ServerMessage};
//!
//! let ca = CertificateAuthority::generate(&CaParams::new("my CA")).unwrap();
//! let client = ca.issue(&LeafParams::client("alice")).unwrap();
//! assert_eq!(client.cert_identity().common_name.as_deref(), Some("alice"));
//!
//! let mut buf = bytes::BytesMut::new();
//! ClientMessage::Ping { nonce: 1 }.encode(&mut buf, 1024).unwrap();
//! assert_eq!(ClientMessage::decode(&buf[4..]).unwrap(), ClientMessage::Ping { nonce: 1 });
//! # let _ = ServerMessage::Pong { nonce: 1 };
//! ```
#![forbid(unsafe_code)]
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

pub use netproc_pki as pki;
pub use netproc_wire as wire;
