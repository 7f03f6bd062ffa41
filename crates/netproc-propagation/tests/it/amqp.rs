//! Credential delivery through a real RabbitMQ (the `amqp` feature) to
//! real netproc servers over TLS. Each test uses its own prefix and
//! deletes its queues and exchanges at the end, failure included.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use netproc_pki::Ed25519Key;
use netproc_propagation::{
    Ack, AmqpConfig, AmqpOutcome, AmqpReceiver, AmqpReply, AmqpRequest, AmqpTransport, Authority,
    AuthorityConfig, CredentialSpec, Delivery, DeliveryReply, DeliveryState, Event, EventKind,
    MixedTransport, NetprocTransport, RejectReason, TargetConfig, Transport, sign_with_epoch,
};
use netproc_testkit::{AmqpCleanup, TcpProxy, amqp_or_skip};
use netproc_wire::ErrorCode;
use tokio::sync::watch;

use crate::fleet::{Node, Pki, ended_with, long_call, refused, start_node_with, states, user};
use crate::local::PgOptions;

/// A unique prefix per test run.
fn prefix(test: &str) -> String {
    let mut r = [0u8; 4];
    netproc_pki::random_bytes(&mut r).unwrap();
    format!("t-{test}-{:08x}", u32::from_le_bytes(r))
}

/// An AMQP target: a netproc server whose propagation target consumes
/// its queue, stopped by `stop`.
struct AmqpNode {
    node: Node,
    reply_key: [u8; 32],
    reply_seed: [u8; 32],
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

fn receive(
    config: &AmqpConfig,
    node: &Node,
    reply_key: &Ed25519Key,
) -> (watch::Sender<bool>, tokio::task::JoinHandle<()>) {
    let receiver = AmqpReceiver::new(
        config.clone(),
        Arc::clone(&node.target),
        Ed25519Key::from_seed(reply_key.seed()).unwrap(),
    )
    .unwrap();
    let (stop, mut stopped) = watch::channel(false);
    let task = tokio::spawn(async move {
        receiver
            .run(async move {
                let _ = stopped.wait_for(|s| *s).await;
            })
            .await;
    });
    (stop, task)
}

struct AmqpFleet {
    pki: Pki,
    dir: tempfile::TempDir,
    url: String,
    config: AmqpConfig,
    signing: [u8; 32],
    nodes: Vec<AmqpNode>,
    transport: AmqpTransport,
    authority: Authority,
    _cleanup: AmqpCleanup,
}

fn cleanup(url: &str, config: &AmqpConfig, names: &[&str]) -> AmqpCleanup {
    AmqpCleanup {
        url: url.to_owned(),
        queues: names
            .iter()
            .map(|n| config.target_queue(n).unwrap())
            .collect(),
        exchanges: vec![
            format!("{}.replies", config.prefix),
            format!("{}.dead", config.prefix),
        ],
    }
}

/// Targets `names` behind the broker; the authority reaches the broker
/// at `authority_url` (a proxy, for outages) and targets at `target_url`.
async fn amqp_fleet(
    test: &str,
    url: &str,
    names: &[&str],
    tune: impl Fn(&mut AmqpConfig, &mut AuthorityConfig, &mut TargetConfig),
    authority_url: Option<String>,
    target_url: Option<String>,
) -> AmqpFleet {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let signing = Ed25519Key::generate().unwrap();
    let mut config = AmqpConfig::new(url);
    config.prefix = prefix(test);
    let mut ac = AuthorityConfig::new(
        dir.path().join("authority.db"),
        names.iter().map(|t| (*t).to_owned()).collect(),
    );
    ac.delivery_timeout = Duration::from_secs(3);
    let mut tc = TargetConfig::new("-", vec![signing.public_key()]);
    tune(&mut config, &mut ac, &mut tc);
    let clean = cleanup(url, &config, names);
    let mut nodes = Vec::new();
    let mut reply_keys = Vec::new();
    for n in names {
        let mut target = tc.clone();
        target.name = (*n).to_owned();
        let node = start_node_with(
            &pki,
            target,
            &dir.path().join(n),
            None,
            "receive_credentials",
        )
        .await;
        let key = Ed25519Key::generate().unwrap();
        reply_keys.push(((*n).to_owned(), key.public_key()));
        nodes.push((node, key));
    }
    let mut authority_config = config.clone();
    if let Some(u) = authority_url {
        authority_config = with_url(&authority_config, &u);
    }
    let transport = AmqpTransport::new(authority_config, signing.public_key(), reply_keys).unwrap();
    // The authority declares the queues; targets consume them.
    transport.connect().await.unwrap();
    let target_config = match target_url {
        Some(u) => with_url(&config, &u),
        None => config.clone(),
    };
    let nodes = nodes
        .into_iter()
        .map(|(node, key)| {
            let (stop, task) = receive(&target_config, &node, &key);
            AmqpNode {
                node,
                reply_key: key.public_key(),
                reply_seed: *key.seed(),
                stop,
                task,
            }
        })
        .collect();
    let seed = *signing.seed();
    let authority = Authority::open(ac, signing, Arc::new(transport.clone())).unwrap();
    AmqpFleet {
        pki,
        dir,
        url: url.to_owned(),
        config,
        signing: seed,
        nodes,
        transport,
        authority,
        _cleanup: clean,
    }
}

fn with_url(config: &AmqpConfig, url: &str) -> AmqpConfig {
    let mut c = AmqpConfig::new(url);
    c.prefix = config.prefix.clone();
    c.message_ttl = config.message_ttl;
    c.max_length = config.max_length;
    c
}

fn api_key(id: &str) -> CredentialSpec {
    CredentialSpec::api_key(
        id,
        "invoke_functions"
            .parse::<netproc_auth::PrivilegeSet>()
            .unwrap(),
    )
}

/// Syncs until every target is up to date (the receivers may still be
/// connecting), within `within`.
async fn sync_until_ok(authority: &Authority, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let report = authority.sync().await;
        if report.all_ok() {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never converged: {report:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ensure_rotate_and_revoke_through_the_broker_end_live_sessions() {
    let Some(url) = amqp_or_skip("amqp ensure_rotate_revoke").await else {
        return;
    };
    let f = amqp_fleet("erv", &url, &["a", "b", "c"], |_, _, _| {}, None, None).await;
    let key = f
        .authority
        .ensure(api_key("billing"), &["a", "b", "c"])
        .await
        .unwrap()
        .api_key
        .unwrap();
    sync_until_ok(&f.authority, Duration::from_secs(10)).await;
    let status = states(f.authority.status("billing").await.unwrap());
    assert_eq!(status.len(), 3);
    assert!(
        status.values().all(|s| *s == DeliveryState::Success),
        "{status:?}"
    );
    let mut calls = Vec::new();
    for n in &f.nodes {
        let s = user(&f.pki, &n.node, &key);
        assert_eq!(s.call::<String>("whoami", ()).await.unwrap(), "billing");
        calls.push(long_call(&s));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let new_key = f.authority.rotate("billing", None).await.unwrap();
    assert!(f.authority.sync().await.all_ok());
    for call in calls {
        assert_eq!(ended_with(call).await, ErrorCode::CredentialRevoked);
    }
    let mut calls = Vec::new();
    for n in &f.nodes {
        assert!(refused(&f.pki, &n.node, &key).await);
        calls.push(long_call(&user(&f.pki, &n.node, &new_key)));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    f.authority.revoke("billing").await.unwrap();
    assert!(f.authority.sync().await.all_ok());
    for call in calls {
        assert_eq!(ended_with(call).await, ErrorCode::CredentialRevoked);
    }
    for n in &f.nodes {
        assert!(refused(&f.pki, &n.node, &new_key).await);
        assert!(n.node.keys.propagated_keys().is_empty());
    }
    for n in f.nodes {
        n.stop.send(true).unwrap();
        n.task.await.unwrap();
    }
    drop(f.dir);
}

/// A test's own reply queue on the fleet's reply exchange, to read what
/// targets answer to requests the test publishes itself.
struct Spy {
    conn: Connection,
    channel: lapin::Channel,
    queue: String,
    replies: lapin::Consumer,
}

async fn spy(f: &AmqpFleet) -> Spy {
    let conn = Connection::connect(&f.url, ConnectionProperties::default())
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    let queue = format!("{}.authority.spy", f.config.prefix);
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    channel
        .queue_bind(
            queue.as_str().into(),
            format!("{}.replies", f.config.prefix).into(),
            queue.as_str().into(),
            Default::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let replies = channel
        .basic_consume(
            queue.as_str().into(),
            "spy".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    Spy {
        conn,
        channel,
        queue,
        replies,
    }
}

impl Spy {
    /// Publishes raw bytes into `queue` (as anyone with publish rights).
    async fn publish(&self, queue: &str, body: &[u8]) {
        self.channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                body,
                BasicProperties::default(),
            )
            .await
            .unwrap();
    }

    /// Publishes `events` to `to`'s queue as a request answered to the spy.
    async fn request(
        &self,
        f: &AmqpFleet,
        to: &str,
        id: u64,
        events: Vec<Event>,
        signer: &Ed25519Key,
    ) {
        let signed = events
            .iter()
            .map(|e| sign_with_epoch(e, 1, signer).unwrap())
            .collect();
        let request = AmqpRequest {
            version: 1,
            format: 3,
            authority: f.signing_public(),
            reply_to: self.queue.clone(),
            correlation_id: id,
            target: to.into(),
            delivery: Delivery::new(signed).encode(),
        };
        self.publish(&f.config.target_queue(to).unwrap(), &request.encode())
            .await;
    }

    /// The next reply, checked against `from`'s reply key.
    async fn reply(&mut self, f: &AmqpFleet, from: &AmqpNode) -> (u64, DeliveryReply) {
        let d = tokio::time::timeout(Duration::from_secs(10), self.replies.next())
            .await
            .expect("no reply")
            .unwrap()
            .unwrap();
        let reply = AmqpReply::decode(&d.data).unwrap();
        let m = AmqpReply::signed_message(
            &f.signing_public(),
            &self.queue,
            &reply.target,
            reply.correlation_id,
            &reply.outcome,
        );
        assert!(netproc_pki::verify_ed25519(
            &from.reply_key,
            &m,
            &reply.signature
        ));
        match reply.outcome {
            AmqpOutcome::Reply(bytes) => {
                (reply.correlation_id, DeliveryReply::decode(&bytes).unwrap())
            }
            other => panic!("not a delivery reply: {other:?}"),
        }
    }
}

impl AmqpFleet {
    fn signing_public(&self) -> [u8; 32] {
        Ed25519Key::from_seed(&self.signing).unwrap().public_key()
    }

    fn signing_key(&self) -> Ed25519Key {
        Ed25519Key::from_seed(&self.signing).unwrap()
    }

    /// Messages ready in `target`'s queue.
    async fn ready(&self, target: &str) -> u32 {
        let conn = Connection::connect(&self.url, ConnectionProperties::default())
            .await
            .unwrap();
        let ch = conn.create_channel().await.unwrap();
        let q = ch
            .queue_declare(
                self.config.target_queue(target).unwrap().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        let _ = conn.close(200, "bye".into()).await;
        q.message_count()
    }
}

fn upsert_event(target: &str, seq: u64, id: &str) -> Event {
    let mut c = netproc_propagation::Credential::default();
    c.id = id.into();
    c.secret_sha256 = Some([1; 32]);
    c.generation = 1;
    c.privileges = vec!["invoke_functions".into()];
    Event::new(
        target,
        seq,
        std::time::SystemTime::now(),
        EventKind::Upsert(c),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_replayed_misaddressed_and_garbage_messages_are_refused() {
    let Some(url) = amqp_or_skip("amqp forged").await else {
        return;
    };
    let f = amqp_fleet("forged", &url, &["a", "b"], |_, _, _| {}, None, None).await;
    let key = f
        .authority
        .ensure(api_key("svc"), &["a", "b"])
        .await
        .unwrap()
        .api_key
        .unwrap();
    sync_until_ok(&f.authority, Duration::from_secs(10)).await;
    let a = &f.nodes[0];
    let cursor = a.node.target.cursor();
    assert!(cursor >= 1);
    let mut spy = spy(&f).await;
    let real = f.signing_key();
    let forger = Ed25519Key::generate().unwrap();

    // Forged: signed by a key the target does not trust.
    spy.request(
        &f,
        "a",
        1,
        vec![upsert_event("a", cursor + 1, "evil")],
        &forger,
    )
    .await;
    let (id, r) = spy.reply(&f, a).await;
    assert_eq!(id, 1);
    assert_eq!(r.acks, vec![Ack::Rejected(RejectReason::UnknownSigner)]);
    assert_eq!(r.cursor, cursor);
    // Misaddressed: signed by the authority for b, put in a's queue.
    spy.request(
        &f,
        "a",
        2,
        vec![upsert_event("b", cursor + 1, "evil")],
        &real,
    )
    .await;
    let (_, r) = spy.reply(&f, a).await;
    assert_eq!(r.acks, vec![Ack::Rejected(RejectReason::WrongTarget)]);
    // Replayed: an event at or below the cursor.
    spy.request(&f, "a", 3, vec![upsert_event("a", cursor, "evil")], &real)
        .await;
    let (_, r) = spy.reply(&f, a).await;
    assert_eq!(r.acks, vec![Ack::Duplicate]);
    assert_eq!(a.node.target.cursor(), cursor);
    // Garbage: acknowledged away, never redelivered; the queue empties
    // and the target keeps answering.
    let queue = f.config.target_queue("a").unwrap();
    spy.publish(&queue, b"garbage").await;
    spy.publish(&queue, &[0xff; 70]).await;
    spy.request(&f, "a", 4, vec![], &real).await;
    let (id, r) = spy.reply(&f, a).await;
    assert_eq!((id, r.cursor), (4, cursor));
    assert_eq!(f.ready("a").await, 0);
    assert!(a.node.keys.propagated_keys().iter().all(|k| k.id != "evil"));

    // A forged reply claiming a's revocation applied never counts: the
    // target is away, forged replies with every likely correlation id
    // arrive, and the revocation stays pending until a really answers.
    a.stop.send(true).unwrap();
    f.authority.revoke("svc").await.unwrap();
    let report = tokio::spawn({
        let authority = f.authority.clone();
        async move { authority.sync().await }
    });
    for id in 0..200u64 {
        let mut claim = DeliveryReply::default();
        claim.cursor = cursor + 1000;
        claim.acks = vec![Ack::Applied];
        let outcome = AmqpOutcome::Reply(claim.encode());
        let m = AmqpReply::signed_message(
            &f.signing_public(),
            f.transport.reply_queue(),
            "a",
            id,
            &outcome,
        );
        let forged = AmqpReply {
            correlation_id: id,
            target: "a".into(),
            signature: forger.sign(&m).to_vec(),
            outcome,
        };
        spy.channel
            .basic_publish(
                format!("{}.replies", f.config.prefix).into(),
                f.transport.reply_queue().into(),
                BasicPublishOptions::default(),
                &forged.encode(),
                BasicProperties::default(),
            )
            .await
            .unwrap();
    }
    let report = report.await.unwrap();
    let a_sync = report.targets.iter().find(|t| t.target == "a").unwrap();
    assert!(a_sync.error.is_some(), "{report:?}");
    let status = states(f.authority.status("svc").await.unwrap());
    assert_ne!(status["a"], DeliveryState::Success, "{status:?}");
    // (b, reached, has nothing left to report for a revoked credential.)
    assert!(!status.contains_key("b"), "{status:?}");
    // A receiver answering with another reply key is not believed either.
    let (stop, task) = receive(&f.config, &a.node, &Ed25519Key::generate().unwrap());
    let report = f.authority.sync().await;
    assert!(!report.all_ok(), "{report:?}");
    stop.send(true).unwrap();
    task.await.unwrap();
    // a comes back with its own key: the revocation arrives.
    let (stop, task) = receive(
        &f.config,
        &a.node,
        &Ed25519Key::from_seed(&a.reply_seed).unwrap(),
    );
    sync_until_ok(&f.authority, Duration::from_secs(15)).await;
    assert!(refused(&f.pki, &a.node, &key).await);
    assert!(a.node.keys.propagated_keys().is_empty());
    stop.send(true).unwrap();
    task.await.unwrap();
    drop(spy.conn);
}

/// Waits until every credential in `ids` is `success` on every target.
async fn converged(authority: &Authority, ids: &[String], within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    for id in ids {
        loop {
            let s = authority.status(id).await.unwrap();
            if s.iter().all(|t| t.state == DeliveryState::Success) {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{id} never converged: {s:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_cut_on_either_side_mid_sync_then_both_converge() {
    let Some(url) = amqp_or_skip("amqp cut").await else {
        return;
    };
    let broker = url.split_once('@').map_or("127.0.0.1:5672", |(_, h)| h);
    let broker = broker.split('/').next().unwrap().to_owned();
    let authority_side = TcpProxy::start(&broker).await;
    let target_side = TcpProxy::start(&broker).await;
    let f = amqp_fleet(
        "cut",
        &url,
        &["a", "b"],
        |_, ac, _| {
            ac.delivery_timeout = Duration::from_secs(1);
            ac.base_backoff = Duration::from_millis(50);
            ac.max_backoff = Duration::from_millis(300);
            ac.poll_interval = Duration::from_millis(50);
        },
        Some(authority_side.url(&url)),
        Some(target_side.url(&url)),
    )
    .await;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn({
        let authority = f.authority.clone();
        async move {
            authority
                .run(async move {
                    let _ = stopped.await;
                })
                .await;
        }
    });
    let mut ids = Vec::new();
    for round in 0..3 {
        for i in 0..10 {
            let id = format!("svc-{round}-{i}");
            f.authority.ensure(api_key(&id), &["a", "b"]).await.unwrap();
            ids.push(id);
        }
        // Mid-sync: one side, then the other, then both.
        let cut: Vec<&TcpProxy> = match round {
            0 => vec![&authority_side],
            1 => vec![&target_side],
            _ => vec![&authority_side, &target_side],
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        cut.iter().for_each(|p| p.cut());
        for i in 10..20 {
            let id = format!("svc-{round}-{i}");
            f.authority.ensure(api_key(&id), &["a", "b"]).await.unwrap();
            ids.push(id);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        cut.iter().for_each(|p| p.resume());
    }
    converged(&f.authority, &ids, Duration::from_secs(30)).await;
    for n in &f.nodes {
        let mut held: Vec<_> = n
            .node
            .keys
            .propagated_keys()
            .into_iter()
            .map(|k| k.id)
            .collect();
        held.sort();
        let mut want = ids.clone();
        want.sort();
        assert_eq!(held, want, "on {}", n.node.name);
    }
    stop.send(()).unwrap();
    run.await.unwrap();
    for n in f.nodes {
        n.stop.send(true).unwrap();
        n.task.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_away_past_the_freshness_window_converges_and_its_queue_stays_bounded() {
    let Some(url) = amqp_or_skip("amqp backlog").await else {
        return;
    };
    let f = amqp_fleet(
        "backlog",
        &url,
        &["a"],
        |c, ac, tc| {
            // Requests expire (dead-lettered) before they would be stale.
            tc.freshness = Duration::from_secs(2);
            c.message_ttl = Duration::from_millis(1500);
            c.max_length = 4;
            ac.delivery_timeout = Duration::from_millis(500);
        },
        None,
        None,
    )
    .await;
    let a = &f.nodes[0];
    f.authority.ensure(api_key("first"), &["a"]).await.unwrap();
    sync_until_ok(&f.authority, Duration::from_secs(10)).await;
    let before = a.node.target.cursor();
    a.stop.send(true).unwrap();
    // Away: 1,000 changes, and the authority keeps trying.
    let mut ids = vec!["first".to_owned()];
    let started = std::time::Instant::now();
    let mut max_ready = 0;
    for i in 0..1000 {
        let id = format!("k{i}");
        f.authority.ensure(api_key(&id), &["a"]).await.unwrap();
        ids.push(id);
        if i % 100 == 0 {
            assert!(!f.authority.sync().await.all_ok());
            max_ready = max_ready.max(f.ready("a").await);
        }
    }
    while started.elapsed() < Duration::from_secs(3) {
        let _ = f.authority.sync().await;
        max_ready = max_ready.max(f.ready("a").await);
    }
    assert!(max_ready <= 1, "{max_ready} requests waited in the queue");
    // Back: it converges (a snapshot, by the backlog rule), nothing twice.
    let (stop, task) = receive(
        &f.config,
        &a.node,
        &Ed25519Key::from_seed(&a.reply_seed).unwrap(),
    );
    sync_until_ok(&f.authority, Duration::from_secs(20)).await;
    let held = a.node.keys.propagated_keys();
    assert_eq!(held.len(), ids.len());
    assert!(a.node.target.cursor() > before);
    converged(&f.authority, &ids[..1], Duration::from_secs(5)).await;
    stop.send(true).unwrap();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mixed_fleet_converges_and_a_new_leader_converges_the_broker_targets() {
    let Some(url) = amqp_or_skip("amqp mixed").await else {
        return;
    };
    let Some(pg) = crate::local::PgSchema::new("amqp mixed").await else {
        return;
    };
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let signing = Ed25519Key::generate().unwrap();
    let mut config = AmqpConfig::new(&url);
    config.prefix = prefix("mixed");
    let names = ["d1", "d2", "q1", "q2"];
    let _clean = cleanup(&url, &config, &names[2..]);
    let mut nodes = Vec::new();
    for n in names {
        let target = TargetConfig::new(n, vec![signing.public_key()]);
        let node = start_node_with(
            &pki,
            target,
            &dir.path().join(n),
            None,
            "receive_credentials",
        )
        .await;
        nodes.push(node);
    }
    let reply_keys: Vec<Ed25519Key> = (0..2).map(|_| Ed25519Key::generate().unwrap()).collect();
    let receivers: Vec<_> = nodes[2..]
        .iter()
        .zip(&reply_keys)
        .map(|(n, k)| receive(&config, n, k))
        .collect();
    // One authority process: direct to d1, d2 over mTLS, q1, q2 through
    // the broker (each process has its own reply queue).
    let process = || {
        let routes: Vec<_> = nodes[..2]
            .iter()
            .map(|n| {
                (
                    n.name.clone(),
                    n.server.local_addr(),
                    n.authority_key.clone(),
                )
            })
            .collect();
        let direct: Arc<dyn Transport> = Arc::new(NetprocTransport::new(
            crate::fleet::authority_client(&pki, &routes),
        ));
        let broker: Arc<dyn Transport> = Arc::new(
            AmqpTransport::new(
                config.clone(),
                signing.public_key(),
                names[2..]
                    .iter()
                    .zip(&reply_keys)
                    .map(|(n, k)| ((*n).to_owned(), k.public_key())),
            )
            .unwrap(),
        );
        let mut mixed = MixedTransport::new();
        for n in &names[..2] {
            mixed.route(*n, Arc::clone(&direct));
        }
        for n in &names[2..] {
            mixed.route(*n, Arc::clone(&broker));
        }
        let mut ac =
            AuthorityConfig::new("unused", names.iter().map(|n| (*n).to_owned()).collect());
        ac.postgres = Some(pg.options());
        ac.lease = Duration::from_secs(1);
        ac.poll_interval = Duration::from_millis(20);
        ac.delivery_timeout = Duration::from_secs(2);
        Authority::open(
            ac,
            Ed25519Key::from_seed(signing.seed()).unwrap(),
            Arc::new(mixed),
        )
        .unwrap()
    };
    let run = |a: &Authority| {
        let a = a.clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        (
            stop,
            tokio::spawn(async move {
                a.run(async {
                    let _ = stopped.await;
                })
                .await;
            }),
        )
    };
    let leader = process();
    let (stop_leader, leader_task) = run(&leader);
    leader.ensure(api_key("one"), &names).await.unwrap();
    converged(&leader, &["one".to_owned()], Duration::from_secs(15)).await;
    // The leader stops; another process takes over and converges the
    // broker targets too.
    let _ = stop_leader.send(());
    leader_task.await.unwrap();
    let standby = process();
    let (stop_standby, standby_task) = run(&standby);
    standby.ensure(api_key("two"), &names).await.unwrap();
    standby.revoke("one").await.unwrap();
    converged(&standby, &["two".to_owned()], Duration::from_secs(15)).await;
    for n in &nodes {
        let held: Vec<_> = n.keys.propagated_keys().into_iter().map(|k| k.id).collect();
        assert_eq!(held, vec!["two".to_owned()], "on {}", n.name);
    }
    assert!(standby.leader().await.unwrap().unwrap().epoch >= 2);
    let _ = stop_standby.send(());
    standby_task.await.unwrap();
    for (stop, task) in receivers {
        stop.send(true).unwrap();
        task.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_request_is_a_duplicate_applied_once() {
    let Some(url) = amqp_or_skip("amqp redelivery").await else {
        return;
    };
    let f = amqp_fleet("redeliver", &url, &["a"], |_, _, _| {}, None, None).await;
    let a = &f.nodes[0];
    let cursor = a.node.target.cursor();
    let mut spy = spy(&f).await;
    let events = vec![upsert_event("a", cursor + 1, "once")];
    // The broker hands the same request over twice (a redelivery after a
    // lost acknowledgement looks exactly like this to the target).
    for id in [1, 2] {
        spy.request(&f, "a", id, events.clone(), &f.signing_key())
            .await;
    }
    let (_, first) = spy.reply(&f, a).await;
    let (_, second) = spy.reply(&f, a).await;
    assert_eq!(first.acks, vec![Ack::Applied]);
    assert_eq!(second.acks, vec![Ack::Duplicate]);
    assert_eq!(second.cursor, cursor + 1);
    assert_eq!(
        a.node
            .keys
            .propagated_keys()
            .iter()
            .filter(|k| k.id == "once")
            .count(),
        1
    );
    drop(spy.conn);
    for n in f.nodes {
        n.stop.send(true).unwrap();
        n.task.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_whose_broker_is_down_at_start_serves_rpc_and_catches_up() {
    let Some(url) = amqp_or_skip("amqp down at start").await else {
        return;
    };
    let broker = url.split_once('@').map_or("127.0.0.1:5672", |(_, h)| h);
    let broker = broker.split('/').next().unwrap().to_owned();
    let target_side = TcpProxy::start(&broker).await;
    target_side.cut();
    let f = amqp_fleet(
        "down",
        &url,
        &["a"],
        |_, ac, _| ac.delivery_timeout = Duration::from_millis(500),
        None,
        Some(target_side.url(&url)),
    )
    .await;
    let a = &f.nodes[0];
    let key = f
        .authority
        .ensure(api_key("svc"), &["a"])
        .await
        .unwrap()
        .api_key
        .unwrap();
    assert!(!f.authority.sync().await.all_ok());
    // RPC is served all the same (a key of the server's own).
    let (info, local) = a
        .node
        .keys
        .create(netproc_auth::KeySpec::new(
            "invoke_functions".parse().unwrap(),
        ))
        .unwrap();
    assert_eq!(
        user(&f.pki, &a.node, &local)
            .call::<String>("whoami", ())
            .await
            .unwrap(),
        info.id
    );
    assert!(refused(&f.pki, &a.node, &key).await);
    // The broker comes back: the consumer reconnects and the key arrives.
    target_side.resume();
    sync_until_ok(&f.authority, Duration::from_secs(20)).await;
    assert_eq!(
        user(&f.pki, &a.node, &key)
            .call::<String>("whoami", ())
            .await
            .unwrap(),
        "svc"
    );
    for n in f.nodes {
        n.stop.send(true).unwrap();
        n.task.await.unwrap();
    }
}
