// The event envelope and the target-side check: every rejection reason,
// ordering, and properties over arbitrary tampering.

use std::time::{Duration, SystemTime};

use netproc_pki::Ed25519Key;
use netproc_propagation::{
    Ack, Check, Credential, Event, EventKind, RejectReason, SignedEvent, Verifier, sign,
};
use proptest::prelude::*;

const WINDOW: Duration = Duration::from_secs(300);

fn upsert(id: &str) -> EventKind {
    let mut c = Credential::default();
    c.id = id.to_owned();
    c.secret_sha256 = Some([7; 32]);
    c.generation = 1;
    c.privileges = vec!["invoke_functions".into()];
    EventKind::Upsert(c)
}

struct Fixture {
    authority: Ed25519Key,
    verifier: Verifier,
    now: SystemTime,
}

impl Fixture {
    fn new() -> Fixture {
        let authority = Ed25519Key::generate().unwrap();
        let verifier = Verifier::new("t1", vec![authority.public_key()], WINDOW);
        Fixture {
            authority,
            verifier,
            now: SystemTime::now(),
        }
    }

    fn signed(&self, target: &str, seq: u64, kind: EventKind) -> SignedEvent {
        sign(&Event::new(target, seq, self.now, kind), &self.authority).unwrap()
    }

    fn ack(&self, signed: &SignedEvent, cursor: u64) -> Ack {
        match self.verifier.check(signed, cursor, self.now) {
            Check::Apply(_) => Ack::Applied,
            Check::Ack(a) => a,
        }
    }
}

#[test]
fn the_next_event_applies_and_a_replay_is_a_duplicate() {
    let f = Fixture::new();
    let e = f.signed("t1", 1, upsert("k1"));
    match f.verifier.check(&e, 0, f.now) {
        Check::Apply(event) => {
            assert_eq!(event.seq, 1);
            assert_eq!(event.kind, upsert("k1"));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(f.ack(&e, 1), Ack::Duplicate);
    assert_eq!(f.ack(&e, 9), Ack::Duplicate);
}

#[test]
fn a_gap_asks_for_a_snapshot_and_a_snapshot_fills_it() {
    let f = Fixture::new();
    assert_eq!(
        f.ack(&f.signed("t1", 5, upsert("k1")), 2),
        Ack::NeedsSnapshot
    );
    let snapshot = f.signed("t1", 5, EventKind::Snapshot(vec![]));
    assert_eq!(f.ack(&snapshot, 2), Ack::Applied);
    assert_eq!(f.ack(&snapshot, 5), Ack::Duplicate);
}

#[test]
fn each_rejection_has_its_reason() {
    let f = Fixture::new();
    // For another target.
    assert_eq!(
        f.ack(&f.signed("t2", 1, upsert("k1")), 0),
        Ack::Rejected(RejectReason::WrongTarget)
    );
    // Signed by a key the target does not trust.
    let stranger = Ed25519Key::generate().unwrap();
    let forged = sign(&Event::new("t1", 1, f.now, upsert("k1")), &stranger).unwrap();
    assert_eq!(
        f.ack(&forged, 0),
        Ack::Rejected(RejectReason::UnknownSigner)
    );
    // A trusted signer's name on a stranger's signature.
    let mut borrowed = forged.clone();
    borrowed.signer = f.authority.public_key();
    assert_eq!(
        f.ack(&borrowed, 0),
        Ack::Rejected(RejectReason::BadSignature)
    );
    // Tampered after signing.
    let mut tampered = f.signed("t1", 1, upsert("k1"));
    let last = tampered.body.len() - 1;
    tampered.body[last] ^= 1;
    assert_eq!(
        f.ack(&tampered, 0),
        Ack::Rejected(RejectReason::BadSignature)
    );
    // Stale, and from too far in the future.
    for skew in [-(WINDOW.as_secs() as i64) - 5, WINDOW.as_secs() as i64 + 5] {
        let at = if skew < 0 {
            f.now - Duration::from_secs(skew.unsigned_abs())
        } else {
            f.now + Duration::from_secs(skew as u64)
        };
        let e = sign(&Event::new("t1", 1, at, upsert("k1")), &f.authority).unwrap();
        assert_eq!(f.ack(&e, 0), Ack::Rejected(RejectReason::Stale), "{skew}");
    }
    // Authentic bytes that are not an event.
    let resigned = resign(&f.authority, vec![0xff; 3]);
    assert_eq!(f.ack(&resigned, 0), Ack::Rejected(RejectReason::Malformed));
}

/// Signs arbitrary bytes as an event body (what a buggy authority might send).
fn resign(key: &Ed25519Key, body: Vec<u8>) -> SignedEvent {
    let mut msg = b"netproc-propagation-event-v1\0".to_vec();
    msg.extend_from_slice(&body);
    let mut signed = sign(
        &Event::new(
            "x",
            0,
            SystemTime::now(),
            EventKind::Delete { id: "x".into() },
        ),
        key,
    )
    .unwrap();
    signed.body = body;
    signed.signature = key.sign(&msg).to_vec();
    signed
}

#[test]
fn a_second_trusted_key_lets_the_authority_rotate_its_own() {
    let f = Fixture::new();
    let next = Ed25519Key::generate().unwrap();
    let verifier = Verifier::new(
        "t1",
        vec![f.authority.public_key(), next.public_key()],
        WINDOW,
    );
    let e = sign(&Event::new("t1", 1, f.now, upsert("k1")), &next).unwrap();
    assert!(matches!(verifier.check(&e, 0, f.now), Check::Apply(_)));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Any change to a signed event's bytes or signature is never applied.
    #[test]
    fn tampering_is_never_applied(
        flips in proptest::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..4),
        in_signature in any::<bool>(),
    ) {
        let f = Fixture::new();
        let mut e = f.signed("t1", 1, upsert("k1"));
        let target = if in_signature { &mut e.signature } else { &mut e.body };
        let original = target.clone();
        for (i, x) in flips {
            let i = i.index(target.len());
            target[i] ^= x;
        }
        // Two equal flips of one byte cancel out: that is no tampering.
        prop_assume!(*target != original);
        let ack = f.ack(&e, 0);
        prop_assert!(matches!(ack, Ack::Rejected(RejectReason::BadSignature)), "{ack:?}");
    }

    /// Order: at or below the cursor is a duplicate, the next one applies,
    /// further ahead asks for a snapshot — for any cursor and seq.
    #[test]
    fn ordering_follows_the_cursor(cursor in 0u64..1_000, seq in 1u64..1_100) {
        let f = Fixture::new();
        let ack = f.ack(&f.signed("t1", seq, upsert("k1")), cursor);
        let expected = if seq <= cursor {
            Ack::Duplicate
        } else if seq == cursor + 1 {
            Ack::Applied
        } else {
            Ack::NeedsSnapshot
        };
        prop_assert_eq!(ack, expected);
    }

    /// Arbitrary bodies signed by a trusted key never panic the check.
    #[test]
    fn arbitrary_signed_bytes_are_refused_or_decoded(body in proptest::collection::vec(any::<u8>(), 0..256)) {
        let f = Fixture::new();
        let _ = f.ack(&resign(&f.authority, body), 0);
    }
}
