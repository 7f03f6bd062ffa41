//! A token bucket with continuous refill.

use std::time::{Duration, Instant};

/// Absorbs float rounding in token counts.
const EPSILON: f64 = 1e-9;

/// A token bucket: starts full with `burst` tokens, refills continuously at
/// `tokens_per_interval` per `interval` up to `burst`; each check takes one.
///
/// Time is passed in, never read, so the bucket is deterministic.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    /// Tokens added per nanosecond.
    rate_per_ns: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket. A zero `interval` or `tokens_per_interval` makes a
    /// bucket that never refills; a zero `burst` one that never admits.
    pub fn new(
        tokens_per_interval: u32,
        interval: Duration,
        burst: u32,
        now: Instant,
    ) -> TokenBucket {
        let interval_ns = interval.as_nanos() as f64;
        let rate_per_ns = if interval_ns > 0.0 {
            f64::from(tokens_per_interval) / interval_ns
        } else {
            0.0
        };
        TokenBucket {
            rate_per_ns,
            burst: f64::from(burst),
            tokens: f64::from(burst),
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        // A `now` earlier than the last one (a caller's clock quirk) adds nothing.
        let elapsed = now.saturating_duration_since(self.last).as_nanos() as f64;
        if now > self.last {
            self.last = now;
        }
        self.tokens = (self.tokens + elapsed * self.rate_per_ns).min(self.burst);
    }

    /// Takes one token, or says how long until one is available (at least
    /// 1 ms; `Duration::MAX` if the bucket never refills).
    pub fn try_acquire(&mut self, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        // The epsilon absorbs float rounding, so waiting exactly the
        // advertised retry time always admits.
        if self.tokens >= 1.0 - EPSILON {
            self.tokens = (self.tokens - 1.0).max(0.0);
            return Ok(());
        }
        if self.rate_per_ns <= 0.0 {
            return Err(Duration::MAX);
        }
        let missing_ns = (1.0 - self.tokens) / self.rate_per_ns;
        let ms = (missing_ns / 1e6).ceil().max(1.0);
        Err(Duration::from_millis(ms as u64))
    }

    /// Changes rate and burst, keeping the tokens (capped at the new burst).
    pub fn reconfigure(
        &mut self,
        tokens_per_interval: u32,
        interval: Duration,
        burst: u32,
        now: Instant,
    ) {
        self.refill(now);
        let fresh = TokenBucket::new(tokens_per_interval, interval, burst, now);
        self.rate_per_ns = fresh.rate_per_ns;
        self.burst = fresh.burst;
        self.tokens = self.tokens.min(self.burst);
    }

    /// Whether the bucket is full at `now`: forgetting it changes nothing.
    pub fn is_full(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= self.burst - EPSILON
    }

    /// Tokens available at `now` (after refill), rounded down.
    pub fn available(&mut self, now: Instant) -> u32 {
        self.refill(now);
        self.tokens as u32
    }
}

impl crate::Idle for TokenBucket {
    fn is_idle(&mut self, now: Instant) -> bool {
        self.is_full(now)
    }
}

impl crate::Idle for crate::SlidingWindow {
    fn is_idle(&mut self, now: Instant) -> bool {
        self.is_empty_at(now)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn refill_is_capped_at_burst() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1, Duration::from_millis(10), 3, t0);
        assert_eq!(b.available(t0 + Duration::from_secs(60)), 3);
    }

    #[test]
    fn a_zero_rate_bucket_never_refills() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(0, Duration::from_secs(1), 1, t0);
        assert!(b.try_acquire(t0).is_ok());
        assert_eq!(
            b.try_acquire(t0 + Duration::from_secs(100)),
            Err(Duration::MAX)
        );
    }

    proptest! {
        /// Over any sequence of checks and clock advances, a bucket never
        /// admits more than `burst + rate × elapsed`.
        #[test]
        fn never_admits_more_than_burst_plus_refill(
            rate in 1u32..100, interval_ms in 1u64..2000, burst in 0u32..50,
            steps in proptest::collection::vec(0u64..500, 1..200),
        ) {
            let t0 = Instant::now();
            let mut b = TokenBucket::new(rate, Duration::from_millis(interval_ms), burst, t0);
            let mut now = t0;
            let mut admitted = 0u64;
            for step in steps {
                now += Duration::from_millis(step);
                if b.try_acquire(now).is_ok() {
                    admitted += 1;
                }
                let elapsed = now.duration_since(t0).as_millis() as f64;
                let bound = f64::from(burst) + elapsed * f64::from(rate) / interval_ms as f64;
                prop_assert!(admitted as f64 <= bound + 1e-6, "admitted {} > {}", admitted, bound);
            }
        }

        /// Waiting the advertised retry time always admits.
        #[test]
        fn retry_after_is_enough(rate in 1u32..100, interval_ms in 1u64..2000, burst in 1u32..5) {
            let t0 = Instant::now();
            let mut b = TokenBucket::new(rate, Duration::from_millis(interval_ms), burst, t0);
            while b.try_acquire(t0).is_ok() {}
            let wait = b.try_acquire(t0).unwrap_err();
            prop_assert!(wait >= Duration::from_millis(1));
            prop_assert!(b.try_acquire(t0 + wait).is_ok());
        }
    }
}
