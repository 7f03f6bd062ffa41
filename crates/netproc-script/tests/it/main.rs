//! The sandbox: each limit bites with its own error, the worker survives,
//! and nothing reaches the host.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use netproc_script::*;
use netproc_wire::Value;

fn limits(f: impl FnOnce(&mut ScriptLimits)) -> ScriptLimits {
    let mut l = ScriptLimits::default();
    f(&mut l);
    l
}

fn runtime(limits: ScriptLimits) -> ScriptRuntime {
    ScriptRuntime::builder().workers(1).limits(limits).build()
}

async fn run(
    rt: &ScriptRuntime,
    name: &str,
    src: &str,
    args: Vec<Value>,
) -> Result<Value, ScriptError> {
    let f = Arc::new(rt.compile(name, src)?);
    let deadline = Instant::now() + Duration::from_secs(10);
    rt.call(&f, args, Arc::new(BTreeMap::new()), deadline)?
        .await
}

#[tokio::test]
async fn a_syntax_error_reports_line_and_column() {
    let rt = runtime(ScriptLimits::default());
    let err = rt.compile("f", "fn f() {\n  let x = ;\n}").unwrap_err();
    let ScriptError::Syntax { line, column, .. } = err else {
        panic!("{err:?}")
    };
    assert_eq!(line, 2);
    assert!(column > 0);
    assert_eq!(
        err_code(&rt.compile("f", "fn f( {").unwrap_err()),
        "invalid_argument"
    );
}

fn err_code(e: &ScriptError) -> &'static str {
    match e.code() {
        netproc_wire::ErrorCode::InvalidArgument => "invalid_argument",
        netproc_wire::ErrorCode::ScriptError => "script_error",
        netproc_wire::ErrorCode::Timeout => "timeout",
        netproc_wire::ErrorCode::OperationFailed => "operation_failed",
        _ => "other",
    }
}

#[tokio::test]
async fn only_fn_definitions_are_allowed_and_the_entry_must_exist() {
    let rt = runtime(ScriptLimits::default());
    assert!(matches!(
        rt.compile("f", "let x = 1; fn f() { x }"),
        Err(ScriptError::Shape(_))
    ));
    assert!(matches!(
        rt.compile("f", "fn g() { 1 }"),
        Err(ScriptError::Shape(_))
    ));
    // Helpers are fine.
    assert_eq!(
        run(
            &rt,
            "f",
            "fn helper(x) { x * 2 } fn f(x) { helper(x) + 1 }",
            vec![Value::Int(4)]
        )
        .await
        .unwrap(),
        Value::Int(9)
    );
}

#[tokio::test]
async fn an_infinite_loop_is_stopped_by_operations_or_the_clock_and_the_worker_survives() {
    let rt = runtime(limits(|l| {
        l.max_operations = 50_000;
    }));
    let err = run(&rt, "spin", "fn spin() { loop {} }", vec![])
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            ScriptError::Limit {
                kind: "operations_exceeded",
                ..
            }
        ),
        "{err:?}"
    );
    let fast = runtime(limits(|l| {
        l.max_operations = u64::MAX / 2;
        l.wall_clock_ms = 100;
    }));
    let started = Instant::now();
    let err = run(&fast, "spin", "fn spin() { loop {} }", vec![])
        .await
        .unwrap_err();
    assert_eq!(err, ScriptError::Timeout);
    assert!(started.elapsed() < Duration::from_secs(2));
    // The same worker serves the next call.
    assert_eq!(
        run(&fast, "one", "fn one() { 1 }", vec![]).await.unwrap(),
        Value::Int(1)
    );
}

#[tokio::test]
async fn deep_recursion_is_a_stack_overflow_not_a_crash() {
    let rt = runtime(ScriptLimits::default());
    let err = run(&rt, "r", "fn r(n) { r(n + 1) }", vec![Value::Int(0)])
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            ScriptError::Limit {
                kind: "stack_overflow",
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(err_code(&err), "script_error");
}

#[tokio::test]
async fn huge_strings_and_arrays_are_too_large() {
    let rt = runtime(limits(|l| {
        l.max_string_bytes = 1000;
        l.max_array_len = 100;
    }));
    let err = run(
        &rt,
        "s",
        r#"fn s() { let x = "a"; loop { x += x; } }"#,
        vec![],
    )
    .await
    .unwrap_err();
    assert!(
        matches!(
            err,
            ScriptError::Limit {
                kind: "too_large",
                ..
            }
        ),
        "{err:?}"
    );
    let err = run(
        &rt,
        "a",
        "fn a() { let x = []; loop { x.push(1); } }",
        vec![],
    )
    .await
    .unwrap_err();
    assert!(
        matches!(
            err,
            ScriptError::Limit {
                kind: "too_large",
                ..
            }
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_throw_is_operation_failed_with_its_message_and_runtime_errors_have_positions() {
    let rt = runtime(ScriptLimits::default());
    let err = run(&rt, "t", r#"fn t() { throw "nope" }"#, vec![])
        .await
        .unwrap_err();
    assert_eq!(
        err,
        ScriptError::Thrown {
            message: "nope".into()
        }
    );
    assert_eq!(err_code(&err), "operation_failed");
    let err = run(&rt, "u", "fn u() {\n  undefined_function()\n}", vec![])
        .await
        .unwrap_err();
    let ScriptError::Runtime { line, .. } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(*line, 2);
    let Value::Map(d) = err.details() else {
        panic!()
    };
    assert_eq!(d["kind"], Value::from("runtime_error"));
}

#[tokio::test]
async fn path_imports_cannot_reach_the_disk() {
    let rt = runtime(ScriptLimits::default());
    let dir = std::env::temp_dir().join("netproc-script-import-test.rhai");
    std::fs::write(&dir, "fn secret() { 42 }").unwrap();
    let src = format!(
        r#"fn f() {{ import "{}" as m; m::secret() }}"#,
        dir.display()
    );
    let err = run(&rt, "f", &src, vec![]).await.unwrap_err();
    assert!(
        matches!(&err, ScriptError::Runtime { message, .. } if message.contains("not found")),
        "{err:?}"
    );
    let _ = std::fs::remove_file(dir);
    let err = run(&rt, "e", r#"fn e() { eval("1 + 1") }"#, vec![]);
    assert!(err.await.is_err(), "eval must be disabled");
}

#[tokio::test]
async fn dependencies_host_modules_and_constants() {
    let m = HostModule::new().function("triple", |args| match args {
        [Value::Int(x)] => Ok(Value::Int(x * 3)),
        _ => Err("triple(x) takes one integer".into()),
    });
    let rt = ScriptRuntime::builder()
        .workers(1)
        .host_module("math", m)
        .build();
    rt.define_dependency("host", &DependencySource::Host("math".into()))
        .unwrap();
    assert!(matches!(
        rt.define_dependency("x", &DependencySource::Host("nope".into())),
        Err(ScriptError::UnknownDependency(_))
    ));
    let f = Arc::new(
        rt.compile(
            "f",
            r#"fn f(x) { import "host" as h; h::triple(x) + constant("base") }"#,
        )
        .unwrap(),
    );
    assert_eq!(f.imports(), ["host"]);
    let consts = Arc::new(BTreeMap::from([("base".to_owned(), Value::Int(100))]));
    let deadline = Instant::now() + Duration::from_secs(5);
    assert_eq!(
        rt.call(&f, vec![Value::Int(2)], consts, deadline)
            .unwrap()
            .await
            .unwrap(),
        Value::Int(106)
    );
    // A missing constant is a script error (kind runtime_error), not a
    // crash and not a throw.
    let err = rt
        .call(&f, vec![Value::Int(2)], Arc::new(BTreeMap::new()), deadline)
        .unwrap()
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ScriptError::Runtime { message, .. } if message.contains("base")),
        "{err:?}"
    );
    assert_eq!(err.code(), netproc_wire::ErrorCode::ScriptError);
    assert_eq!(rt.dependencies(), ["host"]);
}

#[tokio::test]
async fn dropping_the_call_cancels_a_long_script() {
    let rt = runtime(limits(|l| {
        l.max_operations = u64::MAX / 2;
        l.wall_clock_ms = 60_000;
    }));
    let spin = Arc::new(rt.compile("spin", "fn spin() { loop {} }").unwrap());
    let deadline = Instant::now() + Duration::from_secs(60);
    let call = rt
        .call(&spin, vec![], Arc::new(BTreeMap::new()), deadline)
        .unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(100), call)
            .await
            .is_err()
    );
    // The single worker is free again promptly.
    let started = Instant::now();
    assert_eq!(
        run(&rt, "one", "fn one() { 1 }", vec![]).await.unwrap(),
        Value::Int(1)
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the cancelled script kept the worker"
    );
}

#[tokio::test]
async fn a_full_queue_answers_overloaded() {
    let rt = ScriptRuntime::builder()
        .workers(1)
        .queue_capacity(1)
        .limits(limits(|l| {
            l.max_operations = u64::MAX / 2;
            l.wall_clock_ms = 300;
        }))
        .build();
    let spin = Arc::new(rt.compile("spin", "fn spin() { loop {} }").unwrap());
    let deadline = Instant::now() + Duration::from_secs(5);
    let c = Arc::new(BTreeMap::new());
    let mut held = Vec::new();
    let mut overloaded = 0;
    for _ in 0..5 {
        match rt.call(&spin, vec![], Arc::clone(&c), deadline) {
            Ok(f) => held.push(tokio::spawn(f)),
            Err(ScriptError::Overloaded { retry_after }) => {
                assert!(retry_after > Duration::ZERO);
                overloaded += 1;
            }
            Err(e) => panic!("{e:?}"),
        }
    }
    assert!(overloaded >= 3, "{overloaded}");
    for h in held {
        assert_eq!(h.await.unwrap(), Err(ScriptError::Timeout));
    }
}

/// The test binary's captured log (DEBUG and above: `debug()` output).
fn script_log() -> &'static std::sync::Mutex<Vec<u8>> {
    netproc_testkit::log_capture(tracing::Level::DEBUG)
}

#[tokio::test]
async fn print_and_debug_output_is_capped_per_call_and_escaped() {
    let log = script_log();
    // 50,000 iterations take a while in a debug build on a busy machine:
    // this test is about output, not the wall clock.
    let rt = runtime(limits(|l| {
        l.max_operations = 10_000_000;
        l.wall_clock_ms = 60_000;
    }));
    let src = r#"fn printer(n) { let i = 0; while i < n { print("line " + i + "\n\x1b[31mforged"); debug(i); i += 1; } n }"#;
    assert_eq!(
        run(&rt, "printer", src, vec![Value::Int(50_000)])
            .await
            .unwrap(),
        Value::Int(50_000)
    );
    let text = String::from_utf8_lossy(&log.lock().unwrap()).into_owned();
    let mine: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("function=printer"))
        .collect();
    // 100 lines (print and debug together), then one "truncated" line.
    assert_eq!(mine.len(), 101, "{}", mine.len());
    assert!(mine[100].contains("output truncated"), "{}", mine[100]);
    assert!(mine[0].contains(r"line 0\n\u{1b}[31mforged"), "{}", mine[0]);
    assert!(!text.contains("\u{1b}"));
    // The next call has its own budget.
    run(&rt, "printer", src, vec![Value::Int(1)]).await.unwrap();
    let text = String::from_utf8_lossy(&log.lock().unwrap()).into_owned();
    let mine = text
        .lines()
        .filter(|l| l.contains("function=printer"))
        .count();
    assert_eq!(mine, 103);
}

/// The wall-clock limit counts from when a worker starts the call: calls
/// queued behind a slow one are not timed out by their wait.
#[tokio::test]
async fn the_wall_clock_limit_does_not_count_time_in_the_queue() {
    let rt = runtime(limits(|l| {
        l.max_operations = 1_000_000_000_000;
        l.wall_clock_ms = 300;
    }));
    let spin = Arc::new(rt.compile("spin", "fn spin() { loop {} }").unwrap());
    let quick = Arc::new(rt.compile("quick", "fn quick(x) { x + 1 }").unwrap());
    let deadline = Instant::now() + Duration::from_secs(10);
    let none = || Arc::new(BTreeMap::new());
    let started = Instant::now();
    let slow = rt.call(&spin, vec![], none(), deadline).unwrap();
    let queued: Vec<_> = (0..3)
        .map(|i| {
            rt.call(&quick, vec![Value::Int(i)], none(), deadline)
                .unwrap()
        })
        .collect();
    let slow = tokio::spawn(slow);
    for (i, call) in queued.into_iter().enumerate() {
        assert_eq!(call.await.unwrap(), Value::Int(i as i64 + 1));
    }
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert!(matches!(slow.await.unwrap(), Err(ScriptError::Timeout)));
    // The caller's deadline still bounds the wait in the queue.
    let slow = tokio::spawn(rt.call(&spin, vec![], none(), deadline).unwrap());
    let short = Instant::now() + Duration::from_millis(50);
    let waited = rt.call(&quick, vec![Value::Int(1)], none(), short).unwrap();
    assert!(matches!(waited.await, Err(ScriptError::Timeout)));
    let _ = slow.await;
}

/// Every documented size limit holds however a value grows, with the
/// operation budget raised out of the way: each growth path answers
/// `too_large` at the insertion that crosses the limit.
#[tokio::test]
async fn size_limits_hold_on_every_growth_path() {
    let rt = runtime(limits(|l| {
        l.max_operations = 1_000_000_000_000;
        l.wall_clock_ms = 6_000;
        l.max_map_len = 1_000;
        l.max_array_len = 1_000;
        l.max_string_bytes = 10_000;
    }));
    let cases = [
        (
            "map index assignment",
            r#"fn f() { let m = #{}; let i = 0; loop { m["k" + i] = i; i += 1; } }"#,
        ),
        (
            "map property assignment",
            r#"fn f() { let m = #{}; let i = 0; loop { m.x = i; m["p" + i] = 1; i += 1; } }"#,
        ),
        (
            "map merge +=",
            r#"fn f() { let m = #{}; let i = 0; loop { let n = #{}; n["k" + i] = i; m += n; i += 1; } }"#,
        ),
        (
            "map mixin",
            r#"fn f() { let m = #{}; let i = 0; loop { let n = #{}; n["k" + i] = i; m.mixin(n); i += 1; } }"#,
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
            "array push",
            r#"fn f() { let a = []; loop { a.push(1); } }"#,
        ),
        ("array +=", r#"fn f() { let a = []; loop { a += [1]; } }"#),
        (
            "array inside a map",
            r#"fn f() { let m = #{ a: [] }; loop { m.a.push(1); } }"#,
        ),
        (
            "array inside an array",
            r#"fn f() { let a = [[]]; loop { a[0].push(1); } }"#,
        ),
        ("string +=", r#"fn f() { let s = ""; loop { s += "x"; } }"#),
        (
            "string inside a map",
            r#"fn f() { let m = #{ s: "" }; loop { m.s += "x"; } }"#,
        ),
        (
            "string pad",
            r#"fn f() { let s = ""; s.pad(100000, "x"); s }"#,
        ),
    ];
    let mut wrong = Vec::new();
    for (what, src) in cases {
        let started = Instant::now();
        let result = run(&rt, "f", src, vec![]).await;
        let took = started.elapsed();
        let ok = matches!(
            &result,
            Err(ScriptError::Limit {
                kind: "too_large",
                ..
            })
        ) && took < Duration::from_secs(5);
        if !ok {
            wrong.push(format!("{what}: {result:?} after {took:?}"));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

/// A map or array reaches its limit exactly: n entries pass, n + 1 are
/// refused, whether the value is read again or returned.
#[tokio::test]
async fn a_map_grown_by_index_holds_exactly_its_limit() {
    let rt = runtime(limits(|l| {
        l.max_operations = 1_000_000_000_000;
        l.max_map_len = 500;
        l.max_array_len = 500;
    }));
    let count = r#"fn f(n) { let m = #{}; for i in 0..n { m["k" + i] = i; } m.len() }"#;
    let give = r#"fn f(n) { let a = [#{}]; for i in 0..n { a[0]["k" + i] = i; } a }"#;
    for src in [count, give] {
        assert!(
            run(&rt, "f", src, vec![Value::Int(500)]).await.is_ok(),
            "{src}"
        );
        let err = run(&rt, "f", src, vec![Value::Int(501)]).await.unwrap_err();
        assert!(
            matches!(
                err,
                ScriptError::Limit {
                    kind: "too_large",
                    ..
                }
            ),
            "{src}: {err:?}"
        );
    }
}

/// A host function's error is thrown into the script (`operation_failed`,
/// its message), whatever the number of arguments it was called with.
#[tokio::test]
async fn a_host_function_error_is_a_thrown_error() {
    let m = HostModule::new().function("count", |args| match args.len() {
        0..=2 => Ok(Value::Int(args.len() as i64)),
        n => Err(format!("count takes at most 2 arguments, got {n}")),
    });
    let rt = ScriptRuntime::builder()
        .workers(1)
        .host_module("util", m)
        .build();
    rt.define_dependency("u", &DependencySource::Host("util".into()))
        .unwrap();
    let ok = r#"fn f() { import "u" as u; u::count() + u::count(1, 2) }"#;
    assert_eq!(run(&rt, "f", ok, vec![]).await.unwrap(), Value::Int(2));
    let bad = r#"fn g() { import "u" as u; u::count(1, 2, 3) }"#;
    match run(&rt, "g", bad, vec![]).await.unwrap_err() {
        ScriptError::Thrown { message } => assert!(message.contains("at most 2"), "{message}"),
        other => panic!("{other:?}"),
    }
}
