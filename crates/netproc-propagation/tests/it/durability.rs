// The authority killed with SIGKILL in the middle of a sync, over real
// TLS: nothing acknowledged is lost, and the next sync completes.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use netproc_client::{Client, ServerEndpoint};
use netproc_pki::Ed25519Key;
use netproc_propagation::CredentialSpec;

use crate::fleet::*;

const CHILD_ENV: &str = "NETPROC_TEST_AUTHORITY_CHILD";

/// Not a test on its own: the kill -9 test runs this in a child process,
/// an authority syncing in a loop until it is killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by the_authority_survives_kill_9_in_the_middle_of_a_sync"]
async fn authority_child() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let dir = PathBuf::from(dir);
    let read = |f: &str| std::fs::read(dir.join(f)).unwrap();
    let identity =
        netproc_pki::Identity::from_pem(&read("authority.pem"), &read("authority.key")).unwrap();
    let roots = netproc_pki::TrustAnchors::from_pem(&read("ca.pem")).unwrap();
    let mut b = Client::builder();
    let mut names = Vec::new();
    for line in String::from_utf8(read("routes")).unwrap().lines() {
        let mut parts = line.split(' ');
        let (name, addr, key) = (
            parts.next().unwrap(),
            parts.next().unwrap(),
            parts.next().unwrap(),
        );
        let endpoint = ServerEndpoint::new(
            addr.parse::<std::net::SocketAddr>().unwrap(),
            "localhost",
            identity.clone(),
            roots.clone(),
            netproc_wire::SecretString::new(key.to_owned()),
        );
        b = b.server(name, endpoint);
        names.push(name.to_owned());
    }
    let seed: [u8; 32] = read("seed").try_into().unwrap();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let authority = open_authority(
        &dir.join("authority.db"),
        Ed25519Key::from_seed(&seed).unwrap(),
        b.build().unwrap(),
        &names,
    );
    loop {
        authority.sync().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_authority_survives_kill_9_in_the_middle_of_a_sync() {
    let f = fleet(&["a", "b"]).await;
    assert!(f.authority.sync().await.all_ok()); // the (empty) first snapshots
    // 1,000 changes per target, committed together, not yet delivered.
    let changes = (0..1_000).map(|i| {
        let authority = f.authority.clone();
        async move {
            authority
                .ensure(
                    CredentialSpec::api_key(
                        format!("k{i}"),
                        "invoke_functions"
                            .parse::<netproc_auth::PrivilegeSet>()
                            .unwrap(),
                    ),
                    &["a", "b"],
                )
                .await
                .unwrap();
        }
    });
    futures_util::future::join_all(changes).await;

    let dir = f.dir.path();
    std::fs::write(dir.join("ca.pem"), f.pki.ca.cert_pem()).unwrap();
    std::fs::write(dir.join("authority.pem"), f.pki.authority.cert_pem()).unwrap();
    std::fs::write(
        dir.join("authority.key"),
        f.pki.authority.key_pem().as_bytes(),
    )
    .unwrap();
    std::fs::write(dir.join("seed"), f.signing).unwrap();
    let routes: String = f
        .nodes
        .iter()
        .map(|n| {
            format!(
                "{} {} {}\n",
                n.name,
                n.server.local_addr(),
                n.authority_key.expose()
            )
        })
        .collect();
    std::fs::write(dir.join("routes"), routes).unwrap();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "durability::authority_child",
            "--exact",
            "--ignored",
            "--nocapture",
        ])
        .env(CHILD_ENV, dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Kill it as soon as the first batch has landed somewhere.
    let started = std::time::Instant::now();
    while f.nodes.iter().all(|n| n.target.cursor() <= 1) {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the child never delivered"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let cursors: Vec<u64> = f.nodes.iter().map(|n| n.target.cursor()).collect();
    eprintln!("killed with target cursors {cursors:?}");

    // Restarted (here, on the same database), the authority finishes the job.
    let mut report = f.authority.sync().await;
    for _ in 0..3 {
        if report.all_ok() {
            break;
        }
        report = f.authority.sync().await;
    }
    assert!(report.all_ok(), "{report:?}");
    let view = f.authority.credentials().await.unwrap();
    assert_eq!(view.len(), 1_000);
    let targets = f.authority.targets().await.unwrap();
    for (node, t) in f.nodes.iter().zip(&targets) {
        let held: BTreeMap<String, u64> = node
            .keys
            .propagated_keys()
            .into_iter()
            .map(|k| (k.id.clone(), k.generation))
            .collect();
        let expected: BTreeMap<String, u64> =
            view.iter().map(|c| (c.id.clone(), c.generation)).collect();
        assert_eq!(held, expected, "target {}", node.name);
        assert_eq!(t.pending_events, 0);
        assert_eq!(t.acked_seq, node.target.cursor(), "target {}", node.name);
    }
}
