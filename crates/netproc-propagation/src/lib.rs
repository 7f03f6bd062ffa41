//! Credential propagation for netproc: an authority that keeps API keys and Ed25519 keys in step across a fleet of servers.
//!
//! It will own the authority (ensure, rotate, revoke, sync, per-target status, a durable store), the receiving side on each target (signed events, acknowledgements, monotonic cursors, snapshots) and the transports that carry events.
//!
//! This crate is part of [netproc](https://github.com/netproc/netproc). It is
//! a placeholder in this release: its API arrives with a later version, and
//! nothing here is stable yet.
#![forbid(unsafe_code)]
#![cfg_attr(not(test), warn(clippy::unwrap_used))]
