// The authority and several netproc servers in one process, over real
// TLS on 127.0.0.1, with certificates made here.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use netproc_auth::{ApiKey, ApiKeyStore, CertBinding, KeySpec, PrivilegeSet};
use netproc_client::{Client, ClientError, ServerEndpoint, ServerRef};
use netproc_pki::{Ed25519Key, IssuedCert};
use netproc_propagation::TransportError;
use netproc_propagation::{
    Ack, Authority, AuthorityConfig, Credential, CredentialSpec, Delivery, DeliveryReply,
    DeliveryState, EXTENSION, Event, EventKind, NetprocTransport, PropagationTarget, RejectReason,
    TargetConfig, Transport, sign,
};
use netproc_server::{CallContext, CallError, Server, ServerHandle};
use netproc_testkit::TestPki;
use netproc_wire::{ErrorCode, Operation, Value};
use tokio::task::JoinHandle;

/// The workspace's test PKI plus the authority's and a user's certificates.
pub(crate) struct Pki {
    kit: TestPki,
    pub(crate) authority: IssuedCert,
    pub(crate) user: IssuedCert,
}

impl Pki {
    pub(crate) fn new() -> Pki {
        let kit = TestPki::new();
        Pki {
            authority: kit.client_cert("authority"),
            user: kit.client_cert("user"),
            kit,
        }
    }
}

impl std::ops::Deref for Pki {
    type Target = TestPki;
    fn deref(&self) -> &TestPki {
        &self.kit
    }
}

/// One target server: its local keys (the authority's own key among
/// them), its state directory and the running server.
pub(crate) struct Node {
    pub(crate) name: String,
    pub(crate) keys: Arc<ApiKeyStore>,
    pub(crate) state: PathBuf,
    pub(crate) authority_key: ApiKey,
    pub(crate) target: Arc<PropagationTarget>,
    pub(crate) server: ServerHandle,
}

pub(crate) async fn start_node(
    pki: &Pki,
    name: &str,
    state: &Path,
    trusted: [u8; 32],
    bind: Option<SocketAddr>,
    authority_privilege: &str,
) -> Node {
    std::fs::create_dir_all(state).unwrap();
    let keys = Arc::new(ApiKeyStore::in_memory());
    // The authority's credential on this server: bound to its certificate.
    let (_, authority_key) = keys
        .create(
            KeySpec::new(authority_privilege.parse::<PrivilegeSet>().unwrap()).binding(
                CertBinding::Fingerprint(pki.authority.cert_identity().fingerprint),
            ),
        )
        .unwrap();
    let db = netproc_server::StateDatabase::open(state).unwrap();
    let target = PropagationTarget::open(
        TargetConfig::new(name, vec![trusted]),
        Arc::clone(&keys),
        &db,
    )
    .unwrap();
    let mut builder = pki
        .server_builder(name, Arc::clone(&keys))
        .state(db)
        .function("whoami", |ctx: CallContext, (): ()| async move {
            Ok::<_, CallError>(ctx.principal().id.clone())
        })
        .function("sleep_ms", |_: CallContext, (ms,): (u64,)| async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok::<_, CallError>(ms)
        });
    if let Some(addr) = bind {
        builder = builder.bind(addr);
    }
    let server = target.install(builder).start().await.unwrap();
    server.follow_key_store(&keys);
    Node {
        name: name.to_owned(),
        keys,
        state: state.to_owned(),
        authority_key,
        target,
        server,
    }
}

fn endpoint(pki: &Pki, cert: &IssuedCert, addr: SocketAddr, key: &ApiKey) -> ServerEndpoint {
    pki.endpoint(cert, addr, key)
        .connect_timeout(Duration::from_secs(2))
}

/// The authority's client: one server per target, each with its key there.
pub(crate) fn authority_client(pki: &Pki, nodes: &[(String, SocketAddr, ApiKey)]) -> Client {
    let mut b = Client::builder();
    for (name, addr, key) in nodes {
        b = b.server(name.clone(), endpoint(pki, &pki.authority, *addr, key));
    }
    b.build().unwrap()
}

pub(crate) fn open_authority(
    db: &Path,
    key: Ed25519Key,
    client: Client,
    targets: &[&str],
) -> Authority {
    let mut config = AuthorityConfig::new(db, targets.iter().map(|t| (*t).to_owned()).collect());
    config.delivery_timeout = Duration::from_secs(3);
    Authority::open(config, key, Arc::new(NetprocTransport::new(client))).unwrap()
}

fn user(pki: &Pki, node: &Node, key: &ApiKey) -> ServerRef {
    Client::builder()
        .server("s", endpoint(pki, &pki.user, node.server.local_addr(), key))
        .build()
        .unwrap()
        .server("s")
        .unwrap()
}

fn long_call(s: &ServerRef) -> JoinHandle<Result<u64, ClientError>> {
    let s = s.clone();
    tokio::spawn(async move { s.call::<u64>("sleep_ms", (20_000,)).await })
}

async fn ended_with(call: JoinHandle<Result<u64, ClientError>>) -> ErrorCode {
    match tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .expect("the session did not end in time")
        .unwrap()
    {
        Err(ClientError::Remote { code, .. }) => code,
        other => panic!("expected a remote reason, got {other:?}"),
    }
}

async fn refused(pki: &Pki, node: &Node, key: &ApiKey) -> bool {
    match user(pki, node, key).call::<String>("whoami", ()).await {
        Ok(_) => false,
        Err(e) => e.code() == ErrorCode::AuthenticationFailed,
    }
}

struct Fleet {
    pki: Pki,
    dir: tempfile::TempDir,
    signing: [u8; 32],
    nodes: Vec<Node>,
    authority: Authority,
}

async fn fleet(names: &[&str]) -> Fleet {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let signing = Ed25519Key::generate().unwrap();
    let mut nodes = Vec::new();
    for n in names {
        let node = start_node(
            &pki,
            n,
            &dir.path().join(n),
            signing.public_key(),
            None,
            "receive_credentials",
        )
        .await;
        nodes.push(node);
    }
    let routes: Vec<_> = nodes
        .iter()
        .map(|n| {
            (
                n.name.clone(),
                n.server.local_addr(),
                n.authority_key.clone(),
            )
        })
        .collect();
    let client = authority_client(&pki, &routes);
    let seed = *signing.seed();
    let authority = open_authority(&dir.path().join("authority.db"), signing, client, names);
    Fleet {
        pki,
        dir,
        signing: seed,
        nodes,
        authority,
    }
}

fn states(status: Vec<netproc_propagation::TargetDelivery>) -> BTreeMap<String, DeliveryState> {
    status.into_iter().map(|s| (s.target, s.state)).collect()
}

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
async fn forged_replayed_stale_and_misaddressed_events_are_rejected_and_change_nothing() {
    let f = fleet(&["a", "b"]).await;
    let a = &f.nodes[0];
    let authority_key = Ed25519Key::from_seed(&f.signing).unwrap();
    let rogue = Ed25519Key::generate().unwrap();
    let raw = authority_client(
        &f.pki,
        &[("a".into(), a.server.local_addr(), a.authority_key.clone())],
    )
    .server("a")
    .unwrap();
    let send = |events: Vec<netproc_propagation::SignedEvent>| {
        let raw = raw.clone();
        async move {
            let op = Operation::Extension {
                name: EXTENSION.into(),
                payload: Delivery::new(events).encode(),
            };
            match raw.execute(op).await.unwrap() {
                Value::Bytes(b) => DeliveryReply::decode(&b).unwrap(),
                other => panic!("{other:?}"),
            }
        }
    };
    let mut cred = Credential::default();
    cred.id = "forged".into();
    cred.secret_sha256 = Some([1; 32]);
    cred.generation = 1;
    cred.privileges = vec!["admin_privileges".into()];
    let upsert = || EventKind::Upsert(cred.clone());
    let now = SystemTime::now();
    let cursor = a.target.cursor();
    let next = cursor + 1;

    let mut tampered = sign(&Event::new("a", next, now, upsert()), &authority_key).unwrap();
    let last = tampered.body.len() - 1;
    tampered.body[last] ^= 1;
    let other_signer = sign(&Event::new("a", next, now, upsert()), &rogue).unwrap();
    let mut claimed = other_signer.clone();
    claimed.signer = authority_key.public_key();
    let for_b = sign(&Event::new("b", next, now, upsert()), &authority_key).unwrap();
    let stale = sign(
        &Event::new("a", next, now - Duration::from_secs(3600), upsert()),
        &authority_key,
    )
    .unwrap();
    let reply = send(vec![tampered, other_signer, claimed, for_b, stale]).await;
    assert_eq!(
        reply.acks,
        [
            Ack::Rejected(RejectReason::BadSignature),
            Ack::Rejected(RejectReason::UnknownSigner),
            Ack::Rejected(RejectReason::BadSignature),
            Ack::Rejected(RejectReason::WrongTarget),
            Ack::Rejected(RejectReason::Stale),
        ]
    );
    assert_eq!(reply.cursor, cursor);
    assert!(a.keys.get("forged").is_none());

    // A genuine event applies once; replayed, it is a duplicate.
    let mut genuine_cred = cred.clone();
    genuine_cred.privileges = vec!["invoke_functions".into()];
    let genuine = sign(
        &Event::new("a", next, now, EventKind::Upsert(genuine_cred)),
        &authority_key,
    )
    .unwrap();
    assert_eq!(send(vec![genuine.clone()]).await.acks, [Ack::Applied]);
    let revoke = sign(
        &Event::new(
            "a",
            next + 1,
            now,
            EventKind::Delete {
                id: "forged".into(),
            },
        ),
        &authority_key,
    )
    .unwrap();
    assert_eq!(send(vec![revoke]).await.acks, [Ack::Applied]);
    let replay = send(vec![genuine]).await;
    assert_eq!(replay.acks, [Ack::Duplicate]);
    assert!(
        a.keys.get("forged").is_none(),
        "a replay brought a revoked key back"
    );
    // A gap asks for a snapshot.
    let ahead = sign(
        &Event::new("a", next + 5, now, EventKind::Delete { id: "x".into() }),
        &authority_key,
    )
    .unwrap();
    assert_eq!(send(vec![ahead]).await.acks, [Ack::NeedsSnapshot]);
    // Garbage is refused as a request, not applied.
    let op = Operation::Extension {
        name: EXTENSION.into(),
        payload: vec![0xff; 40],
    };
    assert_eq!(
        raw.execute(op).await.unwrap_err().code(),
        ErrorCode::InvalidRequest
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_needs_receive_credentials() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let signing = Ed25519Key::generate().unwrap();
    let node = start_node(
        &pki,
        "a",
        &dir.path().join("a"),
        signing.public_key(),
        None,
        "invoke_functions",
    )
    .await;
    let client = authority_client(
        &pki,
        &[(
            "a".into(),
            node.server.local_addr(),
            node.authority_key.clone(),
        )],
    );
    let transport = NetprocTransport::new(client);
    let err = transport
        .deliver(netproc_propagation::Outgoing::new(
            "a",
            1,
            Delivery::default().encode(),
            Duration::from_secs(5),
        ))
        .await
        .unwrap_err();
    // The cause is kept, typed: the client's insufficient_privileges.
    assert!(
        err.to_string()
            .contains("requires privilege \"receive_credentials\""),
        "{err}"
    );
    assert!(matches!(err, TransportError::Failed { .. }), "{err:?}");
    // admin_privileges also satisfies it.
    let admin = start_node(
        &pki,
        "b",
        &dir.path().join("b"),
        signing.public_key(),
        None,
        "admin_privileges",
    )
    .await;
    let client = authority_client(
        &pki,
        &[(
            "b".into(),
            admin.server.local_addr(),
            admin.authority_key.clone(),
        )],
    );
    let reply = NetprocTransport::new(client)
        .deliver(netproc_propagation::Outgoing::new(
            "b",
            2,
            Delivery::default().encode(),
            Duration::from_secs(5),
        ))
        .await
        .unwrap();
    assert_eq!(DeliveryReply::decode(&reply).unwrap().cursor, 0);
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
    assert_eq!(delivered["c"], 1, "one snapshot, not one event per change");
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
            addr.parse().unwrap(),
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
            "tls::authority_child",
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
