// The authority and several netproc servers over real TLS: ensure, rotate,
// revoke, overlap windows, a down target, new and restarted targets,
// Ed25519 credentials, snapshots in parts.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use netproc_auth::{ApiKeyStore, KeySpec};
use netproc_client::{Client, ServerEndpoint};
use netproc_pki::Ed25519Key;
use netproc_propagation::{CredentialSpec, DeliveryState, PropagationTarget, TargetConfig};
use netproc_server::{CallContext, CallError, Server};
use netproc_wire::ErrorCode;

use crate::fleet::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ensure_rotate_and_revoke_across_three_servers_end_live_sessions() {
    let f = fleet(&["a", "b", "c"]).await;
    let spec = || {
        CredentialSpec::api_key(
            "billing",
            "invoke_functions"
                .parse::<netproc_auth::PrivilegeSet>()
                .unwrap(),
        )
    };
    let key = f
        .authority
        .ensure(spec(), &["a", "b", "c"])
        .await
        .unwrap()
        .api_key
        .unwrap();
    let report = f.authority.sync().await;
    assert!(report.all_ok(), "{report:?}");
    let status = states(f.authority.status("billing").await.unwrap());
    assert_eq!(status.len(), 3);
    assert!(
        status.values().all(|s| *s == DeliveryState::Success),
        "{status:?}"
    );
    let mut calls = Vec::new();
    for node in &f.nodes {
        let s = user(&f.pki, node, &key);
        assert_eq!(s.call::<String>("whoami", ()).await.unwrap(), "billing");
        calls.push(long_call(&s));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;

    // Rotate: the old secret is refused everywhere and its sessions end.
    let new_key = f.authority.rotate("billing", None).await.unwrap();
    assert!(f.authority.sync().await.all_ok());
    for call in calls {
        assert_eq!(ended_with(call).await, ErrorCode::CredentialRevoked);
    }
    let mut calls = Vec::new();
    for node in &f.nodes {
        assert!(
            refused(&f.pki, node, &key).await,
            "old key still works on {}",
            node.name
        );
        let s = user(&f.pki, node, &new_key);
        assert_eq!(s.call::<String>("whoami", ()).await.unwrap(), "billing");
        calls.push(long_call(&s));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;

    // A privilege change ends the sessions too (privileges are fixed per session).
    f.authority
        .ensure(
            CredentialSpec::api_key(
                "billing",
                "define_functions"
                    .parse::<netproc_auth::PrivilegeSet>()
                    .unwrap(),
            ),
            &["a", "b", "c"],
        )
        .await
        .unwrap();
    assert!(f.authority.sync().await.all_ok());
    for call in calls {
        assert_eq!(ended_with(call).await, ErrorCode::CredentialRevoked);
    }
    let calls: Vec<_> = f
        .nodes
        .iter()
        .map(|n| long_call(&user(&f.pki, n, &new_key)))
        .collect();
    // (define_functions cannot call: the calls are refused, not left running.)
    for call in calls {
        let r = tokio::time::timeout(Duration::from_secs(5), call)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(r.unwrap_err().code(), ErrorCode::InsufficientPrivileges);
    }
    f.authority.ensure(spec(), &["a", "b", "c"]).await.unwrap();
    assert!(f.authority.sync().await.all_ok());
    let mut calls = Vec::new();
    for node in &f.nodes {
        calls.push(long_call(&user(&f.pki, node, &new_key)));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;

    // Revoke: the same.
    f.authority.revoke("billing").await.unwrap();
    assert!(f.authority.sync().await.all_ok());
    for call in calls {
        assert_eq!(ended_with(call).await, ErrorCode::CredentialRevoked);
    }
    for node in &f.nodes {
        assert!(refused(&f.pki, node, &new_key).await);
        assert!(node.keys.propagated_keys().is_empty());
    }
    drop(f.dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_with_overlap_keeps_both_secrets_until_the_window_ends() {
    let f = fleet(&["a"]).await;
    let key = f
        .authority
        .ensure(
            CredentialSpec::api_key(
                "svc",
                "invoke_functions"
                    .parse::<netproc_auth::PrivilegeSet>()
                    .unwrap(),
            ),
            &["a"],
        )
        .await
        .unwrap()
        .api_key
        .unwrap();
    assert!(f.authority.sync().await.all_ok());
    let old = user(&f.pki, &f.nodes[0], &key);
    old.call::<String>("whoami", ()).await.unwrap();
    let call = long_call(&old);
    let new_key = f
        .authority
        .rotate("svc", Some(Duration::from_secs(3)))
        .await
        .unwrap();
    assert!(f.authority.sync().await.all_ok());
    // Both work during the window; the old session goes on.
    assert!(!refused(&f.pki, &f.nodes[0], &key).await);
    assert!(!refused(&f.pki, &f.nodes[0], &new_key).await);
    assert!(!call.is_finished());
    // At its end the old session is closed and the old secret refused.
    assert_eq!(ended_with(call).await, ErrorCode::CredentialRevoked);
    assert!(refused(&f.pki, &f.nodes[0], &key).await);
    assert!(!refused(&f.pki, &f.nodes[0], &new_key).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_down_target_waits_while_the_others_succeed_then_sync_delivers() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let signing = Ed25519Key::generate().unwrap();
    let a = start_node(
        &pki,
        "a",
        &dir.path().join("a"),
        signing.public_key(),
        None,
        "receive_credentials",
    )
    .await;
    // "b" is down: nothing listens on its address yet.
    let spare = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let b_addr = spare.local_addr().unwrap();
    drop(spare);
    let b_key_store = Arc::new(ApiKeyStore::in_memory());
    let (_, b_authority_key) = b_key_store
        .create(KeySpec::new("receive_credentials".parse().unwrap()))
        .unwrap();
    let client = authority_client(
        &pki,
        &[
            ("a".into(), a.server.local_addr(), a.authority_key.clone()),
            ("b".into(), b_addr, b_authority_key.clone()),
        ],
    );
    let authority = open_authority(
        &dir.path().join("authority.db"),
        signing,
        client,
        &["a", "b"],
    );
    let key = authority
        .ensure(
            CredentialSpec::api_key(
                "svc",
                "invoke_functions"
                    .parse::<netproc_auth::PrivilegeSet>()
                    .unwrap(),
            ),
            &["a", "b"],
        )
        .await
        .unwrap()
        .api_key
        .unwrap();
    let started = std::time::Instant::now();
    let report = authority.sync().await;
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "a dead target held up the sync"
    );
    let by: BTreeMap<_, _> = report
        .targets
        .iter()
        .map(|t| (t.target.as_str(), t))
        .collect();
    assert!(by["a"].error.is_none());
    assert!(by["b"].error.is_some());
    let status = states(authority.status("svc").await.unwrap());
    assert_eq!(status["a"], DeliveryState::Success);
    assert!(
        matches!(
            &status["b"],
            DeliveryState::Error {
                attempts: 1,
                last_attempt: Some(_),
                ..
            }
        ),
        "{status:?}"
    );
    assert!(!refused(&pki, &a, &key).await);

    // "b" comes up on its address (with the authority's key there).
    let b = {
        let state = dir.path().join("b");
        std::fs::create_dir_all(&state).unwrap();
        let db = netproc_server::StateDatabase::open(&state).unwrap();
        let target = PropagationTarget::open(
            TargetConfig::new("b", vec![authority.public_key()]),
            Arc::clone(&b_key_store),
            &db,
        )
        .unwrap();
        let builder = Server::builder(
            "b",
            pki.server.identity().unwrap(),
            pki.ca.trust_anchors(),
            Arc::clone(&b_key_store),
        )
        .bind(b_addr)
        .state(db)
        .function("whoami", |ctx: CallContext, (): ()| async move {
            Ok::<_, CallError>(ctx.principal().id.clone())
        });
        target.install(builder).start().await.unwrap()
    };
    let report = authority.sync().await;
    assert!(report.all_ok(), "{report:?}");
    assert_eq!(
        states(authority.status("svc").await.unwrap())["b"],
        DeliveryState::Success
    );
    let s = Client::builder()
        .server("b", endpoint(&pki, &pki.user, b.local_addr(), &key))
        .build()
        .unwrap();
    assert_eq!(
        s.server("b")
            .unwrap()
            .call::<String>("whoami", ())
            .await
            .unwrap(),
        "svc"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_target_gets_a_snapshot_and_a_restarted_target_keeps_keys_and_cursor() {
    let f = fleet(&["a"]).await;
    let mut keys = Vec::new();
    for i in 0..5 {
        let k = f
            .authority
            .ensure(
                CredentialSpec::api_key(
                    format!("k{i}"),
                    "invoke_functions"
                        .parse::<netproc_auth::PrivilegeSet>()
                        .unwrap(),
                ),
                &["a"],
            )
            .await
            .unwrap()
            .api_key
            .unwrap();
        keys.push(k);
    }
    f.authority.revoke("k4").await.unwrap();
    assert!(f.authority.sync().await.all_ok());

    // "c" joins: the authority is reconfigured with it, the credentials are
    // put on it, and its first delivery is one snapshot.
    let c = start_node(
        &f.pki,
        "c",
        &f.dir.path().join("c"),
        Ed25519Key::from_seed(&f.signing).unwrap().public_key(),
        None,
        "receive_credentials",
    )
    .await;
    let a = &f.nodes[0];
    let client = authority_client(
        &f.pki,
        &[
            ("a".into(), a.server.local_addr(), a.authority_key.clone()),
            ("c".into(), c.server.local_addr(), c.authority_key.clone()),
        ],
    );
    drop(f.authority);
    let authority = open_authority(
        &f.dir.path().join("authority.db"),
        Ed25519Key::from_seed(&f.signing).unwrap(),
        client,
        &["a", "c"],
    );
    for i in 0..4 {
        authority
            .ensure(
                CredentialSpec::api_key(
                    format!("k{i}"),
                    "invoke_functions"
                        .parse::<netproc_auth::PrivilegeSet>()
                        .unwrap(),
                ),
                &["a", "c"],
            )
            .await
            .unwrap();
    }
    let before = authority.targets().await.unwrap();
    assert!(before.iter().any(|t| t.name == "c" && t.snapshot_needed));
    let report = authority.sync().await;
    assert!(report.all_ok(), "{report:?}");
    let delivered: BTreeMap<_, _> = report
        .targets
        .iter()
        .map(|t| (t.target.as_str(), t.delivered))
        .collect();
    assert_eq!(
        delivered["c"], 2,
        "one snapshot and the deny list, not one event per change"
    );
    for (i, k) in keys.iter().enumerate().take(4) {
        assert!(!refused(&f.pki, &c, k).await, "k{i} missing on c");
    }
    assert!(refused(&f.pki, &c, &keys[4]).await);

    // Restart "c" from its state directory: keys and cursor are kept.
    let cursor = c.target.cursor();
    assert!(cursor > 0);
    c.server.shutdown(Duration::from_secs(1)).await;
    let addr = c.server.local_addr();
    let state = c.state.clone();
    drop(c);
    let restarted = PropagationTarget::open(
        TargetConfig::new("c", vec![authority.public_key()]),
        Arc::new(ApiKeyStore::in_memory()),
        &netproc_server::StateDatabase::open(&state).unwrap(),
    )
    .unwrap();
    assert_eq!(restarted.cursor(), cursor);
    drop(restarted);
    let c = start_node(
        &f.pki,
        "c",
        &state,
        authority.public_key(),
        Some(addr),
        "receive_credentials",
    )
    .await;
    assert_eq!(c.target.cursor(), cursor);
    for k in keys.iter().take(4) {
        assert!(!refused(&f.pki, &c, k).await);
    }
}

/// Set for the child process of the kill -9 test.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ed25519_credential_travels_as_its_public_key() {
    let f = fleet(&["a"]).await;
    let robot = Arc::new(Ed25519Key::generate().unwrap());
    let spec = |k: &Ed25519Key| {
        CredentialSpec::ed25519(
            "robot",
            k.public_key(),
            "invoke_functions"
                .parse::<netproc_auth::PrivilegeSet>()
                .unwrap(),
        )
    };
    let made = f.authority.ensure(spec(&robot), &["a"]).await.unwrap();
    assert!(
        made.created && made.api_key.is_none(),
        "no secret for an Ed25519 key"
    );
    assert!(f.authority.sync().await.all_ok());
    let connect = |k: &Arc<Ed25519Key>| {
        let ep = ServerEndpoint::with_ed25519(
            f.nodes[0].server.local_addr(),
            "localhost",
            f.pki.user.identity().unwrap(),
            f.pki.ca.trust_anchors(),
            "robot",
            Arc::clone(k),
        );
        Client::builder()
            .server("a", ep)
            .build()
            .unwrap()
            .server("a")
            .unwrap()
    };
    let s = connect(&robot);
    assert_eq!(s.call::<String>("whoami", ()).await.unwrap(), "robot");
    let call = long_call(&s);
    tokio::time::sleep(Duration::from_millis(100)).await;

    // A new public key: the old one's session ends, the new one works.
    let replacement = Arc::new(Ed25519Key::generate().unwrap());
    f.authority
        .ensure(spec(&replacement), &["a"])
        .await
        .unwrap();
    assert!(f.authority.sync().await.all_ok());
    assert_eq!(ended_with(call).await, ErrorCode::CredentialRevoked);
    assert!(connect(&robot).call::<String>("whoami", ()).await.is_err());
    assert_eq!(
        connect(&replacement)
            .call::<String>("whoami", ())
            .await
            .unwrap(),
        "robot"
    );
    assert!(matches!(
        f.authority.rotate("robot", None).await,
        Err(netproc_propagation::AuthorityError::NotAnApiKey(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_larger_than_a_frame_arrives_in_parts() {
    let f = fleet(&["a"]).await;
    let functions: Vec<String> = (0..20)
        .map(|i| format!("a_rather_long_function_name_{i}"))
        .collect();
    // About 4,000 × 650 bytes ≈ 2.5 MiB: far over the 1 MiB frame limit.
    let changes = (0..4_000).map(|i| {
        let authority = f.authority.clone();
        let spec = CredentialSpec::api_key(
            format!("k{i}"),
            netproc_auth::KeySpec::new("invoke_functions".parse().unwrap())
                .functions(functions.clone()),
        );
        async move { authority.ensure(spec, &["a"]).await.unwrap() }
    });
    // Queued before the target's first delivery, so they travel as its snapshot.
    futures_util::future::join_all(changes).await;
    let report = f.authority.sync().await;
    assert!(report.all_ok(), "{report:?}");
    let parts = report.targets[0].delivered;
    assert!(parts >= 5, "{parts} events: expected a snapshot in parts");
    assert_eq!(f.nodes[0].keys.propagated_keys().len(), 4_000);
    assert_eq!(
        f.nodes[0].target.cursor(),
        f.authority.targets().await.unwrap()[0].acked_seq
    );
}

/// Over the network: a server whose target predates the second event
/// format (only `netproc.propagation.deliver` registered) answers the new
/// extension `invalid_operation`; the authority falls back to the first
/// format and the key arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_predates_epochs_gets_the_first_format_over_tls() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let signer = Ed25519Key::generate().unwrap();
    let keys = Arc::new(ApiKeyStore::in_memory());
    let (_, authority_key) = keys
        .create(KeySpec::new("receive_credentials".parse().unwrap()))
        .unwrap();
    let db = netproc_server::StateDatabase::open(dir.path().join("state").as_path()).unwrap();
    let target = PropagationTarget::open(
        TargetConfig::new("old", vec![signer.public_key()]),
        Arc::clone(&keys),
        &db,
    )
    .unwrap();
    // The previous release's install: the first extension only.
    let server = pki
        .server_builder("old", Arc::clone(&keys))
        .state(db)
        .extension(
            netproc_propagation::EXTENSION,
            netproc_wire::Privilege::ReceiveCredentials,
            Arc::clone(&target) as Arc<dyn netproc_server::ExtensionHandler>,
        )
        .start()
        .await
        .unwrap();
    let client = authority_client(
        &pki,
        &[("old".to_owned(), server.local_addr(), authority_key)],
    );
    let authority = open_authority(&dir.path().join("authority.db"), signer, client, &["old"]);
    authority
        .ensure(
            CredentialSpec::api_key(
                "svc",
                "invoke_functions"
                    .parse::<netproc_auth::PrivilegeSet>()
                    .unwrap(),
            ),
            &["old"],
        )
        .await
        .unwrap();
    let report = authority.sync().await;
    assert!(
        report.targets.iter().all(|t| t.error.is_none()),
        "{report:?}"
    );
    assert!(keys.get("svc").is_some());
    assert_eq!(target.epoch(), 0, "only the first format reached it");
}

/// A client certificate denied through the authority while it streams
/// calls to three servers: every session over it ends with
/// `credential_revoked` within a second of the delivery, its reconnect
/// fails the handshake as revoked, another certificate's sessions stay;
/// allowed back, it connects again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_certificate_is_cut_off_on_every_server_within_a_second() {
    let f = fleet(&["a", "b", "c"]).await;
    let spec = |id: &str| {
        CredentialSpec::api_key(
            id,
            "invoke_functions"
                .parse::<netproc_auth::PrivilegeSet>()
                .unwrap(),
        )
    };
    let key = f
        .authority
        .ensure(spec("laptop"), &["a", "b", "c"])
        .await
        .unwrap()
        .api_key
        .unwrap();
    assert!(f.authority.sync().await.all_ok());
    let other = f.pki.client_cert("desktop");
    let mut calls = Vec::new();
    let mut bystanders = Vec::new();
    for node in &f.nodes {
        calls.push(long_call(&user(&f.pki, node, &key)));
        let b = Client::builder()
            .server(
                "s",
                endpoint(&f.pki, &other, node.server.local_addr(), &key),
            )
            .build()
            .unwrap()
            .server("s")
            .unwrap();
        b.session().await.unwrap();
        bystanders.push(b);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;

    let cert = f.pki.user.cert_identity().clone();
    let by_key = netproc_propagation::CertRef::Spki(*cert.spki_fingerprint.as_bytes());
    f.authority
        .deny_certificate(by_key.clone(), cert.not_after)
        .await
        .unwrap();
    assert!(f.authority.sync().await.all_ok());
    let delivered = std::time::Instant::now();
    for call in calls {
        assert_eq!(ended_with(call).await, ErrorCode::CredentialRevoked);
    }
    assert!(
        delivered.elapsed() < Duration::from_secs(1),
        "{:?}",
        delivered.elapsed()
    );
    for node in &f.nodes {
        assert!(node.target.deny_list().refuses(&cert));
        let err = user(&f.pki, node, &key)
            .call::<String>("whoami", ())
            .await
            .unwrap_err();
        assert!(
            matches!(&err, netproc_client::ClientError::Tls { reason: netproc_client::TlsFailure::RejectedByServer(alert), .. } if alert == "CertificateRevoked"),
            "{err:?}"
        );
    }
    for b in &bystanders {
        assert_eq!(b.call::<String>("whoami", ()).await.unwrap(), "laptop");
    }
    let status = states(f.authority.status(&by_key.label()).await.unwrap());
    assert!(
        status.values().all(|s| *s == DeliveryState::Success),
        "{status:?}"
    );
    f.authority.allow_certificate(&by_key).await.unwrap();
    assert!(f.authority.sync().await.all_ok());
    for node in &f.nodes {
        assert_eq!(
            user(&f.pki, node, &key)
                .call::<String>("whoami", ())
                .await
                .unwrap(),
            "laptop"
        );
    }
}
