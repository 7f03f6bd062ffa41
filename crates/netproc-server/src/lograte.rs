//! Rate-limited logging: one helper for every line a peer can cause in
//! bulk (refused requests, refused connections and auth attempts, overflow
//! states).
//!
//! The first event of a kind is logged at once; further events of that kind
//! within `interval` are only counted, and the next line of that kind after
//! the interval carries the count (`suppressed = n`): at most one line per
//! kind per interval, and no event goes uncounted. Memory is bounded: when
//! `max_kinds` kinds are tracked, new kinds share one slot.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// The interval of the server's log limiters.
pub(crate) const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Kinds tracked at most by one limiter.
pub(crate) const MAX_KINDS: usize = 1024;

#[derive(Debug, Clone, Copy)]
struct Slot {
    since: Instant,
    suppressed: u64,
}

impl Slot {
    /// `Some(events not logged since the last line)` if this event is logged.
    fn hit(&mut self, now: Instant, interval: Duration) -> Option<u64> {
        if now.saturating_duration_since(self.since) < interval {
            self.suppressed += 1;
            return None;
        }
        let n = self.suppressed;
        *self = Slot {
            since: now,
            suppressed: 0,
        };
        Some(n)
    }
}

/// Decides which events of many kinds are logged.
#[derive(Debug)]
pub(crate) struct LogLimiter<K> {
    interval: Duration,
    max_kinds: usize,
    slots: Mutex<(HashMap<K, Slot>, Option<Slot>)>,
}

impl<K: Hash + Eq + Clone> LogLimiter<K> {
    pub(crate) fn new(interval: Duration, max_kinds: usize) -> LogLimiter<K> {
        LogLimiter {
            interval,
            max_kinds: max_kinds.max(1),
            slots: Mutex::new((HashMap::new(), None)),
        }
    }

    /// An event of kind `key` at `now`: `Some(n)` if it is to be logged,
    /// with `n` events of its kind (or, past the bound, of any untracked
    /// kind) not logged since the last line; `None` if only counted.
    pub(crate) fn check(&self, key: &K, now: Instant) -> Option<u64> {
        let mut guard = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        let (slots, shared) = &mut *guard;
        if let Some(slot) = slots.get_mut(key) {
            return slot.hit(now, self.interval);
        }
        if slots.len() >= self.max_kinds {
            // Forget kinds whose interval is over with nothing left to report.
            let interval = self.interval;
            slots.retain(|_, s| {
                s.suppressed > 0 || now.saturating_duration_since(s.since) < interval
            });
        }
        if slots.len() >= self.max_kinds {
            return match shared {
                Some(slot) => slot.hit(now, self.interval),
                None => {
                    *shared = Some(Slot {
                        since: now,
                        suppressed: 0,
                    });
                    Some(0)
                }
            };
        }
        slots.insert(
            key.clone(),
            Slot {
                since: now,
                suppressed: 0,
            },
        );
        Some(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_event_is_logged_then_one_line_per_interval_with_the_count() {
        let l = LogLimiter::new(Duration::from_secs(10), 8);
        let t0 = Instant::now();
        assert_eq!(l.check(&"a", t0), Some(0));
        for i in 1..=100 {
            assert_eq!(l.check(&"a", t0 + Duration::from_millis(i)), None);
        }
        // Another kind is logged on its own.
        assert_eq!(l.check(&"b", t0), Some(0));
        assert_eq!(l.check(&"a", t0 + Duration::from_secs(10)), Some(100));
        assert_eq!(l.check(&"a", t0 + Duration::from_secs(11)), None);
    }

    #[test]
    fn kinds_past_the_bound_share_one_slot() {
        let l = LogLimiter::new(Duration::from_secs(10), 2);
        let t0 = Instant::now();
        let mut logged = 0;
        for k in 0..1000u32 {
            logged += usize::from(l.check(&k, t0).is_some());
        }
        assert_eq!(logged, 3);
    }
}
