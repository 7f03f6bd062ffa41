//! The netproc server: mutual-TLS listener, authentication, per-connection sessions, native and script functions, abuse controls and graceful shutdown.
//!
//! It will own the listener, admission, the TLS handshake and authentication with timeouts, the multiplexed per-connection session, native functions, the protocol's operations, abuse metrics, audit events, graceful shutdown and the server's state database.
//!
//! This crate is part of [netproc](https://github.com/netproc/netproc). It is
//! a placeholder in this release: its API arrives with a later version, and
//! nothing here is stable yet.
#![forbid(unsafe_code)]
#![cfg_attr(not(test), warn(clippy::unwrap_used))]
