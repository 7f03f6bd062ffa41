//! Test and bench support for the netproc workspace (`publish = false`).
//!
//! Every crate's integration tests and benches build the same things: a
//! private CA with a server and a client certificate, a server over real
//! TLS on 127.0.0.1 port 0, an endpoint and a client to it, API keys, a
//! capture of the log, and — in benches — process CPU time and medians. They come from here, so a
//! change to how a server or an endpoint is made lands once.
//!
//! Everything here panics on failure: it is scaffolding for tests, where a
//! failure to set up is a failed test.
//!
//! # Example
//!
//! ```
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! use std::sync::Arc;
//! use netproc_auth::ApiKeyStore;
//! use netproc_server::{CallContext, CallError};
//! use netproc_testkit::{TestPki, key};
//!
//! let pki = TestPki::new();
//! let keys = Arc::new(ApiKeyStore::in_memory());
//! let api_key = key(&keys, "invoke_functions");
//! let server = pki
//!     .server_builder("s1", keys)
//!     .function("add", |_: CallContext, (a, b): (i64, i64)| async move {
//!         Ok::<_, CallError>(a + b)
//!     })
//!     .start()
//!     .await
//!     .unwrap();
//! let s1 = netproc_testkit::only(pki.endpoint(&pki.client, server.local_addr(), &api_key));
//! assert_eq!(s1.call::<i64>("add", (2, 3)).await.unwrap(), 5);
//! # });
//! ```
#![forbid(unsafe_code)]

pub mod bench;
mod logs;
mod pki;
mod services;
mod stats;

pub use logs::log_capture;
pub use pki::{TestPki, key, only, unlimited};
pub use services::{
    AmqpCleanup, PgSchema, TcpProxy, amqp_or_skip, postgres_or_skip, redis_or_skip,
    service_or_skip, service_url,
};
pub use stats::{cpu_micros, env_or, median, percentile};
