//! The netproc server: functions exposed over mutual TLS, every call
//! authenticated and authorised.
//!
//! A client connects with a certificate from your private CA (verified in
//! the TLS 1.3 handshake, with CRLs), then authenticates inside the channel
//! with a credential your [`Authenticator`](netproc_auth::Authenticator)
//! accepts (for example an [`ApiKeyStore`](netproc_auth::ApiKeyStore)). Each
//! request is checked against the principal's privileges, then dispatched to
//! a native async Rust function.
//!
//! - Many requests run concurrently on one connection, each with a deadline
//!   and cancellation; responses are written in completion order, batched.
//! - Bad input gets the protocol's typed errors; a function's panic answers
//!   `internal` for that request only.
//! - Memory per connection is bounded: frame limits before and after
//!   authentication, an in-flight cap, and an outbound byte budget past which
//!   the server stops reading a connection that does not read its responses.
//! - [`ServerHandle::close_sessions`] ends chosen sessions with a reason;
//!   [`ServerHandle::shutdown`] stops gracefully with `GoAway`.
//! - Audit events go to the `tracing` target [`AUDIT_TARGET`].
//!
//! # Example
//!
//! ```
//! use netproc_auth::{ApiKeyStore, KeySpec, PrivilegeSet};
//! use netproc_pki::{CaParams, CertificateAuthority, LeafParams};
//! use netproc_server::{CallContext, CallError, Server};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let ca = CertificateAuthority::generate(&CaParams::new("my CA"))?;
//! let cert = ca.issue(&LeafParams::server("api", ["localhost", "127.0.0.1"]))?;
//! let keys = ApiKeyStore::in_memory();
//! let (_, api_key) = keys.create(KeySpec::new("invoke_functions".parse()?))?;
//!
//! let server = Server::builder("api", cert.identity()?, ca.trust_anchors(), keys)
//!     .function("add", |_ctx: CallContext, (a, b): (i64, i64)| async move {
//!         Ok::<_, CallError>(a + b)
//!     })
//!     .start()
//!     .await?;
//! println!("listening on {}; give clients {}", server.local_addr(), "their key");
//! # let _ = api_key;
//! server.shutdown(std::time::Duration::from_secs(1)).await;
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

mod abuse;
mod admin_ops;
#[cfg(unix)]
mod admin_socket;
mod audit;
mod connection;
mod error;
#[cfg(feature = "shared-limits")]
mod fleet;
mod frames;
mod function;
mod liveness;
mod lograte;

mod options;
mod outbox;
mod proxy_protocol;
mod refusal;
mod reload;
mod scripts;
mod server;
mod session;
mod sessions;
mod shared;
mod state;
mod time;

// The public interface.
pub use abuse::AbuseMetrics;
pub use audit::AUDIT_TARGET;
#[cfg(unix)]
pub use error::AdminSocketError;
pub use error::{RegistrationProblem, ReloadError, ServerError};
#[cfg(feature = "shared-limits")]
pub use fleet::SharedLimits;
pub use function::{CallContext, CallError, ExtensionHandler, NativeFunction};
pub use liveness::{Liveness, LivenessEvent};
pub use options::{
    AuthControls, BucketControls, ConnectionControls, InvalidOption, PrincipalSource,
    RequestControls, ServerOptions, SessionControls,
};
pub use proxy_protocol::{InvalidTrustedProxy, TrustedProxy};
pub use server::{Server, ServerBuilder, ServerHandle};
pub use sessions::{SessionInfo, SessionSelector};
pub use shared::{ReloadMaterial, ReloadReport, ReloadSource};
pub use state::StateDatabase;

/// For the fuzz targets under `fuzz/` only (feature `fuzzing`): feeds
/// `data` to the authentication exchange as a first frame. Not API.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub fn fuzz_auth_exchange(data: &[u8]) {
    connection::exercise_auth_exchange(data);
}
