//! Memory of scripts that grow values without end, with the operation
//! budget out of the way (10^12) and a 20 s wall clock: each growth path
//! must stop at the documented size limits (default: 100 000 map entries or
//! array elements, 1 MiB strings), so the process's resident memory stays
//! bounded. Prints the peak RSS growth per path and exits 1 past the bound.
//!
//! `cargo bench -p netproc-script --bench growth`

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use netproc_script::{ScriptError, ScriptLimits, ScriptRuntime};

/// The bound asserted on the growth of resident memory per path. At the
/// default limits one value holds at most 100 000 entries (~10 MiB).
const BOUND_MIB: f64 = 64.0;

/// The process's peak resident memory (VmHWM), MiB: freed memory is kept
/// by the allocator, so only the peak says what a path cost.
fn peak_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    kib / 1024.0
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut limits = ScriptLimits::default();
    limits.max_operations = 1_000_000_000_000;
    limits.wall_clock_ms = 20_000;
    let rt = ScriptRuntime::builder().workers(1).limits(limits).build();
    let paths = [
        (
            "map index assignment",
            r#"fn f() { let m = #{}; let i = 0; loop { m["k" + i] = i; i += 1; } }"#,
        ),
        (
            "map inside an array",
            r#"fn f() { let a = [#{}]; let i = 0; loop { a[0]["k" + i] = i; i += 1; } }"#,
        ),
        (
            "map inside a map",
            r#"fn f() { let m = #{ inner: #{} }; let i = 0; loop { m.inner["k" + i] = i; i += 1; } }"#,
        ),
        (
            "map merge +=",
            r#"fn f() { let m = #{}; let i = 0; loop { let n = #{}; n["k" + i] = i; m += n; i += 1; } }"#,
        ),
        (
            "array push",
            r#"fn f() { let a = []; loop { a.push(1); } }"#,
        ),
        (
            "array inside a map",
            r#"fn f() { let m = #{ a: [] }; loop { m.a.push(1); } }"#,
        ),
        ("string +=", r#"fn f() { let s = ""; loop { s += "x"; } }"#),
    ];
    let mut failed = false;
    let start_peak = peak_mib();
    for (what, src) in paths {
        let f = Arc::new(rt.compile("f", src).expect("compiles"));
        let started = Instant::now();
        let deadline = Instant::now() + Duration::from_secs(30);
        let result = rt
            .call(&f, vec![], Arc::new(BTreeMap::new()), deadline)
            .expect("queued")
            .await;
        let grew = peak_mib() - start_peak;
        // Stopped by its size limit, or first by the wall clock (a merge
        // re-measures the whole map each time, so it is slow, not large).
        let stopped = matches!(
            result,
            Err(ScriptError::Limit {
                kind: "too_large",
                ..
            } | ScriptError::Timeout)
        );
        let ok = stopped && grew < BOUND_MIB;
        failed |= !ok;
        println!(
            "{what:24} peak RSS +{:>6.1} MiB since start  {:>6.2} s  {}",
            grew,
            started.elapsed().as_secs_f64(),
            match &result {
                Err(e) => format!("{e}"),
                Ok(v) => format!("returned {v:?}"),
            }
        );
    }
    if failed {
        eprintln!("a growth path was not stopped by its size limit within {BOUND_MIB} MiB");
        std::process::exit(1);
    }
}
