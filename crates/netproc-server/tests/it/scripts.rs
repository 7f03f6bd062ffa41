//! Run-time defined functions over the wire.

use std::sync::Arc;
use std::time::{Duration, Instant};

use netproc_auth::ApiKeyStore;
use netproc_client::{Client, ClientError};
use netproc_script::{ScriptLimits, ScriptRuntime};
use netproc_server::ServerHandle;
use netproc_wire::{DependencySource, ErrorCode, Value};

use crate::support::*;

async fn scripted(pki: &Pki, name: &str, keys: Arc<ApiKeyStore>) -> ServerHandle {
    let mut limits = ScriptLimits::default();
    limits.max_operations = 200_000;
    limits.wall_clock_ms = 500;
    limits.max_string_bytes = 10_000;
    let runtime = ScriptRuntime::builder().workers(2).limits(limits).build();
    builder(pki, name, keys)
        .options(unlimited())
        .scripts(runtime)
        .start()
        .await
        .unwrap()
}

fn script_kind(err: &ClientError) -> Option<String> {
    match err {
        ClientError::Remote {
            code: ErrorCode::ScriptError,
            details: Value::Map(d),
            ..
        } => match d.get("kind") {
            Some(Value::String(k)) => Some(k.clone()),
            _ => None,
        },
        _ => None,
    }
}

#[tokio::test]
async fn define_on_all_servers_then_call_everywhere() {
    let pki = Pki::new();
    let keys = Arc::new(ApiKeyStore::in_memory());
    let key = key(&keys, "invoke_functions,define_functions");
    let s1 = scripted(&pki, "server_1", Arc::clone(&keys)).await;
    let s2 = scripted(&pki, "server_2", Arc::clone(&keys)).await;
    let client = Client::builder()
        .server("server_1", endpoint(&pki, &s1, &key))
        .server("server_2", endpoint(&pki, &s2, &key))
        .build()
        .unwrap();
    let all = client.all_servers();
    let defined = all.define_function("mul", "fn mul(a, b) { a * b }").await;
    assert!(defined.values().all(Result::is_ok), "{defined:?}");
    // Idempotent: the same source again is a no-op.
    assert!(
        all.define_function("mul", "fn mul(a, b) { a * b }")
            .await
            .values()
            .all(Result::is_ok)
    );
    let products = all.call::<i64>("mul", (6, 7)).await;
    assert_eq!(products.len(), 2);
    assert!(
        products.values().all(|r| r.as_ref().ok() == Some(&42)),
        "{products:?}"
    );
    // Replacing changes behaviour everywhere.
    all.define_function("mul", "fn mul(a, b) { a * b * 10 }")
        .await;
    assert!(
        all.call::<i64>("mul", (1, 2))
            .await
            .values()
            .all(|r| r.as_ref().ok() == Some(&20))
    );
    // Listed with kind and hash.
    let listed = client
        .server("server_1")
        .unwrap()
        .list_functions()
        .await
        .unwrap();
    let mul = listed
        .iter()
        .find(|v| matches!(v, Value::Map(m) if m["name"] == Value::from("mul")))
        .unwrap();
    let Value::Map(m) = mul else { panic!() };
    assert_eq!(m["kind"], Value::from("script"));
    assert!(matches!(&m["source_sha256"], Value::String(h) if h.len() == 64));
}

#[tokio::test]
async fn definition_errors_are_invalid_argument_with_a_position() {
    let pki = Pki::new();
    let keys = Arc::new(ApiKeyStore::in_memory());
    let key = key(
        &keys,
        "invoke_functions,define_functions,undefine_functions",
    );
    let server = scripted(&pki, "s1", keys).await;
    let s = client(&pki, &server, &key).server("s1").unwrap();
    let err = s
        .define_function("f", "fn f() {\n  let = 1;\n}")
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ClientError::InvalidArgument { message, .. } if message.contains("line 2")),
        "{err:?}"
    );
    let err = s
        .define_function("f", "let x = 1; fn f() { 1 }")
        .await
        .unwrap_err();
    assert!(
        matches!(err, ClientError::InvalidArgument { .. }),
        "{err:?}"
    );
    let err = s
        .define_function("not-valid", "fn x() { 1 }")
        .await
        .unwrap_err();
    assert!(
        matches!(err, ClientError::InvalidArgument { .. }),
        "{err:?}"
    );
    // A native function cannot be replaced or undefined.
    let err = s
        .define_function("add", "fn add(a, b) { 0 }")
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ClientError::InvalidArgument { message, .. } if message.contains("native")),
        "{err:?}"
    );
    let err = s.undefine_function("add").await.unwrap_err();
    assert!(
        matches!(&err, ClientError::InvalidArgument { message, .. } if message.contains("native")),
        "{err:?}"
    );
    // A wrong hash is refused.
    let mut op = netproc_wire::DefineFunction {
        name: "g".into(),
        source: "fn g() { 1 }".into(),
        source_sha256: [0; 32],
        description: None,
        limits: None,
    };
    let err = s
        .execute(netproc_wire::Operation::DefineFunction(op.clone()))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ClientError::InvalidArgument { message, .. } if message.contains("SHA-256")),
        "{err:?}"
    );
    op.name = "g2".into();
    // Undefining an unknown name succeeds.
    s.undefine_function("never_defined").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runaway_scripts_hit_their_limits_while_other_calls_succeed() {
    let pki = Pki::new();
    let keys = Arc::new(ApiKeyStore::in_memory());
    let key = key(&keys, "invoke_functions,define_functions");
    let server = scripted(&pki, "s1", keys).await;
    let s = client(&pki, &server, &key).server("s1").unwrap();
    s.define_function("spin", "fn spin() { loop {} }")
        .await
        .unwrap();
    s.define_function("deep", "fn deep(n) { deep(n + 1) }")
        .await
        .unwrap();
    s.define_function("big", r#"fn big() { let x = "ab"; loop { x += x; } }"#)
        .await
        .unwrap();
    s.define_function("throws", r#"fn throws() { throw "no" }"#)
        .await
        .unwrap();
    let spinning = {
        let s = s.clone();
        tokio::spawn(async move { s.call::<()>("spin", ()).await })
    };
    // Meanwhile natives keep answering.
    for i in 0..20 {
        assert_eq!(s.call::<i64>("add", (i, 1)).await.unwrap(), i + 1);
    }
    let err = spinning.await.unwrap().unwrap_err();
    assert!(
        script_kind(&err).as_deref() == Some("operations_exceeded")
            || matches!(err, ClientError::Timeout { .. }),
        "{err:?}"
    );
    let err = s.call::<()>("deep", (0,)).await.unwrap_err();
    assert_eq!(
        script_kind(&err).as_deref(),
        Some("stack_overflow"),
        "{err:?}"
    );
    let err = s.call::<()>("big", ()).await.unwrap_err();
    assert_eq!(script_kind(&err).as_deref(), Some("too_large"), "{err:?}");
    let err = s.call::<()>("throws", ()).await.unwrap_err();
    assert!(
        matches!(&err, ClientError::Remote { code: ErrorCode::OperationFailed, message, .. } if message == "no"),
        "{err:?}"
    );
    // The workers are healthy afterwards.
    s.define_function("ok", "fn ok() { 7 }").await.unwrap();
    assert_eq!(s.call::<i64>("ok", ()).await.unwrap(), 7);
}

#[tokio::test]
async fn a_cancelled_script_frees_its_worker() {
    let pki = Pki::new();
    let keys = Arc::new(ApiKeyStore::in_memory());
    let key = key(&keys, "invoke_functions,define_functions");
    let mut limits = ScriptLimits::default();
    limits.max_operations = u64::MAX / 2;
    limits.wall_clock_ms = 60_000;
    let runtime = ScriptRuntime::builder().workers(1).limits(limits).build();
    let server = builder(&pki, "s1", keys)
        .options(unlimited())
        .scripts(runtime)
        .start()
        .await
        .unwrap();
    let s = client(&pki, &server, &key).server("s1").unwrap();
    s.define_function("spin", "fn spin() { loop {} }")
        .await
        .unwrap();
    s.define_function("one", "fn one() { 1 }").await.unwrap();
    let _ = tokio::time::timeout(Duration::from_millis(200), s.call::<()>("spin", ())).await;
    // The only worker picks up the next call promptly: the spin was stopped.
    let started = Instant::now();
    assert_eq!(
        s.call_with_timeout::<i64>("one", (), Duration::from_secs(5))
            .await
            .unwrap(),
        1
    );
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn dependencies_and_constants_are_visible_and_in_use_dependencies_are_protected() {
    let pki = Pki::new();
    let keys = Arc::new(ApiKeyStore::in_memory());
    let key = key(&keys, "all_privileges");
    let server = scripted(&pki, "s1", keys).await;
    let s = client(&pki, &server, &key).server("s1").unwrap();
    s.define_dependency("geo", DependencySource::Script("fn sq(x) { x * x }".into()))
        .await
        .unwrap();
    s.define_function(
        "hyp2",
        r#"fn hyp2(a, b) { import "geo" as g; g::sq(a) + g::sq(b) + constant("offset") }"#,
    )
    .await
    .unwrap();
    s.define_constant("offset", 1000).await.unwrap();
    assert_eq!(s.call::<i64>("hyp2", (3, 4)).await.unwrap(), 1025);
    // Constant changes apply to later calls.
    s.define_constant("offset", 0).await.unwrap();
    assert_eq!(s.call::<i64>("hyp2", (3, 4)).await.unwrap(), 25);
    // The dependency is in use.
    let err = s.undefine_dependency("geo", false).await.unwrap_err();
    assert!(
        matches!(&err, ClientError::InvalidArgument { message, .. } if message.contains("hyp2")),
        "{err:?}"
    );
    let deps = s.list_dependencies().await.unwrap();
    assert_eq!(deps.len(), 1);
    s.undefine_dependency("geo", true).await.unwrap();
    let err = s.call::<i64>("hyp2", (3, 4)).await.unwrap_err();
    assert_eq!(
        script_kind(&err).as_deref(),
        Some("runtime_error"),
        "{err:?}"
    );
    // An unknown host module is refused.
    let err = s
        .define_dependency("m", DependencySource::Host("nope".into()))
        .await
        .unwrap_err();
    assert!(
        matches!(err, ClientError::InvalidArgument { .. }),
        "{err:?}"
    );
}

#[tokio::test]
async fn without_a_script_runtime_the_operations_say_so() {
    let pki = Pki::new();
    let keys = Arc::new(ApiKeyStore::in_memory());
    let key = key(&keys, "all_privileges");
    let server = start(&pki, "s1", keys).await;
    let s = client(&pki, &server, &key).server("s1").unwrap();
    let err = s.define_function("f", "fn f() { 1 }").await.unwrap_err();
    assert!(
        matches!(&err, ClientError::Remote { code: ErrorCode::InvalidOperation, message, .. } if message.contains("not enabled")),
        "{err:?}"
    );
}

/// A script result larger than the caller's frame limit gets the same
/// answer as an oversized native result: frame_too_large with {limit, size}.
#[tokio::test]
async fn an_oversized_script_result_is_frame_too_large_like_a_native_one() {
    let pki = Pki::new();
    let keys = Arc::new(ApiKeyStore::in_memory());
    let key = key(&keys, "invoke_functions,define_functions");
    let mut limits = ScriptLimits::default();
    limits.max_string_bytes = 4 << 20;
    let runtime = ScriptRuntime::builder().workers(1).limits(limits).build();
    let mut options = unlimited();
    options.connection_controls.max_post_auth_frame_bytes = 4 << 20;
    options.session_controls.max_outbound_bytes_per_connection = 16 << 20;
    let server = builder(&pki, "s1", keys)
        .options(options)
        .scripts(runtime)
        .start()
        .await
        .unwrap();
    let s = only(endpoint(&pki, &server, &key));
    s.define_function("big", r#"fn big(n) { let s = ""; s.pad(n, "x"); s }"#)
        .await
        .unwrap();
    for function in ["big", "echo"] {
        let result = if function == "big" {
            s.call::<String>("big", (1_500_000,)).await
        } else {
            s.call::<String>("echo", ("x".repeat(1_100_000),)).await
        };
        match &result {
            Err(ClientError::Remote {
                code: ErrorCode::FrameTooLarge,
                details: Value::Map(d),
                ..
            }) => assert_eq!(d["limit"], Value::Int(1_048_576), "{function}"),
            Err(other) => panic!("{function}: {other:?}"),
            Ok(v) => panic!("{function}: a result of {} bytes was sent", v.len()),
        }
    }
    assert_eq!(s.call::<String>("big", (3,)).await.unwrap(), "xxx");
}

/// Every name in a define or undefine operation is checked the same way;
/// undefining a name that does not exist succeeds, every time; an empty
/// dependency is refused; a missing constant is a script_error like any
/// other failure inside a script.
#[tokio::test]
async fn definition_names_are_checked_alike_and_undefine_is_idempotent() {
    let pki = Pki::new();
    let keys = Arc::new(ApiKeyStore::in_memory());
    let key = key(
        &keys,
        "invoke_functions,define_functions,undefine_functions,define_constants,undefine_constants,define_dependencies,undefine_dependencies",
    );
    let server = scripted(&pki, "s1", keys).await;
    let s = only(endpoint(&pki, &server, &key));
    let invalid = |r: Result<(), ClientError>, field: &str| match r {
        Err(ClientError::InvalidArgument { message, .. }) => {
            assert!(message.starts_with(&format!("{field}:")), "{message}")
        }
        other => panic!("{field}: {other:?}"),
    };
    invalid(s.undefine_function("").await, "name");
    invalid(s.undefine_constant("").await, "name");
    invalid(s.undefine_dependency("", false).await, "alias");
    invalid(s.undefine_dependency("no way", true).await, "alias");
    invalid(s.define_function("", "fn x() { 1 }").await, "name");
    invalid(s.define_constant("1x", 1).await, "name");
    invalid(
        s.define_dependency("d", DependencySource::Script(String::new()))
            .await,
        "source",
    );
    invalid(
        s.define_dependency("d", DependencySource::Script(" \n".into()))
            .await,
        "source",
    );
    for _ in 0..2 {
        s.undefine_function("never_defined").await.unwrap();
        s.undefine_constant("never_defined").await.unwrap();
        s.undefine_dependency("never_defined", false).await.unwrap();
    }
    s.define_constant("X", 1).await.unwrap();
    s.define_function("readx", r#"fn readx() { constant("X") }"#)
        .await
        .unwrap();
    assert_eq!(s.call::<i64>("readx", ()).await.unwrap(), 1);
    s.undefine_constant("X").await.unwrap();
    let err = s.call::<i64>("readx", ()).await.unwrap_err();
    assert_eq!(
        script_kind(&err).as_deref(),
        Some("runtime_error"),
        "{err:?}"
    );
}
