//! Credential delivery through a real RabbitMQ (the `amqp` feature) to
//! real netproc servers over TLS. Each test uses its own prefix and
//! deletes its queues and exchanges at the end, failure included.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use netproc_client::Client;
use netproc_pki::Ed25519Key;
use netproc_propagation::{
    Ack, AmqpConfig, AmqpOutcome, AmqpReceiver, AmqpReply, AmqpRequest, AmqpTransport, Authority,
    AuthorityConfig, CredentialSpec, Delivery, DeliveryReply, DeliveryState, Event, EventKind,
    MixedTransport, NetprocTransport, RejectReason, Transport, sign_with_epoch,
};
use netproc_testkit::{TcpProxy, amqp_or_skip};
use netproc_wire::ErrorCode;
use tokio::sync::watch;

use crate::fleet::{Node, Pki, ended_with, long_call, refused, start_node, states, user};

/// A unique prefix per test run.
fn prefix(test: &str) -> String {
    let mut r = [0u8; 4];
    netproc_pki::random_bytes(&mut r).unwrap();
    format!("t-{test}-{:08x}", u32::from_le_bytes(r))
}

/// Deletes a test's queues and exchanges when dropped (also on panic).
struct Cleanup {
    url: String,
    queues: Vec<String>,
    exchanges: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let url = self.url.clone();
        let queues = std::mem::take(&mut self.queues);
        let exchanges = std::mem::take(&mut self.exchanges);
        // A thread of its own: Drop may run inside the test's runtime.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let Ok(conn) = Connection::connect(&url, ConnectionProperties::default()).await
                else {
                    return;
                };
                let Ok(ch) = conn.create_channel().await else {
                    return;
                };
                for q in queues {
                    let _ = ch.queue_delete(q.into(), Default::default()).await;
                }
                for e in exchanges {
                    let _ = ch.exchange_delete(e.into(), Default::default()).await;
                }
                let _ = conn.close(200, "bye".into()).await;
            });
        })
        .join();
    }
}

/// An AMQP target: a netproc server whose propagation target consumes
/// its queue, stopped by `stop`.
struct AmqpNode {
    node: Node,
    reply_key: [u8; 32],
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
    _cleanup: Cleanup,
}

fn cleanup(url: &str, config: &AmqpConfig, names: &[&str]) -> Cleanup {
    Cleanup {
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
    tune: impl Fn(&mut AmqpConfig),
    authority_url: Option<String>,
    target_url: Option<String>,
) -> AmqpFleet {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let signing = Ed25519Key::generate().unwrap();
    let mut config = AmqpConfig::new(url);
    config.prefix = prefix(test);
    tune(&mut config);
    let clean = cleanup(url, &config, names);
    let mut nodes = Vec::new();
    let mut reply_keys = Vec::new();
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
                stop,
                task,
            }
        })
        .collect();
    let seed = *signing.seed();
    let mut ac = AuthorityConfig::new(
        dir.path().join("authority.db"),
        names.iter().map(|t| (*t).to_owned()).collect(),
    );
    ac.delivery_timeout = Duration::from_secs(3);
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
    let f = amqp_fleet("erv", &url, &["a", "b", "c"], |_| {}, None, None).await;
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
