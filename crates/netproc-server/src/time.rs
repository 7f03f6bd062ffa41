//! Time through one clock: every decision of a session reads the server's
//! injected [`Clock`], and every wait is a deadline in that clock that
//! wakes on a tokio timer or when a manual clock is advanced. Tests drive
//! pings, idle timeouts, key expiry and liveness with
//! [`ManualClock`](netproc_limits::ManualClock), without real sleeps.
//!
//! Left on real time, on purpose: the TLS handshake and auth-message
//! timeouts, call deadlines (scripts check them on their own threads),
//! graceful-shutdown grace, the liveness scan period, and certificate
//! validity (checked by rustls against the real clock).

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use netproc_limits::Clock;
use tokio::sync::Notify;

/// The server's clock, with a way to wait for its deadlines.
#[derive(Clone)]
pub(crate) struct Time {
    clock: Arc<dyn Clock>,
    /// Notified when a manual clock jumps.
    advanced: Arc<Notify>,
}

impl Time {
    pub(crate) fn new(clock: Arc<dyn Clock>) -> Time {
        let advanced = Arc::new(Notify::new());
        let hook = Arc::clone(&advanced);
        clock.on_advance(Arc::new(move || hook.notify_waiters()));
        Time { clock, advanced }
    }

    /// Now, in the server's clock.
    pub(crate) fn now(&self) -> Instant {
        self.clock.now()
    }

    /// The instant, in the server's clock, at which wall-clock time `at`
    /// is reached (now, if it has passed).
    pub(crate) fn when(&self, at: SystemTime) -> Instant {
        let left = at
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        self.now() + left
    }

    /// Completes once the server's clock reaches `deadline`.
    pub(crate) fn sleep_until(
        &self,
        deadline: Instant,
    ) -> impl Future<Output = ()> + Send + 'static {
        let (clock, advanced) = (Arc::clone(&self.clock), Arc::clone(&self.advanced));
        async move {
            loop {
                // Registered before reading the clock: an advance between
                // the read and the wait is not missed.
                let jumped = advanced.notified();
                tokio::pin!(jumped);
                jumped.as_mut().enable();
                let now = clock.now();
                if now >= deadline {
                    return;
                }
                // A real clock gets there by itself; a manual one says so.
                let left = (deadline - now).min(Duration::from_secs(86_400 * 365));
                tokio::select! {
                    () = tokio::time::sleep(left) => {}
                    () = &mut jumped => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use netproc_limits::{ManualClock, SystemClock};

    use super::*;

    #[tokio::test]
    async fn a_manual_deadline_wakes_on_advance_not_on_real_time() {
        let clock = Arc::new(ManualClock::new());
        let time = Time::new(clock.clone());
        let deadline = time.now() + Duration::from_secs(3600);
        let sleeper = tokio::spawn(time.sleep_until(deadline));
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!sleeper.is_finished());
        clock.advance(Duration::from_secs(1800));
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!sleeper.is_finished());
        clock.advance(Duration::from_secs(1800));
        tokio::time::timeout(Duration::from_secs(5), sleeper)
            .await
            .expect("woken by the advance")
            .unwrap();
    }

    #[tokio::test]
    async fn a_real_deadline_passes_with_real_time() {
        let time = Time::new(Arc::new(SystemClock));
        let started = Instant::now();
        time.sleep_until(time.now() + Duration::from_millis(30))
            .await;
        assert!(started.elapsed() >= Duration::from_millis(30));
    }
}
