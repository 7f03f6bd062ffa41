//! Admission gates: at most N at once, held by RAII permits.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// A counter of things in progress (sockets, handshakes, unauthenticated
/// sessions) with a cap. [`try_enter`](Gate::try_enter) never waits: past
/// the cap it refuses. The returned [`GatePermit`] leaves on drop, so a
/// cancelled task cannot leak capacity.
///
/// ```
/// use netproc_limits::Gate;
///
/// let gate = Gate::new(1);
/// let permit = gate.try_enter().unwrap();
/// assert!(gate.try_enter().is_none());
/// drop(permit);
/// assert_eq!(gate.current(), 0);
/// ```
#[derive(Debug, Clone)]
pub struct Gate {
    inner: Arc<GateInner>,
}

#[derive(Debug)]
struct GateInner {
    current: AtomicUsize,
    max: AtomicUsize,
}

/// Held while inside a [`Gate`].
#[derive(Debug)]
pub struct GatePermit {
    inner: Arc<GateInner>,
}

impl Gate {
    /// A gate admitting `max` at once.
    pub fn new(max: usize) -> Gate {
        Gate {
            inner: Arc::new(GateInner {
                current: AtomicUsize::new(0),
                max: AtomicUsize::new(max),
            }),
        }
    }

    /// Enters if below the cap.
    pub fn try_enter(&self) -> Option<GatePermit> {
        let max = self.inner.max.load(Ordering::Relaxed);
        self.inner
            .current
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |c| {
                (c < max).then_some(c + 1)
            })
            .ok()
            .map(|_| GatePermit {
                inner: Arc::clone(&self.inner),
            })
    }

    /// How many are inside.
    pub fn current(&self) -> usize {
        self.inner.current.load(Ordering::Acquire)
    }

    /// Changes the cap (those already inside stay).
    pub fn set_max(&self, max: usize) {
        self.inner.max.store(max, Ordering::Relaxed);
    }
}

impl Drop for GatePermit {
    fn drop(&mut self) {
        self.inner.current.fetch_sub(1, Ordering::AcqRel);
    }
}
