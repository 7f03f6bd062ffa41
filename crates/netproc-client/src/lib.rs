//! The netproc client: call functions on named servers over mutual TLS.
//!
//! Configure each server with a [`ServerEndpoint`] (address, certificate
//! name, this client's certificate, the CA that signs the server's, and an
//! API key). A [`Client`] connects lazily on first use — concurrent first
//! calls share one attempt — authenticates, and multiplexes calls over one
//! connection per server, respecting the in-flight limit the server
//! announces by queuing locally. Each call has a deadline; dropping a call's
//! future sends `Cancel`.
//!
//! [`Client::all_servers`] runs an operation on every server at once and
//! returns one result per server, never failing fast. Errors are typed
//! ([`ClientError`]) and serialize to the reference's `{code, message,
//! details}` shape; [`ServerOutcome`] gives the `{state: ok|error}` form.
//!
//! # Example
//!
//! ```
//! use netproc_auth::{ApiKeyStore, KeySpec};
//! use netproc_client::{Client, ServerEndpoint};
//! use netproc_pki::{CaParams, CertificateAuthority, LeafParams};
//! use netproc_server::{CallContext, CallError, Server};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let ca = CertificateAuthority::generate(&CaParams::new("my CA"))?;
//! let server_cert = ca.issue(&LeafParams::server("api", ["localhost"]))?;
//! let client_cert = ca.issue(&LeafParams::client("alice"))?;
//! let keys = ApiKeyStore::in_memory();
//! let (_, key) = keys.create(KeySpec::new("invoke_functions".parse()?))?;
//!
//! let server = Server::builder("api", server_cert.identity()?, ca.trust_anchors(), keys)
//!     .function("add", |_: CallContext, (a, b): (i64, i64)| async move { Ok::<_, CallError>(a + b) })
//!     .start()
//!     .await?;
//!
//! let client = Client::builder()
//!     .server("api", ServerEndpoint::new(
//!         server.local_addr(), "localhost", client_cert.identity()?, ca.trust_anchors(), key.to_secret(),
//!     ))
//!     .build()?;
//! let sum: i64 = client.server("api")?.call("add", (2, 3)).await?;
//! assert_eq!(sum, 5);
//! # server.shutdown(std::time::Duration::from_secs(1)).await;
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

mod client;
mod connection;
mod endpoint;
mod error;
mod fan_out;
mod server_ref;
mod slot;

// The public interface.
pub use client::{ALL_SERVERS, Client, ClientBuilder};
pub use endpoint::{InvalidServerAddr, ServerAddr, ServerEndpoint};
pub use error::{ClientError, ServerOutcome, TlsFailure};
pub use fan_out::{AllServers, FanOut};
pub use server_ref::ServerRef;
