//! Per-principal liveness: `online` → `unstable` → `offline`, from the
//! last activity of the principal's sessions.
//!
//! Sessions stamp their activity into an atomic (no lock per frame); one
//! task per server scans the session table, compares each principal's most
//! recent activity with the thresholds and publishes every transition as a
//! `tracing` event and on a bounded broadcast channel.
//!
//! Timing, as documented in `docs/operations.md`:
//! - a principal is `online` from the moment a session of it authenticates
//!   (event and counts at once, before `AuthOk` is sent);
//! - the scan period is a quarter of the smallest of `unstable_after_ms` and
//!   `offline_after_ms - unstable_after_ms`, between 10 ms and 500 ms, so a
//!   transition is seen at most one period after its threshold;
//! - states go down one step at a time: a principal found past
//!   `offline_after` while `online` gets `online → unstable` then
//!   `unstable → offline`; activity brings it straight back to `online`, and
//!   a closed last session makes it `offline` at the next scan.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use netproc_limits::Clock;
use serde::Serialize;
use tokio::sync::broadcast;

/// The scan period's bounds (see the module docs).
const MIN_SCAN: Duration = Duration::from_millis(10);
const MAX_SCAN: Duration = Duration::from_millis(500);

/// How often the states are recomputed for these thresholds (ms).
pub(crate) fn scan_period(unstable_after: u64, offline_after: u64) -> Duration {
    let gap = unstable_after.min(offline_after.saturating_sub(unstable_after));
    Duration::from_millis(gap / 4).clamp(MIN_SCAN, MAX_SCAN)
}
/// Events buffered per subscriber; a slower subscriber skips (and is told
/// how many it missed by `broadcast`'s `Lagged`).
const EVENT_CAPACITY: usize = 1024;

/// A principal's liveness.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Liveness {
    /// Heard from within `unstable_after`.
    Online,
    /// Silent for `unstable_after` or more.
    Unstable,
    /// Silent for `offline_after` or more, or no session left.
    Offline,
}

/// A principal's liveness changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct LivenessEvent {
    /// The principal's id.
    pub principal: String,
    /// Its state before.
    pub from: Liveness,
    /// Its state now.
    pub to: Liveness,
}

/// Activity stamps and states.
pub(crate) struct LivenessTracker {
    clock: Arc<dyn Clock>,
    epoch: Instant,
    states: Mutex<HashMap<String, Liveness>>,
    events: broadcast::Sender<LivenessEvent>,
}

impl LivenessTracker {
    pub(crate) fn new(clock: Arc<dyn Clock>) -> LivenessTracker {
        let epoch = clock.now();
        LivenessTracker {
            clock,
            epoch,
            states: Mutex::new(HashMap::new()),
            events: broadcast::channel(EVENT_CAPACITY).0,
        }
    }

    /// Now, as stored in a session's activity stamp.
    pub(crate) fn stamp(&self) -> u64 {
        let since = self.clock.now().saturating_duration_since(self.epoch);
        u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
    }

    /// Records activity into a session's stamp.
    pub(crate) fn touch(&self, stamp: &AtomicU64) {
        stamp.store(self.stamp(), Ordering::Relaxed);
    }

    pub(crate) fn subscribe(&self) -> broadcast::Receiver<LivenessEvent> {
        self.events.subscribe()
    }

    /// Every principal's state (principals with a live session, or that
    /// went offline since the last scan).
    pub(crate) fn states(&self) -> Vec<(String, Liveness)> {
        let mut out: Vec<_> = self
            .states
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(p, l)| (p.clone(), *l))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// How many principals are online, unstable and offline (with a session).
    pub(crate) fn counts(&self) -> (usize, usize, usize) {
        let states = self.states.lock().unwrap_or_else(PoisonError::into_inner);
        let mut c = (0, 0, 0);
        for s in states.values() {
            match s {
                Liveness::Online => c.0 += 1,
                Liveness::Unstable => c.1 += 1,
                Liveness::Offline => c.2 += 1,
            }
        }
        c
    }

    /// A session of `principal` has authenticated: it is online now.
    pub(crate) fn session_started(&self, principal: &str) {
        let mut states = self.states.lock().unwrap_or_else(PoisonError::into_inner);
        let from = states
            .insert(principal.to_owned(), Liveness::Online)
            .unwrap_or(Liveness::Offline);
        drop(states);
        let mut changes = Vec::new();
        if from != Liveness::Online {
            changes.push(LivenessEvent {
                principal: principal.to_owned(),
                from,
                to: Liveness::Online,
            });
        }
        self.publish(changes);
    }

    /// Recomputes every state from each principal's latest activity stamp.
    /// `latest` is called with the states lock held, so a session
    /// registered after it is read is marked online after this scan.
    pub(crate) fn scan_with(
        &self,
        latest: impl FnOnce() -> HashMap<String, u64>,
        unstable_after: u64,
        offline_after: u64,
    ) {
        // The states lock is taken before the table is read, so a session
        // registered after this read is marked online after this scan.
        let mut states = self.states.lock().unwrap_or_else(PoisonError::into_inner);
        let now = self.stamp();
        let latest = latest();
        let mut changes = Vec::new();
        for (principal, last) in &latest {
            let quiet = now.saturating_sub(*last);
            let state = if quiet >= offline_after {
                Liveness::Offline
            } else if quiet >= unstable_after {
                Liveness::Unstable
            } else {
                Liveness::Online
            };
            let previous = states.insert(principal.clone(), state);
            let from = previous.unwrap_or(Liveness::Offline);
            let mut step = |from, to| {
                changes.push(LivenessEvent {
                    principal: principal.clone(),
                    from,
                    to,
                });
            };
            match (from, state) {
                (a, b) if a == b => {}
                // Down one step at a time: no state is skipped.
                (Liveness::Online, Liveness::Offline) => {
                    step(Liveness::Online, Liveness::Unstable);
                    step(Liveness::Unstable, Liveness::Offline);
                }
                (a, b) => step(a, b),
            }
        }
        // Principals whose last session closed: offline, then forgotten.
        states.retain(|principal, state| {
            if latest.contains_key(principal) {
                return true;
            }
            if *state != Liveness::Offline {
                changes.push(LivenessEvent {
                    principal: principal.clone(),
                    from: *state,
                    to: Liveness::Offline,
                });
            }
            false
        });
        drop(states);
        self.publish(changes);
    }

    /// Updates the gauges and sends `changes`, in order.
    fn publish(&self, changes: Vec<LivenessEvent>) {
        let (online, unstable, offline) = self.counts();
        metrics::gauge!("netproc_online_principal_count").set(online as f64);
        metrics::gauge!("netproc_unstable_principal_count").set(unstable as f64);
        metrics::gauge!("netproc_offline_principal_count").set(offline as f64);
        for event in changes {
            tracing::info!(principal = %event.principal, from = ?event.from, to = ?event.to, "liveness changed");
            // No subscriber is fine.
            let _ = self.events.send(event);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scan_period_follows_the_smallest_threshold_gap() {
        assert_eq!(scan_period(420_000, 600_000), MAX_SCAN);
        assert_eq!(scan_period(300, 600), Duration::from_millis(75));
        assert_eq!(scan_period(1_000, 1_100), Duration::from_millis(25));
        assert_eq!(scan_period(20, 30), MIN_SCAN);
    }
}
