// Properties of the authority and its targets over the lossy in-memory
// transport: any interleaving of changes, deliveries, replays and losses
// converges after a final sync.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use netproc_auth::ApiKey;
use netproc_propagation::{CredentialSpec, Outgoing, Transport};
use proptest::prelude::*;

use crate::local::*;

#[derive(Debug, Clone)]
enum Op {
    Ensure {
        id: usize,
        targets: u8,
        admin: bool,
    },
    Rotate {
        id: usize,
        overlap: bool,
    },
    Revoke {
        id: usize,
    },
    Sync {
        drop_request: u8,
        drop_reply: u8,
    },
    Replay {
        target: usize,
    },
    /// Broker-shaped sync: per target, a fate among deliver, drop the
    /// request, lose the reply, leave it waiting in the queue, redeliver.
    BrokerSync {
        fates: [u8; 3],
    },
    /// Broker-shaped: a target reads what waited in its queue, late.
    ConsumeLate {
        target: usize,
    },
    /// Broker-shaped: what waited in a target's queue expires.
    Expire {
        target: usize,
    },
}

const TARGETS: [&str; 3] = ["t0", "t1", "t2"];
const IDS: [&str; 3] = ["k0", "k1", "k2"];

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..3usize, 0..8u8, any::<bool>()).prop_map(|(id, targets, admin)| Op::Ensure { id, targets, admin }),
        1 => (0..3usize, any::<bool>()).prop_map(|(id, overlap)| Op::Rotate { id, overlap }),
        1 => (0..3usize).prop_map(|id| Op::Revoke { id }),
        3 => (0..8u8, 0..8u8).prop_map(|(drop_request, drop_reply)| Op::Sync { drop_request, drop_reply }),
        1 => (0..3usize).prop_map(|target| Op::Replay { target }),
    ]
}

/// The broker-shaped operations beside the others.
fn broker_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => op(),
        3 => proptest::array::uniform3(0..5u8).prop_map(|fates| Op::BrokerSync { fates }),
        1 => (0..3usize).prop_map(|target| Op::ConsumeLate { target }),
        1 => (0..3usize).prop_map(|target| Op::Expire { target }),
    ]
}

async fn run_ops(ops: Vec<Op>) {
    run_ops_on(Backend::Sqlite, ops).await;
}

async fn run_ops_on(backend: Backend, ops: Vec<Op>) {
    let f = fleet_on(backend, &TARGETS);
    let cert = cert();
    // The latest secret of each live API key.
    let mut keys: BTreeMap<&str, ApiKey> = BTreeMap::new();
    for op in ops {
        match op {
            Op::Ensure { id, targets, admin } => {
                let on: Vec<&str> = (0..3)
                    .filter(|i| targets & (1 << i) != 0)
                    .map(|i| TARGETS[i])
                    .collect();
                // Ids come back after a revoke in this model.
                let spec = CredentialSpec::api_key(IDS[id], privileges(admin)).recreate(true);
                let r = f.authority.ensure(spec, &on).await.unwrap();
                if let Some(k) = r.api_key {
                    keys.insert(IDS[id], k);
                }
            }
            Op::Rotate { id, overlap } => {
                let overlap = overlap.then_some(Duration::from_secs(3600));
                if let Ok(k) = f.authority.rotate(IDS[id], overlap).await {
                    keys.insert(IDS[id], k);
                }
            }
            Op::Revoke { id } => {
                if f.authority.revoke(IDS[id]).await.is_ok() {
                    keys.remove(IDS[id]);
                }
            }
            Op::Sync {
                drop_request,
                drop_reply,
            } => {
                {
                    let mut fate = f.transport.fate.lock().unwrap();
                    for (i, t) in TARGETS.iter().enumerate() {
                        let v = if drop_request & (1 << i) != 0 {
                            Fate::DropRequest
                        } else if drop_reply & (1 << i) != 0 {
                            Fate::DropReply
                        } else {
                            Fate::Deliver
                        };
                        fate.insert((*t).to_owned(), v);
                    }
                }
                f.authority.sync().await;
            }
            Op::BrokerSync { fates } => {
                {
                    let mut fate = f.transport.fate.lock().unwrap();
                    for (t, v) in TARGETS.iter().zip(fates) {
                        let v = match v {
                            0 => Fate::Deliver,
                            1 => Fate::DropRequest,
                            2 => Fate::DropReply,
                            3 => Fate::Queue,
                            _ => Fate::Redeliver,
                        };
                        fate.insert((*t).to_owned(), v);
                    }
                }
                f.authority.sync().await;
            }
            Op::ConsumeLate { target } => f.transport.consume_late(TARGETS[target]).await,
            Op::Expire { target } => f.transport.expire(TARGETS[target]),
            Op::Replay { target } => {
                let last = f
                    .transport
                    .last
                    .lock()
                    .unwrap()
                    .get(TARGETS[target])
                    .cloned();
                if let Some(request) = last {
                    let outgoing =
                        Outgoing::new(TARGETS[target], 0, request, Duration::from_secs(5));
                    let _ = f.transport.inner.deliver(outgoing).await;
                }
            }
        }
    }
    f.transport.fate.lock().unwrap().clear();
    // Whatever still waits in a queue expires (its time to live).
    for t in TARGETS {
        f.transport.expire(t);
    }
    for _ in 0..4 {
        if f.authority.sync().await.all_ok() {
            break;
        }
    }
    let view = f.authority.credentials().await.unwrap();
    for (name, store) in &f.stores {
        let expected: BTreeMap<String, (u64, Vec<String>)> = view
            .iter()
            .filter(|c| c.targets.contains(name))
            .map(|c| (c.id.clone(), (c.generation, c.privileges.clone())))
            .collect();
        let actual: BTreeMap<String, (u64, Vec<String>)> = store
            .propagated_keys()
            .into_iter()
            .map(|k| (k.id.clone(), (k.generation, k.privileges.names())))
            .collect();
        assert_eq!(actual, expected, "target {name}");
        for (id, key) in &keys {
            let on = expected.contains_key(*id);
            assert_eq!(
                store.verify(key.expose(), &cert, SystemTime::now()).is_ok(),
                on,
                "{id} on {name}"
            );
        }
    }
    for t in f.authority.targets().await.unwrap() {
        assert_eq!(t.pending_events, 0, "{t:?}");
        assert!(!t.snapshot_needed, "{t:?}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn any_interleaving_converges_after_a_final_sync(ops in proptest::collection::vec(op(), 1..24)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(run_ops(ops));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// The same over a broker-shaped transport: requests that wait in a
    /// queue (and block further ones), are read late, expire, or are
    /// redelivered.
    #[test]
    fn any_interleaving_over_a_broker_shaped_transport_converges(ops in proptest::collection::vec(broker_op(), 1..24)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(run_ops(ops));
    }
}

proptest! {
    // Each case makes a PostgreSQL schema: at most 32 of them.
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn any_interleaving_converges_on_postgres_too(ops in proptest::collection::vec(op(), 1..24)) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async {
            if let Some(pg) = PgSchema::new("any_interleaving_converges_on_postgres_too").await {
                run_ops_on(Backend::Postgres(pg), ops).await;
            }
        });
    }
}
