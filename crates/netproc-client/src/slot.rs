//! One named server's connection: single-flight connect, reconnect with
//! backoff and jitter, flush.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;

use crate::connection::{Connection, connect};
use crate::endpoint::ServerEndpoint;
use crate::error::ClientError;

/// Reconnection backoff: 100 ms doubling to 5 s, with jitter.
const BACKOFF_BASE: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

pub(crate) struct Backoff {
    pub(crate) failures: u32,
    pub(crate) retry_at: Option<Instant>,
    pub(crate) last_error: Option<ClientError>,
}

pub(crate) struct Slot {
    pub(crate) name: String,
    pub(crate) endpoint: ServerEndpoint,
    /// Swapped whole by [`Client::set_identity`]; read at each connect.
    pub(crate) tls: arc_swap::ArcSwap<rustls::ClientConfig>,
    pub(crate) current: ArcSwapOption<Connection>,
    /// Held while connecting: concurrent first calls share one attempt.
    pub(crate) connecting: tokio::sync::Mutex<Backoff>,
    /// The server refused `AuthWithOptions` once: it predates it.
    pub(crate) plain_auth: std::sync::atomic::AtomicBool,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(conn) = self.current.swap(None) {
            conn.close();
        }
    }
}

fn jitter(d: Duration) -> Duration {
    // Spread reconnections over [d/2, d] without a random-number crate: the
    // clock's low bits differ between processes and attempts.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |t| t.subsec_nanos());
    d / 2 + d.mul_f64(f64::from(nanos % 1000) / 2000.0)
}

impl Slot {
    pub(crate) async fn connection(
        &self,
        deadline: Instant,
    ) -> Result<Arc<Connection>, ClientError> {
        if let Some(conn) = self.current.load_full()
            && conn.usable()
        {
            return Ok(conn);
        }
        let mut backoff = self.connecting.lock().await;
        // Someone else may have connected while we waited.
        if let Some(conn) = self.current.load_full()
            && conn.usable()
        {
            return Ok(conn);
        }
        if let Some(at) = backoff.retry_at {
            if at > deadline {
                return Err(backoff.last_error.clone().unwrap_or(ClientError::Timeout {
                    server: self.name.clone(),
                    message: "waiting to reconnect".into(),
                }));
            }
            tokio::time::sleep_until(at).await;
        }
        let tls = TlsConnector::from(self.tls.load_full());
        let plain = self.plain_auth.load(Ordering::Relaxed);
        let mut attempt = connect(&self.name, &self.endpoint, &tls, deadline, plain).await;
        if !plain
            && let Err(e) = &attempt
            && e.code() == netproc_wire::ErrorCode::NotAuthenticated
        {
            // A server from before AuthWithOptions: plain Auth from now on.
            tracing::info!(server = %self.name, "the server predates AuthWithOptions; using plain Auth");
            self.plain_auth.store(true, Ordering::Relaxed);
            attempt = connect(&self.name, &self.endpoint, &tls, deadline, true).await;
        }
        match attempt {
            Ok(conn) => {
                *backoff = Backoff {
                    failures: 0,
                    retry_at: None,
                    last_error: None,
                };
                self.current.store(Some(Arc::clone(&conn)));
                Ok(conn)
            }
            Err(e) => {
                backoff.failures = backoff.failures.saturating_add(1);
                let exp = BACKOFF_BASE.saturating_mul(1 << backoff.failures.min(6));
                backoff.retry_at = Some(Instant::now() + jitter(exp.min(BACKOFF_MAX)));
                backoff.last_error = Some(e.clone());
                Err(e)
            }
        }
    }

    /// New calls go to a new connection (with the current TLS
    /// configuration); the old one finishes its calls, then closes.
    pub(crate) fn migrate(&self) {
        if let Some(conn) = self.current.swap(None) {
            conn.drain(self.endpoint.request_timeout + Duration::from_secs(1));
        }
    }

    pub(crate) fn flush(&self) {
        if let Some(conn) = self.current.swap(None) {
            conn.close();
        }
    }
}

/// What every handle of one client shares: the slots by name.
pub(crate) struct Inner {
    pub(crate) slots: BTreeMap<String, Arc<Slot>>,
    pub(crate) nonce: AtomicU64,
}
