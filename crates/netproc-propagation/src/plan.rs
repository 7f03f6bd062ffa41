//! Delivery planning, sans I/O: which queued events go in one request,
//! when a target gets a snapshot instead of its backlog, and how long a
//! failed target waits. The store applies these decisions to what it holds.

use std::time::Duration;

/// Events per delivery request, at most.
pub(crate) const BATCH_EVENTS: usize = 256;
/// Encoded events per delivery request, at most (the server's default
/// frame limit after authentication is 1 MiB).
pub(crate) const BATCH_BYTES: usize = 768 * 1024;
/// What each event adds to a request beyond its encoded kind (envelope,
/// signature, signer key), counted against [`BATCH_BYTES`].
pub(crate) const EVENT_OVERHEAD: usize = 128;

/// How many of the queued events (their encoded sizes, in seq order) go in
/// the next request: at most [`BATCH_EVENTS`], and no more than
/// [`BATCH_BYTES`] — but always at least one, so an oversized event is
/// still sent (and refused by the target, never stuck).
pub(crate) fn batch_len(sizes: impl IntoIterator<Item = usize>) -> usize {
    let mut bytes = 0usize;
    let mut n = 0;
    for size in sizes.into_iter().take(BATCH_EVENTS) {
        if n > 0 && bytes.saturating_add(size) > BATCH_BYTES {
            break;
        }
        bytes = bytes.saturating_add(size + EVENT_OVERHEAD);
        n += 1;
    }
    n
}

/// Whether a target gets a snapshot before its queued events: when it needs
/// one (new, or reset), or when its backlog outgrows both one batch and
/// the number of credentials it holds (a snapshot is then smaller).
pub(crate) fn wants_snapshot(snapshot_needed: bool, backlog: u64, held: u64) -> bool {
    snapshot_needed || (backlog > BATCH_EVENTS as u64 && backlog > held)
}

/// The wait after a target's `attempts`-th consecutive failure: `base`
/// doubled per attempt up to `max`, then a jitter in `[delay/2, delay]`
/// drawn from `jitter` (uniform over `u16`).
pub(crate) fn backoff(attempts: u32, base: Duration, max: Duration, jitter: u16) -> Duration {
    let base = u64::try_from(base.as_millis()).unwrap_or(u64::MAX);
    let max = u64::try_from(max.as_millis()).unwrap_or(u64::MAX);
    let delay = base
        .saturating_mul(1u64 << attempts.clamp(1, 20).saturating_sub(1))
        .min(max);
    let delay = delay / 2 + (delay / 2).saturating_mul(u64::from(jitter)) / u64::from(u16::MAX);
    Duration::from_millis(delay)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_holds_at_most_its_count_and_its_bytes_but_never_nothing() {
        assert_eq!(batch_len(vec![10; 1000]), BATCH_EVENTS);
        assert_eq!(batch_len(vec![10; 3]), 3);
        assert_eq!(batch_len(Vec::<usize>::new()), 0);
        // 300 KiB events: two fit in 768 KiB, the third does not.
        assert_eq!(batch_len(vec![300 * 1024; 5]), 2);
        // One event larger than a whole batch still goes alone.
        assert_eq!(batch_len(vec![2 * BATCH_BYTES, 10]), 1);
    }

    #[test]
    fn a_snapshot_replaces_a_backlog_only_when_it_is_smaller_and_long() {
        assert!(wants_snapshot(true, 0, 0));
        assert!(!wants_snapshot(false, 10, 0));
        assert!(!wants_snapshot(false, BATCH_EVENTS as u64, 0));
        assert!(wants_snapshot(false, BATCH_EVENTS as u64 + 1, 10));
        // Many credentials held: replaying the backlog is still smaller.
        assert!(!wants_snapshot(false, 1_000, 5_000));
    }

    #[test]
    fn backoff_doubles_to_its_cap_with_half_jitter() {
        let (base, max) = (Duration::from_millis(100), Duration::from_secs(10));
        // No jitter draw: half the delay; full draw: the whole delay.
        assert_eq!(backoff(1, base, max, 0), Duration::from_millis(50));
        assert_eq!(backoff(1, base, max, u16::MAX), Duration::from_millis(100));
        assert_eq!(backoff(3, base, max, u16::MAX), Duration::from_millis(400));
        assert_eq!(backoff(30, base, max, u16::MAX), max);
        assert_eq!(backoff(30, base, max, 0), max / 2);
    }
}
