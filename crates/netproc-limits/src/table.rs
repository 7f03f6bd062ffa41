//! A keyed table of limiter states with bounded memory.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::hash::{BuildHasher, Hash};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
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
/// Candidates examined for eviction per shard visited.
const EVICTION_SCAN: usize = 8;

struct Shard<K, S> {
    map: HashMap<K, S, RandomState>,
    /// Keys in insertion order: the eviction scan's clock hand.
    order: VecDeque<K>,
}

/// A table of per-key limiter states (per IP, per API key, per function…)
/// whose memory is bounded.
///
/// - At most `max_keys` entries, exactly: a table created for n tracks at
///   most n keys, and refuses a new key only when n are tracked. The entries
///   are split over 16 shards, each with its own lock, so checks for
///   different keys rarely contend; one atomic count beside the shards holds
///   the bound.
/// - When the table is full, a new key may take the place of an **idle**
///   entry only ([`Idle`]): a limited client is never handed a fresh state by
///   eviction. If none of the examined entries is idle, the new key is
///   refused ([`TableFull`], fail closed) and counted in
///   [`overflows`](Self::overflows). What a refusal means is the caller's
///   choice (refuse the client, or count it in a shared window).
/// - Work per check is bounded: a hash lookup, and on insertion into a full
///   table at most 8 eviction candidates examined in each of the 16 shards.
pub struct KeyedTable<K, S> {
    shards: Box<[Mutex<Shard<K, S>>]>,
    max_keys: usize,
    /// Entries tracked across all shards; never above `max_keys`.
    len: AtomicUsize,
    hasher: RandomState,
    overflows: AtomicU64,
}

impl<K, S> fmt::Debug for KeyedTable<K, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedTable")
            .field("max_keys", &self.max_keys)
            .field("len", &self.len.load(Ordering::Relaxed))
            .field("overflows", &self.overflows.load(Ordering::Relaxed))
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<K: Hash + Eq + Clone, S: Idle> KeyedTable<K, S> {
    /// A table holding at most `max_keys` entries (at least 1).
    pub fn new(max_keys: usize) -> KeyedTable<K, S> {
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
            max_keys: max_keys.max(1),
            len: AtomicUsize::new(0),
            hasher: RandomState::default(),
            overflows: AtomicU64::new(0),
        }
    }

    /// The most entries this table holds.
    pub fn capacity(&self) -> usize {
        self.max_keys
    }

    fn shard_index<Q: Hash + ?Sized>(&self, key: &Q) -> usize {
        (self.hasher.hash_one(key) as usize) % SHARDS
    }

    /// Takes one of the `max_keys` places, if one is free.
    fn reserve(&self) -> bool {
        self.len
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_keys).then_some(n + 1)
            })
            .is_ok()
    }

    /// Runs `f` on `key`'s state, creating it with `new` if absent. `key`
    /// may be a borrowed form (`&str` for `String` keys): it is copied only
    /// when an entry is created.
    pub fn with<Q, R>(
        &self,
        key: &Q,
        now: Instant,
        new: impl FnOnce() -> S,
        f: impl FnOnce(&mut S) -> R,
    ) -> Result<R, TableFull>
    where
        K: std::borrow::Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        let home = self.shard_index(key);
        {
            let mut shard = lock(&self.shards[home]);
            if let Some(state) = shard.map.get_mut(key) {
                return Ok(f(state));
            }
            // A free place, or an idle entry of this shard whose place is
            // handed over (the count does not change).
            if self.reserve() || Self::evict_one(&mut shard, now) {
                return Ok(Self::insert(&mut shard, key, new, f));
            }
        }
        // Full, and nothing idle here: free a place in another shard, one
        // lock at a time (never two at once, so no lock order to keep).
        for step in 1..SHARDS {
            let mut other = lock(&self.shards[(home + step) % SHARDS]);
            if Self::evict_one(&mut other, now) {
                self.len.fetch_sub(1, Ordering::AcqRel);
                break;
            }
        }
        let mut shard = lock(&self.shards[home]);
        if let Some(state) = shard.map.get_mut(key) {
            return Ok(f(state));
        }
        if self.reserve() {
            return Ok(Self::insert(&mut shard, key, new, f));
        }
        self.overflows.fetch_add(1, Ordering::Relaxed);
        Err(TableFull)
    }

    fn insert<Q, R>(
        shard: &mut Shard<K, S>,
        key: &Q,
        new: impl FnOnce() -> S,
        f: impl FnOnce(&mut S) -> R,
    ) -> R
    where
        Q: ToOwned<Owned = K> + ?Sized,
    {
        let mut state = new();
        let r = f(&mut state);
        let key = key.to_owned();
        shard.map.insert(key.clone(), state);
        shard.order.push_back(key);
        r
    }

    /// Runs `f` on `key`'s state if it exists; never creates one.
    pub fn get<Q, R>(&self, key: &Q, f: impl FnOnce(&mut S) -> R) -> Option<R>
    where
        K: std::borrow::Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        lock(&self.shards[self.shard_index(key)])
            .map
            .get_mut(key)
            .map(f)
    }

    /// Forgets `key`. Returns whether it was there.
    pub fn remove(&self, key: &K) -> bool {
        let mut shard = lock(&self.shards[self.shard_index(key)]);
        let existed = shard.map.remove(key).is_some();
        if existed {
            shard.order.retain(|k| k != key);
            self.len.fetch_sub(1, Ordering::AcqRel);
        }
        existed
    }

    /// Removes one idle entry of `shard`, examining at most
    /// [`EVICTION_SCAN`] candidates. The caller accounts for the place.
    fn evict_one(shard: &mut Shard<K, S>, now: Instant) -> bool {
        for _ in 0..EVICTION_SCAN.min(shard.order.len()) {
            let Some(candidate) = shard.order.pop_front() else {
                return false;
            };
            let Some(state) = shard.map.get_mut(&candidate) else {
                // Cannot happen (order mirrors map); drop the stray key.
                continue;
            };
            if state.is_idle(now) {
                shard.map.remove(&candidate);
                return true;
            }
            shard.order.push_back(candidate);
        }
        false
    }

    /// Keys tracked now.
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }

    /// Whether no key is tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether as many keys are tracked as the table holds.
    pub fn is_full(&self) -> bool {
        self.len() >= self.max_keys
    }

    /// New keys refused because the table was full of active entries.
    pub fn overflows(&self) -> u64 {
        self.overflows.load(Ordering::Relaxed)
    }

    /// Visits every entry (for listings). Takes each shard's lock in turn.
    pub fn for_each(&self, mut f: impl FnMut(&K, &mut S)) {
        for shard in self.shards.iter() {
            let mut shard = lock(shard);
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
        assert_eq!(admitted, 16);
        assert_eq!(t.len(), 16);
        assert_eq!(t.overflows(), 1000 - 16);
    }

    #[test]
    fn a_small_bound_holds_exactly_whatever_the_shards() {
        for cap in 1..=20usize {
            let t = KeyedTable::<u32, Flag>::new(cap);
            let now = Instant::now();
            let admitted = (0..500u32)
                .filter(|k| t.with(k, now, || Flag(false), |_| ()).is_ok())
                .count();
            assert_eq!(admitted, cap, "cap {cap}");
            assert_eq!(t.len(), cap);
        }
    }

    #[test]
    fn an_idle_entry_in_another_shard_makes_room() {
        let t = KeyedTable::<u32, Flag>::new(4);
        let now = Instant::now();
        for k in 0..4u32 {
            t.with(&k, now, || Flag(k == 0), |_| ()).unwrap();
        }
        // Whichever shard the new key hashes to, key 0's place is taken.
        t.with(&100, now, || Flag(false), |_| ()).unwrap();
        assert_eq!(t.len(), 4);
        assert!(t.get(&0, |_| ()).is_none());
        assert!(t.with(&101, now, || Flag(false), |_| ()).is_err());
    }

    #[test]
    fn removing_frees_a_place() {
        let t = KeyedTable::<u32, Flag>::new(2);
        let now = Instant::now();
        t.with(&1, now, || Flag(false), |_| ()).unwrap();
        t.with(&2, now, || Flag(false), |_| ()).unwrap();
        assert!(t.with(&3, now, || Flag(false), |_| ()).is_err());
        assert!(t.remove(&1));
        assert!(!t.remove(&1));
        assert_eq!(t.len(), 1);
        t.with(&3, now, || Flag(false), |_| ()).unwrap();
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

    #[test]
    fn concurrent_inserts_never_pass_the_bound() {
        let t = std::sync::Arc::new(KeyedTable::<u32, Flag>::new(100));
        let now = Instant::now();
        let threads: Vec<_> = (0..4u32)
            .map(|n| {
                let t = std::sync::Arc::clone(&t);
                std::thread::spawn(move || {
                    (0..1000u32)
                        .filter(|k| t.with(&(n * 1000 + k), now, || Flag(false), |_| ()).is_ok())
                        .count()
                })
            })
            .collect();
        let admitted: usize = threads.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(admitted, 100);
        let mut seen = 0;
        t.for_each(|_, _| seen += 1);
        assert_eq!(seen, 100);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u32, bool),
        SetIdle(u32, bool),
        Remove(u32),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u32..300, any::<bool>()).prop_map(|(k, idle)| Op::Insert(k, idle)),
            2 => (0u32..300, any::<bool>()).prop_map(|(k, idle)| Op::SetIdle(k, idle)),
            1 => (0u32..300).prop_map(Op::Remove),
        ]
    }

    proptest! {
        /// A bound of n means n: never more than n keys tracked, and a new
        /// key is refused only while n are tracked.
        #[test]
        fn the_bound_is_exact(
            cap in 1usize..64,
            ops in proptest::collection::vec(op(), 1..1500),
        ) {
            let t = KeyedTable::<u32, Flag>::new(cap);
            let now = Instant::now();
            for op in ops {
                match op {
                    Op::Insert(k, idle) => {
                        let before = t.len();
                        let present = t.get(&k, |_| ()).is_some();
                        let r = t.with(&k, now, || Flag(idle), |_| ());
                        if r.is_err() {
                            prop_assert!(!present);
                            prop_assert_eq!(before, cap);
                        } else if !present && before < cap {
                            prop_assert_eq!(t.len(), before + 1);
                        }
                    }
                    Op::SetIdle(k, idle) => {
                        let _ = t.get(&k, |s| s.0 = idle);
                    }
                    Op::Remove(k) => {
                        let present = t.get(&k, |_| ()).is_some();
                        prop_assert_eq!(t.remove(&k), present);
                    }
                }
                let mut seen = 0;
                t.for_each(|_, _| seen += 1);
                prop_assert_eq!(seen, t.len());
                prop_assert!(t.len() <= cap);
            }
        }
    }
}
