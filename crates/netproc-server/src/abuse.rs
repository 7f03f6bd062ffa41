//! Abuse controls as applied by the server: admission, authentication
//! throttling, request buckets, and the counters that describe them
//! (`counters`: the list of counters and the public `AbuseMetrics`).
//!
//! About 590 lines of code and 100 of tests: the tests are the lockout
//! properties at default table sizes (made-up key ids, sprays of IPv6
//! prefixes), which need admission, throttling and the blocklist together
//! and so live beside all three.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use netproc_limits::{
    Blocklist, BlocklistConfig, Clock, Gate, GatePermit, KeyedTable, SlidingWindow, TokenBucket,
    ip_key,
};
use netproc_wire::{ErrorBody, ErrorCode, Value, to_value};

use crate::lograte::{LOG_INTERVAL, LogLimiter, MAX_KINDS};
use crate::options::{BucketControls, ServerOptions, Settings};
use crate::refusal::Refused;

mod counters;

/// The Prometheus names of the counters, by `Counter` (made once).
static METRIC_NAMES: std::sync::LazyLock<Vec<String>> = std::sync::LazyLock::new(|| {
    Counter::ALL
        .iter()
        .map(|c| counters::prometheus_name(c.field()))
        .collect()
});

/// The liveness gauges (set by the liveness scan), with their help text.
const LIVENESS_GAUGES: &[(&str, &str)] = &[
    ("netproc_online_principal_count", "Principals online now."),
    (
        "netproc_unstable_principal_count",
        "Principals unstable now.",
    ),
    (
        "netproc_offline_principal_count",
        "Principals offline now that still have a session open.",
    ),
];

/// The gauges a snapshot sets, with their help text (in snapshot order).
const GAUGES: &[(&str, &str)] = &[
    ("netproc_active_socket_count", "Sockets open now."),
    (
        "netproc_active_handshake_count",
        "TLS handshakes in progress now.",
    ),
    (
        "netproc_active_unauthenticated_session_count",
        "TLS sessions not yet authenticated now.",
    ),
    (
        "netproc_active_session_count",
        "Authenticated sessions now.",
    ),
    (
        "netproc_in_flight_request_count",
        "Requests running now, across all sessions.",
    ),
    ("netproc_blocked_ip_count", "Addresses blocked now."),
    ("netproc_blocked_api_key_count", "API keys blocked now."),
    (
        "netproc_shared_limits_connected",
        "1 while request limits and blocks are shared with the fleet through Redis; 0 when unreachable (fallback share) or not configured.",
    ),
];

pub use counters::AbuseMetrics;
use counters::COUNTERS;
pub(crate) use counters::Counter;

/// Which limit refused a request.
/// Limits shared by a fleet of servers (Redis, with the feature
/// `shared-limits`): request buckets leased from the fleet's, failures
/// counted fleet-wide, blocks announced to every server.
pub(crate) trait Fleet: Send + Sync {
    /// A token of API key `key`'s fleet bucket; `None` when that scope is
    /// not shared (the local bucket applies).
    fn take_key(
        &self,
        key: &str,
        spec: &BucketControls,
        now: Instant,
    ) -> Option<Result<(), Duration>>;
    /// A token of address `ip`'s fleet bucket (`ip` already reduced to its
    /// prefix); `None` when not shared.
    fn take_ip(
        &self,
        ip: IpAddr,
        spec: &BucketControls,
        now: Instant,
    ) -> Option<Result<(), Duration>>;
    /// A failed authentication (after the local blocklist counted it).
    fn auth_failed(&self, ip: IpAddr, key: Option<&str>, options: &ServerOptions);
    /// An administrator lifted a block here: lift it fleet-wide.
    fn unblocked(&self, entry: &str);
    /// Whether the shared store is reachable now (the gauge).
    fn connected(&self) -> bool;
}

pub(crate) struct Refusal {
    pub(crate) body: ErrorBody,
    pub(crate) disconnect: bool,
}

pub(crate) fn rate_limited(
    scope: &'static str,
    retry_after: Duration,
    message: &'static str,
) -> ErrorBody {
    Refused::RateLimited {
        scope,
        retry_after,
        message,
    }
    .into_body()
}

pub(crate) fn throttled(
    retry_after: Duration,
    message: &'static str,
    scope: &'static str,
) -> ErrorBody {
    Refused::AuthThrottled {
        scope,
        retry_after,
        message,
    }
    .into_body()
}

/// A bucket in a shared table, with the settings version it was made under.
pub(crate) struct Versioned {
    version: u64,
    bucket: TokenBucket,
}

impl netproc_limits::Idle for Versioned {
    fn is_idle(&mut self, now: Instant) -> bool {
        self.bucket.is_full(now)
    }
}

pub(crate) fn new_bucket(spec: &BucketControls, now: Instant) -> TokenBucket {
    TokenBucket::new(
        spec.tokens_per_interval,
        Duration::from_millis(spec.interval_ms),
        spec.burst_tokens,
        now,
    )
}

/// Permits held by a connection from accept on.
pub(crate) struct Admitted {
    pub(crate) socket: GatePermit,
    pub(crate) handshake: GatePermit,
}

/// The server's abuse-control state.
pub(crate) struct Abuse {
    pub(crate) clock: Arc<dyn Clock>,
    /// The server's settings, read here, owned by the server.
    settings: Arc<Settings>,
    sockets: Gate,
    handshakes: Gate,
    pub(crate) unauthenticated: Gate,
    global_window: Mutex<SlidingWindow>,
    per_ip_connections: KeyedTable<IpAddr, SlidingWindow>,
    pending_auth: KeyedTable<IpAddr, SlidingWindow>,
    pub(crate) blocklist: Arc<Blocklist>,
    /// Limits shared with the rest of the fleet, when configured.
    pub(crate) fleet: std::sync::OnceLock<Arc<dyn Fleet>>,
    per_key: KeyedTable<String, Versioned>,
    per_ip: KeyedTable<IpAddr, Versioned>,
    counters: [AtomicU64; COUNTERS],
    /// WARN lines about overflow states, rate-limited per kind.
    overflow_log: LogLimiter<&'static str>,
    /// Audit lines of refused requests, per (principal, code).
    pub(crate) request_log: LogLimiter<(String, ErrorCode)>,
    /// Audit lines of refused authentications, per (address, code).
    pub(crate) auth_log: LogLimiter<(IpAddr, ErrorCode)>,
    /// Audit lines of connections refused after accept, per reason.
    pub(crate) connection_log: LogLimiter<&'static str>,
    /// WARN lines of new blocks, per kind (ip, api_key).
    block_log: LogLimiter<&'static str>,
}

fn blocklist_config(o: &ServerOptions) -> BlocklistConfig {
    let a = &o.auth_controls;
    let mut cfg = BlocklistConfig::default();
    cfg.failed_auth_window = Duration::from_millis(a.failed_auth_window_ms);
    cfg.max_failed_per_ip = a.max_failed_auth_per_ip_per_window;
    cfg.max_failed_per_key = a.max_failed_auth_per_api_key_per_window;
    cfg.block_duration = Duration::from_millis(a.block_duration_ms);
    cfg.enabled = a.enable_blocklist;
    cfg.max_tracked_ips = o.connection_controls.max_tracked_ips as usize;
    cfg.max_tracked_keys = a.max_tracked_api_keys as usize;
    cfg.v6_prefix_len = o.connection_controls.ipv6_prefix_len;
    cfg
}

impl Abuse {
    pub(crate) fn new(settings: Arc<Settings>, clock: Arc<dyn Clock>) -> Abuse {
        let options = settings.load_full();
        let c = &options.connection_controls;
        let tracked_ips = c.max_tracked_ips as usize;
        let tracked_keys = options.auth_controls.max_tracked_api_keys as usize;
        Abuse {
            sockets: Gate::new(c.max_concurrent_sockets as usize),
            handshakes: Gate::new(c.max_concurrent_handshakes as usize),
            unauthenticated: Gate::new(c.max_unauthenticated_sessions as usize),
            global_window: Mutex::new(SlidingWindow::new(
                Duration::from_millis(c.global_connection_window_ms),
                c.global_max_new_connections_per_window,
            )),
            per_ip_connections: KeyedTable::new(tracked_ips),
            pending_auth: KeyedTable::new(tracked_ips),
            blocklist: Arc::new(Blocklist::new(blocklist_config(&options))),
            fleet: std::sync::OnceLock::new(),
            per_key: KeyedTable::new(tracked_keys),
            per_ip: KeyedTable::new(tracked_ips),
            counters: std::array::from_fn(|_| AtomicU64::new(0)),
            overflow_log: LogLimiter::new(LOG_INTERVAL, MAX_KINDS),
            request_log: LogLimiter::new(LOG_INTERVAL, MAX_KINDS),
            auth_log: LogLimiter::new(LOG_INTERVAL, MAX_KINDS),
            connection_log: LogLimiter::new(LOG_INTERVAL, MAX_KINDS),
            block_log: LogLimiter::new(LOG_INTERVAL, MAX_KINDS),
            settings,
            clock,
        }
    }

    /// The settings in force. A guard, not a clone: reading it on the
    /// request path touches no reference count shared between connections.
    pub(crate) fn options(&self) -> arc_swap::Guard<Arc<ServerOptions>> {
        self.settings.load()
    }

    /// Follows new settings (already validated, not yet in force): caps and
    /// windows apply at once; buckets are reconfigured on their next use.
    pub(crate) fn reconfigure(&self, options: &ServerOptions) {
        let c = &options.connection_controls;
        self.sockets.set_max(c.max_concurrent_sockets as usize);
        self.handshakes
            .set_max(c.max_concurrent_handshakes as usize);
        self.unauthenticated
            .set_max(c.max_unauthenticated_sessions as usize);
        self.global_window
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .reconfigure(
                Duration::from_millis(c.global_connection_window_ms),
                c.global_max_new_connections_per_window,
            );
        self.blocklist.reconfigure(blocklist_config(options));
    }

    pub(crate) fn version(&self) -> u64 {
        self.settings.version()
    }

    pub(crate) fn count(&self, c: Counter) {
        self.counters[c as usize].fetch_add(1, Ordering::Relaxed);
        metrics::counter!(METRIC_NAMES[c as usize].as_str()).increment(1);
    }

    /// Registers every series with the installed `metrics` recorder, with
    /// its help text, so a scrape shows them all from the start (counters
    /// at 0, gauges at their current value).
    pub(crate) fn describe_metrics(&self) {
        for c in Counter::ALL {
            let name = METRIC_NAMES[c as usize].as_str();
            metrics::describe_counter!(name, c.help());
            metrics::counter!(name).increment(0);
        }
        for (name, help) in GAUGES.iter().chain(LIVENESS_GAUGES) {
            metrics::describe_gauge!(*name, *help);
        }
    }

    /// Admission at accept, in the reference's order: blocked address,
    /// socket cap, handshake cap, global window, per-address window.
    pub(crate) fn admit(&self, peer: IpAddr) -> Result<Admitted, ErrorCode> {
        let now = self.clock.now();
        let o = self.options();
        let refuse = |code: ErrorCode, extra: Counter| {
            self.count(Counter::connection_rejected_count);
            self.count(extra);
            Err(code)
        };
        if self.blocklist.ip_blocked(peer, now).is_some() {
            return refuse(ErrorCode::AuthThrottled, Counter::auth_throttled_count);
        }
        let Some(socket) = self.sockets.try_enter() else {
            return refuse(
                ErrorCode::ConnectionLimited,
                Counter::connection_limited_count,
            );
        };
        let Some(handshake) = self.handshakes.try_enter() else {
            return refuse(
                ErrorCode::HandshakeLimited,
                Counter::handshake_limited_count,
            );
        };
        let global = self
            .global_window
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .try_record(now);
        if global.is_err() {
            return refuse(
                ErrorCode::ConnectionLimited,
                Counter::connection_limited_count,
            );
        }
        let c = &o.connection_controls;
        let key = ip_key(peer, c.ipv6_prefix_len);
        let window = Duration::from_millis(c.global_connection_window_ms);
        let max = c.per_ip_max_new_connections_per_window;
        if self
            .record_per_ip(
                &self.per_ip_connections,
                "connections_per_ip",
                key,
                now,
                window,
                max,
            )
            .is_err()
        {
            return refuse(
                ErrorCode::ConnectionLimited,
                Counter::connection_limited_count,
            );
        }
        self.count(Counter::connection_accepted_count);
        Ok(Admitted { socket, handshake })
    }

    /// Records one event for `key` in its sliding window of `table`, with the
    /// current settings; `Err(retry after)` past `max`. An address the full
    /// table cannot track is admitted (counted, and logged at WARN): these
    /// windows run before a credential is checked, and a correct credential
    /// is never refused because other clients filled a table. Untracked
    /// addresses are still bounded by the global connection window and the
    /// handshake and unauthenticated-session caps.
    fn record_per_ip(
        &self,
        table: &KeyedTable<IpAddr, SlidingWindow>,
        what: &'static str,
        key: IpAddr,
        now: Instant,
        window: Duration,
        max: u32,
    ) -> Result<(), Duration> {
        table
            .with(
                &key,
                now,
                || SlidingWindow::new(window, max),
                |w| {
                    w.reconfigure(window, max);
                    w.try_record(now)
                },
            )
            .unwrap_or_else(|_| {
                self.count(Counter::limiter_table_full_count);
                self.overflowed(what, now);
                Ok(())
            })
    }

    /// A new block, at WARN (rate-limited per kind): what, for how long,
    /// and how to lift it. Key ids are not secrets.
    fn log_block(&self, kind: &'static str, entry: &str, blocked_for: Duration, now: Instant) {
        if let Some(suppressed) = self.block_log.check(&kind, now) {
            tracing::warn!(
                kind,
                entry,
                blocked_for_s = blocked_for.as_secs(),
                suppressed,
                "blocked after too many failed authentications; connections from it are refused \
                 until then (lift with `netproc admin … unblock <entry>`)"
            );
        }
    }

    /// A WARN line (rate-limited) for an overflow state.
    fn overflowed(&self, what: &'static str, now: Instant) {
        if let Some(suppressed) = self.overflow_log.check(&what, now) {
            tracing::warn!(
                table = what,
                suppressed,
                "a limiter table is full of active entries: new entries are not tracked \
                 (see max_tracked_ips / max_tracked_api_keys)"
            );
        }
    }

    /// Checks before calling the authenticator: the address or the claimed
    /// key blocked on its own entry, or too many attempts from this address.
    /// Nothing here refuses because a table is full.
    pub(crate) fn check_auth_attempt(
        &self,
        peer: IpAddr,
        claimed_key: Option<&str>,
    ) -> Result<(), ErrorBody> {
        let now = self.clock.now();
        if let Some(retry) = self.blocklist.ip_blocked(peer, now) {
            self.count(Counter::auth_throttled_count);
            return Err(throttled(
                retry,
                "this address is temporarily blocked after failed authentications",
                "ip",
            ));
        }
        if let Some(retry) = claimed_key.and_then(|k| self.blocklist.key_blocked(k, now)) {
            self.count(Counter::auth_throttled_count);
            return Err(throttled(
                retry,
                "this API key is temporarily blocked after failed authentications",
                "api_key",
            ));
        }
        let o = self.options();
        let a = &o.auth_controls;
        let key = ip_key(peer, o.connection_controls.ipv6_prefix_len);
        let window = Duration::from_millis(a.pending_auth_window_ms);
        let max = a.max_pending_auth_attempts_per_ip_per_window;
        let attempt = self.record_per_ip(
            &self.pending_auth,
            "pending_auth_per_ip",
            key,
            now,
            window,
            max,
        );
        if let Err(retry) = attempt {
            self.count(Counter::auth_throttled_count);
            return Err(throttled(
                retry,
                "too many authentication attempts from this address",
                "pending_auth_attempts_per_ip",
            ));
        }
        Ok(())
    }

    /// The key id a failure counts against: the claimed id, if the failure
    /// counts against keys at all and the authenticator knows the id exists.
    /// Made-up ids count against the address alone, so they cannot fill the
    /// per-key table.
    pub(crate) fn failure_key<'a>(
        claimed: Option<&'a str>,
        against_key: bool,
        authenticator: &dyn netproc_auth::Authenticator,
    ) -> Option<&'a str> {
        claimed.filter(|k| against_key && authenticator.knows_key_id(k) == Some(true))
    }

    /// Records a failed authentication from `peer`, against `key` if it
    /// exists and the failure counts against it. `Some` if the failure
    /// landed in a blocked overflow window: answer it as throttled.
    pub(crate) fn auth_failed(&self, peer: IpAddr, key: Option<&str>) -> Option<ErrorBody> {
        self.count(Counter::auth_failure_count);
        let now = self.clock.now();
        let ip_was_blocked = self.blocklist.ip_blocked(peer, now).is_some();
        let key_was_blocked = key.is_some_and(|k| self.blocklist.key_blocked(k, now).is_some());
        let recorded = self.blocklist.record_failure(peer, key, now);
        if let Some(fleet) = self.fleet.get() {
            fleet.auth_failed(peer, key, &self.options());
        }
        if !ip_was_blocked && let Some(until) = self.blocklist.ip_blocked(peer, now) {
            self.log_block("ip", &peer.to_string(), until, now);
        }
        if let Some(k) = key.filter(|_| !key_was_blocked)
            && let Some(until) = self.blocklist.key_blocked(k, now)
        {
            self.log_block("api_key", k, until, now);
        }
        if recorded.ip_overflow {
            self.count(Counter::auth_failure_overflow_count);
            self.overflowed("failed_auth_per_ip", now);
        }
        if recorded.key_overflow {
            self.count(Counter::auth_failure_overflow_count);
            self.overflowed("failed_auth_per_api_key", now);
        }
        let (scope, retry) = recorded.overflow_blocked?;
        self.count(Counter::auth_throttled_count);
        Some(throttled(
            retry,
            "too many failed authentications from untracked addresses or keys",
            scope,
        ))
    }

    fn shared_bucket<K, Q>(
        &self,
        table: &KeyedTable<K, Versioned>,
        key: &Q,
        spec: &BucketControls,
        now: Instant,
    ) -> Result<(), Duration>
    where
        K: std::hash::Hash + Eq + Clone + std::borrow::Borrow<Q>,
        Q: std::hash::Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        let version = self.version();
        table
            .with(
                key,
                now,
                || Versioned {
                    version,
                    bucket: new_bucket(spec, now),
                },
                |v| {
                    if v.version != version {
                        v.bucket.reconfigure(
                            spec.tokens_per_interval,
                            Duration::from_millis(spec.interval_ms),
                            spec.burst_tokens,
                            now,
                        );
                        v.version = version;
                    }
                    v.bucket.try_acquire(now)
                },
            )
            .unwrap_or_else(|_| {
                // Fail closed: a full table of active buckets refuses new keys.
                self.count(Counter::limiter_table_full_count);
                Err(Duration::from_millis(spec.interval_ms))
            })
    }

    /// The request buckets after the in-flight cap: per connection (owned
    /// by the session), per API key, per address. Tokens taken by an earlier
    /// bucket are not refunded when a later one refuses.
    pub(crate) fn check_request(
        &self,
        o: &ServerOptions,
        conn_bucket: &mut (u64, TokenBucket),
        key_id: &str,
        peer: IpAddr,
    ) -> Result<(), Refusal> {
        let r = &o.request_controls;
        let now = self.clock.now();
        if let Err(retry) = self.take_local(&r.per_connection, conn_bucket, now) {
            self.count(Counter::rate_limited_per_connection_count);
            return Err(Refusal {
                body: rate_limited(
                    "per_connection",
                    retry,
                    "per-connection request rate limit exceeded",
                ),
                disconnect: r.per_connection.disconnect_on_limit,
            });
        }
        let fleet = self.fleet.get();
        if r.per_api_key.enabled
            && let Err(retry) = fleet
                .and_then(|f| f.take_key(key_id, &r.per_api_key, now))
                .unwrap_or_else(|| self.shared_bucket(&self.per_key, key_id, &r.per_api_key, now))
        {
            self.count(Counter::rate_limited_per_api_key_count);
            return Err(Refusal {
                body: rate_limited(
                    "per_api_key",
                    retry,
                    "per-API-key request rate limit exceeded",
                ),
                disconnect: r.per_api_key.disconnect_on_limit,
            });
        }
        if r.per_ip.enabled {
            let key = ip_key(peer, o.connection_controls.ipv6_prefix_len);
            let taken = fleet
                .and_then(|f| f.take_ip(key, &r.per_ip, now))
                .unwrap_or_else(|| self.shared_bucket(&self.per_ip, &key, &r.per_ip, now));
            if let Err(retry) = taken {
                self.count(Counter::rate_limited_per_ip_count);
                return Err(Refusal {
                    body: rate_limited("per_ip", retry, "per-address request rate limit exceeded"),
                    disconnect: r.per_ip.disconnect_on_limit,
                });
            }
        }
        Ok(())
    }

    /// A token from a bucket owned by one session (`spec` in force; the
    /// bucket follows the settings version). A disabled bucket always gives.
    fn take_local(
        &self,
        spec: &BucketControls,
        bucket: &mut (u64, TokenBucket),
        now: Instant,
    ) -> Result<(), Duration> {
        if !spec.enabled {
            return Ok(());
        }
        let version = self.version();
        if bucket.0 != version {
            bucket.1.reconfigure(
                spec.tokens_per_interval,
                Duration::from_millis(spec.interval_ms),
                spec.burst_tokens,
                now,
            );
            bucket.0 = version;
        }
        bucket.1.try_acquire(now)
    }

    /// The refusal budget: a frame that is refused rather than served takes
    /// a token; without one it is answered with the returned refusal.
    pub(crate) fn check_refusal(
        &self,
        o: &ServerOptions,
        bucket: &mut (u64, TokenBucket),
    ) -> Result<(), Refusal> {
        let spec = &o.request_controls.refusals;
        self.take_local(spec, bucket, self.clock.now())
            .map_err(|retry| {
                self.count(Counter::rate_limited_refusals_count);
                Refusal {
                    body: rate_limited(
                        "refusals",
                        retry,
                        "too many refused requests on this connection",
                    ),
                    disconnect: spec.disconnect_on_limit,
                }
            })
    }

    pub(crate) fn in_flight_refusal(&self) -> ErrorBody {
        self.count(Counter::rate_limited_in_flight_count);
        rate_limited(
            "in_flight_per_connection",
            Duration::from_millis(50),
            "too many in-flight requests on this connection",
        )
    }

    pub(crate) fn function_refusal(&self, scope: &'static str, retry: Duration) -> ErrorBody {
        self.count(Counter::rate_limited_per_function_count);
        rate_limited(
            scope,
            retry,
            "this function's rate or concurrency limit was reached",
        )
    }

    /// The snapshot, given the session count and calls in flight.
    pub(crate) fn snapshot(&self, sessions: usize, in_flight: usize) -> AbuseMetrics {
        let mut m = AbuseMetrics::from_counters(&self.counters);
        let now = self.clock.now();
        let (ips, keys) = self.blocklist.blocked_counts(now);
        m.active_socket_count = self.sockets.current() as u64;
        m.active_handshake_count = self.handshakes.current() as u64;
        m.active_unauthenticated_session_count = self.unauthenticated.current() as u64;
        m.active_session_count = sessions as u64;
        m.in_flight_request_count = in_flight as u64;
        m.blocked_ip_count = ips as u64;
        m.blocked_api_key_count = keys as u64;
        m.shared_limits_connected = self.fleet.get().is_some_and(|f| f.connected()).into();
        m.refused_by_code = BTreeMap::from([
            ("auth_throttled".to_owned(), m.auth_throttled_count),
            ("connection_limited".to_owned(), m.connection_limited_count),
            ("handshake_limited".to_owned(), m.handshake_limited_count),
        ]);
        for ((name, _), v) in GAUGES.iter().zip([
            m.active_socket_count,
            m.active_handshake_count,
            m.active_unauthenticated_session_count,
            m.active_session_count,
            m.in_flight_request_count,
            m.blocked_ip_count,
            m.blocked_api_key_count,
            m.shared_limits_connected,
        ]) {
            metrics::gauge!(*name).set(v as f64);
        }
        m
    }

    /// The blocks, for the admin listing.
    pub(crate) fn blocked_value(&self) -> Value {
        let list: Vec<Value> = self
            .blocklist
            .blocked(self.clock.now())
            .into_iter()
            .map(|b| {
                Value::Map(BTreeMap::from([
                    ("entry".to_owned(), Value::from(b.entry)),
                    ("kind".to_owned(), Value::from(b.kind)),
                    (
                        "retry_after_ms".to_owned(),
                        Value::Int(i64::try_from(b.retry_after.as_millis()).unwrap_or(i64::MAX)),
                    ),
                ]))
            })
            .collect();
        Value::List(list)
    }

    pub(crate) fn options_value(&self) -> Value {
        to_value(&**self.options()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv6Addr;

    use netproc_auth::{ApiKeyStore, KeySpec};
    use netproc_limits::ManualClock;

    use super::*;

    /// What the session does with one failed login, without sockets.
    fn fail_login(abuse: &Abuse, store: &ApiKeyStore, peer: IpAddr, id: &str) {
        if abuse.admit(peer).is_err() {
            return;
        }
        if abuse.check_auth_attempt(peer, Some(id)).is_ok() {
            let key = Abuse::failure_key(Some(id), true, store);
            let _ = abuse.auth_failed(peer, key);
        }
    }

    fn may_log_in(abuse: &Abuse, peer: IpAddr, id: &str) -> bool {
        abuse.admit(peer).is_ok() && abuse.check_auth_attempt(peer, Some(id)).is_ok()
    }

    /// The black-box reproduction at default sizes: 875 addresses, 16,600
    /// failed logins with made-up ids (one failure per id, ~19 per address,
    /// ~400 per second). Valid keys, the admin key among them, are then
    /// still checked (never refused before the authenticator runs).
    #[test]
    fn made_up_key_ids_at_default_sizes_lock_no_valid_key_out() {
        let clock = Arc::new(ManualClock::new());
        let abuse = Abuse::new(
            Arc::new(Settings::new(ServerOptions::default())),
            clock.clone(),
        );
        let store = ApiKeyStore::in_memory();
        let (admin, _) = store
            .create(KeySpec::new("admin_privileges".parse().unwrap()))
            .unwrap();
        let (user, _) = store
            .create(KeySpec::new("invoke_functions".parse().unwrap()))
            .unwrap();
        let addr = |i: u32| IpAddr::from((0x0a00_0000u32 + i % 875).to_be_bytes());
        for i in 0..16_600u32 {
            fail_login(&abuse, &store, addr(i), &format!("fake{i:08}"));
            clock.advance(Duration::from_micros(2_500));
        }
        assert_eq!(abuse.blocklist.tracked().1, 0, "made-up ids were tracked");
        for id in [&admin.id, &user.id] {
            assert!(may_log_in(&abuse, addr(5), id), "old address");
            assert!(
                may_log_in(&abuse, IpAddr::from([192, 0, 2, 1]), id),
                "new address"
            );
        }
    }

    /// An IPv6 /48 holds 65,536 /64s: failures from 20,000 of them fill the
    /// address tables at their default size; a correct credential from a
    /// new /64 is still checked, and failures from it share the overflow
    /// window.
    #[test]
    fn a_spray_of_v6_prefixes_at_default_sizes_locks_no_new_address_out() {
        let clock = Arc::new(ManualClock::new());
        let abuse = Abuse::new(
            Arc::new(Settings::new(ServerOptions::default())),
            clock.clone(),
        );
        let store = ApiKeyStore::in_memory();
        let (user, _) = store
            .create(KeySpec::new("invoke_functions".parse().unwrap()))
            .unwrap();
        let prefix = |i: u16| IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 7, i, 0, 0, 0, 1));
        for i in 0..20_000u16 {
            fail_login(&abuse, &store, prefix(i), "madeupkey001");
            clock.advance(Duration::from_micros(2_500));
        }
        assert_eq!(abuse.blocklist.tracked().0, 16_384);
        assert!(abuse.snapshot(0, 0).auth_failure_overflow_count > 0);
        let fresh = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 9, 9, 0, 0, 0, 1));
        assert!(may_log_in(&abuse, fresh, &user.id));
        assert!(may_log_in(&abuse, prefix(3), &user.id));
    }

    #[test]
    fn a_known_key_that_fails_is_blocked_on_its_own_window() {
        let clock = Arc::new(ManualClock::new());
        let abuse = Abuse::new(
            Arc::new(Settings::new(ServerOptions::default())),
            clock.clone(),
        );
        let store = ApiKeyStore::in_memory();
        let (victim, _) = store
            .create(KeySpec::new("invoke_functions".parse().unwrap()))
            .unwrap();
        for i in 0..20u8 {
            fail_login(&abuse, &store, IpAddr::from([10, 1, 0, i]), &victim.id);
        }
        let refused = abuse
            .check_auth_attempt(IpAddr::from([10, 2, 0, 1]), Some(&victim.id))
            .unwrap_err();
        assert_eq!(refused.code, ErrorCode::AuthThrottled);
        clock.advance(Duration::from_secs(61));
        assert!(may_log_in(&abuse, IpAddr::from([10, 2, 0, 1]), &victim.id));
    }
}
