//! Bench accounting: process CPU time, medians, percentiles, knobs from
//! the environment.

/// This process's CPU time (user + system) in microseconds, from
/// `/proc/self/stat` (Linux; 0 elsewhere). Its resolution is the kernel's
/// clock tick, 10 ms at 100 Hz: measure over seconds, not calls.
#[must_use]
pub fn cpu_micros() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // The fields after the command name, which is in parentheses and may
    // hold spaces.
    let rest = stat.rsplit(')').next().unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime: fields 14 and 15 of the line, 12 and 13 after the
    // name; 100 ticks per second.
    (ticks(11) + ticks(12)) * 10_000
}

/// The median of `v` (the upper one of an even count).
///
/// # Panics
/// If `v` is empty.
#[must_use]
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The `p` quantile (0.0–1.0) of `sorted` nanoseconds, in microseconds; 0
/// for no samples.
#[must_use]
pub fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let i = ((sorted.len() - 1) as f64 * p.clamp(0.0, 1.0)).round() as usize;
    sorted[i] as f64 / 1000.0
}

/// The environment variable `name` parsed as a `T`, or `default` when it
/// is unset or does not parse.
#[must_use]
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_percentiles() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 3.0);
        let ns = [1_000, 2_000, 3_000, 4_000, 5_000];
        assert_eq!(percentile(&ns, 0.5), 3.0);
        assert_eq!(percentile(&ns, 1.0), 5.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
    }

    #[test]
    fn cpu_time_is_monotonic() {
        let a = cpu_micros();
        let mut x = 0u64;
        for i in 0..2_000_000u64 {
            x = x.wrapping_add(i * i);
        }
        std::hint::black_box(x);
        assert!(cpu_micros() >= a);
    }
}
