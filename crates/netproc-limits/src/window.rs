//! Window counters.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// An exact sliding window: at most `max` events in any `window`.
///
/// Keeps the instants of the admitted events still inside the window, so its
/// memory is at most `max` instants. An event is admitted when fewer than
/// `max` events happened in the last `window` (events at exactly
/// `now - window` have left it).
#[derive(Debug, Clone)]
pub struct SlidingWindow {
    window: Duration,
    max: u32,
    events: VecDeque<Instant>,
}

impl SlidingWindow {
    /// A window of `window` admitting `max` events.
    pub fn new(window: Duration, max: u32) -> SlidingWindow {
        SlidingWindow {
            window,
            max,
            events: VecDeque::new(),
        }
    }

    fn expire(&mut self, now: Instant) {
        while let Some(&t) = self.events.front() {
            if now.saturating_duration_since(t) >= self.window {
                self.events.pop_front();
            } else {
                break;
            }
        }
    }

    /// Records an event if the window has room; otherwise says how long
    /// until the oldest event leaves it (at least 1 ms).
    pub fn try_record(&mut self, now: Instant) -> Result<(), Duration> {
        self.expire(now);
        if (self.events.len() as u64) < u64::from(self.max) {
            self.events.push_back(now);
            return Ok(());
        }
        Err(self.retry_after(now))
    }

    /// Records an event whatever the count (for counting failures), keeping
    /// only the newest `max` instants; returns the count in the window.
    pub fn record(&mut self, now: Instant) -> u32 {
        self.expire(now);
        if self.max == 0 {
            return 0;
        }
        if self.events.len() as u64 >= u64::from(self.max) {
            self.events.pop_front();
        }
        self.events.push_back(now);
        self.events.len() as u32
    }

    /// Events in the window at `now`.
    pub fn count(&mut self, now: Instant) -> u32 {
        self.expire(now);
        self.events.len() as u32
    }

    /// Whether the window is empty at `now` (an idle key may be forgotten).
    pub fn is_empty_at(&mut self, now: Instant) -> bool {
        self.count(now) == 0
    }

    fn retry_after(&self, now: Instant) -> Duration {
        let oldest = self.events.front().copied().unwrap_or(now);
        let left = self
            .window
            .saturating_sub(now.saturating_duration_since(oldest));
        left.max(Duration::from_millis(1))
    }

    /// Changes the window and limit (a run-time reconfiguration).
    pub fn reconfigure(&mut self, window: Duration, max: u32) {
        self.window = window;
        self.max = max;
        while self.events.len() as u64 > u64::from(max) {
            self.events.pop_front();
        }
    }
}

/// A fixed window: at most `max` events per aligned `window`; O(1) memory.
#[derive(Debug, Clone)]
pub struct FixedWindow {
    window: Duration,
    max: u32,
    start: Instant,
    count: u32,
}

impl FixedWindow {
    /// A window starting at `now`.
    pub fn new(window: Duration, max: u32, now: Instant) -> FixedWindow {
        FixedWindow {
            window,
            max,
            start: now,
            count: 0,
        }
    }

    /// Records an event if the current window has room; otherwise how long
    /// until the next window starts.
    pub fn try_record(&mut self, now: Instant) -> Result<(), Duration> {
        let elapsed = now.saturating_duration_since(self.start);
        if elapsed >= self.window && !self.window.is_zero() {
            let windows = elapsed.as_nanos() / self.window.as_nanos();
            self.start += self.window * u32::try_from(windows).unwrap_or(u32::MAX);
            self.count = 0;
        }
        if self.count < self.max {
            self.count += 1;
            Ok(())
        } else {
            let left = self
                .window
                .saturating_sub(now.saturating_duration_since(self.start));
            Err(left.max(Duration::from_millis(1)))
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn sliding_window_admits_max_then_frees_as_events_age() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut w = SlidingWindow::new(ms(1000), 2);
        assert!(w.try_record(t0).is_ok());
        assert!(w.try_record(t0 + ms(100)).is_ok());
        assert_eq!(w.try_record(t0 + ms(200)), Err(ms(800)));
        // The first event leaves at exactly t0 + window.
        assert!(w.try_record(t0 + ms(1000)).is_ok());
        assert_eq!(w.try_record(t0 + ms(1000)), Err(ms(100)));
    }

    #[test]
    fn record_counts_beyond_nothing_and_memory_stays_at_max() {
        let t0 = Instant::now();
        let mut w = SlidingWindow::new(Duration::from_secs(60), 3);
        for i in 0..100 {
            let n = w.record(t0 + Duration::from_millis(i));
            assert!(n <= 3);
        }
        assert_eq!(w.count(t0 + Duration::from_millis(100)), 3);
    }

    proptest! {
        /// An exact sliding window never holds more than `max` admitted events
        /// within any span of `window`.
        #[test]
        fn sliding_window_never_exceeds_its_limit(
            max in 1u32..10, window_ms in 1u64..500,
            steps in proptest::collection::vec(0u64..100, 1..300),
        ) {
            let t0 = Instant::now();
            let window = Duration::from_millis(window_ms);
            let mut w = SlidingWindow::new(window, max);
            let mut now = t0;
            let mut admitted: Vec<Instant> = Vec::new();
            for step in steps {
                now += Duration::from_millis(step);
                if w.try_record(now).is_ok() {
                    admitted.push(now);
                }
                let in_window = admitted.iter().filter(|t| now.duration_since(**t) < window).count();
                prop_assert!(in_window as u32 <= max);
            }
        }

        /// A fixed window never admits more than `max` within one window.
        #[test]
        fn fixed_window_never_exceeds_its_limit(
            max in 0u32..10, window_ms in 1u64..500,
            steps in proptest::collection::vec(0u64..100, 1..300),
        ) {
            let t0 = Instant::now();
            let window = Duration::from_millis(window_ms);
            let mut w = FixedWindow::new(window, max, t0);
            let mut now = t0;
            let mut per_window = std::collections::HashMap::new();
            for step in steps {
                now += Duration::from_millis(step);
                if w.try_record(now).is_ok() {
                    let idx = now.duration_since(t0).as_millis() / u128::from(window_ms);
                    *per_window.entry(idx).or_insert(0u32) += 1;
                }
            }
            prop_assert!(per_window.values().all(|n| *n <= max));
        }
    }
}
