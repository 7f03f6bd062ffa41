//! Per-principal liveness: `online` → `unstable` → `offline`, from the
//! last activity of the principal's sessions.
//!
//! Sessions stamp their activity into an atomic (no lock per frame); one
//! task per server scans the session table twice a second, compares each
//! principal's quietest-so-far with the thresholds and publishes every
//! transition as a `tracing` event and on a bounded broadcast channel.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use netproc_limits::Clock;
use serde::Serialize;
use tokio::sync::broadcast;

use crate::sessions::SessionTable;

/// How often the states are recomputed.
const SCAN_INTERVAL: Duration = Duration::from_millis(500);
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

    /// Recomputes every state from the session table.
    pub(crate) fn scan(&self, sessions: &SessionTable, unstable_after: u64, offline_after: u64) {
        let now = self.stamp();
        let latest = sessions.latest_activity();
        let mut states = self.states.lock().unwrap_or_else(PoisonError::into_inner);
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
            if from != state {
                changes.push(LivenessEvent {
                    principal: principal.clone(),
                    from,
                    to: state,
                });
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

/// Scans until `shutdown`.
pub(crate) async fn run(shared: std::sync::Weak<crate::server::Shared>) {
    let mut tick = tokio::time::interval(SCAN_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        if shared.shutdown.is_cancelled() {
            return;
        }
        let options = shared.options_arc();
        let s = &options.session_controls;
        shared
            .liveness
            .scan(&shared.sessions, s.unstable_after_ms, s.offline_after_ms);
    }
}
