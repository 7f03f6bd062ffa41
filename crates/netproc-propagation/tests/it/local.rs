// The authority and its targets in one process, over the in-memory
// transport: the bookkeeping, and properties over arbitrary interleavings
// of changes, deliveries, replays and losses.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use netproc_auth::{ApiKeyStore, BoxFuture, KeySpec};
use netproc_pki::{CertIdentity, Ed25519Key};
use netproc_propagation::{
    Authority, AuthorityConfig, CredentialSpec, DeliveryState, LocalTransport, Outgoing,
    PropagationTarget, TargetConfig, Transport, TransportError,
};

pub(crate) fn cert() -> CertIdentity {
    netproc_testkit::TestPki::new()
        .client
        .cert_identity()
        .clone()
}

/// What a lossy network does to one target's next request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fate {
    Deliver,
    DropRequest,
    DropReply,
    /// Broker-shaped: the request waits unread in the target's queue (the
    /// target is away); while it waits, nothing more is published to that
    /// target (the AMQP transport's rule) until it is consumed late or
    /// expires.
    Queue,
    /// Broker-shaped: handled, then handed to the target again (a
    /// redelivery after a lost acknowledgement); the second reply counts.
    Redeliver,
}

/// The in-memory transport with losses and a record of the last request.
pub(crate) struct Lossy {
    pub(crate) inner: LocalTransport,
    pub(crate) fate: Mutex<HashMap<String, Fate>>,
    pub(crate) last: Mutex<HashMap<String, Vec<u8>>>,
    /// Broker-shaped: the request waiting unread in each target's queue.
    pub(crate) queued: Mutex<HashMap<String, Outgoing>>,
}

impl Lossy {
    /// Broker-shaped: the target comes back and reads what waited; its
    /// reply goes nowhere (the delivery gave up long ago).
    pub(crate) async fn consume_late(&self, target: &str) {
        let waiting = self.queued.lock().unwrap().remove(target);
        if let Some(request) = waiting {
            let _ = self.inner.deliver(request).await;
        }
    }

    /// Broker-shaped: what waited expires unread (dead-lettered).
    pub(crate) fn expire(&self, target: &str) {
        self.queued.lock().unwrap().remove(target);
    }
}

impl Transport for Lossy {
    fn deliver<'a>(&'a self, delivery: Outgoing) -> BoxFuture<'a, Result<Vec<u8>, TransportError>> {
        Box::pin(async move {
            let target = delivery.target.clone();
            let fate = self
                .fate
                .lock()
                .unwrap()
                .get(&target)
                .copied()
                .unwrap_or(Fate::Deliver);
            self.last
                .lock()
                .unwrap()
                .insert(target.clone(), delivery.request.clone());
            if self.queued.lock().unwrap().contains_key(&target) {
                // One request waits unread: nothing more is published.
                return Err(TransportError::failed(target, "a request waits unread"));
            }
            match fate {
                Fate::Queue => {
                    self.queued.lock().unwrap().insert(target.clone(), delivery);
                    Err(TransportError::failed(target, "no reply yet"))
                }
                Fate::Redeliver => {
                    let again = delivery.clone();
                    let _ = self.inner.deliver(delivery).await;
                    self.inner.deliver(again).await
                }
                Fate::DropRequest => Err(TransportError::failed(target, "request lost")),
                Fate::Deliver => self.inner.deliver(delivery).await,
                Fate::DropReply => {
                    self.inner.deliver(delivery).await?;
                    Err(TransportError::failed(target, "reply lost"))
                }
            }
        })
    }
}

/// Where the authority keeps its state in a test: a SQLite file, or a
/// schema of its own in PostgreSQL (dropped with the test).
pub(crate) enum Backend {
    Sqlite,
    Postgres(PgSchema),
}

pub(crate) use netproc_testkit::PgSchema;

/// The authority's store options for a test's own schema.
pub(crate) trait PgOptions {
    fn options(&self) -> netproc_propagation::PostgresOptions;
}

impl PgOptions for PgSchema {
    fn options(&self) -> netproc_propagation::PostgresOptions {
        let mut o = netproc_propagation::PostgresOptions::new(self.url.clone());
        o.schema = Some(self.schema.clone());
        o
    }
}

/// Runs an authority test on SQLite, and on PostgreSQL when it is there.
macro_rules! on_both_backends {
    ($(#[$attr:meta])* async fn $name:ident($b:ident) $body:block) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            async fn case($b: Backend) $body

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                case(Backend::Sqlite).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                if let Some(pg) = PgSchema::new(concat!(stringify!($name), "::postgres")).await {
                    case(Backend::Postgres(pg)).await;
                }
            }
        }
    };
}

pub(crate) struct Fleet {
    pub(crate) _dir: tempfile::TempDir,
    pub(crate) _backend: Backend,
    /// The authority's signing key's seed: another authority process of
    /// this fleet signs with its own copy.
    pub(crate) seed: [u8; 32],
    pub(crate) authority: Authority,
    pub(crate) stores: BTreeMap<String, Arc<ApiKeyStore>>,
    pub(crate) targets: BTreeMap<String, Arc<PropagationTarget>>,
    pub(crate) transport: Arc<Lossy>,
}

pub(crate) fn fleet_on(backend: Backend, names: &[&str]) -> Fleet {
    let formats: Vec<(&str, u8)> = names.iter().map(|n| (*n, 3)).collect();
    fleet_with_formats(backend, &formats)
}

/// [`fleet_on`], each target accepting event formats up to its number (3:
/// all; 2: as one that predates the certificate deny list).
pub(crate) fn fleet_with_formats(backend: Backend, formats: &[(&str, u8)]) -> Fleet {
    let names: Vec<&str> = formats.iter().map(|(n, _)| *n).collect();
    let dir = tempfile::tempdir().unwrap();
    let key = Ed25519Key::generate().unwrap();
    let mut local = LocalTransport::new();
    let mut stores = BTreeMap::new();
    let mut targets = BTreeMap::new();
    for (n, format) in formats {
        let state = dir.path().join(n);
        std::fs::create_dir_all(&state).unwrap();
        let store = Arc::new(ApiKeyStore::in_memory());
        let t = PropagationTarget::open(
            TargetConfig::new(*n, vec![key.public_key()]),
            Arc::clone(&store),
            &netproc_server::StateDatabase::open(&state).unwrap(),
        )
        .unwrap();
        targets.insert((*n).to_owned(), Arc::clone(&t));
        match format {
            3 => local.add(t),
            f => local.add_with_format(t, *f),
        }
        stores.insert((*n).to_owned(), store);
    }
    let transport = Arc::new(Lossy {
        inner: local,
        fate: Mutex::new(HashMap::new()),
        last: Mutex::new(HashMap::new()),
        queued: Mutex::new(HashMap::new()),
    });
    let mut config = AuthorityConfig::new(
        dir.path().join("authority.db"),
        names.iter().map(|n| (*n).to_owned()).collect(),
    );
    config.base_backoff = Duration::from_millis(1);
    // Snapshots of more than one credential come in parts.
    config.snapshot_part_bytes = 120;
    if let Backend::Postgres(pg) = &backend {
        config.postgres = Some(pg.options());
    }
    let key_seed = &key.seed().clone();
    let authority =
        Authority::open(config, key, Arc::clone(&transport) as Arc<dyn Transport>).unwrap();
    Fleet {
        seed: *key_seed,
        _dir: dir,
        _backend: backend,
        authority,
        stores,
        targets,
        transport,
    }
}

pub(crate) fn privileges(admin: bool) -> netproc_auth::PrivilegeSet {
    if admin {
        "admin_privileges"
    } else {
        "invoke_functions"
    }
    .parse()
    .unwrap()
}

on_both_backends! {
    async fn ensure_rotate_and_revoke_reach_every_target(backend) {
    let f = fleet_on(backend, &["a", "b", "c"]);
    let cert = cert();
    let made = f
        .authority
        .ensure(
            CredentialSpec::api_key("svc", privileges(false)),
            &["a", "b", "c"],
        )
        .await
        .unwrap();
    assert!(made.created && made.changed);
    let key = made.api_key.unwrap();
    let status = f.authority.status("svc").await.unwrap();
    assert!(
        status.iter().all(|s| s.state == DeliveryState::Pending),
        "{status:?}"
    );
    let report = f.authority.sync().await;
    assert!(report.all_ok(), "{report:?}");
    let status = f.authority.status("svc").await.unwrap();
    assert_eq!(status.len(), 3);
    assert!(
        status.iter().all(|s| s.state == DeliveryState::Success),
        "{status:?}"
    );
    for store in f.stores.values() {
        assert!(store.verify(key.expose(), &cert, SystemTime::now()).is_ok());
    }
    // Ensuring the same thing again sends nothing.
    let again = f
        .authority
        .ensure(
            CredentialSpec::api_key("svc", privileges(false)),
            &["a", "b", "c"],
        )
        .await
        .unwrap();
    assert!(!again.created && !again.changed && again.api_key.is_none());
    assert!(
        f.authority
            .targets()
            .await
            .unwrap()
            .iter()
            .all(|t| t.pending_events == 0)
    );

    let new_key = f.authority.rotate("svc", None).await.unwrap();
    assert!(f.authority.sync().await.all_ok());
    for store in f.stores.values() {
        assert!(
            store
                .verify(key.expose(), &cert, SystemTime::now())
                .is_err()
        );
        assert_eq!(
            store
                .verify(new_key.expose(), &cert, SystemTime::now())
                .unwrap()
                .key_generation,
            Some(2)
        );
    }
    // Dropping a target deletes it there only.
    f.authority
        .ensure(
            CredentialSpec::api_key("svc", privileges(false)),
            &["a", "b"],
        )
        .await
        .unwrap();
    f.authority.revoke("svc").await.unwrap();
    assert!(f.authority.sync().await.all_ok());
    for store in f.stores.values() {
        assert!(
            store
                .verify(new_key.expose(), &cert, SystemTime::now())
                .is_err()
        );
        assert!(store.propagated_keys().is_empty());
    }
    assert!(f.authority.status("svc").await.is_err());
}}

on_both_backends! {
    async fn a_local_key_wins_and_the_conflict_is_reported(backend) {
    let f = fleet_on(backend, &["a", "b"]);
    let (local, _) = f.stores["a"].create(KeySpec::default()).unwrap();
    f.authority
        .ensure(
            CredentialSpec::api_key(&local.id, privileges(true)),
            &["a", "b"],
        )
        .await
        .unwrap();
    f.authority.sync().await;
    let status = f.authority.status(&local.id).await.unwrap();
    let by_target: BTreeMap<_, _> = status.into_iter().map(|s| (s.target, s.state)).collect();
    assert!(
        matches!(&by_target["a"], DeliveryState::Error { reason, .. } if reason == "conflict"),
        "{by_target:?}"
    );
    assert_eq!(by_target["b"], DeliveryState::Success);
    // The local key is untouched, and later changes still flow.
    assert!(!f.stores["a"].get(&local.id).unwrap().propagated);
    f.authority
        .ensure(CredentialSpec::api_key("other", privileges(false)), &["a"])
        .await
        .unwrap();
    assert!(f.authority.sync().await.all_ok());
    assert!(f.stores["a"].get("other").is_some());
}}

on_both_backends! {
    async fn a_target_that_cannot_commit_applies_nothing_and_is_retried(backend) {
    let f = fleet_on(backend, &["a"]);
    assert!(f.authority.sync().await.all_ok());
    // Break the target's table from outside: its next commit fails.
    let db = rusqlite::Connection::open(f._dir.path().join("a/netproc.db")).unwrap();
    db.execute_batch("ALTER TABLE propagated_keys RENAME TO broken")
        .unwrap();
    let key = f
        .authority
        .ensure(CredentialSpec::api_key("svc", privileges(false)), &["a"])
        .await
        .unwrap()
        .api_key
        .unwrap();
    let report = f.authority.sync().await;
    assert!(!report.all_ok(), "{report:?}");
    assert!(
        f.stores["a"].get("svc").is_none(),
        "applied without being stored"
    );
    let status = f.authority.status("svc").await.unwrap();
    assert!(
        matches!(&status[0].state, DeliveryState::Error { attempts: 1, .. }),
        "{status:?}"
    );
    // Repaired, the next sync delivers.
    db.execute_batch("ALTER TABLE broken RENAME TO propagated_keys")
        .unwrap();
    assert!(f.authority.sync().await.all_ok());
    assert!(
        f.stores["a"]
            .verify(key.expose(), &cert(), SystemTime::now())
            .is_ok()
    );
}}

#[test]
fn a_snapshot_in_parts_survives_a_restart_between_parts() {
    use netproc_propagation::{Ack, Credential, Delivery, Event, EventKind, sign};
    let dir = tempfile::tempdir().unwrap();
    let authority = Ed25519Key::generate().unwrap();
    let open = |store: Arc<ApiKeyStore>| {
        PropagationTarget::open(
            TargetConfig::new("a", vec![authority.public_key()]),
            store,
            &netproc_server::StateDatabase::open(dir.path()).unwrap(),
        )
        .unwrap()
    };
    let cred = |id: &str| {
        let mut c = Credential::default();
        c.id = id.into();
        c.secret_sha256 = Some([9; 32]);
        c.generation = 1;
        c.privileges = vec!["invoke_functions".into()];
        c
    };
    let part = |seq: u64, index: u32, ids: &[&str]| {
        let kind = EventKind::SnapshotPart {
            index,
            total: 3,
            credentials: ids.iter().map(|i| cred(i)).collect(),
        };
        sign(&Event::new("a", seq, SystemTime::now(), kind), &authority).unwrap()
    };
    let store = Arc::new(ApiKeyStore::in_memory());
    let target = open(Arc::clone(&store));
    // An earlier key the snapshot does not hold: it must go when the snapshot completes.
    let old = sign(
        &Event::new("a", 1, SystemTime::now(), EventKind::Upsert(cred("old"))),
        &authority,
    )
    .unwrap();
    let now = SystemTime::now();
    assert_eq!(
        target.deliver(&Delivery::new(vec![old]), now).unwrap().acks,
        [Ack::Applied]
    );

    // Parts 0 and 1 (after a gap: a snapshot's first part may jump one).
    let reply = target
        .deliver(
            &Delivery::new(vec![part(10, 0, &["k1", "k2"]), part(11, 1, &["k3"])]),
            now,
        )
        .unwrap();
    assert_eq!(reply.acks, [Ack::Applied, Ack::Applied]);
    assert_eq!(reply.cursor, 11);
    assert!(store.get("k1").is_none(), "applied before the last part");
    assert!(store.get("old").is_some());

    // Restart between parts: the parts received so far are kept.
    drop(target);
    let store = Arc::new(ApiKeyStore::in_memory());
    let target = open(Arc::clone(&store));
    assert_eq!(target.cursor(), 11);
    // A part out of sequence asks for a new snapshot and moves nothing.
    let skipped = SystemTime::now();
    let wrong = sign(
        &Event::new(
            "a",
            12,
            skipped,
            EventKind::SnapshotPart {
                index: 1,
                total: 3,
                credentials: vec![],
            },
        ),
        &authority,
    )
    .unwrap();
    assert_eq!(
        target
            .deliver(&Delivery::new(vec![wrong]), skipped)
            .unwrap()
            .acks,
        [Ack::NeedsSnapshot]
    );
    assert_eq!(target.cursor(), 11);
    // The right last part completes it: exactly the snapshot's keys remain.
    let reply = target
        .deliver(
            &Delivery::new(vec![part(12, 2, &["k4"])]),
            SystemTime::now(),
        )
        .unwrap();
    assert_eq!(reply.acks, [Ack::Applied]);
    let ids: Vec<String> = store.propagated_keys().into_iter().map(|k| k.id).collect();
    assert_eq!(ids, ["k1", "k2", "k3", "k4"]);
    // And again after another restart.
    drop(target);
    let store = Arc::new(ApiKeyStore::in_memory());
    let target = open(Arc::clone(&store));
    assert_eq!(target.cursor(), 12);
    assert_eq!(store.propagated_keys().len(), 4);
}

on_both_backends! {
    async fn run_delivers_in_the_background_and_a_concurrent_sync_waits_its_turn(backend) {
    let f = fleet_on(backend, &["a", "b"]);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let background = {
        let a = f.authority.clone();
        tokio::spawn(async move {
            a.run(async {
                let _ = stopped.await;
            })
            .await
        })
    };
    let key = f
        .authority
        .ensure(
            CredentialSpec::api_key("svc", privileges(false)),
            &["a", "b"],
        )
        .await
        .unwrap()
        .api_key
        .unwrap();
    // run() is woken by the change; sync() at the same time takes its turn.
    let report = f.authority.sync().await;
    assert!(report.all_ok(), "{report:?}");
    let status = f.authority.status("svc").await.unwrap();
    assert!(
        status.iter().all(|s| s.state == DeliveryState::Success),
        "{status:?}"
    );
    for store in f.stores.values() {
        assert!(
            store
                .verify(key.expose(), &cert(), SystemTime::now())
                .is_ok()
        );
    }
    // A change with no sync: run() alone delivers it.
    f.authority.revoke("svc").await.unwrap();
    let started = std::time::Instant::now();
    while f.stores.values().any(|s| s.get("svc").is_some()) {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "run() did not deliver"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop.send(()).unwrap();
    background.await.unwrap();
}}

on_both_backends! {
    async fn a_target_far_behind_gets_a_snapshot_instead_of_its_backlog(backend) {
    let f = fleet_on(backend, &["a", "b"]);
    assert!(f.authority.sync().await.all_ok());
    f.transport
        .fate
        .lock()
        .unwrap()
        .insert("b".into(), Fate::DropRequest);
    let mut keys = BTreeMap::new();
    for i in 0..5 {
        let id = format!("k{i}");
        let spec = CredentialSpec::api_key(id.as_str(), privileges(false));
        f.authority.ensure(spec, &["a", "b"]).await.unwrap();
        // Many rotations while "b" is unreachable: a long backlog for few keys.
        for _ in 0..60 {
            keys.insert(id.clone(), f.authority.rotate(&id, None).await.unwrap());
        }
    }
    let report = f.authority.sync().await;
    assert!(!report.all_ok());
    // The 305 queued events were already replaced by a snapshot (in parts)
    // when the failed attempt prepared its batch.
    let backlog = f
        .authority
        .targets()
        .await
        .unwrap()
        .iter()
        .find(|t| t.name == "b")
        .unwrap()
        .pending_events;
    assert!(backlog <= 5, "{backlog} events still queued");
    f.transport.fate.lock().unwrap().clear();
    let report = f.authority.sync().await;
    assert!(report.all_ok(), "{report:?}");
    let to_b = report
        .targets
        .iter()
        .find(|t| t.target == "b")
        .unwrap()
        .delivered;
    assert!(
        to_b <= 5,
        "{to_b} events: expected a snapshot (in parts of one or two keys), not the backlog"
    );
    for key in keys.values() {
        assert!(
            f.stores["b"]
                .verify(key.expose(), &cert(), SystemTime::now())
                .is_ok()
        );
    }
}}

/// The transport seam: each delivery carries its own correlation id, and a
/// delivery with no answer within the timeout is dropped (the transport
/// forgets it) and recorded as timed out.
#[tokio::test]
async fn a_delivery_without_an_answer_times_out_and_is_dropped() {
    struct Dropped(Arc<std::sync::atomic::AtomicUsize>);
    impl Drop for Dropped {
        fn drop(&mut self) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }
    #[derive(Default)]
    struct Silent {
        dropped: Arc<std::sync::atomic::AtomicUsize>,
        ids: Mutex<Vec<u64>>,
    }
    impl Transport for Silent {
        fn deliver<'a>(
            &'a self,
            delivery: Outgoing,
        ) -> BoxFuture<'a, Result<Vec<u8>, TransportError>> {
            self.ids.lock().unwrap().push(delivery.correlation_id);
            let guard = Dropped(Arc::clone(&self.dropped));
            Box::pin(async move {
                let _guard = guard;
                std::future::pending::<()>().await;
                unreachable!()
            })
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let silent = Arc::new(Silent::default());
    let mut config = AuthorityConfig::new(dir.path().join("authority.db"), vec!["a".into()]);
    config.delivery_timeout = Duration::from_millis(50);
    let authority = Authority::open(
        config,
        Ed25519Key::generate().unwrap(),
        Arc::clone(&silent) as Arc<dyn Transport>,
    )
    .unwrap();
    for _ in 0..2 {
        let report = authority.sync().await;
        let error = report.targets[0].error.clone().unwrap_or_default();
        assert!(error.contains("timed out"), "{report:?}");
    }
    let ids = silent.ids.lock().unwrap().clone();
    assert_eq!(ids.len(), 2);
    assert_ne!(ids[0], ids[1], "correlation ids are unique");
    assert_eq!(silent.dropped.load(std::sync::atomic::Ordering::SeqCst), 2);
}

// A credential's spec is the key store's own `KeySpec`; what is not
// propagated (label, session policy) is refused rather than dropped.
on_both_backends! {
    async fn what_is_not_propagated_is_refused_not_dropped(backend) {
    let f = fleet_on(backend, &["a"]);
    let spec = CredentialSpec::api_key(
        "svc",
        netproc_auth::KeySpec::new(privileges(false)).label("ci"),
    );
    match f.authority.ensure(spec, &["a"]).await {
        Err(netproc_propagation::AuthorityError::Invalid(m)) => {
            assert!(m.contains("not propagated"), "{m}")
        }
        other => panic!("{other:?}"),
    }
    let spec = CredentialSpec::api_key(
        "svc",
        netproc_auth::KeySpec::new(privileges(false)).functions(["add"]),
    );
    f.authority.ensure(spec, &["a"]).await.unwrap();
}}

on_both_backends! {
    async fn a_revoked_id_stays_revoked_unless_recreated_and_changes_name_their_maker(backend) {
    let log = netproc_testkit::log_capture(tracing::Level::INFO);
    let postgres = matches!(backend, Backend::Postgres(_));
    let f = fleet_on(backend, &["a"]);
    let spec = || CredentialSpec::api_key("tomb-svc", privileges(false));
    f.authority.ensure(spec(), &["a"]).await.unwrap();
    assert!(f.authority.sync().await.all_ok());
    f.authority.revoke("tomb-svc").await.unwrap();
    assert!(f.authority.sync().await.all_ok());
    // A later ensure of the same id (a script run again, a typo) does not
    // bring it back.
    match f.authority.ensure(spec(), &["a"]).await {
        Err(netproc_propagation::AuthorityError::Revoked(id)) => assert_eq!(id, "tomb-svc"),
        other => panic!("{other:?}"),
    }
    assert!(f.stores["a"].get("tomb-svc").is_none());
    // Asked for: a new secret, on the target again.
    let made = f.authority.ensure(spec().recreate(true), &["a"]).await.unwrap();
    assert!(made.created && made.api_key.is_some());
    assert!(f.authority.sync().await.all_ok());
    assert!(f.stores["a"].get("tomb-svc").is_some());
    // Each change says who made it (and PostgreSQL, as which role).
    let history = f.authority.history(Some("tomb-svc"), 10).await.unwrap();
    let actions: Vec<_> = history.iter().map(|c| c.action.as_str()).collect();
    assert_eq!(actions, ["create", "revoke", "create"], "{history:?}");
    let me = format!("pid {}", std::process::id());
    for c in &history {
        assert!(c.changed_by.ends_with(&me), "{c:?}");
        assert_eq!(c.db_role.is_some(), postgres, "{c:?}");
    }
    assert!(history.windows(2).all(|w| w[0].change_id > w[1].change_id));
    // The leader audits each change before signing it, with its maker.
    let logged = String::from_utf8_lossy(&log.lock().unwrap()).into_owned();
    let line = logged
        .lines()
        .find(|l| l.contains("propagation_sign") && l.contains("credential=\"tomb-svc\"") && l.contains("action=\"delete\""))
        .unwrap_or_else(|| panic!("no audit line for the revoke in:\n{logged}"));
    assert!(line.contains(&me), "{line}");
}}

/// Last writer wins per field, not per row: a rotation by one process and
/// a privilege change by another made at once both stay (each reads the
/// row the other wrote, locked until its transaction ends).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_and_an_update_made_at_once_both_stay() {
    let Some(pg) = PgSchema::new("a_rotation_and_an_update_made_at_once_both_stay").await else {
        return;
    };
    let f = fleet_on(Backend::Postgres(pg), &["a"]);
    let other = another_process(&f, Duration::from_secs(10));
    f.authority
        .ensure(CredentialSpec::api_key("lww", privileges(false)), &["a"])
        .await
        .unwrap();
    let rounds = 30;
    for i in 0..rounds {
        let (rotated, updated) = tokio::join!(
            f.authority.rotate("lww", None),
            other.ensure(
                CredentialSpec::api_key("lww", privileges(i % 2 == 0)),
                &["a"]
            ),
        );
        rotated.unwrap();
        updated.unwrap();
    }
    let listed = f.authority.credentials().await.unwrap();
    let lww = listed.iter().find(|c| c.id == "lww").unwrap();
    assert_eq!(lww.generation, 1 + rounds, "a rotation was lost");
    assert_eq!(
        lww.privileges,
        privileges(false).names(),
        "an update was lost"
    );
}

on_both_backends! {
    async fn a_denied_certificate_reaches_every_target_that_takes_it(backend) {
    use netproc_propagation::CertRef;
    let f = fleet_with_formats(backend, &[("a", 3), ("b", 3), ("old", 2)]);
    let ca = netproc_pki::CertificateAuthority::generate(&netproc_pki::CaParams::new("ca")).unwrap();
    let issued = ca.issue(&netproc_pki::LeafParams::client("laptop")).unwrap();
    let cert = issued.cert_identity().clone();
    let by_key = CertRef::Spki(*cert.spki_fingerprint.as_bytes());
    // Denied before the targets' first delivery: it travels after their
    // snapshot, in the whole list.
    f.authority.deny_certificate(by_key.clone(), cert.not_after).await.unwrap();
    assert!(f.authority.sync().await.all_ok());
    for t in ["a", "b"] {
        assert!(f.targets[t].deny_list().refuses(&cert), "{t}");
    }
    // The target that predates the format gets no-ops in their place: its
    // cursor moves, its list stays empty.
    let old_cursor = f.targets["old"].cursor();
    assert!(old_cursor > 0);
    assert!(f.targets["old"].deny_list().is_empty());
    let listed = f.authority.denied_certificates().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].0, by_key);
    // Allowed back, then denied by serial: each change is one event.
    f.authority.allow_certificate(&by_key).await.unwrap();
    assert!(f.authority.sync().await.all_ok());
    assert!(!f.targets["a"].deny_list().refuses(&cert));
    let by_serial = CertRef::Serial {
        issuer: cert.issuer.clone(),
        serial: cert.serial.clone(),
    };
    f.authority.deny_certificate(by_serial.clone(), cert.not_after).await.unwrap();
    assert!(f.authority.sync().await.all_ok());
    assert!(f.targets["b"].deny_list().refuses(&cert));
    assert_eq!(f.targets["old"].cursor(), old_cursor + 2);
    // Where it stands, per target, like a credential.
    let status = f.authority.status(&by_serial.label()).await.unwrap();
    assert_eq!(status.len(), 3, "{status:?}");
    assert!(status.iter().all(|s| s.state == DeliveryState::Success), "{status:?}");
    // Nothing to deny for an expired certificate; unknown entries refused.
    let past = SystemTime::now() - Duration::from_secs(1);
    assert!(matches!(
        f.authority.deny_certificate(CertRef::Spki([1; 32]), past).await,
        Err(netproc_propagation::AuthorityError::Invalid(_))
    ));
    assert!(matches!(
        f.authority.allow_certificate(&CertRef::Spki([1; 32])).await,
        Err(netproc_propagation::AuthorityError::UnknownCredential(_))
    ));
    // Who did it is on record.
    let history = f.authority.history(Some(&by_key.label()), 5).await.unwrap();
    let actions: Vec<_> = history.iter().map(|c| c.action.as_str()).collect();
    assert_eq!(actions, ["allow-cert", "deny-cert"]);
}}

/// Two authority processes on one PostgreSQL database (two `Authority`s
/// over one schema here): a new id created by both at once gets exactly
/// one secret (the other caller is told `AlreadyExists`), and a thousand
/// concurrent changes over shared targets all commit — no deadlock left
/// unresolved (a transaction PostgreSQL aborts is run again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_authorities_on_postgres_create_once_and_never_deadlock() {
    let Some(pg) =
        PgSchema::new("two_authorities_on_postgres_create_once_and_never_deadlock").await
    else {
        return;
    };
    let f = fleet_on(Backend::Postgres(pg), &["a", "b", "c"]);
    let second = Arc::new(another_process(&f, Duration::from_secs(10)));
    let first = Arc::new(f.authority.clone());
    for i in 0..20 {
        let id = format!("dup-{i}");
        let (x, y) = tokio::join!(
            first.ensure(CredentialSpec::api_key(&id, privileges(false)), &["a"]),
            second.ensure(CredentialSpec::api_key(&id, privileges(false)), &["a"]),
        );
        let secrets = [&x, &y]
            .iter()
            .filter(|r| matches!(r, Ok(e) if e.api_key.is_some()))
            .count();
        assert_eq!(secrets, 1, "{id}: {x:?} / {y:?}");
        for r in [x, y] {
            match r {
                Ok(_) | Err(netproc_propagation::AuthorityError::AlreadyExists(_)) => {}
                Err(e) => panic!("{id}: {e}"),
            }
        }
    }
    // 1,000 changes from both, over the three targets in varying orders.
    let mut tasks = Vec::new();
    for (n, authority) in [Arc::clone(&first), Arc::clone(&second)]
        .into_iter()
        .enumerate()
    {
        tasks.push(tokio::spawn(async move {
            for i in 0..500usize {
                let id = format!("k{}", i % 50);
                let targets: &[&str] = match (i + n) % 3 {
                    0 => &["a", "b", "c"],
                    1 => &["c", "b"],
                    _ => &["b", "a"],
                };
                match authority
                    .ensure(
                        CredentialSpec::api_key(&id, privileges(i % 2 == 0)),
                        targets,
                    )
                    .await
                {
                    Ok(_) | Err(netproc_propagation::AuthorityError::AlreadyExists(_)) => {}
                    Err(e) => panic!("{id}: {e}"),
                }
            }
        }));
    }
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .expect("the changes did not finish: a deadlock?")
            .unwrap();
    }
    assert_eq!(first.credentials().await.unwrap().len(), 70);
}

/// Seqs and snapshots stay serialised per target across processes: a
/// revoke by one authority racing the first snapshot another builds for a
/// new target never brings the revoked key back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoke_racing_a_snapshot_on_postgres_leaves_the_key_gone() {
    for round in 0..5 {
        let Some(pg) =
            PgSchema::new("a_revoke_racing_a_snapshot_on_postgres_leaves_the_key_gone").await
        else {
            return;
        };
        let f = fleet_on(Backend::Postgres(pg), &["a", "b"]);
        let other = another_process(&f, Duration::from_secs(10));
        f.authority
            .ensure(
                CredentialSpec::api_key("victim", privileges(false)),
                &["a", "b"],
            )
            .await
            .unwrap();
        // The targets are new: their first delivery is a snapshot, built
        // while the other authority revokes.
        let (_, revoked) = tokio::join!(f.authority.sync(), other.revoke("victim"));
        revoked.unwrap();
        for _ in 0..5 {
            f.authority.sync().await;
        }
        for t in ["a", "b"] {
            assert!(
                f.stores[t].get("victim").is_none(),
                "round {round}: the revoked key came back on {t}"
            );
        }
    }
}

/// Leadership by lease (PostgreSQL, 1 s): of two authority processes
/// running, one delivers; when it stops, the other takes over within the
/// lease with the next epoch, and changes keep reaching the targets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_takes_the_lease_when_the_leader_stops() {
    let Some(pg) = PgSchema::new("a_standby_takes_the_lease_when_the_leader_stops").await else {
        return;
    };
    let f = fleet_on(Backend::Postgres(pg), &["a"]);
    // Two processes of the same authority (same signing key here, so the
    // targets trust both), with a 1 s lease; the fleet's own authority
    // only makes changes and never runs.
    let standby = another_process(&f, Duration::from_secs(1));
    let leader = another_process(&f, Duration::from_secs(1));
    let (stop_leader, leader_stopped) = tokio::sync::oneshot::channel::<()>();
    let l = leader.clone();
    let leader_task = tokio::spawn(async move {
        l.run(async {
            let _ = leader_stopped.await;
        })
        .await;
    });
    // Let the leader take the lease before the standby starts.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let first = loop {
        if let Some(info) = leader.leader().await.unwrap() {
            break info;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "nobody took the lease"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let s = standby.clone();
    let (stop_standby, standby_stopped) = tokio::sync::oneshot::channel::<()>();
    let standby_task = tokio::spawn(async move {
        s.run(async {
            let _ = standby_stopped.await;
        })
        .await;
    });
    f.authority
        .ensure(CredentialSpec::api_key("one", privileges(false)), &["a"])
        .await
        .unwrap();
    until_present(&f, "one").await;
    assert_eq!(
        leader.leader().await.unwrap().unwrap().holder,
        first.holder,
        "the standby must not take a live lease"
    );

    // The leader stops (its lease is not renewed): the standby leads
    // within the lease, in the next epoch, and delivers.
    let stopped_at = std::time::Instant::now();
    let _ = stop_leader.send(());
    leader_task.await.unwrap();
    f.authority
        .ensure(CredentialSpec::api_key("two", privileges(false)), &["a"])
        .await
        .unwrap();
    until_present(&f, "two").await;
    let now = standby.leader().await.unwrap().unwrap();
    assert_ne!(now.holder, first.holder);
    assert_eq!(now.epoch, first.epoch + 1);
    assert!(
        stopped_at.elapsed() < Duration::from_secs(5),
        "failover took {:?}",
        stopped_at.elapsed()
    );
    let _ = stop_standby.send(());
    standby_task.await.unwrap();
}

/// Another process of `f`'s authority: the same database (PostgreSQL) and
/// signing key, the same transport, a `lease` and a short poll.
fn another_process(f: &Fleet, lease: Duration) -> Authority {
    let mut config = AuthorityConfig::new("unused", f.stores.keys().cloned().collect());
    if let Backend::Postgres(pg) = &f._backend {
        config.postgres = Some(pg.options());
    }
    config.lease = lease;
    config.poll_interval = Duration::from_millis(20);
    Authority::open(
        config,
        Ed25519Key::from_seed(&f.seed).unwrap(),
        Arc::clone(&f.transport) as Arc<dyn Transport>,
    )
    .unwrap()
}

async fn until_present(f: &Fleet, id: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while f.stores["a"].get(id).is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "{id} never reached the target"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// PostgreSQL cut under a running authority (through the TCP proxy): one
/// ERROR line and a backoff instead of an error per poll; when it is back,
/// the store reconnects, says so, and delivers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_authority_backs_off_while_postgres_is_cut_and_resumes_after() {
    let log = netproc_testkit::log_capture(tracing::Level::INFO);
    let Some(pg) =
        PgSchema::new("an_authority_backs_off_while_postgres_is_cut_and_resumes_after").await
    else {
        return;
    };
    let target = pg
        .url
        .split_once('@')
        .map_or("127.0.0.1:5432", |(_, r)| r.split('/').next().unwrap_or(r))
        .to_owned();
    let proxy = netproc_testkit::TcpProxy::start(&target).await;
    let mut options = pg.options();
    options.url = proxy.url(&pg.url);
    let f = fleet_on(Backend::Postgres(pg), &["a"]);
    let mut config = AuthorityConfig::new("unused", vec!["a".into()]);
    config.postgres = Some(options);
    config.lease = Duration::from_secs(1);
    config.poll_interval = Duration::from_millis(10);
    let through_proxy = Authority::open(
        config,
        Ed25519Key::from_seed(&f.seed).unwrap(),
        Arc::clone(&f.transport) as Arc<dyn Transport>,
    )
    .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let a = through_proxy.clone();
    let task = tokio::spawn(async move {
        a.run(async {
            let _ = stopped.await;
        })
        .await;
    });
    f.authority
        .ensure(CredentialSpec::api_key("before", privileges(false)), &["a"])
        .await
        .unwrap();
    until_present(&f, "before").await;
    proxy.cut();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let text = String::from_utf8_lossy(&log.lock().unwrap()).into_owned();
    let failing = text.matches("the authority's database is failing").count();
    assert_eq!(failing, 1, "one line per outage, not one per poll:\n{text}");
    proxy.resume();
    f.authority
        .ensure(CredentialSpec::api_key("after", privileges(false)), &["a"])
        .await
        .unwrap();
    until_present(&f, "after").await;
    // Said at the end of the loop turn that delivered: wait for it.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let text = String::from_utf8_lossy(&log.lock().unwrap()).into_owned();
        if text.contains("the authority's database answers again") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{text}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = stop.send(());
    task.await.unwrap();
}

/// A delivering leader cut from PostgreSQL (the TCP proxy closes its
/// session and refuses new ones): the standby takes the lease once it
/// expires, in the next epoch, and delivers; when the old leader's
/// database comes back it stands by, and nothing it held brings a revoked
/// key back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_from_postgres_is_replaced_and_stands_by_when_it_returns() {
    let Some(pg) =
        PgSchema::new("a_leader_cut_from_postgres_is_replaced_and_stands_by_when_it_returns").await
    else {
        return;
    };
    let target = pg
        .url
        .split_once('@')
        .map_or("127.0.0.1:5432", |(_, r)| r.split('/').next().unwrap_or(r))
        .to_owned();
    let proxy = netproc_testkit::TcpProxy::start(&target).await;
    let mut options = pg.options();
    options.url = proxy.url(&pg.url);
    let f = fleet_on(Backend::Postgres(pg), &["a"]);
    let lease = Duration::from_secs(1);
    let mut config = AuthorityConfig::new("unused", vec!["a".into()]);
    config.postgres = Some(options);
    config.lease = lease;
    config.poll_interval = Duration::from_millis(10);
    let cut_off = Authority::open(
        config,
        Ed25519Key::from_seed(&f.seed).unwrap(),
        Arc::clone(&f.transport) as Arc<dyn Transport>,
    )
    .unwrap();
    let run = |a: Authority| {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            a.run(async {
                let _ = stopped.await;
            })
            .await;
        });
        (stop, task)
    };
    // The one behind the proxy leads first.
    let (stop_cut, cut_task) = run(cut_off.clone());
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let first = loop {
        if let Some(info) = f.authority.leader().await.unwrap() {
            break info;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "nobody took the lease"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let standby = another_process(&f, lease);
    let (stop_standby, standby_task) = run(standby.clone());
    f.authority
        .ensure(CredentialSpec::api_key("one", privileges(false)), &["a"])
        .await
        .unwrap();
    until_present(&f, "one").await;
    assert_eq!(
        f.authority.leader().await.unwrap().unwrap().holder,
        first.holder
    );

    // Cut mid-flight: the standby leads in the next epoch and delivers.
    proxy.cut();
    let cut_at = std::time::Instant::now();
    f.authority
        .ensure(CredentialSpec::api_key("two", privileges(false)), &["a"])
        .await
        .unwrap();
    until_present(&f, "two").await;
    let now = f.authority.leader().await.unwrap().unwrap();
    assert_ne!(now.holder, first.holder);
    assert_eq!(now.epoch, first.epoch + 1);
    assert!(
        cut_at.elapsed() < Duration::from_secs(5),
        "{:?}",
        cut_at.elapsed()
    );

    // Back: the old leader finds the lease taken and stands by; a revoke
    // made now stays (nothing the old leader held lands over it).
    proxy.resume();
    f.authority.revoke("one").await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while f.stores["a"].get("one").is_some() {
        assert!(
            std::time::Instant::now() < deadline,
            "the revoke never landed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Several lease periods with both running: still the standby's epoch,
    // and the key stays gone.
    tokio::time::sleep(lease * 2).await;
    let later = f.authority.leader().await.unwrap().unwrap();
    assert_eq!((later.holder, later.epoch), (now.holder, now.epoch));
    assert!(f.stores["a"].get("one").is_none());
    assert!(f.stores["a"].get("two").is_some());
    let _ = stop_cut.send(());
    let _ = stop_standby.send(());
    cut_task.await.unwrap();
    standby_task.await.unwrap();
}

/// A login role of its own for a test, dropped at the end (also on
/// failure), with the grants `docs/propagation.md` gives a role that may
/// only request changes.
struct RequestRole {
    url: String,
    name: String,
}

impl RequestRole {
    fn create(pg: &PgSchema) -> RequestRole {
        let name = format!("{}_req", pg.schema);
        let (url, schema, n) = (pg.url.clone(), pg.schema.clone(), name.clone());
        std::thread::spawn(move || {
            let mut c = postgres::Client::connect(&url, postgres::NoTls).unwrap();
            c.batch_execute(&format!(
                "CREATE ROLE {n} LOGIN;
                 GRANT USAGE ON SCHEMA {schema} TO {n};
                 GRANT EXECUTE ON FUNCTION {schema}.netproc_request(text, text, bytea, text),
                   {schema}.netproc_request_outcome(bigint) TO {n};"
            ))
            .unwrap();
        })
        .join()
        .unwrap();
        RequestRole {
            url: pg.url.clone(),
            name,
        }
    }

    /// `url` logged in as this role.
    fn url(&self) -> String {
        match self.url.split_once("://") {
            Some((scheme, rest)) => {
                let host = rest.split_once('@').map_or(rest, |(_, h)| h);
                format!("{scheme}://{}@{host}", self.name)
            }
            None => self.url.clone(),
        }
    }
}

impl Drop for RequestRole {
    fn drop(&mut self) {
        let (url, n) = (self.url.clone(), self.name.clone());
        let _ = std::thread::spawn(move || {
            if let Ok(mut c) = postgres::Client::connect(&url, postgres::NoTls) {
                let _ = c.batch_execute(&format!("DROP OWNED BY {n}; DROP ROLE IF EXISTS {n}"));
            }
        })
        .join();
    }
}

/// Least privilege: a role that may only call `netproc_request` cannot
/// write the tables, but its `ensure`, `rotate` and `revoke` are applied
/// by the leader (its secret made by the requester, only the hash sent),
/// recorded with the requester's role, refused with the same errors as a
/// direct change; with no leader running, a request is not applied and
/// the caller is told so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_that_may_only_request_changes_has_them_applied_by_the_leader() {
    let Some(pg) =
        PgSchema::new("a_role_that_may_only_request_changes_has_them_applied_by_the_leader").await
    else {
        return;
    };
    let mut options = pg.options();
    let f = fleet_on(Backend::Postgres(pg), &["a"]);
    let Backend::Postgres(pg) = &f._backend else {
        unreachable!()
    };
    let role = RequestRole::create(pg);
    options.url = role.url();
    // The role cannot write the tables itself.
    let (url, schema) = (options.url.clone(), pg.schema.clone());
    let direct = std::thread::spawn(move || {
        let mut c = postgres::Client::connect(&url, postgres::NoTls).unwrap();
        c.batch_execute(&format!(
            "INSERT INTO {schema}.credentials (id, credential, updated_at_ms) VALUES ('x', '', 0)"
        ))
        .map_err(|e| e.as_db_error().map(|d| d.message().to_owned()))
    })
    .join()
    .unwrap();
    assert!(
        matches!(&direct, Err(Some(m)) if m.contains("permission denied")),
        "{direct:?}"
    );
    // The database predates this build's last migration (as after an
    // upgrade, before the authority ran): the role, which could not run
    // it, opens without migrating; the authority's own role migrates.
    let (owner_url, schema) = (pg.url.clone(), pg.schema.clone());
    std::thread::spawn(move || {
        let mut c = postgres::Client::connect(&owner_url, postgres::NoTls).unwrap();
        c.batch_execute(&format!(
            "DROP TABLE {schema}.denied_certs; UPDATE {schema}.netproc_schema SET version = 4"
        ))
        .unwrap();
    })
    .join()
    .unwrap();
    let mut config = AuthorityConfig::new("unused", vec!["a".into()]);
    config.postgres = Some(options);
    config.create_database = false;
    config.request_timeout = Duration::from_millis(400);
    let requester = Authority::open(
        config,
        Ed25519Key::generate().unwrap(),
        Arc::clone(&f.transport) as Arc<dyn Transport>,
    )
    .unwrap();

    // No leader yet: recorded, not applied, said so.
    match requester
        .ensure(CredentialSpec::api_key("queued", privileges(false)), &["a"])
        .await
    {
        Err(netproc_propagation::AuthorityError::NotApplied { .. }) => {}
        other => panic!("{other:?}"),
    }
    let leader = another_process(&f, Duration::from_secs(10));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let l = leader.clone();
    let task = tokio::spawn(async move {
        l.run(async {
            let _ = stopped.await;
        })
        .await;
    });
    // The queued one is applied when a leader runs (its secret is lost
    // with the timed-out call: it stays unusable until rotated).
    until_present(&f, "queued").await;

    let cert = cert();
    let made = requester
        .ensure(
            CredentialSpec::api_key("req-svc", privileges(false)),
            &["a"],
        )
        .await
        .unwrap();
    assert!(made.created && made.changed);
    let key = made.api_key.expect("the requester made the secret");
    until_present(&f, "req-svc").await;
    assert!(
        f.stores["a"]
            .verify(key.expose(), &cert, SystemTime::now())
            .is_ok()
    );
    // Asking again changes nothing and hands out no secret.
    let again = requester
        .ensure(
            CredentialSpec::api_key("req-svc", privileges(false)),
            &["a"],
        )
        .await
        .unwrap();
    assert!(!again.created && !again.changed && again.api_key.is_none());
    // Refusals come back typed.
    match requester
        .ensure(
            CredentialSpec::api_key("req-svc", privileges(false)),
            &["nowhere"],
        )
        .await
    {
        Err(netproc_propagation::AuthorityError::UnknownTarget(t)) => assert_eq!(t, "nowhere"),
        other => panic!("{other:?}"),
    }
    match requester.rotate("no-such-id", None).await {
        Err(netproc_propagation::AuthorityError::UnknownCredential(_)) => {}
        other => panic!("{other:?}"),
    }
    let rotated = requester.rotate("req-svc", None).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while f.stores["a"]
        .verify(rotated.expose(), &cert, SystemTime::now())
        .is_err()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the rotation never landed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    requester.revoke("req-svc").await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while f.stores["a"].get("req-svc").is_some() {
        assert!(
            std::time::Instant::now() < deadline,
            "the revoke never landed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // A certificate denied by request too.
    let ca =
        netproc_pki::CertificateAuthority::generate(&netproc_pki::CaParams::new("ca")).unwrap();
    let issued = ca
        .issue(&netproc_pki::LeafParams::client("laptop"))
        .unwrap();
    let laptop = issued.cert_identity().clone();
    let by_key = netproc_propagation::CertRef::Spki(*laptop.spki_fingerprint.as_bytes());
    requester
        .deny_certificate(by_key.clone(), laptop.not_after)
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !f.targets["a"].deny_list().refuses(&laptop) {
        assert!(
            std::time::Instant::now() < deadline,
            "the denial never landed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let denied = f.authority.history(Some(&by_key.label()), 1).await.unwrap();
    assert_eq!(denied[0].db_role.as_deref(), Some(role.name.as_str()));
    // Each change names the requester's role, as the database knows it.
    let history = f.authority.history(Some("req-svc"), 10).await.unwrap();
    let actions: Vec<_> = history.iter().map(|c| c.action.as_str()).collect();
    assert_eq!(actions, ["revoke", "rotate", "create"], "{history:?}");
    for c in &history {
        assert_eq!(c.db_role.as_deref(), Some(role.name.as_str()), "{c:?}");
        assert!(c.changed_by.contains("request"), "{c:?}");
    }
    let _ = stop.send(());
    task.await.unwrap();
}

/// Fencing at the target (second event format): an event signed in an
/// epoch below the highest applied is refused `stale_leader` and moves
/// nothing; the epoch is kept with the cursor, across a restart.
#[test]
fn a_deposed_leaders_events_are_refused_and_the_epoch_survives_a_restart() {
    use netproc_propagation::{Ack, Delivery, Event, EventKind, RejectReason, sign_with_epoch};
    let dir = tempfile::tempdir().unwrap();
    let key = Ed25519Key::generate().unwrap();
    let open = || {
        PropagationTarget::open(
            TargetConfig::new("a", vec![key.public_key()]),
            Arc::new(ApiKeyStore::in_memory()),
            &netproc_server::StateDatabase::open(dir.path()).unwrap(),
        )
        .unwrap()
    };
    let target = open();
    let event = |seq: u64| {
        Event::new(
            "a",
            seq,
            SystemTime::now(),
            EventKind::Delete {
                id: format!("k{seq}"),
            },
        )
    };
    let deliver = |t: &PropagationTarget, seq: u64, epoch: u64| {
        let signed = sign_with_epoch(&event(seq), epoch, &key).unwrap();
        t.deliver_epoch(&Delivery::new(vec![signed]), SystemTime::now())
            .unwrap()
    };
    assert_eq!(deliver(&target, 1, 2).acks, [Ack::Applied]);
    assert_eq!(target.epoch(), 2);
    // The deposed leader (epoch 1) sends the next seq: refused, nothing moves.
    let reply = deliver(&target, 2, 1);
    assert_eq!(reply.acks, [Ack::Rejected(RejectReason::StaleLeader)]);
    assert_eq!((reply.cursor, target.cursor()), (1, 1));
    // The current leader goes on; a later epoch is taken up.
    assert_eq!(deliver(&target, 2, 2).acks, [Ack::Applied]);
    assert_eq!(deliver(&target, 3, 3).acks, [Ack::Applied]);
    drop(target);
    let again = open();
    assert_eq!((again.cursor(), again.epoch()), (3, 3));
    assert_eq!(
        deliver(&again, 4, 2).acks,
        [Ack::Rejected(RejectReason::StaleLeader)]
    );
    // Once fenced, the first format (no epoch) cannot bypass the fence.
    let v1 = netproc_propagation::sign(&event(4), &key).unwrap();
    let reply = again
        .deliver(&Delivery::new(vec![v1]), SystemTime::now())
        .unwrap();
    assert_eq!(reply.acks, [Ack::Rejected(RejectReason::StaleLeader)]);
    assert_eq!(reply.cursor, 3);
}

/// The certificate deny list at a target: a denied certificate (by key or
/// by issuer and serial) is on the target's list once applied, in the same
/// transaction as the cursor, kept across a restart; `AllowCert` takes it
/// off; `DenyList` replaces the whole list; an entry whose certificate has
/// expired is dropped.
#[test]
fn deny_events_change_the_targets_list_and_survive_a_restart() {
    use netproc_propagation::{Ack, CertRef, Delivery, Event, EventKind, sign_with_epoch};
    let dir = tempfile::tempdir().unwrap();
    let key = Ed25519Key::generate().unwrap();
    let open = || {
        PropagationTarget::open(
            TargetConfig::new("a", vec![key.public_key()]),
            Arc::new(ApiKeyStore::in_memory()),
            &netproc_server::StateDatabase::open(dir.path()).unwrap(),
        )
        .unwrap()
    };
    let target = open();
    let deliver = |t: &PropagationTarget, seq: u64, kind: EventKind| {
        let event = Event::new("a", seq, SystemTime::now(), kind);
        let signed = sign_with_epoch(&event, 1, &key).unwrap();
        t.deliver_epoch(&Delivery::new(vec![signed]), SystemTime::now())
            .unwrap()
            .acks
    };
    let ca =
        netproc_pki::CertificateAuthority::generate(&netproc_pki::CaParams::new("ca")).unwrap();
    let issued = ca
        .issue(&netproc_pki::LeafParams::client("laptop"))
        .unwrap();
    let cert = issued.cert_identity().clone();
    let until = netproc_wire::unix_ms(cert.not_after);
    let by_key = CertRef::Spki(*cert.spki_fingerprint.as_bytes());
    let by_serial = CertRef::Serial {
        issuer: cert.issuer.clone(),
        serial: cert.serial.clone(),
    };
    let deny = |c: &CertRef| EventKind::DenyCert {
        cert: c.clone(),
        not_after: until,
    };
    assert_eq!(deliver(&target, 1, deny(&by_key)), [Ack::Applied]);
    assert!(target.deny_list().refuses(&cert));
    drop(target);
    let target = open();
    assert!(target.deny_list().refuses(&cert), "kept across a restart");
    assert_eq!(
        deliver(
            &target,
            2,
            EventKind::AllowCert {
                cert: by_key.clone()
            }
        ),
        [Ack::Applied]
    );
    assert!(!target.deny_list().refuses(&cert));
    assert_eq!(deliver(&target, 3, deny(&by_serial)), [Ack::Applied]);
    assert!(target.deny_list().refuses(&cert));
    // A whole list replaces what is held; an expired entry is not kept.
    let expired = CertRef::Spki([7; 32]);
    let list = EventKind::DenyList(vec![(by_key.clone(), until), (expired, 1_000)]);
    assert_eq!(deliver(&target, 4, list), [Ack::Applied]);
    assert_eq!(target.deny_list().len(), 1);
    assert!(target.deny_list().refuses(&cert));
    drop(target);
    let target = open();
    assert_eq!(target.deny_list().len(), 1);
    assert_eq!(target.cursor(), 4);
    // Forged, misaddressed and replayed deny events are refused like any
    // event, and change nothing.
    let other_cert = CertRef::Spki([3; 32]);
    let forger = Ed25519Key::generate().unwrap();
    let forged = sign_with_epoch(
        &Event::new("a", 5, SystemTime::now(), deny(&other_cert)),
        1,
        &forger,
    )
    .unwrap();
    let misaddressed = sign_with_epoch(
        &Event::new("b", 5, SystemTime::now(), deny(&other_cert)),
        1,
        &key,
    )
    .unwrap();
    let replayed = sign_with_epoch(
        &Event::new("a", 3, SystemTime::now(), deny(&other_cert)),
        1,
        &key,
    )
    .unwrap();
    let reply = target
        .deliver_epoch(
            &Delivery::new(vec![forged, misaddressed, replayed]),
            SystemTime::now(),
        )
        .unwrap();
    use netproc_propagation::RejectReason;
    assert_eq!(
        reply.acks,
        [
            Ack::Rejected(RejectReason::UnknownSigner),
            Ack::Rejected(RejectReason::WrongTarget),
            Ack::Duplicate
        ]
    );
    assert_eq!((reply.cursor, target.deny_list().len()), (4, 1));
}

/// A target that predates the second format gets the first: the authority
/// falls back when the target answers that it does not take it, and the
/// target's cursor keeps moving.
#[tokio::test]
async fn a_target_that_predates_epochs_gets_the_first_format() {
    let dir = tempfile::tempdir().unwrap();
    let key = Ed25519Key::generate().unwrap();
    let store = Arc::new(ApiKeyStore::in_memory());
    let old = PropagationTarget::open(
        TargetConfig::new("old", vec![key.public_key()]),
        Arc::clone(&store),
        &netproc_server::StateDatabase::open(dir.path()).unwrap(),
    )
    .unwrap();
    let mut transport = LocalTransport::new();
    transport.add_first_format_only(Arc::clone(&old));
    let authority = Authority::open(
        AuthorityConfig::new(dir.path().join("authority.db"), vec!["old".into()]),
        key,
        Arc::new(transport) as Arc<dyn Transport>,
    )
    .unwrap();
    authority
        .ensure(CredentialSpec::api_key("svc", privileges(false)), &["old"])
        .await
        .unwrap();
    let report = authority.sync().await;
    assert!(
        report.targets.iter().all(|t| t.error.is_none()),
        "{report:?}"
    );
    assert!(store.get("svc").is_some());
    assert!(old.cursor() > 0);
    assert_eq!(old.epoch(), 0, "it only ever received the first format");
}

/// A deposed leader that sends anyway (paused, then resumed after the
/// standby took over) is refused by the targets: `stale_leader`, nothing
/// applied, the target's cursor where the new leader left it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deposed_leader_that_sends_anyway_is_fenced() {
    let Some(pg) = PgSchema::new("a_deposed_leader_that_sends_anyway_is_fenced").await else {
        return;
    };
    let f = fleet_on(Backend::Postgres(pg), &["a"]);
    let old = another_process(&f, Duration::from_millis(500));
    let new = another_process(&f, Duration::from_millis(500));
    // The old leader leads (epoch 1) and delivers.
    let (stop_old, old_stopped) = tokio::sync::oneshot::channel::<()>();
    let o = old.clone();
    let old_task = tokio::spawn(async move {
        o.run(async {
            let _ = old_stopped.await;
        })
        .await;
    });
    f.authority
        .ensure(CredentialSpec::api_key("first", privileges(false)), &["a"])
        .await
        .unwrap();
    until_present(&f, "first").await;
    // It pauses (its loop stops; its memory keeps epoch 1); the new one
    // takes over once the lease expires, with epoch 2, and delivers.
    let _ = stop_old.send(());
    old_task.await.unwrap();
    let (stop_new, new_stopped) = tokio::sync::oneshot::channel::<()>();
    let n = new.clone();
    let new_task = tokio::spawn(async move {
        n.run(async {
            let _ = new_stopped.await;
        })
        .await;
    });
    f.authority
        .ensure(CredentialSpec::api_key("second", privileges(false)), &["a"])
        .await
        .unwrap();
    until_present(&f, "second").await;
    let _ = stop_new.send(());
    new_task.await.unwrap();
    assert_eq!(new.leader().await.unwrap().unwrap().epoch, 2);
    // The deposed leader resumes and sends what is pending: refused.
    f.authority
        .ensure(CredentialSpec::api_key("third", privileges(false)), &["a"])
        .await
        .unwrap();
    let report = old.sync().await;
    let error = report.targets[0].error.clone().unwrap_or_default();
    assert!(error.contains("stale_leader"), "{report:?}");
    assert!(
        f.stores["a"].get("third").is_none(),
        "a deposed leader's event landed"
    );
}
