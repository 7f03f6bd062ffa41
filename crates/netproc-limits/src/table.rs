//! A keyed table of limiter states with bounded memory.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::hash::{BuildHasher, Hash};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Instant;

/// A seeded hasher (foldhash: fast, with per-table random seeds against
/// collision flooding; each shard is bounded besides).
type RandomState = foldhash::fast::RandomState;

/// A limiter state that can say whether it is idle: back to its initial
/// condition (a full bucket, an empty window, not blocked), so forgetting it
/// changes nothing.
pub trait Idle {
    /// Whether forgetting this state at `now` would change no decision.
    fn is_idle(&mut self, now: Instant) -> bool;
}

/// The table is full of entries that are not idle: a new key is refused
/// rather than admitted with a fresh state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the limiter table is full of active entries")]
pub struct TableFull;

const SHARDS: usize = 16;
/// Candidates examined for eviction per insertion into a full shard.
const EVICTION_SCAN: usize = 8;

struct Shard<K, S> {
    map: HashMap<K, S, RandomState>,
    /// Keys in insertion order: the eviction scan's clock hand.
    order: VecDeque<K>,
}

/// A table of per-key limiter states (per IP, per API key, per function…)
/// whose memory is bounded.
///
/// - At most `max_keys` entries (split over 16 shards, each with its own
///   lock, so checks for different keys rarely contend).
/// - When a shard is full, a new key may take the place of an **idle** entry
///   only ([`Idle`]): a limited client is never handed a fresh state by
///   eviction. If none of the examined entries is idle, the new key is
///   refused ([`TableFull`], fail closed) and counted in
///   [`overflows`](Self::overflows).
/// - Work per check is bounded: a hash lookup, and at most 8 eviction
///   candidates examined on insertion into a full shard.
pub struct KeyedTable<K, S> {
    shards: Box<[Mutex<Shard<K, S>>]>,
    per_shard: usize,
    hasher: RandomState,
    overflows: AtomicU64,
}

impl<K, S> fmt::Debug for KeyedTable<K, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedTable")
            .field("max_keys", &(self.per_shard * SHARDS))
            .field("overflows", &self.overflows.load(Ordering::Relaxed))
            .finish()
    }
}

impl<K: Hash + Eq + Clone, S: Idle> KeyedTable<K, S> {
    /// A table holding at most `max_keys` entries (rounded up to a multiple
    /// of 16; at least 16).
    pub fn new(max_keys: usize) -> KeyedTable<K, S> {
        let per_shard = max_keys.div_ceil(SHARDS).max(1);
        let shards = (0..SHARDS)
            .map(|_| {
                Mutex::new(Shard {
                    map: HashMap::with_hasher(RandomState::default()),
                    order: VecDeque::new(),
                })
            })
            .collect();
        KeyedTable {
            shards,
            per_shard,
            hasher: RandomState::default(),
            overflows: AtomicU64::new(0),
        }
    }

    fn shard(&self, key: &K) -> MutexGuard<'_, Shard<K, S>> {
        let i = (self.hasher.hash_one(key) as usize) % SHARDS;
        self.shards[i]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `f` on `key`'s state, creating it with `new` if absent.
    pub fn with<R>(
        &self,
        key: &K,
        now: Instant,
        new: impl FnOnce() -> S,
        f: impl FnOnce(&mut S) -> R,
    ) -> Result<R, TableFull> {
        let mut shard = self.shard(key);
        if let Some(state) = shard.map.get_mut(key) {
            return Ok(f(state));
        }
        if shard.map.len() >= self.per_shard && !Self::evict_one(&mut shard, now) {
            self.overflows.fetch_add(1, Ordering::Relaxed);
            return Err(TableFull);
        }
        let mut state = new();
        let r = f(&mut state);
        shard.map.insert(key.clone(), state);
        shard.order.push_back(key.clone());
        Ok(r)
    }

    /// Runs `f` on `key`'s state if it exists; never creates one.
    pub fn get<R>(&self, key: &K, f: impl FnOnce(&mut S) -> R) -> Option<R> {
        self.shard(key).map.get_mut(key).map(f)
    }

    /// Forgets `key`. Returns whether it was there.
    pub fn remove(&self, key: &K) -> bool {
        let mut shard = self.shard(key);
        let existed = shard.map.remove(key).is_some();
        if existed {
            shard.order.retain(|k| k != key);
        }
        existed
    }

    fn evict_one(shard: &mut Shard<K, S>, now: Instant) -> bool {
        for _ in 0..EVICTION_SCAN.min(shard.order.len()) {
            let Some(candidate) = shard.order.pop_front() else {
                return false;
            };
            let idle = shard
                .map
                .get_mut(&candidate)
                .is_none_or(|state| state.is_idle(now));
            if idle {
                shard.map.remove(&candidate);
                return true;
            }
            shard.order.push_back(candidate);
        }
        false
    }

    /// Keys tracked now.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).map.len())
            .sum()
    }

    /// Whether no key is tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// New keys refused because the table was full of active entries.
    pub fn overflows(&self) -> u64 {
        self.overflows.load(Ordering::Relaxed)
    }

    /// Visits every entry (for listings). Takes each shard's lock in turn.
    pub fn for_each(&self, mut f: impl FnMut(&K, &mut S)) {
        for shard in self.shards.iter() {
            let mut shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
            for (k, s) in shard.map.iter_mut() {
                f(k, s);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// A state that is idle when its flag says so.
    struct Flag(bool);
    impl Idle for Flag {
        fn is_idle(&mut self, _now: Instant) -> bool {
            self.0
        }
    }

    #[test]
    fn a_full_table_of_active_entries_refuses_new_keys() {
        let t = KeyedTable::<u32, Flag>::new(16);
        let now = Instant::now();
        let mut admitted = 0;
        for k in 0..1000u32 {
            if t.with(&k, now, || Flag(false), |_| ()).is_ok() {
                admitted += 1;
            }
        }
        assert!(admitted <= 16 && t.len() <= 16);
        assert_eq!(t.overflows(), 1000 - admitted);
    }

    #[test]
    fn idle_entries_make_room_and_active_ones_keep_their_state() {
        let t = KeyedTable::<u32, Flag>::new(16);
        let now = Instant::now();
        for k in 0..1000u32 {
            // Even keys stay active, odd ones become idle at once.
            let _ = t.with(&k, now, || Flag(k % 2 == 1), |_| ());
        }
        assert!(t.len() <= 16);
        // No active key was ever evicted: each one still present is still active.
        t.for_each(|k, s| {
            if k % 2 == 0 {
                assert!(!s.0);
            }
        });
    }

    proptest! {
        #[test]
        fn eviction_keeps_the_key_count_within_the_bound(
            cap in 1usize..200,
            ops in proptest::collection::vec((0u32..5000, any::<bool>()), 1..2000),
        ) {
            let t = KeyedTable::<u32, Flag>::new(cap);
            let now = Instant::now();
            for (k, idle) in ops {
                let _ = t.with(&k, now, || Flag(idle), |s| s.0 = idle);
            }
            prop_assert!(t.len() <= cap.div_ceil(16).max(1) * 16);
        }
    }
}
