//! The netproc client: named servers, lazy single-flight connections, typed calls, fan-out to all servers and typed errors.
//!
//! It will own named server endpoints, the reserved name `all_servers`, lazy connection with single-flight, reconnection with backoff, `flush_server`, typed calls with deadlines and cancellation, fan-out with a per-server result map, and the typed `ClientError`.
//!
//! This crate is part of [netproc](https://github.com/netproc/netproc). It is
//! a placeholder in this release: its API arrives with a later version, and
//! nothing here is stable yet.
#![forbid(unsafe_code)]
#![cfg_attr(not(test), warn(clippy::unwrap_used))]
