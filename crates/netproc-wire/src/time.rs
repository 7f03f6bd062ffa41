//! The protocol's one time format: milliseconds since the Unix epoch.
//!
//! Proof timestamps, propagation events and the admin views all carry
//! `u64` unix milliseconds; every crate converts through [`unix_ms`] so the
//! rounding and the out-of-range answers are the same everywhere. This is
//! a conversion, not a clock: the caller passes the time it read.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// `t` as whole milliseconds since the Unix epoch, the protocol's timestamp
/// format.
///
/// A time before the epoch gives 0 and one past `u64::MAX` ms (in about
/// 584 million years) gives `u64::MAX`, so the answer is total.
///
/// # Example
///
/// ```
/// use std::time::{Duration, UNIX_EPOCH};
/// use netproc_wire::{from_unix_ms, unix_ms};
///
/// let t = UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
/// assert_eq!(unix_ms(t), 1_700_000_000_123);
/// assert_eq!(from_unix_ms(unix_ms(t)), t);
/// assert_eq!(unix_ms(UNIX_EPOCH - Duration::from_secs(1)), 0);
/// ```
#[must_use]
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The time `ms` unix milliseconds name; the inverse of [`unix_ms`].
#[must_use]
pub fn from_unix_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_truncates_below_a_millisecond() {
        let t = UNIX_EPOCH + Duration::from_micros(5_999);
        assert_eq!(unix_ms(t), 5);
        assert_eq!(from_unix_ms(5), UNIX_EPOCH + Duration::from_millis(5));
        assert_eq!(unix_ms(UNIX_EPOCH), 0);
    }
}
