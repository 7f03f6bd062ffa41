//! The failed-authentication blocklist.

use std::net::IpAddr;
use std::sync::{Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, Instant};

use crate::{Idle, KeyedTable, SlidingWindow, ip_key};

/// Settings of a [`Blocklist`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct BlocklistConfig {
    /// Window in which failures are counted.
    pub failed_auth_window: Duration,
    /// Failures (≥) in the window that block an address.
    pub max_failed_per_ip: u32,
    /// Failures (≥) in the window that block an API key id.
    pub max_failed_per_key: u32,
    /// How long a block lasts.
    pub block_duration: Duration,
    /// When false, failures are counted but nothing is ever blocked.
    pub enabled: bool,
    /// Addresses tracked at most.
    pub max_tracked_ips: usize,
    /// Key ids tracked at most.
    pub max_tracked_keys: usize,
    /// IPv6 addresses are keyed by this prefix.
    pub v6_prefix_len: u8,
}

impl Default for BlocklistConfig {
    /// The reference's defaults: 20 failures per 60 s block for 60 s.
    fn default() -> Self {
        BlocklistConfig {
            failed_auth_window: Duration::from_secs(60),
            max_failed_per_ip: 20,
            max_failed_per_key: 20,
            block_duration: Duration::from_secs(60),
            enabled: true,
            max_tracked_ips: 16_384,
            max_tracked_keys: 16_384,
            v6_prefix_len: 64,
        }
    }
}

#[derive(Debug)]
struct Failures {
    window: SlidingWindow,
    blocked_until: Option<Instant>,
}

impl Failures {
    fn new(window: Duration, max: u32) -> Failures {
        Failures {
            window: SlidingWindow::new(window, max.max(1)),
            blocked_until: None,
        }
    }

    fn blocked_for(&self, now: Instant) -> Option<Duration> {
        self.blocked_until
            .filter(|until| *until > now)
            .map(|until| (until - now).max(Duration::from_millis(1)))
    }

    fn fail(&mut self, now: Instant, max: u32, cfg: &BlocklistConfig) {
        let count = self.window.record(now);
        if cfg.enabled && count >= max {
            self.blocked_until = Some(now + cfg.block_duration);
        }
    }
}

impl Idle for Failures {
    /// Blocked entries are never idle, so never evicted.
    fn is_idle(&mut self, now: Instant) -> bool {
        self.blocked_for(now).is_none() && self.window.is_empty_at(now)
    }
}

/// What is blocked, as listed to administrators.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct BlockedEntry {
    /// `"ip"`, `"api_key"`, or `"ip_overflow"` / `"api_key_overflow"` for
    /// the shared window of untracked addresses or keys.
    pub kind: &'static str,
    /// The address (or prefix), the key id, or `"*"` for an overflow window.
    pub entry: String,
    /// How long the block still lasts.
    pub retry_after: Duration,
}

/// Where [`Blocklist::record_failure`] counted a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct FailureRecorded {
    /// The address table was full: the failure went to the shared window
    /// of untracked addresses.
    pub ip_overflow: bool,
    /// The key table was full: the failure went to the shared window of
    /// untracked keys.
    pub key_overflow: bool,
    /// The failure landed in an overflow window that is blocked now: which
    /// one (`"ip_overflow"` or `"api_key_overflow"`) and for how long. The
    /// caller answers this failure as throttled; it never refuses a later
    /// attempt because of it.
    pub overflow_blocked: Option<(&'static str, Duration)>,
}

/// Counts failed authentications per address and per API key id, and
/// blocks those over the threshold for a while.
///
/// The rule that holds whatever fills the tables: **a correct credential is
/// never refused because other clients filled a table.**
///
/// - [`ip_blocked`](Self::ip_blocked) and [`key_blocked`](Self::key_blocked)
///   answer for tracked entries only; they are the checks made before a
///   credential is verified.
/// - Memory is bounded: blocked entries are never evicted, and when a table
///   is full, failures from untracked addresses (or of untracked keys) are
///   counted in one shared overflow window. That window throttles
///   *failures* only ([`FailureRecorded::overflow_blocked`]): a new address
///   or key that presents a correct credential is still admitted.
/// - Only key ids that exist should be passed to
///   [`record_failure`](Self::record_failure): made-up ids would otherwise
///   fill the key table. Their failures count against the address.
///
/// ```
/// use std::time::{Duration, Instant};
/// use netproc_limits::{Blocklist, BlocklistConfig};
///
/// let mut cfg = BlocklistConfig::default();
/// cfg.max_failed_per_ip = 2;
/// let list = Blocklist::new(cfg);
/// let (ip, now) = ("10.0.0.1".parse().unwrap(), Instant::now());
/// list.record_failure(ip, None, now);
/// assert!(list.ip_blocked(ip, now).is_none());
/// list.record_failure(ip, None, now);
/// assert_eq!(list.ip_blocked(ip, now), Some(Duration::from_secs(60)));
/// assert!(list.ip_blocked(ip, now + Duration::from_secs(60)).is_none());
/// // A block decided elsewhere in the fleet:
/// assert!(list.block_key("k1", now + Duration::from_secs(5), now));
/// assert_eq!(list.key_blocked("k1", now), Some(Duration::from_secs(5)));
/// ```
#[derive(Debug)]
pub struct Blocklist {
    config: RwLock<BlocklistConfig>,
    ips: KeyedTable<IpAddr, Failures>,
    keys: KeyedTable<String, Failures>,
    ip_overflow: Mutex<Failures>,
    key_overflow: Mutex<Failures>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Blocklist {
    /// A blocklist with these settings.
    pub fn new(config: BlocklistConfig) -> Blocklist {
        Blocklist {
            ips: KeyedTable::new(config.max_tracked_ips),
            keys: KeyedTable::new(config.max_tracked_keys),
            ip_overflow: Mutex::new(Failures::new(
                config.failed_auth_window,
                config.max_failed_per_ip,
            )),
            key_overflow: Mutex::new(Failures::new(
                config.failed_auth_window,
                config.max_failed_per_key,
            )),
            config: RwLock::new(config),
        }
    }

    fn config(&self) -> BlocklistConfig {
        self.config
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Changes the settings at run time (table sizes stay as created).
    pub fn reconfigure(&self, config: BlocklistConfig) {
        *self.config.write().unwrap_or_else(PoisonError::into_inner) = config;
    }

    fn key_of(&self, ip: IpAddr) -> IpAddr {
        ip_key(
            ip,
            self.config
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .v6_prefix_len,
        )
    }

    /// If `ip` is blocked at `now`, for how much longer. Tracked addresses
    /// only: an address the table could not hold is never refused here.
    pub fn ip_blocked(&self, ip: IpAddr, now: Instant) -> Option<Duration> {
        let key = self.key_of(ip);
        self.ips.get(&key, |f| f.blocked_for(now)).flatten()
    }

    /// If API key `key_id` is blocked at `now`, for how much longer. Tracked
    /// keys only.
    pub fn key_blocked(&self, key_id: &str, now: Instant) -> Option<Duration> {
        self.keys.get(key_id, |f| f.blocked_for(now)).flatten()
    }

    /// Records a failed authentication from `ip`, against `key_id` too if
    /// the failure counts against that key: pass a key id only if it exists
    /// (and, for a key bound to a certificate, only for failures over that
    /// certificate).
    pub fn record_failure(
        &self,
        ip: IpAddr,
        key_id: Option<&str>,
        now: Instant,
    ) -> FailureRecorded {
        let cfg = self.config();
        let key = ip_key(ip, cfg.v6_prefix_len);
        let (window, max_ip, max_key) = (
            cfg.failed_auth_window,
            cfg.max_failed_per_ip,
            cfg.max_failed_per_key,
        );
        let mut out = FailureRecorded::default();
        let tracked = self.ips.with(
            &key,
            now,
            || Failures::new(window, max_ip),
            |f| f.fail(now, max_ip, &cfg),
        );
        if tracked.is_err() {
            out.ip_overflow = true;
            let mut overflow = lock(&self.ip_overflow);
            overflow.fail(now, max_ip, &cfg);
            if let Some(retry) = overflow.blocked_for(now) {
                out.overflow_blocked = Some(("ip_overflow", retry));
            }
        }
        if let Some(id) = key_id {
            let tracked = self.keys.with(
                id,
                now,
                || Failures::new(window, max_key),
                |f| f.fail(now, max_key, &cfg),
            );
            if tracked.is_err() {
                out.key_overflow = true;
                let mut overflow = lock(&self.key_overflow);
                overflow.fail(now, max_key, &cfg);
                if let Some(retry) = overflow.blocked_for(now) {
                    out.overflow_blocked = Some(("api_key_overflow", retry));
                }
            }
        }
        out
    }

    /// Blocks `ip` until `until`, as another server decided (a fleet-wide
    /// block): kept like a local one. `false` when the table is full of
    /// active entries and cannot hold it.
    pub fn block_ip(&self, ip: IpAddr, until: Instant, now: Instant) -> bool {
        let cfg = self.config();
        let key = ip_key(ip, cfg.v6_prefix_len);
        self.ips
            .with(
                &key,
                now,
                || Failures::new(cfg.failed_auth_window, cfg.max_failed_per_ip),
                |f| f.blocked_until = f.blocked_until.max(Some(until)),
            )
            .is_ok()
    }

    /// Blocks API key `key_id` until `until`, as another server decided.
    /// `false` when the table cannot hold it.
    pub fn block_key(&self, key_id: &str, until: Instant, now: Instant) -> bool {
        let cfg = self.config();
        self.keys
            .with(
                key_id,
                now,
                || Failures::new(cfg.failed_auth_window, cfg.max_failed_per_key),
                |f| f.blocked_until = f.blocked_until.max(Some(until)),
            )
            .is_ok()
    }

    /// Addresses and keys tracked now, for metrics: (addresses, keys).
    pub fn tracked(&self) -> (usize, usize) {
        (self.ips.len(), self.keys.len())
    }

    /// Everything blocked at `now`.
    pub fn blocked(&self, now: Instant) -> Vec<BlockedEntry> {
        let mut out = Vec::new();
        self.ips.for_each(|ip, f| {
            if let Some(retry_after) = f.blocked_for(now) {
                out.push(BlockedEntry {
                    kind: "ip",
                    entry: ip.to_string(),
                    retry_after,
                });
            }
        });
        self.keys.for_each(|id, f| {
            if let Some(retry_after) = f.blocked_for(now) {
                out.push(BlockedEntry {
                    kind: "api_key",
                    entry: id.clone(),
                    retry_after,
                });
            }
        });
        for (kind, overflow) in [
            ("ip_overflow", &self.ip_overflow),
            ("api_key_overflow", &self.key_overflow),
        ] {
            if let Some(retry_after) = lock(overflow).blocked_for(now) {
                out.push(BlockedEntry {
                    kind,
                    entry: "*".into(),
                    retry_after,
                });
            }
        }
        out
    }

    /// Lifts a block: `entry` is an address, a key id, or `"*"` for both
    /// overflow windows. Returns whether anything was lifted.
    pub fn unblock(&self, entry: &str) -> bool {
        if entry == "*" {
            let cfg = self.config();
            *lock(&self.ip_overflow) = Failures::new(cfg.failed_auth_window, cfg.max_failed_per_ip);
            *lock(&self.key_overflow) =
                Failures::new(cfg.failed_auth_window, cfg.max_failed_per_key);
            return true;
        }
        match entry.parse::<IpAddr>() {
            Ok(ip) => self.ips.remove(&self.key_of(ip)),
            Err(_) => self.keys.remove(&entry.to_owned()),
        }
    }

    /// (blocked addresses, blocked keys) at `now`, for metrics.
    pub fn blocked_counts(&self, now: Instant) -> (usize, usize) {
        let mut ips = 0;
        let mut keys = 0;
        self.ips
            .for_each(|_, f| ips += usize::from(f.blocked_for(now).is_some()));
        self.keys
            .for_each(|_, f| keys += usize::from(f.blocked_for(now).is_some()));
        (ips, keys)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(max: u32) -> BlocklistConfig {
        BlocklistConfig {
            max_failed_per_ip: max,
            max_failed_per_key: max,
            max_tracked_ips: 16,
            max_tracked_keys: 16,
            ..BlocklistConfig::default()
        }
    }

    #[test]
    fn a_key_brute_forced_from_many_ips_is_blocked() {
        let list = Blocklist::new(cfg(3));
        let now = Instant::now();
        for i in 0..3u8 {
            list.record_failure(IpAddr::from([10, 0, 0, i]), Some("victimkey123"), now);
        }
        assert!(list.key_blocked("victimkey123", now).is_some());
        assert!(list.ip_blocked(IpAddr::from([10, 0, 0, 0]), now).is_none());
    }

    #[test]
    fn disabled_blocklist_counts_but_never_blocks() {
        let list = Blocklist::new(BlocklistConfig {
            enabled: false,
            ..cfg(1)
        });
        let ip = IpAddr::from([1, 2, 3, 4]);
        let now = Instant::now();
        for _ in 0..10 {
            list.record_failure(ip, Some("k"), now);
        }
        assert!(list.ip_blocked(ip, now).is_none());
        assert!(list.key_blocked("k", now).is_none());
    }

    #[test]
    fn a_spray_of_addresses_fills_the_table_then_the_overflow_window_throttles() {
        let list = Blocklist::new(cfg(1));
        let now = Instant::now();
        // Each address fails once: blocked at once (max 1), so never evictable.
        for i in 0..200u32 {
            list.record_failure(IpAddr::from((0x0a00_0000u32 + i).to_be_bytes()), None, now);
        }
        let blocked = list.blocked(now);
        assert!(blocked.iter().filter(|b| b.kind == "ip").count() <= 16);
        assert!(blocked.iter().any(|b| b.kind == "ip_overflow"));
        assert_eq!(blocked.iter().filter(|b| b.kind == "ip").count(), 16);
        // A fresh address, never seen, is not refused before it tries…
        let fresh = IpAddr::from([192, 168, 1, 1]);
        assert!(list.ip_blocked(fresh, now).is_none());
        // …but its failure is answered as throttled by the overflow window.
        let r = list.record_failure(fresh, None, now);
        assert!(r.ip_overflow);
        assert_eq!(r.overflow_blocked.map(|b| b.0), Some("ip_overflow"));
        // Blocks expire on their own.
        let later = now + Duration::from_secs(61);
        assert!(list.ip_blocked(fresh, later).is_none());
        assert!(list.blocked(later).is_empty());
    }

    #[test]
    fn unblock_lifts_a_block() {
        let list = Blocklist::new(cfg(1));
        let ip: IpAddr = "2001:db8::1".parse().unwrap();
        let now = Instant::now();
        list.record_failure(ip, Some("k1"), now);
        // The /64 is blocked: a neighbour address too.
        assert!(
            list.ip_blocked("2001:db8::ffff".parse().unwrap(), now)
                .is_some()
        );
        assert!(list.unblock("2001:db8::1"));
        assert!(list.ip_blocked(ip, now).is_none());
        assert!(list.unblock("k1"));
        assert!(list.key_blocked("k1", now).is_none());
        assert!(!list.unblock("k1"));
    }

    #[test]
    fn keys_filling_the_table_never_block_an_untracked_key_before_it_tries() {
        let list = Blocklist::new(cfg(1));
        let now = Instant::now();
        for i in 0..100 {
            list.record_failure(IpAddr::from([10, 0, 0, 1]), Some(&format!("key{i}")), now);
        }
        let blocked = list.blocked(now);
        assert_eq!(blocked.iter().filter(|b| b.kind == "api_key").count(), 16);
        assert!(blocked.iter().any(|b| b.kind == "api_key_overflow"));
        // A tracked key that failed stays blocked on its own window.
        assert!(list.key_blocked("key0", now).is_some());
        // An untracked key is not refused before its secret is checked.
        assert!(list.key_blocked("key99", now).is_none());
        assert!(list.key_blocked("admin", now).is_none());
        // Its failure is throttled by the shared window.
        let r = list.record_failure(IpAddr::from([10, 0, 0, 2]), Some("admin"), now);
        assert!(r.key_overflow);
        assert_eq!(r.overflow_blocked.map(|b| b.0), Some("api_key_overflow"));
    }
}
