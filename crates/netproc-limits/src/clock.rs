//! Time, injectable.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Called when a clock jumps (see [`Clock::on_advance`]).
pub type AdvanceHook = Arc<dyn Fn() + Send + Sync>;

/// A monotonic clock. Limiters take `now` from one, so tests can drive time
/// by hand.
pub trait Clock: Send + Sync + fmt::Debug + 'static {
    /// The current instant.
    fn now(&self) -> Instant;

    /// Registers `hook`, called after every jump of a clock that moves by
    /// hand, so that whoever waits for a deadline in this clock re-checks
    /// it. A clock that follows real time never calls it (the default).
    fn on_advance(&self, hook: AdvanceHook) {
        let _ = hook;
    }
}

/// The real monotonic clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// A clock that moves only when told to. For tests.
///
/// ```
/// use std::time::Duration;
/// use netproc_limits::{Clock, ManualClock};
///
/// let clock = ManualClock::new();
/// let t0 = clock.now();
/// clock.advance(Duration::from_secs(5));
/// assert_eq!(clock.now() - t0, Duration::from_secs(5));
/// ```
pub struct ManualClock {
    base: Instant,
    offset_ns: AtomicU64,
    hooks: Mutex<Vec<AdvanceHook>>,
}

impl fmt::Debug for ManualClock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ManualClock")
            .field("offset_ns", &self.offset_ns.load(Ordering::SeqCst))
            .finish()
    }
}

impl ManualClock {
    /// A clock standing at the current instant.
    pub fn new() -> ManualClock {
        ManualClock {
            base: Instant::now(),
            offset_ns: AtomicU64::new(0),
            hooks: Mutex::new(Vec::new()),
        }
    }

    /// Moves time forward, then calls the hooks registered with
    /// [`Clock::on_advance`].
    pub fn advance(&self, by: Duration) {
        let ns = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
        self.offset_ns.fetch_add(ns, Ordering::SeqCst);
        let hooks = self
            .hooks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        for hook in hooks {
            hook();
        }
    }
}

impl Default for ManualClock {
    fn default() -> Self {
        ManualClock::new()
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        self.base + Duration::from_nanos(self.offset_ns.load(Ordering::SeqCst))
    }

    fn on_advance(&self, hook: AdvanceHook) {
        self.hooks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(hook);
    }
}
