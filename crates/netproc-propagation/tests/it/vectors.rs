// Test vectors of the delivery exchange (fixtures/wire/propagation.json):
// each decodes and re-encodes byte-identically, and the signed ones verify
// with the vector's public key. Signing is deterministic (Ed25519), so the
// whole file is reproducible.
//
// Regenerate after a deliberate change:
// `NETPROC_BLESS=1 cargo test -p netproc-propagation --test it vectors`.

use std::time::{Duration, UNIX_EPOCH};

use netproc_pki::Ed25519Key;
use netproc_propagation::{
    Ack, Check, Credential, Delivery, DeliveryReply, Event, EventKind, RejectReason, Verifier,
    sign, sign_with_epoch,
};
use serde::{Deserialize, Serialize};

const PATH: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../fixtures/wire/propagation.json"
);

#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Vector {
    name: String,
    description: String,
    hex: String,
}

fn key() -> Ed25519Key {
    Ed25519Key::from_seed(&[7; 32]).unwrap()
}

fn credential() -> Credential {
    let mut c = Credential::default();
    c.id = "billing".into();
    c.secret_sha256 = Some([0xab; 32]);
    c.generation = 2;
    c.privileges = vec!["invoke_functions".into()];
    c.functions = Some(vec!["add".into()]);
    c.binding = Some("dns:billing.internal".into());
    c.expires_at = Some(1_800_000_000);
    c.previous = Some(([0xcd; 32], 1, 1_700_000_600_000));
    c
}

const ISSUED_MS: u64 = 1_700_000_000_000;

fn event(seq: u64, kind: EventKind) -> Event {
    let mut e = Event::new(
        "server_1",
        seq,
        UNIX_EPOCH + Duration::from_millis(ISSUED_MS),
        kind,
    );
    e.event_id = 41 + seq;
    e
}

fn built() -> Vec<Vector> {
    let k = key();
    let upsert = sign(&event(1, EventKind::Upsert(credential())), &k).unwrap();
    let delete = sign(
        &event(
            2,
            EventKind::Delete {
                id: "billing".into(),
            },
        ),
        &k,
    )
    .unwrap();
    let snapshot = sign(&event(3, EventKind::Snapshot(vec![credential()])), &k).unwrap();
    let part = sign(
        &event(
            4,
            EventKind::SnapshotPart {
                index: 0,
                total: 2,
                credentials: vec![credential()],
            },
        ),
        &k,
    )
    .unwrap();
    // The upsert's body with one trailing byte, validly signed: a target
    // must refuse it (rejected: malformed), as every other decoder does.
    let trailing = {
        let mut body = upsert.body.clone();
        body.push(0);
        let mut message = b"netproc-propagation-event-v1\0".to_vec();
        message.extend_from_slice(&body);
        let mut signed = upsert.clone();
        signed.signature = k.sign(&message).to_vec();
        signed.body = body;
        signed
    };
    let v = |name: &str, description: &str, bytes: Vec<u8>| Vector {
        name: name.into(),
        description: description.into(),
        hex: hex::encode(bytes),
    };
    vec![
        v(
            "authority_public_key",
            "Ed25519 public key of seed [7; 32], which signs the vectors below",
            k.public_key().to_vec(),
        ),
        v(
            "event_upsert",
            "Event body: upsert of credential billing (generation 2, with a previous secret), seq 1, for server_1",
            upsert.body.clone(),
        ),
        v(
            "delivery_upsert",
            "Delivery of the signed upsert event",
            Delivery::new(vec![upsert]).encode(),
        ),
        v(
            "delivery_delete",
            "Delivery of a signed delete of billing, seq 2",
            Delivery::new(vec![delete]).encode(),
        ),
        v(
            "delivery_snapshot",
            "Delivery of a signed snapshot holding billing, seq 3",
            Delivery::new(vec![snapshot]).encode(),
        ),
        v(
            "delivery_snapshot_part",
            "Delivery of part 0 of a 2-part snapshot holding billing, seq 4",
            Delivery::new(vec![part]).encode(),
        ),
        v(
            "delivery_upsert_trailing_byte",
            "Delivery of the upsert's body plus one trailing 00 byte, validly signed: rejected (malformed)",
            Delivery::new(vec![trailing]).encode(),
        ),
        v(
            "delivery_probe",
            "An empty delivery: asks for the cursor only",
            Delivery::default().encode(),
        ),
        v(
            "reply_mixed",
            "Reply: cursor 1, acks applied / duplicate / needs_snapshot / rejected(stale), conflicts [\"local-key\"]",
            {
                let mut r = DeliveryReply::default();
                r.cursor = 1;
                r.acks = vec![
                    Ack::Applied,
                    Ack::Duplicate,
                    Ack::NeedsSnapshot,
                    Ack::Rejected(RejectReason::Stale),
                ];
                r.conflicts = vec!["local-key".into()];
                r.encode()
            },
        ),
        v(
            "delivery_epoch_upsert",
            "Second format (extension netproc.propagation.deliver.v2): delivery of the upsert of billing, seq 1, signed in epoch 3 (EpochEvent body, domain netproc-propagation-event-v2)",
            Delivery::new(vec![
                sign_with_epoch(&event(1, EventKind::Upsert(credential())), 3, &k).unwrap(),
            ])
            .encode(),
        ),
        v(
            "reply_stale_leader",
            "Reply (second format only): cursor 5, acks rejected(stale_leader)",
            {
                let mut r = DeliveryReply::default();
                r.cursor = 5;
                r.acks = vec![Ack::Rejected(RejectReason::StaleLeader)];
                r.encode()
            },
        ),
        v(
            "delivery_deny_cert",
            "Third format (extension netproc.propagation.deliver.v3, events as the second): seq 2 denies the certificate with serial 0a1b from CN=example CA until 1893456000000 ms, seq 3 allows back the key 0707…07, seq 4 is the whole deny list (key 0909…09 until 1893456000000 ms); epoch 3",
            Delivery::new(vec![
                sign_with_epoch(
                    &event(
                        2,
                        EventKind::DenyCert {
                            cert: netproc_propagation::CertRef::Serial {
                                issuer: "CN=example CA".into(),
                                serial: "0a1b".into(),
                            },
                            not_after: 1_893_456_000_000,
                        },
                    ),
                    3,
                    &k,
                )
                .unwrap(),
                sign_with_epoch(
                    &event(
                        3,
                        EventKind::AllowCert {
                            cert: netproc_propagation::CertRef::Spki([7; 32]),
                        },
                    ),
                    3,
                    &k,
                )
                .unwrap(),
                sign_with_epoch(
                    &event(
                        4,
                        EventKind::DenyList(vec![(
                            netproc_propagation::CertRef::Spki([9; 32]),
                            1_893_456_000_000,
                        )]),
                    ),
                    3,
                    &k,
                )
                .unwrap(),
            ])
            .encode(),
        ),
    ]
    .into_iter()
    .chain(amqp_vectors())
    .collect()
}

/// The broker transport's messages (wire contract §10, "Through a
/// broker"): a request and a reply signed by the target's reply key
/// (seed [9; 32]).
fn amqp_vectors() -> Vec<Vector> {
    use netproc_propagation::{AmqpOutcome, AmqpReply, AmqpRequest};
    let v = |name: &str, description: &str, bytes: Vec<u8>| Vector {
        name: name.into(),
        description: description.into(),
        hex: hex::encode(bytes),
    };
    let reply_key = Ed25519Key::from_seed(&[9; 32]).unwrap();
    let authority = key().public_key();
    let request = AmqpRequest {
        version: 1,
        format: 3,
        authority,
        reply_to: "netproc.authority.0123456789abcdef".into(),
        correlation_id: 42,
        target: "server_1".into(),
        delivery: Delivery::new(vec![]).encode(),
    };
    let mut reply_body = DeliveryReply::default();
    reply_body.cursor = 7;
    let outcome = AmqpOutcome::Reply(reply_body.encode());
    let signed = AmqpReply::signed_message(&authority, &request.reply_to, "server_1", 42, &outcome);
    let reply = AmqpReply {
        correlation_id: 42,
        target: "server_1".into(),
        signature: reply_key.sign(&signed).to_vec(),
        outcome,
    };
    vec![
        v(
            "amqp_reply_public_key",
            "Ed25519 public key of seed [9; 32], a target's reply key",
            reply_key.public_key().to_vec(),
        ),
        v(
            "amqp_request_probe",
            "AmqpRequest: version 1, format 3, the authority's key above, reply_to netproc.authority.0123456789abcdef, correlation id 42, target server_1, an empty Delivery (a probe)",
            request.encode(),
        ),
        v(
            "amqp_reply_signed_message",
            "What the reply's signature covers: the domain tag, then postcard of (authority key, reply_to, target, correlation id, outcome)",
            signed,
        ),
        v(
            "amqp_reply_cursor_7",
            "AmqpReply to the probe: correlation id 42, target server_1, Reply(DeliveryReply { cursor: 7 }), signed by the reply key above",
            reply.encode(),
        ),
    ]
}

#[test]
fn the_broker_messages_decode_re_encode_and_the_reply_verifies() {
    use netproc_propagation::{AmqpReply, AmqpRequest};
    let text = std::fs::read_to_string(PATH).expect("fixtures/wire/propagation.json");
    let file: Vec<Vector> = serde_json::from_str(&text).unwrap();
    let bytes =
        |name: &str| hex::decode(&file.iter().find(|v| v.name == name).unwrap().hex).unwrap();
    let request = AmqpRequest::decode(&bytes("amqp_request_probe")).unwrap();
    assert_eq!(request.encode(), bytes("amqp_request_probe"));
    let reply = AmqpReply::decode(&bytes("amqp_reply_cursor_7")).unwrap();
    assert_eq!(reply.encode(), bytes("amqp_reply_cursor_7"));
    let message = AmqpReply::signed_message(
        &request.authority,
        &request.reply_to,
        &reply.target,
        reply.correlation_id,
        &reply.outcome,
    );
    assert_eq!(message, bytes("amqp_reply_signed_message"));
    let public: [u8; 32] = bytes("amqp_reply_public_key").try_into().unwrap();
    assert!(netproc_pki::verify_ed25519(
        &public,
        &message,
        &reply.signature
    ));
}

#[test]
fn every_vector_decodes_re_encodes_and_verifies() {
    let built = built();
    if std::env::var_os("NETPROC_BLESS").is_some() {
        let json = serde_json::to_string_pretty(&built).unwrap();
        std::fs::write(PATH, json + "\n").unwrap();
    }
    let text = std::fs::read_to_string(PATH).expect("fixtures/wire/propagation.json");
    let file: Vec<Vector> = serde_json::from_str(&text).unwrap();
    assert_eq!(file, built);
    let bytes =
        |name: &str| hex::decode(&file.iter().find(|v| v.name == name).unwrap().hex).unwrap();
    let public: [u8; 32] = bytes("authority_public_key").try_into().unwrap();
    let verifier = Verifier::new("server_1", vec![public], Duration::from_secs(300));
    let at = UNIX_EPOCH + Duration::from_millis(ISSUED_MS);
    for (name, seq) in [
        ("delivery_upsert", 1),
        ("delivery_delete", 2),
        ("delivery_snapshot", 3),
    ] {
        let raw = bytes(name);
        let delivery = Delivery::decode(&raw).unwrap();
        assert_eq!(delivery.encode(), raw, "{name}");
        match verifier.check(&delivery.events[0], seq - 1, at) {
            Check::Apply(e) => assert_eq!(e.seq, seq),
            Check::Ack(a) => panic!("{name}: {a:?}"),
        }
    }
    let trailing = Delivery::decode(&bytes("delivery_upsert_trailing_byte")).unwrap();
    assert_eq!(
        verifier.check(&trailing.events[0], 0, at),
        Check::Ack(Ack::Rejected(RejectReason::Malformed))
    );
    let upsert = Delivery::decode(&bytes("delivery_upsert")).unwrap();
    assert_eq!(upsert.events[0].body, bytes("event_upsert"));
    // The second format: verifies with its own domain, carries its epoch,
    // and is fenced below the target's highest epoch.
    let fenced = Delivery::decode(&bytes("delivery_epoch_upsert")).unwrap();
    assert_eq!(
        verifier.check_epoch(&fenced.events[0], 0, 3, at).1,
        3,
        "epoch 3, accepted at a target holding 3"
    );
    assert!(matches!(
        verifier.check_epoch(&fenced.events[0], 0, 3, at).0,
        Check::Apply(_)
    ));
    assert_eq!(
        verifier.check_epoch(&fenced.events[0], 0, 4, at).0,
        Check::Ack(Ack::Rejected(RejectReason::StaleLeader))
    );
    // Each format's signature is over its own domain: never mistaken.
    assert_eq!(
        verifier.check(&fenced.events[0], 0, at),
        Check::Ack(Ack::Rejected(RejectReason::BadSignature))
    );
    let reply = bytes("reply_mixed");
    assert_eq!(DeliveryReply::decode(&reply).unwrap().encode(), reply);
    assert!(
        DeliveryReply::decode(&[reply.as_slice(), &[0]].concat()).is_err(),
        "trailing bytes"
    );
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

    /// Arbitrary bytes never panic either decoder; what decodes re-encodes
    /// to bytes that decode to the same value.
    #[test]
    fn arbitrary_bytes_are_refused_or_round_trip(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
        if let Ok(d) = Delivery::decode(&bytes) {
            proptest::prop_assert_eq!(Delivery::decode(&d.encode()).unwrap(), d);
        }
        if let Ok(r) = DeliveryReply::decode(&bytes) {
            proptest::prop_assert_eq!(DeliveryReply::decode(&r.encode()).unwrap(), r);
        }
    }
}
