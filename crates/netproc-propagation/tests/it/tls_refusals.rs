// Over real TLS: forged, replayed, stale and misaddressed events change
// nothing; delivery needs the receive_credentials privilege.

use std::time::{Duration, SystemTime};

use netproc_pki::Ed25519Key;
use netproc_propagation::TransportError;
use netproc_propagation::{
    Ack, Credential, Delivery, DeliveryReply, EXTENSION, Event, EventKind, NetprocTransport,
    RejectReason, Transport, sign,
};
use netproc_wire::{ErrorCode, Operation, Value};

use crate::fleet::*;

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
