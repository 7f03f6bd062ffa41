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
use crate::{Event, EventKind, Signer, sign};

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
        loop {
            let probe = last_probe.is_none_or(|t| t.elapsed() >= self.inner.config.probe_interval);
            if probe {
                last_probe = Some(Instant::now());
                let report = self
                    .deliver_all(self.inner.config.targets.clone(), true)
                    .await;
                log_report(&report);
            } else {
                match self.due_targets().await {
                    Ok(due) if !due.is_empty() => log_report(&self.deliver_all(due, false).await),
                    Ok(_) => {}
                    Err(e) => tracing::error!(error = %e, "cannot read pending deliveries"),
                }
            }
            tokio::select! {
                () = &mut shutdown => return,
                () = self.inner.wake.notified() => {}
                () = tokio::time::sleep(self.inner.config.poll_interval) => {}
            }
        }
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
            let signed =
                tokio::task::spawn_blocking(move || sign_batch(&*inner.key, &target, batch.events))
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
            let outgoing = Outgoing::new(name, correlation_id, request, timeout);
            let answer =
                tokio::time::timeout(timeout, self.inner.transport.deliver(outgoing)).await;
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
pub(crate) fn sign_batch(
    key: &dyn Signer,
    target: &str,
    events: Vec<(u64, u64, EventKind)>,
) -> Result<(Vec<u8>, Sent), String> {
    let now = SystemTime::now();
    let mut signed = Vec::with_capacity(events.len());
    let mut sent = Vec::with_capacity(events.len());
    for (seq, change_id, kind) in events {
        let mut event = Event::new(target, seq, now, kind);
        event.event_id = change_id;
        signed.push(sign(&event, key).map_err(|e| e.to_string())?);
        let credential = match event.kind {
            EventKind::Upsert(c) => Some((c.id, false)),
            EventKind::Delete { id } => Some((id, true)),
            EventKind::Snapshot(_) | EventKind::SnapshotPart { .. } => None,
        };
        sent.push((seq, credential));
    }
    Ok((Delivery::new(signed).encode(), sent))
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
