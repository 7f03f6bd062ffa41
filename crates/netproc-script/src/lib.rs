//! Sandboxed run-time defined functions for netproc, on the Rhai scripting
//! engine.
//!
//! An authorised client may define a function at run time; everyone with
//! `invoke_functions` may then call it. This crate compiles such functions
//! (Rhai source: one or more `fn` definitions, one named like the function),
//! keeps the dependencies they import, and runs calls on a bounded pool of
//! dedicated worker threads under sandbox limits ([`ScriptLimits`]):
//! operations, call depth, expression depth, string/array/map sizes and
//! wall-clock time, checked together with the caller's deadline and
//! cancellation. Scripts have no file, network or process access; `import`
//! resolves only defined dependencies; server constants are readable with
//! `constant("name")`.
//!
//! Errors map to the protocol's codes ([`ScriptError::code`]): a syntax error
//! is `invalid_argument` with line and column, a `throw` is
//! `operation_failed`, a deadline is `timeout`, a sandbox limit is
//! `script_error` with `details.kind`.
//!
//! # Example
//!
//! ```
//! use std::collections::BTreeMap;
//! use std::sync::Arc;
//! use std::time::{Duration, Instant};
//! use netproc_script::{DependencySource, ScriptError, ScriptRuntime};
//! use netproc_wire::Value;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let runtime = ScriptRuntime::builder().workers(1).build();
//! runtime.define_dependency("geo", &DependencySource::Script("fn sq(x) { x * x }".into())).unwrap();
//! let f = Arc::new(runtime.compile("hyp2", r#"
//!     fn hyp2(a, b) { import "geo" as g; g::sq(a) + g::sq(b) }
//! "#).unwrap());
//! let deadline = Instant::now() + Duration::from_secs(1);
//! let call = runtime.call(&f, vec![Value::Int(3), Value::Int(4)], Arc::new(BTreeMap::new()), deadline);
//! assert_eq!(call.unwrap().await.unwrap(), Value::Int(25));
//!
//! let spin = Arc::new(runtime.compile("spin", "fn spin() { loop {} }").unwrap());
//! let call = runtime.call(&spin, vec![], Arc::new(BTreeMap::new()), deadline);
//! assert!(matches!(call.unwrap().await, Err(ScriptError::Limit { kind: "operations_exceeded", .. }) | Err(ScriptError::Timeout)));
//! # }
//! ```
#![forbid(unsafe_code)]
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

mod convert;
mod error;
mod host;
mod lang;
mod limits;
mod rhai_lang;
mod runtime;

// The public interface.
pub use error::ScriptError;
pub use host::{HostModule, MAX_HOST_ARGS};
pub use lang::DependencySource;
pub use limits::ScriptLimits;
pub use runtime::{ScriptFunction, ScriptRuntime, ScriptRuntimeBuilder};
