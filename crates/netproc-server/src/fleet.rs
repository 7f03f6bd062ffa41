//! Limits shared by a fleet through Redis (feature `shared-limits`):
//! request buckets leased from a fleet-wide bucket, failed logins counted
//! fleet-wide, and blocks announced to every server. `docs/fleet.md` is the
//! operator's side; this is the mechanism.
//!
//! - **Buckets**: each server leases tokens from a Redis hash per key or
//!   address (one script: refill by elapsed Redis `TIME`, take up to n) and
//!   spends them locally through [`Lease`]; the lease size is at most
//!   `ε × burst / N_active`, so the fleet overspends by at most
//!   `ε × burst`. No Redis round trip on the call path: a lease is asked
//!   for ahead of need, on a spawned task.
//! - **Servers**: a sorted set of live servers (member: a random id, score:
//!   its heartbeat's expiry in Redis time), refreshed every second; its
//!   size is `N_active`.
//! - **Failures and blocks**: a failure of a known key (or from an address)
//!   increments a counter with the window as TTL; at the threshold the
//!   script sets a block key with the block's TTL and publishes it. Every
//!   server subscribes, and reads every current block when it (re)connects.
//! - **Failure policy**: while Redis is unreachable each server limits on
//!   its fallback share of the budget (default `1 / N_last_seen`), says so
//!   once at WARN and in `netproc_shared_limits_connected`, and reconnects
//!   with backoff. A foreign value under a netproc key puts that key on the
//!   fallback share, with a warning.
//!
//! Every key is under `netproc:<fleet>:` and has a TTL no longer than its
//! refill time, window or block. Redis Cluster is not supported (a single
//! primary, with replicas or Sentinel, is).

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use netproc_limits::{Blocklist, Clock, KeyedTable, Lease, Take, TokenBucket};
use redis::aio::ConnectionManager;
use redis::{AsyncCommands, Script};
use tokio_util::sync::CancellationToken;

use crate::abuse::{Counter, Fleet};
use crate::options::{BucketControls, ServerOptions};
use crate::shared::Shared;

/// How a server shares its limits with the fleet through Redis.
///
/// ```
/// use netproc_server::SharedLimits;
///
/// let shared = SharedLimits::new("redis://127.0.0.1:6379", "payments")
///     .epsilon(0.05)
///     .share_addresses(false);
/// assert_eq!(shared.fleet_name(), "payments");
/// ```
#[derive(Clone)]
#[non_exhaustive]
pub struct SharedLimits {
    url: String,
    fleet: String,
    ca_pem: Option<Vec<u8>>,
    share_keys: bool,
    share_addresses: bool,
    share_failures: bool,
    epsilon: f64,
    fallback_share: Option<f64>,
    heartbeat: Duration,
}

impl std::fmt::Debug for SharedLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedLimits")
            .field("url", &redact(&self.url))
            .field("fleet", &self.fleet)
            .field("epsilon", &self.epsilon)
            .finish_non_exhaustive()
    }
}

/// A URL with its password replaced, for logs.
pub(crate) fn redact(url: &str) -> String {
    match (url.split_once("://"), url.rfind('@')) {
        (Some((scheme, rest)), Some(_)) => {
            let (creds, host) = rest.rsplit_once('@').unwrap_or(("", rest));
            let user = creds.split(':').next().unwrap_or("");
            format!("{scheme}://{user}:***@{host}")
        }
        _ => url.to_owned(),
    }
}

impl SharedLimits {
    /// Shares every scope (per-key and per-address buckets, failed logins
    /// and blocks) with the servers that use the same Redis and `fleet`.
    /// `url` is `redis://[user:password@]host:port[/db]` or `rediss://…`
    /// (TLS with the workspace's rustls; see [`ca_pem`](Self::ca_pem)).
    pub fn new(url: impl Into<String>, fleet: impl Into<String>) -> SharedLimits {
        SharedLimits {
            url: url.into(),
            fleet: fleet.into(),
            ca_pem: None,
            share_keys: true,
            share_addresses: true,
            share_failures: true,
            epsilon: 0.05,
            fallback_share: None,
            heartbeat: Duration::from_secs(1),
        }
    }

    /// The fleet's name: keys live under `netproc:<fleet>:`.
    pub fn fleet_name(&self) -> &str {
        &self.fleet
    }

    /// For `rediss://`: trust this CA (PEM) instead of the system's roots.
    pub fn ca_pem(mut self, pem: Vec<u8>) -> SharedLimits {
        self.ca_pem = Some(pem);
        self
    }

    /// Share the per-API-key request bucket (default true).
    pub fn share_keys(mut self, on: bool) -> SharedLimits {
        self.share_keys = on;
        self
    }

    /// Share the per-address request bucket (default true).
    pub fn share_addresses(mut self, on: bool) -> SharedLimits {
        self.share_addresses = on;
        self
    }

    /// Count failed logins and share blocks fleet-wide (default true).
    pub fn share_failures(mut self, on: bool) -> SharedLimits {
        self.share_failures = on;
        self
    }

    /// ε: the fleet overspends a bucket by at most `ε × burst` (default
    /// 0.05, within `0.001..=0.5`).
    pub fn epsilon(mut self, epsilon: f64) -> SharedLimits {
        self.epsilon = epsilon.clamp(0.001, 0.5);
        self
    }

    /// While Redis is unreachable, each server limits on this share of a
    /// bucket (default `1 / N_last_seen`).
    pub fn fallback_share(mut self, share: f64) -> SharedLimits {
        self.fallback_share = Some(share.clamp(0.001, 1.0));
        self
    }

    /// How often a server says it is alive (default 1 s; a server counts
    /// for three of these).
    pub fn heartbeat(mut self, every: Duration) -> SharedLimits {
        self.heartbeat = every.max(Duration::from_millis(50));
        self
    }
}

/// One key's or address's local account.
struct Entry {
    lease: Lease,
    /// Redis held a foreign value under this key: limit locally.
    foreign: bool,
}

impl netproc_limits::Idle for Entry {
    fn is_idle(&mut self, _now: Instant) -> bool {
        self.lease.available() == 0 && self.lease.debt() == 0 && !self.lease.pending()
    }
}

struct Fallback {
    bucket: TokenBucket,
    share_millis: u32,
}

impl netproc_limits::Idle for Fallback {
    fn is_idle(&mut self, now: Instant) -> bool {
        self.bucket.is_full(now)
    }
}

/// One shared scope's local state: the leases, and the buckets used while
/// Redis is unreachable.
struct Scope<K> {
    leases: KeyedTable<K, Entry>,
    fallback: KeyedTable<K, Fallback>,
}

impl<K: std::hash::Hash + Eq + Clone> Scope<K> {
    fn new(size: usize) -> Scope<K> {
        Scope {
            leases: KeyedTable::new(size),
            fallback: KeyedTable::new(size),
        }
    }
}

/// Which scope of a [`RedisFleet`].
type ScopeOf<K> = fn(&RedisFleet) -> &Scope<K>;

/// The Redis side of [`Fleet`].
pub(crate) struct RedisFleet {
    client: redis::Client,
    prefix: String,
    config: SharedLimits,
    server_id: String,
    conn: Mutex<Option<ConnectionManager>>,
    connected: AtomicBool,
    n_active: AtomicU32,
    keys: Scope<String>,
    ips: Scope<IpAddr>,
    blocklist: Arc<Blocklist>,
    clock: Arc<dyn Clock>,
    shared: std::sync::Weak<Shared>,
    lease_script: Script,
    fail_script: Script,
    heartbeat_script: Script,
    warned_foreign: AtomicBool,
    /// Failure records on their way to Redis; past the cap a failure is
    /// counted locally only (a flood never grows tasks without bound).
    failures_in_flight: AtomicU32,
}

/// Failure records sent to Redis at once, at most.
const MAX_FAILURES_IN_FLIGHT: u32 = 256;

/// Take up to `want` tokens from the bucket at KEYS[1]. ARGV: rate per
/// second, capacity, want, TTL ms, refund. Returns {granted, wait ms}.
/// Redis's clock, never the servers'.
const LEASE_LUA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local v = redis.call('HMGET', KEYS[1], 't', 'ts')
local rate = tonumber(ARGV[1])
local cap = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local tokens = tonumber(v[1])
local ts = tonumber(v[2])
if tokens == nil or ts == nil then
  if v[1] or v[2] then
    return redis.error_reply('WRONGTYPE a netproc bucket holds a foreign value')
  end
  tokens = cap
  ts = now
end
if now > ts then
  tokens = math.min(cap, tokens + (now - ts) * rate / 1000000)
  ts = now
end
tokens = math.min(cap, tokens + tonumber(ARGV[5]))
local got = math.min(want, math.floor(tokens))
tokens = tokens - got
local wait = 0
if got < want and rate > 0 and tokens < 1 then
  wait = math.ceil((1 - tokens) / rate * 1000)
end
redis.call('HSET', KEYS[1], 't', tostring(tokens), 'ts', tostring(ts))
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return {got, wait}
";

/// A failed login: KEYS[1] the window's counter, KEYS[2] the block. ARGV:
/// window ms, threshold, block ms, channel, message. Returns 1 when it
/// blocked.
const FAIL_LUA: &str = r"
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
if n >= tonumber(ARGV[2]) then
  redis.call('SET', KEYS[2], '1', 'PX', ARGV[3])
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', ARGV[4], ARGV[5])
  return 1
end
return 0
";

/// The live servers: KEYS[1] a sorted set. ARGV: this server's id, its
/// lifetime ms. Returns how many are alive.
const HEARTBEAT_LUA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) * 2)
return redis.call('ZCARD', KEYS[1])
";

impl RedisFleet {
    /// Builds the fleet side; connects in the background (a server starts
    /// whether or not Redis is up).
    pub(crate) fn new(
        config: SharedLimits,
        shared: &Arc<Shared>,
    ) -> Result<Arc<RedisFleet>, crate::ServerError> {
        // rustls needs a process-wide provider for the client's config:
        // ring, the workspace's one (a no-op when one is installed).
        let _ = rustls::crypto::CryptoProvider::install_default(
            (*netproc_pki::crypto_provider()).clone(),
        );
        let bad = |e: redis::RedisError| {
            crate::ServerError::SharedLimits(format!(
                "shared_limits.redis_url {}: {e}",
                redact(&config.url)
            ))
        };
        let client = match &config.ca_pem {
            Some(pem) => redis::Client::build_with_tls(
                config.url.as_str(),
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem.clone()),
                },
            ),
            None => redis::Client::open(config.url.as_str()),
        }
        .map_err(bad)?;
        if config.fleet.is_empty()
            || !config
                .fleet
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(crate::ServerError::SharedLimits(format!(
                "shared_limits.fleet {:?}: 1 or more of [A-Za-z0-9._-]",
                config.fleet
            )));
        }
        let options = shared.options();
        let tracked_keys = options.auth_controls.max_tracked_api_keys as usize;
        let tracked_ips = options.connection_controls.max_tracked_ips as usize;
        let mut id = [0u8; 8];
        let _ = netproc_pki::random_bytes(&mut id);
        Ok(Arc::new(RedisFleet {
            client,
            prefix: format!("netproc:{}:", config.fleet),
            server_id: format!("{}-{:016x}", shared.name, u64::from_le_bytes(id)),
            config,
            conn: Mutex::new(None),
            connected: AtomicBool::new(false),
            n_active: AtomicU32::new(1),
            keys: Scope::new(tracked_keys),
            ips: Scope::new(tracked_ips),
            blocklist: Arc::clone(&shared.abuse.blocklist),
            clock: Arc::clone(&shared.abuse.clock),
            shared: Arc::downgrade(shared),
            lease_script: Script::new(LEASE_LUA),
            fail_script: Script::new(FAIL_LUA),
            heartbeat_script: Script::new(HEARTBEAT_LUA),
            warned_foreign: AtomicBool::new(false),
            failures_in_flight: AtomicU32::new(0),
        }))
    }

    /// Starts the heartbeat (which also connects and reconnects) and the
    /// block subscription; both stop at `shutdown`.
    pub(crate) fn start(self: &Arc<Self>, shutdown: CancellationToken) {
        tokio::spawn(Arc::clone(self).heartbeat_loop(shutdown.clone()));
        if self.config.share_failures {
            tokio::spawn(Arc::clone(self).block_loop(shutdown));
        }
    }

    fn channel(&self) -> String {
        format!("{}blocks", self.prefix)
    }

    fn connection(&self) -> Option<ConnectionManager> {
        self.conn
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn count(&self, c: Counter) {
        if let Some(shared) = self.shared.upgrade() {
            shared.abuse.count(c);
        }
    }

    fn set_connected(&self, up: bool) {
        let was = self.connected.swap(up, Ordering::SeqCst);
        if was != up {
            metrics::gauge!("netproc_shared_limits_connected").set(f64::from(u8::from(up)));
            if up {
                tracing::info!(fleet = %self.config.fleet, servers = self.n_active.load(Ordering::Relaxed), "shared limits: connected to Redis");
            } else {
                tracing::warn!(
                    fleet = %self.config.fleet,
                    share = self.fallback_share(),
                    "shared limits: Redis unreachable; limiting on this server's fallback share until it is back"
                );
            }
        }
    }

    /// This server's share of a bucket while Redis is unreachable.
    fn fallback_share(&self) -> f64 {
        self.config
            .fallback_share
            .unwrap_or_else(|| 1.0 / f64::from(self.n_active.load(Ordering::Relaxed).max(1)))
    }

    /// The lease size for a bucket of `burst`: `ε × burst / N_active`, at
    /// least 1.
    fn lease_size(&self, burst: u32) -> u32 {
        let n = f64::from(self.n_active.load(Ordering::Relaxed).max(1));
        ((self.config.epsilon * f64::from(burst) / n).floor() as u32).max(1)
    }

    async fn heartbeat_loop(self: Arc<Self>, shutdown: CancellationToken) {
        let key = format!("{}servers", self.prefix);
        let lifetime = (self.config.heartbeat * 3).as_millis() as u64;
        let mut backoff = Duration::from_millis(100);
        loop {
            let mut conn = match self.connection() {
                Some(c) => c,
                None => {
                    let config = redis::aio::ConnectionManagerConfig::new()
                        .set_connection_timeout(Some(Duration::from_secs(1)))
                        .set_response_timeout(Some(Duration::from_millis(500)))
                        .set_number_of_retries(1);
                    let made = tokio::select! {
                        () = shutdown.cancelled() => return,
                        c = ConnectionManager::new_with_config(self.client.clone(), config) => c,
                    };
                    match made {
                        Ok(c) => {
                            *self.conn.lock().unwrap_or_else(PoisonError::into_inner) =
                                Some(c.clone());
                            c
                        }
                        Err(e) => {
                            tracing::debug!(error = %e, "shared limits: cannot connect to Redis");
                            self.set_connected(false);
                            tokio::select! {
                                () = shutdown.cancelled() => return,
                                () = tokio::time::sleep(backoff) => {}
                            }
                            backoff = (backoff * 2).min(Duration::from_secs(5));
                            continue;
                        }
                    }
                }
            };
            let beat: redis::RedisResult<u32> = self
                .heartbeat_script
                .key(&key)
                .arg(&self.server_id)
                .arg(lifetime)
                .invoke_async(&mut conn)
                .await;
            let wait = match beat {
                Ok(n) => {
                    self.n_active.store(n.max(1), Ordering::Relaxed);
                    self.set_connected(true);
                    backoff = Duration::from_millis(100);
                    self.config.heartbeat
                }
                Err(e) => {
                    tracing::debug!(error = %e, "shared limits: heartbeat failed");
                    self.set_connected(false);
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    backoff.min(self.config.heartbeat)
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(wait) => {}
            }
        }
        // Leave the set at once, so the others' lease sizes grow back.
        if let Some(mut conn) = self.connection() {
            let _: redis::RedisResult<()> = conn.zrem(&key, &self.server_id).await;
        }
    }

    /// Follows the fleet's blocks: every current one at each (re)connect,
    /// then the announcements.
    async fn block_loop(self: Arc<Self>, shutdown: CancellationToken) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let run = async {
                let mut pubsub = self.client.get_async_pubsub().await?;
                pubsub.subscribe(self.channel()).await?;
                self.load_blocks().await?;
                let mut messages = pubsub.on_message();
                while let Some(msg) = messages.next().await {
                    if let Ok(text) = msg.get_payload::<String>() {
                        self.apply_announcement(&text);
                    }
                }
                Ok::<(), redis::RedisError>(())
            };
            tokio::select! {
                () = shutdown.cancelled() => return,
                r = run => {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "shared limits: block subscription lost");
                    } else {
                        backoff = Duration::from_millis(100);
                    }
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    /// Reads every current block (its remaining TTL) into the local list.
    async fn load_blocks(&self) -> redis::RedisResult<()> {
        let mut conn = self.client.get_multiplexed_async_connection().await?;
        let pattern = format!("{}block:*", self.prefix);
        let keys: Vec<String> = {
            let mut iter: redis::AsyncIter<String> = conn.scan_match(&pattern).await?;
            let mut keys = Vec::new();
            while let Some(k) = iter.next_item().await {
                keys.push(k?);
                if keys.len() >= 100_000 {
                    break;
                }
            }
            keys
        };
        for key in keys {
            let ttl: i64 = conn.pttl(&key).await?;
            if ttl > 0
                && let Some(rest) = key.strip_prefix(&format!("{}block:", self.prefix))
                && let Some((kind, id)) = rest.split_once(':')
            {
                self.apply_block(kind, id, Duration::from_millis(ttl as u64));
            }
        }
        Ok(())
    }

    /// `block <kind> <id> <ms>` or `unblock <kind> <id>`.
    fn apply_announcement(&self, text: &str) {
        let mut parts = text.split(' ');
        match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some("block"), Some(kind), Some(id), Some(ms)) => {
                if let Ok(ms) = ms.parse::<u64>() {
                    self.apply_block(kind, id, Duration::from_millis(ms));
                }
            }
            (Some("unblock"), Some(_), Some(id), None) => {
                self.blocklist.unblock(id);
            }
            _ => {
                tracing::debug!("shared limits: an announcement that is not netproc's was ignored")
            }
        }
    }

    fn apply_block(&self, kind: &str, id: &str, ttl: Duration) {
        let now = self.clock.now();
        let until = now + ttl.min(Duration::from_secs(86_400));
        let held = match kind {
            "ip" => id
                .parse::<IpAddr>()
                .is_ok_and(|ip| self.blocklist.block_ip(ip, until, now)),
            "key" => self.blocklist.block_key(id, until, now),
            _ => return,
        };
        if !held {
            tracing::debug!(
                kind,
                "shared limits: a fleet block could not be held (table full)"
            );
        }
    }

    /// A token from a shared bucket through its lease; `refill` asks Redis.
    fn take<K, Q>(
        self: &Arc<Self>,
        scope_of: ScopeOf<K>,
        key: &Q,
        redis_key: impl FnOnce() -> String,
        spec: &BucketControls,
        now: Instant,
    ) -> Result<(), Duration>
    where
        K: std::hash::Hash + Eq + Clone + Send + 'static + std::borrow::Borrow<Q>,
        Q: std::hash::Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        let scope = scope_of(self);
        let (table, fallback) = (&scope.leases, &scope.fallback);
        if !self.connected.load(Ordering::Relaxed) {
            return self.fallback(fallback, key, spec, now);
        }
        let size = self.lease_size(spec.burst_tokens);
        let taken = table.with(
            key,
            now,
            || Entry {
                lease: Lease::new(size),
                foreign: false,
            },
            |e| {
                if e.foreign {
                    return None;
                }
                e.lease.set_max_lease(size);
                Some(e.lease.take(now))
            },
        );
        let take = match taken {
            Ok(Some(t)) => t,
            Ok(None) => return self.fallback(fallback, key, spec, now),
            // A full table of active entries: fail closed, as locally.
            Err(_) => return Err(Duration::from_millis(spec.interval_ms)),
        };
        match take {
            Take::Granted => Ok(()),
            Take::GrantedRefill(n) => {
                self.spawn_refill(scope_of, key.to_owned(), redis_key(), n, spec.clone());
                Ok(())
            }
            Take::Refused(retry) => Err(retry),
            Take::RefusedRefill(n, retry) => {
                self.spawn_refill(scope_of, key.to_owned(), redis_key(), n, spec.clone());
                Err(retry)
            }
        }
    }

    fn fallback<K, Q>(
        &self,
        table: &KeyedTable<K, Fallback>,
        key: &Q,
        spec: &BucketControls,
        now: Instant,
    ) -> Result<(), Duration>
    where
        K: std::hash::Hash + Eq + Clone + std::borrow::Borrow<Q>,
        Q: std::hash::Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        self.count(Counter::shared_limits_fallback_count);
        let share = self.fallback_share();
        let share_millis = (share * 1000.0).round() as u32;
        let scaled = |n: u32| ((f64::from(n) * share).floor() as u32).max(1);
        let make = || Fallback {
            bucket: TokenBucket::new(
                scaled(spec.tokens_per_interval),
                Duration::from_millis(spec.interval_ms),
                scaled(spec.burst_tokens),
                now,
            ),
            share_millis,
        };
        table
            .with(key, now, make, |f| {
                if f.share_millis != share_millis {
                    f.bucket.reconfigure(
                        scaled(spec.tokens_per_interval),
                        Duration::from_millis(spec.interval_ms),
                        scaled(spec.burst_tokens),
                        now,
                    );
                    f.share_millis = share_millis;
                }
                f.bucket.try_acquire(now)
            })
            .unwrap_or(Err(Duration::from_millis(spec.interval_ms)))
    }

    /// Asks Redis for `want` tokens of `redis_key` and credits the answer
    /// to the lease of `key` in `table`.
    fn spawn_refill<K: std::hash::Hash + Eq + Clone + Send + 'static>(
        self: &Arc<Self>,
        scope_of: ScopeOf<K>,
        key: K,
        redis_key: String,
        want: u32,
        spec: BucketControls,
    ) {
        let fleet = Arc::clone(self);
        tokio::spawn(async move {
            let rate =
                f64::from(spec.tokens_per_interval) * 1000.0 / spec.interval_ms.max(1) as f64;
            let capacity = spec.burst_tokens.max(1);
            // A full refill is the longest a bucket means anything.
            let ttl_ms = if rate > 0.0 {
                ((f64::from(capacity) / rate * 1000.0).ceil() as u64 + 1000).min(86_400_000)
            } else {
                86_400_000
            };
            let answer: Option<redis::RedisResult<(u32, u64)>> = match fleet.connection() {
                Some(mut conn) => Some(
                    fleet
                        .lease_script
                        .key(&redis_key)
                        .arg(rate)
                        .arg(capacity)
                        .arg(want)
                        .arg(ttl_ms)
                        .arg(0)
                        .invoke_async(&mut conn)
                        .await,
                ),
                None => None,
            };
            let now = fleet.clock.now();
            let table = &scope_of(&fleet).leases;
            match answer {
                Some(Ok((got, wait_ms))) => {
                    table.get(&key, |e| {
                        e.lease.granted(got, Duration::from_millis(wait_ms), now)
                    });
                }
                Some(Err(e)) if e.to_string().contains("WRONGTYPE") => {
                    if !fleet.warned_foreign.swap(true, Ordering::Relaxed) {
                        tracing::warn!(fleet = %fleet.config.fleet, "shared limits: a netproc key in Redis holds a foreign value; that key is limited on this server's fallback share");
                    }
                    table.get(&key, |e| {
                        e.foreign = true;
                        e.lease.failed();
                    });
                }
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "shared limits: lease failed");
                    table.get(&key, |e| e.lease.failed());
                    if e.is_io_error()
                        || e.is_timeout()
                        || e.is_connection_dropped()
                        || e.is_connection_refusal()
                    {
                        fleet.set_connected(false);
                    }
                }
                None => {
                    table.get(&key, |e| e.lease.failed());
                }
            }
        });
    }

    /// Records a failure in Redis: `kind` is `ip` or `key`.
    fn spawn_failure(
        self: &Arc<Self>,
        kind: &'static str,
        id: String,
        window_ms: u64,
        max: u32,
        block_ms: u64,
    ) {
        if self.failures_in_flight.fetch_add(1, Ordering::AcqRel) >= MAX_FAILURES_IN_FLIGHT {
            self.failures_in_flight.fetch_sub(1, Ordering::AcqRel);
            tracing::debug!(
                "shared limits: too many failures in flight; this one is counted locally only"
            );
            return;
        }
        let fleet = Arc::clone(self);
        tokio::spawn(async move {
            fleet
                .record_failure(kind, &id, window_ms, max, block_ms)
                .await;
            fleet.failures_in_flight.fetch_sub(1, Ordering::AcqRel);
        });
    }

    /// One failure into Redis's window; at the threshold the script sets
    /// and announces the block, which is applied here at once.
    async fn record_failure(
        &self,
        kind: &'static str,
        id: &str,
        window_ms: u64,
        max: u32,
        block_ms: u64,
    ) {
        let Some(mut conn) = self.connection() else {
            return;
        };
        let counter = format!("{}fail:{kind}:{id}", self.prefix);
        let block = format!("{}block:{kind}:{id}", self.prefix);
        let message = format!("block {kind} {id} {block_ms}");
        let blocked: redis::RedisResult<i64> = self
            .fail_script
            .key(&counter)
            .key(&block)
            .arg(window_ms.max(1))
            .arg(max.max(1))
            .arg(block_ms.max(1))
            .arg(self.channel())
            .arg(&message)
            .invoke_async(&mut conn)
            .await;
        match blocked {
            Ok(1) => self.apply_block(kind, id, Duration::from_millis(block_ms)),
            Ok(_) => {}
            Err(e) => {
                tracing::debug!(error = %e, "shared limits: a failure was not recorded fleet-wide")
            }
        }
    }
}

impl Fleet for Arc<RedisFleet> {
    fn take_key(
        &self,
        key: &str,
        spec: &BucketControls,
        now: Instant,
    ) -> Option<Result<(), Duration>> {
        if !self.config.share_keys {
            return None;
        }
        Some(self.take(
            |f| &f.keys,
            key,
            || format!("{}bucket:key:{key}", self.prefix),
            spec,
            now,
        ))
    }

    fn take_ip(
        &self,
        ip: IpAddr,
        spec: &BucketControls,
        now: Instant,
    ) -> Option<Result<(), Duration>> {
        if !self.config.share_addresses {
            return None;
        }
        Some(self.take(
            |f| &f.ips,
            &ip,
            || format!("{}bucket:ip:{ip}", self.prefix),
            spec,
            now,
        ))
    }

    fn auth_failed(&self, ip: IpAddr, key: Option<&str>, options: &ServerOptions) {
        if !self.config.share_failures || !self.connected.load(Ordering::Relaxed) {
            return;
        }
        let a = &options.auth_controls;
        if !a.enable_blocklist {
            return;
        }
        let ip = netproc_limits::ip_key(ip, options.connection_controls.ipv6_prefix_len);
        self.spawn_failure(
            "ip",
            ip.to_string(),
            a.failed_auth_window_ms,
            a.max_failed_auth_per_ip_per_window,
            a.block_duration_ms,
        );
        // Only ids the authenticator knows reach here (see
        // `Abuse::failure_key`): made-up ids never make a Redis key.
        if let Some(key) = key {
            self.spawn_failure(
                "key",
                key.to_owned(),
                a.failed_auth_window_ms,
                a.max_failed_auth_per_api_key_per_window,
                a.block_duration_ms,
            );
        }
    }

    fn unblocked(&self, entry: &str) {
        if !self.config.share_failures {
            return;
        }
        let kind = if entry.parse::<IpAddr>().is_ok() {
            "ip"
        } else {
            "key"
        };
        let fleet = Arc::clone(self);
        let entry = entry.to_owned();
        tokio::spawn(async move {
            let Some(mut conn) = fleet.connection() else {
                return;
            };
            let keys = [
                format!("{}block:{kind}:{entry}", fleet.prefix),
                format!("{}fail:{kind}:{entry}", fleet.prefix),
            ];
            let _: redis::RedisResult<()> = conn.del(&keys).await;
            let _: redis::RedisResult<()> = conn
                .publish(fleet.channel(), format!("unblock {kind} {entry}"))
                .await;
        });
    }

    fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_redacted_for_logs() {
        assert_eq!(redact("redis://:s3cret@h:6379/0"), "redis://:***@h:6379/0");
        assert_eq!(
            redact("rediss://user:pw@h:6380"),
            "rediss://user:***@h:6380"
        );
        assert_eq!(redact("redis://h:6379"), "redis://h:6379");
    }
}
