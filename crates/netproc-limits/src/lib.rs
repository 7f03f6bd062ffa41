//! Abuse controls for network servers: token buckets, window counters,
//! bounded keyed limiters, admission permits and a failed-auth blocklist.
//!
//! Nothing here knows about TLS or netproc's messages, and nothing reads a
//! clock: every check takes `now` (from a [`Clock`]; [`ManualClock`] in
//! tests), so limiters are tested deterministically.
//!
//! - [`TokenBucket`]: rate per interval with a burst, continuous refill.
//! - [`SlidingWindow`] (exact, memory ≤ its limit) and [`FixedWindow`] (O(1)).
//! - [`KeyedTable`]: per-key states (per IP, per key, per function) with a
//!   hard, exact bound on keys; only idle entries are evicted, and a table
//!   full of active entries refuses new keys (the caller decides what that
//!   means).
//! - [`ip_key`]: IPv6 peers keyed by /64 (configurable), IPv4-mapped
//!   addresses as IPv4.
//! - [`Gate`]: at most N sockets / handshakes / sessions at once, with RAII
//!   permits.
//! - [`Blocklist`]: failed authentications per address and per key id, with
//!   blocks that expire on their own and a shared overflow window for
//!   failures only: a full table never refuses a correct credential.
//!
//! The token bucket is written here rather than taken from `governor`:
//! governor's keyed store has no capacity bound and its own clock type, so
//! the bounded table and the clock adapter would be ours anyway,
//! and a plain bucket is a few lines.
//!
//! # Example
//!
//! ```
//! use std::time::{Duration, Instant};
//! use netproc_limits::TokenBucket;
//!
//! // 10 per second, bursts of 20.
//! let start = Instant::now();
//! let mut bucket = TokenBucket::new(10, Duration::from_secs(1), 20, start);
//! for _ in 0..20 {
//!     assert!(bucket.try_acquire(start).is_ok());
//! }
//! let retry_after = bucket.try_acquire(start).unwrap_err();
//! assert_eq!(retry_after, Duration::from_millis(100));
//! assert!(bucket.try_acquire(start + retry_after).is_ok());
//! ```
#![forbid(unsafe_code)]
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

mod blocklist;
mod bucket;
mod clock;
mod gate;
mod ip;
mod lease;
mod table;
mod window;

// The public interface.
pub use blocklist::{BlockedEntry, Blocklist, BlocklistConfig, FailureRecorded};
pub use bucket::TokenBucket;
pub use clock::{AdvanceHook, Clock, ManualClock, SystemClock};
pub use gate::{Gate, GatePermit};
pub use ip::ip_key;
pub use lease::{Lease, SharedBucket, Take};
pub use table::{Idle, KeyedTable, TableFull};
pub use window::{FixedWindow, SlidingWindow};
