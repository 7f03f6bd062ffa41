//! netproc: secure remote procedure calls over mutual TLS with a private
//! certificate authority.
//!
//! Servers expose functions; clients authenticate twice — a certificate in
//! the TLS 1.3 handshake, then an API key inside the channel — and every
//! operation is checked against the caller's privileges. This facade
//! re-exports the netproc crates so an application depends on one crate:
//!
//! - [`server`]: the server (functions, sessions, shutdown).
//! - [`client`]: the client (named servers, `all_servers`, typed errors).
//! - [`auth`]: privileges, the `Authenticator` trait, the API-key store.
//! - [`pki`]: the private CA, PEM handling, strict rustls configurations.
//! - [`wire`]: the netproc/1 protocol, sans-I/O.
//! - [`limits`]: rate-limiting building blocks.
//! - [`script`]: the sandboxed script runtime for run-time defined functions.
//! - [`propagation`]: credential propagation from an authority to a fleet
//!   of servers (signed events, delivery, the receiving target).
//! - [`config`]: TOML files for servers, clients and the authority, as
//!   `netproc serve`, `netproc call` and `netproc authority` read them.
//!
//! # Example
//!
//! ```
//! use netproc::auth::{ApiKeyStore, KeySpec};
//! use netproc::client::{Client, ServerEndpoint};
//! use netproc::pki::{CaParams, CertificateAuthority, LeafParams};
//! use netproc::server::{CallContext, CallError, Server};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // A private CA, a server certificate and a client certificate.
//! let ca = CertificateAuthority::generate(&CaParams::new("my CA"))?;
//! let server_cert = ca.issue(&LeafParams::server("api", ["localhost"]))?;
//! let client_cert = ca.issue(&LeafParams::client("alice"))?;
//!
//! // An API key that may invoke functions.
//! let keys = ApiKeyStore::in_memory();
//! let (_, key) = keys.create(KeySpec::new("invoke_functions".parse()?))?;
//!
//! let server = Server::builder("api", server_cert.identity()?, ca.trust_anchors(), keys)
//!     .function("greet", |ctx: CallContext, (name,): (String,)| async move {
//!         Ok::<_, CallError>(format!("hello {name}, you are {}", ctx.principal().id))
//!     })
//!     .start()
//!     .await?;
//!
//! let client = Client::builder()
//!     .server("api", ServerEndpoint::new(
//!         server.local_addr(), "localhost", client_cert.identity()?, ca.trust_anchors(), key.to_secret(),
//!     ))
//!     .build()?;
//! let greeting: String = client.server("api")?.call("greet", ("alice",)).await?;
//! assert!(greeting.starts_with("hello alice"));
//! server.shutdown(std::time::Duration::from_secs(1)).await;
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

pub mod config;

pub use netproc_auth as auth;
pub use netproc_client as client;
pub use netproc_enroll as enroll;
pub use netproc_limits as limits;
pub use netproc_pki as pki;
pub use netproc_propagation as propagation;
pub use netproc_script as script;
pub use netproc_server as server;
pub use netproc_wire as wire;
