//! Delivering to targets: which targets are due, one delivery at a time per
//! target, signing batches off the runtime threads, backoff on failure.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use futures_util::StreamExt;

use crate::authority::Authority;
use crate::sql::*;
use crate::store::*;
use crate::transport::{Outgoing, TransportError};
use crate::types::*;
use crate::wire::{Delivery, DeliveryReply};
use crate::{Event, EventKind, Signer, sign, sign_with_epoch};

impl Authority {
    /// Delivers everything pending to every target now (ignoring backoff),
    /// and probes targets with nothing pending for their cursor, so one that
    /// lost its state gets a snapshot. Concurrent across targets up to
    /// `max_concurrent_deliveries`; a slow or dead target only holds its own
    /// slot, for at most `delivery_timeout` per request.
    pub async fn sync(&self) -> SyncReport {
        let names = self.inner.config.targets.clone();
        self.deliver_all(names, true).await
    }

    /// Delivers in the background until `shutdown` completes: right after
    /// each local change, on every `poll_interval` for changes written by
    /// another process (e.g. `netproc creds`), retrying failed targets with
    /// exponential backoff and jitter, and probing every target's cursor on
    /// every `probe_interval`.
    pub async fn run(&self, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut last_probe: Option<Instant> = None;
        let lease = self
            .inner
            .config
            .lease
            .max(std::time::Duration::from_millis(100));
        let holder = holder_id();
        // Delivering only while holding the lease (PostgreSQL: one process
        // delivers; SQLite: always). The local deadline is taken from
        // before the renewal was asked, with a margin: a leader that cannot
        // renew in time stops before the lease ends in the database.
        let mut leading_until: Option<Instant> = None;
        let mut renew_at = Instant::now();
        // While the database fails: one ERROR line, the health gauge at 0,
        // and a growing pause (100 ms doubling to 5 s) instead of the poll.
        let mut failing: Option<std::time::Duration> = None;
        metrics::gauge!("netproc_propagation_healthy").set(1.0);
        loop {
            // This turn's calls to the database: none, all answered, or one
            // failed (a turn without a call says nothing about its health).
            let mut db: Option<bool> = None;
            if Instant::now() >= renew_at {
                let asked = Instant::now();
                let was = leading_until.is_some_and(|t| asked < t);
                match self.inner.store.lease(holder.clone(), lease).await {
                    Ok(Some(epoch)) => {
                        db.get_or_insert(true);
                        if !was {
                            tracing::info!(holder = %holder, epoch, "leading deliveries");
                            // A new term: probe every target at once.
                            last_probe = None;
                        }
                        self.inner
                            .epoch
                            .store(epoch, std::sync::atomic::Ordering::Relaxed);
                        leading_until = Some(asked + lease.mul_f64(0.9));
                    }
                    Ok(None) => {
                        db.get_or_insert(true);
                        if was {
                            tracing::warn!(holder = %holder, "another authority process took the delivery lease; standing by");
                        }
                        leading_until = None;
                        metrics::gauge!("netproc_propagation_leading").set(0.0);
                    }
                    Err(e) => {
                        db = Some(false);
                        if failing.is_none() {
                            tracing::error!(error = %e, "cannot renew the delivery lease; delivering until it runs out");
                        }
                    }
                }
                renew_at = asked + lease / 3;
            }
            if leading_until.is_some_and(|t| Instant::now() < t) {
                // Change requests from a role that may only request them
                // (PostgreSQL): applied here, delivered below.
                match self.inner.store.apply_requests().await {
                    Ok(_) => {
                        db.get_or_insert(true);
                    }
                    Err(e) => {
                        db = Some(false);
                        if failing.is_none() {
                            tracing::error!(error = %e, "cannot apply change requests");
                        }
                    }
                }
                let probe =
                    last_probe.is_none_or(|t| t.elapsed() >= self.inner.config.probe_interval);
                if probe {
                    last_probe = Some(Instant::now());
                    let report = self
                        .deliver_all(self.inner.config.targets.clone(), true)
                        .await;
                    log_report(&report);
                } else {
                    match self.due_targets().await {
                        Ok(due) if !due.is_empty() => {
                            db.get_or_insert(true);
                            log_report(&self.deliver_all(due, false).await);
                        }
                        Ok(_) => {
                            db.get_or_insert(true);
                        }
                        Err(e) => {
                            db = Some(false);
                            if failing.is_none() {
                                tracing::error!(error = %e, "cannot read pending deliveries");
                            }
                        }
                    }
                }
            }
            failing = match (db, failing) {
                (Some(false), None) => {
                    tracing::error!("the authority's database is failing; retrying with backoff");
                    metrics::gauge!("netproc_propagation_healthy").set(0.0);
                    Some(std::time::Duration::from_millis(100))
                }
                (Some(false), Some(d)) => Some((d * 2).min(std::time::Duration::from_secs(5))),
                (Some(true), Some(_)) => {
                    tracing::info!("the authority's database answers again");
                    metrics::gauge!("netproc_propagation_healthy").set(1.0);
                    None
                }
                (_, f) => f,
            };
            let nap = failing.unwrap_or_else(|| {
                self.inner
                    .config
                    .poll_interval
                    .min(renew_at.saturating_duration_since(Instant::now()))
            });
            tokio::select! {
                () = &mut shutdown => return,
                () = self.inner.wake.notified() => {}
                () = tokio::time::sleep(nap) => {}
            }
        }
    }

    /// The epoch this process signs with: its lease's while it leads, else
    /// the database's current one (a `sync` by a process that does not
    /// lead delivers in the leader's term), 1 without a lease (SQLite).
    async fn current_epoch(&self) -> u64 {
        let mine = self.inner.epoch.load(std::sync::atomic::Ordering::Relaxed);
        if mine > 0 {
            return mine;
        }
        match self.inner.store.leader().await {
            Ok(Some(l)) => l.epoch.max(1),
            _ => 1,
        }
    }

    /// Who holds the delivery lease among the authority processes sharing
    /// this database (`None` on SQLite, where one process delivers).
    pub async fn leader(&self) -> Result<Option<LeaderInfo>, AuthorityError> {
        self.inner.store.leader().await
    }

    /// Targets being delivered to now: those whose delivery lock is held
    /// (released on every exit, cancellation included).
    pub(crate) fn in_flight(&self) -> HashSet<String> {
        self.inner
            .delivering
            .iter()
            .filter(|(_, lock)| lock.try_lock().is_err())
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// Configured targets with work to do whose backoff has passed.
    async fn due_targets(&self) -> Result<Vec<String>, AuthorityError> {
        let names = self.inner.config.targets.clone();
        self.inner.store.due_targets(names, now_ms()).await
    }

    async fn deliver_all(&self, names: Vec<String>, probe: bool) -> SyncReport {
        let limit = self.inner.config.max_concurrent_deliveries.max(1);
        let targets = futures_util::stream::iter(names)
            .map(|name| async move {
                let outcome = self.deliver_target(&name, probe).await;
                TargetSync {
                    target: name,
                    delivered: outcome.0,
                    error: outcome.1,
                }
            })
            .buffer_unordered(limit)
            .collect::<Vec<_>>()
            .await;
        SyncReport { targets }
    }

    /// Delivers to one target until it is up to date or fails.
    async fn deliver_target(&self, name: &str, probe: bool) -> (usize, Option<String>) {
        let Some(lock) = self.inner.delivering.get(name) else {
            return (0, Some(format!("target {name:?} is not configured")));
        };
        // Another task delivering to it (run and sync at once): wait, then
        // deliver what is left.
        let _one_at_a_time = lock.lock().await;
        self.deliver_target_inner(name, probe).await
    }

    async fn deliver_target_inner(&self, name: &str, mut probe: bool) -> (usize, Option<String>) {
        let mut delivered = 0;
        // Bounded: each round either empties the queue or fails.
        for _ in 0..10_000 {
            let target = name.to_owned();
            let part_bytes = self.inner.config.snapshot_part_bytes;
            let batch = match self.inner.store.prepare(target, part_bytes).await {
                Ok(b) => b,
                Err(e) => return (delivered, Some(e.to_string())),
            };
            if batch.events.is_empty() && !probe {
                return (delivered, None);
            }
            probe = false;
            // Signing a full batch takes milliseconds: off the runtime's threads.
            let inner = Arc::clone(&self.inner);
            let target = name.to_owned();
            // The newest format this target has not refused: 3 (epochs and
            // the certificate deny list), 2 (epochs), 1.
            let format = self
                .inner
                .formats
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .get(name)
                .copied()
                .unwrap_or(NEWEST_FORMAT);
            let epoch = match format {
                1 => None,
                _ => Some(self.current_epoch().await),
            };
            audit_batch(name, &batch, epoch);
            let signed = tokio::task::spawn_blocking(move || {
                sign_batch(&*inner.key, &target, batch.events, epoch, format)
            })
            .await;
            let (request, sent) = match signed {
                Ok(Ok(signed)) => signed,
                Ok(Err(e)) => return (delivered, Some(e)),
                Err(e) => return (delivered, Some(e.to_string())),
            };
            let timeout = self.inner.config.delivery_timeout;
            let correlation_id = self
                .inner
                .correlation
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let mut outgoing = Outgoing::new(name, correlation_id, request, timeout);
            outgoing.format = format;
            let answer =
                tokio::time::timeout(timeout, self.inner.transport.deliver(outgoing)).await;
            if let Ok(Err(TransportError::Unsupported { .. })) = &answer
                && format > 1
            {
                // It predates this format: from now on it gets the one
                // before, and this batch is sent again at once.
                tracing::info!(target_name = %name, format, "the target predates this event format; sending it the one before");
                self.inner
                    .formats
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .insert(name.to_owned(), format - 1);
                probe = true;
                continue;
            }
            let reply = match answer {
                Err(_) => Err(TransportError::TimedOut {
                    target: name.to_owned(),
                    after: timeout,
                }
                .to_string()),
                Ok(Err(e)) => Err(e.to_string()),
                Ok(Ok(bytes)) => {
                    DeliveryReply::decode(&bytes).map_err(|e| format!("unreadable reply: {e}"))
                }
            };
            let target = name.to_owned();
            let config = self.inner.config.clone();

            let done = self.inner.store.complete(target, config, sent, reply).await;
            match done {
                Ok(Progress {
                    acked,
                    error: None,
                    more,
                }) => {
                    delivered += acked;
                    if !more {
                        return (delivered, None);
                    }
                }
                Ok(Progress {
                    acked,
                    error: Some(e),
                    ..
                }) => return (delivered + acked, Some(e)),
                Err(e) => return (delivered, Some(e.to_string())),
            }
        }
        (delivered, None)
    }
}

/// Signs a batch for `target` now: the encoded request and what it holds.
/// The newest event format (3: epochs and the certificate deny list).
pub(crate) const NEWEST_FORMAT: u8 = 3;

/// What a target that predates the deny list gets in place of its events:
/// a delete of an id no key can have (so it is a no-op there, and its
/// cursor moves on).
pub(crate) const NOOP_ID: &str = "~";

/// Signs a batch: with `epoch` in the second format, else the first; for
/// a target below format 3, the deny list's events become no-ops.
pub(crate) fn sign_batch(
    key: &dyn Signer,
    target: &str,
    events: Vec<(u64, u64, EventKind)>,
    epoch: Option<u64>,
    format: u8,
) -> Result<(Vec<u8>, Sent), String> {
    let now = SystemTime::now();
    let mut unsigned = Vec::with_capacity(events.len());
    let mut sent = Vec::with_capacity(events.len());
    for (seq, change_id, kind) in events {
        let credential = match &kind {
            EventKind::Upsert(c) => Some((c.id.clone(), false)),
            EventKind::Delete { id } => Some((id.clone(), true)),
            EventKind::Snapshot(_) | EventKind::SnapshotPart { .. } | EventKind::DenyList(_) => {
                None
            }
            EventKind::DenyCert { cert, .. } => Some((cert.label(), false)),
            EventKind::AllowCert { cert } => Some((cert.label(), true)),
        };
        let kind = match kind {
            EventKind::DenyCert { .. } | EventKind::AllowCert { .. } | EventKind::DenyList(_)
                if format < 3 =>
            {
                EventKind::Delete { id: NOOP_ID.into() }
            }
            kind => kind,
        };
        let mut event = Event::new(target, seq, now, kind);
        event.event_id = change_id;
        unsigned.push(event);
        sent.push((seq, credential));
    }
    let signed = sign_all(&unsigned, epoch, key)?;
    Ok((Delivery::new(signed).encode(), sent))
}

/// Signs `events` in order, a large batch on several threads
/// ([`map_batch`](crate::event::map_batch)).
fn sign_all(
    events: &[Event],
    epoch: Option<u64>,
    key: &dyn Signer,
) -> Result<Vec<crate::SignedEvent>, String> {
    let signed = crate::event::map_batch(events, |event| {
        match epoch {
            Some(epoch) => sign_with_epoch(event, epoch, key),
            None => sign(event, key),
        }
        .map_err(|e| e.to_string())
    })
    .ok_or("a signing thread panicked")?;
    signed.into_iter().collect()
}

fn cert_label(cert: &crate::CertRef) -> &'static str {
    match cert {
        crate::CertRef::Serial { .. } => "certificate (serial)",
        crate::CertRef::Spki(_) => "certificate (key)",
    }
}

/// The audit line of each change before it is signed: what, for which
/// target, and who made it (recorded with the change, never trusted from
/// the event).
fn audit_batch(target: &str, batch: &crate::store::Batch, epoch: Option<u64>) {
    for ((seq, change_id, kind), (by, role)) in batch.events.iter().zip(&batch.authors) {
        let (action, credential) = match kind {
            EventKind::Upsert(c) => ("upsert", c.id.as_str()),
            EventKind::Delete { id } => ("delete", id.as_str()),
            EventKind::Snapshot(_) | EventKind::SnapshotPart { .. } => ("snapshot", ""),
            EventKind::DenyCert { cert, .. } => ("deny_cert", cert_label(cert)),
            EventKind::AllowCert { cert } => ("allow_cert", cert_label(cert)),
            EventKind::DenyList(_) => ("deny_list", ""),
        };
        tracing::info!(
            target: netproc_server::AUDIT_TARGET,
            event = "propagation_sign",
            target_name = %target,
            seq,
            change_id,
            action,
            credential,
            changed_by = by.as_deref().unwrap_or("-"),
            db_role = role.as_deref().unwrap_or("-"),
            epoch = epoch.unwrap_or(0),
            "signing a change for a target"
        );
    }
}

pub(crate) fn log_report(report: &SyncReport) {
    for t in &report.targets {
        match &t.error {
            Some(e) => {
                tracing::warn!(target_name = %t.target, error = %e, "propagation delivery failed")
            }
            None if t.delivered > 0 => {
                tracing::info!(target_name = %t.target, events = t.delivered, "propagation delivered")
            }
            None => {}
        }
    }
}

/// This process's name in the lease: host, pid, and a random part (two
/// authorities in one process are two holders).
fn holder_id() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default();
    let mut r = [0u8; 4];
    let _ = netproc_pki::random_bytes(&mut r);
    format!(
        "{host}-{}-{:08x}",
        std::process::id(),
        u32::from_le_bytes(r)
    )
}
