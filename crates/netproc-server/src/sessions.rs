//! The table of live sessions, for listing and for closing them by selector.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use netproc_pki::Fingerprint;
use netproc_wire::ErrorCode;
use serde::Serialize;

use crate::function::SessionFacts;
use crate::liveness::{Liveness, LivenessTracker};
use std::sync::atomic::Ordering;

/// Which sessions to close.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SessionSelector {
    /// One session, by the id from `AuthOk` or the listing.
    Session(u64),
    /// Every session of a principal.
    Principal(String),
    /// Every session over a client certificate (e.g. a revoked one).
    CertFingerprint(Fingerprint),
    /// Every session authenticated with an API key; with a generation, only
    /// those on that generation of its secret (so a rotation closes only the
    /// sessions on the old secret).
    Key {
        /// The key id.
        key_id: String,
        /// The secret generation, or every generation.
        generation: Option<u64>,
    },
}

impl SessionSelector {
    pub(crate) fn matches(&self, facts: &SessionFacts) -> bool {
        match self {
            SessionSelector::Session(id) => facts.session_id == *id,
            SessionSelector::Principal(p) => facts.principal.id == *p,
            SessionSelector::CertFingerprint(fp) => facts.cert.fingerprint == *fp,
            SessionSelector::Key { key_id, generation } => {
                facts.principal.key_id.as_deref() == Some(key_id.as_str())
                    && generation.is_none_or(|g| facts.principal.key_generation == Some(g))
            }
        }
    }
}

/// A live session, as listed to administrators.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct SessionInfo {
    /// The session id.
    pub session_id: u64,
    /// The principal's id.
    pub principal: String,
    /// The API key it authenticated with.
    pub key_id: Option<String>,
    /// The peer address.
    pub peer: String,
    /// The client certificate's fingerprint.
    pub cert_fingerprint: String,
    /// Unix milliseconds when it authenticated.
    pub since_unix_ms: u64,
    /// The client's self-reported name (capped and escaped).
    pub client_name: Option<String>,
    /// Milliseconds since the session was last heard from.
    pub idle_ms: u64,
    /// Calls running now.
    pub in_flight: u64,
    /// The principal's liveness.
    pub liveness: Liveness,
}

/// What the server tells a session's task.
#[derive(Debug, Clone)]
pub(crate) enum Control {
    /// End now: in-flight calls are answered with `reason`, then `GoAway`.
    Close { reason: ErrorCode, message: String },
    /// `GoAway(shutting_down)`, stop reading, let in-flight calls finish
    /// until `deadline`, then close.
    Shutdown { deadline: Instant },
}

/// A session's mailbox for [`Control`]: the first message waits there
/// until the session takes it (a session ends at the first), later ones
/// are dropped. Lighter per session than a channel (whose first block holds
/// 32 slots), and as cheap to wait on: the session's loop polls it once per
/// batch of work, an atomic load and an `AtomicWaker` registration.
#[derive(Default)]
pub(crate) struct ControlBox {
    slot: std::sync::Mutex<Option<Control>>,
    full: std::sync::atomic::AtomicBool,
    waker: futures_util::task::AtomicWaker,
}

impl ControlBox {
    /// Leaves `control` for the session, unless one is waiting already.
    pub(crate) fn send(&self, control: Control) {
        let mut slot = self.slot.lock().unwrap_or_else(PoisonError::into_inner);
        if slot.is_none() {
            *slot = Some(control);
            self.full.store(true, Ordering::Release);
            drop(slot);
            self.waker.wake();
        }
    }

    /// The next message. Cancel-safe: a message is taken only when returned.
    pub(crate) async fn recv(&self) -> Control {
        std::future::poll_fn(|cx| {
            self.waker.register(cx.waker());
            if !self.full.load(Ordering::Acquire) {
                return std::task::Poll::Pending;
            }
            let mut slot = self.slot.lock().unwrap_or_else(PoisonError::into_inner);
            match slot.take() {
                Some(control) => {
                    self.full.store(false, Ordering::Release);
                    std::task::Poll::Ready(control)
                }
                None => std::task::Poll::Pending,
            }
        })
        .await
    }
}

pub(crate) struct Entry {
    /// The session's running calls (written by the session only).
    pub(crate) in_flight: Arc<std::sync::atomic::AtomicUsize>,
    /// The session's last activity, a liveness stamp (written by the session only).
    pub(crate) activity: Arc<std::sync::atomic::AtomicU64>,

    pub(crate) facts: Arc<SessionFacts>,
    pub(crate) info: SessionInfo,
    pub(crate) control: Arc<ControlBox>,
}

/// Live sessions. Locked only when a session starts or ends and for admin
/// operations, never per call.
#[derive(Default)]
pub(crate) struct SessionTable {
    entries: Mutex<HashMap<u64, Entry>>,
}

impl SessionTable {
    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Entry>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers an authenticated session under the per-principal policy,
    /// atomically: `None` (and the entry dropped) when the principal already
    /// has `max` sessions (0 = no cap), otherwise the ids of the sessions it replaces (with
    /// `single_active`, every other session of the principal — replaced
    /// only now, after the new one authenticated).
    pub(crate) fn register(&self, entry: Entry, max: u32, single_active: bool) -> Option<Vec<u64>> {
        let mut entries = self.lock();
        let principal = entry.facts.principal.id.clone();
        let existing: Vec<u64> = entries
            .values()
            .filter(|e| e.facts.principal.id == principal)
            .map(|e| e.facts.session_id)
            .collect();
        if !single_active && max > 0 && existing.len() >= max as usize {
            return None;
        }
        entries.insert(entry.facts.session_id, entry);
        Some(if single_active { existing } else { Vec::new() })
    }

    pub(crate) fn remove(&self, session_id: u64) {
        self.lock().remove(&session_id);
    }

    /// Every session, with its current activity and its principal's liveness.
    pub(crate) fn list(&self, liveness: &LivenessTracker) -> Vec<SessionInfo> {
        let now = liveness.stamp();
        let states: HashMap<String, Liveness> = liveness.states().into_iter().collect();
        let mut out: Vec<SessionInfo> = self
            .lock()
            .values()
            .map(|e| {
                let mut info = e.info.clone();
                info.idle_ms = now.saturating_sub(e.activity.load(Ordering::Relaxed));
                info.in_flight = e.in_flight.load(Ordering::Relaxed) as u64;
                info.liveness = states
                    .get(&info.principal)
                    .copied()
                    .unwrap_or(Liveness::Online);
                info
            })
            .collect();
        out.sort_by_key(|i| i.session_id);
        out
    }

    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }
    /// Each principal with a live session, and its most recent activity stamp.
    pub(crate) fn latest_activity(&self) -> HashMap<String, u64> {
        let mut out: HashMap<String, u64> = HashMap::new();
        for e in self.lock().values() {
            let stamp = e.activity.load(std::sync::atomic::Ordering::Relaxed);
            let slot = out.entry(e.facts.principal.id.clone()).or_insert(stamp);
            *slot = (*slot).max(stamp);
        }
        out
    }

    /// The facts of every live session.
    pub(crate) fn list_facts(&self) -> Vec<Arc<SessionFacts>> {
        self.lock().values().map(|e| Arc::clone(&e.facts)).collect()
    }

    /// Calls running across all sessions.
    pub(crate) fn in_flight(&self) -> usize {
        self.lock()
            .values()
            .map(|e| e.in_flight.load(std::sync::atomic::Ordering::Relaxed))
            .sum()
    }

    /// Sends `control` to every matching session; returns how many.
    pub(crate) fn signal(&self, selector: Option<&SessionSelector>, control: &Control) -> usize {
        let entries = self.lock();
        let mut n = 0;
        for e in entries.values() {
            if selector.is_none_or(|s| s.matches(&e.facts)) {
                // A message already waiting means a close is pending.
                e.control.send(control.clone());
                n += 1;
            }
        }
        n
    }
}
