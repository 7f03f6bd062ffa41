//! One keyed token-bucket check for a key already present: uncontended, and
//! from two threads at once.
//!
//! `cargo bench -p netproc-limits --bench limiter`

use std::hint::black_box;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use netproc_limits::{KeyedTable, TokenBucket};

fn check(table: &KeyedTable<IpAddr, TokenBucket>, key: &IpAddr, now: Instant) -> bool {
    table
        .with(
            key,
            now,
            || TokenBucket::new(u32::MAX, Duration::from_millis(1), u32::MAX, now),
            |b| b.try_acquire(now).is_ok(),
        )
        .unwrap_or(false)
}

fn keyed_bucket(c: &mut Criterion) {
    let table = Arc::new(KeyedTable::<IpAddr, TokenBucket>::new(16_384));
    let key: IpAddr = "10.1.2.3".parse().unwrap();
    let now = Instant::now();
    check(&table, &key, now);
    c.bench_function("keyed_bucket_check/uncontended", |b| {
        b.iter(|| black_box(check(&table, black_box(&key), now)))
    });
    // Two threads hammering the same key (the worst case: one shard lock).
    c.bench_function("keyed_bucket_check/contended_2_threads_same_key", |b| {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let other = {
            let (table, stop) = (Arc::clone(&table), Arc::clone(&stop));
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    black_box(check(&table, &key, now));
                }
            })
        };
        b.iter(|| black_box(check(&table, black_box(&key), now)));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        other.join().unwrap();
    });
}

criterion_group!(benches, keyed_bucket);
criterion_main!(benches);
