//! Run-time definitions survive restarts, and a killed process loses
//! nothing it acknowledged.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use netproc_auth::{ApiKeyStore, KeySpec, PrivilegeSet};
use netproc_client::{Client, ServerEndpoint};
use netproc_pki::{Identity, TrustAnchors};
use netproc_script::ScriptRuntime;
use netproc_server::{Server, ServerHandle};
use netproc_wire::{DependencySource, SecretString, Value};

use crate::support::*;

async fn start_stateful(pki: &Pki, keys: Arc<ApiKeyStore>, dir: &Path) -> ServerHandle {
    builder(pki, "s1", keys)
        .options(unlimited())
        .scripts(ScriptRuntime::builder().workers(1).build())
        .state_dir(dir)
        .start()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_restart_with_the_state_dir_reloads_definitions_and_skips_broken_ones() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let keys = Arc::new(ApiKeyStore::in_memory());
    let key = key(&keys, "all_privileges");
    let server = start_stateful(&pki, Arc::clone(&keys), dir.path()).await;
    let s = client(&pki, &server, &key).server("s1").unwrap();
    s.define_dependency("geo", DependencySource::Script("fn sq(x) { x * x }".into()))
        .await
        .unwrap();
    s.define_function(
        "hyp2",
        r#"fn hyp2(a, b) { import "geo" as g; g::sq(a) + g::sq(b) }"#,
    )
    .await
    .unwrap();
    s.define_function("gone", "fn gone() { 1 }").await.unwrap();
    s.undefine_function("gone").await.unwrap();
    s.define_constant("limit", 42).await.unwrap();
    server.shutdown(Duration::from_secs(1)).await;
    drop(server);

    // Corrupt one stored function behind the server's back.
    {
        let db = rusqlite::Connection::open(dir.path().join("netproc.db")).unwrap();
        db.execute(
            "INSERT INTO script_functions (name, source, source_sha256, defined_by, defined_at_ms) VALUES ('broken', 'fn broken( {', x'00', 'test', 0)",
            [],
        )
        .unwrap();
    }

    let server = start_stateful(&pki, keys, dir.path()).await;
    let s = client(&pki, &server, &key).server("s1").unwrap();
    assert_eq!(s.call::<i64>("hyp2", (3, 4)).await.unwrap(), 25);
    assert!(matches!(
        s.call::<i64>("gone", ()).await,
        Err(netproc_client::ClientError::FunctionNotFound { .. })
    ));
    assert!(matches!(
        s.call::<i64>("broken", ()).await,
        Err(netproc_client::ClientError::FunctionNotFound { .. })
    ));
    assert_eq!(s.list_constants().await.unwrap()["limit"], Value::Int(42));
    assert_eq!(s.list_dependencies().await.unwrap().len(), 1);
}

/// Run only as a child of the kill -9 test: a server on the files of
/// `NETPROC_TEST_CHILD_DIR`, writing its port to `port`.
#[test]
fn child_server_process() {
    let Some(dir) = std::env::var_os("NETPROC_TEST_CHILD_DIR").map(PathBuf::from) else {
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let identity = Identity::load(dir.join("server.crt"), dir.join("server.key")).unwrap();
        let roots = TrustAnchors::load(dir.join("ca.crt")).unwrap();
        let keys = ApiKeyStore::open(dir.join("keys.json")).unwrap();
        let server = Server::builder("child", identity, roots, keys)
            .options(unlimited())
            .scripts(ScriptRuntime::builder().workers(1).build())
            .state_dir(dir.join("state"))
            .start()
            .await
            .unwrap();
        let tmp = dir.join("port.tmp");
        std::fs::write(&tmp, server.local_addr().port().to_string()).unwrap();
        std::fs::rename(tmp, dir.join("port")).unwrap();
        std::future::pending::<()>().await;
    });
}

fn spawn_child(dir: &Path) -> Child {
    let _ = std::fs::remove_file(dir.join("port"));
    Command::new(std::env::current_exe().unwrap())
        .args([
            "persistence::child_server_process",
            "--exact",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env("NETPROC_TEST_CHILD_DIR", dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

async fn child_port(dir: &Path) -> u16 {
    for _ in 0..600 {
        if let Ok(p) = std::fs::read_to_string(dir.join("port")) {
            return p.trim().parse().unwrap();
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the child server did not start");
}

#[tokio::test]
async fn a_killed_server_keeps_every_acknowledged_definition() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    pki.ca
        .save(dir.path().join("ca.crt"), dir.path().join("ca.key"), false)
        .unwrap();
    pki.server
        .save(
            dir.path().join("server.crt"),
            dir.path().join("server.key"),
            false,
        )
        .unwrap();
    let keys = ApiKeyStore::open(dir.path().join("keys.json")).unwrap();
    let (_, key) = keys.create(KeySpec::new(PrivilegeSet::all())).unwrap();
    let client_for = |port: u16| {
        Client::builder()
            .server(
                "child",
                ServerEndpoint::new(
                    std::net::SocketAddr::from(([127, 0, 0, 1], port)),
                    "localhost",
                    pki.client.identity().unwrap(),
                    pki.ca.trust_anchors(),
                    SecretString::new(key.expose()),
                ),
            )
            .build()
            .unwrap()
    };

    let mut child = spawn_child(dir.path());
    let port = child_port(dir.path()).await;
    let c = client_for(port);
    let s = c.server("child").unwrap();
    for i in 0..20 {
        s.define_function(&format!("f{i}"), &format!("fn f{i}() {{ {i} }}"))
            .await
            .unwrap();
        s.define_constant(&format!("c{i}"), i).await.unwrap();
    }
    // Every define above was acknowledged: kill -9 now.
    child.kill().unwrap();
    child.wait().unwrap();

    let mut child = spawn_child(dir.path());
    let port = child_port(dir.path()).await;
    let c = client_for(port);
    let s = c.server("child").unwrap();
    for i in 0..20i64 {
        assert_eq!(s.call::<i64>(&format!("f{i}"), ()).await.unwrap(), i);
    }
    let constants = s.list_constants().await.unwrap();
    assert_eq!(constants.len(), 20);
    child.kill().unwrap();
    child.wait().unwrap();
}
