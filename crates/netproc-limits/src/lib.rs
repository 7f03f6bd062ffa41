//! Abuse controls for network servers: token buckets, window counters,
//! bounded keyed limiters, admission permits and a failed-auth blocklist.
//!
//! Nothing here knows about TLS or netproc's messages, and nothing reads a
//! clock: every check takes `now`, so limiters are tested deterministically.
//! Today the crate holds the [`TokenBucket`]; the keyed limiters, windows,
//! admission permits and the blocklist arrive with the abuse-control issue.
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

mod bucket;

// The public interface.
pub use bucket::TokenBucket;
