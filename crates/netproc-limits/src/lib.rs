//! Abuse controls for network servers: token buckets, window counters, bounded keyed limiters, admission permits and a failed-auth blocklist.
//!
//! It will own token buckets, fixed and sliding window counters, keyed limiters with bounded memory, admission semaphores with RAII permits, the failed-auth blocklist and an injectable clock. It knows nothing of TLS or of netproc's messages.
//!
//! This crate is part of [netproc](https://github.com/netproc/netproc). It is
//! a placeholder in this release: its API arrives with a later version, and
//! nothing here is stable yet.
#![forbid(unsafe_code)]
#![cfg_attr(not(test), warn(clippy::unwrap_used))]
